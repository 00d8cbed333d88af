//! The router: where a direct message or a room message goes. The heart of
//! Switchboard.
//!
//! It decides, it does not do I/O of its own: it reads and writes presence
//! through the [`Presence`] trait, publishes, subscribes and routes through
//! the [`Bus`] trait, and hands frames to local connections through the
//! [`Registry`]. It never sees a socket or a Redis command (this crate cannot
//! name either), which is why the same code runs over Redis and over the
//! in-process backend, and is tested against both.
//!
//! A message is serialized once, by the instance that accepted it; every
//! recipient connection, local or remote, receives those same bytes.
//!
//! Delivery of what arrives from the bus ([`Router::handle_inbound`]) never
//! awaits anything: a DM that must be re-routed is handed to a bounded queue
//! drained by a separate worker, so a slow backend cannot hold up delivery of
//! unrelated messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::bus::{
    Bus, Channel, ChannelKind, ControlAction, Covered, DirectRoute, Envelope, Inbound, Reached,
};
use crate::error::BackendError;
use crate::keyed_lock::KeyedLocks;
use crate::metrics::{Metrics, SendOutcomes};
use crate::presence::{Announced, Holder, Presence};
use crate::protocol::{DirectStatus, DmOptions, RoomStatus, ServerFrame, TextFrame};
use crate::queue::{bounded, BoundedReceiver, BoundedSender, Refused, Weighed};
use crate::registry::{ConnHandle, Registry, ReplayEnd, RoomChange};
use crate::store::{
    Append, Backlog, Fanout, RoomAppend, RoomBacklog, Seq, Store, DM_HEAD, ROOM_HEAD,
};
use crate::watch::Watches;

/// DMs waiting to be re-routed, at most (and [`REROUTE_QUEUE_BYTES`]).
mod events;

pub use events::{PresenceSettings, WatchError};

const REROUTE_QUEUE_ITEMS: usize = 4096;
/// Bytes of DMs waiting to be re-routed, at most.
const REROUTE_QUEUE_BYTES: usize = 16 << 20;
/// Re-routes in flight at once (each is one backend round trip).
const REROUTE_CONCURRENCY: usize = 32;

/// Inbox entries read per round trip of a replay.
pub const REPLAY_PAGE: usize = 256;

/// Where [`Router::replay_inbox`] starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStart {
    /// A new connection: after `since`, or after the user's cursor; the
    /// first read marks the user seen.
    Connect(Option<Seq>),
    /// A live connection repairing a hole: after the newest stored DM it
    /// has.
    Repair(Seq),
}

/// How a direct message reaches the instance that holds its recipient.
/// Also the benchmark's vocabulary (`switchboard-bench --modes`), which
/// serializes it by its configuration name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingMode {
    /// Read the recipient's presence, publish only to the instances holding it.
    Routed,
    /// Baseline: publish every DM on one channel every instance subscribes to.
    Broadcast,
    /// The Centrifugo / SignalR design: an instance subscribes to a channel per
    /// user it holds; a DM is one publish to the recipient's channel.
    UserChannel,
}

impl RoutingMode {
    /// Every mode, by its configuration name.
    pub const ALL: [RoutingMode; 3] = [
        RoutingMode::Routed,
        RoutingMode::Broadcast,
        RoutingMode::UserChannel,
    ];

    /// The configuration name (`routed`, `broadcast`, `user-channel`).
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Routed => "routed",
            RoutingMode::Broadcast => "broadcast",
            RoutingMode::UserChannel => "user-channel",
        }
    }
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RoutingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RoutingMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| format!("unknown routing mode {s:?}"))
    }
}

/// Why a request could not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The shared backend could not be reached: the message reached nobody.
    #[error("the message bus or presence store is unavailable; nothing was delivered")]
    Unavailable,
    /// The shared backend did not answer in time: the message may have been
    /// delivered.
    #[error("the message bus did not answer in time; the message may have been delivered")]
    Timeout,
    /// A room message from a connection that has not joined the room.
    #[error("not a member of this room")]
    NotMember,
}

impl From<&BackendError> for RouteError {
    fn from(e: &BackendError) -> Self {
        match e {
            BackendError::Unavailable(_) => RouteError::Unavailable,
            BackendError::Timeout(_) => RouteError::Timeout,
        }
    }
}

/// What happened to a direct message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectOutcome {
    /// `routed`, `offline` or `partial`.
    pub status: DirectStatus,
    /// The message's id, as its recipients see it.
    pub msg_id: String,
}

/// What happened to a DM sent through the inbox (v1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmOutcome {
    /// `routed`, `offline` or `partial`.
    pub status: DirectStatus,
    /// The message's id, as its recipients see it (the first send's, for
    /// an idempotent retry).
    pub msg_id: String,
    /// Its inbox position, when stored.
    pub seq: Option<Seq>,
    /// Whether it is in the recipient's inbox.
    pub stored: bool,
}

/// What happened to a room message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomOutcome {
    /// `ok` or `partial`.
    pub status: RoomStatus,
    /// The message's id, as its recipients see it.
    pub msg_id: String,
}

