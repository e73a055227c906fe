//! The byte transfer of one upload, apart from the queue's bookkeeping: a blocking thread reads
//! the file once through the pipeline (hash, compress, encrypt), cutting the output into parts;
//! the async side sends them to the store within the bandwidth caps.
//!
//! The one policy decision lives in [`send`]: output of up to two parts goes up in a single
//! PUT, anything longer as a multipart upload with a few parts in flight. Nothing is committed
//! unless the file read was still the indexed content from its first byte to its last.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit, mpsc};

use crate::destination::{Destination, StoreError};
use crate::format::layout;
use crate::format::layout::Plan;
use crate::format::metadata;
use crate::index::{Job, Stat};
use crate::pipeline::{self, Finish, Meta, Pipeline};
use crate::scan::Root;
use crate::throttle::Limiter;

/// Size of each multipart part; output of up to two parts goes up in a single PUT.
pub(super) const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts in flight per multipart upload.
const PART_CONCURRENCY: usize = 2;
/// Parts that go up in one request: a multipart upload costs the store (and us) three requests
/// and a server-side reassembly, for the same memory.
const SINGLE_PUT_PARTS: usize = 2;

/// How one transfer ended.
pub(super) enum Transferred {
    /// The object is committed at `stored_key`.
    Stored {
        /// How it was encoded.
        plan: Plan,
        /// The file's permission bits, as read.
        mode: u32,
        /// The key it is stored under (relative to the destination's base).
        stored_key: String,
        /// Bytes stored.
        stored_size: u64,
    },
    /// The file vanished or is no longer the indexed content; nothing was committed.
    Changed,
}

/// Where a transfer's object goes.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// At the file's own key (`layout = "path"`).
    Path,
    /// As the blob `name` of `namespace` (`layout = "content"`): bound to its blob key; its
    /// record names no path, mode or mtime (those are the pointers').
    Blob {
        /// The blob namespace (`sha256`, `key-<id>`).
        namespace: String,
        /// The blob's name.
        name: String,
    },
}

impl Target {
    /// The stored key of `logical`'s object encoded as `plan`.
    fn stored_key(&self, logical: &str, plan: Plan) -> String {
        match self {
            Target::Path => layout::stored_key(logical, plan),
            Target::Blob { namespace, name } => {
                crate::format::pointer::blob_key(namespace, name, plan)
            }
        }
    }

    /// What an encrypted object at `stored_key` is bound to.
    fn binding(&self, stored_key: &str) -> String {
        match self {
            Target::Path => stored_key.to_string(),
            Target::Blob { .. } => crate::crypto::blob_binding(stored_key),
        }
    }

    /// The metadata record of an encrypted object.
    fn record(&self, key: &str, stat: Stat, sha: [u8; 32], mode: u32) -> Meta {
        match self {
            Target::Path => Meta {
                size: stat.size,
                mtime_ns: stat.mtime_ns,
                sha256: hex::encode(sha),
                mode: Some(mode),
                path: Some(key.to_string()),
            },
            Target::Blob { .. } => Meta {
                size: stat.size,
                mtime_ns: 0,
                sha256: hex::encode(sha),
                mode: None,
                path: None,
            },
        }
    }
}

/// What a transfer sends through: the destination, the caps and the counters.
pub(super) struct Link<'a> {
    /// Where the object goes.
    pub dest: &'a Destination,
    /// The agent-wide bandwidth cap, besides the destination's own.
    pub global_limit: Option<&'a Limiter>,
    /// Bounds how many multipart uploads (each holding a few parts in memory) run at once.
    pub multipart_slots: &'a Semaphore,
    /// Counts bytes sent.
    pub bytes: &'a AtomicU64,
    /// Counts time spent waiting on the caps.
    pub metrics: &'a crate::metrics::Metrics,
}

/// What flows from the reading thread to the sending task.
enum Msg {
    /// How the file is encoded, its permission bits, and the first part of the output. One
    /// message, so that a small file (one part) crosses to the sending task once and its
    /// reader never waits on the channel.
    Start(Plan, u32, Bytes),
    /// Every further part.
    Data(Bytes),
}

