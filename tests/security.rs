//! Who may get in, and for how long (issue 13), as a client and a backend see
//! it: real server processes, real WebSocket clients, real Redis for what
//! must act on every instance.
//!
//! - Room authorization (`--room-auth token`, the default with `--auth jwt`):
//!   the connection token's `rooms` claim (exact, `prefix*`, `*`, absent,
//!   malformed) or a per-room token in the join (its user, its room, its
//!   signature, its exp, the audience); `--room-auth open`.
//! - DM policy (`--dm-policy any|token`): `dm: true`, `dm_to` (exact and
//!   prefix); the HTTP API is not subject to it.
//! - Token lifetime: `token_expiring`, `refresh` (ok, invalid, another
//!   user, fewer or more rooms), close 4001 at `exp`; per-room token expiry
//!   and renewal, and silence about rooms already left.
//! - Keys: RS256 and ES256 from `--jwt-public-key`; JWKS by `kid` (alg
//!   pinned per JWK), rotation, refetch on age, a bounded refetch rate, an
//!   outage, an oversized set; `alg: none`, HS256 keyed with the public key
//!   (alg confusion) and every other foreign `alg` refused.
//! - `POST /api/v1/disconnect` and `POST /api/v1/rooms/{R}/kick` on three
//!   instances: every holder of the user acts, told through Redis on its
//!   own channel (not broadcast), and nothing else changes.
//! - `switchboard token` and the start-up refusals.
//!
//! Keys are the test-only fixtures in `tests/fixtures` (see its README).
//! Times: tokens carry whole seconds, so a test about expiry takes `exp`
//! from the token it minted and checks what the server did against it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_testkit::jwks::{jwk_from_file, JwksServer};
use switchboard_testkit::jwt::{
    claims_for, header_of, unsigned_jwt, unsigned_jwt_with_header, unverified_claims, SigningKey,
};
use switchboard_testkit::{
    assert_error, assert_healthy, eventually, mint_jwt_claims, now_unix_ms, now_unix_secs, opts,
    unique, Auth, Client, Incoming, Instance, Opts, RawFrame, RawWs, RedisServer, RECV_TIMEOUT,
};

/// The HS256 secret (32 bytes or more: no start-up warning).
const SECRET: &str = "security-tests-hs256-secret-0123456789";
/// `--api-key` of the instances that serve the disconnect and kick API.
const API_KEY: &str = "security-tests-api-key-0123456789";
/// How much earlier than a computed instant the server may act and still
/// be right (its clock and ours are the same; timers do not fire early).
const CLOCK_SLACK_MS: i64 = 100;
/// The spec's bound for closing or leaving after an `exp`: within 2 s.
const EXPIRY_BOUND_MS: i64 = 2_000;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn rsa_a() -> SigningKey {
    SigningKey::rs256_file(fixture("rsa-a.private.pem"))
}

fn rsa_b() -> SigningKey {
    SigningKey::rs256_file(fixture("rsa-b.private.pem"))
}

fn ec() -> SigningKey {
    SigningKey::es256_file(fixture("ec.private.pem"))
}

/// The text of a public key PEM: what an alg-confusion attacker uses as an
/// HS256 secret.
fn public_pem(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).expect("read a public key fixture")
}

/// `sub`'s claims, expiring `ttl_secs` from now, with the fields of
/// `extra` (an object) added.
fn claims(sub: &str, ttl_secs: i64, extra: Value) -> Value {
    let mut claims = claims_for(sub, ttl_secs);
    if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        claims.extend(extra.clone());
    }
    claims
}

/// An HS256 token (the instances' `SECRET`).
fn hs(claims: &Value) -> String {
    mint_jwt_claims(SECRET, claims)
}

/// An hour-long HS256 connection token for `sub` with `extra` claims.
fn token(sub: &str, extra: Value) -> String {
    hs(&claims(sub, 3600, extra))
}

/// A per-room HS256 token for (`sub`, `room`), expiring `ttl_secs` from now.
fn room_token(sub: &str, room: &str, ttl_secs: i64) -> String {
    hs(&claims(sub, ttl_secs, json!({"room": room})))
}

/// `exp` of a token as unix ms.
fn exp_ms(token: &str) -> i64 {
    unverified_claims(token)["exp"]
        .as_i64()
        .unwrap_or_else(|| panic!("token without a numeric exp: {token}"))
        * 1000
}

/// `opts` with the server's default `--auth` (jwt) and `flag value` as its
/// key (`--jwt-public-key`, `--jwks-url`).
fn with_key(opts: Opts, flag: &str, value: impl ToString) -> Opts {
    opts.auth(Auth::Default).flag(flag, value)
}

/// The HTTP status that refuses an upgrade with `?token=<token>`.
async fn refusal(inst: &Instance, token: &str) -> u16 {
    Client::rejection_status(inst.ws_request(&format!("token={token}"))).await
}

/// Sends a join for `room`, with a per-room `token` when given; the reply.
async fn join(client: &mut Client, room: &str, token: Option<&str>) -> Value {
    let mut frame = json!({"type": "join", "room": room});
    if let Some(token) = token {
        frame["token"] = json!(token);
    }
    client.request(frame).await
}

/// A room message to `room`; the reply.
async fn say(client: &mut Client, room: &str) -> Value {
    client
        .request(json!({"type": "room", "room": room, "body": "hello"}))
        .await
}

/// The join is acked and the connection is a member (its room message is
/// accepted).
async fn assert_joins(client: &mut Client, room: &str, token: Option<&str>, what: &str) {
    let reply = join(client, room, token).await;
    assert_eq!(
        (&reply["type"], &reply["status"]),
        (&json!("ack"), &json!("ok")),
        "{what}: join {room} must be acked ok: {reply}"
    );
    assert_member(client, room, what).await;
}

async fn assert_member(client: &mut Client, room: &str, what: &str) {
    let reply = say(client, room).await;
    assert_eq!(
        (&reply["type"], &reply["status"]),
        (&json!("ack"), &json!("ok")),
        "{what}: a member's message to {room} must be acked ok: {reply}"
    );
}

async fn assert_not_member(client: &mut Client, room: &str, what: &str) {
    let reply = say(client, room).await;
    assert_error(&reply, "not_member", &format!("{what}: message to {room}"));
}

/// The join is refused with `forbidden` and nothing is joined.
async fn assert_join_forbidden(client: &mut Client, room: &str, token: Option<&str>, what: &str) {
    let reply = join(client, room, token).await;
    assert_error(&reply, "forbidden", &format!("{what}: join {room}"));
    assert_not_member(client, room, &format!("{what} (after the refused join)")).await;
}

/// Reads frames until the server's Close frame (at most `timeout`): the
/// frames before it, its code, and when it came (unix ms).
async fn frames_until_close(client: &mut Client, timeout: Duration) -> (Vec<Value>, u16, i64) {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    loop {
        match client
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Incoming::Json(frame) => frames.push(frame),
            Incoming::Closed(code) => {
                let at = now_unix_ms();
                let code = code.unwrap_or_else(|| panic!("a Close frame without a code"));
                return (frames, code, at);
            }
            Incoming::Timeout => {
                panic!("no Close frame within {timeout:?}; frames received: {frames:?}")
            }
            Incoming::Ended(e) => {
                panic!("the connection ended without a Close frame ({e}); frames: {frames:?}")
            }
        }
    }
}

/// Waits for the next frame of type `ty` (others stay buffered) and says
/// when it came (unix ms).
async fn recv_type_at(client: &mut Client, ty: &str) -> (Value, i64) {
    let frame = client.recv_type(ty).await;
    (frame, now_unix_ms())
}

/// `at` is no earlier than `earliest` (less the clock slack) and within
/// the expiry bound after `exp`.
fn assert_in_expiry_window(at: i64, earliest: i64, exp: i64, what: &str) {
    assert!(
        at >= earliest - CLOCK_SLACK_MS,
        "{what}: came {} ms too early",
        earliest - at
    );
    assert!(
        at <= exp + EXPIRY_BOUND_MS,
        "{what}: came {} ms after exp (bound {EXPIRY_BOUND_MS} ms)",
        at - exp
    );
}

/// A `token_expiring` frame for the connection (no `room`) or for `room`,
/// with `0 < in_ms <= warning_ms`.
fn assert_token_expiring(frame: &Value, room: Option<&str>, warning_ms: i64, what: &str) {
    assert_eq!(frame["type"], "token_expiring", "{what}: {frame}");
    assert_eq!(
        frame.get("room").and_then(Value::as_str),
        room,
        "{what}: room of {frame}"
    );
    let in_ms = frame["in_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: in_ms must be an integer: {frame}"));
    assert!(
        0 < in_ms && in_ms <= warning_ms,
        "{what}: in_ms must be in (0, {warning_ms}]: {frame}"
    );
}

