//! The watcher's walks: directories created or moved in, roots watched anew, and every watched
//! tree again after events were lost. Each walk adds the watch of every directory it enters
//! before it reads it (the watches are not recursive: notify would walk every tree moved in
//! on its own event thread, a `statx` per entry, each time it moves), so what was created
//! before the watch existed is read by the walk, and what comes after has an event.
//!
//! A job renaming directories in a loop must cost CPU only, not threads or other runs' time:
//!
//! - at most one walk of a directory waits at a time: a request for a directory already
//!   waiting is merged into it, and one for a directory being walked marks it to be walked
//!   once more afterwards;
//! - [`WALKERS`] threads of their own walk, first come first served, never the runtime's
//!   blocking pool;
//! - a walk stops between two entries once cancelled (shutdown), and a waiting one is dropped.
//!
//! notify adds a watch on its event thread, which answers once it has read every event queued:
//! while a storm lasts a walk may wait there (about a second measured), and a stop does not
//! wait for such a walker beyond [`STOP_WAIT`].

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::scan::{self, Feeder, Root};
use crate::tree::Kind;

/// Threads that walk: a storm in one tree keeps at most this many busy, and the others'
/// new directories wait for one walk at most.
pub(super) const WALKERS: usize = 2;

/// What a walk does besides adding watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum What {
    /// Only the watches: the start-up catch-up scan reads the files.
    Watch,
    /// The watches, and every file the index does not hold as it is queued for ingest.
    Files,
}

/// Counts walks down to zero, then notifies (the catch-up scan waiting for the first
/// watches; the rescan after lost events, once the watches are back).
pub(super) struct Countdown {
    left: AtomicUsize,
    then: Arc<Notify>,
}

impl Countdown {
    /// Notify `then` once `n` walks are done (at once if `n` is 0).
    pub(super) fn new(n: usize, then: Arc<Notify>) -> Arc<Countdown> {
        if n == 0 {
            then.notify_one();
        }
        Arc::new(Countdown {
            left: AtomicUsize::new(n),
            then,
        })
    }

    fn done(&self) {
        if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.then.notify_one();
        }
    }
}

/// One walk asked for (requests for one directory merged).
struct Request {
    root: usize,
    what: What,
    done: Vec<Arc<Countdown>>,
}

/// The directories asked for, oldest first, at most one walk waiting for each.
#[derive(Default)]
struct Queue {
    order: VecDeque<PathBuf>,
    /// Every directory waiting or being walked, with the walk still to do for it: waiting
    /// in `order`, or, while one runs, the one after it (`None`: none asked for).
    slots: HashMap<PathBuf, Option<Request>>,
}

impl Queue {
    /// Ask for a walk of `dir`, merged with one waiting for it; true if `dir` joined the queue
    /// (a walker is to be woken).
    fn push(&mut self, dir: PathBuf, req: Request) -> bool {
        match self.slots.get_mut(&dir) {
            Some(next) => {
                match next {
                    Some(next) => {
                        next.what = next.what.max(req.what);
                        next.done.extend(req.done);
                    }
                    // Being walked: once more afterwards (`finished` queues it again).
                    None => *next = Some(req),
                }
                false
            }
            None => {
                self.slots.insert(dir.clone(), Some(req));
                self.order.push_back(dir);
                true
            }
        }
    }

    /// The oldest walk waiting, now running.
    fn take(&mut self) -> Option<(PathBuf, Request)> {
        while let Some(dir) = self.order.pop_front() {
            if let Some(req) = self.slots.get_mut(&dir).and_then(Option::take) {
                return Some((dir, req));
            }
        }
        None
    }

    /// The walk of `dir` ended; true if it was asked for again meanwhile (it is queued again,
    /// at the back: a directory that keeps changing waits its turn like the others).
    fn finished(&mut self, dir: &Path) -> bool {
        let again = self.slots.get(dir).is_some_and(Option::is_some);
        if again {
            self.order.push_back(dir.to_path_buf());
        } else {
            self.slots.remove(dir);
        }
        again
    }
}

/// What the walker threads share.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    cancel: CancellationToken,
    roots: Arc<Vec<Root>>,
    feeder: Feeder,
    watcher: Arc<Mutex<RecommendedWatcher>>,
    /// Set (and a rescan asked for) once the kernel refused a watch.
    degraded: Arc<AtomicBool>,
    rescan: Arc<Notify>,
}

