//! What both sides of a Switchboard benchmark must agree on: the result
//! document `switchboard-load` writes and `switchboard-bench` reads
//! ([`LoaderOutput`] and the types inside it), the workload names both take
//! on their command lines ([`Workload`]), and the one pass rule both apply
//! ([`PassRule`]).
//!
//! Types and pure functions only: no I/O, no clock, no process. The JSON
//! field names are a contract with result files already written (the
//! published ones in `bench/results/`): add fields, do not rename them.

mod pass_rule;
mod result;
mod workload;

pub use pass_rule::PassRule;
pub use result::{
    Acks, Churn, FindMaxRun, FindMaxTag, LoaderOutput, Quantiles, RoomInfo, SingleRun, StepResult,
};
pub use workload::Workload;
