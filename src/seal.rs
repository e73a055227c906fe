//! The seal: `seal DIR` (and `seal_after`) turns a run directory into a sealed run, in named
//! steps:
//! 1. [`claim`]: locate the run, take its sealing lock, refuse a tree holding `_run/`;
//! 2. wait for the run's files ([`crate::sync::flush_under`]: every file now under the run in
//!    every destination);
//! 3. [`describe`]: build the manifest from the flush's own look, and parse the JUnit files
//!    beside it;
//! 4. [`encode`]: the manifest's JSON through the pipeline (compressed, encrypted);
//! 5. [`store_manifest_and_page`]: the manifest and, without a key, the run's page, side by
//!    side in every destination;
//! 6. [`record`]: the run's summary record, the notifications queued, the seal in the index;
//! 7. the notifications tried ([`crate::notify::after_seal`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use object_store::{PutOptions, PutPayload};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::destination::{self, Destination};
use crate::error::UsageError;
use crate::format::ci::{Ci, ci_context};
use crate::format::layout;
use crate::format::manifest::{
    MANIFEST_FORMAT, MANIFEST_NAME, Manifest, ManifestFile, RUN_DIR, Totals,
};
use crate::format::results::Collected;
use crate::html::run_page as page;
use crate::index::Index;
use crate::pipeline::{self, Meta, Pipeline};
use crate::runs::{RunDir, RunInfo, SealingLock, State, list, locate, relative_str, run_watches};
use crate::scan::Root;
use crate::sync::{FlushSummary, Flushed};

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
    dests: &[Destination],
    dir: &Path,
    timeout: Duration,
    labels: Vec<(String, String)>,
) -> anyhow::Result<Sealed> {
    let started = std::time::Instant::now();
    let (run, root, _sealing) = claim(config, dir)?;
    let identity = run_identity(&root, &run)?;
    let (flushed, index) = match wait_for_files(config, &run, timeout).await? {
        Ok(done) => done,
        Err(incomplete) => return Ok(Sealed::Incomplete(incomplete)),
    };
    let ci = first_context(
        &index,
        &root.path,
        &run.name,
        ci_context(|k| std::env::var(k).ok()),
    )
    .await?;
    let described = describe(config, &run, &root, flushed.files, ci, labels, index).await?;
    let Described {
        index,
        manifest,
        collected,
        earlier_ms,
    } = described;
    // The manifest describes the directory claimed, or nothing is sealed.
    if run_identity(&root, &run).ok() != Some(identity) {
        anyhow::bail!(
            "the run directory {} was replaced while it was being sealed; nothing was sealed",
            run.path.display()
        );
    }
    let pipeline = Pipeline::from_config(config)?;
    let encoded = encode(&pipeline, &root, &run, &manifest)?;
    let manifest = Arc::new(manifest);
    // Packed for the index while the manifest is stored.
    let text = encoded.text.clone();
    let packed = tokio::task::spawn_blocking(move || crate::index::pack_manifest(&text));
    // The page tells the story of the run's failures from the fleet's records, where they
    // are written (best effort: a seal never fails for want of history).
    let stories = if pipeline.key.is_none() && config.writes_run_records() {
        failure_stories(dests, &manifest).await
    } else {
        None
    };
    let page_key =
        store_manifest_and_page(dests, &manifest, &encoded, pipeline.key.is_none(), stories)
            .await?;
    // What the run changed in its tests' states, for the `[[notify]]` entries that ask
    // (judged before its own record is written; best effort, like the stories).
    let changes = test_changes(config, dests, &manifest, &collected.cases).await;
    let expiring = expiring_quarantine(config).await;
    let record_problems = if config.writes_run_records() {
        let record =
            crate::format::record::RunRecord::new(&manifest, &collected, page_key.as_deref());
        let tests = crate::format::record::test_records(&manifest, &collected);
        crate::results::write_record(dests, &record, Some(tests), earlier_ms).await
    } else {
        Vec::new()
    };
    drop(collected);
    // The notifications are leased to this process while it tries them itself.
    let lease = crate::notify::seal_lease(config, timeout.saturating_sub(started.elapsed()));
    let lease_until_ms = crate::format::units::now_ms() + lease.as_millis() as i64;
    let packed = packed
        .await
        .context("packing the manifest for the index panicked")?
        .context("packing the manifest for the index")?;
    let events = crate::notify::queue_events(
        config,
        &manifest,
        &changes,
        &expiring,
        page_key.as_deref(),
        &encoded.stored_key,
        lease_until_ms,
    )?;
    let queued = record(
        config,
        &index,
        &root,
        &manifest,
        &encoded,
        page_key.as_deref(),
        packed,
        lease_until_ms,
        events,
    )
    .await?;
    let mut record_problems = record_problems;
    if pipeline.key.is_none() {
        record_problems.extend(publish_pages(dests, &index, &root, &manifest).await);
    }
    let mut notifications = crate::notify::after_seal(config, index, &queued, lease_until_ms).await;
    notifications.extend(crate::notify::left_out(config, &manifest));
    Ok(Sealed::Done {
        manifest: Box::new(Arc::unwrap_or_clone(manifest)),
        stored_key: encoded.stored_key,
        page_key,
        notifications,
        record_problems,
    })
}

