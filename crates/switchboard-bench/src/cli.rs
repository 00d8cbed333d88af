//! The command line of `switchboard-bench`: every flag, its default, the
//! checks clap cannot express, and the translation of the workload flags into
//! the load generator's own command line.
//!
//! This module only describes what to run; it starts nothing.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use switchboard_bench_schema::{PassRule, Workload};

pub use switchboard_core::router::RoutingMode;

use crate::redis_server::{ClusterShape, RedisTopology};
use crate::system::{Peer, PeerAdapter, System};

/// Parses a routing mode by the name `switchboard --routing` takes.
fn routing_mode() -> impl clap::builder::TypedValueParser<Value = RoutingMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(RoutingMode::ALL.map(RoutingMode::as_str))
        .try_map(|name: String| name.parse::<RoutingMode>())
}

/// Benchmark orchestrator for Switchboard: for each routing mode (and, with
/// --peer socketio, each adapter of the Socket.IO peer) and instance count,
/// starts a fresh redis-server and N instances on 127.0.0.1, drives them with
/// switchboard-load, and measures CPU, bus and Redis traffic per message.
/// Writes <name>.json, .md and .svg to target/bench-results/<name>/ (or
/// --out-dir), with the logs of every process it started.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(
    name = "switchboard-bench",
    version,
    long_about = None,
    args_override_self = true
)]
pub struct Cli {
    /// Switchboard routing modes to measure, comma-separated. Default:
    /// routed,broadcast; none when --peer is given (name them to measure
    /// both in one invocation).
    #[arg(long, value_parser = routing_mode(), value_delimiter = ',')]
    pub modes: Option<Vec<RoutingMode>>,

    /// Also measure a peer, each of its --peer-adapter as its own row
    /// (`socketio-classic`, `socketio-sharded`) beside Switchboard's modes:
    /// `socketio` starts N `node bench/peers/socketio/server.js` (npm ci
    /// first if its node_modules is missing) and drives them with the same
    /// switchboard-load (--protocol socketio). --server-arg,
    /// --server-rate-limit and --lease-ms apply to Switchboard only.
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,

    /// --peer socketio: the adapters to measure, comma-separated (default: both).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub peer_adapter: Vec<PeerAdapter>,

    /// --peer socketio: the peer's directory (server.js, package.json, package-lock.json).
    #[arg(long, default_value = "bench/peers/socketio")]
    pub peer_dir: PathBuf,

    /// --peer socketio: the Node.js binary (18 or later).
    #[arg(long, default_value = "node")]
    pub node_bin: PathBuf,

    /// --peer socketio: the npm binary, for `npm ci` when node_modules is missing.
    #[arg(long, default_value = "npm")]
    pub npm_bin: PathBuf,

    /// Instance counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub nodes: Vec<usize>,

    /// Workload the load generator runs.
    #[arg(long, value_enum, default_value = "dm")]
    pub workload: Workload,

    /// Connected users (user k connects to instance k mod N).
    #[arg(long, default_value_t = 200)]
    pub users: u32,

    /// Offered messages per second (the start of the ladder with --find-max
    /// unless --start-rate is given).
    #[arg(long, default_value_t = 20_000)]
    pub rate: u32,

    /// Length of the send phase of each run (each step with --find-max), seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Message body size in bytes.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: u32,

    /// Share of messages whose recipient is on the sender's instance (loader default when absent).
    #[arg(long)]
    pub locality: Option<f64>,

    /// Room workload: number of rooms.
    #[arg(long)]
    pub rooms: Option<u32>,

    /// Room workload: members per room.
    #[arg(long)]
    pub room_members: Option<u32>,

    /// Room workload: over how many instances a room's members are spread.
    #[arg(long)]
    pub room_spread: Option<u32>,

    /// Churn workload: reconnects per second.
    #[arg(long)]
    pub churn_rate: Option<f64>,

    /// Use the loader's find-max mode: raise the rate until a step fails and
    /// report the highest sustained rate.
    #[arg(long)]
    pub find_max: bool,

    /// --find-max: first rate of the ladder (default: --rate).
    #[arg(long)]
    pub start_rate: Option<u32>,

    /// --find-max: factor between two ladder steps (loader default when absent).
    #[arg(long)]
    pub step_factor: Option<f64>,

    /// --find-max: run a failing rate again this many times before the ladder
    /// stops (the Socket.IO peer retries once).
    #[arg(long, default_value_t = 1)]
    pub retries: u32,

    /// Pass rule (as the Socket.IO peer): p99 latency at most this, ms.
    /// Also handed to the loader (--max-p99-ms).
    #[arg(long, default_value_t = 100.0)]
    pub max_p99_ms: f64,

    /// Pass rule (as the Socket.IO peer): delivered / expected must reach this.
    /// Also handed to the loader (--min-delivery).
    #[arg(long, default_value_t = 0.99)]
    pub min_delivery: f64,

    /// Handed to every instance as --rate-limit (frames/s per connection). The
    /// server's default (50/s) caps 200 users at 10k msgs/s; 0 turns the limit
    /// off, as in the Socket.IO peer, which has none. `server-default` passes
    /// nothing.
    #[arg(long, default_value = "0")]
    pub server_rate_limit: String,

