//! The files table: each watched file's identity and content as last indexed, written from
//! what the ingest stage observed (queueing its uploads), and read back by path or directory.

use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};

use super::{
    Index, UploadState, bytes_path, now_ms, path_bytes, sha_from, sha_or_damaged, stat_at,
};

/// Every indexed file in a path range (the files of one run directory), with the
/// destinations holding its current generation.
pub(super) const FILES_UNDER: &str = "SELECT f.path, f.size, f.mtime_ns, f.sha256,
        (SELECT group_concat(u.dest, char(10)) FROM uploads u
         WHERE u.file_id = f.id AND u.state = ?3 AND u.gen = f.gen),
        f.indexed_ms
     FROM files f WHERE f.path >= ?1 AND f.path < ?2";

/// Whether a file is indexed under a directory (a range of `path`).
pub(super) const ANY_FILE_UNDER: &str =
    "SELECT 1 FROM files WHERE path >= ?1 AND path < ?2 LIMIT 1";

/// The range of `path` values under `dir/`: they sort between `dir/` and `dir0` ('0' follows
/// '/').
fn range_under(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut lo = path_bytes(dir).to_vec();
    lo.push(b'/');
    let mut hi = lo.clone();
    if let Some(last) = hi.last_mut() {
        *last = b'0';
    }
    (lo, hi)
}

/// The identity of a file's state on disk: unchanged identity means unchanged content.
/// Equal when the identity is (size, mtime, inode, device); the mode is carried along, not
/// compared.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode number.
    pub inode: u64,
    /// Device number (0: not recorded, by an index from before it was).
    pub dev: u64,
    /// Permission bits as read from the file (a seal's manifest records them); 0 when the
    /// identity comes from the index, which does not keep them. Not part of the identity.
    pub mode: u32,
}

impl PartialEq for Stat {
    fn eq(&self, other: &Stat) -> bool {
        (self.size, self.mtime_ns, self.inode, self.dev)
            == (other.size, other.mtime_ns, other.inode, other.dev)
    }
}

impl Eq for Stat {}

impl Stat {
    /// Read the identity (and permission bits) from metadata.
    pub fn of(meta: &std::fs::Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat {
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            inode: meta.ino(),
            dev: meta.dev(),
            mode: meta.mode() & 0o7777,
        }
    }

    /// Whether `other` is the same file in the same state: size, mtime, inode and device
    /// (a device of 0, from an index older than the device column, matches any).
    pub fn same_file(&self, other: &Stat) -> bool {
        self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.inode == other.inode
            && (self.dev == other.dev || self.dev == 0 || other.dev == 0)
    }
}

/// An indexed file under a directory.
#[derive(Debug, Clone)]
pub struct FileUnder {
    /// Absolute path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds.
    pub mtime_ns: i64,
    /// Content hash.
    pub sha256: [u8; 32],
    /// Destinations holding its current content.
    pub held_by: Vec<String>,
    /// When the agent last indexed a change of it (ms since the epoch): whatever the file's
    /// own mtime says (`cp -p`, `tar x` and `rsync -a` keep old ones).
    pub indexed_ms: i64,
}

/// What the ingest stage learned about one path.
#[derive(Debug)]
pub enum Observation {
    /// The path no longer holds a regular file we upload.
    Gone(PathBuf),
    /// The file was read and hashed.
    Indexed {
        /// Absolute path.
        path: PathBuf,
        /// Object key relative to each destination's base, or why there can be none.
        key: Result<String, String>,
        /// Identity at hashing time.
        stat: Stat,
        /// SHA-256 of the content.
        sha256: [u8; 32],
    },
}

/// A file whose current content every destination asked about holds (local cleanup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    /// Row id of the file.
    pub id: i64,
    /// Local path.
    pub path: PathBuf,
    /// Its identity as indexed.
    pub stat: Stat,
}

