//! [`Bus`] over Redis pub/sub: PUBLISH and routing on the message-path
//! connection, SUBSCRIBE on the dedicated RESP3 subscriber. On a cluster
//! every channel but the broadcast baseline's is sharded (SPUBLISH,
//! SSUBSCRIBE): a message costs only the node serving its channel's slot,
//! never the cluster bus.
//!
//! Routing a DM reads the recipient's presence from the tracked cache (see
//! `presence_cache`; a miss is one tracked HGETALL) and sends one pipeline:
//! for each other holder, `PUBSUB NUMSUB` of its personal channel and the
//! PUBLISH. Redis runs no script and reads no key for a cached recipient.
//! The receiver count is NUMSUB's, not PUBLISH's: PUBLISH also counts
//! pattern subscribers (a `PSUBSCRIBE sb:*` monitor would make a crashed
//! instance look alive). On a cluster the cache works the same way — the
//! fill's `CLIENT TRACKING ON` and `HGETALL` are one pipeline, which the
//! cluster client sends to the node of the key's slot, and each node
//! connection's invalidations and disconnection reach the same callback —
//! and each holder gets one SPUBLISH on its own slot; SPUBLISH's count is
//! exact (sharded channels have no pattern subscribers).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use switchboard_core::bus::{Bus, Channel, DirectRoute, Reached};
use switchboard_core::error::BackendError;

use crate::presence_cache::Fields;
use crate::RedisBackend;

impl RedisBackend {
    pub(crate) fn channel_name(&self, channel: Channel<'_>) -> String {
        match channel {
            Channel::Instance(id) => self.keys.personal_channel(id),
            Channel::Room(room) => self.keys.room_channel(room),
            Channel::All => self.keys.all_channel(),
            Channel::User(user) => self.keys.user_channel(user),
        }
    }

    /// Whether `channel` is a sharded channel here: on a cluster, all but
    /// the broadcast channel.
    pub(crate) fn sharded(&self, channel: &str) -> bool {
        self.cluster && !self.keys.is_all_channel(channel)
    }

