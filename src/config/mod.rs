//! Configuration: the TOML schema of `PRODUCT.md`, its defaults and its validation.
//!
//! Every value is checked while it is deserialised, so a bad value is reported by the TOML
//! parser itself with the key, line and column. The few checks that span several keys
//! (duplicate destination names, option names that depend on the URL scheme) use the span
//! of the offending key to name its line too. All defaults live in the `default_*` functions
//! below and in [`embedded_default`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::format::layout::Compression;

mod globs;
mod validate;
pub use globs::Filter;
pub(crate) use globs::{Separator, compile_globs};
use globs::{de_globs, de_opt_globs};

/// The configuration used when no config file exists: watch `./artifacts`, store to
/// `./.panoptic-sync/store`, keep state in `./.panoptic-sync/state` (all under `cwd`).
pub fn embedded_default(cwd: &Path) -> String {
    let cwd = cwd.display().to_string();
    let quoted = |p: &str| toml::Value::String(format!("{cwd}/{p}")).to_string();
    let url = url::Url::from_directory_path(Path::new(&cwd).join(".panoptic-sync/store"))
        .map(|u| u.to_string())
        .unwrap_or_else(|_| format!("file://{cwd}/.panoptic-sync/store"));
    format!(
        "state_dir = {}\n\n[[watch]]\npath = {}\n\n[[destination]]\nname = \"local\"\nurl = {}\n",
        quoted(".panoptic-sync/state"),
        quoted("artifacts"),
        toml::Value::String(url)
    )
}

/// Default location of the config file; when it does not exist the embedded default is used.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/panoptic-sync/config.toml";

/// A configuration error: the file it came from and a message naming key and line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration {source_name}: {message}")]
pub struct ConfigError {
    /// The file the configuration came from, or `<embedded default>`.
    pub source_name: String,
    /// What is wrong, with key and line.
    pub message: String,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this machine in object keys and status objects; default: the hostname.
    #[serde(default = "default_node_id")]
    pub node_id: String,
    /// Where the SQLite index lives.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Directories to watch.
    #[serde(default)]
    pub watch: Vec<Watch>,
    /// What happens to the bytes between disk and store.
    #[serde(default)]
    pub pipeline: Pipeline,
    /// Where files go; the first one is the primary.
    #[serde(default)]
    pub destination: Vec<Spanned<Destination>>,
    /// Local cleanup and remote retention.
    #[serde(default)]
    pub retention: Retention,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: Metrics,
    /// Agent-wide limits.
    #[serde(default)]
    pub limits: Limits,
    /// Who is told about each sealed run (`[[notify]]` tables).
    #[serde(default)]
    pub notify: Vec<Spanned<Notify>>,
    /// Test results of sealed runs (`[results]`).
    #[serde(default)]
    pub results: Results,
    /// Lines of the keys that checks across several keys name.
    #[serde(skip)]
    pub lines: Lines,
}

/// Where some keys are in the configuration text (1-based lines; 0 when not written).
#[derive(Debug, Clone, Default)]
pub struct Lines {
    /// `state_dir`.
    pub state_dir: usize,
    /// Each `[[watch]]` table.
    pub watch: Vec<usize>,
    /// Each `[[destination]]` table.
    pub destination: Vec<usize>,
}

impl Lines {
    fn of(text: &str) -> Lines {
        #[derive(Deserialize)]
        struct Spans {
            state_dir: Option<Spanned<toml::Value>>,
            #[serde(default)]
            watch: Vec<Spanned<toml::Value>>,
            #[serde(default)]
            destination: Vec<Spanned<toml::Value>>,
        }
        let Ok(spans) = toml::from_str::<Spans>(text) else {
            return Lines::default();
        };
        let line = |s: &Spanned<toml::Value>| line_of(text, s.span().start);
        Lines {
            state_dir: spans.state_dir.as_ref().map(line).unwrap_or(0),
            watch: spans.watch.iter().map(line).collect(),
            destination: spans.destination.iter().map(line).collect(),
        }
    }

    fn name(what: &str, line: Option<&usize>) -> String {
        match line {
            Some(&l) if l > 0 => format!("{what} (line {l})"),
            _ => what.to_string(),
        }
    }
}

/// The `[limits]` table.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Cap on bytes sent per second, all destinations together (e.g. `"50MiB/s"`).
    #[serde(default, deserialize_with = "de_opt_rate")]
    pub max_rate: Option<u64>,
}

fn de_opt_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    parse_rate(&s).map(Some).map_err(serde::de::Error::custom)
}

/// The `[retention]` table.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Objects of this node older than this are pruned (per-watch `remote_max_age` overrides).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub remote_max_age: Option<Duration>,
    /// Delete a local file once every destination holds its current content.
    #[serde(default)]
    pub local_delete_after_upload: bool,
    /// Delete local files older than this once every destination holds them.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub local_max_age: Option<Duration>,
    /// Below this share of free space on a watched filesystem, delete the oldest files that
    /// every destination holds until it is reached again.
    #[serde(default, deserialize_with = "de_percent")]
    pub local_min_free_percent: Option<f64>,
    /// Local cleanup deletes a file of a run (a `runs = "dir"` watch) only once the run is
    /// sealed, besides being in every destination.
    #[serde(default)]
    pub local_runs_sealed_only: bool,
    /// `[retention.runs]`: remote retention by whole sealed runs.
    #[serde(default)]
    pub runs: Option<RunRetention>,
}

