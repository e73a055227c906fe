//! What the seal of a run changed in its tests' states, from the fleet's run records: a test
//! that became flaky, broken on its branch, or fixed there. `seal` announces each through the
//! `[[notify]]` entries that ask for the `test.*` events.
//!
//! The rules are those of `report --fleet` (docs/OPERATIONS.md), judged with and without the
//! sealed run over the records of the window (the run's own record is never counted twice):
//! - *flaky*: for one commit (a run without one is its own), the test failed and passed, or it
//!   passed on a retry. It *became* flaky when it is now flaky on the run's commit and was
//!   flaky on no commit before (in the run's repository).
//! - *broken*: on the run's branch, it failed on every execution of each of the last
//!   [`BROKEN_COMMITS`] commits; it became broken when that holds with the run and did not
//!   without it.
//! - *fixed*: on the run's branch, every execution of the run's commit passed on its first
//!   try, and every execution of the commit before failed; announced by the first run of the
//!   commit that passes (an earlier clean execution of the same commit announced it already).
//!
//! Memory is bounded: per test of the run, its newest [`BRANCH_COMMITS`] commits on the branch,
//! and outcome bits for at most [`MAX_PAIRS`] (commit, test) pairs; past that cap no test
//! is announced as flaky (logged).

use std::collections::HashMap;
use std::time::Duration;

use super::fleet::{BROKEN_COMMITS, FAIL, PASS, RETRIED, dates, each_record, outcome_bits as bits};
use crate::destination::Destination;
use crate::format::fleet::{ChangeKind, TestChange};
use crate::format::manifest::Manifest;
use crate::format::results::{Case, Outcome};

/// Commits remembered per test on the branch.
const BRANCH_COMMITS: usize = 2 * BROKEN_COMMITS;
/// (commit, test) pairs whose outcomes are kept for the flaky rule.
const MAX_PAIRS: usize = 2_000_000;

/// A commit of a test on the branch: newest seal, commit id, every execution failed, every
/// one passed on its first try.
type BranchCommit = (i64, u32, bool, bool);

/// The commit of a run: its commit, or the run itself.
fn revision(commit: Option<&str>, node: &str, run: &str) -> String {
    match commit.filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None => format!("run:{node}/{run}"),
    }
}

/// Merge an execution of commit `rev` into a test's newest commits (keeping
/// [`BRANCH_COMMITS`]).
fn remember(commits: &mut Vec<BranchCommit>, ms: i64, rev: u32, failed: bool, clean: bool) {
    if let Some(e) = commits.iter_mut().find(|e| e.1 == rev) {
        e.0 = e.0.max(ms);
        e.2 &= failed;
        e.3 &= clean;
        return;
    }
    commits.push((ms, rev, failed, clean));
    commits.sort_by_key(|e| std::cmp::Reverse(e.0));
    commits.truncate(BRANCH_COMMITS);
}

/// Whether the newest [`BROKEN_COMMITS`] of `commits` all failed on every execution.
fn broken(commits: &[BranchCommit]) -> bool {
    let mut sorted = commits.to_vec();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.0));
    sorted.len() >= BROKEN_COMMITS && sorted[..BROKEN_COMMITS].iter().all(|e| e.2)
}

/// Whether outcome bits make a commit flaky.
fn flaky(b: u8) -> bool {
    b & (PASS | FAIL) == PASS | FAIL || b & RETRIED != 0
}

