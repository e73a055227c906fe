//! The watched trees: their roots, filters and key prefixes, the walk that feeds every file in a
//! tree to the ingest stage (start-up catch-up, periodic reconcile, new directories, rescans
//! after lost events), and the sweep that drops index rows of files deleted from disk.
//!
//! The walk never follows symbolic links and only looks at metadata; unchanged files are
//! recognised by the ingest stage from (size, mtime, inode) and never read again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use std::sync::Mutex;

use crate::config::{Config, Filter};
use crate::format::manifest::RUN_DIR;
use crate::index::{Index, Observation, Stat};
use crate::tree::{self, Id, Kind, RootDir, Tree, Visit};

/// S3's limit on key length, in bytes.
const MAX_KEY_BYTES: usize = 1024;

/// One watched tree.
#[derive(Debug, Clone)]
pub struct Root {
    /// Absolute root directory, resolved when the configuration was loaded.
    pub path: PathBuf,
    /// Key prefix with `{node}` expanded; may be empty.
    pub prefix: String,
    /// Include/exclude globs.
    pub filter: Filter,
    /// Quiet time after which a file counts as complete.
    pub settle: std::time::Duration,
    /// Our own files and directories (state, key files, file:// stores) that must never be
    /// uploaded, even when they appear inside a watched tree (by path or, on walks and opens,
    /// by device and inode: hard links and bind mounts too).
    pub own: Vec<PathBuf>,
    /// Other watch roots inside this one, relative to it: their files belong to them.
    pub nested: Vec<PathBuf>,
    /// The directory handle every access goes through.
    pub tree: Arc<Tree>,
    /// `runs = "dir"`: each top-level directory is a run.
    pub runs: bool,
    /// Files sent in segments while they grow (`tail`; `*` crosses `/`).
    pub tail: globset::GlobSet,
    /// How often a tailed file's new bytes become a segment.
    pub tail_interval: std::time::Duration,
    own_ids: Arc<Mutex<Vec<Id>>>,
}

