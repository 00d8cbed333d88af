//! The loader's side of the wire: building outgoing frames into a string
//! without serde (numbers written by hand, padding from a prepared slice),
//! the body format that carries the measurement fields, and a cheap parse of
//! incoming frames (serde_json into a struct of borrowed strs), in either
//! protocol of [`Protocol`]: Switchboard's JSON frames, or the Socket.IO
//! peer's packets (their format is the `socketio` module's; here they are
//! mapped onto the same [`Incoming`] frames, so a connection handles both
//! alike).
//!
//! Body: a JSON string `"STEP:ID:TS:SENDER:SEQ:xxx…"` whose serialized size
//! (quotes included) is `--body-bytes` when the fields fit, the same in both
//! protocols. `TS` is the *scheduled* send time in ns since the loader's
//! start instant, `SENDER` the sending connection slot, `SEQ` the
//! per-(sender slot, stream) sequence.

use serde::Deserialize;
use switchboard_bench_schema::Protocol;

use crate::socketio::{self, Packet};

/// Request ids at or above this are room joins, not messages.
pub const JOIN_ID_BASE: u64 = 1 << 62;

/// Kind of an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A direct message to a user.
    Dm,
    /// A room message.
    Room,
}

/// The measurement fields carried in a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyFields {
    /// Step (run) number.
    pub step: u32,
    /// Global message id (also the request `id`).
    pub id: u64,
    /// Scheduled send time, ns since the loader's start instant.
    pub ts_ns: u64,
    /// Sending connection slot.
    pub sender: u32,
    /// Sequence number per (sender slot, stream).
    pub seq: u32,
}

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        out.push(char::from(b));
    }
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Builds outgoing frames and reads incoming ones for one connection, in
/// the run's protocol (prefixes, padding and the connect packet prepared once).
#[derive(Debug, Clone)]
pub struct Codec {
    protocol: Protocol,
    user_prefix: String,
    room_prefix: String,
    body_bytes: usize,
    pad: String,
    /// Send messages without asking for an ack (`--no-ack`): Switchboard's
    /// `"ack":false`, a Socket.IO event without an ack id.
    no_ack: bool,
    /// Send DMs stored (`--dm-store true`, no field) or with `"store":false`.
    dm_store: bool,
    /// Socket.IO: the connect packet (its auth names the connection's user).
    connect: String,
}

/// What an incoming frame asks of the connection.
#[derive(Debug, PartialEq)]
pub enum Decoded<'a> {
    /// A frame to handle (welcome, ack, error, delivery).
    Frame(Incoming<'a>),
    /// A protocol packet to answer at once with this text (Socket.IO: the
    /// connect after Engine.IO's open, the pong after a ping).
    Reply(String),
    /// A protocol packet that needs nothing.
    Nothing,
    /// The server ended the session or refused it (Socket.IO), and why.
    Ended(String),
}

impl Codec {
    /// A codec for `user`'s connection, bodies of `body_bytes` serialized
    /// bytes; with `no_ack` messages ask for no ack.
    pub fn new(
        protocol: Protocol,
        user: &str,
        user_prefix: &str,
        room_prefix: &str,
        body_bytes: usize,
        no_ack: bool,
    ) -> Self {
        Codec {
            protocol,
            user_prefix: user_prefix.to_owned(),
            room_prefix: room_prefix.to_owned(),
            body_bytes,
            pad: "x".repeat(body_bytes),
            no_ack,
            dm_store: true,
            connect: match protocol {
                Protocol::Switchboard => String::new(),
                Protocol::Socketio => socketio::connect_packet(user),
            },
        }
    }

    /// The same codec, its DMs sent with `"store":false` unless `dm_store`
    /// (Switchboard's protocol; `--dm-store`).
    pub fn with_dm_store(mut self, dm_store: bool) -> Self {
        self.dm_store = dm_store;
        self
    }

