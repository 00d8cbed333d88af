//! Redis for tests: a private `redis-server` per test ([`RedisServer`]), a
//! private Redis Cluster per test ([`RedisCluster`]), a Sentinel-managed
//! master with replicas ([`ReplicatedRedis`]), a listener that records what
//! the instances publish on the bus ([`Spy`]), and a proxy that injects
//! faults between an instance and Redis ([`RedisProxy`]). Key names are the
//! tests' business: this module only runs commands.
//!
//! The cluster and the replicated set start and drive their TCP processes
//! through one private `node` module (a free port, the admin connection,
//! the log tails, polling for a state); every kit Redis spawns
//! `redis-server` through one `spawn_redis_server`.

mod cluster;
mod node;
mod proxy;
mod replicated;
mod spy;

pub use cluster::{cmdstat_calls, info_field, RedisCluster};
pub use proxy::RedisProxy;
pub use replicated::ReplicatedRedis;
pub use spy::{BusMessage, Spy};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tempfile::TempDir;

use crate::process::{log_tail, ChildGuard};

/// A private `redis-server` listening only on a unix socket in a fresh
/// tempdir (no TCP port to clash with anything), killed on drop.
pub struct RedisServer {
    /// Kept open for [`RedisServer::cmd`]; replaced on restart.
    conn: ::redis::aio::MultiplexedConnection,
    /// Opens the spies' pubsub connections.
    client: ::redis::Client,
    child: ChildGuard,
    /// Holds the socket and the log; a restart reuses the same paths.
    dir: TempDir,
    /// AOF with `appendfsync always`: a restart after a kill keeps every
    /// acknowledged write ([`RedisServer::start_durable`]).
    durable: bool,
}

impl RedisServer {
    /// Starts redis-server and waits until it answers PING. Panics if
    /// `redis-server` is not installed (the suite never skips).
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// Like [`RedisServer::start`], with the append-only file on and
    /// `appendfsync always`, in the server's tempdir: a SIGKILL and
    /// [`RedisServer::restart`] keep every write Redis acknowledged.
    pub async fn start_durable() -> RedisServer {
        Self::start_with(true).await
    }

    async fn start_with(durable: bool) -> RedisServer {
        let dir = tempfile::tempdir().expect("create a tempdir for redis-server");
        let (child, client, conn) = Self::launch(dir.path(), durable).await;
        RedisServer {
            conn,
            client,
            child,
            dir,
            durable,
        }
    }

    /// Spawns redis-server on `<dir>/redis.sock` (no persistence, so a restart
    /// is always empty) and waits up to 10s until it answers PING.
    async fn launch(
        dir: &Path,
        durable: bool,
    ) -> (
        ChildGuard,
        ::redis::Client,
        ::redis::aio::MultiplexedConnection,
    ) {
        let sock = dir.join("redis.sock");
        let log_path = dir.join("redis.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("create redis-server log file");
        let mut child = spawn_redis_server(
            Command::new("redis-server")
                .arg("--port")
                .arg("0")
                .arg("--unixsocket")
                .arg(&sock)
                .arg("--unixsocketperm")
                .arg("700")
                .arg("--save")
                .arg("")
                .args(if durable {
                    ["--appendonly", "yes", "--appendfsync", "always"]
                } else {
                    ["--appendonly", "no", "--appendfsync", "everysec"]
                })
                .arg("--dir")
                .arg(dir),
            log,
        );
        let url = unix_url(&sock);
        let client = ::redis::Client::open(url.as_str()).expect("redis url should be valid");
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            if sock.exists() {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: ::redis::RedisResult<String> =
                        ::redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        break conn;
                    }
                }
            }
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!(
                    "redis-server exited during startup ({status}); log:\n{}",
                    log_tail(&log_path)
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING on {url} within 10s; log:\n{}",
                log_tail(&log_path)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        (child, client, conn)
    }

    /// Kills the redis-server with SIGKILL (no shutdown, no save) and reaps it.
    /// Until [`RedisServer::restart`], every [`RedisServer::cmd`] fails.
    pub fn kill(&mut self) {
        self.child
            .0
            .kill()
            .expect("SIGKILL the redis-server process");
        self.child.0.wait().expect("reap the redis-server process");
    }

