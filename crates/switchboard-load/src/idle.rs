//! One idle connection of the `connections` workload, from its first
//! handshake to its end: bind the socket to the slot's source address, TCP
//! connect, WebSocket upgrade (with a freshly minted token under JWT auth),
//! wait for the welcome; then hold it, reading and discarding whatever
//! arrives (tungstenite answers pings while reading), until the loader stops
//! (close handshake) or the connection is lost; a lost connection reconnects
//! to the next reconnect target, with retries, until its bound.
//!
//! Every outcome lands in the shared [`Tally`]; the document is built from it
//! by `connections`. A slot keeps no state beyond its socket, so 19,000 of
//! them cost little more than their sockets and read buffers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::cli::AuthMode;
use crate::conn::mint_token;
use crate::state::{lock, new_hist};

type Ws = WebSocketStream<TcpStream>;

/// How long a close handshake (ours, or answering the server's) may take.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// The first retry of a failed reconnect waits this long; each next one twice
/// as long, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Failures kept in full.
const FIRST_ERRORS: usize = 5;

/// A resolved target.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// As given, for the report.
    pub display: String,
    /// `ws://host:port/path`, the upgrade request's URL.
    pub url: String,
    /// Where the socket connects.
    pub addr: SocketAddr,
}

/// What every slot shares: settings, the handshake bound, the tally.
pub struct Hold {
    /// Initial targets: slot `i` connects to `targets[i mod n]`.
    pub targets: Vec<Endpoint>,
    /// Reconnect targets: slot `i`, attempt `k` goes to `[(i + k) mod n]`.
    pub reconnect_targets: Vec<Endpoint>,
    /// Slot `i` binds to `source_addrs[i mod n]` (none: the kernel chooses).
    pub source_addrs: Vec<IpAddr>,
    /// How the upgrade authenticates.
    pub auth: AuthMode,
    /// HS256 secret under JWT auth.
    pub jwt_secret: String,
    /// Token lifetime, s.
    pub jwt_ttl: u64,
    /// User names: prefix and user number.
    pub user_prefix: String,
    /// Slot `i` is user `i / conns_per_user`.
    pub conns_per_user: u32,
    /// Handshakes in flight at most (a permit is held from TCP connect to welcome).
    pub handshakes: Semaphore,
    /// Every initial attempt ends by then.
    pub connect_deadline: Instant,
    /// A reconnect within this of the loss counts as in time.
    pub reconnect_within: Duration,
    /// A reconnecting slot gives up this long after its loss.
    pub reconnect_timeout: Duration,
    /// The counts.
    pub tally: Tally,
}

/// Counters every slot writes; times are Unix µs (0: none yet).
#[derive(Default)]
pub struct Tally {
    /// Initial attempts finished (either way).
    pub initial_done: AtomicU64,
    /// Initial attempts that connected.
    pub connected: AtomicU64,
    /// Initial attempts that failed.
    pub failed: AtomicU64,
    /// Open right now.
    pub open: AtomicU64,
    /// Most open at once.
    pub peak_open: AtomicU64,
    /// Lost before the loader began closing.
    pub lost: AtomicU64,
    /// Closed by the loader.
    pub closed_by_loader: AtomicU64,
    /// Our close handshakes the server did not answer in time.
    pub close_unanswered: AtomicU64,
    /// Reconnects started / still running / done / done in time / given up.
    pub reconnect_started: AtomicU64,
    pub reconnecting: AtomicU64,
    pub reconnected: AtomicU64,
    pub reconnected_within: AtomicU64,
    pub reconnect_failed: AtomicU64,
    /// Reconnect attempts.
    pub attempts: AtomicU64,
    /// Unix µs of the first initial handshake start (u64::MAX: none).
    pub first_start_us: AtomicU64,
    /// Unix µs of the last initial attempt's end.
    pub last_initial_us: AtomicU64,
    /// Unix µs of the first and last loss (first: u64::MAX while none).
    pub first_loss_us: AtomicU64,
    pub last_loss_us: AtomicU64,
    /// Unix µs of the last reconnect.
    pub last_reconnect_us: AtomicU64,
    /// Unix µs of the last connection closed after the stop.
    pub last_close_us: AtomicU64,
    /// Initial handshakes, µs.
    pub handshake: Mutex<Option<Histogram<u64>>>,
    /// Loss to welcome of reconnects, µs.
    pub reconnect: Mutex<Option<Histogram<u64>>>,
    /// Kinds of initial failures, of losses, of failed reconnect attempts.
    pub connect_errors: Mutex<BTreeMap<String, u64>>,
    pub lost_by_cause: Mutex<BTreeMap<String, u64>>,
    pub attempt_errors: Mutex<BTreeMap<String, u64>>,
    /// Reconnects by target.
    pub by_target: Mutex<BTreeMap<String, u64>>,
    /// The first few failures in full.
    pub first_errors: Mutex<Vec<String>>,
}

