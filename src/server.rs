//! Assembles one instance and runs it until shutdown: picks the backend
//! (Redis or in-process), starts the router, the bus dispatcher and the Redis
//! maintenance loop, serves HTTP/WebSocket on the given listener, and shuts
//! down in order.
//!
//! Shutdown, in order: stop accepting; close every WebSocket with 1001 after
//! flushing what it was already sent; wait for every session task (each
//! removes its own presence as it ends); withdraw whatever presence and lease
//! this instance still holds; stop the background tasks. Queue ingestion
//! (`--ingest-stream`) is started after the router and stopped first: it
//! finishes its batch and acknowledges what it delivered while the
//! sessions close.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use switchboard_core::bus::Bus;
use switchboard_core::bus::Inbound;
use switchboard_core::error::BackendError;
use switchboard_core::local::{LocalBackend, LocalHub};
use switchboard_core::metrics::Metrics;
use switchboard_core::presence::Presence;
use switchboard_core::queue::{bounded, BoundedReceiver};
use switchboard_core::registry::{QueueLimits, Registry};
use switchboard_core::router::{PresenceSettings, Router};
use switchboard_core::store::{Store, StoreLimits};
use switchboard_redis::{RedisBackend, RedisSettings, RedisSetupError, INBOX_BYTES, INBOX_ITEMS};

use crate::admission::{refuse_full, Limits};
use crate::auth::{AuthSetupError, Authenticator};
use crate::config::{Config, DmPolicy, RoomAuth};
use crate::connection::{AuthPolicy, SessionContext, SessionLimits};
use crate::http::{self, ApiSettings, HttpContext, UpgradeSlot};
use crate::ingest;

/// How much longer than the grace a draining instance waits for its
/// graces to end (a settle that fails is retried once a second).
const SETTLE_SLACK: Duration = Duration::from_secs(3);

/// Longest wait for sessions to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the shared backend can serve cross-instance traffic right now.
pub type ReadinessProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// Why the server could not start, or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Redis could not be reached or configured.
    #[error(transparent)]
    Redis(#[from] RedisSetupError),
    /// The bus refused the instance's own subscriptions.
    #[error("subscribing the instance's channels failed: {0}")]
    Subscribe(#[source] BackendError),
    /// The token keys cannot be set up (an unreadable --jwt-public-key...).
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// The backend asked the server to stop (another process took this
    /// instance id over while this one was paused past its lease).
    #[error("stopped: another process took over this instance id")]
    TakenOver,
}

/// The shared state an instance runs on: presence store, bus, readiness,
/// and where the bus delivers what it receives.
pub struct Backend {
    /// Which users which instances hold.
    pub presence: Arc<dyn Presence>,
    /// Publish/subscribe between instances.
    pub bus: Arc<dyn Bus>,
    /// The inboxes.
    pub store: Arc<dyn Store>,
    /// Whether cross-instance traffic can be served right now.
    pub ready: ReadinessProbe,
    /// The bus's received messages, for the dispatcher.
    pub inbox: BoundedReceiver<Inbound>,
    /// The instance's counters (the bus and presence count into them too).
    pub metrics: Arc<Metrics>,
    /// Cancelled when the backend can no longer serve this instance and the
    /// server must stop (see [`ServerError::TakenOver`]).
    pub stop: CancellationToken,
    /// The Redis backend, when there is one: queue ingestion from a Redis
    /// stream (`--ingest-stream`) opens its consumer from it.
    pub redis: Option<Arc<RedisBackend>>,
}

impl Backend {
    /// The embedded single-node backend: in-process bus and presence.
    pub fn embedded(instance: &str, limits: StoreLimits) -> Backend {
        let metrics = Metrics::new();
        let (inbox_tx, inbox) = bounded::<Inbound>(INBOX_ITEMS, INBOX_BYTES);
        let local = Arc::new(LocalBackend::new(
            Arc::new(LocalHub::with_limits(limits)),
            instance,
            inbox_tx,
            metrics.clone(),
        ));
        Backend {
            presence: local.clone(),
            store: local.clone(),
            bus: local,
            ready: Arc::new(|| true),
            inbox,
            metrics,
            stop: CancellationToken::new(),
            redis: None,
        }
    }
}

/// Runs one instance on `listener` until `shutdown` resolves, then shuts down
/// gracefully. Tests pass a oneshot; the binary passes SIGINT/SIGTERM.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let instance = config.instance().to_owned();
    let background = CancellationToken::new();
    let backend = match config.redis_target() {
        None => Backend::embedded(&instance, config.store_limits()),
        Some(target) => {
            let metrics = Metrics::new();
            let (inbox_tx, inbox) = bounded::<Inbound>(INBOX_ITEMS, INBOX_BYTES);
            let redis = RedisBackend::connect(
                RedisSettings {
                    target,
                    prefix: config.redis_prefix.clone(),
                    instance: instance.clone(),
                    lease: config.lease(),
                    connect_timeout: Duration::from_millis(config.redis_connect_timeout_ms),
                    response_timeout: Duration::from_millis(config.redis_response_timeout_ms),
                    store: config.store_limits(),
                    wait: (config.redis_wait_replicas > 0).then(|| {
                        switchboard_redis::WaitReplicas {
                            replicas: config.redis_wait_replicas,
                            timeout: Duration::from_millis(config.redis_wait_timeout_ms),
                        }
                    }),
                },
                inbox_tx,
                metrics.clone(),
            )
            .await?;
            tokio::spawn(redis.clone().run_maintenance(background.clone()));
            let probe = redis.clone();
            Backend {
                presence: redis.clone(),
                bus: redis.clone(),
                store: redis.clone(),
                ready: Arc::new(move || probe.is_ready()),
                inbox,
                metrics,
                stop: redis.taken_over().clone(),
                redis: Some(redis.clone()),
            }
        }
    };
    let result = run_with_backend(config, listener, shutdown, backend).await;
    background.cancel();
    result
}

