//! Assembles one instance and runs it until shutdown: picks the backend
//! (Redis or in-process), starts the router, the bus dispatcher and the Redis
//! maintenance loop, serves HTTP/WebSocket on the given listener, and shuts
//! down in order.
//!
//! Shutdown, in order: stop accepting; close every WebSocket with 1001 after
//! flushing what it was already sent; wait for every session task (each
//! removes its own presence as it ends); withdraw whatever presence and lease
//! this instance still holds; stop the background tasks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::bus::local::{LocalBus, LocalHub};
use crate::bus::{Bus, Inbound};
use crate::config::Config;
use crate::connection::SessionContext;
use crate::http::{self, HttpContext};
use crate::metrics::Metrics;
use crate::presence::local::{LocalPresence, LocalPresenceHub};
use crate::presence::Presence;
use crate::redis::{RedisBackend, RedisSettings, RedisSetupError};
use crate::registry::Registry;
use crate::router::Router;

/// Bus messages buffered between the subscriber and the dispatcher.
const INBOX_CAPACITY: usize = 65_536;
/// Longest wait for sessions to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the shared backend can serve cross-instance traffic right now.
type ReadinessProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Redis could not be reached or configured.
    #[error(transparent)]
    Redis(#[from] RedisSetupError),
    /// The bus refused the instance's own subscriptions.
    #[error("subscribing the instance's channels failed: {0}")]
    Subscribe(#[from] crate::bus::BusError),
}

/// Runs one instance on `listener` until `shutdown` resolves, then shuts down
/// gracefully. Tests pass a oneshot; the binary passes SIGINT/SIGTERM.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let (inbox_tx, inbox_rx) = mpsc::channel::<Inbound>(INBOX_CAPACITY);
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();
    let instance = config.instance().to_owned();

    let (presence, bus, ready): (Arc<dyn Presence>, Arc<dyn Bus>, ReadinessProbe) =
        match &config.redis_url {
            Some(url) => {
                let backend = RedisBackend::connect(
                    RedisSettings {
                        url: url.clone(),
                        prefix: config.redis_prefix.clone(),
                        instance: instance.clone(),
                        lease: config.lease(),
                    },
                    inbox_tx,
                    metrics.clone(),
                )
                .await?;
                tokio::spawn(backend.clone().run_maintenance(background.clone()));
                let probe = backend.clone();
                (backend.clone(), backend, Arc::new(move || probe.is_ready()))
            }
            None => {
                let presence = LocalPresence::new(Arc::new(LocalPresenceHub::default()), &instance);
                let bus = LocalBus::new(
                    Arc::new(LocalHub::default()),
                    &instance,
                    inbox_tx,
                    metrics.clone(),
                );
                (Arc::new(presence), Arc::new(bus), Arc::new(|| true))
            }
        };

    let router = Arc::new(Router::new(
        &instance,
        config.routing,
        presence.clone(),
        bus,
        Arc::new(Registry::default()),
        metrics.clone(),
    ));
    router.start().await?;
    let dispatcher = tokio::spawn(dispatch(router.clone(), inbox_rx, background.clone()));

    let sessions = CancellationToken::new();
    let ctx = HttpContext {
        session: SessionContext {
            router: router.clone(),
            metrics: metrics.clone(),
            outbound_queue: config.outbound_queue,
            shutdown: sessions.clone(),
        },
        auth: Arc::new(Authenticator::new(
            config.auth,
            config.jwt_secret.as_deref(),
        )),
        ready,
        tracker: tracker.clone(),
        max_frame_bytes: config.max_frame_bytes,
    };

    let stop = sessions.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    let addr = listener.local_addr().ok();
    tracing::info!(instance = %instance, addr = ?addr, routing = ?config.routing,
        redis = config.redis_url.is_some(), "listening");
    warp::serve(http::routes(ctx))
        .incoming(listener)
        .graceful(sessions.clone().cancelled_owned())
        .run()
        .await;

    // warp does not wait for upgraded connections: the tracker does.
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
    if let Err(e) = presence.withdraw().await {
        tracing::warn!(error = %e, "could not withdraw presence; the lease will expire");
    }
    background.cancel();
    let _ = dispatcher.await;
    tracing::info!("stopped");
    Ok(())
}

/// Hands every bus message to the router, in arrival order.
async fn dispatch(
    router: Arc<Router>,
    mut inbox: mpsc::Receiver<Inbound>,
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
        router.handle_inbound(inbound).await;
    }
}
