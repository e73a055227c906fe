//! The sealed runs in a destination, whichever node sealed them: found by listing the store
//! for run manifests (`<key prefix>/_run/manifest.json…`), so a reader needs no `[[watch]]` of
//! its own (`serve`, `restore --run NODE/RUN`, `report --run NODE/RUN`).
//!
//! Which object is a run's manifest follows `restore --run`'s rule: with a key configured only
//! an encrypted (authenticated) object is a candidate, an encrypted one is preferred to a plain
//! one, then the newest. Manifests are read (and authenticated) through
//! [`crate::runs::read_manifest`] and kept in a small cache keyed by object and modification
//! time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use std::io::Read;

use anyhow::Context;
use object_store::{Attribute, ObjectStoreExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::destination::{self, Destination};
use crate::format::layout;
use crate::format::manifest::{MANIFEST_FORMAT, MANIFEST_NAME, Manifest, RUN_DIR};
use crate::pipeline::{self, Pipeline};

/// Manifests kept in memory.
const CACHED_MANIFESTS: usize = 512;

/// One sealed run found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The run's key prefix (`<watch prefix>/<run>`), relative to the destination base.
    pub key_prefix: String,
    /// Its manifest's stored key.
    pub manifest_key: String,
    /// When the manifest object was written, ms since the epoch.
    pub modified_ms: i64,
}

impl Entry {
    /// The run's name: the last segment of its key prefix.
    pub(crate) fn run(&self) -> &str {
        self.key_prefix
            .rsplit_once('/')
            .map_or(self.key_prefix.as_str(), |(_, r)| r)
    }

    /// The key prefix it lies under (`<watch prefix>`, for a node's run list).
    pub(crate) fn parent(&self) -> &str {
        self.key_prefix.rsplit_once('/').map_or("", |(p, _)| p)
    }
}

/// Every run manifest in `dest`, by key prefix.
pub(crate) async fn list(
    dest: &Destination,
    pipeline: &Pipeline,
) -> anyhow::Result<BTreeMap<String, Entry>> {
    let listing = dest.list_under("").await?;
    let mut best: BTreeMap<String, (bool, i64, Entry)> = BTreeMap::new();
    let suffix = format!("/{RUN_DIR}/{MANIFEST_NAME}");
    for meta in listing.objects {
        let rel = dest.relative(meta.location.as_ref());
        let p = layout::parse(rel);
        if p.long || (pipeline.key.is_some() && !p.plan.encrypt) {
            continue;
        }
        let Some(key_prefix) = p.logical.strip_suffix(&suffix) else {
            continue;
        };
        if key_prefix.is_empty() || key_prefix.contains(&format!("/{RUN_DIR}/")) {
            continue;
        }
        let rank = (p.plan.encrypt, meta.last_modified.timestamp_millis());
        let entry = Entry {
            key_prefix: key_prefix.to_string(),
            manifest_key: rel.to_string(),
            modified_ms: rank.1,
        };
        match best.get(key_prefix) {
            Some((e, m, _)) if (*e, *m) >= rank => {}
            _ => {
                best.insert(key_prefix.to_string(), (rank.0, rank.1, entry));
            }
        }
    }
    Ok(best.into_iter().map(|(k, (_, _, e))| (k, e)).collect())
}

/// Manifests read from one destination, cached by stored key and modification time.
#[derive(Default)]
pub(crate) struct Manifests {
    cache: Mutex<HashMap<String, (i64, Arc<Manifest>)>>,
}

impl Manifests {
    /// The manifest of `entry`, read and authenticated once per version of its object.
    pub(crate) async fn get(
        &self,
        dest: &Destination,
        pipeline: &Pipeline,
        entry: &Entry,
    ) -> anyhow::Result<Arc<Manifest>> {
        if let Some((ms, m)) = self.lock().get(&entry.manifest_key)
            && *ms == entry.modified_ms
        {
            return Ok(m.clone());
        }
        let m = Arc::new(
            read_manifest(dest, pipeline, &entry.manifest_key)
                .await
                .map_err(|e| anyhow::anyhow!("manifest {}: {e:#}", entry.manifest_key))?,
        );
        anyhow::ensure!(
            m.key_prefix == entry.key_prefix,
            "manifest {} names the run at {:?}, not {:?}",
            entry.manifest_key,
            m.key_prefix,
            entry.key_prefix
        );
        let mut cache = self.lock();
        if cache.len() >= CACHED_MANIFESTS {
            cache.clear();
        }
        cache.insert(entry.manifest_key.clone(), (entry.modified_ms, m.clone()));
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Arc<Manifest>)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The newest manifest of run `run` sealed by node `node` in `dest`: its stored key and the
/// manifest, read and authenticated.
pub(crate) async fn find(
    dest: &Destination,
    pipeline: &Pipeline,
    node: &str,
    run: &str,
) -> anyhow::Result<(String, Manifest)> {
    let runs = list(dest, pipeline).await?;
    let mut best: Option<(String, Manifest)> = None;
    let mut errors = Vec::new();
    for e in runs.values().filter(|e| e.run() == run) {
        match read_manifest(dest, pipeline, &e.manifest_key).await {
            Ok(m) if m.node == node && m.run == run && m.key_prefix == e.key_prefix => {
                if best.as_ref().is_none_or(|(_, b)| m.sealed_ms > b.sealed_ms) {
                    best = Some((e.manifest_key.clone(), m));
                }
            }
            Ok(_) => {}
            Err(err) => errors.push(format!("manifest {}: {err:#}", e.manifest_key)),
        }
    }
    match best {
        Some(found) => Ok(found),
        None if !errors.is_empty() => anyhow::bail!(
            "no readable manifest of run {run:?} of node {node:?} in {}: {}",
            dest.name,
            errors.join("; ")
        ),
        // No such run: the command line asked for what is not there (exit 2).
        None => Err(crate::error::UsageError(format!(
            "no manifest of run {run:?} of node {node:?} in {}: is it sealed?",
            dest.name
        ))
        .into()),
    }
}

/// A sealed run of any node, as `runs --fleet` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FleetRun {
    /// The node that sealed it.
    pub node: String,
    /// The run's name.
    pub run: String,
    /// Its key prefix in the destination.
    pub key_prefix: String,
    /// When it was sealed (ms since the epoch).
    pub sealed_ms: i64,
    /// Its CI branch and commit.
    pub branch: Option<String>,
    /// Its commit.
    pub commit: Option<String>,
    /// Whether its tests passed (absent without test results).
    pub passed: Option<bool>,
    /// Files and bytes.
    pub files: u64,
    /// Bytes of its files.
    pub bytes: u64,
    /// Why its manifest could not be read (the other fields are then empty).
    pub error: Option<String>,
}

