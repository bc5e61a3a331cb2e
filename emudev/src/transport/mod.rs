//! Transports: how a [`crate::device::DeviceModel`] is driven.
//!
//! - [`vfio_user`]: the [`VfioUserAdapter`] turning a device model into an
//!   `emudev_vfio_user::ServerDevice` for the protocol server.
//! - [`inproc`]: drives the same adapter with no socket (tests, benchmarks), so both
//!   transports share every line of routing code.

pub mod inproc;
pub mod vfio_user;

pub use inproc::{InProc, InProcError};
pub use vfio_user::{SharedDevice, VfioUserAdapter};
