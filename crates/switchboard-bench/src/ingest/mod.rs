//! `--workload ingest` (issue 15): records per second ingested and
//! delivered end to end, and the CPU per record, from a Redis stream, from
//! Kafka, and — the baseline — from a backend calling the publish API.
//!
//! Per N in `--nodes` and per source in `--ingest-sources` (all in one
//! invocation, so ratios compare rows of the same run), a fresh
//! redis-server and N instances (and, for `kafka`, a fresh Tansu broker
//! with a `--kafka-partitions` topic first), then:
//!
//! 1. `--users` receivers `bu-<k>`, one WebSocket connection each on
//!    instance `k mod N`, every one welcomed and answered a ping (module
//!    `receivers`); for `kafka`, every instance's logged partition
//!    assignment covers the topic exactly once;
//! 2. a snapshot (CPU of every process from /proc, every instance's
//!    /metrics, Redis INFO; Tansu's CPU);
//! 3. `--records` DMs made available as fast as the client allows (module
//!    `producers`), record i for `bu-(i mod U)`;
//! 4. the window ends at the last first receipt, once every record arrived
//!    or the row's `--row-timeout` passed (an error); the instances'
//!    `switchboard_ingest_records_total` (or, for `http`,
//!    `switchboard_api_publishes_total`) must then account for every
//!    record (waited for up to 10 s), and the second snapshot is taken;
//! 5. every process is stopped by pid (also on Ctrl-C).
//!
//! Every loss, duplicate and order violation is reported; the invocation
//! exits non-zero when a row lost a record or failed a check.

mod figures;
mod producers;
mod receivers;
mod report;
mod tansu;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, IngestSource, RoutingMode};
use crate::cluster::{self, Cluster, ClusterSpec};
use crate::error::BenchError;
use crate::probe;
use crate::procs::{Stopped, Supervisor};
use crate::redis_server::RedisTopology;
use crate::snapshot::{self, Snapshot};
use crate::system::System;
use crate::Setup;

pub use figures::Figures;
use producers::{ProduceStats, Producer};
use receivers::UserTally;

/// Identifies the layout of an ingest results file.
pub const SCHEMA: &str = "switchboard-bench-ingest/1";

/// The stream the instances consume (`--ingest-stream`).
const STREAM: &str = "bench-events";
/// The field of a stream entry that holds the record (the server's
/// `switchboard_redis::ingest::VALUE_FIELD`).
const STREAM_FIELD: &str = "v";
/// The Kafka topic.
const TOPIC: &str = "bench-events";
/// The instances' consumer group.
const KAFKA_GROUP: &str = "bench";
/// How long the instances may take to hold every partition (a classic
/// group's first join against Tansu can take tens of seconds).
const ASSIGNMENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the counters may lag the last receipt.
const COUNTERS_TIMEOUT: Duration = Duration::from_secs(10);
/// The flag of the concurrent consumer, passed only if the server lists it.
const INFLIGHT_FLAG: &str = "--ingest-inflight";

/// How each figure is measured, for the report.
const METHOD: [&str; 6] = [
    "Rows: per N and per source, a fresh redis-server and N instances (`--routing routed`, \
     `--auth none`); stream: `--ingest-stream bench-events`; kafka: also a fresh Tansu broker \
     (memory storage, 127.0.0.1) with a topic of --kafka-partitions partitions, the instances \
     with `--kafka-brokers --kafka-topics bench-events --kafka-group bench`; http: `--api-key`, \
     the records POSTed to /api/v1/publish round robin over the instances, \
     --publish-inflight in flight (what a backend's own consumer calling the API costs).",
    "Receivers: --users users bu-<k>, one WebSocket connection each on instance k mod N, each \
     welcomed and answered a ping (its inbox replay done) before any record is made available; \
     kafka: and every instance's log shows the partitions it holds, together every partition \
     exactly once (checked twice, 0.5 s apart).",
    "Records: R DMs (stored, the server's default), record i to bu-(i mod U) with body \
     {\"n\": i div U, \"t\": unix ms when it was handed to the client}; stream: pipelined XADD \
     batches of --xadd-batch; kafka: rdkafka FutureProducer, key = the user, acks=all, linger \
     5 ms, all enqueued then every delivery report awaited; http: the POSTs.",
    "Window: from the first record made available (its t) to the last first receipt at a \
     receiver; records/s = R / window. Latency: t to receipt (one clock: the benchmark \
     process). A record received twice is a duplicate; a first receipt of n below the highest \
     n already received for that user is an order violation (a failure where the server \
     promises per-user order: kafka, and stream with one instance); lost = R - distinct \
     received.",
    "CPU: utime+stime (/proc/PID/stat) of the instances (sum), redis-server, Tansu and the \
     benchmark itself (producer and receivers), between a snapshot just before the first \
     record and one after the last receipt (once the counters account for every record); per \
     record = CPU / R. Other CPU: machine-wide busy time minus those, in the same interval.",
    "Counters: switchboard_ingest_records_total{source,outcome} summed over the instances over \
     the window must show delivered = R and malformed = 0 for the row's source and nothing for \
     the other; http rows: switchboard_api_publishes_total = R and no ingest counts. A counter \
     an instance does not export fails the row.",
];

