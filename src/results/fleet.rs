//! Fleet test analytics from the bucket alone: `report --fleet` reads the run summary records
//! every node writes under `_panoptic-sync/runs/date=YYYY-MM-DD/node=<id>/` and aggregates
//! them: success rates per node, branch and suite (each also per day), the slowest and most
//! often failing tests, flaky tests, and nodes whose failure rate stands out.
//!
//! Only the partitions of the window are listed (one listing per `date=` prefix from the first
//! day of `--since` to today). Records are streamed through a fixed-size aggregate: at most
//! [`READERS`] objects of at most [`MAX_RECORD_BYTES`] are held at once, tests are interned
//! once (at most [`MAX_TESTS`]) and the flaky check keeps two bits per (revision, test) pair (at
//! most [`MAX_PAIRS`]); past a cap, what is left out is counted and reported. Every record is
//! written by some other node: sizes are capped, counts are added with saturation, and text is
//! escaped by whoever prints it.
//!
//! Definitions (docs/OPERATIONS.md gives the same in SQL):
//! - a run with results has at least one test case; it *passed* when none failed or erred.
//!   Runs without test cases are counted apart and are in no rate.
//! - success rate: passed runs / runs with results; pass rate: passed cases / (passed +
//!   failed + errors).
//! - a suite's run passed when none of its cases in that run failed or erred.
//! - a test is (class, name); a revision is the commit, or for a run without one the run itself
//!   (node and name). A test is *flaky* when for one revision it both failed (or erred) and
//!   passed, across retries, shards or nodes, or passed only on a retry (`flaky` in a case).
//! - on a branch, a test's *commit state* is *failed* when every execution of that commit
//!   failed or erred, *clean* when every one passed on its first try. A *new failure*: its
//!   newest commit on the branch is failed and the one before clean; *fixed*: the newest is
//!   clean and the one before failed (commits ordered by their newest seal). Its *flip rate*:
//!   over its last [`FLIP_WINDOW`] executions on the branch (by seal time, then run), the
//!   changes between passed and failed from one to the next, divided by executions − 1; a
//!   test is *flipping* with at least [`FLIP_MIN_RUNS`] executions and a rate of at least
//!   [`FLIP_MIN_RATE`]. Runs without a branch are in none of these.
//! - a node *stands out* with at least [`OUTLIER_MIN_RUNS`] runs when its run failure rate is
//!   at least 25 points above the rest of the fleet's and at least two standard errors above it
//!   (binomial, the rest's rate clamped to 5–95 % so a clean fleet still needs evidence).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::destination::{self, Destination};
use crate::format::fleet::{
    BadRecord, BaseDiff, BranchChange, Capped, Day, Flaky, FleetResults, Flipping, Group,
    NodeSpecific, Outlier, Rates, Stories, Story, StoryKind, TestStat,
};
use crate::format::layout::RUNS_PREFIX;
use crate::format::record::{RECORD_SCHEMA, RecordCase, RunRecord, date_of};
use crate::format::results::{Outcome, TestCounts};

/// The largest record object read; larger ones are reported as unreadable, never downloaded.
pub(crate) const MAX_RECORD_BYTES: u64 = 16 << 20;
/// Records downloaded at once.
pub(super) const READERS: usize = 4;
/// Partition listings at once.
const LISTERS: usize = 8;
/// Distinct tests tracked (slowest, most failing, flaky).
pub(crate) const MAX_TESTS: usize = 200_000;
/// (revision, test) pairs tracked for the flaky check (13 bytes a slot, at most 4 Mi slots:
/// about 52 MiB at the cap).
pub(crate) const MAX_PAIRS: usize = 2_000_000;
/// Distinct nodes, branches or suites listed; the rest are added up under `(other)`.
const MAX_GROUPS: usize = 1_000;
/// Cells (group × day) of the per-day series; past this, new cells are left out of the series
/// (the totals still count them).
const MAX_DAY_CELLS: usize = 200_000;
/// Bytes of names (tests and revisions) the aggregate keeps; past this, new tests and
/// revisions are not tracked. Every name is also cut to [`super::MAX_NAME`] characters.
const MAX_NAME_BYTES: usize = 48 << 20;
/// Tests listed in each top list.
const TOP: usize = 20;
/// *Broken*: failed on every execution of its last this many commits.
pub(crate) const BROKEN_COMMITS: usize = 3;
/// *Node-specific*: at least this many executions on the node and on the rest of the fleet,
pub(crate) const NODE_SPECIFIC_MIN_RUNS: u32 = 4;
/// a failure rate on the node of at least this,
pub(crate) const NODE_SPECIFIC_MIN_RATE: f64 = 0.3;
/// and at least this many times the rest of the fleet's rate.
pub(crate) const NODE_SPECIFIC_RATIO: f64 = 3.0;
/// Executions per (branch, test) the flip rate looks at.
pub(crate) const FLIP_WINDOW: usize = 20;
/// *Flipping*: at least this many executions in the window,
pub(crate) const FLIP_MIN_RUNS: usize = 5;
/// and a flip rate of at least this.
pub(crate) const FLIP_MIN_RATE: f64 = 0.2;
/// Commits remembered per (branch, test) for the new-failure and fixed rules.
const BRANCH_COMMITS: usize = 4;
/// (branch, test) pairs tracked for the branch rules (at most about 450 bytes each).
pub(crate) const MAX_BRANCH_PAIRS: usize = 200_000;
/// Recent commits remembered per test for the broken rule.
const RECENT_COMMITS: usize = 2 * BROKEN_COMMITS;
/// Commits named per flaky test.
const FLAKY_COMMITS: usize = 5;
/// Runs a node needs before it can stand out.
pub(crate) const OUTLIER_MIN_RUNS: u64 = 3;
/// The longest window: a partition listing per day.
const MAX_DAYS: u64 = 3660;

/// What `report --fleet` asks of the records.
#[derive(Debug, Clone)]
pub(crate) struct Query {
    /// How far back (from now).
    pub since: Duration,
    /// Only runs of this branch.
    pub branch: Option<String>,
    /// Now, ms since the epoch.
    pub now_ms: i64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    runs: u64,
    runs_passed: u64,
    tests: u64,
    passed: u64,
    failed: u64,
    errors: u64,
    skipped: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.runs = self.runs.saturating_add(o.runs);
        self.runs_passed = self.runs_passed.saturating_add(o.runs_passed);
        self.tests = self.tests.saturating_add(o.tests);
        self.passed = self.passed.saturating_add(o.passed);
        self.failed = self.failed.saturating_add(o.failed);
        self.errors = self.errors.saturating_add(o.errors);
        self.skipped = self.skipped.saturating_add(o.skipped);
    }

    /// Runs that failed.
    fn failed_runs(&self) -> u64 {
        self.runs.saturating_sub(self.runs_passed)
    }

    fn rates(&self) -> Rates {
        let judged = self
            .passed
            .saturating_add(self.failed)
            .saturating_add(self.errors);
        Rates {
            runs: self.runs,
            runs_passed: self.runs_passed,
            success_rate: (self.runs > 0).then(|| self.runs_passed as f64 / self.runs as f64),
            tests: self.tests,
            passed: self.passed,
            failed: self.failed,
            errors: self.errors,
            skipped: self.skipped,
            pass_rate: (judged > 0).then(|| self.passed as f64 / judged as f64),
        }
    }
}

