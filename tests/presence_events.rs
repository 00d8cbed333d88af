//! Presence events (issue 14): `watch` and `presence_event`, room member
//! events (`member_joined` / `member_left`) and `members`, across instances
//! on Redis — a second tab, a reconnect within the grace, a SIGKILLed
//! instance, events delivered out of order, an empty Redis restart, a
//! graceful drain, authorization, a randomized reconnect race (seeded:
//! the seed is printed, `SB_PRESENCE_SEED=<seed>` replays it) — and in
//! embedded mode.
//!
//! Real redis-server, real instance processes, real WebSocket clients.
//! Leases and graces are short ([`LEASE_MS`], [`GRACE_MS`]).
//!
//! Proving that an event did *not* come: the test waits [`QUIET`] (longer
//! than the grace, so a wrong offline event would have been sent by then),
//! asserting nothing arrives; then it causes a real transition of another
//! watched user (the sentinel) and asserts that it is the next event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchboard_testkit::jwt::claims_for;
use switchboard_testkit::{
    assert_error, eventually, member_event, mint_jwt_claims, now_unix_ms, online_map, opts,
    presence_event, Client, Incoming, Instance, Opts, RawFrame, RawWs, RedisProxy, RedisServer,
    MEMBER_EVENTS, MEMBER_JOINED, MEMBER_LEFT, PRESENCE_EVENT, RECV_TIMEOUT,
};
use tokio_tungstenite::tungstenite::handshake::client::Request;

/// Lease TTL of every Redis-mode instance here.
const LEASE_MS: u64 = 1500;
const LEASE: Duration = Duration::from_millis(LEASE_MS);
/// `--presence-grace-ms` of every instance here.
const GRACE_MS: u64 = 500;
const GRACE: Duration = Duration::from_millis(GRACE_MS);
/// How long a "nothing arrives" check waits before its sentinel: the grace
/// and a margin, so an event that should not come would have come.
const QUIET: Duration = Duration::from_millis(GRACE_MS + 700);
/// Slack for comparing the server's millisecond timestamps with ours (the
/// same clock; only rounding differs).
const TS_SLACK_MS: i64 = 5;

const KEY: &str = "presence-test-api-key-0123456789";

const ONLINE_TRANSITIONS: &str = r#"switchboard_presence_transitions_total{kind="online"}"#;
const OFFLINE_TRANSITIONS: &str = r#"switchboard_presence_transitions_total{kind="offline"}"#;
const PRESENCE_RECEIVED: &str = "switchboard_presence_events_received_total";
const DELIVERED_PRESENCE: &str = r#"switchboard_presence_events_delivered_total{kind="presence"}"#;
const DELIVERED_MEMBER: &str = r#"switchboard_presence_events_delivered_total{kind="member"}"#;
const MEMBER_RECEIVED: &str = "switchboard_member_events_received_total";
const WATCHED_USERS: &str = "switchboard_watched_users";
const RECONCILES: &str = "switchboard_presence_reconciles_total";
const REAPED: &str = "switchboard_reaped_instances_total";

/// The randomized race takes this exclusively, as does the Redis restart
/// (it has a recovery-time bound); the others share it. Two cores.
static SERIAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Instance `id` on `redis` with the short lease and grace of these tests.
fn node(id: &str, redis: &RedisServer) -> Opts {
    opts!(id)
        .redis(redis)
        .lease_ms(LEASE_MS)
        .flag("--presence-grace-ms", GRACE_MS)
        .flag("--api-key", KEY)
}

async fn connect(instance: &Instance, user: &str) -> Client {
    Client::connect_user(instance, user).await
}

fn states(pairs: &[(&str, bool)]) -> BTreeMap<String, bool> {
    pairs.iter().map(|(u, s)| (u.to_string(), *s)).collect()
}

fn assert_ts(ts: i64, lo: i64, hi: i64, what: &str) {
    assert!(
        (lo - TS_SLACK_MS..=hi + TS_SLACK_MS).contains(&ts),
        "{what}: ts {ts} must be the transition's unix ms, in [{lo}, {hi}]"
    );
}

/// Waits up to `within` for `w`'s next presence_event and asserts that it
/// is `user` becoming `online`; returns its ts.
async fn expect_presence(
    w: &mut Client,
    user: &str,
    online: bool,
    within: Duration,
    what: &str,
) -> i64 {
    match w.next_of(&[PRESENCE_EVENT], within).await {
        Some(frame) => {
            let (got_user, got_online, ts) = presence_event(&frame);
            assert_eq!(
                (got_user.as_str(), got_online),
                (user, online),
                "[{}] {what}: the next presence_event must be {user} online={online}, got {frame}",
                w.label()
            );
            ts
        }
        None => panic!(
            "[{}] {what}: no presence_event within {within:?} (expected {user} online={online})",
            w.label()
        ),
    }
}

/// Asserts that no presence_event reaches `w` for `quiet`.
/// Waits for `user`'s offline event at `w` and checks that it came a grace
/// after the close at `closed` (`closed_ms` on the wall clock), not sooner.
async fn expect_offline_after_grace(w: &mut Client, user: &str, closed: Instant, closed_ms: i64) {
    let what = format!("{user}'s offline event");
    let ts = expect_presence(w, user, false, GRACE + RECV_TIMEOUT, &what).await;
    let took = closed.elapsed();
    assert!(
        took + Duration::from_millis(TS_SLACK_MS as u64) >= GRACE,
        "{what} came {took:?} after the close, before the {GRACE:?} grace"
    );
    assert_ts(ts, closed_ms + GRACE_MS as i64, now_unix_ms(), &what);
}

async fn expect_no_presence(w: &mut Client, quiet: Duration, what: &str) {
    let got = w.collect_of(&[PRESENCE_EVENT], quiet).await;
    assert!(
        got.is_empty(),
        "[{}] {what}: expected no presence_event for {quiet:?}, got {got:?}",
        w.label()
    );
}

/// [`expect_no_presence`] on every watcher at once.
async fn expect_no_presence_all(watchers: &mut [Client], quiet: Duration, what: &str) {
    join_all(
        watchers
            .iter_mut()
            .map(|w| expect_no_presence(w, quiet, what)),
    )
    .await;
}

/// Waits up to `within` for `c`'s next member event and asserts that it is
/// `user` joining (`joined`) or leaving `room`; returns its ts.
async fn expect_member(
    c: &mut Client,
    room: &str,
    user: &str,
    joined: bool,
    within: Duration,
    what: &str,
) -> i64 {
    let kind = if joined {
        "member_joined"
    } else {
        "member_left"
    };
    match c.next_of(MEMBER_EVENTS, within).await {
        Some(frame) => {
            let (got_room, got_user, got_joined, ts) = member_event(&frame);
            assert_eq!(
                (got_room.as_str(), got_user.as_str(), got_joined),
                (room, user, joined),
                "[{}] {what}: the next member event must be {kind} {user} in {room}, got {frame}",
                c.label()
            );
            ts
        }
        None => panic!(
            "[{}] {what}: no member event within {within:?} (expected {kind} {user} in {room})",
            c.label()
        ),
    }
}

async fn expect_no_member(c: &mut Client, quiet: Duration, what: &str) {
    let got = c.collect_of(MEMBER_EVENTS, quiet).await;
    assert!(
        got.is_empty(),
        "[{}] {what}: expected no member event for {quiet:?}, got {got:?}",
        c.label()
    );
}

