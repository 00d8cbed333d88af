//! Traffic under a fault, for the failover and resharding tests: a loop
//! that sends stored DMs (or room messages) from one client and one that
//! records what another receives ([`Traffic`]), and a poller that records
//! every change of the instances' `/readyz` ([`ReadyzWatch`]; [`all_ready`]
//! waits for 200 everywhere without one). Both run as
//! tasks while a test breaks Redis, then answer when something was sent,
//! answered and delivered. What the fault is, and which bounds hold, is the
//! tests' business.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::client::{Client, Incoming};
use crate::http::try_http_request;
use crate::instance::Instance;
use crate::wait::eventually;

/// `ack:<status>` or `error:<code>` for a reply frame.
pub fn outcome(reply: &Value) -> String {
    match reply["type"].as_str() {
        Some("ack") => format!("ack:{}", reply["status"].as_str().unwrap_or("?")),
        Some("error") => format!("error:{}", reply["code"].as_str().unwrap_or("?")),
        _ => format!("unexpected:{reply}"),
    }
}

/// Waits until every instance answers `/readyz` with 200 (up to 10 s
/// each).
pub async fn all_ready(instances: &[Instance]) {
    for instance in instances {
        eventually(
            Duration::from_secs(10),
            &format!("/readyz of {} is 200", instance.instance_id()),
            || async { instance.http_status("/readyz").await == Some(200) },
        )
        .await;
    }
}

/// One message the sender loop sent, and what came back.
#[derive(Clone, Debug)]
pub struct Sent {
    /// The `n` of its body: 0, 1, 2, ... in send order.
    pub n: u64,
    pub sent_at: Instant,
    /// `ack:routed`, `error:unavailable`, ...
    pub outcome: String,
    /// Acked with `stored: true` (a room message: acked `ok`, so recorded
    /// in the room's history).
    pub stored: bool,
}

/// What the receiver loop saw.
#[derive(Default, Debug)]
pub struct Received {
    /// (n, when) of every message of the loop, in arrival order.
    pub dms: Vec<(u64, Instant)>,
    /// Frames that were neither a message of the loop nor expected (e.g.
    /// `gap`).
    pub other: Vec<Value>,
    /// How the connection ended, if it did (it must not).
    pub ended: Option<String>,
}

/// Stored DMs (or room messages) from `sender` (each awaiting its reply),
/// received by `recipient`; runs until [`Traffic::stop`].
pub struct Traffic {
    /// `dm` or `room`: the frames sent and counted.
    kind: &'static str,
    /// When the loops started (before the first send).
    started: Instant,
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Sent>>>,
    received: Arc<Mutex<Received>>,
    sender: JoinHandle<Client>,
    receiver: JoinHandle<Client>,
}

impl Traffic {
    /// Stored DMs to the user `to`, 20 ms apart.
    pub fn start(sender: Client, recipient: Client, to: &str) -> Traffic {
        let to = to.to_string();
        Self::start_with(
            sender,
            recipient,
            "dm",
            Duration::from_millis(20),
            move |n| json!({"type": "dm", "to": to, "body": {"n": n}}),
        )
    }

    /// Room messages to `room` (both clients are members) instead of DMs,
    /// every 5 ms (a message published while a member instance moves its
    /// subscription is what this looks for); an `ok` ack (recorded in the
    /// room's history) counts as stored.
    pub fn start_room(sender: Client, recipient: Client, room: &str) -> Traffic {
        let room = room.to_string();
        Self::start_with(
            sender,
            recipient,
            "room",
            Duration::from_millis(5),
            move |n| json!({"type": "room", "room": room, "body": {"n": n}}),
        )
    }

