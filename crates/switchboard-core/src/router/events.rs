//! The router's side of presence events: watches (`watch`, `unwatch`, and
//! their end with the connection), the grace before a user or a room
//! membership is settled, room member listings, and reconciliation after
//! the bus may have lost events. The backend decides and announces
//! transitions; this decides when to ask it to, and [`Watches`] which local
//! connection hears of what.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;

use super::{RouteError, Router};
use crate::metrics::Metrics;
use crate::presence::{Members, Presence};
use crate::protocol::{RequestId, ServerFrame};
use crate::registry::ConnHandle;
use crate::registry::Registry;
use crate::watch::Watches;

/// Users per backend read during reconciliation.
const RECONCILE_CHUNK: usize = 1000;
/// Attempts to settle a user (one a second after the first) while the
/// backend fails, before leaving it to the backend's own re-assertion.
const SETTLE_ATTEMPTS: u32 = 30;

/// How presence events behave; the server sets them from its flags.
#[derive(Debug, Clone, Copy)]
pub struct PresenceSettings {
    /// How long a user (a room membership) with no connection left stays
    /// announced, so a reconnect within it is no event at all.
    pub grace: Duration,
    /// Most members one `members` reply lists.
    pub max_members_listed: usize,
    /// How long after the bus re-established its subscriptions the watched
    /// states are re-read: long enough for every live instance to have
    /// re-asserted its presence (one lease), so a Redis that restarted
    /// empty does not make users who stayed connected flap.
    pub reconcile_after: Duration,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        PresenceSettings {
            grace: Duration::from_millis(2000),
            max_members_listed: 1000,
            reconcile_after: Duration::from_secs(10),
        }
    }
}

/// Why a watch was not carried out.
#[derive(Debug)]
pub enum WatchError {
    /// It would exceed the connection's watch limit; nothing was watched.
    LimitExceeded,
    /// The backend failed; nothing new was watched.
    Route(RouteError),
}

/// What is waiting for its grace to pass, by subject key (`user`, or
/// `room user`), each with the generation of its latest schedule: a newer
/// schedule (the user came and went again) supersedes an older one.
#[derive(Debug, Default)]
pub(super) struct Pending {
    generations: DashMap<String, u64>,
    next: AtomicU64,
    running: AtomicUsize,
    idle: Notify,
    reconcile_scheduled: AtomicBool,
}

/// What a grace ends for.
#[derive(Debug, Clone)]
enum Subject {
    User(Arc<str>),
    Member { room: Arc<str>, user: Arc<str> },
}

impl Subject {
    fn key(&self) -> String {
        match self {
            Subject::User(user) => user.to_string(),
            Subject::Member { room, user } => format!("{room} {user}"),
        }
    }
}

/// What ending a grace needs, owned, so a task can do it.
#[derive(Clone)]
pub(super) struct Graces {
    pub(super) presence: Arc<dyn Presence>,
    pub(super) registry: Arc<Registry>,
    pub(super) pending: Arc<Pending>,
    pub(super) grace: Duration,
}

impl Graces {
    /// Records that `user`'s last local connection in `room` left, and
    /// settles the membership after the grace.
    pub(super) async fn member_gone(&self, room: &str, user: &Arc<str>) {
        if let Err(e) = self.presence.leave_room(room, user).await {
            tracing::warn!(error = %e, room, "room membership write failed on leave");
        }
        self.settle_later(Subject::Member {
            room: Arc::from(room),
            user: user.clone(),
        });
    }

    fn settle_later(&self, subject: Subject) {
        let key = subject.key();
        let generation = self.pending.next.fetch_add(1, Ordering::Relaxed);
        self.pending.generations.insert(key.clone(), generation);
        self.pending.running.fetch_add(1, Ordering::AcqRel);
        let (pending, presence, registry) = (
            self.pending.clone(),
            self.presence.clone(),
            self.registry.clone(),
        );
        let grace = self.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            for attempt in 0..SETTLE_ATTEMPTS {
                let current = pending.generations.get(&key).map(|g| *g);
                if current != Some(generation) {
                    break; // superseded: a later schedule settles it
                }
                let settled = match &subject {
                    Subject::User(user) if registry.holds(user) => break,
                    Subject::User(user) => presence.settle(user).await,
                    Subject::Member { room, user } if registry.user_members(room, user) > 0 => {
                        break
                    }
                    Subject::Member { room, user } => presence.settle_member(room, user).await,
                };
                match settled {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, attempt, "settling failed; will retry");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            pending.generations.remove_if(&key, |_, g| *g == generation);
            if pending.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                pending.idle.notify_waiters();
            }
        });
    }
}

impl Router {
    /// Starts watching `users` for `conn` and queues the reply (their
    /// current states) itself, so that every later event follows it.
    pub async fn watch(
        &self,
        conn: &Arc<ConnHandle>,
        id: Option<&RequestId>,
        users: &[String],
        max: usize,
    ) -> Result<(), WatchError> {
        let Some(fresh) = conn.add_watches(users, max) else {
            return Err(WatchError::LimitExceeded);
        };
        let all: Vec<Arc<str>> = users.iter().map(|u| Arc::from(u.as_str())).collect();
        {
            let _guards = self.watch_locks.lock_many(all.iter().map(|u| &**u)).await;
            let first = self.watches.add(conn, &fresh);
            if !first.is_empty() {
                let names: Vec<String> = first.iter().map(|u| u.to_string()).collect();
                match self.presence.watch(&names).await {
                    Ok(states) => self.watches.merge(&first, &states),
                    Err(e) => {
                        let gone: Vec<String> = fresh.iter().map(|u| u.to_string()).collect();
                        conn.remove_watches(&gone);
                        self.watches.remove(conn, &fresh);
                        // Best effort: some may have been registered.
                        let _ = self.presence.unwatch(&names).await;
                        self.metrics.watched_users.set(self.watches.len() as i64);
                        return Err(WatchError::Route(RouteError::from(&e)));
                    }
                }
            }
        }
        self.metrics.watched_users.set(self.watches.len() as i64);
        self.watches.hold(conn, &all);
        let replied = self.watches.current(users);
        let reply = ServerFrame::Presence {
            id,
            online: replied.clone(),
        }
        .to_frame();
        conn.send_text(reply, &self.metrics);
        self.watches.confirm(conn, &replied, &self.metrics);
        Ok(())
    }

