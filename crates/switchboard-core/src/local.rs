//! The in-process backend: presence and bus for the embedded single-node
//! mode, and for several in-process instances sharing one [`LocalHub`] in the
//! router's tests (the same tests run over Redis).
//!
//! It has Redis's semantics where the router can see them: a publish reaches
//! every current subscriber of the channel and returns how many there were;
//! delivery into an instance's inbox never blocks (a full inbox drops and
//! counts, like a Redis output buffer limit would); the routing operation
//! reads the recipient's presence and publishes to the holders in one step,
//! building the same envelope the Redis script builds. Its [`Store`] keeps
//! inboxes in memory with the same retention limits, the same abuse bound
//! and the same atomic append-and-publish step as the Redis store.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;

use crate::bus::{Bus, Channel, ChannelKind, Covered, DirectRoute, Envelope, Inbound, Reached};
use crate::error::BackendError;
use crate::metrics::Metrics;
use crate::presence::{Announced, Holder, Members, Presence};
use crate::queue::{BoundedSender, Refused};
use crate::router::now_ms;
use crate::store::{
    dm_frame, room_frame, Append, Appended, Backlog, Fanout, Receipt, RoomAppend, RoomBacklog, Seq,
    Store, StoreLimits,
};

/// Idempotency records kept at most; beyond this (after expired ones are
/// swept) a send with a key is refused as `unavailable` rather than
/// remembered imperfectly.
const MAX_IDEMPOTENCY_RECORDS: usize = 100_000;

/// Subscribers of one channel: (instance id, its inbox, its metrics).
type Subscribers = Vec<(Arc<str>, BoundedSender<Inbound>, Arc<Metrics>)>;

/// The shared "server" of in-process instances: channels and presence.
#[derive(Debug, Default)]
pub struct LocalHub {
    channels: DashMap<String, Subscribers>,
    /// user -> (instance -> connections).
    presence: DashMap<String, HashMap<Arc<str>, u32>>,
    /// Inboxes and idempotency records, behind one lock: an append and its
    /// publishes happen under it, so they are one step as in Redis.
    store: Mutex<Inboxes>,
    limits: StoreLimits,
    /// Announced states, watchers and room memberships, behind one lock:
    /// a count change and its announcement are one step, as in a Redis
    /// script. Locked before `presence` entries, never after.
    roster: Mutex<Roster>,
}

/// The hub's side of presence events (see [`Presence`]).
#[derive(Debug, Default)]
struct Roster {
    /// user -> its announced-online state.
    online: HashMap<String, Announced>,
    /// user -> the instances watching it.
    watchers: HashMap<String, HashSet<Arc<str>>>,
    /// room -> user -> the instances holding a membership.
    memberships: HashMap<String, HashMap<String, HashSet<Arc<str>>>>,
    /// room -> its announced members (sorted, for listing).
    members: HashMap<String, BTreeMap<String, Announced>>,
    /// The last version handed out: versions strictly increase.
    last_version: u64,
}

impl Roster {
    /// A new transition's state: `max(last + 1, now in µs)`.
    fn next(&mut self, online: bool) -> Announced {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.last_version = (self.last_version + 1).max(now_us);
        Announced {
            online,
            version: self.last_version,
            ts_ms: self.last_version / 1000,
        }
    }
}

#[derive(Debug, Default)]
struct Inboxes {
    users: HashMap<String, Mailbox>,
    /// (recipient, sender, key) -> the first send's answer.
    idempotency: HashMap<(String, String, String), Idempotent>,
    /// When expired mailboxes were last swept (unix ms).
    swept_ms: u64,
    /// room -> its history.
    rooms: HashMap<String, History>,
}

#[derive(Debug, Default)]
struct History {
    entries: VecDeque<(Seq, Arc<str>)>,
    trimmed: Seq,
    last: Seq,
    expires_ms: u64,
}

