//! The figures of one ingest row, from its two snapshots, the producer's
//! stats and the receivers' tallies: records/s end to end, latency
//! quantiles, loss / duplicates / order, CPU per record of every process,
//! and the checks of the instances' own counters. Pure: no I/O.

use serde::{Deserialize, Serialize};
use switchboard_bench_schema::Quantiles;

use super::producers::ProduceStats;
use super::receivers::UserTally;
use crate::cli::IngestSource;
use crate::openmetrics::Scrape;
use crate::snapshot::Snapshot;

/// `switchboard_ingest_records_total{source,outcome}`.
const M_INGEST: &str = "switchboard_ingest_records_total";
/// Publishes the API accepted.
const M_API: &str = "switchboard_api_publishes_total";
/// The outcomes of [`M_INGEST`].
const OUTCOMES: [&str; 3] = ["delivered", "malformed", "retried"];

/// What [`derive`] reads.
pub struct Inputs<'a> {
    /// The row's source.
    pub source: IngestSource,
    /// Instances.
    pub nodes: usize,
    /// Records made.
    pub records: u64,
    /// The snapshot before the first record.
    pub before: &'a Snapshot,
    /// The snapshot after the last receipt.
    pub after: &'a Snapshot,
    /// Tansu's CPU seconds at both ends.
    pub tansu_cpu: (Option<f64>, Option<f64>),
    /// What producing took.
    pub produce: &'a ProduceStats,
    /// The last first receipt, unix ms.
    pub last_receipt_unix_ms: Option<f64>,
    /// Every receiver.
    pub receivers: &'a [UserTally],
}

/// One check of the counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// What is compared.
    pub what: String,
    /// What it must be.
    pub expected: f64,
    /// What was measured.
    pub measured: f64,
    /// Whether they are equal.
    pub ok: bool,
}

/// The figures of one row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Figures {
    /// Records made available.
    pub records: u64,
    /// Records accepted by the queue / the API.
    pub accepted: u64,
    /// Distinct records received.
    pub delivered: u64,
    /// records - delivered.
    pub lost: u64,
    /// Frames of a record already received.
    pub duplicates: u64,
    /// First receipts below a record already received for the user.
    pub order_violations: u64,
    /// `dm` frames that are not one of the user's records.
    pub unexpected: u64,
    /// From the first record made available to the last first receipt, s.
    pub window_s: f64,
    /// From the first record to the last accepted by the queue / API, s.
    pub produce_s: f64,
    /// records / window.
    pub records_per_s: f64,
    /// Production to receipt, ms.
    pub latency_ms: Quantiles,
    /// Between the two snapshots, s (the CPU interval).
    pub cpu_window_s: f64,
    /// CPU seconds in the CPU interval: the instances (sum), redis-server,
    /// Tansu, the benchmark (producer and receivers), everything else.
    pub instance_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub redis_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub tansu_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub bench_cpu_s: Option<f64>,
    /// See `instance_cpu_s`.
    pub other_cpu_s: Option<f64>,
    /// CPU µs per record made.
    pub instance_cpu_us_per_record: Option<f64>,
    /// See `instance_cpu_us_per_record`.
    pub redis_cpu_us_per_record: Option<f64>,
    /// See `instance_cpu_us_per_record`.
    pub tansu_cpu_us_per_record: Option<f64>,
    /// See `instance_cpu_us_per_record`.
    pub bench_cpu_us_per_record: Option<f64>,
    /// Redis commands per record.
    pub redis_commands_per_record: Option<f64>,
    /// `switchboard_ingest_records_total` over the window, summed over the
    /// instances: `source/outcome` -> count.
    pub ingest_counters: std::collections::BTreeMap<String, f64>,
    /// `switchboard_api_publishes_total` over the window, all instances.
    pub api_publishes: f64,
    /// The counters' checks.
    pub checks: Vec<Check>,
    /// Nothing lost or duplicated, every check holds (and, for a queue,
    /// per-user order kept).
    pub pass: bool,
    /// Things that make a figure less trustworthy, or explain a failure.
    pub warnings: Vec<String>,
}

/// The quantiles of `values` (sorted here), nearest rank.
pub fn quantiles(values: &mut [f64]) -> Quantiles {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return Quantiles::default();
    }
    let at = |q: f64| {
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(values[rank - 1])
    };
    Quantiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        max: values.last().copied(),
        mean: Some(values.iter().sum::<f64>() / n as f64),
        n: n as u64,
    }
}

