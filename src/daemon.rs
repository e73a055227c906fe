//! The daemon: the [`Agent`] plus the loops that feed it while running (watcher, scanner,
//! cleanup, seal, prune, notify), the systemd conversation, and reloads. It calls the
//! features; nothing below names it.
//!
//! Shutdown is ordered: watcher and scanner stop, workers stop claiming and drain (in-flight
//! uploads get a grace period, then are abandoned uncommitted), the ingest thread finishes its
//! queue, and the index is closed. Everything not done is still pending in the index.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, Parts, StateLock, open_index};
use crate::config::Config;
use crate::destination::Destination;
use crate::index::Index;
use crate::scan::{self, Feeder, Root};
use crate::watch::WatchTask;

/// How often the trees are reconciled with the index while running.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(300);
/// How often while inotify is degraded (watch limit reached), since events may be missing.
pub const DEGRADED_SCAN_INTERVAL: Duration = Duration::from_secs(30);
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
async fn seal_loop(
    config: Config,
    dests: Vec<Destination>,
    index: Arc<Index>,
    cancel: CancellationToken,
) -> &'static str {
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
            r = crate::seal::seal_quiet(&config, &dests, &index) => {
                if let Err(e) = r {
                    tracing::error!(error = %format!("{e:#}"), "sealing quiet runs failed");
                }
            }
        }
    }
}

/// Remote retention every [`crate::retention::INTERVAL`].
async fn prune_loop(
    config: Config,
    dests: Vec<Destination>,
    cancel: CancellationToken,
) -> &'static str {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return "prune",
            _ = tokio::time::sleep(crate::retention::INTERVAL) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return "prune",
            r = crate::retention::prune(&config, &dests, false) => match r {
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

/// A configuration opened for the daemon: the agent's parts and the notification sender,
/// both built before anything running stops (a reload that cannot open is rejected).
struct Prepared {
    parts: Parts,
    notifier: Arc<crate::notify::Sender>,
    /// The primary, where the node status is published every minute.
    primary: Destination,
}

impl Prepared {
    fn open(config: Config) -> anyhow::Result<Prepared> {
        let notifier = Arc::new(crate::notify::Sender::new(&config)?);
        let parts = Parts::prepare(config)?;
        let primary = parts
            .dests
            .first()
            .cloned()
            .context("no destination is configured")?;
        Ok(Prepared {
            parts,
            notifier,
            primary,
        })
    }
}

impl Running {
    fn start(
        prepared: Prepared,
        index: Arc<Index>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Running> {
        let Prepared {
            parts, notifier, ..
        } = prepared;
        let retention = parts.config.retention.clone();
        let prune_config = crate::retention::enabled(&parts.config).then(|| parts.config.clone());
        let seal_config = parts
            .config
            .watch
            .iter()
            .any(|w| w.seal_after.is_some())
            .then(|| parts.config.clone());
        let dest_names: Vec<String> = parts.dests.iter().map(|d| d.name.clone()).collect();
        // The loops use the stores opened for this configuration, never their own.
        let dests = parts.dests.clone();
        let pipeline = parts.pipeline.clone();
        let agent = Agent::start(parts, index, None, metrics.clone())?;
        let tail = crate::tail::wanted(&agent.roots).then(crate::tail::Tracker::default);
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
            tail: tail.clone(),
        };
        let watcher = tokio::spawn(watcher.run(tasks_cancel.clone()));
        let mut loops = tokio::task::JoinSet::new();
        if let Some(tracker) = tail {
            let task = crate::tail::TailTask {
                index: agent.index.clone(),
                roots: agent.roots.clone(),
                dests: dests.clone(),
                pipeline,
                tracker,
            };
            loops.spawn(task.run(tasks_cancel.clone()));
        }
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
            loops.spawn(prune_loop(config, dests.clone(), tasks_cancel.clone()));
        }
        if let Some(config) = seal_config {
            loops.spawn(seal_loop(
                config,
                dests.clone(),
                agent.index.clone(),
                tasks_cancel.clone(),
            ));
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
        tracing::debug!("shutdown: the watcher stopped");
        while self.loops.join_next().await.is_some() {}
        tracing::debug!("shutdown: the loops stopped");
        self.agent.stop().await;
        tracing::debug!("shutdown: the workers and the ingest thread stopped");
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
    raise_open_files_limit();
    let index = open_index(&config)?;
    let prepared = Prepared::open(config)?;
    let mut config = prepared.parts.config.clone();
    let mut primary = prepared.primary.clone();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    metrics.init_destinations(
        &config
            .destinations()
            .map(|d| d.name.clone())
            .collect::<Vec<_>>(),
    );
    let mut running = Running::start(prepared, index.clone(), metrics.clone())?;
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
    publish_status(&primary, &config, &index).await;

    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(30));
    let mut health_tick = tokio::time::interval(Duration::from_secs(30));
    let mut heartbeat = tokio::time::interval(Duration::from_secs(60));
    heartbeat.tick().await;
    let mut reloads_open = true;
    let mut logged = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            new = reloads.recv(), if reloads_open => {
                let Some(new) = new else {
                    reloads_open = false;
                    continue;
                };
                notify(&[sd_notify::NotifyState::Reloading]);
                if let Some(prepared) = open_reload(new, &config) {
                    tracing::info!("reloading the configuration: draining workers");
                    running.stop().await;
                    config = prepared.parts.config.clone();
                    primary = prepared.primary.clone();
                    running = Running::start(prepared, index.clone(), metrics.clone())?;
                    tracing::info!(roots = config.watch.len(), destinations = config.destination.len(), "configuration reloaded");
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
            _ = status_tick.tick() => tell_status(&config, &index, &metrics).await,
            _ = heartbeat.tick() => {
                log_progress(&running.agent, &mut logged);
                publish_status(&primary, &config, &index).await;
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

/// Raise the soft limit of open files to the hard one: the services' default soft limit of
/// 1,024 let idle connections to the metrics port starve the uploads of descriptors.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!(limit = ?limit.maximum, "open files limit raised"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
        }
    }
}

/// A configuration sent on reload, opened before anything running stops; `None` (logged)
/// when it failed to load or to open, or moves the state directory: the running one is kept.
fn open_reload(new: anyhow::Result<Config>, running: &Config) -> Option<Prepared> {
    let prepared = new.and_then(|c| {
        anyhow::ensure!(
            c.state_dir == running.state_dir,
            "state_dir cannot change on reload (from {} to {}); restart the service",
            running.state_dir.display(),
            c.state_dir.display()
        );
        Prepared::open(c)
    });
    match prepared {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "new configuration rejected; the running one is kept");
            None
        }
    }
}

