//! One WebSocket session: the read loop, the writer draining the bounded
//! outbound queue, and the closing handshake.
//!
//! The reader handles one frame at a time (so a connection's messages keep
//! their order) and answers through the same bounded queue the router
//! delivers into. The writer never blocks the rest of the instance: a client
//! that stops reading fills its queue and is closed as a slow consumer.
//! This module turns frames into router calls; it does not decide routing.
//!
//! A close the server decides (1001, 1008, 1009, 1011) follows RFC 6455 §7:
//! frames already accepted for the client are flushed, then the Close frame;
//! nothing more is read into the router; the TCP write side is shut down and
//! the client's remaining input is read and discarded until it closes too (or
//! a grace period ends). Closing a socket with unread input makes the kernel
//! send a reset, and the client would lose the Close frame and every reply
//! before it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use switchboard_core::metrics::Metrics;
use switchboard_core::protocol::{
    self, ErrorCode, ProtocolError, Request, RequestId, ServerFrame, TextFrame,
};
use switchboard_core::queue::BoundedReceiver;
use switchboard_core::registry::{CloseReason, ConnHandle, Outbound, QueueLimits, ReplayEnd};
use switchboard_core::router::{ReplayStart, RouteError, Router, WatchError};
use switchboard_core::store::Seq;

use crate::admission::Admission;
use crate::auth::{AuthError, Authenticator, Identity};

/// An upgraded WebSocket connection.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// How long the writer may spend flushing queued frames and the close frame
/// when the server closes a connection; the client then has as long again
/// to finish sending and close its side.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Most frames written per flush (bounds the time one flush can take).
const WRITE_BATCH: usize = 64;

/// Per-connection limits, from the configuration.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// The outbound queue's budgets (slow consumers are closed beyond them).
    pub outbound: QueueLimits,
    /// Largest `body`, as JSON text.
    pub max_body_bytes: usize,
    /// Frames per second (token bucket rate); 0 disables the limit.
    pub rate_limit: f64,
    /// Token bucket size.
    pub rate_burst: f64,
    /// Most rooms one connection may join.
    pub max_rooms: usize,
    /// Most users one connection may watch.
    pub max_watches: usize,
    /// Interval of server pings.
    pub ping_interval: Duration,
    /// Silence after which a connection is closed.
    pub idle_timeout: Duration,
}

/// What sessions enforce about tokens, from the configuration.
#[derive(Debug)]
pub struct AuthPolicy {
    /// Verifies `refresh` tokens and room tokens.
    pub authenticator: Arc<Authenticator>,
    /// `--room-auth token`: a join needs the connection token's `rooms`
    /// claim or a room token.
    pub rooms_need_grant: bool,
    /// `--dm-policy token`: a DM needs the sender's `dm`/`dm_to` claim.
    pub dms_need_grant: bool,
    /// How long before a token's `exp` the client is told
    /// (`token_expiring`).
    pub expiry_warning: Duration,
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
    /// Room authorization, DM policy, token lifetimes.
    pub auth: Arc<AuthPolicy>,
}

/// When a token expires, and whether the client was told.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    at: Instant,
    warned: bool,
}

impl Expiry {
    /// `exp_ms` (unix milliseconds) as a point on this process's clock.
    fn from_unix_ms(exp_ms: u64) -> Expiry {
        let left = exp_ms.saturating_sub(switchboard_core::router::now_ms());
        Expiry {
            at: Instant::now() + Duration::from_millis(left),
            warned: false,
        }
    }

    /// When this needs attention next: the warning, then the expiry.
    fn next(&self, warning: Duration) -> Instant {
        if self.warned {
            self.at
        } else {
            self.at.checked_sub(warning).unwrap_or(self.at)
        }
    }
}

/// A session's tokens: who the connection token says it is and allows,
/// when it expires, and the rooms held by a room token. Boxed in the
/// session (an idle connection carries a pointer, not the grants).
#[derive(Debug)]
struct Tokens {
    identity: Identity,
    expiry: Option<Expiry>,
    /// Rooms joined with a room token, with its expiry (rooms the
    /// connection token allows are not listed: they last as long as it).
    rooms: Vec<(Arc<str>, Expiry)>,
}

