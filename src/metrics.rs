//! Metrics: Prometheus counters, gauges and histograms (`panoptic_sync_*`, prometheus-client),
//! served with `/healthz` on `[metrics] listen`.
//!
//! Counters are incremented where things happen (ingest, upload workers); queue gauges are
//! read from the index at scrape time. `/healthz` answers 200 while every worker runs and the
//! index takes writes (the same check that gates the systemd watchdog), 503 otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::index::{Index, Method};

/// The `dest` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Dest {
    /// Destination name.
    pub dest: String,
}

fn dest(name: &str) -> Dest {
    Dest { dest: name.into() }
}

/// The `result` label of notification attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotifyResult {
    /// `sent`, `failed` (retried) or `given_up`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ])
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Files handled by the ingest stage (hashed or found unchanged).
    pub files_seen: Counter,
    /// Files stored by upload, per destination.
    pub uploaded: Family<Dest, Counter>,
    /// Files stored without sending their bytes (server-side copy or already there).
    pub deduplicated: Family<Dest, Counter>,
    /// Failed attempts (each is retried after a backoff).
    pub failed: Family<Dest, Counter>,
    /// Bytes of the originals stored.
    pub bytes_original: Family<Dest, Counter>,
    /// Bytes sent (after compression and encryption).
    pub bytes_stored: Family<Dest, Counter>,
    /// Seconds from a file's last write to its object being durable.
    pub latency: Family<Dest, Histogram, fn() -> Histogram>,
    /// Files waiting, per destination.
    pub queue_depth: Family<Dest, Gauge>,
    /// Age of the oldest waiting file, seconds.
    pub oldest_pending: Family<Dest, Gauge>,
    /// Unix time of the last stored file.
    pub last_success: Family<Dest, Gauge>,
    /// Seconds uploads waited for a bandwidth cap.
    pub throttled: Family<Dest, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// The destination's cap in bytes per second (0: none).
    pub max_rate: Family<Dest, Gauge>,
    /// Failed writes to the index (state disk full or read-only); work pauses meanwhile.
    pub index_errors: Counter,
    /// Runs sealed by this node and still kept (read from the index at scrape time).
    pub runs_sealed: Gauge,
    /// Unix time of this node's latest seal.
    pub runs_last_seal: Gauge,
    /// Run directories not sealed yet (refreshed every 30 s by the daemon).
    pub runs_open: Gauge,
    /// Notification attempts by the daemon, by result.
    pub notifications: Family<NotifyResult, Counter>,
    /// Notifications not delivered yet.
    pub notifications_pending: Gauge,
    /// Notifications given up.
    pub notifications_given_up: Gauge,
    /// Notifications delivered, whoever sent them (from the index).
    pub notifications_sent: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("panoptic_sync");
        let m = Metrics {
            files_seen: Counter::default(),
            uploaded: Family::default(),
            deduplicated: Family::default(),
            failed: Family::default(),
            bytes_original: Family::default(),
            bytes_stored: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            oldest_pending: Family::default(),
            last_success: Family::default(),
            throttled: Family::default(),
            max_rate: Family::default(),
            index_errors: Counter::default(),
            runs_sealed: Gauge::default(),
            runs_last_seal: Gauge::default(),
            runs_open: Gauge::default(),
            notifications: Family::default(),
            notifications_pending: Gauge::default(),
            notifications_given_up: Gauge::default(),
            notifications_sent: Gauge::default(),
            registry: Registry::default(),
        };
        // Present at 0 from the first scrape, not only after the first increment.
        for result in ["sent", "failed", "given_up"] {
            drop(m.notifications.get_or_create(&NotifyResult { result }));
        }
        registry.register(
            "notifications",
            "Run notification attempts by the daemon, by result (sent, failed and retried, given_up)",
            m.notifications.clone(),
        );
        registry.register(
            "notifications_pending",
            "Run notifications not delivered yet (including those failing and retried)",
            m.notifications_pending.clone(),
        );
        registry.register(
            "notifications_sent",
            "Run notifications delivered, by any process (the daemon, or `seal` itself), as the index records them",
            m.notifications_sent.clone(),
        );
        registry.register(
            "notifications_given_up",
            "Run notifications given up after failing for days",
            m.notifications_given_up.clone(),
        );
        registry.register(
            "index_errors",
            "Failed writes to the index (state disk full or read-only); work pauses meanwhile",
            m.index_errors.clone(),
        );
        registry.register(
            "files_seen",
            "Files handled by the ingest stage",
            m.files_seen.clone(),
        );
        registry.register(
            "files_uploaded",
            "Files stored by upload",
            m.uploaded.clone(),
        );
        registry.register(
            "files_deduplicated",
            "Files stored by server-side copy or already present",
            m.deduplicated.clone(),
        );
        registry.register(
            "upload_failures",
            "Failed upload attempts (retried)",
            m.failed.clone(),
        );
        registry.register(
            "bytes_original",
            "Bytes of the originals stored",
            m.bytes_original.clone(),
        );
        registry.register(
            "bytes_stored",
            "Bytes sent after compression and encryption",
            m.bytes_stored.clone(),
        );
        registry.register(
            "upload_latency_seconds",
            "From a file's last write to its object being durable",
            m.latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Files waiting for a destination",
            m.queue_depth.clone(),
        );
        registry.register(
            "oldest_pending_seconds",
            "Age of the oldest file waiting for a destination",
            m.oldest_pending.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last file stored",
            m.last_success.clone(),
        );
        registry.register(
            "throttled_seconds",
            "Seconds uploads waited for a bandwidth cap",
            m.throttled.clone(),
        );
        registry.register(
            "max_rate_bytes",
            "Bandwidth cap of the destination in bytes per second (0: none)",
            m.max_rate.clone(),
        );
        registry.register(
            "runs_sealed",
            "Runs sealed by this node and still kept",
            m.runs_sealed.clone(),
        );
        registry.register(
            "runs_last_seal_timestamp_seconds",
            "Unix time of this node's latest seal",
            m.runs_last_seal.clone(),
        );
        registry.register(
            "runs_open",
            "Run directories not sealed yet",
            m.runs_open.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Record a stored file.
    pub fn stored(&self, name: &str, method: Method, size: u64, sent: u64, mtime_ns: i64) {
        let d = dest(name);
        match method {
            Method::Upload => {
                self.uploaded.get_or_create(&d).inc();
                self.bytes_stored.get_or_create(&d).inc_by(sent);
            }
            Method::Copy | Method::Skip => {
                self.deduplicated.get_or_create(&d).inc();
            }
            // Only the pointer was sent: deduplicated, and its bytes stored.
            Method::Reuse => {
                self.deduplicated.get_or_create(&d).inc();
                self.bytes_stored.get_or_create(&d).inc_by(sent);
            }
        }
        self.bytes_original.get_or_create(&d).inc_by(size);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if method != Method::Skip {
            let secs = (now.as_nanos() as i64 - mtime_ns).max(0) as f64 / 1e9;
            self.latency.get_or_create(&d).observe(secs);
        }
        self.last_success
            .get_or_create(&d)
            .set(now.as_secs() as i64);
    }

    /// Record time spent waiting for a bandwidth cap.
    pub fn throttled(&self, name: &str, waited: std::time::Duration) {
        self.throttled
            .get_or_create(&dest(name))
            .inc_by(waited.as_secs_f64());
    }

    /// Create every destination's counters at 0, so they are present from the first scrape.
    pub fn init_destinations(&self, names: &[String]) {
        for name in names {
            let d = dest(name);
            drop(self.uploaded.get_or_create(&d));
            drop(self.deduplicated.get_or_create(&d));
            drop(self.failed.get_or_create(&d));
            drop(self.bytes_original.get_or_create(&d));
            drop(self.bytes_stored.get_or_create(&d));
        }
    }

    /// Record a notification attempt: `sent`, `failed` or `given_up`.
    pub fn notification(&self, result: &'static str) {
        self.notifications
            .get_or_create(&NotifyResult { result })
            .inc();
    }

    /// Record a failed attempt.
    pub fn failure(&self, name: &str) {
        self.failed.get_or_create(&dest(name)).inc();
    }

    /// Refresh the queue gauges from the index and encode everything in the text format.
    pub fn render(&self, index: &Index, dests: &[String]) -> String {
        if let Ok(status) = index.status(dests) {
            for d in status.destinations {
                let label = dest(&d.name);
                self.queue_depth.get_or_create(&label).set(d.pending as i64);
                self.oldest_pending
                    .get_or_create(&label)
                    .set(d.oldest_pending_secs.unwrap_or(0) as i64);
            }
        }
        if let Ok((sealed, last_ms)) = index.run_totals() {
            self.runs_sealed.set(sealed as i64);
            self.runs_last_seal.set(last_ms.unwrap_or(0) / 1000);
        }
        if let Ok(n) = index.notify_status() {
            self.notifications_pending.set(n.pending as i64);
            self.notifications_given_up.set(n.given_up as i64);
            self.notifications_sent.set(n.sent as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serve `/metrics` and `/healthz` on `addr` until `shutdown`.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    index: Arc<Index>,
    dests: Vec<String>,
    healthy: Arc<AtomicBool>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let listener = crate::httpd::bind(addr, "metrics").await?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (m, i, d) = (metrics.clone(), index.clone(), dests.clone());
                async move {
                    let body = tokio::task::spawn_blocking(move || m.render(&i, &d))
                        .await
                        .unwrap_or_default();
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let ok = healthy.load(Ordering::Relaxed);
                async move {
                    if ok {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
                    }
                }
            }),
        );
    tracing::info!(%addr, "serving /metrics and /healthz");
    crate::httpd::serve(
        listener,
        app,
        crate::httpd::Limits::METRICS,
        "metrics",
        shutdown,
    )
    .await;
    Ok(())
}
