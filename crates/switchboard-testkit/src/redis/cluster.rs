//! A private Redis Cluster for one test ([`RedisCluster`]): its nodes as
//! child processes on random loopback ports, the cluster built by
//! `redis-cli --cluster create`, and the faults and operations a test drives
//! on it — SIGKILL of the master serving a key, waiting for the failover,
//! moving one chosen slot to another master, and reading `INFO` off every
//! node. Admin commands go over one plain connection per node (no cluster
//! client, so no MOVED/ASK handling: a test always says which node it asks).
//! What the keys and channels mean is the tests' business.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ::redis::{FromRedisValue, RedisResult};
use tempfile::TempDir;

use super::node::{self, data_node_args, free_port, none_wrong, poll_until, Kind, Node};

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// Client ports are drawn from here; the bus port is the client port +
/// 10000, so both stay below the kernel's ephemeral range (32768 and up
/// here): a port handed to a test's `free_port()` or to an outgoing
/// connection is never one a node wants, and the reverse.
const PORT_RANGE: std::ops::Range<u16> = 20000..22768;
/// The cluster bus port of a node is its client port plus this.
const BUS_OFFSET: u16 = 10000;
/// How often a wait for the cluster's state asks the nodes again.
const PACE: Duration = Duration::from_millis(50);

/// One line of `CLUSTER NODES`, as far as the kit needs it.
#[derive(Clone, Debug)]
struct NodeView {
    id: String,
    port: u16,
    /// The master's id for a replica (`-` for a master).
    master_id: String,
    master: bool,
    /// Flagged `fail` or `fail?` by the node that was asked.
    failing: bool,
    /// Slot ranges it serves (importing/migrating markers left out).
    slots: Vec<(u16, u16)>,
}

/// A Redis Cluster of `masters` masters with `replicas_per_master` replicas
/// each, on 127.0.0.1, private to one test. Every node is killed (SIGKILL, by
/// pid) and its tempdir removed on drop.
///
/// The nodes run with `cluster-replica-validity-factor 0` (a replica always
/// stands for election, however long it was cut off, so a failover in a
/// test never depends on timing), `cluster-allow-replica-migration no`
/// (replicas stay where the test put them) and `repl-diskless-sync-delay 0`
/// (a replica syncs at once rather than after Redis's 5 s default). Full
/// coverage is required (Redis's default): while a master is down and not
/// yet replaced, `cluster_state` is `fail` on every node.
pub struct RedisCluster {
    /// Every node started (`redis-server --cluster-enabled yes`), dead ones
    /// included, in start order; the bus of each is on its port + 10000.
    nodes: Vec<Node>,
    /// `--cluster-node-timeout` of every node.
    node_timeout: Duration,
    /// The masters once the cluster formed: what [`RedisCluster::seeds`]
    /// lists, also after a failover (an instance must cope with a dead seed).
    seed_masters: Vec<u16>,
    /// Node configs and logs; removed on drop (after the nodes are killed).
    dir: TempDir,
}

impl RedisCluster {
    /// Starts `masters * (1 + replicas_per_master)` nodes on random free
    /// port pairs, builds the cluster with `redis-cli --cluster create
    /// --cluster-replicas R --cluster-yes`, and waits until every node says
    /// `cluster_state:ok`, knows every other node in its final role, and
    /// every replica's link to its master is up. Panics (with the nodes'
    /// log tails) if any step fails or takes too long.
    pub async fn start(
        masters: usize,
        replicas_per_master: usize,
        node_timeout_ms: u64,
    ) -> RedisCluster {
        assert!(masters >= 1, "a cluster needs at least one master");
        let dir = tempfile::tempdir().expect("create a tempdir for the redis cluster");
        let total = masters * (1 + replicas_per_master);
        let mut nodes = Vec::with_capacity(total);
        for _ in 0..total {
            let node = Node::start(
                dir.path(),
                Kind::Data,
                || free_port(PORT_RANGE, Some(BUS_OFFSET)),
                |port| node_args(dir.path(), port, node_timeout_ms),
            )
            .await;
            nodes.push(node);
        }
        let mut cluster = RedisCluster {
            nodes,
            node_timeout: Duration::from_millis(node_timeout_ms),
            seed_masters: Vec::new(),
            dir,
        };
        cluster.create(replicas_per_master).await;
        cluster.await_formed(masters, total).await;
        cluster.seed_masters = cluster.masters().await;
        cluster
    }

