//! The index: a SQLite database (WAL mode) under `state_dir` that is both the record of every
//! watched file and the durable upload queue.
//!
//! Tables:
//! - `files`: one row per local file (path, size, mtime, inode, sha256, generation).
//!   The generation grows whenever the content changes; an upload only counts if it
//!   uploaded the generation still current ("last version wins").
//! - `contents`: one row per distinct SHA-256 seen, with its size.
//! - `uploads`: per file and destination, the target key, state (pending, done, failed),
//!   attempts, next attempt time and last error. Pending rows are the queue.
//! - `objects`: what each destination is known to hold: logical key (without pipeline
//!   suffixes) → stored key, sha256, sizes and the pipeline identity that wrote it. For dedup:
//!   content already at the key is skipped, content elsewhere is copied server-side.
//! - `runs`: sealed runs, with the manifest as written.
//! - `notifications`: one row per seal and `[[notify]]` entry, inserted in the transaction
//!   that records the seal: the document to send, its state (pending, sent, given up),
//!   attempts, next attempt time, a lease held by the process sending it, and the last error.
//! - `index_totals`, `upload_totals`: running counts of the tables above, kept by triggers
//!   (migration 6), so `status` never reads every file.
//!
//! Writes are batched into one transaction per batch; every call is blocking and meant to run
//! on a blocking thread.

use std::collections::HashSet;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, OptionalExtension, ToSql, params};

/// The state of one file's upload to one destination (the `uploads.state` column, stored as
/// its integer; bound as a parameter, never spelled in SQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    /// Waiting in the queue (including failing and being retried).
    Pending = 0,
    /// The current generation is in the destination.
    Done = 1,
    /// Cannot ever be uploaded as it is (e.g. a name that is not UTF-8); not retried.
    Failed = 2,
}

impl ToSql for UploadState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(*self as i64))
    }
}

impl FromSql for UploadState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_i64()? {
            0 => Ok(UploadState::Pending),
            1 => Ok(UploadState::Done),
            2 => Ok(UploadState::Failed),
            n => Err(FromSqlError::OutOfRange(n)),
        }
    }
}

/// How a stored file got into its destination (the `uploads.method` column, stored as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Its bytes were sent.
    Upload,
    /// Copied server-side from an object holding the same content.
    Copy,
    /// The object at its key already held the content.
    Skip,
}

impl Method {
    /// The name stored in the index and shown in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Upload => "upload",
            Method::Copy => "copy",
            Method::Skip => "skip",
        }
    }

    /// Whether no bytes of the file were sent (a copy or a skip: dedup).
    pub fn deduplicated(self) -> bool {
        match self {
            Method::Upload => false,
            Method::Copy | Method::Skip => true,
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
            other => Err(FromSqlError::Other(
                format!("unknown upload method {other:?}").into(),
            )),
        }
    }
}

/// The state of one notification (the `notifications.state` column, stored as its integer;
/// bound as a parameter, never spelled in SQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyState {
    /// Not delivered yet (including failing and being retried).
    Pending = 0,
    /// Delivered: the receiver answered 2xx, or the command exited 0.
    Sent = 1,
    /// Not delivered, and no longer retried (too old).
    GivenUp = 2,
}

impl ToSql for NotifyState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(*self as i64))
    }
}

impl FromSql for NotifyState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_i64()? {
            0 => Ok(NotifyState::Pending),
            1 => Ok(NotifyState::Sent),
            2 => Ok(NotifyState::GivenUp),
            n => Err(FromSqlError::OutOfRange(n)),
        }
    }
}

/// Schema migrations; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE files (
    id       INTEGER PRIMARY KEY,
    path     BLOB NOT NULL UNIQUE,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    sha256   BLOB NOT NULL,
    gen      INTEGER NOT NULL,
    indexed_ms INTEGER NOT NULL
);
CREATE TABLE contents (
    sha256   BLOB PRIMARY KEY,
    size     INTEGER NOT NULL,
    first_seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE uploads (
    file_id  INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    dest     TEXT NOT NULL,
    key      TEXT NOT NULL,
    sha256   BLOB NOT NULL,
    gen      INTEGER NOT NULL,
    state    INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    permanent INTEGER NOT NULL DEFAULT 0,
    queued_ms INTEGER NOT NULL,
    done_ms  INTEGER,
    method   TEXT,
    PRIMARY KEY (file_id, dest)
) WITHOUT ROWID;
CREATE INDEX uploads_queue ON uploads(dest, state, next_attempt_ms);
CREATE TABLE objects (
    dest     TEXT NOT NULL,
    key      TEXT NOT NULL,
    stored_key TEXT NOT NULL,
    sha256   BLOB NOT NULL,
    size     INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    stored_ms INTEGER NOT NULL,
    PRIMARY KEY (dest, key)
) WITHOUT ROWID;
CREATE INDEX objects_by_sha ON objects(dest, sha256, pipeline);
"#,
    // 2: the queue index also orders by queue time (claiming no longer sorts every pending row),
    // and retention finds objects by stored key without scanning the destination's objects.
    r#"
DROP INDEX uploads_queue;
CREATE INDEX uploads_queue ON uploads(dest, state, next_attempt_ms, queued_ms);
CREATE INDEX objects_by_stored_key ON objects(dest, stored_key);
"#,
    // 3: the device joins the identity of a file (local cleanup re-checks device and inode);
    // 0 means "not recorded yet" and matches any device.
    r#"
ALTER TABLE files ADD COLUMN dev INTEGER NOT NULL DEFAULT 0;
"#,
    // 4: sealed runs (`seal`, `runs`): one row per run directory, with the manifest as
    // written, so `runs` can tell a run changed after its seal without the destinations.
    r#"
CREATE TABLE runs (
    watch    BLOB NOT NULL,
    name     TEXT NOT NULL,
    sealed_ms INTEGER NOT NULL,
    manifest_sha256 BLOB NOT NULL,
    files    INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    PRIMARY KEY (watch, name)
) WITHOUT ROWID;
"#,
    // 5: notifications of sealed runs (`[[notify]]`), queued with the seal in one transaction.
    r#"
CREATE TABLE notifications (
    id       INTEGER PRIMARY KEY,
    notifier TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    watch    BLOB NOT NULL,
    run      TEXT NOT NULL,
    sealed_ms INTEGER NOT NULL,
    manifest_key TEXT NOT NULL,
    payload  TEXT NOT NULL,
    state    INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    lease_until_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    done_ms  INTEGER
);
CREATE INDEX notifications_due ON notifications(state, next_attempt_ms);
CREATE INDEX notifications_of_run ON notifications(watch, run, sealed_ms);
"#,
    // 6: running totals kept by triggers, so `status` reads counts instead of scanning every
    // file and upload row (issue 16). `index_totals` is one row (files, their bytes, distinct
    // contents); `upload_totals` has one row per (destination, state) with its upload rows,
    // those with a last error, and those whose generation is not the file's current one
    // ("stale": only a destination left out of a re-index has them). A row's stale share is
    // `coalesce(gen != file's gen, 0)`: 0 while its file is missing, so a file's rows leave the
    // stale count in the BEFORE DELETE trigger on `files`, before the cascade deletes them.
    // No trigger spells an upload state: they count per state, whatever its value.
    r#"
CREATE TABLE index_totals (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    files    INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    contents INTEGER NOT NULL
);
INSERT INTO index_totals (id, files, bytes, contents) VALUES (1,
    (SELECT count(*) FROM files), (SELECT coalesce(sum(size), 0) FROM files),
    (SELECT count(*) FROM contents));
CREATE TABLE upload_totals (
    dest     TEXT NOT NULL,
    state    INTEGER NOT NULL,
    rows     INTEGER NOT NULL,
    errors   INTEGER NOT NULL,
    stale    INTEGER NOT NULL,
    PRIMARY KEY (dest, state)
) WITHOUT ROWID;
INSERT INTO upload_totals (dest, state, rows, errors, stale)
    SELECT u.dest, u.state, count(*), sum(u.last_error IS NOT NULL),
           sum(coalesce(u.gen != f.gen, 0))
    FROM uploads u LEFT JOIN files f ON f.id = u.file_id GROUP BY u.dest, u.state;

CREATE TRIGGER files_totals_insert AFTER INSERT ON files BEGIN
    UPDATE index_totals SET files = files + 1, bytes = bytes + new.size WHERE id = 1;
    UPDATE upload_totals SET stale = stale + (SELECT count(*) FROM uploads u
        WHERE u.file_id = new.id AND u.dest = upload_totals.dest
          AND u.state = upload_totals.state AND u.gen != new.gen)
    WHERE (dest, state) IN (SELECT dest, state FROM uploads WHERE file_id = new.id);
END;
CREATE TRIGGER files_totals_delete_rows BEFORE DELETE ON files BEGIN
    UPDATE upload_totals SET stale = stale - (SELECT count(*) FROM uploads u
        WHERE u.file_id = old.id AND u.dest = upload_totals.dest
          AND u.state = upload_totals.state AND u.gen != old.gen)
    WHERE (dest, state) IN (SELECT dest, state FROM uploads WHERE file_id = old.id);
END;
CREATE TRIGGER files_totals_delete AFTER DELETE ON files BEGIN
    UPDATE index_totals SET files = files - 1, bytes = bytes - old.size WHERE id = 1;
END;
CREATE TRIGGER files_totals_size AFTER UPDATE OF size ON files WHEN old.size != new.size BEGIN
    UPDATE index_totals SET bytes = bytes - old.size + new.size WHERE id = 1;
END;
CREATE TRIGGER files_totals_gen AFTER UPDATE OF id, gen ON files
WHEN old.id != new.id OR old.gen != new.gen BEGIN
    UPDATE upload_totals SET stale = stale - (SELECT count(*) FROM uploads u
        WHERE u.file_id = old.id AND u.dest = upload_totals.dest
          AND u.state = upload_totals.state AND u.gen != old.gen)
    WHERE (dest, state) IN (SELECT dest, state FROM uploads WHERE file_id = old.id);
    UPDATE upload_totals SET stale = stale + (SELECT count(*) FROM uploads u
        WHERE u.file_id = new.id AND u.dest = upload_totals.dest
          AND u.state = upload_totals.state AND u.gen != new.gen)
    WHERE (dest, state) IN (SELECT dest, state FROM uploads WHERE file_id = new.id);
END;

CREATE TRIGGER contents_totals_insert AFTER INSERT ON contents BEGIN
    UPDATE index_totals SET contents = contents + 1 WHERE id = 1;
END;
CREATE TRIGGER contents_totals_delete AFTER DELETE ON contents BEGIN
    UPDATE index_totals SET contents = contents - 1 WHERE id = 1;
END;

CREATE TRIGGER uploads_totals_insert AFTER INSERT ON uploads BEGIN
    INSERT INTO upload_totals (dest, state, rows, errors, stale)
    VALUES (new.dest, new.state, 1, new.last_error IS NOT NULL,
            coalesce(new.gen != (SELECT gen FROM files WHERE id = new.file_id), 0))
    ON CONFLICT (dest, state) DO UPDATE SET rows = rows + 1,
        errors = errors + excluded.errors, stale = stale + excluded.stale;
END;
CREATE TRIGGER uploads_totals_delete AFTER DELETE ON uploads BEGIN
    UPDATE upload_totals SET rows = rows - 1, errors = errors - (old.last_error IS NOT NULL),
        stale = stale - coalesce(old.gen != (SELECT gen FROM files WHERE id = old.file_id), 0)
    WHERE dest = old.dest AND state = old.state;
END;
CREATE TRIGGER uploads_totals_update AFTER UPDATE OF file_id, dest, state, gen, last_error
ON uploads
WHEN old.file_id != new.file_id OR old.dest != new.dest OR old.state != new.state
  OR old.gen != new.gen OR (old.last_error IS NULL) != (new.last_error IS NULL) BEGIN
    UPDATE upload_totals SET rows = rows - 1, errors = errors - (old.last_error IS NOT NULL),
        stale = stale - coalesce(old.gen != (SELECT gen FROM files WHERE id = old.file_id), 0)
    WHERE dest = old.dest AND state = old.state;
    INSERT INTO upload_totals (dest, state, rows, errors, stale)
    VALUES (new.dest, new.state, 1, new.last_error IS NOT NULL,
            coalesce(new.gen != (SELECT gen FROM files WHERE id = new.file_id), 0))
    ON CONFLICT (dest, state) DO UPDATE SET rows = rows + 1,
        errors = errors + excluded.errors, stale = stale + excluded.stale;
END;
"#,
    // 7: a run's manifest (megabytes for a large run) moves out of `runs` into its own
    // rowid table. In a `WITHOUT ROWID` table SQLite reads a row's whole record to compare
    // keys while seeking, so every lookup of a run read its manifest; and `status`, cleanup
    // and retention read every manifest for a few fields. Those fields (the CI context, the
    // first and last file times, the test summary) become columns, filled from the manifests
    // (left empty for one that is not JSON). New manifests are stored zstd-compressed (a
    // BLOB); older ones stay text.
    r#"
CREATE TABLE run_manifests (
    id       INTEGER PRIMARY KEY,
    watch    BLOB NOT NULL,
    name     TEXT NOT NULL,
    manifest NOT NULL,
    UNIQUE (watch, name)
);
INSERT INTO run_manifests (watch, name, manifest) SELECT watch, name, manifest FROM runs;
CREATE TABLE runs_new (
    watch    BLOB NOT NULL,
    name     TEXT NOT NULL,
    sealed_ms INTEGER NOT NULL,
    manifest_sha256 BLOB NOT NULL,
    files    INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    ci       TEXT,
    first_file_ms INTEGER,
    last_file_ms INTEGER,
    tests    TEXT,
    PRIMARY KEY (watch, name)
) WITHOUT ROWID;
INSERT INTO runs_new
    SELECT watch, name, sealed_ms, manifest_sha256, files, bytes,
        CASE WHEN json_valid(manifest) THEN json_extract(manifest, '$.ci') END,
        CASE WHEN json_valid(manifest) THEN json_extract(manifest, '$.first_file_ms') END,
        CASE WHEN json_valid(manifest) THEN json_extract(manifest, '$.last_file_ms') END,
        CASE WHEN json_valid(manifest) THEN json_extract(manifest, '$.tests') END
    FROM runs;
DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;
"#,
];

