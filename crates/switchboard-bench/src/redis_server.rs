//! The benchmark's Redis: one redis-server, or a Redis Cluster of M masters
//! (and R replicas per master) on 127.0.0.1 (`--redis-cluster M`), started
//! through the [`Supervisor`] and waited for until it serves. A plain server
//! serves once it answers PING. A cluster: every node answers PING, `redis-cli
//! --cluster create` has assigned the slots and exited 0 (a one-master
//! cluster: `CLUSTER ADDSLOTSRANGE 0 16383` on its node), and then every
//! node reports `cluster_state:ok`, all 16,384 slots served and every node
//! known (every replica also its master link up).
//!
//! Also what the report needs to know about a cluster: each node's role and
//! slots (`CLUSTER NODES`), and which master serves a given shard channel
//! (`CLUSTER KEYSLOT`). It only starts and describes Redis: what the
//! instances do with it is the `cluster` module's business, stopping the
//! processes the supervisor's.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::BenchError;
use crate::procs::{reserve_ports, reserve_ports_with_bus, Supervisor};
use crate::redis_info::RedisProbe;

/// Hash slots of a Redis Cluster.
const SLOTS: u32 = 16_384;

/// The shape of a Redis Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterShape {
    /// Masters: 1 (one node serving every slot, the control that has
    /// cluster mode without a second process), or at least 3 (`redis-cli
    /// --cluster create` refuses 2).
    pub masters: usize,
    /// Replicas per master.
    pub replicas: usize,
}

impl ClusterShape {
    /// Every node: masters and their replicas.
    pub fn nodes(self) -> usize {
        self.masters * (1 + self.replicas)
    }
}

/// Which Redis a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisTopology {
    /// One redis-server (`--redis-url`).
    Single,
    /// A Redis Cluster (`--redis-cluster`).
    Cluster(ClusterShape),
}

impl RedisTopology {
    /// What a row name gets appended: nothing for one redis-server,
    /// `-cluster3` for 3 masters, `-cluster3r1` with a replica each.
    pub fn row_suffix(self) -> String {
        match self {
            RedisTopology::Single => String::new(),
            RedisTopology::Cluster(ClusterShape {
                masters,
                replicas: 0,
            }) => format!("-cluster{masters}"),
            RedisTopology::Cluster(ClusterShape { masters, replicas }) => {
                format!("-cluster{masters}r{replicas}")
            }
        }
    }
}

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    /// Serves slots.
    Master,
    /// Replicates a master.
    Replica,
}

/// What is known about one Redis Cluster node, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its port (its cluster bus listens on port + 10000).
    pub port: u16,
    /// Its pid.
    pub pid: u32,
    /// Its cluster node id.
    pub node_id: String,
    /// Master or replica.
    pub role: NodeRole,
    /// The slot ranges it serves (`0-5460`), as `CLUSTER NODES` lists them.
    pub slots: Vec<String>,
    /// A replica: its master's port.
    pub master_port: Option<u16>,
}

/// One running redis-server.
pub struct RedisNode {
    /// Its port.
    pub port: u16,
    /// Its pid, for `/proc` readings and for stopping it.
    pub pid: u32,
    /// A connection for INFO readings.
    pub probe: RedisProbe,
    /// Role and slots (`None` for a plain server).
    pub info: Option<NodeInfo>,
}

/// A Redis Cluster as a run recorded it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Masters and replicas per master.
    pub shape: ClusterShape,
    /// Every node, in port order.
    pub nodes: Vec<NodeInfo>,
    /// How it was created (`redis-cli --cluster create ...`).
    pub create_command: Vec<String>,
    /// Which master (port) serves each instance's personal shard channel.
    pub channel_owners: Vec<(String, u16)>,
}

/// The Redis of one run.
pub struct RedisDeployment {
    /// What it is.
    pub topology: RedisTopology,
    /// Its processes: the one server, or every cluster node in port order.
    pub nodes: Vec<RedisNode>,
    /// A cluster: how it was created.
    pub create_command: Vec<String>,
}

impl RedisDeployment {
    /// How an instance is pointed at it: `--redis-url URL`, or
    /// `--redis-cluster URL,URL,...` with every master as a seed.
    pub fn server_args(&self) -> Vec<String> {
        let url = |port: u16| format!("redis://127.0.0.1:{port}");
        match self.topology {
            RedisTopology::Single => vec!["--redis-url".into(), url(self.nodes[0].port)],
            RedisTopology::Cluster(_) => {
                let seeds = self
                    .nodes
                    .iter()
                    .filter(|n| n.info.as_ref().is_some_and(|i| i.role == NodeRole::Master))
                    .map(|n| url(n.port))
                    .collect::<Vec<_>>()
                    .join(",");
                vec!["--redis-cluster".into(), seeds]
            }
        }
    }

