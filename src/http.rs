//! The HTTP surface (warp filters): the WebSocket upgrade with its checks
//! (origin, credentials, connection limits) before it, the server-side API
//! for backend services, health and readiness probes, and metrics.
//!
//! Routes translate HTTP into calls on the rest of the server; they hold no
//! state of their own and make no routing decisions. The WebSocket upgrade
//! is done here rather than by warp's `ws()` filter, so the WebSocket layer's
//! configuration (frame and message limits, buffers) is ours to set.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use switchboard_core::protocol::{self, PublishTarget};
use switchboard_core::registry::MAX_DISCONNECT_REASON;
use switchboard_core::router::{RouteError, RoutingMode};
use switchboard_core::store::Seq;

use crate::admission::{Limits, Refusal};
use crate::auth::{AuthError, Authenticator, Credentials, Identity};
use crate::connection::{self, route_error_code, SessionContext};

/// What the accept loop hands to the routes of one HTTP connection: the
/// upgrade future hyper left in the request, and the connection's socket
/// permit, both taken by the WebSocket route when it upgrades (the session
/// then holds the permit for its lifetime).
#[derive(Debug, Default)]
pub struct UpgradeSlot {
    on_upgrade: Mutex<Option<OnUpgrade>>,
    permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl UpgradeSlot {
    /// The slot for one request of a connection holding `permit`.
    pub fn new(
        on_upgrade: Option<OnUpgrade>,
        permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    ) -> Self {
        UpgradeSlot {
            on_upgrade: Mutex::new(on_upgrade),
            permit,
        }
    }

    fn take(&self) -> (Option<OnUpgrade>, Option<OwnedSemaphorePermit>) {
        let on_upgrade = self.on_upgrade.lock().ok().and_then(|mut u| u.take());
        let permit = self.permit.lock().ok().and_then(|mut p| p.take());
        (on_upgrade, permit)
    }
}

/// Settings of the server-side API.
#[derive(Clone)]
pub struct ApiSettings {
    /// The bearer key; `None` disables the API.
    pub key: Option<Arc<str>>,
    /// Largest `body` accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Reported by `/api/v1/stats`.
    pub routing: RoutingMode,
    /// For the uptime in `/api/v1/stats`.
    pub started: Instant,
}

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
    /// Connection limits (shared with the accept loop).
    pub limits: Arc<Limits>,
    /// Browser origins allowed to connect; empty allows any.
    pub allowed_origins: Arc<Vec<String>>,
    /// The server-side API.
    pub api: ApiSettings,
}

/// A refused request, answered with a status and a JSON error body.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    message: String,
}
impl warp::reject::Reject for Refused {}

fn refuse(status: StatusCode, message: impl Into<String>) -> Rejection {
    warp::reject::custom(Refused {
        status,
        message: message.into(),
    })
}

fn json_reply(status: StatusCode, value: serde_json::Value) -> Response {
    warp::reply::with_status(warp::reply::json(&value), status).into_response()
}

/// All routes of one instance.
pub fn routes(
    ctx: HttpContext,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    // Names the instance that answered: a deployment (or a test) that
    // reused a port can tell whose health it saw.
    let instance = ctx.session.router.instance().to_owned();
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(move || warp::reply::with_header("ok", "x-switchboard-instance", instance.clone()));

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

    healthz
        .or(readyz)
        .or(metrics_route)
        .or(page())
        .or(websocket(ctx.clone()))
        .or(api(ctx))
        .recover(handle_rejection)
}

/// The browser client's files, compiled into the binary (no build step).
const PAGE_INDEX: &str = include_str!("../web/index.html");
const PAGE_SCRIPT: &str = include_str!("../web/app.js");
const PAGE_STYLE: &str = include_str!("../web/style.css");
/// The reference client module the page imports (protocol v1.1).
const PAGE_CLIENT: &str = include_str!("../web/client.mjs");

