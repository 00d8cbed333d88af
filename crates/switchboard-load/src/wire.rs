//! The loader's side of the wire protocol: building outgoing frames into a
//! string without serde (numbers written by hand, padding from a prepared
//! slice), the body format that carries the measurement fields, and a cheap
//! parse of incoming frames (serde_json into a struct of borrowed strs).
//!
//! Body: a JSON string `"STEP:ID:TS:SENDER:SEQ:xxx…"` whose serialized size
//! (quotes included) is `--body-bytes` when the fields fit. `TS` is the
//! *scheduled* send time in ns since the loader's start instant, `SENDER` the
//! sending connection slot, `SEQ` the per-(sender slot, stream) sequence.

use serde::Deserialize;

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

/// Builds outgoing frames for one connection (prefixes and padding prepared once).
#[derive(Debug, Clone)]
pub struct FrameWriter {
    user_prefix: String,
    room_prefix: String,
    body_bytes: usize,
    pad: String,
    /// Add `"ack":false` to dm/room frames (`--no-ack`).
    no_ack: bool,
}

impl FrameWriter {
    /// A writer for bodies of `body_bytes` serialized bytes; with `no_ack`
    /// messages carry `"ack":false`.
    pub fn new(user_prefix: &str, room_prefix: &str, body_bytes: usize, no_ack: bool) -> Self {
        FrameWriter {
            user_prefix: user_prefix.to_owned(),
            room_prefix: room_prefix.to_owned(),
            body_bytes,
            pad: "x".repeat(body_bytes),
            no_ack,
        }
    }

    /// `{"type":"dm","to":"u7","id":N,"body":"…"}` or
    /// `{"type":"room","room":"r3","id":N,"body":"…"}`; with `no_ack`,
    /// `"ack":false` follows the id.
    pub fn message(&self, kind: Kind, target: u32, body: &BodyFields) -> String {
        let mut s = String::with_capacity(64 + self.body_bytes);
        match kind {
            Kind::Dm => {
                s.push_str("{\"type\":\"dm\",\"to\":\"");
                s.push_str(&self.user_prefix);
            }
            Kind::Room => {
                s.push_str("{\"type\":\"room\",\"room\":\"");
                s.push_str(&self.room_prefix);
            }
        }
        push_u64(&mut s, u64::from(target));
        s.push_str("\",\"id\":");
        push_u64(&mut s, body.id);
        if self.no_ack {
            s.push_str(",\"ack\":false");
        }
        s.push_str(",\"body\":\"");
        let start = s.len();
        push_u64(&mut s, u64::from(body.step));
        s.push(':');
        push_u64(&mut s, body.id);
        s.push(':');
        push_u64(&mut s, body.ts_ns);
        s.push(':');
        push_u64(&mut s, u64::from(body.sender));
        s.push(':');
        push_u64(&mut s, u64::from(body.seq));
        s.push(':');
        // Serialized body = content + 2 quotes.
        let used = s.len() - start + 2;
        if used < self.body_bytes {
            s.push_str(&self.pad[..self.body_bytes - used]);
        }
        s.push_str("\"}");
        s
    }

    /// `{"type":"join","room":"r3","id":N}`.
    pub fn join(&self, room: u32, id: u64) -> String {
        let mut s = String::with_capacity(64);
        s.push_str("{\"type\":\"join\",\"room\":\"");
        s.push_str(&self.room_prefix);
        push_u64(&mut s, u64::from(room));
        s.push_str("\",\"id\":");
        push_u64(&mut s, id);
        s.push('}');
        s
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
#[derive(Debug, Deserialize)]
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
        let w = FrameWriter::new("u", "r", 64, false);
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
        assert_eq!(w.join(5, 9), r#"{"type":"join","room":"r5","id":9}"#);
        // Too small a body: the fields are kept, no padding.
        let small = FrameWriter::new("u", "r", 16, false).message(Kind::Dm, 1, &f);
        let v: serde_json::Value = serde_json::from_str(&small).unwrap();
        assert_eq!(parse_body(v["body"].as_str().unwrap()), Some(f));
        assert_eq!(
            serde_json::to_string(v["body"].as_str().unwrap())
                .unwrap()
                .len(),
            FrameWriter::min_body_len(&f)
        );
        // --no-ack: the same frame plus "ack":false, body unchanged.
        let na = FrameWriter::new("u", "r", 64, true).message(Kind::Room, 2, &f);
        let v: serde_json::Value = serde_json::from_str(&na).unwrap();
        assert_eq!(v["ack"], false);
        assert_eq!(v["id"], 123_456);
        assert_eq!(parse_body(v["body"].as_str().unwrap()), Some(f));
        assert!(w.message(Kind::Dm, 7, &f).find("\"ack\"").is_none());
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
}
