//! The seam between the protocol server and a device model.
//!
//! The server owns the socket, the connection state machine and the DMA map table. It
//! validates every request before calling into a [`ServerDevice`], so a device only ever sees
//! region indexes it declared, offsets and counts inside its regions, and IRQ ranges inside
//! the counts it declared. Devices never see the socket.

use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use nix::errno::Errno;

use crate::dma::{DmaPort, DmaRegion};

/// A device's answer to DEVICE_GET_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceDesc {
    /// `wire::device_flags` bits (PCI, RESET).
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// One sparse mmap area of a region, relative to the region start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

/// How a region can be mmapped by the client.
#[derive(Debug, Clone)]
pub struct RegionMmap {
    /// The fd passed to the client with the region info.
    pub fd: Arc<OwnedFd>,
    /// Offset to pass to mmap() for region offset 0.
    pub file_offset: u64,
    /// Mappable areas; empty means the whole region is mappable.
    pub areas: Vec<SparseArea>,
}

/// A device's answer to DEVICE_GET_REGION_INFO.
#[derive(Debug, Clone, Default)]
pub struct RegionDesc {
    pub size: u64,
    /// `wire::region_flags` READ / WRITE bits. MMAP and CAPS are derived from `mmap`.
    pub flags: u32,
    pub mmap: Option<RegionMmap>,
}

/// A device's answer to DEVICE_GET_IRQ_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IrqDesc {
    /// `wire::irq_info_flags` bits.
    pub flags: u32,
    pub count: u32,
}

/// The action of a DEVICE_SET_IRQS request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqAction {
    Mask,
    Unmask,
    Trigger,
}

/// The data of a DEVICE_SET_IRQS request, already validated against `count`.
#[derive(Debug)]
pub enum IrqData {
    /// DATA_NONE: apply the action to every vector in the range.
    None,
    /// DATA_BOOL: one flag per vector in the range.
    Bool(Vec<bool>),
    /// DATA_EVENTFD: one entry per vector in the range; `None` de-assigns that vector.
    Eventfds(Vec<Option<OwnedFd>>),
}

/// One ioeventfd the device created for DEVICE_GET_REGION_IO_FDS.
#[derive(Debug, Clone)]
pub struct IoEventFd {
    pub offset: u64,
    pub size: u64,
    pub fd: Arc<OwnedFd>,
    pub datamatch: Option<u64>,
}

/// A device model as the protocol server sees it.
///
/// All calls come from the connection's event-loop thread. A call must never wait on a
/// `DmaPort` reply (the client serves DMA on the thread that may be waiting for our
/// reply); hand such work to another thread instead.
pub trait ServerDevice: Send {
    fn device_desc(&self) -> DeviceDesc;
    /// `None` for an index the device does not have (answered EINVAL).
    fn region(&self, index: u32) -> Option<RegionDesc>;
    /// `None` for an index the device does not have (answered EINVAL).
    fn irq(&self, index: u32) -> Option<IrqDesc>;

    /// Read `data.len()` bytes at `offset`; the server has checked the range is inside the
    /// region and that the region is readable.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno>;
    /// Write `data` at `offset`; range and WRITE flag already checked.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;

    /// The ioeventfds of a region, for DEVICE_GET_REGION_IO_FDS. Default: none.
    fn region_io_fds(&mut self, _index: u32) -> Result<Vec<IoEventFd>, Errno> {
        Err(Errno::ENOTSUP)
    }

    /// Apply a validated SET_IRQS request: `start + count` lies inside the index's count
    /// (or both are 0, meaning "the whole index", with `IrqData::None`).
    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), Errno>;

    /// A DMA region was added. `table` is the whole new table, sorted by iova.
    fn dma_map(&mut self, table: &[DmaRegion], added: &DmaRegion) -> Result<(), Errno>;
    /// DMA regions (or pieces of regions, for a partial unmap) were removed; `table` is the
    /// whole new table, which may hold the remainders of split regions. When this returns,
    /// the device must hold no reference to a removed range and have no access to it in
    /// flight: the reply to the client follows. An error is reported to the client, but the
    /// ranges are removed regardless.
    fn dma_unmap(&mut self, table: &[DmaRegion], removed: &[DmaRegion]) -> Result<(), Errno>;

    /// DEVICE_RESET.
    fn reset(&mut self) -> Result<(), Errno>;

    /// A client finished VERSION negotiation. `dma` reaches client memory that came
    /// without an fd; it is valid until `detach`.
    fn attach(&mut self, _dma: DmaPort) {}
    /// The client went away. Stop all DMA, drop IRQ fds, keep device state.
    fn detach(&mut self) {}
}
