//! Turning raw readings into the numbers the benchmark reports: the loader's
//! JSON read leniently into steps, and the per-message costs computed from a
//! before/after pair of snapshots (CPU per delivered message, Redis bytes and
//! commands per message, bus messages received per instance per message),
//! plus the pass verdict under the Socket.IO peer's rule.
//!
//! Pure functions over data: no I/O here, so every formula is unit-tested.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::openmetrics;
use crate::snapshot::Snapshot;

/// The fields of one loader run (or one find-max step) that the benchmark uses.
/// Absent numbers read as 0 (latencies as `None`) and are listed in `missing`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadStep {
    /// Offered rate, messages/s.
    pub rate_offered: f64,
    /// Messages sent.
    pub sent: f64,
    /// Messages acknowledged by the server.
    pub acked: f64,
    /// Acks that reported an error.
    pub ack_errors: f64,
    /// Deliveries expected (one per DM; the fan-out for rooms).
    pub expected: f64,
    /// Deliveries received.
    pub delivered: f64,
    /// Expected deliveries never received.
    pub lost: f64,
    /// Deliveries received more than once.
    pub duplicated: f64,
    /// Deliveries received out of order.
    pub out_of_order: f64,
    /// Deliveries per second over the step.
    pub delivered_per_sec: f64,
    /// Achieved send rate.
    pub send_rate: f64,
    /// Send-to-receive latency percentiles, ms.
    pub p50_ms: Option<f64>,
    /// 90th percentile, ms.
    pub p90_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile, ms.
    pub p999_ms: Option<f64>,
    /// Largest latency, ms.
    pub max_ms: Option<f64>,
    /// Wall time of the step as the loader measured it, s.
    pub elapsed_s: f64,
    /// The loader's own CPU time, s.
    pub loader_cpu_s: Option<f64>,
    /// The loader's own pass verdict.
    pub pass: Option<bool>,
    /// Beyond the contract (read when present): messages scheduled.
    pub offered: Option<f64>,
    /// Beyond the contract: deliveries to the wrong connection.
    pub misrouted: Option<f64>,
    /// Beyond the contract: connections lost during the step.
    pub disconnects: Option<f64>,
    /// Beyond the contract: the loader's delivered / expected (it discounts churn-offline users).
    pub loader_delivery_ratio: Option<f64>,
    /// Beyond the contract: why the loader failed the step.
    pub fail_reasons: Vec<String>,
    /// Fields of the contract the loader did not write.
    pub missing: Vec<String>,
}

/// The loader's whole output.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Whether it was a `--find-max` ladder.
    pub find_max: bool,
    /// One step for a plain run; the ladder for find-max.
    pub steps: Vec<LoadStep>,
    /// find-max: the highest rate the loader judged sustained.
    pub max_sustained_rate: Option<f64>,
}

fn num(v: &Value, path: &[&str], missing: &mut Vec<String>) -> Option<f64> {
    let mut cur = v;
    for key in path {
        match cur.get(key) {
            Some(next) => cur = next,
            None => {
                missing.push(path.join("."));
                return None;
            }
        }
    }
    match cur {
        Value::Number(n) => n.as_f64(),
        Value::Null => None,
        _ => {
            missing.push(format!("{} (not a number)", path.join(".")));
            None
        }
    }
}

/// Reads one run object of the loader's JSON contract.
pub fn parse_step(v: &Value) -> LoadStep {
    let mut missing = Vec::new();
    let mut n = |path: &[&str]| num(v, path, &mut missing);
    let step = LoadStep {
        rate_offered: n(&["rate_offered"]).unwrap_or(0.0),
        sent: n(&["sent"]).unwrap_or(0.0),
        acked: n(&["acked"]).unwrap_or(0.0),
        ack_errors: n(&["acks", "error"]).unwrap_or(0.0),
        expected: n(&["expected"]).unwrap_or(0.0),
        delivered: n(&["delivered"]).unwrap_or(0.0),
        lost: n(&["lost"]).unwrap_or(0.0),
        duplicated: n(&["duplicated"]).unwrap_or(0.0),
        out_of_order: n(&["out_of_order"]).unwrap_or(0.0),
        delivered_per_sec: n(&["delivered_per_sec"]).unwrap_or(0.0),
        send_rate: n(&["send_rate"]).unwrap_or(0.0),
        p50_ms: n(&["latency_ms", "p50"]),
        p90_ms: n(&["latency_ms", "p90"]),
        p99_ms: n(&["latency_ms", "p99"]),
        p999_ms: n(&["latency_ms", "p999"]),
        max_ms: n(&["latency_ms", "max"]),
        elapsed_s: n(&["elapsed_s"]).unwrap_or(0.0),
        loader_cpu_s: n(&["loader_cpu_s"]),
        pass: None,
        offered: v.get("offered").and_then(Value::as_f64),
        misrouted: v.get("misrouted").and_then(Value::as_f64),
        disconnects: v.get("disconnects").and_then(Value::as_f64),
        loader_delivery_ratio: v.get("delivery_ratio").and_then(Value::as_f64),
        fail_reasons: v
            .get("fail_reasons")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        missing: Vec::new(),
    };
    let pass = match v.get("pass") {
        Some(Value::Bool(b)) => Some(*b),
        _ => {
            missing.push("pass".into());
            None
        }
    };
    LoadStep {
        pass,
        missing,
        ..step
    }
}

