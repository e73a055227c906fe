//! Text for people: every command's result as `panoptic-sync` prints it (data on stdout, what
//! went wrong on stderr). The JSON forms are the serde forms of the types in `format/` and of
//! the features' results; the HTML pages are in `html/`.

use std::fmt::Write as _;

use super::Done;
use crate::destination;
use crate::format::manifest::ManifestFile;
use crate::format::report::FleetNode;
use crate::format::units::{human, now_secs};
use crate::html::run_page as page;
use crate::runs::State;

/// Whether stdout was found closed (a reader that stopped: `| head`); later output is dropped.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Write command output to stdout. A closed pipe ends the output quietly: the command still
/// finishes and exits with its own code (a panic was exit 101). Any other write error is
/// reported once on stderr, naming stdout.
pub(super) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("panoptic-sync: cannot write to stdout: {e}");
        }
    }
}

impl Done {
    /// Print the result: data on stdout, what went wrong on stderr.
    pub(super) fn render(&self) -> anyhow::Result<()> {
        match self {
            Done::Ran | Done::Nothing => {}
            Done::Sealed(s) => render_seal(s),
            Done::Runs { runs, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(runs)?);
                } else {
                    out!("{}", runs_table(runs));
                }
            }
            Done::TestHistory { history, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(history)?);
                } else {
                    out!("{}", test_history_text(history));
                }
            }
            Done::FleetRuns { runs, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(runs)?);
                } else {
                    out!("{}", fleet_runs_table(runs));
                }
            }
            Done::RunRestored { report, run, to } => render_run_restore(report, run, to),
            Done::Run { manifest, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(manifest)?);
                } else {
                    out!("{}", manifest_text(manifest));
                }
            }
            Done::Gate { gate, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(gate)?);
                } else {
                    out!("{}", gate_text(gate));
                }
                render_gate_problems(gate);
            }
            Done::QuarantineList { listed, json } => {
                render_source(&listed.source);
                if *json {
                    outln!("{}", serde_json::to_string_pretty(&listed.list)?);
                } else {
                    out!("{}", quarantine_text(listed));
                }
            }
            Done::QuarantineChanged(c) => {
                for e in &c.entries {
                    outln!(
                        "{} {} (expires {}) in {}",
                        c.action,
                        destination::printable(&e.test),
                        e.expires.format("%Y-%m-%d %H:%M UTC"),
                        destination::printable(&c.key)
                    );
                }
            }
            Done::Proposed { proposed, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(proposed)?);
                } else {
                    out!("{}", proposed_text(proposed));
                }
            }
            Done::Synced(s) => render_sync(s),
            Done::Flushed(s) => render_flush(s),
            Done::Status { status, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(status)?);
                } else {
                    out!("{}", status_text(status));
                }
            }
            Done::Restored { summary, to } => render_restore(summary, to),
            Done::Verified { report, deep } => render_verify(report, *deep),
            Done::Fleet { fleet, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(fleet)?);
                } else {
                    out!("{}", fleet_text(fleet));
                }
            }
            Done::Report { report, json } => {
                if *json {
                    outln!("{}", serde_json::to_string_pretty(report)?);
                } else {
                    out!("{}", report_text(report));
                }
            }
            Done::WroteHtml(path) => outln!("wrote {}", path.display()),
            Done::Pruned { report, dry_run } => render_prune(report, *dry_run),
            Done::Link(link) => outln!("{link}"),
            Done::Checked { result, notifiers } => {
                if let Ok(lines) = result {
                    for l in lines {
                        outln!("{l}");
                    }
                }
                for n in notifiers {
                    match n {
                        Ok(l) => outln!("{l}"),
                        Err(e) => eprintln!("panoptic-sync: {e}"),
                    }
                }
                match result {
                    Err(e) => eprintln!("panoptic-sync: {e:#}"),
                    Ok(_) if notifiers.iter().any(Result::is_err) => {
                        eprintln!("panoptic-sync: a [[notify]] entry failed its check")
                    }
                    Ok(_) => outln!("configuration is valid"),
                }
            }
        }
        Ok(())
    }
}

fn render_sync(summary: &crate::sync::SyncSummary) {
    for root in &summary.refused_roots {
        eprintln!(
            "panoptic-sync: watch root {} is not a real directory (a symbolic link is never followed); nothing under it was synced",
            root.display()
        );
    }
    for d in &summary.destinations {
        outln!(
            "{}: {} stored, {} missing{}",
            d.name,
            d.stored,
            d.missing,
            d.last_error
                .as_deref()
                .filter(|_| d.missing > 0)
                .map(|e| format!(" (last error: {})", destination::printable(e)))
                .unwrap_or_default()
        );
    }
}

