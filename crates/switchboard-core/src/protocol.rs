//! Wire protocol v1: the JSON frames a client sends and receives, and the
//! validation of user and room names.
//!
//! This module turns text into typed requests and typed replies into text. It
//! owns no I/O and no state: it never sees a socket, a Redis connection or the
//! registry. Parsing never panics and never allocates more than the input it
//! was given (bodies stay borrowed as raw JSON and are embedded verbatim in
//! the frames delivered to recipients, so a body is serialized exactly once).

use std::fmt;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::store::Seq;

/// Longest user id, room name or instance id.
pub const MAX_NAME_LEN: usize = 64;
/// Most users one presence query may ask about.
pub const MAX_PRESENCE_USERS: usize = 100;
/// Most users one `watch` or `unwatch` frame may name (a contact list in
/// one frame; the connection's total is `--max-watches-per-connection`).
pub const MAX_WATCH_USERS: usize = 1000;
/// Deepest nesting of arrays and objects accepted in a body. serde_json does
/// not bound the depth of a raw value, and every recipient will parse it.
pub const MAX_BODY_DEPTH: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Names have at least one character.
    #[error("name is empty")]
    Empty,
    /// Names are bounded so keys and frames stay small.
    #[error("name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    /// Names appear in Redis keys, channel names and bus headers.
    #[error("name has a character outside [A-Za-z0-9_.:@-]")]
    BadCharacter,
}

/// Checks a user id, room name or instance id: 1–64 chars of `[A-Za-z0-9_.:@-]`.
///
/// The restricted alphabet matters beyond tidiness: names are embedded in Redis
/// keys (where `{`/`}` would break the cluster hash tag) and in the
/// space-separated bus header.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
    {
        return Err(NameError::BadCharacter);
    }
    Ok(())
}

/// The error codes of an `error` frame; part of the public protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, a missing or mistyped field, or a binary frame.
    BadRequest,
    /// A `type` this server does not know.
    UnknownType,
    /// A user or room name outside the allowed alphabet or length.
    InvalidName,
    /// A room message from a connection that has not joined the room.
    NotMember,
    /// A frame over the size limit.
    TooLarge,
    /// The shared backend (Redis) could not be reached: the request was not
    /// carried out (nothing was delivered beyond what an ack says). Safe to retry.
    Unavailable,
    /// The shared backend did not answer in time: the message may or may not
    /// have been delivered. Retrying may duplicate it.
    Timeout,
    /// The connection sends faster than its rate limit allows.
    RateLimited,
    /// A per-connection limit (such as rooms joined) is reached.
    LimitExceeded,
    /// The connection's token (or the join's room token) does not allow
    /// this room or recipient.
    Forbidden,
    /// A `refresh` token that could not be verified, or that does not
    /// expire later than the current one; the connection keeps its old one.
    InvalidToken,
}

/// A request that could not be served, with the `id` to echo when known.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolError {
    /// Which error code the client receives.
    pub code: ErrorCode,
    /// A human-readable explanation; never contains a body or a token.
    pub message: String,
}

impl ProtocolError {
    /// Builds an error with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// The request id a client may attach to any frame: a string or an integer,
/// echoed verbatim (as its original JSON text) in the reply.
#[derive(Debug, Clone)]
pub struct RequestId(Box<RawValue>);

impl RequestId {
    /// The id as JSON text.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }
}

impl Serialize for RequestId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A parsed client frame. Borrowed from the frame text where possible.
#[derive(Debug)]
pub enum Request<'a> {
    /// A direct message to one user (every connection of that user).
    Direct {
        /// Recipient user id, validated.
        to: String,
        /// Any JSON, kept as written.
        body: &'a RawValue,
        /// How it is kept and answered (v1.1; the defaults are v1.1's).
        options: DmOptions,
    },
    /// Acknowledges every inbox entry up to and including `seq` (v1.1).
    Recv {
        /// The newest entry the client has processed.
        seq: Seq,
    },
    /// Join a room.
    Join {
        /// Room name, validated.
        room: String,
        /// Replay the room's history after this position first (v1.1).
        since: Option<Seq>,
        /// A room token minted by the backend for this user and room
        /// (`--room-auth token`); never logged.
        token: Option<String>,
        /// Send this connection the room's `member_joined`/`member_left`
        /// events (`"events": false` for large rooms).
        events: bool,
    },
    /// Leave a room.
    Leave {
        /// Room name, validated.
        room: String,
    },
    /// A message to every member of a room except the sending connection.
    Room {
        /// Room name, validated.
        room: String,
        /// Any JSON, kept as written.
        body: &'a RawValue,
    },
    /// Which of these users are online anywhere.
    Presence {
        /// Validated user ids, at most [`MAX_PRESENCE_USERS`].
        users: Vec<String>,
    },
    /// Watch these users: the reply is their state, then a
    /// `presence_event` on every user-level transition.
    Watch {
        /// Validated user ids, at most [`MAX_WATCH_USERS`].
        users: Vec<String>,
    },
    /// Stop watching these users.
    Unwatch {
        /// Validated user ids, at most [`MAX_WATCH_USERS`].
        users: Vec<String>,
    },
    /// The room's members, cluster-wide.
    Members {
        /// Room name, validated.
        room: String,
    },
    /// Application-level keepalive.
    Ping,
    /// A new connection token for the same user, replacing one that is
    /// about to expire.
    Refresh {
        /// The JWT; never logged.
        token: String,
    },
}

