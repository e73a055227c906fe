//! Confined access to a watched tree. The tree is written by CI jobs running code nobody
//! reviewed, so every operation on it (walk, stat, open for hashing and upload, the re-check
//! before a local delete, the delete) works relative to a handle on the watch root's directory
//! and never follows a symbolic link in any path component:
//!
//! - paths are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (plus
//!   `RESOLVE_NO_XDEV` when the watch keeps to one filesystem); where the kernel lacks
//!   `openat2` (before 5.6, or a seccomp filter that hides it) the same guarantee comes from a
//!   walk one component at a time with `O_NOFOLLOW | O_DIRECTORY`;
//! - a walk descends from directory handle to directory handle (`openat` of one name with
//!   `O_NOFOLLOW`), so a directory swapped for a symlink mid-walk is simply not entered;
//! - a local delete re-checks the file with `statx(AT_SYMLINK_NOFOLLOW)` on its verified
//!   parent handle (device, inode, size, mtime) and unlinks with `unlinkat` on that handle.
//!
//! The root itself is resolved once, when the configuration is loaded (an admin's symlinked
//! path keeps working); from then on the agent holds the directory it found. [`Tree::refresh`]
//! notices a root that was deleted, replaced by another directory or by a symlink: a symlink is
//! never followed, a new real directory is opened anew.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;

use crate::index::Stat;

/// A file's or directory's identity: (device, inode).
pub(crate) type Id = (u64, u64);

/// Set once `openat2` turned out to be missing; from then on the component walk is used.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// `O_NONBLOCK`: a FIFO swapped in for a file never blocks the open; `O_NOCTTY`: a terminal
/// never becomes ours.
const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// What a name in the tree is, looked at without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file, with its identity.
    File(Stat),
    /// A directory.
    Dir,
    /// A symlink, FIFO, socket or device, or a path that leads through a symlink or onto
    /// another filesystem: never read.
    Other,
}

fn stat_of(x: &rfs::Statx) -> Stat {
    Stat {
        size: x.stx_size,
        mtime_ns: x
            .stx_mtime
            .tv_sec
            .saturating_mul(1_000_000_000)
            .saturating_add(i64::from(x.stx_mtime.tv_nsec)),
        inode: x.stx_ino,
        dev: rfs::makedev(x.stx_dev_major, x.stx_dev_minor),
        mode: u32::from(x.stx_mode) & 0o7777,
    }
}

fn statx_at(dir: impl AsFd, name: &OsStr) -> io::Result<rfs::Statx> {
    Ok(rfs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )?)
}

fn statx_fd(fd: impl AsFd) -> io::Result<rfs::Statx> {
    Ok(rfs::statx(
        fd,
        "",
        AtFlags::EMPTY_PATH,
        StatxFlags::BASIC_STATS,
    )?)
}

fn kind_of(x: &rfs::Statx) -> Kind {
    match rfs::FileType::from_raw_mode(x.stx_mode.into()) {
        rfs::FileType::RegularFile => Kind::File(stat_of(x)),
        rfs::FileType::Directory => Kind::Dir,
        _ => Kind::Other,
    }
}

/// The identity of whatever `path` names, following links (for the admin's own paths: state
/// directory, key files, `file://` stores).
pub(crate) fn id_of(path: &Path) -> Option<Id> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The errors that mean "the path leads through a symlink, a non-directory or out of the
/// tree": the name is not a file we may read.
fn is_escape(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV)
    )
}

/// The normal components of a relative path, or `EINVAL` for anything else (`..`, `.`, an
/// absolute path): nothing outside the root can even be named.
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect()
}

/// An open watch root.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    id: Id,
    one_file_system: bool,
}

