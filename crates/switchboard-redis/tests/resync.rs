//! Re-asserting presence after Redis lost it, at scale: an instance holding
//! 20,000 users must have written all of them back well within one lease
//! (resync is pipelined on one Redis and split by slot, many commands in
//! flight, on a cluster — never one round trip per user). Real
//! redis-server processes: one killed and restarted empty, or a 3-master
//! cluster flushed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use switchboard_core::bus::{Bus, Channel, Inbound};
use switchboard_core::metrics::Metrics;
use switchboard_core::presence::Presence;
use switchboard_core::queue::bounded;
use switchboard_redis::{RedisBackend, RedisSettings, RedisTarget};
use switchboard_testkit::{RedisCluster, RedisServer};
use tokio_util::sync::CancellationToken;

const USERS: usize = 20_000;
const LEASE: Duration = Duration::from_secs(10);
/// The users set of the instance under test.
const USERS_SET: &str = "sb:instance:{big}:users";
/// Counts the presence keys of one node.
const COUNT_KEYS: &str = "return #redis.call('KEYS', 'sb:presence:*')";
/// Counts every presence key and the users set's members (one Redis).
const COUNT: &str = "return {#redis.call('KEYS', 'sb:presence:*'), \
                     redis.call('EXISTS', 'sb:instance:{big}:users') == 1 \
                     and redis.call('SCARD', 'sb:instance:{big}:users') or 0}";

/// One Redis or a cluster, as the test needs it.
enum Deployment {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Deployment {
    fn target(&self) -> RedisTarget {
        match self {
            Deployment::Single(redis) => RedisTarget::Single(redis.url()),
            Deployment::Cluster(cluster) => {
                RedisTarget::Cluster(cluster.seeds().split(',').map(str::to_owned).collect())
            }
        }
    }

    /// Presence keys and users-set members Redis holds for instance `big`.
    async fn counts(&self) -> (i64, i64) {
        match self {
            Deployment::Single(redis) => {
                let (keys, listed): (i64, i64) = redis.cmd(&["EVAL", COUNT, "0"]).await;
                (keys, listed)
            }
            Deployment::Cluster(cluster) => {
                // The presence keys are on every master, the set on one.
                let per_node: Vec<(u16, i64)> =
                    cluster.cmd_all_masters(&["EVAL", COUNT_KEYS, "0"]).await;
                let listed: i64 = cluster.cmd_for_key(USERS_SET, &["SCARD", USERS_SET]).await;
                (per_node.iter().map(|(_, n)| n).sum(), listed)
            }
        }
    }

    /// Loses everything Redis held; returns when it answers again, empty.
    async fn lose_everything(&mut self) -> Instant {
        match self {
            Deployment::Single(redis) => {
                redis.kill();
                redis.restart().await
            }
            Deployment::Cluster(cluster) => {
                let _: Vec<(u16, String)> = cluster.cmd_all_masters(&["FLUSHALL"]).await;
                Instant::now()
            }
        }
    }
}

/// `bound`: how long after the loss every user must be back.
async fn twenty_thousand_users_are_reasserted(mut redis: Deployment, bound: Duration) {
    // The backend's own account (`presence re-asserted … took_ms`) goes to
    // the test's output: RUST_LOG=info shows it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let metrics = Metrics::new();
    let (inbox, _received) = bounded::<Inbound>(1024, 1 << 20);
    let settings = RedisSettings {
        target: redis.target(),
        prefix: "sb".to_owned(),
        instance: "big".to_owned(),
        lease: LEASE,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(2),
        store: Default::default(),
        wait: None,
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
    assert_eq!(redis.counts().await, (USERS as i64, USERS as i64));

    let back = redis.lose_everything().await;
    assert_eq!(redis.counts().await, (0, 0), "Redis came back empty");
    let deadline = back + LEASE;
    loop {
        let now = redis.counts().await;
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
    eprintln!("{USERS} users re-asserted {took:?} after Redis answered empty");
    assert!(metrics.presence_resyncs.get() >= 1);
    assert!(
        took < bound,
        "re-asserting {USERS} users took {took:?}: more than {bound:?}"
    );
    // The presence fields are back before the heartbeat that wrote them has
    // finished (watches and memberships are re-asserted after them, and the
    // message path reopens at its end): wait for it, within the lease.
    let ready_by = Instant::now() + LEASE;
    while !backend.is_ready() {
        assert!(Instant::now() < ready_by, "ready again within one lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let holders = backend.locate("user19999").await.expect("locate");
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].connections, 1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_users_are_reasserted_well_within_a_lease() {
    // The subscriber's reconnect runs the heartbeat at once.
    let redis = Deployment::Single(RedisServer::start().await);
    twenty_thousand_users_are_reasserted(redis, LEASE / 3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_users_are_reasserted_on_a_cluster_split_by_slot() {
    // Nothing disconnects: the lease is found absent at the next heartbeat
    // (up to lease/3 after the flush), then the resync runs.
    let cluster = Deployment::Cluster(RedisCluster::start(3, 0, 5000).await);
    twenty_thousand_users_are_reasserted(cluster, LEASE * 2 / 3).await
}
