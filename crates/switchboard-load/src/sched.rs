//! The open-loop sender and the churn driver.
//!
//! Message i of a step is scheduled at `t0 + i / rate`; the scheduler wakes
//! about every millisecond, hands every message that is due to its sender's
//! connection task (a small `Copy` command over an unbounded channel: no
//! per-message task, no waiting for acks), and, when it has fallen behind,
//! sends in bursts until it has caught up. The scheduled time is what the
//! body carries, so loader lag counts as latency (no coordinated omission).
//! It stops at the end of the send phase plus a short grace; whatever is not
//! sent by then is reported (`sent` < offered, `send_rate`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::Rng;
use switchboard_bench_schema::Workload;
use tokio::sync::mpsc::UnboundedSender;

use crate::cli::SenderPick;
use crate::conn::{Cmd, U64Map};
use crate::state::{Shared, StepState, ST_UNSENT};
use crate::wire::{BodyFields, Kind};

/// Tries to find a connected sender before giving a message up.
const SENDER_TRIES: usize = 64;

/// Scheduler state that persists across steps.
pub struct Scheduler {
    /// The process-wide state.
    pub shared: Arc<Shared>,
    /// One command channel per connection slot.
    pub senders: Vec<UnboundedSender<Cmd>>,
    /// Sender, recipient, room and churn choices.
    pub rng: SmallRng,
    /// Next sequence number per (sender slot, stream), reset each step.
    pub seqs: U64Map<u32>,
    /// Round-robin cursor (`--sender round-robin`).
    pub rr: usize,
}

/// What the send phase did.
#[derive(Debug, Clone, Copy)]
pub struct SendOutcome {
    /// Messages handed to a connection.
    pub sent: u64,
    /// Messages scheduled in the phase.
    pub offered: u64,
    /// Seconds from the first scheduled send to the last actual one.
    pub send_elapsed_s: f64,
}

impl Scheduler {
    /// Runs the send phase of `step`: `step.msgs.len()` messages at `step.rate`.
    pub async fn send_phase(&mut self, step: &Arc<StepState>) -> SendOutcome {
        self.seqs.clear();
        let shared = self.shared.clone();
        let args = &shared.args;
        let total = step.msgs.len() as u64;
        let rate = step.rate;
        let ns_per_msg = 1e9 / rate;
        let t0 = shared.instant_at(step.t0_ns);
        // Grace after the send phase for a loader that fell behind: a quarter
        // of the drain, at most half a second, so the run stays bounded.
        let grace = (args.drain * 0.25).min(0.5);
        let hard_stop = t0 + Duration::from_secs_f64(step.duration + grace);
        // Largest burst before yielding to the connection tasks: 5 ms worth.
        let burst = ((rate * 0.005) as u64).max(64);
        let mut i: u64 = 0;
        let mut sent: u64 = 0;
        let mut last_send = t0;
        tokio::time::sleep_until(t0.into()).await;
        loop {
            let now = std::time::Instant::now();
            let elapsed_ns = now.saturating_duration_since(t0).as_nanos() as f64;
            let due = ((elapsed_ns / ns_per_msg) as u64 + 1).min(total);
            let mut k = 0;
            while i < due && k < burst {
                let sched_ns = step.t0_ns + (i as f64 * ns_per_msg) as u64;
                if self.dispatch(step, i, sched_ns) {
                    sent += 1;
                }
                i += 1;
                k += 1;
            }
            step.c.sent.store(sent, Ordering::Relaxed);
            if k > 0 {
                last_send = std::time::Instant::now();
            }
            if i >= total || shared.stop.load(Ordering::Relaxed) {
                break;
            }
            if now >= hard_stop {
                // Out of time: the rest is not offered (marked below).
                break;
            }
            if i < due {
                tokio::task::yield_now().await;
                continue;
            }
            let next = t0 + Duration::from_nanos((i as f64 * ns_per_msg) as u64);
            tokio::time::sleep_until(next.into()).await;
        }
        if i < total {
            // Stopped early (Ctrl-C or out of time): never offered.
            for j in i..total {
                step.msgs[j as usize]
                    .status
                    .store(ST_UNSENT, Ordering::Relaxed);
            }
        }
        SendOutcome {
            sent,
            offered: total,
            send_elapsed_s: last_send.saturating_duration_since(t0).as_secs_f64(),
        }
    }

