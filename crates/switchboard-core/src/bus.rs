//! The message bus between instances: the [`Bus`] trait the router publishes,
//! subscribes and routes through, the channels it names abstractly, and the
//! [`Envelope`] every bus message carries.
//!
//! An envelope is a one-line text header followed by the client frame, already
//! serialized by the sending instance. The receiver routes on the header alone
//! (no JSON parsing) and forwards the frame bytes unchanged to its sockets, so
//! a message is serialized once in the whole cluster, and an instance can drop
//! a message not addressed to it at the cost of reading one line.
//!
//! Implementations: [`crate::local::LocalBackend`] (in-process: the embedded
//! mode, and the second backend of every router test) and
//! `switchboard_redis::RedisBackend`. This module never talks to Redis and
//! never touches sockets.

use std::fmt::Write as _;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BackendError;
use crate::queue::Weighed;
use crate::store::Seq;

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
    /// Not a channel: the bus telling the router that its subscriptions
    /// were re-established after bus messages may have been lost (a
    /// reconnection, a failover, a moved slot). Its payload is empty.
    /// Every connection then reads its inbox after the last stored DM it
    /// has, so a lost one is not lost silently.
    Resubscribed,
}

/// A message received from the bus, queued for the dispatcher.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The kind of channel it came from.
    pub kind: ChannelKind,
    /// The encoded [`Envelope`] and frame.
    pub payload: Bytes,
}

impl Weighed for Inbound {
    fn weight(&self) -> usize {
        self.payload.len()
    }
}

/// A direct message to route to the instances holding its recipient.
#[derive(Debug, Clone, Copy)]
pub struct DirectRoute<'a> {
    /// The recipient user.
    pub to: &'a str,
    /// 0 when first routed by the instance that accepted it, 1 when re-routed
    /// by an instance that no longer held the recipient.
    pub hop: u8,
    /// The instance that accepted the message from its sender.
    pub origin: &'a str,
    /// The instance asking (never published to: it has done its local part).
    pub caller: &'a str,
    /// Instances that already have the message: they delivered it to their
    /// local connections, or were published it. Never published to again —
    /// this is what makes a re-route unable to duplicate.
    pub covered: &'a [&'a str],
    /// The client frame, serialized once by `origin`.
    pub frame: &'a [u8],
}

impl DirectRoute<'_> {
    /// Whether a holder of the recipient is one to publish to: neither the
    /// caller nor an instance that already has the message. (Every backend
    /// asks this; whether the holder is alive is the backend's business.)
    pub fn publishes_to(&self, instance: &str) -> bool {
        instance != self.caller && !self.covered.contains(&instance)
    }

    /// The bus payload for publishing to `targets`: the DM's envelope, its
    /// covered list this route's plus the targets, then the frame.
    pub fn payload(&self, targets: &[&str]) -> Bytes {
        let covered =
            Envelope::covered_field(self.covered.iter().copied().chain(targets.iter().copied()));
        Envelope::Direct {
            to: self.to,
            hop: self.hop,
            origin: self.origin,
            covered: Covered::from_field(&covered),
            seq: None,
            prev: None,
        }
        .encode(self.frame)
    }
}

/// One instance a [`Bus::route_direct`] published to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    /// The instance.
    pub instance: String,
    /// How many of its subscriber connections received the message: 0 means
    /// it is not listening (crashed, or its presence entry is stale).
    pub receivers: usize,
}

/// Publish/subscribe between instances. Received messages are pushed into the
/// bounded inbox the implementation was built with.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a payload; returns how many instances received it.
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BackendError>;

    /// Starts receiving a channel's messages.
    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BackendError>;

    /// Stops receiving a channel's messages.
    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BackendError>;

    /// The routing operation: publishes the DM on the personal channel of
    /// every live instance holding `route.to`, except `route.caller` and the
    /// instances in `route.covered`, as one envelope whose covered list is
    /// `route.covered` plus every instance published to (see
    /// [`Envelope::Direct`]). Presence is read and the publishes are made in
    /// one step (Redis: one script, one round trip), so the instances
    /// published to are exactly the holders at one moment.
    async fn route_direct(&self, route: &DirectRoute<'_>) -> Result<Vec<Reached>, BackendError>;
}