    /// A message. Switchboard: `{"type":"dm","to":"u7","id":N,"body":"…"}`
    /// or `{"type":"room","room":"r3","id":N,"body":"…"}`, with `no_ack`
    /// `"ack":false` after the id, and a DM without `dm_store`
    /// `"store":false` after that. Socket.IO: `42N["dm",{"to":"u7","body":"…"}]`
    /// or `42N["room",{"room":"r3","body":"…"}]`, without the ack id `N` with
    /// `no_ack`.
    pub fn message(&self, kind: Kind, target: u32, body: &BodyFields) -> String {
        let mut s = String::with_capacity(64 + self.body_bytes);
        let (name, field, prefix) = match kind {
            Kind::Dm => ("dm", "to", &self.user_prefix),
            Kind::Room => ("room", "room", &self.room_prefix),
        };
        match self.protocol {
            Protocol::Switchboard => {
                s.push_str("{\"type\":\"");
                s.push_str(name);
                s.push_str("\",\"");
                s.push_str(field);
                s.push_str("\":\"");
                s.push_str(prefix);
                push_u64(&mut s, u64::from(target));
                s.push_str("\",\"id\":");
                push_u64(&mut s, body.id);
                if self.no_ack {
                    s.push_str(",\"ack\":false");
                }
                if kind == Kind::Dm && !self.dm_store {
                    s.push_str(",\"store\":false");
                }
                s.push_str(",\"body\":");
                self.push_body(&mut s, body);
                s.push('}');
            }
            Protocol::Socketio => {
                socketio::start_event(&mut s, name, (!self.no_ack).then_some(body.id));
                s.push_str("{\"");
                s.push_str(field);
                s.push_str("\":\"");
                s.push_str(prefix);
                push_u64(&mut s, u64::from(target));
                s.push_str("\",\"body\":");
                self.push_body(&mut s, body);
                s.push('}');
                socketio::end_event(&mut s);
            }
        }
        s
    }

    /// The body as a JSON string: the fields, then padding up to `body_bytes`.
    fn push_body(&self, s: &mut String, body: &BodyFields) {
        let start = s.len();
        s.push('"');
        push_u64(s, u64::from(body.step));
        s.push(':');
        push_u64(s, body.id);
        s.push(':');
        push_u64(s, body.ts_ns);
        s.push(':');
        push_u64(s, u64::from(body.sender));
        s.push(':');
        push_u64(s, u64::from(body.seq));
        s.push(':');
        // Serialized body = content + 2 quotes.
        let used = s.len() - start + 1;
        if used < self.body_bytes {
            s.push_str(&self.pad[..self.body_bytes - used]);
        }
        s.push('"');
    }

    /// A room join with request id `id` (at least [`JOIN_ID_BASE`]).
    /// Switchboard: `{"type":"join","room":"r3","events":false,"id":N}`
    /// (the loader measures room messages: no member events, which any
    /// frame it then got would be counted as unexpected). Socket.IO:
    /// `42M["join",{"room":"r3"}]`, the id moved below 2^53 (see
    /// [`socketio::JOIN_WIRE_BASE`]).
    pub fn join(&self, room: u32, id: u64) -> String {
        let mut s = String::with_capacity(64);
        match self.protocol {
            Protocol::Switchboard => {
                s.push_str("{\"type\":\"join\",\"room\":\"");
                s.push_str(&self.room_prefix);
                push_u64(&mut s, u64::from(room));
                s.push_str("\",\"events\":false,\"id\":");
                push_u64(&mut s, id);
                s.push('}');
            }
            Protocol::Socketio => {
                let wire_id = socketio::JOIN_WIRE_BASE + (id - JOIN_ID_BASE);
                socketio::start_event(&mut s, "join", Some(wire_id));
                s.push_str("{\"room\":\"");
                s.push_str(&self.room_prefix);
                push_u64(&mut s, u64::from(room));
                s.push_str("\"}");
                socketio::end_event(&mut s);
            }
        }
        s
    }