    /// Picks sender and target of message `i` and hands it to the sender's
    /// connection. Returns false if no connected sender was found.
    fn dispatch(&mut self, step: &StepState, i: u64, sched_ns: u64) -> bool {
        let Scheduler {
            shared,
            senders,
            rng,
            seqs,
            rr,
        } = self;
        let args = &shared.args;
        let rec = &step.msgs[i as usize];
        let kind = match args.workload {
            // `connections` sends nothing and never reaches the scheduler;
            // `ingest` is refused by the command line.
            Workload::Dm
            | Workload::Churn
            | Workload::Connections
            | Workload::Presence
            | Workload::Ingest => Kind::Dm,
            Workload::Room => Kind::Room,
            Workload::Mixed => {
                if rng.random::<f64>() < args.room_share {
                    Kind::Room
                } else {
                    Kind::Dm
                }
            }
        };
        for _attempt in 0..3 {
            let picked = match kind {
                Kind::Dm => pick_dm(shared, rng, rr, step),
                Kind::Room => pick_room(shared, rng, step),
            };
            let Some((slot, target, stream, exp)) = picked else {
                break;
            };
            let key = (u64::from(slot) << 32) | u64::from(stream);
            let seq_ref = seqs.entry(key).or_insert(0);
            rec.target.store(stream, Ordering::Relaxed);
            rec.exp.store(exp, Ordering::Relaxed);
            let cmd = Cmd::Msg {
                kind,
                target,
                body: BodyFields {
                    step: step.no,
                    id: step.base_id + i,
                    ts_ns: sched_ns,
                    sender: slot,
                    seq: *seq_ref,
                },
            };
            // --no-ack: no ack will say it was routed, so it is expected at
            // send time (before the send: an error frame may take it back).
            if args.no_ack {
                step.c
                    .expected_live
                    .fetch_add(u64::from(exp), Ordering::Relaxed);
            }
            if senders[slot as usize].send(cmd).is_ok() {
                *seq_ref += 1;
                return true;
            }
            if args.no_ack {
                step.c
                    .expected_live
                    .fetch_sub(u64::from(exp), Ordering::Relaxed);
            }
            // The connection task is gone: never pick it again.
            shared.slots[slot as usize]
                .connected
                .store(false, Ordering::Release);
        }
        rec.status.store(ST_UNSENT, Ordering::Relaxed);
        step.c.not_sent.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Churn during the send phase of `step`: `rate` times per second, a
    /// random fully connected user has all its connections closed and reopened.
    pub async fn churn_phase(
        shared: Arc<Shared>,
        senders: Vec<UnboundedSender<Cmd>>,
        mut rng: SmallRng,
        step: Arc<StepState>,
        rate: f64,
    ) {
        let plan = &shared.plan;
        let t0 = shared.instant_at(step.t0_ns);
        let end = t0 + Duration::from_secs_f64(step.duration);
        let cpu = plan.cpu;
        let mut k: u64 = 0;
        loop {
            let at = t0 + Duration::from_secs_f64((k as f64 + 0.5) / rate);
            if at >= end || shared.stop.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            k += 1;
            let user = (0..SENDER_TRIES)
                .map(|_| rng.random_range(0..plan.users))
                .find(|&u| {
                    (0..cpu).all(|j| {
                        shared.slots[(u * cpu + j) as usize]
                            .connected
                            .load(Ordering::Acquire)
                    })
                });
            let Some(user) = user else {
                continue;
            };
            for j in 0..cpu {
                let _ = senders[(user * cpu + j) as usize].send(Cmd::Churn);
            }
        }
    }
}

/// A connected sender slot and a recipient: (slot, user, stream, expected).
fn pick_dm(
    shared: &Shared,
    rng: &mut SmallRng,
    rr: &mut usize,
    step: &StepState,
) -> Option<(u32, u32, u32, u32)> {
    let plan = &shared.plan;
    let n = plan.n_slots();
    let slot = match shared.args.sender {
        SenderPick::Random => (0..SENDER_TRIES)
            .map(|_| rng.random_range(0..n))
            .find(|&s| shared.slots[s].connected.load(Ordering::Acquire))?,
        SenderPick::RoundRobin => {
            let mut found = None;
            for _ in 0..n {
                let s = *rr;
                *rr = (*rr + 1) % n;
                if shared.slots[s].connected.load(Ordering::Acquire) {
                    found = Some(s);
                    break;
                }
            }
            found?
        }
    };
    let user = plan.user_of(slot as u32);
    let inst = plan.slot_inst[slot] as usize;
    let to = plan.pick_recipient(rng, user, inst, shared.args.locality);
    Some((slot as u32, to, to, step.user_conns[to as usize]))
}

/// A random room and a connected member slot: (slot, room, stream, expected).
fn pick_room(
    shared: &Shared,
    rng: &mut SmallRng,
    step: &StepState,
) -> Option<(u32, u32, u32, u32)> {
    let plan = &shared.plan;
    let r = rng.random_range(0..plan.rooms.len());
    let slots = &plan.rooms[r].slots;
    let slot = (0..SENDER_TRIES)
        .map(|_| slots[rng.random_range(0..slots.len())])
        .find(|&s| shared.slots[s as usize].connected.load(Ordering::Acquire))?;
    let exp = step.room_conns[r].saturating_sub(1);
    Some((slot, r as u32, plan.users + r as u32, exp))
}
