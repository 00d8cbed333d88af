//! The document `switchboard-load --workload connections` writes: one
//! [`ConnectionsRun`] per loader process, rewritten in place (`--out`) while
//! the process runs, so the orchestrator can read its phase (connecting,
//! holding, closing, done) and its counts without a second channel.
//!
//! It says how the connect phase went (handshakes per second with the auth in
//! use, handshake latency, failures by kind), what happened to the held
//! connections (lost, and why: `close 1001`, `eof`, `reset`, ...), and, with
//! reconnect targets, how the reconnects went ([`ReconnectSummary`]). Times
//! that another process must compare with its own are Unix epoch
//! milliseconds (`*_unix_ms`); durations are seconds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Quantiles;

/// The `"mode": "connections"` marker of the document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionsTag {
    /// The only value.
    #[default]
    #[serde(rename = "connections")]
    Connections,
}

/// Where a loader process is in its run; the document is rewritten at every
/// change (and about once a second in between).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldPhase {
    /// Opening the connections.
    Connecting,
    /// Every initial attempt is over; holding what opened.
    Holding,
    /// Told to stop: closing every connection with a close handshake.
    Closing,
    /// Finished: the counts are final.
    Done,
}

/// The process's open-files limit: the loader raises its soft limit to the
/// hard one at start, since every connection is a file descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NofileLimit {
    /// Soft limit the process started with.
    pub soft_before: u64,
    /// Soft limit after raising it.
    pub soft: u64,
    /// Hard limit (the most one process can hold).
    pub hard: u64,
}

/// The connect phase: every connection opened once, at most `concurrency`
/// handshakes in flight.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectPhase {
    /// Connections asked for.
    pub requested: u64,
    /// Opened: TCP connect, WebSocket upgrade (with the token, under JWT
    /// auth) and the server's welcome frame.
    pub connected: u64,
    /// Failed or timed out.
    pub failed: u64,
    /// Handshakes in flight at most.
    pub concurrency: usize,
    /// When the first handshake started.
    pub started_unix_ms: f64,
    /// When the last initial attempt ended (`null` while connecting).
    pub finished_unix_ms: Option<f64>,
    /// From the first start to the last end (so far), s.
    pub elapsed_s: f64,
    /// `connected / elapsed_s` (`null` before anything connected).
    pub handshakes_per_s: Option<f64>,
    /// One handshake, TCP connect to welcome (waiting for a slot excluded), ms.
    pub handshake_ms: Quantiles,
    /// Failures by kind (`refused`, `http 503`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The first few failures in full.
    pub first_errors: Vec<String>,
}

/// The connections while held.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldSummary {
    /// Open right now (final document: open when the close began).
    pub open: u64,
    /// Most connections open at once.
    pub peak_open: u64,
    /// Seconds since the connect phase ended (final document: until the
    /// close began).
    pub held_s: f64,
    /// Connections the loader did not close itself: closed by the server,
    /// reset, or failed, before the loader began closing.
    pub lost: u64,
    /// `lost` by cause: `close 1001` (a close frame and its code), `eof`
    /// (the socket ended without one), `reset`, `error`.
    pub lost_by_cause: BTreeMap<String, u64>,
    /// When the first connection was lost.
    pub first_loss_unix_ms: Option<f64>,
    /// When the last connection was lost.
    pub last_loss_unix_ms: Option<f64>,
    /// Closed by the loader with a close handshake when told to stop.
    pub closed_by_loader: u64,
    /// Close handshakes the server did not answer in time (the socket was
    /// dropped anyway).
    pub close_unanswered: u64,
    /// From the stop to the last connection closed, s (`null` until then).
    pub close_s: Option<f64>,
}

/// Reconnects to `--reconnect-targets` of connections the server lost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconnectSummary {
    /// Where lost connections reconnect (connection slot `i`, attempt `k`
    /// goes to target `(i + k) mod n`).
    pub targets: Vec<String>,
    /// The bound of `reconnected_within`, s from the loss.
    pub within_s: f64,
    /// A connection gives up reconnecting this long after its loss, s.
    pub timeout_s: f64,
    /// Losses that started a reconnect.
    pub started: u64,
    /// Reconnected (welcome received).
    pub reconnected: u64,
    /// Reconnected within `within_s` of the loss.
    pub reconnected_within: u64,
    /// Gave up after `timeout_s`, or told to stop while still trying.
    pub failed: u64,
    /// Still trying when the document was written.
    pub pending: u64,
    /// Attempts made (a retry goes to the next target).
    pub attempts: u64,
    /// Failed attempts by kind.
    pub attempt_errors: BTreeMap<String, u64>,
    /// Reconnects by target.
    pub by_target: BTreeMap<String, u64>,
    /// When the last reconnect completed.
    pub last_reconnect_unix_ms: Option<f64>,
    /// From the first loss to the last reconnect, s.
    pub storm_s: Option<f64>,
    /// Loss to welcome on the new target, per reconnect, ms.
    pub reconnect_ms: Quantiles,
}

/// What one `switchboard-load --workload connections` process reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsRun {
    /// Always `"connections"`.
    pub mode: ConnectionsTag,
    /// Where the process is; the counts are final at `done`.
    pub phase: HoldPhase,
    /// The loader's pid.
    pub pid: u32,
    /// Targets of the initial connections (slot `i` goes to `i mod n`).
    pub targets: Vec<String>,
    /// Source addresses the sockets were bound to (slot `i` uses `i mod n`;
    /// empty: the kernel's choice).
    pub source_addrs: Vec<String>,
    /// `jwt` (a minted HS256 token per connection) or `none`.
    pub auth: String,
    /// User names are this prefix and the user number.
    pub user_prefix: String,
    /// Open-files limit of the process.
    pub nofile: NofileLimit,
    /// The connect phase.
    pub connect: ConnectPhase,
    /// The held connections.
    pub hold: HoldSummary,
    /// Reconnects (`null` without `--reconnect-targets`).
    pub reconnect: Option<ReconnectSummary>,
    /// Why the hold ended: `signal`, `hold elapsed`, `all lost`, `interrupted`
    /// (`null` while holding).
    pub stop_reason: Option<String>,
    /// The loader's own VmRSS, KiB.
    pub rss_kib: Option<u64>,
    /// The loader's CPU time so far, s.
    pub cpu_s: f64,
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
        let run = ConnectionsRun {
            mode: ConnectionsTag::Connections,
            phase: HoldPhase::Holding,
            pid: 7,
            targets: vec!["ws://127.0.0.1:1".into()],
            source_addrs: vec!["127.0.0.2".into()],
            auth: "jwt".into(),
            user_prefix: "c1-".into(),
            nofile: NofileLimit {
                soft_before: 1024,
                soft: 20_000,
                hard: 20_000,
            },
            connect: ConnectPhase {
                requested: 10,
                connected: 10,
                ..ConnectPhase::default()
            },
            hold: HoldSummary::default(),
            reconnect: Some(ReconnectSummary::default()),
            stop_reason: None,
            rss_kib: Some(1),
            cpu_s: 0.5,
            elapsed_s: 1.0,
            updated_unix_ms: 1.0,
        };
        let json = serde_json::to_value(&run).unwrap_or_default();
        assert_eq!(json["mode"], "connections");
        assert_eq!(json["phase"], "holding");
        let back: ConnectionsRun = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, run);
        assert!(HoldPhase::Connecting < HoldPhase::Holding && HoldPhase::Closing < HoldPhase::Done);
    }
}
