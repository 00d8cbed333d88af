//! Bounded queues with two budgets: items and bytes.
//!
//! Every queue on the message path (a client's outbound queue, the bus inbox,
//! the re-route queue) is one of these. An item count alone does not bound
//! memory when items can be 64 KiB each; a byte budget alone does not bound
//! the per-item overhead. A full queue refuses at once — the caller decides
//! whether that drops a message (and counts it) or closes a slow client — so
//! no producer ever waits on a consumer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

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

/// The sending half; cheap to clone.
#[derive(Debug)]
pub struct BoundedSender<T> {
    sender: mpsc::Sender<T>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl<T> Clone for BoundedSender<T> {
    fn clone(&self) -> Self {
        BoundedSender {
            sender: self.sender.clone(),
            bytes: self.bytes.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

/// The receiving half.
#[derive(Debug)]
pub struct BoundedReceiver<T> {
    receiver: mpsc::Receiver<T>,
    bytes: Arc<AtomicUsize>,
}

/// A queue of at most `max_items` items holding at most `max_bytes` bytes.
pub fn bounded<T: Weighed>(
    max_items: usize,
    max_bytes: usize,
) -> (BoundedSender<T>, BoundedReceiver<T>) {
    let (sender, receiver) = mpsc::channel(max_items.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        BoundedSender {
            sender,
            bytes: bytes.clone(),
            max_bytes,
        },
        BoundedReceiver { receiver, bytes },
    )
}

impl<T: Weighed> BoundedSender<T> {
    /// Queues `item` if both budgets allow it; never waits.
    pub fn try_send(&self, item: T) -> Result<(), Refused<T>> {
        let weight = item.weight();
        let before = self.bytes.fetch_add(weight, Ordering::AcqRel);
        if before + weight > self.max_bytes {
            self.bytes.fetch_sub(weight, Ordering::AcqRel);
            return Err(Refused::Full(item));
        }
        match self.sender.try_send(item) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.bytes.fetch_sub(weight, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(item) => Err(Refused::Full(item)),
                    mpsc::error::TrySendError::Closed(item) => Err(Refused::Closed(item)),
                }
            }
        }
    }

    /// Bytes queued right now.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }
}

impl<T: Weighed> BoundedReceiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        let item = self.receiver.recv().await?;
        self.bytes.fetch_sub(item.weight(), Ordering::AcqRel);
        Some(item)
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        let item = self.receiver.try_recv().ok()?;
        self.bytes.fetch_sub(item.weight(), Ordering::AcqRel);
        Some(item)
    }

    /// Refuses further items; what is queued can still be received.
    pub fn close(&mut self) {
        self.receiver.close();
    }
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
}