/// The covered list of a direct message's header: comma-separated instance
/// ids (instance ids never contain a comma or a space), `-` when empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Covered<'a>(&'a str);

impl<'a> Covered<'a> {
    /// The empty list.
    pub const NONE: Covered<'static> = Covered("-");

    /// Wraps the header field as written (`-` or `a,b`).
    pub fn from_field(field: &'a str) -> Covered<'a> {
        Covered(field)
    }

    /// The instances in the list.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> {
        let list = if self.0 == "-" { "" } else { self.0 };
        list.split(',').filter(|id| !id.is_empty())
    }

    /// Whether `instance` already has the message.
    pub fn contains(&self, instance: &str) -> bool {
        self.iter().any(|id| id == instance)
    }

    /// The header field.
    pub fn as_field(&self) -> &'a str {
        self.0
    }
}

/// The routing header of a bus message. The frame after it is opaque here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// A direct message for `to`: `D <to> <hop> <origin> <covered> [<seq>
    /// [<prev>]]`.
    Direct {
        /// Recipient user.
        to: &'a str,
        /// 0 when first routed, 1 when re-routed after the recipient moved;
        /// a re-routed message is never re-routed again (no ping-pong).
        hop: u8,
        /// Instance that accepted the message from its sender.
        origin: &'a str,
        /// Every instance that has the message: the origin if it delivered it
        /// locally, and every instance it was published to, in this routing
        /// step and the ones before.
        covered: Covered<'a>,
        /// The inbox position of a stored DM (written as a sixth field).
        /// A stored DM is never re-routed: a recipient that moved reads it
        /// from the inbox (see `store`).
        seq: Option<Seq>,
        /// The seq of the entry appended to the same inbox just before this
        /// one (`0-0` for none): a seventh field, only after `seq`. A
        /// connection that has not had `prev` has a hole before this DM and
        /// repairs it from the inbox instead of taking an earlier DM that
        /// arrives later for a duplicate. `None` (a sender that does not
        /// write it): no chain information, the DM is taken in seq order.
        prev: Option<Seq>,
    },
    /// A room message: `R <room> <origin> <conn> [<seq> [<prev>]]`.
    Room {
        /// The room.
        room: &'a str,
        /// Instance that accepted the message (it delivered locally already).
        origin: &'a str,
        /// Sending connection, which must not receive its own message.
        conn: &'a str,
        /// The room-history position of a recorded room message (a fourth
        /// field). A recorded message is delivered from the bus on every
        /// instance, the origin's too, so members see history order.
        seq: Option<Seq>,
        /// The previous message of the room's history (a fifth field, only
        /// after `seq`; see [`Envelope::Direct`]'s `prev`).
        prev: Option<Seq>,
    },
    /// A command from the server API for every connection of `user` on
    /// the receiving instance: `C <user> <origin> disconnect` (the frame
    /// is the close reason text) or `C <user> <origin> kick <room>`.
    /// Published only to the instances that hold `user`.
    Control {
        /// The user it acts on.
        user: &'a str,
        /// The instance the API request reached (it acted locally already).
        origin: &'a str,
        /// What to do.
        action: ControlAction<'a>,
    },
    /// A user-level presence transition: `P <user> <0|1> <version> <ts>`
    /// (empty frame), published on the personal channel of every instance
    /// watching `user`.
    Presence {
        /// The user.
        user: &'a str,
        /// Online after the transition.
        online: bool,
        /// The transition's version (see `presence::Announced`).
        version: u64,
        /// When, unix milliseconds.
        ts_ms: u64,
    },
    /// A room membership transition: `M <room> <user> <0|1> <version> <ts>`
    /// (empty frame), published on the room's channel.
    Member {
        /// The room.
        room: &'a str,
        /// The user.
        user: &'a str,
        /// A member after the transition.
        joined: bool,
        /// The transition's version.
        version: u64,
        /// When, unix milliseconds.
        ts_ms: u64,
    },
}

