//! The flaky-test quarantine: a list in the primary of the failing tests CI may ignore for a
//! while, every entry with an expiry, and `gate`, which a CI job runs on its JUnit files
//! instead of trusting the test runner's exit code.
//!
//! The list is one object, `_panoptic-sync/quarantine.json` (the format is in
//! [`crate::format::quarantine`]). With a key configured it is stored encrypted (`.enc`) and
//! bound to its key with a binding of its own ([`crate::crypto::quarantine_binding`]), so
//! neither a file object nor a manifest can pass for it, and a plain list planted beside it is
//! refused. `add` and `remove` read, change and write it back with a conditional PUT (the
//! version read must still be there, or the list must still be absent), retrying when
//! another writer came first; a `file://` store cannot compare versions, so there the last
//! writer wins (docs/OPERATIONS.md).
//!
//! Every successful read is copied to the state directory (`quarantine.json`), and when the
//! primary cannot be read, `gate` decides from that copy and says so. A list that does not
//! authenticate, or cannot be parsed, is never replaced by the copy: `gate` fails closed.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::{
    Attribute, Attributes, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::destination::{self, Destination};
use crate::error::UsageError;
use crate::format::layout::{self, Compression, Plan};
use crate::format::quarantine::{
    Entry, MAX_REASON, MAX_TEST_ID, QUARANTINE_KEY, QUARANTINE_MAX_BYTES, Quarantine, test_id,
};
use crate::format::results::Outcome;
use crate::format::units::now_ms;
use crate::pipeline::{self, Meta, Pipeline};

/// The name of the list's copy in the state directory.
const CACHE_NAME: &str = "quarantine.json";
/// Conditional writes tried before `add` or `remove` gives up on a busy list.
const MAX_ATTEMPTS: u32 = 10;

/// The list in the primary, with what is needed to read and write it.
pub(crate) struct ListStore {
    primary: Destination,
    pipeline: Pipeline,
    cache: PathBuf,
    state_dir: PathBuf,
    node: String,
}

/// Why the list could not be read.
#[derive(Debug)]
enum ReadError {
    /// The primary did not answer (or refused the request): a copy may stand in.
    Unavailable(String),
    /// The primary answered with an object that is not a genuine list: never replaced.
    Refused(String),
}

/// Where the list a command used came from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub(crate) enum Source {
    /// Read from the primary now.
    Primary,
    /// The primary could not be read; the copy in the state directory decided.
    Cache {
        /// Why the primary could not be read.
        why: String,
        /// The copy.
        path: PathBuf,
        /// When the copy was written, ms since the epoch.
        cached_ms: i64,
    },
    /// Not read: there was nothing to decide.
    NotNeeded,
}

/// A list with where it came from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Listed {
    /// The list.
    pub list: Quarantine,
    /// Where it came from.
    pub source: Source,
    /// The object's key in the primary, for messages.
    pub key: String,
    /// Now, for judging expiry.
    pub now_ms: i64,
}

impl ListStore {
    /// The primary's list, with the configuration's keys.
    pub(crate) fn open(config: &Config) -> anyhow::Result<ListStore> {
        Ok(ListStore {
            primary: destination::open_primary(config)?,
            pipeline: Pipeline::from_config(config)?,
            cache: config.state_dir.join(CACHE_NAME),
            state_dir: config.state_dir.clone(),
            node: config.node_id.clone(),
        })
    }

    /// The stored key: `.enc` with a key configured, never compressed.
    fn stored_key(&self) -> String {
        layout::stored_key(QUARANTINE_KEY, self.plan())
    }

    fn plan(&self) -> Plan {
        Plan {
            compression: Compression::None,
            encrypt: self.pipeline.key.is_some(),
        }
    }

    /// The object's name for people: destination and key.
    fn named(&self, key: &str) -> String {
        format!(
            "{} in {}",
            destination::printable(&self.full_key(key)),
            self.primary.name
        )
    }

    fn full_key(&self, key: &str) -> String {
        self.primary
            .path(key)
            .map(|p| p.to_string())
            .unwrap_or_else(|_| key.to_string())
    }

