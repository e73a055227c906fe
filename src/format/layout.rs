//! The object key layout: how a file's logical key (its path under the destination base,
//! `<watch prefix>/<relative path>`) becomes a stored key, and back, injectively.
//!
//! The stored key is the logical key with its last segment *escaped*, then one suffix per
//! applied stage (`.gz`/`.zst`, then `.enc`). Escaping makes the map one-to-one:
//! - a name ending in a reserved ending (`.gz`, `.zst`, `.enc`, `.asis`, `.long`) gets
//!   `.asis` appended, so a stored name without stage suffixes never ends in a stage suffix
//!   and `x.gz` stored as-is (`x.gz.asis`) differs from `x` compressed (`x.gz`);
//! - a name whose stored form would exceed [`MAX_STORED_NAME`] bytes is shortened to
//!   `<first ~32 bytes>~<32 hex of SHA-256(name)>.long`; the full name travels inside the
//!   object (the encrypted record, the `longname` metadata, or an extended attribute of a
//!   `file://` object) and is checked against the hash when read.
//!
//! Every other name is stored unchanged, so objects written before this rule keep their keys.

use sha2::{Digest, Sha256};

use std::path::Path;

/// Builds an internal key from the one spelling of the internal prefix.
macro_rules! internal_key {
    ($rest:literal) => {
        concat!("_panoptic-sync", $rest)
    };
}

/// Keys under this prefix are the agent's own (node status objects, probes), never artifacts;
/// no watch may use it (`config` refuses such a prefix, and `scan` such a path under an
/// empty prefix).
pub const INTERNAL_PREFIX: &str = internal_key!("");
/// Where each node publishes its status object (`<node_id>.json`).
pub const NODES_PREFIX: &str = internal_key!("/nodes");
/// Where sealed runs' summary records go, Hive-partitioned:
/// `date=YYYY-MM-DD/node=<node_id>/<run>~<hash>.json` (see [`crate::results`]).
pub const RUNS_PREFIX: &str = internal_key!("/runs");
/// Where sealed runs' per-test records go, partitioned like [`RUNS_PREFIX`].
pub const TESTS_PREFIX: &str = internal_key!("/tests");
/// Where `report --fleet --publish` stores the fleet page.
pub const FLEET_PAGE: &str = internal_key!("/fleet/index.html");
/// The quarantine list's logical key (see [`crate::format::quarantine`]).
pub const QUARANTINE_KEY: &str = internal_key!("/quarantine.json");
/// Where the segments of growing files wait for their settled file (see
/// [`crate::format::segment`]).
pub const SEGMENTS_PREFIX: &str = internal_key!("/segments");
/// Where `check-config` writes its probe objects.
pub const PROBE_PREFIX: &str = internal_key!("/probe");
/// Where a `layout = "content"` destination keeps each content once (see
/// [`crate::format::pointer`]): `<namespace>/<2 hex>/<name>` plus stage suffixes.
pub const BLOBS_PREFIX: &str = internal_key!("/blobs");
/// Where the blob collector sets unreferenced blobs aside before deleting them:
/// `<blob key below the internal prefix>/<ms set aside>`.
pub const TRASH_PREFIX: &str = internal_key!("/trash");
/// The blob collector's mark objects (one per sweep in progress).
pub const GC_PREFIX: &str = internal_key!("/gc");

/// Appended to names that end in a reserved ending.
pub const ESCAPE: &str = ".asis";
/// Ends a shortened long name.
pub const LONG: &str = ".long";
/// Ends a pointer's stored key (before `.enc`): the file's bytes are in a blob.
pub const POINTER: &str = ".ptr";
/// Endings a stored name never shows unescaped.
const RESERVED: &[&str] = &[".gz", ".zst", ".enc", ESCAPE, LONG, POINTER];
/// Longest stored last segment, suffixes included: 255 (Linux) minus room for temporary
/// names that stores add (object_store's `file://` staging appends `#<number>`).
pub const MAX_STORED_NAME: usize = 200;
/// Bytes of a long name kept readable in its shortened form.
const LONG_KEEP: usize = 32;
/// Name of the extended attribute holding a long name on a plain `file://` object.
pub const LONGNAME_XATTR: &str = "user.panoptic-sync.longname";

