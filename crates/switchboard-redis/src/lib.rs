//! The Redis implementation of Switchboard's
//! [`Presence`](switchboard_core::presence::Presence) and
//! [`Bus`](switchboard_core::bus::Bus): the only crate that knows Redis
//! commands, key names and scripts.
//!
//! Three kinds of connection, never mixed:
//! - the **message path** (presence writes, the routing script, PUBLISH,
//!   presence reads) goes over one multiplexed connection kept by the redis
//!   crate's `ConnectionManager`, which reconnects by itself. Commands from
//!   every task are pipelined on it (one connection measured cheapest for
//!   Redis and the instance). Each command has an explicit response timeout,
//!   and its failures are classified as "not carried out" or "may have been
//!   carried out" ([`BackendError`]);
//! - **maintenance** (the lease, the instance index, resync, reaping, the
//!   subscription probe, withdrawal) goes through a small deadpool pool, so a
//!   20,000-user resync pipeline never queues in front of a DM;
//! - **subscriptions** live on one dedicated RESP3 connection (another
//!   `ConnectionManager`, with a push sender and automatic resubscription),
//!   which reconnects with capped, jittered backoff and re-issues every
//!   SUBSCRIBE. Pushed messages go into the bounded bus inbox without
//!   blocking; a full inbox drops and counts. (The redis crate forwards pushes
//!   through an internal unbounded channel that cannot be configured; the
//!   push sender drains it without blocking.)
//!
//! On a Redis Cluster (`--redis-cluster`) the same three exist, each a
//! cluster connection (one multiplexed connection per node, commands routed
//! by slot): the message path, maintenance, and the subscriber, whose
//! channels are sharded (`SSUBSCRIBE`, on the node serving the channel's
//! slot). Every key and channel carries a hash tag (see `keys`): a user's
//! presence, inbox and user channel share the user's slot, an instance's
//! lease, users set and personal channel the instance's, a room's history
//! and channel the room's, so every script touches one slot; work over many
//! users is split into single-slot commands. What differs is asked of
//! [`RedisTarget`] in the few places it matters.
//!
//! Presence events: besides counting connections, the presence scripts
//! keep each user's announced state (`sb:online:{U}`) and each room's
//! announced members (`sb:members:{R}`) and change them atomically with the
//! counts, so one instance wins each user-level transition and publishes
//! it (`P` to the watchers' personal channels, `M` on the room channel from
//! inside the script); see `presence`. Offline and member-left transitions
//! happen only when the router settles a lingering user a grace after its
//! last connection, or when the reaper or a withdrawal settles an
//! instance's users.
//!
//! An instance id is claimed with a lease holding a per-process token: a
//! second process started with the same id waits for a crashed holder's
//! lease to expire, and refuses to start while a live one refreshes it.

mod bus;
mod conn;
pub mod ingest;
pub mod keys;
mod maintenance;
mod presence;
mod presence_cache;
mod scripts;
mod store;
mod subscriber;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, IntoConnectionInfo, RedisError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use switchboard_core::bus::Inbound;
use switchboard_core::error::BackendError;
use switchboard_core::keyed_lock::KeyedLocks;
use switchboard_core::metrics::Metrics;
use switchboard_core::queue::BoundedSender;
use switchboard_core::store::StoreLimits;

use conn::{MaintenanceConn, MessageConn};
pub use conn::{RedisTarget, SentinelUrlError};
pub use ingest::{StreamConsumer, StreamSettings, StreamStart};
use keys::Keys;
use presence_cache::PresenceCache;
use subscriber::Subscriber;

/// Why the Redis backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL does not parse or names an unsupported scheme.
    #[error("invalid redis url: {0}")]
    Url(#[source] RedisError),
    /// Redis could not be reached or refused the connection.
    #[error("cannot connect to redis ({what}): {source}")]
    Connect {
        /// Which connection failed.
        what: &'static str,
        /// What the client reported (refused, timed out, auth failed…).
        #[source]
        source: RedisError,
    },
    /// The sentinels did not name a reachable master.
    #[error(
        "cannot find the redis master {service:?} through the sentinels {sentinels}: {source}"
    )]
    Sentinel {
        /// The monitored master's name.
        service: String,
        /// The sentinels asked.
        sentinels: String,
        /// What the client reported.
        #[source]
        source: RedisError,
    },
    /// The maintenance pool could not be built.
    #[error("cannot build the redis connection pool: {0}")]
    Pool(#[source] deadpool_redis::BuildError),
    /// A maintenance command failed during start-up.
    #[error("redis failed during start-up ({what}): {source}")]
    Startup {
        /// Which step failed.
        what: &'static str,
        /// The failure.
        #[source]
        source: BackendError,
    },
    /// Another live process holds this instance id.
    #[error(
        "instance id {instance:?} is held by another live instance (its lease keeps being \
         refreshed); refusing to start. Give each process its own --instance-id, or omit it \
         for a generated one"
    )]
    InstanceIdTaken {
        /// The contested id.
        instance: String,
    },
}

