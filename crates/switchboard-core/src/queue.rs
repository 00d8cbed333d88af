//! Bounded queues with two budgets: items and bytes.
//!
//! Every queue on the message path (a client's outbound queue, the bus inbox,
//! the re-route queue) is one of these. An item count alone does not bound
//! memory when items can be 64 KiB each; a byte budget alone does not bound
//! the per-item overhead. A full queue refuses at once — the caller decides
//! whether that drops a message (and counts it) or closes a slow client — so
//! no producer ever waits on a consumer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// What an item costs in a queue's byte budget.
pub trait Weighed {
    /// Bytes this item holds on to while queued.
    fn weight(&self) -> usize;
}

/// Why [`BoundedSender::try_send`] refused an item.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<T> {
    /// The item or byte budget is used up.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// The queue itself. It starts empty and unallocated, grows with what is
/// queued and gives its memory back once drained: an idle connection's
/// queue costs a few dozen bytes, not a preallocated block of slots.
#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    /// Woken when an item is queued or the last sender is gone.
    ready: Notify,
    /// Live senders; at zero the receiver sees the end.
    senders: AtomicUsize,
    /// Woken when an item is taken while a sender waits for room (only the
    /// rare [`BoundedSender::send_when_room`] sets `wants_room`, so the
    /// receiver's fast path pays one relaxed load).
    room: Notify,
    wants_room: AtomicBool,
    max_items: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    bytes: usize,
    /// The receiver is gone (or closed the queue): refuse everything.
    closed: bool,
}

/// Capacity kept when a drained queue shrinks: small enough that an idle
/// connection holds almost nothing, big enough not to reallocate for every
/// frame of a steady trickle.
const KEEP_WHEN_DRAINED: usize = 4;

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock leaves a consistent queue behind.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The sending half; cheap to clone.
#[derive(Debug)]
pub struct BoundedSender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for BoundedSender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        BoundedSender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for BoundedSender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.ready.notify_one();
        }
    }
}

/// The receiving half (one consumer).
#[derive(Debug)]
pub struct BoundedReceiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Drop for BoundedReceiver<T> {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            state.items = VecDeque::new();
            state.bytes = 0;
        }
        self.shared.room.notify_waiters();
    }
}

/// A queue of at most `max_items` items holding at most `max_bytes` bytes.
pub fn bounded<T: Weighed>(
    max_items: usize,
    max_bytes: usize,
) -> (BoundedSender<T>, BoundedReceiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            closed: false,
        }),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
        room: Notify::new(),
        wants_room: AtomicBool::new(false),
        max_items: max_items.max(1),
        max_bytes,
    });
    (
        BoundedSender {
            shared: shared.clone(),
        },
        BoundedReceiver { shared },
    )
}

impl<T: Weighed> BoundedSender<T> {
    /// Queues `item` if both budgets allow it; never waits.
    pub fn try_send(&self, item: T) -> Result<(), Refused<T>> {
        let weight = item.weight();
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(Refused::Closed(item));
            }
            if state.items.len() >= self.shared.max_items
                || state.bytes + weight > self.shared.max_bytes
            {
                return Err(Refused::Full(item));
            }
            state.bytes += weight;
            state.items.push_back(item);
        }
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Bytes queued right now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// Whether at most `items` items and `bytes` bytes are queued.
    pub fn is_below(&self, items: usize, bytes: usize) -> bool {
        let state = self.shared.lock();
        state.items.len() <= items && state.bytes <= bytes
    }

    /// The item and byte budgets.
    pub fn budgets(&self) -> (usize, usize) {
        (self.shared.max_items, self.shared.max_bytes)
    }

    /// Waits until at most `items` items and `bytes` bytes are queued (a
    /// producer that may wait, such as an inbox replay, paces itself with
    /// this instead of overflowing the queue). Ends early if the receiver
    /// is gone.
    pub async fn wait_below(&self, items: usize, bytes: usize) {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            self.shared.wants_room.store(true, Ordering::Release);
            {
                let state = self.shared.lock();
                if state.closed || (state.items.len() <= items && state.bytes <= bytes) {
                    return;
                }
            }
            room.await;
        }
    }
}

impl<T: Weighed> BoundedReceiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let shared = &*self.shared;
        loop {
            // Registered before looking, so a send in between is not missed
            // (and `notify_one` keeps a permit when nobody waits yet).
            let ready = shared.ready.notified();
            if let Some(item) = take(shared) {
                return Some(item);
            }
            if shared.senders.load(Ordering::Acquire) == 0 {
                return take(shared);
            }
            ready.await;
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        take(&self.shared)
    }

    /// Refuses further items; what is queued can still be received.
    pub fn close(&mut self) {
        self.shared.lock().closed = true;
    }
}

/// Takes the front item, giving memory back when the queue is drained.
fn take<T: Weighed>(shared: &Shared<T>) -> Option<T> {
    let item = {
        let mut state = shared.lock();
        let item = state.items.pop_front()?;
        state.bytes = state.bytes.saturating_sub(item.weight());
        if state.items.is_empty() && state.items.capacity() > KEEP_WHEN_DRAINED {
            state.items.shrink_to(KEEP_WHEN_DRAINED);
        }
        item
    };
    if shared.wants_room.load(Ordering::Relaxed) && shared.wants_room.swap(false, Ordering::AcqRel)
    {
        shared.room.notify_waiters();
    }
    Some(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weighed for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    #[tokio::test]
    async fn both_budgets_bind_and_are_given_back() {
        let (tx, mut rx) = bounded::<Vec<u8>>(3, 10);
        assert_eq!(tx.try_send(vec![0; 6]), Ok(()));
        // Bytes: 6 + 6 > 10.
        assert_eq!(tx.try_send(vec![1; 6]), Err(Refused::Full(vec![1; 6])));
        assert_eq!(tx.try_send(vec![2; 1]), Ok(()));
        assert_eq!(tx.try_send(vec![3; 1]), Ok(()));
        // Items: 3 queued.
        assert_eq!(tx.try_send(vec![]), Err(Refused::Full(vec![])));
        assert_eq!(tx.queued_bytes(), 8);
        assert_eq!(rx.recv().await, Some(vec![0; 6]));
        assert_eq!(tx.queued_bytes(), 2);
        assert_eq!(tx.try_send(vec![4; 8]), Ok(()));
        assert_eq!(rx.try_recv(), Some(vec![2]));
        drop(rx);
        assert_eq!(tx.try_send(vec![5]), Err(Refused::Closed(vec![5])));
    }

    #[tokio::test]
    async fn the_end_is_seen_once_every_sender_is_gone_and_the_queue_is_empty() {
        let (tx, mut rx) = bounded::<Vec<u8>>(8, 100);
        let other = tx.clone();
        tx.try_send(vec![1]).expect("queued");
        drop(tx);
        other.try_send(vec![2]).expect("queued");
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item);
            }
            got
        });
        tokio::task::yield_now().await;
        drop(other);
        assert_eq!(waiter.await.expect("joined"), vec![vec![1], vec![2]]);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_send() {
        let (tx, mut rx) = bounded::<Vec<u8>>(8, 100);
        let waiter = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        tx.try_send(vec![7]).expect("queued");
        assert_eq!(waiter.await.expect("joined"), Some(vec![7]));
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let (tx, mut rx) = bounded::<Vec<u8>>(1000, 1 << 20);
        for _ in 0..500 {
            tx.try_send(vec![0]).expect("queued");
        }
        while rx.try_recv().is_some() {}
        assert!(rx.shared.lock().items.capacity() <= KEEP_WHEN_DRAINED);
    }
}
