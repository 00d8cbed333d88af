//! A private replicated Redis watched by Redis Sentinel, for one test
//! ([`ReplicatedRedis`]): a master and its replicas as child processes on
//! random loopback ports, sentinels monitoring them as `sbmaster`, and the
//! faults and reads a test drives on it — SIGKILL of the current master,
//! waiting for the sentinels to promote a replica, and any command or
//! `INFO` on one node. Admin commands go over one plain connection per
//! process (no sentinel client: a test always says which node it asks).
//! What the keys and channels mean is the tests' business.

use std::path::Path;
use std::time::{Duration, Instant};

use ::redis::{FromRedisValue, RedisResult};
use tempfile::TempDir;

use super::cluster::info_field;
use super::node::{self, data_node_args, free_port, none_wrong, poll_until, Kind, Node};

/// The name the sentinels monitor the master under: the last part of
/// [`ReplicatedRedis::sentinel_url`].
const SERVICE: &str = "sbmaster";

/// Ports are drawn from here, well above the well-known ones. A port taken
/// by another process between the check and redis-server's bind shows up
/// as an early exit; the next attempt draws another.
const PORT_RANGE: std::ops::Range<u16> = 20000..55000;
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
/// How often a wait for the set's state asks again.
const PACE: Duration = Duration::from_millis(50);
/// How often a wait that measures (a failover, a replica's link) asks again.
const FAST_PACE: Duration = Duration::from_millis(20);

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
    nodes: Vec<Node>,
    /// The sentinels, in start order.
    sentinels: Vec<Node>,
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
            replica_or_master_args(port, None)
        })
        .await;
        let master_port = master.port;
        set.nodes.push(master);
        for _ in 0..replicas {
            let replica = start_process(set.dir.path(), Kind::Data, |port| {
                replica_or_master_args(port, Some(master_port))
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
        let what = format!("the set did not settle within {timeout:?}");
        let master = poll_until(deadline, PACE, &what, &|| self.log_tails(), || async {
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
                return Ok(*master);
            }
            if named.len() > 1 {
                wrong.push(format!("the sentinels disagree: {named:?}"));
            }
            Err(wrong)
        })
        .await;
        self.await_replication(master, deadline).await;
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
        let what = format!("replication to {master_port} not up in time");
        poll_until(deadline, FAST_PACE, &what, &|| self.log_tails(), || async {
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
            none_wrong(wrong)
        })
        .await
    }

    /// Waits until every sentinel sees `master_port` as a healthy master
    /// with `replicas` healthy replicas and every other sentinel.
    async fn await_sentinels(&self, master_port: u16, replicas: usize, deadline: Instant) {
        let others = self.sentinels.len() - 1;
        let what = format!("the sentinels did not agree on the set within {FORM_TIMEOUT:?}");
        poll_until(deadline, PACE, &what, &|| self.log_tails(), || async {
            let mut wrong = Vec::new();
            for sentinel in &self.sentinels {
                if let Err(why) = self
                    .sentinel_sees(sentinel.port, master_port, replicas, others)
                    .await
                {
                    wrong.push(format!("sentinel {}: {why}", sentinel.port));
                }
            }
            none_wrong(wrong)
        })
        .await
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
            .filter(|n| n.is_live())
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
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("the sentinels name {port}, not a node of this set"))
            .kill();
        port
    }

    /// Waits until every sentinel names a master other than `old_port` (the
    /// same one) and that node says `role:master`; returns its port.
    /// Panics after `timeout` with what the sentinels said last and the
    /// logs' tails.
    pub async fn wait_failover(&self, old_port: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        let what = format!("no failover from {old_port} within {timeout:?}");
        poll_until(deadline, FAST_PACE, &what, &|| self.log_tails(), || async {
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
                        Ok(info) if info_field(&info, "role") == Some("master") => return Ok(*new),
                        Ok(info) => {
                            wrong.push(format!("{new} says role {:?}", info_field(&info, "role")))
                        }
                        Err(e) => wrong.push(format!("{new}: INFO: {e}")),
                    }
                }
                [] | [_] => {}
                _ => wrong.push(format!("the sentinels disagree: {named:?}")),
            }
            Err(wrong)
        })
        .await
    }

    /// Runs one command on the process (data node or sentinel) on `port`,
    /// panicking with the command and the error if it fails (or takes over
    /// 3 s).
    pub async fn cmd<T: FromRedisValue>(&self, port: u16, args: &[&str]) -> T {
        self.process(port).cmd(args).await
    }

    /// Runs one command on the process on `port`, returning Redis's error
    /// (a `READONLY`, a dead node) as it is. A command that meets its
    /// connection closed (by a sentinel's `CLIENT KILL` in a failover) is
    /// sent once more on a new one: a test's admin commands are reads or
    /// idempotent writes.
    pub async fn try_cmd<T: FromRedisValue>(&self, port: u16, args: &[&str]) -> RedisResult<T> {
        self.process(port).try_cmd(args).await
    }

    /// The process (data node or sentinel) on `port`, dead or alive.
    fn process(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .chain(&self.sentinels)
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no process of this set on port {port}"))
    }

    /// `INFO section` of the process on `port`.
    pub async fn info(&self, port: u16, section: &str) -> String {
        self.cmd(port, &["INFO", section]).await
    }

    /// The last lines of every process's log, for panic messages.
    pub fn log_tails(&self) -> String {
        node::log_tails(self.nodes.iter().chain(&self.sentinels))
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

/// A reply of `SENTINEL MASTER` (one entry of `SENTINEL REPLICAS`, ...):
/// field names and values.
type Fields = std::collections::HashMap<String, String>;

/// The command line of a data node on `port`: a replica of the master on
/// `replica_of`, or a master.
fn replica_or_master_args(port: u16, replica_of: Option<u16>) -> Vec<String> {
    let mut args = data_node_args(port);
    if let Some(master) = replica_of {
        args.extend(["--replicaof", "127.0.0.1", &master.to_string()].map(String::from));
    }
    args
}

/// Starts one process of `kind` with the arguments `args(port)` on a
/// fresh random port in [`PORT_RANGE`].
async fn start_process(dir: &Path, kind: Kind, args: impl Fn(u16) -> Vec<String>) -> Node {
    Node::start(dir, kind, || free_port(PORT_RANGE, None), args).await
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
        // 2 s down-after, not the 1 s the Switchboard tests use: this checks
        // the kit, and on a loaded 2-core machine 1 s let sentinels mark a
        // live replica down during the reconfiguration (CI, once).
        let mut set = ReplicatedRedis::start(2, 3, 2000).await;
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
        let acked: i64 = set.cmd(master, &["WAIT", "2", "5000"]).await;
        assert_eq!(acked, 2, "both replicas have the key before the kill");
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
