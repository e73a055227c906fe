//! The command line: clap definitions and the dispatch from a subcommand to the library.
//!
//! Exit codes: 0 success, 1 some files failed (or are not stored yet), 2 usage or
//! configuration error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::daemon::{self, Progress};

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
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::runs::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List runs: open, sealed or changed after seal, with files, bytes and completeness.
    Runs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
        /// Bounds objects without a recorded size (plain compressed objects in file://).
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
        /// Every node sharing the primary, from their status objects.
        #[arg(long)]
        fleet: bool,
    },
    /// Apply remote retention now: delete this node's objects older than remote_max_age.
    Prune {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a link to a local file's object: public_base_url + key, or a presigned URL.
    Url {
        /// The local file.
        path: PathBuf,
        /// Destination (default: the primary).
        #[arg(long)]
        dest: Option<String>,
        /// How long a presigned URL stays valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        expires: Duration,
    },
    /// Write a new 256-bit encryption key (mode 0600), or print it.
    Keygen {
        /// File to create (never overwritten); without it the key is printed.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the man page and shell completions into a directory (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Output directory.
        dir: PathBuf,
    },
    /// Validate the configuration; without --offline also the key files and every destination.
    CheckConfig {
        /// Do not contact destinations.
        #[arg(long)]
        offline: bool,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::throttle::parse_rate(&format!("{s}/s"))
        .map_err(|_| format!("bad size {s:?}: want a number and a unit, like \"2GiB\""))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

/// Load the configuration named on the command line, with relative paths made absolute.
pub fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    load(cli.config.as_deref())
}

/// Load, make paths absolute, resolve the watch roots and check what needs the filesystem.
fn load(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    let (mut config, name) = Config::load(path)?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    config.resolve(&cwd, &name)?;
    Ok(config)
}

/// Run the parsed command; the result is the process exit code.
pub fn execute(cli: Cli) -> ExitCode {
    if let Command::Keygen { out } = &cli.command {
        return keygen(out.as_deref());
    }
    if let Command::GenerateAssets { dir } = &cli.command {
        return match generate_assets(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("panoptic-sync: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("panoptic-sync: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("panoptic-sync: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let config_path = cli.config.clone();
    let result = runtime.block_on(dispatch(cli.command, config, config_path));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("panoptic-sync: {e:#}");
            let key_file = matches!(
                e.downcast_ref::<crate::crypto::CryptoError>(),
                Some(crate::crypto::CryptoError::KeyFile { .. })
            );
            if e.downcast_ref::<ConfigError>().is_some() || key_file {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

async fn dispatch(
    command: Command,
    config: Config,
    config_path: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { rebuild_index } => {
            if rebuild_index {
                rebuild(&config).await?;
            }
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone())?;
            let reloads = spawn_reload_handler(config_path)?;
            daemon::run_with_reload(config, shutdown, reloads).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync { rebuild_index } => {
            if rebuild_index {
                rebuild(&config).await?;
            }
            let mut progress = SyncProgress::new();
            let summary = daemon::sync(&config, &mut progress).await?;
            for root in &summary.refused_roots {
                eprintln!(
                    "panoptic-sync: watch root {} is not a real directory (a symbolic link is never followed); nothing under it was synced",
                    root.display()
                );
            }
            for d in &summary.destinations {
                println!(
                    "{}: {} stored, {} missing{}",
                    d.name,
                    d.stored,
                    d.missing,
                    d.last_error
                        .as_deref()
                        .filter(|_| d.missing > 0)
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                );
            }
            Ok(if summary.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Flush {
            timeout,
            all_destinations,
        } => {
            let s = daemon::flush(&config, timeout, all_destinations).await?;
            for (p, e) in &s.failed {
                eprintln!("failed: {}: {e}", p.display());
            }
            for p in s.waiting.iter().take(20) {
                eprintln!("not stored yet: {}", p.display());
            }
            if s.waiting.len() > 20 {
                eprintln!("... and {} more not stored yet", s.waiting.len() - 20);
            }
            println!(
                "{} files stored, {} failed, {} not stored yet",
                s.stored,
                s.failed.len(),
                s.waiting.len()
            );
            Ok(if s.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Seal {
            dir,
            timeout,
            labels,
        } => seal(&config, &dir, timeout, labels).await,
        Command::Runs { json } => {
            let c = config.clone();
            let runs = tokio::task::spawn_blocking(move || {
                let index = crate::index::Index::open(&c.state_dir)?;
                crate::runs::list(&c, &index)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                print!("{}", crate::runs::render(&runs));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let status =
                tokio::task::spawn_blocking(move || crate::status::read(&config)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", crate::status::render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            run: Some(run),
            from,
            to,
            ..
        } => {
            let r = match crate::runs::restore_run(&config, &run, from.as_deref(), &to).await {
                Ok(r) => r,
                Err(e) if e.downcast_ref::<crate::runs::UsageError>().is_some() => {
                    eprintln!("panoptic-sync: {e:#}");
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e),
            };
            for (path, e) in &r.failed {
                eprintln!("failed: {path}: {e}");
            }
            println!(
                "run {run}: {} files restored to {} from manifest {}, {} failed",
                r.restored,
                to.display(),
                r.manifest_key,
                r.failed.len()
            );
            Ok(if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Restore {
            run: None,
            from,
            to,
            prefix,
            allow_plaintext,
            max_size,
        } => {
            let from = from.unwrap_or_default();
            let opts = crate::restore::RestoreOptions {
                allow_plaintext,
                max_size,
            };
            let s = crate::restore::restore(&config, &from, &to, prefix.as_deref(), &opts).await?;
            for (key, e) in &s.failed {
                eprintln!("failed: {key}: {e}");
            }
            for key in &s.superseded {
                eprintln!("skipped (a newer object maps to the same file): {key}");
            }
            println!(
                "{} files restored to {}, {} objects failed",
                s.restored,
                to.display(),
                s.failed.len()
            );
            Ok(if s.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Verify { dest, deep } => {
            let r = crate::restore::verify(&config, dest.as_deref(), deep).await?;
            for p in &r.problems {
                eprintln!("{}: {}: {}", p.dest, p.key, p.problem);
            }
            println!(
                "{} objects checked{}, {} problems",
                r.checked,
                if deep { " deeply" } else { "" },
                r.problems.len()
            );
            Ok(if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Report { json, html, fleet } => {
            if fleet {
                let f = crate::report::fleet(&config).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&f)?);
                } else {
                    print!("{}", crate::report::render_fleet(&f));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let c = config.clone();
            let r = tokio::task::spawn_blocking(move || {
                let index = crate::index::Index::open(&c.state_dir)?;
                crate::report::build(&c, &index)
            })
            .await??;
            if let Some(path) = html {
                std::fs::write(&path, crate::report::render_html(&r))
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
                println!("wrote {}", path.display());
            } else if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", crate::report::render_text(&r));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune { dry_run } => {
            let r = crate::retention::prune(&config, dry_run).await?;
            for (dest, key) in &r.expired {
                println!(
                    "{}{dest}: {key}",
                    if dry_run { "would delete " } else { "deleted " }
                );
            }
            for p in &r.skipped_prefixes {
                eprintln!("skipped prefix {p:?}: it does not contain the node id");
            }
            for (dest, key, e) in &r.failed {
                eprintln!("failed: {dest}: {key}: {e}");
            }
            println!(
                "{} objects {}",
                r.expired.len(),
                if dry_run {
                    "would be deleted"
                } else {
                    "deleted"
                }
            );
            Ok(if r.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Url {
            path,
            dest,
            expires,
        } => {
            let link = crate::links::link(&config, &path, dest.as_deref(), expires).await?;
            println!("{link}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { .. } | Command::GenerateAssets { .. } => Ok(ExitCode::SUCCESS),
        Command::CheckConfig { offline } => match daemon::check_config(&config, offline).await {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                println!("configuration is valid");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("panoptic-sync: {e:#}");
                Ok(ExitCode::from(2))
            }
        },
    }
}

/// `seal`: exit 0 sealed, 1 not every file stored in time (or failed), 2 not a run.
async fn seal(
    config: &Config,
    dir: &std::path::Path,
    timeout: Duration,
    labels: Vec<(String, String)>,
) -> anyhow::Result<ExitCode> {
    match crate::runs::seal(config, dir, timeout, labels).await {
        Ok(crate::runs::Sealed::Done {
            manifest,
            stored_key,
        }) => {
            println!(
                "sealed run {}: {} files, {} bytes; manifest {stored_key} in every destination",
                manifest.run, manifest.totals.files, manifest.totals.bytes
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(crate::runs::Sealed::Incomplete(s)) => {
            for (p, e) in &s.failed {
                eprintln!("failed: {}: {e}", p.display());
            }
            for p in s.waiting.iter().take(20) {
                eprintln!("not stored yet: {}", p.display());
            }
            if s.waiting.len() > 20 {
                eprintln!("... and {} more not stored yet", s.waiting.len() - 20);
            }
            eprintln!(
                "not sealed: {} files stored, {} failed, {} not stored yet in every destination",
                s.stored,
                s.failed.len(),
                s.waiting.len()
            );
            Ok(ExitCode::from(1))
        }
        Err(e) if e.downcast_ref::<crate::runs::UsageError>().is_some() => {
            eprintln!("panoptic-sync: {e:#}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e),
    }
}

/// The man page (`panoptic-sync.1`) and bash, zsh and fish completions.
fn generate_assets(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut man)?;
    std::fs::write(dir.join("panoptic-sync.1"), man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "panoptic-sync", dir)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

fn keygen(out: Option<&std::path::Path>) -> ExitCode {
    let key = match crate::crypto::MasterKey::generate() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("panoptic-sync: {e}");
            return ExitCode::from(1);
        }
    };
    match out {
        None => {
            println!("{}", key.to_hex());
            ExitCode::SUCCESS
        }
        Some(path) => match key.write_new(path) {
            Ok(()) => {
                eprintln!(
                    "wrote a new key (id {}) to {}",
                    key.id_hex(),
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("panoptic-sync: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// On every SIGHUP, read the configuration again (from the same place) and hand it, or the
/// reason it is invalid, to the daemon.
fn spawn_reload_handler(
    config_path: Option<PathBuf>,
) -> anyhow::Result<tokio::sync::mpsc::Receiver<anyhow::Result<Config>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the configuration");
            let loaded = load(config_path.as_deref());
            if tx.send(loaded.map_err(anyhow::Error::from)).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

/// A progress bar on a terminal, a line every few seconds otherwise.
struct SyncProgress {
    bar: Option<indicatif::ProgressBar>,
    last_line: std::time::Instant,
}

impl SyncProgress {
    fn new() -> SyncProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} files",
            ) {
                bar.set_style(style);
            }
            bar
        });
        SyncProgress {
            bar,
            last_line: std::time::Instant::now(),
        }
    }
}

impl Progress for SyncProgress {
    fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            None => {
                if self.last_line.elapsed() >= Duration::from_secs(5) {
                    self.last_line = std::time::Instant::now();
                    eprintln!("synced {done} of {total} files");
                }
            }
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `--rebuild-index`, with the state directory locked against a running daemon.
async fn rebuild(config: &Config) -> anyhow::Result<()> {
    let _lock = daemon::StateLock::acquire(&config.state_dir)?;
    let r = crate::rebuild::rebuild_index(config).await?;
    if let Some(old) = &r.moved_aside {
        eprintln!("moved the old index aside to {}", old.display());
    }
    for (name, held, unknown) in &r.destinations {
        eprintln!(
            "{name}: {held} objects recorded from the destination{}",
            if *unknown > 0 {
                format!(", {unknown} without a readable hash (uploaded again)")
            } else {
                String::new()
            }
        );
    }
    for (name, bad) in &r.bad_keys {
        eprintln!("{name}: not recorded: {bad}");
    }
    Ok(())
}
