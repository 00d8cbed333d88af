//! Readings of a running cluster at one instant: CPU seconds of every
//! instance and of redis-server (`/proc`), each instance's counters
//! (`/metrics`, or the Socket.IO peer's `/stats`), Redis' INFO counters, machine-wide CPU, and the benchmark's own CPU.
//! On a Redis Cluster every node is read (also its `CLUSTER INFO` and the
//! bytes it wrote, `/proc/PID/io`) and the Redis figures are their sums. A run takes
//! one before and one after the measured window and subtracts them; a light
//! timeline (CPU and two gauges) is sampled in between.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::error::BenchError;
use crate::openmetrics::Scrape;
use crate::peer;
use crate::probe::{self, MachineCpu};
use crate::redis_info::RedisSnapshot;
use crate::redis_server::NodeRole;
use crate::system::{MetricNames, System};

/// One instance at one instant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceReading {
    /// Its `--instance-id`.
    pub id: String,
    /// utime + stime from `/proc/PID/stat`, seconds (`None`: process gone).
    pub cpu_s: Option<f64>,
    /// Its `/metrics` (histogram buckets left out; the peer's `/stats` as
    /// series, see `peer::scrape_of_stats`); empty if the scrape failed.
    pub metrics: Scrape,
    /// Why the scrape failed, if it did.
    pub scrape_error: Option<String>,
}

/// One Redis Cluster node at one instant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisNodeReading {
    /// Its port.
    pub port: u16,
    /// Master or replica.
    pub role: NodeRole,
    /// utime + stime from `/proc/PID/stat`, seconds.
    pub cpu_s: Option<f64>,
    /// Bytes it passed to write(2)/send(2) so far (`/proc/PID/io` wchar):
    /// clients and replicas (INFO's `total_net_output_bytes`) and the
    /// cluster bus, which INFO does not count.
    pub write_bytes: Option<u64>,
    /// Its own counters.
    pub redis: RedisSnapshot,
}

/// Everything read at one instant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Every instance, in id order.
    pub instances: Vec<InstanceReading>,
    /// redis-server's utime + stime from `/proc`, seconds (a Redis Cluster:
    /// the sum over its nodes).
    pub redis_cpu_s: Option<f64>,
    /// Redis' own counters (a Redis Cluster: the sum over its nodes).
    pub redis: RedisSnapshot,
    /// A Redis Cluster: every node, in port order (empty for one redis-server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redis_nodes: Vec<RedisNodeReading>,
    /// Machine-wide CPU time.
    pub machine: MachineCpu,
    /// This benchmark process's CPU seconds (it should stay near zero in the window).
    pub bench_cpu_s: Option<f64>,
}

impl Snapshot {
    /// Sum over instances of the connections gauge.
    pub fn connections(&self, names: &MetricNames) -> f64 {
        self.instances
            .iter()
            .map(|i| i.metrics.sum(names.connections, None))
            .sum()
    }

    /// Sum over instances of the frames queued to sockets.
    pub fn frames_queued(&self, names: &MetricNames) -> f64 {
        self.instances
            .iter()
            .map(|i| i.metrics.sum(names.frames_queued, None))
            .sum()
    }
}

