//! Runs: with `runs = "dir"` on a watch, each top-level directory under its root is one run.
//!
//! `seal DIR` waits (with `flush`'s machinery) until every file now under the run is in every
//! destination, then writes the run's manifest, `<prefix>/<run>/_run/manifest.json`, to every
//! destination through the pipeline like any object (compressed and encrypted as configured;
//! the stored key follows [`crate::format::layout`]) and records the seal in the index. The manifest
//! (schema in docs/FORMAT.md) lists every file with size, SHA-256, mtime, mode, content type
//! and stored key, plus the CI context read from the job's environment and the labels.
//! `restore --run` restores exactly the manifest's files and checks each against it; `runs`
//! compares the index with the manifest kept in the index to show runs changed after a seal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Config, Runs};
use crate::destination::{self, Destination};
use crate::error::UsageError;
use crate::format::layout;
use crate::format::manifest::{MANIFEST_NAME, Manifest, ManifestFile, RUN_DIR, RunSummary};
use crate::index::Index;
use crate::pipeline::Pipeline;
use crate::scan::Root;

/// Files restored at once: at least this many, or the destination's `concurrency`.
const CONCURRENCY: usize = 8;

/// A run directory of a `runs = "dir"` watch.
#[derive(Debug, Clone)]
pub(crate) struct RunDir {
    /// Run name.
    pub name: String,
    /// The directory (under the watch root as configured).
    pub path: PathBuf,
    /// Index of the watch in the configuration.
    pub watch: usize,
}

pub(crate) fn run_watches(config: &Config) -> impl Iterator<Item = (usize, &crate::config::Watch)> {
    config
        .watch
        .iter()
        .enumerate()
        .filter(|(_, w)| w.runs == Runs::Dir)
}

/// Whether `name` can name a run (one path segment, UTF-8, not the agent's own).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name != crate::format::layout::INTERNAL_PREFIX
        // A run named like an option (`-h`, `--log=…`) would reach a notify command as one.
        && !name.starts_with('-')
}

/// The run `dir` is, or why it is none.
pub(crate) fn locate(config: &Config, dir: &Path) -> Result<RunDir, UsageError> {
    // A link to a run is not the run: a job could name another project's run through one.
    if dir
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        return Err(UsageError(format!(
            "{} is a symbolic link; name the run directory itself",
            dir.display()
        )));
    }
    let real = dir
        .canonicalize()
        .map_err(|e| UsageError(format!("{}: {e}", dir.display())))?;
    if !real.is_dir() {
        return Err(UsageError(format!("{} is not a directory", dir.display())));
    }
    let (parent, name) = match (real.parent(), real.file_name().and_then(|n| n.to_str())) {
        (Some(p), Some(n)) if valid_name(n) => (p, n),
        _ => {
            return Err(UsageError(format!(
                "{} cannot be a run (its name must be one UTF-8 path segment, not starting with \"-\")",
                dir.display()
            )));
        }
    };
    for (i, w) in run_watches(config) {
        // The root as resolved at load: a root replaced by a symlink since is no match.
        if w.path == parent {
            return Ok(RunDir {
                name: name.to_string(),
                path: w.path.join(name),
                watch: i,
            });
        }
    }
    Err(UsageError(format!(
        "{} is not a run directory: it must be a top-level directory under the root of a watch with runs = \"dir\"",
        dir.display()
    )))
}

/// Parse `K=V` (for `--label`).
pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("bad label {s:?}: want KEY=VALUE")),
    }
}

