//! Runs: with `runs = "dir"` on a watch, each top-level directory under its root is one run.
//!
//! `seal DIR` waits (with `flush`'s machinery) until every file now under the run is in every
//! destination, then writes the run's manifest, `<prefix>/<run>/_run/manifest.json`, to every
//! destination through the pipeline like any object (compressed and encrypted as configured;
//! the stored key follows [`crate::format::layout`]) and records the seal in the index. The manifest
//! (schema in docs/FORMAT.md) lists every file with size, SHA-256, mtime, mode, content type
//! and stored key, plus the CI context read from the job's environment and the labels.
//! `restore --run` restores exactly the manifest's files and checks each against it; `runs`
//! compares the index with the manifest kept in the index to show runs changed after a seal.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use object_store::{Attribute, Attributes, ObjectStoreExt, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, Runs};
use crate::destination::{self, Destination};
use crate::format::ci::{Ci, ci_context};
use crate::format::layout;
use crate::format::manifest::{
    MANIFEST_FORMAT, MANIFEST_NAME, Manifest, ManifestFile, RUN_DIR, RunSummary, Totals,
};
use crate::index::Index;
use crate::pipeline::{self, Finish, Meta, Pipeline};
use crate::scan::Root;
use crate::sync::FlushSummary;
use crate::sync::Flushed;

pub(crate) mod page;

/// Largest manifest `restore --run` reads.
const MAX_MANIFEST: u64 = 256 * 1024 * 1024;
/// Files restored at once.
const CONCURRENCY: usize = 8;

/// A mistake in what was asked (exit code 2): not a run directory, a bad label, no such run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);

/// A run directory of a `runs = "dir"` watch.
#[derive(Debug, Clone)]
pub(crate) struct RunDir {
    /// Run name.
    pub name: String,
    /// The directory (under the watch root as configured).
    pub path: PathBuf,
    /// Index of the watch in the configuration.
    pub watch: usize,
}

fn run_watches(config: &Config) -> impl Iterator<Item = (usize, &crate::config::Watch)> {
    config
        .watch
        .iter()
        .enumerate()
        .filter(|(_, w)| w.runs == Runs::Dir)
}

/// Whether `name` can name a run (one path segment, UTF-8, not the agent's own).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name != crate::format::layout::INTERNAL_PREFIX
}

/// The run `dir` is, or why it is none.
pub(crate) fn locate(config: &Config, dir: &Path) -> Result<RunDir, UsageError> {
    let real = dir
        .canonicalize()
        .map_err(|e| UsageError(format!("{}: {e}", dir.display())))?;
    if !real.is_dir() {
        return Err(UsageError(format!("{} is not a directory", dir.display())));
    }
    let (parent, name) = match (real.parent(), real.file_name().and_then(|n| n.to_str())) {
        (Some(p), Some(n)) if valid_name(n) => (p, n),
        _ => {
            return Err(UsageError(format!(
                "{} cannot be a run (its name must be one UTF-8 path segment)",
                dir.display()
            )));
        }
    };
    for (i, w) in run_watches(config) {
        // The root as resolved at load: a root replaced by a symlink since is no match.
        if w.path == parent {
            return Ok(RunDir {
                name: name.to_string(),
                path: w.path.join(name),
                watch: i,
            });
        }
    }
    Err(UsageError(format!(
        "{} is not a run directory: it must be a top-level directory under the root of a watch with runs = \"dir\"",
        dir.display()
    )))
}

/// Parse `K=V` (for `--label`).
pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("bad label {s:?}: want KEY=VALUE")),
    }
}

/// What `seal` did.
#[derive(Debug)]
pub(crate) enum Sealed {
    /// The run is sealed.
    Done {
        /// The manifest written.
        manifest: Box<Manifest>,
        /// Its stored key (relative to each destination base).
        stored_key: String,
        /// The page's key (relative to each destination base), when one was written.
        page_key: Option<String>,
        /// What became of each notification of the seal.
        notifications: Vec<crate::notify::Delivery>,
        /// Destinations the run's summary record could not be written to, with the reason.
        record_problems: Vec<String>,
    },
    /// Not every file reached every destination in time (or some failed): not sealed.
    Incomplete(FlushSummary),
}

