//! Remote retention (`prune`): delete this node's objects older than `remote_max_age` (or a
//! watch's own override), under its own watch prefixes only. A prefix must contain the node id
//! as a whole segment (`{node}`), otherwise this node's objects cannot be told from another
//! node's and that tree is skipped with a warning. Status objects (`_panoptic-sync/`) are never
//! touched. Pruned objects are forgotten by the index (never used as a copy source), while
//! the uploads stay recorded as done, so an unchanged local file is not uploaded again.
//!
//! On a `runs = "dir"` watch retention works by whole runs, never object by object, and never
//! on an unsealed run: `[retention.runs]` rules (see [`crate::config::RunRetention`]) pick the
//! sealed runs of this node to delete, from the manifests kept in the index, and each is
//! deleted entirely (its objects, manifest and page) from every destination, then forgotten.
//!
//! With `keep_failures = N`, a run that holds one of the newest N failures of some test (on
//! this node, by seal time, from the failures its manifest lists) is thinned instead: its
//! manifest and the evidence of those failures (their JUnit files and the files listed as
//! their `evidence`) stay, byte for byte, and everything else of the run goes. The run stays
//! in the index as sealed, so the next `prune` looks at it again and deletes the rest once its
//! failures are no longer among the newest N.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStoreExt;

use crate::config::{Config, RunRetention};
use crate::destination::{self, Destination};
use crate::format::results::Failure;
use crate::format::units::now_ms;
use crate::index::{Index, SealedRun};

/// How often the daemon applies retention.
pub(crate) const INTERVAL: Duration = Duration::from_secs(3600);

/// What `prune` did (or would do).
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct PruneReport {
    /// Every sealed run deleted, or that would be with `--dry-run`.
    pub runs: Vec<PrunedRun>,
    /// Every object deleted, or that would be with `--dry-run`.
    pub expired: Vec<Expired>,
    /// Watch prefixes skipped because they do not contain the node id.
    pub skipped_prefixes: Vec<String>,
    /// Objects that could not be deleted, with the reason.
    pub failed: Vec<PruneFailure>,
    /// The blob sweep of each content destination (`layout = "content"`).
    pub blobs: Vec<crate::collect::SweepReport>,
}

/// A sealed run retention deleted (or would delete), and the rule that decided.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct PrunedRun {
    /// The run's key prefix (`<watch prefix>/<run>`).
    pub key_prefix: String,
    /// Run name.
    pub run: String,
    /// When it was sealed (ms since the epoch).
    pub sealed_ms: i64,
    /// Why: the rule that let it go.
    pub rule: String,
    /// With `keep_failures`: the files of the run kept as evidence of its failures (relative
    /// to the run; its manifest is kept with them). Empty when the whole run went.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<String>,
}

/// An object retention deleted (or would delete).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Expired {
    /// Destination name.
    pub dest: String,
    /// The object's full key.
    pub key: String,
}

/// An object retention could not delete.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct PruneFailure {
    /// Destination name.
    pub dest: String,
    /// The object's key.
    pub key: String,
    /// Why.
    pub error: String,
}

/// Whether any remote retention is configured.
pub(crate) fn enabled(config: &Config) -> bool {
    config.retention.remote_max_age.is_some()
        || config.retention.runs.is_some()
        || config.watch.iter().any(|w| w.remote_max_age.is_some())
        || config
            .destinations()
            .any(|d| d.layout == crate::config::Layout::Content)
}

