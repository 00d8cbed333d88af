//! One TCP `redis-server` process of the kit's multi-process set-ups
//! ([`Node`]: a node of a [`super::RedisCluster`], a data node or sentinel
//! of a [`super::ReplicatedRedis`]): started on a random free loopback
//! port (another on a clash), its log in the set-up's tempdir, an admin
//! connection that a command reopens after the server closed it, SIGKILL
//! and signals, and its log's tail for panic messages. How the process is
//! configured (cluster node, replica, sentinel) is the caller's arguments;
//! what it holds is the caller's business.

use std::future::Future;
use std::net::TcpListener;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, FromRedisValue, RedisResult};

use super::spawn_redis_server;
use crate::process::{log_tail, ChildGuard};

/// Attempts at starting one process on a fresh random port before giving
/// up (a clash with another test's process shows up as an early exit).
const START_ATTEMPTS: usize = 20;
/// Bound on one admin command, so a frozen or dying process never hangs a
/// test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// What a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A `redis-server` holding data: a cluster node, a master or a replica.
    Data,
    /// A `redis-server --sentinel`.
    Sentinel,
}

impl Kind {
    /// The word for it in log file names and messages.
    fn name(self) -> &'static str {
        match self {
            Kind::Data => "node",
            Kind::Sentinel => "sentinel",
        }
    }
}

/// One `redis-server` process on 127.0.0.1.
pub(super) struct Node {
    pub(super) kind: Kind,
    /// Its port on 127.0.0.1.
    pub(super) port: u16,
    /// The process; None once [`Node::kill`] killed it.
    child: Option<ChildGuard>,
    /// Opens [`Node::conn`] again after the process closed it.
    client: ::redis::Client,
    /// The admin connection [`Node::try_cmd`] uses; None after it failed,
    /// until the next command opens another. A sentinel closes every client
    /// connection of a node it promotes or points at a new master (`CLIENT
    /// KILL TYPE normal`), so this one does not outlive a failover.
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Its stdout (the redis log), in the set-up's tempdir.
    log_path: PathBuf,
}

impl Node {
    /// Starts one process of `kind` with the arguments `args(port)` on a
    /// port drawn by `free_port`, in `dir` (its working directory and where
    /// its log goes), and waits until it answers PING; another port on a
    /// clash (up to [`START_ATTEMPTS`]).
    pub(super) async fn start(
        dir: &Path,
        kind: Kind,
        free_port: impl Fn() -> u16,
        args: impl Fn(u16) -> Vec<String>,
    ) -> Node {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match Self::try_start(dir, kind, port, args(port)).await {
                Ok(node) => return node,
                Err(why) => last = why,
            }
        }
        panic!(
            "could not start a redis {} in {START_ATTEMPTS} attempts; last: {last}",
            kind.name()
        );
    }

    async fn try_start(
        dir: &Path,
        kind: Kind,
        port: u16,
        args: Vec<String>,
    ) -> Result<Node, String> {
        let name = kind.name();
        let log_path = dir.join(format!("{name}-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("create a redis log file");
        let mut child = spawn_redis_server(
            Command::new("redis-server").args(&args).current_dir(dir),
            log,
        );
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("a redis://127.0.0.1:PORT url is valid");
        let config = admin_config();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.0.try_wait() {
                return Err(format!(
                    "redis {name} on port {port} exited during start-up ({status}); log:\n{}",
                    log_tail(&log_path)
                ));
            }
            if let Ok(mut conn) = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                let pong: RedisResult<String> = ::redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return Ok(Node {
                        kind,
                        port,
                        child: Some(child),
                        client,
                        conn: Mutex::new(Some(conn)),
                        log_path,
                    });
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis {name} on port {port} did not answer PING within 10s; log:\n{}",
                log_tail(&log_path)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the process still runs (was not [`Node::kill`]ed).
    pub(super) fn is_live(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILLs the process (no shutdown, no save) and reaps it.
    pub(super) fn kill(&mut self) {
        let name = self.kind.name();
        let port = self.port;
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("the redis {name} on port {port} was already killed"));
        child
            .0
            .kill()
            .unwrap_or_else(|e| panic!("SIGKILL the redis {name} on port {port}: {e}"));
        child
            .0
            .wait()
            .unwrap_or_else(|e| panic!("reap the killed redis {name} on port {port}: {e}"));
    }

    /// Sends `signal` (called `signal_name` in the panic message) to the
    /// live process.
    pub(super) fn signal(&self, signal: rustix::process::Signal, signal_name: &str) {
        let (name, port) = (self.kind.name(), self.port);
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("the redis {name} on port {port} was killed"));
        rustix::process::kill_process(rustix::process::Pid::from_child(&child.0), signal)
            .unwrap_or_else(|e| panic!("{signal_name} to the redis {name} on {port}: {e}"));
    }

    /// Runs one command, panicking with the command and the error if it
    /// fails (or takes over 3 s).
    pub(super) async fn cmd<T: FromRedisValue>(&self, args: &[&str]) -> T {
        match self.try_cmd(args).await {
            Ok(v) => v,
            Err(e) => panic!(
                "redis command {args:?} on {} {} failed: {e}",
                self.kind.name(),
                self.port
            ),
        }
    }

    /// Runs one command, returning Redis's error (a `MOVED`, a `READONLY`,
    /// a dead process) as it is. A command that meets its connection closed
    /// (by a sentinel's `CLIENT KILL` in a failover) is sent once more on a
    /// new one: a test's admin commands are reads or idempotent writes.
    pub(super) async fn try_cmd<T: FromRedisValue>(&self, args: &[&str]) -> RedisResult<T> {
        let mut cmd = ::redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let mut resent = false;
        loop {
            let mut conn = self.connection().await?;
            match cmd.query_async(&mut conn).await {
                Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                    self.forget_connection();
                    if resent || !e.is_connection_dropped() {
                        return Err(e);
                    }
                    resent = true;
                }
                reply => return reply,
            }
        }
    }

    /// The admin connection, opened now if the last one failed.
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.conn.lock().expect("admin connection mutex").clone() {
            return Ok(conn);
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&admin_config())
            .await?;
        *self.conn.lock().expect("admin connection mutex") = Some(conn.clone());
        Ok(conn)
    }

    fn forget_connection(&self) {
        *self.conn.lock().expect("admin connection mutex") = None;
    }
}