/// Settings of the Redis backend, taken from the instance's configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One Redis or a cluster.
    pub target: RedisTarget,
    /// Key and channel prefix.
    pub prefix: String,
    /// This instance's id.
    pub instance: String,
    /// Lease TTL.
    pub lease: Duration,
    /// Longest wait for a connection to Redis to be established.
    pub connect_timeout: Duration,
    /// Longest wait for the answer to a command once sent.
    pub response_timeout: Duration,
    /// Inbox retention and the idempotency window.
    pub store: StoreLimits,
    /// Replicas a stored DM must reach before it is acknowledged.
    pub wait: Option<WaitReplicas>,
}

/// `--redis-wait-replicas`: a stored DM is acknowledged as stored only once
/// this many replicas have it (`WAIT` on the connection that appended it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitReplicas {
    /// Replicas that must acknowledge.
    pub replicas: u32,
    /// Longest wait for them.
    pub timeout: Duration,
}

/// Bus messages buffered between the subscriber and the dispatcher, at most.
pub const INBOX_ITEMS: usize = 65_536;
/// Bytes of bus messages buffered between the subscriber and the dispatcher.
pub const INBOX_BYTES: usize = 64 << 20;

/// What the subscriber's push callback tells the rest of the backend.
#[derive(Debug, Default)]
struct SubscriberSignals {
    /// The subscriber connection is up (cleared on a disconnection push).
    up: AtomicBool,
    /// Highest probe nonce that came back on the personal channel.
    probe_seen: AtomicU64,
    /// Woken when a probe comes back.
    probe_arrived: Notify,
    /// Wakes the heartbeat at once: the subscriber lost or regained its
    /// connection, or a message-path command failed on a cluster — learn
    /// now whether Redis is reachable (and re-assert presence when it is
    /// back) rather than at the next period.
    check_now: Notify,
    /// Woken when Redis Cluster dropped a wanted sharded subscription (its
    /// slot moved): subscribe again.
    resubscribe: Notify,
    /// Bus messages may have been lost since the subscriptions last worked
    /// (a connection dropped, a slot moved, masters changed, a probe did
    /// not return): once a probe comes back, the router is told
    /// ([`ChannelKind::Resubscribed`](switchboard_core::bus::ChannelKind)).
    catch_up_pending: AtomicBool,
}

/// What this instance believes about other instances, from the last heartbeat.
#[derive(Debug, Default)]
struct LiveView {
    /// instance id -> alive (lease not expired at the last refresh).
    instances: HashMap<String, bool>,
    /// The instances known dead, passed to the routing script.
    dead: Vec<String>,
}

impl LiveView {
    /// Entries of instances known dead are ignored; unknown instances (for
    /// example one that started after the last refresh) are taken as alive.
    fn may_be_alive(&self, instance: &str) -> bool {
        self.instances.get(instance).copied().unwrap_or(true)
    }
}

