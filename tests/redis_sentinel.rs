//! Switchboard over a Sentinel-managed Redis: a master, two replicas and
//! three sentinels ([`ReplicatedRedis`]), real instance processes started
//! with `--redis-url redis+sentinel://…/sbmaster`, real WebSocket clients.
//!
//! - Failover, twice (the master, then the replica promoted in its place),
//!   SIGKILLed while stored DMs flow from one instance to the other; the
//!   sentinels promote a replica and each instance follows them to it. No
//!   client reconnects, `/readyz` goes 503 and back to 200, a DM sent after
//!   the kill is delivered within 3 s of the sentinels naming the promoted
//!   replica, the stored DMs acked before the kill all arrive (but those
//!   the dead master had not yet replicated), a presence the promoted
//!   replica lacked is re-asserted, and presence is right afterwards.
//! - Start-up: a malformed `redis+sentinel://` URL is refused, saying
//!   what the URL should look like; so are sentinels that do not answer
//!   or do not know the master's name.
//!
//! The traffic loop and the `/readyz` poller are those of
//! `tests/redis_cluster.rs`, cut to what these failovers need.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_testkit::http::try_http_request;
use switchboard_testkit::{
    eventually, free_port, opts, Client, Incoming, Instance, ReplicatedRedis, RECV_TIMEOUT,
};
use tokio::task::JoinHandle;

/// The sentinels' `down-after-milliseconds`: the master is subjectively
/// down this long after its last answer to a sentinel's PING.
const DOWN_AFTER_MS: u64 = 1000;
/// What the instances may take, once every sentinel names the promoted
/// replica, to have routed a DM through it again: the bound on a DM sent
/// after the kill is the sentinels' failover as measured (down-after
/// included) + this. Measured 0.1–1.4 s (an instance retries its master
/// with backoff capped at 1 s).
const INSTANCE_RECOVERY: Duration = Duration::from_secs(3);

/// Stored DMs delivered before the master is killed: those must all
/// arrive (but any the dead master had not yet replicated).
const PRE_KILL_DMS: usize = 40;

/// The key of a user's presence hash (`sb:presence:{user}`).
fn presence_key(user: &str) -> String {
    format!("sb:presence:{{{user}}}")
}

/// `ack:<status>` or `error:<code>` for a reply frame.
fn outcome(reply: &Value) -> String {
    match reply["type"].as_str() {
        Some("ack") => format!("ack:{}", reply["status"].as_str().unwrap_or("?")),
        Some("error") => format!("error:{}", reply["code"].as_str().unwrap_or("?")),
        _ => format!("unexpected:{reply}"),
    }
}

/// Waits until every instance answers `/readyz` with 200.
async fn all_ready(instances: &[Instance]) {
    for instance in instances {
        eventually(
            Duration::from_secs(10),
            &format!("/readyz of {} is 200", instance.instance_id()),
            || async { instance.http_status("/readyz").await == Some(200) },
        )
        .await;
    }
}

// ---------------------------------------------------------------------------
// Traffic under a fault: a sender loop, a receiver loop, a /readyz poller
// ---------------------------------------------------------------------------

/// One DM the sender loop sent, and what came back.
#[derive(Clone, Debug)]
struct Sent {
    n: u64,
    sent_at: Instant,
    /// `ack:routed`, `error:unavailable`, ...
    outcome: String,
    /// Acked with `stored: true`.
    stored: bool,
}

/// What the receiver loop saw.
#[derive(Default, Debug)]
struct Received {
    /// (n, when) of every DM of the loop, in arrival order.
    dms: Vec<(u64, Instant)>,
    /// Any other frame (e.g. `gap`).
    other: Vec<Value>,
    /// How the connection ended, if it did (it must not).
    ended: Option<String>,
}

/// Stored DMs from `sender` to `to` (each awaiting its reply, 20 ms apart),
/// received by `recipient`; runs until [`Traffic::stop`].
struct Traffic {
    started: Instant,
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Sent>>>,
    received: Arc<Mutex<Received>>,
    sender: JoinHandle<Client>,
    receiver: JoinHandle<Client>,
}