/// A DM that reached an instance no longer holding its recipient, waiting
/// for the worker that routes it once more.
#[derive(Debug)]
struct RerouteJob {
    to: String,
    origin: String,
    covered: String,
    frame: Bytes,
}

impl Weighed for RerouteJob {
    fn weight(&self) -> usize {
        self.frame.len() + self.to.len() + self.origin.len() + self.covered.len()
    }
}

/// What a server-API command ([`Router::disconnect_user`],
/// [`Router::kick`]) reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlOutcome {
    /// Instances that had connections of the user (this one included) and
    /// were told.
    pub instances: usize,
}

/// Routes messages for one instance.
pub struct Router {
    /// This instance's id: its presence field and personal channel.
    instance: Arc<str>,
    /// Routed (presence) or one of the baselines.
    mode: RoutingMode,
    presence: Arc<dyn Presence>,
    bus: Arc<dyn Bus>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Serializes join/leave of one room with its (un)subscription, so the
    /// subscription always matches "has a local member".
    room_locks: Arc<KeyedLocks>,
    /// Same for a user's first connect / last disconnect in user-channel mode.
    user_locks: KeyedLocks,
    /// Source of unique message ids (with the instance id as prefix).
    next_msg: AtomicU64,
    /// Where [`Router::handle_inbound`] leaves DMs to re-route.
    reroutes: BoundedSender<RerouteJob>,
    /// The other end, taken by [`Router::start`] for the worker.
    reroute_queue: Mutex<Option<BoundedReceiver<RerouteJob>>>,
    /// The inbox store; without one every DM is ephemeral (protocol v1).
    store: Option<Arc<dyn Store>>,
    /// Which local connections watch whom; member states of local rooms.
    watches: Arc<Watches>,
    /// Serializes a user's first local watch and last unwatch with the
    /// backend's registration, so they reach it in order.
    watch_locks: KeyedLocks,
    /// Graces running, and what ending one needs.
    graces: events::Graces,
    presence_settings: PresenceSettings,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("instance", &self.instance)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Router {
    /// A router for `instance` over the given presence store and bus.
    pub fn new(
        instance: &str,
        mode: RoutingMode,
        presence: Arc<dyn Presence>,
        bus: Arc<dyn Bus>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (reroutes, reroute_queue) = bounded(REROUTE_QUEUE_ITEMS, REROUTE_QUEUE_BYTES);
        Router {
            instance: Arc::from(instance),
            mode,
            presence: presence.clone(),
            bus,
            registry: registry.clone(),
            metrics,
            room_locks: Arc::new(KeyedLocks::new(256)),
            user_locks: KeyedLocks::new(256),
            next_msg: AtomicU64::new(0),
            reroutes,
            reroute_queue: Mutex::new(Some(reroute_queue)),
            store: None,
            watches: Arc::default(),
            watch_locks: KeyedLocks::new(256),
            graces: events::Graces {
                presence: presence.clone(),
                registry: registry.clone(),
                pending: Arc::default(),
                grace: PresenceSettings::default().grace,
            },
            presence_settings: PresenceSettings::default(),
        }
    }

    /// Sets the grace, the member listing limit and the reconciliation
    /// delay (the defaults are the flags' defaults).
    pub fn with_presence_settings(mut self, settings: PresenceSettings) -> Self {
        self.presence_settings = settings;
        self.graces.grace = settings.grace;
        self
    }

    /// Stores DMs in their recipients' inboxes through `store` (protocol
    /// v1.1). The server always does; router tests run with and without.
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Whether DMs are stored (an inbox replay on connect makes sense).
    pub fn stores(&self) -> bool {
        self.store.is_some()
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The routing mode.
    pub fn mode(&self) -> RoutingMode {
        self.mode
    }

    /// The local connections.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The presence store (the server withdraws it at shutdown).
    pub fn presence(&self) -> &Arc<dyn Presence> {
        &self.presence
    }

    /// Subscribes the channels every instance needs before it serves clients,
    /// and starts the re-route worker (it runs until the router is dropped).
    /// The personal channel is subscribed in every mode: re-routed DMs and
    /// server-side publishes use it.
    pub async fn start(&self) -> Result<(), BackendError> {
        self.bus
            .subscribe(Channel::Instance(&self.instance))
            .await?;
        if self.mode == RoutingMode::Broadcast {
            self.bus.subscribe(Channel::All).await?;
        }
        let queue = self.reroute_queue.lock().ok().and_then(|mut q| q.take());
        if let Some(queue) = queue {
            tokio::spawn(reroute_worker(
                self.bus.clone(),
                self.metrics.clone(),
                self.instance.clone(),
                queue,
            ));
        }
        Ok(())
    }

    /// Registers a new local connection and its user's presence.
    pub async fn connect(&self, conn: &Arc<ConnHandle>) {
        if self.mode == RoutingMode::UserChannel {
            let _guard = self.user_locks.lock(&conn.user).await;
            if self.registry.insert(conn) == 1 {
                if let Err(e) = self.bus.subscribe(Channel::User(&conn.user)).await {
                    tracing::warn!(error = %e, "user channel subscribe failed");
                }
            }
        } else {
            self.registry.insert(conn);
        }
        self.metrics.connections.inc();
        if let Err(e) = self.presence.connect(&conn.user).await {
            self.metrics.presence_write_failures.inc();
            tracing::warn!(error = %e, "presence write failed on connect; will re-assert when the store is back");
        }
    }

    /// Removes a local connection: leaves its rooms, drops its presence.
    pub async fn disconnect(&self, conn: &Arc<ConnHandle>) {
        self.end_watches(conn).await;
        for room in conn.rooms() {
            self.leave(conn, &room).await;
        }
        let left = if self.mode == RoutingMode::UserChannel {
            let _guard = self.user_locks.lock(&conn.user).await;
            let left = self.registry.remove(conn);
            if left == 0 {
                if let Err(e) = self.bus.unsubscribe(Channel::User(&conn.user)).await {
                    tracing::warn!(error = %e, "user channel unsubscribe failed");
                }
            }
            left
        } else {
            self.registry.remove(conn)
        };
        self.metrics.connections.dec();
        if let Err(e) = self.presence.disconnect(&conn.user).await {
            self.metrics.presence_write_failures.inc();
            tracing::warn!(error = %e, "presence write failed on disconnect; will re-assert when the store is back");
        }
        if left == 0 {
            self.user_gone_later(&conn.user);
        }
    }

    fn new_msg_id(&self) -> String {
        let n = self.next_msg.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.instance)
    }

    /// Sends a DM the v1.1 way: stored in `to`'s inbox and published with
    /// its seq in one step (see [`Store::append`]), unless it is ephemeral
    /// (`store: false`) or there is no store, when it is
    /// [`Router::send_direct`]. Nothing is delivered before the store has
    /// it, so a failure reaches nobody and is safe to retry (with its key).
    pub async fn send_dm(
        &self,
        from: &str,
        to: &str,
        body: &RawValue,
        options: &DmOptions,
    ) -> Result<DmOutcome, RouteError> {
        let store = match &self.store {
            Some(store) if options.store => store,
            _ => {
                let outcome = self.send_direct(from, to, body).await?;
                return Ok(DmOutcome {
                    status: outcome.status,
                    msg_id: outcome.msg_id,
                    seq: None,
                    stored: false,
                });
            }
        };
        let msg_id = self.new_msg_id();
        let text = ServerFrame::Dm {
            from,
            body,
            msg_id: &msg_id,
            ts: now_ms(),
        }
        .to_text();
        // Serialized with the tag first: the tail is what follows it.
        let tail = text.strip_prefix(DM_HEAD).unwrap_or(&text);
        let fanout = match self.mode {
            RoutingMode::Routed => Fanout::Holders,
            RoutingMode::Broadcast => Fanout::Channel(Channel::All),
            RoutingMode::UserChannel => Fanout::Channel(Channel::User(to)),
        };
        let appended = store
            .append(&Append {
                to,
                from,
                origin: &self.instance,
                msg_id: &msg_id,
                key: options.key.as_deref(),
                receipt: options.receipt,
                tail,
                fanout,
            })
            .await;
        let appended = match appended {
            Ok(appended) => appended,
            Err(e) => {
                // Nothing was delivered yet: never `partial`.
                tracing::debug!(error = %e, "storing a DM failed");
                return Err(refusal(&self.metrics.dm_failed, &e));
            }
        };
        if appended.duplicate {
            self.metrics.inbox_duplicate_sends.inc();
        } else if appended.seq.is_some() {
            self.metrics.inbox_stored.inc();
        } else {
            self.metrics.inbox_refused_unknown.inc();
        }
        if !appended.duplicate {
            self.count_reached(&appended.reached);
            match fanout {
                Fanout::Holders => 0,
                Fanout::Channel(Channel::All) => self.metrics.bus_published.broadcast.inc(),
                Fanout::Channel(_) => self.metrics.bus_published.user.inc(),
            };
        }
        let status = if appended.reached_any {
            self.metrics.dm_routed.inc();
            DirectStatus::Routed
        } else {
            self.metrics.dm_offline.inc();
            DirectStatus::Offline
        };
        Ok(DmOutcome {
            status,
            msg_id: appended.msg_id,
            seq: appended.seq,
            stored: appended.seq.is_some(),
        })
    }

    /// Reads a page of `user`'s inbox after `after` (or after their cursor).
    /// `open` marks the user seen: the first read of a new connection.
    pub async fn read_inbox(
        &self,
        user: &str,
        after: Option<Seq>,
        limit: usize,
        open: bool,
    ) -> Result<Backlog, RouteError> {
        let Some(store) = &self.store else {
            return Ok(Backlog::default());
        };
        store
            .read(user, after, limit, open)
            .await
            .map_err(|e| RouteError::from(&e))
    }

    /// Replays `conn`'s inbox: the entries after where `start` says, in
    /// seq order, paced by the connection's queue (not limited by it), then
    /// the live stored DMs held meanwhile, then goes live. Each stored DM is
    /// queued once, in seq order (see the gate in `registry`); entries that
    /// retention dropped are announced with a `gap` frame. The connection
    /// must be replaying ([`ConnHandle::begin_replay`] at connect, or a
    /// repair its gate asked for). Stops early, `Ok`, if the connection
    /// closes; an error if the inbox could not be read.
    pub async fn replay_inbox(
        &self,
        conn: &ConnHandle,
        start: ReplayStart,
    ) -> Result<(), RouteError> {
        let metrics = &self.metrics;
        let (mut after, mut open) = match start {
            ReplayStart::Connect(since) => (since, true),
            ReplayStart::Repair(after) => (Some(after), false),
        };
        loop {
            let page = self
                .read_inbox(&conn.user, after, REPLAY_PAGE, open)
                .await?;
            open = false;
            conn.replay_from(page.after);
            if page.gap {
                metrics.inbox_gaps.inc();
                let gap = ServerFrame::Gap {
                    after: page.after,
                    first: page.entries.first().map(|(seq, _)| *seq),
                };
                if !conn.send_paced(gap.to_frame(), metrics).await {
                    return Ok(());
                }
            }
            let more = page.entries.len() >= REPLAY_PAGE;
            let mut last = page.after;
            for (seq, frame) in page.entries {
                last = seq;
                if conn.replay_accepts(seq) {
                    if !conn.send_paced(frame, metrics).await {
                        return Ok(());
                    }
                    metrics.inbox_replayed.inc();
                    metrics.delivered.inc();
                }
            }
            after = Some(last);
            if more {
                continue;
            }
            if !conn.wait_for_room().await {
                return Ok(());
            }
            match conn.finish_replay(page.newest, metrics) {
                ReplayEnd::Live => return Ok(()),
                ReplayEnd::ReadAgainAfter(seq) => after = Some(seq),
            }
        }
    }

    /// Runs the repair `conn`'s gate asked for, if one is pending (see
    /// [`ConnHandle::repair_wanted`]): reads the inbox after the newest
    /// stored DM the connection has and finishes the replay, which queues
    /// the held DMs behind what was read. Returns whether one ran. An error
    /// means the inbox could not be read: the gate stays replaying (live
    /// DMs held) and the caller tries again later (see
    /// [`ConnHandle::rearm_repair`]), closing the connection only if the
    /// inbox stays unreadable.
    pub async fn repair_inbox(&self, conn: &ConnHandle) -> Result<bool, RouteError> {
        let Some(after) = conn.take_repair() else {
            return Ok(false);
        };
        self.metrics.inbox_repairs.inc();
        self.replay_inbox(conn, ReplayStart::Repair(after)).await?;
        Ok(true)
    }

    /// `recv`: moves `user`'s cursor to `seq` and sends the receipts the
    /// acknowledged DMs asked for to their senders (ephemeral, routed like
    /// a DM).
    pub async fn ack_inbox(&self, user: &str, seq: Seq) -> Result<(), RouteError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let receipts = store
            .ack(user, seq)
            .await
            .map_err(|e| RouteError::from(&e))?;
        for receipt in receipts {
            let frame = ServerFrame::Delivered {
                msg_id: &receipt.msg_id,
                to: user,
                seq: receipt.seq,
            }
            .to_frame();
            // A receipt that cannot be routed now is not retried: the
            // sender can ask presence or wait for the next one.
            if self.send_frame(&receipt.sender, &frame).await.is_ok() {
                self.metrics.receipts.inc();
            }
        }
        Ok(())
    }