/// The run directories of watch `w` (names that can name a run), listed through the root's
/// own handle: a root replaced by a symlink lists nothing.
fn run_dirs(w: &crate::config::Watch) -> Vec<String> {
    match crate::tree::RootDir::open(&w.path, w.one_file_system).and_then(|d| d.subdirectories()) {
        Ok(names) => names
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .filter(|n| valid_name(n))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `path` relative to `dir` as text, comparing bytes (both absolute and normal, as walks
/// build them): [`Path::strip_prefix`] compares component by component, for every file.
pub(crate) fn relative_str<'a>(path: &'a Path, dir: &Path) -> Option<&'a str> {
    use std::os::unix::ffi::OsStrExt;
    let dir = dir.as_os_str().as_bytes();
    let rest = path.as_os_str().as_bytes().strip_prefix(dir)?;
    let rest = rest
        .strip_prefix(b"/")
        .or(dir.ends_with(b"/").then_some(rest))?;
    std::str::from_utf8(rest).ok().filter(|r| !r.is_empty())
}

/// What `restore --run` did.
#[derive(Debug, Default)]
pub(crate) struct RunRestore {
    /// The manifest's stored key.
    pub manifest_key: String,
    /// Files written and verified.
    pub restored: u64,
    /// Files that failed (path in the run, reason).
    pub failed: Vec<(String, String)>,
}

/// Restore exactly the files of run `name`'s manifest from `from` (default: the primary)
/// into `to`, each checked against the manifest's size and SHA-256.
pub(crate) async fn restore_run(
    config: &Config,
    name: &str,
    from: Option<&str>,
    to: &Path,
) -> anyhow::Result<RunRestore> {
    let (node, run) = match name.split_once('/') {
        Some((node, run)) => (Some(node), run),
        None => (None, name),
    };
    if !valid_name(run) || node.is_some_and(|n| !valid_name(n)) {
        return Err(UsageError(format!("{name:?} cannot name a run (RUN or NODE/RUN)")).into());
    }
    let dest = match from {
        Some(f) => crate::restore::find_destination(config, f)?,
        None => destination::open_primary(config)?,
    };
    let pipeline = Pipeline::from_config(config)?;
    let (manifest_key, manifest) = match node {
        // Any node's run, found by listing the destination (no watch of our own needed).
        Some(node) => crate::catalog::find(&dest, &pipeline, node, run).await?,
        None if run_watches(config).next().is_none() => {
            crate::catalog::find(&dest, &pipeline, &config.node_id, run).await?
        }
        None => own_manifest(config, &dest, &pipeline, run).await?,
    };
    restore_manifest(&dest, pipeline, manifest_key, manifest, to).await
}

/// This node's run `name`: its manifest where this node's run watches put it.
async fn own_manifest(
    config: &Config,
    dest: &Destination,
    pipeline: &Pipeline,
    name: &str,
) -> anyhow::Result<(String, Manifest)> {
    let roots = Root::from_config(config);
    // Every place the manifest may be (one per run watch). With a key configured only an
    // encrypted (authenticated) object is a candidate at all, and an encrypted one is always
    // preferred to a plain one, then the newest: a planted plain object can neither deny the
    // restore nor supersede the genuine manifest.
    let mut found = Vec::new();
    for (i, _) in run_watches(config) {
        let root = &roots[i];
        let logical = root
            .key_for(&root.path.join(name).join(RUN_DIR).join(MANIFEST_NAME))
            .map_err(anyhow::Error::msg)?;
        let dir = logical.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let listing = dest.list_under(dir).await?;
        for meta in listing.objects {
            let rel = dest.relative(meta.location.as_ref());
            let p = layout::parse(rel);
            if p.logical == logical && !p.long && (p.plan.encrypt || pipeline.key.is_none()) {
                found.push((p.plan.encrypt, meta.last_modified, rel.to_string()));
            }
        }
    }
    found.sort();
    let Some((_, _, manifest_key)) = found.pop() else {
        anyhow::bail!(
            "no manifest of run {name:?} in {}: is it sealed?",
            dest.name
        );
    };
    let manifest = crate::catalog::read_manifest(dest, pipeline, &manifest_key)
        .await
        .with_context(|| format!("manifest {manifest_key} in {}", dest.name))?;
    if manifest.run != name {
        anyhow::bail!(
            "manifest {manifest_key} in {} is for run {:?}, not {name:?}",
            dest.name,
            manifest.run
        );
    }
    Ok((manifest_key, manifest))
}

/// Restore exactly the files of `manifest` (stored at `manifest_key`) into `to`.
async fn restore_manifest(
    dest: &Destination,
    pipeline: Pipeline,
    manifest_key: String,
    manifest: Manifest,
    to: &Path,
) -> anyhow::Result<RunRestore> {
    let root = crate::restore::open_target(to)?;
    let keys = Arc::new(pipeline.keys);
    let mut out = RunRestore {
        manifest_key,
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    let mut todo = Vec::new();
    for f in manifest.files {
        if let Err(e) = crate::restore::safe_target(to, &f.path) {
            out.failed.push((f.path, e));
        } else if !seen.insert(f.path.clone()) {
            out.failed
                .push((f.path, "listed twice in the manifest".into()));
        } else {
            todo.push(f);
        }
    }
    let results: Vec<(String, anyhow::Result<()>)> = futures::stream::iter(todo)
        .map(|f| {
            let (dest, keys, root) = (&dest, keys.clone(), root.clone());
            async move {
                let want = crate::restore::Pinned {
                    size: f.size,
                    sha256: f.sha256.clone(),
                    mode: f.mode,
                    mtime_ns: f.mtime_ns,
                };
                let res = crate::restore::restore_pinned(
                    dest,
                    &keys,
                    root,
                    &f.path,
                    &f.stored_key,
                    &want,
                )
                .await;
                (f.path, res)
            }
        })
        .buffer_unordered(CONCURRENCY.max(dest.concurrency))
        .collect()
        .await;
    for (path, res) in results {
        match res {
            Ok(()) => out.restored += 1,
            Err(e) => out.failed.push((path, format!("{e:#}"))),
        }
    }
    out.failed.sort();
    Ok(out)
}

/// A run's state in `runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    /// Not sealed yet.
    Open,
    /// A `seal` of it is running now (it holds the run's sealing lock).
    Sealing,
    /// Sealed, and its files are as the manifest says.
    Sealed,
    /// Sealed, but a file was added or changed since.
    ChangedAfterSeal,
    /// Sealed once, then deleted from the destinations by retention (`prune`); the directory
    /// is still on disk. Never open, never sealed again under this name.
    Pruned,
}

/// One destination's view of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunDest {
    /// Destination name.
    pub name: String,
    /// Files of the run (as indexed now) whose current content it does not hold yet.
    pub missing: u64,
}