impl Tokens {
    fn new(identity: Identity) -> Tokens {
        let expiry = identity.expires_at_ms.map(Expiry::from_unix_ms);
        Tokens {
            identity,
            expiry,
            rooms: Vec::new(),
        }
    }

    /// The earliest moment a token needs attention, if any.
    fn next_deadline(&self, warning: Duration) -> Option<Instant> {
        let rooms = self.rooms.iter().map(|(_, e)| e.next(warning));
        self.expiry
            .iter()
            .map(|e| e.next(warning))
            .chain(rooms)
            .min()
    }

    fn forget_room(&mut self, room: &str) {
        self.rooms.retain(|(r, _)| &**r != room);
    }
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
/// `admission` (the slots reserved before the upgrade) is held until the
/// session has ended.
///
/// A panic anywhere in the session's handling is caught here: the connection
/// is closed and its presence and rooms are cleaned up as on any other exit,
/// and the rest of the instance never notices.
pub async fn serve(
    ws: Socket,
    identity: Box<Identity>,
    since: Option<Seq>,
    ctx: SessionContext,
    admission: Admission,
) {
    let id = ctx.router.registry().next_conn_id(ctx.router.instance());
    // A debug-level span: at the usual `info` level it is disabled and costs
    // nothing, where an enabled span per connection would keep ~0.3 KiB per
    // idle connection in the subscriber's registry. The few events above
    // debug level name the user and connection themselves.
    let span = tracing::debug_span!("conn", user = %identity.user, conn = %id, instance = %ctx.router.instance());
    async move {
        let router = &ctx.router;
        let (handle, outbound) = ConnHandle::new(id, identity.user.clone(), ctx.limits.outbound);
        // Made here, not above: the session task keeps every variable it
        // ever held, and this one is a pointer.
        let tokens = Box::new(Tokens::new(*identity));
        // Queued before the connection is registered: nothing routed to it
        // can overtake the welcome frame.
        let welcome = ServerFrame::Welcome {
            user: &handle.user,
            instance: router.instance(),
            conn: &handle.id,
        };
        handle.send_text(welcome.to_frame(), &ctx.metrics);
        let replays = router.stores();
        if replays {
            // Before presence announces the connection: a stored DM
            // published to it from now on is held until the backlog is out.
            handle.begin_replay(since.unwrap_or(Seq::ZERO));
        }
        // The rarely taken steps are boxed (see `read_loop`'s frame handling):
        // what stays inline is what an idle connection must carry.
        Box::pin(router.connect(&handle)).await;
        tracing::debug!("connected");

        let (sink, mut stream) = ws.split();
        let writer = tokio::spawn(write_loop(sink, outbound, handle.clone()));
        if replays {
            // Each stored DM is queued once, in seq order (the gate in
            // `registry`); paced by the outbound queue, not limited by it.
            let replay = router.replay_inbox(&handle, ReplayStart::Connect(since));
            if let Err(e) = Box::pin(replay).await {
                inbox_unreadable(&handle, &ctx, e);
            }
        }
        let session =
            AssertUnwindSafe(read_loop(&mut stream, &handle, &ctx, tokens)).catch_unwind();
        if session.await.is_err() {
            ctx.metrics.session_panics.inc();
            handle.close(CloseReason::Internal);
            tracing::error!(
                user = %handle.user,
                conn = %handle.id,
                "connection task panicked; closing this connection only"
            );
        }

        Box::pin(router.disconnect(&handle)).await;
        match handle.close_reason() {
            Some(CloseReason::SlowConsumer) => ctx.metrics.closed_slow_consumer.inc(),
            Some(CloseReason::Flooding) => ctx.metrics.closed_flooding.inc(),
            Some(CloseReason::Idle) => ctx.metrics.closed_idle.inc(),
            Some(CloseReason::TokenExpired) => ctx.metrics.closed_token_expired.inc(),
            Some(CloseReason::Disconnected) => ctx.metrics.closed_disconnected.inc(),
            Some(CloseReason::OtherUser) => ctx.metrics.closed_other_user.inc(),
            _ => 0,
        };
        // Ends the writer: with a reason it sends a close frame first.
        handle.closer().cancel();
        let sink = writer.await.ok().flatten();
        if let (Some(sink), Some(_)) = (sink, handle.close_reason()) {
            Box::pin(drain_until_closed(sink, stream)).await;
        }
        drop(admission);
        tracing::debug!(reason = ?handle.close_reason(), "disconnected");
    }
    .instrument(span)
    .await
}

/// The inbox could not be read (a replay or a repair): never a silent hole,
/// the connection is closed and the client reconnects with `since`, when
/// the replay is tried again.
/// How long a connection keeps retrying a failed repair read before it is
/// closed with 1013 (the client then resumes with `since`): longer than a
/// Redis Cluster failover, so a failover never costs a reconnect.
const REPAIR_GIVE_UP: Duration = Duration::from_secs(30);

/// A failed repair read, tried again at `at`.
#[derive(Debug)]
struct RepairRetry {
    at: Instant,
    delay: Duration,
    first_failure: Instant,
}

/// Runs a requested repair (boxed: its state exists only while it runs).
/// A failed read is retried later with backoff (100 ms doubling to 1 s):
/// live stored DMs are held meanwhile, so nothing is skipped; after
/// [`REPAIR_GIVE_UP`] of failures the connection is closed with 1013.
/// Returns whether the connection stays open.
async fn repair(
    handle: &Arc<ConnHandle>,
    ctx: &SessionContext,
    retry: &mut Option<RepairRetry>,
) -> bool {
    let Err(e) = Box::pin(ctx.router.repair_inbox(handle)).await else {
        *retry = None;
        return true;
    };
    let now = Instant::now();
    let (delay, first_failure) = match retry.take() {
        None => (Duration::from_millis(100), now),
        Some(previous) => (
            (previous.delay * 2).min(Duration::from_secs(1)),
            previous.first_failure,
        ),
    };
    if now.duration_since(first_failure) > REPAIR_GIVE_UP {
        inbox_unreadable(handle, ctx, e);
        return false;
    }
    tracing::debug!(error = %e, ?delay, "inbox repair read failed; trying again");
    *retry = Some(RepairRetry {
        at: now + delay,
        delay,
        first_failure,
    });
    true
}

fn inbox_unreadable(handle: &ConnHandle, ctx: &SessionContext, error: RouteError) {
    tracing::debug!(error = %error, "inbox read failed; closing");
    ctx.metrics.inbox_read_failures.inc();
    handle.close(CloseReason::TryAgainLater);
}

/// A join with `since`: joins, replays the room's history after `since`
/// (live messages held meanwhile), then goes live; the join's ack follows
/// the replayed messages. Returns whether history reached back to `since`.
async fn replay_room(
    handle: &Arc<ConnHandle>,
    room: &str,
    since: Seq,
    ctx: &SessionContext,
) -> Result<bool, RouteError> {
    let (router, metrics) = (&ctx.router, &ctx.metrics);
    let member = handle.is_member(room);
    if !member {
        handle.begin_room_replay(room, since);
    }
    let backlog = if member {
        // Already a member: the history after `since` once more, minus
        // what this connection has had (its gate, if any, is live).
        router.read_room(room, since).await
    } else {
        router.join_since(handle, room, since).await
    };
    let backlog = match backlog {
        Ok(backlog) => backlog,
        Err(e) => {
            if !member {
                router.leave(handle, room).await;
                handle.forget_room_gate(room);
            }
            return Err(e);
        }
    };
    let recovered = backlog.recovered;
    let mut entries = backlog.entries;
    loop {
        for (seq, frame) in entries {
            if handle.room_replay_accepts(room, seq) && !handle.send_paced(frame, metrics).await {
                return Ok(recovered);
            }
        }
        if !handle.wait_for_room().await {
            return Ok(recovered);
        }
        match handle.finish_room_replay(room, metrics) {
            ReplayEnd::Live => return Ok(recovered),
            ReplayEnd::ReadAgainAfter(seq) => entries = router.read_room(room, seq).await?.entries,
        }
    }
}

/// After the server's Close frame: shuts the TCP write side (the client sees
/// the end right after the Close frame) and reads and discards what the
/// client still sends until it closes its side, for at most [`CLOSE_GRACE`].
async fn drain_until_closed(sink: SplitSink<Socket, Message>, stream: SplitStream<Socket>) {
    let Ok(ws) = sink.reunite(stream) else {
        return;
    };
    let mut io = ws.into_inner();
    let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
    let _ = tokio::time::timeout_at(deadline, io.shutdown()).await;
    // On the heap, and only now: a buffer in this future's state would be
    // carried by every idle connection's task.
    let mut discard = vec![0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, io.read(&mut discard)).await {
        if n == 0 {
            break;
        }
    }
}

async fn read_loop(
    stream: &mut SplitStream<Socket>,
    handle: &Arc<ConnHandle>,
    ctx: &SessionContext,
    mut tokens: Box<Tokens>,
) {
    let limits = &ctx.limits;
    let mut bucket = TokenBucket::new(limits.rate_limit, limits.rate_burst, Instant::now());
    // Refusals in a row: a client that ignores `rate_limited` is flooding.
    let mut refused_in_a_row = 0.0;
    let mut pings = tokio::time::interval(limits.ping_interval);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pings.reset(); // the first tick would fire at once
    let mut last_heard = Instant::now();
    // A repair read that failed, to try again (the connection stays open).
    let mut repair_retry: Option<RepairRetry> = None;
    loop {
        let idle_deadline = last_heard + limits.idle_timeout;
        let retry_at = repair_retry.as_ref().map_or(idle_deadline, |r| r.at);
        let wake_at = tokens
            .next_deadline(ctx.auth.expiry_warning)
            .map_or(idle_deadline, |t| t.min(idle_deadline));
        let next = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => return,
            _ = ctx.shutdown.cancelled() => {
                handle.close(CloseReason::GoingAway);
                return;
            }
            _ = handle.repair_wanted() => {
                // A stored DM arrived before its predecessor (or the bus
                // lost messages): read the inbox after the newest this
                // connection has.
                if !repair(handle, ctx, &mut repair_retry).await {
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep_until(retry_at.into()), if repair_retry.is_some() => {
                handle.rearm_repair();
                if !repair(handle, ctx, &mut repair_retry).await {
                    return;
                }
                continue;
            }
            // One timer for the idle deadline and the tokens' (a sleep is
            // ~100 bytes of every idle connection's task).
            _ = tokio::time::sleep_until(wake_at.into()) => {
                if wake_at < idle_deadline {
                    if !Box::pin(token_deadlines(handle, ctx, &mut tokens)).await {
                        return;
                    }
                    continue;
                }
                handle.close(CloseReason::Idle);
                return;
            }
            _ = pings.tick() => {
                handle.send(Outbound::Ping, &ctx.metrics);
                continue;
            }
            next = stream.next() => next,
        };
        let message = match next {
            None => return,
            Some(Ok(message)) => message,
            Some(Err(tungstenite::Error::Capacity(_))) => {
                handle.close(CloseReason::TooLarge);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "read error");
                return;
            }
        };
        let now = Instant::now();
        last_heard = now;
        let text = match &message {
            Message::Close(_) => return,
            // Pings are answered by the WebSocket layer.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            Message::Text(text) => Some(text.as_str()),
            Message::Binary(_) => None,
        };
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
            let id = text.and_then(|text| protocol::parse(text).id);
            handle.send_text(error_frame(id.as_ref(), &error), &ctx.metrics);
            continue;
        }
        refused_in_a_row = 0.0;
        let reply = match text {
            // Boxed: handling a frame (routing, presence reads) is a large
            // state machine; inline, every idle connection would carry its
            // ~7 KB in its task. Boxed, only a frame being handled does.
            Some(text) => Box::pin(handle_text(text, handle, ctx, &mut tokens)).await,
            None => {
                let error = ProtocolError::new(
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text",
                );
                Some(error_frame(None, &error))
            }
        };
        if let Some(reply) = reply {
            handle.send_text(reply, &ctx.metrics);
        }
    }
}

