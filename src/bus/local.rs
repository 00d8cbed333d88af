//! In-process bus: the embedded single-node mode, and several in-process
//! instances sharing one [`LocalHub`] in the router's tests.
//!
//! It has Redis pub/sub's semantics where the router can see them: a publish
//! reaches every current subscriber of the channel and returns how many there
//! were; delivery into an instance's inbox never blocks (a full inbox drops
//! and counts, like a Redis output buffer limit would).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;

use super::{Bus, BusError, Channel, ChannelKind, Inbound};
use crate::metrics::Metrics;

/// Subscribers of one channel: (instance id, its inbox, its metrics).
type Subscribers = Vec<(Arc<str>, mpsc::Sender<Inbound>, Arc<Metrics>)>;

/// The shared "server" of in-process buses.
#[derive(Debug, Default)]
pub struct LocalHub {
    channels: DashMap<String, Subscribers>,
}

/// One instance's handle on a [`LocalHub`].
#[derive(Debug)]
pub struct LocalBus {
    hub: Arc<LocalHub>,
    instance: Arc<str>,
    inbox: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
}

impl LocalBus {
    /// Joins `hub` as `instance`; received messages go to `inbox`.
    pub fn new(
        hub: Arc<LocalHub>,
        instance: &str,
        inbox: mpsc::Sender<Inbound>,
        metrics: Arc<Metrics>,
    ) -> Self {
        LocalBus {
            hub,
            instance: Arc::from(instance),
            inbox,
            metrics,
        }
    }
}

fn name(channel: Channel<'_>) -> (String, ChannelKind) {
    match channel {
        Channel::Instance(id) => (format!("inst:{id}"), ChannelKind::Personal),
        Channel::Room(room) => (format!("room:{room}"), ChannelKind::Room),
        Channel::All => ("all".to_owned(), ChannelKind::Broadcast),
        Channel::User(user) => (format!("user:{user}"), ChannelKind::User),
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BusError> {
        let (name, kind) = name(channel);
        let subscribers = match self.hub.channels.get(&name) {
            Some(subs) => subs.clone(),
            None => return Ok(0),
        };
        for (_, inbox, metrics) in &subscribers {
            let inbound = Inbound {
                kind,
                payload: payload.to_vec(),
            };
            if inbox.try_send(inbound).is_err() {
                metrics.dropped_bus_inbox_full.inc();
            }
        }
        Ok(subscribers.len())
    }

    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BusError> {
        let (name, _) = name(channel);
        let mut subs = self.hub.channels.entry(name).or_default();
        if !subs.iter().any(|(id, _, _)| *id == self.instance) {
            subs.push((
                self.instance.clone(),
                self.inbox.clone(),
                self.metrics.clone(),
            ));
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BusError> {
        let (name, _) = name(channel);
        if let Some(mut subs) = self.hub.channels.get_mut(&name) {
            subs.retain(|(id, _, _)| *id != self.instance);
        }
        self.hub
            .channels
            .remove_if(&name, |_, subs| subs.is_empty());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publish_reaches_subscribers_only() {
        let hub = Arc::new(LocalHub::default());
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        let b1 = LocalBus::new(hub.clone(), "i1", tx1, Metrics::new());
        let b2 = LocalBus::new(hub.clone(), "i2", tx2, Metrics::new());
        b2.subscribe(Channel::Instance("i2")).await.expect("sub");
        assert_eq!(
            b1.publish(Channel::Instance("i2"), Bytes::from_static(b"x"))
                .await
                .expect("pub"),
            1
        );
        assert_eq!(
            b1.publish(Channel::Instance("i3"), Bytes::from_static(b"x"))
                .await
                .expect("pub"),
            0
        );
        assert_eq!(rx2.try_recv().map(|m| m.payload).ok(), Some(b"x".to_vec()));
        assert!(rx1.try_recv().is_err());
        b2.unsubscribe(Channel::Instance("i2"))
            .await
            .expect("unsub");
        assert_eq!(
            b1.publish(Channel::Instance("i2"), Bytes::from_static(b"x"))
                .await
                .expect("pub"),
            0
        );
    }
}