/// Everything one `--workload ingest` invocation produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestResults {
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
    /// `tansu --version`, when a kafka row ran.
    pub tansu_version: Option<String>,
    /// The server binary the rows ran.
    pub server: ServerBinary,
    /// Every setting (the parsed command line).
    pub config: serde_json::Value,
    /// How each figure is measured.
    pub method: Vec<String>,
    /// Whether Ctrl-C / SIGTERM cut the runs short.
    pub interrupted: bool,
    /// One record per (N, source).
    pub runs: Vec<IngestRecord>,
}

/// Which server binary ran, so a reader can tell two builds apart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerBinary {
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its modification time, unix s.
    pub modified_unix_s: u64,
    /// Whether its `--help` lists `--ingest-inflight` (the concurrent
    /// consumer).
    pub lists_ingest_inflight: bool,
    /// The `--ingest-inflight` handed to the instances, if any.
    pub ingest_inflight: Option<u32>,
}

/// One (N, source) run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestRecord {
    /// `stream`, `kafka` or `http`.
    pub source: String,
    /// Instances.
    pub nodes: usize,
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
    /// kafka: the broker's port.
    pub tansu_port: Option<u16>,
    /// kafka: each instance's partitions when producing started.
    pub kafka_assignment: BTreeMap<String, Vec<u32>>,
    /// kafka: seconds from the instances being ready to the assignment.
    pub kafka_assignment_s: Option<f64>,
    /// Readings when the window started and ended.
    pub before: Option<Snapshot>,
    /// See `before`.
    pub after: Option<Snapshot>,
    /// Tansu's CPU seconds at both ends.
    pub tansu_cpu_s: (Option<f64>, Option<f64>),
    /// The last first receipt, unix ms.
    pub last_receipt_unix_ms: Option<f64>,
    /// What producing took.
    pub produce: Option<ProduceStats>,
    /// Each receiver's tally.
    pub receivers: Vec<UserTally>,
    /// Figures derived from the above.
    pub figures: Option<Figures>,
    /// How every process of the run ended.
    pub processes: Vec<Stopped>,
    /// Where the logs of this run are.
    pub logs_dir: PathBuf,
}

/// Runs every (N, source) and writes the results.
pub async fn run(cli: &Cli, setup: Setup) -> Result<ExitCode, BenchError> {
    let cancel = CancellationToken::new();
    crate::watch_signals(cancel.clone());
    let tansu_bin = if cli.ingest_sources.contains(&IngestSource::Kafka) {
        Some(tansu::binary(cli.tansu_bin.as_deref())?)
    } else {
        None
    };
    let tansu_version = tansu_bin
        .as_deref()
        .map(tansu::version)
        .map(|v| v.strip_prefix("tansu ").map_or(v.clone(), str::to_owned));
    let server = server_binary(&setup.server_bin, cli.ingest_inflight)?;
    if let (Some(n), false) = (cli.ingest_inflight, server.lists_ingest_inflight) {
        eprintln!(
            "[bench] warning: --ingest-inflight {n} not passed: {} --help does not list it \
             (the instances consume one record at a time)",
            setup.server_bin.display()
        );
    }
    let mut runs = Vec::new();
    'all: for &nodes in &cli.nodes {
        for &source in &cli.ingest_sources {
            if cancel.is_cancelled() {
                break 'all;
            }
            eprintln!("[bench] === ingest {} N={nodes}", source.as_str());
            let ctx = RowContext {
                cli,
                setup: &setup,
                tansu_bin: tansu_bin.as_deref(),
                server: &server,
            };
            let record = run_one(&ctx, source, nodes, &cancel).await;
            print_run(&record);
            runs.push(record);
            tokio::select! {
                _ = cancel.cancelled() => break 'all,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
    let results = IngestResults {
        schema: SCHEMA.to_owned(),
        name: setup.name.clone(),
        command: setup.command.clone(),
        started_utc: setup.started_utc.clone(),
        finished_utc: crate::report::utc_now().1,
        machine: setup.machine.clone(),
        tansu_version,
        server,
        config: serde_json::to_value(cli)
            .map_err(|e| BenchError::Report(format!("serialize config: {e}")))?,
        method: METHOD.iter().map(|m| (*m).to_owned()).collect(),
        interrupted: cancel.is_cancelled(),
        runs,
    };
    crate::report::conclude(&results, &setup.out_dir, &setup.logs_dir, cli.publish)
}

/// What the server binary is and whether it takes `--ingest-inflight`.
fn server_binary(path: &Path, inflight: Option<u32>) -> Result<ServerBinary, BenchError> {
    let meta = std::fs::metadata(path).map_err(|e| BenchError::io("stat server", path, e))?;
    let help = std::process::Command::new(path)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| BenchError::Spawn {
            name: "switchboard --help".into(),
            program: path.to_owned(),
            source: e,
        })?;
    let lists = String::from_utf8_lossy(&help.stdout).contains(INFLIGHT_FLAG);
    Ok(ServerBinary {
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        bytes: meta.len(),
        modified_unix_s: meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs()),
        lists_ingest_inflight: lists,
        ingest_inflight: inflight.filter(|_| lists),
    })
}