/// The `[retention.runs]` table: which sealed runs `prune` keeps. For each sealed run of this
/// node the first rule that applies decides: a tagged run is kept while `keep_tags`; a
/// pull-request run while younger than `pull_requests`; a run with a branch while it is among
/// the `keep_latest_per_branch` newest of its branch; any other run while younger than
/// `max_age` (default: the watch's or the global `remote_max_age`; neither: kept).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRetention {
    /// Keep runs built from a tag forever.
    #[serde(default = "default_true")]
    pub keep_tags: bool,
    /// Keep this many newest sealed runs of each branch (pull requests and tags aside).
    #[serde(default)]
    pub keep_latest_per_branch: Option<usize>,
    /// Keep pull- and merge-request runs this long after their seal.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub pull_requests: Option<Duration>,
    /// Keep every other run this long after its seal.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_age: Option<Duration>,
    /// When a run is pruned, keep its manifest and the evidence of its failures (their JUnit
    /// files and the files the manifest lists as their `evidence`) while the failure is among
    /// the newest this many failures of its test on this node.
    #[serde(default)]
    pub keep_failures: Option<usize>,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address for `/metrics` and `/healthz`, e.g. `127.0.0.1:9464`. Off when absent.
    #[serde(default, deserialize_with = "de_opt_addr")]
    pub listen: Option<std::net::SocketAddr>,
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn de_percent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let v = f64::deserialize(d)?;
    if !(0.0..100.0).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "must be a percentage from 0 to 99, got {v}"
        )));
    }
    Ok(Some(v))
}

fn de_opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!("bad listen address {s:?} (want IP:PORT): {e}"))
    })
}

/// One `[[watch]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// The root directory to watch (recursively).
    pub path: PathBuf,
    /// Key prefix under the destination; `{node}` expands to `node_id`. May be empty.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Globs (relative to the root) a file must match to be uploaded.
    #[serde(default = "default_include", deserialize_with = "de_globs")]
    pub include: Vec<String>,
    /// Globs (relative to the root) that exclude a file.
    #[serde(default, deserialize_with = "de_globs")]
    pub exclude: Vec<String>,
    /// How long a file must be quiet before it counts as complete (`settle_ms`, milliseconds,
    /// in the file).
    #[serde(
        rename = "settle_ms",
        default = "default_settle",
        deserialize_with = "de_millis"
    )]
    pub settle: Duration,
    /// Overrides `[retention] remote_max_age` for objects from this tree.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub remote_max_age: Option<Duration>,
    /// Stay on the root's filesystem: never descend into or open anything across a mount
    /// point (`RESOLVE_NO_XDEV`).
    #[serde(default = "default_true")]
    pub one_file_system: bool,
    /// How the tree is divided into runs (`seal`, `runs`).
    #[serde(default, deserialize_with = "de_runs")]
    pub runs: Runs,
    /// With `runs = "dir"`: the daemon seals a run by itself once no file of it changed for
    /// this long and every destination holds all of it. Off when absent.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub seal_after: Option<Duration>,
    /// With `runs = "dir"`: globs (relative to the run directory) of the JUnit XML files
    /// parsed when a run is sealed.
    #[serde(default = "default_junit", deserialize_with = "de_globs")]
    pub junit: Vec<String>,
    /// With `runs = "dir"`: also parse every other `.xml` file of a run whose root element is
    /// `<testsuites>` or `<testsuite>`.
    #[serde(default = "default_true")]
    pub junit_sniff: bool,
    /// Globs of growing files sent in segments while they are written (`*` crosses `/`, so
    /// `*.log` matches at any depth). Absent: [`DEFAULT_TAIL`] on a `runs = "dir"` watch,
    /// none otherwise; `[]` turns tailing off.
    #[serde(default, deserialize_with = "de_opt_globs")]
    pub tail: Option<Vec<String>>,
    /// How often the bytes a tailed file gained become a segment (`"2s"`).
    #[serde(default = "default_tail_interval", deserialize_with = "de_duration")]
    pub tail_interval: Duration,
}

/// What a `runs = "dir"` watch tails when it names no `tail`: the logs CI jobs write.
pub const DEFAULT_TAIL: &[&str] = &["*.log", "*.out"];

impl Watch {
    /// The watch's tail globs, its default applied.
    pub fn tail_globs(&self) -> Vec<String> {
        match &self.tail {
            Some(t) => t.clone(),
            None if self.runs == Runs::Dir => DEFAULT_TAIL.iter().map(|s| s.to_string()).collect(),
            None => Vec::new(),
        }
    }
}

/// The `[results]` table: what sealing does with the test results it parses.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Results {
    /// Whether each sealed run's summary record is written, in the clear, under
    /// `_panoptic-sync/runs/` (for `report --fleet` and query engines).
    #[serde(default, deserialize_with = "de_records")]
    pub records: Records,
}

/// When run summary records are written (`[results] records`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Records {
    /// When encryption is off (records are plaintext: with a key they would leak test names).
    #[default]
    Auto,
    /// Always, even with encryption on (an explicit opt-in to plaintext test names).
    Always,
    /// Never.
    Never,
}

fn de_records<'de, D: Deserializer<'de>>(d: D) -> Result<Records, D::Error> {
    match String::deserialize(d)?.as_str() {
        "auto" => Ok(Records::Auto),
        "always" => Ok(Records::Always),
        "never" => Ok(Records::Never),
        v => Err(serde::de::Error::custom(format!(
            "unknown records {v:?}; expected \"auto\", \"always\" or \"never\""
        ))),
    }
}

