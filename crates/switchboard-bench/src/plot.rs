//! The chart `<name>.svg` (plotters, SVG backend): four panels, x = number
//! of instances, one line per row name (Switchboard's routing modes and the
//! Socket.IO peer's `socketio-classic` / `socketio-sharded`). They answer
//! "what does routing save": total CPU µs per delivered message (instances +
//! Redis), bus messages received per instance per delivered message, Redis
//! output bytes per delivered message; the fourth shows what was carried
//! (delivered messages/s, or the max sustained rate with `--find-max`). Runs
//! without derived figures are left out of the lines.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::error::BenchError;
use crate::report::{config_str, first_rate, is_find_max, ResultsFile};

pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// One line: a row name (mode) and its (N, value) points, N ascending.
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

/// Writes the four-panel chart.
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
    let config = |key: &str| config_str(results, key);
    let bus = series(results, |d| d.bus_rx_per_instance_per_msg_mean);
    let redis_out = series(results, |d| d.redis_out_bytes_per_msg);
    let root = SVGBackend::new(path, (1200, 960)).into_drawing_area();
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
                first_rate(results),
                config("duration"),
                if find_max { " per step" } else { "" },
            ),
            ("sans-serif", 20),
        )?;
        let panels = body.split_evenly((2, 2));
        let [cpu_area, bus_area, redis_area, rate_area] = panels.as_slice() else {
            return Err("a 2 x 2 split did not give four panels".into());
        };
        panel(
            cpu_area,
            "CPU per delivered message (instances + Redis)",
            "µs per message",
            &cpu,
            max_n,
        )?;
        panel(
            bus_area,
            "Bus messages received per instance per delivered message",
            "messages (mean over instances)",
            &bus,
            max_n,
        )?;
        panel(
            redis_area,
            "Redis output per delivered message",
            "bytes per message",
            &redis_out,
            max_n,
        )?;
        panel(
            rate_area,
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

/// The corner of a panel the lines cross least, for the legend: each line is
/// sampled along its segments and the samples in each corner region counted.
fn legend_corner(lines: &[Series], max_n: u32, y_top: f64) -> SeriesLabelPosition {
    let x_span = f64::from(max_n + 1);
    let mut samples = Vec::new();
    for (_, points) in lines {
        for pair in points.windows(2) {
            let ((n0, v0), (n1, v1)) = (pair[0], pair[1]);
            for k in 0..=10 {
                let t = f64::from(k) / 10.0;
                let x = f64::from(n0) + t * (f64::from(n1) - f64::from(n0));
                samples.push((x / x_span, (v0 + t * (v1 - v0)) / y_top));
            }
        }
        samples.extend(
            points
                .iter()
                .map(|&(n, v)| (f64::from(n) / x_span, v / y_top)),
        );
    }
    let corners = [
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let crossings = |right: bool, upper: bool| {
        samples
            .iter()
            .filter(|&&(x, y)| {
                let in_x = if right { x > 0.55 } else { x < 0.45 };
                let in_y = if upper { y > 0.6 } else { y < 0.4 };
                in_x && in_y
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|&(_, right, upper)| crossings(right, upper))
        .map_or(SeriesLabelPosition::UpperLeft, |(corner, _, _)| corner)
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
            } else if y_top < 2.0 {
                format!("{v:.2}")
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
        .position(legend_corner(lines, max_n, y_top))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::derive::Derived;
    use crate::report::Machine;
    use crate::run::RunRecord;

    fn run(mode: &str, nodes: usize, cpu: f64, bus: f64, redis_out: f64) -> RunRecord {
        RunRecord {
            mode: mode.to_owned(),
            nodes,
            status: "ok".to_owned(),
            error: None,
            wall_s: 1.0,
            redis_port: None,
            redis_cluster: None,
            instance_ports: Vec::new(),
            instance_command: Vec::new(),
            loader_command: Vec::new(),
            loader_exit: None,
            window_start: None,
            connections_at_start: None,
            window_end: None,
            before: None,
            after: None,
            loader: None,
            derived: Some(Derived {
                total_cpu_us_per_msg: Some(cpu),
                bus_rx_per_instance_per_msg_mean: Some(bus),
                redis_out_bytes_per_msg: Some(redis_out),
                delivered_per_sec: 1000.0,
                ..Derived::default()
            }),
            timeline: Vec::new(),
            processes: Vec::new(),
            logs_dir: PathBuf::new(),
        }
    }

    #[test]
    fn chart_shows_what_routing_saves_per_mode_and_peer_against_n() {
        let results = ResultsFile {
            schema: crate::report::SCHEMA.to_owned(),
            name: "chart-test".to_owned(),
            command: String::new(),
            started_utc: String::new(),
            finished_utc: String::new(),
            machine: Machine::default(),
            config: serde_json::json!({
                "workload": "dm", "users": 200, "rate": 1000, "duration": 3.0, "find_max": false
            }),
            window: String::new(),
            pass_rule: String::new(),
            interrupted: false,
            merged_from: Vec::new(),
            runs: vec![
                run("routed", 1, 50.0, 0.0, 4.0),
                run("routed", 2, 60.0, 0.25, 105.0),
                run("broadcast", 1, 49.0, 1.0, 190.0),
                run("broadcast", 2, 61.0, 1.0, 375.0),
                run("socketio-classic", 1, 120.0, 1.0, 230.0),
                run("socketio-classic", 2, 130.0, 1.0, 460.0),
                run("socketio-sharded", 1, 118.0, 1.0, 155.0),
                run("socketio-sharded", 2, 125.0, 0.5, 155.0),
            ],
        };
        let path = std::env::temp_dir().join(format!(
            "switchboard-bench-chart-test-{}.svg",
            std::process::id()
        ));
        write_svg(&results, &path).expect("chart written");
        let svg = std::fs::read_to_string(&path).expect("chart readable");
        let _ = std::fs::remove_file(&path);
        for caption in [
            "CPU per delivered message",
            "Bus messages received per instance per delivered message",
            "Redis output per delivered message",
            "Delivered messages per second",
            "routed",
            "broadcast",
            "socketio-classic",
            "socketio-sharded",
        ] {
            assert!(svg.contains(caption), "no {caption:?} in the chart");
        }
    }

    #[test]
    fn legend_goes_where_the_lines_are_not() {
        // High on the left, low on the right: the upper right is empty.
        let falling = vec![("a".to_owned(), vec![(1, 10.0), (8, 1.0)])];
        assert!(matches!(
            legend_corner(&falling, 8, 11.0),
            SeriesLabelPosition::UpperRight
        ));
        // Rising: the upper left is empty.
        let rising = vec![("a".to_owned(), vec![(1, 1.0), (8, 10.0)])];
        assert!(matches!(
            legend_corner(&rising, 8, 11.0),
            SeriesLabelPosition::UpperLeft
        ));
    }
}