/// Read `job`'s file through `pipeline` and store the result. One exit per outcome: stored,
/// changed (nothing committed) or an error to retry or give up on.
pub(super) async fn send(
    link: &Link<'_>,
    job: &Job,
    roots: Arc<Vec<Root>>,
    pipeline: Arc<Pipeline>,
    target: Target,
) -> Result<Transferred, StoreError> {
    let mut reader = Reader::spawn(job, roots, pipeline, target.clone());
    let Some(Msg::Start(plan, mode, first)) = reader.rx.recv().await else {
        return match reader.finish(job).await? {
            false => Ok(Transferred::Changed),
            true => Err(StoreError::Retryable(format!(
                "reading {} produced no data",
                job.path.display()
            ))),
        };
    };
    let stored_key = target.stored_key(&job.key, plan);
    let location = link.dest.path(&stored_key)?;
    let attributes = attributes(link.dest, plan, job, mode, &target);
    // Held until the end when the output filled two parts, even if it goes up in one PUT.
    let (head, slot) = gather_head(link, &mut reader.rx, first).await;
    let stored_size = if head.len() <= SINGLE_PUT_PARTS {
        // Everything fits in one request: send it only if the file was unchanged.
        if !reader.finish(job).await? {
            return Ok(Transferred::Changed);
        }
        put_single(link, &location, head, attributes).await?
    } else {
        let multipart = put_multipart(link, job, &location, attributes, head, reader, slot);
        match multipart.await? {
            Some(stored_size) => stored_size,
            None => return Ok(Transferred::Changed),
        }
    };
    Ok(Transferred::Stored {
        plan,
        mode,
        stored_key,
        stored_size,
    })
}

/// The reading side of one transfer: the blocking task that reads and encodes the file, and
/// the channel its parts arrive on.
struct Reader {
    /// The parts, in order; the first is a [`Msg::Start`].
    rx: mpsc::Receiver<Msg>,
    /// The producer; `true` if it read the indexed content to its end.
    task: tokio::task::JoinHandle<std::io::Result<bool>>,
}

impl Reader {
    /// Start reading `job`'s file through `pipeline` on a blocking thread.
    fn spawn(job: &Job, roots: Arc<Vec<Root>>, pipeline: Arc<Pipeline>, target: Target) -> Self {
        let (tx, rx) = mpsc::channel::<Msg>(1);
        let (path, key, stat, sha) = (job.path.clone(), job.key.clone(), job.stat, job.sha256);
        let task = tokio::task::spawn_blocking(move || {
            let file = FileJob {
                path: &path,
                key: &key,
                stat,
                sha,
            };
            produce(&roots, file, &pipeline, &target, tx)
        });
        Self { rx, task }
    }

    /// Whether the producer read the indexed content to its end (the channel is dropped first,
    /// so the producer never waits on a full channel).
    async fn finish(self, job: &Job) -> Result<bool, StoreError> {
        drop(self.rx);
        match self.task.await {
            Ok(Ok(unchanged)) => Ok(unchanged),
            Ok(Err(e)) if gone(&e) => Ok(false),
            Ok(Err(e)) => Err(read_error(job, e)),
            Err(e) => Err(StoreError::Retryable(format!("read task failed: {e}"))),
        }
    }
}

/// A multipart slot as `Semaphore::acquire` returns it: only held, never inspected.
type Slot<'a> = Result<SemaphorePermit<'a>, AcquireError>;

/// Gather parts after `first` until the output is known to need a multipart upload (more than
/// [`SINGLE_PUT_PARTS`]) or ends; from the second part on, a multipart slot is held.
async fn gather_head<'a>(
    link: &Link<'a>,
    rx: &mut mpsc::Receiver<Msg>,
    first: Bytes,
) -> (Vec<Bytes>, Option<Slot<'a>>) {
    let mut head: Vec<Bytes> = Vec::with_capacity(SINGLE_PUT_PARTS + 1);
    head.push(first);
    let mut slot = None;
    while head.len() <= SINGLE_PUT_PARTS {
        if head.len() == SINGLE_PUT_PARTS {
            // Holding two parts: from here on this counts as a multipart upload's memory.
            slot = Some(link.multipart_slots.acquire().await);
        }
        match rx.recv().await {
            Some(Msg::Data(b)) => head.push(b),
            _ => break,
        }
    }
    (head, slot)
}

/// What a store error is about: the object and the destination.
fn upload_context(link: &Link<'_>, location: &ObjectPath) -> String {
    format!("uploading {location} to {}", link.dest.name)
}

