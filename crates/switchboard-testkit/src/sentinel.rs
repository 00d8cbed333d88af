//! Proving that a message did *not* arrive, without guessing how long to
//! wait: after the message under test, send a sentinel that travels the
//! same path (or one at least as slow), wait for it, and check that nothing
//! came before it.
//!
//! What makes that sound is the server's ordering: DMs from one connection
//! to one recipient arrive in the order sent; room messages from one
//! connection arrive at each member in the order sent; bus messages from one
//! instance to another travel over one Redis connection in order. Each test
//! says in a comment why its sentinel's path is at least as slow as the one
//! the unwanted frame would take.

use serde_json::{json, Value};

use crate::client::Client;
use crate::misc::unique;
use crate::wait::RECV_TIMEOUT;

/// A uniquely marked message whose arrival shows that everything sent
/// before it, along its path, has arrived.
#[derive(Debug)]
pub struct Sentinel {
    marker: String,
}

impl Sentinel {
    /// A sentinel with a fresh marker, to send by hand (e.g. through the
    /// HTTP API with [`Sentinel::body`]).
    pub fn unique() -> Sentinel {
        Sentinel {
            marker: unique("sentinel"),
        }
    }

    /// Its marker, to find it among what a [`Spy`](crate::Spy) saw.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// The body of a dm or room message that carries it.
    pub fn body(&self) -> Value {
        json!({"sentinel": self.marker})
    }

    /// Whether `frame` is this sentinel: a dm/room frame with its body, or
    /// the pong to a ping with its marker as id.
    fn is(&self, frame: &Value) -> bool {
        frame["body"]["sentinel"] == self.marker.as_str()
            || (frame["type"] == "pong" && frame["id"] == self.marker.as_str())
    }
}

impl Client {
    /// Sends a sentinel DM to `to` and waits for its ack (`routed`).
    pub async fn send_sentinel_dm(&mut self, to: &str) -> Sentinel {
        let sentinel = Sentinel::unique();
        let ack = self
            .request(json!({"type": "dm", "to": to, "body": sentinel.body()}))
            .await;
        assert_eq!(
            ack["status"], "routed",
            "[{}] sentinel DM to {to}: {ack}",
            self.label
        );
        sentinel
    }

    /// Sends a sentinel room message to `room` (this connection must be a
    /// member) and waits for its ack.
    pub async fn send_sentinel_room(&mut self, room: &str) -> Sentinel {
        let sentinel = Sentinel::unique();
        let ack = self
            .request(json!({"type": "room", "room": room, "body": sentinel.body()}))
            .await;
        assert_eq!(
            ack["status"], "ok",
            "[{}] sentinel room message to {room}: {ack}",
            self.label
        );
        sentinel
    }

    /// Sends a ping whose pong is the sentinel, without waiting for it: a
    /// connection's frames are answered in order, so the pong comes after
    /// every reply to what this connection sent before.
    pub async fn send_sentinel_ping(&mut self) -> Sentinel {
        let sentinel = Sentinel::unique();
        self.send_json(&json!({"type": "ping", "id": sentinel.marker}))
            .await;
        sentinel
    }

    /// Waits for `sentinel` and asserts that it is the first frame since
    /// the last one the test read: nothing arrived before it.
    pub async fn expect_nothing_before(&mut self, sentinel: &Sentinel) {
        let first = match self.buffered.pop_front() {
            Some(frame) => frame,
            None => {
                let waiting_for = format!("sentinel {}", sentinel.marker);
                self.read_json(RECV_TIMEOUT, &waiting_for).await
            }
        };
        assert!(
            sentinel.is(&first),
            "[{}] expected nothing before sentinel {}, but received {first} (then buffered: {:?})",
            self.label,
            sentinel.marker,
            self.buffered
        );
    }

    /// Every frame that arrives before `sentinel` (which is consumed), in
    /// order: for tests that count what arrived, duplicates included.
    pub async fn frames_until(&mut self, sentinel: &Sentinel) -> Vec<Value> {
        let mut frames = Vec::new();
        let waiting_for = format!("sentinel {}", sentinel.marker);
        loop {
            let frame = match self.buffered.pop_front() {
                Some(frame) => frame,
                None => self.read_json(RECV_TIMEOUT, &waiting_for).await,
            };
            if sentinel.is(&frame) {
                return frames;
            }
            frames.push(frame);
        }
    }
}
