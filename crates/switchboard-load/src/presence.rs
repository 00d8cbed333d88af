//! The `presence` workload (issue 14): churning users go online and
//! offline while watcher connections count the `presence_event` frames the
//! servers send them.
//!
//! - `--users` churning users (`<user-prefix>K`), one connection at a time:
//!   user K's c-th connection goes to target `(K + c) mod N`, so every
//!   instance sees connects and disconnects. They start offline.
//! - `--watcher-conns` watcher connections (`<watcher-prefix>J`), connection
//!   J on the `(J mod W)`-th of the `--watcher-instances`. Each churning user
//!   has `--watchers-per-user` of them: user K with `K mod (W+1) = i < W`
//!   is watched from the i-th watcher instance only, the other users from
//!   two (half the watchers each). So some instances (those not listed) have
//!   no watcher at all, and each watcher instance has users it does not
//!   watch: what each instance should receive from the bus is known per
//!   instance ([`EventTally::expected_envelopes_by_instance`]).
//! - Once every watcher is connected and its `watch` acked (every user
//!   offline), the churn phase toggles user `j mod U` at `t0 + j / rate`
//!   for `--duration` seconds (open loop): a connect (welcome awaited) or a
//!   close handshake. The loader records each user's transitions in order.
//! - A watcher matches its i-th event for a user to that user's i-th
//!   transition: right state → delivered (latency from the transition's
//!   start); the same state as the previous event → duplicate; anything
//!   else → unexpected. Lost = transitions - matched, per watcher and user.
//! - Drain: until every expected event is matched, at most `--drain`.
//!
//! With `--wait-for-signal` the loader waits for SIGUSR1 before churning and,
//! drained, holds everything until SIGTERM/SIGINT (or `--hold`), so the
//! orchestrator reads the servers' counters around the window. The
//! [`PresenceRun`] document goes to `--out`, rewritten at every phase change
//! and about once a second (through a rename), or to stdout at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use switchboard_bench_schema::{
    ChurnPhase, EventTally, PresencePhase, PresenceRun, PresenceTag, Quantiles, WatchPlacement,
    WatcherSetup,
};

use crate::cli::{Args, AuthMode, Target};
use crate::conn::mint_token;
use crate::report::{cpu_seconds, quantiles_of};
use crate::state::{lock, new_hist};

type Ws = WebSocketStream<TcpStream>;

/// A transition starting later than this after its scheduled time is late.
const LATE: Duration = Duration::from_millis(50);
/// One handshake (TCP, upgrade, welcome) may take this long.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// A close handshake may take this long.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often the document is rewritten while nothing changes phase.
const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Anomalies kept in full.
const FIRST_ERRORS: usize = 10;
/// The hold after the drain with `--wait-for-signal`, when --hold is not given.
const DEFAULT_HOLD_S: f64 = 120.0;

/// Which watcher connections watch which users.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Per churning user: the watcher connections watching it.
    pub watchers_of: Vec<Vec<u32>>,
    /// Per watcher connection: the users it watches, ascending.
    pub watched_by: Vec<Vec<u32>>,
    /// Per watcher connection: its target index.
    pub watcher_target: Vec<usize>,
    /// Per churning user: the target indices with a watcher of it.
    pub instances_of: Vec<Vec<usize>>,
    /// The placement summary for the document.
    pub placement: WatchPlacement,
}

impl Layout {
    /// The layout of `users` churning users, `conns` watcher connections on
    /// `watcher_instances` (target indices) of `n_targets`, `per_user`
    /// watchers each. Needs `conns / W >= per_user` (checked by the flags).
    pub fn build(
        users: u32,
        conns: u32,
        per_user: u32,
        watcher_instances: &[usize],
        n_targets: usize,
    ) -> Layout {
        let w = watcher_instances.len();
        let watcher_target: Vec<usize> = (0..conns as usize)
            .map(|j| watcher_instances[j % w])
            .collect();
        // Pool i: the connections on the i-th watcher instance.
        let pools: Vec<Vec<u32>> = (0..w)
            .map(|i| (0..conns).filter(|j| *j as usize % w == i).collect())
            .collect();
        let mut watchers_of = vec![Vec::new(); users as usize];
        let mut watched_by = vec![Vec::new(); conns as usize];
        let mut instances_of = vec![Vec::new(); users as usize];
        let mut one = BTreeMap::new();
        let mut split = 0u64;
        let mut by_instance = vec![0u64; n_targets];
        for k in 0..users {
            if per_user == 0 {
                continue;
            }
            let group = k as usize % (w + 1);
            // (pool, how many of its connections)
            let shares: Vec<(usize, u32)> = if group < w {
                vec![(group, per_user)]
            } else if w == 1 {
                vec![(0, per_user)]
            } else {
                let first = k as usize % w;
                let second = (first + 1) % w;
                let a = per_user.div_ceil(2);
                vec![(first, a), (second, per_user - a)]
            };
            let mut on = Vec::new();
            for (pool, count) in shares {
                let members = &pools[pool];
                if count == 0 || members.is_empty() {
                    continue;
                }
                for t in 0..count as usize {
                    let j = members[(k as usize + t) % members.len()];
                    watchers_of[k as usize].push(j);
                    watched_by[j as usize].push(k);
                }
                on.push(watcher_instances[pool]);
            }
            match on.as_slice() {
                [one_instance] => *one.entry(one_instance.to_string()).or_insert(0) += 1,
                [] => {}
                _ => split += 1,
            }
            for &i in &on {
                by_instance[i] += 1;
            }
            instances_of[k as usize] = on;
        }
        let watches = watchers_of.iter().map(|v| v.len() as u64).sum();
        Layout {
            watchers_of,
            watched_by,
            watcher_target,
            instances_of,
            placement: WatchPlacement {
                watcher_instances: watcher_instances.to_vec(),
                watcher_conns: u64::from(conns),
                watchers_per_user: per_user,
                watches,
                users_on_one_instance: one,
                split_users: split,
                watched_users_by_instance: by_instance,
            },
        }
    }
}

