//! `switchboard-load`: the load generator for Switchboard.
//!
//! Connects `--users` users (`--conns-per-user` WebSocket connections each)
//! to the `--targets` instances, offers an open-loop message rate
//! (`--workload dm|room|mixed|churn`) for `--duration` seconds, waits at most
//! `--drain` seconds for outstanding deliveries, and prints one JSON summary
//! (the `switchboard-bench-schema` document): counts (sent, acked, expected,
//! delivered, lost, duplicated, out of order), end-to-end and ack latency
//! quantiles, and its own CPU use. `--find-max` raises the rate step by step
//! until a step fails the shared pass rule (by default the Socket.IO peer
//! benchmark's: delivered >= 99% and p99 <= 100 ms, plus no duplicates,
//! misroutes or lost connections).
//!
//! `--protocol socketio` drives the Socket.IO peer of `bench/peers/socketio`
//! instead (Engine.IO 4 / Socket.IO 5 over WebSocket) with the same
//! workloads, measurement and pass rule, so both systems face one load
//! generator (the connections workload is Switchboard's only).
//!
//! `--workload connections` sends no messages: it opens `--users` idle
//! connections as fast as the server takes them (bounded handshakes in
//! flight, sockets bound to `--source-addrs`), measures handshakes per
//! second, holds them until SIGTERM, `--hold` or their loss, reconnects lost
//! ones to `--reconnect-targets`, and writes a `ConnectionsRun` document
//! (see the `connections` module).
//!
//! This module owns the run's sequence: validate, connect, run the step(s),
//! close, print. The modules own: `cli` the flags, `plan` placement and
//! rooms, `conn` a connection's task, `sched` the open-loop sender and churn,
//! `state` shared counters, `report` the summary, `progress` stderr output,
//! `wire` frame formats (`socketio` the Socket.IO peer's packets);
//! `connections` the connections workload and `idle` one of its connections;
//! `presence` the presence workload.
//!
//! `--workload presence` sends no messages either: `--users` churning users
//! go online and offline at `--churn-rate` transitions per second on every
//! target while `--watcher-conns` connections on `--watcher-instances` watch
//! them, and every `presence_event` is checked against the loader's record
//! of the transitions (a `PresenceRun` document; see the `presence` module).

mod cli;
mod conn;
mod connections;
mod idle;
mod plan;
mod presence;
mod progress;
mod report;
mod sched;
mod socketio;
mod state;
mod wire;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use switchboard_bench_schema::{
    FindMaxRun, FindMaxTag, LoaderOutput, Quantiles, SingleRun, StepResult, Workload,
};

use crate::cli::{Args, Target};
use crate::conn::Cmd;
use crate::plan::Plan;
use crate::report::StepContext;
use crate::sched::Scheduler;
use crate::state::{lock, Shared, StepState};

/// Delay between creating a step and its first scheduled send.
const STEP_LEAD: Duration = Duration::from_millis(20);

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("switchboard-load: {e}");
        return ExitCode::from(2);
    }
    let targets = match args.parsed_targets() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("switchboard-load: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.workload == Workload::Connections {
        runtime.block_on(connections::run(args, targets))
    } else if args.workload == Workload::Presence {
        runtime.block_on(presence::run(args, targets))
    } else {
        runtime.block_on(run(args, targets))
    };
    // Connection tasks that did not finish their close in time are dropped.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything a step needs from the run.
struct Runner {
    shared: Arc<Shared>,
    sched: Scheduler,
    senders: Vec<UnboundedSender<Cmd>>,
    next_id: u64,
    step_no: u32,
    initial_connect: Quantiles,
}

