//! Turning a finished [`StepState`] into the JSON the bench orchestrator
//! parses: counts, loss accounting (real losses vs. recipients momentarily
//! offline because of churn), latency quantiles, and the pass rule. Also the
//! loader's own CPU time from `/proc/self/stat`.
//!
//! The key names of [`StepResult`] and [`FindMax`] up to `pass` are a
//! contract; the fields after it are extra detail.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::Workload;
use crate::sched::SendOutcome;
use crate::state::{
    lock, Shared, StepState, ST_ABANDONED, ST_ERROR, ST_NONE, ST_OFFLINE, ST_OK, ST_ROUTED,
    ST_UNSENT,
};

/// A lost DM counts as "recipient momentarily offline" when the recipient
/// was taken down by churn between its scheduled send time and this long
/// after its ack (the routed frame may still sit in the server's queue).
const CHURN_SLACK_NS: u64 = 100_000_000;

/// Latency quantiles in milliseconds (null when nothing was recorded).
#[derive(Debug, Clone, Serialize)]
pub struct Quantiles {
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// 99.9th percentile.
    pub p999: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
    /// Mean.
    pub mean: Option<f64>,
    /// Number of values.
    pub n: u64,
}

/// µs to ms, rounded to the µs.
fn ms(us: f64) -> f64 {
    us.round() / 1000.0
}

impl Quantiles {
    /// From a histogram of µs values.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Quantiles {
                p50: None,
                p90: None,
                p99: None,
                p999: None,
                max: None,
                mean: None,
                n: 0,
            };
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
}

/// Acks by status.
#[derive(Debug, Clone, Serialize)]
pub struct Acks {
    /// DM acked `routed`.
    pub routed: u64,
    /// DM acked `offline`.
    pub offline: u64,
    /// Room message acked `ok`.
    pub ok: u64,
    /// Answered with an error frame.
    pub error: u64,
}

/// Churn figures.
#[derive(Debug, Clone, Serialize)]
pub struct Churn {
    /// Successful reconnects.
    pub reconnects: u64,
    /// Expected deliveries missing because the recipient was churned around
    /// the send (not counted in `lost`).
    pub offline_during_churn: u64,
    /// Disconnects performed.
    pub disconnects: u64,
    /// Reconnects that failed.
    pub reconnect_failures: u64,
    /// DMs acked `offline` (the recipient was down when routed).
    pub acked_offline: u64,
    /// Messages whose sender was disconnected before their ack arrived
    /// (counted as expected only as far as they were delivered).
    pub sender_abandoned: u64,
}

/// One run / one find-max step.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// Workload name.
    pub workload: &'static str,
    /// Users.
    pub users: u32,
    /// Connections per user.
    pub conns_per_user: u32,
    /// Targets as given.
    pub targets: Vec<String>,
    /// Offered rate, messages/s.
    pub rate_offered: f64,
    /// Send-phase length, s.
    pub duration_s: f64,
    /// Body size, bytes.
    pub body_bytes: usize,
    /// `--locality` (null: uniform recipients).
    pub locality: Option<f64>,
    /// Messages sent.
    pub sent: u64,
    /// Acks and error answers received.
    pub acked: u64,
    /// By status.
    pub acks: Acks,
    /// Expected deliveries.
    pub expected: u64,
    /// Unique deliveries.
    pub delivered: u64,
    /// Expected but not delivered after the drain (churn-offline excluded).
    pub lost: u64,
    /// Repeated deliveries of a message to one connection.
    pub duplicated: u64,
    /// Deliveries that arrived after a later message of the same stream.
    pub out_of_order: u64,
    /// Actual send rate, messages/s.
    pub send_rate: f64,
    /// delivered / duration_s.
    pub delivered_per_sec: f64,
    /// End-to-end latency from the scheduled send time.
    pub latency_ms: Quantiles,
    /// Ack latency from the actual send time.
    pub ack_latency_ms: Quantiles,
    /// Churn reconnect latency (churn workload), else the initial connect phase.
    pub connect_ms: Quantiles,
    /// Churn figures.
    pub churn: Churn,
    /// Wall time of the step (send phase + drain), s.
    pub elapsed_s: f64,
    /// Loader CPU time (user + system) during the step, s.
    pub loader_cpu_s: f64,
    /// The pass rule.
    pub pass: bool,
    // ---- extra detail ----
    /// Step number.
    pub step: u32,
    /// Why the step failed.
    pub fail_reasons: Vec<String>,
    /// Messages scheduled (rate x duration).
    pub offered: u64,
    /// Scheduled but not sent (no connected sender, or out of time).
    pub not_sent: u64,
    /// Sent but never acked (0 with `--no-ack`).
    pub unacked: u64,
    /// The pass rule's ratio: delivered / (every sent message's deliveries
    /// as if routed); churn: delivered / (expected - offline_during_churn).
    pub delivery_ratio: Option<f64>,
    /// Error frames without an id (attributed to the oldest unanswered message).
    pub errors_without_id: u64,
    /// Deliveries beyond the expected ones (e.g. for an `offline` ack).
    pub unexpected_deliveries: u64,
    /// Deliveries to a connection that is not the recipient / a member.
    pub misrouted: u64,
    /// Deliveries whose `from` is not the sending user.
    pub wrong_from: u64,
    /// Acks / deliveries of an earlier step that arrived late.
    pub stale: u64,
    /// Frames the loader could not parse.
    pub unparsed: u64,
    /// Connections lost (server close or error) during the step.
    pub disconnects: u64,
    /// Actual minus scheduled send time (loader lag).
    pub send_lag_ms: Quantiles,
    /// Loader CPU in cores (loader_cpu_s / elapsed_s).
    pub loader_cpu_cores: f64,
    /// Connections open at the start of the step.
    pub connections: u64,
    /// Error codes answered to our messages.
    pub errors: BTreeMap<String, u64>,
    /// The first few odd things seen.
    pub anomalies: Vec<String>,
    /// Rooms (room workloads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<RoomInfo>,
    /// `--churn-rate` (churn workload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn_rate: Option<f64>,
}

