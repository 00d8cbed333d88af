//! Striped async locks keyed by name: serialize the writes that concern one
//! user (presence) or one room (subscription) without a lock per key.
//!
//! A fixed number of stripes keeps memory bounded whatever the number of
//! users; two keys may share a stripe, which only costs a little waiting.

use std::hash::BuildHasher;

use tokio::sync::{Mutex, MutexGuard};

/// A fixed set of async mutexes, one chosen per key by hash.
#[derive(Debug)]
pub struct KeyedLocks {
    stripes: Box<[Mutex<()>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl KeyedLocks {
    /// `stripes` locks (at least one).
    pub fn new(stripes: usize) -> Self {
        KeyedLocks {
            stripes: (0..stripes.max(1)).map(|_| Mutex::new(())).collect(),
            hasher: Default::default(),
        }
    }

    /// Waits for the lock that guards `key`.
    pub async fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let index = (self.hasher.hash_one(key) as usize) % self.stripes.len();
        self.stripes[index].lock().await
    }

    /// Waits for the locks of every key in `keys`, in stripe order (so two
    /// callers cannot deadlock): for a write that covers many keys at once.
    pub async fn lock_many<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut indices: Vec<usize> = keys
            .into_iter()
            .map(|key| (self.hasher.hash_one(key) as usize) % self.stripes.len())
            .collect();
        indices.sort_unstable();
        indices.dedup();
        let mut guards = Vec::with_capacity(indices.len());
        for index in indices {
            guards.push(self.stripes[index].lock().await);
        }
        guards
    }

    /// Waits for every lock, always in the same order (so two callers of this
    /// cannot deadlock, and a holder of one key's lock only makes it wait):
    /// for bulk writes that must not interleave with any single-key write.
    pub async fn lock_all(&self) -> Vec<MutexGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(self.stripes.len());
        for stripe in self.stripes.iter() {
            guards.push(stripe.lock().await);
        }
        guards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_key_is_exclusive() {
        let locks = KeyedLocks::new(4);
        let guard = locks.lock("bob").await;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), locks.lock("bob"))
                .await
                .is_err()
        );
        drop(guard);
        let _again = locks.lock("bob").await;
    }

    #[tokio::test]
    async fn lock_all_excludes_every_key() {
        let locks = KeyedLocks::new(4);
        let all = locks.lock_all().await;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), locks.lock("x"))
                .await
                .is_err()
        );
        drop(all);
        let _x = locks.lock("x").await;
    }
}
