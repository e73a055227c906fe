//! One pass and a wait: `sync` (scan, upload everything pending, report what is missing) and
//! `flush` (wait until what is on disk now is in every destination; a seal waits with
//! [`flush_under`] for one run's files).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::agent::{Agent, Parts, StateLock, open_index};
use crate::config::Config;
use crate::index::{FlushState, Index, Stat};
use crate::scan::{self, Root};

/// Attempts per file in `sync` before it gives up on that file.
pub const SYNC_ATTEMPTS: i64 = 3;

/// What `sync` achieved, per destination.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncSummary {
    /// Files hashed into the index in this pass.
    pub indexed: u64,
    /// Per destination: (name, stored this pass, still pending, permanently failed).
    pub destinations: Vec<SyncDest>,
    /// Watch roots that exist but are not real directories (a symlink is never followed):
    /// nothing under them was synced.
    pub refused_roots: Vec<PathBuf>,
}

/// One destination's result of a `sync`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncDest {
    /// Destination name.
    pub name: String,
    /// Files stored this pass (uploaded, copied or already there).
    pub stored: u64,
    /// Files still not in the destination.
    pub missing: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

impl SyncSummary {
    /// Whether every destination has everything.
    pub fn complete(&self) -> bool {
        self.destinations.iter().all(|d| d.missing == 0) && self.refused_roots.is_empty()
    }
}

/// How `sync` reports progress.
pub trait Progress: Send {
    /// Called a few times a second with files stored so far and files to store in total.
    fn update(&mut self, done: u64, total: u64);
    /// Called once at the end.
    fn finish(&mut self);
}

