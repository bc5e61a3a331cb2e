//! emudev: the generic emulated-device layer.
//!
//! Device models implement the provider-facing traits here and never see the socket; the
//! vfio-user transport and the in-process transport both drive the same devices.
//!
//! - [`device`]: the [`DeviceModel`] trait devices implement.
//! - [`pci`]: the PCI function model (config space, BARs, capabilities, MSI-X, INTx).
//! - [`memory`]: guest memory snapshots built from DMA maps.
//! - [`transport`]: the vfio-user adapter and the in-process transport.
//! - [`manager`]: devices added and removed at runtime, one socket and thread each.
//! - [`lifecycle`], [`events`], [`doorbell`]: device state, backend events, doorbells.
//! - [`poller`]: polling threads device backends run their datapath tasks on.
//! - [`testdev`]: a test device exercising all of the above.

pub mod device;
pub mod doorbell;
pub mod events;
pub mod lifecycle;
pub mod manager;
pub mod memory;
pub mod pci;
pub mod poller;
pub mod testdev;
pub mod transport;

pub use device::{DeviceError, DeviceModel, DeviceState};
pub use events::{DeviceEvent, EventBus};
pub use manager::{DeviceManager, ManagerError};
pub use memory::{Access, GuestMemory, MemError, ShareableRegion};
pub use transport::{InProc, VfioUserAdapter};
