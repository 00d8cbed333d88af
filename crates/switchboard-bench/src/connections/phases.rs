//! The four phases of the connections workload, each on a fresh cluster of
//! its own (redis-server and instances under JWT auth, pings and the idle
//! timeout pushed out of the way), each stopping every process it started,
//! on success, error or interruption. Every wait is bounded.
//!
//! - `scale`: one instance; batches of connections bring it to each
//!   `--steps` count; after each, its RSS. Then every client closes, and RSS
//!   is followed until `--after-close-s` after the instance counts none.
//! - `drain`: one instance with `--per-instance` connections gets SIGTERM;
//!   the time to its exit, and how its clients saw the end (close 1001).
//! - `storm`: `--storm-instances`; the first, holding `--per-instance`,
//!   gets SIGKILL; its clients reconnect to the survivors, timed from the
//!   kill against the shared [`ReconnectRule`].
//! - `hold-all`: `--per-instance` on every instance, held `--hold-all-s`;
//!   no connection may be lost.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use switchboard_bench_schema::{ConnectionsRun, ReconnectRule, StormTally};
use tokio_util::sync::CancellationToken;

use super::figures::{self, ConnectFigures};
use super::loaders::{Batch, BatchSpec};
use super::record::{
    AfterClose, DrainResult, HoldAllResult, MemorySample, PhaseRecord, ScaleResult, ScaleStep,
    StormPoint, StormResult,
};
use super::Context;
use crate::cli::{ConnectionsPhase, RoutingMode};
use crate::cluster::{self, Cluster, ClusterSpec};
use crate::error::BenchError;
use crate::probe::{self, Memory};
use crate::procs::Supervisor;
use crate::redis_server::RedisTopology;
use crate::snapshot;
use crate::system::System;

/// Server flags that keep pings and the idle timeout out of an idle run.
const IDLE_SERVER_ARGS: [(&str, &str); 2] = [
    ("--ping-interval-ms", "600000"),
    ("--idle-timeout-ms", "900000"),
];
/// How long an instance's count may lag behind its loaders' documents.
const COUNT_WAIT: Duration = Duration::from_secs(10);
/// After-close readings are this far apart.
const AFTER_CLOSE_EVERY: Duration = Duration::from_millis(500);
/// The loaders must have closed everything within this of the stop.
const CLOSE_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for a SIGTERMed instance to exit.
const DRAIN_WAIT: Duration = Duration::from_secs(60);
/// Storm readings are this far apart.
const STORM_EVERY: Duration = Duration::from_millis(100);
/// Reconnects give up this long after their loss (the loaders' default).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A phase's processes, directory and the commands it ran.
pub struct PhaseEnv {
    started: Instant,
    supervisor: Supervisor,
    dir: PathBuf,
    instance_command: Vec<String>,
    loader_commands: Vec<Vec<String>>,
}

impl PhaseEnv {
    fn new(ctx: &Context<'_>, phase: ConnectionsPhase) -> PhaseEnv {
        PhaseEnv {
            started: Instant::now(),
            supervisor: Supervisor::new(Duration::from_secs_f64(ctx.cli.stop_timeout)),
            dir: ctx.logs_dir.join(phase.as_str()),
            instance_command: Vec::new(),
            loader_commands: Vec::new(),
        }
    }

    /// Stops whatever is still running and records the phase.
    async fn finish<T>(mut self, outcome: Result<(), BenchError>, result: T) -> PhaseRecord<T> {
        let processes = self.supervisor.stop_all().await;
        let (status, error) = match &outcome {
            Ok(()) => ("ok", None),
            Err(BenchError::Interrupted) => ("interrupted", Some("interrupted".to_owned())),
            Err(e) => ("error", Some(e.to_string())),
        };
        PhaseRecord {
            status: status.to_owned(),
            error,
            wall_s: self.started.elapsed().as_secs_f64(),
            logs_dir: self.dir,
            instance_command: self.instance_command,
            loader_commands: self.loader_commands,
            processes,
            result,
        }
    }