impl Traffic {
    fn start(mut sender: Client, mut recipient: Client, to: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
        let received: Arc<Mutex<Received>> = Arc::default();
        let to = to.to_string();
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let sent_at = Instant::now();
                    let reply = sender
                        .request(json!({"type": "dm", "to": to, "body": {"n": n}}))
                        .await;
                    sent.lock().unwrap().push(Sent {
                        n,
                        sent_at,
                        outcome: outcome(&reply),
                        stored: reply["stored"] == true,
                    });
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                sender
            })
        };
        let receiver = {
            let (stop, received) = (stop.clone(), received.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match recipient.next_event(Duration::from_millis(200)).await {
                        Incoming::Json(frame) => {
                            let mut seen = received.lock().unwrap();
                            match frame["body"]["n"].as_u64() {
                                Some(n) if frame["type"] == "dm" => {
                                    seen.dms.push((n, Instant::now()))
                                }
                                _ => seen.other.push(frame),
                            }
                        }
                        Incoming::Timeout => {}
                        ended => {
                            received.lock().unwrap().ended = Some(format!("{ended:?}"));
                            break;
                        }
                    }
                }
                recipient
            })
        };
        Traffic {
            started: Instant::now(),
            stop,
            sent,
            received,
            sender,
            receiver,
        }
    }

    /// When the first DM sent after `t` was delivered.
    fn first_delivery_sent_after(&self, t: Instant) -> Option<Instant> {
        let after: HashSet<u64> = self
            .sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.sent_at > t)
            .map(|s| s.n)
            .collect();
        self.received
            .lock()
            .unwrap()
            .dms
            .iter()
            .filter(|(n, _)| after.contains(n))
            .map(|(_, at)| *at)
            .min()
    }

    /// Waits until `count` DMs were delivered.
    async fn await_deliveries(&self, count: usize, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let delivered = self.received.lock().unwrap().dms.len();
            if delivered >= count {
                return;
            }
            self.assert_connected(what);
            assert!(
                Instant::now() < deadline,
                "{what}: {delivered} of {count} DMs delivered within {timeout:?}; outcomes: {:?}",
                self.outcome_runs(self.started)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a DM sent after `t` is delivered; returns when it was.
    async fn await_delivery_sent_after(
        &self,
        t: Instant,
        timeout: Duration,
        what: &str,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.first_delivery_sent_after(t) {
                return at;
            }
            self.assert_connected(what);
            assert!(
                Instant::now() < deadline,
                "{what}: no DM sent after the fault was delivered within {timeout:?}; \
                 outcomes: {:?}",
                self.outcome_runs(t)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every DM acked with `stored: true` was delivered, except
    /// those in `excused`; panics with the missing ones after `timeout`.
    async fn await_stored_delivered(&self, excused: &HashSet<u64>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.missing_stored(excused);
            if missing.is_empty() {
                return;
            }
            self.assert_connected("waiting for the stored DMs");
            assert!(
                Instant::now() < deadline,
                "DMs acked as stored never delivered within {timeout:?}: {missing:?}; \
                 other frames: {:?}; outcomes (ms since the traffic began): {:?}",
                self.received.lock().unwrap().other,
                self.outcome_runs(self.started)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// DMs acked as stored that have not arrived, except `excused`.
    fn missing_stored(&self, excused: &HashSet<u64>) -> Vec<u64> {
        let got: HashSet<u64> = self
            .received
            .lock()
            .unwrap()
            .dms
            .iter()
            .map(|(n, _)| *n)
            .collect();
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.stored && !got.contains(&s.n) && !excused.contains(&s.n))
            .map(|s| s.n)
            .collect()
    }

    /// Stored-acked DMs sent in `[from, to)`.
    fn stored_between(&self, from: Instant, to: Instant) -> HashSet<u64> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.stored && s.sent_at >= from && s.sent_at < to)
            .map(|s| s.n)
            .collect()
    }

    /// The outcomes of the sends from `t0` on as runs, `first..=last
    /// outcome (+ms since t0)`.
    fn outcome_runs(&self, t0: Instant) -> Vec<String> {
        let sent = self.sent.lock().unwrap();
        let mut runs: Vec<(u64, u64, String, Instant)> = Vec::new();
        for s in sent.iter().filter(|s| s.sent_at >= t0) {
            match runs.last_mut() {
                Some(run) if run.2 == s.outcome => run.1 = s.n,
                _ => runs.push((s.n, s.n, s.outcome.clone(), s.sent_at)),
            }
        }
        runs.iter()
            .map(|(first, last, outcome, at)| {
                let ms = (*at - t0).as_millis();
                format!("{first}..={last} {outcome} (+{ms}ms)")
            })
            .collect()
    }

    #[track_caller]
    fn assert_connected(&self, when: &str) {
        let ended = self.received.lock().unwrap().ended.clone();
        if let Some(ended) = ended {
            panic!("{when}: the recipient's connection ended ({ended}); no client may reconnect");
        }
    }

    /// Stops both loops; asserts that the recipient's connection never
    /// ended, no DM arrived twice and the DMs arrived in send order.
    async fn stop(self) -> (Client, Client, Vec<Sent>, Received) {
        self.stop.store(true, Ordering::Relaxed);
        let sender = self.sender.await.expect("sender loop");
        let recipient = self.receiver.await.expect("receiver loop");
        let sent = self.sent.lock().unwrap().clone();
        let received = std::mem::take(&mut *self.received.lock().unwrap());
        if let Some(ended) = &received.ended {
            panic!("the recipient's connection ended ({ended}); no client may reconnect");
        }
        let mut seen = HashSet::new();
        let duplicates: Vec<u64> = received
            .dms
            .iter()
            .filter(|(n, _)| !seen.insert(*n))
            .map(|(n, _)| *n)
            .collect();
        assert!(duplicates.is_empty(), "DMs delivered twice: {duplicates:?}");
        let out_of_order: Vec<(u64, u64)> = received
            .dms
            .windows(2)
            .filter(|w| w[1].0 < w[0].0)
            .map(|w| (w[0].0, w[1].0))
            .collect();
        assert!(
            out_of_order.is_empty(),
            "stored DMs arrive in send (inbox) order; out of order: {out_of_order:?}"
        );
        (sender, recipient, sent, received)
    }
}

/// When instance `.1` (by index) started answering `/readyz` with `.2`
/// (None: no answer).
type ReadyzChange = (Instant, usize, Option<u16>);

/// Polls `/readyz` of each address every 25 ms and records each change.
struct ReadyzWatch {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<ReadyzChange>>>,
    task: JoinHandle<()>,
}

impl ReadyzWatch {
    fn start(addrs: Vec<SocketAddr>) -> ReadyzWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let changes: Arc<Mutex<Vec<ReadyzChange>>> = Arc::default();
        let task = {
            let (stop, changes) = (stop.clone(), changes.clone());
            tokio::spawn(async move {
                let mut last: Vec<Option<Option<u16>>> = vec![None; addrs.len()];
                while !stop.load(Ordering::Relaxed) {
                    for (i, addr) in addrs.iter().enumerate() {
                        let status = try_http_request(*addr, "GET", "/readyz", &[], b"")
                            .await
                            .ok()
                            .map(|r| r.status);
                        if last[i] != Some(status) {
                            last[i] = Some(status);
                            changes.lock().unwrap().push((Instant::now(), i, status));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        };
        ReadyzWatch {
            stop,
            changes,
            task,
        }
    }

    /// When instance `i` first answered `status` after `t`.
    fn saw_after(&self, i: usize, status: u16, t: Instant) -> Option<Instant> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .find(|(at, who, s)| *at >= t && *who == i && *s == Some(status))
            .map(|(at, _, _)| *at)
    }

    /// The current status of instance `i` as last polled.
    fn current(&self, i: usize) -> Option<Option<u16>> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, who, _)| *who == i)
            .map(|(_, _, s)| *s)
    }

    /// Every change after `t`, as `i<index>:<status> +ms`.
    fn changes_after(&self, t: Instant) -> Vec<String> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _, _)| *at >= t)
            .map(|(at, i, s)| format!("i{}:{s:?} +{}ms", i + 1, (*at - t).as_millis()))
            .collect()
    }

    /// Waits until every instance's latest status is 200.
    async fn await_all_ready(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if (0..n).all(|i| self.current(i) == Some(Some(200))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz not back to 200 everywhere within {timeout:?}: {:?}",
                (0..n).map(|i| self.current(i)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("readyz poller");
    }
}

// ---------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------

/// Makes every replica of the current master forget `user`'s presence, as
/// if the master's last writes had not reached them (a replica's own
/// writes are not replicated): the replica promoted next lacks it unless
/// the user's instance re-asserts it.
async fn replicas_forget_presence(set: &ReplicatedRedis, user: &str) {
    let master = set.master_port().await;
    for replica in set.live_node_ports().into_iter().filter(|&p| p != master) {
        let _: () = set
            .cmd(replica, &["CONFIG", "SET", "replica-read-only", "no"])
            .await;
        let _: i64 = set.cmd(replica, &["DEL", &presence_key(user)]).await;
    }
}

/// `HGETALL sb:presence:{user}` on the node on `port`.
async fn presence_on(set: &ReplicatedRedis, port: u16, user: &str) -> HashMap<String, String> {
    set.cmd(port, &["HGETALL", &presence_key(user)]).await
}

/// What one failover measured.
struct Round {
    /// From the kill until every sentinel named the promoted replica.
    failover: Duration,
    /// From the kill until the first DM sent after it was delivered.
    delivered: Duration,
    /// (instance index, after the kill) of the first 503 of each instance
    /// that said 503.
    saw_503: Vec<(usize, Duration)>,
}

/// Two failovers in a row (the master, then the replica promoted in its
/// place), stored DMs flowing from alice on i1 to bob on i2 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failovers_under_dm_traffic_without_client_reconnects() {
    let started = Instant::now();
    let mut set = ReplicatedRedis::start(2, 3, DOWN_AFTER_MS).await;
    let formed = started.elapsed();
    // The default lease (10 s): every connection of an instance goes to the
    // one master, so its death shows at once (no heartbeat needs to fall in
    // the outage), and the promoted replica's copy of each lease outlives
    // the outage by seconds.
    let spawns = ["i1", "i2"].map(|id| Instance::spawn(opts!(id).redis_url(&set.sentinel_url())));
    let inst = futures_util::future::join_all(spawns).await;
    eprintln!(
        "master + 2 replicas + 3 sentinels formed in {formed:?}; 2 instances healthy after {:?}",
        started.elapsed()
    );
    let alice = Client::connect_user(&inst[0], "alice").await;
    let bob = Client::connect_user(&inst[1], "bob").await;
    // Idle on i2 throughout: her presence is what the replicas will lack.
    let mut carol = Client::connect_user(&inst[1], "carol").await;
    let conns = (alice.conn_id(), bob.conn_id(), carol.conn_id());
    all_ready(&inst).await;
    let readyz = ReadyzWatch::start(inst.iter().map(Instance::addr).collect());
    let traffic = Traffic::start(alice, bob, "bob");
    traffic
        .await_deliveries(PRE_KILL_DMS, RECV_TIMEOUT, "DMs flow before the kill")
        .await;

    let mut rounds = Vec::new();
    let mut last_moments = HashSet::new();
    let mut promoted = 0;
    for round in 1..=2 {
        if round > 1 {
            // The last failover finished, the last replica follows the
            // promoted one: the second fault meets the set as the first did.
            set.wait_settled(Duration::from_secs(15)).await;
            let before = traffic.received.lock().unwrap().dms.len();
            traffic
                .await_deliveries(before + 10, RECV_TIMEOUT, "DMs flow again")
                .await;
        }
        replicas_forget_presence(&set, "carol").await;
        // Taken before the SIGKILL: an instance may say 503 before
        // kill_master returns.
        let kill = Instant::now();
        let killed = set.kill_master().await;
        promoted = set.wait_failover(killed, Duration::from_secs(20)).await;
        let failover = kill.elapsed();
        let carol_at_promotion = presence_on(&set, promoted, "carol").await;
        let bound = failover + INSTANCE_RECOVERY;
        let delivered = traffic
            .await_delivery_sent_after(kill, bound + RECV_TIMEOUT, "after killing the master")
            .await
            - kill;
        readyz
            .await_all_ready(inst.len(), Duration::from_secs(15))
            .await;
        let ready = kill.elapsed();
        let saw_503 = (0..inst.len())
            .filter_map(|i| readyz.saw_after(i, 503, kill).map(|at| (i, at - kill)))
            .collect::<Vec<_>>();
        // Asynchronous replication: a DM the dead master stored (and acked)
        // in its last moments may never have reached the promoted replica;
        // if pub/sub did not deliver it either, it is gone. Only those are
        // excused.
        last_moments.extend(traffic.stored_between(kill - Duration::from_secs(1), kill));
        traffic
            .await_stored_delivered(&last_moments, Duration::from_secs(10))
            .await;
        let lost: Vec<u64> = traffic
            .missing_stored(&HashSet::new())
            .into_iter()
            .filter(|n| last_moments.contains(n))
            .collect();
        eprintln!(
            "failover {round}: master {killed} killed, {promoted} promoted after {failover:?} \
             (down-after {:?}); first DM sent after the kill delivered {delivered:?} after it \
             (bound {bound:?}); /readyz 503 first seen (instance index, after the kill): \
             {saw_503:?}; all ready after {ready:?}; stored DMs lost to asynchronous \
             replication: {lost:?}; carol's presence on the promoted replica when the \
             sentinels named it: {carol_at_promotion:?}",
            set.down_after()
        );
        eprintln!(
            "failover {round}: /readyz changes since the kill: {:?}",
            readyz.changes_after(kill)
        );
        eprintln!(
            "failover {round}: send outcomes (ms since the kill): {:?}",
            traffic.outcome_runs(kill)
        );
        // Carol's presence, lost with the dead master, is re-asserted by i2.
        let set = &set;
        eventually(
            RECV_TIMEOUT,
            "carol's presence {i2} is back on the promoted master",
            || async move {
                presence_on(set, promoted, "carol")
                    .await
                    .keys()
                    .eq(["i2"].iter())
            },
        )
        .await;
        rounds.push(Round {
            failover,
            delivered,
            saw_503,
        });
    }

    let (mut alice, mut bob, _, received) = traffic.stop().await;
    readyz.stop().await;
    eprintln!(
        "{} DMs received; other frames: {:?}",
        received.dms.len(),
        received.other
    );
    assert_eq!(
        (alice.conn_id(), bob.conn_id(), carol.conn_id()),
        conns,
        "no client reconnected"
    );
    for (i, round) in rounds.iter().enumerate() {
        assert!(
            round.delivered <= round.failover + INSTANCE_RECOVERY,
            "failover {}: a DM sent after the kill took {:?} to arrive; the sentinels named \
             the promoted replica after {:?}, and the instances may take {INSTANCE_RECOVERY:?} \
             more",
            i + 1,
            round.delivered,
            round.failover
        );
        assert_eq!(
            round.saw_503.len(),
            2,
            "failover {}: /readyz said 503 while the master was down on every instance, not \
             only (index, after the kill) {:?}",
            i + 1,
            round.saw_503
        );
    }

    // Presence is right on the last master: bob is on i2, a DM to him is
    // routed there, and alice sees him online; so is carol.
    let presence = presence_on(&set, promoted, "bob").await;
    assert!(
        presence.keys().eq(["i2"].iter()),
        "bob's presence on the last master: {presence:?}"
    );
    let ack = alice
        .request(json!({"type": "dm", "to": "bob", "body": {"after": "failover"}}))
        .await;
    assert_eq!(outcome(&ack), "ack:routed", "{ack}");
    assert_eq!(ack["stored"], true, "{ack}");
    let dm = bob.recv_type("dm").await;
    assert_eq!(dm["body"], json!({"after": "failover"}), "{dm}");
    assert!(alice.is_online("bob").await, "alice sees bob online");
    let ack = alice
        .request(json!({"type": "dm", "to": "carol", "body": "re-asserted"}))
        .await;
    assert_eq!(outcome(&ack), "ack:routed", "{ack}");
    assert_eq!(carol.recv_type("dm").await["body"], "re-asserted");
}

