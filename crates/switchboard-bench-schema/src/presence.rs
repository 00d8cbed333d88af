//! The document `switchboard-load --workload presence` writes: one
//! [`PresenceRun`], rewritten in place (`--out`) at every phase change and
//! about once a second, so the orchestrator can follow the run (connecting,
//! ready, churning, draining, drained, closing, done) and read the final
//! counts at `done` without a second channel.
//!
//! The workload: `--users` churning users each go online (one connection)
//! and offline (its close) in turn, at `--churn-rate` transitions per second
//! in total, on every target; `--watcher-conns` watcher connections on the
//! `--watcher-instances` targets only watch them, `--watchers-per-user` per
//! user. Every watcher counts the `presence_event` frames it receives per
//! watched user and checks them against the loader's own record of that
//! user's transitions (no loss, no duplicate, the right state in order).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Quantiles;

/// The `"mode": "presence"` marker of the document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceTag {
    /// The only value.
    #[default]
    #[serde(rename = "presence")]
    Presence,
}

/// Where the loader is in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PresencePhase {
    /// Opening the watcher connections and sending their watches.
    Connecting,
    /// Every watcher is connected and acked; waiting for the start (SIGUSR1
    /// with `--wait-for-signal`, else at once).
    Ready,
    /// The churn phase: transitions at the offered rate.
    Churning,
    /// Churn over: waiting for the last events (at most `--drain`).
    Draining,
    /// Every expected event is in (or the drain timed out); the counts are
    /// final. With `--wait-for-signal` the loader holds every connection
    /// until SIGTERM.
    Drained,
    /// Closing every connection.
    Closing,
    /// Finished.
    Done,
}

/// How the watched users were placed, and what each instance should see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchPlacement {
    /// Target indices (0-based, in `--targets` order) the watcher
    /// connections are on.
    pub watcher_instances: Vec<usize>,
    /// Watcher connections in all (spread round-robin over `watcher_instances`).
    pub watcher_conns: u64,
    /// Watcher connections per churning user.
    pub watchers_per_user: u32,
    /// Watches (user, watcher connection) in all.
    pub watches: u64,
    /// Churning users whose watchers are all on one watcher instance, by that
    /// instance's index; the rest (`split_users`) have watchers on two.
    pub users_on_one_instance: BTreeMap<String, u64>,
    /// Churning users whose watchers are on two watcher instances.
    pub split_users: u64,
    /// Per target index: how many churning users have a watcher there.
    pub watched_users_by_instance: Vec<u64>,
}

/// The churn phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnPhase {
    /// Offered transitions per second (connects + disconnects).
    pub rate_offered: f64,
    /// Length of the churn phase, s.
    pub duration_s: f64,
    /// Transitions scheduled.
    pub scheduled: u64,
    /// Went online: a connection opened (welcome received).
    pub online: u64,
    /// Went offline: the connection closed by the loader (close handshake).
    pub offline: u64,
    /// Transitions that did not happen (a connect failed); not expected.
    pub failed: u64,
    /// Connections of churning users the server closed on its own.
    pub lost: u64,
    /// Transitions that started more than 50 ms after their scheduled time.
    pub late: u64,
    /// Connect (TCP to welcome) of a churning user, ms.
    pub connect_ms: Quantiles,
    /// Shortest time a user stayed in one state, s (`--users / --churn-rate`
    /// when the loader kept up).
    pub min_dwell_s: Option<f64>,
    /// Churning users online at the end of the churn phase.
    pub online_at_end: u64,
}