async fn run(args: Args, targets: Vec<Target>) -> Result<(), String> {
    let run_start = Instant::now();
    let plan = Plan::build(&args, targets.len())?;
    warn_small_body(&args);
    let shared = Arc::new(Shared::new(args.clone(), targets, plan));
    tokio::spawn(watch_ctrl_c(shared.clone()));

    let (senders, tasks, connect_failures) = connect_all(&shared).await?;
    let initial_connect = report::quantiles_of(&lock(&shared.initial_connect));
    let mut runner = Runner {
        sched: Scheduler {
            shared: shared.clone(),
            senders: senders.clone(),
            rng: SmallRng::seed_from_u64(args.seed),
            seqs: Default::default(),
            rr: 0,
        },
        shared: shared.clone(),
        senders,
        next_id: 0,
        step_no: 0,
        initial_connect,
    };

    let output = if args.find_max {
        let mut steps = Vec::new();
        let mut best = None;
        let mut rate = args.start_rate;
        'ladder: for k in 0..args.max_steps {
            if k > 0 {
                rate *= args.step_factor;
            }
            let mut passed = false;
            for _attempt in 0..=args.retries {
                if shared.stop.load(Ordering::Relaxed) {
                    break 'ladder;
                }
                if !steps.is_empty() {
                    settle(&shared).await;
                }
                let result = runner.measured(rate).await;
                passed = result.pass;
                steps.push(result);
                if passed {
                    break;
                }
            }
            if !passed {
                break;
            }
            best = Some(round3(rate));
        }
        LoaderOutput::FindMax(FindMaxRun {
            mode: FindMaxTag::FindMax,
            rule: args.pass_rule().describe(),
            steps,
            max_sustained_rate: best,
            elapsed_s: round3(run_start.elapsed().as_secs_f64()),
            loader_cpu_s: round3(report::cpu_seconds()),
            initial_connect_ms: runner.initial_connect.clone(),
            connect_failures,
            no_ack: args.no_ack,
            protocol: args.protocol,
            dm_store: args.dm_store,
        })
    } else {
        let step = runner.measured(args.rate).await;
        LoaderOutput::Single(Box::new(SingleRun {
            step,
            run_elapsed_s: round3(run_start.elapsed().as_secs_f64()),
            loader_cpu_total_s: round3(report::cpu_seconds()),
            initial_connect_ms: runner.initial_connect.clone(),
            connect_failures,
            no_ack: args.no_ack,
            protocol: args.protocol,
            dm_store: args.dm_store,
        }))
    };
    let output = serde_json::to_string_pretty(&output)
        .map_err(|e| format!("serializing the summary: {e}"))?;

    close_all(&shared, &runner.senders, tasks).await;
    match &args.out {
        Some(path) => std::fs::write(path, format!("{output}\n"))
            .map_err(|e| format!("writing {}: {e}", path.display()))?,
        None => println!("{output}"),
    }
    Ok(())
}

impl Runner {
    /// An optional warmup (unrecorded, then a settle), then a measured step.
    async fn measured(&mut self, rate: f64) -> StepResult {
        let args = &self.shared.args;
        if args.warmup > 0.0 {
            let warmup = args.warmup;
            let _ = self.step(rate, warmup, "warmup").await;
            settle(&self.shared).await;
        }
        let duration = self.shared.args.duration;
        self.step(rate, duration, "step").await
    }