/// Runs one instance over an already-built [`Backend`]: the seam tests use
/// to run the real server over an in-process or decorated backend.
pub async fn run_with_backend(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    backend: Backend,
) -> Result<(), ServerError> {
    let Backend {
        presence,
        bus,
        store,
        ready,
        inbox,
        metrics,
        stop: backend_stop,
        redis,
    } = backend;
    let instance = config.instance().to_owned();
    // Before anything starts: an unreadable key file stops the instance here.
    let auth = Arc::new(Authenticator::from_config(&config)?);

    let tracker = TaskTracker::new();
    let router = Arc::new(
        Router::new(
            &instance,
            config.routing,
            presence.clone(),
            bus,
            Arc::new(Registry::default()),
            metrics.clone(),
        )
        .with_store(store)
        .with_presence_settings(PresenceSettings {
            grace: Duration::from_millis(config.presence_grace_ms),
            max_members_listed: config.max_members_listed,
            reconcile_after: config.lease(),
        }),
    );
    router.start().await.map_err(ServerError::Subscribe)?;
    let stop_dispatcher = CancellationToken::new();
    let dispatcher = tokio::spawn(dispatch(router.clone(), inbox, stop_dispatcher.clone()));
    // Queue ingestion (--ingest-stream): stopped first at shutdown.
    let stop_ingest = CancellationToken::new();
    let ingest_tasks = ingest::start(&config, &router, redis.as_ref(), &metrics, &stop_ingest);

    let sessions = CancellationToken::new();
    let limits = Arc::new(Limits::new(
        config.max_connections(),
        config.max_connections_per_user,
    ));
    let ctx = HttpContext {
        session: SessionContext {
            router: router.clone(),
            metrics: metrics.clone(),
            limits: SessionLimits {
                outbound: QueueLimits {
                    frames: config.outbound_queue,
                    bytes: config.outbound_queue_bytes,
                },
                max_body_bytes: config.max_body_bytes,
                rate_limit: config.rate_limit,
                rate_burst: config.rate_burst,
                max_rooms: config.max_rooms_per_connection,
                max_watches: config.max_watches_per_connection,
                ping_interval: Duration::from_millis(config.ping_interval_ms),
                idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            },
            shutdown: sessions.clone(),
            auth: Arc::new(AuthPolicy {
                authenticator: auth.clone(),
                rooms_need_grant: config.room_auth() == RoomAuth::Token,
                dms_need_grant: config.dm_policy == DmPolicy::Token,
                expiry_warning: config.token_expiry_warning(),
            }),
        },
        auth,
        ready,
        tracker: tracker.clone(),
        max_frame_bytes: config.max_frame_bytes,
        limits: limits.clone(),
        allowed_origins: Arc::new(config.allowed_origins.clone()),
        api: ApiSettings {
            key: config.api_key.clone().map(Arc::from),
            max_body_bytes: config.max_body_bytes,
            routing: config.routing,
            started: Instant::now(),
        },
    };

    let stop = sessions.clone();
    let stopped_by_backend = backend_stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stopped_by_backend.cancelled() => {}
        }
        stop.cancel();
    });
    match listener.local_addr() {
        Ok(addr) => tracing::info!(
            instance = %instance,
            %addr,
            routing = %config.routing,
            redis = config.redis_url.is_some(),
            redis_cluster = !config.redis_cluster.is_empty(),
            "listening; open http://{addr}/ for the chat page"
        ),
        Err(e) => tracing::warn!(error = %e, "listening (address unknown)"),
    }
    let handshake_timeout = Duration::from_millis(config.handshake_timeout_ms);
    accept_loop(
        listener,
        http::routes(ctx),
        &limits,
        &metrics,
        handshake_timeout,
        sessions.clone(),
    )
    .await;

    // Ingestion finishes the batch in progress (a retry wait is cut short)
    // and acknowledges what it did, while the sessions close.
    stop_ingest.cancel();
    // Upgraded connections are not HTTP connections any more: the tracker
    // waits for them.
    tracing::info!(
        connections = router.registry().connection_count(),
        "shutting down"
    );
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not finish in time");
    }
    for task in ingest_tasks {
        if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
            tracing::warn!("queue ingestion did not stop in time");
        }
    }
    // Users who reconnect elsewhere within the grace are no event; the
    // others are announced gone before this instance withdraws.
    router
        .settle_pending(Duration::from_millis(config.presence_grace_ms) + SETTLE_SLACK)
        .await;
    if let Err(e) = presence.withdraw().await {
        tracing::warn!(error = %e, "could not withdraw presence; the lease will expire");
    }
    stop_dispatcher.cancel();
    let _ = dispatcher.await;
    tracing::info!("stopped");
    if backend_stop.is_cancelled() {
        return Err(ServerError::TakenOver);
    }
    Ok(())
}