impl Tally {
    /// A tally with the "none yet" markers of the min-timestamps set.
    pub fn new() -> Tally {
        let tally = Tally::default();
        tally.first_start_us.store(u64::MAX, Ordering::Relaxed);
        tally.first_loss_us.store(u64::MAX, Ordering::Relaxed);
        *lock(&tally.handshake) = Some(new_hist());
        *lock(&tally.reconnect) = Some(new_hist());
        tally
    }

    fn opened(&self) {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak_open.fetch_max(open, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Unix time now, µs.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn count(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    *lock(map).entry(key.to_owned()).or_insert(0) += 1;
}

fn record(hist: &Mutex<Option<Histogram<u64>>>, d: Duration) {
    if let Some(h) = lock(hist).as_mut() {
        h.saturating_record((d.as_micros() as u64).max(1));
    }
}

/// Why a handshake failed: a short kind to count, and the full text.
#[derive(Debug)]
pub struct OpenError {
    /// `socket: …`, `bind: …`, `connect: …`, `http 503`, `upgrade: …`,
    /// `closed before welcome`, `timeout`.
    pub kind: String,
    /// The whole story, for the first few.
    pub detail: String,
}

impl OpenError {
    fn io(stage: &str, e: &std::io::Error) -> OpenError {
        OpenError {
            kind: format!("{stage}: {:?}", e.kind()),
            detail: format!("{stage}: {e}"),
        }
    }

    fn timeout() -> OpenError {
        OpenError {
            kind: "timeout".into(),
            detail: "timeout".into(),
        }
    }

    fn ws(stage: &str, e: WsError) -> OpenError {
        let kind = match &e {
            WsError::Http(response) => format!("http {}", response.status().as_u16()),
            WsError::Io(io) => format!("{stage}: {:?}", io.kind()),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
            | WsError::ConnectionClosed
            | WsError::AlreadyClosed => format!("{stage}: eof"),
            _ => format!("{stage}: error"),
        };
        OpenError {
            kind,
            detail: format!("{stage}: {e}"),
        }
    }
}

/// How a held connection ended.
enum Ended {
    /// The loader is stopping.
    Stop,
    /// Lost, with its cause (`close 1001`, `eof`, `reset`, `error`).
    Lost(String),
}

/// Runs slot `slot` until the loader stops or it is lost for good.
pub async fn run_slot(hold: Arc<Hold>, slot: u32, mut stop: watch::Receiver<bool>) {
    let tally = &hold.tally;
    let target = &hold.targets[slot as usize % hold.targets.len()];
    let opened = tokio::select! {
        _ = stop.wait_for(|s| *s) => Err(OpenError { kind: "stopped".into(), detail: "stopped while connecting".into() }),
        r = tokio::time::timeout_at(hold.connect_deadline, hold.open(slot, target, true)) => {
            r.unwrap_or_else(|_| Err(OpenError::timeout()))
        }
    };
    let mut ws = match opened {
        Ok((ws, took)) => {
            record(&tally.handshake, took);
            tally.connected.fetch_add(1, Ordering::Relaxed);
            tally.opened();
            ws
        }
        Err(e) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            count(&tally.connect_errors, &e.kind);
            hold.first_error(e.detail);
            tally
                .last_initial_us
                .fetch_max(unix_us(), Ordering::Relaxed);
            tally.initial_done.fetch_add(1, Ordering::Release);
            return;
        }
    };
    tally
        .last_initial_us
        .fetch_max(unix_us(), Ordering::Relaxed);
    tally.initial_done.fetch_add(1, Ordering::Release);

    loop {
        match held(&mut ws, &mut stop).await {
            Ended::Stop => {
                if !close(&mut ws).await {
                    tally.close_unanswered.fetch_add(1, Ordering::Relaxed);
                }
                tally.closed_by_loader.fetch_add(1, Ordering::Relaxed);
                tally.last_close_us.fetch_max(unix_us(), Ordering::Relaxed);
                tally.closed();
                return;
            }
            Ended::Lost(cause) => {
                let lost_at = Instant::now();
                if *stop.borrow() {
                    // The server closed it while we were closing: not a loss.
                    tally.last_close_us.fetch_max(unix_us(), Ordering::Relaxed);
                    tally.closed();
                    return;
                }
                let now_us = unix_us();
                tally.lost.fetch_add(1, Ordering::Relaxed);
                tally.first_loss_us.fetch_min(now_us, Ordering::Relaxed);
                tally.last_loss_us.fetch_max(now_us, Ordering::Relaxed);
                count(&tally.lost_by_cause, &cause);
                if hold.reconnect_targets.is_empty() {
                    tally.closed();
                    return;
                }
                // Counted as reconnecting before it stops counting as open,
                // so "nothing open and nothing reconnecting" never reads true
                // in between.
                tally.reconnect_started.fetch_add(1, Ordering::Relaxed);
                tally.reconnecting.fetch_add(1, Ordering::AcqRel);
                tally.closed();
                // Answer the server's close (if it sent one) before moving on.
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                let reopened = hold.reconnect(slot, lost_at, &mut stop).await;
                match reopened {
                    Some(new_ws) => {
                        let took = lost_at.elapsed();
                        record(&tally.reconnect, took);
                        tally.reconnected.fetch_add(1, Ordering::Relaxed);
                        if took <= hold.reconnect_within {
                            tally.reconnected_within.fetch_add(1, Ordering::Relaxed);
                        }
                        tally
                            .last_reconnect_us
                            .fetch_max(unix_us(), Ordering::Relaxed);
                        tally.opened();
                        tally.reconnecting.fetch_sub(1, Ordering::AcqRel);
                        ws = new_ws;
                    }
                    None => {
                        tally.reconnect_failed.fetch_add(1, Ordering::Relaxed);
                        tally.reconnecting.fetch_sub(1, Ordering::AcqRel);
                        return;
                    }
                }
            }
        }
    }
}

/// Holds an open connection: reads and discards until the stop or the end.
async fn held(ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> Ended {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ended::Stop,
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Ended::Lost(format!("close {}", u16::from(frame.code)));
                }
                Some(Ok(Message::Close(None))) => return Ended::Lost("close (no code)".into()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ended::Lost(loss_cause(&e).into()),
                None => return Ended::Lost("eof".into()),
            },
        }
    }
}