    /// Freezes the redis-server (SIGSTOP): connections stay open, commands
    /// are read by nobody and answered by nobody, until [`RedisServer::resume`].
    pub fn freeze(&self) {
        self.signal(rustix::process::Signal::STOP, "SIGSTOP");
    }

    /// SIGCONT after [`RedisServer::freeze`]: Redis runs what it was sent meanwhile.
    pub fn resume(&self) {
        self.signal(rustix::process::Signal::CONT, "SIGCONT");
    }

    fn signal(&self, signal: rustix::process::Signal, name: &str) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child.0), signal)
            .unwrap_or_else(|e| panic!("{name} to redis-server: {e}"));
    }

    /// Starts a fresh redis-server on the same unix socket path (after
    /// [`RedisServer::kill`]): empty, or with what its append-only file kept
    /// when durable; returns the moment it first answered PING.
    pub async fn restart(&mut self) -> Instant {
        assert!(
            matches!(self.child.0.try_wait(), Ok(Some(_))),
            "restart() needs the previous redis-server to be dead (call kill() first)"
        );
        let (child, client, conn) = Self::launch(self.dir.path(), self.durable).await;
        let answered = Instant::now();
        self.child = child;
        self.client = client;
        self.conn = conn;
        answered
    }

    /// Path of the unix socket the server listens on.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `redis+unix:///<dir>/redis.sock`, for an instance's `--redis-url`.
    pub fn url(&self) -> String {
        unix_url(&self.socket_path())
    }

    /// Runs one command (e.g. `&["HGETALL", "sb:presence:{bob}"]`), panicking
    /// with the command in the message if it fails.
    pub async fn cmd<T: ::redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = ::redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let mut conn = self.conn.clone();
        match cmd.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => panic!("redis command {args:?} failed: {e}"),
        }
    }

    /// `ZSCORE key member` (None when the member is absent).
    pub async fn zscore(&self, key: &str, member: &str) -> Option<f64> {
        self.cmd(&["ZSCORE", key, member]).await
    }

    /// `HGETALL key` (empty when the key is missing).
    pub async fn hgetall(&self, key: &str) -> HashMap<String, String> {
        self.cmd(&["HGETALL", key]).await
    }

    /// `SMEMBERS key` (empty when the key is missing).
    pub async fn smembers(&self, key: &str) -> Vec<String> {
        self.cmd(&["SMEMBERS", key]).await
    }

    /// `EXISTS key`.
    pub async fn exists(&self, key: &str) -> bool {
        self.cmd::<i64>(&["EXISTS", key]).await == 1
    }

    /// PTTL in ms: -2 if the key is missing, -1 if it has no TTL.
    pub async fn pttl(&self, key: &str) -> i64 {
        self.cmd(&["PTTL", key]).await
    }

    /// `PUBSUB NUMSUB channel`: number of subscribers of one channel.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let reply: (String, i64) = self.cmd(&["PUBSUB", "NUMSUB", channel]).await;
        reply.1
    }

    /// Starts a spy that PSUBSCRIBEs `pattern`; the subscription is active
    /// when this returns, so everything published afterwards is recorded.
    pub async fn spy(&self, pattern: &str) -> Spy {
        let mut pubsub = self
            .client
            .get_async_pubsub()
            .await
            .expect("spy: open a pubsub connection");
        pubsub
            .psubscribe(pattern)
            .await
            .expect("spy: PSUBSCRIBE failed");
        let seen: Arc<Mutex<Vec<BusMessage>>> = Arc::default();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut stream = pubsub.into_on_message();
            while let Some(msg) = stream.next().await {
                let entry = BusMessage {
                    channel: msg.get_channel_name().to_string(),
                    payload: msg.get_payload_bytes().to_vec(),
                };
                sink.lock().expect("spy mutex poisoned").push(entry);
            }
        });
        Spy::new(seen, task)
    }
}

/// Spawns `command` (a `redis-server` command line) with no stdin, its
/// stdout (the redis log) to `log` and no stderr. Panics, saying how to
/// install it, when `redis-server` is not installed (the suite never
/// skips).
fn spawn_redis_server(command: &mut Command, log: std::fs::File) -> ChildGuard {
    let spawned = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(child) => ChildGuard(child),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server not found: install it (Debian: apt-get install redis-server) — see README"
        ),
        Err(e) => panic!("failed to start redis-server: {e}"),
    }
}

fn unix_url(socket: &Path) -> String {
    format!("redis+unix://{}", socket.display())
}
