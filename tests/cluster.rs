//! Real Redis + three instances (i1, i2, i3).
//!
//! "Nothing else arrives" checks wait for a sentinel sent after the message
//! under test along the path a stray copy would take: one instance's bus
//! messages to another travel over one Redis connection, in order. A copy
//! for a user on the sender's own instance could also come back through
//! that instance's own subscription; there the sentinel comes from another
//! instance: Redis runs one command at a time and hands a PUBLISH to every
//! subscriber before answering it, so a publish sent after the sender's ack
//! reaches the subscriber after the one that was acked.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use switchboard_testkit::{eventually, opts, unique, Client, Instance, RedisServer, RECV_TIMEOUT};

const PERSONAL_RX: &str = r#"switchboard_bus_received_total{kind="personal"}"#;
const BROADCAST_RX: &str = r#"switchboard_bus_received_total{kind="broadcast"}"#;

/// Redis plus instances i1, i2, i3 in the given routing mode.
async fn cluster(routing: &str) -> (RedisServer, Vec<Instance>) {
    let redis = RedisServer::start().await;
    let (i1, i2, i3) = tokio::join!(
        Instance::spawn(opts!("i1").redis(&redis).routing(routing)),
        Instance::spawn(opts!("i2").redis(&redis).routing(routing)),
        Instance::spawn(opts!("i3").redis(&redis).routing(routing)),
    );
    (redis, vec![i1, i2, i3])
}

