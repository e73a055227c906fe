//! The `tails` table (migration 9): for each growing file, destination and generation, how far
//! its segments are durable in that destination and what identifies the content they hold.
//! The tail task writes a row after each segment is durable, never before, so a restart
//! continues exactly where the durable segments end.

use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, params};

use super::{Index, UploadState, bytes_path, path_bytes, sha_from};

/// One generation of one growing file in one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailRow {
    /// The file.
    pub path: PathBuf,
    /// The destination.
    pub dest: String,
    /// When this generation began, Unix milliseconds (part of every segment's key).
    pub generation: u64,
    /// The file's logical key.
    pub logical: String,
    /// Where the generation's first segment begins (0, or the size of the settled object it
    /// extends).
    pub start: u64,
    /// Where its durable segments end: the next segment begins here.
    pub end: u64,
    /// Segments written in this generation (the next one's `seq`).
    pub seq: u64,
    /// The file's inode and device when the generation began.
    pub inode: u64,
    /// See `inode`.
    pub dev: u64,
    /// How many first bytes of the file `head` hashes (up to 4 KiB; 0 before any segment).
    pub head_len: u64,
    /// SHA-256 of the first `head_len` bytes: a file rewritten in place is told from one that
    /// grew.
    pub head: [u8; 32],
    /// The file was truncated or replaced: no more segments, waiting to be removed.
    pub closed: bool,
    /// For a closed generation: the file now holding its bytes (a rotated copy or the renamed
    /// file), whose settled object lets its segments go.
    pub successor: Option<PathBuf>,
}

/// The version of a file its settled object in a destination holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredVersion {
    /// Its size.
    pub size: u64,
    /// The file's inode then.
    pub inode: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
}

const COLUMNS: &str = "path, dest, generation, logical, start, end_offset, seq, inode, dev, head_len, \
                       head_sha256, closed, successor";

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<TailRow> {
    Ok(TailRow {
        path: bytes_path(r.get(0)?),
        dest: r.get(1)?,
        generation: r.get::<_, i64>(2)? as u64,
        logical: r.get(3)?,
        start: r.get::<_, i64>(4)? as u64,
        end: r.get::<_, i64>(5)? as u64,
        seq: r.get::<_, i64>(6)? as u64,
        inode: r.get::<_, i64>(7)? as u64,
        dev: r.get::<_, i64>(8)? as u64,
        head_len: r.get::<_, i64>(9)? as u64,
        head: sha_from(r, 10)?,
        closed: r.get(11)?,
        successor: r.get::<_, Option<Vec<u8>>>(12)?.map(bytes_path),
    })
}

impl Index {
    /// Every tail row (the agent's growing files; a short list), oldest generation first.
    pub fn tails(&self) -> anyhow::Result<Vec<TailRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tails ORDER BY path, dest, generation"
        ))?;
        let rows = stmt.query_map([], row_of)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The tail rows of one file, oldest generation first.
    pub fn tails_of(&self, path: &Path) -> anyhow::Result<Vec<TailRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tails WHERE path = ?1 ORDER BY dest, generation"
        ))?;
        let rows = stmt.query_map(params![path_bytes(path)], row_of)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Record `row` (after its segments up to `end` are durable in its destination).
    pub fn put_tail(&self, row: &TailRow) -> anyhow::Result<()> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "INSERT OR REPLACE INTO tails ({COLUMNS}, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
        ))?;
        stmt.execute(params![
            path_bytes(&row.path),
            row.dest,
            row.generation as i64,
            row.logical,
            row.start as i64,
            row.end as i64,
            row.seq as i64,
            row.inode as i64,
            row.dev as i64,
            row.head_len as i64,
            &row.head[..],
            row.closed,
            row.successor.as_deref().map(path_bytes),
            super::now_ms(),
        ])?;
        Ok(())
    }

    /// Forget one generation (after its segments were deleted from its destination).
    pub fn forget_tail(&self, path: &Path, dest: &str, generation: u64) -> anyhow::Result<()> {
        self.conn()
            .prepare_cached("DELETE FROM tails WHERE path = ?1 AND dest = ?2 AND generation = ?3")?
            .execute(params![path_bytes(path), dest, generation as i64])?;
        Ok(())
    }

    /// The file at `path` as indexed, when that version is stored in `dest` (its settled
    /// object there is durable).
    pub fn stored_version(&self, path: &Path, dest: &str) -> anyhow::Result<Option<StoredVersion>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT f.size, f.inode, f.sha256 FROM files f JOIN uploads u ON u.file_id = f.id
             WHERE f.path = ?1 AND u.dest = ?2 AND u.state = ?3 AND u.gen = f.gen",
        )?;
        Ok(stmt
            .query_row(params![path_bytes(path), dest, UploadState::Done], |r| {
                Ok(StoredVersion {
                    size: r.get::<_, i64>(0)? as u64,
                    inode: r.get::<_, i64>(1)? as u64,
                    sha256: sha_from(r, 2)?,
                })
            })
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_row_reads_back_and_is_forgotten_alone() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let mut row = TailRow {
            path: "/w/a.log".into(),
            dest: "primary".into(),
            generation: 7,
            logical: "ci/a.log".into(),
            start: 0,
            end: 100,
            seq: 2,
            inode: 5,
            dev: 6,
            head_len: 100,
            head: [9; 32],
            closed: false,
            successor: None,
        };
        idx.put_tail(&row).unwrap();
        let mut older = row.clone();
        older.generation = 3;
        older.closed = true;
        older.successor = Some("/w/a.log.1".into());
        idx.put_tail(&older).unwrap();
        row.end = 200;
        row.seq = 3;
        idx.put_tail(&row).unwrap();
        assert_eq!(
            idx.tails_of(Path::new("/w/a.log")).unwrap(),
            vec![older.clone(), row.clone()]
        );
        idx.forget_tail(Path::new("/w/a.log"), "primary", 3)
            .unwrap();
        assert_eq!(idx.tails().unwrap(), vec![row]);
        assert_eq!(
            idx.stored_version(Path::new("/w/a.log"), "primary")
                .unwrap(),
            None
        );
    }
}
