//! The router: where a direct message or a room message goes. The heart of
//! Switchboard.
//!
//! It decides, it does not do I/O of its own: it reads presence through the
//! [`Presence`] trait, publishes and subscribes through the [`Bus`] trait, and
//! hands frames to local connections through the [`Registry`]. It never sees a
//! socket or a Redis command, which is why its logic is tested fast with the
//! in-process implementations and the same code runs against Redis.
//!
//! A message is serialized once, by the instance that accepted it; every
//! recipient connection, local or remote, receives those same bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::value::RawValue;
use warp::ws::Message;

use crate::bus::{Bus, Channel, ChannelKind, Envelope, Inbound};
use crate::config::RoutingMode;
use crate::keyed_lock::KeyedLocks;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::protocol::{DirectStatus, ServerFrame};
use crate::registry::{ConnHandle, Registry, RoomChange};

/// Why a request could not be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The shared backend is down and the message could not reach anyone.
    #[error("the message bus or presence store is unavailable")]
    Unavailable,
    /// A room message from a connection that has not joined the room.
    #[error("not a member of this room")]
    NotMember,
}

/// Routes messages for one instance.
pub struct Router {
    /// This instance's id: its presence field and personal channel.
    instance: Arc<str>,
    /// Routed (presence) or broadcast (baseline).
    mode: RoutingMode,
    presence: Arc<dyn Presence>,
    bus: Arc<dyn Bus>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Serializes join/leave of one room with its (un)subscription, so the
    /// subscription always matches "has a local member".
    room_locks: KeyedLocks,
    /// Same for a user's first connect / last disconnect in user-channel mode.
    user_locks: KeyedLocks,
    /// Source of unique message ids (with the instance id as prefix).
    next_msg: AtomicU64,
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
        Router {
            instance: Arc::from(instance),
            mode,
            presence,
            bus,
            registry,
            metrics,
            room_locks: KeyedLocks::new(256),
            user_locks: KeyedLocks::new(256),
            next_msg: AtomicU64::new(0),
        }
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The local connections.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The presence store (the server withdraws it at shutdown).
    pub fn presence(&self) -> &Arc<dyn Presence> {
        &self.presence
    }

    /// Subscribes the channels every instance needs before it serves clients.
    /// The personal channel is subscribed in every mode: re-routed DMs and
    /// (later) server-side publishes use it.
    pub async fn start(&self) -> Result<(), crate::bus::BusError> {
        self.bus
            .subscribe(Channel::Instance(&self.instance))
            .await?;
        if self.mode == RoutingMode::Broadcast {
            self.bus.subscribe(Channel::All).await?;
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
        for room in conn.rooms() {
            self.leave(conn, &room).await;
        }
        if self.mode == RoutingMode::UserChannel {
            let _guard = self.user_locks.lock(&conn.user).await;
            if self.registry.remove(conn) == 0 {
                if let Err(e) = self.bus.unsubscribe(Channel::User(&conn.user)).await {
                    tracing::warn!(error = %e, "user channel unsubscribe failed");
                }
            }
        } else {
            self.registry.remove(conn);
        }
        self.metrics.connections.dec();
        if let Err(e) = self.presence.disconnect(&conn.user).await {
            self.metrics.presence_write_failures.inc();
            tracing::warn!(error = %e, "presence write failed on disconnect; will re-assert when the store is back");
        }
    }

    fn new_msg_id(&self) -> String {
        let n = self.next_msg.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.instance)
    }

