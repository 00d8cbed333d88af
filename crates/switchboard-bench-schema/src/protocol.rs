//! The wire protocols the load generator speaks: what `switchboard-load
//! --protocol` takes, what `switchboard-bench` hands it for each system under
//! test, and what the result document records. One enum, so the three cannot
//! drift apart.

use serde::{Deserialize, Serialize};

/// How the load generator talks to the system under test.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Switchboard's JSON frames over a WebSocket at `/ws` (docs/PROTOCOL.md).
    #[default]
    Switchboard,
    /// Socket.IO 5 over Engine.IO 4, WebSocket transport only, at
    /// `/socket.io/`: the peer of `bench/peers/socketio/`.
    Socketio,
}

impl Protocol {
    /// The name on the command line and in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Switchboard => "switchboard",
            Protocol::Socketio => "socketio",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_are_the_command_line_names() {
        for p in [Protocol::Switchboard, Protocol::Socketio] {
            let json = serde_json::to_string(&p).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Protocol>(&json).ok(), Some(p));
        }
    }
}