impl RootDir {
    /// Open the directory at the absolute `path`, refusing a symlink in any component
    /// (`path` was resolved when the configuration was loaded, so a symlink now is a swap).
    pub fn open(path: &Path, one_file_system: bool) -> io::Result<RootDir> {
        let fd = if NO_OPENAT2.load(Ordering::Relaxed) {
            open_by_components_from_slash(path)?
        } else {
            match rfs::openat2(
                rfs::CWD,
                path,
                DIR_FLAGS,
                Mode::empty(),
                ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => fd,
                Err(e) if openat2_missing(e) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    open_by_components_from_slash(path)?
                }
                Err(e) => return Err(e.into()),
            }
        };
        let x = statx_fd(&fd)?;
        Ok(RootDir {
            id: (rfs::makedev(x.stx_dev_major, x.stx_dev_minor), x.stx_ino),
            fd,
            one_file_system,
        })
    }

    /// The root directory's identity.
    pub fn id(&self) -> Id {
        self.id
    }

    /// Open `rel` beneath the root with `flags`, following no symlink anywhere.
    fn resolve(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let parts = components(rel)?;
        if parts.is_empty() {
            return Ok(rfs::openat(&self.fd, ".", DIR_FLAGS, Mode::empty())?);
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let mut resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            if self.one_file_system {
                resolve |= ResolveFlags::NO_XDEV;
            }
            match rfs::openat2(&self.fd, rel, flags, Mode::empty(), resolve) {
                Ok(fd) => return Ok(fd),
                Err(e) if openat2_missing(e) => NO_OPENAT2.store(true, Ordering::Relaxed),
                Err(e) => return Err(e.into()),
            }
        }
        self.resolve_by_components(&parts, flags)
    }

    /// The fallback: one component at a time, each opened with `O_NOFOLLOW` (directories
    /// with `O_DIRECTORY`) relative to the handle of the one before.
    fn resolve_by_components(&self, parts: &[&OsStr], flags: OFlags) -> io::Result<OwnedFd> {
        let (last, dirs) = parts
            .split_last()
            .ok_or_else(|| io::Error::from(Errno::INVAL))?;
        let mut cur: Option<OwnedFd> = None;
        for name in dirs {
            let next = rfs::openat(
                cur.as_ref().map_or(self.fd.as_fd(), |f| f.as_fd()),
                *name,
                DIR_FLAGS,
                Mode::empty(),
            )?;
            self.check_dev(&next)?;
            cur = Some(next);
        }
        let fd = rfs::openat(
            cur.as_ref().map_or(self.fd.as_fd(), |f| f.as_fd()),
            *last,
            flags | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        self.check_dev(&fd)?;
        Ok(fd)
    }

    fn check_dev(&self, fd: &OwnedFd) -> io::Result<()> {
        if self.one_file_system {
            let x = statx_fd(fd)?;
            if rfs::makedev(x.stx_dev_major, x.stx_dev_minor) != self.id.0 {
                return Err(Errno::XDEV.into());
            }
        }
        Ok(())
    }

    /// Open the directory `rel` (empty: the root itself).
    pub fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        self.resolve(rel, DIR_FLAGS)
    }

    /// Open the regular file `rel` for reading. A symlink, FIFO, device or a path through a
    /// symlink is refused with `InvalidInput`.
    pub fn open_file(&self, rel: &Path) -> io::Result<(File, Stat)> {
        let fd = self.resolve(rel, FILE_FLAGS).map_err(|e| {
            if is_escape(&e) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file beneath the watch root",
                )
            } else {
                e
            }
        })?;
        match kind_of(&statx_fd(&fd)?) {
            Kind::File(stat) => Ok((File::from(fd), stat)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )),
        }
    }

    /// What `rel` is, without following it or any link on the way to it.
    pub fn kind(&self, rel: &Path) -> io::Result<Kind> {
        let (parent, name) = split(rel)?;
        let dir = match self.open_dir(parent) {
            Ok(d) => d,
            Err(e) if is_escape(&e) => return Ok(Kind::Other),
            Err(e) => return Err(e),
        };
        let x = statx_at(&dir, name)?;
        if self.one_file_system
            && x.stx_mode & (libc::S_IFMT as u16) == libc::S_IFDIR as u16
            && rfs::makedev(x.stx_dev_major, x.stx_dev_minor) != self.id.0
        {
            return Ok(Kind::Other);
        }
        Ok(kind_of(&x))
    }

    /// Delete the regular file `rel` if it is still exactly `expected` (device, inode, size,
    /// mtime), checked on its parent's handle right before `unlinkat` on the same handle.
    /// Returns whether it was deleted.
    pub fn remove_if_unchanged(&self, rel: &Path, expected: &Stat) -> io::Result<bool> {
        let (parent, name) = split(rel)?;
        let dir = match self.open_dir(parent) {
            Ok(d) => d,
            Err(e) if is_escape(&e) || e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let x = match statx_at(&dir, name) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match kind_of(&x) {
            Kind::File(now) if now.same_file(expected) => {}
            _ => return Ok(false),
        }
        rfs::unlinkat(&dir, name, AtFlags::empty())?;
        Ok(true)
    }

    /// Remove the directory `rel` and every directory under it that holds no file, deepest
    /// first, each by `unlinkat(AT_REMOVEDIR)` on its parent's handle (reached from the root's
    /// handle without following links). A directory that holds anything else stays, and so do
    /// its parents: `rmdir` never deletes a file. Returns the directories removed.
    pub fn remove_empty_dirs(&self, rel: &Path) -> io::Result<u64> {
        let (parent, name) = split(rel)?;
        let parent = match self.open_dir(parent) {
            Ok(d) => d,
            Err(e) if is_escape(&e) || e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        remove_empty_at(&parent, name, 0)
    }

    /// The names of the real directories (not links) directly under the root.
    pub fn subdirectories(&self) -> io::Result<Vec<std::ffi::OsString>> {
        let fd = self.open_dir(Path::new(""))?;
        let mut out = Vec::new();
        for entry in rfs::Dir::read_from(&fd)? {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if entry.file_type() == rfs::FileType::Directory && name != "." && name != ".." {
                out.push(name.to_os_string());
            }
        }
        Ok(out)
    }

    /// Walk the directory `rel` (empty: the whole root) depth-first, calling `visit` with the
    /// relative path and identity of every regular file. Directories and files whose identity
    /// is in `own`, directories named in `skip` (nested watch roots), other filesystems (with
    /// `one_file_system`) and anything that is not a directory or regular file are passed
    /// over. `visit` returns false to stop. Unreadable parts are logged and skipped.
    ///
    /// The files of one directory are visited one after the other, and `listed` is called with
    /// the directory once every entry of it was read (not for one whose listing failed part
    /// way), so a caller can compare each directory as a whole.
    pub fn walk(
        &self,
        rel: &Path,
        own: &[Id],
        skip: &[PathBuf],
        visit: &mut dyn FnMut(PathBuf, Stat) -> bool,
        listed: &mut dyn FnMut(&Path),
    ) {
        self.walk_with(rel, own, skip, &mut Closures { visit, listed });
    }

    /// [`RootDir::walk`], told to a [`Visit`]: also as each directory is entered (before it
    /// is read), and with the files left out when they are not wanted.
    pub fn walk_with(&self, rel: &Path, own: &[Id], skip: &[PathBuf], v: &mut dyn Visit) {
        let start = match self.open_dir(rel) {
            Ok(fd) => fd,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound && !is_escape(&e) {
                    tracing::warn!(path = %rel.display(), error = %e, "cannot open a directory of a watched tree");
                }
                return;
            }
        };
        let files = v.wants_files();
        let mut stack = vec![(start, rel.to_path_buf())];
        while let Some((fd, dir_rel)) = stack.pop() {
            if !v.entering(&dir_rel) {
                return;
            }
            let entries = match rfs::Dir::read_from(&fd) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(path = %dir_rel.display(), error = %e, "cannot read a directory of a watched tree");
                    continue;
                }
            };
            let mut complete = true;
            for entry in entries {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(path = %dir_rel.display(), error = %e, "cannot read a directory of a watched tree");
                        complete = false;
                        break;
                    }
                };
                let name = OsStr::from_bytes(entry.file_name().to_bytes());
                if name == "." || name == ".." {
                    continue;
                }
                let child = dir_rel.join(name);
                match entry.file_type() {
                    rfs::FileType::Directory => {
                        if skip.contains(&child) {
                            continue;
                        }
                        let sub = match rfs::openat(&fd, name, DIR_FLAGS, Mode::empty()) {
                            Ok(sub) => sub,
                            // Gone, or swapped for a symlink since it was listed.
                            Err(_) => continue,
                        };
                        let Ok(x) = statx_fd(&sub) else { continue };
                        let id = (rfs::makedev(x.stx_dev_major, x.stx_dev_minor), x.stx_ino);
                        if own.contains(&id) || (self.one_file_system && id.0 != self.id.0) {
                            continue;
                        }
                        stack.push((sub, child));
                    }
                    rfs::FileType::RegularFile if !files => {}
                    rfs::FileType::RegularFile | rfs::FileType::Unknown => {
                        let Ok(x) = statx_at(&fd, name) else { continue };
                        if let Kind::File(stat) = kind_of(&x) {
                            if !files || own.contains(&(stat.dev, stat.inode)) {
                                continue;
                            }
                            if !v.file(child, stat) {
                                return;
                            }
                        } else if matches!(kind_of(&x), Kind::Dir) {
                            // A filesystem without d_type: look at it as a directory.
                            let Ok(sub) = rfs::openat(&fd, name, DIR_FLAGS, Mode::empty()) else {
                                continue;
                            };
                            let id = (stat_of(&x).dev, x.stx_ino);
                            if own.contains(&id)
                                || (self.one_file_system && id.0 != self.id.0)
                                || skip.contains(&child)
                            {
                                continue;
                            }
                            stack.push((sub, child));
                        }
                    }
                    _ => {}
                }
            }
            if complete {
                v.listed(&dir_rel);
            }
        }
    }
}

