//! The router's tests, each run three times: over the in-process backend,
//! over the Redis backend against a real `redis-server`, and over the Redis
//! backend against a real 3-master Redis Cluster (sharded channels, work
//! split by slot), so the routing operation production runs (the Redis
//! script) is the one tested in both deployments.
//!
//! The harness dispatches bus messages by hand (no dispatcher task): a test
//! decides when an instance handles what it received, which is how races
//! ("bob's connection closes while the DM is in flight") become deterministic.
//! Absence is proven with a sentinel: every instance publishes one to the
//! instance under test after the messages under test; bus messages from one
//! instance to another arrive in order, so once every sentinel is in, nothing
//! else is on its way.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;
use switchboard::bus::{
    Bus, Channel, ChannelKind, Covered, DirectRoute, Envelope, Inbound, Reached,
};
use switchboard::error::BackendError;
use switchboard::metrics::Metrics;
use switchboard::protocol::{DirectStatus, DmOptions, RoomStatus};
use switchboard::queue::{bounded, BoundedReceiver};
use switchboard::registry::{CloseReason, ConnHandle, Outbound, QueueLimits};
use switchboard::router::{PresenceSettings, RouteError, Router, RoutingMode};
use switchboard_core::local::{LocalBackend, LocalHub};
use switchboard_core::store::{Seq, Store, StoreLimits};
use switchboard_redis::{RedisBackend, RedisSettings, RedisTarget};
use switchboard_testkit::{RedisCluster, RedisServer};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);
/// The presence grace of every instance here.
const GRACE: Duration = Duration::from_millis(200);
const SENTINEL: &[u8] = b"SENTINEL ";

#[derive(Debug, Clone, Copy)]
enum Kind {
    Local,
    Redis,
    Cluster,
}

/// Makes the bus fail on demand (0: never, 1: unavailable, 2: timeout), over
/// either backend.
struct Faulty {
    inner: Arc<dyn Bus>,
    fail: Arc<AtomicU8>,
}

impl Faulty {
    fn check(&self) -> Result<(), BackendError> {
        match self.fail.load(Ordering::Relaxed) {
            1 => Err(BackendError::unavailable("injected")),
            2 => Err(BackendError::Timeout("injected".into())),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Bus for Faulty {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BackendError> {
        self.check()?;
        self.inner.publish(channel, payload).await
    }
    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        self.inner.subscribe(channel).await
    }
    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        self.inner.unsubscribe(channel).await
    }
    async fn route_direct(&self, route: &DirectRoute<'_>) -> Result<Vec<Reached>, BackendError> {
        self.check()?;
        self.inner.route_direct(route).await
    }
}

/// Several instances on one backend, dispatched by hand.
struct Cluster {
    routers: Vec<Arc<Router>>,
    buses: Vec<Arc<dyn Bus>>,
    inboxes: Vec<BoundedReceiver<Inbound>>,
    metrics: Vec<Arc<Metrics>>,
    /// Set to make every instance's bus fail (see [`Faulty`]).
    fail: Arc<AtomicU8>,
    _maintenance: CancellationToken,
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
    nonce: u64,
    /// Whether presence and member events (`P`/`M` envelopes) are handled
    /// like any other bus message; off, they are dropped on receipt, so the
    /// tests written before them see the bus they were written for.
    events: bool,
}

/// Whether a bus message is a presence or member event.
fn is_event(inbound: &Inbound) -> bool {
    matches!(
        Envelope::decode(&inbound.payload),
        Some((Envelope::Presence { .. } | Envelope::Member { .. }, _))
    )
}

/// A cluster whose room messages take the v1 path (no room history): the
/// room tests below were written for it; room history has its own test.
async fn cluster(kind: Kind, n: usize, mode: RoutingMode) -> Cluster {
    let limits = StoreLimits {
        room_history: 0,
        ..StoreLimits::default()
    };
    cluster_with(kind, n, mode, limits).await
}

async fn cluster_with(kind: Kind, n: usize, mode: RoutingMode, limits: StoreLimits) -> Cluster {
    let hub = Arc::new(LocalHub::with_limits(limits));
    let (redis, redis_cluster) = match kind {
        Kind::Local => (None, None),
        Kind::Redis => (Some(RedisServer::start().await), None),
        Kind::Cluster => (None, Some(RedisCluster::start(3, 0, 5000).await)),
    };
    let target = match (&redis, &redis_cluster) {
        (Some(server), _) => Some(RedisTarget::Single(server.url())),
        (_, Some(cluster)) => Some(RedisTarget::Cluster(
            cluster.seeds().split(',').map(str::to_owned).collect(),
        )),
        _ => None,
    };
    let maintenance = CancellationToken::new();
    let fail = Arc::new(AtomicU8::new(0));
    let mut c = Cluster {
        routers: Vec::new(),
        buses: Vec::new(),
        inboxes: Vec::new(),
        metrics: Vec::new(),
        fail: fail.clone(),
        _maintenance: maintenance.clone(),
        _redis: None,
        _cluster: None,
        nonce: 0,
        events: false,
    };
    for i in 1..=n {
        let id = format!("i{i}");
        let metrics = Metrics::new();
        let (tx, rx) = bounded::<Inbound>(4096, 16 << 20);
        type Backends = (
            Arc<dyn switchboard::presence::Presence>,
            Arc<dyn Bus>,
            Arc<dyn Store>,
        );
        let (presence, bus, store): Backends = match &target {
            None => {
                let local = Arc::new(LocalBackend::new(hub.clone(), &id, tx, metrics.clone()));
                (local.clone(), local.clone(), local)
            }
            Some(target) => {
                let settings = RedisSettings {
                    target: target.clone(),
                    prefix: "sb".to_owned(),
                    instance: id.clone(),
                    lease: Duration::from_secs(10),
                    connect_timeout: Duration::from_secs(1),
                    response_timeout: Duration::from_secs(2),
                    store: limits,
                    wait: None,
                };
                let backend = RedisBackend::connect(settings, tx, metrics.clone())
                    .await
                    .expect("connect the redis backend");
                tokio::spawn(backend.clone().run_maintenance(maintenance.clone()));
                (backend.clone(), backend.clone(), backend)
            }
        };
        let bus: Arc<dyn Bus> = Arc::new(Faulty {
            inner: bus,
            fail: fail.clone(),
        });
        let router = Arc::new(
            Router::new(
                &id,
                mode,
                presence,
                bus.clone(),
                Arc::default(),
                metrics.clone(),
            )
            .with_store(store)
            .with_presence_settings(PresenceSettings {
                grace: GRACE,
                ..PresenceSettings::default()
            }),
        );
        router.start().await.expect("start the router");
        c.routers.push(router);
        c.buses.push(bus);
        c.inboxes.push(rx);
        c.metrics.push(metrics);
    }
    c._redis = redis;
    c._cluster = redis_cluster;
    c
}

impl Cluster {
    /// Waits for the next bus message of instance `i` and has it handled.
    async fn dispatch(&mut self, i: usize) -> Inbound {
        let inbound = self.receive(i).await;
        self.routers[i].handle_inbound(inbound.clone());
        inbound
    }

