//! The pages above a run: the list of the runs under a prefix (a node's runs, newest first:
//! state, date, branch, commit, tests, a link to each run's page), and the links from the
//! fleet page to those lists. Everything shown comes from manifests, so it is escaped.

use maud::{DOCTYPE, PreEscaped, html};
use percent_encoding::utf8_percent_encode;

use crate::format::manifest::Manifest;
use crate::format::units::human;
use crate::html::run_page::time;

/// One run in a list.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// The run's name.
    pub run: String,
    /// When it was sealed (ms since the epoch; 0 when unreadable).
    pub sealed_ms: i64,
    /// Its branch, if sealed in CI.
    pub branch: Option<String>,
    /// Its commit, if sealed in CI.
    pub commit: Option<String>,
    /// Test verdict and counts, if it has test results.
    pub tests: Option<(bool, String)>,
    /// Files and bytes.
    pub files: u64,
    /// Bytes of its files.
    pub bytes: u64,
    /// Why its manifest could not be read.
    pub error: Option<String>,
}

impl Row {
    /// The row of a sealed run.
    pub(crate) fn of(m: &Manifest) -> Row {
        Row {
            run: m.run.clone(),
            sealed_ms: m.sealed_ms,
            branch: m.ci.as_ref().and_then(|c| c.branch.clone()),
            commit: m.ci.as_ref().and_then(|c| c.commit.clone()),
            tests: m.tests.as_ref().map(|t| {
                (
                    t.passed_run(),
                    format!("{} · {}", t.verdict(), t.counts_line()),
                )
            }),
            files: m.totals.files,
            bytes: m.totals.bytes,
            error: None,
        }
    }

    /// A run whose manifest could not be read.
    pub(crate) fn unreadable(run: &str, error: &str) -> Row {
        Row {
            run: run.to_string(),
            sealed_ms: 0,
            branch: None,
            commit: None,
            tests: None,
            files: 0,
            bytes: 0,
            error: Some(error.to_string()),
        }
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;\
     padding:0 1em;color:#111}.scroll{overflow-x:auto}table{border-collapse:collapse}\
     td,th{text-align:left;padding:.2em .7em;border-bottom:1px solid #eee;white-space:nowrap}\
     td.n{text-align:right}.pass{color:#166534}.fail{color:#991b1b}code{font-size:.9em}";

fn segment(s: &str) -> String {
    utf8_percent_encode(s, crate::html::href::SEGMENT).to_string()
}

/// The page listing `rows`, the runs under `prefix`; each links to `<run>/`. `fleet`: a link
/// to the fleet page, where there is one (`serve`).
pub(crate) fn list_page(prefix: &str, rows: &[Row], fleet: Option<&str>) -> String {
    let title = format!("runs under {prefix}");
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                @if let Some(f) = fleet {
                    p { a href=(f) { "fleet" } }
                }
                h1 { (title) }
                @if rows.is_empty() {
                    p { "No sealed run yet." }
                } @else {
                    div class="scroll" {
                        table {
                            thead { tr {
                                th { "Run" } th { "Sealed" } th { "Branch" } th { "Commit" }
                                th { "Tests" } th class="n" { "Files" } th class="n" { "Size" }
                            } }
                            tbody {
                                @for r in rows {
                                    tr {
                                        td { a href=(format!("{}/", segment(&r.run))) { (r.run) } }
                                        @if let Some(e) = &r.error {
                                            td colspan="6" class="fail" { "unreadable: " (e) }
                                        } @else {
                                            td { (time(r.sealed_ms)) }
                                            td { (r.branch.as_deref().unwrap_or("")) }
                                            td { code { (r.commit.as_deref().map(|c| c.chars().take(12).collect::<String>()).unwrap_or_default()) } }
                                            td {
                                                @if let Some((passed, line)) = &r.tests {
                                                    span class=(if *passed { "pass" } else { "fail" }) { (line) }
                                                }
                                            }
                                            td class="n" { (r.files) }
                                            td class="n" { (human(r.bytes)) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    .into_string()
}

/// Links to the run list of every prefix (for the top of the fleet page).
pub(crate) fn prefix_links<'a>(prefixes: impl Iterator<Item = &'a str>) -> String {
    let prefixes: Vec<&str> = prefixes.collect();
    if prefixes.is_empty() {
        return String::new();
    }
    html! {
        nav style="margin:1em auto;max-width:1100px;padding:0 1em" {
            "Runs: "
            @for (i, p) in prefixes.iter().enumerate() {
                @if i > 0 { " · " }
                a href=(format!("/{}/", p.split('/').map(segment).collect::<Vec<_>>().join("/"))) { (p) }
            }
        }
    }
    .into_string()
}

/// A stable page for a branch's newest run: it leads there at once (and says where). It lies
/// `depth` directories below the run list.
pub(crate) fn latest_page(branch: &str, run: &str, depth: usize) -> String {
    let target = format!("{}{}/", "../".repeat(depth), segment(run));
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content=(format!("0; url={target}"));
                title { "latest run of " (branch) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "latest run of " (branch) }
                p { a href=(target) { (run) } }
            }
        }
    }
    .into_string()
}