/// Handles one text frame; returns the reply to send, if any (a `dm` or
/// `room` sent with `"ack": false` gets none when it fully succeeds).
async fn handle_text(
    text: &str,
    handle: &Arc<ConnHandle>,
    ctx: &SessionContext,
    tokens: &mut Tokens,
) -> Option<TextFrame> {
    let incoming = protocol::parse(text);
    let id = incoming.id.as_ref();
    let request = match incoming.request {
        Ok(request) => request,
        Err(error) => return Some(error_frame(id, &error)),
    };
    let wants_ack = match request {
        Request::Direct { .. } | Request::Room { .. } => incoming.ack,
        // Acknowledgements are not acknowledged, unless asked (an `id`).
        Request::Recv { .. } => id.is_some(),
        _ => true,
    };
    match handle_request(request, id, handle, ctx, tokens).await {
        Reply::Ok(_) if !wants_ack => None,
        Reply::Ok(frame) | Reply::Notable(frame) => Some(frame),
        Reply::Sent => None,
    }
}

/// A reply frame: a plain success, or one the client must hear even when it
/// asked for no acks (an error, or a `partial` delivery).
enum Reply {
    Ok(TextFrame),
    Notable(TextFrame),
    /// Already queued (before a close).
    Sent,
}

async fn handle_request(
    request: Request<'_>,
    id: Option<&RequestId>,
    handle: &Arc<ConnHandle>,
    ctx: &SessionContext,
    tokens: &mut Tokens,
) -> Reply {
    if let Request::Direct { body, .. } | Request::Room { body, .. } = &request {
        if body.get().len() > ctx.limits.max_body_bytes {
            let message = format!("`body` is larger than {} bytes", ctx.limits.max_body_bytes);
            return refusal(id, ErrorCode::TooLarge, message);
        }
    }
    let router = &ctx.router;
    let ack = |status: &str, msg_id: Option<&str>| {
        ServerFrame::Ack {
            id,
            status,
            msg_id,
            seq: None,
            stored: None,
            recovered: None,
        }
        .to_frame()
    };
    match request {
        Request::Direct { to, .. }
            if ctx.auth.dms_need_grant && !tokens.identity.grants.allows_dm_to(&to) =>
        {
            ctx.metrics.forbidden_dms.inc();
            let message = format!("your token does not allow direct messages to {to}");
            refusal(id, ErrorCode::Forbidden, message)
        }
        Request::Direct { to, body, options } => {
            match router.send_dm(&handle.user, &to, body, &options).await {
                Ok(outcome) => {
                    let frame = ServerFrame::Ack {
                        id,
                        status: outcome.status.as_str(),
                        msg_id: Some(&outcome.msg_id),
                        seq: outcome.seq,
                        stored: Some(outcome.stored),
                        recovered: None,
                    }
                    .to_frame();
                    match outcome.status {
                        protocol::DirectStatus::Partial => Reply::Notable(frame),
                        _ => Reply::Ok(frame),
                    }
                }
                Err(e) => Reply::Notable(route_error(id, e)),
            }
        }
        Request::Room { room, body } => match router.send_room_as_member(handle, &room, body).await
        {
            Ok(outcome) => {
                let frame = ack(outcome.status.as_str(), Some(&outcome.msg_id));
                match outcome.status {
                    protocol::RoomStatus::Partial => Reply::Notable(frame),
                    protocol::RoomStatus::Ok => Reply::Ok(frame),
                }
            }
            Err(e) => Reply::Notable(route_error(id, e)),
        },
        Request::Join { room, .. }
            if handle.room_count() >= ctx.limits.max_rooms && !handle.is_member(&room) =>
        {
            let message = format!("at most {} rooms per connection", ctx.limits.max_rooms);
            refusal(id, ErrorCode::LimitExceeded, message)
        }
        Request::Join {
            room,
            since,
            token,
            events,
        } => {
            let room_expiry =
                match authorize_join(&room, token.as_deref(), handle, ctx, tokens).await {
                    Ok(expiry) => expiry,
                    Err(message) => {
                        ctx.metrics.forbidden_joins.inc();
                        return refusal(id, ErrorCode::Forbidden, message);
                    }
                };
            handle.set_room_events(&room, events);
            let joined = match since {
                None => router.join(handle, &room).await.map(|()| None),
                Some(since) => Box::pin(replay_room(handle, &room, since, ctx))
                    .await
                    .map(Some),
            };
            match joined {
                Ok(recovered) => {
                    tokens.forget_room(&room);
                    if let Some(expiry) = room_expiry {
                        tokens.rooms.push((Arc::from(room.as_str()), expiry));
                    }
                    Reply::Ok(ok_ack(id, recovered))
                }
                Err(e) => Reply::Notable(route_error(id, e)),
            }
        }
        Request::Leave { room } => {
            router.leave(handle, &room).await;
            tokens.forget_room(&room);
            Reply::Ok(ack("ok", None))
        }
        Request::Refresh { token } => Box::pin(refresh(&token, id, handle, ctx, tokens)).await,
        Request::Presence { users } => match router.online(&users).await {
            Ok(online) => Reply::Ok(
                ServerFrame::Presence {
                    id,
                    online: users.iter().map(String::as_str).zip(online).collect(),
                }
                .to_frame(),
            ),
            Err(e) => Reply::Notable(route_error(id, e)),
        },
        Request::Watch { users } => {
            if ctx.auth.dms_need_grant {
                if let Some(user) = users
                    .iter()
                    .find(|u| !tokens.identity.grants.allows_dm_to(u))
                {
                    let message = format!("your token does not allow watching {user}");
                    return refusal(id, ErrorCode::Forbidden, message);
                }
            }
            match router
                .watch(handle, id, &users, ctx.limits.max_watches)
                .await
            {
                Ok(()) => Reply::Sent,
                Err(WatchError::LimitExceeded) => {
                    let message = format!(
                        "at most {} watched users per connection",
                        ctx.limits.max_watches
                    );
                    refusal(id, ErrorCode::LimitExceeded, message)
                }
                Err(WatchError::Route(e)) => Reply::Notable(route_error(id, e)),
            }
        }
        Request::Unwatch { users } => {
            router.unwatch(handle, &users).await;
            Reply::Ok(ack("ok", None))
        }
        Request::Members { room } => {
            if !handle.is_member(&room) && !may_list(&room, ctx, tokens) {
                let message = format!("your token does not allow the members of {room}");
                return refusal(id, ErrorCode::Forbidden, message);
            }
            match router.members(&room).await {
                Ok(members) => Reply::Ok(
                    ServerFrame::Members {
                        id,
                        room: &room,
                        users: &members.users,
                        truncated: members.truncated,
                    }
                    .to_frame(),
                ),
                Err(e) => Reply::Notable(route_error(id, e)),
            }
        }
        Request::Recv { seq } => match router.ack_inbox(&handle.user, seq).await {
            Ok(()) => Reply::Ok(ack("ok", None)),
            Err(e) => Reply::Notable(route_error(id, e)),
        },
        Request::Ping => Reply::Ok(ServerFrame::Pong { id }.to_frame()),
    }
}

