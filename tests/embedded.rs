//! Embedded single-node mode: no Redis, one instance.
//!
//! "Nothing else arrives" checks wait for a sentinel: with no bus, every
//! delivery happens while the sender's frame is handled, before its ack (or
//! the reply to its next frame), so a sentinel sent after that arrives after
//! anything the frame under test could have caused.

use serde_json::json;
use switchboard_testkit::{eventually, now_unix_ms, opts, Client, Instance, Metrics, RECV_TIMEOUT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_without_redis() {
    let inst = Instance::spawn(opts!("solo")).await;
    assert_eq!(inst.http_get("/healthz").await.0, 200);
    assert_eq!(
        inst.http_get("/readyz").await.0,
        200,
        "embedded mode is always ready"
    );
    let (status, metrics) = inst.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        Metrics::parse(&metrics).value("switchboard_connections"),
        0.0,
        "metrics must expose switchboard_connections, 0 before any client"
    );
    assert_eq!(inst.http_get("/no-such-path").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_frame_and_connection_gauge() {
    let inst = Instance::spawn(opts!("solo")).await;
    let a1 = Client::connect_user(&inst, "alice").await;
    let a2 = Client::connect_user(&inst, "alice").await;
    assert_eq!(a1.welcome["type"], "welcome");
    assert_eq!(a1.welcome["user"], "alice");
    assert_eq!(a1.welcome["instance"], "solo");
    assert!(!a1.conn_id().is_empty(), "welcome.conn: {}", a1.welcome);
    assert_ne!(a1.conn_id(), a2.conn_id(), "each connection has its own id");

    let inst_ref = &inst;
    eventually(RECV_TIMEOUT, "switchboard_connections == 2", || async {
        inst_ref.metric("switchboard_connections").await == 2.0
    })
    .await;
    a1.close().await;
    drop(a2);
    eventually(RECV_TIMEOUT, "switchboard_connections == 0", || async {
        inst_ref.metric("switchboard_connections").await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_between_two_local_users() {
    let inst = Instance::spawn(opts!("solo")).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;

    let body = json!({"text": "hi bob", "list": [1, "two", {"three": 3}]});
    let before = now_unix_ms();
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": body, "id": 1}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], 1, "{ack}");
    assert_eq!(ack["status"], "routed", "{ack}");

    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["type"], "dm");
    assert_eq!(dm["from"], "alice");
    assert_eq!(dm["body"], body);
    assert_eq!(dm["msg_id"], ack["msg_id"], "dm and ack share the msg_id");
    let ts = dm["ts"].as_i64().expect("ts is an integer (unix ms)");
    assert!(
        (before - 60_000..=now_unix_ms() + 60_000).contains(&ts),
        "ts {ts} must be unix milliseconds near now ({before})"
    );
    // No copy of her own DM comes back to alice.
    let sentinel = alice.send_sentinel_ping().await;
    alice.expect_nothing_before(&sentinel).await;

    let ack = alice
        .request(json!({"type": "dm", "to": "carol", "body": "anyone?"}))
        .await;
    assert_eq!(ack["status"], "offline", "carol is not connected: {ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_body_may_be_any_json_value() {
    let inst = Instance::spawn(opts!("solo")).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;
    let bodies = [
        json!(false),
        json!(0),
        json!(-1.5),
        json!(""),
        json!([]),
        json!({}),
        json!("quotes \" and \\ and \u{0} and ünïcødé"),
        json!({"deep": [[[[{"x": 1e300}]]]]}),
        json!(null),
    ];
    for body in bodies {
        let ack = alice
            .request(json!({"type": "dm", "to": "bob", "body": body}))
            .await;
        assert_eq!(
            ack["type"], "ack",
            "body {body} is any JSON, must be accepted: {ack}"
        );
        let dm = bob.recv_type("dm").await;
        assert_eq!(dm["body"], body, "body must arrive verbatim");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_echoed_as_sent() {
    let inst = Instance::spawn(opts!("solo")).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let pong = alice.request(json!({"type": "ping", "id": 4})).await;
    assert_eq!(pong, json!({"type": "pong", "id": 4}));
    let pong = alice.request(json!({"type": "ping", "id": "abc"})).await;
    assert_eq!(pong, json!({"type": "pong", "id": "abc"}));
    alice.send_json(&json!({"type": "ping"})).await;
    let pong = alice.recv_json().await;
    assert_eq!(
        pong,
        json!({"type": "pong"}),
        "no id in request => no id in reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_one_instance() {
    let inst = Instance::spawn(opts!("solo")).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;
    let mut bob2 = Client::connect_user(&inst, "bob").await;
    let mut carol = Client::connect_user(&inst, "carol").await;

    for c in [&mut alice, &mut bob, &mut bob2] {
        let ack = c
            .request(json!({"type": "join", "room": "lobby", "id": 2}))
            .await;
        assert_eq!(ack, json!({"type": "ack", "id": 2, "status": "ok"}));
    }
    let ack = alice
        .request(json!({"type": "room", "room": "lobby", "body": [1, 2, 3]}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    for b in [&mut bob, &mut bob2] {
        let msg = b.recv_type("room").await;
        assert_eq!(msg["room"], "lobby");
        assert_eq!(msg["from"], "alice");
        assert_eq!(msg["body"], json!([1, 2, 3]));
    }
    // Neither the sender nor carol (not a member) gets it.
    let sentinel = alice.send_sentinel_ping().await;
    alice.expect_nothing_before(&sentinel).await;
    let sentinel = alice.send_sentinel_dm("carol").await;
    carol.expect_nothing_before(&sentinel).await;

    // Another connection of the sender's own user does receive it.
    let ack = bob
        .request(json!({"type": "room", "room": "lobby", "body": "from bob"}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    assert_eq!(bob2.recv_type("room").await["from"], "bob");
    assert_eq!(alice.recv_type("room").await["body"], "from bob");
    let sentinel = bob.send_sentinel_ping().await;
    bob.expect_nothing_before(&sentinel).await;

    let err = carol
        .request(json!({"type": "room", "room": "lobby", "body": "x"}))
        .await;
    assert_eq!(err["code"], "not_member", "{err}");

    let ack = bob2
        .request(json!({"type": "leave", "room": "lobby"}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    alice
        .request(json!({"type": "room", "room": "lobby", "body": "after"}))
        .await;
    assert_eq!(bob.recv_type("room").await["body"], "after");
    // The sentinel DM reaches both of bob's connections; bob2 must have
    // nothing before it.
    let sentinel = alice.send_sentinel_dm("bob").await;
    bob2.expect_nothing_before(&sentinel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_one_instance() {
    let inst = Instance::spawn(opts!("solo")).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let bob = Client::connect_user(&inst, "bob").await;

    let reply = alice
        .request(json!({"type": "presence", "users": ["bob", "carol", "alice"], "id": 3}))
        .await;
    assert_eq!(
        reply,
        json!({"type": "presence", "id": 3, "online": {"bob": true, "carol": false, "alice": true}})
    );
    let reply = alice
        .request(json!({"type": "presence", "users": []}))
        .await;
    assert_eq!(reply["online"], json!({}), "{reply}");

    bob.close().await;
    alice.await_presence("bob", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_false_sends_no_reply_on_success_but_reports_errors() {
    let inst = Instance::spawn(opts!("solo")).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;

    alice
        .send_json(&json!({"type":"dm","to":"bob","body":"quiet","id":1,"ack":false}))
        .await;
    let dm = bob.recv_type("dm").await;
    assert_eq!(
        (dm["from"].as_str(), dm["body"].as_str()),
        (Some("alice"), Some("quiet"))
    );
    // Nothing comes back to alice for a successful fire-and-forget DM: the
    // pong to her next frame is the first thing she gets.
    let sentinel = alice.send_sentinel_ping().await;
    alice.expect_nothing_before(&sentinel).await;

    // Errors are still reported, with the id.
    alice
        .send_json(&json!({"type":"dm","to":"a b","body":1,"id":2,"ack":false}))
        .await;
    let error = alice.recv_type("error").await;
    assert_eq!(
        (error["code"].as_str(), error["id"].as_i64()),
        (Some("invalid_name"), Some(2))
    );

    // Room messages too; `ack` must be a boolean.
    let joined = alice
        .request(json!({"type":"join","room":"r","id":3}))
        .await;
    assert_eq!(joined["status"], "ok");
    alice
        .send_json(&json!({"type":"room","room":"r","body":1,"ack":false}))
        .await;
    let sentinel = alice.send_sentinel_ping().await;
    alice.expect_nothing_before(&sentinel).await;
    let bad = alice
        .request(json!({"type":"dm","to":"bob","body":1,"ack":"no","id":4}))
        .await;
    assert_eq!(bad["code"], "bad_request");
}
