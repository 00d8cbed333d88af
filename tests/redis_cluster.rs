//! Switchboard over a real Redis Cluster (issue 12): three masters, real
//! instance processes started with `--redis-cluster`, real WebSocket
//! clients.
//!
//! - The cross-instance suite of `tests/cluster.rs` over the cluster: a
//!   routed DM (stored and ephemeral) reaches only the recipient's
//!   instance, rooms reach only member instances, multi-device, presence,
//!   a thousand DMs in order, offline DMs; and in routed mode no node ever
//!   runs a classic PUBLISH, while shard channels (SPUBLISH) carry the DMs;
//!   broadcast mode's `sb:all` is the one classic channel.
//! - Failover: the master serving the recipient instance's channel, then
//!   the one serving the recipient's presence, SIGKILLed while DMs flow (no
//!   client reconnects, `/readyz` 503 then 200, delivery within node
//!   timeout + 3 s, stored DMs all arrive); and a lone stored DM published
//!   into the dead node reaches its online recipient without a later one.
//! - Resharding: the slot of the recipient instance's channel, of the
//!   recipient's keys and of a room, moved to another master while DMs and
//!   room messages flow; and the user's slot in `--routing user-channel`.
//!
//! Each test has its own cluster (replicas only where failover is tested).
//! "Nothing else arrives" checks use sentinels as in `tests/cluster.rs`:
//! bus messages from one instance to another travel over one connection to
//! the channel's node, in order, and stored DMs to one user reach every
//! instance in inbox order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_testkit::{
    all_ready, cmdstat_calls, eventually, opts, outcome, unique, Client, Incoming, Instance, Opts,
    ReadyzWatch, RedisCluster, Traffic, RECV_TIMEOUT,
};

const PERSONAL_RX: &str = r#"switchboard_bus_received_total{kind="personal"}"#;
const BROADCAST_RX: &str = r#"switchboard_bus_received_total{kind="broadcast"}"#;

/// Node timeout of the clusters without replicas: nothing fails over there,
/// so a long one keeps a loaded machine from marking a slow node failed.
const CALM_NODE_TIMEOUT_MS: u64 = 5000;
/// Node timeout of the failover test: a master is marked failed this long
/// after a ping it did not answer, and its replica elected 0.5–1 s later,
/// so Redis alone takes about 1.5 × this + 1 s (measured 2.2–2.5 s at 1000
/// ms; 3.8–4.8 s at 2000, too close to the 5 s bound of node timeout + 3 s).
const FAILOVER_NODE_TIMEOUT_MS: u64 = 1000;
/// Lease of the failover tests' instances. The heartbeat (which PINGs every
/// master: the only thing that turns `/readyz` to 503 when a master dies
/// that the instance's subscriber had no connection to) runs every third of
/// it, 1.67 s: shorter than the 2.2–2.8 s outage, so one always falls in it.
/// And i2's lease lives in the slot of `sb:inst:{i2}`, on the killed master:
/// refreshed at most 1.67 s before the kill, it outlives the outage (it
/// expires at the earliest 3.3 s after the kill; after a failed heartbeat
/// the next comes within 200 ms).
const FAILOVER_LEASE_MS: u64 = 5000;

/// The tests with time bounds (failover, resharding) take this exclusively;
/// the others share it. Two shared cores: a thousand DMs next to a 5-second
/// failover bound would measure the machine, not the server.
static SERIAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A 3-master cluster (`replicas` per master) and instances `ids` on it.
async fn deployment(
    replicas: usize,
    node_timeout_ms: u64,
    routing: &str,
    ids: &[&str],
) -> (RedisCluster, Vec<Instance>) {
    deployment_with(replicas, node_timeout_ms, ids, |o| o.routing(routing)).await
}

/// [`deployment`], each instance's options passed through `tweak`.
async fn deployment_with(
    replicas: usize,
    node_timeout_ms: u64,
    ids: &[&str],
    tweak: impl Fn(Opts) -> Opts,
) -> (RedisCluster, Vec<Instance>) {
    let started = Instant::now();
    let cluster = RedisCluster::start(3, replicas, node_timeout_ms).await;
    let formed = started.elapsed();
    let spawns = ids
        .iter()
        .map(|id| Instance::spawn(tweak(opts!(*id).redis_cluster(&cluster))));
    let instances = futures_util::future::join_all(spawns).await;
    eprintln!(
        "cluster of {} nodes formed in {formed:?}; {} instances healthy after {:?}",
        cluster.ports().len(),
        ids.len(),
        started.elapsed()
    );
    (cluster, instances)
}