#[derive(Default)]
struct GroupAcc {
    total: Counts,
    days: BTreeMap<String, Counts>,
    /// The newest run counted (sealed ms, key prefix): where the group can be seen.
    latest: Option<(i64, Arc<str>)>,
}

#[derive(Default)]
struct TestAcc {
    suite: String,
    class: String,
    name: String,
    runs: u64,
    passed: u64,
    failed: u64,
    skipped: u64,
    total_ms: u64,
    max_ms: u64,
    /// The newest run in which it failed (sealed ms, key prefix).
    failed_in: Option<(i64, Arc<str>)>,
    /// Its newest commits: (newest sealed ms, revision id, failed on every execution).
    recent: Vec<(i64, u32, bool)>,
}

/// Keep the newer of `slot` and (`ms`, `at`).
fn newer(slot: &mut Option<(i64, Arc<str>)>, ms: i64, at: &Arc<str>) {
    if slot.as_ref().is_none_or(|(m, _)| ms >= *m) {
        *slot = Some((ms, at.clone()));
    }
}

pub(super) const PASS: u8 = 1;
pub(super) const FAIL: u8 = 2;
pub(super) const RETRIED: u8 = 4;

/// A test on one branch: its newest commits and executions there.
#[derive(Default)]
struct BranchAcc {
    /// (newest sealed ms, revision id, every execution failed, every one passed first try).
    commits: Vec<(i64, u32, bool, bool)>,
    /// (sealed ms, run id, failed), the newest [`FLIP_WINDOW`].
    executions: Vec<(i64, u32, bool)>,
}

/// The streaming aggregate.
#[derive(Default)]
struct Aggregate {
    records: u64,
    runs_without_tests: u64,
    unreadable_junit_files: u64,
    totals: Counts,
    days: BTreeMap<String, Counts>,
    nodes: BTreeMap<String, GroupAcc>,
    branches: BTreeMap<String, GroupAcc>,
    suites: BTreeMap<String, GroupAcc>,
    test_ids: HashMap<(String, String), u32>,
    tests: Vec<TestAcc>,
    revisions: HashMap<String, u32>,
    revision_names: Vec<String>,
    pairs: HashMap<(u32, u32), u8>,
    /// Per (test, node): executions and failures (skips left out).
    test_nodes: HashMap<(u32, u16), (u32, u32)>,
    node_ids: HashMap<String, u16>,
    node_names: Vec<String>,
    /// Per (branch id, test id): what the branch rules need.
    branch_tests: HashMap<(u32, u32), BranchAcc>,
    branch_ids: HashMap<String, u32>,
    branch_names: Vec<String>,
    /// Runs by key prefix, to order executions sealed in the same millisecond.
    run_ids: HashMap<Arc<str>, u32>,
    run_names: Vec<Arc<str>>,
    capped: Capped,
    name_bytes: usize,
    day_cells: usize,
}

/// A name from a record, cut to [`super::MAX_NAME`] characters.
fn clip(s: &str) -> String {
    super::truncate(s, super::MAX_NAME)
}

fn group<'a>(map: &'a mut BTreeMap<String, GroupAcc>, name: &str) -> &'a mut GroupAcc {
    let name = clip(name);
    let key = if map.len() < MAX_GROUPS || map.contains_key(&name) {
        name
    } else {
        "(other)".to_string()
    };
    map.entry(key).or_default()
}

/// Add `c` to `g`'s total and, while there is room, to its day `date`.
fn add_to(g: &mut GroupAcc, date: &str, c: &Counts, cells: &mut usize) {
    g.total.add(c);
    if let Some(d) = g.days.get_mut(date) {
        d.add(c);
    } else if *cells < MAX_DAY_CELLS {
        *cells += 1;
        g.days.entry(date.to_string()).or_default().add(c);
    }
}

impl TestAcc {
    /// Count one case of this test (the time of a skipped case is not counted).
    fn count(&mut self, c: &RecordCase, run: (i64, &Arc<str>)) {
        self.runs += 1;
        match c.status {
            Outcome::Passed => self.passed += 1,
            Outcome::Skipped => self.skipped += 1,
            Outcome::Failed | Outcome::Error => {
                self.failed += 1;
                newer(&mut self.failed_in, run.0, run.1);
            }
        }
        if c.status != Outcome::Skipped {
            self.total_ms = self.total_ms.saturating_add(c.duration_ms);
            self.max_ms = self.max_ms.max(c.duration_ms);
        }
    }

    /// Remember an execution of commit `rev` sealed at `ms` for the broken rule (the newest
    /// [`RECENT_COMMITS`] commits are kept).
    fn remember(&mut self, ms: i64, rev: u32, failed: bool) {
        if let Some(e) = self.recent.iter_mut().find(|e| e.1 == rev) {
            e.0 = e.0.max(ms);
            e.2 &= failed;
            return;
        }
        self.recent.push((ms, rev, failed));
        if self.recent.len() > RECENT_COMMITS {
            self.recent.sort_by_key(|e| std::cmp::Reverse(e.0));
            self.recent.truncate(RECENT_COMMITS);
        }
    }

    /// This test's line in the test lists.
    fn stat(&self) -> TestStat {
        let ran = self.runs.saturating_sub(self.skipped);
        TestStat {
            suite: self.suite.clone(),
            class: self.class.clone(),
            name: self.name.clone(),
            runs: self.runs,
            passed: self.passed,
            failed: self.failed,
            skipped: self.skipped,
            failure_rate: (ran > 0).then(|| self.failed as f64 / ran as f64),
            mean_ms: self.total_ms.checked_div(ran).unwrap_or(0),
            max_ms: self.max_ms,
            failed_in: self.failed_in.as_ref().map(|(_, k)| k.to_string()),
        }
    }
}

/// The flaky-check bits of a case's outcome, `flaky` when it passed on a retry (none for a
/// skipped case).
pub(super) fn outcome_bits(status: Outcome, flaky: bool) -> u8 {
    match status {
        Outcome::Passed if flaky => PASS | RETRIED,
        Outcome::Passed => PASS,
        Outcome::Failed | Outcome::Error => FAIL,
        Outcome::Skipped => 0,
    }
}

/// The rates of each day of a per-day map.
fn day_rates(m: &BTreeMap<String, Counts>) -> Vec<Day> {
    m.iter()
        .map(|(d, c)| Day {
            date: d.clone(),
            rates: c.rates(),
        })
        .collect()
}