    /// `redis-cli --cluster create` over every node (bounded to 60 s).
    async fn create(&self, replicas_per_master: usize) {
        let mut cmd = tokio::process::Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        cmd.arg("--cluster-replicas")
            .arg(replicas_per_master.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(Duration::from_secs(60), cmd.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => panic!("run redis-cli --cluster create: {e}"),
            Err(_) => panic!(
                "redis-cli --cluster create did not finish within 60s; nodes:\n{}",
                self.log_tails()
            ),
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && text.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed ({}):\n{text}\nnodes:\n{}",
            output.status,
            self.log_tails()
        );
    }

    /// Waits (up to 30 s) until every node is `cluster_state:ok`, sees
    /// `masters` masters owning slots and `total` nodes in all, and every
    /// replica's link to its master is up.
    async fn await_formed(&self, masters: usize, total: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let what = "the redis cluster did not form within 30s";
        poll_until(deadline, PACE, what, &|| self.log_tails(), || async {
            let mut wrong = Vec::new();
            for node in &self.nodes {
                let port = node.port;
                match self.node_view(port).await {
                    Ok(view) => {
                        let with_slots = view
                            .iter()
                            .filter(|n| n.master && !n.slots.is_empty())
                            .count();
                        let replicas = view.iter().filter(|n| !n.master).count();
                        if view.len() != total
                            || with_slots != masters
                            || replicas != total - masters
                            || view.iter().any(|n| n.failing)
                        {
                            wrong.push(format!(
                                "{port} sees {} nodes, {with_slots} masters with slots, {replicas} replicas",
                                view.len()
                            ));
                        }
                    }
                    Err(e) => wrong.push(format!("{port}: CLUSTER NODES: {e}")),
                }
                wrong.extend(self.state_not_ok(port).await);
                match self.try_cmd::<String>(port, &["INFO", "replication"]).await {
                    Ok(info) => {
                        if info_field(&info, "role") == Some("slave")
                            && info_field(&info, "master_link_status") != Some("up")
                        {
                            wrong.push(format!("{port}: replica link not up"));
                        }
                    }
                    Err(e) => wrong.push(format!("{port}: INFO replication: {e}")),
                }
            }
            none_wrong(wrong)
        })
        .await
    }

    /// What is wrong with the `cluster_state` of the node on `port`, if it
    /// is not `ok`.
    async fn state_not_ok(&self, port: u16) -> Option<String> {
        match self.try_cmd::<String>(port, &["CLUSTER", "INFO"]).await {
            Ok(info) if info_field(&info, "cluster_state") == Some("ok") => None,
            Ok(info) => Some(format!(
                "{port}: cluster_state {:?}",
                info_field(&info, "cluster_state")
            )),
            Err(e) => Some(format!("{port}: CLUSTER INFO: {e}")),
        }
    }

    /// `redis://127.0.0.1:P` of every master the cluster started with,
    /// comma-separated: the value of an instance's `--redis-cluster`.
    pub fn seeds(&self) -> String {
        self.seed_masters
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `--cluster-node-timeout` the nodes run with.
    pub fn node_timeout(&self) -> Duration {
        self.node_timeout
    }

    /// The hash slot of a key or shard channel: CRC16 (XMODEM) of its hash
    /// tag — the part between the first `{` and the next `}` when that is
    /// not empty — or of the whole name, modulo 16384. The same rule as
    /// `CLUSTER KEYSLOT`: `slot_of("sb:inst:{i2}") == slot_of("i2")`.
    pub fn slot_of(key_or_channel: &str) -> u16 {
        let bytes = key_or_channel.as_bytes();
        let tag = bytes.iter().position(|&b| b == b'{').and_then(|open| {
            let rest = &bytes[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&len| len > 0)
                .map(|len| &rest[..len])
        });
        crc16_xmodem(tag.unwrap_or(bytes)) % SLOTS
    }

    /// Ports of every node started (dead ones included), in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_live())
            .map(|n| n.port)
            .collect()
    }

    /// Ports of the live masters that serve slots, as the first live node
    /// that answers says now.
    pub async fn masters(&self) -> Vec<u16> {
        let live: HashSet<u16> = self.live_ports().into_iter().collect();
        let view = self.any_view().await;
        let mut ports: Vec<u16> = view
            .iter()
            .filter(|n| n.master && !n.slots.is_empty() && live.contains(&n.port))
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The port of the node serving `slot` as master, as the first live
    /// node that answers says now.
    pub async fn master_of_slot(&self, slot: u16) -> u16 {
        master_in(&self.any_view().await, slot)
            .unwrap_or_else(|| panic!("no node serves slot {slot}; nodes:\n{}", self.log_tails()))
            .port
    }

    /// The port of the master serving `key`'s slot now.
    pub async fn master_of(&self, key_or_channel: &str) -> u16 {
        self.master_of_slot(Self::slot_of(key_or_channel)).await
    }

    /// The node id (40 hex digits) of the node on `port`.
    pub async fn node_id(&self, port: u16) -> String {
        self.cmd(port, &["CLUSTER", "MYID"]).await
    }

    /// SIGKILLs the master currently serving `key`'s slot and returns its
    /// port. Its replica (if any) takes over after the node timeout:
    /// [`RedisCluster::wait_failover`].
    pub async fn kill_master_of(&mut self, key_or_channel: &str) -> u16 {
        let port = self.master_of(key_or_channel).await;
        self.kill_node(port);
        port
    }

    /// Ports of the replicas of the master on `master_port`, as that
    /// master's `CLUSTER NODES` says now.
    pub async fn replicas_of(&self, master_port: u16) -> Vec<u16> {
        let view = self
            .node_view(master_port)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER NODES on {master_port}: {e}"));
        let id = view
            .iter()
            .find(|n| n.port == master_port)
            .map(|n| n.id.clone())
            .unwrap_or_else(|| panic!("node {master_port} is not in its own CLUSTER NODES"));
        let mut ports: Vec<u16> = view
            .iter()
            .filter(|n| !n.master && n.master_id == id)
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Waits until every replica of the master on `master_port` has
    /// applied what that master had written when this was called
    /// (replication is asynchronous: a master killed at once may take a
    /// just-written or just-migrated key with it). Panics after `timeout`.
    pub async fn wait_replicated(&self, master_port: u16, timeout: Duration) {
        let info: String = self.cmd(master_port, &["INFO", "replication"]).await;
        let written: u64 = info_field(&info, "master_repl_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no master_repl_offset from {master_port}: {info}"));
        let replicas = self.replicas_of(master_port).await;
        let deadline = Instant::now() + timeout;
        let what = format!(
            "the replicas of {master_port} did not reach offset {written} within {timeout:?}"
        );
        poll_until(deadline, PACE, &what, &|| self.log_tails(), || async {
            let mut wrong = Vec::new();
            for &replica in &replicas {
                let info: String = self.cmd(replica, &["INFO", "replication"]).await;
                match info_field(&info, "slave_repl_offset").and_then(|v| v.parse::<u64>().ok()) {
                    Some(applied) if applied >= written => {}
                    other => wrong.push(format!("{replica} is at {other:?}")),
                }
            }
            none_wrong(wrong)
        })
        .await;
    }

    /// Freezes the node on `port` (SIGSTOP): its sockets stay open, nobody
    /// answers, until [`RedisCluster::resume_node`]. Past the node timeout
    /// the others mark it failed.
    pub fn freeze_node(&self, port: u16) {
        self.node(port)
            .signal(rustix::process::Signal::STOP, "SIGSTOP");
    }

    /// SIGCONT after [`RedisCluster::freeze_node`].
    pub fn resume_node(&self, port: u16) {
        self.node(port)
            .signal(rustix::process::Signal::CONT, "SIGCONT");
    }

    /// SIGKILLs the node on `port` (no shutdown, no save) and reaps it.
    pub fn kill_node(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
            .kill();
    }

    /// Waits until every live node says a live node other than a killed
    /// one is master for `slot`, and every live node is
    /// `cluster_state:ok`; returns the new master's port. Panics after
    /// `timeout` with what the nodes said last and their log tails.
    pub async fn wait_failover(&self, slot: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        let live: HashSet<u16> = self.live_ports().into_iter().collect();
        let what = format!("no failover of slot {slot} within {timeout:?}");
        poll_until(deadline, PACE, &what, &|| self.log_tails(), || async {
            let mut owners = HashSet::new();
            let mut wrong = Vec::new();
            for &port in &live {
                match self.node_view(port).await {
                    Ok(view) => match master_in(&view, slot) {
                        Some(master) if live.contains(&master.port) => {
                            owners.insert(master.port);
                        }
                        other => wrong.push(format!(
                            "{port} says slot {slot} is on {:?}",
                            other.map(|m| m.port)
                        )),
                    },
                    Err(e) => wrong.push(format!("{port}: CLUSTER NODES: {e}")),
                }
                wrong.extend(self.state_not_ok(port).await);
            }
            if wrong.is_empty() && owners.len() == 1 {
                return Ok(owners.into_iter().next().expect("one owner"));
            }
            if owners.len() > 1 {
                wrong.push(format!("nodes disagree on the owner: {owners:?}"));
            }
            Err(wrong)
        })
        .await
    }

    /// Moves one chosen `slot`, with its keys, to the master on `to_port`
    /// while clients keep using it, and waits until every live node agrees
    /// that `to_port` serves it; returns how many keys were migrated.
    ///
    /// This is the sequence `redis-cli --cluster reshard` runs per slot,
    /// driven by hand, because `reshard --cluster-slots 1` moves *some*
    /// slot of the source, not a chosen one: `CLUSTER SETSLOT slot
    /// IMPORTING src` on the target, `SETSLOT slot MIGRATING dst` on the
    /// source, `MIGRATE … KEYS …` in batches (of 100) until `CLUSTER
    /// GETKEYSINSLOT` is empty, then `SETSLOT slot NODE dst` on the target,
    /// the source and every other master. Meanwhile clients get `ASK`
    /// redirects (`TRYAGAIN` for multi-key commands over half-moved keys);
    /// afterwards `MOVED`, and the source drops its shard-channel
    /// subscribers of the slot (they receive `sunsubscribe`).
    pub async fn move_slot(&self, slot: u16, to_port: u16) -> usize {
        self.move_slot_in_batches(slot, to_port, 100).await
    }

    /// [`RedisCluster::move_slot`], migrating `keys_per_migrate` keys per
    /// `MIGRATE`: a small batch keeps the slot half-moved for longer, so
    /// more traffic meets it in that state.
    pub async fn move_slot_in_batches(
        &self,
        slot: u16,
        to_port: u16,
        keys_per_migrate: usize,
    ) -> usize {
        assert!(keys_per_migrate > 0, "MIGRATE at least one key at a time");
        let batch = keys_per_migrate.to_string();
        let from_port = self.master_of_slot(slot).await;
        assert_ne!(
            from_port, to_port,
            "slot {slot} is already served by {to_port}"
        );
        let from_id = self.node_id(from_port).await;
        let to_id = self.node_id(to_port).await;
        let slot_arg = slot.to_string();
        let _: String = self
            .cmd(
                to_port,
                &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id],
            )
            .await;
        let _: String = self
            .cmd(
                from_port,
                &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id],
            )
            .await;
        let to_port_arg = to_port.to_string();
        let mut moved = 0;
        loop {
            let keys: Vec<String> = self
                .cmd(from_port, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, &batch])
                .await;
            if keys.is_empty() {
                break;
            }
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                to_port_arg.as_str(),
                "",
                "0",
                "5000",
                "KEYS",
            ];
            args.extend(keys.iter().map(String::as_str));
            let _: ::redis::Value = self.cmd(from_port, &args).await;
            moved += keys.len();
        }
        let _: String = self
            .cmd(to_port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id])
            .await;
        let _: String = self
            .cmd(
                from_port,
                &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id],
            )
            .await;
        for port in self.masters().await {
            if port != to_port && port != from_port {
                let _: String = self
                    .cmd(port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id])
                    .await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let what = format!("slot {slot} moved to {to_port}, but not every node agrees after 10s");
        poll_until(deadline, PACE, &what, &|| self.log_tails(), || async {
            let mut wrong = Vec::new();
            for port in self.live_ports() {
                match self.node_view(port).await {
                    Ok(view) => {
                        let owner = master_in(&view, slot).map(|m| m.port);
                        if owner != Some(to_port) {
                            wrong.push(format!("{port} says {owner:?}"));
                        }
                    }
                    Err(e) => wrong.push(format!("{port}: {e}")),
                }
            }
            none_wrong(wrong)
        })
        .await;
        moved
    }

    /// Runs one command on the node on `port`, panicking with the command
    /// and the error if it fails (or takes over 3 s).
    pub async fn cmd<T: FromRedisValue>(&self, port: u16, args: &[&str]) -> T {
        self.node(port).cmd(args).await
    }

    /// Runs one command on the node on `port`, returning Redis's error (a
    /// `MOVED`, a `CLUSTERDOWN`, a dead node) as it is; a command that met
    /// its connection closed is sent once more on a new one.
    pub async fn try_cmd<T: FromRedisValue>(&self, port: u16, args: &[&str]) -> RedisResult<T> {
        self.node(port).try_cmd(args).await
    }

    /// The node on `port`, dead or alive.
    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
    }

    /// Runs one command on the master serving `key`'s slot now (e.g.
    /// `&["HGETALL", "sb:presence:{bob}"]` with key `sb:presence:{bob}`).
    pub async fn cmd_for_key<T: FromRedisValue>(&self, key: &str, args: &[&str]) -> T {
        let port = self.master_of(key).await;
        self.cmd(port, args).await
    }

    /// Runs one command on every live master; (port, reply) in port order.
    pub async fn cmd_all_masters<T: FromRedisValue>(&self, args: &[&str]) -> Vec<(u16, T)> {
        let mut replies = Vec::new();
        for port in self.masters().await {
            replies.push((port, self.cmd(port, args).await));
        }
        replies
    }

    /// `INFO section` of every live node, masters and replicas; (port,
    /// text) in start order.
    pub async fn info_all(&self, section: &str) -> Vec<(u16, String)> {
        let mut infos = Vec::new();
        for port in self.live_ports() {
            infos.push((port, self.cmd(port, &["INFO", section]).await));
        }
        infos
    }

    /// `HGETALL key` on the key's master (empty when the key is missing).
    pub async fn hgetall(&self, key: &str) -> std::collections::HashMap<String, String> {
        self.cmd_for_key(key, &["HGETALL", key]).await
    }

    /// `SMEMBERS key` on the key's master (empty when the key is missing).
    pub async fn smembers(&self, key: &str) -> Vec<String> {
        self.cmd_for_key(key, &["SMEMBERS", key]).await
    }

    /// `EXISTS key` on the key's master.
    pub async fn exists(&self, key: &str) -> bool {
        self.cmd_for_key::<i64>(key, &["EXISTS", key]).await == 1
    }

    /// `PUBSUB SHARDNUMSUB channel` on the channel's master: how many
    /// clients hold a shard subscription (`SSUBSCRIBE`) to it.
    pub async fn shard_numsub(&self, channel: &str) -> i64 {
        let reply: (String, i64) = self
            .cmd_for_key(channel, &["PUBSUB", "SHARDNUMSUB", channel])
            .await;
        reply.1
    }

    /// `PUBSUB NUMSUB channel` summed over every live master: subscribers
    /// of a classic (not sharded) channel anywhere in the cluster.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let replies: Vec<(u16, (String, i64))> =
            self.cmd_all_masters(&["PUBSUB", "NUMSUB", channel]).await;
        replies.iter().map(|(_, (_, n))| n).sum()
    }

    /// The last lines of every node's log, for panic messages.
    pub fn log_tails(&self) -> String {
        node::log_tails(self.nodes.iter())
    }

    /// The cluster's tempdir (node configs and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `CLUSTER NODES` as the node on `port` sees it.
    async fn node_view(&self, port: u16) -> RedisResult<Vec<NodeView>> {
        let text: String = self.try_cmd(port, &["CLUSTER", "NODES"]).await?;
        Ok(text.lines().filter_map(parse_node_line).collect())
    }

    /// The view of the first live node that answers.
    async fn any_view(&self) -> Vec<NodeView> {
        let mut errors = Vec::new();
        for port in self.live_ports() {
            match self.node_view(port).await {
                Ok(view) => return view,
                Err(e) => errors.push(format!("{port}: {e}")),
            }
        }
        panic!("no live cluster node answered CLUSTER NODES: {errors:?}")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- redis cluster logs -----\n{}\n-----",
                self.log_tails()
            );
        }
        // Each ChildGuard kills and reaps its node; the TempDir goes after.
        self.nodes.clear();
    }
}