/// The files a flush or seal found failed or not stored yet (at most 20 of the latter).
fn render_unstored(s: &crate::sync::FlushSummary) {
    for (p, e) in &s.failed {
        eprintln!(
            "failed: {}",
            destination::printable(&format!("{}: {e}", p.display()))
        );
    }
    for p in s.waiting.iter().take(20) {
        eprintln!(
            "not stored yet: {}",
            destination::printable(&p.display().to_string())
        );
    }
    if s.waiting.len() > 20 {
        eprintln!("... and {} more not stored yet", s.waiting.len() - 20);
    }
}

fn render_flush(s: &crate::sync::FlushSummary) {
    render_unstored(s);
    outln!(
        "{} files stored, {} failed, {} not stored yet",
        s.stored,
        s.failed.len(),
        s.waiting.len()
    );
}

fn render_restore(s: &crate::restore::RestoreSummary, to: &std::path::Path) {
    for (key, e) in &s.failed {
        eprintln!("failed: {key}: {e}");
    }
    for key in &s.superseded {
        eprintln!("skipped (a newer object maps to the same file): {key}");
    }
    for (path, bytes, stopped) in &s.partial {
        let why = stopped
            .as_deref()
            .map(|w| format!("; stopped early: {w}"))
            .unwrap_or_default();
        outln!(
            "partial: {} ({bytes} bytes: the file was still being written; restored from its segments{why})",
            crate::destination::printable(path)
        );
    }
    outln!(
        "{} files restored to {}, {} objects failed",
        s.restored,
        to.display(),
        s.failed.len()
    );
}

fn render_verify(r: &crate::restore::VerifyReport, deep: bool) {
    for p in &r.problems {
        eprintln!("{}: {}: {}", p.dest, p.key, p.problem);
    }
    for (dest, blob) in &r.orphaned {
        outln!(
            "{dest}: {blob}: orphaned blob (no pointer names it; collected after the grace period)"
        );
    }
    outln!(
        "{} objects checked{}, {} problems",
        r.checked,
        if deep { " deeply" } else { "" },
        r.problems.len()
    );
}

