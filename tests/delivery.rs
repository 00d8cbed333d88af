//! What a sender is told, and what a recipient gets, when things go wrong
//! between instances: a device that reconnects over and over beside one that
//! stays, a Redis that stops answering, a Redis slow to answer presence reads,
//! and a crashed instance that a pattern subscriber makes look alive.
//!
//! Real redis-server, real instance processes, real WebSocket clients.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_testkit::{
    eventually, opts, Client, Incoming, Instance, RedisProxy, RedisServer, RECV_TIMEOUT,
};

fn dm(to: &str, body: Value) -> Value {
    json!({"type": "dm", "to": to, "body": body})
}

/// `ack:<status>` or `error:<code>`.
fn outcome(reply: &Value) -> String {
    match reply["type"].as_str() {
        Some("ack") => format!("ack:{}", reply["status"].as_str().unwrap_or("?")),
        Some("error") => format!("error:{}", reply["code"].as_str().unwrap_or("?")),
        _ => format!("unexpected:{reply}"),
    }
}

async fn await_holders(redis: &RedisServer, user: &str, want: &[(&str, &str)]) {
    let key = format!("sb:presence:{{{user}}}");
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    eventually(
        RECV_TIMEOUT,
        &format!("presence of {user} is {want:?}"),
        || {
            let (key, want) = (key.clone(), want.clone());
            async move {
                redis
                    .hgetall(&key)
                    .await
                    .into_iter()
                    .collect::<BTreeMap<_, _>>()
                    == want
            }
        },
    )
    .await;
}

/// Bob keeps one device on i3 while his other device reconnects over and
/// over, alternating between i2 and the sender's instance i1. DMs that reach
/// the instance his other device just left are re-routed; none may reach
/// the device on i3 a second time. Every DM must arrive there exactly once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stays_gets_every_dm_exactly_once_while_another_reconnects() {
    const DMS: u64 = 400;
    let redis = RedisServer::start().await;
    let (i1, i2, i3) = tokio::join!(
        Instance::spawn(opts!("i1").redis(&redis)),
        Instance::spawn(opts!("i2").redis(&redis)),
        Instance::spawn(opts!("i3").redis(&redis)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut stays = Client::connect_user(&i3, "bob").await;
    await_holders(&redis, "bob", &[("i3", "1")]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (stop, reconnects) = (stop.clone(), reconnects.clone());
        let targets = [i2.ws_request("user=bob"), i1.ws_request("user=bob")];
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let device = Client::connect(targets[n % 2].clone()).await;
                // Half of the goodbyes are clean closes, half are dropped sockets.
                if n % 4 < 2 {
                    device.close().await;
                } else {
                    drop(device);
                }
                n += 1;
                reconnects.store(n, Ordering::Relaxed);
            }
        })
    };
    for k in 0..DMS {
        let ack = alice.request(dm("bob", json!({"k": k}))).await;
        assert_eq!(outcome(&ack), "ack:routed", "dm {k}: {ack}");
    }
    stop.store(true, Ordering::Relaxed);
    churn.await.expect("the reconnecting device's task");
    await_holders(&redis, "bob", &[("i3", "1")]).await;
    // A re-routed copy takes one more hop than a sentinel sent now; a second
    // round of sentinels leaves every such hop time to arrive first.
    let first = alice.send_sentinel_dm("bob").await;
    let mut got = stays.frames_until(&first).await;
    let second = alice.send_sentinel_dm("bob").await;
    got.extend(stays.frames_until(&second).await);

    let ks: Vec<u64> = got
        .iter()
        .filter(|f| f["type"] == "dm")
        .filter_map(|f| f["body"]["k"].as_u64())
        .collect();
    let expected: Vec<u64> = (0..DMS).collect();
    if ks != expected {
        let mut seen = BTreeMap::<u64, usize>::new();
        for k in &ks {
            *seen.entry(*k).or_default() += 1;
        }
        let twice: Vec<_> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, _)| k)
            .collect();
        let missing: Vec<_> = expected.iter().filter(|k| !seen.contains_key(k)).collect();
        panic!(
            "the device on i3 must get each of {DMS} DMs exactly once, in order: {} received, \
             duplicated {twice:?}, missing {missing:?}",
            ks.len()
        );
    }
    eprintln!(
        "exactly once: {DMS} DMs while the other device reconnected {} times",
        reconnects.load(Ordering::Relaxed)
    );
}