/// Seal the run at `dir`: wait until every file under it is in every destination, then write
/// the manifest to every destination and record the seal.
pub(crate) async fn seal(
    config: &Config,
    dir: &Path,
    timeout: Duration,
    labels: Vec<(String, String)>,
) -> anyhow::Result<Sealed> {
    let started = std::time::Instant::now();
    let run = locate(config, dir)?;
    // Held until the seal ends (or the process dies): `runs` shows the run as sealing, and a
    // second `seal` of the same run is refused instead of racing this one.
    let _sealing = SealingLock::take(config, &run)?;
    let roots = Root::from_config(config);
    let root = roots
        .get(run.watch)
        .cloned()
        .context("the run's watch is gone")?;
    // Looked at through the root's handle, like every access to the tree.
    let reserved = root.kind(&run.path.join(RUN_DIR));
    if !matches!(&reserved, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
        return Err(UsageError(format!(
            "{} contains {RUN_DIR:?}, which is reserved for the run's manifest",
            run.path.display()
        ))
        .into());
    }
    let (flushed, index) = crate::sync::flush_under(config, timeout, true, Some(&run.path)).await?;
    if !flushed.complete() {
        return Ok(Sealed::Incomplete(flushed));
    }
    let ci = ci_context(|k| std::env::var(k).ok());
    let (index, manifest, collected, earlier_ms) = {
        let (config, run, root) = (config.clone(), run.clone(), root.clone());
        let files = flushed.files;
        tokio::task::spawn_blocking(move || {
            // The JUnit files are parsed (each capped) while the manifest is built: both read
            // only the files as flushed.
            let watch = &config.watch[run.watch];
            let (manifest, collected) = std::thread::scope(|s| {
                let tests = std::thread::Builder::new()
                    .name("seal-tests".into())
                    .spawn_scoped(s, || crate::results::collect(&root, &run, &files, watch));
                let manifest = manifest_files(&run, &files)
                    .map(|listed| build_manifest(&config, &root, &run, listed, ci, labels));
                let collected = match tests {
                    Ok(handle) => handle
                        .join()
                        .map_err(|_| anyhow::anyhow!("reading the run's test results panicked")),
                    // No thread to be had: parse them here.
                    Err(_) => Ok(crate::results::collect(&root, &run, &files, watch)),
                };
                (manifest, collected)
            });
            let (mut manifest, collected) = (manifest?, collected?);
            manifest.tests = collected.summary.clone();
            let earlier_ms = index.sealed_ms(&root.path, &run.name)?;
            anyhow::Ok((index, manifest, collected, earlier_ms))
        })
        .await??
    };
    // About 300 bytes a file: one allocation instead of a doubling series of copies.
    let mut json = Vec::with_capacity(4096 + manifest.files.len() * 320);
    serde_json::to_writer_pretty(&mut json, &manifest)?;
    let text = String::from_utf8(json).context("the manifest's JSON is not UTF-8")?;
    let body = text.as_bytes();
    let body_sha = Sha256::digest(body);
    let logical = root
        .key_for(&run.path.join(RUN_DIR).join(MANIFEST_NAME))
        .map_err(anyhow::Error::msg)?;
    let pipeline = Pipeline::from_config(config)?;
    let plan = pipeline.plan(Path::new(MANIFEST_NAME), body);
    let stored_key = layout::stored_key(&logical, plan);
    let meta = Meta {
        size: body.len() as u64,
        mtime_ns: manifest.sealed_ms * 1_000_000,
        sha256: hex::encode(body_sha),
        mode: Some(0o644),
        path: Some(logical.clone()),
    };
    let sink = Buffer::default();
    let mut w = pipeline::encoder(&pipeline, plan, &meta, &stored_key, Box::new(sink.clone()))?;
    w.write_all(body)?;
    w.finish()?;
    let object = bytes::Bytes::from(std::mem::take(
        &mut *sink.0.lock().unwrap_or_else(|p| p.into_inner()),
    ));
    let manifest = Arc::new(manifest);
    // Without a key the run gets its browsable page, stored as it is; rendered while the
    // manifest is stored.
    let page = pipeline.key.is_none().then(|| {
        let (manifest, stored_key) = (manifest.clone(), stored_key.clone());
        tokio::task::spawn_blocking(move || {
            let (logical, up) = page::location(&manifest);
            (logical, page::render(&manifest, &stored_key, up, false))
        })
    });
    // Packed for the index while the manifest is stored.
    let packed = tokio::task::spawn_blocking(move || crate::index::pack_manifest(&text));
    let dests = destination::open_all(config)?;
    // The manifest and the page are stored side by side; the seal fails if either does.
    let manifest_stored = async {
        for dest in &dests {
            put_own(
                dest,
                &stored_key,
                object.clone(),
                plan,
                &meta,
                MANIFEST_NAME,
            )
            .await?;
        }
        anyhow::Ok(())
    };
    let page_stored = async {
        let Some(page) = page else {
            return anyhow::Ok(None);
        };
        let (logical, html) = page.await.context("rendering the run's page failed")?;
        let page_key = layout::stored_key(&logical, layout::Plan::STORED);
        let html = bytes::Bytes::from(html);
        let meta = Meta {
            size: html.len() as u64,
            mtime_ns: manifest.sealed_ms * 1_000_000,
            sha256: hex::encode(Sha256::digest(&html)),
            mode: Some(0o644),
            path: Some(logical),
        };
        for dest in &dests {
            put_own(
                dest,
                &page_key,
                html.clone(),
                layout::Plan::STORED,
                &meta,
                page::PAGE_NAME,
            )
            .await?;
        }
        Ok(Some(page_key))
    };
    let ((), page_key) = tokio::try_join!(manifest_stored, page_stored)?;
    let record_problems = if config.writes_run_records() {
        let record = crate::format::record::RunRecord::new(&manifest, &collected);
        crate::results::write_record(&dests, &record, earlier_ms).await
    } else {
        Vec::new()
    };
    drop(collected);
    let sha = body_sha.to_vec();
    // The notifications are leased to this process while it tries them itself.
    let lease = crate::notify::seal_lease(config, timeout.saturating_sub(started.elapsed()));
    let lease_until_ms = crate::format::units::now_ms() + lease.as_millis() as i64;
    let queued = crate::notify::queue(
        config,
        &manifest,
        &root.prefix,
        &stored_key,
        page_key.as_deref(),
        lease_until_ms,
    )?;
    let packed = packed
        .await
        .context("packing the manifest for the index panicked")?
        .context("packing the manifest for the index")?;
    let run = crate::index::SealedRun {
        watch: root.path.clone(),
        name: manifest.run.clone(),
        sealed_ms: manifest.sealed_ms,
        manifest_sha256: sha,
        files: manifest.totals.files,
        bytes: manifest.totals.bytes,
        ci: manifest
            .ci
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?,
        first_file_ms: manifest.first_file_ms,
        last_file_ms: manifest.last_file_ms,
        tests: manifest
            .tests
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?,
    };
    let (i, q) = (index.clone(), queued.clone());
    tokio::task::spawn_blocking(move || i.record_run(&run, &packed, &q)).await??;
    let notifications = crate::notify::after_seal(config, index, &queued, lease_until_ms).await;
    Ok(Sealed::Done {
        manifest: Box::new(Arc::unwrap_or_clone(manifest)),
        stored_key,
        page_key,
        notifications,
        record_problems,
    })
}

