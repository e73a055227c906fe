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

use crate::destination::Destination;
use crate::format::layout;
use crate::format::manifest::{MANIFEST_NAME, Manifest, RUN_DIR};
use crate::pipeline::Pipeline;

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
            crate::runs::read_manifest(dest, pipeline, &entry.manifest_key)
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