    /// Sends a direct message from `from` to every connection of `to`.
    ///
    /// Local connections get it at once, whatever the mode. Routed mode: one
    /// routing operation publishes it to the other instances holding `to`
    /// (presence read and publishes in one step). Broadcast mode: one publish
    /// on the shared channel. User-channel mode: one publish on `to`'s
    /// channel. `from` is the authenticated user, or a backend service's label.
    pub async fn send_direct(
        &self,
        from: &str,
        to: &str,
        body: &RawValue,
    ) -> Result<DirectOutcome, RouteError> {
        let msg_id = self.new_msg_id();
        let frame = ServerFrame::Dm {
            from,
            body,
            msg_id: &msg_id,
            ts: now_ms(),
        }
        .to_frame();
        let status = self.send_frame(to, &frame).await?;
        Ok(DirectOutcome { status, msg_id })
    }

    /// Delivers an ephemeral frame to every connection of `to`: local ones
    /// at once, the others as the routing mode says.
    async fn send_frame(&self, to: &str, frame: &TextFrame) -> Result<DirectStatus, RouteError> {
        let frame = frame.clone();
        let local = self.registry.deliver_to_user(to, &frame, &self.metrics) > 0;
        let remote = match self.mode {
            RoutingMode::Routed => self.route_direct(to, &frame, local).await,
            // This instance itself subscribes to the broadcast channel.
            RoutingMode::Broadcast => {
                let published = &self.metrics.bus_published.broadcast;
                self.publish_direct(Channel::All, to, &frame, local, 1, published)
                    .await
            }
            // One publish on the recipient's channel: Redis fans it out to
            // the instances holding the user (this one too, when local).
            RoutingMode::UserChannel => {
                let published = &self.metrics.bus_published.user;
                let own = usize::from(local);
                self.publish_direct(Channel::User(to), to, &frame, local, own, published)
                    .await
            }
        };
        self.direct_status(local, remote)
    }