/// A Redis that stops answering (SIGSTOP) after a DM's routing script was
/// sent: the sender is told `timeout` — it may have been delivered — never
/// `unavailable`, which promises it reached nobody. And indeed it is
/// delivered once Redis runs again. Once the instance knows Redis is
/// unreachable (its heartbeat failed), DMs are not sent at all and are
/// answered `unavailable`, and those are never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_does_not_answer_gives_timeout_not_unavailable() {
    let redis = RedisServer::start().await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(opts!("i1").redis(&redis).flag("--api-key", "k")),
        Instance::spawn(opts!("i2").redis(&redis)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    await_holders(&redis, "bob", &[("i2", "1")]).await;
    let warm = alice.request(dm("bob", json!("warm"))).await;
    assert_eq!(outcome(&warm), "ack:routed", "{warm}");
    assert_eq!(bob.recv_type("dm").await["body"], "warm");

    redis.freeze();
    let api_body = json!({"user": "bob", "body": "via api"}).to_string();
    let (reply, api) = tokio::join!(
        alice.request(dm("bob", json!("sent, unanswered"))),
        i1.api_post("/api/v1/publish", Some("k"), api_body.as_bytes()),
    );
    assert_eq!(
        outcome(&reply),
        "error:timeout",
        "a DM whose routing got no answer: {reply}"
    );
    assert_eq!(api.status, 504, "the API says so too: {}", api.text());
    assert_eq!(api.json()["code"], "timeout", "{}", api.text());

    // The heartbeat fails too: from then on nothing is sent.
    eventually(Duration::from_secs(10), "i1 /readyz 503", || async {
        i1.http_status("/readyz").await == Some(503)
    })
    .await;
    let reply = alice.request(dm("bob", json!("never sent"))).await;
    assert_eq!(
        outcome(&reply),
        "error:unavailable",
        "a DM while Redis is known unreachable: {reply}"
    );

    redis.resume();
    let mut delivered = Vec::new();
    for _ in 0..2 {
        delivered.push(bob.recv_type("dm").await["body"].clone());
    }
    delivered.sort_by_key(|b| b.to_string());
    assert_eq!(
        delivered,
        vec![json!("sent, unanswered"), json!("via api")],
        "what was answered `timeout` was delivered after all"
    );
    eventually(Duration::from_secs(10), "i1 /readyz 200", || async {
        i1.http_status("/readyz").await == Some(200)
    })
    .await;
    let sentinel = alice.send_sentinel_dm("bob").await;
    bob.expect_nothing_before(&sentinel).await;
}

/// Presence reads of i2 are slow (its commands go through a proxy that
/// holds each for a second). DMs for a user i2 is listed for but does not
/// hold must be re-routed, which reads presence; ordinary DMs for bob on i2,
/// sent after them, must not wait for those reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_presence_reads_do_not_delay_inbound_delivery() {
    const GHOST_DMS: usize = 10;
    let delay = Duration::from_secs(1);
    let redis = RedisServer::start().await;
    let proxy = RedisProxy::start(&redis).await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(opts!("i1").redis(&redis)),
        Instance::spawn(opts!("i2").redis_url(&proxy.url())),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut bob = Client::connect_user(&i2, "bob").await;
    await_holders(&redis, "bob", &[("i2", "1")]).await;
    // A presence entry saying i2 holds `ghost`, who is nowhere: every DM to
    // ghost reaches i2 and must be re-routed from there.
    let _: i64 = redis.cmd(&["HSET", "sb:presence:{ghost}", "i2", "1"]).await;
    let ack = alice.request(dm("bob", json!("before"))).await;
    assert_eq!(outcome(&ack), "ack:routed");
    assert_eq!(bob.recv_type("dm").await["body"], "before");

    proxy.delay_commands(delay);
    for n in 0..GHOST_DMS {
        let ack = alice.request(dm("ghost", json!(n))).await;
        assert_eq!(outcome(&ack), "ack:routed", "ghost dm {n}: {ack}");
    }
    let started = Instant::now();
    let ack = alice.request(dm("bob", json!("after"))).await;
    assert_eq!(outcome(&ack), "ack:routed");
    // Waits long enough to measure a dispatcher that reads presence inline
    // (one slow read per ghost DM), so the figure below means something.
    let bound = delay * (GHOST_DMS as u32 + 5);
    let got = match bob.next_event(bound).await {
        Incoming::Json(frame) => frame,
        other => panic!("bob's DM within {bound:?}: {other:?}"),
    };
    let took = started.elapsed();
    assert_eq!(got["body"], "after", "{got}");
    eprintln!(
        "bob's DM behind {GHOST_DMS} re-routes with {delay:?} presence reads: delivered in {took:?}"
    );
    assert!(
        took < delay,
        "bob's DM waited for the re-routes' presence reads: {took:?} (each read takes {delay:?})"
    );
    proxy.delay_commands(Duration::ZERO);
}

