//! Fleet test analytics as `report --fleet --json` writes them: success and pass rates per
//! node, branch and suite (each also per day), the slowest and most often failing tests,
//! flaky tests, nodes that stand out, and what the caps left out. The aggregation that fills
//! them is `results::fleet`.

use serde::Serialize;

/// Counts of runs and cases, with the rates derived from them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Rates {
    /// Runs with results.
    pub runs: u64,
    /// Of which passed.
    pub runs_passed: u64,
    /// Passed runs / runs (null without runs).
    pub success_rate: Option<f64>,
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
    /// Passed / (passed + failed + errors) (null without such cases).
    pub pass_rate: Option<f64>,
}

/// One day of a group.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Day {
    /// `YYYY-MM-DD` (UTC, the day of the seal).
    pub date: String,
    /// That day's numbers.
    #[serde(flatten)]
    pub rates: Rates,
}

/// A node, branch or suite: its rates over the window and per day.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Group {
    /// The node id, branch or suite name (`(none)`: runs without a branch).
    pub name: String,
    /// Over the window.
    #[serde(flatten)]
    pub rates: Rates,
    /// Per day, oldest first (days without runs left out).
    pub days: Vec<Day>,
    /// The key prefix of its newest run (nodes and branches), where it can be seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_run: Option<String>,
}

/// A test in the top lists.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TestStat {
    /// Suite (where it was first seen).
    pub suite: String,
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// Times it ran (skips included).
    pub runs: u64,
    /// Passed.
    pub passed: u64,
    /// Failed or erred.
    pub failed: u64,
    /// Skipped.
    pub skipped: u64,
    /// failed / (runs − skipped).
    pub failure_rate: Option<f64>,
    /// Mean time when not skipped, ms.
    pub mean_ms: u64,
    /// Longest time, ms.
    pub max_ms: u64,
    /// The key prefix of the newest run in which it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_in: Option<String>,
}

/// A flaky test.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Flaky {
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// Revisions (commits, or runs without one) for which it both failed and passed.
    pub revisions: u64,
    /// Some of those commits (`run:<node>/<run>` for a run without one).
    pub commits: Vec<String>,
    /// The key prefix of the newest run in which it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_in: Option<String>,
}

/// A node whose failure rate stands out.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outlier {
    /// Node id.
    pub node: String,
    /// Its runs with results.
    pub runs: u64,
    /// Its run failure rate.
    pub failure_rate: f64,
    /// The rest of the fleet's.
    pub fleet_failure_rate: f64,
    /// Standard errors above the rest.
    pub z: f64,
}

/// A record object that could not be used.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BadRecord {
    /// Its key (control characters escaped).
    pub key: String,
    /// Why.
    pub error: String,
}

/// What was left out because a cap was reached.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Capped {
    /// Test cases of tests past the cap on tests (in the counts, not in the test lists).
    pub cases_of_untracked_tests: u64,
    /// Cases past the cap on pairs left out of the flaky check.
    pub cases_not_checked_for_flakiness: u64,
    /// Cases the writing nodes left out of their records (counted in the totals).
    pub cases_omitted_by_writers: u64,
    /// Cases past the cap on (branch, test) pairs left out of the branch rules.
    pub cases_not_checked_on_branches: u64,
}

/// The fleet's test results (`results` in `report --fleet --json`).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct FleetResults {
    /// The window's first day (`YYYY-MM-DD`, UTC).
    pub from: String,
    /// Its last day.
    pub to: String,
    /// Runs sealed at or after this (ms since the epoch) are counted.
    pub since_ms: i64,
    /// `--branch`, when given.
    pub branch: Option<String>,
    /// `date=` partitions listed.
    pub partitions: u64,
    /// Records read (in the window and on the branch).
    pub records: u64,
    /// Runs without test cases (in no rate).
    pub runs_without_tests: u64,
    /// JUnit files the nodes could not parse.
    pub unreadable_junit_files: u64,
    /// Over every run.
    pub totals: Rates,
    /// Per day.
    pub days: Vec<Day>,
    /// Per node.
    pub nodes: Vec<Group>,
    /// Per branch.
    pub branches: Vec<Group>,
    /// Per suite.
    pub suites: Vec<Group>,
    /// Flaky tests, most revisions first.
    pub flaky: Vec<Flaky>,
    /// Tests that failed every time they ran (at least twice).
    pub consistently_failing: Vec<TestStat>,
    /// Broken: failed on every execution of each of its last 3 commits.
    pub broken: Vec<TestStat>,
    /// Failing on one node far more often than on the rest of the fleet.
    pub node_specific: Vec<NodeSpecific>,
    /// New failures: on a branch, failed on every execution of its newest commit after
    /// passing on every execution of the commit before.
    pub new_failures: Vec<BranchChange>,
    /// Fixed: on a branch, passed on every execution (first tries) of its newest commit after
    /// failing on every execution of the commit before.
    pub fixed: Vec<BranchChange>,
    /// Flipping between pass and fail over its last executions on a branch.
    pub flipping: Vec<Flipping>,
    /// Most often failing tests.
    pub most_failing: Vec<TestStat>,
    /// Slowest tests by mean time.
    pub slowest: Vec<TestStat>,
    /// Nodes whose failure rate stands out.
    pub outlier_nodes: Vec<Outlier>,
    /// Records that could not be read.
    pub unreadable: Vec<BadRecord>,
    /// What caps left out.
    pub capped: Capped,
}

