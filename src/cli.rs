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
use crate::daemon;
use crate::error::UsageError;
use crate::index::Index;
use crate::sync::Progress;

/// `print!` for command output: a closed stdout (`| head`) ends the output quietly instead of
/// panicking, as `ls | head` does (see [`render::write_out`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::render::write_out(format_args!($($arg)*))
    };
}

/// `println!` for command output, as [`out!`].
macro_rules! outln {
    () => {
        out!("\n")
    };
    ($($arg:tt)*) => {{
        out!($($arg)*);
        out!("\n");
    }};
}

mod args;
mod render;

pub use args::{Cli, Command, LogFormat, QuarantineAction};
use render::render_rebuilt;

fn parse_size(s: &str) -> Result<u64, String> {
    crate::config::parse_rate(&format!("{s}/s"))
        .map_err(|_| format!("bad size {s:?}: want a number and a unit, like \"2GiB\""))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    crate::runs::parse_label(s)
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

/// How a command ended. The exit code is decided here and nowhere else (PRODUCT.md: 0
/// success, 1 some files failed, 2 usage or configuration error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything asked for was done.
    Success,
    /// Some files or objects failed or are not stored yet, or the work itself failed.
    Failed,
    /// The configuration, a key file or the command line is wrong.
    Usage,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
        }
    }

    /// Success when nothing was left undone, otherwise failed.
    fn unless_failures(complete: bool) -> Exit {
        if complete {
            Exit::Success
        } else {
            Exit::Failed
        }
    }

    /// The exit for an error that stopped a command: a configuration or key-file error, or a
    /// command line asking for what cannot be (not a run, no such run: [`UsageError`]), is a
    /// usage error; anything else a failure.
    fn of_error(e: &anyhow::Error) -> Exit {
        let key_file = matches!(
            e.downcast_ref::<crate::crypto::CryptoError>(),
            Some(crate::crypto::CryptoError::KeyFile { .. })
        );
        if e.downcast_ref::<ConfigError>().is_some()
            || e.downcast_ref::<UsageError>().is_some()
            || key_file
        {
            Exit::Usage
        } else {
            Exit::Failed
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// Run the parsed command; the result is the process exit code.
pub fn execute(cli: Cli) -> ExitCode {
    run(cli).into()
}

/// An error that ends the command, printed the way every command prints one.
fn fail(e: impl std::fmt::Display, exit: Exit) -> Exit {
    eprintln!("panoptic-sync: {e}");
    exit
}

fn run(cli: Cli) -> Exit {
    if let Command::Keygen { out } = &cli.command {
        return keygen(out.as_deref());
    }
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => return fail(e, Exit::Usage),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                format_args!("cannot start the async runtime: {e}"),
                Exit::Failed,
            );
        }
    };
    let config_path = cli.config.clone();
    match runtime
        .block_on(dispatch(cli.command, config, config_path))
        .and_then(|done| done.render().map(|()| done.exit()))
    {
        Ok(exit) => exit,
        Err(e) => fail(format_args!("{e:#}"), Exit::of_error(&e)),
    }
}

/// What a command produced, for [`Done::render`] to show and [`Done::exit`] to judge.
enum Done {
    /// The daemon ran and stopped cleanly.
    Ran,
    /// `sync`.
    Synced(crate::sync::SyncSummary),
    /// `flush`.
    Flushed(crate::sync::FlushSummary),
    /// `status`.
    Status {
        status: crate::status::StatusView,
        json: bool,
    },
    /// `restore`.
    Restored {
        summary: crate::restore::RestoreSummary,
        to: PathBuf,
    },
    /// `verify`.
    Verified {
        report: crate::restore::VerifyReport,
        deep: bool,
    },
    /// `report --fleet`.
    Fleet {
        fleet: Box<crate::format::report::Fleet>,
        json: bool,
    },
    /// `report` (text or JSON).
    Report {
        report: crate::format::report::Report,
        json: bool,
    },
    /// `report --html`: the page was written here.
    WroteHtml(PathBuf),
    /// `prune`.
    Pruned {
        report: crate::retention::PruneReport,
        dry_run: bool,
    },
    /// `url`.
    Link(String),
    /// `seal`.
    Sealed(crate::seal::Sealed),
    /// `runs`.
    Runs {
        runs: Vec<crate::runs::RunInfo>,
        json: bool,
    },
    /// `report --test`.
    TestHistory {
        history: Box<crate::format::fleet::TestHistory>,
        json: bool,
    },
    /// `runs --fleet`.
    FleetRuns {
        runs: Vec<crate::catalog::FleetRun>,
        json: bool,
    },
    /// `report --run` (text or JSON).
    Run {
        manifest: Box<crate::format::manifest::Manifest>,
        json: bool,
    },
    /// `restore --run`.
    RunRestored {
        report: crate::runs::RunRestore,
        run: String,
        to: PathBuf,
    },
    /// `check-config`: what was checked, or why the configuration is not usable; and each
    /// `[[notify]]` entry's look (online only).
    Checked {
        /// The configuration, key files and destinations.
        result: anyhow::Result<Vec<String>>,
        /// One line per `[[notify]]` entry: what was found, or what is wrong.
        notifiers: Vec<Result<String, String>>,
    },
    /// `gate`: the failures judged by the quarantine list.
    Gate {
        gate: crate::quarantine::Gate,
        json: bool,
    },
    /// `quarantine list`.
    QuarantineList {
        listed: crate::quarantine::Listed,
        json: bool,
    },
    /// `quarantine add` or `remove`.
    QuarantineChanged(crate::quarantine::Changed),
    /// `quarantine propose`.
    Proposed {
        proposed: crate::quarantine::Proposed,
        json: bool,
    },
    /// Handled before the configuration is loaded.
    Nothing,
}

