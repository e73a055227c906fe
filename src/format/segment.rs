//! Segments of a growing file (`tail`): the bytes a file gained in one interval, stored as an
//! object of their own under the agent's reserved prefix until the settled file replaces
//! them (docs/FORMAT.md, "Segments of growing files", version 1).
//!
//! Key: `_panoptic-sync/segments/<logical key>~tail/<generation>-<seq>-<offset>.seg` then the
//! stage suffixes (`.gz`/`.zst`, `.enc`), each number in fixed-width decimal so that a listing
//! sorts them. The generation is the Unix time in milliseconds at which the agent began to
//! tail that content (a truncated or replaced file begins a new one); `seq` counts segments
//! within a generation from 0; `offset` is the position in the file of the segment's first
//! byte. The key is read back from its end, so any logical key (even one holding `~tail`)
//! maps to exactly one directory.

use crate::format::layout::{self, Compression, Plan};

pub use crate::format::layout::SEGMENTS_PREFIX;
/// Ends the directory of one file's segments.
pub const TAIL_MARK: &str = "~tail";
/// Ends a segment's name before its stage suffixes.
pub const SEG: &str = ".seg";
/// The most bytes one segment holds: a writer faster than this per interval makes several.
/// A reader bounds a segment's decoding by it.
pub const MAX_SEGMENT: u64 = 8 * 1024 * 1024;
/// The longest file name (last segment of a logical key) whose segments fit a file name of
/// every store; longer names are not tailed (they are stored once settled, as before).
pub const MAX_TAILED_NAME: usize = layout::MAX_STORED_NAME;

/// One segment object's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentKey {
    /// The logical key of the file it belongs to.
    pub logical: String,
    /// When this generation of the file began, Unix milliseconds.
    pub generation: u64,
    /// Its position among the generation's segments, from 0.
    pub seq: u64,
    /// The file offset of its first byte.
    pub offset: u64,
    /// The stages applied to it.
    pub plan: Plan,
}

/// Whether a file with this logical key can be tailed (its name fits a segment directory).
pub fn tailable(logical: &str) -> bool {
    let name = layout::file_name(logical);
    !name.is_empty() && name.len() <= MAX_TAILED_NAME
}

/// The directory (with a trailing `/`) of every segment of the file at `logical`.
pub fn dir_of(logical: &str) -> String {
    format!("{SEGMENTS_PREFIX}/{logical}{TAIL_MARK}/")
}

/// The prefix, under a destination's base, of every segment of the files under the logical
/// prefix `prefix` (empty: every segment).
pub fn prefix_for(prefix: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        SEGMENTS_PREFIX.to_string()
    } else {
        format!("{SEGMENTS_PREFIX}/{prefix}")
    }
}

impl SegmentKey {
    /// The stored key, relative to a destination's base.
    pub fn key(&self) -> String {
        format!(
            "{}{:020}-{:010}-{:020}{SEG}{}",
            dir_of(&self.logical),
            self.generation,
            self.seq,
            self.offset,
            self.plan.suffix()
        )
    }

    /// Read a key (relative to a destination's base) back; `None` for anything that is not a
    /// segment's key.
    pub fn parse(key: &str) -> Option<SegmentKey> {
        let rest = key.strip_prefix(SEGMENTS_PREFIX)?.strip_prefix('/')?;
        let (dir, name) = rest.rsplit_once('/')?;
        let logical = dir.strip_suffix(TAIL_MARK)?;
        if logical.is_empty() || logical.ends_with('/') {
            return None;
        }
        let (encrypt, name) = match name.strip_suffix(".enc") {
            Some(n) => (true, n),
            None => (false, name),
        };
        let (compression, name) = if let Some(n) = name.strip_suffix(".zst") {
            (Compression::Zstd, n)
        } else if let Some(n) = name.strip_suffix(".gz") {
            (Compression::Gzip, n)
        } else {
            (Compression::None, name)
        };
        let mut parts = name.strip_suffix(SEG)?.split('-');
        let mut number = |width: usize| {
            parts
                .next()
                .filter(|p| p.len() == width && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
        };
        let (generation, seq, offset) = (number(20)?, number(10)?, number(20)?);
        if parts.next().is_some() {
            return None;
        }
        Some(SegmentKey {
            logical: logical.to_string(),
            generation,
            seq,
            offset,
            plan: Plan {
                compression,
                encrypt,
            },
        })
    }
}

/// What an encrypted segment is bound to instead of its bare key: the key behind a prefix no
/// file's key can carry, so no other object of the agent authenticates as a segment and a
/// segment authenticates only at its own key (its file, generation, place and offset).
pub fn binding(stored_key: &str) -> String {
    format!("\0segment\0{stored_key}")
}

/// The durable prefix of a file read back from its segments: the segments of its newest
/// generation, in order, as long as each begins where the one before ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The generation read.
    pub generation: u64,
    /// Where the first segment begins (0, or the size of the settled object it extends).
    pub start: u64,
    /// The segments, in order.
    pub segments: Vec<SegmentKey>,
}