    /// Routed mode: the routing operation, covering this instance when it
    /// delivered locally. `Ok(true)`: some other instance was reached.
    async fn route_direct(
        &self,
        to: &str,
        frame: &TextFrame,
        local: bool,
    ) -> Result<bool, BackendError> {
        let me: &str = &self.instance;
        let covered: &[&str] = if local { &[me] } else { &[] };
        let reached = self
            .bus
            .route_direct(&DirectRoute {
                to,
                hop: 0,
                origin: me,
                caller: me,
                covered,
                frame: frame.bytes(),
            })
            .await?;
        Ok(self.count_reached(&reached))
    }

    /// Counts what a routing operation reached; whether it reached anyone.
    fn count_reached(&self, reached: &[Reached]) -> bool {
        let mut any = false;
        for r in reached {
            if r.receivers == 0 {
                self.metrics.stale_presence.inc();
                tracing::debug!(
                    instance = %r.instance,
                    "presence entry points at an instance with no listener"
                );
            } else {
                self.metrics.bus_published.personal.inc();
                any = true;
            }
        }
        any
    }

    /// Broadcast and user-channel modes: one publish on one channel.
    /// `own_receivers` is how many of the receivers are this instance (its
    /// echo is skipped on arrival); any other receiver means "routed".
    async fn publish_direct(
        &self,
        channel: Channel<'_>,
        to: &str,
        frame: &TextFrame,
        local: bool,
        own_receivers: usize,
        published: &prometheus_client::metrics::counter::Counter,
    ) -> Result<bool, BackendError> {
        let me: &str = &self.instance;
        let covered = if local { me } else { "-" };
        let payload = Envelope::Direct {
            to,
            hop: 0,
            origin: me,
            covered: Covered::from_field(covered),
            seq: None,
            prev: None,
        }
        .encode(frame.bytes());
        let receivers = self.bus.publish(channel, payload).await?;
        if receivers > own_receivers {
            published.inc();
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// The ack for a DM that was (or was not) delivered locally and whose
    /// remote routing ended as `remote`.
    fn direct_status(
        &self,
        local: bool,
        remote: Result<bool, BackendError>,
    ) -> Result<DirectStatus, RouteError> {
        match remote {
            Ok(true) => {
                self.metrics.dm_routed.inc();
                Ok(DirectStatus::Routed)
            }
            Ok(false) if local => {
                self.metrics.dm_local.inc();
                Ok(DirectStatus::Routed)
            }
            Ok(false) => {
                self.metrics.dm_offline.inc();
                Ok(DirectStatus::Offline)
            }
            Err(e) => failure(&self.metrics.dm_failed, local, &e).map(|()| DirectStatus::Partial),
        }
    }

    /// Sends a room message to every member connection except the sender's.
    /// Only members may send to a room.
    pub async fn send_room_as_member(
        &self,
        from: &ConnHandle,
        room: &str,
        body: &RawValue,
    ) -> Result<RoomOutcome, RouteError> {
        if !from.is_member(room) {
            return Err(RouteError::NotMember);
        }
        self.send_room(&from.user, Some(&from.id), room, body).await
    }

    /// Sends a room message from `from` (a user or a service label) to every
    /// member connection except `except_conn` (the sending connection).
    pub async fn send_room(
        &self,
        from: &str,
        except_conn: Option<&str>,
        room: &str,
        body: &RawValue,
    ) -> Result<RoomOutcome, RouteError> {
        let msg_id = self.new_msg_id();
        let frame = ServerFrame::Room {
            room,
            from,
            body,
            msg_id: &msg_id,
            ts: now_ms(),
        }
        .to_frame();
        if let Some((store, _)) = self.room_history() {
            // Recorded: the history and the publish are one step, and the
            // local members get it from the bus too, in history order.
            let text = frame.as_str();
            let tail = text.strip_prefix(ROOM_HEAD).unwrap_or(text);
            let appended = store
                .append_room(&RoomAppend {
                    room,
                    origin: &self.instance,
                    conn: except_conn.unwrap_or("-"),
                    tail,
                })
                .await;
            return match appended {
                Ok(_) => {
                    self.metrics.bus_published.room.inc();
                    self.metrics.room_ok.inc();
                    Ok(RoomOutcome {
                        status: RoomStatus::Ok,
                        msg_id,
                    })
                }
                Err(e) => {
                    tracing::debug!(error = %e, room, "recording a room message failed");
                    Err(refusal(&self.metrics.room_failed, &e))
                }
            };
        }
        let payload = Envelope::Room {
            room,
            origin: &self.instance,
            // Connection ids contain a '/', so "-" never names one.
            conn: except_conn.unwrap_or("-"),
            seq: None,
            prev: None,
        }
        .encode(frame.bytes());
        let local = self
            .registry
            .deliver_to_room(room, except_conn, &frame, &self.metrics)
            > 0;
        match self.bus.publish(Channel::Room(room), payload).await {
            Ok(_) => {
                self.metrics.bus_published.room.inc();
                self.metrics.room_ok.inc();
                Ok(RoomOutcome {
                    status: RoomStatus::Ok,
                    msg_id,
                })
            }
            Err(e) => failure(&self.metrics.room_failed, local, &e).map(|()| RoomOutcome {
                status: RoomStatus::Partial,
                msg_id,
            }),
        }
    }

    /// Adds `conn` to `room`, subscribing the room channel for its first local member.
    /// The user's first local connection in the room records the
    /// membership (announced `member_joined` if it is the user's first
    /// anywhere), after the subscription, so local members hear it too.
    pub async fn join(&self, conn: &Arc<ConnHandle>, room: &str) -> Result<(), RouteError> {
        let _guard = self.room_locks.lock(room).await;
        let change = self.registry.join(room, conn);
        if change == RoomChange::FirstJoined {
            if let Err(e) = self.bus.subscribe(Channel::Room(room)).await {
                tracing::warn!(error = %e, room, "room subscribe failed");
                self.registry.leave(room, conn);
                return Err(RouteError::from(&e));
            }
        }
        if change != RoomChange::Noop && self.registry.user_members(room, &conn.user) == 1 {
            self.member_came(room, &conn.user).await;
        }
        Ok(())
    }

    /// A join with `since`: joins (subscribing first, so nothing published
    /// from now on is missed), then reads the room's history after `since`.
    /// The caller holds live messages meanwhile (see
    /// [`ConnHandle::begin_room_replay`]).
    pub async fn join_since(
        &self,
        conn: &Arc<ConnHandle>,
        room: &str,
        since: Seq,
    ) -> Result<RoomBacklog, RouteError> {
        self.join(conn, room).await?;
        self.read_room(room, since).await
    }

    /// The room's history after `after` (empty, and not recovered, when
    /// history is off).
    pub async fn read_room(&self, room: &str, after: Seq) -> Result<RoomBacklog, RouteError> {
        let Some((store, kept)) = self.room_history() else {
            return Ok(RoomBacklog::default());
        };
        store
            .read_room(room, after, kept)
            .await
            .map_err(|e| RouteError::from(&e))
    }

    /// The store and how many messages it keeps per room, when room
    /// history is on.
    fn room_history(&self) -> Option<(&Arc<dyn Store>, usize)> {
        let store = self.store.as_ref()?;
        let kept = store.limits().room_history;
        (kept > 0).then_some((store, kept))
    }

    /// Removes `conn` from `room`, unsubscribing when its last local member leaves.
    /// The user's last local connection in the room ends the membership
    /// here; it is settled after the grace.
    pub async fn leave(&self, conn: &ConnHandle, room: &str) {
        let _guard = self.room_locks.lock(room).await;
        let change = self.registry.leave(room, conn);
        if change == RoomChange::LastLeft {
            self.watches.forget_room(room);
            // A failed unsubscribe leaves a subscription with no local member:
            // its messages are dropped on arrival; the next join reuses it.
            if let Err(e) = self.bus.unsubscribe(Channel::Room(room)).await {
                tracing::warn!(error = %e, room, "room unsubscribe failed");
            }
        }
        if change != RoomChange::Noop && self.registry.user_members(room, &conn.user) == 0 {
            self.member_gone(room, &conn.user).await;
        }
    }

    /// Closes every connection of `user` on every instance (4002, with
    /// `reason` as the close text): here at once, elsewhere by a control
    /// message published only to the instances presence names as holders.
    /// A connection that is being opened meanwhile is not reached: this
    /// acts on the connections that exist, it does not ban. An error after
    /// the local part leaves the rest undone; the request is safe to retry.
    pub async fn disconnect_user(
        &self,
        user: &str,
        reason: &str,
    ) -> Result<ControlOutcome, RouteError> {
        self.control(user, ControlAction::Disconnect, reason).await
    }

    /// Takes every connection of `user` out of `room` on every instance;
    /// each gets a `left` frame with reason `kicked`. Routed like
    /// [`Router::disconnect_user`]. The user may join again if their token
    /// allows it.
    pub async fn kick(&self, user: &str, room: &str) -> Result<ControlOutcome, RouteError> {
        self.control(user, ControlAction::Kick { room }, "").await
    }

    async fn control(
        &self,
        user: &str,
        action: ControlAction<'_>,
        text: &str,
    ) -> Result<ControlOutcome, RouteError> {
        let mut instances = usize::from(self.apply_control(user, action, text));
        let holders = self
            .presence
            .locate(user)
            .await
            .map_err(|e| RouteError::from(&e))?;
        let envelope = Envelope::Control {
            user,
            origin: &self.instance,
            action,
        };
        let payload = envelope.encode(text.as_bytes());
        for holder in holders.iter().filter(|h| h.instance != self.instance) {
            let published = self
                .bus
                .publish(Channel::Instance(&holder.instance), payload.clone())
                .await
                .map_err(|e| RouteError::from(&e))?;
            // 0: the holder is gone (its lease lapses soon); its
            // connections went with it.
            instances += usize::from(published > 0);
        }
        Ok(ControlOutcome { instances })
    }

    /// Carries out a control command on this instance's connections of
    /// `user`; returns whether it has any (a holder, as the instances a
    /// control message is published to are). Never awaits: a
    /// room whose last local member was kicked is unsubscribed by a task.
    fn apply_control(&self, user: &str, action: ControlAction<'_>, text: &str) -> bool {
        let conns = self.registry.connections_of(user);
        match action {
            ControlAction::Disconnect => {
                for conn in &conns {
                    conn.disconnect(text);
                }
                !conns.is_empty()
            }
            ControlAction::Kick { room } => {
                let mut kicked = 0u64;
                let left = ServerFrame::Left {
                    room,
                    reason: "kicked",
                }
                .to_frame();
                for conn in &conns {
                    let change = self.registry.leave(room, conn);
                    if change == RoomChange::Noop {
                        continue; // not a member
                    }
                    kicked += 1;
                    conn.send_text(left.clone(), &self.metrics);
                    if change == RoomChange::LastLeft || self.registry.user_members(room, user) == 0
                    {
                        self.release_room_later(room, user);
                    }
                }
                self.metrics.kicked.inc_by(kicked);
                !conns.is_empty()
            }
        }
    }

    /// In a task, once the room's lock is held: ends `user`'s membership
    /// here if it has no local connection in `room` any more, and
    /// unsubscribes `room` if it has no local member (a join in between
    /// keeps either).
    fn release_room_later(&self, room: &str, user: &str) {
        let (locks, registry, bus, watches, graces) = (
            self.room_locks.clone(),
            self.registry.clone(),
            self.bus.clone(),
            self.watches.clone(),
            self.graces.clone(),
        );
        let (room, user): (String, Arc<str>) = (room.to_owned(), Arc::from(user));
        tokio::spawn(async move {
            let _guard = locks.lock(&room).await;
            if registry.user_members(&room, &user) == 0 {
                graces.member_gone(&room, &user).await;
            }
            if !registry.has_room(&room) {
                watches.forget_room(&room);
                if let Err(e) = bus.unsubscribe(Channel::Room(&room)).await {
                    tracing::warn!(error = %e, room, "room unsubscribe failed");
                }
            }
        });
    }

    /// The live instances holding `user`, with connection counts.
    pub async fn presence_of(&self, user: &str) -> Result<Vec<Holder>, RouteError> {
        self.presence
            .locate(user)
            .await
            .map_err(|e| RouteError::from(&e))
    }

    /// Whether each user is online on any live instance.
    pub async fn online(&self, users: &[String]) -> Result<Vec<bool>, RouteError> {
        match self.presence.locate_many(users).await {
            Ok(holders) => Ok(holders
                .iter()
                .zip(users)
                .map(|(h, user)| !h.is_empty() || self.registry.holds(user))
                .collect()),
            Err(e) => Err(RouteError::from(&e)),
        }
    }

    /// Handles one message received from the bus: queues its frame on the
    /// local connections it is for. Never awaits: a DM whose recipient left
    /// this instance is handed to the re-route worker.
    pub fn handle_inbound(&self, inbound: Inbound) {
        match inbound.kind {
            ChannelKind::Personal => self.metrics.bus_received.personal.inc(),
            ChannelKind::Room => self.metrics.bus_received.room.inc(),
            ChannelKind::Broadcast => self.metrics.bus_received.broadcast.inc(),
            ChannelKind::User => self.metrics.bus_received.user.inc(),
            ChannelKind::Resubscribed => {
                // Stored DMs may have been lost meanwhile: every connection
                // reads its inbox after the last it has.
                self.reconcile_later();
                if self.store.is_some() {
                    let asked = self.registry.catch_up_all();
                    self.metrics.inbox_catch_ups.inc();
                    tracing::info!(
                        connections = asked,
                        "bus subscriptions re-established; connections catch up from their inboxes"
                    );
                }
                return;
            }
        };
        let Some((envelope, at)) = Envelope::decode(&inbound.payload) else {
            tracing::warn!("dropping a malformed bus message");
            return;
        };
        match envelope {
            Envelope::Direct {
                to,
                seq: Some(seq),
                prev,
                ..
            } => {
                // A stored DM: offered in seq order, never re-routed (a
                // recipient that moved reads it from its inbox).
                if matches!(inbound.kind, ChannelKind::Broadcast | ChannelKind::User)
                    && !self.registry.holds(to)
                {
                    return;
                }
                let Some(frame) = frame_of(inbound.payload.slice(at..)) else {
                    return;
                };
                if self
                    .registry
                    .deliver_stored(to, seq, prev, &frame, &self.metrics)
                    == 0
                {
                    self.metrics.dropped_not_here.inc();
                }
            }
            Envelope::Direct {
                to,
                hop,
                origin,
                covered,
                seq: None,
                ..
            } => {
                if matches!(inbound.kind, ChannelKind::Broadcast | ChannelKind::User) {
                    // Delivered locally when sent; and the broadcast baseline's
                    // cheapest possible drop: one header line read.
                    if origin == &*self.instance || !self.registry.holds(to) {
                        return;
                    }
                }
                let Some(frame) = frame_of(inbound.payload.slice(at..)) else {
                    return;
                };
                if self.registry.deliver_to_user(to, &frame, &self.metrics) > 0
                    || inbound.kind != ChannelKind::Personal
                {
                    return;
                }
                if hop > 0 {
                    // Re-routed once already: no ping-pong.
                    self.metrics.dropped_not_here.inc();
                    return;
                }
                let job = RerouteJob {
                    to: to.to_owned(),
                    origin: origin.to_owned(),
                    covered: covered.as_field().to_owned(),
                    frame: frame.bytes().clone(),
                };
                if let Err(Refused::Full(_) | Refused::Closed(_)) = self.reroutes.try_send(job) {
                    self.metrics.dropped_reroute_queue_full.inc();
                }
            }
            Envelope::Room {
                room,
                conn,
                seq: Some(seq),
                ..
            } => {
                let Some(frame) = frame_of(inbound.payload.slice(at..)) else {
                    return;
                };
                self.registry
                    .deliver_room_stored(room, Some(conn), seq, &frame, &self.metrics);
            }
            Envelope::Presence {
                user,
                online,
                version,
                ts_ms,
            } => {
                self.metrics.presence_events_received.inc();
                if inbound.kind == ChannelKind::Personal {
                    let state = Announced {
                        online,
                        version,
                        ts_ms,
                    };
                    self.watches.presence_event(user, state, &self.metrics);
                }
            }
            Envelope::Member {
                room,
                user,
                joined,
                version,
                ts_ms,
            } => {
                self.metrics.member_events_received.inc();
                if inbound.kind == ChannelKind::Room {
                    let state = Announced {
                        online: joined,
                        version,
                        ts_ms,
                    };
                    self.watches.member_event(
                        &self.registry,
                        room,
                        user,
                        state,
                        false,
                        &self.metrics,
                    );
                }
            }
            Envelope::Control {
                user,
                origin,
                action,
            } => {
                if inbound.kind != ChannelKind::Personal || origin == &*self.instance {
                    return; // only ever sent to holders' personal channels
                }
                let text = std::str::from_utf8(&inbound.payload[at..]).unwrap_or("");
                self.apply_control(user, action, text);
            }
            Envelope::Room {
                room,
                origin,
                conn,
                seq: None,
                ..
            } => {
                if origin == &*self.instance {
                    return; // delivered locally when it was sent
                }
                let Some(frame) = frame_of(inbound.payload.slice(at..)) else {
                    return;
                };
                self.registry
                    .deliver_to_room(room, Some(conn), &frame, &self.metrics);
            }
        }
    }
}

/// Counts a failed send; `Ok` when local recipients got it anyway (the
/// caller answers `partial`), else the error to answer with.
fn failure(outcomes: &SendOutcomes, local: bool, error: &BackendError) -> Result<(), RouteError> {
    tracing::debug!(error = %error, local, "send failed beyond this instance");
    if local {
        outcomes.partial.inc();
        return Ok(());
    }
    Err(refusal(outcomes, error))
}

/// Counts a send that reached nobody; the error to answer with.
fn refusal(outcomes: &SendOutcomes, error: &BackendError) -> RouteError {
    match error {
        BackendError::Unavailable(_) => outcomes.unavailable.inc(),
        BackendError::Timeout(_) => outcomes.timeout.inc(),
    };
    RouteError::from(error)
}

fn frame_of(bytes: Bytes) -> Option<TextFrame> {
    let frame = TextFrame::from_utf8(bytes);
    if frame.is_none() {
        tracing::warn!("dropping a bus message whose frame is not UTF-8");
    }
    frame
}

/// Drains the re-route queue, a bounded number of re-routes at a time.
async fn reroute_worker(
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    instance: Arc<str>,
    mut queue: BoundedReceiver<RerouteJob>,
) {
    let permits = Arc::new(Semaphore::new(REROUTE_CONCURRENCY));
    while let Some(job) = queue.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (bus, metrics, instance) = (bus.clone(), metrics.clone(), instance.clone());
        tokio::spawn(async move {
            reroute(&*bus, &metrics, &instance, &job).await;
            drop(permit);
        });
    }
}

/// A DM reached this instance after its recipient left (it may have moved to
/// another instance): route it once more, to holders that do not have it yet.
/// The envelope's covered list names every instance that does, so a device
/// that stayed connected elsewhere never gets a second copy.
async fn reroute(bus: &dyn Bus, metrics: &Metrics, instance: &str, job: &RerouteJob) {
    let covered: Vec<&str> = Covered::from_field(&job.covered).iter().collect();
    let route = DirectRoute {
        to: &job.to,
        hop: 1,
        origin: &job.origin,
        caller: instance,
        covered: &covered,
        frame: &job.frame,
    };
    match bus.route_direct(&route).await {
        Ok(reached) if reached.iter().any(|r| r.receivers > 0) => {
            metrics
                .bus_published
                .personal
                .inc_by(reached.iter().filter(|r| r.receivers > 0).count() as u64);
            metrics.rerouted.inc();
        }
        Ok(_) if covered.iter().any(|id| *id != instance) => {
            metrics.reroute_covered.inc();
        }
        Ok(_) => {
            metrics.dropped_not_here.inc();
        }
        Err(e) => {
            tracing::debug!(error = %e, "re-route failed");
            metrics.dropped_not_here.inc();
        }
    }
}
