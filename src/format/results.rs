//! Test results as the manifest, the notification and the run page carry them: the outcome
//! of one case, a run's [`TestSummary`], and what parsing a run's JUnit files gives
//! ([`Collected`]). The parsing itself is a feature (`results`); these are its words.

use serde::{Deserialize, Serialize};

/// JUnit files parsed per run; more are counted, not parsed.
pub(crate) const MAX_FILES: usize = 1000;
/// Failures listed in a summary (all are counted).
pub(crate) const MAX_FAILURES: usize = 50;
/// Slowest tests listed in a summary.
pub(crate) const SLOWEST: usize = 10;
/// Characters of a failure message kept.
pub(crate) const MAX_MESSAGE: usize = 500;

/// The outcome of one test case.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// Passed (possibly after a retry: see `flaky`).
    #[default]
    Passed,
    /// Skipped.
    Skipped,
    /// An assertion failed (`<failure>`).
    Failed,
    /// An unexpected error (`<error>`).
    Error,
}

impl Outcome {
    /// Failed or error.
    pub(crate) fn is_failure(self) -> bool {
        matches!(self, Outcome::Failed | Outcome::Error)
    }
}

/// One test case as parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Case {
    /// The innermost `<testsuite>`'s name (shared by the suite's cases: a file of 200,000
    /// cases of one long-named suite holds the name once).
    pub suite: std::sync::Arc<str>,
    /// `classname` (the suite's name when absent; shared while cases repeat it).
    pub class: std::sync::Arc<str>,
    /// `name`.
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// `time`, in milliseconds.
    pub duration_ms: u64,
    /// Passed after failing first (surefire's and nextest's `<flakyFailure>`/`<flakyError>`).
    pub flaky: bool,
    /// Failed tries before the one whose outcome this is (`<flakyFailure>`, `<flakyError>`,
    /// `<rerunFailure>`, `<rerunError>` elements).
    pub earlier_failures: u16,
    /// The failure's message (truncated), for failures and errors.
    pub message: Option<String>,
    /// The failure's text (a stack trace) when the message came from its `message`
    /// attribute, truncated to [`MAX_TRACE`] characters.
    pub trace: Option<String>,
    /// Paths its `<system-out>`/`<system-err>` names as `[[ATTACHMENT|path]]`, as written
    /// (at most [`MAX_EVIDENCE`]).
    pub attachments: Vec<String>,
}

/// Characters of a failure's trace kept for the run's page.
pub(crate) const MAX_TRACE: usize = 2000;

/// A failure or error listed in a [`TestSummary`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Failure {
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Test name.
    pub name: String,
    /// `failed` or `error`.
    pub outcome: Outcome,
    /// The message, at most [`MAX_MESSAGE`] characters.
    pub message: Option<String>,
    /// The JUnit file it came from, relative to the run.
    pub file: String,
    /// Its trace, when it has one besides the message (at most [`MAX_TRACE`] characters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Files of the run that document it, relative to the run, sorted (at most
    /// [`MAX_EVIDENCE`]): attachments its JUnit output names, paths its message or trace
    /// names, and the files under a directory named after the test.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
}

/// Evidence files kept per failure (and attachments read per case).
pub(crate) const MAX_EVIDENCE: usize = 20;

/// A test listed among the slowest of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Timed {
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Test name.
    pub name: String,
    /// Milliseconds.
    pub duration_ms: u64,
}

/// Totals of one suite of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct SuiteTotals {
    /// Suite name.
    pub name: String,
    /// Test cases.
    pub tests: u64,
    /// Failed.
    pub failed: u64,
    /// Errors.
    pub errors: u64,
    /// Skipped.
    pub skipped: u64,
    /// Sum of the cases' times, milliseconds.
    pub duration_ms: u64,
}

/// A JUnit file that could not be used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct BadFile {
    /// Path relative to the run.
    pub path: String,
    /// Why.
    pub error: String,
}

