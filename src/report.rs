//! Reports: storage and performance analytics from the local index, with recommendations
//! computed from the data; the node status object each node publishes to its primary
//! (`_panoptic-sync/nodes/<node_id>.json`); and the fleet view, read from the bucket alone.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use futures::StreamExt;
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::config::Config;
use crate::destination::{self};
use crate::format::layout::Compression;
use crate::format::node_status::NodeStatus;
use crate::format::units::{human, now_secs};
use crate::index::{Index, Method};
use crate::node_status::read_status;

pub(crate) mod charts;

/// Where node status objects live, under the primary's base.
pub(crate) use crate::format::layout::NODES_PREFIX;
/// A node not seen for this long is flagged stale.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(600);

/// Totals for one group (a destination, a file type, a watch root).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Usage {
    /// Objects.
    pub objects: u64,
    /// Bytes of the originals.
    pub bytes_original: u64,
    /// Bytes stored (after compression and encryption).
    pub bytes_stored: u64,
}

/// One destination's part of the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct DestReport {
    /// Destination name.
    pub name: String,
    /// Everything stored there.
    pub usage: Usage,
    /// Bytes not sent thanks to compression (original − stored, for uploaded objects).
    pub compression_saved_bytes: u64,
    /// Bytes not sent thanks to dedup (server-side copies and skips).
    pub dedup_saved_bytes: u64,
    /// By file extension.
    pub by_type: BTreeMap<String, Usage>,
    /// By watch prefix.
    pub by_root: BTreeMap<String, Usage>,
    /// Files stored in the last 24 h, and their original bytes.
    pub stored_last_24h: Usage,
    /// Upload latency (queued → stored) percentiles in ms: p50, p90, p99.
    pub latency_ms: [u64; 3],
    /// Average upload throughput while uploading, bytes/s (first to last upload).
    pub throughput_bytes_per_sec: u64,
    /// What is waiting to be stored.
    pub backlog: Backlog,
    /// Current failures grouped by cause.
    pub failures: BTreeMap<String, u64>,
    /// Per day (UTC) of storing, oldest first: what was stored and how fast.
    pub days: Vec<DayUsage>,
}

/// One day of a destination in the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct DayUsage {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    /// Files stored that day (uploaded, copied or skipped).
    pub objects: u64,
    /// Of which sent as an upload.
    pub uploads: u64,
    /// Of which placed by dedup (server-side copy or already there).
    pub deduplicated: u64,
    /// Original bytes of the files stored that day.
    pub bytes_original: u64,
    /// Bytes stored for them.
    pub bytes_stored: u64,
    /// Bytes stored up to the end of that day (storage growth).
    pub bytes_stored_total: u64,
    /// Latency (queued → stored) of the files stored that day, p50 and p90, ms.
    pub latency_ms: [u64; 2],
}

/// One day of this node's sealed runs in the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct TestDay {
    /// `YYYY-MM-DD` (UTC, the day of the seal).
    pub date: String,
    /// Sealed runs with test results.
    pub runs: u64,
    /// Of which passed.
    pub runs_passed: u64,
    /// Test cases.
    pub tests: u64,
    /// Of which failed or erred.
    pub failed: u64,
}

/// A destination's queue: in the JSON report a `[pending, failing, oldest_pending_secs]`
/// array, as it has always been written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "(u64, u64, Option<u64>)")]
pub struct Backlog {
    /// Files waiting (including failing ones).
    pub pending: u64,
    /// Pending files whose last attempt failed.
    pub failing: u64,
    /// Age of the oldest pending file, in seconds.
    pub oldest_pending_secs: Option<u64>,
}

impl From<Backlog> for (u64, u64, Option<u64>) {
    fn from(b: Backlog) -> Self {
        (b.pending, b.failing, b.oldest_pending_secs)
    }
}

/// The whole report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Report {
    /// This node.
    pub node_id: String,
    /// When it was made (Unix seconds).
    pub generated_at: u64,
    /// Index totals.
    pub files: u64,
    /// Bytes of the indexed files.
    pub bytes: u64,
    /// Per destination.
    pub destinations: Vec<DestReport>,
    /// Advice computed from the numbers above.
    pub recommendations: Vec<String>,
    /// The latest sealed runs (newest first): sizes and how long each job wrote.
    pub runs: Vec<crate::format::manifest::RunSummary>,
    /// Test results of this node's sealed runs per day, oldest first.
    pub test_days: Vec<TestDay>,
}