fn split(key: &str) -> (&str, &str) {
    match key.rfind('/') {
        Some(i) => key.split_at(i + 1),
        None => ("", key),
    }
}

/// The last segment of a key (the file's name).
pub fn file_name(key: &str) -> &str {
    split(key).1
}

/// Whether `name` has the form a `file://` store gives its staging files, `<name>#<digits>`
/// (everything after the first `#` digits): object_store refuses to write such a name and
/// skips it when listing, so it is escaped like a reserved ending.
pub fn staging_form(name: &str) -> bool {
    matches!(name.split_once('#'), Some((_, d)) if !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The shortened stored form of a long last segment `name` (without stage suffixes).
pub fn short_name(name: &str) -> String {
    let mut cut = LONG_KEEP.min(name.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(name.as_bytes());
    format!("{}~{}{LONG}", &name[..cut], hex::encode(&digest[..16]))
}

/// The stored key of `logical` encoded as `plan`.
pub fn stored_key(logical: &str, plan: Plan) -> String {
    with_suffix(logical, &plan.suffix())
}

/// The stored key of the pointer at `logical` (a `layout = "content"` destination): the
/// escaped name, then `.ptr`, then `.enc` when encrypted.
pub fn pointer_key(logical: &str, encrypt: bool) -> String {
    let suffix = if encrypt {
        format!("{POINTER}.enc")
    } else {
        POINTER.to_string()
    };
    with_suffix(logical, &suffix)
}

/// `logical` with its last segment escaped (or shortened), then `suffix`.
fn with_suffix(logical: &str, suffix: &str) -> String {
    let (dir, name) = split(logical);
    let mut stored = name.to_string();
    if RESERVED.iter().any(|r| name.ends_with(r)) || staging_form(name) {
        stored.push_str(ESCAPE);
    }
    if stored.len() + suffix.len() > MAX_STORED_NAME {
        stored = short_name(name);
    }
    format!("{dir}{stored}{suffix}")
}

/// A stored key read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The stages applied.
    pub plan: Plan,
    /// The logical key; for a long name, the key with its shortened last segment.
    pub logical: &'a str,
    /// Whether the last segment is a shortened long name (the full name is in the object).
    pub long: bool,
    /// Whether the object is a pointer to a blob (`.ptr`, then `.enc` when encrypted).
    pub pointer: bool,
}

/// Read a stored key back: stage suffixes, escape, long-name marker.
pub fn parse(stored: &str) -> Parsed<'_> {
    let (encrypt, rest) = match stored.strip_suffix(".enc") {
        Some(r) => (true, r),
        None => (false, stored),
    };
    let (pointer, rest) = match rest.strip_suffix(POINTER) {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let (compression, rest) = if pointer {
        (Compression::None, rest)
    } else if let Some(r) = rest.strip_suffix(".zst") {
        (Compression::Zstd, r)
    } else if let Some(r) = rest.strip_suffix(".gz") {
        (Compression::Gzip, r)
    } else {
        (Compression::None, rest)
    };
    let plan = Plan {
        compression,
        encrypt,
    };
    if rest.ends_with(LONG) {
        return Parsed {
            plan,
            logical: rest,
            long: true,
            pointer,
        };
    }
    Parsed {
        plan,
        logical: rest.strip_suffix(ESCAPE).unwrap_or(rest),
        long: false,
        pointer,
    }
}

/// Whether the full last segment `name` is the one a long key `short` (as returned by
/// [`parse`]) stands for.
pub fn long_name_matches(short: &str, name: &str) -> bool {
    let (_, short_last) = split(short);
    !name.is_empty() && !name.contains('/') && short_name(name) == short_last
}

/// Whether `path` (a full logical key recorded inside an object) is the logical key of
/// `stored_key`: equal, or for a shortened long name, the same directory and a last segment
/// that hashes to the key's.
pub fn names_key(stored_key: &str, path: &str) -> bool {
    let p = parse(stored_key);
    if !p.long {
        return p.logical == path;
    }
    let (dir, name) = split(path);
    let (key_dir, _) = split(p.logical);
    dir == key_dir && long_name_matches(p.logical, name)
}

/// Replace the shortened last segment of `short` by the full `name`.
pub fn with_name(short: &str, name: &str) -> String {
    let (dir, _) = split(short);
    format!("{dir}{name}")
}

/// Compression applied before upload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Stored as-is.
    #[default]
    None,
    /// gzip (flate2 with the zlib-rs backend); objects end in `.gz`.
    Gzip,
    /// zstd; objects end in `.zst`.
    Zstd,
}

/// How one file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Compression actually applied.
    pub compression: Compression,
    /// Whether the object is encrypted.
    pub encrypt: bool,
}

