//! [`Presence`] over Redis: `sb:presence:{USER}` hashes, each field written
//! only by its own instance (and deleted by the reaper once that instance is
//! dead), read through the live view so dead instances are ignored.
//!
//! On top of the counts, **user-level transitions** (see the trait): the
//! announced state of a user is `sb:online:{USER}` and that of a room
//! member a field of `sb:members:{ROOM}`, each changed only by a script
//! that also changes the counts (`scripts::PresenceScripts`), so of many
//! instances racing exactly one announces a transition. A presence
//! transition is published by the instance whose script announced it, as a
//! `P` envelope on the personal channel of every instance in the user's
//! `sb:watchers:{USER}` hash that the live view says may be alive (on a
//! cluster those channels live in other slots, so a script cannot publish
//! them); a member transition is published by its script on the room's
//! channel, which shares the room's slot.
//!
//! What this instance wants (connections, watches, memberships) is kept
//! locally too — that is the truth a resync writes back — and so is what it
//! still owes a settle: **lingering** users and memberships (the last local
//! connection went, the router settles them a grace later). They stay
//! listed in the instance's sets until settled, so a reaper settles them
//! if this process dies meanwhile.
//!
//! A publish that fails after its script announced is logged, not retried:
//! the transition is recorded, and a publish fails when Redis (or, on a
//! cluster, the node of the watcher's channel) is failing, which also costs
//! the watcher its subscription — it catches up by reconciling once
//! resubscribed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use redis::{Cmd, Value};

use switchboard_core::bus::Envelope;
use switchboard_core::error::BackendError;
use switchboard_core::presence::{Announced, Holder, Members, Presence};

use crate::conn::MaintenanceConn;
use crate::store::{array, int, text};
use crate::{maintenance_error, RedisBackend};

/// Users (watches, memberships) per resync, reap or withdrawal pipeline:
/// big enough that 20,000 users take a few round trips, small enough that
/// each takes milliseconds.
pub(crate) const PER_PIPELINE: usize = 1000;

/// A presence transition a script announced, to be published to the
/// instances watching the user.
#[derive(Debug)]
pub(crate) struct Transition {
    user: String,
    online: bool,
    version: u64,
    ts_ms: u64,
    /// Every instance the watchers hash listed (live or not).
    watchers: Vec<String>,
}

fn malformed(what: &str) -> BackendError {
    BackendError::unavailable(format!("unexpected reply from a presence script: {what}"))
}

/// Parses a presence script's reply: `{count}`, or `{count, version, ts,
/// watcher...}` when it announced (online for `PRESENCE_UP`/`ASSERT`,
/// offline for `PRESENCE_SETTLE`).
pub(crate) fn presence_reply(
    user: &str,
    online: bool,
    reply: Value,
) -> Result<(i64, Option<Transition>), BackendError> {
    let items = array(reply).ok_or_else(|| malformed("not an array"))?;
    let count = items
        .first()
        .and_then(int)
        .ok_or_else(|| malformed("count"))?;
    if items.len() < 3 {
        return Ok((count, None));
    }
    let number = |i: usize| -> Result<u64, BackendError> {
        items
            .get(i)
            .and_then(text)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| malformed("version"))
    };
    let transition = Transition {
        user: user.to_owned(),
        online,
        version: number(1)?,
        ts_ms: number(2)?,
        watchers: items[3..]
            .iter()
            .filter_map(|w| text(w).map(str::to_owned))
            .collect(),
    };
    Ok((count, Some(transition)))
}

/// A stored state, `VERSION TS_MS`, as an announced online (member) state.
fn parse_state(state: &str) -> Option<Announced> {
    let (version, ts_ms) = state.split_once(' ')?;
    Some(Announced {
        online: true,
        version: version.parse().ok()?,
        ts_ms: ts_ms.parse().ok()?,
    })
}

/// A `GET`/`HMGET` answer: nil is not announced.
fn state_of(value: &Value) -> Result<Announced, BackendError> {
    match value {
        Value::Nil => Ok(Announced::NONE),
        other => text(other)
            .and_then(parse_state)
            .ok_or_else(|| malformed("a presence state")),
    }
}

/// `ROOM USER`: how a membership is named in the instance's rooms set and
/// in this instance's local maps (names never contain spaces).
fn membership(room: &str, user: &str) -> String {
    format!("{room} {user}")
}

