//! The Redis implementation of [`Presence`](crate::presence::Presence) and
//! [`Bus`](crate::bus::Bus): the only module that knows Redis commands, key
//! names and scripts.
//!
//! Two kinds of connection, never mixed:
//! - commands (presence reads and writes, PUBLISH, the lease) go through a
//!   long-lived multiplexed connection (a "lane") that deadpool creates and
//!   that is replaced only when it breaks;
//! - subscriptions live on one dedicated RESP3 connection (a redis
//!   `ConnectionManager` with a push sender and automatic resubscription),
//!   which reconnects by itself with capped, jittered exponential backoff and
//!   re-issues every SUBSCRIBE. Pushed messages go into the bounded bus inbox
//!   without blocking; a full inbox drops and counts.
//!
//! The maintenance loop refreshes this instance's lease every third of its
//! TTL, refreshes the view of live instances (one round trip, Redis's clock),
//! re-asserts this instance's presence after an outage or a lost lease, and
//! reaps instances whose lease expired (each exactly once, by an atomic claim).

mod bus;
pub mod keys;
mod presence;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use deadpool_redis::redis::{
    self,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection},
    IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value,
};
use deadpool_redis::{Pool, Runtime};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::bus::{ChannelKind, Inbound};
use crate::keyed_lock::KeyedLocks;
use crate::metrics::Metrics;
use keys::Keys;

/// Why the Redis backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL does not parse or names an unsupported scheme.
    #[error("invalid redis url: {0}")]
    Url(String),
    /// Redis did not answer at start-up.
    #[error("cannot reach redis: {0}")]
    Connect(String),
}

/// Settings of the Redis backend, taken from the instance's configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://`, `rediss://` or `redis+unix://` URL.
    pub url: String,
    /// Key and channel prefix.
    pub prefix: String,
    /// This instance's id.
    pub instance: String,
    /// Lease TTL.
    pub lease: Duration,
}

/// Lua: add `delta` to this instance's field of a presence hash, deleting the
/// field when it reaches zero. Atomic, so a late disconnect on one instance
/// never touches another instance's field.
const ADJUST_PRESENCE: &str = r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
return n
";

/// Lua: route a DM in one round trip. Reads the recipient's presence hash and
/// publishes the payload on the personal channel of every holder except the
/// caller and the instances it knows to be dead; returns `[instance,
/// receivers, ...]`. Only the presence key is touched (cluster-safe).
/// KEYS[1] = presence key; ARGV = self id, personal-channel prefix, payload,
/// dead instance ids...
const ROUTE_DIRECT: &str = r"
local fields = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #fields, 2 do
  local instance = fields[i]
  local skip = instance == ARGV[1] or tonumber(fields[i + 1]) <= 0
  for j = 4, #ARGV do
    if skip then break end
    skip = ARGV[j] == instance
  end
  if not skip then
    out[#out + 1] = instance
    out[#out + 1] = redis.call('PUBLISH', ARGV[2] .. instance, ARGV[3])
  end
end
return out
";

/// Lua: record this instance's lease expiry in the instance index using
/// Redis's own clock, and return that clock and the whole index.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
";

/// Lua: claim a dead instance for reaping. Only the caller that removes it
/// from the index gets 1, so each dead instance is reaped exactly once.
const CLAIM_DEAD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) < now then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
";

/// Prefix of a subscription probe on the personal channel: `P <nonce>`. Never
/// a valid envelope header, so a probe can never be taken for a message.
const PROBE_PREFIX: &[u8] = b"P ";

/// How many long-lived multiplexed command connections an instance keeps.
/// One is best measured (bench, 10k DMs/s, N=2 and 4): commands from every
/// task are pipelined on it, so Redis reads many per syscall; with 4 lanes
/// Redis spent ~20% more CPU per message and the instances ~15% more.
const COMMAND_LANES: usize = 1;

/// A command connection handed out by [`RedisBackend::conn`]. It forwards to
/// its multiplexed connection and, when a command fails because the
/// connection is gone, empties its slot so the next caller gets a new one.
struct Lane<'a> {
    conn: MultiplexedConnection,
    slot: &'a RwLock<Option<MultiplexedConnection>>,
}

impl Lane<'_> {
    fn check<T>(&self, result: &redis::RedisResult<T>) {
        if let Err(e) = result {
            if e.is_unrecoverable_error() || e.is_connection_dropped() {
                if let Ok(mut lane) = self.slot.write() {
                    *lane = None;
                }
            }
        }
    }
}

