//! Notifications of sealed runs (`[[notify]]`): queued with the seal, leased to one sender at
//! a time, and finished as sent, to retry, or given up.

use std::path::Path;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{OptionalExtension, ToSql, params};

use super::{Index, now_ms, path_bytes};

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

/// Pending notifications due now and not leased, oldest due first (walks `notifications_due`).
pub(super) const DUE_NOTIFICATIONS: &str =
    "SELECT id, notifier, idempotency_key, run, sealed_ms, manifest_key,
            payload, attempts, created_ms
     FROM notifications
     WHERE state = ?1 AND next_attempt_ms <= ?2 AND lease_until_ms <= ?2
     ORDER BY next_attempt_ms LIMIT ?3";

/// Take the lease of one notification: only a pending one that nobody else holds.
pub(super) const LEASE_NOTIFICATION: &str = "UPDATE notifications SET lease_until_ms = ?3
     WHERE id = ?1 AND state = ?4 AND lease_until_ms <= ?2 AND next_attempt_ms <= ?2";

/// When the next pending notification can be sent: due and no longer leased.
pub(super) const NEXT_NOTIFICATION: &str =
    "SELECT min(max(next_attempt_ms, lease_until_ms)) FROM notifications WHERE state = ?1";

/// The notifications of one seal of a run (for `runs`).
pub(super) const NOTIFICATIONS_OF_RUN: &str =
    "SELECT notifier, state, attempts, last_error, done_ms
     FROM notifications WHERE watch = ?1 AND run = ?2 AND sealed_ms = ?3 ORDER BY id";

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
    /// Queued only if no notification has this idempotency key yet (an announcement that
    /// later seals find again); otherwise a second one with the key is an error.
    pub once: bool,
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

impl Index {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::index::SealedRun;

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
            once: false,
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
}