fn render_prune(r: &crate::retention::PruneReport, dry_run: bool) {
    for run in &r.runs {
        outln!(
            "{}run {} ({}): {}",
            if dry_run { "would delete " } else { "deleted " },
            crate::destination::printable(&run.run),
            crate::destination::printable(&run.key_prefix),
            run.rule
        );
        if !run.kept.is_empty() {
            outln!(
                "  kept its manifest and the evidence of failures among the newest of their tests: {}",
                run.kept
                    .iter()
                    .map(|k| crate::destination::printable(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    for x in &r.expired {
        outln!(
            "{}{}: {}",
            if dry_run { "would delete " } else { "deleted " },
            x.dest,
            x.key
        );
    }
    for p in &r.skipped_prefixes {
        eprintln!("skipped prefix {p:?}: it does not contain the node id");
    }
    for f in &r.failed {
        eprintln!("failed: {}: {}: {}", f.dest, f.key, f.error);
    }
    for b in &r.blobs {
        render_sweep(b, dry_run);
    }
    outln!(
        "{} runs, {} objects {}",
        r.runs.len(),
        r.expired.len(),
        if dry_run {
            "would be deleted"
        } else {
            "deleted"
        }
    );
}

/// One content destination's blob sweep, within `prune`'s output.
fn render_sweep(b: &crate::collect::SweepReport, dry_run: bool) {
    if let Some(why) = &b.skipped {
        eprintln!("{}: blobs not collected: {why}", b.dest);
    }
    let would = if dry_run { "would be " } else { "" };
    for blob in &b.set_aside {
        outln!("{}: {blob}: unreferenced, {would}set aside", b.dest);
    }
    for blob in &b.put_back {
        outln!("{}: {blob}: referenced again, {would}put back", b.dest);
    }
    for blob in &b.deleted {
        outln!("{}: {blob}: {would}deleted", b.dest);
    }
    for (key, e) in &b.failed {
        eprintln!("failed: {}: {key}: {e}", b.dest);
    }
    outln!(
        "{}: {} blobs referenced ({} stored for {} of files); {} set aside, {} put back, {} deleted",
        b.dest,
        b.referenced,
        human(b.referenced_bytes),
        human(b.logical_bytes),
        b.set_aside.len(),
        b.put_back.len(),
        b.deleted.len()
    );
}

/// `seal`: sealed, or what is not stored yet.
fn render_seal(s: &crate::seal::Sealed) {
    match s {
        crate::seal::Sealed::Done {
            manifest,
            stored_key,
            page_key,
            notifications,
            record_problems,
        } => {
            outln!(
                "sealed run {}: {} files, {} bytes; manifest {} in every destination",
                destination::printable(&manifest.run),
                manifest.totals.files,
                manifest.totals.bytes,
                destination::printable(stored_key)
            );
            if let Some(page) = page_key {
                outln!("page: {}", destination::printable(page));
            }
            if let Some(t) = &manifest.tests {
                outln!("tests: {} ({})", t.verdict(), t.counts_line());
                for bad in &t.unreadable {
                    eprintln!(
                        "{}",
                        crate::destination::printable(&format!(
                            "JUnit file left out: {}: {}",
                            bad.path, bad.error
                        ))
                    );
                }
            }
            for p in record_problems {
                eprintln!("{}", crate::destination::printable(p));
            }
            for n in notifications {
                match &n.error {
                    None if n.left_out => outln!(
                        "notify {}: not sent (only = \"failures\", and the run did not fail)",
                        n.notifier
                    ),
                    None => outln!("notify {}: sent", n.notifier),
                    Some(e) => eprintln!(
                        "notify {}: not delivered yet ({e}); queued in the index, the daemon (`run`) retries it",
                        n.notifier
                    ),
                }
            }
        }
        crate::seal::Sealed::Incomplete(s) => {
            render_unstored(s);
            eprintln!(
                "not sealed: {} files stored, {} failed, {} not stored yet in every destination",
                s.stored,
                s.failed.len(),
                s.waiting.len()
            );
        }
    }
}

/// `restore --run`: each failure (escaped: names and errors come from the manifest, which
/// anyone with bucket write can write when no key is configured), then the totals.
fn render_run_restore(r: &crate::runs::RunRestore, run: &str, to: &std::path::Path) {
    for (path, e) in &r.failed {
        eprintln!(
            "{}",
            crate::destination::printable(&format!("failed: {path}: {e}"))
        );
    }
    outln!(
        "run {}: {} files restored to {} from manifest {}, {} failed",
        destination::printable(run),
        r.restored,
        destination::printable(&to.display().to_string()),
        destination::printable(&r.manifest_key),
        r.failed.len()
    );
}

pub(super) fn render_rebuilt(r: &crate::rebuild::Rebuilt) {
    if let Some(old) = &r.moved_aside {
        eprintln!("moved the old index aside to {}", old.display());
    }
    for d in &r.destinations {
        eprintln!(
            "{}: {} objects recorded from the destination{}",
            d.name,
            d.held,
            if d.unknown > 0 {
                format!(", {} without a readable hash (uploaded again)", d.unknown)
            } else {
                String::new()
            }
        );
    }
    for b in &r.bad_keys {
        eprintln!("{}: not recorded: {}", b.dest, b.bad);
    }
}

/// A human-readable table of runs.
fn test_history_text(h: &crate::format::fleet::TestHistory) -> String {
    use std::fmt::Write as _;
    let p = destination::printable;
    let mut out = String::new();
    let _ = writeln!(out, "test {} ({} – {})", p(&h.test), h.from, h.to);
    if h.runs == 0 {
        out.push_str("  no execution in the window's per-test records\n");
    }
    let rate = h
        .failure_rate
        .map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "–".into());
    let _ = writeln!(
        out,
        "  {} executions: {} passed ({} on a retry), {} failed, {} skipped; failure rate {rate}",
        h.runs, h.passed, h.passed_on_retry, h.failed, h.skipped
    );
    if !h.flaky_commits.is_empty() {
        let shown: Vec<String> = h.flaky_commits.iter().take(10).map(|c| p(c)).collect();
        let _ = writeln!(
            out,
            "  flaky on {} commits: {}",
            h.flaky_commits.len(),
            shown.join(", ")
        );
    }
    for n in &h.nodes {
        let _ = writeln!(
            out,
            "  node {}: {} runs, {} failed",
            p(&n.node),
            n.runs,
            n.failed
        );
    }
    for (what, e) in [
        ("first failure", &h.first_failure),
        ("last failure", &h.last_failure),
    ] {
        if let Some(e) = e {
            let _ = writeln!(
                out,
                "  {what}: {}/{} at {}{}{}",
                p(&e.node),
                p(&e.run),
                crate::html::run_page::time(e.sealed_at),
                e.commit
                    .as_deref()
                    .map(|c| format!(", commit {}", p(&c.chars().take(12).collect::<String>())))
                    .unwrap_or_default(),
                e.message
                    .as_deref()
                    .map(|m| format!(": {}", p(m.lines().next().unwrap_or(""))))
                    .unwrap_or_default(),
            );
            for f in &e.evidence {
                let _ = writeln!(out, "    evidence: {}/{}", p(&e.key_prefix), p(f));
            }
        }
    }
    for b in &h.unreadable {
        let _ = writeln!(out, "  unreadable: {}: {}", b.key, b.error);
    }
    out
}

fn fleet_runs_table(runs: &[crate::catalog::FleetRun]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if runs.is_empty() {
        out.push_str("no sealed runs in the primary\n");
    }
    for r in runs {
        let p = destination::printable;
        if let Some(e) = &r.error {
            let _ = writeln!(out, "{}: unreadable: {}", p(&r.key_prefix), p(e));
            continue;
        }
        let tests = match r.passed {
            Some(true) => ", tests passed",
            Some(false) => ", tests FAILED",
            None => "",
        };
        let _ = writeln!(
            out,
            "{}/{}: sealed {}, {} files, {} bytes{}{}{tests}",
            p(&r.node),
            p(&r.run),
            crate::html::run_page::time(r.sealed_ms),
            r.files,
            r.bytes,
            r.branch
                .as_deref()
                .map(|b| format!(", branch {}", p(b)))
                .unwrap_or_default(),
            r.commit
                .as_deref()
                .map(|c| format!(", commit {}", p(&c.chars().take(12).collect::<String>())))
                .unwrap_or_default(),
        );
    }
    out
}

fn runs_table(runs: &[crate::runs::RunInfo]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if runs.is_empty() {
        out.push_str("no runs (a watch needs runs = \"dir\")\n");
    }
    for r in runs {
        let state = match r.state {
            State::Open => "open",
            State::Sealing => "sealing",
            State::Sealed => "sealed",
            State::ChangedAfterSeal => "changed after seal",
            State::Pruned => "pruned",
        };
        let missing: Vec<String> = r
            .destinations
            .iter()
            .filter(|d| d.missing > 0)
            .map(|d| format!("{} missing {}", d.name, d.missing))
            .collect();
        // A sealed run counts what its manifest holds; local cleanup may have deleted the
        // files on disk since (they are in every destination).
        let (files, bytes) = match (r.state, r.sealed_files, r.sealed_bytes) {
            (State::Sealed, Some(f), Some(b)) => (f, b),
            _ => (r.files, r.bytes),
        };
        let _ = write!(
            out,
            "{}: {state}, {} files, {} bytes, {}",
            destination::printable(&r.name),
            files,
            bytes,
            match r.pruned_ms {
                Some(ms) => format!(
                    "deleted from every destination by retention on {}",
                    crate::format::record::date_of(ms)
                ),
                None if r.complete => "in every destination".to_string(),
                None => missing.join(", "),
            }
        );
        if r.state == State::Sealed && r.files < files {
            let _ = write!(out, " ({} on disk)", r.files);
        }
        if let Some(t) = &r.tests {
            let _ = write!(out, "; tests {} ({})", t.verdict(), t.counts_line());
        }
        for n in &r.notifications {
            let state = match n.state {
                crate::index::NotifyState::Pending => "pending",
                crate::index::NotifyState::Sent => "sent",
                crate::index::NotifyState::GivenUp => "given up",
            };
            let _ = write!(out, "; notify {}: {state}", destination::printable(&n.name));
        }
        out.push('\n');
    }
    out
}

/// `report --run`: one sealed run in text (every string escaped: the manifest's names come
/// from the tree, its CI context from the job's environment).
fn manifest_text(m: &crate::format::manifest::Manifest) -> String {
    let p = destination::printable;
    let mut out = String::new();
    write_run_header(&mut out, m);
    if let Some(ci) = &m.ci {
        write_ci(&mut out, ci);
    }
    for (k, v) in &m.labels {
        let _ = writeln!(out, "  label      {}={}", p(k), p(v));
    }
    if let Some(t) = &m.tests {
        write_run_tests(&mut out, t);
    }
    write_largest_files(&mut out, &m.files);
    out
}

/// `report --run`: the run's name and node, when it was sealed and written, and its totals.
fn write_run_header(out: &mut String, m: &crate::format::manifest::Manifest) {
    let p = destination::printable;
    let when = page::time;
    let _ = writeln!(out, "run {} (node {})", p(&m.run), p(&m.node));
    let _ = writeln!(out, "  sealed     {}", when(m.sealed_ms));
    if let (Some(first), Some(last)) = (m.first_file_ms, m.last_file_ms) {
        let secs = (last - first).max(0) / 1000;
        let _ = writeln!(
            out,
            "  written    {} – {} ({}m {}s)",
            when(first),
            when(last),
            secs / 60,
            secs % 60
        );
    }
    let _ = writeln!(
        out,
        "  totals     {} files, {}",
        m.totals.files,
        crate::format::units::human(m.totals.bytes)
    );
}

/// `report --run`: the CI context, one line per field the job had.
fn write_ci(out: &mut String, ci: &crate::format::ci::Ci) {
    let p = destination::printable;
    let _ = writeln!(out, "  ci         {}", p(&ci.provider));
    for (k, v) in [
        ("repository", &ci.repository),
        ("branch", &ci.branch),
        ("tag", &ci.tag),
        ("commit", &ci.commit),
        ("pull req.", &ci.pull_request),
        ("job", &ci.job),
        ("url", &ci.url),
    ] {
        if let Some(v) = v {
            let _ = writeln!(out, "  {k:<10} {}", p(v));
        }
    }
}

/// `report --run`: the test summary, its failures, the JUnit files left out and the slowest.
fn write_run_tests(out: &mut String, t: &crate::format::results::TestSummary) {
    let p = destination::printable;
    let _ = writeln!(out, "  tests      {}: {}", t.verdict(), t.counts_line());
    let _ = writeln!(out, "  test time  {:.1} s", t.duration_ms as f64 / 1000.0);
    for f in &t.failures {
        let _ = writeln!(
            out,
            "    {} {}::{} ({}){}",
            if f.outcome == crate::format::results::Outcome::Error {
                "ERROR "
            } else {
                "FAILED"
            },
            p(&f.class),
            p(&f.name),
            p(&f.file),
            f.message
                .as_deref()
                .map(|m| format!(": {}", p(&m.replace('\n', " "))))
                .unwrap_or_default()
        );
        for e in &f.evidence {
            let _ = writeln!(out, "           evidence: {}", p(e));
        }
    }
    if t.failures_omitted > 0 {
        let _ = writeln!(out, "    ... and {} more failures", t.failures_omitted);
    }
    for b in &t.unreadable {
        let _ = writeln!(
            out,
            "    JUnit file left out: {}: {}",
            p(&b.path),
            p(&b.error)
        );
    }
    if !t.slowest.is_empty() {
        out.push_str("  slowest tests:\n");
    }
    for s in &t.slowest {
        let _ = writeln!(
            out,
            "    {:>9} ms  {}::{}",
            s.duration_ms,
            p(&s.class),
            p(&s.name)
        );
    }
}

/// `report --run`: the ten largest files.
fn write_largest_files(out: &mut String, files: &[ManifestFile]) {
    let mut largest: Vec<&ManifestFile> = files.iter().collect();
    largest.sort_by_key(|f| std::cmp::Reverse(f.size));
    if !largest.is_empty() {
        out.push_str("  largest files:\n");
    }
    for f in largest.into_iter().take(10) {
        let _ = writeln!(
            out,
            "    {:>10}  {}",
            crate::format::units::human(f.size),
            destination::printable(&f.path)
        );
    }
}

/// A human-readable rendering of [`StatusView`].
fn status_text(view: &crate::status::StatusView) -> String {
    let status = &view.status;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "index: {} files, {} bytes, {} distinct contents",
        status.files, status.bytes, status.contents
    );
    let _ = writeln!(
        out,
        "{} files not yet in every destination (never deleted locally)",
        status.awaiting_all_destinations
    );
    if let Some(n) = view.open_runs {
        let _ = writeln!(out, "{n} runs open (not sealed)");
    }
    if let Some(n) = &view.notifications {
        let _ = writeln!(
            out,
            "notifications: {} sent, {} pending ({} failing), {} given up",
            n.sent, n.pending, n.failing, n.given_up
        );
        if let Some(e) = &n.last_error {
            let _ = writeln!(out, "  last error: {}", destination::printable(e));
        }
    }
    for d in &status.destinations {
        let _ = write!(
            out,
            "{}: {} done, {} pending ({} failing), {} failed permanently",
            d.name, d.done, d.pending, d.failing, d.failed_permanently
        );
        if let Some(age) = d.oldest_pending_secs {
            let _ = write!(out, ", oldest pending {age} s");
        }
        // Done counts the files still indexed; after local cleanup, what the destination
        // holds is more.
        if let Some(h) = view.held.iter().find(|h| h.name == d.name) {
            let _ = write!(out, "; holds {} objects, {}", h.objects, human(h.bytes));
        }
        out.push('\n');
        if let Some(e) = &d.last_error {
            let _ = writeln!(out, "  last error: {}", destination::printable(e));
        }
    }
    out
}

/// The report as text.
fn report_text(r: &crate::format::report::Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {}: {} files, {}",
        r.node_id,
        r.files,
        human(r.bytes)
    );
    for d in &r.destinations {
        let _ = writeln!(
            o,
            "\n{}: {} objects, {} stored for {} original; saved {} by compression, {} by dedup",
            d.name,
            d.usage.objects,
            human(d.usage.bytes_stored),
            human(d.usage.bytes_original),
            human(d.compression_saved_bytes),
            human(d.dedup_saved_bytes)
        );
        let _ = writeln!(
            o,
            "  latency p50/p90/p99: {}/{}/{} ms; throughput {}/s; backlog {} ({} failing)",
            d.latency_ms[0],
            d.latency_ms[1],
            d.latency_ms[2],
            human(d.throughput_bytes_per_sec),
            d.backlog.pending,
            d.backlog.failing
        );
        let mut types: Vec<_> = d.by_type.iter().collect();
        types.sort_by_key(|(_, u)| std::cmp::Reverse(u.bytes_original));
        for (ext, u) in types.iter().take(8) {
            let _ = writeln!(
                o,
                "  .{ext:<8} {:>6} objects {:>10} → {:>10}",
                u.objects,
                human(u.bytes_original),
                human(u.bytes_stored)
            );
        }
        for (cause, n) in &d.failures {
            let _ = writeln!(o, "  failing ({n}): {cause}");
        }
    }
    if !r.runs.is_empty() {
        let _ = writeln!(o, "\nlatest runs:");
        for run in &r.runs {
            let _ = writeln!(o, "  {}", run_line(run));
        }
    }
    if !r.recommendations.is_empty() {
        let _ = writeln!(o, "\nrecommendations:");
        for rec in &r.recommendations {
            let _ = writeln!(o, "  - {rec}");
        }
    }
    o
}

/// One run in text: name, branch, files, bytes, how long the job wrote (escaped: names come
/// from trees and other nodes).
fn run_line(r: &crate::format::manifest::RunSummary) -> String {
    format!(
        "{}{}: {} files, {}{}",
        destination::printable(&r.run),
        r.branch
            .as_deref()
            .map(|b| format!(" ({})", destination::printable(b)))
            .unwrap_or_default(),
        r.files,
        human(r.bytes),
        r.duration_secs
            .map(|s| format!(", written over {}m {}s", s / 60, s % 60))
            .unwrap_or_default()
    )
}

/// The fleet as text. Every string from a status object has its control characters escaped:
/// node ids and errors are written by other nodes, and must not drive the terminal.
fn fleet_text(f: &crate::format::report::Fleet) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<24} {:>8} {:>10} {:>8} {:>8} {:>8}  state",
        "node", "files", "bytes", "pending", "failing", "success"
    );
    let now = now_secs();
    for FleetNode { status: n, stale } in &f.nodes {
        let _ = writeln!(
            o,
            "{:<24} {:>8} {:>10} {:>8} {:>8} {:>7.1}%  {}",
            destination::printable(&n.node_id),
            n.files,
            human(n.bytes),
            n.pending(),
            n.failing(),
            n.success_rate * 100.0,
            if *stale {
                format!(
                    "STALE (last seen {} s ago)",
                    now.saturating_sub(n.last_seen)
                )
            } else {
                "ok".into()
            }
        );
    }
    for FleetNode { status: n, .. } in &f.nodes {
        for run in &n.latest_runs {
            let _ = writeln!(
                o,
                "  {}: {}",
                destination::printable(&n.node_id),
                run_line(run)
            );
        }
    }
    write_fleet_storage(&mut o, f);
    let t = &f.totals;
    let _ = writeln!(
        o,
        "fleet: {} nodes, {} files, {}, {} pending, {} failing",
        t.nodes,
        t.files,
        human(t.bytes),
        t.pending,
        t.failing
    );
    for u in &f.unreadable {
        let _ = writeln!(
            o,
            "unreadable status object: {}: {}",
            destination::printable(&u.key),
            destination::printable(&u.error)
        );
    }
    o.push_str(&fleet_results_text(&f.results));
    o
}

