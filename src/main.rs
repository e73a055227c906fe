//! The `panoptic-sync` binary: parse the command line, set up logging, hand over to the library.

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
        .with_writer(|| EscapingStderr)
        // Colours would be escaped like any control character (see `EscapingStderr`).
        .with_ansi(false);
    // Under journald, the journal adds its own timestamps.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

/// The log's writer: stderr, with every control character of a line escaped but its final
/// newline. Logged values come from trees, CI jobs and servers (run names, paths, errors): a
/// newline or an escape sequence in one must not forge a line or drive the terminal.
struct EscapingStderr;

impl std::io::Write for EscapingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(b) => (b, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let text = String::from_utf8_lossy(body);
        let mut out = String::with_capacity(text.len() + 1);
        for c in text.chars() {
            if c.is_control() {
                out.extend(c.escape_unicode());
            } else {
                out.push(c);
            }
        }
        let mut err = std::io::stderr().lock();
        err.write_all(out.as_bytes())?;
        err.write_all(end)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