    /// Read the list and the version to write against (`None`: there is no list yet).
    async fn fetch(&self) -> Result<(Quarantine, Option<UpdateVersion>), ReadError> {
        let key = self.stored_key();
        let location = self
            .primary
            .path(&key)
            .map_err(|e| ReadError::Refused(e.to_string()))?;
        let get = match self.primary.store.get(&location).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                self.refuse_plain_beside(&key).await?;
                return Ok((Quarantine::default(), None));
            }
            Err(e) => {
                return Err(ReadError::Unavailable(format!(
                    "reading {}: {}",
                    self.named(&key),
                    destination::error_chain(&e)
                )));
            }
        };
        let version = UpdateVersion {
            e_tag: get.meta.e_tag.clone(),
            version: get.meta.version.clone(),
        };
        let refused = |why: String| ReadError::Refused(format!("{}: {why}", self.named(&key)));
        if get.meta.size > QUARANTINE_MAX_BYTES {
            return Err(refused(format!(
                "{} bytes, larger than the {QUARANTINE_MAX_BYTES} a quarantine list may have; refused",
                get.meta.size
            )));
        }
        let mut raw = Vec::with_capacity(get.meta.size as usize);
        let mut stream = get.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ReadError::Unavailable(format!(
                    "reading {}: {}",
                    self.named(&key),
                    destination::error_chain(&e)
                ))
            })?;
            if (raw.len() + chunk.len()) as u64 > QUARANTINE_MAX_BYTES {
                return Err(refused(
                    "larger than a quarantine list may be; refused".into(),
                ));
            }
            raw.extend_from_slice(&chunk);
        }
        let (keys, k, plan) = (self.pipeline.keys.clone(), key.clone(), self.plan());
        let body = tokio::task::spawn_blocking(move || decode(plan, &keys, &k, raw))
            .await
            .map_err(|e| refused(e.to_string()))?
            .map_err(refused)?;
        let list = Quarantine::parse(&body).map_err(refused)?;
        Ok((list, Some(version)))
    }

    /// With a key configured and no encrypted list: a plain list in its place was planted
    /// (this agent never writes one then) and is refused, naming it, rather than ignored.
    async fn refuse_plain_beside(&self, key: &str) -> Result<(), ReadError> {
        if self.pipeline.key.is_none() {
            return Ok(());
        }
        let plain = layout::stored_key(QUARANTINE_KEY, Plan::STORED);
        let Ok(location) = self.primary.path(&plain) else {
            return Ok(());
        };
        match self.primary.store.head(&location).await {
            Ok(_) => Err(ReadError::Refused(format!(
                "{}: not encrypted although a key is configured (anyone who can write to the \
                 bucket can plant it), and {} is absent; refused",
                self.named(&plain),
                destination::printable(&self.full_key(key))
            ))),
            Err(_) => Ok(()),
        }
    }

    /// Read the list from the primary, or, when the primary cannot be read, the copy in the
    /// state directory. A list that is there but not genuine is an error, whatever the copy.
    pub(crate) async fn read(&self) -> anyhow::Result<Listed> {
        let now_ms = now_ms();
        let key = self.full_key(&self.stored_key());
        match self.fetch().await {
            Ok((list, _)) => {
                self.keep_copy(&list).await;
                Ok(Listed {
                    list,
                    source: Source::Primary,
                    key,
                    now_ms,
                })
            }
            Err(ReadError::Refused(why)) => anyhow::bail!("the quarantine list {why}"),
            Err(ReadError::Unavailable(why)) => {
                let (list, cached_ms) = read_copy(&self.cache).await.map_err(|e| {
                    anyhow::anyhow!(
                        "{why}; and no usable copy of the quarantine list in the state \
                         directory ({}: {e:#})",
                        self.cache.display()
                    )
                })?;
                Ok(Listed {
                    list,
                    source: Source::Cache {
                        why,
                        path: self.cache.clone(),
                        cached_ms,
                    },
                    key,
                    now_ms,
                })
            }
        }
    }

    /// Change the list with `change` and write it back, conditionally: when another writer
    /// changed it in between, read it again and apply `change` to that. Returns what `change`
    /// returned the last time, and the list written.
    async fn update<T>(
        &self,
        mut change: impl FnMut(&mut Quarantine) -> Result<T, UsageError>,
    ) -> anyhow::Result<(T, Quarantine)> {
        let key = self.stored_key();
        let location = self.primary.path(&key)?;
        for attempt in 1..=MAX_ATTEMPTS {
            let (mut list, version) = match self.fetch().await {
                Ok(v) => v,
                Err(ReadError::Refused(why)) => anyhow::bail!(
                    "the quarantine list {why} (delete the object to start a new list)"
                ),
                Err(ReadError::Unavailable(why)) => anyhow::bail!("{why}"),
            };
            let out = change(&mut list)?;
            let payload = PutPayload::from(self.encode(&list)?);
            let mode = match version {
                Some(v) => PutMode::Update(v),
                None => PutMode::Create,
            };
            let ticket = self.primary.ticket();
            let written = match self.put(&location, payload.clone(), mode).await {
                Err(object_store::Error::NotImplemented { .. }) => {
                    // A `file://` store compares no versions: the last writer wins there.
                    tracing::debug!("conditional put not supported: overwriting the list");
                    self.put(&location, payload, PutMode::Overwrite).await
                }
                other => other,
            };
            match written {
                Ok(_) => {
                    self.primary.persist(ticket).await?;
                    self.keep_copy(&list).await;
                    return Ok((out, list));
                }
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => {
                    tracing::debug!("the quarantine list changed meanwhile: reading it again");
                    tokio::time::sleep(crate::format::units::retry_delay(
                        i64::from(attempt),
                        std::time::Duration::from_millis(50),
                        std::time::Duration::from_secs(2),
                    ))
                    .await;
                }
                Err(e) => anyhow::bail!(
                    "writing {}: {}",
                    self.named(&key),
                    destination::error_chain(&e)
                ),
            }
        }
        anyhow::bail!(
            "{} changed under every one of {MAX_ATTEMPTS} attempts to write it; try again",
            self.named(&key)
        )
    }

    async fn put(
        &self,
        location: &object_store::path::Path,
        payload: PutPayload,
        mode: PutMode,
    ) -> object_store::Result<object_store::PutResult> {
        let mut attributes = Attributes::new();
        if self.primary.supports_attributes {
            let plan = self.plan();
            attributes.insert(
                Attribute::ContentType,
                plan.content_type(Path::new(QUARANTINE_KEY)).into(),
            );
            attributes.insert(Attribute::CacheControl, "no-cache".into());
        }
        let opts = PutOptions {
            mode,
            attributes,
            ..Default::default()
        };
        self.primary.store.put_opts(location, payload, opts).await
    }

    /// The object's bytes: the JSON, or with a key its container bound as the list.
    fn encode(&self, list: &Quarantine) -> anyhow::Result<Vec<u8>> {
        let body = list.to_json();
        let plan = self.plan();
        if !plan.encrypt {
            return Ok(body);
        }
        let meta = Meta {
            size: body.len() as u64,
            mtime_ns: now_ms().saturating_mul(1_000_000),
            sha256: hex::encode(Sha256::digest(&body)),
            mode: Some(0o644),
            path: Some(QUARANTINE_KEY.to_string()),
        };
        let bound = crate::crypto::quarantine_binding(&self.stored_key());
        Ok(pipeline::encode_bytes(
            &self.pipeline,
            plan,
            &meta,
            &bound,
            &body,
        )?)
    }

    /// Copy a list just read or written to the state directory (a failure is logged: the
    /// command's own result stands).
    async fn keep_copy(&self, list: &Quarantine) {
        let (dir, path, body) = (self.state_dir.clone(), self.cache.clone(), list.to_json());
        let res = tokio::task::spawn_blocking(move || write_copy(&dir, &path, &body)).await;
        if let Err(e) = res.map_err(anyhow::Error::from).and_then(|r| r) {
            tracing::warn!(
                error = %format!("{e:#}"),
                "cannot keep a copy of the quarantine list in the state directory"
            );
        }
    }
}

