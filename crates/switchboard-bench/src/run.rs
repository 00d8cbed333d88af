//! One measured run: start a cluster (a system, i.e. Switchboard's routing
//! mode or the Socket.IO peer's adapter, x N instances), start the loader
//! against it (in the system's protocol), take a "before" and an "after" snapshot around the
//! measured window, sample a timeline in between, stop every process, and
//! derive the figures.
//!
//! The window starts when the loader's connect phase is over: the sum of
//! the instances' connections gauge (`switchboard_connections`, the peer's
//! welcomed sockets) reaches the expected connections (polled every 20 ms). For a plain run it ends after the drain and before the teardown:
//! from 200 ms before the end of the send phase a full snapshot is taken
//! every 20 ms, and
//! - once the send phase is over (+50 ms), three quiet intervals in a row
//!   (the instances queued at most a couple of frames) end it there;
//! - if a snapshot sees connections drop (the loader is closing; not checked
//!   with churn), the previous snapshot, taken with every user still
//!   connected, becomes "after";
//! - if the loader exits first, the window ends at the last poll (every user
//!   still connected), or at the exit when there was none.
//!
//! With --find-max the cluster goes quiet between steps, so the window ends
//! when the loader exits: it spans the whole ladder, its pauses and its final
//! disconnects. Every wait is bounded, and every process is stopped by pid on
//! success, on error and on interruption.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchboard_bench_schema::{LoaderOutput, Workload};
use tokio_util::sync::CancellationToken;

use crate::cli::Cli;
use crate::cluster::{self, Cluster, ClusterSpec};
use crate::derive::{self, Derived};
use crate::error::BenchError;
use crate::peer::PeerSetup;
use crate::procs::{Stopped, Supervisor};
use crate::redis_server::{ClusterRecord, RedisTopology};
use crate::snapshot::{self, Snapshot, TimelinePoint};
use crate::system::System;

/// How the measured window started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowStart {
    /// Every user was connected: the intended case.
    AllConnected,
    /// Not every user connected within --connect-timeout; the window started anyway.
    ConnectTimeout,
    /// The loader exited before every user was connected.
    LoaderExited,
}

/// How the measured window ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowEnd {
    /// Send phase over and no frames for two poll intervals: drained.
    Quiet,
    /// The loader began closing its connections (its measurement was over).
    LoaderClosing,
    /// The loader exited (its final disconnects are inside the window).
    LoaderExited,
    /// The loader closed and exited between two polls: the last poll, taken
    /// with every user still connected, ends the window (as with
    /// `LoaderClosing`, the teardown stays outside).
    BeforeLoaderExit,
}

/// How often the end of the window is polled once the send phase is over.
const END_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// At most this many frames queued by all instances in one poll interval
/// count as quiet (a stray ping, no traffic).
const QUIET_FRAMES: f64 = 2.0;
/// Quiet intervals in a row that end the window.
const QUIET_POLLS: u32 = 3;

/// Everything recorded about one run, raw and derived.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// The system: Switchboard's routing mode (`routed`, ...), or the
    /// Socket.IO peer's `socketio-<adapter>`.
    pub mode: String,
    /// Number of instances.
    pub nodes: usize,
    /// `ok`, `error` or `interrupted`.
    pub status: String,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Wall time of the whole run (start to everything stopped), s.
    pub wall_s: f64,
    /// Port of the run's redis-server (a Redis Cluster: its first node's).
    pub redis_port: Option<u16>,
    /// A Redis Cluster (`--redis-cluster`): its shape, its nodes (role,
    /// slots, pid) and which master serves each instance's personal channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cluster: Option<ClusterRecord>,
    /// `id -> port` of the instances.
    pub instance_ports: Vec<(String, u16)>,
    /// The first instance's command line.
    pub instance_command: Vec<String>,
    /// The loader's command line.
    pub loader_command: Vec<String>,
    /// How the loader exited.
    pub loader_exit: Option<String>,
    /// How the window started.
    pub window_start: Option<WindowStart>,
    /// Connections counted by the instances when the window started.
    pub connections_at_start: Option<f64>,
    /// How the window ended.
    pub window_end: Option<WindowEnd>,
    /// Readings when the window started.
    pub before: Option<Snapshot>,
    /// Readings when the window ended.
    pub after: Option<Snapshot>,
    /// The loader's result document.
    pub loader: Option<LoaderOutput>,
    /// Figures derived from the above.
    pub derived: Option<Derived>,
    /// CPU / connections / delivered sampled every --sample-ms.
    pub timeline: Vec<TimelinePoint>,
    /// How every process of the run ended.
    pub processes: Vec<Stopped>,
    /// Where the logs of this run are.
    pub logs_dir: PathBuf,
}