/// One run in `runs`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunInfo {
    /// Run name.
    pub name: String,
    /// The watch root it is under.
    pub watch: PathBuf,
    /// Open, sealed or changed after seal.
    pub state: State,
    /// Files indexed under the run now.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Whether every destination holds every indexed file of the run.
    pub complete: bool,
    /// Per destination.
    pub destinations: Vec<RunDest>,
    /// When it was sealed (milliseconds since the epoch).
    pub sealed_ms: Option<i64>,
    /// Files and bytes in the manifest.
    pub sealed_files: Option<u64>,
    /// Bytes in the manifest.
    pub sealed_bytes: Option<u64>,
    /// Paths (relative to the run) added or changed after the seal.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// The notifications of the latest seal.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<crate::index::RunNotification>,
    /// Newest modification time of an indexed file of the run (ms since the epoch).
    pub last_file_ms: Option<i64>,
    /// When the agent last saw a file of the run change (ms since the epoch): what
    /// `seal_after` judges quietness by (mtimes can be old: `cp -p`, `tar x`, `rsync -a`).
    pub last_change_ms: Option<i64>,
    /// When retention pruned it (ms since the epoch), for a pruned run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned_ms: Option<i64>,
    /// The test results of the latest seal (absent: not sealed, or no JUnit XML).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<crate::format::results::TestSummary>,
}

/// The manifest of run `name` as sealed by this node (kept in the index), newest first if
/// more than one watch has a run of that name. Blocking.
pub(crate) fn sealed_manifest(
    config: &Config,
    index: &Index,
    name: &str,
) -> anyhow::Result<Manifest> {
    if !valid_name(name) {
        return Err(UsageError(format!("{name:?} cannot name a run")).into());
    }
    let mut found: Option<(i64, &Path)> = None;
    for (_, w) in run_watches(config) {
        if let Some(ms) = index.sealed_ms(&w.path, name)?
            && found.is_none_or(|(newest, _)| ms > newest)
        {
            found = Some((ms, &w.path));
        }
    }
    let text = found
        .map(|(_, watch)| index.run_manifest(watch, name))
        .transpose()?
        .flatten()
        .ok_or_else(|| not_sealed(config, index, name))?;
    serde_json::from_str(&text)
        .with_context(|| format!("the manifest of run {name:?} in the index"))
}

/// Why run `name` has no manifest here: pruned by retention (and when), or never sealed.
fn not_sealed(config: &Config, index: &Index, name: &str) -> anyhow::Error {
    for (_, w) in run_watches(config) {
        if let Ok(pruned) = index.pruned_runs(&w.path)
            && let Some((_, ms)) = pruned.iter().find(|(n, _)| n == name)
        {
            return UsageError(pruned_message(name, *ms)).into();
        }
    }
    UsageError(format!("run {name:?} has not been sealed on this node")).into()
}

/// What a pruned run's refusal says.
pub(crate) fn pruned_message(name: &str, pruned_ms: i64) -> String {
    format!(
        "run {name:?} was pruned by retention on {} (its objects are deleted from every \
         destination); it cannot be sealed or linked again: write new output to a new run \
         directory",
        crate::format::record::date_of(pruned_ms)
    )
}

