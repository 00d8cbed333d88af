//! The in-process backend: presence and bus for the embedded single-node
//! mode, and for several in-process instances sharing one [`LocalHub`] in the
//! router's tests (the same tests run over Redis).
//!
//! It has Redis's semantics where the router can see them: a publish reaches
//! every current subscriber of the channel and returns how many there were;
//! delivery into an instance's inbox never blocks (a full inbox drops and
//! counts, like a Redis output buffer limit would); the routing operation
//! reads the recipient's presence and publishes to the holders in one step,
//! building the same envelope the Redis script builds.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;

use crate::bus::{Bus, Channel, ChannelKind, Covered, DirectRoute, Envelope, Inbound, Reached};
use crate::error::BackendError;
use crate::metrics::Metrics;
use crate::presence::{Holder, Presence};
use crate::queue::{BoundedSender, Refused};

/// Subscribers of one channel: (instance id, its inbox, its metrics).
type Subscribers = Vec<(Arc<str>, BoundedSender<Inbound>, Arc<Metrics>)>;

/// The shared "server" of in-process instances: channels and presence.
#[derive(Debug, Default)]
pub struct LocalHub {
    channels: DashMap<String, Subscribers>,
    /// user -> (instance -> connections).
    presence: DashMap<String, HashMap<Arc<str>, u32>>,
}

/// One instance's handle on a [`LocalHub`]: its [`Presence`] and [`Bus`].
#[derive(Debug)]
pub struct LocalBackend {
    hub: Arc<LocalHub>,
    instance: Arc<str>,
    inbox: BoundedSender<Inbound>,
    metrics: Arc<Metrics>,
}

impl LocalBackend {
    /// Joins `hub` as `instance`; received messages go to `inbox`.
    pub fn new(
        hub: Arc<LocalHub>,
        instance: &str,
        inbox: BoundedSender<Inbound>,
        metrics: Arc<Metrics>,
    ) -> Self {
        LocalBackend {
            hub,
            instance: Arc::from(instance),
            inbox,
            metrics,
        }
    }

    fn holders(&self, user: &str) -> Vec<Holder> {
        self.hub
            .presence
            .get(user)
            .map(|entry| {
                entry
                    .iter()
                    .map(|(instance, n)| Holder {
                        instance: instance.clone(),
                        connections: *n,
                    })
                    .collect()
            })
            .unwrap_or_default()
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

impl LocalHub {
    fn publish(&self, channel: Channel<'_>, payload: &Bytes) -> usize {
        let (name, kind) = name(channel);
        let subscribers = match self.channels.get(&name) {
            Some(subs) => subs.clone(),
            None => return 0,
        };
        for (_, inbox, metrics) in &subscribers {
            let inbound = Inbound {
                kind,
                payload: payload.clone(),
            };
            if let Err(Refused::Full(_)) = inbox.try_send(inbound) {
                metrics.dropped_bus_inbox_full.inc();
            }
        }
        subscribers.len()
    }
}

#[async_trait]
impl Bus for LocalBackend {
    async fn publish(&self, channel: Channel<'_>, payload: Bytes) -> Result<usize, BackendError> {
        Ok(self.hub.publish(channel, &payload))
    }

    async fn subscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
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

    async fn unsubscribe(&self, channel: Channel<'_>) -> Result<(), BackendError> {
        let (name, _) = name(channel);
        if let Some(mut subs) = self.hub.channels.get_mut(&name) {
            subs.retain(|(id, _, _)| *id != self.instance);
        }
        self.hub
            .channels
            .remove_if(&name, |_, subs| subs.is_empty());
        Ok(())
    }

    async fn route_direct(&self, route: &DirectRoute<'_>) -> Result<Vec<Reached>, BackendError> {
        let targets: Vec<Arc<str>> = self
            .holders(route.to)
            .into_iter()
            .filter(|h| h.connections > 0)
            .map(|h| h.instance)
            .filter(|id| **id != *route.caller && !route.covered.contains(&&**id))
            .collect();
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let covered = Envelope::covered_field(
            route
                .covered
                .iter()
                .copied()
                .chain(targets.iter().map(|id| &**id)),
        );
        let payload = Envelope::Direct {
            to: route.to,
            hop: route.hop,
            origin: route.origin,
            covered: Covered::from_field(&covered),
        }
        .encode(route.frame);
        Ok(targets
            .iter()
            .map(|id| Reached {
                instance: id.to_string(),
                receivers: self.hub.publish(Channel::Instance(id), &payload),
            })
            .collect())
    }
}

#[async_trait]
impl Presence for LocalBackend {
    async fn connect(&self, user: &str) -> Result<(), BackendError> {
        *self
            .hub
            .presence
            .entry(user.to_owned())
            .or_default()
            .entry(self.instance.clone())
            .or_insert(0) += 1;
        Ok(())
    }

    async fn disconnect(&self, user: &str) -> Result<(), BackendError> {
        if let Some(mut entry) = self.hub.presence.get_mut(user) {
            if let Some(n) = entry.get_mut(&self.instance) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    entry.remove(&self.instance);
                }
            }
        }
        self.hub.presence.remove_if(user, |_, e| e.is_empty());
        crate::registry::shrink_if_sparse(&self.hub.presence);
        Ok(())
    }

