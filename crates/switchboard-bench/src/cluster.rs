//! One system under test: a fresh Redis on reserved loopback ports (one
//! redis-server, or a Redis Cluster: the `redis_server` module) and N
//! instances pointed at it (`switchboard` in one routing mode, or the
//! Socket.IO peer's `node server.js` with one adapter), started through the
//! [`Supervisor`] and waited for until Redis serves and every instance
//! answers its readiness path (`/readyz`, the peer's `/healthz`) with 200.
//! Stopping is the supervisor's job.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::BenchError;
use crate::http::HttpProbe;
use crate::peer::PeerSetup;
use crate::procs::{reserve_ports, Supervisor};
use crate::redis_server::{self, ClusterRecord, RedisDeployment, RedisSpec, RedisTopology};
use crate::system::System;

/// An instance's personal channel, `sb:inst:{ID}` with the id in place of
/// `ID` (docs/PROTOCOL.md, the Redis data model): a shard channel on the
/// id's slot in cluster mode.
fn instance_channel(id: &str) -> String {
    format!("sb:inst:{{{id}}}")
}

/// What to start.
pub struct ClusterSpec<'a> {
    /// What the instances are (Switchboard's routing mode, or the peer's adapter).
    pub system: System,
    /// How many instances.
    pub nodes: usize,
    /// The `switchboard` binary.
    pub server_bin: &'a Path,
    /// The Socket.IO peer, prepared (needed for [`System::Socketio`]).
    pub peer: Option<&'a PeerSetup>,
    /// The `redis-server` binary.
    pub redis_bin: &'a Path,
    /// The `redis-cli` binary (creates a Redis Cluster).
    pub redis_cli: &'a Path,
    /// One redis-server, or a Redis Cluster (Switchboard only).
    pub redis: RedisTopology,
    /// Switchboard: `--lease-ms` for the instances, if set.
    pub lease_ms: Option<u64>,
    /// `Some(secret)`: the instances take HS256 tokens signed with it
    /// (`--auth jwt`, the secret in their environment); `None`: `--auth none`.
    pub jwt_secret: Option<&'a str>,
    /// Switchboard: further flags for every instance.
    pub extra_args: Vec<String>,
    /// How long Redis and each instance may take to become ready.
    pub ready_timeout: Duration,
    /// Logs and redis' `--dir` go here.
    pub dir: &'a Path,
}

/// One running instance.
#[derive(Debug, Clone)]
pub struct Instance {
    /// `--instance-id` (`n1`, `n2`, ...; the peer's `--name`).
    pub id: String,
    /// The port it listens on (HTTP and WebSocket).
    pub port: u16,
    /// Its pid, for `/proc` CPU readings and for stopping it.
    pub pid: u32,
}

/// A started, ready cluster.
pub struct Cluster {
    /// What the instances are.
    pub system: System,
    /// Its own Redis: one server or a Redis Cluster, with a connection to
    /// every node for INFO readings.
    pub redis: RedisDeployment,
    /// A Redis Cluster: its nodes, and which master serves each instance's
    /// personal channel.
    pub redis_cluster: Option<ClusterRecord>,
    /// The client for the instances' readiness and counters.
    pub http: HttpProbe,
    /// The instances, in id order.
    pub instances: Vec<Instance>,
    /// The first instance's command line (the others differ in port and id).
    pub instance_command: Vec<String>,
}