    /// Switchboard rows: measure each mode once per value, comma-separated
    /// (`true,false`: stored DMs and `"store":false` ephemeral ones in one
    /// run, against the same build), handed to the loader as --dm-store. The
    /// rows are named `<mode>-stored` and `<mode>-ephemeral`. Default:
    /// nothing is passed (the loader's default, stored) and rows keep the
    /// mode's name. The peer's rows run once, without it.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = clap::value_parser!(bool),
        action = clap::ArgAction::Append,
        value_name = "BOOL,..."
    )]
    pub dm_store: Vec<bool>,

    /// Switchboard rows: the Redis each runs on, one row per value,
    /// comma-separated: `M` (3 to 16) starts a Redis Cluster of M masters
    /// on 127.0.0.1 (`redis-cli --cluster create`, no replicas unless
    /// --redis-cluster-replicas) and starts the instances with
    /// `--redis-cluster` and every master as a seed, rows named
    /// `<row>-cluster<M>`; `1` is one cluster node serving every slot (cluster
    /// mode without a second process: a control); `0` is one redis-server, as
    /// without the flag (`0,3`: the single-Redis baseline and the cluster side
    /// by side, per N).
    /// Redis figures are then the sums over the nodes; the report adds each
    /// node's CPU, bytes, cluster-bus messages and PUBLISH / SPUBLISH calls.
    #[arg(long, value_delimiter = ',', value_name = "MASTERS,...")]
    pub redis_cluster: Vec<usize>,

    /// --redis-cluster: replicas per master (`--cluster-replicas`); rows
    /// are then named `<row>-cluster<M>r<R>`.
    #[arg(long, default_value_t = 0)]
    pub redis_cluster_replicas: usize,

    /// The redis-cli binary (creates the Redis Cluster of --redis-cluster).
    #[arg(long, default_value = "redis-cli")]
    pub redis_cli: PathBuf,

    /// Extra argument handed verbatim to every switchboard instance (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,

    /// Extra argument handed verbatim to every switchboard-load run (repeatable).
    #[arg(long = "loader-arg", allow_hyphen_values = true)]
    pub loader_args: Vec<String>,

    /// Result name: files are <out-dir>/<name>.{json,md,svg}. Default: <workload>-<UTC timestamp>.
    #[arg(long)]
    pub name: Option<String>,

    /// Where this benchmark's result files and the logs of every process it
    /// starts go (logs under <out-dir>/logs/<mode>-n<N>/). Default:
    /// target/bench-results/<name> in the current directory (git ignores it).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,

    /// Also write <name>.{json,md,svg} into bench/results/, the tracked
    /// results docs/BENCHMARKS.md cites. Run from the repository root
    /// (scripts/bench.sh does); the logs stay in --out-dir.
    #[arg(long)]
    pub publish: bool,

    /// The switchboard server binary. Default: next to this binary.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,

    /// The load generator binary. Default: next to this binary.
    #[arg(long)]
    pub loader_bin: Option<PathBuf>,

    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,

    /// Handed to every instance as --lease-ms (server default when absent).
    #[arg(long)]
    pub lease_ms: Option<u64>,

    /// How long redis and every instance may take to become ready, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub ready_timeout: f64,

    /// Pause after every instance is ready, before the loader starts, ms.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,

    /// How long the loader may take to connect every user before the
    /// measured window starts anyway, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,

    /// Upper bound of one loader run, seconds (default: duration + 90 s; 900 s with --find-max).
    #[arg(long)]
    pub run_timeout: Option<f64>,

    /// Grace period between SIGTERM and SIGKILL when stopping a process, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub stop_timeout: f64,

    /// Interval of the CPU / delivered timeline kept in the JSON, ms (0: off).
    #[arg(long, default_value_t = 1000)]
    pub sample_ms: u64,

    /// Do not run anything: re-render <name>.md and <name>.svg from this results JSON.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub render_only: Option<PathBuf>,

    /// Do not run anything: merge these results files (comma-separated, e.g.
    /// one of Switchboard's modes and one of the peer) into one report,
    /// <out-dir>/<name>.{json,md,svg}. Their workload settings must be the
    /// same (otherwise the rows do not compare like for like).
    #[arg(long, value_delimiter = ',', value_name = "RESULTS_JSON,...")]
    pub merge: Vec<PathBuf>,

    /// --workload connections: the phases to run, in this order. `scale`:
    /// one instance, RSS per connection at each --steps count, then RSS
    /// after every client closed; `drain`: SIGTERM an instance holding
    /// --per-instance connections and time its exit; `storm`: SIGKILL one of
    /// --storm-instances holding --per-instance, every client reconnects to
    /// the survivors; `hold-all`: --per-instance on each of --storm-instances
    /// held --hold-all-s with no disconnect.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "scale,drain,storm"
    )]
    pub phases: Vec<ConnectionsPhase>,

    /// --workload connections, scale phase: total connections on the
    /// instance at which its RSS is read, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,19000")]
    pub steps: Vec<u32>,

    /// --workload connections: connections per instance in the drain, storm
    /// and hold-all phases (default: the last --steps value).
    #[arg(long)]
    pub per_instance: Option<u32>,

    /// --workload connections: loader processes that share each batch of
    /// connections (more are used when a batch exceeds what one process can
    /// hold under its open-files hard limit).
    #[arg(long, default_value_t = 2)]
    pub loader_procs: usize,

    /// --workload connections: loopback source addresses the loaders bind
    /// their sockets to, round-robin (bind-before-connect takes an ephemeral
    /// port of the source address, about 28,000 per address).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9"
    )]
    pub source_addrs: Vec<Ipv4Addr>,

    /// --workload connections: handshakes in flight per loader process. Keep
    /// their sum per instance within its listen backlog (128 with tokio's
    /// default): beyond it the accept queue overflows and a client waits a
    /// second for its SYN to be retried (the report counts these overflows).
    #[arg(long, default_value_t = 64)]
    pub handshake_concurrency: usize,

    /// --workload connections: how clients authenticate (`jwt`: a minted
    /// HS256 token per connection, the instances verify it).
    #[arg(long, value_enum, default_value = "jwt")]
    pub auth: BenchAuth,

    /// --workload connections: pause between a batch being connected and the
    /// RSS reading, ms.
    #[arg(long, default_value_t = 2000)]
    pub rss_settle_ms: u64,

    /// --workload connections, scale phase: how long RSS is followed after
    /// the instance counts no connection any more, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub after_close_s: f64,

    /// --workload connections, storm phase: every client must be back within
    /// this many seconds of the kill.
    #[arg(long, default_value_t = 5.0)]
    pub storm_within_s: f64,

    /// --workload connections: instances of the storm and hold-all phases.
    #[arg(long, default_value_t = 3)]
    pub storm_instances: usize,

    /// --workload connections, hold-all phase: how long every connection is
    /// held, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub hold_all_s: f64,

    /// --workload presence: watcher connections per churning user.
    #[arg(long, default_value_t = 10)]
    pub watchers_per_user: u32,

    /// --workload presence: watcher connections in all, spread over
    /// --watcher-instances (each needs at least --watchers-per-user).
    #[arg(long, default_value_t = 20)]
    pub watcher_conns: u32,

    /// --workload presence: the instances (1-based: 1 is n1) the watchers are
    /// on; the churning users connect to all. The others must receive no
    /// presence event at all.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub watcher_instances: Vec<usize>,

    /// --workload presence: handed to every instance (and the loader) as
    /// --presence-grace-ms; 0 makes every disconnect a transition at once.
    #[arg(long, default_value_t = 0)]
    pub presence_grace_ms: u64,

    /// --workload presence: also run a control row per N, the same churn
    /// with the watchers connected but watching nobody, so the cost of the
    /// events can be told from the cost of the connects and disconnects.
    #[arg(long)]
    pub presence_control: bool,

    /// --workload presence: run the rows (watched, control) this many times
    /// per N, alternating, each on fresh processes: the spread between
    /// repeats shows the noise of a shared machine.
    #[arg(long, default_value_t = 1)]
    pub presence_repeats: u32,

    /// --workload presence: after the churn phase, wait at most this long
    /// for the last events, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub presence_drain_s: f64,

    /// --workload ingest: the sources measured, one row each per N, in this
    /// order: `stream` (XADD to the stream the instances consume with
    /// --ingest-stream), `kafka` (a private Tansu broker, the instances
    /// consume with --kafka-brokers/--kafka-topics), `http` (the baseline:
    /// the same records POSTed to /api/v1/publish).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "stream,kafka,http"
    )]
    pub ingest_sources: Vec<IngestSource>,

    /// --workload ingest: DMs made available per row; record i is for user
    /// `bu-(i mod --users)`.
    #[arg(long, default_value_t = 20_000)]
    pub records: u64,

    /// --workload ingest, kafka rows: partitions of the topic.
    #[arg(long, default_value_t = 4)]
    pub kafka_partitions: u32,

    /// --workload ingest, kafka rows: the Tansu broker binary. Default:
    /// $TANSU_BIN, else where scripts/install-tansu.sh puts it
    /// ($TANSU_HOME/bin/tansu, ~/.local/share/switchboard/tansu/bin/tansu),
    /// else `tansu` on PATH.
    #[arg(long)]
    pub tansu_bin: Option<PathBuf>,

    /// --workload ingest, http rows: POSTs in flight at once (round robin
    /// over the instances).
    #[arg(long, default_value_t = 64)]
    pub publish_inflight: usize,

    /// --workload ingest, stream rows: XADDs per pipelined batch.
    #[arg(long, default_value_t = 500)]
    pub xadd_batch: usize,

    /// --workload ingest: a row fails if its last record is not delivered
    /// within this many seconds of the first being made available.
    #[arg(long, default_value_t = 120.0)]
    pub row_timeout: f64,

    /// --workload ingest: handed to every instance as --ingest-inflight, but
    /// only when the server's --help lists that flag (otherwise a warning
    /// and the server runs as it is).
    #[arg(long)]
    pub ingest_inflight: Option<u32>,
}