/// Every sealed run in `dest`, newest first.
pub(crate) async fn fleet_runs(
    dest: &Destination,
    pipeline: &Pipeline,
) -> anyhow::Result<Vec<FleetRun>> {
    use futures::StreamExt;
    let runs = list(dest, pipeline).await?;
    let mut out: Vec<FleetRun> = futures::stream::iter(runs.into_values())
        .map(|e| async move {
            match read_manifest(dest, pipeline, &e.manifest_key).await {
                Ok(m) => FleetRun {
                    node: m.node.clone(),
                    run: m.run.clone(),
                    key_prefix: e.key_prefix,
                    sealed_ms: m.sealed_ms,
                    branch: m.ci.as_ref().and_then(|c| c.branch.clone()),
                    commit: m.ci.as_ref().and_then(|c| c.commit.clone()),
                    passed: m.tests.as_ref().map(|t| t.passed_run()),
                    files: m.totals.files,
                    bytes: m.totals.bytes,
                    error: None,
                },
                Err(err) => FleetRun {
                    node: String::new(),
                    run: e.run().to_string(),
                    key_prefix: e.key_prefix.clone(),
                    sealed_ms: 0,
                    branch: None,
                    commit: None,
                    passed: None,
                    files: 0,
                    bytes: 0,
                    error: Some(format!("manifest {}: {err:#}", e.manifest_key)),
                },
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    out.sort_by_key(|r| std::cmp::Reverse(r.sealed_ms));
    Ok(out)
}

/// Largest manifest `restore --run` reads.
const MAX_MANIFEST: u64 = 256 * 1024 * 1024;

/// Download, decode and parse a manifest. With a key configured, only an encrypted (and so
/// authenticated) manifest is accepted.
pub(crate) async fn read_manifest(
    dest: &Destination,
    pipeline: &Pipeline,
    stored_key: &str,
) -> anyhow::Result<Manifest> {
    let plan = layout::parse(stored_key).plan;
    if pipeline.key.is_some() && !plan.encrypt {
        anyhow::bail!(
            "not encrypted although a key is configured: refused (anyone who can write to the bucket can plant it)"
        );
    }
    let location = dest.path(stored_key)?;
    let get = dest
        .store
        .get(&location)
        .await
        .map_err(|e| anyhow::anyhow!("downloading: {}", destination::error_chain(&e)))?;
    // A plain manifest in S3, GCS or Azure carries its SHA-256 like any plain object.
    let recorded = get
        .attributes
        .get(&Attribute::Metadata(crate::format::metadata::SHA256.into()))
        .map(|v| v.as_ref().to_string());
    // Streamed, never held whole: the decoded manifest is capped below, so an object of any
    // size costs no more memory than the cap.
    let raw = crate::restore::download(dest.store.clone(), get);
    let (keys, key) = (pipeline.keys.clone(), stored_key.to_string());
    let legacy = pipeline.legacy_manifests;
    let body = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let (r, meta) = pipeline::manifest_decoder(plan, &keys, &key, legacy, raw)?;
        let mut body = Vec::new();
        r.take(MAX_MANIFEST + 1).read_to_end(&mut body)?;
        anyhow::ensure!(
            body.len() as u64 <= MAX_MANIFEST,
            "larger than {MAX_MANIFEST} bytes"
        );
        if let Some(want) = meta.map(|m| m.sha256).or(recorded) {
            anyhow::ensure!(
                crate::restore::same_sha256(&want, &hex::encode(Sha256::digest(&body))),
                "content does not match the SHA-256 recorded with it"
            );
        }
        Ok(body)
    })
    .await??;
    #[derive(Deserialize)]
    struct Version {
        format: u32,
    }
    let v: Version = serde_json::from_slice(&body).context("not a manifest")?;
    anyhow::ensure!(
        v.format == MANIFEST_FORMAT,
        "manifest format {} is not known to this build (it reads {MANIFEST_FORMAT})",
        v.format
    );
    serde_json::from_slice(&body).context("not a valid manifest")
}