/// Binaries and settings shared by every run.
pub struct RunContext<'a> {
    /// The command line.
    pub cli: &'a Cli,
    /// The `switchboard` binary.
    pub server_bin: PathBuf,
    /// The `switchboard-load` binary.
    pub loader_bin: PathBuf,
    /// The Socket.IO peer, when the matrix has its rows.
    pub peer: Option<PeerSetup>,
    /// Where each run's logs go, one directory per run.
    pub logs_dir: PathBuf,
}

/// What a run measured before the processes were stopped.
#[derive(Default)]
struct Measured {
    redis_port: Option<u16>,
    redis_cluster: Option<ClusterRecord>,
    instance_ports: Vec<(String, u16)>,
    instance_command: Vec<String>,
    loader_command: Vec<String>,
    loader_exit: Option<String>,
    window_start: Option<WindowStart>,
    connections_at_start: Option<f64>,
    window_end: Option<WindowEnd>,
    before: Option<Snapshot>,
    after: Option<Snapshot>,
    loader: Option<LoaderOutput>,
    timeline: Vec<TimelinePoint>,
}

/// Runs one (row, N) cell of the matrix: a system with a --dm-store variant
/// on one Redis. Never returns an error: failures are recorded in the
/// [`RunRecord`] so the matrix can go on.
pub async fn run_one(
    ctx: &RunContext<'_>,
    (system, dm_store, redis): (System, Option<bool>, RedisTopology),
    nodes: usize,
    cancel: &CancellationToken,
) -> RunRecord {
    let started = Instant::now();
    let row = crate::cli::row_name(system, dm_store, redis);
    let dir = ctx.logs_dir.join(format!("{row}-n{nodes}"));
    let mut supervisor = Supervisor::new(Duration::from_secs_f64(ctx.cli.stop_timeout));
    let mut measured = Measured::default();
    let result = match std::fs::create_dir_all(&dir) {
        Ok(()) => {
            measure(
                ctx,
                (system, dm_store, redis),
                nodes,
                &dir,
                &mut supervisor,
                &mut measured,
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
    let mut derived = None;
    if let (Some(before), Some(after), Some(loader)) =
        (&measured.before, &measured.after, &measured.loader)
    {
        let mut d = derive::derive(
            before,
            after,
            loader,
            &ctx.cli.pass_rule(),
            system.metric_names(),
        );
        match measured.window_start {
            Some(WindowStart::AllConnected) => {}
            Some(WindowStart::ConnectTimeout) => d.warnings.push(
                "not every user connected within --connect-timeout; the window \
                 started anyway"
                    .into(),
            ),
            Some(WindowStart::LoaderExited) | None => d
                .warnings
                .push("the loader exited before every user was connected".into()),
        }
        if let Some(status) = measured
            .loader_exit
            .as_ref()
            .filter(|s| s.as_str() != "exit status: 0")
        {
            d.warnings.push(format!("loader exited with {status}"));
        }
        if ctx
            .cli
            .loader_args
            .iter()
            .any(|a| a.starts_with("--warmup"))
        {
            d.warnings.push(
                "--warmup: the loader's warmup falls inside the window but its \
                 deliveries are not counted, so per-message costs read high"
                    .into(),
            );
        }
        for p in &processes {
            // The loader and `redis-cli --cluster create` are meant to exit.
            if p.exited_by_itself && p.name != "loader" && p.name != "redis-cli" {
                d.warnings
                    .push(format!("{} exited during the run: {}", p.name, p.status));
            }
        }
        derived = Some(d);
    }
    RunRecord {
        mode: row,
        nodes,
        status: status.to_owned(),
        error,
        wall_s: started.elapsed().as_secs_f64(),
        redis_port: measured.redis_port,
        redis_cluster: measured.redis_cluster,
        instance_ports: measured.instance_ports,
        instance_command: measured.instance_command,
        loader_command: measured.loader_command,
        loader_exit: measured.loader_exit,
        window_start: measured.window_start,
        connections_at_start: measured.connections_at_start,
        window_end: measured.window_end,
        before: measured.before,
        after: measured.after,
        loader: measured.loader,
        derived,
        timeline: measured.timeline,
        processes,
        logs_dir: dir,
    }
}

async fn measure(
    ctx: &RunContext<'_>,
    (system, dm_store, redis): (System, Option<bool>, RedisTopology),
    nodes: usize,
    dir: &Path,
    supervisor: &mut Supervisor,
    m: &mut Measured,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let cli = ctx.cli;
    let run_start = Instant::now();
    let spec = ClusterSpec {
        system,
        nodes,
        server_bin: &ctx.server_bin,
        peer: ctx.peer.as_ref(),
        redis_bin: &cli.redis_server,
        redis_cli: &cli.redis_cli,
        redis,
        lease_ms: cli.lease_ms,
        jwt_secret: None,
        extra_args: cli.server_extra_args(),
        ready_timeout: Duration::from_secs_f64(cli.ready_timeout),
        dir,
    };
    let mut cluster = cluster::start(&spec, supervisor, cancel).await?;
    m.redis_port = Some(cluster.redis.first_port());
    m.redis_cluster = cluster.redis_cluster.clone();
    m.instance_command = cluster.instance_command.clone();
    m.instance_ports = cluster
        .instances
        .iter()
        .map(|i| (i.id.clone(), i.port))
        .collect();
    sleep_or_cancel(Duration::from_millis(cli.settle_ms), cancel).await?;

    let loader_out = dir.join("loader.json");
    let mut args = vec![
        "--targets".to_owned(),
        cluster.targets(),
        "--protocol".to_owned(),
        system.protocol().as_str().to_owned(),
    ];
    args.extend(cli.loader_workload_args());
    if let Some(store) = dm_store {
        args.push("--dm-store".to_owned());
        args.push(store.to_string());
    }
    args.push("--out".to_owned());
    args.push(loader_out.to_string_lossy().into_owned());
    m.loader_command = std::iter::once(ctx.loader_bin.to_string_lossy().into_owned())
        .chain(args.iter().cloned())
        .collect();
    let loader_started = Instant::now();
    let loader_pid = supervisor.spawn(
        "loader",
        &ctx.loader_bin,
        &args,
        &dir.join("loader.log"),
        false,
    )?;
    let loader_deadline = loader_started + Duration::from_secs_f64(cli.loader_timeout_s());

    // Window start: every user connected.
    let connect_deadline = loader_started + Duration::from_secs_f64(cli.connect_timeout);
    let users = cli.expected_connections();
    loop {
        if cancel.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        let connected =
            snapshot::connections(&snapshot::scrape_all(&cluster).await, system.metric_names());
        m.connections_at_start = Some(connected);
        if connected >= users {
            m.window_start = Some(WindowStart::AllConnected);
            break;
        }
        if supervisor.try_exited(loader_pid).is_some() {
            m.window_start = Some(WindowStart::LoaderExited);
            break;
        }
        if Instant::now() >= connect_deadline {
            m.window_start = Some(WindowStart::ConnectTimeout);
            eprintln!(
                "[bench] only {connected} of {users} connections up after {} s; measuring anyway",
                cli.connect_timeout
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.before = Some(snapshot::take(&mut cluster, run_start).await?);

    // Window: until the loader starts closing (or exits), sampling the timeline.
    let window_started = Instant::now();
    let poll_end = !cli.find_max;
    let end_on_close = cli.workload != Workload::Churn;
    // Polls begin a little before the send phase ends, so that a poll taken
    // with every user still connected exists even when the loader drains and
    // closes within one interval; "quiet" only counts after the send phase.
    let send_end = window_started + Duration::from_secs_f64(cli.duration);
    let mut next_end_poll = send_end
        .checked_sub(Duration::from_millis(200))
        .unwrap_or(window_started)
        .max(window_started);
    let quiet_from = send_end + Duration::from_millis(50);
    let mut last_frames: Option<f64> = None;
    let mut quiet_polls = 0;
    let mut previous_poll: Option<Snapshot> = None;
    let connected_at_start = m.connections_at_start.unwrap_or(users);
    let sample_every = (cli.sample_ms > 0).then(|| Duration::from_millis(cli.sample_ms));
    let mut next_sample = Instant::now();
    let mut exit_status = None;
    loop {
        if let Some(status) = supervisor.try_exited(loader_pid) {
            exit_status = Some(status);
            end_at_exit(m, previous_poll.take());
            break;
        }
        let now = Instant::now();
        if now >= loader_deadline {
            return Err(loader_timed_out(cli, dir, supervisor, loader_pid).await);
        }
        if poll_end && now >= next_end_poll {
            // A full snapshot per poll: when the next poll sees the loader
            // closing, this one (all still connected) becomes "after", so the
            // teardown stays outside the window.
            let snap = snapshot::take(&mut cluster, run_start).await?;
            if snap.instances.iter().all(|i| i.scrape_error.is_none()) {
                if end_on_close && snap.connections(system.metric_names()) < connected_at_start {
                    m.window_end = Some(WindowEnd::LoaderClosing);
                    m.after = Some(previous_poll.take().unwrap_or(snap));
                    break;
                }
                let frames = snap.frames_queued(system.metric_names());
                match last_frames {
                    Some(last) if frames - last <= QUIET_FRAMES && now >= quiet_from => {
                        quiet_polls += 1
                    }
                    _ => quiet_polls = 0,
                }
                last_frames = Some(frames);
                if quiet_polls >= QUIET_POLLS {
                    m.window_end = Some(WindowEnd::Quiet);
                    m.after = Some(snap);
                    break;
                }
                previous_poll = Some(snap);
            }
            next_end_poll = Instant::now() + END_POLL_INTERVAL;
        }
        if let Some(every) = sample_every {
            if now >= next_sample {
                m.timeline
                    .push(snapshot::timeline_point(&cluster, run_start).await);
                next_sample = now + every;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(BenchError::Interrupted),
            status = supervisor.wait_exit(loader_pid, Duration::from_millis(10)) => {
                if let Some(status) = status {
                    exit_status = Some(status);
                    end_at_exit(m, previous_poll.take());
                    break;
                }
            }
        }
    }
    if m.after.is_none() {
        m.after = Some(snapshot::take(&mut cluster, run_start).await?);
    }
    let exit_status = match exit_status {
        Some(status) => status,
        None => {
            let left = loader_deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                _ = cancel.cancelled() => return Err(BenchError::Interrupted),
                status = supervisor.wait_exit(loader_pid, left) => match status {
                    Some(status) => status,
                    None => return Err(loader_timed_out(cli, dir, supervisor, loader_pid).await),
                },
            }
        }
    };
    m.loader_exit = Some(exit_status.clone());

    let text = std::fs::read_to_string(&loader_out).map_err(|e| {
        BenchError::Loader(format!(
            "exited ({exit_status}) without readable output {}: {e}; last log lines:\n{}",
            loader_out.display(),
            supervisor.log_tail(loader_pid, 20)
        ))
    })?;
    let output: LoaderOutput = serde_json::from_str(&text).map_err(|e| {
        BenchError::Loader(format!(
            "{} is not a loader result document: {e}",
            loader_out.display()
        ))
    })?;
    m.loader = Some(output);
    if !exit_status.contains("exit status: 0") {
        // The JSON is kept (a failed pass rule may exit non-zero), but flagged.
        eprintln!("[bench] loader exited with {exit_status}");
    }
    check_instances_alive(&cluster, supervisor)
}

/// Ends the window when the loader has exited: at the last poll if there
/// was one (every user was connected then), else at the exit.
fn end_at_exit(m: &mut Measured, last_poll: Option<Snapshot>) {
    match last_poll {
        Some(poll) => {
            m.window_end = Some(WindowEnd::BeforeLoaderExit);
            m.after = Some(poll);
        }
        None => m.window_end = Some(WindowEnd::LoaderExited),
    }
}

/// Stops a loader that overran --run-timeout and says so.
async fn loader_timed_out(
    cli: &Cli,
    dir: &Path,
    supervisor: &mut Supervisor,
    loader_pid: u32,
) -> BenchError {
    supervisor.stop(loader_pid).await;
    BenchError::Loader(format!(
        "did not finish within {} s (--run-timeout); last log lines:\n{}",
        cli.loader_timeout_s(),
        crate::procs::tail_of_file(&dir.join("loader.log"), 20)
    ))
}

/// Errors if an instance or a Redis node died during the window.
pub fn check_instances_alive(
    cluster: &Cluster,
    supervisor: &mut Supervisor,
) -> Result<(), BenchError> {
    for (name, pid) in cluster.processes() {
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
