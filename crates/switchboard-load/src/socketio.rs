//! The Socket.IO peer's wire format, as much of it as the loader needs:
//! Socket.IO 5 packets inside Engine.IO 4 packets over the WebSocket
//! transport only (one Engine.IO packet per WebSocket text frame, no
//! polling, no upgrade, no binary attachments, default namespace only).
//!
//! A session: the client opens `GET /socket.io/?EIO=4&transport=websocket`;
//! the server sends the Engine.IO open packet `0{"sid":…,"pingInterval":…}`;
//! the client answers with the Socket.IO connect `40{"user":"u7"}` (its
//! auth); the server confirms with `40{"sid":…}` (or refuses with
//! `44{"message":…}`), and the peer's node then emits `welcome`. Events are
//! `42["name",{…}]`, or `42<id>["name",{…}]` when the sender wants an ack,
//! which comes back as `43<id>[{…}]`. The server pings with `2`; the client
//! answers `3`.
//!
//! Pure functions: encoding into a `String`, decoding borrowed from the
//! frame's text. No I/O; `wire` decides what a packet means to a connection.

use serde::Deserialize;

use crate::wire::push_u64;

/// The path of the Engine.IO endpoint.
pub const PATH: &str = "/socket.io/";
/// The query that selects Engine.IO 4 over the WebSocket transport.
pub const QUERY: &str = "EIO=4&transport=websocket";
/// The client's answer to a server ping.
pub const PONG: &str = "3";

/// Socket.IO ack ids are JavaScript numbers: exact only below 2^53. Room
/// joins use ids from here on the wire (message ids stay far below it).
pub const JOIN_WIRE_BASE: u64 = 1 << 52;

/// A decoded Engine.IO / Socket.IO packet.
#[derive(Debug, PartialEq)]
pub enum Packet<'a> {
    /// Engine.IO open (`0{…}`): the client must send its Socket.IO connect.
    Open,
    /// Engine.IO ping (`2`): the client must answer [`PONG`].
    Ping,
    /// Engine.IO close (`1`), or Socket.IO disconnect (`41`): the server ended the session.
    Closed,
    /// Socket.IO connect confirmed (`40{"sid":…}`).
    Connected,
    /// Socket.IO connect refused (`44{"message":…}`), with the server's text.
    ConnectError(&'a str),
    /// A Socket.IO event from the server.
    Event {
        /// The event name (`dm`, `room`, `welcome`).
        name: &'a str,
        /// Its first argument.
        data: EventData<'a>,
    },
    /// A Socket.IO ack of one of the client's events.
    Ack {
        /// The ack id the client sent.
        id: u64,
        /// The first argument of the server's ack callback.
        reply: AckReply<'a>,
    },
    /// Anything else (pong, noop, upgrade, binary packets): ignored.
    Other,
}

/// The first argument of an event from the peer: only the fields the loader reads.
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct EventData<'a> {
    /// Sending user (`dm`, `room`).
    #[serde(default, borrow)]
    pub from: Option<&'a str>,
    /// The body (the loader's bodies are plain strings).
    #[serde(default, borrow)]
    pub body: Option<&'a str>,
    /// Room of a `room` event.
    #[serde(default, borrow)]
    pub room: Option<&'a str>,
    /// User of a `welcome` event.
    #[serde(default, borrow)]
    pub user: Option<&'a str>,
}

/// What the peer's ack callback answers: `{"status":"ok"}` or
/// `{"status":"error","code":…}`.
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct AckReply<'a> {
    /// `ok` or `error`.
    #[serde(default, borrow)]
    pub status: Option<&'a str>,
    /// Error code.
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
}

/// Why a packet could not be decoded.
#[derive(Debug, PartialEq)]
pub enum DecodeError {
    /// Not an Engine.IO / Socket.IO packet this client knows.
    Malformed(&'static str),
    /// The JSON payload did not parse.
    Json(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(what) => f.write_str(what),
            DecodeError::Json(e) => write!(f, "payload: {e}"),
        }
    }
}

/// `40{"user":"<user>"}`: the Socket.IO connect with the user as its auth.
/// `user` is a validated name (`[A-Za-z0-9_.:@-]`), so it needs no escaping.
pub fn connect_packet(user: &str) -> String {
    format!("40{{\"user\":\"{user}\"}}")
}

/// Starts an event packet: `42`, the ack id if any, `["<name>",`.
pub fn start_event(out: &mut String, name: &str, ack_id: Option<u64>) {
    out.push_str("42");
    if let Some(id) = ack_id {
        debug_assert!(id < 1 << 53, "ack ids must stay exact JavaScript numbers");
        push_u64(out, id);
    }
    out.push_str("[\"");
    out.push_str(name);
    out.push_str("\",");
}

/// Ends an event packet started with [`start_event`] (after its argument).
pub fn end_event(out: &mut String) {
    out.push(']');
}

/// Decodes one WebSocket text frame.
pub fn decode(text: &str) -> Result<Packet<'_>, DecodeError> {
    let mut chars = text.as_bytes().iter();
    match chars.next() {
        Some(b'0') => Ok(Packet::Open),
        Some(b'1') => Ok(Packet::Closed),
        Some(b'2') => Ok(Packet::Ping),
        Some(b'4') => decode_socketio(&text[1..]),
        Some(b'3' | b'5' | b'6') => Ok(Packet::Other),
        Some(_) => Err(DecodeError::Malformed("unknown Engine.IO packet type")),
        None => Err(DecodeError::Malformed("empty frame")),
    }
}