/// A timeline point: cheap readings taken every `--sample-ms` during the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the run started.
    pub t_s: f64,
    /// CPU seconds of each instance so far.
    pub instance_cpu_s: Vec<Option<f64>>,
    /// CPU seconds of redis-server so far (a Redis Cluster: all nodes).
    pub redis_cpu_s: Option<f64>,
    /// Sum over instances of the connections gauge.
    pub connections: f64,
    /// Sum over instances of the frames queued to sockets.
    pub frames_queued: f64,
}

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// Scrapes every instance's counters concurrently (one task each; `/metrics`,
/// or the peer's `/stats`), results in instance order.
pub async fn scrape_all(cluster: &Cluster) -> Vec<Result<Scrape, String>> {
    let system = cluster.system;
    let tasks: Vec<_> = cluster
        .instances
        .iter()
        .map(|i| {
            let port = i.port;
            let http = cluster.http.clone();
            tokio::spawn(async move {
                let path = system.counters_path();
                let response = http
                    .get(port, path, SCRAPE_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?;
                if response.status != 200 {
                    return Err(format!("{path} answered {}", response.status));
                }
                match system {
                    System::Switchboard(_) => Ok(Scrape::parse(&response.body)),
                    System::Socketio(_) => peer::scrape_of_stats(&response.body),
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(match task.await {
            Ok(result) => result,
            Err(e) => Err(format!("scrape task failed: {e}")),
        });
    }
    out
}

/// Sum of the connections gauge over the scrapes that worked.
pub fn connections(scrapes: &[Result<Scrape, String>], names: &MetricNames) -> f64 {
    scrapes
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .map(|s| s.sum(names.connections, None))
        .sum()
}

/// Sum of the frames queued to sockets over the scrapes that worked.
pub fn frames_queued(scrapes: &[Result<Scrape, String>], names: &MetricNames) -> f64 {
    scrapes
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .map(|s| s.sum(names.frames_queued, None))
        .sum()
}

/// Takes a full snapshot. CPU is read first (instantly, for all processes),
/// then Redis INFO, then the scrapes: a snapshot whose scrapes still count
/// every user connected read the rest before any disconnect was seen (the
/// window's end relies on it to keep the teardown out).
pub async fn take(cluster: &mut Cluster, run_start: Instant) -> Result<Snapshot, BenchError> {
    let t_s = run_start.elapsed().as_secs_f64();
    let cpu: Vec<Option<f64>> = cluster
        .instances
        .iter()
        .map(|i| probe::process_cpu_seconds(i.pid))
        .collect();
    let node_cpu: Vec<(Option<f64>, Option<u64>)> = cluster
        .redis
        .nodes
        .iter()
        .map(|n| {
            (
                probe::process_cpu_seconds(n.pid),
                probe::process_write_bytes(n.pid),
            )
        })
        .collect();
    let machine = probe::machine_cpu();
    let bench_cpu_s = probe::own_cpu_seconds();
    let redis_cpu_s = node_cpu.iter().map(|(cpu, _)| *cpu).sum::<Option<f64>>();
    let mut node_counters = Vec::with_capacity(cluster.redis.nodes.len());
    for node in &mut cluster.redis.nodes {
        node_counters.push(node.probe.snapshot().await?);
    }
    let (redis, redis_nodes) = match cluster.redis.nodes.as_slice() {
        [node] if node.info.is_none() => (node_counters.remove(0), Vec::new()),
        nodes => (
            RedisSnapshot::total(&node_counters),
            nodes
                .iter()
                .zip(node_cpu)
                .zip(node_counters)
                .map(|((node, (cpu_s, write_bytes)), redis)| RedisNodeReading {
                    port: node.port,
                    role: node.info.as_ref().map_or(NodeRole::Master, |i| i.role),
                    cpu_s,
                    write_bytes,
                    redis,
                })
                .collect(),
        ),
    };
    let scrapes = scrape_all(cluster).await;
    let instances = cluster
        .instances
        .iter()
        .zip(cpu)
        .zip(scrapes)
        .map(|((i, cpu_s), scrape)| {
            let (metrics, scrape_error) = match scrape {
                Ok(m) => (m, None),
                Err(e) => (Scrape::default(), Some(e)),
            };
            InstanceReading {
                id: i.id.clone(),
                cpu_s,
                metrics,
                scrape_error,
            }
        })
        .collect();
    Ok(Snapshot {
        t_s,
        instances,
        redis_cpu_s,
        redis,
        redis_nodes,
        machine,
        bench_cpu_s,
    })
}

/// Takes a timeline point.
pub async fn timeline_point(cluster: &Cluster, run_start: Instant) -> TimelinePoint {
    let t_s = run_start.elapsed().as_secs_f64();
    let instance_cpu_s = cluster
        .instances
        .iter()
        .map(|i| probe::process_cpu_seconds(i.pid))
        .collect();
    let redis_cpu_s = cluster
        .redis
        .nodes
        .iter()
        .map(|n| probe::process_cpu_seconds(n.pid))
        .sum::<Option<f64>>();
    let scrapes = scrape_all(cluster).await;
    let names = cluster.system.metric_names();
    TimelinePoint {
        t_s,
        instance_cpu_s,
        redis_cpu_s,
        connections: connections(&scrapes, names),
        frames_queued: frames_queued(&scrapes, names),
    }
}