/// The v1.1 options of a DM (and of a server-side publish to a user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmOptions {
    /// `false`: ephemeral (typing indicators): not stored, no `seq`.
    pub store: bool,
    /// The sender's idempotency key (1–64 characters).
    pub key: Option<String>,
    /// Send the sender a `delivered` frame when a recipient acknowledges it.
    pub receipt: bool,
}

impl Default for DmOptions {
    fn default() -> Self {
        DmOptions {
            store: true,
            key: None,
            receipt: false,
        }
    }
}

/// Longest idempotency key, in characters.
pub const MAX_KEY_LEN: usize = 64;

/// A client frame: its optional id and either a request or why it is invalid.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// Echoed in the reply when present.
    pub id: Option<RequestId>,
    /// `false` when the client asked for no success reply to a `dm` or
    /// `room` (`"ack": false`, fire-and-forget); errors are always sent.
    pub ack: bool,
    /// The request, or the error to answer with.
    pub request: Result<Request<'a>, ProtocolError>,
}

/// Every field a client frame may carry, each kept raw so that a mistyped
/// field is reported precisely instead of failing the whole frame. A field
/// present as `null` is `Some("null")` (a `null` body is a valid body); only
/// `id` treats `null` as absent.
#[derive(serde::Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    to: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    room: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    users: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    ack: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    store: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    key: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    receipt: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    seq: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    events: Option<&'a RawValue>,
}

/// A field that is present, whatever its value (absent fields take `default`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue as serde::Deserialize>::deserialize(d).map(Some)
}

/// Whether `text` is (at most whitespace followed by) a JSON object. serde's
/// derived struct deserializers also accept a JSON array as the struct's
/// fields in order; frames are objects only.
fn is_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}

/// Parses one text frame. Never panics; any input yields either a request or a
/// precise error (with the request id when one could be read).
pub fn parse(text: &str) -> Incoming<'_> {
    if !is_object(text) {
        return Incoming {
            id: None,
            ack: true,
            request: Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "frame is not a JSON object",
            )),
        };
    }
    let raw: RawFrame<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            return Incoming {
                id: None,
                ack: true,
                request: Err(ProtocolError::new(
                    ErrorCode::BadRequest,
                    format!("frame is not a JSON object: {e}"),
                )),
            }
        }
    };
    let id = match raw.id.map(parse_id).transpose() {
        Ok(id) => id,
        Err(e) => {
            return Incoming {
                id: None,
                ack: true,
                request: Err(e),
            }
        }
    };
    let ack = match raw.ack.map(|a| serde_json::from_str::<bool>(a.get())) {
        None => true,
        Some(Ok(ack)) => ack,
        Some(Err(_)) => {
            return Incoming {
                id,
                ack: true,
                request: Err(ProtocolError::new(
                    ErrorCode::BadRequest,
                    "`ack` must be a boolean",
                )),
            }
        }
    };
    Incoming {
        id,
        ack,
        request: parse_request(&raw),
    }
}

fn parse_id(raw: &RawValue) -> Result<RequestId, ProtocolError> {
    let text = raw.get();
    let is_string = text.starts_with('"');
    let is_integer =
        serde_json::from_str::<i64>(text).is_ok() || serde_json::from_str::<u64>(text).is_ok();
    if !(is_string || is_integer) {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "`id` must be a string or a 64-bit integer",
        ));
    }
    if text.len() > 2 + MAX_NAME_LEN * 2 {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "`id` is too long",
        ));
    }
    Ok(RequestId(raw.to_owned()))
}

