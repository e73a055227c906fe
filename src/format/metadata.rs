//! The metadata names a plain object carries in stores that keep metadata (S3 `x-amz-meta-*`,
//! GCS and Azure metadata), spelled once (docs/FORMAT.md, "Metadata of plain objects"). An
//! encrypted object carries none: its record holds the same, inside the encryption.

/// SHA-256 of the original content, hex.
pub const SHA256: &str = "sha256";
/// Modification time of the original, nanoseconds since the epoch.
pub const MTIME_NS: &str = "mtimens";
/// Permission bits of the original, octal.
pub const MODE: &str = "mode";
/// Size of the original, bytes.
pub const SIZE: &str = "size";
/// The full last segment of a shortened long name, hex of its UTF-8.
pub const LONG_NAME: &str = "longname";
