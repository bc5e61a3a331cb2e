//! Interrupt delivery for the virtio-pci transport: MSI-X vectors, or INTx with the ISR.
//!
//! [`VirtioInterrupts`] is shared (`Arc`) between the control thread, which assigns vectors
//! and serves ISR reads, and the poller threads, which signal used buffers through a
//! per-queue [`QueueNotifier`]. Vector numbers live in atomics so a `queue_msix_vector`
//! write takes effect without restarting the queue.
//!
//! With MSI-X enabled, an event goes to its vector (nothing if the vector is
//! VIRTIO_MSI_NO_VECTOR). With MSI-X disabled, the event sets its ISR bit (0: queue,
//! 1: configuration change) and raises INTx; reading the ISR returns and clears the bits and
//! lowers the line.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use emudev::pci::{IntxLine, Msix};
use log::{debug, warn};

use super::common_cfg::VIRTIO_MSI_NO_VECTOR;
use crate::engine::Notifier;

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Interrupt state of one virtio-pci function.
#[derive(Debug)]
pub struct VirtioInterrupts {
    isr: AtomicU8,
    msix: Option<Arc<Msix>>,
    intx: Arc<IntxLine>,
    config_vector: AtomicU16,
    queue_vectors: Box<[AtomicU16]>,
    /// Interrupts raised per queue (MSI-X fired, pending, or INTx), for statistics.
    queue_irqs: Box<[AtomicU64]>,
    config_irqs: AtomicU64,
}

impl VirtioInterrupts {
    /// State for `num_queues` queues, all vectors unassigned.
    pub fn new(num_queues: u16, msix: Option<Arc<Msix>>, intx: Arc<IntxLine>) -> Self {
        Self {
            isr: AtomicU8::new(0),
            msix,
            intx,
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            queue_irqs: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
            config_irqs: AtomicU64::new(0),
        }
    }

    /// Whether events go to MSI-X vectors (the guest enabled MSI-X).
    pub fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.control().0)
    }

    /// Set the vector of queue `index` (out-of-range indexes are ignored).
    pub fn set_queue_vector(&self, index: u16, vector: u16) {
        if let Some(v) = self.queue_vectors.get(usize::from(index)) {
            v.store(vector, Ordering::Release);
        }
    }

    /// Set the configuration-change vector.
    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    fn fire(&self, vector: u16, isr_bit: u8) {
        if self.msix_enabled() {
            if vector == VIRTIO_MSI_NO_VECTOR {
                return;
            }
            if let Some(m) = &self.msix {
                if let Err(e) = m.trigger(vector) {
                    warn!("virtio interrupt: MSI-X vector {vector}: {e}");
                }
            }
            return;
        }
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        if let Err(e) = self.intx.assert() {
            warn!("virtio interrupt: INTx: {e}");
        }
    }

    /// Signal used buffers on queue `index`.
    pub fn signal_queue(&self, index: u16) {
        let Some(v) = self.queue_vectors.get(usize::from(index)) else {
            debug!("virtio interrupt: no queue {index}");
            return;
        };
        if let Some(c) = self.queue_irqs.get(usize::from(index)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.fire(v.load(Ordering::Acquire), ISR_QUEUE);
    }

    /// Signal a device configuration change.
    pub fn signal_config(&self) {
        self.config_irqs.fetch_add(1, Ordering::Relaxed);
        self.fire(self.config_vector.load(Ordering::Acquire), ISR_CONFIG);
    }

    /// Guest read of the ISR: return the bits and clear them, lowering INTx.
    pub fn read_isr(&self) -> u8 {
        let v = self.isr.swap(0, Ordering::SeqCst);
        self.intx.deassert();
        // An event that set a bit between the swap and the deassert must keep the line up.
        if self.isr.load(Ordering::SeqCst) != 0 {
            let _ = self.intx.assert();
        }
        v
    }

    /// ISR bits without clearing them (statistics, tests).
    pub fn peek_isr(&self) -> u8 {
        self.isr.load(Ordering::SeqCst)
    }

    /// Interrupts raised for queue `index` so far.
    pub fn queue_irq_count(&self, index: u16) -> u64 {
        self.queue_irqs
            .get(usize::from(index))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Configuration-change interrupts raised so far.
    pub fn config_irq_count(&self) -> u64 {
        self.config_irqs.load(Ordering::Relaxed)
    }

    /// Device reset: vectors unassigned, ISR cleared, INTx lowered.
    pub fn reset(&self) {
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in self.queue_vectors.iter() {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::SeqCst);
        self.intx.deassert();
    }
}

/// The [`Notifier`] a queue's engine calls to interrupt the driver.
#[derive(Debug, Clone)]
pub struct QueueNotifier {
    irqs: Arc<VirtioInterrupts>,
    index: u16,
}

impl QueueNotifier {
    pub fn new(irqs: Arc<VirtioInterrupts>, index: u16) -> Self {
        Self { irqs, index }
    }
}

impl Notifier for QueueNotifier {
    fn notify(&self) {
        self.irqs.signal_queue(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_path_sets_isr_bits_and_reset_clears() {
        let intx = Arc::new(IntxLine::new());
        let irqs = Arc::new(VirtioInterrupts::new(2, None, intx.clone()));
        let n1 = QueueNotifier::new(irqs.clone(), 1);
        n1.notify();
        irqs.signal_queue(7); // No such queue: ignored.
        assert_eq!(irqs.peek_isr(), ISR_QUEUE);
        assert!(intx.level());
        irqs.signal_config();
        assert_eq!(irqs.read_isr(), ISR_QUEUE | ISR_CONFIG);
        assert!(!intx.level());
        assert_eq!(irqs.read_isr(), 0);
        assert_eq!((irqs.queue_irq_count(1), irqs.config_irq_count()), (1, 1));
        assert_eq!(irqs.queue_irq_count(7), 0);
        n1.notify();
        irqs.reset();
        assert_eq!(irqs.peek_isr(), 0);
        assert!(!intx.level());
    }

    #[test]
    fn msix_disabled_falls_back_to_intx_even_with_vectors() {
        let intx = Arc::new(IntxLine::new());
        let msix = Arc::new(Msix::new(3).unwrap());
        let irqs = VirtioInterrupts::new(1, Some(msix.clone()), intx.clone());
        irqs.set_queue_vector(0, 1);
        irqs.signal_queue(0);
        assert_eq!(irqs.read_isr(), ISR_QUEUE);
        // Enabled: the vector gets it (pending here, no sink), no ISR bit.
        msix.set_control(0x8000).unwrap();
        irqs.signal_queue(0);
        assert_eq!(irqs.peek_isr(), 0);
        assert!(msix.is_pending(1).unwrap());
        // NO_VECTOR: nothing at all.
        irqs.set_queue_vector(0, VIRTIO_MSI_NO_VECTOR);
        irqs.signal_config();
        assert_eq!(irqs.peek_isr(), 0);
        assert!(!msix.is_pending(0).unwrap() && !msix.is_pending(2).unwrap());
    }
}