/// The manifest entries of the flushed files, as the flush found them stored: listed through
/// the root's handle with the identity the index has, and every destination holding that
/// content at the file's key. Nothing is read again: the flush's look is the one the manifest
/// describes.
fn manifest_files(run: &RunDir, files: &[Flushed]) -> anyhow::Result<Vec<ManifestFile>> {
    let mut out = Vec::with_capacity(files.len());
    for Flushed { path, stat, stored } in files {
        let mut stored_key: Option<&String> = None;
        for held in &stored.held {
            match held {
                Some((k, s)) if *s == stored.sha256 => {
                    stored_key.get_or_insert(k);
                }
                // The object at the file's key holds other content (or the index lost it)
                // since the upload was recorded: the run is changing under the seal.
                _ => anyhow::bail!(
                    "{} changed while the run was being sealed; seal again",
                    path.display()
                ),
            }
        }
        let rel = relative_str(path, &run.path)
            .with_context(|| format!("{} is not a UTF-8 path in the run", path.display()))?;
        out.push(ManifestFile {
            path: rel.to_string(),
            size: stat.size,
            sha256: hex::encode(stored.sha256),
            mtime_ns: stat.mtime_ns,
            mode: stat.mode,
            content_type: layout::guess_type(path).to_string(),
            stored_key: stored_key.cloned().unwrap_or_default(),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The run directories of watch `w` (names that can name a run), listed through the root's
/// own handle: a root replaced by a symlink lists nothing.
fn run_dirs(w: &crate::config::Watch) -> Vec<String> {
    match crate::tree::RootDir::open(&w.path, w.one_file_system).and_then(|d| d.subdirectories()) {
        Ok(names) => names
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .filter(|n| valid_name(n))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// `path` relative to `dir` as text, comparing bytes (both absolute and normal, as walks
/// build them): [`Path::strip_prefix`] compares component by component, for every file.
pub(crate) fn relative_str<'a>(path: &'a Path, dir: &Path) -> Option<&'a str> {
    use std::os::unix::ffi::OsStrExt;
    let dir = dir.as_os_str().as_bytes();
    let rest = path.as_os_str().as_bytes().strip_prefix(dir)?;
    let rest = rest
        .strip_prefix(b"/")
        .or(dir.ends_with(b"/").then_some(rest))?;
    std::str::from_utf8(rest).ok().filter(|r| !r.is_empty())
}

fn build_manifest(
    config: &Config,
    root: &Root,
    run: &RunDir,
    files: Vec<ManifestFile>,
    ci: Option<Ci>,
    labels: Vec<(String, String)>,
) -> Manifest {
    let ms = |f: &ManifestFile| f.mtime_ns.div_euclid(1_000_000);
    let key_prefix = if root.prefix.is_empty() {
        run.name.clone()
    } else {
        format!("{}/{}", root.prefix, run.name)
    };
    Manifest {
        format: MANIFEST_FORMAT,
        run: run.name.clone(),
        key_prefix,
        node: config.node_id.clone(),
        ci,
        labels: labels.into_iter().collect(),
        first_file_ms: files.iter().map(ms).min(),
        last_file_ms: files.iter().map(ms).max(),
        sealed_ms: crate::format::units::now_ms(),
        tests: None,
        totals: Totals {
            files: files.len() as u64,
            bytes: files.iter().map(|f| f.size).sum(),
        },
        files,
    }
}

/// The encoded object collects here.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Finish for Buffer {
    fn finish(self: Box<Self>) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write one of the run's own objects (the encoded manifest, the page) with the same
/// attributes (or, in a `file://` store, file metadata) as any object, so plain `restore`
/// treats it like one. `name` gives the content type.
async fn put_own(
    dest: &Destination,
    stored_key: &str,
    object: bytes::Bytes,
    plan: layout::Plan,
    meta: &Meta,
    name: &str,
) -> anyhow::Result<()> {
    let location = dest.path(stored_key)?;
    let mut attributes = Attributes::new();
    if dest.supports_attributes {
        attributes.insert(
            Attribute::ContentType,
            plan.content_type(Path::new(name)).into(),
        );
        if let Some(enc) = plan.content_encoding() {
            attributes.insert(Attribute::ContentEncoding, enc.into());
        }
        if !plan.encrypt {
            for (k, v) in [
                ("sha256", meta.sha256.clone()),
                ("mtimens", meta.mtime_ns.to_string()),
                ("mode", "644".to_string()),
                ("size", meta.size.to_string()),
            ] {
                attributes.insert(Attribute::Metadata(k.into()), v.into());
            }
        }
    }
    let opts = PutOptions {
        attributes,
        ..Default::default()
    };
    let ticket = dest.ticket();
    dest.store
        .put_opts(&location, PutPayload::from_bytes(object), opts)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "writing the run's {name} {location} to {}: {}",
                dest.name,
                destination::error_chain(&e)
            )
        })?;
    if !plan.encrypt
        && let Some(file) = dest.local_file(stored_key)
    {
        let fm = crate::filemeta::FileMeta {
            mode: 0o644,
            mtime_ns: meta.mtime_ns,
            long_name: None,
        };
        dest.apply_meta(file, fm)
            .await?
            .with_context(|| format!("setting mode and mtime of {location} in {}", dest.name))?;
    }
    dest.persist(ticket)
        .await
        .with_context(|| format!("writing the run's {name} {location}"))?;
    Ok(())
}

/// What `restore --run` did.
#[derive(Debug, Default)]
pub(crate) struct RunRestore {
    /// The manifest's stored key.
    pub manifest_key: String,
    /// Files written and verified.
    pub restored: u64,
    /// Files that failed (path in the run, reason).
    pub failed: Vec<(String, String)>,
}

/// Restore exactly the files of run `name`'s manifest from `from` (default: the primary)
/// into `to`, each checked against the manifest's size and SHA-256.
pub(crate) async fn restore_run(
    config: &Config,
    name: &str,
    from: Option<&str>,
    to: &Path,
) -> anyhow::Result<RunRestore> {
    if !valid_name(name) {
        return Err(UsageError(format!("{name:?} cannot name a run")).into());
    }
    if run_watches(config).next().is_none() {
        return Err(UsageError("no watch has runs = \"dir\"".into()).into());
    }
    let dest = match from {
        Some(f) => crate::restore::find_destination(config, f)?,
        None => destination::open_primary(config)?,
    };
    let pipeline = Pipeline::from_config(config)?;
    let roots = Root::from_config(config);
    // Every place the manifest may be (one per run watch), newest first.
    let mut found = Vec::new();
    for (i, _) in run_watches(config) {
        let root = &roots[i];
        let logical = root
            .key_for(&root.path.join(name).join(RUN_DIR).join(MANIFEST_NAME))
            .map_err(anyhow::Error::msg)?;
        let dir = logical.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let listing = dest.list_under(dir).await?;
        for meta in listing.objects {
            let rel = dest.relative(meta.location.as_ref());
            let p = layout::parse(rel);
            if p.logical == logical && !p.long {
                found.push((meta.last_modified, rel.to_string()));
            }
        }
    }
    found.sort();
    let Some((_, manifest_key)) = found.pop() else {
        anyhow::bail!(
            "no manifest of run {name:?} in {}: is it sealed?",
            dest.name
        );
    };
    let manifest = read_manifest(&dest, &pipeline, &manifest_key)
        .await
        .with_context(|| format!("manifest {manifest_key} in {}", dest.name))?;
    if manifest.run != name {
        anyhow::bail!(
            "manifest {manifest_key} in {} is for run {:?}, not {name:?}",
            dest.name,
            manifest.run
        );
    }
    let root = crate::restore::open_target(to)?;
    let keys = Arc::new(pipeline.keys);
    let mut out = RunRestore {
        manifest_key,
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    let mut todo = Vec::new();
    for f in manifest.files {
        if let Err(e) = crate::restore::safe_target(to, &f.path) {
            out.failed.push((f.path, e));
        } else if !seen.insert(f.path.clone()) {
            out.failed
                .push((f.path, "listed twice in the manifest".into()));
        } else {
            todo.push(f);
        }
    }
    let results: Vec<(String, anyhow::Result<()>)> = futures::stream::iter(todo)
        .map(|f| {
            let (dest, keys, root) = (&dest, keys.clone(), root.clone());
            async move {
                let want = crate::restore::Pinned {
                    size: f.size,
                    sha256: f.sha256.clone(),
                    mode: f.mode,
                    mtime_ns: f.mtime_ns,
                };
                let res = crate::restore::restore_pinned(
                    dest,
                    &keys,
                    root,
                    &f.path,
                    &f.stored_key,
                    &want,
                )
                .await;
                (f.path, res)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for (path, res) in results {
        match res {
            Ok(()) => out.restored += 1,
            Err(e) => out.failed.push((path, format!("{e:#}"))),
        }
    }
    out.failed.sort();
    Ok(out)
}

/// Download, decode and parse a manifest. With a key configured, only an encrypted (and so
/// authenticated) manifest is accepted.
async fn read_manifest(
    dest: &Destination,
    pipeline: &Pipeline,
    stored_key: &str,
) -> anyhow::Result<Manifest> {
    let plan = layout::parse(stored_key).plan;
    if pipeline.key.is_some() && !plan.encrypt {
        anyhow::bail!(
            "not encrypted although a key is configured: refused (anyone who can write to the bucket can plant it)"
        );
    }
    let location = dest.path(stored_key)?;
    let get = dest
        .store
        .get(&location)
        .await
        .map_err(|e| anyhow::anyhow!("downloading: {}", destination::error_chain(&e)))?;
    // A plain manifest in S3, GCS or Azure carries its SHA-256 like any plain object.
    let recorded = get
        .attributes
        .get(&Attribute::Metadata("sha256".into()))
        .map(|v| v.as_ref().to_string());
    // Streamed, never held whole: the decoded manifest is capped below, so an object of any
    // size costs no more memory than the cap.
    let raw = crate::restore::download(get);
    let (keys, key) = (pipeline.keys.clone(), stored_key.to_string());
    let body = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let (r, meta) = pipeline::decoder(plan, &keys, &key, raw)?;
        let mut body = Vec::new();
        r.take(MAX_MANIFEST + 1).read_to_end(&mut body)?;
        anyhow::ensure!(
            body.len() as u64 <= MAX_MANIFEST,
            "larger than {MAX_MANIFEST} bytes"
        );
        if let Some(want) = meta.map(|m| m.sha256).or(recorded) {
            anyhow::ensure!(
                want == hex::encode(Sha256::digest(&body)),
                "content does not match the SHA-256 recorded with it"
            );
        }
        Ok(body)
    })
    .await??;
    #[derive(Deserialize)]
    struct Version {
        format: u32,
    }
    let v: Version = serde_json::from_slice(&body).context("not a manifest")?;
    anyhow::ensure!(
        v.format == MANIFEST_FORMAT,
        "manifest format {} is not known to this build (it reads {MANIFEST_FORMAT})",
        v.format
    );
    serde_json::from_slice(&body).context("not a valid manifest")
}

/// A run's state in `runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    /// Not sealed yet.
    Open,
    /// A `seal` of it is running now (it holds the run's sealing lock).
    Sealing,
    /// Sealed, and its files are as the manifest says.
    Sealed,
    /// Sealed, but a file was added or changed since.
    ChangedAfterSeal,
}

/// One destination's view of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunDest {
    /// Destination name.
    pub name: String,
    /// Files of the run (as indexed now) whose current content it does not hold yet.
    pub missing: u64,
}

/// One run in `runs`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunInfo {
    /// Run name.
    pub name: String,
    /// The watch root it is under.
    pub watch: PathBuf,
    /// Open, sealed or changed after seal.
    pub state: State,
    /// Files indexed under the run now.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Whether every destination holds every indexed file of the run.
    pub complete: bool,
    /// Per destination.
    pub destinations: Vec<RunDest>,
    /// When it was sealed (milliseconds since the epoch).
    pub sealed_ms: Option<i64>,
    /// Files and bytes in the manifest.
    pub sealed_files: Option<u64>,
    /// Bytes in the manifest.
    pub sealed_bytes: Option<u64>,
    /// Paths (relative to the run) added or changed after the seal.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// The notifications of the latest seal.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<crate::index::RunNotification>,
    /// Newest modification time of an indexed file of the run (ms since the epoch).
    pub last_file_ms: Option<i64>,
    /// The test results of the latest seal (absent: not sealed, or no JUnit XML).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<crate::format::tests::TestSummary>,
}

