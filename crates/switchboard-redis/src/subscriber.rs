//! The subscription connection: one RESP3 `ConnectionManager` (one Redis)
//! or one RESP3 cluster connection (a Redis Cluster: sharded channels,
//! `SSUBSCRIBE`, each on the node serving the channel's slot), whose pushed
//! messages are classified by channel and queued, without blocking, into the
//! bounded bus inbox. It also sees the probes the maintenance loop sends on
//! the personal channel, tells the rest of the backend when the connection
//! is lost and restored, and (cluster) when Redis dropped a sharded
//! subscription because its slot moved to another node.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisResult, Value};

use switchboard_core::bus::{ChannelKind, Inbound};
use switchboard_core::queue::Refused;

use crate::conn::{cluster_client, cluster_connect};
use crate::{RedisSetupError, Wiring};

/// The subscription connection of either deployment.
#[derive(Clone)]
pub(crate) enum Subscriber {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Subscriber {
    /// Subscribes `channel`: `SSUBSCRIBE` on a cluster unless the channel
    /// is one every node must see (`sharded` false: the broadcast
    /// baseline's `sb:all`).
    pub(crate) async fn subscribe(&self, channel: &str, sharded: bool) -> RedisResult<()> {
        match self {
            Subscriber::Single(conn) => conn.clone().subscribe(channel).await,
            Subscriber::Cluster(conn) if sharded => conn.clone().ssubscribe(channel).await,
            Subscriber::Cluster(conn) => conn.clone().subscribe(channel).await,
        }
    }

    /// The reverse of [`Subscriber::subscribe`].
    pub(crate) async fn unsubscribe(&self, channel: &str, sharded: bool) -> RedisResult<()> {
        match self {
            Subscriber::Single(conn) => conn.clone().unsubscribe(channel).await,
            Subscriber::Cluster(conn) if sharded => conn.clone().sunsubscribe(channel).await,
            Subscriber::Cluster(conn) => conn.clone().unsubscribe(channel).await,
        }
    }
}

/// Prefix of a subscription probe on the personal channel: `P <nonce>`. Never
/// a valid envelope header, so a probe can never be taken for a message.
pub(crate) const PROBE_PREFIX: &[u8] = b"P ";

/// The nonce of a probe: `P ` and digits only, nothing else. A presence
/// event on the personal channel starts with `P ` too (`P <user> <0|1>
/// <version> <ts>\n`) but always has more fields and a newline, so it is
/// never taken for a probe.
fn probe_nonce(payload: &[u8]) -> Option<u64> {
    let digits = payload.strip_prefix(PROBE_PREFIX)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Maps a pushed channel name to the kind of channel it is.
#[derive(Debug)]
struct ChannelClassifier {
    personal: Vec<u8>,
    all: Vec<u8>,
    room_prefix: Vec<u8>,
    user_prefix: Vec<u8>,
}

impl ChannelClassifier {
    fn kind(&self, channel: &[u8]) -> Option<ChannelKind> {
        if channel == self.personal.as_slice() {
            Some(ChannelKind::Personal)
        } else if channel.starts_with(&self.room_prefix) {
            Some(ChannelKind::Room)
        } else if channel.starts_with(&self.user_prefix) {
            Some(ChannelKind::User)
        } else if channel == self.all.as_slice() {
            Some(ChannelKind::Broadcast)
        } else {
            None
        }
    }
}

fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Takes a pushed payload without copying it.
fn into_bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        _ => None,
    }
}

