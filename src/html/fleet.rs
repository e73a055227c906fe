//! The fleet's test results as HTML: success rate over time (fleet, per node, per branch, per
//! suite) as inline SVG, and tables of flaky, failing and slow tests.

use std::collections::HashMap;

use super::href::{list_href, run_href};
use crate::format::fleet::{
    BadRecord, BranchChange, Flaky, FleetResults, Flipping, Group, NodeSpecific, Outlier, TestStat,
};

/// Rate per day for each group (at most `max` groups, the ones with most runs).
fn per_day(days: &[String], groups: &[Group], max: usize) -> Vec<(String, Vec<Option<f64>>)> {
    let mut gs: Vec<&Group> = groups.iter().collect();
    gs.sort_by(|a, b| b.rates.runs.cmp(&a.rates.runs).then(a.name.cmp(&b.name)));
    gs.into_iter()
        .take(max)
        .map(|g| {
            let by: HashMap<&str, Option<f64>> = g
                .days
                .iter()
                .map(|d| (d.date.as_str(), d.rates.success_rate))
                .collect();
            (
                g.name.clone(),
                days.iter()
                    .map(|d| by.get(d.as_str()).copied().flatten())
                    .collect(),
            )
        })
        .collect()
}

/// The days on the time axis: the whole window (days without runs have no point), unless it
/// is long or unreadable, then the days with runs.
fn time_axis(r: &FleetResults) -> Vec<String> {
    let window = match (
        chrono::NaiveDate::parse_from_str(&r.from, "%Y-%m-%d"),
        chrono::NaiveDate::parse_from_str(&r.to, "%Y-%m-%d"),
    ) {
        (Ok(from), Ok(to)) if (to - from).num_days() <= 400 => from
            .iter_days()
            .take_while(|d| *d <= to)
            .map(|d| d.format("%Y-%m-%d").to_string())
            .collect(),
        _ => Vec::new(),
    };
    if window.is_empty() {
        r.days.iter().map(|d| d.date.clone()).collect()
    } else {
        window
    }
}

/// The fleet's success rate on each of `days`, as the one series of a chart.
fn fleet_per_day(r: &FleetResults, days: &[String]) -> Vec<(String, Vec<Option<f64>>)> {
    let fleet_by: HashMap<&str, Option<f64>> = r
        .days
        .iter()
        .map(|d| (d.date.as_str(), d.rates.success_rate))
        .collect();
    vec![(
        "fleet".to_string(),
        days.iter()
            .map(|d| fleet_by.get(d.as_str()).copied().flatten())
            .collect::<Vec<_>>(),
    )]
}

