// The command-line definition alone: clap derives and nothing that reaches into the crate,
// because build.rs `include!`s this file to render the man page and shell completions from
// the same definition (so no `//!` doc here, and the value parsers come from the includer,
// `super`: src/cli.rs in the crate, build.rs in the build script).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use super::{parse_duration, parse_label, parse_size};

/// The artifact agent: watch test output, index it, upload it durably.
#[derive(Debug, Parser)]
#[command(name = "panoptic-sync", version, about)]
pub struct Cli {
    /// Config file (default /etc/panoptic-sync/config.toml; the embedded default is used
    /// when that file does not exist).
    #[arg(long, global = true, env = "PANOPTIC_SYNC_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (no timestamps under journald).
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch, index and upload until SIGTERM or SIGINT.
    Run {
        /// First move a damaged or lost index aside and rebuild it from the destinations
        /// (files they already hold are not uploaded again).
        #[arg(long)]
        rebuild_index: bool,
    },
    /// One pass: scan, upload everything pending; exit 0 only when every destination has
    /// everything.
    Sync {
        /// First move a damaged or lost index aside and rebuild it from the destinations
        /// (files they already hold are not uploaded again).
        #[arg(long)]
        rebuild_index: bool,
    },
    /// Wait until every file present in the watched directories now is in the primary.
    Flush {
        /// Give up after this long (e.g. "30s", "10m").
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        /// Wait for every destination, not only the primary.
        #[arg(long)]
        all_destinations: bool,
    },
    /// Seal a run (a top-level directory of a `runs = "dir"` watch): wait until every file
    /// under it is in every destination, then write its manifest with the CI context.
    Seal {
        /// The run directory.
        dir: PathBuf,
        /// Give up after this long (e.g. "30s", "10m").
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        /// A label recorded in the manifest (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List runs: open, sealed or changed after seal, with files, bytes and completeness.
    Runs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Every node's sealed runs in the primary, from their manifests (no index needed).
        #[arg(long)]
        fleet: bool,
    },
    /// Show the index: files, and per destination pending, failing and done.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download, decrypt, decompress and verify objects into a directory.
    Restore {
        /// Destination name to restore from (with --run, default: the primary).
        #[arg(long, required_unless_present = "run")]
        from: Option<String>,
        /// Restore exactly the files of this sealed run's manifest, each verified.
        #[arg(long, conflicts_with_all = ["prefix", "allow_plaintext", "max_size"])]
        run: Option<String>,
        /// Directory to write into (paths in it are relative to --prefix).
        #[arg(long)]
        to: PathBuf,
        /// Only objects under this key prefix (relative to the destination's URL path).
        #[arg(long)]
        prefix: Option<String>,
        /// With a key configured, also restore unencrypted objects (refused by default:
        /// anyone who can write to the bucket can plant them).
        #[arg(long)]
        allow_plaintext: bool,
        /// Write at most this much per file (e.g. "2GiB"); objects that decode to more fail.
        /// A plain compressed object without a recorded size (in file://) is bounded anyway,
        /// by default to 1,024 times its stored size (at least 64 MiB).
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
    },
    /// Check that every file the index says is uploaded is present with the expected size.
    Verify {
        /// Only this destination.
        #[arg(long)]
        dest: Option<String>,
        /// Download, decrypt and re-hash every object.
        #[arg(long)]
        deep: bool,
    },
    /// Storage and performance analytics with recommendations; --fleet for every node.
    Report {
        /// Print JSON.
        #[arg(long, conflicts_with = "html")]
        json: bool,
        /// Write a self-contained HTML page with charts to this file.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Every node sharing the primary, from their status objects, and the test results
        /// of every node's sealed runs, from their summary records.
        #[arg(long, conflicts_with = "run")]
        fleet: bool,
        /// With --fleet or --test: runs sealed this long ago or later (e.g. "7d").
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        since: Duration,
        /// One test's history (`class::name`) from every node's per-test records: executions,
        /// rates, the commits it flaked on, its nodes, its first and last failure.
        #[arg(long, value_name = "ID", conflicts_with_all = ["fleet", "run", "html"])]
        test: Option<String>,
        /// With --fleet: test results of this branch only.
        #[arg(long, requires = "fleet")]
        branch: Option<String>,
        /// With --fleet: also store the fleet page in the primary, at
        /// `_panoptic-sync/fleet/index.html`, its tests, nodes and branches linked to runs.
        #[arg(long, requires = "fleet")]
        publish: bool,
        /// One sealed run of this node, from its manifest (--html writes the run's page, as
        /// sealing stores it when encryption is off).
        #[arg(long, value_name = "RUN")]
        run: Option<String>,
    },
    /// Apply remote retention now: delete this node's objects older than remote_max_age (or
    /// their watch's remote_max_age), and whole sealed runs that the [retention.runs] rules
    /// let go (a pruned run reads as pruned and is not sealed again).
    Prune {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a link to a local file's object: public_base_url + key, or a presigned URL.
    Url {
        /// The local file, a run directory (its page), or NODE/RUN (any node's run page).
        path: PathBuf,
        /// Destination (default: the primary).
        #[arg(long)]
        dest: Option<String>,
        /// How long a presigned URL stays valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        expires: Duration,
    },
    /// A read-only HTTP gateway over a destination: runs' files decoded and verified on the
    /// fly, runs' pages, the runs under a prefix, the fleet page, /latest/BRANCH.
    Serve {
        /// Address to listen on (without --token-file, loopback addresses only).
        #[arg(long, default_value = "127.0.0.1:8480")]
        listen: std::net::SocketAddr,
        /// File whose first line is the token every request must bear
        /// (`Authorization: Bearer TOKEN`).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Destination to serve (default: the primary).
        #[arg(long)]
        from: Option<String>,
    },
    /// The flaky-test quarantine in the primary (`_panoptic-sync/quarantine.json`): the failing
    /// tests `gate` lets pass until their entries expire. A test is CLASS::NAME (its JUnit
    /// `classname`, or its suite's name without one, and its `name`).
    Quarantine {
        /// What to do with the list.
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Exit 0 only when every failed or errored test case in the JUnit files is quarantined and
    /// unexpired; 1 when one is not, when a file cannot be read, or when the files hold no test
    /// at all. Decides from the copy in the state directory when the primary cannot be read.
    Gate {
        /// JUnit XML files written by the tests.
        #[arg(required = true, value_name = "JUNIT_FILE")]
        junit: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a new 256-bit encryption key (mode 0600), or print it.
    Keygen {
        /// File to create (never overwritten); without it the key is printed.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Validate the configuration; without --offline also the key files, every destination and
    /// every [[notify]] entry (its program exists and is executable; its webhook's host accepts a
    /// TCP connection, nothing sent).
    CheckConfig {
        /// Do not contact destinations or webhook hosts, nor look for notify programs.
        #[arg(long)]
        offline: bool,
    },
}

/// `quarantine` subcommands.
#[derive(Debug, Subcommand)]
pub enum QuarantineAction {
    /// Quarantine a test (or replace its entry).
    Add {
        /// The test: CLASS::NAME.
        test: String,
        /// Why (a ticket, a note); required.
        #[arg(long)]
        reason: String,
        /// Until when: a date (YYYY-MM-DD, held through that day, UTC) or a duration from now
        /// ("14d"); at most 90 days ahead. Required: every entry expires.
        #[arg(long)]
        expires: String,
    },
    /// Take a test out of the quarantine.
    Remove {
        /// The test: CLASS::NAME.
        test: String,
    },
    /// Show the list (expired entries marked).
    List {
        /// Print JSON (the list as stored).
        #[arg(long)]
        json: bool,
    },
    /// Propose the fleet's flaky tests (those of `report --fleet`) that the list does not
    /// quarantine; --add adds them.
    Propose {
        /// Test results of runs sealed this long ago or later (e.g. "7d").
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        since: Duration,
        /// Test results of this branch only.
        #[arg(long)]
        branch: Option<String>,
        /// Add the proposed tests to the list.
        #[arg(long)]
        add: bool,
        /// With --add: until when (a date or a duration, as for `add`).
        #[arg(long, requires = "add", default_value = "14d")]
        expires: String,
        /// With --add: the reason recorded (default: the evidence, from the fleet's results).
        #[arg(long, requires = "add")]
        reason: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
