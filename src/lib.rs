//! panoptic-sync: the artifact agent for test machines and CI runners.
//!
//! The data flows one way through these modules:
//!
//! 1. [`config`]: the TOML configuration, validated before any work starts.
//! 2. [`watch`] and [`scan`]: inotify events and tree walks produce candidate paths.
//! 3. [`ingest`]: each candidate is stat'ed, hashed if new or changed, and recorded in the
//!    [`index`] (SQLite), which queues one upload per destination.
//! 4. [`upload`]: a worker per [`destination`] drains its queue: skip what is already there,
//!    copy server-side what exists under another key, upload the rest.
//! 5. [`daemon`]: wires the parts together for `run`, `sync` and `flush`;
//!    [`status`] reads the index; [`restore`] reads destinations back; [`links`] makes
//!    public or presigned URLs.
//! 6. [`runs`]: run directories sealed with a manifest, listed, restored as a whole;
//!    [`notify`] announces each seal (webhook or command), durably queued in the index;
//!    [`results`] parses the run's JUnit XML into a test summary and a record that
//!    `report --fleet` and query engines read from the bucket.

pub mod agent;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub(crate) mod destination;
pub(crate) mod filemeta;
pub mod format;
pub(crate) mod html;
pub mod index;
pub mod ingest;
pub(crate) mod links;
pub mod metrics;
pub(crate) mod node_status;
pub(crate) mod notify;
pub mod pipeline;
pub(crate) mod rebuild;
pub(crate) mod report;
pub mod restore;
pub(crate) mod results;
pub(crate) mod retention;
pub(crate) mod runs;
pub mod scan;
pub(crate) mod seal;
pub(crate) mod status;
pub mod sync;
pub(crate) mod throttle;
pub(crate) mod tree;
pub(crate) mod upload;
pub(crate) mod watch;

pub use config::{Config, ConfigError};
