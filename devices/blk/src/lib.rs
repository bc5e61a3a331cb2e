//! virtio-blk engine.