/// The first error of a batch, kept while the rest is still handled.
fn keep_first(first: &mut Option<BackendError>, e: redis::RedisError) {
    if first.is_none() {
        *first = Some(maintenance_error(e));
    }
}

impl RedisBackend {
    fn holders(&self, fields: Vec<(String, i64)>) -> Vec<Holder> {
        let live = self.live_view();
        fields
            .into_iter()
            .filter(|(instance, n)| *n > 0 && live.may_be_alive(instance))
            .map(|(instance, n)| Holder {
                instance: Arc::from(instance),
                connections: u32::try_from(n).unwrap_or(u32::MAX),
            })
            .collect()
    }

    /// The keys of the presence scripts for `user`: presence, online, watchers.
    fn presence_keys(&self, user: &str) -> [String; 3] {
        [
            self.keys.presence(user),
            self.keys.online(user),
            self.keys.watchers(user),
        ]
    }

    /// `PRESENCE_SETTLE` of `user`, deleting `drop`'s field first (`""`:
    /// none), as a batchable command.
    pub(crate) fn settle_cmd(&self, user: &str, drop: &str) -> Cmd {
        let [presence, online, watchers] = self.presence_keys(user);
        let mut cmd = self
            .presence_scripts
            .settle
            .evalsha(&[&presence, &online, &watchers]);
        cmd.arg(drop);
        cmd
    }

    /// `PRESENCE_ASSERT` of `user` with this instance's `count`.
    pub(crate) fn assert_cmd(&self, user: &str, count: u32) -> Cmd {
        let [presence, online, watchers] = self.presence_keys(user);
        let mut cmd = self
            .presence_scripts
            .assert
            .evalsha(&[&presence, &online, &watchers]);
        cmd.arg(&*self.instance).arg(count);
        cmd
    }

    /// A member script (`MEMBER_UP`/`ASSERT` with `inst`, `MEMBER_SETTLE`
    /// with `inst` or `""`) on `room`'s keys, as a batchable command.
    pub(crate) fn member_cmd(&self, settle: bool, inst: &str, room: &str, user: &str) -> Cmd {
        let script = if settle {
            &self.presence_scripts.member_settle
        } else {
            &self.presence_scripts.member_up
        };
        let channel = self.keys.room_channel(room);
        let mut cmd = script.evalsha(&[
            &self.keys.room_memberships(room),
            &self.keys.room_counts(room),
            &self.keys.room_members(room),
        ]);
        cmd.arg(inst)
            .arg(user)
            .arg(room)
            .arg(&channel)
            .arg(self.publish_command(&channel));
        cmd
    }

    /// `MEMBER_LEAVE` of this instance's membership of `user` in `room`.
    pub(crate) fn member_leave_cmd(&self, room: &str, user: &str) -> Cmd {
        let mut cmd = self.presence_scripts.member_leave.evalsha(&[
            &self.keys.room_memberships(room),
            &self.keys.room_counts(room),
        ]);
        cmd.arg(&*self.instance).arg(user);
        cmd
    }

    /// The `P` publishes of `transitions`: one per watcher the live view
    /// says may be alive (this instance included), on its personal channel.
    fn presence_publishes(&self, transitions: &[Transition]) -> Vec<Cmd> {
        let live = self.live_view();
        let mut cmds = Vec::new();
        for t in transitions {
            if t.online {
                self.metrics.presence_transitions_online.inc();
            } else {
                self.metrics.presence_transitions_offline.inc();
            }
            let payload = Envelope::Presence {
                user: &t.user,
                online: t.online,
                version: t.version,
                ts_ms: t.ts_ms,
            }
            .encode(b"");
            for watcher in t.watchers.iter().filter(|w| live.may_be_alive(w)) {
                let channel = self.keys.personal_channel(watcher);
                let mut publish = redis::cmd(self.publish_command(&channel));
                publish.arg(&channel).arg(payload.as_ref());
                cmds.push(publish);
            }
        }
        cmds
    }

    /// Counts and publishes a transition announced on the message path.
    async fn announce(&self, transition: Transition) {
        let publishes = self.presence_publishes(std::slice::from_ref(&transition));
        if publishes.is_empty() {
            return;
        }
        let published = async {
            let mut conn = self.message_path()?;
            self.timed(conn.query_each(publishes)).await
        }
        .await;
        if let Err(e) = published {
            tracing::warn!(
                error = %e,
                user = transition.user,
                online = transition.online,
                "a presence event could not be published (its watchers reconcile once \
                 resubscribed)"
            );
        }
    }

