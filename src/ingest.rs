//! The ingest stage: candidate paths (from the watcher, the scans and the upload workers) are
//! stat'ed, compared with the index, hashed if new or changed, and recorded in batches, which
//! queues their uploads. Runs on its own thread; hashing of a batch is spread over a few
//! threads.
//!
//! A file is only recorded if it did not change while it was hashed; otherwise the change's own
//! events (or the next scan) bring it back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, mpsc};

use crate::index::{Index, Observation, Stat};
use crate::scan::{Candidate, Root};
use crate::tree::Kind;

/// Most candidates handled in one transaction. Small enough that the first uploads start
/// while the rest of a large tree is still being hashed.
const BATCH: usize = 512;

/// Hash a whole file, opened through its root's handle; `None` if it changed while being
/// read or is not a regular file beneath the root.
pub fn hash_file(root: &Root, path: &Path) -> std::io::Result<Option<(Stat, [u8; 32])>> {
    let (mut file, before) = match root.open_file(path) {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return Ok(None),
        Err(e) => return Err(e),
    };
    let (sha, total) = crate::pipeline::copy_hashed(&mut file, &mut std::io::sink())?;
    let after = Stat::of(&file.metadata()?);
    if !before.same_file(&after) || total != before.size {
        return Ok(None);
    }
    Ok(Some((before, sha)))
}

/// Counters of the ingest stage.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Files hashed and recorded.
    pub indexed: AtomicU64,
    /// Files found unchanged (not read).
    pub unchanged: AtomicU64,
    /// Files that could not be read.
    pub errors: AtomicU64,
}

/// The ingest stage's inputs and outputs.
pub struct Ingest {
    /// The index to record into.
    pub index: Arc<Index>,
    /// The watched roots.
    pub roots: Arc<Vec<Root>>,
    /// Destination names to queue uploads for.
    pub dests: Vec<String>,
    /// One per destination worker, woken whenever uploads were queued.
    pub wake: Vec<Arc<Notify>>,
    /// Candidates sent but not yet handled; decremented here.
    pub outstanding: Arc<crate::scan::Outstanding>,
    /// Counters.
    pub stats: Arc<IngestStats>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cancelled at shutdown: a batch the index cannot take is then given up (the next
    /// catch-up scan finds its files again) instead of retried.
    pub closed: tokio_util::sync::CancellationToken,
}

impl Ingest {
    /// The next candidate, waiting for one; `None` once every sender is gone, or once the
    /// queue is closed (shutdown) with nothing in it: a sender that outlives the shutdown (a
    /// walker waiting for notify, say) must not hold the exit.
    fn receive(&self, rx: &mut mpsc::Receiver<Candidate>) -> Option<Candidate> {
        futures::executor::block_on(async {
            tokio::select! {
                biased;
                c = rx.recv() => c,
                _ = self.closed.cancelled() => rx.try_recv().ok(),
            }
        })
    }

