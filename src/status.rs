//! `status`: what the index says about the queue, as text or JSON.

use std::fmt::Write;

use crate::config::Config;
use crate::index::{Index, Status};

/// Read the status of every configured destination from the index.
pub fn read(config: &Config) -> anyhow::Result<Status> {
    let index = Index::open(&config.state_dir)?;
    let names: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    index.status(&names)
}

/// A human-readable rendering of [`Status`].
pub fn render(status: &Status) -> String {
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