    /// Counts and publishes transitions announced by a batch, on a
    /// maintenance connection.
    pub(crate) async fn announce_batch(
        &self,
        conn: &mut MaintenanceConn,
        transitions: &[Transition],
    ) {
        let publishes = self.presence_publishes(transitions);
        if publishes.is_empty() {
            return;
        }
        if let Err(e) = conn.run_all(publishes).await {
            tracing::warn!(
                error = %e,
                transitions = transitions.len(),
                "presence events could not be published (their watchers reconcile once \
                 resubscribed)"
            );
        }
    }

    /// Drift between Redis and the local truth (Redis lost or doubled a
    /// write: restart, failed earlier write): the next heartbeat writes the
    /// local truth back.
    fn check_drift(&self, user: &str, redis: i64, local: u32) {
        if redis != i64::from(local) {
            tracing::debug!(user, redis, local, "presence drift; resync scheduled");
            self.resync_needed.store(true, Ordering::Relaxed);
        }
    }

    /// One more connection here: listed, counted, announced online if it
    /// was not. Callers hold the user's lock.
    async fn up(&self, user: &str, local_count: u32) -> Result<(), BackendError> {
        let mut conn = self.message_path()?;
        // Listed before the field exists, so a reaper always finds it.
        let mut sadd = redis::cmd("SADD");
        sadd.arg(self.keys.instance_users(&self.instance)).arg(user);
        self.timed(sadd.query_async::<()>(&mut conn)).await?;
        let [presence, online, watchers] = self.presence_keys(user);
        let mut up = self.presence_scripts.up.key(presence);
        up.key(online).key(watchers).arg(&*self.instance);
        let reply: Value = self.timed(up.invoke_async(&mut conn)).await?;
        let (count, transition) = presence_reply(user, true, reply)?;
        self.check_drift(user, count, local_count);
        if let Some(transition) = transition {
            self.announce(transition).await;
        }
        Ok(())
    }

    /// One connection fewer here; at zero the field goes but the user
    /// stays listed (lingering). Callers hold the user's lock.
    async fn down(&self, user: &str, local_count: u32) -> Result<(), BackendError> {
        let mut conn = self.message_path()?;
        let mut adjust = self.adjust_presence.key(self.keys.presence(user));
        adjust.arg(&*self.instance).arg(-1);
        let count: i64 = self.timed(adjust.invoke_async(&mut conn)).await?;
        self.check_drift(user, count, local_count);
        Ok(())
    }

    async fn change(&self, user: &str, delta: i64) -> Result<(), BackendError> {
        let _guard = self.user_locks.lock(user).await;
        let (before, local_count) = {
            let mut entry = self.desired.entry(user.to_owned()).or_insert(0);
            let before = *entry;
            *entry = if delta > 0 {
                before + 1
            } else {
                before.saturating_sub(1)
            };
            (before, *entry)
        };
        if local_count == 0 {
            self.desired.remove_if(user, |_, n| *n == 0);
            switchboard_core::registry::shrink_if_sparse(&self.desired);
            if before > 0 {
                self.lingering.insert(user.to_owned(), ());
            }
        } else {
            self.lingering.remove(user);
        }
        let written = if delta > 0 {
            self.up(user, local_count).await
        } else {
            self.down(user, local_count).await
        };
        written.inspect_err(|_| {
            self.resync_needed.store(true, Ordering::Relaxed);
        })
    }