/// Where the ingest workload's records come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IngestSource {
    /// A Redis stream (`--ingest-stream`), filled with pipelined XADDs.
    Stream,
    /// A Kafka topic on a private Tansu broker, filled by rdkafka.
    Kafka,
    /// `POST /api/v1/publish`, a bounded number in flight: the baseline.
    Http,
}

impl IngestSource {
    /// The name on the command line and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            IngestSource::Stream => "stream",
            IngestSource::Kafka => "kafka",
            IngestSource::Http => "http",
        }
    }
}

/// A phase of the connections workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionsPhase {
    /// RSS per connection at each --steps count, then after every client closed.
    Scale,
    /// Time a graceful drain (SIGTERM) of --per-instance connections.
    Drain,
    /// SIGKILL an instance; every client reconnects to the survivors.
    Storm,
    /// --per-instance connections on each instance, held with no disconnect.
    HoldAll,
}

impl ConnectionsPhase {
    /// The name on the command line and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionsPhase::Scale => "scale",
            ConnectionsPhase::Drain => "drain",
            ConnectionsPhase::Storm => "storm",
            ConnectionsPhase::HoldAll => "hold-all",
        }
    }
}

/// How the connections workload's clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchAuth {
    /// HS256 tokens (the instances run `--auth jwt` with a secret made per run).
    Jwt,
    /// `?user=` (`--auth none`).
    None,
}