/// What a [`Envelope::Control`] message asks of a user's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction<'a> {
    /// Close every connection (4002).
    Disconnect,
    /// Take every connection out of the room (each gets a `left` event).
    Kick {
        /// The room.
        room: &'a str,
    },
}

impl Envelope<'_> {
    /// The header of a direct message up to (not including) its covered
    /// list: `D <to> <hop> <origin> `. The Redis routing script appends the
    /// covered list, a newline and the frame to exactly this.
    pub fn direct_head(to: &str, hop: u8, origin: &str) -> String {
        format!("D {to} {hop} {origin} ")
    }

    /// Joins instance ids into a covered-list header field.
    pub fn covered_field<'i>(instances: impl IntoIterator<Item = &'i str>) -> String {
        let mut field = String::new();
        for id in instances {
            if !field.is_empty() {
                field.push(',');
            }
            field.push_str(id);
        }
        if field.is_empty() {
            field.push('-');
        }
        field
    }

    /// Header line plus frame, as published on the bus. `prev` is written
    /// only after a `seq`.
    pub fn encode(&self, frame: &[u8]) -> Bytes {
        let (mut header, seq, prev) = match self {
            Envelope::Direct {
                to,
                hop,
                origin,
                covered,
                seq,
                prev,
            } => (
                format!("D {to} {hop} {origin} {}", covered.as_field()),
                seq,
                prev,
            ),
            Envelope::Room {
                room,
                origin,
                conn,
                seq,
                prev,
            } => (format!("R {room} {origin} {conn}"), seq, prev),
            Envelope::Control {
                user,
                origin,
                action,
            } => (
                match action {
                    ControlAction::Disconnect => format!("C {user} {origin} disconnect"),
                    ControlAction::Kick { room } => format!("C {user} {origin} kick {room}"),
                },
                &None,
                &None,
            ),
            Envelope::Presence {
                user,
                online,
                version,
                ts_ms,
            } => (
                format!("P {user} {} {version} {ts_ms}", u8::from(*online)),
                &None,
                &None,
            ),
            Envelope::Member {
                room,
                user,
                joined,
                version,
                ts_ms,
            } => (
                format!("M {room} {user} {} {version} {ts_ms}", u8::from(*joined)),
                &None,
                &None,
            ),
        };
        // Writing into a String cannot fail.
        if let Some(seq) = seq {
            let _ = write!(header, " {seq}");
            if let Some(prev) = prev {
                let _ = write!(header, " {prev}");
            }
        }
        header.push('\n');
        let mut out = Vec::with_capacity(header.len() + frame.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(frame);
        Bytes::from(out)
    }

    /// Splits a payload into its header and the byte offset of the frame.
    /// Returns `None` for anything that is not a well-formed envelope.
    pub fn decode(payload: &[u8]) -> Option<(Envelope<'_>, usize)> {
        let newline = payload.iter().position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&payload[..newline]).ok()?;
        let mut parts = header.split(' ');
        let envelope = match parts.next()? {
            "D" => {
                let (to, hop, origin, covered) =
                    (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
                if to.is_empty() || origin.is_empty() || covered.is_empty() {
                    return None;
                }
                let (seq, prev) = position(&mut parts)?;
                Envelope::Direct {
                    to,
                    hop: hop.parse().ok()?,
                    origin,
                    covered: Covered::from_field(covered),
                    seq,
                    prev,
                }
            }
            "R" => {
                let (room, origin, conn) = (parts.next()?, parts.next()?, parts.next()?);
                let (seq, prev) = position(&mut parts)?;
                Envelope::Room {
                    room,
                    origin,
                    conn,
                    seq,
                    prev,
                }
            }
            "C" => {
                let (user, origin) = (parts.next()?, parts.next()?);
                if user.is_empty() || origin.is_empty() {
                    return None;
                }
                let action = match parts.next()? {
                    "disconnect" => ControlAction::Disconnect,
                    "kick" => ControlAction::Kick {
                        room: parts.next().filter(|room| !room.is_empty())?,
                    },
                    _ => return None,
                };
                Envelope::Control {
                    user,
                    origin,
                    action,
                }
            }
            "P" => {
                let user = parts.next().filter(|u| !u.is_empty())?;
                let (online, version, ts_ms) = transition(&mut parts)?;
                Envelope::Presence {
                    user,
                    online,
                    version,
                    ts_ms,
                }
            }
            "M" => {
                let room = parts.next().filter(|r| !r.is_empty())?;
                let user = parts.next().filter(|u| !u.is_empty())?;
                let (joined, version, ts_ms) = transition(&mut parts)?;
                Envelope::Member {
                    room,
                    user,
                    joined,
                    version,
                    ts_ms,
                }
            }
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some((envelope, newline + 1))
    }
}

/// The `<0|1> <version> <ts>` fields of a transition.
fn transition<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<(bool, u64, u64)> {
    let on = match parts.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    Some((on, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The optional position fields at the end of a header, `[<seq> [<prev>]]`;
/// `None` when one is there but is not a seq.
fn position<'a>(parts: &mut impl Iterator<Item = &'a str>) -> Option<(Option<Seq>, Option<Seq>)> {
    let seq = match parts.next() {
        None => return Some((None, None)),
        Some(seq) => Seq::parse(seq)?,
    };
    let prev = match parts.next() {
        None => None,
        Some(prev) => Some(Seq::parse(prev)?),
    };
    Some((Some(seq), prev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_round_trip() {
        for e in [
            Envelope::Presence {
                user: "bob",
                online: true,
                version: 1_764_633_600_123_456,
                ts_ms: 1_764_633_600_123,
            },
            Envelope::Member {
                room: "lobby",
                user: "bob",
                joined: false,
                version: 7,
                ts_ms: 8,
            },
        ] {
            let bytes = e.encode(b"");
            let (decoded, at) = Envelope::decode(&bytes).expect("decodes");
            assert_eq!(decoded, e);
            assert_eq!(at, bytes.len());
        }
        assert_eq!(
            &Envelope::Presence {
                user: "bob",
                online: true,
                version: 1_764_633_600_123_456,
                ts_ms: 1_764_633_600_123
            }
            .encode(b"")[..],
            b"P bob 1 1764633600123456 1764633600123\n"
        );
        for bad in [
            "P bob 2 1 1\n",
            "P bob 1 x 1\n",
            "P bob 1 1\n",
            "M lobby 1 1 1\n",
            "P bob 1 1 1 9\n",
        ] {
            assert!(Envelope::decode(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn envelopes_round_trip() {
        let e = Envelope::Direct {
            to: "bob",
            hop: 1,
            origin: "i1",
            covered: Covered::from_field("i1,i2"),
            seq: None,
            prev: None,
        };
        let bytes = e.encode(b"{\"x\":1}");
        let (decoded, at) = Envelope::decode(&bytes).expect("decodes");
        assert_eq!(decoded, e);
        assert_eq!(&bytes[at..], b"{\"x\":1}");
        assert!(matches!(decoded, Envelope::Direct { covered, .. }
            if covered.contains("i2") && !covered.contains("i3")));

        let r = Envelope::Room {
            room: "lobby",
            origin: "i2",
            conn: "i2/7",
            seq: None,
            prev: None,
        };
        let bytes = r.encode(b"{}");
        assert_eq!(Envelope::decode(&bytes).map(|(e, _)| e), Some(r));
        let r = Envelope::Room {
            room: "lobby",
            origin: "i2",
            conn: "-",
            seq: Some(Seq { ms: 3, n: 0 }),
            prev: Some(Seq { ms: 2, n: 9 }),
        };
        let bytes = r.encode(b"{}");
        assert_eq!(Envelope::decode(&bytes).map(|(e, _)| e), Some(r));
    }

    #[test]
    fn control_envelopes_round_trip_and_malformed_ones_are_refused() {
        let d = Envelope::Control {
            user: "bob",
            origin: "i1",
            action: ControlAction::Disconnect,
        };
        let bytes = d.encode("banned for spam".as_bytes());
        assert_eq!(&bytes[..], b"C bob i1 disconnect\nbanned for spam");
        let (decoded, at) = Envelope::decode(&bytes).expect("decodes");
        assert_eq!(decoded, d);
        assert_eq!(&bytes[at..], b"banned for spam");
        let k = Envelope::Control {
            user: "bob",
            origin: "i1",
            action: ControlAction::Kick { room: "lobby" },
        };
        let bytes = k.encode(b"");
        assert_eq!(Envelope::decode(&bytes).map(|(e, _)| e), Some(k));
        for bad in [
            &b"C bob i1 kick\n"[..],
            b"C bob i1 kick lobby extra\n",
            b"C bob i1 explode\n",
            b"C bob\n",
            b"C  i1 disconnect\n",
        ] {
            assert_eq!(
                Envelope::decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_head_and_covered_field_build_the_same_header_as_encode() {
        let field = Envelope::covered_field(["i1", "i3"]);
        let built = format!("{}{field}\n{{}}", Envelope::direct_head("bob", 0, "i1"));
        let encoded = Envelope::Direct {
            to: "bob",
            hop: 0,
            origin: "i1",
            covered: Covered::from_field(&field),
            seq: None,
            prev: None,
        }
        .encode(b"{}");
        assert_eq!(built.as_bytes(), &encoded[..]);
        assert_eq!(Envelope::covered_field([]), "-");
        assert_eq!(Covered::NONE.iter().count(), 0);
    }

    #[test]
    fn stored_direct_messages_carry_their_seq() {
        let seq = Seq { ms: 17, n: 2 };
        let e = Envelope::Direct {
            to: "bob",
            hop: 0,
            origin: "i1",
            covered: Covered::NONE,
            seq: Some(seq),
            prev: None,
        };
        let bytes = e.encode(b"{}");
        assert_eq!(&bytes[..], b"D bob 0 i1 - 17-2\n{}");
        assert_eq!(Envelope::decode(&bytes).map(|(e, _)| e), Some(e));
    }

    #[test]
    fn stored_direct_messages_carry_their_predecessor() {
        // Exactly what the Redis append script writes.
        let payload = b"D bob 0 i1 - 17-2 0-0\n{}";
        let (e, at) = Envelope::decode(payload).expect("decodes");
        assert_eq!(
            e,
            Envelope::Direct {
                to: "bob",
                hop: 0,
                origin: "i1",
                covered: Covered::NONE,
                seq: Some(Seq { ms: 17, n: 2 }),
                prev: Some(Seq::ZERO),
            }
        );
        assert_eq!(&payload[at..], b"{}");
        assert_eq!(&e.encode(b"{}")[..], &payload[..]);
        // A prev without a seq is never written.
        let no_seq = Envelope::Direct {
            to: "bob",
            hop: 0,
            origin: "i1",
            covered: Covered::NONE,
            seq: None,
            prev: Some(Seq::ZERO),
        };
        assert_eq!(&no_seq.encode(b"{}")[..], b"D bob 0 i1 -\n{}");
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            b"no newline",
            b"X a b c\n{}",
            b"D bob x i1 -\n{}",
            b"D bob 0 i1\n{}",
            b"D a 0 b c d\n{}",
            b"D a 0 b c 1-1 x\n{}",
            b"D a 0 b c 1-1 1-0 1-0\n{}",
            b"R lobby i1 i1/1 1-1 x\n{}",
            b"R lobby i1 i1/1 1-1 1-0 1-0\n{}",
            b"D bob 0 i1 \n{}",
            b"R lobby i1\n{}",
        ] {
            assert!(
                Envelope::decode(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
