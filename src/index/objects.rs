//! What each destination is known to hold (the objects table): looked up for dedup (skip or
//! server-side copy), recorded as uploads end or an index is rebuilt, forgotten by retention.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{OptionalExtension, ToSql, params};

use super::{Index, UploadState, now_ms, sha_from};

/// How a stored file got into its destination (the `uploads.method` column, stored as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Its bytes were sent.
    Upload,
    /// Copied server-side from an object holding the same content.
    Copy,
    /// The object at its key already held the content.
    Skip,
    /// Content layout: the blob was already in the destination; only the pointer was written.
    Reuse,
}

impl Method {
    /// The name stored in the index and shown in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Upload => "upload",
            Method::Copy => "copy",
            Method::Skip => "skip",
            Method::Reuse => "reuse",
        }
    }

    /// Whether no bytes of the file were sent (a copy or a skip: dedup).
    pub fn deduplicated(self) -> bool {
        match self {
            Method::Upload => false,
            Method::Copy | Method::Skip | Method::Reuse => true,
        }
    }
}

impl ToSql for Method {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for Method {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_str()? {
            "upload" => Ok(Method::Upload),
            "copy" => Ok(Method::Copy),
            "skip" => Ok(Method::Skip),
            "reuse" => Ok(Method::Reuse),
            other => Err(FromSqlError::Other(
                format!("unknown upload method {other:?}").into(),
            )),
        }
    }
}

/// Some object holding given content, other than at a given key. Without INDEXED BY, SQLite
/// prefers the primary key's `dest` prefix (for the `key !=` term) and scans every object of
/// the destination.
pub(super) const OBJECT_WITH: &str = "SELECT key, stored_key, sha256, size, stored_size, pipeline,
    blob FROM objects INDEXED BY objects_by_sha
    WHERE dest = ?1 AND sha256 = ?2 AND pipeline = ?3 AND key != ?4 LIMIT 1";

/// Record that a destination holds an object (parameters: [`object_params`]).
pub(super) const INSERT_OBJECT: &str = "INSERT OR REPLACE INTO objects
    (dest, key, stored_key, sha256, size, stored_size, pipeline, stored_ms, blob)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

#[allow(clippy::type_complexity)]
pub(super) fn object_params<'a>(
    dest: &'a str,
    o: &'a ObjectRow,
    now: i64,
) -> (
    &'a str,
    &'a str,
    &'a str,
    &'a [u8],
    i64,
    i64,
    &'a str,
    i64,
    Option<&'a str>,
) {
    (
        dest,
        &o.key,
        &o.stored_key,
        &o.sha256[..],
        o.size as i64,
        o.stored_size as i64,
        &o.pipeline,
        now,
        o.blob.as_ref().map(|b| b.key.as_str()),
    )
}

/// Record that a destination holds a blob (parameters: dest, blob, sha256, size, stored
/// size, ms uploaded by this node or NULL, now); a blob this node uploaded stays counted so.
pub(super) const UPSERT_BLOB: &str = "INSERT INTO blobs
    (dest, blob, sha256, size, stored_size, uploaded_ms, seen_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (dest, blob) DO UPDATE SET stored_size = excluded.stored_size,
        uploaded_ms = coalesce(excluded.uploaded_ms, uploaded_ms), seen_ms = excluded.seen_ms";

/// Record `o`'s blob, if it has one, with `upsert` (a prepared [`UPSERT_BLOB`]).
pub(super) fn record_blob(
    upsert: &mut rusqlite::CachedStatement<'_>,
    dest: &str,
    o: &ObjectRow,
    now: i64,
) -> rusqlite::Result<()> {
    if let Some(b) = &o.blob {
        upsert.execute(params![
            dest,
            b.key,
            &o.sha256[..],
            o.size as i64,
            b.stored_size as i64,
            b.uploaded.then_some(now),
            now
        ])?;
    }
    Ok(())
}

/// What a destination holds for this node: original bytes, bytes it stored (objects and
/// pointers, plus the blobs its uploads sent), and original bytes placed by dedup.
pub(super) const STORAGE_TOTALS: &str = "SELECT coalesce(sum(o.size), 0),
    coalesce(sum(o.stored_size
        + CASE WHEN u.method = 'upload' THEN coalesce(b.stored_size, 0) ELSE 0 END), 0),
    coalesce(sum(CASE WHEN u.method IN ('copy', 'skip', 'reuse') THEN o.size ELSE 0 END), 0)
    FROM objects o LEFT JOIN uploads u ON u.dest = o.dest AND u.key = o.key
    LEFT JOIN blobs b ON b.dest = o.dest AND b.blob = o.blob
    WHERE o.dest = ?1";

/// A destination's storage by this node's record (node status, fleet report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageTotals {
    /// Original bytes of the files stored.
    pub logical_bytes: u64,
    /// Bytes stored for them by this node.
    pub stored_bytes: u64,
    /// Original bytes placed without sending their content.
    pub dedup_saved_bytes: u64,
}

