//! The evidence of a failure: the files of the run that document it, found at seal by the
//! conventions JUnit tools use, and recorded in the manifest beside the failure (`evidence`).
//!
//! A file of the run is evidence of a failing test when
//! - the case's `<system-out>` or `<system-err>` names it as `[[ATTACHMENT|path]]` (the
//!   convention of Jenkins' JUnit attachments, which Surefire, pytest and others can write);
//! - its message or trace names it (a screenshot or log path in an assertion's text);
//! - it lies under a directory named after the test (Playwright's `test-results/<test>/`,
//!   pytest's `tmp_path` directories, a `screenshots/<test>/` of one's own).
//!
//! A path is looked up among the run's files only, never on the disk: relative to the JUnit
//! file's directory, then to the run; an absolute path (written on the runner, perhaps under
//! another mount) by its longest tail of at least two components that is a file or directory
//! of the run. A directory stands for the files under it. At most [`MAX_EVIDENCE`] files are
//! kept per failure, by path; the failure's own JUnit file is its `file`, not evidence.

use std::collections::BTreeSet;

use crate::format::results::{Failure, MAX_EVIDENCE};

/// The attachment marker's opening.
const MARK: &str = "[[ATTACHMENT|";
/// Characters of a named path considered; longer ones are ignored.
const MAX_PATH: usize = 1024;
/// Words of a failure's message and trace looked at as possible paths.
const MAX_WORDS: usize = 2000;
/// A test name must have at least this many characters (normalised) to name a directory.
const MIN_NAME: usize = 4;

/// Add the paths `text` names as `[[ATTACHMENT|path]]` to `out` (each once, at most
/// [`MAX_EVIDENCE`]).
pub(crate) fn attachments_in(text: &str, out: &mut Vec<String>) {
    let mut rest = text;
    while let Some(i) = rest.find(MARK) {
        rest = &rest[i + MARK.len()..];
        let Some(end) = rest.find("]]") else {
            break;
        };
        let path = rest[..end].trim();
        rest = &rest[end + 2..];
        if out.len() >= MAX_EVIDENCE {
            break;
        }
        if !path.is_empty() && path.len() <= MAX_PATH && !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
}

/// Fill in the `evidence` of each failure from its attachments (`attachments[i]` for
/// `failures[i]`), its message and trace, and the directories of the run named after it.
/// `run_files` are the run's files, relative to the run, `/`-separated.
pub(crate) fn resolve(failures: &mut [Failure], attachments: &[Vec<String>], run_files: &[String]) {
    if failures.is_empty() || run_files.is_empty() {
        return;
    }
    let files: BTreeSet<&str> = run_files.iter().map(String::as_str).collect();
    // Every directory of the run once, with its name normalised.
    let mut dirs: BTreeSet<&str> = BTreeSet::new();
    for f in &files {
        let mut at = f.len();
        while let Some(i) = f[..at].rfind('/') {
            if !dirs.insert(&f[..i]) {
                break; // its ancestors are in already
            }
            at = i;
        }
    }
    let named: Vec<(&str, String)> = dirs
        .iter()
        .map(|d| (*d, normalise(d.rsplit('/').next().unwrap_or(d))))
        .collect();
    for (i, f) in failures.iter_mut().enumerate() {
        let base = f.file.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let mut found: BTreeSet<&str> = BTreeSet::new();
        for a in attachments.get(i).into_iter().flatten() {
            lookup(a, base, &files, true, &mut found);
        }
        let text = [f.message.as_deref(), f.trace.as_deref()];
        for word in text
            .into_iter()
            .flatten()
            .flat_map(|t| t.split(is_separator))
            .filter(|w| !w.is_empty())
            .take(MAX_WORDS)
        {
            let word = strip_position(word);
            if word.contains('/') || word.contains('\\') || word.contains('.') {
                lookup(word, base, &files, word.contains('/'), &mut found);
            }
        }
        let want = normalise(&f.name);
        if want.len() >= MIN_NAME {
            for (dir, name) in &named {
                if name.contains(&want) {
                    under(dir, &files, &mut found);
                }
            }
        }
        found.remove(f.file.as_str());
        f.evidence = found
            .into_iter()
            .take(MAX_EVIDENCE)
            .map(String::from)
            .collect();
    }
}

/// Characters that end a word of a message that may be a path.
fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\'' | '(' | ')' | '[' | ']' | '<' | '>' | ',' | ';' | '`'
        )
}

/// `a/b.rs:12:5` → `a/b.rs`; a trailing `.` or `:` goes too.
fn strip_position(word: &str) -> &str {
    let mut w = word.trim_end_matches(['.', ':']);
    for _ in 0..2 {
        match w.rsplit_once(':') {
            Some((head, tail)) if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) => {
                w = head;
            }
            _ => break,
        }
    }
    w
}

