//! `restore` and `verify`: objects back to files, and the index checked against a destination.
//!
//! Restore needs only the destination and the key file, never the index (the machine may be
//! gone): it lists the destination, reads each object's pipeline from its key suffixes, and
//! streams it through decrypt → decompress → hash into a temporary file beside the target,
//! which is renamed into place once the content is verified. A bad object (wrong key,
//! tampered, truncated, moved from another key, not our format, decoding past its recorded
//! size) fails alone, named; with a key configured, unencrypted objects are refused unless
//! `--allow-plaintext`. Nothing is ever written outside the target directory: keys with
//! `.`/`..`/empty segments are refused, and every directory and file is created relative to
//! an open directory handle, never through a symlink (`mkdirat`, `openat` with `O_NOFOLLOW`,
//! `renameat`), so swapping a directory for a symlink during the restore leads nowhere.
//! Files are 0600 until complete, then get their recorded mode and mtime.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::{Attribute, GetResult, ObjectMeta, ObjectStoreExt};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::config::{Config, ConfigError};
use crate::crypto::MasterKey;
use crate::destination::{self, Destination};
use crate::format::layout;
use crate::format::layout::{Compression, Plan};
use crate::format::metadata;
use crate::index::Index;
use crate::pipeline::{self, Pipeline};
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::os::unix::fs::PermissionsExt;

pub(crate) mod partial;

/// Keys under this prefix are the agent's own (status objects, probes), not artifacts.
/// Objects restored or verified at once: at least this many, or the destination's
/// `concurrency` when it is larger (16 by default for a cloud store; a restore is bound by
/// the round trip of each GET, as an upload by its PUT).
const CONCURRENCY: usize = 8;

/// The configured destination called `name`.
pub fn find_destination(config: &Config, name: &str) -> anyhow::Result<Destination> {
    let cfg = config
        .destinations()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = config.destinations().map(|d| d.name.as_str()).collect();
            ConfigError {
                source_name: "--from/--dest".into(),
                message: format!(
                    "no destination named {name:?}; configured: {}",
                    names.join(", ")
                ),
            }
        })?;
    Destination::open(cfg)
}

/// An object's bytes as a blocking `Read`, for the decoder running under `spawn_blocking`:
/// each read waits on the download stream through the runtime's handle.
pub(crate) type Download =
    SyncIoBridge<tokio::io::Take<StreamReader<BoxStream<'static, io::Result<Bytes>>, Bytes>>>;

/// How `restore` treats what the destination holds.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// With a key configured, restore unencrypted objects too (refused by default: anyone
    /// who can write to the bucket can plant them).
    pub allow_plaintext: bool,
    /// Never write more than this many bytes for one object (bounds objects whose size is
    /// not recorded, such as plain compressed objects in a `file://` store).
    pub max_size: Option<u64>,
}

/// The original's metadata, from inside an encrypted object, from object attributes, or
/// from the stored file of a `file://` store.
#[derive(Debug, Default, Clone)]
struct Expect {
    size: Option<u64>,
    sha256: Option<String>,
    mtime_ns: Option<i64>,
    mode: Option<u32>,
    /// The full last segment of a shortened long name.
    long_name: Option<String>,
}

fn attr_expect(get: &GetResult) -> Expect {
    let meta = |k: &'static str| {
        get.attributes
            .get(&Attribute::Metadata(k.into()))
            .map(|v| v.as_ref().to_string())
    };
    Expect {
        size: meta(metadata::SIZE).and_then(|v| v.parse().ok()),
        sha256: meta(metadata::SHA256),
        mtime_ns: meta(metadata::MTIME_NS).and_then(|v| v.parse().ok()),
        mode: meta(metadata::MODE).and_then(|v| u32::from_str_radix(&v, 8).ok()),
        long_name: meta(metadata::LONG_NAME)
            .and_then(|v| hex::decode(v).ok())
            .and_then(|v| String::from_utf8(v).ok()),
    }
}

