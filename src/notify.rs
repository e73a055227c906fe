//! Notifications of sealed runs (`[[notify]]`): an HTTP POST of a JSON document, or a
//! command run without a shell.
//!
//! `seal` queues one notification per `[[notify]]` entry in the same index transaction that
//! records the seal (so neither exists without the other), after every destination holds
//! every file of the run and the manifest. The rows are queued leased to the sealing process,
//! which tries each a few times at once ([`after_seal`]); whatever is still pending then is
//! sent by the daemon's notify loop ([`run_loop`]), with exponential backoff and jitter
//! ([`crate::format::units::backoff`]), across restarts and `kill -9`.
//!
//! Whoever sends a notification first takes its lease in the index (a conditional `UPDATE`),
//! so `seal` and the daemon, both on the same index, never send one at the same time. A row
//! is marked sent only after a 2xx answer (or exit status 0). A process that dies after the
//! receiver answered and before the index recorded it leaves the row pending: it is sent again
//! with the same `Idempotency-Key` header (the `id` field of the document), which a receiver
//! uses to drop the duplicate. After [`GIVE_UP_AFTER`] of failures a notification is given up.
//!
//! URLs and header values may hold secrets: neither is ever logged or recorded as an error;
//! logs name the `[[notify]]` entry and the run.
//!
//! The body is built when the seal queues it: the JSON document ([`Payload`]), or for a
//! `format = "slack" | "teams" | "google-chat"` webhook that service's message ([`chat`]).
//! An entry with `only = "failures"` gets nothing queued for a run that did not fail
//! ([`chat::failed`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub(crate) mod chat;

use crate::config::{Config, Notify, NotifyEvent, NotifyOnly};
use crate::format::ci::Ci;
use crate::format::manifest::Manifest;
use crate::index::{Index, NewNotification, NotifyOutcome, PendingNotification};

/// Version of the notification document; receivers should refuse versions they do not know.
pub(crate) const FORMAT: u32 = 1;
/// A notification failing for this long after its seal is given up.
pub(crate) const GIVE_UP_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);
/// Attempts `seal` makes itself before leaving a notification to the daemon.
const SEAL_ATTEMPTS: u32 = 3;
/// A lease outlives the attempt it covers by this much (recording the outcome).
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// The daemon looks for notifications queued by other processes (`seal`) at least this often.
const RESCAN: Duration = Duration::from_secs(30);
/// Notifications the daemon sends at once.
const BATCH: usize = 16;
/// At shutdown, sends in flight get this long to finish before they are abandoned.
const DRAIN: Duration = Duration::from_secs(10);
/// Bytes of a failing command's standard error kept in its error.
const STDERR_TAIL: usize = 400;

/// The document sent for a sealed run (`"format": 1`, see docs/FORMAT.md).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Payload<'a> {
    /// [`FORMAT`].
    pub format: u32,
    /// What happened: `run.sealed`.
    pub event: &'static str,
    /// Unique id of this notification, also sent as the `Idempotency-Key` header.
    pub id: &'a str,
    /// The `[[notify]]` entry it is for.
    pub notifier: &'a str,
    /// Run name.
    pub run: &'a str,
    /// Node that sealed it.
    pub node: &'a str,
    /// The watch's key prefix (`{node}` expanded).
    pub prefix: &'a str,
    /// The run's key prefix, `<prefix>/<run>`.
    pub key_prefix: &'a str,
    /// CI context.
    pub ci: Option<&'a Ci>,
    /// Labels of the seal.
    pub labels: &'a BTreeMap<String, String>,
    /// Files in the manifest.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Oldest file modification time (ms).
    pub first_file_ms: Option<i64>,
    /// Newest file modification time (ms).
    pub last_file_ms: Option<i64>,
    /// When the run was sealed (ms).
    pub sealed_ms: i64,
    /// The manifest's stored key, relative to each destination's base.
    pub manifest_key: &'a str,
    /// Destinations holding the run, the primary first.
    pub destinations: Vec<&'a str>,
    /// Public link to the manifest (the primary's `public_base_url` + its key), if any.
    pub manifest_url: Option<String>,
    /// The run's page key, relative to each destination's base (null with encryption on:
    /// no page is written).
    pub page_key: Option<&'a str>,
    /// Link to the run's page: the primary's `public_base_url` + its key, or a `file://` URL
    /// when the primary is a local store; null otherwise (presigned links expire).
    pub page_url: Option<String>,
    /// The run's test summary (as in the manifest); null when the run has no JUnit XML.
    pub tests: Option<&'a crate::format::results::TestSummary>,
}