/// No source address may carry more connections at once than this: the
/// ephemeral range (32768-60999 here) holds about 28,000 ports per address.
pub const MAX_PER_SOURCE_ADDR: u64 = 25_000;

/// A row's name: the system's, with `-stored` or `-ephemeral` when it ran
/// with an explicit --dm-store, and `-cluster<M>` when its Redis was a
/// Redis Cluster of M masters.
pub fn row_name(system: System, dm_store: Option<bool>, redis: RedisTopology) -> String {
    let store = match dm_store {
        None => "",
        Some(true) => "-stored",
        Some(false) => "-ephemeral",
    };
    format!("{}{store}{}", system.name(), redis.row_suffix())
}

/// The largest Redis Cluster --redis-cluster starts (masters x (1 + replicas)).
const MAX_CLUSTER_NODES: usize = 32;

/// Where `--publish` writes, relative to the repository root.
pub const PUBLISH_DIR: &str = "bench/results";

impl Cli {
    /// Checks what clap cannot: non-empty lists, positive numbers.
    pub fn validate(&self) -> Result<(), String> {
        if self.render_only.is_some() {
            return Ok(());
        }
        if !self.merge.is_empty() {
            return self.validate_name();
        }
        if self.modes.as_ref().is_some_and(Vec::is_empty) {
            return Err("--modes is empty".into());
        }
        if self.peer.is_none() && !self.peer_adapter.is_empty() {
            return Err("--peer-adapter needs --peer socketio".into());
        }
        if self.peer.is_some() && self.workload == Workload::Connections {
            return Err("--workload connections measures Switchboard only (no --peer)".into());
        }
        if self.nodes.is_empty() || self.nodes.contains(&0) {
            return Err("--nodes needs instance counts of at least 1".into());
        }
        if self.nodes.iter().any(|&n| n > 64) {
            return Err("--nodes: at most 64 instances per run".into());
        }
        if self.users < 2 {
            return Err("--users must be at least 2".into());
        }
        if self.rate == 0 {
            return Err("--rate must be positive".into());
        }
        if !(self.duration > 0.0 && self.duration <= 3600.0) {
            return Err("--duration must be in (0, 3600] seconds".into());
        }
        if !(self.min_delivery > 0.0 && self.min_delivery <= 1.0) {
            return Err("--min-delivery must be in (0, 1]".into());
        }
        if self.max_p99_ms.is_nan() || self.max_p99_ms <= 0.0 {
            return Err("--max-p99-ms must be positive".into());
        }
        for (flag, v) in [
            ("--ready-timeout", self.ready_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--stop-timeout", self.stop_timeout),
        ] {
            if v.is_nan() || v <= 0.0 {
                return Err(format!("{flag} must be positive"));
            }
        }
        if let Some(t) = self.run_timeout {
            if t.is_nan() || t <= 0.0 {
                return Err("--run-timeout must be positive".into());
            }
        }
        if self.server_rate_limit != "server-default"
            && !self
                .server_rate_limit
                .parse::<f64>()
                .is_ok_and(|v| v >= 0.0)
        {
            return Err("--server-rate-limit takes a number >= 0 or `server-default`".into());
        }
        if self.publish && !std::path::Path::new(PUBLISH_DIR).is_dir() {
            return Err(format!(
                "--publish writes into {PUBLISH_DIR}/, which is not here: run from the \
                 repository root (scripts/bench.sh does)"
            ));
        }
        self.validate_name()?;
        if !self.dm_store.is_empty() {
            if !matches!(self.workload, Workload::Dm | Workload::Mixed) {
                return Err("--dm-store needs a workload that sends DMs (dm, mixed)".into());
            }
            if self
                .dm_store
                .iter()
                .enumerate()
                .any(|(i, v)| self.dm_store[..i].contains(v))
            {
                return Err("--dm-store: each value once".into());
            }
            if self.loader_args.iter().any(|a| a.starts_with("--dm-store")) {
                return Err("--dm-store given both directly and as --loader-arg".into());
            }
        }
        if self.workload == Workload::Connections {
            self.validate_connections()?;
        }
        if self.workload == Workload::Presence {
            self.validate_presence()?;
        }
        if self.workload == Workload::Ingest {
            self.validate_ingest()?;
        }
        self.validate_redis_cluster()
    }

    /// The checks of --redis-cluster and --redis-cluster-replicas.
    fn validate_redis_cluster(&self) -> Result<(), String> {
        let clusters = self.redis_cluster.iter().any(|&m| m > 0);
        if self.redis_cluster_replicas > 0 && !clusters {
            return Err("--redis-cluster-replicas needs --redis-cluster M".into());
        }
        if !clusters {
            return Ok(());
        }
        if let Some(m) = self.redis_cluster.iter().find(|&&m| m == 2 || m > 16) {
            return Err(format!(
                "--redis-cluster: {m} masters; 1 (every slot on one node) or 3 to 16 here \
                 (0: one redis-server)"
            ));
        }
        if self.redis_cluster.contains(&1) && self.redis_cluster_replicas > 0 {
            return Err("--redis-cluster 1 takes no --redis-cluster-replicas".into());
        }
        let total = self.redis_cluster.iter().max().copied().unwrap_or(0)
            * (1 + self.redis_cluster_replicas);
        if total > MAX_CLUSTER_NODES {
            return Err(format!(
                "--redis-cluster: {total} nodes; at most {MAX_CLUSTER_NODES} (masters x (1 + replicas))"
            ));
        }
        if self
            .redis_cluster
            .iter()
            .enumerate()
            .any(|(i, v)| self.redis_cluster[..i].contains(v))
        {
            return Err("--redis-cluster: each value once".into());
        }
        if self.peer.is_some() {
            return Err("--redis-cluster measures Switchboard only (no --peer)".into());
        }
        if self.workload == Workload::Connections {
            return Err("--redis-cluster needs a message workload (not connections)".into());
        }
        if self
            .server_args
            .iter()
            .any(|a| a.starts_with("--redis-url") || a.starts_with("--redis-cluster"))
        {
            return Err("--redis-cluster: the instances' Redis is the benchmark's; no --server-arg=--redis-*".into());
        }
        Ok(())
    }

    /// The Redis each Switchboard row runs on, in order: one redis-server
    /// unless --redis-cluster is given.
    pub fn redis_topologies(&self, system: System) -> Vec<RedisTopology> {
        if self.redis_cluster.is_empty() || !matches!(system, System::Switchboard(_)) {
            return vec![RedisTopology::Single];
        }
        self.redis_cluster
            .iter()
            .map(|&masters| match masters {
                0 => RedisTopology::Single,
                masters => RedisTopology::Cluster(ClusterShape {
                    masters,
                    replicas: self.redis_cluster_replicas,
                }),
            })
            .collect()
    }

    fn validate_name(&self) -> Result<(), String> {
        match &self.name {
            Some(name) if name.is_empty() || name.contains('/') || name.starts_with('.') => {
                Err("--name must be a plain file name".into())
            }
            _ => Ok(()),
        }
    }

    /// What the matrix measures, in order: Switchboard's modes (--modes,
    /// default routed,broadcast unless --peer is given), then the peer's adapters.
    pub fn systems(&self) -> Vec<System> {
        let default_modes = [RoutingMode::Routed, RoutingMode::Broadcast];
        let modes = match (&self.modes, self.peer) {
            (Some(modes), _) => modes.clone(),
            (None, None) => default_modes.to_vec(),
            (None, Some(_)) => Vec::new(),
        };
        let adapters = match self.peer {
            None => Vec::new(),
            Some(Peer::Socketio) if self.peer_adapter.is_empty() => {
                vec![PeerAdapter::Classic, PeerAdapter::Sharded]
            }
            Some(Peer::Socketio) => self.peer_adapter.clone(),
        };
        modes
            .into_iter()
            .map(System::Switchboard)
            .chain(adapters.into_iter().map(System::Socketio))
            .collect()
    }

    /// The --dm-store values a system's rows run with: `None` (the loader's
    /// default, nothing passed) unless --dm-store is given; the peer's rows
    /// always once, with `None`.
    pub fn dm_store_variants(&self, system: System) -> Vec<Option<bool>> {
        match system {
            System::Switchboard(_) if !self.dm_store.is_empty() => {
                self.dm_store.iter().copied().map(Some).collect()
            }
            _ => vec![None],
        }
    }

    /// The checks of the connections workload's flags.
    fn validate_connections(&self) -> Result<(), String> {
        if self.phases.is_empty() {
            return Err("--phases is empty".into());
        }
        if self.steps.is_empty() || self.steps.contains(&0) {
            return Err("--steps needs connection counts of at least 1".into());
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err("--steps must be ascending".into());
        }
        if self.per_instance() == 0 {
            return Err("--per-instance must be at least 1".into());
        }
        if self.loader_procs == 0 || self.loader_procs > 64 {
            return Err("--loader-procs must be in 1..=64".into());
        }
        if self.handshake_concurrency == 0 {
            return Err("--handshake-concurrency must be at least 1".into());
        }
        if self.source_addrs.is_empty() {
            return Err("--source-addrs is empty".into());
        }
        if let Some(a) = self.source_addrs.iter().find(|a| !a.is_loopback()) {
            return Err(format!(
                "--source-addrs: {a} is not in 127.0.0.0/8 (the benchmark stays on loopback)"
            ));
        }
        let multi = self
            .phases
            .iter()
            .any(|p| matches!(p, ConnectionsPhase::Storm | ConnectionsPhase::HoldAll));
        if multi && !(2..=16).contains(&self.storm_instances) {
            return Err("--storm-instances must be in 2..=16".into());
        }
        // Every connection of the busiest phase at once, spread evenly.
        let busiest = self.most_connections_at_once();
        let per_addr = busiest.div_ceil(self.source_addrs.len() as u64);
        if per_addr > MAX_PER_SOURCE_ADDR {
            return Err(format!(
                "{busiest} connections over {} source addresses is {per_addr} per address, more \
                 than the {MAX_PER_SOURCE_ADDR} its ephemeral ports allow: add --source-addrs",
                self.source_addrs.len()
            ));
        }
        for (flag, v) in [
            ("--after-close-s", self.after_close_s),
            ("--storm-within-s", self.storm_within_s),
            ("--hold-all-s", self.hold_all_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{flag} must be positive"));
            }
        }
        Ok(())
    }

    /// The checks of the presence workload's flags (the loader checks the
    /// rest: the rate against the grace, watches per connection).
    fn validate_presence(&self) -> Result<(), String> {
        if self.peer.is_some() {
            return Err("--workload presence measures Switchboard only (no --peer)".into());
        }
        if self.find_max {
            return Err("--workload presence runs at one --churn-rate (no --find-max)".into());
        }
        if self.watcher_instances.is_empty() || self.watcher_instances.contains(&0) {
            return Err("--watcher-instances: instance numbers from 1 (n1)".into());
        }
        let highest = self.watcher_instances.iter().max().copied().unwrap_or(0);
        if let Some(&n) = self.nodes.iter().find(|&&n| n <= highest) {
            return Err(format!(
                "--workload presence: N={n} leaves no instance without watchers (watchers on \
                 {:?}); use --nodes above {highest}",
                self.watcher_instances
            ));
        }
        if !(1..=10).contains(&self.presence_repeats) {
            return Err("--presence-repeats must be in 1..=10".into());
        }
        if !(self.presence_drain_s.is_finite() && self.presence_drain_s > 0.0) {
            return Err("--presence-drain-s must be positive".into());
        }
        if self.churn_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err("--churn-rate must be positive".into());
        }
        Ok(())
    }