/// Storage per destination and node: original bytes, bytes stored, saved by dedup (from
/// each node's status object; nodes of versions that do not publish them show zeros).
fn write_fleet_storage(o: &mut String, f: &crate::format::report::Fleet) {
    let mut totals: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    for FleetNode { status: n, .. } in &f.nodes {
        for d in &n.destinations {
            let _ = writeln!(
                o,
                "  {} {}: {} of files, {} stored, {} saved by dedup",
                destination::printable(&n.node_id),
                destination::printable(&d.name),
                human(d.logical_bytes),
                human(d.stored_bytes),
                human(d.dedup_saved_bytes)
            );
            let t = totals.entry(&d.name).or_default();
            t.0 = t.0.saturating_add(d.logical_bytes);
            t.1 = t.1.saturating_add(d.stored_bytes);
            t.2 = t.2.saturating_add(d.dedup_saved_bytes);
        }
    }
    for (name, (logical, stored, saved)) in totals {
        let _ = writeln!(
            o,
            "destination {}: {} of files, {} stored, {} saved by dedup",
            destination::printable(name),
            human(logical),
            human(stored),
            human(saved)
        );
    }
}

/// A test's id for people: `class::name`, escaped.
fn test_id(class: &str, name: &str) -> String {
    destination::printable(&format!("{class}::{name}"))
}