/// What the instance's counters say it processed of `source`: ingest
/// records delivered or malformed, or (http) publishes accepted.
pub fn counted(scrape: &Scrape, source: IngestSource) -> f64 {
    match source {
        IngestSource::Http => scrape.sum(M_API, None),
        queue => {
            ingest(scrape, queue.as_str(), "delivered")
                + ingest(scrape, queue.as_str(), "malformed")
        }
    }
}

fn ingest(scrape: &Scrape, source: &str, outcome: &str) -> f64 {
    scrape.sum_where(M_INGEST, &[("source", source), ("outcome", outcome)])
}

/// The counters a row needs that an instance does not export (each one an
/// error: a renamed metric must not read as 0).
pub fn missing_counters(after: &Snapshot, source: IngestSource) -> Vec<String> {
    let mut missing = Vec::new();
    for inst in &after.instances {
        if let Some(e) = &inst.scrape_error {
            missing.push(format!("{}: /metrics could not be read: {e}", inst.id));
            continue;
        }
        let needed: Vec<(&str, Vec<(&str, &str)>)> = match source {
            IngestSource::Http => vec![(M_API, Vec::new())],
            queue => OUTCOMES
                .iter()
                .map(|o| (M_INGEST, vec![("source", queue.as_str()), ("outcome", *o)]))
                .collect(),
        };
        for (name, labels) in needed {
            if !inst.metrics.has(name, &labels) {
                let labels: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                missing.push(format!(
                    "{}: the counter {name}{{{}}} is not exported",
                    inst.id,
                    labels.join(",")
                ));
            }
        }
    }
    missing
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

fn per_record(cpu: Option<f64>, records: u64) -> Option<f64> {
    (records > 0).then_some(cpu? * 1e6 / records as f64)
}

/// The figures of a row.
pub fn derive(i: &Inputs<'_>) -> Figures {
    let mut f = Figures {
        records: i.records,
        accepted: i.produce.accepted,
        produce_s: i.produce.produce_s,
        ..Figures::default()
    };
    let mut latencies = Vec::with_capacity(i.records as usize);
    for t in i.receivers {
        f.delivered += t.unique;
        f.duplicates += t.duplicates;
        f.order_violations += t.order_violations;
        f.unexpected += t.unexpected;
        latencies.extend_from_slice(&t.latencies_ms);
        if let Some(e) = &t.error {
            if f.warnings.len() < 10 {
                f.warnings.push(format!("receiver {}: {e}", t.user));
            }
        }
    }
    f.lost = i.records.saturating_sub(f.delivered);
    f.latency_ms = quantiles(&mut latencies);
    if let Some(last) = i.last_receipt_unix_ms {
        f.window_s = ((last - i.produce.first_t_unix_ms) / 1000.0).max(0.0);
        if f.window_s > 0.0 {
            f.records_per_s = f.delivered as f64 / f.window_s;
        }
    }
    let (b, a) = (i.before, i.after);
    f.cpu_window_s = a.t_s - b.t_s;
    f.instance_cpu_s = b
        .instances
        .iter()
        .zip(&a.instances)
        .map(|(b, a)| delta(b.cpu_s, a.cpu_s))
        .sum();
    f.redis_cpu_s = delta(b.redis_cpu_s, a.redis_cpu_s);
    f.tansu_cpu_s = delta(i.tansu_cpu.0, i.tansu_cpu.1);
    f.bench_cpu_s = delta(b.bench_cpu_s, a.bench_cpu_s);
    let busy = |s: &Snapshot| s.machine.total_s - s.machine.idle_s;
    f.other_cpu_s = (|| {
        let known =
            f.instance_cpu_s? + f.redis_cpu_s? + f.bench_cpu_s? + f.tansu_cpu_s.unwrap_or(0.0);
        Some(((busy(a) - busy(b) - known) * 1000.0).round() / 1000.0)
    })();
    f.instance_cpu_us_per_record = per_record(f.instance_cpu_s, i.records);
    f.redis_cpu_us_per_record = per_record(f.redis_cpu_s, i.records);
    f.tansu_cpu_us_per_record = per_record(f.tansu_cpu_s, i.records);
    f.bench_cpu_us_per_record = per_record(f.bench_cpu_s, i.records);
    let commands = a
        .redis
        .commands_processed
        .saturating_sub(b.redis.commands_processed);
    f.redis_commands_per_record = (i.records > 0).then_some(commands as f64 / i.records as f64);

    let sum_delta = |g: &dyn Fn(&Scrape) -> f64| -> f64 {
        b.instances
            .iter()
            .zip(&a.instances)
            .map(|(b, a)| g(&a.metrics) - g(&b.metrics))
            .sum()
    };
    for source in ["stream", "kafka"] {
        for outcome in OUTCOMES {
            let d = sum_delta(&|s| ingest(s, source, outcome));
            f.ingest_counters.insert(format!("{source}/{outcome}"), d);
        }
    }
    f.api_publishes = sum_delta(&|s| s.sum(M_API, None));

    let mut checks = Vec::new();
    let mut check = |what: String, expected: f64, measured: f64| {
        checks.push(Check {
            ok: (expected - measured).abs() < 0.5,
            what,
            expected,
            measured,
        });
    };
    let counter = |k: &str| f.ingest_counters.get(k).copied().unwrap_or(0.0);
    match i.source {
        IngestSource::Http => {
            check(
                "switchboard_api_publishes_total (all instances) = records".into(),
                i.records as f64,
                f.api_publishes,
            );
            check(
                "switchboard_ingest_records_total (any source) = 0".into(),
                0.0,
                f.ingest_counters.values().sum(),
            );
        }
        queue => {
            let (own, other) = match queue {
                IngestSource::Stream => ("stream", "kafka"),
                _ => ("kafka", "stream"),
            };
            check(
                format!("switchboard_ingest_records_total{{source=\"{own}\",outcome=\"delivered\"}} = records"),
                i.records as f64,
                counter(&format!("{own}/delivered")),
            );
            check(
                format!("switchboard_ingest_records_total{{source=\"{own}\",outcome=\"malformed\"}} = 0"),
                0.0,
                counter(&format!("{own}/malformed")),
            );
            check(
                format!("switchboard_ingest_records_total{{source=\"{other}\"}} = 0"),
                0.0,
                OUTCOMES
                    .iter()
                    .map(|o| counter(&format!("{other}/{o}")))
                    .sum(),
            );
            check(
                "switchboard_api_publishes_total = 0".into(),
                0.0,
                f.api_publishes,
            );
        }
    }
    check(
        "records accepted by the queue / API = records".into(),
        i.records as f64,
        i.produce.accepted as f64,
    );
    f.checks = checks;
    let retried = counter("stream/retried") + counter("kafka/retried");
    if retried > 0.0 {
        f.warnings.push(format!(
            "the instances retried {retried} record(s) (unavailable / timeout)"
        ));
    }
    if !i.produce.errors.is_empty() {
        f.warnings.push(format!(
            "producer: {} failed: {}",
            i.produce.failed,
            i.produce.errors.join("; ")
        ));
    }
    if f.lost > 0 {
        f.warnings
            .push(format!("{} of {} records lost", f.lost, f.records));
    }
    if f.duplicates > 0 {
        f.warnings
            .push(format!("{} duplicate frames", f.duplicates));
    }
    // What the server promises (README): per-user order from Kafka (the
    // user is the key) and from a stream with one consumer; a stream's
    // entries are spread over several consumers, and the API orders nothing
    // across requests in flight.
    let order_promised = match i.source {
        IngestSource::Kafka => true,
        IngestSource::Stream => i.nodes == 1,
        IngestSource::Http => false,
    };
    if f.order_violations > 0 {
        f.warnings.push(format!(
            "{} per-user order violations{}",
            f.order_violations,
            match (order_promised, i.source) {
                (true, _) => " (the server promises per-user order here)",
                (false, IngestSource::Http) =>
                    " (not promised: the API orders nothing across publishes in flight)",
                (false, _) => " (not promised: a stream's entries are spread over the N consumers)",
            }
        ));
    }
    if let Some(other) = f.other_cpu_s.filter(|&o| o > 0.1 * f.cpu_window_s) {
        f.warnings.push(format!(
            "other processes used {other:.2} CPU-s in the {:.1} s CPU interval (the machine was shared)",
            f.cpu_window_s
        ));
    }
    let order_ok = !order_promised || f.order_violations == 0;
    f.pass = f.lost == 0
        && f.duplicates == 0
        && f.unexpected == 0
        && order_ok
        && f.checks.iter().all(|c| c.ok);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::MachineCpu;
    use crate::redis_info::RedisSnapshot;
    use crate::snapshot::InstanceReading;

    fn snapshot(t_s: f64, delivered: u64, cpu: f64) -> Snapshot {
        let instances = (0..2)
            .map(|k| InstanceReading {
                id: format!("n{}", k + 1),
                cpu_s: Some(cpu),
                metrics: Scrape::parse(&format!(
                    "switchboard_ingest_records_total{{source=\"stream\",outcome=\"delivered\"}} {delivered}\n\
                     switchboard_ingest_records_total{{source=\"stream\",outcome=\"malformed\"}} 0\n\
                     switchboard_ingest_records_total{{source=\"stream\",outcome=\"retried\"}} 0\n\
                     switchboard_ingest_records_total{{source=\"kafka\",outcome=\"delivered\"}} 0\n\
                     switchboard_ingest_records_total{{source=\"kafka\",outcome=\"malformed\"}} 0\n\
                     switchboard_ingest_records_total{{source=\"kafka\",outcome=\"retried\"}} 0\n\
                     switchboard_api_publishes_total 0\n"
                )),
                scrape_error: None,
            })
            .collect();
        Snapshot {
            t_s,
            instances,
            redis_cpu_s: Some(cpu),
            redis: RedisSnapshot::default(),
            redis_nodes: Vec::new(),
            machine: MachineCpu {
                total_s: 100.0 * t_s,
                idle_s: 50.0 * t_s,
                ..MachineCpu::default()
            },
            bench_cpu_s: Some(0.0),
        }
    }

    fn tally(user: &str, unique: u64, latencies: &[f64]) -> UserTally {
        UserTally {
            user: user.into(),
            expected: 2,
            frames: unique,
            unique,
            latencies_ms: latencies.to_vec(),
            ..UserTally::default()
        }
    }

    #[test]
    fn a_complete_row_passes_and_a_lost_record_fails_it() {
        let before = snapshot(1.0, 0, 1.0);
        let after = snapshot(2.0, 2, 1.5);
        let produce = ProduceStats {
            first_t_unix_ms: 1000.0,
            accepted: 4,
            ..ProduceStats::default()
        };
        let receivers = [tally("bu-0", 2, &[1.0, 3.0]), tally("bu-1", 2, &[2.0, 4.0])];
        let inputs = Inputs {
            source: IngestSource::Stream,
            nodes: 2,
            records: 4,
            before: &before,
            after: &after,
            tansu_cpu: (None, None),
            produce: &produce,
            last_receipt_unix_ms: Some(1500.0),
            receivers: &receivers,
        };
        let f = derive(&inputs);
        assert!(f.pass, "{:#?}", f.checks);
        assert_eq!((f.delivered, f.lost), (4, 0));
        assert_eq!(f.records_per_s, 8.0);
        assert_eq!(f.latency_ms.p50, Some(2.0));
        assert_eq!(f.latency_ms.max, Some(4.0));
        // Two instances x 0.5 CPU-s over 4 records.
        assert_eq!(f.instance_cpu_us_per_record, Some(250_000.0));
        assert_eq!(f.ingest_counters.get("stream/delivered"), Some(&4.0));
        assert!(missing_counters(&after, IngestSource::Stream).is_empty());
        assert!(missing_counters(&after, IngestSource::Http).is_empty());

        let short = [tally("bu-0", 2, &[1.0, 3.0]), tally("bu-1", 1, &[2.0])];
        let f = derive(&Inputs {
            receivers: &short,
            ..inputs
        });
        assert!(!f.pass);
        assert_eq!(f.lost, 1);
        assert!(f.warnings.iter().any(|w| w.contains("1 of 4 records lost")));

        // Order: promised by a stream with one consumer, not with two.
        let mut late = [tally("bu-0", 2, &[1.0, 3.0]), tally("bu-1", 2, &[2.0, 4.0])];
        late[1].order_violations = 1;
        let two = derive(&Inputs {
            receivers: &late,
            ..inputs
        });
        assert!(two.pass, "{:?}", two.warnings);
        let one = derive(&Inputs {
            receivers: &late,
            nodes: 1,
            ..inputs
        });
        assert!(!one.pass);
    }

    #[test]
    fn an_unexported_counter_is_reported() {
        let mut after = snapshot(2.0, 2, 1.5);
        after.instances[1].metrics = Scrape::parse("switchboard_api_publishes_total 0\n");
        let missing = missing_counters(&after, IngestSource::Kafka);
        assert_eq!(missing.len(), 3, "{missing:?}");
        assert!(missing[0].starts_with("n2: the counter switchboard_ingest_records_total"));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let q = quantiles(&mut v);
        assert_eq!(
            (q.p50, q.p99, q.max, q.n),
            (Some(50.0), Some(99.0), Some(100.0), 100)
        );
        assert_eq!(quantiles(&mut []).n, 0);
    }
}