/// Stream an object's bytes to a blocking reader. Must be called inside the runtime; the
/// reader must be used off it (`spawn_blocking`). Dropping the reader ends the download.
///
/// The reader ends after the object's listed size without waiting for the end of the body:
/// a slow decoder can keep a large download open past the client's request timeout, and
/// object_store then resumes with a Range starting at the object's end, which the server
/// refuses (400), failing an object that was read whole.
///
/// A body that fails part-way (a request outlives the client's timeout while a large object
/// is read slowly, or the connection drops) is resumed where it stopped, by a GET of the
/// rest with `If-Match` on the first answer's ETag (so a replaced object is never spliced
/// in), as often as each resume makes progress: a 4 GiB object is read in as many requests
/// as it takes, each within the timeout. [`MAX_STALLED_RESUMES`] resumes in a row without a
/// byte fail the download.
pub(crate) fn download(store: Arc<dyn object_store::ObjectStore>, get: GetResult) -> Download {
    let size = get.meta.size;
    let location = get.meta.location.clone();
    let e_tag = get.meta.e_tag.clone();
    let first = get.into_stream().map_err(io::Error::other).boxed();
    struct State {
        body: BoxStream<'static, io::Result<Bytes>>,
        offset: u64,
        stalled: u32,
    }
    let state = State {
        body: first,
        offset: 0,
        stalled: 0,
    };
    let stream = futures::stream::unfold(Some(state), move |state| {
        let (store, location, e_tag) = (store.clone(), location.clone(), e_tag.clone());
        async move {
            let mut st = state?;
            loop {
                let failure = match st.body.next().await {
                    Some(Ok(bytes)) => {
                        st.offset += bytes.len() as u64;
                        if !bytes.is_empty() {
                            st.stalled = 0;
                        }
                        return Some((Ok(bytes), Some(st)));
                    }
                    None if st.offset >= size => return None,
                    None => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the body ended after {} of {size} bytes", st.offset),
                    ),
                    Some(Err(e)) => e,
                };
                if st.stalled >= MAX_STALLED_RESUMES {
                    return Some((Err(failure), None));
                }
                st.stalled += 1;
                tracing::debug!(key = %location, offset = st.offset, error = %failure, "download interrupted; resuming");
                let opts = object_store::GetOptions {
                    range: Some(object_store::GetRange::Offset(st.offset)),
                    if_match: e_tag.clone(),
                    ..Default::default()
                };
                match store.get_opts(&location, opts).await {
                    Ok(rest) => st.body = rest.into_stream().map_err(io::Error::other).boxed(),
                    Err(e) => {
                        let e = io::Error::other(format!(
                            "resuming at byte {}: {}",
                            st.offset,
                            destination::error_chain(&e)
                        ));
                        return Some((Err(e), None));
                    }
                }
            }
        }
    })
    .boxed();
    SyncIoBridge::new(tokio::io::AsyncReadExt::take(
        StreamReader::new(stream),
        size,
    ))
}

/// Resumes of one download in a row that bring no byte before it fails.
const MAX_STALLED_RESUMES: u32 = 3;

/// Whether an encrypted record's `path` is the logical key of `stored_key` (for a shortened
/// long name: the same directory, and a last segment that hashes to the key's). A writer
/// always records its own key; a record that names another is refused (docs/FORMAT.md,
/// reader conformance).
pub(crate) fn record_path_matches(stored_key: &str, path: &str) -> bool {
    let p = layout::parse(stored_key);
    if !p.long {
        return p.logical == path;
    }
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (Some(d), n),
        None => (None, path),
    };
    let key_dir = p.logical.rsplit_once('/').map(|(d, _)| d);
    dir == key_dir && layout::long_name_matches(p.logical, name)
}

/// Whether two SHA-256 hex digests are the same (readers accept either case of hex).
pub(crate) fn same_sha256(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// An object being decoded: its plaintext reader and what it says about the original.
struct Decoding<'a> {
    reader: Box<dyn Read + 'a>,
    expect: Expect,
}

/// Start decoding an object stored under `stored_key` (relative to the destination base):
/// decrypt and read the metadata record, if any, which then replaces `expect`.
fn start_decoding<'a>(
    plan: Plan,
    keys: &[MasterKey],
    stored_key: &str,
    reader: Download,
    mut expect: Expect,
) -> io::Result<Decoding<'a>> {
    let (r, meta) = pipeline::decoder(plan, keys, stored_key, reader)?;
    if let Some(m) = meta {
        if let Some(path) = m.path.as_deref()
            && !record_path_matches(stored_key, path)
        {
            return Err(invalid(format!(
                "its record names another key ({path:?}) than the one it is stored under"
            )));
        }
        expect = Expect {
            size: Some(m.size),
            sha256: Some(m.sha256),
            mtime_ns: Some(m.mtime_ns),
            mode: m.mode,
            long_name: m
                .path
                .as_deref()
                .map(|p| p.rsplit('/').next().unwrap_or(p).to_string()),
        };
    }
    Ok(Decoding { reader: r, expect })
}

