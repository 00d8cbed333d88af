//! The message store: every user's **inbox** (an ordered log of the DMs sent
//! to them, kept within retention limits), the user's **cursor** (how far
//! their devices acknowledged), and the **idempotency** records of sends.
//!
//! The [`Store`] trait is what the router sees. Its one write on the message
//! path, [`Store::append`], appends a DM *and* publishes it to the instances
//! holding the recipient in one atomic step (Redis: one script). That is what
//! makes live delivery and the inbox agree: every instance receives a user's
//! stored DMs in inbox order, and a connection that announced itself in
//! presence before reading its backlog misses nothing (see
//! `docs/RELIABILITY.md`, "The seam").
//!
//! Implementations: [`crate::local::LocalBackend`] (in-process, bounded) and
//! `switchboard_redis::RedisBackend`. This module owns the types and the
//! frame layout; it never talks to Redis and never touches sockets.

use std::fmt;

use async_trait::async_trait;

use crate::bus::{Channel, Reached};
use crate::error::BackendError;
use crate::protocol::TextFrame;

/// A position in one user's inbox: strictly increasing per user. Written
/// `MS-N` (a Redis stream id); clients treat it as an opaque string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub n: u64,
}

impl Seq {
    /// Before every entry.
    pub const ZERO: Seq = Seq { ms: 0, n: 0 };

    /// Parses `MS-N` (both decimal); `None` for anything else.
    pub fn parse(text: &str) -> Option<Seq> {
        let (ms, n) = text.split_once('-')?;
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(n) {
            return None;
        }
        Some(Seq {
            ms: ms.parse().ok()?,
            n: n.parse().ok()?,
        })
    }

    /// The next position after `self` at time `now_ms` (the in-process
    /// store's generator, the same rule as Redis's `XADD *`).
    pub fn next_after(self, now_ms: u64) -> Seq {
        if now_ms > self.ms {
            Seq { ms: now_ms, n: 0 }
        } else {
            Seq {
                ms: self.ms,
                n: self.n + 1,
            }
        }
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.n)
    }
}

impl serde::Serialize for Seq {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The start every `dm` frame shares: a stored DM continues with
/// `,"seq":"S"` and then its tail, an ephemeral one with its tail.
pub const DM_HEAD: &str = r#"{"type":"dm""#;

/// A stored DM's frame: [`DM_HEAD`], its seq, then `tail` (`,"from":…}`).
pub fn dm_frame(seq: Seq, tail: &str) -> TextFrame {
    TextFrame::from(format!(r#"{DM_HEAD},"seq":"{seq}"{tail}"#))
}

/// The start every `room` frame shares (see [`DM_HEAD`]).
pub const ROOM_HEAD: &str = r#"{"type":"room""#;

/// A recorded room message's frame: [`ROOM_HEAD`], its seq, then `tail`.
pub fn room_frame(seq: Seq, tail: &str) -> TextFrame {
    TextFrame::from(format!(r#"{ROOM_HEAD},"seq":"{seq}"{tail}"#))
}

/// A room message to record in the room's history and publish.
#[derive(Debug, Clone, Copy)]
pub struct RoomAppend<'a> {
    /// The room.
    pub room: &'a str,
    /// The accepting instance.
    pub origin: &'a str,
    /// The sending connection (`-` for none), which does not get it.
    pub conn: &'a str,
    /// The frame after its `seq`: `,"room":…,"ts":…}`.
    pub tail: &'a str,
}

/// Room messages read from a room's history.
#[derive(Debug, Clone, Default)]
pub struct RoomBacklog {
    /// The messages after the position asked for, oldest first.
    pub entries: Vec<(Seq, TextFrame)>,
    /// `false` when history no longer reaches back to that position (some
    /// messages after it were trimmed or expired).
    pub recovered: bool,
}

/// Where [`Store::append`] publishes the DM after storing it.
#[derive(Debug, Clone, Copy)]
pub enum Fanout<'a> {
    /// The personal channel of every instance holding the recipient
    /// (routed mode), read from presence in the same step.
    Holders,
    /// One channel (the broadcast or the recipient's user channel: the
    /// benchmark's baselines).
    Channel(Channel<'a>),
}

/// A DM to store and publish.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// Recipient user.
    pub to: &'a str,
    /// Sender (a user, or a service's label).
    pub from: &'a str,
    /// The accepting instance.
    pub origin: &'a str,
    /// The message id (kept unless this is a duplicate send).
    pub msg_id: &'a str,
    /// The sender's idempotency key, if any.
    pub key: Option<&'a str>,
    /// Whether the sender asked for a delivery receipt.
    pub receipt: bool,
    /// The frame after its `seq`: `,"from":…,"msg_id":…,"ts":…}`.
    pub tail: &'a str,
    /// Where to publish.
    pub fanout: Fanout<'a>,
}

/// What [`Store::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The inbox position; `None` when it was not stored (the recipient has
    /// not been seen within the inbox TTL: see [`Store`]).
    pub seq: Option<Seq>,
    /// The message id: the first send's when `duplicate`.
    pub msg_id: String,
    /// Whether some instance holding the recipient received it (the first
    /// send's answer when `duplicate`).
    pub reached_any: bool,
    /// A send with the same sender, recipient and key was already accepted
    /// within the idempotency window: nothing was stored or published now.
    pub duplicate: bool,
    /// The instances published to, with their receiver counts (empty for a
    /// duplicate, and for the channel fan-outs).
    pub reached: Vec<Reached>,
}

/// Entries read from an inbox.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    /// The position read after (the `since` asked for, or the cursor).
    pub after: Seq,
    /// The entries after it, oldest first, as frames.
    pub entries: Vec<(Seq, TextFrame)>,
    /// Entries after `after` were dropped by the retention limits (or the
    /// whole inbox expired): the reader must be told.
    pub gap: bool,
    /// The newest seq appended to the inbox when it was read (the
    /// predecessor the next entry will record), when the store knows it.
    /// A reader that has read every entry after `after` has, with a gap
    /// reported, seen everything up to it: the next live DM, whose
    /// predecessor this is, follows without a hole even when this entry
    /// itself was trimmed.
    pub newest: Option<Seq>,
}

/// A delivery receipt due because the recipient acknowledged a DM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Who sent the DM (and receives the receipt).
    pub sender: String,
    /// The DM's message id.
    pub msg_id: String,
    /// The DM's inbox position.
    pub seq: Seq,
}

