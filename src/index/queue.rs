//! The upload queue: one row per file and destination, claimed by that destination's worker
//! and finished with how its upload ended; and what the rows say is stored where.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::objects::{INSERT_OBJECT, UPSERT_BLOB, object_params, record_blob};
use super::{
    Index, Method, ObjectRow, Stat, StoredAs, StoredFile, UploadState, backoff, bytes_path, now_ms,
    path_bytes, sha_from, stat_at,
};

/// The next due jobs of a destination, oldest first (walks `uploads_queue`, never sorts).
pub(super) const CLAIM: &str =
    "SELECT u.file_id, u.gen, f.path, u.key, u.sha256, f.size, f.mtime_ns, f.inode,
            u.attempts, u.queued_ms, f.dev
     FROM uploads u JOIN files f ON f.id = u.file_id
     WHERE u.dest = ?1 AND u.state = ?5 AND u.next_attempt_ms <= ?2 AND u.attempts < ?3
       AND u.gen = f.gen
     ORDER BY u.next_attempt_ms, u.queued_ms
     LIMIT ?4";

/// When a destination's next job that is not due yet becomes due (the worker's only timer).
pub(super) const NEXT_DUE: &str = "SELECT next_attempt_ms FROM uploads
     WHERE dest = ?1 AND state = ?2 AND next_attempt_ms > ?3
     ORDER BY next_attempt_ms LIMIT 1";

/// Files not in every destination, by reading every file: what [`Index::awaiting_destinations`]
/// falls back to when two or more destinations lack rows (added to the config after the files
/// were indexed) or hold done rows of an older generation (left out of a re-index).
pub(super) const AWAITING_SCAN: &str = "SELECT count(*) FROM files f
     WHERE (SELECT count(*) FROM uploads u
            WHERE u.file_id = f.id AND u.state = ?3 AND u.gen = f.gen
              AND u.dest IN (SELECT value FROM json_each(?1))) < ?2";

/// Of the files with a row not done (pending `?2` or failed `?5`) in the destinations `?1`,
/// those whose current generation is done (`?4`) in destination `?3`.
pub(super) const AWAITING_ELSEWHERE: &str = "SELECT count(*) FROM (
         SELECT DISTINCT u.file_id FROM uploads u
         WHERE u.dest IN (SELECT value FROM json_each(?1)) AND u.state IN (?2, ?5)) b
     WHERE EXISTS (SELECT 1 FROM uploads a JOIN files f ON f.id = a.file_id
                   WHERE a.file_id = b.file_id AND a.dest = ?3 AND a.state = ?4
                     AND a.gen = f.gen)";

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

impl Index {
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
                    sha256: sha_from(r, 4)?,
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
            let mut blob = tx.prepare_cached(UPSERT_BLOB)?;
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
                        record_blob(&mut blob, dest, o, now)?;
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
pub(super) fn awaiting_in(
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
                sha_from(r, 6)?,
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
                    Some(k) => Some((k, sha_from(r, 4)?)),
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

/// A destination's upload rows in one state, as `upload_totals` counts them.
#[derive(Debug, Clone, Copy)]
pub(super) struct StateTotals {
    pub(super) state: UploadState,
    /// Rows.
    pub(super) rows: i64,
    /// Rows with a last error.
    pub(super) errors: i64,
    /// Rows whose generation is not their file's current one.
    pub(super) stale: i64,
}

/// The upload totals of `dest`, per state present (ordered by state).
pub(super) fn dest_totals(conn: &Connection, dest: &str) -> anyhow::Result<Vec<StateTotals>> {
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

/// Whole-index totals (kept by the triggers of migration 6).
pub(super) const INDEX_TOTALS: &str =
    "SELECT files, bytes, contents FROM index_totals WHERE id = 1";

/// A destination's upload rows per state (kept by the triggers of migration 6).
pub(super) const UPLOAD_TOTALS: &str =
    "SELECT state, rows, errors, stale FROM upload_totals WHERE dest = ?1 AND rows > 0";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Observation;
    use crate::index::testing::{failed, obs, stored};

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
}
