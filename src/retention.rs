//! Remote retention (`prune`): delete this node's objects older than `remote_max_age` (or a
//! watch's own override), under its own watch prefixes only. A prefix must contain the node id
//! as a whole segment (`{node}`), otherwise this node's objects cannot be told from another
//! node's and that tree is skipped with a warning. Status objects (`_panoptic-sync/`) are never
//! touched. Pruned objects are forgotten by the index (never used as a copy source), while
//! the uploads stay recorded as done, so an unchanged local file is not uploaded again.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStoreExt;

use crate::config::Config;
use crate::destination::{self, Destination};
use crate::index::Index;

/// How often the daemon applies retention.
pub(crate) const INTERVAL: Duration = Duration::from_secs(3600);

/// What `prune` did (or would do).
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct PruneReport {
    /// Every object deleted, or that would be with `--dry-run`.
    pub expired: Vec<Expired>,
    /// Watch prefixes skipped because they do not contain the node id.
    pub skipped_prefixes: Vec<String>,
    /// Objects that could not be deleted, with the reason.
    pub failed: Vec<PruneFailure>,
}

/// An object retention deleted (or would delete).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Expired {
    /// Destination name.
    pub dest: String,
    /// The object's full key.
    pub key: String,
}

/// An object retention could not delete.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct PruneFailure {
    /// Destination name.
    pub dest: String,
    /// The object's key.
    pub key: String,
    /// Why.
    pub error: String,
}

/// Whether any remote retention is configured.
pub(crate) fn enabled(config: &Config) -> bool {
    config.retention.remote_max_age.is_some()
        || config.watch.iter().any(|w| w.remote_max_age.is_some())
}

/// Apply retention now (or only list with `dry_run`).
pub(crate) async fn prune(config: &Config, dry_run: bool) -> anyhow::Result<PruneReport> {
    let index = Arc::new(Index::open(&config.state_dir)?);
    let dests = destination::open_all(config)?;
    let mut report = PruneReport::default();
    let now = chrono_now();
    for watch in &config.watch {
        let Some(age) = watch.remote_max_age.or(config.retention.remote_max_age) else {
            continue;
        };
        let prefix = watch.prefix.replace("{node}", &config.node_id);
        if !prefix.split('/').any(|seg| seg == config.node_id) {
            tracing::warn!(prefix = %prefix, node = %config.node_id, "not pruning: the watch prefix does not contain the node id, so this node's objects cannot be told from others'");
            report.skipped_prefixes.push(prefix);
            continue;
        }
        let cutoff = now - age.as_secs_f64();
        for dest in &dests {
            prune_prefix(&index, dest, &prefix, cutoff, dry_run, &mut report).await?;
        }
    }
    Ok(report)
}

fn chrono_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn prune_prefix(
    index: &Arc<Index>,
    dest: &Destination,
    prefix: &str,
    cutoff: f64,
    dry_run: bool,
    report: &mut PruneReport,
) -> anyhow::Result<()> {
    let listing = dest.list_under(prefix).await.map_err(anyhow::Error::from)?;
    // A key object_store cannot address cannot be deleted through it: it fails alone, named.
    for bad in listing.bad_keys {
        tracing::warn!(dest = %dest.name, key = %bad.key, reason = %bad.reason, "cannot prune");
        report.failed.push(PruneFailure {
            dest: dest.name.clone(),
            key: bad.key,
            error: format!("cannot delete: {}", bad.reason),
        });
    }
    let objects = listing.objects;
    for meta in objects {
        let modified = meta.last_modified.timestamp() as f64;
        let key = meta.location.to_string();
        let rel = dest.relative(&key).to_string();
        if modified >= cutoff || rel.starts_with(crate::layout::INTERNAL_PREFIX) {
            continue;
        }
        if !dry_run {
            match dest.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    let (i, d, r) = (index.clone(), dest.name.clone(), rel.clone());
                    tokio::task::spawn_blocking(move || i.forget_stored(&d, &r)).await??;
                    tracing::info!(dest = %dest.name, key = %key, "pruned");
                }
                Err(e) => {
                    report.failed.push(PruneFailure {
                        dest: dest.name.clone(),
                        key: key.clone(),
                        error: destination::error_chain(&e),
                    });
                    continue;
                }
            }
        }
        report.expired.push(Expired {
            dest: dest.name.clone(),
            key,
        });
    }
    Ok(())
}
