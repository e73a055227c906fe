//! Watching: inotify (through notify) on every root, turned into candidates for the ingest stage.
//!
//! - close-write and rename-into-place complete a file at once; any other change makes it
//!   complete after the root's `settle` time of quiet;
//! - every directory has a watch of its own (not recursive: notify's recursive mode walks
//!   each tree moved in on its event thread, a `statx` per entry, every time it moves); our
//!   walks ([`walks`]) add them, each before reading its directory, so a file created in a
//!   new directory before its watch existed is read by the walk and one created later has an
//!   event. A directory created or moved in is walked as soon as its event arrives; a watch
//!   of a directory deleted or moved away is dropped by notify and the kernel;
//! - a job renaming directories in a loop (a rename storm) costs CPU, not threads or other
//!   runs' time: a directory waits for at most one walk, at once a few walker threads of our
//!   own walk, first come first served, and a walk stops between two entries at shutdown;
//! - the notify callback never blocks: a full event queue, a kernel queue overflow or an
//!   inotify limit (ENOSPC/EMFILE) triggers a full rescan and a warning naming the sysctl
//!   (lost events: at most once a minute); after lost events the trees are walked for their
//!   watches first, then rescanned;
//! - a missing root is waited for (checked every 2 s), and a root that is deleted and
//!   recreated is watched again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::scan::{self, Candidate, Feeder, Root};
use crate::tree::{Id, Kind};

mod walks;

use walks::{Countdown, Walks, What};

/// How often settling files are checked while there are any.
const SETTLE_TICK: Duration = Duration::from_millis(50);
/// How long after a directory rename the trees are rescanned.
const RENAME_RESCAN_AFTER: Duration = Duration::from_secs(3);
/// How often the roots are looked at while one is not watched (missing, or not a directory).
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);
/// How often they are looked at while every root is watched: a root that is removed, moved
/// or replaced sends an event on its own watch, which makes the watcher look at once; this
/// slow look is a safety net for what sends none (a mount over the root).
const SUPERVISE_IDLE: Duration = Duration::from_secs(60);

/// How often the roots are looked at, given which are watched now.
fn supervise_every(states: &[RootState]) -> Duration {
    if states.iter().all(|st| st.watched.is_some()) {
        SUPERVISE_IDLE
    } else {
        SUPERVISE_EVERY
    }
}

/// Events buffered between the notify thread and the watcher task.
const EVENT_QUEUE: usize = 65_536;

/// Runs the watcher until `cancel`; `rescan` is notified when events were lost.
pub(crate) struct WatchTask {
    /// The roots to watch.
    pub roots: Arc<Vec<Root>>,
    /// Where candidates go.
    pub feeder: Feeder,
    /// Asks the periodic scanner for a full rescan.
    pub rescan: Arc<Notify>,
    /// Set once an inotify limit was hit: the scanner then rescans more often.
    pub degraded: Arc<AtomicBool>,
    /// Notified once the roots present at start are watched (or could not be): the start-up
    /// catch-up scan waits for it, so one walk covers everything written before the watches
    /// existed, and events cover everything after.
    pub watching: Arc<Notify>,
    /// Told of every change to a file the roots tail (`tail`), so its new bytes are sent
    /// while it grows.
    pub tail: Option<crate::tail::Tracker>,
}

/// The advice given whenever the kernel refuses more watches or drops events.
pub(crate) const LIMIT_ADVICE: &str = "raise the sysctls fs.inotify.max_user_watches and \
     fs.inotify.max_user_instances (events: fs.inotify.max_queued_events); \
     until then the tree is rescanned periodically";

fn is_limit_error(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => {
            matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EMFILE))
        }
        _ => false,
    }
}

/// Events lost (a full queue, or the kernel's): said at most once a minute, with how often,
/// so a job renaming in a loop (which overflows every queue) does not flood the log.
#[derive(Default)]
struct Lost {
    said: Option<Instant>,
    since: u64,
}