/// The rates of each group, in total and per day.
fn group_rates(m: &BTreeMap<String, GroupAcc>) -> Vec<Group> {
    m.iter()
        .map(|(name, g)| Group {
            name: name.clone(),
            rates: g.total.rates(),
            days: day_rates(&g.days),
            latest_run: g.latest.as_ref().map(|(_, k)| k.to_string()),
        })
        .collect()
}

/// Node `name` (its counts `node`) against the rest of the fleet (`totals` less the node): an
/// [`Outlier`] when its run failure rate stands out.
fn outlier(name: &str, node: &Counts, totals: &Counts) -> Option<Outlier> {
    let n = node.runs;
    if n < OUTLIER_MIN_RUNS || name == "(other)" {
        return None;
    }
    let rest_runs = totals.runs.saturating_sub(n);
    if rest_runs == 0 {
        return None;
    }
    let rest_failed = totals.failed_runs().saturating_sub(node.failed_runs());
    let p = node.failed_runs() as f64 / n as f64;
    let p0 = rest_failed as f64 / rest_runs as f64;
    let clamped = p0.clamp(0.05, 0.95);
    let z = (p - p0) / (clamped * (1.0 - clamped) / n as f64).sqrt();
    (p - p0 >= 0.25 && z >= 2.0).then(|| Outlier {
        node: name.to_string(),
        runs: n,
        failure_rate: p,
        fleet_failure_rate: p0,
        z: (z * 100.0).round() / 100.0,
    })
}

/// Tests by (class, name).
fn by_name(a: &TestStat, b: &TestStat) -> std::cmp::Ordering {
    (&a.class, &a.name).cmp(&(&b.class, &b.name))
}

impl Aggregate {
    /// Add one run record written by `node`.
    fn add(&mut self, node: &str, r: RunRecord) {
        self.count_record(&r);
        if r.tests == 0 {
            self.runs_without_tests = self.runs_without_tests.saturating_add(1);
            return;
        }
        let date = date_of(r.sealed_ms);
        self.add_run(node, &r, &date);
        self.add_suites(&r.cases, &date);
        // Per test, and the flaky check per (revision, test).
        let rev = self.revision_id(node, &r);
        let at: Arc<str> = Arc::from(clip(&r.key_prefix));
        for (map, name) in [
            (&mut self.nodes, node),
            (&mut self.branches, r.branch.as_deref().unwrap_or("(none)")),
        ] {
            if let Some(g) = map.get_mut(&clip(name)) {
                newer(&mut g.latest, r.sealed_ms, &at);
            }
        }
        let node_id = self.node_id(node);
        let on_branch = r
            .branch
            .as_deref()
            .filter(|b| !b.is_empty())
            .and_then(|b| Some((self.branch_id(b)?, self.run_id(&at)?)));
        for c in &r.cases {
            let id = self.add_case(rev, c, (r.sealed_ms, &at), node_id);
            if let (Some(rev), Some((branch, run)), Some(id)) = (rev, on_branch, id) {
                self.add_branch_case(branch, id, c, (r.sealed_ms, rev, run));
            }
        }
    }

    /// Count a record, with the JUnit files and cases its writer reports as left out.
    fn count_record(&mut self, r: &RunRecord) {
        self.records = self.records.saturating_add(1);
        self.unreadable_junit_files = self
            .unreadable_junit_files
            .saturating_add(r.unreadable_files);
        self.capped.cases_omitted_by_writers = self
            .capped
            .cases_omitted_by_writers
            .saturating_add(r.cases_omitted);
    }

    /// Add a run with results to the totals and the day, its node's and its branch's.
    fn add_run(&mut self, node: &str, r: &RunRecord, date: &str) {
        let run = Counts {
            runs: 1,
            runs_passed: u64::from(r.counts().passed_run()),
            tests: r.tests,
            passed: r.passed,
            failed: r.failed,
            errors: r.errors,
            skipped: r.skipped,
        };
        self.totals.add(&run);
        // One cell per day of the window at most (the window is bounded).
        self.days.entry(date.to_string()).or_default().add(&run);
        for (map, name) in [
            (&mut self.nodes, node),
            (&mut self.branches, r.branch.as_deref().unwrap_or("(none)")),
        ] {
            add_to(group(map, name), date, &run, &mut self.day_cells);
        }
    }

    /// Add a run to each suite of its cases (passed when none of them failed or erred).
    fn add_suites(&mut self, cases: &[RecordCase], date: &str) {
        let mut suites: BTreeMap<&str, TestCounts> = BTreeMap::new();
        for c in cases {
            suites.entry(c.suite.as_str()).or_default().count(c.status);
        }
        for (name, t) in suites {
            let s = Counts {
                runs: 1,
                runs_passed: u64::from(t.passed_run()),
                tests: t.tests,
                passed: t.passed,
                failed: t.failed,
                errors: t.errors,
                skipped: t.skipped,
            };
            add_to(group(&mut self.suites, name), date, &s, &mut self.day_cells);
        }
    }

