//! One connection slot's task: connect (TCP + upgrade, wait for the welcome,
//! join the slot's rooms), then one hand-written poll loop that both writes
//! the messages the scheduler hands it (pipelined: never waits for an ack)
//! and reads continuously (acks, deliveries), recording each into the current
//! [`StepState`]. It also performs churn (quiesce, close, reconnect) and the
//! final close.
//!
//! The task owns its WebSocket whole (no split, no lock), formats frames
//! through its [`Codec`] (Switchboard's frames or the Socket.IO peer's
//! packets; the protocol's own answers, the connect and the pongs, go out
//! before any message), and keeps per-connection state local: the queue of
//! sent-but-unacked ids (acks come back in send order, the server handles a
//! connection's frames one at a time), the per-(sender, stream) sequence trackers for duplicates
//! and reordering, and small latency buffers flushed into the step's
//! histograms once per wakeup.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use switchboard_bench_schema::Protocol;

use crate::cli::AuthMode;
use crate::socketio;
use crate::state::{
    lock, Shared, StepState, ST_ABANDONED, ST_ERROR, ST_NONE, ST_OFFLINE, ST_OK, ST_ROUTED,
};
use crate::wire::{self, BodyFields, Codec, Decoded, Kind, JOIN_ID_BASE};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames handled per wakeup in each direction before yielding.
const BATCH: usize = 256;
/// How long a churned connection may wait for its outstanding acks.
const QUIESCE: Duration = Duration::from_millis(500);
/// How long a close handshake may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A command from the scheduler to a connection.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    /// Send one message.
    Msg {
        /// DM or room message.
        kind: Kind,
        /// Recipient user or room index.
        target: u32,
        /// Measurement fields.
        body: BodyFields,
    },
    /// Churn: stop sending, close, reconnect.
    Churn,
    /// Close for good.
    Close,
}

/// What ended a session.
enum Event {
    /// Churn quiesce done: close and reconnect.
    Churn,
    /// The loader is done: close.
    Close,
    /// The server closed or the connection failed.
    Lost(String),
}

/// A multiply-xorshift hasher for u64 keys (the tracker map is hit per delivery).
#[derive(Default)]
pub struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let x = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by u64 with [`U64Hasher`].
pub type U64Map<V> = HashMap<u64, V, BuildHasherDefault<U64Hasher>>;

/// Sequence tracking of one (sender slot, stream) at one receiving connection.
#[derive(Debug, Default)]
struct Tracker {
    /// Highest sequence seen + 1 (0: none yet).
    top: u32,
    /// Which sequences were seen.
    seen: Vec<u64>,
}

impl Tracker {
    /// Returns `None` for a duplicate, else `Some(out_of_order)`.
    fn see(&mut self, seq: u32) -> Option<bool> {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        let mask = 1u64 << bit;
        if self.seen[word] & mask != 0 {
            return None;
        }
        self.seen[word] |= mask;
        let ooo = seq < self.top;
        self.top = self.top.max(seq + 1);
        Some(ooo)
    }
}

/// Per-connection state that survives reconnects.
struct Conn {
    shared: Arc<Shared>,
    slot: u32,
    user: u32,
    name: String,
    rooms: Vec<u32>,
    codec: Codec,
    /// Protocol answers not yet written (Socket.IO: the connect packet, pongs).
    replies: VecDeque<String>,
    /// Set when the server ended the session in the protocol itself
    /// (Socket.IO's disconnect or connect refusal), and why.
    ended: Option<String>,
    /// Sent, not yet acked: (id, actual send time ns). Stays empty with
    /// `--no-ack` (no acks are awaited).
    pending: VecDeque<(u64, u64)>,
    /// `--no-ack`: message acks are neither awaited nor counted.
    no_ack: bool,
    trackers: U64Map<Tracker>,
    tracker_step: u32,
    step: Option<Arc<StepState>>,
    lat_buf: Vec<u64>,
    ack_buf: Vec<u64>,
    lag_buf: Vec<u64>,
    dirty: bool,
    quiesce: Option<Pin<Box<Sleep>>>,
    welcomed: bool,
    joins_ok: usize,
    join_error: Option<String>,
}

