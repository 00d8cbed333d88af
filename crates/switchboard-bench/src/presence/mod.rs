//! `--workload presence` (issue 14): what presence events cost, and proof
//! that they are routed to the watching instances only.
//!
//! Per N (and per row: `watched`, and with --presence-control a `control`
//! row with the same churn but no watches) it starts a fresh redis-server
//! and N instances (`--presence-grace-ms`, 0 by default), and one
//! `switchboard-load --workload presence --wait-for-signal`: `--users`
//! churning users connect and disconnect on every instance at
//! `--churn-rate` transitions/s for `--duration` s, while `--watcher-conns`
//! watchers on `--watcher-instances` (n1, n2 by default) watch them,
//! `--watchers-per-user` each. The window:
//!
//! - starts when the loader's document says `ready` (every watcher connected
//!   and acked): a snapshot (CPU of every process from /proc, every
//!   instance's /metrics, Redis INFO), then SIGUSR1 starts the churn;
//! - ends when the document says `drained` (every expected event matched, or
//!   the loader's drain bound): the second snapshot; then SIGTERM, and the
//!   loader closes everything and writes its final document.
//!
//! Figures: events delivered per second, instance and Redis CPU per event
//! (and per transition), and the routing proof from each instance's
//! counters: `switchboard_presence_events_received_total` must stay 0 on the
//! instances without watchers and equal, on each watcher instance, the
//! transitions of the users it watches; the instances' announced
//! transitions (`switchboard_presence_transitions_total`) must equal the
//! loader's. Every wait is bounded; every process is stopped by pid.

mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use switchboard_bench_schema::{PresencePhase, PresenceRun, Quantiles};
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, RoutingMode};
use crate::cluster::{self, ClusterSpec};
use crate::error::BenchError;
use crate::probe;
use crate::procs::{Stopped, Supervisor};
use crate::redis_server::RedisTopology;
use crate::snapshot::{self, Snapshot};
use crate::system::System;
use crate::Setup;

/// Identifies the layout of a presence results file.
pub const SCHEMA: &str = "switchboard-bench-presence/1";

const M_RECEIVED: &str = "switchboard_presence_events_received_total";
const M_TRANSITIONS: &str = "switchboard_presence_transitions_total";
const M_DELIVERED: &str = "switchboard_presence_events_delivered_total";
const M_WATCHED: &str = "switchboard_watched_users";
const M_CONNECTIONS: &str = "switchboard_connections";

/// How each figure is measured, for the report.
const METHOD: [&str; 6] = [
    "Window: from the loader's `ready` (every watcher connected, its watch acked, every churning \
     user offline) to its `drained` (every expected presence_event matched at its watcher, or \
     the loader's --drain bound). CPU (utime+stime from /proc/PID/stat) of every instance, \
     redis-server and the loader, each instance's /metrics and Redis INFO are read at both ends.",
    "A transition is a churning user's connect (counted from TCP connect to the welcome) or close \
     handshake, at --churn-rate per second in total, round-robin over the users, each user's \
     c-th connection on instance (k + c) mod N: every instance sees connects and disconnects.",
    "Events delivered: presence_event frames received by the watchers and matched to the \
     loader's own record of that user's transitions (the i-th event of a (watcher, user) to the \
     user's i-th transition, same state); lost = transitions x watchers - matched; a second \
     identical consecutive event is a duplicate; latency is from the transition's start to the \
     frame at the watcher.",
    "CPU per event = CPU in the window / events delivered; per transition likewise. Instance CPU \
     includes the churning connections' own cost (upgrade, session, close): the control row, \
     where nobody watches, measures that alone; marginal cost per event = (per transition, \
     watched - control) / events per transition.",
    "Routing proof: each instance's switchboard_presence_events_received_total over the window \
     must be 0 on every instance without a watcher, and on each watcher instance equal the \
     transitions of the users it has a watcher of (one bus envelope per transition per watching \
     instance); the sum of switchboard_presence_transitions_total{kind} must equal the loader's \
     transitions; switchboard_presence_events_delivered_total{kind=\"presence\"} summed must equal \
     the frames the watchers received.",
    "Other processes: machine-wide busy CPU (/proc/stat) minus the instances, redis-server, the \
     loader and the benchmark, in the window: how much else ran on the machine (an estimate: \
     per-process and machine-wide times are read a few ms apart and counted in ticks, so it can \
     read slightly below 0).",
];