/// When retention pruned the run `run`, if it did.
pub(crate) fn pruned_ms(
    config: &Config,
    index: &Index,
    run: &RunDir,
) -> anyhow::Result<Option<i64>> {
    let watch = &config.watch[run.watch].path;
    Ok(index
        .pruned_runs(watch)?
        .into_iter()
        .find(|(n, _)| *n == run.name)
        .map(|(_, ms)| ms))
}

/// The run directory `dir`, if it is one (for `url`, which also takes files).
pub(crate) fn run_at(config: &Config, dir: &Path) -> Option<RunDir> {
    locate(config, dir).ok()
}

/// A run's sealing lock: a file in the state directory, `flock`ed by the `seal` holding it
/// (released by the kernel when that process ends, however it ends).
pub(crate) struct SealingLock(#[allow(dead_code)] std::fs::File);

impl SealingLock {
    fn path(config: &Config, watch: &Path, run: &str) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let mut h = Sha256::new();
        h.update(watch.as_os_str().as_bytes());
        h.update([0]);
        h.update(run.as_bytes());
        config
            .state_dir
            .join("sealing")
            .join(hex::encode(&h.finalize()[..16]))
    }

    pub(crate) fn take(config: &Config, run: &RunDir) -> anyhow::Result<SealingLock> {
        let watch = &config.watch[run.watch].path;
        let path = Self::path(config, watch, &run.name);
        crate::index::create_state_dir(path.parent().unwrap_or(&config.state_dir))?;
        let file = crate::index::open_private(&path)
            .with_context(|| format!("opening the sealing lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(SealingLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(UsageError(format!(
                "run {} is being sealed by another process",
                run.name
            ))
            .into()),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(anyhow::anyhow!("locking {}: {e}", path.display()))
            }
        }
    }

    /// Whether some process is sealing `run` of `watch` now.
    fn held(config: &Config, watch: &Path, run: &str) -> bool {
        let path = Self::path(config, watch, run);
        let Ok(file) = std::fs::File::open(&path) else {
            return false;
        };
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    }
}

/// Every run of every `runs = "dir"` watch: directories under the roots and sealed runs in
/// the index. Blocking.
pub(crate) fn list(config: &Config, index: &Index) -> anyhow::Result<Vec<RunInfo>> {
    let dests: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    let mut out = Vec::new();
    for (_, w) in run_watches(config) {
        let mut names = run_dirs(w);
        let sealed: HashMap<String, (i64, u64, u64)> = index
            .sealed_runs(&w.path)?
            .into_iter()
            .map(|r| (r.name, (r.sealed_ms, r.files, r.bytes)))
            .collect();
        let pruned: HashMap<String, i64> = index.pruned_runs(&w.path)?.into_iter().collect();
        names.extend(sealed.keys().cloned());
        names.sort();
        names.dedup();
        for name in names {
            let dir = w.path.join(&name);
            let files = indexed_under(index, &dir)?;
            let mut info = RunInfo {
                name: name.clone(),
                watch: w.path.clone(),
                state: State::Open,
                files: files.len() as u64,
                bytes: files.iter().map(|f| f.size).sum(),
                complete: true,
                destinations: dests
                    .iter()
                    .map(|d| RunDest {
                        name: d.clone(),
                        missing: files.iter().filter(|f| !f.held_by.contains(d)).count() as u64,
                    })
                    .collect(),
                sealed_ms: None,
                sealed_files: None,
                sealed_bytes: None,
                changed: Vec::new(),
                last_file_ms: files.iter().map(|f| f.mtime_ns.div_euclid(1_000_000)).max(),
                last_change_ms: files.iter().map(|f| f.indexed_ms).max(),
                notifications: Vec::new(),
                tests: None,
                pruned_ms: None,
            };
            info.complete = info.destinations.iter().all(|d| d.missing == 0);
            if let Some((ms, n, bytes)) = sealed.get(&name) {
                let text = index
                    .run_manifest(&w.path, &name)?
                    .with_context(|| format!("the recorded manifest of run {name:?} is missing"))?;
                let manifest: Manifest = serde_json::from_str(&text)
                    .with_context(|| format!("the recorded manifest of run {name:?}"))?;
                let by_path: HashMap<&str, &ManifestFile> = manifest
                    .files
                    .iter()
                    .map(|f| (f.path.as_str(), f))
                    .collect();
                for f in &files {
                    let rel = relative_str(&f.path, &dir);
                    let same = rel.and_then(|r| by_path.get(r)).is_some_and(|m| {
                        m.sha256 == f.sha256 && m.mtime_ns == f.mtime_ns && m.size == f.size
                    });
                    if !same || f.mtime_ns.div_euclid(1_000_000) > *ms {
                        info.changed.push(
                            rel.map(str::to_string)
                                .unwrap_or_else(|| f.path.display().to_string()),
                        );
                    }
                }
                info.changed.sort();
                info.tests = manifest.tests;
                info.state = if info.changed.is_empty() {
                    State::Sealed
                } else {
                    State::ChangedAfterSeal
                };
                info.notifications = index.run_notifications(&w.path, &name, *ms)?;
                info.sealed_ms = Some(*ms);
                info.sealed_files = Some(*n);
                info.sealed_bytes = Some(*bytes);
            }
            if let Some(ms) = pruned.get(&name)
                && !sealed.contains_key(&name)
            {
                // Its objects are gone: whatever the index says of its files' uploads.
                info.state = State::Pruned;
                info.pruned_ms = Some(*ms);
                info.complete = false;
            }
            if info.state != State::Sealed && SealingLock::held(config, &w.path, &name) {
                info.state = State::Sealing;
            }
            out.push(info);
        }
    }
    Ok(out)
}