/// Reads the loader's output: a plain run, or `{"mode":"find-max","steps":[..],"max_sustained_rate"}`.
pub fn parse_loader(v: &Value) -> Result<LoadResult, String> {
    if !v.is_object() {
        return Err("loader output is not a JSON object".into());
    }
    if let Some(steps) = v.get("steps") {
        let steps = steps
            .as_array()
            .ok_or_else(|| "\"steps\" is not an array".to_owned())?;
        return Ok(LoadResult {
            find_max: true,
            steps: steps.iter().map(parse_step).collect(),
            max_sustained_rate: v.get("max_sustained_rate").and_then(Value::as_f64),
        });
    }
    Ok(LoadResult {
        find_max: false,
        steps: vec![parse_step(v)],
        max_sustained_rate: None,
    })
}

impl LoadResult {
    /// The step the table reports: the only one of a plain run; for find-max the
    /// passing step at the max sustained rate (else the last passing, else the last).
    pub fn headline(&self) -> Option<&LoadStep> {
        if !self.find_max {
            return self.steps.first();
        }
        let passing = |s: &&LoadStep| s.pass.unwrap_or(false);
        self.max_sustained_rate
            .and_then(|r| {
                self.steps
                    .iter()
                    .filter(passing)
                    .rfind(|s| (s.rate_offered - r).abs() < 0.5)
            })
            .or_else(|| self.steps.iter().rfind(passing))
            .or_else(|| self.steps.last())
    }
}

/// The pass rule of the Socket.IO peer benchmark, applied to one step:
/// delivered/expected and sent/offered (the peer divides deliveries by
/// scheduled sends) >= `min_delivery`, p99 < `max_p99_ms`, nothing misrouted
/// or duplicated, no disconnects. The last three are checked when the loader
/// reports them. Returns the failed conditions (empty: pass).
pub fn peer_rule_failures(step: &LoadStep, min_delivery: f64, max_p99_ms: f64) -> Vec<String> {
    let mut failures = Vec::new();
    let ratio = delivery_ratio(step);
    if ratio < min_delivery {
        failures.push(format!(
            "delivery {:.2}% < {:.2}%",
            ratio * 100.0,
            min_delivery * 100.0
        ));
    }
    if let Some(offered) = step.offered.filter(|o| *o > 0.0) {
        let sent_ratio = step.sent / offered;
        if sent_ratio < min_delivery {
            failures.push(format!(
                "sent {:.2}% of offered < {:.2}%",
                sent_ratio * 100.0,
                min_delivery * 100.0
            ));
        }
    }
    match step.p99_ms {
        Some(p99) if p99 < max_p99_ms => {}
        Some(p99) => failures.push(format!("p99 {p99:.1} ms >= {max_p99_ms} ms")),
        None => failures.push("no p99".into()),
    }
    if step.duplicated > 0.0 {
        failures.push(format!("{} duplicated", step.duplicated));
    }
    if let Some(m) = step.misrouted.filter(|m| *m > 0.0) {
        failures.push(format!("{m} misrouted"));
    }
    if let Some(d) = step.disconnects.filter(|d| *d > 0.0) {
        failures.push(format!("{d} disconnects"));
    }
    failures
}

