//! Upload workers: one per destination, each with its own concurrency limit, so a slow or dead
//! destination never holds up another.
//!
//! A worker claims due jobs from the index queue and, for each one:
//! 1. skips it if the index knows the destination already holds this content at this key;
//! 2. copies server-side if the destination holds the same content under another key;
//! 3. otherwise reads the file once on a blocking thread — hash, compress, encrypt
//!    ([`crate::pipeline`]) — and streams the result to the store: one PUT when it fits in two
//!    parts, a multipart upload otherwise (never the whole large file in memory).
//!
//! If the file changed since it was indexed (hash or identity differ), the upload is abandoned
//! (multipart aborted, nothing committed) and the path goes back to the ingest stage. When a
//! new version lands under a different stored key (its suffixes changed), the old object is
//! deleted so a restore sees only the last version. Failures are recorded with a backoff;
//! permanent ones (403, missing bucket) are retried slowly.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
    PutPayload, WriteMultipart,
};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::destination::{Destination, StoreError};
use crate::index::{Claimed, FinishAndClaim, Index, Job, Method, ObjectRow, Outcome, Stat};
use crate::layout;
use crate::pipeline::{self, Finish, Meta, Pipeline, Plan};
use crate::scan::{Candidate, Feeder, Root};

/// Size of each multipart part; output up to two parts goes up in a single PUT.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
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

enum Step {
    Done(Method, ObjectRow),
    Changed,
}

/// What flows from the reading thread to the uploading task.
enum Msg {
    /// How the file is encoded, and its permission bits.
    Plan(Plan, u32),
    Data(Bytes),
}

/// The end of the encoding chain: cuts the output into parts and hands them to the uploader.
struct ChunkSink {
    tx: mpsc::Sender<Msg>,
    buf: Vec<u8>,
    sent: bool,
}