    /// Sends a direct message from `from` to every connection of `to`.
    ///
    /// Routed mode: local connections get it at once; one presence read finds
    /// the other instances holding `to`; each is sent one publish on its
    /// personal channel. Broadcast mode: one publish on the shared channel.
    /// `from` is the authenticated user, or a backend service's label.
    pub async fn send_direct(
        &self,
        from: &str,
        to: &str,
        body: &RawValue,
    ) -> Result<(DirectStatus, String), RouteError> {
        let msg_id = self.new_msg_id();
        let text = ServerFrame::Dm {
            from,
            body,
            msg_id: &msg_id,
            ts: now_ms(),
        }
        .to_text();
        let envelope = Envelope::Direct {
            to,
            hop: 0,
            origin: &self.instance,
        };
        let payload = envelope.encode(&text);
        // Local connections get the frame at once, whatever the mode.
        let local = self
            .registry
            .deliver_to_user(to, &Message::text(text), &self.metrics)
            > 0;
        let status = match self.mode {
            RoutingMode::Routed => self.route_direct(to, payload, local).await?,
            // This instance itself subscribes to the broadcast channel.
            RoutingMode::Broadcast => {
                let counter = &self.metrics.bus_published.broadcast;
                self.publish_direct(Channel::All, payload, local, 1, counter)
                    .await?
            }
            // One publish on the recipient's channel: Redis fans it out to
            // the instances holding the user (this one too, when local).
            RoutingMode::UserChannel => {
                let counter = &self.metrics.bus_published.user;
                let own = usize::from(local);
                self.publish_direct(Channel::User(to), payload, local, own, counter)
                    .await?
            }
        };
        Ok((status, msg_id))
    }

    /// Routed mode: one publish per other instance holding `to`.
    async fn route_direct(
        &self,
        to: &str,
        payload: Bytes,
        local: bool,
    ) -> Result<DirectStatus, RouteError> {
        let Some(published) = self
            .bus
            .publish_to_holders(to, &self.instance, payload.clone())
            .await
        else {
            return self.locate_and_publish(to, payload, local).await;
        };
        let remote_reached = match published {
            Ok(published) => published
                .iter()
                .fold(false, |reached, (instance, receivers)| {
                    if *receivers == 0 {
                        self.metrics.stale_presence.inc();
                        self.presence.report_stale(instance);
                        reached
                    } else {
                        self.metrics.bus_published.personal.inc();
                        true
                    }
                }),
            Err(_) if local => false,
            Err(_) => return Err(RouteError::Unavailable),
        };
        Ok(self.direct_outcome(local, remote_reached))
    }

    fn direct_outcome(&self, local: bool, remote_reached: bool) -> DirectStatus {
        if remote_reached {
            self.metrics.dm_routed.inc();
            DirectStatus::Routed
        } else if local {
            self.metrics.dm_local.inc();
            DirectStatus::Routed
        } else {
            self.metrics.dm_offline.inc();
            DirectStatus::Offline
        }
    }

    /// The two-step route (presence read, then one publish per holder), for
    /// backends that cannot do both in one step.
    async fn locate_and_publish(
        &self,
        to: &str,
        payload: Bytes,
        local: bool,
    ) -> Result<DirectStatus, RouteError> {
        let holders = match self.presence.locate(to).await {
            Ok(holders) => holders,
            Err(_) if local => return Ok(self.direct_outcome(true, false)),
            Err(_) => return Err(RouteError::Unavailable),
        };
        let mut remote_reached = false;
        let mut bus_failed = false;
        for holder in holders.iter().filter(|h| h.instance != self.instance) {
            match self
                .bus
                .publish(Channel::Instance(&holder.instance), payload.clone())
                .await
            {
                Ok(0) => {
                    self.metrics.stale_presence.inc();
                    self.presence.report_stale(&holder.instance);
                }
                Ok(_) => {
                    self.metrics.bus_published.personal.inc();
                    remote_reached = true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publish failed");
                    bus_failed = true;
                }
            }
        }
        if bus_failed && !remote_reached && !local {
            return Err(RouteError::Unavailable);
        }
        Ok(self.direct_outcome(local, remote_reached))
    }

    /// Broadcast and user-channel modes: one publish on one channel.
    /// `own_receivers` is how many of the receivers are this instance (its
    /// echo is skipped on arrival); any other receiver means "routed".
    async fn publish_direct(
        &self,
        channel: Channel<'_>,
        payload: Bytes,
        local: bool,
        own_receivers: usize,
        published: &prometheus_client::metrics::counter::Counter,
    ) -> Result<DirectStatus, RouteError> {
        match self.bus.publish(channel, payload).await {
            Ok(receivers) if receivers > own_receivers => {
                published.inc();
                Ok(self.direct_outcome(local, true))
            }
            Ok(_) => Ok(self.direct_outcome(local, false)),
            Err(_) if local => Ok(self.direct_outcome(true, false)),
            Err(_) => Err(RouteError::Unavailable),
        }
    }

