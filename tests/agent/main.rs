//! The integration tests: one binary, real files, a real SQLite index, a real S3 server
//! (s3s-fs) checked with an independent client (boto3), and file:// backups.

// The tests make FIFOs and device nodes, signal and reap child processes through libc.
#![allow(unsafe_code)]
// Helpers shared between the test modules of this one binary.
#![allow(unreachable_pub)]

mod util;

mod browse;
mod clouds;
mod confined;
mod core;
mod dedup;
mod fleet;
mod format;
mod hostile;
mod notify;
mod quarantine;
mod reliability;
mod restore;
mod results;
mod runs;
mod service;
mod tail;