/// Presence store and message bus over one Redis deployment.
pub struct RedisBackend {
    /// The three connections (see the module documentation); replaced as a
    /// whole when Sentinel names a new master.
    links: RwLock<Arc<Links>>,
    /// Sentinel: where the master is, asked at every heartbeat.
    sentinel: Option<SentinelWatch>,
    /// What opening connections again takes.
    wiring: Wiring,
    /// Redis Cluster: sharded channels, work split by slot.
    cluster: bool,
    /// Cluster: every master answered the last heartbeat's PING.
    cluster_whole: AtomicBool,
    /// Cluster: the live masters' ids at the last heartbeat; a change is a
    /// failover (see [`conn::master_fingerprint`]).
    masters: Mutex<String>,
    keys: Keys,
    instance: Arc<str>,
    /// Random per process: whose lease `sb:instance:{ID}` is.
    token: String,
    lease: Duration,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
    live: RwLock<Arc<LiveView>>,
    /// The local truth this instance re-asserts: user -> its connections here.
    desired: DashMap<String, u32>,
    /// Users whose last connection here closed and that the router has not
    /// settled yet: still listed in the users set (so a reaper settles them
    /// if this process dies), never unlisted or settled by a resync.
    lingering: DashMap<String, ()>,
    /// The users this instance watches (a local connection watches them):
    /// the watcher fields a resync re-asserts.
    watching: DashMap<String, ()>,
    /// Watch and unwatch share it; a resync's rewrite of the watcher fields
    /// excludes them, so none interleaves with it.
    watch_lock: tokio::sync::RwLock<()>,
    /// The room memberships (`ROOM USER`) this instance holds: a local
    /// connection of USER is in ROOM.
    memberships: DashMap<String, ()>,
    /// Memberships whose last local connection left and that the router
    /// has not settled yet (as [`RedisBackend::lingering`] for users).
    lingering_members: DashMap<String, ()>,
    /// Serializes this instance's presence writes for one user.
    user_locks: KeyedLocks,
    /// Serializes this instance's membership writes for one `ROOM USER`.
    room_locks: KeyedLocks,
    /// Dead instances this one claimed but has not finished reaping (a
    /// failure midway): retried at every heartbeat, since the claim cannot
    /// be won twice.
    reaping: DashMap<String, ()>,
    /// Set when a presence write failed or the lease was lost.
    resync_needed: AtomicBool,
    /// The last heartbeat succeeded. While it is false Redis is known to be
    /// unreachable and message-path commands fail at once as `unavailable`
    /// (never sent), instead of each waiting for its own failure.
    lease_ok: AtomicBool,
    /// Cancelled when another process took this instance id over (this one
    /// was paused past its lease): it must stop writing and shut down.
    taken_over: CancellationToken,
    /// Shared with the subscriber's push callback.
    signals: Arc<SubscriberSignals>,
    /// The last probe published on the personal channel came back.
    probe_ok: AtomicBool,
    /// Nonce of the last probe sent.
    probe_sent: AtomicU64,
    /// Every channel this instance subscribed, to re-issue SUBSCRIBE when a
    /// probe shows the subscriptions were lost without a disconnection, or
    /// when a slot moved (shared with the subscriber's push callback).
    subscriptions: Arc<DashMap<String, ()>>,
    /// The bus inbox, for telling the router that subscriptions are back
    /// after messages may have been lost.
    bus_inbox: BoundedSender<Inbound>,
    /// Recipients' presence as Redis last said, kept true by its
    /// invalidation pushes: the routing path's source (see `presence_cache`).
    presence_cache: Arc<PresenceCache>,
    adjust_presence: scripts::Lua,
    claim_lease: scripts::Lua,
    refresh_lease: scripts::Lua,
    release_lease: scripts::Lua,
    heartbeat_script: scripts::Lua,
    claim_dead: scripts::Lua,
    forget_dead: scripts::Lua,
    presence_scripts: scripts::PresenceScripts,
    store_limits: StoreLimits,
    store_scripts: store::StoreScripts,
    wait: Option<WaitReplicas>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// The three connections of one deployment.
struct Links {
    /// The message path.
    commands: MessageConn,
    /// Maintenance connections: a pool (one Redis) or a cluster connection.
    maintenance: Maintenance,
    /// The subscription connection.
    subscriber: Subscriber,
}

/// What the connections are opened with: shared with their push callbacks,
/// and kept so they can be opened again (a Sentinel failover).
#[derive(Clone)]
pub(crate) struct Wiring {
    pub(crate) keys: Keys,
    pub(crate) presence_cache: Arc<PresenceCache>,
    pub(crate) signals: Arc<SubscriberSignals>,
    pub(crate) subscriptions: Arc<DashMap<String, ()>>,
    pub(crate) inbox: BoundedSender<Inbound>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: RedisSettings,
}

/// A Sentinel-managed primary: the sentinels to ask, and the master in use.
struct SentinelWatch {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    /// `host:port` of the master the connections go to.
    current: Mutex<String>,
}

impl SentinelWatch {
    fn new(sentinels: &[String], service: &str) -> Result<SentinelWatch, RedisSetupError> {
        let client = redis::sentinel::SentinelClient::build(
            sentinels.to_vec(),
            service.to_owned(),
            None,
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(RedisSetupError::Url)?;
        Ok(SentinelWatch {
            client: tokio::sync::Mutex::new(client),
            current: Mutex::new(String::new()),
        })
    }

    /// The master the sentinels name now (checked with `ROLE` by the crate).
    async fn master(&self) -> redis::RedisResult<redis::ConnectionInfo> {
        let client = self.client.lock().await.async_get_client().await?;
        Ok(client.get_connection_info().clone())
    }

    fn set_current(&self, info: &redis::ConnectionInfo) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = info.addr().to_string();
    }