    /// Runs one step: send phase (and churn), drain, summary.
    async fn step(&mut self, rate: f64, duration: f64, what: &str) -> StepResult {
        let shared = self.shared.clone();
        let args = &shared.args;
        self.step_no += 1;
        let total = ((rate * duration).floor() as usize).max(1);
        let cpu0 = report::cpu_seconds();
        let t0_ns = shared.now_ns() + STEP_LEAD.as_nanos() as u64;
        let step = Arc::new(StepState::new(
            &shared,
            self.step_no,
            rate,
            duration,
            self.next_id,
            t0_ns,
            total,
        ));
        self.next_id += total as u64;
        let connections = shared
            .slots
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .count() as u64;
        *lock(&shared.current) = Some(step.clone());

        let label = format!("{what} {} {}/s", self.step_no, round3(rate));
        let progress = tokio::spawn(progress::report(step.clone(), label, args.quiet));
        let churn = (args.workload == Workload::Churn).then(|| {
            tokio::spawn(Scheduler::churn_phase(
                shared.clone(),
                self.senders.clone(),
                SmallRng::seed_from_u64(args.seed ^ (u64::from(self.step_no) << 32) ^ 0xc4),
                step.clone(),
                args.churn_rate,
            ))
        });
        let outcome = self.sched.send_phase(&step).await;
        if let Some(churn) = churn {
            let _ = churn.await;
        }

        // Drain: until every ack and every expected delivery is in, or the
        // time is up. With --no-ack no acks are awaited.
        let t0 = shared.instant_at(t0_ns);
        let deadline = t0 + Duration::from_secs_f64(duration + args.drain);
        loop {
            let settled = args.no_ack || step.settled() >= outcome.sent;
            let delivered = step.c.delivered.load(Ordering::Relaxed)
                >= step.c.expected_live.load(Ordering::Relaxed);
            let reconnecting = shared.reconnecting.load(Ordering::Relaxed) > 0;
            if (settled && delivered && !reconnecting) || std::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *lock(&shared.current) = None;
        step.done.store(true, Ordering::Relaxed);
        let _ = progress.await;
        // Let connection tasks finish the wakeup they are in (histogram buffers).
        tokio::time::sleep(Duration::from_millis(10)).await;
        let elapsed_s = t0.elapsed().as_secs_f64();
        let cpu_s = report::cpu_seconds() - cpu0;
        let result = report::summarize(
            &step,
            &StepContext {
                shared: &shared,
                outcome,
                elapsed_s,
                cpu_s,
                initial_connect: &self.initial_connect,
                connections,
            },
        );
        if !args.quiet {
            eprintln!(
                "[{what} {}] rate {}/s: sent {} delivered {}/{} lost {} p50 {} p99 {} ms, loader cpu {:.2}s -> {}",
                result.step,
                result.rate_offered,
                result.sent,
                result.delivered,
                result.expected,
                result.lost,
                fmt_ms(result.latency_ms.p50),
                fmt_ms(result.latency_ms.p99),
                result.loader_cpu_s,
                if result.pass {
                    "PASS".to_owned()
                } else {
                    format!("FAIL ({})", result.fail_reasons.join("; "))
                }
            );
        }
        result
    }
}

/// Notes when `--body-bytes` cannot hold the measurement fields (the body
/// is then just the fields, unpadded).
fn warn_small_body(args: &Args) {
    let rate = if args.find_max {
        args.start_rate * args.step_factor.powi(args.max_steps as i32 - 1)
    } else {
        args.rate
    };
    let steps = if args.find_max {
        f64::from(args.max_steps * (args.retries + 1))
    } else {
        1.0
    };
    let seconds = (args.duration + args.warmup + args.drain + args.settle + 1.0) * steps
        + args.connect_timeout;
    let worst = wire::BodyFields {
        step: 2 * steps as u32,
        id: (rate.min(1e7) * (args.duration + args.warmup) * steps) as u64,
        ts_ns: (seconds * 1e9) as u64,
        sender: args.users * args.conns_per_user,
        seq: (rate.min(1e7) * args.duration) as u32,
    };
    let need = wire::min_body_len(&worst);
    if args.body_bytes < need {
        eprintln!(
            "switchboard-load: note: --body-bytes {} may be too small for the measurement fields; bodies can grow to {need} bytes",
            args.body_bytes
        );
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Pause between steps so the server drains what is in flight.
async fn settle(shared: &Shared) {
    if shared.args.settle > 0.0 && !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs_f64(shared.args.settle)).await;
    }
}

/// Opens every connection slot, at most `--connect-concurrency` at a time,
/// within `--connect-timeout`. Returns the command channels, the tasks and
/// the number of slots that failed.
async fn connect_all(
    shared: &Arc<Shared>,
) -> Result<(Vec<UnboundedSender<Cmd>>, Vec<JoinHandle<()>>, u64), String> {
    let args = &shared.args;
    let n = shared.plan.n_slots();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.connect_timeout);
    let limit = Arc::new(Semaphore::new(args.connect_concurrency));
    let (ready_tx, mut ready_rx) = unbounded_channel();
    let mut senders = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for slot in 0..n {
        let (tx, rx) = unbounded_channel();
        senders.push(tx);
        tasks.push(tokio::spawn(conn::run(
            shared.clone(),
            slot as u32,
            rx,
            ready_tx.clone(),
            limit.clone(),
            deadline,
        )));
    }
    drop(ready_tx);
    let (mut ok, mut failed) = (0usize, 0u64);
    let mut errors = Vec::new();
    while ok + (failed as usize) < n {
        match tokio::time::timeout_at(deadline + Duration::from_millis(200), ready_rx.recv()).await
        {
            Ok(Some((_slot, Ok(us)))) => {
                ok += 1;
                lock(&shared.initial_connect).saturating_record(us.max(1));
            }
            Ok(Some((_slot, Err(e)))) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let missing = (n - ok) as u64;
    if !args.quiet || missing > 0 {
        eprintln!(
            "connected {ok}/{n} connections to {} instance(s) in {:.2}s{}",
            shared.targets.len(),
            started.elapsed().as_secs_f64(),
            if errors.is_empty() {
                String::new()
            } else {
                format!("; first errors: {}", errors.join(" | "))
            }
        );
    }
    if ok < 2 {
        for t in &tasks {
            t.abort();
        }
        return Err(format!(
            "only {ok} of {n} connections opened{}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join(" | "))
            }
        ));
    }
    Ok((senders, tasks, missing))
}

/// Closes every connection (close handshake), waiting at most 2 s in all.
async fn close_all(shared: &Shared, senders: &[UnboundedSender<Cmd>], tasks: Vec<JoinHandle<()>>) {
    shared.closing.store(true, Ordering::Relaxed);
    for tx in senders {
        let _ = tx.send(Cmd::Close);
    }
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let all = futures_util::future::join_all(tasks);
    if tokio::time::timeout(Duration::from_secs(2), all)
        .await
        .is_err()
    {
        for a in aborts {
            a.abort();
        }
    }
}

/// First Ctrl-C: stop sending (the run drains and reports). Second: exit.
async fn watch_ctrl_c(shared: Arc<Shared>) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!("switchboard-load: interrupted; stopping (Ctrl-C again to exit at once)");
    shared.stop.store(true, Ordering::Relaxed);
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}
