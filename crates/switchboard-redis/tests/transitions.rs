//! The Redis side of presence events against real redis-server processes:
//! what each `Presence` call announces (`P` envelopes on the watchers'
//! personal channels, `M` envelopes on room channels), the grace left to
//! the router (nothing is announced offline before `settle`), the reaper
//! settling a killed instance's users within a few hundred ms of its lease
//! expiry, withdrawal, a Redis that restarted empty, and a cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_core::bus::{Bus, Channel, Envelope, Inbound};
use switchboard_core::metrics::Metrics;
use switchboard_core::presence::{Announced, Presence};
use switchboard_core::queue::{bounded, BoundedReceiver};
use switchboard_redis::{RedisBackend, RedisSettings, RedisTarget};
use switchboard_testkit::{RedisCluster, RedisServer};
use tokio_util::sync::CancellationToken;

/// One instance: its backend, its bus inbox, its metrics, and what stops
/// its maintenance (a "kill": no withdrawal).
struct Node {
    backend: Arc<RedisBackend>,
    inbox: BoundedReceiver<Inbound>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

async fn node(target: RedisTarget, id: &str, lease: Duration) -> Node {
    let metrics = Metrics::new();
    let (tx, inbox) = bounded::<Inbound>(1024, 1 << 20);
    let settings = RedisSettings {
        target,
        prefix: "sb".to_owned(),
        instance: id.to_owned(),
        lease,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(2),
        store: Default::default(),
        wait: None,
    };
    let backend = RedisBackend::connect(settings, tx, metrics.clone())
        .await
        .expect("connect the redis backend");
    backend
        .subscribe(Channel::Instance(id))
        .await
        .expect("subscribe the personal channel");
    let stop = CancellationToken::new();
    tokio::spawn(backend.clone().run_maintenance(stop.clone()));
    Node {
        backend,
        inbox,
        metrics,
        stop,
    }
}

/// A transition as received: `(kind, room or "", user, on, version, ts)`.
type Event = (char, String, String, bool, u64, u64);

/// The next `P` or `M` envelope within `within`, if any.
async fn next_event(inbox: &mut BoundedReceiver<Inbound>, within: Duration) -> Option<Event> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let inbound = tokio::time::timeout_at(deadline, inbox.recv())
            .await
            .ok()??;
        match Envelope::decode(&inbound.payload).map(|(e, _)| e) {
            Some(Envelope::Presence {
                user,
                online,
                version,
                ts_ms,
            }) => return Some(('P', String::new(), user.to_owned(), online, version, ts_ms)),
            Some(Envelope::Member {
                room,
                user,
                joined,
                version,
                ts_ms,
            }) => {
                return Some((
                    'M',
                    room.to_owned(),
                    user.to_owned(),
                    joined,
                    version,
                    ts_ms,
                ))
            }
            _ => continue,
        }
    }
}

/// Waits for the next event and checks what it says; returns its version.
async fn expect(
    inbox: &mut BoundedReceiver<Inbound>,
    kind: char,
    user: &str,
    on: bool,
) -> (u64, u64) {
    let event = next_event(inbox, Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("a {kind} event for {user} (on={on})"));
    assert_eq!(
        (event.0, event.2.as_str(), event.3),
        (kind, user, on),
        "{event:?}"
    );
    (event.4, event.5)
}

