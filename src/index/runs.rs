//! Sealed runs: one row per seal with the few manifest fields read without the manifest, and
//! the manifest itself apart (zstd-packed).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::types::ValueRef;
use rusqlite::{OptionalExtension, params};

use crate::format::ci::Ci;
use crate::format::results::TestSummary;

use super::{Index, NewNotification, NotifyState, now_ms, path_bytes};

/// The pruned runs of one watch.
pub(super) const PRUNED_RUNS: &str = "SELECT name, pruned_ms FROM pruned_runs WHERE watch = ?1";

/// A column of a run's row decoded once, here: one that does not decode (a damaged row) is
/// named in the log and read as absent, so one run's damage never hides the others.
fn decoded<T: serde::de::DeserializeOwned>(
    run: &str,
    column: &str,
    json: Option<String>,
) -> Option<T> {
    let json = json?;
    match serde_json::from_str(&json) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(run, column, error = %e, "a sealed run's recorded field does not decode; read as absent");
            None
        }
    }
}

/// The sealed runs of one watch.
/// The names of one watch's sealed runs (nothing decoded).
pub(super) const SEALED_NAMES: &str = "SELECT name FROM runs WHERE watch = ?1";

/// The names of one watch's finished runs: sealed, or pruned after their seal (a name in
/// both comes twice; the set takes it once).
pub(super) const FINISHED_NAMES: &str = "SELECT name FROM runs WHERE watch = ?1 UNION ALL SELECT name FROM pruned_runs WHERE watch = ?1";

pub(super) const SEALED_RUNS: &str = "SELECT name, sealed_ms, manifest_sha256, files, bytes,
        ci, first_file_ms, last_file_ms, tests
     FROM runs WHERE watch = ?1";

/// When one run was sealed.
pub(super) const SEALED_MS: &str = "SELECT sealed_ms FROM runs WHERE watch = ?1 AND name = ?2";

/// One run's manifest as recorded.
pub(super) const RUN_MANIFEST: &str =
    "SELECT manifest FROM run_manifests WHERE watch = ?1 AND name = ?2";

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
    /// The manifest's CI context, if any.
    pub(crate) ci: Option<Ci>,
    /// The manifest's earliest and latest file modification times (ms).
    pub first_file_ms: Option<i64>,
    /// See `first_file_ms`.
    pub last_file_ms: Option<i64>,
    /// The manifest's test summary, if any.
    pub(crate) tests: Option<TestSummary>,
}

/// A manifest as the index keeps it: zstd at its fastest level (about 6x smaller for a
/// manifest's JSON, compressed at hundreds of MB/s), so recording a large run's seal writes
/// a few hundred kilobytes, not megabytes.
pub fn pack_manifest(text: &str) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(text.as_bytes(), 1)
}