/// An indexed file under a run directory.
struct Indexed {
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
    sha256: String,
    /// Destinations holding its current content.
    held_by: Vec<String>,
    /// When the agent indexed its current state.
    indexed_ms: i64,
}

fn indexed_under(index: &Index, dir: &Path) -> anyhow::Result<Vec<Indexed>> {
    Ok(index
        .files_under(dir)?
        .into_iter()
        .map(|f| Indexed {
            path: f.path,
            size: f.size,
            mtime_ns: f.mtime_ns,
            sha256: hex::encode(f.sha256),
            held_by: f.held_by,
            indexed_ms: f.indexed_ms,
        })
        .collect())
}

/// The `n` most recently sealed runs of this node, newest first. Blocking.
pub(crate) fn latest(config: &Config, index: &Index, n: usize) -> anyhow::Result<Vec<RunSummary>> {
    let mut all = Vec::new();
    for (_, w) in run_watches(config) {
        all.extend(index.sealed_runs(&w.path)?);
    }
    all.sort_by_key(|r| std::cmp::Reverse(r.sealed_ms));
    Ok(all
        .into_iter()
        .take(n)
        .map(|r| {
            let ci = r.ci;
            RunSummary {
                duration_secs: r
                    .last_file_ms
                    .zip(r.first_file_ms)
                    .map(|(last, first)| (last - first).max(0) as u64 / 1000),
                branch: ci.and_then(|c| c.branch.or(c.tag)),
                run: r.name,
                sealed_ms: r.sealed_ms,
                files: r.files,
                bytes: r.bytes,
            }
        })
        .collect())
}

/// Every run this node sealed that has a test summary: `f(sealed_ms, summary)`. Blocking.
pub(crate) fn each_sealed_summary(
    config: &Config,
    index: &Index,
    mut f: impl FnMut(i64, &crate::format::results::TestSummary),
) -> anyhow::Result<()> {
    for (_, w) in run_watches(config) {
        for r in index.sealed_runs(&w.path)? {
            if let Some(t) = &r.tests {
                f(r.sealed_ms, t);
            }
        }
    }
    Ok(())
}

/// How many runs are open (not sealed), for `status`. Blocking.
/// A run is open while its directory has no seal recorded and no `seal` holds it: the
/// directories and the names of the sealed runs are all it reads (the daemon refreshes this
/// every 30 s; [`list`] reads every file of every run).
pub(crate) fn count_open(config: &Config, index: &Index) -> anyhow::Result<u64> {
    let mut open = 0;
    for (_, w) in run_watches(config) {
        let names = run_dirs(w);
        // A pruned run is not open either.
        let sealed = index.finished_names(&w.path)?;
        open += names
            .iter()
            .filter(|n| !sealed.contains(*n) && !SealingLock::held(config, &w.path, n))
            .count() as u64;
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_compare_bytes() {
        let run = Path::new("/w/run-1");
        assert_eq!(
            relative_str(Path::new("/w/run-1/a/b.log"), run),
            Some("a/b.log")
        );
        assert_eq!(relative_str(Path::new("/w/run-10/b.log"), run), None);
        assert_eq!(relative_str(Path::new("/w/run-1"), run), None);
        assert_eq!(
            relative_str(Path::new("/w/run-1/x"), Path::new("/w/run-1/")),
            Some("x")
        );
        assert_eq!(relative_str(Path::new("/v/run-1/x"), run), None);
    }

    #[test]
    fn labels_and_names() {
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_label("=x").is_err() && parse_label("x").is_err());
        for bad in ["", ".", "..", "a/b", "_panoptic-sync", "-h", "--log=x"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
