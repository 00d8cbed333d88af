//! The document `switchboard-load` prints (or writes to `--out`): one
//! [`SingleRun`], or with `--find-max` one [`FindMaxRun`] holding every step.
//! Both are read back as a [`LoaderOutput`].
//!
//! The fields of [`StepResult`] up to `pass` are what the benchmark
//! orchestrator computes with; the fields after it are detail for a reader
//! of the raw JSON. Every field is written on every run (latencies as
//! `null` when nothing was recorded), so a document missing one is an error,
//! not a zero.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::{Protocol, Workload};

/// Latency quantiles in milliseconds, rounded to the microsecond; `null`
/// (`None`) when nothing was recorded, so "no data" never reads as 0 ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile: the one the pass rule reads.
    pub p99: Option<f64>,
    /// 99.9th percentile.
    pub p999: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
    /// Mean.
    pub mean: Option<f64>,
    /// Number of values, to tell a quantile of ten values from one of a million.
    pub n: u64,
}

/// Acks by status: how the server answered the messages sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Acks {
    /// DM acked `routed`.
    pub routed: u64,
    /// DM acked `offline`.
    pub offline: u64,
    /// Room message acked `ok`; with the Socket.IO peer, every acked
    /// message (its node hands the emit to the adapter and cannot tell a
    /// routed DM from one to an offline user).
    pub ok: u64,
    /// Answered with an error frame (the pass rule tolerates a few).
    pub error: u64,
}

/// Churn figures, so losses caused by reconnecting recipients are told apart
/// from real ones (all zero outside the churn workload).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

/// Room parameters of a room workload, so a reader knows the fan-out behind
/// the delivery counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomInfo {
    /// Rooms.
    pub rooms: u32,
    /// Members per room.
    pub room_members: u32,
    /// Instances a room's members are homed on.
    pub room_spread: u32,
    /// Share of room messages (1 for `room`, `--room-share` for `mixed`).
    pub room_share: f64,
}

/// One measured run, or one step of a `--find-max` ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// What was sent.
    pub workload: Workload,
    /// Users.
    pub users: u32,
    /// Connections per user.
    pub conns_per_user: u32,
    /// Targets as given on the command line.
    pub targets: Vec<String>,
    /// Offered rate, messages/s.
    pub rate_offered: f64,
    /// Send-phase length, s.
    pub duration_s: f64,
    /// Body size, bytes.
    pub body_bytes: usize,
    /// `--locality` (`null`: uniform recipients).
    pub locality: Option<f64>,
    /// Messages sent.
    pub sent: u64,
    /// Acks and error answers received.
    pub acked: u64,
    /// Acks by status.
    pub acks: Acks,
    /// Expected deliveries.
    pub expected: u64,
    /// Unique deliveries: the denominator of every per-message cost.
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
    /// End-to-end latency from the scheduled send time (loader lag counts).
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
    /// The loader's verdict under its [`crate::PassRule`].
    pub pass: bool,
    // ---- extra detail ----
    /// Step number.
    pub step: u32,
    /// Why the step failed ([`crate::PassRule::failures`]).
    pub fail_reasons: Vec<String>,
    /// Messages scheduled (rate x duration).
    pub offered: u64,
    /// Scheduled but not sent (no connected sender, or out of time).
    pub not_sent: u64,
    /// Sent but never acked (0 with `--no-ack`).
    pub unacked: u64,
    /// The pass rule's ratio: delivered / (every sent message's deliveries
    /// as if routed); churn: delivered / (expected - offline_during_churn).
    /// `null` when no delivery was expected.
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
    /// Rooms (room workloads only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<RoomInfo>,
    /// `--churn-rate` (churn workload only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn_rate: Option<f64>,
}

fn default_true() -> bool {
    true
}

