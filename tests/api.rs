//! The server-side HTTP API (`/api/v1/*`, docs/API.md and docs/openapi.yaml):
//! publish to a user or a room, presence, stats, authentication, validation,
//! and conformance of every answer to the OpenAPI description.
//!
//! "Nothing else arrives" checks wait for sentinels published through the
//! API after the message under test, along the path a stray copy would
//! take: one instance's bus messages to another travel over one Redis
//! connection, in order. For a user on the publishing instance itself, a
//! stray copy could be delivered there at once or come back through that
//! instance's own subscription; its sentinel is published through another
//! instance, which reaches it through Redis after anything published before
//! the 202 (Redis runs one command at a time and hands a PUBLISH to every
//! subscriber before answering it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_testkit::{
    eventually, opts, unique, Client, HttpResponse, Instance, RawWs, RedisServer, Sentinel,
    RECV_TIMEOUT,
};

const KEY: &str = "test-api-key-0123456789";

/// Redis plus instances i1..=n, each with `--api-key KEY`.
async fn cluster(n: usize) -> (RedisServer, Vec<Instance>) {
    let redis = RedisServer::start().await;
    let mut spawns = Vec::new();
    for i in 1..=n {
        let opts = opts!(&format!("i{i}")).redis(&redis).flag("--api-key", KEY);
        spawns.push(Instance::spawn(opts));
    }
    let instances = futures_util::future::join_all(spawns).await;
    (redis, instances)
}

/// POST /api/v1/publish with the right key and a JSON value.
async fn publish(inst: &Instance, request: &Value) -> HttpResponse {
    inst.api_post("/api/v1/publish", Some(KEY), request.to_string().as_bytes())
        .await
}

/// Publishes a sentinel DM to `user` through `inst`'s API (`user` must be
/// online).
async fn publish_sentinel(inst: &Instance, user: &str) -> Sentinel {
    let sentinel = Sentinel::unique();
    let response = publish(inst, &json!({"user": user, "body": sentinel.body()})).await;
    assert_accepted(&response, "routed", &format!("sentinel DM to {user}"));
    sentinel
}

/// Publishes a sentinel room message to `room` through `inst`'s API.
async fn publish_room_sentinel(inst: &Instance, room: &str) -> Sentinel {
    let sentinel = Sentinel::unique();
    let response = publish(inst, &json!({"room": room, "body": sentinel.body()})).await;
    assert_accepted(&response, "ok", &format!("sentinel room message to {room}"));
    sentinel
}

/// Asserts a 202 `{"status": status, "msg_id": "..."}` answer; returns the msg_id.
fn assert_accepted(response: &HttpResponse, status: &str, what: &str) -> String {
    assert_eq!(
        response.status,
        202,
        "{what}: expected 202, got {} {}",
        response.status,
        response.text()
    );
    let body = response.json();
    assert_eq!(body["status"], status, "{what}: {body}");
    let msg_id = body["msg_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: msg_id must be a string: {body}"));
    assert!(!msg_id.is_empty(), "{what}: empty msg_id: {body}");
    msg_id.to_string()
}

/// Why `response` is not the expected error answer (the status, a JSON body
/// with a string `error` and, when `code` is given, that `code`), if it is not.
fn http_error_mismatch(
    response: &HttpResponse,
    status: u16,
    code: Option<&str>,
    what: &str,
) -> Option<String> {
    let answer = format!("HTTP {} {:?}", response.status, response.text());
    if response.status != status {
        return Some(format!("{what}: expected HTTP {status}, got {answer}"));
    }
    if !response
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json"))
    {
        return Some(format!(
            "{what}: an error body is JSON, got content-type {:?}",
            response.header("content-type")
        ));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&response.body) else {
        return Some(format!("{what}: error body is not JSON: {answer}"));
    };
    if body["error"].as_str().is_none_or(str::is_empty) {
        return Some(format!("{what}: error body needs a string `error`: {body}"));
    }
    match code {
        Some(code) if body["code"] != code => {
            Some(format!("{what}: expected \"code\":{code:?}, got {answer}"))
        }
        _ => None,
    }
}