/// Decode the list's object bytes (`raw`) stored under `key` as `plan`.
fn decode(
    plan: Plan,
    keys: &[crate::crypto::MasterKey],
    key: &str,
    raw: Vec<u8>,
) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    if !plan.encrypt {
        return Ok(raw);
    }
    let (r, meta) = pipeline::quarantine_decoder(plan, keys, key, std::io::Cursor::new(raw))
        .map_err(|e| format!("does not authenticate as the quarantine list ({e}); refused"))?;
    let mut body = Vec::new();
    r.take(QUARANTINE_MAX_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("does not authenticate as the quarantine list ({e}); refused"))?;
    if body.len() as u64 > QUARANTINE_MAX_BYTES {
        return Err("larger than a quarantine list may be; refused".into());
    }
    if let Some(m) = meta
        && !crate::restore::same_sha256(&m.sha256, &hex::encode(Sha256::digest(&body)))
    {
        return Err("content does not match the SHA-256 recorded with it; refused".into());
    }
    Ok(body)
}

/// Write the copy: tmp, sync, rename, in the state directory (0700, the copy 0600).
fn write_copy(state_dir: &Path, path: &Path, body: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    crate::index::create_state_dir(state_dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    f.write_all(body)
        .and_then(|()| f.sync_all())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("renaming {} into place: {e}", tmp.display()))?;
    Ok(())
}