/// No inline script or style, no foreign origin: bodies rendered as text can
/// never become code, and a token can only travel to this instance.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// `GET /`, `/app.js`, `/client.mjs`, `/style.css`: the chat page, served by every instance.
fn page() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let file = |path: &'static str, body: &'static str, content_type: &'static str| {
        let route = if path.is_empty() {
            warp::path::end().boxed()
        } else {
            warp::path(path).and(warp::path::end()).boxed()
        };
        route.and(warp::get()).map(move || {
            let mut response = Response::new(body.into());
            let headers = response.headers_mut();
            let pairs = [
                ("content-type", content_type),
                ("content-security-policy", PAGE_CSP),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "no-referrer"),
                ("cache-control", "no-cache"),
            ];
            for (name, value) in pairs {
                headers.insert(name, warp::http::HeaderValue::from_static(value));
            }
            response
        })
    };
    file("", PAGE_INDEX, "text/html; charset=utf-8")
        .or(file(
            "app.js",
            PAGE_SCRIPT,
            "text/javascript; charset=utf-8",
        ))
        .unify()
        .or(file("style.css", PAGE_STYLE, "text/css; charset=utf-8"))
        .unify()
        .or(file(
            "client.mjs",
            PAGE_CLIENT,
            "text/javascript; charset=utf-8",
        ))
        .unify()
}

/// `GET /ws`: origin, credentials and limits are checked before the upgrade.
fn websocket(ctx: HttpContext) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("ws")
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<Arc<UpgradeSlot>>())
        .and_then(
            move |query: HashMap<String, String>,
                  headers: HeaderMap,
                  slot: Option<Arc<UpgradeSlot>>| {
                let ctx = ctx.clone();
                async move { upgrade(&ctx, &query, &headers, slot.as_deref()).await }
            },
        )
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Admits the client, then answers 101 and starts its session on the
/// upgraded connection. Admission (and its reservations) happens before the
/// 101, so a refused client never becomes a session.
async fn upgrade(
    ctx: &HttpContext,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    slot: Option<&UpgradeSlot>,
) -> Result<Response, Rejection> {
    let (identity, admission) = admit(
        ctx,
        query,
        header(headers, "authorization"),
        header(headers, "origin"),
    )
    .await?;
    // Boxed: the session task carries what it captures for its whole life
    // (8 bytes, not the grants).
    let identity = Box::new(identity);
    let connection_upgrade = header(headers, "connection").is_some_and(|v| {
        v.split(',')
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
    });
    let websocket = header(headers, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (Some(key), true, true) = (
        header(headers, "sec-websocket-key"),
        connection_upgrade,
        websocket,
    ) else {
        // Valid credentials on a plain GET of /ws: the client must upgrade.
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "websocket upgrade required",
        ));
    };
    if header(headers, "sec-websocket-version") != Some("13") {
        return Err(refuse(
            StatusCode::UPGRADE_REQUIRED,
            "websocket version 13 required",
        ));
    }
    let since = match query.get("since").map(String::as_str) {
        None | Some("") => None,
        Some(text) => match Seq::parse(text) {
            Some(seq) => Some(seq),
            None => {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    "`since` is not a seq this server issued",
                ))
            }
        },
    };
    let (Some(on_upgrade), permit) = slot.map(UpgradeSlot::take).unwrap_or_default() else {
        tracing::debug!("upgrade requested on a connection that cannot be upgraded");
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        ));
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .max_frame_size(Some(ctx.max_frame_bytes))
        .max_message_size(Some(ctx.max_frame_bytes));
    let session = ctx.session.clone();
    ctx.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade did not complete");
                return;
            }
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        connection::serve(socket, identity, since, session, admission).await;
        drop(permit);
    });
    let mut response = Response::new(Default::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("upgrade"));
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(key.as_bytes());
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", accept);
    }
    Ok(response)
}

