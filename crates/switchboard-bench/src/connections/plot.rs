//! The chart of a connections run (`<name>.svg`, plotters' SVG backend):
//! three panels side by side. KiB per connection (total and marginal)
//! against the connections on the instance; the instance's RSS over the
//! seconds after every client was told to close, with the baseline; and, for
//! a storm, the clients back on the survivors over the seconds after the
//! kill, with the bound. A phase that did not run draws "no data".

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::record::ConnectionsResults;
use crate::error::BenchError;
use crate::plot::PALETTE;

/// One line: its label and points.
type Line = (String, Vec<(f64, f64)>);

/// Writes the chart.
pub fn write_svg(r: &ConnectionsResults, path: &Path) -> Result<(), BenchError> {
    let mut per_connection: Vec<Line> = Vec::new();
    let mut after_close: Vec<Line> = Vec::new();
    let mut after_marks: Vec<(f64, String)> = Vec::new();
    if let Some(p) = &r.scale {
        let steps = &p.result.steps;
        let total = steps
            .iter()
            .filter_map(|s| Some((s.connections, s.total_kib_per_connection?)))
            .collect();
        let marginal = steps
            .iter()
            .filter_map(|s| Some((s.connections, s.marginal_kib_per_connection?)))
            .collect();
        per_connection.push(("(RSS - baseline) / connections".into(), total));
        per_connection.push(("marginal: per connection added".into(), marginal));
        if let Some(after) = &p.result.after_close {
            let rss = after
                .samples
                .iter()
                .filter_map(|s| Some((s.t_s, s.memory?.rss_kib as f64 / 1024.0)))
                .collect::<Vec<_>>();
            if let (Some(base), Some(last)) = (p.result.baseline, rss.last()) {
                after_close.push((
                    "baseline".into(),
                    vec![
                        (0.0, base.rss_kib as f64 / 1024.0),
                        (last.0, base.rss_kib as f64 / 1024.0),
                    ],
                ));
            }
            after_close.insert(0, ("RSS".into(), rss));
            if let Some(t) = after.closed_after_s {
                after_marks.push((t, "no connection left".into()));
            }
        }
    }
    let mut storm: Vec<Line> = Vec::new();
    let mut storm_marks: Vec<(f64, String)> = Vec::new();
    if let Some(p) = &r.storm {
        let s = &p.result;
        storm.push((
            format!("clients on {}", s.survivors.join(" + ")),
            s.timeline
                .iter()
                .map(|pt| (pt.t_s, pt.survivors_connections))
                .collect(),
        ));
        if let Some(c) = s.connections_on_victim {
            let end = s.timeline.last().map_or(1.0, |pt| pt.t_s);
            storm.push((
                format!("held by {} before", s.victim),
                vec![(0.0, c), (end, c)],
            ));
        }
        let bound = r
            .config
            .get("storm_within_s")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(5.0);
        storm_marks.push((bound, format!("{bound} s bound")));
    }

    let root = SVGBackend::new(path, (1800, 560)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let (title, body) = root.split_vertically(40);
        title.titled(
            &format!("Switchboard {} — idle connections", r.name),
            ("sans-serif", 20),
        )?;
        let panels = body.split_evenly((1, 3));
        let [memory_area, close_area, storm_area] = panels.as_slice() else {
            return Err("a 1 x 3 split did not give three panels".into());
        };
        panel(
            memory_area,
            "Instance memory per idle connection",
            "connections on the instance",
            "KiB per connection",
            &per_connection,
            &[],
        )?;
        panel(
            close_area,
            "Instance RSS after every client closed",
            "seconds since the clients were told to close",
            "MiB",
            &after_close,
            &after_marks,
        )?;
        panel(
            storm_area,
            "Reconnect storm: clients back on the survivors",
            "seconds since the kill",
            "connections",
            &storm,
            &storm_marks,
        )?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| BenchError::Report(format!("plot {}: {e}", path.display())))
}

/// One panel: lines with points, and dashed vertical marks.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    marks: &[(f64, String)],
) -> Result<(), Box<dyn std::error::Error>> {
    let points = || lines.iter().flat_map(|(_, pts)| pts.iter().copied());
    let x_max = points()
        .map(|(x, _)| x)
        .chain(marks.iter().map(|(x, _)| *x))
        .fold(0.0_f64, f64::max);
    let y_max = points().map(|(_, y)| y).fold(0.0_f64, f64::max);
    let x_top = if x_max > 0.0 { x_max * 1.05 } else { 1.0 };
    let y_top = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_top, 0.0..y_top)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| label(*v, x_top))
        .y_label_formatter(&|v| label(*v, y_top))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if lines.iter().all(|(_, pts)| pts.is_empty()) {
        chart.draw_series(std::iter::once(Text::new(
            "no data",
            (x_top / 2.0, y_top / 2.0),
            ("sans-serif", 18),
        )))?;
        return Ok(());
    }
    for (i, (label, pts)) in lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        if pts.len() <= 20 {
            chart.draw_series(
                pts.iter()
                    .map(move |&(x, y)| Circle::new((x, y), 4, color.filled())),
            )?;
        }
    }
    for (x, label) in marks {
        chart.draw_series(DashedLineSeries::new(
            [(*x, 0.0), (*x, y_top)],
            6,
            4,
            BLACK.stroke_width(1),
        ))?;
        // Left of the mark, so a mark at the right edge keeps its label.
        let style =
            TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Right, VPos::Top));
        chart.draw_series(std::iter::once(Text::new(
            format!("{label} "),
            (*x, y_top * 0.98),
            style,
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// An axis label with as many digits as the axis' range needs.
fn label(v: f64, top: f64) -> String {
    if top >= 20_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if top >= 2_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if top >= 20.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_keep_the_digits_that_tell_ticks_apart() {
        assert_eq!(label(19_000.0, 20_000.0), "19k");
        assert_eq!(label(1_500.0, 5_250.0), "1.5k");
        assert_eq!(label(40.0, 57.0), "40");
        assert_eq!(label(0.5, 5.3), "0.5");
    }
}