/// What a walk ([`RootDir::walk_with`]) tells as it goes; every path is relative to the root.
pub trait Visit {
    /// The directory `dir` is open and about to be read: what is created in it from now on
    /// is read by this walk or comes after. False stops the walk (a cancelled walk).
    fn entering(&mut self, _dir: &Path) -> bool {
        true
    }
    /// Whether regular files are wanted (a `statx` each); without them only the directories
    /// are walked.
    fn wants_files(&self) -> bool {
        true
    }
    /// A regular file and its identity; false stops the walk.
    fn file(&mut self, _rel: PathBuf, _stat: Stat) -> bool {
        true
    }
    /// Every entry of `dir` was read (its wanted files were visited just before).
    fn listed(&mut self, _dir: &Path) {}
}

/// The two closures of [`RootDir::walk`] as a [`Visit`].
struct Closures<'a> {
    visit: &'a mut dyn FnMut(PathBuf, Stat) -> bool,
    listed: &'a mut dyn FnMut(&Path),
}

impl Visit for Closures<'_> {
    fn file(&mut self, rel: PathBuf, stat: Stat) -> bool {
        (self.visit)(rel, stat)
    }
    fn listed(&mut self, dir: &Path) {
        (self.listed)(dir)
    }
}

fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    components(rel)?;
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", rel.display()),
        )),
    }
}

