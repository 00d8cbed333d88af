//! Re-asserting presence after Redis restarts empty, at scale: an instance
//! holding 20,000 users must have written all of them back well within one
//! lease (resync is pipelined, not one round trip per user). Real
//! redis-server, killed and restarted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use switchboard_core::bus::{Bus, Channel, Inbound};
use switchboard_core::metrics::Metrics;
use switchboard_core::presence::Presence;
use switchboard_core::queue::bounded;
use switchboard_redis::{RedisBackend, RedisSettings};
use switchboard_testkit::RedisServer;
use tokio_util::sync::CancellationToken;

const USERS: usize = 20_000;
const LEASE: Duration = Duration::from_secs(10);

/// Presence keys and users-set members Redis holds for instance `big`.
async fn counts(redis: &RedisServer) -> (i64, i64) {
    let keys: i64 = redis
        .cmd(&["EVAL", "return #redis.call('KEYS', 'sb:presence:*')", "0"])
        .await;
    let listed: i64 = redis.cmd(&["SCARD", "sb:instance:{big}:users"]).await;
    (keys, listed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_users_are_reasserted_well_within_a_lease() {
    // The backend's own account (`presence re-asserted … took_ms`) goes to
    // the test's output: RUST_LOG=info shows it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut redis = RedisServer::start().await;
    let metrics = Metrics::new();
    let (inbox, _received) = bounded::<Inbound>(1024, 1 << 20);
    let settings = RedisSettings {
        url: redis.url(),
        prefix: "sb".to_owned(),
        instance: "big".to_owned(),
        lease: LEASE,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(2),
        store: Default::default(),
    };
    let backend = RedisBackend::connect(settings, inbox, metrics.clone())
        .await
        .expect("connect the redis backend");
    // What the router subscribes first: the personal channel.
    backend
        .subscribe(Channel::Instance("big"))
        .await
        .expect("subscribe");
    let stop = CancellationToken::new();
    tokio::spawn(backend.clone().run_maintenance(stop.clone()));

    let users: Vec<String> = (0..USERS).map(|n| format!("user{n}")).collect();
    for chunk in users.chunks(1000) {
        let connects = chunk.iter().map(|user| {
            let backend: Arc<RedisBackend> = backend.clone();
            async move { backend.connect(user).await }
        });
        for result in join_all(connects).await {
            result.expect("presence write");
        }
    }
    assert_eq!(counts(&redis).await, (USERS as i64, USERS as i64));

    redis.kill();
    let back = redis.restart().await;
    assert_eq!(counts(&redis).await, (0, 0), "Redis came back empty");
    let deadline = back + LEASE;
    loop {
        let now = counts(&redis).await;
        if now == (USERS as i64, USERS as i64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{USERS} users re-asserted within one lease ({LEASE:?}); Redis has {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = back.elapsed();
    eprintln!("{USERS} users re-asserted {took:?} after the empty Redis answered PING");
    assert!(metrics.presence_resyncs.get() >= 1);
    assert!(
        took < LEASE / 3,
        "re-asserting {USERS} users took {took:?}: more than a third of the lease"
    );
    let holders = backend.locate("user19999").await.expect("locate");
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].connections, 1);
    stop.cancel();
}