/// Copy the decoded content into `out`, never more than the recorded size or `max_size`;
/// check length and SHA-256 against what the object recorded. Returns SHA-256 and length.
fn finish_decoding(
    d: &mut Decoding<'_>,
    out: &mut dyn Write,
    max_size: Option<u64>,
) -> io::Result<([u8; 32], u64)> {
    let limit = d.expect.size.into_iter().chain(max_size).min();
    let (sha, len) = match limit {
        Some(limit) => {
            let got = pipeline::copy_hashed(&mut (&mut d.reader).take(limit), out)?;
            let mut more = [0u8; 1];
            if d.reader.read(&mut more)? > 0 {
                let why = if d.expect.size == Some(limit) {
                    "the size recorded with the object"
                } else {
                    "--max-size; for a compressed object that records no size it is 1,024 times \
                     the stored size (at least 64 MiB) unless given"
                };
                return Err(invalid(format!(
                    "decodes to more than {limit} bytes ({why}); stopped there"
                )));
            }
            got
        }
        None => pipeline::copy_hashed(&mut d.reader, out)?,
    };
    if let Some(size) = d.expect.size
        && size != len
    {
        return Err(invalid(format!(
            "decoded {len} bytes, the object says {size}"
        )));
    }
    if let Some(want) = &d.expect.sha256
        && !same_sha256(want, &hex::encode(sha))
    {
        return Err(invalid(
            "content does not match the SHA-256 recorded with the object".into(),
        ));
    }
    Ok((sha, len))
}

/// The path segments of an object key relative to the restore prefix, or why it is unsafe.
fn segments(rel_key: &str) -> Result<Vec<&str>, String> {
    let parts: Vec<&str> = rel_key.split('/').collect();
    if rel_key.is_empty()
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(format!(
            "unsafe object key {rel_key:?}: empty, \".\" or \"..\" segments are refused"
        ));
    }
    Ok(parts)
}

/// The path under `to` for an object key relative to the restore prefix, or why it is unsafe.
pub fn safe_target(to: &Path, rel_key: &str) -> Result<PathBuf, String> {
    let mut out = to.to_path_buf();
    for part in segments(rel_key)? {
        out.push(part);
    }
    if !out.starts_with(to) || out == to {
        return Err(format!("unsafe object key {rel_key:?}"));
    }
    Ok(out)
}

/// Open (creating) the directories `dirs` below the directory handle `root`, each relative
/// to the handle of its parent and never through a symlink, so that no rename or symlink
/// swapped in during the restore can lead outside `root`.
fn open_dirs(root: &OwnedFd, dirs: &[&str]) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut cur = rustix::fs::openat(root, ".", flags, Mode::empty())?;
    for (i, dir) in dirs.iter().enumerate() {
        match rustix::fs::mkdirat(&cur, *dir, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(io::Error::other(format!(
                    "creating directory {}: {e}",
                    dirs[..=i].join("/")
                )));
            }
        }
        cur = rustix::fs::openat(&cur, *dir, flags, Mode::empty()).map_err(|e| {
            let why = if e == Errno::LOOP || e == Errno::NOTDIR {
                "exists and is not a directory (symlinks are not followed)".to_string()
            } else {
                e.to_string()
            };
            io::Error::other(format!("opening directory {}: {why}", dirs[..=i].join("/")))
        })?;
    }
    Ok(cur)
}

/// A new temporary file in `dir` (a short name, exclusive, 0600, never through a symlink).
fn create_temp(dir: &OwnedFd) -> io::Result<(String, std::fs::File)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut last = Errno::EXIST;
    for _ in 0..8 {
        let name = format!(".psr-{:08x}", fastrand::u32(..));
        match rustix::fs::openat(dir, name.as_str(), flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => return Ok((name, std::fs::File::from(fd))),
            Err(Errno::EXIST) => last = Errno::EXIST,
            Err(e) => {
                last = e;
                break;
            }
        }
    }
    Err(io::Error::other(format!(
        "creating a temporary file: {last}"
    )))
}

