//! Malformed and hostile client input (embedded mode, `--max-frame-bytes 1024`).

use serde_json::{json, Value};
use switchboard_testkit::{assert_error, assert_healthy, opts, Client, Instance, RECV_TIMEOUT};

async fn small_frames_instance() -> Instance {
    Instance::spawn(opts!("b1").max_frame_bytes(1024)).await
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

/// Sends `text` as one text frame and returns the next frame (the reply:
/// nothing else is pushed to this connection).
async fn reply_to(client: &mut Client, text: &str) -> Value {
    client.send_text(text).await;
    client.recv_json().await
}

/// Checks one hostile frame's reply: the error code (or, with `None`, that
/// the reply is not an error) and the id (`None`: the reply has no `id` key).
fn check_reply(
    reply: &Value,
    code: Option<&str>,
    id: Option<&Value>,
    what: &str,
    out: &mut Vec<String>,
) {
    match code {
        Some(code) if reply["type"] != "error" || reply["code"] != code => {
            out.push(format!("{what}: expected error {code:?}, got {reply}"));
        }
        Some(_) if !reply["message"].is_string() => {
            out.push(format!("{what}: error without a message: {reply}"));
        }
        None if reply["type"] == "error" => out.push(format!("{what}: unexpected error {reply}")),
        _ => {}
    }
    match id {
        Some(id) if reply.get("id") != Some(id) => {
            out.push(format!("{what}: reply must carry id {id}, got {reply}"));
        }
        None if reply.get("id").is_some() => {
            out.push(format!("{what}: reply must carry no id, got {reply}"));
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frame_matrix_gets_precise_errors_and_the_instance_stays_healthy() {
    let inst = small_frames_instance().await;
    let mut c = Client::connect_user(&inst, "alice").await;
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let deep_objects = |n: usize| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n));
    let long_id = format!(r#"{{"type":"ping","id":"{}"}}"#, "i".repeat(200));
    let bad = Some("bad_request");
    let invalid = Some("invalid_name");

    // (what, frame text, expected error code (None: a success), expected id)
    let cases: Vec<(&str, String, Option<&str>, Option<Value>)> = vec![
        // Not JSON at all, or not an object: no id can be read.
        (
            "truncated JSON",
            r#"{"type":"ping","id":1"#.into(),
            bad,
            None,
        ),
        (
            "trailing garbage",
            r#"{"type":"ping","id":1}}"#.into(),
            bad,
            None,
        ),
        (
            "trailing comma",
            r#"{"type":"ping","id":1,}"#.into(),
            bad,
            None,
        ),
        ("single quotes", "{'type':'ping','id':1}".into(), bad, None),
        ("bare word", "nul".into(), bad, None),
        ("number", "42".into(), bad, None),
        ("null", "null".into(), bad, None),
        ("whitespace", "   ".into(), bad, None),
        // Ids that are not a string or a 64-bit integer.
        ("id 1.5", r#"{"type":"ping","id":1.5}"#.into(), bad, None),
        ("id true", r#"{"type":"ping","id":true}"#.into(), bad, None),
        ("id array", r#"{"type":"ping","id":[1]}"#.into(), bad, None),
        (
            "id object",
            r#"{"type":"ping","id":{"a":1}}"#.into(),
            bad,
            None,
        ),
        (
            "id 1e400",
            r#"{"type":"ping","id":1e400}"#.into(),
            bad,
            None,
        ),
        (
            "id beyond 64 bits",
            r#"{"type":"ping","id":123456789012345678901234567890}"#.into(),
            bad,
            None,
        ),
        ("id of 200 characters", long_id, bad, None),
        // Valid ids at the edges are echoed.
        (
            "id u64::MAX",
            r#"{"type":"ping","id":18446744073709551615}"#.into(),
            None,
            Some(json!(18446744073709551615u64)),
        ),
        (
            "id i64::MIN",
            r#"{"type":"ping","id":-9223372036854775808}"#.into(),
            None,
            Some(json!(i64::MIN)),
        ),
        // Wrong types, with a readable id.
        (
            "type is a list",
            r#"{"type":["ping"],"id":2}"#.into(),
            bad,
            Some(json!(2)),
        ),
        (
            "type is null",
            r#"{"type":null,"id":3}"#.into(),
            bad,
            Some(json!(3)),
        ),
        (
            "type 1e400",
            r#"{"type":1e400,"id":4}"#.into(),
            bad,
            Some(json!(4)),
        ),
        (
            "to is a list",
            r#"{"type":"dm","to":["bob"],"body":1,"id":5}"#.into(),
            bad,
            Some(json!(5)),
        ),
        (
            "to is null",
            r#"{"type":"dm","to":null,"body":1,"id":6}"#.into(),
            bad,
            Some(json!(6)),
        ),
        (
            "to is a huge integer",
            r#"{"type":"dm","to":123456789012345678901234567890,"body":1,"id":7}"#.into(),
            bad,
            Some(json!(7)),
        ),
        (
            "to is 1e400",
            r#"{"type":"dm","to":1e400,"body":1,"id":8}"#.into(),
            bad,
            Some(json!(8)),
        ),
        (
            "room is an object",
            r#"{"type":"join","room":{"name":"x"},"id":9}"#.into(),
            bad,
            Some(json!(9)),
        ),
        (
            "users are numbers",
            r#"{"type":"presence","users":[1,2],"id":10}"#.into(),
            bad,
            Some(json!(10)),
        ),
        (
            "users is null",
            r#"{"type":"presence","users":null,"id":11}"#.into(),
            bad,
            Some(json!(11)),
        ),
        (
            "users is an object",
            r#"{"type":"presence","users":{"bob":true},"id":12}"#.into(),
            bad,
            Some(json!(12)),
        ),
        (
            "dm without body",
            r#"{"type":"dm","to":"bob","id":13}"#.into(),
            bad,
            Some(json!(13)),
        ),
        (
            "room message without body",
            r#"{"type":"room","room":"lobby","id":14}"#.into(),
            bad,
            Some(json!(14)),
        ),
        // Names.
        (
            "empty user in presence",
            r#"{"type":"presence","users":[""],"id":15}"#.into(),
            invalid,
            Some(json!(15)),
        ),
        (
            "one bad user among good ones",
            r#"{"type":"presence","users":["bob","b d"],"id":16}"#.into(),
            invalid,
            Some(json!(16)),
        ),
        (
            "non-ASCII name",
            r#"{"type":"dm","to":"böb","body":1,"id":17}"#.into(),
            invalid,
            Some(json!(17)),
        ),
        (
            "name with a brace",
            r#"{"type":"join","room":"a{b}","id":18}"#.into(),
            invalid,
            Some(json!(18)),
        ),
        // Nesting: 64 levels is the limit.
        (
            "body nested 65 deep (arrays)",
            format!(r#"{{"type":"dm","to":"bob","body":{},"id":19}}"#, deep(65)),
            bad,
            Some(json!(19)),
        ),
        (
            "body nested 65 deep (objects)",
            format!(
                r#"{{"type":"dm","to":"bob","body":{},"id":20}}"#,
                deep_objects(65)
            ),
            bad,
            Some(json!(20)),
        ),
        (
            "room body nested 100 deep",
            format!(
                r#"{{"type":"room","room":"lobby","body":{},"id":21}}"#,
                deep(100)
            ),
            bad,
            Some(json!(21)),
        ),
        (
            "body nested 64 deep",
            format!(
                r#"{{"type":"dm","to":"nobody","body":{},"id":22}}"#,
                deep(64)
            ),
            None,
            Some(json!(22)),
        ),
        (
            "brackets inside strings do not count",
            format!(
                r#"{{"type":"dm","to":"nobody","body":["{}"],"id":23}}"#,
                "[".repeat(200)
            ),
            None,
            Some(json!(23)),
        ),
        // Unknown fields are ignored; `"id": null` is no id.
        (
            "unknown fields",
            r#"{"type":"ping","id":24,"extra":{"x":[1,2]},"from":"mallory","v":2}"#.into(),
            None,
            Some(json!(24)),
        ),
        (
            "id null on ping",
            r#"{"type":"ping","id":null}"#.into(),
            None,
            None,
        ),
        (
            "id null on an unknown type",
            r#"{"type":"dance","id":null}"#.into(),
            Some("unknown_type"),
            None,
        ),
        (
            "id null on a dm",
            r#"{"type":"dm","to":"nobody","body":1,"id":null}"#.into(),
            None,
            None,
        ),
    ];

    let mut failures = Vec::new();
    for (what, text, code, id) in &cases {
        let reply = reply_to(&mut c, text).await;
        check_reply(&reply, *code, id.as_ref(), what, &mut failures);
        assert_healthy(&mut c, what).await;
        assert_eq!(
            inst.http_get("/healthz").await.0,
            200,
            "/healthz after {what}"
        );
    }

    // Exact replies where the content matters.
    assert_eq!(
        reply_to(&mut c, r#"{"type":"ping","id":null}"#).await,
        json!({"type": "pong"}),
        "`\"id\": null` is the same as no id"
    );
    assert_eq!(
        reply_to(&mut c, r#"{"type":"ping","id":18446744073709551615}"#).await,
        json!({"type": "pong", "id": 18446744073709551615u64})
    );

    // Binary frames, valid UTF-8 or not.
    for (what, data) in [
        ("binary invalid UTF-8", vec![0xff, 0xfe, 0xfd, 0x00, 0x80]),
        (
            "binary truncated UTF-8",
            b"{\"type\":\"ping\",\"x\":\"\xe2\x82\"}".to_vec(),
        ),
        ("empty binary frame", Vec::new()),
    ] {
        c.send_binary(data).await;
        let reply = c.recv_json().await;
        check_reply(&reply, bad, None, what, &mut failures);
        assert_healthy(&mut c, what).await;
        assert_eq!(
            inst.http_get("/healthz").await.0,
            200,
            "/healthz after {what}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} hostile frame(s) got the wrong reply:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_at_the_nesting_limit_and_unknown_fields_reach_the_recipient() {
    let inst = small_frames_instance().await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;

    let body_text = format!("{}\"core\"{}", "[".repeat(64), "]".repeat(64));
    let frame = format!(
        r#"{{"type":"dm","to":"bob","body":{body_text},"id":1,"from":"mallory","extra":{{"k":[1]}}}}"#
    );
    let ack = reply_to(&mut alice, &frame).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(ack["id"], 1, "{ack}");
    let dm = bob.recv_type("dm").await;
    assert_eq!(
        dm["from"], "alice",
        "a `from` field in a client frame is ignored: {dm}"
    );
    let expected: Value = serde_json::from_str(&body_text).expect("64-deep JSON");
    assert_eq!(dm["body"], expected, "the 64-deep body arrives intact");
    assert!(
        dm.get("extra").is_none(),
        "unknown fields are not forwarded: {dm}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_character_names_and_very_deep_bodies() {
    // Default frame limit (64 KiB), so that these frames arrive whole.
    let inst = Instance::spawn(opts!("b2")).await;
    let mut c = Client::connect_user(&inst, "alice").await;
    let huge = "n".repeat(10_000);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "dm to",
            json!({"type": "dm", "to": huge, "body": 1, "id": 1}),
            "invalid_name",
        ),
        (
            "join",
            json!({"type": "join", "room": huge, "id": 2}),
            "invalid_name",
        ),
        (
            "leave",
            json!({"type": "leave", "room": huge, "id": 3}),
            "invalid_name",
        ),
        (
            "room message",
            json!({"type": "room", "room": huge, "body": 1, "id": 4}),
            "invalid_name",
        ),
        (
            "presence",
            json!({"type": "presence", "users": ["bob", huge], "id": 5}),
            "invalid_name",
        ),
        ("type", json!({"type": huge, "id": 6}), "unknown_type"),
    ];
    for (what, frame, code) in cases {
        let reply = c.request(frame.clone()).await;
        assert_error(&reply, code, &format!("10,000-character name: {what}"));
        assert_eq!(reply["id"], frame["id"], "{what}: {reply}");
        assert_healthy(&mut c, what).await;
    }

    // A 10,000-character id cannot be echoed: refused without one.
    let reply = reply_to(&mut c, &json!({"type": "ping", "id": huge}).to_string()).await;
    assert_error(&reply, "bad_request", "10,000-character id");
    assert!(reply.get("id").is_none(), "{reply}");
    assert_healthy(&mut c, "10,000-character id").await;

    // 30,000 levels of nesting: refused, no stack overflow.
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let reply = reply_to(
        &mut c,
        &format!(r#"{{"type":"dm","to":"bob","body":{deep},"id":"deep"}}"#),
    )
    .await;
    assert_error(&reply, "bad_request", "body nested 30,000 deep");
    assert_eq!(reply["id"], "deep", "the id is readable: {reply}");
    assert_healthy(&mut c, "a 30,000-deep body").await;
    let reply = reply_to(&mut c, &format!(r#"{{"type":"ping","x":{deep}}}"#)).await;
    assert!(
        reply["type"] == "pong" || reply["code"] == "bad_request",
        "a deep unknown field is ignored or refused: {reply}"
    );
    assert_healthy(&mut c, "a 30,000-deep unknown field").await;

    // A 10,000-character user id at the upgrade.
    assert_eq!(
        Client::rejection_status(inst.ws_request(&format!("user={huge}"))).await,
        401,
        "an invalid user id is refused with 401 (docs/PROTOCOL.md)"
    );
    assert_eq!(inst.http_get("/healthz").await.0, 200);
}

/// A JSON array is not a frame, even one whose elements would fill a
/// frame's fields in order (serde reads a struct from a sequence): it is
/// refused as `bad_request`, never handled, and the error names no internal
/// type. The same holds for a server-side publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_arrays_are_bad_requests_not_frames() {
    const KEY: &str = "test-api-key-0123456789";
    let inst = Instance::spawn(opts!("b3").max_frame_bytes(1024).flag("--api-key", KEY)).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    let mut bob = Client::connect_user(&inst, "bob").await;
    let leaks = |message: &str| {
        ["RawFrame", "RawPublish", "elements", "struct"]
            .into_iter()
            .filter(|word| message.contains(word))
            .collect::<Vec<_>>()
    };

    let mut failures = Vec::new();
    for (what, text) in [
        ("a ping as an array", r#"["ping",7]"#),
        (
            "a dm to bob as an array",
            r#"["dm",1,"bob",null,{"text":"x"},null,true]"#,
        ),
        ("an array too short for a frame", r#"["ping"]"#),
        ("an array after whitespace", " \n\t[\"ping\",8]"),
    ] {
        let reply = reply_to(&mut alice, text).await;
        check_reply(&reply, Some("bad_request"), None, what, &mut failures);
        let message = reply["message"].as_str().unwrap_or_default();
        if !leaks(message).is_empty() {
            failures.push(format!("{what}: the error leaks internals: {reply}"));
        }
        assert_healthy(&mut alice, what).await;
    }

    for (what, body) in [
        (
            "a publish to bob as an array",
            r#"["bob",null,{"text":"x"},null]"#,
        ),
        ("an array too short for a publish", r#"["bob"]"#),
    ] {
        let response = inst
            .api_post("/api/v1/publish", Some(KEY), body.as_bytes())
            .await;
        let reply = response.json();
        let message = reply["error"].as_str().unwrap_or_default();
        if response.status != 400 || reply["code"] != "bad_request" {
            failures.push(format!(
                "{what}: expected 400 bad_request, got {} {reply}",
                response.status
            ));
        } else if !leaks(message).is_empty() {
            failures.push(format!("{what}: the error leaks internals: {reply}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} array(s) got the wrong answer:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );

    // Nothing reached bob. Embedded mode delivers while the sender's frame
    // (or the publish request) is handled, before its reply, so a DM sent
    // after the arrays is queued to bob after anything they could have
    // sent him.
    let sentinel = alice.send_sentinel_dm("bob").await;
    bob.expect_nothing_before(&sentinel).await;
}
