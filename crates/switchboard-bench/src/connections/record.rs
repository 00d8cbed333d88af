//! What the connections workload records: one [`ConnectionsResults`] per
//! invocation (`<name>.json`), holding a [`PhaseRecord`] per phase run. Every
//! phase result is filled in as the phase goes, so a phase that fails half
//! way still reports what it measured before.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use switchboard_bench_schema::{ConnectionsRun, StormTally};

use super::figures::ConnectFigures;
use crate::probe::Memory;
use crate::procs::Stopped;
use crate::report::Machine;

/// Identifies the layout of a connections `<name>.json`.
pub const SCHEMA: &str = "switchboard-bench-connections/1";

/// Everything one `--workload connections` invocation produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionsResults {
    /// [`SCHEMA`].
    pub schema: String,
    /// The result name (file stem).
    pub name: String,
    /// The command line, shell-quoted.
    pub command: String,
    /// When it started, UTC.
    pub started_utc: String,
    /// When it finished, UTC.
    pub finished_utc: String,
    /// The machine.
    pub machine: Machine,
    /// Every setting (the parsed command line).
    pub config: serde_json::Value,
    /// The server binary measured.
    pub server_bin: PathBuf,
    /// Most connections one loader process was given (its open-files hard
    /// limit less a margin).
    pub per_loader_max: u32,
    /// How each figure is measured.
    pub method: Vec<String>,
    /// Whether Ctrl-C / SIGTERM cut the run short.
    pub interrupted: bool,
    /// RSS per connection at each step, then after every client closed.
    pub scale: Option<PhaseRecord<ScaleResult>>,
    /// Graceful drain of one instance.
    pub drain: Option<PhaseRecord<DrainResult>>,
    /// Reconnect storm.
    pub storm: Option<PhaseRecord<StormResult>>,
    /// Every instance full, held.
    pub hold_all: Option<PhaseRecord<HoldAllResult>>,
}

/// One phase: how it went, what it started, what it measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseRecord<T> {
    /// `ok`, `error` or `interrupted`.
    pub status: String,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Start to every process stopped, s.
    pub wall_s: f64,
    /// The logs of the phase's processes.
    pub logs_dir: PathBuf,
    /// The first instance's command line.
    pub instance_command: Vec<String>,
    /// Every loader's command line.
    pub loader_commands: Vec<Vec<String>>,
    /// How every process of the phase ended.
    pub processes: Vec<Stopped>,
    /// What it measured.
    pub result: T,
}

/// A memory reading of an instance with its connection count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    /// Seconds since the reference point (the stop, for after-close samples).
    pub t_s: f64,
    /// `switchboard_connections` of the instance (`None`: scrape failed).
    pub connections: Option<f64>,
    /// The instance's memory (`None`: process gone).
    pub memory: Option<Memory>,
}

/// The scale phase: one instance, batches of connections added step by step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleResult {
    /// The instance's id.
    pub instance: String,
    /// Its memory before any connection.
    pub baseline: Option<Memory>,
    /// One reading per step.
    pub steps: Vec<ScaleStep>,
    /// After every client closed.
    pub after_close: Option<AfterClose>,
}

/// The instance at one step of the scale phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScaleStep {
    /// Connections the step aims at, in total.
    pub target: u32,
    /// `switchboard_connections` at the reading.
    pub connections: f64,
    /// The instance's memory then.
    pub memory: Memory,
    /// `(rss - baseline) / connections`, KiB.
    pub total_kib_per_connection: Option<f64>,
    /// `(rss - previous rss) / connections added`, KiB.
    pub marginal_kib_per_connection: Option<f64>,
    /// The same two over RssAnon, KiB.
    pub total_anon_kib_per_connection: Option<f64>,
    /// See `total_anon_kib_per_connection`.
    pub marginal_anon_kib_per_connection: Option<f64>,
    /// The batch that was added.
    pub connect: ConnectFigures,
    /// Its loaders' documents after their connect phase.
    pub loaders: Vec<ConnectionsRun>,
}