/// Decode one object into its file below `root`: temporary file, verify, mode and mtime,
/// rename within the directory handle. Blocking.
#[allow(clippy::too_many_arguments)]
fn write_object(
    root: &OwnedFd,
    rel: &str,
    long: bool,
    plan: Plan,
    keys: &[MasterKey],
    stored_key: &str,
    reader: Download,
    expect: Expect,
    fallback_mtime: std::time::SystemTime,
    max_size: Option<u64>,
    pinned: Option<&Expect>,
) -> anyhow::Result<()> {
    let mut d = start_decoding(plan, keys, stored_key, reader, expect)?;
    if let Some(p) = pinned {
        // What a manifest says wins over what the object says about itself.
        d.expect.size = p.size;
        d.expect.sha256.clone_from(&p.sha256);
        d.expect.mode = p.mode.or(d.expect.mode);
        d.expect.mtime_ns = p.mtime_ns.or(d.expect.mtime_ns);
        if p.long_name.is_some() {
            d.expect.long_name.clone_from(&p.long_name);
        }
    }
    let parts = segments(rel).map_err(anyhow::Error::msg)?;
    let (name, dirs) = parts.split_last().context("empty key")?;
    let name = if long {
        let full = d.expect.long_name.clone().ok_or_else(|| {
            anyhow::anyhow!("the full name of this shortened key is not recorded with the object")
        })?;
        if !layout::long_name_matches(rel, &full) {
            anyhow::bail!(
                "the full name recorded with the object ({full:?}) does not match its key"
            );
        }
        full
    } else {
        name.to_string()
    };
    let dir = open_dirs(root, dirs)?;
    let (tmp, mut file) = create_temp(&dir)?;
    let result = (|| -> anyhow::Result<()> {
        let mut w = io::BufWriter::with_capacity(256 * 1024, &mut file);
        finish_decoding(&mut d, &mut w, max_size)?;
        w.flush()?;
        drop(w);
        // Set-id and sticky bits are not taken from a bucket.
        let mode = d.expect.mode.unwrap_or(0o644) & 0o777;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        let mtime = match d.expect.mtime_ns {
            Some(ns) if ns >= 0 => {
                std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
            }
            _ => fallback_mtime,
        };
        file.set_modified(mtime)?;
        file.sync_all()?;
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name.as_str()).with_context(|| {
            format!(
                "renaming into {}",
                dirs.iter()
                    .chain([&name.as_str()])
                    .copied()
                    .collect::<Vec<_>>()
                    .join("/")
            )
        })?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
    }
    result
}

/// What `restore` did.
#[derive(Debug, Default)]
pub struct RestoreSummary {
    /// Files written.
    pub restored: u64,
    /// Objects that failed, with the reason.
    pub failed: Vec<(String, String)>,
    /// Objects not restored because a newer object maps to the same file.
    pub superseded: Vec<String>,
    /// Files restored from segments because they were still being written (or grew after
    /// they were stored): their path under the target, the bytes written (their durable
    /// prefix) and, when it ended before the last segment, why.
    pub partial: Vec<(String, u64, Option<String>)>,
}

/// Restore every object under `prefix` of destination `from` into `to`.
pub async fn restore(
    config: &Config,
    from: &str,
    to: &Path,
    prefix: Option<&str>,
    opts: &RestoreOptions,
) -> anyhow::Result<RestoreSummary> {
    let dest = find_destination(config, from)?;
    let pipeline = Pipeline::from_config(config)?;
    let authenticated = pipeline.key.is_some();
    let keys = Arc::new(pipeline.keys);
    let root = open_target(to)?;
    let prefix = prefix.unwrap_or("").trim_matches('/').to_string();
    let listing = dest.list_under(&prefix).await?;
    let (list_key, objects) = (listing.list_key, listing.objects);

    let mut summary = RestoreSummary::default();
    // A key object_store cannot address fails alone; the rest of the prefix is restored.
    for bad in listing.bad_keys {
        summary.failed.push((bad.key, bad.reason));
    }
    // Newest object per target file (logical key; for long names, the shortened one, which
    // stands for exactly one full name).
    let mut chosen: BTreeMap<String, ObjectMeta> = BTreeMap::new();
    for meta in objects {
        let key = meta.location.as_ref();
        let rel = key
            .strip_prefix(list_key.as_str())
            .unwrap_or(key)
            .trim_start_matches('/');
        if rel.starts_with(crate::format::layout::INTERNAL_PREFIX)
            || (prefix.is_empty() && rel.is_empty())
        {
            continue;
        }
        let parsed = layout::parse(rel);
        if authenticated && !parsed.plan.encrypt && !opts.allow_plaintext {
            summary.failed.push((
                key.to_string(),
                "not encrypted although a key is configured: refused (anyone who can write to the bucket can plant such an object; restore --allow-plaintext restores it)".into(),
            ));
            continue;
        }
        if let Err(e) = segments(parsed.logical) {
            summary.failed.push((key.to_string(), e));
            continue;
        }
        let target = parsed.logical.to_string();
        match chosen.get(&target) {
            Some(existing) if existing.last_modified >= meta.last_modified => {
                summary.superseded.push(key.to_string());
            }
            _ => {
                if let Some(old) = chosen.insert(target, meta) {
                    summary.superseded.push(old.location.to_string());
                }
            }
        }
    }

    // Files still being written: their segments (after their settled object, if any).
    let partials = match partial::find(
        &dest,
        &prefix,
        &mut chosen,
        authenticated,
        opts,
        &mut summary,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            let under = crate::format::segment::prefix_for(&prefix);
            summary
                .failed
                .push((under, format!("listing segments: {e:#}")));
            Vec::new()
        }
    };

    let results: Vec<(String, anyhow::Result<()>)> = futures::stream::iter(chosen)
        .map(|(rel, meta)| {
            let (dest, keys, root, opts) = (dest.clone(), keys.clone(), root.clone(), opts.clone());
            async move {
                let key = meta.location.to_string();
                let res = restore_one(&dest, &keys, root, &rel, &meta, &opts).await;
                (key, res)
            }
        })
        .buffer_unordered(CONCURRENCY.max(dest.concurrency))
        .collect()
        .await;
    for (key, res) in results {
        match res {
            Ok(()) => summary.restored += 1,
            Err(e) => {
                tracing::warn!(key = %key, error = %format!("{e:#}"), "cannot restore object");
                summary.failed.push((key, format!("{e:#}")));
            }
        }
    }
    for p in &partials {
        match partial::write(&dest, &keys, root.clone(), p).await {
            Ok((bytes, stopped)) => {
                summary.restored += 1;
                summary.partial.push((p.rel.clone(), bytes, stopped));
            }
            Err(e) => {
                let dir = crate::format::segment::dir_of(&p.logical);
                tracing::warn!(key = %dir, error = %format!("{e:#}"), "cannot restore a file from its segments");
                summary.failed.push((dir, format!("{e:#}")));
            }
        }
    }
    Ok(summary)
}

