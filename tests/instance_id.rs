//! An instance id names one process at a time. A second process started with
//! the id of a live one refuses to start (it would steal its DMs and, on
//! exit, delete its presence); a process restarted with the id of a crashed
//! one waits for the crashed one's lease to run out and clears what it left.

use std::time::Duration;

use serde_json::json;
use switchboard_testkit::{eventually, opts, Client, Instance, RedisServer, RECV_TIMEOUT};

const LEASE_MS: u64 = 1000;

fn presence_key(user: &str) -> String {
    format!("sb:presence:{{{user}}}")
}

/// Waits until `user`'s presence lists `instance` with one connection.
async fn await_field(redis: &RedisServer, user: &str, instance: &str) {
    let key = presence_key(user);
    eventually(
        RECV_TIMEOUT,
        &format!("{user}'s presence on {instance}"),
        || async { redis.hgetall(&key).await.get(instance) == Some(&"1".to_owned()) },
    )
    .await;
}

/// Sends DMs from `sender` to `to` until one is acked `routed` (the other
/// instances see a restarted id alive at their next live-view refresh, every
/// third of the lease); returns the body of that one.
/// Ephemeral DMs (`"store": false`) until one is routed: the live-view path,
/// not the inbox.
async fn dm_until_routed(sender: &mut Client, to: &str) -> i64 {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    for n in 0.. {
        let ack = sender
            .request(json!({"type": "dm", "to": to, "body": n, "store": false}))
            .await;
        if ack["status"] == "routed" {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a DM to {to} routed within {RECV_TIMEOUT:?}: {ack}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!("the loop returns or panics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_instance_id_refuses_to_start() {
    let redis = RedisServer::start().await;
    let (node1, node2) = tokio::join!(
        Instance::spawn(opts!("node1").redis(&redis).lease_ms(LEASE_MS)),
        Instance::spawn(opts!("node2").redis(&redis).lease_ms(LEASE_MS)),
    );
    let mut alice = Client::connect_user(&node1, "alice").await;
    let mut bob = Client::connect_user(&node2, "bob").await;
    await_field(&redis, "alice", "node1").await;

    let bound = Duration::from_millis(LEASE_MS * 5);
    let (status, output) =
        Instance::run_until_exit(opts!("node1").redis(&redis).lease_ms(LEASE_MS), bound).await;
    assert!(
        !status.success(),
        "the duplicate must fail: {status}\n{output}"
    );
    assert!(
        output.contains("\"node1\" is held by another live instance"),
        "it must say why:\n{output}"
    );

    // The first node1 lost nothing: its presence and its DMs.
    assert_eq!(
        redis.hgetall(&presence_key("alice")).await.get("node1"),
        Some(&"1".to_owned()),
        "alice's presence survives the refused duplicate"
    );
    let ack = bob
        .request(json!({"type": "dm", "to": "alice", "body": "still here"}))
        .await;
    assert_eq!(ack["status"], "routed", "{ack}");
    assert_eq!(alice.recv_type("dm").await["body"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_id_of_a_crashed_process_clears_what_it_left() {
    let redis = RedisServer::start().await;
    let (mut node1, node2) = tokio::join!(
        Instance::spawn(opts!("node1").redis(&redis).lease_ms(LEASE_MS)),
        Instance::spawn(opts!("node2").redis(&redis).lease_ms(LEASE_MS)),
    );
    let _carol = Client::connect_user(&node1, "carol").await;
    let mut bob = Client::connect_user(&node2, "bob").await;
    await_field(&redis, "carol", "node1").await;

    node1.sigkill();
    // At once, with the same id (a supervisor restarting a crashed process).
    node1
        .respawn_same_port(opts!("node1").redis(&redis).lease_ms(LEASE_MS))
        .await;
    assert!(
        redis.hgetall(&presence_key("carol")).await.is_empty(),
        "carol was only on the crashed node1: the new node1 must not claim her"
    );
    let ack = bob
        .request(json!({"type": "dm", "to": "carol", "body": 1}))
        .await;
    assert_eq!(ack["status"], "offline", "{ack}");
    let mut carol = Client::connect_user(&node1, "carol").await;
    eventually(
        RECV_TIMEOUT,
        "carol's presence on the new node1",
        || async {
            redis.hgetall(&presence_key("carol")).await.get("node1") == Some(&"1".to_owned())
        },
    )
    .await;
    // The DM acked `offline` above waited in carol's inbox: she gets it on
    // connect (read after her presence was written: an ephemeral DM sent
    // the moment her presence shows may overtake it, so it is awaited
    // first).
    assert_eq!(carol.recv_type("dm").await["body"], 1);
    // node2 saw node1's lease expire; it sees the new process alive at its
    // next refresh of the live instances (every third of the lease).
    let n = dm_until_routed(&mut bob, "carol").await;
    assert_eq!(carol.recv_type("dm").await["body"], n);
}

/// A process paused past its lease (SIGSTOP) is replaced by a new process
/// with the same id. When the paused one resumes it finds its id taken: it
/// stops serving and exits with an error, deleting nothing of the new one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_resumes_after_its_id_was_taken_over_exits_and_leaves_it_alone() {
    let redis = RedisServer::start().await;
    let (mut paused, node2) = tokio::join!(
        Instance::spawn(opts!("node1").redis(&redis).lease_ms(LEASE_MS)),
        Instance::spawn(opts!("node2").redis(&redis).lease_ms(LEASE_MS)),
    );
    let _alice = Client::connect_user(&paused, "alice").await;
    let mut bob = Client::connect_user(&node2, "bob").await;

    paused.sigstop();
    // The new node1 waits for the paused one's lease to run out, then serves.
    let replacement = Instance::spawn(opts!("node1").redis(&redis).lease_ms(LEASE_MS)).await;
    let mut carol = Client::connect_user(&replacement, "carol").await;
    eventually(
        RECV_TIMEOUT,
        "carol's presence on the new node1",
        || async {
            redis.hgetall(&presence_key("carol")).await.get("node1") == Some(&"1".to_owned())
        },
    )
    .await;

    paused.sigcont();
    let status = paused.wait_exit(Duration::from_secs(10)).await;
    assert!(
        !status.success(),
        "the replaced process must fail: {status}"
    );
    assert!(
        paused
            .log()
            .contains("another process holds this instance id"),
        "it says why:\n{}",
        paused.log()
    );
    assert_eq!(
        redis.hgetall(&presence_key("carol")).await.get("node1"),
        Some(&"1".to_owned()),
        "the replaced process deleted nothing of the new node1's"
    );
    assert!(
        redis.exists("sb:instance:{node1}").await,
        "the new node1's lease is still there"
    );
    let n = dm_until_routed(&mut bob, "carol").await;
    assert_eq!(carol.recv_type("dm").await["body"], n);
}
