//! Presence watches and room member events (protocol: `watch`, `unwatch`,
//! `members`, `join` with `"events"`), from a client's side: the requests,
//! and reading the pushed `presence_event`, `member_joined` and
//! `member_left` frames in arrival order while every other frame stays
//! buffered for later `recv_*` calls.
//!
//! Nothing here proves that an event did *not* arrive by itself: a test
//! waits a bounded quiet time longer than the grace, then causes a real
//! transition of another watched user and asserts that it is the next
//! event ([`Client::next_of`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{Client, Incoming};

/// The `type` of a watched user's transition frame.
pub const PRESENCE_EVENT: &str = "presence_event";
/// The `type` of a room member's user-level join.
pub const MEMBER_JOINED: &str = "member_joined";
/// The `type` of a room member's user-level leave.
pub const MEMBER_LEFT: &str = "member_left";
/// Both member event types.
pub const MEMBER_EVENTS: &[&str] = &[MEMBER_JOINED, MEMBER_LEFT];

/// `(user, online, ts)` of a `presence_event` frame; panics (showing the
/// frame) when it is not a well-formed one.
pub fn presence_event(frame: &Value) -> (String, bool, i64) {
    assert_eq!(
        frame["type"], PRESENCE_EVENT,
        "expected a presence_event, got {frame}"
    );
    let user = frame["user"]
        .as_str()
        .unwrap_or_else(|| panic!("presence_event without a string user: {frame}"));
    let online = frame["online"]
        .as_bool()
        .unwrap_or_else(|| panic!("presence_event without a bool online: {frame}"));
    let ts = frame["ts"]
        .as_i64()
        .unwrap_or_else(|| panic!("presence_event without an integer ts: {frame}"));
    (user.to_string(), online, ts)
}

/// `(room, user, joined, ts)` of a `member_joined` / `member_left` frame;
/// panics (showing the frame) when it is not a well-formed one.
pub fn member_event(frame: &Value) -> (String, String, bool, i64) {
    let joined = match frame["type"].as_str() {
        Some(MEMBER_JOINED) => true,
        Some(MEMBER_LEFT) => false,
        _ => panic!("expected member_joined or member_left, got {frame}"),
    };
    let room = frame["room"]
        .as_str()
        .unwrap_or_else(|| panic!("member event without a string room: {frame}"));
    let user = frame["user"]
        .as_str()
        .unwrap_or_else(|| panic!("member event without a string user: {frame}"));
    let ts = frame["ts"]
        .as_i64()
        .unwrap_or_else(|| panic!("member event without an integer ts: {frame}"));
    (room.to_string(), user.to_string(), joined, ts)
}

/// The `online` map of a `presence` frame (the reply to `presence` and to
/// `watch`); panics (showing the frame) when it is not one.
pub fn online_map(reply: &Value) -> BTreeMap<String, bool> {
    assert_eq!(
        reply["type"], "presence",
        "expected a presence frame: {reply}"
    );
    let online = reply["online"]
        .as_object()
        .unwrap_or_else(|| panic!("presence frame without an online object: {reply}"));
    online
        .iter()
        .map(|(user, state)| {
            let state = state
                .as_bool()
                .unwrap_or_else(|| panic!("presence of {user} is not a bool: {reply}"));
            (user.clone(), state)
        })
        .collect()
}

impl Client {
    /// Sends `watch` for `users` and returns the reply as it is (the
    /// `presence` frame, or an error frame).
    pub async fn watch_reply(&mut self, users: &[&str]) -> Value {
        self.request(json!({"type": "watch", "users": users})).await
    }

    /// Sends `watch` for `users`, asserts that the reply is the `presence`
    /// frame naming exactly them, and returns each one's state.
    pub async fn watch(&mut self, users: &[&str]) -> BTreeMap<String, bool> {
        let reply = self.watch_reply(users).await;
        let online = online_map(&reply);
        let mut want: Vec<&str> = users.to_vec();
        want.sort_unstable();
        want.dedup();
        let got: Vec<&str> = online.keys().map(String::as_str).collect();
        assert_eq!(
            got, want,
            "[{}] the watch ack must report exactly the watched users: {reply}",
            self.label
        );
        online
    }

    /// Sends `unwatch` for `users` and asserts the `ok` ack.
    pub async fn unwatch(&mut self, users: &[&str]) {
        let reply = self
            .request(json!({"type": "unwatch", "users": users}))
            .await;
        assert_eq!(
            (reply["type"].as_str(), reply["status"].as_str()),
            (Some("ack"), Some("ok")),
            "[{}] unwatch {users:?}: {reply}",
            self.label
        );
    }

    /// Sends `members` for `room` and returns the reply as it is.
    pub async fn members_reply(&mut self, room: &str) -> Value {
        self.request(json!({"type": "members", "room": room})).await
    }

    /// `join` with `"events": events`, asserting the `ok` ack.
    pub async fn join_with_events(&mut self, room: &str, events: bool) {
        // Kept even for `events: false`: so a member event that came anyway
        // would be seen.
        self.keep_member_events();
        let reply = self
            .request(json!({"type": "join", "room": room, "events": events}))
            .await;
        assert_eq!(
            (reply["type"].as_str(), reply["status"].as_str()),
            (Some("ack"), Some("ok")),
            "[{}] join {room} (events {events}): {reply}",
            self.label
        );
    }

    /// `join` (member events on, the default), asserting the `ok` ack.
    pub async fn join(&mut self, room: &str) {
        self.keep_member_events();
        let reply = self.request(json!({"type": "join", "room": room})).await;
        assert_eq!(
            (reply["type"].as_str(), reply["status"].as_str()),
            (Some("ack"), Some("ok")),
            "[{}] join {room}: {reply}",
            self.label
        );
    }

    /// `leave`, asserting the `ok` ack.
    pub async fn leave(&mut self, room: &str) {
        let reply = self.request(json!({"type": "leave", "room": room})).await;
        assert_eq!(
            (reply["type"].as_str(), reply["status"].as_str()),
            (Some("ack"), Some("ok")),
            "[{}] leave {room}: {reply}",
            self.label
        );
    }

    /// The next frame (buffered ones first) whose `type` is one of `types`,
    /// waiting up to `timeout`; frames of other types stay buffered, in
    /// order. None when the time is up. Panics if the connection ends.
    pub async fn next_of(&mut self, types: &[&str], timeout: Duration) -> Option<Value> {
        let is_wanted = |frame: &Value| types.iter().any(|ty| frame["type"] == *ty);
        if let Some(pos) = self.buffered.iter().position(is_wanted) {
            return self.buffered.remove(pos);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_incoming(left).await {
                Incoming::Json(frame) if is_wanted(&frame) => return Some(frame),
                Incoming::Json(frame) => self.buffered.push_back(frame),
                Incoming::Timeout => return None,
                Incoming::Closed(code) => panic!(
                    "[{}] connection closed (code {code:?}) while waiting for {types:?}",
                    self.label
                ),
                Incoming::Ended(e) => panic!(
                    "[{}] connection ended ({e}) while waiting for {types:?}",
                    self.label
                ),
            }
        }
    }

    /// Every frame of one of `types` that is buffered or arrives within
    /// `window`, in order; other frames stay buffered. Panics if the
    /// connection ends.
    pub async fn collect_of(&mut self, types: &[&str], window: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + window;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_of(types, left).await {
                Some(frame) => frames.push(frame),
                None => return frames,
            }
        }
    }

    /// The label (`user@instance`) this client's panic messages carry.
    pub fn label(&self) -> &str {
        &self.label
    }
}