impl Config {
    /// Whether sealing writes plaintext run summary records (see [`Records`]).
    pub fn writes_run_records(&self) -> bool {
        match self.results.records {
            Records::Auto => self.pipeline.encryption == Encryption::None,
            Records::Always => true,
            Records::Never => false,
        }
    }
}

/// How a watched tree is divided into runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Runs {
    /// No runs: files only (the default).
    #[default]
    None,
    /// Each top-level directory under the root is one run, named by the directory.
    Dir,
}

fn de_runs<'de, D: Deserializer<'de>>(d: D) -> Result<Runs, D::Error> {
    match String::deserialize(d)?.as_str() {
        "none" => Ok(Runs::None),
        "dir" => Ok(Runs::Dir),
        v => Err(serde::de::Error::custom(format!(
            "unknown runs {v:?}; expected \"none\" or \"dir\""
        ))),
    }
}

/// The `[pipeline]` table.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// `none`, `gzip` or `zstd`; files that do not shrink are stored as they are.
    #[serde(default, deserialize_with = "de_compression")]
    pub compression: Compression,
    /// Compression level.
    #[serde(default)]
    pub level: Option<i32>,
    /// `none` or `aes-256-gcm`.
    #[serde(default, deserialize_with = "de_encryption")]
    pub encryption: Encryption,
    /// Master key file for encryption.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Earlier keys, for restoring older objects.
    #[serde(default)]
    pub old_key_files: Vec<PathBuf>,
    /// Globs of files never compressed, so they keep their own names in the store (an HTML
    /// report's pages, styles and scripts stay browsable from a run's page).
    #[serde(default, deserialize_with = "de_globs")]
    pub uncompressed: Vec<String>,
    /// Also read run manifests sealed by 0.1.0, before manifests had their own binding:
    /// such a manifest cannot be told from a file object at its key written by such an older
    /// agent. Off by default.
    #[serde(default)]
    pub legacy_manifests: bool,
    /// A key shared by the fleet for content-addressed destinations (`layout = "content"`):
    /// blobs are named and encrypted with it, so equal contents are stored once across
    /// nodes (docs/FORMAT.md, "Content layout"). Without it, blobs dedup per node key.
    #[serde(default)]
    pub dedup_key_file: Option<PathBuf>,
}

/// Encryption applied before upload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encryption {
    /// Stored in the clear.
    #[default]
    None,
    /// The streaming AES-256-GCM format of `docs/FORMAT.md`; objects end in `.enc`.
    Aes256Gcm,
}

/// One `[[destination]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Unique name, used in status, `--dest` and the index.
    pub name: String,
    /// `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix`
    /// (and the `https://` forms object_store understands).
    #[serde(deserialize_with = "de_url")]
    pub url: url::Url,
    /// Passed to the object_store builder (after its `from_env()`).
    #[serde(default)]
    pub options: Option<Spanned<BTreeMap<String, String>>>,
    /// Base of public (CDN) links for `url`.
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// Uploads in flight to this destination; unset, see [`Destination::concurrency`].
    #[serde(default, deserialize_with = "de_opt_concurrency")]
    pub concurrency: Option<usize>,
    /// Cap on bytes sent per second to this destination (e.g. `"20MiB/s"`).
    #[serde(default, deserialize_with = "de_opt_rate")]
    pub max_rate: Option<u64>,
    /// `file://` only: how an object is made durable before it counts as stored.
    #[serde(default)]
    pub sync: SyncMode,
    /// `path` (a file's object at its own key) or `content` (its bytes once per destination
    /// as a blob, a small pointer at its key; docs/FORMAT.md, "Content layout").
    #[serde(default)]
    pub layout: Layout,
    /// `layout = "content"`: an unreferenced blob is deleted only after it has been
    /// unreferenced, and unmodified, for this long (twice: once to be set aside, once more
    /// before it is deleted). Default 24 hours.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub blob_grace: Option<Duration>,
}

/// How a destination lays out files (`[[destination]] layout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Each file's object at its own key (docs/FORMAT.md, "Keys and suffixes").
    #[default]
    Path,
    /// Each content once, as a blob under `_panoptic-sync/blobs/`, with a pointer at the
    /// file's key; files under [`crate::format::pointer::INLINE_BELOW`] bytes stay at their key.
    Content,
}

/// How a `file://` destination makes an object durable before it counts as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// `fsync` of each object and its directory: costs two synchronous writes per object,
    /// touches nothing else.
    #[default]
    Each,
    /// One `syncfs` of the destination's filesystem for every object written by then (group
    /// commit): far fewer synchronous writes, but each call also flushes whatever else is
    /// waiting to be written on that filesystem. For a filesystem that holds the store alone.
    Batch,
}

