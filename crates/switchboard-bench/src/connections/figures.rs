//! The figures of the connections workload, as pure functions over the
//! loaders' documents and the readings: a batch's connect rate added up over
//! its loader processes, memory per connection (total and marginal), how
//! the connections ended. No I/O here, so each formula is unit-tested.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use switchboard_bench_schema::ConnectionsRun;

/// One batch's connect phase, over every loader process of the batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectFigures {
    /// Connections asked for.
    pub requested: u64,
    /// Opened (upgrade and welcome).
    pub connected: u64,
    /// Failed.
    pub failed: u64,
    /// From the first handshake's start to the last attempt's end, over
    /// every process, s.
    pub elapsed_s: f64,
    /// `connected / elapsed_s`: handshakes per second of the batch.
    pub handshakes_per_s: Option<f64>,
    /// The highest p50 / p99 handshake latency of the processes, ms.
    pub handshake_p50_ms_max: Option<f64>,
    /// See `handshake_p50_ms_max`.
    pub handshake_p99_ms_max: Option<f64>,
    /// Failures by kind, added up.
    pub errors: BTreeMap<String, u64>,
    /// Loader processes of the batch.
    pub processes: usize,
    /// The loaders' own RSS, added up, KiB.
    pub loader_rss_kib: u64,
    /// Connections the kernel dropped because an accept queue was full,
    /// machine-wide, while the batch connected (each costs its client a
    /// second: the SYN is retried).
    pub listen_overflows: Option<u64>,
}