/// The notifications to queue for a seal, one per `[[notify]]` entry, leased to the sealing
/// process until `lease_until_ms`.
pub(crate) fn queue(
    config: &Config,
    manifest: &Manifest,
    prefix: &str,
    manifest_key: &str,
    page_key: Option<&str>,
    lease_until_ms: i64,
) -> anyhow::Result<Vec<NewNotification>> {
    let primary = config.destinations().next();
    let manifest_url = primary
        .and_then(|d| d.public_base_url.as_deref())
        .map(|base| crate::destination::public_url(base, manifest_key));
    let page_url = page_key.and_then(|key| {
        let primary = primary?;
        match &primary.public_base_url {
            Some(base) => Some(crate::destination::public_url(base, key)),
            None if primary.url.scheme() == "file" => {
                let dir = primary.url.to_file_path().ok()?;
                url::Url::from_file_path(dir.join(key))
                    .ok()
                    .map(String::from)
            }
            None => None,
        }
    });
    // A chat message links the page only where anyone can open it: a public http(s) base.
    let chat_link = page_key.and_then(|key| {
        let base = primary?.public_base_url.as_deref()?;
        chat::page_link(base, key)
    });
    let ci = manifest.ci.as_ref();
    let facts = chat::RunFacts {
        run: &manifest.run,
        node: &manifest.node,
        tests: manifest.tests.as_ref(),
        branch: ci.and_then(|c| c.branch.as_deref().or(c.tag.as_deref())),
        commit: ci.and_then(|c| c.commit.as_deref()),
        page_url: chat_link.as_deref(),
    };
    let mut out = Vec::new();
    for n in &config.notify {
        let n = n.get_ref();
        if !wants(n, manifest) {
            continue;
        }
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw)
            .map_err(|e| anyhow::anyhow!("cannot make a notification id: {e}"))?;
        let id = hex::encode(raw);
        let payload = Payload {
            format: FORMAT,
            event: "run.sealed",
            id: &id,
            notifier: n.name(),
            run: &manifest.run,
            node: &manifest.node,
            prefix,
            key_prefix: &manifest.key_prefix,
            ci: manifest.ci.as_ref(),
            labels: &manifest.labels,
            files: manifest.totals.files,
            bytes: manifest.totals.bytes,
            first_file_ms: manifest.first_file_ms,
            last_file_ms: manifest.last_file_ms,
            sealed_ms: manifest.sealed_ms,
            manifest_key,
            destinations: config.destinations().map(|d| d.name.as_str()).collect(),
            manifest_url: manifest_url.clone(),
            page_key,
            page_url: page_url.clone(),
            tests: manifest.tests.as_ref(),
        };
        let body = match chat::body(n.format, &facts) {
            Some(message) => serde_json::to_string(&message)?,
            None => serde_json::to_string(&payload)?,
        };
        out.push(NewNotification {
            notifier: n.name().to_string(),
            payload: body,
            idempotency_key: id,
            manifest_key: manifest_key.to_string(),
            lease_until_ms,
            once: false,
        });
    }
    Ok(out)
}

/// The document sent for a test's change of state (`"format": 1`, see docs/FORMAT.md).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EventPayload<'a> {
    /// [`FORMAT`].
    pub format: u32,
    /// `test.flaky`, `test.broken`, `test.fixed` or `quarantine.expiring`.
    pub event: &'static str,
    /// The same for every node that announces this change (see [`event_id`]); also the
    /// `Idempotency-Key` header.
    pub id: &'a str,
    /// The `[[notify]]` entry it is for.
    pub notifier: &'a str,
    /// The test id, `class::name`.
    pub test: &'a str,
    /// The change (`test.*`), with the commits it concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<&'a crate::format::fleet::TestChange>,
    /// The quarantine entry (`quarantine.expiring`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<&'a crate::format::quarantine::Entry>,
    /// The repository of the run whose seal found it.
    pub repository: Option<&'a str>,
    /// That run.
    pub run: &'a str,
    /// Its node.
    pub node: &'a str,
    /// Its key prefix.
    pub key_prefix: &'a str,
    /// Its page, as in `run.sealed`.
    pub page_url: Option<String>,
}

/// Whether any `[[notify]]` entry asks for `event`.
pub(crate) fn any_wants(config: &Config, event: NotifyEvent) -> bool {
    config
        .notify
        .iter()
        .any(|n| n.get_ref().events.contains(&event))
}

/// The id of an announcement of `event` about `test` at `at` (a commit, or a quarantine
/// entry's expiry) to the `[[notify]]` entry `notifier`: the same on every node and in every seal that finds the same change, so
/// the index queues it once and a receiver drops what another node sent.
pub(crate) fn event_id(
    notifier: &str,
    event: NotifyEvent,
    repository: Option<&str>,
    branch: Option<&str>,
    test: &str,
    at: &str,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        "panoptic-sync event",
        notifier,
        event.as_str(),
        repository.unwrap_or(""),
        branch.unwrap_or(""),
        test,
        at,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}