/// The last lines (about 1500 characters) of each node's log, under a
/// header naming it, for panic messages.
pub(super) fn log_tails<'a>(nodes: impl Iterator<Item = &'a Node>) -> String {
    nodes
        .map(|node| {
            let tail = log_tail(&node.log_path);
            let short = tail
                .char_indices()
                .rev()
                .nth(1500)
                .map_or(tail.as_str(), |(i, _)| &tail[i..]);
            let kind = match node.kind {
                Kind::Data => "redis node",
                Kind::Sentinel => "sentinel",
            };
            let state = if node.is_live() { "" } else { " (killed)" };
            format!("--- {kind} {}{state} ---\n{short}", node.port)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A random port in `range` bindable on 127.0.0.1 right now, and so is
/// `port + offset` when an `offset` is given (a cluster node's bus port).
/// Another process may still take either before redis-server binds: then
/// it exits and [`Node::start`] draws another.
pub(super) fn free_port(range: Range<u16>, offset: Option<u16>) -> u16 {
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    loop {
        let port = rand::random_range(range.clone());
        if free(port) && offset.is_none_or(|offset| free(port + offset)) {
            return port;
        }
    }
}

/// The command line every data-holding process starts from: `port` on
/// 127.0.0.1 only, no persistence (a restart is empty), and
/// `repl-diskless-sync-delay 0` (a replica syncs at once rather than after
/// Redis's 5 s default). The caller adds its role.
pub(super) fn data_node_args(port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--repl-diskless-sync-delay",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

/// Timeouts of an admin connection.
fn admin_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
}

/// Calls `check` every `pace` until it returns `Ok`, and returns its value;
/// once `deadline` has passed, panics with `what`, what `check` last found
/// wrong and `logs()` (the processes' log tails).
pub(super) async fn poll_until<T, F, Fut>(
    deadline: Instant,
    pace: Duration,
    what: &str,
    logs: &dyn Fn() -> String,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Vec<String>>>,
{
    loop {
        let wrong = match check().await {
            Ok(value) => return value,
            Err(wrong) => wrong,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: {}; logs:\n{}",
            wrong.join("; "),
            logs()
        );
        tokio::time::sleep(pace).await;
    }
}

/// `Ok` when nothing is `wrong`: the end of a [`poll_until`] check that
/// waits for a state, not a value.
pub(super) fn none_wrong(wrong: Vec<String>) -> Result<(), Vec<String>> {
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong)
    }
}
