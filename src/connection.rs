//! One WebSocket session: the read loop, the writer draining the bounded
//! outbound queue, and the close handshake.
//!
//! The reader handles one frame at a time (so a connection's messages keep
//! their order) and answers through the same bounded queue the router
//! delivers into. The writer never blocks the rest of the instance: a client
//! that stops reading fills its queue and is closed as a slow consumer.
//! This module turns frames into router calls; it does not decide routing.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warp::ws::{Message, WebSocket};

use crate::metrics::Metrics;
use crate::protocol::{
    self, DirectStatus, ErrorCode, ProtocolError, Request, RequestId, ServerFrame,
};
use crate::registry::{CloseReason, ConnHandle};
use crate::router::{RouteError, Router};

/// How long the writer may spend flushing queued frames and the close frame
/// when the server closes a connection.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Most frames written per flush (bounds the time one flush can take).
const WRITE_BATCH: usize = 64;

/// Per-connection limits, from the configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Capacity of the outbound queue (slow consumers are closed beyond it).
    pub outbound_queue: usize,
    /// Largest `body`, as JSON text.
    pub max_body_bytes: usize,
    /// Frames per second (token bucket rate); 0 disables the limit.
    pub rate_limit: f64,
    /// Token bucket size.
    pub rate_burst: f64,
    /// Most rooms one connection may join.
    pub max_rooms: usize,
    /// Interval of server pings.
    pub ping_interval: Duration,
    /// Silence after which a connection is closed.
    pub idle_timeout: Duration,
}

/// What a session needs from its instance.
#[derive(Debug, Clone)]
pub struct SessionContext {
    /// Routes the session's requests.
    pub router: Arc<Router>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Limits of every connection.
    pub limits: SessionLimits,
    /// Cancelled when the instance shuts down.
    pub shutdown: CancellationToken,
}

/// A token bucket: `rate` frames a second on average, `burst` at once.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs one session until the client leaves or the server closes it.
///
/// A panic anywhere in the session's handling is caught here: the connection
/// is closed and its presence and rooms are cleaned up as on any other exit,
/// and the rest of the instance never notices.
pub async fn serve(ws: WebSocket, user: Arc<str>, ctx: SessionContext) {
    let id = ctx.router.registry().next_conn_id(ctx.router.instance());
    let span =
        tracing::info_span!("conn", user = %user, conn = %id, instance = %ctx.router.instance());
    async move {
        let router = &ctx.router;
        let (handle, outbound) = ConnHandle::new(id, user, ctx.limits.outbound_queue);
        // Queued before the connection is registered: nothing routed to it
        // can overtake the welcome frame.
        let welcome = ServerFrame::Welcome {
            user: &handle.user,
            instance: router.instance(),
            conn: &handle.id,
        };
        handle.send(Message::text(welcome.to_text()), &ctx.metrics);
        router.connect(&handle).await;
        tracing::debug!("connected");

        let (sink, stream) = ws.split();
        let writer = tokio::spawn(write_loop(sink, outbound, handle.clone()));
        let session = AssertUnwindSafe(read_loop(stream, &handle, &ctx)).catch_unwind();
        if session.await.is_err() {
            ctx.metrics.session_panics.inc();
            handle.close(CloseReason::Internal);
            tracing::error!("connection task panicked; closing this connection only");
        }

        router.disconnect(&handle).await;
        match handle.close_reason() {
            Some(CloseReason::SlowConsumer) => {
                ctx.metrics.closed_slow_consumer.inc();
            }
            Some(CloseReason::Flooding) => {
                ctx.metrics.closed_flooding.inc();
            }
            Some(CloseReason::Idle) => {
                ctx.metrics.closed_idle.inc();
            }
            _ => {}
        }
        // Ends the writer: with a reason it sends a close frame first.
        handle.closer().cancel();
        let _ = writer.await;
        tracing::debug!(reason = ?handle.close_reason(), "disconnected");
    }
    .instrument(span)
    .await
}