/// The manifest of run `name` as sealed by this node (kept in the index), newest first if
/// more than one watch has a run of that name. Blocking.
pub(crate) fn sealed_manifest(
    config: &Config,
    index: &Index,
    name: &str,
) -> anyhow::Result<Manifest> {
    if !valid_name(name) {
        return Err(UsageError(format!("{name:?} cannot name a run")).into());
    }
    let mut found: Option<(i64, &Path)> = None;
    for (_, w) in run_watches(config) {
        if let Some(ms) = index.sealed_ms(&w.path, name)?
            && found.is_none_or(|(newest, _)| ms > newest)
        {
            found = Some((ms, &w.path));
        }
    }
    let text = found
        .map(|(_, watch)| index.run_manifest(watch, name))
        .transpose()?
        .flatten()
        .ok_or_else(|| UsageError(format!("run {name:?} has not been sealed on this node")))?;
    serde_json::from_str(&text)
        .with_context(|| format!("the manifest of run {name:?} in the index"))
}

/// The run directory `dir`, if it is one (for `url`, which also takes files).
pub(crate) fn run_at(config: &Config, dir: &Path) -> Option<RunDir> {
    locate(config, dir).ok()
}

/// A run's sealing lock: a file in the state directory, `flock`ed by the `seal` holding it
/// (released by the kernel when that process ends, however it ends).
struct SealingLock(#[allow(dead_code)] std::fs::File);

impl SealingLock {
    fn path(config: &Config, watch: &Path, run: &str) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let mut h = Sha256::new();
        h.update(watch.as_os_str().as_bytes());
        h.update([0]);
        h.update(run.as_bytes());
        config
            .state_dir
            .join("sealing")
            .join(hex::encode(&h.finalize()[..16]))
    }

    fn take(config: &Config, run: &RunDir) -> anyhow::Result<SealingLock> {
        let watch = &config.watch[run.watch].path;
        let path = Self::path(config, watch, &run.name);
        crate::index::create_state_dir(path.parent().unwrap_or(&config.state_dir))?;
        let file = crate::index::open_private(&path)
            .with_context(|| format!("opening the sealing lock {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(SealingLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(UsageError(format!(
                "run {} is being sealed by another process",
                run.name
            ))
            .into()),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(anyhow::anyhow!("locking {}: {e}", path.display()))
            }
        }
    }

    /// Whether some process is sealing `run` of `watch` now.
    fn held(config: &Config, watch: &Path, run: &str) -> bool {
        let path = Self::path(config, watch, run);
        let Ok(file) = std::fs::File::open(&path) else {
            return false;
        };
        matches!(
            file.try_lock_shared(),
            Err(std::fs::TryLockError::WouldBlock)
        )
    }
}