/// `ENOSYS` (kernel before 5.6) or `EPERM` (a seccomp filter that refuses what it does not
/// know) from `openat2`.
fn openat2_missing(e: Errno) -> bool {
    e == Errno::NOSYS || e == Errno::PERM
}

fn open_by_components_from_slash(path: &Path) -> io::Result<OwnedFd> {
    let slash = rfs::openat(rfs::CWD, "/", DIR_FLAGS, Mode::empty())?;
    let rel = path.strip_prefix("/").map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not absolute", path.display()),
        )
    })?;
    let mut cur = slash;
    for name in components(rel)? {
        cur = rfs::openat(&cur, name, DIR_FLAGS, Mode::empty())?;
    }
    Ok(cur)
}

/// Why a watch root cannot be used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Absent {
    Missing,
    NotADirectory,
}

/// A watch root: its path (resolved when the configuration was loaded) and the directory the
/// agent holds, shared by the watcher, the scanner, ingest, upload and cleanup.
#[derive(Debug)]
pub struct Tree {
    path: PathBuf,
    one_file_system: bool,
    state: Mutex<(Option<Arc<RootDir>>, Option<Absent>)>,
}

impl Tree {
    /// A root not opened yet; [`Tree::refresh`] opens it.
    pub fn new(path: PathBuf, one_file_system: bool) -> Tree {
        Tree {
            path,
            one_file_system,
            state: Mutex::new((None, None)),
        }
    }

