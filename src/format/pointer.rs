//! The content layout's wire formats (`layout = "content"` on a destination): where a blob
//! lives, the pointer object that stands at a file's key and names its blob, and where the
//! blob collector sets blobs aside. docs/FORMAT.md ("Content layout") is the specification.
//!
//! A blob key is `_panoptic-sync/blobs/<namespace>/<first 2 hex of name>/<name>` plus the
//! stage suffixes (`.gz`/`.zst`, `.enc`). In the `sha256` namespace (no encryption) the name
//! is the hex SHA-256 of the original; in a keyed namespace (`key-<key id>`) it is a keyed
//! hash of it (HKDF-SHA256 under that key), so a bucket reader without the key cannot confirm
//! a guessed file by its name.

use super::layout::{BLOBS_PREFIX, Plan, TRASH_PREFIX, parse};

/// The pointer format this version writes (`pointer` in the JSON).
pub const POINTER_FORMAT: u32 = 1;
/// The largest pointer object a reader accepts.
pub const MAX_POINTER_BYTES: u64 = 64 * 1024;
/// Files smaller than this stay at their own key in a content destination: their pointer
/// (about 330 bytes plain, 470 encrypted) and the extra request would cost about what the
/// blob saves (docs/PERFORMANCE.md, "Content layout", has the measurement).
pub const INLINE_BELOW: u64 = 4096;
/// The namespace of unencrypted blobs, named by the SHA-256 of their content.
pub const PLAIN_NAMESPACE: &str = "sha256";

/// The pointer object at a file's key in a content destination: names the blob holding the
/// file's bytes, and carries what a restore applies (size, SHA-256, mode, mtime).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pointer {
    /// The format (`1`); a reader refuses numbers it does not know.
    pub pointer: u32,
    /// The blob's stored key, relative to the destination's base.
    pub blob: String,
    /// Original size in bytes.
    pub size: u64,
    /// Bytes of the blob as stored (after compression and encryption).
    pub stored_size: u64,
    /// SHA-256 of the original, hex.
    pub sha256: String,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// The file's logical key (relative to the destination's base), full even when its
    /// stored key is shortened.
    pub path: String,
}

/// Why bytes are not a pointer a reader may follow.
#[derive(Debug, thiserror::Error)]
pub enum PointerError {
    /// Not JSON of the pointer's shape.
    #[error("pointer {key} does not parse: {message}")]
    Parse {
        /// The pointer's stored key.
        key: String,
        /// What the parser said.
        message: String,
    },
    /// A format number this reader does not know.
    #[error("pointer {key} has format {format}, which this version does not read")]
    Format {
        /// The pointer's stored key.
        key: String,
        /// The number found.
        format: u32,
    },
    /// A field a writer never writes.
    #[error("pointer {key} is refused: {why}")]
    Invalid {
        /// The pointer's stored key.
        key: String,
        /// What is wrong.
        why: String,
    },
}

impl Pointer {
    /// The JSON bytes of the pointer.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Read the pointer stored at `key` from `bytes`: the format is known, the blob key is a
    /// blob key, the SHA-256 is 64 hex digits, and (for a plain blob) the blob's name is that
    /// SHA-256, so a pointer cannot name one content and restore another.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Pointer, PointerError> {
        let p: Pointer = serde_json::from_slice(bytes).map_err(|e| PointerError::Parse {
            key: key.to_string(),
            message: e.to_string(),
        })?;
        if p.pointer != POINTER_FORMAT {
            return Err(PointerError::Format {
                key: key.to_string(),
                format: p.pointer,
            });
        }
        let invalid = |why: String| PointerError::Invalid {
            key: key.to_string(),
            why,
        };
        if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("{:?} is not a SHA-256", p.sha256)));
        }
        let Some(blob) = BlobKey::parse(&p.blob) else {
            return Err(invalid(format!("{:?} is not a blob key", p.blob)));
        };
        if blob.namespace == PLAIN_NAMESPACE && !blob.name.eq_ignore_ascii_case(&p.sha256) {
            return Err(invalid(format!(
                "blob {} is named for another content than the SHA-256 it records",
                p.blob
            )));
        }
        Ok(p)
    }
}

/// A blob key read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobKey<'a> {
    /// `sha256`, or `key-<16 hex of the key id>`.
    pub namespace: &'a str,
    /// The name: 64 hex digits.
    pub name: &'a str,
    /// The stages applied.
    pub plan: Plan,
}

