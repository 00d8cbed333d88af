//! `--redis-wait-replicas`: what "stored" means when Redis replication is
//! asynchronous. A real 3-master Redis Cluster with a replica each; the
//! replica of the recipient's master is frozen (SIGSTOP) and its link
//! closed from the master's side, so writes reach the master only; then that master is SIGKILLed and the replica, resumed,
//! takes over (`CLUSTER FAILOVER TAKEOVER`) without them.
//!
//! - Without the flag the DM is acked as stored and is gone after the
//!   failover: the loss Redis's asynchronous replication allows, shown.
//! - With `--redis-wait-replicas 1` the same DM is answered `timeout` (it
//!   was never confirmed), not acked as stored; once a replica confirms,
//!   the ack is `stored` again.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use switchboard_testkit::{eventually, opts, unique, Client, Instance, RedisCluster};

/// The node serving `port`'s replica link, from `CLUSTER NODES` on that
/// master: the port of a node listed as `slave <master id>`.
async fn replica_of(cluster: &RedisCluster, master: u16) -> u16 {
    let id = cluster.node_id(master).await;
    let nodes: String = cluster.cmd(master, &["CLUSTER", "NODES"]).await;
    nodes
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let is_replica = fields.get(2)?.split(',').any(|f| f == "slave");
            if !is_replica || fields.get(3) != Some(&id.as_str()) {
                return None;
            }
            let addr = fields.get(1)?.split('@').next()?;
            addr.rsplit(':').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("a replica of {master} in CLUSTER NODES:\n{nodes}"))
}

/// The pid of the node on `port`, from its own `INFO server`.
async fn pid_of(cluster: &RedisCluster, port: u16) -> String {
    let info: String = cluster.cmd(port, &["INFO", "server"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .map(|p| p.trim().to_owned())
        .unwrap_or_else(|| panic!("process_id in INFO server of {port}"))
}

fn signal(pid: &str, sig: &str) {
    let status = Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

fn dm(to: &str, text: &str, id: u64) -> Value {
    json!({"type": "dm", "to": to, "body": {"text": text}, "id": id, "key": text})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_means_replicated_with_wait_replicas_and_not_without() {
    let mut cluster = RedisCluster::start(3, 1, 2000).await;
    let seeds = cluster.seeds();
    let (waiting, plain, home) = tokio::join!(
        Instance::spawn(
            opts!("i1")
                .flag("--redis-cluster", &seeds)
                .flag("--redis-wait-replicas", 1)
                .flag("--redis-wait-timeout-ms", 300)
        ),
        Instance::spawn(opts!("i2").flag("--redis-cluster", &seeds)),
        Instance::spawn(opts!("i3").flag("--redis-cluster", &seeds)),
    );
    let mut alice = Client::connect_user(&waiting, "alice").await;
    let mut carol = Client::connect_user(&plain, "carol").await;
    // Bob is seen (his inbox exists), then away: every DM waits in his inbox.
    drop(Client::connect_user(&home, "bob").await);
    let master = cluster.master_of("sb:inbox:{bob}").await;
    // The replica in sync first: one still catching up after the cluster
    // was created would let the first WAIT time out (seen under CI load).
    cluster
        .wait_replicated(master, Duration::from_secs(10))
        .await;

    let confirmed = unique("confirmed");
    let ack = alice.request(dm("bob", &confirmed, 1)).await;
    assert_eq!(ack["type"], "ack", "a replica confirms it: {ack}");
    assert_eq!(ack["stored"], true, "{ack}");

    let replica = replica_of(&cluster, master).await;
    let replica_pid = pid_of(&cluster, replica).await;
    signal(&replica_pid, "-STOP");
    // And its link closed from the master's side, so nothing written from
    // now on can reach it (not even through the socket buffers).
    let killed: i64 = cluster
        .cmd(master, &["CLIENT", "KILL", "TYPE", "replica"])
        .await;
    assert_eq!(killed, 1, "the master had one replica link");

    let unconfirmed = unique("unconfirmed");
    let ack = alice.request(dm("bob", &unconfirmed, 2)).await;
    assert_eq!(ack["type"], "error", "no replica confirms it: {ack}");
    assert_eq!(ack["code"], "timeout", "stored on the master only: {ack}");
    let counted = waiting
        .metric(r#"switchboard_inbox_total{outcome="unconfirmed"}"#)
        .await;
    assert_eq!(counted, 1.0, "the unconfirmed DM is counted");

    let acked_but_lost = unique("acked-but-lost");
    let ack = carol.request(dm("bob", &acked_but_lost, 3)).await;
    assert_eq!(
        ack["stored"], true,
        "without the flag: acked once the master has it: {ack}"
    );

    // The master dies with both writes; the replica, resumed, takes over
    // without them.
    cluster.kill_node(master);
    signal(&replica_pid, "-CONT");
    let _: String = cluster
        .cmd(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"])
        .await;
    let slot = RedisCluster::slot_of("sb:inbox:{bob}");
    let promoted = cluster.wait_failover(slot, Duration::from_secs(20)).await;
    assert_eq!(promoted, replica);

    // Bob's inbox as the new master has it: the confirmed DM only.
    let mut bob = Client::connect_user(&home, "bob").await;
    let first = bob.recv_type("dm").await;
    assert_eq!(first["body"]["text"], confirmed, "{first}");
    // A DM sent now travels after anything left in the backlog.
    let after = unique("after-failover");
    let ack = carol.request(dm("bob", &after, 4)).await;
    assert_eq!(ack["stored"], true, "{ack}");
    let next = bob.recv_type("dm").await;
    println!(
        "after the failover bob got {:?} next; lost: the DM acked as stored without \
         --redis-wait-replicas ({acked_but_lost}) and the one answered timeout ({unconfirmed})",
        next["body"]["text"]
    );
    assert_eq!(
        next["body"]["text"], after,
        "the write acked without WAIT did not survive the failover: {next}"
    );

    // The promoted node has no replica now: nothing can confirm a DM, and
    // the waiting instance says so instead of acking it as stored.
    let ack = alice.request(dm("bob", &unique("no-replica"), 5)).await;
    assert_eq!(ack["code"], "timeout", "{ack}");
    eventually(
        Duration::from_secs(10),
        "every instance ready again",
        || async { plain.http_status("/readyz").await == Some(200) },
    )
    .await;
}
