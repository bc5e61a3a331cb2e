//! vfio-user protocol: wire types, message codec with fd passing, a server state machine
//! that drives a [`device::ServerDevice`], and a client.
//!
//! Package name `emudev-vfio-user`, so it never clashes with the crates.io `vfio-user` crate
//! that tests use as an independent peer.

pub mod caps;
pub mod codec;
pub mod device;
pub mod dma;
pub mod dma_table;
pub mod socket;
pub mod wire;

pub use codec::{Decoder, Frame, FrameError, Message, OutQueue, Outgoing};
pub use device::{
    DeviceDesc, Errno, IoEventFd, IrqAction, IrqData, IrqDesc, RegionDesc, RegionMmap,
    ServerDevice, SparseArea,
};
pub use dma::{DmaError, DmaPort, DmaRegion, DmaTransport};
