//! The subscription connection: one RESP3 `ConnectionManager` whose pushed
//! messages are classified by channel and queued, without blocking, into the
//! bounded bus inbox. It also sees the probes the maintenance loop sends on
//! the personal channel, and tells the rest of the backend when the
//! connection is lost and restored.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};

use switchboard_core::bus::{ChannelKind, Inbound};
use switchboard_core::metrics::Metrics;
use switchboard_core::queue::{BoundedSender, Refused};

use crate::keys::Keys;
use crate::{RedisSettings, RedisSetupError, SubscriberSignals};

/// Prefix of a subscription probe on the personal channel: `P <nonce>`. Never
/// a valid envelope header, so a probe can never be taken for a message.
pub(crate) const PROBE_PREFIX: &[u8] = b"P ";

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

/// Opens the subscription connection. It reconnects forever by itself
/// (capped, jittered backoff) and re-issues every SUBSCRIBE.
pub(crate) async fn connect(
    info: &ConnectionInfo,
    keys: &Keys,
    settings: &RedisSettings,
    signals: Arc<SubscriberSignals>,
    inbox: BoundedSender<Inbound>,
    metrics: &Arc<Metrics>,
) -> Result<ConnectionManager, RedisSetupError> {
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.clone().set_redis_settings(resp3))
        .map_err(RedisSetupError::Url)?;
    signals.up.store(true, Ordering::Relaxed);
    let classifier = ChannelClassifier {
        personal: keys.personal_channel(&settings.instance).into_bytes(),
        all: keys.all_channel().into_bytes(),
        room_prefix: keys.room_channel_prefix().as_bytes().to_vec(),
        user_prefix: keys.user_channel_prefix().into_bytes(),
    };
    let metrics = metrics.clone();
    let on_push = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
        match push.kind {
            PushKind::Message => {
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
                    if let Some(nonce) = payload.strip_prefix(PROBE_PREFIX) {
                        let nonce = std::str::from_utf8(nonce).ok().and_then(|n| n.parse().ok());
                        signals
                            .probe_seen
                            .fetch_max(nonce.unwrap_or(0), Ordering::Relaxed);
                        signals.probe_arrived.notify_waiters();
                        return Ok(());
                    }
                }
                if let Err(Refused::Full(_)) = inbox.try_send(Inbound { kind, payload }) {
                    metrics.dropped_bus_inbox_full.inc();
                }
            }
            PushKind::Disconnection => {
                signals.up.store(false, Ordering::Relaxed);
                tracing::warn!("redis subscriber connection lost; reconnecting");
            }
            PushKind::Subscribe if !signals.up.swap(true, Ordering::Relaxed) => {
                tracing::info!("redis subscriber connection restored");
                signals.restored.notify_one();
            }
            _ => {}
        }
        Ok(())
    };
    let config = ConnectionManagerConfig::new()
        .set_push_sender(on_push)
        .set_automatic_resubscription()
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(usize::MAX)
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout));
    // Redis answered the command connection a moment ago; give the
    // subscriber a few connect timeouts, not forever.
    let bound = settings.connect_timeout.saturating_mul(3);
    match tokio::time::timeout(bound, ConnectionManager::new_with_config(client, config)).await {
        Ok(Ok(subscriber)) => Ok(subscriber),
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