    /// Waits for the next bus message of instance `i`, not handled yet.
    async fn receive(&mut self, i: usize) -> Inbound {
        let inbound = loop {
            let inbound = tokio::time::timeout(WAIT, self.inboxes[i].recv())
                .await
                .unwrap_or_else(|_| panic!("a bus message for instance {i} within {WAIT:?}"))
                .expect("inbox open");
            if self.events || !is_event(&inbound) {
                break inbound;
            }
        };
        assert!(
            !inbound.payload.starts_with(SENTINEL),
            "instance {i} got a stray sentinel"
        );
        inbound
    }

    /// Sends a sentinel to instance `i` from every instance and handles
    /// everything before them; returns how many real messages that was.
    async fn settle(&mut self, i: usize) -> usize {
        self.nonce += 1;
        let target = self.routers[i].instance().to_owned();
        let sentinel = Bytes::from(format!("SENTINEL {}", self.nonce));
        let fail = self.fail.swap(0, Ordering::Relaxed);
        for bus in &self.buses {
            bus.publish(Channel::Instance(&target), sentinel.clone())
                .await
                .expect("publish a sentinel");
        }
        self.fail.store(fail, Ordering::Relaxed);
        let (mut sentinels, mut others) = (0, 0);
        while sentinels < self.buses.len() {
            let inbound = tokio::time::timeout(WAIT, self.inboxes[i].recv())
                .await
                .unwrap_or_else(|_| panic!("sentinels for instance {i} within {WAIT:?}"))
                .expect("inbox open");
            if inbound.payload == sentinel {
                sentinels += 1;
            } else if !self.events && is_event(&inbound) {
                continue;
            } else {
                others += 1;
                self.routers[i].handle_inbound(inbound);
            }
        }
        others
    }
}

async fn user(router: &Router, name: &str) -> (Arc<ConnHandle>, BoundedReceiver<Outbound>) {
    let limits = QueueLimits {
        frames: 64,
        bytes: 1 << 20,
    };
    let (conn, rx) = ConnHandle::new(
        router.registry().next_conn_id(router.instance()),
        Arc::from(name),
        limits,
    );
    router.connect(&conn).await;
    (conn, rx)
}

/// The frames queued for a connection right now (routing is synchronous up
/// to the queue, so after a dispatch they are there).
fn frames(rx: &mut BoundedReceiver<Outbound>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(next) = rx.try_recv() {
        if let Outbound::Text(frame) = next {
            out.push(serde_json::from_str(frame.as_str()).expect("json frame"));
        }
    }
    out
}

fn one_frame(rx: &mut BoundedReceiver<Outbound>) -> Value {
    let mut got = frames(rx);
    assert_eq!(got.len(), 1, "exactly one frame: {got:?}");
    got.remove(0)
}

fn body(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("raw json")
}

/// Waits until `condition` holds (the re-route worker runs on its own task).
async fn until(what: &str, condition: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"));
}

/// Runs one test over every backend: in-process, one Redis, a Redis Cluster.
macro_rules! over_every_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() {
                super::$name(super::Kind::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::Kind::Redis).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                super::$name(super::Kind::Cluster).await
            }
        }
    )*};
}

over_every_backend!(
    dm_goes_to_the_holding_instance_only,
    offline_and_local,
    multi_device_gets_every_copy,
    a_device_that_connects_after_the_presence_was_cached_is_reached,
    broadcast_mode_reaches_every_instance_and_delivers_once,
    user_channel_mode_publishes_to_the_users_channel_only,
    rooms_reach_members_only_and_subscriptions_follow_membership,
    a_dm_for_a_user_who_moved_is_rerouted_once,
    a_rerouted_dm_skips_a_device_that_already_has_it,
    a_rerouted_dm_skips_the_origin_that_delivered_it_locally,
    failures_answer_partial_when_local_recipients_got_it,
    presence_follows_connections,
    stored_dms_carry_increasing_seqs_and_read_back_after_the_cursor,
    stored_dms_are_offered_once_per_connection_and_held_during_a_replay,
    stored_dms_that_arrive_out_of_order_are_queued_in_seq_order,
    a_lost_stored_dm_is_repaired_from_the_inbox_when_the_next_one_arrives,
    idempotent_sends_and_receipts,
    retention_trims_with_a_gap_and_unknown_users_are_not_stored,
    room_history_orders_members_and_replays_after_since,
    disconnect_closes_the_users_connections_on_the_holders_only,
    watchers_hear_user_level_transitions_only,
    a_reconnect_within_the_grace_is_no_event,
    room_members_are_listed_and_announced_once_per_user,
    kick_takes_the_user_out_of_one_room_on_every_instance,
);

/// The server API's disconnect, issued on an instance that does not hold
/// the user: every connection of the user closes (4002, the given text),
/// the other user on the same instance stays, and only the two holders
/// receive anything.
/// The next bus message of instance `i`, handled, which must be a presence
/// event for `user`; returns its online flag.
async fn presence_event(c: &mut Cluster, i: usize, user: &str) -> bool {
    let inbound = c.dispatch(i).await;
    match Envelope::decode(&inbound.payload) {
        Some((
            Envelope::Presence {
                user: u, online, ..
            },
            _,
        )) if u == user => online,
        other => panic!("a presence event for {user} at instance {i}, got {other:?}"),
    }
}