    /// The checks of the ingest workload's flags.
    fn validate_ingest(&self) -> Result<(), String> {
        if self.peer.is_some() {
            return Err("--workload ingest measures Switchboard only (no --peer)".into());
        }
        if self.find_max {
            return Err("--workload ingest makes --records available once (no --find-max)".into());
        }
        if self.redis_cluster.iter().any(|&m| m > 0) {
            return Err("--workload ingest runs on one redis-server (no --redis-cluster)".into());
        }
        if self.ingest_sources.is_empty() {
            return Err("--ingest-sources is empty".into());
        }
        if self
            .ingest_sources
            .iter()
            .enumerate()
            .any(|(i, v)| self.ingest_sources[..i].contains(v))
        {
            return Err("--ingest-sources: each source once".into());
        }
        if !(1..=10_000_000).contains(&self.records) {
            return Err("--records must be in 1..=10000000".into());
        }
        if !(1..=1024).contains(&self.kafka_partitions) {
            return Err("--kafka-partitions must be in 1..=1024".into());
        }
        if !(1..=4096).contains(&self.publish_inflight) {
            return Err("--publish-inflight must be in 1..=4096".into());
        }
        if !(1..=10_000).contains(&self.xadd_batch) {
            return Err("--xadd-batch must be in 1..=10000".into());
        }
        if !(self.row_timeout.is_finite() && self.row_timeout > 0.0) {
            return Err("--row-timeout must be positive".into());
        }
        if self.ingest_inflight == Some(0) {
            return Err("--ingest-inflight must be at least 1".into());
        }
        Ok(())
    }