/// A quarantine entry is announced as expiring this long before it expires.
const EXPIRY_NOTICE: Duration = Duration::from_secs(3 * 86_400);

/// The state changes of the run's tests, when a `[[notify]]` entry asks for a `test.*` event
/// and the primary has the fleet's records; empty otherwise or when they cannot be read
/// (logged).
async fn test_changes(
    config: &Config,
    dests: &[Destination],
    manifest: &Manifest,
    cases: &[crate::format::results::Case],
) -> Vec<crate::format::fleet::TestChange> {
    use crate::config::NotifyEvent::{TestBroken, TestFixed, TestFlaky};
    let wanted = [TestFlaky, TestBroken, TestFixed]
        .into_iter()
        .any(|e| crate::notify::any_wants(config, e));
    let Some(primary) = dests
        .first()
        .filter(|_| wanted && config.writes_run_records())
    else {
        return Vec::new();
    };
    match crate::results::changes::state_changes(primary, manifest, cases, HISTORY).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(run = %manifest.run, error = %format!("{e:#}"), "the tests' changes of state could not be judged; none is announced");
            Vec::new()
        }
    }
}

/// The quarantine entries that expire within [`EXPIRY_NOTICE`] or have expired, when a
/// `[[notify]]` entry asks for `quarantine.expiring` (the list as `gate` reads it: the
/// primary's, else the cached copy); empty when it cannot be read (logged).
async fn expiring_quarantine(config: &Config) -> Vec<crate::format::quarantine::Entry> {
    if !crate::notify::any_wants(config, crate::config::NotifyEvent::QuarantineExpiring) {
        return Vec::new();
    }
    let listed = match crate::quarantine::ListStore::open(config) {
        Ok(store) => store.read().await,
        Err(e) => Err(e),
    };
    match listed {
        Ok(l) => {
            let soon = l.now_ms + EXPIRY_NOTICE.as_millis() as i64;
            l.list
                .entries
                .into_iter()
                .filter(|e| e.expires.timestamp_millis() <= soon)
                .collect()
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the quarantine could not be read; no expiry is announced");
            Vec::new()
        }
    }
}

/// How far back a run page's failure history looks.
pub(crate) const HISTORY: Duration = Duration::from_secs(30 * 86_400);

/// The stories of `manifest`'s failures from the primary's run records, or `None` (logged)
/// when there are no failures or the records cannot be read.
pub(crate) async fn failure_stories(
    dests: &[Destination],
    manifest: &Manifest,
) -> Option<crate::format::fleet::Stories> {
    let primary = dests.first()?;
    if manifest
        .tests
        .as_ref()
        .is_none_or(|t| t.failures.is_empty())
    {
        return None;
    }
    match crate::results::fleet::stories(primary, manifest, HISTORY).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(run = %manifest.run, error = %format!("{e:#}"), "the history of the run's failures could not be read");
            None
        }
    }
}

/// Where the pages above a run go, under its watch's prefix: the run list, and each
/// branch's latest run (see [`Root::reserved`]: the tree cannot write there).
const LIST_PAGE: &str = "index.html";
const LATEST_DIR: &str = "_panoptic-sync/latest";

