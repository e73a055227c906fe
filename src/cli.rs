//! The command line: the clap definitions (in `cli/args.rs`, shared with build.rs) and the
//! dispatch from a subcommand to the library.
//!
//! Exit codes: 0 success, 1 some files failed (or are not stored yet), 2 usage or
//! configuration error.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::daemon::{self, Progress};

mod args;
pub use args::{Cli, Command, LogFormat};

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
            from,
            to,
            prefix,
            allow_plaintext,
            max_size,
        } => {
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
        Command::Keygen { .. } => Ok(ExitCode::SUCCESS),
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
