//! Restoring files that were still being written: a file that has only segments
//! (`format::segment`) under the restored prefix is written from its newest generation's
//! segments, in order, up to the first gap or bad segment (its durable prefix), under its own
//! name, and reported as partial; a settled object followed by segments that extend it (the
//! file grew again after it was stored) is written as the object then those segments.
//! Every segment is checked as it is read: bound to its own key when encrypted, its record
//! naming its file, its size and SHA-256, and its offset where the previous one ended.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::Context;
use object_store::ObjectMeta;
use rustix::fd::OwnedFd;

use super::{
    Decoding, Expect, RestoreOptions, RestoreSummary, attr_expect, create_temp, download,
    finish_decoding, get_retrying, open_dirs, segments, start_decoding,
};
use crate::crypto::MasterKey;
use crate::destination::{self, Destination};
use crate::format::layout;
use crate::format::segment::{self, Chain, MAX_SEGMENT, SegmentKey};
use crate::pipeline;

/// A file to write from segments (after its settled object, when there is one).
pub(super) struct Partial {
    /// Its path relative to the restore target.
    pub(super) rel: String,
    /// Its logical key (what each segment's record must name).
    pub(super) logical: String,
    /// The settled object the segments extend.
    base: Option<ObjectMeta>,
    /// The segments, newest generation, in order.
    chain: Chain,
}

/// Find the files under `prefix` that have segments: those without a settled object in
/// `chosen`, and those whose segments extend their settled object (taken out of `chosen`).
/// Refused and unreadable segment keys go to `summary.failed`.
pub(super) async fn find(
    dest: &Destination,
    prefix: &str,
    chosen: &mut BTreeMap<String, ObjectMeta>,
    authenticated: bool,
    opts: &RestoreOptions,
    summary: &mut RestoreSummary,
) -> anyhow::Result<Vec<Partial>> {
    let listing = dest.list_under(&segment::prefix_for(prefix)).await?;
    let mut files: BTreeMap<String, Vec<SegmentKey>> = BTreeMap::new();
    let mut newest: BTreeMap<String, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    for meta in &listing.objects {
        let key = dest.relative(meta.location.as_ref());
        let Some(seg) = SegmentKey::parse(key) else {
            continue;
        };
        let rel = if prefix.is_empty() {
            Some(seg.logical.as_str())
        } else {
            seg.logical
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('/'))
        };
        let Some(rel) = rel.map(str::to_string) else {
            continue;
        };
        if authenticated && !seg.plan.encrypt && !opts.allow_plaintext {
            summary.failed.push((
                key.to_string(),
                "a segment not encrypted although a key is configured: refused (restore --allow-plaintext restores it)".into(),
            ));
            continue;
        }
        if let Err(e) = segments(&rel) {
            summary.failed.push((key.to_string(), e));
            continue;
        }
        let at = newest.entry(rel.clone()).or_insert(meta.last_modified);
        *at = (*at).max(meta.last_modified);
        files.entry(rel).or_default().push(seg);
    }
    let mut out = Vec::new();
    for (rel, keys) in files {
        let Some(chain) = segment::newest_chain(keys) else {
            continue;
        };
        let logical = chain.segments[0].logical.clone();
        let base = match (chosen.get(&rel), chain.start) {
            // Segments from the start beside an object: the object is the file as it settled
            // when it was stored after them (the segments wait to be removed); when segments
            // came after it, the file was stored while it grew, and they reach further.
            (Some(object), 0) if newest.get(&rel).is_some_and(|t| *t <= object.last_modified) => {
                continue;
            }
            (Some(_), 0) => {
                if let Some(old) = chosen.remove(&rel) {
                    summary.superseded.push(old.location.to_string());
                }
                None
            }
            (Some(_), _) => chosen.remove(&rel),
            (None, 0) => None,
            (None, start) => {
                summary.failed.push((
                    segment::dir_of(&logical),
                    format!("its segments begin at byte {start}, but no settled object holds the bytes before"),
                ));
                continue;
            }
        };
        out.push(Partial {
            rel,
            logical,
            base,
            chain,
        });
    }
    Ok(out)
}

