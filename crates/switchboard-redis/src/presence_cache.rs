//! The routing path's copy of recipients' presence, kept true by Redis
//! itself (server-assisted client-side caching, `CLIENT TRACKING`).
//!
//! A DM needs the instances holding its recipient. Reading them inside a Lua
//! script for every DM costs Redis more than broadcasting; reading them from
//! here costs Redis nothing, and the DM becomes one PUBLISH per holder (none
//! at all when the recipient is only local, or nowhere). Redis sends an
//! invalidation push on the command connection when a key this connection
//! read changes, and the entry is dropped; a lost connection drops them all
//! (its invalidations are lost with it).
//!
//! Filling an entry races with its invalidation: the read's answer and the
//! invalidation push reach us on different paths. So an entry is first
//! marked pending (with a fresh generation); an invalidation removes
//! whatever is there; the read's answer is stored only if the same pending
//! mark is still in place. Either order ends with no stale entry. Every fill
//! read is pipelined after `CLIENT TRACKING ON` on the same connection, so a
//! read that went over a freshly reconnected connection is tracked too.
//!
//! This module only keeps the entries; `bus.rs` decides when to use them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// Entries kept at most; beyond it the cache is emptied and refills with
/// the users being messaged (Redis's own tracking table is bounded too).
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// One user's presence fields: (instance, connections).
pub(crate) type Fields = Arc<[(Arc<str>, i64)]>;

#[derive(Debug, Clone)]
enum Slot {
    /// A read is in flight; its answer may be stored if still this generation.
    Pending(u64),
    /// The fields as Redis last said, tracked.
    Ready(Fields),
}

/// Presence fields by presence key.
#[derive(Debug, Default)]
pub(crate) struct PresenceCache {
    entries: DashMap<String, Slot>,
    generation: AtomicU64,
}

/// A fill in progress: hand it back with the answer.
#[derive(Debug)]
pub(crate) struct Fill {
    key: String,
    generation: u64,
}

impl PresenceCache {
    /// The cached fields of `key`, if known.
    pub(crate) fn get(&self, key: &str) -> Option<Fields> {
        match self.entries.get(key).as_deref() {
            Some(Slot::Ready(fields)) => Some(fields.clone()),
            _ => None,
        }
    }

    /// Marks `key` as being read; `None` if another read of it is in flight
    /// (this caller reads without filling).
    pub(crate) fn begin_fill(&self, key: &str) -> Option<Fill> {
        if self.entries.len() >= MAX_ENTRIES {
            self.clear();
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut entry = self
            .entries
            .entry(key.to_owned())
            .or_insert(Slot::Pending(generation));
        match &*entry {
            Slot::Pending(g) if *g == generation => Some(Fill {
                key: key.to_owned(),
                generation,
            }),
            Slot::Pending(_) => None,
            Slot::Ready(_) => {
                // Filled meanwhile; refresh it anyway under a new mark.
                *entry = Slot::Pending(generation);
                Some(Fill {
                    key: key.to_owned(),
                    generation,
                })
            }
        }
    }

    /// Stores the answer of `fill`, unless `key` was invalidated meanwhile.
    pub(crate) fn finish_fill(&self, fill: Fill, fields: Fields) {
        if let Some(mut entry) = self.entries.get_mut(&fill.key) {
            if matches!(&*entry, Slot::Pending(g) if *g == fill.generation) {
                *entry = Slot::Ready(fields);
            }
        }
    }

    /// Gives up `fill` (the read failed).
    pub(crate) fn abandon_fill(&self, fill: Fill) {
        self.entries.remove_if(
            &fill.key,
            |_, slot| matches!(slot, Slot::Pending(g) if *g == fill.generation),
        );
    }

    /// Redis says `key` changed (or an instance it names stopped listening).
    pub(crate) fn invalidate(&self, key: &str) {
        self.entries.remove(key);
    }

    /// Everything may be stale (a lost connection, a FLUSHALL).
    pub(crate) fn clear(&self) {
        self.entries.clear();
    }

    /// How many entries are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, i64)]) -> Fields {
        pairs.iter().map(|(i, n)| (Arc::from(*i), *n)).collect()
    }

    #[test]
    fn an_answer_is_stored_unless_invalidated_meanwhile() {
        let cache = PresenceCache::default();
        let fill = cache.begin_fill("k").expect("first fill");
        assert!(cache.begin_fill("k").is_none(), "one fill at a time");
        cache.finish_fill(fill, fields(&[("i1", 1)]));
        assert_eq!(cache.get("k"), Some(fields(&[("i1", 1)])));

        // The invalidation comes before the answer: nothing is stored.
        cache.invalidate("k");
        let fill = cache.begin_fill("k").expect("fill");
        cache.invalidate("k");
        cache.finish_fill(fill, fields(&[("i1", 1)]));
        assert_eq!(cache.get("k"), None);

        // After the answer: the entry goes.
        let fill = cache.begin_fill("k").expect("fill");
        cache.finish_fill(fill, fields(&[("i2", 1)]));
        cache.invalidate("k");
        assert_eq!(cache.get("k"), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_failed_read_leaves_nothing_and_a_clear_empties_all() {
        let cache = PresenceCache::default();
        let fill = cache.begin_fill("a").expect("fill");
        cache.abandon_fill(fill);
        assert_eq!(cache.len(), 0);
        let fill = cache.begin_fill("b").expect("fill");
        cache.finish_fill(fill, fields(&[]));
        cache.clear();
        assert_eq!(cache.get("b"), None);
    }
}