/// The notifications of the state changes a seal found (`changes`) and of the quarantine
/// entries of its tests that expire soon or have expired (`expiring`), one per entry and
/// `[[notify]]` entry that asks for that event.
pub(crate) fn queue_events(
    config: &Config,
    manifest: &Manifest,
    changes: &[crate::format::fleet::TestChange],
    expiring: &[crate::format::quarantine::Entry],
    page_key: Option<&str>,
    manifest_key: &str,
    lease_until_ms: i64,
) -> anyhow::Result<Vec<NewNotification>> {
    use crate::format::fleet::ChangeKind;
    let primary = config.destinations().next();
    let page_url = page_key.and_then(|key| {
        let base = primary?.public_base_url.as_deref()?;
        Some(crate::destination::public_url(base, key))
    });
    let chat_link =
        page_key.and_then(|key| chat::page_link(primary?.public_base_url.as_deref()?, key));
    let ci = manifest.ci.as_ref();
    let repository = ci.and_then(|c| c.repository.as_deref());
    let mut out = Vec::new();
    let mut push = |n: &Notify,
                    event: NotifyEvent,
                    test: &str,
                    at: &str,
                    branch: Option<&str>,
                    change: Option<&crate::format::fleet::TestChange>,
                    entry: Option<&crate::format::quarantine::Entry>,
                    facts: chat::EventFacts<'_>|
     -> anyhow::Result<()> {
        let id = event_id(n.name(), event, repository, branch, test, at);
        let payload = EventPayload {
            format: FORMAT,
            event: event.as_str(),
            id: &id,
            notifier: n.name(),
            test,
            change,
            quarantine: entry,
            repository,
            run: &manifest.run,
            node: &manifest.node,
            key_prefix: &manifest.key_prefix,
            page_url: page_url.clone(),
        };
        let body = match chat::event_body(n.format, &facts) {
            Some(message) => serde_json::to_string(&message)?,
            None => serde_json::to_string(&payload)?,
        };
        out.push(NewNotification {
            notifier: n.name().to_string(),
            payload: body,
            idempotency_key: id,
            manifest_key: manifest_key.to_string(),
            lease_until_ms,
            once: true,
        });
        Ok(())
    };
    for n in &config.notify {
        let n = n.get_ref();
        for c in changes {
            let (event, headline) = match c.kind {
                ChangeKind::Flaky => (NotifyEvent::TestFlaky, "Test became flaky"),
                ChangeKind::Broken => (NotifyEvent::TestBroken, "Test broken"),
                ChangeKind::Fixed => (NotifyEvent::TestFixed, "Test fixed"),
            };
            if !n.events.contains(&event) {
                continue;
            }
            let test = format!("{}::{}", c.class, c.name);
            let mut facts = Vec::new();
            if let Some(b) = &c.branch {
                facts.push(("Branch", b.clone()));
            }
            facts.push(("Commit", c.commit.chars().take(12).collect()));
            facts.push(("Run", format!("{} on {}", manifest.run, manifest.node)));
            let facts = chat::EventFacts {
                headline,
                test: &test,
                facts,
                page_url: chat_link.as_deref(),
            };
            // A flake is announced once per test and repository; the others per branch.
            let branch = match c.kind {
                ChangeKind::Flaky => None,
                _ => c.branch.as_deref(),
            };
            let at = match c.kind {
                ChangeKind::Flaky => "",
                _ => c.commit.as_str(),
            };
            push(n, event, &test, at, branch, Some(c), None, facts)?;
        }
        if n.events.contains(&NotifyEvent::QuarantineExpiring) {
            for e in expiring {
                let expires = e.expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let facts = chat::EventFacts {
                    headline: "Quarantine expiring",
                    test: &e.test,
                    facts: vec![("Expires", expires.clone()), ("Reason", e.reason.clone())],
                    page_url: chat_link.as_deref(),
                };
                push(
                    n,
                    NotifyEvent::QuarantineExpiring,
                    &e.test,
                    &expires,
                    None,
                    None,
                    Some(e),
                    facts,
                )?;
            }
        }
    }
    Ok(out)
}

/// Whether `notifier` announces this seal (its `events` and its `only` rule).
pub(crate) fn wants(notifier: &Notify, manifest: &Manifest) -> bool {
    if !notifier.events.contains(&NotifyEvent::RunSealed) {
        return false;
    }
    match notifier.only {
        NotifyOnly::All => true,
        NotifyOnly::Failures => chat::failed(manifest.tests.as_ref()),
    }
}

/// The entries whose `only` rule leaves this seal out (nothing is queued for them), as
/// [`Delivery`]s for `seal` to report.
pub(crate) fn left_out(config: &Config, manifest: &Manifest) -> Vec<Delivery> {
    config
        .notify
        .iter()
        .map(|n| n.get_ref())
        .filter(|n| !wants(n, manifest))
        .map(|n| Delivery {
            notifier: n.name().to_string(),
            error: None,
            left_out: true,
        })
        .collect()
}

/// `check-config`'s look at each `[[notify]]` entry, in order, without sending anything: a
/// `command`'s program exists and may be executed (looked up in `PATH` when it names no
/// directory, as starting it does); a `url`'s host accepts a TCP connection on its port
/// (connected to and closed at once: nothing is sent, so no request reaches the receiver).
/// `Ok` says what was found, `Err` what is wrong; both name the entry. Neither the URL's path
/// and query nor a header value is shown (they may hold tokens).
pub(crate) async fn check(config: &Config) -> Vec<Result<String, String>> {
    let one = |n: &Notify| {
        let n = n.clone();
        async move {
            let at = format!("[[notify]] {:?}", n.name());
            match (&n.url, &n.command) {
                (Some(url), _) => check_url(url, n.timeout).await,
                (None, Some(argv)) => check_program(argv.first().map(String::as_str)),
                (None, None) => Err("neither url nor command configured".into()),
            }
            .map(|ok| format!("{at}: {ok}"))
            .map_err(|e| format!("{at}: {e}"))
        }
    };
    futures::future::join_all(config.notify.iter().map(|n| one(n.get_ref()))).await
}

