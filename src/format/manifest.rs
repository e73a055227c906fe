//! The manifest of a sealed run (`"format": 1`, schema in docs/FORMAT.md): every file with its
//! size, SHA-256, mtime, mode, content type and stored key, the CI context, the labels and the
//! test summary; and the short [`RunSummary`] of a sealed run that reports and node status
//! objects carry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ci::Ci;
use super::results::TestSummary;
/// Version of the manifest document; readers refuse versions they do not know.
pub(crate) const MANIFEST_FORMAT: u32 = 1;
/// The directory of a run reserved for the agent's own objects.
pub(crate) const RUN_DIR: &str = "_run";
/// The manifest's name in [`RUN_DIR`].
pub(crate) const MANIFEST_NAME: &str = "manifest.json";

/// One file of a sealed run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestFile {
    /// Path relative to the run directory, `/`-separated.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Permission bits.
    pub mode: u32,
    /// Content type guessed from the name.
    pub content_type: String,
    /// The object's key relative to the destination base (stage suffixes included); in a
    /// content destination, the pointer's.
    pub stored_key: String,
    /// In a content destination (`layout = "content"`), the blob holding the bytes, relative
    /// to the destination base: what the run's page links to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
}

/// Totals of a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Totals {
    /// Files.
    pub files: u64,
    /// Bytes of all files.
    pub bytes: u64,
}

/// The manifest of a sealed run (`"format": 1`, see docs/FORMAT.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Run name (the directory's name).
    pub run: String,
    /// The run's logical key prefix (`<watch prefix>/<run>`), relative to the destination base.
    pub key_prefix: String,
    /// Node that sealed the run.
    pub node: String,
    /// CI context, when sealed inside a supported CI job.
    pub ci: Option<Ci>,
    /// `--label K=V` pairs.
    pub labels: BTreeMap<String, String>,
    /// Oldest file modification time, milliseconds since the epoch.
    pub first_file_ms: Option<i64>,
    /// Newest file modification time, milliseconds since the epoch.
    pub last_file_ms: Option<i64>,
    /// When the run was sealed, milliseconds since the epoch.
    pub sealed_ms: i64,
    /// Every file, by path.
    pub files: Vec<ManifestFile>,
    /// Counts.
    pub totals: Totals,
    /// Test results parsed from the run's JUnit XML (absent when it has none, and in
    /// manifests written before results were parsed: readers of format 1 ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestSummary>,
}

/// A sealed run in reports and in the node status object other nodes read (named fields:
/// unknown ones are ignored and missing ones default, so versions mix).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RunSummary {
    /// Run name.
    pub run: String,
    /// When it was sealed (ms since the epoch).
    pub sealed_ms: i64,
    /// Files in it.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// From its first file to its last, seconds (how long the job wrote).
    pub duration_secs: Option<u64>,
    /// Its CI branch, when sealed in a CI job.
    pub branch: Option<String>,
}
