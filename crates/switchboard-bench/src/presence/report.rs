//! The Markdown of a presence results file: the settings, one row per run
//! (events per second, CPU per event and per transition, loss), the
//! marginal cost against the control row, each instance's counters and the
//! routing proof, and how everything was measured.

use std::fmt::Write;

use super::{Figures, PresenceRecord, PresenceResults};
use crate::report::setting;

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// The whole report.
pub fn markdown(r: &PresenceResults) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Presence events: `{}`\n", r.name);
    let _ = writeln!(s, "```sh\n{}\n```\n", r.command);
    let m = &r.machine;
    let _ = writeln!(
        s,
        "{} to {} · {} CPUs ({}) · {} · {} · git {}{}\n",
        r.started_utc,
        r.finished_utc,
        m.nproc,
        m.cpu_model,
        m.kernel
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        m.redis_version
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        m.git_revision.as_deref().unwrap_or("?"),
        if r.interrupted {
            " · **interrupted**"
        } else {
            ""
        }
    );
    let c = &r.config;
    let _ =
        writeln!(
        s,
        "Churn: {} users, {} transitions/s for {} s (every instance); watchers: {} connections on \
         instances {}, {} per user; --presence-grace-ms {}.\n",
        setting(c, "users"),
        r.runs
            .iter()
            .find_map(|run| run.loader.as_ref().map(|d| d.churn.rate_offered.to_string()))
            .unwrap_or_else(|| setting(c, "churn_rate")),
        setting(c, "duration"),
        setting(c, "watcher_conns"),
        setting(c, "watcher_instances"),
        setting(c, "watchers_per_user"),
        setting(c, "presence_grace_ms"),
    );
    let _ = writeln!(
        s,
        "| row | N | # | transitions (/s) | events delivered / expected | events/s | lost | dup | \
         latency p50 / p99 ms | instance CPU µs/event | Redis CPU µs/event | instance µs/transition \
         | Redis µs/transition | other CPU-s | verdict |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for run in &r.runs {
        match &run.figures {
            Some(f) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} ({:.0}) | {} / {} | {:.0} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} |",
                    run.row,
                    run.nodes,
                    run.repeat,
                    f.transitions,
                    f.transitions_per_s,
                    f.events_delivered,
                    f.events_expected,
                    f.events_per_s,
                    f.lost,
                    f.duplicates,
                    opt(f.latency_ms.p50, 2),
                    opt(f.latency_ms.p99, 2),
                    opt(f.instance_cpu_us_per_event, 1),
                    opt(f.redis_cpu_us_per_event, 1),
                    opt(f.instance_cpu_us_per_transition, 0),
                    opt(f.redis_cpu_us_per_transition, 0),
                    opt(f.other_cpu_s, 2),
                    if f.pass { "PASS" } else { "**FAIL**" },
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {}: {} |  |  |  |  |  |  |  |  |  |  |  |",
                    run.row,
                    run.nodes,
                    run.repeat,
                    run.status,
                    run.error.as_deref().unwrap_or("").replace('\n', " ")
                );
            }
        }
    }
    s.push('\n');
    marginal(&mut s, r);
    for run in &r.runs {
        if let Some(f) = &run.figures {
            instances(&mut s, run, f);
        }
    }
    let _ = writeln!(s, "## Method\n");
    for line in &r.method {
        let _ = writeln!(s, "- {line}");
    }
    s
}