    /// Settles `users` of instance `inst` (deleting its field of each
    /// first), [`PER_PIPELINE`] per round trip, and publishes the offline
    /// transitions they announce. Returns the users settled; the first
    /// failure after every chunk was tried.
    pub(crate) async fn settle_users(
        &self,
        conn: &mut MaintenanceConn,
        inst: &str,
        users: &[String],
    ) -> (Vec<String>, Option<BackendError>) {
        let mut settled = Vec::with_capacity(users.len());
        let mut first = None;
        for chunk in users.chunks(PER_PIPELINE) {
            let cmds = chunk
                .iter()
                .map(|user| self.settle_cmd(user, inst))
                .collect();
            let replies = match conn
                .query_scripts(&[&self.presence_scripts.settle], cmds)
                .await
            {
                Ok(replies) => replies,
                Err(e) => {
                    first.get_or_insert(e);
                    continue;
                }
            };
            let mut transitions = Vec::new();
            for (user, reply) in chunk.iter().zip(replies) {
                match reply
                    .map_err(maintenance_error)
                    .and_then(|r| presence_reply(user, false, r))
                {
                    Ok((_, transition)) => {
                        transitions.extend(transition);
                        settled.push(user.clone());
                    }
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            self.announce_batch(conn, &transitions).await;
        }
        (settled, first)
    }

    /// Settles memberships (`ROOM USER`) of instance `inst` (deleting its
    /// membership first), [`PER_PIPELINE`] per round trip; the scripts
    /// publish what they announce. Returns the memberships settled (an
    /// unreadable item counts as settled: there is nothing to settle) and
    /// the first failure.
    pub(crate) async fn settle_memberships(
        &self,
        conn: &mut MaintenanceConn,
        inst: &str,
        memberships: &[String],
    ) -> (Vec<String>, Option<BackendError>) {
        let mut settled = Vec::with_capacity(memberships.len());
        let mut first = None;
        for chunk in memberships.chunks(PER_PIPELINE) {
            let mut items = Vec::with_capacity(chunk.len());
            let mut cmds = Vec::with_capacity(chunk.len());
            for item in chunk {
                match item.split_once(' ') {
                    Some((room, user)) => {
                        cmds.push(self.member_cmd(true, inst, room, user));
                        items.push(item);
                    }
                    None => settled.push(item.clone()),
                }
            }
            let replies = match conn
                .query_scripts(&[&self.presence_scripts.member_settle], cmds)
                .await
            {
                Ok(replies) => replies,
                Err(e) => {
                    first.get_or_insert(e);
                    continue;
                }
            };
            for (item, reply) in items.into_iter().zip(replies) {
                match reply {
                    Ok(reply) => {
                        if int(&reply) == Some(1) {
                            self.metrics.member_transitions_left.inc();
                        }
                        settled.push(item.clone());
                    }
                    Err(e) => keep_first(&mut first, e),
                }
            }
        }
        (settled, first)
    }

    /// Deletes instance `inst`'s watcher field of each of `users`.
    pub(crate) async fn drop_watcher_fields(
        &self,
        conn: &mut MaintenanceConn,
        inst: &str,
        users: &[String],
    ) -> Result<(), BackendError> {
        for chunk in users.chunks(PER_PIPELINE) {
            let deletes = chunk
                .iter()
                .map(|user| {
                    let mut hdel = redis::cmd("HDEL");
                    hdel.arg(self.keys.watchers(user)).arg(inst);
                    hdel
                })
                .collect();
            conn.run_all(deletes).await?;
        }
        Ok(())
    }

    /// The members of one of this instance's sets, and the local entries
    /// that belong there too, sorted and deduplicated.
    pub(crate) async fn listed_and<'a>(
        &self,
        conn: &mut MaintenanceConn,
        set: &str,
        local: impl IntoIterator<Item = &'a dashmap::DashMap<String, ()>>,
    ) -> Result<Vec<String>, BackendError> {
        let mut items: Vec<String> = redis::cmd("SMEMBERS")
            .arg(set)
            .query_async(conn)
            .await
            .map_err(maintenance_error)?;
        for map in local {
            items.extend(map.iter().map(|e| e.key().clone()));
        }
        items.sort_unstable();
        items.dedup();
        Ok(items)
    }
}

#[async_trait]
impl Presence for RedisBackend {
    async fn connect(&self, user: &str) -> Result<(), BackendError> {
        self.change(user, 1).await
    }

    async fn disconnect(&self, user: &str) -> Result<(), BackendError> {
        self.change(user, -1).await
    }