/// The users of a `members` reply, asserting its shape and whether it says
/// it was cut.
fn members_of(reply: &Value, room: &str, truncated: bool, what: &str) -> Vec<String> {
    assert_eq!(reply["type"], "members", "{what}: {reply}");
    assert_eq!(reply["room"], room, "{what}: {reply}");
    let users: Vec<String> = reply["users"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: members reply without a users array: {reply}"))
        .iter()
        .map(|u| {
            u.as_str()
                .unwrap_or_else(|| panic!("{what}: a member that is not a string: {reply}"))
                .to_string()
        })
        .collect();
    if truncated {
        assert_eq!(
            reply["truncated"], true,
            "{what}: must say truncated: {reply}"
        );
    } else {
        assert!(
            reply.get("truncated").is_none() || reply["truncated"] == false,
            "{what}: not cut, so no `truncated: true`: {reply}"
        );
    }
    users
}

fn strings(users: &[&str]) -> Vec<String> {
    users.iter().map(|u| u.to_string()).collect()
}

async fn metric_sum(instances: &[&Instance], series: &str) -> f64 {
    let mut sum = 0.0;
    for instance in instances {
        sum += instance.metric(series).await;
    }
    sum
}

/// Reads `client` until its connection ends (a drain closes it); returns
/// when that was seen.
async fn wait_end(mut client: Client, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Incoming::Json(_) => {}
            Incoming::Closed(_) | Incoming::Ended(_) => return Instant::now(),
            Incoming::Timeout => panic!(
                "[{}] the connection did not end within {timeout:?}",
                client.label()
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// 1. watch, online, second tab, grace, reconnect elsewhere, unwatch, limit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_acks_state_and_announces_only_user_level_transitions() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let limited = |id: &str| node(id, &redis).flag("--max-watches-per-connection", 3);
    let (i1, i2, i3) = tokio::join!(
        Instance::spawn(limited("i1")),
        Instance::spawn(limited("i2")),
        Instance::spawn(limited("i3")),
    );
    let carol = connect(&i2, "carol").await;
    let mut w = connect(&i1, "watcher").await;

    // The ack reports the current state (carol connected before the watch).
    assert_eq!(
        w.watch(&["bob", "carol", "dave"]).await,
        states(&[("bob", false), ("carol", true), ("dave", false)]),
        "watch ack"
    );
    // Watching a user already watched is fine: the ack reports the state.
    assert_eq!(
        w.watch(&["carol"]).await,
        states(&[("carol", true)]),
        "watching carol again"
    );
    eventually(RECV_TIMEOUT, "i1 watches 3 users", || async {
        i1.metric(WATCHED_USERS).await == 3.0
    })
    .await;

    // bob's first connection anywhere: online.
    let before = now_unix_ms();
    let bob1 = connect(&i2, "bob").await;
    let ts = expect_presence(&mut w, "bob", true, RECV_TIMEOUT, "bob connects on i2").await;
    assert_ts(ts, before, now_unix_ms(), "bob's online event");

    // A second tab on the same instance, a third on another one, both
    // closed again (one cleanly, one dropped): no event at all.
    let bob2 = connect(&i2, "bob").await;
    let bob3 = connect(&i3, "bob").await;
    bob2.close().await;
    drop(bob3);
    expect_no_presence(
        &mut w,
        QUIET,
        "bob's second and third tabs opened and closed while his first stays",
    )
    .await;
    let dave = connect(&i3, "dave").await;
    expect_presence(
        &mut w,
        "dave",
        true,
        RECV_TIMEOUT,
        "sentinel: dave connects",
    )
    .await;

    // bob's last connection closes: offline, but only after the grace.
    // Until then the announced state (what a new watch reports) is online,
    // while the plain presence query already says offline.
    let mut w3 = connect(&i3, "watcher3").await;
    let closed = Instant::now();
    let closed_ms = now_unix_ms();
    bob1.close().await;
    let ack = w3.watch(&["bob"]).await;
    let acked_in_grace = closed.elapsed() < GRACE;
    let instantaneous = w3.is_online("bob").await;
    let queried_in_grace = closed.elapsed() < GRACE;
    if acked_in_grace {
        assert_eq!(
            ack,
            states(&[("bob", true)]),
            "a watch during bob's grace reports the announced state"
        );
    }
    if queried_in_grace {
        assert!(
            !instantaneous,
            "the presence query is the instantaneous truth: bob has no connection"
        );
    }
    expect_offline_after_grace(&mut w, "bob", closed, closed_ms).await;
    assert!(!w.is_online("bob").await, "presence query: bob offline");
    if ack["bob"] {
        expect_presence(
            &mut w3,
            "bob",
            false,
            RECV_TIMEOUT,
            "w3 watched bob during his grace",
        )
        .await;
    }
    w3.close().await;

    // carol reconnects on another instance within the grace, then drops
    // her socket and reconnects on the same one: no event.
    carol.close().await;
    let carol = connect(&i1, "carol").await;
    drop(carol);
    let _carol = connect(&i1, "carol").await;
    expect_no_presence(&mut w, QUIET, "carol reconnected within the grace").await;
    assert!(w.is_online("carol").await, "presence query: carol online");
    drop(dave);
    expect_presence(
        &mut w,
        "dave",
        false,
        GRACE + RECV_TIMEOUT,
        "sentinel: dave's only connection closes",
    )
    .await;

    // After unwatch, bob's transitions are not sent.
    w.unwatch(&["bob"]).await;
    eventually(RECV_TIMEOUT, "i1 watches 2 users after unwatch", || async {
        i1.metric(WATCHED_USERS).await == 2.0
    })
    .await;
    // A second watcher of dave on i1: both are told.
    let mut w2 = connect(&i1, "watcher2").await;
    assert_eq!(w2.watch(&["dave"]).await, states(&[("dave", false)]));
    let _bob = connect(&i2, "bob").await;
    expect_no_presence(&mut w, QUIET, "bob connects after unwatch").await;
    let _dave = connect(&i2, "dave").await;
    for w in [&mut w, &mut w2] {
        expect_presence(w, "dave", true, RECV_TIMEOUT, "sentinel: dave connects").await;
    }
    assert_eq!(
        i1.metric(WATCHED_USERS).await,
        2.0,
        "i1 watches carol and dave (dave by two connections)"
    );

    // --max-watches-per-connection 3.
    let mut lw = connect(&i3, "limited").await;
    assert_eq!(
        lw.watch(&["la", "lb"]).await,
        states(&[("la", false), ("lb", false)])
    );
    assert_eq!(
        lw.watch(&["lb", "lc"]).await,
        states(&[("lb", false), ("lc", false)]),
        "3 watched users in total: within the limit"
    );
    let reply = lw.watch_reply(&["ld", "le"]).await;
    assert_error(&reply, "limit_exceeded", "a 4th and 5th watched user");
    let reply = lw.watch_reply(&["ld"]).await;
    assert_error(&reply, "limit_exceeded", "a 4th watched user");
    assert_eq!(
        lw.watch(&["lb"]).await,
        states(&[("lb", false)]),
        "watching an already watched user at the limit"
    );
    lw.unwatch(&["la"]).await;
    assert_eq!(
        lw.watch(&["ld"]).await,
        states(&[("ld", false)]),
        "a free slot after unwatch"
    );
    // Nothing of a refused frame is watched: le's connect is not sent.
    let _le = connect(&i1, "le").await;
    expect_no_presence(&mut lw, QUIET, "le was in a refused watch frame").await;
    let _lc = connect(&i1, "lc").await;
    expect_presence(&mut lw, "lc", true, RECV_TIMEOUT, "sentinel: lc connects").await;

    // Metrics: w got exactly 5 events (bob on, dave on, bob off, dave off,
    // dave on) and w2 one (dave on), all queued on i1; i2 has no watcher,
    // so nothing was published to it. Across the cluster: online for
    // carol, watcher, bob, watcher3, dave, bob, watcher2, dave, limited, le,
    // lc; offline for bob, watcher3, dave.
    assert_eq!(
        i1.metric(DELIVERED_PRESENCE).await,
        6.0,
        "{DELIVERED_PRESENCE} on i1"
    );
    assert!(
        i1.metric(PRESENCE_RECEIVED).await >= 5.0,
        "{PRESENCE_RECEIVED} on i1 counts at least the 5 transitions it delivered"
    );
    assert_eq!(
        i2.metric(PRESENCE_RECEIVED).await,
        0.0,
        "{PRESENCE_RECEIVED} on i2, which has no watcher"
    );
    let all = [&i1, &i2, &i3];
    let mut last = (0.0, 0.0);
    let counted = tokio::time::timeout(RECV_TIMEOUT, async {
        loop {
            last = (
                metric_sum(&all, ONLINE_TRANSITIONS).await,
                metric_sum(&all, OFFLINE_TRANSITIONS).await,
            );
            if last == (11.0, 3.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        counted.is_ok(),
        "transitions announced across i1..i3 (online, offline): want (11, 3), got {last:?}"
    );

    // Watches end with the connection.
    lw.close().await;
    eventually(RECV_TIMEOUT, "i3 watches nobody once lw closed", || async {
        i3.metric(WATCHED_USERS).await == 0.0
    })
    .await;
    eventually(RECV_TIMEOUT, "no watcher of lb is registered", || async {
        redis.hgetall("sb:watchers:{lb}").await.is_empty()
    })
    .await;
    w2.close().await;
    let _ = w.is_online("dave").await;
    assert_eq!(
        i1.metric(WATCHED_USERS).await,
        2.0,
        "w still watches carol and dave after w2 closed"
    );
}

// ---------------------------------------------------------------------------
// 2. SIGKILL: exactly one offline event per watcher, one reaper
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_announces_users_only_the_dead_instance_held_exactly_once() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let (i1, i2, i3, mut i4) = tokio::join!(
        Instance::spawn(node("i1", &redis)),
        Instance::spawn(node("i2", &redis)),
        Instance::spawn(node("i3", &redis)),
        Instance::spawn(node("i4", &redis)),
    );
    // k1, k2, k3 (two tabs) only on i4; m1 and m2 on i4 and elsewhere;
    // s1 only on i3 (the sentinel).
    let mut held = Vec::new();
    for user in ["k1", "k2", "k3", "k3", "m1", "m2"] {
        held.push(connect(&i4, user).await);
    }
    let _m1 = connect(&i1, "m1").await;
    let _m2 = connect(&i2, "m2").await;
    let s1 = connect(&i3, "s1").await;
    let watched = ["k1", "k2", "k3", "m1", "m2", "s1"];
    let all_online: BTreeMap<String, bool> =
        watched.iter().map(|u| (u.to_string(), true)).collect();
    let mut watchers = Vec::new();
    for instance in [&i1, &i2, &i3, &i4] {
        let mut w = connect(instance, &format!("w-{}", instance.instance_id())).await;
        assert_eq!(w.watch(&watched).await, all_online, "watch ack");
        watchers.push(w);
    }
    let w4 = watchers.pop();
    let survivors = [&i1, &i2, &i3];
    assert_eq!(metric_sum(&survivors, OFFLINE_TRANSITIONS).await, 0.0);

    let killed = Instant::now();
    let killed_ms = now_unix_ms();
    i4.sigkill();
    drop(held);
    let deadline = killed + LEASE + Duration::from_secs(2);
    for w in &mut watchers {
        let mut seen = BTreeSet::new();
        while seen.len() < 3 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = w.next_of(&[PRESENCE_EVENT], left).await else {
                panic!(
                    "[{}] within lease + 2 s of i4's SIGKILL only these went offline: {seen:?} \
                     (want k1, k2, k3)",
                    w.label()
                );
            };
            let (user, online, ts) = presence_event(&frame);
            assert!(
                !online && ["k1", "k2", "k3"].contains(&user.as_str()),
                "[{}] after i4's SIGKILL only k1, k2, k3 go offline; got {frame}",
                w.label()
            );
            assert!(
                seen.insert(user),
                "[{}] a second offline event for the same user: {frame}",
                w.label()
            );
            assert_ts(
                ts,
                killed_ms,
                now_unix_ms(),
                "an offline event after the SIGKILL",
            );
        }
    }
    // The watcher that was on i4 reconnects elsewhere and watches again:
    // the reply is the state.
    drop(w4);
    let mut w4 = connect(&i1, "w-i4").await;
    assert_eq!(
        w4.watch(&watched).await,
        states(&[
            ("k1", false),
            ("k2", false),
            ("k3", false),
            ("m1", true),
            ("m2", true),
            ("s1", true)
        ]),
        "re-watch after the reap"
    );
    expect_no_presence_all(
        &mut watchers,
        QUIET,
        "after the reap (no duplicates; m1, m2 still connected elsewhere)",
    )
    .await;
    // The reapers announced k1, k2, k3 and w-i4 (the watcher on i4 is a
    // user only i4 held too), each once.
    let mut per_instance = Vec::new();
    for instance in survivors {
        per_instance.push(format!(
            "{}: {}",
            instance.instance_id(),
            instance.metric(OFFLINE_TRANSITIONS).await
        ));
    }
    assert_eq!(
        metric_sum(&survivors, OFFLINE_TRANSITIONS).await,
        4.0,
        "k1, k2, k3, w-i4 announced offline exactly once across the 3 survivors ({})",
        per_instance.join(", ")
    );
    assert_eq!(metric_sum(&survivors, REAPED).await, 1.0, "i4 reaped once");
    watchers.push(w4);

    drop(s1);
    for w in &mut watchers {
        expect_presence(
            w,
            "s1",
            false,
            GRACE + RECV_TIMEOUT,
            "sentinel: s1's only connection closes",
        )
        .await;
    }
    let w = &mut watchers[0];
    assert!(w.is_online("m1").await, "m1 still online (i1)");
    assert!(w.is_online("m2").await, "m2 still online (i2)");
    assert!(!w.is_online("k3").await, "k3 offline");
}

/// Two transitions of one user announced by two instances reach a watcher's
/// instance in the opposite order: bob's offline (settled on i2, whose
/// commands to Redis are slowed down, so its publish lags) and his online
/// (he reconnected on i1 right after the settle). The versions must leave
/// the watcher on the truth, online, and never with two identical events
/// in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_out_of_order_leave_the_watcher_on_the_truth() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let proxy = RedisProxy::start(&redis).await;
    let (i1, i2, i3) = tokio::join!(
        Instance::spawn(node("i1", &redis)),
        // A longer lease: the proxy slows i2's heartbeats down too.
        Instance::spawn(node("i2", &redis).redis_url(&proxy.url()).lease_ms(5000)),
        Instance::spawn(node("i3", &redis)),
    );
    let bob = connect(&i2, "bob").await;
    let mut w = connect(&i3, "watcher").await;
    assert_eq!(
        w.watch(&["bob", "s"]).await,
        states(&[("bob", true), ("s", false)])
    );
    bob.close().await;
    eventually(RECV_TIMEOUT, "bob's disconnect reached Redis", || async {
        redis.hgetall("sb:presence:{bob}").await.is_empty()
    })
    .await;
    let delay = Duration::from_millis(400);
    proxy.delay_commands(delay);
    // The settle (a grace after the close) removes the announced state; the
    // moment it is gone, bob connects on i1 (announced online at once),
    // while i2's publish of the offline event waits in the proxy.
    let deadline = Instant::now() + GRACE + delay * 3 + RECV_TIMEOUT;
    while redis.exists("sb:online:{bob}").await {
        assert!(
            Instant::now() < deadline,
            "bob's announced state (sb:online:{{bob}}) was never removed by the settle"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _bob = connect(&i1, "bob").await;
    let events = w.collect_of(&[PRESENCE_EVENT], delay * 3 + QUIET).await;
    proxy.delay_commands(Duration::ZERO);
    let mut told = true;
    for frame in &events {
        let (user, online, _) = presence_event(frame);
        assert_eq!(user, "bob", "{frame}");
        assert_ne!(
            online, told,
            "two identical events in a row for bob: {events:?}"
        );
        told = online;
    }
    assert!(
        told,
        "bob is online (i1), but the watcher was last told offline: {events:?}"
    );
    // Both envelopes did reach i3 (so the offline one was published and
    // dropped there, not lost on the way).
    eventually(
        RECV_TIMEOUT,
        "i3 received bob's two P envelopes",
        || async { i3.metric(PRESENCE_RECEIVED).await == 2.0 },
    )
    .await;
    eprintln!(
        "out of order: the watcher got {events:?}; i3 received 2 envelopes, delivered {}",
        i3.metric(DELIVERED_PRESENCE).await
    );
    let _s = connect(&i1, "s").await;
    expect_presence(&mut w, "s", true, RECV_TIMEOUT, "sentinel: s connects").await;
    assert!(w.is_online("bob").await, "presence query: bob online");
    assert_eq!(
        w.watch(&["bob"]).await,
        states(&[("bob", true)]),
        "re-watch: bob's announced state"
    );
    drop(i2);
}

// ---------------------------------------------------------------------------
// 3. Redis restarted empty
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_redis_restart_announces_only_who_left_during_the_outage() {
    let _exclusive = SERIAL.write().await;
    let mut redis = RedisServer::start().await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(node("i1", &redis)),
        Instance::spawn(node("i2", &redis)),
    );
    let _stay1 = connect(&i1, "stay1").await;
    let mut stay2 = connect(&i2, "stay2").await;
    let mut gone = connect(&i2, "gone").await;
    // mw follows the members of lobby: stay2 and gone are members too.
    let mut mw = connect(&i1, "mw").await;
    mw.join("lobby").await;
    stay2.join("lobby").await;
    gone.join("lobby").await;
    for user in ["mw", "stay2", "gone"] {
        expect_member(
            &mut mw,
            "lobby",
            user,
            true,
            RECV_TIMEOUT,
            "before the outage",
        )
        .await;
    }
    let watched = ["gone", "sentinel", "stay1", "stay2"];
    let mut watchers = vec![connect(&i1, "w1").await, connect(&i2, "w2").await];
    for w in &mut watchers {
        assert_eq!(
            w.watch(&watched).await,
            states(&[
                ("gone", true),
                ("sentinel", false),
                ("stay1", true),
                ("stay2", true)
            ]),
            "watch ack"
        );
    }
    let reconciles = [i1.metric(RECONCILES).await, i2.metric(RECONCILES).await];

    redis.kill();
    eventually(Duration::from_secs(5), "both /readyz 503", || async {
        i1.http_status("/readyz").await == Some(503) && i2.http_status("/readyz").await == Some(503)
    })
    .await;
    gone.close().await;
    // Past the grace: gone's settle cannot reach Redis. Nothing is
    // announced meanwhile.
    expect_no_presence_all(&mut watchers, GRACE * 2, "during the outage").await;
    let response = i1.api_get("/api/v1/rooms/lobby/members", Some(KEY)).await;
    assert_eq!(
        response.status,
        503,
        "GET members while Redis is down: {}",
        response.text()
    );

    let back = redis.restart().await;
    // About one lease after each instance's resync, its watchers are told
    // that gone went offline; nothing about those who stayed.
    let first_by = back + 2 * LEASE + Duration::from_secs(2);
    let observe_until = back + 4 * LEASE;
    let seen = join_all(watchers.iter_mut().map(|w| async move {
        let left = first_by.saturating_duration_since(Instant::now());
        let first = w.next_of(&[PRESENCE_EVENT], left).await;
        let left = observe_until.saturating_duration_since(Instant::now());
        let rest = w.collect_of(&[PRESENCE_EVENT], left).await;
        (w.label().to_string(), first, rest)
    }))
    .await;
    for (label, first, rest) in seen {
        let Some(first) = first else {
            panic!(
                "[{label}] no presence_event within {:?} of Redis's restart (want gone offline)",
                first_by - back
            );
        };
        let (user, online, _) = presence_event(&first);
        assert_eq!(
            (user.as_str(), online),
            ("gone", false),
            "[{label}] the event after Redis came back: {first}"
        );
        assert!(
            rest.is_empty(),
            "[{label}] after gone's offline event, nothing for {:?} after the restart; got {rest:?}",
            observe_until - back
        );
    }
    // The same for lobby's members: gone left, once; stay2 stayed.
    let left = first_by.saturating_duration_since(Instant::now());
    expect_member(
        &mut mw,
        "lobby",
        "gone",
        false,
        left,
        "after Redis came back",
    )
    .await;
    let left = observe_until.saturating_duration_since(Instant::now());
    expect_no_member(&mut mw, left, "after gone's member_left").await;

    let mut sentinel = connect(&i1, "sentinel").await;
    for w in &mut watchers {
        expect_presence(w, "sentinel", true, RECV_TIMEOUT, "sentinel connects on i1").await;
    }
    sentinel.join("lobby").await;
    expect_member(
        &mut mw,
        "lobby",
        "sentinel",
        true,
        RECV_TIMEOUT,
        "sentinel joins",
    )
    .await;
    let reply = mw.members_reply("lobby").await;
    assert_eq!(
        members_of(&reply, "lobby", false, "members after the restart"),
        strings(&["mw", "sentinel", "stay2"])
    );
    assert!(
        i1.metric(RECONCILES).await > reconciles[0],
        "i1 counts a reconcile"
    );
    assert!(
        i2.metric(RECONCILES).await > reconciles[1],
        "i2 counts a reconcile"
    );
    let w = &mut watchers[0];
    assert!(!w.is_online("gone").await, "presence query: gone offline");
    assert!(w.is_online("stay2").await, "presence query: stay2 online");
}

// ---------------------------------------------------------------------------
// 4. Rolling restart: a graceful drain with reconnects within the grace
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_reconnects_within_the_grace_is_silent_and_leavers_go_offline_once() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let (i1, mut i2, i3) = tokio::join!(
        Instance::spawn(node("i1", &redis)),
        Instance::spawn(node("i2", &redis)),
        Instance::spawn(node("i3", &redis)),
    );
    let r1 = connect(&i2, "r1").await;
    let r2 = connect(&i2, "r2").await;
    let q = connect(&i2, "q").await;
    let watched = ["q", "r1", "r2", "s"];
    let mut watchers = vec![connect(&i1, "w1").await, connect(&i3, "w3").await];
    for w in &mut watchers {
        assert_eq!(
            w.watch(&watched).await,
            states(&[("q", true), ("r1", true), ("r2", true), ("s", false)]),
            "watch ack"
        );
    }
    // r1 and r2 reconnect to i3 the moment their connection to i2 ends;
    // q does not come back.
    let reconnect = |client: Client, user: &str| {
        let request = i3.ws_request(&format!("user={user}"));
        tokio::spawn(async move {
            wait_end(client, Duration::from_secs(10)).await;
            Client::connect(request).await
        })
    };
    let (r1, r2) = (reconnect(r1, "r1"), reconnect(r2, "r2"));
    let q = tokio::spawn(wait_end(q, Duration::from_secs(10)));

    let sigterm = Instant::now();
    i2.send_sigterm();
    let _r1 = r1.await.expect("r1 reconnects to i3");
    let _r2 = r2.await.expect("r2 reconnects to i3");
    q.await.expect("q's connection ends");
    for w in &mut watchers {
        expect_presence(
            w,
            "q",
            false,
            GRACE + Duration::from_secs(10),
            "q did not reconnect after i2's drain",
        )
        .await;
    }
    let took = sigterm.elapsed();
    assert!(
        took >= GRACE,
        "q's offline event came {took:?} after the SIGTERM, before the {GRACE:?} grace"
    );
    let status = i2.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "i2 exits cleanly after its drain: {status}"
    );
    // The drain waits for the graces, at most grace + 3 s (PROTOCOL.md).
    let exited = sigterm.elapsed();
    assert!(
        exited <= GRACE + Duration::from_secs(4),
        "i2 took {exited:?} to drain"
    );
    eprintln!("drain: q offline {took:?}, exit {exited:?} after the SIGTERM");
    expect_no_presence_all(
        &mut watchers,
        QUIET,
        "r1 and r2 reconnected to i3 within the grace",
    )
    .await;
    let _s = connect(&i1, "s").await;
    for w in &mut watchers {
        expect_presence(w, "s", true, RECV_TIMEOUT, "sentinel: s connects").await;
    }

    // The restarted i2 (same id): q comes back, announced once.
    i2.respawn_same_port(node("i2", &redis)).await;
    let _q = connect(&i2, "q").await;
    for w in &mut watchers {
        expect_presence(w, "q", true, RECV_TIMEOUT, "q connects to the restarted i2").await;
    }
    expect_no_presence_all(&mut watchers, QUIET, "after q's return").await;
    let w = &mut watchers[0];
    assert!(w.is_online("r1").await, "presence query: r1 online (i3)");
    assert!(w.is_online("r2").await, "presence query: r2 online (i3)");
}

// ---------------------------------------------------------------------------
// 5. Rooms: members, member_joined / member_left, events: false, HTTP
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_members_and_member_events_across_instances() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let (i1, i2) = tokio::join!(
        Instance::spawn(node("i1", &redis)),
        Instance::spawn(node("i2", &redis).flag("--max-members-listed", 2)),
    );
    let room = "lobby";
    let mut alice = connect(&i1, "alice").await;
    let mut bob = connect(&i2, "bob").await;
    let mut obs = connect(&i1, "obs").await;
    let mut bob2 = connect(&i1, "bob").await;
    let mut carol = connect(&i1, "carol").await;

    let before = now_unix_ms();
    alice.join(room).await;
    let ts = expect_member(&mut alice, room, "alice", true, RECV_TIMEOUT, "alice joins").await;
    assert_ts(ts, before, now_unix_ms(), "alice's member_joined");
    bob.join(room).await;
    expect_member(
        &mut alice,
        room,
        "bob",
        true,
        RECV_TIMEOUT,
        "bob joins on i2",
    )
    .await;
    expect_member(&mut bob, room, "bob", true, RECV_TIMEOUT, "bob's own join").await;
    // A member with events off is a member like the others, told nothing.
    obs.join_with_events(room, false).await;
    expect_member(&mut alice, room, "obs", true, RECV_TIMEOUT, "obs joins").await;
    expect_member(&mut bob, room, "obs", true, RECV_TIMEOUT, "obs joins").await;
    // bob's second tab joining is not an event; carol's join is the sentinel.
    bob2.join(room).await;
    carol.join(room).await;
    for (c, what) in [
        (&mut alice, "after bob's second tab"),
        (&mut bob, "after bob's second tab"),
        (&mut bob2, "bob2's first member event"),
        (&mut carol, "carol's own join"),
    ] {
        expect_member(c, room, "carol", true, RECV_TIMEOUT, what).await;
    }

    // members: sorted, user-level, cluster-wide; i2 lists at most 2.
    let full = strings(&["alice", "bob", "carol", "obs"]);
    let reply = alice.members_reply(room).await;
    assert_eq!(members_of(&reply, room, false, "members on i1"), full);
    let reply = bob.members_reply(room).await;
    assert_eq!(
        members_of(&reply, room, true, "members on i2 (--max-members-listed 2)"),
        strings(&["alice", "bob"])
    );
    // --room-auth open (with --auth none): a non-member may ask.
    let mut zed = connect(&i2, "zed").await;
    let reply = zed.members_reply("empty-room").await;
    assert!(members_of(&reply, "empty-room", false, "an empty room").is_empty());
    let mut zed1 = connect(&i1, "zed").await;
    let reply = zed1.members_reply(room).await;
    assert_eq!(
        members_of(&reply, room, false, "a non-member asks on i1"),
        full
    );

    // HTTP.
    let response = i1
        .api_get(&format!("/api/v1/rooms/{room}/members"), Some(KEY))
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json(),
        json!({"room": room, "users": full, "truncated": false}),
        "GET members on i1"
    );
    let response = i2
        .api_get(&format!("/api/v1/rooms/{room}/members"), Some(KEY))
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json(),
        json!({"room": room, "users": ["alice", "bob"], "truncated": true}),
        "GET members on i2 (--max-members-listed 2)"
    );
    let response = i1.api_get("/api/v1/rooms/a%20b/members", Some(KEY)).await;
    assert_eq!(
        response.status,
        400,
        "an invalid room name: {}",
        response.text()
    );
    let response = i1
        .api_get(&format!("/api/v1/rooms/{room}/members"), Some("wrong-key"))
        .await;
    assert_eq!(response.status, 401, "a wrong API key: {}", response.text());

    // bob's second tab leaves: nothing. bob's last connection in the room
    // closes on i2: member_left after the grace.
    bob2.leave(room).await;
    let closed = Instant::now();
    bob.close().await;
    for c in [&mut alice, &mut carol] {
        expect_member(
            c,
            room,
            "bob",
            false,
            GRACE + RECV_TIMEOUT,
            "bob's last connection in the room closed",
        )
        .await;
    }
    let took = closed.elapsed();
    assert!(
        took + Duration::from_millis(TS_SLACK_MS as u64) >= GRACE,
        "member_left came {took:?} after the close, before the {GRACE:?} grace"
    );
    let reply = alice.members_reply(room).await;
    assert_eq!(
        members_of(&reply, room, false, "members after bob left"),
        strings(&["alice", "carol", "obs"])
    );

    // carol leaves on i1 and rejoins on i2 within the grace: nothing.
    carol.leave(room).await;
    let mut carol2 = connect(&i2, "carol").await;
    carol2.join(room).await;
    expect_no_member(&mut alice, QUIET, "carol rejoined within the grace").await;
    let mut dave = connect(&i2, "dave").await;
    dave.join(room).await;
    expect_member(
        &mut alice,
        room,
        "dave",
        true,
        RECV_TIMEOUT,
        "sentinel: dave joins",
    )
    .await;
    expect_member(
        &mut carol2,
        room,
        "dave",
        true,
        RECV_TIMEOUT,
        "carol2's first event",
    )
    .await;
    // obs (events off) got no member event at all; carol's connection
    // that left got none since it left (carol stayed a member).
    for (c, what) in [
        (&mut obs, "obs joined with events: false"),
        (&mut carol, "carol's connection left the room"),
    ] {
        let pong = c.send_sentinel_ping().await;
        let frames = c.frames_until(&pong).await;
        let member_frames: Vec<&Value> = frames
            .iter()
            .filter(|f| MEMBER_EVENTS.iter().any(|t| f["type"] == *t))
            .collect();
        assert!(member_frames.is_empty(), "{what}: {member_frames:?}");
    }

    // alice got alice, bob, obs, carol joined, bob left, dave joined; carol
    // got carol joined and bob left; bob2 got carol joined.
    assert_eq!(
        i1.metric(DELIVERED_MEMBER).await,
        9.0,
        "{DELIVERED_MEMBER} on i1"
    );
    assert_eq!(
        i1.metric(MEMBER_RECEIVED).await,
        6.0,
        "{MEMBER_RECEIVED} on i1: alice, bob, obs, carol joined, bob left, dave joined"
    );
    assert!(
        i2.metric(MEMBER_RECEIVED).await >= 1.0,
        "{MEMBER_RECEIVED} on i2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_shrink_with_one_member_left_when_a_members_instance_is_killed() {
    let _shared = SERIAL.read().await;
    let redis = RedisServer::start().await;
    let (i1, mut i2) = tokio::join!(
        Instance::spawn(node("i1", &redis)),
        Instance::spawn(node("i2", &redis)),
    );
    let room = "lobby";
    let mut alice = connect(&i1, "alice").await;
    alice.join(room).await;
    expect_member(&mut alice, room, "alice", true, RECV_TIMEOUT, "alice joins").await;
    let mut erin = connect(&i2, "erin").await;
    erin.join(room).await;
    expect_member(
        &mut alice,
        room,
        "erin",
        true,
        RECV_TIMEOUT,
        "erin joins on i2",
    )
    .await;
    let reply = alice.members_reply(room).await;
    assert_eq!(
        members_of(&reply, room, false, "before the kill"),
        strings(&["alice", "erin"])
    );

    let killed = Instant::now();
    i2.sigkill();
    drop(erin);
    expect_member(
        &mut alice,
        room,
        "erin",
        false,
        LEASE + Duration::from_secs(2),
        "erin's instance was SIGKILLed",
    )
    .await;
    eprintln!("member_left {:?} after the SIGKILL", killed.elapsed());
    let reply = alice.members_reply(room).await;
    assert_eq!(
        members_of(&reply, room, false, "after the reap"),
        strings(&["alice"])
    );
    expect_no_member(&mut alice, QUIET, "after erin's member_left").await;
    let mut frank = connect(&i1, "frank").await;
    frank.join(room).await;
    expect_member(
        &mut alice,
        room,
        "frank",
        true,
        RECV_TIMEOUT,
        "sentinel: frank joins",
    )
    .await;
    let response = i1
        .api_get(&format!("/api/v1/rooms/{room}/members"), Some(KEY))
        .await;
    assert_eq!(
        response.json(),
        json!({"room": room, "users": ["alice", "frank"], "truncated": false}),
        "GET members after the reap"
    );
}