/// GET an object, retrying what may pass (network trouble, 5xx, throttling) three more times
/// with a growing pause, beyond object_store's own retries: a restore is often the one chance
/// to get a run back, and a flaky link should cost time, not files. Permanent errors (404,
/// 403) are returned at once.
pub(crate) async fn get_retrying(
    dest: &Destination,
    location: &object_store::path::Path,
) -> object_store::Result<GetResult> {
    let mut pause = std::time::Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        match dest.store.get(location).await {
            Err(e)
                if attempt < 3
                    && !matches!(e, object_store::Error::NotFound { .. })
                    && !destination::StoreError::classify("", &e).is_permanent() =>
            {
                tracing::debug!(key = %location, error = %destination::error_chain(&e), "download failed; retrying");
                attempt += 1;
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            res => return res,
        }
    }
}

/// The most a compressed object of `stored` bytes that records no size may decode to, unless
/// `--max-size` says otherwise: 1,024 times its size (logs compress 10 to 50 times), at least
/// 64 MiB.
fn default_decode_cap(stored: u64) -> u64 {
    stored.saturating_mul(1024).max(64 << 20)
}

/// Restore one object to `rel` (its logical key relative to the restore prefix).
async fn restore_one(
    dest: &Destination,
    keys: &[MasterKey],
    root: Arc<OwnedFd>,
    rel: &str,
    meta: &ObjectMeta,
    opts: &RestoreOptions,
) -> anyhow::Result<()> {
    let stored_key = dest.relative(meta.location.as_ref()).to_string();
    let parsed = layout::parse(&stored_key);
    let (plan, long) = (parsed.plan, parsed.long);
    if parsed.pointer {
        return restore_by_pointer(dest, keys, root, rel, long, &stored_key).await;
    }
    let get = get_retrying(dest, &meta.location)
        .await
        .map_err(|e| anyhow::anyhow!("downloading: {}", destination::error_chain(&e)))?;
    let mut expect = attr_expect(&get);
    if !plan.encrypt
        && let Some(file) = dest.local_file(&stored_key)
    {
        let m = tokio::task::spawn_blocking(move || crate::filemeta::read(&file))
            .await
            .context("metadata task failed")?
            .context("reading the stored file's mode and mtime")?;
        expect.mode = Some(m.mode);
        expect.mtime_ns = Some(m.mtime_ns);
        expect.long_name = m.long_name;
        if plan.compression == crate::format::layout::Compression::None {
            expect.size = Some(meta.size);
        }
    }
    let fallback_mtime = meta.last_modified.into();
    let reader = download(dest.store.clone(), get);
    // A plain compressed object that records no size (a `file://` store's) is bounded all the
    // same: a few KB of zstd can decode to gigabytes.
    let max_size = opts.max_size.or_else(|| {
        (!plan.encrypt
            && expect.size.is_none()
            && plan.compression != crate::format::layout::Compression::None)
            .then(|| default_decode_cap(meta.size))
    });
    let (keys, rel) = (keys.to_vec(), rel.to_string());
    tokio::task::spawn_blocking(move || {
        write_object(
            &root,
            &rel,
            long,
            plan,
            &keys,
            &stored_key,
            reader,
            expect,
            fallback_mtime,
            max_size,
            None,
        )
    })
    .await
    .context("restore task failed")?
}