/// Nothing arrives for a while.
async fn expect_quiet(inbox: &mut BoundedReceiver<Inbound>, what: &str) {
    if let Some(event) = next_event(inbox, Duration::from_millis(300)).await {
        panic!("{what}: unexpected {event:?}");
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const LEASE: Duration = Duration::from_secs(3);

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

async fn presence_transitions(target: RedisTarget) {
    let a = node(target.clone(), "a", LEASE).await;
    let mut b = node(target, "b", LEASE).await;
    assert_eq!(
        b.backend.watch(&users(&["bob"])).await.expect("watch"),
        [Announced::NONE]
    );
    // The first connection anywhere: online, once, to every watcher (the
    // announcing instance does not watch bob, so it gets nothing).
    a.backend.connect("bob").await.expect("connect");
    let (v1, ts1) = expect(&mut b.inbox, 'P', "bob", true).await;
    assert!(
        ts1.abs_diff(now_ms()) < 5_000,
        "ts {ts1} is the Redis clock"
    );
    assert_eq!(v1 / 1000, ts1);
    assert_eq!(a.metrics.presence_transitions_online.get(), 1);
    // A second tab, on another instance: no event.
    b.backend.connect("bob").await.expect("connect");
    // All gone: nothing until settled (the router's grace).
    a.backend.disconnect("bob").await.expect("disconnect");
    b.backend.disconnect("bob").await.expect("disconnect");
    expect_quiet(&mut b.inbox, "before settle").await;
    assert_eq!(
        a.backend.announced(&users(&["bob"])).await.expect("read"),
        [Announced {
            online: true,
            version: v1,
            ts_ms: ts1
        }]
    );
    // Back within the grace on b: a's settle announces nothing.
    b.backend.connect("bob").await.expect("connect");
    a.backend.settle("bob").await.expect("settle");
    expect_quiet(&mut b.inbox, "reconnected within the grace").await;
    b.backend.disconnect("bob").await.expect("disconnect");
    b.backend.settle("bob").await.expect("settle");
    let (v2, _) = expect(&mut b.inbox, 'P', "bob", false).await;
    assert!(v2 > v1);
    assert_eq!(b.metrics.presence_transitions_offline.get(), 1);
    // Settled twice: nothing more.
    a.backend.settle("bob").await.expect("settle again");
    expect_quiet(&mut b.inbox, "settled twice").await;
    assert_eq!(
        b.backend.announced(&users(&["bob"])).await.expect("read"),
        [Announced::NONE]
    );
    // The watcher itself connects: it is told too.
    b.backend.connect("bob").await.expect("connect");
    let (v3, _) = expect(&mut b.inbox, 'P', "bob", true).await;
    assert!(v3 > v2);
    // Unwatched: no more events.
    b.backend.unwatch(&users(&["bob"])).await.expect("unwatch");
    b.backend.disconnect("bob").await.expect("disconnect");
    b.backend.settle("bob").await.expect("settle");
    expect_quiet(&mut b.inbox, "unwatched").await;
    // Watch replies carry the state, per user.
    a.backend.connect("carol").await.expect("connect");
    let states = b
        .backend
        .watch(&users(&["bob", "carol"]))
        .await
        .expect("watch");
    assert_eq!(states[0], Announced::NONE);
    assert!(states[1].online && states[1].version > 0);
    a.stop.cancel();
    b.stop.cancel();
}

async fn member_transitions(target: RedisTarget) {
    let a = node(target.clone(), "a", LEASE).await;
    let mut b = node(target, "b", LEASE).await;
    b.backend
        .subscribe(Channel::Room("lobby"))
        .await
        .expect("subscribe the room");
    a.backend.join_room("lobby", "bob").await.expect("join");
    let (v1, _) = expect(&mut b.inbox, 'M', "bob", true).await;
    assert_eq!(a.metrics.member_transitions_joined.get(), 1);
    b.backend.join_room("lobby", "bob").await.expect("join");
    b.backend.join_room("lobby", "alice").await.expect("join");
    expect(&mut b.inbox, 'M', "alice", true).await;
    a.backend.leave_room("lobby", "bob").await.expect("leave");
    a.backend
        .settle_member("lobby", "bob")
        .await
        .expect("settle");
    expect_quiet(&mut b.inbox, "bob is still a member on b").await;
    let members = a.backend.members("lobby", 10).await.expect("members");
    assert_eq!(members.users, ["alice", "bob"]);
    assert!(!members.truncated);
    let first = a.backend.members("lobby", 1).await.expect("members");
    assert_eq!(first.users, ["alice"]);
    assert!(first.truncated);
    b.backend.leave_room("lobby", "bob").await.expect("leave");
    expect_quiet(&mut b.inbox, "left, not settled").await;
    b.backend
        .settle_member("lobby", "bob")
        .await
        .expect("settle");
    let (v2, _) = expect(&mut b.inbox, 'M', "bob", false).await;
    assert!(v2 > v1);
    let states = a
        .backend
        .member_states("lobby", &users(&["bob", "alice"]))
        .await
        .expect("states");
    assert_eq!(states[0], Announced::NONE);
    assert!(states[1].online);
    assert_eq!(
        a.backend.members("lobby", 10).await.expect("members").users,
        ["alice"]
    );
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_transitions_are_announced_once() {
    let redis = RedisServer::start().await;
    presence_transitions(RedisTarget::Single(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_transitions_are_announced_once() {
    let redis = RedisServer::start().await;
    member_transitions(RedisTarget::Single(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0, 5000).await;
    let target = RedisTarget::Cluster(cluster.seeds().split(',').map(str::to_owned).collect());
    presence_transitions(target.clone()).await;
    member_transitions(target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_reaped_and_its_users_announced_gone_promptly() {
    let redis = RedisServer::start().await;
    let target = RedisTarget::Single(redis.url());
    let lease = Duration::from_millis(900);
    let a = node(target.clone(), "a", lease).await;
    let mut b = node(target, "b", lease).await;
    b.backend
        .subscribe(Channel::Room("lobby"))
        .await
        .expect("subscribe the room");
    b.backend
        .watch(&users(&["bob", "carol"]))
        .await
        .expect("watch");
    a.backend.watch(&users(&["dave"])).await.expect("watch");
    a.backend.connect("bob").await.expect("connect");
    expect(&mut b.inbox, 'P', "bob", true).await;
    // carol: closed on a, lingering (not settled) when a dies.
    a.backend.connect("carol").await.expect("connect");
    expect(&mut b.inbox, 'P', "carol", true).await;
    a.backend.disconnect("carol").await.expect("disconnect");
    a.backend.join_room("lobby", "bob").await.expect("join");
    expect(&mut b.inbox, 'M', "bob", true).await;
    // "SIGKILL": a stops refreshing its lease, withdraws nothing. Its last
    // refresh was at most a period (lease/3) ago.
    let killed = Instant::now();
    a.stop.cancel();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = next_event(&mut b.inbox, lease * 3)
            .await
            .unwrap_or_else(|| panic!("the reaper's events; got {seen:?}"));
        seen.push((event.0, event.2, event.3));
    }
    let took = killed.elapsed();
    seen.sort();
    assert_eq!(
        seen,
        [
            ('M', "bob".to_owned(), false),
            ('P', "bob".to_owned(), false),
            ('P', "carol".to_owned(), false)
        ]
    );
    assert!(
        took < lease + Duration::from_millis(700),
        "reaped {took:?} after the kill (lease {lease:?})"
    );
    eprintln!("the killed instance's users were announced gone {took:?} after the kill");
    // The events go out before the reap finishes.
    let deadline = Instant::now() + Duration::from_secs(2);
    while b.metrics.reaped_instances.get() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.metrics.reaped_instances.get(), 1);
    assert_eq!(b.metrics.presence_transitions_offline.get(), 2);
    for key in [
        "sb:instance:{a}:users",
        "sb:instance:{a}:watching",
        "sb:instance:{a}:rooms",
        "sb:presence:{bob}",
        "sb:online:{bob}",
        "sb:watchers:{dave}",
        "sb:rmembers:{lobby}",
        "sb:rcount:{lobby}",
        "sb:members:{lobby}",
    ] {
        let exists: i64 = redis.cmd(&["EXISTS", key]).await;
        assert_eq!(exists, 0, "{key} is gone");
    }
    b.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_announces_what_nobody_else_holds() {
    let redis = RedisServer::start().await;
    let target = RedisTarget::Single(redis.url());
    let a = node(target.clone(), "a", LEASE).await;
    let mut b = node(target, "b", LEASE).await;
    b.backend
        .subscribe(Channel::Room("lobby"))
        .await
        .expect("subscribe the room");
    b.backend
        .watch(&users(&["bob", "carol"]))
        .await
        .expect("watch");
    a.backend.watch(&users(&["dave"])).await.expect("watch");
    for user in ["bob", "carol"] {
        a.backend.connect(user).await.expect("connect");
        expect(&mut b.inbox, 'P', user, true).await;
    }
    b.backend.connect("carol").await.expect("connect");
    a.backend.join_room("lobby", "bob").await.expect("join");
    expect(&mut b.inbox, 'M', "bob", true).await;
    a.stop.cancel();
    a.backend.withdraw().await.expect("withdraw");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = next_event(&mut b.inbox, Duration::from_secs(3))
            .await
            .expect("an event");
        seen.push((event.0, event.2, event.3));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ('M', "bob".to_owned(), false),
            ('P', "bob".to_owned(), false)
        ]
    );
    expect_quiet(&mut b.inbox, "carol is still on b").await;
    for key in [
        "sb:instance:{a}:users",
        "sb:instance:{a}:watching",
        "sb:instance:{a}:rooms",
        "sb:instance:{a}",
        "sb:watchers:{dave}",
    ] {
        let exists: i64 = redis.cmd(&["EXISTS", key]).await;
        assert_eq!(exists, 0, "{key} is gone");
    }
    let score: Option<String> = redis.cmd(&["ZSCORE", "sb:instances", "a"]).await;
    assert_eq!(score, None);
    b.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_reasserts_states_watches_and_memberships() {
    let mut redis = RedisServer::start().await;
    let target = RedisTarget::Single(redis.url());
    let a = node(target.clone(), "a", LEASE).await;
    let mut b = node(target, "b", LEASE).await;
    b.backend.watch(&users(&["bob"])).await.expect("watch");
    a.backend.connect("bob").await.expect("connect");
    let (v1, _) = expect(&mut b.inbox, 'P', "bob", true).await;
    a.backend.join_room("lobby", "bob").await.expect("join");
    // Lingering on a when Redis goes: not re-announced.
    a.backend.connect("carol").await.expect("connect");
    a.backend.disconnect("carol").await.expect("disconnect");

    redis.kill();
    redis.restart().await;
    let deadline = Instant::now() + LEASE;
    loop {
        let online: i64 = redis.cmd(&["EXISTS", "sb:online:{bob}"]).await;
        let watcher: i64 = redis.cmd(&["HEXISTS", "sb:watchers:{bob}", "b"]).await;
        let member: i64 = redis.cmd(&["HEXISTS", "sb:members:{lobby}", "bob"]).await;
        if online + watcher + member == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "re-asserted within a lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let carol: i64 = redis.cmd(&["EXISTS", "sb:online:{carol}"]).await;
    assert_eq!(carol, 0, "a lingering user is not announced again");
    let listed: i64 = redis
        .cmd(&["SISMEMBER", "sb:instance:{a}:users", "carol"])
        .await;
    assert_eq!(listed, 1, "a lingering user stays listed");
    // At most the one documented re-announcement, with a newer version.
    if let Some(event) = next_event(&mut b.inbox, Duration::from_millis(500)).await {
        assert_eq!((event.0, event.2.as_str(), event.3), ('P', "bob", true));
        assert!(event.4 > v1);
    }
    // The re-asserted watcher field works: the offline event arrives.
    a.backend.disconnect("bob").await.expect("disconnect");
    a.backend.settle("bob").await.expect("settle");
    expect(&mut b.inbox, 'P', "bob", false).await;
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_from_redis_are_loaded_again() {
    let redis = RedisServer::start().await;
    let target = RedisTarget::Single(redis.url());
    let a = node(target.clone(), "a", LEASE).await;
    let mut b = node(target, "b", LEASE).await;
    b.backend
        .subscribe(Channel::Room("lobby"))
        .await
        .expect("subscribe the room");
    let _: String = redis.cmd(&["SCRIPT", "FLUSH"]).await;
    b.backend
        .watch(&users(&["bob", "carol"]))
        .await
        .expect("watch after a flush");
    let _: String = redis.cmd(&["SCRIPT", "FLUSH"]).await;
    a.backend
        .connect("bob")
        .await
        .expect("connect after a flush");
    expect(&mut b.inbox, 'P', "bob", true).await;
    let _: String = redis.cmd(&["SCRIPT", "FLUSH"]).await;
    a.backend
        .join_room("lobby", "bob")
        .await
        .expect("join after a flush");
    expect(&mut b.inbox, 'M', "bob", true).await;
    let _: String = redis.cmd(&["SCRIPT", "FLUSH"]).await;
    a.backend.withdraw().await.expect("withdraw after a flush");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = next_event(&mut b.inbox, Duration::from_secs(3))
            .await
            .expect("an event");
        seen.push((event.0, event.2, event.3));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ('M', "bob".to_owned(), false),
            ('P', "bob".to_owned(), false)
        ]
    );
    a.stop.cancel();
    b.stop.cancel();
}
