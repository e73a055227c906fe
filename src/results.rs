//! Test results: the JUnit XML files of a run, parsed when it is sealed.
//!
//! `seal` picks a run's JUnit files by the watch's `junit` globs (relative to the run) and, with
//! `junit_sniff`, every other `.xml` file whose root element is `<testsuites>` or `<testsuite>`.
//! Each is read through the run root's directory handle (never by path: the tree is written by
//! the CI job), capped at [`MAX_FILE_BYTES`], and parsed with quick-xml's streaming reader on
//! the sealing blocking thread. A file that is too large, not well-formed or not JUnit is
//! counted and named in the summary, and its test cases are left out; it never fails the seal.
//!
//! What comes out: a [`TestSummary`] for the manifest (counts, duration, the first failures
//! with their messages truncated, the slowest tests, totals per suite), the notification and
//! the run page; and the run's test cases for its summary record ([`RunRecord`]), written in
//! the clear under `_panoptic-sync/runs/date=YYYY-MM-DD/node=<id>/<run>~<hash>.json` for
//! `report --fleet` ([`fleet`]) and for query engines (schema in docs/FORMAT.md).
//!
//! A test is identified by its class (`classname`, or the suite's name when there is none) and
//! its name; JUnit's own totals (`tests="…"` on a suite) are never trusted, only the cases.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;
use std::sync::Arc;

use globset::GlobSet;
use object_store::{Attribute, Attributes, ObjectStoreExt, PutOptions, PutPayload};
use quick_xml::events::{BytesStart, Event};

use crate::config::Watch;
use crate::destination::{self, Destination};
use crate::format::record::{MAX_RECORD_CASES, RunRecord, record_key, test_records_key};
use crate::format::results::{
    BadFile, Case, Collected, Failure, MAX_FAILURES, MAX_FILES, MAX_MESSAGE, MAX_TRACE, Outcome,
    SLOWEST, SuiteTotals, TestSummary, Timed,
};
use crate::runs::RunDir;
use crate::scan::Root;

pub(crate) mod changes;
pub(crate) mod evidence;
pub(crate) mod fleet;
pub(crate) mod history;

/// A JUnit file larger than this is named and not parsed.
pub(crate) const MAX_FILE_BYTES: u64 = 32 << 20;
/// Test cases one file may hold; a file with more is named and left out.
const MAX_FILE_CASES: usize = 200_000;
/// Suites listed in a summary; the rest are added up under [`OTHER_SUITES`].
const MAX_SUITES: usize = 200;
/// Where the suites past [`MAX_SUITES`] are counted.
const OTHER_SUITES: &str = "(other suites)";
/// Characters of a suite, class or test name kept.
pub(crate) const MAX_NAME: usize = 300;
/// The name of a case without one.
const UNNAMED: &str = "(unnamed)";
/// Bytes read from an `.xml` file to find its root element.
const SNIFF_BYTES: u64 = 4096;

/// Adds up test cases as they are parsed.
#[derive(Default)]
struct Accumulator {
    summary: TestSummary,
    suites: BTreeMap<String, SuiteTotals>,
    cases: Vec<Case>,
    cases_omitted: u64,
    any_file: bool,
    /// The attachments of each failure in `summary.failures`, resolved at the end.
    attachments: Vec<Vec<String>>,
}

impl Accumulator {
    fn add(&mut self, c: Case, file: &str) {
        let s = &mut self.summary;
        s.tests = s.tests.saturating_add(1);
        s.duration_ms = s.duration_ms.saturating_add(c.duration_ms);
        match c.outcome {
            Outcome::Passed => s.passed += 1,
            Outcome::Skipped => s.skipped += 1,
            Outcome::Failed => s.failed += 1,
            Outcome::Error => s.errors += 1,
        }
        if c.flaky && c.outcome == Outcome::Passed {
            s.flaky += 1;
            if s.retried.len() < MAX_FAILURES {
                s.retried.push(Timed {
                    suite: c.suite.to_string(),
                    class: c.class.to_string(),
                    name: c.name.clone(),
                    duration_ms: c.duration_ms,
                });
            }
        }
        if c.outcome.is_failure() {
            if s.failures.len() < MAX_FAILURES {
                s.failures.push(Failure {
                    suite: c.suite.to_string(),
                    class: c.class.to_string(),
                    name: c.name.clone(),
                    outcome: c.outcome,
                    message: c.message.clone(),
                    file: file.to_string(),
                    trace: c.trace.clone(),
                    evidence: Vec::new(),
                });
                self.attachments.push(c.attachments.clone());
            } else {
                s.failures_omitted += 1;
            }
        }
        if c.outcome != Outcome::Skipped {
            let slower = s.slowest.len() < SLOWEST
                || s.slowest
                    .last()
                    .is_some_and(|t| c.duration_ms > t.duration_ms);
            if slower {
                s.slowest.push(Timed {
                    suite: c.suite.to_string(),
                    class: c.class.to_string(),
                    name: c.name.clone(),
                    duration_ms: c.duration_ms,
                });
                s.slowest.sort_by_key(|t| std::cmp::Reverse(t.duration_ms));
                s.slowest.truncate(SLOWEST);
            }
        }
        let key = if self.suites.len() < MAX_SUITES || self.suites.contains_key(&*c.suite) {
            c.suite.to_string()
        } else {
            OTHER_SUITES.to_string()
        };
        let t = self
            .suites
            .entry(key.clone())
            .or_insert_with(|| SuiteTotals {
                name: key,
                ..Default::default()
            });
        t.tests += 1;
        t.duration_ms = t.duration_ms.saturating_add(c.duration_ms);
        match c.outcome {
            Outcome::Failed => t.failed += 1,
            Outcome::Error => t.errors += 1,
            Outcome::Skipped => t.skipped += 1,
            Outcome::Passed => {}
        }
        if self.cases.len() < MAX_RECORD_CASES {
            self.cases.push(c);
        } else {
            self.cases_omitted += 1;
        }
    }