// ---------------------------------------------------------------- rooms

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rooms_claim_decides_which_rooms_a_connection_may_join() {
    // No --room-auth: `token` is the default with --auth jwt.
    let inst = Instance::spawn(opts!("r1").jwt(SECRET)).await;
    // (user, rooms claim, room, allowed)
    let cases: &[(&str, Option<Value>, &str, bool)] = &[
        ("exact", Some(json!(["lobby"])), "lobby", true),
        ("exact", Some(json!(["lobby"])), "lobby-2", false),
        ("exact", Some(json!(["lobby"])), "lobb", false),
        ("prefix", Some(json!(["team-42:*"])), "team-42:x", true),
        (
            "prefix",
            Some(json!(["team-42:*"])),
            "team-42:general",
            true,
        ),
        ("prefix", Some(json!(["team-42:*"])), "team-43:x", false),
        ("prefix", Some(json!(["team-42:*"])), "team-42", false),
        ("prefix", Some(json!(["team-42:*"])), "xteam-42:x", false),
        ("both", Some(json!(["lobby", "ops:*"])), "ops:1", true),
        ("both", Some(json!(["lobby", "ops:*"])), "lobby", true),
        ("both", Some(json!(["lobby", "ops:*"])), "team-42:x", false),
        ("bare-prefix", Some(json!(["team-42*"])), "team-420", true),
        ("bare-prefix", Some(json!(["team-42*"])), "team-42:x", true),
        ("bare-prefix", Some(json!(["team-42*"])), "team-4", false),
        // A `*` inside is no pattern: it matches nothing (no room has one).
        ("inner-star", Some(json!(["te*m"])), "team", false),
        ("inner-star", Some(json!(["te*m"])), "te", false),
        ("star", Some(json!(["*"])), "lobby", true),
        ("star", Some(json!(["*"])), "any.room:at-all", true),
        ("empty", Some(json!([])), "lobby", false),
        ("absent", None, "lobby", false),
        ("absent", None, "team-42:x", false),
    ];
    let mut clients: Vec<(&str, Client)> = Vec::new();
    for (user, rooms, room, allowed) in cases {
        if !clients.iter().any(|(u, _)| u == user) {
            let extra = match rooms {
                Some(rooms) => json!({ "rooms": rooms }),
                None => json!({}),
            };
            clients.push((
                user,
                Client::connect_token(&inst, &token(user, extra)).await,
            ));
        }
        let client = &mut clients
            .iter_mut()
            .find(|(u, _)| u == user)
            .expect("connected above")
            .1;
        let what = format!("rooms claim {rooms:?}");
        if *allowed {
            assert_joins(client, room, None, &what).await;
        } else {
            assert_join_forbidden(client, room, None, &what).await;
        }
    }
    for (_, client) in &mut clients {
        assert_healthy(client, "joins allowed and refused").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_room_token_admits_only_its_user_to_its_room() {
    let inst = Instance::spawn(opts!("r2").jwt(SECRET)).await;
    // No rooms claim: every join below stands or falls with its room token.
    let mut alice = Client::connect_token(&inst, &token("alice", json!({}))).await;
    let mut bob = Client::connect_token(&inst, &token("bob", json!({}))).await;

    let good = room_token("alice", "vip:1", 60);
    let good_other_room = room_token("alice", "vip:3", 60);
    let tampered = {
        let t = room_token("alice", "vip:2", 60);
        let (head, sig) = t.rsplit_once('.').expect("three segments");
        let flipped = if sig.starts_with('A') { 'B' } else { 'A' };
        format!("{head}.{flipped}{}", &sig[1..])
    };
    let refused: Vec<(&str, String)> = vec![
        ("no token at all", String::new()),
        ("expired a minute ago", room_token("alice", "vip:2", -60)),
        ("for another room", good_other_room.clone()),
        ("for another user", room_token("bob", "vip:2", 60)),
        (
            "signed with another secret",
            mint_jwt_claims(
                "another-secret-0123456789-0123456789",
                &claims("alice", 60, json!({"room": "vip:2"})),
            ),
        ),
        ("tampered signature", tampered),
        ("no exp", hs(&json!({"sub": "alice", "room": "vip:2"}))),
        (
            "no room claim (a connection token)",
            token("alice", json!({})),
        ),
        (
            "alg none",
            unsigned_jwt(&claims("alice", 60, json!({"room": "vip:2"}))),
        ),
        (
            "RS256 on an HS256 server",
            rsa_a().mint(&claims("alice", 60, json!({"room": "vip:2"}))),
        ),
        ("not a JWT", "not.a.jwt".to_string()),
        // `room` is exact: a pattern there names no room.
        ("with room \"vip:*\"", room_token("alice", "vip:*", 60)),
        ("with room \"*\"", room_token("alice", "*", 60)),
        // Grants are the connection token's business, not a join's.
        (
            "a connection token with rooms [\"*\"]",
            token("alice", json!({"rooms": ["*"]})),
        ),
    ];
    for (what, t) in &refused {
        let t = (!t.is_empty()).then_some(t.as_str());
        assert_join_forbidden(&mut alice, "vip:2", t, &format!("per-room token {what}")).await;
    }

    assert_joins(&mut alice, "vip:1", Some(&good), "alice's own room token").await;
    assert_joins(
        &mut alice,
        "vip:3",
        Some(&good_other_room),
        "alice's token for vip:3",
    )
    .await;
    // A token lifted from alice is no use to bob.
    assert_join_forbidden(
        &mut bob,
        "vip:1",
        Some(&good),
        "bob with alice's room token",
    )
    .await;
    assert_healthy(&mut alice, "refused room tokens").await;
    assert_healthy(&mut bob, "a refused room token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audience_rule_applies_to_per_room_tokens() {
    let inst = Instance::spawn(
        opts!("r3")
            .jwt(SECRET)
            .flag("--jwt-audience", "switchboard"),
    )
    .await;
    let aud = json!({"aud": "switchboard"});
    let mut alice = Client::connect_token(&inst, &token("alice", aud.clone())).await;
    let with = |aud: Value| hs(&claims("alice", 60, json!({"room": "vip:1", "aud": aud})));
    assert_join_forbidden(
        &mut alice,
        "vip:1",
        Some(&room_token("alice", "vip:1", 60)),
        "a room token without aud",
    )
    .await;
    assert_join_forbidden(
        &mut alice,
        "vip:1",
        Some(&with(json!("another-service"))),
        "a room token for another aud",
    )
    .await;
    assert_joins(
        &mut alice,
        "vip:1",
        Some(&with(json!("switchboard"))),
        "a room token with the aud",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_auth_open_lets_every_user_join_every_room() {
    let (jwt_open, no_auth) = tokio::join!(
        Instance::spawn(opts!("o1").jwt(SECRET).flag("--room-auth", "open")),
        // --auth none: `open` is the default.
        Instance::spawn(opts!("o2")),
    );
    let mut alice = Client::connect_token(&jwt_open, &token("alice", json!({}))).await;
    let mut bob = Client::connect_user(&no_auth, "bob").await;
    for room in ["lobby", "team-42:x", "vip:1"] {
        assert_joins(
            &mut alice,
            room,
            None,
            "--auth jwt --room-auth open, no rooms claim",
        )
        .await;
        assert_joins(&mut bob, room, None, "--auth none").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grants_grant_nothing() {
    let inst = Instance::spawn(opts!("g1").jwt(SECRET).flag("--dm-policy", "token")).await;
    // Each either refuses the upgrade or grants nothing: never everything.
    let cases = [
        ("rooms as a string", json!({"rooms": "lobby"}), "join"),
        ("rooms of numbers", json!({"rooms": [1, 2]}), "join"),
        (
            "rooms as an object",
            json!({"rooms": {"lobby": true}}),
            "join",
        ),
        ("rooms of an empty pattern", json!({"rooms": [""]}), "join"),
        ("dm as a string", json!({"dm": "true"}), "dm"),
        ("dm as a number", json!({"dm": 1}), "dm"),
        ("dm_to as a string", json!({"dm_to": "bob"}), "dm"),
        ("dm_to of an empty pattern", json!({"dm_to": [""]}), "dm"),
    ];
    for (i, (what, grants, action)) in cases.into_iter().enumerate() {
        let t = token(&format!("user-{i}"), grants);
        let mut client = match Client::try_connect(inst.ws_request(&format!("token={t}"))).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 401, "{what}");
                continue;
            }
            Err(e) => panic!("{what}: no HTTP answer: {e}"),
            Ok(client) => client,
        };
        if action == "join" {
            assert_join_forbidden(&mut client, "lobby", None, what).await;
        } else {
            let reply = client
                .request(json!({"type": "dm", "to": "bob", "body": 1}))
                .await;
            assert_error(&reply, "forbidden", what);
        }
    }
}

// ---------------------------------------------------------------- DMs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_policy_any_lets_a_token_without_dm_grants_dm_anyone() {
    // No --dm-policy: `any` is the default.
    let inst = Instance::spawn(opts!("d1").jwt(SECRET)).await;
    let mut alice = Client::connect_token(&inst, &token("alice", json!({}))).await;
    let mut bob = Client::connect_token(&inst, &token("bob", json!({}))).await;
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": "hi"}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(bob.recv_type("dm").await["from"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dm_policy_token_lets_a_sender_dm_only_whom_its_token_names() {
    let inst = Instance::spawn(
        opts!("d2")
            .jwt(SECRET)
            .flag("--dm-policy", "token")
            .flag("--api-key", API_KEY),
    )
    .await;
    let mut recipients = Vec::new();
    for user in ["bob", "carol", "ops:1"] {
        recipients.push((
            user,
            Client::connect_token(&inst, &token(user, json!({}))).await,
        ));
    }
    // The one who may DM everyone sends the sentinels.
    let mut sentry = Client::connect_token(&inst, &token("sentry", json!({"dm": true}))).await;

    // (sender's dm claims, recipient, allowed); ops:2 and bo are offline.
    let cases: &[(Value, &str, bool)] = &[
        (json!({"dm": true}), "bob", true),
        (json!({"dm": true}), "ops:1", true),
        (json!({"dm_to": ["bob"]}), "bob", true),
        (json!({"dm_to": ["bob"]}), "carol", false),
        (json!({"dm_to": ["bob"]}), "bo", false),
        (json!({"dm_to": ["ops:*"]}), "ops:1", true),
        (json!({"dm_to": ["ops:*"]}), "ops:2", true),
        (json!({"dm_to": ["ops:*"]}), "bob", false),
        (json!({"dm_to": ["*"]}), "carol", true),
        (json!({"dm_to": []}), "bob", false),
        (json!({"dm": false}), "bob", false),
        (json!({}), "carol", false),
    ];
    for (i, (grants, to, allowed)) in cases.iter().enumerate() {
        let sender = format!("sender-{i}");
        let mut client = Client::connect_token(&inst, &token(&sender, grants.clone())).await;
        let reply = client
            .request(json!({"type": "dm", "to": to, "body": {"case": i}}))
            .await;
        let what = format!("{sender} with {grants} -> {to}");
        let online = recipients.iter_mut().find(|(u, _)| u == to);
        if *allowed {
            assert_eq!(reply["type"], "ack", "{what}: {reply}");
            let status = if online.is_some() {
                "routed"
            } else {
                "offline"
            };
            assert_eq!(reply["status"], status, "{what}: {reply}");
            if let Some((_, recipient)) = online {
                let dm = recipient.recv_type("dm").await;
                assert_eq!(
                    (&dm["from"], &dm["body"]),
                    (&json!(sender), &json!({"case": i})),
                    "{what}"
                );
            }
        } else {
            assert_error(&reply, "forbidden", &what);
            if let Some((_, recipient)) = online {
                // One instance: a DM that had gone out would have been
                // queued for the recipient before the sender's reply, so
                // before a sentinel sent after it.
                let sentinel = sentry.send_sentinel_dm(to).await;
                recipient.expect_nothing_before(&sentinel).await;
            }
        }
        assert_healthy(&mut client, &what).await;
    }

    // Server-side publishes are not the DM policy's business.
    let response = inst
        .api_post(
            "/api/v1/publish",
            Some(API_KEY),
            br#"{"user":"carol","body":"from the backend"}"#,
        )
        .await;
    assert_eq!(
        response.status,
        202,
        "HTTP publish under --dm-policy token: {}",
        response.text()
    );
    let carol = &mut recipients
        .iter_mut()
        .find(|(u, _)| *u == "carol")
        .expect("carol")
        .1;
    assert_eq!(carol.recv_type("dm").await["body"], "from the backend");
}

// ---------------------------------------------------------------- token lifetime

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_is_refreshed_once_then_closes_4001_at_its_exp() {
    const WARNING_MS: i64 = 2_000;
    let inst = Instance::spawn(
        opts!("t1")
            .jwt(SECRET)
            .flag("--token-expiry-warning-ms", WARNING_MS),
    )
    .await;
    // A second connection that never refreshes: the close reason as sent.
    let unrefreshed = hs(&claims("bob", 3, json!({})));
    let (mut reader, _writer) = RawWs::connect(inst.addr(), &format!("token={unrefreshed}"))
        .await
        .into_split();
    let raw_close = async {
        let frames = reader
            .read_until("the Close frame", Duration::from_secs(8), |f| {
                f.opcode == RawFrame::CLOSE
            })
            .await;
        let at = now_unix_ms();
        (frames, at)
    };

    let first = hs(&claims("alice", 3, json!({})));
    let first_exp = exp_ms(&first);
    let mut alice = Client::connect_token(&inst, &first).await;
    let alice_flow = async {
        let (warning, at) = recv_type_at(&mut alice, "token_expiring").await;
        assert_token_expiring(&warning, None, WARNING_MS, "first warning");
        assert_in_expiry_window(
            at,
            first_exp - WARNING_MS,
            first_exp,
            "the first token_expiring",
        );
        assert!(
            at < first_exp,
            "the warning must come before exp: {} ms late",
            at - first_exp
        );

        // Longer than the first: a close at the new exp shows that the
        // first exp passed harmlessly.
        let second = hs(&claims("alice", 5, json!({})));
        let second_exp = exp_ms(&second);
        let ack = alice
            .request(json!({"type": "refresh", "token": second, "id": 7}))
            .await;
        assert_eq!(
            ack,
            json!({"type": "ack", "id": 7, "status": "ok"}),
            "refresh reply"
        );

        let (warning, at) = recv_type_at(&mut alice, "token_expiring").await;
        assert_token_expiring(&warning, None, WARNING_MS, "second warning");
        assert_in_expiry_window(
            at,
            second_exp - WARNING_MS,
            second_exp,
            "the second token_expiring",
        );

        let (frames, code, at) = frames_until_close(&mut alice, Duration::from_secs(8)).await;
        assert_eq!(
            code, 4001,
            "close code after the refreshed token expired; frames {frames:?}"
        );
        assert_in_expiry_window(at, second_exp, second_exp, "the 4001 close");
        assert!(
            frames.iter().all(|f| f["type"] != "token_expiring"),
            "one token_expiring per deadline; after the second came {frames:?}"
        );
    };
    let ((raw_frames, raw_at), ()) = tokio::join!(raw_close, alice_flow);

    let close = raw_frames
        .last()
        .expect("read_until returns the Close frame");
    let (code, reason) = close
        .close_code_and_reason()
        .expect("a Close frame with a code");
    assert_eq!(
        (code, reason.as_str()),
        (4001, "token expired"),
        "close of the unrefreshed connection"
    );
    let exp = exp_ms(&unrefreshed);
    assert_in_expiry_window(raw_at, exp, exp, "the unrefreshed connection's close");
    let warnings = raw_frames
        .iter()
        .filter(|f| f.opcode == RawFrame::TEXT)
        .filter_map(|f| serde_json::from_slice::<Value>(&f.payload).ok())
        .filter(|v| v["type"] == "token_expiring")
        .count();
    assert_eq!(warnings, 1, "exactly one token_expiring before the close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_already_within_the_warning_is_warned_about_at_connect() {
    // Default warning: 30 s.
    let inst = Instance::spawn(opts!("t2").jwt(SECRET)).await;
    let mut alice = Client::connect_token(&inst, &hs(&claims("alice", 10, json!({})))).await;
    let warning = alice.recv_type("token_expiring").await;
    assert_token_expiring(
        &warning,
        None,
        10_000,
        "a token 10 s from exp, 30 s warning",
    );
    // And an hour-long token gets none: bob's pong comes first.
    let mut bob = Client::connect_token(&inst, &token("bob", json!({}))).await;
    let pong = bob.request(json!({"type": "ping", "id": "p"})).await;
    assert_eq!(pong["type"], "pong");
    match bob.next_event(Duration::ZERO).await {
        Incoming::Timeout => {}
        other => panic!("an hour-long token: no token_expiring, nothing else; got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_for_another_user_is_refused_and_closes_4003() {
    let inst = Instance::spawn(opts!("t3").jwt(SECRET)).await;
    let (mut reader, mut writer) =
        RawWs::connect(inst.addr(), &format!("token={}", token("alice", json!({}))))
            .await
            .into_split();
    let refresh = json!({"type": "refresh", "token": token("bob", json!({})), "id": 3});
    writer
        .send_text(&refresh.to_string())
        .await
        .expect("send the refresh");
    let frames = reader
        .read_until("the Close frame", RECV_TIMEOUT, |f| {
            f.opcode == RawFrame::CLOSE
        })
        .await;
    let texts: Vec<Value> = frames
        .iter()
        .filter(|f| f.opcode == RawFrame::TEXT)
        .map(|f| serde_json::from_slice(&f.payload).expect("JSON"))
        .collect();
    let reply = texts
        .iter()
        .find(|t| t["id"] == 3)
        .unwrap_or_else(|| panic!("no reply to the refresh before the close: {texts:?}"));
    assert_error(
        reply,
        "forbidden",
        "a refresh with bob's token on alice's connection",
    );
    let (code, reason) = frames
        .last()
        .and_then(RawFrame::close_code_and_reason)
        .expect("a Close frame with a code");
    assert_eq!((code, reason.as_str()), (4003, "token for another user"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_refresh_is_refused_and_the_old_deadline_stands() {
    const WARNING_MS: i64 = 2_000;
    let inst = Instance::spawn(
        opts!("t4")
            .jwt(SECRET)
            .flag("--token-expiry-warning-ms", WARNING_MS),
    )
    .await;
    let current = hs(&claims("alice", 4, json!({})));
    let exp = exp_ms(&current);
    let exp_secs = exp / 1000;
    let mut alice = Client::connect_token(&inst, &current).await;
    let invalid: Vec<(&str, String)> = vec![
        ("not a JWT", "not-a-jwt".to_string()),
        (
            "signed with another secret",
            mint_jwt_claims(
                "another-secret-0123456789-0123456789",
                &claims("alice", 3600, json!({})),
            ),
        ),
        ("expired", hs(&claims("alice", -60, json!({})))),
        (
            "the same exp",
            hs(&json!({"sub": "alice", "exp": exp_secs})),
        ),
        (
            "an earlier exp",
            hs(&json!({"sub": "alice", "exp": exp_secs - 1})),
        ),
        ("no exp", hs(&json!({"sub": "alice"}))),
        ("alg none", unsigned_jwt(&claims("alice", 3600, json!({})))),
        ("RS256 on an HS256 server", rsa_a().mint_for("alice", 3600)),
        // Not verified, so no subject to compare: invalid, not forbidden.
        (
            "another user's, forged",
            mint_jwt_claims(
                "another-secret-0123456789-0123456789",
                &claims("bob", 3600, json!({})),
            ),
        ),
    ];
    for (i, (what, t)) in invalid.iter().enumerate() {
        let reply = alice
            .request(json!({"type": "refresh", "token": t, "id": i}))
            .await;
        assert_error(
            &reply,
            "invalid_token",
            &format!("refresh with a token {what}"),
        );
        assert_eq!(reply["id"], i, "{reply}");
        assert_healthy(&mut alice, &format!("a refused refresh ({what})")).await;
    }
    let (frames, code, at) = frames_until_close(&mut alice, Duration::from_secs(8)).await;
    assert_eq!(code, 4001, "the old deadline stands; frames {frames:?}");
    assert_in_expiry_window(at, exp, exp, "the 4001 close at the old exp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_replaces_the_room_grants_and_leaves_revoked_rooms() {
    let inst = Instance::spawn(opts!("t5").jwt(SECRET)).await;
    let mut alice = Client::connect_token(
        &inst,
        &hs(&claims("alice", 600, json!({"rooms": ["a", "b:*"]}))),
    )
    .await;
    for room in ["a", "b:1", "b:2"] {
        assert_joins(&mut alice, room, None, "granted by the first token").await;
    }
    assert_joins(
        &mut alice,
        "c",
        Some(&room_token("alice", "c", 600)),
        "held by a room token",
    )
    .await;

    // Each refresh expires later than the token it replaces.
    let narrower = hs(&claims("alice", 1200, json!({"rooms": ["a"]})));
    let ack = alice
        .request(json!({"type": "refresh", "token": narrower, "id": "narrow"}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    let mut left = Vec::new();
    for _ in 0..2 {
        let frame = alice.recv_type("left").await;
        assert_eq!(frame["reason"], "revoked", "{frame}");
        left.push(frame["room"].as_str().unwrap_or_default().to_string());
    }
    left.sort();
    assert_eq!(left, ["b:1", "b:2"], "rooms the new grants no longer allow");

    assert_member(&mut alice, "a", "still granted").await;
    assert_member(&mut alice, "c", "held by its room token").await;
    assert_not_member(&mut alice, "b:1", "revoked").await;
    assert_not_member(&mut alice, "b:2", "revoked").await;
    assert_join_forbidden(&mut alice, "b:1", None, "after the narrowing refresh").await;
    let pong = alice.request(json!({"type": "ping", "id": "end"})).await;
    assert_eq!(pong["type"], "pong");
    match alice.next_event(Duration::ZERO).await {
        Incoming::Timeout => {}
        other => panic!("no other frame (no `left` for a or c) expected, got {other:?}"),
    }

    // Grants can widen too.
    let wider = hs(&claims("alice", 1800, json!({"rooms": ["*"]})));
    let ack = alice
        .request(json!({"type": "refresh", "token": wider, "id": "wide"}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    assert_joins(&mut alice, "b:1", None, "after the widening refresh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_room_token_leaves_the_room_unless_renewed() {
    const WARNING_MS: i64 = 2_000;
    let inst = Instance::spawn(
        opts!("t6")
            .jwt(SECRET)
            .flag("--token-expiry-warning-ms", WARNING_MS),
    )
    .await;
    let mut alice = Client::connect_token(&inst, &token("alice", json!({}))).await;
    let mut bob = Client::connect_token(&inst, &token("bob", json!({"rooms": ["*"]}))).await;
    assert_joins(&mut bob, "vip:a", None, "bob, by his grants").await;

    let short = room_token("alice", "vip:a", 3);
    let short_exp = exp_ms(&short);
    assert_joins(&mut alice, "vip:a", Some(&short), "a 3 s room token").await;
    assert_joins(
        &mut alice,
        "vip:b",
        Some(&room_token("alice", "vip:b", 3)),
        "a 3 s room token",
    )
    .await;
    // Re-joining while a member with a later token extends the membership.
    let renewed = room_token("alice", "vip:b", 6);
    let renewed_exp = exp_ms(&renewed);
    assert_joins(&mut alice, "vip:b", Some(&renewed), "renewing vip:b").await;

    let (warning, at) = recv_type_at(&mut alice, "token_expiring").await;
    assert_token_expiring(&warning, Some("vip:a"), WARNING_MS, "vip:a's room token");
    assert_in_expiry_window(
        at,
        short_exp - WARNING_MS,
        short_exp,
        "vip:a's token_expiring",
    );
    let (left, at) = recv_type_at(&mut alice, "left").await;
    assert_eq!(
        left,
        json!({"type": "left", "room": "vip:a", "reason": "token_expired"})
    );
    assert_in_expiry_window(at, short_exp, short_exp, "leaving vip:a");
    assert_not_member(&mut alice, "vip:a", "after its room token expired").await;
    assert_member(&mut alice, "vip:b", "vip:b was renewed").await;
    assert_member(&mut bob, "vip:a", "bob holds vip:a by his grants").await;

    let (left, at) = recv_type_at(&mut alice, "left").await;
    assert_eq!(
        left,
        json!({"type": "left", "room": "vip:b", "reason": "token_expired"})
    );
    assert_in_expiry_window(
        at,
        renewed_exp,
        renewed_exp,
        "leaving vip:b at the renewed exp",
    );
    assert_not_member(&mut alice, "vip:b", "after its renewed token expired").await;
    let warning = alice.recv_type("token_expiring").await;
    assert_token_expiring(
        &warning,
        Some("vip:b"),
        WARNING_MS,
        "vip:b's renewed room token",
    );
    assert_healthy(&mut alice, "two room tokens expired").await;
    match alice.next_event(Duration::ZERO).await {
        Incoming::Timeout => {}
        other => {
            panic!("one warning per room token (none for vip:b's replaced one), got {other:?}")
        }
    }
}

// ---------------------------------------------------------------- keys

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_verify_with_an_rsa_public_key_and_nothing_else_does() {
    let inst = Instance::spawn(with_key(
        opts!("k1"),
        "--jwt-public-key",
        fixture("rsa-a.public.pem").display(),
    ))
    .await;
    let key = rsa_a();
    let mut alice = Client::connect_token(
        &inst,
        &key.mint(&claims("alice", 600, json!({"rooms": ["lobby"]}))),
    )
    .await;
    assert_eq!(alice.welcome["user"], "alice");
    assert_joins(
        &mut alice,
        "lobby",
        None,
        "an RS256 connection token's grants",
    )
    .await;
    let vip = key.mint(&claims("alice", 600, json!({"room": "vip:1"})));
    assert_joins(&mut alice, "vip:1", Some(&vip), "an RS256 room token").await;
    let confused = mint_jwt_claims(
        &public_pem("rsa-a.public.pem"),
        &claims("alice", 600, json!({"room": "vip:2"})),
    );
    assert_join_forbidden(
        &mut alice,
        "vip:2",
        Some(&confused),
        "an HS256 room token keyed with the public PEM",
    )
    .await;

    let alice_claims = claims("alice", 600, json!({}));
    let refused = [
        (
            "HS256 keyed with the RSA public key PEM (alg confusion)",
            mint_jwt_claims(&public_pem("rsa-a.public.pem"), &alice_claims),
        ),
        (
            "RS256 signed by another RSA key",
            rsa_b().mint(&alice_claims),
        ),
        ("ES256", ec().mint(&alice_claims)),
        ("alg none", unsigned_jwt(&alice_claims)),
        ("HS256 with some secret", hs(&alice_claims)),
        ("RS256, expired", key.mint_for("alice", -60)),
    ];
    for (what, t) in refused {
        assert_eq!(refusal(&inst, &t).await, 401, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_verify_with_an_ec_public_key_and_nothing_else_does() {
    let inst = Instance::spawn(with_key(
        opts!("k2"),
        "--jwt-public-key",
        fixture("ec.public.pem").display(),
    ))
    .await;
    let key = ec();
    let mut alice = Client::connect_token(
        &inst,
        &key.mint(&claims("alice", 600, json!({"rooms": ["lobby"]}))),
    )
    .await;
    assert_eq!(alice.welcome["user"], "alice");
    assert_joins(
        &mut alice,
        "lobby",
        None,
        "an ES256 connection token's grants",
    )
    .await;
    let vip = key.mint(&claims("alice", 600, json!({"room": "vip:1"})));
    assert_joins(&mut alice, "vip:1", Some(&vip), "an ES256 room token").await;

    let alice_claims = claims("alice", 600, json!({}));
    let refused = [
        (
            "HS256 keyed with the EC public key PEM (alg confusion)",
            mint_jwt_claims(&public_pem("ec.public.pem"), &alice_claims),
        ),
        ("RS256", rsa_a().mint(&alice_claims)),
        ("alg none", unsigned_jwt(&alice_claims)),
        ("ES256, expired", key.mint_for("alice", -60)),
    ];
    for (what, t) in refused {
        assert_eq!(refusal(&inst, &t).await, 401, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_server_refuses_every_other_alg() {
    let inst = Instance::spawn(opts!("k3").jwt(SECRET)).await;
    let alice_claims = claims("alice", 600, json!({}));
    let refused = [
        ("alg none", unsigned_jwt(&alice_claims)),
        (
            "HS384 with the same secret",
            SigningKey::hmac("HS384", SECRET).mint(&alice_claims),
        ),
        (
            "HS512 with the same secret",
            SigningKey::hmac("HS512", SECRET).mint(&alice_claims),
        ),
        ("RS256", rsa_a().mint(&alice_claims)),
        ("ES256", ec().mint(&alice_claims)),
        (
            "nbf a minute ahead",
            hs(&claims("alice", 600, json!({"nbf": now_unix_secs() + 60}))),
        ),
    ];
    for (what, t) in refused {
        assert_eq!(refusal(&inst, &t).await, 401, "{what}");
    }
    let alice = Client::connect_token(&inst, &hs(&alice_claims)).await;
    assert_eq!(alice.welcome["user"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_chosen_by_kid_and_a_rotation_is_picked_up_without_restart() {
    // Key a once more as kid "a-no-alg" without an `alg`: RS256 from kty.
    let mut no_alg = jwk_from_file(fixture("rsa-a.jwk.json"));
    no_alg["kid"] = json!("a-no-alg");
    no_alg
        .as_object_mut()
        .expect("a JWK is an object")
        .remove("alg");
    let jwks = JwksServer::start(&[
        jwk_from_file(fixture("rsa-a.jwk.json")),
        jwk_from_file(fixture("ec.jwk.json")),
        no_alg,
    ])
    .await;
    let inst = Instance::spawn(
        with_key(opts!("j1"), "--jwks-url", jwks.url()).flag("--jwks-min-refresh-ms", 200),
    )
    .await;
    let a = rsa_a().with_kid("a");
    let b = rsa_b().with_kid("b");
    let alice_claims = claims("alice", 600, json!({"rooms": ["lobby"]}));

    let mut alice = Client::connect_token(&inst, &a.mint(&alice_claims)).await;
    assert_joins(&mut alice, "lobby", None, "RS256, kid a").await;
    let carol = Client::connect_token(
        &inst,
        &ec().with_kid("ec").mint(&claims("carol", 600, json!({}))),
    )
    .await;
    assert_eq!(carol.welcome["user"], "carol", "ES256, kid ec");
    let dave = Client::connect_token(
        &inst,
        &rsa_a()
            .with_kid("a-no-alg")
            .mint(&claims("dave", 600, json!({}))),
    )
    .await;
    assert_eq!(dave.welcome["user"], "dave", "RS256, a JWK without alg");

    let unsigned_a = unsigned_jwt_with_header(
        &json!({"alg": "none", "typ": "JWT", "kid": "a"}),
        &alice_claims,
    );
    let refused = [
        (
            "RS256 signed by key a, naming the ES256 key ec",
            rsa_a().with_kid("ec").mint(&alice_claims),
        ),
        (
            "HS256 keyed with key a's public PEM",
            SigningKey::hmac("HS256", &public_pem("rsa-a.public.pem"))
                .with_kid("a")
                .mint(&alice_claims),
        ),
        ("alg none naming kid a", unsigned_a),
        (
            "HS256 keyed with key a's public PEM, naming the JWK without alg",
            SigningKey::hmac("HS256", &public_pem("rsa-a.public.pem"))
                .with_kid("a-no-alg")
                .mint(&alice_claims),
        ),
        (
            "ES256 naming the RSA JWK without alg",
            ec().with_kid("a-no-alg").mint(&alice_claims),
        ),
        (
            "RS256 signed by key b naming kid a",
            rsa_b().with_kid("a").mint(&alice_claims),
        ),
        ("kid b before the rotation", b.mint(&alice_claims)),
    ];
    for (what, t) in refused {
        assert_eq!(refusal(&inst, &t).await, 401, "{what}");
    }

    let before = jwks.requests();
    jwks.set_keys(&[jwk_from_file(fixture("rsa-b.jwk.json"))]);
    let with_b = b.mint(&alice_claims);
    let inst_ref = &inst;
    let with_b_ref = &with_b;
    eventually(
        RECV_TIMEOUT,
        "a token with the new kid b is accepted",
        || async move {
            Client::try_connect(inst_ref.ws_request(&format!("token={with_b_ref}")))
                .await
                .is_ok()
        },
    )
    .await;
    assert!(
        jwks.requests() > before,
        "the server refetched the JWKS for kid b"
    );
    let mut alice_by_b = Client::connect_token(&inst, &with_b).await;
    assert_joins(
        &mut alice_by_b,
        "lobby",
        None,
        "RS256, kid b, after the rotation",
    )
    .await;
    assert_eq!(
        refusal(&inst, &a.mint(&alice_claims)).await,
        401,
        "kid a was rotated out of the JWKS: its tokens are no longer accepted"
    );
    assert_healthy(&mut alice, "the rotation (a connection is not re-checked)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_refetch_the_jwks_at_a_bounded_rate() {
    let jwks = JwksServer::start(&[jwk_from_file(fixture("rsa-a.jwk.json"))]).await;
    // Default --jwks-min-refresh-ms: 10 s, far longer than this test.
    let inst = Instance::spawn(with_key(opts!("j2"), "--jwks-url", jwks.url())).await;
    let a = rsa_a().with_kid("a");
    Client::connect_token(&inst, &a.mint_for("alice", 600)).await;
    let after_first = jwks.requests();
    assert!(after_first >= 1, "the JWKS was fetched to verify kid a");
    for i in 0..20 {
        let t = rsa_b()
            .with_kid(&format!("unknown-{i}"))
            .mint_for("mallory", 600);
        assert_eq!(refusal(&inst, &t).await, 401, "unknown kid {i}");
    }
    assert!(
        jwks.requests() <= after_first + 1,
        "20 unknown kids within the min refresh interval: at most one refetch, saw {} requests after {after_first}",
        jwks.requests()
    );
    let alice = Client::connect_token(&inst, &a.mint_for("alice", 600)).await;
    assert_eq!(
        alice.welcome["user"], "alice",
        "kid a still verifies from the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_outage_leaves_cached_keys_working() {
    let jwks = JwksServer::start(&[jwk_from_file(fixture("rsa-a.jwk.json"))]).await;
    let inst = Instance::spawn(
        with_key(opts!("j3"), "--jwks-url", jwks.url()).flag("--jwks-min-refresh-ms", 100),
    )
    .await;
    let a = rsa_a().with_kid("a");
    Client::connect_token(&inst, &a.mint_for("alice", 600)).await;

    // Unknown kids, until one made the server refetch from the failing
    // JWKS: each is refused (401, or 503 for keys unavailable).
    jwks.set_failing(true);
    let before = jwks.requests();
    let (inst_ref, jwks_ref) = (&inst, &jwks);
    eventually(
        RECV_TIMEOUT,
        "an unknown kid makes the server refetch",
        || async move {
            let unknown = rsa_b().with_kid("b").mint_for("mallory", 600);
            let status = refusal(inst_ref, &unknown).await;
            assert!(
                status == 401 || status == 503,
                "an unknown kid with the JWKS failing: {status}"
            );
            jwks_ref.requests() > before
        },
    )
    .await;
    let mut alice = Client::connect_token(&inst, &a.mint_for("alice", 600)).await;
    assert_healthy(&mut alice, "a failed JWKS refetch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_jwks_keys_older_than_jwks_refresh_s_are_refetched() {
    let jwks = JwksServer::start(&[jwk_from_file(fixture("rsa-a.jwk.json"))]).await;
    let inst = Instance::spawn(
        with_key(opts!("j4"), "--jwks-url", jwks.url())
            .flag("--jwks-refresh-s", 1)
            .flag("--jwks-min-refresh-ms", 100),
    )
    .await;
    let old_key = rsa_a().with_kid("a");
    Client::connect_token(&inst, &old_key.mint_for("alice", 600)).await;

    // The same kid, new key material: no unknown kid to prompt a refetch,
    // only the cache's age.
    let mut replaced = jwk_from_file(fixture("rsa-b.jwk.json"));
    replaced["kid"] = json!("a");
    jwks.set_keys(&[replaced]);
    let new_key = rsa_b().with_kid("a");
    let (inst_ref, new_key_ref) = (&inst, &new_key);
    eventually(
        Duration::from_secs(6),
        "kid a's new key is picked up once the cache is older than 1 s",
        || async move {
            let t = new_key_ref.mint_for("alice", 600);
            Client::try_connect(inst_ref.ws_request(&format!("token={t}")))
                .await
                .is_ok()
        },
    )
    .await;
    assert_eq!(
        refusal(&inst, &old_key.mint_for("alice", 600)).await,
        401,
        "kid a's old key was replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_over_1_mib_is_not_trusted() {
    let key_a = jwk_from_file(fixture("rsa-a.jwk.json"));
    // Key a, padded past 1 MiB by a symmetric key no token names.
    let padding = json!({"kty": "oct", "kid": "padding", "k": "A".repeat(1 << 20)});
    let jwks = JwksServer::start(&[key_a.clone(), padding]).await;
    let inst = Instance::spawn(
        with_key(opts!("j5"), "--jwks-url", jwks.url()).flag("--jwks-min-refresh-ms", 100),
    )
    .await;
    let a = rsa_a().with_kid("a");
    let status = refusal(&inst, &a.mint_for("alice", 600)).await;
    assert!(
        status == 401 || status == 503,
        "kid a, served only in an oversized JWKS: {status}"
    );
    assert!(jwks.requests() >= 1, "the server did fetch the JWKS");

    // The same set with the padding cut to size: accepted (so it was the
    // size that was refused, not the symmetric key).
    jwks.set_keys(&[key_a, json!({"kty": "oct", "kid": "padding", "k": "AAAA"})]);
    let (inst_ref, a_ref) = (&inst, &a);
    eventually(RECV_TIMEOUT, "kid a from a normal JWKS", || async move {
        let t = a_ref.mint_for("alice", 600);
        Client::try_connect(inst_ref.ws_request(&format!("token={t}")))
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_kid_is_verified_only_by_a_jwks_of_one_key() {
    // docs/SECURITY.md: without `kid`, only a JWKS of exactly one usable key.
    let a = jwk_from_file(fixture("rsa-a.jwk.json"));
    let one = JwksServer::start(std::slice::from_ref(&a)).await;
    let two = JwksServer::start(&[a, jwk_from_file(fixture("ec.jwk.json"))]).await;
    let (with_one, with_two) = tokio::join!(
        Instance::spawn(with_key(opts!("j7"), "--jwks-url", one.url())),
        Instance::spawn(with_key(opts!("j8"), "--jwks-url", two.url())),
    );
    let no_kid = rsa_a().mint_for("alice", 600);
    let alice = Client::connect_token(&with_one, &no_kid).await;
    assert_eq!(alice.welcome["user"], "alice", "no kid, one key");
    assert_eq!(refusal(&with_two, &no_kid).await, 401, "no kid, two keys");
}

/// Sends the upgrade for `/ws?token=<token>` by hand and reads the status
/// line of the answer, waiting up to `timeout` (longer than the kit's
/// clients would): the status and how long the answer took.
async fn timed_upgrade(inst: &Instance, token: &str, timeout: Duration) -> (u16, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(inst.addr())
        .await
        .expect("connect to the instance");
    let request = RawWs::upgrade_request(inst.addr(), &format!("token={token}"), &[]);
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the upgrade");
    let mut head = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 512];
        while !head.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    assert!(read.is_ok(), "no answer to the upgrade within {timeout:?}");
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
    (status, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_jwks_fetch_is_given_up_after_its_timeout() {
    let jwks = JwksServer::start(&[jwk_from_file(fixture("rsa-a.jwk.json"))]).await;
    jwks.set_stalled(true);
    let inst = Instance::spawn(with_key(opts!("j6"), "--jwks-url", jwks.url())).await;
    let t = rsa_a().with_kid("a").mint_for("alice", 600);
    let upgrade = timed_upgrade(&inst, &t, Duration::from_secs(10));
    let meanwhile = async {
        // While the fetch hangs, the instance serves other requests.
        let jwks = &jwks;
        eventually(
            RECV_TIMEOUT,
            "the server is fetching the JWKS",
            || async move { jwks.requests() >= 1 },
        )
        .await;
        let (status, _) = inst.http_get("/healthz").await;
        assert_eq!(status, 200, "/healthz during a hung JWKS fetch");
    };
    let ((status, elapsed), ()) = tokio::join!(upgrade, meanwhile);
    assert!(
        status == 401 || status == 503,
        "a token whose key could not be fetched: {status}"
    );
    // The spec's fetch timeout is 5 s; 2 s of slack for a loaded machine.
    assert!(
        elapsed <= Duration::from_secs(7),
        "the upgrade waited {elapsed:?} for a hung JWKS"
    );
}

// ---------------------------------------------------------------- disconnect and kick

/// Redis plus instances i1, i2, i3 (`--auth none`, `--api-key`).
async fn three_instances() -> (RedisServer, Vec<Instance>) {
    let redis = RedisServer::start().await;
    let api = |id: &str| opts!(id).redis(&redis).flag("--api-key", API_KEY);
    let (i1, i2, i3) = tokio::join!(
        Instance::spawn(api("i1")),
        Instance::spawn(api("i2")),
        Instance::spawn(api("i3")),
    );
    (redis, vec![i1, i2, i3])
}

/// Waits until `/api/v1/presence/{user}` on `inst` lists exactly `instances`.
async fn await_presence_on(inst: &Instance, user: &str, instances: &[&str]) {
    let path = format!("/api/v1/presence/{user}");
    let mut want: Vec<String> = instances.iter().map(|s| s.to_string()).collect();
    want.sort();
    let (path, want) = (&path, &want);
    eventually(
        RECV_TIMEOUT,
        &format!("{user} present on {want:?}"),
        || async move {
            let response = inst.api_get(path, Some(API_KEY)).await;
            let mut got: Vec<String> = response.json()["instances"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            got.sort();
            &got == want
        },
    )
    .await;
}

/// `channels` (where the spy saw a command published) are one per holder
/// in `holders`, each naming its instance: routed, not broadcast.
fn assert_sent_to_holders_only(mut channels: Vec<String>, holders: &[&str], what: &str) {
    channels.sort();
    assert_eq!(
        channels.len(),
        holders.len(),
        "{what}: published once per holder {holders:?}, on {channels:?}"
    );
    for (channel, holder) in channels.iter().zip(holders) {
        assert!(
            channel.contains(&format!("{{{holder}}}")),
            "{what}: published on {channels:?}, not one channel per holder {holders:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_users_connections_on_every_instance_and_nothing_else() {
    let (redis, inst) = three_instances().await;
    let mut a1 = Client::connect_user(&inst[0], "alice").await;
    let mut a2 = Client::connect_user(&inst[1], "alice").await;
    let (mut a2_raw, _a2_raw_writer) = RawWs::connect(inst[1].addr(), "user=alice")
        .await
        .into_split();
    let mut bobs = Vec::new();
    for i in &inst {
        bobs.push(Client::connect_user(i, "bob").await);
    }
    let (mut dave_raw, _dave_writer) = RawWs::connect(inst[0].addr(), "user=dave")
        .await
        .into_split();
    let mut carol = Client::connect_user(&inst[2], "carol").await;
    await_presence_on(&inst[2], "alice", &["i1", "i2"]).await;
    await_presence_on(&inst[2], "dave", &["i1"]).await;

    let unauthorized = inst[2]
        .api_post("/api/v1/disconnect", None, br#"{"user":"alice"}"#)
        .await;
    assert_eq!(
        unauthorized.status,
        401,
        "no API key: {}",
        unauthorized.text()
    );
    for (what, body) in [
        ("no user", json!({})),
        ("an invalid user name", json!({"user": "a b"})),
        (
            "a reason over 100 bytes",
            json!({"user": "alice", "reason": "x".repeat(101)}),
        ),
        // serde would take an array as the struct's fields by position.
        ("an array, not an object", json!(["alice"])),
    ] {
        let response = inst[2]
            .api_post(
                "/api/v1/disconnect",
                Some(API_KEY),
                body.to_string().as_bytes(),
            )
            .await;
        assert_eq!(response.status, 400, "{what}: {}", response.text());
    }

    // Asked on i3, which holds no connection of alice. The reason is
    // unique: the spy finds the command by it.
    let reason = unique("account-suspended");
    let spy = redis.spy("sb:*").await;
    let response = inst[2]
        .api_post(
            "/api/v1/disconnect",
            Some(API_KEY),
            json!({"user": "alice", "reason": reason})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({"status": "ok", "instances": 2}));
    for (what, client) in [("alice on i1", &mut a1), ("alice on i2", &mut a2)] {
        let (_, code, _) = frames_until_close(client, RECV_TIMEOUT).await;
        assert_eq!(code, 4002, "{what}");
    }
    let frames = a2_raw
        .read_until("alice's Close frame", RECV_TIMEOUT, |f| {
            f.opcode == RawFrame::CLOSE
        })
        .await;
    let close = frames.last().and_then(RawFrame::close_code_and_reason);
    assert_eq!(close, Some((4002, reason.clone())));

    // Everyone else is untouched: a DM from i3 travels after the
    // disconnect command i3 sent to i1 and i2, over the same connection.
    let sentinel = carol.send_sentinel_dm("bob").await;
    for bob in &mut bobs {
        bob.expect_nothing_before(&sentinel).await;
        assert_healthy(bob, "alice's disconnect").await;
    }
    assert_sent_to_holders_only(
        spy.channels_of(&reason, &sentinel).await,
        &["i1", "i2"],
        "the disconnect",
    );

    // The default reason, asked where dave is.
    let response = inst[0]
        .api_post("/api/v1/disconnect", Some(API_KEY), br#"{"user":"dave"}"#)
        .await;
    assert_eq!(response.json(), json!({"status": "ok", "instances": 1}));
    let frames = dave_raw
        .read_until("dave's Close frame", RECV_TIMEOUT, |f| {
            f.opcode == RawFrame::CLOSE
        })
        .await;
    let close = frames.last().and_then(RawFrame::close_code_and_reason);
    assert_eq!(
        close,
        Some((4002, "disconnected by the server".to_string()))
    );

    // Nobody holds alice any more: nobody is told.
    await_presence_on(&inst[2], "alice", &[]).await;
    let response = inst[0]
        .api_post("/api/v1/disconnect", Some(API_KEY), br#"{"user":"alice"}"#)
        .await;
    assert_eq!(response.json(), json!({"status": "ok", "instances": 0}));
    assert_healthy(&mut carol, "three disconnects").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_removes_the_user_from_the_room_on_every_instance_and_nothing_else() {
    let (redis, inst) = three_instances().await;
    // The kicked room's name is unique: the spy finds the command by it.
    let r = unique("R");
    let r = r.as_str();
    // alice in R and S on i1 and i2, and on i2 a connection only in S.
    let mut a1 = Client::connect_user(&inst[0], "alice").await;
    let mut a2 = Client::connect_user(&inst[1], "alice").await;
    let mut a2_s_only = Client::connect_user(&inst[1], "alice").await;
    let mut b1 = Client::connect_user(&inst[0], "bob").await;
    let mut b3 = Client::connect_user(&inst[2], "bob").await;
    // Joined without a word said (assert_joins would send), so that every
    // frame after the kick is the kick's.
    for (client, rooms) in [
        (&mut a1, &[r, "S"][..]),
        (&mut a2, &[r, "S"]),
        (&mut a2_s_only, &["S"]),
        (&mut b1, &[r]),
        (&mut b3, &[r, "S"]),
    ] {
        for room in rooms {
            let reply = join(client, room, None).await;
            assert_eq!(reply["status"], "ok", "join {room}: {reply}");
        }
    }
    await_presence_on(&inst[2], "alice", &["i1", "i2"]).await;

    let kick = format!("/api/v1/rooms/{r}/kick");
    let unauthorized = inst[2].api_post(&kick, None, br#"{"user":"alice"}"#).await;
    assert_eq!(
        unauthorized.status,
        401,
        "no API key: {}",
        unauthorized.text()
    );
    let spy = redis.spy("sb:*").await;
    let response = inst[2]
        .api_post(&kick, Some(API_KEY), br#"{"user":"alice"}"#)
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json(), json!({"status": "ok", "instances": 2}));
    // A DM from i3 after the kick's publishes (bob's connections get it
    // and ignore it).
    let sentinel = b3.send_sentinel_dm("bob").await;
    assert_sent_to_holders_only(
        spy.channels_of(r, &sentinel).await,
        &["i1", "i2"],
        "the kick",
    );

    for (what, client) in [("alice on i1", &mut a1), ("alice on i2", &mut a2)] {
        let left = client.recv_type("left").await;
        assert_eq!(
            left,
            json!({"type": "left", "room": r, "reason": "kicked"}),
            "{what}"
        );
        assert_not_member(client, r, what).await;
    }
    // A room message to R, then a sentinel to S, both from i3 after the
    // kick it sent: bob on i1 gets the message, no alice does, and the
    // alice only in S got no `left`.
    let marker = json!({"after": "the kick"});
    let ack = b3
        .request(json!({"type": "room", "room": r, "body": marker}))
        .await;
    assert_eq!(ack["status"], "ok", "{ack}");
    let sentinel = b3.send_sentinel_room("S").await;
    for (what, client) in [
        ("alice on i1", &mut a1),
        ("alice on i2", &mut a2),
        ("alice only in S", &mut a2_s_only),
    ] {
        let frames = client.frames_until(&sentinel).await;
        assert!(
            frames.is_empty(),
            "{what}: nothing but the sentinel after the kick, got {frames:?}"
        );
    }
    let said = b1.recv_type("room").await;
    assert_eq!(
        (&said["room"], &said["body"]),
        (&json!(r), &marker),
        "bob stays in R"
    );
    assert_member(&mut a1, "S", "alice's other room").await;
    assert_member(&mut b1, r, "bob, another member of R").await;

    let response = inst[0]
        .api_post(&kick, Some(API_KEY), br#"{"user":"nobody-here"}"#)
        .await;
    assert_eq!(
        response.json(),
        json!({"status": "ok", "instances": 0}),
        "a user nobody holds"
    );
    for (what, path, body) in [
        (
            "an invalid room name",
            "/api/v1/rooms/a%20b/kick",
            r#"{"user":"alice"}"#,
        ),
        ("no user", kick.as_str(), "{}"),
        ("an invalid user name", kick.as_str(), r#"{"user":"a b"}"#),
        ("an array, not an object", kick.as_str(), r#"["alice"]"#),
    ] {
        let response = inst[0].api_post(path, Some(API_KEY), body.as_bytes()).await;
        assert_eq!(
            response.status,
            400,
            "kick with {what}: {}",
            response.text()
        );
    }
    for client in [&mut a1, &mut a2, &mut a2_s_only, &mut b1, &mut b3] {
        assert_healthy(client, "the kick").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_left_or_kicked_says_nothing_more_when_its_room_token_expires() {
    const WARNING_MS: i64 = 2_000;
    let inst = Instance::spawn(
        opts!("x1")
            .jwt(SECRET)
            .flag("--api-key", API_KEY)
            .flag("--token-expiry-warning-ms", WARNING_MS),
    )
    .await;
    let mut alice = Client::connect_token(&inst, &token("alice", json!({}))).await;
    let short = room_token("alice", "vip:1", 3);
    let exp = exp_ms(&short);
    let reply = join(&mut alice, "vip:1", Some(&short)).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    // vip:2 with a token of the same exp, left by alice herself.
    let reply = join(&mut alice, "vip:2", Some(&room_token("alice", "vip:2", 3))).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let reply = alice
        .request(json!({"type": "leave", "room": "vip:2"}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let response = inst
        .api_post(
            "/api/v1/rooms/vip:1/kick",
            Some(API_KEY),
            br#"{"user":"alice"}"#,
        )
        .await;
    assert_eq!(response.json(), json!({"status": "ok", "instances": 1}));
    let left = alice.recv_type("left").await;
    assert_eq!(
        left,
        json!({"type": "left", "room": "vip:1", "reason": "kicked"})
    );
    // Past the room tokens' warnings and exps: no token_expiring for a
    // room alice is not in, no `left` for a room she already left.
    let until = exp + 1_000 - now_unix_ms();
    alice
        .expect_silence_for(Duration::from_millis(until.max(0) as u64))
        .await;
    assert_healthy(&mut alice, "the kicked room's token expired").await;
}

// ---------------------------------------------------------------- `switchboard token` and start-up

/// Runs `switchboard token ARGS` with only `env` of the `SWITCHBOARD_*`
/// variables.
fn run_switchboard_token(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let binary = opts!("token").binary;
    let mut command = Command::new(&binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SWITCHBOARD_") {
            command.env_remove(&key);
        }
    }
    command
        .arg("token")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {} token: {e}", binary.display()))
}

/// [`run_switchboard_token`] that must succeed: the token it printed.
fn switchboard_token(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = run_switchboard_token(args, env);
    assert!(
        output.status.success(),
        "switchboard token {args:?} exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 stdout");
    let token = stdout.trim().to_string();
    assert_eq!(token.lines().count(), 1, "one line, the token: {stdout:?}");
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_token_mints_an_hs256_token_the_server_accepts_with_its_grants() {
    let env = [("SWITCHBOARD_JWT_SECRET", SECRET)];
    let minted = switchboard_token(
        &[
            "--user",
            "alice",
            "--rooms",
            "lobby,team-42:*",
            "--ttl",
            "1h",
        ],
        &env,
    );
    assert_eq!(header_of(&minted)["alg"], "HS256");
    let claims = unverified_claims(&minted);
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["rooms"], json!(["lobby", "team-42:*"]), "{claims}");
    let ttl = claims["exp"].as_i64().unwrap_or_default() - now_unix_secs();
    assert!(
        (3600 - 60..=3600).contains(&ttl),
        "--ttl 1h: exp is {ttl} s away"
    );

    let inst = Instance::spawn(opts!("m1").jwt(SECRET)).await;
    let mut alice = Client::connect_token(&inst, &minted).await;
    assert_eq!(alice.welcome["user"], "alice");
    assert_joins(
        &mut alice,
        "team-42:x",
        None,
        "team-42:* from the minted token",
    )
    .await;
    assert_joins(&mut alice, "lobby", None, "lobby from the minted token").await;
    assert_join_forbidden(&mut alice, "team-43:x", None, "not in the minted token").await;

    let vip = switchboard_token(
        &["--user", "alice", "--room", "vip:1", "--ttl", "15m"],
        &env,
    );
    let vip_claims = unverified_claims(&vip);
    assert_eq!(vip_claims["room"], "vip:1", "{vip_claims}");
    let ttl = vip_claims["exp"].as_i64().unwrap_or_default() - now_unix_secs();
    assert!(
        (900 - 60..=900).contains(&ttl),
        "--ttl 15m: exp is {ttl} s away"
    );
    assert_joins(
        &mut alice,
        "vip:1",
        Some(&vip),
        "a per-room token from switchboard token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_token_mints_dm_grants_and_audiences() {
    // The secret as a flag this time; --dm-to patterns.
    let minted = switchboard_token(
        &[
            "--jwt-secret",
            SECRET,
            "--user",
            "alice",
            "--dm-to",
            "bob,ops:*",
            "--aud",
            "sb",
            "--ttl",
            "30s",
        ],
        &[],
    );
    let claims = unverified_claims(&minted);
    assert_eq!(claims["dm_to"], json!(["bob", "ops:*"]), "{claims}");
    assert_eq!(claims["aud"], "sb", "{claims}");
    let ttl = claims["exp"].as_i64().unwrap_or_default() - now_unix_secs();
    assert!((0..=30).contains(&ttl), "--ttl 30s: exp is {ttl} s away");
    let anyone = switchboard_token(
        &["--user", "carol", "--dm", "--aud", "sb"],
        &[("SWITCHBOARD_JWT_SECRET", SECRET)],
    );
    assert_eq!(unverified_claims(&anyone)["dm"], true);

    let inst = Instance::spawn(
        opts!("m4")
            .jwt(SECRET)
            .flag("--jwt-audience", "sb")
            .flag("--dm-policy", "token"),
    )
    .await;
    let mut alice = Client::connect_token(&inst, &minted).await;
    // (recipient, allowed); nobody is online: an allowed DM is `offline`.
    for (to, allowed) in [
        ("bob", true),
        ("ops:7", true),
        ("carol", false),
        ("bobby", false),
    ] {
        let reply = alice
            .request(json!({"type": "dm", "to": to, "body": 1}))
            .await;
        if allowed {
            assert_eq!(reply["status"], "offline", "alice -> {to}: {reply}");
        } else {
            assert_error(&reply, "forbidden", &format!("alice -> {to}"));
        }
    }
    let mut carol = Client::connect_token(&inst, &anyone).await;
    let reply = carol
        .request(json!({"type": "dm", "to": "zed", "body": 1}))
        .await;
    assert_eq!(reply["status"], "offline", "--dm: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_token_without_a_key_fails_saying_so() {
    let output = run_switchboard_token(&["--user", "alice"], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "exit status {}; stderr {stderr}",
        output.status
    );
    assert!(
        output.stdout.is_empty(),
        "no token on stdout: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        stderr.contains("--jwt-secret") || stderr.contains("--jwt-private-key"),
        "the message names the missing key flag: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_token_mints_rs256_and_es256_with_a_private_key() {
    let rsa = switchboard_token(
        &[
            "--user",
            "alice",
            "--jwt-private-key",
            &fixture("rsa-a.private.pem").display().to_string(),
            "--kid",
            "a",
            "--rooms",
            "lobby",
        ],
        &[],
    );
    assert_eq!(header_of(&rsa)["alg"], "RS256");
    assert_eq!(header_of(&rsa)["kid"], "a");
    let es = switchboard_token(
        &[
            "--user",
            "carol",
            "--jwt-private-key",
            &fixture("ec.private.pem").display().to_string(),
        ],
        &[],
    );
    assert_eq!(header_of(&es)["alg"], "ES256");

    let jwks = JwksServer::start(&[jwk_from_file(fixture("rsa-a.jwk.json"))]).await;
    let (by_jwks, by_ec) = tokio::join!(
        Instance::spawn(with_key(opts!("m2"), "--jwks-url", jwks.url())),
        Instance::spawn(with_key(
            opts!("m3"),
            "--jwt-public-key",
            fixture("ec.public.pem").display()
        )),
    );
    let mut alice = Client::connect_token(&by_jwks, &rsa).await;
    assert_joins(
        &mut alice,
        "lobby",
        None,
        "an RS256 token from switchboard token, via JWKS",
    )
    .await;
    let carol = Client::connect_token(&by_ec, &es).await;
    assert_eq!(carol.welcome["user"], "carol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_settings_that_nothing_could_satisfy() {
    let rsa_public = fixture("rsa-a.public.pem").display().to_string();
    let cases: Vec<(&str, Opts, &[&str])> = vec![
        (
            "--room-auth token with --auth none",
            opts!("s1").flag("--room-auth", "token"),
            &["room-auth"],
        ),
        (
            "--dm-policy token with --auth none",
            opts!("s2").flag("--dm-policy", "token"),
            &["dm-policy"],
        ),
        (
            "a secret and a public key",
            opts!("s3")
                .jwt(SECRET)
                .flag("--jwt-public-key", &rsa_public),
            &["jwt-secret", "jwt-public-key"],
        ),
        (
            "a public key and a JWKS URL",
            with_key(opts!("s4"), "--jwt-public-key", &rsa_public)
                .flag("--jwks-url", "http://127.0.0.1:9/jwks.json"),
            &["jwt-public-key", "jwks-url"],
        ),
        (
            "a missing public key file",
            with_key(
                opts!("s5"),
                "--jwt-public-key",
                fixture("no-such-key.pem").display(),
            ),
            &["no-such-key.pem"],
        ),
        (
            "a public key file that is no PEM key",
            with_key(
                opts!("s6"),
                "--jwt-public-key",
                fixture("README.md").display(),
            ),
            &["README.md"],
        ),
        (
            "a private key as the public key",
            with_key(
                opts!("s7"),
                "--jwt-public-key",
                fixture("rsa-a.private.pem").display(),
            ),
            &["rsa-a.private.pem"],
        ),
        (
            "a JWKS URL that is not http(s)",
            with_key(opts!("s8"), "--jwks-url", "ftp://127.0.0.1/jwks.json"),
            &["jwks-url"],
        ),
    ];
    for (what, opts, mentions) in cases {
        let (status, log) = Instance::run_until_exit(opts, Duration::from_secs(5)).await;
        assert!(
            !status.success(),
            "{what}: exit status {status}; log:\n{log}"
        );
        assert!(
            mentions.iter().any(|m| log.contains(m)),
            "{what}: the message names one of {mentions:?}; log:\n{log}"
        );
        // Refused by the server's own checks, not by clap for a flag it
        // does not know (which would name the flag too).
        assert!(
            !log.contains("unexpected argument"),
            "{what}: every flag must be known; log:\n{log}"
        );
    }
}

// ---------------------------------------------------------------- logs

/// Refused tokens of every kind — at the upgrade, in a `refresh`, in a
/// `join` — and accepted ones never reach the log, at `debug` (the most
/// a production instance is run at): neither whole nor their signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_reaches_the_log_at_debug() {
    let inst = Instance::spawn(opts!("l1").jwt(SECRET).log_level("debug")).await;
    let good = token("alice", json!({}));
    let expired = mint_jwt_claims(
        SECRET,
        &json!({"sub": "alice", "exp": now_unix_ms() / 1000 - 3600}),
    );
    let forged = mint_jwt_claims(
        "not-the-secret",
        &json!({"sub": "alice", "exp": 4_000_000_000u64}),
    );
    assert_eq!(refusal(&inst, &expired).await, 401);
    assert_eq!(refusal(&inst, &forged).await, 401);
    let mut alice = Client::connect_token(&inst, &good).await;
    let reply = alice
        .request(json!({"type": "refresh", "token": forged}))
        .await;
    assert_eq!(reply["code"], "invalid_token", "{reply}");
    let bad_room = mint_jwt_claims(
        "not-the-secret",
        &json!({"sub": "alice", "room": "vip", "exp": 4_000_000_000u64}),
    );
    assert_join_forbidden(&mut alice, "vip", Some(&bad_room), "a forged room token").await;
    assert_healthy(&mut alice, "after the refusals").await;
    let log = inst.log();
    assert!(
        log.contains("websocket upgrade refused"),
        "the refusals are logged (so the check below reads a real log): {log}"
    );
    for (what, token) in [
        ("the accepted token", &good),
        ("the expired token", &expired),
        ("the forged token", &forged),
        ("the forged room token", &bad_room),
    ] {
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(
            !log.contains(signature),
            "{what}'s signature is in the log:\n{log}"
        );
    }
}
