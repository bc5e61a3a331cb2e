//! emudev: the generic emulated-device layer.
//!
//! Device models implement the provider-facing traits here and never see the socket; the
//! vfio-user transport and the in-process transport both drive the same devices.

pub mod memory;

pub use memory::{Access, GuestMemory, MemError};
