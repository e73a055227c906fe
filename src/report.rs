//! Reports: storage and performance analytics from the local index, with recommendations
//! computed from the data; the node status object each node publishes to its primary
//! (`_panoptic-sync/nodes/<node_id>.json`); and the fleet view, read from the bucket alone.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;

use crate::config::Config;
use crate::destination::{self, Destination};
use crate::format::layout::Compression;
use crate::format::report::{
    Backlog, DayUsage, DestReport, Fleet, FleetNode, Report, TestDay, Unreadable, Usage,
};
use crate::format::units::{human, now_secs};
use crate::index::{DestStatus, Index, Method};
use crate::node_status::read_status;

/// Where node status objects live, under the primary's base.
pub(crate) use crate::format::layout::NODES_PREFIX;
/// A node not seen for this long is flagged stale.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(600);

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
    let prefixes = watch_prefixes(config);
    let now_ms = crate::format::units::now_ms();
    let mut report = Report {
        node_id: config.node_id.clone(),
        generated_at: now_secs(),
        files: status.files,
        bytes: status.bytes,
        ..Default::default()
    };
    for (name, st) in names.iter().zip(&status.destinations) {
        let d = dest_report(index, name, st, &prefixes, now_ms)?;
        report.destinations.push(d);
    }
    report.recommendations = recommend(config, &report);
    report.runs = crate::runs::latest(config, index, REPORT_RUNS)?;
    report.test_days = test_days(config, index)?;
    Ok(report)
}

/// The watches' key prefixes on this node (`{node}` filled in), which group usage by root.
fn watch_prefixes(config: &Config) -> Vec<String> {
    config
        .watch
        .iter()
        .map(|w| w.prefix.replace("{node}", &config.node_id))
        .collect()
}

/// One destination's report: backlog, usage, days, latency, throughput and failures.
fn dest_report(
    index: &Index,
    name: &str,
    st: &DestStatus,
    prefixes: &[String],
    now_ms: i64,
) -> anyhow::Result<DestReport> {
    let mut d = DestReport {
        name: name.to_string(),
        backlog: Backlog {
            pending: st.pending,
            failing: st.failing,
            oldest_pending_secs: st.oldest_pending_secs,
        },
        ..Default::default()
    };
    let days = tally_objects(index, name, &mut d, prefixes, now_ms)?;
    let lat_days = latencies_by_day(index, name)?;
    push_days(&mut d, days, lat_days);
    let lat = index.latencies_ms(name)?;
    if !lat.is_empty() {
        d.latency_ms = [
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
        ];
    }
    let span = index.upload_span(name)?;
    if let (Some(a), Some(b)) = (span.first_ms, span.last_ms) {
        let secs = ((b - a).max(1000) as f64) / 1000.0;
        d.throughput_bytes_per_sec = (span.stored_bytes as f64 / secs) as u64;
    }
    for e in index.current_errors(name)? {
        *d.failures.entry(cause_of(&e.error)).or_default() += e.files;
    }
    Ok(d)
}

/// Count `name`'s stored objects into `d` (usage by type, by root, last 24 h, savings) and
/// return their usage per day, by date (each day's date and running total not yet set).
fn tally_objects(
    index: &Index,
    name: &str,
    d: &mut DestReport,
    prefixes: &[String],
    now_ms: i64,
) -> anyhow::Result<BTreeMap<String, DayUsage>> {
    let mut days: BTreeMap<String, DayUsage> = BTreeMap::new();
    index.each_object_of(name, |o| {
        let day = days
            .entry(crate::format::record::date_of(o.stored_ms))
            .or_default();
        day.objects += 1;
        let stored = o.sent_bytes();
        day.bytes_original = day.bytes_original.saturating_add(o.size);
        day.bytes_stored = day.bytes_stored.saturating_add(stored);
        if o.method.is_some_and(Method::deduplicated) {
            day.deduplicated += 1;
        } else {
            day.uploads += 1;
        }
        let add = |u: &mut Usage| {
            u.objects += 1;
            u.bytes_original += o.size;
            u.bytes_stored += stored;
        };
        add(&mut d.usage);
        add(d.by_type.entry(ext_of(&o.stored_key)).or_default());
        add(d.by_root.entry(watch_root(&o.key, prefixes)).or_default());
        if now_ms - o.stored_ms < 86_400_000 {
            add(&mut d.stored_last_24h);
        }
        if o.method.is_some_and(Method::deduplicated) {
            d.dedup_saved_bytes += o.size;
        } else {
            d.compression_saved_bytes += o.size.saturating_sub(o.encoded_bytes());
        }
    })?;
    Ok(days)
}