/// Every indexed file in a path range (the files of one run directory), with the
/// destinations holding its current generation.
const FILES_UNDER: &str = "SELECT f.path, f.size, f.mtime_ns, f.sha256,
        (SELECT group_concat(u.dest, char(10)) FROM uploads u
         WHERE u.file_id = f.id AND u.state = ?3 AND u.gen = f.gen)
     FROM files f WHERE f.path >= ?1 AND f.path < ?2";
/// The sealed runs of one watch.
const SEALED_RUNS: &str = "SELECT name, sealed_ms, manifest_sha256, files, bytes,
        ci, first_file_ms, last_file_ms, tests
     FROM runs WHERE watch = ?1";

/// When one run was sealed.
const SEALED_MS: &str = "SELECT sealed_ms FROM runs WHERE watch = ?1 AND name = ?2";

/// One run's manifest as recorded.
const RUN_MANIFEST: &str = "SELECT manifest FROM run_manifests WHERE watch = ?1 AND name = ?2";

/// Pending notifications due now and not leased, oldest due first (walks `notifications_due`).
const DUE_NOTIFICATIONS: &str =
    "SELECT id, notifier, idempotency_key, run, sealed_ms, manifest_key,
            payload, attempts, created_ms
     FROM notifications
     WHERE state = ?1 AND next_attempt_ms <= ?2 AND lease_until_ms <= ?2
     ORDER BY next_attempt_ms LIMIT ?3";
/// Take the lease of one notification: only a pending one that nobody else holds.
const LEASE_NOTIFICATION: &str = "UPDATE notifications SET lease_until_ms = ?3
     WHERE id = ?1 AND state = ?4 AND lease_until_ms <= ?2 AND next_attempt_ms <= ?2";
/// When the next pending notification can be sent: due and no longer leased.
const NEXT_NOTIFICATION: &str =
    "SELECT min(max(next_attempt_ms, lease_until_ms)) FROM notifications WHERE state = ?1";
/// The notifications of one seal of a run (for `runs`).
const NOTIFICATIONS_OF_RUN: &str = "SELECT notifier, state, attempts, last_error, done_ms
     FROM notifications WHERE watch = ?1 AND run = ?2 AND sealed_ms = ?3 ORDER BY id";

/// The next due jobs of a destination, oldest first (walks `uploads_queue`, never sorts).
const CLAIM: &str = "SELECT u.file_id, u.gen, f.path, u.key, u.sha256, f.size, f.mtime_ns, f.inode,
            u.attempts, u.queued_ms, f.dev
     FROM uploads u JOIN files f ON f.id = u.file_id
     WHERE u.dest = ?1 AND u.state = ?5 AND u.next_attempt_ms <= ?2 AND u.attempts < ?3
       AND u.gen = f.gen
     ORDER BY u.next_attempt_ms, u.queued_ms
     LIMIT ?4";
/// When a destination's next job that is not due yet becomes due (the worker's only timer).
const NEXT_DUE: &str = "SELECT next_attempt_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND next_attempt_ms > ?3
     ORDER BY next_attempt_ms LIMIT 1";
/// Some object holding given content, other than at a given key. Without INDEXED BY, SQLite
/// prefers the primary key's `dest` prefix (for the `key !=` term) and scans every object of
/// the destination.
const OBJECT_WITH: &str = "SELECT key, stored_key, sha256, size, stored_size, pipeline
    FROM objects INDEXED BY objects_by_sha
    WHERE dest = ?1 AND sha256 = ?2 AND pipeline = ?3 AND key != ?4 LIMIT 1";
/// Record that a destination holds an object (parameters: [`object_params`]).
const INSERT_OBJECT: &str = "INSERT OR REPLACE INTO objects
    (dest, key, stored_key, sha256, size, stored_size, pipeline, stored_ms)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

#[allow(clippy::type_complexity)]
fn object_params<'a>(
    dest: &'a str,
    o: &'a ObjectRow,
    now: i64,
) -> (&'a str, &'a str, &'a str, &'a [u8], i64, i64, &'a str, i64) {
    (
        dest,
        &o.key,
        &o.stored_key,
        &o.sha256[..],
        o.size as i64,
        o.stored_size as i64,
        &o.pipeline,
        now,
    )
}

/// Forget an object by its stored key.
const FORGET_STORED: &str = "DELETE FROM objects WHERE dest = ?1 AND stored_key = ?2";

/// Every object of a destination with how its upload got it there (for reports).
const OBJECTS_WITH_METHOD: &str =
    "SELECT o.key, o.stored_key, o.size, o.stored_size, o.stored_ms, u.method
     FROM objects o LEFT JOIN uploads u ON u.dest = o.dest AND u.key = o.key
     WHERE o.dest = ?1";
/// Queue-to-stored latencies of a destination's stored files, ascending.
const LATENCIES: &str = "SELECT done_ms - queued_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND done_ms IS NOT NULL ORDER BY 1";
/// When each file stored in a destination was stored, and how long it had waited (the
/// report's latency per day).
const LATENCIES_BY_TIME: &str = "SELECT done_ms, done_ms - queued_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND done_ms IS NOT NULL";
/// First and last upload of a destination and the bytes stored by uploads.
const UPLOAD_SPAN: &str = "SELECT min(u.done_ms), max(u.done_ms), coalesce(sum(o.stored_size), 0)
     FROM uploads u JOIN objects o ON o.dest = u.dest AND o.key = u.key
     WHERE u.dest = ?1 AND u.state = ?2 AND u.method = ?3";
/// The last errors of a destination's files not stored, with how many files have each.
const CURRENT_ERRORS: &str = "SELECT last_error, count(*) FROM uploads
     WHERE dest = ?1 AND last_error IS NOT NULL AND state != ?2 GROUP BY 1";

/// Whole-index totals (kept by the triggers of migration 6).
const INDEX_TOTALS: &str = "SELECT files, bytes, contents FROM index_totals WHERE id = 1";
/// A destination's upload rows per state (kept by the triggers of migration 6).
const UPLOAD_TOTALS: &str =
    "SELECT state, rows, errors, stale FROM upload_totals WHERE dest = ?1 AND rows > 0";
/// When a destination's oldest pending file was queued (reads the pending part of
/// `uploads_queue` only).
const OLDEST_PENDING: &str = "SELECT min(queued_ms) FROM uploads WHERE dest = ?1 AND state = ?2";
/// The latest error of a destination's files in one state (walks that state's part of
/// `uploads_queue` backwards, from the latest next attempt).
const LAST_ERROR: &str = "SELECT last_error, next_attempt_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND last_error IS NOT NULL
     ORDER BY next_attempt_ms DESC LIMIT 1";
/// Files not in every destination, by reading every file: what [`Index::awaiting_destinations`]
/// falls back to when two or more destinations lack rows (added to the config after the files
/// were indexed) or hold done rows of an older generation (left out of a re-index).
const AWAITING_SCAN: &str = "SELECT count(*) FROM files f
     WHERE (SELECT count(*) FROM uploads u
            WHERE u.file_id = f.id AND u.state = ?3 AND u.gen = f.gen
              AND u.dest IN (SELECT value FROM json_each(?1))) < ?2";
/// Of the files with a row not done (pending `?2` or failed `?5`) in the destinations `?1`,
/// those whose current generation is done (`?4`) in destination `?3`.
const AWAITING_ELSEWHERE: &str = "SELECT count(*) FROM (
         SELECT DISTINCT u.file_id FROM uploads u
         WHERE u.dest IN (SELECT value FROM json_each(?1)) AND u.state IN (?2, ?5)) b
     WHERE EXISTS (SELECT 1 FROM uploads a JOIN files f ON f.id = a.file_id
                   WHERE a.file_id = b.file_id AND a.dest = ?3 AND a.state = ?4
                     AND a.gen = f.gen)";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

/// A sealed run as the index records it; its manifest is apart (see
/// [`Index::run_manifest`]), the few fields read without it are columns.
#[derive(Debug, Clone, Default)]
pub struct SealedRun {
    /// The watch root the run lies in.
    pub watch: PathBuf,
    /// The run's name (its top-level directory).
    pub name: String,
    /// When it was sealed.
    pub sealed_ms: i64,
    /// SHA-256 of the manifest as written.
    pub manifest_sha256: Vec<u8>,
    /// Files in the manifest.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The manifest's CI context (its JSON), if any.
    pub ci: Option<String>,
    /// The manifest's earliest and latest file modification times (ms).
    pub first_file_ms: Option<i64>,
    /// See `first_file_ms`.
    pub last_file_ms: Option<i64>,
    /// The manifest's test summary (its JSON), if any.
    pub tests: Option<String>,
}

/// A manifest as the index keeps it: zstd at its fastest level (about 6x smaller for a
/// manifest's JSON, compressed at hundreds of MB/s), so recording a large run's seal writes
/// a few hundred kilobytes, not megabytes.
pub fn pack_manifest(text: &str) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(text.as_bytes(), 1)
}

/// A notification to queue with a seal.
#[derive(Debug, Clone)]
pub struct NewNotification {
    /// The `[[notify]]` entry's name.
    pub notifier: String,
    /// Unique key of this notification (sent as `Idempotency-Key`, and in the document).
    pub idempotency_key: String,
    /// The manifest's stored key (the `{manifest}` placeholder).
    pub manifest_key: String,
    /// The JSON document to send.
    pub payload: String,
    /// Held by the sealing process until this time (ms since the epoch): it tries first.
    pub lease_until_ms: i64,
}

