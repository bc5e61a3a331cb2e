//! vfio-user protocol: wire types, message codec with fd passing, a server state machine
//! that drives a [`device::ServerDevice`], and a client.
//!
//! Modules: [`wire`] (on-the-wire structs), [`socket`] (SCM_RIGHTS I/O), [`codec`]
//! (framing), [`caps`] (VERSION JSON), [`dma_table`] (client DMA maps and their mmaps),
//! [`server`] (event loop and request validation), [`client`] (blocking client).
//!
//! Package name `emudev-vfio-user`, so it never clashes with the crates.io `vfio-user` crate
//! that tests use as an independent peer.

pub mod caps;
pub mod client;
pub mod codec;
pub mod device;
pub mod dma;
pub mod dma_table;
pub mod server;
pub mod socket;
pub mod wire;

pub use caps::{PeerCaps, ServerCaps};
pub use client::{Client, ClientError, ClientMemory, RegionInfo, SetIrqData};
pub use codec::{Decoder, Frame, FrameError, Message, OutQueue, Outgoing};
pub use device::{
    DeviceDesc, Errno, IoEventFd, IrqAction, IrqData, IrqDesc, RegionDesc, RegionMmap,
    ServerDevice, SparseArea,
};
pub use dma::{DmaError, DmaPort, DmaRegion, DmaTransport};
pub use dma_table::DmaTable;
pub use server::{DmaLayout, Server, ServerError, ServerHandle, ServerOptions};