/// What the fleet's records say about one failing test of a run.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Story {
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// Which story.
    pub kind: StoryKind,
    /// For `new_failure`: the commit of the last run on the branch, where it passed; for
    /// `failing_since`: the oldest commit of the run of failures.
    pub commit: Option<String>,
    /// For `failing_since`: runs failed in a row, this one included; for `known_flaky`: the
    /// commits it both failed and passed on.
    pub runs: u64,
}

/// The story of a failing test.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoryKind {
    /// Failed and passed on one commit (or passed on a retry) somewhere in the window.
    KnownFlaky,
    /// Passed in the branch's previous run.
    NewFailure,
    /// Failed in the branch's previous runs too.
    FailingSince,
    /// Not seen on the branch before (in the window).
    FirstSeen,
}

/// A pull request's failures against its base branch's newest run.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub(crate) struct BaseDiff {
    /// The base branch.
    pub branch: String,
    /// The key prefix of its newest run.
    pub run: String,
    /// Failures that the base branch's run does not have.
    pub new: Vec<String>,
    /// Failures the base branch's run has too.
    pub already: Vec<String>,
}

/// The stories of a run's failures.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Stories {
    /// One per listed failure.
    pub tests: Vec<Story>,
    /// For a pull request whose base branch has a run.
    pub base: Option<BaseDiff>,
    /// Records that could not be read.
    pub unreadable: u64,
}

/// One execution of a test, as `report --test` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Execution {
    /// The node.
    pub node: String,
    /// The run.
    pub run: String,
    /// The run's key prefix (where its page is).
    pub key_prefix: String,
    /// When the run was sealed (ms since the epoch).
    pub sealed_at: i64,
    /// Branch and commit, when sealed in CI.
    pub branch: Option<String>,
    /// Commit.
    pub commit: Option<String>,
    /// The last try's outcome.
    pub outcome: super::results::Outcome,
    /// Every try's outcome.
    pub attempts: Vec<super::results::Outcome>,
    /// Its time, ms.
    pub duration_ms: u64,
    /// The failure's message.
    pub message: Option<String>,
    /// The files of the run that document the failure (relative to the run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
}

/// Per node: executions and failures of one test.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub(crate) struct NodeCount {
    /// The node.
    pub node: String,
    /// Executions (skips included).
    pub runs: u64,
    /// Failed or erred.
    pub failed: u64,
}

/// One test's history from the per-test records (`report --test ID`).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct TestHistory {
    /// The test id (`class::name`).
    pub test: String,
    /// The window's first and last day.
    pub from: String,
    /// Its last day.
    pub to: String,
    /// Executions in the window (skips included).
    pub runs: u64,
    /// Passed (on a retry included).
    pub passed: u64,
    /// Failed or erred.
    pub failed: u64,
    /// Skipped.
    pub skipped: u64,
    /// Passed only on a retry.
    pub passed_on_retry: u64,
    /// failed / (runs − skipped).
    pub failure_rate: Option<f64>,
    /// Commits on which it both failed and passed (or passed on a retry), newest first.
    pub flaky_commits: Vec<String>,
    /// Per node, by name.
    pub nodes: Vec<NodeCount>,
    /// The oldest and newest failures in the window.
    pub first_failure: Option<Execution>,
    /// The newest failure.
    pub last_failure: Option<Execution>,
    /// The newest executions, newest first (at most 100).
    pub executions: Vec<Execution>,
    /// Record objects that could not be read.
    pub unreadable: Vec<BadRecord>,
}

/// A test whose state changed on a branch between its last two commits.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct BranchChange {
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// The branch.
    pub branch: String,
    /// The newest commit it ran on there.
    pub commit: String,
    /// The commit before.
    pub previous_commit: String,
}

/// A test flipping between pass and fail on a branch.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Flipping {
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// The branch.
    pub branch: String,
    /// Its last executions there (at most 20; skips left out).
    pub executions: u64,
    /// Changes between passed and failed from one execution to the next among them.
    pub flips: u64,
    /// flips / (executions − 1).
    pub flip_rate: f64,
}

/// A test failing on one node far more often than on the rest of the fleet.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct NodeSpecific {
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// The node.
    pub node: String,
    /// Executions on the node (skips left out).
    pub runs: u64,
    /// Failures there.
    pub failed: u64,
    /// failed / runs on the node.
    pub failure_rate: f64,
    /// Executions on the rest of the fleet.
    pub other_runs: u64,
    /// Failures there.
    pub other_failed: u64,
    /// Their rate.
    pub other_failure_rate: f64,
}

/// A change of a test's state that the seal of a run brought (announced through `[[notify]]`
/// as a `test.*` event).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct TestChange {
    /// Which change.
    pub kind: ChangeKind,
    /// Suite.
    pub suite: String,
    /// Class.
    pub class: String,
    /// Name.
    pub name: String,
    /// The branch it happened on (broken, fixed), when the run has one.
    pub branch: Option<String>,
    /// The commit it happened on (the sealed run's, or the run's own id without one).
    pub commit: String,
    /// For `broken`: the commits it failed on, newest first; for `fixed`: the commit it
    /// failed on before; for `flaky`: the commits it flaked on.
    pub commits: Vec<String>,
}

/// The state a test entered.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ChangeKind {
    /// Became flaky: no flaky commit in the window before this run.
    Flaky,
    /// Became broken on its branch: failed on every execution of its last 3 commits.
    Broken,
    /// Fixed: passed on every execution of this commit, failed on every one of the one before.
    Fixed,
}