    /// What an incoming text frame is.
    pub fn decode<'a>(&self, text: &'a str) -> Result<Decoded<'a>, String> {
        match self.protocol {
            Protocol::Switchboard => parse_incoming(text)
                .map(Decoded::Frame)
                .map_err(|e| e.to_string()),
            Protocol::Socketio => {
                let packet = socketio::decode(text).map_err(|e| e.to_string())?;
                Ok(self.interpret_socketio(packet))
            }
        }
    }

    /// A Socket.IO packet as the connection sees it: events and acks as
    /// Switchboard's frames (an ack `{"status":"error"}` as an error frame).
    fn interpret_socketio<'a>(&self, packet: Packet<'a>) -> Decoded<'a> {
        let frame = |ty| Incoming {
            ty,
            id: None,
            status: None,
            body: None,
            from: None,
            room: None,
            code: None,
            user: None,
        };
        match packet {
            Packet::Open => Decoded::Reply(self.connect.clone()),
            Packet::Ping => Decoded::Reply(socketio::PONG.to_owned()),
            Packet::Connected | Packet::Other => Decoded::Nothing,
            Packet::Closed => Decoded::Ended("disconnected by the server".to_owned()),
            Packet::ConnectError(why) => Decoded::Ended(format!("connect refused: {why}")),
            Packet::Event { name, data } => Decoded::Frame(Incoming {
                body: data.body,
                from: data.from,
                room: data.room,
                user: data.user,
                ..frame(name)
            }),
            Packet::Ack { id, reply } => {
                let id = match id.checked_sub(socketio::JOIN_WIRE_BASE) {
                    Some(k) => JOIN_ID_BASE + k,
                    None => id,
                };
                let ty = if reply.status == Some("error") {
                    "error"
                } else {
                    "ack"
                };
                Decoded::Frame(Incoming {
                    id: Some(id),
                    status: reply.status,
                    code: reply.code,
                    ..frame(ty)
                })
            }
        }
    }
}

/// The smallest serialized body for these numbers (to report when
/// `--body-bytes` is too small to hold the fields).
pub fn min_body_len(fields: &BodyFields) -> usize {
    digits(u64::from(fields.step))
        + digits(fields.id)
        + digits(fields.ts_ns)
        + digits(u64::from(fields.sender))
        + digits(u64::from(fields.seq))
        + 5
        + 2
}

/// Parses a body made by [`FrameWriter::message`].
pub fn parse_body(body: &str) -> Option<BodyFields> {
    let mut it = body.splitn(6, ':');
    let step = it.next()?.parse().ok()?;
    let id = it.next()?.parse().ok()?;
    let ts_ns = it.next()?.parse().ok()?;
    let sender = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    it.next()?;
    Some(BodyFields {
        step,
        id,
        ts_ns,
        sender,
        seq,
    })
}

/// Parses the number after `prefix` in a name like `u17`.
pub fn name_index(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.parse().ok()
}

/// An incoming frame: only the fields the loader reads, borrowed from the text.
/// Anything else (msg_id, ts, instance, …) is skipped.
#[derive(Debug, PartialEq, Deserialize)]
pub struct Incoming<'a> {
    /// `welcome`, `ack`, `dm`, `room`, `error`, …
    #[serde(rename = "type", borrow)]
    pub ty: &'a str,
    /// The request id echoed in acks and errors (the loader only sends integers).
    #[serde(default)]
    pub id: Option<u64>,
    /// Ack status.
    #[serde(default, borrow)]
    pub status: Option<&'a str>,
    /// Message body (the loader's bodies are plain strings).
    #[serde(default, borrow)]
    pub body: Option<&'a str>,
    /// Sender user of a dm/room frame.
    #[serde(default, borrow)]
    pub from: Option<&'a str>,
    /// Room of a room frame.
    #[serde(default, borrow)]
    pub room: Option<&'a str>,
    /// Error code.
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
    /// User in a welcome frame.
    #[serde(default, borrow)]
    pub user: Option<&'a str>,
}