/// A pending notification, as the sender reads it.
#[derive(Debug, Clone)]
pub struct PendingNotification {
    /// Row id.
    pub id: i64,
    /// The `[[notify]]` entry's name.
    pub notifier: String,
    /// Unique key of this notification.
    pub idempotency_key: String,
    /// The run's name.
    pub run: String,
    /// When the run was sealed.
    pub sealed_ms: i64,
    /// The manifest's stored key.
    pub manifest_key: String,
    /// The JSON document.
    pub payload: String,
    /// Failed attempts so far.
    pub attempts: i64,
    /// When it was queued (the seal was recorded).
    pub created_ms: i64,
}

/// How a notification attempt ended.
#[derive(Debug, Clone)]
pub enum NotifyOutcome {
    /// Delivered, after this many failed attempts by the same process (`seal` tries a few).
    Sent {
        /// Failed attempts before the delivery.
        failures: i64,
    },
    /// Failed; try again at `next_attempt_ms`, or give up.
    Failed {
        /// What went wrong (never a URL or a header value).
        error: String,
        /// Attempts this outcome stands for (`seal` reports a few at once).
        tries: i64,
        /// When to try again (ms since the epoch).
        next_attempt_ms: i64,
        /// No further attempts.
        give_up: bool,
    },
}

/// One notification of a run, for `runs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunNotification {
    /// The `[[notify]]` entry's name.
    pub name: String,
    /// Pending, sent or given up.
    pub state: NotifyState,
    /// Failed attempts.
    pub attempts: u64,
    /// The last error, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it was delivered (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<i64>,
}

/// Counts of notifications, for `status` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NotifyStatus {
    /// Not delivered yet.
    pub pending: u64,
    /// Pending ones whose last attempt failed.
    pub failing: u64,
    /// Delivered.
    pub sent: u64,
    /// No longer retried.
    pub given_up: u64,
    /// The most recent error of a notification not delivered.
    pub last_error: Option<String>,
}

/// A file stored in every destination asked for, as the index has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAs {
    /// Its content.
    pub sha256: [u8; 32],
    /// Per destination: the stored key and content of the object at the file's key, if the
    /// index has one (a seal checks that each holds `sha256`).
    pub held: Vec<Option<(String, [u8; 32])>>,
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

/// One queued upload, claimed by a destination worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// Row id of the file.
    pub file_id: i64,
    /// Generation this job uploads.
    pub generation: i64,
    /// Local path.
    pub path: PathBuf,
    /// Object key relative to the destination base.
    pub key: String,
    /// Expected content hash.
    pub sha256: [u8; 32],
    /// Expected identity on disk.
    pub stat: Stat,
    /// Attempts so far.
    pub attempts: i64,
    /// When the file was queued (ms since epoch).
    pub queued_ms: i64,
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
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    /// The content is now at the key.
    Stored {
        /// The job.
        job: Job,
        /// How it got there.
        method: Method,
        /// The object that now holds it.
        object: ObjectRow,
    },
    /// Failed; retried after a backoff.
    Failed {
        /// The job.
        job: Job,
        /// What went wrong, naming the key.
        error: String,
        /// Whether retrying soon can help.
        permanent: bool,
    },
    /// The file changed or vanished under us; re-indexing decides what comes next.
    Changed {
        /// The job.
        job: Job,
    },
}

impl Outcome {
    /// The job this outcome is about.
    pub fn job(&self) -> &Job {
        match self {
            Outcome::Stored { job, .. }
            | Outcome::Failed { job, .. }
            | Outcome::Changed { job } => job,
        }
    }
}

/// A claimed job with what the index knows about its destination's objects.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job.
    pub job: Job,
    /// The object at the job's key, if any (same content: nothing to send).
    pub here: Option<ObjectRow>,
    /// Some other object holding the same content under the same pipeline (a copy source).
    pub elsewhere: Option<ObjectRow>,
}

/// What [`Index::finish_and_claim`] did: the recording and the claim fail separately.
#[derive(Debug)]
pub struct FinishAndClaim {
    /// Whether the finished jobs were recorded.
    pub recorded: anyhow::Result<()>,
    /// The jobs claimed.
    pub claimed: anyhow::Result<Vec<Claimed>>,
    /// When the next pending job that is not due yet becomes due (ms since the epoch); jobs
    /// due already but not claimed are in flight or beyond the free slots, and a finishing
    /// task wakes the worker for them.
    pub next_due_ms: Option<i64>,
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
}

/// The files a destination received by upload (not copy or skip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadSpan {
    /// When the first was stored (ms since epoch), if any.
    pub first_ms: Option<i64>,
    /// When the last was stored.
    pub last_ms: Option<i64>,
    /// Bytes of their stored objects.
    pub stored_bytes: u64,
}

/// One error message and how many files it is the last error of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorCount {
    /// The error.
    pub error: String,
    /// Files.
    pub files: u64,
}

/// Per-destination queue counts.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DestStatus {
    /// Destination name.
    pub name: String,
    /// Files waiting (including those failing and being retried).
    pub pending: u64,
    /// Pending files whose last attempt failed.
    pub failing: u64,
    /// Files that can never be uploaded as they are (e.g. names that are not UTF-8).
    pub failed_permanently: u64,
    /// Files whose current version is in the destination.
    pub done: u64,
    /// Age of the oldest pending file, in seconds.
    pub oldest_pending_secs: Option<u64>,
    /// The most recent error.
    pub last_error: Option<String>,
}

/// Whole-index counts for `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    /// Indexed files.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Distinct contents.
    pub contents: u64,
    /// Per destination, in configured order.
    pub destinations: Vec<DestStatus>,
    /// Files not yet in every destination (local cleanup never deletes these).
    pub awaiting_all_destinations: u64,
}

/// The index database. One connection behind a mutex: SQLite serialises writers anyway, and
/// every batch is a single short transaction.
pub struct Index {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn bytes_path(b: Vec<u8>) -> PathBuf {
    PathBuf::from(std::ffi::OsString::from_vec(b))
}

/// A file's identity from the columns (size, mtime_ns, inode, dev) at these positions.
fn stat_at(r: &rusqlite::Row<'_>, [size, mtime, inode, dev]: [usize; 4]) -> rusqlite::Result<Stat> {
    Ok(Stat {
        size: r.get::<_, i64>(size)? as u64,
        mtime_ns: r.get(mtime)?,
        inode: r.get::<_, i64>(inode)? as u64,
        dev: r.get::<_, i64>(dev)? as u64,
        mode: 0,
    })
}

fn sha_from(v: Vec<u8>) -> [u8; 32] {
    let mut out = [0u8; 32];
    if v.len() == 32 {
        out.copy_from_slice(&v);
    }
    out
}

/// Create the state directory 0700 whatever the umask (the index names every artifact and
/// holds its hash); an existing one open to others loses those bits, with a warning.
pub fn create_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let existed = state_dir.is_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let mode = std::fs::metadata(state_dir)
        .with_context(|| format!("reading state directory {}", state_dir.display()))?
        .permissions()
        .mode();
    let wanted = if existed { mode & !0o007 } else { 0o700 };
    if mode & 0o7777 != wanted & 0o7777 {
        if existed {
            tracing::warn!(state_dir = %state_dir.display(), mode = format!("{:o}", mode & 0o7777), "state directory was open to others; removing their access");
        }
        let set =
            std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(wanted & 0o7777));
        match set {
            Ok(()) => {}
            // An existing directory on a read-only disk keeps its mode; the agent still runs.
            Err(e) if existed => {
                tracing::warn!(state_dir = %state_dir.display(), error = %e, "cannot change the state directory's mode")
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("setting the mode of {}", state_dir.display()));
            }
        }
    }
    Ok(())
}

/// Open (creating 0600 if needed) a file of the state directory; an existing one readable by
/// others is made 0600.
pub fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 || mode & 0o600 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Take group and other access from an existing state file (an index from before the
/// agent set modes); a read-only state disk only gets a warning.
fn make_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.permissions().mode() & 0o077 != 0
        && let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot make a state file private (0600)");
    }
}

