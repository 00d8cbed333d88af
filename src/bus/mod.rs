//! The message bus between instances: the [`Bus`] trait the router publishes
//! and subscribes through, the channel names it knows abstractly, and the
//! [`Envelope`] every bus message carries.
//!
//! An envelope is a one-line text header followed by the client frame, already
//! serialized by the sending instance. The receiver routes on the header alone
//! (no JSON parsing) and forwards the frame bytes unchanged to its sockets, so
//! a message is serialized once in the whole cluster, and an instance can drop
//! a message not addressed to it at the cost of reading one line.
//!
//! Implementations: [`local::LocalBus`] (in-process, the embedded mode and the
//! router's unit tests) and `crate::redis::RedisBus`. This module never talks
//! to Redis and never touches sockets.

pub mod local;

use async_trait::async_trait;
use bytes::Bytes;

/// A channel, named abstractly: each bus maps it to its own naming scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel<'a> {
    /// The personal channel of one instance (DMs routed to it).
    Instance(&'a str),
    /// A room's channel, subscribed while the instance has a local member.
    Room(&'a str),
    /// The single broadcast channel of `--routing broadcast`.
    All,
    /// A user's channel (`--routing user-channel`), subscribed while the
    /// instance holds the user.
    User(&'a str),
}

/// Which kind of channel a received message came from (for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// This instance's personal channel.
    Personal,
    /// A room channel.
    Room,
    /// The broadcast channel.
    Broadcast,
    /// A user's channel.
    User,
}

/// A message received from the bus, queued for the dispatcher.
#[derive(Debug)]
pub struct Inbound {
    /// The kind of channel it came from.
    pub kind: ChannelKind,
    /// The encoded [`Envelope`].
    pub payload: Vec<u8>,
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The shared backend cannot be reached; the caller answers `unavailable`.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// Publish/subscribe between instances. Received messages are pushed into the
/// bounded inbox the implementation was built with.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a payload; returns how many subscribers received it.
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BusError>;
    /// Starts receiving a channel's messages.
    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BusError>;
    /// Stops receiving a channel's messages.
    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BusError>;

    /// Publishes `payload` on the personal channel of every live instance
    /// holding `user`, except `skip` (the caller), reading presence and
    /// publishing in one step where the backend can (Redis: one script, one
    /// round trip instead of two). Returns each instance published to with
    /// its receiver count. `None`: this backend cannot combine the two; the
    /// router then reads presence and publishes itself.
    async fn publish_to_holders(
        &self,
        _user: &str,
        _skip: &str,
        _payload: Bytes,
    ) -> Option<Result<Vec<(String, usize)>, BusError>> {
        None
    }
}

/// The routing header of a bus message. The frame after it is opaque here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// A direct message for `to`.
    Direct {
        /// Recipient user.
        to: &'a str,
        /// 0 when first routed, 1 when re-routed after the recipient moved;
        /// a re-routed message is never re-routed again (no ping-pong).
        hop: u8,
        /// Instance that accepted the message from its sender.
        origin: &'a str,
    },
    /// A room message.
    Room {
        /// The room.
        room: &'a str,
        /// Instance that accepted the message (it delivered locally already).
        origin: &'a str,
        /// Sending connection, which must not receive its own message.
        conn: &'a str,
    },
}

impl Envelope<'_> {
    /// Header line plus frame, as published on the bus.
    pub fn encode(&self, frame: &str) -> Bytes {
        let header = match self {
            Envelope::Direct { to, hop, origin } => format!("D {to} {hop} {origin}\n"),
            Envelope::Room { room, origin, conn } => format!("R {room} {origin} {conn}\n"),
        };
        let mut out = Vec::with_capacity(header.len() + frame.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(frame.as_bytes());
        Bytes::from(out)
    }

    /// Splits a payload into its header and the byte offset of the frame.
    /// Returns `None` for anything that is not a well-formed envelope.
    pub fn decode(payload: &[u8]) -> Option<(Envelope<'_>, usize)> {
        let newline = payload.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&payload[..newline]).ok()?;
        let mut parts = header.split(' ');
        let envelope = match (parts.next()?, parts.next()?, parts.next()?, parts.next()?) {
            ("D", to, hop, origin) => Envelope::Direct {
                to,
                hop: hop.parse().ok()?,
                origin,
            },
            ("R", room, origin, conn) => Envelope::Room { room, origin, conn },
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some((envelope, newline + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let e = Envelope::Direct {
            to: "bob",
            hop: 1,
            origin: "i1",
        };
        let bytes = e.encode("{\"x\":1}");
        let (decoded, at) = Envelope::decode(&bytes).expect("decodes");
        assert_eq!(decoded, e);
        assert_eq!(&bytes[at..], b"{\"x\":1}");

        let r = Envelope::Room {
            room: "lobby",
            origin: "i2",
            conn: "i2/7",
        };
        let bytes = r.encode("{}");
        assert_eq!(Envelope::decode(&bytes).map(|(e, _)| e), Some(r));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            b"no newline",
            b"X a b c\n{}",
            b"D bob x i1\n{}",
            b"D bob 0\n{}",
            b"D a 0 b c\n{}",
        ] {
            assert!(
                Envelope::decode(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