/// Parses an incoming text frame.
pub fn parse_incoming(text: &str) -> Result<Incoming<'_>, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trip_and_size() {
        let w = Codec::new(Protocol::Switchboard, "u0", "u", "r", 64, false);
        let f = BodyFields {
            step: 3,
            id: 123_456,
            ts_ns: 9_876_543_210,
            sender: 17,
            seq: 42,
        };
        let text = w.message(Kind::Dm, 7, &f);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "dm");
        assert_eq!(v["to"], "u7");
        assert_eq!(v["id"], 123_456);
        let body = v["body"].as_str().unwrap();
        assert_eq!(serde_json::to_string(body).unwrap().len(), 64);
        assert_eq!(parse_body(body), Some(f));

        let room = w.message(Kind::Room, 2, &f);
        let v: serde_json::Value = serde_json::from_str(&room).unwrap();
        assert_eq!(v["room"], "r2");
        assert_eq!(
            w.join(5, JOIN_ID_BASE + 9),
            format!(
                r#"{{"type":"join","room":"r5","events":false,"id":{}}}"#,
                JOIN_ID_BASE + 9
            )
        );
        // Too small a body: the fields are kept, no padding.
        let small =
            Codec::new(Protocol::Switchboard, "u0", "u", "r", 16, false).message(Kind::Dm, 1, &f);
        let v: serde_json::Value = serde_json::from_str(&small).unwrap();
        assert_eq!(parse_body(v["body"].as_str().unwrap()), Some(f));
        assert_eq!(
            serde_json::to_string(v["body"].as_str().unwrap())
                .unwrap()
                .len(),
            min_body_len(&f)
        );
        // --no-ack: the same frame plus "ack":false, body unchanged.
        let na =
            Codec::new(Protocol::Switchboard, "u0", "u", "r", 64, true).message(Kind::Room, 2, &f);
        let v: serde_json::Value = serde_json::from_str(&na).unwrap();
        assert_eq!(v["ack"], false);
        assert_eq!(v["id"], 123_456);
        assert_eq!(parse_body(v["body"].as_str().unwrap()), Some(f));
        assert!(w.message(Kind::Dm, 7, &f).find("\"ack\"").is_none());
    }

    #[test]
    fn dm_store_false_marks_dms_only() {
        let f = BodyFields {
            step: 1,
            id: 42,
            ts_ns: 1_000,
            sender: 2,
            seq: 3,
        };
        let stored = Codec::new(Protocol::Switchboard, "u0", "u", "r", 64, false);
        // The default sends no store field: the server stores the DM.
        assert!(!stored.message(Kind::Dm, 7, &f).contains("store"));
        let eph = stored.clone().with_dm_store(false);
        let text = eph.message(Kind::Dm, 7, &f);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["store"], false);
        assert_eq!(
            (v["type"].as_str(), v["to"].as_str()),
            (Some("dm"), Some("u7"))
        );
        let body = v["body"].as_str().unwrap();
        assert_eq!(serde_json::to_string(body).unwrap().len(), 64);
        assert_eq!(parse_body(body), Some(f));
        // Room messages are never stored: no field.
        assert!(!eph.message(Kind::Room, 2, &f).contains("store"));
        // With --no-ack too: both fields.
        let both = Codec::new(Protocol::Switchboard, "u0", "u", "r", 64, true)
            .with_dm_store(false)
            .message(Kind::Dm, 7, &f);
        assert!(
            both.contains(r#","ack":false,"store":false,"body":"#),
            "{both}"
        );
    }

    #[test]
    fn incoming_frames() {
        let f = parse_incoming(
            r#"{"type":"dm","from":"u1","body":"1:2:3:4:5:xx","msg_id":"n1-3","ts":17}"#,
        )
        .unwrap();
        assert_eq!(
            (f.ty, f.from, f.body),
            ("dm", Some("u1"), Some("1:2:3:4:5:xx"))
        );
        let a = parse_incoming(r#"{"type":"ack","id":12,"status":"routed","msg_id":"x"}"#).unwrap();
        assert_eq!((a.id, a.status), (Some(12), Some("routed")));
        let e = parse_incoming(r#"{"type":"error","id":null,"code":"bad_request","message":"m"}"#)
            .unwrap();
        assert_eq!((e.id, e.code), (None, Some("bad_request")));
        assert!(parse_incoming(r#"{"type":"dm","body":{"a":1}}"#).is_err());
        assert_eq!(name_index("u17", "u"), Some(17));
        assert_eq!(name_index("x17", "u"), None);
        let mut s = String::new();
        push_u64(&mut s, 0);
        push_u64(&mut s, u64::MAX);
        assert_eq!(s, format!("0{}", u64::MAX));
    }

    #[test]
    fn socketio_frames_carry_the_same_body() {
        let f = BodyFields {
            step: 1,
            id: 77,
            ts_ns: 123_456_789,
            sender: 3,
            seq: 9,
        };
        let codec = Codec::new(Protocol::Socketio, "u3", "u", "r", 64, false);
        let text = codec.message(Kind::Dm, 5, &f);
        let json = text.strip_prefix("4277").expect("an event with ack id 77");
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v[0], "dm");
        assert_eq!(v[1]["to"], "u5");
        let body = v[1]["body"].as_str().unwrap();
        assert_eq!(serde_json::to_string(body).unwrap().len(), 64);
        assert_eq!(parse_body(body), Some(f));
        let room = codec.message(Kind::Room, 2, &f);
        assert!(
            room.starts_with(r#"4277["room",{"room":"r2","body":"1:77:"#),
            "{room}"
        );
        // --no-ack: no ack id.
        let na = Codec::new(Protocol::Socketio, "u3", "u", "r", 64, true).message(Kind::Dm, 5, &f);
        assert!(na.starts_with(r#"42["dm",{"to":"u5","body":"#), "{na}");
        // A join's id travels below 2^53 and comes back as the loader's.
        let join = codec.join(4, JOIN_ID_BASE + 2);
        assert_eq!(join, r#"424503599627370498["join",{"room":"r4"}]"#);
        let ack = codec
            .decode(r#"434503599627370498[{"status":"ok"}]"#)
            .unwrap();
        let Decoded::Frame(ack) = ack else {
            panic!("{ack:?}")
        };
        assert_eq!(
            (ack.ty, ack.id, ack.status),
            ("ack", Some(JOIN_ID_BASE + 2), Some("ok"))
        );
    }

    #[test]
    fn socketio_packets_as_the_connection_sees_them() {
        let codec = Codec::new(Protocol::Socketio, "u3", "u", "r", 64, false);
        let decode = |text| codec.decode(text).expect("decodes");
        assert_eq!(
            decode(r#"0{"sid":"s","upgrades":[],"pingInterval":25000,"pingTimeout":20000}"#),
            Decoded::Reply(r#"40{"user":"u3"}"#.to_owned())
        );
        assert_eq!(decode("2"), Decoded::Reply("3".to_owned()));
        assert_eq!(decode(r#"40{"sid":"x"}"#), Decoded::Nothing);
        assert!(
            matches!(decode(r#"44{"message":"no"}"#), Decoded::Ended(why) if why.contains("no"))
        );
        assert!(matches!(decode("41"), Decoded::Ended(_)));
        let Decoded::Frame(w) = decode(r#"42["welcome",{"user":"u3"}]"#) else {
            panic!("welcome")
        };
        assert_eq!((w.ty, w.user), ("welcome", Some("u3")));
        let Decoded::Frame(d) = decode(r#"42["dm",{"from":"u1","body":"1:2:3:4:5:x"}]"#) else {
            panic!("dm")
        };
        assert_eq!(
            (d.ty, d.from, d.body),
            ("dm", Some("u1"), Some("1:2:3:4:5:x"))
        );
        let Decoded::Frame(a) = decode(r#"4312[{"status":"ok"}]"#) else {
            panic!("ack")
        };
        assert_eq!((a.ty, a.id, a.status), ("ack", Some(12), Some("ok")));
        let Decoded::Frame(e) = decode(r#"4313[{"status":"error","code":"bad_request"}]"#) else {
            panic!("error")
        };
        assert_eq!(
            (e.ty, e.id, e.code),
            ("error", Some(13), Some("bad_request"))
        );
        assert!(codec.decode("x").is_err());
        // The same text is a Switchboard frame only in Switchboard's protocol.
        let sb = Codec::new(Protocol::Switchboard, "u3", "u", "r", 64, false);
        assert!(sb.decode("2").is_err());
    }
}