impl Done {
    /// The exit code the result calls for.
    fn exit(&self) -> Exit {
        match self {
            Done::Synced(s) => Exit::unless_failures(s.complete()),
            Done::Flushed(s) => Exit::unless_failures(s.complete()),
            Done::Restored { summary, .. } => Exit::unless_failures(summary.failed.is_empty()),
            Done::Verified { report, .. } => Exit::unless_failures(report.problems.is_empty()),
            Done::Pruned { report, .. } => Exit::unless_failures(
                report.failed.is_empty() && report.blobs.iter().all(|b| b.failed.is_empty()),
            ),
            Done::Checked { result, notifiers } => {
                if result.is_err() || notifiers.iter().any(Result::is_err) {
                    Exit::Usage
                } else {
                    Exit::Success
                }
            }
            Done::Sealed(s) => Exit::unless_failures(matches!(s, crate::seal::Sealed::Done { .. })),
            Done::RunRestored { report, .. } => Exit::unless_failures(report.failed.is_empty()),
            Done::Gate { gate, .. } => Exit::unless_failures(gate.passed()),
            Done::Ran
            | Done::Status { .. }
            | Done::Fleet { .. }
            | Done::Report { .. }
            | Done::WroteHtml(_)
            | Done::Link(_)
            | Done::Runs { .. }
            | Done::FleetRuns { .. }
            | Done::TestHistory { .. }
            | Done::Run { .. }
            | Done::QuarantineList { .. }
            | Done::QuarantineChanged(_)
            | Done::Proposed { .. }
            | Done::Nothing => Exit::Success,
        }
    }
}

