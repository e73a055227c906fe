//! Per-file metadata of plain objects in `file://` stores, kept on the stored file itself (as
//! rclone's local backend does; no sidecar objects): its mode and mtime are the original's,
//! and a shortened long name ([`crate::format::layout`]) keeps the full name in an extended attribute.
//! Encrypted objects keep all of this inside the encryption instead.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use crate::format::layout::LONGNAME_XATTR;

/// What a stored file says about its original.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileMeta {
    /// Permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// The full last segment of a shortened long name.
    pub long_name: Option<String>,
}

/// Give the stored file at `path` the original's mode and mtime (and long name). With `sync`,
/// also make them durable before returning: a store that syncs each object (`sync = "each"`)
/// has already synced the object's bytes, and a crash must not leave it without the mode,
/// mtime or full name that `restore` applies (a store syncing in batches covers them with its
/// next `syncfs`).
pub(crate) fn apply(path: &Path, meta: &FileMeta, sync: bool) -> std::io::Result<()> {
    let file = open_stored(path)?;
    if let Some(name) = &meta.long_name {
        rustix::fs::fsetxattr(
            &file,
            LONGNAME_XATTR,
            name.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(|e| {
            std::io::Error::other(format!(
                "cannot keep the full name of {} in an extended attribute (the name is too long to store as is): {e}",
                path.display()
            ))
        })?;
    }
    let mtime = if meta.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(meta.mtime_ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(meta.mtime_ns.unsigned_abs())
    };
    file.set_modified(mtime)?;
    file.set_permissions(std::fs::Permissions::from_mode(meta.mode & 0o7777))?;
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

/// Read back what [`apply`] recorded on the stored file at `path`.
pub(crate) fn read(path: &Path) -> std::io::Result<FileMeta> {
    let file = open_stored(path)?;
    let m = file.metadata()?;
    let mut buf = vec![0u8; 1024];
    let long_name = match rustix::fs::fgetxattr(&file, LONGNAME_XATTR, &mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    };
    Ok(FileMeta {
        mode: m.mode() & 0o7777,
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        long_name,
    })
}

/// Open a stored object without following a link in its place (a link swapped in after the
/// write must not lend its target our mode and mtime), and only if it is a regular file.
fn open_stored(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} in the store is not a regular file", path.display()),
        ));
    }
    Ok(file)
}