/// Step 7 (stores without encryption): the pages above the run, for static hosting. The
/// watch's run list at `<prefix>/index.html` (newest first, from the index), and for the
/// run's branch a page at `<prefix>/_panoptic-sync/latest/<branch>/index.html` that leads to
/// its newest run. A failure is returned as text; the seal stands.
async fn publish_pages(
    dests: &[Destination],
    index: &Arc<Index>,
    root: &Root,
    manifest: &Manifest,
) -> Vec<String> {
    let Some((prefix, _)) = manifest.key_prefix.rsplit_once('/') else {
        return Vec::new();
    };
    let (idx, watch) = (index.clone(), root.path.clone());
    let runs = match tokio::task::spawn_blocking(move || idx.sealed_runs(&watch)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return vec![format!("the run list: reading the index: {e:#}")],
        Err(e) => return vec![format!("the run list: {e}")],
    };
    let mut rows: Vec<crate::html::runs::Row> = runs
        .iter()
        .map(|r| crate::html::runs::Row {
            run: r.name.clone(),
            sealed_ms: r.sealed_ms,
            branch: r.ci.as_ref().and_then(|c| c.branch.clone()),
            commit: r.ci.as_ref().and_then(|c| c.commit.clone()),
            tests: r.tests.as_ref().map(|t| {
                (
                    t.passed_run(),
                    format!("{} · {}", t.verdict(), t.counts_line()),
                )
            }),
            files: r.files,
            bytes: r.bytes,
            error: None,
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.sealed_ms));
    let mut pages = vec![(
        format!("{prefix}/{LIST_PAGE}"),
        crate::html::runs::list_page(prefix, &rows, None),
    )];
    let branch = manifest.ci.as_ref().and_then(|c| c.branch.as_deref());
    if let Some(branch) = branch.filter(|b| {
        b.split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && !s.chars().any(char::is_control))
    }) && let Some(newest) = rows.iter().find(|r| r.branch.as_deref() == Some(branch))
    {
        let depth = LATEST_DIR.split('/').count() + branch.split('/').count();
        pages.push((
            format!("{prefix}/{LATEST_DIR}/{branch}/{LIST_PAGE}"),
            crate::html::runs::latest_page(branch, &newest.run, depth),
        ));
    }
    let mut problems = Vec::new();
    for (logical, html) in pages {
        if let Err(e) = store_page(dests, logical, html, manifest.sealed_ms).await {
            problems.push(format!("{e:#}"));
        }
    }
    problems
}

/// Store an HTML page of the run's at `logical` in every destination, as it is (never
/// compressed, never encrypted); returns its stored key.
async fn store_page(
    dests: &[Destination],
    logical: String,
    html: String,
    sealed_ms: i64,
) -> anyhow::Result<String> {
    let key = layout::stored_key(&logical, layout::Plan::STORED);
    let html = bytes::Bytes::from(html);
    let meta = Meta {
        size: html.len() as u64,
        mtime_ns: sealed_ms * 1_000_000,
        sha256: hex::encode(Sha256::digest(&html)),
        mode: Some(0o644),
        path: Some(logical),
    };
    for dest in dests {
        put_own(
            dest,
            &key,
            html.clone(),
            layout::Plan::STORED,
            &meta,
            page::PAGE_NAME,
        )
        .await?;
    }
    Ok(key)
}