impl Root {
    /// The roots of a configuration, in order, each opened if it exists.
    pub fn from_config(cfg: &Config) -> Vec<Root> {
        let mut own = vec![cfg.state_dir.clone()];
        own.extend(cfg.pipeline.key_file.iter().cloned());
        own.extend(cfg.pipeline.old_key_files.iter().cloned());
        own.extend(
            cfg.destinations()
                .filter_map(|d| (d.url.scheme() == "file").then(|| d.url.to_file_path().ok())?),
        );
        let roots: Vec<Root> = cfg
            .watch
            .iter()
            .map(|w| Root {
                path: w.path.clone(),
                prefix: w.prefix.replace("{node}", &cfg.node_id),
                filter: Filter::new(w),
                settle: w.settle,
                own: own.clone(),
                nested: cfg
                    .watch
                    .iter()
                    .filter_map(|o| o.path.strip_prefix(&w.path).ok())
                    .filter(|r| !r.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .collect(),
                tree: Arc::new(Tree::new(w.path.clone(), w.one_file_system)),
                runs: w.runs == crate::config::Runs::Dir,
                tail: crate::config::compile_globs(&w.tail_globs(), crate::config::Separator::Any),
                tail_interval: w.tail_interval,
                own_ids: Arc::default(),
            })
            .collect();
        for r in &roots {
            r.refresh();
        }
        roots
    }

    /// Look at the root's path again (see [`Tree::refresh`]) and at the identities of our own
    /// files; returns the directory held now.
    pub fn refresh(&self) -> Option<Arc<RootDir>> {
        let ids: Vec<Id> = self.own.iter().filter_map(|p| tree::id_of(p)).collect();
        *self.own_ids.lock().unwrap_or_else(|p| p.into_inner()) = ids;
        self.tree.refresh()
    }

    fn own_ids(&self) -> Vec<Id> {
        self.own_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The path relative to this root, if it is inside it.
    pub fn relative<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        path.strip_prefix(&self.path)
            .ok()
            .filter(|r| !r.as_os_str().is_empty())
    }

    /// Whether a file at `path` is one to upload (inside the root, not inside a nested root,
    /// not in a run's reserved directory, and matching the filters).
    pub fn wants(&self, path: &Path) -> bool {
        self.relative(path).is_some_and(|r| {
            self.filter.matches(r)
                && !self.reserved(r)
                && !self.nested.iter().any(|n| r.starts_with(n))
        }) && !self.own.iter().any(|o| within(path, o))
    }

    /// Whether a file at `path` (one this root [`Root::wants`]) is to be tailed while it grows.
    pub fn tails(&self, path: &Path) -> bool {
        !self.tail.is_empty() && self.relative(path).is_some_and(|r| self.tail.is_match(r))
    }

    /// Whether `rel` lies where only `seal` writes in a `runs = "dir"` watch: a run's reserved
    /// directory (`<run>/_run/…`: the run's manifest and page), the watch's run list
    /// (`index.html` at the top) and its latest-of-branch pages (`_panoptic-sync/…`). A file
    /// the tree holds there is never uploaded (it would land on the key of such a page).
    pub fn reserved(&self, rel: &Path) -> bool {
        if !self.runs {
            return false;
        }
        let mut parts = rel.components();
        let first = parts.next().map(|c| c.as_os_str());
        let second = parts.next().map(|c| c.as_os_str());
        second.is_some_and(|c| c == RUN_DIR)
            || first.is_some_and(|c| c == crate::format::layout::INTERNAL_PREFIX)
            || (second.is_none() && first.is_some_and(|c| c == "index.html"))
    }

    fn dir_and_rel<'a>(&self, path: &'a Path) -> std::io::Result<(Arc<RootDir>, &'a Path)> {
        let rel = self.relative(path).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not inside {}", path.display(), self.path.display()),
            )
        })?;
        let dir = self.tree.dir().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("watch root {} is not available", self.path.display()),
            )
        })?;
        Ok((dir, rel))
    }

    /// Open the regular file at `path` for reading, confined to this root (no symlink in any
    /// component; never one of our own files).
    pub fn open_file(&self, path: &Path) -> std::io::Result<(std::fs::File, Stat)> {
        let (dir, rel) = self.dir_and_rel(path)?;
        let (file, stat) = dir.open_file(rel)?;
        let own = self
            .own_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(stat.dev, stat.inode));
        if own {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "one of the agent's own files (state, key or store)",
            ));
        }
        Ok((file, stat))
    }

    /// What `path` is, looked at through this root without following any link.
    pub fn kind(&self, path: &Path) -> std::io::Result<Kind> {
        let (dir, rel) = self.dir_and_rel(path)?;
        dir.kind(rel)
    }

    /// Delete `path` if it is still exactly `stat` (see [`RootDir::remove_if_unchanged`]).
    pub fn remove_if_unchanged(&self, path: &Path, stat: &Stat) -> std::io::Result<bool> {
        let (dir, rel) = self.dir_and_rel(path)?;
        dir.remove_if_unchanged(rel, stat)
    }

    /// Every wanted regular file under `dir` (the root or a directory in it), confined to the
    /// root; `visit` returns false to stop. Blocking.
    pub fn walk_files(&self, dir: &Path, visit: &mut dyn FnMut(PathBuf, Stat) -> bool) {
        self.walk_listed(dir, visit, &mut |_| {});
    }

    /// [`Root::walk_files`], also calling `listed` with each directory (absolute) once all of
    /// its entries were read; its wanted files were visited just before (see
    /// [`RootDir::walk`](crate::tree::RootDir::walk)).
    pub fn walk_listed(
        &self,
        dir: &Path,
        visit: &mut dyn FnMut(PathBuf, Stat) -> bool,
        listed: &mut dyn FnMut(&Path),
    ) {
        self.walk_with(dir, &mut |_| true, Some(visit), listed);
    }

    /// Every directory under `dir` (itself included), each passed to `entering` (absolute)
    /// before it is read; no file is looked at. `entering` returns false to stop. Blocking.
    pub fn walk_dirs(&self, dir: &Path, entering: &mut dyn FnMut(&Path) -> bool) {
        self.walk_with(dir, entering, None, &mut |_| {});
    }

    /// The walk of [`Root::walk_listed`], also calling `entering` with each directory
    /// (absolute) before it is read (false stops the walk); without `visit` only the
    /// directories are walked.
    fn walk_with(
        &self,
        dir: &Path,
        entering: &mut dyn FnMut(&Path) -> bool,
        visit: Option<&mut dyn FnMut(PathBuf, Stat) -> bool>,
        listed: &mut dyn FnMut(&Path),
    ) {
        let Some(handle) = self.tree.dir() else {
            return;
        };
        let rel = if dir == self.path {
            Path::new("")
        } else {
            match self.relative(dir) {
                Some(r) => r,
                None => return,
            }
        };
        handle.walk_with(
            rel,
            &self.own_ids(),
            &self.nested,
            &mut RootVisit {
                root: self,
                entering: &mut *entering,
                visit: visit.map(|v| v as &mut dyn FnMut(PathBuf, Stat) -> bool),
                listed: &mut *listed,
            },
        );
    }

    /// The object key (relative to a destination's base) for `path`, or why there is none.
    pub fn key_for(&self, path: &Path) -> Result<String, String> {
        let rel = self
            .relative(path)
            .ok_or_else(|| format!("{} is not inside {}", path.display(), self.path.display()))?;
        let rel = rel.to_str().ok_or_else(|| {
            format!(
                "file name is not valid UTF-8: {} (object keys must be UTF-8)",
                path.display()
            )
        })?;
        let key = if self.prefix.is_empty() {
            let internal = crate::format::layout::INTERNAL_PREFIX;
            if rel == internal || rel.starts_with(&format!("{internal}/")) {
                return Err(format!(
                    "{} would be stored under the agent's own {internal:?} prefix (the watch has an empty prefix)",
                    path.display()
                ));
            }
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        };
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "object key for {} is {} bytes, longer than the {MAX_KEY_BYTES} stores accept",
                path.display(),
                key.len()
            ));
        }
        ObjectPath::parse(&key)
            .map_err(|e| format!("{} cannot be an object key: {e}", path.display()))?;
        Ok(key)
    }
}

