//! `status`: what the index says about the queue, as text or JSON.

use std::fmt::Write;

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
    Ok(StatusView {
        status,
        open_runs,
        notifications,
    })
}

/// A human-readable rendering of [`StatusView`].
pub(crate) fn render(view: &StatusView) -> String {
    let status = &view.status;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "index: {} files, {} bytes, {} distinct contents",
        status.files, status.bytes, status.contents
    );
    let _ = writeln!(
        out,
        "{} files not yet in every destination (never deleted locally)",
        status.awaiting_all_destinations
    );
    if let Some(n) = view.open_runs {
        let _ = writeln!(out, "{n} runs open (not sealed)");
    }
    if let Some(n) = &view.notifications {
        let _ = writeln!(
            out,
            "notifications: {} sent, {} pending ({} failing), {} given up",
            n.sent, n.pending, n.failing, n.given_up
        );
        if let Some(e) = &n.last_error {
            let _ = writeln!(out, "  last error: {e}");
        }
    }
    for d in &status.destinations {
        let _ = write!(
            out,
            "{}: {} done, {} pending ({} failing), {} failed permanently",
            d.name, d.done, d.pending, d.failing, d.failed_permanently
        );
        if let Some(age) = d.oldest_pending_secs {
            let _ = write!(out, ", oldest pending {age} s");
        }
        out.push('\n');
        if let Some(e) = &d.last_error {
            let _ = writeln!(out, "  last error: {e}");
        }
    }
    out
}
