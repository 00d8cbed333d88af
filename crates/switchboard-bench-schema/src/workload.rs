//! The workload names: what `switchboard-load --workload` runs, what
//! `switchboard-bench --workload` hands it, and what the result document
//! records. One enum, so the three cannot drift apart.

use serde::{Deserialize, Serialize};

/// What the load generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Direct messages from a random connected user to a uniformly random other user.
    Dm,
    /// Room messages from a random member of a random room to that room.
    Room,
    /// `--room-share` room messages, the rest DMs.
    Mixed,
    /// DMs as in `dm`, while `--churn-rate` users per second disconnect and reconnect.
    Churn,
    /// No messages: open `--users` idle connections as fast as the server
    /// takes them, hold them, and reconnect the lost ones to
    /// `--reconnect-targets` (the loader writes a `ConnectionsRun`).
    Connections,
    /// No messages: `--users` churning users go online and offline at
    /// `--churn-rate` transitions per second while watcher connections on
    /// some instances watch them and count their `presence_event` frames
    /// (the loader writes a `PresenceRun`).
    Presence,
    /// No load generator: `switchboard-bench` itself connects `--users`
    /// receivers and makes `--records` DMs available through a Redis
    /// stream, a Kafka topic or `POST /api/v1/publish`, and times them end
    /// to end (`switchboard-load` refuses it).
    Ingest,
}

impl Workload {
    /// The name on the command line and in the JSON (`dm`, `room`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Dm => "dm",
            Workload::Room => "room",
            Workload::Mixed => "mixed",
            Workload::Churn => "churn",
            Workload::Connections => "connections",
            Workload::Presence => "presence",
            Workload::Ingest => "ingest",
        }
    }

    /// Whether this workload sends room messages (and so joins rooms).
    pub fn uses_rooms(self) -> bool {
        matches!(self, Workload::Room | Workload::Mixed)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_are_the_command_line_names() {
        for w in [
            Workload::Dm,
            Workload::Room,
            Workload::Mixed,
            Workload::Churn,
            Workload::Connections,
            Workload::Presence,
            Workload::Ingest,
        ] {
            let json = serde_json::to_string(&w).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", w.as_str()));
            assert_eq!(serde_json::from_str::<Workload>(&json).ok(), Some(w));
        }
    }
}
