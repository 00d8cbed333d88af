//! Per-connection and per-instance limits (embedded mode): rate limit and
//! flooding, connection caps, rooms per connection, body size, ping and idle
//! timeout, allowed origins, JWT audience and not-before.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_testkit::{
    assert_error, assert_healthy, eventually, mint_jwt_claims, now_unix_secs, opts, Client,
    Incoming, Instance, RawWs, RECV_TIMEOUT,
};
use tokio_tungstenite::tungstenite::http::HeaderValue;

const FLOODING: &str = r#"switchboard_closed_connections_total{reason="flooding"}"#;
const RATE_LIMITED: &str = "switchboard_rate_limited_frames_total";
const IDLE: &str = r#"switchboard_closed_connections_total{reason="idle"}"#;

async fn rate_limited_instance(id: &str) -> Instance {
    Instance::spawn(opts!(id).flag("--rate-limit", 5).flag("--rate-burst", 10)).await
}

/// Back-to-back pings with `--rate-limit 5 --rate-burst 10`: the first 10 fit
/// the bucket, the next ones get `rate_limited` (not processed). 20 frames is
/// the largest burst that stays open: docs/PROTOCOL.md closes with 1008 a
/// client that keeps sending after more than `--rate-burst` (10) refusals in
/// a row, i.e. at the 21st frame of a burst (see the flooding test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_rate_limit_gets_rate_limited_errors_then_recovers() {
    const BURST: u64 = 20;
    let inst = rate_limited_instance("r1").await;
    let mut c = Client::connect_user(&inst, "alice").await;

    for i in 1..=BURST {
        c.send_json(&json!({"type": "ping", "id": i})).await;
    }
    let mut replies = Vec::new();
    for _ in 0..BURST {
        match c.next_event(RECV_TIMEOUT).await {
            Incoming::Json(value) => replies.push(value),
            other => panic!(
                "after {BURST} back-to-back pings (rate 5/s, burst 10) the connection must stay \
                 open with rate_limited errors; got {other:?} after {} replies: {replies:?}",
                replies.len()
            ),
        }
    }
    for (i, reply) in replies.iter().enumerate().take(10) {
        assert_eq!(
            reply,
            &json!({"type": "pong", "id": i + 1}),
            "the first 10 pings fit the burst"
        );
    }
    for reply in &replies[10..] {
        assert_error(reply, "rate_limited", "ping over the burst");
    }
    assert_eq!(inst.metric(RATE_LIMITED).await, 10.0);

    // The bucket refills at 5 tokens a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_healthy(&mut c, "waiting a second").await;
    assert_eq!(inst.metric(FLOODING).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_flooding_is_closed_with_1008() {
    let inst = rate_limited_instance("r2").await;
    let mut bystander = Client::connect_user(&inst, "bob").await;
    let mut c = Client::connect_user(&inst, "alice").await;
    assert_eq!(inst.metric(FLOODING).await, 0.0);

    // Ignore every error and keep sending, as fast as the replies come back.
    let mut sent = 0;
    let mut refusals = 0;
    let close = loop {
        assert!(
            sent < 500,
            "500 frames past a 5/s limit and the connection is still open"
        );
        if c.try_send_json(&json!({"type": "ping", "id": sent}))
            .await
            .is_err()
        {
            break c.next_event(RECV_TIMEOUT).await;
        }
        sent += 1;
        match c.next_event(RECV_TIMEOUT).await {
            Incoming::Json(reply) => {
                if reply["code"] == "rate_limited" {
                    refusals += 1;
                }
            }
            other => break other,
        }
    };
    assert!(
        matches!(close, Incoming::Closed(Some(1008))),
        "a flooding client is closed with 1008, got {close:?} after {sent} frames"
    );
    assert!(
        refusals >= 10,
        "the client was told `rate_limited` ({refusals} times) before being closed"
    );
    let inst_ref = &inst;
    eventually(
        RECV_TIMEOUT,
        "closed_connections{flooding} == 1",
        || async move { inst_ref.metric(FLOODING).await == 1.0 },
    )
    .await;
    assert!(inst.metric(RATE_LIMITED).await > 0.0);
    assert_healthy(&mut bystander, "another connection was closed for flooding").await;
    assert_eq!(inst.http_get("/healthz").await.0, 200);
}

/// The refusal of an upgrade: status and JSON `error`.
async fn refused(inst: &Instance, query: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    match RawWs::upgrade(inst.addr(), query, extra).await {
        Ok(_) => panic!("upgrade /ws?{query} {extra:?} was accepted, expected a refusal"),
        Err(response) => (response.status, response.json()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_third_upgrade_with_503() {
    let inst = Instance::spawn(opts!("m1").flag("--max-connections", 2)).await;
    let mut a = Client::connect_user(&inst, "alice").await;
    let b = Client::connect_user(&inst, "bob").await;
    let (status, body) = refused(&inst, "user=carol", &[]).await;
    assert_eq!(status, 503, "third connection on a full instance: {body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(
        Client::rejection_status(inst.ws_request("user=alice")).await,
        503,
        "full for every user"
    );
    assert_healthy(&mut a, "a refused upgrade").await;

    b.close().await;
    let inst_ref = &inst;
    eventually(
        RECV_TIMEOUT,
        "a slot frees up when bob leaves",
        || async move {
            Client::try_connect(inst_ref.ws_request("user=carol"))
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_user_refuses_a_second_device_with_429() {
    let inst = Instance::spawn(opts!("m2").flag("--max-connections-per-user", 1)).await;
    let alice = Client::connect_user(&inst, "alice").await;
    let (status, body) = refused(&inst, "user=alice", &[]).await;
    assert_eq!(status, 429, "alice's second connection: {body}");
    assert!(body["error"].is_string(), "{body}");

    let mut bob = Client::connect_user(&inst, "bob").await;
    assert_healthy(&mut bob, "connecting as another user").await;

    alice.close().await;
    let inst_ref = &inst;
    eventually(
        RECV_TIMEOUT,
        "alice can reconnect once her connection is gone",
        || async move {
            Client::try_connect(inst_ref.ws_request("user=alice"))
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rooms_per_connection() {
    let inst = Instance::spawn(opts!("m3").flag("--max-rooms-per-connection", 2)).await;
    let mut c = Client::connect_user(&inst, "alice").await;
    for room in ["a", "b"] {
        let ack = c.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["status"], "ok", "join {room}: {ack}");
    }
    let reply = c
        .request(json!({"type": "join", "room": "c", "id": "third"}))
        .await;
    assert_error(&reply, "limit_exceeded", "third room");
    assert_eq!(reply["id"], "third", "{reply}");
    assert_healthy(&mut c, "limit_exceeded").await;

    let ack = c.request(json!({"type": "join", "room": "a"})).await;
    assert_eq!(
        ack["status"], "ok",
        "rejoining a joined room is fine: {ack}"
    );

    // The refused join did not make alice a member of c.
    let reply = c
        .request(json!({"type": "room", "room": "c", "body": 1}))
        .await;
    assert_error(&reply, "not_member", "room message to the refused room");

    let ack = c.request(json!({"type": "leave", "room": "b"})).await;
    assert_eq!(ack["status"], "ok", "{ack}");
    let ack = c.request(json!({"type": "join", "room": "c"})).await;
    assert_eq!(
        ack["status"], "ok",
        "a slot is free again after leave: {ack}"
    );

    // The limit is per connection.
    let mut c2 = Client::connect_user(&inst, "alice").await;
    for room in ["x", "y"] {
        let ack = c2.request(json!({"type": "join", "room": room})).await;
        assert_eq!(ack["status"], "ok", "second connection joins {room}: {ack}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_body_bytes_is_too_large() {
    let inst = Instance::spawn(opts!("m4").flag("--max-body-bytes", 100)).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;
    let ack = alice
        .request(json!({"type": "join", "room": "lobby"}))
        .await;
    assert_eq!(ack["status"], "ok");
    let ack = bob.request(json!({"type": "join", "room": "lobby"})).await;
    assert_eq!(ack["status"], "ok");

    // A string body's JSON text is the string plus two quotes.
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": "x".repeat(98)}))
        .await;
    assert_eq!(ack["status"], "routed", "a 100-byte body is allowed: {ack}");
    assert_eq!(bob.recv_type("dm").await["from"], "alice");

    let reply = alice
        .request(json!({"type": "dm", "to": "bob", "body": "y".repeat(200), "id": "big-dm"}))
        .await;
    assert_error(&reply, "too_large", "DM with a 202-byte body");
    assert_eq!(reply["id"], "big-dm", "{reply}");
    assert_healthy(&mut alice, "too_large").await;

    let reply = alice
        .request(json!({"type": "room", "room": "lobby", "body": {"z": "z".repeat(200)}, "id": 7}))
        .await;
    assert_error(&reply, "too_large", "room message with a large body");
    assert_healthy(&mut alice, "too_large (room)").await;
    // Neither refused message reached bob. Embedded mode delivers while the
    // sender's frame is handled, before its reply, so alice's later DM is
    // queued to bob after anything those frames could have sent him.
    let sentinel = alice.send_sentinel_dm("bob").await;
    bob.expect_nothing_before(&sentinel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_pings_is_closed_for_idleness() {
    let inst = Instance::spawn(
        opts!("m5")
            .flag("--ping-interval-ms", 200)
            .flag("--idle-timeout-ms", 800),
    )
    .await;

    // A raw socket: upgraded by hand, then never written to (no pong ever).
    let silent = async {
        let started = Instant::now();
        let mut socket = RawWs::upgrade(inst.addr(), "user=silent", &[])
            .await
            .unwrap_or_else(|r| panic!("upgrade refused: {} {}", r.status, r.text()));
        let (frames, ended) = socket.read_until_closed(Duration::from_secs(4)).await;
        (started.elapsed(), frames, ended)
    };
    // A tokio-tungstenite client answers pings as long as it keeps reading.
    let answering = async {
        let mut alice = Client::connect_user(&inst, "alice").await;
        alice.expect_silence_for(Duration::from_millis(2500)).await;
        assert_healthy(&mut alice, "2.5 s of answering pings").await;
        alice
    };
    let ((elapsed, frames, ended), _alice) = tokio::join!(silent, answering);

    assert!(ended, "the silent connection was not closed within 4 s");
    let kinds: Vec<u8> = frames.iter().map(|f| f.opcode).collect();
    assert!(
        kinds.contains(&0x9),
        "the server pings every 200 ms; frames seen: {kinds:?}"
    );
    let close = frames
        .iter()
        .find_map(|f| f.close_code_and_reason())
        .unwrap_or_else(|| panic!("no Close frame before the end; opcodes {kinds:?}"));
    assert_eq!(
        close,
        (1001, "idle timeout".to_string()),
        "close code and reason"
    );
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed <= Duration::from_secs(2),
        "closed after {elapsed:?}; the idle timeout is 800 ms"
    );
    assert_eq!(inst.metric(IDLE).await, 1.0, "only the silent client");
    assert_eq!(inst.metric("switchboard_connections").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_from_foreign_origins_are_refused() {
    let inst = Instance::spawn(opts!("o1").flag(
        "--allowed-origins",
        "https://chat.example.com,https://admin.example.com",
    ))
    .await;
    for origin in [
        "https://evil.example",
        "https://chat.example.com.evil.example",
        "http://chat.example.com",
        "null",
    ] {
        let (status, body) = refused(&inst, "user=eve", &[("Origin", origin)]).await;
        assert_eq!(status, 403, "Origin {origin}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    assert_eq!(
        inst.metric(r#"switchboard_refused_upgrades_total{reason="origin"}"#)
            .await,
        4.0
    );
    for origin in ["https://chat.example.com", "https://admin.example.com"] {
        let mut request = inst.ws_request("user=alice");
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_static(origin));
        let c = Client::connect(request).await;
        assert_eq!(c.welcome["user"], "alice", "Origin {origin}");
    }
    // Non-browser clients send no Origin: tungstenite sets none.
    let mut c = Client::connect_user(&inst, "bob").await;
    assert_healthy(&mut c, "connecting without Origin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_audience_and_not_before_are_enforced() {
    const SECRET: &str = "s";
    let inst = Instance::spawn(opts!("j1").jwt(SECRET).flag("--jwt-audience", "chat")).await;
    let now = now_unix_secs();
    let token = |claims: Value| mint_jwt_claims(SECRET, &claims);

    let good = token(json!({"sub": "alice", "exp": now + 600, "aud": "chat"}));
    let c = Client::connect_token(&inst, &good).await;
    assert_eq!(c.welcome["user"], "alice");
    let listed = token(json!({"sub": "bob", "exp": now + 600, "aud": ["other", "chat"]}));
    let c = Client::connect_token(&inst, &listed).await;
    assert_eq!(c.welcome["user"], "bob", "aud may be a list holding chat");
    let started = token(json!({"sub": "carol", "exp": now + 600, "aud": "chat", "nbf": now - 60}));
    let c = Client::connect_bearer(&inst, &started).await;
    assert_eq!(c.welcome["user"], "carol", "nbf in the past");

    for (what, claims) in [
        (
            "another audience",
            json!({"sub": "eve", "exp": now + 600, "aud": "other"}),
        ),
        ("no audience", json!({"sub": "eve", "exp": now + 600})),
        (
            "a list without chat",
            json!({"sub": "eve", "exp": now + 600, "aud": ["other", "billing"]}),
        ),
        (
            "not before an hour from now",
            json!({"sub": "eve", "exp": now + 7200, "aud": "chat", "nbf": now + 3600}),
        ),
    ] {
        let t = token(claims);
        for request in [
            inst.ws_request(&format!("token={t}")),
            inst.ws_request_bearer(&t),
        ] {
            assert_eq!(
                Client::rejection_status(request).await,
                401,
                "{what} must be refused"
            );
        }
    }
    assert_eq!(
        inst.metric("switchboard_auth_failures_total").await,
        8.0,
        "each refusal is counted"
    );
}

/// A client that connects and never sends its request (slowloris) is
/// disconnected after `--handshake-timeout-ms`; a normal client is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_its_request_is_disconnected() {
    use tokio::io::AsyncReadExt;

    let inst = Instance::spawn(opts!("hs").flag("--handshake-timeout-ms", 300)).await;
    let mut silent = tokio::net::TcpStream::connect(inst.addr())
        .await
        .expect("tcp connect");
    let started = Instant::now();
    let mut buf = [0u8; 512];
    // The server closes the socket (EOF, possibly after a 408 response).
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent client must be disconnected");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early ({waited:?}): the timeout is 300 ms"
    );
    // Normal clients are unaffected.
    let mut client = Client::connect_user(&inst, "alice").await;
    let pong = client.request(json!({"type":"ping"})).await;
    assert_eq!(pong["type"], "pong");
}
