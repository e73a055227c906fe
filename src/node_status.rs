//! This node's status, published to its primary for the fleet view: built from the index's
//! status and the latest sealed runs, written as a [`NodeStatus`] object (the format is in
//! [`crate::format::node_status`]), and read back, capped, by `report --fleet`.

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStoreExt, PutPayload};

use crate::config::{Config, Encryption};
use crate::destination::{self, Destination};
use crate::format::layout::NODES_PREFIX;
use crate::format::node_status::{DestStatus, NodeStatus, STATUS_FORMAT, STATUS_MAX_BYTES};
use crate::format::units::now_secs;
use crate::index::{Index, Status};

/// Sealed runs listed in the status object.
const STATUS_RUNS: usize = 5;

impl NodeStatus {
    /// This node's status from the index.
    pub(crate) fn from_status(config: &Config, s: &Status) -> NodeStatus {
        let (done, bad) = s.destinations.iter().fold((0u64, 0u64), |a, d| {
            (
                a.0.saturating_add(d.done),
                a.1.saturating_add(d.failing)
                    .saturating_add(d.failed_permanently),
            )
        });
        NodeStatus {
            format: STATUS_FORMAT,
            node_id: config.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            last_seen: now_secs(),
            files: s.files,
            bytes: s.bytes,
            destinations: s
                .destinations
                .iter()
                .map(|d| DestStatus {
                    name: d.name.clone(),
                    done: d.done,
                    pending: d.pending,
                    failing: d.failing,
                    failed_permanently: d.failed_permanently,
                    ..Default::default()
                })
                .collect(),
            oldest_pending_secs: s
                .destinations
                .iter()
                .filter_map(|d| d.oldest_pending_secs)
                .max(),
            last_error: s.destinations.iter().find_map(|d| d.last_error.clone()),
            success_rate: if done.saturating_add(bad) == 0 {
                1.0
            } else {
                done as f64 / (done as f64 + bad as f64)
            },
            latest_runs: Vec::new(),
        }
    }
}

fn nodes_path(primary: &Destination, file: Option<&str>) -> anyhow::Result<ObjectPath> {
    let rel = match file {
        Some(f) => format!("{NODES_PREFIX}/{f}"),
        None => NODES_PREFIX.to_string(),
    };
    Ok(primary.path(&rel)?)
}

/// Write this node's status object to `primary` (opened once by the caller: the daemon
/// publishes every minute).
pub(crate) async fn publish(
    primary: &Destination,
    config: &Config,
    index: &Arc<Index>,
) -> anyhow::Result<()> {
    let names: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    let c = config.clone();
    let (status, mut latest_runs) = index
        .call(move |i| Ok((i.status(&names)?, crate::runs::latest(&c, i, STATUS_RUNS)?)))
        .await?;
    if config.pipeline.encryption != Encryption::None {
        // The object is plaintext by design (every node reads it): what the admin chose to
        // encrypt, the CI context among it, stays out (docs/FORMAT.md).
        for run in &mut latest_runs {
            run.branch = None;
        }
    }
    let names: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    let storage = index
        .call(move |i| {
            names
                .iter()
                .map(|n| i.storage_totals(n))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await?;
    let mut node = NodeStatus {
        latest_runs,
        ..NodeStatus::from_status(config, &status)
    };
    for (d, t) in node.destinations.iter_mut().zip(storage) {
        (d.logical_bytes, d.stored_bytes, d.dedup_saved_bytes) =
            (t.logical_bytes, t.stored_bytes, t.dedup_saved_bytes);
    }
    let path = nodes_path(primary, Some(&format!("{}.json", config.node_id)))?;
    primary
        .store
        .put(&path, PutPayload::from(serde_json::to_vec_pretty(&node)?))
        .await
        .map_err(|e| anyhow::anyhow!("writing {path}: {}", destination::error_chain(&e)))?;
    Ok(())
}

/// After a `sync`: publish once, from the index on disk (failures are logged, not returned:
/// the sync's own result stands).
pub(crate) async fn publish_after_sync(config: &Config) {
    let res = async {
        let primary = destination::open_primary(config)?;
        let index = Arc::new(Index::open(&config.state_dir)?);
        publish(&primary, config, &index).await
    }
    .await;
    if let Err(e) = res {
        tracing::warn!(error = %format!("{e:#}"), "cannot publish the node status object");
    }
}

/// Read one status object: never more than [`STATUS_MAX_BYTES`] (the object is streamed and
/// the read stops past the cap), so a huge object costs no memory.
pub(crate) async fn read_status(
    primary: &Destination,
    meta: &ObjectMeta,
) -> anyhow::Result<NodeStatus> {
    let too_big = || {
        anyhow::anyhow!(
            "larger than the {} bytes a status object may have; not read",
            STATUS_MAX_BYTES
        )
    };
    if meta.size > STATUS_MAX_BYTES {
        return Err(too_big());
    }
    let mut stream = primary.store.get(&meta.location).await?.into_stream();
    let mut buf = Vec::with_capacity(meta.size as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if (buf.len() + chunk.len()) as u64 > STATUS_MAX_BYTES {
            // Dropping the stream closes the connection: the rest is never downloaded.
            return Err(too_big());
        }
        buf.extend_from_slice(&chunk);
    }
    let mut status: NodeStatus = serde_json::from_slice(&buf).context("not a status object")?;
    // The node is the one whose key this is: each node writes its own object, and a
    // self-declared `node_id` that differs (another node's, or escape sequences) is not believed.
    let name = meta.location.filename().unwrap_or_default();
    status.node_id = name.strip_suffix(".json").unwrap_or(name).to_string();
    Ok(status)
}
