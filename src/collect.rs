//! Collecting the blobs of content destinations (`layout = "content"`) that nothing
//! references any more, without ever deleting a blob a pointer names, and the destination-wide
//! audit `verify` runs (dangling references, orphaned blobs).
//!
//! The protocol (docs/FORMAT.md, "Collecting blobs"), one sweep:
//! 1. a *census*: list the destination, read every pointer we can read;
//! 2. the trash: a blob set aside that a pointer names again is put back; one set aside at
//!    least `blob_grace` ago and still unreferenced is deleted for good;
//! 3. mark: blobs no pointer names whose last modification is at least `blob_grace` old are
//!    the candidates, written down in a mark object;
//! 4. set aside: each candidate is moved to `_panoptic-sync/trash/…/<ms>` (never deleted here);
//! 5. a second census of the pointers: a candidate named by a pointer written meanwhile is
//!    put back at once; the mark object is removed.
//!
//! With the writer's rule (after writing a pointer, HEAD its blob and upload it again when it
//! is gone: `upload/by_content.rs`), a pointer never names a blob that is gone: either the
//! sweep's second census sees the pointer (and puts the blob back), or the writer's HEAD comes
//! after the blob was set aside (and uploads it again). Readers also read a blob from the
//! trash while it is there, so an interrupted sweep (between 4 and 5) leaves nothing
//! unreadable, and the next sweep's step 2 puts such blobs back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};

use crate::content;
use crate::crypto::MasterKey;
use crate::destination::{Destination, StoreError, error_chain};
use crate::format::layout::{self, GC_PREFIX, INTERNAL_PREFIX};
use crate::format::pointer::{BlobKey, PLAIN_NAMESPACE, key_namespace, parse_trash_key, trash_key};

/// Pointers read at once.
const CONCURRENCY: usize = 16;

/// What a listing of a content destination found, with every pointer read.
#[derive(Debug, Default)]
pub(crate) struct Census {
    /// Blobs by key, with their listing (size, last modified).
    pub blobs: BTreeMap<String, ObjectMeta>,
    /// Per blob, the pointers naming it.
    pub refs: BTreeMap<String, Vec<String>>,
    /// Blobs set aside: (trash key, blob key, ms set aside).
    pub aside: Vec<(String, String, i64)>,
    /// Pointers that could not be read, with why (each one blocks a sweep).
    pub unreadable: Vec<(String, String)>,
    /// Pointers encrypted under keys this node does not hold (they name blobs of
    /// namespaces it does not sweep).
    pub foreign: u64,
    /// Pointers read.
    pub pointers: u64,
    /// Original bytes of the files the pointers stand for.
    pub logical_bytes: u64,
    /// Sweeps in progress or interrupted (mark objects).
    pub marks: Vec<String>,
}

impl Census {
    /// Stored bytes of all blobs.
    pub(crate) fn blob_bytes(&self) -> u64 {
        self.blobs.values().map(|m| m.size).sum()
    }
}

/// List `dest` and read every pointer with `keys`.
pub(crate) async fn census(dest: &Destination, keys: &[MasterKey]) -> anyhow::Result<Census> {
    let listing = dest.list_under("").await?;
    let mut c = Census::default();
    let mut pointers = Vec::new();
    for meta in listing.objects {
        let rel = dest.relative(meta.location.as_ref()).to_string();
        if BlobKey::parse(&rel).is_some() {
            c.blobs.insert(rel, meta);
        } else if let Some((blob, ms)) = parse_trash_key(&rel) {
            c.aside.push((rel, blob, ms));
        } else if rel.starts_with(GC_PREFIX) {
            if layout::file_name(&rel).starts_with("sweep-") {
                c.marks.push(rel);
            }
        } else if !rel.starts_with(INTERNAL_PREFIX) && layout::parse(&rel).pointer {
            pointers.push(rel);
        }
    }
    read_pointers(dest, keys, pointers, &mut c).await;
    Ok(c)
}

