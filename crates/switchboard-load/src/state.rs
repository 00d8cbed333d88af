//! Shared state: what every connection task and the scheduler read and write
//! while a run is in progress. [`Shared`] lives for the whole process
//! (settings, plan, per-slot liveness, the clock base, the current step);
//! [`StepState`] lives for one measured run (or one `--find-max` step, or one
//! warmup): a record per message (ack status, deliveries), atomic counters and
//! the histograms. No per-message allocation: the message records are one
//! preallocated vector indexed by `id - base_id`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::cli::{Args, Target};
use crate::plan::Plan;

/// Ack status of a message: no ack (yet).
pub const ST_NONE: u8 = 0;
/// Acked `routed` (DM).
pub const ST_ROUTED: u8 = 1;
/// Acked `offline` (DM).
pub const ST_OFFLINE: u8 = 2;
/// Acked `ok` (room).
pub const ST_OK: u8 = 3;
/// Answered with an error frame.
pub const ST_ERROR: u8 = 4;
/// Its sender was disconnected by churn before the ack came.
pub const ST_ABANDONED: u8 = 5;
/// Never handed to a connection (no connected sender).
pub const ST_UNSENT: u8 = 6;

/// Largest latency recorded, µs (larger values saturate).
const HIST_MAX_US: u64 = 3_600_000_000;

/// Locks a mutex, ignoring poisoning (a panicked task cannot corrupt counters).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A histogram of µs values, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Liveness of one connection slot.
#[derive(Debug, Default)]
pub struct SlotState {
    /// Connected (welcome received, rooms joined) and usable as a sender.
    pub connected: AtomicBool,
    /// When churn took it down (ns since start), 0 while up.
    pub down_since: AtomicU64,
}

/// Process-wide state.
#[derive(Debug)]
pub struct Shared {
    /// The clock base: every timestamp is ns since this instant.
    pub start: Instant,
    /// The command line.
    pub args: Args,
    /// Where to connect.
    pub targets: Vec<Target>,
    /// Placement and rooms.
    pub plan: Plan,
    /// Per connection slot.
    pub slots: Vec<SlotState>,
    /// The step deliveries and acks are currently counted for.
    pub current: Mutex<Option<Arc<StepState>>>,
    /// Set on Ctrl-C: stop sending.
    pub stop: AtomicBool,
    /// Set when the loader closes its connections (closes are then expected).
    pub closing: AtomicBool,
    /// Connections currently reconnecting after churn.
    pub reconnecting: AtomicU32,
    /// Latency of the initial connect phase (TCP connect to welcome), µs.
    pub initial_connect: Mutex<Histogram<u64>>,
    /// Anything odd the server said outside a step (first few).
    pub anomalies: Mutex<Vec<String>>,
}

impl Shared {
    /// A new shared state.
    pub fn new(args: Args, targets: Vec<Target>, plan: Plan) -> Self {
        let slots = (0..plan.n_slots()).map(|_| SlotState::default()).collect();
        Shared {
            start: Instant::now(),
            args,
            targets,
            plan,
            slots,
            current: Mutex::new(None),
            stop: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            reconnecting: AtomicU32::new(0),
            initial_connect: Mutex::new(new_hist()),
            anomalies: Mutex::new(Vec::new()),
        }
    }

    /// ns since the start instant.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// The instant `ns` after start.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }

    /// The current step, if any.
    pub fn current_step(&self) -> Option<Arc<StepState>> {
        lock(&self.current).clone()
    }

    /// Records an anomaly: into the current step if there is one, else globally.
    pub fn anomaly(&self, text: String) {
        match self.current_step() {
            Some(step) => step.anomaly(text),
            None => push_capped(&mut lock(&self.anomalies), text),
        }
    }
}

fn push_capped(list: &mut Vec<String>, text: String) {
    if list.len() < 20 {
        list.push(text);
    }
}

/// What the loader knows about one message of a step.
#[derive(Debug, Default)]
pub struct MsgRec {
    /// One of the `ST_*` constants.
    pub status: AtomicU8,
    /// Unique deliveries (duplicates excluded).
    pub delivered: AtomicU32,
    /// Deliveries expected if the ack is routed/ok (recipient or other member connections).
    pub exp: AtomicU32,
    /// Stream: recipient user (DM) or users + room (room message).
    pub target: AtomicU32,
    /// When the ack arrived, µs since start.
    pub ack_us: AtomicU32,
}