/// One transition of a churning user, as the loader made it.
#[derive(Debug, Clone, Copy)]
struct Transition {
    online: bool,
    /// When it started: connect start, or the close frame sent.
    at: Instant,
    at_unix_ms: f64,
}

/// Shared by every task.
struct Run {
    args: Args,
    targets: Vec<Target>,
    layout: Layout,
    started: Instant,
    /// Per user: its transitions in order.
    log: Vec<Mutex<Vec<Transition>>>,
    /// Per watch (index into `watch_base[j] + position`): matched events.
    matched: Vec<AtomicU32>,
    /// Per watcher connection: the index of its first watch.
    watch_base: Vec<usize>,
    c: Counters,
    hist: Mutex<Hists>,
    errors: Mutex<BTreeMap<String, u64>>,
    first_errors: Mutex<Vec<String>>,
    phase: Mutex<PresencePhase>,
    /// Set when the churn phase starts (for `span_s`).
    churn_start: Mutex<Option<Instant>>,
    churn_end_online: AtomicU64,
    cpu_at_churn: Mutex<Option<f64>>,
    cpu_churn_s: Mutex<Option<f64>>,
    /// Set once the loader is closing: losses are not losses any more.
    closing: AtomicBool,
    setup_elapsed_s: Mutex<f64>,
}

#[derive(Default)]
struct Counters {
    ready: AtomicU64,
    failed: AtomicU64,
    initially_online: AtomicU64,
    watcher_lost: AtomicU64,
    scheduled: AtomicU64,
    online: AtomicU64,
    offline: AtomicU64,
    churn_failed: AtomicU64,
    churn_lost: AtomicU64,
    late: AtomicU64,
    received: AtomicU64,
    received_online: AtomicU64,
    received_offline: AtomicU64,
    matched: AtomicU64,
    duplicates: AtomicU64,
    unexpected: AtomicU64,
    misrouted: AtomicU64,
    /// Unix µs of the last event received.
    last_event_us: AtomicU64,
    received_by_instance: Vec<AtomicU64>,
}

struct Hists {
    latency: Histogram<u64>,
    online: Histogram<u64>,
    offline: Histogram<u64>,
    /// Event `ts` minus the transition's start, ms (1 ms resolution: `ts` is in ms).
    ts_skew: Vec<f64>,
    connect: Histogram<u64>,
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Run {
    fn anomaly(&self, text: String) {
        let mut first = lock(&self.first_errors);
        if first.len() < FIRST_ERRORS {
            first.push(text);
        }
    }

    fn count_error(&self, code: &str) {
        *lock(&self.errors).entry(code.to_owned()).or_insert(0) += 1;
    }

    fn set_phase(&self, phase: PresencePhase) {
        *lock(&self.phase) = phase;
        self.write();
    }

    fn url(&self, target: usize, user: &str) -> Result<String, String> {
        let endpoint = &self.targets[target].endpoint;
        match self.args.auth_mode()? {
            AuthMode::None => Ok(format!("{endpoint}?user={user}")),
            AuthMode::Jwt => {
                let secret = self.args.jwt_secret.clone().unwrap_or_default();
                mint_token(user, &secret, self.args.jwt_ttl)
                    .map(|token| format!("{endpoint}?token={token}"))
            }
        }
    }

    /// TCP connect, upgrade, welcome.
    async fn open(&self, target: usize, user: &str) -> Result<Ws, String> {
        let url = self.url(target, user)?;
        let rest = url.strip_prefix("ws://").unwrap_or(&url);
        let authority = rest.split('/').next().unwrap_or(rest).to_owned();
        let attempt = async {
            let stream = TcpStream::connect(authority.as_str())
                .await
                .map_err(|e| format!("connect {authority}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), stream)
                .await
                .map_err(|e| format!("upgrade {authority}: {e}"))?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        if parse_frame(text.as_str()).is_ok_and(|f| f.ty == "welcome") {
                            return Ok(ws);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Err(format!(
                            "closed before welcome ({})",
                            frame.map_or(0, |f| u16::from(f.code))
                        ))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("before welcome: {e}")),
                    None => return Err("eof before welcome".into()),
                }
            }
        };
        tokio::time::timeout(OPEN_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("{authority}: no welcome within {OPEN_TIMEOUT:?}")))
    }