/// A `PSUBSCRIBE sb:*` monitor (an operator's debugging session, a metrics
/// exporter) is counted by PUBLISH as a receiver on every channel. A crashed
/// instance must not look alive because of it: a DM to a user who was only
/// there is `offline`, not `routed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_subscriber_does_not_make_a_crashed_instance_look_alive() {
    let redis = RedisServer::start().await;
    let (i1, mut i2) = tokio::join!(
        Instance::spawn(opts!("i1").redis(&redis)),
        Instance::spawn(opts!("i2").redis(&redis)),
    );
    let _monitor = redis.spy("sb:*").await;
    let mut alice = Client::connect_user(&i1, "alice").await;
    let _bob = Client::connect_user(&i2, "bob").await;
    await_holders(&redis, "bob", &[("i2", "1")]).await;
    let ack = alice.request(dm("bob", json!("alive"))).await;
    assert_eq!(outcome(&ack), "ack:routed", "{ack}");

    i2.sigkill();
    let ack = alice.request(dm("bob", json!("dead"))).await;
    assert_eq!(
        outcome(&ack),
        "ack:offline",
        "bob's only instance crashed; the monitor is not bob: {ack}"
    );
    assert!(i1.metric("switchboard_stale_presence_total").await >= 1.0);
}

/// Routing reads the recipient's presence from a cache that Redis keeps
/// true by invalidation pushes. Bob has a device on i2 while alice, on i1,
/// sends him DMs without pause (so i1's cached view of bob is hot); bob
/// connects a second device on i3. The first device gets every DM exactly
/// once; the new one starts getting them shortly after it connected, and
/// from its first DM on it misses none. The DMs are ephemeral (`"store":
/// false`), the path that routes from the cache; a stored DM also reaches
/// the new device from its backlog (tests/inbox.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_gets_every_dm_from_its_first_on_while_dms_flow() {
    const DMS: u64 = 300;
    let redis = RedisServer::start().await;
    let (i1, i2, i3) = tokio::join!(
        Instance::spawn(opts!("i1").redis(&redis)),
        Instance::spawn(opts!("i2").redis(&redis)),
        Instance::spawn(opts!("i3").redis(&redis)),
    );
    let mut alice = Client::connect_user(&i1, "alice").await;
    let mut first = Client::connect_user(&i2, "bob").await;
    await_holders(&redis, "bob", &[("i2", "1")]).await;
    let mut second = None;
    for k in 0..DMS {
        if k == DMS / 3 {
            second = Some(Client::connect_user(&i3, "bob").await);
        }
        let mut frame = dm("bob", json!({"k": k}));
        frame["store"] = json!(false);
        let ack = alice.request(frame).await;
        assert_eq!(outcome(&ack), "ack:routed", "dm {k}: {ack}");
    }
    let mut second = second.expect("connected");
    let sentinel = alice.send_sentinel_dm("bob").await;
    let ks = |frames: Vec<Value>| -> Vec<u64> {
        frames
            .iter()
            .filter(|f| f["type"] == "dm")
            .filter_map(|f| f["body"]["k"].as_u64())
            .collect()
    };
    let on_first = ks(first.frames_until(&sentinel).await);
    assert_eq!(
        on_first,
        (0..DMS).collect::<Vec<_>>(),
        "the first device: each once, in order"
    );
    let on_second = ks(second.frames_until(&sentinel).await);
    let start = *on_second.first().unwrap_or_else(|| {
        panic!(
            "the new device got none of the {} DMs after it connected",
            DMS - DMS / 3
        )
    });
    assert!(
        start >= DMS / 3,
        "nothing from before it connected: {on_second:?}"
    );
    assert_eq!(
        on_second,
        (start..DMS).collect::<Vec<_>>(),
        "from its first DM on, the new device misses none"
    );
    assert!(
        start < DMS / 3 + 20,
        "the new device is reached within a few DMs of connecting (first: dm {start})"
    );
    eprintln!(
        "new device: first DM {start} (connected before dm {})",
        DMS / 3
    );
}