/// Decides whether a WebSocket upgrade may proceed, and as whom; reserves
/// the session's slots.
async fn admit(
    ctx: &HttpContext,
    query: &HashMap<String, String>,
    authorization: Option<&str>,
    origin: Option<&str>,
) -> Result<(Identity, crate::admission::Admission), Rejection> {
    let metrics = &ctx.session.metrics;
    if let Some(origin) = origin {
        if !ctx.allowed_origins.is_empty() && !ctx.allowed_origins.iter().any(|o| o == origin) {
            metrics.refused_origin.inc();
            tracing::info!(origin, "websocket upgrade refused: origin not allowed");
            return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
        }
    }
    let credentials = Credentials {
        query_token: query.get("token").map(String::as_str),
        authorization,
        query_user: query.get("user").map(String::as_str),
    };
    let identity = ctx
        .auth
        .authenticate(&credentials)
        .await
        .map_err(|e| match e {
            // The JWKS endpoint could not be read and the token's key is
            // not cached: the token may be good; the client retries later.
            AuthError::KeysUnavailable(_) => {
                tracing::warn!(error = %e, "websocket upgrade refused: token keys unavailable");
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token keys unavailable; try again",
                )
            }
            e => {
                metrics.auth_failures.inc();
                tracing::info!(reason = %e, "websocket upgrade refused");
                refuse(StatusCode::UNAUTHORIZED, "invalid or missing credentials")
            }
        })?;
    match ctx.limits.admit(&identity.user) {
        Ok(admission) => Ok((identity, admission)),
        Err(Refusal::InstanceFull) => {
            metrics.refused_limit.inc();
            Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "instance is full"))
        }
        Err(Refusal::UserFull) => {
            metrics.refused_limit.inc();
            Err(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections for this user",
            ))
        }
    }
}

/// `/api/v1/*`: the server-side API for backend services.
fn api(ctx: HttpContext) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let key = ctx.api.key.clone();
    let authorized = warp::path!("api" / "v1" / ..)
        .and(warp::header::optional::<String>("authorization"))
        .and_then(move |authorization: Option<String>| {
            let key = key.clone();
            async move { check_api_key(key.as_deref(), authorization.as_deref()) }
        })
        .untuple_one();

    let publish_ctx = ctx.clone();
    // Room for the envelope around a maximal body.
    let request_limit = (ctx.api.max_body_bytes + 4096) as u64;
    let publish = warp::path!("publish")
        .and(warp::post())
        .and(warp::body::content_length_limit(request_limit))
        .and(warp::body::bytes())
        .then(move |body: Bytes| {
            let ctx = publish_ctx.clone();
            async move { publish(&ctx, &body).await }
        });

    let presence_ctx = ctx.clone();
    let presence = warp::path!("presence" / String)
        .and(warp::get())
        .then(move |user: String| {
            let ctx = presence_ctx.clone();
            async move { presence(&ctx, &user).await }
        });

    let disconnect_ctx = ctx.clone();
    let disconnect = warp::path!("disconnect")
        .and(warp::post())
        .and(warp::body::content_length_limit(CONTROL_REQUEST_LIMIT))
        .and(warp::body::bytes())
        .then(move |body: Bytes| {
            let ctx = disconnect_ctx.clone();
            async move { disconnect(&ctx, &body).await }
        });

    let kick_ctx = ctx.clone();
    let kick = warp::path!("rooms" / String / "kick")
        .and(warp::post())
        .and(warp::body::content_length_limit(CONTROL_REQUEST_LIMIT))
        .and(warp::body::bytes())
        .then(move |room: String, body: Bytes| {
            let ctx = kick_ctx.clone();
            async move { kick(&ctx, &room, &body).await }
        });

    let members_ctx = ctx.clone();
    let members = warp::path!("rooms" / String / "members")
        .and(warp::get())
        .then(move |room: String| {
            let ctx = members_ctx.clone();
            async move { members(&ctx, &room).await }
        });

    let stats = warp::path!("stats").and(warp::get()).map(move || {
        let registry = ctx.session.router.registry();
        json_reply(
            StatusCode::OK,
            json!({
                "instance": ctx.session.router.instance(),
                "routing": ctx.api.routing.to_string(),
                "connections": registry.connection_count(),
                "users": registry.user_count(),
                "rooms": registry.room_count(),
                "uptime_s": ctx.api.started.elapsed().as_secs(),
            }),
        )
    });

    authorized.and(
        publish
            .or(presence)
            .unify()
            .or(disconnect)
            .unify()
            .or(kick)
            .unify()
            .or(members)
            .unify()
            .or(stats)
            .unify(),
    )
}

