//! Upload workers: one per destination, each with its own concurrency limit, so a slow or dead
//! destination never holds up another.
//!
//! A worker claims due jobs from the index queue and, for each one:
//! 1. skips it if the index knows the destination already holds this content at this key;
//! 2. copies server-side if the destination holds the same content under another key;
//! 3. otherwise hands it to [`transfer`], which reads the file once (hash, compress, encrypt)
//!    and streams the result to the store.
//!
//! This module is the bookkeeping: claiming, deduplicating in-flight content, counting, and
//! recording each outcome in the index; the bytes move in [`transfer`].
//!
//! If the file changed since it was indexed (hash or identity differ), the upload is abandoned
//! (multipart aborted, nothing committed) and the path goes back to the ingest stage. When a
//! new version lands under a different stored key (its suffixes changed), the old object is
//! deleted so a restore sees only the last version. Failures are recorded with a backoff;
//! permanent ones (403, missing bucket) are retried slowly.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use object_store::{Attribute, ObjectStore, ObjectStoreExt};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::destination::{Destination, StoreError};
use crate::format::layout;
use crate::format::layout::Plan;
use crate::format::metadata;
use crate::index::{Claimed, FinishAndClaim, Index, Job, Method, ObjectRow, Outcome};
use crate::pipeline::Pipeline;
use crate::scan::{Candidate, Feeder, Root};

mod by_content;
mod transfer;

use transfer::{Link, Target, Transferred};