/// A blob this node uploaded, or found and referenced (content layout).
pub(super) const BLOB_KNOWN: &str = "SELECT stored_size FROM blobs WHERE dest = ?1 AND blob = ?2";

/// Blobs of a destination this node uploaded, and those its objects reference: counts and
/// stored bytes.
pub(super) const BLOB_TOTALS: &str = "SELECT
    coalesce(sum(uploaded_ms IS NOT NULL), 0),
    coalesce(sum(CASE WHEN uploaded_ms IS NOT NULL THEN stored_size ELSE 0 END), 0),
    count(*), coalesce(sum(stored_size), 0)
    FROM blobs WHERE dest = ?1";

/// Forget an object by its stored key.
pub(super) const FORGET_STORED: &str = "DELETE FROM objects WHERE dest = ?1 AND stored_key = ?2";

/// Every object of a destination with how its upload got it there (for reports).
pub(super) const OBJECTS_WITH_METHOD: &str =
    "SELECT o.key, o.stored_key, o.size, o.stored_size, o.stored_ms, u.method, b.stored_size
     FROM objects o LEFT JOIN uploads u ON u.dest = o.dest AND u.key = o.key
     LEFT JOIN blobs b ON b.dest = o.dest AND b.blob = o.blob
     WHERE o.dest = ?1";

/// A file stored in every destination asked for, as the index has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAs {
    /// Its content.
    pub sha256: [u8; 32],
    /// Per destination: the stored key and content of the object at the file's key, if the
    /// index has one (a seal checks that each holds `sha256`).
    pub held: Vec<Option<(String, [u8; 32])>>,
}

/// An object a destination holds, as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRow {
    /// Logical key (relative to the destination base, without pipeline suffixes).
    pub key: String,
    /// The key it is stored under (with suffixes such as `.zst.enc`).
    pub stored_key: String,
    /// SHA-256 of the original content.
    pub sha256: [u8; 32],
    /// Original size.
    pub size: u64,
    /// Size of the stored object.
    pub stored_size: u64,
    /// Identity of the pipeline settings that wrote it.
    pub pipeline: String,
    /// Content layout: the blob the pointer at `stored_key` names.
    pub blob: Option<BlobRef>,
}

/// The blob of a file stored as a pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    /// The blob's stored key (relative to the destination base).
    pub key: String,
    /// Its stored bytes (0 when read back from the objects table).
    pub stored_size: u64,
    /// Whether this upload sent it (else it was already there).
    pub uploaded: bool,
}

/// What a node's index knows of a destination's blobs (content layout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlobTotals {
    /// Blobs this node uploaded.
    pub uploaded: u64,
    /// Their stored bytes.
    pub uploaded_bytes: u64,
    /// Blobs known (uploaded, or found and referenced).
    pub known: u64,
    /// Their stored bytes.
    pub known_bytes: u64,
}

/// An object a destination holds, with how its file got there (for reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUse {
    /// Logical key.
    pub key: String,
    /// The key it is stored under.
    pub stored_key: String,
    /// Original size.
    pub size: u64,
    /// Size of the stored object.
    pub stored_size: u64,
    /// When the index recorded it (ms since epoch).
    pub stored_ms: i64,
    /// How the file now tracked at its key got there (`None`: no such file, e.g. rebuilt).
    pub method: Option<Method>,
    /// Content layout: the stored bytes of the blob its pointer names.
    pub blob_stored_size: Option<u64>,
}

impl ObjectUse {
    /// The bytes this node stored for the file: its object (or pointer), plus its blob when
    /// this upload sent it (a blob found in the destination cost nothing more).
    pub fn sent_bytes(&self) -> u64 {
        match (self.method, self.blob_stored_size) {
            (Some(Method::Upload), Some(blob)) => self.stored_size.saturating_add(blob),
            _ => self.stored_size,
        }
    }

    /// The bytes the file's encoded content takes: its object, or in a content destination
    /// its blob (what compression is measured against).
    pub fn encoded_bytes(&self) -> u64 {
        self.blob_stored_size.unwrap_or(self.stored_size)
    }
}

/// The objects a destination holds by this index's record, and their original bytes.
pub(super) const HELD_TOTALS: &str =
    "SELECT count(*), coalesce(sum(size), 0) FROM objects WHERE dest = ?1";

impl Index {
    /// How many objects `dest` holds by this index's record, and their original bytes: what
    /// was stored, whether or not the local files still exist (local cleanup deletes those).
    pub fn held_totals(&self, dest: &str) -> anyhow::Result<(u64, u64)> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(HELD_TOTALS)?;
        Ok(s.query_row(params![dest], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?)
    }