impl Index {
    /// The recorded identity of each of `paths` (`None`: not indexed), in one read
    /// transaction (one lock round trip for the whole batch, not one per path).
    pub fn lookup_many(&self, paths: &[&Path]) -> anyhow::Result<Vec<Option<Stat>>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut out = Vec::with_capacity(paths.len());
        {
            let mut stmt =
                tx.prepare_cached("SELECT size, mtime_ns, inode, dev FROM files WHERE path = ?1")?;
            for path in paths {
                out.push(
                    stmt.query_row(params![path_bytes(path)], |r| stat_at(r, [0, 1, 2, 3]))
                        .optional()?,
                );
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Record a batch of observations in one transaction and queue uploads to `dests`.
    /// Returns how many uploads were newly queued.
    pub fn apply(&self, batch: &[Observation], dests: &[String]) -> anyhow::Result<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        let mut queued = 0;
        {
            let mut delete = tx.prepare_cached("DELETE FROM files WHERE path = ?1")?;
            let mut get = tx.prepare_cached("SELECT id, sha256, gen FROM files WHERE path = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO files (path, size, mtime_ns, inode, sha256, gen, indexed_ms, dev)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7)",
            )?;
            let mut update = tx.prepare_cached(
                "UPDATE files SET size = ?2, mtime_ns = ?3, inode = ?4, sha256 = ?5, gen = ?6,
                 indexed_ms = ?7, dev = ?8 WHERE id = ?1",
            )?;
            let mut content = tx.prepare_cached(
                "INSERT OR IGNORE INTO contents (sha256, size, first_seen_ms) VALUES (?1, ?2, ?3)",
            )?;
            let mut current = tx.prepare_cached(
                "SELECT key, sha256 FROM uploads WHERE file_id = ?1 AND dest = ?2",
            )?;
            // An upsert rather than INSERT OR REPLACE: the row REPLACE deletes fires no
            // DELETE trigger (unless recursive triggers are on), and the totals would drift.
            let mut enqueue = tx.prepare_cached(
                "INSERT INTO uploads
                 (file_id, dest, key, sha256, gen, state, attempts, next_attempt_ms, last_error,
                  permanent, queued_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 0, ?7, ?8, ?9)
                 ON CONFLICT (file_id, dest) DO UPDATE SET key = excluded.key,
                  sha256 = excluded.sha256, gen = excluded.gen, state = excluded.state,
                  attempts = 0, next_attempt_ms = 0, last_error = excluded.last_error,
                  permanent = excluded.permanent, queued_ms = excluded.queued_ms,
                  done_ms = NULL, method = NULL",
            )?;
            for obs in batch {
                match obs {
                    Observation::Gone(path) => {
                        delete.execute(params![path_bytes(path)])?;
                    }
                    Observation::Indexed {
                        path,
                        key,
                        stat,
                        sha256,
                    } => {
                        let existing = get
                            .query_row(params![path_bytes(path)], |r| {
                                Ok((
                                    r.get::<_, i64>(0)?,
                                    sha_or_damaged(r, 1)?,
                                    r.get::<_, i64>(2)?,
                                ))
                            })
                            .optional()?;
                        let (id, generation, content_changed) = match existing {
                            None => {
                                insert.execute(params![
                                    path_bytes(path),
                                    stat.size as i64,
                                    stat.mtime_ns,
                                    stat.inode as i64,
                                    &sha256[..],
                                    now,
                                    stat.dev as i64
                                ])?;
                                (tx.last_insert_rowid(), 1, true)
                            }
                            Some((id, old_sha, old_gen)) => {
                                let changed = old_sha != Some(*sha256);
                                let generation = if changed { old_gen + 1 } else { old_gen };
                                update.execute(params![
                                    id,
                                    stat.size as i64,
                                    stat.mtime_ns,
                                    stat.inode as i64,
                                    &sha256[..],
                                    generation,
                                    now,
                                    stat.dev as i64
                                ])?;
                                (id, generation, changed)
                            }
                        };
                        content.execute(params![&sha256[..], stat.size as i64, now])?;
                        let (key_text, state, error) = match key {
                            Ok(k) => (k.clone(), UploadState::Pending, None),
                            Err(e) => (
                                String::from_utf8_lossy(path_bytes(path)).into_owned(),
                                UploadState::Failed,
                                Some(e.clone()),
                            ),
                        };
                        for dest in dests {
                            let cur = current
                                .query_row(params![id, dest], |r| {
                                    Ok((r.get::<_, String>(0)?, sha_or_damaged(r, 1)?))
                                })
                                .optional()?;
                            // Same content at the same key: whatever state it is in still holds.
                            if !content_changed
                                && cur.as_ref() == Some(&(key_text.clone(), Some(*sha256)))
                            {
                                continue;
                            }
                            enqueue.execute(params![
                                id,
                                dest,
                                key_text,
                                &sha256[..],
                                generation,
                                state,
                                error,
                                (state == UploadState::Failed) as i64,
                                now
                            ])?;
                            queued += 1;
                        }
                    }
                }
            }
        }
        tx.commit()?;
        Ok(queued)
    }

    /// Every indexed file under the directory `dir`, with the destinations holding its
    /// current content (one range scan of the path index).
    pub fn files_under(&self, dir: &Path) -> anyhow::Result<Vec<FileUnder>> {
        let (lo, hi) = range_under(dir);
        let conn = self.conn();
        let mut s = conn.prepare_cached(FILES_UNDER)?;
        let rows = s.query_map(params![lo, hi, UploadState::Done], |r| {
            Ok(FileUnder {
                path: bytes_path(r.get(0)?),
                size: r.get::<_, i64>(1)? as u64,
                mtime_ns: r.get(2)?,
                sha256: sha_from(r, 3)?,
                held_by: r
                    .get::<_, Option<String>>(4)?
                    .map(|s| s.split('\n').map(str::to_string).collect())
                    .unwrap_or_default(),
                indexed_ms: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether any file under `dir/` is indexed (one step of the path index).
    pub fn has_files_under(&self, dir: &Path) -> anyhow::Result<bool> {
        let (lo, hi) = range_under(dir);
        let conn = self.conn();
        let mut s = conn.prepare_cached(ANY_FILE_UNDER)?;
        Ok(s.exists(params![lo, hi])?)
    }

    /// A page of indexed paths greater than `after` in byte order (files of one directory
    /// come together), for the deletion sweep.
    pub fn paths_from(&self, after: &Path, limit: usize) -> anyhow::Result<Vec<PathBuf>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT path FROM files WHERE path > ?1 ORDER BY path LIMIT ?2")?;
        let rows = stmt.query_map(params![path_bytes(after), limit as i64], |r| {
            Ok(bytes_path(r.get(0)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The indexed files directly in directory `dir` (absolute), as (file name, identity),
    /// in byte order. Rows of subdirectories are skipped over, not read: each time the scan
    /// meets one it starts again just past that subdirectory's range, so a directory costs
    /// one query per indexed subdirectory plus one row per file in it, whatever lies below.
    pub fn files_in_dir(&self, dir: &Path) -> anyhow::Result<Vec<(Vec<u8>, Stat)>> {
        let mut prefix = path_bytes(dir).to_vec();
        if prefix.last() != Some(&b'/') {
            prefix.push(b'/');
        }
        // Every path under `dir/` sorts below `dir0` ('0' follows '/').
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends with '/'") = b'0';
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT path, size, mtime_ns, inode, dev FROM files
             WHERE path >= ?1 AND path < ?2 ORDER BY path",
        )?;
        let mut out = Vec::new();
        let mut from = prefix.clone();
        'scan: loop {
            let mut rows = stmt.query(params![from, end])?;
            while let Some(r) = rows.next()? {
                let path: Vec<u8> = r.get(0)?;
                let name = &path[prefix.len()..];
                if let Some(slash) = name.iter().position(|&b| b == b'/') {
                    // A subdirectory: continue past everything under `dir/sub/`.
                    from.clear();
                    from.extend_from_slice(&path[..prefix.len() + slash]);
                    from.push(b'0');
                    continue 'scan;
                }
                out.push((name.to_vec(), stat_at(r, [1, 2, 3, 4])?));
            }
            break;
        }
        Ok(out)
    }

    /// Forget a file deleted by local cleanup (its objects stay). The path guards against a
    /// row id freed and given to another file since the file was picked.
    pub fn forget_file(&self, id: i64, path: &Path) -> anyhow::Result<()> {
        self.conn().execute(
            "DELETE FROM files WHERE id = ?1 AND path = ?2",
            params![id, path_bytes(path)],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::testing::obs;

    #[test]
    fn files_in_dir_lists_one_directory_and_skips_over_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        // Names sorting before '/' ('!', ' ', '.') and after it, siblings sharing a prefix
        // ("/w/a b", "/w/a0"), and subdirectories between the files.
        let paths = [
            "/w/a/1",
            "/w/a/!x",
            "/w/a/ sp",
            "/w/a/.hidden",
            "/w/a/b/2",
            "/w/a/b/c/3",
            "/w/a/b!/4",
            "/w/a/c",
            "/w/a/d/5",
            "/w/a/z",
            "/w/a b/6",
            "/w/a0/7",
            "/w/a!/8",
            "/w/1",
        ];
        let obs: Vec<Observation> = paths.iter().map(|p| obs(p, 1, 1)).collect();
        idx.apply(&obs, &[]).unwrap();
        let names = |d: &str| -> Vec<String> {
            idx.files_in_dir(Path::new(d))
                .unwrap()
                .into_iter()
                .map(|(n, _)| String::from_utf8(n).unwrap())
                .collect()
        };
        assert_eq!(names("/w/a"), [" sp", "!x", ".hidden", "1", "c", "z"]);
        assert_eq!(names("/w/a/"), names("/w/a"));
        assert_eq!(names("/w/a/b"), ["2"]);
        assert_eq!(names("/w/a/b!"), ["4"]);
        assert_eq!(names("/w"), ["1"]);
        assert!(names("/w/none").is_empty());
    }
}
