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
    // The axis spans the days that have a point: five days of data in a 30-day window
    // would otherwise sit squeezed in its right-most sixth.
    let has = |j: usize| {
        series
            .iter()
            .any(|(_, v)| v.get(j).copied().flatten().is_some())
    };
    let (lo, hi) = match (
        (0..x.len()).find(|&j| has(j)),
        (0..x.len()).rfind(|&j| has(j)),
    ) {
        (Some(lo), Some(hi)) => (lo, hi + 1),
        _ => (0, x.len()),
    };
    let x = &x[lo..hi];
    let series: Vec<(String, Vec<Option<f64>>)> = series
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.get(lo..hi.min(v.len())).unwrap_or(&[]).to_vec(),
            )
        })
        .collect();
    let series = &series[..];
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
                @for j in label_indices(x.len()) {
                    @let anchor = if j == 0 && x.len() > 1 { "start" } else if j + 1 == x.len() && x.len() > 1 { "end" } else { "middle" };
                    text x=(format!("{:.1}", px(j))) y=(TOP + PLOT_H + 16.0) font-size="11" text-anchor=(anchor) { (x[j]) }
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
                @for j in label_indices(x.len()) {
                    text x=(format!("{:.1}", LEFT + slot * (j as f64 + 0.5))) y=(TOP + PLOT_H + 16.0) font-size="11" text-anchor="middle" { (x[j]) }
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

/// Which of `n` days get a date under the axis: about six, evenly spaced, the last always.
fn label_indices(n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let every = n.div_ceil(6).max(1);
    let mut out: Vec<usize> = (0..n).step_by(every).collect();
    if out.last() != Some(&(n - 1)) {
        // The last date replaces a label too close before it.
        if out.len() > 1 && n - 1 - out[out.len() - 1] < every.div_ceil(2) {
            out.pop();
        }
        out.push(n - 1);
    }
    out
}

/// A rate as a percentage with one decimal, or `–`.
pub(crate) fn percent(rate: Option<f64>) -> String {
    rate.map(|r| format!("{:.1}%", r * 100.0))
        .unwrap_or_else(|| "–".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_six_dates_label_an_axis() {
        assert_eq!(label_indices(0), Vec::<usize>::new());
        assert_eq!(label_indices(1), vec![0]);
        assert_eq!(label_indices(5), vec![0, 1, 2, 3, 4]);
        let l = label_indices(30);
        assert!((5..=7).contains(&l.len()), "{l:?}");
        assert_eq!((l[0], *l.last().unwrap()), (0, 29));
    }

    #[test]
    fn a_line_chart_spans_only_the_days_with_points() {
        let x: Vec<String> = (1..=30).map(|d| format!("2026-11-{d:02}")).collect();
        let mut v = vec![None; 30];
        for (j, slot) in v.iter_mut().enumerate().skip(25) {
            *slot = Some(j as f64 / 30.0);
        }
        let svg = lines("t", &x, &[("s".into(), v)], 1.0, &|v| v.to_string()).into_string();
        assert!(
            !svg.contains("2026-11-01"),
            "empty days are not on the axis"
        );
        assert!(svg.contains("2026-11-26") && svg.contains("2026-11-30"));
        // The first point sits at the left of the plot.
        assert!(svg.contains(&format!("cx=\"{LEFT:.1}\"")), "{svg}");
    }
}