/// Look `path` up among the run's `files` (relative to `base`, the JUnit file's directory,
/// then to the run; an absolute one by its tail, when `tails`), adding what it names.
fn lookup<'a>(
    path: &str,
    base: &str,
    files: &BTreeSet<&'a str>,
    tails: bool,
    found: &mut BTreeSet<&'a str>,
) {
    if path.len() > MAX_PATH {
        return;
    }
    let path = path
        .strip_prefix("file://")
        .unwrap_or(path)
        .replace('\\', "/");
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return;
    }
    let absolute = path.starts_with('/') || parts[0].ends_with(':');
    if !absolute {
        let joined = parts.join("/");
        if !base.is_empty() && add(&format!("{base}/{joined}"), files, found) {
            return;
        }
        if add(&joined, files, found) {
            return;
        }
    }
    if tails || absolute {
        for start in 1..parts.len().saturating_sub(1) {
            if add(&parts[start..].join("/"), files, found) {
                return;
            }
        }
    }
}

/// Add `candidate` if it is a file of the run, or the files under it if it is a directory.
fn add<'a>(candidate: &str, files: &BTreeSet<&'a str>, found: &mut BTreeSet<&'a str>) -> bool {
    if let Some(f) = files.get(candidate) {
        found.insert(f);
        return true;
    }
    let before = found.len();
    under(candidate, files, found);
    found.len() > before
}

/// Add the files under directory `dir` (at most [`MAX_EVIDENCE`] of them).
fn under<'a>(dir: &str, files: &BTreeSet<&'a str>, found: &mut BTreeSet<&'a str>) {
    let prefix = format!("{dir}/");
    for f in files
        .range::<str, _>((
            std::ops::Bound::Included(prefix.as_str()),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|f| f.starts_with(&prefix))
        .take(MAX_EVIDENCE)
    {
        found.insert(f);
    }
}

/// Lower case, every run of other characters than letters and digits one `-`, none at the
/// ends: `checkout › flaky payment` and `retry-checkout-flaky-payment-retry1` meet.
fn normalise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::results::Outcome;

    fn failure(name: &str, file: &str, message: &str, trace: Option<&str>) -> Failure {
        Failure {
            suite: "s".into(),
            class: "c".into(),
            name: name.into(),
            outcome: Outcome::Failed,
            message: Some(message.into()),
            file: file.into(),
            trace: trace.map(String::from),
            evidence: Vec::new(),
        }
    }

    #[test]
    fn attachments_paths_in_the_text_and_directories_named_after_the_test() {
        let files: Vec<String> = [
            "reports/junit.xml",
            "reports/shots/login.png",
            "logs/server.log",
            "test-results/retry-checkout-flaky-payment-chromium/trace.zip",
            "test-results/retry-checkout-flaky-payment-chromium-retry1/video.webm",
            "test-results/retry-checkout-adds-an-item/trace.zip",
            "pytest/test_always_fails0/out.txt",
            "other/login.png",
        ]
        .map(String::from)
        .to_vec();
        let mut out = Vec::new();
        attachments_in(
            "noise [[ATTACHMENT|shots/login.png]] more [[ATTACHMENT|/home/ci/build/run-7/logs/server.log]] [[ATTACHMENT|shots/login.png]] [[ATTACHMENT|",
            &mut out,
        );
        assert_eq!(
            out,
            ["shots/login.png", "/home/ci/build/run-7/logs/server.log"]
        );
        let mut failures = vec![
            failure("login works", "reports/junit.xml", "boom", None),
            failure(
                "checkout \u{203a} flaky payment",
                "reports/junit.xml",
                "expected 1",
                Some("at /runner/_work/app/logs/server.log:12:5\n at ../../etc/passwd"),
            ),
            failure(
                "test_always_fails",
                "reports/junit.xml",
                "assert 1 == 2",
                None,
            ),
            failure("x", "reports/junit.xml", "see login.png", None),
        ];
        resolve(&mut failures, &[out, vec![], vec![], vec![]], &files);
        assert_eq!(
            failures[0].evidence,
            ["logs/server.log", "reports/shots/login.png"]
        );
        assert_eq!(
            failures[1].evidence,
            [
                "logs/server.log",
                "test-results/retry-checkout-flaky-payment-chromium-retry1/video.webm",
                "test-results/retry-checkout-flaky-payment-chromium/trace.zip",
            ]
        );
        assert_eq!(failures[2].evidence, ["pytest/test_always_fails0/out.txt"]);
        // A bare name is looked up beside the JUnit file and at the run's top only; a name
        // shorter than four characters names no directory.
        assert!(
            failures[3].evidence.is_empty(),
            "{:?}",
            failures[3].evidence
        );
    }

    #[test]
    fn positions_and_caps() {
        assert_eq!(strip_position("src/a.rs:12:5"), "src/a.rs");
        assert_eq!(strip_position("src/a.rs:12."), "src/a.rs");
        assert_eq!(strip_position("c:"), "c");
        let files: Vec<String> = (0..100)
            .map(|i| format!("shots/t-big/{i:03}.png"))
            .collect();
        let mut f = vec![failure("t big", "j.xml", "m", None)];
        resolve(&mut f, &[vec![]], &files);
        assert_eq!(f[0].evidence.len(), MAX_EVIDENCE);
        assert_eq!(f[0].evidence[0], "shots/t-big/000.png");
    }
}
