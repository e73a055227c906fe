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
//!
//! By concern: `schema` (migrations), `files` (the files table, as ingest records it),
//! `queue` (upload rows: claimed, finished, stored where), `objects` (what destinations
//! hold), `runs` (sealed runs), `notifications` (their queue), `stats` (status, reports),
//! `tails` (how far each growing file's segments are durable).

mod files;
mod notifications;
mod objects;
mod queue;
mod runs;
mod schema;
mod stats;
mod tails;

pub use files::{FileUnder, Observation, Stat, StoredFile};
pub use notifications::{
    NewNotification, NotifyOutcome, NotifyState, NotifyStatus, PendingNotification, RunNotification,
};
pub use objects::{BlobRef, BlobTotals, Method, ObjectRow, ObjectUse, StorageTotals, StoredAs};
pub use queue::{Claimed, FinishAndClaim, FlushState, Job, Outcome};
pub use runs::{SealedRun, pack_manifest};
pub use stats::{DestStatus, ErrorCount, Status, UploadSpan};
pub use tails::{StoredVersion, TailRow};

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rusqlite::Connection;
use rusqlite::types::{FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};

pub use crate::format::units::{backoff, now_ms};

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

impl rusqlite::ToSql for UploadState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(*self as i64))
    }
}

impl rusqlite::types::FromSql for UploadState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_i64()? {
            0 => Ok(UploadState::Pending),
            1 => Ok(UploadState::Done),
            2 => Ok(UploadState::Failed),
            n => Err(FromSqlError::OutOfRange(n)),
        }
    }
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

/// The SHA-256 in column `col`. A blob of another length is an error naming the column and
/// the length found: a hash is never made up (a zero-filled one would compare as content).
fn sha_from(r: &rusqlite::Row<'_>, col: usize) -> rusqlite::Result<[u8; 32]> {
    let v: Vec<u8> = r.get(col)?;
    <[u8; 32]>::try_from(v.as_slice()).map_err(|_| {
        let name = r.as_ref().column_name(col).unwrap_or("?");
        rusqlite::Error::FromSqlConversionFailure(
            col,
            rusqlite::types::Type::Blob,
            format!("column {name} holds a SHA-256 of {} bytes, not 32", v.len()).into(),
        )
    })
}

/// Like [`sha_from`], but a hash of the wrong length (a damaged row) reads as `None`, logged:
/// where a differing hash heals the row (ingest rewrites it and queues the file again).
fn sha_or_damaged(r: &rusqlite::Row<'_>, col: usize) -> rusqlite::Result<Option<[u8; 32]>> {
    match sha_from(r, col) {
        Ok(h) => Ok(Some(h)),
        Err(rusqlite::Error::FromSqlConversionFailure(_, _, e)) => {
            tracing::warn!(error = %e, "damaged hash in the index; the file is indexed again");
            Ok(None)
        }
        Err(e) => Err(e),
    }
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

    /// Open the index at `state_dir` on a blocking thread and run `f` on it there: the
    /// commands that read the index once.
    pub async fn open_and<T: Send + 'static>(
        state_dir: &Path,
        f: impl FnOnce(&Index) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let state_dir = state_dir.to_path_buf();
        tokio::task::spawn_blocking(move || f(&Index::open(&state_dir)?))
            .await
            .context("an index task panicked")?
    }

    /// Run `f` on this index on a blocking thread (SQLite calls block): the async handle that
    /// replaces a clone and a `spawn_blocking` at every call.
    pub async fn call<T: Send + 'static>(
        self: &Arc<Index>,
        f: impl FnOnce(&Index) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let index = self.clone();
        tokio::task::spawn_blocking(move || f(&index))
            .await
            .context("an index task panicked")?
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

    /// Check the database file (`PRAGMA quick_check`).
    pub fn check(&self) -> anyhow::Result<()> {
        let r: String = self
            .conn()
            .query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        anyhow::ensure!(r == "ok", "index {} is damaged: {r}", self.path.display());
        Ok(())
    }
}

#[cfg(test)]
mod testing {
    //! Helpers shared by the tests of several files of the index.

    use super::*;

    pub(super) fn obs(path: &str, size: u64, sha: u8) -> Observation {
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

    pub(super) fn stored(job: &Job) -> Outcome {
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
                blob: None,
            },
        }
    }

    pub(super) fn failed(job: &Job, error: &str, permanent: bool) -> Outcome {
        Outcome::Failed {
            job: job.clone(),
            error: error.into(),
            permanent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::files::{ANY_FILE_UNDER, FILES_UNDER};
    use super::notifications::{
        DUE_NOTIFICATIONS, LEASE_NOTIFICATION, NEXT_NOTIFICATION, NOTIFICATIONS_OF_RUN,
    };
    use super::objects::{FORGET_STORED, HELD_TOTALS, OBJECT_WITH, OBJECTS_WITH_METHOD};
    use super::queue::{AWAITING_ELSEWHERE, CLAIM, NEXT_DUE};
    use super::queue::{INDEX_TOTALS, UPLOAD_TOTALS};
    use super::runs::{
        FINISHED_NAMES, PRUNED_RUNS, RUN_MANIFEST, SEALED_MS, SEALED_NAMES, SEALED_RUNS,
    };
    use super::stats::{
        CURRENT_ERRORS, LAST_ERROR, LATENCIES, LATENCIES_BY_TIME, OLDEST_PENDING, UPLOAD_SPAN,
    };
    use super::testing::obs;
    use super::*;

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
            HELD_TOTALS,
            objects::BLOB_KNOWN,
            objects::BLOB_TOTALS,
            "SELECT key FROM objects WHERE dest = ?1 AND key = ?2",
            "SELECT size FROM files WHERE path = ?1",
            FILES_UNDER,
            ANY_FILE_UNDER,
            SEALED_RUNS,
            SEALED_NAMES,
            FINISHED_NAMES,
            PRUNED_RUNS,
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
            objects::STORAGE_TOTALS,
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
    fn a_hash_of_the_wrong_length_is_an_error_not_zeros() {
        // Regression: a SHA-256 column of another length read as 32 zero bytes.
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let dests = vec!["a".to_string()];
        idx.apply(&[obs("/w/x", 1, 1)], &dests).unwrap();
        idx.conn()
            .execute("UPDATE files SET sha256 = x'0102'", [])
            .unwrap();
        let e = format!("{:#}", idx.files_under(Path::new("/w")).unwrap_err());
        assert!(
            e.contains("column sha256 holds a SHA-256 of 2 bytes"),
            "{e}"
        );
        // Ingest heals it: a damaged hash reads as different content, so the row is rewritten
        // with the real hash and the file queued again.
        idx.apply(&[obs("/w/x", 1, 1)], &dests).unwrap();
        let files = idx.files_under(Path::new("/w")).unwrap();
        assert_eq!(files.len(), 1);
        let gen_after: i64 = idx
            .conn()
            .query_row("SELECT gen FROM files", [], |r| r.get(0))
            .unwrap();
        assert_eq!(gen_after, 2, "the healed row is a new generation");
        // The upload row's own hash, read by the claim.
        idx.conn()
            .execute("UPDATE uploads SET sha256 = x'01'", [])
            .unwrap();
        let e = idx.claim("a", 10, &Default::default(), None).unwrap_err();
        assert!(format!("{e:#}").contains("of 1 bytes, not 32"), "{e:#}");
    }
}