/// Group segment keys of one file into its newest generation's chain, ordered by `seq`;
/// a segment whose `seq` repeats or skips ends the chain there (what follows a gap is not
/// part of the durable prefix). Offsets are checked while reading, against sizes.
pub fn newest_chain(mut keys: Vec<SegmentKey>) -> Option<Chain> {
    let generation = keys.iter().map(|k| k.generation).max()?;
    keys.retain(|k| k.generation == generation);
    keys.sort_by_key(|k| (k.seq, k.offset));
    let start = keys.first()?.offset;
    let mut chain = Vec::with_capacity(keys.len());
    for (i, k) in keys.into_iter().enumerate() {
        if k.seq != i as u64 {
            break;
        }
        chain.push(k);
    }
    Some(Chain {
        generation,
        start,
        segments: chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(logical: &str, generation: u64, seq: u64, offset: u64, plan: Plan) -> SegmentKey {
        SegmentKey {
            logical: logical.into(),
            generation,
            seq,
            offset,
            plan,
        }
    }

    #[test]
    fn a_segment_key_reads_back_whatever_the_file_is_named() {
        let zenc = Plan {
            compression: Compression::Zstd,
            encrypt: true,
        };
        for logical in [
            "ci/n/run/test.log",
            "a~tail",
            "x~tail/y.log",
            "deep/0-0.seg",
            "r/00000000000000000001-0000000000-00000000000000000000.seg",
        ] {
            for plan in [Plan::STORED, zenc] {
                let s = seg(logical, 1_700_000_000_000, 3, 4096, plan);
                assert_eq!(SegmentKey::parse(&s.key()), Some(s.clone()), "{}", s.key());
            }
        }
        let s = seg("ci/a.log", 1, 2, 3, zenc);
        assert_eq!(
            s.key(),
            "_panoptic-sync/segments/ci/a.log~tail/00000000000000000001-0000000002-00000000000000000003.seg.zst.enc"
        );
        for bad in [
            "ci/a.log",
            "_panoptic-sync/segments/ci/a.log/1-2-3.seg",
            "_panoptic-sync/segments/~tail/00000000000000000001-0000000002-00000000000000000003.seg",
            "_panoptic-sync/segments/a~tail/00000000000000000001-0000000002-00000000000000000003",
            "_panoptic-sync/segments/a~tail/1-0000000002-00000000000000000003.seg",
        ] {
            assert_eq!(SegmentKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_chain_is_the_newest_generation_up_to_its_first_gap() {
        let p = Plan::STORED;
        let keys = vec![
            seg("a", 5, 0, 0, p),
            seg("a", 9, 1, 10, p),
            seg("a", 9, 0, 0, p),
            seg("a", 9, 3, 30, p),
        ];
        let c = newest_chain(keys).unwrap();
        assert_eq!((c.generation, c.start), (9, 0));
        assert_eq!(
            c.segments.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert_eq!(newest_chain(Vec::new()), None);
    }

    #[test]
    fn long_names_are_not_tailed() {
        assert!(tailable("a/b.log"));
        assert!(!tailable(&format!("a/{}", "x".repeat(201))));
        assert!(!tailable("a/"));
    }
}