/// Everything one `--workload presence` invocation produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceResults {
    /// [`SCHEMA`].
    pub schema: String,
    /// The result name (file stem).
    pub name: String,
    /// The command line, shell-quoted.
    pub command: String,
    /// When the benchmark started and finished, UTC.
    pub started_utc: String,
    /// See `started_utc`.
    pub finished_utc: String,
    /// The machine.
    pub machine: crate::report::Machine,
    /// Every setting (the parsed command line).
    pub config: serde_json::Value,
    /// How each figure is measured.
    pub method: Vec<String>,
    /// Whether Ctrl-C / SIGTERM cut the runs short.
    pub interrupted: bool,
    /// One record per (row, N).
    pub runs: Vec<PresenceRecord>,
}

/// One (row, N) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// `watched`, or `control` (the same churn, nobody watched).
    pub row: String,
    /// The routing mode of the instances.
    pub mode: String,
    /// Instances.
    pub nodes: usize,
    /// Which repeat of the row (from 1; --presence-repeats).
    #[serde(default)]
    pub repeat: u32,
    /// `ok`, `error` or `interrupted`.
    pub status: String,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Wall time of the whole run, s.
    pub wall_s: f64,
    /// `id -> port` of the instances.
    pub instance_ports: Vec<(String, u16)>,
    /// The first instance's command line.
    pub instance_command: Vec<String>,
    /// The loader's command line.
    pub loader_command: Vec<String>,
    /// How the loader exited.
    pub loader_exit: Option<String>,
    /// Readings when the window started and ended.
    pub before: Option<Snapshot>,
    /// See `before`.
    pub after: Option<Snapshot>,
    /// The loader's CPU seconds (from /proc) at both ends.
    pub loader_cpu_s: (Option<f64>, Option<f64>),
    /// The loader's final document.
    pub loader: Option<PresenceRun>,
    /// Figures derived from the above.
    pub figures: Option<Figures>,
    /// How every process of the run ended.
    pub processes: Vec<Stopped>,
    /// Where the logs of this run are.
    pub logs_dir: PathBuf,
}

/// One instance over the window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceFigures {
    /// `n1`, ...
    pub id: String,
    /// Whether watchers were connected to it.
    pub has_watchers: bool,
    /// CPU seconds in the window.
    pub cpu_s: Option<f64>,
    /// `switchboard_presence_events_received_total` over the window.
    pub events_received: f64,
    /// What the loader's layout says it should receive.
    pub events_expected: u64,
    /// `switchboard_presence_transitions_total{kind="online"}` / `"offline"`.
    pub transitions_online: f64,
    /// See `transitions_online`.
    pub transitions_offline: f64,
    /// `switchboard_presence_events_delivered_total{kind="presence"}`.
    pub delivered_presence: f64,
    /// Frames the watchers on it received.
    pub frames_at_watchers: u64,
    /// `switchboard_watched_users` at the end.
    pub watched_users: f64,
    /// `switchboard_connections` at the start (the watchers).
    pub connections_at_start: f64,
}

/// One check of the proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// What is compared.
    pub what: String,
    /// What it must be.
    pub expected: f64,
    /// What was measured.
    pub measured: f64,
    /// Whether they are equal.
    pub ok: bool,
}

