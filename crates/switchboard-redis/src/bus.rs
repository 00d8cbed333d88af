//! [`Bus`] over Redis pub/sub: PUBLISH and the routing script on the
//! message-path connection, SUBSCRIBE on the dedicated RESP3 subscriber.

use async_trait::async_trait;
use bytes::Bytes;

use switchboard_core::bus::{Bus, Channel, DirectRoute, Envelope, Reached};
use switchboard_core::error::BackendError;

use crate::RedisBackend;

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

/// Subscriptions go over the subscriber connection, which has its own
/// response timeout; a failure there never means a message was sent.
fn subscribe_error(e: redis::RedisError) -> BackendError {
    BackendError::Unavailable(Box::new(e))
}

#[async_trait]
impl Bus for RedisBackend {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BackendError> {
        let mut conn = self.message_path()?;
        let mut publish = redis::cmd("PUBLISH");
        publish
            .arg(self.channel_name(channel))
            .arg(payload.as_ref());
        self.timed(publish.query_async(&mut conn)).await
    }

    async fn route_direct(&self, route: &DirectRoute<'_>) -> Result<Vec<Reached>, BackendError> {
        let mut conn = self.message_path()?;
        let live = self.live_view();
        let covered = route.covered.join(",");
        let mut invocation = self.route_direct.key(self.keys.presence(route.to));
        invocation
            .arg(route.caller)
            .arg(&self.personal_prefix)
            .arg(Envelope::direct_head(route.to, route.hop, route.origin))
            .arg(covered)
            .arg(route.frame);
        for dead in &live.dead {
            invocation.arg(dead);
        }
        let reached: Vec<(String, usize)> = self.timed(invocation.invoke_async(&mut conn)).await?;
        Ok(reached
            .into_iter()
            .map(|(instance, receivers)| Reached {
                instance,
                receivers,
            })
            .collect())
    }

    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        let name = self.channel_name(channel);
        let mut subscriber = self.subscriber.clone();
        subscriber.subscribe(&name).await.map_err(subscribe_error)?;
        self.subscriptions.insert(name, ());
        Ok(())
    }

    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        let name = self.channel_name(channel);
        self.subscriptions.remove(&name);
        let mut subscriber = self.subscriber.clone();
        subscriber.unsubscribe(&name).await.map_err(subscribe_error)
    }
}