    /// The presence workload's transitions per second (default 200).
    pub fn presence_rate(&self) -> f64 {
        self.churn_rate.unwrap_or(200.0)
    }

    /// Connections per instance in the drain, storm and hold-all phases.
    pub fn per_instance(&self) -> u32 {
        self.per_instance
            .or_else(|| self.steps.last().copied())
            .unwrap_or(0)
    }

    /// The most connections any chosen phase holds at once.
    pub fn most_connections_at_once(&self) -> u64 {
        let per_instance = u64::from(self.per_instance());
        self.phases
            .iter()
            .map(|p| match p {
                ConnectionsPhase::Scale => u64::from(self.steps.last().copied().unwrap_or(0)),
                ConnectionsPhase::Drain | ConnectionsPhase::Storm => per_instance,
                ConnectionsPhase::HoldAll => per_instance * self.storm_instances as u64,
            })
            .max()
            .unwrap_or(0)
    }

    /// The pass rule of `--min-delivery` and `--max-p99-ms` (the loader gets the same).
    pub fn pass_rule(&self) -> PassRule {
        PassRule {
            min_delivery: self.min_delivery,
            max_p99_ms: self.max_p99_ms,
        }
    }

    /// The directory of this benchmark's results and logs.
    pub fn out_dir(&self, name: &str) -> PathBuf {
        self.out_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/bench-results").join(name))
    }