/// A refused request's reply: an error frame, sent even without acks.
fn refusal(id: Option<&RequestId>, code: ErrorCode, message: String) -> Reply {
    Reply::Notable(error_frame(id, &ProtocolError::new(code, message)))
}

/// `{"type":"ack","status":"ok"}` for a join (with whether its history
/// reached back, for a join with `since`) or a refresh.
fn ok_ack(id: Option<&RequestId>, recovered: Option<bool>) -> TextFrame {
    ServerFrame::Ack {
        id,
        status: "ok",
        msg_id: None,
        seq: None,
        stored: None,
        recovered,
    }
    .to_frame()
}

/// Whether `room` may be joined: `Ok(None)` when rooms are open or the
/// connection token allows it, `Ok(Some(expiry))` when a valid room token
/// does, `Err(why)` (answered `forbidden`) otherwise. A room token that is
/// given is always checked, even where the connection token would do.
async fn authorize_join(
    room: &str,
    token: Option<&str>,
    handle: &ConnHandle,
    ctx: &SessionContext,
    tokens: &Tokens,
) -> Result<Option<Expiry>, String> {
    if !ctx.auth.rooms_need_grant {
        return Ok(None);
    }
    match token {
        Some(token) => match ctx
            .auth
            .authenticator
            .room_token(token, &handle.user, room)
            .await
        {
            Ok(exp_ms) => Ok(Some(Expiry::from_unix_ms(exp_ms))),
            Err(e) => Err(format!("room token refused: {e}")),
        },
        None if tokens.identity.grants.allows_room(room) => Ok(None),
        None => Err(format!(
            "your token does not allow room {room}; join with a room token"
        )),
    }
}

