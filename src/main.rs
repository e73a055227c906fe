//! The `panoptic-sync` binary: parse the command line, set up logging, hand over to the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use panoptic_sync::cli::{Cli, LogFormat, execute};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.log_format);
    execute(cli)
}

fn init_logging(verbose: u8, format: LogFormat) {
    // notify warns once per watch it cannot remove: a CI job renaming directories in a loop
    // would fill the journal with it (the agent's own warnings say what matters).
    let default = match verbose {
        0 => "info,notify=error",
        1 => "panoptic_sync=debug,info,notify=error",
        // The agent's own trace; dependencies stay at info (at trace, HTTP clients log
        // request headers, credentials among them). PANOPTIC_SYNC_LOG overrides.
        _ => "panoptic_sync=trace,info,notify=error",
    };
    let filter =
        EnvFilter::try_from_env("PANOPTIC_SYNC_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Under journald, the journal adds its own timestamps.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).init(),
        // Colours only on a terminal, never in a log file.
        (LogFormat::Text, false) => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