    fn is_current(&self, info: &redis::ConnectionInfo) -> bool {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current == info.addr().to_string()
    }
}

/// Where maintenance connections come from.
#[derive(Clone)]
enum Maintenance {
    Pool(deadpool_redis::Pool),
    Cluster(ClusterConnection),
}

/// The push callback of the message-path connection (on a cluster, of each
/// of its node connections): Redis's invalidations of the presence keys it
/// read (CLIENT TRACKING), and the loss of a connection (which loses those
/// too, so everything is dropped).
fn invalidation_pushes(
    cache: Arc<PresenceCache>,
) -> impl Fn(redis::PushInfo) -> Result<(), std::convert::Infallible> + Send + Sync + 'static {
    move |push: redis::PushInfo| {
        match push.kind {
            redis::PushKind::Invalidate => match push.data.first() {
                Some(redis::Value::Array(keys)) => {
                    for key in keys {
                        if let redis::Value::BulkString(key) = key {
                            if let Ok(key) = std::str::from_utf8(key) {
                                cache.invalidate(key);
                            }
                        }
                    }
                }
                // FLUSHALL / FLUSHDB: everything.
                _ => cache.clear(),
            },
            redis::PushKind::Disconnection => cache.clear(),
            _ => {}
        }
        Ok(())
    }
}

/// Classifies a failed command: `Unavailable` only when it surely was not
/// carried out (no connection could be made — the message path has no
/// client-side response timeout, so a timed-out I/O error is a connect
/// timeout — or Redis answered with an error); anything else (a connection
/// lost while the command was outstanding, an unreadable answer) may have
/// taken effect.
fn classify(error: RedisError) -> BackendError {
    let not_carried_out = error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(_)
                | ErrorKind::AuthenticationFailed
                | ErrorKind::InvalidClientConfig
                | ErrorKind::RESP3NotSupported
        );
    if not_carried_out {
        BackendError::Unavailable(Box::new(error))
    } else {
        BackendError::Timeout(Box::new(error))
    }
}

/// A failed maintenance command: its connection has a response timeout of
/// its own; maintenance retries by itself, so the distinction only serves logs.
fn maintenance_error(error: RedisError) -> BackendError {
    BackendError::Unavailable(Box::new(error))
}

fn pool_error(error: deadpool_redis::PoolError) -> BackendError {
    BackendError::Unavailable(Box::new(error))
}

