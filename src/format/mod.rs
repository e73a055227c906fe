//! Every format the agent writes to a bucket or reads from one, defined once, at the bottom
//! of the house: nothing here names a module above it.
//!
//! - [`layout`]: how a file's logical key becomes a stored key (escapes, long names, stage
//!   suffixes), the internal prefixes, and the [`layout::Plan`] that names the stages.
//! - [`manifest`]: a sealed run's manifest and the short summary reports carry.
//! - [`ci`]: the CI context of a run, read from the job's environment.
//! - [`results`]: test results as a manifest carries them.
//! - [`record`]: the run summary record, one NDJSON line per sealed run.
//! - [`metadata`]: the metadata names of plain objects.
//! - [`pointer`]: the content layout: blob keys, the pointer at a file's key, the trash.
//! - [`node_status`]: the status object each node publishes for the fleet view.
//! - [`quarantine`]: the list of quarantined tests that `gate` enforces.
//! - [`report`] and [`fleet`]: the node report and the fleet view as `report --json` writes them.
//! - [`segment`]: the segments of a growing file, stored while it is written.
//! - [`units`]: sizes, durations and "now", spelled one way everywhere.

pub(crate) mod ci;
pub(crate) mod fleet;
pub mod layout;
pub(crate) mod manifest;
pub mod metadata;
pub(crate) mod node_status;
pub mod pointer;
pub(crate) mod quarantine;
pub(crate) mod record;
pub(crate) mod report;
pub(crate) mod results;
pub mod segment;
pub mod units;
