//! The node report and the fleet view as self-contained HTML pages (`report --html`,
//! `report --fleet --html`): inline SVG charts, every value escaped by the template (node ids,
//! roots, names and errors come from hosts and trees the admin does not control).

use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::format::report::{DestReport, Fleet, FleetNode, Report};
use crate::format::units::{human, now_secs};

use super::charts;

/// The page's style sheet (static, no user data).
/// Wide tables scroll inside their own box and long names wrap, so no page is wider than
/// the screen (checked in Chromium at 1280 and 390 px by the browse tests).
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;\
     padding:0 1em;color:#111}figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}\
     svg{max-width:100%;height:auto}.recs{background:#fef9c3;padding:.5em 1.5em;border-radius:6px}";

/// Tables of the fleet page (static).
const TABLE_STYLE: &str = "table{border-collapse:collapse;display:block;overflow-x:auto;\
     max-width:100%;margin:.5em 0 1em}td,th{text-align:left;padding:.15em .6em;\
     border-bottom:1px solid #eee;overflow-wrap:anywhere}td.n,th.n{text-align:right}";

/// Horizontal bars as inline SVG: (label, value, text shown).
fn bars(title: &str, items: &[(String, u64, String)]) -> Markup {
    let max = items.iter().map(|i| i.1).max().unwrap_or(1).max(1) as f64;
    let height = 24 * items.len() + 30;
    html! {
        figure {
            figcaption { (title) }
            svg xmlns="http://www.w3.org/2000/svg" width="720" height=(height)
                viewBox=(format!("0 0 720 {height}")) role="img" {
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
pub(crate) fn node_page(r: &Report) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "panoptic-sync report: " (r.node_id) }
                style { (PreEscaped(STYLE)) (PreEscaped(TABLE_STYLE)) }
            }
            body {
                h1 { "panoptic-sync report: " (r.node_id) }
                p { (r.files) " files, " (human(r.bytes)) " indexed" }
                @if !r.recommendations.is_empty() {
                    div class="recs" {
                        h2 { "Recommendations" }
                        ul { @for rec in &r.recommendations { li { (rec) } } }
                    }
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

/// The fleet as one self-contained HTML page: the nodes, and the test results with inline
/// SVG charts. Every value is escaped by the template (all of it was written by other nodes).
/// `base`: the way from the page to the store's root (`/` on `serve`, `../../` where
/// `report --fleet --publish` stores it), so tests, nodes and branches link to runs.
pub(crate) fn fleet_page(f: &Fleet, base: Option<&str>) -> String {
    let now = now_secs();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
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
                            @let runs_at = f.results.nodes.iter().find(|g| g.name == n.node_id).and_then(|g| g.latest_run.as_deref());
                            tr {
                                td {
                                    @match (base, runs_at) {
                                        (Some(b), Some(k)) => a href=(super::href::list_href(b, k)) { (n.node_id) },
                                        _ => (n.node_id),
                                    }
                                }
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
                (storage_table(f))
                @for u in &f.unreadable { p { "unreadable status object: " (u.key) ": " (u.error) } }
                (super::fleet::results(&f.results, base))
            }
        }
    }
    .into_string()
}

/// Storage per node and destination (from each node's status object): original bytes, bytes
/// stored, saved by dedup; a total row per destination.
fn storage_table(f: &Fleet) -> maud::Markup {
    let mut totals: std::collections::BTreeMap<&str, (u64, u64, u64)> = Default::default();
    for FleetNode { status: n, .. } in &f.nodes {
        for d in &n.destinations {
            let t = totals.entry(d.name.as_str()).or_default();
            t.0 = t.0.saturating_add(d.logical_bytes);
            t.1 = t.1.saturating_add(d.stored_bytes);
            t.2 = t.2.saturating_add(d.dedup_saved_bytes);
        }
    }
    html! {
        h2 { "Storage" }
        table {
            thead { tr { th { "node" } th { "destination" } th class="n" { "files' bytes" } th class="n" { "stored" } th class="n" { "saved by dedup" } } }
            tbody {
                @for FleetNode { status: n, .. } in &f.nodes {
                    @for d in &n.destinations {
                        tr {
                            td { (n.node_id) } td { (d.name) }
                            td class="n" { (human(d.logical_bytes)) }
                            td class="n" { (human(d.stored_bytes)) }
                            td class="n" { (human(d.dedup_saved_bytes)) }
                        }
                    }
                }
                @for (name, (logical, stored, saved)) in &totals {
                    tr {
                        td { b { "all nodes" } } td { (name) }
                        td class="n" { (human(*logical)) }
                        td class="n" { (human(*stored)) }
                        td class="n" { (human(*saved)) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::report::Usage;

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
        let page = node_page(&r);
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
