//! The Markdown summary of a connections run (`<name>.md`): memory per
//! connection step by step and after every client closed, the connect
//! rates, the drain, the storm and its verdict, the hold, the limits the
//! processes ran under, and what went wrong. Reads a [`ConnectionsResults`]
//! only, so `--render-only` can redo it.

use std::fmt::Write as _;

use super::figures::ConnectFigures;
use super::record::{AfterClose, ConnectionsResults, MemorySample, PhaseRecord};
use crate::probe::Memory;
use crate::report::setting;

/// Whether every phase ran to its end and passed its rule.
pub fn all_passed(r: &ConnectionsResults) -> bool {
    let ok = |status: &str| status == "ok";
    r.scale.as_ref().is_none_or(|p| ok(&p.status))
        && r.drain.as_ref().is_none_or(|p| ok(&p.status))
        && r.storm
            .as_ref()
            .is_none_or(|p| ok(&p.status) && p.result.pass)
        && r.hold_all
            .as_ref()
            .is_none_or(|p| ok(&p.status) && p.result.pass)
}

fn f(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".to_owned(),
    }
}

fn mib(kib: Option<u64>) -> String {
    f(kib.map(|k| k as f64 / 1024.0), 1)
}

fn rss(m: Option<&Memory>) -> Option<u64> {
    m.map(|m| m.rss_kib)
}

fn anon(m: Option<&Memory>) -> Option<u64> {
    m.and_then(|m| m.anon_kib)
}

fn verdict(pass: bool, failures: &[String]) -> String {
    if pass {
        "**PASS**".to_owned()
    } else {
        format!("**FAIL** ({})", failures.join("; "))
    }
}