fn print_run(r: &IngestRecord) {
    match &r.figures {
        Some(f) => eprintln!(
            "[bench] ingest {} N={}: {}/{} delivered in {:.2} s ({:.0} records/s), lost {}, dup {}, \
             order {}, p50 {} p99 {} ms, instances {} µs/record, redis {} µs/record, tansu {} \
             µs/record, {}{}",
            r.source,
            r.nodes,
            f.delivered,
            f.records,
            f.window_s,
            f.records_per_s,
            f.lost,
            f.duplicates,
            f.order_violations,
            report::opt(f.latency_ms.p50, 1),
            report::opt(f.latency_ms.p99, 1),
            report::opt(f.instance_cpu_us_per_record, 1),
            report::opt(f.redis_cpu_us_per_record, 1),
            report::opt(f.tansu_cpu_us_per_record, 1),
            if f.pass { "PASS" } else { "FAIL" },
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({}: {e})", r.status)),
        ),
        None => eprintln!(
            "[bench] ingest {} N={}: {}: {}",
            r.source,
            r.nodes,
            r.status,
            r.error.as_deref().unwrap_or("")
        ),
    }
}

/// What every row shares.
struct RowContext<'a> {
    cli: &'a Cli,
    setup: &'a Setup,
    tansu_bin: Option<&'a Path>,
    server: &'a ServerBinary,
}

/// What a run measured before its processes were stopped.
#[derive(Default)]
struct Measured {
    instance_ports: Vec<(String, u16)>,
    instance_command: Vec<String>,
    tansu_port: Option<u16>,
    kafka_assignment: BTreeMap<String, Vec<u32>>,
    kafka_assignment_s: Option<f64>,
    before: Option<Snapshot>,
    after: Option<Snapshot>,
    tansu_cpu: (Option<f64>, Option<f64>),
    last_receipt_unix_ms: Option<f64>,
    produce: Option<ProduceStats>,
    receivers: Vec<UserTally>,
    counter_errors: Vec<String>,
}

async fn run_one(
    ctx: &RowContext<'_>,
    source: IngestSource,
    nodes: usize,
    cancel: &CancellationToken,
) -> IngestRecord {
    let started = Instant::now();
    let dir = ctx
        .setup
        .logs_dir
        .join(format!("ingest-{}-n{nodes}", source.as_str()));
    let mut supervisor = Supervisor::new(Duration::from_secs_f64(ctx.cli.stop_timeout));
    let mut m = Measured::default();
    let result = match std::fs::create_dir_all(&dir) {
        Ok(()) => measure(ctx, source, nodes, &dir, &mut supervisor, &mut m, cancel).await,
        Err(e) => Err(BenchError::io("create run dir", &dir, e)),
    };
    let processes = supervisor.stop_all().await;
    let (status, error) = match &result {
        Ok(()) => ("ok", None),
        Err(BenchError::Interrupted) => ("interrupted", Some("interrupted".to_owned())),
        Err(e) => ("error", Some(e.to_string())),
    };
    let figures = match (&m.before, &m.after, &m.produce) {
        (Some(before), Some(after), Some(produce)) => {
            let inputs = figures::Inputs {
                source,
                nodes,
                records: ctx.cli.records,
                before,
                after,
                tansu_cpu: m.tansu_cpu,
                produce,
                last_receipt_unix_ms: m.last_receipt_unix_ms,
                receivers: &m.receivers,
            };
            let mut f = figures::derive(&inputs);
            f.warnings.extend(m.counter_errors.iter().cloned());
            for p in &processes {
                if p.exited_by_itself {
                    f.warnings
                        .push(format!("{} exited during the run: {}", p.name, p.status));
                    f.pass = false;
                }
            }
            if status != "ok" || !m.counter_errors.is_empty() {
                f.pass = false;
            }
            Some(f)
        }
        _ => None,
    };
    IngestRecord {
        source: source.as_str().to_owned(),
        nodes,
        status: status.to_owned(),
        error,
        wall_s: started.elapsed().as_secs_f64(),
        instance_ports: m.instance_ports,
        instance_command: m.instance_command,
        tansu_port: m.tansu_port,
        kafka_assignment: m.kafka_assignment,
        kafka_assignment_s: m.kafka_assignment_s,
        before: m.before,
        after: m.after,
        tansu_cpu_s: m.tansu_cpu,
        last_receipt_unix_ms: m.last_receipt_unix_ms,
        produce: m.produce,
        receivers: m.receivers,
        figures,
        processes,
        logs_dir: dir,
    }
}

