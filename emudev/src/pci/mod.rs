//! PCI function model: the device-side state a transport drives.
//!
//! Nothing here knows about sockets. A transport (vfio-user, in-process) forwards config
//! space accesses (vfio-user region 7) to [`PciDevice::config_read`] /
//! [`PciDevice::config_write`], MSI-X table and PBA accesses inside a BAR to
//! [`PciDevice::msix_bar_read`] / [`PciDevice::msix_bar_write`], and SET_IRQS requests to the
//! [`Msix`], [`IntxLine`] and [`IrqLine`] objects. The device model reacts to the
//! [`ConfigEvent`]s a config write returns.
//!
//! Files, one concern each:
//! - `config`: the raw type-0 config space with per-bit write and write-1-to-clear masks.
//! - `bar`: BAR and expansion ROM definitions and their sizing masks.
//! - `caps`: capability bodies (vendor, MSI-X, PCI Express, power management), the chain
//!   builder and chain walkers, plus raw extended capabilities (0x100+, 4096-byte spaces).
//! - `msix`: the MSI-X table, PBA and per-vector delivery, shareable with poller threads.
//! - `irq`: eventfd sinks, the INTx line and single-vector lines (ERR, REQ).
//! - `device`: [`PciDevice`] and its builder, tying the above together.

mod bar;
mod caps;
mod config;
mod device;
mod irq;
mod msix;

pub use bar::{BarDef, BarKind, RomBar, BAR_COUNT};
pub use caps::{
    cap_id, walk_capabilities, walk_ext_capabilities, CapError, CapInfo, CapWalkError, Capability,
    ExtCapInfo, ExtCapability, PcieCapConfig, PowerState,
};
pub use config::{command, reg, status, ConfigError, ConfigSize, ConfigSpace, PciIds};
pub use device::{ConfigEvent, MsixLayout, PciDevice, PciDeviceBuilder, PciError};
pub use irq::{EventFd, IntxLine, IrqLine};
pub use msix::{Delivery, MsiSink, Msix, MsixEntry, MsixError, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS};

#[cfg(test)]
mod golden;