/// Read `pointers` into the census `c` (references, unreadable, foreign).
async fn read_pointers(
    dest: &Destination,
    keys: &[MasterKey],
    pointers: Vec<String>,
    c: &mut Census,
) {
    let ids: Vec<[u8; 8]> = keys.iter().map(|k| k.id()).collect();
    let read: Vec<(
        String,
        Result<Option<crate::format::pointer::Pointer>, String>,
    )> = futures::stream::iter(pointers)
        .map(|key| {
            let ids = &ids;
            async move {
                let res = match content::fetch_pointer(dest, &key).await {
                    Err(e) => Err(e.to_string()),
                    Ok(bytes) => match content::header_key_id(&bytes) {
                        Some(id) if !ids.contains(&id) => Ok(None),
                        _ => content::decode_pointer(keys, &key, &bytes).map(Some),
                    },
                };
                (key, res)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for (key, res) in read {
        match res {
            Ok(Some(p)) => {
                c.pointers += 1;
                c.logical_bytes = c.logical_bytes.saturating_add(p.size);
                c.refs.entry(p.blob).or_default().push(key);
            }
            Ok(None) => c.foreign += 1,
            // A pointer deleted since the listing (retention) references nothing.
            Err(e) if e.contains("is missing from") => {}
            Err(e) => c.unreadable.push((key, e)),
        }
    }
}

/// The blob namespaces a node holding `keys` may sweep: the plain one (every node reads plain
/// pointers) and those of its own keys (only it, or the fleet sharing the key, reads the
/// pointers naming them).
fn sweepable(keys: &[MasterKey]) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = keys.iter().map(|k| key_namespace(&k.id_hex())).collect();
    out.insert(PLAIN_NAMESPACE.to_string());
    out
}

/// What one sweep did (or, with `dry_run`, would do).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct SweepReport {
    /// Destination name.
    pub dest: String,
    /// Why nothing was swept, if so (unreadable pointers, a recent sweep).
    pub skipped: Option<String>,
    /// Blobs set aside (unreferenced, older than the grace period).
    pub set_aside: Vec<String>,
    /// Blobs put back from the trash (a pointer names them again).
    pub put_back: Vec<String>,
    /// Blobs deleted for good (set aside at least the grace period ago, still unreferenced).
    pub deleted: Vec<String>,
    /// Blobs referenced, and their stored bytes, after the sweep.
    pub referenced: u64,
    /// Stored bytes of the referenced blobs.
    pub referenced_bytes: u64,
    /// Original bytes of the files the pointers stand for.
    pub logical_bytes: u64,
    /// Stored bytes of every blob listed (referenced or not), before the sweep.
    pub blob_bytes: u64,
    /// Operations that failed, with why (retried by the next sweep).
    pub failed: Vec<(String, String)>,
}

/// One sweep's settings: where, when, how long the grace period is, which namespaces.
struct Sweep<'a> {
    dest: &'a Destination,
    keys: &'a [MasterKey],
    grace_ms: i64,
    now_ms: i64,
    dry_run: bool,
    namespaces: BTreeSet<String>,
}

