//! The protocol client: a WebSocket connection speaking Switchboard's JSON
//! frames, that buffers what arrives while it waits for something else, and
//! never hangs (every wait is bounded). Also the upgrade requests it sends
//! and the two checks every protocol test makes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::instance::Instance;
use crate::wait::RECV_TIMEOUT;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What [`Client::next_event`] saw: a frame, the end of the connection, or
/// nothing within the timeout. Never panics, for tests where connections are
/// expected to drop (restarts, slow consumers).
#[derive(Debug)]
pub enum Incoming {
    /// A JSON text frame.
    Json(Value),
    /// The server's Close frame, with its code.
    Closed(Option<u16>),
    /// The connection ended without a Close frame (the text says how).
    Ended(String),
    /// Nothing arrived within the timeout.
    Timeout,
}

/// A protocol client. Frames that arrive while waiting for something else
/// (e.g. pushed dm/room frames while waiting for an ack) are buffered and
/// returned by later `recv_*` calls, in arrival order.
pub struct Client {
    /// The connection (tokio-tungstenite answers pings while it is read).
    ws: Ws,
    /// Frames read while waiting for another one, oldest first.
    pub(crate) buffered: VecDeque<Value>,
    /// Numbers the ids [`Client::request`] adds.
    next_id: u64,
    /// The welcome frame the server sent first.
    pub welcome: Value,
    /// `user@instance` (or the URL before the welcome), in panic messages.
    pub(crate) label: String,
    /// Whether `member_joined`/`member_left` frames are kept. Every join is
    /// announced to the room's members (protocol §1b); tests about other
    /// things leave them out, a test that joins through
    /// [`Client::join`]/[`Client::join_with_events`] (or calls
    /// [`Client::keep_member_events`]) sees every one.
    pub(crate) member_events: bool,
}

impl Client {
    /// Auth none: connects as `?user=<user>` and reads the welcome frame.
    pub async fn connect_user(instance: &Instance, user: &str) -> Client {
        Self::connect(instance.ws_request(&format!("user={user}"))).await
    }

    /// Auth jwt: connects with `?token=<token>` and reads the welcome frame.
    pub async fn connect_token(instance: &Instance, token: &str) -> Client {
        Self::connect(instance.ws_request(&format!("token={token}"))).await
    }

    /// Auth jwt: connects with `Authorization: Bearer <token>`.
    pub async fn connect_bearer(instance: &Instance, token: &str) -> Client {
        Self::connect(instance.ws_request_bearer(token)).await
    }

    /// Connects with an arbitrary request, panicking if the upgrade fails.
    pub async fn connect(request: Request) -> Client {
        let uri = request.uri().to_string();
        match Self::try_connect(request).await {
            Ok(client) => client,
            Err(WsError::Http(resp)) => panic!(
                "websocket upgrade to {uri} rejected with HTTP {}: {}",
                resp.status(),
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
            ),
            Err(e) => panic!("websocket connect to {uri} failed: {e}"),
        }
    }

    /// Connects and reads the welcome frame; returns the handshake error as is.
    pub async fn try_connect(request: Request) -> Result<Client, WsError> {
        let (mut client, welcome) = Self::try_connect_raw(request).await?;
        assert_eq!(
            welcome["type"], "welcome",
            "first server frame must be the welcome frame, got {welcome}"
        );
        client.label = format!(
            "{}@{}",
            welcome["user"].as_str().unwrap_or("?"),
            welcome["instance"].as_str().unwrap_or("?")
        );
        client.welcome = welcome;
        Ok(client)
    }

    /// Connects and returns the server's first frame as it is, without
    /// checking that it is the welcome frame (`welcome` stays null).
    pub async fn try_connect_raw(request: Request) -> Result<(Client, Value), WsError> {
        let uri = request.uri().to_string();
        let (ws, _resp) =
            tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
                .unwrap_or_else(|_| panic!("websocket handshake with {uri} timed out"))?;
        let mut client = Client {
            ws,
            buffered: VecDeque::new(),
            next_id: 0,
            welcome: Value::Null,
            label: uri,
            member_events: false,
        };
        let first = client.recv_json().await;
        Ok((client, first))
    }

