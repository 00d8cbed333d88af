//! [`Bus`] over Redis pub/sub: PUBLISH through the command pool, SUBSCRIBE on
//! the dedicated RESP3 subscriber connection.

use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::redis::{self, RedisError};

use super::RedisBackend;
use crate::bus::{Bus, BusError, Channel};

fn unavailable(e: RedisError) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RedisBackend {
    fn channel_name(&self, channel: Channel<'_>) -> String {
        match channel {
            Channel::Instance(id) => self.keys.personal_channel(id),
            Channel::Room(room) => self.keys.room_channel(room),
            Channel::All => self.keys.all_channel(),
            Channel::User(user) => self.keys.user_channel(user),
        }
    }
}

#[async_trait]
impl Bus for RedisBackend {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BusError> {
        let started = Instant::now();
        let mut conn = self.conn().await.map_err(unavailable)?;
        let receivers: usize = redis::cmd("PUBLISH")
            .arg(self.channel_name(channel))
            .arg(payload.as_ref())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        self.observe(started);
        Ok(receivers)
    }

    async fn publish_to_holders(
        &self,
        user: &str,
        skip: &str,
        payload: Bytes,
    ) -> Option<Result<Vec<(String, usize)>, BusError>> {
        let started = Instant::now();
        let live = self.live_view();
        let result = async {
            let mut conn = self.conn().await?;
            let mut invocation = self.route_direct.key(self.keys.presence(user));
            invocation
                .arg(skip)
                .arg(&self.personal_prefix)
                .arg(payload.as_ref());
            for dead in &live.dead {
                invocation.arg(dead);
            }
            invocation
                .invoke_async::<Vec<(String, usize)>>(&mut conn)
                .await
        }
        .await
        .map_err(unavailable);
        self.observe(started);
        Some(result)
    }

    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BusError> {
        let name = self.channel_name(channel);
        let mut subscriber = self.subscriber.clone();
        subscriber.subscribe(&name).await.map_err(unavailable)?;
        self.subscriptions.insert(name, ());
        Ok(())
    }

    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BusError> {
        let name = self.channel_name(channel);
        self.subscriptions.remove(&name);
        let mut subscriber = self.subscriber.clone();
        subscriber.unsubscribe(&name).await.map_err(unavailable)
    }
}
