//! Tailing growing files: while a file matching a watch's `tail` globs grows, every
//! `tail_interval` the bytes it gained since its last segment become one segment object
//! (`format::segment`), made durable in each destination through the pipeline (compressed,
//! encrypted and bound to the segment's own key); the index records how far each
//! destination's segments reach only after they are durable (`tails`, migration 9).
//!
//! - The watcher tells the [`Tracker`] which tailed files changed; a file seen growing for an
//!   interval gets its first segment (one written and closed sooner is stored whole, with
//!   none); at start the files with rows in the index are looked at again, so a restart
//!   continues at the last durable offset and sends no byte twice.
//! - A generation is one run of content: a file that shrank, changed its first bytes or is
//!   another file (inode) begins a new one; the old one is closed, and the file now holding
//!   its bytes (a rotated copy, the renamed file: its *successor*, found in the same
//!   directory) is remembered.
//! - When the settled file is stored in a destination as it is now (the upload worker's
//!   ordinary path), that destination's segments of the generation are deleted, then its row;
//!   a closed generation's segments go once its successor is stored (or, without one, once
//!   the file is).
//! - Each segment is at most [`SEGMENT_MAX`] bytes, read with `pread` and encoded in memory
//!   one at a time: memory stays bounded whatever the writer's rate, and a log written a line
//!   at a time costs one PUT per interval per destination.
//! - Destinations are independent: each has its own rows, and one that fails is retried
//!   with a backoff while the others go on.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use object_store::{ObjectStoreExt, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::destination::Destination;
use crate::format::layout::Plan;
use crate::format::segment::{self, SegmentKey};
use crate::format::units::{now_ms, retry_delay};
use crate::index::{FlushState, Index, Stat, TailRow};
use crate::pipeline::{Meta, PROBE_BLOCK, Pipeline};
use crate::scan::{self, Root};

/// The largest segment: a faster writer makes several per interval.
use crate::format::segment::MAX_SEGMENT as SEGMENT_MAX;
/// How many first bytes of a file identify its content across looks.
const HEAD: u64 = 4096;

/// The tailed files that changed since the tail task last looked; the watcher adds to it
/// without ever blocking on the task.
#[derive(Clone, Default)]
pub(crate) struct Tracker {
    grown: Arc<Mutex<HashMap<PathBuf, usize>>>,
    wake: Arc<Notify>,
}

