//! virtio-blk: configuration space, request engine, and block backends.
//!
//! - [`config`]: `virtio_blk_config`, feature bits, and [`BlkConfig`] built from options.
//! - [`backend`]: the [`BlockBackend`] trait with raw-file, null and fault-injecting backends.
//! - [`request`]: wire structs and the split of a chain into header / data / status.
//! - [`engine`]: [`BlkEngine`], which validates and executes one request.
//! - [`handler`]: [`BlkQueueHandler`], the per-queue glue to the vring core.
//! - [`device`]: [`VirtioBlkDevice`], the virtio device type behind the PCI transport.

pub mod backend;
pub mod config;
pub mod device;
pub mod engine;
pub mod handler;
pub mod request;

#[cfg(test)]
mod testutil;

pub use backend::{BackendError, BlockBackend};
pub use config::{BlkConfig, BlkOptions, ConfigError, VirtioBlkConfig};
pub use device::VirtioBlkDevice;
pub use engine::{BlkEngine, BlkStats, BlkStatsSnapshot, Completion};
pub use handler::BlkQueueHandler;
pub use request::Segment;