async fn watchers_hear_user_level_transitions_only(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    c.events = true;
    let (alice, mut a) = user(&c.routers[0], "alice").await;
    let watch = vec!["bob".to_owned()];
    c.routers[0]
        .watch(&alice, None, &watch, 10)
        .await
        .expect("watch");
    let ack = one_frame(&mut a);
    assert_eq!(ack["type"], "presence");
    assert_eq!(ack["online"]["bob"], false);

    let (bob1, _b1) = user(&c.routers[1], "bob").await;
    assert!(presence_event(&mut c, 0, "bob").await);
    let got = one_frame(&mut a);
    assert_eq!(
        (
            got["type"].as_str(),
            got["user"].as_str(),
            got["online"].as_bool()
        ),
        (Some("presence_event"), Some("bob"), Some(true))
    );
    assert!(got["ts"].as_u64().is_some_and(|ts| ts > 0));

    // A second device elsewhere, a third here: no transition, no event.
    let (bob2, _b2) = user(&c.routers[2], "bob").await;
    let (bob3, _b3) = user(&c.routers[0], "bob").await;
    c.routers[0].disconnect(&bob3).await;
    c.routers[1].disconnect(&bob1).await;
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(c.settle(0).await, 0, "bob stayed online on i3: no event");
    assert!(frames(&mut a).is_empty());
    // Instances that watch nobody received nothing.
    assert_eq!(c.settle(1).await, 0);

    // The last device goes: one offline event, after the grace.
    c.routers[2].disconnect(&bob2).await;
    assert!(!presence_event(&mut c, 0, "bob").await);
    let got = one_frame(&mut a);
    assert_eq!(
        (got["user"].as_str(), got["online"].as_bool()),
        (Some("bob"), Some(false))
    );
    let online = |m: &Metrics| {
        (
            m.presence_transitions_online.get(),
            m.presence_transitions_offline.get(),
        )
    };
    let totals = c
        .metrics
        .iter()
        .map(|m| online(m))
        .fold((0, 0), |t, x| (t.0 + x.0, t.1 + x.1));
    // alice's and bob's first connections; bob's last one.
    assert_eq!(totals, (2, 1));
    assert_eq!(c.metrics[0].presence_events_received.get(), 2);
    for i in 1..3 {
        assert_eq!(
            c.metrics[i].presence_events_received.get(),
            0,
            "instance {i} watches nobody"
        );
    }

    // After unwatch, nothing reaches i1 any more.
    c.routers[0].unwatch(&alice, &watch).await;
    let (bob4, _b4) = user(&c.routers[1], "bob").await;
    assert_eq!(c.settle(0).await, 0, "unwatched: not published here");
    c.routers[1].disconnect(&bob4).await;
    assert!(!c.routers[0].is_watched("bob"));
}

async fn a_reconnect_within_the_grace_is_no_event(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    c.events = true;
    let (alice, mut a) = user(&c.routers[0], "alice").await;
    let (bob, _b) = user(&c.routers[1], "bob").await;
    let watch = vec!["bob".to_owned(), "carol".to_owned()];
    c.routers[0]
        .watch(&alice, None, &watch, 10)
        .await
        .expect("watch");
    let ack = one_frame(&mut a);
    assert_eq!(
        (
            ack["online"]["bob"].as_bool(),
            ack["online"]["carol"].as_bool()
        ),
        (Some(true), Some(false))
    );
    // bob's connection drops and comes back on the other instance at once.
    c.routers[1].disconnect(&bob).await;
    let (bob, _b) = user(&c.routers[0], "bob").await;
    tokio::time::sleep(GRACE * 2).await;
    // A real transition of carol is the sentinel: it is the next event.
    let (carol, _c) = user(&c.routers[1], "carol").await;
    let inbound = c.dispatch(0).await;
    assert!(
        matches!(
            Envelope::decode(&inbound.payload),
            Some((
                Envelope::Presence {
                    user: "carol",
                    online: true,
                    ..
                },
                _
            ))
        ),
        "{inbound:?}"
    );
    let got = one_frame(&mut a);
    assert_eq!(got["user"], "carol");
    // The limit: 2 watched, at most 2.
    let more = vec!["dave".to_owned()];
    assert!(matches!(
        c.routers[0].watch(&alice, None, &more, 2).await,
        Err(switchboard::router::WatchError::LimitExceeded)
    ));
    c.routers[0].disconnect(&bob).await;
    c.routers[1].disconnect(&carol).await;
}

async fn room_members_are_listed_and_announced_once_per_user(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    c.events = true;
    let (alice, mut a) = user(&c.routers[0], "alice").await;
    let (quiet, mut q) = user(&c.routers[0], "quinn").await;
    c.routers[0].join(&alice, "lobby").await.expect("join");
    quiet.set_room_events("lobby", false);
    c.routers[0].join(&quiet, "lobby").await.expect("join");
    c.settle(0).await; // alice's and quinn's own member_joined
    frames(&mut a);
    let (bob1, _b1) = user(&c.routers[1], "bob").await;
    let (bob2, _b2) = user(&c.routers[1], "bob").await;
    let (bob3, _b3) = user(&c.routers[0], "bob").await;
    c.routers[1].join(&bob1, "lobby").await.expect("join");
    c.routers[1].join(&bob2, "lobby").await.expect("join");
    c.routers[0].join(&bob3, "lobby").await.expect("join");
    assert_eq!(
        c.settle(0).await,
        1,
        "one member_joined for bob's three connections"
    );
    let got = one_frame(&mut a);
    assert_eq!(
        (
            got["type"].as_str(),
            got["room"].as_str(),
            got["user"].as_str()
        ),
        (Some("member_joined"), Some("lobby"), Some("bob"))
    );
    assert!(
        frames(&mut q).iter().all(|f| f["type"] != "member_joined"),
        "events: false"
    );
    let members = c.routers[1].members("lobby").await.expect("members");
    assert_eq!(members.users, ["alice", "bob", "quinn"]);
    assert!(!members.truncated);

    // bob leaves everywhere: one member_left, after the grace.
    c.routers[1].leave(&bob1, "lobby").await;
    c.routers[1].disconnect(&bob2).await;
    c.routers[0].leave(&bob3, "lobby").await;
    let inbound = c.dispatch(0).await;
    assert!(
        matches!(
            Envelope::decode(&inbound.payload),
            Some((
                Envelope::Member {
                    room: "lobby",
                    user: "bob",
                    joined: false,
                    ..
                },
                _
            ))
        ),
        "{inbound:?}"
    );
    let got = one_frame(&mut a);
    assert_eq!(
        (got["type"].as_str(), got["user"].as_str()),
        (Some("member_left"), Some("bob"))
    );
    let members = c.routers[0].members("lobby").await.expect("members");
    assert_eq!(members.users, ["alice", "quinn"]);
    assert_eq!(c.settle(0).await, 0, "exactly one member_left");
}

