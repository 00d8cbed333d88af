//! `switchboard-bench`: the benchmark orchestrator. For each system and
//! instance count it starts a fresh redis-server and N instances on loopback
//! ports, drives them with `switchboard-load`, reads CPU (`/proc`), each
//! instance's counters and Redis' INFO before and after the measured window,
//! and writes `<out-dir>/<name>.{json,md,svg}` (by default
//! `target/bench-results/<name>/`, untracked; with `--publish` also into
//! `bench/results/`), keeping every process's log under `<out-dir>/logs/`.
//!
//! A system is Switchboard in one routing mode (`--modes`), or the Socket.IO
//! peer of `bench/peers/socketio` with one Redis adapter (`--peer socketio`,
//! rows `socketio-classic` and `socketio-sharded`). Both face the same load
//! generator (the peer through `--protocol socketio`), the same window, the
//! same pass rule and the same figures (delivered/s, p50/p99, CPU per
//! delivered message, Redis bytes per message, bus messages received per
//! instance per message), so one results file holds them side by side;
//! `--merge` joins results files of separate invocations into one report.
//!
//! This file owns the top level only: the command line, signals, the loop
//! over the matrix and the exit code. Module map:
//! - `cli`: flags and the loader's command line;
//! - `system`: what each kind of row runs and where its counters are;
//! - `peer`: the Socket.IO peer's setup (Node.js, `npm ci`) and its `/stats`;
//! - `procs`: starting and stopping processes by pid, port reservation;
//! - `redis_server`: the run's Redis, one redis-server or a Redis Cluster
//!   (`--redis-cluster`), readiness and the cluster's layout;
//! - `cluster`: that Redis + N instances, readiness;
//! - `probe`, `http`, `openmetrics`, `redis_info`: reading `/proc`, fetching
//!   and parsing `/metrics`, Redis INFO;
//! - `snapshot`: one reading of everything; `run`: one measured run;
//! - `derive`: the per-message figures and the pass rule;
//! - `report`, `plot`: the result files;
//! - `connections`: `--workload connections`, a benchmark of its own (idle
//!   connections at scale: RSS per connection, connect rate, graceful drain,
//!   reconnect storm), with its own results file;
//! - `presence`: `--workload presence`, another (presence events under
//!   churn: events per second, CPU per event, and the proof that instances
//!   without watchers receive none), with its own results file;
//! - `ingest`: `--workload ingest`, another (queue ingestion end to end:
//!   records/s from a Redis stream, a Kafka topic and the publish API,
//!   delivery latency, loss, CPU per record), with its own results file.

mod cli;
mod cluster;
mod connections;
mod derive;
mod error;
mod http;
mod ingest;
mod openmetrics;
mod peer;
mod plot;
mod presence;
mod probe;
mod procs;
mod redis_info;
mod redis_server;
mod report;
mod run;
mod snapshot;
mod system;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchboard_bench_schema::Workload;
use tokio_util::sync::CancellationToken;

use cli::Cli;
use error::BenchError;
use peer::PeerSetup;
use report::ResultsFile;
use run::{RunContext, RunRecord};
use system::System;

