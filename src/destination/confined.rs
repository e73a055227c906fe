//! A `file://` store that follows no symbolic link beneath its directory.
//!
//! object_store's `LocalFileSystem` opens `<dir>/<key>` by path, so a symlink planted inside
//! the store (by anyone who can write there) redirected uploads outside it and let a restore
//! copy `/etc`. Every operation here first resolves the object's parent directory (and, for
//! reads, the object itself) beneath the store's directory with the tree's confinement
//! (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or a walk with `O_NOFOLLOW`), and
//! refuses the key, naming it, when that meets a link; then `LocalFileSystem` does the I/O.
//! Directories it creates for a new key are real ones. What remains is the window between
//! the check and `LocalFileSystem`'s own open: a writer of the store who swaps a directory for
//! a link in exactly that moment (docs/RELIABILITY.md, "Residual").
//! Listings do not come through here: the `list` module walks the store without following
//! links.

use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use crate::tree::{Kind, RootDir};

/// `LocalFileSystem` behind a confinement check.
#[derive(Debug, Clone)]
pub(crate) struct ConfinedLocal {
    inner: Arc<LocalFileSystem>,
    dir: Arc<PathBuf>,
    root: Arc<RootDir>,
}

impl std::fmt::Display for ConfinedLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfinedLocal({})", self.dir.display())
    }
}

impl ConfinedLocal {
    /// Confine `inner`, whose directory is `dir` (as object_store canonicalised it).
    pub(crate) fn new(inner: Arc<LocalFileSystem>, dir: &FsPath) -> io::Result<ConfinedLocal> {
        let dir = std::fs::canonicalize(dir)?;
        Ok(ConfinedLocal {
            root: Arc::new(RootDir::open(&dir, false)?),
            inner,
            dir: Arc::new(dir),
        })
    }

    /// The object's path relative to the store's directory.
    fn relative(&self, location: &Path) -> Result<PathBuf> {
        let full = self.inner.path_to_filesystem(location)?;
        full.strip_prefix(self.dir.as_path())
            .map(FsPath::to_path_buf)
            .map_err(|_| refused(location, "maps outside the store's directory"))
    }

    /// The object's parent directories are real directories beneath the store (those that
    /// exist: the rest will be created as directories).
    fn check_parent(&self, location: &Path) -> Result<()> {
        let rel = self.relative(location)?;
        let mut dir = rel.parent();
        while let Some(d) = dir {
            match self.root.open_dir(d) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc_enoent()) => dir = d.parent(),
                Err(e) => {
                    return Err(refused(
                        location,
                        &format!(
                            "{} is not a directory beneath the store ({e}): a symbolic link is never followed",
                            d.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The object itself is not a symbolic link (nor anything but a regular file), and its
    /// parents are real directories. A missing object passes (the store says NotFound).
    fn check_object(&self, location: &Path) -> Result<()> {
        self.check_parent(location)?;
        let rel = self.relative(location)?;
        match self.root.kind(&rel) {
            Ok(Kind::File(_)) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc_enoent()) => Ok(()),
            Ok(_) => Err(refused(
                location,
                "is not a regular file (a symbolic link is never followed)",
            )),
            Err(e) => Err(refused(location, &e.to_string())),
        }
    }
}

fn libc_enoent() -> i32 {
    rustix::io::Errno::NOENT.raw_os_error()
}

fn refused(location: &Path, why: &str) -> object_store::Error {
    object_store::Error::PermissionDenied {
        path: location.to_string(),
        source: format!("{location} in a file:// store: {why}").into(),
    }
}

#[async_trait]
impl ObjectStore for ConfinedLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check_parent(location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check_parent(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check_object(location)?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        // Each key is checked as it comes; a refused one fails alone.
        let this = self.clone();
        let checked = locations.map(move |l| {
            let l = l?;
            this.check_parent(&l)?;
            Ok(l)
        });
        self.inner.delete_stream(checked.boxed())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check_object(from)?;
        self.check_parent(to)?;
        self.inner.copy_opts(from, to, options).await
    }
}