/// Read the copy and when it was written.
async fn read_copy(path: &Path) -> anyhow::Result<(Quarantine, i64)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let meta = std::fs::metadata(&path)?;
        anyhow::ensure!(
            meta.len() <= QUARANTINE_MAX_BYTES,
            "larger than a quarantine list may be"
        );
        let body = std::fs::read(&path)?;
        let cached_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        Ok((
            Quarantine::parse(&body).map_err(anyhow::Error::msg)?,
            cached_ms,
        ))
    })
    .await?
}

/// A test id from the command line: `class::name`, printable, not too long.
fn check_test_id(test: &str) -> Result<(), UsageError> {
    let bad = |why: &str| {
        UsageError(format!(
            "bad test id {:?}: {why}",
            destination::printable(test)
        ))
    };
    match test.split_once("::") {
        Some((class, name)) if !class.is_empty() && !name.is_empty() => {}
        _ => {
            return Err(bad(
                "want CLASS::NAME (the class, or the suite without one, and the test's name)",
            ));
        }
    }
    if test.len() > MAX_TEST_ID {
        return Err(bad(&format!("longer than {MAX_TEST_ID} bytes")));
    }
    if test.chars().any(char::is_control) {
        return Err(bad("holds a control character"));
    }
    Ok(())
}

/// An entry for `test` from the command line's words, by this node, now.
fn entry(store: &ListStore, test: &str, reason: &str, expires: &str) -> Result<Entry, UsageError> {
    check_test_id(test)?;
    let now = now_ms();
    let expires =
        crate::format::quarantine::parse_expiry(expires, now, crate::config::parse_duration)
            .map_err(UsageError)?;
    if reason.trim().is_empty() {
        return Err(UsageError("a quarantine needs a reason (--reason)".into()));
    }
    Ok(Entry {
        test: test.to_string(),
        reason: crate::results::truncate(reason.trim(), MAX_REASON),
        expires,
        added_by: store.node.clone(),
        added_ms: now,
    })
}

/// What `quarantine add` or `remove` did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Changed {
    /// `added`, `replaced` or `removed`.
    pub action: &'static str,
    /// The entries concerned (for `removed`, the entry as it was).
    pub entries: Vec<Entry>,
    /// The object written.
    pub key: String,
}

/// `quarantine add TEST --reason R --expires D`: add the entry, or replace the test's entry.
pub(crate) async fn add(
    store: &ListStore,
    test: &str,
    reason: &str,
    expires: &str,
) -> anyhow::Result<Changed> {
    let e = entry(store, test, reason, expires)?;
    let (replaced, _) = store
        .update(|list| {
            let had = list.get(&e.test).is_some();
            list.upsert(e.clone());
            Ok(had)
        })
        .await?;
    Ok(Changed {
        action: if replaced { "replaced" } else { "added" },
        entries: vec![e],
        key: store.full_key(&store.stored_key()),
    })
}

/// `quarantine remove TEST`: a test without an entry is a usage error (exit 2).
pub(crate) async fn remove(store: &ListStore, test: &str) -> anyhow::Result<Changed> {
    let (gone, _) = store
        .update(|list| {
            let e = list.get(test).cloned().ok_or_else(|| {
                UsageError(format!(
                    "{} is not in the quarantine list",
                    destination::printable(test)
                ))
            })?;
            list.remove(test);
            Ok(e)
        })
        .await?;
    Ok(Changed {
        action: "removed",
        entries: vec![gone],
        key: store.full_key(&store.stored_key()),
    })
}