    /// The upper bound of one loader run.
    pub fn loader_timeout_s(&self) -> f64 {
        match self.run_timeout {
            Some(t) => t,
            None if self.find_max => 900.0,
            None => self.duration + 90.0,
        }
    }

    /// Connections the loader opens: --users times its --conns-per-user (1
    /// unless given through --loader-arg).
    pub fn expected_connections(&self) -> f64 {
        let per_user = self
            .loader_args
            .iter()
            .enumerate()
            .find_map(|(i, a)| {
                if let Some(v) = a.strip_prefix("--conns-per-user=") {
                    return v.parse::<f64>().ok();
                }
                (a == "--conns-per-user")
                    .then(|| self.loader_args.get(i + 1)?.parse::<f64>().ok())
                    .flatten()
            })
            .unwrap_or(1.0);
        f64::from(self.users) * per_user
    }

    /// The loader's command line for one run, without --targets and --out.
    pub fn loader_workload_args(&self) -> Vec<String> {
        let mut pairs: Vec<(&str, Option<String>)> = vec![
            ("--users", Some(self.users.to_string())),
            ("--workload", Some(self.workload.as_str().to_owned())),
            ("--rate", Some(self.rate.to_string())),
            ("--duration", Some(self.duration.to_string())),
            ("--body-bytes", Some(self.body_bytes.to_string())),
            ("--locality", self.locality.map(|v| v.to_string())),
            ("--rooms", self.rooms.map(|v| v.to_string())),
            ("--room-members", self.room_members.map(|v| v.to_string())),
            ("--room-spread", self.room_spread.map(|v| v.to_string())),
            ("--churn-rate", self.churn_rate.map(|v| v.to_string())),
            // The loader applies the same pass rule to its own verdict.
            ("--max-p99-ms", Some(self.max_p99_ms.to_string())),
            ("--min-delivery", Some(self.min_delivery.to_string())),
        ];
        if self.find_max {
            let start = self.start_rate.unwrap_or(self.rate);
            pairs.push(("--start-rate", Some(start.to_string())));
            pairs.push(("--step-factor", self.step_factor.map(|v| v.to_string())));
            pairs.push(("--retries", Some(self.retries.to_string())));
        }
        let mut args: Vec<String> = Vec::new();
        if self.find_max {
            args.push("--find-max".to_owned());
        }
        for (flag, value) in pairs {
            if let Some(value) = value {
                args.push(flag.to_owned());
                args.push(value);
            }
        }
        args.extend(self.loader_args.iter().cloned());
        args
    }

    /// Extra flags for every instance: the rate limit, then --server-arg verbatim.
    pub fn server_extra_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.server_rate_limit != "server-default" {
            args.push("--rate-limit".to_owned());
            args.push(self.server_rate_limit.clone());
        }
        args.extend(self.server_args.iter().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("switchboard-bench").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        cli.validate().map(|()| cli)
    }

    #[test]
    fn peer_rows_join_or_replace_the_modes() {
        let names = |args: &[&str]| -> Vec<String> {
            parse(args)
                .expect("valid")
                .systems()
                .into_iter()
                .map(System::name)
                .collect()
        };
        assert_eq!(names(&[]), ["routed", "broadcast"]);
        assert_eq!(
            names(&["--peer", "socketio"]),
            ["socketio-classic", "socketio-sharded"]
        );
        assert_eq!(
            names(&[
                "--modes",
                "routed",
                "--peer",
                "socketio",
                "--peer-adapter",
                "sharded"
            ]),
            ["routed", "socketio-sharded"]
        );
        assert!(parse(&["--peer-adapter", "classic"]).is_err());
        assert!(parse(&["--peer", "socketio", "--workload", "connections"]).is_err());
        assert!(parse(&["--merge", "a.json,b.json", "--name", "x/y"]).is_err());
        assert!(parse(&["--merge", "a.json,b.json", "--name", "both"]).is_ok());
    }

