//! `--auth jwt`: credentials are checked before the WebSocket upgrade.

use serde_json::json;
use switchboard_testkit::{mint_jwt, opts, Auth, Client, Instance};

const SECRET: &str = "s3cret";

async fn jwt_instance() -> Instance {
    Instance::spawn(opts!("a1").jwt(SECRET)).await
}

/// Changes one character in the middle of the signature segment.
fn tamper_signature(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').expect("a JWT has three segments");
    let mut sig: Vec<char> = sig.chars().collect();
    let i = sig.len() / 2;
    sig[i] = if sig[i] == 'A' { 'B' } else { 'A' };
    format!("{head}.{}", sig.into_iter().collect::<String>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_in_query_connects() {
    let inst = jwt_instance().await;
    let mut alice = Client::connect_token(&inst, &mint_jwt(SECRET, "alice", 3600)).await;
    assert_eq!(alice.welcome["user"], "alice");
    assert_eq!(alice.welcome["instance"], "a1");
    assert_eq!(
        alice.request(json!({"type": "ping", "id": 1})).await["type"],
        "pong"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_in_authorization_header_connects() {
    let inst = jwt_instance().await;
    let bob = Client::connect_bearer(&inst, &mint_jwt(SECRET, "bob@example.com", 3600)).await;
    assert_eq!(bob.welcome["user"], "bob@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_401() {
    let inst = jwt_instance().await;
    let valid = mint_jwt(SECRET, "alice", 3600);
    let cases = [
        ("missing token", inst.ws_request("")),
        (
            "user= is not accepted in jwt mode",
            inst.ws_request("user=alice"),
        ),
        ("garbage token", inst.ws_request("token=not.a.jwt")),
        (
            "bad signature",
            inst.ws_request(&format!("token={}", tamper_signature(&valid))),
        ),
        (
            "expired an hour ago",
            inst.ws_request(&format!("token={}", mint_jwt(SECRET, "alice", -3600))),
        ),
        (
            "signed with another secret",
            inst.ws_request(&format!(
                "token={}",
                mint_jwt("other-secret", "alice", 3600)
            )),
        ),
        (
            "invalid sub (space)",
            inst.ws_request(&format!("token={}", mint_jwt(SECRET, "a b", 3600))),
        ),
        (
            "invalid sub (65 chars)",
            inst.ws_request(&format!(
                "token={}",
                mint_jwt(SECRET, &"x".repeat(65), 3600)
            )),
        ),
        (
            "invalid sub (empty)",
            inst.ws_request(&format!("token={}", mint_jwt(SECRET, "", 3600))),
        ),
        (
            "bearer header with bad signature",
            inst.ws_request_bearer(&tamper_signature(&valid)),
        ),
        (
            "bearer header with expired token",
            inst.ws_request_bearer(&mint_jwt(SECRET, "alice", -3600)),
        ),
    ];
    for (what, request) in cases {
        assert_eq!(Client::rejection_status(request).await, 401, "{what}");
    }
    // The instance is still healthy and accepts a good token afterwards.
    let alice = Client::connect_token(&inst, &valid).await;
    assert_eq!(alice.welcome["user"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_is_the_default_auth_mode() {
    let inst = Instance::spawn(opts!("a1").auth(Auth::DefaultWithSecret(SECRET.into()))).await;
    assert_eq!(
        Client::rejection_status(inst.ws_request("user=alice")).await,
        401,
        "without --auth, ?user= must not authenticate"
    );
    let alice = Client::connect_token(&inst, &mint_jwt(SECRET, "alice", 3600)).await;
    assert_eq!(alice.welcome["user"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_identity_cannot_be_spoofed() {
    // Rooms open to every authenticated user: this test is about `from`
    // (room authorization has its own tests, tests/security.rs).
    let inst = Instance::spawn(opts!("a1").jwt(SECRET).flag("--room-auth", "open")).await;
    let mut alice = Client::connect_token(&inst, &mint_jwt(SECRET, "alice", 3600)).await;
    let mut bob = Client::connect_token(&inst, &mint_jwt(SECRET, "bob", 3600)).await;

    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "from": "mallory", "body": "it's me"}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    let dm = bob.recv_type("dm").await;
    assert_eq!(
        dm["from"], "alice",
        "from comes from the token, not the frame: {dm}"
    );

    for c in [&mut alice, &mut bob] {
        c.request(json!({"type": "join", "room": "r"})).await;
    }
    alice
        .request(json!({"type": "room", "room": "r", "from": "mallory", "body": 1}))
        .await;
    let msg = bob.recv_type("room").await;
    assert_eq!(
        msg["from"], "alice",
        "room from comes from the token: {msg}"
    );
    // alice gets no copy of her own room message. One instance: any copy
    // would have been queued while her frame was handled, before her ack,
    // so before bob's sentinel.
    let sentinel = bob.send_sentinel_room("r").await;
    alice.expect_nothing_before(&sentinel).await;
}