/// Apply retention now (or only list with `dry_run`) in `dests`, the configuration's stores
/// as the caller opened them.
pub(crate) async fn prune(
    config: &Config,
    dests: &[Destination],
    dry_run: bool,
) -> anyhow::Result<PruneReport> {
    let index = Arc::new(Index::open(&config.state_dir)?);
    let mut report = PruneReport::default();
    let now = now_ms() as f64 / 1000.0;
    for watch in &config.watch {
        let age = watch.remote_max_age.or(config.retention.remote_max_age);
        let by_run = watch.runs == crate::config::Runs::Dir;
        if age.is_none() && !(by_run && config.retention.runs.is_some()) {
            continue;
        }
        let prefix = watch.prefix.replace("{node}", &config.node_id);
        if !prefix.split('/').any(|seg| seg == config.node_id) {
            tracing::warn!(prefix = %prefix, node = %config.node_id, "not pruning: the watch prefix does not contain the node id, so this node's objects cannot be told from others'");
            report.skipped_prefixes.push(prefix);
            continue;
        }
        if by_run {
            let rules = config.retention.runs.clone().unwrap_or(RunRetention {
                keep_tags: true,
                keep_latest_per_branch: None,
                pull_requests: None,
                max_age: None,
                keep_failures: None,
            });
            let max_age = rules.max_age.or(age);
            let (i, w) = (index.clone(), watch.path.clone());
            let sealed = tokio::task::spawn_blocking(move || i.sealed_runs(&w)).await??;
            let keep = rules
                .keep_failures
                .map(|n| kept_failures(&sealed, n))
                .unwrap_or_default();
            for (run, rule) in expired_runs(&sealed, &rules, max_age, now_ms()) {
                let kept = keep.get(run.name.as_str());
                prune_run(
                    &index,
                    dests,
                    watch,
                    &prefix,
                    (run, rule, kept),
                    dry_run,
                    &mut report,
                )
                .await?;
            }
            continue;
        }
        let Some(age) = age else { continue };
        let cutoff = now - age.as_secs_f64();
        for dest in dests {
            prune_prefix(&index, dest, &prefix, cutoff, dry_run, &mut report).await?;
        }
    }
    sweep_blobs(config, &index, dests, dry_run, &mut report).await?;
    Ok(report)
}

/// Collect the unreferenced blobs of every content destination (after the pointers that
/// referenced them were pruned above); the blobs deleted leave the index too.
async fn sweep_blobs(
    config: &Config,
    index: &Arc<Index>,
    dests: &[Destination],
    dry_run: bool,
    report: &mut PruneReport,
) -> anyhow::Result<()> {
    let content: Vec<&Destination> = dests
        .iter()
        .filter(|d| d.layout == crate::config::Layout::Content)
        .collect();
    if content.is_empty() {
        return Ok(());
    }
    let keys = crate::pipeline::Pipeline::from_config(config)?.keys;
    for dest in content {
        let swept = crate::collect::sweep(dest, &keys, dest.blob_grace, now_ms(), dry_run).await?;
        if !dry_run {
            let gone: Vec<String> = swept.set_aside.clone();
            let (i, name) = (index.clone(), dest.name.clone());
            tokio::task::spawn_blocking(move || {
                gone.iter().try_for_each(|b| i.forget_blob(&name, b))
            })
            .await??;
        }
        report.blobs.push(swept);
    }
    Ok(())
}

/// The sealed runs `rules` let go at `now`, each with the rule that decided. For each run the
/// first rule that applies decides: tag, pull request, branch, age.
fn expired_runs<'a>(
    sealed: &'a [SealedRun],
    rules: &RunRetention,
    max_age: Option<Duration>,
    now: i64,
) -> Vec<(&'a SealedRun, String)> {
    let ci = |r: &SealedRun| -> Option<crate::format::ci::Ci> { r.ci.clone() };
    let older = |r: &SealedRun, d: Duration| now.saturating_sub(r.sealed_ms) > d.as_millis() as i64;
    // The newest runs of each branch of each repository, for the branch rule: a job of
    // another repository naming the same branch does not push these out.
    let branch_of = |c: &crate::format::ci::Ci, b: &str| -> (String, String) {
        (c.repository.clone().unwrap_or_default(), b.to_string())
    };
    let mut by_branch: std::collections::HashMap<(String, String), Vec<(i64, &str)>> =
        Default::default();
    let contexts: Vec<Option<crate::format::ci::Ci>> = sealed.iter().map(ci).collect();
    for (r, c) in sealed.iter().zip(&contexts) {
        if let Some(c) = c
            && c.tag.is_none()
            && c.pull_request.is_none()
            && let Some(b) = &c.branch
        {
            by_branch
                .entry(branch_of(c, b))
                .or_default()
                .push((r.sealed_ms, &r.name));
        }
    }
    for runs in by_branch.values_mut() {
        runs.sort_by(|a, b| b.cmp(a));
    }
    let mut out = Vec::new();
    for (r, c) in sealed.iter().zip(&contexts) {
        let c = c.as_ref();
        let verdict: Option<String> = if c.is_some_and(|c| c.tag.is_some()) && rules.keep_tags {
            None
        } else if let (Some(_), Some(d)) =
            (c.and_then(|c| c.pull_request.as_ref()), rules.pull_requests)
        {
            older(r, d)
                .then(|| format!("pull request older than {}", humantime::format_duration(d)))
        } else if let (Some(b), Some(n)) = (
            c.and_then(|c| c.branch.as_ref())
                .filter(|_| c.is_some_and(|c| c.tag.is_none() && c.pull_request.is_none())),
            rules.keep_latest_per_branch,
        ) {
            let rank = c
                .and_then(|c| by_branch.get(&branch_of(c, b)))
                .and_then(|v| v.iter().position(|(_, name)| *name == r.name))
                .unwrap_or(0);
            (rank >= n).then(|| format!("not among the {n} newest runs of branch {b}"))
        } else if let Some(d) = max_age {
            older(r, d).then(|| format!("older than {}", humantime::format_duration(d)))
        } else {
            None
        };
        if let Some(rule) = verdict {
            out.push((r, rule));
        }
    }
    out
}

