//! The agent's long-running parts wired together, and the commands that drive them:
//! `run` (the daemon), `sync` (one pass) and `flush` (wait for what is on disk now).
//!
//! ```text
//! watcher ─┐
//! scanner ─┼─> ingest thread (stat, hash, index batch) ─> uploads table ─> worker per destination
//! workers ─┘   (changed files come back)
//! ```
//! Shutdown is ordered: watcher and scanner stop, workers stop claiming and drain (in-flight
//! uploads get a grace period, then are abandoned uncommitted), the ingest thread finishes its
//! queue, and the index is closed. Everything not done is still pending in the index.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::destination::{self, Destination};
use crate::index::{FlushState, Index, Stat};
use crate::ingest::{Ingest, IngestStats};
use crate::scan::{self, Feeder, Root};
use crate::upload::{UploadStats, Worker};
use crate::watch::WatchTask;

/// How often the trees are reconciled with the index while running.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(300);
/// How often while inotify is degraded (watch limit reached), since events may be missing.
pub const DEGRADED_SCAN_INTERVAL: Duration = Duration::from_secs(30);
/// Attempts per file in `sync` before it gives up on that file.
pub const SYNC_ATTEMPTS: i64 = 3;

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
    config: Config,
    dests: Vec<Destination>,
    pipeline: Arc<crate::pipeline::Pipeline>,
    roots: Arc<Vec<Root>>,
    global_limit: Option<Arc<crate::throttle::Limiter>>,
    /// Sends run notifications.
    notifier: Arc<crate::notify::Sender>,
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
        let notifier = Arc::new(crate::notify::Sender::new(&config)?);
        Ok(Parts {
            config,
            dests,
            pipeline,
            roots,
            global_limit,
            notifier,
        })
    }
}

/// The running pieces shared by `run` and `sync`.
struct Agent {
    index: Arc<Index>,
    roots: Arc<Vec<Root>>,
    feeder: Feeder,
    ingest: Option<std::thread::JoinHandle<()>>,
    ingest_stats: Arc<IngestStats>,
    workers: Vec<(String, tokio::task::JoinHandle<()>, Arc<UploadStats>)>,
    workers_cancel: CancellationToken,
}

impl Agent {
    fn start(
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
    async fn catch_up(&self) -> anyhow::Result<u64> {
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
    async fn stop(mut self) {
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

fn open_index(config: &Config) -> anyhow::Result<Arc<Index>> {
    Ok(Arc::new(Index::open(&config.state_dir)?))
}

/// The agent plus the tasks that feed it while running as a daemon.
struct Running {
    agent: Agent,
    tasks_cancel: CancellationToken,
    /// Its end is the daemon's error (a `select!` branch of the daemon loop).
    watcher: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The scanner, cleanup, prune and notify loops; each returns its name when it ends.
    loops: tokio::task::JoinSet<&'static str>,
    /// A loop that ended before shutdown (the daemon is then unhealthy).
    ended: Option<&'static str>,
}

/// What the scanner loop works on.
struct ScanLoop {
    roots: Arc<Vec<Root>>,
    feeder: Feeder,
    index: Arc<Index>,
    /// Asks for a rescan (lost events).
    rescan: Arc<Notify>,
    /// Set once an inotify limit was hit: rescan more often.
    degraded: Arc<std::sync::atomic::AtomicBool>,
    /// Notified once the watches of the roots present at start exist.
    watching: Arc<Notify>,
}

/// The scanner: the start-up catch-up once the watches exist (at most 30 s later), then a
/// walk and sweep every [`SCAN_INTERVAL`] or when asked.
async fn scan_loop(s: ScanLoop, cancel: CancellationToken) -> &'static str {
    tokio::select! {
        _ = cancel.cancelled() => return "scanner",
        _ = s.watching.notified() => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
    }
    loop {
        let (r, f, i) = (s.roots.clone(), s.feeder.clone(), s.index.clone());
        let started = std::time::Instant::now();
        let res = tokio::task::spawn_blocking(move || {
            let (walked, dropped) = scan::walk_and_sweep(&i, &r, &f);
            dropped.map(|d| (walked, d))
        })
        .await;
        match res {
            Ok(Ok((walked, dropped))) => {
                // Done once every file found has been checked against the index.
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = s.feeder.drained() => {}
                }
                let secs = started.elapsed().as_secs_f64();
                let files = walked.queued + walked.unchanged;
                tracing::info!(
                    files,
                    unchanged = walked.unchanged,
                    dropped,
                    secs,
                    "catch-up scan done"
                )
            }
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "catch-up scan failed"),
            Err(e) => tracing::error!(error = %e, "catch-up scan task failed"),
        }
        let interval = if s.degraded.load(Ordering::Relaxed) {
            DEGRADED_SCAN_INTERVAL
        } else {
            SCAN_INTERVAL
        };
        tokio::select! {
            _ = cancel.cancelled() => return "scanner",
            _ = s.rescan.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Local cleanup every [`crate::cleanup::INTERVAL`].
async fn cleanup_loop(
    index: Arc<Index>,
    roots: Arc<Vec<Root>>,
    dests: Vec<String>,
    retention: crate::config::Retention,
    cancel: CancellationToken,
) -> &'static str {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return "cleanup",
            _ = tokio::time::sleep(crate::cleanup::INTERVAL) => {}
        }
        let (i, r, d, ret) = (
            index.clone(),
            roots.clone(),
            dests.clone(),
            retention.clone(),
        );
        match tokio::task::spawn_blocking(move || crate::cleanup::run_once(&i, &r, &d, &ret)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "local cleanup failed"),
            Err(e) => tracing::error!(error = %e, "local cleanup task failed"),
        }
    }
}