/// Write one partial file below `root`: its settled object (if any), then its segments while
/// each begins where the last ended and reads back whole. Returns the bytes written and, when
/// it stopped early, why.
pub(super) async fn write(
    dest: &Destination,
    keys: &[MasterKey],
    root: Arc<OwnedFd>,
    p: &Partial,
) -> anyhow::Result<(u64, Option<String>)> {
    let parts: Vec<String> = segments(&p.rel)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .map(str::to_string)
        .collect();
    let (name, dirs) = parts.split_last().context("empty key")?;
    let dirs = dirs.to_vec();
    let (dir, tmp, mut file) = tokio::task::spawn_blocking(move || -> io::Result<_> {
        let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
        let dir = open_dirs(&root, &dirs)?;
        let (tmp, file) = create_temp(&dir)?;
        Ok((dir, tmp, file))
    })
    .await??;
    let dir = Arc::new(dir);
    let written = append_all(dest, keys, p, &mut file).await;
    let result = match written {
        Ok((len, stopped, expect)) if len > 0 || stopped.is_none() => {
            let (dir, tmp, name) = (dir.clone(), tmp.clone(), name.clone());
            tokio::task::spawn_blocking(move || finish(&dir, &tmp, &name, file, &expect))
                .await?
                .map(|()| (len, stopped))
        }
        Ok((_, stopped, _)) => Err(anyhow::anyhow!(
            "no segment could be read: {}",
            stopped.unwrap_or_default()
        )),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = rustix::fs::unlinkat(&*dir, tmp.as_str(), rustix::fs::AtFlags::empty());
    }
    result
}

/// Append the base object and the segments to `file`; the bytes written, why it stopped
/// early, and the metadata to give the file.
async fn append_all(
    dest: &Destination,
    keys: &[MasterKey],
    p: &Partial,
    file: &mut std::fs::File,
) -> anyhow::Result<(u64, Option<String>, Expect)> {
    let mut len = 0u64;
    let mut last = Expect::default();
    if let Some(base) = &p.base {
        let (n, expect) = append(dest, keys, &base.location, None, file)
            .await
            .with_context(|| format!("reading the settled object {}", base.location))?;
        if n != p.chain.start {
            anyhow::bail!(
                "the settled object {} holds {n} bytes, but the segments after it begin at {}",
                base.location,
                p.chain.start
            );
        }
        len = n;
        last = expect;
    }
    for seg in &p.chain.segments {
        if seg.offset != len {
            return Ok((
                len,
                Some(format!(
                    "a gap: the next segment begins at byte {}",
                    seg.offset
                )),
                last,
            ));
        }
        let key = seg.key();
        let location = dest.path(&key)?;
        match append(dest, keys, &location, Some(seg), file).await {
            Ok((n, expect)) => {
                len += n;
                last = expect;
            }
            Err(e) => return Ok((len, Some(format!("segment {key}: {e:#}")), last)),
        }
    }
    Ok((len, None, last))
}

/// Decode one object (a segment when `seg` is given) onto the end of `file`.
async fn append(
    dest: &Destination,
    keys: &[MasterKey],
    location: &object_store::path::Path,
    seg: Option<&SegmentKey>,
    file: &mut std::fs::File,
) -> anyhow::Result<(u64, Expect)> {
    let (n, expect, _) = decode_into(dest, keys, location, seg, file.try_clone()?).await?;
    Ok((n, expect))
}

/// The growing files under the logical prefix `prefix` of `dest`: each file whose newest
/// generation's segments begin at offset 0 (it has no settled object they extend), with
/// those segments, by logical key. For `serve`.
pub(crate) async fn growing_under(
    dest: &Destination,
    prefix: &str,
) -> anyhow::Result<BTreeMap<String, Chain>> {
    chains(dest, &segment::prefix_for(prefix)).await
}

/// The growing file at `logical` (see [`growing_under`]), if it is one.
pub(crate) async fn growing_file(
    dest: &Destination,
    logical: &str,
) -> anyhow::Result<Option<Chain>> {
    Ok(chains(dest, &segment::dir_of(logical))
        .await?
        .remove(logical))
}