    /// Sends a room message to every member connection except the sender's.
    /// Only members may send to a room.
    pub async fn send_room_as_member(
        &self,
        from: &ConnHandle,
        room: &str,
        body: &RawValue,
    ) -> Result<String, RouteError> {
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
    ) -> Result<String, RouteError> {
        let msg_id = self.new_msg_id();
        let text = ServerFrame::Room {
            room,
            from,
            body,
            msg_id: &msg_id,
            ts: now_ms(),
        }
        .to_text();
        let payload = Envelope::Room {
            room,
            origin: &self.instance,
            // Connection ids contain a '/', so "-" never names one.
            conn: except_conn.unwrap_or("-"),
        }
        .encode(&text);
        self.registry
            .deliver_to_room(room, except_conn, &Message::text(text), &self.metrics);
        match self.bus.publish(Channel::Room(room), payload).await {
            Ok(_) => {
                self.metrics.bus_published.room.inc();
                Ok(msg_id)
            }
            Err(_) => Err(RouteError::Unavailable),
        }
    }

    /// Adds `conn` to `room`, subscribing the room channel for its first local member.
    pub async fn join(&self, conn: &Arc<ConnHandle>, room: &str) -> Result<(), RouteError> {
        let _guard = self.room_locks.lock(room).await;
        if self.registry.join(room, conn) == RoomChange::FirstJoined {
            if let Err(e) = self.bus.subscribe(Channel::Room(room)).await {
                tracing::warn!(error = %e, room, "room subscribe failed");
                self.registry.leave(room, conn);
                return Err(RouteError::Unavailable);
            }
        }
        Ok(())
    }

    /// Removes `conn` from `room`, unsubscribing when its last local member leaves.
    pub async fn leave(&self, conn: &ConnHandle, room: &str) {
        let _guard = self.room_locks.lock(room).await;
        if self.registry.leave(room, conn) == RoomChange::LastLeft {
            // A failed unsubscribe leaves a subscription with no local member:
            // its messages are dropped on arrival; the next join reuses it.
            if let Err(e) = self.bus.unsubscribe(Channel::Room(room)).await {
                tracing::warn!(error = %e, room, "room unsubscribe failed");
            }
        }
    }

    /// The live instances holding `user`, with connection counts.
    pub async fn presence_of(
        &self,
        user: &str,
    ) -> Result<Vec<crate::presence::Holder>, RouteError> {
        self.presence
            .locate(user)
            .await
            .map_err(|_| RouteError::Unavailable)
    }

    /// Whether each user is online on any live instance.
    pub async fn online(&self, users: &[String]) -> Result<Vec<bool>, RouteError> {
        match self.presence.locate_many(users).await {
            Ok(holders) => Ok(holders
                .iter()
                .zip(users)
                .map(|(h, user)| !h.is_empty() || self.registry.holds(user))
                .collect()),
            Err(_) => Err(RouteError::Unavailable),
        }
    }

    /// Handles one message received from the bus.
    pub async fn handle_inbound(&self, inbound: Inbound) {
        match inbound.kind {
            ChannelKind::Personal => self.metrics.bus_received.personal.inc(),
            ChannelKind::Room => self.metrics.bus_received.room.inc(),
            ChannelKind::Broadcast => self.metrics.bus_received.broadcast.inc(),
            ChannelKind::User => self.metrics.bus_received.user.inc(),
        };
        let Some((envelope, at)) = Envelope::decode(&inbound.payload) else {
            tracing::warn!("dropping a malformed bus message");
            return;
        };
        match envelope {
            Envelope::Direct { to, hop, origin } => {
                if matches!(inbound.kind, ChannelKind::Broadcast | ChannelKind::User) {
                    // Delivered locally when sent; and the broadcast baseline's
                    // cheapest possible drop: one header line read.
                    if origin == &*self.instance || !self.registry.holds(to) {
                        return;
                    }
                }
                let Some(frame) = frame_of(&inbound.payload[at..]) else {
                    return;
                };
                if self.registry.deliver_to_user(to, &frame, &self.metrics) == 0
                    && inbound.kind == ChannelKind::Personal
                {
                    self.reroute(to, hop, origin, &inbound.payload[at..]).await;
                }
            }
            Envelope::Room { room, origin, conn } => {
                if origin == &*self.instance {
                    return; // delivered locally when it was sent
                }
                let Some(frame) = frame_of(&inbound.payload[at..]) else {
                    return;
                };
                self.registry
                    .deliver_to_room(room, Some(conn), &frame, &self.metrics);
            }
        }
    }

