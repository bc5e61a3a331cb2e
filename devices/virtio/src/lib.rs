//! virtio core.