fn ext_of(key: &str) -> String {
    let (_, logical) = crate::format::layout::Plan::from_key(key);
    let name = logical.rsplit('/').next().unwrap_or(logical);
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && ext.len() <= 10 => ext.to_ascii_lowercase(),
        _ => "(none)".into(),
    }
}

const TEXT_TYPES: &[&str] = &[
    "log", "txt", "xml", "json", "html", "csv", "out", "err", "md",
];

/// Sealed runs listed in a report.
const REPORT_RUNS: usize = 50;

/// Build the report from the index.
pub(crate) fn build(config: &Config, index: &Index) -> anyhow::Result<Report> {
    let names: Vec<String> = config.destinations().map(|d| d.name.clone()).collect();
    let status = index.status(&names)?;
    let prefixes: Vec<String> = config
        .watch
        .iter()
        .map(|w| w.prefix.replace("{node}", &config.node_id))
        .collect();
    let now_ms = crate::format::units::now_ms();
    let mut report = Report {
        node_id: config.node_id.clone(),
        generated_at: now_secs(),
        files: status.files,
        bytes: status.bytes,
        ..Default::default()
    };
    for (name, st) in names.iter().zip(&status.destinations) {
        let mut d = DestReport {
            name: name.clone(),
            backlog: Backlog {
                pending: st.pending,
                failing: st.failing,
                oldest_pending_secs: st.oldest_pending_secs,
            },
            ..Default::default()
        };
        let mut days: BTreeMap<String, DayUsage> = BTreeMap::new();
        index.each_object_of(name, |o| {
            let day = days
                .entry(crate::format::record::date_of(o.stored_ms))
                .or_default();
            day.objects += 1;
            day.bytes_original = day.bytes_original.saturating_add(o.size);
            day.bytes_stored = day.bytes_stored.saturating_add(o.stored_size);
            if o.method.is_some_and(Method::deduplicated) {
                day.deduplicated += 1;
            } else {
                day.uploads += 1;
            }
            let add = |u: &mut Usage| {
                u.objects += 1;
                u.bytes_original += o.size;
                u.bytes_stored += o.stored_size;
            };
            add(&mut d.usage);
            add(d.by_type.entry(ext_of(&o.stored_key)).or_default());
            let root = prefixes
                .iter()
                .filter(|p| p.is_empty() || o.key.starts_with(&format!("{p}/")))
                .max_by_key(|p| p.len())
                .map(|p| {
                    if p.is_empty() {
                        "(root)".into()
                    } else {
                        p.clone()
                    }
                })
                .unwrap_or_else(|| "(other)".into());
            add(d.by_root.entry(root).or_default());
            if now_ms - o.stored_ms < 86_400_000 {
                add(&mut d.stored_last_24h);
            }
            if o.method.is_some_and(Method::deduplicated) {
                d.dedup_saved_bytes += o.size;
            } else {
                d.compression_saved_bytes += o.size.saturating_sub(o.stored_size);
            }
        })?;
        let mut lat_days: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        index.latencies_by_time(name, |done_ms, ms| {
            lat_days
                .entry(crate::format::record::date_of(done_ms))
                .or_default()
                .push(ms);
        })?;
        let mut total = 0u64;
        for (date, mut day) in days {
            total = total.saturating_add(day.bytes_stored);
            day.date = date;
            day.bytes_stored_total = total;
            if let Some(l) = lat_days.get_mut(&day.date) {
                l.sort_unstable();
                let pick =
                    |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)].max(0) as u64;
                day.latency_ms = [pick(0.5), pick(0.9)];
            }
            d.days.push(day);
        }
        let lat = index.latencies_ms(name)?;
        if !lat.is_empty() {
            let pick =
                |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].max(0) as u64;
            d.latency_ms = [pick(0.5), pick(0.9), pick(0.99)];
        }
        let span = index.upload_span(name)?;
        if let (Some(a), Some(b)) = (span.first_ms, span.last_ms) {
            let secs = ((b - a).max(1000) as f64) / 1000.0;
            d.throughput_bytes_per_sec = (span.stored_bytes as f64 / secs) as u64;
        }
        for e in index.current_errors(name)? {
            *d.failures.entry(cause_of(&e.error)).or_default() += e.files;
        }
        report.destinations.push(d);
    }
    report.recommendations = recommend(config, &report);
    report.runs = crate::runs::latest(config, index, REPORT_RUNS)?;
    let mut test_days: BTreeMap<String, TestDay> = BTreeMap::new();
    crate::runs::each_sealed_summary(config, index, |sealed_ms, t| {
        if t.tests == 0 {
            return;
        }
        let day = test_days
            .entry(crate::format::record::date_of(sealed_ms))
            .or_default();
        day.runs += 1;
        day.runs_passed += u64::from(t.passed_run());
        day.tests = day.tests.saturating_add(t.tests);
        day.failed = day.failed.saturating_add(t.failed.saturating_add(t.errors));
    })?;
    report.test_days = test_days
        .into_iter()
        .map(|(date, d)| TestDay { date, ..d })
        .collect();
    Ok(report)
}