/// The figures of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Figures {
    /// The window, s.
    pub window_s: f64,
    /// The loader's churn phase, s.
    pub churn_s: f64,
    /// Transitions made (online + offline).
    pub transitions: u64,
    /// Of which online.
    pub transitions_online: u64,
    /// Events expected (transitions x watchers of the user).
    pub events_expected: u64,
    /// presence_event frames received by the watchers (and matched).
    pub events_delivered: u64,
    /// Lost, duplicated, unexpected, misrouted (loader).
    pub lost: u64,
    /// See `lost`.
    pub duplicates: u64,
    /// See `lost`.
    pub unexpected: u64,
    /// See `lost`.
    pub misrouted: u64,
    /// Events delivered / churn phase, per s.
    pub events_per_s: f64,
    /// Transitions / churn phase, per s.
    pub transitions_per_s: f64,
    /// Event latency (transition start to the frame at a watcher), ms.
    pub latency_ms: Quantiles,
    /// CPU in the window, s: all instances, redis-server, the loader, the
    /// benchmark, and everything else on the machine.
    pub instance_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub redis_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub loader_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub bench_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub other_cpu_s: Option<f64>,
    /// Instance CPU per event delivered, µs.
    pub instance_cpu_us_per_event: Option<f64>,
    /// Redis CPU per event delivered, µs.
    pub redis_cpu_us_per_event: Option<f64>,
    /// Instance CPU per transition, µs.
    pub instance_cpu_us_per_transition: Option<f64>,
    /// Redis CPU per transition, µs.
    pub redis_cpu_us_per_transition: Option<f64>,
    /// Redis commands per transition.
    pub redis_commands_per_transition: Option<f64>,
    /// The receiving side within one run: (CPU of the instances with
    /// watchers - CPU of the others, scaled to as many instances) / events
    /// delivered, µs. Every instance has the same churn; only the watcher
    /// instances receive the envelopes and queue the frames.
    #[serde(default)]
    pub watcher_instances_extra_us_per_event: Option<f64>,
    /// PUBLISH + SPUBLISH calls per transition (every publish of the run,
    /// presence events and anything else).
    #[serde(default)]
    pub publishes_per_transition: Option<f64>,
    /// Bus envelopes the layout implies per transition: one per watching
    /// instance of the user.
    #[serde(default)]
    pub envelopes_per_transition: Option<f64>,
    /// Redis calls by command over the window (non-zero only).
    pub redis_calls: BTreeMap<String, u64>,
    /// Every instance.
    pub instances: Vec<InstanceFigures>,
    /// The routing proof and the counts' cross-checks.
    pub checks: Vec<Check>,
    /// The loader passed and every check holds.
    pub pass: bool,
    /// Things that make a figure less trustworthy.
    pub warnings: Vec<String>,
}