fn presence_key(user: &str) -> String {
    format!("sb:presence:{{{user}}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_dm_goes_only_to_the_recipients_instance() {
    let (redis, inst) = cluster("routed").await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;
    let mut carol = Client::connect_user(&inst[2], "carol").await;
    assert_eq!(bob.welcome["instance"], "i2");
    let spy = redis.spy("sb:*").await;

    let marker = unique("routed-dm");
    let body = json!({"text": marker, "nested": {"n": [1, 2.5, null, true]}, "emoji": "héllo ✓"});
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": body, "id": 1}))
        .await;
    assert_eq!(ack["type"], "ack", "reply to dm: {ack}");
    assert_eq!(ack["id"], 1, "ack must echo the integer id: {ack}");
    assert_eq!(ack["status"], "routed", "bob is online on i2: {ack}");
    assert!(
        ack["msg_id"].as_str().is_some_and(|s| !s.is_empty()),
        "ack msg_id: {ack}"
    );

    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["from"], "alice", "dm: {dm}");
    assert_eq!(dm["body"], body, "body must arrive intact: {dm}");
    assert_eq!(
        dm["msg_id"], ack["msg_id"],
        "dm and ack share the msg_id: {dm} / {ack}"
    );
    assert!(
        dm["ts"].is_i64() || dm["ts"].is_u64(),
        "ts must be unix ms: {dm}"
    );

    // Nothing else reaches bob or carol: alice's sentinel DMs travel from i1
    // as a stray copy would.
    let to_bob = alice.send_sentinel_dm("bob").await;
    let to_carol = alice.send_sentinel_dm("carol").await;
    bob.expect_nothing_before(&to_bob).await;
    carol.expect_nothing_before(&to_carol).await;

    // i1 publishes in order: once the spy saw the last sentinel, it saw
    // every publish of the DM.
    assert_eq!(
        spy.channels_of(&marker, &to_carol).await,
        vec!["sb:inst:{i2}"],
        "the DM must be published exactly once, on bob's instance channel"
    );
    assert_eq!(
        inst[2].metric(PERSONAL_RX).await,
        1.0,
        "i3's only personal bus message is the sentinel for carol: none for the DM to bob"
    );
    assert!(
        inst[1].metric(PERSONAL_RX).await >= 1.0,
        "i2 received the DM from the bus"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_mode_publishes_every_dm_on_sb_all() {
    let (redis, inst) = cluster("broadcast").await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;
    let mut carol = Client::connect_user(&inst[2], "carol").await;
    let spy = redis.spy("sb:*").await;
    let i3_before = inst[2].metric(BROADCAST_RX).await;

    let marker = unique("broadcast-dm");
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": {"m": marker}}))
        .await;
    assert_eq!(ack["type"], "ack", "reply to dm: {ack}");
    assert_eq!(ack["status"], "routed", "{ack}");

    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["from"], "alice");
    assert_eq!(dm["body"], json!({"m": marker}));
    // Exactly once for bob, not at all for carol: alice's sentinel DMs go
    // the same way, i1 -> sb:all -> every instance.
    let to_bob = alice.send_sentinel_dm("bob").await;
    let to_carol = alice.send_sentinel_dm("carol").await;
    bob.expect_nothing_before(&to_bob).await;
    carol.expect_nothing_before(&to_carol).await;

    assert_eq!(
        spy.channels_of(&marker, &to_carol).await,
        vec!["sb:all"],
        "broadcast mode publishes the DM once on sb:all only"
    );

    let i3 = &inst[2];
    eventually(
        RECV_TIMEOUT,
        "i3's broadcast received counter increases",
        || async { i3.metric(BROADCAST_RX).await > i3_before },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_to_user_nowhere_is_offline() {
    let (_redis, inst) = cluster("routed").await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let ack = alice
        .request(json!({"type": "dm", "to": "nobody", "body": "hi", "id": "x"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "x", "{ack}");
    assert_eq!(ack["status"], "offline", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_span_instances_and_subscribe_only_with_members() {
    let (redis, inst) = cluster("routed").await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;
    let mut carol = Client::connect_user(&inst[2], "carol").await;

    for c in [&mut alice, &mut bob] {
        let ack = c
            .request(json!({"type": "join", "room": "lobby", "id": 2}))
            .await;
        assert_eq!(ack, json!({"type": "ack", "id": 2, "status": "ok"}));
    }

    let ack = alice
        .request(json!({"type": "room", "room": "lobby", "body": {"hello": "room"}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["status"], "ok", "{ack}");

    let msg = bob.recv_type("room").await;
    assert_eq!(msg["room"], "lobby", "{msg}");
    assert_eq!(msg["from"], "alice", "{msg}");
    assert_eq!(msg["body"], json!({"hello": "room"}), "{msg}");
    assert!(msg["msg_id"].is_string(), "{msg}");
    // Not to carol (i3, not a member): alice's sentinel DM goes i1 -> i3 as
    // a stray copy would. Not back to alice: bob's sentinel reaches i1
    // through Redis after i1's own echo of the room message.
    let to_carol = alice.send_sentinel_dm("carol").await;
    carol.expect_nothing_before(&to_carol).await;
    let from_bob = bob.send_sentinel_room("lobby").await;
    alice.expect_nothing_before(&from_bob).await;

    assert_eq!(
        redis.numsub("sb:room:{lobby}").await,
        2,
        "i1 and i2 (and not i3) subscribe to the room channel"
    );

    let ack = bob.request(json!({"type": "leave", "room": "lobby"})).await;
    assert_eq!(ack["status"], "ok", "{ack}");
    eventually(
        RECV_TIMEOUT,
        "NUMSUB sb:room:{lobby} == 1 after bob left",
        || async { redis.numsub("sb:room:{lobby}").await == 1 },
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
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "not_member", "{err}");
    assert_eq!(err["id"], 9, "{err}");
    // The refused message did not reach alice: carol's sentinel DM takes
    // its path, i3 -> i1.
    let from_carol = carol.send_sentinel_dm("alice").await;
    alice.expect_nothing_before(&from_carol).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_device_user_gets_dm_on_every_connection() {
    let (redis, inst) = cluster("routed").await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob_i2 = Client::connect_user(&inst[1], "bob").await;
    let mut bob_i3 = Client::connect_user(&inst[2], "bob").await;
    assert_ne!(
        bob_i2.conn_id(),
        bob_i3.conn_id(),
        "connection ids are distinct"
    );

    let expected: HashMap<String, String> = [
        ("i2".to_string(), "1".to_string()),
        ("i3".to_string(), "1".to_string()),
    ]
    .into();
    assert_eq!(redis.hgetall(&presence_key("bob")).await, expected);

    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": "both"}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    // Right behind it, a sentinel: each device gets the DM exactly once.
    let sentinel = alice.send_sentinel_dm("bob").await;
    for bob in [&mut bob_i2, &mut bob_i3] {
        let dm = bob.recv_type("dm").await;
        assert_eq!(dm["from"], "alice");
        assert_eq!(dm["body"], "both");
        bob.expect_nothing_before(&sentinel).await;
    }

    bob_i3.close().await;
    let only_i2: HashMap<String, String> = [("i2".to_string(), "1".to_string())].into();
    eventually(
        RECV_TIMEOUT,
        "presence hash of bob is only {i2: 1}",
        || async { redis.hgetall(&presence_key("bob")).await == only_i2 },
    )
    .await;

    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": "one left"}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(bob_i2.recv_type("dm").await["body"], "one left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_connect_and_disconnect() {
    let (redis, inst) = cluster("routed").await;
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
        redis
            .smembers("sb:instance:{i2}:users")
            .await
            .contains(&"bob".to_string()),
        "bob is in i2's user set while connected"
    );

    // Abrupt disconnect (no Close frame).
    drop(bob);
    alice.await_presence("bob", false).await;
    eventually(RECV_TIMEOUT, "sb:presence:{bob} is gone", || async {
        redis.hgetall(&presence_key("bob")).await.is_empty()
    })
    .await;
    eventually(RECV_TIMEOUT, "bob left sb:instance:{i2}:users", || async {
        !redis
            .smembers("sb:instance:{i2}:users")
            .await
            .contains(&"bob".to_string())
    })
    .await;
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": 1}))
        .await;
    assert_eq!(ack["status"], "offline", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_dms_arrive_in_order() {
    const N: usize = 1000;
    let (_redis, inst) = cluster("routed").await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;

    let receiver = tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(N);
        for _ in 0..N {
            let dm = bob.recv_type("dm").await;
            assert_eq!(dm["from"], "alice", "{dm}");
            seqs.push(dm["body"]["seq"].as_u64().expect("seq in body"));
        }
        seqs
    });

    for n in 0..N {
        alice
            .send_json(&json!({"type": "dm", "to": "bob", "body": {"seq": n}, "id": n}))
            .await;
    }
    let mut acked = Vec::with_capacity(N);
    for _ in 0..N {
        let ack = alice.recv_type("ack").await;
        assert_eq!(ack["status"], "routed", "{ack}");
        acked.push(ack["id"].as_u64().expect("integer ack id"));
    }
    acked.sort_unstable();
    assert_eq!(acked, (0..N as u64).collect::<Vec<_>>(), "one ack per DM");

    let seqs = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .expect("bob received 1000 DMs in time")
        .expect("receiver task");
    assert_eq!(
        seqs,
        (0..N as u64).collect::<Vec<_>>(),
        "DMs arrive complete and in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_lease_has_ttl_and_is_renewed() {
    let redis = RedisServer::start().await;
    let _i1 = Instance::spawn(opts!("i1").redis(&redis).lease_ms(1500)).await;

    let first = redis.pttl("sb:instance:{i1}").await;
    assert!(
        first > 0 && first <= 1500,
        "sb:instance:{{i1}} must exist with 0 < PTTL <= lease-ms (1500), got {first}"
    );
    // Renewal: the TTL goes up again at some point (and the key never vanishes).
    let prev = std::cell::Cell::new(first);
    eventually(
        Duration::from_secs(5),
        "the lease TTL is renewed",
        || async {
            let now = redis.pttl("sb:instance:{i1}").await;
            assert!(
                now > 0,
                "lease key disappeared or lost its TTL (PTTL {now})"
            );
            now > prev.replace(now)
        },
    )
    .await;
    let after = redis.pttl("sb:instance:{i1}").await;
    assert!(after <= 1500, "PTTL {after} exceeds lease-ms after renewal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_lease_is_ten_seconds() {
    let redis = RedisServer::start().await;
    let _i1 = Instance::spawn(opts!("i1").redis(&redis)).await;
    let pttl = redis.pttl("sb:instance:{i1}").await;
    assert!(
        pttl > 0 && pttl <= 10_000,
        "PTTL {pttl} must be in (0, 10000]"
    );
    assert_eq!(
        redis.numsub("sb:inst:{i1}").await,
        1,
        "i1 subscribes to its personal channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_prefix_is_honoured() {
    let redis = RedisServer::start().await;
    let i1 = Instance::spawn(opts!("i1").redis(&redis).redis_prefix("zz")).await;
    let _bob = Client::connect_user(&i1, "bob").await;
    let expected: HashMap<String, String> = [("i1".to_string(), "1".to_string())].into();
    assert_eq!(redis.hgetall("zz:presence:{bob}").await, expected);
    assert!(
        !redis.exists("sb:presence:{bob}").await,
        "default prefix must not be used"
    );
    assert!(
        redis.exists("zz:instance:{i1}").await,
        "lease key under the custom prefix"
    );
    assert_eq!(redis.numsub("zz:inst:{i1}").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_tracks_redis_availability() {
    let redis = RedisServer::start().await;
    let i1 = Instance::spawn(opts!("i1").redis(&redis)).await;
    assert_eq!(
        i1.http_get("/readyz").await.0,
        200,
        "ready while Redis is up"
    );
    drop(redis);
    eventually(
        Duration::from_secs(8),
        "/readyz is 503 once Redis is gone",
        || async { i1.http_get("/readyz").await.0 == 503 },
    )
    .await;
    assert_eq!(
        i1.http_get("/healthz").await.0,
        200,
        "liveness does not depend on Redis"
    );
}