/// The fleet's test results as text (every string from a record escaped).
fn fleet_results_text(r: &crate::format::fleet::FleetResults) -> String {
    let p = destination::printable;
    let mut o = String::new();
    write_fleet_totals(&mut o, r);
    write_fleet_groups(&mut o, r);
    write_flaky(&mut o, &r.flaky);
    write_failing(&mut o, r);
    write_node_specific(&mut o, &r.node_specific);
    write_branch_rules(&mut o, r);
    write_slowest(&mut o, &r.slowest);
    write_outliers(&mut o, &r.outlier_nodes);
    if r.unreadable_junit_files > 0 {
        let _ = writeln!(
            o,
            "  {} JUnit files could not be parsed by their nodes (see each run's summary)",
            r.unreadable_junit_files
        );
    }
    for u in &r.unreadable {
        let _ = writeln!(o, "unreadable run record: {}: {}", p(&u.key), p(&u.error));
    }
    o
}

/// The fleet's test results: the window, the branch and the totals in one line.
fn write_fleet_totals(o: &mut String, r: &crate::format::fleet::FleetResults) {
    let p = destination::printable;
    let pc = crate::html::charts::percent;
    let _ = writeln!(
        o,
        "\ntest results {} – {}{}: {} runs with tests, {} passed ({}); {} tests, {} passed{}",
        r.from,
        r.to,
        r.branch
            .as_deref()
            .map(|b| format!(" on branch {}", p(b)))
            .unwrap_or_default(),
        r.totals.runs,
        r.totals.runs_passed,
        pc(r.totals.success_rate),
        r.totals.tests,
        pc(r.totals.pass_rate),
        if r.runs_without_tests > 0 {
            format!("; {} runs without tests", r.runs_without_tests)
        } else {
            String::new()
        }
    );
}