/// `INFO commandstats` calls of `command` (lower case, e.g. `publish`) in
/// one node's INFO text: None when the command was never called (Redis
/// leaves its line out).
pub fn cmdstat_calls(info: &str, command: &str) -> Option<u64> {
    let prefix = format!("cmdstat_{command}:");
    let line = info.lines().find_map(|l| l.strip_prefix(prefix.as_str()))?;
    line.split(',')
        .find_map(|field| field.strip_prefix("calls="))
        .map(|n| {
            n.trim()
                .parse()
                .unwrap_or_else(|e| panic!("cmdstat_{command} calls {n:?}: {e}"))
        })
}

/// The value of `field:` in an INFO-style text.
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// The command line of a cluster node on `port`, its config file in `dir`.
fn node_args(dir: &Path, port: u16, node_timeout_ms: u64) -> Vec<String> {
    let config_file = dir.join(format!("nodes-{port}.conf"));
    let mut args = data_node_args(port);
    args.extend(
        [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &config_file.display().to_string(),
            "--cluster-node-timeout",
            &node_timeout_ms.to_string(),
            "--cluster-replica-validity-factor",
            "0",
            "--cluster-allow-replica-migration",
            "no",
        ]
        .map(String::from),
    );
    args
}

/// One `CLUSTER NODES` line: `id ip:port@bus flags master ping pong epoch
/// link slot...`; None for a line that does not parse.
fn parse_node_line(line: &str) -> Option<NodeView> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    let addr = fields[1].split('@').next()?;
    let port = addr.rsplit(':').next()?.parse().ok()?;
    let flags: Vec<&str> = fields[2].split(',').collect();
    let slots = fields[8..]
        .iter()
        .filter(|s| !s.starts_with('['))
        .filter_map(|s| match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => {
                let one = s.parse().ok()?;
                Some((one, one))
            }
        })
        .collect();
    Some(NodeView {
        id: fields[0].to_string(),
        port,
        master_id: fields[3].to_string(),
        master: flags.contains(&"master"),
        failing: flags.contains(&"fail") || flags.contains(&"fail?"),
        slots,
    })
}