/// Watched minus control, per N, when both ran.
fn marginal(s: &mut String, r: &PresenceResults) {
    let mut lines = Vec::new();
    for w in r.runs.iter().filter(|x| x.row == "watched") {
        let Some(c) = r.runs.iter().find(|x| {
            x.row == "control" && x.nodes == w.nodes && x.mode == w.mode && x.repeat == w.repeat
        }) else {
            continue;
        };
        let (Some(fw), Some(fc)) = (&w.figures, &c.figures) else {
            continue;
        };
        if fw.transitions == 0 || fw.events_delivered == 0 {
            continue;
        }
        let per_transition = fw.events_delivered as f64 / fw.transitions as f64;
        let marg = |a: Option<f64>, b: Option<f64>| Some((a? - b?) / per_transition);
        lines.push(format!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            w.nodes,
            w.repeat,
            per_transition,
            opt(fw.instance_cpu_us_per_transition, 0),
            opt(fc.instance_cpu_us_per_transition, 0),
            opt(
                marg(
                    fw.instance_cpu_us_per_transition,
                    fc.instance_cpu_us_per_transition
                ),
                1
            ),
            opt(fw.redis_cpu_us_per_transition, 0),
            opt(fc.redis_cpu_us_per_transition, 0),
            opt(
                marg(
                    fw.redis_cpu_us_per_transition,
                    fc.redis_cpu_us_per_transition
                ),
                1
            ),
        ));
    }
    if lines.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "Marginal cost of the events (watched - control, per transition, divided by the events \
         per transition):\n"
    );
    let _ = writeln!(
        s,
        "| N | # | events per transition | instance µs/transition watched | control | **instance µs \
         per event, marginal** | Redis µs/transition watched | control | **Redis µs per event, \
         marginal** |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for l in lines {
        let _ = writeln!(s, "{l}");
    }
    s.push('\n');
}

/// One run's instances, the proof, Redis calls, warnings.
fn instances(s: &mut String, run: &PresenceRecord, f: &Figures) {
    let _ = writeln!(
        s,
        "## {} N={} #{} ({}): per instance over the {:.2} s window\n",
        run.row, run.nodes, run.repeat, run.mode, f.window_s
    );
    let _ = writeln!(
        s,
        "| instance | watchers | CPU s | presence events received (bus) | expected | transitions \
         announced online / offline | presence frames queued | frames at its watchers | watched \
         users |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for i in &f.instances {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {} | {:.0} / {:.0} | {:.0} | {} | {:.0} |",
            i.id,
            if i.has_watchers { "yes" } else { "no" },
            opt(i.cpu_s, 3),
            i.events_received,
            i.events_expected,
            i.transitions_online,
            i.transitions_offline,
            i.delivered_presence,
            i.frames_at_watchers,
            i.watched_users,
        );
    }
    let _ = writeln!(
        s,
        "\nCPU in the window: instances {} s, Redis {} s, loader {} s, benchmark {} s, other \
         processes {} s. Instances with watchers minus those without (same churn on each): {} µs \
         per event delivered.\n",
        opt(f.instance_cpu_s, 3),
        opt(f.redis_cpu_s, 3),
        opt(f.loader_cpu_s, 3),
        opt(f.bench_cpu_s, 3),
        opt(f.other_cpu_s, 3),
        opt(f.watcher_instances_extra_us_per_event, 1),
    );
    let _ = writeln!(s, "Checks:\n");
    for c in &f.checks {
        let _ = writeln!(
            s,
            "- {} {}: expected {:.0}, measured {:.0}",
            if c.ok { "✓" } else { "✗" },
            c.what,
            c.expected,
            c.measured
        );
    }
    let _ = writeln!(
        s,
        "\nPUBLISH + SPUBLISH per transition: {} (bus envelopes the watch layout implies: {} per \
         transition, one per instance watching the user).",
        opt(f.publishes_per_transition, 3),
        opt(f.envelopes_per_transition, 3),
    );
    if !f.redis_calls.is_empty() && f.transitions > 0 {
        let calls: Vec<String> = f
            .redis_calls
            .iter()
            .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / f.transitions as f64))
            .collect();
        let _ = writeln!(
            s,
            "\nRedis calls per transition ({} commands per transition): {}.",
            opt(f.redis_commands_per_transition, 2),
            calls.join(", ")
        );
    }
    if !f.warnings.is_empty() {
        let _ = writeln!(s, "\nWarnings:\n");
        for w in &f.warnings {
            let _ = writeln!(s, "- {w}");
        }
    }
    s.push('\n');
}
