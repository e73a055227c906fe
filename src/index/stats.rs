//! Counts for `status`, metrics and reports: from the running totals the triggers keep, and
//! per destination from its upload rows (latencies, errors, bytes sent).

use rusqlite::{OptionalExtension, params};

use super::queue::{INDEX_TOTALS, awaiting_in, dest_totals};
use super::{Index, Method, UploadState, now_ms};

/// Queue-to-stored latencies of a destination's stored files, ascending.
pub(super) const LATENCIES: &str = "SELECT done_ms - queued_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND done_ms IS NOT NULL ORDER BY 1";

/// When each file stored in a destination was stored, and how long it had waited (the
/// report's latency per day).
pub(super) const LATENCIES_BY_TIME: &str = "SELECT done_ms, done_ms - queued_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND done_ms IS NOT NULL";

/// First and last upload of a destination and the bytes stored by uploads.
pub(super) const UPLOAD_SPAN: &str =
    "SELECT min(u.done_ms), max(u.done_ms), coalesce(sum(o.stored_size), 0)
     FROM uploads u JOIN objects o ON o.dest = u.dest AND o.key = u.key
     WHERE u.dest = ?1 AND u.state = ?2 AND u.method = ?3";

/// The last errors of a destination's files not stored, with how many files have each.
pub(super) const CURRENT_ERRORS: &str = "SELECT last_error, count(*) FROM uploads
     WHERE dest = ?1 AND last_error IS NOT NULL AND state != ?2 GROUP BY 1";

/// When a destination's oldest pending file was queued (reads the pending part of
/// `uploads_queue` only).
pub(super) const OLDEST_PENDING: &str =
    "SELECT min(queued_ms) FROM uploads WHERE dest = ?1 AND state = ?2";

/// The latest error of a destination's files in one state (walks that state's part of
/// `uploads_queue` backwards, from the latest next attempt).
pub(super) const LAST_ERROR: &str = "SELECT last_error, next_attempt_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND last_error IS NOT NULL
     ORDER BY next_attempt_ms DESC LIMIT 1";

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

impl Index {
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
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::index::queue::AWAITING_SCAN;
    use crate::index::schema::runs_as_before_migration_7;
    use crate::index::testing::{failed, obs, stored};
    use crate::index::{Job, Observation, Outcome, Stat};

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
    fn upload_rows(conn: &rusqlite::Connection, sql: &str) -> Vec<(String, i64, i64, i64, i64)> {
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
}