/// The loader's delivery ratio when it reports one (it discounts users that
/// churn took offline), else delivered / expected (expected falls back to
/// sent; 0 if nothing was sent).
pub fn delivery_ratio(step: &LoadStep) -> f64 {
    if let Some(r) = step.loader_delivery_ratio {
        return r;
    }
    let expected = if step.expected > 0.0 {
        step.expected
    } else {
        step.sent
    };
    if expected > 0.0 {
        step.delivered / expected
    } else {
        0.0
    }
}

/// What one instance did during the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstanceDelta {
    /// Its `--instance-id`.
    pub id: String,
    /// CPU seconds in the window.
    pub cpu_s: Option<f64>,
    /// Bus messages received, all kinds.
    pub bus_received: f64,
    /// Bus messages received, by kind.
    pub bus_received_by_kind: BTreeMap<String, f64>,
    /// Bus messages published, by kind.
    pub bus_published_by_kind: BTreeMap<String, f64>,
    /// `switchboard_delivered_total` delta: every frame queued to local
    /// sockets (deliveries, acks, welcome frames, pings).
    pub frames_queued: f64,
    /// DMs sent from this instance, by path.
    pub dm_by_path: BTreeMap<String, f64>,
    /// Messages dropped, by reason.
    pub dropped_by_reason: BTreeMap<String, f64>,
    /// `switchboard_connections` at the end of the window.
    pub connections_after: f64,
}

/// Every derived number of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Derived {
    /// Offered rate of the headline step (find-max: its max sustained rate).
    pub offered_rate: f64,
    /// find-max: the loader's max sustained rate.
    pub max_sustained_rate: Option<f64>,
    /// Headline step: deliveries per second.
    pub delivered_per_sec: f64,
    /// Headline step: latency p50, ms.
    pub p50_ms: Option<f64>,
    /// Headline step: latency p99, ms.
    pub p99_ms: Option<f64>,
    /// Headline step: latency p99.9, ms.
    pub p999_ms: Option<f64>,
    /// Headline step: latency max, ms.
    pub max_ms: Option<f64>,
    /// Headline step: delivered / expected.
    pub delivery_ratio: f64,
    /// Headline step: lost deliveries.
    pub lost: f64,
    /// Headline step: duplicated deliveries.
    pub duplicated: f64,
    /// Headline step: out-of-order deliveries.
    pub out_of_order: f64,
    /// Headline step: acks reporting an error.
    pub ack_errors: f64,
    /// Headline step passes the peer's rule.
    pub pass: bool,
    /// Why it does not, if it does not.
    pub pass_failures: Vec<String>,
    /// The loader's own verdict on the headline step.
    pub loader_pass: Option<bool>,
    /// find-max steps where the loader's verdict differs from the peer rule, by offered rate.
    pub verdict_disagreements: Vec<f64>,

    /// Length of the measured window, s.
    pub window_s: f64,
    /// Messages sent in the window (all steps for find-max).
    pub window_sent: f64,
    /// Deliveries in the window according to the loader (all steps for find-max):
    /// the denominator of every "per message" figure.
    pub window_delivered: f64,
    /// Frames the instances queued to local sockets (`switchboard_delivered_total`):
    /// deliveries plus acks, welcome frames and pings, so about 2 per DM.
    pub instance_frames_queued: f64,

    /// CPU seconds of each instance in the window.
    pub instance_cpu_s: Vec<Option<f64>>,
    /// Their sum.
    pub instance_cpu_s_sum: f64,
    /// redis-server CPU seconds in the window, from `/proc`.
    pub redis_cpu_s: Option<f64>,
    /// The same from `INFO cpu` (cross-check).
    pub redis_cpu_s_info: f64,
    /// The loader's CPU seconds (whole loader run, connect phase included).
    pub loader_cpu_s: Option<f64>,
    /// This benchmark's CPU seconds in the window.
    pub bench_cpu_s: Option<f64>,
    /// Instances' CPU, µs per delivered message (sum over instances).
    pub instance_cpu_us_per_msg: Option<f64>,
    /// redis-server CPU (`/proc`), µs per delivered message.
    pub redis_cpu_us_per_msg: Option<f64>,
    /// redis-server CPU (`INFO cpu`), µs per delivered message.
    pub redis_cpu_us_per_msg_info: Option<f64>,
    /// Instances + Redis, µs per delivered message.
    pub total_cpu_us_per_msg: Option<f64>,
    /// Loader CPU, µs per delivered message.
    pub loader_cpu_us_per_msg: Option<f64>,
    /// Instances' CPU as cores busy over the window.
    pub instance_cores: Option<f64>,
    /// Redis' CPU as cores busy over the window.
    pub redis_cores: Option<f64>,
    /// Whole machine busy cores over the window (`/proc/stat`).
    pub machine_busy_cores: Option<f64>,
    /// Whole machine steal over the window, cores.
    pub machine_steal_cores: Option<f64>,
    /// Whole machine irq + softirq over the window, cores (not charged to any process).
    pub machine_irq_cores: Option<f64>,
    /// Busy cores not accounted for by the instances, Redis, the loader, this
    /// benchmark or interrupts: other work on the machine competing with the
    /// measurement.
    pub foreign_cores: Option<f64>,

    /// Redis `total_net_output_bytes` per delivered message.
    pub redis_out_bytes_per_msg: Option<f64>,
    /// Redis `total_net_input_bytes` per delivered message.
    pub redis_in_bytes_per_msg: Option<f64>,
    /// Redis `total_commands_processed` per delivered message.
    pub redis_commands_per_msg: Option<f64>,
    /// PUBLISH (+ SPUBLISH) calls per delivered message.
    pub publish_per_msg: Option<f64>,
    /// PUBLISH (+ SPUBLISH) calls per sent message.
    pub publish_per_sent: Option<f64>,
    /// Calls per delivered message of every command that ran in the window.
    pub command_calls_per_msg: BTreeMap<String, f64>,
    /// Calls of every command that ran in the window.
    pub command_calls: BTreeMap<String, u64>,

    /// Bus messages received, per instance per delivered message: mean over instances.
    pub bus_rx_per_instance_per_msg_mean: Option<f64>,
    /// The same, max over instances.
    pub bus_rx_per_instance_per_msg_max: Option<f64>,
    /// Bus messages received over all instances, by kind.
    pub bus_received_by_kind: BTreeMap<String, f64>,
    /// Bus messages published over all instances, by kind.
    pub bus_published_by_kind: BTreeMap<String, f64>,
    /// DMs over all instances, by path.
    pub dm_by_path: BTreeMap<String, f64>,
    /// Drops over all instances, by reason.
    pub dropped_by_reason: BTreeMap<String, f64>,
    /// Each instance's deltas.
    pub per_instance: Vec<InstanceDelta>,
    /// Things that make a figure doubtful.
    pub warnings: Vec<String>,
}