    fn user_index(&self, name: &str) -> Option<u32> {
        let k: u32 = name.strip_prefix(&self.args.user_prefix)?.parse().ok()?;
        (k < self.args.users).then_some(k)
    }

    /// A `presence_event` at watcher `j`, for its `pos`-th watched user `k`.
    fn on_event(&self, j: u32, k: u32, pos: usize, online: bool, ts: Option<f64>, last: &mut bool) {
        let now = Instant::now();
        let c = &self.c;
        c.received.fetch_add(1, Ordering::Relaxed);
        if online {
            c.received_online.fetch_add(1, Ordering::Relaxed);
        } else {
            c.received_offline.fetch_add(1, Ordering::Relaxed);
        }
        c.received_by_instance[self.layout.watcher_target[j as usize]]
            .fetch_add(1, Ordering::Relaxed);
        c.last_event_us.fetch_max(unix_us(), Ordering::Relaxed);
        if online == *last {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
            self.anomaly(format!(
                "watcher {j}: a second consecutive online={online} event for user {k}"
            ));
            return;
        }
        *last = online;
        let slot = &self.matched[self.watch_base[j as usize] + pos];
        let rank = slot.load(Ordering::Relaxed) as usize;
        let transition = lock(&self.log[k as usize]).get(rank).copied();
        match transition {
            Some(t) if t.online == online => {
                slot.fetch_add(1, Ordering::Relaxed);
                c.matched.fetch_add(1, Ordering::Relaxed);
                let us = now.saturating_duration_since(t.at).as_micros() as u64;
                let mut h = lock(&self.hist);
                h.latency.saturating_record(us.max(1));
                if online {
                    h.online.saturating_record(us.max(1));
                } else {
                    h.offline.saturating_record(us.max(1));
                }
                if let Some(ts) = ts {
                    h.ts_skew.push(ts - t.at_unix_ms);
                }
            }
            other => {
                c.unexpected.fetch_add(1, Ordering::Relaxed);
                self.anomaly(format!(
                    "watcher {j}: event {rank} for user {k} online={online}, but the loader's \
                     transition {rank} is {}",
                    other.map_or("none".to_owned(), |t| format!("online={}", t.online))
                ));
                // Keep matching the following events to the following transitions.
                slot.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Transitions so far of user `k`.
    fn transitions(&self, k: usize) -> u64 {
        lock(&self.log[k]).len() as u64
    }

    fn expected_total(&self) -> u64 {
        (0..self.args.users as usize)
            .map(|k| self.transitions(k) * self.layout.watchers_of[k].len() as u64)
            .sum()
    }

    fn document(&self) -> PresenceRun {
        let c = &self.c;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let users = self.args.users as usize;
        let n_targets = self.targets.len();
        let logs: Vec<Vec<Transition>> = (0..users).map(|k| lock(&self.log[k]).clone()).collect();
        let mut lost = 0u64;
        for (j, watched) in self.layout.watched_by.iter().enumerate() {
            for (pos, &k) in watched.iter().enumerate() {
                let matched =
                    u64::from(self.matched[self.watch_base[j] + pos].load(Ordering::Relaxed));
                lost += (logs[k as usize].len() as u64).saturating_sub(matched);
            }
        }
        let mut envelopes = vec![0u64; n_targets];
        for (k, on) in self.layout.instances_of.iter().enumerate() {
            for &i in on {
                envelopes[i] += logs[k].len() as u64;
            }
        }
        let expected: u64 = (0..users)
            .map(|k| logs[k].len() as u64 * self.layout.watchers_of[k].len() as u64)
            .sum();
        let mut min_dwell: Option<f64> = None;
        for log in &logs {
            for pair in log.windows(2) {
                let d = pair[1]
                    .at
                    .saturating_duration_since(pair[0].at)
                    .as_secs_f64();
                min_dwell = Some(min_dwell.map_or(d, |m: f64| m.min(d)));
            }
        }
        let phase = *lock(&self.phase);
        let h = lock(&self.hist);
        // Sorting every value is for the final counts, not the periodic rewrites.
        let skew = if phase >= PresencePhase::Drained {
            quantiles_of_values(h.ts_skew.clone())
        } else {
            Quantiles::default()
        };
        let churn_start = *lock(&self.churn_start);
        let last_us = load(&c.last_event_us);
        let span_s = churn_start.and_then(|s| {
            let start_us = unix_us().saturating_sub(s.elapsed().as_micros() as u64);
            (last_us > start_us).then(|| round3((last_us - start_us) as f64 / 1e6))
        });
        let received = load(&c.received);
        let watchers = WatcherSetup {
            requested: u64::from(self.args.watcher_conns),
            ready: load(&c.ready),
            failed: load(&c.failed),
            initially_online: load(&c.initially_online),
            errors: lock(&self.errors).clone(),
            lost: load(&c.watcher_lost),
            elapsed_s: round3(*lock(&self.setup_elapsed_s)),
        };
        let churn = ChurnPhase {
            rate_offered: self.args.churn_rate,
            duration_s: self.args.duration,
            scheduled: load(&c.scheduled),
            online: load(&c.online),
            offline: load(&c.offline),
            failed: load(&c.churn_failed),
            lost: load(&c.churn_lost),
            late: load(&c.late),
            connect_ms: quantiles_of(&h.connect),
            min_dwell_s: min_dwell.map(round3),
            online_at_end: load(&self.churn_end_online),
        };
        let events = EventTally {
            expected,
            received,
            received_online: load(&c.received_online),
            received_offline: load(&c.received_offline),
            lost,
            duplicates: load(&c.duplicates),
            unexpected: load(&c.unexpected),
            misrouted: load(&c.misrouted),
            received_by_instance: c.received_by_instance.iter().map(load).collect(),
            expected_envelopes_by_instance: envelopes,
            latency_ms: quantiles_of(&h.latency),
            online_latency_ms: quantiles_of(&h.online),
            offline_latency_ms: quantiles_of(&h.offline),
            ts_minus_start_ms: skew,
            span_s,
            per_second: (churn_start.is_some() && self.args.duration > 0.0)
                .then(|| round3(received as f64 / self.args.duration)),
        };
        drop(h);
        let mut fail_reasons = Vec::new();
        if phase >= PresencePhase::Drained {
            let checks = [
                (
                    watchers.ready < watchers.requested,
                    format!(
                        "{} of {} watchers ready",
                        watchers.ready, watchers.requested
                    ),
                ),
                (
                    watchers.initially_online > 0,
                    format!(
                        "{} watched users reported online before the churn",
                        watchers.initially_online
                    ),
                ),
                (
                    watchers.lost > 0,
                    format!("{} watcher connections lost", watchers.lost),
                ),
                (
                    churn.failed > 0,
                    format!("{} transitions failed", churn.failed),
                ),
                (
                    churn.lost > 0,
                    format!("{} churning connections lost", churn.lost),
                ),
                (events.lost > 0, format!("{} events lost", events.lost)),
                (
                    events.duplicates > 0,
                    format!("{} duplicate events", events.duplicates),
                ),
                (
                    events.unexpected > 0,
                    format!("{} unexpected events", events.unexpected),
                ),
                (
                    events.misrouted > 0,
                    format!("{} misrouted events", events.misrouted),
                ),
                (
                    !watchers.errors.is_empty(),
                    format!("error frames: {:?}", watchers.errors),
                ),
            ];
            fail_reasons = checks
                .into_iter()
                .filter(|(bad, _)| *bad)
                .map(|(_, why)| why)
                .collect();
        }
        PresenceRun {
            mode: PresenceTag::Presence,
            phase,
            pid: std::process::id(),
            targets: self.targets.iter().map(|t| t.display.clone()).collect(),
            users: self.args.users,
            user_prefix: self.args.user_prefix.clone(),
            watcher_prefix: self.args.watcher_prefix.clone(),
            presence_grace_ms: self.args.presence_grace_ms,
            placement: self.layout.placement.clone(),
            watchers,
            churn,
            events,
            pass: phase >= PresencePhase::Drained && fail_reasons.is_empty(),
            fail_reasons,
            first_errors: lock(&self.first_errors).clone(),
            cpu_s: round3(cpu_seconds()),
            churn_cpu_s: round3(lock(&self.cpu_churn_s).unwrap_or(0.0)),
            elapsed_s: round3(self.started.elapsed().as_secs_f64()),
            updated_unix_ms: round3(unix_us() as f64 / 1000.0),
        }
    }

    /// Rewrites the document at `--out` (nothing without it).
    fn write(&self) {
        if let Some(path) = &self.args.out {
            if let Err(e) = write_document(path, &self.document()) {
                eprintln!("switchboard-load: {e}");
            }
        }
    }
}

/// Quantiles of plain values (ms), rounded to the µs.
fn quantiles_of_values(mut values: Vec<f64>) -> Quantiles {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return Quantiles::default();
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let at = |q: f64| {
        Some(round3(
            values[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
        ))
    };
    Quantiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        p999: at(0.999),
        max: Some(round3(values[n - 1])),
        mean: Some(round3(values.iter().sum::<f64>() / n as f64)),
        n: n as u64,
    }
}

/// Writes `doc` to `path` through `path.tmp` and a rename.
fn write_document(path: &Path, doc: &PresenceRun) -> Result<(), String> {
    let text =
        serde_json::to_string_pretty(doc).map_err(|e| format!("serializing the document: {e}"))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{text}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The `online` field: one state (an event) or a map (the ack).
#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Online {
    /// `presence_event`.
    One(bool),
    /// The `presence` reply to `watch`.
    Map(HashMap<String, bool>),
}

/// The fields of an incoming frame this workload reads.
#[derive(Debug, PartialEq, Deserialize)]
pub struct Frame<'a> {
    /// `welcome`, `presence`, `presence_event`, `error`, …
    #[serde(rename = "type", borrow)]
    pub ty: &'a str,
    /// The request id of a reply.
    #[serde(default)]
    pub id: Option<u64>,
    /// The user of a `presence_event`.
    #[serde(default)]
    pub user: Option<String>,
    /// See [`Online`].
    #[serde(default)]
    pub online: Option<Online>,
    /// Unix ms of the transition (the server's clock).
    #[serde(default)]
    pub ts: Option<f64>,
    /// Error code.
    #[serde(default)]
    pub code: Option<String>,
}

/// Parses an incoming text frame.
pub fn parse_frame(text: &str) -> Result<Frame<'_>, serde_json::Error> {
    serde_json::from_str(text)
}

/// `{"type":"watch","users":[...],"id":ID}`.
pub fn watch_frame(prefix: &str, users: &[u32], id: u64) -> String {
    let names: Vec<String> = users.iter().map(|k| format!("{prefix}{k}")).collect();
    serde_json::json!({"type": "watch", "users": names, "id": id}).to_string()
}

/// The server's limit of users per watch frame.
const WATCH_CHUNK: usize = 1000;

/// Runs the workload to its end and writes the document.
pub async fn run(args: Args, targets: Vec<Target>) -> Result<(), String> {
    let started = Instant::now();
    let layout = Layout::build(
        args.users,
        args.watcher_conns,
        args.watchers_per_user,
        &args.watcher_instances,
        targets.len(),
    );
    let mut watch_base = Vec::with_capacity(layout.watched_by.len());
    let mut total = 0usize;
    for w in &layout.watched_by {
        watch_base.push(total);
        total += w.len();
    }
    let hist = Hists {
        latency: new_hist(),
        online: new_hist(),
        offline: new_hist(),
        ts_skew: Vec::new(),
        connect: new_hist(),
    };
    let c = Counters {
        received_by_instance: (0..targets.len()).map(|_| AtomicU64::new(0)).collect(),
        ..Counters::default()
    };
    let users = args.users as usize;
    let run = Arc::new(Run {
        log: (0..users).map(|_| Mutex::new(Vec::new())).collect(),
        matched: (0..total).map(|_| AtomicU32::new(0)).collect(),
        watch_base,
        layout,
        targets,
        started,
        c,
        hist: Mutex::new(hist),
        errors: Mutex::new(BTreeMap::new()),
        first_errors: Mutex::new(Vec::new()),
        phase: Mutex::new(PresencePhase::Connecting),
        churn_start: Mutex::new(None),
        churn_end_online: AtomicU64::new(0),
        cpu_at_churn: Mutex::new(None),
        cpu_churn_s: Mutex::new(None),
        closing: AtomicBool::new(false),
        setup_elapsed_s: Mutex::new(0.0),
        args,
    });
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).map_err(|e| format!("SIGUSR1: {e}"))?;
    run.write();
    let writer = tokio::spawn(write_periodically(run.clone()));
    let quiet = run.args.quiet;