    fn finish(mut self, run_files: &[String]) -> Collected {
        evidence::resolve(&mut self.summary.failures, &self.attachments, run_files);
        let any =
            self.any_file || !self.summary.unreadable.is_empty() || self.summary.files_omitted > 0;
        self.summary.suites = self.suites.into_values().collect();
        Collected {
            summary: any.then_some(self.summary),
            cases: self.cases,
            cases_omitted: self.cases_omitted,
        }
    }
}

/// The compiled `junit` globs of a watch (relative to a run directory).
pub(crate) fn junit_globs(watch: &Watch) -> GlobSet {
    crate::config::compile_globs(&watch.junit, crate::config::Separator::Literal)
}

/// Parse the JUnit files among `files` (the run's files as flushed) through `root`'s handle.
/// Blocking.
pub(crate) fn collect(
    root: &Root,
    run: &RunDir,
    files: &[crate::sync::Flushed],
    watch: &Watch,
) -> Collected {
    let globs = junit_globs(watch);
    let mut acc = Accumulator::default();
    let mut candidates: Vec<(&Path, String, bool)> = Vec::new();
    let mut run_files: Vec<String> = Vec::with_capacity(files.len());
    for path in files.iter().map(|f| &f.path) {
        let Some(rel_str) = crate::runs::relative_str(path, &run.path) else {
            continue;
        };
        run_files.push(rel_str.to_string());
        let by_glob = globs.is_match(rel_str);
        let xml = rel_str.to_ascii_lowercase().ends_with(".xml");
        if by_glob || (watch.junit_sniff && xml) {
            candidates.push((path, rel_str.to_string(), by_glob));
        }
    }
    candidates.sort_by(|a, b| a.1.cmp(&b.1));
    for (path, rel, by_glob) in candidates {
        if !by_glob {
            match sniff(root, path) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(file = %rel, error = %e, "cannot look into an .xml file");
                    continue;
                }
            }
        }
        if acc.summary.files.len() + acc.summary.unreadable.len() >= MAX_FILES {
            acc.summary.files_omitted += 1;
            continue;
        }
        acc.any_file = true;
        match parse_path(root, path) {
            Ok(cases) => {
                acc.summary.files.push(rel.clone());
                for c in cases {
                    acc.add(c, &rel);
                }
            }
            Err(error) => {
                tracing::warn!(file = %destination::printable(&rel), %error, "JUnit file left out of the run's test summary");
                acc.summary.unreadable.push(BadFile { path: rel, error });
            }
        }
    }
    acc.finish(&run_files)
}

/// Whether the `.xml` file at `path` starts with a JUnit root element.
fn sniff(root: &Root, path: &Path) -> std::io::Result<bool> {
    let (file, _) = root.open_file(path)?;
    let mut head = Vec::with_capacity(SNIFF_BYTES as usize);
    file.take(SNIFF_BYTES).read_to_end(&mut head)?;
    let mut reader = quick_xml::Reader::from_reader(head.as_slice());
    let mut buf = Vec::new();
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(e) | Event::Empty(e)) => {
                return Ok(matches!(
                    e.local_name().as_ref(),
                    b"testsuites" | b"testsuite"
                ));
            }
            Ok(Event::Eof) | Err(_) => return Ok(false),
            Ok(_) => {}
        }
        buf.clear();
    }
}

/// Open and parse one JUnit file; the error says why it was left out.
fn parse_path(root: &Root, path: &Path) -> Result<Vec<Case>, String> {
    let (file, stat) = root
        .open_file(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    parse_capped(file, stat.size)
}

/// Open and parse a JUnit file named on the command line (`gate`): a local path its caller
/// chose, read by path, capped like a run's files; anything but a regular file is refused
/// (a FIFO would block the open).
pub(crate) fn parse_local(path: &Path) -> Result<Vec<Case>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot open: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    parse_capped(file, size)
}

/// Parse an opened JUnit file of `size` bytes, refusing one over [`MAX_FILE_BYTES`].
fn parse_capped(file: impl Read, size: u64) -> Result<Vec<Case>, String> {
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{} bytes, larger than the {} MiB a JUnit file may have; not parsed",
            size,
            MAX_FILE_BYTES >> 20
        ));
    }
    // The cap holds even if the file grows while it is read.
    let reader = std::io::BufReader::new(file.take(MAX_FILE_BYTES + 1));
    let mut cases = Vec::new();
    parse(reader, &mut cases)?;
    Ok(cases)
}

pub(crate) use crate::format::results::truncate;

