//! Upload workers: one per destination, each with its own concurrency limit, so a slow or dead
//! destination never holds up another.
//!
//! A worker claims due jobs from the index queue and, for each one:
//! 1. skips it if the index knows the destination already holds this content at this key;
//! 2. copies server-side if the destination holds the same content under another key;
//! 3. otherwise reads the file once, hashing as it goes, and uploads it (a single PUT for small
//!    files, a streamed multipart upload for large ones; never the whole large file in memory).
//!
//! If the file changed since it was indexed (hash or identity differ), the upload is abandoned
//! (multipart aborted, nothing committed) and the path goes back to the ingest stage. Failures
//! are recorded with a backoff; permanent ones (403, missing bucket) are retried slowly.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::destination::{Destination, StoreError};
use crate::index::{Index, Job, Outcome, Stat};
use crate::ingest::open_regular;
use crate::scan::{Candidate, Feeder, Root};

/// Files up to this size go up in one request; larger ones as multipart uploads.
pub const MULTIPART_THRESHOLD: u64 = 8 * 1024 * 1024;
/// Size of each multipart part (and of each read while streaming).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight per multipart upload.
const PART_CONCURRENCY: usize = 2;

/// Counters of one destination worker.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Files uploaded.
    pub uploaded: AtomicU64,
    /// Files placed by server-side copy.
    pub copied: AtomicU64,
    /// Files already at their key.
    pub skipped: AtomicU64,
    /// Failed attempts.
    pub failed: AtomicU64,
    /// Bytes sent.
    pub bytes: AtomicU64,
    /// Jobs in flight.
    pub in_flight: AtomicU64,
}

/// One destination's worker.
pub struct Worker {
    /// The destination.
    pub dest: Destination,
    /// The queue.
    pub index: Arc<Index>,
    /// Woken when jobs are queued.
    pub wake: Arc<Notify>,
    /// Where changed files go back to.
    pub feeder: Feeder,
    /// The roots (to send changed files back with their root).
    pub roots: Arc<Vec<Root>>,
    /// Give up on a job after this many attempts (`sync`); `None` retries forever (`run`).
    pub max_attempts: Option<i64>,
    /// Counters.
    pub stats: Arc<UploadStats>,
    /// On shutdown, how long in-flight uploads may take to finish before they are abandoned.
    pub drain: Duration,
}

enum Step {
    Done(&'static str),
    Changed,
}

impl Worker {
    /// Work until `cancel`, then drain.
    pub async fn run(self, cancel: CancellationToken) {
        let this = Arc::new(self);
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        // In-flight jobs by file id, with their content: a second file with the same content
        // waits until the first is stored, then becomes a server-side copy.
        let mut busy: HashMap<i64, [u8; 32]> = HashMap::new();
        let mut finished: Vec<Outcome> = Vec::new();
        loop {
            let free = this.dest.concurrency.saturating_sub(busy.len());
            if free > 0 {
                let (index, dest, busy_now, max) = (
                    this.index.clone(),
                    this.dest.name.clone(),
                    busy.keys().copied().collect::<HashSet<i64>>(),
                    this.max_attempts,
                );
                let claimed =
                    tokio::task::spawn_blocking(move || index.claim(&dest, free, &busy_now, max))
                        .await;
                match claimed {
                    Ok(Ok(jobs)) => {
                        for job in jobs {
                            if busy.values().any(|sha| *sha == job.sha256) {
                                continue;
                            }
                            busy.insert(job.file_id, job.sha256);
                            let w = this.clone();
                            this.stats.in_flight.fetch_add(1, Ordering::Relaxed);
                            tasks.spawn(async move { w.process(job).await });
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(dest = %this.dest.name, error = %format!("{e:#}"), "cannot read the upload queue");
                    }
                    Err(e) => {
                        tracing::error!(dest = %this.dest.name, error = %e, "queue task failed")
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(res) = tasks.join_next() => {
                    if let Ok(o) = res { finished.push(o); }
                    while let Some(res) = tasks.try_join_next() {
                        if let Ok(o) = res { finished.push(o); }
                    }
                    this.record(&mut finished, &mut busy).await;
                }
                _ = this.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        // Shutdown: no new work; give in-flight uploads a moment, then abandon them. An
        // abandoned upload was never committed, so its job is still pending in the index.
        let deadline = tokio::time::Instant::now() + this.drain;
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok(o))) => finished.push(o),
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(dest = %this.dest.name, abandoned = tasks.len(), "abandoning in-flight uploads at shutdown; they stay queued");
                    tasks.abort_all();
                    break;
                }
            }
        }
        this.record(&mut finished, &mut busy).await;
    }