/// `seal_after`: seal quiet runs, checking a few times per the shortest `seal_after`
/// (between 1 s and a minute apart).
async fn seal_loop(config: Config, index: Arc<Index>, cancel: CancellationToken) -> &'static str {
    let shortest = config
        .watch
        .iter()
        .filter_map(|w| w.seal_after)
        .min()
        .unwrap_or(Duration::from_secs(60));
    let every = (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return "seal",
            _ = tokio::time::sleep(every) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return "seal",
            r = crate::runs::seal_quiet(&config, &index) => {
                if let Err(e) = r {
                    tracing::error!(error = %format!("{e:#}"), "sealing quiet runs failed");
                }
            }
        }
    }
}

/// Remote retention every [`crate::retention::INTERVAL`].
async fn prune_loop(config: Config, cancel: CancellationToken) -> &'static str {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return "prune",
            _ = tokio::time::sleep(crate::retention::INTERVAL) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return "prune",
            r = crate::retention::prune(&config, false) => match r {
                Ok(r) => tracing::info!(
                    pruned = r.expired.len(),
                    failed = r.failed.len(),
                    "retention applied"
                ),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "retention failed"),
            },
        }
    }
}

impl Running {
    fn start(
        parts: Parts,
        index: Arc<Index>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Running> {
        let retention = parts.config.retention.clone();
        let prune_config = crate::retention::enabled(&parts.config).then(|| parts.config.clone());
        let seal_config = parts
            .config
            .watch
            .iter()
            .any(|w| w.seal_after.is_some())
            .then(|| parts.config.clone());
        let dest_names: Vec<String> = parts.dests.iter().map(|d| d.name.clone()).collect();
        let notifier = parts.notifier.clone();
        let agent = Agent::start(parts, index, None, metrics.clone())?;
        let rescan = Arc::new(Notify::new());
        let degraded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks_cancel = CancellationToken::new();
        let watching = Arc::new(Notify::new());
        let watcher = WatchTask {
            roots: agent.roots.clone(),
            feeder: agent.feeder.clone(),
            rescan: rescan.clone(),
            degraded: degraded.clone(),
            watching: watching.clone(),
        };
        let watcher = tokio::spawn(watcher.run(tasks_cancel.clone()));
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(scan_loop(
            ScanLoop {
                roots: agent.roots.clone(),
                feeder: agent.feeder.clone(),
                index: agent.index.clone(),
                rescan,
                degraded,
                watching,
            },
            tasks_cancel.clone(),
        ));
        if crate::cleanup::enabled(&retention) {
            loops.spawn(cleanup_loop(
                agent.index.clone(),
                agent.roots.clone(),
                dest_names,
                retention,
                tasks_cancel.clone(),
            ));
        }
        if let Some(config) = prune_config {
            loops.spawn(prune_loop(config, tasks_cancel.clone()));
        }
        if let Some(config) = seal_config {
            loops.spawn(seal_loop(config, agent.index.clone(), tasks_cancel.clone()));
        }
        // Also without `[[notify]]` entries: notifications queued under an earlier
        // configuration are still tried (and fail, named, until given up).
        loops.spawn(crate::notify::run_loop(
            notifier,
            agent.index.clone(),
            metrics,
            tasks_cancel.clone(),
        ));
        Ok(Running {
            agent,
            tasks_cancel,
            watcher,
            loops,
            ended: None,
        })
    }

    /// Whether every loop, worker, the ingest thread and the watcher are alive and the index
    /// takes writes: the condition for petting the systemd watchdog.
    async fn healthy(&mut self) -> bool {
        if let Some(res) = self.loops.try_join_next() {
            let name = res.unwrap_or("a background loop (panicked)");
            tracing::error!(task = name, "a background loop ended before shutdown");
            self.ended = Some(name);
        }
        let alive = self.ended.is_none()
            && !self.watcher.is_finished()
            && self.agent.workers.iter().all(|(_, h, _)| !h.is_finished())
            && self.agent.ingest.as_ref().is_some_and(|t| !t.is_finished());
        if !alive {
            return false;
        }
        let index = self.agent.index.clone();
        matches!(
            tokio::time::timeout(
                Duration::from_secs(10),
                tokio::task::spawn_blocking(move || index.check_writable())
            )
            .await,
            Ok(Ok(Ok(())))
        )
    }

    async fn stop(mut self) {
        self.tasks_cancel.cancel();
        // Wakes the watcher and scans if they wait for room in a full ingest queue (the index
        // may be unwritable: state disk full), so shutdown never hangs on it.
        self.agent.feeder.close();
        let _ = self.watcher.await;
        while self.loops.join_next().await.is_some() {}
        self.agent.stop().await;
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}

/// A one-line summary for systemd's STATUS=.
fn status_line(index: &Index, dests: &[String]) -> String {
    match index.status(dests) {
        Ok(s) => {
            let (pending, failing, done) = s.destinations.iter().fold((0, 0, 0), |a, d| {
                (a.0 + d.pending, a.1 + d.failing, a.2 + d.done)
            });
            format!(
                "{} files indexed; uploads: {done} done, {pending} queued, {failing} failing",
                s.files
            )
        }
        Err(e) => format!("index unreadable: {e}"),
    }
}

/// The daemon: watch, index and upload until `shutdown` is cancelled, then drain and return.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    run_with_reload(config, shutdown, rx).await
}

/// The daemon, also taking new configurations (SIGHUP) from `reloads`. A new configuration
/// that fails to load (the `Err` case) or to open is rejected and the running one kept;
/// otherwise the workers drain and restart with it. Queued work lives in the index, so
/// nothing is lost across a reload. Speaks sd_notify: READY, STATUS, WATCHDOG (only while
/// healthy), RELOADING and STOPPING.
pub async fn run_with_reload(
    config: Config,
    shutdown: CancellationToken,
    mut reloads: tokio::sync::mpsc::Receiver<anyhow::Result<Config>>,
) -> anyhow::Result<()> {
    let _lock = StateLock::acquire(&config.state_dir)?;
    let index = open_index(&config)?;
    let parts = Parts::prepare(config)?;
    let mut config = parts.config.clone();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let mut running = Running::start(parts, index.clone(), metrics.clone())?;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let metrics_stop = CancellationToken::new();
    let metrics_server = config.metrics.listen.map(|addr| {
        tokio::spawn(crate::metrics::serve(
            addr,
            metrics.clone(),
            index.clone(),
            config.destinations().map(|d| d.name.clone()).collect(),
            healthy.clone(),
            metrics_stop.clone(),
        ))
    });
    tracing::info!(
        node = %config.node_id,
        index = %index.path().display(),
        roots = config.watch.len(),
        destinations = config.destination.len(),
        "panoptic-sync running"
    );
    notify(&[sd_notify::NotifyState::Ready]);
    publish_status(&config, &index).await;

    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(30));
    let mut health_tick = tokio::time::interval(Duration::from_secs(30));
    let mut heartbeat = tokio::time::interval(Duration::from_secs(60));
    heartbeat.tick().await;
    let mut reloads_open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            new = reloads.recv(), if reloads_open => {
                let Some(new) = new else {
                    reloads_open = false;
                    continue;
                };
                notify(&[sd_notify::NotifyState::Reloading]);
                let prepared = new.and_then(|c| {
                    anyhow::ensure!(
                        c.state_dir == config.state_dir,
                        "state_dir cannot change on reload (from {} to {}); restart the service",
                        config.state_dir.display(),
                        c.state_dir.display()
                    );
                    Parts::prepare(c)
                });
                match prepared {
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "new configuration rejected; the running one is kept"),
                    Ok(parts) => {
                        tracing::info!("reloading the configuration: draining workers");
                        running.stop().await;
                        config = parts.config.clone();
                        running = Running::start(parts, index.clone(), metrics.clone())?;
                        tracing::info!(roots = config.watch.len(), destinations = config.destination.len(), "configuration reloaded");
                    }
                }
                notify(&[sd_notify::NotifyState::Ready]);
            }
            res = &mut running.watcher => {
                // The watcher only ends on its own when inotify cannot be used at all.
                match res {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => anyhow::bail!("the watcher stopped unexpectedly"),
                    Err(e) => anyhow::bail!("the watcher task failed: {e}"),
                }
            }
            _ = health_tick.tick() => {
                healthy.store(running.healthy().await, Ordering::Relaxed);
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                if running.healthy().await {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!("a worker stopped or the index is not writable; withholding the watchdog ping");
                }
            }
            _ = status_tick.tick() => {
                let (i, names) = (index.clone(), config.destinations().map(|d| d.name.clone()).collect::<Vec<_>>());
                if let Ok(line) = tokio::task::spawn_blocking(move || status_line(&i, &names)).await {
                    notify(&[sd_notify::NotifyState::Status(&line)]);
                }
                if config.watch.iter().any(|w| w.runs == crate::config::Runs::Dir) {
                    let (c, i) = (config.clone(), index.clone());
                    if let Ok(Ok(open)) = tokio::task::spawn_blocking(move || crate::runs::count_open(&c, &i)).await {
                        metrics.runs_open.set(open as i64);
                    }
                }
            }
            _ = heartbeat.tick() => {
                log_progress(&running.agent);
                publish_status(&config, &index).await;
            }
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: finishing in-flight uploads");
    running.stop().await;
    metrics_stop.cancel();
    if let Some(server) = metrics_server {
        match server.await {
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "metrics server failed"),
            Err(e) => tracing::error!(error = %e, "metrics server task failed"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Write this node's status object to the primary (the fleet view); failures are logged.
async fn publish_status(config: &Config, index: &Arc<Index>) {
    if let Err(e) = crate::report::publish(config, index).await {
        tracing::warn!(error = %format!("{e:#}"), "cannot publish the node status object");
    }
}

fn log_progress(agent: &Agent) {
    for (name, _, s) in &agent.workers {
        tracing::info!(
            dest = %name,
            uploaded = s.uploaded.load(Ordering::Relaxed),
            copied = s.copied.load(Ordering::Relaxed),
            skipped = s.skipped.load(Ordering::Relaxed),
            failed = s.failed.load(Ordering::Relaxed),
            bytes = s.bytes.load(Ordering::Relaxed),
            "progress"
        );
    }
}

/// What `sync` achieved, per destination.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncSummary {
    /// Files hashed into the index in this pass.
    pub indexed: u64,
    /// Per destination: (name, stored this pass, still pending, permanently failed).
    pub destinations: Vec<SyncDest>,
    /// Watch roots that exist but are not real directories (a symlink is never followed):
    /// nothing under them was synced.
    pub refused_roots: Vec<PathBuf>,
}

/// One destination's result of a `sync`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncDest {
    /// Destination name.
    pub name: String,
    /// Files stored this pass (uploaded, copied or already there).
    pub stored: u64,
    /// Files still not in the destination.
    pub missing: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

impl SyncSummary {
    /// Whether every destination has everything.
    pub fn complete(&self) -> bool {
        self.destinations.iter().all(|d| d.missing == 0) && self.refused_roots.is_empty()
    }
}

/// How `sync` reports progress.
pub trait Progress: Send {
    /// Called a few times a second with files stored so far and files to store in total.
    fn update(&mut self, done: u64, total: u64);
    /// Called once at the end.
    fn finish(&mut self);
}

/// One pass: scan, upload everything pending (each file tried up to [`SYNC_ATTEMPTS`] times),
/// and report what is still missing.
pub async fn sync(config: &Config, progress: &mut dyn Progress) -> anyhow::Result<SyncSummary> {
    let _lock = StateLock::acquire(&config.state_dir)?;
    let index = open_index(config)?;
    {
        let index = index.clone();
        tokio::task::spawn_blocking(move || index.retry_now()).await??;
    }
    let agent = Agent::start(
        Parts::prepare(config.clone())?,
        index.clone(),
        Some(SYNC_ATTEMPTS),
        Arc::new(crate::metrics::Metrics::new()),
    )?;
    agent.catch_up().await?;
    let names: Vec<String> = agent.workers.iter().map(|(n, _, _)| n.clone()).collect();
    loop {
        let outstanding = agent.feeder.outstanding();
        let in_flight: u64 = agent
            .workers
            .iter()
            .map(|(_, _, s)| s.in_flight.load(Ordering::Relaxed))
            .sum();
        let (i, n) = (index.clone(), names.clone());
        // While files are being checked or uploaded, the pending count comes from the
        // index's running totals (reading every pending row 40 times a second made a large
        // first sync quadratic); only when nothing is in flight are the pending rows split
        // into those still to try and those out of attempts, to decide whether to stop.
        let idle = outstanding == 0 && in_flight == 0;
        let open: Vec<(u64, u64)> = tokio::task::spawn_blocking(move || {
            n.iter()
                .map(|d| {
                    if idle {
                        i.pending_counts(d, SYNC_ATTEMPTS)
                    } else {
                        i.pending_total(d).map(|p| (p, 0))
                    }
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        let stored: u64 = agent
            .workers
            .iter()
            .map(|(_, _, s)| {
                s.uploaded.load(Ordering::Relaxed)
                    + s.copied.load(Ordering::Relaxed)
                    + s.skipped.load(Ordering::Relaxed)
            })
            .sum();
        let waiting: u64 = open.iter().map(|(o, _)| o).sum();
        progress.update(stored, stored + waiting);
        if outstanding == 0 && in_flight == 0 && waiting == 0 {
            break;
        }
        if outstanding > 0 {
            // Ingest is still checking files: wake the moment it is done (an unchanged re-run
            // ends here), or in 100 ms to show progress.
            tokio::select! {
                _ = agent.feeder.drained() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        } else {
            // Uploads in flight: each takes a round trip; look again soon.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    progress.finish();
    let indexed = agent.ingest_stats.indexed.load(Ordering::Relaxed);
    let per_dest: Vec<(String, u64)> = agent
        .workers
        .iter()
        .map(|(n, _, s)| {
            (
                n.clone(),
                s.uploaded.load(Ordering::Relaxed)
                    + s.copied.load(Ordering::Relaxed)
                    + s.skipped.load(Ordering::Relaxed),
            )
        })
        .collect();
    let refused_roots = agent
        .roots
        .iter()
        .filter(|r| r.tree.refused())
        .map(|r| r.path.clone())
        .collect();
    agent.stop().await;
    publish_status(config, &index).await;
    let status = {
        let i = index.clone();
        tokio::task::spawn_blocking(move || i.status(&names)).await??
    };
    Ok(SyncSummary {
        indexed,
        destinations: status
            .destinations
            .into_iter()
            .zip(per_dest)
            .map(|(d, (_, stored))| SyncDest {
                name: d.name,
                stored,
                missing: d.pending + d.failed_permanently,
                last_error: d.last_error,
            })
            .collect(),
        refused_roots,
    })
}

/// What `flush` found.
#[derive(Debug, Clone)]
pub struct FlushSummary {
    /// Files that were present at call time and are now stored.
    pub stored: u64,
    /// Files not stored when the time ran out.
    pub waiting: Vec<PathBuf>,
    /// Files that can never be stored as they are, with the reason.
    pub failed: Vec<(PathBuf, String)>,
    /// The stored files, with the identity they were stored with: kept for a run (a seal
    /// builds its manifest from them), not for a whole tree.
    pub files: Vec<Flushed>,
}

/// A file a flush found stored in every destination asked for.
#[derive(Debug, Clone)]
pub struct Flushed {
    /// Its path.
    pub path: PathBuf,
    /// Its identity (and mode) as listed, which the index matched.
    pub stat: Stat,
    /// Its content and objects, as the index had them then.
    pub stored: crate::index::StoredAs,
}

impl FlushSummary {
    /// Whether everything is stored.
    pub fn complete(&self) -> bool {
        self.waiting.is_empty() && self.failed.is_empty()
    }
}

/// Wait until every file present in the watched trees now is in the primary (or in every
/// destination with `all`). If no daemon is running, do the work with a `sync` first.
pub async fn flush(config: &Config, timeout: Duration, all: bool) -> anyhow::Result<FlushSummary> {
    Ok(flush_under(config, timeout, all, None).await?.0)
}

/// [`flush`] for the files under `under` only (a run directory), or every watched file; also
/// returns the index it checked them against, for the caller's next reads.
pub async fn flush_under(
    config: &Config,
    timeout: Duration,
    all: bool,
    under: Option<&Path>,
) -> anyhow::Result<(FlushSummary, Arc<Index>)> {
    let deadline = Instant::now() + timeout;
    let roots = Root::from_config(config);
    let dests: Vec<String> = config
        .destinations()
        .take(if all { usize::MAX } else { 1 })
        .map(|d| d.name.clone())
        .collect();
    let under = under.map(Path::to_path_buf);
    let keep = under.is_some();
    let mut summary = FlushSummary {
        stored: 0,
        waiting: Vec::new(),
        failed: Vec::new(),
        files: Vec::new(),
    };
    let daemon_running = StateLock::try_acquire(&config.state_dir)?.is_none();
    // The files present at call time, and the index to check them against.
    let (index, mut present) = if daemon_running {
        // The daemon keeps the index current: the listing is checked chunk by chunk while
        // the walk goes on (the first pass, with the identities just listed).
        let index = open_index(config)?;
        index.map_for_reading()?;
        let (i, d, r, u) = (index.clone(), dests.clone(), roots.clone(), under.clone());
        let first = tokio::task::spawn_blocking(move || {
            let (tx, rx) = std::sync::mpsc::sync_channel(4);
            std::thread::scope(|s| {
                let lister = std::thread::Builder::new()
                    .name("flush-list".into())
                    .spawn_scoped(s, || {
                        // Owned here: dropped when the walk ends, which ends the checking.
                        let tx = tx;
                        list_in_chunks(&r, u.as_deref(), &mut |c| tx.send(c).is_ok())
                    });
                let mut pass = FlushPass::default();
                if let Err(e) = &lister {
                    // No thread to be had: list here, then check.
                    tracing::debug!(error = %e, "listing on the checking thread");
                    let mut listed = Vec::new();
                    list_in_chunks(&r, u.as_deref(), &mut |c| {
                        listed.extend(c);
                        true
                    });
                    return flush_pass(&i, &d, &r, listed, false, keep);
                }
                for chunk in rx {
                    pass.add(flush_pass(&i, &d, &r, chunk, false, keep)?);
                }
                anyhow::Ok(pass)
            })
        })
        .await??;
        summary.stored += first.stored_count;
        summary.files.extend(first.stored);
        summary.failed.extend(first.failed);
        (index, first.rest)
    } else {
        let (r, u) = (roots.clone(), under.clone());
        let present = tokio::task::spawn_blocking(move || {
            let mut listed = Vec::new();
            list_in_chunks(&r, u.as_deref(), &mut |c| {
                listed.extend(c);
                true
            });
            listed
        })
        .await?;
        tracing::info!("no daemon is running on this state directory; syncing now");
        let mut quiet = NoProgress;
        sync(config, &mut quiet).await?;
        let index = open_index(config)?;
        index.map_for_reading()?;
        (index, present)
    };
    // Later passes look again, since a file may have changed (or gone) while it waited.
    let mut first = !daemon_running;
    loop {
        if !first {
            if present.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                summary.waiting = present.into_iter().map(|(p, _)| p).collect();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let look_again = !std::mem::take(&mut first);
        let (i, d, r) = (index.clone(), dests.clone(), roots.clone());
        let batch = std::mem::take(&mut present);
        let pass =
            tokio::task::spawn_blocking(move || flush_pass(&i, &d, &r, batch, look_again, keep))
                .await??;
        summary.stored += pass.stored_count;
        summary.files.extend(pass.stored);
        summary.failed.extend(pass.failed);
        present = pass.rest;
    }
    Ok((summary, index))
}

/// What one pass of a flush found.
#[derive(Default)]
struct FlushPass {
    /// Not stored yet.
    rest: Vec<(PathBuf, Stat)>,
    /// Stored in every destination asked for: how many, and (when kept) which.
    stored_count: u64,
    stored: Vec<Flushed>,
    /// Failed for good, and why.
    failed: Vec<(PathBuf, String)>,
}

impl FlushPass {
    fn add(&mut self, other: FlushPass) {
        self.rest.extend(other.rest);
        self.stored_count += other.stored_count;
        self.stored.extend(other.stored);
        self.failed.extend(other.failed);
    }
}

/// One pass of a flush over `batch`, in one read transaction. With `look_again`, each file is
/// looked at again first: changed since it was listed, its new version is waited for; gone,
/// it is dropped. With `keep`, the stored files are returned, not only counted. Blocking.
fn flush_pass(
    index: &Index,
    dests: &[String],
    roots: &[Root],
    batch: Vec<(PathBuf, Stat)>,
    look_again: bool,
    keep: bool,
) -> anyhow::Result<FlushPass> {
    let now: Vec<(PathBuf, Stat)> = batch
        .into_iter()
        .filter_map(|(path, listed)| {
            if !look_again {
                return Some((path, listed));
            }
            match scan::root_of(roots, &path).map(|n| roots[n].kind(&path)) {
                Some(Ok(crate::tree::Kind::File(stat))) => Some((path, stat)),
                _ => None,
            }
        })
        .collect();
    let states = index.is_stored_many(&now, dests)?;
    let mut pass = FlushPass::default();
    for ((path, stat), state) in now.into_iter().zip(states) {
        match state {
            FlushState::Stored(stored) => {
                pass.stored_count += 1;
                if keep {
                    pass.stored.push(Flushed { path, stat, stored });
                }
            }
            FlushState::Waiting => pass.rest.push((path, stat)),
            FlushState::Failed(e) => pass.failed.push((path, e)),
        }
    }
    Ok(pass)
}

/// Every wanted regular file in the trees (or below `under`, inside one of them), with its
/// identity, walked through each root's handle and handed to `chunk_done` 512 at a time, so
/// they can be checked while the walk goes on (small chunks keep the check after the walk's
/// end short); it returns false to stop the walk. Blocking.
fn list_in_chunks(
    roots: &[Root],
    under: Option<&Path>,
    chunk_done: &mut dyn FnMut(Vec<(PathBuf, Stat)>) -> bool,
) {
    const CHUNK: usize = 512;
    let walks: Vec<(&Root, &Path)> = match under {
        Some(dir) => scan::root_of(roots, dir)
            .map(|i| (&roots[i], dir))
            .into_iter()
            .collect(),
        None => roots.iter().map(|r| (r, r.path.as_path())).collect(),
    };
    let mut chunk = Vec::with_capacity(CHUNK);
    for (root, dir) in walks {
        if root.refresh().is_none() {
            continue;
        }
        let mut open = true;
        root.walk_files(dir, &mut |path, stat| {
            chunk.push((path, stat));
            if chunk.len() == CHUNK {
                open = chunk_done(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
            }
            open
        });
        if !open {
            return;
        }
    }
    if !chunk.is_empty() {
        chunk_done(chunk);
    }
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&mut self, _: u64, _: u64) {}
    fn finish(&mut self) {}
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