    /// The object known to be at logical `key` in `dest`.
    pub fn object_at(&self, dest: &str, key: &str) -> anyhow::Result<Option<ObjectRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key, stored_key, sha256, size, stored_size, pipeline, blob FROM objects
             WHERE dest = ?1 AND key = ?2",
        )?;
        Ok(stmt.query_row(params![dest, key], object_row).optional()?)
    }

    /// Some object in `dest` holding content `sha256` written by `pipeline`, other than at
    /// logical key `not_key`.
    pub fn object_with(
        &self,
        dest: &str,
        sha256: &[u8; 32],
        pipeline: &str,
        not_key: &str,
    ) -> anyhow::Result<Option<ObjectRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(OBJECT_WITH)?;
        Ok(stmt
            .query_row(params![dest, &sha256[..], pipeline, not_key], object_row)
            .optional()?)
    }

    /// Every object the index says `dest` holds for files it tracks as done, with the
    /// file's current hash (for `verify`).
    pub fn objects_of(&self, dest: &str) -> anyhow::Result<Vec<ObjectRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT o.key, o.stored_key, o.sha256, o.size, o.stored_size, o.pipeline, o.blob
             FROM objects o JOIN uploads u ON u.dest = o.dest AND u.key = o.key
             WHERE o.dest = ?1 AND u.state = ?2 AND u.sha256 = o.sha256
             ORDER BY o.key",
        )?;
        let rows = stmt.query_map(params![dest, UploadState::Done], object_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Record objects `dest` is known to hold (`--rebuild-index`), in one transaction.
    pub fn record_objects(&self, dest: &str, rows: &[ObjectRow]) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(INSERT_OBJECT)?;
            let mut blob = tx.prepare_cached(UPSERT_BLOB)?;
            let now = now_ms();
            for o in rows {
                insert.execute(object_params(dest, o, now))?;
                record_blob(&mut blob, dest, o, now)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The stored size of `blob` if this node knows `dest` to hold it (content layout:
    /// looked up before a HEAD).
    pub fn known_blob(&self, dest: &str, blob: &str) -> anyhow::Result<Option<u64>> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(BLOB_KNOWN)?;
        Ok(s.query_row(params![dest, blob], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|n| n as u64))
    }

    /// Forget that `dest` holds `blob` (found missing, or collected).
    pub fn forget_blob(&self, dest: &str, blob: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "DELETE FROM blobs WHERE dest = ?1 AND blob = ?2",
            params![dest, blob],
        )?;
        Ok(())
    }

    /// What `dest` holds for this node (see [`STORAGE_TOTALS`]).
    pub fn storage_totals(&self, dest: &str) -> anyhow::Result<StorageTotals> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(STORAGE_TOTALS)?;
        Ok(s.query_row(params![dest], |r| {
            Ok(StorageTotals {
                logical_bytes: r.get::<_, i64>(0)? as u64,
                stored_bytes: r.get::<_, i64>(1)? as u64,
                dedup_saved_bytes: r.get::<_, i64>(2)? as u64,
            })
        })?)
    }

    /// The blobs of `dest` this node uploaded and knows of (reports).
    pub fn blob_totals(&self, dest: &str) -> anyhow::Result<BlobTotals> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(BLOB_TOTALS)?;
        Ok(s.query_row(params![dest], |r| {
            Ok(BlobTotals {
                uploaded: r.get::<_, i64>(0)? as u64,
                uploaded_bytes: r.get::<_, i64>(1)? as u64,
                known: r.get::<_, i64>(2)? as u64,
                known_bytes: r.get::<_, i64>(3)? as u64,
            })
        })?)
    }

    /// Forget that `dest` holds logical `key` (it was found missing).
    pub fn forget_object(&self, dest: &str, key: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "DELETE FROM objects WHERE dest = ?1 AND key = ?2",
            params![dest, key],
        )?;
        Ok(())
    }

    /// Forget objects removed from `dest` by retention, so they are never copied from.
    pub fn forget_stored(&self, dest: &str, stored_key: &str) -> anyhow::Result<()> {
        self.conn()
            .execute(FORGET_STORED, params![dest, stored_key])?;
        Ok(())
    }

    /// Call `f` with every object `dest` holds and how its file got there (reports).
    pub fn each_object_of(&self, dest: &str, mut f: impl FnMut(ObjectUse)) -> anyhow::Result<()> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(OBJECTS_WITH_METHOD)?;
        let mut rows = stmt.query(params![dest])?;
        while let Some(r) = rows.next()? {
            f(ObjectUse {
                key: r.get(0)?,
                stored_key: r.get(1)?,
                size: r.get::<_, i64>(2)? as u64,
                stored_size: r.get::<_, i64>(3)? as u64,
                stored_ms: r.get(4)?,
                method: r.get(5)?,
                blob_stored_size: r.get::<_, Option<i64>>(6)?.map(|n| n as u64),
            });
        }
        Ok(())
    }
}

fn object_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ObjectRow> {
    Ok(ObjectRow {
        key: r.get(0)?,
        stored_key: r.get(1)?,
        sha256: sha_from(r, 2)?,
        size: r.get::<_, i64>(3)? as u64,
        stored_size: r.get::<_, i64>(4)? as u64,
        pipeline: r.get(5)?,
        blob: r.get::<_, Option<String>>(6)?.map(|key| BlobRef {
            key,
            stored_size: 0,
            uploaded: false,
        }),
    })
}
