//! [`Presence`] over Redis: `sb:presence:{USER}` hashes, each field written
//! only by its own instance (and deleted by the reaper once that instance is
//! dead), read through the live view so dead instances are ignored.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;

use switchboard_core::error::BackendError;
use switchboard_core::presence::{Holder, Presence};

use crate::{maintenance_error, RedisBackend};

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

    /// Adds `delta` to this instance's field for `user`, keeping the users
    /// set in step. Callers hold the user's lock.
    async fn adjust(&self, user: &str, delta: i64, local_count: u32) -> Result<(), BackendError> {
        let mut conn = self.message_path()?;
        let users_key = self.keys.instance_users(&self.instance);
        if delta > 0 {
            // Listed before the field exists, so a reaper always finds it.
            let mut sadd = redis::cmd("SADD");
            sadd.arg(&users_key).arg(user);
            self.timed(sadd.query_async::<()>(&mut conn)).await?;
        }
        let mut adjust = self.adjust_presence.key(self.keys.presence(user));
        adjust.arg(&*self.instance).arg(delta);
        let now: i64 = self.timed(adjust.invoke_async(&mut conn)).await?;
        if now == 0 {
            let mut srem = redis::cmd("SREM");
            srem.arg(&users_key).arg(user);
            self.timed(srem.query_async::<()>(&mut conn)).await?;
        }
        if now != i64::from(local_count) {
            // Redis lost or doubled a write (restart, failed earlier write):
            // the next heartbeat writes the local truth back.
            tracing::debug!(
                user,
                redis = now,
                local = local_count,
                "presence drift; resync scheduled"
            );
            self.resync_needed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn change(&self, user: &str, delta: i64) -> Result<(), BackendError> {
        let _guard = self.user_locks.lock(user).await;
        let local_count = {
            let mut entry = self.desired.entry(user.to_owned()).or_insert(0);
            *entry = if delta > 0 {
                *entry + 1
            } else {
                entry.saturating_sub(1)
            };
            *entry
        };
        if local_count == 0 {
            self.desired.remove_if(user, |_, n| *n == 0);
            switchboard_core::registry::shrink_if_sparse(&self.desired);
        }
        self.adjust(user, delta, local_count)
            .await
            .inspect_err(|_| {
                self.resync_needed.store(true, Ordering::Relaxed);
            })
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

    /// Deletes this instance's fields, users set, lease and index entry — but
    /// only while this process still holds the lease: if another process took
    /// the id over, its entries are not this process's to delete.
    async fn withdraw(&self) -> Result<(), BackendError> {
        let mut conn = self.maintenance().await?;
        if !self.release_lease(&mut conn).await? {
            tracing::warn!("not withdrawing presence: another process holds this instance id");
            self.desired.clear();
            return Ok(());
        }
        let users_key = self.keys.instance_users(&self.instance);
        let mut users: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&users_key)
            .query_async(&mut conn)
            .await
            .map_err(maintenance_error)?;
        users.extend(self.desired.iter().map(|e| e.key().clone()));
        users.sort_unstable();
        users.dedup();
        for chunk in users.chunks(500) {
            let deletes = chunk
                .iter()
                .map(|user| {
                    let mut hdel = redis::cmd("HDEL");
                    hdel.arg(self.keys.presence(user)).arg(&*self.instance);
                    hdel
                })
                .collect();
            conn.run_all(deletes).await?;
        }
        // Two slots on a cluster (the instance's and the index's): two commands.
        let mut del = redis::cmd("DEL");
        del.arg(&users_key);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.keys.instances()).arg(&*self.instance);
        conn.run_all(vec![del, zrem]).await?;
        self.desired.clear();
        Ok(())
    }
}