/// Decodes a Socket.IO packet (the text after Engine.IO's `4`).
fn decode_socketio(text: &str) -> Result<Packet<'_>, DecodeError> {
    let Some(&kind) = text.as_bytes().first() else {
        return Err(DecodeError::Malformed("empty Socket.IO packet"));
    };
    let mut rest = &text[1..];
    // The default namespace is implicit; another would be `/name,`.
    if rest.starts_with('/') {
        return Err(DecodeError::Malformed("a namespace other than the default"));
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        let id = rest[..digits]
            .parse::<u64>()
            .map_err(|_| DecodeError::Malformed("ack id out of range"))?;
        rest = &rest[digits..];
        Some(id)
    } else {
        None
    };
    let json = |e: serde_json::Error| DecodeError::Json(e.to_string());
    match kind {
        b'0' => Ok(Packet::Connected),
        b'1' => Ok(Packet::Closed),
        b'2' => {
            let (name, data): (&str, EventData<'_>) = serde_json::from_str(rest).map_err(json)?;
            Ok(Packet::Event { name, data })
        }
        b'3' => {
            let id = id.ok_or(DecodeError::Malformed("ack without an id"))?;
            // `[reply]`, or `[]` for an ack callback called without arguments.
            let inner = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .ok_or(DecodeError::Malformed("ack arguments are not an array"))?
                .trim();
            let reply = if inner.is_empty() {
                AckReply::default()
            } else {
                serde_json::from_str(inner).map_err(json)?
            };
            Ok(Packet::Ack { id, reply })
        }
        b'4' => {
            #[derive(Deserialize)]
            struct Refusal<'a> {
                #[serde(borrow)]
                message: Option<&'a str>,
            }
            let refusal: Refusal<'_> = serde_json::from_str(rest).map_err(json)?;
            Ok(Packet::ConnectError(refusal.message.unwrap_or("")))
        }
        b'5' | b'6' => Ok(Packet::Other),
        _ => Err(DecodeError::Malformed("unknown Socket.IO packet type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_peer_sends() {
        let cases: &[(&str, Packet<'_>)] = &[
            (
                r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#,
                Packet::Open,
            ),
            ("2", Packet::Ping),
            ("3", Packet::Other),
            ("6", Packet::Other),
            ("1", Packet::Closed),
            ("41", Packet::Closed),
            (r#"40{"sid":"Zx1"}"#, Packet::Connected),
            (
                r#"44{"message":"auth.user must name the user"}"#,
                Packet::ConnectError("auth.user must name the user"),
            ),
            (
                r#"42["welcome",{"user":"u7"}]"#,
                Packet::Event {
                    name: "welcome",
                    data: EventData {
                        user: Some("u7"),
                        ..EventData::default()
                    },
                },
            ),
            (
                r#"42["dm",{"from":"u1","body":"1:2:3:4:5:xx"}]"#,
                Packet::Event {
                    name: "dm",
                    data: EventData {
                        from: Some("u1"),
                        body: Some("1:2:3:4:5:xx"),
                        ..EventData::default()
                    },
                },
            ),
            (
                r#"42["room",{"from":"u1","room":"r3","body":"b"}]"#,
                Packet::Event {
                    name: "room",
                    data: EventData {
                        from: Some("u1"),
                        room: Some("r3"),
                        body: Some("b"),
                        ..EventData::default()
                    },
                },
            ),
            (
                r#"4312[{"status":"ok"}]"#,
                Packet::Ack {
                    id: 12,
                    reply: AckReply {
                        status: Some("ok"),
                        code: None,
                    },
                },
            ),
            (
                r#"434503599627370496[{"status":"error","code":"bad_request"}]"#,
                Packet::Ack {
                    id: JOIN_WIRE_BASE,
                    reply: AckReply {
                        status: Some("error"),
                        code: Some("bad_request"),
                    },
                },
            ),
            (
                "437[]",
                Packet::Ack {
                    id: 7,
                    reply: AckReply::default(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(decode(text).as_ref(), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_what_it_does_not_speak() {
        for text in [
            "",
            "9",
            "4",
            "49",
            r#"42/chat,["dm",{}]"#,
            r#"42["dm"]"#,
            r#"42{"dm":1}"#,
            r#"43[{"status":"ok"}]"#,
            "4399999999999999999999[]",
            r#"43{"status":"ok"}"#,
        ] {
            assert!(decode(text).is_err(), "{text:?} should not decode");
        }
    }

    #[test]
    fn encodes_connect_and_events() {
        assert_eq!(connect_packet("u7"), r#"40{"user":"u7"}"#);
        let mut s = String::new();
        start_event(&mut s, "dm", Some(42));
        s.push_str(r#"{"to":"u1","body":"x"}"#);
        end_event(&mut s);
        assert_eq!(s, r#"4242["dm",{"to":"u1","body":"x"}]"#);
        let mut s = String::new();
        start_event(&mut s, "dm", None);
        s.push_str("{}");
        end_event(&mut s);
        assert_eq!(s, r#"42["dm",{}]"#);
    }
}