async fn dispatch(
    command: Command,
    config: Config,
    config_path: Option<PathBuf>,
) -> anyhow::Result<Done> {
    if config.watch.is_empty() && needs_watch(&command) {
        return Err(UsageError(
            "this command needs a [[watch]] table; a configuration without one serves only \
             the commands that read (report, restore, serve, verify, runs --fleet, check-config)"
                .into(),
        )
        .into());
    }
    Ok(match command {
        Command::Run { rebuild_index } => run_daemon(config, config_path, rebuild_index).await?,
        Command::Sync { rebuild_index } => sync_once(&config, rebuild_index).await?,
        Command::Flush {
            timeout,
            all_destinations,
        } => Done::Flushed(crate::sync::flush(&config, timeout, all_destinations).await?),
        Command::Seal {
            dir,
            timeout,
            labels,
        } => {
            let dests = crate::destination::open_all(&config)?;
            Done::Sealed(crate::seal::seal(&config, &dests, &dir, timeout, labels).await?)
        }
        Command::Runs { json, fleet: true } => {
            let primary = crate::destination::open_primary(&config)?;
            let pipeline = crate::pipeline::Pipeline::from_config(&config)?;
            let runs = crate::catalog::fleet_runs(&primary, &pipeline).await?;
            Done::FleetRuns { runs, json }
        }
        Command::Runs { json, fleet: false } => {
            let c = config.clone();
            let runs =
                Index::open_and(&config.state_dir, move |i| crate::runs::list(&c, i)).await?;
            Done::Runs { runs, json }
        }
        Command::Status { json } => {
            let status =
                tokio::task::spawn_blocking(move || crate::status::read(&config)).await??;
            Done::Status { status, json }
        }
        Command::Restore {
            run: Some(run),
            from,
            to,
            ..
        } => {
            let report = crate::runs::restore_run(&config, &run, from.as_deref(), &to).await?;
            Done::RunRestored { report, run, to }
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
            let summary =
                crate::restore::restore(&config, &from, &to, prefix.as_deref(), &opts).await?;
            Done::Restored { summary, to }
        }
        Command::Serve {
            listen,
            token_file,
            from,
        } => {
            let dest = match from {
                Some(f) => crate::restore::find_destination(&config, &f)?,
                None => crate::destination::open_primary(&config)?,
            };
            let pipeline = crate::pipeline::Pipeline::from_config(&config)?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone())?;
            let opts = crate::serve::Options { listen, token_file };
            crate::serve::run(dest, pipeline, &opts, shutdown).await?;
            Done::Ran
        }
        Command::Verify { dest, deep } => Done::Verified {
            report: crate::restore::verify(&config, dest.as_deref(), deep).await?,
            deep,
        },
        Command::Report {
            json,
            test: Some(test),
            since,
            ..
        } => {
            let primary = crate::destination::open_primary(&config)?;
            let history = crate::results::history::read(
                &primary,
                &test,
                since,
                crate::format::units::now_ms(),
            )
            .await?;
            Done::TestHistory {
                history: Box::new(history),
                json,
            }
        }
        Command::Report {
            json,
            html,
            run: Some(run),
            ..
        } => report_run(&config, run, json, html).await?,
        Command::Report {
            json,
            html,
            fleet: true,
            since,
            branch,
            publish,
            run: None,
            test: None,
        } => report_fleet(&config, since, branch, json, html, publish).await?,
        Command::Report {
            json,
            html,
            fleet: false,
            run: None,
            ..
        } => {
            let c = config.clone();
            let report =
                Index::open_and(&config.state_dir, move |i| crate::report::build(&c, i)).await?;
            match html {
                Some(path) => write_page(path, &crate::html::report::node_page(&report))?,
                None => Done::Report { report, json },
            }
        }
        Command::Prune { dry_run } => Done::Pruned {
            report: crate::retention::prune(
                &config,
                &crate::destination::open_all(&config)?,
                dry_run,
            )
            .await?,
            dry_run,
        },
        Command::Url {
            path,
            dest,
            expires,
        } => Done::Link(crate::links::link(&config, &path, dest.as_deref(), expires).await?),
        Command::Gate { junit, json } => Done::Gate {
            gate: crate::quarantine::gate(&config, &junit).await?,
            json,
        },
        Command::Quarantine { action } => quarantine(&config, action).await?,
        Command::Keygen { .. } => Done::Nothing,
        Command::CheckConfig { offline } => Done::Checked {
            result: crate::agent::check_config(&config, offline).await,
            notifiers: if offline {
                Vec::new()
            } else {
                crate::notify::check(&config).await
            },
        },
    })
}