    /// Under the user's lock: a user connected here again is only no longer
    /// lingering; otherwise `PRESENCE_SETTLE` (this instance's field deleted
    /// first, so a failed disconnect cannot keep the user online), the
    /// offline event published, then the user unlisted.
    async fn settle(&self, user: &str) -> Result<(), BackendError> {
        let _guard = self.user_locks.lock(user).await;
        if self.desired.contains_key(user) {
            self.lingering.remove(user);
            return Ok(());
        }
        let mut conn = self.message_path()?;
        let [presence, online, watchers] = self.presence_keys(user);
        let mut settle = self.presence_scripts.settle.key(presence);
        settle.key(online).key(watchers).arg(&*self.instance);
        let reply: Value = self.timed(settle.invoke_async(&mut conn)).await?;
        let (_, transition) = presence_reply(user, false, reply)?;
        if let Some(transition) = transition {
            self.announce(transition).await;
        }
        let mut srem = redis::cmd("SREM");
        srem.arg(self.keys.instance_users(&self.instance)).arg(user);
        self.timed(srem.query_async::<()>(&mut conn)).await?;
        self.lingering.remove(user);
        switchboard_core::registry::shrink_if_sparse(&self.lingering);
        Ok(())
    }

    /// Listed in the watching set first (so a reaper finds the fields),
    /// then `WATCH_USER` per user, pipelined (split by slot on a cluster).
    /// On failure the users this call added are forgotten again and a
    /// resync clears whatever was written.
    async fn watch(&self, users: &[String]) -> Result<Vec<Announced>, BackendError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let _watches = self.watch_lock.read().await;
        let added: Vec<&String> = users
            .iter()
            .filter(|user| self.watching.insert((*user).clone(), ()).is_none())
            .collect();
        let watched = async {
            let mut conn = self.message_path()?;
            let mut sadd = redis::cmd("SADD");
            sadd.arg(self.keys.instance_watching(&self.instance))
                .arg(users);
            self.timed(sadd.query_async::<()>(&mut conn)).await?;
            let cmds = users
                .iter()
                .map(|user| {
                    let mut cmd = self
                        .presence_scripts
                        .watch
                        .evalsha(&[&self.keys.watchers(user), &self.keys.online(user)]);
                    cmd.arg(&*self.instance);
                    cmd
                })
                .collect();
            let replies = self
                .timed(conn.query_scripts(&[&self.presence_scripts.watch], cmds))
                .await?;
            replies
                .into_iter()
                .map(|reply| {
                    let reply = reply.map_err(crate::classify)?;
                    state_of(&reply)
                })
                .collect::<Result<Vec<Announced>, BackendError>>()
        }
        .await;
        if watched.is_err() {
            for user in added {
                self.watching.remove(user);
            }
            self.resync_needed.store(true, Ordering::Relaxed);
        }
        watched
    }

    /// Forgotten locally at once; the fields deleted, then the users
    /// unlisted. A failure leaves stale fields (events this instance drops)
    /// for the next resync to delete.
    async fn unwatch(&self, users: &[String]) -> Result<(), BackendError> {
        if users.is_empty() {
            return Ok(());
        }
        let _watches = self.watch_lock.read().await;
        for user in users {
            self.watching.remove(user);
        }
        switchboard_core::registry::shrink_if_sparse(&self.watching);
        let unwatched = async {
            let mut conn = self.message_path()?;
            let deletes = users
                .iter()
                .map(|user| {
                    let mut hdel = redis::cmd("HDEL");
                    hdel.arg(self.keys.watchers(user)).arg(&*self.instance);
                    hdel
                })
                .collect();
            self.timed(conn.query_each(deletes)).await?;
            let mut srem = redis::cmd("SREM");
            srem.arg(self.keys.instance_watching(&self.instance))
                .arg(users);
            self.timed(srem.query_async::<()>(&mut conn)).await
        }
        .await;
        unwatched.inspect_err(|_| self.resync_needed.store(true, Ordering::Relaxed))
    }