    /// Expects the upgrade to be refused; returns the HTTP status.
    pub async fn rejection_status(request: Request) -> u16 {
        let uri = request.uri().to_string();
        match Self::try_connect(request).await {
            Ok(client) => panic!(
                "websocket upgrade to {uri} was accepted (welcome {}), expected an HTTP rejection",
                client.welcome
            ),
            Err(WsError::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("websocket connect to {uri} failed without an HTTP status: {e}"),
        }
    }

    /// The connection id from the welcome frame.
    pub fn conn_id(&self) -> String {
        self.welcome["conn"]
            .as_str()
            .unwrap_or_else(|| panic!("welcome has no string conn: {}", self.welcome))
            .to_string()
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        if let Err(e) = self.ws.send(Message::text(text)).await {
            panic!("[{}] sending a text frame failed: {e}", self.label);
        }
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        if let Err(e) = self.ws.send(Message::binary(data)).await {
            panic!("[{}] sending a binary frame failed: {e}", self.label);
        }
    }

    pub(crate) async fn read_incoming(&mut self, timeout: Duration) -> Incoming {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Incoming::Timeout,
                Ok(None) => return Incoming::Ended("stream ended".to_string()),
                Ok(Some(Err(e))) => return Incoming::Ended(e.to_string()),
                Ok(Some(Ok(msg))) => match msg {
                    Message::Text(text) => match serde_json::from_str::<Value>(text.as_str()) {
                        Ok(value)
                            if !self.member_events
                                && matches!(
                                    value["type"].as_str(),
                                    Some("member_joined" | "member_left")
                                ) => {}
                        Ok(value) => return Incoming::Json(value),
                        Err(e) => panic!(
                            "[{}] server sent a non-JSON text frame ({e}): {}",
                            self.label,
                            text.as_str()
                        ),
                    },
                    Message::Binary(data) => {
                        panic!("[{}] server sent a binary frame: {data:?}", self.label)
                    }
                    Message::Close(frame) => {
                        return Incoming::Closed(frame.map(|f| u16::from(f.code)))
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                },
            }
        }
    }

    pub(crate) async fn read_json(&mut self, timeout: Duration, waiting_for: &str) -> Value {
        match self.read_incoming(timeout).await {
            Incoming::Json(value) => value,
            Incoming::Timeout => panic!(
                "[{}] timed out after {timeout:?} waiting for {waiting_for}; buffered frames: {:?}",
                self.label, self.buffered
            ),
            Incoming::Closed(code) => panic!(
                "[{}] connection closed (code {code:?}) while waiting for {waiting_for}",
                self.label
            ),
            Incoming::Ended(e) => panic!(
                "[{}] connection ended ({e}) while waiting for {waiting_for}",
                self.label
            ),
        }
    }