const WINDOW_NOTE: &str =
    "CPU (/proc/PID/stat utime+stime), each instance's counters (/metrics; the Socket.IO peer's \
/stats) and Redis INFO are read once every user is connected (the sum of the instances' \
connections gauge reaches the expected count, polled every 20 ms after the loader starts), and \
again after the drain: from 200 ms before the end of the send phase a snapshot is taken every \
20 ms; the window ends at the first one after the send phase that follows three quiet intervals \
(no frames queued), or, if the loader starts closing its connections first (or exits between \
two snapshots), at the last snapshot taken with every user still connected (at the loader's \
exit when there was none). The connect phase and the teardown are outside the window, the \
drain inside. With --find-max the window ends at the loader's exit and spans the whole ladder \
(pauses and final disconnects too). Per-message figures divide by the loader's delivered count \
(all steps with --find-max).";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.validate() {
        eprintln!("switchboard-bench: {e}");
        return ExitCode::from(2);
    }
    if !cli.merge.is_empty() {
        return match merge(&cli) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("switchboard-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = &cli.render_only {
        return match render_only(path) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("switchboard-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let outcome = match setup(&cli).await {
        Ok(setup) if cli.workload == Workload::Connections => connections::run(&cli, setup).await,
        Ok(setup) if cli.workload == Workload::Presence => presence::run(&cli, setup).await,
        Ok(setup) if cli.workload == Workload::Ingest => ingest::run(&cli, setup).await,
        Ok(setup) => run_matrix(&cli, setup).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchboard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Re-renders `<name>.md` and `<name>.svg` next to an existing results JSON
/// (of either kind: the matrix, or `--workload connections`).
fn render_only(path: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io("read", path, e))?;
    let schema = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("schema")?.as_str().map(str::to_owned));
    if schema.as_deref() == Some(connections::SCHEMA) {
        return report::render_outputs::<connections::ConnectionsResults>(&text, path);
    }
    if schema.as_deref() == Some(presence::SCHEMA) {
        return report::render_outputs::<presence::PresenceResults>(&text, path);
    }
    if schema.as_deref() == Some(ingest::SCHEMA) {
        return report::render_outputs::<ingest::IngestResults>(&text, path);
    }
    let results = report::read(path)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let md = dir.join(format!("{}.md", results.name));
    std::fs::write(&md, report::markdown(&results)).map_err(|e| BenchError::io("write", &md, e))?;
    let svg = dir.join(format!("{}.svg", results.name));
    plot::write_svg(&results, &svg)?;
    Ok(vec![md, svg])
}

/// Merges results files into `<out-dir>/<name>.{json,md,svg}` (`--merge`).
fn merge(cli: &Cli) -> Result<Vec<PathBuf>, BenchError> {
    let parts = cli
        .merge
        .iter()
        .map(|path| report::read(path))
        .collect::<Result<Vec<_>, _>>()?;
    let (_, finished_utc) = report::utc_now();
    let name = cli
        .name
        .clone()
        .unwrap_or_else(|| format!("merged-{}", report::utc_now().0));
    let command = report::shell_command_line(&std::env::args().collect::<Vec<_>>());
    let merged = report::merge(parts, name, command, finished_utc)?;
    let out_dir = cli.out_dir(&merged.name);
    let mut paths = report::write_all(&merged, &out_dir)?;
    if cli.publish {
        paths.extend(report::write_all(&merged, Path::new(cli::PUBLISH_DIR))?);
    }
    Ok(paths)
}

/// A binary next to this one, unless given.
fn sibling_binary(given: &Option<PathBuf>, name: &str) -> Result<PathBuf, BenchError> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().map_err(|e| BenchError::io("locate own binary", name, e))?;
    Ok(exe.parent().unwrap_or_else(|| Path::new(".")).join(name))
}

/// Resolves once on Ctrl-C or SIGTERM, cancelling `cancel`.
fn watch_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate => {}
        }
        eprintln!("[bench] interrupted: stopping every process of the current run");
        cancel.cancel();
    });
}

/// What every kind of run settles before it starts anything: the binaries
/// (checked), the peer (prepared), the machine, the result name and
/// directories, the command line.
struct Setup {
    server_bin: PathBuf,
    loader_bin: PathBuf,
    peer: Option<PeerSetup>,
    machine: report::Machine,
    name: String,
    started_utc: String,
    /// Absolute, so the JSON says where the logs are whatever the reader's directory.
    out_dir: PathBuf,
    logs_dir: PathBuf,
    command: String,
}

async fn setup(cli: &Cli) -> Result<Setup, BenchError> {
    let server_bin = sibling_binary(&cli.server_bin, "switchboard")?;
    let loader_bin = sibling_binary(&cli.loader_bin, "switchboard-load")?;
    let systems = cli.systems();
    let needs_server = matches!(
        cli.workload,
        Workload::Connections | Workload::Presence | Workload::Ingest
    ) || systems.iter().any(|s| matches!(s, System::Switchboard(_)));
    for (what, path) in [("server", &server_bin), ("loader", &loader_bin)] {
        if what == "server" && !needs_server {
            continue;
        }
        // The ingest workload receives the records itself: no loader.
        if what == "loader" && cli.workload == Workload::Ingest {
            continue;
        }
        if !path.is_file() {
            return Err(BenchError::Report(format!(
                "{what} binary {} not found: build with `cargo build --release -p switchboard \
                 -p switchboard-load -p switchboard-bench` (scripts/bench.sh does) or pass \
                 --{what}-bin",
                path.display()
            )));
        }
    }
    let mut machine = report::machine(&cli.redis_server);
    if machine.redis_version.is_empty() {
        return Err(BenchError::Report(format!(
            "cannot run `{} --version`: install redis-server (Debian/Ubuntu: apt-get install -y redis-server) or pass --redis-server",
            cli.redis_server.display()
        )));
    }
    let (stamp, started_utc) = report::utc_now();
    let name = cli
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{stamp}", cli.workload.as_str()));
    let out_dir = cli.out_dir(&name);
    // Absolute, so the JSON says where the logs are whatever the reader's directory.
    let out_dir = std::path::absolute(&out_dir).unwrap_or(out_dir);
    let logs_dir = out_dir.join("logs");
    if logs_dir.is_dir() {
        eprintln!(
            "[bench] note: {} exists (an earlier run of `{name}`?): its files are replaced run by run",
            logs_dir.display()
        );
    }
    std::fs::create_dir_all(&logs_dir)
        .map_err(|e| BenchError::io("create logs dir", &logs_dir, e))?;
    let args: Vec<String> = std::env::args().collect();
    let command = report::shell_command_line(&args);
    eprintln!("[bench] {name}: results and logs in {}", out_dir.display());
    let peer = if systems.iter().any(|s| matches!(s, System::Socketio(_))) {
        let peer = peer::prepare(&cli.peer_dir, &cli.node_bin, &cli.npm_bin, &logs_dir).await?;
        machine.node_version = Some(peer.node_version.clone());
        machine.peer_packages = peer.packages.clone();
        Some(peer)
    } else {
        None
    };
    Ok(Setup {
        server_bin,
        loader_bin,
        peer,
        machine,
        name,
        started_utc,
        out_dir,
        logs_dir,
        command,
    })
}

