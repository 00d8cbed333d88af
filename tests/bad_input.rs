//! Malformed and hostile client input (embedded mode, `--max-frame-bytes 1024`).

mod support;

use serde_json::{json, Value};
use support::{Client, Instance, Opts, RECV_TIMEOUT};

async fn small_frames_instance() -> Instance {
    Instance::spawn(Opts::new("b1").max_frame_bytes(1024)).await
}

/// Asserts the connection still answers `ping` with `pong`.
async fn assert_healthy(client: &mut Client, after: &str) {
    let pong = client
        .request(json!({"type": "ping", "id": "health"}))
        .await;
    assert_eq!(
        pong,
        json!({"type": "pong", "id": "health"}),
        "connection must stay usable after {after}"
    );
}

fn assert_error(reply: &Value, code: &str, what: &str) {
    assert_eq!(
        reply["type"], "error",
        "{what}: expected an error frame, got {reply}"
    );
    assert_eq!(reply["code"], code, "{what}: wrong error code in {reply}");
    assert!(
        reply["message"].is_string(),
        "{what}: error needs a message: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_frame_gets_its_error_code_and_the_connection_survives() {
    let inst = small_frames_instance().await;
    let mut c = Client::connect_user(&inst, "alice").await;
    let long = "n".repeat(65);

    // (what, frame, expected code). Every frame carries an id to match the reply.
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown type",
            json!({"type": "dance", "id": 1}),
            "unknown_type",
        ),
        ("missing type", json!({"to": "bob", "id": 2}), "bad_request"),
        (
            "type not a string",
            json!({"type": 7, "id": 3}),
            "bad_request",
        ),
        (
            "dm without to",
            json!({"type": "dm", "body": 1, "id": 4}),
            "bad_request",
        ),
        (
            "dm with numeric to",
            json!({"type": "dm", "to": 5, "body": 1, "id": 5}),
            "bad_request",
        ),
        (
            "dm to empty name",
            json!({"type": "dm", "to": "", "body": 1, "id": 6}),
            "invalid_name",
        ),
        (
            "dm to 65-char name",
            json!({"type": "dm", "to": long, "body": 1, "id": 7}),
            "invalid_name",
        ),
        (
            "dm to name with space",
            json!({"type": "dm", "to": "b b", "body": 1, "id": 8}),
            "invalid_name",
        ),
        (
            "dm to name with slash",
            json!({"type": "dm", "to": "b/b", "body": 1, "id": 9}),
            "invalid_name",
        ),
        (
            "join without room",
            json!({"type": "join", "id": 10}),
            "bad_request",
        ),
        (
            "join with numeric room",
            json!({"type": "join", "room": 1, "id": 11}),
            "bad_request",
        ),
        (
            "join empty room",
            json!({"type": "join", "room": "", "id": 12}),
            "invalid_name",
        ),
        (
            "join 65-char room",
            json!({"type": "join", "room": long, "id": 13}),
            "invalid_name",
        ),
        (
            "join room with space",
            json!({"type": "join", "room": "lob by", "id": 14}),
            "invalid_name",
        ),
        (
            "leave room with space",
            json!({"type": "leave", "room": "lob by", "id": 15}),
            "invalid_name",
        ),
        (
            "room msg bad room",
            json!({"type": "room", "room": "a b", "body": 1, "id": 16}),
            "invalid_name",
        ),
        (
            "room msg not member",
            json!({"type": "room", "room": "lobby", "body": 1, "id": 17}),
            "not_member",
        ),
        (
            "presence without users",
            json!({"type": "presence", "id": 18}),
            "bad_request",
        ),
        (
            "presence users not a list",
            json!({"type": "presence", "users": "bob", "id": 19}),
            "bad_request",
        ),
    ];
    for (what, frame, code) in cases {
        let reply = c.request(frame.clone()).await;
        assert_error(&reply, code, what);
        assert_eq!(reply["id"], frame["id"], "{what}: error must echo the id");
        assert_healthy(&mut c, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_frames_get_bad_request() {
    let inst = small_frames_instance().await;
    let mut c = Client::connect_user(&inst, "alice").await;

    for (what, text) in [
        ("malformed JSON", "{not json"),
        ("JSON array", "[1, 2]"),
        ("JSON string", "\"ping\""),
        ("empty frame", ""),
    ] {
        c.send_text(text).await;
        let reply = c.recv_json().await;
        assert_error(&reply, "bad_request", what);
        assert_healthy(&mut c, what).await;
    }

    c.send_binary(br#"{"type":"ping","id":1}"#.to_vec()).await;
    let reply = c.recv_json().await;
    assert_error(&reply, "bad_request", "binary frame");
    assert_healthy(&mut c, "binary frame").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_limited_to_100_users() {
    let inst = small_frames_instance().await;
    let mut c = Client::connect_user(&inst, "alice").await;
    // Short names keep these frames under the 1024-byte limit.
    let names = |n: usize| (0..n).map(|i| format!("{i:x}")).collect::<Vec<_>>();

    let reply = c
        .request(json!({"type": "presence", "users": names(100), "id": 1}))
        .await;
    assert_eq!(reply["type"], "presence", "100 users is allowed: {reply}");
    assert_eq!(
        reply["online"].as_object().map(|o| o.len()),
        Some(100),
        "{reply}"
    );

    let reply = c
        .request(json!({"type": "presence", "users": names(101), "id": 2}))
        .await;
    assert_error(&reply, "bad_request", "presence with 101 users");
    assert_healthy(&mut c, "presence with 101 users").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_names_at_the_limits_are_accepted() {
    let inst = small_frames_instance().await;
    let mut c = Client::connect_user(&inst, "alice").await;
    for name in ["x".repeat(64), "a_b.c:d@e-F9".to_string(), "z".to_string()] {
        let ack = c
            .request(json!({"type": "dm", "to": name, "body": 1}))
            .await;
        assert_eq!(ack["type"], "ack", "{name:?} is a valid name: {ack}");
        assert_eq!(ack["status"], "offline", "{ack}");
        let ack = c.request(json!({"type": "join", "room": name})).await;
        assert_eq!(ack["status"], "ok", "{name:?} is a valid room: {ack}");
    }
    let user64 = "u".repeat(64);
    let c64 = Client::connect_user(&inst, &user64).await;
    assert_eq!(c64.welcome["user"], user64.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_user_name_is_rejected_at_upgrade() {
    let inst = small_frames_instance().await;
    for query in [
        "user=a%20b",
        "user=",
        "",
        &format!("user={}", "u".repeat(65)),
    ] {
        let status = Client::rejection_status(inst.ws_request(query)).await;
        assert!(
            (400..500).contains(&status),
            "query {query:?} must be refused with a 4xx, got {status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_under_the_limit_is_fine_and_over_it_closes_with_1009() {
    let inst = small_frames_instance().await;
    let mut bob = Client::connect_user(&inst, "bob").await;
    let mut c = Client::connect_user(&inst, "alice").await;

    let body = "y".repeat(900);
    let frame = json!({"type": "dm", "to": "bob", "body": body});
    assert!(frame.to_string().len() < 1024);
    let ack = c.request(frame).await;
    assert_eq!(
        ack["status"], "routed",
        "a 950-byte frame is under the limit: {ack}"
    );
    assert_eq!(bob.recv_type("dm").await["body"], body.as_str());

    let big = json!({"type": "dm", "to": "bob", "body": "z".repeat(2000)}).to_string();
    c.send_text(big).await;
    let code = c.expect_close(RECV_TIMEOUT).await;
    assert_eq!(
        code,
        Some(1009),
        "an oversized frame closes the connection with 1009"
    );

    // Other connections are unaffected.
    let pong = bob.request(json!({"type": "ping", "id": 1})).await;
    assert_eq!(pong["type"], "pong");
}