    /// `frame(n)` from `sender`, `pace` apart; `recipient` records the
    /// frames of type `kind` carrying an `n`.
    fn start_with(
        mut sender: Client,
        mut recipient: Client,
        kind: &'static str,
        pace: Duration,
        frame: impl Fn(u64) -> Value + Send + 'static,
    ) -> Traffic {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
        let received: Arc<Mutex<Received>> = Arc::default();
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let sent_at = Instant::now();
                    let reply = sender.request(frame(n)).await;
                    let outcome = outcome(&reply);
                    sent.lock().unwrap().push(Sent {
                        n,
                        sent_at,
                        stored: reply["stored"] == true || (kind == "room" && outcome == "ack:ok"),
                        outcome,
                    });
                    n += 1;
                    tokio::time::sleep(pace).await;
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
                                Some(n) if frame["type"] == kind => {
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
            kind,
            started,
            stop,
            sent,
            received,
            sender,
            receiver,
        }
    }

    /// When the loops started: every send is at or after it.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// How many messages of the loop were delivered so far.
    pub fn delivered(&self) -> usize {
        self.received.lock().unwrap().dms.len()
    }

    /// When the first message sent after `t` was delivered, and its n.
    pub fn first_delivery_sent_after(&self, t: Instant) -> Option<(u64, Instant)> {
        let sent_at: HashMap<u64, Instant> = self
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.n, s.sent_at))
            .collect();
        self.received
            .lock()
            .unwrap()
            .dms
            .iter()
            .filter(|(n, _)| sent_at.get(n).is_some_and(|&at| at > t))
            .min_by_key(|(_, at)| *at)
            .copied()
    }

    /// Waits until `count` messages (sent at any time) were delivered.
    pub async fn await_deliveries(&self, count: usize, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        loop {
            let delivered = self.delivered();
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

    /// Waits until `count` messages sent after `t` were delivered.
    pub async fn await_deliveries_sent_after(
        &self,
        t: Instant,
        count: usize,
        timeout: Duration,
        what: &str,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let sent_after: HashSet<u64> = self
                .sent
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.sent_at > t)
                .map(|s| s.n)
                .collect();
            let delivered = self
                .received
                .lock()
                .unwrap()
                .dms
                .iter()
                .filter(|(n, _)| sent_after.contains(n))
                .count();
            if delivered >= count {
                return;
            }
            self.assert_connected(what);
            assert!(
                Instant::now() < deadline,
                "{what}: only {delivered} of {count} DMs sent after it delivered within {timeout:?}; \
                 last outcomes: {:?}",
                self.last_outcomes(10)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a message sent after `t` is delivered; returns when it
    /// was.
    pub async fn await_delivery_sent_after(
        &self,
        t: Instant,
        timeout: Duration,
        what: &str,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, at)) = self.first_delivery_sent_after(t) {
                return at;
            }
            self.assert_connected(what);
            assert!(
                Instant::now() < deadline,
                "{what}: no DM sent after the fault was delivered within {timeout:?}; \
                 last outcomes: {:?}",
                self.last_outcomes(10)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every message sent so far and acked as stored (a DM
    /// `routed` or `offline` with `stored: true`, a room message `ok`) was
    /// delivered, except those in `excused`; panics with the missing ones
    /// after `timeout`. Returns those of `excused` that have not arrived
    /// (e.g. lost to asynchronous replication).
    pub async fn await_stored_delivered(
        &self,
        excused: &HashSet<u64>,
        timeout: Duration,
    ) -> Vec<u64> {
        let cutoff = Instant::now();
        let deadline = cutoff + timeout;
        loop {
            let missing = self.missing_stored(excused, cutoff);
            if missing.is_empty() {
                return self
                    .missing_stored(&HashSet::new(), Instant::now())
                    .into_iter()
                    .filter(|n| excused.contains(n))
                    .collect();
            }
            self.assert_connected("waiting for the stored messages");
            if Instant::now() >= deadline {
                let other = format!("{:?}", self.received.lock().unwrap().other);
                let sent_at: Vec<String> = self
                    .sent
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| missing.contains(&s.n))
                    .map(|s| format!("{} at +{:?}", s.n, s.sent_at - self.started))
                    .collect();
                let kind = self.kind;
                panic!(
                    "{kind} messages acked as stored (recorded) never delivered within \
                     {timeout:?}: {sent_at:?} (since the traffic began); other frames: {other}; \
                     outcomes: {:?}",
                    self.outcome_runs(self.started)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages sent before `cutoff` and acked as stored that have not
    /// arrived, except `excused`.
    fn missing_stored(&self, excused: &HashSet<u64>, cutoff: Instant) -> Vec<u64> {
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
            .filter(|s| s.sent_at < cutoff && s.stored)
            .filter(|s| !got.contains(&s.n) && !excused.contains(&s.n))
            .map(|s| s.n)
            .collect()
    }

    /// Stored-acked messages sent in `[from, to)`.
    pub fn stored_between(&self, from: Instant, to: Instant) -> HashSet<u64> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.stored && s.sent_at >= from && s.sent_at < to)
            .map(|s| s.n)
            .collect()
    }

    /// The last `k` sends, newest first, as `n:outcome`.
    pub fn last_outcomes(&self, k: usize) -> Vec<String> {
        let sent = self.sent.lock().unwrap();
        sent.iter()
            .rev()
            .take(k)
            .map(|s| format!("{}:{}", s.n, s.outcome))
            .collect()
    }

    /// The outcomes of the sends from `t0` on as runs, `first..=last
    /// outcome (+ms since t0)`.
    pub fn outcome_runs(&self, t0: Instant) -> Vec<String> {
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

    /// The largest gap between consecutive deliveries after `t` (the first
    /// counted from `t`).
    pub fn largest_delivery_gap_after(&self, t: Instant) -> Duration {
        let received = self.received.lock().unwrap();
        let times: Vec<Instant> = received
            .dms
            .iter()
            .map(|(_, at)| *at)
            .filter(|&at| at >= t)
            .collect();
        let first_gap = times.first().map_or(Duration::ZERO, |&first| first - t);
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(first_gap, Duration::max)
    }

    /// Panics if the recipient's connection ended (no client may
    /// reconnect), saying `when`.
    #[track_caller]
    pub fn assert_connected(&self, when: &str) {
        let ended = self.received.lock().unwrap().ended.clone();
        if let Some(ended) = ended {
            panic!("{when}: the recipient's connection ended ({ended}); no client may reconnect");
        }
    }

    /// Stops both loops; asserts that the recipient's connection never
    /// ended, no message arrived twice and stored ones arrived in send
    /// order. Returns the sender, the recipient, what was sent and what
    /// was received.
    pub async fn stop(self) -> (Client, Client, Vec<Sent>, Received) {
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

/// Polls `/readyz` of each address every 25 ms and records each change;
/// runs until [`ReadyzWatch::stop`]. Instances are named by their index
/// in the addresses given.
pub struct ReadyzWatch {
    /// How many instances are polled.
    count: usize,
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<ReadyzChange>>>,
    task: JoinHandle<()>,
}

impl ReadyzWatch {
    /// Starts polling `addrs` (e.g. every [`crate::Instance::addr`]).
    pub fn start(addrs: Vec<SocketAddr>) -> ReadyzWatch {
        let count = addrs.len();
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
            count,
            stop,
            changes,
            task,
        }
    }

    /// When instance `i` first answered `status` at or after `t`.
    pub fn saw_after(&self, i: usize, status: u16, t: Instant) -> Option<Instant> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .find(|(at, who, s)| *at >= t && *who == i && *s == Some(status))
            .map(|(at, _, _)| *at)
    }

    /// The current status of instance `i` as last polled (None before the
    /// first poll; Some(None) while it does not answer).
    pub fn current(&self, i: usize) -> Option<Option<u16>> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, who, _)| *who == i)
            .map(|(_, _, s)| *s)
    }

    /// Every change at or after `t`, as `i<index + 1>:<status> +ms`.
    pub fn changes_after(&self, t: Instant) -> Vec<String> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _, _)| *at >= t)
            .map(|(at, i, s)| format!("i{}:{s:?} +{}ms", i + 1, (*at - t).as_millis()))
            .collect()
    }

    /// Waits until every instance's latest status is 200.
    pub async fn await_all_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if (0..self.count).all(|i| self.current(i) == Some(Some(200))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz not back to 200 everywhere within {timeout:?}: {:?}",
                (0..self.count).map(|i| self.current(i)).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the poller.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("readyz poller");
    }
}
