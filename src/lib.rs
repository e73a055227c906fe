//! panoptic-sync: the artifact agent for test machines and CI runners.
//!
//! The modules stand in layers, and imports point one way, down (docs/ARCHITECTURE.md):
//!
//! 1. **Formats**, at the bottom, naming nothing above them: [`format`](mod@format) (every wire format:
//!    key layout, manifest, CI context, test results, run record, node status, report and
//!    fleet views, units), [`error`] (the usage error), [`crypto`] (the object encryption
//!    format and keys), [`throttle`] (a byte-rate limiter).
//! 2. **Stores and index**: [`config`] (the TOML configuration, validated before any work),
//!    [`index`] (SQLite: files, queue, objects, runs, notifications, totals), [`tree`]
//!    (confined access to watched trees), [`filemeta`], [`pipeline`] (compression and
//!    encryption streams), [`destination`] (object stores, listing, durability), [`content`]
//!    (pointers and blobs of content-addressed destinations), [`metrics`],
//!    and [`html`] (pages rendered from formats alone).
//! 3. **Engine**: [`scan`] and [`watch`] find candidate files, [`ingest`] hashes them into the
//!    index, [`upload`] drains each destination's queue, [`tail`] sends growing files in
//!    segments while they are written, [`cleanup`] frees local disk,
//!    [`agent`] opens the parts and runs them, [`sync`] is one pass or a wait (`flush`).
//! 4. **Features**: [`runs`] (run directories, their state, `restore --run`), [`results`]
//!    (JUnit parsing, run records, fleet aggregation), [`seal`], [`notify`], [`retention`],
//!    [`collect`] (blobs of content destinations: the sweep, the audit),
//!    [`restore`], [`rebuild`], [`report`], [`node_status`], [`status`], [`links`],
//!    [`quarantine`] (the flaky-test quarantine list and `gate`).
//! 5. **Daemon**: [`daemon`], the long-running loops wired together.
//! 6. **Command line**: [`cli`], parsing, dispatch, text rendering and exit codes; `main.rs`
//!    only calls it.

// The crate doc names every module, private ones too (`cargo doc --document-private-items`).
#![allow(rustdoc::private_intra_doc_links)]

pub mod agent;
pub(crate) mod catalog;
pub mod cleanup;
pub mod cli;
pub(crate) mod collect;
pub mod config;
pub(crate) mod content;
pub mod crypto;
pub mod daemon;
pub(crate) mod destination;
pub(crate) mod error;
pub(crate) mod filemeta;
pub mod format;
pub(crate) mod html;
pub mod httpd;
pub mod index;
pub mod ingest;
pub(crate) mod links;
pub mod metrics;
pub(crate) mod node_status;
pub(crate) mod notify;
pub mod pipeline;
pub(crate) mod quarantine;
pub(crate) mod rebuild;
pub(crate) mod report;
pub mod restore;
pub(crate) mod results;
pub(crate) mod retention;
pub(crate) mod runs;
pub mod scan;
pub(crate) mod seal;
pub(crate) mod serve;
pub(crate) mod status;
pub mod sync;
pub(crate) mod tail;
pub(crate) mod throttle;
pub(crate) mod tree;
pub(crate) mod upload;
pub(crate) mod watch;

pub use config::{Config, ConfigError};