/// A fresh API key per run (the instances' command lines are in the report;
/// the key is good only for this run's loopback instances).
fn api_key() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("bench-{:x}-{}", nanos, std::process::id())
}

async fn measure(
    ctx: &RowContext<'_>,
    source: IngestSource,
    nodes: usize,
    dir: &Path,
    supervisor: &mut Supervisor,
    m: &mut Measured,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let cli = ctx.cli;
    let run_start = Instant::now();
    let mut extra_args = cli.server_extra_args();
    if let Some(n) = ctx.server.ingest_inflight {
        extra_args.extend([INFLIGHT_FLAG.to_owned(), n.to_string()]);
    }
    let mut broker = None;
    let key = api_key();
    match source {
        IngestSource::Stream => extra_args.extend(["--ingest-stream".into(), STREAM.into()]),
        IngestSource::Kafka => {
            let bin = ctx
                .tansu_bin
                .ok_or_else(|| BenchError::Report("no Tansu binary for a kafka row".into()))?;
            let b = tansu::start(bin, dir, TOPIC, cli.kafka_partitions, supervisor, cancel).await?;
            m.tansu_port = Some(b.port);
            extra_args.extend([
                "--kafka-brokers".into(),
                b.brokers(),
                "--kafka-topics".into(),
                TOPIC.into(),
                "--kafka-group".into(),
                KAFKA_GROUP.into(),
            ]);
            broker = Some(b);
        }
        IngestSource::Http => extra_args.extend(["--api-key".into(), key.clone()]),
    }
    let spec = ClusterSpec {
        system: System::Switchboard(RoutingMode::Routed),
        nodes,
        server_bin: &ctx.setup.server_bin,
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
    let ready_at = Instant::now();
    m.instance_command = cluster.instance_command.clone();
    m.instance_ports = cluster
        .instances
        .iter()
        .map(|i| (i.id.clone(), i.port))
        .collect();
    let ports: Vec<u16> = cluster.instances.iter().map(|i| i.port).collect();
    let users = u64::from(cli.users);
    let receivers = receivers::connect_all(
        &ports,
        users,
        cli.records,
        Duration::from_secs_f64(cli.connect_timeout),
        cancel,
    )
    .await?;
    let outcome = async {
        let producer = match (&broker, source) {
            (Some(b), IngestSource::Kafka) => {
                wait_for_assignment(&cluster, dir, cli.kafka_partitions, supervisor, m, cancel)
                    .await?;
                m.kafka_assignment_s = Some(ready_at.elapsed().as_secs_f64());
                Producer::kafka(
                    &b.brokers(),
                    TOPIC,
                    Duration::from_secs_f64(cli.row_timeout),
                )
                .await?
            }
            (_, IngestSource::Stream) => {
                Producer::stream(cluster.redis.first_port(), STREAM, cli.xadd_batch).await?
            }
            _ => Producer::http(ports.clone(), key.clone(), cli.publish_inflight),
        };
        let tansu_pid = broker.as_ref().map(|b| b.pid);
        m.tansu_cpu.0 = tansu_pid.and_then(probe::process_cpu_seconds);
        m.before = Some(snapshot::take(&mut cluster, run_start).await?);
        let row_timeout = Duration::from_secs_f64(cli.row_timeout);
        let deadline = Instant::now() + row_timeout;
        let produce = producer.produce(cli.records, users, row_timeout);
        tokio::pin!(produce);
        let mut produced = None;
        let progress = &receivers.progress;
        let delivered_all = loop {
            if cancel.is_cancelled() {
                return Err(BenchError::Interrupted);
            }
            tokio::select! {
                stats = &mut produce, if produced.is_none() => {
                    produced = Some(stats);
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            if progress.first_receipts.load(Ordering::Relaxed) >= cli.records {
                break true;
            }
            if progress.broken.load(Ordering::Relaxed) > 0 || Instant::now() >= deadline {
                break false;
            }
        };
        let produced = match produced {
            Some(p) => p,
            None => match tokio::time::timeout(Duration::from_secs(5), &mut produce).await {
                Ok(stats) => stats,
                Err(_) => ProduceStats {
                    errors: vec![
                        "the producer had not finished 5 s after the wait for receipts ended"
                            .into(),
                    ],
                    ..ProduceStats::default()
                },
            },
        };
        let last_us = progress.last_receipt_unix_us.load(Ordering::Relaxed);
        m.last_receipt_unix_ms = (last_us > 0).then(|| last_us as f64 / 1000.0);
        let broken = progress.broken.load(Ordering::Relaxed);
        let received = progress.first_receipts.load(Ordering::Relaxed);
        m.produce = Some(produced);
        wait_for_counters(&cluster, source, cli.records, cancel).await;
        m.tansu_cpu.1 = tansu_pid.and_then(probe::process_cpu_seconds);
        let after = snapshot::take(&mut cluster, run_start).await?;
        m.counter_errors = figures::missing_counters(&after, source);
        m.after = Some(after);
        crate::run::check_instances_alive(&cluster, supervisor)?;
        if !delivered_all {
            return Err(BenchError::Loader(if broken > 0 {
                format!(
                    "{broken} receiver connection(s) broke; {received} of {} records received",
                    cli.records
                )
            } else {
                format!(
                    "{received} of {} records received within the row's {:.0} s",
                    cli.records,
                    row_timeout.as_secs_f64()
                )
            }));
        }
        Ok(())
    }
    .await;
    m.receivers = receivers.stop().await;
    outcome
}

/// Waits until every instance's log shows its partitions and together
/// they hold every partition once, twice in a row 0.5 s apart.
async fn wait_for_assignment(
    cluster: &Cluster,
    dir: &Path,
    partitions: u32,
    supervisor: &mut Supervisor,
    m: &mut Measured,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + ASSIGNMENT_TIMEOUT;
    let mut complete_once = false;
    loop {
        if cancel.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        crate::run::check_instances_alive(cluster, supervisor)?;
        let assignments: BTreeMap<String, Option<Vec<u32>>> = cluster
            .instances
            .iter()
            .map(|i| {
                let log =
                    std::fs::read_to_string(dir.join(format!("{}.log", i.id))).unwrap_or_default();
                (i.id.clone(), tansu::assignment_from_log(&log, TOPIC))
            })
            .collect();
        if tansu::complete(&assignments, partitions) {
            if complete_once {
                m.kafka_assignment = assignments
                    .into_iter()
                    .map(|(id, a)| (id, a.unwrap_or_default()))
                    .collect();
                return Ok(());
            }
            complete_once = true;
        } else {
            complete_once = false;
        }
        if Instant::now() >= deadline {
            return Err(BenchError::NotReady {
                name: format!("the kafka consumer group (assignments {assignments:?})"),
                seconds: ASSIGNMENT_TIMEOUT.as_secs_f64(),
                log_tail: cluster
                    .instances
                    .first()
                    .map(|i| supervisor.log_tail(i.pid, 10))
                    .unwrap_or_default(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (at most [`COUNTERS_TIMEOUT`]) until the instances' counters
/// account for `records`: the server counts a record once the router
/// answered, which may trail its delivery by a little.
async fn wait_for_counters(
    cluster: &Cluster,
    source: IngestSource,
    records: u64,
    cancel: &CancellationToken,
) {
    let deadline = Instant::now() + COUNTERS_TIMEOUT;
    while Instant::now() < deadline && !cancel.is_cancelled() {
        let scrapes = snapshot::scrape_all(cluster).await;
        let counted: f64 = scrapes
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .map(|s| figures::counted(s, source))
            .sum();
        if counted >= records as f64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl crate::report::Outputs for IngestResults {
    const WHAT: &'static str = "ingest";

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
    fn write_svg(&self, path: &Path) -> Result<bool, BenchError> {
        report::write_svg(self, path).map(|()| true)
    }
}
