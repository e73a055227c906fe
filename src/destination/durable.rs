//! Durability of a `file://` store with `sync = "batch"`, by group commit (with the default,
//! `sync = "each"`, object_store syncs every object): objects are written without a sync
//! each, and one `syncfs` of the store's filesystem makes every object written before it
//! durable, shared by every task waiting at that moment.
//!
//! A stored object must be on disk before the index counts it stored (local cleanup may then
//! delete its source). Syncing each object and its directory (object_store's `with_fsync`)
//! costs two synchronous disk writes per object; a first sync of many small files spent most
//! of its time there. Here a writer takes a [`Ticket`] before it writes and calls
//! [`Durability::wait`] after: it returns once a `syncfs` that *began* after the write finished
//! has succeeded. While one `syncfs` runs, everyone who finishes a write queues for the next,
//! so there is at most one running and each covers all writes finished before it.
//!
//! A failed `syncfs` reports a writeback error once per open file, not once per object whose
//! pages were lost; so a failure fails every waiter whose write may have been in it: every
//! ticket taken before the failure was reported, even if a later `syncfs` succeeds.
//!
//! The store's directory is assumed to be one filesystem: a mount point below it would not be
//! synced (`syncfs` syncs the filesystem holding the directory).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Group commit of one `file://` store's writes.
#[derive(Debug)]
pub(crate) struct Durability {
    /// The store's directory, opened once (`syncfs` needs a descriptor on the filesystem).
    dir: Arc<OwnedFd>,
    /// The directory, for messages.
    path: PathBuf,
    /// `syncfs` calls begun so far (the number of the last one begun).
    begun: AtomicU64,
    /// `syncfs` calls that failed so far.
    failures: AtomicU64,
    /// The number of the last `syncfs` that succeeded; held while one runs, so they never
    /// overlap and each waiter either finds its sync done or runs the next one.
    synced: tokio::sync::Mutex<u64>,
}

/// Taken before writing: which failures the write may be caught in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    failures: u64,
}

impl Durability {
    /// Open `dir` (the store's root directory) for syncing.
    pub(crate) fn open(dir: &Path) -> std::io::Result<Durability> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Durability {
            dir: Arc::new(fd),
            path: dir.to_path_buf(),
            begun: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            synced: tokio::sync::Mutex::new(0),
        })
    }

    /// Take before writing an object.
    pub(crate) fn ticket(&self) -> Ticket {
        Ticket {
            failures: self.failures.load(Ordering::SeqCst),
        }
    }

    /// Return once everything written before this call (and after `ticket` was taken) is on
    /// disk, or the error of the `syncfs` that may have lost it.
    pub(crate) async fn wait(&self, ticket: Ticket) -> Result<(), String> {
        // A sync numbered above `after` began after this call, so after the write.
        let after = self.begun.load(Ordering::SeqCst);
        let mut synced = self.synced.lock().await;
        if self.failures.load(Ordering::SeqCst) != ticket.failures {
            return Err(format!(
                "syncing {} failed after the object was written (see the earlier error), \
                 so it may not be on disk",
                self.path.display()
            ));
        }
        if *synced > after {
            return Ok(());
        }
        let n = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let dir = self.dir.clone();
        let res = tokio::task::spawn_blocking(move || rustix::fs::syncfs(&*dir))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| std::io::Error::from(e).to_string()));
        match res {
            Ok(()) => {
                *synced = n;
                Ok(())
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                Err(format!("syncing {}: {e}", self.path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_queued_behind_a_sync_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = Arc::new(Durability::open(dir.path()).unwrap());
        // A sync in progress: every writer that finishes meanwhile queues behind it.
        let running = d.synced.lock().await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..10 {
            let d = d.clone();
            let p = dir.path().join(format!("f{i}"));
            tasks.spawn(async move {
                let t = d.ticket();
                std::fs::write(&p, b"x").unwrap();
                d.wait(t).await
            });
        }
        // One runtime thread: a yield runs every spawned task up to the lock.
        tokio::task::yield_now().await;
        drop(running);
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(d.begun.load(Ordering::SeqCst), 1, "one sync for all ten");
        assert_eq!(*d.synced.lock().await, 1);
    }

    #[tokio::test]
    async fn a_waiter_after_a_sync_runs_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let d = Durability::open(dir.path()).unwrap();
        d.wait(d.ticket()).await.unwrap();
        d.wait(d.ticket()).await.unwrap();
        assert_eq!(d.begun.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failure_fails_every_ticket_taken_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = Durability::open(dir.path()).unwrap();
        let before = d.ticket();
        // As if a sync had failed while this write was in flight.
        d.failures.fetch_add(1, Ordering::SeqCst);
        let err = d.wait(before).await.unwrap_err();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        d.wait(d.ticket()).await.unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Durability::open(&dir.path().join("nope")).is_err());
    }
}