// ---------------------------------------------------------------------------
// 6. Embedded mode
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_has_the_same_presence_and_member_semantics() {
    let _shared = SERIAL.read().await;
    let solo = Instance::spawn(
        opts!("solo")
            .flag("--presence-grace-ms", GRACE_MS)
            .flag("--max-members-listed", 3)
            .flag("--api-key", KEY),
    )
    .await;
    // The watch reply's keys are sorted (read raw: serde_json here does not
    // keep the order).
    let (mut raw, mut raw_writer) = RawWs::connect(solo.addr(), "user=raw").await.into_split();
    raw_writer
        .send_text(r#"{"type":"watch","users":["zoe","adam","mia"],"id":"sorted-ack"}"#)
        .await
        .expect("send the watch frame");
    let frames = raw
        .read_until("the raw watch reply", RECV_TIMEOUT, |f| {
            f.opcode == RawFrame::TEXT
                && serde_json::from_slice::<Value>(&f.payload)
                    .is_ok_and(|v| v["id"] == "sorted-ack")
        })
        .await;
    let text = String::from_utf8_lossy(&frames[frames.len() - 1].payload).into_owned();
    let at = |user: &str| {
        text.find(&format!(r#""{user}":"#))
            .unwrap_or_else(|| panic!("{user} missing in the watch reply {text}"))
    };
    assert!(
        at("adam") < at("mia") && at("mia") < at("zoe"),
        "the watch reply's keys must be sorted: {text}"
    );
    drop((raw, raw_writer));

    let carol = connect(&solo, "carol").await;
    let mut w = connect(&solo, "watcher").await;
    assert_eq!(
        w.watch(&["bob", "carol", "dave"]).await,
        states(&[("bob", false), ("carol", true), ("dave", false)]),
        "watch ack"
    );
    let before = now_unix_ms();
    let bob1 = connect(&solo, "bob").await;
    let ts = expect_presence(&mut w, "bob", true, RECV_TIMEOUT, "bob connects").await;
    assert_ts(ts, before, now_unix_ms(), "bob's online event");
    let bob2 = connect(&solo, "bob").await;
    drop(bob2);
    expect_no_presence(&mut w, QUIET, "bob's second tab opened and closed").await;
    let dave = connect(&solo, "dave").await;
    expect_presence(
        &mut w,
        "dave",
        true,
        RECV_TIMEOUT,
        "sentinel: dave connects",
    )
    .await;

    let closed = Instant::now();
    let closed_ms = now_unix_ms();
    bob1.close().await;
    expect_offline_after_grace(&mut w, "bob", closed, closed_ms).await;

    carol.close().await;
    let _carol = connect(&solo, "carol").await;
    expect_no_presence(&mut w, QUIET, "carol reconnected within the grace").await;
    drop(dave);
    expect_presence(
        &mut w,
        "dave",
        false,
        GRACE + RECV_TIMEOUT,
        "sentinel: dave closes",
    )
    .await;

    w.unwatch(&["bob"]).await;
    let _bob = connect(&solo, "bob").await;
    expect_no_presence(&mut w, QUIET, "bob connects after unwatch").await;
    let _dave = connect(&solo, "dave").await;
    expect_presence(
        &mut w,
        "dave",
        true,
        RECV_TIMEOUT,
        "sentinel: dave connects",
    )
    .await;
    assert_eq!(
        solo.metric(WATCHED_USERS).await,
        2.0,
        "watched: carol, dave"
    );
    assert_eq!(
        solo.metric(DELIVERED_PRESENCE).await,
        5.0,
        "{DELIVERED_PRESENCE}"
    );
    assert_eq!(
        solo.metric(OFFLINE_TRANSITIONS).await,
        3.0,
        "offline: raw, bob, dave"
    );

    // Rooms.
    let room = "lobby";
    let mut ra = connect(&solo, "ra").await;
    let mut rb = connect(&solo, "rb").await;
    let mut rb2 = connect(&solo, "rb").await;
    let mut rc = connect(&solo, "rc").await;
    let mut obs = connect(&solo, "obs").await;
    ra.join(room).await;
    expect_member(&mut ra, room, "ra", true, RECV_TIMEOUT, "ra's own join").await;
    rb.join(room).await;
    expect_member(&mut ra, room, "rb", true, RECV_TIMEOUT, "rb joins").await;
    expect_member(&mut rb, room, "rb", true, RECV_TIMEOUT, "rb's own join").await;
    rb2.join(room).await;
    obs.join_with_events(room, false).await;
    expect_member(
        &mut ra,
        room,
        "obs",
        true,
        RECV_TIMEOUT,
        "after rb's second tab",
    )
    .await;
    expect_member(
        &mut rb2,
        room,
        "obs",
        true,
        RECV_TIMEOUT,
        "rb2's first event",
    )
    .await;
    rc.join(room).await;
    expect_member(&mut ra, room, "rc", true, RECV_TIMEOUT, "rc joins").await;
    let reply = ra.members_reply(room).await;
    assert_eq!(
        members_of(&reply, room, true, "4 members, --max-members-listed 3"),
        strings(&["obs", "ra", "rb"])
    );
    rc.join("pair").await;
    ra.join("pair").await;
    let reply = ra.members_reply("pair").await;
    assert_eq!(
        members_of(&reply, "pair", false, "2 members"),
        strings(&["ra", "rc"])
    );
    let response = solo.api_get("/api/v1/rooms/pair/members", Some(KEY)).await;
    assert_eq!(
        response.json(),
        json!({"room": "pair", "users": ["ra", "rc"], "truncated": false}),
        "GET members"
    );
    // (ra, rc: their joins of pair.)
    expect_member(&mut ra, "pair", "ra", true, RECV_TIMEOUT, "ra joins pair").await;

    rb2.leave(room).await;
    let closed = Instant::now();
    rb.close().await;
    expect_member(
        &mut ra,
        room,
        "rb",
        false,
        GRACE + RECV_TIMEOUT,
        "rb's last member connection closed",
    )
    .await;
    assert!(
        closed.elapsed() + Duration::from_millis(TS_SLACK_MS as u64) >= GRACE,
        "member_left before the grace"
    );
    rc.leave(room).await;
    let mut rc2 = connect(&solo, "rc").await;
    rc2.join(room).await;
    expect_no_member(&mut ra, QUIET, "rc rejoined within the grace").await;
    let mut rd = connect(&solo, "rd").await;
    rd.join(room).await;
    expect_member(
        &mut ra,
        room,
        "rd",
        true,
        RECV_TIMEOUT,
        "sentinel: rd joins",
    )
    .await;
    let pong = obs.send_sentinel_ping().await;
    let frames = obs.frames_until(&pong).await;
    assert!(
        !frames
            .iter()
            .any(|f| MEMBER_EVENTS.iter().any(|t| f["type"] == *t)),
        "obs joined with events: false: {frames:?}"
    );
}

/// `--dm-policy token`: a connection may watch only the users its token
/// lets it DM; `--room-auth token` (the default with --auth jwt): it may
/// list the members of a room only if it may join it. Otherwise
/// `forbidden`, and nothing of the frame is watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_members_are_authorized_like_dm_and_join() {
    const SECRET: &str = "presence-test-secret-0123456789abcdef";
    let _shared = SERIAL.read().await;
    let solo = Instance::spawn(
        opts!("solo")
            .jwt(SECRET)
            .flag("--dm-policy", "token")
            .flag("--presence-grace-ms", GRACE_MS),
    )
    .await;
    let token = |sub: &str, extra: Value| {
        let mut claims = claims_for(sub, 3600);
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            claims.extend(extra.clone());
        }
        mint_jwt_claims(SECRET, &claims)
    };
    let mut alice = Client::connect_token(
        &solo,
        &token("alice", json!({"dm_to": ["bob"], "rooms": ["lobby"]})),
    )
    .await;
    let reply = alice.watch_reply(&["bob", "carol"]).await;
    assert_error(&reply, "forbidden", "watching carol, whom alice may not DM");
    let reply = alice.watch_reply(&["carol"]).await;
    assert_error(&reply, "forbidden", "watching carol alone");
    // Nothing of the refused frame was watched: bob's connect is not sent.
    let bob = Client::connect_token(&solo, &token("bob", json!({}))).await;
    expect_no_presence(&mut alice, QUIET, "bob was only in a refused frame").await;
    assert_eq!(
        alice.watch(&["bob"]).await,
        states(&[("bob", true)]),
        "alice may watch bob"
    );
    drop(bob);
    expect_presence(
        &mut alice,
        "bob",
        false,
        GRACE + RECV_TIMEOUT,
        "bob, now watched, goes offline",
    )
    .await;

    let reply = alice.members_reply("lobby").await;
    assert_eq!(
        members_of(&reply, "lobby", false, "a room alice may join"),
        Vec::<String>::new()
    );
    let reply = alice.members_reply("secret").await;
    assert_error(&reply, "forbidden", "members of a room alice may not join");
}

// ---------------------------------------------------------------------------
// 7. Randomized reconnect race with watchers (and room members)
// ---------------------------------------------------------------------------

const RACE_USERS: usize = 20;
const RACE_BATCHES: usize = 40;
const RACE_MAX_PER_USER: usize = 4;
const RACE_SENTINEL: &str = "zz-sentinel";
/// Every race connection joins it (events off); the first watchers join
/// it with events on and track its members.
const RACE_ROOM: &str = "race";

fn race_user(user: usize) -> String {
    format!("u{user:02}")
}

struct RaceConn {
    user: usize,
    client: Client,
}

/// Connects `user` and joins the race room with member events off.
async fn race_connect(request: Request, user: usize) -> RaceConn {
    let mut client = Client::connect(request).await;
    client.join_with_events(RACE_ROOM, false).await;
    RaceConn { user, client }
}

/// A watcher whose frames a task reads as they come, in arrival order:
/// the watch ack (a presence frame), presence_event, member events,
/// members replies and error frames.
struct Recorder {
    label: String,
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<Client>,
}

impl Recorder {
    /// Sends `watch` for `users` and starts recording (the ack included);
    /// `members`, when given, is the room's members reply that the member
    /// events start from.
    async fn start(mut client: Client, users: &[String], members: Option<Value>) -> Recorder {
        client
            .send_json(&json!({"type": "watch", "users": users, "id": "race-watch"}))
            .await;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(members.into_iter().collect::<Vec<_>>()));
        let label = client.label().to_string();
        let task = {
            let (stop, frames) = (stop.clone(), frames.clone());
            tokio::spawn(async move {
                let kept = [
                    PRESENCE_EVENT,
                    "presence",
                    MEMBER_JOINED,
                    MEMBER_LEFT,
                    "members",
                    "error",
                ];
                while !stop.load(Ordering::Relaxed) {
                    match client.next_event(Duration::from_millis(50)).await {
                        Incoming::Json(frame) => {
                            if kept.iter().any(|t| frame["type"] == *t) {
                                frames.lock().expect("frames").push(frame);
                            }
                        }
                        Incoming::Timeout => {}
                        other => panic!("[{}] watcher connection: {other:?}", client.label()),
                    }
                }
                client
            })
        };
        Recorder {
            label,
            stop,
            frames,
            task,
        }
    }

    /// Whether it has recorded `user` going online.
    fn saw_online(&self, user: &str) -> bool {
        self.frames
            .lock()
            .expect("frames")
            .iter()
            .any(|f| f["type"] == PRESENCE_EVENT && f["user"] == user && f["online"] == true)
    }

    /// Stops recording; returns the connection and what it recorded.
    async fn finish(self) -> (String, Client, Vec<Value>) {
        self.stop.store(true, Ordering::Relaxed);
        let client = self.task.await.expect("watcher task");
        let frames = std::mem::take(&mut *self.frames.lock().expect("frames"));
        (self.label, client, frames)
    }
}

