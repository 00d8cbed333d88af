//! What both sides of a Switchboard benchmark must agree on: the result
//! document `switchboard-load` writes and `switchboard-bench` reads
//! ([`LoaderOutput`] and the types inside it; [`ConnectionsRun`] for the
//! `connections` workload, [`PresenceRun`] for the `presence` workload),
//! the workload names both take on their command lines ([`Workload`]), the
//! protocol the loader speaks to the system under
//! test ([`Protocol`]: Switchboard's or the Socket.IO peer's), and the pass
//! rules both apply ([`PassRule`] for messages, [`ReconnectRule`] for a
//! reconnect storm).
//!
//! Types and pure functions only: no I/O, no clock, no process. The JSON
//! field names are a contract with result files already written (the
//! published ones in `bench/results/`): add fields, do not rename them.

mod connections;
mod pass_rule;
mod presence;
mod protocol;
mod reconnect_rule;
mod result;
mod workload;

pub use connections::{
    ConnectPhase, ConnectionsRun, ConnectionsTag, HoldPhase, HoldSummary, NofileLimit,
    ReconnectSummary,
};
pub use pass_rule::PassRule;
pub use presence::{
    ChurnPhase, EventTally, PresencePhase, PresenceRun, PresenceTag, WatchPlacement, WatcherSetup,
};
pub use protocol::Protocol;
pub use reconnect_rule::{ReconnectRule, StormTally};
pub use result::{
    Acks, Churn, FindMaxRun, FindMaxTag, LoaderOutput, Quantiles, RoomInfo, SingleRun, StepResult,
};
pub use workload::Workload;