    /// The id of a run's revision (its commit, else the run itself), interned while names fit.
    fn revision_id(&mut self, node: &str, r: &RunRecord) -> Option<u32> {
        let revision = clip(&match r.commit.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => c.to_string(),
            None => format!("run:{node}/{}", r.run),
        });
        match self.revisions.get(&revision) {
            Some(&i) => Some(i),
            None if self.name_bytes < MAX_NAME_BYTES => {
                let i = self.revision_names.len() as u32;
                self.name_bytes += 2 * revision.len();
                self.revision_names.push(revision.clone());
                self.revisions.insert(revision, i);
                Some(i)
            }
            None => None,
        }
    }

    /// The id of a branch, interned while names fit.
    fn branch_id(&mut self, branch: &str) -> Option<u32> {
        let branch = clip(branch);
        if let Some(&i) = self.branch_ids.get(&branch) {
            return Some(i);
        }
        if self.name_bytes >= MAX_NAME_BYTES {
            return None;
        }
        let i = self.branch_names.len() as u32;
        self.name_bytes += 2 * branch.len();
        self.branch_names.push(branch.clone());
        self.branch_ids.insert(branch, i);
        Some(i)
    }

    /// The id of a run (its key prefix), interned while names fit.
    fn run_id(&mut self, at: &Arc<str>) -> Option<u32> {
        if let Some(&i) = self.run_ids.get(at) {
            return Some(i);
        }
        if self.name_bytes >= MAX_NAME_BYTES {
            return None;
        }
        let i = self.run_names.len() as u32;
        self.name_bytes += at.len();
        self.run_names.push(at.clone());
        self.run_ids.insert(at.clone(), i);
        Some(i)
    }

    /// Add a case of a run on a branch to its (branch, test): the commit's state and the
    /// execution (skips are in neither).
    fn add_branch_case(&mut self, branch: u32, id: u32, c: &RecordCase, run: (i64, u32, u32)) {
        if c.status == Outcome::Skipped {
            return;
        }
        let key = (branch, id);
        if self.branch_tests.len() >= MAX_BRANCH_PAIRS && !self.branch_tests.contains_key(&key) {
            self.capped.cases_not_checked_on_branches += 1;
            return;
        }
        let (ms, rev, run_id) = run;
        let failed = c.status.is_failure();
        let clean = c.status == Outcome::Passed && !c.flaky;
        let names = &self.revision_names;
        let runs = &self.run_names;
        let acc = self.branch_tests.entry(key).or_default();
        match acc.commits.iter_mut().find(|e| e.1 == rev) {
            Some(e) => {
                e.0 = e.0.max(ms);
                e.2 &= failed;
                e.3 &= clean;
            }
            None => {
                acc.commits.push((ms, rev, failed, clean));
                if acc.commits.len() > BRANCH_COMMITS {
                    acc.commits.sort_by(|a, b| {
                        (b.0, &names[b.1 as usize]).cmp(&(a.0, &names[a.1 as usize]))
                    });
                    acc.commits.truncate(BRANCH_COMMITS);
                }
            }
        }
        acc.executions.push((ms, run_id, failed));
        if acc.executions.len() > FLIP_WINDOW {
            // Drop the oldest: an execution older than the window's never comes back in.
            let oldest = acc
                .executions
                .iter()
                .enumerate()
                .min_by(|(_, a), (_, b)| {
                    (a.0, &runs[a.1 as usize]).cmp(&(b.0, &runs[b.1 as usize]))
                })
                .map(|(i, _)| i);
            if let Some(i) = oldest {
                acc.executions.swap_remove(i);
            }
        }
    }

    /// New failures, fixed tests and flipping tests, from the branch rules.
    fn branch_rules(&self) -> (Vec<BranchChange>, Vec<BranchChange>, Vec<Flipping>) {
        let (mut new, mut fixed, mut flipping) = (Vec::new(), Vec::new(), Vec::new());
        let names = &self.revision_names;
        for (&(branch, id), acc) in &self.branch_tests {
            let t = &self.tests[id as usize];
            let branch = &self.branch_names[branch as usize];
            let mut commits = acc.commits.clone();
            commits.sort_by(|a, b| (b.0, &names[b.1 as usize]).cmp(&(a.0, &names[a.1 as usize])));
            if let [last, before, ..] = commits.as_slice() {
                let change = || BranchChange {
                    suite: t.suite.clone(),
                    class: t.class.clone(),
                    name: t.name.clone(),
                    branch: branch.clone(),
                    commit: names[last.1 as usize].clone(),
                    previous_commit: names[before.1 as usize].clone(),
                };
                if last.2 && before.3 {
                    new.push(change());
                } else if last.3 && before.2 {
                    fixed.push(change());
                }
            }
            let mut runs = acc.executions.clone();
            runs.sort_by(|a, b| {
                (a.0, &self.run_names[a.1 as usize]).cmp(&(b.0, &self.run_names[b.1 as usize]))
            });
            let flips = runs.windows(2).filter(|w| w[0].2 != w[1].2).count();
            if runs.len() >= FLIP_MIN_RUNS {
                let rate = flips as f64 / (runs.len() - 1) as f64;
                if rate >= FLIP_MIN_RATE {
                    flipping.push(Flipping {
                        suite: t.suite.clone(),
                        class: t.class.clone(),
                        name: t.name.clone(),
                        branch: branch.clone(),
                        executions: runs.len() as u64,
                        flips: flips as u64,
                        flip_rate: rate,
                    });
                }
            }
        }
        let order = |a: &BranchChange, b: &BranchChange| {
            (&a.branch, &a.class, &a.name).cmp(&(&b.branch, &b.class, &b.name))
        };
        new.sort_by(order);
        fixed.sort_by(order);
        flipping.sort_by(|a, b| {
            b.flip_rate
                .total_cmp(&a.flip_rate)
                .then_with(|| (&a.branch, &a.class, &a.name).cmp(&(&b.branch, &b.class, &b.name)))
        });
        for list in [&mut new, &mut fixed] {
            list.truncate(TOP * 5);
        }
        flipping.truncate(TOP * 5);
        (new, fixed, flipping)
    }

    /// The id of a node, interned (at most 65,536 nodes).
    fn node_id(&mut self, node: &str) -> Option<u16> {
        if let Some(&i) = self.node_ids.get(node) {
            return Some(i);
        }
        let i = u16::try_from(self.node_names.len()).ok()?;
        self.node_names.push(node.to_string());
        self.node_ids.insert(node.to_string(), i);
        Some(i)
    }

    /// The id of a case's test, interned while there are slots and its names fit.
    fn test_id(&mut self, c: &RecordCase) -> Option<u32> {
        let key = (clip(&c.class), clip(&c.name));
        match self.test_ids.get(&key) {
            Some(&i) => Some(i),
            None if self.tests.len() < MAX_TESTS && self.name_bytes < MAX_NAME_BYTES => {
                let i = self.tests.len() as u32;
                let suite = clip(&c.suite);
                self.name_bytes += suite.len() + 2 * (key.0.len() + key.1.len());
                self.tests.push(TestAcc {
                    suite,
                    class: key.0.clone(),
                    name: key.1.clone(),
                    ..Default::default()
                });
                self.test_ids.insert(key, i);
                Some(i)
            }
            None => None,
        }
    }

    /// Add a case of revision `rev` to its test and to the flaky check (or count it as left out);
    /// returns the test's id.
    fn add_case(
        &mut self,
        rev: Option<u32>,
        c: &RecordCase,
        run: (i64, &Arc<str>),
        node: Option<u16>,
    ) -> Option<u32> {
        let Some(id) = self.test_id(c) else {
            self.capped.cases_of_untracked_tests += 1;
            return None;
        };
        self.tests[id as usize].count(c, run);
        if c.status != Outcome::Skipped {
            let failed = c.status.is_failure();
            if let Some(rev) = rev {
                self.tests[id as usize].remember(run.0, rev, failed);
            }
            if let Some(n) = node
                && (self.test_nodes.len() < MAX_PAIRS || self.test_nodes.contains_key(&(id, n)))
            {
                let e = self.test_nodes.entry((id, n)).or_default();
                e.0 += 1;
                e.1 += u32::from(failed);
            }
        }
        let bits = outcome_bits(c.status, c.flaky);
        if bits == 0 {
            return Some(id);
        }
        let tracked =
            rev.filter(|rev| self.pairs.len() < MAX_PAIRS || self.pairs.contains_key(&(*rev, id)));
        match tracked {
            Some(rev) => *self.pairs.entry((rev, id)).or_default() |= bits,
            None => self.capped.cases_not_checked_for_flakiness += 1,
        }
        Some(id)
    }

    /// Write the rates, the outlier nodes and the test lists into `out`.
    fn finish(self, out: &mut FleetResults) {
        out.records = self.records;
        out.runs_without_tests = self.runs_without_tests;
        out.unreadable_junit_files = self.unreadable_junit_files;
        out.totals = self.totals.rates();
        out.days = day_rates(&self.days);
        out.nodes = group_rates(&self.nodes);
        out.branches = group_rates(&self.branches);
        out.suites = group_rates(&self.suites);
        self.add_outliers(&mut out.outlier_nodes);
        out.flaky = self.flaky();
        (out.most_failing, out.consistently_failing) = self.failing();
        out.broken = self.broken();
        out.node_specific = self.node_specific();
        (out.new_failures, out.fixed, out.flipping) = self.branch_rules();
        out.slowest = self.slowest();
        out.capped = self.capped;
    }

    /// Add the nodes that stand out against the rest of the fleet to `out`, highest z first.
    fn add_outliers(&self, out: &mut Vec<Outlier>) {
        for (name, g) in &self.nodes {
            out.extend(outlier(name, &g.total, &self.totals));
        }
        out.sort_by(|a, b| b.z.total_cmp(&a.z).then(a.node.cmp(&b.node)));
    }

    /// The flaky tests (both outcomes for one revision, or a pass on retry), most revisions first.
    fn flaky(&self) -> Vec<Flaky> {
        let mut flaky: HashMap<u32, (u64, Vec<u32>)> = HashMap::new();
        for (&(rev, id), &bits) in &self.pairs {
            if bits & (PASS | FAIL) == PASS | FAIL || bits & RETRIED != 0 {
                let e = flaky.entry(id).or_default();
                e.0 += 1;
                e.1.push(rev);
            }
        }
        let mut flaky: Vec<Flaky> = flaky
            .into_iter()
            .map(|(id, (revisions, mut revs))| {
                let t = &self.tests[id as usize];
                let mut commits: Vec<String> = revs
                    .drain(..)
                    .map(|r| self.revision_names[r as usize].clone())
                    .collect();
                commits.sort();
                commits.truncate(FLAKY_COMMITS);
                Flaky {
                    suite: t.suite.clone(),
                    class: t.class.clone(),
                    name: t.name.clone(),
                    revisions,
                    commits,
                    failed_in: t.failed_in.as_ref().map(|(_, k)| k.to_string()),
                }
            })
            .collect();
        flaky.sort_by(|a, b| {
            b.revisions
                .cmp(&a.revisions)
                .then_with(|| (&a.class, &a.name).cmp(&(&b.class, &b.name)))
        });
        flaky.truncate(TOP * 5);
        flaky
    }

    /// The most often failing tests and, of those, the ones that never passed ([`TOP`] each).
    fn failing(&self) -> (Vec<TestStat>, Vec<TestStat>) {
        let mut failing: Vec<TestStat> = self
            .tests
            .iter()
            .filter(|t| t.failed > 0)
            .map(TestAcc::stat)
            .collect();
        failing.sort_by(|a, b| b.failed.cmp(&a.failed).then_with(|| by_name(a, b)));
        let consistently_failing = failing
            .iter()
            .filter(|t| t.failed >= 2 && t.passed == 0)
            .take(TOP)
            .cloned()
            .collect();
        failing.truncate(TOP);
        (failing, consistently_failing)
    }

    /// *Broken*: failed on every execution of each of its last [`BROKEN_COMMITS`] commits.
    fn broken(&self) -> Vec<TestStat> {
        let mut out: Vec<TestStat> = self
            .tests
            .iter()
            .filter(|t| {
                let mut recent = t.recent.clone();
                recent.sort_by_key(|e| std::cmp::Reverse(e.0));
                recent.len() >= BROKEN_COMMITS
                    && recent[..BROKEN_COMMITS].iter().all(|(_, _, all)| *all)
            })
            .map(TestAcc::stat)
            .collect();
        out.sort_by(|a, b| b.failed.cmp(&a.failed).then_with(|| by_name(a, b)));
        out.truncate(TOP * 5);
        out
    }

    /// *Node-specific*: failing on one node far more often than on the rest of the fleet (the
    /// thresholds are [`NODE_SPECIFIC_MIN_RUNS`], [`NODE_SPECIFIC_MIN_RATE`] and
    /// [`NODE_SPECIFIC_RATIO`]).
    fn node_specific(&self) -> Vec<NodeSpecific> {
        let mut totals: HashMap<u32, (u32, u32)> = HashMap::new();
        for (&(id, _), &(runs, failed)) in &self.test_nodes {
            let t = totals.entry(id).or_default();
            t.0 += runs;
            t.1 += failed;
        }
        let mut out = Vec::new();
        for (&(id, node), &(runs, failed)) in &self.test_nodes {
            let (all_runs, all_failed) = totals[&id];
            let (other_runs, other_failed) = (all_runs - runs, all_failed - failed);
            if runs < NODE_SPECIFIC_MIN_RUNS || other_runs < NODE_SPECIFIC_MIN_RUNS {
                continue;
            }
            let rate = f64::from(failed) / f64::from(runs);
            let other = f64::from(other_failed) / f64::from(other_runs);
            if rate >= NODE_SPECIFIC_MIN_RATE && rate >= NODE_SPECIFIC_RATIO * other {
                let t = &self.tests[id as usize];
                out.push(NodeSpecific {
                    suite: t.suite.clone(),
                    class: t.class.clone(),
                    name: t.name.clone(),
                    node: self.node_names[usize::from(node)].clone(),
                    runs: u64::from(runs),
                    failed: u64::from(failed),
                    failure_rate: rate,
                    other_runs: u64::from(other_runs),
                    other_failed: u64::from(other_failed),
                    other_failure_rate: other,
                });
            }
        }
        out.sort_by(|a, b| {
            b.failure_rate
                .total_cmp(&a.failure_rate)
                .then_with(|| (&a.class, &a.name, &a.node).cmp(&(&b.class, &b.name, &b.node)))
        });
        out.truncate(TOP * 5);
        out
    }

    /// The slowest tests by mean time: a bounded selection, never a sort of every test.
    fn slowest(&self) -> Vec<TestStat> {
        let mut slowest: Vec<TestStat> = Vec::with_capacity(TOP + 1);
        for t in &self.tests {
            let ran = t.runs.saturating_sub(t.skipped);
            let Some(mean) = t.total_ms.checked_div(ran) else {
                continue;
            };
            if slowest.len() < TOP || slowest.last().is_some_and(|s| mean > s.mean_ms) {
                slowest.push(t.stat());
                slowest.sort_by(|a, b| b.mean_ms.cmp(&a.mean_ms).then_with(|| by_name(a, b)));
                slowest.truncate(TOP);
            }
        }
        slowest
    }
}