    async fn cluster(
        &mut self,
        ctx: &Context<'_>,
        nodes: usize,
        cancel: &CancellationToken,
    ) -> Result<Cluster, BenchError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| BenchError::io("create phase dir", &self.dir, e))?;
        let cli = ctx.cli;
        let mut extra_args = Vec::new();
        for (flag, value) in IDLE_SERVER_ARGS {
            if !cli.server_args.iter().any(|a| a.starts_with(flag)) {
                extra_args.push(flag.to_owned());
                extra_args.push(value.to_owned());
            }
        }
        extra_args.extend(cli.server_extra_args());
        let spec = ClusterSpec {
            system: System::Switchboard(RoutingMode::Routed),
            nodes,
            server_bin: ctx.server_bin,
            peer: None,
            redis_bin: &cli.redis_server,
            redis_cli: &cli.redis_cli,
            redis: RedisTopology::Single,
            lease_ms: cli.lease_ms,
            jwt_secret: ctx.jwt_secret,
            extra_args,
            ready_timeout: Duration::from_secs_f64(cli.ready_timeout),
            dir: &self.dir,
        };
        let cluster = cluster::start(&spec, &mut self.supervisor, cancel).await?;
        self.instance_command = cluster.instance_command.clone();
        sleep_or_cancel(Duration::from_millis(cli.settle_ms), cancel).await?;
        Ok(cluster)
    }

    fn batch(&mut self, ctx: &Context<'_>, spec: &BatchSpec<'_>) -> Result<Batch, BenchError> {
        let batch = Batch::start(ctx, &mut self.supervisor, &self.dir, spec)?;
        self.loader_commands
            .extend(batch.loaders.iter().map(|l| l.command.clone()));
        eprintln!(
            "[bench] {}: {} connections from {} loader process(es)",
            spec.label,
            spec.connections,
            batch.loaders.len()
        );
        Ok(batch)
    }
}

/// Runs the scale phase.
pub async fn scale(ctx: &Context<'_>, cancel: &CancellationToken) -> PhaseRecord<ScaleResult> {
    let mut env = PhaseEnv::new(ctx, ConnectionsPhase::Scale);
    let mut result = ScaleResult::default();
    let outcome = run_scale(ctx, &mut env, &mut result, cancel).await;
    env.finish(outcome, result).await
}

async fn run_scale(
    ctx: &Context<'_>,
    env: &mut PhaseEnv,
    result: &mut ScaleResult,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let cli = ctx.cli;
    let cluster = env.cluster(ctx, 1, cancel).await?;
    let instance = cluster.instances[0].clone();
    result.instance = instance.id.clone();
    let baseline = memory_of(instance.pid)?;
    result.baseline = Some(baseline);
    eprintln!("[bench] scale: baseline RSS {} KiB", baseline.rss_kib);

    let mut batches: Vec<Batch> = Vec::new();
    let (mut previous_target, mut previous) = (0u32, (baseline, 0.0f64));
    let mut expected = 0u64;
    for &target in &cli.steps {
        let label = format!("scale-{target}");
        let overflows_before = probe::listen_overflows();
        let batch = env.batch(
            ctx,
            &BatchSpec {
                label: &label,
                target: ws_url(instance.port),
                reconnect_targets: Vec::new(),
                connections: target - previous_target,
            },
        )?;
        let docs = batch
            .wait_connected(&mut env.supervisor, connect_deadline(ctx), cancel)
            .await;
        batches.push(batch);
        let docs = docs?;
        let connect = ConnectFigures::of(&docs).with_overflows(overflows_before);
        expected += connect.connected;
        wait_for_count(&cluster, &[0], expected as f64, cancel).await?;
        sleep_or_cancel(Duration::from_millis(cli.rss_settle_ms), cancel).await?;
        let connections = connections_of(&cluster, &[0]).await.unwrap_or(0.0);
        let memory = memory_of(instance.pid)?;
        let step = ScaleStep {
            target,
            connections,
            memory,
            total_kib_per_connection: figures::total_per_connection(
                memory.rss_kib,
                baseline.rss_kib,
                connections,
            ),
            marginal_kib_per_connection: figures::marginal_per_connection(
                memory.rss_kib,
                connections,
                previous.0.rss_kib,
                previous.1,
            ),
            total_anon_kib_per_connection: anon_pair(memory, baseline)
                .and_then(|(now, base)| figures::total_per_connection(now, base, connections)),
            marginal_anon_kib_per_connection: anon_pair(memory, previous.0).and_then(
                |(now, before)| {
                    figures::marginal_per_connection(now, connections, before, previous.1)
                },
            ),
            connect,
            loaders: docs,
        };
        eprintln!(
            "[bench] scale {target}: {connections} connections, RSS {} KiB: {} KiB per connection \
             (marginal {}), {} handshakes/s, {} failed",
            memory.rss_kib,
            fmt(step.total_kib_per_connection),
            fmt(step.marginal_kib_per_connection),
            fmt(step.connect.handshakes_per_s),
            step.connect.failed
        );
        result.steps.push(step);
        previous = (memory, connections);
        previous_target = target;
    }

    // Every client closes; the instance's memory is followed from then on.
    let mut after = AfterClose {
        connections_before: connections_of(&cluster, &[0]).await,
        after_s: cli.after_close_s,
        ..AfterClose::default()
    };
    let stop_at = Instant::now();
    for batch in &batches {
        batch.ask_to_stop(&mut env.supervisor);
    }
    let give_up = stop_at + CLOSE_WAIT + Duration::from_secs_f64(cli.after_close_s);
    let mut closed_at: Option<Instant> = None;
    loop {
        let connections = connections_of(&cluster, &[0]).await;
        let memory = probe::process_memory(instance.pid);
        let now = Instant::now();
        after.samples.push(MemorySample {
            t_s: round3(now.duration_since(stop_at).as_secs_f64()),
            connections,
            memory,
        });
        if closed_at.is_none() && connections == Some(0.0) {
            closed_at = Some(now);
            after.closed_after_s = Some(round3(now.duration_since(stop_at).as_secs_f64()));
        }
        if let Some(at) = closed_at {
            if now.duration_since(at).as_secs_f64() >= cli.after_close_s {
                after.memory_after = memory;
                break;
            }
        }
        if now >= give_up {
            break;
        }
        sleep_or_cancel(AFTER_CLOSE_EVERY, cancel).await?;
    }
    for batch in &batches {
        after.loaders.extend(batch.stop(&mut env.supervisor).await);
    }
    let after_rss = after.memory_after.map(|m| m.rss_kib);
    result.after_close = Some(after);
    match after_rss {
        Some(rss) => eprintln!(
            "[bench] scale: RSS {rss} KiB {} s after the last connection closed (baseline {} KiB)",
            cli.after_close_s, baseline.rss_kib
        ),
        None => {
            return Err(BenchError::Loader(
                "the instance still counted connections after every loader was told to close"
                    .into(),
            ))
        }
    }
    check_alive(&cluster, &mut env.supervisor, None)
}

