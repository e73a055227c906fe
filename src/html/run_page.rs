//! A sealed run's page: one self-contained HTML document (no external assets) with the CI
//! context, the labels, the run's HTML reports, inline previews of its images and every file
//! with its size and type, each linked by a relative URL to its object.
//!
//! Relative links make the page work wherever the objects are served from a common base: a
//! `file://` store, a static-website bucket, a CDN or `public_base_url`. The page lives at
//! `<prefix>/<run>/index.html`, which a static-website bucket serves for `<prefix>/<run>/`,
//! unless the run has an `index.html` of its own: then at `<prefix>/<run>/_run/index.html`.
//! An HTML report's own relative links work when its files are stored under their own names
//! (compression off, or `[pipeline] uncompressed` naming them).
//!
//! Every value on the page comes from the tree or the CI environment: the maud template
//! escapes all of it, and link targets are percent-encoded segment by segment.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::href::{encode_path, run_href};
use crate::format::fleet::{BaseDiff, Stories, Story, StoryKind};
use crate::format::layout::essence;
use crate::format::manifest::{Manifest, ManifestFile, RUN_DIR};
use crate::format::units::human;

/// The page's name.
pub(crate) const PAGE_NAME: &str = "index.html";

/// Where the page of `manifest` goes: its logical key (relative to the destination base) and
/// the relative path from the page back to the run's directory.
pub(crate) fn location(manifest: &Manifest) -> (String, &'static str) {
    if manifest.files.iter().any(|f| f.path == PAGE_NAME) {
        (
            format!("{}/{RUN_DIR}/{PAGE_NAME}", manifest.key_prefix),
            "../",
        )
    } else {
        (format!("{}/{PAGE_NAME}", manifest.key_prefix), "")
    }
}

/// The page's stored key (it is stored as it is) and the way back to the run's directory.
pub(crate) fn stored_location(manifest: &Manifest) -> (String, &'static str) {
    let (logical, up) = location(manifest);
    (
        crate::format::layout::stored_key(&logical, crate::format::layout::Plan::STORED),
        up,
    )
}

/// The relative link from the page to the object at `stored_key` (relative to the
/// destination base), each segment percent-encoded.
fn href(manifest: &Manifest, up: &str, stored_key: &str) -> String {
    let below = stored_key
        .strip_prefix(&manifest.key_prefix)
        .and_then(|k| k.strip_prefix('/'))
        .unwrap_or(stored_key);
    format!("{up}{}", encode_path(below))
}

/// How many segments the run's key prefix has: the way from the run's directory up to the
/// destination's base.
fn depth(manifest: &Manifest) -> usize {
    manifest
        .key_prefix
        .split('/')
        .filter(|s| !s.is_empty())
        .count()
}

/// Whether `f` is stored under its own name (neither compressed nor encrypted nor escaped),
/// so a browser can show it in place.
fn as_is(manifest: &Manifest, f: &ManifestFile) -> bool {
    f.stored_key == format!("{}/{}", manifest.key_prefix, f.path)
}

