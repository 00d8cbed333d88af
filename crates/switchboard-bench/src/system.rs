//! The systems a run can measure: Switchboard in one routing mode, or the
//! Socket.IO peer (`bench/peers/socketio`) with one Redis adapter. Each is a
//! row ("mode") of the results, so one results file holds both side by side;
//! this module says, per system, what the loader speaks to it, where its
//! readiness and counters are, and under which names its counters are read.
//!
//! Starting the peer's processes is the `peer` module's business; this one
//! holds only the facts.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use switchboard_bench_schema::Protocol;

use crate::cli::RoutingMode;

/// A peer system `--peer` can add to the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Peer {
    /// Socket.IO 4 with `@socket.io/redis-adapter` (bench/peers/socketio).
    Socketio,
}

/// The Socket.IO peer's Redis adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerAdapter {
    /// `createAdapter`: every node PSUBSCRIBEs every room's channel, so every
    /// node receives every DM (the "broadcast everything" design).
    Classic,
    /// `createShardedAdapter` (subscription mode "dynamic"): SPUBLISH on a
    /// channel per room, SSUBSCRIBEd only by the nodes holding the room.
    Sharded,
}

impl PeerAdapter {
    /// The name `server.js --adapter` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerAdapter::Classic => "classic",
            PeerAdapter::Sharded => "sharded",
        }
    }
}

/// What one run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// N `switchboard` instances in this routing mode.
    Switchboard(RoutingMode),
    /// N Socket.IO peer nodes with this adapter.
    Socketio(PeerAdapter),
}

/// Where a system's counters are in its scrape (Switchboard's `/metrics`,
/// or the peer's `/stats` read by `peer::scrape_of_stats`). Breakdowns are
/// read by label (`kind`, `path`, `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricNames {
    /// Gauge: connected (welcomed) clients.
    pub connections: &'static str,
    /// Counter: frames queued to client sockets, as the system counts them
    /// (the peer: every Engine.IO packet); the window's "quiet" test reads it.
    pub frames_queued: &'static str,
    /// Counter by `kind`: bus messages received from Redis.
    pub bus_received: &'static str,
    /// Counter by `kind`: bus messages published to Redis.
    pub bus_published: &'static str,
    /// Counter by `path`: DMs sent from the instance.
    pub dm_by_path: &'static str,
    /// Counter by `reason`: messages dropped or refused.
    pub dropped: &'static str,
}

impl MetricNames {
    /// Switchboard's `/metrics`.
    pub const SWITCHBOARD: MetricNames = MetricNames {
        connections: "switchboard_connections",
        frames_queued: "switchboard_delivered_total",
        bus_received: "switchboard_bus_received_total",
        bus_published: "switchboard_bus_published_total",
        dm_by_path: "switchboard_dm_total",
        dropped: "switchboard_dropped_total",
    };

    /// The Socket.IO peer's `/stats`, as `peer::scrape_of_stats` names it.
    pub const SOCKETIO: MetricNames = MetricNames {
        connections: "socketio_connections",
        frames_queued: "socketio_packets_out_total",
        bus_received: "socketio_bus_received_total",
        bus_published: "socketio_bus_published_total",
        dm_by_path: "socketio_dm_total",
        dropped: "socketio_dropped_total",
    };
}

impl System {
    /// Every system `--modes` and `--peer` can name, for parsing results.
    fn all() -> impl Iterator<Item = System> {
        RoutingMode::ALL.into_iter().map(System::Switchboard).chain(
            PeerAdapter::value_variants()
                .iter()
                .map(|&a| System::Socketio(a)),
        )
    }

    /// The row name in the results: the routing mode (`routed`), or
    /// `socketio-<adapter>`.
    pub fn name(self) -> String {
        match self {
            System::Switchboard(mode) => mode.as_str().to_owned(),
            System::Socketio(adapter) => format!("socketio-{}", adapter.as_str()),
        }
    }

    /// The system a row name stands for.
    pub fn from_name(name: &str) -> Option<System> {
        System::all().find(|s| s.name() == name)
    }

    /// What the loader speaks to it.
    pub fn protocol(self) -> Protocol {
        match self {
            System::Switchboard(_) => Protocol::Switchboard,
            System::Socketio(_) => Protocol::Socketio,
        }
    }

    /// The HTTP path that answers 200 once an instance is ready.
    pub fn ready_path(self) -> &'static str {
        match self {
            System::Switchboard(_) => "/readyz",
            System::Socketio(_) => "/healthz",
        }
    }

    /// The HTTP path of the counters.
    pub fn counters_path(self) -> &'static str {
        match self {
            System::Switchboard(_) => "/metrics",
            System::Socketio(_) => "/stats",
        }
    }

    /// Where its counters are in a scrape.
    pub fn metric_names(self) -> &'static MetricNames {
        match self {
            System::Switchboard(_) => &MetricNames::SWITCHBOARD,
            System::Socketio(_) => &MetricNames::SOCKETIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_names_read_back() {
        for system in System::all() {
            assert_eq!(System::from_name(&system.name()), Some(system));
        }
        assert_eq!(
            System::from_name("socketio-sharded"),
            Some(System::Socketio(PeerAdapter::Sharded))
        );
        assert_eq!(
            System::from_name("routed").map(System::protocol),
            Some(Protocol::Switchboard)
        );
        assert_eq!(System::from_name("socketio"), None);
    }
}