/// What one watcher was told, replayed in arrival order: the last state per
/// user (presence and, when it tracks the room, membership), and every
/// event that repeated the state before it.
#[derive(Default)]
struct Told {
    online: HashMap<String, (bool, &'static str)>,
    member: HashMap<String, (bool, &'static str)>,
    acked: bool,
    members_baseline: bool,
    events: usize,
}

impl Told {
    fn replay(label: &str, frames: &[Value], tracked: &[String], wrong: &mut Vec<String>) -> Told {
        let mut told = Told::default();
        for frame in frames {
            match frame["type"].as_str() {
                Some("presence") => {
                    told.acked = true;
                    for (user, online) in online_map(frame) {
                        told.online.insert(user, (online, "the watch ack"));
                    }
                }
                Some(PRESENCE_EVENT) => {
                    told.events += 1;
                    let (user, online, _) = presence_event(frame);
                    if let Some((previous, from)) = told.online.get(&user) {
                        if *previous == online {
                            wrong.push(format!("[{label}] {frame} repeats {from}"));
                        }
                    }
                    told.online
                        .insert(user, (online, "the previous presence_event"));
                }
                Some("members") => {
                    told.members_baseline = true;
                    for user in tracked {
                        told.member
                            .insert(user.clone(), (false, "the members reply"));
                    }
                    let users = members_of(frame, RACE_ROOM, false, "the baseline");
                    for user in users {
                        told.member.insert(user, (true, "the members reply"));
                    }
                }
                Some(MEMBER_JOINED | MEMBER_LEFT) => {
                    told.events += 1;
                    let (room, user, joined, _) = member_event(frame);
                    if room != RACE_ROOM {
                        wrong.push(format!("[{label}] a member event of another room: {frame}"));
                    }
                    if let Some((previous, from)) = told.member.get(&user) {
                        if *previous == joined {
                            wrong.push(format!("[{label}] {frame} repeats {from}"));
                        }
                    }
                    told.member
                        .insert(user, (joined, "the previous member event"));
                }
                _ => wrong.push(format!("[{label}] unexpected frame {frame}")),
            }
        }
        told
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_reconnect_races_leave_every_watcher_with_the_truth() {
    let _exclusive = SERIAL.write().await;
    let seed: u64 = match std::env::var("SB_PRESENCE_SEED") {
        Ok(s) => s.parse().expect("SB_PRESENCE_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("presence race: seed {seed} (rerun with SB_PRESENCE_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start().await;
    let (a, b, c) = tokio::join!(
        Instance::spawn(node("i1", &redis)),
        Instance::spawn(node("i2", &redis)),
        Instance::spawn(node("i3", &redis)),
    );
    let instances = [a, b, c];
    let mut watched: Vec<String> = (0..RACE_USERS).map(race_user).collect();
    watched.push(RACE_SENTINEL.to_string());
    let watcher_names: Vec<String> = (0..3).map(|i| format!("watcher{i}")).collect();
    let mut tracked_members = watched.clone();
    tracked_members.extend(watcher_names.iter().cloned());

    // One watcher per instance, each a member of the race room (events on);
    // once all three have joined, each one's members reply is the baseline
    // its member events start from.
    let mut first_watchers = Vec::new();
    for (instance, name) in instances.iter().zip(&watcher_names) {
        let mut client = connect(instance, name).await;
        client.join(RACE_ROOM).await;
        first_watchers.push(client);
    }
    let mut recorders = Vec::new();
    for mut client in first_watchers {
        let last = &watcher_names[2];
        loop {
            let frame = client
                .next_of(MEMBER_EVENTS, RECV_TIMEOUT)
                .await
                .unwrap_or_else(|| panic!("{} never saw {last} join", client.label()));
            if frame["user"] == last.as_str() {
                break;
            }
        }
        let members = client.members_reply(RACE_ROOM).await;
        recorders.push(Recorder::start(client, &watched, Some(members)).await);
    }
    let late_at = rng.random_range(RACE_BATCHES / 4..RACE_BATCHES * 3 / 4);

    let mut open: Vec<RaceConn> = Vec::new();
    let mut steps = 0usize;
    for batch in 0..RACE_BATCHES {
        if batch == late_at {
            // A watcher that starts watching while everything churns.
            let inst = rng.random_range(0..3);
            let client = connect(&instances[inst], "late-watcher").await;
            recorders.push(Recorder::start(client, &watched, None).await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..rng.random_range(1..=4) {
            steps += 1;
            let roll = rng.random_range(0..10);
            if open.is_empty() || roll < 4 {
                // Connect.
                let user = rng.random_range(0..RACE_USERS);
                if open.iter().filter(|c| c.user == user).count() >= RACE_MAX_PER_USER {
                    continue;
                }
                let request = instances[rng.random_range(0..3)]
                    .ws_request(&format!("user={}", race_user(user)));
                let pause = Duration::from_millis(rng.random_range(0..40));
                tasks.spawn(async move {
                    tokio::time::sleep(pause).await;
                    vec![race_connect(request, user).await]
                });
            } else if roll < 7 {
                // Close one connection (cleanly or by dropping the socket).
                let conn = open.swap_remove(rng.random_range(0..open.len()));
                let graceful = rng.random_bool(0.5);
                tasks.spawn(async move {
                    if graceful {
                        conn.client.close().await;
                    } else {
                        drop(conn);
                    }
                    Vec::new()
                });
            } else if roll < 9 {
                // Reconnect elsewhere (or on the same instance) after a
                // pause around the grace: sometimes within it, sometimes not.
                let conn = open.swap_remove(rng.random_range(0..open.len()));
                let user = conn.user;
                let request = instances[rng.random_range(0..3)]
                    .ws_request(&format!("user={}", race_user(user)));
                let gap = Duration::from_millis(match rng.random_range(0..3) {
                    0 => rng.random_range(0..50),
                    1 => rng.random_range(GRACE_MS - 150..GRACE_MS + 150),
                    _ => rng.random_range(50..GRACE_MS - 150),
                });
                let graceful = rng.random_bool(0.5);
                tasks.spawn(async move {
                    if graceful {
                        conn.client.close().await;
                    } else {
                        drop(conn);
                    }
                    tokio::time::sleep(gap).await;
                    vec![race_connect(request, user).await]
                });
            } else {
                // A brief connection: opened, joined, closed soon after.
                let user = rng.random_range(0..RACE_USERS);
                let request = instances[rng.random_range(0..3)]
                    .ws_request(&format!("user={}", race_user(user)));
                let life = Duration::from_millis(rng.random_range(0..200));
                tasks.spawn(async move {
                    let conn = race_connect(request, user).await;
                    tokio::time::sleep(life).await;
                    drop(conn);
                    Vec::new()
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(conns) => open.extend(conns),
                Err(e) => panic!("seed {seed}: a step failed: {e}"),
            }
        }
        let pause = Duration::from_millis(match rng.random_range(0..20) {
            0..=7 => rng.random_range(0..60),
            8..=14 => rng.random_range(GRACE_MS - 150..GRACE_MS + 150),
            _ => rng.random_range(60..300),
        });
        tokio::time::sleep(pause).await;
    }

    // Settle: no activity for the grace and a margin, then a sentinel
    // transition seen by every watcher.
    tokio::time::sleep(GRACE + Duration::from_millis(1000)).await;
    let _sentinel = connect(&instances[0], RACE_SENTINEL).await;
    eventually(
        RECV_TIMEOUT,
        &format!("seed {seed}: every watcher sees the sentinel's online event"),
        || {
            let all = recorders.iter().all(|r| r.saw_online(RACE_SENTINEL));
            async move { all }
        },
    )
    .await;

    let mut truth: BTreeMap<String, bool> = watched.iter().map(|u| (u.clone(), false)).collect();
    for conn in &open {
        truth.insert(race_user(conn.user), true);
    }
    truth.insert(RACE_SENTINEL.to_string(), true);
    // Room members: users with an open race connection, and the first
    // three watchers (the sentinel and the late watcher did not join).
    let mut member_truth: BTreeMap<String, bool> = truth.clone();
    member_truth.insert(RACE_SENTINEL.to_string(), false);
    for name in &watcher_names {
        member_truth.insert(name.clone(), true);
    }
    let members_now: Vec<String> = member_truth
        .iter()
        .filter(|(_, m)| **m)
        .map(|(u, _)| u.clone())
        .collect();

    let mut wrong = Vec::new();
    let mut events = 0usize;
    for recorder in recorders {
        let (label, mut client, frames) = recorder.finish().await;
        let told = Told::replay(&label, &frames, &tracked_members, &mut wrong);
        events += told.events;
        if !told.acked {
            wrong.push(format!("[{label}] never got its watch ack"));
        }
        for (user, want) in &truth {
            let got = told.online.get(user).map(|(online, _)| *online);
            if got != Some(*want) {
                wrong.push(format!(
                    "[{label}] last told {user} online={got:?}, truth online={want}"
                ));
            }
        }
        if told.members_baseline {
            for (user, want) in &member_truth {
                let got = told.member.get(user).map(|(member, _)| *member);
                if got != Some(*want) {
                    wrong.push(format!(
                        "[{label}] last told {user} member={got:?}, truth member={want}"
                    ));
                }
            }
        } else if !told.member.is_empty() {
            wrong.push(format!(
                "[{label}] not a member of {RACE_ROOM}, yet told {:?}",
                told.member.keys().collect::<Vec<_>>()
            ));
        }
        // The presence query and the members query agree with the truth.
        let users: Vec<&str> = watched.iter().map(String::as_str).collect();
        let reply = client
            .request(json!({"type": "presence", "users": users}))
            .await;
        let queried = online_map(&reply);
        if queried != truth {
            wrong.push(format!(
                "[{label}] presence query {queried:?} != truth {truth:?}"
            ));
        }
        let reply = client.members_reply(RACE_ROOM).await;
        let listed = members_of(&reply, RACE_ROOM, false, "members at the end");
        if listed != members_now {
            wrong.push(format!(
                "[{label}] members query {listed:?} != truth {members_now:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "seed {seed} (SB_PRESENCE_SEED={seed}), {steps} steps, {events} events:\n  {}",
        wrong.join("\n  ")
    );
    eprintln!(
        "seed {seed}: {steps} steps, {} connections open at the end, {events} events",
        open.len()
    );
}
