//! Transport feature bits (virtio 1.2 §6) the PCI transport itself checks or offers.

/// Descriptors may point to indirect tables.
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// used_event / avail_event notification suppression.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// Modern (non-legacy) device; mandatory for this transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The device sits behind the platform's DMA translation (IOVAs, not GPAs).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// Packed virtqueue layout.
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
/// Buffers are used in the order they were made available.
pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
/// Per-queue reset through `queue_reset`.
pub const VIRTIO_F_RING_RESET: u64 = 1 << 40;