/// Asserts an error answer (see [`http_error_mismatch`]).
fn assert_http_error(response: &HttpResponse, status: u16, code: Option<&str>, what: &str) {
    if let Some(mismatch) = http_error_mismatch(response, status, code, what) {
        panic!("{mismatch}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_user_is_routed_like_a_dm() {
    let (redis, inst) = cluster(3).await;
    let mut alice = Client::connect_user(&inst[0], "alice").await;
    let mut bob = Client::connect_user(&inst[1], "bob").await;
    let mut carol = Client::connect_user(&inst[2], "carol").await;
    let spy = redis.spy("sb:*").await;

    let marker = unique("api-dm");
    // Odd spacing, key order and a trailing-zero number: must travel verbatim.
    let body_text =
        format!(r#"{{"ticket": 42,  "state" :"rejected", "n":[1, 2.50, "é ✓"], "m":"{marker}"}}"#);
    let request = format!(r#"{{"user":"bob","body":{body_text},"from":"tickets"}}"#);
    let response = inst[0]
        .api_post("/api/v1/publish", Some(KEY), request.as_bytes())
        .await;
    let msg_id = assert_accepted(&response, "routed", "publish to bob (online on i2)");

    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["from"], "tickets", "from is the label: {dm}");
    let sent: Value = serde_json::from_str(&body_text).expect("body is JSON");
    assert_eq!(dm["body"], sent, "body must arrive intact: {dm}");
    assert_eq!(
        dm["msg_id"],
        msg_id.as_str(),
        "same msg_id as the 202: {dm}"
    );
    assert!(dm["ts"].is_u64(), "ts must be unix ms: {dm}");

    // Routed like a DM: one publish, on bob's instance channel only.
    let spy_ref = &spy;
    let marker_ref = marker.as_str();
    eventually(RECV_TIMEOUT, "the spy sees the publish", || async move {
        !spy_ref.containing(marker_ref).is_empty()
    })
    .await;
    // Nothing else for anyone: i1 publishes the sentinels for bob and carol
    // as it did the DM; alice's (on i1 itself) comes through i2.
    let to_alice = publish_sentinel(&inst[1], "alice").await;
    let to_carol = publish_sentinel(&inst[0], "carol").await;
    let to_bob = publish_sentinel(&inst[0], "bob").await;
    alice.expect_nothing_before(&to_alice).await;
    carol.expect_nothing_before(&to_carol).await;
    bob.expect_nothing_before(&to_bob).await;
    // i1 publishes in order: once the spy saw its last sentinel, it saw
    // every publish of the DM.
    assert_eq!(
        spy.channels_of(&marker, &to_bob).await,
        vec!["sb:inst:{i2}"],
        "published exactly once, on bob's instance channel (not i1's, not i3's)"
    );
    let seen = spy.containing(&marker);
    assert!(
        seen[0].contains(&body_text),
        "the bus frame carries the body byte for byte: {:?}",
        String::from_utf8_lossy(&seen[0].payload)
    );

    // A user nobody holds.
    let response = publish(
        &inst[0],
        &json!({"user": "nobody-here", "body": {"m": marker}, "from": "tickets"}),
    )
    .await;
    assert_accepted(&response, "offline", "publish to a user nowhere");

    // `from` defaults to `server`; the publishing instance may be any.
    let response = publish(&inst[2], &json!({"user": "bob", "body": [1, "two"]})).await;
    let msg_id = assert_accepted(&response, "routed", "publish without from");
    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["from"], "server", "default from: {dm}");
    assert_eq!(dm["body"], json!([1, "two"]), "{dm}");
    assert_eq!(dm["msg_id"], msg_id.as_str(), "{dm}");

    // A user on the instance that answers the POST is reached locally.
    let response = publish(&inst[0], &json!({"user": "alice", "body": "local"})).await;
    assert_accepted(&response, "routed", "publish to a local user");
    let dm = alice.recv_type("dm").await;
    assert_eq!(
        (dm["from"].clone(), dm["body"].clone()),
        (json!("server"), json!("local"))
    );
    assert!(
        inst[0].metric("switchboard_api_publishes_total").await >= 3.0,
        "accepted publishes are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_user_reaches_every_device_on_every_instance() {
    let (_redis, inst) = cluster(3).await;
    let mut bob_i2 = Client::connect_user(&inst[1], "bob").await;
    let mut bob_i3 = Client::connect_user(&inst[2], "bob").await;
    let mut bob_i3b = Client::connect_user(&inst[2], "bob").await;
    let response = publish(
        &inst[0],
        &json!({"user": "bob", "body": {"k": 1}, "from": "svc:x"}),
    )
    .await;
    let msg_id = assert_accepted(&response, "routed", "publish to bob on i2 and i3");
    // Right behind it, the same way: each device gets the DM exactly once.
    let sentinel = publish_sentinel(&inst[0], "bob").await;
    for bob in [&mut bob_i2, &mut bob_i3, &mut bob_i3b] {
        let dm = bob.recv_type("dm").await;
        assert_eq!(dm["from"], "svc:x", "{dm}");
        assert_eq!(dm["msg_id"], msg_id.as_str(), "{dm}");
        bob.expect_nothing_before(&sentinel).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_room_reaches_every_member_on_every_instance() {
    let (_redis, inst) = cluster(3).await;
    let mut members = [
        Client::connect_user(&inst[0], "alice").await,
        Client::connect_user(&inst[1], "bob").await,
        Client::connect_user(&inst[2], "carol").await,
        Client::connect_user(&inst[2], "carol").await,
    ];
    for m in members.iter_mut() {
        let ack = m.request(json!({"type": "join", "room": "lobby"})).await;
        assert_eq!(ack["status"], "ok", "join: {ack}");
    }
    let mut outsiders = [
        Client::connect_user(&inst[0], "erin").await,
        Client::connect_user(&inst[1], "dave").await,
        // bob's second device did not join.
        Client::connect_user(&inst[2], "bob").await,
    ];
    let ack = outsiders[1]
        .request(json!({"type": "join", "room": "other"}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");

    let body = json!({"headline": unique("news"), "n": [1, 2]});
    let response = publish(&inst[0], &json!({"room": "lobby", "body": body})).await;
    let msg_id = assert_accepted(&response, "ok", "room publish");
    for m in members.iter_mut() {
        let frame = m.recv_type("room").await;
        assert_eq!(frame["room"], "lobby", "{frame}");
        assert_eq!(frame["from"], "server", "default from: {frame}");
        assert_eq!(frame["body"], body, "{frame}");
        assert_eq!(frame["msg_id"], msg_id.as_str(), "{frame}");
        assert!(frame["ts"].is_u64(), "{frame}");
    }
    // Each member exactly once: a room sentinel through i1 follows the
    // message to every member; alice (on i1) also waits for a DM through
    // i2, which reaches her after any copy from i1's own subscription.
    let to_room = publish_room_sentinel(&inst[0], "lobby").await;
    let to_alice = publish_sentinel(&inst[1], "alice").await;
    for m in members.iter_mut() {
        m.expect_nothing_before(&to_room).await;
    }
    members[0].expect_nothing_before(&to_alice).await;
    // Outsiders never: DMs through i1 to dave (i2) and bob's second device
    // (i3) take a stray copy's path; erin is on i1, so hers comes through i2.
    let to_erin = publish_sentinel(&inst[1], "erin").await;
    let to_dave = publish_sentinel(&inst[0], "dave").await;
    let to_bob = publish_sentinel(&inst[0], "bob").await;
    outsiders[0].expect_nothing_before(&to_erin).await;
    outsiders[1].expect_nothing_before(&to_dave).await;
    outsiders[2].expect_nothing_before(&to_bob).await;
    // bob's member connection on i2 gets that DM too, with nothing before it.
    members[1].expect_nothing_before(&to_bob).await;

    // Through another instance, with a label; a room nobody joined is fine too.
    let response = publish(
        &inst[1],
        &json!({"room": "lobby", "body": 7, "from": "cms"}),
    )
    .await;
    assert_accepted(&response, "ok", "room publish via i2");
    for m in members.iter_mut() {
        let frame = m.recv_type("room").await;
        assert_eq!(
            (frame["from"].clone(), frame["body"].clone()),
            (json!("cms"), json!(7))
        );
    }
    let response = publish(&inst[1], &json!({"room": "empty-room", "body": 1})).await;
    assert_accepted(&response, "ok", "room publish to an empty room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_invalid_requests_with_400() {
    let inst = Instance::spawn(
        opts!("v1")
            .flag("--api-key", KEY)
            .flag("--max-body-bytes", 1024),
    )
    .await;
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"{not json".to_vec(), "bad_request"),
        ("empty request body", Vec::new(), "bad_request"),
        ("a JSON array", b"[1,2]".to_vec(), "bad_request"),
        ("a JSON string", br#""bob""#.to_vec(), "bad_request"),
        (
            "not UTF-8",
            b"{\"user\":\"bob\",\"body\":\"\xff\xfe\"}".to_vec(),
            "bad_request",
        ),
        (
            "both user and room",
            br#"{"user":"bob","room":"lobby","body":1}"#.to_vec(),
            "bad_request",
        ),
        (
            "neither user nor room",
            br#"{"body":1}"#.to_vec(),
            "bad_request",
        ),
        (
            "user not a string",
            br#"{"user":5,"body":1}"#.to_vec(),
            "bad_request",
        ),
        (
            "room null",
            br#"{"room":null,"body":1}"#.to_vec(),
            "bad_request",
        ),
        (
            "invalid user name",
            br#"{"user":"b b","body":1}"#.to_vec(),
            "invalid_name",
        ),
        (
            "empty user name",
            br#"{"user":"","body":1}"#.to_vec(),
            "invalid_name",
        ),
        (
            "65-character user name",
            format!(r#"{{"user":"{}","body":1}}"#, "u".repeat(65)).into_bytes(),
            "invalid_name",
        ),
        (
            "invalid room name",
            br#"{"room":"a{b}","body":1}"#.to_vec(),
            "invalid_name",
        ),
        ("missing body", br#"{"user":"bob"}"#.to_vec(), "bad_request"),
        (
            "from not a string",
            br#"{"user":"bob","body":1,"from":5}"#.to_vec(),
            "bad_request",
        ),
        (
            "from null",
            br#"{"user":"bob","body":1,"from":null}"#.to_vec(),
            "bad_request",
        ),
        (
            "from not a valid name",
            br#"{"user":"bob","body":1,"from":"a b"}"#.to_vec(),
            "invalid_name",
        ),
        (
            "body nested 65 deep",
            format!(r#"{{"user":"bob","body":{deep}}}"#).into_bytes(),
            "bad_request",
        ),
    ];
    let mut mismatches = Vec::new();
    for (what, body, code) in &cases {
        let response = inst.api_post("/api/v1/publish", Some(KEY), body).await;
        mismatches.extend(http_error_mismatch(&response, 400, Some(code), what));
    }
    // Still serving.
    let response = publish(&inst, &json!({"user": "bob", "body": null})).await;
    assert_accepted(&response, "offline", "a null body is a body");
    assert_eq!(inst.http_get("/healthz").await.0, 200);
    assert!(
        mismatches.is_empty(),
        "documented: 400 {{\"error\":…, \"code\":\"bad_request\"|\"invalid_name\"}}:\n  {}",
        mismatches.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_needs_the_key_and_is_disabled_without_one() {
    let with_key = Instance::spawn(opts!("k1").flag("--api-key", KEY)).await;
    let without_key = Instance::spawn(opts!("k2")).await;
    let request = br#"{"user":"bob","body":1}"#;
    let wrong_headers: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no Authorization", vec![]),
        (
            "wrong key",
            vec![("Authorization", "Bearer not-the-key".to_string())],
        ),
        (
            "key with a suffix",
            vec![("Authorization", format!("Bearer {KEY}x"))],
        ),
        (
            "key prefix",
            vec![("Authorization", format!("Bearer {}", &KEY[..KEY.len() - 1]))],
        ),
        (
            "key without Bearer",
            vec![("Authorization", KEY.to_string())],
        ),
        (
            "empty Bearer",
            vec![("Authorization", "Bearer ".to_string())],
        ),
    ];
    for (what, headers) in &wrong_headers {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let mut post_headers = headers.clone();
        post_headers.push(("Content-Type", "application/json"));
        let response = with_key
            .http("POST", "/api/v1/publish", &post_headers, request)
            .await;
        assert_http_error(&response, 401, None, &format!("publish, {what}"));
        assert_eq!(
            response.json()["error"],
            "invalid or missing API key",
            "{what}"
        );
        for path in ["/api/v1/presence/bob", "/api/v1/stats"] {
            let response = with_key.http("GET", path, &headers, b"").await;
            assert_http_error(&response, 401, None, &format!("GET {path}, {what}"));
        }
    }

    for key in [None, Some(KEY)] {
        let response = without_key.api_post("/api/v1/publish", key, request).await;
        assert_http_error(&response, 403, None, "publish without --api-key");
        assert_eq!(
            response.json()["error"],
            "the API is disabled: no --api-key is configured"
        );
        for path in ["/api/v1/presence/bob", "/api/v1/stats"] {
            let response = without_key.api_get(path, key).await;
            assert_http_error(
                &response,
                403,
                None,
                &format!("GET {path} without --api-key"),
            );
        }
    }

    // And the right key works.
    assert_eq!(
        with_key.api_get("/api/v1/stats", Some(KEY)).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_max_body_bytes_is_413() {
    let inst = Instance::spawn(
        opts!("s1")
            .flag("--api-key", KEY)
            .flag("--max-body-bytes", 1024),
    )
    .await;
    let mut bob = Client::connect_user(&inst, "bob").await;

    // `"xxx…"`: the body as JSON text is the string plus its two quotes.
    let exactly = json!({"user": "bob", "body": "x".repeat(1022)});
    let response = publish(&inst, &exactly).await;
    assert_accepted(&response, "routed", "a body of exactly 1024 bytes");
    assert_eq!(
        bob.recv_type("dm").await["body"].as_str().map(str::len),
        Some(1022)
    );

    let over = json!({"user": "bob", "body": "x".repeat(1023)});
    let response = publish(&inst, &over).await;
    assert_http_error(&response, 413, None, "a body of 1025 bytes");

    let big = json!({"user": "bob", "body": {"blob": "y".repeat(3000)}});
    let response = publish(&inst, &big).await;
    assert_http_error(&response, 413, None, "a 3 KB body");

    // A request far over the body limit plus 4 KiB of envelope.
    let huge = json!({"user": "bob", "body": "z".repeat(20_000)});
    let response = publish(&inst, &huge).await;
    assert_eq!(response.status, 413, "a 20 KB request: {}", response.text());
    // None of the refused bodies reached bob: one instance delivers while
    // it answers a publish, so a later one arrives after any of them.
    let sentinel = publish_sentinel(&inst, "bob").await;
    bob.expect_nothing_before(&sentinel).await;
    assert_eq!(inst.http_get("/healthz").await.0, 200);
}

/// Presence as a sorted list of instances.
fn instances_of(body: &Value) -> Vec<String> {
    let mut list: Vec<String> = body["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("instances must be an array: {body}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("instance ids are strings: {body}"))
                .to_string()
        })
        .collect();
    list.sort();
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reports_instances_and_connection_counts() {
    let (_redis, inst) = cluster(2).await;
    let get = |user: &str| {
        let path = format!("/api/v1/presence/{user}");
        let inst = &inst[0];
        async move {
            let response = inst.api_get(&path, Some(KEY)).await;
            assert_eq!(response.status, 200, "GET {path}: {}", response.text());
            response.json()
        }
    };

    let bob1 = Client::connect_user(&inst[1], "bob").await;
    let body = get("bob").await;
    assert_eq!(
        body,
        json!({"user": "bob", "online": true, "instances": ["i2"], "connections": 1}),
        "bob on i2"
    );

    let bob2 = Client::connect_user(&inst[1], "bob").await;
    let bob3 = Client::connect_user(&inst[0], "bob").await;
    let body = get("bob").await;
    assert_eq!(body["user"], "bob", "{body}");
    assert_eq!(body["online"], true, "{body}");
    assert_eq!(instances_of(&body), vec!["i1", "i2"], "{body}");
    assert_eq!(body["connections"], 3, "two on i2, one on i1: {body}");

    let body = get("carol").await;
    assert_eq!(
        body,
        json!({"user": "carol", "online": false, "instances": [], "connections": 0}),
        "a user nobody holds"
    );

    bob1.close().await;
    bob3.close().await;
    let inst_ref = &inst[0];
    eventually(
        RECV_TIMEOUT,
        "bob has one connection left, on i2",
        || async move {
            let body = inst_ref
                .api_get("/api/v1/presence/bob", Some(KEY))
                .await
                .json();
            body["connections"] == 1 && body["instances"] == json!(["i2"])
        },
    )
    .await;
    drop(bob2);
    eventually(RECV_TIMEOUT, "bob is offline", || async move {
        let body = inst_ref
            .api_get("/api/v1/presence/bob", Some(KEY))
            .await
            .json();
        body == json!({"user": "bob", "online": false, "instances": [], "connections": 0})
    })
    .await;

    for (what, path) in [
        ("space", "/api/v1/presence/a%20b".to_string()),
        ("braces", "/api/v1/presence/a%7Bb%7D".to_string()),
        (
            "65 characters",
            format!("/api/v1/presence/{}", "u".repeat(65)),
        ),
        ("non-ASCII", "/api/v1/presence/%C3%A9".to_string()),
    ] {
        let response = inst[0].api_get(&path, Some(KEY)).await;
        assert_http_error(
            &response,
            400,
            Some("invalid_name"),
            &format!("presence, {what}"),
        );
    }
}

/// Names may contain `:` and `@`, which URL encoders percent-encode in a
/// path segment (`encodeURIComponent("svc:bob")` is `svc%3Abob`). The path
/// parameter is the user id, so it must be percent-decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_path_parameter_is_percent_decoded() {
    let inst = Instance::spawn(opts!("e1").flag("--api-key", KEY)).await;
    let _bob = Client::connect_user(&inst, "bob@example.com").await;
    let plain = inst
        .api_get("/api/v1/presence/bob@example.com", Some(KEY))
        .await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.json()["online"], true, "{}", plain.text());

    let encoded = inst
        .api_get("/api/v1/presence/bob%40example.com", Some(KEY))
        .await;
    assert_eq!(
        (encoded.status, encoded.text()),
        (200, plain.text()),
        "GET /api/v1/presence/bob%40example.com must answer for user bob@example.com"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_this_instances_figures() {
    let started = Instant::now();
    let (_redis, inst) = cluster(2).await;
    let stats = |i: usize| {
        let inst = &inst[i];
        async move {
            let response = inst.api_get("/api/v1/stats", Some(KEY)).await;
            assert_eq!(response.status, 200, "{}", response.text());
            response.json()
        }
    };
    let body = stats(0).await;
    assert_eq!(body["instance"], "i1", "{body}");
    assert_eq!(body["routing"], "routed", "{body}");
    assert_eq!(
        (
            body["connections"].clone(),
            body["users"].clone(),
            body["rooms"].clone()
        ),
        (json!(0), json!(0), json!(0)),
        "a fresh instance: {body}"
    );

    let mut a1 = Client::connect_user(&inst[0], "alice").await;
    let mut a2 = Client::connect_user(&inst[0], "alice").await;
    let mut b1 = Client::connect_user(&inst[0], "bob").await;
    let mut c1 = Client::connect_user(&inst[1], "carol").await;
    for (client, rooms) in [
        (&mut a1, &["lobby", "news"][..]),
        (&mut a2, &["lobby"][..]),
        (&mut b1, &["lobby"][..]),
        (&mut c1, &["elsewhere"][..]),
    ] {
        for room in rooms {
            let ack = client.request(json!({"type": "join", "room": room})).await;
            assert_eq!(ack["status"], "ok", "{ack}");
        }
    }
    let body = stats(0).await;
    assert_eq!(body["instance"], "i1", "{body}");
    assert_eq!(body["connections"], 3, "alice x2 + bob on i1: {body}");
    assert_eq!(body["users"], 2, "alice and bob: {body}");
    assert_eq!(body["rooms"], 2, "lobby and news: {body}");
    let uptime = body["uptime_s"]
        .as_u64()
        .unwrap_or_else(|| panic!("uptime_s is an integer: {body}"));
    assert!(
        uptime <= started.elapsed().as_secs() + 1,
        "uptime {uptime}s but the instance started {:?} ago",
        started.elapsed()
    );

    let body = stats(1).await;
    assert_eq!(body["instance"], "i2", "{body}");
    assert_eq!(
        (
            body["connections"].clone(),
            body["users"].clone(),
            body["rooms"].clone()
        ),
        (json!(1), json!(1), json!(1)),
        "i2 holds carol only: {body}"
    );

    let ack = a1.request(json!({"type": "leave", "room": "news"})).await;
    assert_eq!(ack["status"], "ok", "{ack}");
    b1.close().await;
    let inst0 = &inst[0];
    eventually(
        RECV_TIMEOUT,
        "i1: 2 connections, 1 user, 1 room",
        || async move {
            let body = inst0.api_get("/api/v1/stats", Some(KEY)).await.json();
            body["connections"] == 2 && body["users"] == 1 && body["rooms"] == 1
        },
    )
    .await;

    // Uptime counts seconds: it reaches 1 (the instance started before
    // this point, so within a second; 2 s leaves room for a slow request).
    eventually(Duration::from_secs(2), "uptime_s reaches 1", || async {
        stats(0).await["uptime_s"].as_u64().expect("uptime_s") >= 1
    })
    .await;

    let broadcast = Instance::spawn(opts!("b9").routing("broadcast").flag("--api-key", KEY)).await;
    let body = broadcast.api_get("/api/v1/stats", Some(KEY)).await.json();
    assert_eq!(
        (body["instance"].clone(), body["routing"].clone()),
        (json!("b9"), json!("broadcast")),
        "{body}"
    );
}

// ---------------------------------------------------------------------------
// OpenAPI conformance
// ---------------------------------------------------------------------------

fn load_spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

/// Follows a local `$ref` (`#/components/...`) until a non-reference.
fn resolve<'a>(spec: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(reference) = node.get("$ref").and_then(Value::as_str) else {
            return node;
        };
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $ref are supported: {reference}"));
        node = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"));
    }
    panic!("$ref chain too long");
}

fn json_type_ok(ty: &str, value: &Value) -> bool {
    match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "null" => value.is_null(),
        other => panic!("unsupported schema type {other}"),
    }
}

/// Checks `value` against a (resolved) schema: type, required properties,
/// property types, enums, integer minimums and array items.
fn check_schema(spec: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        if !json_type_ok(ty, value) {
            out.push(format!("{at}: expected {ty}, got {value}"));
            return;
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            out.push(format!("{at}: {value} is not one of {options:?}"));
        }
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < min {
            out.push(format!("{at}: {n} is below the minimum {min}"));
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if value.get(name).is_none() {
                out.push(format!(
                    "{at}: required property `{name}` is missing in {value}"
                ));
            }
        }
    }
    if let (Some(properties), Some(object)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) {
        for (name, property) in properties {
            if let Some(v) = object.get(name) {
                check_schema(spec, property, v, &format!("{at}.{name}"), out);
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            check_schema(spec, items, v, &format!("{at}[{i}]"), out);
        }
    }
}

/// One representative request and what came back.
struct Exchange {
    label: String,
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Exchange {
    fn from_http(label: &str, response: HttpResponse) -> Exchange {
        Exchange {
            label: label.to_string(),
            status: response.status,
            content_type: response.header("content-type").map(str::to_string),
            body: response.body,
        }
    }
}

/// A WebSocket upgrade by hand: 101 or the refusal.
async fn upgrade(inst: &Instance, label: &str, query: &str, extra: &[(&str, &str)]) -> Exchange {
    upgrade_and_keep(inst, label, query, extra).await.0
}

/// [`upgrade`], also returning the socket of an accepted upgrade.
async fn upgrade_and_keep(
    inst: &Instance,
    label: &str,
    query: &str,
    extra: &[(&str, &str)],
) -> (Exchange, Option<RawWs>) {
    match RawWs::upgrade(inst.addr(), query, extra).await {
        Ok(socket) => (
            Exchange {
                label: label.to_string(),
                status: 101,
                content_type: None,
                body: Vec::new(),
            },
            Some(socket),
        ),
        Err(response) => (Exchange::from_http(label, response), None),
    }
}

/// Checks every exchange of one operation against its documented responses.
fn check_operation(
    spec: &Value,
    op_name: &str,
    operation: &Value,
    exchanges: &[Exchange],
) -> Vec<String> {
    let mut out = Vec::new();
    let responses = operation["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("{op_name} has no responses"));
    for ex in exchanges {
        let at = format!("{op_name} [{}]", ex.label);
        let Some(documented) = responses.get(&ex.status.to_string()) else {
            out.push(format!(
                "{at}: status {} is not documented (documented: {:?}); body {:?}",
                ex.status,
                responses.keys().collect::<Vec<_>>(),
                String::from_utf8_lossy(&ex.body)
            ));
            continue;
        };
        let documented = resolve(spec, documented);
        let Some(schema) = documented.pointer("/content/application~1json/schema") else {
            continue;
        };
        if !ex
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/json"))
        {
            out.push(format!(
                "{at}: documented as application/json, content-type is {:?}",
                ex.content_type
            ));
        }
        match serde_json::from_slice::<Value>(&ex.body) {
            Ok(value) => check_schema(spec, schema, &value, &at, &mut out),
            Err(e) => out.push(format!(
                "{at}: body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&ex.body)
            )),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_conforms_to_the_openapi_description() {
    let spec = load_spec();
    let redis = RedisServer::start().await;
    let (api, disabled) = tokio::join!(
        Instance::spawn(
            opts!("o1")
                .redis(&redis)
                .flag("--api-key", KEY)
                .flag("--max-body-bytes", 1024)
                .flag("--max-connections-per-user", 1)
                .flag("--allowed-origins", "https://chat.example.com"),
        ),
        Instance::spawn(opts!("o2").redis(&redis)),
    );
    // A real user for `{user}`, online on o2; dave (also on o2, in lobby)
    // is the one the disconnect and kick requests act on.
    let _bob = Client::connect_user(&disabled, "bob").await;
    let mut dave = Client::connect_user(&disabled, "dave").await;
    dave.request(json!({"type": "join", "room": "lobby"})).await;
    let api_ref = &api;
    eventually(RECV_TIMEOUT, "o1 is ready", || async move {
        api_ref.http_status("/readyz").await == Some(200)
    })
    .await;

    let auth = format!("Bearer {KEY}");
    let json_ct = ("Content-Type", "application/json");
    let authorized = [("Authorization", auth.as_str()), json_ct];
    let wrong = [("Authorization", "Bearer wrong"), json_ct];

    let long = "u".repeat(65);
    let paths = spec["paths"].as_object().expect("spec has paths");
    let mut violations = Vec::new();
    let mut exercised = 0;
    for (path, item) in paths {
        let item = item.as_object().expect("path item is a map");
        for (method, operation) in item {
            if !["get", "post", "put", "patch", "delete", "head", "options"]
                .contains(&method.as_str())
            {
                continue;
            }
            let op_name = format!("{} {path}", method.to_uppercase());
            let m = method.to_uppercase();
            let mut exchanges = Vec::new();
            match (method.as_str(), path.as_str()) {
                ("post", "/api/v1/publish") => {
                    let p = || path.to_string();
                    for (label, inst, headers, body) in [
                        (
                            "to a user",
                            &api,
                            authorized.to_vec(),
                            br#"{"user":"bob","body":{"a":1},"from":"svc"}"#.to_vec(),
                        ),
                        (
                            "to a user nowhere",
                            &api,
                            authorized.to_vec(),
                            br#"{"user":"nobody","body":1}"#.to_vec(),
                        ),
                        (
                            "to a room",
                            &api,
                            authorized.to_vec(),
                            br#"{"room":"lobby","body":[1]}"#.to_vec(),
                        ),
                        (
                            "no key",
                            &api,
                            vec![json_ct],
                            br#"{"user":"bob","body":1}"#.to_vec(),
                        ),
                        (
                            "wrong key",
                            &api,
                            wrong.to_vec(),
                            br#"{"user":"bob","body":1}"#.to_vec(),
                        ),
                        (
                            "API disabled",
                            &disabled,
                            authorized.to_vec(),
                            br#"{"user":"bob","body":1}"#.to_vec(),
                        ),
                        ("not JSON", &api, authorized.to_vec(), b"nope".to_vec()),
                        (
                            "bad name",
                            &api,
                            authorized.to_vec(),
                            br#"{"user":"b b","body":1}"#.to_vec(),
                        ),
                        (
                            "no body",
                            &api,
                            authorized.to_vec(),
                            br#"{"room":"lobby"}"#.to_vec(),
                        ),
                        (
                            "both targets",
                            &api,
                            authorized.to_vec(),
                            br#"{"user":"bob","room":"lobby","body":1}"#.to_vec(),
                        ),
                        (
                            "body too large",
                            &api,
                            authorized.to_vec(),
                            json!({"user": "bob", "body": "x".repeat(2000)})
                                .to_string()
                                .into_bytes(),
                        ),
                        (
                            "request too large",
                            &api,
                            authorized.to_vec(),
                            json!({"user": "bob", "body": "x".repeat(9000)})
                                .to_string()
                                .into_bytes(),
                        ),
                    ] {
                        exchanges.push(Exchange::from_http(
                            label,
                            inst.http(&m, &p(), &headers, &body).await,
                        ));
                    }
                }
                ("get", "/api/v1/presence/{user}") => {
                    let p = |user: &str| path.replace("{user}", user);
                    for (label, inst, headers, user) in [
                        ("online user", &api, authorized.to_vec(), "bob"),
                        ("offline user", &api, authorized.to_vec(), "carol"),
                        ("no key", &api, vec![], "bob"),
                        ("wrong key", &api, wrong.to_vec(), "bob"),
                        ("API disabled", &disabled, authorized.to_vec(), "bob"),
                        ("invalid name", &api, authorized.to_vec(), "a%20b"),
                        ("too long", &api, authorized.to_vec(), long.as_str()),
                    ] {
                        exchanges.push(Exchange::from_http(
                            label,
                            inst.http(&m, &p(user), &headers, b"").await,
                        ));
                    }
                }
                ("get", "/api/v1/rooms/{room}/members") => {
                    let p = |room: &str| path.replace("{room}", room);
                    for (label, inst, headers, room) in [
                        ("a room", &api, authorized.to_vec(), "lobby"),
                        ("an empty room", &api, authorized.to_vec(), "nobody-here"),
                        ("no key", &api, vec![], "lobby"),
                        ("wrong key", &api, wrong.to_vec(), "lobby"),
                        ("API disabled", &disabled, authorized.to_vec(), "lobby"),
                        ("invalid name", &api, authorized.to_vec(), "a%20b"),
                        ("too long", &api, authorized.to_vec(), long.as_str()),
                    ] {
                        exchanges.push(Exchange::from_http(
                            label,
                            inst.http(&m, &p(room), &headers, b"").await,
                        ));
                    }
                }
                ("post", "/api/v1/disconnect" | "/api/v1/rooms/{room}/kick") => {
                    let p = |room: &str| path.replace("{room}", room);
                    let kick = path.ends_with("/kick");
                    let good: &[u8] = if kick {
                        br#"{"user":"dave"}"#
                    } else {
                        br#"{"user":"dave","reason":"maintenance"}"#
                    };
                    let long_reason = json!({"user": "dave", "reason": "r".repeat(101)})
                        .to_string()
                        .into_bytes();
                    for (label, inst, headers, room, body) in [
                        (
                            "a user online elsewhere",
                            &api,
                            authorized.to_vec(),
                            "lobby",
                            good.to_vec(),
                        ),
                        (
                            "a user nowhere",
                            &api,
                            authorized.to_vec(),
                            "lobby",
                            br#"{"user":"nobody"}"#.to_vec(),
                        ),
                        ("no key", &api, vec![json_ct], "lobby", good.to_vec()),
                        ("wrong key", &api, wrong.to_vec(), "lobby", good.to_vec()),
                        (
                            "API disabled",
                            &disabled,
                            authorized.to_vec(),
                            "lobby",
                            good.to_vec(),
                        ),
                        (
                            "not JSON",
                            &api,
                            authorized.to_vec(),
                            "lobby",
                            b"nope".to_vec(),
                        ),
                        (
                            "bad user",
                            &api,
                            authorized.to_vec(),
                            "lobby",
                            br#"{"user":"a b"}"#.to_vec(),
                        ),
                        (
                            "unknown field",
                            &api,
                            authorized.to_vec(),
                            "lobby",
                            br#"{"user":"dave","ban":true}"#.to_vec(),
                        ),
                        (
                            "reason too long",
                            &api,
                            authorized.to_vec(),
                            "lobby",
                            long_reason,
                        ),
                        (
                            "bad room",
                            &api,
                            authorized.to_vec(),
                            "a%20b",
                            good.to_vec(),
                        ),
                    ] {
                        if label == "bad room" && !kick {
                            continue;
                        }
                        exchanges.push(Exchange::from_http(
                            label,
                            inst.http(&m, &p(room), &headers, &body).await,
                        ));
                    }
                }
                ("get", "/api/v1/stats") => {
                    for (label, inst, headers) in [
                        ("authorized", &api, authorized.to_vec()),
                        ("no key", &api, vec![]),
                        ("wrong key", &api, wrong.to_vec()),
                        ("API disabled", &disabled, authorized.to_vec()),
                    ] {
                        exchanges.push(Exchange::from_http(
                            label,
                            inst.http(&m, path, &headers, b"").await,
                        ));
                    }
                }
                ("get", "/ws") => {
                    // alice holds her one allowed connection while the others run.
                    let (valid, _alice) = upgrade_and_keep(&api, "valid", "user=alice", &[]).await;
                    exchanges.push(valid);
                    exchanges
                        .push(upgrade(&api, "second connection of alice", "user=alice", &[]).await);
                    exchanges.push(upgrade(&api, "no credentials", "", &[]).await);
                    exchanges.push(upgrade(&api, "invalid user", "user=a%20b", &[]).await);
                    exchanges.push(
                        upgrade(
                            &api,
                            "allowed origin",
                            "user=zed",
                            &[("Origin", "https://chat.example.com")],
                        )
                        .await,
                    );
                    exchanges.push(
                        upgrade(
                            &api,
                            "foreign origin",
                            "user=eve",
                            &[("Origin", "https://evil.example")],
                        )
                        .await,
                    );
                }
                ("get", "/healthz" | "/readyz" | "/metrics") => {
                    for (label, inst) in [
                        ("instance with API", &api),
                        ("instance without API", &disabled),
                    ] {
                        exchanges.push(Exchange::from_http(
                            label,
                            inst.http(&m, path, &[], b"").await,
                        ));
                    }
                }
                _ => {
                    violations.push(format!(
                        "{op_name} is in docs/openapi.yaml but this test does not exercise it: add requests for it"
                    ));
                    continue;
                }
            }
            exercised += 1;
            let statuses: BTreeSet<u16> = exchanges.iter().map(|e| e.status).collect();
            assert!(
                statuses.iter().any(|s| (200..300).contains(s) || *s == 101),
                "{op_name}: no representative request succeeded: {statuses:?}"
            );
            violations.extend(check_operation(&spec, &op_name, operation, &exchanges));
        }
    }
    assert_eq!(exercised, 10, "the spec describes 10 operations");

    // No /api/v1 route the spec lacks (with the right key, so that only
    // routing decides).
    let documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    for path in [
        "/api/v1/x",
        "/api/v1",
        "/api/v1/",
        "/api/v1/presence",
        "/api/v1/presence/",
        "/api/v1/presence/bob/x",
        "/api/v1/stats/x",
        "/api/v1/publish/x",
        "/api/v1/users",
        "/api/v1/rooms",
        "/api/v1/rooms/lobby",
        "/api/v1/instances",
        "/api/v1/health",
        "/api/v1/metrics",
        "/api/v2/stats",
    ] {
        for method in ["GET", "POST", "DELETE"] {
            let response = api.http(method, path, &authorized, b"{}").await;
            if response.status != 404 {
                violations.push(format!(
                    "{method} {path} (undocumented) answered {} {:?}, expected 404",
                    response.status,
                    response.text()
                ));
            }
        }
    }
    // Documented paths with undocumented methods are not served either.
    for (path, item) in paths {
        let concrete = path.replace("{user}", "bob").replace("{room}", "lobby");
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                continue;
            }
            let response = api
                .http(&method.to_uppercase(), &concrete, &authorized, b"{}")
                .await;
            if (200..300).contains(&response.status) {
                violations.push(format!(
                    "{} {concrete}: method not in the spec but answered {} {:?}",
                    method.to_uppercase(),
                    response.status,
                    response.text()
                ));
            }
        }
    }
    assert!(
        documented.contains(&"/api/v1/publish"),
        "spec paths: {documented:?}"
    );
    assert!(
        violations.is_empty(),
        "{} answer(s) do not match docs/openapi.yaml:\n  {}",
        violations.len(),
        violations.join("\n  ")
    );
}

/// The conformance checker itself must catch what it is meant to catch, or
/// the test above could pass vacuously.
#[test]
fn the_conformance_checker_reports_violations() {
    let spec = load_spec();
    let operation = &spec["paths"]["/api/v1/stats"]["get"];
    let exchange = |label: &str, status: u16, body: Value| Exchange {
        label: label.to_string(),
        status,
        content_type: Some("application/json".to_string()),
        body: body.to_string().into_bytes(),
    };
    let good = json!({"instance": "i1", "routing": "routed", "connections": 0,
        "users": 0, "rooms": 0, "uptime_s": 3});
    assert_eq!(
        check_operation(
            &spec,
            "GET /api/v1/stats",
            operation,
            &[exchange("good", 200, good.clone())]
        ),
        Vec::<String>::new()
    );
    let mut missing = good.clone();
    missing.as_object_mut().expect("object").remove("rooms");
    let mut bad_enum = good.clone();
    bad_enum["routing"] = json!("sideways");
    let mut bad_type = good.clone();
    bad_type["users"] = json!("2");
    let mut negative = good.clone();
    negative["uptime_s"] = json!(-1);
    for (label, status, body) in [
        ("undocumented status", 418, good),
        ("missing required", 200, missing),
        ("enum", 200, bad_enum),
        ("type", 200, bad_type),
        ("minimum", 200, negative),
        ("error schema", 401, json!({"code": "x"})),
    ] {
        let found = check_operation(
            &spec,
            "GET /api/v1/stats",
            operation,
            &[exchange(label, status, body)],
        );
        assert_eq!(found.len(), 1, "{label}: {found:?}");
    }
}