/// What the watchers received.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventTally {
    /// Events expected: every transition x the watchers of its user.
    pub expected: u64,
    /// `presence_event` frames received for watched users.
    pub received: u64,
    /// Of them, `online: true` / `false`.
    pub received_online: u64,
    /// See `received_online`.
    pub received_offline: u64,
    /// Expected but not received (per watcher and user: expected - matched).
    pub lost: u64,
    /// An event with the same state as the previous one for that user (the
    /// spec: never two identical consecutive events).
    pub duplicates: u64,
    /// More events than transitions for a (watcher, user), or a state that
    /// does not match the user's transition of that rank.
    pub unexpected: u64,
    /// Events for a user this connection does not watch, or unparsable ones.
    pub misrouted: u64,
    /// Events received by watchers on each target index.
    pub received_by_instance: Vec<u64>,
    /// Per target index: the bus envelopes it should receive (one per
    /// transition of each user it has a watcher of).
    pub expected_envelopes_by_instance: Vec<u64>,
    /// From the transition's start (connect start, close sent) to the event
    /// at a watcher, ms.
    pub latency_ms: Quantiles,
    /// `latency_ms` of online events only.
    pub online_latency_ms: Quantiles,
    /// `latency_ms` of offline events only.
    pub offline_latency_ms: Quantiles,
    /// Event `ts` (the server's clock, unix ms) minus the loader's unix ms at
    /// the transition's start, ms (same machine, so the clocks agree; `ts`
    /// has 1 ms resolution). Filled in from `drained` on.
    pub ts_minus_start_ms: Quantiles,
    /// From the churn start to the last event received, s.
    pub span_s: Option<f64>,
    /// `received / duration_s` of the churn phase.
    pub per_second: Option<f64>,
}

/// The watcher connections' setup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatcherSetup {
    /// Watcher connections asked for.
    pub requested: u64,
    /// Connected (welcome) and acked (the `presence` reply to `watch`).
    pub ready: u64,
    /// Failed to connect or to watch.
    pub failed: u64,
    /// Watched users the ack reported online (the churning users start
    /// offline, so 0).
    pub initially_online: u64,
    /// Error frames received by watchers, by code.
    pub errors: BTreeMap<String, u64>,
    /// Watcher connections lost before the loader closed them.
    pub lost: u64,
    /// From the first connect to the last ack, s.
    pub elapsed_s: f64,
}

/// What one `switchboard-load --workload presence` process reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceRun {
    /// Always `"presence"`.
    pub mode: PresenceTag,
    /// Where the loader is; the counts are final from `drained` on.
    pub phase: PresencePhase,
    /// The loader's pid.
    pub pid: u32,
    /// The targets, in order (index = instance number - 1 for the bench).
    pub targets: Vec<String>,
    /// Churning users.
    pub users: u32,
    /// User name prefixes: churning users, watchers.
    pub user_prefix: String,
    /// See `user_prefix`.
    pub watcher_prefix: String,
    /// `--presence-grace-ms` the loader was told the servers run with.
    pub presence_grace_ms: u64,
    /// The watches.
    pub placement: WatchPlacement,
    /// The watcher connections.
    pub watchers: WatcherSetup,
    /// The churn phase.
    pub churn: ChurnPhase,
    /// The events.
    pub events: EventTally,
    /// Whether every check passed: no loss, no duplicate, no unexpected or
    /// misrouted event, every watcher ready, no connection lost.
    pub pass: bool,
    /// Why not.
    pub fail_reasons: Vec<String>,
    /// The first few anomalies in full.
    pub first_errors: Vec<String>,
    /// The loader's CPU so far, s (and within the churn phase and drain).
    pub cpu_s: f64,
    /// See `cpu_s`.
    pub churn_cpu_s: f64,
    /// Since the process started, s.
    pub elapsed_s: f64,
    /// When this document was written.
    pub updated_unix_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_its_mode_and_phase_names() {
        let run = PresenceRun {
            mode: PresenceTag::Presence,
            phase: PresencePhase::Drained,
            pid: 7,
            targets: vec!["ws://127.0.0.1:1".into()],
            users: 200,
            user_prefix: "c".into(),
            watcher_prefix: "w".into(),
            presence_grace_ms: 0,
            placement: WatchPlacement {
                watcher_instances: vec![0, 1],
                watchers_per_user: 10,
                ..WatchPlacement::default()
            },
            watchers: WatcherSetup::default(),
            churn: ChurnPhase::default(),
            events: EventTally {
                expected: 10,
                received: 10,
                ..EventTally::default()
            },
            pass: true,
            fail_reasons: Vec::new(),
            first_errors: Vec::new(),
            cpu_s: 0.5,
            churn_cpu_s: 0.25,
            elapsed_s: 1.0,
            updated_unix_ms: 1.0,
        };
        let json = serde_json::to_value(&run).unwrap_or_default();
        assert_eq!(json["mode"], "presence");
        assert_eq!(json["phase"], "drained");
        let back: PresenceRun = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, run);
        assert!(PresencePhase::Ready < PresencePhase::Churning);
        assert!(PresencePhase::Drained < PresencePhase::Done);
    }
}