/// Retention and idempotency settings shared by every store.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Most entries kept per inbox (the oldest are trimmed).
    pub inbox_max_len: usize,
    /// How long an inbox is kept after its user last connected, and the
    /// oldest an entry may be, in milliseconds.
    pub inbox_ttl_ms: u64,
    /// How long an idempotency key is remembered, in milliseconds.
    pub idempotency_window_ms: u64,
    /// Messages kept per room (0: room history is off, room messages are
    /// delivered the v1 way, without `seq`).
    pub room_history: usize,
    /// How long a room's history is kept after its last message, in ms.
    pub room_history_ttl_ms: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            inbox_max_len: 1000,
            inbox_ttl_ms: 604_800_000,
            idempotency_window_ms: 300_000,
            room_history: 100,
            room_history_ttl_ms: 86_400_000,
        }
    }
}

/// The message store as the router sees it.
///
/// Memory is bounded: an inbox exists only for a user seen (connected)
/// within the inbox TTL or online now, so DMs to names that never connect
/// create nothing (they are answered `stored: false` and counted); each inbox
/// keeps at most `inbox_max_len` entries of at most the frame size limit.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a DM in its recipient's inbox and publishes it (with its
    /// seq) as `fanout` says, in one atomic step, so every subscriber
    /// receives one user's stored DMs in inbox order. A duplicate key
    /// returns the first send's answer and does nothing.
    async fn append(&self, dm: &Append<'_>) -> Result<Appended, BackendError>;

    /// Reads up to `limit` entries after `after` (or after the user's
    /// cursor when `None`). With `open`, also marks the user seen (creating
    /// their inbox record) and applies the age limit first.
    async fn read(
        &self,
        user: &str,
        after: Option<Seq>,
        limit: usize,
        open: bool,
    ) -> Result<Backlog, BackendError>;

    /// Moves the user's cursor to `seq` (never backwards, never past the
    /// newest entry) and returns the receipts the acknowledged entries asked
    /// for.
    async fn ack(&self, user: &str, seq: Seq) -> Result<Vec<Receipt>, BackendError>;

    /// The retention settings (the router asks whether room history is on).
    fn limits(&self) -> StoreLimits;

    /// Records a room message in the room's history and publishes it with
    /// its seq on the room's channel, in one atomic step (the order of the
    /// history is the order every member instance receives it in).
    async fn append_room(&self, message: &RoomAppend<'_>) -> Result<Seq, BackendError>;

    /// Up to `limit` room messages after `after`.
    async fn read_room(
        &self,
        room: &str,
        after: Seq,
        limit: usize,
    ) -> Result<RoomBacklog, BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_parse_compare_and_print() {
        let a = Seq::parse("1700000000000-0").expect("seq");
        let b = Seq::parse("1700000000000-10").expect("seq");
        let c = Seq::parse("1700000000001-2").expect("seq");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        for bad in ["", "1", "1-", "-1", "a-1", "1-1-1", "1 -1", "+1-1"] {
            assert_eq!(Seq::parse(bad), None, "{bad}");
        }
        assert_eq!(a.next_after(1), Seq { ms: a.ms, n: 1 });
        assert_eq!(a.next_after(a.ms + 5), Seq { ms: a.ms + 5, n: 0 });
    }

    #[test]
    fn stored_frames_put_seq_second() {
        let frame = dm_frame(Seq { ms: 5, n: 1 }, r#","from":"a","body":1}"#);
        assert_eq!(
            frame.as_str(),
            r#"{"type":"dm","seq":"5-1","from":"a","body":1}"#
        );
    }
}
