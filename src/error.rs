//! The one error type that means "the command line asked for what cannot be": not a run
//! directory, no such run, a run being sealed elsewhere. The command line maps it (with
//! configuration and key-file errors) to exit code 2, in `Exit::of_error` and nowhere else.

/// A mistake in what was asked (exit code 2): not a run directory, a bad label, no such run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);
