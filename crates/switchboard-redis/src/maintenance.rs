//! The instance's upkeep in Redis, on the maintenance pool: claiming the
//! instance id, the heartbeat (lease and instance index, Redis's clock),
//! re-asserting presence after an outage or a lost lease, reaping dead
//! instances (each exactly once), and the subscription probe.
//!
//! On a Redis Cluster the heartbeat also PINGs every master (the instance
//! is not ready while one is down: the slots it served are unreachable until
//! its replica is promoted) and compares the set of masters with the last
//! one: a change is a failover, and since replication is asynchronous the
//! promoted replica may lack this instance's latest presence writes, so
//! presence is re-asserted and every subscription re-issued at once.
//!
//! Who writes what: an instance writes its own lease, index entry, sets
//! (users, watching, rooms), presence, watcher and membership fields. The
//! one exception is the reaper, which deletes those fields and sets of an
//! instance whose lease expired, after winning an atomic claim on it, and
//! settles its users and memberships (announcing offline, or member_left,
//! those no other instance holds); it never writes a live instance's
//! entries (a paused instance that resumes after being reaped finds its
//! lease absent and writes them all back). Announced states (online keys,
//! room members) are written by whichever instance's script wins the
//! transition.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use switchboard_core::error::BackendError;

use bytes::Bytes;
use redis::cluster_async::ClusterConnection;
use switchboard_core::bus::{ChannelKind, Inbound};

use crate::conn::{master_fingerprint, ping_all_masters, MaintenanceConn, MessageConn};
use crate::presence::{presence_reply, PER_PIPELINE};
use crate::store::int;
use crate::subscriber::PROBE_PREFIX;
use crate::{maintenance_error, LiveView, RedisBackend, RedisSetupError};

/// What a lease refresh found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// This process held it and refreshed it.
    Held,
    /// It had vanished (expired during a pause, or Redis restarted empty);
    /// it is held again, and presence must be re-asserted.
    Retaken,
    /// Another process holds this instance id now.
    Taken,
}

/// What a heartbeat learned from the instance index.
#[derive(Debug)]
pub(crate) struct Beat {
    /// The instances whose lease expired (to reap).
    pub(crate) dead: Vec<String>,
    /// How long until the earliest lease of another live instance expires
    /// (Redis's clock): if that instance stopped refreshing it, it can be
    /// reaped right after, not up to a period later.
    pub(crate) next_expiry: Option<Duration>,
}

/// How long after another instance's lease expires the heartbeat looks
/// again: enough for the expiry to have passed on Redis's clock.
const REAP_MARGIN: Duration = Duration::from_millis(100);