/// Step 2: wait until every file now under the run is in every destination and none is still
/// being written: a file modified within the watch's settle time (`settle_ms`) is waited for
/// (the flush again after it settles), and one still changing when `timeout` ends fails the
/// seal, named. A partly written file is never sealed.
async fn wait_for_files(
    config: &Config,
    run: &RunDir,
    timeout: Duration,
) -> anyhow::Result<Result<(FlushSummary, Arc<Index>), FlushSummary>> {
    let deadline = std::time::Instant::now() + timeout;
    let settle = config.watch[run.watch].settle;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (flushed, index) =
            crate::sync::flush_under(config, left, true, Some(&run.path)).await?;
        if !flushed.complete() {
            return Ok(Err(flushed));
        }
        let now_ns = crate::format::units::now_ns();
        let writing = still_written(&flushed.files, settle, now_ns);
        if writing.is_empty() {
            return Ok(Ok((flushed, index)));
        }
        if std::time::Instant::now() >= deadline {
            let names: Vec<String> = writing
                .iter()
                .map(|f| relative_str(&f.path, &run.path).unwrap_or("?").to_string())
                .collect();
            anyhow::bail!(
                "{} of run {} still being written (modified within the last {} ms): {}; seal again once the job has finished writing",
                if names.len() == 1 { "a file" } else { "files" },
                run.name,
                settle.as_millis(),
                names.join(", ")
            );
        }
        // Until the newest of them has been quiet for the settle time (then flushed again).
        let newest = writing
            .iter()
            .map(|f| f.stat.mtime_ns)
            .max()
            .unwrap_or(now_ns);
        let wait = Duration::from_nanos((newest + settle.as_nanos() as i64 - now_ns).max(0) as u64)
            .clamp(
                Duration::from_millis(50),
                settle.max(Duration::from_millis(50)),
            );
        tokio::time::sleep(wait.min(deadline.saturating_duration_since(std::time::Instant::now())))
            .await;
    }
}

/// The files modified within `settle` of `now_ns` (a writer may still be at them). A file
/// from the future (a clock set back, an archive's mtimes) is not waited for.
fn still_written(files: &[Flushed], settle: Duration, now_ns: i64) -> Vec<&Flushed> {
    let since = now_ns.saturating_sub(settle.as_nanos() as i64);
    files
        .iter()
        .filter(|f| f.stat.mtime_ns > since && f.stat.mtime_ns <= now_ns + 1_000_000_000)
        .collect()
}

/// The CI context a seal records: the one of the run's first seal when that one had a context
/// (a re-seal, from whatever job, cannot move a run to another repository, branch or pull
/// request, which retention acts on), else the one of this job's environment.
async fn first_context(
    index: &Arc<Index>,
    watch: &Path,
    run: &str,
    now: Option<Ci>,
) -> anyhow::Result<Option<Ci>> {
    let (w, name) = (watch.to_path_buf(), run.to_string());
    let earlier = index
        .call(move |i| Ok(i.sealed_runs(&w)?.into_iter().find(|r| r.name == name)))
        .await?;
    // Never sealed, or sealed without a context (by `seal_after`, outside any job).
    let Some(earlier) = earlier.filter(|r| r.ci.is_some()) else {
        return Ok(now);
    };
    if earlier.ci != now {
        tracing::warn!(
            run,
            "the run keeps the CI context of its first seal; this job's differs"
        );
    }
    Ok(earlier.ci)
}

/// The identity (device, inode) of the run's directory, opened through the root's handle
/// without following links: a directory exchanged with a link or another directory during
/// the seal has another, or none.
fn run_identity(root: &Root, run: &RunDir) -> anyhow::Result<(u64, u64)> {
    let dir = root
        .tree
        .dir()
        .with_context(|| format!("the watch root {} is gone", root.path.display()))?;
    let fd = dir
        .open_dir(Path::new(&run.name))
        .with_context(|| format!("opening the run directory {}", run.path.display()))?;
    let st = rustix::fs::fstat(&fd)
        .with_context(|| format!("looking at the run directory {}", run.path.display()))?;
    Ok((st.st_dev, st.st_ino))
}

/// Step 1: the run at `dir`, its root, and its sealing lock, held until the seal ends (or the
/// process dies): `runs` shows the run as sealing, and a second `seal` of the same run is
/// refused instead of racing this one. A tree that holds `_run/` itself is refused.
fn claim(config: &Config, dir: &Path) -> anyhow::Result<(RunDir, Root, SealingLock)> {
    let run = locate(config, dir)?;
    let sealing = SealingLock::take(config, &run)?;
    if let Some(ms) = crate::runs::pruned_ms(config, &Index::open(&config.state_dir)?, &run)? {
        return Err(UsageError(crate::runs::pruned_message(&run.name, ms)).into());
    }
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
    Ok((run, root, sealing))
}

/// What step 3 found: the manifest, the parsed test results, and an earlier seal's time.
struct Described {
    index: Arc<Index>,
    manifest: Manifest,
    collected: Collected,
    earlier_ms: Option<i64>,
}

