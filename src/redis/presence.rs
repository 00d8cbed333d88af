//! [`Presence`] over Redis: `sb:presence:{USER}` hashes written only by their
//! own instance, read through the live view so dead instances are ignored.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use deadpool_redis::redis::{self, RedisError};

use super::RedisBackend;
use crate::presence::{Holder, Presence, PresenceError};

fn unavailable(e: RedisError) -> PresenceError {
    PresenceError::Unavailable(e.to_string())
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

    /// Adds `delta` to this instance's field for `user`, keeping the users
    /// set in step. Callers hold the user's lock.
    async fn adjust(&self, user: &str, delta: i64, local_count: u32) -> redis::RedisResult<()> {
        let mut conn = self.conn().await?;
        let users_key = self.keys.instance_users(&self.instance);
        if delta > 0 {
            // Listed before the field exists, so a reaper always finds it.
            redis::cmd("SADD")
                .arg(&users_key)
                .arg(user)
                .query_async::<()>(&mut conn)
                .await?;
        }
        let now: i64 = self
            .adjust_presence
            .key(self.keys.presence(user))
            .arg(&*self.instance)
            .arg(delta)
            .invoke_async(&mut conn)
            .await?;
        if now == 0 {
            redis::cmd("SREM")
                .arg(&users_key)
                .arg(user)
                .query_async::<()>(&mut conn)
                .await?;
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

    async fn change(&self, user: &str, delta: i64) -> Result<(), PresenceError> {
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
        }
        self.adjust(user, delta, local_count).await.map_err(|e| {
            self.resync_needed.store(true, Ordering::Relaxed);
            unavailable(e)
        })
    }
}

#[async_trait]
impl Presence for RedisBackend {
    async fn connect(&self, user: &str) -> Result<(), PresenceError> {
        self.change(user, 1).await
    }

    async fn disconnect(&self, user: &str) -> Result<(), PresenceError> {
        self.change(user, -1).await
    }

    async fn locate(&self, user: &str) -> Result<Vec<Holder>, PresenceError> {
        let started = Instant::now();
        let mut conn = self.conn().await.map_err(unavailable)?;
        let fields: Vec<(String, i64)> = redis::cmd("HGETALL")
            .arg(self.keys.presence(user))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        self.observe(started);
        Ok(self.holders(fields))
    }

    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, PresenceError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut pipe = redis::pipe();
        for user in users {
            pipe.cmd("HGETALL").arg(self.keys.presence(user));
        }
        let mut conn = self.conn().await.map_err(unavailable)?;
        let all: Vec<Vec<(String, i64)>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        self.observe(started);
        Ok(all.into_iter().map(|fields| self.holders(fields)).collect())
    }

    fn report_stale(&self, instance: &str) {
        tracing::debug!(
            instance,
            "presence entry points at an instance with no listener"
        );
    }

    async fn withdraw(&self) -> Result<(), PresenceError> {
        let users_key = self.keys.instance_users(&self.instance);
        let mut conn = self.conn().await.map_err(unavailable)?;
        let mut users: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&users_key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        users.extend(self.desired.iter().map(|e| e.key().clone()));
        users.sort_unstable();
        users.dedup();
        for chunk in users.chunks(500) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.cmd("HDEL")
                    .arg(self.keys.presence(user))
                    .arg(&*self.instance)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        redis::pipe()
            .cmd("DEL")
            .arg(&users_key)
            .ignore()
            .cmd("DEL")
            .arg(self.keys.lease(&self.instance))
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.instances())
            .arg(&*self.instance)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        self.desired.clear();
        Ok(())
    }
}
