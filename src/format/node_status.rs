//! The node status object: what each node publishes about itself at
//! `_panoptic-sync/nodes/<node_id>.json`, a small wire format read by every other node's
//! `report --fleet`, whatever its version (formats 1 and 2 are read).

use super::manifest::RunSummary;

/// The status object format this version writes (`format` in the JSON).
pub(crate) const STATUS_FORMAT: u32 = 2;
/// The largest status object `report --fleet` reads; larger ones are reported as unreadable.
pub(crate) const STATUS_MAX_BYTES: u64 = 1 << 20;

/// What each node publishes about itself: `_panoptic-sync/nodes/<node_id>.json`, a small wire
/// format read by every other node's `report --fleet`, whatever its version.
///
/// Readers ignore fields they do not know and default the ones that are missing, so a field
/// can be added without breaking a fleet running two versions; a change that older readers
/// would misread takes a new `format` number. Format 1 (no `format` field, destinations as
/// `[name, done, pending, failing, failed]` arrays) is still read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub(crate) struct NodeStatus {
    /// The format of this object (1 when absent: written before formats were numbered).
    pub format: u32,
    /// The node (when missing, the name of the object is used).
    pub node_id: String,
    /// panoptic-sync version.
    pub version: String,
    /// When this was written (Unix seconds).
    pub last_seen: u64,
    /// Indexed files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Per destination upload counts.
    pub destinations: Vec<DestStatus>,
    /// Oldest pending upload, seconds.
    pub oldest_pending_secs: Option<u64>,
    /// The most recent error.
    pub last_error: Option<String>,
    /// done / (done + failing + failed permanently), over all destinations.
    pub success_rate: f64,
    /// The node's latest sealed runs, newest first (absent before runs existed).
    pub latest_runs: Vec<RunSummary>,
}

impl Default for NodeStatus {
    fn default() -> Self {
        NodeStatus {
            format: 1,
            node_id: String::new(),
            version: String::new(),
            last_seen: 0,
            files: 0,
            bytes: 0,
            destinations: Vec::new(),
            oldest_pending_secs: None,
            last_error: None,
            success_rate: 1.0,
            latest_runs: Vec::new(),
        }
    }
}

/// One destination's upload counts in a [`NodeStatus`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "DestStatusWire")]
pub(crate) struct DestStatus {
    /// Destination name.
    pub name: String,
    /// Files stored.
    pub done: u64,
    /// Files waiting.
    pub pending: u64,
    /// Files failing (retried).
    pub failing: u64,
    /// Files failed permanently.
    pub failed_permanently: u64,
    /// Original bytes of the files this node stored there.
    #[serde(default)]
    pub logical_bytes: u64,
    /// Bytes this node added to the destination for them (objects, pointers, blobs it sent).
    #[serde(default)]
    pub stored_bytes: u64,
    /// Original bytes of files placed without sending their content (dedup).
    #[serde(default)]
    pub dedup_saved_bytes: u64,
}

/// What a destination entry may look like on the wire: named (format 2) or a format 1 array.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum DestStatusWire {
    Named(DestStatusNamed),
    V1(String, u64, u64, u64, u64),
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct DestStatusNamed {
    name: String,
    done: u64,
    pending: u64,
    failing: u64,
    failed_permanently: u64,
    logical_bytes: u64,
    stored_bytes: u64,
    dedup_saved_bytes: u64,
}

impl From<DestStatusWire> for DestStatus {
    fn from(w: DestStatusWire) -> DestStatus {
        match w {
            DestStatusWire::Named(n) => DestStatus {
                name: n.name,
                done: n.done,
                pending: n.pending,
                failing: n.failing,
                failed_permanently: n.failed_permanently,
                logical_bytes: n.logical_bytes,
                stored_bytes: n.stored_bytes,
                dedup_saved_bytes: n.dedup_saved_bytes,
            },
            DestStatusWire::V1(name, done, pending, failing, failed_permanently) => DestStatus {
                name,
                done,
                pending,
                failing,
                failed_permanently,
                ..Default::default()
            },
        }
    }
}

impl NodeStatus {
    /// Files pending over all destinations (saturating: the numbers come from another node).
    pub(crate) fn pending(&self) -> u64 {
        self.destinations
            .iter()
            .fold(0, |a, d| a.saturating_add(d.pending))
    }

    /// Files failing over all destinations (saturating).
    pub(crate) fn failing(&self) -> u64 {
        self.destinations
            .iter()
            .fold(0, |a, d| a.saturating_add(d.failing))
    }
}