/// The chains of segments listed under `list`, by logical key, each beginning at offset 0.
async fn chains(dest: &Destination, list: &str) -> anyhow::Result<BTreeMap<String, Chain>> {
    let listing = dest.list_under(list).await?;
    let mut files: BTreeMap<String, Vec<SegmentKey>> = BTreeMap::new();
    for meta in &listing.objects {
        if let Some(seg) = SegmentKey::parse(dest.relative(meta.location.as_ref())) {
            files.entry(seg.logical.clone()).or_default().push(seg);
        }
    }
    Ok(files
        .into_iter()
        .filter_map(|(logical, keys)| Some((logical, segment::newest_chain(keys)?)))
        .filter(|(_, chain)| chain.start == 0)
        .collect())
}

/// One segment's bytes, decoded and checked as `restore` checks them (at most
/// [`MAX_SEGMENT`]). For `serve`.
pub(crate) async fn segment_bytes(
    dest: &Destination,
    keys: &[MasterKey],
    seg: &SegmentKey,
) -> anyhow::Result<Vec<u8>> {
    let location = dest.path(&seg.key())?;
    let (_, _, bytes) = decode_into(dest, keys, &location, Some(seg), Vec::new())
        .await
        .with_context(|| format!("segment {}", seg.key()))?;
    Ok(bytes)
}

/// Decode one object (a segment when `seg` is given) into `out`; returns the bytes written,
/// what the object said about itself, and `out`.
async fn decode_into<W: Write + Send + 'static>(
    dest: &Destination,
    keys: &[MasterKey],
    location: &object_store::path::Path,
    seg: Option<&SegmentKey>,
    mut out: W,
) -> anyhow::Result<(u64, Expect, W)> {
    let stored_key = dest.relative(location.as_ref()).to_string();
    let get = get_retrying(dest, location)
        .await
        .map_err(|e| anyhow::anyhow!("downloading: {}", destination::error_chain(&e)))?;
    let stored_size = get.meta.size;
    let expect = attr_expect(&get);
    let reader = download(dest.store.clone(), get);
    let keys = keys.to_vec();
    let seg = seg.cloned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, Expect, W)> {
        let mut d = match &seg {
            None => {
                let plan = layout::parse(&stored_key).plan;
                start_decoding(plan, &keys, &stored_key, reader, expect)?
            }
            Some(seg) => {
                let (r, record) = pipeline::segment_decoder(seg.plan, &keys, &stored_key, reader)?;
                let mut expect = expect;
                if let Some(m) = record {
                    if m.path.as_deref() != Some(seg.logical.as_str()) {
                        anyhow::bail!("its record names another file than its key");
                    }
                    expect = Expect {
                        size: Some(m.size),
                        sha256: Some(m.sha256),
                        mtime_ns: Some(m.mtime_ns),
                        mode: m.mode,
                        long_name: None,
                    };
                }
                Decoding { reader: r, expect }
            }
        };
        // Plain compressed objects of a `file://` store record no size: bounded all the same.
        let cap = match seg {
            Some(_) => MAX_SEGMENT,
            None => super::default_decode_cap(stored_size),
        };
        let cap = d.expect.size.is_none().then_some(cap);
        let mut w = io::BufWriter::with_capacity(256 * 1024, &mut out);
        let (_, n) = finish_decoding(&mut d, &mut w, cap)?;
        w.flush()?;
        drop(w);
        Ok((n, d.expect, out))
    })
    .await?
}

/// Give the written file its mode and mtime, sync it and rename it into place. Blocking.
fn finish(
    dir: &OwnedFd,
    tmp: &str,
    name: &str,
    file: std::fs::File,
    expect: &Expect,
) -> anyhow::Result<()> {
    let mode = expect.mode.unwrap_or(0o644) & 0o777;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Some(ns) = expect.mtime_ns.filter(|ns| *ns >= 0) {
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64))?;
    }
    file.sync_all()?;
    rustix::fs::renameat(dir, tmp, dir, name).with_context(|| format!("renaming into {name}"))?;
    Ok(())
}