#[derive(Debug, Default)]
struct Mailbox {
    entries: VecDeque<Entry>,
    cursor: Seq,
    /// The newest entry dropped by retention.
    trimmed: Seq,
    /// The newest seq generated.
    last: Seq,
    expires_ms: u64,
}

#[derive(Debug)]
struct Entry {
    seq: Seq,
    at_ms: u64,
    tail: Arc<str>,
    /// (sender, msg_id) when a receipt was asked for.
    receipt: Option<(String, String)>,
}

#[derive(Debug)]
struct Idempotent {
    expires_ms: u64,
    msg_id: String,
    seq: Option<Seq>,
    reached_any: bool,
}

/// One instance's handle on a [`LocalHub`]: its [`Presence`] and [`Bus`].
#[derive(Debug)]
pub struct LocalBackend {
    hub: Arc<LocalHub>,
    instance: Arc<str>,
    inbox: BoundedSender<Inbound>,
    metrics: Arc<Metrics>,
}

impl LocalBackend {
    /// Joins `hub` as `instance`; received messages go to `inbox`.
    pub fn new(
        hub: Arc<LocalHub>,
        instance: &str,
        inbox: BoundedSender<Inbound>,
        metrics: Arc<Metrics>,
    ) -> Self {
        LocalBackend {
            hub,
            instance: Arc::from(instance),
            inbox,
            metrics,
        }
    }