    /// Whether the root's path, when last looked at, existed but was not a real directory
    /// (a symlink, a file): refused, not waited for silently.
    pub fn refused(&self) -> bool {
        self.lock().1 == Some(Absent::NotADirectory)
    }

    /// The directory held now, without looking at the path again.
    pub fn dir(&self) -> Option<Arc<RootDir>> {
        self.lock().0.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<Arc<RootDir>>, Option<Absent>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Look at the root's path again: keep the held directory if it is still the one there,
    /// open a new real directory that replaced it, and let go of one that is gone or was
    /// replaced by a symlink or a file (never followed; a warning names it, once).
    pub fn refresh(&self) -> Option<Arc<RootDir>> {
        {
            // The common case, cheaply: the path still names the directory we hold. A stat
            // (not followed) opens nothing, so the root's own inotify watch sees no event.
            use std::os::unix::fs::MetadataExt;
            let st = self.lock();
            if let (Some(held), Ok(m)) = (&st.0, std::fs::symlink_metadata(&self.path))
                && m.is_dir()
                && (m.dev(), m.ino()) == held.id
            {
                return Some(held.clone());
            }
        }
        let opened = RootDir::open(&self.path, self.one_file_system);
        let mut st = self.lock();
        match opened {
            Ok(dir) => {
                if st.0.as_ref().is_some_and(|held| held.id == dir.id) {
                    return st.0.clone();
                }
                if st.0.is_some() {
                    tracing::warn!(root = %self.path.display(), "watch root was replaced by another directory; watching the new one");
                }
                *st = (Some(Arc::new(dir)), None);
                st.0.clone()
            }
            Err(e) => {
                let why = if e.kind() == io::ErrorKind::NotFound {
                    Absent::Missing
                } else {
                    Absent::NotADirectory
                };
                if st.1 != Some(why) {
                    match why {
                        Absent::Missing if st.0.is_none() => {
                            tracing::info!(root = %self.path.display(), "watch root does not exist yet; waiting for it")
                        }
                        Absent::Missing => {
                            tracing::warn!(root = %self.path.display(), "watch root disappeared; waiting for it")
                        }
                        Absent::NotADirectory => {
                            tracing::warn!(root = %self.path.display(), error = %e, "watch root is not a real directory (a symlink is never followed); waiting until it is one again")
                        }
                    }
                }
                *st = (None, Some(why));
                None
            }
        }
    }
}

/// Deepest directories nested under a run that [`RootDir::remove_empty_dirs`] descends into.
const MAX_EMPTY_DEPTH: usize = 256;

/// Remove the directory `name` in `parent` if, once its own empty subdirectories are gone, it
/// is empty. Links are never followed (`O_NOFOLLOW` on every open).
fn remove_empty_at(parent: &OwnedFd, name: &OsStr, depth: usize) -> io::Result<u64> {
    if depth > MAX_EMPTY_DEPTH {
        return Ok(0);
    }
    let dir = match rfs::openat(parent, name, DIR_FLAGS, rfs::Mode::empty()) {
        Ok(d) => d,
        // Gone, a link, or not a directory: nothing to remove.
        Err(Errno::NOENT | Errno::LOOP | Errno::NOTDIR) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut subdirs = Vec::new();
    for entry in rfs::Dir::read_from(&dir)? {
        let entry = entry?;
        let n = OsStr::from_bytes(entry.file_name().to_bytes());
        if entry.file_type() == rfs::FileType::Directory && n != "." && n != ".." {
            subdirs.push(n.to_os_string());
        }
    }
    let mut removed = 0;
    for sub in subdirs {
        removed += remove_empty_at(&dir, &sub, depth + 1)?;
    }
    match rfs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) => Ok(removed + 1),
        Err(Errno::NOTEMPTY | Errno::EXIST | Errno::NOENT | Errno::BUSY) => Ok(removed),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fresh() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "secret").unwrap();
        std::fs::write(root.join("d/ok"), "ok").unwrap();
        (tmp, root, outside)
    }

    fn both_ways(f: impl Fn()) {
        NO_OPENAT2.store(false, Ordering::Relaxed);
        f();
        NO_OPENAT2.store(true, Ordering::Relaxed);
        f();
        NO_OPENAT2.store(false, Ordering::Relaxed);
    }

    #[test]
    fn modes_are_walked_beneath_the_root_without_following_links() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, root, outside) = fresh();
        std::fs::set_permissions(root.join("d/ok"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::fs::write(root.join("top"), "t").unwrap();
        std::fs::set_permissions(root.join("top"), std::fs::Permissions::from_mode(0o755)).unwrap();
        symlink(outside.join("secret"), root.join("d/link")).unwrap();
        symlink(&outside, root.join("out")).unwrap();
        both_ways(|| {
            // The walk reports each file's mode with its identity (a seal's manifest takes
            // it from there); links are neither followed nor reported.
            let dir = RootDir::open(&root, true).unwrap();
            let mut got = Vec::new();
            dir.walk(
                Path::new(""),
                &[],
                &[],
                &mut |rel, stat| {
                    got.push((rel, stat.mode));
                    true
                },
                &mut |_| {},
            );
            got.sort();
            assert_eq!(
                got,
                [
                    (PathBuf::from("d/ok"), 0o640),
                    (PathBuf::from("top"), 0o755)
                ]
            );
        });
    }

    #[test]
    fn no_symlink_in_any_component_is_followed() {
        let (_tmp, root, outside) = fresh();
        symlink(&outside, root.join("link")).unwrap();
        symlink(outside.join("secret"), root.join("d/file-link")).unwrap();
        both_ways(|| {
            let dir = RootDir::open(&root, true).unwrap();
            assert!(dir.open_file(Path::new("d/ok")).is_ok());
            for p in [
                "link/secret",
                "d/file-link",
                "../outside/secret",
                "/etc/passwd",
            ] {
                assert!(dir.open_file(Path::new(p)).is_err(), "{p} opened");
            }
            assert_eq!(dir.kind(Path::new("link/secret")).unwrap(), Kind::Other);
            assert_eq!(dir.kind(Path::new("d/file-link")).unwrap(), Kind::Other);
            assert!(matches!(
                dir.kind(Path::new("d/ok")).unwrap(),
                Kind::File(_)
            ));
            let mut seen = Vec::new();
            dir.walk(
                Path::new(""),
                &[],
                &[],
                &mut |p, _| {
                    seen.push(p);
                    true
                },
                &mut |_| {},
            );
            assert_eq!(seen, vec![PathBuf::from("d/ok")]);
        });
    }

    #[test]
    fn a_symlinked_root_is_refused_and_delete_checks_identity() {
        let (tmp, root, outside) = fresh();
        let alias = tmp.path().join("alias");
        symlink(&outside, &alias).unwrap();
        assert!(RootDir::open(&alias, true).is_err());
        let dir = RootDir::open(&root, true).unwrap();
        let Kind::File(stat) = dir.kind(Path::new("d/ok")).unwrap() else {
            panic!("not a file")
        };
        let mut other = stat;
        other.size += 1;
        assert!(!dir.remove_if_unchanged(Path::new("d/ok"), &other).unwrap());
        assert!(root.join("d/ok").exists());
        // The parent swapped for a symlink to a directory holding a file of that name.
        std::fs::rename(root.join("d"), tmp.path().join("moved")).unwrap();
        symlink(tmp.path().join("moved"), root.join("d")).unwrap();
        assert!(!dir.remove_if_unchanged(Path::new("d/ok"), &stat).unwrap());
        assert!(tmp.path().join("moved/ok").exists());
        std::fs::remove_file(root.join("d")).unwrap();
        std::fs::rename(tmp.path().join("moved"), root.join("d")).unwrap();
        assert!(dir.remove_if_unchanged(Path::new("d/ok"), &stat).unwrap());
        assert!(!root.join("d/ok").exists());
    }

    /// Random sequences of mkdir, symlink (to inside and outside), rename and exchange
    /// against a root, interleaved with opens: every file opened lies beneath the root (its
    /// descriptor's path, read back from /proc, is under the root). The operations themselves
    /// go through links by path, so outside files may be moved in: those are then inside.
    #[test]
    fn property_every_opened_file_lies_beneath_the_root() {
        let (tmp, root, outside) = fresh();
        let real_root = std::fs::canonicalize(&root).unwrap();
        for i in 0..20 {
            std::fs::write(outside.join(format!("f{i}")), "outside").unwrap();
        }
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("sub/f0"), "outside").unwrap();
        let names = ["a", "b", "c", "f0", "f1", "sub"];
        let mut rng = fastrand::Rng::with_seed(
            std::env::var("PANOPTIC_PROPTEST_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0x5eed),
        );
        for round in 0..4 {
            NO_OPENAT2.store(round % 2 == 1, Ordering::Relaxed);
            let dir = RootDir::open(&root, true).unwrap();
            for _ in 0..600 {
                let depth = rng.usize(1..4);
                let rel: PathBuf = (0..depth)
                    .map(|_| names[rng.usize(..names.len())])
                    .collect();
                let target = root.join(&rel);
                match rng.u8(..7) {
                    0 => {
                        let _ = std::fs::create_dir_all(&target);
                    }
                    1 => {
                        let _ = std::fs::write(&target, "inside");
                    }
                    2 => {
                        let _ = symlink(&outside, &target);
                    }
                    3 => {
                        let _ = symlink(outside.join("f0"), &target);
                    }
                    4 => {
                        let other: PathBuf = (0..depth)
                            .map(|_| names[rng.usize(..names.len())])
                            .collect();
                        let _ = std::fs::rename(&target, root.join(other));
                    }
                    5 => {
                        let _ = std::fs::remove_file(&target);
                    }
                    _ => {
                        let other: PathBuf = (0..depth)
                            .map(|_| names[rng.usize(..names.len())])
                            .collect();
                        let _ = rfs::renameat_with(
                            rfs::CWD,
                            &target,
                            rfs::CWD,
                            root.join(other),
                            rfs::RenameFlags::EXCHANGE,
                        );
                    }
                }
                let mut opened = Vec::new();
                if let Ok((f, _)) = dir.open_file(&rel) {
                    opened.push(f);
                }
                dir.walk(
                    Path::new(""),
                    &[],
                    &[],
                    &mut |p, _| {
                        if let Ok((f, _)) = dir.open_file(&p) {
                            opened.push(f);
                        }
                        opened.len() < 64
                    },
                    &mut |_| {},
                );
                for f in opened {
                    use std::os::fd::AsRawFd;
                    let at =
                        std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
                    assert!(
                        at.starts_with(&real_root),
                        "opened {} outside the root",
                        at.display()
                    );
                }
            }
        }
        NO_OPENAT2.store(false, Ordering::Relaxed);
        drop(tmp);
    }
}
