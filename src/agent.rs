//! The agent's opened parts: the state directory's lock, the [`Parts`] a configuration opens
//! (stores, keys, roots, limits), and the [`Agent`] that runs on them (the ingest thread and
//! one upload worker per destination). `run` (the daemon) and `sync`/`flush` start it; the
//! configuration's way stops here: below, functions take the parts they use.
//!
//! ```text
//! watcher ─┐
//! scanner ─┼─> ingest thread (stat, hash, index batch) ─> uploads table ─> worker per destination
//! workers ─┘   (changed files come back)
//! ```
//! [`check_config`] opens the same parts and proves each destination writable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::destination::{self, Destination};
use crate::index::Index;
use crate::ingest::{Ingest, IngestStats};
use crate::scan::{self, Feeder, Root};
use crate::upload::{UploadStats, Worker};

/// An exclusive lock on the state directory: one daemon (or `sync`) per index.
pub struct StateLock {
    _file: std::fs::File,
}

impl StateLock {
    /// Take the lock, or say who holds it.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        match Self::try_acquire(state_dir)? {
            Some(l) => Ok(l),
            None => {
                let pid = std::fs::read_to_string(state_dir.join("lock")).unwrap_or_default();
                anyhow::bail!(
                    "another panoptic-sync (pid {}) is already using the state directory {}; \
                     use `flush` to wait for it",
                    pid.trim(),
                    state_dir.display()
                )
            }
        }
    }

    /// Take the lock if it is free.
    pub fn try_acquire(state_dir: &Path) -> anyhow::Result<Option<StateLock>> {
        use std::io::{Seek, Write};
        crate::index::create_state_dir(state_dir)?;
        let path = state_dir.join("lock");
        let mut file = crate::index::open_private(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        let _ = write!(file, "{}", std::process::id());
        Ok(Some(StateLock { _file: file }))
    }
}

/// Everything a configuration needs opened before work starts: stores, keys, roots. Built
/// first on reload, so a configuration that cannot be used is rejected before anything stops.
pub struct Parts {
    pub(crate) config: Config,
    pub(crate) dests: Vec<Destination>,
    pub(crate) pipeline: Arc<crate::pipeline::Pipeline>,
    pub(crate) roots: Arc<Vec<Root>>,
    pub(crate) global_limit: Option<Arc<crate::throttle::Limiter>>,
}

impl Parts {
    /// Open destinations and load keys for `config`.
    pub fn prepare(config: Config) -> anyhow::Result<Parts> {
        let dests = destination::open_all(&config)?;
        let pipeline = Arc::new(crate::pipeline::Pipeline::from_config(&config)?);
        let roots = Arc::new(Root::from_config(&config));
        let global_limit = config
            .limits
            .max_rate
            .map(|r| Arc::new(crate::throttle::Limiter::new(r)));
        Ok(Parts {
            config,
            dests,
            pipeline,
            roots,
            global_limit,
        })
    }
}

/// The running pieces shared by `run` and `sync`.
pub(crate) struct Agent {
    pub(crate) index: Arc<Index>,
    pub(crate) roots: Arc<Vec<Root>>,
    pub(crate) feeder: Feeder,
    pub(crate) ingest: Option<std::thread::JoinHandle<()>>,
    pub(crate) ingest_stats: Arc<IngestStats>,
    pub(crate) workers: Vec<(String, tokio::task::JoinHandle<()>, Arc<UploadStats>)>,
    workers_cancel: CancellationToken,
}