impl ChunkSink {
    fn send(&mut self) -> std::io::Result<()> {
        // The next buffer is allocated by the next write, if any.
        let data = std::mem::take(&mut self.buf);
        self.sent = true;
        self.tx
            .blocking_send(Msg::Data(Bytes::from(data)))
            .map_err(|_| std::io::Error::other("upload cancelled"))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(PART_SIZE);
        }
        let take = (PART_SIZE - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == PART_SIZE {
            self.send()?;
        }
        Ok(take)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Finish for ChunkSink {
    fn finish(mut self: Box<Self>) -> std::io::Result<()> {
        if !self.buf.is_empty() || !self.sent {
            self.send()?;
        }
        Ok(())
    }
}

/// Read, verify and encode a file into `tx`. `Ok(false)`: the file is gone or is no longer the
/// indexed content, and nothing may be committed. Blocking.
fn produce(
    roots: &[Root],
    path: &Path,
    key: &str,
    stat: Stat,
    sha: [u8; 32],
    pipeline: &Pipeline,
    tx: mpsc::Sender<Msg>,
) -> std::io::Result<bool> {
    // Opened through its root's handle, never through a symlink; a path that no longer lies
    // in any root (a watch removed on reload) is gone.
    let Some(root) = crate::scan::root_of(roots, path).map(|i| &roots[i]) else {
        return Ok(false);
    };
    let (mut file, now) = match root.open_file(path) {
        Ok(x) => x,
        Err(e) if gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    if !now.same_file(&stat) {
        return Ok(false);
    }
    // One byte more than the file's size is enough to see its end (no zeroed 64 KiB per file).
    let probe = (stat.size as usize)
        .saturating_add(1)
        .min(pipeline::PROBE_BLOCK);
    let mut first = vec![0u8; probe];
    let n = read_full(&mut file, &mut first)?;
    first.truncate(n);
    let plan = pipeline.plan(path, &first);
    let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions()) & 0o7777;
    tx.blocking_send(Msg::Plan(plan, mode))
        .map_err(|_| std::io::Error::other("upload cancelled"))?;
    // Small files (most of a CI tree) get a buffer of their size, not a whole part.
    let expected = (stat.size as usize)
        .saturating_add(64 * 1024)
        .min(PART_SIZE);
    let sink = ChunkSink {
        tx,
        buf: Vec::with_capacity(expected),
        sent: false,
    };
    let record = Meta {
        size: stat.size,
        mtime_ns: stat.mtime_ns,
        sha256: hex::encode(sha),
        mode: Some(mode),
        path: Some(key.to_string()),
    };
    let stored_key = layout::stored_key(key, plan);
    let mut out = pipeline::encoder(pipeline, plan, &record, &stored_key, Box::new(sink))?;
    // Hash and encode the whole file in one read: the probed first block, then the rest.
    let (digest, total) =
        pipeline::copy_hashed(&mut std::io::Cursor::new(first).chain(&mut file), &mut out)?;
    let unchanged =
        digest == sha && total == stat.size && Stat::of(&file.metadata()?).same_file(&stat);
    out.finish()?;
    Ok(unchanged)
}

impl Worker {
    /// Work until `cancel`, then drain.
    pub async fn run(self, cancel: CancellationToken) {
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
            let claimed = this
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
    ) -> Vec<Claimed> {
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
            return Vec::new();
        }
        let index = self.index.clone();
        let (dest, busy_now, max, identity) = (
            self.dest.name.clone(),
            busy.keys().copied().collect::<HashSet<i64>>(),
            self.max_attempts,
            self.pipeline.identity(),
        );
        let res = tokio::task::spawn_blocking(move || {
            let FinishAndClaim { recorded, claimed } =
                index.finish_and_claim(&dest, &outcomes, free, &busy_now, max, &identity);
            (recorded, claimed, outcomes)
        })
        .await;
        let (recorded, claimed, outcomes) = match res {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(dest = %self.dest.name, error = %e, "queue task failed");
                return Vec::new();
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
                return Vec::new();
            }
        }
        claimed.unwrap_or_else(|e| {
            tracing::error!(dest = %self.dest.name, error = %format!("{e:#}"), "cannot read the upload queue");
            Vec::new()
        })
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
                    Method::Skip => &self.stats.skipped,
                    Method::Upload => &self.stats.uploaded,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.metrics.stored(
                    &self.dest.name,
                    method,
                    job.stat.size,
                    object.stored_size,
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

    /// Wait for the destination's and the agent's bandwidth caps before sending `bytes`.
    async fn throttle(&self, bytes: usize) {
        let mut waited = Duration::ZERO;
        for limiter in [&self.dest.limiter, &self.global_limit]
            .into_iter()
            .flatten()
        {
            waited += limiter.acquire(bytes as u64).await;
        }
        if !waited.is_zero() {
            self.metrics.throttled(&self.dest.name, waited);
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
        let mut step = None;
        if let Some(src) = elsewhere {
            step = self.copy(job, src).await?;
        }
        let step = match step {
            Some(s) => s,
            None => self.upload(job, &identity).await?,
        };
        // A new version under a different stored key: remove the old one, so the destination
        // (and a restore from it) holds only the last version.
        if let (Step::Done(_, new), Some(old)) = (&step, &here)
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
        Ok(step)
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
        let Some(file) = crate::filemeta::local_path(&self.dest, stored_key) else {
            return Ok(());
        };
        let long_name = layout::parse(stored_key)
            .long
            .then(|| job.key.rsplit('/').next().unwrap_or(&job.key).to_string());
        let meta = crate::filemeta::FileMeta {
            mode,
            mtime_ns: job.stat.mtime_ns,
            long_name,
        };
        tokio::task::spawn_blocking(move || crate::filemeta::apply(&file, &meta))
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
        if let Some(file) = crate::filemeta::local_path(&self.dest, &src.stored_key) {
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
        attr("mtimens") == Some(job.stat.mtime_ns.to_string())
            && attr("mode") == Some(format!("{mode:o}"))
    }

    /// Content-Type, Content-Encoding and, for unencrypted objects only, the original's hash,
    /// size, mtime, mode and (when shortened) full name, which `restore` checks and applies.
    /// Encrypted objects carry these inside.
    fn attributes(&self, plan: Plan, job: &Job, mode: u32) -> Attributes {
        let mut attrs = Attributes::new();
        if self.dest.supports_attributes {
            attrs.insert(Attribute::ContentType, plan.content_type(&job.path).into());
            if let Some(enc) = plan.content_encoding() {
                attrs.insert(Attribute::ContentEncoding, enc.into());
            }
            if !plan.encrypt {
                attrs.insert(
                    Attribute::Metadata("sha256".into()),
                    hex::encode(job.sha256).into(),
                );
                attrs.insert(
                    Attribute::Metadata("mtimens".into()),
                    job.stat.mtime_ns.to_string().into(),
                );
                attrs.insert(
                    Attribute::Metadata("mode".into()),
                    format!("{mode:o}").into(),
                );
                attrs.insert(
                    Attribute::Metadata("size".into()),
                    job.stat.size.to_string().into(),
                );
                if layout::parse(&layout::stored_key(&job.key, plan)).long {
                    // Header values are ASCII: the name as hex.
                    let name = job.key.rsplit('/').next().unwrap_or(&job.key);
                    attrs.insert(
                        Attribute::Metadata("longname".into()),
                        hex::encode(name).into(),
                    );
                }
            }
        }
        attrs
    }

    /// One PUT of a whole (small) object, within the bandwidth caps; counts the bytes sent.
    async fn put_single(
        &self,
        location: &object_store::path::Path,
        payload: PutPayload,
        attributes: Attributes,
    ) -> object_store::Result<()> {
        let len = payload.content_length();
        self.throttle(len).await;
        let opts = PutOptions {
            attributes,
            ..Default::default()
        };
        self.dest.store.put_opts(location, payload, opts).await?;
        self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Read the file once through the pipeline and stream it to the store.
    async fn upload(&self, job: &Job, identity: &str) -> Result<Step, StoreError> {
        let (tx, mut rx) = mpsc::channel::<Msg>(1);
        let (path, key, stat, sha, pipeline, roots) = (
            job.path.clone(),
            job.key.clone(),
            job.stat,
            job.sha256,
            self.pipeline.clone(),
            self.roots.clone(),
        );
        let producer = tokio::task::spawn_blocking(move || {
            produce(&roots, &path, &key, stat, sha, &pipeline, tx)
        });
        let finish_producer = |res: Result<std::io::Result<bool>, tokio::task::JoinError>| match res
        {
            Ok(Ok(unchanged)) => Ok(unchanged),
            Ok(Err(e)) if gone(&e) => Ok(false),
            Ok(Err(e)) => Err(read_error(job, e)),
            Err(e) => Err(StoreError::Retryable(format!("read task failed: {e}"))),
        };
        let Some(Msg::Plan(plan, mode)) = rx.recv().await else {
            drop(rx);
            return match finish_producer(producer.await)? {
                false => Ok(Step::Changed),
                true => Err(StoreError::Retryable(format!(
                    "reading {} produced no data",
                    job.path.display()
                ))),
            };
        };
        let stored_key = layout::stored_key(&job.key, plan);
        let location = self.dest.path(&stored_key)?;
        let ctx = || format!("uploading {location} to {}", self.dest.name);
        let attributes = self.attributes(plan, job, mode);
        let first = match rx.recv().await {
            Some(Msg::Data(b)) => b,
            _ => {
                drop(rx);
                return match finish_producer(producer.await)? {
                    false => Ok(Step::Changed),
                    true => Err(StoreError::Retryable(format!("{}: no data", ctx()))),
                };
            }
        };
        let mut stored_size = first.len() as u64;
        let row = |stored_size| ObjectRow {
            key: job.key.clone(),
            stored_key: stored_key.clone(),
            sha256: job.sha256,
            size: job.stat.size,
            stored_size,
            pipeline: identity.to_string(),
        };
        let second = match rx.recv().await {
            Some(Msg::Data(b)) => b,
            _ => {
                // Everything fits in one request: send it only if the file was unchanged.
                if !finish_producer(producer.await)? {
                    return Ok(Step::Changed);
                }
                self.put_single(&location, PutPayload::from_bytes(first), attributes)
                    .await
                    .map_err(|e| StoreError::classify(ctx(), &e))?;
                self.keep_local_meta(plan, job, mode, &stored_key).await?;
                return Ok(Step::Done(Method::Upload, row(stored_size)));
            }
        };
        let _slot = self.multipart_slots.acquire().await;
        stored_size += second.len() as u64;
        // Up to two parts still go up in one request: a multipart upload costs the store (and
        // us) three requests and a server-side reassembly, for the same memory.
        let third = match rx.recv().await {
            Some(Msg::Data(b)) => b,
            _ => {
                if !finish_producer(producer.await)? {
                    return Ok(Step::Changed);
                }
                self.put_single(
                    &location,
                    PutPayload::from_iter([first, second]),
                    attributes,
                )
                .await
                .map_err(|e| StoreError::classify(ctx(), &e))?;
                self.keep_local_meta(plan, job, mode, &stored_key).await?;
                return Ok(Step::Done(Method::Upload, row(stored_size)));
            }
        };
        let opts = PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let upload = match self.dest.store.put_multipart_opts(&location, opts).await {
            Ok(u) => u,
            Err(e) => {
                drop(rx);
                let _ = producer.await;
                return Err(StoreError::classify(ctx(), &e));
            }
        };
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        stored_size += third.len() as u64;
        for part in [first, second, third] {
            self.throttle(part.len()).await;
            writer.put(part);
        }
        let sent: Result<(), StoreError> = loop {
            if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
                break Err(StoreError::classify(ctx(), &e));
            }
            match rx.recv().await {
                Some(Msg::Data(b)) => {
                    stored_size += b.len() as u64;
                    self.throttle(b.len()).await;
                    writer.put(b);
                }
                _ => break Ok(()),
            }
        };
        drop(rx);
        let unchanged = finish_producer(producer.await);
        match (sent, unchanged) {
            (Ok(()), Ok(true)) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| StoreError::classify(ctx(), &e))?;
                self.stats.bytes.fetch_add(stored_size, Ordering::Relaxed);
                self.keep_local_meta(plan, job, mode, &stored_key).await?;
                Ok(Step::Done(Method::Upload, row(stored_size)))
            }
            (sent, unchanged) => {
                // Never commit: the object stays invisible.
                let _ = writer.abort().await;
                sent?;
                unchanged?;
                Ok(Step::Changed)
            }
        }
    }
}

fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || e.kind() == std::io::ErrorKind::InvalidInput
        || matches!(
            e.raw_os_error(),
            Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV)
        )
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