/// One `[[notify]]` table: each sealed run is announced by an HTTP POST of a JSON document
/// (`url`) or by running a program (`command`); exactly one of the two.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Unique name (in the index, logs and `status`); default `notify-N`, N its position
    /// among the `[[notify]]` tables from 1 (filled in by [`Config::parse`]).
    #[serde(default)]
    pub name: Option<String>,
    /// Where the document is POSTed (`http://` or `https://`). May hold a secret (a token in
    /// the path or query): never logged.
    #[serde(default, deserialize_with = "de_notify_url")]
    pub url: Option<url::Url>,
    /// A program and its arguments, run without a shell; `{run}`, `{manifest}` (the
    /// manifest's stored key) and `{node}` are replaced in each argument. The document is
    /// written to its standard input.
    #[serde(default, deserialize_with = "de_command")]
    pub command: Option<Vec<String>>,
    /// Extra headers of the POST (`url` only). Values may be secrets: never logged.
    #[serde(default, deserialize_with = "de_headers")]
    pub headers: Option<Spanned<BTreeMap<String, String>>>,
    /// How long one attempt may take (the whole request, or the command until it exits).
    #[serde(
        default = "default_notify_timeout",
        deserialize_with = "de_notify_timeout"
    )]
    pub timeout: Duration,
    /// The body a `url` is sent: our JSON document, or a chat service's message.
    #[serde(default)]
    pub format: NotifyFormat,
    /// Which seals are announced.
    #[serde(default)]
    pub only: NotifyOnly,
    /// What is announced: sealed runs and, from the fleet's records, tests changing state.
    #[serde(default = "default_events")]
    pub events: Vec<NotifyEvent>,
}

fn default_events() -> Vec<NotifyEvent> {
    vec![NotifyEvent::RunSealed]
}

/// An event a `[[notify]]` entry announces (`events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum NotifyEvent {
    /// A run was sealed.
    #[serde(rename = "run.sealed")]
    RunSealed,
    /// A test of the sealed run became flaky (failed and passed on one commit, or passed on a
    /// retry, with no flaky commit before in the window).
    #[serde(rename = "test.flaky")]
    TestFlaky,
    /// A test of the sealed run became broken on its branch (failed on every execution of the
    /// branch's last 3 commits).
    #[serde(rename = "test.broken")]
    TestBroken,
    /// A test of the sealed run passed cleanly on a commit after failing on every execution
    /// of the branch's commit before.
    #[serde(rename = "test.fixed")]
    TestFixed,
    /// A quarantine entry of a test in the sealed run expires within 3 days, or has expired.
    #[serde(rename = "quarantine.expiring")]
    QuarantineExpiring,
}

impl NotifyEvent {
    /// The name as written in the configuration and the document's `event`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::RunSealed => "run.sealed",
            NotifyEvent::TestFlaky => "test.flaky",
            NotifyEvent::TestBroken => "test.broken",
            NotifyEvent::TestFixed => "test.fixed",
            NotifyEvent::QuarantineExpiring => "quarantine.expiring",
        }
    }
}

/// The body of a `[[notify]]` POST (`format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyFormat {
    /// Our JSON document (`"format": 1`, docs/FORMAT.md); the only one a `command` gets.
    #[default]
    Json,
    /// A Slack incoming-webhook message (`text` and `blocks`).
    Slack,
    /// A Microsoft Teams message holding an Adaptive Card (incoming webhook or Workflows).
    Teams,
    /// A Google Chat incoming-webhook message (`text`).
    GoogleChat,
}

impl NotifyFormat {
    /// The name as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyFormat::Json => "json",
            NotifyFormat::Slack => "slack",
            NotifyFormat::Teams => "teams",
            NotifyFormat::GoogleChat => "google-chat",
        }
    }
}

/// Which seals a `[[notify]]` entry announces (`only`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyOnly {
    /// Every seal.
    #[default]
    All,
    /// Only runs whose tests failed (docs/OPERATIONS.md has the rule).
    Failures,
}

impl Notify {
    /// The notifier's name (its default is filled in while parsing).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("notify")
    }

    /// The headers configured (empty if none).
    pub fn headers(&self) -> BTreeMap<String, String> {
        self.headers
            .as_ref()
            .map(|h| h.get_ref().clone())
            .unwrap_or_default()
    }
}

// By hand: the URL and the header values may carry secrets, so neither is ever printed.
impl fmt::Debug for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notify")
            .field("name", &self.name)
            .field(
                "url",
                &self
                    .url
                    .as_ref()
                    .map(|u| format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or(""))),
            )
            .field("command", &self.command)
            .field(
                "headers",
                &self.headers().keys().cloned().collect::<Vec<String>>(),
            )
            .field("timeout", &self.timeout)
            .field("format", &self.format)
            .field("only", &self.only)
            .field("events", &self.events)
            .finish()
    }
}

/// The placeholders a `[[notify]] command` may use.
pub const NOTIFY_PLACEHOLDERS: [&str; 3] = ["{run}", "{manifest}", "{node}"];

/// Every `{word}` in `arg` (word: ASCII letters, digits and `_`), braces included.
fn placeholders_in(arg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let tail = &rest[start..];
        let len = tail[1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len() - 1);
        if len > 0 && tail[1 + len..].starts_with('}') {
            out.push(&tail[..len + 2]);
            rest = &tail[len + 2..];
        } else {
            rest = &tail[1..];
        }
    }
    out
}

fn default_notify_timeout() -> Duration {
    Duration::from_secs(10)
}

fn de_notify_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<url::Url>, D::Error> {
    let s = String::deserialize(d)?;
    // The text is not repeated in the message: it may hold a token.
    let url = url::Url::parse(&s)
        .map_err(|e| serde::de::Error::custom(format!("bad notify url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(serde::de::Error::custom(format!(
            "notify url must be http:// or https:// with a host, not {}:",
            url.scheme()
        )));
    }
    Ok(Some(url))
}