/// Every run of every `runs = "dir"` watch: directories under the roots and sealed runs in
/// the index. Blocking.
pub(crate) fn list(config: &Config, index: &Index) -> anyhow::Result<Vec<RunInfo>> {
    let dests: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    let mut out = Vec::new();
    for (_, w) in run_watches(config) {
        let mut names = run_dirs(w);
        let sealed: HashMap<String, (i64, u64, u64)> = index
            .sealed_runs(&w.path)?
            .into_iter()
            .map(|r| (r.name, (r.sealed_ms, r.files, r.bytes)))
            .collect();
        names.extend(sealed.keys().cloned());
        names.sort();
        names.dedup();
        for name in names {
            let dir = w.path.join(&name);
            let files = indexed_under(index, &dir)?;
            let mut info = RunInfo {
                name: name.clone(),
                watch: w.path.clone(),
                state: State::Open,
                files: files.len() as u64,
                bytes: files.iter().map(|f| f.size).sum(),
                complete: true,
                destinations: dests
                    .iter()
                    .map(|d| RunDest {
                        name: d.clone(),
                        missing: files.iter().filter(|f| !f.held_by.contains(d)).count() as u64,
                    })
                    .collect(),
                sealed_ms: None,
                sealed_files: None,
                sealed_bytes: None,
                changed: Vec::new(),
                last_file_ms: files.iter().map(|f| f.mtime_ns.div_euclid(1_000_000)).max(),
                notifications: Vec::new(),
                tests: None,
            };
            info.complete = info.destinations.iter().all(|d| d.missing == 0);
            if let Some((ms, n, bytes)) = sealed.get(&name) {
                let text = index
                    .run_manifest(&w.path, &name)?
                    .with_context(|| format!("the recorded manifest of run {name:?} is missing"))?;
                let manifest: Manifest = serde_json::from_str(&text)
                    .with_context(|| format!("the recorded manifest of run {name:?}"))?;
                let by_path: HashMap<&str, &ManifestFile> = manifest
                    .files
                    .iter()
                    .map(|f| (f.path.as_str(), f))
                    .collect();
                for f in &files {
                    let rel = relative_str(&f.path, &dir);
                    let same = rel.and_then(|r| by_path.get(r)).is_some_and(|m| {
                        m.sha256 == f.sha256 && m.mtime_ns == f.mtime_ns && m.size == f.size
                    });
                    if !same || f.mtime_ns.div_euclid(1_000_000) > *ms {
                        info.changed.push(
                            rel.map(str::to_string)
                                .unwrap_or_else(|| f.path.display().to_string()),
                        );
                    }
                }
                info.changed.sort();
                info.tests = manifest.tests;
                info.state = if info.changed.is_empty() {
                    State::Sealed
                } else {
                    State::ChangedAfterSeal
                };
                info.notifications = index.run_notifications(&w.path, &name, *ms)?;
                info.sealed_ms = Some(*ms);
                info.sealed_files = Some(*n);
                info.sealed_bytes = Some(*bytes);
            }
            if info.state != State::Sealed && SealingLock::held(config, &w.path, &name) {
                info.state = State::Sealing;
            }
            out.push(info);
        }
    }
    Ok(out)
}