    // Watchers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = unbounded_channel::<Result<(), String>>();
    let limit = Arc::new(Semaphore::new(run.args.connect_concurrency));
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    for j in 0..run.args.watcher_conns {
        tasks.push(tokio::spawn(watcher(
            run.clone(),
            j,
            limit.clone(),
            ready_tx.clone(),
            stop_rx.clone(),
        )));
    }
    drop(ready_tx);
    let deadline = started + Duration::from_secs_f64(run.args.connect_timeout);
    let mut done = 0u32;
    let mut interrupted = false;
    while done < run.args.watcher_conns {
        tokio::select! {
            r = tokio::time::timeout_at(deadline, ready_rx.recv()) => match r {
                Ok(Some(Ok(()))) => done += 1,
                Ok(Some(Err(e))) => {
                    done += 1;
                    run.anomaly(format!("watcher: {e}"));
                }
                Ok(None) | Err(_) => break,
            },
            _ = sigterm.recv() => { interrupted = true; break; }
            _ = sigint.recv() => { interrupted = true; break; }
        }
    }
    *lock(&run.setup_elapsed_s) = started.elapsed().as_secs_f64();
    let ready = run.c.ready.load(Ordering::Relaxed);
    if !quiet {
        eprintln!(
            "presence: {ready}/{} watchers ready ({} watches) in {:.2}s",
            run.args.watcher_conns,
            run.layout.placement.watches,
            started.elapsed().as_secs_f64()
        );
    }
    run.set_phase(PresencePhase::Ready);