impl RedisBackend {
    /// Takes the lease on this instance id. A lease held by someone else is
    /// watched: if it runs out (a crashed process with the same id) it is
    /// taken; if its holder refreshes it, the id is in use and start-up fails.
    pub(crate) async fn claim_instance_id(&self) -> Result<(), RedisSetupError> {
        let startup = |source| RedisSetupError::Startup {
            what: "claiming the instance id",
            source,
        };
        let lease_ms = self.lease.as_millis() as u64;
        let poll = (self.lease / 10).max(Duration::from_millis(50));
        let mut last_ttl: Option<i64> = None;
        let mut said = false;
        loop {
            let mut conn = self.maintenance().await.map_err(startup)?;
            let answer: Vec<i64> = self
                .claim_lease
                .key(self.keys.lease(&self.instance))
                .arg(&self.token)
                .arg(lease_ms)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| startup(maintenance_error(e)))?;
            drop(conn);
            match answer.as_slice() {
                [1] => return Ok(()),
                [0, ttl] => {
                    // A refresh pushes the TTL up; an abandoned lease only runs down.
                    if last_ttl.is_some_and(|last| *ttl > last) || *ttl < 0 {
                        return Err(RedisSetupError::InstanceIdTaken {
                            instance: self.instance.to_string(),
                        });
                    }
                    if !said {
                        tracing::warn!(
                            instance = %self.instance,
                            remaining_ms = ttl,
                            "instance id still leased (a previous process with this id?); \
                             waiting for the lease to expire"
                        );
                        said = true;
                    }
                    last_ttl = Some(*ttl);
                }
                _ => {
                    return Err(startup(BackendError::unavailable(
                        "unexpected answer to the lease claim",
                    )))
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Refreshes this process's lease (takes it back if it had vanished).
    pub(crate) async fn refresh_lease(&self) -> Result<LeaseState, BackendError> {
        let mut conn = self.maintenance().await?;
        let state: String = self
            .refresh_lease
            .key(self.keys.lease(&self.instance))
            .arg(&self.token)
            .arg(self.lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(maintenance_error)?;
        Ok(match state.as_str() {
            "ok" => LeaseState::Held,
            "absent" => LeaseState::Retaken,
            _ => LeaseState::Taken,
        })
    }

    /// Refreshes the lease and the live view; re-asserts presence when the
    /// lease had been lost or a write failed meanwhile. Returns the instances
    /// whose lease expired, and when the next lease of another instance
    /// expires.
    pub(crate) async fn heartbeat(&self) -> Result<Beat, BackendError> {
        self.follow_sentinel_master().await?;
        match self.refresh_lease().await? {
            LeaseState::Taken => {
                self.lease_ok.store(false, Ordering::Relaxed);
                if !self.taken_over.is_cancelled() {
                    tracing::error!(
                        instance = %self.instance,
                        "another process holds this instance id now (this one was paused past \
                         its lease); this process stops serving and exits"
                    );
                    self.taken_over.cancel();
                }
                return Err(BackendError::unavailable("instance id taken over"));
            }
            LeaseState::Retaken => {
                tracing::info!("lease was absent; re-asserting this instance's presence");
                self.resync_needed.store(true, Ordering::Relaxed);
            }
            LeaseState::Held => {}
        }
        self.check_message_path().await?;
        let lease_ms = self.lease.as_millis() as u64;
        let mut conn = self.maintenance().await?;
        let (now, index): (i64, Vec<(String, i64)>) = self
            .heartbeat_script
            .key(self.keys.instances())
            .arg(&*self.instance)
            .arg(lease_ms)
            .invoke_async(&mut conn)
            .await
            .map_err(maintenance_error)?;
        drop(conn);
        let mut view = LiveView::default();
        let mut next_expiry: Option<i64> = None;
        for (instance, expiry) in index {
            let alive = expiry >= now;
            if !alive {
                view.dead.push(instance.clone());
            } else if *instance != *self.instance {
                next_expiry = Some(next_expiry.map_or(expiry, |e| e.min(expiry)));
            }
            view.instances.insert(instance, alive);
        }
        let dead = view.dead.clone();
        if let Ok(mut live) = self.live.write() {
            *live = std::sync::Arc::new(view);
        }
        if self.resync_needed.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.resync().await {
                self.resync_needed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        self.lease_ok.store(true, Ordering::Relaxed);
        Ok(Beat {
            dead,
            next_expiry: next_expiry.map(|e| Duration::from_millis((e - now).max(0) as u64)),
        })
    }

    /// Sentinel: asks the sentinels where the master is; when it moved (a
    /// failover), opens all three connections to the new one, swaps them
    /// in, and re-issues every subscription; presence is re-asserted by this
    /// heartbeat and connections catch up from their inboxes after the
    /// next probe. Until the sentinels name a reachable master this fails
    /// and the instance is not ready.
    async fn follow_sentinel_master(&self) -> Result<(), BackendError> {
        let Some(watch) = &self.sentinel else {
            return Ok(());
        };
        let info = watch.master().await.map_err(maintenance_error)?;
        if watch.is_current(&info) {
            return Ok(());
        }
        let links = Self::connect_single(info.clone(), &self.wiring)
            .await
            .map_err(|e| BackendError::unavailable(e.to_string()))?;
        tracing::warn!(
            master = %info.addr(),
            "the sentinels name a new redis master (failover); reconnecting, re-asserting \
             presence and subscriptions"
        );
        if let Ok(mut current) = self.links.write() {
            *current = Arc::new(links);
        }
        watch.set_current(&info);
        self.presence_cache.clear();
        self.metrics.cluster_topology_changes.inc();
        self.resync_needed.store(true, Ordering::Relaxed);
        self.signals.catch_up_pending.store(true, Ordering::Relaxed);
        self.resubscribe_all().await;
        Ok(())
    }

    /// PINGs the message-path connection, twice if need be: a connection the
    /// manager has not yet seen die fails the first PING and is replaced, so
    /// the second goes over a fresh one. After a Redis restart, the messages
    /// that follow then find a working connection instead of the dead one.
    async fn check_message_path(&self) -> Result<(), BackendError> {
        let links = self.links();
        if let MessageConn::Cluster(conn) = &links.commands {
            return self.check_cluster(conn.clone()).await;
        }
        let mut last = None;
        for _ in 0..2 {
            let mut conn = links.commands.clone();
            let ping = tokio::time::timeout(
                self.response_timeout,
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await;
            match ping {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = Some(maintenance_error(e)),
                Err(elapsed) => last = Some(BackendError::Timeout(Box::new(elapsed))),
            }
        }
        Err(last.unwrap_or_else(|| BackendError::unavailable("message path did not answer")))
    }

    /// Cluster: is every master answering, and are they the ones of the
    /// last heartbeat? Not whole is not ready (and not an error: the slots
    /// of the masters that answer still serve); new masters mean a
    /// failover: re-assert presence, re-issue every subscription.
    async fn check_cluster(&self, mut conn: ClusterConnection) -> Result<(), BackendError> {
        let whole = tokio::time::timeout(self.response_timeout, ping_all_masters(&mut conn))
            .await
            .is_ok_and(|r| r.is_ok());
        if self.cluster_whole.swap(whole, Ordering::Relaxed) != whole {
            if whole {
                tracing::info!("every redis cluster master answers again");
            } else {
                tracing::warn!("a redis cluster master does not answer; not ready");
            }
        }
        if !whole {
            self.resync_needed.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let fingerprint =
            tokio::time::timeout(self.response_timeout, master_fingerprint(&mut conn)).await;
        if let Ok(Ok(fingerprint)) = fingerprint {
            let changed = {
                let mut masters = self.masters.lock().unwrap_or_else(|e| e.into_inner());
                let changed = !masters.is_empty() && *masters != fingerprint;
                *masters = fingerprint;
                changed
            };
            if changed {
                tracing::warn!(
                    "redis cluster masters changed (failover or resharding); re-asserting \
                     presence and subscriptions"
                );
                self.metrics.cluster_topology_changes.inc();
                self.resync_needed.store(true, Ordering::Relaxed);
                self.signals.catch_up_pending.store(true, Ordering::Relaxed);
                self.resubscribe_all().await;
            }
        }
        Ok(())
    }

    /// Writes the local truth over this instance's presence fields and users
    /// set: absolute counts for every local user (announced online where
    /// Redis lost the state), and settling of users the set still lists but
    /// that have no connection here any more and are not lingering; then the
    /// same for its watcher fields and room memberships. Pipelined,
    /// [`PER_PIPELINE`] users per round trip. Each pipeline is written
    /// while every user lock (membership lock, the watch lock) is held, so
    /// no connect or disconnect of those users can interleave with it (they
    /// wait a few milliseconds).
    pub(crate) async fn resync(&self) -> Result<(), BackendError> {
        self.metrics.presence_resyncs.inc();
        let started = std::time::Instant::now();
        self.write_local_truth().await?;
        tracing::info!(
            users = self.desired.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "presence re-asserted"
        );
        Ok(())
    }

    /// [`RedisBackend::resync`] without counting it: at start-up it clears
    /// what a previous process with this instance id left behind (settling
    /// what nobody else holds).
    pub(crate) async fn write_local_truth(&self) -> Result<(), BackendError> {
        let mut conn = self.maintenance().await?;
        self.reassert_users(&mut conn).await?;
        self.reassert_watches(&mut conn).await?;
        self.reassert_memberships(&mut conn).await
    }

    /// The users part of the resync. Every user the set lists or the
    /// instance knows is, under every user lock for its chunk: connected
    /// here — listed, then `PRESENCE_ASSERT` (absolute count; announced
    /// online if Redis lost the state); lingering — listed, field deleted,
    /// left for the router's settle; neither (left by a failed write, or by
    /// a previous process with this id) — `PRESENCE_SETTLE` with this
    /// instance's field, then unlisted. Listed before fields exist and
    /// unlisted after they are gone, so a reaper always finds them; on a
    /// cluster the set is in this instance's slot and each user in its own.
    async fn reassert_users(&self, conn: &mut MaintenanceConn) -> Result<(), BackendError> {
        let users_key = self.keys.instance_users(&self.instance);
        let mut users = self.listed_and(conn, &users_key, [&self.lingering]).await?;
        users.extend(self.desired.iter().map(|e| e.key().clone()));
        users.sort_unstable();
        users.dedup();
        for chunk in users.chunks(PER_PIPELINE) {
            let _all = self.user_locks.lock_all().await;
            let mut keep = Vec::new();
            let mut stale = Vec::new();
            let mut cmds = Vec::with_capacity(chunk.len());
            // Whose transition each command may announce, if any.
            let mut announcing = Vec::with_capacity(chunk.len());
            for user in chunk {
                let count = self.desired.get(user).map(|c| *c).unwrap_or(0);
                if count > 0 {
                    keep.push(user);
                    cmds.push(self.assert_cmd(user, count));
                    announcing.push(Some((user, true)));
                } else if self.lingering.contains_key(user) {
                    keep.push(user);
                    let mut hdel = redis::cmd("HDEL");
                    hdel.arg(self.keys.presence(user)).arg(&*self.instance);
                    cmds.push(hdel);
                    announcing.push(None);
                } else {
                    cmds.push(self.settle_cmd(user, &self.instance));
                    announcing.push(Some((user, false)));
                }
            }
            if !keep.is_empty() {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(&users_key).arg(&keep);
                conn.run_all(vec![sadd]).await?;
            }
            let scripts = [&self.presence_scripts.assert, &self.presence_scripts.settle];
            let replies = conn.query_scripts(&scripts, cmds).await?;
            let mut transitions = Vec::new();
            let mut failed = None;
            for (announcing, reply) in announcing.into_iter().zip(replies) {
                let reply = match reply {
                    Ok(reply) => reply,
                    Err(e) => {
                        failed.get_or_insert(maintenance_error(e));
                        continue;
                    }
                };
                let Some((user, online)) = announcing else {
                    continue;
                };
                match presence_reply(user, online, reply) {
                    Ok((_, transition)) => {
                        transitions.extend(transition);
                        if !online {
                            stale.push(user);
                        }
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            self.announce_batch(conn, &transitions).await;
            if !stale.is_empty() {
                let mut srem = redis::cmd("SREM");
                srem.arg(&users_key).arg(&stale);
                conn.run_all(vec![srem]).await?;
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The watches part of the resync: a watcher field (and a listing) for
    /// every user watched here, none for a listed user that is not, with
    /// watch and unwatch excluded chunk by chunk.
    async fn reassert_watches(&self, conn: &mut MaintenanceConn) -> Result<(), BackendError> {
        let watching_key = self.keys.instance_watching(&self.instance);
        let users = self
            .listed_and(conn, &watching_key, [&self.watching])
            .await?;
        for chunk in users.chunks(PER_PIPELINE) {
            let _watches = self.watch_lock.write().await;
            let (wanted, stale): (Vec<&String>, Vec<&String>) = chunk
                .iter()
                .partition(|user| self.watching.contains_key(*user));
            if !wanted.is_empty() {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(&watching_key).arg(&wanted);
                conn.run_all(vec![sadd]).await?;
            }
            let writes = chunk
                .iter()
                .map(|user| {
                    let mut write;
                    if self.watching.contains_key(user) {
                        write = redis::cmd("HSET");
                        write
                            .arg(self.keys.watchers(user))
                            .arg(&*self.instance)
                            .arg(1);
                    } else {
                        write = redis::cmd("HDEL");
                        write.arg(self.keys.watchers(user)).arg(&*self.instance);
                    }
                    write
                })
                .collect();
            conn.run_all(writes).await?;
            if !stale.is_empty() {
                let mut srem = redis::cmd("SREM");
                srem.arg(&watching_key).arg(&stale);
                conn.run_all(vec![srem]).await?;
            }
        }
        Ok(())
    }

    /// The memberships part of the resync, as [`Self::reassert_users`]:
    /// held here — listed, `MEMBER_ASSERT` (announced if Redis lost it);
    /// lingering — listed, `MEMBER_LEAVE`; neither — `MEMBER_SETTLE` with
    /// this instance's membership, then unlisted. The scripts publish.
    async fn reassert_memberships(&self, conn: &mut MaintenanceConn) -> Result<(), BackendError> {
        let rooms_key = self.keys.instance_rooms(&self.instance);
        let items = self
            .listed_and(
                conn,
                &rooms_key,
                [&self.memberships, &self.lingering_members],
            )
            .await?;
        for chunk in items.chunks(PER_PIPELINE) {
            let _all = self.room_locks.lock_all().await;
            let mut keep = Vec::new();
            let mut stale = Vec::new();
            let mut cmds = Vec::with_capacity(chunk.len());
            // Per command: the membership and whether it settles it.
            let mut what = Vec::with_capacity(chunk.len());
            for item in chunk {
                let Some((room, user)) = item.split_once(' ') else {
                    // Not a membership (never written so): unlist it.
                    stale.push(item);
                    continue;
                };
                if self.memberships.contains_key(item) {
                    keep.push(item);
                    cmds.push(self.member_cmd(false, &self.instance, room, user));
                    what.push((item, Some(true)));
                } else if self.lingering_members.contains_key(item) {
                    keep.push(item);
                    cmds.push(self.member_leave_cmd(room, user));
                    what.push((item, None));
                } else {
                    cmds.push(self.member_cmd(true, &self.instance, room, user));
                    what.push((item, Some(false)));
                }
            }
            if !keep.is_empty() {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(&rooms_key).arg(&keep);
                conn.run_all(vec![sadd]).await?;
            }
            let scripts = [
                &self.presence_scripts.member_up,
                &self.presence_scripts.member_leave,
                &self.presence_scripts.member_settle,
            ];
            let replies = conn.query_scripts(&scripts, cmds).await?;
            let mut failed = None;
            for ((item, joined), reply) in what.into_iter().zip(replies) {
                match reply {
                    Ok(reply) => {
                        let announced = int(&reply) == Some(1);
                        match joined {
                            Some(true) if announced => self.metrics.member_transitions_joined.inc(),
                            Some(false) if announced => self.metrics.member_transitions_left.inc(),
                            _ => 0,
                        };
                        if joined == Some(false) {
                            stale.push(item);
                        }
                    }
                    Err(e) => {
                        failed.get_or_insert(maintenance_error(e));
                    }
                }
            }
            if !stale.is_empty() {
                let mut srem = redis::cmd("SREM");
                srem.arg(&rooms_key).arg(&stale);
                conn.run_all(vec![srem]).await?;
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reaps an instance whose lease expired, if this instance wins the
    /// claim on it (or won it before and a failure stopped it midway): its
    /// watcher fields are deleted, then each user and membership it listed
    /// is settled — its field deleted, and announced gone at once (no
    /// grace: the instance died) when no other instance holds it — and its
    /// sets deleted, unless its id is leased again meanwhile. Its lease key
    /// is left to expire by itself (it already has): deleting it could
    /// delete the lease of a new process that just claimed the same id.
    async fn reap(&self, dead: &str) -> Result<bool, BackendError> {
        let mut conn = self.maintenance().await?;
        if self.reaping.contains_key(dead) {
            // A retry: if the id is leased again (the instance was only
            // paused, or a new process took the id), what it lists is its
            // own again — and it settles what it no longer holds itself.
            let leased: bool = redis::cmd("EXISTS")
                .arg(self.keys.lease(dead))
                .query_async(&mut conn)
                .await
                .map_err(maintenance_error)?;
            if leased {
                self.reaping.remove(dead);
                return Ok(false);
            }
        } else {
            let claimed: i64 = self
                .claim_dead
                .key(self.keys.instances())
                .arg(dead)
                .invoke_async(&mut conn)
                .await
                .map_err(maintenance_error)?;
            if claimed != 1 {
                return Ok(false);
            }
            self.reaping.insert(dead.to_owned(), ());
        }
        let users_key = self.keys.instance_users(dead);
        let watching_key = self.keys.instance_watching(dead);
        let rooms_key = self.keys.instance_rooms(dead);
        let watching = self
            .listed_and(&mut conn, &watching_key, std::iter::empty())
            .await?;
        self.drop_watcher_fields(&mut conn, dead, &watching).await?;
        let users = self
            .listed_and(&mut conn, &users_key, std::iter::empty())
            .await?;
        let (_, failed) = self.settle_users(&mut conn, dead, &users).await;
        if let Some(e) = failed {
            return Err(e);
        }
        let rooms = self
            .listed_and(&mut conn, &rooms_key, std::iter::empty())
            .await?;
        let (_, failed) = self.settle_memberships(&mut conn, dead, &rooms).await;
        if let Some(e) = failed {
            return Err(e);
        }
        let forgotten: i64 = self
            .forget_dead
            .key(self.keys.lease(dead))
            .key(&users_key)
            .key(&watching_key)
            .key(&rooms_key)
            .invoke_async(&mut conn)
            .await
            .map_err(maintenance_error)?;
        self.reaping.remove(dead);
        if forgotten != 1 {
            tracing::info!(
                instance = dead,
                "a reaped instance id is leased again; its sets are left to it"
            );
        }
        self.metrics.reaped_instances.inc();
        tracing::info!(
            instance = dead,
            users = users.len(),
            watching = watching.len(),
            memberships = rooms.len(),
            "reaped a dead instance"
        );
        Ok(true)
    }

    /// Runs until `shutdown` (or until another process takes this instance
    /// id over): lease refresh, live view, resync, reaping and the
    /// subscription probe, every third of the lease — and right after
    /// another instance's lease is due to expire, so a dead instance is
    /// reaped promptly. After a failure it
    /// retries sooner (capped exponential backoff with jitter), and the moment
    /// the subscriber reconnects it runs at once, so presence is re-asserted
    /// within a second or so of Redis coming back.
    pub async fn run_maintenance(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        let period = self.lease / 3;
        let mut failures: u32 = 0;
        let mut next = tokio::time::Instant::now() + period;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.taken_over.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
                _ = self.signals.check_now.notified() => {}
                _ = self.signals.resubscribe.notified() => {
                    // A slot moved: its channels follow it, nothing else changed.
                    self.metrics.resubscribes.inc();
                    self.resubscribe_all().await;
                    // Is the personal channel back? Then connections catch up.
                    self.probe(period).await;
                    continue;
                }
            }
            match self.heartbeat().await {
                Ok(beat) => {
                    if failures > 0 {
                        tracing::info!("redis heartbeat restored; ready");
                    }
                    failures = 0;
                    // A cluster missing a master: look again soon.
                    let mut wait = if self.cluster_whole.load(Ordering::Relaxed) {
                        period
                    } else {
                        retry_delay(1, period)
                    };
                    // Another instance's lease runs out before the next
                    // beat (it stopped refreshing it: killed, paused): look
                    // right after, so it is reaped — and its users announced
                    // offline — within a few hundred ms of its expiry.
                    if let Some(expiry) = beat.next_expiry {
                        wait = wait.min(expiry + REAP_MARGIN);
                    }
                    next = tokio::time::Instant::now() + wait;
                    let mut dead = beat.dead;
                    // Claimed earlier, not finished: the claim cannot be won again.
                    dead.extend(self.reaping.iter().map(|e| e.key().clone()));
                    dead.sort_unstable();
                    dead.dedup();
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
                    // On a cluster (or with Sentinel) a failover ends within
                    // a second or so of the node timeout (down-after): look
                    // often, not with growing delays.
                    let wait = if self.cluster || self.sentinel.is_some() {
                        retry_delay(failures.min(1), period)
                    } else {
                        retry_delay(failures, period)
                    };
                    next = tokio::time::Instant::now() + wait;
                }
            }
        }
    }

    /// Publishes a probe on this instance's own personal channel and waits
    /// for it to come back through the subscriber. Subscriptions can be lost
    /// while every health check stays green (a failover, a proxy); a probe
    /// that does not come back marks the instance not ready and re-issues
    /// every SUBSCRIBE.
    async fn probe(&self, period: Duration) {
        let nonce = self.probe_sent.fetch_add(1, Ordering::Relaxed) + 1;
        let arrived = self.signals.probe_arrived.notified();
        let published: Result<usize, BackendError> = async {
            let mut conn = self.maintenance().await?;
            let mut probe = PROBE_PREFIX.to_vec();
            probe.extend_from_slice(nonce.to_string().as_bytes());
            let channel = self.keys.personal_channel(&self.instance);
            redis::cmd(self.publish_command(&channel))
                .arg(&channel)
                .arg(probe)
                .query_async(&mut conn)
                .await
                .map_err(maintenance_error)
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
            if self.signals.catch_up_pending.swap(false, Ordering::Relaxed) {
                let told = self.bus_inbox.try_send(Inbound {
                    kind: ChannelKind::Resubscribed,
                    payload: Bytes::new(),
                });
                if told.is_err() {
                    // The inbox is full: tell it after the next probe.
                    self.signals.catch_up_pending.store(true, Ordering::Relaxed);
                }
            }
            return;
        }
        self.signals.catch_up_pending.store(true, Ordering::Relaxed);
        self.probe_ok.store(false, Ordering::Relaxed);
        self.metrics.probe_failures.inc();
        tracing::warn!("subscription probe did not return; not ready, resubscribing");
        self.resubscribe_all().await;
    }

    /// Re-issues SUBSCRIBE (SSUBSCRIBE) for every channel this instance
    /// should hold; subscribing a channel already held changes nothing.
    async fn resubscribe_all(&self) {
        let channels: Vec<String> = self.subscriptions.iter().map(|e| e.key().clone()).collect();
        for channel in channels {
            let sharded = self.sharded(&channel);
            if let Err(e) = self.links().subscriber.subscribe(&channel, sharded).await {
                tracing::warn!(error = %e, channel, "resubscribe failed");
                return;
            }
        }
    }

    /// Gives this process's lease back if it still holds it; `false` when
    /// another process holds the id (then nothing of the id may be deleted).
    pub(crate) async fn release_lease(
        &self,
        conn: &mut MaintenanceConn,
    ) -> Result<bool, BackendError> {
        let released: i64 = self
            .release_lease
            .key(self.keys.lease(&self.instance))
            .arg(&self.token)
            .invoke_async(conn)
            .await
            .map_err(maintenance_error)?;
        Ok(released == 1)
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
}
