//! Graceful shutdown on SIGTERM.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use switchboard_testkit::{opts, Client, Instance, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_and_cleans_redis() {
    let redis = RedisServer::start().await;
    // A second instance shares the cluster; its state must survive i1's exit.
    let (mut i1, i2) = tokio::join!(
        Instance::spawn(opts!("i1").redis(&redis)),
        Instance::spawn(opts!("i2").redis(&redis)),
    );
    let mut clients = vec![
        Client::connect_user(&i1, "alice").await,
        Client::connect_user(&i1, "alice").await,
        Client::connect_user(&i1, "bob").await,
    ];
    let _alice_i2 = Client::connect_user(&i2, "alice").await;

    let both: HashMap<String, String> = [
        ("i1".to_string(), "2".to_string()),
        ("i2".to_string(), "1".to_string()),
    ]
    .into();
    assert_eq!(redis.hgetall("sb:presence:{alice}").await, both);
    assert!(redis.exists("sb:instance:{i1}").await);
    assert!(redis.exists("sb:instance:{i1}:users").await);

    let started = Instant::now();
    i1.send_sigterm();
    for client in &mut clients {
        let code = client.expect_close(Duration::from_secs(5)).await;
        assert_eq!(code, Some(1001), "clients get Close 1001 (going away)");
    }
    let left = Duration::from_secs(5).saturating_sub(started.elapsed());
    let status = i1.wait_exit(left).await;
    assert!(
        status.success(),
        "exit status after SIGTERM must be 0, got {status}"
    );

    let only_i2: HashMap<String, String> = [("i2".to_string(), "1".to_string())].into();
    assert_eq!(
        redis.hgetall("sb:presence:{alice}").await,
        only_i2,
        "i1's presence field is removed, i2's is kept"
    );
    assert!(!redis.exists("sb:presence:{bob}").await, "bob had only i1");
    assert!(!redis.exists("sb:instance:{i1}").await, "lease key removed");
    assert!(
        !redis.exists("sb:instance:{i1}:users").await,
        "users set removed"
    );
    assert!(
        redis.exists("sb:instance:{i2}").await,
        "i2's lease untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_embedded_mode_exits_cleanly() {
    let mut inst = Instance::spawn(opts!("solo")).await;
    let mut alice = Client::connect_user(&inst, "alice").await;
    inst.send_sigterm();
    assert_eq!(alice.expect_close(Duration::from_secs(5)).await, Some(1001));
    let status = inst.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_no_clients_exits_quickly() {
    let redis = RedisServer::start().await;
    let mut inst = Instance::spawn(opts!("i1").redis(&redis)).await;
    let status = inst.terminate(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}");
    assert!(!redis.exists("sb:instance:{i1}").await, "lease key removed");
}