/// Whether `path` is `dir` or lies beneath it, comparing bytes (both absolute and normal, as
/// the configuration's paths and the walks' joins are): [`Path::starts_with`] compares
/// component by component, a cost paid for every file of every walk.
fn within(path: &Path, dir: &Path) -> bool {
    let (p, d) = (path.as_os_str().as_bytes(), dir.as_os_str().as_bytes());
    let d = d.strip_suffix(b"/").unwrap_or(d);
    p.starts_with(d) && matches!(p.get(d.len()), None | Some(b'/'))
}

/// A walk of one root told in absolute paths, with the root's filters applied to files.
struct RootVisit<'a> {
    root: &'a Root,
    entering: &'a mut dyn FnMut(&Path) -> bool,
    visit: Option<&'a mut dyn FnMut(PathBuf, Stat) -> bool>,
    listed: &'a mut dyn FnMut(&Path),
}

impl Visit for RootVisit<'_> {
    fn entering(&mut self, dir: &Path) -> bool {
        (self.entering)(&self.root.path.join(dir))
    }

    fn wants_files(&self) -> bool {
        self.visit.is_some()
    }

    fn file(&mut self, rel: PathBuf, stat: Stat) -> bool {
        let r = self.root;
        if !r.filter.matches(&rel) || r.reserved(&rel) {
            return true;
        }
        let path = r.path.join(&rel);
        if r.own.iter().any(|o| within(&path, o)) {
            return true;
        }
        self.visit.as_mut().is_none_or(|v| v(path, stat))
    }

    fn listed(&mut self, dir: &Path) {
        (self.listed)(&self.root.path.join(dir))
    }
}

/// The most specific root `path` lies in (nested roots own their files).
pub fn root_of(roots: &[Root], path: &Path) -> Option<usize> {
    roots
        .iter()
        .enumerate()
        .filter(|(_, r)| r.relative(path).is_some())
        .max_by_key(|(_, r)| r.path.as_os_str().len())
        .map(|(i, _)| i)
}