fn parse_request<'a>(raw: &RawFrame<'a>) -> Result<Request<'a>, ProtocolError> {
    let kind: String = required_string(raw.kind, "type")?;
    match kind.as_str() {
        "dm" => Ok(Request::Direct {
            to: required_name(raw.to, "to")?,
            body: required_body(raw.body)?,
            options: dm_options(raw.store, raw.key, raw.receipt)?,
        }),
        "recv" => Ok(Request::Recv {
            seq: required_seq(raw.seq)?,
        }),
        "join" => Ok(Request::Join {
            room: required_name(raw.room, "room")?,
            since: match raw.since {
                None => None,
                Some(since) => Some(required_seq(Some(since))?),
            },
            token: raw.token.map(|t| required_token(Some(t))).transpose()?,
            events: optional_bool(raw.events, "events", true)?,
        }),
        "leave" => Ok(Request::Leave {
            room: required_name(raw.room, "room")?,
        }),
        "room" => Ok(Request::Room {
            room: required_name(raw.room, "room")?,
            body: required_body(raw.body)?,
        }),
        "presence" => Ok(Request::Presence {
            users: parse_users(raw.users, MAX_PRESENCE_USERS)?,
        }),
        "watch" => Ok(Request::Watch {
            users: parse_users(raw.users, MAX_WATCH_USERS)?,
        }),
        "unwatch" => Ok(Request::Unwatch {
            users: parse_users(raw.users, MAX_WATCH_USERS)?,
        }),
        "members" => Ok(Request::Members {
            room: required_name(raw.room, "room")?,
        }),
        "ping" => Ok(Request::Ping),
        "refresh" => Ok(Request::Refresh {
            token: required_token(raw.token)?,
        }),
        _ => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            "unknown frame type (expected dm, recv, join, leave, room, presence, watch, unwatch, \
             members, ping or refresh)",
        )),
    }
}

fn required_string(raw: Option<&RawValue>, field: &str) -> Result<String, ProtocolError> {
    let raw = raw.ok_or_else(|| {
        ProtocolError::new(ErrorCode::BadRequest, format!("missing field `{field}`"))
    })?;
    serde_json::from_str::<String>(raw.get()).map_err(|_| {
        ProtocolError::new(ErrorCode::BadRequest, format!("`{field}` must be a string"))
    })
}

fn optional_bool(
    raw: Option<&RawValue>,
    field: &str,
    default: bool,
) -> Result<bool, ProtocolError> {
    match raw {
        None => Ok(default),
        Some(raw) => serde_json::from_str::<bool>(raw.get()).map_err(|_| {
            ProtocolError::new(
                ErrorCode::BadRequest,
                format!("`{field}` must be a boolean"),
            )
        }),
    }
}

fn dm_options(
    store: Option<&RawValue>,
    key: Option<&RawValue>,
    receipt: Option<&RawValue>,
) -> Result<DmOptions, ProtocolError> {
    let store = optional_bool(store, "store", true)?;
    let receipt = optional_bool(receipt, "receipt", false)?;
    let key = match key {
        None => None,
        Some(key) => {
            let key = required_string(Some(key), "key")?;
            let len = key.chars().count();
            if len == 0 || len > MAX_KEY_LEN {
                return Err(ProtocolError::new(
                    ErrorCode::BadRequest,
                    format!("`key` must be 1 to {MAX_KEY_LEN} characters"),
                ));
            }
            Some(key)
        }
    };
    if !store && (key.is_some() || receipt) {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "`key` and `receipt` need a stored DM (`store` true)",
        ));
    }
    Ok(DmOptions {
        store,
        key,
        receipt,
    })
}

/// Longest token accepted in a frame, in bytes (a JWT with a few claims
/// is well under 2 KiB; an RS256 signature alone is 342 characters).
pub const MAX_TOKEN_LEN: usize = 8192;

fn required_token(raw: Option<&RawValue>) -> Result<String, ProtocolError> {
    let token = required_string(raw, "token")?;
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            format!("`token` must be 1 to {MAX_TOKEN_LEN} bytes"),
        ));
    }
    Ok(token)
}

fn required_seq(raw: Option<&RawValue>) -> Result<Seq, ProtocolError> {
    let text = required_string(raw, "seq")?;
    Seq::parse(&text).ok_or_else(|| {
        ProtocolError::new(
            ErrorCode::BadRequest,
            "`seq` is not a seq this server issued",
        )
    })
}

