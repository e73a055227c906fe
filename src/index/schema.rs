//! The schema of the index: its migrations, applied in order when the index is opened
//! (`PRAGMA user_version` counts those applied).

use anyhow::Context;

use super::Index;

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
    // 8: runs pruned by retention are remembered, so a run directory still on disk reads as
    // pruned (not open, not sealable) instead of as a run never sealed.
    r#"
CREATE TABLE IF NOT EXISTS pruned_runs (
    watch    BLOB NOT NULL,
    name     TEXT NOT NULL,
    sealed_ms INTEGER NOT NULL,
    pruned_ms INTEGER NOT NULL,
    PRIMARY KEY (watch, name)
) WITHOUT ROWID;
"#,
    // 9: growing files sent in segments (`tail`): per file, destination and generation, how
    // far its segments are durable, and what identifies the content they hold (inode, device,
    // a hash of its first bytes), so a restart continues where the segments end and a file
    // truncated or replaced begins a new generation.
    r#"
CREATE TABLE IF NOT EXISTS tails (
    path     BLOB NOT NULL,
    dest     TEXT NOT NULL,
    generation INTEGER NOT NULL,
    logical  TEXT NOT NULL,
    start    INTEGER NOT NULL,
    end_offset INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    dev      INTEGER NOT NULL,
    head_len INTEGER NOT NULL,
    head_sha256 BLOB NOT NULL,
    closed   INTEGER NOT NULL DEFAULT 0,
    successor BLOB,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (path, dest, generation)
) WITHOUT ROWID;
"#,
    // 10: the content layout (`layout = "content"`). An object row whose file is stored as a
    // pointer names its blob; `blobs` is what this node knows a destination to hold (looked up
    // before a HEAD) and which of them it uploaded itself (for the report's stored bytes).
    r#"
ALTER TABLE objects ADD COLUMN blob TEXT;
CREATE TABLE blobs (
    dest        TEXT NOT NULL,
    blob        TEXT NOT NULL,
    sha256      BLOB NOT NULL,
    size        INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    uploaded_ms INTEGER,
    seen_ms     INTEGER NOT NULL,
    PRIMARY KEY (dest, blob)
) WITHOUT ROWID;
"#,
];

impl Index {
    pub(super) fn migrate(&self) -> anyhow::Result<()> {
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
}

/// Undo migration 10 (the content layout's column and table), for tests that rewind the
/// schema version and migrate again.
#[cfg(test)]
pub(super) fn as_before_migration_10(conn: &rusqlite::Connection) {
    conn.execute_batch("DROP TABLE blobs; ALTER TABLE objects DROP COLUMN blob;")
        .unwrap();
}

/// Put the `runs` table back as migrations 4 to 6 left it (and undo the later ones that
/// cannot run twice).
#[cfg(test)]
pub(super) fn runs_as_before_migration_7(conn: &rusqlite::Connection) {
    as_before_migration_10(conn);
    conn.execute_batch("DROP TABLE run_manifests; DROP TABLE runs;")
        .unwrap();
    conn.execute_batch(MIGRATIONS[3]).unwrap();
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::params;

    use super::*;
    use crate::index::{SealedRun, pack_manifest, path_bytes};

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
        let ci = r1.ci.as_ref().unwrap();
        assert_eq!(
            (ci.provider.as_str(), ci.branch.as_deref()),
            ("github-actions", Some("main"))
        );
        assert_eq!((r1.first_file_ms, r1.last_file_ms), (Some(10), Some(4010)));
        let tests = r1.tests.as_ref().unwrap();
        assert_eq!((tests.tests, tests.failed), (3, 1));
        assert_eq!(
            idx.run_manifest(Path::new("/w"), "r1").unwrap().as_deref(),
            Some(manifest)
        );
        // A manifest that is not JSON moves as it is, with empty fields.
        assert_eq!((broken.ci.is_none(), broken.first_file_ms), (true, None));
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
        idx.record_pruned(Path::new("/w"), "r1", 7, 8).unwrap();
        assert_eq!(idx.run_manifest(Path::new("/w"), "r1").unwrap(), None);
        assert_eq!(idx.sealed_ms(Path::new("/w"), "r1").unwrap(), None);
    }
}