    fn holders(&self, user: &str) -> Vec<Holder> {
        self.hub
            .presence
            .get(user)
            .map(|entry| {
                entry
                    .iter()
                    .map(|(instance, n)| Holder {
                        instance: instance.clone(),
                        connections: *n,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn name(channel: Channel<'_>) -> (String, ChannelKind) {
    match channel {
        Channel::Instance(id) => (format!("inst:{id}"), ChannelKind::Personal),
        Channel::Room(room) => (format!("room:{room}"), ChannelKind::Room),
        Channel::All => ("all".to_owned(), ChannelKind::Broadcast),
        Channel::User(user) => (format!("user:{user}"), ChannelKind::User),
    }
}

impl LocalHub {
    /// A hub whose store keeps inboxes within `limits`.
    pub fn with_limits(limits: StoreLimits) -> Self {
        LocalHub {
            limits,
            ..LocalHub::default()
        }
    }

    fn inboxes(&self) -> MutexGuard<'_, Inboxes> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn roster(&self) -> MutexGuard<'_, Roster> {
        self.roster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `state` of `user` to every instance watching it.
    fn announce_presence(&self, roster: &Roster, user: &str, state: Announced) {
        let Some(watchers) = roster.watchers.get(user) else {
            return;
        };
        let payload = Envelope::Presence {
            user,
            online: state.online,
            version: state.version,
            ts_ms: state.ts_ms,
        }
        .encode(b"");
        for instance in watchers {
            self.publish(Channel::Instance(instance), &payload);
        }
    }

    /// Announces `user` offline if it was online and nobody holds it.
    fn settle_user(&self, roster: &mut Roster, user: &str) -> bool {
        if self.online(user) || !roster.online.contains_key(user) {
            return false;
        }
        roster.online.remove(user);
        let state = roster.next(false);
        self.announce_presence(roster, user, state);
        true
    }

    /// Publishes a membership transition on the room's channel.
    fn announce_member(&self, room: &str, user: &str, state: Announced) {
        let payload = Envelope::Member {
            room,
            user,
            joined: state.online,
            version: state.version,
            ts_ms: state.ts_ms,
        }
        .encode(b"");
        self.publish(Channel::Room(room), &payload);
    }

    /// Announces `user` gone from `room` if it was an announced member and
    /// no instance holds a membership.
    fn settle_membership(&self, roster: &mut Roster, room: &str, user: &str) -> bool {
        let held = roster
            .memberships
            .get(room)
            .and_then(|m| m.get(user))
            .is_some_and(|holders| !holders.is_empty());
        let announced = roster
            .members
            .get(room)
            .is_some_and(|m| m.contains_key(user));
        if held || !announced {
            return false;
        }
        if let Some(members) = roster.members.get_mut(room) {
            members.remove(user);
            if members.is_empty() {
                roster.members.remove(room);
            }
        }
        let state = roster.next(false);
        self.announce_member(room, user, state);
        true
    }

    fn online(&self, user: &str) -> bool {
        self.presence
            .get(user)
            .is_some_and(|e| e.values().any(|n| *n > 0))
    }

    fn publish(&self, channel: Channel<'_>, payload: &Bytes) -> usize {
        let (name, kind) = name(channel);
        let subscribers = match self.channels.get(&name) {
            Some(subs) => subs.clone(),
            None => return 0,
        };
        for (_, inbox, metrics) in &subscribers {
            let inbound = Inbound {
                kind,
                payload: payload.clone(),
            };
            if let Err(Refused::Full(_)) = inbox.try_send(inbound) {
                metrics.dropped_bus_inbox_full.inc();
            }
        }
        subscribers.len()
    }
}

#[async_trait]
impl Bus for LocalBackend {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BackendError> {
        Ok(self.hub.publish(channel, &payload))
    }

    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        let (name, _) = name(channel);
        let mut subs = self.hub.channels.entry(name).or_default();
        if !subs.iter().any(|(id, _, _)| *id == self.instance) {
            subs.push((
                self.instance.clone(),
                self.inbox.clone(),
                self.metrics.clone(),
            ));
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        let (name, _) = name(channel);
        if let Some(mut subs) = self.hub.channels.get_mut(&name) {
            subs.retain(|(id, _, _)| *id != self.instance);
        }
        self.hub
            .channels
            .remove_if(&name, |_, subs| subs.is_empty());
        Ok(())
    }

    async fn route_direct(&self, route: &DirectRoute<'_>) -> Result<Vec<Reached>, BackendError> {
        let targets: Vec<Arc<str>> = self
            .holders(route.to)
            .into_iter()
            .filter(|h| h.connections > 0)
            .map(|h| h.instance)
            .filter(|id| route.publishes_to(id))
            .collect();
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = targets.iter().map(|id| &**id).collect();
        let payload = route.payload(&ids);
        Ok(targets
            .iter()
            .map(|id| Reached {
                instance: id.to_string(),
                receivers: self.hub.publish(Channel::Instance(id), &payload),
            })
            .collect())
    }
}

impl Inboxes {
    /// Drops expired mailboxes and idempotency records, at most once a
    /// second (and whenever the record table is full).
    fn sweep(&mut self, now: u64, force: bool) {
        if !force && now < self.swept_ms + 1000 {
            return;
        }
        self.swept_ms = now;
        self.users.retain(|_, m| m.expires_ms > now);
        self.idempotency.retain(|_, r| r.expires_ms > now);
        self.rooms.retain(|_, h| h.expires_ms > now);
    }

    fn live_mailbox(&mut self, user: &str, now: u64) -> Option<&mut Mailbox> {
        self.users.get_mut(user).filter(|m| m.expires_ms > now)
    }
}

impl Mailbox {
    fn fresh(expires_ms: u64) -> Mailbox {
        Mailbox {
            expires_ms,
            ..Mailbox::default()
        }
    }

    fn trim_to(&mut self, max_len: usize) {
        while self.entries.len() > max_len {
            if let Some(old) = self.entries.pop_front() {
                self.trimmed = self.trimmed.max(old.seq);
            }
        }
    }

    fn trim_older_than(&mut self, min_ms: u64) {
        while self.entries.front().is_some_and(|e| e.at_ms < min_ms) {
            if let Some(old) = self.entries.pop_front() {
                self.trimmed = self.trimmed.max(old.seq);
            }
        }
    }
}

#[async_trait]
impl Store for LocalBackend {
    async fn append(&self, dm: &Append<'_>) -> Result<Appended, BackendError> {
        let hub = &*self.hub;
        let limits = hub.limits;
        let now = now_ms();
        let mut inboxes = hub.inboxes();
        inboxes.sweep(now, false);
        let idem_key = dm
            .key
            .map(|k| (dm.to.to_owned(), dm.from.to_owned(), k.to_owned()));
        if let Some(key) = &idem_key {
            if let Some(prior) = inboxes.idempotency.get(key).filter(|r| r.expires_ms > now) {
                return Ok(Appended {
                    seq: prior.seq,
                    msg_id: prior.msg_id.clone(),
                    reached_any: prior.reached_any,
                    duplicate: true,
                    reached: Vec::new(),
                });
            }
            if inboxes.idempotency.len() >= MAX_IDEMPOTENCY_RECORDS {
                inboxes.sweep(now, true);
                if inboxes.idempotency.len() >= MAX_IDEMPOTENCY_RECORDS {
                    return Err(BackendError::unavailable("the idempotency table is full"));
                }
            }
        }
        if inboxes.live_mailbox(dm.to, now).is_none() && hub.online(dm.to) {
            inboxes
                .users
                .insert(dm.to.to_owned(), Mailbox::fresh(now + limits.inbox_ttl_ms));
        }
        let stored = inboxes.live_mailbox(dm.to, now).map(|mailbox| {
            let prev = mailbox.last;
            let seq = prev.next_after(now);
            mailbox.last = seq;
            mailbox.entries.push_back(Entry {
                seq,
                at_ms: now,
                tail: Arc::from(dm.tail),
                receipt: dm
                    .receipt
                    .then(|| (dm.from.to_owned(), dm.msg_id.to_owned())),
            });
            mailbox.trim_to(limits.inbox_max_len);
            // The TTL runs from the user's last connect (as in Redis).
            (seq, prev)
        });
        let seq = stored.map(|(seq, _)| seq);
        let prev = stored.map(|(_, prev)| prev);
        // Published under the store's lock: one step with the append.
        let frame = match seq {
            Some(seq) => dm_frame(seq, dm.tail),
            None => {
                crate::protocol::TextFrame::from(format!("{}{}", crate::store::DM_HEAD, dm.tail))
            }
        };
        let payload = Envelope::Direct {
            to: dm.to,
            hop: 0,
            origin: dm.origin,
            covered: Covered::NONE,
            seq,
            prev,
        }
        .encode(frame.bytes());
        let (reached, reached_any) = match dm.fanout {
            Fanout::Holders => {
                let reached: Vec<Reached> = self
                    .holders(dm.to)
                    .into_iter()
                    .filter(|h| h.connections > 0)
                    .map(|h| Reached {
                        receivers: hub.publish(Channel::Instance(&h.instance), &payload),
                        instance: h.instance.to_string(),
                    })
                    .collect();
                let any = reached.iter().any(|r| r.receivers > 0);
                (reached, any)
            }
            Fanout::Channel(channel) => {
                let receivers = hub.publish(channel, &payload);
                (Vec::new(), receivers > 0 && hub.online(dm.to))
            }
        };
        if let Some(key) = idem_key {
            inboxes.idempotency.insert(
                key,
                Idempotent {
                    expires_ms: now + limits.idempotency_window_ms,
                    msg_id: dm.msg_id.to_owned(),
                    seq,
                    reached_any,
                },
            );
        }
        Ok(Appended {
            seq,
            msg_id: dm.msg_id.to_owned(),
            reached_any,
            duplicate: false,
            reached,
        })
    }

    async fn read(
        &self,
        user: &str,
        after: Option<Seq>,
        limit: usize,
        open: bool,
    ) -> Result<Backlog, BackendError> {
        let limits = self.hub.limits;
        let now = now_ms();
        let mut inboxes = self.hub.inboxes();
        let mut fresh = false;
        if open && inboxes.live_mailbox(user, now).is_none() {
            inboxes
                .users
                .insert(user.to_owned(), Mailbox::fresh(now + limits.inbox_ttl_ms));
            fresh = true;
        }
        let Some(mailbox) = inboxes.live_mailbox(user, now) else {
            return Ok(Backlog {
                after: after.unwrap_or(Seq::ZERO),
                entries: Vec::new(),
                gap: false,
                newest: None,
            });
        };
        if open {
            mailbox.expires_ms = now + limits.inbox_ttl_ms;
            mailbox.trim_older_than(now.saturating_sub(limits.inbox_ttl_ms));
        }
        let start = after.unwrap_or(mailbox.cursor);
        let gap = mailbox.trimmed > start || (fresh && start > Seq::ZERO);
        let entries = mailbox
            .entries
            .iter()
            .filter(|e| e.seq > start)
            .take(limit)
            .map(|e| (e.seq, dm_frame(e.seq, &e.tail)))
            .collect();
        Ok(Backlog {
            after: start,
            entries,
            gap,
            newest: Some(mailbox.last),
        })
    }

    fn limits(&self) -> StoreLimits {
        self.hub.limits
    }

    async fn append_room(&self, message: &RoomAppend<'_>) -> Result<Seq, BackendError> {
        let limits = self.hub.limits;
        let now = now_ms();
        let mut inboxes = self.hub.inboxes();
        inboxes.sweep(now, false);
        let history = inboxes.rooms.entry(message.room.to_owned()).or_default();
        if history.expires_ms <= now {
            // Expired: what it held is gone; say so to a resuming joiner.
            if let Some((seq, _)) = history.entries.back() {
                history.trimmed = history.trimmed.max(*seq);
            }
            history.entries.clear();
        }
        let prev = history.last;
        let seq = prev.next_after(now);
        history.last = seq;
        history.entries.push_back((seq, Arc::from(message.tail)));
        while history.entries.len() > limits.room_history {
            if let Some((old, _)) = history.entries.pop_front() {
                history.trimmed = history.trimmed.max(old);
            }
        }
        history.expires_ms = now + limits.room_history_ttl_ms;
        let payload = Envelope::Room {
            room: message.room,
            origin: message.origin,
            conn: message.conn,
            seq: Some(seq),
            prev: Some(prev),
        }
        .encode(room_frame(seq, message.tail).bytes());
        // Under the store's lock: one step with the append.
        self.hub.publish(Channel::Room(message.room), &payload);
        Ok(seq)
    }

    async fn read_room(
        &self,
        room: &str,
        after: Seq,
        limit: usize,
    ) -> Result<RoomBacklog, BackendError> {
        let now = now_ms();
        let inboxes = self.hub.inboxes();
        let Some(history) = inboxes.rooms.get(room).filter(|h| h.expires_ms > now) else {
            return Ok(RoomBacklog {
                entries: Vec::new(),
                recovered: after == Seq::ZERO,
            });
        };
        Ok(RoomBacklog {
            entries: history
                .entries
                .iter()
                .filter(|(seq, _)| *seq > after)
                .take(limit)
                .map(|(seq, tail)| (*seq, room_frame(*seq, tail)))
                .collect(),
            recovered: history.trimmed <= after,
        })
    }

    async fn ack(&self, user: &str, seq: Seq) -> Result<Vec<Receipt>, BackendError> {
        let now = now_ms();
        let mut inboxes = self.hub.inboxes();
        let Some(mailbox) = inboxes.live_mailbox(user, now) else {
            return Ok(Vec::new());
        };
        let newest = mailbox.entries.back().map(|e| e.seq).unwrap_or(Seq::ZERO);
        let seq = seq.min(newest);
        if seq <= mailbox.cursor {
            return Ok(Vec::new());
        }
        let from = mailbox.cursor;
        mailbox.cursor = seq;
        Ok(mailbox
            .entries
            .iter()
            .filter(|e| e.seq > from && e.seq <= seq)
            .filter_map(|e| {
                e.receipt.as_ref().map(|(sender, msg_id)| Receipt {
                    sender: sender.clone(),
                    msg_id: msg_id.clone(),
                    seq: e.seq,
                })
            })
            .collect())
    }
}

#[async_trait]
impl Presence for LocalBackend {
    async fn connect(&self, user: &str) -> Result<(), BackendError> {
        let mut roster = self.hub.roster();
        *self
            .hub
            .presence
            .entry(user.to_owned())
            .or_default()
            .entry(self.instance.clone())
            .or_insert(0) += 1;
        if !roster.online.contains_key(user) {
            let state = roster.next(true);
            roster.online.insert(user.to_owned(), state);
            self.hub.announce_presence(&roster, user, state);
            self.metrics.presence_transitions_online.inc();
        }
        Ok(())
    }

    async fn disconnect(&self, user: &str) -> Result<(), BackendError> {
        let _roster = self.hub.roster();
        if let Some(mut entry) = self.hub.presence.get_mut(user) {
            if let Some(n) = entry.get_mut(&self.instance) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    entry.remove(&self.instance);
                }
            }
        }
        self.hub.presence.remove_if(user, |_, e| e.is_empty());
        crate::registry::shrink_if_sparse(&self.hub.presence);
        Ok(())
    }

    async fn settle(&self, user: &str) -> Result<(), BackendError> {
        let mut roster = self.hub.roster();
        if self.hub.settle_user(&mut roster, user) {
            self.metrics.presence_transitions_offline.inc();
        }
        Ok(())
    }

    async fn locate(&self, user: &str) -> Result<Vec<Holder>, BackendError> {
        Ok(self.holders(user))
    }

    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, BackendError> {
        Ok(users.iter().map(|u| self.holders(u)).collect())
    }

    async fn withdraw(&self) -> Result<(), BackendError> {
        let mut roster = self.hub.roster();
        let mut gone = Vec::new();
        self.hub.presence.retain(|user, entry| {
            if entry.remove(&self.instance).is_some() {
                gone.push(user.clone());
            }
            !entry.is_empty()
        });
        // Lingering users are settled by the router before it withdraws.
        for user in &gone {
            if self.hub.settle_user(&mut roster, user) {
                self.metrics.presence_transitions_offline.inc();
            }
        }
        roster.watchers.retain(|_, w| {
            w.remove(&self.instance);
            !w.is_empty()
        });
        let mut left = Vec::new();
        for (room, users) in roster.memberships.iter_mut() {
            users.retain(|user, holders| {
                if holders.remove(&self.instance) {
                    left.push((room.clone(), user.clone()));
                }
                !holders.is_empty()
            });
        }
        roster.memberships.retain(|_, users| !users.is_empty());
        for (room, user) in &left {
            if self.hub.settle_membership(&mut roster, room, user) {
                self.metrics.member_transitions_left.inc();
            }
        }
        Ok(())
    }

    async fn watch(&self, users: &[String]) -> Result<Vec<Announced>, BackendError> {
        let mut roster = self.hub.roster();
        Ok(users
            .iter()
            .map(|user| {
                roster
                    .watchers
                    .entry(user.clone())
                    .or_default()
                    .insert(self.instance.clone());
                roster.online.get(user).copied().unwrap_or(Announced::NONE)
            })
            .collect())
    }

    async fn unwatch(&self, users: &[String]) -> Result<(), BackendError> {
        let mut roster = self.hub.roster();
        for user in users {
            if let Some(w) = roster.watchers.get_mut(user) {
                w.remove(&self.instance);
                if w.is_empty() {
                    roster.watchers.remove(user);
                }
            }
        }
        Ok(())
    }

    async fn announced(&self, users: &[String]) -> Result<Vec<Announced>, BackendError> {
        let roster = self.hub.roster();
        Ok(users
            .iter()
            .map(|u| roster.online.get(u).copied().unwrap_or(Announced::NONE))
            .collect())
    }

    async fn join_room(&self, room: &str, user: &str) -> Result<(), BackendError> {
        let mut roster = self.hub.roster();
        roster
            .memberships
            .entry(room.to_owned())
            .or_default()
            .entry(user.to_owned())
            .or_default()
            .insert(self.instance.clone());
        let announced = roster
            .members
            .get(room)
            .is_some_and(|m| m.contains_key(user));
        if !announced {
            let state = roster.next(true);
            roster
                .members
                .entry(room.to_owned())
                .or_default()
                .insert(user.to_owned(), state);
            self.hub.announce_member(room, user, state);
            self.metrics.member_transitions_joined.inc();
        }
        Ok(())
    }

    async fn leave_room(&self, room: &str, user: &str) -> Result<(), BackendError> {
        let mut roster = self.hub.roster();
        if let Some(users) = roster.memberships.get_mut(room) {
            if let Some(holders) = users.get_mut(user) {
                holders.remove(&self.instance);
                if holders.is_empty() {
                    users.remove(user);
                }
            }
            if users.is_empty() {
                roster.memberships.remove(room);
            }
        }
        Ok(())
    }

    async fn settle_member(&self, room: &str, user: &str) -> Result<(), BackendError> {
        let mut roster = self.hub.roster();
        if self.hub.settle_membership(&mut roster, room, user) {
            self.metrics.member_transitions_left.inc();
        }
        Ok(())
    }

    async fn members(&self, room: &str, limit: usize) -> Result<Members, BackendError> {
        let roster = self.hub.roster();
        let Some(members) = roster.members.get(room) else {
            return Ok(Members::default());
        };
        Ok(Members {
            users: members.keys().take(limit).cloned().collect(),
            truncated: members.len() > limit,
        })
    }

    async fn member_states(
        &self,
        room: &str,
        users: &[String],
    ) -> Result<Vec<Announced>, BackendError> {
        let roster = self.hub.roster();
        let members = roster.members.get(room);
        Ok(users
            .iter()
            .map(|u| {
                members
                    .and_then(|m| m.get(u).copied())
                    .unwrap_or(Announced::NONE)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::bounded;

    fn backend(
        hub: &Arc<LocalHub>,
        id: &str,
    ) -> (LocalBackend, crate::queue::BoundedReceiver<Inbound>) {
        let (tx, rx) = bounded(8, 1 << 20);
        (LocalBackend::new(hub.clone(), id, tx, Metrics::new()), rx)
    }

    #[tokio::test]
    async fn publish_reaches_subscribers_only() {
        let hub = Arc::new(LocalHub::default());
        let (b1, mut rx1) = backend(&hub, "i1");
        let (b2, mut rx2) = backend(&hub, "i2");
        b2.subscribe(Channel::Instance("i2")).await.expect("sub");
        let x = Bytes::from_static(b"x");
        assert_eq!(
            b1.publish(Channel::Instance("i2"), x.clone())
                .await
                .expect("pub"),
            1
        );
        assert_eq!(
            b1.publish(Channel::Instance("i3"), x.clone())
                .await
                .expect("pub"),
            0
        );
        assert_eq!(rx2.try_recv().map(|m| m.payload), Some(x.clone()));
        assert!(rx1.try_recv().is_none());
        b2.unsubscribe(Channel::Instance("i2"))
            .await
            .expect("unsub");
        assert_eq!(
            b1.publish(Channel::Instance("i2"), x).await.expect("pub"),
            0
        );
    }

    #[tokio::test]
    async fn presence_counts_per_instance() {
        let hub = Arc::new(LocalHub::default());
        let (p1, _rx1) = backend(&hub, "i1");
        let (p2, _rx2) = backend(&hub, "i2");
        p1.connect("bob").await.expect("ok");
        p1.connect("bob").await.expect("ok");
        p2.connect("bob").await.expect("ok");
        let mut h = p1.locate("bob").await.expect("ok");
        h.sort_by(|a, b| a.instance.cmp(&b.instance));
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].connections, 2);
        p1.disconnect("bob").await.expect("ok");
        p1.disconnect("bob").await.expect("ok");
        assert_eq!(p2.locate("bob").await.expect("ok").len(), 1);
        p2.withdraw().await.expect("ok");
        assert!(p1.locate("bob").await.expect("ok").is_empty());
    }
}