/// The fleet's test results: a table of rates by node, by branch and by suite.
fn write_fleet_groups(o: &mut String, r: &crate::format::fleet::FleetResults) {
    let p = destination::printable;
    let pc = crate::html::charts::percent;
    for (what, groups) in [
        ("node", &r.nodes),
        ("branch", &r.branches),
        ("suite", &r.suites),
    ] {
        if groups.is_empty() {
            continue;
        }
        let _ = writeln!(
            o,
            "  {:<30} {:>6} {:>7} {:>8} {:>8} {:>9}",
            format!("by {what}"),
            "runs",
            "passed",
            "success",
            "tests",
            "pass rate"
        );
        for g in groups {
            let _ = writeln!(
                o,
                "  {:<30} {:>6} {:>7} {:>8} {:>8} {:>9}",
                p(&g.name),
                g.rates.runs,
                g.rates.runs_passed,
                pc(g.rates.success_rate),
                g.rates.tests,
                pc(g.rates.pass_rate)
            );
        }
    }
}

/// The fleet's test results: the flaky tests, with the commits they flaked on.
fn write_flaky(o: &mut String, flaky: &[crate::format::fleet::Flaky]) {
    let p = destination::printable;
    if !flaky.is_empty() {
        let _ = writeln!(o, "  flaky tests (failed and passed for one commit):");
        for f in flaky {
            let _ = writeln!(
                o,
                "    {} ({}): {} revision{}: {}",
                test_id(&f.class, &f.name),
                p(&f.suite),
                f.revisions,
                if f.revisions == 1 { "" } else { "s" },
                p(&f.commits.join(", "))
            );
        }
    }
}

