//! The Markdown and the chart of an ingest results file: one table row per
//! (N, source) with records/s (and its ratio to the http row of the same
//! N), latency, loss, and CPU per record of every process; then per row
//! the counters' checks and warnings; then how everything was measured.
//! The chart is records/s per row, a bar each.

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;

use super::{IngestRecord, IngestResults};
use crate::error::BenchError;
use crate::plot::PALETTE;
use crate::report::setting;

/// A figure with `digits` decimals, or `–`.
pub fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// records/s of the http row with the same N, if it ran.
fn http_rate(r: &IngestResults, nodes: usize) -> Option<f64> {
    r.runs
        .iter()
        .find(|run| run.source == "http" && run.nodes == nodes)
        .and_then(|run| run.figures.as_ref())
        .map(|f| f.records_per_s)
        .filter(|&v| v > 0.0)
}

/// The whole report.
pub fn markdown(r: &IngestResults) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Queue ingestion end to end: `{}`\n", r.name);
    let _ = writeln!(s, "```sh\n{}\n```\n", r.command);
    let m = &r.machine;
    let first3 = |text: &str| {
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        s,
        "{} to {} · {} CPUs ({}) · {} · {} · Tansu {} · git {}{}\n",
        r.started_utc,
        r.finished_utc,
        m.nproc,
        m.cpu_model,
        first3(&m.kernel),
        first3(&m.redis_version),
        r.tansu_version.as_deref().unwrap_or("–"),
        m.git_revision.as_deref().unwrap_or("?"),
        if r.interrupted {
            " · **interrupted**"
        } else {
            ""
        }
    );
    let c = &r.config;
    let _ = writeln!(
        s,
        "Server: `{}` ({} bytes, modified {} unix s); `--ingest-inflight` {}.\n",
        r.server.path.display(),
        r.server.bytes,
        r.server.modified_unix_s,
        match (r.server.lists_ingest_inflight, r.server.ingest_inflight) {
            (false, _) => "not in its --help (one record at a time per consumer)".to_owned(),
            (true, None) => "listed, not passed (the server's default)".to_owned(),
            (true, Some(n)) => format!("{n}"),
        }
    );
    let _ = writeln!(
        s,
        "{} records per row, {} users (one connection each, round robin over the instances); \
         kafka: {} partitions; http: {} publishes in flight; stream: XADD batches of {}.\n",
        setting(c, "records"),
        setting(c, "users"),
        setting(c, "kafka_partitions"),
        setting(c, "publish_inflight"),
        setting(c, "xadd_batch"),
    );
    let _ = writeln!(
        s,
        "| source | N | records/s | × http | window s | latency p50 / p99 / max ms | delivered / records | \
         dup | order | instances µs/record | Redis µs/record | Tansu µs/record | all servers µs/record | \
         bench µs/record | other CPU-s | verdict |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for run in &r.runs {
        row(&mut s, r, run);
    }
    s.push('\n');
    for run in &r.runs {
        details(&mut s, run);
    }
    let _ = writeln!(s, "## Method\n");
    for line in &r.method {
        let _ = writeln!(s, "- {line}");
    }
    s
}

fn row(s: &mut String, r: &IngestResults, run: &IngestRecord) {
    let Some(f) = &run.figures else {
        let _ = writeln!(
            s,
            "| {} | {} | {}: {} |  |  |  |  |  |  |  |  |  |  |  |  |  |",
            run.source,
            run.nodes,
            run.status,
            run.error.as_deref().unwrap_or("").replace('\n', " ")
        );
        return;
    };
    let ratio = http_rate(r, run.nodes)
        .filter(|_| run.source != "http")
        .map(|h| f.records_per_s / h);
    let servers = f
        .instance_cpu_us_per_record
        .zip(f.redis_cpu_us_per_record)
        .map(|(i, r)| i + r + f.tansu_cpu_us_per_record.unwrap_or(0.0));
    let _ = writeln!(
        s,
        "| {} | {} | {:.0} | {} | {:.2} | {} / {} / {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        run.source,
        run.nodes,
        f.records_per_s,
        opt(ratio, 2),
        f.window_s,
        opt(f.latency_ms.p50, 1),
        opt(f.latency_ms.p99, 1),
        opt(f.latency_ms.max, 1),
        f.delivered,
        f.records,
        f.duplicates,
        f.order_violations,
        opt(f.instance_cpu_us_per_record, 1),
        opt(f.redis_cpu_us_per_record, 1),
        opt(f.tansu_cpu_us_per_record, 1),
        opt(servers, 1),
        opt(f.bench_cpu_us_per_record, 1),
        opt(f.other_cpu_s, 2),
        if f.pass { "PASS" } else { "**FAIL**" },
    );
}

