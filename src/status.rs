//! `status`: what the index says about the queue, as text or JSON.

use crate::config::Config;
use crate::index::{Index, Status};

/// The index's [`Status`] and the runs not sealed yet.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct StatusView {
    /// Queue and destinations.
    #[serde(flatten)]
    pub status: Status,
    /// Runs (of `runs = "dir"` watches) not sealed yet; absent without such watches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_runs: Option<u64>,
    /// Run notifications by state; absent without `[[notify]]` entries or queued ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notifications: Option<crate::index::NotifyStatus>,
    /// Per destination, the objects it holds by the index's record and their original
    /// bytes: what was ever stored, local copies deleted by cleanup included.
    pub held: Vec<Held>,
}

/// What one destination holds, by the index's record.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Held {
    /// Destination name.
    pub name: String,
    /// Objects.
    pub objects: u64,
    /// Their original bytes.
    pub bytes: u64,
}

/// Read the status of every configured destination from the index.
pub(crate) fn read(config: &Config) -> anyhow::Result<StatusView> {
    let index = Index::open(&config.state_dir)?;
    let names: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    let status = index.status(&names)?;
    let open_runs = config
        .watch
        .iter()
        .any(|w| w.runs == crate::config::Runs::Dir)
        .then(|| crate::runs::count_open(config, &index))
        .transpose()?;
    let n = index.notify_status()?;
    let notifications =
        (!config.notify.is_empty() || n.pending + n.sent + n.given_up > 0).then_some(n);
    let held = names
        .iter()
        .map(|name| {
            let (objects, bytes) = index.held_totals(name)?;
            anyhow::Ok(Held {
                name: name.clone(),
                objects,
                bytes,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(StatusView {
        status,
        open_runs,
        notifications,
        held,
    })
}