impl Plan {
    /// Stored as-is: no compression, no encryption.
    pub const STORED: Plan = Plan {
        compression: Compression::None,
        encrypt: false,
    };

    /// The key suffix: `.gz`/`.zst`, then `.enc`.
    pub fn suffix(&self) -> String {
        let mut s = String::from(compression_suffix(self.compression));
        if self.encrypt {
            s.push_str(".enc");
        }
        s
    }

    /// Read a plan back from an object key's suffixes; returns the logical key (see
    /// [`crate::format::layout::parse`]: for a shortened long name, the shortened key).
    pub fn from_key(key: &str) -> (Plan, &str) {
        let p = parse(key);
        (p.plan, p.logical)
    }

    /// Content-Encoding for an unencrypted compressed object.
    pub fn content_encoding(&self) -> Option<&'static str> {
        match (self.encrypt, self.compression) {
            (false, Compression::Gzip) => Some("gzip"),
            (false, Compression::Zstd) => Some("zstd"),
            _ => None,
        }
    }

    /// Content-Type for the object of `path`: the original's type, unless encrypted.
    pub fn content_type(&self, path: &Path) -> &'static str {
        if self.encrypt {
            return OCTET_STREAM;
        }
        guess_type(path)
    }
}

const OCTET_STREAM: &str = "application/octet-stream";

/// What CI writes as text under names no media-type table knows: shown as text in a browser.
const TEXT_EXTENSIONS: &[&str] = &[
    "log",
    "out",
    "err",
    "stdout",
    "stderr",
    "trace",
    "tap",
    "txt",
    "text",
    "diff",
    "patch",
    "cfg",
    "conf",
    "ini",
    "properties",
    "env",
    "lock",
    "sum",
    "mod",
    "gradle",
    "kts",
    "cmake",
    "mk",
    "make",
    "dockerfile",
    "gitignore",
    "tf",
    "hcl",
    "proto",
    "graphql",
    "sql",
    "rst",
    "adoc",
    "org",
    "tex",
    "bib",
    "po",
    "pot",
];

/// The media type of `path` by its extension (`application/octet-stream` if unknown), read
/// from the table as it is (parsing it into a `Mime` for every file showed in profiles). Text
/// types say `charset=utf-8`, and the logs and outputs CI writes (`.log`, `.out`, `.trace`, …)
/// are `text/plain`, so a browser shows them instead of downloading them.
pub fn guess_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if ext.as_deref().is_some_and(|e| TEXT_EXTENSIONS.contains(&e)) {
        return "text/plain; charset=utf-8";
    }
    match mime_guess::from_path(path).first_raw() {
        Some("text/plain") => "text/plain; charset=utf-8",
        Some("text/html") => "text/html; charset=utf-8",
        Some("text/css") => "text/css; charset=utf-8",
        Some("text/csv") => "text/csv; charset=utf-8",
        Some("text/markdown") | Some("text/x-markdown") => "text/markdown; charset=utf-8",
        Some("text/xml") | Some("application/xml") => "application/xml; charset=utf-8",
        Some("application/json") => "application/json; charset=utf-8",
        Some("text/javascript") | Some("application/javascript") => {
            "text/javascript; charset=utf-8"
        }
        Some(t) if t.starts_with("text/") => "text/plain; charset=utf-8",
        Some(t) => t,
        None => OCTET_STREAM,
    }
}

