//! Device events for backends: queue ready/stopped, reset, memory changed, link changed.
//!
//! Publishing never blocks the control thread: every subscriber gets a bounded crossbeam
//! channel and an event that does not fit is dropped and counted (per bus). Backends that
//! must not miss state should treat events as hints and re-read the device state. A
//! subscriber whose receiver is gone is removed on the next publish.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use crate::device::DeviceState;

/// Default per-subscriber queue depth.
pub const DEFAULT_EVENT_CAPACITY: usize = 256;

/// Something that happened to a device, as a backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// The guest driver enabled queue `queue`.
    QueueReady { queue: u16 },
    /// Queue `queue` stopped (driver disabled it, reset, or the client left).
    QueueStopped { queue: u16 },
    /// The device was reset (DEVICE_RESET or a function-level reset).
    Reset,
    /// A new guest memory snapshot with `regions` regions is in use.
    MemoryChanged { regions: usize },
    /// Link state of a network device.
    LinkChanged { up: bool },
    /// Lifecycle transition.
    StateChanged { from: DeviceState, to: DeviceState },
    /// A client attached (`true`) or went away (`false`).
    ClientAttached(bool),
}

/// Fan-out of [`DeviceEvent`]s to any number of subscribers.
#[derive(Debug)]
pub struct EventBus {
    subscribers: Mutex<Vec<Sender<DeviceEvent>>>,
    capacity: usize,
    dropped: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new(DEFAULT_EVENT_CAPACITY)
    }
}

impl EventBus {
    /// A bus whose subscribers each buffer up to `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            subscribers: Mutex::new(Vec::new()),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        }
    }

    /// A new receiver for every event published from now on.
    pub fn subscribe(&self) -> Receiver<DeviceEvent> {
        let (tx, rx) = bounded(self.capacity);
        self.lock().push(tx);
        rx
    }

    /// Deliver `ev` to every subscriber without blocking. Returns how many got it.
    pub fn publish(&self, ev: DeviceEvent) -> usize {
        let mut subs = self.lock();
        let mut delivered = 0;
        subs.retain(|tx| match tx.try_send(ev.clone()) {
            Ok(()) => {
                delivered += 1;
                true
            }
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        delivered
    }

    /// Events dropped because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Live subscribers (as of the last publish).
    pub fn subscriber_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Sender<DeviceEvent>>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscriber_gets_every_event_in_order() {
        let bus = EventBus::default();
        let a = bus.subscribe();
        let b = bus.subscribe();
        assert_eq!(bus.publish(DeviceEvent::Reset), 2);
        assert_eq!(bus.publish(DeviceEvent::QueueReady { queue: 3 }), 2);
        for rx in [&a, &b] {
            assert_eq!(rx.try_recv().unwrap(), DeviceEvent::Reset);
            assert_eq!(rx.try_recv().unwrap(), DeviceEvent::QueueReady { queue: 3 });
            assert!(rx.try_recv().is_err());
        }
    }

    #[test]
    fn full_subscriber_drops_and_counts_without_blocking_others() {
        let bus = EventBus::new(2);
        let slow = bus.subscribe();
        let fast = bus.subscribe();
        for q in 0..5 {
            bus.publish(DeviceEvent::QueueStopped { queue: q });
            // The fast one keeps up.
            assert_eq!(
                fast.try_recv().unwrap(),
                DeviceEvent::QueueStopped { queue: q }
            );
        }
        assert_eq!(bus.dropped(), 3);
        assert_eq!(slow.len(), 2);
        assert_eq!(
            slow.try_recv().unwrap(),
            DeviceEvent::QueueStopped { queue: 0 }
        );
    }

    #[test]
    fn gone_subscribers_are_pruned() {
        let bus = EventBus::default();
        let a = bus.subscribe();
        drop(bus.subscribe());
        assert_eq!(bus.publish(DeviceEvent::LinkChanged { up: true }), 1);
        assert_eq!(bus.subscriber_count(), 1);
        drop(a);
        assert_eq!(bus.publish(DeviceEvent::Reset), 0);
        assert_eq!(bus.subscriber_count(), 0);
    }
}