/// A rate as a whole percentage (the charts' axis labels).
fn pct(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

/// The heading and the totals line of the section.
fn summary(r: &FleetResults) -> maud::Markup {
    use super::charts::percent;
    use maud::html;
    html! {
        h2 { "Test results " (r.from) " – " (r.to) @if let Some(b) = &r.branch { " on branch " (b) } }
        p {
            (r.totals.runs) " runs with tests, " (r.totals.runs_passed) " passed ("
            (percent(r.totals.success_rate)) "); " (r.totals.tests) " tests, "
            (percent(r.totals.pass_rate)) " passed"
            @if r.runs_without_tests > 0 { "; " (r.runs_without_tests) " runs without tests" }
            @if r.unreadable_junit_files > 0 { "; JUnit files the nodes could not parse: " (r.unreadable_junit_files) }
        }
    }
}

/// The nodes that stand out, as recommendations (nothing when none does).
fn outliers(outliers: &[Outlier]) -> maud::Markup {
    use super::charts::percent;
    use maud::html;
    html! {
        @if !outliers.is_empty() {
            div class="recs" {
                ul {
                    @for n in outliers {
                        li { "node " (n.node) " stands out: " (percent(Some(n.failure_rate))) " of its "
                            (n.runs) " runs failed, against " (percent(Some(n.fleet_failure_rate)))
                            " for the rest of the fleet" }
                    }
                }
            }
        }
    }
}

/// The charts of the run success rate per day: the fleet's, and per node, branch and suite.
fn charts(r: &FleetResults) -> maud::Markup {
    use super::charts::lines;
    use maud::html;
    let days = time_axis(r);
    let fleet = fleet_per_day(r, &days);
    html! {
        (lines("Run success rate per day: fleet", &days, &fleet, 1.0, &pct))
        (lines("Run success rate per day, per node", &days, &per_day(&days, &r.nodes, 8), 1.0, &pct))
        (lines("Run success rate per day, per branch", &days, &per_day(&days, &r.branches, 8), 1.0, &pct))
        (lines("Run success rate per day, per suite", &days, &per_day(&days, &r.suites, 8), 1.0, &pct))
    }
}

/// A name, linked to `href` when there is a base to link from and a place to link to.
fn linked(
    text: maud::Markup,
    base: Option<&str>,
    href: impl Fn(&str) -> Option<String>,
) -> maud::Markup {
    use maud::html;
    match base.and_then(href) {
        Some(h) => html! { a href=(h) { (text) } },
        None => text,
    }
}

/// The table of rates of each group (`what`: node, branch or suite): a node links to its run
/// list, a branch to its newest run.
fn groups_table(groups: &[Group], what: &str, base: Option<&str>) -> maud::Markup {
    use super::charts::percent;
    use maud::html;
    html! {
        table {
            thead { tr { th { (what) } th class="n" { "runs" } th class="n" { "passed" } th class="n" { "success" } th class="n" { "tests" } th class="n" { "pass rate" } } }
            tbody {
                @for g in groups {
                    tr {
                        td { (linked(html! { (g.name) }, base, |b| g.latest_run.as_deref().and_then(|k| match what {
                            "node" => Some(list_href(b, k)),
                            "branch" => Some(run_href(b, k)),
                            _ => None,
                        }))) }
                        td class="n" { (g.rates.runs) }
                        td class="n" { (g.rates.runs_passed) }
                        td class="n" { (percent(g.rates.success_rate)) }
                        td class="n" { (g.rates.tests) }
                        td class="n" { (percent(g.rates.pass_rate)) }
                    }
                }
            }
        }
    }
}

/// A table of tests with their runs, failures and times; a test links to the newest run in
/// which it failed.
fn tests_table(list: &[TestStat], base: Option<&str>) -> maud::Markup {
    use super::charts::percent;
    use maud::html;
    html! {
        table {
            thead { tr { th { "test" } th { "suite" } th class="n" { "runs" } th class="n" { "failed" } th class="n" { "failure rate" } th class="n" { "mean" } th class="n" { "max" } } }
            tbody {
                @for t in list {
                    tr {
                        td { (linked(html! { (t.class) "::" (t.name) }, base, |b| t.failed_in.as_deref().map(|k| run_href(b, k)))) }
                        td { (t.suite) }
                        td class="n" { (t.runs) }
                        td class="n" { (t.failed) }
                        td class="n" { (percent(t.failure_rate)) }
                        td class="n" { (t.mean_ms) " ms" }
                        td class="n" { (t.max_ms) " ms" }
                    }
                }
            }
        }
    }
}

/// The table of flaky tests with the commits they flaked on ("none" when there are none);
/// each links to the newest run in which it failed.
fn flaky_table(flaky: &[Flaky], base: Option<&str>) -> maud::Markup {
    use maud::html;
    html! {
        @if flaky.is_empty() { p { "none" } } @else {
            table {
                thead { tr { th { "test" } th { "suite" } th class="n" { "revisions" } th { "commits" } } }
                tbody {
                    @for f in flaky {
                        tr { td { (linked(html! { (f.class) "::" (f.name) }, base, |b| f.failed_in.as_deref().map(|k| run_href(b, k)))) } td { (f.suite) } td class="n" { (f.revisions) } td { (f.commits.join(", ")) } }
                    }
                }
            }
        }
    }
}

/// Tests failing on one node far more often than on the rest ("none" when there are none).
fn node_specific_table(list: &[NodeSpecific]) -> maud::Markup {
    use super::charts::percent;
    use maud::html;
    html! {
        @if list.is_empty() { p { "none" } } @else {
            table {
                thead { tr { th { "test" } th { "node" } th class="n" { "failed there" } th class="n" { "elsewhere" } } }
                tbody {
                    @for n in list {
                        tr {
                            td { (n.class) "::" (n.name) }
                            td { (n.node) }
                            td class="n" { (n.failed) "/" (n.runs) " (" (percent(Some(n.failure_rate))) ")" }
                            td class="n" { (n.other_failed) "/" (n.other_runs) " (" (percent(Some(n.other_failure_rate))) ")" }
                        }
                    }
                }
            }
        }
    }
}

/// Tests whose state changed between a branch's last two commits ("none" when there are none).
fn changes_table(list: &[BranchChange]) -> maud::Markup {
    use maud::html;
    let short = |c: &str| c.chars().take(12).collect::<String>();
    html! {
        @if list.is_empty() { p { "none" } } @else {
            table {
                thead { tr { th { "test" } th { "branch" } th { "commit" } th { "after" } } }
                tbody {
                    @for c in list {
                        tr {
                            td { (c.class) "::" (c.name) }
                            td { (c.branch) }
                            td { code title=(c.commit) { (short(&c.commit)) } }
                            td { code title=(c.previous_commit) { (short(&c.previous_commit)) } }
                        }
                    }
                }
            }
        }
    }
}

/// Tests flipping between pass and fail on a branch ("none" when there are none).
fn flipping_table(list: &[Flipping]) -> maud::Markup {
    use super::charts::percent;
    use maud::html;
    html! {
        @if list.is_empty() { p { "none" } } @else {
            table {
                thead { tr { th { "test" } th { "branch" } th class="n" { "flips" } th class="n" { "rate" } } }
                tbody {
                    @for f in list {
                        tr {
                            td { (f.class) "::" (f.name) }
                            td { (f.branch) }
                            td class="n" { (f.flips) "/" (f.executions.saturating_sub(1)) }
                            td class="n" { (percent(Some(f.flip_rate))) }
                        }
                    }
                }
            }
        }
    }
}

/// The run records that could not be read (nothing when all could).
fn unreadable(unreadable: &[BadRecord]) -> maud::Markup {
    use maud::html;
    html! {
        @if !unreadable.is_empty() {
            h3 { "Unreadable run records" }
            ul { @for u in unreadable { li { (u.key) ": " (u.error) } } }
        }
    }
}

/// The fleet's test results as HTML: success rate over time (fleet, per node, per branch,
/// per suite) as inline SVG, and tables of flaky, failing and slow tests.
/// `base`: the way from the page to the store's root, when runs can be linked.
pub(crate) fn results(r: &FleetResults, base: Option<&str>) -> maud::Markup {
    use maud::html;
    html! {
        section {
            (summary(r))
            (outliers(&r.outlier_nodes))
            (charts(r))
            h3 { "Nodes" } (groups_table(&r.nodes, "node", base))
            h3 { "Branches" } (groups_table(&r.branches, "branch", base))
            h3 { "Suites" } (groups_table(&r.suites, "suite", base))
            h3 { "Flaky tests" } (flaky_table(&r.flaky, base))
            h3 { "Broken (failed every time on its last 3 commits)" } (tests_table(&r.broken, base))
            h3 { "Node-specific" } (node_specific_table(&r.node_specific))
            h3 { "New failures (failed on a branch's newest commit, passed on the one before)" }
            (changes_table(&r.new_failures))
            h3 { "Fixed (passed on a branch's newest commit, failed on the one before)" }
            (changes_table(&r.fixed))
            h3 { "Flipping (pass/fail changes over the last executions on a branch)" }
            (flipping_table(&r.flipping))
            h3 { "Consistently failing" } (tests_table(&r.consistently_failing, base))
            h3 { "Most often failing" } (tests_table(&r.most_failing, base))
            h3 { "Slowest (mean)" } (tests_table(&r.slowest, base))
            (unreadable(&r.unreadable))
        }
    }
}