/// JUnit's `time` (seconds) in milliseconds; 0 when absent or not a finite positive number.
/// Decimal commas and thousands separators are read by [`decimal_seconds`]' rule.
fn millis(time: Option<&str>) -> u64 {
    let Some(t) = time else { return 0 };
    match decimal_seconds(t.trim()).map(|t| t.parse::<f64>()) {
        Some(Ok(v)) if v.is_finite() && v > 0.0 => (v * 1000.0).round().min(u64::MAX as f64) as u64,
        _ => 0,
    }
}

/// A `time` value as Rust parses it, by the rule of docs/FORMAT.md (tools write the decimal
/// mark of their locale: Surefire and TestNG `0,160`, and group thousands: `1,204.5`):
/// - with both `,` and `.`, the one that comes last is the decimal mark and the other groups
///   thousands (`1,204.5` and `1.204,5` are both 1204.5 s);
/// - with only commas, one comma is the decimal mark (`1,5` is 1.5 s, `0,051` is 0.051 s,
///   `1,204` is 1.204 s) and several group thousands (`1,204,000` is 1204000 s);
/// - with only dots, one dot is the decimal mark and several group thousands;
/// - anything else (a decimal mark twice: `1,2,3.4.5`) is no number (`None`).
fn decimal_seconds(t: &str) -> Option<String> {
    let count = |m: char| t.matches(m).count();
    let last = t.rfind([',', '.']);
    let decimal = match (count(','), count('.')) {
        (0, 0) => None,
        (1, 0) | (0, 1) => last,
        (_, 0) | (0, _) => None,
        _ => {
            let mark = t[last?..].chars().next()?;
            if count(mark) != 1 {
                return None;
            }
            last
        }
    };
    Some(
        t.char_indices()
            .filter_map(|(i, c)| match c {
                ',' | '.' if Some(i) == decimal => Some('.'),
                ',' | '.' => None,
                c => Some(c),
            })
            .collect(),
    )
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    let a = e.try_get_attribute(name).ok()??;
    Some(
        match a.normalized_value(quick_xml::XmlVersion::Implicit1_0) {
            Ok(v) => v.into_owned(),
            // An entity the reader does not know (no DTD is ever read): the raw text.
            Err(_) => String::from_utf8_lossy(&a.value).into_owned(),
        },
    )
}

/// The test case being read.
struct Open {
    case: Case,
    /// Collecting the text of a `<failure>`/`<error>`: as its message (without a `message`
    /// attribute), or as its trace.
    collecting: bool,
    /// The text collected is the trace (the message came from the attribute).
    into_trace: bool,
    /// Nesting depth of the `<testcase>` element.
    depth: usize,
    /// `<failure>`/`<error>` elements seen: Vitest writes one per failed try.
    failures: u16,
    /// Tries a failure's text names as retries (Playwright's `Retry #N ───` sections).
    retries_named: u16,
    /// Inside the case's `<system-out>` or `<system-err>`.
    in_output: bool,
}