    async fn record(&self, finished: &mut Vec<Outcome>, busy: &mut HashMap<i64, [u8; 32]>) {
        if finished.is_empty() {
            return;
        }
        let outcomes = std::mem::take(finished);
        for o in &outcomes {
            let job = match o {
                Outcome::Stored { job, .. }
                | Outcome::Failed { job, .. }
                | Outcome::Changed { job } => job,
            };
            busy.remove(&job.file_id);
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let index = self.index.clone();
        let dest = self.dest.name.clone();
        let res = tokio::task::spawn_blocking(move || {
            let r = index.finish(&dest, &outcomes);
            (r, outcomes)
        })
        .await;
        match res {
            Ok((Ok(()), outcomes)) => {
                for o in outcomes {
                    if let Outcome::Changed { job } = o
                        && let Some(root) = self
                            .roots
                            .iter()
                            .position(|r| r.relative(&job.path).is_some())
                    {
                        self.feeder
                            .send(Candidate {
                                path: job.path,
                                root,
                            })
                            .await;
                    }
                }
            }
            Ok((Err(e), _)) => {
                // Not recorded: the jobs stay pending and are redone; uploads are idempotent.
                tracing::error!(dest = %self.dest.name, error = %format!("{e:#}"), "cannot record upload results");
            }
            Err(e) => tracing::error!(dest = %self.dest.name, error = %e, "recording task failed"),
        }
    }

    async fn process(&self, job: Job) -> Outcome {
        let started = std::time::Instant::now();
        match self.try_process(&job).await {
            Ok(Step::Done(method)) => {
                let counter = match method {
                    "copy" => &self.stats.copied,
                    "skip" => &self.stats.skipped,
                    _ => &self.stats.uploaded,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(dest = %self.dest.name, key = %job.key, method, ms = started.elapsed().as_millis() as u64, "stored");
                Outcome::Stored { job, method }
            }
            Ok(Step::Changed) => {
                tracing::debug!(dest = %self.dest.name, path = %job.path.display(), "file changed before upload; re-indexing");
                Outcome::Changed { job }
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let permanent = e.is_permanent();
                tracing::warn!(dest = %self.dest.name, key = %job.key, attempt = job.attempts + 1, permanent, error = %e, "upload failed; will retry");
                Outcome::Failed {
                    job,
                    error: e.to_string(),
                    permanent,
                }
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Index) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || f(&index))
            .await
            .map_err(|e| StoreError::Retryable(format!("index task failed: {e}")))?
            .map_err(|e| StoreError::Retryable(format!("index error: {e:#}")))
    }

    async fn try_process(&self, job: &Job) -> Result<Step, StoreError> {
        let location = self.dest.path(&job.key)?;
        let store = &self.dest.store;
        let (dest, key, sha) = (self.dest.name.clone(), job.key.clone(), job.sha256);

        let (here, elsewhere) = self
            .blocking(move |i| Ok((i.object_at(&dest, &key)?, i.object_with(&dest, &sha, &key)?)))
            .await?;
        if here == Some(job.sha256) {
            return Ok(Step::Done("skip"));
        }
        if let Some(src_key) = elsewhere {
            let src = self.dest.path(&src_key)?;
            match store.copy(&src, &location).await {
                Ok(()) => return Ok(Step::Done("copy")),
                Err(object_store::Error::NotFound { .. }) => {
                    // Someone removed the source: forget it and upload instead.
                    let dest = self.dest.name.clone();
                    self.blocking(move |i| i.forget_object(&dest, &src_key))
                        .await?;
                }
                Err(e) => {
                    return Err(StoreError::classify(
                        format!("copying {src} to {location} in {}", self.dest.name),
                        &e,
                    ));
                }
            }
        }
        if job.stat.size <= MULTIPART_THRESHOLD {
            self.put_small(job, &location).await
        } else {
            self.put_multipart(job, &location).await
        }
    }

    async fn put_small(
        &self,
        job: &Job,
        location: &object_store::path::Path,
    ) -> Result<Step, StoreError> {
        let path = job.path.clone();
        let (stat, sha) = (job.stat, job.sha256);
        let data = tokio::task::spawn_blocking(move || read_verified(&path, stat, sha))
            .await
            .map_err(|e| StoreError::Retryable(format!("read task failed: {e}")))?;
        let Some(data) = data.map_err(|e| read_error(job, e))? else {
            return Ok(Step::Changed);
        };
        let len = data.len() as u64;
        self.dest
            .store
            .put(location, PutPayload::from_bytes(data))
            .await
            .map_err(|e| {
                StoreError::classify(format!("uploading {location} to {}", self.dest.name), &e)
            })?;
        self.stats.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(Step::Done("upload"))
    }

    async fn put_multipart(
        &self,
        job: &Job,
        location: &object_store::path::Path,
    ) -> Result<Step, StoreError> {
        let ctx = || format!("uploading {location} to {}", self.dest.name);
        let path = job.path.clone();
        let opened = tokio::task::spawn_blocking(move || open_regular(&path))
            .await
            .map_err(|e| StoreError::Retryable(format!("open task failed: {e}")))?;
        let (mut file, meta) = match opened {
            Ok(x) => x,
            Err(e) if gone(&e) => return Ok(Step::Changed),
            Err(e) => return Err(read_error(job, e)),
        };
        if Stat::of(&meta) != job.stat {
            return Ok(Step::Changed);
        }
        let upload = self
            .dest
            .store
            .put_multipart(location)
            .await
            .map_err(|e| StoreError::classify(ctx(), &e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let result: Result<(), StoreError> = loop {
            if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
                break Err(StoreError::classify(ctx(), &e));
            }
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; PART_SIZE];
                let n = read_full(&mut file, &mut buf);
                (
                    file,
                    n.map(|n| {
                        buf.truncate(n);
                        buf
                    }),
                )
            })
            .await;
            let chunk = match read {
                Ok((f, chunk)) => {
                    file = f;
                    chunk
                }
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(StoreError::Retryable(format!("read task failed: {e}")));
                }
            };
            match chunk {
                Ok(chunk) if chunk.is_empty() => break Ok(()),
                Ok(chunk) => {
                    hasher.update(&chunk);
                    total += chunk.len() as u64;
                    writer.put(Bytes::from(chunk));
                }
                Err(e) => break Err(read_error(job, e)),
            }
        };
        if let Err(e) = result {
            let _ = writer.abort().await;
            return Err(e);
        }
        let now = file.metadata().map(|m| Stat::of(&m)).ok();
        let sha: [u8; 32] = hasher.finalize().into();
        if sha != job.sha256 || total != job.stat.size || now != Some(job.stat) {
            // Changed while read: never commit this version.
            let _ = writer.abort().await;
            return Ok(Step::Changed);
        }
        writer
            .finish()
            .await
            .map_err(|e| StoreError::classify(ctx(), &e))?;
        self.stats.bytes.fetch_add(total, Ordering::Relaxed);
        Ok(Step::Done("upload"))
    }
}

fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || e.kind() == std::io::ErrorKind::InvalidInput
        || e.raw_os_error() == Some(libc::ELOOP)
}

fn read_error(job: &Job, e: std::io::Error) -> StoreError {
    let msg = format!("cannot read {}: {e}", job.path.display());
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        StoreError::Permanent(msg)
    } else {
        StoreError::Retryable(msg)
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Read a small file whole; `None` if it is gone or no longer the indexed content.
fn read_verified(
    path: &std::path::Path,
    stat: Stat,
    sha: [u8; 32],
) -> std::io::Result<Option<Bytes>> {
    let (mut file, meta) = match open_regular(path) {
        Ok(x) => x,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if Stat::of(&meta) != stat {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(stat.size as usize);
    (&mut file).take(stat.size + 1).read_to_end(&mut data)?;
    let digest: [u8; 32] = Sha256::digest(&data).into();
    if digest != sha || Stat::of(&file.metadata()?) != stat {
        return Ok(None);
    }
    Ok(Some(Bytes::from(data)))
}