fn de_command<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let argv = Vec::<String>::deserialize(d)?;
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err(serde::de::Error::custom(
            "command must be a non-empty array: the program, then its arguments",
        ));
    }
    for arg in &argv {
        // Every `{word}` must be a known placeholder: a typo would be passed on as it is.
        // Other braces (a script's `{ print $1 }`, a JSON literal) are left alone.
        for word in placeholders_in(arg) {
            if !NOTIFY_PLACEHOLDERS.contains(&word) {
                return Err(serde::de::Error::custom(format!(
                    "unknown placeholder {word} in command argument {arg:?}; known: {}",
                    NOTIFY_PLACEHOLDERS.join(", ")
                )));
            }
        }
    }
    Ok(Some(argv))
}

fn de_headers<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<BTreeMap<String, String>>>, D::Error> {
    let headers = Spanned::<BTreeMap<String, String>>::deserialize(d)?;
    for (name, value) in headers.get_ref() {
        let header = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| serde::de::Error::custom(format!("bad header name {name:?}")))?;
        // The agent sets these itself; a second value would make the request ambiguous.
        if [
            "content-type",
            "content-length",
            "transfer-encoding",
            "host",
            "idempotency-key",
        ]
        .contains(&header.as_str())
        {
            return Err(serde::de::Error::custom(format!(
                "header {name:?} is set by the agent and cannot be configured"
            )));
        }
        // The value is not repeated: it may be a secret.
        http::HeaderValue::from_str(value).map_err(|_| {
            serde::de::Error::custom(format!(
                "the value of header {name:?} is not a valid header value (visible ASCII)"
            ))
        })?;
    }
    Ok(Some(headers))
}

fn de_notify_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let t = parse_duration(&s).map_err(serde::de::Error::custom)?;
    if t.is_zero() || t > Duration::from_secs(300) {
        return Err(serde::de::Error::custom(format!(
            "timeout {s:?} must be more than 0 and at most 5 minutes"
        )));
    }
    Ok(t)
}

fn default_node_id() -> String {
    hostname().unwrap_or_else(|| "unknown-node".to_string())
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/panoptic-sync")
}
fn default_prefix() -> String {
    "{node}".to_string()
}
fn default_include() -> Vec<String> {
    vec!["**/*".to_string()]
}
fn default_tail_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_settle() -> Duration {
    Duration::from_millis(2000)
}

/// A duration given as whole milliseconds.
fn de_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Ok(Duration::from_millis(u64::deserialize(d)?))
}
fn default_true() -> bool {
    true
}
fn default_junit() -> Vec<String> {
    ["**/junit*.xml", "**/TEST-*.xml", "**/*.junit.xml"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
/// Uploads in flight to a destination by default.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Uploads in flight to a `file://` destination by default: with a synchronous write per
/// object (`sync = "each"`) most of an upload's time is the disk's flush, and more of them
/// in flight keep the disk busy (100,000 small files: 16 in flight 37.6 and 39.1 s, 32 in
/// flight 31.3 s, 64 29.2 and 30.7 s, 128 30.1 s; docs/PERFORMANCE.md). Large files stay
/// bounded by the three multipart uploads at a time, whatever this is.
pub const DEFAULT_FILE_CONCURRENCY: usize = 32;

impl Destination {
    /// Uploads in flight: as configured, or [`DEFAULT_FILE_CONCURRENCY`] for a `file://`
    /// store and [`DEFAULT_CONCURRENCY`] for any other.
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(if self.url.scheme() == "file" {
            DEFAULT_FILE_CONCURRENCY
        } else {
            DEFAULT_CONCURRENCY
        })
    }
}

/// The machine's hostname (the kernel's nodename, as `gethostname` reports it), if any.
pub fn hostname() -> Option<String> {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().trim().to_string();
    (!name.is_empty()).then_some(name)
}

fn de_compression<'de, D: Deserializer<'de>>(d: D) -> Result<Compression, D::Error> {
    match String::deserialize(d)?.as_str() {
        "none" => Ok(Compression::None),
        "gzip" => Ok(Compression::Gzip),
        "zstd" => Ok(Compression::Zstd),
        v => Err(serde::de::Error::custom(format!(
            "unknown compression {v:?}; expected \"none\", \"gzip\" or \"zstd\""
        ))),
    }
}

fn de_encryption<'de, D: Deserializer<'de>>(d: D) -> Result<Encryption, D::Error> {
    match String::deserialize(d)?.as_str() {
        "none" => Ok(Encryption::None),
        "aes-256-gcm" => Ok(Encryption::Aes256Gcm),
        v => Err(serde::de::Error::custom(format!(
            "unknown encryption {v:?}; expected \"none\" or \"aes-256-gcm\""
        ))),
    }
}

fn de_url<'de, D: Deserializer<'de>>(d: D) -> Result<url::Url, D::Error> {
    let s = String::deserialize(d)?;
    let url = url::Url::parse(&s)
        .map_err(|e| serde::de::Error::custom(format!("bad destination url {s:?}: {e}")))?;
    kind_of(&url).map_err(serde::de::Error::custom)?;
    if url.scheme() == "file" && url.to_file_path().is_err() {
        return Err(serde::de::Error::custom(format!(
            "destination url {s:?} must be an absolute path: file:///dir"
        )));
    }
    Ok(url)
}

fn de_opt_concurrency<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 || n > 1024 {
        return Err(serde::de::Error::custom(format!(
            "concurrency must be between 1 and 1024, got {n}"
        )));
    }
    Ok(Some(n))
}