/// Per run (by name): the files kept as evidence of the newest `n` failures of each test
/// among `sealed` (each failure's JUnit file and evidence, relative to the run).
fn kept_failures(sealed: &[SealedRun], n: usize) -> HashMap<&str, BTreeSet<&str>> {
    /// A failure of a test: when its run was sealed, the run, the failure.
    type Seen<'a> = (i64, &'a str, &'a Failure);
    let mut by_test: HashMap<(&str, &str), Vec<Seen<'_>>> = HashMap::new();
    for r in sealed {
        for f in r.tests.iter().flat_map(|t| &t.failures) {
            by_test
                .entry((f.class.as_str(), f.name.as_str()))
                .or_default()
                .push((r.sealed_ms, r.name.as_str(), f));
        }
    }
    let mut out: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for mut failures in by_test.into_values() {
        failures.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
        for (_, run, f) in failures.into_iter().take(n) {
            let files = out.entry(run).or_default();
            files.insert(f.file.as_str());
            files.extend(f.evidence.iter().map(String::as_str));
        }
    }
    out
}

/// Whether the object at `rel` (relative to the run's prefix, as stored) is the run's
/// manifest or one of the files `kept`.
fn is_kept(rel: &str, kept: &BTreeSet<&str>) -> bool {
    let parsed = crate::format::layout::parse(rel);
    let manifest = format!(
        "{}/{}",
        crate::format::manifest::RUN_DIR,
        crate::format::manifest::MANIFEST_NAME
    );
    // In a content destination a file's key holds its pointer (`<key>.ptr`): kept with the
    // file (its blob is kept by the sweep while the pointer names it).
    let file = parsed
        .logical
        .strip_suffix(".ptr")
        .unwrap_or(parsed.logical);
    if parsed.logical == manifest || kept.contains(parsed.logical) || kept.contains(file) {
        return true;
    }
    // A long name is stored shortened: it is kept when it stands for a kept file's name.
    parsed.long
        && kept.iter().any(|k| {
            let (dir, name) = k.rsplit_once('/').unwrap_or(("", k));
            let (short_dir, _) = parsed.logical.rsplit_once('/').unwrap_or(("", ""));
            dir == short_dir && crate::format::layout::long_name_matches(parsed.logical, name)
        })
}