impl RedisBackend {
    /// Connects the command connection, the maintenance pool and the
    /// subscriber; claims the instance id (waiting for a crashed previous
    /// holder's lease to expire); clears what a previous process with this id
    /// left behind; registers in the instance index.
    pub async fn connect(
        settings: RedisSettings,
        inbox: BoundedSender<Inbound>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RedisSetupError> {
        let wiring = Wiring {
            keys: Keys::new(&settings.prefix),
            presence_cache: Arc::new(PresenceCache::default()),
            signals: Arc::new(SubscriberSignals::default()),
            subscriptions: Arc::default(),
            inbox,
            metrics: metrics.clone(),
            settings: settings.clone(),
        };
        let (links, sentinel) = match &settings.target {
            RedisTarget::Single(url) => {
                let info = url
                    .as_str()
                    .into_connection_info()
                    .map_err(RedisSetupError::Url)?;
                (Self::connect_single(info, &wiring).await?, None)
            }
            RedisTarget::Cluster(seeds) => (Self::connect_cluster(seeds, &wiring).await?, None),
            RedisTarget::Sentinel { sentinels, service } => {
                let watch = SentinelWatch::new(sentinels, service)?;
                let info = watch
                    .master()
                    .await
                    .map_err(|source| RedisSetupError::Sentinel {
                        service: service.clone(),
                        sentinels: sentinels.join(","),
                        source,
                    })?;
                let links = Self::connect_single(info.clone(), &wiring).await?;
                watch.set_current(&info);
                (links, Some(watch))
            }
        };
        let backend = Arc::new(RedisBackend {
            links: RwLock::new(Arc::new(links)),
            sentinel,
            cluster: settings.target.is_cluster(),
            cluster_whole: AtomicBool::new(true),
            masters: Mutex::new(String::new()),
            keys: wiring.keys.clone(),
            instance: Arc::from(settings.instance.as_str()),
            token: format!("{:016x}.{}", rand::random::<u64>(), std::process::id()),
            lease: settings.lease,
            response_timeout: settings.response_timeout,
            metrics,
            live: RwLock::new(Arc::default()),
            desired: DashMap::new(),
            lingering: DashMap::new(),
            watching: DashMap::new(),
            watch_lock: tokio::sync::RwLock::new(()),
            memberships: DashMap::new(),
            lingering_members: DashMap::new(),
            user_locks: KeyedLocks::new(256),
            room_locks: KeyedLocks::new(256),
            reaping: DashMap::new(),
            resync_needed: AtomicBool::new(false),
            lease_ok: AtomicBool::new(false),
            taken_over: CancellationToken::new(),
            signals: wiring.signals.clone(),
            probe_ok: AtomicBool::new(true),
            probe_sent: AtomicU64::new(0),
            subscriptions: wiring.subscriptions.clone(),
            bus_inbox: wiring.inbox.clone(),
            presence_cache: wiring.presence_cache.clone(),
            adjust_presence: scripts::Lua::new(scripts::ADJUST_PRESENCE),
            claim_lease: scripts::Lua::new(scripts::CLAIM_LEASE),
            refresh_lease: scripts::Lua::new(scripts::REFRESH_LEASE),
            release_lease: scripts::Lua::new(scripts::RELEASE_LEASE),
            heartbeat_script: scripts::Lua::new(scripts::HEARTBEAT),
            claim_dead: scripts::Lua::new(scripts::CLAIM_DEAD),
            forget_dead: scripts::Lua::new(scripts::FORGET_DEAD),
            presence_scripts: scripts::PresenceScripts::default(),
            store_limits: settings.store,
            store_scripts: store::StoreScripts::default(),
            wait: settings.wait,
            wiring,
        });
        backend.claim_instance_id().await?;
        backend
            .write_local_truth()
            .await
            .map_err(|source| RedisSetupError::Startup {
                what: "clearing what a previous process with this id left",
                source,
            })?;
        backend
            .heartbeat()
            .await
            .map_err(|source| RedisSetupError::Startup {
                what: "first heartbeat",
                source,
            })?;
        Ok(backend)
    }

    /// One Redis: the command connection (with the presence cache's
    /// tracking pushes), the maintenance pool, the subscriber.
    async fn connect_single(
        info: redis::ConnectionInfo,
        wiring: &Wiring,
    ) -> Result<Links, RedisSetupError> {
        let settings = &wiring.settings;
        // RESP3, so the connection manager learns of a lost connection from
        // its disconnection push and reconnects at once: a command sent after
        // a crash then fails as refused (surely not carried out) rather than
        // on the dead connection (which cannot tell whether it was sent).
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.clone().set_redis_settings(resp3))
            .map_err(RedisSetupError::Url)?;

        // No retries: a command during an outage fails at once (refused) and
        // the next one tries again. No client-side response timeout: each
        // command is timed by the backend, which tells the two apart.
        let on_push = invalidation_pushes(wiring.presence_cache.clone());
        let commands_config = ConnectionManagerConfig::new()
            .set_push_sender(on_push)
            .set_number_of_retries(0)
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(None);
        let commands = ConnectionManager::new_with_config(client.clone(), commands_config)
            .await
            .map_err(|source| RedisSetupError::Connect {
                what: "command connection",
                source,
            })?;

        let pool_connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.response_timeout));
        let manager = deadpool_redis::Manager::new_with_config(info.clone(), pool_connection)
            .map_err(RedisSetupError::Url)?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(2)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .wait_timeout(Some(settings.connect_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.response_timeout))
            .build()
            .map_err(RedisSetupError::Pool)?;

        let subscriber = subscriber::connect(subscriber::Target::Single(&info), wiring).await?;
        Ok(Links {
            commands: MessageConn::Single(commands),
            maintenance: Maintenance::Pool(pool),
            subscriber,
        })
    }

    /// A Redis Cluster: three cluster connections (message path,
    /// maintenance, subscriber), each learning the topology from the seeds.
    async fn connect_cluster(seeds: &[String], wiring: &Wiring) -> Result<Links, RedisSetupError> {
        let settings = &wiring.settings;
        let bound = settings.connect_timeout.saturating_mul(3);
        // The message path retries a little (a redirection after a slot
        // moved is a retry); every command is still timed by the backend.
        let no_push: Option<fn(redis::PushInfo) -> Result<(), std::convert::Infallible>> = None;
        let commands = conn::cluster_client(
            seeds,
            settings.connect_timeout,
            settings.response_timeout,
            3,
            Some(invalidation_pushes(wiring.presence_cache.clone())),
        )?;
        let commands = conn::cluster_connect(&commands, "command connection", bound).await?;
        let maintenance = conn::cluster_client(
            seeds,
            settings.connect_timeout,
            settings.response_timeout,
            5,
            no_push,
        )?;
        let maintenance =
            conn::cluster_connect(&maintenance, "maintenance connection", bound).await?;
        let subscriber = subscriber::connect(subscriber::Target::Cluster(seeds), wiring).await?;
        Ok(Links {
            commands: MessageConn::Cluster(commands),
            maintenance: Maintenance::Cluster(maintenance),
            subscriber,
        })
    }

    /// Whether the instance can serve cross-instance traffic right now.
    pub fn is_ready(&self) -> bool {
        self.lease_ok.load(Ordering::Relaxed)
            && self.cluster_whole.load(Ordering::Relaxed)
            && self.signals.up.load(Ordering::Relaxed)
            && self.probe_ok.load(Ordering::Relaxed)
            && !self.taken_over.is_cancelled()
    }

    /// Cancelled when another process took this instance id over: the
    /// server must shut down (this process's presence is no longer its own).
    pub fn taken_over(&self) -> &CancellationToken {
        &self.taken_over
    }

    /// A handle on the message-path connection, if Redis is not known to be
    /// unreachable: while the heartbeat is failing, a command would only fail
    /// too, so it is not sent and the caller learns `unavailable` at once.
    /// On a cluster a failing heartbeat says only that the master of this
    /// instance's own slot is unreachable; DMs to users on the other masters
    /// still go, so commands are sent (one to a dead master fails by itself).
    fn message_path(&self) -> Result<MessageConn, BackendError> {
        if self.taken_over.is_cancelled() {
            return Err(BackendError::unavailable(
                "this instance id was taken over by another process",
            ));
        }
        if !self.cluster && !self.lease_ok.load(Ordering::Relaxed) {
            return Err(BackendError::unavailable(
                "redis is unreachable (the last heartbeat failed)",
            ));
        }
        Ok(self.links().commands.clone())
    }

    /// The connections in use now (replaced when Sentinel names a new master).
    fn links(&self) -> Arc<Links> {
        self.links
            .read()
            .map(|links| links.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Runs one message-path command under the response timeout, timing it.
    async fn timed<T>(
        &self,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackendError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.response_timeout, command).await;
        self.metrics
            .redis_latency
            .observe(started.elapsed().as_secs_f64());
        let result = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => classify(e),
            Err(elapsed) => BackendError::Timeout(Box::new(elapsed)),
        };
        if self.cluster && self.cluster_whole.load(Ordering::Relaxed) {
            // A master may be down: the heartbeat checks every master now,
            // rather than at its next period (then every 100-200 ms).
            self.signals.check_now.notify_one();
        }
        Err(result)
    }

    /// A maintenance connection from the pool.
    async fn maintenance(&self) -> Result<MaintenanceConn, BackendError> {
        match &self.links().maintenance {
            Maintenance::Pool(pool) => pool
                .get()
                .await
                .map(MaintenanceConn::Pooled)
                .map_err(pool_error),
            Maintenance::Cluster(conn) => Ok(MaintenanceConn::Cluster(conn.clone())),
        }
    }

    fn live_view(&self) -> Arc<LiveView> {
        self.live.read().map(|v| v.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_error_replies_are_unavailable_lost_connections_are_not() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!classify(refused).is_timeout());
        let connect_timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(!classify(connect_timeout).is_timeout());
        let reply = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "loading",
        ));
        assert!(!classify(reply).is_timeout());
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(classify(dropped).is_timeout());
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(classify(reset).is_timeout());
    }

    #[test]
    fn probes_are_not_envelopes() {
        assert!(switchboard_core::bus::Envelope::decode(b"P 12").is_none());
        assert!(switchboard_core::bus::Envelope::decode(b"P 12\n{}").is_none());
    }
}