fn presence_key(user: &str) -> String {
    format!("sb:presence:{{{user}}}")
}

fn personal_channel(instance: &str) -> String {
    format!("sb:inst:{{{instance}}}")
}

fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every live node's `INFO commandstats` calls of `command`, by port (0
/// where Redis has no line for it: never called).
async fn calls_everywhere(cluster: &RedisCluster, command: &str) -> BTreeMap<u16, u64> {
    cluster
        .info_all("commandstats")
        .await
        .into_iter()
        .map(|(port, info)| (port, cmdstat_calls(&info, command).unwrap_or(0)))
        .collect()
}

// ---------------------------------------------------------------------------
// The cross-instance suite over the cluster
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_dms_reach_only_the_recipients_instance_over_shard_channels() {
    let _serial = SERIAL.read().await;
    let (cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2", "i3"]).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;
    let mut carol = Client::connect_user(&inst[2], "carol").await;
    assert_eq!(bob.welcome["instance"], "i2");
    for id in ["i1", "i2", "i3"] {
        assert_eq!(
            cluster.shard_numsub(&personal_channel(id)).await,
            1,
            "{id} holds a shard subscription to its personal channel on the channel's master"
        );
    }

    // Stored (the default).
    let body = json!({"text": unique("stored"), "nested": {"n": [1, 2.5, null, true]}, "emoji": "héllo ✓"});
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": body, "id": 1}))
        .await;
    assert_eq!(ack["type"], "ack", "reply to dm: {ack}");
    assert_eq!(ack["id"], 1, "{ack}");
    assert_eq!(ack["status"], "routed", "bob is online on i2: {ack}");
    assert_eq!(ack["stored"], true, "{ack}");
    let seq = ack["seq"].as_str().expect("a stored DM's ack has a seq");
    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["from"], "alice", "{dm}");
    assert_eq!(dm["body"], body, "the body arrives intact: {dm}");
    assert_eq!(dm["seq"], seq, "{dm} / {ack}");
    assert_eq!(dm["msg_id"], ack["msg_id"], "{dm} / {ack}");

    // Ephemeral.
    let body = json!({"typing": unique("ephemeral")});
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": body, "store": false, "id": 2}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert!(
        ack.get("seq").is_none(),
        "an ephemeral DM has no seq: {ack}"
    );
    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["body"], body, "{dm}");
    assert!(dm.get("seq").is_none(), "{dm}");

    // And back, ephemeral then stored, from i2 to i1.
    for store in [false, true] {
        let body = json!({"reply": unique("back"), "store": store});
        let ack = bob
            .request(json!({"type": "dm", "to": "alice", "body": body, "store": store}))
            .await;
        assert_eq!(ack["status"], "routed", "{ack}");
        assert_eq!(alice.recv_type("dm").await["body"], body);
    }

    // Nothing else reaches bob or carol: sentinels from i1 travel as a
    // stray copy would (and an ephemeral one the ephemeral path).
    let to_bob = alice.send_sentinel_dm("bob").await;
    let to_carol = alice.send_sentinel_dm("carol").await;
    bob.expect_nothing_before(&to_bob).await;
    carol.expect_nothing_before(&to_carol).await;
    assert_eq!(
        inst[2].metric(PERSONAL_RX).await,
        1.0,
        "i3's only personal bus message is the sentinel for carol"
    );
    assert!(inst[1].metric(PERSONAL_RX).await >= 3.0, "i2 got bob's DMs");

    // Routed mode never runs a classic PUBLISH (which every node of a
    // cluster forwards to every other); the shard channels carry it all.
    let publish = calls_everywhere(&cluster, "publish").await;
    let spublish = calls_everywhere(&cluster, "spublish").await;
    eprintln!("cmdstat calls per node: publish {publish:?}, spublish {spublish:?}");
    assert!(
        publish.values().all(|&n| n == 0),
        "no node may see a PUBLISH in routed mode: {publish:?}"
    );
    assert!(
        spublish.values().sum::<u64>() >= 5,
        "the DMs went over SPUBLISH: {spublish:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_span_instances_and_shard_subscribe_only_with_members() {
    let _serial = SERIAL.read().await;
    let (cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2", "i3"]).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;
    let mut carol = Client::connect_user(&inst[2], "carol").await;
    let room_channel = "sb:room:{lobby}";

    for c in [&mut alice, &mut bob] {
        let ack = c
            .request(json!({"type": "join", "room": "lobby", "id": 2}))
            .await;
        assert_eq!(ack["status"], "ok", "{ack}");
    }
    assert_eq!(
        cluster.shard_numsub(room_channel).await,
        2,
        "i1 and i2 (not i3) hold a shard subscription to the room"
    );

    let ack = alice
        .request(json!({"type": "room", "room": "lobby", "body": {"hello": "room"}}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    let msg = bob.recv_type("room").await;
    assert_eq!(msg["room"], "lobby", "{msg}");
    assert_eq!(msg["from"], "alice", "{msg}");
    assert_eq!(msg["body"], json!({"hello": "room"}), "{msg}");
    let to_carol = alice.send_sentinel_dm("carol").await;
    carol.expect_nothing_before(&to_carol).await;
    // Not twice to bob, not back to alice: the other side's sentinel room
    // message travels the same room channel after it.
    let from_alice = alice.send_sentinel_room("lobby").await;
    bob.expect_nothing_before(&from_alice).await;
    let from_bob = bob.send_sentinel_room("lobby").await;
    alice.expect_nothing_before(&from_bob).await;
    assert_eq!(
        inst[2]
            .metric(r#"switchboard_bus_received_total{kind="room"}"#)
            .await,
        0.0,
        "i3 has no member: it received no room message"
    );

    let ack = bob.request(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(ack["status"], "ok", "{ack}");
    eventually(
        RECV_TIMEOUT,
        "SHARDNUMSUB sb:room:{lobby} == 1 after bob left",
        || async { cluster.shard_numsub(room_channel).await == 1 },
    )
    .await;
    let ack = alice
        .request(json!({"type": "room", "room": "lobby", "body": "after leave"}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    let to_bob = alice.send_sentinel_dm("bob").await;
    bob.expect_nothing_before(&to_bob).await;

    let err = carol
        .request(json!({"type": "room", "room": "lobby", "body": "intruder", "id": 9}))
        .await;
    assert_eq!(err["code"], "not_member", "{err}");
    let publish = calls_everywhere(&cluster, "publish").await;
    assert!(
        publish.values().all(|&n| n == 0),
        "room messages go over shard channels too: {publish:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_device_user_gets_dms_on_every_connection() {
    let _serial = SERIAL.read().await;
    let (cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2", "i3"]).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob_i2 = Client::connect_user(&inst[1], "bob").await;
    let mut bob_i3 = Client::connect_user(&inst[2], "bob").await;
    assert_eq!(
        cluster.hgetall(&presence_key("bob")).await,
        fields(&[("i2", "1"), ("i3", "1")])
    );

    for store in [true, false] {
        let body = json!({"both": unique("both"), "store": store});
        let ack = alice
            .request(json!({"type": "dm", "to": "bob", "body": body, "store": store}))
            .await;
        assert_eq!(ack["status"], "routed", "{ack}");
        let sentinel = alice.send_sentinel_dm("bob").await;
        for bob in [&mut bob_i2, &mut bob_i3] {
            let dm = bob.recv_type("dm").await;
            assert_eq!(dm["body"], body, "{dm}");
            bob.expect_nothing_before(&sentinel).await;
        }
    }

    bob_i3.close().await;
    eventually(RECV_TIMEOUT, "presence of bob is only {i2: 1}", || async {
        cluster.hgetall(&presence_key("bob")).await == fields(&[("i2", "1")])
    })
    .await;
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": "one left"}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(bob_i2.recv_type("dm").await["body"], "one left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_connect_and_disconnect() {
    let _serial = SERIAL.read().await;
    let (cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2"]).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let bob = Client::connect_user(&inst[1], "bob").await;

    let reply = alice
        .request(json!({"type": "presence", "users": ["bob", "carol"], "id": 3}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "presence", "id": 3, "online": {"bob": true, "carol": false}})
    );
    assert!(
        cluster
            .smembers("sb:instance:{i2}:users")
            .await
            .contains(&"bob".to_string()),
        "bob is in i2's user set while connected"
    );
    assert!(cluster.exists("sb:instance:{i2}").await, "i2's lease");

    drop(bob);
    alice.await_presence("bob", false).await;
    eventually(RECV_TIMEOUT, "sb:presence:{bob} is gone", || async {
        cluster.hgetall(&presence_key("bob")).await.is_empty()
    })
    .await;
    eventually(RECV_TIMEOUT, "bob left sb:instance:{i2}:users", || async {
        !cluster
            .smembers("sb:instance:{i2}:users")
            .await
            .contains(&"bob".to_string())
    })
    .await;
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": 1, "store": false}))
        .await;
    assert_eq!(ack["status"], "offline", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_dms_are_stored_and_delivered_on_the_next_connect() {
    let _serial = SERIAL.read().await;
    let (_cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2"]).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;

    // Never seen: nothing is stored.
    let ack = alice
        .request(json!({"type": "dm", "to": "nobody", "body": "hi", "id": "x"}))
        .await;
    assert_eq!(ack["id"], "x", "{ack}");
    assert_eq!(ack["status"], "offline", "{ack}");
    assert_eq!(ack["stored"], false, "{ack}");

    // Seen, then gone: stored, delivered on the next connect (elsewhere).
    let bob = Client::connect_user(&inst[1], "bob").await;
    drop(bob);
    alice.await_presence("bob", false).await;
    let mut seqs = Vec::new();
    for n in 0..3 {
        let ack = alice
            .request(json!({"type": "dm", "to": "bob", "body": {"n": n}}))
            .await;
        assert_eq!(ack["status"], "offline", "{ack}");
        assert_eq!(ack["stored"], true, "{ack}");
        seqs.push(ack["seq"].clone());
    }
    let mut bob = Client::connect_user(&inst[0], "bob").await;
    for (n, seq) in seqs.iter().enumerate() {
        let dm = bob.recv_type("dm").await;
        assert_eq!(dm["body"]["n"], n, "replayed in order: {dm}");
        assert_eq!(&dm["seq"], seq, "{dm}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_dms_arrive_in_order_stored_and_ephemeral() {
    const STORED: usize = 1000;
    const EPHEMERAL: usize = 300;
    let _serial = SERIAL.read().await;
    let (_cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2"]).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;

    for (count, store) in [(STORED, true), (EPHEMERAL, false)] {
        let started = Instant::now();
        let receiver = tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(count);
            for _ in 0..count {
                let dm = bob.recv_type("dm").await;
                seqs.push(dm["body"]["n"].as_u64().expect("n in body"));
            }
            (bob, seqs)
        });
        for n in 0..count {
            alice
                .send_json(
                    &json!({"type": "dm", "to": "bob", "body": {"n": n}, "store": store, "id": n}),
                )
                .await;
        }
        let mut acked = Vec::with_capacity(count);
        for _ in 0..count {
            let ack = alice.recv_type("ack").await;
            assert_eq!(ack["status"], "routed", "{ack}");
            acked.push(ack["id"].as_u64().expect("integer ack id"));
        }
        acked.sort_unstable();
        assert_eq!(
            acked,
            (0..count as u64).collect::<Vec<_>>(),
            "one ack per DM"
        );
        let (back, seqs) = tokio::time::timeout(Duration::from_secs(60), receiver)
            .await
            .expect("bob received every DM in time")
            .expect("receiver task");
        bob = back;
        assert_eq!(
            seqs,
            (0..count as u64).collect::<Vec<_>>(),
            "{count} DMs (store: {store}) arrive complete and in order"
        );
        eprintln!(
            "{count} DMs (store: {store}) over the cluster in {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_mode_publishes_on_the_classic_sb_all_channel() {
    let _serial = SERIAL.read().await;
    let (cluster, inst) =
        deployment(0, CALM_NODE_TIMEOUT_MS, "broadcast", &["i1", "i2", "i3"]).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;
    let mut carol = Client::connect_user(&inst[2], "carol").await;
    assert_eq!(
        cluster.numsub("sb:all").await,
        3,
        "every instance subscribes to sb:all (classic)"
    );
    let i3_before = inst[2].metric(BROADCAST_RX).await;

    let body = json!({"m": unique("broadcast")});
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": body, "store": false}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(bob.recv_type("dm").await["body"], body);
    let to_carol = alice.send_sentinel_dm("carol").await;
    carol.expect_nothing_before(&to_carol).await;
    let i3 = &inst[2];
    eventually(RECV_TIMEOUT, "i3 received the broadcast", || async {
        i3.metric(BROADCAST_RX).await > i3_before
    })
    .await;
    let publish = calls_everywhere(&cluster, "publish").await;
    assert!(
        publish.values().sum::<u64>() >= 1,
        "broadcast mode uses PUBLISH sb:all: {publish:?}"
    );
}

/// A user name whose slot's master differs from `avoid`'s (so that two
/// faults hit two different shards).
async fn user_on_another_master(cluster: &RedisCluster, base: &str, avoid: &str) -> String {
    let avoid_master = cluster.master_of(avoid).await;
    for k in 0..100 {
        let user = if k == 0 {
            base.to_string()
        } else {
            format!("{base}{k}")
        };
        if cluster.master_of(&presence_key(&user)).await != avoid_master {
            return user;
        }
    }
    panic!("no name {base}N on another master than {avoid}'s");
}

// ---------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_under_dm_traffic_without_client_reconnects() {
    let _serial = SERIAL.write().await;
    let (mut cluster, inst) = deployment_with(1, FAILOVER_NODE_TIMEOUT_MS, &["i1", "i2"], |o| {
        o.lease_ms(FAILOVER_LEASE_MS)
    })
    .await;
    let node_timeout = cluster.node_timeout();
    let bound = node_timeout + Duration::from_secs(3);
    let channel = personal_channel("i2");
    let bob = user_on_another_master(&cluster, "bob", &channel).await;
    let alice = Client::connect_user(&inst[0], "alice").await;
    let recipient = Client::connect_user(&inst[1], &bob).await;
    let conns = (alice.conn_id(), recipient.conn_id());
    all_ready(&inst).await;
    let readyz = ReadyzWatch::start(inst.iter().map(Instance::addr).collect());
    let traffic = Traffic::start(alice, recipient, &bob);
    let flowing = Instant::now();
    traffic
        .await_delivery_sent_after(flowing, RECV_TIMEOUT, "DMs flow before any fault")
        .await;

    // 1. The master of i2's personal channel (also its lease's slot).
    let slot = RedisCluster::slot_of(&channel);
    let killed = cluster.kill_master_of(&channel).await;
    let kill1 = Instant::now();
    let promoted = cluster.wait_failover(slot, Duration::from_secs(20)).await;
    let failover1 = kill1.elapsed();
    let delivered1 = traffic
        .await_delivery_sent_after(
            kill1,
            bound + RECV_TIMEOUT,
            "after killing i2's channel master",
        )
        .await
        - kill1;
    readyz.await_all_ready(Duration::from_secs(15)).await;
    let ready1 = kill1.elapsed();
    let saw_503_1 =
        (0..inst.len()).find_map(|i| readyz.saw_after(i, 503, kill1).map(|at| (i, at - kill1)));
    // Bob's inbox was not on the killed master: every stored DM arrives,
    // from pub/sub or, for those published into the dead node, the inbox.
    traffic
        .await_stored_delivered(&HashSet::new(), Duration::from_secs(10))
        .await;
    eprintln!(
        "failover 1 (sb:inst:{{i2}}, slot {slot}): master {killed} killed, {promoted} promoted after {failover1:?}; \
         first DM sent after the kill delivered {delivered1:?} after it; /readyz 503 seen: {saw_503_1:?}; \
         all ready after {ready1:?}"
    );

    // 2. The master of the recipient's presence, inbox and mailbox.
    let key = presence_key(&bob);
    let slot = RedisCluster::slot_of(&key);
    let killed = cluster.kill_master_of(&key).await;
    let kill2 = Instant::now();
    let promoted = cluster.wait_failover(slot, Duration::from_secs(20)).await;
    let failover2 = kill2.elapsed();
    let delivered2 = traffic
        .await_delivery_sent_after(
            kill2,
            bound + RECV_TIMEOUT,
            "after killing the recipient's presence master",
        )
        .await
        - kill2;
    readyz.await_all_ready(Duration::from_secs(15)).await;
    let ready2 = kill2.elapsed();
    let saw_503_2 =
        (0..inst.len()).find_map(|i| readyz.saw_after(i, 503, kill2).map(|at| (i, at - kill2)));
    // Asynchronous replication: a DM the dead master stored (and acked)
    // in its last moments may never have reached the replica; if pub/sub
    // did not deliver it either, it is gone. Only those are excused.
    let last_moments = traffic.stored_between(kill2 - Duration::from_secs(1), kill2);
    let lost = traffic
        .await_stored_delivered(&last_moments, Duration::from_secs(10))
        .await;
    eprintln!(
        "failover 2 ({key}, slot {slot}): master {killed} killed, {promoted} promoted after {failover2:?}; \
         first DM sent after the kill delivered {delivered2:?} after it; /readyz 503 seen: {saw_503_2:?}; \
         all ready after {ready2:?}; stored DMs lost to asynchronous replication: {lost:?}"
    );
    eprintln!(
        "send outcomes (ms since the first kill): {:?}",
        traffic.outcome_runs(kill1)
    );

    let (alice, recipient, _, received) = traffic.stop().await;
    readyz.stop().await;
    assert_eq!(
        (alice.conn_id(), recipient.conn_id()),
        conns,
        "no client reconnected"
    );
    eprintln!(
        "{} DMs received; other frames: {:?}",
        received.dms.len(),
        received.other
    );
    assert!(
        delivered1 <= bound,
        "after killing i2's channel master, a DM sent after the kill took {delivered1:?} (bound {bound:?})"
    );
    assert!(
        delivered2 <= bound,
        "after killing the presence master, a DM sent after the kill took {delivered2:?} (bound {bound:?})"
    );
    assert!(
        saw_503_1.is_some(),
        "/readyz never said 503 while i2's channel master was down"
    );
    assert!(
        saw_503_2.is_some(),
        "/readyz never said 503 while the presence master was down"
    );
}

/// A stored DM whose only publish went into the dead node of the
/// recipient's instance channel, with nothing sent after it: the inbox has
/// it and the recipient stays online, so it must reach him once the
/// channel has a node again — not only when a later DM reveals the hole,
/// or at his next connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_stored_dm_published_during_a_failover_reaches_the_online_recipient() {
    let _serial = SERIAL.write().await;
    let (mut cluster, inst) = deployment_with(1, FAILOVER_NODE_TIMEOUT_MS, &["i1", "i2"], |o| {
        o.lease_ms(FAILOVER_LEASE_MS)
    })
    .await;
    let channel = personal_channel("i2");
    let dave = user_on_another_master(&cluster, "dave", &channel).await;
    let mut carol = Client::connect_user(&inst[0], "carol").await;
    let mut dave_conn = Client::connect_user(&inst[1], &dave).await;
    let conn = dave_conn.conn_id();
    all_ready(&inst).await;
    let first = carol
        .request(json!({"type": "dm", "to": dave, "body": {"m": "before"}}))
        .await;
    assert_eq!(outcome(&first), "ack:routed", "{first}");
    assert_eq!(dave_conn.recv_type("dm").await["body"]["m"], "before");

    let slot = RedisCluster::slot_of(&channel);
    cluster.kill_master_of(&channel).await;
    let killed = Instant::now();
    // Dave's keys are on a live master: the DM is stored; its publish to
    // i2's channel finds no node.
    let marker = unique("lone");
    let ack = loop {
        let reply = carol
            .request(json!({"type": "dm", "to": dave, "body": {"m": marker}}))
            .await;
        if reply["stored"] == true {
            break reply;
        }
        assert!(
            killed.elapsed() < RECV_TIMEOUT,
            "a DM to dave (keys on a live master) was never stored: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stored_after = killed.elapsed();
    cluster.wait_failover(slot, Duration::from_secs(20)).await;
    let failover = killed.elapsed();
    all_ready(&inst).await;
    let ready = killed.elapsed();
    let delivered = loop {
        match dave_conn.next_event(Duration::from_millis(100)).await {
            Incoming::Json(frame) if frame["body"]["m"] == marker.as_str() => {
                break Some(killed.elapsed())
            }
            Incoming::Json(_) | Incoming::Timeout => {}
            other => panic!("dave's connection ended: {other:?}"),
        }
        if killed.elapsed() > ready + RECV_TIMEOUT {
            break None;
        }
    };
    eprintln!(
        "lone stored DM: stored {stored_after:?} after the kill, acked {}; failover after \
         {failover:?}, /readyz 200 after {ready:?}; delivered after {delivered:?}",
        outcome(&ack)
    );
    assert_eq!(dave_conn.conn_id(), conn, "dave did not reconnect");
    assert!(
        delivered.is_some(),
        "a stored DM (acked {ack}) to dave, online on i2 throughout, published while i2's \
         channel had no node, was not delivered within {RECV_TIMEOUT:?} of /readyz being 200 \
         again: with no later DM to dave, nothing made i2 read his inbox"
    );
}

// ---------------------------------------------------------------------------
// Resharding
// ---------------------------------------------------------------------------

/// Keys put in a slot before it moves, so that the migration (10 keys per
/// `MIGRATE`) takes a few hundred milliseconds and messages meet the slot
/// half-moved (`ASK`; `TRYAGAIN` for a script whose keys are split).
const FILLER_KEYS: usize = 3000;

/// Longest a slot move may stall delivery.
const MOVE_BOUND: Duration = Duration::from_secs(3);

/// Moves the slot of hash tag `tag` (first filled with [`FILLER_KEYS`]) to
/// another master while `traffic` flows; asserts that delivery goes on
/// (largest gap between deliveries from the start of the move until 25
/// messages sent after it arrived: at most [`MOVE_BOUND`]).
async fn move_under_traffic(cluster: &RedisCluster, traffic: &Traffic, what: &str, tag: &str) {
    let filler: Vec<String> = (0..FILLER_KEYS)
        .map(|k| format!("test:filler:{{{tag}}}:{k}"))
        .collect();
    let mut mset = vec!["MSET"];
    for key in &filler {
        mset.extend([key.as_str(), "x"]);
    }
    let _: () = cluster.cmd_for_key(&filler[0], &mset).await;
    traffic
        .await_deliveries_sent_after(Instant::now(), 10, RECV_TIMEOUT, "traffic before the move")
        .await;

    let slot = RedisCluster::slot_of(&filler[0]);
    let from = cluster.master_of_slot(slot).await;
    let masters = cluster.masters().await;
    let to = *masters
        .iter()
        .find(|&&p| p != from)
        .expect("another master");
    let started = Instant::now();
    let keys = cluster.move_slot_in_batches(slot, to, 10).await;
    let took = started.elapsed();
    let moved = Instant::now();
    traffic
        .await_deliveries_sent_after(moved, 25, MOVE_BOUND + RECV_TIMEOUT, what)
        .await;
    let gap = traffic.largest_delivery_gap_after(started);
    let resumed = traffic
        .first_delivery_sent_after(moved)
        .map(|(_, at)| at - moved);
    eprintln!(
        "moved slot {slot} ({what}, {keys} keys) {from} -> {to} at +{:?} in {took:?}; first \
         message sent after it delivered after {resumed:?}; largest gap between deliveries \
         since the move began: {gap:?}",
        started - traffic.started()
    );
    assert!(keys > FILLER_KEYS, "the slot's own keys moved too: {keys}");
    assert!(
        gap <= MOVE_BOUND,
        "delivery stalled for {gap:?} around the move of {what}"
    );
}

/// Stops `traffic` once every message acked as stored arrived; asserts that
/// every one was stored and acked (a slot move is no outage). Returns the
/// two clients.
async fn finish_traffic(traffic: Traffic, what: &str) -> (Client, Client) {
    finish_traffic_excusing(traffic, what, &HashSet::new()).await
}

/// [`finish_traffic`], not waiting for the messages in `excused`.
async fn finish_traffic_excusing(
    traffic: Traffic,
    what: &str,
    excused: &HashSet<u64>,
) -> (Client, Client) {
    traffic
        .await_stored_delivered(excused, Duration::from_secs(10))
        .await;
    let runs = traffic.outcome_runs(traffic.started());
    let (sender, recipient, sent, received) = traffic.stop().await;
    eprintln!(
        "{what}: {} sent, {} received; outcomes (ms since traffic began): {runs:?}",
        sent.len(),
        received.dms.len()
    );
    let refused: Vec<String> = sent
        .iter()
        .filter(|s| !s.stored)
        .map(|s| format!("{}:{}", s.n, s.outcome))
        .collect();
    assert!(
        refused.is_empty(),
        "every one of the {what} is stored and acked during a slot move; these were not: \
         {refused:?}"
    );
    (sender, recipient)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_dm_traffic_loses_nothing() {
    let _serial = SERIAL.write().await;
    let (cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2"]).await;
    let channel = personal_channel("i2");
    let bob = user_on_another_master(&cluster, "bob", &channel).await;
    let alice = Client::connect_user(&inst[0], "alice").await;
    let recipient = Client::connect_user(&inst[1], &bob).await;
    let conns = [alice.conn_id(), recipient.conn_id()];
    all_ready(&inst).await;
    let dms = Traffic::start(alice, recipient, &bob);

    // The instance channel's slot (with i2's lease and user set), then the
    // recipient's (presence, inbox, mailbox), each to another master. (A
    // DM whose publish meets i2 between the old owner's `sunsubscribe` and
    // its new SSUBSCRIBE is acked `offline` though the recipient is
    // online; the inbox catch-up delivers it.)
    move_under_traffic(&cluster, &dms, "sb:inst:{i2}", "i2").await;
    move_under_traffic(&cluster, &dms, "the recipient's keys", &bob).await;
    eventually(
        RECV_TIMEOUT,
        "i2 holds its personal channel's shard subscription on the new owner",
        || async { cluster.shard_numsub(&channel).await == 1 },
    )
    .await;
    let (alice, recipient) = finish_traffic(dms, "DMs").await;
    assert_eq!(
        [alice.conn_id(), recipient.conn_id()],
        conns,
        "no client reconnected"
    );
    assert_eq!(
        cluster.hgetall(&presence_key(&bob)).await,
        fields(&[("i2", "1")]),
        "the recipient's presence moved with its slot"
    );
}

/// Room messages have no inbox: they are at-most-once, like pub/sub. What a
/// slot move may cost them is bounded here: a message published between the
/// moment one member instance took its subscription on the new owner and
/// the moment the other did reaches the first only (it reached someone, so
/// it is not published again). At most one per move is allowed; before the
/// republish of unheard script publishes, whole runs were lost (dozens of
/// messages per move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_a_room_under_room_traffic_loses_at_most_the_resubscription_moment() {
    let _serial = SERIAL.write().await;
    let (cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "routed", &["i1", "i2"]).await;
    let room_channel = "sb:room:{lobby}";
    let mut carol = Client::connect_user(&inst[0], "carol").await;
    let mut dave = Client::connect_user(&inst[1], "dave").await;
    for member in [&mut carol, &mut dave] {
        let ack = member
            .request(json!({"type": "join", "room": "lobby"}))
            .await;
        assert_eq!(outcome(&ack), "ack:ok", "{ack}");
    }
    let conns = [carol.conn_id(), dave.conn_id()];
    all_ready(&inst).await;
    let rooms = Traffic::start_room(carol, dave, "lobby");

    // The room's slot (its channel and history) to another master, three
    // times: each time both member instances lose their shard subscription
    // on the old owner (`sunsubscribe`) and take it again on the new one.
    for _ in 0..3 {
        move_under_traffic(&cluster, &rooms, room_channel, "lobby").await;
    }
    eventually(
        RECV_TIMEOUT,
        "i1 and i2 hold the room's shard subscription on the new owner",
        || async { cluster.shard_numsub(room_channel).await == 2 },
    )
    .await;
    // Not yet arrived, of all acked so far; those in flight arrive within
    // milliseconds, the lost ones never.
    let every: HashSet<u64> = (0..100_000).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lost = loop {
        let missing = rooms
            .await_stored_delivered(&every, Duration::from_secs(10))
            .await;
        if missing.len() <= 3 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("room messages lost to the slot moves: {lost:?}");
    assert!(
        lost.len() <= 3,
        "at most one room message per move may be lost (3 moves), lost {lost:?}"
    );
    let excused: HashSet<u64> = lost.into_iter().collect();
    let (carol, dave) = finish_traffic_excusing(rooms, "room messages", &excused).await;
    assert_eq!(
        [carol.conn_id(), dave.conn_id()],
        conns,
        "no client reconnected"
    );
}

/// `--routing user-channel`: the append script publishes a stored DM on
/// `sb:user:{USER}`, in the user's own slot; moving that slot while DMs
/// flow must lose none of them either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_in_user_channel_mode_loses_nothing() {
    let _serial = SERIAL.write().await;
    let (cluster, inst) = deployment(0, CALM_NODE_TIMEOUT_MS, "user-channel", &["i1", "i2"]).await;
    let alice = Client::connect_user(&inst[0], "alice").await;
    let bob = Client::connect_user(&inst[1], "bob").await;
    let conns = [alice.conn_id(), bob.conn_id()];
    all_ready(&inst).await;
    let dms = Traffic::start(alice, bob, "bob");
    for _ in 0..3 {
        move_under_traffic(&cluster, &dms, "sb:user:{bob} and bob's keys", "bob").await;
    }
    let (alice, bob) = finish_traffic(dms, "DMs").await;
    assert_eq!(
        [alice.conn_id(), bob.conn_id()],
        conns,
        "no client reconnected"
    );
}