/// `run`: the daemon, until SIGTERM or SIGINT, reloading on SIGHUP.
async fn run_daemon(
    config: Config,
    config_path: Option<PathBuf>,
    rebuild_index: bool,
) -> anyhow::Result<Done> {
    if rebuild_index {
        rebuild(&config).await?;
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let reloads = spawn_reload_handler(config_path)?;
    daemon::run_with_reload(config, shutdown, reloads).await?;
    Ok(Done::Ran)
}

/// `sync`: one pass with a progress line, then this node's status published.
async fn sync_once(config: &Config, rebuild_index: bool) -> anyhow::Result<Done> {
    if rebuild_index {
        rebuild(config).await?;
    }
    let mut progress = SyncProgress::new();
    let summary = crate::sync::sync(config, &mut progress).await?;
    crate::node_status::publish_after_sync(config).await;
    Ok(Done::Synced(summary))
}

/// `report --run RUN`: the sealed run's manifest as text or JSON, or its page written to
/// `html`.
async fn report_run(
    config: &Config,
    run: String,
    json: bool,
    html: Option<PathBuf>,
) -> anyhow::Result<Done> {
    let manifest = if run.contains('/') || config.watch.is_empty() {
        // Any node's run (NODE/RUN), or this node's from a config that only reads: from the
        // primary, by its manifest.
        let (node, name) = run
            .split_once('/')
            .unwrap_or((config.node_id.as_str(), run.as_str()));
        let primary = crate::destination::open_primary(config)?;
        let pipeline = crate::pipeline::Pipeline::from_config(config)?;
        crate::catalog::find(&primary, &pipeline, node, name)
            .await?
            .1
    } else {
        let c = config.clone();
        Index::open_and(&config.state_dir, move |i| {
            crate::runs::sealed_manifest(&c, i, &run)
        })
        .await?
    };
    let Some(path) = html else {
        return Ok(Done::Run {
            manifest: Box::new(manifest),
            json,
        });
    };
    let (logical, up) = crate::html::run_page::location(&manifest);
    let manifest_key = format!(
        "{}/{}/{}",
        manifest.key_prefix,
        crate::format::manifest::RUN_DIR,
        crate::format::manifest::MANIFEST_NAME
    );
    let encrypted = config.pipeline.encryption != crate::config::Encryption::None;
    let stories = match crate::destination::open_primary(config) {
        Ok(p) => crate::seal::failure_stories(std::slice::from_ref(&p), &manifest).await,
        Err(_) => None,
    };
    let page =
        crate::html::run_page::render(&manifest, &manifest_key, up, encrypted, stories.as_ref());
    let done = write_page(path, &page)?;
    tracing::debug!(page = %logical, "rendered the run's page locally");
    Ok(done)
}

/// `report --fleet`: every node's status and the window's test results, from the primary.
async fn report_fleet(
    config: &Config,
    since: Duration,
    branch: Option<String>,
    json: bool,
    html: Option<PathBuf>,
    publish: bool,
) -> anyhow::Result<Done> {
    let query = crate::results::fleet::Query {
        since,
        branch,
        now_ms: crate::format::units::now_ms(),
    };
    let fleet = crate::report::fleet(config, &query).await?;
    if publish {
        let primary = crate::destination::open_primary(config)?;
        let key = crate::report::publish_fleet(&primary, &fleet).await?;
        eprintln!(
            "published the fleet page to {} at {}",
            primary.name,
            crate::destination::printable(&key)
        );
    }
    match html {
        Some(path) => write_page(path, &crate::html::report::fleet_page(&fleet, None)),
        None => Ok(Done::Fleet {
            fleet: Box::new(fleet),
            json,
        }),
    }
}

/// `quarantine add|remove|list|propose`: the list in the primary.
async fn quarantine(config: &Config, action: QuarantineAction) -> anyhow::Result<Done> {
    use crate::quarantine as q;
    let store = q::ListStore::open(config)?;
    Ok(match action {
        QuarantineAction::Add {
            test,
            reason,
            expires,
        } => Done::QuarantineChanged(q::add(&store, &test, &reason, &expires).await?),
        QuarantineAction::Remove { test } => {
            Done::QuarantineChanged(q::remove(&store, &test).await?)
        }
        QuarantineAction::List { json } => Done::QuarantineList {
            listed: store.read().await?,
            json,
        },
        QuarantineAction::Propose {
            since,
            branch,
            add,
            expires,
            reason,
            json,
        } => {
            let query = crate::results::fleet::Query {
                since,
                branch,
                now_ms: crate::format::units::now_ms(),
            };
            let add = add.then_some((expires.as_str(), reason.as_deref()));
            Done::Proposed {
                proposed: q::propose(&store, &query, add).await?,
                json,
            }
        }
    })
}

/// Whether `command` works on the watched trees (and so needs a `[[watch]]`).
fn needs_watch(command: &Command) -> bool {
    matches!(
        command,
        Command::Run { .. }
            | Command::Sync { .. }
            | Command::Flush { .. }
            | Command::Seal { .. }
            | Command::Runs { fleet: false, .. }
            | Command::Prune { .. }
    )
}

/// Write a rendered page for `--html PATH`.
fn write_page(path: PathBuf, page: &str) -> anyhow::Result<Done> {
    std::fs::write(&path, page).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(Done::WroteHtml(path))
}

fn keygen(out: Option<&std::path::Path>) -> Exit {
    let key = match crate::crypto::MasterKey::generate() {
        Ok(k) => k,
        Err(e) => return fail(e, Exit::Failed),
    };
    match out {
        None => {
            outln!("{}", key.to_hex());
            Exit::Success
        }
        Some(path) => match key.write_new(path) {
            Ok(()) => {
                eprintln!(
                    "wrote a new key (id {}) to {}",
                    key.id_hex(),
                    path.display()
                );
                Exit::Success
            }
            // An existing file or an unwritable place: the command line asked for it.
            Err(e) => fail(e, Exit::Usage),
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
    let _lock = crate::agent::StateLock::acquire(&config.state_dir)?;
    let r = crate::rebuild::rebuild_index(config).await?;
    // Shown at once: the daemon or sync that follows may run for a long time.
    render_rebuilt(&r);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_product_contract() {
        assert_eq!(Exit::Success.code(), 0);
        assert_eq!(Exit::Failed.code(), 1);
        assert_eq!(Exit::Usage.code(), 2);
        let bad_config = Config::parse("no_such_key = 1\n", "test.toml").unwrap_err();
        assert_eq!(
            Exit::of_error(&anyhow::Error::from(bad_config).context("loading")),
            Exit::Usage
        );
        assert_eq!(
            Exit::of_error(&anyhow::anyhow!("connection refused")),
            Exit::Failed
        );
    }
}