/// Room parameters of a room workload.
#[derive(Debug, Clone, Serialize)]
pub struct RoomInfo {
    /// Rooms.
    pub rooms: u32,
    /// Members per room.
    pub room_members: u32,
    /// Instances a room's members are homed on.
    pub room_spread: u32,
    /// Share of room messages (mixed).
    pub room_share: f64,
}

/// `--find-max` output.
#[derive(Debug, Clone, Serialize)]
pub struct FindMax {
    /// Always "find-max".
    pub mode: &'static str,
    /// The pass rule in words.
    pub rule: String,
    /// Every step, in order.
    pub steps: Vec<StepResult>,
    /// Offered rate of the highest passing step (null: none passed).
    pub max_sustained_rate: Option<f64>,
    // ---- extra detail ----
    /// Whole-run wall time, s.
    pub elapsed_s: f64,
    /// Whole-run loader CPU, s.
    pub loader_cpu_s: f64,
    /// The initial connect phase.
    pub initial_connect_ms: Quantiles,
    /// Connections that failed to open in the connect phase.
    pub connect_failures: u64,
    /// `--no-ack`: messages sent with `"ack":false`.
    pub no_ack: bool,
}

/// The pass rule in words.
pub fn rule_text(min_delivery: f64, max_p99_ms: f64) -> String {
    let pct = round3(min_delivery * 100.0);
    format!(
        "delivered>={pct}% of expected and p99<={max_p99_ms}ms (expected: every sent message as if \
         routed, except under churn; also: sent>={pct}% of offered, errors<={}% of sent, \
         no lost connections, nothing misrouted)",
        round3(100.0 - pct)
    )
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
    let latency = Quantiles::of(&hists.latency);
    let ack_latency = Quantiles::of(&hists.ack);
    let lag = Quantiles::of(&hists.lag);
    let connect = if churn_mode {
        Quantiles::of(&hists.connect)
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

    let mut fail_reasons = Vec::new();
    match delivery_ratio {
        None => fail_reasons.push("no deliveries were expected".to_owned()),
        Some(r) if r < args.min_delivery => fail_reasons.push(format!(
            "delivered {delivered} of {denominator} expected ({:.2}%)",
            r * 100.0
        )),
        Some(_) => {}
    }
    match latency.p99 {
        None => fail_reasons.push("no latency recorded".to_owned()),
        Some(p) if p > args.max_p99_ms => {
            fail_reasons.push(format!("p99 {p} ms > {} ms", args.max_p99_ms))
        }
        Some(_) => {}
    }
    if (sent as f64) < args.min_delivery * offered as f64 {
        fail_reasons.push(format!("sent only {sent} of {offered} offered messages"));
    }
    if acks.error > 0 && acks.error as f64 > (1.0 - args.min_delivery) * sent as f64 {
        fail_reasons.push(format!("{} messages answered with an error", acks.error));
    }
    if disconnects > 0 {
        fail_reasons.push(format!("{disconnects} connections lost"));
    }
    if misrouted > 0 {
        fail_reasons.push(format!("{misrouted} deliveries misrouted"));
    }

    let duration = step.duration;
    let send_window = duration.max(ctx.outcome.send_elapsed_s);
    let mut anomalies = lock(&step.anomalies).clone();
    anomalies.extend(lock(&shared.anomalies).iter().cloned());
    anomalies.truncate(20);
    StepResult {
        workload: args.workload.name(),
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
        pass: fail_reasons.is_empty(),
        step: step.no,
        fail_reasons,
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
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// This process's CPU time (user + system), seconds, from /proc/self/stat.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after "(comm)": state is field 3; utime 14, stime 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |k: usize| {
        fields
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (tick(11) + tick(12)) as f64 / clock_ticks() as f64
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t: &u64| t > 0)
            .unwrap_or(100)
    })
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
        let q = Quantiles::of(&h);
        assert_eq!(q.n, 1000);
        assert!((q.p50.unwrap_or(0.0) - 5.0).abs() < 0.01);
        assert!((q.max.unwrap_or(0.0) - 10.0).abs() < 0.01);
        assert!(Quantiles::of(&crate::state::new_hist()).p99.is_none());
    }
}