impl Lost {
    fn note(&mut self) {
        self.since += 1;
        if self.said.is_none_or(|at| at.elapsed() >= LOST_SAID_EVERY) {
            tracing::warn!(
                times = self.since,
                advice = LIMIT_ADVICE,
                "file events were lost; rescanning every watched tree"
            );
            self.said = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// How often lost events are said at most.
const LOST_SAID_EVERY: Duration = Duration::from_secs(60);

struct RootState {
    /// The identity of the root directory being watched (the agent holds it open, so its
    /// inode cannot be reused while watched).
    watched: Option<Id>,
}

fn candidate(path: PathBuf, root: usize) -> Candidate {
    Candidate {
        path,
        root,
        stat: None,
    }
}

impl WatchTask {
    /// Watch until cancelled.
    pub(crate) async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::channel::<notify::Result<Event>>(EVENT_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let overflow_cb = overflow.clone();
        let watcher = RecommendedWatcher::new(
            move |ev: notify::Result<Event>| {
                // notify 8 watches IN_OPEN and IN_CLOSE_NOWRITE too: every read of a watched
                // file (ours included: hashing, uploading) would wake the watcher and take
                // queue room for nothing. Only a close after writing matters.
                if let Ok(e) = &ev
                    && matches!(e.kind, EventKind::Access(k) if k != AccessKind::Close(AccessMode::Write))
                {
                    return;
                }
                // Never block the notify thread: a full queue means a rescan.
                if tx.try_send(ev).is_err() {
                    overflow_cb.store(true, Ordering::SeqCst);
                }
            },
            notify::Config::default().with_follow_symlinks(false),
        )
        .map_err(|e| anyhow::anyhow!("cannot start inotify: {e} ({LIMIT_ADVICE})"))?;
        // Shared with the walks, which add the watches of the directories they enter.
        let watcher = Arc::new(Mutex::new(watcher));
        let walks = Walks::start(
            walks::Parts {
                roots: self.roots.clone(),
                feeder: self.feeder.clone(),
                watcher: watcher.clone(),
                degraded: self.degraded.clone(),
                rescan: self.rescan.clone(),
            },
            cancel.child_token(),
        )
        .map_err(|e| anyhow::anyhow!("cannot start the walker threads: {e}"))?;

        let mut states: Vec<RootState> = self
            .roots
            .iter()
            .map(|_| RootState { watched: None })
            .collect();
        let mut settling: HashMap<PathBuf, (usize, Instant)> = HashMap::new();
        // When to rescan after a directory was renamed inside a tree (see `handle`).
        let mut rescan_at: Option<Instant> = None;
        // The tick runs every 50 ms only while something is settling or events were lost;
        // otherwise every 2 s while a root is not watched, else once a minute: an idle agent
        // sleeps.
        let mut next_tick = tokio::time::Instant::now();
        let mut last_supervise = Instant::now() - Duration::from_secs(10);
        let mut first = true;
        let mut lost = Lost::default();

        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    if self.touches_a_root(&ev) {
                        // Removed, moved or replaced: look at the roots now.
                        last_supervise = Instant::now() - SUPERVISE_IDLE;
                        next_tick = tokio::time::Instant::now();
                    }
                    self.handle(ev, &mut settling, &overflow, &walks, &mut rescan_at).await;
                    if !settling.is_empty() || overflow.load(Ordering::Relaxed) {
                        next_tick = next_tick.min(tokio::time::Instant::now() + SETTLE_TICK);
                    }
                    if let Some(at) = rescan_at {
                        next_tick = next_tick.min(at.into());
                    }
                }
                _ = tokio::time::sleep_until(next_tick) => {
                    if overflow.swap(false, Ordering::SeqCst) {
                        lost.note();
                        self.rewatch(&states, &walks);
                    }
                    let now = Instant::now();
                    if rescan_at.is_some_and(|at| at <= now) {
                        rescan_at = None;
                        tracing::debug!("a directory was renamed inside a watched tree; rescanning");
                        self.rescan.notify_one();
                    }
                    let due: Vec<(PathBuf, usize)> = settling
                        .iter()
                        .filter(|(_, (root, at))| now.duration_since(*at) >= self.roots[*root].settle)
                        .map(|(p, (root, _))| (p.clone(), *root))
                        .collect();
                    for (path, root) in due {
                        settling.remove(&path);
                        self.feeder.send(candidate(path, root)).await;
                    }
                    if now.duration_since(last_supervise) >= supervise_every(&states) {
                        last_supervise = now;
                        let watched = self.supervise(&watcher, &mut states);
                        // At start only the watches: the catch-up scan, waiting for them,
                        // reads the files. A root watched anew later is walked whole.
                        let (what, done) = if first {
                            first = false;
                            (What::Watch, Some(Countdown::new(watched.len(), self.watching.clone())))
                        } else {
                            (What::Files, None)
                        };
                        for i in watched {
                            walks.request(self.roots[i].path.clone(), i, what, done.clone());
                        }
                    }
                    next_tick = tokio::time::Instant::now()
                        + if settling.is_empty() { supervise_every(&states) } else { SETTLE_TICK };
                    if let Some(at) = rescan_at {
                        next_tick = next_tick.min(at.into());
                    }
                }
            }
        }
        walks.stop().await;
        drop(watcher);
        Ok(())
    }

    /// After lost events: walk every watched tree for the watches of directories whose
    /// events were lost, then rescan (the scanner reads the files and drops deleted ones).
    fn rewatch(&self, states: &[RootState], walks: &Walks) {
        let watched: Vec<usize> = (0..states.len())
            .filter(|&i| states[i].watched.is_some())
            .collect();
        let done = Countdown::new(watched.len(), self.rescan.clone());
        for i in watched {
            walks.request(
                self.roots[i].path.clone(),
                i,
                What::Watch,
                Some(done.clone()),
            );
        }
    }

