//! The small chart of a device's total count over time: inline SVG drawn on the server, so the
//! page needs no chart library and works without script. Built with maud like every page, so
//! the only text in it (the serial, in its label) is escaped too.

use maud::{Markup, html};
use protocol::meter::CounterReading;

use super::html::time;

const WIDTH: f64 = 160.0;
const HEIGHT: f64 = 40.0;
const PAD: f64 = 3.0;

/// The points of the line: (x, y) in the chart's box, time to the right and count upwards.
/// Readings without a numeric `total` are skipped.
pub fn points(readings: &[&CounterReading]) -> Vec<(f64, f64)> {
    let series: Vec<(i64, i64)> = readings
        .iter()
        .filter_map(|r| {
            let total = r.counters.get("total")?.as_int()?;
            Some((r.read_at.timestamp_millis(), total))
        })
        .collect();
    let (Some(t0), Some(t1)) = (
        series.iter().map(|p| p.0).min(),
        series.iter().map(|p| p.0).max(),
    ) else {
        return Vec::new();
    };
    let lo = series.iter().map(|p| p.1).min().unwrap_or(0);
    let hi = series.iter().map(|p| p.1).max().unwrap_or(0);
    let span_t = (t1 - t0).max(1) as f64;
    let span_v = (hi - lo).max(1) as f64;
    series
        .iter()
        .map(|&(t, v)| {
            let x = if t1 == t0 {
                WIDTH / 2.0
            } else {
                PAD + (t - t0) as f64 / span_t * (WIDTH - 2.0 * PAD)
            };
            let y = if hi == lo {
                HEIGHT / 2.0
            } else {
                HEIGHT - PAD - (v - lo) as f64 / span_v * (HEIGHT - 2.0 * PAD)
            };
            (x, y)
        })
        .collect()
}

/// The chart, or a short text when there is nothing to draw. The SVG has a text alternative
/// (`role="img"` and a label with the first and last count) for screen readers.
pub fn total_chart(serial: &str, readings: &[&CounterReading]) -> Markup {
    let pts = points(readings);
    let totals: Vec<(i64, &CounterReading)> = readings
        .iter()
        .filter_map(|r| Some((r.counters.get("total")?.as_int()?, *r)))
        .collect();
    let (Some(first), Some(last)) = (totals.first(), totals.last()) else {
        return html! { span.none { "no readings" } };
    };
    let label = format!(
        "{serial}: total count from {} to {} over {} readings",
        first.0,
        last.0,
        totals.len()
    );
    let line: String = pts
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ");
    html! {
        figure.chart {
            svg xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {HEIGHT}"))
                width=(WIDTH) height=(HEIGHT) role="img" aria-label=(label) {
                title { (label) }
                rect x="0" y="0" width=(WIDTH) height=(HEIGHT) fill="none" stroke="#c8ccd2" {}
                @if pts.len() > 1 {
                    polyline points=(line) fill="none" stroke="#1565c0" stroke-width="1.5" {}
                }
                @if let Some((x, y)) = pts.last() {
                    circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="2.5" fill="#1565c0" {}
                }
            }
            figcaption {
                @if totals.len() > 1 { (first.0) " → " }
                strong { (last.0) } br;
                @if totals.len() > 1 {
                    span.muted { (time(&first.1.read_at)) " – " (time(&last.1.read_at)) " UTC" }
                } @else {
                    span.muted { (time(&last.1.read_at)) " UTC" }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::data::Value;

    fn reading(minute: u32, total: i64) -> CounterReading {
        use chrono::TimeZone;
        CounterReading {
            serial: "C1".into(),
            site: String::new(),
            read_at: chrono::Utc
                .with_ymd_and_hms(2026, 11, 26, 12, minute, 0)
                .unwrap(),
            source: "report".into(),
            counters: [("total".to_owned(), Value::Int(total))].into(),
        }
    }

    #[test]
    fn time_runs_right_and_counts_run_up() {
        let rs = [reading(0, 100), reading(30, 150), reading(59, 300)];
        let refs: Vec<&CounterReading> = rs.iter().collect();
        let pts = points(&refs);
        assert_eq!(pts.len(), 3);
        assert!(pts[0].0 < pts[1].0 && pts[1].0 < pts[2].0, "{pts:?}");
        assert!(pts[0].1 > pts[1].1 && pts[1].1 > pts[2].1, "{pts:?}");
        assert!(
            pts.iter()
                .all(|&(x, y)| (0.0..=WIDTH).contains(&x) && (0.0..=HEIGHT).contains(&y))
        );
        let svg = total_chart("C1<b>", &refs).into_string();
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(
            svg.contains("C1&lt;b&gt;: total count from 100 to 300 over 3 readings"),
            "{svg}"
        );
        assert!(!svg.contains("C1<b>"), "{svg}");
    }

    #[test]
    fn no_readings_no_chart() {
        assert!(points(&[]).is_empty());
        assert!(total_chart("C1", &[]).into_string().contains("no readings"));
        let one = [reading(0, 5)];
        let refs: Vec<&CounterReading> = one.iter().collect();
        assert_eq!(points(&refs), [(WIDTH / 2.0, HEIGHT / 2.0)]);
    }
}
