//! emudev-vhost: a virtio device whose datapath is an external vhost-user backend.
//!
//! The guest sees our virtio-pci function (over vfio-user or in-process); the rings are run
//! by a vhost-user backend (qemu-storage-daemon, virtiofsd, SPDK, ...) in guest memory we
//! share with it through the fds of the client's DMA maps. We are the vhost-user frontend.
//!
//! - [`protocol`]: wire structs and the parser of backend replies (fuzzed).
//! - [`conn`]: [`Frontend`], one connection, request by request, with bounded waits.
//! - [`memtable`]: the SET_MEM_TABLE built from a guest memory snapshot.
//! - [`backend`]: [`Backend`], connection + rings shared by the control and monitor threads.
//! - [`monitor`]: the thread forwarding call fds to interrupts and reconnecting.
//! - [`engine`]: [`VhostUserEngine`], the vring core's `Engine`.
//! - [`device`]: [`VhostUserDevice`], the virtio-blk / virtio-fs device type.
//!
//! We wrote our own small codec instead of using rust-vmm's `vhost` crate: its frontend
//! blocks without a time limit on a silent backend, and we want every backend reply to
//! pass one parser we fuzz.

pub mod backend;
pub mod conn;
pub mod device;
pub mod engine;
pub mod memtable;
mod monitor;
pub mod protocol;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use backend::{Backend, BackendOptions};
pub use conn::{BackendInfo, ConnError, Frontend};
pub use device::{VhostDeviceOptions, VhostError, VhostKind, VhostUserDevice};
pub use engine::VhostUserEngine;