fn required_name(raw: Option<&RawValue>, field: &str) -> Result<String, ProtocolError> {
    let name = required_string(raw, field)?;
    validate_name(&name)
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidName, format!("`{field}`: {e}")))?;
    Ok(name)
}

fn required_body(raw: Option<&RawValue>) -> Result<&RawValue, ProtocolError> {
    let body =
        raw.ok_or_else(|| ProtocolError::new(ErrorCode::BadRequest, "missing field `body`"))?;
    if nesting_depth(body.get()) > MAX_BODY_DEPTH {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            format!("`body` is nested deeper than {MAX_BODY_DEPTH} levels"),
        ));
    }
    Ok(body)
}

/// Deepest array/object nesting of valid JSON text, skipping string contents.
fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn parse_users(raw: Option<&RawValue>, max: usize) -> Result<Vec<String>, ProtocolError> {
    let raw =
        raw.ok_or_else(|| ProtocolError::new(ErrorCode::BadRequest, "missing field `users`"))?;
    let users: Vec<String> = serde_json::from_str(raw.get()).map_err(|_| {
        ProtocolError::new(ErrorCode::BadRequest, "`users` must be an array of strings")
    })?;
    if users.len() > max {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            format!("at most {max} users per frame"),
        ));
    }
    for user in &users {
        validate_name(user)
            .map_err(|e| ProtocolError::new(ErrorCode::InvalidName, format!("`users`: {e}")))?;
    }
    Ok(users)
}

/// Where a server-side publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishTarget {
    /// Every connection of one user.
    User(String),
    /// Every member of one room.
    Room(String),
}

/// A validated `POST /api/v1/publish` request.
#[derive(Debug)]
pub struct Publish<'a> {
    /// The user or room.
    pub target: PublishTarget,
    /// Any JSON, kept as written.
    pub body: &'a RawValue,
    /// Shown to recipients as `from`: a label naming the backend service.
    pub from: String,
    /// `store` and `key` (a publish to a user only; `receipt` is not offered).
    pub options: DmOptions,
}

/// `from` of a server-side publish that names no sender.
pub const DEFAULT_PUBLISH_FROM: &str = "server";

#[derive(serde::Deserialize)]
struct RawPublish<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    user: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    room: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    from: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    store: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    key: Option<&'a RawValue>,
}

/// Parses and validates a server-side publish request body.
pub fn parse_publish(text: &str) -> Result<Publish<'_>, ProtocolError> {
    if !is_object(text) {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "request is not a JSON object",
        ));
    }
    let raw: RawPublish<'_> = serde_json::from_str(text).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadRequest,
            format!("request is not a JSON object: {e}"),
        )
    })?;
    let target = match (raw.user, raw.room) {
        (Some(user), None) => PublishTarget::User(required_name(Some(user), "user")?),
        (None, Some(room)) => PublishTarget::Room(required_name(Some(room), "room")?),
        _ => {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "exactly one of `user` and `room` is required",
            ))
        }
    };
    let from = match raw.from {
        Some(from) => required_name(Some(from), "from")?,
        None => DEFAULT_PUBLISH_FROM.to_owned(),
    };
    let options = dm_options(raw.store, raw.key, None)?;
    if matches!(target, PublishTarget::Room(_)) && (raw.store.is_some() || raw.key.is_some()) {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "`store` and `key` apply to a publish to a `user`",
        ));
    }
    Ok(Publish {
        target,
        body: required_body(raw.body)?,
        from,
        options,
    })
}

/// Outcome of a direct message, as told to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectStatus {
    /// At least one live instance holding the recipient was sent the message
    /// (or the recipient is on this instance only and it was queued there).
    Routed,
    /// Nobody holds the recipient (a stored DM waits in their inbox).
    Offline,
    /// The recipient's connections on this instance got it; other instances
    /// could not be reached (they may hold more of the recipient's devices).
    /// A retry would duplicate it for the local connections.
    Partial,
}

impl DirectStatus {
    /// The `status` of the ack.
    pub fn as_str(self) -> &'static str {
        match self {
            DirectStatus::Routed => "routed",
            DirectStatus::Offline => "offline",
            DirectStatus::Partial => "partial",
        }
    }
}

/// Outcome of a room message, as told to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomStatus {
    /// Local members got it and it was published to the other instances.
    Ok,
    /// Local members got it; the other instances could not be reached (or
    /// did not answer in time). A retry would duplicate it for local members.
    Partial,
}