/// A time for people: `2026-11-26 12:00:00 UTC`.
pub(crate) fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;\
     padding:0 1em;color:#111}table{border-collapse:collapse;width:100%}\
     td,th{text-align:left;padding:.15em .6em;border-bottom:1px solid #eee}\
     td.n{text-align:right;white-space:nowrap}tr.dir td{font-weight:600;background:#f6f6f6}\
     dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}dt{color:#555}\
     dd{margin:0}.shots{display:flex;flex-wrap:wrap;gap:1em}\
     .shots figure{margin:0;max-width:300px}.shots img{max-width:300px;max-height:200px;\
     border:1px solid #ddd}.note{background:#fef9c3;padding:.5em 1em;border-radius:6px}\
     p.pass{background:#dcfce7;padding:.4em 1em}p.fail{background:#fee2e2;padding:.4em 1em}\
     pre{white-space:pre-wrap;margin:0;font-size:.85em}td,dd,pre,h1,figcaption{overflow-wrap:anywhere}\
     .scroll{overflow-x:auto;max-width:100%}dd{min-width:0}";

/// How a page links to a run's files.
enum Links<'a> {
    /// To the stored objects, relative to the page (`up` leads back to the run's directory);
    /// `encrypted`: they cannot be opened from a browser.
    Stored {
        manifest_key: &'a str,
        up: &'a str,
        encrypted: bool,
    },
    /// To the files by their paths in the run, as `serve` answers them (decoded).
    Served,
}

impl Links<'_> {
    fn file(&self, m: &Manifest, f: &ManifestFile) -> String {
        match self {
            Links::Stored { up, .. } => match &f.blob {
                // A content destination: the bytes are in the blob, below the base.
                Some(blob) => format!("{up}{}{}", "../".repeat(depth(m)), encode_path(blob)),
                None => href(m, up, &f.stored_key),
            },
            Links::Served => encode_path(&f.path),
        }
    }

    fn manifest(&self, m: &Manifest) -> String {
        match self {
            Links::Stored {
                up, manifest_key, ..
            } => href(m, up, manifest_key),
            Links::Served => format!("{RUN_DIR}/manifest.json"),
        }
    }

    /// The way from the page to the store's root (to link other runs).
    fn root(&self, m: &Manifest) -> String {
        match self {
            Links::Stored { up, .. } => {
                format!("{up}{}", "../".repeat(m.key_prefix.split('/').count()))
            }
            Links::Served => "/".into(),
        }
    }

    fn encrypted(&self) -> bool {
        matches!(
            self,
            Links::Stored {
                encrypted: true,
                ..
            }
        )
    }

    /// Whether `f` opens in a browser from this page.
    fn readable(&self, m: &Manifest, f: &ManifestFile) -> bool {
        match self {
            Links::Stored { encrypted, .. } => !encrypted && as_is(m, f),
            Links::Served => true,
        }
    }
}

/// The page of `manifest`, whose own object is at `manifest_key`. `up` leads from the page
/// back to the run's directory (see [`location`]). `encrypted`: the objects cannot be opened
/// from a browser (the page is rendered locally by `report --run --html`), so nothing is
/// previewed.
/// `stories`: what the fleet's records say about its failures, when they could be read.
pub(crate) fn render(
    manifest: &Manifest,
    manifest_key: &str,
    up: &str,
    encrypted: bool,
    stories: Option<&Stories>,
) -> String {
    page(
        manifest,
        &Links::Stored {
            manifest_key,
            up,
            encrypted,
        },
        stories,
    )
}

/// The page of `manifest` as `serve` shows it at `/<prefix>/<run>/`: every link leads to a
/// file by its path, which the gateway decodes, and images are previewed whatever the store.
pub(crate) fn render_served(manifest: &Manifest, stories: Option<&Stories>) -> String {
    page(manifest, &Links::Served, stories)
}

fn page(manifest: &Manifest, links: &Links<'_>, stories: Option<&Stories>) -> String {
    let encrypted = links.encrypted();
    let reports: Vec<&ManifestFile> = manifest
        .files
        .iter()
        .filter(|f| {
            essence(&f.content_type) == "text/html" && (encrypted || links.readable(manifest, f))
        })
        .collect();
    let images: Vec<&ManifestFile> = manifest
        .files
        .iter()
        .filter(|f| f.content_type.starts_with("image/") && links.readable(manifest, f))
        .collect();
    let title = format!("run {}", manifest.run);
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
                h1 { (title) }
                @if encrypted {
                    p class="note" {
                        "The objects of this run are encrypted: links lead to ciphertext. "
                        "Restore the run with "
                        code { "panoptic-sync restore --run " (manifest.run) } "."
                    }
                }
                (summary(manifest))
                @if let Some(t) = &manifest.tests {
                    (tests(manifest, links, t, stories))
                }
                @if !reports.is_empty() {
                    h2 { "Reports" }
                    ul {
                        @for f in &reports {
                            li { a href=(links.file(manifest, f)) { (f.path) } }
                        }
                    }
                }
                @if !images.is_empty() {
                    h2 { "Images" }
                    div class="shots" {
                        @for f in &images {
                            @let link = links.file(manifest, f);
                            figure {
                                a href=(link) { img src=(link) alt=(f.path) loading="lazy"; }
                                figcaption { (f.path) }
                            }
                        }
                    }
                }
                h2 { "Files" }
                (files(manifest, links))
                p {
                    small {
                        a href=(links.manifest(manifest)) { "manifest" }
                        " · sealed by panoptic-sync"
                    }
                }
            }
        }
    }
    .into_string()
}