/// An indexed file under a run directory.
struct Indexed {
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
    sha256: String,
    /// Destinations holding its current content.
    held_by: Vec<String>,
}

fn indexed_under(index: &Index, dir: &Path) -> anyhow::Result<Vec<Indexed>> {
    Ok(index
        .files_under(dir)?
        .into_iter()
        .map(|f| Indexed {
            path: f.path,
            size: f.size,
            mtime_ns: f.mtime_ns,
            sha256: hex::encode(f.sha256),
            held_by: f.held_by,
        })
        .collect())
}

/// `seal_after`: seal every run that has been quiet that long and is complete everywhere
/// (open, or changed after its seal), as `seal DIR` would. Returns the runs sealed; a run
/// that cannot be sealed now is named in the log and tried again on the next pass.
pub(crate) async fn seal_quiet(config: &Config, index: &Arc<Index>) -> anyhow::Result<Vec<String>> {
    let quiet_after: HashMap<PathBuf, Duration> = run_watches(config)
        .filter_map(|(_, w)| w.seal_after.map(|d| (w.path.clone(), d)))
        .collect();
    if quiet_after.is_empty() {
        return Ok(Vec::new());
    }
    let runs = {
        let (c, i) = (config.clone(), index.clone());
        tokio::task::spawn_blocking(move || list(&c, &i)).await??
    };
    let now = crate::format::units::now_ms();
    let mut sealed = Vec::new();
    for r in runs {
        let Some(after) = quiet_after.get(&r.watch) else {
            continue;
        };
        let quiet = r
            .last_file_ms
            .is_some_and(|ms| now.saturating_sub(ms) >= after.as_millis() as i64);
        if r.state == State::Sealed || !r.complete || !quiet {
            continue;
        }
        let dir = r.watch.join(&r.name);
        match seal(config, &dir, Duration::from_secs(10), Vec::new()).await {
            Ok(Sealed::Done { .. }) => {
                tracing::info!(run = %r.name, "sealed a quiet run (seal_after)");
                sealed.push(r.name);
            }
            Ok(Sealed::Incomplete(_)) => {
                tracing::debug!(run = %r.name, "quiet run not complete yet; sealing later");
            }
            Err(e) => {
                tracing::warn!(run = %r.name, error = %format!("{e:#}"), "cannot seal a quiet run");
            }
        }
    }
    Ok(sealed)
}