/// Step 3: the manifest of the flushed files, with the JUnit files parsed (each capped) while
/// it is built: both read only the files as flushed.
async fn describe(
    config: &Config,
    run: &RunDir,
    root: &Root,
    files: Vec<Flushed>,
    ci: Option<Ci>,
    labels: Vec<(String, String)>,
    index: Arc<Index>,
) -> anyhow::Result<Described> {
    let (config, run, root) = (config.clone(), run.clone(), root.clone());
    tokio::task::spawn_blocking(move || {
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
        let first = config.destinations().next().map(|d| d.name.clone());
        attach_blobs(&index, first.as_deref(), &mut manifest)?;
        let earlier_ms = index.sealed_ms(&root.path, &run.name)?;
        anyhow::Ok(Described {
            index,
            manifest,
            collected,
            earlier_ms,
        })
    })
    .await?
}

/// The manifest as stored: its text, its hash, and the object the pipeline made of it.
struct Encoded {
    text: String,
    sha256: Vec<u8>,
    stored_key: String,
    plan: layout::Plan,
    meta: Meta,
    object: bytes::Bytes,
}

/// Step 4: the manifest's JSON through the pipeline, like any file's content.
fn encode(
    pipeline: &Pipeline,
    root: &Root,
    run: &RunDir,
    manifest: &Manifest,
) -> anyhow::Result<Encoded> {
    // About 300 bytes a file: one allocation instead of a doubling series of copies.
    let mut json = Vec::with_capacity(4096 + manifest.files.len() * 320);
    serde_json::to_writer_pretty(&mut json, manifest)?;
    let text = String::from_utf8(json).context("the manifest's JSON is not UTF-8")?;
    let body = text.as_bytes();
    let body_sha = Sha256::digest(body);
    let logical = root
        .key_for(&run.path.join(RUN_DIR).join(MANIFEST_NAME))
        .map_err(anyhow::Error::msg)?;
    let plan = pipeline.plan(Path::new(MANIFEST_NAME), body);
    let stored_key = layout::stored_key(&logical, plan);
    let meta = Meta {
        size: body.len() as u64,
        mtime_ns: manifest.sealed_ms * 1_000_000,
        sha256: hex::encode(body_sha),
        mode: Some(0o644),
        path: Some(logical.clone()),
    };
    // Bound as a manifest: no file object at this key can ever pass for it.
    let bound = crate::crypto::manifest_binding(&stored_key);
    let object = bytes::Bytes::from(pipeline::encode_bytes(pipeline, plan, &meta, &bound, body)?);
    Ok(Encoded {
        text,
        sha256: body_sha.to_vec(),
        stored_key,
        plan,
        meta,
        object,
    })
}