/// Above this many cores of other work in the window, a run is flagged.
const FOREIGN_CORES_WARNING: f64 = 0.25;

/// Per-message figure: `x / messages`, `None` without messages.
fn per(x: f64, messages: f64) -> Option<f64> {
    (messages > 0.0).then(|| x / messages)
}

fn diff_map(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, vb)| (k.clone(), vb - a.get(k).copied().unwrap_or(0.0)))
        .collect()
}

fn add_into(total: &mut BTreeMap<String, f64>, part: &BTreeMap<String, f64>) {
    for (k, v) in part {
        *total.entry(k.clone()).or_insert(0.0) += v;
    }
}

/// Computes everything from the before/after snapshots and the loader's output.
pub fn derive(
    before: &Snapshot,
    after: &Snapshot,
    load: &LoadResult,
    min_delivery: f64,
    max_p99_ms: f64,
) -> Derived {
    let mut d = Derived::default();
    let mut warnings = Vec::new();

    // Loader side.
    if let Some(h) = load.headline() {
        d.offered_rate = h.rate_offered;
        d.delivered_per_sec = h.delivered_per_sec;
        d.p50_ms = h.p50_ms;
        d.p99_ms = h.p99_ms;
        d.p999_ms = h.p999_ms;
        d.max_ms = h.max_ms;
        d.delivery_ratio = delivery_ratio(h);
        d.lost = h.lost;
        d.duplicated = h.duplicated;
        d.out_of_order = h.out_of_order;
        d.ack_errors = h.ack_errors;
        d.pass_failures = peer_rule_failures(h, min_delivery, max_p99_ms);
        d.pass = d.pass_failures.is_empty();
        d.loader_pass = h.pass;
        if !h.missing.is_empty() {
            warnings.push(format!("loader JSON lacks: {}", h.missing.join(", ")));
        }
    } else {
        warnings.push("loader reported no run".into());
        d.pass_failures.push("no loader result".into());
    }
    d.max_sustained_rate = load.max_sustained_rate;
    if load.find_max {
        if let Some(r) = load.max_sustained_rate {
            d.offered_rate = r;
        }
        d.verdict_disagreements = load
            .steps
            .iter()
            .filter(|s| {
                s.pass.is_some_and(|p| {
                    p != peer_rule_failures(s, min_delivery, max_p99_ms).is_empty()
                })
            })
            .map(|s| s.rate_offered)
            .collect();
    }
    d.window_sent = load.steps.iter().map(|s| s.sent).sum();
    d.window_delivered = load.steps.iter().map(|s| s.delivered).sum();
    d.loader_cpu_s = load
        .steps
        .iter()
        .map(|s| s.loader_cpu_s)
        .sum::<Option<f64>>();
    let msgs = d.window_delivered;

    // Time and CPU.
    d.window_s = after.t_s - before.t_s;
    d.instance_cpu_s = before
        .instances
        .iter()
        .zip(&after.instances)
        .map(|(a, b)| Some(b.cpu_s? - a.cpu_s?))
        .collect();
    if d.instance_cpu_s.iter().any(Option::is_none) {
        warnings.push("an instance's CPU could not be read (process gone?)".into());
    }
    d.instance_cpu_s_sum = d.instance_cpu_s.iter().flatten().sum();
    d.redis_cpu_s = after
        .redis_cpu_s
        .zip(before.redis_cpu_s)
        .map(|(b, a)| b - a);
    d.redis_cpu_s_info = after.redis.used_cpu_s - before.redis.used_cpu_s;
    d.bench_cpu_s = after
        .bench_cpu_s
        .zip(before.bench_cpu_s)
        .map(|(b, a)| b - a);
    d.instance_cpu_us_per_msg = per(d.instance_cpu_s_sum * 1e6, msgs);
    d.redis_cpu_us_per_msg = d.redis_cpu_s.and_then(|r| per(r * 1e6, msgs));
    d.redis_cpu_us_per_msg_info = per(d.redis_cpu_s_info * 1e6, msgs);
    d.total_cpu_us_per_msg = d
        .instance_cpu_us_per_msg
        .zip(d.redis_cpu_us_per_msg)
        .map(|(i, r)| i + r);
    d.loader_cpu_us_per_msg = d.loader_cpu_s.and_then(|l| per(l * 1e6, msgs));
    if d.window_s > 0.0 {
        d.instance_cores = Some(d.instance_cpu_s_sum / d.window_s);
        d.redis_cores = d.redis_cpu_s.map(|r| r / d.window_s);
        let total = after.machine.total_s - before.machine.total_s;
        let idle = after.machine.idle_s - before.machine.idle_s;
        if total > 0.0 {
            d.machine_busy_cores = Some((total - idle) / d.window_s);
            d.machine_steal_cores =
                Some((after.machine.steal_s - before.machine.steal_s) / d.window_s);
            d.machine_irq_cores = Some((after.machine.irq_s - before.machine.irq_s) / d.window_s);
        }
    }

    if let Some(busy) = d.machine_busy_cores {
        let ours = d.instance_cpu_s_sum
            + d.redis_cpu_s.unwrap_or(0.0)
            + d.loader_cpu_s.unwrap_or(0.0)
            + d.bench_cpu_s.unwrap_or(0.0);
        let irq = d.machine_irq_cores.unwrap_or(0.0);
        let foreign = (busy - irq - ours / d.window_s).max(0.0);
        d.foreign_cores = Some(foreign);
        if foreign > FOREIGN_CORES_WARNING {
            warnings.push(format!(
                "other processes kept {foreign:.2} cores busy during the window: \
                 latency and CPU figures are disturbed"
            ));
        }
    }

    // Redis traffic.
    let out = after.redis.net_output_bytes as f64 - before.redis.net_output_bytes as f64;
    let input = after.redis.net_input_bytes as f64 - before.redis.net_input_bytes as f64;
    let commands = after.redis.commands_processed as f64 - before.redis.commands_processed as f64;
    d.redis_out_bytes_per_msg = per(out, msgs);
    d.redis_in_bytes_per_msg = per(input, msgs);
    d.redis_commands_per_msg = per(commands, msgs);
    for (name, stat) in &after.redis.commandstats {
        let calls_before = before.redis.commandstats.get(name).map_or(0, |s| s.calls);
        let calls = stat.calls.saturating_sub(calls_before);
        if calls > 0 {
            d.command_calls.insert(name.clone(), calls);
            if let Some(p) = per(calls as f64, msgs) {
                d.command_calls_per_msg.insert(name.clone(), p);
            }
        }
    }
    let publishes = ["publish", "spublish"]
        .iter()
        .map(|c| d.command_calls.get(*c).copied().unwrap_or(0) as f64)
        .sum::<f64>();
    d.publish_per_msg = per(publishes, msgs);
    d.publish_per_sent = per(publishes, d.window_sent);

    // Instances.
    let mut rx_per_msg = Vec::new();
    for ((a, b), cpu_s) in before
        .instances
        .iter()
        .zip(&after.instances)
        .zip(&d.instance_cpu_s)
    {
        if let Some(e) = a.scrape_error.as_ref().or(b.scrape_error.as_ref()) {
            warnings.push(format!("{}: /metrics scrape failed: {e}", b.id));
        }
        let by = |s: &openmetrics::Scrape, name: &str, label: &str| {
            openmetrics::by_label(s, name, label)
        };
        let received = diff_map(
            &by(&a.metrics, "switchboard_bus_received_total", "kind"),
            &by(&b.metrics, "switchboard_bus_received_total", "kind"),
        );
        let published = diff_map(
            &by(&a.metrics, "switchboard_bus_published_total", "kind"),
            &by(&b.metrics, "switchboard_bus_published_total", "kind"),
        );
        let dm = diff_map(
            &by(&a.metrics, "switchboard_dm_total", "path"),
            &by(&b.metrics, "switchboard_dm_total", "path"),
        );
        let dropped = diff_map(
            &by(&a.metrics, "switchboard_dropped_total", "reason"),
            &by(&b.metrics, "switchboard_dropped_total", "reason"),
        );
        let delta = InstanceDelta {
            id: b.id.clone(),
            cpu_s: *cpu_s,
            bus_received: received.values().sum(),
            frames_queued: openmetrics::sum(&b.metrics, "switchboard_delivered_total", None)
                - openmetrics::sum(&a.metrics, "switchboard_delivered_total", None),
            connections_after: openmetrics::sum(&b.metrics, "switchboard_connections", None),
            bus_received_by_kind: received,
            bus_published_by_kind: published,
            dm_by_path: dm,
            dropped_by_reason: dropped,
        };
        if let Some(p) = per(delta.bus_received, msgs) {
            rx_per_msg.push(p);
        }
        add_into(&mut d.bus_received_by_kind, &delta.bus_received_by_kind);
        add_into(&mut d.bus_published_by_kind, &delta.bus_published_by_kind);
        add_into(&mut d.dm_by_path, &delta.dm_by_path);
        add_into(&mut d.dropped_by_reason, &delta.dropped_by_reason);
        d.instance_frames_queued += delta.frames_queued;
        d.per_instance.push(delta);
    }
    if !rx_per_msg.is_empty() {
        d.bus_rx_per_instance_per_msg_mean =
            Some(rx_per_msg.iter().sum::<f64>() / rx_per_msg.len() as f64);
        d.bus_rx_per_instance_per_msg_max = rx_per_msg.iter().copied().reduce(f64::max);
    }
    let dropped: f64 = d.dropped_by_reason.values().sum();
    if dropped > 0.0 {
        warnings.push(format!(
            "instances dropped {dropped} messages in the window"
        ));
    }
    if d.lost > 0.0 {
        warnings.push(format!("loader reports {} lost", d.lost));
    }
    d.warnings = warnings;
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::MachineCpu;
    use crate::redis_info::{CommandStat, RedisSnapshot};
    use crate::snapshot::InstanceReading;

    fn step_json(rate: f64, delivered: f64, p99: f64, pass: bool) -> Value {
        serde_json::json!({
            "workload": "dm", "users": 200, "rate_offered": rate, "duration_s": 10,
            "body_bytes": 64, "sent": 1000, "acked": 1000,
            "acks": {"routed": 500, "offline": 0, "ok": 500, "error": 0},
            "expected": 1000, "delivered": delivered, "lost": 1000.0 - delivered,
            "duplicated": 0, "out_of_order": 0, "send_rate": rate,
            "delivered_per_sec": delivered / 10.0,
            "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": p99, "p999": 9.0, "max": 12.0, "mean": 1.5},
            "ack_latency_ms": {}, "elapsed_s": 10.0, "loader_cpu_s": 0.5, "pass": pass
        })
    }

    fn reading(id: &str, cpu: f64, metrics: &[(&str, f64)]) -> InstanceReading {
        InstanceReading {
            id: id.into(),
            cpu_s: Some(cpu),
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            scrape_error: None,
        }
    }

    fn snapshot(t: f64, cpu: [f64; 2], rx: [f64; 2], redis_cpu: f64, publish: u64) -> Snapshot {
        let mut commandstats = BTreeMap::new();
        commandstats.insert(
            "publish".to_owned(),
            CommandStat {
                calls: publish,
                usec: 0,
            },
        );
        Snapshot {
            t_s: t,
            instances: vec![
                reading(
                    "n1",
                    cpu[0],
                    &[("switchboard_bus_received_total{kind=\"personal\"}", rx[0])],
                ),
                reading(
                    "n2",
                    cpu[1],
                    &[
                        ("switchboard_bus_received_total{kind=\"personal\"}", rx[1]),
                        ("switchboard_delivered_total", rx[1]),
                    ],
                ),
            ],
            redis_cpu_s: Some(redis_cpu),
            redis: RedisSnapshot {
                net_output_bytes: (publish * 100),
                used_cpu_s: redis_cpu,
                commandstats,
                ..RedisSnapshot::default()
            },
            machine: MachineCpu::default(),
            bench_cpu_s: Some(0.0),
        }
    }

    #[test]
    fn per_message_figures() {
        let load = parse_loader(&step_json(100.0, 1000.0, 5.0, true)).expect("parses");
        let before = snapshot(1.0, [1.0, 2.0], [0.0, 0.0], 0.5, 0);
        let after = snapshot(11.0, [1.5, 2.5], [200.0, 600.0], 0.6, 1000);
        let d = derive(&before, &after, &load, 0.99, 100.0);
        assert!((d.window_s - 10.0).abs() < 1e-9);
        // 1 s of instance CPU over 1000 messages = 1000 µs/msg.
        assert!((d.instance_cpu_us_per_msg.expect("some") - 1000.0).abs() < 1e-6);
        assert!((d.redis_cpu_us_per_msg.expect("some") - 100.0).abs() < 1e-6);
        assert!((d.publish_per_msg.expect("some") - 1.0).abs() < 1e-9);
        assert!((d.redis_out_bytes_per_msg.expect("some") - 100.0).abs() < 1e-9);
        assert!((d.bus_rx_per_instance_per_msg_mean.expect("some") - 0.4).abs() < 1e-9);
        assert!((d.bus_rx_per_instance_per_msg_max.expect("some") - 0.6).abs() < 1e-9);
        assert!(d.pass, "{:?}", d.pass_failures);
        assert!(d.loader_pass == Some(true));
        // Absent metric (`user` kind, n1's delivered counter) reads as zero.
        assert_eq!(d.per_instance[0].frames_queued, 0.0);
    }

    #[test]
    fn peer_rule() {
        let ok = parse_step(&step_json(100.0, 995.0, 99.0, true));
        assert!(peer_rule_failures(&ok, 0.99, 100.0).is_empty());
        let slow = parse_step(&step_json(100.0, 1000.0, 100.0, true));
        assert_eq!(peer_rule_failures(&slow, 0.99, 100.0).len(), 1);
        let lossy = parse_step(&step_json(100.0, 980.0, 5.0, true));
        assert_eq!(peer_rule_failures(&lossy, 0.99, 100.0).len(), 1);
        let mut extra = step_json(100.0, 1000.0, 5.0, true);
        extra["misrouted"] = 2.into();
        extra["disconnects"] = 1.into();
        extra["offered"] = 2000.into();
        let extra = parse_step(&extra);
        assert_eq!(peer_rule_failures(&extra, 0.99, 100.0).len(), 3);
    }

    #[test]
    fn find_max_headline_and_missing_fields() {
        let v = serde_json::json!({
            "mode": "find-max",
            "steps": [
                step_json(1000.0, 1000.0, 5.0, true),
                step_json(2000.0, 1000.0, 50.0, true),
                step_json(4000.0, 500.0, 500.0, false)
            ],
            "max_sustained_rate": 2000
        });
        let load = parse_loader(&v).expect("parses");
        assert!(load.find_max);
        assert_eq!(load.headline().expect("some").rate_offered, 2000.0);
        let partial = parse_step(&serde_json::json!({"delivered": 3}));
        assert_eq!(partial.delivered, 3.0);
        assert!(partial.missing.iter().any(|m| m == "latency_ms.p50"));
        assert!(parse_loader(&serde_json::json!([1])).is_err());
    }
}