/// Atomic counters of a step.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to a connection.
    pub sent: AtomicU64,
    /// Messages with no connected sender (not sent).
    pub not_sent: AtomicU64,
    /// Acks by status.
    pub acks_routed: AtomicU64,
    /// ...
    pub acks_offline: AtomicU64,
    /// ...
    pub acks_ok: AtomicU64,
    /// Error frames answering one of our messages.
    pub acks_error: AtomicU64,
    /// Error frames without an id (attributed to the oldest unanswered message).
    pub errors_without_id: AtomicU64,
    /// Messages whose sender was churned before the ack.
    pub abandoned: AtomicU64,
    /// Sum of expected deliveries over the acks seen so far (drain target).
    pub expected_live: AtomicU64,
    /// Unique deliveries.
    pub delivered: AtomicU64,
    /// Deliveries seen before on the same connection.
    pub duplicated: AtomicU64,
    /// Deliveries with a lower sequence than one already seen on that stream.
    pub out_of_order: AtomicU64,
    /// Deliveries to a connection that is not the recipient / not a member.
    pub misrouted: AtomicU64,
    /// Deliveries whose `from` does not name the sending user.
    pub wrong_from: AtomicU64,
    /// Deliveries and acks belonging to an earlier step.
    pub stale: AtomicU64,
    /// Frames the loader could not parse or did not expect.
    pub unparsed: AtomicU64,
    /// Connections the server closed (or that failed) during the step.
    pub disconnects: AtomicU64,
    /// Churn: disconnects requested.
    pub churn_events: AtomicU64,
    /// Churn: successful reconnects.
    pub reconnects: AtomicU64,
    /// Churn: reconnects that failed.
    pub reconnect_failures: AtomicU64,
}

/// Histograms of a step (µs).
#[derive(Debug)]
pub struct Hists {
    /// End-to-end latency: delivery time - scheduled send time.
    pub latency: Histogram<u64>,
    /// Ack time - actual send time.
    pub ack: Histogram<u64>,
    /// Actual send time - scheduled send time (loader lag).
    pub lag: Histogram<u64>,
    /// Reconnect latency (churn): TCP connect to welcome.
    pub connect: Histogram<u64>,
}

/// One measured run (or find-max step, or warmup).
#[derive(Debug)]
pub struct StepState {
    /// Step number (carried in bodies).
    pub no: u32,
    /// Offered rate, messages/s.
    pub rate: f64,
    /// Send-phase length, s.
    pub duration: f64,
    /// Id of message 0.
    pub base_id: u64,
    /// Scheduled time of message 0, ns since start.
    pub t0_ns: u64,
    /// One record per scheduled message.
    pub msgs: Vec<MsgRec>,
    /// Live connections per user at step start.
    pub user_conns: Vec<u32>,
    /// Live member connections per room at step start.
    pub room_conns: Vec<u32>,
    /// Counters.
    pub c: Counters,
    /// Histograms.
    pub hists: Mutex<Hists>,
    /// Error codes answered to our messages.
    pub errors: Mutex<BTreeMap<String, u64>>,
    /// Churn windows: (user, down at, up again at (u64::MAX: never)), ns since start.
    pub churn_windows: Mutex<Vec<(u32, u64, u64)>>,
    /// Odd things seen (first few), for the report.
    pub anomalies: Mutex<Vec<String>>,
    /// Set when the step is over (progress reporting stops).
    pub done: AtomicBool,
}

impl StepState {
    /// A step of `total` messages.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: &Shared,
        no: u32,
        rate: f64,
        duration: f64,
        base_id: u64,
        t0_ns: u64,
        total: usize,
    ) -> Self {
        let plan = &shared.plan;
        let mut user_conns = vec![0u32; plan.users as usize];
        for (s, st) in shared.slots.iter().enumerate() {
            if st.connected.load(Ordering::Relaxed) {
                user_conns[plan.user_of(s as u32) as usize] += 1;
            }
        }
        let room_conns = plan
            .rooms
            .iter()
            .map(|r| {
                r.slots
                    .iter()
                    .filter(|&&s| shared.slots[s as usize].connected.load(Ordering::Relaxed))
                    .count() as u32
            })
            .collect();
        StepState {
            no,
            rate,
            duration,
            base_id,
            t0_ns,
            msgs: (0..total).map(|_| MsgRec::default()).collect(),
            user_conns,
            room_conns,
            c: Counters::default(),
            hists: Mutex::new(Hists {
                latency: new_hist(),
                ack: new_hist(),
                lag: new_hist(),
                connect: new_hist(),
            }),
            errors: Mutex::new(BTreeMap::new()),
            churn_windows: Mutex::new(Vec::new()),
            anomalies: Mutex::new(Vec::new()),
            done: AtomicBool::new(false),
        }
    }

    /// The record of message `id`, if it belongs to this step.
    pub fn msg(&self, id: u64) -> Option<&MsgRec> {
        id.checked_sub(self.base_id)
            .and_then(|i| self.msgs.get(usize::try_from(i).ok()?))
    }

    /// Whether `id` belongs to this step.
    pub fn owns(&self, id: u64) -> bool {
        self.msg(id).is_some()
    }

    /// Records an anomaly (first few kept).
    pub fn anomaly(&self, text: String) {
        push_capped(&mut lock(&self.anomalies), text);
    }

    /// Acks seen so far (all statuses) plus abandoned messages.
    pub fn settled(&self) -> u64 {
        let c = &self.c;
        c.acks_routed.load(Ordering::Relaxed)
            + c.acks_offline.load(Ordering::Relaxed)
            + c.acks_ok.load(Ordering::Relaxed)
            + c.acks_error.load(Ordering::Relaxed)
            + c.abandoned.load(Ordering::Relaxed)
    }
}