impl Index {
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
                run.ci.as_ref().map(serde_json::to_string).transpose()?,
                run.first_file_ms,
                run.last_file_ms,
                run.tests.as_ref().map(serde_json::to_string).transpose()?
            ],
        )?;
        tx.execute(
            "INSERT INTO run_manifests (watch, name, manifest) VALUES (?1, ?2, ?3)
             ON CONFLICT (watch, name) DO UPDATE SET manifest = excluded.manifest",
            params![path_bytes(&run.watch), run.name, manifest],
        )?;
        tx.execute(
            "DELETE FROM pruned_runs WHERE watch = ?1 AND name = ?2",
            params![path_bytes(&run.watch), run.name],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO notifications
                 (notifier, idempotency_key, watch, run, sealed_ms, manifest_key, payload, state,
                  lease_until_ms, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            // An announcement whose id is queued already (a change of a test's state found
            // again by a later seal) is not queued twice.
            let mut insert_once = tx.prepare_cached(
                "INSERT OR IGNORE INTO notifications
                 (notifier, idempotency_key, watch, run, sealed_ms, manifest_key, payload, state,
                  lease_until_ms, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            let now = now_ms();
            for n in notifications {
                let insert = if n.once {
                    &mut insert_once
                } else {
                    &mut insert
                };
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

    /// Record that retention deleted the objects of the run sealed at `sealed_ms`: its seal
    /// is forgotten and the run reads as pruned (`pruned_ms`) from now on.
    pub fn record_pruned(
        &self,
        watch: &Path,
        name: &str,
        sealed_ms: i64,
        pruned_ms: i64,
    ) -> anyhow::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in ["runs", "run_manifests"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE watch = ?1 AND name = ?2"),
                params![path_bytes(watch), name],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO pruned_runs (watch, name, sealed_ms, pruned_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![path_bytes(watch), name, sealed_ms, pruned_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The names of the sealed runs of the watch rooted at `watch`: what cleanup and the
    /// open-run count need, every few seconds, without decoding each run's fields.
    pub fn sealed_names(&self, watch: &Path) -> anyhow::Result<HashSet<String>> {
        self.names(SEALED_NAMES, watch)
    }

    /// The names of the runs of the watch rooted at `watch` that are finished: sealed, or
    /// pruned by retention after their seal (neither is open).
    pub fn finished_names(&self, watch: &Path) -> anyhow::Result<HashSet<String>> {
        self.names(FINISHED_NAMES, watch)
    }

    fn names(&self, sql: &str, watch: &Path) -> anyhow::Result<HashSet<String>> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(sql)?;
        let rows = s.query_map(params![path_bytes(watch)], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The runs of the watch rooted at `watch` that retention pruned: name and when.
    pub fn pruned_runs(&self, watch: &Path) -> anyhow::Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(PRUNED_RUNS)?;
        let rows = s.query_map(params![path_bytes(watch)], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The sealed runs of the watch rooted at `watch`.
    pub fn sealed_runs(&self, watch: &Path) -> anyhow::Result<Vec<SealedRun>> {
        let conn = self.conn();
        let mut s = conn.prepare_cached(SEALED_RUNS)?;
        let rows = s.query_map(params![path_bytes(watch)], |r| {
            let name: String = r.get(0)?;
            let ci = decoded(&name, "ci", r.get::<_, Option<String>>(5)?);
            let tests = decoded(&name, "tests", r.get::<_, Option<String>>(8)?);
            Ok(SealedRun {
                watch: watch.to_path_buf(),
                name,
                sealed_ms: r.get(1)?,
                manifest_sha256: r.get(2)?,
                files: r.get::<_, i64>(3)? as u64,
                bytes: r.get::<_, i64>(4)? as u64,
                ci,
                first_file_ms: r.get(6)?,
                last_file_ms: r.get(7)?,
                tests,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pruned_run_is_remembered_until_sealed_again() {
        let dir = tempfile::tempdir().unwrap();
        let idx = Index::open(dir.path()).unwrap();
        let w = Path::new("/w");
        let run = SealedRun {
            watch: w.into(),
            name: "r1".into(),
            sealed_ms: 10,
            manifest_sha256: vec![0; 32],
            files: 1,
            bytes: 1,
            ci: None,
            first_file_ms: None,
            last_file_ms: None,
            tests: None,
        };
        idx.record_run(&run, &pack_manifest("{}").unwrap(), &[])
            .unwrap();
        idx.record_pruned(w, "r1", 10, 99).unwrap();
        assert!(
            idx.sealed_runs(w).unwrap().is_empty(),
            "the seal is forgotten"
        );
        assert_eq!(idx.run_manifest(w, "r1").unwrap(), None);
        assert_eq!(idx.pruned_runs(w).unwrap(), vec![("r1".to_string(), 99)]);
        assert!(idx.pruned_runs(Path::new("/v")).unwrap().is_empty());
        idx.record_run(&run, &pack_manifest("{}").unwrap(), &[])
            .unwrap();
        assert!(idx.pruned_runs(w).unwrap().is_empty(), "sealed again");
    }
}