/// Whether the connection may list `room`'s members without being one:
/// when it could join it by its connection token (or rooms are open).
fn may_list(room: &str, ctx: &SessionContext, tokens: &Tokens) -> bool {
    !ctx.auth.rooms_need_grant || tokens.identity.grants.allows_room(room)
}

/// A `refresh`: a valid later token for the same user replaces the
/// connection's (its grants too: rooms they no longer allow, and that no
/// room token holds, are left with a `left` frame, reason `revoked`). A
/// token for another user closes the connection (4003).
async fn refresh(
    token: &str,
    id: Option<&RequestId>,
    handle: &ConnHandle,
    ctx: &SessionContext,
    tokens: &mut Tokens,
) -> Reply {
    if tokens.identity.expires_at_ms.is_none() {
        return refusal(
            id,
            ErrorCode::InvalidToken,
            "this server does not authenticate with tokens (--auth none)".to_owned(),
        );
    }
    match ctx
        .auth
        .authenticator
        .refresh(token, &tokens.identity)
        .await
    {
        Ok(identity) => {
            tokens.expiry = identity.expires_at_ms.map(Expiry::from_unix_ms);
            tokens.identity = identity;
            if ctx.auth.rooms_need_grant {
                for room in handle.rooms() {
                    let by_room_token = tokens.rooms.iter().any(|(r, _)| *r == room);
                    if !by_room_token && !tokens.identity.grants.allows_room(&room) {
                        leave_unasked(handle, ctx, &room, "revoked").await;
                    }
                }
            }
            Reply::Ok(ok_ack(id, None))
        }
        Err(AuthError::OtherSubject) => {
            // Queued before the close, so the client reads why.
            let error =
                ProtocolError::new(ErrorCode::Forbidden, "a refresh must be for the same user");
            handle.send_text(error_frame(id, &error), &ctx.metrics);
            handle.close(CloseReason::OtherUser);
            Reply::Sent
        }
        Err(e) => refusal(id, ErrorCode::InvalidToken, format!("refresh refused: {e}")),
    }
}