/// The output of a run without `--find-max`: its one step, flattened, plus
/// whole-run detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SingleRun {
    /// The measured step (its fields sit at the top level of the JSON).
    #[serde(flatten)]
    pub step: StepResult,
    /// Whole-run wall time (connect phase and close included), s.
    pub run_elapsed_s: f64,
    /// Whole-run loader CPU, s.
    pub loader_cpu_total_s: f64,
    /// The initial connect phase.
    pub initial_connect_ms: Quantiles,
    /// Connections that failed to open in the connect phase.
    pub connect_failures: u64,
    /// `--no-ack`: messages were sent with `"ack":false` (Socket.IO: without
    /// an ack id).
    pub no_ack: bool,
    /// The protocol spoken to the system under test (absent in documents
    /// written before the Socket.IO peer: `switchboard`).
    #[serde(default)]
    pub protocol: Protocol,
    /// `--dm-store`: false when every DM was sent with `"store":false`
    /// (ephemeral, protocol v1.1); absent in older documents: `true`.
    #[serde(default = "default_true")]
    pub dm_store: bool,
}

/// The `"mode": "find-max"` marker that tells a ladder from a single run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FindMaxTag {
    /// The only value.
    #[default]
    #[serde(rename = "find-max")]
    FindMax,
}

/// The output of `--find-max`: every step of the ladder, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindMaxRun {
    /// Always `"find-max"`.
    pub mode: FindMaxTag,
    /// The pass rule in words ([`crate::PassRule::describe`]).
    pub rule: String,
    /// Every step, in order (retries of a failing rate included).
    pub steps: Vec<StepResult>,
    /// Offered rate of the highest passing step (`null`: none passed).
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
    /// `--no-ack`: messages were sent with `"ack":false` (Socket.IO: without
    /// an ack id).
    pub no_ack: bool,
    /// The protocol spoken to the system under test (absent in documents
    /// written before the Socket.IO peer: `switchboard`).
    #[serde(default)]
    pub protocol: Protocol,
    /// `--dm-store`: false when every DM was sent with `"store":false`
    /// (ephemeral, protocol v1.1); absent in older documents: `true`.
    #[serde(default = "default_true")]
    pub dm_store: bool,
}

/// Either document the loader writes. Serializes as the inner document;
/// deserializes by its `mode` field (`"find-max"`, or absent for a single
/// run), so a malformed document is reported with the field at fault rather
/// than as "matches no variant".
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum LoaderOutput {
    /// A plain run (boxed: one step is five times the size of a ladder's header).
    Single(Box<SingleRun>),
    /// A `--find-max` ladder.
    FindMax(FindMaxRun),
}

impl<'de> Deserialize<'de> for LoaderOutput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Just the discriminating field; every other field is left to the variant.
        #[derive(Deserialize)]
        struct Mode {
            mode: Option<String>,
        }
        let document = serde_json::Value::deserialize(deserializer)?;
        let Mode { mode } = Mode::deserialize(&document).map_err(D::Error::custom)?;
        match mode.as_deref() {
            None => SingleRun::deserialize(document)
                .map(|run| LoaderOutput::Single(Box::new(run)))
                .map_err(|e| D::Error::custom(format!("loader single-run output: {e}"))),
            Some("find-max") => FindMaxRun::deserialize(document)
                .map(LoaderOutput::FindMax)
                .map_err(|e| D::Error::custom(format!("loader find-max output: {e}"))),
            Some(other) => Err(D::Error::custom(format!(
                "unknown loader output mode {other:?} (expected \"find-max\" or none)"
            ))),
        }
    }
}

impl LoaderOutput {
    /// Whether this is a `--find-max` ladder.
    pub fn is_find_max(&self) -> bool {
        matches!(self, LoaderOutput::FindMax(_))
    }

    /// The protocol the loader spoke.
    pub fn protocol(&self) -> Protocol {
        match self {
            LoaderOutput::Single(run) => run.protocol,
            LoaderOutput::FindMax(run) => run.protocol,
        }
    }

    /// Whether DMs were stored (`--dm-store`; `false`: sent with `"store":false`).
    pub fn dm_store(&self) -> bool {
        match self {
            LoaderOutput::Single(run) => run.dm_store,
            LoaderOutput::FindMax(run) => run.dm_store,
        }
    }