impl Agent {
    pub(crate) fn start(
        parts: Parts,
        index: Arc<Index>,
        max_attempts: Option<i64>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Agent> {
        let Parts {
            dests,
            pipeline,
            roots,
            global_limit,
            ..
        } = parts;
        // Each multipart upload holds a few parts in memory; bound how many run at once.
        let multipart_slots = Arc::new(tokio::sync::Semaphore::new(3));
        let (feeder, rx, outstanding) = Feeder::new(65_536, Some(index.clone()));
        let wakes: Vec<Arc<Notify>> = dests.iter().map(|_| Arc::new(Notify::new())).collect();
        let ingest_stats = Arc::new(IngestStats::default());
        let ingest = Ingest {
            index: index.clone(),
            roots: roots.clone(),
            dests: dests.iter().map(|d| d.name.clone()).collect(),
            wake: wakes.clone(),
            outstanding,
            stats: ingest_stats.clone(),
            metrics: metrics.clone(),
            closed: feeder.closed(),
        };
        let ingest = std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || ingest.run(rx))
            .context("starting the ingest thread")?;
        let workers_cancel = CancellationToken::new();
        let workers = dests
            .into_iter()
            .zip(wakes)
            .map(|(dest, wake)| {
                let stats = Arc::new(UploadStats::default());
                let name = dest.name.clone();
                let worker = Worker {
                    dest,
                    index: index.clone(),
                    wake,
                    feeder: feeder.clone(),
                    roots: roots.clone(),
                    max_attempts,
                    stats: stats.clone(),
                    drain: Duration::from_secs(10),
                    pipeline: pipeline.clone(),
                    multipart_slots: multipart_slots.clone(),
                    metrics: metrics.clone(),
                    global_limit: global_limit.clone(),
                    index_failures: Default::default(),
                };
                let handle = tokio::spawn(worker.run(workers_cancel.clone()));
                (name, handle, stats)
            })
            .collect();
        Ok(Agent {
            index,
            roots,
            feeder,
            ingest: Some(ingest),
            ingest_stats,
            workers,
            workers_cancel,
        })
    }

    /// Walk every tree and drop rows of deleted files. Returns files queued for ingest.
    pub(crate) async fn catch_up(&self) -> anyhow::Result<u64> {
        let (roots, feeder, index) = (self.roots.clone(), self.feeder.clone(), self.index.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let (walked, dropped) = scan::walk_and_sweep(&index, &roots, &feeder);
            let n = walked.queued;
            let dropped = dropped?;
            if dropped > 0 {
                tracing::info!(
                    dropped,
                    "forgot files deleted from disk (their objects stay)"
                );
            }
            Ok(n)
        })
        .await
        .context("scan task failed")?
    }

    /// Stop workers (draining), then the ingest thread.
    pub(crate) async fn stop(mut self) {
        self.workers_cancel.cancel();
        for (name, handle, _) in self.workers.drain(..) {
            if let Err(e) = handle.await {
                tracing::error!(dest = %name, error = %e, "worker ended abnormally");
            }
        }
        drop(self.feeder);
        if let Some(t) = self.ingest.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

pub(crate) fn open_index(config: &Config) -> anyhow::Result<Arc<Index>> {
    Ok(Arc::new(Index::open(&config.state_dir)?))
}

/// Validate the configuration; unless `offline`, prove each destination is reachable and
/// writable with a small probe object that is removed afterwards. Returns one line per
/// destination; `Err` names the first destination that failed.
pub async fn check_config(config: &Config, offline: bool) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    if !offline {
        let p = crate::pipeline::Pipeline::from_config(config)?;
        if let Some(k) = &p.key {
            lines.push(format!("encryption key id {} loaded", k.id_hex()));
        }
        if p.keys.len() > p.key.iter().count() {
            lines.push(format!(
                "{} key(s) for older objects loaded",
                p.keys.len() - p.key.iter().count()
            ));
        }
    }
    for d in config.destinations() {
        let dest = Destination::open(d)?;
        if offline {
            lines.push(format!("{}: {} (not contacted)", dest.name, dest.url));
            continue;
        }
        let key = format!(
            "{}/{}-{}",
            crate::format::layout::PROBE_PREFIX,
            config.node_id,
            fastrand::u64(..)
        );
        let path = dest.path(&key)?;
        use object_store::ObjectStoreExt;
        let probe = async {
            dest.store
                .put(
                    &path,
                    object_store::PutPayload::from_static(b"panoptic-sync probe"),
                )
                .await?;
            dest.store.head(&path).await?;
            dest.store.delete(&path).await
        };
        match tokio::time::timeout(Duration::from_secs(60), probe).await {
            Ok(Ok(())) => lines.push(format!(
                "{}: {} is reachable and writable",
                dest.name, dest.url
            )),
            Ok(Err(e)) => anyhow::bail!(
                "destination {:?} ({}) failed the write probe at {path}: {}",
                dest.name,
                dest.url,
                destination::error_chain(&e)
            ),
            Err(_) => anyhow::bail!(
                "destination {:?} ({}) did not answer the write probe within 60 s",
                dest.name,
                dest.url
            ),
        }
    }
    Ok(lines)
}