async fn read_loop(
    mut stream: futures_util::stream::SplitStream<WebSocket>,
    handle: &Arc<ConnHandle>,
    ctx: &SessionContext,
) {
    let limits = &ctx.limits;
    let mut bucket = TokenBucket::new(limits.rate_limit, limits.rate_burst, Instant::now());
    // Refusals in a row: a client that ignores `rate_limited` is flooding.
    let mut refused_in_a_row = 0.0;
    let mut pings = tokio::time::interval(limits.ping_interval);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pings.reset(); // the first tick would fire at once
    let mut last_heard = Instant::now();
    loop {
        let idle_deadline = last_heard + limits.idle_timeout;
        let next = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => return,
            _ = ctx.shutdown.cancelled() => {
                handle.close(CloseReason::GoingAway);
                return;
            }
            _ = tokio::time::sleep_until(idle_deadline.into()) => {
                handle.close(CloseReason::Idle);
                return;
            }
            _ = pings.tick() => {
                handle.send(Message::ping(Vec::new()), &ctx.metrics);
                continue;
            }
            next = stream.next() => next,
        };
        let message = match next {
            None => return,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                if is_too_large(&e) {
                    handle.close(CloseReason::TooLarge);
                } else {
                    tracing::debug!(error = %e, "read error");
                }
                return;
            }
        };
        let now = Instant::now();
        last_heard = now;
        if message.is_close() {
            return;
        }
        if message.is_ping() || message.is_pong() {
            continue; // pings are answered by the WebSocket layer
        }
        if !bucket.take(now) {
            ctx.metrics.rate_limited.inc();
            refused_in_a_row += 1.0;
            if refused_in_a_row > limits.rate_burst {
                handle.close(CloseReason::Flooding);
                return;
            }
            let error =
                ProtocolError::new(ErrorCode::RateLimited, "slow down: rate limit exceeded");
            // The refused frame is not processed, but its id is echoed when readable.
            let id = message
                .to_str()
                .ok()
                .and_then(|text| protocol::parse(text).id);
            handle.send(
                Message::text(error_frame(id.as_ref(), &error)),
                &ctx.metrics,
            );
            continue;
        }
        refused_in_a_row = 0.0;
        let reply = if let Ok(text) = message.to_str() {
            handle_text(text, handle, ctx).await
        } else {
            let error = ProtocolError::new(
                ErrorCode::BadRequest,
                "binary frames are not supported; send JSON text",
            );
            Some(error_frame(None, &error))
        };
        if let Some(reply) = reply {
            handle.send(Message::text(reply), &ctx.metrics);
        }
    }
}

