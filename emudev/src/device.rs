//! The provider-facing API: what a device model implements.
//!
//! A device model owns its PCI function state ([`crate::pci::PciDevice`]: config space, BARs,
//! capabilities, MSI-X) and its datapath. The transport adapter (`crate::transport`) routes
//! config-space accesses and MSI-X table/PBA accesses to the PCI model, all other BAR accesses
//! to the device, turns DMA map changes into quiesce + [`DeviceModel::set_memory`] + resume,
//! and client loss into [`DeviceModel::stop`]. Devices never see the socket.
//!
//! Threads: every method here is called from the device's control thread (the vfio-user
//! connection thread, or the test thread for the in-process transport). Datapath work runs
//! on poller threads the device hands its queues to; `quiesce` is the handshake with them.
//! The manager may also call `attr`/`set_attr` from its own thread; the device sits behind
//! a mutex, so calls never overlap.
//!
//! Changes by h4 (all additive, with defaults): [`DeviceModel::config_events`],
//! [`DeviceModel::set_event_bus`]; `reset` is followed by `PciDevice::reset`.

use std::sync::Arc;

use emudev_vfio_user::{IoEventFd, RegionMmap};

use crate::memory::GuestMemory;

/// Errors a device model reports to its transport or to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{device}: invalid attribute {key}: {reason}")]
    InvalidAttribute {
        device: String,
        key: String,
        reason: String,
    },
    #[error("{device}: unknown attribute {key}")]
    UnknownAttribute { device: String, key: String },
    #[error("{device}: quiesce did not finish within {millis} ms")]
    QuiesceTimeout { device: String, millis: u64 },
    #[error("{device}: {reason}")]
    Failed { device: String, reason: String },
}

/// Lifecycle state of a device, as the management layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Built and configured; no client attached.
    Configured,
    /// A client is attached; the guest may drive the device.
    Running,
    /// DMA stopped (quiesced) for a memory change or at the client's request.
    Quiesced,
    /// The client went away; state kept for the next client.
    Stopped,
    /// The device hit an internal error and refuses further work until reset.
    Failed,
}

/// A device model: virtio-blk, virtio-net, the AVF NIC, the test device.
pub trait DeviceModel: Send {
    /// Short name for logs and errors, e.g. "virtio-blk0".
    fn name(&self) -> &str;

    /// The PCI function state. The adapter routes config space (region 7) and the MSI-X
    /// table and PBA here.
    fn pci(&mut self) -> &mut crate::pci::PciDevice;

    /// A BAR access the PCI model does not claim (everything but the MSI-X table/PBA).
    /// The range is inside the BAR. Reads of unimplemented registers return zeroes.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// See [`DeviceModel::bar_read`].
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// Called after a config-space write the PCI model applied, with what changed, so the
    /// device can react (bus mastering off, MSI-X enabled, FLR...).
    fn config_written(&mut self, _offset: u64, _len: usize) {}

    /// The [`crate::pci::ConfigEvent`]s of that write (only called when there are some),
    /// right after [`DeviceModel::config_written`]. Added by h4 so devices need not diff
    /// the config space themselves. A `FunctionLevelReset` is also handled by the
    /// transport, which calls [`DeviceModel::reset`] and then `PciDevice::reset` after this.
    fn config_events(&mut self, _events: &[crate::pci::ConfigEvent]) {}

    /// Called before a config-space read is served from the PCI model, so the device can
    /// refresh bytes whose value is produced by the read itself (the virtio PCI-cfg access
    /// window, which performs a BAR read). Default: nothing.
    fn config_reading(&mut self, _offset: u64, _len: usize) {}

    /// mmap information for a BAR with mappable areas (polled doorbell pages).
    fn bar_mmap(&self, _bar: u8) -> Option<RegionMmap> {
        None
    }

    /// ioeventfds for a BAR (DEVICE_GET_REGION_IO_FDS). Default: none.
    fn ioeventfds(&mut self, _bar: u8) -> Vec<IoEventFd> {
        Vec::new()
    }

    /// Switch to a new guest memory snapshot. Called while quiesced.
    fn set_memory(&mut self, mem: Arc<GuestMemory>);

    /// Switch to `mem` without quiescing and without waiting: the change removed no host
    /// mapping (only added regions, or removed ranges reached by messages, which the client
    /// validates itself), so users may keep the old snapshot until their next convenient
    /// point. Called on the control thread, which must not block here: a datapath thread
    /// may be waiting for a DMA message only that thread routes. Returns false if the
    /// device cannot switch lazily; the transport then quiesces and calls `set_memory`.
    fn set_memory_lazy(&mut self, _mem: &Arc<GuestMemory>) -> bool {
        false
    }

    /// Stop all DMA and wait until none is in flight; bounded in time.
    fn quiesce(&mut self) -> Result<(), DeviceError>;
    /// Undo [`DeviceModel::quiesce`].
    fn resume(&mut self);

    /// Device reset (DEVICE_RESET, or a function-level reset): back to power-on state.
    /// The transport calls `PciDevice::reset` right after this (config space, MSI-X, INTx),
    /// so the device only resets its own state (calling it too is harmless). Memory and
    /// client interrupt fds stay.
    fn reset(&mut self);

    /// The client went away: stop the datapath (like quiesce, but the device stays stopped
    /// until the next client and guest driver start it), keep configuration.
    fn stop(&mut self) {
        let _ = self.quiesce();
    }

    /// The bus the transport publishes this device's events on (reset, memory changed,
    /// state changes). Called once, before any other call; a device keeps it to publish its
    /// own events (queue ready/stopped, link changed). Default: ignored.
    fn set_event_bus(&mut self, _bus: Arc<crate::events::EventBus>) {}

    /// Read a device-specific attribute (e.g. "link" for a NIC).
    fn attr(&self, _key: &str) -> Option<String> {
        None
    }
    /// Set a device-specific attribute at runtime.
    fn set_attr(&mut self, key: &str, _value: &str) -> Result<(), DeviceError> {
        Err(DeviceError::UnknownAttribute {
            device: self.name().to_string(),
            key: key.to_string(),
        })
    }
}
