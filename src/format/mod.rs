//! Every format the agent writes to a bucket or reads from one, defined once, at the bottom
//! of the house: nothing here names a module above it.
//!
//! - [`layout`]: how a file's logical key becomes a stored key (escapes, long names, stage
//!   suffixes), the internal prefixes, and the [`layout::Plan`] that names the stages.
//! - [`units`]: sizes, durations and "now", spelled one way everywhere.

pub mod layout;
pub mod units;