/// The state changes the run of `manifest`, whose test cases are `cases`, brought, judged over
/// the primary's records of the last `since`.
pub(crate) async fn state_changes(
    primary: &Destination,
    manifest: &Manifest,
    cases: &[Case],
    since: Duration,
) -> anyhow::Result<Vec<TestChange>> {
    let ci = manifest.ci.clone().unwrap_or_default();
    let mut tests: HashMap<(&str, &str), usize> = HashMap::new();
    for c in cases.iter().filter(|c| c.outcome != Outcome::Skipped) {
        let next = tests.len();
        tests.entry((&*c.class, c.name.as_str())).or_insert(next);
    }
    if tests.is_empty() {
        return Ok(Vec::new());
    }
    let mut revisions: HashMap<String, u32> = HashMap::new();
    let mut names: Vec<String> = Vec::new();
    let mut intern = |r: String| -> u32 {
        if let Some(&i) = revisions.get(&r) {
            return i;
        }
        let i = names.len() as u32;
        names.push(r.clone());
        revisions.insert(r, i);
        i
    };
    let this_rev = intern(revision(
        ci.commit.as_deref(),
        &manifest.node,
        &manifest.run,
    ));
    let mut on_branch: Vec<Vec<BranchCommit>> = vec![Vec::new(); tests.len()];
    let mut pairs: HashMap<(u32, usize), u8> = HashMap::new();
    let mut overflow = false;
    let since_ms = manifest
        .sealed_ms
        .saturating_sub(since.as_millis().min(i64::MAX as u128) as i64);
    let days = dates(since_ms.max(0), manifest.sealed_ms);
    let mut unreadable = Vec::new();
    each_record(primary, &days, &mut unreadable, |node, r| {
        let this = node == manifest.node && r.run == manifest.run;
        if this || r.sealed_ms > manifest.sealed_ms || r.sealed_ms < since_ms {
            return;
        }
        if r.repository != ci.repository {
            return;
        }
        let same_branch = ci.branch.is_some() && r.branch == ci.branch;
        let rev = intern(revision(r.commit.as_deref(), node, &r.run));
        for c in &r.cases {
            let Some(&t) = tests.get(&(c.class.as_str(), c.name.as_str())) else {
                continue;
            };
            let b = bits(c.status, c.flaky);
            if b == 0 {
                continue;
            }
            if pairs.len() < MAX_PAIRS || pairs.contains_key(&(rev, t)) {
                *pairs.entry((rev, t)).or_default() |= b;
            } else {
                overflow = true;
            }
            if same_branch {
                let failed = c.status.is_failure();
                let clean = b == PASS;
                remember(&mut on_branch[t], r.sealed_ms, rev, failed, clean);
            }
        }
    })
    .await?;
    if overflow {
        tracing::warn!(run = %manifest.run, "too many (commit, test) pairs in the window: no test is announced as flaky by this seal");
    }
    // Which tests were flaky on some commit before this run.
    let mut was_flaky = vec![false; tests.len()];
    for (&(_, t), &b) in &pairs {
        was_flaky[t] |= flaky(b);
    }
    let mut out = Vec::new();
    let mut seen = vec![false; tests.len()];
    for c in cases.iter().filter(|c| c.outcome != Outcome::Skipped) {
        let Some(&t) = tests.get(&(&*c.class, c.name.as_str())) else {
            continue;
        };
        if std::mem::replace(&mut seen[t], true) {
            continue; // one test written twice in a run is judged once
        }
        let b = bits(c.outcome, c.flaky);
        let before = pairs.get(&(this_rev, t)).copied().unwrap_or(0);
        let change = |kind: ChangeKind, commits: Vec<String>| TestChange {
            kind,
            suite: c.suite.to_string(),
            class: c.class.to_string(),
            name: c.name.clone(),
            branch: ci.branch.clone(),
            commit: names[this_rev as usize].clone(),
            commits,
        };
        if !overflow && !was_flaky[t] && flaky(before | b) {
            out.push(change(
                ChangeKind::Flaky,
                vec![names[this_rev as usize].clone()],
            ));
        }
        if ci.branch.is_none() {
            continue;
        }
        let history = &on_branch[t];
        let failed = c.outcome.is_failure();
        let clean = b == PASS;
        let mut with = history.clone();
        remember(&mut with, manifest.sealed_ms, this_rev, failed, clean);
        if failed && broken(&with) && !broken(history) {
            let mut newest = with.clone();
            newest.sort_by_key(|e| std::cmp::Reverse(e.0));
            let commits = newest[..BROKEN_COMMITS]
                .iter()
                .map(|e| names[e.1 as usize].clone())
                .collect();
            out.push(change(ChangeKind::Broken, commits));
        }
        if clean {
            let already_clean = history.iter().any(|e| e.1 == this_rev && e.3);
            let this_clean = with.iter().any(|e| e.1 == this_rev && e.3);
            let previous = history
                .iter()
                .filter(|e| e.1 != this_rev)
                .max_by_key(|e| e.0);
            if let Some(prev) = previous
                && prev.2
                && this_clean
                && !already_clean
            {
                out.push(change(
                    ChangeKind::Fixed,
                    vec![names[prev.1 as usize].clone()],
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_needs_the_newest_three_commits_failed() {
        let mut c = Vec::new();
        remember(&mut c, 1, 1, true, false);
        remember(&mut c, 2, 2, true, false);
        assert!(!broken(&c));
        remember(&mut c, 3, 3, true, false);
        assert!(broken(&c));
        // A clean execution of the newest commit: not broken.
        remember(&mut c, 4, 3, false, true);
        assert!(!broken(&c));
        assert!(flaky(PASS | FAIL) && flaky(PASS | RETRIED) && !flaky(PASS) && !flaky(FAIL));
    }
}