    /// Reads dm frames until `n` distinct seqs arrived (the seam's
    /// de-duplication, as a client does it); returns them in arrival order.
    /// Panics if they do not arrive `within`.
    pub async fn distinct_dms(&mut self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seqs = std::collections::BTreeSet::new();
        let mut dms = Vec::new();
        while dms.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Incoming::Json(frame) if frame["type"] == "dm" => {
                    let seq = frame["seq"].as_str().unwrap_or_default().to_owned();
                    if seqs.insert(seq) {
                        dms.push(frame);
                    }
                }
                Incoming::Json(_) => {}
                other => panic!(
                    "[{}] {} of {n} distinct DMs, then {other:?}",
                    self.label,
                    dms.len()
                ),
            }
        }
        dms
    }

    /// Keeps `member_joined`/`member_left` frames from now on (they are left
    /// out by default: see [`Client::member_events`]).
    pub fn keep_member_events(&mut self) {
        self.member_events = true;
    }

    /// Next event (buffered frames first), waiting up to `timeout`; never
    /// panics. After `Closed` or `Ended` the client is unusable.
    pub async fn next_event(&mut self, timeout: Duration) -> Incoming {
        if let Some(value) = self.buffered.pop_front() {
            return Incoming::Json(value);
        }
        self.read_incoming(timeout).await
    }

    /// Sends a JSON frame; returns the error text instead of panicking.
    pub async fn try_send_json(&mut self, value: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .map_err(|e| format!("[{}] send failed: {e}", self.label))
    }

    /// Next frame (buffered first), waiting up to 5s.
    pub async fn recv_json(&mut self) -> Value {
        if let Some(value) = self.buffered.pop_front() {
            return value;
        }
        self.read_json(RECV_TIMEOUT, "any frame").await
    }

    /// Next frame with `"type": ty`; other frames stay buffered in order.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        if let Some(pos) = self.buffered.iter().position(|v| v["type"] == ty) {
            return self.buffered.remove(pos).expect("position is in range");
        }
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let value = self
                .read_json(left, &format!("a frame of type {ty:?}"))
                .await;
            if value["type"] == ty {
                return value;
            }
            self.buffered.push_back(value);
        }
    }

    /// Sends `frame` (adding a fresh string `id` if it has none) and returns
    /// the reply carrying that id; unrelated frames are buffered.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        if frame.get("id").is_none() {
            self.next_id += 1;
            frame["id"] = json!(format!("req-{}", self.next_id));
        }
        let id = frame["id"].clone();
        self.send_json(&frame).await;
        let deadline = Instant::now() + RECV_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let value = self.read_json(left, &format!("the reply to {frame}")).await;
            if value.get("id") == Some(&id) {
                return value;
            }
            self.buffered.push_back(value);
        }
    }

    /// Asserts that nothing arrives for `duration`, for tests about time
    /// itself (a connection that must outlive an idle timeout). To show that
    /// a message was *not* delivered, send a [`Sentinel`](crate::Sentinel)
    /// after it instead: no fixed wait is long enough on a loaded machine.
    pub async fn expect_silence_for(&mut self, duration: Duration) {
        assert!(
            self.buffered.is_empty(),
            "[{}] expected no frame, but these were already received: {:?}",
            self.label,
            self.buffered
        );
        match self.read_incoming(duration).await {
            Incoming::Timeout => {}
            Incoming::Json(value) => {
                panic!("[{}] expected no frame, but received {value}", self.label)
            }
            Incoming::Closed(code) => panic!(
                "[{}] expected no frame, but the connection was closed (code {code:?})",
                self.label
            ),
            Incoming::Ended(e) => panic!(
                "[{}] expected no frame, but the connection ended: {e}",
                self.label
            ),
        }
    }

    /// Waits (skipping data frames) for the server's Close frame and returns
    /// its code (None if the frame had no code). Panics if the connection
    /// ends without a Close frame or nothing happens within `timeout`.
    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_incoming(left).await {
                Incoming::Json(value) => self.buffered.push_back(value),
                Incoming::Closed(code) => {
                    // Keep polling briefly so our Close reply is flushed and
                    // the server sees a completed closing handshake.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some(Ok(_)) = self.ws.next().await {}
                    })
                    .await;
                    return code;
                }
                Incoming::Timeout => panic!(
                    "[{}] no Close frame within {timeout:?}; frames received: {:?}",
                    self.label, self.buffered
                ),
                Incoming::Ended(e) => panic!(
                    "[{}] connection ended without a Close frame: {e}; frames received: {:?}",
                    self.label, self.buffered
                ),
            }
        }
    }

    /// `presence` query for one user.
    pub async fn is_online(&mut self, user: &str) -> bool {
        let reply = self
            .request(json!({"type": "presence", "users": [user]}))
            .await;
        assert_eq!(reply["type"], "presence", "presence reply: {reply}");
        reply["online"][user]
            .as_bool()
            .unwrap_or_else(|| panic!("presence reply lacks a bool for {user}: {reply}"))
    }

    /// Polls `presence` until `user`'s state is `online` (or panics after 5s).
    pub async fn await_presence(&mut self, user: &str, online: bool) {
        let deadline = Instant::now() + RECV_TIMEOUT;
        while self.is_online(user).await != online {
            assert!(
                Instant::now() < deadline,
                "[{}] presence of {user} did not become online={online} within {RECV_TIMEOUT:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful client-side close: sends Close and drains until the server
    /// ends the connection (bounded).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// A WebSocket upgrade request for `ws://ADDR/ws?<query>` (any server, e.g.
/// one run in-process).
pub fn ws_request_at(addr: SocketAddr, query: &str) -> Request {
    let url = if query.is_empty() {
        format!("ws://{addr}/ws")
    } else {
        format!("ws://{addr}/ws?{query}")
    };
    url.into_client_request().expect("build websocket request")
}

/// Asserts the connection still answers `ping` with `pong`.
pub async fn assert_healthy(client: &mut Client, after: &str) {
    let pong = client
        .request(json!({"type": "ping", "id": "health"}))
        .await;
    assert_eq!(
        pong,
        json!({"type": "pong", "id": "health"}),
        "connection must stay usable after {after}"
    );
}

/// Asserts `reply` is an error frame with `code` and a message.
pub fn assert_error(reply: &Value, code: &str, what: &str) {
    assert_eq!(
        reply["type"], "error",
        "{what}: expected an error frame, got {reply}"
    );
    assert_eq!(reply["code"], code, "{what}: wrong error code in {reply}");
    assert!(
        reply["message"].is_string(),
        "{what}: error needs a message: {reply}"
    );
}

/// The `body.n` of each frame (tests number their bodies `{"n": k}`).
pub fn numbered_bodies(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| {
            f["body"]["n"]
                .as_u64()
                .unwrap_or_else(|| panic!("a numbered body: {f}"))
        })
        .collect()
}
