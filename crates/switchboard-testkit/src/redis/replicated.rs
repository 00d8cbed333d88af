//! A private replicated Redis watched by Redis Sentinel, for one test
//! ([`ReplicatedRedis`]): a master and its replicas as child processes on
//! random loopback ports, sentinels monitoring them as `sbmaster`, and the
//! faults and reads a test drives on it — SIGKILL of the current master,
//! waiting for the sentinels to promote a replica, and any command or
//! `INFO` on one node. Admin commands go over one plain connection per
//! process (no sentinel client: a test always says which node it asks).
//! What the keys and channels mean is the tests' business.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, FromRedisValue, RedisResult};
use tempfile::TempDir;

use super::cluster::info_field;
use crate::process::{log_tail, ChildGuard};

/// The name the sentinels monitor the master under: the last part of
/// [`ReplicatedRedis::sentinel_url`].
const SERVICE: &str = "sbmaster";

/// Ports are drawn from here, well above the well-known ones. A port taken
/// by another process between the check and redis-server's bind shows up
/// as an early exit; the next attempt draws another.
const PORT_RANGE: std::ops::Range<u16> = 20000..55000;
/// Attempts at starting one process on a fresh random port before giving up.
const START_ATTEMPTS: usize = 20;
/// Bound on one admin command, so a frozen or dying node never hangs a test.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on the whole start-up: the replicas' initial syncs and the
/// sentinels finding each other (their hello messages go every 2 s).
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// `sentinel failover-timeout`: the longest an election or the promotion
/// of the chosen replica may take, and half the wait before another
/// attempt at the same master. Long enough for a promotion on a loaded
/// machine (it takes under a second), short enough that a failed election
/// (sentinels that noticed the death in the same millisecond each vote for
/// themselves) is retried within a test's patience: 6 s later.
const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// What a process of the set is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A `redis-server` holding data: the master or a replica.
    Data,
    /// A `redis-server --sentinel`.
    Sentinel,
}

/// One process of the set.
struct Process {
    kind: Kind,
    /// Its port on 127.0.0.1.
    port: u16,
    /// The process; None once [`ReplicatedRedis::kill_master`] killed it.
    child: Option<ChildGuard>,
    /// Opens [`Process::conn`] again after the process closed it.
    client: ::redis::Client,
    /// The admin connection [`ReplicatedRedis::cmd`] uses; None after it
    /// failed, until the next command opens another. A sentinel closes every
    /// client connection of a node it promotes or points at a new master
    /// (`CLIENT KILL TYPE normal`), so this one does not outlive a failover.
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Its stdout (the redis log), in the set's tempdir.
    log_path: PathBuf,
}

/// A master with `replicas` replicas (asynchronous replication over TCP,
/// no persistence) and `sentinels` sentinels monitoring it as `sbmaster`
/// with quorum 2 (1 with a single sentinel), on 127.0.0.1, private to one
/// test. Every process is killed (SIGKILL, by pid) and the tempdir removed
/// on drop.
///
/// The data nodes run with `repl-diskless-sync-delay 0` (a replica syncs at
/// once rather than after Redis's 5 s default); the sentinels with the
/// given `down-after-milliseconds` and a `failover-timeout` of 3 s. A
/// failover then takes Redis about down-after + 1–1.5 s (measured): the
/// master is subjectively down after down-after, objectively once a quorum
/// agrees (they ask each other every second), a leader is elected, and the
/// promoted replica's `role:master` is read off its `INFO` within a
/// second. Sentinels that start their elections in the same instant may
/// split the votes; they try again 2 × failover-timeout (6 s) later. Before
/// a second fault, [`ReplicatedRedis::wait_settled`]: a sentinel still
/// finishing the last failover takes no part in the next election.
pub struct ReplicatedRedis {
    /// The data nodes, master first (as started), dead ones included.
    nodes: Vec<Process>,
    /// The sentinels, in start order.
    sentinels: Vec<Process>,
    /// `sentinel down-after-milliseconds` of every sentinel.
    down_after: Duration,
    /// Sentinel configs and every log; removed on drop (after the kills).
    dir: TempDir,
}