/// The fleet's test results: the consistently and the most often failing tests.
fn write_failing(o: &mut String, r: &crate::format::fleet::FleetResults) {
    let p = destination::printable;
    let pc = crate::html::charts::percent;
    for (what, list) in [
        (
            "broken (failed every time on its last 3 commits)",
            &r.broken,
        ),
        ("consistently failing", &r.consistently_failing),
        ("most often failing", &r.most_failing),
    ] {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(o, "  {what}:");
        for t in list {
            let _ = writeln!(
                o,
                "    {} ({}): failed {} of {} ({})",
                test_id(&t.class, &t.name),
                p(&t.suite),
                t.failed,
                t.runs.saturating_sub(t.skipped),
                pc(t.failure_rate)
            );
        }
    }
}

/// The fleet's test results: tests failing on one node far more often than elsewhere.
fn write_node_specific(o: &mut String, list: &[crate::format::fleet::NodeSpecific]) {
    let p = destination::printable;
    if list.is_empty() {
        return;
    }
    let _ = writeln!(o, "  node-specific (failing on one node far more often):");
    for n in list {
        let _ = writeln!(
            o,
            "    {} on {}: failed {} of {} ({:.0}%), elsewhere {} of {} ({:.0}%)",
            test_id(&n.class, &n.name),
            p(&n.node),
            n.failed,
            n.runs,
            n.failure_rate * 100.0,
            n.other_failed,
            n.other_runs,
            n.other_failure_rate * 100.0
        );
    }
}

/// The fleet's test results: new failures, fixed and flipping tests per branch.
fn write_branch_rules(o: &mut String, r: &crate::format::fleet::FleetResults) {
    let p = destination::printable;
    let short = |c: &str| p(&c.chars().take(12).collect::<String>());
    for (title, list) in [
        (
            "new failures (failed on the newest commit, passed on the one before)",
            &r.new_failures,
        ),
        (
            "fixed (passed on the newest commit, failed on the one before)",
            &r.fixed,
        ),
    ] {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(o, "  {title}:");
        for c in list {
            let _ = writeln!(
                o,
                "    {} on {}: {} after {}",
                test_id(&c.class, &c.name),
                p(&c.branch),
                short(&c.commit),
                short(&c.previous_commit)
            );
        }
    }
    if !r.flipping.is_empty() {
        let _ = writeln!(
            o,
            "  flipping (pass/fail changes over the last executions on a branch):"
        );
        for f in &r.flipping {
            let _ = writeln!(
                o,
                "    {} on {}: {} flips in {} executions ({:.0}%)",
                test_id(&f.class, &f.name),
                p(&f.branch),
                f.flips,
                f.executions,
                f.flip_rate * 100.0
            );
        }
    }
}

