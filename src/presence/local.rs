//! In-process presence for the embedded single-node mode and for router tests
//! with several in-process instances sharing one [`LocalPresenceHub`].

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;

use super::{Holder, Presence, PresenceError};

/// The shared store: user -> (instance -> connections).
#[derive(Debug, Default)]
pub struct LocalPresenceHub {
    users: DashMap<String, HashMap<Arc<str>, u32>>,
}

/// One instance's handle on a [`LocalPresenceHub`].
#[derive(Debug)]
pub struct LocalPresence {
    hub: Arc<LocalPresenceHub>,
    instance: Arc<str>,
}

impl LocalPresence {
    /// Joins `hub` as `instance`.
    pub fn new(hub: Arc<LocalPresenceHub>, instance: &str) -> Self {
        LocalPresence {
            hub,
            instance: Arc::from(instance),
        }
    }

    fn holders(&self, user: &str) -> Vec<Holder> {
        self.hub
            .users
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

#[async_trait]
impl Presence for LocalPresence {
    async fn connect(&self, user: &str) -> Result<(), PresenceError> {
        *self
            .hub
            .users
            .entry(user.to_owned())
            .or_default()
            .entry(self.instance.clone())
            .or_insert(0) += 1;
        Ok(())
    }

    async fn disconnect(&self, user: &str) -> Result<(), PresenceError> {
        if let Some(mut entry) = self.hub.users.get_mut(user) {
            if let Some(n) = entry.get_mut(&self.instance) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    entry.remove(&self.instance);
                }
            }
        }
        self.hub.users.remove_if(user, |_, e| e.is_empty());
        Ok(())
    }

    async fn locate(&self, user: &str) -> Result<Vec<Holder>, PresenceError> {
        Ok(self.holders(user))
    }

    async fn locate_many(&self, users: &[String]) -> Result<Vec<Vec<Holder>>, PresenceError> {
        Ok(users.iter().map(|u| self.holders(u)).collect())
    }

    async fn withdraw(&self) -> Result<(), PresenceError> {
        self.hub.users.retain(|_, entry| {
            entry.remove(&self.instance);
            !entry.is_empty()
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_per_instance() {
        let hub = Arc::new(LocalPresenceHub::default());
        let p1 = LocalPresence::new(hub.clone(), "i1");
        let p2 = LocalPresence::new(hub.clone(), "i2");
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