/// A failure message without the per-object parts, so equal causes group together.
fn cause_of(e: &str) -> String {
    let e = e.split(": ").skip(1).collect::<Vec<_>>().join(": ");
    let e = if e.is_empty() {
        "unknown".to_string()
    } else {
        e
    };
    e.chars().take(120).collect()
}

fn recommend(config: &Config, r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let Some(primary) = r.destinations.first() else {
        return out;
    };
    let total = primary.usage.bytes_original.max(1);
    if config.pipeline.compression == Compression::None {
        let text: u64 = primary
            .by_type
            .iter()
            .filter(|(ext, _)| TEXT_TYPES.contains(&ext.as_str()))
            .map(|(_, u)| u.bytes_original)
            .sum();
        if text * 100 / total >= 30 && text > 1 << 20 {
            out.push(format!(
                "text files (logs, reports) are {}% of bytes and are stored uncompressed: enable compression = \"zstd\"",
                text * 100 / total
            ));
        }
    }
    for d in &r.destinations {
        if let Some(age) = d.backlog.oldest_pending_secs
            && age >= 3600
        {
            out.push(format!(
                "destination {:?} is {:.1} h behind ({} files pending)",
                d.name,
                age as f64 / 3600.0,
                d.backlog.pending
            ));
        }
        if let Some((cause, n)) = d.failures.iter().max_by_key(|(_, n)| **n) {
            out.push(format!("{n} uploads to {:?} are failing: {cause}", d.name));
        }
    }
    if !crate::retention::enabled(config) && primary.stored_last_24h.bytes_stored > 0 {
        out.push(format!(
            "no retention: the primary grows by {}/day; set [retention] remote_max_age",
            human(primary.stored_last_24h.bytes_stored)
        ));
    }
    if primary.dedup_saved_bytes * 10 > total {
        out.push(format!(
            "dedup saved {} ({}% of bytes): identical files are common here",
            human(primary.dedup_saved_bytes),
            primary.dedup_saved_bytes * 100 / total
        ));
    }
    out
}

