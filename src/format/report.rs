//! The reports as `report --json` writes them: this node's storage and performance analytics
//! ([`Report`]) and the fleet view read from the bucket ([`Fleet`]: every node's status and
//! the fleet's test results).

use std::collections::BTreeMap;

use super::fleet::FleetResults;
use super::manifest::RunSummary;
use super::node_status::NodeStatus;

/// Totals for one group (a destination, a file type, a watch root).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Usage {
    /// Objects.
    pub objects: u64,
    /// Bytes of the originals.
    pub bytes_original: u64,
    /// Bytes stored (after compression and encryption).
    pub bytes_stored: u64,
}

/// One destination's part of the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct DestReport {
    /// Destination name.
    pub name: String,
    /// Everything stored there.
    pub usage: Usage,
    /// Bytes not sent thanks to compression (original − stored, for uploaded objects).
    pub compression_saved_bytes: u64,
    /// Bytes not sent thanks to dedup (server-side copies and skips).
    pub dedup_saved_bytes: u64,
    /// By file extension.
    pub by_type: BTreeMap<String, Usage>,
    /// By watch prefix.
    pub by_root: BTreeMap<String, Usage>,
    /// Files stored in the last 24 h, and their original bytes.
    pub stored_last_24h: Usage,
    /// Upload latency (queued → stored) percentiles in ms: p50, p90, p99.
    pub latency_ms: [u64; 3],
    /// Average upload throughput while uploading, bytes/s (first to last upload).
    pub throughput_bytes_per_sec: u64,
    /// What is waiting to be stored.
    pub backlog: Backlog,
    /// Current failures grouped by cause.
    pub failures: BTreeMap<String, u64>,
    /// Per day (UTC) of storing, oldest first: what was stored and how fast.
    pub days: Vec<DayUsage>,
}

/// One day of a destination in the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct DayUsage {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    /// Files stored that day (uploaded, copied or skipped).
    pub objects: u64,
    /// Of which sent as an upload.
    pub uploads: u64,
    /// Of which placed by dedup (server-side copy or already there).
    pub deduplicated: u64,
    /// Original bytes of the files stored that day.
    pub bytes_original: u64,
    /// Bytes stored for them.
    pub bytes_stored: u64,
    /// Bytes stored up to the end of that day (storage growth).
    pub bytes_stored_total: u64,
    /// Latency (queued → stored) of the files stored that day, p50 and p90, ms.
    pub latency_ms: [u64; 2],
}

/// One day of this node's sealed runs in the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct TestDay {
    /// `YYYY-MM-DD` (UTC, the day of the seal).
    pub date: String,
    /// Sealed runs with test results.
    pub runs: u64,
    /// Of which passed.
    pub runs_passed: u64,
    /// Test cases.
    pub tests: u64,
    /// Of which failed or erred.
    pub failed: u64,
}

/// A destination's queue: in the JSON report a `[pending, failing, oldest_pending_secs]`
/// array, as it has always been written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "(u64, u64, Option<u64>)")]
pub struct Backlog {
    /// Files waiting (including failing ones).
    pub pending: u64,
    /// Pending files whose last attempt failed.
    pub failing: u64,
    /// Age of the oldest pending file, in seconds.
    pub oldest_pending_secs: Option<u64>,
}

impl From<Backlog> for (u64, u64, Option<u64>) {
    fn from(b: Backlog) -> Self {
        (b.pending, b.failing, b.oldest_pending_secs)
    }
}

/// The whole report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Report {
    /// This node.
    pub node_id: String,
    /// When it was made (Unix seconds).
    pub generated_at: u64,
    /// Index totals.
    pub files: u64,
    /// Bytes of the indexed files.
    pub bytes: u64,
    /// Per destination.
    pub destinations: Vec<DestReport>,
    /// Advice computed from the numbers above.
    pub recommendations: Vec<String>,
    /// The latest sealed runs (newest first): sizes and how long each job wrote.
    pub runs: Vec<RunSummary>,
    /// Test results of this node's sealed runs per day, oldest first.
    pub test_days: Vec<TestDay>,
}

/// Every node's status, read from the primary alone.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Fleet {
    /// The nodes, sorted by node id.
    pub nodes: Vec<FleetNode>,
    /// Objects under `_panoptic-sync/nodes/` that could not be read, each with the reason.
    pub unreadable: Vec<Unreadable>,
    /// Fleet totals.
    pub totals: FleetTotals,
    /// Test results of every node's sealed runs in the window (from their summary records).
    pub results: FleetResults,
}

/// One node in the fleet view.
#[derive(Debug, serde::Serialize)]
pub(crate) struct FleetNode {
    /// What the node published.
    #[serde(flatten)]
    pub status: NodeStatus,
    /// Not seen for ten minutes.
    pub stale: bool,
}

/// A status object that could not be read.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Unreadable {
    /// The object's key (control characters escaped).
    pub key: String,
    /// Why.
    pub error: String,
}

/// Fleet totals. Every sum saturates: a node can publish any number.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct FleetTotals {
    /// Nodes read.
    pub nodes: u64,
    /// Indexed files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files pending.
    pub pending: u64,
    /// Files failing.
    pub failing: u64,
}