/// The watch prefix `key` lies under (the longest; `(root)` for an empty prefix), or `(other)`.
fn watch_root(key: &str, prefixes: &[String]) -> String {
    prefixes
        .iter()
        .filter(|p| p.is_empty() || key.starts_with(&format!("{p}/")))
        .max_by_key(|p| p.len())
        .map(|p| {
            if p.is_empty() {
                "(root)".into()
            } else {
                p.clone()
            }
        })
        .unwrap_or_else(|| "(other)".into())
}

/// `name`'s upload latencies (ms), grouped by the date each upload finished.
fn latencies_by_day(index: &Index, name: &str) -> anyhow::Result<BTreeMap<String, Vec<i64>>> {
    let mut lat_days: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    index.latencies_by_time(name, |done_ms, ms| {
        lat_days
            .entry(crate::format::record::date_of(done_ms))
            .or_default()
            .push(ms);
    })?;
    Ok(lat_days)
}

/// Append the days to `d.days` in date order, with the running stored total and that day's
/// p50/p90 upload latency.
fn push_days(
    d: &mut DestReport,
    days: BTreeMap<String, DayUsage>,
    mut lat_days: BTreeMap<String, Vec<i64>>,
) {
    let mut total = 0u64;
    for (date, mut day) in days {
        total = total.saturating_add(day.bytes_stored);
        day.date = date;
        day.bytes_stored_total = total;
        if let Some(l) = lat_days.get_mut(&day.date) {
            l.sort_unstable();
            day.latency_ms = [percentile(l, 0.5), percentile(l, 0.9)];
        }
        d.days.push(day);
    }
}

/// The `p` quantile of non-empty, sorted latencies (ms; a negative one counts as 0).
fn percentile(sorted: &[i64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].max(0) as u64
}

/// Test totals per day of the sealed runs that ran tests, by date.
fn test_days(config: &Config, index: &Index) -> anyhow::Result<Vec<TestDay>> {
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
    Ok(test_days
        .into_iter()
        .map(|(date, d)| TestDay { date, ..d })
        .collect())
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

/// Read every node status object and the window's run records from the primary.
pub(crate) async fn fleet(
    config: &Config,
    query: &crate::results::fleet::Query,
) -> anyhow::Result<Fleet> {
    let primary = destination::open_primary(config)?;
    fleet_in(&primary, query).await
}

/// Read every node status object and the window's run records from `primary`.
pub(crate) async fn fleet_in(
    primary: &Destination,
    query: &crate::results::fleet::Query,
) -> anyhow::Result<Fleet> {
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
        .map(|meta| async move {
            let res = read_status(primary, &meta).await;
            (meta, res)
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
    fleet.results = crate::results::fleet::read(primary, query).await?;
    Ok(fleet)
}

/// Store the fleet page in `primary` at `_panoptic-sync/fleet/index.html`, linked to the runs (two directories
/// below the store's root). Returns its key.
pub(crate) async fn publish_fleet(primary: &Destination, fleet: &Fleet) -> anyhow::Result<String> {
    use object_store::{Attribute, Attributes, PutOptions, PutPayload};
    let page = crate::html::report::fleet_page(fleet, Some("../../"));
    let location = primary.path(crate::format::layout::FLEET_PAGE)?;
    let mut attributes = Attributes::new();
    if primary.supports_attributes {
        attributes.insert(Attribute::ContentType, "text/html; charset=utf-8".into());
        attributes.insert(Attribute::CacheControl, "no-cache".into());
    }
    let opts = PutOptions {
        attributes,
        ..Default::default()
    };
    primary
        .store
        .put_opts(&location, PutPayload::from(page.into_bytes()), opts)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "writing the fleet page {location} to {}: {}",
                primary.name,
                destination::error_chain(&e)
            )
        })?;
    Ok(crate::format::layout::FLEET_PAGE.to_string())
}