/// Runs the drain phase.
pub async fn drain(ctx: &Context<'_>, cancel: &CancellationToken) -> PhaseRecord<DrainResult> {
    let mut env = PhaseEnv::new(ctx, ConnectionsPhase::Drain);
    let mut result = DrainResult::default();
    let outcome = run_drain(ctx, &mut env, &mut result, cancel).await;
    env.finish(outcome, result).await
}

async fn run_drain(
    ctx: &Context<'_>,
    env: &mut PhaseEnv,
    result: &mut DrainResult,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let cli = ctx.cli;
    let cluster = env.cluster(ctx, 1, cancel).await?;
    let instance = cluster.instances[0].clone();
    let overflows_before = probe::listen_overflows();
    let batch = env.batch(
        ctx,
        &BatchSpec {
            label: "drain",
            target: ws_url(instance.port),
            reconnect_targets: Vec::new(),
            connections: cli.per_instance(),
        },
    )?;
    let docs = batch
        .wait_connected(&mut env.supervisor, connect_deadline(ctx), cancel)
        .await?;
    result.connect = ConnectFigures::of(&docs).with_overflows(overflows_before);
    wait_for_count(&cluster, &[0], result.connect.connected as f64, cancel).await?;
    sleep_or_cancel(Duration::from_millis(cli.rss_settle_ms), cancel).await?;
    result.connections = connections_of(&cluster, &[0]).await;
    result.memory = probe::process_memory(instance.pid);
    check_alive(&cluster, &mut env.supervisor, None)?;

    let sigterm_unix_ms = unix_ms();
    let sigterm_at = Instant::now();
    if !env.supervisor.signal(instance.pid, Signal::SIGTERM) {
        return Err(BenchError::Loader(format!(
            "could not signal {} (pid {})",
            instance.id, instance.pid
        )));
    }
    let status = tokio::select! {
        _ = cancel.cancelled() => return Err(BenchError::Interrupted),
        status = env.supervisor.wait_exit(instance.pid, DRAIN_WAIT) => status,
    };
    if status.is_some() {
        result.exit_s = Some(round3(sigterm_at.elapsed().as_secs_f64()));
    }
    result.exit_status = status;
    // With every connection gone the loaders end by themselves.
    batch
        .wait_exited(&mut env.supervisor, Duration::from_secs(10))
        .await;
    let docs = batch.stop(&mut env.supervisor).await;
    result.closes_by_cause = figures::losses_by_cause(&docs);
    result.saw_1001 = result
        .closes_by_cause
        .get("close 1001")
        .copied()
        .unwrap_or(0);
    result.last_close_s = figures::last_loss_unix_ms(&docs)
        .map(|t| round3(((t - sigterm_unix_ms) / 1000.0).max(0.0)));
    result.loaders = docs;
    eprintln!(
        "[bench] drain: {} connections, SIGTERM to exit {} s ({}), {} clients saw close 1001, \
         last close after {} s",
        fmt(result.connections),
        fmt(result.exit_s),
        result.exit_status.as_deref().unwrap_or("did not exit"),
        result.saw_1001,
        fmt(result.last_close_s)
    );
    if result.exit_s.is_none() {
        return Err(BenchError::Loader(format!(
            "{} did not exit within {} s of SIGTERM",
            instance.id,
            DRAIN_WAIT.as_secs()
        )));
    }
    Ok(())
}

