//! Renders the man page and the bash, zsh and fish completions from the clap definition, so
//! that every `cargo build` leaves them where the packagers look: `cargo deb` and
//! `cargo generate-rpm` name them as `target/release/man/panoptic-sync.1` and
//! `target/release/completions/…` in `[package.metadata.deb]` / `[package.metadata.generate-rpm]`.
//!
//! Why here and not a packaging script: a fresh clone then builds the complete package with
//! the stock tools alone. Why outside `OUT_DIR`: that directory's name carries a hash the
//! asset lists cannot name, while both packagers map the `target/release/` prefix to the
//! real target directory (profile, `--target`, `CARGO_TARGET_DIR`). The profile directory is
//! `OUT_DIR`'s third ancestor (`<profile>/build/<crate>-<hash>/out`), and the files written
//! there are build products like the binary beside them.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory;
use clap_complete::Shell;

/// The CLI definition, shared with the crate (src/cli/args.rs).
#[allow(dead_code, unreachable_pub)]
mod cli {
    include!("src/cli/args.rs");
}

// Only the help text is rendered here; no argument is ever parsed for real, so the value
// parsers the definition names (the crate's live in src/cli.rs) just accept their input.
fn parse_duration(_: &str) -> Result<Duration, String> {
    Ok(Duration::ZERO)
}
fn parse_size(_: &str) -> Result<u64, String> {
    Ok(0)
}
fn parse_label(_: &str) -> Result<(String, String), String> {
    Ok((String::new(), String::new()))
}

const BIN: &str = "panoptic-sync";

fn main() -> io::Result<()> {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cli/args.rs");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR is <profile>/build/<crate>-<hash>/out");
    render(profile_dir)
}

fn render(profile_dir: &Path) -> io::Result<()> {
    let cmd = cli::Cli::command();
    let man_dir = profile_dir.join("man");
    std::fs::create_dir_all(&man_dir)?;
    let mut man = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut man)?;
    write_if_changed(&man_dir.join(format!("{BIN}.1")), &man)?;

    let completions_dir = profile_dir.join("completions");
    std::fs::create_dir_all(&completions_dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), BIN, &mut script);
        let name = clap_complete::Generator::file_name(&shell, BIN);
        write_if_changed(&completions_dir.join(name), &script)?;
    }
    Ok(())
}

/// Leaves an identical file alone, so its mtime does not change on every build.
fn write_if_changed(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    std::fs::write(path, bytes)
}