// ---------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------

/// A URL that does not name sentinels and a master is a configuration
/// error (exit status 2), and the message shows the URL and the form it
/// should have.
#[tokio::test]
async fn a_malformed_sentinel_url_is_refused_at_start_up() {
    for url in [
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel://127.0.0.1/sbmaster",
        "redis+sentinel:///sbmaster",
        "redis+sentinel://127.0.0.1:notaport/sbmaster",
        "redis+sentinel://127.0.0.1:26379,,127.0.0.1:26380/sbmaster",
        "redis+sentinel://127.0.0.1:26379/sbmaster/extra",
    ] {
        let (status, log) =
            Instance::run_until_exit(opts!("s1").redis_url(url), Duration::from_secs(5)).await;
        assert_eq!(
            status.code(),
            Some(2),
            "{url}: exit status {status}; log:\n{log}"
        );
        assert!(
            log.contains(url) && log.contains("redis+sentinel://HOST:PORT"),
            "{url}: the log names the URL and the form it should have:\n{log}"
        );
    }
}

/// Sentinels that do not answer, or do not know the master's name: the
/// instance cannot find its master and does not start.
#[tokio::test]
async fn no_master_through_the_sentinels_is_refused_at_start_up() {
    let nobody = format!("redis+sentinel://{}/sbmaster", free_port());
    let (status, log) =
        Instance::run_until_exit(opts!("s2").redis_url(&nobody), Duration::from_secs(10)).await;
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    let sentinel = nobody
        .trim_start_matches("redis+sentinel://")
        .trim_end_matches("/sbmaster");
    assert!(
        log.contains("\"sbmaster\"") && log.contains(sentinel) && log.contains("refused"),
        "no sentinel answers: the log names the master and the sentinels:\n{log}"
    );

    let set = ReplicatedRedis::start(0, 1, DOWN_AFTER_MS).await;
    let unknown = set.sentinel_url().replace("/sbmaster", "/nosuchmaster");
    let (status, log) =
        Instance::run_until_exit(opts!("s3").redis_url(&unknown), Duration::from_secs(10)).await;
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    assert!(
        log.contains("\"nosuchmaster\"") && log.contains("not found"),
        "the sentinel knows no master of that name: the log says so:\n{log}"
    );
}