    #[test]
    fn dm_store_variants_name_their_rows() {
        let rows = |args: &[&str]| -> Vec<String> {
            let cli = parse(args).expect("valid");
            cli.systems()
                .into_iter()
                .flat_map(|s| {
                    cli.dm_store_variants(s)
                        .into_iter()
                        .map(move |v| row_name(s, v, RedisTopology::Single))
                })
                .collect()
        };
        assert_eq!(rows(&["--modes", "routed"]), ["routed"]);
        assert_eq!(
            rows(&["--modes", "routed", "--dm-store", "true,false"]),
            ["routed-stored", "routed-ephemeral"]
        );
        assert_eq!(
            rows(&[
                "--modes",
                "routed",
                "--peer",
                "socketio",
                "--peer-adapter",
                "classic",
                "--dm-store",
                "false"
            ]),
            ["routed-ephemeral", "socketio-classic"]
        );
        assert!(parse(&["--dm-store", "true,true"]).is_err());
        assert!(parse(&["--dm-store", "no"]).is_err());
        assert!(parse(&["--dm-store", "false", "--workload", "room"]).is_err());
        assert!(parse(&["--dm-store", "false", "--loader-arg=--dm-store=true"]).is_err());
    }

    #[test]
    fn redis_cluster_rows_follow_the_single_redis_rows() {
        let rows = |args: &[&str]| -> Vec<String> {
            let cli = parse(args).expect("valid");
            let mut rows = Vec::new();
            for system in cli.systems() {
                for store in cli.dm_store_variants(system) {
                    for redis in cli.redis_topologies(system) {
                        rows.push(row_name(system, store, redis));
                    }
                }
            }
            rows
        };
        assert_eq!(
            rows(&["--modes", "routed,broadcast", "--redis-cluster", "0,3"]),
            [
                "routed",
                "routed-cluster3",
                "broadcast",
                "broadcast-cluster3"
            ]
        );
        assert_eq!(
            rows(&[
                "--modes",
                "routed",
                "--redis-cluster",
                "3",
                "--redis-cluster-replicas",
                "1",
                "--dm-store",
                "false"
            ]),
            ["routed-ephemeral-cluster3r1"]
        );
        for bad in [
            &["--redis-cluster", "2"][..],
            &["--redis-cluster", "17"],
            &["--redis-cluster", "1,3", "--redis-cluster-replicas", "1"],
            &["--redis-cluster", "3,3"],
            &["--redis-cluster", "0", "--redis-cluster-replicas", "1"],
            &["--redis-cluster", "16", "--redis-cluster-replicas", "2"],
            &["--redis-cluster", "3", "--peer", "socketio"],
            &["--redis-cluster", "3", "--workload", "connections"],
            &["--redis-cluster", "3", "--server-arg=--redis-url=redis://x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse(&["--redis-cluster", "0", "--peer", "socketio"]).is_ok());
        assert!(parse(&["--redis-cluster", "0,1,3"]).is_ok());
    }

    #[test]
    fn presence_flags_are_checked() {
        let ok = parse(&["--workload", "presence", "--nodes", "4"]).expect("valid");
        assert_eq!(ok.watcher_instances, [1, 2]);
        assert_eq!(ok.presence_rate(), 200.0);
        for bad in [
            &["--workload", "presence"][..],
            &["--workload", "presence", "--nodes", "2"],
            &[
                "--workload",
                "presence",
                "--nodes",
                "4",
                "--watcher-instances",
                "0,1",
            ],
            &[
                "--workload",
                "presence",
                "--nodes",
                "4",
                "--watcher-instances",
                "1,4",
            ],
            &["--workload", "presence", "--nodes", "4", "--find-max"],
            &[
                "--workload",
                "presence",
                "--nodes",
                "4",
                "--churn-rate",
                "0",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ingest_flags_are_checked() {
        let ok = parse(&["--workload", "ingest", "--nodes", "1,2"]).expect("valid");
        assert_eq!(
            ok.ingest_sources,
            [
                IngestSource::Stream,
                IngestSource::Kafka,
                IngestSource::Http
            ]
        );
        assert_eq!((ok.records, ok.kafka_partitions), (20_000, 4));
        for bad in [
            &["--workload", "ingest", "--ingest-sources", "stream,stream"][..],
            &["--workload", "ingest", "--records", "0"],
            &["--workload", "ingest", "--kafka-partitions", "0"],
            &["--workload", "ingest", "--find-max"],
            &["--workload", "ingest", "--redis-cluster", "3"],
            &["--workload", "ingest", "--ingest-sources", "nats"],
            &["--workload", "ingest", "--row-timeout", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn connections_flags_are_checked() {
        let cli = parse(&["--workload", "connections"]).expect("the defaults are valid");
        assert_eq!(cli.per_instance(), 19_000);
        assert_eq!(cli.most_connections_at_once(), 19_000);
        let all = parse(&["--workload", "connections", "--phases", "hold-all"]).expect("valid");
        assert_eq!(all.most_connections_at_once(), 57_000);
        for bad in [
            &["--workload", "connections", "--steps", "5000,1000"][..],
            &["--workload", "connections", "--source-addrs", "10.0.0.2"],
            // 57,000 over two addresses is more than their ports allow.
            &[
                "--workload",
                "connections",
                "--phases",
                "hold-all",
                "--source-addrs",
                "127.0.0.2,127.0.0.3",
            ],
            &["--workload", "connections", "--loader-procs", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
