//! `report --test ID`: one test's history from the per-test records
//! (`_panoptic-sync/tests/date=D/node=N/<run>~<hash>.json`): its executions, rates, the commits
//! it flaked on, its nodes, its first and last failure in the window.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;

use super::fleet::{READERS, dates, list_partitions, node_in, parse_lines, read_capped};
use crate::destination::{self, Destination};
use crate::format::fleet::{BadRecord, Execution, NodeCount, TestHistory};
use crate::format::layout::TESTS_PREFIX;
use crate::format::record::{TEST_RECORD_SCHEMA, TestRecord};
use crate::format::results::Outcome;

/// Executions listed.
const LISTED: usize = 100;

/// The history of test `test` (`class::name`) over the `since` before `now_ms`.
pub(crate) async fn read(
    primary: &Destination,
    test: &str,
    since: Duration,
    now_ms: i64,
) -> anyhow::Result<TestHistory> {
    let since_ms = now_ms.saturating_sub(since.as_millis().min(i64::MAX as u128) as i64);
    let days = dates(since_ms.max(0), now_ms);
    let mut out = TestHistory {
        test: test.to_string(),
        from: days.first().cloned().unwrap_or_default(),
        to: days.last().cloned().unwrap_or_default(),
        ..Default::default()
    };
    let objects = list_partitions(primary, TESTS_PREFIX, &days, &mut out.unreadable).await?;
    let mut reads = futures::stream::iter(objects)
        .map(|meta| async move {
            let res = read_capped(primary, &meta).await.and_then(|buf| {
                parse_lines(
                    &buf,
                    "per-test record",
                    TEST_RECORD_SCHEMA,
                    |r: &TestRecord| r.schema,
                )
            });
            (meta, res)
        })
        .buffer_unordered(READERS);
    let mut all: Vec<Execution> = Vec::new();
    // Per commit: failed, passed.
    let mut commits: BTreeMap<String, (bool, bool, i64)> = BTreeMap::new();
    let mut nodes: BTreeMap<String, NodeCount> = BTreeMap::new();
    while let Some((meta, res)) = reads.next().await {
        let key = primary.relative(meta.location.as_ref()).to_string();
        let Some(node) = node_in(&key, TESTS_PREFIX).map(str::to_string) else {
            out.unreadable.push(BadRecord {
                key: destination::printable(&key),
                error: "not under a node= partition".into(),
            });
            continue;
        };
        let rows = match res {
            Ok(rows) => rows,
            Err(e) => {
                out.unreadable.push(BadRecord {
                    key: destination::printable(&key),
                    error: destination::printable(&format!("{e:#}")),
                });
                continue;
            }
        };
        for r in rows {
            if r.test != test || r.sealed_at < since_ms {
                continue;
            }
            let failed = r.outcome.is_failure();
            let retried = r.outcome == Outcome::Passed && r.attempts.len() > 1;
            out.runs += 1;
            match r.outcome {
                Outcome::Passed => out.passed += 1,
                Outcome::Skipped => out.skipped += 1,
                Outcome::Failed | Outcome::Error => out.failed += 1,
            }
            out.passed_on_retry += u64::from(retried);
            let n = nodes.entry(node.clone()).or_default();
            n.node.clone_from(&node);
            n.runs += 1;
            n.failed += u64::from(failed);
            if r.outcome != Outcome::Skipped {
                let rev = r
                    .commit
                    .clone()
                    .unwrap_or_else(|| format!("run:{node}/{}", r.run));
                let c = commits.entry(rev).or_insert((false, false, r.sealed_at));
                c.0 |= failed || retried;
                c.1 |= !failed;
                c.2 = c.2.max(r.sealed_at);
            }
            all.push(Execution {
                node: node.clone(),
                run: r.run,
                key_prefix: r.key_prefix,
                sealed_at: r.sealed_at,
                branch: r.branch,
                commit: r.commit,
                outcome: r.outcome,
                attempts: r.attempts,
                duration_ms: r.duration_ms,
                message: r.message,
                evidence: r.evidence,
            });
        }
    }
    let ran = out.runs - out.skipped;
    out.failure_rate = (ran > 0).then(|| out.failed as f64 / ran as f64);
    let mut flaky: Vec<(i64, String)> = commits
        .into_iter()
        .filter(|(_, (f, p, _))| *f && *p)
        .map(|(c, (_, _, ms))| (ms, c))
        .collect();
    flaky.sort_by(|a, b| b.cmp(a));
    out.flaky_commits = flaky.into_iter().map(|(_, c)| c).collect();
    out.nodes = nodes.into_values().collect();
    all.sort_by(|a, b| b.sealed_at.cmp(&a.sealed_at).then(a.node.cmp(&b.node)));
    out.last_failure = all.iter().find(|e| e.outcome.is_failure()).cloned();
    out.first_failure = all.iter().rev().find(|e| e.outcome.is_failure()).cloned();
    all.truncate(LISTED);
    out.executions = all;
    out.unreadable.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}