/// Counters of one destination worker.
#[derive(Debug, Default)]
pub(crate) struct UploadStats {
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
pub(crate) struct Worker {
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
    /// How objects are encoded.
    pub pipeline: Arc<Pipeline>,
    /// Bounds how many multipart uploads (each holding a few parts in memory) run at once.
    pub multipart_slots: Arc<Semaphore>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The agent-wide bandwidth cap (`[limits] max_rate`).
    pub global_limit: Option<Arc<crate::throttle::Limiter>>,
    /// Consecutive failures to record outcomes (the pause before claiming again grows).
    pub index_failures: AtomicU64,
}

/// The longest a worker sleeps with nothing due: a safety net for a wall clock that jumps
/// (due times are wall-clock milliseconds) and for jobs queued by another process.
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// What one trip to the queue gave: jobs to start, and when to look again if nothing wakes
/// the worker first.
struct Round {
    claimed: Vec<Claimed>,
    next_due: tokio::time::Instant,
}

impl Round {
    fn retry_in(wait: Duration) -> Round {
        Round {
            claimed: Vec::new(),
            next_due: tokio::time::Instant::now() + wait,
        }
    }
}

enum Step {
    Done(Method, ObjectRow),
    Changed,
}

impl Worker {
    /// Work until `cancel`, then drain.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let this = Arc::new(self);
        this.metrics
            .max_rate
            .get_or_create(&crate::metrics::Dest {
                dest: this.dest.name.clone(),
            })
            .set(this.dest.limiter.as_ref().map_or(0, |l| l.rate()) as i64);
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        // In-flight jobs by file id, with their content: a second file with the same content
        // waits until the first is stored, then becomes a server-side copy.
        let mut busy: HashMap<i64, [u8; 32]> = HashMap::new();
        let mut finished: Vec<Outcome> = Vec::new();
        loop {
            // One trip to the index per round: record what finished, claim what fits.
            let Round { claimed, next_due } = this
                .record_and_claim(&mut finished, &mut busy, Some(&cancel))
                .await;
            for Claimed {
                job,
                here,
                elsewhere,
            } in claimed
            {
                if busy.values().any(|sha| *sha == job.sha256) {
                    continue;
                }
                busy.insert(job.file_id, job.sha256);
                let w = this.clone();
                this.stats.in_flight.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(async move { w.process(job, here, elsewhere).await });
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(res) = tasks.join_next() => {
                    if let Ok(o) = res { finished.push(o); }
                    while let Some(res) = tasks.try_join_next() {
                        if let Ok(o) = res { finished.push(o); }
                    }
                }
                _ = this.wake.notified() => {}
                // The only timer: a job in backoff becoming due. An idle worker sleeps.
                _ = tokio::time::sleep_until(next_due) => {}
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
        this.record_and_claim(&mut finished, &mut busy, None).await;
    }

    /// Record `finished` outcomes and claim as many due jobs as there are free
    /// slots, with what the index knows of their keys and contents. One blocking call.
    /// `cancel` is `None` at shutdown: record only, never claim or pause.
    async fn record_and_claim(
        &self,
        finished: &mut Vec<Outcome>,
        busy: &mut HashMap<i64, [u8; 32]>,
        cancel: Option<&CancellationToken>,
    ) -> Round {
        let claim = cancel.is_some();
        let outcomes = std::mem::take(finished);
        for o in &outcomes {
            busy.remove(&o.job().file_id);
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let free = if claim {
            self.dest.concurrency.saturating_sub(busy.len())
        } else {
            0
        };
        if outcomes.is_empty() && free == 0 {
            // Full: a finishing task wakes the worker.
            return Round::retry_in(IDLE_CHECK);
        }
        let index = self.index.clone();
        let (dest, busy_now, max, identity) = (
            self.dest.name.clone(),
            busy.keys().copied().collect::<HashSet<i64>>(),
            self.max_attempts,
            self.pipeline.identity(),
        );
        let res = tokio::task::spawn_blocking(move || {
            let FinishAndClaim {
                recorded,
                claimed,
                next_due_ms,
            } = index.finish_and_claim(&dest, &outcomes, free, &busy_now, max, &identity);
            (recorded, claimed, next_due_ms, outcomes)
        })
        .await;
        let (recorded, claimed, next_due_ms, outcomes) = match res {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(dest = %self.dest.name, error = %e, "queue task failed");
                return Round::retry_in(Duration::from_secs(1));
            }
        };
        match recorded {
            Ok(()) => {
                self.index_failures.store(0, Ordering::Relaxed);
                for o in outcomes {
                    if let Outcome::Changed { job } = o
                        && let Some(root) = crate::scan::root_of(&self.roots, &job.path)
                    {
                        self.feeder
                            .send(Candidate {
                                path: job.path,
                                root,
                                stat: None,
                            })
                            .await;
                    }
                }
            }
            // Not recorded: the jobs stay pending and are redone (uploads are idempotent), but
            // not before the index takes writes again: pause instead of uploading in a loop.
            Err(e) => {
                self.metrics.index_errors.inc();
                let failures = self.index_failures.fetch_add(1, Ordering::Relaxed).min(6);
                let pause = Duration::from_millis(250 << failures).min(Duration::from_secs(10));
                tracing::error!(dest = %self.dest.name, error = %format!("{e:#}"), pause_ms = pause.as_millis() as u64, "cannot record upload results; uploads pause");
                if let Some(cancel) = cancel {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(pause) => {}
                    }
                    let index = self.index.clone();
                    let _ = tokio::task::spawn_blocking(move || index.relieve()).await;
                }
                // Paused already: claim again at once.
                return Round::retry_in(Duration::ZERO);
            }
        }
        match claimed {
            Ok(claimed) => Round {
                claimed,
                next_due: next_due_ms.map_or(tokio::time::Instant::now() + IDLE_CHECK, |due| {
                    let wait = due.saturating_sub(crate::format::units::now_ms()).max(0) as u64;
                    tokio::time::Instant::now() + Duration::from_millis(wait).min(IDLE_CHECK)
                }),
            },
            Err(e) => {
                tracing::error!(dest = %self.dest.name, error = %format!("{e:#}"), "cannot read the upload queue");
                Round::retry_in(Duration::from_secs(1))
            }
        }
    }