    async fn announced(&self, users: &[String]) -> Result<Vec<Announced>, BackendError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let reads = users
            .iter()
            .map(|user| {
                let mut get = redis::cmd("GET");
                get.arg(self.keys.online(user));
                get
            })
            .collect();
        let mut conn = self.message_path()?;
        let states = self.timed(conn.query_each(reads)).await?;
        states.iter().map(state_of).collect()
    }

    /// Listed in the rooms set first, then `MEMBER_UP` (which publishes
    /// `member_joined` when it announces).
    async fn join_room(&self, room: &str, user: &str) -> Result<(), BackendError> {
        let key = membership(room, user);
        let _guard = self.room_locks.lock(&key).await;
        self.memberships.insert(key.clone(), ());
        self.lingering_members.remove(&key);
        let joined = async {
            let mut conn = self.message_path()?;
            let mut sadd = redis::cmd("SADD");
            sadd.arg(self.keys.instance_rooms(&self.instance)).arg(&key);
            self.timed(sadd.query_async::<()>(&mut conn)).await?;
            let up = self.member_cmd(false, &self.instance, room, user);
            let replies = self
                .timed(conn.query_scripts(&[&self.presence_scripts.member_up], vec![up]))
                .await?;
            for reply in replies {
                if int(&reply.map_err(crate::classify)?) == Some(1) {
                    self.metrics.member_transitions_joined.inc();
                }
            }
            Ok(())
        }
        .await;
        joined.inspect_err(|_| self.resync_needed.store(true, Ordering::Relaxed))
    }

    async fn leave_room(&self, room: &str, user: &str) -> Result<(), BackendError> {
        let key = membership(room, user);
        let _guard = self.room_locks.lock(&key).await;
        if self.memberships.remove(&key).is_some() {
            self.lingering_members.insert(key.clone(), ());
        }
        switchboard_core::registry::shrink_if_sparse(&self.memberships);
        let left = async {
            let mut conn = self.message_path()?;
            let leave = self.member_leave_cmd(room, user);
            let replies = self
                .timed(conn.query_scripts(&[&self.presence_scripts.member_leave], vec![leave]))
                .await?;
            for reply in replies {
                reply.map_err(crate::classify)?;
            }
            Ok(())
        }
        .await;
        left.inspect_err(|_| self.resync_needed.store(true, Ordering::Relaxed))
    }

    /// [`Presence::settle`] for a membership: `MEMBER_SETTLE` (this
    /// instance's membership deleted first; the script publishes
    /// `member_left`), then the membership unlisted.
    async fn settle_member(&self, room: &str, user: &str) -> Result<(), BackendError> {
        let key = membership(room, user);
        let _guard = self.room_locks.lock(&key).await;
        if self.memberships.contains_key(&key) {
            self.lingering_members.remove(&key);
            return Ok(());
        }
        let mut conn = self.message_path()?;
        let settle = self.member_cmd(true, &self.instance, room, user);
        let replies = self
            .timed(conn.query_scripts(&[&self.presence_scripts.member_settle], vec![settle]))
            .await?;
        for reply in replies {
            if int(&reply.map_err(crate::classify)?) == Some(1) {
                self.metrics.member_transitions_left.inc();
            }
        }
        let mut srem = redis::cmd("SREM");
        srem.arg(self.keys.instance_rooms(&self.instance)).arg(&key);
        self.timed(srem.query_async::<()>(&mut conn)).await?;
        self.lingering_members.remove(&key);
        switchboard_core::registry::shrink_if_sparse(&self.lingering_members);
        Ok(())
    }

    async fn members(&self, room: &str, limit: usize) -> Result<Members, BackendError> {
        let mut conn = self.message_path()?;
        let mut hkeys = redis::cmd("HKEYS");
        hkeys.arg(self.keys.room_members(room));
        let mut users: Vec<String> = self.timed(hkeys.query_async(&mut conn)).await?;
        users.sort_unstable();
        let truncated = users.len() > limit;
        users.truncate(limit);
        Ok(Members { users, truncated })
    }

    async fn member_states(
        &self,
        room: &str,
        users: &[String],
    ) -> Result<Vec<Announced>, BackendError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.message_path()?;
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(self.keys.room_members(room)).arg(users);
        let states: Vec<Value> = self.timed(hmget.query_async(&mut conn)).await?;
        states.iter().map(state_of).collect()
    }

    async fn locate(&self, user: &str) -> Result<Vec<Holder>, BackendError> {
        let mut conn = self.message_path()?;
        let mut hgetall = redis::cmd("HGETALL");
        hgetall.arg(self.keys.presence(user));
        let fields: Vec<(String, i64)> = self.timed(hgetall.query_async(&mut conn)).await?;
        Ok(self.holders(fields))
    }

    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, BackendError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let reads = users
            .iter()
            .map(|user| {
                let mut hgetall = redis::cmd("HGETALL");
                hgetall.arg(self.keys.presence(user));
                hgetall
            })
            .collect();
        let mut conn = self.message_path()?;
        let all = self.timed(conn.query_each(reads)).await?;
        all.into_iter()
            .map(|fields| {
                let fields: Vec<(String, i64)> = redis::from_redis_value(fields)
                    .map_err(|e| BackendError::Unavailable(Box::new(e)))?;
                Ok(self.holders(fields))
            })
            .collect()
    }

    /// Deletes this instance's watcher fields, then settles every user and
    /// membership it lists or holds (each field deleted, and announced gone
    /// when no other instance holds it), deletes its sets and index entry,
    /// and gives the lease back — all only while this process holds the
    /// lease (checked, and kept, first): if another process took the id
    /// over, its entries are not this process's to delete. The lease is
    /// given back last, so no process with this id can start writing while
    /// these entries are being deleted.
    async fn withdraw(&self) -> Result<(), BackendError> {
        if self.refresh_lease().await? == crate::maintenance::LeaseState::Taken {
            tracing::warn!("not withdrawing presence: another process holds this instance id");
            self.forget_local_truth();
            return Ok(());
        }
        let mut conn = self.maintenance().await?;
        let inst = self.instance.clone();
        let watching_key = self.keys.instance_watching(&inst);
        let users_key = self.keys.instance_users(&inst);
        let rooms_key = self.keys.instance_rooms(&inst);

        let watching = self
            .listed_and(&mut conn, &watching_key, [&self.watching])
            .await?;
        self.drop_watcher_fields(&mut conn, &inst, &watching)
            .await?;

        // Users with a count here are in `desired` only; lingering ones in
        // `lingering`; the set lists both (unless Redis lost it).
        let mut users = self
            .listed_and(&mut conn, &users_key, [&self.lingering])
            .await?;
        users.extend(self.desired.iter().map(|e| e.key().clone()));
        users.sort_unstable();
        users.dedup();
        let (_, failed) = self.settle_users(&mut conn, &inst, &users).await;
        if let Some(e) = failed {
            return Err(e);
        }

        let rooms = self
            .listed_and(
                &mut conn,
                &rooms_key,
                [&self.memberships, &self.lingering_members],
            )
            .await?;
        let (_, failed) = self.settle_memberships(&mut conn, &inst, &rooms).await;
        if let Some(e) = failed {
            return Err(e);
        }

        // Two slots on a cluster (the instance's and the index's): two
        // commands; the instance's three sets share its slot.
        let mut del = redis::cmd("DEL");
        del.arg(&users_key).arg(&watching_key).arg(&rooms_key);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.keys.instances()).arg(&*inst);
        conn.run_all(vec![del, zrem]).await?;
        if !self.release_lease(&mut conn).await? {
            tracing::warn!("the lease of this instance id was taken during withdrawal");
        }
        self.forget_local_truth();
        Ok(())
    }
}