/// Parse a rate such as `"50MiB/s"`, `"500KB/s"` or `"1GiB/s"` into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let err = || format!("bad rate {s:?}: want a number and a unit per second, like \"20MiB/s\"");
    let body = s.trim().strip_suffix("/s").ok_or_else(err)?.trim();
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let mult: f64 = match unit.trim() {
        "B" | "" => 1.0,
        "KB" | "kB" => 1e3,
        "KiB" => 1024.0,
        "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let rate = (n * mult) as u64;
    if rate == 0 {
        return Err(format!("rate {s:?} must be above zero"));
    }
    Ok(rate)
}

/// The kind of store a destination URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A local (or mounted) directory.
    Local,
    /// Amazon S3 or an S3-compatible server.
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

/// The store kind and the key prefix (URL path) of a destination URL.
pub fn kind_of(url: &url::Url) -> Result<(Kind, String), String> {
    let (scheme, path) = object_store::ObjectStoreScheme::parse(url)
        .map_err(|e| format!("unsupported destination url {url}: {e}"))?;
    let kind = match scheme {
        object_store::ObjectStoreScheme::Local => Kind::Local,
        object_store::ObjectStoreScheme::AmazonS3 => Kind::S3,
        object_store::ObjectStoreScheme::GoogleCloudStorage => Kind::Gcs,
        object_store::ObjectStoreScheme::MicrosoftAzure => Kind::Azure,
        _ => {
            return Err(format!(
                "unsupported destination url {url}: use file://, s3://, gs:// or az://"
            ));
        }
    };
    Ok((kind, path.as_ref().to_string()))
}

/// Check that every option name is one the store for `url` understands.
pub fn check_options(url: &url::Url, options: &BTreeMap<String, String>) -> Result<(), String> {
    let (kind, _) = kind_of(url)?;
    for key in options.keys() {
        let k = key.to_ascii_lowercase();
        let known = match kind {
            Kind::Local => false,
            Kind::S3 => object_store::aws::AmazonS3ConfigKey::from_str(&k).is_ok(),
            Kind::Gcs => object_store::gcp::GoogleConfigKey::from_str(&k).is_ok(),
            Kind::Azure => object_store::azure::AzureConfigKey::from_str(&k).is_ok(),
        };
        if !known {
            return Err(match kind {
                Kind::Local => {
                    format!("unknown option {key:?}: file:// destinations take no options")
                }
                _ => format!("unknown {kind:?} option {key:?}"),
            });
        }
    }
    Ok(())
}

/// Parse a duration such as `"500ms"`, `"30s"` or `"7d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
}

impl Config {
    /// Parse and validate a configuration text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            source_name: source_name.to_string(),
            message,
        };
        let mut config: Config = toml::from_str(text).map_err(|e| err(toml_error(text, &e)))?;
        config.lines = Lines::of(text);
        for (i, n) in config.notify.iter_mut().enumerate() {
            n.get_mut()
                .name
                .get_or_insert_with(|| format!("notify-{}", i + 1));
        }
        config.validate(text).map_err(err)?;
        Ok(config)
    }

    /// Load the config from `path`; if `path` is the default location and it does not
    /// exist, use the embedded default.
    pub fn load(path: Option<&Path>) -> Result<(Config, String), ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let name = path.display().to_string();
                Ok((Config::parse(&text, &name)?, name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                let name = "<embedded default>".to_string();
                let cwd = std::env::current_dir().map_err(|e| ConfigError {
                    source_name: name.clone(),
                    message: format!("cannot read the current directory: {e}"),
                })?;
                Ok((Config::parse(&embedded_default(&cwd), &name)?, name))
            }
            Err(e) => Err(ConfigError {
                source_name: path.display().to_string(),
                message: format!("cannot read the file: {e}"),
            }),
        }
    }

    /// Make paths absolute against `base` and resolve the directories above each watch root
    /// once (an admin's symlinked path keeps working; the root's own name must be a real
    /// directory, and a symlink found anywhere later is never followed). Then refuse a watch root that contains
    /// the state directory or a `file://` destination: the agent would upload its own index
    /// or its own store into itself.
    pub fn resolve(&mut self, base: &Path, source_name: &str) -> Result<(), ConfigError> {
        self.absolutize(base);
        for w in &mut self.watch {
            // The root's own name is never resolved: a CI job can replace it by a symlink
            // (`rm -rf artifacts && ln -s / artifacts`) before any start; the directories
            // above it are the admin's.
            if let (Some(parent), Some(name)) = (w.path.parent(), w.path.file_name()) {
                w.path = resolve_existing(parent).join(name);
            }
        }
        let err = |message: String| ConfigError {
            source_name: source_name.to_string(),
            message,
        };
        let state = resolve_existing(&self.state_dir);
        for (i, w) in self.watch.iter().enumerate() {
            let watch = || {
                Lines::name(
                    &format!("watch[{i}].path {}", w.path.display()),
                    self.lines.watch.get(i),
                )
            };
            if state.starts_with(&w.path) {
                return Err(err(format!(
                    "{} contains state_dir {}: the agent would upload its own index; \
                     keep the state directory outside every watched tree",
                    watch(),
                    Lines::name(&state.display().to_string(), Some(&self.lines.state_dir)),
                )));
            }
            for (k, d) in self.destinations().enumerate() {
                let Some(dir) = (d.url.scheme() == "file")
                    .then(|| d.url.to_file_path().ok())
                    .flatten()
                else {
                    continue;
                };
                let dir = resolve_existing(&dir);
                if dir.starts_with(&w.path) {
                    return Err(err(format!(
                        "{} contains {} ({}): the agent would upload its own store into \
                         itself; keep file:// destinations outside every watched tree",
                        watch(),
                        Lines::name(
                            &format!("destination {:?}", d.name),
                            self.lines.destination.get(k)
                        ),
                        d.url
                    )));
                }
            }
        }
        Ok(())
    }

    /// The options of a destination (empty if none).
    pub fn options_of(dest: &Destination) -> BTreeMap<String, String> {
        dest.options
            .as_ref()
            .map(|o| o.get_ref().clone())
            .unwrap_or_default()
    }

    /// The destinations in order; the first is the primary.
    pub fn destinations(&self) -> impl Iterator<Item = &Destination> {
        self.destination.iter().map(|d| d.get_ref())
    }

    /// Make relative paths (state_dir, watch roots, file:// destinations) absolute against
    /// `base`, so a daemon that changes directory keeps working.
    pub fn absolutize(&mut self, base: &Path) {
        if self.state_dir.is_relative() {
            self.state_dir = base.join(&self.state_dir);
        }
        for w in &mut self.watch {
            if w.path.is_relative() {
                w.path = base.join(&w.path);
            }
        }
        let p = &mut self.pipeline;
        for f in p
            .key_file
            .iter_mut()
            .chain(p.old_key_files.iter_mut())
            .chain(p.dedup_key_file.iter_mut())
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
    }
}