/// What the subscriber connects to.
pub(crate) enum Target<'a> {
    Single(&'a ConnectionInfo),
    Cluster(&'a [String]),
}

/// Opens the subscription connection. It reconnects forever by itself
/// (capped, jittered backoff) and re-issues every subscription; on a
/// cluster, also after the topology changed.
pub(crate) async fn connect(
    target: Target<'_>,
    wiring: &Wiring,
) -> Result<Subscriber, RedisSetupError> {
    let (keys, settings) = (&wiring.keys, &wiring.settings);
    let signals = wiring.signals.clone();
    let wanted = wiring.subscriptions.clone();
    let inbox = wiring.inbox.clone();
    signals.up.store(true, Ordering::Relaxed);
    let classifier = ChannelClassifier {
        personal: keys.personal_channel(&settings.instance).into_bytes(),
        all: keys.all_channel().into_bytes(),
        room_prefix: keys.room_channel_prefix().as_bytes().to_vec(),
        user_prefix: keys.user_channel_prefix().into_bytes(),
    };
    let cluster = settings.target.is_cluster();
    let metrics = wiring.metrics.clone();
    let on_push = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                    return Ok(());
                };
                let Some(kind) = bytes_of(&channel).and_then(|c| classifier.kind(c)) else {
                    return Ok(());
                };
                let Some(payload) = into_bytes(payload) else {
                    return Ok(());
                };
                if kind == ChannelKind::Personal {
                    if let Some(nonce) = probe_nonce(&payload) {
                        signals.probe_seen.fetch_max(nonce, Ordering::Relaxed);
                        signals.probe_arrived.notify_waiters();
                        return Ok(());
                    }
                }
                if let Err(Refused::Full(_)) = inbox.try_send(Inbound { kind, payload }) {
                    metrics.dropped_bus_inbox_full.inc();
                }
            }
            // A cluster node's connection dropped: the client reconnects it
            // and moves its subscriptions when the topology changes; the
            // heartbeat (every master answers?) and the probe run at once to
            // learn when it is whole again. Nodes holding none of this
            // instance's channels drop too, so "up" stays a single-Redis signal.
            PushKind::Disconnection if cluster => {
                tracing::warn!("a redis cluster node connection of the subscriber was lost");
                signals.catch_up_pending.store(true, Ordering::Relaxed);
                signals.check_now.notify_one();
            }
            PushKind::Disconnection => {
                signals.up.store(false, Ordering::Relaxed);
                signals.catch_up_pending.store(true, Ordering::Relaxed);
                // Redis may be gone: the heartbeat finds out now, so the
                // message path stops sending to it (`unavailable` at once)
                // within a round trip instead of a third of a lease.
                signals.check_now.notify_one();
                tracing::warn!("redis subscriber connection lost; reconnecting");
            }
            PushKind::Subscribe | PushKind::SSubscribe
                if !signals.up.swap(true, Ordering::Relaxed) =>
            {
                tracing::info!("redis subscriber connection restored");
                signals.check_now.notify_one();
            }
            // Redis Cluster drops a sharded subscription when the channel's
            // slot moves to another node (resharding, failover). One this
            // instance still wants is subscribed again, on the new owner.
            PushKind::SUnsubscribe => {
                let channel = push.data.first().and_then(bytes_of);
                let still_wanted = channel
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .is_some_and(|c| wanted.contains_key(c));
                if still_wanted {
                    signals.catch_up_pending.store(true, Ordering::Relaxed);
                    signals.resubscribe.notify_one();
                }
            }
            _ => {}
        }
        Ok(())
    };
    // Redis answered the command connection a moment ago; give the
    // subscriber a few connect timeouts, not forever.
    let bound = settings.connect_timeout.saturating_mul(3);
    let info = match target {
        Target::Single(info) => info,
        Target::Cluster(seeds) => {
            // Retries are the client's own resubscription and redirections: many.
            let client = cluster_client(
                seeds,
                settings.connect_timeout,
                settings.response_timeout,
                16,
                Some(on_push),
            )?;
            let conn = cluster_connect(&client, "subscriber connection", bound).await?;
            return Ok(Subscriber::Cluster(conn));
        }
    };
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.clone().set_redis_settings(resp3))
        .map_err(RedisSetupError::Url)?;
    let config = ConnectionManagerConfig::new()
        .set_push_sender(on_push)
        .set_automatic_resubscription()
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(usize::MAX)
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout));
    match tokio::time::timeout(bound, ConnectionManager::new_with_config(client, config)).await {
        Ok(Ok(subscriber)) => Ok(Subscriber::Single(subscriber)),
        Ok(Err(source)) => Err(RedisSetupError::Connect {
            what: "subscriber connection",
            source,
        }),
        Err(_) => Err(RedisSetupError::Connect {
            what: "subscriber connection",
            source: redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {bound:?}"),
            )),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_told_from_presence_events() {
        assert_eq!(probe_nonce(b"P 12"), Some(12));
        assert_eq!(probe_nonce(b"P "), None);
        assert_eq!(
            probe_nonce(b"P 12 1 1764633600123456 1764633600123\n"),
            None
        );
        assert_eq!(probe_nonce(b"P bob 0 7 8\n"), None);
        assert_eq!(probe_nonce(b"D bob 0 i1 -\n{}"), None);
    }
}