/// A flaky test proposed for the quarantine.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Proposal {
    /// `class::name`.
    pub test: String,
    /// Its suite.
    pub suite: String,
    /// Revisions on which it both failed and passed.
    pub revisions: u64,
    /// Some of those commits.
    pub commits: Vec<String>,
}

/// What `quarantine propose` found (and, with `--add`, added).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Proposed {
    /// The fleet's flaky tests that no unexpired entry quarantines.
    pub proposals: Vec<Proposal>,
    /// Flaky tests left out because they are quarantined already.
    pub already: usize,
    /// The entries added (`--add`).
    pub added: Vec<Entry>,
}

/// `quarantine propose`: the flaky tests of `report --fleet`'s results (from the run records
/// in the primary) that the list does not quarantine; with `add`, added with `expires` and
/// a reason naming the evidence (or `reason`).
pub(crate) async fn propose(
    store: &ListStore,
    query: &crate::results::fleet::Query,
    add: Option<(&str, Option<&str>)>,
) -> anyhow::Result<Proposed> {
    let results = crate::results::fleet::read(&store.primary, query).await?;
    let listed = store.read().await?;
    let mut proposed = Proposed {
        proposals: Vec::new(),
        already: 0,
        added: Vec::new(),
    };
    for f in &results.flaky {
        let test = test_id(&f.class, &f.name);
        if listed
            .list
            .get(&test)
            .is_some_and(|e| e.active(listed.now_ms))
        {
            proposed.already += 1;
            continue;
        }
        proposed.proposals.push(Proposal {
            test,
            suite: f.suite.clone(),
            revisions: f.revisions,
            commits: f.commits.clone(),
        });
    }
    let Some((expires, reason)) = add else {
        return Ok(proposed);
    };
    let mut entries = Vec::new();
    for p in &proposed.proposals {
        if check_test_id(&p.test).is_err() {
            continue;
        }
        let why = reason.map(str::to_string).unwrap_or_else(|| {
            format!(
                "flaky: failed and passed on {} revision{} (proposed from report --fleet)",
                p.revisions,
                if p.revisions == 1 { "" } else { "s" }
            )
        });
        entries.push(entry(store, &p.test, &why, expires)?);
    }
    if !entries.is_empty() {
        store
            .update(|list| {
                for e in &entries {
                    list.upsert(e.clone());
                }
                Ok(())
            })
            .await?;
    }
    proposed.added = entries;
    Ok(proposed)
}

/// How the gate judged one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    /// An unexpired entry quarantines it.
    Quarantined,
    /// Its entry has expired.
    Expired,
    /// No entry.
    NotQuarantined,
}

/// One failed (or errored) test case and how the gate judged it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GateFailure {
    /// `class::name`.
    pub test: String,
    /// `failed` or `error`.
    pub outcome: Outcome,
    /// The JUnit file it came from.
    pub file: PathBuf,
    /// The judgement.
    pub verdict: Verdict,
    /// Its entry's expiry, if it has an entry.
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
}

/// A JUnit file given to `gate` that could not be used.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BadFile {
    /// As given.
    pub path: PathBuf,
    /// Why.
    pub error: String,
}

/// What `gate` found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Gate {
    /// Test cases read (every outcome).
    pub tests: usize,
    /// Failures and errors, each judged.
    pub failures: Vec<GateFailure>,
    /// Files that could not be read or parsed (each fails the gate).
    pub bad_files: Vec<BadFile>,
    /// Where the list came from.
    pub source: Source,
}

impl Gate {
    /// The gate passes when tests were found, every file was read, and every failure is
    /// quarantined by an unexpired entry.
    pub(crate) fn passed(&self) -> bool {
        self.tests > 0
            && self.bad_files.is_empty()
            && self
                .failures
                .iter()
                .all(|f| f.verdict == Verdict::Quarantined)
    }
}