/// Runs one connection slot until the loader closes it (or it is lost).
/// `ready` gets the outcome of the initial connect.
pub async fn run(
    shared: Arc<Shared>,
    slot: u32,
    mut rx: UnboundedReceiver<Cmd>,
    ready: UnboundedSender<(u32, Result<u64, String>)>,
    connect_limit: Arc<Semaphore>,
    deadline: Instant,
) {
    let plan = &shared.plan;
    let user = plan.user_of(slot);
    let args = &shared.args;
    let name = format!("{}{}", args.user_prefix, user);
    let mut conn = Conn {
        slot,
        user,
        rooms: plan.slot_rooms[slot as usize].clone(),
        codec: Codec::new(
            args.protocol,
            &name,
            &args.user_prefix,
            &args.room_prefix,
            args.body_bytes,
            args.no_ack,
        )
        .with_dm_store(args.dm_store),
        name,
        replies: VecDeque::new(),
        ended: None,
        pending: VecDeque::new(),
        no_ack: args.no_ack,
        trackers: U64Map::default(),
        tracker_step: 0,
        step: None,
        lat_buf: Vec::with_capacity(BATCH),
        ack_buf: Vec::with_capacity(BATCH),
        lag_buf: Vec::with_capacity(BATCH),
        dirty: false,
        quiesce: None,
        welcomed: false,
        joins_ok: 0,
        join_error: None,
        shared: shared.clone(),
    };
    let opened = tokio::time::timeout_at(deadline, async {
        let _permit = connect_limit.acquire().await.map_err(|e| e.to_string())?;
        conn.open().await
    })
    .await
    .unwrap_or_else(|_| Err("connect timeout".to_owned()));
    let mut ws = match opened {
        Ok((ws, us)) => {
            // Usable before it is reported ready: the first step counts on it.
            shared.slots[slot as usize]
                .connected
                .store(true, Ordering::Release);
            let _ = ready.send((slot, Ok(us)));
            ws
        }
        Err(e) => {
            let _ = ready.send((slot, Err(e)));
            return;
        }
    };
    drop(ready);

    loop {
        let event = poll_fn(|cx| conn.poll_session(&mut ws, &mut rx, cx)).await;
        match event {
            Event::Close => {
                conn.close(&mut ws).await;
                return;
            }
            Event::Lost(why) => {
                shared.slots[slot as usize]
                    .connected
                    .store(false, Ordering::Release);
                if !shared.closing.load(Ordering::Relaxed) {
                    if let Some(step) = shared.current_step() {
                        step.c.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    shared.anomaly(format!("connection {} ({}) lost: {why}", slot, conn.name));
                }
                conn.flush_local();
                return;
            }
            Event::Churn => {
                if !conn.churn(&mut ws).await {
                    return;
                }
                match conn.reopen().await {
                    Some(new_ws) => ws = new_ws,
                    None => return,
                }
            }
        }
    }
}

impl Conn {
    fn url(&self) -> Result<String, String> {
        let shared = &self.shared;
        let inst = shared.plan.slot_inst[self.slot as usize] as usize;
        let endpoint = &shared.targets[inst].endpoint;
        if shared.args.protocol == Protocol::Socketio {
            // The user travels in the Socket.IO connect packet (its auth).
            return Ok(format!("{endpoint}?{}", socketio::QUERY));
        }
        match shared.args.auth_mode()? {
            AuthMode::None => Ok(format!("{endpoint}?user={}", self.name)),
            AuthMode::Jwt => {
                let secret = shared.args.jwt_secret.as_deref().unwrap_or_default();
                Ok(format!(
                    "{endpoint}?token={}",
                    mint_token(&self.name, secret, shared.args.jwt_ttl)?
                ))
            }
        }
    }

    /// Connects, waits for the welcome, joins the rooms. Returns the socket
    /// and the connect latency (start of TCP connect to welcome), µs.
    async fn open(&mut self) -> Result<(Ws, u64), String> {
        let url = self.url()?;
        let t0 = std::time::Instant::now();
        // tungstenite zero-fills the whole read buffer before every read:
        // keep it small (frames are small), it grows for larger frames.
        let read_buf = (4 * (self.shared.args.body_bytes + 256)).clamp(4096, 128 * 1024);
        let config = WebSocketConfig::default().read_buffer_size(read_buf);
        let (mut ws, _response) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                .await
                .map_err(|e| format!("connect {}: {e}", self.name))?;
        self.welcomed = false;
        self.replies.clear();
        self.ended = None;
        while !self.welcomed {
            self.read_one(&mut ws).await?;
        }
        let connect_us = t0.elapsed().as_micros() as u64;
        if !self.rooms.is_empty() {
            self.joins_ok = 0;
            self.join_error = None;
            for (k, &room) in self.rooms.iter().enumerate() {
                let text = self.codec.join(room, JOIN_ID_BASE + k as u64);
                ws.feed(Message::text(text))
                    .await
                    .map_err(|e| format!("join: {e}"))?;
            }
            ws.flush().await.map_err(|e| format!("join: {e}"))?;
            while self.joins_ok < self.rooms.len() {
                if let Some(e) = self.join_error.take() {
                    return Err(e);
                }
                self.read_one(&mut ws).await?;
            }
        }
        self.flush_local();
        Ok((ws, connect_us))
    }

    /// Reads and handles one frame (connect phase), and writes the protocol
    /// answers it calls for.
    async fn read_one(&mut self, ws: &mut Ws) -> Result<(), String> {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let now = self.shared.now_ns();
                self.on_text(text.as_str(), now);
                if let Some(why) = self.ended.take() {
                    return Err(format!("{}: {why}", self.name));
                }
                while let Some(reply) = self.replies.pop_front() {
                    ws.send(Message::text(reply))
                        .await
                        .map_err(|e| format!("{}: {e}", self.name))?;
                }
                Ok(())
            }
            Some(Ok(Message::Close(frame))) => Err(format!(
                "{}: closed by the server before ready: {frame:?}",
                self.name
            )),
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(format!("{}: {e}", self.name)),
            None => Err(format!("{}: connection ended before ready", self.name)),
        }
    }

    /// The steady state: write what the scheduler sends, read everything.
    fn poll_session(
        &mut self,
        ws: &mut Ws,
        rx: &mut UnboundedReceiver<Cmd>,
        cx: &mut Context<'_>,
    ) -> Poll<Event> {
        // Write side: take commands while the socket accepts them.
        let mut n = 0;
        loop {
            match Pin::new(&mut *ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Event::Lost(format!("write: {e}"))),
                Poll::Pending => break,
            }
            // Protocol answers (pongs) before messages.
            if let Some(reply) = self.replies.pop_front() {
                if let Err(e) = Pin::new(&mut *ws).start_send(Message::text(reply)) {
                    return Poll::Ready(Event::Lost(format!("write: {e}")));
                }
                self.dirty = true;
                continue;
            }
            match rx.poll_recv(cx) {
                Poll::Ready(Some(Cmd::Msg { kind, target, body })) => {
                    let text = self.codec.message(kind, target, &body);
                    if let Err(e) = Pin::new(&mut *ws).start_send(Message::text(text)) {
                        return Poll::Ready(Event::Lost(format!("write: {e}")));
                    }
                    let now = self.shared.now_ns();
                    self.ensure_step_for_send(body.id);
                    if !self.no_ack {
                        self.pending.push_back((body.id, now));
                    }
                    self.lag_buf.push(now.saturating_sub(body.ts_ns) / 1000);
                    self.dirty = true;
                    n += 1;
                    if n >= BATCH {
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
                Poll::Ready(Some(Cmd::Churn)) => {
                    if self.quiesce.is_none() {
                        self.shared.slots[self.slot as usize]
                            .connected
                            .store(false, Ordering::Release);
                        self.quiesce = Some(Box::pin(tokio::time::sleep(QUIESCE)));
                    }
                }
                Poll::Ready(Some(Cmd::Close)) | Poll::Ready(None) => {
                    return Poll::Ready(Event::Close)
                }
                Poll::Pending => break,
            }
        }
        if self.dirty {
            match Pin::new(&mut *ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.dirty = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Event::Lost(format!("flush: {e}"))),
                Poll::Pending => {}
            }
        }
        // Read side: everything that is there, a batch at a time.
        let mut n = 0;
        loop {
            match Pin::new(&mut *ws).poll_next(cx) {
                Poll::Ready(Some(Ok(Message::Text(text)))) => {
                    let now = self.shared.now_ns();
                    self.on_text(text.as_str(), now);
                    if let Some(why) = self.ended.take() {
                        self.flush_local();
                        return Poll::Ready(Event::Lost(why));
                    }
                }
                Poll::Ready(Some(Ok(Message::Close(frame)))) => {
                    self.flush_local();
                    return Poll::Ready(Event::Lost(format!("closed by the server: {frame:?}")));
                }
                Poll::Ready(Some(Ok(Message::Binary(_)))) => {
                    self.unparsed("binary frame".to_owned());
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => {
                    self.flush_local();
                    return Poll::Ready(Event::Lost(format!("read: {e}")));
                }
                Poll::Ready(None) => {
                    self.flush_local();
                    return Poll::Ready(Event::Lost("connection ended".to_owned()));
                }
                Poll::Pending => break,
            }
            n += 1;
            if n >= BATCH {
                cx.waker().wake_by_ref();
                break;
            }
        }
        if !self.replies.is_empty() {
            // A ping came in: answer on the next pass of the write side.
            cx.waker().wake_by_ref();
        }
        self.flush_local();
        if let Some(sleep) = self.quiesce.as_mut() {
            if (self.pending.is_empty() && !self.dirty) || sleep.as_mut().poll(cx).is_ready() {
                self.quiesce = None;
                return Poll::Ready(Event::Churn);
            }
        }
        Poll::Pending
    }

    /// Handles one incoming text frame.
    fn on_text(&mut self, text: &str, now: u64) {
        let frame = match self.codec.decode(text) {
            Ok(Decoded::Frame(f)) => f,
            Ok(Decoded::Reply(reply)) => {
                self.replies.push_back(reply);
                return;
            }
            Ok(Decoded::Nothing) => return,
            Ok(Decoded::Ended(why)) => {
                self.ended = Some(why);
                return;
            }
            Err(e) => {
                self.unparsed(format!("unparsable frame ({e}): {}", clip(text)));
                return;
            }
        };
        match frame.ty {
            "dm" | "room" => self.on_delivery(&frame, text, now),
            "ack" => self.on_ack(frame.id, frame.status, text, now),
            "error" => {
                let code = frame.code.unwrap_or("?");
                match frame.id {
                    Some(id) if id >= JOIN_ID_BASE => {
                        self.join_error =
                            Some(format!("{}: join refused: {}", self.name, clip(text)));
                    }
                    Some(id) => {
                        self.take_pending(id);
                        self.on_error(id, code);
                    }
                    None => match self.pending.pop_front() {
                        // The server answers a connection's frames in order, so an
                        // error without id answers the oldest unanswered message.
                        Some((id, _)) => {
                            if let Some(step) = self.step_owning(id) {
                                step.c.errors_without_id.fetch_add(1, Ordering::Relaxed);
                            }
                            self.on_error(id, code);
                        }
                        None => self.unparsed(format!("error without id: {}", clip(text))),
                    },
                }
            }
            "welcome" => {
                if frame.user != Some(self.name.as_str()) {
                    self.shared.anomaly(format!(
                        "welcome for {:?} on a connection opened as {}: {}",
                        frame.user,
                        self.name,
                        clip(text)
                    ));
                }
                self.welcomed = true;
            }
            _ => self.unparsed(format!("unexpected frame: {}", clip(text))),
        }
    }

    fn on_delivery(&mut self, frame: &wire::Incoming<'_>, text: &str, now: u64) {
        let Some(body) = frame.body.and_then(wire::parse_body) else {
            self.unparsed(format!("delivery without a loader body: {}", clip(text)));
            return;
        };
        if !self.select_step(body.step) {
            self.stale();
            return;
        }
        let Some(step) = self.step.clone() else {
            return;
        };
        let Some(rec) = step.msg(body.id) else {
            self.unparsed(format!(
                "delivery with an id outside the step: {}",
                clip(text)
            ));
            return;
        };
        if self.tracker_step != step.no {
            self.trackers.clear();
            self.tracker_step = step.no;
        }
        let plan = &self.shared.plan;
        let target = rec.target.load(Ordering::Relaxed);
        let right_place = match frame.ty {
            "dm" => target == self.user,
            _ => {
                target >= plan.users
                    && self.rooms.contains(&(target - plan.users))
                    && frame
                        .room
                        .and_then(|r| wire::name_index(r, &self.shared.args.room_prefix))
                        == Some(target - plan.users)
            }
        };
        if !right_place {
            step.c.misrouted.fetch_add(1, Ordering::Relaxed);
            step.anomaly(format!(
                "misrouted: connection {} ({}) got {}",
                self.slot,
                self.name,
                clip(text)
            ));
        }
        let from_user = frame
            .from
            .and_then(|f| wire::name_index(f, &self.shared.args.user_prefix));
        if from_user != Some(plan.user_of(body.sender)) {
            step.c.wrong_from.fetch_add(1, Ordering::Relaxed);
        }
        let key = (u64::from(body.sender) << 32) | u64::from(target);
        match self.trackers.entry(key).or_default().see(body.seq) {
            None => {
                step.c.duplicated.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(true) => {
                step.c.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            Some(false) => {}
        }
        rec.delivered.fetch_add(1, Ordering::Relaxed);
        step.c.delivered.fetch_add(1, Ordering::Relaxed);
        self.lat_buf.push(now.saturating_sub(body.ts_ns) / 1000);
    }

    /// An error frame answering message `id`.
    fn on_error(&mut self, id: u64, code: &str) {
        let Some(step) = self.step_owning(id) else {
            self.stale();
            return;
        };
        if let Some(rec) = step.msg(id) {
            if rec.status.swap(ST_ERROR, Ordering::Relaxed) != ST_NONE {
                return;
            }
            if self.no_ack {
                // Counted as expected at send time: no longer waited for.
                step.c.expected_live.fetch_sub(
                    u64::from(rec.exp.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
            }
        }
        step.c.acks_error.fetch_add(1, Ordering::Relaxed);
        *lock(&step.errors).entry(code.to_owned()).or_insert(0) += 1;
    }

    fn on_ack(&mut self, id: Option<u64>, status: Option<&str>, text: &str, now: u64) {
        let Some(id) = id else {
            self.unparsed(format!("ack without id: {}", clip(text)));
            return;
        };
        if id >= JOIN_ID_BASE {
            if status == Some("ok") {
                self.joins_ok += 1;
            } else {
                self.join_error = Some(format!("{}: join not ok: {}", self.name, clip(text)));
            }
            return;
        }
        if self.no_ack {
            // Not asked for (a server without `"ack": false` support still
            // sends them): ignored, not counted.
            return;
        }
        let sent_at = self.take_pending(id);
        let Some(step) = self.step_owning(id) else {
            self.stale();
            return;
        };
        let Some(rec) = step.msg(id) else {
            return;
        };
        let (st, counter) = match status {
            Some("routed") => (ST_ROUTED, &step.c.acks_routed),
            Some("offline") => (ST_OFFLINE, &step.c.acks_offline),
            Some("ok") => (ST_OK, &step.c.acks_ok),
            _ => {
                step.anomaly(format!("ack with an unknown status: {}", clip(text)));
                (ST_ERROR, &step.c.acks_error)
            }
        };
        let prev = rec.status.swap(st, Ordering::Relaxed);
        if prev != ST_NONE {
            step.anomaly(format!("second ack for message {id}: {}", clip(text)));
            return;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        rec.ack_us.store(
            (now / 1000).min(u64::from(u32::MAX)) as u32,
            Ordering::Relaxed,
        );
        if st == ST_ROUTED || st == ST_OK {
            step.c.expected_live.fetch_add(
                u64::from(rec.exp.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
        if let Some(sent_at) = sent_at {
            self.ack_buf.push(now.saturating_sub(sent_at) / 1000);
        }
    }

    /// Removes `id` from the unacked queue, returning its send time. Acks
    /// come in send order; ids skipped over were never answered.
    fn take_pending(&mut self, id: u64) -> Option<u64> {
        while let Some(&(front, at)) = self.pending.front() {
            if front == id {
                self.pending.pop_front();
                return Some(at);
            }
            if front > id {
                return None;
            }
            self.pending.pop_front();
            self.shared.anomaly(format!(
                "message {front}: no ack, but a later one was acked"
            ));
        }
        None
    }

    /// Makes `self.step` the step numbered `no` if it is the current one.
    fn select_step(&mut self, no: u32) -> bool {
        if self.step.as_ref().is_some_and(|s| s.no == no) {
            return true;
        }
        self.flush_local();
        match self.shared.current_step() {
            Some(s) if s.no == no => {
                self.step = Some(s);
                true
            }
            _ => false,
        }
    }

    /// The step message `id` belongs to, if it is the current one.
    fn step_owning(&mut self, id: u64) -> Option<Arc<StepState>> {
        if let Some(s) = &self.step {
            if s.owns(id) {
                return Some(s.clone());
            }
        }
        let current = self.shared.current_step()?;
        if current.owns(id) {
            self.flush_local();
            self.step = Some(current.clone());
            Some(current)
        } else {
            None
        }
    }

    /// A delivery or ack of an earlier step: counted in the current one.
    fn stale(&self) {
        if let Some(s) = self.shared.current_step() {
            s.c.stale.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn unparsed(&self, what: String) {
        if let Some(s) = self.shared.current_step() {
            s.c.unparsed.fetch_add(1, Ordering::Relaxed);
        }
        self.shared
            .anomaly(format!("connection {}: {what}", self.slot));
    }

    /// Moves the local latency buffers into the step's histograms.
    fn flush_local(&mut self) {
        if self.lat_buf.is_empty() && self.ack_buf.is_empty() && self.lag_buf.is_empty() {
            return;
        }
        if let Some(step) = &self.step {
            let mut h = lock(&step.hists);
            for &v in &self.lat_buf {
                h.latency.saturating_record(v.max(1));
            }
            for &v in &self.ack_buf {
                h.ack.saturating_record(v.max(1));
            }
            for &v in &self.lag_buf {
                h.lag.saturating_record(v.max(1));
            }
        }
        self.lat_buf.clear();
        self.ack_buf.clear();
        self.lag_buf.clear();
    }

    /// Makes sure the lag sample about to be buffered lands in the step of
    /// message `id` (the scheduler publishes a step before sending into it).
    fn ensure_step_for_send(&mut self, id: u64) {
        if !self.step.as_ref().is_some_and(|s| s.owns(id)) {
            let _ = self.step_owning(id);
        }
    }

    /// Churn, first half: the connection is quiet (or the quiesce timed out);
    /// close it while still reading what arrives, then give up on unanswered
    /// messages. Returns false if the loader is closing.
    async fn churn(&mut self, ws: &mut Ws) -> bool {
        let shared = self.shared.clone();
        let down = shared.now_ns().max(1);
        shared.slots[self.slot as usize]
            .down_since
            .store(down, Ordering::Release);
        shared.reconnecting.fetch_add(1, Ordering::AcqRel);
        self.close(ws).await;
        let step = shared.current_step();
        for (id, _) in self.pending.drain(..) {
            if let Some(step) = &step {
                if let Some(rec) = step.msg(id) {
                    if rec
                        .status
                        .compare_exchange(
                            ST_NONE,
                            ST_ABANDONED,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                    {
                        step.c.abandoned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if let Some(step) = &step {
            step.c.churn_events.fetch_add(1, Ordering::Relaxed);
        }
        !shared.closing.load(Ordering::Relaxed)
    }

    /// Churn, second half: reconnect (bounded by --connect-timeout).
    async fn reopen(&mut self) -> Option<Ws> {
        let shared = self.shared.clone();
        let slot = &shared.slots[self.slot as usize];
        let down = slot.down_since.load(Ordering::Acquire);
        let limit = Duration::from_secs_f64(shared.args.connect_timeout);
        let result = tokio::time::timeout(limit, self.open())
            .await
            .unwrap_or_else(|_| Err("reconnect timeout".to_owned()));
        shared.reconnecting.fetch_sub(1, Ordering::AcqRel);
        let up = shared.now_ns();
        let step = shared.current_step();
        match result {
            Ok((ws, us)) => {
                if let Some(step) = &step {
                    step.c.reconnects.fetch_add(1, Ordering::Relaxed);
                    lock(&step.hists).connect.saturating_record(us.max(1));
                    lock(&step.churn_windows).push((self.user, down, up));
                }
                slot.down_since.store(0, Ordering::Release);
                slot.connected.store(true, Ordering::Release);
                Some(ws)
            }
            Err(e) => {
                if let Some(step) = &step {
                    step.c.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                    lock(&step.churn_windows).push((self.user, down, u64::MAX));
                }
                shared.anomaly(format!("reconnect of {} failed: {e}", self.name));
                None
            }
        }
    }

    /// Close handshake, reading (and counting) whatever still arrives.
    async fn close(&mut self, ws: &mut Ws) {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if ws.close(None).await.is_err() {
                return;
            }
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(text) = msg {
                    let now = self.shared.now_ns();
                    self.on_text(text.as_str(), now);
                }
            }
        })
        .await;
        self.flush_local();
    }
}

/// An HS256 token for `user`, valid `ttl` seconds, that may join every
/// room and DM anyone (`rooms: ["*"]`, `dm: true`: a load test measures
/// routing, not the server's room authorization or DM policy).
pub fn mint_token(user: &str, secret: &str, ttl: u64) -> Result<String, String> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
        iat: u64,
        rooms: [&'a str; 1],
        dm: bool,
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub: user,
            exp: now + ttl,
            iat: now,
            rooms: ["*"],
            dm: true,
        },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("minting a token: {e}"))
}

/// At most 300 characters of a frame, for reports.
fn clip(text: &str) -> &str {
    match text.char_indices().nth(300) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_dups_and_reordering() {
        let mut t = Tracker::default();
        assert_eq!(t.see(0), Some(false));
        assert_eq!(t.see(2), Some(false));
        assert_eq!(t.see(1), Some(true));
        assert_eq!(t.see(2), None);
        assert_eq!(t.see(200), Some(false));
        assert_eq!(t.see(3), Some(true));
        assert_eq!(t.see(200), None);
    }
}