/// Store the whole output (`head`) in one PUT; the bytes stored.
async fn put_single(
    link: &Link<'_>,
    location: &ObjectPath,
    head: Vec<Bytes>,
    attributes: Attributes,
) -> Result<u64, StoreError> {
    let stored_size: u64 = head.iter().map(|b| b.len() as u64).sum();
    let payload = PutPayload::from_iter(head);
    throttle(link, payload.content_length()).await;
    let opts = PutOptions {
        attributes,
        ..Default::default()
    };
    link.dest
        .store
        .put_opts(location, payload, opts)
        .await
        .map_err(|e| StoreError::classify(upload_context(link, location), &e))?;
    link.bytes.fetch_add(stored_size, Ordering::Relaxed);
    Ok(stored_size)
}

/// Store the output as a multipart upload: `head`, then the rest as it is read, a few parts in
/// flight. Committed only if all was sent and the file was unchanged: the bytes stored, or
/// `None` when the file changed (the upload is aborted).
async fn put_multipart(
    link: &Link<'_>,
    job: &Job,
    location: &ObjectPath,
    attributes: Attributes,
    head: Vec<Bytes>,
    mut reader: Reader,
    slot: Option<Slot<'_>>,
) -> Result<Option<u64>, StoreError> {
    let mut stored_size: u64 = head.iter().map(|b| b.len() as u64).sum();
    let opts = PutMultipartOptions {
        attributes,
        ..Default::default()
    };
    let upload = match link.dest.store.put_multipart_opts(location, opts).await {
        Ok(u) => u,
        Err(e) => {
            let _ = reader.finish(job).await;
            return Err(StoreError::classify(upload_context(link, location), &e));
        }
    };
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    for part in head {
        throttle(link, part.len()).await;
        writer.put(part);
    }
    let sent: Result<(), StoreError> = loop {
        if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
            break Err(StoreError::classify(upload_context(link, location), &e));
        }
        match reader.rx.recv().await {
            Some(Msg::Data(b)) => {
                stored_size += b.len() as u64;
                throttle(link, b.len()).await;
                writer.put(b);
            }
            _ => break Ok(()),
        }
    };
    let unchanged = reader.finish(job).await;
    drop(slot);
    match (sent, unchanged) {
        (Ok(()), Ok(true)) => {
            writer
                .finish()
                .await
                .map_err(|e| StoreError::classify(upload_context(link, location), &e))?;
            link.bytes.fetch_add(stored_size, Ordering::Relaxed);
            Ok(Some(stored_size))
        }
        (sent, unchanged) => {
            // Never commit: the object stays invisible.
            let _ = writer.abort().await;
            sent?;
            unchanged?;
            Ok(None)
        }
    }
}

/// Wait for the destination's and the agent's bandwidth caps before sending `bytes`.
async fn throttle(link: &Link<'_>, bytes: usize) {
    let mut waited = std::time::Duration::ZERO;
    for limiter in [link.dest.limiter.as_deref(), link.global_limit]
        .into_iter()
        .flatten()
    {
        waited += limiter.acquire(bytes as u64).await;
    }
    if !waited.is_zero() {
        link.metrics.throttled(&link.dest.name, waited);
    }
}

/// Content-Type, Content-Encoding and, for unencrypted objects only, the original's hash,
/// size, mtime, mode and (when shortened) full name, which `restore` checks and applies.
/// Encrypted objects carry these inside.
fn attributes(dest: &Destination, plan: Plan, job: &Job, mode: u32, target: &Target) -> Attributes {
    let mut attrs = Attributes::new();
    if !dest.supports_attributes {
        return attrs;
    }
    attrs.insert(Attribute::ContentType, plan.content_type(&job.path).into());
    if let Some(enc) = plan.content_encoding() {
        attrs.insert(Attribute::ContentEncoding, enc.into());
    }
    if plan.encrypt {
        return attrs;
    }
    let mut meta = |k: &'static str, v: String| {
        attrs.insert(Attribute::Metadata(k.into()), v.into());
    };
    meta(metadata::SHA256, hex::encode(job.sha256));
    meta(metadata::SIZE, job.stat.size.to_string());
    if let Target::Blob { .. } = target {
        // A blob is shared by files of any mtime and mode: those are in the pointers.
        return attrs;
    }
    meta(metadata::MTIME_NS, job.stat.mtime_ns.to_string());
    meta(metadata::MODE, format!("{mode:o}"));
    if layout::parse(&layout::stored_key(&job.key, plan)).long {
        // Header values are ASCII: the name as hex.
        meta(
            metadata::LONG_NAME,
            hex::encode(layout::file_name(&job.key)),
        );
    }
    attrs
}

/// The end of the encoding chain: cuts the output into parts and hands them to the sender.
struct ChunkSink {
    tx: mpsc::Sender<Msg>,
    buf: Vec<u8>,
    /// The plan and mode, until the first part carries them.
    start: Option<(Plan, u32)>,
}

