//! Counters of the virtio-pci transport, read by a control socket.
//!
//! Updated with relaxed atomics from the control thread; interrupt counts come from
//! [`super::interrupt::VirtioInterrupts`], which pollers update.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one device.
#[derive(Debug)]
pub struct TransportCounters {
    pub(crate) bar_reads: AtomicU64,
    pub(crate) bar_writes: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) needs_reset: AtomicU64,
    pub(crate) engine_timeouts: AtomicU64,
    pub(crate) queues: Box<[QueueCounters]>,
}

/// Live counters of one queue.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub(crate) kicks: AtomicU64,
    pub(crate) starts: AtomicU64,
    pub(crate) stops: AtomicU64,
    pub(crate) errors: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl TransportCounters {
    pub(crate) fn new(num_queues: u16) -> Self {
        Self {
            bar_reads: AtomicU64::new(0),
            bar_writes: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            needs_reset: AtomicU64::new(0),
            engine_timeouts: AtomicU64::new(0),
            queues: (0..num_queues).map(|_| QueueCounters::default()).collect(),
        }
    }

    pub(crate) fn queue(&self, index: u16) -> Option<&QueueCounters> {
        self.queues.get(usize::from(index))
    }
}

/// A snapshot of one queue's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Doorbell writes the transport forwarded to the engine.
    pub kicks: u64,
    /// Used-buffer interrupts raised (MSI-X or INTx).
    pub interrupts: u64,
    pub starts: u64,
    pub stops: u64,
    /// Ring errors reported by the engine.
    pub errors: u64,
}

/// A snapshot of the transport's counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransportStats {
    pub bar_reads: u64,
    pub bar_writes: u64,
    /// Device resets (status 0 and function resets).
    pub resets: u64,
    /// Times DEVICE_NEEDS_RESET was raised.
    pub needs_reset: u64,
    /// Engine operations that did not complete in time.
    pub engine_timeouts: u64,
    pub config_interrupts: u64,
    pub status: u8,
    pub driver_features: u64,
    pub queues: Vec<QueueStats>,
}
