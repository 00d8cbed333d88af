//! What the instances publish, as a test sees it from its own subscription.

use std::sync::{Arc, Mutex};

use crate::sentinel::Sentinel;
use crate::wait::{eventually, RECV_TIMEOUT};

/// One message seen on the bus.
#[derive(Clone, Debug)]
pub struct BusMessage {
    /// The channel it was published on, e.g. `sb:inst:{i2}`.
    pub channel: String,
    /// The bytes as published (envelope and frame).
    pub payload: Vec<u8>,
}

impl BusMessage {
    /// Whether the payload contains `needle` byte for byte (a body marker,
    /// or a whole body that must travel verbatim).
    pub fn contains(&self, needle: &str) -> bool {
        let needle = needle.as_bytes();
        !needle.is_empty() && self.payload.windows(needle.len()).any(|w| w == needle)
    }
}

/// Records every message published on channels matching its pattern (from
/// [`RedisServer::spy`](super::RedisServer::spy)), to check on which
/// channels, and how many times, a message was published.
pub struct Spy {
    seen: Arc<Mutex<Vec<BusMessage>>>,
    /// The reading task; stopped on drop.
    task: tokio::task::JoinHandle<()>,
}

impl Spy {
    pub(super) fn new(seen: Arc<Mutex<Vec<BusMessage>>>, task: tokio::task::JoinHandle<()>) -> Spy {
        Spy { seen, task }
    }

    /// Messages so far whose payload contains `needle` (e.g. a unique body
    /// marker), in the order Redis sent them.
    pub fn containing(&self, needle: &str) -> Vec<BusMessage> {
        self.seen
            .lock()
            .expect("spy mutex poisoned")
            .iter()
            .filter(|m| m.contains(needle))
            .cloned()
            .collect()
    }

    /// The channels `marker` was published on, in order, once the spy has
    /// seen `sentinel`. Sound when the sentinel was published after the
    /// message under test by the same instance: one instance's publishes
    /// reach Redis, and the spy, in order, so by then every publish of the
    /// message is in.
    pub async fn channels_of(&self, marker: &str, sentinel: &Sentinel) -> Vec<String> {
        eventually(
            RECV_TIMEOUT,
            &format!("the spy sees sentinel {}", sentinel.marker()),
            || async { !self.containing(sentinel.marker()).is_empty() },
        )
        .await;
        self.containing(marker)
            .into_iter()
            .map(|m| m.channel)
            .collect()
    }
}

impl Drop for Spy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