    // Churning users.
    let mut churners: Vec<UnboundedSender<Cmd>> = Vec::with_capacity(users);
    for k in 0..run.args.users {
        let (tx, rx) = unbounded_channel();
        churners.push(tx);
        tasks.push(tokio::spawn(churner(run.clone(), k, rx)));
    }

    if !interrupted && run.args.wait_for_signal {
        let wait = tokio::time::sleep(Duration::from_secs_f64(run.args.connect_timeout));
        tokio::select! {
            _ = sigusr1.recv() => {}
            _ = wait => run.anomaly("no SIGUSR1 within --connect-timeout: churning anyway".into()),
            _ = sigterm.recv() => interrupted = true,
            _ = sigint.recv() => interrupted = true,
        }
    }

    if !interrupted {
        *lock(&run.cpu_at_churn) = Some(cpu_seconds());
        run.set_phase(PresencePhase::Churning);
        let t0 = Instant::now();
        *lock(&run.churn_start) = Some(t0);
        let total = (run.args.churn_rate * run.args.duration).floor() as u64;
        let step = 1.0 / run.args.churn_rate;
        for j in 0..total {
            let at = t0 + Duration::from_secs_f64(j as f64 * step);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = sigterm.recv() => { interrupted = true; break; }
                _ = sigint.recv() => { interrupted = true; break; }
            }
            run.c.scheduled.fetch_add(1, Ordering::Relaxed);
            let _ = churners[(j % u64::from(run.args.users)) as usize].send(Cmd::Toggle(at));
        }
        // The churn phase lasts its duration even when the last toggle is earlier.
        tokio::select! {
            _ = tokio::time::sleep_until(t0 + Duration::from_secs_f64(run.args.duration)) => {}
            _ = sigterm.recv() => interrupted = true,
            _ = sigint.recv() => interrupted = true,
        }
        run.set_phase(PresencePhase::Draining);
        // Every toggle handed out is done once each churner answers a barrier.
        let barrier_deadline = Instant::now() + OPEN_TIMEOUT + CLOSE_GRACE;
        let mut acks = Vec::new();
        for tx in &churners {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            if tx.send(Cmd::Barrier(done_tx)).is_ok() {
                acks.push(done_rx);
            }
        }
        let mut online_at_end = 0;
        for rx in acks {
            if let Ok(Ok(online)) = tokio::time::timeout_at(barrier_deadline, rx).await {
                online_at_end += u64::from(online);
            }
        }
        run.churn_end_online.store(online_at_end, Ordering::Relaxed);
        let drain_deadline = Instant::now() + Duration::from_secs_f64(run.args.drain);
        loop {
            if run.c.matched.load(Ordering::Relaxed) >= run.expected_total()
                || Instant::now() >= drain_deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Late duplicates would show within a few ms; give them a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cpu0 = lock(&run.cpu_at_churn).unwrap_or(0.0);
        *lock(&run.cpu_churn_s) = Some(cpu_seconds() - cpu0);
    }
    run.set_phase(PresencePhase::Drained);
    if !quiet {
        let d = run.document();
        eprintln!(
            "presence: {} transitions ({} online, {} offline, {} failed), events {}/{} \
             (lost {}, dup {}, unexpected {}), p50 {} p99 {} ms -> {}",
            d.churn.online + d.churn.offline,
            d.churn.online,
            d.churn.offline,
            d.churn.failed,
            d.events.received,
            d.events.expected,
            d.events.lost,
            d.events.duplicates,
            d.events.unexpected,
            d.events
                .latency_ms
                .p50
                .map_or("-".into(), |v| format!("{v:.2}")),
            d.events
                .latency_ms
                .p99
                .map_or("-".into(), |v| format!("{v:.2}")),
            if d.pass {
                "PASS".to_owned()
            } else {
                format!("FAIL ({})", d.fail_reasons.join("; "))
            }
        );
    }
    if !interrupted && run.args.wait_for_signal {
        let hold = Duration::from_secs_f64(run.args.hold.unwrap_or(DEFAULT_HOLD_S));
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
            _ = tokio::time::sleep(hold) => {}
        }
    }

    // Close everything.
    run.closing.store(true, Ordering::Relaxed);
    run.set_phase(PresencePhase::Closing);
    let _ = stop_tx.send(true);
    for tx in &churners {
        let _ = tx.send(Cmd::Close);
    }
    drop(churners);
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    if tokio::time::timeout(
        CLOSE_GRACE + Duration::from_secs(1),
        futures_util::future::join_all(tasks),
    )
    .await
    .is_err()
    {
        for a in aborts {
            a.abort();
        }
    }
    writer.abort();
    *lock(&run.phase) = PresencePhase::Done;
    let doc = run.document();
    match &run.args.out {
        Some(path) => write_document(path, &doc)?,
        None => println!(
            "{}",
            serde_json::to_string_pretty(&doc)
                .map_err(|e| format!("serializing the document: {e}"))?
        ),
    }
    Ok(())
}