impl<'a> BlobKey<'a> {
    /// Read `key` (relative to the destination base) as a blob key, or `None`.
    pub fn parse(key: &'a str) -> Option<BlobKey<'a>> {
        let rest = key.strip_prefix(BLOBS_PREFIX)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let (namespace, fan, last) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !valid_namespace(namespace) {
            return None;
        }
        let parsed = parse(last);
        let name = parsed.logical;
        if parsed.pointer
            || parsed.long
            || name.len() != 64
            || !name.bytes().all(|b| b.is_ascii_hexdigit())
            || fan != &name[..2]
        {
            return None;
        }
        Some(BlobKey {
            namespace,
            name,
            plan: parsed.plan,
        })
    }
}

fn valid_namespace(ns: &str) -> bool {
    ns == PLAIN_NAMESPACE
        || ns
            .strip_prefix("key-")
            .is_some_and(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The namespace of blobs encrypted with the key whose id is `key_id_hex`.
pub fn key_namespace(key_id_hex: &str) -> String {
    format!("key-{key_id_hex}")
}

/// The stored key of the blob `name` in `namespace`, encoded as `plan`.
pub fn blob_key(namespace: &str, name: &str, plan: Plan) -> String {
    let fan = name.get(..2).unwrap_or("00");
    format!("{BLOBS_PREFIX}/{namespace}/{fan}/{name}{}", plan.suffix())
}

/// Where the collector sets `blob` aside at `ms` (ms since the epoch).
pub fn trash_key(blob: &str, ms: i64) -> String {
    format!("{}/{ms}", trash_dir(blob))
}

/// The directory of every copy of `blob` set aside (listed to find one).
pub fn trash_dir(blob: &str) -> String {
    let below = blob.strip_prefix(BLOBS_PREFIX).unwrap_or(blob);
    format!("{TRASH_PREFIX}{below}")
}

/// A key under [`TRASH_PREFIX`] read back: the blob it holds and when it was set aside.
pub fn parse_trash_key(key: &str) -> Option<(String, i64)> {
    let rest = key.strip_prefix(TRASH_PREFIX)?;
    let (blob_below, ms) = rest.rsplit_once('/')?;
    let ms: i64 = ms.parse().ok()?;
    let blob = format!("{BLOBS_PREFIX}{blob_below}");
    BlobKey::parse(&blob)?;
    Some((blob, ms))
}

#[cfg(test)]
mod tests {
    use super::super::layout::{Compression, pointer_key};
    use super::*;

    const SHA: &str = "ab5d0a4f7cbf8f7c1b1f56b2a3b7b7e1f0e0f9a1c4e2f3d5a6b7c8d9e0f1a2b3";

    fn pointer(blob: &str) -> Pointer {
        Pointer {
            pointer: POINTER_FORMAT,
            blob: blob.into(),
            size: 5,
            stored_size: 5,
            sha256: SHA.into(),
            mode: 0o644,
            mtime_ns: 1,
            path: "ci/a.txt".into(),
        }
    }

    #[test]
    fn blob_keys_round_trip_and_name_their_content() {
        let plan = Plan {
            compression: Compression::Zstd,
            encrypt: false,
        };
        let key = blob_key(PLAIN_NAMESPACE, SHA, plan);
        assert_eq!(key, format!("_panoptic-sync/blobs/sha256/ab/{SHA}.zst"));
        let parsed = BlobKey::parse(&key).unwrap();
        assert_eq!(
            (parsed.namespace, parsed.name, parsed.plan),
            ("sha256", SHA, plan)
        );
        assert!(BlobKey::parse("_panoptic-sync/blobs/sha256/cd/x").is_none());
        assert!(BlobKey::parse(&key.replace("/ab/", "/cd/")).is_none());
        let (blob, ms) = parse_trash_key(&trash_key(&key, 42)).unwrap();
        assert_eq!((blob.as_str(), ms), (key.as_str(), 42));
    }

    #[test]
    fn a_pointer_must_name_a_blob_of_its_own_content() {
        let good = pointer(&blob_key(PLAIN_NAMESPACE, SHA, Plan::STORED));
        assert_eq!(Pointer::decode("k", &good.encode()).unwrap(), good);
        let other = SHA.replace("ab5d", "ab5e");
        let wrong = pointer(&blob_key(PLAIN_NAMESPACE, &other, Plan::STORED));
        assert!(Pointer::decode("k", &wrong.encode()).is_err());
        let outside = pointer("ci/other.txt");
        assert!(Pointer::decode("k", &outside.encode()).is_err());
        let mut future = good.clone();
        future.pointer = 2;
        assert!(matches!(
            Pointer::decode("k", &future.encode()),
            Err(PointerError::Format { .. })
        ));
    }

    #[test]
    fn pointer_keys_never_meet_file_keys() {
        assert_eq!(pointer_key("ci/a.txt", false), "ci/a.txt.ptr");
        assert_eq!(pointer_key("ci/a.txt", true), "ci/a.txt.ptr.enc");
        // A file named like a pointer is escaped, so its key is not a pointer's.
        assert_eq!(pointer_key("ci/a.ptr", false), "ci/a.ptr.asis.ptr");
        let p = parse("ci/a.txt.ptr.enc");
        assert!(p.pointer && p.plan.encrypt && p.logical == "ci/a.txt");
        let f = parse("ci/a.ptr.asis");
        assert!(!f.pointer && f.logical == "ci/a.ptr");
    }
}