/// Largest body of a disconnect or kick request.
const CONTROL_REQUEST_LIMIT: u64 = 4096;

/// The body of `POST /api/v1/disconnect` and `POST /api/v1/rooms/R/kick`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlRequest {
    user: String,
    #[serde(default)]
    reason: Option<String>,
}

/// Reads a control request's body; the error is the 400 answer's body.
fn control_request(body: &[u8], reason_allowed: bool) -> Result<ControlRequest, Value> {
    let bad = |message: String| json!({"error": message, "code": "bad_request"});
    // serde would read the struct from an array by position: `["alice"]`.
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(bad("the request body must be a JSON object".to_owned()));
    }
    let request: ControlRequest =
        serde_json::from_slice(body).map_err(|e| bad(format!("expected {{\"user\": …}}: {e}")))?;
    if let Err(e) = protocol::validate_name(&request.user) {
        return Err(invalid_name("user", e));
    }
    match &request.reason {
        Some(_) if !reason_allowed => Err(bad("a kick takes no `reason`".to_owned())),
        Some(reason) if reason.len() > MAX_DISCONNECT_REASON => Err(bad(format!(
            "`reason` is longer than {MAX_DISCONNECT_REASON} bytes"
        ))),
        _ => Ok(request),
    }
}

/// `POST /api/v1/disconnect`: closes every connection of the user on
/// every instance (4002), routed to the instances that hold them.
async fn disconnect(ctx: &HttpContext, body: &[u8]) -> Response {
    let request = match control_request(body, true) {
        Ok(request) => request,
        Err(answer) => return json_reply(StatusCode::BAD_REQUEST, answer),
    };
    let reason = request.reason.as_deref().unwrap_or("");
    match ctx
        .session
        .router
        .disconnect_user(&request.user, reason)
        .await
    {
        Ok(outcome) => {
            tracing::info!(user = %request.user, instances = outcome.instances, "disconnect requested by the API");
            json_reply(
                StatusCode::OK,
                json!({"status": "ok", "instances": outcome.instances}),
            )
        }
        Err(e) => route_failure(e),
    }
}

/// `POST /api/v1/rooms/R/kick`: takes the user out of the room on every
/// instance, routed to the instances that hold them.
async fn kick(ctx: &HttpContext, segment: &str, body: &[u8]) -> Response {
    let room = match path_name(segment, "room") {
        Ok(room) => room,
        Err(body) => return json_reply(StatusCode::BAD_REQUEST, body),
    };
    let room: &str = &room;
    let request = match control_request(body, false) {
        Ok(request) => request,
        Err(answer) => return json_reply(StatusCode::BAD_REQUEST, answer),
    };
    match ctx.session.router.kick(&request.user, room).await {
        Ok(outcome) => {
            tracing::info!(user = %request.user, room, instances = outcome.instances, "kick requested by the API");
            json_reply(
                StatusCode::OK,
                json!({"status": "ok", "instances": outcome.instances}),
            )
        }
        Err(e) => route_failure(e),
    }
}

fn check_api_key(key: Option<&str>, authorization: Option<&str>) -> Result<(), Rejection> {
    let Some(key) = key else {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "the API is disabled: no --api-key is configured",
        ));
    };
    let presented = authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(key.as_bytes())) {
        Ok(())
    } else {
        Err(refuse(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key",
        ))
    }
}