impl ConnectFigures {
    /// Adds up the documents of one batch.
    pub fn of(runs: &[ConnectionsRun]) -> ConnectFigures {
        let mut f = ConnectFigures {
            processes: runs.len(),
            ..ConnectFigures::default()
        };
        let (mut first, mut last): (Option<f64>, Option<f64>) = (None, None);
        for r in runs {
            let c = &r.connect;
            f.requested += c.requested;
            f.connected += c.connected;
            f.failed += c.failed;
            for (kind, n) in &c.errors {
                *f.errors.entry(kind.clone()).or_insert(0) += n;
            }
            if c.started_unix_ms > 0.0 {
                first = Some(first.map_or(c.started_unix_ms, |v| v.min(c.started_unix_ms)));
            }
            if let Some(end) = c.finished_unix_ms {
                last = Some(last.map_or(end, |v: f64| v.max(end)));
            }
            f.handshake_p50_ms_max = max_opt(f.handshake_p50_ms_max, c.handshake_ms.p50);
            f.handshake_p99_ms_max = max_opt(f.handshake_p99_ms_max, c.handshake_ms.p99);
            f.loader_rss_kib += r.rss_kib.unwrap_or(0);
        }
        if let (Some(a), Some(b)) = (first, last) {
            f.elapsed_s = round3(((b - a) / 1000.0).max(0.0));
        }
        f.handshakes_per_s = (f.connected > 0 && f.elapsed_s > 0.0)
            .then(|| round1(f.connected as f64 / f.elapsed_s));
        f
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// `(rss - baseline) / connections`, KiB per connection.
pub fn total_per_connection(rss_kib: u64, baseline_kib: u64, connections: f64) -> Option<f64> {
    (connections > 0.0).then(|| round1((rss_kib as f64 - baseline_kib as f64) / connections))
}

/// `(rss - previous rss) / (connections - previous connections)`, KiB per
/// connection added since the previous reading.
pub fn marginal_per_connection(
    rss_kib: u64,
    connections: f64,
    previous_rss_kib: u64,
    previous_connections: f64,
) -> Option<f64> {
    let added = connections - previous_connections;
    (added > 0.0).then(|| round1((rss_kib as f64 - previous_rss_kib as f64) / added))
}

/// How the connections of these documents were lost, added up by cause.
pub fn losses_by_cause(runs: &[ConnectionsRun]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in runs {
        for (cause, n) in &r.hold.lost_by_cause {
            *out.entry(cause.clone()).or_insert(0) += n;
        }
    }
    out
}

/// The latest `last_loss_unix_ms` of these documents.
pub fn last_loss_unix_ms(runs: &[ConnectionsRun]) -> Option<f64> {
    runs.iter()
        .filter_map(|r| r.hold.last_loss_unix_ms)
        .fold(None, |acc: Option<f64>, t| {
            Some(acc.map_or(t, |a| a.max(t)))
        })
}

/// Reconnects by target, added up.
pub fn reconnects_by_target(runs: &[ConnectionsRun]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in runs.iter().filter_map(|r| r.reconnect.as_ref()) {
        for (target, n) in &r.by_target {
            *out.entry(target.clone()).or_insert(0) += n;
        }
    }
    out
}

/// The highest reconnect latency quantiles of the processes, ms: (p50, p99, max).
pub fn reconnect_latency_max(runs: &[ConnectionsRun]) -> (Option<f64>, Option<f64>, Option<f64>) {
    runs.iter().filter_map(|r| r.reconnect.as_ref()).fold(
        (None, None, None),
        |(p50, p99, max), r| {
            (
                max_opt(p50, r.reconnect_ms.p50),
                max_opt(p99, r.reconnect_ms.p99),
                max_opt(max, r.reconnect_ms.max),
            )
        },
    )
}

/// Splits `total` connections over `processes` loaders as evenly as
/// possible (the first ones take the remainder).
pub fn split(total: u32, processes: usize) -> Vec<u32> {
    let n = processes.max(1) as u32;
    (0..n)
        .map(|k| total / n + u32::from(k < total % n))
        .filter(|&c| c > 0)
        .collect()
}

/// How many loader processes a batch of `total` needs: at least `wanted`,
/// and enough that none holds more than `per_process_max`.
pub fn processes_for(total: u32, wanted: usize, per_process_max: u32) -> usize {
    let needed = total.div_ceil(per_process_max.max(1)) as usize;
    wanted.max(needed).max(1)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_bench_schema::{
        ConnectPhase, ConnectionsTag, HoldPhase, HoldSummary, NofileLimit, Quantiles,
    };

    fn doc(connected: u64, failed: u64, start: f64, end: f64, p99: f64) -> ConnectionsRun {
        ConnectionsRun {
            mode: ConnectionsTag::Connections,
            phase: HoldPhase::Holding,
            pid: 1,
            targets: Vec::new(),
            source_addrs: Vec::new(),
            auth: "jwt".into(),
            user_prefix: "c".into(),
            nofile: NofileLimit::default(),
            connect: ConnectPhase {
                requested: connected + failed,
                connected,
                failed,
                started_unix_ms: start,
                finished_unix_ms: Some(end),
                handshake_ms: Quantiles {
                    p50: Some(p99 / 2.0),
                    p99: Some(p99),
                    ..Quantiles::default()
                },
                errors: if failed > 0 {
                    BTreeMap::from([("http 503".to_owned(), failed)])
                } else {
                    BTreeMap::new()
                },
                ..ConnectPhase::default()
            },
            hold: HoldSummary {
                lost_by_cause: BTreeMap::from([("close 1001".to_owned(), connected)]),
                last_loss_unix_ms: Some(end + 10.0),
                ..HoldSummary::default()
            },
            reconnect: None,
            stop_reason: None,
            rss_kib: Some(100),
            cpu_s: 0.0,
            elapsed_s: 0.0,
            updated_unix_ms: 0.0,
        }
    }

    #[test]
    fn a_batch_rate_spans_all_its_processes() {
        // Two processes, 1000 each, together from t=1000 to t=3000 ms.
        let runs = [
            doc(1000, 0, 1000.0, 2500.0, 40.0),
            doc(990, 10, 1100.0, 3000.0, 60.0),
        ];
        let f = ConnectFigures::of(&runs);
        assert_eq!((f.requested, f.connected, f.failed), (2000, 1990, 10));
        assert_eq!(f.elapsed_s, 2.0);
        assert_eq!(f.handshakes_per_s, Some(995.0));
        assert_eq!(f.handshake_p99_ms_max, Some(60.0));
        assert_eq!(f.errors.get("http 503"), Some(&10));
        assert_eq!(f.loader_rss_kib, 200);
        assert_eq!(losses_by_cause(&runs).get("close 1001"), Some(&1990));
        assert_eq!(last_loss_unix_ms(&runs), Some(3010.0));
        assert_eq!(ConnectFigures::of(&[]).handshakes_per_s, None);
    }

    #[test]
    fn memory_per_connection() {
        // 50 MiB baseline, 1000 connections add 140 MiB.
        let base = 50 * 1024;
        let at_1k = base + 140 * 1024;
        assert_eq!(total_per_connection(at_1k, base, 1000.0), Some(143.4));
        // The next 4000 cost 100 KiB each.
        let at_5k = at_1k + 4000 * 100;
        assert_eq!(
            marginal_per_connection(at_5k, 5000.0, at_1k, 1000.0),
            Some(100.0)
        );
        assert_eq!(total_per_connection(base, base, 0.0), None);
        assert_eq!(marginal_per_connection(at_5k, 5000.0, at_1k, 5000.0), None);
    }

    #[test]
    fn batches_are_split_evenly_within_the_process_limit() {
        assert_eq!(split(1000, 2), vec![500, 500]);
        assert_eq!(split(19_001, 2), vec![9501, 9500]);
        assert_eq!(split(1, 2), vec![1]);
        assert_eq!(processes_for(19_000, 2, 19_500), 2);
        assert_eq!(processes_for(57_000, 2, 19_500), 3);
        assert_eq!(processes_for(10, 0, 19_500), 1);
    }
}