impl RedisBackend {
    /// Drops everything this instance wanted or owed (after withdrawal).
    fn forget_local_truth(&self) {
        self.desired.clear();
        self.lingering.clear();
        self.watching.clear();
        self.memberships.clear();
        self.lingering_members.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn presence_replies_with_and_without_a_transition() {
        let (count, none) =
            presence_reply("bob", true, Value::Array(vec![Value::Int(2)])).expect("a count");
        assert_eq!(count, 2);
        assert!(none.is_none());
        let reply = Value::Array(vec![
            Value::Int(1),
            bulk("1764633600123456"),
            bulk("1764633600123"),
            bulk("i1"),
            bulk("i2"),
        ]);
        let (count, t) = presence_reply("bob", true, reply).expect("a transition");
        let t = t.expect("announced");
        assert_eq!(count, 1);
        assert_eq!(
            (t.version, t.ts_ms),
            (1_764_633_600_123_456, 1_764_633_600_123)
        );
        assert_eq!(t.watchers, ["i1", "i2"]);
        assert!(t.online);
        assert!(presence_reply("bob", true, bulk("x")).is_err());
        let bad = Value::Array(vec![Value::Int(0), bulk("x"), bulk("1")]);
        assert!(presence_reply("bob", false, bad).is_err());
    }

    #[test]
    fn states_parse_or_fail_never_panic() {
        assert_eq!(state_of(&Value::Nil).ok(), Some(Announced::NONE));
        assert_eq!(
            state_of(&bulk("7 8")).ok(),
            Some(Announced {
                online: true,
                version: 7,
                ts_ms: 8
            })
        );
        for bad in ["", "7", "7 x", "x 8"] {
            assert!(state_of(&bulk(bad)).is_err(), "{bad}");
        }
        assert!(state_of(&Value::Int(3)).is_err());
    }
}
