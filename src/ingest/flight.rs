//! Records in flight: the concurrency every source shares. Records are
//! routed at once, except that a record waits for the one added before it
//! with the same order key (the same user or room, [`Record::order_key`]),
//! and does not run at all if that one was not done (shutdown interrupted
//! it): a user's records reach the router in the order they were added,
//! whatever the others do.
//!
//! This module owns only that scheduling. How many records may be in
//! flight, in items and bytes, and what "done" lets the source acknowledge
//! (a Kafka partition's contiguous prefix, a stream's entry ids) are the
//! sources' ([`super::kafka`], [`super::stream`]): [`Flight`] has no bound
//! of its own and the sources check [`Flight::len`] before adding.
//!
//! [`Record::order_key`]: super::Record::order_key

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;

/// How much a source lets be in flight: records, and bytes of their
/// values (`--ingest-inflight`, `--ingest-inflight-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Records.
    pub items: usize,
    /// Bytes of their values.
    pub bytes: usize,
}

impl Limits {
    /// Whether a record of `size` bytes fits beside `items` records of
    /// `bytes` bytes. With nothing in flight any one record fits, however
    /// large (it would never fit otherwise).
    pub fn fit(&self, items: usize, bytes: usize, size: usize) -> bool {
        items == 0 || (items < self.items && bytes.saturating_add(size) <= self.bytes)
    }
}

type Running<P> = Pin<Box<dyn Future<Output = Finished<P>> + Send>>;

/// A record that finished: its position, and whether it is done.
#[derive(Debug)]
pub struct Finished<P> {
    /// What the source added it with.
    pub position: P,
    /// True when done (delivered, stored or malformed); false when it was
    /// interrupted, or its predecessor with the same order key was.
    pub done: bool,
    /// The bytes it was added with.
    pub bytes: usize,
    ticket: u64,
    order_key: Option<String>,
}

/// Records being routed; see the module documentation.
pub struct Flight<P> {
    running: FuturesUnordered<Running<P>>,
    /// Per order key, the last record added with it: its ticket and the
    /// receiver of its outcome, which the next record with the key awaits.
    tails: HashMap<String, (u64, oneshot::Receiver<bool>)>,
    next_ticket: u64,
    bytes: usize,
}

impl<P: Send + 'static> Default for Flight<P> {
    fn default() -> Self {
        Flight {
            running: FuturesUnordered::new(),
            tails: HashMap::new(),
            next_ticket: 0,
            bytes: 0,
        }
    }
}

impl<P: Send + 'static> Flight<P> {
    /// Records in flight.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Bytes of the records in flight (as added).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds a record: `work` resolves to whether it is done. With an
    /// `order_key`, it starts once the previous record with that key has
    /// finished, and only if that one was done.
    pub fn add<W>(&mut self, position: P, order_key: Option<String>, bytes: usize, work: W)
    where
        W: Future<Output = bool> + Send + 'static,
    {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.bytes += bytes;
        let (finished_tx, finished_rx) = oneshot::channel();
        let before = order_key
            .as_ref()
            .and_then(|key| self.tails.insert(key.clone(), (ticket, finished_rx)))
            .map(|(_, rx)| rx);
        self.running.push(Box::pin(async move {
            // A predecessor that was dropped unfinished counts as not done.
            let go = match before {
                Some(before) => before.await.unwrap_or(false),
                None => true,
            };
            let done = go && work.await;
            // The successor may be gone already (nothing waits): fine.
            let _ = finished_tx.send(done);
            Finished {
                position,
                done,
                bytes,
                ticket,
                order_key,
            }
        }));
    }

    /// The next record to finish; `None` when nothing is in flight.
    /// Cancel-safe: a record that finished is not lost by dropping the
    /// future before it resolved.
    pub async fn next(&mut self) -> Option<Finished<P>> {
        let finished = self.running.next().await?;
        self.bytes = self.bytes.saturating_sub(finished.bytes);
        if let Some(key) = &finished.order_key {
            if self
                .tails
                .get(key)
                .is_some_and(|(ticket, _)| *ticket == finished.ticket)
            {
                self.tails.remove(key);
            }
        }
        Some(finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A record that logs `name` when it runs, after `delay`.
    fn record(
        log: &Arc<Mutex<Vec<&'static str>>>,
        name: &'static str,
        delay_ms: u64,
        done: bool,
    ) -> impl Future<Output = bool> + Send + 'static {
        let log = log.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            log.lock().map(|mut l| l.push(name)).ok();
            done
        }
    }

    #[test]
    fn limits_count_items_and_bytes() {
        let limits = Limits {
            items: 2,
            bytes: 100,
        };
        assert!(limits.fit(0, 0, 1000), "alone, any record fits");
        assert!(limits.fit(1, 50, 50));
        assert!(!limits.fit(1, 50, 51), "bytes");
        assert!(!limits.fit(2, 0, 1), "items");
    }

    async fn drain(flight: &mut Flight<&'static str>) -> Vec<(&'static str, bool)> {
        let mut out = Vec::new();
        while let Some(f) = flight.next().await {
            out.push((f.position, f.done));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn same_key_in_order_others_concurrently() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut flight = Flight::default();
        flight.add("a1", Some("u:a".into()), 10, record(&log, "a1", 30, true));
        flight.add("b1", Some("u:b".into()), 10, record(&log, "b1", 5, true));
        flight.add("a2", Some("u:a".into()), 10, record(&log, "a2", 1, true));
        flight.add("x", None, 7, record(&log, "x", 2, true));
        assert_eq!((flight.len(), flight.bytes()), (4, 37));
        let finished = drain(&mut flight).await;
        assert_eq!(
            *log.lock().expect("log"),
            vec!["x", "b1", "a1", "a2"],
            "a2 waited for a1, the rest ran at once"
        );
        assert_eq!(finished.len(), 4);
        assert!(finished.iter().all(|(_, done)| *done));
        assert_eq!((flight.len(), flight.bytes()), (0, 0));
        assert!(flight.tails.is_empty(), "finished keys are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_not_done_holds_back_its_key_only() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut flight = Flight::default();
        flight.add("a1", Some("u:a".into()), 1, record(&log, "a1", 10, false));
        flight.add("a2", Some("u:a".into()), 1, record(&log, "a2", 1, true));
        flight.add("b1", Some("u:b".into()), 1, record(&log, "b1", 20, true));
        let mut finished = drain(&mut flight).await;
        finished.sort();
        assert_eq!(finished, vec![("a1", false), ("a2", false), ("b1", true)]);
        assert_eq!(*log.lock().expect("log"), vec!["a1", "b1"], "a2 never ran");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_is_reused_after_its_records_finished() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut flight = Flight::default();
        flight.add("a1", Some("u:a".into()), 1, record(&log, "a1", 1, true));
        assert_eq!(drain(&mut flight).await, vec![("a1", true)]);
        flight.add("a2", Some("u:a".into()), 1, record(&log, "a2", 1, true));
        assert_eq!(drain(&mut flight).await, vec![("a2", true)]);
    }
}