/// The instance after every client of the scale phase closed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AfterClose {
    /// Connections when the loaders were told to close.
    pub connections_before: Option<f64>,
    /// From the stop until the instance counted no connection, s.
    pub closed_after_s: Option<f64>,
    /// Readings from the stop on, every 500 ms.
    pub samples: Vec<MemorySample>,
    /// How long after the last connection closed `memory_after` was read, s.
    pub after_s: f64,
    /// The instance's memory `after_s` after the last connection closed.
    pub memory_after: Option<Memory>,
    /// The loaders' final documents.
    pub loaders: Vec<ConnectionsRun>,
}

/// The drain phase: SIGTERM to an instance holding its connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainResult {
    /// Connections at the SIGTERM.
    pub connections: Option<f64>,
    /// The batch's connect phase (all at once: the burst connect rate).
    pub connect: ConnectFigures,
    /// The instance's memory with every connection open.
    pub memory: Option<Memory>,
    /// From the SIGTERM to the process's exit, s.
    pub exit_s: Option<f64>,
    /// Its exit status.
    pub exit_status: Option<String>,
    /// How the clients saw their connections end (`close 1001`, `eof`, ...).
    pub closes_by_cause: BTreeMap<String, u64>,
    /// Clients that received a close frame with code 1001.
    pub saw_1001: u64,
    /// From the SIGTERM to the last client seeing its connection end, s.
    pub last_close_s: Option<f64>,
    /// The loaders' final documents.
    pub loaders: Vec<ConnectionsRun>,
}

/// Connections held by the survivors at one instant of a storm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StormPoint {
    /// Seconds since the kill.
    pub t_s: f64,
    /// `switchboard_connections` summed over the survivors.
    pub survivors_connections: f64,
}

/// The storm phase: SIGKILL to one instance; its clients reconnect.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormResult {
    /// Instances of the cluster.
    pub instances: usize,
    /// The killed instance's id.
    pub victim: String,
    /// The survivors' ids.
    pub survivors: Vec<String>,
    /// The batch's connect phase.
    pub connect: ConnectFigures,
    /// Connections on the victim when it was killed.
    pub connections_on_victim: Option<f64>,
    /// When it was killed, Unix ms.
    pub killed_unix_ms: Option<f64>,
    /// Survivors' connections from the kill on, every 100 ms.
    pub timeline: Vec<StormPoint>,
    /// From the kill until the survivors counted every client, s (their
    /// `/metrics`).
    pub survivors_full_s: Option<f64>,
    /// Accept-queue overflows, machine-wide, from the kill until then.
    pub listen_overflows: Option<u64>,
    /// Added up over the loaders (their reconnects, timed from the kill).
    pub tally: StormTally,
    /// Reconnects by target instance.
    pub by_target: BTreeMap<String, u64>,
    /// Highest reconnect latency quantiles of the loaders (loss to welcome), ms.
    pub reconnect_p50_ms_max: Option<f64>,
    /// See `reconnect_p50_ms_max`.
    pub reconnect_p99_ms_max: Option<f64>,
    /// See `reconnect_p50_ms_max`.
    pub reconnect_max_ms: Option<f64>,
    /// The rule in words.
    pub rule: String,
    /// Whether the storm passed it.
    pub pass: bool,
    /// Why not.
    pub failures: Vec<String>,
    /// The loaders' final documents.
    pub loaders: Vec<ConnectionsRun>,
}

/// The hold-all phase: every instance full, held idle.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldAllResult {
    /// Instances.
    pub instances: usize,
    /// Connections asked per instance.
    pub per_instance: u32,
    /// Every batch's connect phase, added up.
    pub connect: ConnectFigures,
    /// Connections summed over the instances when the hold began.
    pub connections_at_start: Option<f64>,
    /// The fewest seen during the hold (sampled every second).
    pub min_connections: Option<f64>,
    /// How long they were held, s.
    pub held_s: f64,
    /// Each instance's memory at the end of the hold (id, reading).
    pub memory: Vec<(String, Option<Memory>)>,
    /// Connections the loaders lost during the hold.
    pub lost: u64,
    /// Whether every connection opened and stayed open.
    pub pass: bool,
    /// Why not.
    pub failures: Vec<String>,
    /// The loaders' final documents.
    pub loaders: Vec<ConnectionsRun>,
}