/// Restore the file whose pointer is at `stored_key` to `rel`: the pointer read and checked,
/// then its blob (or the copy the collector set aside) decoded to exactly the pointer's size
/// and SHA-256, with the pointer's mode and mtime.
async fn restore_by_pointer(
    dest: &Destination,
    keys: &[MasterKey],
    root: Arc<OwnedFd>,
    rel: &str,
    long: bool,
    stored_key: &str,
) -> anyhow::Result<()> {
    let p = crate::content::read_pointer(dest, keys, stored_key).await?;
    let pinned = Expect {
        size: Some(p.size),
        sha256: Some(p.sha256.clone()),
        mtime_ns: Some(p.mtime_ns),
        mode: Some(p.mode),
        long_name: Some(layout::file_name(&p.path).to_string()),
    };
    let (blob, get) = get_pointed_blob(dest, stored_key, &p.blob).await?;
    let plan = layout::parse(&blob).plan;
    let fallback_mtime = get.meta.last_modified.into();
    let reader = download(dest.store.clone(), get);
    let (keys, rel, stored_key) = (keys.to_vec(), rel.to_string(), stored_key.to_string());
    tokio::task::spawn_blocking(move || {
        write_object(
            &root,
            &rel,
            long,
            plan,
            &keys,
            &blob,
            reader,
            pinned.clone(),
            fallback_mtime,
            None,
            Some(&pinned),
        )
        .with_context(|| format!("blob {blob} (named by pointer {stored_key})"))
    })
    .await
    .context("restore task failed")?
}

/// The blob a pointer at `pointer_key` names, as its key (the binding a blob is read with)
/// and its download; a missing blob is an error naming both.
async fn get_pointed_blob(
    dest: &Destination,
    pointer_key: &str,
    blob: &str,
) -> anyhow::Result<(String, GetResult)> {
    match crate::content::get_blob(dest, blob).await {
        Ok(Some((_, got))) => Ok((blob.to_string(), got)),
        Ok(None) => anyhow::bail!(
            "blob {blob} named by pointer {pointer_key} is missing from {}",
            dest.name
        ),
        Err(e) => Err(anyhow::anyhow!(e)),
    }
}

/// Download the file stored at `stored_key` (a manifest's `stored_key`): the object itself,
/// or in a content destination the blob its pointer names. Returns the key the bytes are read
/// (and bound) under. A missing object or blob is an error that says so.
///
/// A manifest names the key in the first destination that held the file; another destination
/// with the other layout holds it under the key its own layout gives (`size` decides whether
/// a content destination kept the file at its key): that key is read instead.
pub(crate) async fn open_stored(
    dest: &Destination,
    keys: &[MasterKey],
    stored_key: &str,
    size: u64,
) -> anyhow::Result<(String, GetResult)> {
    let stored_key = &in_layout_of(dest, stored_key, size).await;
    if layout::parse(stored_key).pointer {
        let p = crate::content::read_pointer(dest, keys, stored_key).await?;
        return get_pointed_blob(dest, stored_key, &p.blob).await;
    }
    let location = dest.path(stored_key)?;
    match get_retrying(dest, &location).await {
        Ok(g) => Ok((stored_key.to_string(), g)),
        Err(object_store::Error::NotFound { .. }) => {
            anyhow::bail!("object {stored_key} is missing from {}", dest.name)
        }
        Err(e) => anyhow::bail!("downloading {stored_key}: {}", destination::error_chain(&e)),
    }
}

/// The key under which `dest` holds the file a manifest lists at `stored_key`: the same key
/// when the destination's layout gives it, else the key of its own layout that is there.
async fn in_layout_of(dest: &Destination, stored_key: &str, size: u64) -> String {
    use crate::config::Layout;
    let parsed = layout::parse(stored_key);
    let encrypt = parsed.plan.encrypt;
    let candidates: Vec<String> = match (dest.layout, parsed.pointer) {
        (Layout::Content, false) if size >= crate::format::pointer::INLINE_BELOW => {
            vec![layout::pointer_key(parsed.logical, encrypt)]
        }
        (Layout::Path, true) => [Compression::Zstd, Compression::Gzip, Compression::None]
            .into_iter()
            .map(|compression| {
                layout::stored_key(
                    parsed.logical,
                    Plan {
                        compression,
                        encrypt,
                    },
                )
            })
            .collect(),
        _ => return stored_key.to_string(),
    };
    if parsed.long {
        // A shortened name stands for its full name only inside the object: keep the key.
        return stored_key.to_string();
    }
    for key in candidates {
        if let Ok(path) = dest.path(&key)
            && dest.store.head(&path).await.is_ok()
        {
            return key;
        }
    }
    stored_key.to_string()
}