/// Runs the storm phase.
pub async fn storm(ctx: &Context<'_>, cancel: &CancellationToken) -> PhaseRecord<StormResult> {
    let mut env = PhaseEnv::new(ctx, ConnectionsPhase::Storm);
    let mut result = StormResult {
        rule: rule(ctx).describe(),
        ..StormResult::default()
    };
    let outcome = run_storm(ctx, &mut env, &mut result, cancel).await;
    env.finish(outcome, result).await
}

fn rule(ctx: &Context<'_>) -> ReconnectRule {
    ReconnectRule {
        within_s: ctx.cli.storm_within_s,
    }
}

async fn run_storm(
    ctx: &Context<'_>,
    env: &mut PhaseEnv,
    result: &mut StormResult,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let cli = ctx.cli;
    let cluster = env.cluster(ctx, cli.storm_instances, cancel).await?;
    let victim = cluster.instances[0].clone();
    let survivors: Vec<usize> = (1..cluster.instances.len()).collect();
    result.instances = cluster.instances.len();
    result.victim = victim.id.clone();
    result.survivors = survivors
        .iter()
        .map(|&i| cluster.instances[i].id.clone())
        .collect();
    let overflows_before = probe::listen_overflows();
    let batch = env.batch(
        ctx,
        &BatchSpec {
            label: "storm",
            target: ws_url(victim.port),
            reconnect_targets: survivors
                .iter()
                .map(|&i| ws_url(cluster.instances[i].port))
                .collect(),
            connections: cli.per_instance(),
        },
    )?;
    let docs = batch
        .wait_connected(&mut env.supervisor, connect_deadline(ctx), cancel)
        .await?;
    result.connect = ConnectFigures::of(&docs).with_overflows(overflows_before);
    wait_for_count(&cluster, &[0], result.connect.connected as f64, cancel).await?;
    sleep_or_cancel(Duration::from_millis(cli.rss_settle_ms), cancel).await?;
    let on_victim = connections_of(&cluster, &[0]).await;
    result.connections_on_victim = on_victim;
    let before = connections_of(&cluster, &survivors).await.unwrap_or(0.0);
    check_alive(&cluster, &mut env.supervisor, None)?;

    let overflows_at_kill = probe::listen_overflows();
    let killed_unix_ms = unix_ms();
    let killed_at = Instant::now();
    if !env.supervisor.signal(victim.pid, Signal::SIGKILL) {
        return Err(BenchError::Loader(format!(
            "could not kill {} (pid {})",
            victim.id, victim.pid
        )));
    }
    result.killed_unix_ms = Some(killed_unix_ms);
    let _ = env
        .supervisor
        .wait_exit(victim.pid, Duration::from_secs(5))
        .await;
    let expected = on_victim.unwrap_or(result.connect.connected as f64);
    let give_up = killed_at + RECONNECT_TIMEOUT + Duration::from_secs(2);
    loop {
        let held = connections_of(&cluster, &survivors).await.unwrap_or(0.0) - before;
        let t_s = round3(killed_at.elapsed().as_secs_f64());
        result.timeline.push(StormPoint {
            t_s,
            survivors_connections: held,
        });
        if held >= expected {
            result.survivors_full_s = Some(t_s);
            break;
        }
        if Instant::now() >= give_up {
            break;
        }
        sleep_or_cancel(STORM_EVERY, cancel).await?;
    }
    // The documents are rewritten about once a second: wait for one that
    // has no reconnect left pending.
    let settled_by = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settled_by && !reconnects_settled(&batch.documents()) {
        sleep_or_cancel(STORM_EVERY, cancel).await?;
    }
    result.listen_overflows = overflows_since(overflows_at_kill);
    let docs = batch.stop(&mut env.supervisor).await;
    result.tally = StormTally::of(&docs, expected as u64, killed_unix_ms);
    // By instance id rather than by URL.
    result.by_target = figures::reconnects_by_target(&docs)
        .into_iter()
        .map(|(url, n)| {
            let id = cluster
                .instances
                .iter()
                .find(|i| ws_url(i.port) == url)
                .map_or(url, |i| i.id.clone());
            (id, n)
        })
        .collect();
    (
        result.reconnect_p50_ms_max,
        result.reconnect_p99_ms_max,
        result.reconnect_max_ms,
    ) = figures::reconnect_latency_max(&docs);
    result.failures = rule(ctx).failures(&result.tally);
    result.pass = result.failures.is_empty();
    result.loaders = docs;
    eprintln!(
        "[bench] storm: {} of {} clients back on the survivors, last {} s after the kill, {} \
         failed: {}",
        result.tally.reconnected,
        result.tally.expected,
        fmt(result.tally.storm_s),
        result.tally.failed,
        if result.pass {
            "PASS".to_owned()
        } else {
            format!("FAIL ({})", result.failures.join("; "))
        }
    );
    check_alive(&cluster, &mut env.supervisor, Some(victim.pid))
}

