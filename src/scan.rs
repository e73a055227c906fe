//! The watched trees: their roots, filters and key prefixes, the walk that feeds every file in a
//! tree to the ingest stage (start-up catch-up, periodic reconcile, new directories, rescans
//! after lost events), and the sweep that drops index rows of files deleted from disk.
//!
//! The walk never follows symbolic links and only looks at metadata; unchanged files are
//! recognised by the ingest stage from (size, mtime, inode) and never read again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;

use crate::config::{Config, Filter};
use crate::index::{Index, Observation};

/// S3's limit on key length, in bytes.
const MAX_KEY_BYTES: usize = 1024;

/// One watched tree.
#[derive(Debug, Clone)]
pub struct Root {
    /// Absolute root directory.
    pub path: PathBuf,
    /// Key prefix with `{node}` expanded; may be empty.
    pub prefix: String,
    /// Include/exclude globs.
    pub filter: Filter,
    /// Quiet time after which a file counts as complete.
    pub settle: std::time::Duration,
    /// Our own directories (state, file:// stores) that must never be uploaded, even when
    /// they lie inside a watched tree.
    pub own: Vec<PathBuf>,
}

impl Root {
    /// The roots of a configuration, in order.
    pub fn from_config(cfg: &Config) -> Vec<Root> {
        let mut own = vec![cfg.state_dir.clone()];
        own.extend(
            cfg.destinations()
                .filter_map(|d| (d.url.scheme() == "file").then(|| d.url.to_file_path().ok())?),
        );
        cfg.watch
            .iter()
            .map(|w| Root {
                path: w.path.clone(),
                prefix: w.prefix.replace("{node}", &cfg.node_id),
                filter: Filter::new(w),
                settle: std::time::Duration::from_millis(w.settle_ms),
                own: own.clone(),
            })
            .collect()
    }

    /// The path relative to this root, if it is inside it.
    pub fn relative<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        path.strip_prefix(&self.path)
            .ok()
            .filter(|r| !r.as_os_str().is_empty())
    }

    /// Whether a file at `path` is one to upload (inside the root and matching the filters).
    pub fn wants(&self, path: &Path) -> bool {
        self.relative(path).is_some_and(|r| self.filter.matches(r))
            && !self.own.iter().any(|o| path.starts_with(o))
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

/// A path for the ingest stage to look at, with the index of its root.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Absolute path.
    pub path: PathBuf,
    /// Which root it belongs to.
    pub root: usize,
}

/// The sending side of the ingest queue, counting what has been sent but not yet indexed
/// (so `sync` can tell when the index has caught up).
#[derive(Clone)]
pub struct Feeder {
    tx: mpsc::Sender<Candidate>,
    outstanding: Arc<AtomicU64>,
}

impl Feeder {
    /// A new queue holding at most `capacity` candidates.
    pub fn new(capacity: usize) -> (Feeder, mpsc::Receiver<Candidate>, Arc<AtomicU64>) {
        let (tx, rx) = mpsc::channel(capacity);
        let outstanding = Arc::new(AtomicU64::new(0));
        (
            Feeder {
                tx,
                outstanding: outstanding.clone(),
            },
            rx,
            outstanding,
        )
    }

    /// Queue a candidate, waiting for room. Returns false once the ingest stage has stopped.
    pub async fn send(&self, c: Candidate) -> bool {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(c).await.is_err() {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Queue a candidate from a blocking thread.
    pub fn blocking_send(&self, c: Candidate) -> bool {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        if self.tx.blocking_send(c).is_err() {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Candidates sent but not yet indexed.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::SeqCst)
    }
}

/// Walk `dir` (a root or a directory inside root `root_idx`) and queue every regular file the
/// root wants. Blocking. Returns the number of files queued.
pub fn walk(dir: &Path, root_idx: usize, root: &Root, feeder: &Feeder) -> u64 {
    let mut n = 0;
    for entry in walkdir::WalkDir::new(dir).follow_links(false) {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // Vanished or unreadable directories are normal in a live tree.
                if e.io_error().map(|io| io.kind()) != Some(std::io::ErrorKind::NotFound) {
                    tracing::warn!(path = ?e.path(), error = %e, "cannot read part of a watched tree");
                }
                continue;
            }
        };
        if entry.file_type().is_file() && root.wants(entry.path()) {
            if !feeder.blocking_send(Candidate {
                path: entry.into_path(),
                root: root_idx,
            }) {
                break;
            }
            n += 1;
        }
    }
    n
}

/// Walk every existing root. Blocking.
pub fn walk_all(roots: &[Root], feeder: &Feeder) -> u64 {
    roots
        .iter()
        .enumerate()
        .filter(|(_, r)| r.path.is_dir())
        .map(|(i, r)| walk(&r.path, i, r, feeder))
        .sum()
}

/// Drop index rows of files that are no longer on disk (or no longer wanted). Remote objects
/// are never deleted because a local file was. Blocking. Returns the number dropped.
///
/// Indexed paths come in byte order, so the files of one directory come together: each
/// directory is listed once (names and types from `readdir`) instead of one `stat` per file.
pub fn sweep_deleted(index: &Index, roots: &[Root]) -> anyhow::Result<u64> {
    use std::collections::HashSet;
    use std::ffi::OsString;
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
                let files = std::fs::read_dir(dir).ok().map(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                        .map(|e| e.file_name())
                        .collect::<HashSet<OsString>>()
                });
                listed = Some((dir.to_path_buf(), files));
            }
            let present = listed
                .as_ref()
                .and_then(|(_, files)| files.as_ref())
                .is_some_and(|files| files.contains(name));
            // An unreadable directory is not proof of deletion: check the file itself.
            let unreadable = listed.as_ref().is_some_and(|(_, files)| files.is_none());
            let present = present
                || (unreadable
                    && std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_file()));
            if !present || !roots.iter().any(|r| r.wants(&p)) {
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
            settle_ms: 10,
            remote_max_age: None,
        };
        Root {
            path: "/w".into(),
            prefix: prefix.into(),
            filter: Filter::new(&w),
            settle: std::time::Duration::from_millis(10),
            own: vec!["/w/state".into()],
        }
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
    fn sweep_forgets_deleted_files_and_directories_only() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("w");
        let mut r = root("");
        r.path = top.clone();
        r.own = vec![];
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
        assert_eq!(sweep_deleted(&index, &[r]).unwrap(), 4);
        let left: Vec<PathBuf> = index.paths_from(Path::new(""), 100).unwrap();
        let want: Vec<PathBuf> = ["a/1", "a/3", "c/d/1"]
            .iter()
            .map(|p| top.join(p))
            .collect();
        assert_eq!(left, want);
    }
}