impl Sweep<'_> {
    /// Whether `blob` lies in a namespace this sweep may collect.
    fn ours(&self, blob: &str) -> bool {
        BlobKey::parse(blob).is_some_and(|b| self.namespaces.contains(b.namespace))
    }

    /// Step 2: put back what the trash holds that is referenced again; delete what stayed
    /// unreferenced for the grace period; clear mark objects of sweeps that did not finish.
    async fn tidy_trash(&self, c: &Census, r: &mut SweepReport) {
        for (aside, blob, ms) in &c.aside {
            if !self.ours(blob) {
                continue;
            }
            if c.refs.contains_key(blob) {
                if !self.dry_run {
                    put_back(self.dest, aside, blob, !c.blobs.contains_key(blob), r).await;
                }
                r.put_back.push(blob.clone());
            } else if ms.saturating_add(self.grace_ms) <= self.now_ms {
                if !self.dry_run {
                    delete(self.dest, aside, r).await;
                }
                r.deleted.push(blob.clone());
            }
        }
        // What those sweeps set aside was handled above: once a grace period old, their mark
        // objects are only litter.
        for mark in &c.marks {
            let started = mark
                .rsplit('/')
                .next()
                .and_then(|n| n.strip_prefix("sweep-"))
                .and_then(|n| n.split('-').next())
                .and_then(|ms| ms.parse::<i64>().ok());
            if !self.dry_run
                && started.is_some_and(|ms| ms.saturating_add(self.grace_ms) < self.now_ms)
            {
                delete(self.dest, mark, r).await;
            }
        }
    }

    /// Step 3: blobs of our namespaces no pointer names, unmodified for the grace period.
    fn candidates(&self, c: &Census) -> Vec<String> {
        c.blobs
            .iter()
            .filter(|(blob, meta)| {
                self.ours(blob)
                    && !c.refs.contains_key(*blob)
                    && meta
                        .last_modified
                        .timestamp_millis()
                        .saturating_add(self.grace_ms)
                        <= self.now_ms
            })
            .map(|(blob, _)| blob.clone())
            .collect()
    }

    /// Steps 4 and 5: write the mark, set the candidates aside, read the pointers again and
    /// put back every candidate one names now (all of them if a pointer cannot be read).
    async fn set_aside(&self, candidates: Vec<String>, r: &mut SweepReport) -> anyhow::Result<()> {
        let now_ms = self.now_ms;
        let mark = format!("{GC_PREFIX}/sweep-{now_ms}-{:08x}.json", fastrand::u32(..));
        let body = serde_json::json!({ "started_ms": now_ms, "candidates": candidates });
        put(self.dest, &mark, body.to_string().into_bytes()).await?;
        for blob in &candidates {
            match rename(self.dest, blob, &trash_key(blob, now_ms)).await {
                Ok(true) => r.set_aside.push(blob.clone()),
                // Another sweep moved it first.
                Ok(false) => {}
                Err(e) => r.failed.push((blob.clone(), e.to_string())),
            }
        }
        // An error here leaves the blobs in the trash, where readers find them and the next
        // sweep puts back those that are referenced.
        let again = census(self.dest, self.keys).await?;
        let all = !again.unreadable.is_empty();
        for blob in std::mem::take(&mut r.set_aside) {
            if all || again.refs.contains_key(&blob) {
                put_back(self.dest, &trash_key(&blob, now_ms), &blob, true, r).await;
                r.put_back.push(blob);
            } else {
                r.set_aside.push(blob);
            }
        }
        delete(self.dest, &mark, r).await;
        Ok(())
    }
}

/// Sweep `dest` (see the module's protocol) at `now_ms` with a grace period of `grace`.
pub(crate) async fn sweep(
    dest: &Destination,
    keys: &[MasterKey],
    grace: Duration,
    now_ms: i64,
    dry_run: bool,
) -> anyhow::Result<SweepReport> {
    let mut r = SweepReport {
        dest: dest.name.clone(),
        ..Default::default()
    };
    // Every node's hourly prune sweeps; one sweep per half grace period (at most an hour) is
    // enough, so a sweep that finished since then makes this one skip the listing.
    let window = (grace / 2).min(Duration::from_secs(3600)).as_millis() as i64;
    if !dry_run
        && let Some(last) = last_sweep_ms(dest).await
        && now_ms.saturating_sub(last) < window
    {
        r.skipped = Some(format!(
            "a sweep finished {} s ago; the next one is due {} s after it",
            now_ms.saturating_sub(last) / 1000,
            window / 1000
        ));
        return Ok(r);
    }
    let c = census(dest, keys).await?;
    r.logical_bytes = c.logical_bytes;
    r.blob_bytes = c.blob_bytes();
    (r.referenced, r.referenced_bytes) = c
        .blobs
        .iter()
        .filter(|(b, _)| c.refs.contains_key(*b))
        .fold((0, 0), |(n, s), (_, m)| (n + 1, s + m.size));
    if let Some((key, why)) = c.unreadable.first() {
        r.skipped = Some(format!(
            "{} pointer(s) could not be read, so no blob is collected (first: {key}: {why})",
            c.unreadable.len()
        ));
        return Ok(r);
    }
    let s = Sweep {
        dest,
        keys,
        grace_ms: grace.as_millis() as i64,
        now_ms,
        dry_run,
        namespaces: sweepable(keys),
    };
    s.tidy_trash(&c, &mut r).await;
    let candidates = s.candidates(&c);
    if dry_run {
        r.set_aside = candidates;
        return Ok(r);
    }
    if !candidates.is_empty() {
        s.set_aside(candidates, &mut r).await?;
    }
    let done = serde_json::json!({ "finished_ms": crate::format::units::now_ms() });
    if let Err(e) = put(
        dest,
        &format!("{GC_PREFIX}/{LAST_SWEEP}"),
        done.to_string().into_bytes(),
    )
    .await
    {
        tracing::warn!(dest = %dest.name, error = %format!("{e:#}"), "cannot record the sweep");
    }
    tracing::info!(dest = %dest.name, set_aside = r.set_aside.len(), put_back = r.put_back.len(), deleted = r.deleted.len(), "blob sweep done");
    Ok(r)
}