/// Delete one sealed run entirely from every destination (or only list it), then forget it;
/// or, with files `kept` as evidence, delete everything of it but those and its manifest.
async fn prune_run(
    index: &Arc<Index>,
    dests: &[Destination],
    watch: &crate::config::Watch,
    prefix: &str,
    (run, rule, kept): (&SealedRun, String, Option<&BTreeSet<&str>>),
    dry_run: bool,
    report: &mut PruneReport,
) -> anyhow::Result<()> {
    let key_prefix = if prefix.is_empty() {
        run.name.clone()
    } else {
        format!("{prefix}/{}", run.name)
    };
    let failed_before = report.failed.len();
    if let Some(kept) = kept {
        for dest in dests {
            thin_run(index, dest, &key_prefix, kept, dry_run, report).await?;
        }
        if report.failed.len() == failed_before && !dry_run {
            tracing::info!(run = %run.name, prefix = %key_prefix, rule = %rule, kept = kept.len(), "pruned run, keeping the evidence of its failures");
        }
        report.runs.push(PrunedRun {
            key_prefix,
            run: run.name.clone(),
            sealed_ms: run.sealed_ms,
            rule,
            kept: kept.iter().map(|k| k.to_string()).collect(),
        });
        return Ok(());
    }
    for dest in dests {
        // A cutoff in the future: everything under the run's prefix goes.
        prune_prefix(index, dest, &key_prefix, f64::INFINITY, dry_run, report).await?;
    }
    if report.failed.len() == failed_before && !dry_run {
        // Forgotten only once every object is gone: a failed delete is retried next time.
        let (w, n, sealed_ms) = (watch.path.clone(), run.name.clone(), run.sealed_ms);
        let now = crate::format::units::now_ms();
        index
            .call(move |i| i.record_pruned(&w, &n, sealed_ms, now))
            .await?;
        tracing::info!(run = %run.name, prefix = %key_prefix, rule = %rule, "pruned run");
    }
    report.runs.push(PrunedRun {
        key_prefix,
        run: run.name.clone(),
        sealed_ms: run.sealed_ms,
        rule,
        kept: Vec::new(),
    });
    Ok(())
}

/// Delete every object under a run's `key_prefix` in `dest` but its manifest and the files
/// `kept` (or only list them with `dry_run`).
async fn thin_run(
    index: &Arc<Index>,
    dest: &Destination,
    key_prefix: &str,
    kept: &BTreeSet<&str>,
    dry_run: bool,
    report: &mut PruneReport,
) -> anyhow::Result<()> {
    let run_prefix = format!("{key_prefix}/");
    let keep = |_: &object_store::ObjectMeta, rel: &str| {
        is_kept(rel.strip_prefix(&run_prefix).unwrap_or(rel), kept)
    };
    delete_under(index, dest, key_prefix, keep, dry_run, report).await
}

/// Delete every object under `prefix` in `dest` last modified before `cutoff` (seconds since
/// the epoch), or only list them with `dry_run`.
async fn prune_prefix(
    index: &Arc<Index>,
    dest: &Destination,
    prefix: &str,
    cutoff: f64,
    dry_run: bool,
    report: &mut PruneReport,
) -> anyhow::Result<()> {
    let keep =
        |meta: &object_store::ObjectMeta, _: &str| meta.last_modified.timestamp() as f64 >= cutoff;
    delete_under(index, dest, prefix, keep, dry_run, report).await
}