/// Step 5: the manifest and (without a key, `with_page`) the run's browsable page, stored as
/// it is and rendered while the manifest is stored, side by side in every destination; the
/// seal fails if either does. Returns the page's key.
async fn store_manifest_and_page(
    dests: &[Destination],
    manifest: &Arc<Manifest>,
    encoded: &Encoded,
    with_page: bool,
    stories: Option<crate::format::fleet::Stories>,
) -> anyhow::Result<Option<String>> {
    let page = with_page.then(|| {
        let (manifest, stored_key) = (manifest.clone(), encoded.stored_key.clone());
        tokio::task::spawn_blocking(move || {
            let (logical, up) = page::location(&manifest);
            let html = page::render(&manifest, &stored_key, up, false, stories.as_ref());
            (logical, html)
        })
    });
    let manifest_stored = async {
        for dest in dests {
            put_own(
                dest,
                &encoded.stored_key,
                encoded.object.clone(),
                encoded.plan,
                &encoded.meta,
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
        let key = store_page(dests, logical, html, manifest.sealed_ms).await?;
        Ok(Some(key))
    };
    let ((), page_key) = tokio::try_join!(manifest_stored, page_stored)?;
    Ok(page_key)
}

/// Step 6: the seal recorded in the index together with its notifications, queued durably
/// and leased to this process until `lease_until_ms`. Returns the queued notifications.
#[allow(clippy::too_many_arguments)]
async fn record(
    config: &Config,
    index: &Arc<Index>,
    root: &Root,
    manifest: &Manifest,
    encoded: &Encoded,
    page_key: Option<&str>,
    packed: Vec<u8>,
    lease_until_ms: i64,
    events: Vec<crate::index::NewNotification>,
) -> anyhow::Result<Vec<crate::index::NewNotification>> {
    let mut queued = crate::notify::queue(
        config,
        manifest,
        &root.prefix,
        &encoded.stored_key,
        page_key,
        lease_until_ms,
    )?;
    let run = crate::index::SealedRun {
        watch: root.path.clone(),
        name: manifest.run.clone(),
        sealed_ms: manifest.sealed_ms,
        manifest_sha256: encoded.sha256.clone(),
        files: manifest.totals.files,
        bytes: manifest.totals.bytes,
        ci: manifest.ci.clone(),
        first_file_ms: manifest.first_file_ms,
        last_file_ms: manifest.last_file_ms,
        tests: manifest.tests.clone(),
    };
    queued.extend(events);
    let (i, q) = (index.clone(), queued.clone());
    tokio::task::spawn_blocking(move || i.record_run(&run, &packed, &q)).await??;
    Ok(queued)
}

/// Name the blob of each file stored as a pointer in `dest` (the destination whose keys the
/// manifest lists), from the index, so the run's page links to the bytes.
fn attach_blobs(index: &Index, dest: Option<&str>, manifest: &mut Manifest) -> anyhow::Result<()> {
    let Some(dest) = dest else { return Ok(()) };
    for f in &mut manifest.files {
        if layout::parse(&f.stored_key).pointer {
            let key = format!("{}/{}", manifest.key_prefix, f.path);
            f.blob = index
                .object_at(dest, &key)?
                .and_then(|o| o.blob)
                .map(|b| b.key);
        }
    }
    Ok(())
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
            blob: None,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
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
    let attributes =
        crate::pipeline::object_attributes(dest.supports_attributes, plan, Path::new(name), meta);
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

/// Whether run `r` has been quiet for `after` at `now`: judged by when the agent last saw one
/// of its files change, not by the files' mtimes (a tree copied with `cp -p` arrives old).
fn quiet(r: &RunInfo, after: Duration, now: i64) -> bool {
    r.last_change_ms
        .is_some_and(|ms| now.saturating_sub(ms) >= after.as_millis() as i64)
}

/// `seal_after`: seal every run that has been quiet that long and is complete everywhere
/// (open, or changed after its seal), as `seal DIR` would. Returns the runs sealed; a run
/// that cannot be sealed now is named in the log and tried again on the next pass.
pub(crate) async fn seal_quiet(
    config: &Config,
    dests: &[Destination],
    index: &Arc<Index>,
) -> anyhow::Result<Vec<String>> {
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
        if matches!(r.state, State::Sealed | State::Pruned)
            || !r.complete
            || !quiet(&r, *after, now)
        {
            continue;
        }
        let dir = r.watch.join(&r.name);
        match seal(config, dests, &dir, Duration::from_secs(10), Vec::new()).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quietness_is_judged_by_when_a_change_was_seen_not_by_mtimes() {
        // Reproduced: a run copied with `cp -p` (mtimes a day old) was sealed ~13 s after it
        // appeared, because quietness was judged by the files' mtimes.
        let now = 1_000_000_000_000;
        let day = 86_400_000;
        let run = |last_change_ms| RunInfo {
            name: "r".into(),
            watch: "/w".into(),
            state: State::Open,
            files: 1,
            bytes: 1,
            complete: true,
            destinations: Vec::new(),
            sealed_ms: None,
            sealed_files: None,
            sealed_bytes: None,
            changed: Vec::new(),
            notifications: Vec::new(),
            last_file_ms: Some(now - day),
            last_change_ms,
            tests: None,
            pruned_ms: None,
        };
        let after = Duration::from_secs(60);
        assert!(
            !quiet(&run(Some(now - 2_000)), after, now),
            "arrived 2 s ago"
        );
        assert!(quiet(&run(Some(now - 61_000)), after, now));
        assert!(!quiet(&run(None), after, now), "nothing indexed yet");
    }
}
