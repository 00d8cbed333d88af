//! Turning raw readings into the numbers the benchmark reports: the
//! per-message costs computed from a before/after pair of snapshots and the
//! loader's result (CPU per delivered message, Redis bytes and commands per
//! message, bus messages received per instance per message), plus the verdict
//! of the shared [`PassRule`] on the loader's headline step.
//!
//! Pure functions over data: no I/O here, so every formula is unit-tested.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use switchboard_bench_schema::{LoaderOutput, PassRule};

use crate::openmetrics::Scrape;
use crate::redis_info::RedisSnapshot;
use crate::redis_server::NodeRole;
use crate::snapshot::{RedisNodeReading, Snapshot};
use crate::system::MetricNames;

/// What one Redis Cluster node did during the window, per delivered message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisNodeDelta {
    /// Its port.
    pub port: u16,
    /// Master or replica.
    pub role: NodeRole,
    /// CPU seconds in the window (`/proc`).
    pub cpu_s: Option<f64>,
    /// CPU µs per delivered message (`/proc`).
    pub cpu_us_per_msg: Option<f64>,
    /// Its share of the whole cluster's CPU in the window.
    pub cpu_share: Option<f64>,
    /// `total_net_output_bytes` per delivered message (to clients and
    /// replicas; the cluster bus is not in it).
    pub out_bytes_per_msg: Option<f64>,
    /// `total_net_input_bytes` per delivered message.
    pub in_bytes_per_msg: Option<f64>,
    /// Cluster-bus messages sent per delivered message (`CLUSTER INFO`
    /// `cluster_stats_messages_sent`: every type, pings too).
    pub bus_sent_per_msg: Option<f64>,
    /// Cluster-bus messages received per delivered message.
    pub bus_received_per_msg: Option<f64>,
    /// Of those sent, the pub/sub ones (`publish` and `publishshard`).
    pub bus_publish_sent_per_msg: Option<f64>,
    /// Bytes written per delivered message beyond what INFO counts
    /// (`/proc/PID/io` wchar − `total_net_output_bytes`): the
    /// cluster bus (each message carries a ≈ 2 KB header), and a few log
    /// lines.
    pub bus_bytes_per_msg: Option<f64>,
    /// PUBLISH calls per delivered message.
    pub publish_per_msg: Option<f64>,
    /// SPUBLISH calls per delivered message.
    pub spublish_per_msg: Option<f64>,
    /// Commands per delivered message (`total_commands_processed`).
    pub commands_per_msg: Option<f64>,
}

/// The whole Redis Cluster's figures of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RedisClusterFigures {
    /// Every node, in port order.
    pub nodes: Vec<RedisNodeDelta>,
    /// The busiest master's CPU over the masters' mean (1: evenly spread;
    /// M for M masters: one master does everything).
    pub master_cpu_max_over_mean: Option<f64>,
    /// Cluster-bus messages sent per delivered message, all nodes.
    pub bus_sent_per_msg: Option<f64>,
    /// Of those, pub/sub (`publish` and `publishshard`) messages.
    pub bus_publish_sent_per_msg: Option<f64>,
    /// Bytes written beyond INFO's counts per delivered message, all nodes
    /// (see [`RedisNodeDelta::bus_bytes_per_msg`]).
    pub bus_bytes_per_msg: Option<f64>,
    /// SPUBLISH calls per delivered message, all nodes (PUBLISH calls are
    /// [`Derived::command_calls_per_msg`]).
    pub spublish_per_msg: Option<f64>,
}

/// The pub/sub messages a node sent over the cluster bus.
fn bus_publish_sent(s: &RedisSnapshot) -> u64 {
    s.cluster_stat("cluster_stats_messages_publish_sent")
        + s.cluster_stat("cluster_stats_messages_publishshard_sent")
}