/// Runs every (N, row) and writes the results.
pub async fn run(cli: &Cli, setup: Setup) -> Result<ExitCode, BenchError> {
    let cancel = CancellationToken::new();
    crate::watch_signals(cancel.clone());
    let modes = cli
        .modes
        .clone()
        .unwrap_or_else(|| vec![RoutingMode::Routed]);
    let mut rows = vec![("watched", cli.watchers_per_user)];
    if cli.presence_control {
        rows.push(("control", 0));
    }
    let mut runs = Vec::new();
    'all: for &mode in &modes {
        for &nodes in &cli.nodes {
            for repeat in 1..=cli.presence_repeats {
                for &(row, per_user) in &rows {
                    if cancel.is_cancelled() {
                        break 'all;
                    }
                    eprintln!(
                        "[bench] === presence {row} {} N={nodes} (repeat {repeat})",
                        mode.as_str()
                    );
                    let mut record =
                        run_one(cli, &setup, mode, nodes, (row, per_user), repeat, &cancel).await;
                    record.repeat = repeat;
                    print_run(&record);
                    runs.push(record);
                    tokio::select! {
                        _ = cancel.cancelled() => break 'all,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    let results = PresenceResults {
        schema: SCHEMA.to_owned(),
        name: setup.name.clone(),
        command: setup.command.clone(),
        started_utc: setup.started_utc.clone(),
        finished_utc: crate::report::utc_now().1,
        machine: setup.machine.clone(),
        config: serde_json::to_value(cli)
            .map_err(|e| BenchError::Report(format!("serialize config: {e}")))?,
        method: METHOD.iter().map(|m| (*m).to_owned()).collect(),
        interrupted: cancel.is_cancelled(),
        runs,
    };
    crate::report::conclude(&results, &setup.out_dir, &setup.logs_dir, cli.publish)
}

fn print_run(r: &PresenceRecord) {
    match &r.figures {
        Some(f) => eprintln!(
            "[bench] presence {} N={} #{}: {} transitions, {}/{} events ({:.0}/s, lost {}, dup {}), \
             instances {} µs/event, redis {} µs/event, p99 {} ms, {}{}",
            r.row,
            r.nodes,
            r.repeat,
            f.transitions,
            f.events_delivered,
            f.events_expected,
            f.events_per_s,
            f.lost,
            f.duplicates,
            f.instance_cpu_us_per_event
                .map_or("-".into(), |v| format!("{v:.1}")),
            f.redis_cpu_us_per_event
                .map_or("-".into(), |v| format!("{v:.1}")),
            f.latency_ms.p99.map_or("-".into(), |v| format!("{v:.2}")),
            if f.pass { "PASS" } else { "FAIL" },
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({}: {e})", r.status)),
        ),
        None => eprintln!(
            "[bench] presence {} N={}: {}: {}",
            r.row,
            r.nodes,
            r.status,
            r.error.as_deref().unwrap_or("")
        ),
    }
}

/// What a run measured before its processes were stopped.
#[derive(Default)]
struct Measured {
    instance_ports: Vec<(String, u16)>,
    instance_command: Vec<String>,
    loader_command: Vec<String>,
    loader_exit: Option<String>,
    before: Option<Snapshot>,
    after: Option<Snapshot>,
    loader_cpu: (Option<f64>, Option<f64>),
    loader: Option<PresenceRun>,
}

async fn run_one(
    cli: &Cli,
    setup: &Setup,
    mode: RoutingMode,
    nodes: usize,
    (row, per_user): (&str, u32),
    repeat: u32,
    cancel: &CancellationToken,
) -> PresenceRecord {
    let started = Instant::now();
    let dir = setup.logs_dir.join(format!(
        "presence-{row}-{}-n{nodes}-{repeat}",
        mode.as_str()
    ));
    let mut supervisor = Supervisor::new(Duration::from_secs_f64(cli.stop_timeout));
    let mut m = Measured::default();
    let result = match std::fs::create_dir_all(&dir) {
        Ok(()) => {
            measure(
                cli,
                setup,
                mode,
                nodes,
                per_user,
                &dir,
                &mut supervisor,
                &mut m,
                cancel,
            )
            .await
        }
        Err(e) => Err(BenchError::io("create run dir", &dir, e)),
    };
    let processes = supervisor.stop_all().await;
    let (status, error) = match &result {
        Ok(()) => ("ok", None),
        Err(BenchError::Interrupted) => ("interrupted", Some("interrupted".to_owned())),
        Err(e) => ("error", Some(e.to_string())),
    };
    let figures = match (&m.before, &m.after, &m.loader) {
        (Some(before), Some(after), Some(loader)) => {
            let mut f = derive(before, after, m.loader_cpu, loader);
            for p in &processes {
                if p.exited_by_itself && p.name != "loader" {
                    f.warnings
                        .push(format!("{} exited during the run: {}", p.name, p.status));
                    f.pass = false;
                }
            }
            if status != "ok" {
                f.pass = false;
            }
            Some(f)
        }
        _ => None,
    };
    PresenceRecord {
        row: row.to_owned(),
        mode: mode.as_str().to_owned(),
        nodes,
        repeat,
        status: status.to_owned(),
        error,
        wall_s: started.elapsed().as_secs_f64(),
        instance_ports: m.instance_ports,
        instance_command: m.instance_command,
        loader_command: m.loader_command,
        loader_exit: m.loader_exit,
        before: m.before,
        after: m.after,
        loader_cpu_s: m.loader_cpu,
        loader: m.loader,
        figures,
        processes,
        logs_dir: dir,
    }
}

/// Reads the loader's document, `None` while it is missing or half written.
fn read_document(path: &Path) -> Option<PresenceRun> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits until the loader's document reaches `phase`, at most `timeout`.
async fn wait_phase(
    path: &Path,
    phase: PresencePhase,
    timeout: Duration,
    supervisor: &mut Supervisor,
    loader_pid: u32,
    cancel: &CancellationToken,
) -> Result<PresenceRun, BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if cancel.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        if let Some(doc) = read_document(path).filter(|d| d.phase >= phase) {
            return Ok(doc);
        }
        if let Some(status) = supervisor.try_exited(loader_pid) {
            return Err(BenchError::Loader(format!(
                "exited ({status}) before its document said {phase:?}; last log lines:\n{}",
                supervisor.log_tail(loader_pid, 20)
            )));
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Loader(format!(
                "its document did not reach {phase:?} within {:.0} s; last log lines:\n{}",
                timeout.as_secs_f64(),
                supervisor.log_tail(loader_pid, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    cli: &Cli,
    setup: &Setup,
    mode: RoutingMode,
    nodes: usize,
    per_user: u32,
    dir: &Path,
    supervisor: &mut Supervisor,
    m: &mut Measured,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let run_start = Instant::now();
    let mut extra_args = cli.server_extra_args();
    if !extra_args
        .iter()
        .any(|a| a.starts_with("--presence-grace-ms"))
    {
        extra_args.push("--presence-grace-ms".into());
        extra_args.push(cli.presence_grace_ms.to_string());
    }
    let spec = ClusterSpec {
        system: System::Switchboard(mode),
        nodes,
        server_bin: &setup.server_bin,
        peer: None,
        redis_bin: &cli.redis_server,
        redis_cli: &cli.redis_cli,
        redis: RedisTopology::Single,
        lease_ms: cli.lease_ms,
        jwt_secret: None,
        extra_args,
        ready_timeout: Duration::from_secs_f64(cli.ready_timeout),
        dir,
    };
    let mut cluster = cluster::start(&spec, supervisor, cancel).await?;
    m.instance_command = cluster.instance_command.clone();
    m.instance_ports = cluster
        .instances
        .iter()
        .map(|i| (i.id.clone(), i.port))
        .collect();
    tokio::select! {
        _ = cancel.cancelled() => return Err(BenchError::Interrupted),
        _ = tokio::time::sleep(Duration::from_millis(cli.settle_ms)) => {}
    }

    let out = dir.join("loader.json");
    let _ = std::fs::remove_file(&out);
    let watcher_instances: Vec<String> = cli
        .watcher_instances
        .iter()
        .map(|i| (i - 1).to_string())
        .collect();
    let mut args: Vec<String> = vec![
        "--workload".into(),
        "presence".into(),
        "--targets".into(),
        cluster.targets(),
        "--users".into(),
        cli.users.to_string(),
        "--churn-rate".into(),
        cli.presence_rate().to_string(),
        "--duration".into(),
        cli.duration.to_string(),
        "--drain".into(),
        cli.presence_drain_s.to_string(),
        "--watcher-conns".into(),
        cli.watcher_conns.to_string(),
        "--watchers-per-user".into(),
        per_user.to_string(),
        "--watcher-instances".into(),
        watcher_instances.join(","),
        "--presence-grace-ms".into(),
        cli.presence_grace_ms.to_string(),
        "--connect-timeout".into(),
        cli.connect_timeout.to_string(),
        "--wait-for-signal".into(),
    ];
    args.extend(cli.loader_args.iter().cloned());
    args.push("--out".into());
    args.push(out.to_string_lossy().into_owned());
    m.loader_command = std::iter::once(setup.loader_bin.to_string_lossy().into_owned())
        .chain(args.iter().cloned())
        .collect();
    let loader_pid = supervisor.spawn(
        "loader",
        &setup.loader_bin,
        &args,
        &dir.join("loader.log"),
        false,
    )?;

    let ready_timeout = Duration::from_secs_f64(cli.connect_timeout + 10.0);
    wait_phase(
        &out,
        PresencePhase::Ready,
        ready_timeout,
        supervisor,
        loader_pid,
        cancel,
    )
    .await?;
    m.loader_cpu.0 = probe::process_cpu_seconds(loader_pid);
    m.before = Some(snapshot::take(&mut cluster, run_start).await?);
    if !supervisor.signal(loader_pid, Signal::SIGUSR1) {
        return Err(BenchError::Loader("could not send SIGUSR1".into()));
    }
    let drained_timeout = Duration::from_secs_f64(cli.duration + cli.presence_drain_s + 30.0);
    wait_phase(
        &out,
        PresencePhase::Drained,
        drained_timeout,
        supervisor,
        loader_pid,
        cancel,
    )
    .await?;
    m.loader_cpu.1 = probe::process_cpu_seconds(loader_pid);
    m.after = Some(snapshot::take(&mut cluster, run_start).await?);
    crate::run::check_instances_alive(&cluster, supervisor)?;
    supervisor.signal(loader_pid, Signal::SIGTERM);
    let status = supervisor
        .wait_exit(loader_pid, Duration::from_secs(15))
        .await;
    m.loader_exit = status.clone();
    let doc = read_document(&out).ok_or_else(|| {
        BenchError::Loader(format!(
            "no readable final document {}; last log lines:\n{}",
            out.display(),
            supervisor.log_tail(loader_pid, 20)
        ))
    })?;
    m.loader = Some(doc);
    match status {
        Some(s) if s.contains("exit status: 0") => Ok(()),
        Some(s) => Err(BenchError::Loader(format!("exited with {s}"))),
        None => Err(BenchError::Loader(
            "did not exit within 15 s of SIGTERM".into(),
        )),
    }
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

fn per(x: Option<f64>, n: u64, scale: f64) -> Option<f64> {
    (n > 0).then_some(x? * scale / n as f64)
}

/// The figures of a run from its two snapshots and the loader's document.
pub fn derive(
    before: &Snapshot,
    after: &Snapshot,
    loader_cpu: (Option<f64>, Option<f64>),
    doc: &PresenceRun,
) -> Figures {
    let mut f = Figures {
        window_s: after.t_s - before.t_s,
        churn_s: doc.churn.duration_s,
        transitions: doc.churn.online + doc.churn.offline,
        transitions_online: doc.churn.online,
        events_expected: doc.events.expected,
        events_delivered: doc.events.received,
        lost: doc.events.lost,
        duplicates: doc.events.duplicates,
        unexpected: doc.events.unexpected,
        misrouted: doc.events.misrouted,
        latency_ms: doc.events.latency_ms.clone(),
        ..Figures::default()
    };
    if f.churn_s > 0.0 {
        f.events_per_s = doc.events.received as f64 / f.churn_s;
        f.transitions_per_s = f.transitions as f64 / f.churn_s;
    }
    let mut instance_cpu = Some(0.0);
    let watcher_targets: Vec<usize> = doc.placement.watcher_instances.clone();
    for (i, (b, a)) in before.instances.iter().zip(&after.instances).enumerate() {
        let d = |name: &str, label: Option<(&str, &str)>| {
            a.metrics.sum(name, label) - b.metrics.sum(name, label)
        };
        let cpu = delta(b.cpu_s, a.cpu_s);
        instance_cpu = instance_cpu.zip(cpu).map(|(s, c)| s + c);
        f.instances.push(InstanceFigures {
            id: a.id.clone(),
            has_watchers: watcher_targets.contains(&i) && doc.placement.watches > 0,
            cpu_s: cpu,
            events_received: d(M_RECEIVED, None),
            events_expected: doc
                .events
                .expected_envelopes_by_instance
                .get(i)
                .copied()
                .unwrap_or(0),
            transitions_online: d(M_TRANSITIONS, Some(("kind", "online"))),
            transitions_offline: d(M_TRANSITIONS, Some(("kind", "offline"))),
            delivered_presence: d(M_DELIVERED, Some(("kind", "presence"))),
            frames_at_watchers: doc.events.received_by_instance.get(i).copied().unwrap_or(0),
            watched_users: a.metrics.sum(M_WATCHED, None),
            connections_at_start: b.metrics.sum(M_CONNECTIONS, None),
        });
    }
    f.instance_cpu_s = instance_cpu;
    let side = |with: bool| -> Option<(f64, usize)> {
        let part: Vec<&InstanceFigures> = f
            .instances
            .iter()
            .filter(|i| i.has_watchers == with)
            .collect();
        let cpu = part.iter().map(|i| i.cpu_s).sum::<Option<f64>>()?;
        Some((cpu, part.len()))
    };
    if let (Some((cw, nw)), Some((co, no))) = (side(true), side(false)) {
        if nw > 0 && no > 0 && f.events_delivered > 0 {
            let extra = cw - co * nw as f64 / no as f64;
            f.watcher_instances_extra_us_per_event = Some(extra * 1e6 / f.events_delivered as f64);
        }
    }
    f.redis_cpu_s = delta(before.redis_cpu_s, after.redis_cpu_s);
    f.loader_cpu_s = delta(loader_cpu.0, loader_cpu.1);
    f.bench_cpu_s = delta(before.bench_cpu_s, after.bench_cpu_s);
    let busy = |s: &Snapshot| s.machine.total_s - s.machine.idle_s;
    let machine_busy = busy(after) - busy(before);
    f.other_cpu_s = (|| {
        Some(machine_busy - f.instance_cpu_s? - f.redis_cpu_s? - f.loader_cpu_s? - f.bench_cpu_s?)
    })();
    f.other_cpu_s = f.other_cpu_s.map(|o| (o * 1000.0).round() / 1000.0);
    f.instance_cpu_us_per_event = per(f.instance_cpu_s, f.events_delivered, 1e6);
    f.redis_cpu_us_per_event = per(f.redis_cpu_s, f.events_delivered, 1e6);
    f.instance_cpu_us_per_transition = per(f.instance_cpu_s, f.transitions, 1e6);
    f.redis_cpu_us_per_transition = per(f.redis_cpu_s, f.transitions, 1e6);
    let commands = after
        .redis
        .commands_processed
        .saturating_sub(before.redis.commands_processed);
    f.redis_commands_per_transition = per(Some(commands as f64), f.transitions, 1.0);
    for (name, stat) in &after.redis.commandstats {
        let was = before.redis.commandstats.get(name).map_or(0, |s| s.calls);
        let calls = stat.calls.saturating_sub(was);
        if calls > 0 {
            f.redis_calls.insert(name.clone(), calls);
        }
    }

    let publishes = f.redis_calls.get("publish").copied().unwrap_or(0)
        + f.redis_calls.get("spublish").copied().unwrap_or(0);
    f.publishes_per_transition = per(Some(publishes as f64), f.transitions, 1.0);
    let envelopes: u64 = doc.events.expected_envelopes_by_instance.iter().sum();
    f.envelopes_per_transition = per(Some(envelopes as f64), f.transitions, 1.0);

    // The proof and the cross-checks.
    let mut checks = Vec::new();
    let mut check = |what: String, expected: f64, measured: f64| {
        checks.push(Check {
            ok: (expected - measured).abs() < 0.5,
            what,
            expected,
            measured,
        });
    };
    for inst in &f.instances {
        if inst.has_watchers {
            check(
                format!(
                    "{}: presence events received = transitions of the users watched there",
                    inst.id
                ),
                inst.events_expected as f64,
                inst.events_received,
            );
        } else {
            check(
                format!("{}: no watcher here, presence events received = 0", inst.id),
                0.0,
                inst.events_received,
            );
        }
    }
    let sum = |g: fn(&InstanceFigures) -> f64| f.instances.iter().map(g).sum::<f64>();
    check(
        "announced online transitions (all instances) = the loader's connects".into(),
        doc.churn.online as f64,
        sum(|i| i.transitions_online),
    );
    check(
        "announced offline transitions (all instances) = the loader's closes".into(),
        doc.churn.offline as f64,
        sum(|i| i.transitions_offline),
    );
    check(
        "presence frames queued (all instances) = frames the watchers received".into(),
        doc.events.received as f64,
        sum(|i| i.delivered_presence),
    );
    check(
        "events received by the watchers = expected (transitions x watchers)".into(),
        doc.events.expected as f64,
        doc.events.received as f64,
    );
    f.checks = checks;
    if !doc.pass {
        f.warnings.push(format!(
            "the loader's checks failed: {}",
            doc.fail_reasons.join("; ")
        ));
    }
    if doc.churn.late > 0 {
        f.warnings.push(format!(
            "{} of {} transitions started more than 50 ms late (the loader fell behind)",
            doc.churn.late, doc.churn.scheduled
        ));
    }
    if let Some(other) = f.other_cpu_s.filter(|&o| o > 0.1 * f.window_s) {
        f.warnings.push(format!(
            "other processes used {other:.2} CPU-s in the {:.1} s window (the machine was shared)",
            f.window_s
        ));
    }
    if before
        .instances
        .iter()
        .chain(&after.instances)
        .any(|i| i.scrape_error.is_some())
    {
        f.warnings
            .push("a /metrics scrape failed; its counters read 0".into());
    }
    f.pass = doc.pass && f.checks.iter().all(|c| c.ok);
    f
}

impl crate::report::Outputs for PresenceResults {
    const WHAT: &'static str = "presence";

    fn name(&self) -> &str {
        &self.name
    }

    fn markdown(&self) -> String {
        report::markdown(self)
    }

    fn interrupted(&self) -> bool {
        self.interrupted
    }

    fn all_passed(&self) -> bool {
        self.runs
            .iter()
            .all(|r| r.status == "ok" && r.figures.as_ref().is_some_and(|f| f.pass))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openmetrics::Scrape;
    use crate::probe::MachineCpu;
    use crate::redis_info::RedisSnapshot;
    use crate::snapshot::InstanceReading;
    use switchboard_bench_schema::{
        ChurnPhase, EventTally, PresenceTag, WatchPlacement, WatcherSetup,
    };

    fn snapshot(t_s: f64, received: [u64; 4], online: u64, cpu: f64) -> Snapshot {
        let instances = received
            .iter()
            .enumerate()
            .map(|(i, r)| InstanceReading {
                id: format!("n{}", i + 1),
                cpu_s: Some(cpu),
                metrics: Scrape::parse(&format!(
                    "switchboard_presence_events_received_total {r}\n\
                     switchboard_presence_transitions_total{{kind=\"online\"}} {online}\n\
                     switchboard_presence_transitions_total{{kind=\"offline\"}} {online}\n\
                     switchboard_presence_events_delivered_total{{kind=\"presence\"}} {}\n\
                     switchboard_connections 10\n",
                    r * 5
                )),
                scrape_error: None,
            })
            .collect();
        Snapshot {
            t_s,
            instances,
            redis_cpu_s: Some(cpu),
            redis: RedisSnapshot::default(),
            redis_nodes: Vec::new(),
            machine: MachineCpu {
                total_s: 100.0 * t_s,
                idle_s: 50.0 * t_s,
                ..MachineCpu::default()
            },
            bench_cpu_s: Some(0.0),
        }
    }

    fn doc(envelopes: Vec<u64>) -> PresenceRun {
        PresenceRun {
            mode: PresenceTag::Presence,
            phase: PresencePhase::Done,
            pid: 1,
            targets: Vec::new(),
            users: 200,
            user_prefix: "u".into(),
            watcher_prefix: "w".into(),
            presence_grace_ms: 0,
            placement: WatchPlacement {
                watcher_instances: vec![0, 1],
                watches: 2000,
                ..WatchPlacement::default()
            },
            watchers: WatcherSetup::default(),
            churn: ChurnPhase {
                duration_s: 10.0,
                online: 4,
                offline: 4,
                ..ChurnPhase::default()
            },
            events: EventTally {
                expected: 40,
                received: 40,
                expected_envelopes_by_instance: envelopes,
                received_by_instance: vec![20, 20, 0, 0],
                ..EventTally::default()
            },
            pass: true,
            fail_reasons: Vec::new(),
            first_errors: Vec::new(),
            cpu_s: 0.0,
            churn_cpu_s: 0.0,
            elapsed_s: 0.0,
            updated_unix_ms: 0.0,
        }
    }

    #[test]
    fn the_proof_holds_only_when_watcherless_instances_receive_nothing() {
        // Instances n1, n2 received 4 envelopes each; each announced 1+1.
        let before = snapshot(1.0, [0, 0, 0, 0], 0, 1.0);
        let after = snapshot(2.0, [4, 4, 0, 0], 1, 1.5);
        let f = derive(
            &before,
            &after,
            (Some(0.0), Some(0.1)),
            &doc(vec![4, 4, 0, 0]),
        );
        assert!(f.pass, "{:#?}", f.checks);
        assert_eq!(f.instances.len(), 4);
        assert!(f.instances[0].has_watchers && !f.instances[2].has_watchers);
        // 4 instances x 0.5 s over 40 events.
        assert_eq!(f.instance_cpu_us_per_event.map(f64::round), Some(50_000.0));
        assert_eq!(f.events_per_s, 4.0);
        assert!(f.other_cpu_s.is_some());
        // n3 received one: the proof fails.
        let leaky = snapshot(2.0, [4, 4, 1, 0], 1, 1.5);
        let f = derive(
            &before,
            &leaky,
            (Some(0.0), Some(0.1)),
            &doc(vec![4, 4, 0, 0]),
        );
        assert!(!f.pass);
        let failed: Vec<&str> = f
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.what.as_str())
            .collect();
        assert!(
            failed.iter().any(|w| w.starts_with("n3: no watcher")),
            "{failed:?}"
        );
        // The report renders either way.
        let results = PresenceResults {
            schema: SCHEMA.into(),
            name: "t".into(),
            command: "x".into(),
            started_utc: String::new(),
            finished_utc: String::new(),
            machine: crate::report::Machine::default(),
            config: serde_json::json!({"users": 200}),
            method: vec!["m".into()],
            interrupted: false,
            runs: vec![PresenceRecord {
                row: "watched".into(),
                mode: "routed".into(),
                nodes: 4,
                repeat: 1,
                status: "ok".into(),
                error: None,
                wall_s: 1.0,
                instance_ports: Vec::new(),
                instance_command: Vec::new(),
                loader_command: Vec::new(),
                loader_exit: None,
                before: None,
                after: None,
                loader_cpu_s: (None, None),
                loader: None,
                figures: Some(f),
                processes: Vec::new(),
                logs_dir: PathBuf::new(),
            }],
        };
        let md = report::markdown(&results);
        assert!(md.contains("✗ n3: no watcher"), "{md}");
        assert!(md.contains("**FAIL**"));
    }
}
