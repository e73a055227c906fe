//! The run summary record: one line of newline-delimited JSON per sealed run, written in the
//! clear under `_panoptic-sync/runs/date=YYYY-MM-DD/node=<id>/<run>~<hash>.json` for `report --fleet`
//! and for query engines (schema 1 in docs/FORMAT.md).

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use super::results::{Collected, Outcome};

/// Test cases listed in a run's record (all are counted).
pub(crate) const MAX_RECORD_CASES: usize = 20_000;

/// Version of the run summary record (`schema` in each line).
pub(crate) const RECORD_SCHEMA: u32 = 1;

/// One test case in a [`RunRecord`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RecordCase {
    /// Suite.
    pub suite: String,
    /// Class (`classname`, else the suite).
    pub class: String,
    /// Test name.
    pub name: String,
    /// `passed`, `skipped`, `failed` or `error`.
    pub status: Outcome,
    /// Milliseconds.
    pub duration_ms: u64,
    /// Passed only after a retry.
    pub flaky: bool,
}

/// A label of the run, as a key/value pair (one schema for every record, whatever the keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Label {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

/// A sealed run's summary record: one line of newline-delimited JSON at
/// `_panoptic-sync/runs/date=<sealed date, UTC>/node=<node>/<run>.json` (schema 1, see
/// docs/FORMAT.md). The partition columns `date` and `node` are not repeated inside (query
/// engines refuse a column that is both), hence `node_id` and `sealed_ms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RunRecord {
    /// [`RECORD_SCHEMA`].
    pub schema: u32,
    /// Run name.
    pub run: String,
    /// The node that sealed it.
    pub node_id: String,
    /// When it was sealed (ms since the epoch).
    pub sealed_ms: i64,
    /// The run's key prefix.
    pub key_prefix: String,
    /// CI provider.
    pub provider: Option<String>,
    /// Repository.
    pub repository: Option<String>,
    /// Branch.
    pub branch: Option<String>,
    /// Tag.
    pub tag: Option<String>,
    /// Commit.
    pub commit: Option<String>,
    /// Pull or merge request.
    pub pull_request: Option<String>,
    /// Build or pipeline id.
    pub build: Option<String>,
    /// Job name.
    pub job: Option<String>,
    /// `--label` pairs (a reader keeps the first [`MAX_LABELS`]).
    #[serde(deserialize_with = "capped::<_, MAX_LABELS, _>")]
    pub labels: Vec<Label>,
    /// Test cases.
    pub tests: u64,
    /// Passed.
    pub passed: u64,
    /// Failed.
    pub failed: u64,
    /// Errors.
    pub errors: u64,
    /// Skipped.
    pub skipped: u64,
    /// Passed on retry.
    pub flaky: u64,
    /// Sum of the cases' times, ms.
    pub duration_ms: u64,
    /// JUnit files parsed.
    pub junit_files: u64,
    /// JUnit files left out.
    pub unreadable_files: u64,
    /// The test cases (at most [`MAX_RECORD_CASES`]; a reader skips any past that without
    /// keeping them, so a record of a million empty cases costs no memory).
    #[serde(deserialize_with = "capped::<_, MAX_RECORD_CASES, _>")]
    pub cases: Vec<RecordCase>,
    /// Cases not listed.
    pub cases_omitted: u64,
    /// The CI job's web page.
    pub job_url: Option<String>,
    /// The run page's key, when one was stored (relative to the destination base).
    pub page_key: Option<String>,
    /// Files in the run.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Labels a reader keeps per record.
const MAX_LABELS: usize = 100;

/// A JSON array of which the first `N` elements are kept and the rest skipped unparsed.
fn capped<'de, T: Deserialize<'de>, const N: usize, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    struct Capped<T, const N: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for Capped<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while out.len() < N {
                match seq.next_element()? {
                    Some(x) => out.push(x),
                    None => return Ok(out),
                }
            }
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(out)
        }
    }
    d.deserialize_seq(Capped::<T, N>(std::marker::PhantomData))
}

impl RunRecord {
    /// The record's counts.
    pub(crate) fn counts(&self) -> super::results::TestCounts {
        super::results::TestCounts {
            tests: self.tests,
            passed: self.passed,
            failed: self.failed,
            errors: self.errors,
            skipped: self.skipped,
        }
    }