impl ChunkSink {
    fn send(&mut self) -> std::io::Result<()> {
        // The next buffer is allocated by the next write, if any.
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let msg = match self.start.take() {
            Some((plan, mode)) => Msg::Start(plan, mode, data),
            None => Msg::Data(data),
        };
        self.tx
            .blocking_send(msg)
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
        if !self.buf.is_empty() || self.start.is_some() {
            self.send()?;
        }
        Ok(())
    }
}

/// The file a transfer reads, as the index has it.
#[derive(Clone, Copy)]
struct FileJob<'a> {
    path: &'a Path,
    key: &'a str,
    stat: Stat,
    sha: [u8; 32],
}

/// The file of `job`, opened through its root and still the indexed file, with its first
/// block read: `None` when it is gone or replaced. Blocking.
fn open_probed(
    roots: &[Root],
    path: &Path,
    stat: Stat,
) -> std::io::Result<Option<(std::fs::File, Vec<u8>)>> {
    // Opened through its root's handle, never through a symlink; a path that no longer lies
    // in any root (a watch removed on reload) is gone.
    let Some(root) = crate::scan::root_of(roots, path).map(|i| &roots[i]) else {
        return Ok(None);
    };
    let (mut file, now) = match root.open_file(path) {
        Ok(x) => x,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !now.same_file(&stat) {
        return Ok(None);
    }
    // One byte more than the file's size is enough to see its end (no zeroed 64 KiB per file).
    let probe = (stat.size as usize)
        .saturating_add(1)
        .min(pipeline::PROBE_BLOCK);
    let mut first = vec![0u8; probe];
    let n = read_full(&mut file, &mut first)?;
    first.truncate(n);
    Ok(Some((file, first)))
}

/// How `job`'s file would be encoded, and its permission bits, from its first block (the
/// content layout names the blob before reading the rest): `None` when the file is gone or
/// replaced. Blocking.
pub(super) fn probe_plan(
    roots: &[Root],
    job: &Job,
    pipeline: &Pipeline,
) -> Result<Option<(Plan, u32)>, StoreError> {
    let opened = match open_probed(roots, &job.path, job.stat) {
        Ok(o) => o,
        Err(e) if gone(&e) => None,
        Err(e) => return Err(read_error(job, e)),
    };
    let Some((file, first)) = opened else {
        return Ok(None);
    };
    let mode = file
        .metadata()
        .map_err(|e| read_error(job, e))?
        .permissions();
    let mode = std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777;
    Ok(Some((pipeline.plan(&job.path, &first), mode)))
}

/// Read, verify and encode a file into `tx`. `Ok(false)`: the file is gone or is no longer the
/// indexed content, and nothing may be committed. Blocking.
fn produce(
    roots: &[Root],
    job: FileJob<'_>,
    pipeline: &Pipeline,
    target: &Target,
    tx: mpsc::Sender<Msg>,
) -> std::io::Result<bool> {
    let FileJob {
        path,
        key,
        stat,
        sha,
    } = job;
    let Some((mut file, first)) = open_probed(roots, path, stat)? else {
        return Ok(false);
    };
    let plan = pipeline.plan(path, &first);
    let mode = std::os::unix::fs::PermissionsExt::mode(&file.metadata()?.permissions()) & 0o7777;
    // Small files (most of a CI tree) get a buffer of their size, not a whole part.
    let expected = (stat.size as usize)
        .saturating_add(64 * 1024)
        .min(PART_SIZE);
    let sink = ChunkSink {
        tx,
        buf: Vec::with_capacity(expected),
        start: Some((plan, mode)),
    };
    let record = target.record(key, stat, sha, mode);
    let stored_key = target.stored_key(key, plan);
    let bound = target.binding(&stored_key);
    let mut out = pipeline::encoder(pipeline, plan, &record, &bound, Box::new(sink))?;
    // Hash and encode the whole file in one read: the probed first block, then the rest.
    let (digest, total) =
        pipeline::copy_hashed(&mut std::io::Cursor::new(first).chain(&mut file), &mut out)?;
    let unchanged =
        digest == sha && total == stat.size && Stat::of(&file.metadata()?).same_file(&stat);
    out.finish()?;
    Ok(unchanged)
}

/// Whether a read error means the file is gone (or was swapped for something we refuse to
/// follow): the path goes back to ingest instead of failing.
pub(super) fn gone(e: &std::io::Error) -> bool {
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