/// Delete every object under `prefix` in `dest` that `keep` (given the object and its key
/// relative to the destination) does not keep, and forget it in the index; or only list them
/// with `dry_run`. The agent's own objects (`_panoptic-sync/`) are never touched.
async fn delete_under(
    index: &Arc<Index>,
    dest: &Destination,
    prefix: &str,
    keep: impl Fn(&object_store::ObjectMeta, &str) -> bool,
    dry_run: bool,
    report: &mut PruneReport,
) -> anyhow::Result<()> {
    let listing = dest.list_under(prefix).await.map_err(anyhow::Error::from)?;
    // A key object_store cannot address cannot be deleted through it: it fails alone, named.
    for bad in listing.bad_keys {
        tracing::warn!(dest = %dest.name, key = %bad.key, reason = %bad.reason, "cannot prune");
        report.failed.push(PruneFailure {
            dest: dest.name.clone(),
            key: bad.key,
            error: format!("cannot delete: {}", bad.reason),
        });
    }
    for meta in listing.objects {
        let key = meta.location.to_string();
        let rel = dest.relative(&key).to_string();
        if rel.starts_with(crate::format::layout::INTERNAL_PREFIX) || keep(&meta, &rel) {
            continue;
        }
        if !dry_run {
            match dest.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    let (i, d, r) = (index.clone(), dest.name.clone(), rel.clone());
                    tokio::task::spawn_blocking(move || i.forget_stored(&d, &r)).await??;
                    tracing::info!(dest = %dest.name, key = %key, "pruned");
                }
                Err(e) => {
                    report.failed.push(PruneFailure {
                        dest: dest.name.clone(),
                        key: key.clone(),
                        error: destination::error_chain(&e),
                    });
                    continue;
                }
            }
        }
        report.expired.push(Expired {
            dest: dest.name.clone(),
            key,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn run(name: &str, age_days: i64, ci: serde_json::Value) -> SealedRun {
        SealedRun {
            watch: "/w".into(),
            name: name.into(),
            sealed_ms: 100 * DAY - age_days * DAY,
            manifest_sha256: vec![],
            files: 0,
            bytes: 0,
            ci: (!ci.is_null()).then(|| serde_json::from_value(ci).unwrap()),
            ..Default::default()
        }
    }

    fn ci(branch: Option<&str>, tag: Option<&str>, pr: Option<&str>) -> serde_json::Value {
        serde_json::json!({"provider": "github-actions", "branch": branch, "tag": tag,
            "pull_request": pr})
    }

    #[test]
    fn the_newest_runs_of_a_branch_are_counted_per_repository() {
        // Reproduced: an attacker's job sealed two runs as `attacker/fork` `main`, and the
        // branch rule pushed out another repository's runs of `main`.
        let repo = |r: &str| serde_json::json!({"provider": "github-actions", "branch": "main", "repository": r});
        let runs = vec![
            run("ours-1", 10, repo("acme/widgets")),
            run("evil-1", 2, repo("attacker/fork")),
            run("evil-2", 1, repo("attacker/fork")),
        ];
        let rules = RunRetention {
            keep_tags: true,
            keep_latest_per_branch: Some(1),
            pull_requests: None,
            max_age: None,
            keep_failures: None,
        };
        let gone: Vec<&str> = expired_runs(&runs, &rules, None, 100 * DAY)
            .into_iter()
            .map(|(r, _)| r.name.as_str())
            .collect();
        assert_eq!(
            gone,
            ["evil-1"],
            "acme/widgets keeps its newest run of main"
        );
    }

    #[test]
    fn each_sealed_run_is_decided_by_the_first_rule_that_applies() {
        let runs = vec![
            run("main-1", 40, ci(Some("main"), None, None)),
            run("main-2", 30, ci(Some("main"), None, None)),
            run("main-3", 20, ci(Some("main"), None, None)),
            run("dev-1", 50, ci(Some("dev"), None, None)),
            run("tag-old", 400, ci(Some("main"), Some("v1.0"), None)),
            run("pr-old", 15, ci(Some("feature"), None, Some("42"))),
            run("pr-new", 5, ci(Some("feature"), None, Some("43"))),
            run("local-old", 31, serde_json::Value::Null),
            run("local-new", 29, serde_json::Value::Null),
        ];
        let rules = RunRetention {
            keep_tags: true,
            keep_latest_per_branch: Some(2),
            pull_requests: Some(Duration::from_secs(7 * 86_400)),
            max_age: Some(Duration::from_secs(30 * 86_400)),
            keep_failures: None,
        };
        let gone: Vec<(&str, String)> = expired_runs(&runs, &rules, rules.max_age, 100 * DAY)
            .into_iter()
            .map(|(r, rule)| (r.name.as_str(), rule))
            .collect();
        let names: Vec<&str> = gone.iter().map(|g| g.0).collect();
        // main keeps its 2 newest (however old), dev its only one; the tag stays forever; the
        // old pull request goes; runs without CI context go after max_age.
        assert_eq!(names, ["main-1", "pr-old", "local-old"], "{gone:?}");
        assert!(
            gone[0].1.contains("2 newest runs of branch main"),
            "{gone:?}"
        );
        assert!(gone[1].1.contains("pull request"), "{gone:?}");

        // Without keep_tags the tag falls through to the age rule.
        let rules = RunRetention {
            keep_tags: false,
            ..rules
        };
        let names: Vec<&str> = expired_runs(&runs, &rules, rules.max_age, 100 * DAY)
            .into_iter()
            .map(|(r, _)| r.name.as_str())
            .collect();
        assert!(names.contains(&"tag-old"), "{names:?}");
    }
}