async fn disconnect_closes_the_users_connections_on_the_holders_only(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    let (bob0, _b0) = user(&c.routers[0], "bob").await;
    let (bob1, _b1) = user(&c.routers[1], "bob").await;
    let (carol, _c) = user(&c.routers[1], "carol").await;
    let outcome = c.routers[2]
        .disconnect_user("bob", "spam")
        .await
        .expect("disconnect");
    assert_eq!(outcome.instances, 2, "both holders were told");
    c.dispatch(0).await;
    c.dispatch(1).await;
    for bob in [&bob0, &bob1] {
        assert_eq!(bob.close_reason(), Some(CloseReason::Disconnected));
        assert_eq!(bob.close_frame(), Some((4002, "spam")));
    }
    assert_eq!(carol.close_reason(), None, "another user stays");
    assert_eq!(
        c.settle(2).await,
        0,
        "the origin published nothing to itself"
    );
    assert_eq!(c.settle(0).await, 0);
    assert_eq!(c.settle(1).await, 0);

    // Locally, with no reason: the default text.
    let (bob2, _b2) = user(&c.routers[2], "bob").await;
    let outcome = c.routers[2]
        .disconnect_user("bob", "")
        .await
        .expect("disconnect");
    assert!(outcome.instances >= 1, "{outcome:?}");
    assert_eq!(
        bob2.close_frame(),
        Some((4002, "disconnected by the server"))
    );
    let nobody = c.routers[0]
        .disconnect_user("nobody", "x")
        .await
        .expect("disconnect");
    assert_eq!(nobody.instances, 0);
}

/// The server API's kick: the user leaves that room on every instance
/// (with a `left` frame), stays in its other rooms, and the room's other
/// members stay.
async fn kick_takes_the_user_out_of_one_room_on_every_instance(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    let (bob0, mut b0) = user(&c.routers[0], "bob").await;
    let (bob1, mut b1) = user(&c.routers[1], "bob").await;
    let (alice, mut a) = user(&c.routers[1], "alice").await;
    for (router, conn) in [(0, &bob0), (1, &bob1), (1, &alice)] {
        c.routers[router].join(conn, "lobby").await.expect("join");
    }
    c.routers[0].join(&bob0, "other").await.expect("join");
    let outcome = c.routers[0].kick("bob", "lobby").await.expect("kick");
    assert_eq!(outcome.instances, 2);
    c.dispatch(1).await;
    for rx in [&mut b0, &mut b1] {
        let left = one_frame(rx);
        assert_eq!(
            (
                left["type"].as_str(),
                left["room"].as_str(),
                left["reason"].as_str()
            ),
            (Some("left"), Some("lobby"), Some("kicked"))
        );
    }
    assert!(!bob0.is_member("lobby") && !bob1.is_member("lobby"));
    assert!(bob0.is_member("other"), "other rooms stay");
    assert!(alice.is_member("lobby"), "other members stay");
    assert_eq!(bob0.close_reason(), None, "a kick is not a disconnect");
    assert_eq!(
        c.routers[0]
            .send_room_as_member(&bob0, "lobby", &body("0"))
            .await,
        Err(RouteError::NotMember)
    );
    c.routers[1]
        .send_room_as_member(&alice, "lobby", &body("1"))
        .await
        .expect("sent");
    c.settle(1).await;
    assert!(
        frames(&mut b1).is_empty(),
        "the kicked device hears nothing more"
    );
    assert!(frames(&mut a).is_empty(), "the sender gets no echo");
    // Again, from an instance without bob: both holders are told (the
    // count is of holders reached), nobody is a member, nothing happens.
    let again = c.routers[2].kick("bob", "lobby").await.expect("kick");
    assert_eq!(again.instances, 2);
    c.dispatch(0).await;
    c.dispatch(1).await;
    assert!(frames(&mut b0).is_empty() && frames(&mut b1).is_empty());
    assert_eq!(c.metrics[0].kicked.get() + c.metrics[1].kicked.get(), 2);
}

/// With room history, a room message is recorded and published in one
/// step; every member — on the sender's instance too — gets it from the
/// bus with its seq, the sender's connection excepted; the history reads
/// back after a position, and says when it no longer reaches back.
async fn room_history_orders_members_and_replays_after_since(kind: Kind) {
    let limits = StoreLimits {
        room_history: 3,
        ..StoreLimits::default()
    };
    let mut c = cluster_with(kind, 2, RoutingMode::Routed, limits).await;
    let (alice, mut a) = user(&c.routers[0], "alice").await;
    let (carol, mut cr) = user(&c.routers[0], "carol").await;
    let (bob, mut b) = user(&c.routers[1], "bob").await;
    for (router, conn) in [(0, &alice), (0, &carol), (1, &bob)] {
        c.routers[router].join(conn, "lobby").await.expect("join");
    }
    for k in 0..5 {
        let out = c.routers[0]
            .send_room_as_member(&alice, "lobby", &body(&k.to_string()))
            .await
            .expect("sent");
        assert_eq!(out.status, RoomStatus::Ok);
        c.dispatch(0).await;
        c.dispatch(1).await;
    }
    assert!(frames(&mut a).is_empty(), "not to the sending connection");
    let on_carol = frames(&mut cr);
    let on_bob = frames(&mut b);
    assert_eq!(on_carol, on_bob, "the same frames, in the same order");
    let seqs: Vec<Seq> = on_bob
        .iter()
        .map(|f| Seq::parse(f["seq"].as_str().expect("seq")).expect("a seq"))
        .collect();
    assert_eq!(seqs.len(), 5);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let back = c.routers[1]
        .read_room("lobby", seqs[2])
        .await
        .expect("read");
    assert!(back.recovered, "history reaches back to the third");
    assert_eq!(
        back.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        seqs[3..].to_vec()
    );
    let back = c.routers[1]
        .read_room("lobby", seqs[0])
        .await
        .expect("read");
    assert!(!back.recovered, "the second was trimmed");
    assert_eq!(back.entries.len(), 3, "from the oldest kept");
    let _ = carol;
}

fn dm_options() -> DmOptions {
    DmOptions::default()
}