/// Bytes a node wrote that INFO does not count (the cluster bus).
fn uncounted_write_bytes(a: &RedisNodeReading, b: &RedisNodeReading) -> Option<f64> {
    let written = b.write_bytes? as f64 - a.write_bytes? as f64;
    // `total_net_output_bytes` includes the replication output (Redis 7).
    let counted = b.redis.net_output_bytes as f64 - a.redis.net_output_bytes as f64;
    Some((written - counted).max(0.0))
}

/// Each node's figures and the cluster's spread, from the nodes' readings
/// before and after the window, over `msgs` delivered messages.
pub fn redis_cluster_figures(
    before: &[RedisNodeReading],
    after: &[RedisNodeReading],
    msgs: f64,
) -> RedisClusterFigures {
    let delta = |f: &dyn Fn(&RedisSnapshot) -> u64, a: &RedisNodeReading, b: &RedisNodeReading| {
        f(&b.redis).saturating_sub(f(&a.redis)) as f64
    };
    let cpu: Vec<Option<f64>> = before
        .iter()
        .zip(after)
        .map(|(a, b)| Some(b.cpu_s? - a.cpu_s?))
        .collect();
    let cpu_total: Option<f64> = cpu.iter().copied().sum();
    let nodes: Vec<RedisNodeDelta> = before
        .iter()
        .zip(after)
        .zip(&cpu)
        .map(|((a, b), &cpu_s)| RedisNodeDelta {
            port: b.port,
            role: b.role,
            cpu_s,
            cpu_us_per_msg: cpu_s.and_then(|c| per(c * 1e6, msgs)),
            cpu_share: cpu_s.zip(cpu_total).and_then(|(c, t)| per(c, t)),
            out_bytes_per_msg: per(delta(&|s| s.net_output_bytes, a, b), msgs),
            in_bytes_per_msg: per(delta(&|s| s.net_input_bytes, a, b), msgs),
            bus_sent_per_msg: per(
                delta(&|s| s.cluster_stat("cluster_stats_messages_sent"), a, b),
                msgs,
            ),
            bus_received_per_msg: per(
                delta(&|s| s.cluster_stat("cluster_stats_messages_received"), a, b),
                msgs,
            ),
            bus_publish_sent_per_msg: per(delta(&bus_publish_sent, a, b), msgs),
            bus_bytes_per_msg: uncounted_write_bytes(a, b).and_then(|x| per(x, msgs)),
            publish_per_msg: per(delta(&|s| s.calls("publish"), a, b), msgs),
            spublish_per_msg: per(delta(&|s| s.calls("spublish"), a, b), msgs),
            commands_per_msg: per(delta(&|s| s.commands_processed, a, b), msgs),
        })
        .collect();
    let master_cpu: Vec<f64> = nodes
        .iter()
        .filter(|n| n.role == NodeRole::Master)
        .filter_map(|n| n.cpu_s)
        .collect();
    let mean = master_cpu.iter().sum::<f64>() / master_cpu.len().max(1) as f64;
    let max = master_cpu.iter().copied().reduce(f64::max);
    let sum_of = |f: fn(&RedisNodeDelta) -> Option<f64>| nodes.iter().map(f).sum::<Option<f64>>();
    RedisClusterFigures {
        master_cpu_max_over_mean: max.and_then(|m| per(m, mean)),
        bus_sent_per_msg: sum_of(|n| n.bus_sent_per_msg),
        bus_publish_sent_per_msg: sum_of(|n| n.bus_publish_sent_per_msg),
        bus_bytes_per_msg: sum_of(|n| n.bus_bytes_per_msg),
        spublish_per_msg: sum_of(|n| n.spublish_per_msg),
        nodes,
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
    /// Frames queued to local sockets: `switchboard_delivered_total`; the
    /// peer's Engine.IO packets out (deliveries, acks, connects, pings).
    pub frames_queued: f64,
    /// DMs sent from this instance, by path.
    pub dm_by_path: BTreeMap<String, f64>,
    /// Messages dropped, by reason.
    pub dropped_by_reason: BTreeMap<String, f64>,
    /// Connections at the end of the window.
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
    /// Headline step passes the pass rule with the benchmark's thresholds.
    pub pass: bool,
    /// Why it does not, if it does not.
    pub pass_failures: Vec<String>,
    /// The loader's own verdict on the headline step.
    pub loader_pass: Option<bool>,
    /// find-max steps where the loader's verdict differs from the benchmark's
    /// (only possible when their thresholds differ), by offered rate.
    pub verdict_disagreements: Vec<f64>,

    /// Length of the measured window, s.
    pub window_s: f64,
    /// Messages sent in the window (all steps for find-max).
    pub window_sent: f64,
    /// Deliveries in the window according to the loader (all steps for find-max):
    /// the denominator of every "per message" figure.
    pub window_delivered: f64,
    /// Frames the instances queued to local sockets, as each system counts
    /// them: `switchboard_delivered_total`; the peer's Engine.IO packets out
    /// (deliveries, acks, connects, pings).
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
    /// A Redis Cluster: each node's figures and the spread (the Redis
    /// figures above are then the sums over the nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cluster: Option<RedisClusterFigures>,
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

/// Computes everything from the before/after snapshots (their counters read
/// under `names`) and the loader's output.
pub fn derive(
    before: &Snapshot,
    after: &Snapshot,
    load: &LoaderOutput,
    rule: &PassRule,
    names: &MetricNames,
) -> Derived {
    let mut d = Derived::default();
    let mut warnings = Vec::new();

    // Loader side.
    if let Some(h) = load.headline() {
        d.offered_rate = h.rate_offered;
        d.delivered_per_sec = h.delivered_per_sec;
        d.p50_ms = h.latency_ms.p50;
        d.p99_ms = h.latency_ms.p99;
        d.p999_ms = h.latency_ms.p999;
        d.max_ms = h.latency_ms.max;
        d.delivery_ratio = h.delivery_ratio.unwrap_or(0.0);
        d.lost = h.lost as f64;
        d.duplicated = h.duplicated as f64;
        d.out_of_order = h.out_of_order as f64;
        d.ack_errors = h.acks.error as f64;
        d.pass_failures = rule.failures(h);
        d.pass = d.pass_failures.is_empty();
        d.loader_pass = Some(h.pass);
    } else {
        warnings.push("loader reported no run".into());
        d.pass_failures.push("no loader result".into());
    }
    d.max_sustained_rate = load.max_sustained_rate();
    if load.is_find_max() {
        if let Some(r) = load.max_sustained_rate() {
            d.offered_rate = r;
        }
        d.verdict_disagreements = load
            .steps()
            .iter()
            .filter(|s| s.pass != rule.passes(s))
            .map(|s| s.rate_offered)
            .collect();
    }
    d.window_sent = load.steps().iter().map(|s| s.sent as f64).sum();
    d.window_delivered = load.steps().iter().map(|s| s.delivered as f64).sum();
    d.loader_cpu_s = Some(load.steps().iter().map(|s| s.loader_cpu_s).sum());
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
    if !after.redis_nodes.is_empty() {
        if before.redis_nodes.len() == after.redis_nodes.len() {
            d.redis_cluster = Some(redis_cluster_figures(
                &before.redis_nodes,
                &after.redis_nodes,
                msgs,
            ));
        } else {
            warnings.push("the Redis Cluster's nodes differ between the two snapshots".into());
        }
    }

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
        let by = |s: &Scrape, name: &str, label: &str| s.by_label(name, label);
        let received = diff_map(
            &by(&a.metrics, names.bus_received, "kind"),
            &by(&b.metrics, names.bus_received, "kind"),
        );
        let published = diff_map(
            &by(&a.metrics, names.bus_published, "kind"),
            &by(&b.metrics, names.bus_published, "kind"),
        );
        let dm = diff_map(
            &by(&a.metrics, names.dm_by_path, "path"),
            &by(&b.metrics, names.dm_by_path, "path"),
        );
        let dropped = diff_map(
            &by(&a.metrics, names.dropped, "reason"),
            &by(&b.metrics, names.dropped, "reason"),
        );
        let delta = InstanceDelta {
            id: b.id.clone(),
            cpu_s: *cpu_s,
            bus_received: received.values().sum(),
            frames_queued: b.metrics.sum(names.frames_queued, None)
                - a.metrics.sum(names.frames_queued, None),
            connections_after: b.metrics.sum(names.connections, None),
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
    use crate::snapshot::{InstanceReading, RedisNodeReading};
    use switchboard_bench_schema::{FindMaxRun, FindMaxTag, Quantiles, SingleRun, StepResult};

    /// A loader step of 1000 DMs at `rate`/s: `delivered` of them arrived,
    /// p99 `p99` ms, the loader's own verdict `pass`.
    fn loader_step(rate: f64, delivered: u64, p99: f64, pass: bool) -> StepResult {
        let fixture: LoaderOutput = serde_json::from_str(include_str!(
            "../../switchboard-bench-schema/tests/fixtures/single-run.json"
        ))
        .expect("the schema crate's fixture reads");
        let mut step = fixture.headline().expect("one step").clone();
        step.rate_offered = rate;
        (step.offered, step.sent, step.expected) = (1000, 1000, 1000);
        step.delivered = delivered;
        step.lost = 1000 - delivered;
        step.delivery_ratio = Some(delivered as f64 / 1000.0);
        step.delivered_per_sec = delivered as f64 / 10.0;
        step.latency_ms.p99 = Some(p99);
        step.loader_cpu_s = 0.5;
        step.pass = pass;
        step
    }

    fn single(step: StepResult) -> LoaderOutput {
        LoaderOutput::Single(Box::new(SingleRun {
            step,
            run_elapsed_s: 12.0,
            loader_cpu_total_s: 1.0,
            initial_connect_ms: Quantiles::default(),
            connect_failures: 0,
            no_ack: false,
            protocol: switchboard_bench_schema::Protocol::Switchboard,
            dm_store: true,
        }))
    }

    fn reading(id: &str, cpu: f64, metrics: &[(&str, f64)]) -> InstanceReading {
        InstanceReading {
            id: id.into(),
            cpu_s: Some(cpu),
            metrics: Scrape::parse(
                &metrics
                    .iter()
                    .map(|(series, value)| format!("{series} {value}\n"))
                    .collect::<String>(),
            ),
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
            redis_nodes: Vec::new(),
            machine: MachineCpu::default(),
            bench_cpu_s: Some(0.0),
        }
    }

    /// A node's reading: CPU, bytes written, client output, PUBLISH and
    /// SPUBLISH calls, pub/sub bus messages sent.
    fn node(
        port: u16,
        cpu: f64,
        written: u64,
        out: u64,
        calls: [u64; 2],
        bus: u64,
    ) -> RedisNodeReading {
        let stat = |calls| CommandStat { calls, usec: 0 };
        RedisNodeReading {
            port,
            role: NodeRole::Master,
            cpu_s: Some(cpu),
            write_bytes: Some(written),
            redis: RedisSnapshot {
                net_output_bytes: out,
                commandstats: [
                    ("publish".to_owned(), stat(calls[0])),
                    ("spublish".to_owned(), stat(calls[1])),
                ]
                .into_iter()
                .collect(),
                cluster_stats: [
                    ("cluster_stats_messages_publish_sent".to_owned(), bus),
                    ("cluster_stats_messages_sent".to_owned(), bus + 10),
                ]
                .into_iter()
                .collect(),
                ..RedisSnapshot::default()
            },
        }
    }

    #[test]
    fn cluster_nodes_per_message_and_their_spread() {
        let before = [
            node(1, 1.0, 0, 0, [0, 0], 0),
            node(2, 1.0, 0, 0, [0, 0], 0),
            node(3, 1.0, 0, 0, [0, 0], 0),
        ];
        // 1000 messages: node 1 took every PUBLISH and copied each to the two others.
        let after = [
            node(1, 1.4, 2_500_000, 100_000, [1000, 0], 2000),
            node(2, 1.1, 100_000, 100_000, [0, 500], 0),
            node(3, 1.1, 100_000, 100_000, [0, 500], 0),
        ];
        let c = redis_cluster_figures(&before, &after, 1000.0);
        let n1 = &c.nodes[0];
        assert!((n1.cpu_us_per_msg.expect("some") - 400.0).abs() < 1e-6);
        assert!((n1.cpu_share.expect("some") - 0.4 / 0.6).abs() < 1e-9);
        assert_eq!(n1.publish_per_msg, Some(1.0));
        assert_eq!(n1.bus_publish_sent_per_msg, Some(2.0));
        assert_eq!(n1.bus_bytes_per_msg, Some(2400.0));
        assert_eq!(c.nodes[1].bus_bytes_per_msg, Some(0.0));
        assert_eq!(c.spublish_per_msg, Some(1.0));
        assert_eq!(c.bus_publish_sent_per_msg, Some(2.0));
        assert_eq!(c.bus_sent_per_msg, Some(2.0));
        // 0.4 against a mean of 0.2.
        assert!((c.master_cpu_max_over_mean.expect("some") - 2.0).abs() < 1e-9);
    }

    #[test]
    fn per_message_figures() {
        let load = single(loader_step(100.0, 1000, 5.0, true));
        let before = snapshot(1.0, [1.0, 2.0], [0.0, 0.0], 0.5, 0);
        let after = snapshot(11.0, [1.5, 2.5], [200.0, 600.0], 0.6, 1000);
        let d = derive(
            &before,
            &after,
            &load,
            &PassRule::PEER,
            &MetricNames::SWITCHBOARD,
        );
        assert!((d.window_s - 10.0).abs() < 1e-9);
        // 1 s of instance CPU over 1000 messages = 1000 µs/msg.
        assert!((d.instance_cpu_us_per_msg.expect("some") - 1000.0).abs() < 1e-6);
        assert!((d.redis_cpu_us_per_msg.expect("some") - 100.0).abs() < 1e-6);
        assert!((d.publish_per_msg.expect("some") - 1.0).abs() < 1e-9);
        assert!((d.redis_out_bytes_per_msg.expect("some") - 100.0).abs() < 1e-9);
        assert!((d.bus_rx_per_instance_per_msg_mean.expect("some") - 0.4).abs() < 1e-9);
        assert!((d.bus_rx_per_instance_per_msg_max.expect("some") - 0.6).abs() < 1e-9);
        assert!((d.loader_cpu_us_per_msg.expect("some") - 500.0).abs() < 1e-6);
        assert!(d.pass, "{:?}", d.pass_failures);
        assert!(d.loader_pass == Some(true));
        // Absent metric (`user` kind, n1's delivered counter) reads as zero.
        assert_eq!(d.per_instance[0].frames_queued, 0.0);
    }

    #[test]
    fn verdict_is_the_shared_rule_with_the_benchmarks_thresholds() {
        let before = snapshot(1.0, [1.0, 2.0], [0.0, 0.0], 0.5, 0);
        let after = snapshot(11.0, [1.5, 2.5], [200.0, 600.0], 0.6, 1000);
        // p99 exactly at the maximum passes, on both sides.
        let d = derive(
            &before,
            &after,
            &single(loader_step(100.0, 995, 100.0, true)),
            &PassRule::PEER,
            &MetricNames::SWITCHBOARD,
        );
        assert!(d.pass, "{:?}", d.pass_failures);
        let lossy = derive(
            &before,
            &after,
            &single(loader_step(100.0, 980, 5.0, false)),
            &PassRule::PEER,
            &MetricNames::SWITCHBOARD,
        );
        assert_eq!(lossy.pass_failures.len(), 1, "{:?}", lossy.pass_failures);
        assert!((lossy.delivery_ratio - 0.98).abs() < 1e-9);
    }

    #[test]
    fn find_max_reports_the_headline_and_counts_every_step() {
        let load = LoaderOutput::FindMax(FindMaxRun {
            mode: FindMaxTag::FindMax,
            rule: PassRule::PEER.describe(),
            steps: vec![
                loader_step(1000.0, 1000, 5.0, true),
                loader_step(2000.0, 1000, 50.0, true),
                loader_step(4000.0, 500, 500.0, false),
            ],
            max_sustained_rate: Some(2000.0),
            elapsed_s: 40.0,
            loader_cpu_s: 2.0,
            initial_connect_ms: Quantiles::default(),
            connect_failures: 0,
            no_ack: false,
            protocol: switchboard_bench_schema::Protocol::Switchboard,
            dm_store: true,
        });
        let before = snapshot(1.0, [1.0, 2.0], [0.0, 0.0], 0.5, 0);
        let after = snapshot(41.0, [2.0, 3.0], [0.0, 0.0], 0.6, 0);
        let d = derive(
            &before,
            &after,
            &load,
            &PassRule::PEER,
            &MetricNames::SWITCHBOARD,
        );
        assert_eq!(d.offered_rate, 2000.0);
        assert_eq!(d.p99_ms, Some(50.0));
        assert!(d.pass);
        assert_eq!(d.window_delivered, 2500.0);
        assert!(d.verdict_disagreements.is_empty());
        // A stricter benchmark disagrees with the loader's verdict at 2000/s.
        let strict = PassRule {
            max_p99_ms: 10.0,
            ..PassRule::PEER
        };
        let d = derive(&before, &after, &load, &strict, &MetricNames::SWITCHBOARD);
        assert!(!d.pass);
        assert_eq!(d.verdict_disagreements, vec![2000.0]);
    }

    #[test]
    fn the_peer_is_read_under_its_own_names() {
        let stats = |rx: f64, packets: f64| {
            crate::peer::scrape_of_stats(&format!(
                r#"{{"adapter":"classic","counters":{{"connections":100,"bus_received":{rx},
                    "bus_published":500,"packets_out":{packets},"dm_in":500,"dm_local":250}}}}"#
            ))
            .expect("peer stats")
        };
        let at = |t: f64, rx: f64, packets: f64| {
            let mut snap = snapshot(t, [1.0, 2.0], [0.0, 0.0], 0.5, 0);
            for (i, reading) in snap.instances.iter_mut().enumerate() {
                reading.metrics = stats(rx * (i + 1) as f64, packets);
            }
            snap
        };
        let (before, after) = (at(1.0, 0.0, 0.0), at(11.0, 1000.0, 2000.0));
        let load = single(loader_step(100.0, 1000, 5.0, true));
        let d = derive(
            &before,
            &after,
            &load,
            &PassRule::PEER,
            &MetricNames::SOCKETIO,
        );
        // n1 received 1000, n2 2000 over 1000 delivered DMs.
        assert_eq!(d.bus_rx_per_instance_per_msg_mean, Some(1.5));
        assert_eq!(d.bus_rx_per_instance_per_msg_max, Some(2.0));
        assert_eq!(d.bus_received_by_kind.get("classic"), Some(&3000.0));
        assert_eq!(d.instance_frames_queued, 4000.0);
        assert_eq!(after.connections(&MetricNames::SOCKETIO), 200.0);
        // Under Switchboard's names the peer's counters are not there.
        let wrong = derive(
            &before,
            &after,
            &load,
            &PassRule::PEER,
            &MetricNames::SWITCHBOARD,
        );
        assert_eq!(wrong.bus_rx_per_instance_per_msg_mean, Some(0.0));
    }
}