/// The report as text.
pub(crate) fn render_text(r: &Report) -> String {
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

/// The page's style sheet (static, no user data).
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:760px;margin:2em auto;color:#111}\
     figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}\
     .recs{background:#fef9c3;padding:.5em 1.5em;border-radius:6px}";

/// Tables of the fleet page (static).
const TABLE_STYLE: &str = "table{border-collapse:collapse;width:100%;margin:.5em 0 1em}\
     td,th{text-align:left;padding:.15em .6em;border-bottom:1px solid #eee}td.n,th.n{text-align:right}";

/// Horizontal bars as inline SVG: (label, value, text shown).
fn bars(title: &str, items: &[(String, u64, String)]) -> Markup {
    let max = items.iter().map(|i| i.1).max().unwrap_or(1).max(1) as f64;
    let height = 24 * items.len() + 30;
    html! {
        figure {
            figcaption { (title) }
            svg xmlns="http://www.w3.org/2000/svg" width="720" height=(height) role="img" {
                @for (i, (label, v, shown)) in items.iter().enumerate() {
                    @let y = 10 + i * 24;
                    @let w = (*v as f64 / max * 330.0).max(1.0);
                    text x="0" y=(y + 14) font-size="13" { (label) }
                    rect x="150" y=(y) width=(format!("{w:.0}")) height="18" fill="#3b82f6" {}
                    text x=(format!("{:.0}", 155.0 + w)) y=(y + 14) font-size="12" { (shown) }
                }
            }
        }
    }
}

/// Days shown in the report's time series (the latest).
const SERIES_DAYS: usize = 60;

/// A destination's time series: bytes per day (original and stored side by side), storage
/// growth, uploads per day and latency per day.
fn time_series(d: &DestReport) -> Markup {
    let days = &d.days[d.days.len().saturating_sub(SERIES_DAYS)..];
    if days.is_empty() {
        return html! {};
    }
    let x: Vec<String> = days.iter().map(|d| d.date.clone()).collect();
    let h = |v: u64| human(v);
    let n = |v: u64| v.to_string();
    let growth_max = days.iter().map(|d| d.bytes_stored_total).max().unwrap_or(0) as f64;
    let lat_max = days.iter().map(|d| d.latency_ms[1]).max().unwrap_or(0) as f64;
    html! {
        (charts::columns(
            "Bytes stored per day: original and stored side by side",
            &x,
            &[
                ("original".into(), days.iter().map(|d| d.bytes_original).collect()),
                ("stored".into(), days.iter().map(|d| d.bytes_stored).collect()),
            ],
            &h,
        ))
        (charts::lines(
            "Storage growth (bytes stored, cumulative)",
            &x,
            &[("stored".into(), days.iter().map(|d| Some(d.bytes_stored_total as f64)).collect())],
            growth_max,
            &|v| human(v as u64),
        ))
        (charts::columns(
            "Files per day: uploaded and deduplicated",
            &x,
            &[
                ("uploaded".into(), days.iter().map(|d| d.uploads).collect()),
                ("deduplicated".into(), days.iter().map(|d| d.deduplicated).collect()),
            ],
            &n,
        ))
        (charts::lines(
            "Upload latency per day (queued → stored)",
            &x,
            &[
                ("p50".into(), days.iter().map(|d| Some(d.latency_ms[0] as f64)).collect()),
                ("p90".into(), days.iter().map(|d| Some(d.latency_ms[1] as f64)).collect()),
            ],
            lat_max,
            &|v| format!("{v:.0} ms"),
        ))
    }
}

/// One destination's section of the HTML report.
fn destination_html(d: &DestReport) -> Markup {
    let mut types: Vec<_> = d.by_type.iter().collect();
    types.sort_by_key(|(_, u)| std::cmp::Reverse(u.bytes_original));
    let types: Vec<_> = types
        .iter()
        .take(12)
        .map(|(ext, u)| {
            (
                if ext.starts_with('(') {
                    ext.to_string()
                } else {
                    format!(".{ext}")
                },
                u.bytes_original,
                format!("{} → {}", human(u.bytes_original), human(u.bytes_stored)),
            )
        })
        .collect();
    let roots: Vec<_> = d
        .by_root
        .iter()
        .map(|(root, u)| (root.clone(), u.bytes_stored, human(u.bytes_stored)))
        .collect();
    html! {
        section {
            h2 { (d.name) }
            p {
                (d.usage.objects) " objects · " (human(d.usage.bytes_stored)) " stored for "
                (human(d.usage.bytes_original)) " original · compression saved "
                (human(d.compression_saved_bytes)) " · dedup saved " (human(d.dedup_saved_bytes))
                " · latency p50/p90/p99 " (d.latency_ms[0]) "/" (d.latency_ms[1]) "/"
                (d.latency_ms[2]) " ms · backlog " (d.backlog.pending) " ("
                (d.backlog.failing) " failing)"
            }
            (time_series(d))
            (bars("Bytes by file type (original → stored)", &types))
            (bars("Bytes stored by watch root", &roots))
            @if !d.failures.is_empty() {
                h3 { "Failures" }
                ul {
                    @for (cause, n) in &d.failures {
                        li { (n) " × " (cause) }
                    }
                }
            }
        }
    }
}

/// One self-contained HTML page with inline SVG charts (no network access needed). Every
/// value is escaped by the template (node ids, roots and error text come from outside).
pub(crate) fn render_html(r: &Report) -> String {
    html! {
        (DOCTYPE)
        html {
            head {
                meta charset="utf-8";
                title { "panoptic-sync report: " (r.node_id) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "panoptic-sync report: " (r.node_id) }
                p { (r.files) " files, " (human(r.bytes)) " indexed" }
                div class="recs" {
                    h2 { "Recommendations" }
                    ul { @for rec in &r.recommendations { li { (rec) } } }
                }
                @for d in &r.destinations { (destination_html(d)) }
                @if !r.test_days.is_empty() {
                    section {
                        h2 { "Test results of this node's sealed runs" }
                        @let days = &r.test_days[r.test_days.len().saturating_sub(SERIES_DAYS)..];
                        @let x: Vec<String> = days.iter().map(|d| d.date.clone()).collect();
                        (charts::lines(
                            "Run success rate per day",
                            &x,
                            &[("runs passed".into(), days.iter().map(|d| (d.runs > 0).then(|| d.runs_passed as f64 / d.runs as f64)).collect())],
                            1.0,
                            &|v| format!("{:.0}%", v * 100.0),
                        ))
                        (charts::columns(
                            "Test cases per day: run and failed",
                            &x,
                            &[
                                ("tests".into(), days.iter().map(|d| d.tests).collect()),
                                ("failed".into(), days.iter().map(|d| d.failed).collect()),
                            ],
                            &|v| v.to_string(),
                        ))
                    }
                }
                @if !r.runs.is_empty() {
                    section {
                        h2 { "Latest runs" }
                        (bars(
                            "Bytes per run",
                            &r.runs.iter().map(|x| (x.run.clone(), x.bytes, format!(
                                "{} files, {}{}", x.files, human(x.bytes),
                                x.duration_secs.map(|s| format!(", {}m {}s", s / 60, s % 60)).unwrap_or_default()
                            ))).collect::<Vec<_>>(),
                        ))
                    }
                }
            }
        }
    }
    .into_string()
}

/// Every node's status, read from the primary alone.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Fleet {
    /// The nodes, sorted by node id.
    pub nodes: Vec<FleetNode>,
    /// Objects under `_panoptic-sync/nodes/` that could not be read, each with the reason.
    pub unreadable: Vec<Unreadable>,
    /// Fleet totals.
    pub totals: FleetTotals,
    /// Test results of every node's sealed runs in the window (from their summary records).
    pub results: crate::results::fleet::FleetResults,
}