impl RoomStatus {
    /// The `status` of the ack.
    pub fn as_str(self) -> &'static str {
        match self {
            RoomStatus::Ok => "ok",
            RoomStatus::Partial => "partial",
        }
    }
}

/// A text frame ready for a socket: UTF-8 by construction, and cheap to
/// clone (every recipient of a message shares the same bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextFrame(Bytes);

impl TextFrame {
    /// Takes bytes that must be UTF-8 (a frame read back off the bus);
    /// `None` if they are not.
    pub fn from_utf8(bytes: Bytes) -> Option<TextFrame> {
        std::str::from_utf8(&bytes).ok()?;
        Some(TextFrame(bytes))
    }

    /// The frame's text.
    pub fn as_str(&self) -> &str {
        // Checked (or built from a `String`) at construction.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The frame's bytes (valid UTF-8).
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for TextFrame {
    fn from(text: String) -> Self {
        TextFrame(Bytes::from(text))
    }
}

impl From<&'static str> for TextFrame {
    fn from(text: &'static str) -> Self {
        TextFrame(Bytes::from_static(text.as_bytes()))
    }
}

/// Frames the server sends. Serialized once per message and shared by every
/// recipient.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame of every connection.
    Welcome {
        /// The authenticated user id.
        user: &'a str,
        /// The instance holding this connection.
        instance: &'a str,
        /// This connection's id.
        conn: &'a str,
    },
    /// Reply to a request that succeeded.
    Ack {
        /// The request id, when the request had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        /// `ok`, `routed`, `offline` or `partial`.
        status: &'a str,
        /// Id of the message a `dm` created.
        #[serde(skip_serializing_if = "Option::is_none")]
        msg_id: Option<&'a str>,
        /// A stored DM's inbox position (v1.1).
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<Seq>,
        /// Whether a DM was stored in the recipient's inbox (v1.1).
        #[serde(skip_serializing_if = "Option::is_none")]
        stored: Option<bool>,
        /// A join with `since`: whether the room's history reached back
        /// to it (v1.1).
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// A direct message delivered to its recipient.
    Dm {
        /// Sender, always from the authenticated connection.
        from: &'a str,
        /// The sender's body, verbatim.
        body: &'a RawValue,
        /// Unique message id.
        msg_id: &'a str,
        /// Server time of acceptance, unix milliseconds.
        ts: u64,
    },
    /// A room message delivered to a member.
    Room {
        /// The room.
        room: &'a str,
        /// Sender, always from the authenticated connection.
        from: &'a str,
        /// The sender's body, verbatim.
        body: &'a RawValue,
        /// Unique message id.
        msg_id: &'a str,
        /// Server time of acceptance, unix milliseconds.
        ts: u64,
    },
    /// Sent before a replay when entries after `after` were trimmed by the
    /// retention limits: the replay starts at `first` (none: nothing left).
    Gap {
        /// The position the replay was asked to start after.
        after: Seq,
        /// The oldest entry still kept, if any.
        first: Option<Seq>,
    },
    /// A recipient acknowledged a DM that asked for a receipt.
    Delivered {
        /// The DM's message id.
        msg_id: &'a str,
        /// The recipient.
        to: &'a str,
        /// The DM's inbox position.
        seq: Seq,
    },
    /// Reply to a presence query.
    Presence {
        /// The request id, when the request had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        /// user -> online anywhere.
        online: std::collections::BTreeMap<&'a str, bool>,
    },
    /// A watched user's user-level transition: online on its first
    /// connection anywhere, offline when its last one is gone (after the
    /// grace, or when its instance was declared dead).
    PresenceEvent {
        /// The user.
        user: &'a str,
        /// Online after the transition.
        online: bool,
        /// When it was announced, unix milliseconds.
        ts: u64,
    },
    /// A user became a member of a room (its first connection in the room
    /// anywhere).
    MemberJoined {
        /// The room.
        room: &'a str,
        /// The user.
        user: &'a str,
        /// When, unix milliseconds.
        ts: u64,
    },
    /// A user is no longer a member of a room (its last connection in the
    /// room left, after the grace, or its instance was declared dead).
    MemberLeft {
        /// The room.
        room: &'a str,
        /// The user.
        user: &'a str,
        /// When, unix milliseconds.
        ts: u64,
    },
    /// Reply to `members`: the room's members, cluster-wide, sorted.
    Members {
        /// The request id, when the request had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        /// The room.
        room: &'a str,
        /// User ids, sorted; at most `--max-members-listed`.
        users: &'a [String],
        /// Present (true) when more members exist than were listed.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// The connection token (no `room`) or a room token (`room`) expires
    /// in `in_ms`: send a `refresh` (or join the room again with a new
    /// room token) before then.
    TokenExpiring {
        /// The room whose room token expires; absent for the connection's.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        /// Milliseconds until it expires.
        in_ms: u64,
    },
    /// The connection is no longer a member of `room`, without having
    /// asked: `kicked` (the server API), `token_expired` (its room
    /// token), `revoked` (a refreshed token no longer allows it).
    Left {
        /// The room.
        room: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// Reply to `ping`.
    Pong {
        /// The request id, when the request had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    },
    /// A request that failed; the connection stays open.
    Error {
        /// The request id, when it could be read.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    /// The frame as JSON text. Serializing these types cannot fail (no maps with
    /// non-string keys, no non-finite floats), so a failure is reported as an
    /// internal error frame rather than a panic.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"bad_request","message":"internal serialization error"}"#
                .to_owned()
        })
    }

    /// The frame, serialized once, ready to be shared by every recipient.
    pub fn to_frame(&self) -> TextFrame {
        TextFrame::from(self.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(text: &str) -> ErrorCode {
        match parse(text).request {
            Err(e) => e.code,
            Ok(r) => panic!("expected an error for {text}, got {r:?}"),
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("alice").is_ok());
        assert!(validate_name("a_b.c:d@e-f").is_ok());
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"x".repeat(65)), Err(NameError::TooLong));
        assert!(validate_name(&"x".repeat(64)).is_ok());
        assert_eq!(validate_name("a b"), Err(NameError::BadCharacter));
        assert_eq!(validate_name("a{b}"), Err(NameError::BadCharacter));
        assert_eq!(validate_name("é"), Err(NameError::BadCharacter));
    }

    #[test]
    fn dm_parses_and_keeps_body_verbatim() {
        let inc = parse(r#"{"type":"dm","to":"bob","body":{"a": [1, 2]},"id":7,"from":"mallory"}"#);
        assert_eq!(inc.id.as_ref().map(RequestId::as_json), Some("7"));
        match inc.request {
            Ok(Request::Direct { to, body, .. }) => {
                assert_eq!(to, "bob");
                assert_eq!(body.get(), r#"{"a": [1, 2]}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn errors_are_precise() {
        assert_eq!(code_of("not json"), ErrorCode::BadRequest);
        assert_eq!(code_of("[1,2]"), ErrorCode::BadRequest);
        // serde would take an array as the struct's fields in order.
        assert_eq!(code_of(r#"["ping",7]"#), ErrorCode::BadRequest);
        assert_eq!(
            code_of(r#"["dm",1,"bob",null,{"text":"x"},null,true]"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code_of(r#"  "ping""#), ErrorCode::BadRequest);
        let leak = parse(r#"["ping"]"#)
            .request
            .map(|_| ())
            .map_err(|e| e.message);
        assert_eq!(leak, Err("frame is not a JSON object".to_owned()));
        assert!(parse(" \n{\"type\":\"ping\"}").request.is_ok());
        assert_eq!(code_of(r#"{"type":"nope"}"#), ErrorCode::UnknownType);
        assert_eq!(code_of(r#"{"to":"bob"}"#), ErrorCode::BadRequest);
        assert_eq!(code_of(r#"{"type":5}"#), ErrorCode::BadRequest);
        assert_eq!(
            code_of(r#"{"type":"dm","to":5,"body":1}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(r#"{"type":"dm","to":"bob"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(r#"{"type":"dm","to":"","body":1}"#),
            ErrorCode::InvalidName
        );
        assert_eq!(
            code_of(r#"{"type":"dm","to":"a b","body":1}"#),
            ErrorCode::InvalidName
        );
        assert_eq!(
            code_of(r#"{"type":"join","room":null}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(r#"{"type":"presence","users":"bob"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(r#"{"type":"presence","users":["ok","b d"]}"#),
            ErrorCode::InvalidName
        );
        let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
        let frame = serde_json::json!({"type":"presence","users":many}).to_string();
        assert_eq!(code_of(&frame), ErrorCode::BadRequest);
    }

    #[test]
    fn publish_requests() {
        let p = parse_publish(r#"{"user":"bob","body":{"t":"rejected"},"from":"tickets"}"#)
            .expect("ok");
        assert_eq!(p.target, PublishTarget::User("bob".into()));
        assert_eq!(
            (p.body.get(), p.from.as_str()),
            (r#"{"t":"rejected"}"#, "tickets")
        );
        let p = parse_publish(r#"{"room":"lobby","body":1}"#).expect("ok");
        assert_eq!(
            (p.target, p.from.as_str()),
            (PublishTarget::Room("lobby".into()), "server")
        );
        for bad in [
            r#"{"user":"bob","room":"lobby","body":1}"#,
            r#"{"body":1}"#,
            r#"{"user":"bob"}"#,
            r#"{"user":"b b","body":1}"#,
            r#"{"user":"bob","body":1,"from":5}"#,
            r#"[]"#,
            r#"[{"user":"bob"},{"t":1},"svc"]"#,
            r#"["bob",1,null,"svc"]"#,
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ack_false_is_fire_and_forget() {
        assert!(parse(r#"{"type":"dm","to":"b","body":1}"#).ack);
        let inc = parse(r#"{"type":"dm","to":"b","body":1,"ack":false}"#);
        assert!(!inc.ack && inc.request.is_ok());
        let bad = parse(r#"{"type":"dm","to":"b","body":1,"ack":"no","id":3}"#);
        assert_eq!(
            bad.request.map(|_| ()).map_err(|e| e.code),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(bad.id.as_ref().map(RequestId::as_json), Some("3"));
    }

    #[test]
    fn a_null_body_is_a_body() {
        match parse(r#"{"type":"dm","to":"bob","body":null}"#).request {
            Ok(Request::Direct { body, .. }) => assert_eq!(body.get(), "null"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse(r#"{"type":"room","room":"r","body":null}"#)
            .request
            .is_ok());
    }

    #[test]
    fn ids_must_be_strings_or_integers() {
        assert!(parse(r#"{"type":"ping","id":"abc"}"#).id.is_some());
        assert!(parse(r#"{"type":"ping","id":-3}"#).id.is_some());
        // `"id": null` is the same as no id.
        assert!(parse(r#"{"type":"ping","id":null}"#).request.is_ok());
        for bad in [r#"1.5"#, r#"1e400"#, r#"{"a":1}"#, r#"[1]"#, r#"true"#] {
            let frame = format!(r#"{{"type":"ping","id":{bad}}}"#);
            let inc = parse(&frame);
            assert!(inc.id.is_none(), "{bad}");
            assert!(inc.request.is_err(), "{bad}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let frame = format!(r#"{{"type":"dm","to":"bob","body":{deep}}}"#);
        assert_eq!(code_of(&frame), ErrorCode::BadRequest);
    }

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(nesting_depth(r#"{"a":[1,{"b":"[[[[\\\"]]"}]}"#), 3);
        assert_eq!(nesting_depth("1"), 0);
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_BODY_DEPTH),
            "]".repeat(MAX_BODY_DEPTH)
        );
        assert!(parse(&format!(r#"{{"type":"dm","to":"bob","body":{ok}}}"#))
            .request
            .is_ok());
    }

    #[test]
    fn watch_members_and_quiet_joins_parse() {
        match parse(r#"{"type":"watch","users":["bob","carol"],"id":1}"#).request {
            Ok(Request::Watch { users }) => assert_eq!(users, ["bob", "carol"]),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"unwatch","users":["bob"]}"#).request {
            Ok(Request::Unwatch { users }) => assert_eq!(users, ["bob"]),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"members","room":"lobby","id":2}"#).request {
            Ok(Request::Members { room }) => assert_eq!(room, "lobby"),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"join","room":"big","events":false}"#).request {
            Ok(Request::Join { events, .. }) => assert!(!events),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            code_of(r#"{"type":"join","room":"big","events":"no"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(r#"{"type":"watch","users":["a b"]}"#),
            ErrorCode::InvalidName
        );
        assert_eq!(code_of(r#"{"type":"watch"}"#), ErrorCode::BadRequest);
        let many: Vec<String> = (0..=MAX_WATCH_USERS).map(|i| format!("u{i}")).collect();
        let frame = serde_json::json!({"type": "watch", "users": many}).to_string();
        assert_eq!(code_of(&frame), ErrorCode::BadRequest);
        assert_eq!(code_of(r#"{"type":"members"}"#), ErrorCode::BadRequest);
    }

    #[test]
    fn presence_and_member_frames_serialize() {
        assert_eq!(
            ServerFrame::PresenceEvent {
                user: "bob",
                online: false,
                ts: 5
            }
            .to_text(),
            r#"{"type":"presence_event","user":"bob","online":false,"ts":5}"#
        );
        assert_eq!(
            ServerFrame::MemberJoined {
                room: "lobby",
                user: "bob",
                ts: 6
            }
            .to_text(),
            r#"{"type":"member_joined","room":"lobby","user":"bob","ts":6}"#
        );
        assert_eq!(
            ServerFrame::MemberLeft {
                room: "lobby",
                user: "bob",
                ts: 7
            }
            .to_text(),
            r#"{"type":"member_left","room":"lobby","user":"bob","ts":7}"#
        );
        let users = ["alice".to_owned(), "bob".to_owned()];
        assert_eq!(
            ServerFrame::Members {
                id: None,
                room: "lobby",
                users: &users,
                truncated: false
            }
            .to_text(),
            r#"{"type":"members","room":"lobby","users":["alice","bob"]}"#
        );
        assert!(ServerFrame::Members {
            id: None,
            room: "lobby",
            users: &users,
            truncated: true
        }
        .to_text()
        .ends_with(r#""truncated":true}"#));
    }

    #[test]
    fn join_tokens_and_refresh_parse() {
        match parse(r#"{"type":"join","room":"team-42:x","token":"a.b.c","id":1}"#).request {
            Ok(Request::Join {
                room,
                token,
                since,
                events,
            }) => {
                assert_eq!(
                    (room.as_str(), token.as_deref(), since, events),
                    ("team-42:x", Some("a.b.c"), None, true)
                );
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"join","room":"lobby"}"#).request {
            Ok(Request::Join { token: None, .. }) => {}
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"refresh","token":"x.y.z","id":"r"}"#).request {
            Ok(Request::Refresh { token }) => assert_eq!(token, "x.y.z"),
            other => panic!("{other:?}"),
        }
        assert_eq!(code_of(r#"{"type":"refresh"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code_of(r#"{"type":"refresh","token":""}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(r#"{"type":"refresh","token":7}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(r#"{"type":"join","room":"a","token":null}"#),
            ErrorCode::BadRequest
        );
        let long = format!(
            r#"{{"type":"refresh","token":"{}"}}"#,
            "a".repeat(MAX_TOKEN_LEN + 1)
        );
        assert_eq!(code_of(&long), ErrorCode::BadRequest);
    }

    #[test]
    fn token_and_membership_frames_serialize() {
        let frame = ServerFrame::TokenExpiring {
            room: None,
            in_ms: 1500,
        }
        .to_text();
        assert_eq!(frame, r#"{"type":"token_expiring","in_ms":1500}"#);
        let frame = ServerFrame::TokenExpiring {
            room: Some("vip"),
            in_ms: 1,
        }
        .to_text();
        assert_eq!(frame, r#"{"type":"token_expiring","room":"vip","in_ms":1}"#);
        let frame = ServerFrame::Left {
            room: "lobby",
            reason: "kicked",
        }
        .to_text();
        assert_eq!(frame, r#"{"type":"left","room":"lobby","reason":"kicked"}"#);
        let error = ServerFrame::Error {
            id: None,
            code: ErrorCode::Forbidden,
            message: "no",
        };
        assert_eq!(
            error.to_text(),
            r#"{"type":"error","code":"forbidden","message":"no"}"#
        );
        let error = ServerFrame::Error {
            id: None,
            code: ErrorCode::InvalidToken,
            message: "no",
        };
        assert!(error.to_text().contains(r#""code":"invalid_token""#));
    }

    #[test]
    fn server_frames_serialize() {
        let id = parse(r#"{"type":"ping","id":"x1"}"#).id;
        let ack = ServerFrame::Ack {
            id: id.as_ref(),
            status: "routed",
            msg_id: Some("m1"),
            seq: None,
            stored: None,
            recovered: None,
        };
        assert_eq!(
            ack.to_text(),
            r#"{"type":"ack","id":"x1","status":"routed","msg_id":"m1"}"#
        );
        let body = RawValue::from_string("{\"k\":1}".to_owned()).expect("raw");
        let dm = ServerFrame::Dm {
            from: "alice",
            body: &body,
            msg_id: "m1",
            ts: 5,
        };
        assert_eq!(
            dm.to_text(),
            r#"{"type":"dm","from":"alice","body":{"k":1},"msg_id":"m1","ts":5}"#
        );
        assert_eq!(
            ServerFrame::Pong { id: None }.to_text(),
            r#"{"type":"pong"}"#
        );
    }
}