    /// `PUBLISH`, or `SPUBLISH` for a sharded channel.
    pub(crate) fn publish_command(&self, channel: &str) -> &'static str {
        if self.sharded(channel) {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// Subscriptions go over the subscriber connection, which has its own
/// response timeout; a failure there never means a message was sent.
fn subscribe_error(e: redis::RedisError) -> BackendError {
    BackendError::Unavailable(Box::new(e))
}

impl RedisBackend {
    /// The instances a DM is routed to (the other live holders not yet
    /// covered) and its payload, whose covered list adds them; `None` when
    /// there is nobody to send it to.
    fn direct_targets<'f>(
        &self,
        route: &DirectRoute<'_>,
        fields: impl Iterator<Item = (&'f str, i64)>,
    ) -> Option<(Vec<&'f str>, Bytes)> {
        let live = self.live_view();
        let targets: Vec<&str> = fields
            .filter(|(_, n)| *n > 0)
            .map(|(instance, _)| instance)
            .filter(|id| route.publishes_to(id) && live.may_be_alive(id))
            .collect();
        if targets.is_empty() {
            return None;
        }
        let payload = route.payload(&targets);
        Some((targets, payload))
    }

    /// Cluster: SPUBLISHes `payload` on each instance's personal channel
    /// (each in its own slot), all in flight at once; one answer per
    /// instance, in order. SPUBLISH's count is exact: sharded channels have
    /// no pattern subscribers.
    pub(crate) async fn spublish_each(
        &self,
        instances: &[&str],
        payload: &[u8],
    ) -> Result<Vec<Result<usize, BackendError>>, BackendError> {
        let conn = self.message_path()?;
        let publishes = instances.iter().map(|instance| {
            let mut conn = conn.clone();
            let mut publish = redis::cmd("SPUBLISH");
            publish
                .arg(self.keys.personal_channel(instance))
                .arg(payload);
            async move { self.timed(publish.query_async::<usize>(&mut conn)).await }
        });
        Ok(futures_util::future::join_all(publishes).await)
    }

    /// One Redis: per target, `PUBSUB NUMSUB` of its personal channel and
    /// the `PUBLISH`, in one pipeline; the receiver counts are NUMSUB's.
    async fn publish_with_numsub(
        &self,
        targets: &[&str],
        payload: &[u8],
    ) -> Result<Vec<usize>, BackendError> {
        let mut pipe = redis::pipe();
        for target in targets {
            let channel = self.keys.personal_channel(target);
            pipe.cmd("PUBSUB").arg("NUMSUB").arg(&channel);
            pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
        }
        let mut conn = self.message_path()?;
        let counts: Vec<(String, usize)> = self.timed(pipe.query_async(&mut conn)).await?;
        Ok(counts.into_iter().map(|(_, n)| n).collect())
    }

    /// Reads `key`'s presence fields with tracking on (both on one
    /// connection, in one pipeline), keeping them in the cache unless Redis
    /// invalidated them meanwhile.
    async fn read_tracked(&self, key: &str) -> Result<Fields, BackendError> {
        let fill = self.presence_cache.begin_fill(key);
        let read = async {
            let mut conn = self.message_path()?;
            let fields = self.timed(conn.tracked_hgetall(key)).await?;
            Ok::<_, BackendError>(fields)
        }
        .await;
        match read {
            Ok(fields) => {
                let fields: Fields = fields
                    .into_iter()
                    .map(|(instance, n)| (Arc::from(instance), n))
                    .collect();
                if let Some(fill) = fill {
                    self.presence_cache.finish_fill(fill, fields.clone());
                }
                Ok(fields)
            }
            Err(e) => {
                if let Some(fill) = fill {
                    self.presence_cache.abandon_fill(fill);
                }
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Bus for RedisBackend {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BackendError> {
        let mut conn = self.message_path()?;
        let name = self.channel_name(channel);
        let mut publish = redis::cmd(self.publish_command(&name));
        publish.arg(&name).arg(payload.as_ref());
        self.timed(publish.query_async(&mut conn)).await
    }

    async fn route_direct(&self, route: &DirectRoute<'_>) -> Result<Vec<Reached>, BackendError> {
        let key = self.keys.presence(route.to);
        let fields = match self.presence_cache.get(&key) {
            Some(fields) => {
                self.metrics.presence_cache_hits.inc();
                fields
            }
            None => {
                self.metrics.presence_cache_misses.inc();
                self.read_tracked(&key).await?
            }
        };
        let holders = fields.iter().map(|(id, n)| (&**id, *n));
        let Some((targets, payload)) = self.direct_targets(route, holders) else {
            return Ok(Vec::new());
        };
        let receivers = if self.cluster {
            self.spublish_each(&targets, &payload)
                .await?
                .into_iter()
                .collect::<Result<Vec<usize>, BackendError>>()?
        } else {
            self.publish_with_numsub(&targets, &payload).await?
        };
        if receivers.contains(&0) {
            // A holder that does not listen: its entry is stale; read again next time.
            self.presence_cache.invalidate(&key);
        }
        Ok(targets
            .into_iter()
            .zip(receivers)
            .map(|(instance, receivers)| Reached {
                instance: instance.to_owned(),
                receivers,
            })
            .collect())
    }

    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        let name = self.channel_name(channel);
        // Wanted before asked for: a slot move meanwhile resubscribes it.
        self.subscriptions.insert(name.clone(), ());
        let subscribed = self
            .links()
            .subscriber
            .subscribe(&name, self.sharded(&name))
            .await;
        if let Err(e) = subscribed {
            self.subscriptions.remove(&name);
            return Err(subscribe_error(e));
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        let name = self.channel_name(channel);
        self.subscriptions.remove(&name);
        self.links()
            .subscriber
            .unsubscribe(&name, self.sharded(&name))
            .await
            .map_err(subscribe_error)
    }
}
