//! The chart `<name>.svg` (plotters, SVG backend): two panels side by side,
//! x = number of instances, one line per routing mode. Left: total CPU µs per
//! delivered message (instances + Redis). Right: delivered messages/s, or the
//! max sustained rate with `--find-max`. Runs without derived figures are
//! left out of the lines.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::error::BenchError;
use crate::report::{is_find_max, ResultsFile};

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// One line: a mode and its (N, value) points, N ascending.
type Series = (String, Vec<(u32, f64)>);

fn series(
    results: &ResultsFile,
    value: impl Fn(&crate::derive::Derived) -> Option<f64>,
) -> Vec<Series> {
    let mut by_mode: BTreeMap<&str, Vec<(u32, f64)>> = BTreeMap::new();
    // Keep the modes in the order they were run.
    let mut order: Vec<&str> = Vec::new();
    for r in &results.runs {
        if !order.contains(&r.mode.as_str()) {
            order.push(&r.mode);
        }
        let Some(v) = r.derived.as_ref().and_then(&value) else {
            continue;
        };
        if v.is_finite() {
            let n = u32::try_from(r.nodes).unwrap_or(u32::MAX);
            by_mode.entry(&r.mode).or_default().push((n, v));
        }
    }
    order
        .into_iter()
        .map(|mode| {
            let mut points = by_mode.remove(mode).unwrap_or_default();
            points.sort_by_key(|(n, _)| *n);
            (mode.to_owned(), points)
        })
        .collect()
}

/// Writes the two-panel chart.
pub fn write_svg(results: &ResultsFile, path: &Path) -> Result<(), BenchError> {
    let find_max = is_find_max(results);
    let cpu = series(results, |d| d.total_cpu_us_per_msg);
    let rate = series(results, |d| {
        if find_max {
            d.max_sustained_rate
        } else {
            Some(d.delivered_per_sec)
        }
    });
    let max_n = results.runs.iter().map(|r| r.nodes).max().unwrap_or(1);
    let max_n = u32::try_from(max_n).unwrap_or(64);
    let config = |key: &str| match results.config.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "?".to_owned(),
    };
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let (title_area, body) = root.split_vertically(40);
        title_area.titled(
            &format!(
                "Switchboard {} — workload {}, {} users, {} {}/s, {} s{}",
                results.name,
                config("workload"),
                config("users"),
                if find_max { "ladder from" } else { "offered" },
                config("rate"),
                config("duration"),
                if find_max { " per step" } else { "" },
            ),
            ("sans-serif", 20),
        )?;
        let (left, right) = body.split_horizontally(600);
        panel(
            &left,
            "CPU per delivered message (instances + Redis)",
            "µs per message",
            &cpu,
            max_n,
        )?;
        panel(
            &right,
            if find_max {
                "Max sustained rate"
            } else {
                "Delivered messages per second"
            },
            "messages / s",
            &rate,
            max_n,
        )?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| BenchError::Report(format!("plot {}: {e}", path.display())))
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    lines: &[Series],
    max_n: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let y_max = lines
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(_, v)| *v))
        .fold(0.0_f64, f64::max);
    let y_top = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0u32..max_n + 1, 0.0..y_top)?;
    chart
        .configure_mesh()
        .x_desc("instances (N)")
        .y_desc(y_desc)
        .x_labels((max_n + 2) as usize)
        .y_label_formatter(&|v| {
            if y_top >= 20_000.0 {
                format!("{:.0}k", v / 1000.0)
            } else if y_top >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if lines.iter().all(|(_, pts)| pts.is_empty()) {
        chart.draw_series(std::iter::once(Text::new(
            "no data",
            (max_n.div_ceil(2), y_top / 2.0),
            ("sans-serif", 18),
        )))?;
        return Ok(());
    }
    // Earlier lines are drawn wider, so a line that coincides with a later
    // one still shows as a coloured rim around it.
    let count = lines.len() as u32;
    for (i, (mode, points)) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let wider = 2 * (count - 1 - i as u32).min(3);
        let width = 2 + wider;
        let radius = 4 + wider;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(width),
            ))?
            .label(mode.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .iter()
                .map(move |&(n, v)| Circle::new((n, v), radius, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}