/// The media type without parameters (`text/html; charset=utf-8` → `text/html`).
pub fn essence(content_type: &str) -> &str {
    content_type
        .split(';')
        .next()
        .unwrap_or(content_type)
        .trim()
}

fn compression_suffix(c: Compression) -> &'static str {
    match c {
        Compression::None => "",
        Compression::Gzip => ".gz",
        Compression::Zstd => ".zst",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plans() -> Vec<Plan> {
        let mut out = Vec::new();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            for encrypt in [false, true] {
                out.push(Plan {
                    compression,
                    encrypt,
                });
            }
        }
        out
    }

    #[test]
    fn a_file_store_staging_name_is_escaped() {
        // Reproduced: `x/weird#1` stored as-is is refused by object_store's file store, so
        // `sync` exited 1 on every pass for such a file.
        assert!(staging_form("weird#1") && staging_form("#7") && staging_form("a#0042"));
        assert!(
            !staging_form("a#1#2")
                && !staging_form("a#b")
                && !staging_form("a#")
                && !staging_form("a")
        );
        assert_eq!(stored_key("x/weird#1", Plan::STORED), "x/weird#1.asis");
        assert!(!staging_form(file_name(&stored_key(
            "x/weird#1",
            Plan::STORED
        ))));
        assert_eq!(parse("x/weird#1.asis").logical, "x/weird#1");
    }

    #[test]
    fn every_name_and_plan_round_trips_and_no_two_collide() {
        let long = "é".repeat(127) + "x";
        let names = [
            "plain.txt",
            "plain.txt.gz",
            "report.tar.gz",
            "core.zst",
            "notes.enc",
            "x.asis",
            "x.asis.asis",
            "x.gz.asis",
            "y.long",
            "a.zst.enc",
            ".gz",
            "naïve résumé.txt",
            "weird#1",
            "weird#1.asis",
            "a#12#3",
            "#7",
            long.as_str(),
        ];
        let mut seen = std::collections::HashMap::new();
        for name in names {
            let logical = format!("ci/node/{name}");
            for plan in plans() {
                let stored = stored_key(&logical, plan);
                let last = stored.rsplit('/').next().unwrap();
                assert!(last.len() <= MAX_STORED_NAME, "{stored}");
                let p = parse(&stored);
                assert_eq!(p.plan, plan, "{stored}");
                if p.long {
                    assert!(long_name_matches(p.logical, name), "{stored}");
                    assert_eq!(with_name(p.logical, name), logical);
                } else {
                    assert_eq!(p.logical, logical, "{stored}");
                }
                if let Some(other) = seen.insert(stored.clone(), (name, plan)) {
                    panic!("{stored} for {name} {plan:?} and {other:?}");
                }
            }
        }
    }

    #[test]
    fn ordinary_names_keep_their_keys() {
        let p = Plan {
            compression: Compression::Zstd,
            encrypt: true,
        };
        assert_eq!(stored_key("a/b.log", p), "a/b.log.zst.enc");
        assert_eq!(stored_key("a/b.log", Plan::STORED), "a/b.log");
        assert_eq!(stored_key("a/b.tar.gz", Plan::STORED), "a/b.tar.gz.asis");
        assert!(!long_name_matches("a/b.long", "b"));
    }
}