/// Accepts connections until `stop`, serving each with the warp routes over
/// hyper. Owning this loop (rather than `warp::serve`) is what lets each
/// socket get TCP_NODELAY (small frames must not wait for Nagle's algorithm
/// and the peer's delayed ACK, ~40 ms), bounds admission at accept (a socket
/// beyond the limit gets a fixed 503 and no task), lets a client that does
/// not send its request headers within `handshake_timeout` be dropped
/// (slowloris), and hands the upgrade to our own WebSocket route. Accept
/// errors (e.g. out of file descriptors) back off instead of spinning.
async fn accept_loop<F>(
    listener: TcpListener,
    routes: F,
    limits: &Limits,
    metrics: &Metrics,
    handshake_timeout: Duration,
    stop: CancellationToken,
) where
    F: warp::Filter + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let connections = TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(permit) = limits.accept() else {
            // Full: a bounded number of refusals are answered; beyond them
            // the socket is closed at once.
            metrics.refused_sockets.inc();
            if let Some(refusal) = limits.refusal() {
                connections.spawn(refuse_full(stream, refusal));
            }
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let permit = Arc::new(Mutex::new(Some(permit)));
        let warp_service =
            hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                let on_upgrade = request
                    .extensions_mut()
                    .remove::<hyper::upgrade::OnUpgrade>();
                request
                    .extensions_mut()
                    .insert(Arc::new(UpgradeSlot::new(on_upgrade, permit.clone())));
                hyper::service::Service::call(&warp_service, request)
            },
        );
        let stop = stop.clone();
        connections.spawn(async move {
            // HTTP/1.1 (WebSocket upgrades need it); the header timer starts
            // as soon as the connection is served.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.cancelled() => {
                    // Finish the request in progress, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not finish in time");
    }
}

/// Hands every bus message to the router, in arrival order. The router's
/// handling never awaits, so one slow message cannot hold up the next.
async fn dispatch(
    router: Arc<Router>,
    mut inbox: BoundedReceiver<Inbound>,
    stop: CancellationToken,
) {
    loop {
        let inbound = tokio::select! {
            _ = stop.cancelled() => return,
            inbound = inbox.recv() => match inbound {
                Some(inbound) => inbound,
                None => return,
            },
        };
        router.handle_inbound(inbound);
    }
}
