//! Local cleanup: frees disk by deleting local files, but only files whose exact current
//! content (the indexed hash of this generation) every destination has confirmed, and only
//! if the file on disk is still that content (same size, mtime and inode right before the
//! unlink). Three triggers, from `[retention]`: delete after upload, a maximum age, and a
//! minimum share of free space (oldest files first). A file not yet in every destination is
//! never deleted, whatever the pressure; that is logged loudly.

use std::path::Path;
use std::time::Duration;

use crate::config::Retention;
use crate::format::units::now_ns;
use crate::index::{Index, Stat, StoredFile};
use crate::scan::Root;

/// What one cleanup pass did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CleanupReport {
    /// Files deleted.
    pub deleted: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Roots still under the free-space threshold, with files waiting for destinations.
    pub blocked: Vec<String>,
}

/// Whether any local cleanup is configured.
pub fn enabled(r: &Retention) -> bool {
    r.local_delete_after_upload || r.local_max_age.is_some() || r.local_min_free_percent.is_some()
}

/// Free space on the filesystem holding the root's directory (the one the agent holds, never
/// a link's target), in percent.
pub fn free_percent(root: &Root) -> Option<f64> {
    let dir = root.tree.dir()?.open_dir(Path::new("")).ok()?;
    let st = rustix::fs::fstatvfs(&dir).ok()?;
    if st.f_blocks == 0 {
        return None;
    }
    Some(st.f_bavail as f64 * 100.0 / st.f_blocks as f64)
}

/// Delete `path` if it is still exactly the indexed content (device, inode, size, mtime),
/// checked and unlinked on its parent's handle, reached from the root's handle without
/// following any link. Returns the bytes freed.
fn delete_if_unchanged(
    index: &Index,
    roots: &[Root],
    id: i64,
    path: &Path,
    stat: &Stat,
) -> Option<u64> {
    let root = &roots[crate::scan::root_of(roots, path)?];
    match root.remove_if_unchanged(path, stat) {
        // Changed since it was stored (it will be re-indexed and uploaded), gone, or no
        // longer reachable without a link.
        Ok(false) => None,
        Ok(true) => {
            if let Err(e) = index.forget_file(id, path) {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "deleted, but cannot update the index");
            }
            tracing::debug!(path = %path.display(), "deleted locally: every destination has it");
            Some(stat.size)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete local file");
            None
        }
    }
}

/// One cleanup pass. Blocking.
pub fn run_once(
    index: &Index,
    roots: &[Root],
    dests: &[String],
    retention: &Retention,
) -> anyhow::Result<CleanupReport> {
    let mut report = CleanupReport::default();
    // With `local_runs_sealed_only`, a run's files wait for its seal: the sealed runs of each
    // runs root, read once per pass.
    let mut sealed: Vec<(&Path, std::collections::HashSet<String>)> = Vec::new();
    if retention.local_runs_sealed_only {
        for root in roots.iter().filter(|r| r.runs) {
            sealed.push((&root.path, index.sealed_names(&root.path)?));
        }
    }
    let releasable = |path: &Path| {
        sealed.iter().all(|(root, names)| {
            let Ok(rel) = path.strip_prefix(root) else {
                return true;
            };
            let run = rel.components().next().and_then(|c| c.as_os_str().to_str());
            run.is_some_and(|run| names.contains(run))
        })
    };
    let gated = !sealed.is_empty();
    let mut delete_batch = |max_mtime: i64, within: Option<&Path>, stop: &dyn Fn() -> bool| {
        // Oldest first. Files that cannot go yet (changed, or of an unsealed run) are paged
        // past when runs are gated; otherwise a batch without progress ends the pass (the
        // files it could not delete are retried next pass).
        let mut after = (i64::MIN, i64::MIN);
        loop {
            if stop() {
                return anyhow::Ok(());
            }
            let batch = index.stored_everywhere(dests, max_mtime, after, 512)?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            if gated {
                after = (last.stat.mtime_ns, last.id);
            }
            let mut progressed = false;
            for StoredFile { id, path, stat } in batch {
                if stop() {
                    return Ok(());
                }
                if within.is_some_and(|w| !path.starts_with(w)) || !releasable(&path) {
                    continue;
                }
                if let Some(bytes) = delete_if_unchanged(index, roots, id, &path, &stat) {
                    report.deleted += 1;
                    report.bytes += bytes;
                    progressed = true;
                }
            }
            if !progressed && !gated {
                return Ok(());
            }
        }
    };
    if retention.local_delete_after_upload {
        delete_batch(i64::MAX, None, &|| false)?;
    } else if let Some(age) = retention.local_max_age {
        delete_batch(now_ns() - age.as_nanos() as i64, None, &|| false)?;
    }
    if let Some(min_free) = retention.local_min_free_percent {
        for root in roots.iter().filter(|r| r.tree.dir().is_some()) {
            let below = || free_percent(root).is_some_and(|f| f < min_free);
            if !below() {
                continue;
            }
            delete_batch(i64::MAX, Some(&root.path), &|| !below())?;
            if below() {
                let waiting = index.awaiting_destinations(dests)?;
                tracing::error!(
                    root = %root.path.display(),
                    free_percent = free_percent(root).unwrap_or(0.0),
                    min_free_percent = min_free,
                    waiting,
                    "disk pressure: files not yet in every destination are never deleted; \
                     check `panoptic-sync status` for the destination that is behind"
                );
                report.blocked.push(root.path.display().to_string());
            }
        }
    }
    let dirs = tidy_finished_runs(index, roots)?;
    if report.deleted > 0 || dirs > 0 {
        tracing::info!(
            deleted = report.deleted,
            bytes = report.bytes,
            directories = dirs,
            "local cleanup"
        );
    }
    Ok(report)
}

/// Remove the empty directories left of finished runs: a run sealed (or pruned) with no file
/// of it indexed any more (cleanup deleted them all) goes, directory by empty directory; a run
/// still holding anything keeps it. Open runs are never touched (their job may still create
/// files in them). Returns the directories removed.
fn tidy_finished_runs(index: &Index, roots: &[Root]) -> anyhow::Result<u64> {
    let mut removed = 0;
    for root in roots.iter().filter(|r| r.runs) {
        let Some(dir) = root.tree.dir() else { continue };
        let Ok(names) = dir.subdirectories() else {
            continue;
        };
        let finished = index.finished_names(&root.path)?;
        for name in names {
            let Some(run) = name.to_str().filter(|n| finished.contains(*n)) else {
                continue;
            };
            if index.has_files_under(&root.path.join(run))? {
                continue;
            }
            match dir.remove_empty_dirs(Path::new(run)) {
                Ok(n) => removed += n,
                Err(e) => {
                    tracing::warn!(run, error = %e, "cannot remove the empty directories of a finished run")
                }
            }
        }
    }
    Ok(removed)
}

/// How often the daemon runs a cleanup pass.
pub const INTERVAL: Duration = Duration::from_secs(5);