/// Whether every document says its reconnects are over.
fn reconnects_settled(docs: &[Option<ConnectionsRun>]) -> bool {
    docs.iter().all(|d| {
        d.as_ref()
            .and_then(|d| d.reconnect.as_ref())
            .is_some_and(|r| r.pending == 0 && r.reconnected + r.failed >= r.started)
    })
}

/// Runs the hold-all phase.
pub async fn hold_all(ctx: &Context<'_>, cancel: &CancellationToken) -> PhaseRecord<HoldAllResult> {
    let mut env = PhaseEnv::new(ctx, ConnectionsPhase::HoldAll);
    let mut result = HoldAllResult::default();
    let outcome = run_hold_all(ctx, &mut env, &mut result, cancel).await;
    env.finish(outcome, result).await
}

async fn run_hold_all(
    ctx: &Context<'_>,
    env: &mut PhaseEnv,
    result: &mut HoldAllResult,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let cli = ctx.cli;
    let cluster = env.cluster(ctx, cli.storm_instances, cancel).await?;
    let all: Vec<usize> = (0..cluster.instances.len()).collect();
    result.instances = all.len();
    result.per_instance = cli.per_instance();
    let overflows_before = probe::listen_overflows();
    let mut batches = Vec::new();
    for instance in &cluster.instances {
        let label = format!("hold-{}", instance.id);
        batches.push(env.batch(
            ctx,
            &BatchSpec {
                label: &label,
                target: ws_url(instance.port),
                reconnect_targets: Vec::new(),
                connections: cli.per_instance(),
            },
        )?);
    }
    let deadline = connect_deadline(ctx);
    let mut docs = Vec::new();
    for batch in &batches {
        docs.extend(
            batch
                .wait_connected(&mut env.supervisor, deadline, cancel)
                .await?,
        );
    }
    result.connect = ConnectFigures::of(&docs).with_overflows(overflows_before);
    wait_for_count(&cluster, &all, result.connect.connected as f64, cancel).await?;
    let at_start = connections_of(&cluster, &all).await;
    result.connections_at_start = at_start;
    eprintln!(
        "[bench] hold-all: {} connections on {} instances; holding {} s",
        fmt(at_start),
        all.len(),
        cli.hold_all_s
    );
    let started = Instant::now();
    let hold = Duration::from_secs_f64(cli.hold_all_s);
    let mut min = at_start;
    while started.elapsed() < hold {
        sleep_or_cancel(
            Duration::from_secs(1).min(hold - started.elapsed().min(hold)),
            cancel,
        )
        .await?;
        if let Some(now) = connections_of(&cluster, &all).await {
            min = Some(min.map_or(now, |m: f64| m.min(now)));
        }
    }
    result.held_s = round3(started.elapsed().as_secs_f64());
    result.min_connections = min;
    result.memory = cluster
        .instances
        .iter()
        .map(|i| (i.id.clone(), probe::process_memory(i.pid)))
        .collect();
    check_alive(&cluster, &mut env.supervisor, None)?;
    for batch in &batches {
        result.loaders.extend(batch.stop(&mut env.supervisor).await);
    }
    result.lost = result.loaders.iter().map(|d| d.hold.lost).sum();
    let requested = u64::from(result.per_instance) * all.len() as u64;
    if result.connect.connected < requested {
        result.failures.push(format!(
            "only {} of {requested} connections opened",
            result.connect.connected
        ));
    }
    if result.lost > 0 {
        result
            .failures
            .push(format!("{} connections were lost", result.lost));
    }
    if min.is_some_and(|m| m < result.connect.connected as f64) {
        result.failures.push(format!(
            "the instances counted as few as {} connections during the hold",
            fmt(min)
        ));
    }
    result.pass = result.failures.is_empty();
    eprintln!(
        "[bench] hold-all: held {} s, fewest {} connections, {} lost: {}",
        result.held_s,
        fmt(min),
        result.lost,
        if result.pass { "PASS" } else { "FAIL" }
    );
    Ok(())
}