    /// Stops watching `users` for `conn`.
    pub async fn unwatch(&self, conn: &ConnHandle, users: &[String]) {
        let gone = conn.remove_watches(users);
        self.release_watches(conn, gone).await;
    }

    /// Ends every watch of a closing connection.
    pub(super) async fn end_watches(&self, conn: &ConnHandle) {
        let gone = conn.take_watches();
        self.release_watches(conn, gone).await;
    }

    async fn release_watches(&self, conn: &ConnHandle, users: Vec<Arc<str>>) {
        if users.is_empty() {
            return;
        }
        let _guards = self.watch_locks.lock_many(users.iter().map(|u| &**u)).await;
        let last = self.watches.remove(conn, &users);
        self.metrics.watched_users.set(self.watches.len() as i64);
        if last.is_empty() {
            return;
        }
        let names: Vec<String> = last.iter().map(|u| u.to_string()).collect();
        if let Err(e) = self.presence.unwatch(&names).await {
            // Events for them are dropped on arrival (nobody watches).
            tracing::warn!(error = %e, "unwatch failed");
        }
    }

    /// The announced members of `room`, cluster-wide.
    pub async fn members(&self, room: &str) -> Result<Members, RouteError> {
        self.presence
            .members(room, self.presence_settings.max_members_listed)
            .await
            .map_err(|e| RouteError::from(&e))
    }

    /// `user`'s last local connection closed: settle it after the grace.
    pub(super) fn user_gone_later(&self, user: &Arc<str>) {
        self.graces.settle_later(Subject::User(user.clone()));
    }

    /// `user`'s last local connection in `room` left.
    pub(super) async fn member_gone(&self, room: &str, user: &Arc<str>) {
        self.graces.member_gone(room, user).await;
    }

    /// `user`'s first local connection in `room` joined.
    pub(super) async fn member_came(&self, room: &str, user: &str) {
        if let Err(e) = self.presence.join_room(room, user).await {
            tracing::warn!(error = %e, room, "room membership write failed on join");
        }
    }

    /// Waits (at most `limit`) until every grace running has ended and its
    /// user or membership was settled: a draining instance calls it after
    /// closing its connections, so users who reconnect elsewhere within the
    /// grace are no event, and the others are announced gone before it
    /// withdraws.
    pub async fn settle_pending(&self, limit: Duration) {
        let done = async {
            loop {
                let idle = self.graces.pending.idle.notified();
                if self.graces.pending.running.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(limit, done).await;
    }

    /// The bus re-established its subscriptions: events may have been
    /// lost. Re-read every watched user and every known room member after
    /// [`PresenceSettings::reconcile_after`] and tell the differences.
    pub(super) fn reconcile_later(&self) {
        if self
            .graces
            .pending
            .reconcile_scheduled
            .swap(true, Ordering::AcqRel)
        {
            return;
        }
        let parts = Reconcile {
            watches: self.watches.clone(),
            presence: self.presence.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
        };
        let (pending, after) = (
            self.graces.pending.clone(),
            self.presence_settings.reconcile_after,
        );
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            pending.reconcile_scheduled.store(false, Ordering::Release);
            parts.run().await;
        });
    }

    /// Re-reads the watched users and the known members of local rooms
    /// from the backend, taking what it says as the truth.
    pub async fn reconcile(&self) {
        Reconcile {
            watches: self.watches.clone(),
            presence: self.presence.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
        }
        .run()
        .await;
    }

    /// Whether a local connection watches `user` (tests and metrics).
    pub fn is_watched(&self, user: &str) -> bool {
        self.watches.is_watched(user)
    }
}

/// What a reconciliation needs, owned, so it can run in a task.
struct Reconcile {
    watches: Arc<Watches>,
    presence: Arc<dyn Presence>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl Reconcile {
    async fn run(&self) {
        self.metrics.presence_reconciles.inc();
        let users = self.watches.watched();
        for chunk in users.chunks(RECONCILE_CHUNK) {
            let names: Vec<String> = chunk.iter().map(|u| u.to_string()).collect();
            match self.presence.announced(&names).await {
                Ok(states) => {
                    for (user, state) in chunk.iter().zip(states) {
                        self.watches.reconcile(user, state, &self.metrics);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reconciling watched presence failed");
                    return;
                }
            }
        }
        for room in self.watches.rooms() {
            let known = self.watches.known_members(&room);
            for chunk in known.chunks(RECONCILE_CHUNK) {
                let names: Vec<String> = chunk.iter().map(|(u, _)| u.to_string()).collect();
                match self.presence.member_states(&room, &names).await {
                    Ok(states) => {
                        for ((user, _), state) in chunk.iter().zip(states) {
                            self.watches.member_event(
                                &self.registry,
                                &room,
                                user,
                                state,
                                true,
                                &self.metrics,
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, room = %room, "reconciling room members failed");
                        return;
                    }
                }
            }
        }
    }
}