impl ConnectionLike for Lane<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.conn.req_packed_command(cmd).await;
            self.check(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.conn.req_packed_commands(pipeline, offset, count).await;
            self.check(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// What the subscriber's push callback tells the rest of the backend.
#[derive(Debug, Default)]
struct SubscriberSignals {
    /// The subscriber connection is up (cleared on a disconnection push).
    up: AtomicBool,
    /// Highest probe nonce that came back on the personal channel.
    probe_seen: AtomicU64,
    /// Woken when a probe comes back.
    probe_arrived: Notify,
    /// Woken when the subscriber reconnected: re-assert presence at once.
    restored: Notify,
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
    /// example one that started after the last refresh) are tried, and the
    /// PUBLISH receiver count decides.
    fn may_be_alive(&self, instance: &str) -> bool {
        self.instances.get(instance).copied().unwrap_or(true)
    }
}

/// Presence store and message bus over one Redis deployment.
pub struct RedisBackend {
    /// Creates command connections (see [`RedisBackend::conn`]).
    pool: Pool,
    /// Long-lived multiplexed command connections, used round-robin.
    lanes: Box<[RwLock<Option<MultiplexedConnection>>]>,
    next_lane: std::sync::atomic::AtomicUsize,
    subscriber: ConnectionManager,
    keys: Keys,
    instance: Arc<str>,
    lease: Duration,
    metrics: Arc<Metrics>,
    live: RwLock<Arc<LiveView>>,
    /// The local truth this instance re-asserts: user -> its connections here.
    desired: DashMap<String, u32>,
    /// Serializes this instance's presence writes for one user.
    user_locks: KeyedLocks,
    /// Set when a presence write failed or the lease was lost.
    resync_needed: AtomicBool,
    /// The last heartbeat succeeded.
    lease_ok: AtomicBool,
    /// A heartbeat has run once: from then on a missing lease means it was lost.
    registered: AtomicBool,
    /// Shared with the subscriber's push callback.
    signals: Arc<SubscriberSignals>,
    /// The last probe published on the personal channel came back.
    probe_ok: AtomicBool,
    /// Nonce of the last probe sent.
    probe_sent: AtomicU64,
    /// Every channel this instance subscribed, to re-issue SUBSCRIBE when a
    /// probe shows the subscriptions were lost without a disconnection.
    subscriptions: DashMap<String, ()>,
    adjust_presence: redis::Script,
    heartbeat_script: redis::Script,
    route_direct: redis::Script,
    /// `PREFIX:inst:`, the personal channel prefix the routing script appends ids to.
    personal_prefix: String,
    claim_dead: redis::Script,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// Maps a pushed channel name to the kind of channel it is.
#[derive(Debug)]
struct ChannelClassifier {
    personal: Vec<u8>,
    all: Vec<u8>,
    room_prefix: Vec<u8>,
    user_prefix: Vec<u8>,
}

impl ChannelClassifier {
    fn kind(&self, channel: &[u8]) -> Option<ChannelKind> {
        if channel == self.personal.as_slice() {
            Some(ChannelKind::Personal)
        } else if channel.starts_with(&self.room_prefix) {
            Some(ChannelKind::Room)
        } else if channel.starts_with(&self.user_prefix) {
            Some(ChannelKind::User)
        } else if channel == self.all.as_slice() {
            Some(ChannelKind::Broadcast)
        } else {
            None
        }
    }
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

impl RedisBackend {
    /// Connects the command pool and the subscriber, registers the lease and
    /// subscribes this instance's personal channel (and the broadcast channel).
    pub async fn connect(
        settings: RedisSettings,
        inbox: mpsc::Sender<Inbound>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RedisSetupError> {
        let keys = Keys::new(&settings.prefix);
        let info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| RedisSetupError::Url(e.to_string()))?;

        let mut pool_config = deadpool_redis::Config::from_connection_info(info.clone());
        let mut pool_settings = deadpool_redis::PoolConfig::new(COMMAND_LANES * 2);
        pool_settings.timeouts.wait = Some(Duration::from_secs(2));
        pool_settings.timeouts.create = Some(Duration::from_secs(2));
        pool_settings.timeouts.recycle = Some(Duration::from_secs(2));
        pool_config.pool = Some(pool_settings);
        let pool = pool_config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| RedisSetupError::Connect(e.to_string()))?;

        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(resp3))
            .map_err(|e| RedisSetupError::Url(e.to_string()))?;
        let signals = Arc::new(SubscriberSignals::default());
        signals.up.store(true, Ordering::Relaxed);
        let classifier = ChannelClassifier {
            personal: keys.personal_channel(&settings.instance).into_bytes(),
            all: keys.all_channel().into_bytes(),
            room_prefix: keys.room_channel_prefix().as_bytes().to_vec(),
            user_prefix: keys.user_channel_prefix().into_bytes(),
        };
        let push_metrics = metrics.clone();
        let push_signals = signals.clone();
        let on_push = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            match push.kind {
                PushKind::Message => {
                    let (Some(channel), Some(payload)) = (
                        push.data.first().and_then(bytes_of),
                        push.data.get(1).and_then(bytes_of),
                    ) else {
                        return Ok(());
                    };
                    let Some(kind) = classifier.kind(channel) else {
                        return Ok(());
                    };
                    if kind == ChannelKind::Personal {
                        if let Some(nonce) = payload.strip_prefix(PROBE_PREFIX) {
                            let nonce =
                                std::str::from_utf8(nonce).ok().and_then(|n| n.parse().ok());
                            push_signals
                                .probe_seen
                                .fetch_max(nonce.unwrap_or(0), Ordering::Relaxed);
                            push_signals.probe_arrived.notify_waiters();
                            return Ok(());
                        }
                    }
                    let inbound = Inbound {
                        kind,
                        payload: payload.to_vec(),
                    };
                    if inbox.try_send(inbound).is_err() {
                        push_metrics.dropped_bus_inbox_full.inc();
                    }
                }
                PushKind::Disconnection => {
                    push_signals.up.store(false, Ordering::Relaxed);
                    tracing::warn!("redis subscriber connection lost; reconnecting");
                }
                PushKind::Subscribe if !push_signals.up.swap(true, Ordering::Relaxed) => {
                    tracing::info!("redis subscriber connection restored");
                    push_signals.restored.notify_one();
                }
                _ => {}
            }
            Ok(())
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_push_sender(on_push)
            .set_automatic_resubscription()
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_number_of_retries(usize::MAX)
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let subscriber = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, manager_config),
        )
        .await
        .map_err(|_| RedisSetupError::Connect("timed out connecting the subscriber".into()))?
        .map_err(|e| RedisSetupError::Connect(e.to_string()))?;

        let personal_prefix = keys.personal_channel("");
        let backend = Arc::new(RedisBackend {
            pool,
            lanes: (0..COMMAND_LANES).map(|_| RwLock::new(None)).collect(),
            next_lane: Default::default(),
            subscriber,
            keys,
            instance: Arc::from(settings.instance.as_str()),
            lease: settings.lease,
            metrics,
            live: RwLock::new(Arc::default()),
            desired: DashMap::new(),
            user_locks: KeyedLocks::new(256),
            resync_needed: AtomicBool::new(false),
            lease_ok: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            signals,
            probe_ok: AtomicBool::new(true),
            probe_sent: AtomicU64::new(0),
            subscriptions: DashMap::new(),
            adjust_presence: redis::Script::new(ADJUST_PRESENCE),
            heartbeat_script: redis::Script::new(HEARTBEAT),
            route_direct: redis::Script::new(ROUTE_DIRECT),
            personal_prefix,
            claim_dead: redis::Script::new(CLAIM_DEAD),
        });
        backend
            .heartbeat()
            .await
            .map_err(|e| RedisSetupError::Connect(e.to_string()))?;
        Ok(backend)
    }

    /// Whether the instance can serve cross-instance traffic right now.
    pub fn is_ready(&self) -> bool {
        self.lease_ok.load(Ordering::Relaxed)
            && self.signals.up.load(Ordering::Relaxed)
            && self.probe_ok.load(Ordering::Relaxed)
    }

    /// A command connection: one of a few long-lived multiplexed lanes, used
    /// by many tasks at once. deadpool creates (and health-checks) the
    /// connections; a lane goes back to the pool for a new one only when a
    /// command on it fails with a connection-level error. Checking a
    /// connection out per command would cost a `PING` round trip each time
    /// (deadpool-redis's recycle check), doubling Redis traffic per message.
    async fn conn(&self) -> redis::RedisResult<Lane<'_>> {
        let index = self.next_lane.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let slot = &self.lanes[index];
        if let Some(conn) = slot.read().ok().and_then(|lane| lane.clone()) {
            return Ok(Lane { conn, slot });
        }
        let pooled = self.pool.get().await.map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Io, "redis pool", e.to_string()))
        })?;
        let conn = deadpool_redis::Connection::take(pooled);
        if let Ok(mut lane) = slot.write() {
            *lane = Some(conn.clone());
        }
        Ok(Lane { conn, slot })
    }

    fn live_view(&self) -> Arc<LiveView> {
        self.live.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Refreshes the lease and the live view; re-asserts presence when the
    /// lease had been lost (Redis restarted empty, or this process was paused
    /// past its TTL and reaped) or a write failed meanwhile.
    async fn heartbeat(&self) -> redis::RedisResult<Vec<String>> {
        let mut conn = self.conn().await?;
        let lease_ms = self.lease.as_millis() as u64;
        let existed: Option<String> = redis::cmd("SET")
            .arg(self.keys.lease(&self.instance))
            .arg(&*self.instance)
            .arg("PX")
            .arg(lease_ms)
            .arg("GET")
            .query_async(&mut conn)
            .await?;
        let (now, index): (i64, Vec<(String, i64)>) = self
            .heartbeat_script
            .key(self.keys.instances())
            .arg(&*self.instance)
            .arg(lease_ms)
            .invoke_async(&mut conn)
            .await?;
        drop(conn);
        let mut dead = Vec::new();
        let mut view = LiveView::default();
        for (instance, expiry) in index {
            let alive = expiry >= now;
            if !alive {
                dead.push(instance.clone());
            }
            if !alive {
                view.dead.push(instance.clone());
            }
            view.instances.insert(instance, alive);
        }
        if let Ok(mut live) = self.live.write() {
            *live = Arc::new(view);
        }
        // The very first heartbeat of a process finds no lease: that is not a loss.
        let lost = existed.is_none() && self.registered.swap(true, Ordering::Relaxed);
        if lost || self.resync_needed.swap(false, Ordering::Relaxed) {
            if lost {
                tracing::info!("lease was absent; re-asserting this instance's presence");
            }
            if let Err(e) = self.resync().await {
                self.resync_needed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        self.lease_ok.store(true, Ordering::Relaxed);
        Ok(dead)
    }

    /// Writes the local truth over this instance's presence fields and users
    /// set: absolute counts for every local user, and removal of users the set
    /// still lists but that have no connection here any more.
    async fn resync(&self) -> redis::RedisResult<()> {
        self.metrics.presence_resyncs.inc();
        let users_key = self.keys.instance_users(&self.instance);
        let listed: Vec<String> = {
            let mut conn = self.conn().await?;
            redis::cmd("SMEMBERS")
                .arg(&users_key)
                .query_async(&mut conn)
                .await?
        };
        let mut users: Vec<String> = self.desired.iter().map(|e| e.key().clone()).collect();
        users.extend(listed);
        users.sort_unstable();
        users.dedup();
        for user in users {
            let _guard = self.user_locks.lock(&user).await;
            let count = self.desired.get(&user).map(|c| *c).unwrap_or(0);
            let mut pipe = redis::pipe();
            if count > 0 {
                pipe.cmd("SADD").arg(&users_key).arg(&user).ignore();
                pipe.cmd("HSET")
                    .arg(self.keys.presence(&user))
                    .arg(&*self.instance)
                    .arg(count)
                    .ignore();
            } else {
                pipe.cmd("HDEL")
                    .arg(self.keys.presence(&user))
                    .arg(&*self.instance)
                    .ignore();
                pipe.cmd("SREM").arg(&users_key).arg(&user).ignore();
            }
            let mut conn = self.conn().await?;
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    /// Removes the presence entries of an instance whose lease expired, if
    /// this instance wins the claim on it.
    async fn reap(&self, dead: &str) -> redis::RedisResult<bool> {
        let mut conn = self.conn().await?;
        let claimed: i64 = self
            .claim_dead
            .key(self.keys.instances())
            .arg(dead)
            .invoke_async(&mut conn)
            .await?;
        if claimed != 1 {
            return Ok(false);
        }
        let users_key = self.keys.instance_users(dead);
        let users: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&users_key)
            .query_async(&mut conn)
            .await?;
        for chunk in users.chunks(500) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.cmd("HDEL")
                    .arg(self.keys.presence(user))
                    .arg(dead)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        redis::pipe()
            .cmd("DEL")
            .arg(&users_key)
            .ignore()
            .cmd("DEL")
            .arg(self.keys.lease(dead))
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        self.metrics.reaped_instances.inc();
        tracing::info!(
            instance = dead,
            users = users.len(),
            "reaped a dead instance"
        );
        Ok(true)
    }

    /// Runs until `shutdown`: lease refresh, live view, resync, reaping and
    /// the subscription probe, every third of the lease. After a failure it
    /// retries sooner (capped exponential backoff with jitter), and the moment
    /// the subscriber reconnects it runs at once, so presence is re-asserted
    /// within a second or so of Redis coming back.
    pub async fn run_maintenance(self: Arc<Self>, shutdown: CancellationToken) {
        let period = self.lease / 3;
        let mut failures: u32 = 0;
        let mut wait = period;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.signals.restored.notified() => {}
            }
            match self.heartbeat().await {
                Ok(dead) => {
                    if failures > 0 {
                        tracing::info!("redis heartbeat restored; ready");
                    }
                    failures = 0;
                    wait = period;
                    for instance in dead {
                        if let Err(e) = self.reap(&instance).await {
                            tracing::warn!(error = %e, instance, "reaping failed; will retry");
                        }
                    }
                    self.probe(period).await;
                }
                Err(e) => {
                    if self.lease_ok.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "redis heartbeat failed; not ready");
                    }
                    self.resync_needed.store(true, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    wait = retry_delay(failures, period);
                }
            }
        }
    }

    /// Publishes a probe on this instance's own personal channel and waits
    /// for it to come back through the subscriber. Subscriptions can be lost
    /// while every health check stays green (a failover, a proxy); a probe
    /// that does not return marks the instance not ready and re-issues every
    /// SUBSCRIBE.
    async fn probe(&self, period: Duration) {
        let nonce = self.probe_sent.fetch_add(1, Ordering::Relaxed) + 1;
        let arrived = self.signals.probe_arrived.notified();
        let published: redis::RedisResult<usize> = async {
            let mut conn = self.conn().await?;
            redis::cmd("PUBLISH")
                .arg(self.keys.personal_channel(&self.instance))
                .arg(format!("P {nonce}"))
                .query_async(&mut conn)
                .await
        }
        .await;
        let returned = match published {
            Err(_) => return, // Redis itself is failing: the heartbeat reports it.
            Ok(0) => false,   // Nobody listens on our personal channel.
            Ok(_) => {
                let deadline = period.min(Duration::from_secs(1));
                let seen = || self.signals.probe_seen.load(Ordering::Relaxed) >= nonce;
                tokio::pin!(arrived);
                let _ = tokio::time::timeout(deadline, async {
                    while !seen() {
                        arrived.as_mut().await;
                        arrived.set(self.signals.probe_arrived.notified());
                    }
                })
                .await;
                seen()
            }
        };
        if returned {
            if !self.probe_ok.swap(true, Ordering::Relaxed) {
                tracing::info!("subscription probe returned; ready");
            }
            return;
        }
        self.probe_ok.store(false, Ordering::Relaxed);
        self.metrics.probe_failures.inc();
        tracing::warn!("subscription probe did not return; not ready, resubscribing");
        self.resubscribe_all().await;
    }

    /// Re-issues SUBSCRIBE for every channel this instance should hold.
    async fn resubscribe_all(&self) {
        let channels: Vec<String> = self.subscriptions.iter().map(|e| e.key().clone()).collect();
        let mut subscriber = self.subscriber.clone();
        for channel in channels {
            if let Err(e) = subscriber.subscribe(&channel).await {
                tracing::warn!(error = %e, channel, "resubscribe failed");
                return;
            }
        }
    }

    fn observe(&self, started: Instant) {
        self.metrics
            .redis_latency
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Delay before the next heartbeat after `failures` failures in a row: 100 ms
/// doubling, capped at one second (and at the normal period), with full jitter
/// so instances do not reconnect in lockstep.
fn retry_delay(failures: u32, period: Duration) -> Duration {
    let cap = period.min(Duration::from_secs(1));
    let exp = Duration::from_millis(100).saturating_mul(1 << failures.min(10));
    let ceiling = exp.min(cap).as_millis() as u64;
    Duration::from_millis(rand::random_range(ceiling / 2..=ceiling.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_is_capped_and_jittered() {
        let period = Duration::from_secs(3);
        for failures in 1..40 {
            let d = retry_delay(failures, period);
            assert!(d <= Duration::from_secs(1), "{d:?}");
            assert!(d >= Duration::from_millis(50), "{d:?}");
        }
        assert!(retry_delay(1, Duration::from_millis(100)) <= Duration::from_millis(100));
    }

    #[test]
    fn probes_are_not_envelopes() {
        assert!(crate::bus::Envelope::decode(b"P 12").is_none());
        assert!(crate::bus::Envelope::decode(b"P 12\n{}").is_none());
    }
}
