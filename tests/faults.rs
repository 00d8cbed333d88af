//! Fault injection (issue #4): crashed, frozen and restarted instances, a
//! Redis that dies and comes back empty, dropped subscriptions, reconnect
//! races, a rolling restart under load and a slow consumer.
//!
//! Real redis-server, real instance processes, real WebSocket clients. Leases
//! are short (`LEASE_MS`) so expiry and reaping happen within a second or two;
//! every wait is bounded and polls for the observable effect.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchboard_testkit::{
    opts, unique, ws_request_at, Client, Incoming, Instance, Opts, RedisProxy, RedisServer,
    RECV_TIMEOUT,
};

/// Lease TTL of every instance here: refreshed (and dead peers reaped) every
/// third of it.
const LEASE_MS: u64 = 1000;
const LEASE: Duration = Duration::from_millis(LEASE_MS);

const REAPED: &str = "switchboard_reaped_instances_total";
const PROBE_FAILURES: &str = "switchboard_probe_failures_total";
const RESYNCS: &str = "switchboard_presence_resyncs_total";
const STALE: &str = "switchboard_stale_presence_total";
const SLOW_DROPS: &str = r#"switchboard_dropped_total{reason="slow_consumer"}"#;
const CONNECTIONS: &str = "switchboard_connections";

/// The tests with latency or recovery-time bounds (Redis restart, rolling
/// restart, slow consumer) take this exclusively; the others share it. Two
/// shared cores: a load test next to a 2-second bound would make it flaky.
static SERIAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Instance `id` on `redis` with the short lease of these tests.
fn short_lease_opts(id: &str, redis: &RedisServer) -> Opts {
    opts!(id).redis(redis).lease_ms(LEASE_MS)
}

fn presence_key(user: &str) -> String {
    format!("sb:presence:{{{user}}}")
}

fn users_key(instance: &str) -> String {
    format!("sb:instance:{{{instance}}}:users")
}

fn lease_key(instance: &str) -> String {
    format!("sb:instance:{{{instance}}}")
}

fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A bounded wait: `check` panics with `what` and the last observation once
/// the time is up.
struct Deadline {
    at: Instant,
    timeout: Duration,
    what: String,
}

impl Deadline {
    fn after(timeout: Duration, what: impl Into<String>) -> Deadline {
        Deadline::at(Instant::now() + timeout, timeout, what)
    }

    fn at(at: Instant, timeout: Duration, what: impl Into<String>) -> Deadline {
        Deadline {
            at,
            timeout,
            what: what.into(),
        }
    }

    #[track_caller]
    fn check(&self, last: impl std::fmt::Display) {
        assert!(
            Instant::now() < self.at,
            "not reached within {:?}: {}; last observation: {last}",
            self.timeout,
            self.what
        );
    }

    fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

async fn pause() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// `ack:<status>` or `error:<code>` for a reply frame.
fn outcome(reply: &Value) -> String {
    match reply["type"].as_str() {
        Some("ack") => format!("ack:{}", reply["status"].as_str().unwrap_or("?")),
        Some("error") => format!("error:{}", reply["code"].as_str().unwrap_or("?")),
        _ => format!("unexpected:{reply}"),
    }
}

fn dm_frame(to: &str, marker: &str) -> Value {
    json!({"type": "dm", "to": to, "body": {"m": marker}})
}

fn room_frame(room: &str, marker: &str) -> Value {
    json!({"type": "room", "room": room, "body": {"m": marker}})
}

/// Reads `client`'s frames until a dm/room frame whose body marker is one of
/// `markers`; other frames are discarded. None when `timeout` passes first.
async fn wait_marker(client: &mut Client, markers: &[String], timeout: Duration) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Incoming::Json(frame) => {
                let marker = frame["body"]["m"].as_str().unwrap_or_default();
                if markers.iter().any(|m| m == marker) {
                    return Some(frame);
                }
            }
            Incoming::Timeout => return None,
            other => {
                panic!("the recipient's connection ended while waiting for {markers:?}: {other:?}")
            }
        }
    }
}

/// Sends DMs (to `to_user`) and then `lobby` room messages from `from`
/// until one of each reaches `to` (both sides are members of `lobby`).
async fn until_dm_and_room_flow(
    from: &mut Client,
    to: &mut Client,
    to_user: &str,
    deadline: &Deadline,
) {
    until_delivered(from, to, deadline, |m| dm_frame(to_user, m), "routed").await;
    until_delivered(from, to, deadline, |m| room_frame("lobby", m), "ok").await;
}

/// Sends `frame(marker)` with fresh markers from `sender` until one reaches
/// `recipient` (acked `ok_status`), by `deadline`. Returns the delivered frame.
async fn until_delivered(
    sender: &mut Client,
    recipient: &mut Client,
    deadline: &Deadline,
    frame: impl Fn(&str) -> Value,
    ok_status: &str,
) -> Value {
    let mut markers = Vec::new();
    loop {
        let marker = unique("probe");
        markers.push(marker.clone());
        let reply = sender.request(frame(&marker)).await;
        let last = format!("{} (reply {reply})", outcome(&reply));
        let wait = if outcome(&reply) == format!("ack:{ok_status}") {
            Duration::from_millis(250)
        } else {
            Duration::from_millis(50)
        };
        if let Some(got) = wait_marker(recipient, &markers, wait.min(deadline.left())).await {
            deadline.check(format!("delivered, but only after the deadline: {got}"));
            return got;
        }
        deadline.check(&last);
    }
}

/// Polls `GET path` until it answers `want`.
async fn await_status(instance: &Instance, path: &str, want: u16, deadline: &Deadline) {
    loop {
        let got = instance.http_status(path).await;
        if got == Some(want) {
            return;
        }
        deadline.check(format!(
            "GET {path} on {} -> {got:?}",
            instance.instance_id()
        ));
        pause().await;
    }
}

/// Waits until each instance in `ids` has refreshed its `sb:instances` score
/// `n` more times (i.e. ran `n` more maintenance rounds).
async fn await_heartbeats(redis: &RedisServer, ids: &[&str], n: usize) {
    let deadline = Deadline::after(
        LEASE * (n as u32 + 3),
        format!("{n} more heartbeats of {ids:?}"),
    );
    let mut last: Vec<Option<f64>> = Vec::new();
    for id in ids {
        last.push(redis.zscore("sb:instances", id).await);
    }
    let mut seen = vec![0usize; ids.len()];
    while seen.iter().any(|s| *s < n) {
        for (i, id) in ids.iter().enumerate() {
            let score = redis.zscore("sb:instances", id).await;
            if score.is_some() && score != last[i] {
                seen[i] += 1;
                last[i] = score;
            }
        }
        deadline.check(format!("heartbeats seen {seen:?}"));
        pause().await;
    }
}

/// Everything Redis holds about `instance` is gone.
async fn assert_instance_gone(redis: &RedisServer, instance: &str, why: &str) {
    assert!(
        !redis.exists(&lease_key(instance)).await,
        "{why}: lease {} must be gone",
        lease_key(instance)
    );
    assert!(
        !redis.exists(&users_key(instance)).await,
        "{why}: users set {} must be gone",
        users_key(instance)
    );
    assert_eq!(
        redis.zscore("sb:instances", instance).await,
        None,
        "{why}: {instance} must not be in sb:instances"
    );
}