impl Index {
    /// Open (creating if needed) the index in `state_dir` and bring its schema up to date.
    /// The state directory is 0700 and the index files 0600 whatever the umask (SQLite
    /// creates its WAL and shared-memory files with the database file's mode).
    pub fn open(state_dir: &Path) -> anyhow::Result<Index> {
        create_state_dir(state_dir)?;
        let path = state_dir.join("index.sqlite3");
        if !path.exists() {
            open_private(&path).with_context(|| format!("creating index {}", path.display()))?;
        }
        for name in ["index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"] {
            make_private(&state_dir.join(name));
        }
        let conn =
            Connection::open(&path).with_context(|| format!("opening index {}", path.display()))?;
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(Duration::from_secs(30))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            // The totals' triggers (migration 6) must see the rows a REPLACE deletes.
            conn.pragma_update(None, "recursive_triggers", "ON")?;
            Ok(())
        };
        let damaged = |path: &Path| {
            format!(
                "index {} cannot be used; if it is damaged, `panoptic-sync sync --rebuild-index` \
                 moves it aside and rebuilds it from the destinations",
                path.display()
            )
        };
        // Switching a fresh database to WAL needs an exclusive lock, and SQLite answers BUSY
        // at once (without its busy handler) while another process (a `sync` or `seal`
        // creating the same index) holds one: retry for as long as the busy timeout.
        let mut tries = 0;
        loop {
            match setup() {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && tries < 300 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                res => {
                    res.with_context(|| format!("configuring index {}", path.display()))
                        .with_context(|| damaged(&path))?;
                    break;
                }
            }
        }
        let index = Index {
            conn: Mutex::new(conn),
            path,
        };
        index.migrate().with_context(|| damaged(&index.path))?;
        Ok(index)
    }

    /// Where the database file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the index through a memory map from now on (up to 1 GiB): a command reading
    /// every row of a large tree (`flush`, `seal`) saves a copy per page. Not for the daemon:
    /// every mapped page it touched would count in its resident memory.
    pub fn map_for_reading(&self) -> anyhow::Result<()> {
        self.conn()
            .pragma_update(None, "mmap_size", 1i64 << 30)
            .context("mapping the index")
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self) -> anyhow::Result<()> {
        let mut conn = self.conn();
        // Take the write lock before reading the version: another process (a `status` next to
        // a starting daemon) may be migrating the same file at this moment.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .with_context(|| format!("locking {} for migration", self.path.display()))?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .with_context(|| format!("reading schema version of {}", self.path.display()))?;
        if version > MIGRATIONS.len() as i64 {
            anyhow::bail!(
                "index {} has schema version {version}, newer than this build knows ({}); \
                 upgrade panoptic-sync or move the index away",
                self.path.display(),
                MIGRATIONS.len()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.execute_batch(sql).with_context(|| {
                format!("migrating {} to version {}", self.path.display(), i + 1)
            })?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        tx.commit()?;
        Ok(())
    }

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

    /// Which of `paths` are indexed with exactly the given identity (unchanged files).
    pub fn unchanged(&self, items: &[(PathBuf, Stat)]) -> anyhow::Result<Vec<bool>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT size, mtime_ns, inode, dev FROM files WHERE path = ?1")?;
        let mut out = Vec::with_capacity(items.len());
        for (p, stat) in items {
            let known = stmt
                .query_row(params![path_bytes(p)], |r| stat_at(r, [0, 1, 2, 3]))
                .optional()?;
            out.push(known.is_some_and(|k| k.same_file(stat)));
        }
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
                                    sha_from(r.get(1)?),
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
                                let changed = old_sha != *sha256;
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
                                    Ok((r.get::<_, String>(0)?, sha_from(r.get(1)?)))
                                })
                                .optional()?;
                            // Same content at the same key: whatever state it is in still holds.
                            if !content_changed
                                && cur.as_ref() == Some(&(key_text.clone(), *sha256))
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

    /// Claim up to `limit` due jobs for `dest`, skipping file ids in `busy` and (for `sync`)
    /// jobs that already failed `max_attempts` times.
    pub fn claim(
        &self,
        dest: &str,
        limit: usize,
        busy: &HashSet<i64>,
        max_attempts: Option<i64>,
    ) -> anyhow::Result<Vec<Job>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(CLAIM)?;
        let rows = stmt.query_map(
            params![
                dest,
                now_ms(),
                max_attempts.unwrap_or(i64::MAX),
                (limit + busy.len()) as i64,
                UploadState::Pending
            ],
            |r| {
                Ok(Job {
                    file_id: r.get(0)?,
                    generation: r.get(1)?,
                    path: bytes_path(r.get(2)?),
                    key: r.get(3)?,
                    sha256: sha_from(r.get(4)?),
                    stat: stat_at(r, [5, 6, 7, 10])?,
                    attempts: r.get(8)?,
                    queued_ms: r.get(9)?,
                })
            },
        )?;
        let mut jobs = Vec::with_capacity(limit);
        for job in rows {
            let job = job?;
            if !busy.contains(&job.file_id) {
                jobs.push(job);
                if jobs.len() == limit {
                    break;
                }
            }
        }
        Ok(jobs)
    }

    /// For an upload worker, in one call: record how `finished` jobs ended, then claim up to
    /// `limit` due jobs (as [`Index::claim`]), each with the object at its key and some
    /// object elsewhere holding its content under `pipeline` (the skip and copy decisions).
    /// The recording's result comes back separately so a failure to record does not stop
    /// the claim.
    pub fn finish_and_claim(
        &self,
        dest: &str,
        finished: &[Outcome],
        limit: usize,
        busy: &HashSet<i64>,
        max_attempts: Option<i64>,
        pipeline: &str,
    ) -> FinishAndClaim {
        let recorded = if finished.is_empty() {
            Ok(())
        } else {
            self.finish(dest, finished)
        };
        let claimed = (|| {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let jobs = self.claim(dest, limit, busy, max_attempts)?;
            let mut out = Vec::with_capacity(jobs.len());
            for job in jobs {
                let here = self.object_at(dest, &job.key)?;
                let elsewhere = self.object_with(dest, &job.sha256, pipeline, &job.key)?;
                out.push(Claimed {
                    job,
                    here,
                    elsewhere,
                });
            }
            Ok(out)
        })();
        let next_due_ms = self.next_due(dest).unwrap_or_else(|e| {
            tracing::debug!(dest, error = %format!("{e:#}"), "cannot read when the next job is due");
            None
        });
        FinishAndClaim {
            recorded,
            claimed,
            next_due_ms,
        }
    }

    /// When `dest`'s next pending job that is not due yet becomes due (ms since the epoch).
    pub fn next_due(&self, dest: &str) -> anyhow::Result<Option<i64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(NEXT_DUE)?;
        Ok(stmt
            .query_row(params![dest, UploadState::Pending, now_ms()], |r| r.get(0))
            .optional()?)
    }

    /// The object known to be at logical `key` in `dest`.
    pub fn object_at(&self, dest: &str, key: &str) -> anyhow::Result<Option<ObjectRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key, stored_key, sha256, size, stored_size, pipeline FROM objects
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
            "SELECT o.key, o.stored_key, o.sha256, o.size, o.stored_size, o.pipeline
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
            let now = now_ms();
            for o in rows {
                insert.execute(object_params(dest, o, now))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget that `dest` holds logical `key` (it was found missing).
    pub fn forget_object(&self, dest: &str, key: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "DELETE FROM objects WHERE dest = ?1 AND key = ?2",
            params![dest, key],
        )?;
        Ok(())
    }

    /// Record how a batch of jobs for `dest` ended, in one transaction.
    pub fn finish(&self, dest: &str, outcomes: &[Outcome]) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        {
            // Each outcome is for the upload row of the job's file, generation, key and
            // content: a file id freed while its upload was in flight may have been given to a
            // new file since (SQLite reuses the largest row id), at the same generation.
            let mut done = tx.prepare_cached(
                "UPDATE uploads SET state = ?6, done_ms = ?4, method = ?5, last_error = NULL,
                 permanent = 0
                 WHERE file_id = ?1 AND dest = ?2 AND gen = ?3 AND key = ?7 AND sha256 = ?8",
            )?;
            let mut object = tx.prepare_cached(INSERT_OBJECT)?;
            let mut failed = tx.prepare_cached(
                "UPDATE uploads SET attempts = attempts + 1, next_attempt_ms = ?4,
                 last_error = ?5, permanent = ?6
                 WHERE file_id = ?1 AND dest = ?2 AND gen = ?3 AND key = ?7 AND sha256 = ?8",
            )?;
            let mut later = tx.prepare_cached(
                "UPDATE uploads SET next_attempt_ms = ?4
                 WHERE file_id = ?1 AND dest = ?2 AND gen = ?3 AND key = ?5 AND sha256 = ?6",
            )?;
            for o in outcomes {
                match o {
                    Outcome::Stored {
                        job,
                        method,
                        object: o,
                    } => {
                        done.execute(params![
                            job.file_id,
                            dest,
                            job.generation,
                            now,
                            method,
                            UploadState::Done,
                            job.key,
                            job.sha256
                        ])?;
                        object.execute(object_params(dest, o, now))?;
                    }
                    Outcome::Failed {
                        job,
                        error,
                        permanent,
                    } => {
                        let delay = backoff(job.attempts + 1, *permanent);
                        failed.execute(params![
                            job.file_id,
                            dest,
                            job.generation,
                            now + delay.as_millis() as i64,
                            error,
                            *permanent as i64,
                            job.key,
                            job.sha256
                        ])?;
                    }
                    Outcome::Changed { job } => {
                        // Re-indexing will bump the generation; until then, do not spin.
                        later.execute(params![
                            job.file_id,
                            dest,
                            job.generation,
                            now + 1000,
                            job.key,
                            job.sha256
                        ])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Counts for `status`, for the destinations named (in that order). Reads the totals
    /// the triggers keep, and of the uploads table only the rows not done: its cost follows
    /// the work left, not the files indexed.
    pub fn status(&self, dests: &[String]) -> anyhow::Result<Status> {
        self.status_at(dests, now_ms())
    }

    /// [`Index::status`] with the ages counted up to `now` (ms since the epoch).
    fn status_at(&self, dests: &[String], now: i64) -> anyhow::Result<Status> {
        let mut conn = self.conn();
        // One read transaction: the totals and the rows agree.
        let tx = conn.transaction()?;
        let (files, bytes, contents): (i64, i64, i64) = tx
            .prepare_cached(INDEX_TOTALS)?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut out = Vec::new();
        let mut totals = Vec::with_capacity(dests.len());
        for name in dests {
            let mut d = DestStatus {
                name: name.clone(),
                ..Default::default()
            };
            let t = dest_totals(&tx, name)?;
            // The latest error among the states holding any (only these are read).
            let mut last: Option<(i64, String)> = None;
            for s in &t {
                let n = s.rows as u64;
                match s.state {
                    UploadState::Pending => {
                        d.pending = n;
                        d.failing = s.errors as u64;
                        let oldest: i64 = tx
                            .prepare_cached(OLDEST_PENDING)?
                            .query_row(params![name, UploadState::Pending], |r| r.get(0))?;
                        d.oldest_pending_secs = Some(((now - oldest).max(0) / 1000) as u64);
                    }
                    UploadState::Done => d.done = n,
                    UploadState::Failed => d.failed_permanently = n,
                }
                if s.errors > 0 {
                    let row: Option<(String, i64)> = tx
                        .prepare_cached(LAST_ERROR)?
                        .query_row(params![name, s.state], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    if let Some((e, at)) = row
                        && last.as_ref().is_none_or(|(l, _)| at > *l)
                    {
                        last = Some((at, e));
                    }
                }
            }
            d.last_error = last.map(|(_, e)| e);
            out.push(d);
            totals.push(t);
        }
        let awaiting = awaiting_in(&tx, dests, files, &totals)?;
        tx.commit()?;
        Ok(Status {
            files: files as u64,
            bytes: bytes as u64,
            contents: contents as u64,
            destinations: out,
            awaiting_all_destinations: awaiting,
        })
    }

    /// Make every pending upload due now with a fresh attempt count (`sync` tries again).
    pub fn retry_now(&self) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE uploads SET attempts = 0, next_attempt_ms = 0 WHERE state = ?1",
            params![UploadState::Pending],
        )?;
        Ok(())
    }

    /// Pending uploads of `dest`, from the running totals (no row is read): what `sync`
    /// shows while it works; [`Index::pending_counts`] splits them when it is about to stop.
    pub fn pending_total(&self, dest: &str) -> anyhow::Result<u64> {
        let conn = self.conn();
        Ok(dest_totals(&conn, dest)?
            .iter()
            .filter(|t| t.state == UploadState::Pending)
            .map(|t| t.rows.max(0) as u64)
            .sum())
    }

    /// Pending uploads that can still be attempted (fewer than `max_attempts` tries), and
    /// pending ones that cannot, for `dest`.
    pub fn pending_counts(&self, dest: &str, max_attempts: i64) -> anyhow::Result<(u64, u64)> {
        let conn = self.conn();
        let (open, exhausted): (i64, i64) = conn.query_row(
            "SELECT coalesce(sum(attempts < ?2), 0), coalesce(sum(attempts >= ?2), 0)
             FROM uploads WHERE dest = ?1 AND state = ?3",
            params![dest, max_attempts, UploadState::Pending],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((open as u64, exhausted as u64))
    }

    /// For `flush`: whether the file at `path` with identity `stat` is indexed as such and
    /// stored in every destination in `dests`. `Err` text when it can never be (permanent).
    /// Many files in one read transaction (a seal or flush of a large tree: one lock round
    /// trip instead of one per file).
    pub fn is_stored_many(
        &self,
        items: &[(PathBuf, Stat)],
        dests: &[String],
    ) -> anyhow::Result<Vec<FlushState>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let out = {
            // Prepared once for the batch: a flush checks thousands of files per call.
            let mut file = tx.prepare(
                "SELECT id, size, mtime_ns, inode, gen, dev, sha256 FROM files WHERE path = ?1",
            )?;
            let mut upload = tx.prepare(
                "SELECT u.state, u.gen, u.last_error, o.stored_key, o.sha256
                 FROM uploads u LEFT JOIN objects o ON o.dest = u.dest AND o.key = u.key
                 WHERE u.file_id = ?1 AND u.dest = ?2",
            )?;
            items
                .iter()
                .map(|(path, stat)| is_stored_in(&mut file, &mut upload, path, stat, dests))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(out)
    }

    /// Record a sealed run (replacing an earlier seal of the same run) and queue its
    /// notifications, in one transaction: a seal is never recorded without them, nor they
    /// without it.
    /// `manifest` is the manifest as [`pack_manifest`] gives it.
    pub fn record_run(
        &self,
        run: &SealedRun,
        manifest: &[u8],
        notifications: &[NewNotification],
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO runs
             (watch, name, sealed_ms, manifest_sha256, files, bytes,
              ci, first_file_ms, last_file_ms, tests)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                path_bytes(&run.watch),
                run.name,
                run.sealed_ms,
                run.manifest_sha256,
                run.files as i64,
                run.bytes as i64,
                run.ci,
                run.first_file_ms,
                run.last_file_ms,
                run.tests
            ],
        )?;
        tx.execute(
            "INSERT INTO run_manifests (watch, name, manifest) VALUES (?1, ?2, ?3)
             ON CONFLICT (watch, name) DO UPDATE SET manifest = excluded.manifest",
            params![path_bytes(&run.watch), run.name, manifest],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO notifications
                 (notifier, idempotency_key, watch, run, sealed_ms, manifest_key, payload, state,
                  lease_until_ms, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let now = now_ms();
            for n in notifications {
                insert.execute(params![
                    n.notifier,
                    n.idempotency_key,
                    path_bytes(&run.watch),
                    run.name,
                    run.sealed_ms,
                    n.manifest_key,
                    n.payload,
                    NotifyState::Pending,
                    n.lease_until_ms,
                    now
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// How many runs are sealed, and when the latest was (ms since the epoch).
    pub fn run_totals(&self) -> anyhow::Result<(u64, Option<i64>)> {
        Ok(self
            .conn()
            .query_row("SELECT count(*), max(sealed_ms) FROM runs", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })?)
    }

    /// Forget a sealed run (retention deleted it).
    pub fn forget_run(&self, watch: &Path, name: &str) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["runs", "run_manifests"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE watch = ?1 AND name = ?2"),
                params![path_bytes(watch), name],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The notifications queued with a seal, by idempotency key (the sealing process sends
    /// these first).
    pub fn notifications_by_key(
        &self,
        keys: &[String],
    ) -> anyhow::Result<Vec<PendingNotification>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, notifier, idempotency_key, run, sealed_ms, manifest_key, payload,
                    attempts, created_ms
             FROM notifications WHERE idempotency_key = ?1 AND state = ?2",
        )?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(n) = stmt
                .query_row(params![k, NotifyState::Pending], pending_notification)
                .optional()?
            {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// Pending notifications due at `now` that no process holds, at most `limit`.
    pub fn due_notifications(
        &self,
        now: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<PendingNotification>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(DUE_NOTIFICATIONS)?;
        let rows = stmt.query_map(
            params![NotifyState::Pending, now, limit as i64],
            pending_notification,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Take the lease of notification `id` until `until` (ms since the epoch). False when it
    /// is no longer pending, not due, or another process holds it: the caller must not send
    /// it then.
    pub fn lease_notification(&self, id: i64, now: i64, until: i64) -> anyhow::Result<bool> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(LEASE_NOTIFICATION)?;
        Ok(stmt.execute(params![id, now, until, NotifyState::Pending])? == 1)
    }

    /// Record how an attempt at notification `id` ended and let go of its lease.
    pub fn finish_notification(&self, id: i64, outcome: &NotifyOutcome) -> anyhow::Result<()> {
        let conn = self.conn();
        match outcome {
            NotifyOutcome::Sent { failures } => {
                conn.prepare_cached(
                    "UPDATE notifications SET state = ?2, done_ms = ?3, lease_until_ms = 0,
                     attempts = attempts + ?4, last_error = NULL WHERE id = ?1",
                )?
                .execute(params![id, NotifyState::Sent, now_ms(), failures])?;
            }
            NotifyOutcome::Failed {
                error,
                tries,
                next_attempt_ms,
                give_up,
            } => {
                let state = if *give_up {
                    NotifyState::GivenUp
                } else {
                    NotifyState::Pending
                };
                conn.prepare_cached(
                    "UPDATE notifications SET state = ?2, attempts = attempts + ?5,
                     next_attempt_ms = ?3, lease_until_ms = 0, last_error = ?4 WHERE id = ?1",
                )?
                .execute(params![id, state, next_attempt_ms, error, tries])?;
            }
        }
        Ok(())
    }

    /// When the next pending notification may be sent (due and not leased), if any.
    pub fn next_notification_ms(&self) -> anyhow::Result<Option<i64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(NEXT_NOTIFICATION)?;
        Ok(stmt.query_row(params![NotifyState::Pending], |r| r.get(0))?)
    }

    /// The notifications of the seal of `run` (under `watch`) made at `sealed_ms`.
    pub fn run_notifications(
        &self,
        watch: &Path,
        run: &str,
        sealed_ms: i64,
    ) -> anyhow::Result<Vec<RunNotification>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(NOTIFICATIONS_OF_RUN)?;
        let rows = stmt.query_map(params![path_bytes(watch), run, sealed_ms], |r| {
            Ok(RunNotification {
                name: r.get(0)?,
                state: r.get(1)?,
                attempts: r.get::<_, i64>(2)? as u64,
                last_error: r.get(3)?,
                sent_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Counts of notifications by state, and the latest error of one not delivered.
    pub fn notify_status(&self) -> anyhow::Result<NotifyStatus> {
        let conn = self.conn();
        let mut out = NotifyStatus::default();
        let mut stmt = conn.prepare_cached(
            "SELECT state, count(*), sum(last_error IS NOT NULL) FROM notifications GROUP BY state",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let n = r.get::<_, i64>(1)? as u64;
            match r.get::<_, NotifyState>(0)? {
                NotifyState::Pending => {
                    out.pending = n;
                    out.failing = r.get::<_, i64>(2)? as u64;
                }
                NotifyState::Sent => out.sent = n,
                NotifyState::GivenUp => out.given_up = n,
            }
        }
        drop(rows);
        out.last_error = conn
            .query_row(
                "SELECT last_error FROM notifications
                 WHERE state != ?1 AND last_error IS NOT NULL
                 ORDER BY next_attempt_ms DESC LIMIT 1",
                params![NotifyState::Sent],
                |r| r.get(0),
            )
            .optional()?;
        Ok(out)
    }

    /// The sealed runs of the watch rooted at `watch`.
    pub fn sealed_runs(&self, watch: &Path) -> anyhow::Result<Vec<SealedRun>> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(SEALED_RUNS)?;
        let rows = s.query_map(params![path_bytes(watch)], |r| {
            Ok(SealedRun {
                watch: watch.to_path_buf(),
                name: r.get(0)?,
                sealed_ms: r.get(1)?,
                manifest_sha256: r.get(2)?,
                files: r.get::<_, i64>(3)? as u64,
                bytes: r.get::<_, i64>(4)? as u64,
                ci: r.get(5)?,
                first_file_ms: r.get(6)?,
                last_file_ms: r.get(7)?,
                tests: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The recorded manifest of run `name` of the watch rooted at `watch`, as JSON text.
    pub fn run_manifest(&self, watch: &Path, name: &str) -> anyhow::Result<Option<String>> {
        let stored = {
            let conn = self.conn();
            let mut s = conn.prepare_cached(RUN_MANIFEST)?;
            s.query_row(params![path_bytes(watch), name], |r| {
                Ok(match r.get_ref(0)? {
                    ValueRef::Blob(b) => Err(b.to_vec()),
                    v => Ok(v.as_str()?.to_string()),
                })
            })
            .optional()?
        };
        let what = || format!("the recorded manifest of run {name:?}");
        match stored {
            None => Ok(None),
            Some(Ok(text)) => Ok(Some(text)),
            Some(Err(packed)) => {
                let bytes = zstd::stream::decode_all(packed.as_slice()).with_context(what)?;
                Ok(Some(String::from_utf8(bytes).with_context(what)?))
            }
        }
    }

    /// When the run `name` of the watch rooted at `watch` was last sealed, if it was (one
    /// primary-key lookup).
    pub fn sealed_ms(&self, watch: &Path, name: &str) -> anyhow::Result<Option<i64>> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(SEALED_MS)?;
        Ok(s.query_row(params![path_bytes(watch), name], |r| r.get(0))
            .optional()?)
    }

    /// Every indexed file under the directory `dir`, with the destinations holding its
    /// current content (one range scan of the path index).
    pub fn files_under(&self, dir: &Path) -> anyhow::Result<Vec<FileUnder>> {
        // Paths under `dir/` sort between `dir/` and `dir0` ('0' follows '/').
        let mut lo = path_bytes(dir).to_vec();
        lo.push(b'/');
        let mut hi = lo.clone();
        if let Some(last) = hi.last_mut() {
            *last = b'0';
        }
        let conn = self.conn();
        let mut s = conn.prepare_cached(FILES_UNDER)?;
        let rows = s.query_map(params![lo, hi, UploadState::Done], |r| {
            Ok(FileUnder {
                path: bytes_path(r.get(0)?),
                size: r.get::<_, i64>(1)? as u64,
                mtime_ns: r.get(2)?,
                sha256: sha_from(r.get(3)?),
                held_by: r
                    .get::<_, Option<String>>(4)?
                    .map(|s| s.split('\n').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    /// After a failed write (disk full): move the write-ahead log into the database and
    /// truncate it, which gives its space back (the log otherwise keeps its size and is only
    /// checkpointed every 1,000 pages). Best effort.
    pub fn relieve(&self) {
        let conn = self.conn();
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::debug!(index = %self.path.display(), error = %e, "checkpoint failed");
        }
    }

    /// Whether the index takes writes now (a write transaction opened and rolled back).
    pub fn check_writable(&self) -> anyhow::Result<()> {
        let conn = self.conn();
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .with_context(|| format!("index {} is not writable", self.path.display()))
    }

    /// Files whose current content is stored in every one of `dests`, modified at or before
    /// `mtime_ns_max`, oldest first (candidates for local cleanup), after the file
    /// `after` (mtime, id) in that order, so a caller that skips some can page on.
    pub fn stored_everywhere(
        &self,
        dests: &[String],
        mtime_ns_max: i64,
        after: (i64, i64),
        limit: usize,
    ) -> anyhow::Result<Vec<StoredFile>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT f.id, f.path, f.size, f.mtime_ns, f.inode, f.dev FROM files f
             WHERE f.mtime_ns <= ?1 AND (f.mtime_ns, f.id) > (?6, ?7)
               AND (SELECT count(*) FROM uploads u
                    WHERE u.file_id = f.id AND u.state = ?5 AND u.gen = f.gen
                      AND u.dest IN (SELECT value FROM json_each(?2))) = ?3
             ORDER BY f.mtime_ns, f.id LIMIT ?4",
        )?;
        let names = serde_json::to_string(dests)?;
        let rows = stmt.query_map(
            params![
                mtime_ns_max,
                names,
                dests.len() as i64,
                limit as i64,
                UploadState::Done,
                after.0,
                after.1
            ],
            |r| {
                Ok(StoredFile {
                    id: r.get(0)?,
                    path: bytes_path(r.get(1)?),
                    stat: stat_at(r, [2, 3, 4, 5])?,
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many indexed files are not yet stored in every one of `dests` (see
    /// [`awaiting_in`] for what it reads).
    pub fn awaiting_destinations(&self, dests: &[String]) -> anyhow::Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let files: i64 = tx
            .prepare_cached(INDEX_TOTALS)?
            .query_row([], |r| r.get(0))?;
        let totals = dests
            .iter()
            .map(|d| dest_totals(&tx, d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let n = awaiting_in(&tx, dests, files, &totals)?;
        tx.commit()?;
        Ok(n)
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
            });
        }
        Ok(())
    }

    /// How long each file stored in `dest` waited from queued to stored, in ms, ascending.
    pub fn latencies_ms(&self, dest: &str) -> anyhow::Result<Vec<i64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(LATENCIES)?;
        let rows = stmt.query_map(params![dest, UploadState::Done], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// For each file stored in `dest`: when it was stored and how long it had waited, in ms
    /// (unordered).
    pub fn latencies_by_time(&self, dest: &str, mut f: impl FnMut(i64, i64)) -> anyhow::Result<()> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(LATENCIES_BY_TIME)?;
        let mut rows = stmt.query(params![dest, UploadState::Done])?;
        while let Some(r) = rows.next()? {
            f(r.get(0)?, r.get(1)?);
        }
        Ok(())
    }

    /// When the first and the last file sent to `dest` were stored, and the bytes sent.
    pub fn upload_span(&self, dest: &str) -> anyhow::Result<UploadSpan> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(UPLOAD_SPAN)?;
        Ok(
            stmt.query_row(params![dest, UploadState::Done, Method::Upload], |r| {
                Ok(UploadSpan {
                    first_ms: r.get(0)?,
                    last_ms: r.get(1)?,
                    stored_bytes: r.get::<_, i64>(2)? as u64,
                })
            })?,
        )
    }

    /// The last error of every file not stored in `dest`, each with its number of files.
    pub fn current_errors(&self, dest: &str) -> anyhow::Result<Vec<ErrorCount>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(CURRENT_ERRORS)?;
        let rows = stmt.query_map(params![dest, UploadState::Done], |r| {
            Ok(ErrorCount {
                error: r.get(0)?,
                files: r.get::<_, i64>(1)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Check the database file (`PRAGMA quick_check`).
    pub fn check(&self) -> anyhow::Result<()> {
        let r: String = self
            .conn()
            .query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        anyhow::ensure!(r == "ok", "index {} is damaged: {r}", self.path.display());
        Ok(())
    }
}

/// A destination's upload rows in one state, as `upload_totals` counts them.
#[derive(Debug, Clone, Copy)]
struct StateTotals {
    state: UploadState,
    /// Rows.
    rows: i64,
    /// Rows with a last error.
    errors: i64,
    /// Rows whose generation is not their file's current one.
    stale: i64,
}

/// The upload totals of `dest`, per state present (ordered by state).
fn dest_totals(conn: &Connection, dest: &str) -> anyhow::Result<Vec<StateTotals>> {
    let mut stmt = conn.prepare_cached(UPLOAD_TOTALS)?;
    let rows = stmt.query_map(params![dest], |r| {
        Ok(StateTotals {
            state: r.get(0)?,
            rows: r.get(1)?,
            errors: r.get(2)?,
            stale: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// How many of `files` indexed files are not stored (current generation, done) in every one of
/// `dests`, whose totals are `totals` (same order).
///
/// A destination is "complete" when every file has a row in it (its rows number the files: a
/// row's file always exists, the foreign key cascades) and none of its done rows is stale:
/// then the files it lacks are exactly those of its rows not done, which `uploads_queue`
/// lists. One destination, the anchor, may be incomplete: the files it lacks number the files
/// less its current done rows. So with at most one incomplete destination the answer is the
/// anchor's count plus the files of the other destinations' rows not done that the anchor
/// holds, which reads only rows not done. With two or more, every file is read
/// ([`AWAITING_SCAN`]); that needs two destinations added to the config after their files were
/// indexed (or left out of a re-index).
fn awaiting_in(
    conn: &Connection,
    dests: &[String],
    files: i64,
    totals: &[Vec<StateTotals>],
) -> anyhow::Result<u64> {
    let distinct: HashSet<&String> = dests.iter().collect();
    if dests.is_empty() {
        return Ok(0);
    }
    if distinct.len() < dests.len() {
        // A name twice can never be matched twice: every file counts as waiting.
        return Ok(files as u64);
    }
    let sum = |t: &[StateTotals], f: fn(&StateTotals) -> i64, done: bool| -> i64 {
        t.iter()
            .filter(|s| (s.state == UploadState::Done) == done)
            .map(f)
            .sum()
    };
    let not_done = |t: &[StateTotals]| sum(t, |s| s.rows, false);
    let complete = |t: &[StateTotals]| {
        t.iter().map(|s| s.rows).sum::<i64>() == files && sum(t, |s| s.stale, true) == 0
    };
    let incomplete: Vec<usize> = (0..dests.len())
        .filter(|&i| !complete(&totals[i]))
        .collect();
    let anchor = match incomplete[..] {
        [] => (0..dests.len())
            .max_by_key(|&i| not_done(&totals[i]))
            .unwrap_or(0),
        [i] => i,
        _ => {
            let n: i64 = conn.prepare_cached(AWAITING_SCAN)?.query_row(
                params![
                    serde_json::to_string(dests)?,
                    dests.len() as i64,
                    UploadState::Done
                ],
                |r| r.get(0),
            )?;
            return Ok(n as u64);
        }
    };
    let t = &totals[anchor];
    let current_done = sum(t, |s| s.rows, true) - sum(t, |s| s.stale, true);
    let mut n = files - current_done;
    let others: Vec<&String> = (0..dests.len())
        .filter(|&i| i != anchor && not_done(&totals[i]) > 0)
        .map(|i| &dests[i])
        .collect();
    if !others.is_empty() {
        let held: i64 = conn.prepare_cached(AWAITING_ELSEWHERE)?.query_row(
            params![
                serde_json::to_string(&others)?,
                UploadState::Pending,
                dests[anchor],
                UploadState::Done,
                UploadState::Failed
            ],
            |r| r.get(0),
        )?;
        n += held;
    }
    Ok(n as u64)
}

fn pending_notification(r: &rusqlite::Row<'_>) -> rusqlite::Result<PendingNotification> {
    Ok(PendingNotification {
        id: r.get(0)?,
        notifier: r.get(1)?,
        idempotency_key: r.get(2)?,
        run: r.get(3)?,
        sealed_ms: r.get(4)?,
        manifest_key: r.get(5)?,
        payload: r.get(6)?,
        attempts: r.get(7)?,
        created_ms: r.get(8)?,
    })
}

fn object_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ObjectRow> {
    Ok(ObjectRow {
        key: r.get(0)?,
        stored_key: r.get(1)?,
        sha256: sha_from(r.get(2)?),
        size: r.get::<_, i64>(3)? as u64,
        stored_size: r.get::<_, i64>(4)? as u64,
        pipeline: r.get(5)?,
    })
}

/// What `flush` knows about one file.
#[derive(Debug, PartialEq, Eq)]
pub enum FlushState {
    /// In every destination asked for.
    Stored(StoredAs),
    /// Not yet.
    Waiting,
    /// Never will be as it is, and why.
    Failed(String),
}

/// Whether `path`, with identity `stat`, is stored in every one of `dests` (see
/// [`Index::is_stored_many`], which prepares `file` and `upload`).
fn is_stored_in(
    file: &mut rusqlite::Statement<'_>,
    upload: &mut rusqlite::Statement<'_>,
    path: &Path,
    stat: &Stat,
    dests: &[String],
) -> anyhow::Result<FlushState> {
    let Some((id, known, generation, sha256)) = file
        .query_row(params![path_bytes(path)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                stat_at(r, [1, 2, 3, 5])?,
                r.get::<_, i64>(4)?,
                sha_from(r.get(6)?),
            ))
        })
        .optional()?
    else {
        return Ok(FlushState::Waiting);
    };
    if !known.same_file(stat) {
        return Ok(FlushState::Waiting);
    }
    let mut held = Vec::with_capacity(dests.len());
    for dest in dests {
        let row = upload
            .query_row(params![id, dest], |r| {
                let object = match r.get::<_, Option<String>>(3)? {
                    Some(k) => Some((k, sha_from(r.get(4)?))),
                    None => None,
                };
                Ok((
                    r.get::<_, UploadState>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    object,
                ))
            })
            .optional()?;
        match row {
            Some((UploadState::Done, g, _, object)) if g == generation => held.push(object),
            Some((UploadState::Failed, _, e, _)) => {
                return Ok(FlushState::Failed(e.unwrap_or_else(|| "failed".into())));
            }
            _ => return Ok(FlushState::Waiting),
        }
    }
    Ok(FlushState::Stored(StoredAs { sha256, held }))
}

/// Delay before retry number `attempt`: exponential from 1 s with ±25% jitter, capped at
/// 2 minutes (10 minutes for permanent errors, which are retried slowly, not dropped).
pub fn backoff(attempt: i64, permanent: bool) -> Duration {
    let cap = if permanent { 600_000.0 } else { 120_000.0 };
    let base = (1000.0 * 2f64.powi((attempt - 1).clamp(0, 20) as i32)).min(cap);
    let jitter = 0.75 + fastrand::f64() * 0.5;
    Duration::from_millis((base * jitter) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(path: &str, size: u64, sha: u8) -> Observation {
        Observation::Indexed {
            path: PathBuf::from(path),
            key: Ok(format!("k{path}")),
            stat: Stat {
                size,
                mtime_ns: 1,
                inode: 1,
                dev: 0,
                mode: 0,
            },
            sha256: [sha; 32],
        }
    }

    fn stored(job: &Job) -> Outcome {
        Outcome::Stored {
            job: job.clone(),
            method: Method::Upload,
            object: ObjectRow {
                key: job.key.clone(),
                stored_key: format!("{}.zst", job.key),
                sha256: job.sha256,
                size: job.stat.size,
                stored_size: 1,
                pipeline: "none".into(),
            },
        }
    }

    #[test]
    fn generations_and_last_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let dests = vec!["a".to_string()];
        assert_eq!(idx.apply(&[obs("/x", 1, 1)], &dests).unwrap(), 1);
        let jobs = idx.claim("a", 10, &HashSet::new(), None).unwrap();
        assert_eq!(jobs.len(), 1);
        // The file changes while the first version is in flight.
        idx.apply(&[obs("/x", 2, 2)], &dests).unwrap();
        idx.finish("a", &[stored(&jobs[0])]).unwrap();
        // The old generation's success does not mark the new one done.
        let jobs2 = idx.claim("a", 10, &HashSet::new(), None).unwrap();
        assert_eq!(jobs2.len(), 1);
        assert_eq!(jobs2[0].sha256, [2; 32]);
        // Re-indexing the same content does not re-queue once done.
        idx.finish("a", &[stored(&jobs2[0])]).unwrap();
        assert_eq!(idx.apply(&[obs("/x", 2, 2)], &dests).unwrap(), 0);
        assert!(
            idx.claim("a", 10, &HashSet::new(), None)
                .unwrap()
                .is_empty()
        );
        let o = idx
            .object_with("a", &[2; 32], "none", "other")
            .unwrap()
            .unwrap();
        assert_eq!(o.stored_key, "k/x.zst");
        assert!(
            idx.object_with("a", &[2; 32], "zstd3", "other")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_finished_job_never_marks_a_file_that_took_over_its_row_id_done() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let dests = vec!["a".to_string()];
        idx.apply(&[obs("/gone", 1, 1)], &dests).unwrap();
        let jobs = idx.claim("a", 10, &HashSet::new(), None).unwrap();
        // While its upload is in flight the file goes, and a new file is indexed: SQLite
        // gives it the freed row id (the largest), and its first generation.
        idx.apply(&[Observation::Gone(PathBuf::from("/gone"))], &dests)
            .unwrap();
        idx.apply(&[obs("/new", 2, 2)], &dests).unwrap();
        let new = idx.claim("a", 10, &HashSet::new(), None).unwrap();
        assert_eq!(
            (new[0].file_id, new[0].generation),
            (jobs[0].file_id, jobs[0].generation),
            "the set-up reuses the row id"
        );
        // The old job's outcomes land: none of them is the new file's.
        idx.finish("a", &[stored(&jobs[0])]).unwrap();
        let cleanup = idx
            .stored_everywhere(&dests, i64::MAX, (i64::MIN, i64::MIN), 10)
            .unwrap();
        assert!(cleanup.is_empty(), "{cleanup:?}");
        idx.finish("a", &[failed(&jobs[0], "late", true)]).unwrap();
        let again = idx.claim("a", 10, &HashSet::new(), None).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].sha256, again[0].attempts), ([2; 32], 0));
        // Its own outcome does.
        idx.finish("a", &[stored(&again[0])]).unwrap();
        let cleanup = idx
            .stored_everywhere(&dests, i64::MAX, (i64::MIN, i64::MIN), 10)
            .unwrap();
        assert_eq!(cleanup.len(), 1);
        assert_eq!(cleanup[0].path, PathBuf::from("/new"));
    }

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

    #[test]
    fn hot_queries_use_indexes() {
        // Regression: claiming sorted every pending row and `object_with` scanned every object
        // of the destination, so an initial upload of n files cost O(n²) in SQLite.
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let conn = idx.conn();
        for sql in [
            CLAIM,
            NEXT_DUE,
            OBJECT_WITH,
            FORGET_STORED,
            "SELECT key FROM objects WHERE dest = ?1 AND key = ?2",
            "SELECT size FROM files WHERE path = ?1",
            FILES_UNDER,
            SEALED_RUNS,
            SEALED_MS,
            RUN_MANIFEST,
            DUE_NOTIFICATIONS,
            LEASE_NOTIFICATION,
            NEXT_NOTIFICATION,
            NOTIFICATIONS_OF_RUN,
            INDEX_TOTALS,
            UPLOAD_TOTALS,
            OLDEST_PENDING,
            LAST_ERROR,
        ] {
            let plan = plan_of(&conn, sql);
            for step in &plan {
                assert!(
                    !step.starts_with("SCAN") && !step.contains("TEMP B-TREE"),
                    "{sql}\n  plan: {plan:?}"
                );
            }
            let searches: Vec<&String> = plan.iter().filter(|s| s.contains("SEARCH")).collect();
            assert!(!searches.is_empty(), "{sql}\n  plan: {plan:?}");
            if sql == OBJECT_WITH {
                assert!(plan[0].contains("sha256=?"), "{plan:?}");
            }
            if sql == NEXT_DUE {
                assert!(
                    plan.iter()
                        .any(|p| p.contains("uploads_queue") && p.contains("next_attempt_ms>?")),
                    "{plan:?}"
                );
            }
            if sql == DUE_NOTIFICATIONS || sql == NEXT_NOTIFICATION {
                assert!(
                    plan.iter()
                        .any(|p| p.contains("notifications_due") && p.contains("state=?")),
                    "{plan:?}"
                );
            }
            if sql == OLDEST_PENDING || sql == LAST_ERROR {
                // Only the rows of one state: never the destination's done ones.
                assert!(
                    plan.iter()
                        .any(|p| p.contains("uploads_queue") && p.contains("state=?")),
                    "{plan:?}"
                );
            }
            if sql == CLAIM {
                // The state is a bound parameter: the queue index must still take it.
                assert!(
                    plan.iter().any(|p| p.contains("uploads_queue")
                        && p.contains("state=?")
                        && p.contains("next_attempt_ms<?")),
                    "{plan:?}"
                );
            }
        }
    }

    #[test]
    fn awaiting_reads_only_rows_not_done() {
        // Regression (issue 16): the files not in every destination were counted by reading
        // every file. The fast path reads the rows not done (it may sort those).
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let conn = idx.conn();
        let plan = plan_of(&conn, AWAITING_ELSEWHERE);
        for step in &plan {
            assert!(
                !step.starts_with("SCAN u") && !step.starts_with("SCAN f"),
                "{plan:?}"
            );
        }
        assert!(
            plan.iter()
                .any(|p| p.contains("uploads_queue") && p.contains("state=?")),
            "{plan:?}"
        );
    }

    #[test]
    fn report_queries_search_by_destination() {
        // A report reads one destination at a time: it may sort what it reads, but must never
        // scan another destination's rows.
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let conn = idx.conn();
        for sql in [
            OBJECTS_WITH_METHOD,
            LATENCIES,
            LATENCIES_BY_TIME,
            UPLOAD_SPAN,
            CURRENT_ERRORS,
        ] {
            let plan = plan_of(&conn, sql);
            assert!(
                plan.iter().all(|s| !s.starts_with("SCAN")),
                "{sql}\n  plan: {plan:?}"
            );
            assert!(
                plan.iter()
                    .any(|s| s.starts_with("SEARCH") && s.contains("dest=?")),
                "{sql}\n  plan: {plan:?}"
            );
        }
    }

    fn plan_of(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let args: Vec<i64> = vec![0; stmt.parameter_count()];
        stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn concurrent_opens_migrate_once() {
        // Regression: two processes opening a new index at once both tried to migrate it.
        let dir = tempfile::tempdir().unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = dir.path().to_path_buf();
                std::thread::spawn(move || Index::open(&p).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }

    #[test]
    fn a_notification_is_queued_with_its_seal_and_leased_to_one_sender() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let run = SealedRun {
            watch: PathBuf::from("/w"),
            name: "r".into(),
            sealed_ms: 5,
            manifest_sha256: vec![0; 32],
            files: 1,
            bytes: 1,
            ..Default::default()
        };
        let now = now_ms();
        let new = |key: &str| NewNotification {
            notifier: "hook".into(),
            idempotency_key: key.into(),
            manifest_key: "m".into(),
            payload: "{}".into(),
            lease_until_ms: now + 60_000,
        };
        // A failing insert (a duplicate key) records neither the seal nor its notifications.
        assert!(
            idx.record_run(&run, b"{}", &[new("k1"), new("k1")])
                .is_err()
        );
        assert!(idx.sealed_runs(Path::new("/w")).unwrap().is_empty());
        assert_eq!(idx.notify_status().unwrap().pending, 0);

        idx.record_run(&run, b"{}", &[new("k1")]).unwrap();
        assert_eq!(idx.sealed_runs(Path::new("/w")).unwrap().len(), 1);
        let id = idx.notifications_by_key(&["k1".into()]).unwrap()[0].id;
        // Leased to the sealing process: nobody else sees it as due or can take it.
        assert!(idx.due_notifications(now, 10).unwrap().is_empty());
        assert!(!idx.lease_notification(id, now, now + 1000).unwrap());
        assert_eq!(idx.next_notification_ms().unwrap(), Some(now + 60_000));
        let failed = NotifyOutcome::Failed {
            error: "answered HTTP 500".into(),
            tries: 3,
            next_attempt_ms: now + 10,
            give_up: false,
        };
        idx.finish_notification(id, &failed).unwrap();
        assert!(idx.due_notifications(now, 10).unwrap().is_empty());
        let due = idx.due_notifications(now + 10, 10).unwrap();
        assert_eq!((due.len(), due[0].attempts), (1, 3));
        // Two senders race for it: one wins.
        assert!(idx.lease_notification(id, now + 10, now + 5000).unwrap());
        assert!(!idx.lease_notification(id, now + 20, now + 5000).unwrap());
        let s = idx.notify_status().unwrap();
        assert_eq!((s.pending, s.failing), (1, 1));
        assert_eq!(s.last_error.as_deref(), Some("answered HTTP 500"));
        idx.finish_notification(id, &NotifyOutcome::Sent { failures: 0 })
            .unwrap();
        assert!(
            !idx.lease_notification(id, now + 99_999, now + 100_000)
                .unwrap()
        );
        assert_eq!(idx.next_notification_ms().unwrap(), None);
        let s = idx.notify_status().unwrap();
        assert_eq!((s.pending, s.sent, s.last_error), (0, 1, None));
        let of_run = idx.run_notifications(Path::new("/w"), "r", 5).unwrap();
        assert_eq!(of_run[0].state, NotifyState::Sent);
    }

    /// `status` as it was computed before the totals: every query reads every file or every
    /// upload row of a destination. The oracle of `status_matches_full_scans`.
    fn status_by_full_scans(idx: &Index, dests: &[String], now: i64) -> Status {
        let conn = idx.conn();
        let (files, bytes): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM files",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let contents: i64 = conn
            .query_row("SELECT count(*) FROM contents", [], |r| r.get(0))
            .unwrap();
        let mut out = Vec::new();
        for name in dests {
            let mut d = DestStatus {
                name: name.clone(),
                ..Default::default()
            };
            let mut stmt = conn
                .prepare(
                    "SELECT state, count(*), sum(last_error IS NOT NULL), min(queued_ms)
                     FROM uploads WHERE dest = ?1 GROUP BY state",
                )
                .unwrap();
            let mut rows = stmt.query(params![name]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                let n = r.get::<_, i64>(1).unwrap() as u64;
                match r.get::<_, UploadState>(0).unwrap() {
                    UploadState::Pending => {
                        d.pending = n;
                        d.failing = r.get::<_, i64>(2).unwrap() as u64;
                        let oldest: i64 = r.get(3).unwrap();
                        d.oldest_pending_secs = Some(((now - oldest).max(0) / 1000) as u64);
                    }
                    UploadState::Done => d.done = n,
                    UploadState::Failed => d.failed_permanently = n,
                }
            }
            d.last_error = conn
                .query_row(
                    "SELECT last_error FROM uploads WHERE dest = ?1 AND last_error IS NOT NULL
                     ORDER BY next_attempt_ms DESC LIMIT 1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()
                .unwrap();
            out.push(d);
        }
        let awaiting: i64 = conn
            .query_row(
                AWAITING_SCAN,
                params![
                    serde_json::to_string(dests).unwrap(),
                    dests.len() as i64,
                    UploadState::Done
                ],
                |r| r.get(0),
            )
            .unwrap();
        Status {
            files: files as u64,
            bytes: bytes as u64,
            contents: contents as u64,
            destinations: out,
            awaiting_all_destinations: awaiting as u64,
        }
    }

    /// `index_totals` (files, bytes, contents) and `upload_totals` (dest, state, rows, errors,
    /// stale) as rows.
    type Totals = (Vec<i64>, Vec<(String, i64, i64, i64, i64)>);

    /// The totals tables as the migration's backfill computes them from the rows.
    fn totals_from_rows(idx: &Index) -> Totals {
        let conn = idx.conn();
        let index: Vec<i64> = conn
            .query_row(
                "SELECT (SELECT count(*) FROM files), (SELECT coalesce(sum(size), 0) FROM files),
                        (SELECT count(*) FROM contents)",
                [],
                |r| Ok(vec![r.get(0)?, r.get(1)?, r.get(2)?]),
            )
            .unwrap();
        let uploads = upload_rows(
            &conn,
            "SELECT u.dest, u.state, count(*), sum(u.last_error IS NOT NULL),
                    sum(coalesce(u.gen != f.gen, 0))
             FROM uploads u LEFT JOIN files f ON f.id = u.file_id
             GROUP BY u.dest, u.state ORDER BY 1, 2",
        );
        (index, uploads)
    }

    /// Rows of (destination, state, rows, errors, stale) from `sql`.
    fn upload_rows(conn: &Connection, sql: &str) -> Vec<(String, i64, i64, i64, i64)> {
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    /// The totals tables as the triggers left them (rows counting nothing left out).
    fn totals_kept(idx: &Index) -> Totals {
        let conn = idx.conn();
        let index: Vec<i64> = conn
            .query_row(INDEX_TOTALS, [], |r| {
                Ok(vec![r.get(0)?, r.get(1)?, r.get(2)?])
            })
            .unwrap();
        let uploads = upload_rows(
            &conn,
            "SELECT dest, state, rows, errors, stale FROM upload_totals
             WHERE rows != 0 OR errors != 0 OR stale != 0 ORDER BY 1, 2",
        );
        (index, uploads)
    }

    /// Status equals the full scans' for many destination lists, and the totals equal a
    /// recount from the rows.
    fn assert_status_exact(idx: &Index, step: &str) {
        assert_eq!(
            totals_kept(idx),
            totals_from_rows(idx),
            "totals after {step}"
        );
        // `sync`'s progress reads the pending count from the totals.
        for d in ["a", "b", "c"] {
            let (open, exhausted) = idx.pending_counts(d, 3).unwrap();
            assert_eq!(
                idx.pending_total(d).unwrap(),
                open + exhausted,
                "pending of {d} after {step}"
            );
        }
        let now = now_ms();
        let s = |v: &[&str]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        for dests in [
            s(&["a"]),
            s(&["b"]),
            s(&["c"]),
            s(&["a", "b"]),
            s(&["b", "a"]),
            s(&["a", "c"]),
            s(&["c", "b"]),
            s(&["a", "b", "c"]),
            s(&["a", "a"]),
            s(&[]),
        ] {
            let fast = serde_json::to_value(idx.status_at(&dests, now).unwrap()).unwrap();
            let full = serde_json::to_value(status_by_full_scans(idx, &dests, now)).unwrap();
            assert_eq!(fast, full, "status of {dests:?} after {step}");
            assert_eq!(
                idx.awaiting_destinations(&dests).unwrap(),
                full["awaiting_all_destinations"].as_u64().unwrap(),
                "awaiting {dests:?} after {step}"
            );
        }
    }

    fn failed(job: &Job, error: &str, permanent: bool) -> Outcome {
        Outcome::Failed {
            job: job.clone(),
            error: error.into(),
            permanent,
        }
    }

    fn claim_all(idx: &Index, dest: &str) -> Vec<Job> {
        idx.claim(dest, 100, &HashSet::new(), None).unwrap()
    }

    #[test]
    fn status_matches_full_scans() {
        // Regression (issue 16): status read every file and every upload row; it now reads
        // totals kept by triggers. It must give exactly what the full scans gave.
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let ab = vec!["a".to_string(), "b".to_string()];
        assert_status_exact(&idx, "nothing");
        // Six files, two of them with the same content, one whose name cannot be a key.
        let mut batch: Vec<Observation> = (1..=5)
            .map(|i| obs(&format!("/f{i}"), i, i as u8))
            .collect();
        batch.push(obs("/same", 1, 1));
        batch.push(Observation::Indexed {
            path: PathBuf::from("/bad"),
            key: Err("name is not UTF-8".into()),
            stat: Stat {
                size: 7,
                mtime_ns: 1,
                inode: 1,
                dev: 0,
                mode: 0,
            },
            sha256: [7; 32],
        });
        idx.apply(&batch, &ab).unwrap();
        assert_status_exact(&idx, "indexing");

        let jobs = claim_all(&idx, "a");
        assert_eq!(jobs.len(), 6);
        let by = |jobs: &[Job], p: &str| {
            jobs.iter()
                .find(|j| j.path == Path::new(p))
                .unwrap()
                .clone()
        };
        idx.finish(
            "a",
            &[
                stored(&by(&jobs, "/f1")),
                stored(&by(&jobs, "/f2")),
                stored(&by(&jobs, "/same")),
                failed(&by(&jobs, "/f3"), "timed out", false),
                failed(&by(&jobs, "/f4"), "access denied", true),
                Outcome::Changed {
                    job: by(&jobs, "/f5"),
                },
            ],
        )
        .unwrap();
        assert_status_exact(&idx, "a's first round");
        let jobs_b = claim_all(&idx, "b");
        idx.finish(
            "b",
            &jobs_b
                .iter()
                .filter(|j| j.path != Path::new("/f5"))
                .map(stored)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_status_exact(&idx, "b's first round");

        // A late failure of a generation already stored leaves a done row with an error.
        idx.finish("a", &[failed(&by(&jobs, "/f2"), "late", false)])
            .unwrap();
        assert_status_exact(&idx, "a late failure");
        // f3 is stored at its retry, clearing its error.
        idx.finish("a", &[stored(&by(&jobs, "/f3"))]).unwrap();
        assert_status_exact(&idx, "a retry");

        // Re-indexing: f1 changes (a new generation), f2 is seen again unchanged, /same
        // gets a new key with the same content, f4 shrinks.
        let mut moved = obs("/same", 1, 1);
        if let Observation::Indexed { key, .. } = &mut moved {
            *key = Ok("moved".into());
        }
        idx.apply(
            &[
                obs("/f1", 10, 11),
                obs("/f2", 2, 2),
                moved,
                obs("/f4", 1, 4),
            ],
            &ab,
        )
        .unwrap();
        assert_status_exact(&idx, "re-indexing");

        // Only "a" is configured while f2 changes: b's done row of f2 is of an older
        // generation now (stale), and "c" never had a row.
        idx.apply(&[obs("/f2", 3, 12)], &["a".to_string()]).unwrap();
        assert_status_exact(&idx, "a re-index for a alone");
        let jobs = claim_all(&idx, "a");
        idx.finish("a", &jobs.iter().map(stored).collect::<Vec<_>>())
            .unwrap();
        assert_status_exact(&idx, "a stores everything");
        let jobs = claim_all(&idx, "b");
        idx.finish("b", &jobs.iter().map(stored).collect::<Vec<_>>())
            .unwrap();
        assert_status_exact(&idx, "b stores what it can");

        // Local cleanup forgets a file stored everywhere (its upload rows cascade), a
        // deletion drops another, and a new file may take a freed id.
        let f3 = idx
            .stored_everywhere(&ab, i64::MAX, (i64::MIN, i64::MIN), 100)
            .unwrap()
            .into_iter()
            .find(|f| f.path == Path::new("/f3"))
            .unwrap();
        idx.forget_file(f3.id, &f3.path).unwrap();
        assert_status_exact(&idx, "forget_file");
        idx.apply(&[Observation::Gone(PathBuf::from("/same"))], &[])
            .unwrap();
        idx.apply(&[Observation::Gone(PathBuf::from("/bad"))], &[])
            .unwrap();
        assert_status_exact(&idx, "deletions");
        // A file with a stale row is deleted: the row leaves the stale count with it.
        idx.apply(&[obs("/f5", 5, 15)], &["a".to_string()]).unwrap();
        assert_status_exact(&idx, "f5 re-indexed for a alone");
        idx.apply(&[Observation::Gone(PathBuf::from("/f5"))], &[])
            .unwrap();
        assert_status_exact(&idx, "deleting a file with a stale row");
        idx.apply(&[obs("/new", 9, 9)], &ab).unwrap();
        idx.apply(&[obs("/new2", 9, 9)], &["b".to_string(), "c".to_string()])
            .unwrap();
        assert_status_exact(&idx, "new files");
        // f2 changes again with every destination: b's stale row is rewritten.
        idx.apply(&[obs("/f2", 4, 13)], &ab).unwrap();
        assert_status_exact(&idx, "f2 again");
        let jobs = claim_all(&idx, "b");
        idx.finish("b", &jobs.iter().map(stored).collect::<Vec<_>>())
            .unwrap();
        assert_status_exact(&idx, "b stores again");
        idx.retry_now().unwrap();
        assert_status_exact(&idx, "retry_now");

        // The migration's backfill gives the same totals from an index without them.
        let kept = totals_kept(&idx);
        {
            let conn = idx.conn();
            conn.execute_batch(
                "DROP TABLE index_totals; DROP TABLE upload_totals;
                 DROP TRIGGER files_totals_insert; DROP TRIGGER files_totals_delete_rows;
                 DROP TRIGGER files_totals_delete; DROP TRIGGER files_totals_size;
                 DROP TRIGGER files_totals_gen; DROP TRIGGER contents_totals_insert;
                 DROP TRIGGER contents_totals_delete; DROP TRIGGER uploads_totals_insert;
                 DROP TRIGGER uploads_totals_delete; DROP TRIGGER uploads_totals_update;
                 PRAGMA user_version = 5;",
            )
            .unwrap();
            runs_as_before_migration_7(&conn);
        }
        drop(idx);
        let idx = Index::open(dir.path()).unwrap();
        assert_eq!(totals_kept(&idx), kept);
        assert_status_exact(&idx, "migrating an index without totals");
    }

    /// Put the `runs` table back as migrations 4 to 6 left it.
    fn runs_as_before_migration_7(conn: &Connection) {
        conn.execute_batch("DROP TABLE run_manifests; DROP TABLE runs;")
            .unwrap();
        conn.execute_batch(MIGRATIONS[3]).unwrap();
    }

    #[test]
    fn migration_7_moves_manifests_out_and_keeps_their_fields() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = r#"{"format":1,"run":"r1","ci":{"provider":"github-actions","branch":"main"},
            "first_file_ms":10,"last_file_ms":4010,"tests":{"tests":3,"failed":1},"files":[]}"#;
        {
            let idx = Index::open(dir.path()).unwrap();
            let conn = idx.conn();
            runs_as_before_migration_7(&conn);
            conn.execute(
                "INSERT INTO runs VALUES (?1, 'r1', 5, x'00', 0, 0, ?2),
                                         (?1, 'broken', 6, x'00', 0, 0, 'not json')",
                params![path_bytes(Path::new("/w")), manifest],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 6).unwrap();
        }
        let idx = Index::open(dir.path()).unwrap();
        let mut runs = idx.sealed_runs(Path::new("/w")).unwrap();
        runs.sort_by(|a, b| a.name.cmp(&b.name));
        let (broken, r1) = (&runs[0], &runs[1]);
        assert_eq!((r1.name.as_str(), r1.sealed_ms), ("r1", 5));
        assert_eq!(
            r1.ci.as_deref(),
            Some(r#"{"provider":"github-actions","branch":"main"}"#)
        );
        assert_eq!((r1.first_file_ms, r1.last_file_ms), (Some(10), Some(4010)));
        assert_eq!(r1.tests.as_deref(), Some(r#"{"tests":3,"failed":1}"#));
        assert_eq!(
            idx.run_manifest(Path::new("/w"), "r1").unwrap().as_deref(),
            Some(manifest)
        );
        // A manifest that is not JSON moves as it is, with empty fields.
        assert_eq!((broken.ci.as_deref(), broken.first_file_ms), (None, None));
        assert_eq!(
            idx.run_manifest(Path::new("/w"), "broken")
                .unwrap()
                .as_deref(),
            Some("not json")
        );
        // A new seal's manifest is packed, and read back as it was.
        let big = format!(
            "{{\"files\":[{}]}}",
            "{\"path\":\"a\"},".repeat(1000) + "{}"
        );
        let packed = pack_manifest(&big).unwrap();
        assert!(
            packed.len() * 5 < big.len(),
            "{} of {}",
            packed.len(),
            big.len()
        );
        let run = SealedRun {
            watch: "/w".into(),
            name: "r1".into(),
            sealed_ms: 7,
            ..Default::default()
        };
        idx.record_run(&run, &packed, &[]).unwrap();
        assert_eq!(idx.run_manifest(Path::new("/w"), "r1").unwrap(), Some(big));
        assert_eq!(idx.sealed_ms(Path::new("/w"), "r1").unwrap(), Some(7));
        assert_eq!(idx.run_manifest(Path::new("/w"), "r2").unwrap(), None);
        idx.forget_run(Path::new("/w"), "r1").unwrap();
        assert_eq!(idx.run_manifest(Path::new("/w"), "r1").unwrap(), None);
        assert_eq!(idx.sealed_ms(Path::new("/w"), "r1").unwrap(), None);
    }

    #[test]
    fn replace_into_uploads_keeps_the_totals() {
        // The index's own connections turn recursive triggers on, so a REPLACE (which deletes
        // the row it replaces) is counted as a deletion too.
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        idx.apply(&[obs("/x", 1, 1)], &["a".to_string()]).unwrap();
        idx.conn()
            .execute(
                "INSERT OR REPLACE INTO uploads (file_id, dest, key, sha256, gen, state, queued_ms)
                 SELECT file_id, dest, key, sha256, gen, ?1, 0 FROM uploads",
                params![UploadState::Done],
            )
            .unwrap();
        assert_eq!(totals_kept(&idx), totals_from_rows(&idx));
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert!(backoff(1, false) <= Duration::from_millis(1250));
        assert!(backoff(30, false) <= Duration::from_secs(150));
        assert!(backoff(30, true) >= Duration::from_secs(450));
    }
}