/// Playwright's JUnit reporter writes every try of a failed test into one `<failure>`, each
/// retry after a line `Retry #N ───…`: the number of such lines in `text`.
fn retries_named(text: &str) -> u16 {
    let n = text
        .lines()
        .filter(|l| {
            let Some(rest) = l.trim_start().strip_prefix("Retry #") else {
                return false;
            };
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            digits > 0 && rest[digits..].trim_start().starts_with('\u{2500}')
        })
        .count();
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Parse one JUnit document (any of the common shapes: a `<testsuites>` or `<testsuite>` root,
/// nested suites, surefire's and nextest's `flakyFailure`/`rerunFailure`), appending its test
/// cases to `out`. A document that is not well-formed fails whole.
pub(crate) fn parse(reader: impl BufRead, out: &mut Vec<Case>) -> Result<(), String> {
    let start = out.len();
    let res = parse_inner(reader, out);
    if res.is_err() {
        out.truncate(start);
    } else {
        merge_retries(out, start);
    }
    res
}

/// One test written several times in one document is one test tried several times
/// (gotestsum `--rerun-fails`, pytest-rerunfailures and other runners that repeat a
/// `<testcase>` per try): the tries of a (class, name) become one case, in document order,
/// whose outcome is the last try's, whose earlier tries are counted as failed, and which
/// passed on a retry when the last try passed. Runners retry only what did not pass, so an
/// earlier try written without a failure is a failed one too (pytest-rerunfailures writes its
/// reruns as empty `<testcase>` elements); an earlier skipped try is not counted. The price:
/// `go test -count=N`, which repeats passing tests, reads as retries. Its time is the sum of
/// the tries'.
fn merge_retries(out: &mut Vec<Case>, start: usize) {
    let mut first: std::collections::HashMap<(Arc<str>, String), usize> =
        std::collections::HashMap::new();
    let mut keep = vec![true; out.len() - start];
    for i in start..out.len() {
        if out[i].name == UNNAMED {
            continue; // cases without a name are not one test
        }
        let key = (out[i].class.clone(), out[i].name.clone());
        match first.get(&key) {
            None => {
                first.insert(key, i);
            }
            Some(&j) => {
                let later = std::mem::take(&mut out[i]);
                let earlier = &mut out[j];
                let failed_before = u16::from(earlier.outcome != Outcome::Skipped);
                earlier.earlier_failures = earlier
                    .earlier_failures
                    .saturating_add(failed_before)
                    .saturating_add(later.earlier_failures);
                earlier.duration_ms = earlier.duration_ms.saturating_add(later.duration_ms);
                for a in later.attachments {
                    if earlier.attachments.len() < crate::format::results::MAX_EVIDENCE
                        && !earlier.attachments.contains(&a)
                    {
                        earlier.attachments.push(a);
                    }
                }
                if later.outcome != Outcome::Skipped || earlier.outcome == Outcome::Skipped {
                    earlier.outcome = later.outcome;
                    earlier.message = later.message;
                    earlier.trace = later.trace;
                }
                earlier.flaky = earlier.outcome == Outcome::Passed && earlier.earlier_failures > 0;
                keep[i - start] = false;
            }
        }
    }
    let mut k = keep.into_iter();
    let head = out.len().min(start);
    let mut idx = 0usize;
    out.retain(|_| {
        let r = if idx < head {
            true
        } else {
            k.next().unwrap_or(true)
        };
        idx += 1;
        r
    });
}

fn parse_inner(reader: impl BufRead, out: &mut Vec<Case>) -> Result<(), String> {
    let mut reader = quick_xml::Reader::from_reader(reader);
    let mut buf = Vec::new();
    let mut depth = 0usize;
    let mut suites: Vec<(usize, Arc<str>)> = Vec::new();
    // The class of the case before: consecutive cases of one class share its name.
    let mut last_class: Option<Arc<str>> = None;
    let mut open: Option<Open> = None;
    let mut seen_root = false;
    let start_len = out.len();
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| format!("not well-formed XML near byte {at}: {e}"))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                let local = e.local_name();
                let tag = local.as_ref();
                if !seen_root {
                    seen_root = true;
                    if !matches!(tag, b"testsuites" | b"testsuite") {
                        return Err(format!(
                            "the root element is <{}>, not <testsuites> or <testsuite>",
                            truncate(&String::from_utf8_lossy(tag), 40)
                        ));
                    }
                }
                if !empty {
                    depth += 1;
                }
                match (tag, open.as_mut()) {
                    (b"testsuite", None) if !empty => {
                        let name = attr(e, b"name").unwrap_or_default();
                        suites.push((depth, Arc::from(truncate(&name, MAX_NAME))));
                    }
                    (b"testcase", None) => {
                        let suite = suites.last().map(|s| s.1.clone()).unwrap_or_default();
                        let class = match attr(e, b"classname").filter(|c| !c.is_empty()) {
                            Some(c) => {
                                let c = truncate(&c, MAX_NAME);
                                match &last_class {
                                    Some(last) if **last == *c => last.clone(),
                                    _ => Arc::from(c),
                                }
                            }
                            None => suite.clone(),
                        };
                        last_class = Some(class.clone());
                        let name = attr(e, b"name")
                            .filter(|n| !n.is_empty())
                            .map(|n| truncate(&n, MAX_NAME))
                            .unwrap_or_else(|| UNNAMED.into());
                        let case = Case {
                            suite,
                            class,
                            name,
                            duration_ms: millis(attr(e, b"time").as_deref()),
                            ..Default::default()
                        };
                        if empty {
                            push(out, case, start_len)?;
                        } else {
                            open = Some(Open {
                                case,
                                collecting: false,
                                into_trace: false,
                                depth,
                                failures: 0,
                                retries_named: 0,
                                in_output: false,
                            });
                        }
                    }
                    (_, Some(o)) => {
                        let outcome = match tag {
                            b"failure" => Some(Outcome::Failed),
                            b"error" => Some(Outcome::Error),
                            b"skipped" => Some(Outcome::Skipped),
                            _ => None,
                        };
                        if let Some(outcome) = outcome {
                            // The worst outcome wins: error, failure, skipped.
                            if outcome > o.case.outcome {
                                o.case.outcome = outcome;
                            }
                            if outcome.is_failure() {
                                // A second failure of one case is a later try's (Vitest).
                                if o.failures > 0 {
                                    o.case.earlier_failures =
                                        o.case.earlier_failures.saturating_add(1);
                                }
                                o.failures = o.failures.saturating_add(1);
                            }
                            if outcome.is_failure() && o.case.message.is_none() {
                                let message = attr(e, b"message").filter(|m| !m.trim().is_empty());
                                o.into_trace = message.is_some();
                                o.collecting = !empty;
                                if let Some(m) = message {
                                    o.case.message = Some(truncate(m.trim(), MAX_MESSAGE));
                                }
                            }
                        } else if matches!(tag, b"system-out" | b"system-err") && !empty {
                            o.in_output = true;
                        } else if matches!(tag, b"flakyFailure" | b"flakyError") {
                            o.case.flaky = true;
                            o.case.earlier_failures = o.case.earlier_failures.saturating_add(1);
                        } else if matches!(tag, b"rerunFailure" | b"rerunError" | b"rerun") {
                            // Surefire's and nextest's reruns; pytest-rerunfailures' <rerun>.
                            o.case.earlier_failures = o.case.earlier_failures.saturating_add(1);
                            if o.case.outcome == Outcome::Passed && tag == b"rerun" {
                                o.case.flaky = true;
                            }
                        }
                    }
                    _ => {}
                }
            }
            Event::End(ref e) => {
                let local = e.local_name();
                let tag = local.as_ref();
                if let Some(o) = open.as_mut() {
                    if matches!(tag, b"failure" | b"error") {
                        o.collecting = false;
                    }
                    if matches!(tag, b"system-out" | b"system-err") {
                        o.in_output = false;
                    }
                    if tag == b"testcase" && depth == o.depth {
                        let mut o = open.take().ok_or("unbalanced <testcase>")?;
                        if let Some(m) = o.case.message.take() {
                            let m = m.trim();
                            o.case.message = (!m.is_empty()).then(|| truncate(m, MAX_MESSAGE));
                        }
                        if let Some(t) = o.case.trace.take() {
                            let t = t.trim();
                            o.case.trace = (!t.is_empty()).then(|| truncate(t, MAX_TRACE));
                        }
                        if !o.case.outcome.is_failure() {
                            o.case.message = None;
                            o.case.trace = None;
                        }
                        if o.case.outcome.is_failure() {
                            o.case.earlier_failures =
                                o.case.earlier_failures.saturating_add(o.retries_named);
                        }
                        // Passed on a retry only if the last try passed.
                        o.case.flaky &= o.case.outcome == Outcome::Passed;
                        push(out, o.case, start_len)?;
                    }
                }
                if suites.last().is_some_and(|s| s.0 == depth) {
                    suites.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Event::Text(ref t) => {
                if let Some(o) = open.as_mut().filter(|o| o.in_output) {
                    let text = t.decode().unwrap_or_default();
                    evidence::attachments_in(&text, &mut o.case.attachments);
                }
                if let Some(o) = open.as_mut().filter(|o| o.collecting) {
                    let text = t.decode().unwrap_or_default();
                    o.retries_named = o.retries_named.saturating_add(retries_named(&text));
                    append_message(o, &text);
                }
            }
            Event::CData(ref t) => {
                if let Some(o) = open.as_mut().filter(|o| o.in_output) {
                    let text = String::from_utf8_lossy(t.as_ref());
                    evidence::attachments_in(&text, &mut o.case.attachments);
                }
                if let Some(o) = open.as_mut().filter(|o| o.collecting) {
                    let text = String::from_utf8_lossy(t.as_ref()).into_owned();
                    o.retries_named = o.retries_named.saturating_add(retries_named(&text));
                    append_message(o, &text);
                }
            }
            Event::GeneralRef(ref r) => {
                if let Some(o) = open.as_mut().filter(|o| o.collecting) {
                    let c = match r.resolve_char_ref() {
                        Ok(Some(c)) => Some(c),
                        _ => match r.decode().ok().as_deref() {
                            Some("lt") => Some('<'),
                            Some("gt") => Some('>'),
                            Some("amp") => Some('&'),
                            Some("quot") => Some('"'),
                            Some("apos") => Some('\''),
                            _ => None,
                        },
                    };
                    if let Some(c) = c {
                        append_message(o, &c.to_string());
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !seen_root {
        return Err("no root element (an empty or truncated file)".into());
    }
    if depth != 0 {
        return Err("the document ends inside an element (a truncated file)".into());
    }
    Ok(())
}

fn append_message(o: &mut Open, text: &str) {
    let (m, cap) = if o.into_trace {
        (o.case.trace.get_or_insert_with(String::new), MAX_TRACE)
    } else {
        (o.case.message.get_or_insert_with(String::new), MAX_MESSAGE)
    };
    // Enough to truncate later; the rest of a long stack trace is not kept.
    if m.chars().count() <= cap {
        m.push_str(&truncate(text, cap + 1));
    }
}

fn push(out: &mut Vec<Case>, case: Case, start: usize) -> Result<(), String> {
    if out.len() - start >= MAX_FILE_CASES {
        return Err(format!(
            "more than {MAX_FILE_CASES} test cases in one file; not parsed"
        ));
    }
    out.push(case);
    Ok(())
}

/// Write the run's record to every destination, and delete the record of an earlier seal of
/// the same run when it lies in another date's partition (so a run is counted once). With
/// `tests` (the run's per-test records, NDJSON), the same for those under
/// `_panoptic-sync/tests/`. A failure is logged and returned as text (the seal stands: the
/// manifest is what proves it).
pub(crate) async fn write_record(
    dests: &[Destination],
    record: &RunRecord,
    tests: Option<Vec<u8>>,
    earlier_sealed_ms: Option<i64>,
) -> Vec<String> {
    let mut line = match serde_json::to_vec(record) {
        Ok(l) => l,
        Err(e) => return vec![format!("cannot encode the run's record: {e}")],
    };
    line.push(b'\n');
    let (node, prefix, run) = (&record.node_id, &record.key_prefix, &record.run);
    let key = record_key(node, prefix, run, record.sealed_ms);
    let earlier = earlier_sealed_ms.map(|ms| record_key(node, prefix, run, ms));
    let mut problems = write_ndjson(dests, &key, line, earlier, &record.run, "record").await;
    if let Some(body) = tests.filter(|b| !b.is_empty()) {
        let key = test_records_key(node, prefix, run, record.sealed_ms);
        let earlier = earlier_sealed_ms.map(|ms| test_records_key(node, prefix, run, ms));
        problems.extend(
            write_ndjson(dests, &key, body, earlier, &record.run, "per-test records").await,
        );
    }
    problems
}

/// Store `body` at `key` in every destination, then delete `earlier` (when it is another key).
async fn write_ndjson(
    dests: &[Destination],
    key: &str,
    body: Vec<u8>,
    earlier: Option<String>,
    run: &str,
    what: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let earlier = earlier.filter(|k| k != key);
    let body = bytes::Bytes::from(body);
    for dest in dests {
        let res = async {
            let location = dest.path(key)?;
            let mut attributes = Attributes::new();
            if dest.supports_attributes {
                attributes.insert(Attribute::ContentType, "application/x-ndjson".into());
            }
            let opts = PutOptions {
                attributes,
                ..Default::default()
            };
            let ticket = dest.ticket();
            dest.store
                .put_opts(&location, PutPayload::from_bytes(body.clone()), opts)
                .await
                .map_err(|e| anyhow::anyhow!("{}", destination::error_chain(&e)))?;
            // Durable before the earlier one goes.
            dest.persist(ticket).await?;
            if let Some(old) = &earlier {
                let old = dest.path(old)?;
                match dest.store.delete(&old).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => anyhow::bail!(
                        "deleting the earlier {what} {old}: {}",
                        destination::error_chain(&e)
                    ),
                }
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = res {
            let msg = format!("writing the run's {what} {key} to {}: {e:#}", dest.name);
            tracing::warn!(run = %destination::printable(run), error = %msg, "run record not written");
            problems.push(msg);
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Vec<Case>, String> {
        let mut out = Vec::new();
        parse(s.as_bytes(), &mut out).map(|()| out)
    }

    #[test]
    fn many_cases_of_one_long_named_suite_hold_its_name_once() {
        // Reproduced: 200,000 empty `<testcase/>` inheriting a 300-character suite name (a
        // 2.2 MB file) took a seal to 627 MB: every case held its own copies of the names.
        let suite = "S".repeat(300);
        let mut xml = format!("<testsuite name=\"{suite}\">");
        for _ in 0..50_000 {
            xml.push_str("<testcase/>");
        }
        xml.push_str(
            "<testcase classname=\"k\" name=\"a\"/><testcase classname=\"k\" name=\"b\"/>",
        );
        xml.push_str("</testsuite>");
        let cases = parse_str(&xml).unwrap();
        assert_eq!(cases.len(), 50_002);
        let (first, last) = (&cases[0], &cases[49_999]);
        assert!(Arc::ptr_eq(&first.suite, &last.suite), "one suite name");
        assert!(
            Arc::ptr_eq(&first.suite, &last.class),
            "the class is the suite's name"
        );
        assert!(
            Arc::ptr_eq(&cases[50_000].class, &cases[50_001].class),
            "a repeated class"
        );
    }

    #[test]
    fn a_test_written_once_per_try_is_one_test_with_its_tries() {
        // gotestsum --rerun-fails (go-junit-report's shape): a failed try, then the rerun that
        // passed, as two <testcase> of one name; a test that failed on every try; pytest's
        // rerunfailures <rerun> elements; a skipped try does not hide a later outcome.
        let xml = r#"<testsuites><testsuite name="pkg">
<testcase classname="pkg" name="TestFlaky" time="0.5"><failure message="boom">x</failure></testcase>
<testcase classname="pkg" name="TestOk" time="0.1"></testcase>
<testcase classname="pkg" name="TestFlaky" time="0.25"></testcase>
<testcase classname="pkg" name="TestBroken" time="1"><failure message="one"/></testcase>
<testcase classname="pkg" name="TestBroken" time="1"><failure message="two"/></testcase>
<testcase classname="pkg" name="TestBroken" time="1"><failure message="three"/></testcase>
<testcase classname="t.py" name="test_rr" time="0.3"><rerun message="first"/><rerun message="second"/></testcase>
</testsuite></testsuites>"#;
        let c = parse_str(xml).unwrap();
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["TestFlaky", "TestOk", "TestBroken", "test_rr"]);
        assert_eq!(
            (
                c[0].outcome,
                c[0].flaky,
                c[0].earlier_failures,
                c[0].duration_ms
            ),
            (Outcome::Passed, true, 1, 750)
        );
        assert_eq!(c[0].message, None);
        assert_eq!(
            (c[2].outcome, c[2].flaky, c[2].earlier_failures),
            (Outcome::Failed, false, 2)
        );
        assert_eq!(c[2].message.as_deref(), Some("three"));
        assert_eq!(
            (c[3].outcome, c[3].flaky, c[3].earlier_failures),
            (Outcome::Passed, true, 2)
        );
    }

    #[test]
    fn entities_nesting_and_the_case_cap_are_refused_or_harmless() {
        // Entity expansion: a billion laughs is never expanded (the names stay as written,
        // or the file is refused); an external entity is never read.
        let laughs = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<testsuite name="s"><testcase classname="c" name="&lol3;"/></testsuite>"#;
        match parse_str(laughs) {
            Ok(cases) => assert!(cases.iter().all(|c| c.name.len() < 100), "not expanded"),
            Err(e) => assert!(!e.is_empty()),
        }
        let secret = std::env::temp_dir().join(format!("xxe-{}", std::process::id()));
        std::fs::write(&secret, "SECRET-CONTENT").unwrap();
        let xxe = format!(
            r#"<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file://{}">]>
<testsuite name="s"><testcase classname="c" name="n"><failure message="&x;">&x;</failure></testcase></testsuite>"#,
            secret.display()
        );
        let got = format!("{:?}", parse_str(&xxe));
        let _ = std::fs::remove_file(&secret);
        assert!(
            !got.contains("SECRET-CONTENT"),
            "external entity read: {got}"
        );
        // 100,000 nested elements: parsed without recursion (or refused), never a crash.
        let mut deep = String::from("<testsuites>");
        deep.push_str(&"<x>".repeat(100_000));
        deep.push_str(&"</x>".repeat(100_000));
        deep.push_str(
            "<testsuite name=\"s\"><testcase classname=\"c\" name=\"n\"/></testsuite></testsuites>",
        );
        let _ = parse_str(&deep);
        // One case over the cap: refused while parsing, before more cases are built.
        let mut over = String::from("<testsuite name=\"s\">");
        for _ in 0..=MAX_FILE_CASES {
            over.push_str("<testcase/>");
        }
        over.push_str("</testsuite>");
        let err = parse_str(&over).unwrap_err();
        assert!(err.contains("more than 200000 test cases"), "{err}");
    }

    #[test]
    fn decimal_commas_and_thousands_separators() {
        // Reproduced: every comma was dropped, so "1,5" became 15 s and "0,051" 51 s.
        for (time, ms) in [
            ("1,5", 1500),
            ("0,051", 51),
            ("0,160", 160),
            ("0,03", 30),
            ("1,204", 1204),
            ("1,204.5", 1_204_500),
            ("1.204,5", 1_204_500),
            ("1,204,000", 1_204_000_000),
            ("1.204.000", 1_204_000_000),
            ("2.5", 2500),
            (" 3 ", 3000),
            ("12", 12_000),
            ("-1", 0),
            ("NaN", 0),
            ("1,2,3.4.5", 0),
            ("", 0),
        ] {
            assert_eq!(millis(Some(time)), ms, "time={time:?}");
        }
        assert_eq!(millis(None), 0);
    }

    /// (name, outcome, earlier failed tries, passed on a retry) of each case of a fixture.
    fn classified(file: &str) -> Vec<(String, Outcome, u16, bool)> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/junit")
            .join(file);
        parse_local(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .into_iter()
            .map(|c| (c.name, c.outcome, c.earlier_failures, c.flaky))
            .collect()
    }

    #[test]
    fn real_fixtures_of_four_tools_with_retries_are_classified_as_the_rules_say() {
        // Written by the tools themselves (scripts/junit-fixtures): in each, a test that
        // passes, one failing its first try and passing a retry, one failing all three tries,
        // one skipped.
        use Outcome::*;
        let s = |n: &str| n.to_string();
        // pytest-rerunfailures writes every rerun as an empty <testcase> before the last try.
        assert_eq!(
            classified("pytest-rerunfailures.xml"),
            [
                (s("test_passes"), Passed, 0, false),
                (s("test_flaky_then_passes"), Passed, 1, true),
                (s("test_always_fails"), Failed, 2, false),
                (s("test_skipped"), Skipped, 0, false),
            ]
        );
        // Vitest writes one <failure> per failed try; a retry that passed leaves no trace.
        assert_eq!(
            classified("vitest-junit.xml"),
            [
                (s("basket > adds an item"), Passed, 0, false),
                (s("basket > flaky total"), Passed, 0, false),
                (s("basket > always fails"), Failed, 2, false),
                (s("basket > skipped"), Skipped, 0, false),
            ]
        );
        // Playwright Test writes every try into one <failure>, after `Retry #N` lines.
        assert_eq!(
            classified("playwright-junit.xml"),
            [
                (s("checkout \u{203a} adds an item"), Passed, 0, false),
                (s("checkout \u{203a} flaky payment"), Passed, 0, false),
                (s("checkout \u{203a} always fails"), Failed, 2, false),
                (s("checkout \u{203a} skipped"), Skipped, 0, false),
            ]
        );
        // jest-junit writes the last try only: its retries cannot be seen.
        assert_eq!(
            classified("jest-junit.xml"),
            [
                (s("cart adds an item"), Passed, 0, false),
                (s("cart flaky checkout"), Passed, 0, false),
                (s("cart always fails"), Failed, 0, false),
                (s("cart skipped"), Skipped, 0, false),
            ]
        );
    }

    #[test]
    fn pytest_surefire_gotestsum_and_nextest_shapes() {
        // pytest --junitxml (a <testsuites> root, classname = module.Class).
        let py = r#"<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3" time="0.5"><testcase classname="test_app.TestLogin" name="test_ok" time="0.100" /><testcase classname="test_app.TestLogin" name="test_bad" time="0.250"><failure message="AssertionError: assert 1 == 2">def test_bad():
&gt;       assert 1 == 2</failure></testcase><testcase classname="test_app" name="test_skip" time="0.000"><skipped type="pytest.skip" message="later">skip</skipped></testcase></testsuite></testsuites>"#;
        let c = parse_str(py).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            (
                &*c[0].suite,
                &*c[0].class,
                c[0].name.as_str(),
                c[0].duration_ms
            ),
            ("pytest", "test_app.TestLogin", "test_ok", 100)
        );
        assert_eq!(c[1].outcome, Outcome::Failed);
        assert_eq!(
            c[1].message.as_deref(),
            Some("AssertionError: assert 1 == 2")
        );
        assert_eq!(c[2].outcome, Outcome::Skipped);
        assert_eq!(c[2].message, None);

        // Maven surefire: a <testsuite> root, a flaky pass, an error whose message is its text.
        let surefire = r#"<testsuite name="com.acme.CartTest" time="1,234.5" tests="3"><properties><property name="java.version" value="21"/></properties><testcase name="adds" classname="com.acme.CartTest" time="1.5"><flakyFailure message="timeout" type="java.lang.AssertionError"><stackTrace>at x</stackTrace></flakyFailure></testcase><testcase name="removes" classname="com.acme.CartTest" time="2"><error type="java.lang.NullPointerException"><![CDATA[java.lang.NullPointerException: cart is null
	at com.acme.Cart.remove]]></error><system-out>noise</system-out></testcase><testcase name="totals" classname="com.acme.CartTest" time="1,000.25"/></testsuite>"#;
        let c = parse_str(surefire).unwrap();
        assert_eq!(c.len(), 3);
        assert!(c[0].flaky && c[0].outcome == Outcome::Passed);
        assert_eq!(c[1].outcome, Outcome::Error);
        assert!(
            c[1].message
                .as_deref()
                .unwrap()
                .starts_with("java.lang.NullPointerException: cart is null"),
            "{:?}",
            c[1].message
        );
        assert_eq!(c[2].duration_ms, 1_000_250);

        // gotestsum: nested suites per package; nextest: rerunFailure then failure.
        let go = r#"<testsuites tests="2"><testsuite name="example.com/api" tests="2"><testsuite name="inner"><testcase classname="example.com/api" name="TestGet" time="0.010"></testcase></testsuite><testcase classname="" name="TestPut" time="0.020"><failure message="Failed" type="">=== RUN TestPut</failure></testcase></testsuite></testsuites>"#;
        let c = parse_str(go).unwrap();
        assert_eq!(&*c[0].suite, "inner");
        assert_eq!(
            (&*c[1].suite, &*c[1].class),
            ("example.com/api", "example.com/api")
        );
        let nextest = r#"<testsuites name="nextest-run"><testsuite name="widgets::bin/widgets"><testcase name="tests::slow" classname="widgets::bin/widgets" timestamp="2024-01-01T00:00:00Z" time="3.5"><rerunFailure type="test failure" message="thread panicked"/><failure type="test failure" message="thread panicked again"/></testcase></testsuite></testsuites>"#;
        let c = parse_str(nextest).unwrap();
        assert_eq!((c[0].outcome, c[0].flaky), (Outcome::Failed, false));
        assert_eq!(c[0].message.as_deref(), Some("thread panicked again"));
    }

    #[test]
    fn broken_or_foreign_documents_fail_whole() {
        for (doc, want) in [
            ("", "no root element"),
            ("<testsuite><testcase name=\"a\"/>", "ends inside"),
            (
                "<testsuite><testcase name=\"a\"></testsuite>",
                "not well-formed",
            ),
            (
                "<project><testcase name=\"a\"/></project>",
                "root element is <project>",
            ),
            (
                "<testsuite><testcase name=\"a\"/></testsuite><x",
                "not well-formed",
            ),
        ] {
            let mut out = vec![Case::default()];
            let e = parse(doc.as_bytes(), &mut out).unwrap_err();
            assert!(e.contains(want), "{doc:?}: {e}");
            assert_eq!(out.len(), 1, "{doc:?}: partial cases dropped");
        }
        // Entities are never expanded from a DTD (no billion laughs): the raw text is kept.
        let doc =
            r#"<!DOCTYPE x [<!ENTITY a "aaaa">]><testsuite><testcase name="&a;"/></testsuite>"#;
        assert_eq!(parse_str(doc).unwrap()[0].name, "&a;");
    }

    #[test]
    fn summaries_cap_what_they_keep_and_count_everything() {
        let mut acc = Accumulator {
            any_file: true,
            ..Default::default()
        };
        for i in 0..(MAX_FAILURES as u64 + 10) {
            acc.add(
                Case {
                    suite: format!("s{}", i % 3).into(),
                    class: "c".into(),
                    name: format!("t{i}"),
                    outcome: Outcome::Failed,
                    duration_ms: i,
                    message: Some("m".into()),
                    flaky: false,
                    trace: None,
                    earlier_failures: 0,
                    attachments: Vec::new(),
                },
                "junit.xml",
            );
        }
        let s = acc.finish(&[]).summary.unwrap();
        assert_eq!((s.tests, s.failed), (60, 60));
        assert_eq!(s.failures.len(), MAX_FAILURES);
        assert_eq!(s.failures_omitted, 10);
        assert_eq!(s.slowest.len(), SLOWEST);
        assert_eq!(s.slowest[0].duration_ms, 59);
        assert_eq!(s.suites.len(), 3);
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(millis(Some("0.0005")), 1);
        assert_eq!(millis(Some("NaN")), 0);
        assert_eq!(millis(Some("-3")), 0);
        assert_eq!(millis(Some("1e300")), u64::MAX);
        assert_eq!(
            record_key("n", "ci/r", "r", 0),
            "_panoptic-sync/runs/date=1970-01-01/node=n/r~e779fe13e7aecbad.json"
        );
        // Reproduced: two run watches with a run of one name wrote one record, and a
        // 255-byte run name got none (its key's last segment was longer than a file name).
        assert_ne!(
            record_key("n", "a/r", "r", 0),
            record_key("n", "b/r", "r", 0)
        );
        let long = "é".repeat(127) + "x";
        let key = record_key("n", &format!("ci/{long}"), &long, 0);
        assert!(key.rsplit('/').next().unwrap().len() <= 255, "{key}");
    }
}