/// One pass: scan, upload everything pending (each file tried up to [`SYNC_ATTEMPTS`] times),
/// and report what is still missing.
pub async fn sync(config: &Config, progress: &mut dyn Progress) -> anyhow::Result<SyncSummary> {
    let _lock = StateLock::acquire(&config.state_dir)?;
    let index = open_index(config)?;
    {
        let index = index.clone();
        tokio::task::spawn_blocking(move || index.retry_now()).await??;
    }
    let agent = Agent::start(
        Parts::prepare(config.clone())?,
        index.clone(),
        Some(SYNC_ATTEMPTS),
        Arc::new(crate::metrics::Metrics::new()),
    )?;
    agent.catch_up().await?;
    let names: Vec<String> = agent.workers.iter().map(|(n, _, _)| n.clone()).collect();
    loop {
        let outstanding = agent.feeder.outstanding();
        let in_flight: u64 = agent
            .workers
            .iter()
            .map(|(_, _, s)| s.in_flight.load(Ordering::Relaxed))
            .sum();
        let (i, n) = (index.clone(), names.clone());
        // While files are being checked or uploaded, the pending count comes from the
        // index's running totals (reading every pending row 40 times a second made a large
        // first sync quadratic); only when nothing is in flight are the pending rows split
        // into those still to try and those out of attempts, to decide whether to stop.
        let idle = outstanding == 0 && in_flight == 0;
        let open: Vec<(u64, u64)> = tokio::task::spawn_blocking(move || {
            n.iter()
                .map(|d| {
                    if idle {
                        i.pending_counts(d, SYNC_ATTEMPTS)
                    } else {
                        i.pending_total(d).map(|p| (p, 0))
                    }
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        let stored: u64 = agent
            .workers
            .iter()
            .map(|(_, _, s)| {
                s.uploaded.load(Ordering::Relaxed)
                    + s.copied.load(Ordering::Relaxed)
                    + s.skipped.load(Ordering::Relaxed)
            })
            .sum();
        let waiting: u64 = open.iter().map(|(o, _)| o).sum();
        progress.update(stored, stored + waiting);
        if outstanding == 0 && in_flight == 0 && waiting == 0 {
            break;
        }
        if outstanding > 0 {
            // Ingest is still checking files: wake the moment it is done (an unchanged re-run
            // ends here), or in 100 ms to show progress.
            tokio::select! {
                _ = agent.feeder.drained() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        } else {
            // Uploads in flight: each takes a round trip; look again soon.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    progress.finish();
    let indexed = agent.ingest_stats.indexed.load(Ordering::Relaxed);
    let per_dest: Vec<(String, u64)> = agent
        .workers
        .iter()
        .map(|(n, _, s)| {
            (
                n.clone(),
                s.uploaded.load(Ordering::Relaxed)
                    + s.copied.load(Ordering::Relaxed)
                    + s.skipped.load(Ordering::Relaxed),
            )
        })
        .collect();
    let refused_roots = agent
        .roots
        .iter()
        .filter(|r| r.tree.refused())
        .map(|r| r.path.clone())
        .collect();
    agent.stop().await;
    let status = {
        let i = index.clone();
        tokio::task::spawn_blocking(move || i.status(&names)).await??
    };
    Ok(SyncSummary {
        indexed,
        destinations: status
            .destinations
            .into_iter()
            .zip(per_dest)
            .map(|(d, (_, stored))| SyncDest {
                name: d.name,
                stored,
                missing: d.pending + d.failed_permanently,
                last_error: d.last_error,
            })
            .collect(),
        refused_roots,
    })
}

/// What `flush` found.
#[derive(Debug, Clone)]
pub struct FlushSummary {
    /// Files that were present at call time and are now stored.
    pub stored: u64,
    /// Files not stored when the time ran out.
    pub waiting: Vec<PathBuf>,
    /// Files that can never be stored as they are, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// The stored files, with the identity they were stored with: kept for a run (a seal
    /// builds its manifest from them), not for a whole tree.
    pub files: Vec<Flushed>,
}

/// A file a flush found stored in every destination asked for.
#[derive(Debug, Clone)]
pub struct Flushed {
    /// Its path.
    pub path: PathBuf,
    /// Its identity (and mode) as listed, which the index matched.
    pub stat: Stat,
    /// Its content and objects, as the index had them then.
    pub stored: crate::index::StoredAs,
}

impl FlushSummary {
    /// Whether everything is stored.
    pub fn complete(&self) -> bool {
        self.waiting.is_empty() && self.failed.is_empty()
    }
}

/// Wait until every file present in the watched trees now is in the primary (or in every
/// destination with `all`). If no daemon is running, do the work with a `sync` first.
pub async fn flush(config: &Config, timeout: Duration, all: bool) -> anyhow::Result<FlushSummary> {
    Ok(flush_under(config, timeout, all, None).await?.0)
}

/// [`flush`] for the files under `under` only (a run directory), or every watched file; also
/// returns the index it checked them against, for the caller's next reads.
pub async fn flush_under(
    config: &Config,
    timeout: Duration,
    all: bool,
    under: Option<&Path>,
) -> anyhow::Result<(FlushSummary, Arc<Index>)> {
    let deadline = Instant::now() + timeout;
    let roots = Root::from_config(config);
    let dests: Vec<String> = config
        .destinations()
        .take(if all { usize::MAX } else { 1 })
        .map(|d| d.name.clone())
        .collect();
    let under = under.map(Path::to_path_buf);
    let keep = under.is_some();
    let mut summary = FlushSummary {
        stored: 0,
        waiting: Vec::new(),
        failed: Vec::new(),
        files: Vec::new(),
    };
    let daemon_running = StateLock::try_acquire(&config.state_dir)?.is_none();
    // The files present at call time, and the index to check them against.
    let (index, mut present) = if daemon_running {
        // The daemon keeps the index current: the listing is checked chunk by chunk while
        // the walk goes on (the first pass, with the identities just listed).
        let index = open_index(config)?;
        index.map_for_reading()?;
        let (i, d, r, u) = (index.clone(), dests.clone(), roots.clone(), under.clone());
        let first = tokio::task::spawn_blocking(move || {
            let (tx, rx) = std::sync::mpsc::sync_channel(4);
            std::thread::scope(|s| {
                let lister = std::thread::Builder::new()
                    .name("flush-list".into())
                    .spawn_scoped(s, || {
                        // Owned here: dropped when the walk ends, which ends the checking.
                        let tx = tx;
                        list_in_chunks(&r, u.as_deref(), &mut |c| tx.send(c).is_ok())
                    });
                let mut pass = FlushPass::default();
                if let Err(e) = &lister {
                    // No thread to be had: list here, then check.
                    tracing::debug!(error = %e, "listing on the checking thread");
                    let mut listed = Vec::new();
                    list_in_chunks(&r, u.as_deref(), &mut |c| {
                        listed.extend(c);
                        true
                    });
                    return flush_pass(&i, &d, &r, listed, false, keep);
                }
                for chunk in rx {
                    pass.add(flush_pass(&i, &d, &r, chunk, false, keep)?);
                }
                anyhow::Ok(pass)
            })
        })
        .await??;
        summary.stored += first.stored_count;
        summary.files.extend(first.stored);
        summary.failed.extend(first.failed);
        (index, first.rest)
    } else {
        let (r, u) = (roots.clone(), under.clone());
        let present = tokio::task::spawn_blocking(move || {
            let mut listed = Vec::new();
            list_in_chunks(&r, u.as_deref(), &mut |c| {
                listed.extend(c);
                true
            });
            listed
        })
        .await?;
        tracing::info!("no daemon is running on this state directory; syncing now");
        let mut quiet = NoProgress;
        sync(config, &mut quiet).await?;
        let index = open_index(config)?;
        index.map_for_reading()?;
        (index, present)
    };
    // Later passes look again, since a file may have changed (or gone) while it waited.
    let mut first = !daemon_running;
    let mut synced = Instant::now();
    loop {
        if !first {
            if present.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                summary.waiting = present.into_iter().map(|(p, _)| p).collect();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !daemon_running && synced.elapsed() >= RESYNC {
                // No daemon uploads what changed since the last pass (a file still being
                // written when it ran): run another.
                sync(config, &mut NoProgress).await?;
                synced = Instant::now();
            }
        }
        let look_again = !std::mem::take(&mut first);
        let (i, d, r) = (index.clone(), dests.clone(), roots.clone());
        let batch = std::mem::take(&mut present);
        let pass =
            tokio::task::spawn_blocking(move || flush_pass(&i, &d, &r, batch, look_again, keep))
                .await??;
        summary.stored += pass.stored_count;
        summary.files.extend(pass.stored);
        summary.failed.extend(pass.failed);
        present = pass.rest;
    }
    Ok((summary, index))
}

/// Without a daemon, how often a flush that still waits for files runs another sync pass.
const RESYNC: Duration = Duration::from_secs(1);

/// What one pass of a flush found.
#[derive(Default)]
struct FlushPass {
    /// Not stored yet.
    rest: Vec<(PathBuf, Stat)>,
    /// Stored in every destination asked for: how many, and (when kept) which.
    stored_count: u64,
    stored: Vec<Flushed>,
    /// Failed for good, and why.
    failed: Vec<(PathBuf, String)>,
}

impl FlushPass {
    fn add(&mut self, other: FlushPass) {
        self.rest.extend(other.rest);
        self.stored_count += other.stored_count;
        self.stored.extend(other.stored);
        self.failed.extend(other.failed);
    }
}

/// One pass of a flush over `batch`, in one read transaction. With `look_again`, each file is
/// looked at again first: changed since it was listed, its new version is waited for; gone,
/// it is dropped. With `keep`, the stored files are returned, not only counted. Blocking.
fn flush_pass(
    index: &Index,
    dests: &[String],
    roots: &[Root],
    batch: Vec<(PathBuf, Stat)>,
    look_again: bool,
    keep: bool,
) -> anyhow::Result<FlushPass> {
    let now: Vec<(PathBuf, Stat)> = batch
        .into_iter()
        .filter_map(|(path, listed)| {
            if !look_again {
                return Some((path, listed));
            }
            match scan::root_of(roots, &path).map(|n| roots[n].kind(&path)) {
                Some(Ok(crate::tree::Kind::File(stat))) => Some((path, stat)),
                _ => None,
            }
        })
        .collect();
    let states = index.is_stored_many(&now, dests)?;
    let mut pass = FlushPass::default();
    for ((path, stat), state) in now.into_iter().zip(states) {
        match state {
            FlushState::Stored(stored) => {
                pass.stored_count += 1;
                if keep {
                    pass.stored.push(Flushed { path, stat, stored });
                }
            }
            FlushState::Waiting => pass.rest.push((path, stat)),
            FlushState::Failed(e) => pass.failed.push((path, e)),
        }
    }
    Ok(pass)
}

/// Every wanted regular file in the trees (or below `under`, inside one of them), with its
/// identity, walked through each root's handle and handed to `chunk_done` 512 at a time, so
/// they can be checked while the walk goes on (small chunks keep the check after the walk's
/// end short); it returns false to stop the walk. Blocking.
fn list_in_chunks(
    roots: &[Root],
    under: Option<&Path>,
    chunk_done: &mut dyn FnMut(Vec<(PathBuf, Stat)>) -> bool,
) {
    const CHUNK: usize = 512;
    let walks: Vec<(&Root, &Path)> = match under {
        Some(dir) => scan::root_of(roots, dir)
            .map(|i| (&roots[i], dir))
            .into_iter()
            .collect(),
        None => roots.iter().map(|r| (r, r.path.as_path())).collect(),
    };
    let mut chunk = Vec::with_capacity(CHUNK);
    for (root, dir) in walks {
        if root.refresh().is_none() {
            continue;
        }
        let mut open = true;
        root.walk_files(dir, &mut |path, stat| {
            chunk.push((path, stat));
            if chunk.len() == CHUNK {
                open = chunk_done(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
            }
            open
        });
        if !open {
            return;
        }
    }
    if !chunk.is_empty() {
        chunk_done(chunk);
    }
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&mut self, _: u64, _: u64) {}
    fn finish(&mut self) {}
}