    /// The port of the first (for a plain server: the only) node.
    pub fn first_port(&self) -> u16 {
        self.nodes[0].port
    }

    /// `(name, pid)` of every node, as the supervisor knows them.
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.nodes
            .iter()
            .map(|n| (process_name(self.topology, n.port), n.pid))
            .collect()
    }

    /// A cluster: the master serving each of these shard channels (or
    /// keys); empty for a plain server.
    pub async fn slot_owners(
        &mut self,
        names: &[String],
    ) -> Result<Vec<(String, u16)>, BenchError> {
        if self.topology == RedisTopology::Single {
            return Ok(Vec::new());
        }
        let masters: Vec<(u16, Vec<(u32, u32)>)> = self
            .nodes
            .iter()
            .filter_map(|n| n.info.as_ref())
            .filter(|i| i.role == NodeRole::Master)
            .map(|i| {
                (
                    i.port,
                    i.slots.iter().filter_map(|s| slot_range(s)).collect(),
                )
            })
            .collect();
        let mut owners = Vec::with_capacity(names.len());
        for name in names {
            let slot = u32::from(self.nodes[0].probe.keyslot(name).await?);
            let owner = masters
                .iter()
                .find(|(_, ranges)| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
                .map(|(port, _)| *port)
                .ok_or_else(|| BenchError::Redis(format!("no master serves slot {slot}")))?;
            owners.push((name.clone(), owner));
        }
        Ok(owners)
    }

    /// A cluster: its record for the report (`None` for a plain server).
    pub fn record(&self, channel_owners: Vec<(String, u16)>) -> Option<ClusterRecord> {
        let RedisTopology::Cluster(shape) = self.topology else {
            return None;
        };
        Some(ClusterRecord {
            shape,
            nodes: self.nodes.iter().filter_map(|n| n.info.clone()).collect(),
            create_command: self.create_command.clone(),
            channel_owners,
        })
    }
}

/// The supervisor's name for a node: `redis`, or `redis-PORT` in a cluster.
fn process_name(topology: RedisTopology, port: u16) -> String {
    match topology {
        RedisTopology::Single => "redis".to_owned(),
        RedisTopology::Cluster(_) => format!("redis-{port}"),
    }
}

/// What to start.
pub struct RedisSpec<'a> {
    /// One server or a cluster.
    pub topology: RedisTopology,
    /// The `redis-server` binary.
    pub redis_bin: &'a Path,
    /// The `redis-cli` binary (creates a cluster).
    pub redis_cli: &'a Path,
    /// How long Redis may take to serve.
    pub ready_timeout: Duration,
    /// Logs and each node's `--dir` go here.
    pub dir: &'a Path,
}

/// Starts Redis and waits until it serves. On error the processes already
/// started stay in `supervisor` for the caller to stop.
pub async fn start(
    spec: &RedisSpec<'_>,
    supervisor: &mut Supervisor,
    cancel: &CancellationToken,
) -> Result<RedisDeployment, BenchError> {
    let ports = match spec.topology {
        RedisTopology::Single => reserve_ports(1)?,
        RedisTopology::Cluster(shape) => reserve_ports_with_bus(shape.nodes())?,
    };
    let mut pids = Vec::with_capacity(ports.len());
    for &port in &ports {
        pids.push(spawn_server(spec, port, supervisor)?);
    }
    let mut nodes = Vec::with_capacity(ports.len());
    for (&port, &pid) in ports.iter().zip(&pids) {
        let probe = wait_for_ping(spec, port, pid, supervisor, cancel).await?;
        nodes.push(RedisNode {
            port,
            pid,
            probe,
            info: None,
        });
    }
    let mut deployment = RedisDeployment {
        topology: spec.topology,
        nodes,
        create_command: Vec::new(),
    };
    if let RedisTopology::Cluster(shape) = spec.topology {
        deployment.create_command = if shape.masters == 1 {
            // `redis-cli --cluster create` wants 3 masters; one node takes every slot itself.
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("ADDSLOTSRANGE").arg(0).arg(SLOTS - 1);
            let _: String = deployment.nodes[0]
                .probe
                .query(&cmd, "CLUSTER ADDSLOTSRANGE")
                .await?;
            ["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]
                .map(String::from)
                .to_vec()
        } else {
            create_cluster(spec, shape, &ports, supervisor, cancel).await?
        };
        wait_for_cluster(spec, shape, &mut deployment, supervisor, cancel).await?;
        let text = deployment.nodes[0].probe.cluster_nodes().await?;
        let infos = parse_cluster_nodes(&text, &ports, &pids)?;
        for (node, info) in deployment.nodes.iter_mut().zip(infos) {
            node.info = Some(info);
        }
    }
    Ok(deployment)
}

/// Spawns one redis-server on `port` (a cluster node when the topology says so).
fn spawn_server(
    spec: &RedisSpec<'_>,
    port: u16,
    supervisor: &mut Supervisor,
) -> Result<u32, BenchError> {
    let name = process_name(spec.topology, port);
    let dir = spec.dir.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("create redis dir", &dir, e))?;
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        &dir.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let RedisTopology::Cluster(_) = spec.topology {
        // nodes.conf is written in --dir, one per node.
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ]
            .map(String::from),
        );
    }
    let log = spec.dir.join(format!("{name}.log"));
    supervisor.spawn(&name, spec.redis_bin, &args, &log, true)
}