/// A run's test results, as the manifest carries them (`tests`, see docs/FORMAT.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct TestSummary {
    /// Test cases.
    pub tests: u64,
    /// Passed (retried ones included).
    pub passed: u64,
    /// Failed.
    pub failed: u64,
    /// Errors.
    pub errors: u64,
    /// Skipped.
    pub skipped: u64,
    /// Passed only after a retry.
    pub flaky: u64,
    /// The first [`MAX_FAILURES`] of those, by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retried: Vec<Timed>,
    /// Sum of the cases' times, milliseconds.
    pub duration_ms: u64,
    /// JUnit files parsed, relative to the run.
    pub files: Vec<String>,
    /// JUnit files left out (too large, not well-formed, not JUnit), each with the reason.
    pub unreadable: Vec<BadFile>,
    /// JUnit files past [`MAX_FILES`], not parsed.
    pub files_omitted: u64,
    /// The first [`MAX_FAILURES`] failures and errors.
    pub failures: Vec<Failure>,
    /// Failures and errors not listed.
    pub failures_omitted: u64,
    /// The [`SLOWEST`] slowest test cases, slowest first.
    pub slowest: Vec<Timed>,
    /// Totals per suite, by name.
    pub suites: Vec<SuiteTotals>,
}

/// The counts of a set of test cases (a run, a suite of a run): what the summary, the run
/// record and the fleet's rates each count, and the one rule of a passed run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TestCounts {
    /// Test cases.
    pub tests: u64,
    /// Passed (retried ones included).
    pub passed: u64,
    /// Failed.
    pub failed: u64,
    /// Errors.
    pub errors: u64,
    /// Skipped.
    pub skipped: u64,
}

impl TestCounts {
    /// Count one case.
    pub(crate) fn count(&mut self, outcome: Outcome) {
        self.tests = self.tests.saturating_add(1);
        let n = match outcome {
            Outcome::Passed => &mut self.passed,
            Outcome::Skipped => &mut self.skipped,
            Outcome::Failed => &mut self.failed,
            Outcome::Error => &mut self.errors,
        };
        *n = n.saturating_add(1);
    }

    /// The rule of a passed run, everywhere (summary, run page, report, fleet, DuckDB in
    /// docs/OPERATIONS.md): at least one test, and none failed or erred.
    pub(crate) fn passed_run(&self) -> bool {
        self.tests > 0 && self.failed == 0 && self.errors == 0
    }
}

impl TestSummary {
    /// The summary's counts.
    pub(crate) fn counts(&self) -> TestCounts {
        TestCounts {
            tests: self.tests,
            passed: self.passed,
            failed: self.failed,
            errors: self.errors,
            skipped: self.skipped,
        }
    }

    /// No failure and no error among at least one test ([`TestCounts::passed_run`]).
    pub(crate) fn passed_run(&self) -> bool {
        self.counts().passed_run()
    }

    /// `passed`, `FAILED` or `no tests`, for one-line listings.
    pub(crate) fn verdict(&self) -> &'static str {
        if self.tests == 0 {
            "no tests"
        } else if self.passed_run() {
            "passed"
        } else {
            "FAILED"
        }
    }

    /// `12 tests: 10 passed, 1 failed, 0 errors, 1 skipped` (and the unreadable files).
    pub(crate) fn counts_line(&self) -> String {
        let mut s = format!(
            "{} tests: {} passed, {} failed, {} errors, {} skipped",
            self.tests, self.passed, self.failed, self.errors, self.skipped
        );
        if self.flaky > 0 {
            s.push_str(&format!(", {} passed on retry", self.flaky));
        }
        if !self.unreadable.is_empty() {
            s.push_str(&format!(
                "; {} unreadable JUnit file{}",
                self.unreadable.len(),
                if self.unreadable.len() == 1 { "" } else { "s" }
            ));
        }
        s
    }
}

/// What parsing a run's JUnit files gave.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// The summary (None when the run has no JUnit file at all).
    pub summary: Option<TestSummary>,
    /// The test cases, at most the record's cap.
    pub cases: Vec<Case>,
    /// Cases not kept.
    pub cases_omitted: u64,
}

/// `s` cut to `max` characters (an ellipsis marks the cut).
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