/// A path for the ingest stage to look at, with the index of its root.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Absolute path.
    pub path: PathBuf,
    /// Which root it belongs to.
    pub root: usize,
    /// Its identity, when a walk just read it through the root's handle (saves a lookup).
    pub stat: Option<Stat>,
}

/// Candidates sent but not yet handled by the ingest stage, with a notification when that
/// count drops to zero (so `sync` and the catch-up scan wait without polling).
///
/// Events (candidates without a stat: the watcher's, and paths the upload workers send
/// back) are also counted on their own, because handling one can delete an index row (the
/// path is gone, or now a symlink). A walk trusts the index's rows of a directory only if no
/// event was waiting while it read them (see [`walk`]).
#[derive(Debug, Default)]
pub struct Outstanding {
    count: AtomicU64,
    /// Events ever sent, and ever handled (recorded in the index, or given up at shutdown).
    events_sent: AtomicU64,
    events_done: AtomicU64,
    drained: tokio::sync::Notify,
}

impl Outstanding {
    /// Count `handled` as done, once their outcome is in the index; wakes the waiters when
    /// none are left.
    pub fn done(&self, handled: &[Candidate]) {
        let events = handled.iter().filter(|c| c.stat.is_none()).count() as u64;
        self.finish(handled.len() as u64, events);
    }

    fn finish(&self, n: u64, events: u64) {
        self.events_done.fetch_add(events, Ordering::SeqCst);
        if n > 0 && self.count.fetch_sub(n, Ordering::SeqCst) == n {
            self.drained.notify_waiters();
        }
    }