/// The `n` most recently sealed runs of this node, newest first. Blocking.
pub(crate) fn latest(config: &Config, index: &Index, n: usize) -> anyhow::Result<Vec<RunSummary>> {
    let mut all = Vec::new();
    for (_, w) in run_watches(config) {
        all.extend(index.sealed_runs(&w.path)?);
    }
    all.sort_by_key(|r| std::cmp::Reverse(r.sealed_ms));
    Ok(all
        .into_iter()
        .take(n)
        .map(|r| {
            let ci =
                r.ci.as_deref()
                    .and_then(|c| serde_json::from_str::<Ci>(c).ok());
            RunSummary {
                duration_secs: r
                    .last_file_ms
                    .zip(r.first_file_ms)
                    .map(|(last, first)| (last - first).max(0) as u64 / 1000),
                branch: ci.and_then(|c| c.branch.or(c.tag)),
                run: r.name,
                sealed_ms: r.sealed_ms,
                files: r.files,
                bytes: r.bytes,
            }
        })
        .collect())
}

/// Every run this node sealed that has a test summary: `f(sealed_ms, summary)`. Blocking.
pub(crate) fn each_sealed_summary(
    config: &Config,
    index: &Index,
    mut f: impl FnMut(i64, &crate::format::tests::TestSummary),
) -> anyhow::Result<()> {
    for (_, w) in run_watches(config) {
        for r in index.sealed_runs(&w.path)? {
            let tests = r.tests.as_deref();
            if let Some(Ok(t)) =
                tests.map(serde_json::from_str::<crate::format::tests::TestSummary>)
            {
                f(r.sealed_ms, &t);
            }
        }
    }
    Ok(())
}

/// How many runs are open (not sealed), for `status`. Blocking.
/// A run is open while its directory has no seal recorded and no `seal` holds it: the
/// directories and the names of the sealed runs are all it reads (the daemon refreshes this
/// every 30 s; [`list`] reads every file of every run).
pub(crate) fn count_open(config: &Config, index: &Index) -> anyhow::Result<u64> {
    let mut open = 0;
    for (_, w) in run_watches(config) {
        let names = run_dirs(w);
        let sealed: std::collections::HashSet<String> = index
            .sealed_runs(&w.path)?
            .into_iter()
            .map(|r| r.name)
            .collect();
        open += names
            .iter()
            .filter(|n| !sealed.contains(*n) && !SealingLock::held(config, &w.path, n))
            .count() as u64;
    }
    Ok(open)
}