fn summary(m: &Manifest) -> Markup {
    let ci_fields =
        m.ci.iter()
            .flat_map(|ci| {
                [
                    ("Repository", &ci.repository),
                    ("Branch", &ci.branch),
                    ("Tag", &ci.tag),
                    ("Commit", &ci.commit),
                    ("Pull request", &ci.pull_request),
                    ("Build", &ci.build),
                ]
            })
            .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)));
    html! {
        dl {
            dt { "Node" } dd { (m.node) }
            dt { "Sealed" } dd { (time(m.sealed_ms)) }
            @if let (Some(first), Some(last)) = (m.first_file_ms, m.last_file_ms) {
                dt { "Files written" } dd { (time(first)) " – " (time(last)) }
            }
            dt { "Totals" } dd { (m.totals.files) " files, " (human(m.totals.bytes)) }
            @if let Some(ci) = &m.ci {
                dt { "CI" } dd { (ci.provider) }
            }
            @for (name, value) in ci_fields {
                dt { (name) } dd { (value) }
            }
            @if let Some(ci) = &m.ci {
                @if let Some(job) = &ci.job {
                    dt { "Job" }
                    dd {
                        // Only web links: a javascript: URL from the environment stays text.
                        @match ci.url.as_deref().filter(|u| u.starts_with("https://") || u.starts_with("http://")) {
                            Some(u) => a href=(u) { (job) },
                            None => (job),
                        }
                    }
                }
            }
            @for (k, v) in &m.labels {
                dt { (k) } dd { (v) }
            }
        }
    }
}

/// The run's test results: counts, failures with their messages, the slowest tests, the
/// JUnit files left out.
fn tests(
    m: &Manifest,
    links: &Links<'_>,
    t: &crate::format::results::TestSummary,
    stories: Option<&Stories>,
) -> Markup {
    let root = &links.root(m);
    let class = if t.passed_run() { "pass" } else { "fail" };
    let story = |class: &str, name: &str| {
        stories.and_then(|s| s.tests.iter().find(|x| x.class == class && x.name == name))
    };
    html! {
        h2 { "Tests" }
        p class=(class) {
            strong { (t.verdict()) } " · " (t.counts_line()) " · "
            (format!("{:.1}", t.duration_ms as f64 / 1000.0)) " s"
        }
        @if let Some(base) = stories.and_then(|s| s.base.as_ref()) {
            (against_base(base, root))
        }
        @if !t.failures.is_empty() {
            h3 { "Failures" }
            div class="scroll" { table {
                thead { tr { th { "Test" } th { "History" } th { "Suite" } th { "Message" } } }
                tbody {
                    @for f in &t.failures {
                        tr {
                            td { (f.class) "::" (f.name)
                                @if f.outcome == crate::format::results::Outcome::Error { " (error)" } }
                            td { (story_text(story(&f.class, &f.name), stories.is_some())) }
                            td { (f.suite) }
                            td {
                                (folded(f.message.as_deref().unwrap_or(""), f.trace.as_deref()))
                                @if !f.evidence.is_empty() {
                                    (evidence(m, links, &f.evidence))
                                }
                            }
                        }
                    }
                }
            }
            }
            @if t.failures_omitted > 0 {
                p { "… and " (t.failures_omitted) " more" }
            }
        }
        @if !t.retried.is_empty() {
            h3 { "Passed on retry" }
            ul {
                @for r in &t.retried { li { (r.class) "::" (r.name) " (" (r.suite) ")" } }
                @if t.flaky > t.retried.len() as u64 {
                    li { "… and " (t.flaky - t.retried.len() as u64) " more" }
                }
            }
        }
        @if !t.unreadable.is_empty() {
            h3 { "JUnit files left out" }
            ul { @for b in &t.unreadable { li { code { (b.path) } ": " (b.error) } } }
        }
        @if !t.slowest.is_empty() {
            h3 { "Slowest tests" }
            div class="scroll" { table {
                tbody {
                    @for s in &t.slowest {
                        tr { td { (s.class) "::" (s.name) } td class="n" { (s.duration_ms) " ms" } }
                    }
                }
            } }
        }
    }
}

