//! Turning a finished [`StepState`] into the [`StepResult`] the bench
//! orchestrator reads: counts, loss accounting (real losses vs. recipients
//! momentarily offline because of churn), latency quantiles, and the verdict
//! of the shared [`PassRule`]. Also the loader's own CPU time.
//!
//! The document's shape belongs to `switchboard-bench-schema`; this module
//! only fills it in.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::sched::SendOutcome;
use crate::state::{
    lock, Shared, StepState, ST_ABANDONED, ST_ERROR, ST_NONE, ST_OFFLINE, ST_OK, ST_ROUTED,
    ST_UNSENT,
};
use hdrhistogram::Histogram;
use switchboard_bench_schema::{Acks, Churn, Quantiles, RoomInfo, StepResult, Workload};

/// A lost DM counts as "recipient momentarily offline" when the recipient
/// was taken down by churn between its scheduled send time and this long
/// after its ack (the routed frame may still sit in the server's queue).
const CHURN_SLACK_NS: u64 = 100_000_000;

/// µs to ms, rounded to the µs.
fn ms(us: f64) -> f64 {
    us.round() / 1000.0
}

/// The quantiles of a histogram of µs values, in ms (all `None` when empty).
pub fn quantiles_of(h: &Histogram<u64>) -> Quantiles {
    if h.is_empty() {
        return Quantiles::default();
    }
    let q = |x: f64| Some(ms(h.value_at_quantile(x) as f64));
    Quantiles {
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        max: Some(ms(h.max() as f64)),
        mean: Some(ms(h.mean())),
        n: h.len(),
    }
}

/// Everything the summary needs besides the step itself.
pub struct StepContext<'a> {
    /// Process state.
    pub shared: &'a Shared,
    /// What the send phase did.
    pub outcome: SendOutcome,
    /// Step wall time, s.
    pub elapsed_s: f64,
    /// Step CPU, s.
    pub cpu_s: f64,
    /// The initial connect phase.
    pub initial_connect: &'a Quantiles,
    /// Connections open at step start.
    pub connections: u64,
}