/// A human-readable table of runs.
pub(crate) fn render(runs: &[RunInfo]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if runs.is_empty() {
        out.push_str("no runs (a watch needs runs = \"dir\")\n");
    }
    for r in runs {
        let state = match r.state {
            State::Open => "open",
            State::Sealing => "sealing",
            State::Sealed => "sealed",
            State::ChangedAfterSeal => "changed after seal",
        };
        let missing: Vec<String> = r
            .destinations
            .iter()
            .filter(|d| d.missing > 0)
            .map(|d| format!("{} missing {}", d.name, d.missing))
            .collect();
        let _ = write!(
            out,
            "{}: {state}, {} files, {} bytes, {}",
            r.name,
            r.files,
            r.bytes,
            if r.complete {
                "in every destination".to_string()
            } else {
                missing.join(", ")
            }
        );
        if let Some(t) = &r.tests {
            let _ = write!(out, "; tests {} ({})", t.verdict(), t.counts_line());
        }
        for n in &r.notifications {
            let state = match n.state {
                crate::index::NotifyState::Pending => "pending",
                crate::index::NotifyState::Sent => "sent",
                crate::index::NotifyState::GivenUp => "given up",
            };
            let _ = write!(out, "; notify {}: {state}", n.name);
        }
        out.push('\n');
    }
    out
}

/// `report --run`: one sealed run in text (every string escaped: the manifest's names come
/// from the tree, its CI context from the job's environment).
pub(crate) fn render_manifest(m: &Manifest) -> String {
    use std::fmt::Write as _;
    let p = destination::printable;
    let when = page::time;
    let mut out = String::new();
    let _ = writeln!(out, "run {} (node {})", p(&m.run), p(&m.node));
    let _ = writeln!(out, "  sealed     {}", when(m.sealed_ms));
    if let (Some(first), Some(last)) = (m.first_file_ms, m.last_file_ms) {
        let secs = (last - first).max(0) / 1000;
        let _ = writeln!(
            out,
            "  written    {} – {} ({}m {}s)",
            when(first),
            when(last),
            secs / 60,
            secs % 60
        );
    }
    let _ = writeln!(
        out,
        "  totals     {} files, {}",
        m.totals.files,
        crate::format::units::human(m.totals.bytes)
    );
    if let Some(ci) = &m.ci {
        let _ = writeln!(out, "  ci         {}", p(&ci.provider));
        for (k, v) in [
            ("repository", &ci.repository),
            ("branch", &ci.branch),
            ("tag", &ci.tag),
            ("commit", &ci.commit),
            ("pull req.", &ci.pull_request),
            ("job", &ci.job),
            ("url", &ci.url),
        ] {
            if let Some(v) = v {
                let _ = writeln!(out, "  {k:<10} {}", p(v));
            }
        }
    }
    for (k, v) in &m.labels {
        let _ = writeln!(out, "  label      {}={}", p(k), p(v));
    }
    if let Some(t) = &m.tests {
        let _ = writeln!(out, "  tests      {}: {}", t.verdict(), t.counts_line());
        let _ = writeln!(out, "  test time  {:.1} s", t.duration_ms as f64 / 1000.0);
        for f in &t.failures {
            let _ = writeln!(
                out,
                "    {} {}::{} ({}){}",
                if f.outcome == crate::format::tests::Outcome::Error {
                    "ERROR "
                } else {
                    "FAILED"
                },
                p(&f.class),
                p(&f.name),
                p(&f.file),
                f.message
                    .as_deref()
                    .map(|m| format!(": {}", p(&m.replace('\n', " "))))
                    .unwrap_or_default()
            );
        }
        if t.failures_omitted > 0 {
            let _ = writeln!(out, "    ... and {} more failures", t.failures_omitted);
        }
        for b in &t.unreadable {
            let _ = writeln!(
                out,
                "    JUnit file left out: {}: {}",
                p(&b.path),
                p(&b.error)
            );
        }
        if !t.slowest.is_empty() {
            out.push_str("  slowest tests:\n");
        }
        for s in &t.slowest {
            let _ = writeln!(
                out,
                "    {:>9} ms  {}::{}",
                s.duration_ms,
                p(&s.class),
                p(&s.name)
            );
        }
    }
    let mut largest: Vec<&ManifestFile> = m.files.iter().collect();
    largest.sort_by_key(|f| std::cmp::Reverse(f.size));
    if !largest.is_empty() {
        out.push_str("  largest files:\n");
    }
    for f in largest.into_iter().take(10) {
        let _ = writeln!(
            out,
            "    {:>10}  {}",
            crate::format::units::human(f.size),
            p(&f.path)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_compare_bytes() {
        let run = Path::new("/w/run-1");
        assert_eq!(
            relative_str(Path::new("/w/run-1/a/b.log"), run),
            Some("a/b.log")
        );
        assert_eq!(relative_str(Path::new("/w/run-10/b.log"), run), None);
        assert_eq!(relative_str(Path::new("/w/run-1"), run), None);
        assert_eq!(
            relative_str(Path::new("/w/run-1/x"), Path::new("/w/run-1/")),
            Some("x")
        );
        assert_eq!(relative_str(Path::new("/v/run-1/x"), run), None);
    }

    #[test]
    fn labels_and_names() {
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_label("=x").is_err() && parse_label("x").is_err());
        for bad in ["", ".", "..", "a/b", "_panoptic-sync"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