    async fn process(
        &self,
        job: Job,
        here: Option<ObjectRow>,
        elsewhere: Option<ObjectRow>,
    ) -> Outcome {
        let started = std::time::Instant::now();
        match self.try_process(&job, here, elsewhere).await {
            Ok(Step::Done(method, object)) => {
                let counter = match method {
                    Method::Copy => &self.stats.copied,
                    Method::Skip | Method::Reuse => &self.stats.skipped,
                    Method::Upload => &self.stats.uploaded,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let blob_sent = object
                    .blob
                    .as_ref()
                    .filter(|b| b.uploaded)
                    .map_or(0, |b| b.stored_size);
                self.metrics.stored(
                    &self.dest.name,
                    method,
                    job.stat.size,
                    object.stored_size + blob_sent,
                    job.stat.mtime_ns,
                );
                tracing::debug!(dest = %self.dest.name, key = %job.key, method = method.as_str(), ms = started.elapsed().as_millis() as u64, "stored");
                Outcome::Stored {
                    job,
                    method,
                    object,
                }
            }
            Ok(Step::Changed) => {
                tracing::debug!(dest = %self.dest.name, path = %job.path.display(), "file changed before upload; re-indexing");
                Outcome::Changed { job }
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.metrics.failure(&self.dest.name);
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

    /// `here`: the object the index knows at the job's key; `elsewhere`: an object holding
    /// the same content under another key (both looked up when the job was claimed).
    async fn try_process(
        &self,
        job: &Job,
        here: Option<ObjectRow>,
        elsewhere: Option<ObjectRow>,
    ) -> Result<Step, StoreError> {
        if self.dest.layout == crate::config::Layout::Content
            && job.stat.size >= crate::format::pointer::INLINE_BELOW
        {
            return self.store_by_content(job, here).await;
        }
        let identity = self.pipeline.identity();
        // A row written before the layout rule escaped its name (`x.gz` stored as-is as
        // `x.gz`) no longer matches its key: upload again (and delete the old object).
        if let Some(h) = &here
            && h.sha256 == job.sha256
            && h.pipeline == identity
            && layout::stored_key(&h.key, layout::parse(&h.stored_key).plan) == h.stored_key
        {
            return Ok(Step::Done(Method::Skip, h.clone()));
        }
        // Taken before anything is written: the object must be durable before it is
        // recorded stored (and before an old version is deleted).
        let ticket = self.dest.ticket();
        let mut step = None;
        if let Some(src) = elsewhere {
            step = self.copy(job, src).await?;
        }
        let step = match step {
            Some(s) => s,
            None => self.upload(job, &identity).await?,
        };
        if let Step::Done(..) = step {
            self.dest.persist(ticket).await?;
        }
        self.delete_replaced(&step, here.as_ref()).await?;
        Ok(step)
    }

    /// A new version under a different stored key: remove the old one, so the destination
    /// (and a restore from it) holds only the last version.
    async fn delete_replaced(
        &self,
        step: &Step,
        here: Option<&ObjectRow>,
    ) -> Result<(), StoreError> {
        if let (Step::Done(_, new), Some(old)) = (step, here)
            && new.stored_key != old.stored_key
        {
            let path = self.dest.path(&old.stored_key)?;
            match self.dest.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(dest = %self.dest.name, key = %path, error = %e, "cannot delete the previous version")
                }
            }
        }
        Ok(())
    }

    /// Server-side copy of an object holding the same content; `None` if the source is gone
    /// or a copy cannot carry this file's own metadata (then the file is uploaded).
    async fn copy(&self, job: &Job, src: ObjectRow) -> Result<Option<Step>, StoreError> {
        let plan = layout::parse(&src.stored_key).plan;
        let stored_key = layout::stored_key(&job.key, plan);
        let from = self.dest.path(&src.stored_key)?;
        let to = self.dest.path(&stored_key)?;
        if !self.copy_keeps_metadata(job, plan, &src, &from).await {
            return Ok(None);
        }
        match self.dest.store.copy(&from, &to).await {
            Ok(()) => Ok(Some(Step::Done(
                Method::Copy,
                ObjectRow {
                    key: job.key.clone(),
                    stored_key,
                    ..src
                },
            ))),
            Err(object_store::Error::NotFound { .. }) => {
                // Someone removed the source: forget it and upload instead.
                let dest = self.dest.name.clone();
                self.blocking(move |i| i.forget_object(&dest, &src.key))
                    .await?;
                Ok(None)
            }
            Err(e) => Err(StoreError::classify(
                format!("copying {from} to {to} in {}", self.dest.name),
                &e,
            )),
        }
    }

    /// A plain object in a `file://` store keeps the original's mode and mtime (and a long
    /// name) on the stored file itself.
    async fn keep_local_meta(
        &self,
        plan: Plan,
        job: &Job,
        mode: u32,
        stored_key: &str,
    ) -> Result<(), StoreError> {
        if plan.encrypt {
            return Ok(());
        }
        let Some(file) = self.dest.local_file(stored_key) else {
            return Ok(());
        };
        let long_name = layout::parse(stored_key)
            .long
            .then(|| layout::file_name(&job.key).to_string());
        let meta = crate::filemeta::FileMeta {
            mode,
            mtime_ns: job.stat.mtime_ns,
            long_name,
        };
        self.dest
            .apply_meta(file, meta)
            .await
            .map_err(|e| StoreError::Retryable(format!("metadata task failed: {e}")))?
            .map_err(|e| {
                StoreError::Permanent(format!(
                    "setting mode and mtime on {stored_key} in {}: {e}",
                    self.dest.name
                ))
            })
    }

    /// Whether a copy of `src` would restore with this file's own metadata. An encrypted
    /// object is bound to its key, so it can never be copied; a copy keeps the source's
    /// metadata (S3, GCS, Azure) or is a hard link to it (`file://`), so a plain object is
    /// copied only when mtime and mode are the same and neither name is shortened.
    async fn copy_keeps_metadata(
        &self,
        job: &Job,
        plan: Plan,
        src: &ObjectRow,
        from: &object_store::path::Path,
    ) -> bool {
        if plan.encrypt
            || layout::parse(&src.stored_key).long
            || layout::parse(&layout::stored_key(&job.key, plan)).long
        {
            return false;
        }
        // Looked at through the root's handle, like every access to the tree.
        let Some(root) = crate::scan::root_of(&self.roots, &job.path).map(|i| &self.roots[i])
        else {
            return false;
        };
        let Ok(meta) = root.open_file(&job.path).and_then(|(f, _)| f.metadata()) else {
            return false;
        };
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        if let Some(file) = self.dest.local_file(&src.stored_key) {
            let stored = crate::filemeta::read(&file);
            return stored.is_ok_and(|m| m.mode == mode && m.mtime_ns == job.stat.mtime_ns);
        }
        let opts = object_store::GetOptions {
            head: true,
            ..Default::default()
        };
        let Ok(got) = self.dest.store.get_opts(from, opts).await else {
            return false;
        };
        let attr = |k: &'static str| {
            got.attributes
                .get(&Attribute::Metadata(k.into()))
                .map(|v| v.to_string())
        };
        attr(metadata::MTIME_NS) == Some(job.stat.mtime_ns.to_string())
            && attr(metadata::MODE) == Some(format!("{mode:o}"))
    }

    /// Read the file once through the pipeline and store it.
    async fn upload(&self, job: &Job, identity: &str) -> Result<Step, StoreError> {
        let link = Link {
            dest: &self.dest,
            global_limit: self.global_limit.as_deref(),
            multipart_slots: &self.multipart_slots,
            bytes: &self.stats.bytes,
            metrics: &self.metrics,
        };
        let (roots, pipeline) = (self.roots.clone(), self.pipeline.clone());
        match transfer::send(&link, job, roots, pipeline, Target::Path).await? {
            Transferred::Changed => Ok(Step::Changed),
            Transferred::Stored {
                plan,
                mode,
                stored_key,
                stored_size,
            } => {
                self.keep_local_meta(plan, job, mode, &stored_key).await?;
                Ok(Step::Done(
                    Method::Upload,
                    ObjectRow {
                        key: job.key.clone(),
                        stored_key,
                        sha256: job.sha256,
                        size: job.stat.size,
                        stored_size,
                        pipeline: identity.to_string(),
                        blob: None,
                    },
                ))
            }
        }
    }
}