    /// Start watching roots that appeared, stop watching roots that vanished or were
    /// replaced (by another directory: watched anew; by a symlink: never followed, waited
    /// for). Returns the roots watched anew: their trees are for the walks to watch.
    fn supervise(
        &self,
        watcher: &Mutex<RecommendedWatcher>,
        states: &mut [RootState],
    ) -> Vec<usize> {
        let mut watcher = watcher.lock().unwrap_or_else(|p| p.into_inner());
        let mut anew = Vec::new();
        for (i, (root, st)) in self.roots.iter().zip(states.iter_mut()).enumerate() {
            let id = root.refresh().map(|d| d.id());
            if st.watched.is_some() && id != st.watched {
                let _ = watcher.unwatch(&root.path);
                st.watched = None;
            }
            if st.watched.is_some() {
                continue;
            }
            let Some(id) = id else {
                continue;
            };
            match watcher.watch(&root.path, RecursiveMode::NonRecursive) {
                Ok(()) => {}
                Err(e) if is_limit_error(&e) => {
                    tracing::warn!(root = %root.path.display(), error = %e, advice = LIMIT_ADVICE, "inotify limit reached");
                    self.degraded.store(true, Ordering::SeqCst);
                    self.rescan.notify_one();
                }
                Err(e) => {
                    tracing::warn!(root = %root.path.display(), error = %e, "cannot watch root; will retry");
                    continue;
                }
            }
            st.watched = Some(id);
            tracing::info!(root = %root.path.display(), "watching");
            anew.push(i);
        }
        anew
    }

    /// Whether `ev` says a root itself was removed, moved or replaced.
    fn touches_a_root(&self, ev: &notify::Result<Event>) -> bool {
        let Ok(ev) = ev else { return false };
        matches!(
            ev.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) | EventKind::Other
        ) && ev
            .paths
            .iter()
            .any(|p| self.roots.iter().any(|r| &r.path == p))
    }

    fn root_of(&self, path: &Path) -> Option<usize> {
        scan::root_of(&self.roots, path)
    }

    fn is_dir(&self, path: &Path, root: usize) -> bool {
        matches!(self.roots[root].kind(path), Ok(Kind::Dir))
    }

    async fn handle(
        &self,
        ev: notify::Result<Event>,
        settling: &mut HashMap<PathBuf, (usize, Instant)>,
        overflow: &AtomicBool,
        walks: &Walks,
        rescan_at: &mut Option<Instant>,
    ) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                if is_limit_error(&e) {
                    tracing::warn!(error = %e, advice = LIMIT_ADVICE, "inotify limit reached");
                    self.degraded.store(true, Ordering::SeqCst);
                } else {
                    tracing::warn!(error = %e, "file watching error; rescanning");
                }
                overflow.store(true, Ordering::SeqCst);
                return;
            }
        };
        if ev.need_rescan() {
            overflow.store(true, Ordering::SeqCst);
            return;
        }
        let now = Instant::now();
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in ev.paths {
                    if let Some(root) = self.root_of(&p) {
                        settling.remove(&p);
                        self.feeder.send(candidate(p, root)).await;
                    }
                }
            }
            EventKind::Access(_) => {}
            EventKind::Create(CreateKind::Folder) => {
                for p in ev.paths {
                    if let Some(root) = self.root_of(&p) {
                        walks.request(p, root, What::Files, None);
                    }
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
                // The destination of a rename is complete now; for Both it is the last path.
                if let Some(p) = ev.paths.last().cloned() {
                    if let Some(from) = ev.paths.first().filter(|_| ev.paths.len() > 1) {
                        settling.remove(from);
                        if let Some(root) = self.root_of(from) {
                            self.feeder.send(candidate(from.clone(), root)).await;
                        }
                    }
                    if let Some(root) = self.root_of(&p) {
                        settling.remove(&p);
                        if self.is_dir(&p, root) {
                            walks.request(p, root, What::Files, None);
                            // notify keeps the old paths for the watches under a renamed
                            // directory, so events from inside it may name paths that no
                            // longer lead there (through a symlink that took its place, say):
                            // a rescan a little later finds what they miss. Set once per
                            // burst, so a job renaming in a loop costs a rescan every few
                            // seconds, not one per rename.
                            rescan_at.get_or_insert(Instant::now() + RENAME_RESCAN_AFTER);
                        } else {
                            self.feeder.send(candidate(p, root)).await;
                        }
                    }
                }
            }
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => {
                for p in ev.paths {
                    settling.remove(&p);
                    if let Some(root) = self.root_of(&p) {
                        self.feeder.send(candidate(p, root)).await;
                    }
                }
            }
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => {
                for p in ev.paths {
                    let Some(root) = self.root_of(&p) else {
                        continue;
                    };
                    if ev.kind == EventKind::Create(CreateKind::Any) && self.is_dir(&p, root) {
                        walks.request(p, root, What::Files, None);
                    } else {
                        if let Some(tail) = &self.tail
                            && self.roots[root].tails(&p)
                            && self.roots[root].wants(&p)
                        {
                            tail.grew(p.clone(), root);
                        }
                        settling.insert(p, (root, now));
                    }
                }
            }
        }
    }
}