/// The Markdown summary.
pub fn markdown(r: &ConnectionsResults) -> String {
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# Switchboard connections benchmark `{}`\n", r.name);
    let _ = writeln!(
        out,
        "- date (UTC): {} to {}{}",
        r.started_utc,
        r.finished_utc,
        if r.interrupted {
            " — **interrupted**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "- machine: {} cpus, {}; {}",
        m.nproc, m.cpu_model, m.kernel
    );
    let _ = writeln!(
        out,
        "- {}; switchboard tree {}; server binary `{}`",
        m.redis_version,
        m.git_revision.as_deref().unwrap_or("unknown"),
        r.server_bin.display()
    );
    let _ = writeln!(out, "- command: `{}`", r.command);
    let _ = writeln!(
        out,
        "- auth {}; the instances run with pings and the idle timeout pushed out \
         (`--ping-interval-ms 600000 --idle-timeout-ms 900000`); source addresses {}; at most \
         {} connections per loader process, {} handshakes in flight each",
        setting(&r.config, "auth"),
        setting(&r.config, "source_addrs"),
        r.per_loader_max,
        setting(&r.config, "handshake_concurrency"),
    );
    if let Some(limit) = loader_docs(r).map(|d| d.nofile).next() {
        let _ = writeln!(
            out,
            "- open files per loader process: soft {} raised to {} (hard {})",
            limit.soft_before, limit.soft, limit.hard
        );
    }
    let _ = writeln!(out, "\nHow it is measured:\n");
    for line in &r.method {
        let _ = writeln!(out, "- {line}");
    }

    if let Some(p) = &r.scale {
        scale_section(&mut out, p);
    }
    connect_section(&mut out, r);
    if let Some(p) = &r.drain {
        let d = &p.result;
        let _ = writeln!(out, "\n## Graceful drain (SIGTERM)\n");
        let others: Vec<String> = d
            .closes_by_cause
            .iter()
            .filter(|(k, _)| k.as_str() != "close 1001")
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            out,
            "- {} connections; SIGTERM to exit: **{} s** ({}); clients that saw close 1001: \
             **{}** of {}{}; the last client saw its end {} s after the SIGTERM",
            f(d.connections, 0),
            f(d.exit_s, 2),
            d.exit_status.as_deref().unwrap_or("did not exit"),
            d.saw_1001,
            d.connect.connected,
            if others.is_empty() {
                String::new()
            } else {
                format!(" (others: {})", others.join(", "))
            },
            f(d.last_close_s, 2),
        );
        let _ = writeln!(
            out,
            "- RSS with every connection open: {} MiB",
            mib(rss(d.memory.as_ref()))
        );
    }
    if let Some(p) = &r.storm {
        let s = &p.result;
        let t = &s.tally;
        let _ = writeln!(out, "\n## Reconnect storm (SIGKILL)\n");
        let _ = writeln!(out, "- rule: {}: {}", s.rule, verdict(s.pass, &s.failures));
        let _ = writeln!(
            out,
            "- {} instances; {} killed holding {} connections; {} of them reconnected to {} \
             ({} within {} s of their own loss), {} failed, {} attempts",
            s.instances,
            s.victim,
            f(s.connections_on_victim, 0),
            t.reconnected,
            s.survivors.join(", "),
            t.reconnected_within,
            setting(&r.config, "storm_within_s"),
            t.failed,
            t.attempts
        );
        let _ = writeln!(
            out,
            "- the last client was back **{} s** after the kill; the survivors counted every \
             client after {} s; accept-queue overflows meanwhile: {}",
            f(t.storm_s, 2),
            f(s.survivors_full_s, 2),
            s.listen_overflows.map_or("-".to_owned(), |n| n.to_string())
        );
        let _ = writeln!(
            out,
            "- reconnect latency (loss to welcome, highest of the loader processes): p50 {} ms, \
             p99 {} ms, max {} ms; by target: {}",
            f(s.reconnect_p50_ms_max, 0),
            f(s.reconnect_p99_ms_max, 0),
            f(s.reconnect_max_ms, 0),
            s.by_target
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(p) = &r.hold_all {
        let h = &p.result;
        let _ = writeln!(out, "\n## Every instance full, held idle\n");
        let _ = writeln!(
            out,
            "- {} x {} = {} connections asked, {} opened; held {} s; the instances counted as \
             few as {}; lost {}: {}",
            h.instances,
            h.per_instance,
            u64::from(h.per_instance) * h.instances as u64,
            h.connect.connected,
            f(Some(h.held_s), 1),
            f(h.min_connections, 0),
            h.lost,
            verdict(h.pass, &h.failures)
        );
        let memory: Vec<String> = h
            .memory
            .iter()
            .map(|(id, m)| format!("{id} {} MiB", mib(rss(m.as_ref()))))
            .collect();
        let _ = writeln!(out, "- RSS at the end: {}", memory.join(", "));
    }
    out + &problems(r)
}

fn scale_section(out: &mut String, p: &PhaseRecord<super::record::ScaleResult>) {
    let s = &p.result;
    let _ = writeln!(out, "\n## Memory per idle connection (one instance)\n");
    let _ = writeln!(
        out,
        "| connections | RSS MiB | RssAnon MiB | KiB per connection | marginal KiB per connection | anon KiB per connection | marginal anon KiB per connection |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| 0 (baseline) | {} | {} | | | | |",
        mib(rss(s.baseline.as_ref())),
        mib(anon(s.baseline.as_ref()))
    );
    for step in &s.steps {
        let _ = writeln!(
            out,
            "| {} | {} | {} | **{}** | {} | {} | {} |",
            f(Some(step.connections), 0),
            mib(Some(step.memory.rss_kib)),
            mib(step.memory.anon_kib),
            f(step.total_kib_per_connection, 1),
            f(step.marginal_kib_per_connection, 1),
            f(step.total_anon_kib_per_connection, 1),
            f(step.marginal_anon_kib_per_connection, 1),
        );
    }
    if let Some(after) = &s.after_close {
        after_close_section(
            out,
            after,
            s.baseline.as_ref(),
            s.steps.last().map(|st| st.memory),
        );
    }
}

fn after_close_section(
    out: &mut String,
    after: &AfterClose,
    baseline: Option<&Memory>,
    peak: Option<Memory>,
) {
    let _ = writeln!(out, "\n### After every client closed\n");
    let retained = match (after.memory_after, baseline, peak) {
        (Some(a), Some(b), Some(p)) if p.rss_kib > b.rss_kib => format!(
            " ({} MiB above the baseline: {:.0}% of what the connections had added)",
            f(Some((a.rss_kib as f64 - b.rss_kib as f64) / 1024.0), 1),
            100.0 * (a.rss_kib as f64 - b.rss_kib as f64) / (p.rss_kib - b.rss_kib) as f64
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "- the instance counted no connection {} s after the stop; RSS {} s after that: \
         **{} MiB**{retained}",
        f(after.closed_after_s, 2),
        f(Some(after.after_s), 0),
        mib(rss(after.memory_after.as_ref())),
    );
    let _ = writeln!(
        out,
        "\n| s since the stop | connections | RSS MiB | RssAnon MiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for sample in thin(&after.samples, 1.0) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            f(Some(sample.t_s), 1),
            f(sample.connections, 0),
            mib(rss(sample.memory.as_ref())),
            mib(anon(sample.memory.as_ref())),
        );
    }
}

/// The samples at least `every` seconds apart (the first and last kept).
fn thin(samples: &[MemorySample], every: f64) -> Vec<&MemorySample> {
    let mut out: Vec<&MemorySample> = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let last = i + 1 == samples.len();
        if out.last().is_none_or(|p| s.t_s - p.t_s >= every - 1e-9) || last {
            out.push(s);
        }
    }
    out
}

fn connect_section(out: &mut String, r: &ConnectionsResults) {
    let mut rows: Vec<(String, &ConnectFigures)> = Vec::new();
    if let Some(p) = &r.scale {
        for s in &p.result.steps {
            rows.push((format!("scale: to {}", s.target), &s.connect));
        }
    }
    if let Some(p) = &r.drain {
        rows.push(("drain: all at once".into(), &p.result.connect));
    }
    if let Some(p) = &r.storm {
        rows.push(("storm: all at once".into(), &p.result.connect));
    }
    if let Some(p) = &r.hold_all {
        rows.push(("hold-all: every instance at once".into(), &p.result.connect));
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n## Connect rate ({} auth)\n",
        setting(&r.config, "auth")
    );
    let _ = writeln!(
        out,
        "| batch | connected / asked | loader processes | handshakes/s | s | handshake p50 / p99 ms (highest process) | failed | listen overflows | loader RSS KiB per connection |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for (label, c) in rows {
        let errors = if c.errors.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                c.errors
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let _ = writeln!(
            out,
            "| {label} | {} / {} | {} | **{}** | {} | {} / {} | {}{errors} | {} | {} |",
            c.connected,
            c.requested,
            c.processes,
            f(c.handshakes_per_s, 0),
            f(Some(c.elapsed_s), 2),
            f(c.handshake_p50_ms_max, 1),
            f(c.handshake_p99_ms_max, 1),
            c.failed,
            c.listen_overflows.map_or("-".to_owned(), |n| n.to_string()),
            f(
                (c.connected > 0).then(|| c.loader_rss_kib as f64 / c.connected as f64),
                1
            ),
        );
    }
}

/// Every loader document of the run.
fn loader_docs(
    r: &ConnectionsResults,
) -> impl Iterator<Item = &switchboard_bench_schema::ConnectionsRun> {
    let scale = r
        .scale
        .iter()
        .flat_map(|p| p.result.steps.iter().flat_map(|s| s.loaders.iter()));
    let drain = r.drain.iter().flat_map(|p| p.result.loaders.iter());
    let storm = r.storm.iter().flat_map(|p| p.result.loaders.iter());
    let hold = r.hold_all.iter().flat_map(|p| p.result.loaders.iter());
    scale.chain(drain).chain(storm).chain(hold)
}

/// "Warnings and errors": phases that did not finish, processes that died.
fn problems(r: &ConnectionsResults) -> String {
    let mut lines = Vec::new();
    let mut phase =
        |name: &str, status: &str, error: &Option<String>, processes: &[crate::procs::Stopped]| {
            if let Some(e) = error {
                lines.push(format!("- {name}: {status}: {}", e.replace('\n', " / ")));
            }
            for p in processes.iter().filter(|p| p.killed) {
                lines.push(format!(
                    "- {name}: {} (pid {}) ignored SIGTERM and was killed",
                    p.name, p.pid
                ));
            }
        };
    if let Some(p) = &r.scale {
        phase("scale", &p.status, &p.error, &p.processes);
    }
    if let Some(p) = &r.drain {
        phase("drain", &p.status, &p.error, &p.processes);
    }
    if let Some(p) = &r.storm {
        phase("storm", &p.status, &p.error, &p.processes);
    }
    if let Some(p) = &r.hold_all {
        phase("hold-all", &p.status, &p.error, &p.processes);
    }
    if lines.is_empty() {
        return String::new();
    }
    format!("\n## Warnings and errors\n\n{}\n", lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_close_samples_are_thinned_to_one_a_second() {
        let samples: Vec<MemorySample> = (0..25)
            .map(|i| MemorySample {
                t_s: f64::from(i) * 0.5,
                ..MemorySample::default()
            })
            .collect();
        let kept: Vec<f64> = thin(&samples, 1.0).iter().map(|s| s.t_s).collect();
        assert_eq!(kept.first(), Some(&0.0));
        assert_eq!(kept.last(), Some(&12.0));
        assert_eq!(kept.len(), 13);
    }
}