/// What a file restored from a manifest must be (see [`restore_pinned`]).
#[derive(Debug, Clone)]
pub struct Pinned {
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// Restore the object at `stored_key` (relative to the destination base) to `rel` below
/// `root`, accepting it only when it decodes to exactly `want` (size and SHA-256). A missing
/// object is an error that says so.
pub async fn restore_pinned(
    dest: &Destination,
    keys: &[MasterKey],
    root: Arc<OwnedFd>,
    rel: &str,
    stored_key: &str,
    want: &Pinned,
) -> anyhow::Result<()> {
    let (read_key, get) = open_stored(dest, keys, stored_key, want.size).await?;
    let plan = layout::parse(&read_key).plan;
    let pinned = Expect {
        size: Some(want.size),
        sha256: Some(want.sha256.clone()),
        mtime_ns: Some(want.mtime_ns),
        mode: Some(want.mode),
        long_name: None,
    };
    let fallback_mtime = get.meta.last_modified.into();
    let reader = download(dest.store.clone(), get);
    let (keys, rel) = (keys.to_vec(), rel.to_string());
    tokio::task::spawn_blocking(move || {
        write_object(
            &root,
            &rel,
            false,
            plan,
            &keys,
            &read_key,
            reader,
            pinned.clone(),
            fallback_mtime,
            None,
            Some(&pinned),
        )
        .with_context(|| format!("object {read_key}"))
    })
    .await
    .context("restore task failed")?
}

/// Create `to` and open it as the directory handle every restored file is created under.
pub fn open_target(to: &Path) -> anyhow::Result<Arc<OwnedFd>> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let to = to
        .canonicalize()
        .with_context(|| format!("resolving {}", to.display()))?;
    Ok(Arc::new(
        rustix::fs::openat(
            rustix::fs::CWD,
            &to,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", to.display()))?,
    ))
}

/// One problem `verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// Destination name.
    pub dest: String,
    /// Stored object key (relative to the destination base).
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

/// What `verify` found.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Objects checked.
    pub checked: u64,
    /// Missing or damaged objects.
    pub problems: Vec<Problem>,
    /// Content destinations: blobs no pointer names (collected after the grace period),
    /// as (destination, blob key).
    pub orphaned: Vec<(String, String)>,
}

/// Check that every object the index says is stored is present with the expected size
/// (`deep`: downloaded, decoded and re-hashed).
pub async fn verify(
    config: &Config,
    only: Option<&str>,
    deep: bool,
) -> anyhow::Result<VerifyReport> {
    let index = Arc::new(Index::open(&config.state_dir)?);
    let keys = Arc::new(Pipeline::from_config(config)?.keys);
    let dests: Vec<Destination> = match only {
        Some(name) => vec![find_destination(config, name)?],
        None => destination::open_all(config)?,
    };
    let mut report = VerifyReport::default();
    for dest in dests {
        let (i, name) = (index.clone(), dest.name.clone());
        let rows = tokio::task::spawn_blocking(move || i.objects_of(&name)).await??;
        report.checked += rows.len() as u64;
        let problems: Vec<Option<Problem>> = futures::stream::iter(rows)
            .map(|row| {
                let (dest, keys) = (dest.clone(), keys.clone());
                async move {
                    check_object(&dest, &keys, &row, deep)
                        .await
                        .err()
                        .map(|problem| Problem {
                            dest: dest.name.clone(),
                            key: row.stored_key.clone(),
                            problem,
                        })
                }
            })
            .buffer_unordered(CONCURRENCY.max(dest.concurrency))
            .collect()
            .await;
        report.problems.extend(problems.into_iter().flatten());
        if dest.layout == crate::config::Layout::Content {
            audit_content(&dest, &keys, &mut report).await?;
        }
    }
    Ok(report)
}

/// Add what the audit of a content destination finds: pointers naming missing blobs and
/// pointers that cannot be read are problems; blobs no pointer names are listed.
async fn audit_content(
    dest: &Destination,
    keys: &[MasterKey],
    report: &mut VerifyReport,
) -> anyhow::Result<()> {
    let a = crate::collect::audit(dest, keys).await?;
    for (pointer, blob, aside) in a.dangling {
        let problem = if aside {
            format!(
                "dangling: blob {blob} is missing (a copy set aside by a sweep still holds it; the next sweep puts it back)"
            )
        } else {
            format!("dangling: blob {blob} is missing")
        };
        report.problems.push(Problem {
            dest: dest.name.clone(),
            key: pointer,
            problem,
        });
    }
    for (pointer, why) in a.unreadable {
        report.problems.push(Problem {
            dest: dest.name.clone(),
            key: pointer,
            problem: format!("unreadable pointer: {why}"),
        });
    }
    for mark in a.interrupted_sweeps {
        tracing::info!(dest = %dest.name, mark = %mark, "a blob sweep did not finish; the next one completes it");
    }
    report
        .orphaned
        .extend(a.orphaned.into_iter().map(|b| (dest.name.clone(), b)));
    Ok(())
}