/// Every `YYYY-MM-DD` from `from_ms`'s day to `to_ms`'s day (UTC).
pub(super) fn dates(from_ms: i64, to_ms: i64) -> Vec<String> {
    let day = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.date_naive());
    let (Some(mut d), Some(last)) = (day(from_ms), day(to_ms)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while d <= last && (out.len() as u64) <= MAX_DAYS {
        out.push(d.format("%Y-%m-%d").to_string());
        match d.succ_opt() {
            Some(n) => d = n,
            None => break,
        }
    }
    out
}

fn node_of(key: &str) -> Option<&str> {
    node_in(key, RUNS_PREFIX)
}

/// The node a record key under `prefix` names (`…/<prefix>/date=D/node=N/<name>.json`).
pub(super) fn node_in<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    let mut parts = key.rsplitn(4, '/');
    let (file, node, date, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let node = node.strip_prefix("node=").filter(|n| !n.is_empty())?;
    (file.ends_with(".json")
        && date.starts_with("date=")
        && (rest == prefix || rest.ends_with(&format!("/{prefix}"))))
    .then_some(node)
}

/// Read one record object (at most [`MAX_RECORD_BYTES`], streamed: the read stops past the
/// cap).
pub(super) async fn read_capped(
    primary: &Destination,
    meta: &ObjectMeta,
) -> anyhow::Result<Vec<u8>> {
    let too_big = || {
        anyhow::anyhow!(
            "larger than the {MAX_RECORD_BYTES} bytes a record object may have; not read"
        )
    };
    if meta.size > MAX_RECORD_BYTES {
        return Err(too_big());
    }
    let mut stream = primary
        .store
        .get(&meta.location)
        .await
        .map_err(|e| anyhow::anyhow!("{}", destination::error_chain(&e)))?
        .into_stream();
    let mut buf = Vec::with_capacity(meta.size as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| anyhow::anyhow!("{}", destination::error_chain(&e)))?;
        if (buf.len() + chunk.len()) as u64 > MAX_RECORD_BYTES {
            return Err(too_big());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// The lines of an NDJSON record object, each parsed, with its schema number checked.
pub(super) fn parse_lines<T: serde::de::DeserializeOwned>(
    buf: &[u8],
    what: &str,
    known: u32,
    schema: impl Fn(&T) -> u32,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in buf.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let r: T = serde_json::from_slice(line)
            .map_err(|e| anyhow::anyhow!("line {}: not a {what}: {e}", i + 1))?;
        if schema(&r) != known {
            anyhow::bail!(
                "line {}: {what} schema {} is not known to this build (it reads {known})",
                i + 1,
                schema(&r)
            );
        }
        out.push(r);
    }
    Ok(out)
}

/// Read one run record object and parse its lines.
async fn read_record(primary: &Destination, meta: &ObjectMeta) -> anyhow::Result<Vec<RunRecord>> {
    let buf = read_capped(primary, meta).await?;
    parse_lines(&buf, "run record", RECORD_SCHEMA, |r: &RunRecord| r.schema)
}

/// Read the records of the window from `primary` and aggregate them.
pub(crate) async fn read(primary: &Destination, q: &Query) -> anyhow::Result<FleetResults> {
    let since_ms = q
        .now_ms
        .saturating_sub(q.since.as_millis().min(i64::MAX as u128) as i64);
    let days = dates(since_ms.max(0), q.now_ms);
    let mut out = FleetResults {
        from: days.first().cloned().unwrap_or_default(),
        to: days.last().cloned().unwrap_or_default(),
        since_ms,
        branch: q.branch.clone(),
        partitions: days.len() as u64,
        ..Default::default()
    };
    let mut agg = Aggregate::default();
    each_record(primary, &days, &mut out.unreadable, |node, r| {
        if r.sealed_ms < since_ms
            || q.branch
                .as_ref()
                .is_some_and(|b| r.branch.as_ref() != Some(b))
        {
            return;
        }
        agg.add(node, r);
    })
    .await?;
    out.unreadable.sort_by(|a, b| a.key.cmp(&b.key));
    agg.finish(&mut out);
    Ok(out)
}

/// Every object in the `date=` partitions `days` under `prefix` of `primary`, sorted by
/// key; keys object_store cannot parse are added to `unreadable`.
pub(super) async fn list_partitions(
    primary: &Destination,
    prefix: &str,
    days: &[String],
    unreadable: &mut Vec<BadRecord>,
) -> anyhow::Result<Vec<ObjectMeta>> {
    let listings: Vec<_> = futures::stream::iter(days.to_vec())
        .map(|d| async move {
            let prefix = format!("{prefix}/date={d}");
            (prefix.clone(), primary.list_under(&prefix).await)
        })
        .buffer_unordered(LISTERS)
        .collect()
        .await;
    let mut objects = Vec::new();
    for (prefix, listing) in listings {
        match listing {
            Ok(l) => {
                for bad in l.bad_keys {
                    unreadable.push(BadRecord {
                        key: bad.key,
                        error: bad.reason,
                    });
                }
                objects.extend(l.objects);
            }
            Err(e) => anyhow::bail!("listing {prefix} in {}: {e}", primary.name),
        }
    }
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(objects)
}

/// Every run record in the `date=` partitions `days` of `primary`, with the node its key
/// names; what cannot be read is added to `unreadable`.
pub(super) async fn each_record(
    primary: &Destination,
    days: &[String],
    unreadable: &mut Vec<BadRecord>,
    mut f: impl FnMut(&str, RunRecord),
) -> anyhow::Result<()> {
    let objects = list_partitions(primary, RUNS_PREFIX, days, unreadable).await?;
    let mut reads = futures::stream::iter(objects)
        .map(|meta| async move {
            let res = read_record(primary, &meta).await;
            (meta, res)
        })
        .buffer_unordered(READERS);
    while let Some((meta, res)) = reads.next().await {
        let key = primary.relative(meta.location.as_ref()).to_string();
        let Some(node) = node_of(&key).map(str::to_string) else {
            unreadable.push(BadRecord {
                key: destination::printable(&key),
                error: "not under a node= partition".into(),
            });
            continue;
        };
        match res {
            Ok(records) => {
                for r in records {
                    f(&node, r);
                }
            }
            Err(e) => unreadable.push(BadRecord {
                key: destination::printable(&key),
                error: destination::printable(&format!("{e:#}")),
            }),
        }
    }
    Ok(())
}

/// What the fleet's records of the last `since` say about the failures of the run of
/// `manifest` (which must not be counted itself): per failing test, whether it is a known
/// flake, a new failure, or failing since some commit; and for a pull request with a base
/// branch, which failures are new against the base branch's newest run.
pub(crate) async fn stories(
    primary: &Destination,
    manifest: &crate::format::manifest::Manifest,
    since: Duration,
) -> anyhow::Result<Stories> {
    let Some(t) = &manifest.tests else {
        return Ok(Stories::default());
    };
    let failing: HashMap<(String, String), usize> = t
        .failures
        .iter()
        .enumerate()
        .map(|(i, f)| ((f.class.clone(), f.name.clone()), i))
        .collect();
    if failing.is_empty() {
        return Ok(Stories::default());
    }
    let ci = manifest.ci.clone().unwrap_or_default();
    let since_ms = manifest
        .sealed_ms
        .saturating_sub(since.as_millis().min(i64::MAX as u128) as i64);
    let days = dates(since_ms.max(0), manifest.sealed_ms);
    // Per failing test: executions on this branch before this run (sealed ms, commit,
    // failed), and the outcome bits per commit anywhere in the repository.
    let mut history: Vec<Vec<(i64, String, bool)>> = vec![Vec::new(); t.failures.len()];
    let mut per_commit: HashMap<(usize, String), u8> = HashMap::new();
    // The base branch's newest run: (sealed ms, key prefix, its failing tests among ours).
    let mut base: Option<(i64, String, Vec<bool>)> = None;
    let mut unreadable = Vec::new();
    each_record(primary, &days, &mut unreadable, |node, r| {
        let this = node == manifest.node && r.run == manifest.run;
        if this || r.sealed_ms > manifest.sealed_ms || r.sealed_ms < since_ms {
            return;
        }
        if ci.repository.is_some() && r.repository != ci.repository {
            return;
        }
        let same_branch = ci.branch.is_some() && r.branch == ci.branch;
        let on_base = ci.base.is_some() && r.branch == ci.base;
        let mut failed_here = vec![false; t.failures.len()];
        for c in &r.cases {
            let Some(&i) = failing.get(&(c.class.clone(), c.name.clone())) else {
                continue;
            };
            let failed = c.status.is_failure();
            failed_here[i] |= failed;
            if c.status != Outcome::Skipped {
                let commit = r
                    .commit
                    .clone()
                    .unwrap_or_else(|| format!("run:{node}/{}", r.run));
                *per_commit.entry((i, commit.clone())).or_default() |=
                    outcome_bits(c.status, c.flaky);
                if same_branch {
                    history[i].push((r.sealed_ms, commit, failed));
                }
            }
        }
        if on_base && base.as_ref().is_none_or(|(ms, _, _)| r.sealed_ms > *ms) {
            base = Some((r.sealed_ms, r.key_prefix.clone(), failed_here));
        }
    })
    .await?;
    let mut flaky_commits = vec![0u64; t.failures.len()];
    for ((i, _), bits) in &per_commit {
        if bits & (PASS | FAIL) == PASS | FAIL || bits & RETRIED != 0 {
            flaky_commits[*i] += 1;
        }
    }
    let mut out = Stories::default();
    for (i, f) in t.failures.iter().enumerate() {
        let h = &mut history[i];
        h.sort_by_key(|(ms, _, _)| std::cmp::Reverse(*ms));
        let streak = h.iter().take_while(|(_, _, failed)| *failed).count();
        let (kind, commit, runs) = if flaky_commits[i] > 0 {
            (StoryKind::KnownFlaky, None, flaky_commits[i])
        } else if h.is_empty() {
            (StoryKind::FirstSeen, None, 0)
        } else if streak == 0 {
            (
                StoryKind::NewFailure,
                h.first().map(|(_, c, _)| c.clone()),
                0,
            )
        } else {
            let oldest = &h[streak - 1];
            (
                StoryKind::FailingSince,
                Some(oldest.1.clone()),
                streak as u64 + 1,
            )
        };
        out.tests.push(Story {
            class: f.class.clone(),
            name: f.name.clone(),
            kind,
            commit,
            runs,
        });
    }
    if let (Some(branch), Some((_, run, failed))) = (ci.base.clone(), base) {
        let mut diff = BaseDiff {
            branch,
            run,
            ..Default::default()
        };
        for (i, f) in t.failures.iter().enumerate() {
            let name = format!("{}::{}", f.class, f.name);
            if failed[i] {
                diff.already.push(name);
            } else {
                diff.new.push(name);
            }
        }
        out.base = Some(diff);
    }
    out.unreadable = unreadable.len() as u64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::RecordCase;

    fn record(run: &str, commit: &str, branch: &str, cases: &[(&str, Outcome, bool)]) -> RunRecord {
        let mut r = RunRecord {
            schema: RECORD_SCHEMA,
            run: run.into(),
            commit: Some(commit.into()),
            branch: Some(branch.into()),
            sealed_ms: 86_400_000 * 3,
            ..Default::default()
        };
        for (name, status, flaky) in cases {
            r.tests += 1;
            match status {
                Outcome::Passed => r.passed += 1,
                Outcome::Failed => r.failed += 1,
                Outcome::Error => r.errors += 1,
                Outcome::Skipped => r.skipped += 1,
            }
            r.cases.push(RecordCase {
                suite: "s".into(),
                class: "c".into(),
                name: name.to_string(),
                status: *status,
                duration_ms: 10,
                flaky: *flaky,
            });
        }
        r
    }

    #[test]
    fn broken_and_node_specific_tests_follow_their_stated_rules() {
        use Outcome::*;
        let mut agg = Aggregate::default();
        // `wobbly` fails 3 of 4 runs on node n1 and 1 of 10 on the others (75 % against
        // 10 %: node-specific); `steady` fails 1 of 4 everywhere (not); `dead` fails on every
        // execution of its last three commits after passing on the first (broken); `mostly`
        // fails on its last two commits only (not broken).
        for i in 0..4 {
            let mut r = record(
                &format!("n1-{i}"),
                &format!("c{i}"),
                "main",
                &[
                    ("wobbly", if i < 3 { Failed } else { Passed }, false),
                    ("steady", if i == 0 { Failed } else { Passed }, false),
                    ("dead", if i == 0 { Passed } else { Failed }, false),
                    ("mostly", if i < 2 { Passed } else { Failed }, false),
                ],
            );
            r.sealed_ms += i64::from(i) * 1000;
            agg.add("n1", r);
        }
        for i in 0..10 {
            let node = if i % 2 == 0 { "n2" } else { "n3" };
            agg.add(
                node,
                record(
                    &format!("{node}-{i}"),
                    &format!("c{}", i % 4),
                    "main",
                    &[
                        ("wobbly", if i == 0 { Failed } else { Passed }, false),
                        (
                            "steady",
                            if i == 1 || i == 4 { Failed } else { Passed },
                            false,
                        ),
                    ],
                ),
            );
        }
        let mut out = FleetResults::default();
        agg.finish(&mut out);
        let specific: Vec<(&str, &str)> = out
            .node_specific
            .iter()
            .map(|n| (n.name.as_str(), n.node.as_str()))
            .collect();
        assert_eq!(specific, [("wobbly", "n1")]);
        let n = &out.node_specific[0];
        assert_eq!(
            (n.runs, n.failed, n.other_runs, n.other_failed),
            (4, 3, 10, 1)
        );
        let broken: Vec<&str> = out.broken.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(broken, ["dead"]);
    }

    #[test]
    fn new_failures_fixed_and_flipping_tests_follow_their_stated_rules() {
        use Outcome::*;
        let mut agg = Aggregate::default();
        // On main, six commits, two runs each (the records arrive newest first, as a
        // listing may give them): `breaks` passes until the last commit, where it fails on
        // both runs (new failure); `heals` fails until the last commit and passes there
        // (fixed); `half` fails on one run of the last commit (neither: its state is mixed);
        // `flips` alternates run by run (flipping: 11 flips over 12 executions);
        // `retried` passes on a retry on the last commit after failing before (not fixed).
        for i in (0..12).rev() {
            let commit = i / 2;
            let last = commit == 5;
            let mut r = record(
                &format!("r{i:02}"),
                &format!("c{commit}"),
                "main",
                &[
                    ("breaks", if last { Failed } else { Passed }, false),
                    ("heals", if last { Passed } else { Failed }, false),
                    (
                        "half",
                        if last && i % 2 == 0 { Failed } else { Passed },
                        false,
                    ),
                    ("flips", if i % 2 == 0 { Failed } else { Passed }, false),
                    ("retried", if last { Passed } else { Failed }, last),
                ],
            );
            r.sealed_ms += i64::from(i) * 1000;
            agg.add("n1", r);
        }
        // Another branch where `breaks` only ever passed: nothing there.
        agg.add(
            "n2",
            record("o1", "x1", "other", &[("breaks", Passed, false)]),
        );
        agg.add(
            "n2",
            record("o2", "x2", "other", &[("breaks", Passed, false)]),
        );
        let mut out = FleetResults::default();
        agg.finish(&mut out);
        let names = |l: &[BranchChange]| -> Vec<(String, String, String, String)> {
            l.iter()
                .map(|c| {
                    (
                        c.name.clone(),
                        c.branch.clone(),
                        c.commit.clone(),
                        c.previous_commit.clone(),
                    )
                })
                .collect()
        };
        let s = |x: &str| x.to_string();
        assert_eq!(
            names(&out.new_failures),
            [(s("breaks"), s("main"), s("c5"), s("c4"))]
        );
        assert_eq!(
            names(&out.fixed),
            [(s("heals"), s("main"), s("c5"), s("c4"))]
        );
        let flipping: Vec<(&str, u64, u64)> = out
            .flipping
            .iter()
            .map(|f| (f.name.as_str(), f.executions, f.flips))
            .collect();
        // `half` flips twice in its last 20 (rate 2/11 < 0.2); `flips` 11 times.
        assert_eq!(flipping, [("flips", 12, 11)]);
    }

    #[test]
    fn rates_flaky_tests_and_outliers() {
        use Outcome::*;
        let mut agg = Aggregate::default();
        // Node a: three clean runs; node b: `t2` fails for commit 1 where a passed it;
        // node c fails `always` every time.
        for i in 0..3 {
            let commit = format!("c{i}");
            agg.add(
                "a",
                record(
                    &format!("a{i}"),
                    &commit,
                    "main",
                    &[("t1", Passed, false), ("t2", Passed, false)],
                ),
            );
            let t2 = if i == 1 { Failed } else { Passed };
            agg.add(
                "b",
                record(
                    &format!("b{i}"),
                    &commit,
                    "main",
                    &[("t1", Passed, false), ("t2", t2, false)],
                ),
            );
            agg.add(
                "c",
                record(
                    &format!("c{i}"),
                    &commit,
                    "dev",
                    &[("always", Failed, false), ("t3", Passed, i == 2)],
                ),
            );
        }
        agg.add("c", record("empty", "c9", "dev", &[]));
        let mut out = FleetResults::default();
        agg.finish(&mut out);
        assert_eq!(out.totals.runs, 9);
        assert_eq!(out.runs_without_tests, 1);
        assert_eq!(out.totals.success_rate, Some(5.0 / 9.0));
        let rate =
            |g: &[Group], n: &str| g.iter().find(|g| g.name == n).unwrap().rates.success_rate;
        assert_eq!(rate(&out.nodes, "a"), Some(1.0));
        assert_eq!(rate(&out.nodes, "b"), Some(2.0 / 3.0));
        assert_eq!(rate(&out.nodes, "c"), Some(0.0));
        assert_eq!(rate(&out.branches, "main"), Some(5.0 / 6.0));
        assert_eq!(out.days.len(), 1);
        assert_eq!(out.days[0].date, "1970-01-04");
        let flaky: Vec<&str> = out.flaky.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(flaky, ["t2", "t3"]);
        assert_eq!(out.flaky[0].commits, ["c1"]);
        assert_eq!(out.consistently_failing.len(), 1);
        assert_eq!(out.consistently_failing[0].name, "always");
        let outliers: Vec<&str> = out.outlier_nodes.iter().map(|o| o.node.as_str()).collect();
        assert_eq!(outliers, ["c"]);
    }

    #[test]
    fn hostile_records_cost_bounded_memory() {
        // A million empty cases: the first MAX_RECORD_CASES are kept, the rest skipped.
        let mut json = String::from(r#"{"schema":1,"tests":1,"passed":1,"cases":["#);
        json.push_str(&"{},".repeat(1_000_000));
        json.push_str(r#"{}],"labels":[]}"#);
        let r: RunRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(r.cases.len(), super::super::MAX_RECORD_CASES);
        // Names are cut before they are kept.
        let mut agg = Aggregate::default();
        let mut r = record("r", &"c".repeat(100_000), &"b".repeat(100_000), &[]);
        r.cases.push(RecordCase {
            class: "x".repeat(100_000),
            name: "y".repeat(100_000),
            ..Default::default()
        });
        r.tests = 1;
        agg.add("n", r);
        assert!(
            agg.name_bytes < 4 * super::super::MAX_NAME * 4,
            "{}",
            agg.name_bytes
        );
        assert!(
            agg.branches
                .keys()
                .all(|b| b.chars().count() <= super::super::MAX_NAME + 1)
        );
    }

    #[test]
    fn windows_and_partitions() {
        assert_eq!(
            dates(0, 86_400_000 * 2),
            ["1970-01-01", "1970-01-02", "1970-01-03"]
        );
        assert_eq!(
            node_of("base/_panoptic-sync/runs/date=x/node=n-1/r.json"),
            Some("n-1")
        );
        assert_eq!(
            node_of("_panoptic-sync/runs/date=x/node=n-1/r.json"),
            Some("n-1")
        );
        // Reproduced: a record planted deeper framed node-1 with another node's segment.
        for planted in [
            "_panoptic-sync/runs/date=x/node=node-1/x/node=evil/r.json",
            "_panoptic-sync/runs/date=x/node=/r.json",
            "_panoptic-sync/runs/node=evil/r.json",
            "elsewhere/date=x/node=evil/r.json",
            "_panoptic-sync/runs/date=x/node=n/r.txt",
        ] {
            assert_eq!(node_of(planted), None, "{planted}");
        }
        // Hostile counts saturate.
        let mut agg = Aggregate::default();
        let mut r = record("r", "c", "b", &[("t", Outcome::Passed, false)]);
        r.passed = u64::MAX;
        agg.add("n", r.clone());
        agg.add("n", r);
        assert_eq!(agg.totals.passed, u64::MAX);
    }
}
