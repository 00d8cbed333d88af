//! The HTTP surface (warp filters): the WebSocket upgrade with authentication
//! before it, health and readiness probes, and metrics.
//!
//! Routes translate HTTP into calls on the rest of the server; they hold no
//! state of their own and make no routing decisions.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use tokio_util::task::TaskTracker;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::auth::{Authenticator, Credentials};
use crate::connection::{self, SessionContext};

/// Everything the routes need, cheap to clone into each filter.
#[derive(Clone)]
pub struct HttpContext {
    /// Handed to each WebSocket session.
    pub session: SessionContext,
    /// Verifies credentials before the upgrade.
    pub auth: Arc<Authenticator>,
    /// Whether the shared backend is usable (always true in embedded mode).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Tracks session tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Largest WebSocket frame/message accepted.
    pub max_frame_bytes: usize,
}

/// A refused upgrade: 401 with a JSON body.
#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// All routes of one instance.
pub fn routes(
    ctx: HttpContext,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok");

    let ready = ctx.ready.clone();
    let shutdown = ctx.session.shutdown.clone();
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        if ready() && !shutdown.is_cancelled() {
            warp::reply::with_status("ready", StatusCode::OK)
        } else {
            warp::reply::with_status("not ready", StatusCode::SERVICE_UNAVAILABLE)
        }
    });

    let metrics = ctx.session.metrics.clone();
    let metrics_route = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    });

    let auth_ctx = ctx.clone();
    let ws = warp::path!("ws")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::optional::<String>("authorization"))
        .and_then(
            move |query: HashMap<String, String>, authorization: Option<String>| {
                let ctx = auth_ctx.clone();
                async move {
                    let credentials = Credentials {
                        query_token: query.get("token").map(String::as_str),
                        authorization: authorization.as_deref(),
                        query_user: query.get("user").map(String::as_str),
                    };
                    ctx.auth.authenticate(&credentials).map_err(|e| {
                        ctx.session.metrics.auth_failures.inc();
                        tracing::info!(reason = %e, "websocket upgrade refused");
                        warp::reject::custom(Unauthorized)
                    })
                }
            },
        )
        .and(warp::ws())
        .map(move |user: Arc<str>, ws: warp::ws::Ws| {
            let session = ctx.session.clone();
            let tracker = ctx.tracker.clone();
            ws.max_frame_size(ctx.max_frame_bytes)
                .max_message_size(ctx.max_frame_bytes)
                .on_upgrade(move |socket| {
                    tracker.track_future(connection::serve(socket, user, session))
                })
        });

    healthz
        .or(readyz)
        .or(metrics_route)
        .or(ws)
        .recover(handle_rejection)
}

async fn handle_rejection(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let (status, message) = if rejection.find::<Unauthorized>().is_some() {
        (StatusCode::UNAUTHORIZED, "invalid or missing credentials")
    } else if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "not found")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    } else {
        (StatusCode::BAD_REQUEST, "bad request")
    };
    let body = warp::reply::json(&serde_json::json!({ "error": message }));
    Ok(warp::reply::with_status(body, status).into_response())
}
