//! One WebSocket session: the read loop, the writer draining the bounded
//! outbound queue, and the close handshake.
//!
//! The reader handles one frame at a time (so a connection's messages keep
//! their order) and answers through the same bounded queue the router
//! delivers into. The writer never blocks the rest of the instance: a client
//! that stops reading fills its queue and is closed as a slow consumer.
//! This module turns frames into router calls; it does not decide routing.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
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

/// What a session needs from its instance.
#[derive(Debug, Clone)]
pub struct SessionContext {
    /// Routes the session's requests.
    pub router: Arc<Router>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Capacity of the outbound queue.
    pub outbound_queue: usize,
    /// Cancelled when the instance shuts down.
    pub shutdown: CancellationToken,
}

/// Runs one session until the client leaves or the server closes it.
pub async fn serve(ws: WebSocket, user: Arc<str>, ctx: SessionContext) {
    let id = ctx.router.registry().next_conn_id(ctx.router.instance());
    let span =
        tracing::info_span!("conn", user = %user, conn = %id, instance = %ctx.router.instance());
    async move {
        let router = &ctx.router;
        let (handle, outbound) = ConnHandle::new(id, user, ctx.outbound_queue);
        router.connect(&handle).await;
        tracing::debug!("connected");
        let welcome = ServerFrame::Welcome {
            user: &handle.user,
            instance: router.instance(),
            conn: &handle.id,
        };
        handle.send(Message::text(welcome.to_text()), &ctx.metrics);

        let (sink, stream) = ws.split();
        let writer = tokio::spawn(write_loop(sink, outbound, handle.clone()));
        read_loop(stream, &handle, &ctx).await;

        router.disconnect(&handle).await;
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
    loop {
        let next = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => return,
            _ = ctx.shutdown.cancelled() => {
                handle.close(CloseReason::GoingAway);
                return;
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
        if message.is_close() {
            return;
        }
        let reply = if let Ok(text) = message.to_str() {
            handle_text(text, handle, ctx).await
        } else if message.is_binary() {
            let error = ProtocolError::new(
                ErrorCode::BadRequest,
                "binary frames are not supported; send JSON text",
            );
            error_frame(None, &error)
        } else {
            continue; // ping/pong: answered by the WebSocket layer
        };
        handle.send(Message::text(reply), &ctx.metrics);
    }
}

fn is_too_large(error: &warp::Error) -> bool {
    let source = std::error::Error::source(error);
    matches!(
        source.and_then(|s| s.downcast_ref::<tungstenite::Error>()),
        Some(tungstenite::Error::Capacity(_))
    )
}

async fn handle_text(text: &str, handle: &Arc<ConnHandle>, ctx: &SessionContext) -> String {
    let incoming = protocol::parse(text);
    let id = incoming.id.as_ref();
    let request = match incoming.request {
        Ok(request) => request,
        Err(error) => return error_frame(id, &error),
    };
    let router = &ctx.router;
    let ack =
        |status: &str, msg_id: Option<&str>| ServerFrame::Ack { id, status, msg_id }.to_text();
    match request {
        Request::Direct { to, body } => match router.send_direct(handle, &to, body).await {
            Ok((status, msg_id)) => {
                let status = match status {
                    DirectStatus::Routed => "routed",
                    DirectStatus::Offline => "offline",
                };
                ack(status, Some(&msg_id))
            }
            Err(e) => route_error(id, e),
        },
        Request::Room { room, body } => match router.send_room(handle, &room, body).await {
            Ok(msg_id) => ack("ok", Some(&msg_id)),
            Err(e) => route_error(id, e),
        },
        Request::Join { room } => match router.join(handle, &room).await {
            Ok(()) => ack("ok", None),
            Err(e) => route_error(id, e),
        },
        Request::Leave { room } => {
            router.leave(handle, &room).await;
            ack("ok", None)
        }
        Request::Presence { users } => match router.online(&users).await {
            Ok(online) => ServerFrame::Presence {
                id,
                online: users.iter().map(String::as_str).zip(online).collect(),
            }
            .to_text(),
            Err(e) => route_error(id, e),
        },
        Request::Ping => ServerFrame::Pong { id }.to_text(),
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
        let sent = tokio::select! {
            biased;
            _ = handle.closer().cancelled() => break,
            sent = sink.send(message) => sent,
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
        if reason == CloseReason::GoingAway {
            // Shutting down: deliver what was already accepted for this client.
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