    fn add(&self, event: bool) {
        self.events_sent.fetch_add(event as u64, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Candidates not yet handled.
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// `Some(mark)` if every event sent so far has been handled: index rows read after this
    /// call reflect them. Pass the mark to [`Outstanding::quiet_since`] once the rows are read.
    fn quiet(&self) -> Option<u64> {
        // Sent first: an event sent and handled between the two loads still counts as done.
        let sent = self.events_sent.load(Ordering::SeqCst);
        let done = self.events_done.load(Ordering::SeqCst);
        (done >= sent).then_some(sent)
    }

    /// Whether no event was sent since [`Outstanding::quiet`] returned `mark`.
    fn quiet_since(&self, mark: u64) -> bool {
        self.events_sent.load(Ordering::SeqCst) == mark
    }

    /// Wait until every candidate sent so far has been handled.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The sending side of the ingest queue, counting what has been sent but not yet indexed
/// (so `sync` can tell when the index has caught up). Closing it ([`Feeder::close`]) wakes
/// every sender waiting for room, so shutdown never waits on a full queue.
#[derive(Clone)]
pub struct Feeder {
    tx: mpsc::Sender<Candidate>,
    /// The index walks compare each directory with (see [`walk`]); `None`: every file found
    /// is queued.
    index: Option<Arc<Index>>,
    outstanding: Arc<Outstanding>,
    closed: CancellationToken,
}

impl Feeder {
    /// A new queue holding at most `capacity` candidates, fed by walks that compare with
    /// `index`.
    pub fn new(
        capacity: usize,
        index: Option<Arc<Index>>,
    ) -> (Feeder, mpsc::Receiver<Candidate>, Arc<Outstanding>) {
        let (tx, rx) = mpsc::channel(capacity);
        let outstanding = Arc::new(Outstanding::default());
        (
            Feeder {
                tx,
                index,
                outstanding: outstanding.clone(),
                closed: CancellationToken::new(),
            },
            rx,
            outstanding,
        )
    }

    /// Queue a candidate, waiting for room. Returns false once the ingest stage has stopped
    /// or the feeder was closed.
    pub async fn send(&self, c: Candidate) -> bool {
        if self.closed.is_cancelled() {
            return false;
        }
        let event = c.stat.is_none();
        self.outstanding.add(event);
        let sent = tokio::select! {
            _ = self.closed.cancelled() => false,
            r = self.tx.send(c) => r.is_ok(),
        };
        if !sent {
            self.outstanding.finish(1, event as u64);
        }
        sent
    }

    /// Queue a candidate from a blocking thread.
    pub fn blocking_send(&self, c: Candidate) -> bool {
        futures::executor::block_on(self.send(c))
    }

    /// Refuse further candidates and wake every sender waiting for room (shutdown).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// A token cancelled once the feeder is closed.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// Candidates sent but not yet indexed.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.get()
    }

    /// Wait until every candidate sent so far has been indexed.
    pub async fn drained(&self) {
        self.outstanding.drained().await
    }
}

/// What a walk did: files queued for the ingest stage and files found unchanged (not
/// queued).
#[derive(Debug)]
pub struct Walked {
    /// Files queued (new or changed).
    pub queued: u64,
    /// Files whose identity matched the index: not queued.
    pub unchanged: u64,
    /// False if the walk stopped early (the ingest stage closed).
    pub complete: bool,
}

impl Walked {
    fn new() -> Walked {
        Walked {
            queued: 0,
            unchanged: 0,
            complete: true,
        }
    }
}

/// Walk `dir` (a root or a directory inside root `root_idx`) through the root's handle and
/// queue every regular file the root wants that the index does not hold as it is now: each
/// directory's files are compared with the index's rows for that directory in one range
/// scan ([`Index::files_in_dir`]), instead of one lookup per file in the ingest stage (which
/// would find them unchanged). Files gone from disk are [`sweep_deleted`]'s. Blocking.
pub fn walk(dir: &Path, root_idx: usize, root: &Root, feeder: &Feeder) -> Walked {
    walk_entering(dir, root_idx, root, feeder, &mut |_| true)
}

/// [`walk`], also calling `entering` with each directory (absolute) before it is read: the
/// watcher adds the directory's watch there, so what is created in it later has an event.
/// `entering` returns false to stop the walk (cancelled). Blocking.
pub fn walk_entering(
    dir: &Path,
    root_idx: usize,
    root: &Root,
    feeder: &Feeder,
    entering: &mut dyn FnMut(&Path) -> bool,
) -> Walked {
    let mut out = Walked::new();
    walk_into(dir, root_idx, root, feeder, entering, &mut out);
    out
}

fn walk_into(
    dir: &Path,
    root_idx: usize,
    root: &Root,
    feeder: &Feeder,
    entering: &mut dyn FnMut(&Path) -> bool,
    out: &mut Walked,
) {
    // The wanted files of the directory being listed.
    let files: std::cell::RefCell<Vec<(PathBuf, Stat)>> = Default::default();
    let send = |path: PathBuf, stat: Stat, out: &mut Walked| -> bool {
        let sent = feeder.blocking_send(Candidate {
            path,
            root: root_idx,
            stat: Some(stat),
        });
        out.queued += sent as u64;
        out.complete &= sent;
        sent
    };
    root.walk_with(
        dir,
        entering,
        Some(&mut |path, stat| {
            files.borrow_mut().push((path, stat));
            // Closed (shutdown): stop at once, not at the end of the tree.
            !feeder.closed.is_cancelled()
        }),
        &mut |listed| {
            let mut files = files.borrow_mut();
            if !out.complete {
                files.clear();
                return;
            }
            // Rows are trusted only if no event waited in the queue while they were read:
            // handling one may delete the row of a file this walk would otherwise skip as
            // unchanged, and the file would stay unindexed until the next walk. Otherwise
            // every file goes through the queue behind those events, as if new.
            let quiet = feeder.outstanding.quiet();
            let index = feeder.index.as_ref().filter(|_| quiet.is_some());
            let rows = match index.map(|i| i.files_in_dir(listed)) {
                Some(Ok(rows)) if quiet.is_some_and(|m| feeder.outstanding.quiet_since(m)) => {
                    Some(rows)
                }
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    // Without the rows every file goes to the ingest stage, as if new.
                    tracing::debug!(dir = %listed.display(), error = %format!("{e:#}"), "cannot read a directory's rows from the index");
                    None
                }
                None => None,
            };
            let known: HashMap<&[u8], Stat> = rows
                .iter()
                .flatten()
                .map(|(name, stat)| (name.as_slice(), *stat))
                .collect();
            for (path, stat) in files.drain(..) {
                // Files of a directory whose listing failed part way were never compared:
                // they go to the ingest stage as they are.
                let here = path.parent() == Some(listed);
                let name = path.file_name().map_or(&[][..], |n| n.as_bytes());
                if here && known.get(name).is_some_and(|k| k.same_file(&stat)) {
                    out.unchanged += 1;
                } else if out.complete {
                    send(path, stat, out);
                }
            }
        },
    );
    // The same for files of a last directory whose listing failed part way.
    for (path, stat) in files.into_inner() {
        if !out.complete || !send(path, stat, out) {
            break;
        }
    }
}

/// Look at every root again (a root replaced by a symlink is let go, a new directory opened)
/// and walk those that exist. Blocking.
pub fn walk_all(roots: &[Root], feeder: &Feeder) -> Walked {
    let mut out = Walked::new();
    for (i, r) in roots.iter().enumerate() {
        if r.refresh().is_some() {
            walk_into(&r.path, i, r, feeder, &mut |_| true, &mut out);
        }
    }
    out
}

/// [`walk_all`] and [`sweep_deleted`] side by side on two threads (they read different
/// things: the trees, and the index's rows of files that may be gone). Blocking.
pub fn walk_and_sweep(
    index: &Index,
    roots: &[Root],
    feeder: &Feeder,
) -> (Walked, anyhow::Result<u64>) {
    std::thread::scope(|s| {
        let sweep = std::thread::Builder::new()
            .name("sweep".into())
            .spawn_scoped(s, || sweep_deleted(index, roots));
        let walked = walk_all(roots, feeder);
        let dropped = match sweep {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the sweep thread panicked"))),
            // No thread to be had: sweep here, after the walk.
            Err(_) => sweep_deleted(index, roots),
        };
        (walked, dropped)
    })
}

/// The names of the regular files in the directory `dir` (absolute), listed through the
/// handle of the root it lies in; `None` if it cannot be listed.
fn regular_files_in(roots: &[Root], dir: &Path) -> Option<HashSet<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let root = &roots[root_of(roots, &dir.join("x"))?];
    let rel = dir.strip_prefix(&root.path).ok()?;
    let fd = root.tree.dir()?.open_dir(rel).ok()?;
    let entries = rustix::fs::Dir::read_from(&fd).ok()?;
    Some(
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type() == rustix::fs::FileType::RegularFile)
            .map(|e| OsString::from(std::ffi::OsStr::from_bytes(e.file_name().to_bytes())))
            .collect(),
    )
}