async fn check_object(
    dest: &Destination,
    keys: &[MasterKey],
    row: &crate::index::ObjectRow,
    deep: bool,
) -> Result<(), String> {
    let path = dest.path(&row.stored_key).map_err(|e| e.to_string())?;
    let head = match dest.store.head(&path).await {
        Ok(h) => h,
        Err(object_store::Error::NotFound { .. }) => return Err("missing".into()),
        Err(e) => return Err(format!("cannot check: {}", destination::error_chain(&e))),
    };
    if head.size != row.stored_size {
        return Err(format!(
            "size is {} bytes, expected {}",
            head.size, row.stored_size
        ));
    }
    if let Some(blob) = &row.blob {
        // A content destination's file: its blob must be there too.
        match crate::content::head_blob(dest, &blob.key).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("dangling: its blob {} is missing", blob.key)),
            Err(e) => return Err(format!("cannot check blob {}: {e}", blob.key)),
        }
    }
    if !deep {
        return Ok(());
    }
    let (read_key, get) = if layout::parse(&row.stored_key).pointer {
        let p = crate::content::read_pointer(dest, keys, &row.stored_key)
            .await
            .map_err(|e| format!("damaged: {e}"))?;
        get_pointed_blob(dest, &row.stored_key, &p.blob)
            .await
            .map_err(|e| format!("{e:#}"))?
    } else {
        let got = dest
            .store
            .get(&path)
            .await
            .map_err(|e| format!("cannot download: {}", destination::error_chain(&e)))?;
        (row.stored_key.clone(), got)
    };
    let plan = layout::parse(&read_key).plan;
    let expect = Expect {
        size: Some(row.size),
        sha256: Some(hex::encode(row.sha256)),
        ..Default::default()
    };
    let reader = download(dest.store.clone(), get);
    let (keys, stored_key) = (keys.to_vec(), read_key.clone());
    let res = tokio::task::spawn_blocking(move || {
        let mut d = start_decoding(plan, &keys, &stored_key, reader, expect.clone())?;
        // What the index knows wins over what the object says.
        d.expect.size = expect.size;
        d.expect.sha256 = expect.sha256;
        finish_decoding(&mut d, &mut io::sink(), None).map(|_| ())
    })
    .await
    .map_err(|e| format!("verify task failed: {e}"))?;
    match res {
        Ok(()) => Ok(()),
        Err(e) if read_key != row.stored_key => Err(format!("damaged: blob {read_key}: {e}")),
        Err(e) => Err(format!("damaged: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_must_name_its_own_key_and_hex_case_does_not_matter() {
        // Reproduced: the binary accepted a record whose `path` names another key (an
        // independent decoder refused it) and refused an upper-case SHA-256 (the decoder
        // accepted it). FORMAT.md's reader conformance table decides both.
        assert!(record_path_matches("ci/n/a.log.zst.enc", "ci/n/a.log"));
        assert!(!record_path_matches("ci/n/a.log.zst.enc", "ci/n/b.log"));
        assert!(!record_path_matches("ci/n/a.log.enc", "ci/m/a.log"));
        assert!(record_path_matches("ci/n/x.gz.asis.enc", "ci/n/x.gz"));
        let long = "L".repeat(250);
        let stored = layout::stored_key(
            &format!("ci/n/{long}"),
            Plan {
                compression: crate::format::layout::Compression::Zstd,
                encrypt: true,
            },
        );
        assert!(record_path_matches(&stored, &format!("ci/n/{long}")));
        assert!(!record_path_matches(&stored, &format!("ci/m/{long}")));
        assert!(!record_path_matches(&stored, &format!("ci/n/{long}x")));
        assert!(same_sha256("ABCDEF01", "abcdef01"));
        assert!(!same_sha256("abcdef01", "abcdef02"));
    }

    #[test]
    fn targets_never_escape() {
        let to = Path::new("/restore");
        assert_eq!(
            safe_target(to, "a/b.log").unwrap(),
            Path::new("/restore/a/b.log")
        );
        for bad in [
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "",
            "a/.",
            "/abs",
            "a/\0b",
        ] {
            assert!(safe_target(to, bad).is_err(), "{bad:?} accepted");
        }
    }
}