/// When a batch must have finished connecting: its loaders' own
/// `--connect-timeout`, plus time to start and write.
fn connect_deadline(ctx: &Context<'_>) -> Instant {
    Instant::now() + Duration::from_secs_f64(ctx.cli.connect_timeout) + Duration::from_secs(10)
}

fn ws_url(port: u16) -> String {
    format!("ws://127.0.0.1:{port}")
}

/// `switchboard_connections` summed over these instances (`None`: a scrape failed).
async fn connections_of(cluster: &Cluster, instances: &[usize]) -> Option<f64> {
    let scrapes = snapshot::scrape_all(cluster).await;
    let mut total = 0.0;
    for &i in instances {
        total += scrapes
            .get(i)?
            .as_ref()
            .ok()?
            .sum("switchboard_connections", None);
    }
    Some(total)
}

/// Waits until these instances count at least `expected` connections.
async fn wait_for_count(
    cluster: &Cluster,
    instances: &[usize],
    expected: f64,
    cancel: &CancellationToken,
) -> Result<f64, BenchError> {
    let deadline = Instant::now() + COUNT_WAIT;
    loop {
        let now = connections_of(cluster, instances).await;
        if now.is_some_and(|n| n >= expected) || Instant::now() >= deadline {
            if now.is_none_or(|n| n < expected) {
                eprintln!(
                    "[bench] note: the instances count {} connections, the loaders {expected}",
                    fmt(now)
                );
            }
            return Ok(now.unwrap_or(0.0));
        }
        sleep_or_cancel(Duration::from_millis(50), cancel).await?;
    }
}

/// Listen overflows since a reading (`None` if either is unreadable).
pub fn overflows_since(before: Option<u64>) -> Option<u64> {
    Some(probe::listen_overflows()?.saturating_sub(before?))
}

impl ConnectFigures {
    /// Records the listen overflows since `before`.
    fn with_overflows(mut self, before: Option<u64>) -> ConnectFigures {
        self.listen_overflows = overflows_since(before);
        self
    }
}

fn memory_of(pid: u32) -> Result<Memory, BenchError> {
    probe::process_memory(pid)
        .ok_or_else(|| BenchError::Report(format!("cannot read /proc/{pid}/status")))
}

fn anon_pair(now: Memory, before: Memory) -> Option<(u64, u64)> {
    Some((now.anon_kib?, before.anon_kib?))
}

/// Errors if redis or an instance (other than `except`) has exited.
fn check_alive(
    cluster: &Cluster,
    supervisor: &mut Supervisor,
    except: Option<u32>,
) -> Result<(), BenchError> {
    for (name, pid) in cluster.processes() {
        if Some(pid) == except {
            continue;
        }
        if let Some(status) = supervisor.try_exited(pid) {
            return Err(BenchError::ExitedEarly {
                name,
                status,
                log_tail: supervisor.log_tail(pid, 20),
            });
        }
    }
    Ok(())
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> Result<(), BenchError> {
    tokio::select! {
        _ = cancel.cancelled() => Err(BenchError::Interrupted),
        _ = tokio::time::sleep(d) => Ok(()),
    }
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