async fn publish(ctx: &HttpContext, body: &[u8]) -> Response {
    let Ok(text) = std::str::from_utf8(body) else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "request body is not UTF-8 JSON", "code": "bad_request"}),
        );
    };
    let request = match protocol::parse_publish(text) {
        Ok(request) => request,
        Err(e) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                json!({"error": e.message, "code": e.code}),
            )
        }
    };
    if request.body.get().len() > ctx.api.max_body_bytes {
        return json_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("`body` is larger than {} bytes", ctx.api.max_body_bytes)}),
        );
    }
    let router = &ctx.session.router;
    let result = match &request.target {
        PublishTarget::User(user) => router
            .send_dm(&request.from, user, request.body, &request.options)
            .await
            .map(|o| {
                let mut reply =
                    json!({"status": o.status.as_str(), "msg_id": o.msg_id, "stored": o.stored});
                if let Some(seq) = o.seq {
                    reply["seq"] = json!(seq.to_string());
                }
                reply
            }),
        PublishTarget::Room(room) => router
            .send_room(&request.from, None, room, request.body)
            .await
            .map(|o| json!({"status": o.status.as_str(), "msg_id": o.msg_id})),
    };
    match result {
        Ok(reply) => {
            ctx.session.metrics.api_publishes.inc();
            json_reply(StatusCode::ACCEPTED, reply)
        }
        Err(e) => route_failure(e),
    }
}

/// A routing failure as an HTTP answer: 503 `unavailable` (nothing was
/// delivered; retry), 504 `timeout` (it may have been delivered).
fn route_failure(error: RouteError) -> Response {
    let status = match error {
        RouteError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        RouteError::Unavailable | RouteError::NotMember => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_reply(
        status,
        json!({"error": error.to_string(), "code": route_error_code(error)}),
    )
}

/// The 400 body for a `what` (user, room) outside the name rules.
fn invalid_name(what: &str, error: protocol::NameError) -> Value {
    json!({"error": format!("invalid {what}: {error}"), "code": "invalid_name"})
}

/// A user or room named by a path segment. Clients percent-encode path
/// segments (`bob%40example.com`, `svc%3Ax`); a segment that does not
/// decode to UTF-8 is taken as written (and then fails the name rules).
/// The error is the 400 answer's body.
fn path_name<'s>(segment: &'s str, what: &str) -> Result<Cow<'s, str>, Value> {
    let name = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .unwrap_or(Cow::Borrowed(segment));
    match protocol::validate_name(&name) {
        Ok(()) => Ok(name),
        Err(e) => Err(invalid_name(what, e)),
    }
}

async fn presence(ctx: &HttpContext, segment: &str) -> Response {
    let user = match path_name(segment, "user") {
        Ok(user) => user,
        Err(body) => return json_reply(StatusCode::BAD_REQUEST, body),
    };
    let user: &str = &user;
    match ctx.session.router.presence_of(user).await {
        Ok(holders) => {
            let connections: u64 = holders.iter().map(|h| u64::from(h.connections)).sum();
            let instances: Vec<&str> = holders.iter().map(|h| &*h.instance).collect();
            json_reply(
                StatusCode::OK,
                json!({
                    "user": user,
                    "online": !holders.is_empty(),
                    "instances": instances,
                    "connections": connections,
                }),
            )
        }
        Err(e) => route_failure(e),
    }
}

/// `GET /api/v1/rooms/R/members`: the room's members, cluster-wide
/// (user-level, sorted, at most `--max-members-listed`).
async fn members(ctx: &HttpContext, segment: &str) -> Response {
    let room = match path_name(segment, "room") {
        Ok(room) => room,
        Err(body) => return json_reply(StatusCode::BAD_REQUEST, body),
    };
    match ctx.session.router.members(&room).await {
        Ok(members) => json_reply(
            StatusCode::OK,
            json!({
                "room": &*room,
                "users": members.users,
                "truncated": members.truncated,
            }),
        ),
        Err(e) => route_failure(e),
    }
}

async fn handle_rejection(rejection: Rejection) -> Result<Response, Infallible> {
    let (status, message) = if let Some(refused) = rejection.find::<Refused>() {
        (refused.status, refused.message.clone())
    } else if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "not found".to_owned())
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request too large".to_owned(),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "content-length required".to_owned(),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        )
    } else {
        (StatusCode::BAD_REQUEST, "bad request".to_owned())
    };
    Ok(json_reply(status, json!({ "error": message })))
}