/// The v1.1 path over both stores: a stored DM is published with its seq
/// to the holders (the sender's own instance too), and the inbox reads it
/// back after the cursor, which `recv` moves.
async fn stored_dms_carry_increasing_seqs_and_read_back_after_the_cursor(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (_bob, mut b) = user(&c.routers[1], "bob").await;
    let mut seqs = Vec::new();
    for k in 0..3 {
        let out = c.routers[0]
            .send_dm(&alice.user, "bob", &body(&k.to_string()), &dm_options())
            .await
            .expect("sent");
        assert_eq!(out.status, DirectStatus::Routed);
        assert!(out.stored);
        seqs.push(out.seq.expect("a seq"));
        c.dispatch(1).await;
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let got = frames(&mut b);
    let got_seqs: Vec<String> = got
        .iter()
        .map(|f| f["seq"].as_str().expect("seq").to_owned())
        .collect();
    assert_eq!(
        got_seqs,
        seqs.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    );
    let backlog = c.routers[1]
        .read_inbox("bob", None, 10, false)
        .await
        .expect("read");
    assert_eq!(backlog.entries.len(), 3);
    assert_eq!(backlog.newest, Some(seqs[2]), "the newest appended");
    let replayed: Value = serde_json::from_str(backlog.entries[0].1.as_str()).expect("json");
    assert_eq!(replayed, got[0], "the inbox keeps the frame as delivered");
    c.routers[1].ack_inbox("bob", seqs[1]).await.expect("ack");
    // A smaller seq is ignored.
    c.routers[0].ack_inbox("bob", seqs[0]).await.expect("ack");
    let backlog = c.routers[0]
        .read_inbox("bob", None, 10, false)
        .await
        .expect("read");
    assert_eq!(backlog.after, seqs[1]);
    assert_eq!(
        backlog.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![seqs[2]]
    );
    let backlog = c.routers[0]
        .read_inbox("bob", Some(seqs[0]), 10, false)
        .await
        .expect("read");
    assert_eq!(backlog.entries.len(), 2);
    assert!(!backlog.gap);
}

/// The seam at the connection: a live stored DM a connection already has
/// is dropped, and during a replay live ones are held and queued after it.
async fn stored_dms_are_offered_once_per_connection_and_held_during_a_replay(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (_bob, _b) = user(&c.routers[1], "bob").await;
    let first = c.routers[0]
        .send_dm(&alice.user, "bob", &body("1"), &dm_options())
        .await
        .expect("sent");
    c.dispatch(1).await;
    // A second device starts replaying before it is registered.
    let (dev, mut d) = ConnHandle::new(
        c.routers[1].registry().next_conn_id("i2"),
        Arc::from("bob"),
        QueueLimits {
            frames: 64,
            bytes: 1 << 20,
        },
    );
    dev.begin_replay(Seq::ZERO);
    c.routers[1].connect(&dev).await;
    let second = c.routers[0]
        .send_dm(&alice.user, "bob", &body("2"), &dm_options())
        .await
        .expect("sent");
    c.dispatch(1).await;
    assert!(frames(&mut d).is_empty(), "held during the replay");
    let backlog = c.routers[1]
        .read_inbox("bob", None, 10, true)
        .await
        .expect("read");
    assert_eq!(backlog.entries.len(), 2, "both are in the inbox");
    let backlog_newest = backlog.newest;
    for (seq, frame) in backlog.entries {
        if dev.replay_accepts(seq) {
            dev.send_text(frame, &c.metrics[1]);
        }
    }
    assert_eq!(
        dev.finish_replay(backlog_newest, &c.metrics[1]),
        switchboard::registry::ReplayEnd::Live
    );
    let got: Vec<String> = frames(&mut d)
        .iter()
        .map(|f| f["seq"].as_str().expect("seq").to_owned())
        .collect();
    assert_eq!(
        got,
        vec![
            first.seq.expect("seq").to_string(),
            second.seq.expect("seq").to_string()
        ],
        "each once, in order"
    );
    // The same DM offered again (a re-delivery) is dropped.
    let again = Inbound {
        kind: ChannelKind::Personal,
        payload: Envelope::Direct {
            to: "bob",
            hop: 0,
            origin: "i1",
            covered: Covered::NONE,
            seq: second.seq,
            prev: first.seq,
        }
        .encode(b"{\"type\":\"dm\"}"),
    };
    let before = duplicates(&c.metrics[1]);
    c.routers[1].handle_inbound(again);
    assert!(frames(&mut d).is_empty());
    assert_eq!(
        duplicates(&c.metrics[1]),
        before + 2,
        "dropped on both devices"
    );
}

/// The seqs of the stored DMs among `frames`.
fn seqs_of(frames: &[Value]) -> Vec<Seq> {
    frames
        .iter()
        .map(|f| Seq::parse(f["seq"].as_str().expect("a seq")).expect("a seq"))
        .collect()
}

/// The predecessor a stored DM's bus message carries.
fn prev_of(inbound: &Inbound) -> Option<Seq> {
    match Envelope::decode(&inbound.payload) {
        Some((Envelope::Direct { prev, .. }, _)) => prev,
        other => panic!("a direct message, not {other:?}"),
    }
}

/// Two senders' DMs to bob can reach his instance out of seq order (Redis
/// Cluster: the append and the publish are two steps). The later one waits
/// for its predecessor; bob gets each once, in seq order, and no inbox read
/// is needed when the earlier one arrives before the repair starts.
async fn stored_dms_that_arrive_out_of_order_are_queued_in_seq_order(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (bob, mut b) = user(&c.routers[1], "bob").await;
    let mut seqs = Vec::new();
    for (from, k) in [("alice", "1"), ("carol", "2")] {
        let out = c.routers[0]
            .send_dm(from, "bob", &body(k), &dm_options())
            .await
            .expect("sent");
        seqs.push(out.seq.expect("stored"));
    }
    let first = c.receive(1).await;
    let second = c.receive(1).await;
    assert_eq!(prev_of(&second), Some(seqs[0]), "the bus carries the chain");
    c.routers[1].handle_inbound(second);
    assert!(
        frames(&mut b).is_empty(),
        "held: its predecessor is missing"
    );
    c.routers[1].handle_inbound(first);
    assert_eq!(seqs_of(&frames(&mut b)), seqs, "each once, in seq order");
    assert_eq!(c.routers[1].repair_inbox(&bob).await, Ok(false));
    assert_eq!(c.metrics[1].inbox_repairs.get(), 0, "no read was needed");
    // Live again: the next one is queued at once.
    let third = c.routers[0]
        .send_dm("alice", "bob", &body("3"), &dm_options())
        .await
        .expect("sent");
    c.dispatch(1).await;
    assert_eq!(seqs_of(&frames(&mut b)), vec![third.seq.expect("stored")]);
    assert_eq!(c.settle(1).await, 0);
}

/// Pub/sub is at-most-once: a stored DM lost on the bus is noticed when the
/// next one arrives without its predecessor. That one is held, the
/// connection's task is woken, reads the inbox after the last DM it had,
/// and gets the lost one, then the held one, each once.
async fn a_lost_stored_dm_is_repaired_from_the_inbox_when_the_next_one_arrives(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (bob, mut b) = user(&c.routers[1], "bob").await;
    let mut seqs = Vec::new();
    for k in 0..3 {
        let out = c.routers[0]
            .send_dm("alice", "bob", &body(&k.to_string()), &dm_options())
            .await
            .expect("sent");
        seqs.push(out.seq.expect("stored"));
    }
    c.dispatch(1).await;
    let _lost = c.receive(1).await;
    c.dispatch(1).await;
    assert_eq!(seqs_of(&frames(&mut b)), seqs[..1].to_vec());
    tokio::time::timeout(WAIT, bob.repair_wanted())
        .await
        .expect("the connection is asked to repair");
    let before = duplicates(&c.metrics[1]);
    assert_eq!(c.routers[1].repair_inbox(&bob).await, Ok(true));
    assert_eq!(seqs_of(&frames(&mut b)), seqs[1..].to_vec());
    assert_eq!(c.metrics[1].inbox_repairs.get(), 1);
    assert_eq!(
        duplicates(&c.metrics[1]),
        before + 1,
        "the held one was read too"
    );
    assert_eq!(c.routers[1].repair_inbox(&bob).await, Ok(false));
    let fourth = c.routers[0]
        .send_dm("alice", "bob", &body("4"), &dm_options())
        .await
        .expect("sent");
    c.dispatch(1).await;
    assert_eq!(seqs_of(&frames(&mut b)), vec![fourth.seq.expect("stored")]);
    assert_eq!(c.metrics[1].inbox_repairs.get(), 1, "live again");
}

fn duplicates(metrics: &Metrics) -> u64 {
    let text = metrics.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("switchboard_dropped_total{reason=\"duplicate_seq\"}"))
        .unwrap_or_else(|| panic!("no duplicate_seq series in {text}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

async fn idempotent_sends_and_receipts(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (alice, mut a) = user(&c.routers[0], "alice").await;
    let (_bob, mut b) = user(&c.routers[1], "bob").await;
    let keyed = DmOptions {
        key: Some("k-1".to_owned()),
        receipt: true,
        ..DmOptions::default()
    };
    let first = c.routers[0]
        .send_dm(&alice.user, "bob", &body("1"), &keyed)
        .await
        .expect("sent");
    c.dispatch(1).await;
    let retry = c.routers[1]
        .send_dm(&alice.user, "bob", &body("1"), &keyed)
        .await
        .expect("sent");
    assert_eq!(
        (&retry.msg_id, retry.seq, retry.status),
        (&first.msg_id, first.seq, first.status)
    );
    assert_eq!(c.settle(1).await, 0, "the retry published nothing");
    assert_eq!(frames(&mut b).len(), 1);
    let seq = first.seq.expect("seq");
    c.routers[1].ack_inbox("bob", seq).await.expect("ack");
    c.dispatch(0).await;
    let receipt = one_frame(&mut a);
    assert_eq!(receipt["type"], "delivered");
    assert_eq!(receipt["msg_id"], first.msg_id.as_str());
    assert_eq!(receipt["to"], "bob");
    assert_eq!(receipt["seq"], seq.to_string());
}

async fn retention_trims_with_a_gap_and_unknown_users_are_not_stored(kind: Kind) {
    let limits = StoreLimits {
        inbox_max_len: 5,
        ..StoreLimits::default()
    };
    let c = cluster_with(kind, 1, RoutingMode::Routed, limits).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let unknown = c.routers[0]
        .send_dm(&alice.user, "nobody", &body("1"), &dm_options())
        .await
        .expect("sent");
    assert_eq!(
        (unknown.status, unknown.stored, unknown.seq),
        (DirectStatus::Offline, false, None)
    );
    // Seen once: an inbox record exists from now on.
    c.routers[0]
        .read_inbox("carol", None, 1, true)
        .await
        .expect("open");
    let mut seqs = Vec::new();
    for k in 0..8 {
        let out = c.routers[0]
            .send_dm(&alice.user, "carol", &body(&k.to_string()), &dm_options())
            .await
            .expect("sent");
        assert_eq!((out.status, out.stored), (DirectStatus::Offline, true));
        seqs.push(out.seq.expect("seq"));
    }
    let backlog = c.routers[0]
        .read_inbox("carol", None, 100, true)
        .await
        .expect("read");
    assert!(backlog.gap, "three entries were trimmed");
    assert_eq!(
        backlog.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        seqs[3..].to_vec()
    );
    let after_trim = c.routers[0]
        .read_inbox("carol", Some(seqs[2]), 100, false)
        .await
        .expect("read");
    assert!(!after_trim.gap, "nothing after seqs[2] was trimmed");
}

async fn dm_goes_to_the_holding_instance_only(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (_bob, mut b) = user(&c.routers[1], "bob").await;
    let outcome = c.routers[0]
        .send_direct(&alice.user, "bob", &body("{\"hi\":1}"))
        .await
        .expect("sent");
    assert_eq!(outcome.status, DirectStatus::Routed);
    c.dispatch(1).await;
    let got = one_frame(&mut b);
    assert_eq!(
        (got["from"].as_str(), got["body"]["hi"].as_i64()),
        (Some("alice"), Some(1))
    );
    assert_eq!(got["msg_id"], outcome.msg_id.as_str());
    assert_eq!(c.settle(2).await, 0, "i3 holds no bob and receives nothing");
    assert_eq!(c.metrics[1].bus_received.personal.get(), 1);
    assert_eq!(c.metrics[0].dm_routed.get(), 1);
}

async fn offline_and_local(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let outcome = c.routers[0]
        .send_direct(&alice.user, "nobody", &body("1"))
        .await
        .expect("sent");
    assert_eq!(outcome.status, DirectStatus::Offline);
    let (_carol, mut carol_rx) = user(&c.routers[0], "carol").await;
    let outcome = c.routers[0]
        .send_direct(&alice.user, "carol", &body("2"))
        .await
        .expect("sent");
    assert_eq!(outcome.status, DirectStatus::Routed);
    assert_eq!(one_frame(&mut carol_rx)["body"], 2);
    assert_eq!(c.metrics[0].dm_local.get(), 1);
    assert_eq!(c.metrics[0].dm_offline.get(), 1);
    assert_eq!(c.settle(1).await, 0, "nothing was published to i2");
    assert_eq!(c.settle(0).await, 0, "nor back to i1");
}

async fn multi_device_gets_every_copy(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (_b2, mut rx2) = user(&c.routers[1], "bob").await;
    let (_b3, mut rx3) = user(&c.routers[2], "bob").await;
    let (_b1, mut rx1) = user(&c.routers[0], "bob").await;
    c.routers[0]
        .send_direct(&alice.user, "bob", &body("\"x\""))
        .await
        .expect("sent");
    assert_eq!(one_frame(&mut rx1)["body"], "x", "the local device");
    c.dispatch(1).await;
    c.dispatch(2).await;
    assert_eq!(one_frame(&mut rx2)["body"], "x");
    assert_eq!(one_frame(&mut rx3)["body"], "x");
    for i in 0..3 {
        assert_eq!(c.settle(i).await, 0, "one copy per device, no more");
    }
    assert!(
        frames(&mut rx1).is_empty() && frames(&mut rx2).is_empty() && frames(&mut rx3).is_empty()
    );
}

/// The routing path's presence cache must learn of a device that connects
/// elsewhere after the recipient's presence was cached: Redis's
/// invalidation push (on a cluster, from the node serving the key's slot)
/// drops the entry. Without it the new device would never be reached.
async fn a_device_that_connects_after_the_presence_was_cached_is_reached(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (_b2, mut rx2) = user(&c.routers[1], "bob").await;
    c.routers[0]
        .send_direct(&alice.user, "bob", &body("\"first\""))
        .await
        .expect("sent");
    c.dispatch(1).await;
    assert_eq!(one_frame(&mut rx2)["body"], "first");
    // Routed from the cache now (one Redis and a cluster).
    c.routers[0]
        .send_direct(&alice.user, "bob", &body("\"second\""))
        .await
        .expect("sent");
    c.dispatch(1).await;
    assert_eq!(one_frame(&mut rx2)["body"], "second");
    let (_b3, mut rx3) = user(&c.routers[2], "bob").await;
    // The invalidation travels on its own; each try is one more DM.
    let mut tries = 0;
    loop {
        tries += 1;
        let text = format!("\"try {tries}\"");
        c.routers[0]
            .send_direct(&alice.user, "bob", &body(&text))
            .await
            .expect("sent");
        c.dispatch(1).await;
        assert_eq!(one_frame(&mut rx2)["body"], format!("try {tries}"));
        c.settle(2).await;
        if !frames(&mut rx3).is_empty() {
            break;
        }
        assert!(tries < 200, "bob's new device on i3 never reached");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if !matches!(kind, Kind::Local) {
        // The path under test: the second DM was routed from the cache,
        // and bob's connect dropped the entry (a miss after it).
        let m = &c.metrics[0];
        assert!(m.presence_cache_hits.get() >= 1, "routed from the cache");
        assert!(
            m.presence_cache_misses.get() >= 2,
            "filled, then invalidated"
        );
    }
}

async fn broadcast_mode_reaches_every_instance_and_delivers_once(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Broadcast).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (_bob, mut b) = user(&c.routers[1], "bob").await;
    c.routers[0]
        .send_direct(&alice.user, "bob", &body("1"))
        .await
        .expect("sent");
    // Every instance, the sender included, receives the broadcast.
    for i in 0..3 {
        c.dispatch(i).await;
        assert_eq!(c.metrics[i].bus_received.broadcast.get(), 1);
    }
    assert_eq!(one_frame(&mut b)["body"], 1, "delivered exactly once");
}

async fn user_channel_mode_publishes_to_the_users_channel_only(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::UserChannel).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (bob, mut b) = user(&c.routers[1], "bob").await;
    let outcome = c.routers[0]
        .send_direct(&alice.user, "bob", &body("1"))
        .await
        .expect("sent");
    assert_eq!(outcome.status, DirectStatus::Routed);
    c.dispatch(1).await;
    assert_eq!(one_frame(&mut b)["body"], 1);
    assert_eq!(c.metrics[1].bus_received.user.get(), 1);
    assert_eq!(c.settle(2).await, 0);
    assert_eq!(c.metrics[1].bus_received.personal.get(), 0);
    // Local recipient: delivered directly, the echo from the bus is skipped.
    let (_carol, mut carol_rx) = user(&c.routers[0], "carol").await;
    c.routers[0]
        .send_direct(&alice.user, "carol", &body("2"))
        .await
        .expect("sent");
    assert_eq!(one_frame(&mut carol_rx)["body"], 2);
    c.dispatch(0).await;
    assert_eq!(
        c.metrics[0].bus_received.user.get(),
        1,
        "the echo reached i1"
    );
    assert!(frames(&mut carol_rx).is_empty(), "and was skipped");
    // Last connection gone: the channel is unsubscribed and bob is offline.
    c.routers[1].disconnect(&bob).await;
    let outcome = c.routers[0]
        .send_direct(&alice.user, "bob", &body("3"))
        .await
        .expect("sent");
    assert_eq!(outcome.status, DirectStatus::Offline);
}

async fn rooms_reach_members_only_and_subscriptions_follow_membership(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    let (alice, mut a) = user(&c.routers[0], "alice").await;
    let (bob, mut b) = user(&c.routers[1], "bob").await;
    let (carol, mut carol_rx) = user(&c.routers[2], "carol").await;
    c.routers[0].join(&alice, "lobby").await.expect("join");
    c.routers[1].join(&bob, "lobby").await.expect("join");
    assert_eq!(
        c.routers[2]
            .send_room_as_member(&carol, "lobby", &body("0"))
            .await,
        Err(RouteError::NotMember)
    );
    let outcome = c.routers[0]
        .send_room_as_member(&alice, "lobby", &body("1"))
        .await
        .expect("sent");
    assert_eq!(outcome.status, RoomStatus::Ok);
    c.dispatch(1).await;
    let got = one_frame(&mut b);
    assert_eq!(
        (got["room"].as_str(), got["body"].as_i64()),
        (Some("lobby"), Some(1))
    );
    c.dispatch(0).await; // i1's own echo, skipped
    assert!(
        frames(&mut a).is_empty(),
        "the sender does not get its own message"
    );
    assert_eq!(c.settle(2).await, 0, "no member, no subscription");
    assert!(frames(&mut carol_rx).is_empty());

    c.routers[1].leave(&bob, "lobby").await;
    c.routers[0]
        .send_room_as_member(&alice, "lobby", &body("2"))
        .await
        .expect("sent");
    c.dispatch(0).await;
    assert_eq!(
        c.settle(1).await,
        0,
        "unsubscribed after the last member left"
    );
    assert!(frames(&mut b).is_empty());
}

fn stale_dm(to: &str, hop: u8, origin: &str, covered: &str) -> Inbound {
    let frame = r#"{"type":"dm","from":"alice","body":1,"msg_id":"m","ts":0}"#;
    Inbound {
        kind: ChannelKind::Personal,
        payload: Envelope::Direct {
            to,
            hop,
            origin,
            covered: Covered::from_field(covered),
            seq: None,
            prev: None,
        }
        .encode(frame.as_bytes()),
    }
}

async fn a_dm_for_a_user_who_moved_is_rerouted_once(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    // Bob is on i3 now; a stale message for him arrives at i2.
    let (_bob, mut b) = user(&c.routers[2], "bob").await;
    c.routers[1].handle_inbound(stale_dm("bob", 0, "i1", "i2"));
    c.dispatch(2).await;
    assert_eq!(one_frame(&mut b)["body"], 1);
    until("the re-route is counted", || {
        c.metrics[1].rerouted.get() == 1
    })
    .await;
    // A second hop is never taken.
    c.routers[1].handle_inbound(stale_dm("bob", 1, "i1", "i2"));
    assert_eq!(c.metrics[1].dropped_not_here.get(), 1);
    assert_eq!(c.settle(2).await, 0);
}

/// Bob holds connections on i2 and i3; his i2 connection closes while a DM
/// to him is in flight. i2 must not re-route it to i3, which has it already.
async fn a_rerouted_dm_skips_a_device_that_already_has_it(kind: Kind) {
    let mut c = cluster(kind, 3, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (bob_on_i2, _b2) = user(&c.routers[1], "bob").await;
    let (_bob_on_i3, mut b3) = user(&c.routers[2], "bob").await;
    let outcome = c.routers[0]
        .send_direct(&alice.user, "bob", &body("\"once\""))
        .await
        .expect("sent");
    assert_eq!(outcome.status, DirectStatus::Routed);
    c.routers[1].disconnect(&bob_on_i2).await;
    c.dispatch(1).await; // i2: bob is gone
    until("i2 decides about the re-route", || {
        c.metrics[1].reroute_covered.get() + c.metrics[1].rerouted.get() > 0
    })
    .await;
    c.dispatch(2).await;
    c.settle(2).await;
    assert_eq!(
        one_frame(&mut b3)["body"],
        "once",
        "one copy on i3, no second"
    );
    assert_eq!(c.metrics[1].rerouted.get(), 0, "nothing re-routed");
    assert_eq!(c.metrics[1].reroute_covered.get(), 1);
}

/// Bob moves from i2 to the sender's instance i1 before i2's presence
/// decrement lands: i1 delivers locally and the routing script still
/// publishes to i2, which must not re-route the DM back to i1.
async fn a_rerouted_dm_skips_the_origin_that_delivered_it_locally(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (bob_on_i2, _b2) = user(&c.routers[1], "bob").await;
    let (_bob_on_i1, mut b1) = user(&c.routers[0], "bob").await;
    // Bob's i2 socket is gone, its presence decrement not yet written.
    c.routers[1].registry().remove(&bob_on_i2);
    let outcome = c.routers[0]
        .send_direct(&alice.user, "bob", &body("\"once\""))
        .await
        .expect("sent");
    assert_eq!(outcome.status, DirectStatus::Routed);
    assert_eq!(
        one_frame(&mut b1)["body"],
        "once",
        "delivered locally on i1"
    );
    c.routers[1]
        .presence()
        .disconnect("bob")
        .await
        .expect("the late decrement");
    c.dispatch(1).await;
    until("i2 decides about the re-route", || {
        c.metrics[1].reroute_covered.get() + c.metrics[1].rerouted.get() > 0
    })
    .await;
    c.settle(0).await;
    assert_eq!(frames(&mut b1), Vec::<Value>::new(), "no second copy on i1");
    assert_eq!(c.metrics[1].rerouted.get(), 0, "not re-routed to i1");
}

async fn failures_answer_partial_when_local_recipients_got_it(kind: Kind) {
    let mut c = cluster(kind, 2, RoutingMode::Routed).await;
    let (alice, _a) = user(&c.routers[0], "alice").await;
    let (dave, mut d) = user(&c.routers[0], "dave").await;
    let (bob, _b) = user(&c.routers[1], "bob").await;
    for (conn, router) in [(&alice, 0), (&dave, 0), (&bob, 1)] {
        c.routers[router].join(conn, "lobby").await.expect("join");
    }
    c.routers[0].join(&alice, "solo").await.expect("join");
    c.routers[1].join(&bob, "solo").await.expect("join");

    for (fail, error) in [(1, RouteError::Unavailable), (2, RouteError::Timeout)] {
        c.fail.store(fail, Ordering::Relaxed);
        // dave (local) got it; i2 could not be reached.
        let room = c.routers[0]
            .send_room_as_member(&alice, "lobby", &body("1"))
            .await
            .expect("local members got it");
        assert_eq!(room.status, RoomStatus::Partial);
        assert_eq!(one_frame(&mut d)["msg_id"], room.msg_id.as_str());
        // Nobody local but the sender: the error says what happened.
        let solo = c.routers[0]
            .send_room_as_member(&alice, "solo", &body("2"))
            .await;
        assert_eq!(solo, Err(error));
        let dm = c.routers[0]
            .send_direct(&alice.user, "dave", &body("3"))
            .await
            .expect("dave's local connection got it");
        assert_eq!(dm.status, DirectStatus::Partial);
        assert_eq!(one_frame(&mut d)["body"], 3);
        let dm = c.routers[0]
            .send_direct(&alice.user, "bob", &body("4"))
            .await;
        assert_eq!(dm, Err(error));
    }
    assert_eq!(c.metrics[0].room_failed.partial.get(), 2);
    assert_eq!(c.metrics[0].room_failed.unavailable.get(), 1);
    assert_eq!(c.metrics[0].room_failed.timeout.get(), 1);
    assert_eq!(c.metrics[0].dm_failed.partial.get(), 2);
    assert_eq!(c.metrics[0].dm_failed.unavailable.get(), 1);
    assert_eq!(c.metrics[0].dm_failed.timeout.get(), 1);
    c.fail.store(0, Ordering::Relaxed);
    assert_eq!(c.settle(1).await, 0, "nothing reached i2 while failing");
}

async fn presence_follows_connections(kind: Kind) {
    let c = cluster(kind, 2, RoutingMode::Routed).await;
    let (bob, _b) = user(&c.routers[1], "bob").await;
    let users = vec!["bob".to_owned(), "carol".to_owned()];
    assert_eq!(
        c.routers[0].online(&users).await.expect("ok"),
        vec![true, false]
    );
    c.routers[1].disconnect(&bob).await;
    assert_eq!(
        c.routers[0].online(&users).await.expect("ok"),
        vec![false, false]
    );
}
