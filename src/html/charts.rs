//! Inline SVG charts for the HTML reports: no script, no external asset, every label escaped
//! by maud. Shapes are closed explicitly (a bare `<rect>` would swallow the next label when the
//! page is parsed as HTML).

use maud::{Markup, html};

/// Series colours, in order.
const COLOURS: &[&str] = &[
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04",
];
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 56.0;
const TOP: f64 = 12.0;
const PLOT_W: f64 = WIDTH - LEFT - 16.0;
const PLOT_H: f64 = HEIGHT - TOP - 40.0;

fn colour(i: usize) -> &'static str {
    COLOURS[i % COLOURS.len()]
}

/// Lines over days: `x` labels (dates), each series a name and one value per label (`None`:
/// no point that day). `y_max` is the top of the axis; `fmt` labels the axis.
pub(crate) fn lines(
    title: &str,
    x: &[String],
    series: &[(String, Vec<Option<f64>>)],
    y_max: f64,
    fmt: &dyn Fn(f64) -> String,
) -> Markup {
    let y_max = if y_max > 0.0 && y_max.is_finite() {
        y_max
    } else {
        1.0
    };
    let step = if x.len() > 1 {
        PLOT_W / (x.len() - 1) as f64
    } else {
        0.0
    };
    let px = |i: usize| {
        LEFT + if x.len() > 1 {
            step * i as f64
        } else {
            PLOT_W / 2.0
        }
    };
    let py = |v: f64| TOP + PLOT_H - (v.clamp(0.0, y_max) / y_max) * PLOT_H;
    let ticks = [0.0, 0.5, 1.0];
    let legend_h = 18 * series.len().min(12);
    html! {
        figure {
            figcaption { (title) }
            svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT as usize + legend_h)
                viewBox=(format!("0 0 {WIDTH} {}", HEIGHT as usize + legend_h)) style="max-width:100%;height:auto" role="img" {
                @for t in ticks {
                    @let y = py(t * y_max);
                    line x1=(LEFT) x2=(LEFT + PLOT_W) y1=(format!("{y:.1}")) y2=(format!("{y:.1}")) stroke="#e5e7eb" {}
                    text x=(LEFT - 6.0) y=(format!("{:.1}", y + 4.0)) font-size="11" text-anchor="end" { (fmt(t * y_max)) }
                }
                @if let Some(first) = x.first() {
                    text x=(LEFT) y=(TOP + PLOT_H + 16.0) font-size="11" { (first) }
                }
                @if x.len() > 1 {
                    @if let Some(last) = x.last() {
                        text x=(LEFT + PLOT_W) y=(TOP + PLOT_H + 16.0) font-size="11" text-anchor="end" { (last) }
                    }
                }
                @for (i, (_, values)) in series.iter().enumerate() {
                    @let points: Vec<String> = values.iter().enumerate()
                        .filter_map(|(j, v)| v.map(|v| format!("{:.1},{:.1}", px(j), py(v))))
                        .collect();
                    @if points.len() > 1 {
                        polyline points=(points.join(" ")) fill="none" stroke=(colour(i)) stroke-width="2" {}
                    }
                    @for p in &points {
                        @let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                        circle cx=(cx) cy=(cy) r="3" fill=(colour(i)) {}
                    }
                }
                @for (i, (name, _)) in series.iter().take(12).enumerate() {
                    @let y = HEIGHT + 18.0 * i as f64 - 8.0;
                    rect x=(LEFT) y=(format!("{:.1}", y - 9.0)) width="10" height="10" fill=(colour(i)) {}
                    text x=(LEFT + 16.0) y=(format!("{y:.1}")) font-size="12" { (name) }
                }
            }
        }
    }
}

/// Vertical bars per day, one bar per series side by side (e.g. original and stored bytes).
pub(crate) fn columns(
    title: &str,
    x: &[String],
    series: &[(String, Vec<u64>)],
    fmt: &dyn Fn(u64) -> String,
) -> Markup {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let slot = PLOT_W / x.len().max(1) as f64;
    let bar = (slot * 0.8 / series.len().max(1) as f64).max(1.0);
    let py = |v: u64| TOP + PLOT_H - (v as f64 / max) * PLOT_H;
    html! {
        figure {
            figcaption { (title) }
            svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT as usize + 18 * series.len())
                viewBox=(format!("0 0 {WIDTH} {}", HEIGHT as usize + 18 * series.len())) style="max-width:100%;height:auto" role="img" {
                line x1=(LEFT) x2=(LEFT + PLOT_W) y1=(TOP + PLOT_H) y2=(TOP + PLOT_H) stroke="#9ca3af" {}
                text x=(LEFT - 6.0) y=(TOP + 8.0) font-size="11" text-anchor="end" { (fmt(max as u64)) }
                text x=(LEFT - 6.0) y=(TOP + PLOT_H) font-size="11" text-anchor="end" { "0" }
                @for (j, _) in x.iter().enumerate() {
                    @for (i, (name, values)) in series.iter().enumerate() {
                        @let v = values.get(j).copied().unwrap_or(0);
                        @let bx = LEFT + slot * j as f64 + slot * 0.1 + bar * i as f64;
                        @let by = py(v);
                        rect x=(format!("{bx:.1}")) y=(format!("{by:.1}")) width=(format!("{bar:.1}"))
                            height=(format!("{:.1}", (TOP + PLOT_H - by).max(0.5))) fill=(colour(i)) {
                            title { (name) " " (x[j]) ": " (fmt(v)) }
                        }
                    }
                }
                @if let Some(first) = x.first() {
                    text x=(LEFT) y=(TOP + PLOT_H + 16.0) font-size="11" { (first) }
                }
                @if x.len() > 1 {
                    @if let Some(last) = x.last() {
                        text x=(LEFT + PLOT_W) y=(TOP + PLOT_H + 16.0) font-size="11" text-anchor="end" { (last) }
                    }
                }
                @for (i, (name, _)) in series.iter().enumerate() {
                    @let y = HEIGHT + 18.0 * i as f64 - 8.0;
                    rect x=(LEFT) y=(format!("{:.1}", y - 9.0)) width="10" height="10" fill=(colour(i)) {}
                    text x=(LEFT + 16.0) y=(format!("{y:.1}")) font-size="12" { (name) }
                }
            }
        }
    }
}

/// A rate as a percentage with one decimal, or `–`.
pub(crate) fn percent(rate: Option<f64>) -> String {
    rate.map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "–".into())
}
