//! A panic in one connection's handling closes that connection only: the real
//! server runs in-process over the embedded backend, whose bus is wrapped in a
//! decorator that panics when asked to route a DM to the user `boom`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use switchboard::bus::{Bus, Channel, DirectRoute, Reached};
use switchboard::config::Config;
use switchboard::error::BackendError;
use switchboard::server::{run_with_backend, Backend};
use switchboard_testkit::{http_request, ws_request_at, Client, Incoming, Metrics, RECV_TIMEOUT};

/// Delegates everything to the real bus, except that routing to `boom` panics.
struct PanicsOnBoom {
    inner: Arc<dyn Bus>,
}

#[async_trait]
impl Bus for PanicsOnBoom {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BackendError> {
        self.inner.publish(channel, payload).await
    }

    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        self.inner.subscribe(channel).await
    }

    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        self.inner.unsubscribe(channel).await
    }

    async fn route_direct(&self, route: &DirectRoute<'_>) -> Result<Vec<Reached>, BackendError> {
        if route.to == "boom" {
            panic!("injected panic: route_direct to \"boom\"");
        }
        self.inner.route_direct(route).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_closes_only_its_own_connection() {
    let mut backend = Backend::embedded("p1", Default::default());
    backend.bus = Arc::new(PanicsOnBoom {
        inner: backend.bus.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run_with_backend(
        Config::for_tests("p1"),
        listener,
        async move {
            let _ = stopped.await;
        },
        backend,
    ));
    let metrics = || async move {
        let response = http_request(addr, "GET", "/metrics", &[], b"").await;
        assert_eq!(response.status, 200);
        response.text()
    };

    let mut alice = Client::connect(ws_request_at(addr, "user=alice")).await;
    let mut bob = Client::connect(ws_request_at(addr, "user=bob")).await;
    assert!(bob.is_online("alice").await, "alice is online before");
    let ack = bob
        .request(json!({"type": "dm", "to": "alice", "body": "before"}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(alice.recv_type("dm").await["body"], "before");
    assert_eq!(
        Metrics::parse(&metrics().await).value("switchboard_session_panics_total"),
        0.0
    );

    // alice's DM to boom panics inside her session.
    alice
        .send_json(&json!({"type": "dm", "to": "boom", "body": 1, "id": "boom", "store": false}))
        .await;
    let outcome = alice.next_event(RECV_TIMEOUT).await;
    assert!(
        matches!(outcome, Incoming::Closed(_) | Incoming::Ended(_)),
        "alice's connection must be closed after her session panicked, got {outcome:?}"
    );

    // The instance keeps serving bob.
    let pong = bob.request(json!({"type": "ping", "id": 1})).await;
    assert_eq!(pong, json!({"type": "pong", "id": 1}));
    assert!(
        !bob.is_online("alice").await,
        "alice's presence was cleaned up when her session ended"
    );
    let ack = bob
        .request(json!({"type": "dm", "to": "alice", "body": "after"}))
        .await;
    assert_eq!(ack["status"], "offline", "nobody holds alice now: {ack}");

    // New connections work, and DMs between them.
    let mut carol = Client::connect(ws_request_at(addr, "user=carol")).await;
    let ack = bob
        .request(json!({"type": "dm", "to": "carol", "body": {"k": "v"}}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(carol.recv_type("dm").await["body"], json!({"k": "v"}));
    let mut alice = Client::connect(ws_request_at(addr, "user=alice")).await;
    assert_eq!(
        alice.request(json!({"type": "ping", "id": 2})).await["type"],
        "pong"
    );

    let text = metrics().await;
    let after = Metrics::parse(&text);
    assert_eq!(
        after.value("switchboard_session_panics_total"),
        1.0,
        "{text}"
    );
    assert_eq!(after.value("switchboard_connections"), 3.0, "{text}");
    let health = http_request(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200);

    // Graceful shutdown still works and returns Ok.
    stop.send(()).expect("the server is still running");
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(client.expect_close(RECV_TIMEOUT).await, Some(1001));
    }
    let result = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("run_with_backend returns within 10 s of the shutdown signal")
        .expect("the server task did not panic");
    assert!(result.is_ok(), "run_with_backend: {result:?}");
}