/// Every 30 s: systemd's STATUS= line, and the open-run gauge.
async fn tell_status(config: &Config, index: &Arc<Index>, metrics: &crate::metrics::Metrics) {
    let names: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    if let Ok(line) = index.call(move |i| Ok(status_line(i, &names))).await {
        notify(&[sd_notify::NotifyState::Status(&line)]);
    }
    if config
        .watch
        .iter()
        .any(|w| w.runs == crate::config::Runs::Dir)
    {
        let c = config.clone();
        if let Ok(open) = index.call(move |i| crate::runs::count_open(&c, i)).await {
            metrics.runs_open.set(open as i64);
        }
    }
}

/// Write this node's status object to the primary (the fleet view); failures are logged.
async fn publish_status(primary: &Destination, config: &Config, index: &Arc<Index>) {
    if let Err(e) = crate::node_status::publish(primary, config, index).await {
        tracing::warn!(error = %format!("{e:#}"), "cannot publish the node status object");
    }
}

/// A worker's counters as the heartbeat last logged them.
type Counts = [u64; 5];

/// Log each worker's counters once a minute, but only those that moved since the last line
/// (`logged`, per destination): an idle daemon logs nothing.
fn log_progress(agent: &Agent, logged: &mut HashMap<String, Counts>) {
    for (name, _, s) in &agent.workers {
        let now: Counts = [
            s.uploaded.load(Ordering::Relaxed),
            s.copied.load(Ordering::Relaxed),
            s.skipped.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            s.bytes.load(Ordering::Relaxed),
        ];
        if !moved(logged, name, now) {
            continue;
        }
        let [uploaded, copied, skipped, failed, bytes] = now;
        tracing::info!(dest = %name, uploaded, copied, skipped, failed, bytes, "progress");
    }
}

/// Whether `now` differs from what was last logged for `dest` (a new destination's zero
/// counters count as unchanged), remembering it.
fn moved(logged: &mut HashMap<String, Counts>, dest: &str, now: Counts) -> bool {
    let before = logged.insert(dest.to_string(), now).unwrap_or_default();
    before != now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_daemon_logs_no_progress() {
        // Reproduced: a `progress … uploaded=8` line per destination every minute while idle.
        let mut logged = HashMap::new();
        assert!(!moved(&mut logged, "primary", [0; 5]), "nothing done yet");
        assert!(moved(&mut logged, "primary", [8, 0, 0, 0, 4096]));
        assert!(!moved(&mut logged, "primary", [8, 0, 0, 0, 4096]), "idle");
        assert!(
            !moved(&mut logged, "primary", [8, 0, 0, 0, 4096]),
            "still idle"
        );
        assert!(moved(&mut logged, "primary", [8, 0, 1, 0, 4096]));
        assert!(
            moved(&mut logged, "backup", [1, 0, 0, 0, 1]),
            "each destination apart"
        );
    }
}