/// Summarizes a finished step.
pub fn summarize(step: &StepState, ctx: &StepContext<'_>) -> StepResult {
    let shared = ctx.shared;
    let args = &shared.args;
    let plan = &shared.plan;
    let c = &step.c;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let churn_mode = args.workload == Workload::Churn;

    // Churn windows per user, including connections still down now.
    let mut windows: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
    for &(u, a, b) in lock(&step.churn_windows).iter() {
        windows.entry(u).or_default().push((a, b));
    }
    for (s, st) in shared.slots.iter().enumerate() {
        let down = st.down_since.load(Ordering::Acquire);
        if down != 0 {
            windows
                .entry(plan.user_of(s as u32))
                .or_default()
                .push((down, u64::MAX));
        }
    }

    let ns_per_msg = 1e9 / step.rate;
    let (mut expected, mut lost, mut churn_lost, mut unexpected, mut unacked) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    // Deliveries if every sent message had been routed (the peer's "offered").
    let mut nominal = 0u64;
    for (i, rec) in step.msgs.iter().enumerate() {
        let st = rec.status.load(Ordering::Relaxed);
        if st == ST_UNSENT {
            continue;
        }
        let del = u64::from(rec.delivered.load(Ordering::Relaxed));
        let exp_ok = u64::from(rec.exp.load(Ordering::Relaxed));
        nominal += exp_ok;
        let exp = match st {
            ST_ROUTED | ST_OK => exp_ok,
            // With --no-ack no ack is asked for: expected as if routed.
            ST_NONE => {
                unacked += u64::from(!args.no_ack);
                exp_ok
            }
            ST_ABANDONED => del.min(exp_ok),
            ST_OFFLINE | ST_ERROR => 0,
            _ => 0,
        };
        expected += exp;
        if del < exp {
            let missing = exp - del;
            let target = rec.target.load(Ordering::Relaxed);
            let sched = step.t0_ns + (i as f64 * ns_per_msg) as u64;
            let acked_at = match rec.ack_us.load(Ordering::Relaxed) {
                0 => u64::MAX,
                us => u64::from(us) * 1000,
            };
            let affected = churn_mode
                && target < plan.users
                && windows.get(&target).is_some_and(|ws| {
                    ws.iter()
                        .any(|&(a, b)| a <= acked_at.saturating_add(CHURN_SLACK_NS) && b >= sched)
                });
            if affected {
                churn_lost += missing;
            } else {
                lost += missing;
            }
        } else {
            unexpected += del - exp;
        }
    }

    let hists = lock(&step.hists);
    let latency = quantiles_of(&hists.latency);
    let ack_latency = quantiles_of(&hists.ack);
    let lag = quantiles_of(&hists.lag);
    let connect = if churn_mode {
        quantiles_of(&hists.connect)
    } else {
        ctx.initial_connect.clone()
    };
    drop(hists);

    let acks = Acks {
        routed: load(&c.acks_routed),
        offline: load(&c.acks_offline),
        ok: load(&c.acks_ok),
        error: load(&c.acks_error),
    };
    let acked = acks.routed + acks.offline + acks.ok + acks.error;
    let sent = load(&c.sent);
    let delivered = load(&c.delivered);
    let disconnects = load(&c.disconnects);
    let misrouted = load(&c.misrouted);
    let offered = ctx.outcome.offered;
    // Pass-rule denominator. Without churn every user is online, so an
    // `offline` ack or an error is a failure too: count every sent message as
    // if routed (what the Socket.IO peer does: delivered / offered). With
    // churn, `offline` acks and deliveries missed because the recipient was
    // being reconnected are excused.
    let denominator = if churn_mode {
        expected.saturating_sub(churn_lost)
    } else {
        nominal
    };
    let delivery_ratio = (denominator > 0).then(|| delivered as f64 / denominator as f64);

    let duration = step.duration;
    let send_window = duration.max(ctx.outcome.send_elapsed_s);
    let mut anomalies = lock(&step.anomalies).clone();
    anomalies.extend(lock(&shared.anomalies).iter().cloned());
    anomalies.truncate(20);
    let mut result = StepResult {
        workload: args.workload,
        users: args.users,
        conns_per_user: args.conns_per_user,
        targets: shared.targets.iter().map(|t| t.display.clone()).collect(),
        rate_offered: round3(step.rate),
        duration_s: duration,
        body_bytes: args.body_bytes,
        locality: args.locality,
        sent,
        acked,
        acks,
        expected,
        delivered,
        lost,
        duplicated: load(&c.duplicated),
        out_of_order: load(&c.out_of_order),
        send_rate: round3(sent as f64 / send_window),
        delivered_per_sec: round3(delivered as f64 / duration),
        latency_ms: latency,
        ack_latency_ms: ack_latency,
        connect_ms: connect,
        churn: Churn {
            reconnects: load(&c.reconnects),
            offline_during_churn: churn_lost,
            disconnects: load(&c.churn_events),
            reconnect_failures: load(&c.reconnect_failures),
            acked_offline: if churn_mode { load(&c.acks_offline) } else { 0 },
            sender_abandoned: load(&c.abandoned),
        },
        elapsed_s: round3(ctx.elapsed_s),
        loader_cpu_s: round3(ctx.cpu_s),
        // Set below, from the finished result.
        pass: false,
        step: step.no,
        fail_reasons: Vec::new(),
        offered,
        not_sent: offered - sent,
        unacked,
        delivery_ratio: delivery_ratio.map(|r| (r * 1e6).round() / 1e6),
        errors_without_id: load(&c.errors_without_id),
        unexpected_deliveries: unexpected,
        misrouted,
        wrong_from: load(&c.wrong_from),
        stale: load(&c.stale),
        unparsed: load(&c.unparsed),
        disconnects,
        send_lag_ms: lag,
        loader_cpu_cores: if ctx.elapsed_s > 0.0 {
            round3(ctx.cpu_s / ctx.elapsed_s)
        } else {
            0.0
        },
        connections: ctx.connections,
        errors: lock(&step.errors).clone(),
        anomalies,
        rooms: args.workload.uses_rooms().then(|| RoomInfo {
            rooms: args.rooms,
            room_members: args.room_members,
            room_spread: args.room_spread.unwrap_or(shared.targets.len() as u32),
            room_share: if args.workload == Workload::Room {
                1.0
            } else {
                args.room_share
            },
        }),
        churn_rate: churn_mode.then_some(args.churn_rate),
    };
    // The verdict reads the result as written, exactly as the benchmark will.
    result.fail_reasons = args.pass_rule().failures(&result);
    result.pass = result.fail_reasons.is_empty();
    result
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// This process's CPU time (user + system, all threads), seconds; 0 if
/// `/proc/self/stat` cannot be read.
pub fn cpu_seconds() -> f64 {
    match procfs::process::Process::myself().and_then(|me| me.stat()) {
        Ok(stat) => (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64,
        Err(_) => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_readable() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds() >= 0.0);
    }

    #[test]
    fn quantiles_in_ms() {
        let mut h = crate::state::new_hist();
        for v in 1..=1000u64 {
            h.saturating_record(v * 10);
        }
        let q = quantiles_of(&h);
        assert_eq!(q.n, 1000);
        assert!((q.p50.unwrap_or(0.0) - 5.0).abs() < 0.01);
        assert!((q.max.unwrap_or(0.0) - 10.0).abs() < 0.01);
        assert!(quantiles_of(&crate::state::new_hist()).p99.is_none());
    }
}