/// One node in the fleet view.
#[derive(Debug, serde::Serialize)]
pub(crate) struct FleetNode {
    /// What the node published.
    #[serde(flatten)]
    pub status: NodeStatus,
    /// Not seen for [`STALE_AFTER`].
    pub stale: bool,
}

/// A status object that could not be read.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Unreadable {
    /// The object's key (control characters escaped).
    pub key: String,
    /// Why.
    pub error: String,
}

/// Fleet totals. Every sum saturates: a node can publish any number.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct FleetTotals {
    /// Nodes read.
    pub nodes: u64,
    /// Indexed files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files pending.
    pub pending: u64,
    /// Files failing.
    pub failing: u64,
}

/// Read every node status object and the window's run records from the primary.
pub(crate) async fn fleet(
    config: &Config,
    query: &crate::results::fleet::Query,
) -> anyhow::Result<Fleet> {
    let primary = destination::open_primary(config)?;
    let listing = primary.list_under(NODES_PREFIX).await?;
    let mut fleet = Fleet::default();
    for bad in listing.bad_keys {
        fleet.unreadable.push(Unreadable {
            key: bad.key,
            error: bad.reason,
        });
    }
    let now = now_secs();
    let reads: Vec<_> = futures::stream::iter(listing.objects)
        .map(|meta| {
            let primary = &primary;
            async move {
                let res = read_status(primary, &meta).await;
                (meta, res)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (meta, res) in reads {
        match res {
            Ok(n) => {
                let t = &mut fleet.totals;
                t.nodes = t.nodes.saturating_add(1);
                t.files = t.files.saturating_add(n.files);
                t.bytes = t.bytes.saturating_add(n.bytes);
                t.pending = t.pending.saturating_add(n.pending());
                t.failing = t.failing.saturating_add(n.failing());
                let stale = now.saturating_sub(n.last_seen) > STALE_AFTER.as_secs();
                fleet.nodes.push(FleetNode { status: n, stale });
            }
            Err(e) => fleet.unreadable.push(Unreadable {
                key: destination::printable(meta.location.as_ref()),
                error: destination::printable(&format!("{e:#}")),
            }),
        }
    }
    fleet
        .nodes
        .sort_by(|a, b| a.status.node_id.cmp(&b.status.node_id));
    fleet.unreadable.sort_by(|a, b| a.key.cmp(&b.key));
    fleet.results = crate::results::fleet::read(&primary, query).await?;
    Ok(fleet)
}

/// The fleet as text. Every string from a status object has its control characters escaped:
/// node ids and errors are written by other nodes, and must not drive the terminal.
pub(crate) fn render_fleet(f: &Fleet) -> String {
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
    o.push_str(&crate::results::fleet::render_text(&f.results));
    o
}

/// The fleet as one self-contained HTML page: the nodes, and the test results with inline
/// SVG charts. Every value is escaped by the template (all of it was written by other nodes).
pub(crate) fn render_fleet_html(f: &Fleet) -> String {
    let now = now_secs();
    html! {
        (DOCTYPE)
        html {
            head {
                meta charset="utf-8";
                title { "panoptic-sync fleet" }
                style { (PreEscaped(STYLE)) (PreEscaped(TABLE_STYLE)) }
            }
            body {
                h1 { "panoptic-sync fleet" }
                p {
                    (f.totals.nodes) " nodes · " (f.totals.files) " files · " (human(f.totals.bytes))
                    " · " (f.totals.pending) " pending · " (f.totals.failing) " failing"
                }
                table {
                    thead { tr { th { "node" } th class="n" { "files" } th class="n" { "bytes" } th class="n" { "pending" } th class="n" { "failing" } th class="n" { "upload success" } th { "state" } } }
                    tbody {
                        @for FleetNode { status: n, stale } in &f.nodes {
                            tr {
                                td { (n.node_id) }
                                td class="n" { (n.files) }
                                td class="n" { (human(n.bytes)) }
                                td class="n" { (n.pending()) }
                                td class="n" { (n.failing()) }
                                td class="n" { (format!("{:.1}%", n.success_rate * 100.0)) }
                                td { @if *stale { "stale (last seen " (now.saturating_sub(n.last_seen)) " s ago)" } @else { "ok" } }
                            }
                        }
                    }
                }
                @for u in &f.unreadable { p { "unreadable status object: " (u.key) ": " (u.error) } }
                (crate::results::fleet::render_html(&f.results))
            }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_html_report_escapes_every_value_from_outside() {
        // Node ids, watch roots, file extensions and error text come from hosts, trees and
        // servers the admin does not control: each of the six places shows it escaped.
        let hostile = "<script>alert(1)</script>\"&";
        let mut d = DestReport {
            name: "primary".into(),
            ..Default::default()
        };
        d.by_type.insert(hostile.into(), Usage::default());
        d.by_root.insert(hostile.into(), Usage::default());
        d.failures.insert(hostile.into(), 3);
        let r = Report {
            node_id: hostile.into(),
            destinations: vec![d],
            recommendations: vec![hostile.into()],
            ..Default::default()
        };
        let page = render_html(&r);
        assert!(!page.contains("<script>"), "{page}");
        assert_eq!(
            page.matches("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;")
                .count(),
            6,
            "{page}"
        );
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        // SVG shapes are closed explicitly (a bare <rect> would swallow the next label).
        assert!(page.contains("</rect>"), "{page}");
    }
}