/// `path` with its longest existing ancestor resolved (symlinks followed, `..` removed) and
/// the rest appended: a root that does not exist yet still gets the form it will have.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(cur) {
            return rest.iter().rev().fold(real, |p: PathBuf, c| p.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// A TOML error by line, column and key, never quoting the line: values may be secrets (a
/// header token, a secret access key), and errors reach the journal on reload.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let line = line_of(text, span.start);
    let line_start = text
        .get(..span.start)
        .and_then(|s| s.rfind('\n'))
        .map_or(0, |i| i + 1);
    let column = text
        .get(line_start..span.start)
        .map_or(1, |s| s.chars().count() + 1);
    // The key of the line, if it is a `key = value` line (its value is not shown).
    let key = text
        .get(line_start..)
        .and_then(|l| l.lines().next())
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['))
        .map(|k| format!(", key {k}"))
        .unwrap_or_default();
    format!(
        "line {line}, column {column}{key}: {}",
        without_value(e.message().trim_end())
    )
}

/// serde's "invalid type: string \"…\", expected …" without the value it quotes (the
/// type and what was expected stay).
fn without_value(message: &str) -> String {
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(lead)
            && let Some((found, expected)) = rest.split_once(", expected ")
        {
            let kind = found.split([' ', '`', '"']).next().unwrap_or(found);
            return format!("{lead}{kind}, expected {expected}");
        }
    }
    message.to_string()
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map(|s| s.matches('\n').count() + 1)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("20MiB/s").unwrap(), 20 * 1024 * 1024);
        assert_eq!(parse_rate("500 KB/s").unwrap(), 500_000);
        assert_eq!(parse_rate("1.5GiB/s").unwrap(), 1_610_612_736);
        assert!(parse_rate("20MiB").is_err());
        assert!(parse_rate("fast/s").is_err());
        assert!(parse_rate("0MiB/s").is_err());
    }

    #[test]
    fn embedded_default_parses() {
        let c = Config::parse(&embedded_default(Path::new("/tmp/x y")), "default").unwrap();
        assert_eq!(c.watch[0].path, PathBuf::from("/tmp/x y/artifacts"));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x y/.panoptic-sync/state"));
        assert_eq!(c.destinations().count(), 1);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "state_dir = \"/x\"\n[[watch]]\npath = \"/a\"\nbogus = 1\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn unknown_compression_is_named() {
        let text = "[pipeline]\ncompression = \"lz5\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("lz5") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn encryption_needs_a_key_file() {
        let text = "[[watch]]\npath = \"/a\"\n[[destination]]\nname = \"p\"\nurl = \"file:///x\"\n[pipeline]\nencryption = \"aes-256-gcm\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("key_file"), "{e}");
    }

    #[test]
    fn bad_option_names_line() {
        let text = "[[watch]]\npath = \"/a\"\n[[destination]]\nname = \"p\"\nurl = \"s3://b/x\"\noptions = { regoin = \"x\" }\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("regoin") && e.contains("line 6"), "{e}");
    }

    const BASE: &str =
        "[[watch]]\npath = \"/a\"\n[[destination]]\nname = \"p\"\nurl = \"file:///x\"\n";

    #[test]
    fn batch_sync_is_for_file_destinations_and_each_is_the_default() {
        let c = Config::parse(BASE, "t.toml").unwrap();
        assert_eq!(c.destination[0].get_ref().sync, SyncMode::Each);
        let c = Config::parse(&format!("{BASE}sync = \"batch\"\n"), "t.toml").unwrap();
        assert_eq!(c.destination[0].get_ref().sync, SyncMode::Batch);
        let text = "[[watch]]\npath = \"/a\"\n[[destination]]\nname = \"cloud\"\nurl = \"s3://b/x\"\nsync = \"batch\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("\"cloud\"") && e.contains("line 3") && e.contains("file://"),
            "{e}"
        );
        let e = Config::parse(&format!("{BASE}sync = \"never\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("never") && e.contains("line 6"), "{e}");
    }

    #[test]
    fn file_destinations_keep_more_uploads_in_flight_unless_told() {
        let c = Config::parse(BASE, "t.toml").unwrap();
        assert_eq!(
            c.destination[0].get_ref().concurrency(),
            DEFAULT_FILE_CONCURRENCY
        );
        let text =
            "[[watch]]\npath = \"/a\"\n[[destination]]\nname = \"cloud\"\nurl = \"s3://b/x\"\n";
        let c = Config::parse(text, "t.toml").unwrap();
        assert_eq!(
            c.destination[0].get_ref().concurrency(),
            DEFAULT_CONCURRENCY
        );
        let c = Config::parse(&format!("{BASE}concurrency = 3\n"), "t.toml").unwrap();
        assert_eq!(c.destination[0].get_ref().concurrency(), 3);
        let e = Config::parse(&format!("{BASE}concurrency = 0\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("between 1 and 1024") && e.contains("line 6"),
            "{e}"
        );
    }

    #[test]
    fn notify_entries_get_names_and_defaults() {
        let text = format!(
            "{BASE}[[notify]]\nurl = \"https://hooks.example/T/x\"\nheaders = {{ Authorization = \"Bearer t\" }}\n\
             [[notify]]\nname = \"log\"\ncommand = [\"/usr/bin/logger\", \"sealed {{run}} at {{manifest}} on {{node}}\"]\ntimeout = \"30s\"\n"
        );
        let c = Config::parse(&text, "t.toml").unwrap();
        let (a, b) = (c.notify[0].get_ref(), c.notify[1].get_ref());
        assert_eq!((a.name(), b.name()), ("notify-1", "log"));
        assert_eq!(
            (a.timeout, b.timeout),
            (Duration::from_secs(10), Duration::from_secs(30))
        );
        assert_eq!(a.headers()["Authorization"], "Bearer t");
        assert_eq!(
            (a.format, a.only, b.format, b.only),
            (
                NotifyFormat::Json,
                NotifyOnly::All,
                NotifyFormat::Json,
                NotifyOnly::All
            )
        );
        let chat = format!(
            "{BASE}[[notify]]\nurl = \"https://chat.example/v1/x\"\nformat = \"google-chat\"\nonly = \"failures\"\n"
        );
        let c = Config::parse(&chat, "t.toml").unwrap();
        let n = c.notify[0].get_ref();
        assert_eq!(
            (n.format, n.only),
            (NotifyFormat::GoogleChat, NotifyOnly::Failures)
        );
        let debug = format!("{a:?}");
        assert!(
            !debug.contains("Bearer") && !debug.contains("/T/x"),
            "{debug}"
        );
    }

    #[test]
    fn only_words_in_braces_are_placeholders() {
        assert_eq!(
            placeholders_in("{run}-{x_1} { print $1 } {'a': 1} {} {{node}}"),
            vec!["{run}", "{x_1}", "{node}"]
        );
    }

    #[test]
    fn bad_notify_entries_name_key_and_line() {
        // Checks across keys name the table's line (6), a bad value its own key's line.
        for (entry, want, line) in [
            (
                "url = \"https://h/x\"\ncommand = [\"true\"]\n",
                "not both",
                6,
            ),
            ("name = \"n\"\n", "one of `url`", 6),
            ("url = \"ftp://h/x\"\n", "http:// or https://", 7),
            ("command = []\n", "non-empty", 7),
            ("command = [\"echo\", \"{runn}\"]\n", "{runn}", 7),
            (
                "command = [\"true\"]\nheaders = { A = \"b\" }\n",
                "only apply to a `url`",
                8,
            ),
            (
                "url = \"https://h/x\"\nheaders = { \"a b\" = \"c\" }\n",
                "header name",
                8,
            ),
            (
                "url = \"https://h/x\"\nheaders = { Idempotency-Key = \"c\" }\n",
                "set by the agent",
                8,
            ),
            ("url = \"https://h/x\"\ntimeout = \"0s\"\n", "timeout", 8),
            ("url = \"https://h/x\"\nmethod = \"PUT\"\n", "method", 8),
            (
                "command = [\"true\"]\nformat = \"slack\"\n",
                "applies to a `url` only",
                6,
            ),
            (
                "url = \"https://h/x\"\nformat = \"discord\"\n",
                "google-chat",
                8,
            ),
            ("url = \"https://h/x\"\nonly = \"passes\"\n", "failures", 8),
        ] {
            let text = format!("{BASE}[[notify]]\n{entry}");
            let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains(&format!("line {line}")),
                "{entry:?}: {e}"
            );
        }
        let text = format!(
            "{BASE}[[notify]]\nurl = \"https://h/x\"\n[[notify]]\nname = \"notify-1\"\ncommand = [\"true\"]\n"
        );
        let e = Config::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("used twice") && e.contains("line 8"), "{e}");
    }

    #[test]
    fn filter_excludes_tmp_everywhere() {
        let w = Watch {
            path: "/a".into(),
            prefix: String::new(),
            include: default_include(),
            exclude: vec!["**/*.tmp".into()],
            settle: Duration::from_millis(1),
            remote_max_age: None,
            one_file_system: true,
            runs: Runs::None,
            seal_after: None,
            junit: default_junit(),
            junit_sniff: true,
            tail: None,
            tail_interval: default_tail_interval(),
        };
        let f = Filter::new(&w);
        assert!(f.matches(Path::new("a/b/c.log")));
        assert!(f.matches(Path::new("top.log")));
        assert!(!f.matches(Path::new("x.tmp")));
        assert!(!f.matches(Path::new("deep/er/x.tmp")));
    }
}