async fn run_matrix(cli: &Cli, setup: Setup) -> Result<ExitCode, BenchError> {
    let Setup {
        server_bin,
        loader_bin,
        peer,
        machine,
        name,
        started_utc,
        out_dir,
        logs_dir,
        command,
    } = setup;
    let cancel = CancellationToken::new();
    watch_signals(cancel.clone());
    let ctx = RunContext {
        cli,
        server_bin,
        loader_bin,
        peer,
        logs_dir: logs_dir.clone(),
    };
    let mut runs: Vec<RunRecord> = Vec::new();
    'matrix: for system in cli.systems() {
        for &nodes in &cli.nodes {
            // --dm-store variants and --redis-cluster topologies side by
            // side per N (the closest in time).
            for dm_store in cli.dm_store_variants(system) {
                for redis in cli.redis_topologies(system) {
                    if cancel.is_cancelled() {
                        break 'matrix;
                    }
                    let row = cli::row_name(system, dm_store, redis);
                    eprintln!("[bench] === {row} N={nodes}");
                    let record =
                        run::run_one(&ctx, (system, dm_store, redis), nodes, &cancel).await;
                    print_run(&record);
                    runs.push(record);
                    tokio::select! {
                        _ = cancel.cancelled() => break 'matrix,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    let interrupted = cancel.is_cancelled();
    let (_, finished_utc) = report::utc_now();
    let results = ResultsFile {
        schema: report::SCHEMA.to_owned(),
        name,
        command,
        started_utc,
        finished_utc,
        machine,
        config: serde_json::to_value(cli)
            .map_err(|e| BenchError::Report(format!("serialize config: {e}")))?,
        window: WINDOW_NOTE.to_owned(),
        pass_rule: cli.pass_rule().describe(),
        interrupted,
        merged_from: Vec::new(),
        runs,
    };
    let mut paths = report::write_all(&results, &out_dir)?;
    if cli.publish {
        paths.extend(report::write_all(&results, Path::new(cli::PUBLISH_DIR))?);
    }
    println!("{}", report::markdown(&results));
    for p in &paths {
        eprintln!("[bench] wrote {}", p.display());
    }
    eprintln!(
        "[bench] logs of every process it started (redis-server, instances, loader and its JSON): {}",
        logs_dir.display()
    );
    let all_ok = results.runs.iter().all(|r| r.status == "ok");
    Ok(if interrupted {
        ExitCode::from(130)
    } else if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One progress line per run.
fn print_run(r: &RunRecord) {
    match (&r.derived, &r.error) {
        (Some(d), _) => eprintln!(
            "[bench] {} N={}: {:.0} delivered/s, p50 {} p99 {} ms, instances {} µs/msg, redis {} µs/msg, {} B/msg out, {}{}{}",
            r.mode,
            r.nodes,
            d.delivered_per_sec,
            d.p50_ms.map_or("-".into(), |v| format!("{v:.2}")),
            d.p99_ms.map_or("-".into(), |v| format!("{v:.1}")),
            d.instance_cpu_us_per_msg.map_or("-".into(), |v| format!("{v:.1}")),
            d.redis_cpu_us_per_msg.map_or("-".into(), |v| format!("{v:.1}")),
            d.redis_out_bytes_per_msg.map_or("-".into(), |v| format!("{v:.0}")),
            if d.pass { "PASS" } else { "FAIL" },
            d.redis_cluster.as_ref().map_or(String::new(), |c| format!(
                " (cluster: busiest master {} x the mean, {} bus msgs/msg)",
                c.master_cpu_max_over_mean.map_or("-".into(), |v| format!("{v:.2}")),
                c.bus_sent_per_msg.map_or("-".into(), |v| format!("{v:.2}")),
            )),
            r.error.as_ref().map_or(String::new(), |e| format!(" ({})", r.status.clone() + ": " + e)),
        ),
        (None, Some(e)) => eprintln!("[bench] {} N={}: {}: {e}", r.mode, r.nodes, r.status),
        (None, None) => eprintln!("[bench] {} N={}: no result", r.mode, r.nodes),
    }
}