/// The fleet's test results: the slowest tests by mean time.
fn write_slowest(o: &mut String, slowest: &[crate::format::fleet::TestStat]) {
    if !slowest.is_empty() {
        let _ = writeln!(o, "  slowest tests (mean):");
        for t in slowest {
            let _ = writeln!(
                o,
                "    {:>9} ms  {} ({} runs, max {} ms)",
                t.mean_ms,
                test_id(&t.class, &t.name),
                t.runs,
                t.max_ms
            );
        }
    }
}

/// The fleet's test results: the nodes whose failure rate stands out.
fn write_outliers(o: &mut String, outliers: &[crate::format::fleet::Outlier]) {
    let pc = crate::html::charts::percent;
    for n in outliers {
        let _ = writeln!(
            o,
            "  node {} stands out: {} of its {} runs failed, against {} for the rest of the fleet",
            destination::printable(&n.node),
            pc(Some(n.failure_rate)),
            n.runs,
            pc(Some(n.fleet_failure_rate))
        );
    }
}

/// Where the list came from, on stderr when it was not the primary.
fn render_source(source: &crate::quarantine::Source) {
    if let crate::quarantine::Source::Cache {
        why,
        path,
        cached_ms,
    } = source
    {
        eprintln!(
            "panoptic-sync: the primary could not be read ({}); deciding from the copy of the \
             quarantine list kept at {} ({})",
            destination::printable(why),
            path.display(),
            page::time(*cached_ms)
        );
    }
}

/// `gate`'s verdict on each failure, and the outcome.
fn gate_text(g: &crate::quarantine::Gate) -> String {
    use crate::quarantine::Verdict;
    let mut o = String::new();
    for f in &g.failures {
        let until = f
            .expires
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default();
        let (word, tail) = match f.verdict {
            Verdict::Quarantined => ("quarantined", format!(" (until {until})")),
            Verdict::Expired => ("EXPIRED", format!(" (quarantine expired {until})")),
            Verdict::NotQuarantined => ("NOT QUARANTINED", String::new()),
        };
        let _ = writeln!(
            o,
            "{word} {}{tail}  [{}]",
            destination::printable(&f.test),
            destination::printable(&f.file.display().to_string())
        );
    }
    let unexcused = g
        .failures
        .iter()
        .filter(|f| f.verdict != Verdict::Quarantined)
        .count();
    let _ = writeln!(
        o,
        "gate {}: {} test{}, {} failure{}, {} not quarantined",
        if g.passed() { "passed" } else { "failed" },
        g.tests,
        if g.tests == 1 { "" } else { "s" },
        g.failures.len(),
        if g.failures.len() == 1 { "" } else { "s" },
        unexcused
    );
    o
}

/// Why `gate` failed, and where its list came from, on stderr.
fn render_gate_problems(g: &crate::quarantine::Gate) {
    render_source(&g.source);
    for b in &g.bad_files {
        eprintln!(
            "panoptic-sync: {}: {}",
            b.path.display(),
            destination::printable(&b.error)
        );
    }
    if g.tests == 0 && g.bad_files.is_empty() {
        eprintln!(
            "panoptic-sync: no test case in the JUnit files given: the job may have stopped \
             before writing its results"
        );
    }
}

/// The quarantine list as a table (expired entries marked).
fn quarantine_text(l: &crate::quarantine::Listed) -> String {
    let p = destination::printable;
    let mut o = String::new();
    if l.list.entries.is_empty() {
        let _ = writeln!(o, "the quarantine list is empty ({})", p(&l.key));
        return o;
    }
    let width = l
        .list
        .entries
        .iter()
        .map(|e| p(&e.test).chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        o,
        "{:<width$}  {:<20}  {:<16}  REASON",
        "TEST", "EXPIRES", "ADDED BY"
    );
    for e in &l.list.entries {
        let expires = e.expires.format("%Y-%m-%d %H:%M").to_string();
        let expires = if e.active(l.now_ms) {
            expires
        } else {
            format!("{expires} expired")
        };
        let _ = writeln!(
            o,
            "{:<width$}  {:<20}  {:<16}  {}",
            p(&e.test),
            expires,
            p(&e.added_by),
            p(&e.reason)
        );
    }
    o
}

/// `quarantine propose`: the flaky tests not quarantined, and what was added.
fn proposed_text(r: &crate::quarantine::Proposed) -> String {
    let p = destination::printable;
    let mut o = String::new();
    if r.proposals.is_empty() {
        let _ = writeln!(
            o,
            "no flaky test to propose ({} quarantined already)",
            r.already
        );
    }
    for t in &r.proposals {
        let _ = writeln!(
            o,
            "{} ({}): flaky on {} revision{}: {}",
            p(&t.test),
            p(&t.suite),
            t.revisions,
            if t.revisions == 1 { "" } else { "s" },
            p(&t.commits.join(", "))
        );
    }
    for e in &r.added {
        let _ = writeln!(
            o,
            "added {} (expires {})",
            p(&e.test),
            e.expires.format("%Y-%m-%d %H:%M UTC")
        );
    }
    o
}