fn is_too_large(error: &warp::Error) -> bool {
    let source = std::error::Error::source(error);
    matches!(
        source.and_then(|s| s.downcast_ref::<tungstenite::Error>()),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Handles one text frame; returns the reply to send, if any (a `dm` or
/// `room` sent with `"ack": false` gets none when it succeeds).
async fn handle_text(text: &str, handle: &Arc<ConnHandle>, ctx: &SessionContext) -> Option<String> {
    let incoming = protocol::parse(text);
    let id = incoming.id.as_ref();
    let request = match incoming.request {
        Ok(request) => request,
        Err(error) => return Some(error_frame(id, &error)),
    };
    let wants_ack =
        incoming.ack || !matches!(request, Request::Direct { .. } | Request::Room { .. });
    let reply = handle_request(request, id, handle, ctx).await;
    match reply {
        Reply::Ok(_) if !wants_ack => None,
        Reply::Ok(text) | Reply::Failed(text) => Some(text),
    }
}

/// A reply frame, and whether it reports success.
enum Reply {
    Ok(String),
    Failed(String),
}

async fn handle_request(
    request: Request<'_>,
    id: Option<&RequestId>,
    handle: &Arc<ConnHandle>,
    ctx: &SessionContext,
) -> Reply {
    if let Request::Direct { body, .. } | Request::Room { body, .. } = &request {
        if body.get().len() > ctx.limits.max_body_bytes {
            let message = format!("`body` is larger than {} bytes", ctx.limits.max_body_bytes);
            return Reply::Failed(error_frame(
                id,
                &ProtocolError::new(ErrorCode::TooLarge, message),
            ));
        }
    }
    let router = &ctx.router;
    let ack = |status: &str, msg_id: Option<&str>| {
        Reply::Ok(ServerFrame::Ack { id, status, msg_id }.to_text())
    };
    match request {
        Request::Direct { to, body } => match router.send_direct(&handle.user, &to, body).await {
            Ok((status, msg_id)) => {
                let status = match status {
                    DirectStatus::Routed => "routed",
                    DirectStatus::Offline => "offline",
                };
                ack(status, Some(&msg_id))
            }
            Err(e) => Reply::Failed(route_error(id, e)),
        },
        Request::Room { room, body } => match router.send_room_as_member(handle, &room, body).await
        {
            Ok(msg_id) => ack("ok", Some(&msg_id)),
            Err(e) => Reply::Failed(route_error(id, e)),
        },
        Request::Join { room }
            if handle.room_count() >= ctx.limits.max_rooms && !handle.is_member(&room) =>
        {
            let message = format!("at most {} rooms per connection", ctx.limits.max_rooms);
            Reply::Failed(error_frame(
                id,
                &ProtocolError::new(ErrorCode::LimitExceeded, message),
            ))
        }
        Request::Join { room } => match router.join(handle, &room).await {
            Ok(()) => ack("ok", None),
            Err(e) => Reply::Failed(route_error(id, e)),
        },
        Request::Leave { room } => {
            router.leave(handle, &room).await;
            ack("ok", None)
        }
        Request::Presence { users } => match router.online(&users).await {
            Ok(online) => Reply::Ok(
                ServerFrame::Presence {
                    id,
                    online: users.iter().map(String::as_str).zip(online).collect(),
                }
                .to_text(),
            ),
            Err(e) => Reply::Failed(route_error(id, e)),
        },
        Request::Ping => Reply::Ok(ServerFrame::Pong { id }.to_text()),
    }
}

fn route_error(id: Option<&RequestId>, error: RouteError) -> String {
    let code = match error {
        RouteError::Unavailable => ErrorCode::Unavailable,
        RouteError::NotMember => ErrorCode::NotMember,
    };
    error_frame(id, &ProtocolError::new(code, error.to_string()))
}

fn error_frame(id: Option<&RequestId>, error: &ProtocolError) -> String {
    ServerFrame::Error {
        id,
        code: error.code,
        message: &error.message,
    }
    .to_text()
}

/// Drains the outbound queue into the socket until the connection closes.
/// Every await here also watches the closer, so a client that stopped reading
/// cannot hold the writer in a blocked send.
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<Message>,
    handle: Arc<ConnHandle>,
) {
    loop {
        let message = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => break,
            message = outbound.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        // Everything already queued goes out with this frame in one flush:
        // under load, one write syscall carries many frames.
        let write_batch = async {
            sink.feed(message).await?;
            for _ in 1..WRITE_BATCH {
                match outbound.try_recv() {
                    Ok(next) => sink.feed(next).await?,
                    Err(_) => break,
                }
            }
            sink.flush().await
        };
        let sent = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => break,
            sent = write_batch => sent,
        };
        if sent.is_err() {
            return;
        }
    }
    let Some(reason) = handle.close_reason() else {
        // The client left first; nothing more to say.
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
        return;
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if reason != CloseReason::SlowConsumer {
            // Deliver what was already accepted for this client (replies to
            // requests the server did handle, messages routed to it) before
            // the close frame. A slow consumer would not read them anyway.
            while let Ok(message) = outbound.try_recv() {
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
        }
        let (code, text) = reason.code_and_reason();
        let _ = sink.send(Message::close_with(code, text)).await;
        let _ = sink.close().await;
    })
    .await;
}