/// The walker threads and their queue.
pub(super) struct Walks {
    shared: Arc<Shared>,
    /// Walker threads still running, and a notification as each ends.
    alive: Arc<(AtomicUsize, Notify)>,
}

/// How long a stop waits for the walker threads: one may be waiting for notify's event
/// thread to add a watch, which answers once it has read every event queued (a job renaming
/// in a loop may keep it reading for as long as it runs). Such a thread is left behind; it
/// holds nothing that needs an orderly end.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a [`Walks`] works with.
pub(super) struct Parts {
    pub roots: Arc<Vec<Root>>,
    pub feeder: Feeder,
    pub watcher: Arc<Mutex<RecommendedWatcher>>,
    pub degraded: Arc<AtomicBool>,
    pub rescan: Arc<Notify>,
}

impl Walks {
    /// Start the walker threads; they stop when `cancel` is cancelled.
    pub(super) fn start(parts: Parts, cancel: CancellationToken) -> std::io::Result<Walks> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            wake: Condvar::new(),
            cancel,
            roots: parts.roots,
            feeder: parts.feeder,
            watcher: parts.watcher,
            degraded: parts.degraded,
            rescan: parts.rescan,
        });
        let alive = Arc::new((AtomicUsize::new(0), Notify::new()));
        for i in 0..WALKERS {
            let (mine, alive) = (shared.clone(), alive.clone());
            alive.0.fetch_add(1, Ordering::SeqCst);
            let started = std::thread::Builder::new()
                .name(format!("walk-{i}"))
                .spawn(move || {
                    mine.work();
                    alive.0.fetch_sub(1, Ordering::SeqCst);
                    alive.1.notify_one();
                });
            if let Err(e) = started {
                shared.cancel.cancel();
                return Err(e);
            }
        }
        Ok(Walks { shared, alive })
    }

    /// Ask for a walk of `dir` (a directory of root `root`), merged with one already asked
    /// for; `done` is counted down once it ran.
    pub(super) fn request(
        &self,
        dir: PathBuf,
        root: usize,
        what: What,
        done: Option<Arc<Countdown>>,
    ) {
        let req = Request {
            root,
            what,
            done: done.into_iter().collect(),
        };
        if self.shared.lock().push(dir, req) {
            self.shared.wake.notify_one();
        }
    }

    /// Stop: the walks in progress end at their next entry, waiting ones are dropped; returns
    /// once the threads ended, or after [`STOP_WAIT`].
    pub(super) async fn stop(self) {
        self.shared.cancel.cancel();
        {
            // Taken so no walker is between its check and its wait.
            let _q = self.shared.lock();
            self.shared.wake.notify_all();
        }
        let (alive, ended) = &*self.alive;
        let all_ended = async {
            loop {
                let notified = ended.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if alive.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(STOP_WAIT, all_ended).await.is_err() {
            tracing::debug!("a walker waits for notify to add a watch; not waiting for it");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A walker thread: take the oldest request, walk, until cancelled.
    fn work(&self) {
        while let Some((dir, req)) = self.next() {
            self.walk(&dir, &req);
            for d in &req.done {
                d.done();
            }
            if self.lock().finished(&dir) {
                self.wake.notify_one();
            }
        }
    }

    /// The next walk to do, waiting for one; `None` once cancelled.
    fn next(&self) -> Option<(PathBuf, Request)> {
        let mut q = self.lock();
        loop {
            if self.cancel.is_cancelled() {
                return None;
            }
            if let Some(next) = q.take() {
                return Some(next);
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Walk `dir`: add the watch of each directory as it is entered, and queue the files
    /// when asked to.
    fn walk(&self, dir: &Path, req: &Request) {
        let root = &self.roots[req.root];
        // Looked at through the root's handle: a directory swapped for a symlink is not
        // walked (nor watched).
        if dir != root.path && !matches!(root.kind(dir), Ok(Kind::Dir)) {
            return;
        }
        let mut refused = false;
        let mut entering = |d: &Path| {
            if self.cancel.is_cancelled() {
                return false;
            }
            // The root's own watch is the watcher's (`supervise`). Once the kernel refused
            // one, the rest of this walk would be refused too: its files are still read.
            if !refused && d != root.path {
                refused = !self.add_watch(d);
            }
            true
        };
        match req.what {
            What::Watch => root.walk_dirs(dir, &mut entering),
            What::Files => {
                scan::walk_entering(dir, req.root, root, &self.feeder, &mut entering);
            }
        }
    }

    /// Watch the directory `dir` (not recursively); false if the kernel refused it for a
    /// limit (then the trees are rescanned instead, more often).
    fn add_watch(&self, dir: &Path) -> bool {
        let res = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .watch(dir, RecursiveMode::NonRecursive);
        match res {
            Ok(()) => true,
            Err(e) if super::is_limit_error(&e) => {
                // Said once: a tree beyond the limit would repeat it for every new directory.
                if !self.degraded.swap(true, Ordering::SeqCst) {
                    tracing::warn!(dir = %dir.display(), error = %e, advice = super::LIMIT_ADVICE, "inotify limit reached");
                } else {
                    tracing::debug!(dir = %dir.display(), error = %e, "inotify limit reached");
                }
                self.rescan.notify_one();
                false
            }
            // Gone, or no longer a directory, since it was opened: its own events say so.
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch a directory");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(what: What) -> Request {
        Request {
            root: 0,
            what,
            done: Vec::new(),
        }
    }

    #[test]
    fn a_directory_waits_for_one_walk_at_most() {
        let (a, b) = (PathBuf::from("/w/a"), PathBuf::from("/w/b"));
        let mut q = Queue::default();
        assert!(q.push(a.clone(), req(What::Watch)));
        // Merged with the one waiting, which now reads the files too.
        assert!(!q.push(a.clone(), req(What::Files)));
        assert!(q.push(b.clone(), req(What::Watch)));
        let (dir, walk) = q.take().unwrap();
        assert_eq!((dir, walk.what), (a.clone(), What::Files));
        // Asked for while it is walked, three times: once more afterwards.
        for _ in 0..3 {
            assert!(!q.push(a.clone(), req(What::Watch)));
        }
        assert_eq!(q.take().unwrap().0, b);
        assert!(q.take().is_none(), "a is being walked");
        assert!(q.finished(&a), "asked for again");
        assert!(!q.finished(&b));
        let (dir, walk) = q.take().unwrap();
        assert_eq!((dir, walk.what), (a.clone(), What::Watch));
        assert!(q.take().is_none());
        assert!(!q.finished(&a));
        assert!(q.slots.is_empty() && q.order.is_empty());
    }

    /// A tree moved in: one walk finds its files and watches each of its directories, so a
    /// file written deep in it afterwards has an event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tree_moved_in_is_walked_and_watched_to_its_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("root");
        let away = tmp.path().join("away");
        std::fs::create_dir_all(&top).unwrap();
        std::fs::create_dir_all(away.join("x/y")).unwrap();
        for f in ["a", "x/b", "x/y/c"] {
            std::fs::write(away.join(f), f).unwrap();
        }
        let text = format!(
            "node_id = \"n\"\nstate_dir = \"{s}/state\"\n[[watch]]\npath = \"{top}\"\n\
             [[destination]]\nname = \"d\"\nurl = \"file://{s}/store\"\n",
            s = tmp.path().display(),
            top = top.display()
        );
        let config = crate::config::Config::parse(&text, "t").unwrap();
        let roots = Arc::new(Root::from_config(&config));
        let (events_tx, events) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                let _ = events_tx.send(ev.paths);
            }
        })
        .unwrap();
        watcher.watch(&top, RecursiveMode::NonRecursive).unwrap();
        let (feeder, mut rx, _) = Feeder::new(64, None);
        let cancel = CancellationToken::new();
        let walks = Walks::start(
            Parts {
                roots,
                feeder,
                watcher: Arc::new(Mutex::new(watcher)),
                degraded: Arc::default(),
                rescan: Arc::default(),
            },
            cancel.clone(),
        )
        .unwrap();

        let moved = top.join("moved");
        std::fs::rename(&away, &moved).unwrap();
        let walked = Arc::new(Notify::new());
        walks.request(
            moved.clone(),
            0,
            What::Files,
            Some(Countdown::new(1, walked.clone())),
        );
        tokio::time::timeout(Duration::from_secs(10), walked.notified())
            .await
            .expect("the walk ended");
        let mut found: Vec<PathBuf> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|c| c.path.strip_prefix(&moved).unwrap().to_path_buf())
            .collect();
        found.sort();
        assert_eq!(found, ["a", "x/b", "x/y/c"].map(PathBuf::from));

        let late = moved.join("x/y/late");
        std::fs::write(&late, "late").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let paths = events.recv_timeout(left).expect("an event for x/y/late");
            if paths.contains(&late) {
                break;
            }
        }
        walks.stop().await;
    }
}