impl ReplicatedRedis {
    /// Starts a master, `replicas` replicas of it and, once every replica's
    /// link is up, `sentinels` sentinels; waits until every sentinel knows
    /// the master (flags `master`), all its replicas (link ok) and every
    /// other sentinel. Panics (with the logs' tails) if a step fails or the
    /// whole takes over 30 s.
    pub async fn start(replicas: usize, sentinels: usize, down_after_ms: u64) -> ReplicatedRedis {
        assert!(sentinels >= 1, "a sentinel set needs at least one sentinel");
        let dir = tempfile::tempdir().expect("create a tempdir for the replicated redis");
        let started = Instant::now();
        let mut set = ReplicatedRedis {
            nodes: Vec::with_capacity(1 + replicas),
            sentinels: Vec::with_capacity(sentinels),
            down_after: Duration::from_millis(down_after_ms),
            dir,
        };
        let master = start_process(set.dir.path(), Kind::Data, |port| {
            data_node_args(port, None)
        })
        .await;
        let master_port = master.port;
        set.nodes.push(master);
        for _ in 0..replicas {
            let replica = start_process(set.dir.path(), Kind::Data, |port| {
                data_node_args(port, Some(master_port))
            })
            .await;
            set.nodes.push(replica);
        }
        set.await_replication(master_port, started + FORM_TIMEOUT)
            .await;
        let quorum = if sentinels == 1 { 1 } else { 2 };
        for _ in 0..sentinels {
            let dir = set.dir.path().to_path_buf();
            let sentinel = start_process(set.dir.path(), Kind::Sentinel, |port| {
                let conf = dir.join(format!("sentinel-{port}.conf"));
                let text = format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel resolve-hostnames no\n\
                     sentinel monitor {SERVICE} 127.0.0.1 {master_port} {quorum}\n\
                     sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n\
                     sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n\
                     sentinel parallel-syncs {SERVICE} 1\n",
                    dir = dir.display()
                );
                std::fs::write(&conf, text).expect("write a sentinel config file");
                vec![conf.display().to_string(), "--sentinel".to_string()]
            })
            .await;
            set.sentinels.push(sentinel);
        }
        set.await_sentinels(master_port, replicas, started + FORM_TIMEOUT)
            .await;
        set
    }

    /// Waits until the set is settled after a failover, so that another
    /// fault meets it as at the start: every sentinel names the same master,
    /// sees it as plain `master` (the leader of the last failover has
    /// finished it: while it is still reconfiguring replicas it knows the
    /// master by its old address and would not vote in the next election),
    /// and every other live data node replicates from it, link up. Panics
    /// after `timeout`.
    pub async fn wait_settled(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut named = Vec::new();
            let mut wrong = Vec::new();
            for sentinel in &self.sentinels {
                match self.master_by(sentinel.port).await {
                    Ok(port) => named.push(port),
                    Err(e) => wrong.push(format!("{}: {e}", sentinel.port)),
                }
                match self
                    .try_cmd::<Fields>(sentinel.port, &["SENTINEL", "MASTER", SERVICE])
                    .await
                {
                    Ok(master) if master.get("flags").map(String::as_str) == Some("master") => {}
                    Ok(master) => wrong.push(format!(
                        "{} sees flags {:?}",
                        sentinel.port,
                        master.get("flags")
                    )),
                    Err(e) => wrong.push(format!("{}: SENTINEL MASTER: {e}", sentinel.port)),
                }
            }
            named.sort_unstable();
            named.dedup();
            if let ([master], true) = (named.as_slice(), wrong.is_empty()) {
                self.await_replication(*master, deadline).await;
                return;
            }
            if named.len() > 1 {
                wrong.push(format!("the sentinels disagree: {named:?}"));
            }
            assert!(
                Instant::now() < deadline,
                "the set did not settle within {timeout:?}: {}; logs:\n{}",
                wrong.join("; "),
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the master on `master_port` says it has every other live
    /// data node connected and each says its link to it is up.
    async fn await_replication(&self, master_port: u16, deadline: Instant) {
        let replicas: Vec<u16> = self
            .live_node_ports()
            .into_iter()
            .filter(|&p| p != master_port)
            .collect();
        let master_port_text = master_port.to_string();
        loop {
            let mut wrong = Vec::new();
            match self
                .try_cmd::<String>(master_port, &["INFO", "replication"])
                .await
            {
                Ok(info) => {
                    let connected = info_field(&info, "connected_slaves");
                    if connected != Some(replicas.len().to_string().as_str()) {
                        wrong.push(format!(
                            "master {master_port}: connected_slaves {connected:?}"
                        ));
                    }
                }
                Err(e) => wrong.push(format!("master {master_port}: INFO: {e}")),
            }
            for &port in &replicas {
                match self.try_cmd::<String>(port, &["INFO", "replication"]).await {
                    Ok(info)
                        if info_field(&info, "master_port") == Some(master_port_text.as_str())
                            && info_field(&info, "master_link_status") == Some("up") => {}
                    Ok(info) => wrong.push(format!(
                        "replica {port}: master_port {:?}, master_link_status {:?}",
                        info_field(&info, "master_port"),
                        info_field(&info, "master_link_status")
                    )),
                    Err(e) => wrong.push(format!("replica {port}: INFO: {e}")),
                }
            }
            if wrong.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replication to {master_port} not up in time: {}; logs:\n{}",
                wrong.join("; "),
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every sentinel sees `master_port` as a healthy master
    /// with `replicas` healthy replicas and every other sentinel.
    async fn await_sentinels(&self, master_port: u16, replicas: usize, deadline: Instant) {
        let others = self.sentinels.len() - 1;
        loop {
            let mut wrong = Vec::new();
            for sentinel in &self.sentinels {
                if let Err(why) = self
                    .sentinel_sees(sentinel.port, master_port, replicas, others)
                    .await
                {
                    wrong.push(format!("sentinel {}: {why}", sentinel.port));
                }
            }
            if wrong.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not agree on the set within {FORM_TIMEOUT:?}: {}; logs:\n{}",
                wrong.join("; "),
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ok when the sentinel on `port` sees what [`Self::await_sentinels`]
    /// waits for; what it sees otherwise.
    async fn sentinel_sees(
        &self,
        port: u16,
        master_port: u16,
        replicas: usize,
        others: usize,
    ) -> Result<(), String> {
        let master: Fields = self
            .try_cmd(port, &["SENTINEL", "MASTER", SERVICE])
            .await
            .map_err(|e| format!("SENTINEL MASTER: {e}"))?;
        let field = |name: &str| master.get(name).map(String::as_str);
        if field("port") != Some(master_port.to_string().as_str())
            || field("flags") != Some("master")
        {
            return Err(format!(
                "master {:?} flags {:?}",
                field("port"),
                field("flags")
            ));
        }
        let listed: Vec<Fields> = self
            .try_cmd(port, &["SENTINEL", "REPLICAS", SERVICE])
            .await
            .map_err(|e| format!("SENTINEL REPLICAS: {e}"))?;
        let healthy = listed
            .iter()
            .filter(|r| {
                r.get("flags").map(String::as_str) == Some("slave")
                    && r.get("master-link-status").map(String::as_str) == Some("ok")
            })
            .count();
        if listed.len() != replicas || healthy != replicas {
            return Err(format!(
                "{} replicas listed, {healthy} healthy (want {replicas})",
                listed.len()
            ));
        }
        let known: Vec<Fields> = self
            .try_cmd(port, &["SENTINEL", "SENTINELS", SERVICE])
            .await
            .map_err(|e| format!("SENTINEL SENTINELS: {e}"))?;
        if known.len() != others {
            return Err(format!(
                "knows {} other sentinels (want {others})",
                known.len()
            ));
        }
        Ok(())
    }

    /// `redis+sentinel://127.0.0.1:P1,...,127.0.0.1:Pn/sbmaster`: every
    /// sentinel, then the service name, for an instance's `--redis-url`.
    pub fn sentinel_url(&self) -> String {
        let addrs: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{SERVICE}", addrs.join(","))
    }

    /// The sentinels' `down-after-milliseconds`.
    pub fn down_after(&self) -> Duration {
        self.down_after
    }

    /// Ports of the sentinels, in start order.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// Ports of every data node started (dead ones included), the first
    /// master first.
    pub fn node_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Ports of the data nodes still running.
    pub fn live_node_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The master's port as the first sentinel that answers says now
    /// (`SENTINEL get-master-addr-by-name sbmaster`).
    pub async fn master_port(&self) -> u16 {
        let mut errors = Vec::new();
        for sentinel in &self.sentinels {
            match self.master_by(sentinel.port).await {
                Ok(port) => return port,
                Err(e) => errors.push(format!("{}: {e}", sentinel.port)),
            }
        }
        panic!("no sentinel named the master: {errors:?}")
    }

    /// The master's port according to the sentinel on `sentinel_port`.
    async fn master_by(&self, sentinel_port: u16) -> Result<u16, String> {
        let addr: Option<(String, String)> = self
            .try_cmd(
                sentinel_port,
                &["SENTINEL", "get-master-addr-by-name", SERVICE],
            )
            .await
            .map_err(|e| e.to_string())?;
        let (_, port) = addr.ok_or_else(|| format!("knows no master {SERVICE}"))?;
        port.parse()
            .map_err(|e| format!("master port {port:?}: {e}"))
    }

    /// SIGKILLs the current master (no shutdown, no save), reaps it and
    /// returns its port. The sentinels promote a replica after down-after
    /// and an election: [`ReplicatedRedis::wait_failover`].
    pub async fn kill_master(&mut self) -> u16 {
        let port = self.master_port().await;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("the sentinels name {port}, not a node of this set"));
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("the master on {port} was already killed"));
        child.0.kill().expect("SIGKILL the redis master");
        child.0.wait().expect("reap the killed redis master");
        port
    }

    /// Waits until every sentinel names a master other than `old_port` (the
    /// same one) and that node says `role:master`; returns its port.
    /// Panics after `timeout` with what the sentinels said last and the
    /// logs' tails.
    pub async fn wait_failover(&self, old_port: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut named = Vec::new();
            let mut wrong = Vec::new();
            for sentinel in &self.sentinels {
                match self.master_by(sentinel.port).await {
                    Ok(port) if port != old_port => named.push(port),
                    Ok(port) => wrong.push(format!("{} still names {port}", sentinel.port)),
                    Err(e) => wrong.push(format!("{}: {e}", sentinel.port)),
                }
            }
            named.sort_unstable();
            named.dedup();
            match named.as_slice() {
                [new] if wrong.is_empty() => {
                    match self.try_cmd::<String>(*new, &["INFO", "replication"]).await {
                        Ok(info) if info_field(&info, "role") == Some("master") => return *new,
                        Ok(info) => {
                            wrong.push(format!("{new} says role {:?}", info_field(&info, "role")))
                        }
                        Err(e) => wrong.push(format!("{new}: INFO: {e}")),
                    }
                }
                [] | [_] => {}
                _ => wrong.push(format!("the sentinels disagree: {named:?}")),
            }
            assert!(
                Instant::now() < deadline,
                "no failover from {old_port} within {timeout:?}: {}; logs:\n{}",
                wrong.join("; "),
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs one command on the process (data node or sentinel) on `port`,
    /// panicking with the command and the error if it fails (or takes over
    /// 3 s).
    pub async fn cmd<T: FromRedisValue>(&self, port: u16, args: &[&str]) -> T {
        match self.try_cmd(port, args).await {
            Ok(v) => v,
            Err(e) => panic!("redis command {args:?} on {port} failed: {e}"),
        }
    }

    /// Runs one command on the process on `port`, returning Redis's error
    /// (a `READONLY`, a dead node) as it is. A command that meets its
    /// connection closed (by a sentinel's `CLIENT KILL` in a failover) is
    /// sent once more on a new one: a test's admin commands are reads or
    /// idempotent writes.
    pub async fn try_cmd<T: FromRedisValue>(&self, port: u16, args: &[&str]) -> RedisResult<T> {
        let process = self
            .nodes
            .iter()
            .chain(&self.sentinels)
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no process of this set on port {port}"));
        let mut cmd = ::redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let mut resent = false;
        loop {
            let mut conn = process.connection().await?;
            match cmd.query_async(&mut conn).await {
                Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                    process.forget_connection();
                    if resent || !e.is_connection_dropped() {
                        return Err(e);
                    }
                    resent = true;
                }
                reply => return reply,
            }
        }
    }

    /// `INFO section` of the process on `port`.
    pub async fn info(&self, port: u16, section: &str) -> String {
        self.cmd(port, &["INFO", section]).await
    }

    /// The last lines of every process's log, for panic messages.
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .chain(&self.sentinels)
            .map(|p| {
                let tail = log_tail(&p.log_path);
                let short = tail
                    .char_indices()
                    .rev()
                    .nth(1500)
                    .map_or(tail.as_str(), |(i, _)| &tail[i..]);
                let kind = match p.kind {
                    Kind::Data => "redis node",
                    Kind::Sentinel => "sentinel",
                };
                let state = if p.child.is_some() { "" } else { " (killed)" };
                format!("--- {kind} {}{state} ---\n{short}", p.port)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The set's tempdir (sentinel configs and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ReplicatedRedis {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- replicated redis logs -----\n{}\n-----",
                self.log_tails()
            );
        }
        // Sentinels first, so none reconfigures a node being killed; each
        // ChildGuard kills and reaps its process; the TempDir goes after.
        self.sentinels.clear();
        self.nodes.clear();
    }
}

impl Process {
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

/// Timeouts of an admin connection.
fn admin_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
}

/// A reply of `SENTINEL MASTER` (one entry of `SENTINEL REPLICAS`, ...):
/// field names and values.
type Fields = std::collections::HashMap<String, String>;

/// The command line of a data node on `port`: a replica of the master on
/// `replica_of`, or a master.
fn data_node_args(port: u16, replica_of: Option<u16>) -> Vec<String> {
    let mut args: Vec<String> = [
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
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(master) = replica_of {
        args.extend([
            "--replicaof".to_string(),
            "127.0.0.1".to_string(),
            master.to_string(),
        ]);
    }
    args
}

/// Starts one process of `kind` with the arguments `args(port)` on a fresh
/// random port and waits until it answers PING; another port on a clash
/// (up to [`START_ATTEMPTS`]).
async fn start_process(dir: &Path, kind: Kind, args: impl Fn(u16) -> Vec<String>) -> Process {
    let mut last = String::new();
    for _ in 0..START_ATTEMPTS {
        let port = free_port();
        match try_start_process(dir, kind, port, args(port)).await {
            Ok(process) => return process,
            Err(why) => last = why,
        }
    }
    panic!("could not start a {kind:?} redis process in {START_ATTEMPTS} attempts; last: {last}");
}

/// A random port in [`PORT_RANGE`] bindable on 127.0.0.1 right now
/// (another process may still take it before redis-server binds: then it
/// exits and the caller retries).
fn free_port() -> u16 {
    loop {
        let port = rand::random_range(PORT_RANGE);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

async fn try_start_process(
    dir: &Path,
    kind: Kind,
    port: u16,
    args: Vec<String>,
) -> Result<Process, String> {
    let name = match kind {
        Kind::Data => "node",
        Kind::Sentinel => "sentinel",
    };
    let log_path = dir.join(format!("{name}-{port}.log"));
    let log = std::fs::File::create(&log_path).expect("create a redis log file");
    let spawned = Command::new("redis-server")
        .args(&args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(child) => ChildGuard(child),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server not found: install it (Debian: apt-get install redis-server) — see README"
        ),
        Err(e) => panic!("failed to start redis-server: {e}"),
    };
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("a redis://127.0.0.1:PORT url is valid");
    let config = admin_config();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(format!(
                "{name} on port {port} exited during start-up ({status}); log:\n{}",
                log_tail(&log_path)
            ));
        }
        if let Ok(mut conn) = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            let pong: RedisResult<String> = ::redis::cmd("PING").query_async(&mut conn).await;
            if pong.is_ok() {
                return Ok(Process {
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
            "{name} on port {port} did not answer PING within 10s; log:\n{}",
            log_tail(&log_path)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kit against real processes: the set forms, a write reaches the
    /// replicas, a killed master is replaced by a replica that has the
    /// data, twice.
    #[tokio::test]
    async fn sentinels_promote_a_replica_when_the_master_dies() {
        let started = Instant::now();
        let mut set = ReplicatedRedis::start(2, 3, 1000).await;
        eprintln!(
            "master + 2 replicas + 3 sentinels formed in {:?}",
            started.elapsed()
        );
        let url = set.sentinel_url();
        assert!(url.starts_with("redis+sentinel://127.0.0.1:"), "{url}");
        assert!(url.ends_with("/sbmaster"), "{url}");
        assert_eq!(url.matches("127.0.0.1:").count(), 3, "{url}");

        let master = set.master_port().await;
        assert_eq!(master, set.node_ports()[0], "the first node is the master");
        let _: () = set.cmd(master, &["SET", "k", "v"]).await;
        let _: i64 = set.cmd(master, &["WAIT", "2", "2000"]).await;
        let info = set.info(set.node_ports()[1], "replication").await;
        assert_eq!(info_field(&info, "role"), Some("slave"), "{info}");

        let killed = set.kill_master().await;
        assert_eq!(killed, master);
        let killed_at = Instant::now();
        let promoted = set.wait_failover(killed, Duration::from_secs(20)).await;
        eprintln!(
            "failover {killed} -> {promoted} in {:?} (down-after {:?})",
            killed_at.elapsed(),
            set.down_after()
        );
        assert_ne!(promoted, killed);
        assert_eq!(set.master_port().await, promoted);
        let value: String = set.cmd(promoted, &["GET", "k"]).await;
        assert_eq!(value, "v", "the promoted replica had the key");
        assert_eq!(set.live_node_ports().len(), 2);

        // Again, from the promoted one to the last replica.
        let settling = Instant::now();
        set.wait_settled(Duration::from_secs(15)).await;
        eprintln!("settled on {promoted} after {:?}", settling.elapsed());
        let killed = set.kill_master().await;
        assert_eq!(killed, promoted);
        let killed_at = Instant::now();
        let last = set.wait_failover(killed, Duration::from_secs(20)).await;
        eprintln!("failover {killed} -> {last} in {:?}", killed_at.elapsed());
        let value: String = set.cmd(last, &["GET", "k"]).await;
        assert_eq!(value, "v", "the last replica had the key");
    }
}