fn loss_cause(e: &WsError) -> &'static str {
    match e {
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | WsError::ConnectionClosed
        | WsError::AlreadyClosed => "eof",
        WsError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset => "reset",
        WsError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        _ => "error",
    }
}

/// Our close handshake: send 1000, read until the server's answer and the
/// end of the socket. Returns whether the server answered in time.
async fn close(ws: &mut Ws) -> bool {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    tokio::time::timeout(CLOSE_GRACE, async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
    .is_ok()
}

impl Hold {
    fn first_error(&self, detail: String) {
        let mut first = lock(&self.tally.first_errors);
        if first.len() < FIRST_ERRORS {
            first.push(detail);
        }
    }

    /// The upgrade URL of `slot` at `endpoint`: `?user=` or `?token=`.
    fn url(&self, slot: u32, endpoint: &Endpoint) -> Result<String, OpenError> {
        let user = format!("{}{}", self.user_prefix, slot / self.conns_per_user);
        match self.auth {
            AuthMode::None => Ok(format!("{}?user={user}", endpoint.url)),
            AuthMode::Jwt => mint_token(&user, &self.jwt_secret, self.jwt_ttl)
                .map(|token| format!("{}?token={token}", endpoint.url))
                .map_err(|e| OpenError {
                    kind: "token".into(),
                    detail: e,
                }),
        }
    }

    /// One handshake of `slot` to `endpoint`: waits for a handshake slot,
    /// then TCP connect (from the slot's source address), upgrade, welcome.
    /// Returns the socket and how long the handshake took once it had its
    /// slot. `initial` marks the connect phase (its start time is recorded).
    async fn open(
        &self,
        slot: u32,
        endpoint: &Endpoint,
        initial: bool,
    ) -> Result<(Ws, Duration), OpenError> {
        let url = self.url(slot, endpoint)?;
        let _permit = self.handshakes.acquire().await.map_err(|_| OpenError {
            kind: "stopped".into(),
            detail: "the handshake bound was closed".into(),
        })?;
        let started = Instant::now();
        if initial {
            self.tally
                .first_start_us
                .fetch_min(unix_us(), Ordering::Relaxed);
        }
        let socket = match endpoint.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| OpenError::io("socket", &e))?;
        if !self.source_addrs.is_empty() {
            let source = self.source_addrs[slot as usize % self.source_addrs.len()];
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| OpenError::io("bind", &e))?;
        }
        let stream = socket
            .connect(endpoint.addr)
            .await
            .map_err(|e| OpenError::io("connect", &e))?;
        let _ = stream.set_nodelay(true);
        // Small buffers: an idle connection only ever reads the welcome, pings
        // and a close (the read buffer grows for a larger frame); writes go
        // out at once.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut ws, _response) =
            tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(config))
                .await
                .map_err(|e| OpenError::ws("upgrade", e))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    if crate::wire::parse_incoming(text.as_str()).is_ok_and(|f| f.ty == "welcome") {
                        return Ok((ws, started.elapsed()));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(0, |f| u16::from(f.code));
                    return Err(OpenError {
                        kind: format!("closed before welcome ({code})"),
                        detail: format!("closed before welcome with {code}"),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(OpenError::ws("welcome", e)),
                None => return Err(OpenError::ws("welcome", WsError::ConnectionClosed)),
            }
        }
    }

    /// Reconnects a lost slot: attempt `k` goes to the `(slot + k)`-th
    /// reconnect target, with a growing pause after a failure, until the
    /// reconnect timeout (from the loss) or the stop.
    async fn reconnect(
        &self,
        slot: u32,
        lost_at: Instant,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Ws> {
        let deadline = lost_at + self.reconnect_timeout;
        let n = self.reconnect_targets.len();
        let mut pause = RETRY_FIRST;
        for attempt in 0usize.. {
            let target = &self.reconnect_targets[(slot as usize + attempt) % n];
            self.tally.attempts.fetch_add(1, Ordering::Relaxed);
            let outcome = tokio::select! {
                _ = stop.wait_for(|s| *s) => return None,
                r = tokio::time::timeout_at(deadline, self.open(slot, target, false)) => r,
            };
            match outcome {
                Ok(Ok((ws, _))) => {
                    count(&self.tally.by_target, &target.display);
                    return Some(ws);
                }
                Ok(Err(e)) => {
                    count(&self.tally.attempt_errors, &e.kind);
                    self.first_error(format!("reconnect: {}", e.detail));
                }
                Err(_) => {
                    count(&self.tally.attempt_errors, "timeout");
                    return None;
                }
            }
            // Spread the retries of slots that failed together.
            let jitter = Duration::from_millis(u64::from(slot % 50));
            let wake = (Instant::now() + pause + jitter).min(deadline);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return None,
                _ = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= deadline {
                count(&self.tally.attempt_errors, "timeout");
                return None;
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
        None
    }
}
