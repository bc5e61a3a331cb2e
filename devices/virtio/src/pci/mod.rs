//! Modern (virtio 1.x, non-transitional) virtio-pci transport.
//!
//! Files, one concern each:
//! - `features`: transport feature bits.
//! - `common_cfg`: the common configuration register file and its status machine.
//! - `layout`: the BAR layout and the virtio vendor capabilities describing it.
//! - `interrupt`: MSI-X / INTx+ISR delivery and the per-queue notifier.
//! - `pci_cfg`: the PCI configuration access window (cfg_type 5).
//! - `device_type`: the [`VirtioDeviceType`] trait blk and net implement.
//! - `stats`: counters.
//! - `transport`: [`VirtioPciDevice`], the `DeviceModel` tying it together.
//! - `tests` (mock type + mock engine) and `e2e_tests` (echo type on the real poller, also
//!   through the vfio-user adapter via `InProc`).

pub mod common_cfg;
pub mod device_type;
pub mod features;
pub mod interrupt;
pub mod layout;
pub mod pci_cfg;
pub mod stats;
pub mod transport;

pub use common_cfg::{CommonCfg, CommonCfgHooks, QueueRegs, VIRTIO_MSI_NO_VECTOR};
pub use device_type::VirtioDeviceType;
pub use interrupt::{QueueNotifier, VirtioInterrupts};
pub use stats::{QueueStats, TransportStats};
pub use transport::{
    VirtioPciDevice, VirtioPciError, VirtioPciOptions, DEFAULT_ENGINE_TIMEOUT, TRANSPORT_FEATURES,
};

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod nowait_tests;
#[cfg(test)]
mod tests;