fn details(s: &mut String, run: &IngestRecord) {
    let _ = writeln!(s, "### {} N={}\n", run.source, run.nodes);
    if let Some(e) = &run.error {
        let _ = writeln!(s, "Error: `{}`\n", e.replace('\n', " "));
    }
    if !run.kafka_assignment.is_empty() {
        let parts: Vec<String> = run
            .kafka_assignment
            .iter()
            .map(|(id, p)| format!("{id} {p:?}"))
            .collect();
        let _ = writeln!(
            s,
            "Partitions when producing started: {} ({} s after the instances were ready).\n",
            parts.join(", "),
            opt(run.kafka_assignment_s, 1)
        );
    }
    let Some(f) = &run.figures else {
        return;
    };
    let _ = writeln!(
        s,
        "Produced in {:.2} s ({} accepted); CPU interval {:.2} s: instances {} s, Redis {} s, \
         Tansu {} s, benchmark {} s; Redis commands per record {}.\n",
        f.produce_s,
        f.accepted,
        f.cpu_window_s,
        opt(f.instance_cpu_s, 2),
        opt(f.redis_cpu_s, 2),
        opt(f.tansu_cpu_s, 2),
        opt(f.bench_cpu_s, 2),
        opt(f.redis_commands_per_record, 2),
    );
    let counters: Vec<String> = f
        .ingest_counters
        .iter()
        .filter(|(_, v)| **v != 0.0)
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect();
    let _ = writeln!(
        s,
        "Counters over the window: ingest {}; API publishes {:.0}.\n",
        if counters.is_empty() {
            "none".to_owned()
        } else {
            counters.join(", ")
        },
        f.api_publishes
    );
    for c in &f.checks {
        let _ = writeln!(
            s,
            "- {} {}: expected {}, measured {}",
            if c.ok { "✓" } else { "✗" },
            c.what,
            c.expected,
            c.measured
        );
    }
    for w in &f.warnings {
        let _ = writeln!(s, "- warning: {w}");
    }
    s.push('\n');
}

/// Writes the chart: records/s per row, a bar each, coloured by source.
pub fn write_svg(r: &IngestResults, path: &Path) -> Result<(), BenchError> {
    let bars: Vec<(String, usize, f64)> = r
        .runs
        .iter()
        .map(|run| {
            let source = match run.source.as_str() {
                "stream" => 0,
                "kafka" => 1,
                _ => 2,
            };
            (
                format!("{} N={}", run.source, run.nodes),
                source,
                run.figures.as_ref().map_or(0.0, |f| f.records_per_s),
            )
        })
        .collect();
    let top = bars.iter().map(|b| b.2).fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let width = (200 + 110 * bars.len() as u32).max(600);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let n = bars.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Switchboard {}: records/s end to end", r.name),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..n, 0.0..top)?;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&|v| {
                let i = v.floor() as usize;
                if (v - i as f64 - 0.5).abs() < 0.26 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("records/s (R / first available → last delivered)")
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, source, v))| {
            let x = i as f64;
            Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *v)],
                PALETTE[*source % PALETTE.len()].filled(),
            )
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, _, v))| {
            Text::new(
                format!("{v:.0}"),
                (i as f64 + 0.3, *v + top * 0.02),
                ("sans-serif", 14),
            )
        }))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| BenchError::Report(format!("plot {}: {e}", path.display())))
}