    async fn locate(&self, user: &str) -> Result<Vec<Holder>, BackendError> {
        Ok(self.holders(user))
    }

    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, BackendError> {
        Ok(users.iter().map(|u| self.holders(u)).collect())
    }

    async fn withdraw(&self) -> Result<(), BackendError> {
        self.hub.presence.retain(|_, entry| {
            entry.remove(&self.instance);
            !entry.is_empty()
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::bounded;

    fn backend(
        hub: &Arc<LocalHub>,
        id: &str,
    ) -> (LocalBackend, crate::queue::BoundedReceiver<Inbound>) {
        let (tx, rx) = bounded(8, 1 << 20);
        (LocalBackend::new(hub.clone(), id, tx, Metrics::new()), rx)
    }

    #[tokio::test]
    async fn publish_reaches_subscribers_only() {
        let hub = Arc::new(LocalHub::default());
        let (b1, mut rx1) = backend(&hub, "i1");
        let (b2, mut rx2) = backend(&hub, "i2");
        b2.subscribe(Channel::Instance("i2")).await.expect("sub");
        let x = Bytes::from_static(b"x");
        assert_eq!(
            b1.publish(Channel::Instance("i2"), x.clone())
                .await
                .expect("pub"),
            1
        );
        assert_eq!(
            b1.publish(Channel::Instance("i3"), x.clone())
                .await
                .expect("pub"),
            0
        );
        assert_eq!(rx2.try_recv().map(|m| m.payload), Some(x.clone()));
        assert!(rx1.try_recv().is_none());
        b2.unsubscribe(Channel::Instance("i2"))
            .await
            .expect("unsub");
        assert_eq!(
            b1.publish(Channel::Instance("i2"), x).await.expect("pub"),
            0
        );
    }

    #[tokio::test]
    async fn presence_counts_per_instance() {
        let hub = Arc::new(LocalHub::default());
        let (p1, _rx1) = backend(&hub, "i1");
        let (p2, _rx2) = backend(&hub, "i2");
        p1.connect("bob").await.expect("ok");
        p1.connect("bob").await.expect("ok");
        p2.connect("bob").await.expect("ok");
        let mut h = p1.locate("bob").await.expect("ok");
        h.sort_by(|a, b| a.instance.cmp(&b.instance));
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].connections, 2);
        p1.disconnect("bob").await.expect("ok");
        p1.disconnect("bob").await.expect("ok");
        assert_eq!(p2.locate("bob").await.expect("ok").len(), 1);
        p2.withdraw().await.expect("ok");
        assert!(p1.locate("bob").await.expect("ok").is_empty());
    }
}
