//! The waiting room: requests refused for lack of capacity may wait for it (up to their tier's
//! `queue.max_wait`), and when capacity comes back the waiter with the highest priority, then
//! the oldest, tries first. Per process: with Redis, each replica orders its own waiters.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `queue: { max_wait: 2s, priority: 10 }` on a tier's limits.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// Longest time a request waits for capacity before it is refused.
    #[serde(with = "crate::units::duration_text")]
    pub max_wait: Duration,
    /// Higher goes first.
    #[serde(default)]
    pub priority: u32,
}

type Place = (u32, Reverse<u64>);

#[derive(Debug, Default)]
pub struct WaitingRoom {
    waiting: Mutex<BinaryHeap<Place>>,
    changed: tokio::sync::Notify,
    arrivals: AtomicU64,
}

/// A place in the room; leaving (drop) lets the next waiter go.
pub struct Ticket<'a> {
    room: &'a WaitingRoom,
    place: Place,
}

impl WaitingRoom {
    pub fn enter(&self, priority: u32) -> Ticket<'_> {
        let place = (
            priority,
            Reverse(self.arrivals.fetch_add(1, Ordering::Relaxed)),
        );
        self.lock().push(place);
        Ticket { room: self, place }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Place>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Capacity may have come back (a request ended): waiters look again.
    pub fn capacity_changed(&self) {
        self.changed.notify_waiters();
    }

    /// Waits until something changes in the room or `at_most` passes.
    pub async fn wait(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.changed.notified()).await;
    }
}

impl Ticket<'_> {
    /// Whether this waiter is the one to try next.
    pub fn is_first(&self) -> bool {
        self.room.lock().peek() == Some(&self.place)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.room.lock().retain(|place| *place != self.place);
        self.room.capacity_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_then_older_goes_first() {
        let room = WaitingRoom::default();
        let low_old = room.enter(1);
        let high = room.enter(5);
        let low_new = room.enter(1);
        assert!(high.is_first());
        drop(high);
        assert!(low_old.is_first());
        assert!(!low_new.is_first());
        drop(low_old);
        assert!(low_new.is_first());
    }
}