impl Tracker {
    /// The file at `path` (of root `root`) changed.
    pub(crate) fn grew(&self, path: PathBuf, root: usize) {
        let fresh = self
            .grown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path, root)
            .is_none();
        if fresh {
            self.wake.notify_one();
        }
    }

    fn take(&self) -> HashMap<PathBuf, usize> {
        std::mem::take(&mut *self.grown.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Whether any root tails files (else no tail task runs).
pub(crate) fn wanted(roots: &[Root]) -> bool {
    roots.iter().any(|r| !r.tail.is_empty())
}

/// The tail task's parts.
pub(crate) struct TailTask {
    /// The index (tail rows, and what is stored).
    pub index: Arc<Index>,
    /// The watched roots.
    pub roots: Arc<Vec<Root>>,
    /// The destinations, each tailed on its own.
    pub dests: Vec<Destination>,
    /// How segments are encoded.
    pub pipeline: Arc<Pipeline>,
    /// Where the watcher reports changes.
    pub tracker: Tracker,
}

/// One file being followed.
struct Followed {
    root: usize,
    /// Per destination, when it may be tried again after a failure, and how many failures.
    retry: HashMap<usize, (Instant, i64)>,
    /// When it was first seen changing (a file written and closed within one interval is
    /// stored whole before it gets a segment).
    since: Instant,
}

impl TailTask {
    /// Follow growing files until `cancel`.
    pub(crate) async fn run(self, cancel: CancellationToken) -> &'static str {
        let interval = self
            .roots
            .iter()
            .filter(|r| !r.tail.is_empty())
            .map(|r| r.tail_interval)
            .min()
            .unwrap_or(Duration::from_secs(2));
        let mut followed: HashMap<PathBuf, Followed> = HashMap::new();
        match self.index.call(|i| i.tails()).await {
            Ok(rows) => {
                for row in rows {
                    if let Some(root) = scan::root_of(&self.roots, &row.path) {
                        // Followed before the restart: no wait for its next segment.
                        followed.entry(row.path).or_insert(Followed {
                            root,
                            retry: HashMap::new(),
                            since: Instant::now()
                                .checked_sub(interval)
                                .unwrap_or_else(Instant::now),
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the tailed files from the index")
            }
        }
        loop {
            for (path, root) in self.tracker.take() {
                followed.entry(path).or_insert(Followed {
                    root,
                    retry: HashMap::new(),
                    since: Instant::now(),
                });
            }
            let paths: Vec<PathBuf> = followed.keys().cloned().collect();
            for path in paths {
                if cancel.is_cancelled() {
                    return "tail";
                }
                let Some(f) = followed.get_mut(&path) else {
                    continue;
                };
                // A store that hangs never holds the shutdown: a segment cut off here was not
                // recorded, and is sent again under the same key.
                let keep = tokio::select! {
                    _ = cancel.cancelled() => return "tail",
                    keep = self.follow(&path, f, &cancel) => keep,
                };
                if !keep {
                    followed.remove(&path);
                }
            }
            let idle = followed.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => return "tail",
                _ = tokio::time::sleep(interval), if !idle => {}
                _ = self.tracker.wake.notified(), if idle => {}
            }
        }
    }

    /// One look at `path` for every destination; false once nothing is left to follow.
    async fn follow(&self, path: &Path, f: &mut Followed, cancel: &CancellationToken) -> bool {
        let mut more = false;
        for (d, dest) in self.dests.iter().enumerate() {
            if f.retry.get(&d).is_some_and(|(at, _)| Instant::now() < *at) {
                more = true;
                continue;
            }
            let root = &self.roots[f.root];
            let step = Step {
                task: self,
                root,
                path,
                dest,
                cancel,
                young: f.since.elapsed() < root.tail_interval,
            };
            match step.run().await {
                Ok(follow) => {
                    f.retry.remove(&d);
                    more |= follow;
                }
                Err(e) => {
                    let attempts = f.retry.get(&d).map_or(1, |(_, n)| n + 1);
                    let wait =
                        retry_delay(attempts, Duration::from_secs(1), Duration::from_secs(60));
                    tracing::warn!(
                        path = %path.display(),
                        dest = %dest.name,
                        error = %format!("{e:#}"),
                        retry_in_ms = wait.as_millis() as u64,
                        "tailing a growing file failed"
                    );
                    f.retry.insert(d, (Instant::now() + wait, attempts));
                    more = true;
                }
            }
        }
        more
    }
}

/// The file as one look found it.
struct Look {
    file: Arc<std::fs::File>,
    stat: Stat,
}

/// One file in one destination, one look.
struct Step<'a> {
    task: &'a TailTask,
    root: &'a Root,
    path: &'a Path,
    dest: &'a Destination,
    cancel: &'a CancellationToken,
    /// Seen growing for less than an interval: no new generation begins yet.
    young: bool,
}

impl Step<'_> {
    /// Close what changed, send what grew, let go of what is stored; true while the file is
    /// still to be followed.
    async fn run(&self) -> anyhow::Result<bool> {
        let index = &self.task.index;
        let (path, dest_name) = (self.path.to_path_buf(), self.dest.name.clone());
        let rows = index
            .call(move |i| i.tails_of(&path))
            .await?
            .into_iter()
            .filter(|r| r.dest == dest_name)
            .collect::<Vec<_>>();
        let look = self.look().await?;
        let mut open = rows.iter().find(|r| !r.closed).cloned();
        if let Some(row) = open.take() {
            match &look {
                Some(l) if self.same_content(&row, l).await? => open = Some(row),
                _ => self.close(row, look.as_ref()).await?,
            }
        }
        let stored = match &look {
            Some(l) => self.stored(l.stat).await?,
            None => false,
        };
        // Closed generations first: their segments go once their bytes are stored elsewhere.
        // `left`: one waits for a file that may still be stored (its successor, or this one).
        let mut left = false;
        let path = self.path.to_path_buf();
        let dest_name = self.dest.name.clone();
        let closed = index
            .call(move |i| i.tails_of(&path))
            .await?
            .into_iter()
            .filter(|r| r.dest == dest_name && r.closed);
        for row in closed {
            if self.closed_is_covered(&row, stored).await? {
                self.remove(&row).await?;
            } else {
                left |= row.successor.is_some() || look.is_some();
            }
        }
        let Some(look) = look else {
            // Gone: nothing more grows here; followed while a closed generation waits for its
            // successor. One with none keeps its segments (the only copy of those bytes) and
            // is looked at again after a restart.
            return Ok(left);
        };
        if stored {
            // The settled object holds everything the open generation's segments hold.
            if let Some(row) = open {
                self.remove(&row).await?;
            }
            return Ok(left);
        }
        let row = match open {
            Some(row) => row,
            // Written and closed within an interval, it is stored whole, with no segment.
            None if self.young => return Ok(true),
            None => {
                let logical = match self.root.key_for(self.path) {
                    Ok(k) if segment::tailable(&k) => k,
                    // Its name cannot be a segment's: stored once settled, as before.
                    _ => return Ok(left),
                };
                match self.begin(&look, logical).await? {
                    Some(row) => row,
                    None => return Ok(true),
                }
            }
        };
        self.send(row, &look).await?;
        Ok(true)
    }

    /// Open the file through its root; `None` when it is gone (or no longer a regular file).
    async fn look(&self) -> anyhow::Result<Option<Look>> {
        let root = self.root.clone();
        let path = self.path.to_path_buf();
        tokio::task::spawn_blocking(move || match root.open_file(&path) {
            Ok((file, stat)) => Ok(Some(Look {
                file: Arc::new(file),
                stat,
            })),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("opening {}", path.display()))),
        })
        .await?
    }

    /// Whether the file is still the content `row`'s segments hold the start of.
    async fn same_content(&self, row: &TailRow, look: &Look) -> anyhow::Result<bool> {
        if (look.stat.inode, look.stat.dev) != (row.inode, row.dev) || look.stat.size < row.end {
            return Ok(false);
        }
        let (file, len, path) = (look.file.clone(), row.head_len, self.path.to_path_buf());
        let head = tokio::task::spawn_blocking(move || head_of(&file, len, &path)).await??;
        Ok(head == row.head)
    }

    /// Whether the file as `stat` is stored in this destination (its settled object there).
    async fn stored(&self, stat: Stat) -> anyhow::Result<bool> {
        let path = self.path.to_path_buf();
        let dests = vec![self.dest.name.clone()];
        let state = self
            .task
            .index
            .call(move |i| i.is_stored_many(&[(path, stat)], &dests))
            .await?;
        Ok(matches!(state.first(), Some(FlushState::Stored(_))))
    }

    /// End `row`'s generation: the file was truncated, rewritten, replaced or removed. Its
    /// bytes may live on in a file beside it (rotation): remember that one.
    async fn close(&self, mut row: TailRow, look: Option<&Look>) -> anyhow::Result<()> {
        let root = self.root.clone();
        let (path, probe) = (self.path.to_path_buf(), row.clone());
        let now = look.map(|l| (l.stat.inode, l.stat.dev));
        let successor =
            tokio::task::spawn_blocking(move || successor_of(&root, &path, &probe, now)).await?;
        tracing::info!(
            path = %self.path.display(),
            dest = %self.dest.name,
            generation = row.generation,
            durable = row.end,
            successor = ?successor.as_ref().map(|p| p.display().to_string()),
            "a tailed file was truncated or replaced; its segments so far are kept until stored elsewhere"
        );
        row.closed = true;
        row.successor = successor;
        self.task.index.call(move |i| i.put_tail(&row)).await
    }

    /// Whether a closed generation's bytes are stored in a settled object: its successor's,
    /// or (without a successor) the file's own, now `stored`.
    async fn closed_is_covered(&self, row: &TailRow, stored: bool) -> anyhow::Result<bool> {
        let Some(successor) = row.successor.clone() else {
            return Ok(stored);
        };
        let dest = self.dest.name.clone();
        let probe = successor.clone();
        let version = self
            .task
            .index
            .call(move |i| i.stored_version(&probe, &dest))
            .await?;
        if let Some(v) = version {
            return Ok(v.size >= row.end);
        }
        // Neither stored nor on disk any more: deleted before it could be; the segments are
        // all that is left of those bytes, and stay.
        Ok(false)
    }

    /// Start following a file with no open generation here: after the part its stored object
    /// already holds, when the file only grew since (checked against the object's SHA-256);
    /// `None` when there is nothing to send yet.
    async fn begin(&self, look: &Look, logical: String) -> anyhow::Result<Option<TailRow>> {
        let (path, dest) = (self.path.to_path_buf(), self.dest.name.clone());
        let (version, rows) = self
            .task
            .index
            .call(move |i| Ok((i.stored_version(&path, &dest)?, i.tails_of(&path)?)))
            .await?;
        let mut start = 0;
        if let Some(v) = version
            && v.inode == look.stat.inode
            && v.size <= look.stat.size
        {
            let (file, path) = (look.file.clone(), self.path.to_path_buf());
            let prefix =
                tokio::task::spawn_blocking(move || sha256_of_prefix(&file, v.size, &path))
                    .await??;
            if prefix == v.sha256 {
                start = v.size;
            }
        }
        if look.stat.size <= start {
            return Ok(None);
        }
        let newest = rows.iter().map(|r| r.generation).max().unwrap_or(0);
        Ok(Some(TailRow {
            path: self.path.to_path_buf(),
            dest: self.dest.name.clone(),
            generation: (now_ms().max(0) as u64).max(newest + 1),
            logical,
            start,
            end: start,
            seq: 0,
            inode: look.stat.inode,
            dev: look.stat.dev,
            head_len: 0,
            head: Sha256::digest([]).into(),
            closed: false,
            successor: None,
        }))
    }

    /// Send what the file gained since `row.end` as segments of at most [`SEGMENT_MAX`]
    /// bytes, each durable before its row says so.
    async fn send(&self, mut row: TailRow, look: &Look) -> anyhow::Result<()> {
        while row.end < look.stat.size && !self.cancel.is_cancelled() {
            let len = (look.stat.size - row.end).min(SEGMENT_MAX);
            let seg = SegmentKey {
                logical: row.logical.clone(),
                generation: row.generation,
                seq: row.seq,
                offset: row.end,
                plan: Plan::STORED,
            };
            let encoded = self.encode(seg, look, len).await?;
            let Some(Encoded {
                key,
                body,
                plan,
                meta,
                head,
            }) = encoded
            else {
                // The file shrank under us: the next look closes the generation.
                return Ok(());
            };
            let body_len = body.len();
            self.put(&key, body, plan, &meta).await?;
            tracing::debug!(
                path = %self.path.display(),
                dest = %self.dest.name,
                key = %key,
                offset = row.end,
                bytes = len,
                stored_bytes = body_len,
                "segment stored"
            );
            row.end += len;
            row.seq += 1;
            if row.head_len < HEAD {
                row.head_len = row.end.min(HEAD);
                row.head = head;
            }
            let r = row.clone();
            self.task.index.call(move |i| i.put_tail(&r)).await?;
        }
        Ok(())
    }

    /// Read `len` bytes at `seg.offset` and encode them; `None` when fewer are there.
    async fn encode(
        &self,
        mut seg: SegmentKey,
        look: &Look,
        len: u64,
    ) -> anyhow::Result<Option<Encoded>> {
        let pipeline = self.task.pipeline.clone();
        let (file, stat, path) = (look.file.clone(), look.stat, self.path.to_path_buf());
        tokio::task::spawn_blocking(move || {
            let mut bytes = vec![0u8; len as usize];
            match file.read_exact_at(&mut bytes, seg.offset) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "reading {} at {}",
                        path.display(),
                        seg.offset
                    )));
                }
            }
            let first = &bytes[..bytes.len().min(PROBE_BLOCK)];
            seg.plan = pipeline.plan(&path, first);
            let key = seg.key();
            let meta = Meta {
                size: len,
                mtime_ns: stat.mtime_ns,
                sha256: hex::encode(Sha256::digest(&bytes)),
                mode: Some(stat.mode),
                path: Some(seg.logical.clone()),
            };
            let body = crate::pipeline::encode_bytes(
                &pipeline,
                seg.plan,
                &meta,
                &segment::binding(&key),
                &bytes,
            )
            .with_context(|| format!("encoding segment {key}"))?;
            let head_len = (seg.offset + len).min(HEAD);
            let head = head_of(&file, head_len, &path)?;
            Ok(Some(Encoded {
                key,
                body,
                plan: seg.plan,
                meta,
                head,
            }))
        })
        .await?
    }

    /// PUT one segment and make it durable.
    async fn put(&self, key: &str, body: Vec<u8>, plan: Plan, meta: &Meta) -> anyhow::Result<()> {
        let dest = self.dest;
        let location = dest.path(key)?;
        let attributes =
            crate::pipeline::object_attributes(dest.supports_attributes, plan, self.path, meta);
        let opts = PutOptions {
            attributes,
            ..Default::default()
        };
        let ticket = dest.ticket();
        dest.store
            .put_opts(&location, PutPayload::from(body), opts)
            .await
            .with_context(|| format!("storing segment {location} in {}", dest.name))?;
        dest.persist(ticket)
            .await
            .with_context(|| format!("making segment {location} durable in {}", dest.name))?;
        Ok(())
    }

    /// Delete a generation's segments from this destination, then forget it.
    async fn remove(&self, row: &TailRow) -> anyhow::Result<()> {
        let dir = segment::dir_of(&row.logical);
        let listing = self.dest.list_under(&dir).await?;
        let mut deleted = 0u64;
        for object in &listing.objects {
            let key = self.dest.relative(object.location.as_ref());
            if SegmentKey::parse(key).is_some_and(|s| s.generation == row.generation) {
                match self.dest.store.delete(&object.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => {
                        return Err(anyhow::Error::new(e).context(format!(
                            "deleting segment {} from {}",
                            object.location, self.dest.name
                        )));
                    }
                }
            }
        }
        tracing::debug!(
            path = %row.path.display(),
            dest = %self.dest.name,
            generation = row.generation,
            segments = deleted,
            "segments removed: their bytes are stored in a settled object"
        );
        let (path, dest, generation) = (row.path.clone(), row.dest.clone(), row.generation);
        self.task
            .index
            .call(move |i| i.forget_tail(&path, &dest, generation))
            .await
    }
}