/// Drop index rows of files that are no longer on disk (or no longer wanted). Remote objects
/// are never deleted because a local file was. Blocking. Returns the number dropped.
///
/// Indexed paths come in byte order, so the files of one directory come together: each
/// directory is listed once (names and types from `readdir`, through the root's handle)
/// instead of one `stat` per file.
pub fn sweep_deleted(index: &Index, roots: &[Root]) -> anyhow::Result<u64> {
    let mut after = PathBuf::new();
    let mut dropped = 0;
    // The directory listed last and the regular files in it (`None`: unreadable or gone).
    let mut listed: Option<(PathBuf, Option<HashSet<OsString>>)> = None;
    loop {
        let page = index.paths_from(&after, 4096)?;
        let Some(last) = page.last() else { break };
        after = last.clone();
        let mut gone = Vec::new();
        for p in page {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                continue;
            };
            if listed.as_ref().is_none_or(|(d, _)| d != dir) {
                listed = Some((dir.to_path_buf(), regular_files_in(roots, dir)));
            }
            let root = root_of(roots, &p).map(|i| &roots[i]);
            let present = match listed.as_ref().and_then(|(_, files)| files.as_ref()) {
                Some(files) => files.contains(name),
                // An unlistable directory is not proof of deletion: look at the file itself.
                None => root.is_some_and(|r| matches!(r.kind(&p), Ok(Kind::File(_)))),
            };
            let wanted = root.is_some_and(|r| r.wants(&p));
            if !present || !wanted {
                gone.push(Observation::Gone(p));
            }
        }
        if !gone.is_empty() {
            dropped += gone.len() as u64;
            index.apply(&gone, &[])?;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(prefix: &str) -> Root {
        let w = crate::config::Watch {
            path: "/w".into(),
            prefix: prefix.into(),
            include: vec!["**/*".into()],
            exclude: vec![],
            settle: std::time::Duration::from_millis(10),
            remote_max_age: None,
            one_file_system: true,
            runs: crate::config::Runs::None,
            seal_after: None,
            junit: Vec::new(),
            junit_sniff: false,
            tail: None,
            tail_interval: std::time::Duration::from_secs(2),
        };
        Root {
            path: "/w".into(),
            prefix: prefix.into(),
            filter: Filter::new(&w),
            settle: std::time::Duration::from_millis(10),
            own: vec!["/w/state".into()],
            nested: vec![],
            tree: Arc::new(Tree::new("/w".into(), true)),
            runs: false,
            tail: globset::GlobSet::empty(),
            tail_interval: std::time::Duration::from_secs(2),
            own_ids: Arc::default(),
        }
    }

    /// A root with no filters or own paths at the real directory `top`.
    fn root_at(top: &Path) -> Root {
        let mut r = root("");
        r.path = top.to_path_buf();
        r.tree = Arc::new(Tree::new(top.to_path_buf(), true));
        r.own = vec![];
        r
    }

    /// An index at `state` holding every file of root `r` as a walk finds it now.
    fn indexed_as_walked(r: &Root, state: &Path) -> Arc<Index> {
        let index = Arc::new(Index::open(state).unwrap());
        let mut obs = Vec::new();
        r.walk_files(&r.path, &mut |path, stat| {
            obs.push(Observation::Indexed {
                key: Ok(path.display().to_string()),
                path,
                stat,
                sha256: [1; 32],
            });
            true
        });
        index.apply(&obs, &[]).unwrap();
        index
    }

    #[test]
    fn within_compares_whole_components() {
        assert!(within(Path::new("/w/state"), Path::new("/w/state")));
        assert!(within(Path::new("/w/state/x"), Path::new("/w/state")));
        assert!(within(Path::new("/w/state/x"), Path::new("/w/state/")));
        assert!(!within(Path::new("/w/stateful"), Path::new("/w/state")));
        assert!(!within(Path::new("/w"), Path::new("/w/state")));
        assert!(within(Path::new("/w/x"), Path::new("/")));
    }

    #[test]
    fn keys_join_prefix_and_relative_path() {
        assert_eq!(
            root("a/n1").key_for(Path::new("/w/x/y.log")).unwrap(),
            "a/n1/x/y.log"
        );
        assert_eq!(
            root("").key_for(Path::new("/w/y [1].log")).unwrap(),
            "y [1].log"
        );
        assert!(root("").key_for(Path::new("/other/y")).is_err());
        assert!(root("").wants(Path::new("/w/x")));
        assert!(!root("").wants(Path::new("/w/state/index.sqlite3")));
    }

    #[test]
    fn non_utf8_and_control_names_fail_alone() {
        use std::os::unix::ffi::OsStrExt;
        let bad = Path::new(std::ffi::OsStr::from_bytes(b"/w/bad\xff.log"));
        assert!(root("").key_for(bad).unwrap_err().contains("UTF-8"));
        assert!(root("").key_for(Path::new("/w/a\x01b")).is_err());
        let long = format!("/w/{}", "x".repeat(1100));
        assert!(
            root("")
                .key_for(Path::new(&long))
                .unwrap_err()
                .contains("1024")
        );
    }

    #[test]
    fn a_walk_queues_only_what_the_index_does_not_hold_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("w");
        let r = root_at(&top);
        for rel in ["a/1", "a/2", "a/3", "a/sub/x", "b/1", "c/1"] {
            let p = top.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, rel).unwrap();
        }
        r.refresh();
        let index = indexed_as_walked(&r, &tmp.path().join("state"));
        std::fs::write(top.join("a/2"), "changed size").unwrap();
        std::fs::remove_file(top.join("a/3")).unwrap();
        std::fs::write(top.join("a/4"), "new").unwrap();
        std::fs::remove_dir_all(top.join("c")).unwrap();

        let (feeder, mut rx, _) = Feeder::new(64, Some(index.clone()));
        let walked = walk_all(std::slice::from_ref(&r), &feeder);
        let mut queued: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|c| {
                assert!(c.stat.is_some(), "a walk passes on what it saw");
                c.path.strip_prefix(&top).unwrap().display().to_string()
            })
            .collect();
        queued.sort();
        // Only the changed and the new file; deleted ones are the sweep's.
        assert_eq!(queued, ["a/2", "a/4"]);
        assert_eq!((walked.queued, walked.unchanged), (2, 3));
        assert!(walked.complete);
        assert_eq!(sweep_deleted(&index, &[r]).unwrap(), 2);
        assert_eq!(index.lookup_many(&[&top.join("c/1")]).unwrap(), [None]);
        assert_eq!(index.lookup_many(&[&top.join("a/3")]).unwrap(), [None]);

        // Without an index every file found is queued.
        let (feeder, mut rx, _) = Feeder::new(64, None);
        let r2 = root_at(&top);
        r2.refresh();
        assert_eq!(walk(&top, 0, &r2, &feeder).queued, 5);
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 5);
    }

    #[test]
    fn a_walk_does_not_skip_files_while_an_event_waits_in_the_queue() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("w");
        std::fs::create_dir_all(top.join("d")).unwrap();
        for n in ["1", "2"] {
            std::fs::write(top.join("d").join(n), n).unwrap();
        }
        let r = root_at(&top);
        r.refresh();
        let index = indexed_as_walked(&r, &tmp.path().join("state"));
        let (feeder, mut rx, outstanding) = Feeder::new(64, Some(index.clone()));
        // An event for d/1 is queued (say it was seen through a symlink swapped in for a
        // moment): once handled, it deletes d/1's row. A walk that skipped d/1 as unchanged
        // now would leave it unindexed.
        let event = Candidate {
            path: top.join("d/1"),
            root: 0,
            stat: None,
        };
        assert!(feeder.blocking_send(event));
        let walked = walk(&top, 0, &r, &feeder);
        assert_eq!((walked.queued, walked.unchanged), (2, 0));
        let queued: Vec<Candidate> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            queued.len(),
            3,
            "the event first, then both files behind it"
        );
        assert!(queued[0].stat.is_none());
        outstanding.done(&queued);
        // Nothing waiting: the rows are trusted again.
        let walked = walk(&top, 0, &r, &feeder);
        assert_eq!((walked.queued, walked.unchanged), (0, 2));
    }

    #[test]
    fn sweep_forgets_deleted_files_and_directories_only() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("w");
        let r = root_at(&top);
        let index = Index::open(&tmp.path().join("state")).unwrap();
        let mut obs = Vec::new();
        for rel in ["a/1", "a/2", "a/3", "b/1", "b/2", "c/1", "c/d/1"] {
            let p = top.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, rel).unwrap();
            obs.push(Observation::Indexed {
                path: p,
                key: Ok(rel.into()),
                stat: crate::index::Stat {
                    size: 1,
                    mtime_ns: 1,
                    inode: 1,
                    dev: 0,
                    mode: 0,
                },
                sha256: [1; 32],
            });
        }
        index.apply(&obs, &[]).unwrap();
        std::fs::remove_file(top.join("a/2")).unwrap();
        std::fs::remove_dir_all(top.join("b")).unwrap();
        // A file replaced by a directory is gone as a file.
        std::fs::remove_file(top.join("c/1")).unwrap();
        std::fs::create_dir(top.join("c/1")).unwrap();
        r.refresh();
        assert_eq!(sweep_deleted(&index, &[r]).unwrap(), 4);
        let left: Vec<PathBuf> = index.paths_from(Path::new(""), 100).unwrap();
        let want: Vec<PathBuf> = ["a/1", "a/3", "c/d/1"]
            .iter()
            .map(|p| top.join(p))
            .collect();
        assert_eq!(left, want);
    }
}