/// A failure's history in words.
fn story_text(story: Option<&Story>, known: bool) -> String {
    let short = |c: &Option<String>| {
        c.as_deref()
            .map(|c| c.chars().take(12).collect::<String>())
            .unwrap_or_default()
    };
    match story {
        None if known => "no earlier run of its branch".into(),
        None => String::new(),
        Some(s) => match s.kind {
            StoryKind::KnownFlaky => {
                format!(
                    "known flaky: failed and passed on {} commit{}",
                    s.runs,
                    if s.runs == 1 { "" } else { "s" }
                )
            }
            StoryKind::NewFailure => format!("new failure: passed at {}", short(&s.commit)),
            StoryKind::FailingSince => {
                format!("failing since {} ({} runs)", short(&s.commit), s.runs)
            }
            StoryKind::FirstSeen => "first seen on this branch".into(),
        },
    }
}

/// The files documenting a failure, each linked where the run's file list links it.
fn evidence(m: &Manifest, links: &Links<'_>, paths: &[String]) -> Markup {
    html! {
        div class="evidence" {
            "Evidence: "
            @for (i, p) in paths.iter().enumerate() {
                @if i > 0 { " · " }
                @match m.files.binary_search_by(|f| f.path.as_str().cmp(p)).ok().map(|i| &m.files[i]) {
                    Some(f) => a href=(links.file(m, f)) { (p) },
                    None => span { (p) },
                }
            }
        }
    }
}

/// A message folded after its first line, with the trace (if any) under it.
fn folded(message: &str, trace: Option<&str>) -> Markup {
    let (first, rest) = message.split_once('\n').unwrap_or((message, ""));
    let first = if first.trim().is_empty() {
        "(no message)"
    } else {
        first
    };
    let rest = match trace {
        Some(t) if rest.trim().is_empty() => t.to_string(),
        Some(t) => format!("{rest}\n{t}"),
        None => rest.to_string(),
    };
    html! {
        @if rest.trim().is_empty() {
            pre { (first) }
        } @else {
            details { summary { (first) } pre { (rest) } }
        }
    }
}

/// A pull request's failures against its base branch's newest run.
fn against_base(base: &BaseDiff, root: &str) -> Markup {
    let href = run_href(root, &base.run);
    html! {
        h3 { "Against " (base.branch) }
        p { "Compared with the newest run of " a href=(href) { (base.branch) } "." }
        @if base.new.is_empty() {
            p { "No new failure." }
        } @else {
            p class="fail" { strong { "New failures (" (base.new.len()) ")" } }
            ul { @for n in &base.new { li { (n) } } }
        }
        @if !base.already.is_empty() {
            p { "Already failing on " (base.branch) " (" (base.already.len()) ")" }
            ul { @for n in &base.already { li { (n) } } }
        }
    }
}

/// Every file, grouped under a row per directory (the manifest is sorted by path).
fn files(m: &Manifest, links: &Links<'_>) -> Markup {
    let mut last_dir = None;
    let rows: Vec<(Option<&str>, &str, &ManifestFile)> = m
        .files
        .iter()
        .map(|f| {
            let (dir, name) = f.path.rsplit_once('/').unwrap_or(("", &f.path));
            let new_dir = (last_dir != Some(dir) && !dir.is_empty()).then_some(dir);
            last_dir = Some(dir);
            (new_dir, name, f)
        })
        .collect();
    html! {
        div class="scroll" { table {
            thead { tr { th { "Path" } th { "Type" } th class="n" { "Size" } } }
            tbody {
                @for (new_dir, name, f) in rows {
                    @if let Some(dir) = new_dir {
                        tr class="dir" { td colspan="3" { (dir) "/" } }
                    }
                    tr {
                        td { a href=(links.file(m, f)) title=(f.path) { (name) } }
                        td { (f.content_type) }
                        td class="n" { (human(f.size)) }
                    }
                }
            }
        } }
    }
}
