//! `restore` and `verify`: objects back to files, and the index checked against a destination.
//!
//! Restore needs only the destination and the key file, never the index (the machine may be
//! gone): it lists the destination, reads each object's pipeline from its key suffixes, and
//! streams it through decrypt → decompress → hash into a temporary file beside the target,
//! which is renamed into place once the content is verified. A bad object (wrong key,
//! tampered, truncated, not our format) fails alone, named. Nothing is ever written outside the
//! target directory: keys with `.`/`..`/empty segments are refused, and no directory on the
//! way may be a symlink.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use object_store::{Attribute, GetResult, ObjectMeta, ObjectStoreExt};
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::crypto::MasterKey;
use crate::destination::{self, Destination};
use crate::index::Index;
use crate::pipeline::{self, Pipeline, Plan};

/// Keys under this prefix are the agent's own (status objects, probes), not artifacts.
pub const INTERNAL_PREFIX: &str = "_panoptic-sync";
/// Objects restored or verified at once.
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

/// A `Read` over byte chunks arriving from an async download.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = self.cur.len().min(buf.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// The original's metadata, from inside an encrypted object or from object attributes.
#[derive(Debug, Default, Clone)]
struct Expect {
    size: Option<u64>,
    sha256: Option<String>,
    mtime_ns: Option<i64>,
}

fn attr_expect(get: &GetResult) -> Expect {
    let meta = |k: &'static str| {
        get.attributes
            .get(&Attribute::Metadata(k.into()))
            .map(|v| v.as_ref().to_string())
    };
    Expect {
        size: None,
        sha256: meta("sha256"),
        mtime_ns: meta("mtimens").and_then(|v| v.parse().ok()),
    }
}

/// Stream an object's bytes to a blocking reader; returns the reader and the feeding task.
fn download(get: GetResult) -> (ChannelReader, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let feed = tokio::spawn(async move {
        let mut stream = get.into_stream();
        while let Some(item) = stream.next().await {
            let item = item.map_err(io::Error::other);
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    (
        ChannelReader {
            rx,
            cur: Bytes::new(),
        },
        feed,
    )
}

/// Decode an object fully into `out`; returns SHA-256, length and the metadata found.
fn decode_into(
    plan: Plan,
    keys: &[MasterKey],
    reader: ChannelReader,
    out: &mut dyn Write,
    mut expect: Expect,
) -> io::Result<([u8; 32], u64, Expect)> {
    let (mut r, meta) = pipeline::decoder(plan, keys, reader)?;
    if let Some(m) = meta {
        expect = Expect {
            size: Some(m.size),
            sha256: Some(m.sha256),
            mtime_ns: Some(m.mtime_ns),
        };
    }
    let (sha, len) = pipeline::copy_hashed(&mut r, out)?;
    if let Some(size) = expect.size
        && size != len
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decoded {len} bytes, the object says {size}"),
        ));
    }
    if let Some(want) = &expect.sha256
        && *want != hex::encode(sha)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "content does not match the SHA-256 recorded with the object",
        ));
    }
    Ok((sha, len, expect))
}

/// The path under `to` for an object key relative to the restore prefix, or why it is unsafe.
pub fn safe_target(to: &Path, rel_key: &str) -> Result<PathBuf, String> {
    let mut out = to.to_path_buf();
    let mut any = false;
    for part in rel_key.split('/') {
        if part.is_empty() || part == "." || part == ".." || part.contains('\0') {
            return Err(format!(
                "unsafe object key {rel_key:?}: empty, \".\" or \"..\" segments are refused"
            ));
        }
        out.push(part);
        any = true;
    }
    if !any || !out.starts_with(to) || out == to {
        return Err(format!("unsafe object key {rel_key:?}"));
    }
    Ok(out)
}

/// Create the directories between `to` and `target`, refusing to pass through a symlink.
fn make_dirs(to: &Path, target: &Path) -> io::Result<()> {
    let parent = target.parent().unwrap_or(to);
    let rel = parent.strip_prefix(to).map_err(io::Error::other)?;
    let mut cur = to.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} exists and is not a directory (symlinks are not followed)",
                    cur.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(&cur) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
}