impl Cluster {
    /// `ws://127.0.0.1:P1,ws://127.0.0.1:P2,...` for the loader's --targets.
    pub fn targets(&self) -> String {
        self.instances
            .iter()
            .map(|i| format!("ws://127.0.0.1:{}", i.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `(name, pid)` of every process of the system: the instances, then
    /// every Redis node.
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.instances
            .iter()
            .map(|i| (i.id.clone(), i.pid))
            .chain(self.redis.processes())
            .collect()
    }
}

/// Starts redis and the instances and waits until all are ready. On error the
/// processes already started stay in `supervisor` for the caller to stop.
pub async fn start(
    spec: &ClusterSpec<'_>,
    supervisor: &mut Supervisor,
    cancel: &CancellationToken,
) -> Result<Cluster, BenchError> {
    let redis_spec = RedisSpec {
        topology: spec.redis,
        redis_bin: spec.redis_bin,
        redis_cli: spec.redis_cli,
        ready_timeout: spec.ready_timeout,
        dir: spec.dir,
    };
    let mut redis = redis_server::start(&redis_spec, supervisor, cancel).await?;
    let ports = reserve_ports(spec.nodes)?;
    let ids: Vec<String> = (1..=spec.nodes).map(|k| format!("n{k}")).collect();
    let channels: Vec<String> = ids.iter().map(|id| instance_channel(id)).collect();
    let channel_owners = redis.slot_owners(&channels).await?;
    let redis_cluster = redis.record(channel_owners);
    let redis_args = redis.server_args();
    let redis_port = redis.first_port();

    let http = HttpProbe::new();
    let mut instances = Vec::with_capacity(spec.nodes);
    let mut instance_command = Vec::new();
    for (id, &port) in ids.into_iter().zip(&ports) {
        let (program, args) = match spec.system {
            System::Switchboard(mode) => (
                spec.server_bin.to_owned(),
                switchboard_args(spec, mode.as_str(), &id, port, &redis_args),
            ),
            System::Socketio(adapter) => {
                let peer = spec.peer.ok_or_else(|| {
                    BenchError::Report("the Socket.IO peer was not prepared".into())
                })?;
                (
                    peer.node_bin.clone(),
                    peer.node_args(adapter, &id, port, redis_port),
                )
            }
        };
        if instance_command.is_empty() {
            instance_command = std::iter::once(program.to_string_lossy().into_owned())
                .chain(args.iter().cloned())
                .collect();
        }
        let log = spec.dir.join(format!("{id}.log"));
        let env: Vec<(&str, &str)> = spec
            .jwt_secret
            .filter(|_| matches!(spec.system, System::Switchboard(_)))
            .map(|secret| ("SWITCHBOARD_JWT_SECRET", secret))
            .into_iter()
            .collect();
        let pid = supervisor.spawn_with_env(&id, &program, &args, &env, &log, false)?;
        instances.push(Instance { id, port, pid });
    }
    for instance in &instances {
        wait_for_ready(
            instance,
            spec.system.ready_path(),
            &http,
            spec.ready_timeout,
            supervisor,
            cancel,
        )
        .await?;
    }
    Ok(Cluster {
        system: spec.system,
        redis,
        redis_cluster,
        http,
        instances,
        instance_command,
    })
}

/// The command line of one `switchboard` instance.
fn switchboard_args(
    spec: &ClusterSpec<'_>,
    routing: &str,
    id: &str,
    port: u16,
    redis_args: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = vec!["--listen".into(), format!("127.0.0.1:{port}")];
    args.extend(redis_args.iter().cloned());
    args.extend([
        "--routing".into(),
        routing.into(),
        "--instance-id".into(),
        id.into(),
        "--auth".into(),
        if spec.jwt_secret.is_some() {
            "jwt"
        } else {
            "none"
        }
        .into(),
    ]);
    if let Some(lease) = spec.lease_ms {
        args.push("--lease-ms".into());
        args.push(lease.to_string());
    }
    args.extend(spec.extra_args.iter().cloned());
    args
}

async fn wait_for_ready(
    instance: &Instance,
    path: &str,
    http: &HttpProbe,
    timeout: Duration,
    supervisor: &mut Supervisor,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        if cancel.is_cancelled() {
            return Err(BenchError::Interrupted);
        }
        if let Some(status) = supervisor.try_exited(instance.pid) {
            return Err(BenchError::ExitedEarly {
                name: instance.id.clone(),
                status,
                log_tail: supervisor.log_tail(instance.pid, 20),
            });
        }
        if let Ok(response) = http.get(instance.port, path, Duration::from_secs(1)).await {
            if response.status == 200 {
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            return Err(BenchError::NotReady {
                name: instance.id.clone(),
                seconds: timeout.as_secs_f64(),
                log_tail: supervisor.log_tail(instance.pid, 20),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