async fn metric_sum(instances: &[&Instance], key: &str) -> f64 {
    let mut sum = 0.0;
    for instance in instances {
        sum += instance.metric(key).await;
    }
    sum
}

// ---------------------------------------------------------------------------
// 1. SIGKILL
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_instance_is_reaped_exactly_once_and_stays_dead() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let (i1, mut i2, i3) = tokio::join!(
        Instance::spawn(short_lease_opts("i1", &redis)),
        Instance::spawn(short_lease_opts("i2", &redis)),
        Instance::spawn(short_lease_opts("i3", &redis)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let bob = Client::connect_user(&i2, "bob").await;
    let _carol = Client::connect_user(&i3, "carol").await;
    // dave is multi-device: one connection on the doomed i2, one on i3.
    let _dave_i2 = Client::connect_user(&i2, "dave").await;
    let mut dave_i3 = Client::connect_user(&i3, "dave").await;
    assert_eq!(
        redis.hgetall(&presence_key("dave")).await,
        fields(&[("i2", "1"), ("i3", "1")])
    );
    let reply = alice.request(dm_frame("bob", "before")).await;
    assert_eq!(outcome(&reply), "ack:routed", "bob is on i2: {reply}");

    i2.sigkill();
    drop(bob);

    // Multi-device: dave's i2 entry is stale at once (nobody listens on
    // sb:inst:{i2}), but his i3 connection still gets the DM.
    let marker = unique("dave-after-kill");
    let reply = alice.request(dm_frame("dave", &marker)).await;
    assert_eq!(
        outcome(&reply),
        "ack:routed",
        "dave is still connected on i3: {reply}"
    );
    let got = wait_marker(&mut dave_i3, &[marker], Duration::from_secs(5)).await;
    assert!(
        got.is_some(),
        "dave@i3 must receive the DM sent after i2 died"
    );

    // bob was only on i2: his DMs answer offline (bounded by a few leases).
    let deadline = Deadline::after(LEASE * 5, "alice's DM to bob answers offline");
    loop {
        let reply = alice.request(dm_frame("bob", &unique("bob"))).await;
        if outcome(&reply) == "ack:offline" {
            break;
        }
        deadline.check(outcome(&reply));
        pause().await;
    }

    // i2 is reaped: lease gone (expired), index entry, users set and fields removed.
    let deadline = Deadline::after(
        LEASE * 5,
        "i2 reaped (gone from sb:instances, users set deleted)",
    );
    loop {
        let indexed = redis.zscore("sb:instances", "i2").await;
        let set = redis.exists(&users_key("i2")).await;
        if indexed.is_none() && !set {
            break;
        }
        deadline.check(format!("zscore {indexed:?}, users set exists {set}"));
        pause().await;
    }
    assert_instance_gone(&redis, "i2", "after the reap").await;
    assert!(
        redis.hgetall(&presence_key("bob")).await.is_empty(),
        "bob's presence hash must have no i2 field (nor any other)"
    );
    assert_eq!(
        redis.hgetall(&presence_key("dave")).await,
        fields(&[("i3", "1")]),
        "dave keeps only his i3 field"
    );
    assert!(!alice.is_online("bob").await, "presence query: bob offline");
    assert!(
        alice.is_online("dave").await,
        "presence query: dave online (i3)"
    );
    assert!(
        i1.metric(STALE).await >= 1.0,
        "i1 published to i2's channel after the crash and found no listener"
    );

    // Both survivors race for the reap on every round; let each run two
    // more rounds, then exactly one of them must have reaped i2.
    await_heartbeats(&redis, &["i1", "i3"], 2).await;
    assert_eq!(
        metric_sum(&[&i1, &i3], REAPED).await,
        1.0,
        "i2 must be reaped exactly once across the survivors (i1: {}, i3: {})",
        i1.metric(REAPED).await,
        i3.metric(REAPED).await
    );

    // A new process on i2's port, with a new id, does not bring i2 back.
    i2.respawn_same_port(short_lease_opts("i2b", &redis)).await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    assert_eq!(bob.welcome["instance"], "i2b", "{}", bob.welcome);
    await_heartbeats(&redis, &["i2b", "i1"], 2).await;
    assert_instance_gone(&redis, "i2", "after i2b started on i2's port").await;
    assert_eq!(
        redis.hgetall(&presence_key("bob")).await,
        fields(&[("i2b", "1")]),
        "bob's presence is only his new connection on i2b"
    );
    assert_eq!(
        redis.hgetall(&presence_key("dave")).await,
        fields(&[("i3", "1")]),
        "dave's dead i2 field must not come back"
    );
    let marker = unique("bob-on-i2b");
    let reply = alice.request(dm_frame("bob", &marker)).await;
    assert_eq!(outcome(&reply), "ack:routed", "{reply}");
    assert!(
        wait_marker(&mut bob, &[marker], Duration::from_secs(5))
            .await
            .is_some(),
        "bob@i2b receives alice's DM"
    );
    assert_eq!(
        metric_sum(&[&i1, &i2, &i3], REAPED).await,
        1.0,
        "nobody reaps anything else"
    );
}

// ---------------------------------------------------------------------------
// 2. SIGSTOP past the lease, then SIGCONT
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_instance_is_reaped_then_reasserts_its_presence_on_sigcont() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(short_lease_opts("i1", &redis)),
        Instance::spawn(short_lease_opts("i2", &redis)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    let bob_conn = bob.conn_id();
    let marker = unique("before-stop");
    let reply = alice.request(dm_frame("bob", &marker)).await;
    assert_eq!(outcome(&reply), "ack:routed", "{reply}");
    assert!(wait_marker(&mut bob, &[marker], Duration::from_secs(5))
        .await
        .is_some());
    let resyncs_before = i2.metric(RESYNCS).await;

    i2.sigstop();
    // While i2 is frozen, its lease expires and i1 reaps it; DMs to bob then
    // answer offline.
    let deadline = Deadline::after(LEASE * 5, "DM to frozen bob answers offline");
    loop {
        let reply = alice.request(dm_frame("bob", &unique("frozen"))).await;
        if outcome(&reply) == "ack:offline" {
            break;
        }
        deadline.check(outcome(&reply));
        pause().await;
    }
    let deadline = Deadline::after(LEASE * 5, "frozen i2 reaped by i1");
    loop {
        let indexed = redis.zscore("sb:instances", "i2").await;
        let bob_fields = redis.hgetall(&presence_key("bob")).await;
        if indexed.is_none() && bob_fields.is_empty() && !redis.exists(&users_key("i2")).await {
            break;
        }
        deadline.check(format!("zscore {indexed:?}, bob {bob_fields:?}"));
        pause().await;
    }
    assert_instance_gone(&redis, "i2", "while i2 is frozen").await;
    assert!(!alice.is_online("bob").await, "frozen bob is offline");
    assert_eq!(i1.metric(REAPED).await, 1.0, "i1 reaped i2 once");

    i2.sigcont();
    // i2 finds its lease gone and re-asserts bob's field; bob never reconnected.
    let deadline = Deadline::after(LEASE * 3, "i2 re-asserts bob's presence after SIGCONT");
    loop {
        let bob_fields = redis.hgetall(&presence_key("bob")).await;
        if bob_fields == fields(&[("i2", "1")]) {
            break;
        }
        deadline.check(format!("{bob_fields:?}"));
        pause().await;
    }
    assert!(redis.exists(&lease_key("i2")).await, "i2's lease is back");
    assert_eq!(
        redis.smembers(&users_key("i2")).await,
        vec!["bob".to_string()],
        "i2's users set is back"
    );
    assert!(
        i2.metric(RESYNCS).await > resyncs_before,
        "i2 counts a presence resync"
    );
    let deadline = Deadline::after(LEASE * 3, "alice's DM reaches bob again after SIGCONT");
    until_delivered(
        &mut alice,
        &mut bob,
        &deadline,
        |m| dm_frame("bob", m),
        "routed",
    )
    .await;
    assert_eq!(bob.conn_id(), bob_conn, "bob kept his connection");
    // Presence queries see i2 alive at i1's next refresh of the live
    // instances (a third of the lease); stored DMs are routed by Redis's
    // presence at once.
    alice.await_presence("bob", true).await;
    // And the other direction, from the thawed instance.
    let deadline = Deadline::after(LEASE * 3, "bob's DM reaches alice after SIGCONT");
    until_delivered(
        &mut bob,
        &mut alice,
        &deadline,
        |m| dm_frame("alice", m),
        "routed",
    )
    .await;
    let deadline = Deadline::after(LEASE * 3, "i2 ready again");
    await_status(&i2, "/readyz", 200, &deadline).await;
}

// ---------------------------------------------------------------------------
// 3. Redis SIGKILLed and restarted empty
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_and_empty_restart_recovers_without_client_reconnects() {
    let _exclusive = SERIAL.write().await;
    let mut redis = RedisServer::start().await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(short_lease_opts("i1", &redis)),
        Instance::spawn(short_lease_opts("i2", &redis)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut dave = Client::connect_user(&i1, "dave").await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    let conns = [alice.conn_id(), dave.conn_id(), bob.conn_id()];
    // "lobby": alice and dave on i1, bob on i2. "pair": alice on i1, bob on i2.
    for (client, rooms) in [
        (&mut alice, &["lobby", "pair"][..]),
        (&mut dave, &["lobby"]),
        (&mut bob, &["lobby", "pair"]),
    ] {
        for room in rooms {
            let ack = client.request(json!({"type": "join", "room": room})).await;
            assert_eq!(outcome(&ack), "ack:ok", "join {room}: {ack}");
        }
    }
    let deadline = Deadline::after(Duration::from_secs(5), "both instances ready");
    await_status(&i1, "/readyz", 200, &deadline).await;
    await_status(&i2, "/readyz", 200, &deadline).await;
    let deadline = Deadline::after(Duration::from_secs(5), "cross-instance DM before the crash");
    until_delivered(
        &mut alice,
        &mut bob,
        &deadline,
        |m| dm_frame("bob", m),
        "routed",
    )
    .await;

    redis.kill();

    let deadline = Deadline::after(Duration::from_secs(3), "/readyz 503 during the outage");
    await_status(&i1, "/readyz", 503, &deadline).await;
    await_status(&i2, "/readyz", 503, &deadline).await;

    // Both on i1: an ephemeral DM is delivered locally, Redis or not; the
    // ack says `partial` (dave's connections here got it; whether he has
    // others elsewhere is unknown), so a retry is known to duplicate.
    for _ in 0..3 {
        let marker = unique("local");
        let started = Instant::now();
        let mut frame = dm_frame("dave", &marker);
        frame["store"] = json!(false);
        let reply = alice.request(frame).await;
        let took = started.elapsed();
        assert_eq!(
            outcome(&reply),
            "ack:partial",
            "a DM between two users of i1 works without Redis: {reply}"
        );
        assert!(took < Duration::from_secs(1), "local DM took {took:?}");
        assert!(
            wait_marker(&mut dave, &[marker], Duration::from_secs(2))
                .await
                .is_some(),
            "dave receives alice's local DM during the outage"
        );
    }
    // A room with a local member: with room history on (the default) a room
    // message is recorded before anyone gets it, so during the outage it
    // reaches nobody, dave included, and the answer is `unavailable` (a
    // retry is safe); nothing partial to duplicate.
    let reply = alice
        .request(room_frame("lobby", &unique("room-local")))
        .await;
    assert_eq!(
        outcome(&reply),
        "error:unavailable",
        "a recorded room message during the outage: {reply}"
    );
    // A room whose other members are all elsewhere: it reached nobody.
    let reply = alice
        .request(room_frame("pair", &unique("room-remote")))
        .await;
    assert_eq!(
        outcome(&reply),
        "error:unavailable",
        "a room message that reached nobody: {reply}"
    );
    // A stored DM needs its inbox: refused, delivered to nobody (so never
    // `partial`). `unavailable` once the heartbeat has failed; `timeout` if
    // it was sent on the dying connection before that — a retry with its
    // key is safe either way.
    let reply = alice.request(dm_frame("dave", &unique("stored"))).await;
    assert!(
        matches!(
            outcome(&reply).as_str(),
            "error:unavailable" | "error:timeout"
        ),
        "{reply}"
    );
    // Across instances: a prompt `unavailable` error, in both directions.
    for (sender, to) in [(&mut alice, "bob"), (&mut bob, "alice")] {
        for _ in 0..3 {
            let started = Instant::now();
            let reply = sender.request(dm_frame(to, &unique("cross"))).await;
            let took = started.elapsed();
            assert_eq!(
                outcome(&reply),
                "error:unavailable",
                "a cross-instance DM during the outage: {reply}"
            );
            assert!(
                took < Duration::from_secs(1),
                "the unavailable error must be prompt, took {took:?}"
            );
        }
    }

    let back = redis.restart().await;
    let bound = Duration::from_secs(2);
    let deadline = Deadline::at(
        back + bound,
        bound,
        "cross-instance DM delivered after Redis came back (from its first PONG)",
    );
    until_delivered(
        &mut alice,
        &mut bob,
        &deadline,
        |m| dm_frame("bob", m),
        "routed",
    )
    .await;
    let delivered_after = back.elapsed();
    let deadline = Deadline::at(back + bound, bound, "/readyz 200 after Redis came back");
    await_status(&i1, "/readyz", 200, &deadline).await;
    await_status(&i2, "/readyz", 200, &deadline).await;
    let deadline = Deadline::at(
        back + bound,
        bound,
        "presence re-asserted in the empty Redis",
    );
    let want = [("alice", "i1"), ("dave", "i1"), ("bob", "i2")];
    loop {
        let mut wrong = Vec::new();
        for (user, instance) in want {
            let got = redis.hgetall(&presence_key(user)).await;
            if got != fields(&[(instance, "1")]) {
                wrong.push(format!("{user}: {got:?}"));
            }
        }
        if wrong.is_empty() {
            break;
        }
        deadline.check(wrong.join(", "));
        pause().await;
    }
    assert_eq!(
        redis.smembers(&users_key("i1")).await.len(),
        2,
        "i1's users set is back"
    );
    assert!(redis.exists(&lease_key("i1")).await, "i1's lease is back");
    assert!(redis.exists(&lease_key("i2")).await, "i2's lease is back");
    until_delivered(
        &mut bob,
        &mut alice,
        &Deadline::after(Duration::from_secs(2), "bob -> alice after recovery"),
        |m| dm_frame("alice", m),
        "routed",
    )
    .await;
    // Rooms too: the subscriptions came back with the subscriber.
    until_delivered(
        &mut alice,
        &mut bob,
        &Deadline::after(Duration::from_secs(2), "a room message across instances"),
        |m| room_frame("pair", m),
        "ok",
    )
    .await;
    assert_eq!(
        [alice.conn_id(), dave.conn_id(), bob.conn_id()],
        conns,
        "no client reconnected"
    );
    eprintln!(
        "redis restart: first DM delivered {delivered_after:?} after the new redis answered PING"
    );
}

// ---------------------------------------------------------------------------
// 4. Subscriptions killed (CLIENT KILL) or silently lost
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscriber_connections_resubscribe() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(short_lease_opts("i1", &redis)),
        Instance::spawn(short_lease_opts("i2", &redis)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    for c in [&mut alice, &mut bob] {
        let ack = c.request(json!({"type": "join", "room": "lobby"})).await;
        assert_eq!(outcome(&ack), "ack:ok", "{ack}");
    }
    assert_eq!(redis.numsub("sb:inst:{i2}").await, 1);
    assert_eq!(redis.numsub("sb:room:{lobby}").await, 2);

    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(
        killed >= 2,
        "CLIENT KILL TYPE pubsub must kill both subscriber connections, killed {killed}"
    );

    let deadline = Deadline::after(
        Duration::from_secs(5),
        "subscriptions restored after CLIENT KILL",
    );
    loop {
        let counts = (
            redis.numsub("sb:inst:{i1}").await,
            redis.numsub("sb:inst:{i2}").await,
            redis.numsub("sb:room:{lobby}").await,
        );
        if counts == (1, 1, 2) {
            break;
        }
        deadline.check(format!(
            "NUMSUB sb:inst:{{i1}}, sb:inst:{{i2}}, sb:room:{{lobby}} = {counts:?}"
        ));
        pause().await;
    }
    let deadline = Deadline::after(Duration::from_secs(5), "DMs and room messages flow again");
    until_dm_and_room_flow(&mut alice, &mut bob, "bob", &deadline).await;
    until_dm_and_room_flow(&mut bob, &mut alice, "alice", &deadline).await;
    await_status(&i1, "/readyz", 200, &deadline).await;
    await_status(&i2, "/readyz", 200, &deadline).await;
}

/// Redis forgets i2's subscriptions while its subscriber connection stays up
/// (a proxy injects UNSUBSCRIBE and hides the confirmations): only the
/// subscription probe can notice, and it must resubscribe. A stored DM sent
/// while the subscription was gone is lost on the bus; once the probe comes
/// back, bob's connection catches up from his inbox and gets it — with no
/// later DM to reveal the hole, and no reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silently_lost_subscriptions_are_detected_by_the_probe() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let proxy = RedisProxy::start(&redis).await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(short_lease_opts("i1", &redis)),
        Instance::spawn(opts!("i2").redis_url(&proxy.url()).lease_ms(LEASE_MS)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    for c in [&mut alice, &mut bob] {
        let ack = c.request(json!({"type": "join", "room": "lobby"})).await;
        assert_eq!(outcome(&ack), "ack:ok", "{ack}");
    }
    let deadline = Deadline::after(Duration::from_secs(5), "DM through the proxy");
    until_delivered(
        &mut alice,
        &mut bob,
        &deadline,
        |m| dm_frame("bob", m),
        "routed",
    )
    .await;
    assert_eq!(
        proxy.subscriber_connections(),
        1,
        "i2 has one subscriber connection"
    );
    let probe_failures = i2.metric(PROBE_FAILURES).await;

    proxy
        .drop_subscriptions_silently(&["sb:inst:{i2}", "sb:room:{lobby}"])
        .await;
    // Redis confirmed the UNSUBSCRIBEs; i2 saw nothing and stays connected.
    // Nobody listens on sb:inst:{i2}: the DM is stored, not routed.
    let lost = unique("lost-on-the-bus");
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": {"text": lost}, "id": 77}))
        .await;
    assert_eq!(ack["stored"], true, "{ack}");
    assert_eq!(
        ack["status"], "offline",
        "nobody listened on sb:inst:{{i2}}: {ack}"
    );
    let deadline = Deadline::after(LEASE * 3, "i2's probe notices the lost subscription");
    loop {
        let failures = i2.metric(PROBE_FAILURES).await;
        if failures > probe_failures {
            break;
        }
        deadline.check(format!("{PROBE_FAILURES} = {failures}"));
        pause().await;
    }
    let deadline = Deadline::after(LEASE * 3, "i2 resubscribed");
    loop {
        let counts = (
            redis.numsub("sb:inst:{i2}").await,
            redis.numsub("sb:room:{lobby}").await,
        );
        if counts == (1, 2) {
            break;
        }
        deadline.check(format!(
            "NUMSUB sb:inst:{{i2}}, sb:room:{{lobby}} = {counts:?}"
        ));
        pause().await;
    }
    let caught_up = tokio::time::timeout(LEASE * 3, bob.recv_type("dm"))
        .await
        .expect("bob catches up from his inbox once the probe returns");
    assert_eq!(caught_up["body"]["text"], lost, "{caught_up}");
    assert!(
        i2.metric(r#"switchboard_inbox_replay_total{outcome="catch_ups"}"#)
            .await
            >= 1.0,
        "the catch-up is counted"
    );
    let deadline = Deadline::after(
        Duration::from_secs(5),
        "DM and room message reach bob again",
    );
    until_dm_and_room_flow(&mut alice, &mut bob, "bob", &deadline).await;
    await_status(&i2, "/readyz", 200, &deadline).await;
    assert_eq!(
        proxy.subscriber_connections(),
        1,
        "recovered on the same subscriber connection (no reconnect)"
    );
}

/// Found by the rolling restart below: a new connection is registered (so
/// DMs can be queued on it) before its presence write to Redis returns, and
/// the welcome frame is queued only after that write. With Redis slow to
/// answer i2's commands, DMs already flowing to bob reach his new connection
/// before its welcome — PROTOCOL: "The first frame from the server is always"
/// the welcome frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_is_the_first_frame_while_dms_race_with_the_connect() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let proxy = RedisProxy::start(&redis).await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(short_lease_opts("i1", &redis)),
        // A longer lease: i2's heartbeats are slowed down by the proxy too.
        Instance::spawn(opts!("i2").redis_url(&proxy.url()).lease_ms(5000)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    let deadline = Deadline::after(Duration::from_secs(5), "alice -> bob through the proxy");
    until_delivered(
        &mut alice,
        &mut bob,
        &deadline,
        |m| dm_frame("bob", m),
        "routed",
    )
    .await;

    // Redis now takes 150 ms to see each of i2's commands; alice keeps
    // sending bob DMs (40/s, under the rate limit) while bob opens more
    // connections on i2.
    proxy.delay_commands(Duration::from_millis(150));
    let stop = Arc::new(AtomicBool::new(false));
    let sending = stop.clone();
    let sender = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(25));
        let mut sent = 0;
        while !sending.load(Ordering::Relaxed) {
            pace.tick().await;
            let reply = alice.request(dm_frame("bob", &unique("race"))).await;
            assert_eq!(outcome(&reply), "ack:routed", "{reply}");
            sent += 1;
        }
        sent
    });
    let mut extra = Vec::new();
    for _ in 0..3 {
        let (client, first) = Client::try_connect_raw(i2.ws_request("user=bob"))
            .await
            .expect("bob connects to i2");
        extra.push((client, first));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await.expect("sender task panicked");
    assert!(sent >= 10, "alice sent only {sent} DMs while bob connected");
    for (n, (client, first)) in extra.iter_mut().enumerate() {
        assert_eq!(
            first["type"], "welcome",
            "bob's connection #{n}: the first frame must be the welcome frame, got {first}"
        );
        // DMs were flowing: the connection gets them after its welcome.
        let dm = client.recv_type("dm").await;
        assert_eq!(dm["from"], "alice", "{dm}");
    }
}

// ---------------------------------------------------------------------------
// 5. Randomized reconnect races
// ---------------------------------------------------------------------------

const RACE_USERS: usize = 20;
const RACE_EVENTS: usize = 300;
/// Below the server's default `--max-connections-per-user` (16).
const RACE_MAX_PER_USER: usize = 8;

struct RaceConn {
    user: usize,
    inst: usize,
    client: Client,
}

enum RaceOp {
    Connect { user: usize, inst: usize },
    Close { conn: Box<RaceConn>, graceful: bool },
}

fn race_user(user: usize) -> String {
    format!("u{user:02}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_reconnect_races_leave_presence_exact() {
    let _shared = SERIAL.read().await;
    let seed: u64 = match std::env::var("SB_FAULTS_SEED") {
        Ok(s) => s.parse().expect("SB_FAULTS_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("randomized_reconnect_races: seed {seed} (rerun with SB_FAULTS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start().await;
    let ids = ["i1", "i2", "i3"];
    let (a, b, c) = tokio::join!(
        Instance::spawn(short_lease_opts(ids[0], &redis)),
        Instance::spawn(short_lease_opts(ids[1], &redis)),
        Instance::spawn(short_lease_opts(ids[2], &redis)),
    );
    let instances = [a, b, c];

    let mut open: Vec<RaceConn> = Vec::new();
    let mut events = 0;
    let mut batches = 0;
    while events < RACE_EVENTS {
        batches += 1;
        let mut ops = Vec::new();
        for _ in 0..rng.random_range(1..=12) {
            events += 1;
            let roll = rng.random_range(0..10);
            if open.is_empty() || roll < 5 {
                // Connect a user to an instance (staying under the server's
                // per-user connection limit).
                let user = rng.random_range(0..RACE_USERS);
                let has = open.iter().filter(|c| c.user == user).count()
                    + ops
                        .iter()
                        .filter(|op| matches!(op, RaceOp::Connect { user: u, .. } if *u == user))
                        .count();
                if has < RACE_MAX_PER_USER {
                    ops.push(RaceOp::Connect {
                        user,
                        inst: rng.random_range(0..3),
                    });
                }
            } else if roll < 7 {
                // Close one connection.
                let conn = open.swap_remove(rng.random_range(0..open.len()));
                ops.push(RaceOp::Close {
                    conn: Box::new(conn),
                    graceful: rng.random_bool(0.5),
                });
            } else if roll < 8 {
                // Close two connections of one user at once.
                let mut counts = [0usize; RACE_USERS];
                for conn in &open {
                    counts[conn.user] += 1;
                }
                let multi: Vec<usize> = (0..RACE_USERS).filter(|u| counts[*u] >= 2).collect();
                let user = if multi.is_empty() {
                    open[rng.random_range(0..open.len())].user
                } else {
                    multi[rng.random_range(0..multi.len())]
                };
                for _ in 0..2 {
                    if let Some(pos) = open.iter().position(|c| c.user == user) {
                        let conn = open.swap_remove(pos);
                        ops.push(RaceOp::Close {
                            conn: Box::new(conn),
                            graceful: rng.random_bool(0.5),
                        });
                    }
                }
            } else {
                // Reconnect elsewhere: close one and connect on another instance.
                let conn = open.swap_remove(rng.random_range(0..open.len()));
                let inst = (conn.inst + rng.random_range(1..3)) % 3;
                ops.push(RaceOp::Connect {
                    user: conn.user,
                    inst,
                });
                ops.push(RaceOp::Close {
                    conn: Box::new(conn),
                    graceful: rng.random_bool(0.5),
                });
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for op in ops {
            match op {
                RaceOp::Connect { user, inst } => {
                    let request = instances[inst].ws_request(&format!("user={}", race_user(user)));
                    tasks.spawn(async move {
                        let client = Client::connect(request).await;
                        Some(RaceConn { user, inst, client })
                    });
                }
                RaceOp::Close { conn, graceful } => {
                    tasks.spawn(async move {
                        if graceful {
                            conn.client.close().await;
                        } else {
                            drop(conn); // TCP FIN without a WebSocket close
                        }
                        None
                    });
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Some(conn)) => open.push(conn),
                Ok(None) => {}
                Err(e) => panic!("seed {seed}: an event task failed: {e}"),
            }
        }
    }

    // The truth: open connections per (user, instance).
    let mut truth: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for conn in &open {
        *truth.entry((conn.user, conn.inst)).or_default() += 1;
    }
    let deadline = Deadline::after(
        Duration::from_secs(10),
        format!(
            "seed {seed}: Redis presence equals the {} open connections after {events} events in {batches} batches",
            open.len()
        ),
    );
    loop {
        let mut wrong = Vec::new();
        for user in 0..RACE_USERS {
            let name = race_user(user);
            let want: HashMap<String, String> = (0..3)
                .filter_map(|i| {
                    truth
                        .get(&(user, i))
                        .map(|n| (ids[i].to_string(), n.to_string()))
                })
                .collect();
            let got = redis.hgetall(&presence_key(&name)).await;
            if got != want {
                wrong.push(format!(
                    "{}: want {want:?}, got {got:?}",
                    presence_key(&name)
                ));
            }
        }
        for (i, id) in ids.iter().enumerate() {
            let mut want: Vec<String> = (0..RACE_USERS)
                .filter(|u| truth.contains_key(&(*u, i)))
                .map(race_user)
                .collect();
            want.sort();
            let mut got = redis.smembers(&users_key(id)).await;
            got.sort();
            if got != want {
                wrong.push(format!("{}: want {want:?}, got {got:?}", users_key(id)));
            }
            let want_conns = open.iter().filter(|c| c.inst == i).count() as f64;
            let got_conns = instances[i].metric(CONNECTIONS).await;
            if got_conns != want_conns {
                wrong.push(format!(
                    "{id} {CONNECTIONS}: want {want_conns}, got {got_conns}"
                ));
            }
        }
        if wrong.is_empty() {
            break;
        }
        deadline.check(format!("\n  {}", wrong.join("\n  ")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// 6. Rolling restart under a steady DM load
// ---------------------------------------------------------------------------

const USERS_PER_INSTANCE: usize = 4;
/// Per user; 12 users -> 200 DMs/s in total.
const SEND_PERIOD: Duration = Duration::from_millis(60);
/// A restart "window" starts this long before SIGTERM and ends this long
/// after the last of the instance's clients reconnected: DMs from or to that
/// instance's users sent inside it may be lost (at-most-once).
const WINDOW_MARGIN: Duration = Duration::from_millis(500);
/// DMs delivered between two restarts (about two seconds of load).
const STEADY_DELIVERIES: u64 = 400;

struct SentDm {
    to: String,
    at: Instant,
    outcome: Option<String>,
}

#[derive(Default)]
struct LoadLog {
    /// (sender, seq) -> what was sent and what the ack said.
    sent: HashMap<(String, u64), SentDm>,
    /// (sender, seq) -> the users who received it (one entry per delivery).
    delivered: HashMap<(String, u64), Vec<String>>,
    /// user -> moments its connection ended, and how.
    disconnects: Vec<(String, Instant, String)>,
    /// (user, instance from the welcome frame), per connection.
    connections: Vec<(String, String)>,
    /// Frames no test logic expected.
    unexpected: Vec<String>,
    /// Frames received on a new connection before its welcome frame.
    before_welcome: Vec<String>,
    /// (sender, recipient) -> sentinel DMs received (each user sends every
    /// peer one once the load has stopped).
    sentinels: HashMap<(String, String), usize>,
}

#[derive(Default)]
struct LoadShared {
    log: Mutex<LoadLog>,
    stop_sending: AtomicBool,
    /// Tells every load user to send each peer its sentinel DM.
    send_sentinels: AtomicBool,
    finish: AtomicBool,
    delivered: AtomicU64,
}

impl LoadShared {
    fn log(&self) -> std::sync::MutexGuard<'_, LoadLog> {
        self.log.lock().expect("load log mutex poisoned")
    }
}

/// Records one frame a load user received: an ack (or error) for one of its
/// DMs, or a DM from another user (a sentinel or a load DM).
fn record_frame(user: &str, frame: Value, shared: &LoadShared) {
    let mut log = shared.log();
    let sentinel_ack = frame["id"]
        .as_str()
        .is_some_and(|id| id.starts_with(SENTINEL_ID));
    match frame["type"].as_str() {
        Some("ack") if sentinel_ack && frame["status"] == "routed" => {}
        Some("dm") if frame["body"]["sentinel"].is_string() => {
            let from = frame["from"].as_str().unwrap_or("?").to_string();
            *log.sentinels.entry((from, user.to_string())).or_default() += 1;
        }
        Some("ack") | Some("error") => {
            let id = frame["id"].as_u64();
            match id.and_then(|id| log.sent.get_mut(&(user.to_string(), id))) {
                Some(sent) => sent.outcome = Some(outcome(&frame)),
                None => log.unexpected.push(format!("{user} got {frame}")),
            }
        }
        Some("dm") => match (frame["from"].as_str(), frame["body"]["seq"].as_u64()) {
            (Some(from), Some(seq)) => {
                log.delivered
                    .entry((from.to_string(), seq))
                    .or_default()
                    .push(user.to_string());
                shared.delivered.fetch_add(1, Ordering::Relaxed);
            }
            _ => log.unexpected.push(format!("{user} got {frame}")),
        },
        _ => log.unexpected.push(format!("{user} got {frame}")),
    }
}

/// The id prefix of the sentinel DMs the load users send at the end.
const SENTINEL_ID: &str = "sentinel-to-";

/// Sends `user`'s sentinel DM to every peer (their acks are recorded).
async fn send_sentinels(client: &mut Client, user: &str, peers: &[String]) -> Result<(), String> {
    for peer in peers {
        let frame = json!({
            "type": "dm",
            "to": peer,
            "id": format!("{SENTINEL_ID}{peer}"),
            "body": {"sentinel": user},
        });
        client.try_send_json(&frame).await?;
    }
    Ok(())
}

/// Connects `user` to `addr`, retrying (the port is down during a restart).
/// Frames that arrive before the welcome frame are a protocol violation: they
/// are recorded as such, and still counted.
async fn connect_retry(
    addr: SocketAddr,
    user: &str,
    since: Option<&str>,
    shared: &LoadShared,
) -> Client {
    let deadline = Deadline::after(
        Duration::from_secs(15),
        format!("{user} reconnects to {addr}"),
    );
    loop {
        let query = match since {
            Some(since) => format!("user={user}&since={since}"),
            None => format!("user={user}"),
        };
        let request = ws_request_at(addr, &query);
        let attempt =
            tokio::time::timeout(Duration::from_secs(2), Client::try_connect_raw(request)).await;
        match attempt {
            Ok(Ok((mut client, mut frame))) => loop {
                if frame["type"] == "welcome" {
                    let instance = frame["instance"].as_str().unwrap_or("?").to_string();
                    shared.log().connections.push((user.to_string(), instance));
                    client.welcome = frame;
                    return client;
                }
                shared.log().before_welcome.push(format!("{user}: {frame}"));
                record_frame(user, frame, shared);
                match client.next_event(Duration::from_secs(2)).await {
                    Incoming::Json(next) => frame = next,
                    other => {
                        deadline.check(format!("no welcome frame: {other:?}"));
                        break;
                    }
                }
            },
            Ok(Err(e)) => deadline.check(format!("{e}")),
            Err(_) => deadline.check("handshake timed out"),
        }
        pause().await;
    }
}

/// One long-lived user: sends a DM with a sequence number every
/// `SEND_PERIOD` to a random peer, records acks and deliveries, reconnects
/// to the same address when its connection ends.
async fn load_user(
    user: String,
    addr: SocketAddr,
    peers: Vec<String>,
    seed: u64,
    shared: Arc<LoadShared>,
    start: Arc<tokio::sync::Barrier>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = connect_retry(addr, &user, None, &shared).await;
    // The newest inbox entry this user processed: a reconnect resumes
    // after it (protocol v1.1), wherever the connection lands.
    let mut last_seq: Option<String> = None;
    // Nobody sends before everybody is connected.
    start.wait().await;
    let mut seq = 0u64;
    let jitter = Duration::from_millis(rng.random_range(0..60));
    let mut next_send = tokio::time::Instant::now() + jitter;
    let mut sentinels_sent = false;
    while !shared.finish.load(Ordering::Relaxed) {
        let sending = !shared.stop_sending.load(Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let event = if !sentinels_sent && shared.send_sentinels.load(Ordering::Relaxed) {
            sentinels_sent = true;
            match send_sentinels(&mut client, &user, &peers).await {
                Ok(()) => continue,
                Err(e) => Incoming::Ended(e),
            }
        } else if sending && now >= next_send {
            seq += 1;
            let to = peers[rng.random_range(0..peers.len())].clone();
            let frame = json!({"type": "dm", "to": to, "id": seq, "body": {"seq": seq}});
            shared.log().sent.insert(
                (user.clone(), seq),
                SentDm {
                    to,
                    at: Instant::now(),
                    outcome: None,
                },
            );
            next_send = (next_send + SEND_PERIOD).max(now);
            match client.try_send_json(&frame).await {
                Ok(()) => continue,
                Err(e) => Incoming::Ended(e),
            }
        } else {
            let wait = if sending {
                next_send.saturating_duration_since(now)
            } else {
                Duration::from_millis(50)
            };
            client.next_event(wait).await
        };
        let how = match event {
            Incoming::Json(frame) => {
                if frame["type"] == "dm" {
                    if let Some(seq) = frame["seq"].as_str() {
                        last_seq = Some(seq.to_owned());
                    }
                }
                record_frame(&user, frame, &shared);
                continue;
            }
            Incoming::Timeout => continue,
            Incoming::Closed(code) => format!("close {code:?}"),
            Incoming::Ended(e) => e,
        };
        shared
            .log()
            .disconnects
            .push((user.clone(), Instant::now(), how));
        client = connect_retry(addr, &user, last_seq.as_deref(), &shared).await;
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_no_dm_between_connected_users() {
    let _exclusive = SERIAL.write().await;
    let test_started = Instant::now();
    let redis = RedisServer::start().await;
    let (a, b, c) = tokio::join!(
        Instance::spawn(short_lease_opts("i1", &redis)),
        Instance::spawn(short_lease_opts("i2", &redis)),
        Instance::spawn(short_lease_opts("i3", &redis)),
    );
    let mut instances = [a, b, c];
    let users: Vec<(String, usize)> = (0..3)
        .flat_map(|i| (0..USERS_PER_INSTANCE).map(move |k| (format!("load{}_{k}", i + 1), i)))
        .collect();
    let home: HashMap<String, usize> = users.iter().cloned().collect();
    let shared = Arc::new(LoadShared::default());
    let start = Arc::new(tokio::sync::Barrier::new(users.len()));
    let mut tasks = Vec::new();
    for (n, (user, inst)) in users.iter().enumerate() {
        let peers: Vec<String> = users
            .iter()
            .map(|(u, _)| u.clone())
            .filter(|u| u != user)
            .collect();
        tasks.push(tokio::spawn(load_user(
            user.clone(),
            instances[*inst].addr(),
            peers,
            n as u64,
            shared.clone(),
            start.clone(),
        )));
    }

    let wait_delivered = |count: u64, what: String| {
        let shared = shared.clone();
        async move {
            let deadline = Deadline::after(Duration::from_secs(10), what);
            loop {
                let got = shared.delivered.load(Ordering::Relaxed);
                if got >= count {
                    return;
                }
                deadline.check(format!("{got} delivered"));
                pause().await;
            }
        }
    };
    wait_delivered(200, "warm-up: 200 DMs delivered".into()).await;

    // (instance index, window start, window end)
    let mut windows: Vec<(usize, Instant, Instant)> = Vec::new();
    for (k, instance) in instances.iter_mut().enumerate() {
        let new_id = format!("i{}r", k + 1);
        let started = Instant::now();
        let status = instance.terminate(Duration::from_secs(10)).await;
        assert!(
            status.success(),
            "i{} exit status after SIGTERM: {status}",
            k + 1
        );
        instance
            .respawn_same_port(short_lease_opts(&new_id, &redis))
            .await;
        let movers: Vec<&String> = users
            .iter()
            .filter(|(_, i)| *i == k)
            .map(|(u, _)| u)
            .collect();
        let deadline = Deadline::after(
            Duration::from_secs(10),
            format!("{movers:?} reconnect to {new_id}"),
        );
        loop {
            let back = {
                let log = shared.log();
                movers
                    .iter()
                    .filter(|u| {
                        log.connections
                            .iter()
                            .any(|(cu, ci)| cu == **u && *ci == new_id)
                    })
                    .count()
            };
            if back == movers.len() {
                break;
            }
            deadline.check(format!("{back} of {} reconnected", movers.len()));
            pause().await;
        }
        windows.push((k, started - WINDOW_MARGIN, Instant::now() + WINDOW_MARGIN));
        let now = shared.delivered.load(Ordering::Relaxed);
        wait_delivered(
            now + STEADY_DELIVERIES,
            format!("steady load after restarting i{}", k + 1),
        )
        .await;
    }

    shared.stop_sending.store(true, Ordering::Relaxed);
    let in_window = |user: &str, at: Instant| {
        windows
            .iter()
            .any(|(k, from, to)| home[user] == *k && at >= *from && at <= *to)
    };
    // Wait (bounded) for every ack and every DM that must arrive.
    let deadline = Deadline::after(Duration::from_secs(5), "acks and deliveries settle");
    loop {
        let missing = {
            let log = shared.log();
            log.sent
                .iter()
                .filter(|((from, seq), sent)| {
                    let acked =
                        matches!(sent.outcome.as_deref(), Some("ack:routed" | "ack:offline"));
                    let must_arrive =
                        acked || (!in_window(from, sent.at) && !in_window(&sent.to, sent.at));
                    must_arrive
                        && (sent.outcome.is_none()
                            || !log.delivered.contains_key(&(from.clone(), *seq)))
                })
                .count()
        };
        if missing == 0 {
            break;
        }
        if deadline.left().is_zero() {
            break; // reported in detail below
        }
        pause().await;
    }
    // No late duplicates either: every user now sends each peer a sentinel
    // DM. DMs from one connection to one recipient arrive in order, and
    // what a user sent before reconnecting was published before it
    // reconnected, so once every sentinel is in, any copy of an earlier DM
    // still on its way has arrived.
    shared.send_sentinels.store(true, Ordering::Relaxed);
    let pairs = users.len() * (users.len() - 1);
    let deadline = Deadline::after(
        Duration::from_secs(10),
        format!("the {pairs} sentinel DMs arrive"),
    );
    loop {
        let got = shared.log().sentinels.len();
        if got == pairs {
            break;
        }
        deadline.check(format!("{got} of {pairs} arrived"));
        pause().await;
    }
    shared.finish.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load user task panicked");
    }

    let log = shared.log();
    let mut qualifying = 0;
    let mut lost = Vec::new();
    let mut not_routed = Vec::new();
    let mut duplicated = Vec::new();
    let mut misdelivered = Vec::new();
    // Every DM acked `routed` or `offline` is in its recipient's inbox:
    // delivered, whatever restarted (the v1.1 guarantee).
    let mut lost_acked = Vec::new();
    let mut acked = 0;
    for ((from, seq), sent) in &log.sent {
        let got = log.delivered.get(&(from.clone(), *seq));
        if matches!(sent.outcome.as_deref(), Some("ack:routed" | "ack:offline")) {
            acked += 1;
            if got.is_none() {
                lost_acked.push(format!(
                    "{from}#{seq} -> {} ({:?}, sent at +{:?})",
                    sent.to,
                    sent.outcome,
                    sent.at.duration_since(test_started)
                ));
            }
        }
        if let Some(recipients) = got {
            if recipients.len() > 1 {
                duplicated.push(format!("{from}#{seq} -> {recipients:?}"));
            }
            if recipients.iter().any(|r| *r != sent.to) {
                misdelivered.push(format!("{from}#{seq} for {} -> {recipients:?}", sent.to));
            }
        }
        if in_window(from, sent.at) || in_window(&sent.to, sent.at) {
            continue;
        }
        // Neither end was on a restarting instance: both stayed connected.
        if sent.outcome.as_deref() != Some("ack:routed") {
            not_routed.push(format!("{from}#{seq} -> {}: {:?}", sent.to, sent.outcome));
            continue;
        }
        qualifying += 1;
        if got.is_none() {
            lost.push(format!(
                "{from}#{seq} -> {} (sent at +{:?})",
                sent.to,
                sent.at.duration_since(test_started)
            ));
        }
    }
    for ((from, to), copies) in &log.sentinels {
        if *copies > 1 {
            duplicated.push(format!("sentinel {from} -> {to} x{copies}"));
        }
    }
    let unexpected_disconnects: Vec<String> = log
        .disconnects
        .iter()
        .filter(|(user, at, _)| !in_window(user, *at))
        .map(|(user, at, how)| format!("{user} at +{:?}: {how}", at.duration_since(test_started)))
        .collect();
    let windows_text: Vec<String> = windows
        .iter()
        .map(|(k, from, to)| {
            format!(
                "i{}: +{:?}..+{:?}",
                k + 1,
                from.duration_since(test_started),
                to.duration_since(test_started)
            )
        })
        .collect();
    eprintln!(
        "rolling restart: {} DMs sent, {qualifying} between users outside restart windows {windows_text:?}, {} disconnects, took {:?}",
        log.sent.len(),
        log.disconnects.len(),
        test_started.elapsed()
    );
    // Every violated property, each with up to ten examples.
    let mut failures = Vec::new();
    let mut check = |problems: &[String], what: &str| {
        if !problems.is_empty() {
            let examples: Vec<&String> = problems.iter().take(10).collect();
            failures.push(format!("{} {what}, e.g. {examples:?}", problems.len()));
        }
    };
    check(
        &lost,
        &format!(
            "of {qualifying} routed DMs between users that stayed connected were never delivered"
        ),
    );
    check(
        &lost_acked,
        &format!("of {acked} DMs acked routed or offline (in or out of restart windows) were never delivered"),
    );
    check(&duplicated, "DMs were delivered more than once");
    check(&misdelivered, "DMs were delivered to the wrong user");
    check(
        &not_routed,
        "DMs between connected users were not acked `routed`",
    );
    check(
        &unexpected_disconnects,
        "connections of instances that were not restarting ended",
    );
    check(
        &log.before_welcome,
        "frames arrived on a new connection before its welcome frame (PROTOCOL: the first frame is always the welcome)",
    );
    check(&log.unexpected, "unexpected frames");
    assert!(
        failures.is_empty(),
        "rolling restart (windows {windows_text:?}):\n  {}",
        failures.join("\n  ")
    );
    assert!(
        qualifying >= 500,
        "too few DMs outside the restart windows to mean anything: {qualifying}"
    );
    for (k, instance) in instances.iter().enumerate() {
        assert_eq!(instance.instance_id(), format!("i{}r", k + 1));
    }
}

// ---------------------------------------------------------------------------
// 7. Slow consumer
// ---------------------------------------------------------------------------

/// Large-DM senders; each connection has its own rate limit.
const FLOODERS: usize = 4;
/// Body padding: large, but under the default `--max-body-bytes` (16384).
const FLOOD_PAD: usize = 15_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_without_hurting_others() {
    let _exclusive = SERIAL.write().await;
    let redis = RedisServer::start().await;
    let inst = Instance::spawn(short_lease_opts("i1", &redis).outbound_queue(16)).await;
    // Never read until the very end.
    let mut sloth = Client::connect_user(&inst, "sloth").await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;
    let stop = Arc::new(AtomicBool::new(false));

    // Flooders send ~15 KB DMs (under the default body limit) to sloth as
    // fast as their acks come back, backing off when rate limited.
    let mut flooders = Vec::new();
    for n in 0..FLOODERS {
        let name = format!("flood{n}");
        let mut client = Client::connect_user(&inst, &name).await;
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            let pad = "x".repeat(FLOOD_PAD);
            let (mut sent, mut refused) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let id = sent + refused + 1;
                let frame = format!(
                    r#"{{"type":"dm","to":"sloth","id":{id},"body":{{"n":{id},"pad":"{pad}"}}}}"#
                );
                client.send_text(frame).await;
                let reply = loop {
                    match client.next_event(RECV_TIMEOUT).await {
                        Incoming::Json(v) if v["type"] == "ack" || v["type"] == "error" => break v,
                        Incoming::Json(_) => {}
                        other => panic!("{name}: no reply to DM #{id}: {other:?}"),
                    }
                };
                match outcome(&reply).as_str() {
                    "ack:routed" | "ack:offline" => {
                        assert_eq!(reply["id"], id, "{name}: ack for DM #{id}: {reply}");
                        sent += 1;
                    }
                    "error:rate_limited" => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => panic!("{name}: unexpected reply to DM #{id}: {reply}"),
                }
            }
            (sent, refused)
        }));
    }

    // Meanwhile alice and bob chat; every round trip is timed.
    let chat_stop = stop.clone();
    let chat = tokio::spawn(async move {
        let mut rtts = Vec::new();
        // Paced well under the per-connection rate limit.
        let mut pace = tokio::time::interval(Duration::from_millis(50));
        while !chat_stop.load(Ordering::Relaxed) || rtts.len() < 20 {
            pace.tick().await;
            let marker = unique("chat");
            let started = Instant::now();
            let ack = alice.request(dm_frame("bob", &marker)).await;
            assert_eq!(outcome(&ack), "ack:routed", "{ack}");
            let dm = bob.recv_type("dm").await;
            assert_eq!(dm["body"]["m"], marker.as_str(), "{dm}");
            let ack = bob.request(dm_frame("alice", &marker)).await;
            assert_eq!(outcome(&ack), "ack:routed", "{ack}");
            let dm = alice.recv_type("dm").await;
            assert_eq!(dm["body"]["m"], marker.as_str(), "{dm}");
            rtts.push(started.elapsed());
        }
        (rtts, alice)
    });

    let mut max_rss = 0;
    let deadline = Deadline::after(Duration::from_secs(20), "sloth dropped as a slow consumer");
    loop {
        max_rss = max_rss.max(inst.rss_kb());
        let drops = inst.metric(SLOW_DROPS).await;
        if drops >= 1.0 {
            break;
        }
        deadline.check(format!("{SLOW_DROPS} = {drops}, VmRSS {max_rss} kB"));
        pause().await;
    }
    let detected = Instant::now();
    stop.store(true, Ordering::Relaxed);

    // Only now does sloth read: everything that was buffered, then the close.
    let code = sloth.expect_close(Duration::from_secs(10)).await;
    let read_close_after = detected.elapsed();
    assert_eq!(code, Some(1008), "slow consumer close code");

    let (mut sent, mut refused) = (0, 0);
    for flooder in flooders {
        let (s, r) = flooder.await.expect("flooder task panicked");
        sent += s;
        refused += r;
    }
    let (rtts, mut alice) = chat.await.expect("chat task panicked");
    let worst = rtts.iter().max().copied().unwrap_or_default();
    eprintln!(
        "slow consumer: {sent} large DMs sent ({refused} rate limited), {} chat round trips, worst {worst:?}, max VmRSS {max_rss} kB, close read {read_close_after:?} after detection",
        rtts.len()
    );
    assert!(
        worst < Duration::from_millis(200),
        "alice<->bob round trips must stay under 200 ms while sloth is flooded; worst {worst:?} of {rtts:?}"
    );
    assert!(inst.metric(SLOW_DROPS).await >= 1.0);
    assert_eq!(inst.http_get("/healthz").await.0, 200, "instance healthy");
    max_rss = max_rss.max(inst.rss_kb());
    assert!(
        max_rss < 200 * 1024,
        "instance VmRSS must stay bounded, peaked at {max_rss} kB"
    );
    alice.await_presence("sloth", false).await;
    let reply = alice.request(dm_frame("sloth", "gone")).await;
    assert_eq!(outcome(&reply), "ack:offline", "{reply}");
}