async fn write_periodically(run: Arc<Run>) {
    loop {
        tokio::time::sleep(WRITE_EVERY).await;
        run.write();
    }
}

/// What a churning user's task is told.
enum Cmd {
    /// Go online if offline, offline if online (scheduled at this time).
    Toggle(Instant),
    /// Answer (with whether the user is online) once every earlier command is done.
    Barrier(tokio::sync::oneshot::Sender<bool>),
    /// Close the connection if any, and end.
    Close,
}

/// One churning user.
async fn churner(run: Arc<Run>, k: u32, mut rx: UnboundedReceiver<Cmd>) {
    let name = format!("{}{k}", run.args.user_prefix);
    let n = run.targets.len();
    let mut connects = 0usize;
    let mut ws: Option<Ws> = None;
    loop {
        let cmd = match ws.as_mut() {
            Some(socket) => tokio::select! {
                cmd = rx.recv() => cmd,
                frame = socket.next() => {
                    match frame {
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                            if !run.closing.load(Ordering::Relaxed) {
                                run.c.churn_lost.fetch_add(1, Ordering::Relaxed);
                                run.anomaly(format!("churning user {k}: connection lost"));
                                // The server will announce it offline.
                                lock(&run.log[k as usize]).push(Transition {
                                    online: false,
                                    at: Instant::now(),
                                    at_unix_ms: unix_us() as f64 / 1000.0,
                                });
                            }
                            ws = None;
                        }
                        Some(Ok(_)) => {}
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match cmd {
            None | Some(Cmd::Close) => {
                if let Some(mut socket) = ws.take() {
                    close(&mut socket).await;
                }
                return;
            }
            Some(Cmd::Barrier(done)) => {
                let _ = done.send(ws.is_some());
            }
            Some(Cmd::Toggle(scheduled)) => {
                if Instant::now().saturating_duration_since(scheduled) > LATE {
                    run.c.late.fetch_add(1, Ordering::Relaxed);
                }
                match ws.take() {
                    Some(mut socket) => {
                        lock(&run.log[k as usize]).push(Transition {
                            online: false,
                            at: Instant::now(),
                            at_unix_ms: unix_us() as f64 / 1000.0,
                        });
                        close(&mut socket).await;
                        run.c.offline.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        let target = (k as usize + connects) % n;
                        connects += 1;
                        let at = Instant::now();
                        lock(&run.log[k as usize]).push(Transition {
                            online: true,
                            at,
                            at_unix_ms: unix_us() as f64 / 1000.0,
                        });
                        match run.open(target, &name).await {
                            Ok(socket) => {
                                let us = at.elapsed().as_micros() as u64;
                                lock(&run.hist).connect.saturating_record(us.max(1));
                                run.c.online.fetch_add(1, Ordering::Relaxed);
                                ws = Some(socket);
                            }
                            Err(e) => {
                                // No transition after all.
                                lock(&run.log[k as usize]).pop();
                                run.c.churn_failed.fetch_add(1, Ordering::Relaxed);
                                run.anomaly(format!("churning user {k} to target {target}: {e}"));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Our close handshake: 1000, then read until the server's answer and the end.
async fn close(ws: &mut Ws) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// One watcher connection: connect, watch, then count events until the stop.
async fn watcher(
    run: Arc<Run>,
    j: u32,
    limit: Arc<Semaphore>,
    ready: UnboundedSender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
) {
    let name = format!("{}{j}", run.args.watcher_prefix);
    let target = run.layout.watcher_target[j as usize];
    let watched = run.layout.watched_by[j as usize].clone();
    let position: HashMap<u32, usize> = watched.iter().enumerate().map(|(p, &k)| (k, p)).collect();
    let mut last = vec![false; watched.len()];
    let setup = async {
        let _permit = limit.acquire().await.map_err(|e| e.to_string())?;
        let mut ws = run.open(target, &name).await?;
        let mut pending = std::collections::BTreeSet::new();
        for (i, chunk) in watched.chunks(WATCH_CHUNK).enumerate() {
            let id = i as u64 + 1;
            ws.send(Message::text(watch_frame(&run.args.user_prefix, chunk, id)))
                .await
                .map_err(|e| format!("sending watch: {e}"))?;
            pending.insert(id);
        }
        let acked = async {
            while !pending.is_empty() {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(frame) = parse_frame(text.as_str()) else {
                            continue;
                        };
                        match (frame.ty, frame.id) {
                            ("presence", Some(id)) if pending.remove(&id) => {
                                if let Some(Online::Map(map)) = frame.online {
                                    for (user, online) in map {
                                        if let Some(&p) =
                                            run.user_index(&user).and_then(|k| position.get(&k))
                                        {
                                            last[p] = online;
                                            if online {
                                                run.c
                                                    .initially_online
                                                    .fetch_add(1, Ordering::Relaxed);
                                            }
                                        }
                                    }
                                }
                            }
                            ("error", _) => {
                                let code = frame.code.unwrap_or_default();
                                run.count_error(&code);
                                return Err(format!("watch refused: {code}"));
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        return Err(format!(
                            "closed while watching ({})",
                            f.map_or(0, |f| u16::from(f.code))
                        ))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("while watching: {e}")),
                    None => return Err("eof while watching".into()),
                }
            }
            Ok(())
        };
        tokio::time::timeout(OPEN_TIMEOUT, acked)
            .await
            .unwrap_or_else(|_| Err("no presence reply within 5 s".into()))?;
        Ok::<Ws, String>(ws)
    };
    let mut ws = match setup.await {
        Ok(ws) => {
            run.c.ready.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send(Ok(()));
            ws
        }
        Err(e) => {
            run.c.failed.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send(Err(format!("{name}: {e}")));
            return;
        }
    };
    drop(ready);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let frame = match parse_frame(text.as_str()) {
                        Ok(f) => f,
                        Err(e) => {
                            run.c.misrouted.fetch_add(1, Ordering::Relaxed);
                            run.anomaly(format!("watcher {j}: unparsable frame ({e})"));
                            continue;
                        }
                    };
                    match frame.ty {
                        "presence_event" => {
                            let k = frame.user.as_deref().and_then(|u| run.user_index(u));
                            let p = k.and_then(|k| position.get(&k).copied());
                            match (k, p, frame.online) {
                                (Some(k), Some(p), Some(Online::One(online))) => {
                                    run.on_event(j, k, p, online, frame.ts, &mut last[p]);
                                }
                                _ => {
                                    run.c.misrouted.fetch_add(1, Ordering::Relaxed);
                                    run.anomaly(format!(
                                        "watcher {j}: event for {:?}, not watched here",
                                        frame.user
                                    ));
                                }
                            }
                        }
                        "error" => run.count_error(frame.code.as_deref().unwrap_or("")),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    if !run.closing.load(Ordering::Relaxed) {
                        run.c.watcher_lost.fetch_add(1, Ordering::Relaxed);
                        run.anomaly(format!("watcher {j}: connection lost"));
                    }
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    close(&mut ws).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_gives_every_user_its_watchers_on_the_watcher_instances_only() {
        let l = Layout::build(200, 20, 10, &[0, 1], 4);
        assert_eq!(l.placement.watches, 2000);
        for (k, w) in l.watchers_of.iter().enumerate() {
            assert_eq!(w.len(), 10, "user {k}");
            let mut distinct = w.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 10, "user {k}: {w:?}");
            let on: Vec<usize> = w.iter().map(|&j| l.watcher_target[j as usize]).collect();
            match k % 3 {
                0 => assert!(on.iter().all(|&i| i == 0), "user {k}: {on:?}"),
                1 => assert!(on.iter().all(|&i| i == 1), "user {k}: {on:?}"),
                _ => {
                    assert_eq!(on.iter().filter(|&&i| i == 0).count(), 5);
                    assert_eq!(on.iter().filter(|&&i| i == 1).count(), 5);
                }
            }
        }
        // 67 users on n1 only, 67 on n2 only, 66 on both.
        assert_eq!(l.placement.users_on_one_instance.get("0"), Some(&67));
        assert_eq!(l.placement.users_on_one_instance.get("1"), Some(&67));
        assert_eq!(l.placement.split_users, 66);
        assert_eq!(l.placement.watched_users_by_instance, [133, 133, 0, 0]);
        // watched_by is the transpose, each list ascending, at most 1000.
        let total: usize = l.watched_by.iter().map(Vec::len).sum();
        assert_eq!(total, 2000);
        for (j, users) in l.watched_by.iter().enumerate() {
            assert!(users.windows(2).all(|p| p[0] < p[1]), "watcher {j}");
            for &k in users {
                assert!(l.watchers_of[k as usize].contains(&(j as u32)));
            }
        }
        // A control: nobody watched.
        let none = Layout::build(10, 20, 0, &[0, 1], 4);
        assert_eq!(none.placement.watches, 0);
        assert!(none.watched_by.iter().all(Vec::is_empty));
        // One watcher instance: every user there.
        let one = Layout::build(10, 10, 10, &[2], 4);
        assert!(one.instances_of.iter().all(|i| i == &[2]));
    }

    #[test]
    fn quantiles_of_plain_values() {
        let q = quantiles_of_values((1..=100).map(f64::from).map(|v| v - 10.0).collect());
        assert_eq!(q.n, 100);
        assert_eq!(q.p50, Some(40.0));
        assert_eq!(q.p99, Some(89.0));
        assert_eq!(q.max, Some(90.0));
        assert_eq!(q.mean, Some(40.5));
        assert!(quantiles_of_values(Vec::new()).p50.is_none());
    }

    #[test]
    fn frames_of_the_spec() {
        let w = watch_frame("u", &[3, 7], 1);
        let v: serde_json::Value = serde_json::from_str(&w).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"type": "watch", "users": ["u3", "u7"], "id": 1})
        );
        let ack = parse_frame(r#"{"type":"presence","id":1,"online":{"u3":true,"u7":false}}"#)
            .expect("ack");
        assert_eq!((ack.ty, ack.id), ("presence", Some(1)));
        let Some(Online::Map(map)) = ack.online else {
            panic!("a map: {ack:?}")
        };
        assert_eq!(map.get("u3"), Some(&true));
        let ev = parse_frame(
            r#"{"type":"presence_event","user":"u3","online":false,"ts":1764633600123}"#,
        )
        .expect("event");
        assert_eq!(ev.ty, "presence_event");
        assert_eq!(ev.user.as_deref(), Some("u3"));
        assert_eq!(ev.online, Some(Online::One(false)));
        assert_eq!(ev.ts, Some(1_764_633_600_123.0));
        let err = parse_frame(r#"{"type":"error","id":1,"code":"limit_exceeded","message":"m"}"#)
            .expect("error");
        assert_eq!(err.code.as_deref(), Some("limit_exceeded"));
        assert!(parse_frame(r#"{"type":"welcome","user":"u1","instance":"n1"}"#).is_ok());
    }
}