    /// Handle candidates until every sender is gone, or the queue is closed and empty.
    /// Blocking; run on its own thread.
    pub fn run(self, mut rx: mpsc::Receiver<Candidate>) {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = self.receive(&mut rx) {
            // At shutdown what is still queued is left to the next catch-up scan: draining a
            // queue filled by rescans could hold the exit for minutes.
            if self.closed.is_cancelled() {
                let left: Vec<Candidate> = std::iter::once(first)
                    .chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    .collect();
                self.outstanding.done(&left);
                let left = left.len();
                tracing::debug!(
                    left,
                    "shutting down: queued candidates left to the next scan"
                );
                break;
            }
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            // The index may be unusable for a while (state disk full or read-only): keep the
            // batch and retry it with a growing pause. Meanwhile the channel fills up and the
            // watcher and scans wait: the agent takes no new work until it can record it.
            let mut pause = std::time::Duration::from_millis(250);
            while let Err(e) = self.handle(&mut batch) {
                self.metrics.index_errors.inc();
                tracing::error!(index = %self.index.path().display(), error = %format!("{e:#}"), retry_in_ms = pause.as_millis() as u64, "cannot record files in the index; taking no new work until it can");
                if rx.is_closed() || self.closed.is_cancelled() {
                    tracing::warn!(
                        files = n,
                        "shutting down with files not recorded; the next catch-up scan finds them again"
                    );
                    self.outstanding.done(&batch);
                    return;
                }
                // Sleep in slices, so shutdown is never held up by a long pause.
                let until = std::time::Instant::now() + pause;
                while std::time::Instant::now() < until && !self.closed.is_cancelled() {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                self.index.relieve();
                pause = (pause * 2).min(std::time::Duration::from_secs(10));
            }
            self.outstanding.done(&batch);
            batch.clear();
        }
    }

    fn handle(&self, batch: &mut [Candidate]) -> anyhow::Result<()> {
        // The last event for a path wins; handle each path once per batch.
        let mut seen: HashMap<&Path, (usize, Option<Stat>)> = HashMap::new();
        for c in batch.iter() {
            seen.insert(&c.path, (c.root, c.stat));
        }
        let mut observations = Vec::new();
        let mut to_hash: Vec<(PathBuf, usize)> = Vec::new();
        self.metrics.files_seen.inc_by(seen.len() as u64);
        let mut regular: Vec<(&Path, usize, Stat)> = Vec::new();
        for (path, (root, walked)) in seen {
            let Some(r) = self.roots.get(root) else {
                continue;
            };
            let wanted = r.wants(path);
            // Everything is looked at through the root's handle: a path through a symlink
            // is no file of ours.
            let kind = match walked {
                Some(stat) => Ok(Kind::File(stat)),
                None => r.kind(path),
            };
            match kind {
                Ok(Kind::File(stat)) if wanted => regular.push((path, root, stat)),
                Ok(Kind::Dir) => {}
                Ok(_) => observations.push(Observation::Gone(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    observations.push(Observation::Gone(path.to_path_buf()))
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %path.display(), error = %e, "cannot stat file");
                }
            }
        }
        let paths: Vec<&Path> = regular.iter().map(|(p, _, _)| *p).collect();
        let known = self.index.lookup_many(&paths)?;
        for ((path, root, stat), known) in regular.into_iter().zip(known) {
            if known.is_some_and(|k| k.same_file(&stat)) {
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            } else {
                to_hash.push((path.to_path_buf(), root));
            }
        }
        observations.extend(self.hash_all(to_hash));
        if observations.is_empty() {
            return Ok(());
        }
        let queued = self.index.apply(&observations, &self.dests)?;
        if queued > 0 {
            self.wake.iter().for_each(|w| w.notify_one());
        }
        Ok(())
    }

    /// Hash files on up to four threads.
    fn hash_all(&self, files: Vec<(PathBuf, usize)>) -> Vec<Observation> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
            .min(files.len().max(1));
        let next = AtomicU64::new(0);
        let results = std::sync::Mutex::new(Vec::with_capacity(files.len()));
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some((path, root)) = files.get(i) else {
                            break;
                        };
                        if let Some(obs) = self.hash_one(path, &self.roots[*root]) {
                            results.lock().unwrap_or_else(|p| p.into_inner()).push(obs);
                        }
                    }
                });
            }
        });
        results.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn hash_one(&self, path: &Path, root: &Root) -> Option<Observation> {
        match hash_file(root, path) {
            Ok(Some((stat, sha256))) => {
                self.stats.indexed.fetch_add(1, Ordering::Relaxed);
                let key = root.key_for(path);
                if let Err(e) = &key {
                    tracing::warn!(path = %path.display(), error = %e, "file cannot be uploaded");
                }
                Some(Observation::Indexed {
                    path: path.to_path_buf(),
                    key,
                    stat,
                    sha256,
                })
            }
            // Changed while hashing: its own events bring it back once it settles.
            Ok(None) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(Observation::Gone(path.to_path_buf()))
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path = %path.display(), error = %e, "cannot read file");
                None
            }
        }
    }
}