/// The master serving `slot` in one node's view, unless it is marked failed.
fn master_in(view: &[NodeView], slot: u16) -> Option<&NodeView> {
    view.iter()
        .find(|n| n.master && !n.failing && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
}

/// CRC16/XMODEM (polynomial 0x1021, initial 0): Redis Cluster's key hash.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_of_follows_the_hash_tag_rule() {
        // Values from CLUSTER KEYSLOT on redis-server 7.0.
        assert_eq!(RedisCluster::slot_of("foo"), 12182);
        assert_eq!(RedisCluster::slot_of("123456789"), 12739);
        assert_eq!(RedisCluster::slot_of("{user1000}.following"), 3443);
        assert_eq!(
            RedisCluster::slot_of("sb:inst:{i2}"),
            RedisCluster::slot_of("i2")
        );
        assert_eq!(
            RedisCluster::slot_of("foo{}{bar}"),
            RedisCluster::slot_of("foo{}{bar}")
        );
        assert_ne!(
            RedisCluster::slot_of("foo{}{bar}"),
            RedisCluster::slot_of("bar")
        );
        assert_eq!(
            RedisCluster::slot_of("foo{{bar}}zap"),
            RedisCluster::slot_of("{bar")
        );
    }

    #[test]
    fn cmdstat_calls_reads_one_command() {
        let info = "# Commandstats\r\ncmdstat_spublish:calls=12,usec=30,usec_per_call=2.50,rejected_calls=0,failed_calls=0\r\ncmdstat_ping:calls=3,usec=1\r\n";
        assert_eq!(cmdstat_calls(info, "spublish"), Some(12));
        assert_eq!(cmdstat_calls(info, "ping"), Some(3));
        assert_eq!(cmdstat_calls(info, "publish"), None);
    }

    /// The kit against real nodes: slots as Redis computes them, a slot
    /// moved with its keys, a killed master replaced by its replica.
    #[tokio::test]
    async fn cluster_moves_a_slot_and_fails_over() {
        let started = Instant::now();
        let mut cluster = RedisCluster::start(3, 1, 2000).await;
        eprintln!("cluster of 6 formed in {:?}", started.elapsed());
        let masters = cluster.masters().await;
        assert_eq!(masters.len(), 3, "three masters: {masters:?}");
        assert_eq!(cluster.seeds().split(',').count(), 3);
        for key in [
            "sb:presence:{bob}",
            "sb:inst:{i2}",
            "plain",
            "sb:room:{lobby}",
        ] {
            let by_redis: i64 = cluster.cmd(masters[0], &["CLUSTER", "KEYSLOT", key]).await;
            assert_eq!(i64::from(RedisCluster::slot_of(key)), by_redis, "{key}");
        }

        let key = "sb:inbox:{i2}";
        let slot = RedisCluster::slot_of(key);
        let _: () = cluster.cmd_for_key(key, &["SET", key, "v"]).await;
        let from = cluster.master_of_slot(slot).await;
        let to = *masters
            .iter()
            .find(|&&p| p != from)
            .expect("another master");
        let moved = cluster.move_slot(slot, to).await;
        assert_eq!(moved, 1, "the one key of the slot moved");
        assert_eq!(cluster.master_of_slot(slot).await, to);
        let value: String = cluster.cmd(to, &["GET", key]).await;
        assert_eq!(value, "v");
        let moved_err = cluster
            .try_cmd::<String>(from, &["GET", key])
            .await
            .expect_err("the old owner redirects");
        assert!(
            moved_err.to_string().to_lowercase().contains("moved"),
            "{moved_err}"
        );

        assert_eq!(cluster.replicas_of(to).await.len(), 1, "one replica each");
        cluster.wait_replicated(to, Duration::from_secs(10)).await;
        let killed = cluster.kill_master_of(key).await;
        assert_eq!(killed, to);
        let killed_at = Instant::now();
        let new_master = cluster.wait_failover(slot, Duration::from_secs(15)).await;
        eprintln!(
            "failover of slot {slot}: {killed} -> {new_master} in {:?}",
            killed_at.elapsed()
        );
        assert_ne!(new_master, killed);
        let value: String = cluster.cmd(new_master, &["GET", key]).await;
        assert_eq!(value, "v", "the replica had the key");
        let commandstats = cluster.info_all("commandstats").await;
        assert_eq!(commandstats.len(), 5, "five live nodes");
        assert!(commandstats
            .iter()
            .any(|(_, info)| cmdstat_calls(info, "set") == Some(1)));
    }
}