/// `gate JUNIT...`: read every file, and when any case failed, judge each failure by the
/// list (from the primary, or the copy when the primary cannot be read). A list that is not
/// genuine is an error: the gate fails closed.
pub(crate) async fn gate(config: &Config, files: &[PathBuf]) -> anyhow::Result<Gate> {
    let paths = files.to_vec();
    let parsed = tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|p| {
                let r = crate::results::parse_local(&p);
                (p, r)
            })
            .collect::<Vec<_>>()
    })
    .await?;
    let mut out = Gate {
        tests: 0,
        failures: Vec::new(),
        bad_files: Vec::new(),
        source: Source::NotNeeded,
    };
    let mut failed = Vec::new();
    for (path, res) in parsed {
        match res {
            Ok(cases) => {
                out.tests += cases.len();
                failed.extend(
                    cases
                        .into_iter()
                        .filter(|c| c.outcome.is_failure())
                        .map(|c| (test_id(&c.class, &c.name), c.outcome, path.clone())),
                );
            }
            Err(error) => out.bad_files.push(BadFile { path, error }),
        }
    }
    if failed.is_empty() {
        return Ok(out);
    }
    let listed = ListStore::open(config)?.read().await?;
    out.source = listed.source;
    for (test, outcome, file) in failed {
        let entry = listed.list.get(&test);
        let verdict = match entry {
            Some(e) if e.active(listed.now_ms) => Verdict::Quarantined,
            Some(_) => Verdict::Expired,
            None => Verdict::NotQuarantined,
        };
        out.failures.push(GateFailure {
            test,
            outcome,
            file,
            verdict,
            expires: entry.map(|e| e.expires),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate_of(verdicts: &[Verdict], tests: usize) -> Gate {
        Gate {
            tests,
            failures: verdicts
                .iter()
                .map(|v| GateFailure {
                    test: "a::b".into(),
                    outcome: Outcome::Failed,
                    file: "r.xml".into(),
                    verdict: *v,
                    expires: None,
                })
                .collect(),
            bad_files: Vec::new(),
            source: Source::NotNeeded,
        }
    }

    #[test]
    fn the_gate_passes_only_with_tests_and_every_failure_quarantined() {
        use Verdict::*;
        assert!(gate_of(&[], 3).passed());
        assert!(gate_of(&[Quarantined, Quarantined], 3).passed());
        assert!(!gate_of(&[Quarantined, NotQuarantined], 3).passed());
        assert!(!gate_of(&[Expired], 3).passed());
        assert!(!gate_of(&[], 0).passed(), "no tests: the job crashed");
        let mut bad = gate_of(&[], 3);
        bad.bad_files.push(BadFile {
            path: "x.xml".into(),
            error: "not well-formed".into(),
        });
        assert!(!bad.passed());
    }

    #[test]
    fn test_ids_are_class_colon_colon_name() {
        assert!(check_test_id("com.example.LoginTest::logs_in").is_ok());
        assert!(check_test_id("crate::module::test").is_ok());
        assert!(check_test_id("no_class").is_err());
        assert!(check_test_id("::name").is_err());
        assert!(check_test_id("class::").is_err());
        assert!(check_test_id("a::b\u{1b}[2J").is_err());
    }

    #[test]
    fn a_list_bound_as_a_file_or_a_manifest_does_not_pass_for_the_list() {
        let key = crate::crypto::MasterKey::generate().unwrap();
        let pipeline = Pipeline {
            key: Some(key.clone()),
            keys: vec![key.clone()],
            ..Pipeline::plain()
        };
        let plan = Plan {
            compression: Compression::None,
            encrypt: true,
        };
        let stored = layout::stored_key(QUARANTINE_KEY, plan);
        let body = Quarantine::default().to_json();
        let meta = Meta {
            size: body.len() as u64,
            mtime_ns: 0,
            sha256: hex::encode(Sha256::digest(&body)),
            mode: None,
            path: None,
        };
        let keys = [key];
        for (bound, genuine) in [
            (crate::crypto::quarantine_binding(&stored), true),
            (stored.clone(), false),
            (crate::crypto::manifest_binding(&stored), false),
        ] {
            let raw = pipeline::encode_bytes(&pipeline, plan, &meta, &bound, &body).unwrap();
            let res = decode(plan, &keys, &stored, raw);
            assert_eq!(res.is_ok(), genuine, "{bound:?}: {res:?}");
        }
    }
}