/// Takes the connection out of `room` without its asking, telling it why.
async fn leave_unasked(handle: &ConnHandle, ctx: &SessionContext, room: &str, reason: &str) {
    ctx.router.leave(handle, room).await;
    handle.send_text(ServerFrame::Left { room, reason }.to_frame(), &ctx.metrics);
}

/// Warns of and enforces the token deadlines that have come: the
/// connection token's (`token_expiring`, then close 4001) and each room
/// token's (`token_expiring` with the room, then the room is left with
/// reason `token_expired`). Returns whether the connection stays open.
async fn token_deadlines(handle: &ConnHandle, ctx: &SessionContext, tokens: &mut Tokens) -> bool {
    let now = Instant::now();
    let warning = ctx.auth.expiry_warning;
    let in_ms = |at: Instant| at.saturating_duration_since(now).as_millis() as u64;
    if let Some(expiry) = &mut tokens.expiry {
        if now >= expiry.at {
            handle.close(CloseReason::TokenExpired);
            return false;
        }
        if !expiry.warned && now >= expiry.next(warning) {
            expiry.warned = true;
            let frame = ServerFrame::TokenExpiring {
                room: None,
                in_ms: in_ms(expiry.at),
            };
            handle.send_text(frame.to_frame(), &ctx.metrics);
        }
    }
    // A room the connection was taken out of by the server (a kick) is
    // still listed here: it is forgotten, not warned about.
    tokens.rooms.retain(|(room, _)| handle.is_member(room));
    let mut expired = Vec::new();
    for (room, expiry) in &mut tokens.rooms {
        if now >= expiry.at {
            expired.push(room.clone());
        } else if !expiry.warned && now >= expiry.next(warning) {
            expiry.warned = true;
            let frame = ServerFrame::TokenExpiring {
                room: Some(room),
                in_ms: in_ms(expiry.at),
            };
            handle.send_text(frame.to_frame(), &ctx.metrics);
        }
    }
    for room in expired {
        tokens.forget_room(&room);
        if handle.is_member(&room) {
            leave_unasked(handle, ctx, &room, "token_expired").await;
        }
    }
    true
}

