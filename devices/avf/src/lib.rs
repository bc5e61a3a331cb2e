//! emudev-avf: an emulated Intel Ethernet Adaptive Virtual Function (8086:1889) that the
//! stock Linux `iavf` driver (and later DPDK's `net_iavf`) drives. The device plays both the
//! VF hardware and the PF driver at the other end of the virtchnl mailbox.
//!
//! Spec: `shared/docs/avf-device.md`. Modules, one concern each:
//! - [`regs`]: the BAR0 register map.
//! - [`virtchnl`]: virtchnl wire structs, opcodes, status codes, capability bits.
//! - [`pf`]: the PF side of virtchnl (per-VF state, one handler per request).
//! - [`adminq`]: the admin-queue engine (ATQ consumer, ARQ producer) on a worker thread.
//! - [`irq`]: the per-vector interrupt model (auto-mask, INTENA re-arm, SWINT_TRIG).
//! - [`desc`]: TX/RX descriptor decode/encode and TX offloads as a vnet header.
//! - [`rx`]: receive policy: MAC filter, packet type, checksum status, RSS.
//! - [`datapath`]: the TX/RX datapath, a task on an emudev poller pool, on the netback backend.
//! - [`device`]: the [`emudev::DeviceModel`] tying them to the PCI function.
//!

pub mod adminq;
pub mod datapath;
pub mod desc;
pub mod device;
pub mod irq;
pub mod pf;
pub mod regs;
pub mod rx;
pub mod virtchnl;

pub use adminq::AdminMode;
pub use device::{AvfDevice, AvfError};
pub use pf::VfConfig;

#[cfg(test)]
mod tests;