async fn wait_for_ping(
    spec: &RedisSpec<'_>,
    port: u16,
    pid: u32,
    supervisor: &mut Supervisor,
    cancel: &CancellationToken,
) -> Result<RedisProbe, BenchError> {
    let name = process_name(spec.topology, port);
    let started = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        if let Some(status) = supervisor.try_exited(pid) {
            return Err(BenchError::ExitedEarly {
                name,
                status,
                log_tail: supervisor.log_tail(pid, 20),
            });
        }
        let connect = async {
            match spec.topology {
                RedisTopology::Single => RedisProbe::connect(port).await,
                RedisTopology::Cluster(_) => RedisProbe::connect_cluster_node(port).await,
            }
        };
        if let Ok(Ok(mut probe)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
            if probe.ping().await.is_ok() {
                return Ok(probe);
            }
        }
        if started.elapsed() > spec.ready_timeout {
            return Err(BenchError::NotReady {
                name,
                seconds: spec.ready_timeout.as_secs_f64(),
                log_tail: supervisor.log_tail(pid, 20),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `redis-cli --cluster create` over the nodes; returns its command line.
async fn create_cluster(
    spec: &RedisSpec<'_>,
    shape: ClusterShape,
    ports: &[u16],
    supervisor: &mut Supervisor,
    cancel: &CancellationToken,
) -> Result<Vec<String>, BenchError> {
    let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
    args.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
    args.extend([
        "--cluster-replicas".to_owned(),
        shape.replicas.to_string(),
        "--cluster-yes".to_owned(),
    ]);
    let name = "redis-cli";
    let log = spec.dir.join("redis-cluster-create.log");
    let pid = supervisor.spawn(name, spec.redis_cli, &args, &log, false)?;
    let status = tokio::select! {
        _ = cancel.cancelled() => return Err(BenchError::Interrupted),
        status = supervisor.wait_exit(pid, spec.ready_timeout) => status,
    };
    let log_tail = supervisor.log_tail(pid, 20);
    match status {
        Some(status) if status == "exit status: 0" => {}
        Some(status) => {
            return Err(BenchError::ExitedEarly {
                name: "redis-cli --cluster create".into(),
                status,
                log_tail,
            })
        }
        None => {
            supervisor.stop(pid).await;
            return Err(BenchError::NotReady {
                name: "redis-cli --cluster create".into(),
                seconds: spec.ready_timeout.as_secs_f64(),
                log_tail,
            });
        }
    }
    Ok(
        std::iter::once(spec.redis_cli.to_string_lossy().into_owned())
            .chain(args)
            .collect(),
    )
}

/// Waits until every node serves: `cluster_state:ok`, every slot ok, every
/// node known; a replica also with its master link up.
async fn wait_for_cluster(
    spec: &RedisSpec<'_>,
    shape: ClusterShape,
    deployment: &mut RedisDeployment,
    supervisor: &mut Supervisor,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let started = Instant::now();
    let total = shape.nodes().to_string();
    let slots = SLOTS.to_string();
    loop {
        if cancel.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        let mut waiting_for = Vec::new();
        for node in &mut deployment.nodes {
            if let Some(status) = supervisor.try_exited(node.pid) {
                return Err(BenchError::ExitedEarly {
                    name: process_name(deployment.topology, node.port),
                    status,
                    log_tail: supervisor.log_tail(node.pid, 20),
                });
            }
            let info = node.probe.cluster_info().await?;
            let field = |k: &str| info.get(k).map_or("?", String::as_str);
            let ok = field("cluster_state") == "ok"
                && field("cluster_slots_ok") == slots
                && field("cluster_known_nodes") == total;
            let replication = node.probe.info_replication().await?;
            let link_up = replication.get("role").map(String::as_str) != Some("slave")
                || replication.get("master_link_status").map(String::as_str) == Some("up");
            if !(ok && link_up) {
                waiting_for.push(format!(
                    ":{} state {} slots_ok {} known_nodes {}{}",
                    node.port,
                    field("cluster_state"),
                    field("cluster_slots_ok"),
                    field("cluster_known_nodes"),
                    if link_up { "" } else { ", replica link down" }
                ));
            }
        }
        if waiting_for.is_empty() {
            return Ok(());
        }
        if started.elapsed() > spec.ready_timeout {
            return Err(BenchError::NotReady {
                name: "redis cluster".into(),
                seconds: spec.ready_timeout.as_secs_f64(),
                log_tail: waiting_for.join("\n"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `a-b` (or a single slot `a`) of a `CLUSTER NODES` slot list; `None` for
/// the `[slot->-id]` entries of a slot being migrated.
fn slot_range(entry: &str) -> Option<(u32, u32)> {
    if entry.starts_with('[') {
        return None;
    }
    match entry.split_once('-') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => {
            let slot = entry.parse().ok()?;
            Some((slot, slot))
        }
    }
}

/// The nodes of a `CLUSTER NODES` reply, in the order of `ports` (with
/// their `pids`). Each line: `id ip:port@busport flags master-id ping pong
/// epoch link slot...`; `flags` holds `master` or `slave` (and `myself`).
pub fn parse_cluster_nodes(
    text: &str,
    ports: &[u16],
    pids: &[u32],
) -> Result<Vec<NodeInfo>, BenchError> {
    struct Line<'a> {
        id: &'a str,
        port: u16,
        replica: bool,
        master_id: &'a str,
        slots: Vec<String>,
    }
    let lines: Vec<Line<'_>> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let address = fields[1].split('@').next()?;
            let port = address.rsplit(':').next()?.parse().ok()?;
            Some(Line {
                id: fields[0],
                port,
                replica: fields[2].split(',').any(|f| f == "slave"),
                master_id: fields[3],
                slots: fields[8..].iter().map(|s| s.to_string()).collect(),
            })
        })
        .collect();
    ports
        .iter()
        .zip(pids)
        .map(|(&port, &pid)| {
            let line = lines.iter().find(|l| l.port == port).ok_or_else(|| {
                BenchError::Redis(format!("CLUSTER NODES does not list port {port}:\n{text}"))
            })?;
            let master_port = line
                .replica
                .then(|| lines.iter().find(|l| l.id == line.master_id))
                .flatten()
                .map(|m| m.port);
            Ok(NodeInfo {
                port,
                pid,
                node_id: line.id.to_owned(),
                role: if line.replica {
                    NodeRole::Replica
                } else {
                    NodeRole::Master
                },
                slots: line.slots.clone(),
                master_port,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cluster_nodes() {
        let text = "\
183234a5 127.0.0.1:21103@31103 master - 0 1796146151428 3 connected 10923-16383
3d198879 127.0.0.1:21102@31102 master - 0 1796146152431 2 connected 5461-10922
bba5e039 127.0.0.1:21101@31101 myself,master - 0 1796146151000 1 connected 0-5460 [5460->-3d198879]
77aa0000 127.0.0.1:21104@31104 slave bba5e039 0 1796146151000 1 connected
";
        let nodes = parse_cluster_nodes(text, &[21101, 21102, 21103, 21104], &[1, 2, 3, 4])
            .expect("parses");
        assert_eq!(nodes[0].role, NodeRole::Master);
        assert_eq!(nodes[0].slots, ["0-5460", "[5460->-3d198879]"]);
        assert_eq!(nodes[2].node_id, "183234a5");
        assert_eq!(nodes[3].role, NodeRole::Replica);
        assert_eq!(nodes[3].master_port, Some(21101));
        assert_eq!(nodes[3].pid, 4);
        assert!(parse_cluster_nodes(text, &[21105], &[5]).is_err());
        assert_eq!(slot_range("0-5460"), Some((0, 5460)));
        assert_eq!(slot_range("77"), Some((77, 77)));
        assert_eq!(slot_range("[5460->-3d198879]"), None);
    }

    #[test]
    fn row_suffixes_name_the_shape() {
        let cluster =
            |masters, replicas| RedisTopology::Cluster(ClusterShape { masters, replicas });
        assert_eq!(RedisTopology::Single.row_suffix(), "");
        assert_eq!(cluster(3, 0).row_suffix(), "-cluster3");
        assert_eq!(cluster(3, 1).row_suffix(), "-cluster3r1");
        assert_eq!(
            ClusterShape {
                masters: 3,
                replicas: 1
            }
            .nodes(),
            6
        );
    }

    /// Starts a real 3-master cluster (when redis-server and redis-cli are
    /// installed), checks what the report relies on: roles and slots, a
    /// shard channel's owner, classic PUBLISH copied over the cluster bus to
    /// every other node and SPUBLISH not; then that stopping it stops every
    /// node.
    #[tokio::test]
    async fn starts_a_cluster_and_stops_every_node() {
        let installed = |bin: &str| {
            std::process::Command::new(bin)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !installed("redis-server") || !installed("redis-cli") {
            eprintln!("redis-server or redis-cli not installed: skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!(
            "switchboard-bench-redis-cluster-test-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let spec = RedisSpec {
            topology: RedisTopology::Cluster(ClusterShape {
                masters: 3,
                replicas: 0,
            }),
            redis_bin: Path::new("redis-server"),
            redis_cli: Path::new("redis-cli"),
            ready_timeout: Duration::from_secs(30),
            dir: &dir,
        };
        let mut supervisor = Supervisor::new(Duration::from_secs(5));
        let cancel = CancellationToken::new();
        let outcome = async {
            let mut redis = start(&spec, &mut supervisor, &cancel).await?;
            let infos: Vec<&NodeInfo> =
                redis.nodes.iter().filter_map(|n| n.info.as_ref()).collect();
            assert_eq!(infos.len(), 3);
            assert!(infos
                .iter()
                .all(|i| i.role == NodeRole::Master && !i.slots.is_empty()));
            let args = redis.server_args();
            assert_eq!(args[0], "--redis-cluster");
            assert_eq!(args[1].split(',').count(), 3);
            let owners = redis.slot_owners(&["sb:inst:{n1}".to_owned()]).await?;
            assert!(redis.nodes.iter().any(|n| n.port == owners[0].1));

            let before: Vec<_> = node_snapshots(&mut redis).await?;
            let mut publisher = RedisProbe::connect(redis.first_port()).await?;
            for command in ["PUBLISH", "SPUBLISH"] {
                let channel = if command == "PUBLISH" {
                    "sb:all"
                } else {
                    owners[0].0.as_str()
                };
                let mut cmd = redis::cmd(command);
                cmd.arg(channel).arg("x");
                // SPUBLISH on a node that does not serve the slot is MOVED: send it to the owner.
                if command == "SPUBLISH" {
                    publisher = RedisProbe::connect(owners[0].1).await?;
                }
                let _: redis::Value = publisher.query(&cmd, command).await?;
            }
            let after: Vec<_> = node_snapshots(&mut redis).await?;
            let publish_received: u64 = before
                .iter()
                .zip(&after)
                .map(|(a, b)| {
                    b.cluster_stat("cluster_stats_messages_publish_received")
                        - a.cluster_stat("cluster_stats_messages_publish_received")
                })
                .sum();
            // One PUBLISH, copied to the two other nodes; the SPUBLISH to nobody (no replicas).
            assert_eq!(publish_received, 2);
            let spublish: u64 = after.iter().map(|s| s.calls("spublish")).sum();
            assert_eq!(spublish, 1);
            Ok::<_, BenchError>(redis.processes())
        }
        .await;
        let stopped = supervisor.stop_all().await;
        let _ = std::fs::remove_dir_all(&dir);
        let processes = outcome.expect("the cluster starts and answers");
        for (name, pid) in processes {
            let node = stopped
                .iter()
                .find(|s| s.pid == pid)
                .unwrap_or_else(|| panic!("{name} was not stopped"));
            assert!(!node.killed && !node.exited_by_itself, "{node:?}");
        }
        assert!(
            stopped
                .iter()
                .any(|s| s.name == "redis-cli" && s.exited_by_itself),
            "{stopped:?}"
        );
    }

    async fn node_snapshots(
        redis: &mut RedisDeployment,
    ) -> Result<Vec<crate::redis_info::RedisSnapshot>, BenchError> {
        let mut out = Vec::new();
        for node in &mut redis.nodes {
            out.push(node.probe.snapshot().await?);
        }
        Ok(out)
    }
}