/// The protocol error code for a routing failure.
pub fn route_error_code(error: RouteError) -> ErrorCode {
    match error {
        RouteError::Unavailable => ErrorCode::Unavailable,
        RouteError::Timeout => ErrorCode::Timeout,
        RouteError::NotMember => ErrorCode::NotMember,
    }
}

fn route_error(id: Option<&RequestId>, error: RouteError) -> TextFrame {
    error_frame(
        id,
        &ProtocolError::new(route_error_code(error), error.to_string()),
    )
}

fn error_frame(id: Option<&RequestId>, error: &ProtocolError) -> TextFrame {
    ServerFrame::Error {
        id,
        code: error.code,
        message: &error.message,
    }
    .to_frame()
}

/// The WebSocket message for a queued frame. A [`TextFrame`] is UTF-8 by
/// construction, so the check cannot fail; if it ever did, the frame is
/// dropped rather than sent as something else.
fn message_of(outbound: Outbound) -> Option<Message> {
    match outbound {
        Outbound::Text(frame) => Utf8Bytes::try_from(frame.bytes().clone())
            .ok()
            .map(Message::Text),
        Outbound::Ping => Some(Message::Ping(Default::default())),
    }
}

/// Drains the outbound queue into the socket until the connection closes;
/// returns the sink when the server closes the connection cleanly (so the
/// session can finish the closing handshake). Every await here also watches
/// the closer, so a client that stopped reading cannot hold the writer in a
/// blocked send.
async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut outbound: BoundedReceiver<Outbound>,
    handle: Arc<ConnHandle>,
) -> Option<SplitSink<Socket, Message>> {
    // When the closing handshake must be done by (flushing included).
    let grace_ends = loop {
        let next = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => break tokio::time::Instant::now() + CLOSE_GRACE,
            next = outbound.recv() => match next {
                Some(next) => next,
                None => break tokio::time::Instant::now() + CLOSE_GRACE,
            },
        };
        // Everything already queued goes out with this frame in one flush:
        // under load, one write syscall carries many frames.
        let write_batch = async {
            if let Some(message) = message_of(next) {
                sink.feed(message).await?;
            }
            for _ in 1..WRITE_BATCH {
                match outbound.try_recv().and_then(message_of) {
                    Some(message) => sink.feed(message).await?,
                    None => break,
                }
            }
            sink.flush().await
        };
        tokio::pin!(write_batch);
        let sent = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => {
                let grace_ends = tokio::time::Instant::now() + CLOSE_GRACE;
                match handle.close_reason() {
                    // The batch's frames are off the queue already: dropping
                    // the batch would lose them. A clean close still delivers
                    // them; a slow consumer would not read them anyway.
                    Some(reason) if reason != CloseReason::SlowConsumer => {
                        match tokio::time::timeout_at(grace_ends, write_batch).await {
                            Ok(Ok(())) => break grace_ends,
                            _ => return None,
                        }
                    }
                    _ => break grace_ends,
                }
            }
            sent = &mut write_batch => sent,
        };
        if sent.is_err() {
            return None;
        }
    };
    let Some(reason) = handle.close_reason() else {
        // The client left first (or closed): answer its Close, nothing more to say.
        let _ = tokio::time::timeout_at(grace_ends, sink.close()).await;
        return None;
    };
    let sent = tokio::time::timeout_at(grace_ends, async {
        if reason != CloseReason::SlowConsumer {
            // Deliver what was already accepted for this client (replies to
            // requests the server did handle, messages routed to it) before
            // the close frame. A slow consumer would not read them anyway.
            while let Some(next) = outbound.try_recv() {
                if let Some(message) = message_of(next) {
                    sink.feed(message).await?;
                }
            }
        }
        let (code, text) = handle
            .close_frame()
            .unwrap_or_else(|| reason.code_and_reason());
        sink.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(text),
        })))
        .await
    })
    .await;
    match sent {
        Ok(Ok(())) => Some(sink),
        _ => None,
    }
}