    /// Every step: the one of a single run, or the ladder.
    pub fn steps(&self) -> &[StepResult] {
        match self {
            LoaderOutput::Single(run) => std::slice::from_ref(&run.step),
            LoaderOutput::FindMax(run) => &run.steps,
        }
    }

    /// The highest sustained rate of a ladder (`None` for a single run, or
    /// when no step passed).
    pub fn max_sustained_rate(&self) -> Option<f64> {
        match self {
            LoaderOutput::Single(_) => None,
            LoaderOutput::FindMax(run) => run.max_sustained_rate,
        }
    }

    /// The step a summary reports: the only one of a single run; for a
    /// ladder the passing step at the max sustained rate (else the last
    /// passing one, else the last one).
    pub fn headline(&self) -> Option<&StepResult> {
        let steps = self.steps();
        let passing = |s: &&StepResult| s.pass;
        self.max_sustained_rate()
            .and_then(|rate| {
                steps
                    .iter()
                    .filter(passing)
                    .rfind(|s| (s.rate_offered - rate).abs() < 0.5)
            })
            .or_else(|| steps.iter().rfind(passing))
            .or_else(|| steps.last())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A plausible passing DM step at `rate`/s for 10 s with p99 `p99` ms.
    pub(crate) fn step(rate: f64, p99: f64, pass: bool) -> StepResult {
        let sent = (rate * 10.0) as u64;
        let latency = Quantiles {
            p50: Some(1.0),
            p90: Some(2.0),
            p99: Some(p99),
            p999: Some(p99 + 1.0),
            max: Some(p99 + 2.0),
            mean: Some(1.2),
            n: sent,
        };
        StepResult {
            workload: Workload::Dm,
            users: 200,
            conns_per_user: 1,
            targets: vec!["ws://127.0.0.1:8081".to_owned()],
            rate_offered: rate,
            duration_s: 10.0,
            body_bytes: 64,
            locality: None,
            sent,
            acked: sent,
            acks: Acks {
                routed: sent,
                ..Acks::default()
            },
            expected: sent,
            delivered: sent,
            lost: 0,
            duplicated: 0,
            out_of_order: 0,
            send_rate: rate,
            delivered_per_sec: rate,
            latency_ms: latency.clone(),
            ack_latency_ms: latency,
            connect_ms: Quantiles::default(),
            churn: Churn::default(),
            elapsed_s: 10.2,
            loader_cpu_s: 0.5,
            pass,
            step: 1,
            fail_reasons: Vec::new(),
            offered: sent,
            not_sent: 0,
            unacked: 0,
            delivery_ratio: Some(1.0),
            errors_without_id: 0,
            unexpected_deliveries: 0,
            misrouted: 0,
            wrong_from: 0,
            stale: 0,
            unparsed: 0,
            disconnects: 0,
            send_lag_ms: Quantiles::default(),
            loader_cpu_cores: 0.05,
            connections: 200,
            errors: BTreeMap::new(),
            anomalies: Vec::new(),
            rooms: None,
            churn_rate: None,
        }
    }

    fn single(step: StepResult) -> LoaderOutput {
        LoaderOutput::Single(Box::new(SingleRun {
            step,
            run_elapsed_s: 12.0,
            loader_cpu_total_s: 0.7,
            initial_connect_ms: Quantiles::default(),
            connect_failures: 0,
            no_ack: true,
            protocol: Protocol::Switchboard,
            dm_store: true,
        }))
    }

    fn ladder(steps: Vec<StepResult>, max: Option<f64>) -> LoaderOutput {
        LoaderOutput::FindMax(FindMaxRun {
            mode: FindMaxTag::FindMax,
            rule: "rule".to_owned(),
            steps,
            max_sustained_rate: max,
            elapsed_s: 40.0,
            loader_cpu_s: 3.0,
            initial_connect_ms: Quantiles::default(),
            connect_failures: 0,
            no_ack: false,
            protocol: Protocol::Socketio,
            dm_store: false,
        })
    }

    fn round_trip(output: &LoaderOutput) -> LoaderOutput {
        let text = serde_json::to_string_pretty(output).expect("serializes");
        serde_json::from_str(&text).expect("deserializes")
    }

    #[test]
    fn single_run_round_trips_with_the_step_at_the_top_level() {
        let mut room_step = step(2000.0, 5.0, true);
        room_step.workload = Workload::Room;
        room_step.rooms = Some(RoomInfo {
            rooms: 20,
            room_members: 10,
            room_spread: 2,
            room_share: 1.0,
        });
        room_step.errors.insert("rate_limited".to_owned(), 2);
        let output = single(room_step);
        assert_eq!(round_trip(&output), output);
        let value = serde_json::to_value(&output).expect("serializes");
        assert_eq!(value["sent"], 20_000);
        assert_eq!(value["workload"], "room");
        assert!(value.get("mode").is_none());
        assert!(value.get("churn_rate").is_none(), "absent, not null");
    }

    #[test]
    fn find_max_round_trips_and_is_told_apart_by_mode() {
        let output = ladder(
            vec![step(1000.0, 5.0, true), step(1500.0, 150.0, false)],
            Some(1000.0),
        );
        let back = round_trip(&output);
        assert_eq!(back, output);
        assert!(back.is_find_max());
        let value = serde_json::to_value(&output).expect("serializes");
        assert_eq!(value["mode"], "find-max");
        assert_eq!(value["protocol"], "socketio");
    }

    #[test]
    fn malformed_documents_name_the_field() {
        let mut value = serde_json::to_value(single(step(100.0, 5.0, true))).expect("serializes");
        if let Some(map) = value.as_object_mut() {
            map.remove("delivered");
        }
        let error = serde_json::from_value::<LoaderOutput>(value)
            .expect_err("a missing field is an error")
            .to_string();
        assert!(error.contains("delivered"), "{error}");
        let error = serde_json::from_str::<LoaderOutput>(r#"{"mode":"sideways"}"#)
            .expect_err("unknown mode")
            .to_string();
        assert!(error.contains("sideways"), "{error}");
    }

    /// Documents written by the loader before this crate existed (trimmed
    /// from `bench/results/`) still read.
    #[test]
    fn reads_documents_written_by_the_previous_loader() {
        for (name, text) in [
            ("single", include_str!("../tests/fixtures/single-run.json")),
            ("find-max", include_str!("../tests/fixtures/find-max.json")),
            ("churn", include_str!("../tests/fixtures/churn.json")),
            ("room", include_str!("../tests/fixtures/room.json")),
        ] {
            let output: LoaderOutput = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("fixture {name} does not read: {e}"));
            assert!(output.headline().is_some(), "{name}");
            // Written before the field existed: Switchboard's protocol.
            assert_eq!(output.protocol(), Protocol::Switchboard, "{name}");
            // Written before protocol v1.1: every DM stored (the default).
            assert!(output.dm_store(), "{name}");
        }
    }

    #[test]
    fn headline_is_the_passing_step_at_the_max_sustained_rate() {
        let steps = vec![
            step(1000.0, 5.0, true),
            step(2000.0, 50.0, true),
            step(4000.0, 500.0, false),
        ];
        let output = ladder(steps.clone(), Some(2000.0));
        assert_eq!(output.headline().map(|s| s.rate_offered), Some(2000.0));
        // No max: the last passing step; nothing passing: the last step.
        let output = ladder(steps.clone(), None);
        assert_eq!(output.headline().map(|s| s.rate_offered), Some(2000.0));
        let failing = vec![step(1000.0, 500.0, false), step(1500.0, 600.0, false)];
        let output = ladder(failing, None);
        assert_eq!(output.headline().map(|s| s.rate_offered), Some(1500.0));
        assert!(ladder(Vec::new(), None).headline().is_none());
        let output = single(step(10.0, 1.0, false));
        assert_eq!(output.headline().map(|s| s.rate_offered), Some(10.0));
    }
}