    /// A DM reached this instance after its recipient left (it may have moved
    /// to another instance): route it once more through a fresh presence read.
    /// A message that was already re-routed once is dropped and counted.
    async fn reroute(&self, to: &str, hop: u8, origin: &str, frame: &[u8]) {
        if hop > 0 {
            self.metrics.dropped_not_here.inc();
            return;
        }
        let holders = match self.presence.locate(to).await {
            Ok(holders) => holders,
            Err(_) => {
                self.metrics.dropped_not_here.inc();
                return;
            }
        };
        let text = String::from_utf8_lossy(frame);
        let payload: Bytes = Envelope::Direct { to, hop: 1, origin }.encode(&text);
        let mut reached = false;
        for holder in holders.iter().filter(|h| h.instance != self.instance) {
            if let Ok(n) = self
                .bus
                .publish(Channel::Instance(&holder.instance), payload.clone())
                .await
            {
                reached |= n > 0;
            }
        }
        if !reached {
            self.metrics.dropped_not_here.inc();
        }
    }
}

fn frame_of(bytes: &[u8]) -> Option<Message> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Some(Message::text(text)),
        Err(_) => {
            tracing::warn!("dropping a bus message whose frame is not UTF-8");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::local::{LocalBus, LocalHub};
    use crate::presence::local::{LocalPresence, LocalPresenceHub};
    use tokio::sync::mpsc;

    /// Several in-process instances on one shared in-process hub.
    struct Cluster {
        routers: Vec<Arc<Router>>,
        metrics: Vec<Arc<Metrics>>,
    }

    async fn cluster(n: usize, mode: RoutingMode) -> Cluster {
        let bus_hub = Arc::new(LocalHub::default());
        let presence_hub = Arc::new(LocalPresenceHub::default());
        let mut routers = Vec::new();
        let mut all_metrics = Vec::new();
        for i in 1..=n {
            let id = format!("i{i}");
            let metrics = Metrics::new();
            let (tx, mut rx) = mpsc::channel::<Inbound>(1024);
            let bus = Arc::new(LocalBus::new(bus_hub.clone(), &id, tx, metrics.clone()));
            let presence = Arc::new(LocalPresence::new(presence_hub.clone(), &id));
            let router = Arc::new(Router::new(
                &id,
                mode,
                presence,
                bus,
                Arc::default(),
                metrics.clone(),
            ));
            router.start().await.expect("start");
            let r = router.clone();
            tokio::spawn(async move {
                while let Some(inbound) = rx.recv().await {
                    r.handle_inbound(inbound).await;
                }
            });
            routers.push(router);
            all_metrics.push(metrics);
        }
        Cluster {
            routers,
            metrics: all_metrics,
        }
    }

    async fn user(router: &Router, name: &str) -> (Arc<ConnHandle>, mpsc::Receiver<Message>) {
        let (conn, rx) = ConnHandle::new(
            router.registry().next_conn_id(router.instance()),
            Arc::from(name),
            64,
        );
        router.connect(&conn).await;
        (conn, rx)
    }

    async fn recv_json(rx: &mut mpsc::Receiver<Message>) -> serde_json::Value {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
            .await
            .expect("a frame in time")
            .expect("channel open");
        serde_json::from_str(msg.to_str().expect("text")).expect("json")
    }

    /// Yields to the (current-thread) runtime until `condition` holds. A bus
    /// message is handled without awaiting, so once its counter moved, its
    /// handling is complete.
    async fn wait_for(condition: impl Fn() -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while !condition() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("condition in time");
    }

    fn body(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("raw json")
    }

    #[tokio::test]
    async fn dm_goes_to_the_holding_instance_only() {
        let c = cluster(3, RoutingMode::Routed).await;
        let (alice, _a) = user(&c.routers[0], "alice").await;
        let (_bob, mut b) = user(&c.routers[1], "bob").await;
        let (status, _) = c.routers[0]
            .send_direct(&alice.user, "bob", &body("{\"hi\":1}"))
            .await
            .expect("sent");
        assert_eq!(status, DirectStatus::Routed);
        let got = recv_json(&mut b).await;
        assert_eq!(got["from"], "alice");
        assert_eq!(got["body"]["hi"], 1);
        assert_eq!(c.metrics[1].bus_received.personal.get(), 1);
        assert_eq!(c.metrics[2].bus_received.personal.get(), 0);
        assert_eq!(c.metrics[0].dm_routed.get(), 1);
    }

    #[tokio::test]
    async fn offline_and_local() {
        let c = cluster(2, RoutingMode::Routed).await;
        let (alice, _a) = user(&c.routers[0], "alice").await;
        let (status, _) = c.routers[0]
            .send_direct(&alice.user, "nobody", &body("1"))
            .await
            .expect("sent");
        assert_eq!(status, DirectStatus::Offline);
        let (_carol, mut carol_rx) = user(&c.routers[0], "carol").await;
        let (status, _) = c.routers[0]
            .send_direct(&alice.user, "carol", &body("2"))
            .await
            .expect("sent");
        assert_eq!(status, DirectStatus::Routed);
        assert_eq!(recv_json(&mut carol_rx).await["body"], 2);
        assert_eq!(c.metrics[0].dm_local.get(), 1);
        assert_eq!(c.metrics[1].bus_received.personal.get(), 0);
    }

    #[tokio::test]
    async fn multi_device_gets_every_copy() {
        let c = cluster(3, RoutingMode::Routed).await;
        let (alice, _a) = user(&c.routers[0], "alice").await;
        let (_b2, mut rx2) = user(&c.routers[1], "bob").await;
        let (_b3, mut rx3) = user(&c.routers[2], "bob").await;
        c.routers[0]
            .send_direct(&alice.user, "bob", &body("\"x\""))
            .await
            .expect("sent");
        assert_eq!(recv_json(&mut rx2).await["body"], "x");
        assert_eq!(recv_json(&mut rx3).await["body"], "x");
    }

    #[tokio::test]
    async fn broadcast_mode_reaches_every_instance_and_delivers_once() {
        let c = cluster(3, RoutingMode::Broadcast).await;
        let (alice, _a) = user(&c.routers[0], "alice").await;
        let (_bob, mut b) = user(&c.routers[1], "bob").await;
        c.routers[0]
            .send_direct(&alice.user, "bob", &body("1"))
            .await
            .expect("sent");
        assert_eq!(recv_json(&mut b).await["body"], 1);
        // Every instance, the sender included, received the broadcast.
        for m in &c.metrics {
            wait_for(|| m.bus_received.broadcast.get() == 1).await;
        }
        assert!(b.try_recv().is_err(), "delivered exactly once");
    }

    #[tokio::test]
    async fn user_channel_mode_publishes_to_the_users_channel_only() {
        let c = cluster(3, RoutingMode::UserChannel).await;
        let (alice, _a) = user(&c.routers[0], "alice").await;
        let (bob, mut b) = user(&c.routers[1], "bob").await;
        let (status, _) = c.routers[0]
            .send_direct(&alice.user, "bob", &body("1"))
            .await
            .expect("sent");
        assert_eq!(status, DirectStatus::Routed);
        assert_eq!(recv_json(&mut b).await["body"], 1);
        assert_eq!(c.metrics[1].bus_received.user.get(), 1);
        assert_eq!(c.metrics[2].bus_received.user.get(), 0);
        assert_eq!(c.metrics[1].bus_received.personal.get(), 0);
        // Local recipient: delivered directly, the echo from the bus is skipped.
        let (_carol, mut carol_rx) = user(&c.routers[0], "carol").await;
        c.routers[0]
            .send_direct(&alice.user, "carol", &body("2"))
            .await
            .expect("sent");
        assert_eq!(recv_json(&mut carol_rx).await["body"], 2);
        // The bus echo reaches i1 too (it subscribes carol's channel) and is skipped.
        wait_for(|| c.metrics[0].bus_received.user.get() == 1).await;
        // Last connection gone: the channel is unsubscribed and bob is offline.
        c.routers[1].disconnect(&bob).await;
        let (status, _) = c.routers[0]
            .send_direct(&alice.user, "bob", &body("3"))
            .await
            .expect("sent");
        assert_eq!(status, DirectStatus::Offline);
        assert!(carol_rx.try_recv().is_err(), "no duplicate from the echo");
    }

    #[tokio::test]
    async fn rooms_reach_members_only_and_subscriptions_follow_membership() {
        let c = cluster(3, RoutingMode::Routed).await;
        let (alice, mut a) = user(&c.routers[0], "alice").await;
        let (bob, mut b) = user(&c.routers[1], "bob").await;
        let (carol, mut carol_rx) = user(&c.routers[2], "carol").await;
        c.routers[0].join(&alice, "lobby").await.expect("join");
        c.routers[1].join(&bob, "lobby").await.expect("join");
        assert_eq!(
            c.routers[2]
                .send_room_as_member(&carol, "lobby", &body("0"))
                .await,
            Err(RouteError::NotMember)
        );
        c.routers[0]
            .send_room_as_member(&alice, "lobby", &body("1"))
            .await
            .expect("sent");
        let got = recv_json(&mut b).await;
        assert_eq!(
            (got["room"].as_str(), got["body"].as_i64()),
            (Some("lobby"), Some(1))
        );
        assert_eq!(
            c.metrics[2].bus_received.room.get(),
            0,
            "no member, no subscription"
        );
        assert!(a.try_recv().is_err() && carol_rx.try_recv().is_err());

        c.routers[1].leave(&bob, "lobby").await;
        c.routers[0]
            .send_room_as_member(&alice, "lobby", &body("2"))
            .await
            .expect("sent");
        // i1 receives its own echo (it has a member); i2 would have by then too.
        wait_for(|| c.metrics[0].bus_received.room.get() == 2).await;
        assert!(b.try_recv().is_err());
        assert_eq!(
            c.metrics[1].bus_received.room.get(),
            1,
            "unsubscribed after the last member left"
        );
    }

    #[tokio::test]
    async fn a_dm_for_a_user_who_moved_is_rerouted_once() {
        let c = cluster(3, RoutingMode::Routed).await;
        // Bob is on i3 now; a stale message for him arrives at i2.
        let (_bob, mut b) = user(&c.routers[2], "bob").await;
        let frame = r#"{"type":"dm","from":"alice","body":1,"msg_id":"m","ts":0}"#;
        let payload = Envelope::Direct {
            to: "bob",
            hop: 0,
            origin: "i1",
        }
        .encode(frame);
        c.routers[1]
            .handle_inbound(Inbound {
                kind: ChannelKind::Personal,
                payload: payload.to_vec(),
            })
            .await;
        assert_eq!(recv_json(&mut b).await["body"], 1);
        // A second hop is never taken.
        let payload = Envelope::Direct {
            to: "bob",
            hop: 1,
            origin: "i1",
        }
        .encode(frame);
        c.routers[1]
            .handle_inbound(Inbound {
                kind: ChannelKind::Personal,
                payload: payload.to_vec(),
            })
            .await;
        assert_eq!(c.metrics[1].dropped_not_here.get(), 1);
    }

    #[tokio::test]
    async fn presence_follows_connections() {
        let c = cluster(2, RoutingMode::Routed).await;
        let (bob, _b) = user(&c.routers[1], "bob").await;
        let users = vec!["bob".to_owned(), "carol".to_owned()];
        assert_eq!(
            c.routers[0].online(&users).await.expect("ok"),
            vec![true, false]
        );
        c.routers[1].disconnect(&bob).await;
        assert_eq!(
            c.routers[0].online(&users).await.expect("ok"),
            vec![false, false]
        );
    }
}