    /// The record of a sealed run whose page (if any) is at `page_key`.
    pub(crate) fn new(m: &Manifest, collected: &Collected, page_key: Option<&str>) -> RunRecord {
        let ci = m.ci.clone().unwrap_or_default();
        let s = collected.summary.clone().unwrap_or_default();
        RunRecord {
            schema: RECORD_SCHEMA,
            run: m.run.clone(),
            node_id: m.node.clone(),
            sealed_ms: m.sealed_ms,
            key_prefix: m.key_prefix.clone(),
            provider: m.ci.as_ref().map(|c| c.provider.clone()),
            repository: ci.repository,
            branch: ci.branch,
            tag: ci.tag,
            commit: ci.commit,
            pull_request: ci.pull_request,
            build: ci.build,
            job: ci.job,
            labels: m
                .labels
                .iter()
                .map(|(k, v)| Label {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            tests: s.tests,
            passed: s.passed,
            failed: s.failed,
            errors: s.errors,
            skipped: s.skipped,
            flaky: s.flaky,
            duration_ms: s.duration_ms,
            junit_files: s.files.len() as u64,
            unreadable_files: s.unreadable.len() as u64,
            cases: collected
                .cases
                .iter()
                .map(|c| RecordCase {
                    suite: c.suite.to_string(),
                    class: c.class.to_string(),
                    name: c.name.clone(),
                    status: c.outcome,
                    duration_ms: c.duration_ms,
                    flaky: c.flaky,
                })
                .collect(),
            cases_omitted: collected.cases_omitted,
            job_url: m.ci.as_ref().and_then(|c| c.url.clone()),
            page_key: page_key.map(str::to_string),
            files: m.totals.files,
            bytes: m.totals.bytes,
        }
    }
}

/// Version of the per-test records; readers refuse versions they do not know.
pub(crate) const TEST_RECORD_SCHEMA: u32 = 1;
/// Characters of a failure message a per-test record keeps.
pub(crate) const TEST_RECORD_MESSAGE: usize = 500;

/// One execution of one test: a line of a run's per-test records
/// (`_panoptic-sync/tests/date=D/node=N/<run>~<hash>.json`, NDJSON; docs/FORMAT.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct TestRecord {
    /// [`TEST_RECORD_SCHEMA`].
    pub schema: u32,
    /// The node that sealed the run.
    pub node: String,
    /// The run.
    pub run: String,
    /// The run's key prefix (where its page and files are).
    pub key_prefix: String,
    /// When the run was sealed, ms since the epoch.
    pub sealed_at: i64,
    /// CI provider, repository, branch, commit and pull request, when sealed in CI.
    pub provider: Option<String>,
    /// Repository.
    pub repository: Option<String>,
    /// Branch.
    pub branch: Option<String>,
    /// Commit.
    pub commit: Option<String>,
    /// Pull request.
    pub pull_request: Option<String>,
    /// The CI job's web page.
    pub job_url: Option<String>,
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// The stable id: `class::name` (the identity every report uses).
    pub test: String,
    /// `passed`, `failed`, `error` or `skipped`: the last try's outcome.
    pub outcome: Outcome,
    /// The outcome of each try, in order (one entry when it was not retried).
    pub attempts: Vec<Outcome>,
    /// Its time, ms.
    pub duration_ms: u64,
    /// The failure's message, at most [`TEST_RECORD_MESSAGE`] characters.
    pub message: Option<String>,
    /// For a failure listed in the manifest: the files of the run that document it
    /// (relative to the run; see the manifest's `evidence`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
}

/// The per-test records of a sealed run, one NDJSON line each (at most [`MAX_RECORD_CASES`]).
pub(crate) fn test_records(m: &Manifest, collected: &Collected) -> Vec<u8> {
    let ci = m.ci.clone().unwrap_or_default();
    let evidence: std::collections::HashMap<(&str, &str), &Vec<String>> = m
        .tests
        .iter()
        .flat_map(|t| &t.failures)
        .filter(|f| !f.evidence.is_empty())
        .map(|f| ((f.class.as_str(), f.name.as_str()), &f.evidence))
        .collect();
    let mut out = Vec::new();
    for c in collected.cases.iter().take(MAX_RECORD_CASES) {
        let failed = if c.outcome == Outcome::Error {
            Outcome::Error
        } else {
            Outcome::Failed
        };
        let mut attempts = vec![failed; usize::from(c.earlier_failures)];
        attempts.push(c.outcome);
        let r = TestRecord {
            schema: TEST_RECORD_SCHEMA,
            node: m.node.clone(),
            run: m.run.clone(),
            key_prefix: m.key_prefix.clone(),
            sealed_at: m.sealed_ms,
            provider: m.ci.as_ref().map(|c| c.provider.clone()),
            repository: ci.repository.clone(),
            branch: ci.branch.clone(),
            commit: ci.commit.clone(),
            pull_request: ci.pull_request.clone(),
            job_url: ci.url.clone(),
            suite: c.suite.to_string(),
            class: c.class.to_string(),
            name: c.name.clone(),
            test: format!("{}::{}", c.class, c.name),
            outcome: c.outcome,
            attempts,
            duration_ms: c.duration_ms,
            message: c
                .message
                .as_deref()
                .map(|m| super::results::truncate(m, TEST_RECORD_MESSAGE)),
            evidence: match c.outcome.is_failure() {
                true => evidence
                    .get(&(&*c.class, c.name.as_str()))
                    .map(|e| e.to_vec())
                    .unwrap_or_default(),
                false => Vec::new(),
            },
        };
        if serde_json::to_writer(&mut out, &r).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// The key of a run's per-test records: as [`record_key`], under `_panoptic-sync/tests`.
pub(crate) fn test_records_key(node: &str, key_prefix: &str, run: &str, sealed_ms: i64) -> String {
    let key = record_key(node, key_prefix, run, sealed_ms);
    format!(
        "{}{}",
        crate::format::layout::TESTS_PREFIX,
        key.strip_prefix(crate::format::layout::RUNS_PREFIX)
            .unwrap_or(&key)
    )
}

/// The UTC date (`YYYY-MM-DD`) of a time in ms since the epoch.
pub(crate) fn date_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".into())
}

/// Bytes of a run's name kept readable in its record's key.
const RECORD_NAME_KEEP: usize = 100;

/// The record's key (relative to a destination base):
/// `…/date=<D>/node=<N>/<run, at most 100 bytes>~<16 hex of SHA-256(key_prefix)>.json`. The
/// run's key prefix (the watch's prefix and the run) makes it unique when two run watches hold
/// a run of the same name, and the cut keeps every name within 255 bytes.
pub(crate) fn record_key(node: &str, key_prefix: &str, run: &str, sealed_ms: i64) -> String {
    use sha2::{Digest, Sha256};
    let mut cut = RECORD_NAME_KEEP.min(run.len());
    while !run.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(key_prefix.as_bytes());
    format!(
        "{}/date={}/node={node}/{}~{}.json",
        crate::format::layout::RUNS_PREFIX,
        date_of(sealed_ms),
        &run[..cut],
        hex::encode(&digest[..8])
    )
}