/// A segment ready to store.
struct Encoded {
    key: String,
    body: Vec<u8>,
    plan: Plan,
    meta: Meta,
    /// SHA-256 of the file's first bytes (up to [`HEAD`]) as read with it.
    head: [u8; 32],
}

fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    ) || e.kind() == std::io::ErrorKind::NotFound
        || e.kind() == std::io::ErrorKind::InvalidInput
}

/// SHA-256 of the first `len` bytes of `file` (fewer if it is shorter: that hash then
/// differs, as it should).
fn head_of(file: &std::fs::File, len: u64, path: &Path) -> anyhow::Result<[u8; 32]> {
    sha256_of_prefix(file, len, path)
}

/// SHA-256 of the first `len` bytes of `file`, streamed.
fn sha256_of_prefix(file: &std::fs::File, len: u64, path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut reader = PositionalReader { file, pos: 0 }.take(len);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("reading the start of {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Reads a file from its start with `pread`, leaving any shared cursor alone.
struct PositionalReader<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The file beside `path` that holds a closed generation's bytes now: the same inode under
/// another name (renamed away), or a file at least as long that starts with the same bytes
/// (a copy made before truncation). `now` is the identity at `path` now, never a successor.
/// Blocking.
fn successor_of(
    root: &Root,
    path: &Path,
    row: &TailRow,
    now: Option<(u64, u64)>,
) -> Option<PathBuf> {
    let dir = path.parent()?;
    let mut candidates = Vec::new();
    root.walk_files(dir, &mut |p, stat| {
        if p.parent() == Some(dir) && p != path && now != Some((stat.inode, stat.dev)) {
            candidates.push((p, stat));
        }
        true
    });
    if let Some((p, _)) = candidates
        .iter()
        .find(|(_, s)| (s.inode, s.dev) == (row.inode, row.dev))
    {
        return Some(p.clone());
    }
    candidates
        .into_iter()
        .filter(|(_, s)| s.size >= row.end && row.head_len > 0)
        .find(|(p, _)| {
            root.open_file(p)
                .ok()
                .and_then(|(f, _)| head_of(&f, row.head_len, p).ok())
                == Some(row.head)
        })
        .map(|(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Encryptor, MasterKey};
    use crate::format::layout::Compression;
    use std::io::Write;

    /// The segment test vector of docs/FORMAT.md: the container of a segment's record and
    /// payload, with the fixed key, salt and nonce prefix of the container's vectors.
    fn segment_vector() -> (String, Vec<u8>) {
        let payload = b"panoptic-sync test vector\n";
        let seg = SegmentKey {
            logical: "ci/runner-17/job/test.log".into(),
            generation: 1_700_000_000_000,
            seq: 1,
            offset: 26,
            plan: Plan {
                compression: Compression::None,
                encrypt: true,
            },
        };
        let key = seg.key();
        let meta = Meta {
            size: payload.len() as u64,
            mtime_ns: 1_700_000_000_000_000_000,
            sha256: hex::encode(Sha256::digest(payload)),
            mode: Some(0o644),
            path: Some(seg.logical.clone()),
        };
        let record = serde_json::to_vec(&meta).unwrap();
        let mut plain = (record.len() as u32).to_be_bytes().to_vec();
        plain.extend_from_slice(&record);
        plain.extend_from_slice(payload);
        let master = MasterKey::from_bytes(std::array::from_fn(|i| i as u8));
        let salt: [u8; 32] = std::array::from_fn(|i| 0x20 + i as u8);
        let prefix: [u8; 7] = std::array::from_fn(|i| 0x40 + i as u8);
        let bound = segment::binding(&key);
        let mut e =
            Encryptor::with_parameters(&master, salt, prefix, Some(&bound), Vec::new()).unwrap();
        e.write_all(&plain).unwrap();
        (key, e.finish().unwrap())
    }

    #[test]
    fn format_md_segment_vector_holds() {
        let (key, object) = segment_vector();
        let doc = include_str!("../docs/FORMAT.md");
        let hex = hex::encode(&object);
        assert!(doc.contains(&key), "docs/FORMAT.md lacks the key {key}");
        assert!(
            doc.contains(&hex),
            "docs/FORMAT.md lacks the segment vector {hex}"
        );
        // It reads back only as that segment.
        let master = MasterKey::from_bytes(std::array::from_fn(|i| i as u8));
        let plan = SegmentKey::parse(&key).unwrap().plan;
        let (mut r, meta) = crate::pipeline::segment_decoder(
            plan,
            std::slice::from_ref(&master),
            &key,
            &object[..],
        )
        .unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"panoptic-sync test vector\n");
        assert_eq!(
            meta.unwrap().path.as_deref(),
            Some("ci/runner-17/job/test.log")
        );
        // Not as a file stored at its key.
        let as_file =
            crate::pipeline::decoder(plan, &[master], &key, &object[..]).and_then(|(mut r, _)| {
                let mut v = Vec::new();
                r.read_to_end(&mut v)
            });
        assert!(as_file.is_err());
    }
}