/// The object (under [`GC_PREFIX`]) where a finished sweep records when it finished.
const LAST_SWEEP: &str = "last-sweep.json";

/// When the last sweep of `dest` finished (ms since the epoch), if one is recorded.
async fn last_sweep_ms(dest: &Destination) -> Option<i64> {
    let path = dest.path(&format!("{GC_PREFIX}/{LAST_SWEEP}")).ok()?;
    let got = dest.store.get(&path).await.ok()?;
    if got.meta.size > 4096 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&got.bytes().await.ok()?).ok()?;
    v["finished_ms"].as_i64()
}

/// Copy the set-aside `aside` back to `blob` (when `copy`: the blob is not there), then
/// remove `aside`.
async fn put_back(dest: &Destination, aside: &str, blob: &str, copy: bool, r: &mut SweepReport) {
    if copy {
        let res = async {
            let (from, to) = (dest.path(aside)?, dest.path(blob)?);
            match dest.store.copy(&from, &to).await {
                // Another sweep put it back or deleted its copy (a writer that needs it
                // uploads it again after writing its pointer).
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(StoreError::classify(
                    format!("putting {blob} back in {}", dest.name),
                    &e,
                )),
            }
        }
        .await;
        if let Err(e) = res {
            r.failed.push((blob.to_string(), e.to_string()));
            return;
        }
    }
    delete(dest, aside, r).await;
}

/// Move `from` to `to` within `dest` (a rename where the store has one); `false` when `from`
/// is gone.
async fn rename(dest: &Destination, from: &str, to: &str) -> Result<bool, StoreError> {
    let (a, b) = (dest.path(from)?, dest.path(to)?);
    match dest.store.rename(&a, &b).await {
        Ok(()) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(StoreError::classify(
            format!("moving {from} to {to} in {}", dest.name),
            &e,
        )),
    }
}

async fn delete(dest: &Destination, key: &str, r: &mut SweepReport) {
    let res = async {
        let path = dest.path(key)?;
        match dest.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::Retryable(format!(
                "deleting {key} from {}: {}",
                dest.name,
                error_chain(&e)
            ))),
        }
    }
    .await;
    if let Err(e) = res {
        r.failed.push((key.to_string(), e.to_string()));
    }
}

async fn put(dest: &Destination, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
    let path = dest.path(key)?;
    dest.store
        .put(&path, PutPayload::from(body))
        .await
        .map_err(|e| anyhow::anyhow!("writing {key} to {}: {}", dest.name, error_chain(&e)))?;
    Ok(())
}

/// What `verify` finds across a content destination.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Audit {
    /// Pointers naming a blob that is not there: (pointer, blob, whether a copy set aside
    /// still holds it).
    pub dangling: Vec<(String, String, bool)>,
    /// Blobs no readable pointer names (collected after the grace period).
    pub orphaned: Vec<String>,
    /// Pointers that could not be read, with why.
    pub unreadable: Vec<(String, String)>,
    /// Mark objects of sweeps that did not finish.
    pub interrupted_sweeps: Vec<String>,
}

/// Audit `dest`: dangling references, orphaned blobs, unreadable pointers.
pub(crate) async fn audit(dest: &Destination, keys: &[MasterKey]) -> anyhow::Result<Audit> {
    let c = census(dest, keys).await?;
    let namespaces = sweepable(keys);
    let aside: BTreeSet<&String> = c.aside.iter().map(|(_, b, _)| b).collect();
    let mut a = Audit {
        unreadable: c.unreadable.clone(),
        interrupted_sweeps: c.marks.clone(),
        ..Default::default()
    };
    for (blob, pointers) in &c.refs {
        if !c.blobs.contains_key(blob) {
            for p in pointers {
                a.dangling
                    .push((p.clone(), blob.clone(), aside.contains(blob)));
            }
        }
    }
    a.orphaned = c
        .blobs
        .keys()
        .filter(|b| {
            !c.refs.contains_key(*b)
                && BlobKey::parse(b).is_some_and(|k| namespaces.contains(k.namespace))
        })
        .cloned()
        .collect();
    Ok(a)
}