/// A webhook's host and port take a TCP connection within `timeout` (at most 10 s).
async fn check_url(url: &url::Url, timeout: Duration) -> Result<String, String> {
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    // `host` of an IPv6 address keeps its brackets, which a socket address does not want.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let connect = tokio::net::TcpStream::connect((bare.as_str(), port));
    match tokio::time::timeout(timeout.min(Duration::from_secs(10)), connect).await {
        Ok(Ok(_stream)) => Ok(format!(
            "webhook host {host} port {port} accepts connections (nothing was sent)"
        )),
        Ok(Err(e)) => Err(format!(
            "cannot connect to webhook host {host} port {port}: {e}"
        )),
        Err(_) => Err(format!(
            "webhook host {host} port {port} did not accept a connection within {}",
            humantime::format_duration(timeout.min(Duration::from_secs(10)))
        )),
    }
}

/// A command's program exists, is a file, and this user may execute it.
fn check_program(program: Option<&str>) -> Result<String, String> {
    let Some(program) = program else {
        return Err("empty command".into());
    };
    let runnable = |p: &std::path::Path| {
        p.is_file() && rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok()
    };
    if program.contains('/') {
        let path = std::path::Path::new(program);
        return if !path.exists() {
            Err(format!("command {program:?} does not exist"))
        } else if runnable(path) {
            Ok(format!("command {program:?} is executable"))
        } else {
            Err(format!(
                "command {program:?} is not an executable file (for this user)"
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    match std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
    {
        Some(found) => Ok(format!(
            "command {program:?} is executable ({} on this PATH)",
            found.display()
        )),
        None => Err(format!(
            "command {program:?} is not found on PATH, or not executable"
        )),
    }
}

/// Why one attempt failed.
#[derive(Debug)]
struct Failure {
    /// What went wrong (no URL, no header value).
    error: String,
    /// Retrying soon cannot help (a 4xx answer, a missing program): retried slowly.
    permanent: bool,
}

/// Sends notifications: the configured entries and one HTTP client.
pub(crate) struct Sender {
    notifiers: HashMap<String, Notify>,
    client: reqwest::Client,
    node: String,
}

impl Sender {
    /// A sender for the `[[notify]]` entries of `config`.
    pub(crate) fn new(config: &Config) -> anyhow::Result<Sender> {
        let client = reqwest::Client::builder()
            // A redirected POST would become a GET or go elsewhere: answered 3xx is a failure.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("panoptic-sync/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the HTTP client for [[notify]]: {e}"))?;
        Ok(Sender {
            notifiers: config
                .notify
                .iter()
                .map(|n| (n.get_ref().name().to_string(), n.get_ref().clone()))
                .collect(),
            client,
            node: config.node_id.clone(),
        })
    }

    /// How long one attempt at a notification for `notifier` may take.
    fn timeout(&self, notifier: &str) -> Duration {
        self.notifiers
            .get(notifier)
            .map(|n| n.timeout)
            .unwrap_or(Duration::from_secs(10))
    }

    /// One attempt at delivering `n`.
    async fn attempt(&self, n: &PendingNotification) -> Result<(), Failure> {
        let Some(notifier) = self.notifiers.get(&n.notifier) else {
            return Err(Failure {
                error: format!(
                    "no [[notify]] named {:?} in the configuration any more",
                    n.notifier
                ),
                permanent: true,
            });
        };
        match (&notifier.url, &notifier.command) {
            (Some(url), _) => self.post(notifier, url, n).await,
            (None, Some(argv)) => self.command(notifier, argv, n).await,
            (None, None) => Err(Failure {
                error: "neither url nor command configured".into(),
                permanent: true,
            }),
        }
    }

    async fn post(
        &self,
        notifier: &Notify,
        url: &url::Url,
        n: &PendingNotification,
    ) -> Result<(), Failure> {
        let mut request = self
            .client
            .post(url.clone())
            .timeout(notifier.timeout)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", n.idempotency_key.as_str());
        for (name, value) in notifier.headers() {
            request = request.header(name, value);
        }
        let response = request
            .body(n.payload.clone())
            .send()
            .await
            .map_err(|e| Failure {
                error: http_error(e),
                permanent: false,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let note = if status.is_redirection() {
            " (redirects are not followed)"
        } else {
            ""
        };
        Err(Failure {
            error: format!("answered HTTP {status}{note}"),
            permanent: status.is_client_error() && !matches!(status.as_u16(), 408 | 425 | 429),
        })
    }

    async fn command(
        &self,
        notifier: &Notify,
        argv: &[String],
        n: &PendingNotification,
    ) -> Result<(), Failure> {
        use tokio::io::AsyncWriteExt;
        let argv: Vec<String> = argv
            .iter()
            .map(|a| expand(a, &n.run, &n.manifest_key, &self.node))
            .collect();
        let Some((program, args)) = argv.split_first() else {
            return Err(Failure {
                error: "empty command".into(),
                permanent: true,
            });
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure {
                error: format!("cannot start {program:?}: {e}"),
                permanent: e.kind() == std::io::ErrorKind::NotFound,
            })?;
        let stdin = child.stdin.take();
        let payload = n.payload.clone();
        // The document goes to standard input; a command that does not read it is fine.
        let write = async move {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(payload.as_bytes()).await;
            }
        };
        let run = async { tokio::join!(write, child.wait_with_output()).1 };
        // On a timeout the child is dropped, and so killed (kill_on_drop).
        match tokio::time::timeout(notifier.timeout, run).await {
            Err(_) => Err(Failure {
                error: format!(
                    "{program:?} did not exit within {}",
                    humantime::format_duration(notifier.timeout)
                ),
                permanent: false,
            }),
            Ok(Err(e)) => Err(Failure {
                error: format!("waiting for {program:?}: {e}"),
                permanent: false,
            }),
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let stderr = stderr.trim();
                let mut start = stderr.len().saturating_sub(STDERR_TAIL);
                while !stderr.is_char_boundary(start) {
                    start += 1;
                }
                let tail = &stderr[start..];
                Err(Failure {
                    error: if tail.is_empty() {
                        format!("{program:?} {}", out.status)
                    } else {
                        format!("{program:?} {}: {tail}", out.status)
                    },
                    permanent: false,
                })
            }
        }
    }
}

/// `arg` with `{run}`, `{manifest}` and `{node}` replaced, in one pass (a run name holding
/// `{node}` stays as it is).
fn expand(arg: &str, run: &str, manifest: &str, node: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let value = [("{run}", run), ("{manifest}", manifest), ("{node}", node)]
            .into_iter()
            .find(|(p, _)| tail.starts_with(p));
        match value {
            Some((p, v)) => {
                out.push_str(v);
                rest = &tail[p.len()..];
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A reqwest error without its URL (which may hold a token), with its causes.
fn http_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The outcome to record for a failed attempt (the `tries`-th in a row by this process).
fn failed(n: &PendingNotification, f: Failure, tries: i64, now: i64) -> NotifyOutcome {
    let attempts = n.attempts + tries;
    NotifyOutcome::Failed {
        error: f.error,
        tries,
        next_attempt_ms: now
            + crate::format::units::backoff(attempts, f.permanent).as_millis() as i64,
        give_up: now - n.created_ms >= GIVE_UP_AFTER.as_millis() as i64,
    }
}

/// Record `outcome` for `n` (on a blocking thread) and log it.
async fn record(index: &Arc<Index>, n: &PendingNotification, outcome: NotifyOutcome) {
    match &outcome {
        NotifyOutcome::Sent { .. } => {
            tracing::info!(notify = %n.notifier, run = %n.run, "run notification sent")
        }
        NotifyOutcome::Failed {
            error,
            give_up: true,
            ..
        } => tracing::error!(
            notify = %n.notifier,
            run = %n.run,
            error = %error,
            "run notification given up: it kept failing for {}",
            humantime::format_duration(GIVE_UP_AFTER)
        ),
        NotifyOutcome::Failed {
            error,
            next_attempt_ms,
            ..
        } => tracing::warn!(
            notify = %n.notifier,
            run = %n.run,
            error = %error,
            retry_in_ms = next_attempt_ms - crate::format::units::now_ms(),
            "run notification failed; it will be retried"
        ),
    }
    let (i, id) = (index.clone(), n.id);
    let res = tokio::task::spawn_blocking(move || i.finish_notification(id, &outcome)).await;
    match res {
        Ok(Ok(())) => {}
        // Still leased: sent again once the lease expires (a duplicate the receiver can drop).
        Ok(Err(e)) => {
            tracing::error!(notify = %n.notifier, run = %n.run, error = %format!("{e:#}"), "cannot record a notification's outcome")
        }
        Err(e) => tracing::error!(error = %e, "recording a notification's outcome failed"),
    }
}

/// What `seal` did about one notification.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    /// The `[[notify]]` entry.
    pub notifier: String,
    /// Why it is not delivered yet (`None`: delivered, or left out).
    pub error: Option<String>,
    /// Not queued at all: the entry's `only` rule leaves this seal out.
    pub left_out: bool,
}

/// Right after a seal: try each of the seal's notifications (leased to this process until
/// `lease_until_ms`) up to [`SEAL_ATTEMPTS`] times while the lease lasts, and leave what
/// failed pending for the daemon. The seal stands whatever happens here.
pub(crate) async fn after_seal(
    config: &Config,
    index: Arc<Index>,
    queued: &[NewNotification],
    lease_until_ms: i64,
) -> Vec<Delivery> {
    match try_after_seal(config, index, queued, lease_until_ms).await {
        Ok(d) => d,
        Err(e) => queued
            .iter()
            .map(|n| Delivery {
                notifier: n.notifier.clone(),
                error: Some(format!("not tried: {e:#}")),
                left_out: false,
            })
            .collect(),
    }
}

async fn try_after_seal(
    config: &Config,
    index: Arc<Index>,
    queued: &[NewNotification],
    lease_until_ms: i64,
) -> anyhow::Result<Vec<Delivery>> {
    if queued.is_empty() {
        return Ok(Vec::new());
    }
    let sender = Sender::new(config)?;
    let keys: Vec<String> = queued.iter().map(|n| n.idempotency_key.clone()).collect();
    let rows = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || index.notifications_by_key(&keys)).await??
    };
    let one = |n: PendingNotification| {
        let (sender, index) = (&sender, index.clone());
        async move {
            let timeout = sender.timeout(&n.notifier);
            let mut last = None;
            let mut tries = 0;
            while tries < SEAL_ATTEMPTS as i64 {
                // Never past the lease: the daemon may take the row then.
                let ends =
                    crate::format::units::now_ms() + (timeout + LEASE_MARGIN).as_millis() as i64;
                if ends > lease_until_ms {
                    break;
                }
                tries += 1;
                match sender.attempt(&n).await {
                    Ok(()) => {
                        let failures = tries - 1;
                        record(&index, &n, NotifyOutcome::Sent { failures }).await;
                        return Delivery {
                            notifier: n.notifier.clone(),
                            error: None,
                            left_out: false,
                        };
                    }
                    Err(f) => last = Some(f),
                }
                if tries < SEAL_ATTEMPTS as i64 {
                    tokio::time::sleep(crate::format::units::backoff(n.attempts + tries, false))
                        .await;
                }
            }
            let f = last.unwrap_or(Failure {
                error: "no time left to try before the seal's timeout".into(),
                permanent: false,
            });
            let error = f.error.clone();
            record(
                &index,
                &n,
                failed(&n, f, tries, crate::format::units::now_ms()),
            )
            .await;
            Delivery {
                notifier: n.notifier.clone(),
                error: Some(error),
                left_out: false,
            }
        }
    };
    Ok(futures::future::join_all(rows.into_iter().map(one)).await)
}

/// How long `seal` holds its notifications: room for [`SEAL_ATTEMPTS`] attempts and the
/// backoff between them, within what is left of its timeout (but room for one attempt, with
/// a few seconds to spare for recording the seal).
pub(crate) fn seal_lease(config: &Config, left: Duration) -> Duration {
    let longest = config
        .notify
        .iter()
        .map(|n| n.get_ref().timeout)
        .max()
        .unwrap_or_default();
    let one = longest + LEASE_MARGIN;
    let all = one * SEAL_ATTEMPTS + Duration::from_secs(4);
    left.min(all).max(one + LEASE_MARGIN)
}

/// The daemon's notify loop: send due notifications (a batch at a time, each under a lease),
/// then sleep until the next one is due, for at most [`RESCAN`] (rows queued by `seal` in
/// another process are found that way).
pub(crate) async fn run_loop(
    sender: Arc<Sender>,
    index: Arc<Index>,
    metrics: Arc<crate::metrics::Metrics>,
    cancel: CancellationToken,
) -> &'static str {
    loop {
        let now = crate::format::units::now_ms();
        let i = index.clone();
        let due = tokio::task::spawn_blocking(move || i.due_notifications(now, BATCH)).await;
        let due = match due {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "cannot read pending notifications");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "reading pending notifications failed");
                Vec::new()
            }
        };
        let full = due.len() == BATCH;
        let sends = due.into_iter().map(|n| {
            let (sender, index, metrics) = (sender.clone(), index.clone(), metrics.clone());
            async move {
                let now = crate::format::units::now_ms();
                let until = now + (sender.timeout(&n.notifier) + LEASE_MARGIN).as_millis() as i64;
                let i = index.clone();
                let leased =
                    tokio::task::spawn_blocking(move || i.lease_notification(n.id, now, until))
                        .await;
                match leased {
                    Ok(Ok(true)) => {}
                    // Sent, or taken by `seal`, since it was read.
                    Ok(Ok(false)) => return false,
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "cannot lease a notification");
                        return false;
                    }
                    Err(_) => return false,
                }
                let outcome = match sender.attempt(&n).await {
                    Ok(()) => NotifyOutcome::Sent { failures: 0 },
                    Err(f) => failed(&n, f, 1, crate::format::units::now_ms()),
                };
                metrics.notification(match &outcome {
                    NotifyOutcome::Sent { .. } => "sent",
                    NotifyOutcome::Failed { give_up: true, .. } => "given_up",
                    NotifyOutcome::Failed { .. } => "failed",
                });
                record(&index, &n, outcome).await;
                true
            }
        });
        let round = futures::future::join_all(sends);
        tokio::pin!(round);
        let sent = tokio::select! {
            done = &mut round => done.into_iter().filter(|leased| *leased).count(),
            _ = cancel.cancelled() => {
                // Sends in flight may finish; one abandoned stays leased and is sent again later.
                let _ = tokio::time::timeout(DRAIN, &mut round).await;
                return "notify";
            }
        };
        // More may be due at once; but a round that could lease nothing (the index refuses
        // writes) waits like an idle one instead of spinning.
        if full && sent > 0 {
            continue;
        }
        let i = index.clone();
        let next = tokio::task::spawn_blocking(move || i.next_notification_ms()).await;
        let wait = match next {
            Ok(Ok(Some(ms))) => {
                let ms = (ms - crate::format::units::now_ms()).max(0) as u64;
                Duration::from_millis(ms).min(RESCAN)
            }
            _ => RESCAN,
        };
        tokio::select! {
            _ = cancel.cancelled() => return "notify",
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_expand_once() {
        assert_eq!(
            expand("{run}:{manifest}@{node}", "r{node}", "m/k", "n1"),
            "r{node}:m/k@n1"
        );
        assert_eq!(expand("{x} {", "r", "m", "n"), "{x} {");
        assert_eq!(expand("plain", "r", "m", "n"), "plain");
    }

    fn manifest_with(tests: Option<crate::format::results::TestSummary>) -> Manifest {
        Manifest {
            format: 1,
            run: "<!channel> r1".into(),
            key_prefix: "n1/<!channel> r1".into(),
            node: "n1".into(),
            ci: Some(Ci {
                provider: "github-actions".into(),
                branch: Some("main".into()),
                commit: Some("0123abcd".into()),
                ..Default::default()
            }),
            labels: BTreeMap::new(),
            first_file_ms: None,
            last_file_ms: None,
            sealed_ms: 3,
            files: Vec::new(),
            totals: crate::format::manifest::Totals { files: 1, bytes: 1 },
            tests,
        }
    }

    #[test]
    fn each_format_is_queued_as_its_service_wants_and_only_failures_skips_passed_runs() {
        let text = "node_id = \"n1\"\n[[watch]]\npath = \"/a\"\nruns = \"dir\"\n\
            [[destination]]\nname = \"p\"\nurl = \"file:///x\"\npublic_base_url = \"https://cdn.example/b/\"\n\
            [[notify]]\nname = \"doc\"\nurl = \"https://h.example/doc\"\n\
            [[notify]]\nname = \"slack\"\nurl = \"https://hooks.slack.example/x\"\nformat = \"slack\"\n\
            [[notify]]\nname = \"teams\"\nurl = \"https://teams.example/x\"\nformat = \"teams\"\n\
            [[notify]]\nname = \"gchat\"\nurl = \"https://chat.example/x\"\nformat = \"google-chat\"\nonly = \"failures\"\n";
        let config = Config::parse(text, "t").unwrap();
        let passed = crate::format::results::TestSummary {
            tests: 1,
            passed: 1,
            ..Default::default()
        };
        let failing = crate::format::results::TestSummary {
            tests: 2,
            passed: 1,
            failed: 1,
            ..Default::default()
        };
        let key = "n1/<!channel> r1/_run/manifest.json";
        let page = Some("n1/<!channel> r1/index.html");
        // A passed run: the `only = "failures"` entry gets nothing, and says so.
        let m = manifest_with(Some(passed));
        let q = queue(&config, &m, "n1", key, page, 9).unwrap();
        let names: Vec<&str> = q.iter().map(|n| n.notifier.as_str()).collect();
        assert_eq!(names, ["doc", "slack", "teams"]);
        let left = left_out(&config, &m);
        assert_eq!(left.len(), 1);
        assert_eq!(
            (left[0].notifier.as_str(), left[0].left_out, &left[0].error),
            ("gchat", true, &None)
        );
        // The JSON document is today's.
        let doc: serde_json::Value = serde_json::from_str(&q[0].payload).unwrap();
        assert_eq!(
            (doc["format"].as_u64(), doc["event"].as_str()),
            (Some(1), Some("run.sealed"))
        );
        // Slack: its blocks, the run name escaped, the page linked percent-encoded.
        let slack: serde_json::Value = serde_json::from_str(&q[1].payload).unwrap();
        assert_eq!(slack.as_object().unwrap().len(), 2, "{slack:#}");
        let main = slack["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(
            main.starts_with(":white_check_mark: *Run &lt;!channel&gt; r1 on n1 passed*"),
            "{main}"
        );
        assert!(main.ends_with("branch main, commit 0123abcd"), "{main}");
        assert_eq!(
            slack["blocks"][1]["text"]["text"],
            "<https://cdn.example/b/n1/%3C%21channel%3E%20r1/index.html|Open the run page>"
        );
        let teams: serde_json::Value = serde_json::from_str(&q[2].payload).unwrap();
        assert_eq!(teams["type"], "message");
        assert_eq!(
            teams["attachments"][0]["content"]["actions"][0]["url"],
            "https://cdn.example/b/n1/%3C%21channel%3E%20r1/index.html"
        );
        // A failing run: every entry, Google Chat's text among them.
        let m = manifest_with(Some(failing));
        let q = queue(&config, &m, "n1", key, page, 9).unwrap();
        assert_eq!(q.len(), 4);
        assert!(left_out(&config, &m).is_empty());
        let chat: serde_json::Value = serde_json::from_str(&q[3].payload).unwrap();
        let text = chat["text"].as_str().unwrap();
        assert!(
            text.starts_with("*Run ‹!channel› r1 on n1 failed*\n2 tests: 1 passed, 1 failed"),
            "{text}"
        );
        // A run without JUnit XML did not fail.
        let m = manifest_with(None);
        assert_eq!(queue(&config, &m, "n1", key, page, 9).unwrap().len(), 3);
    }

    #[test]
    fn a_file_store_page_is_not_linked_from_a_chat_message() {
        let text = "node_id = \"n1\"\n[[watch]]\npath = \"/a\"\nruns = \"dir\"\n\
            [[destination]]\nname = \"p\"\nurl = \"file:///x\"\n\
            [[notify]]\nurl = \"https://hooks.slack.example/x\"\nformat = \"slack\"\n";
        let config = Config::parse(text, "t").unwrap();
        let m = manifest_with(None);
        let q = queue(&config, &m, "n1", "k", Some("n1/r/index.html"), 9).unwrap();
        let slack: serde_json::Value = serde_json::from_str(&q[0].payload).unwrap();
        assert_eq!(slack["blocks"].as_array().unwrap().len(), 1, "{slack:#}");
        assert!(!q[0].payload.contains("file:"), "{}", q[0].payload);
    }

    #[tokio::test]
    async fn check_names_each_entry_and_what_is_wrong() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_port = open.local_addr().unwrap().port();
        let text = format!(
            "node_id = \"n1\"\n[[watch]]\npath = \"/a\"\n\
            [[destination]]\nname = \"p\"\nurl = \"file:///x\"\n\
            [[notify]]\nname = \"up\"\nurl = \"http://127.0.0.1:{open_port}/T/secret\"\n\
            [[notify]]\nname = \"down\"\nurl = \"http://127.0.0.1:{port}/T/secret\"\n\
            [[notify]]\nname = \"sh\"\ncommand = [\"sh\", \"-c\", \"true\"]\n\
            [[notify]]\nname = \"gone\"\ncommand = [\"/nonexistent/announce\"]\n\
            [[notify]]\nname = \"dir\"\ncommand = [\"/\"]\n"
        );
        let config = Config::parse(&text, "t").unwrap();
        let got = check(&config).await;
        assert_eq!(got.len(), 5);
        let ok = |i: usize| got[i].as_ref().unwrap().clone();
        let err = |i: usize| got[i].as_ref().unwrap_err().clone();
        assert!(
            ok(0).starts_with("[[notify]] \"up\": webhook host 127.0.0.1 port"),
            "{}",
            ok(0)
        );
        assert!(
            err(1).starts_with("[[notify]] \"down\": cannot connect"),
            "{}",
            err(1)
        );
        assert!(ok(2).contains("\"sh\" is executable"), "{}", ok(2));
        assert!(
            err(3).contains("\"gone\"") && err(3).contains("does not exist"),
            "{}",
            err(3)
        );
        assert!(err(4).contains("not an executable file"), "{}", err(4));
        for line in got.iter().map(|r| r.clone().unwrap_or_else(|e| e)) {
            assert!(!line.contains("secret"), "{line}");
        }
    }

    #[test]
    fn the_document_has_every_field() {
        let text = "node_id = \"n1\"\n[[watch]]\npath = \"/a\"\nruns = \"dir\"\n\
            [[destination]]\nname = \"p\"\nurl = \"file:///x\"\npublic_base_url = \"https://cdn.example/b/\"\n\
            [[notify]]\nurl = \"https://hooks.example/T/secret\"\n\
            [[notify]]\nname = \"log\"\ncommand = [\"/bin/true\", \"{run}\"]\n";
        let config = Config::parse(text, "t").unwrap();
        let manifest = Manifest {
            format: 1,
            run: "r1".into(),
            key_prefix: "n1/r1".into(),
            node: "n1".into(),
            ci: None,
            labels: [("suite".to_string(), "unit".to_string())].into(),
            first_file_ms: Some(1),
            last_file_ms: Some(2),
            sealed_ms: 3,
            files: Vec::new(),
            totals: crate::format::manifest::Totals { files: 4, bytes: 5 },
            tests: Some(crate::format::results::TestSummary {
                tests: 3,
                passed: 2,
                failed: 1,
                ..Default::default()
            }),
        };
        let q = queue(
            &config,
            &manifest,
            "n1",
            "n1/r1/_run/manifest.json",
            Some("n1/r1/index.html"),
            9,
        )
        .unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].notifier, "notify-1");
        assert_eq!(q[1].notifier, "log");
        assert_ne!(q[0].idempotency_key, q[1].idempotency_key);
        let v: serde_json::Value = serde_json::from_str(&q[0].payload).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(v["event"], "run.sealed");
        assert_eq!(v["id"], q[0].idempotency_key.as_str());
        assert_eq!(
            (v["run"].as_str(), v["node"].as_str()),
            (Some("r1"), Some("n1"))
        );
        assert_eq!(
            (v["files"].as_u64(), v["bytes"].as_u64()),
            (Some(4), Some(5))
        );
        assert_eq!(v["labels"]["suite"], "unit");
        assert_eq!(
            v["manifest_url"],
            "https://cdn.example/b/n1/r1/_run/manifest.json"
        );
        assert_eq!(v["page_url"], "https://cdn.example/b/n1/r1/index.html");
        assert!(v["ci"].is_null());
        assert_eq!(
            (v["tests"]["tests"].as_u64(), v["tests"]["failed"].as_u64()),
            (Some(3), Some(1))
        );
        assert!(
            !q[0].payload.contains("secret"),
            "the URL is not in the document"
        );
    }
}