/// Restore every object under `prefix` of destination `from` into `to`.
pub async fn restore(
    config: &Config,
    from: &str,
    to: &Path,
    prefix: Option<&str>,
) -> anyhow::Result<RestoreSummary> {
    let dest = find_destination(config, from)?;
    let keys = Arc::new(Pipeline::from_config(config)?.keys);
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let to = to
        .canonicalize()
        .with_context(|| format!("resolving {}", to.display()))?;
    let prefix = prefix.unwrap_or("").trim_matches('/').to_string();
    let listing = dest.list_under(&prefix).await?;
    let (list_key, objects) = (listing.list_key, listing.objects);

    let mut summary = RestoreSummary::default();
    // A key object_store cannot address fails alone; the rest of the prefix is restored.
    for bad in listing.bad_keys {
        summary.failed.push((bad.key, bad.reason));
    }
    // Newest object per target file.
    let mut chosen: BTreeMap<PathBuf, ObjectMeta> = BTreeMap::new();
    for meta in objects {
        let key = meta.location.as_ref();
        let rel = key
            .strip_prefix(list_key.as_str())
            .unwrap_or(key)
            .trim_start_matches('/');
        if rel.starts_with(INTERNAL_PREFIX) || (prefix.is_empty() && rel.is_empty()) {
            continue;
        }
        let (_, logical) = Plan::from_key(rel);
        let target = match safe_target(&to, logical) {
            Ok(t) => t,
            Err(e) => {
                summary.failed.push((key.to_string(), e));
                continue;
            }
        };
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

    let results: Vec<(String, anyhow::Result<()>)> = futures::stream::iter(chosen)
        .map(|(target, meta)| {
            let (dest, keys, to, list_key) =
                (dest.clone(), keys.clone(), to.clone(), list_key.clone());
            async move {
                let key = meta.location.to_string();
                let res = restore_one(&dest, &keys, &to, &target, &meta, &list_key).await;
                (key, res)
            }
        })
        .buffer_unordered(CONCURRENCY)
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
    Ok(summary)
}

async fn restore_one(
    dest: &Destination,
    keys: &[MasterKey],
    to: &Path,
    target: &Path,
    meta: &ObjectMeta,
    list_key: &str,
) -> anyhow::Result<()> {
    let key = meta.location.as_ref();
    let rel = key
        .strip_prefix(list_key)
        .unwrap_or(key)
        .trim_start_matches('/');
    let (plan, _) = Plan::from_key(rel);
    let get = dest
        .store
        .get(&meta.location)
        .await
        .map_err(|e| anyhow::anyhow!("downloading: {}", destination::error_chain(&e)))?;
    let expect = attr_expect(&get);
    let fallback_mtime = meta.last_modified;
    let (reader, feed) = download(get);
    let (keys, to, target) = (keys.to_vec(), to.to_path_buf(), target.to_path_buf());
    let written = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        make_dirs(&to, &target)?;
        let dir = target.parent().unwrap_or(&to);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.restore-{:016x}", fastrand::u64(..)));
        let result = (|| -> anyhow::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = io::BufWriter::with_capacity(256 * 1024, &mut file);
            let (_, _, expect) = decode_into(plan, &keys, reader, &mut w, expect)?;
            w.flush()?;
            drop(w);
            let mtime = match expect.mtime_ns {
                Some(ns) if ns >= 0 => {
                    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
                }
                _ => fallback_mtime.into(),
            };
            file.set_modified(mtime)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("renaming into {}", target.display()))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    })
    .await
    .context("restore task failed")?;
    feed.abort();
    written
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
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        report.problems.extend(problems.into_iter().flatten());
    }
    Ok(report)
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
    if !deep {
        return Ok(());
    }
    let (plan, _) = Plan::from_key(&row.stored_key);
    let get = dest
        .store
        .get(&path)
        .await
        .map_err(|e| format!("cannot download: {}", destination::error_chain(&e)))?;
    let expect = Expect {
        size: Some(row.size),
        sha256: Some(hex::encode(row.sha256)),
        mtime_ns: None,
    };
    let (reader, feed) = download(get);
    let keys = keys.to_vec();
    let res = tokio::task::spawn_blocking(move || {
        decode_into(plan, &keys, reader, &mut io::sink(), expect).map(|_| ())
    })
    .await
    .map_err(|e| format!("verify task failed: {e}"))?;
    feed.abort();
    res.map_err(|e| format!("damaged: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
