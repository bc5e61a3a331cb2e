//! On-the-wire layouts of the vfio-user protocol (QEMU `docs/interop/vfio-user.rst`).
//!
//! Every struct here is plain old data read from and written to untrusted bytes with
//! `zerocopy`: no field is an enum, so no byte pattern is invalid. All data is host-endian.
//! Sizes are asserted at compile time against the spec.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Command numbers. Kept as plain `u16` constants, never a Rust enum read from bytes.
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    /// Retired (was DIRTY_PAGES); answered as unsupported.
    pub const DIRTY_PAGES: u16 = 14;
    pub const REGION_WRITE_MULTI: u16 = 15;
    pub const DEVICE_FEATURE: u16 = 16;
    pub const MIG_DATA_READ: u16 = 17;
    pub const MIG_DATA_WRITE: u16 = 18;

    /// Human-readable name for logs and traces.
    pub fn name(cmd: u16) -> &'static str {
        match cmd {
            VERSION => "VERSION",
            DMA_MAP => "DMA_MAP",
            DMA_UNMAP => "DMA_UNMAP",
            DEVICE_GET_INFO => "DEVICE_GET_INFO",
            DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
            DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
            DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
            DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
            REGION_READ => "REGION_READ",
            REGION_WRITE => "REGION_WRITE",
            DMA_READ => "DMA_READ",
            DMA_WRITE => "DMA_WRITE",
            DEVICE_RESET => "DEVICE_RESET",
            DIRTY_PAGES => "DIRTY_PAGES",
            REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
            DEVICE_FEATURE => "DEVICE_FEATURE",
            MIG_DATA_READ => "MIG_DATA_READ",
            MIG_DATA_WRITE => "MIG_DATA_WRITE",
            _ => "UNKNOWN",
        }
    }
}

/// Header flag bits (offset 8).
pub mod hdr_flags {
    /// Bits 0-3: message type.
    pub const TYPE_MASK: u32 = 0xf;
    pub const TYPE_COMMAND: u32 = 0;
    pub const TYPE_REPLY: u32 = 1;
    /// The sender wants no reply (posted write).
    pub const NO_REPLY: u32 = 1 << 4;
    /// Reply carries an error; `error` holds the errno.
    pub const ERROR: u32 = 1 << 5;
}

/// Size of the fixed header.
pub const HEADER_SIZE: usize = 16;
/// Largest data transfer we accept or advertise (`max_data_xfer_size`).
pub const MAX_DATA_XFER_SIZE: usize = 1 << 20;
/// Largest message we accept: a full-size transfer plus its header and the biggest
/// fixed request part, with slack for REGION_WRITE_MULTI and capability chains.
pub const MAX_MSG_SIZE: usize = MAX_DATA_XFER_SIZE + 4096;
/// fds we accept in one message (QEMU sends at most 16).
pub const MAX_MSG_FDS: usize = 16;
/// Largest VERSION JSON we parse.
pub const MAX_VERSION_JSON: usize = 4096;

/// Message header.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    /// Whole message size, header included.
    pub msg_size: u32,
    pub flags: u32,
    /// errno, meaningful in error replies only.
    pub error: u32,
}

impl Header {
    pub fn msg_type(&self) -> u32 {
        self.flags & hdr_flags::TYPE_MASK
    }
    pub fn is_reply(&self) -> bool {
        self.msg_type() == hdr_flags::TYPE_REPLY
    }
    pub fn no_reply(&self) -> bool {
        self.flags & hdr_flags::NO_REPLY != 0
    }
    pub fn is_error(&self) -> bool {
        self.flags & hdr_flags::ERROR != 0
    }
}

/// VERSION payload head; followed by an optional NUL-terminated JSON string.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

/// Protocol version we speak (QEMU sends 0.0; libvfio-user answers minor ≤ 2).
pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 0;

/// DMA_MAP / DMA_UNMAP flag bits.
pub mod dma_flags {
    pub const READ: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    /// DMA_UNMAP: legacy dirty-bitmap request (unsupported).
    pub const UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
    /// DMA_UNMAP: drop every mapping (address and size must be 0).
    pub const UNMAP_ALL: u32 = 1 << 1;
}

/// DMA_MAP request payload (32 bytes). At most one fd rides with it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    /// Offset into the fd; 0 when no fd is passed.
    pub offset: u64,
    pub address: u64,
    pub size: u64,
}

/// DMA_UNMAP request and reply payload (24 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

/// DEVICE_GET_INFO payload (16 bytes both ways).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// DEVICE_GET_INFO flag bits (VFIO_DEVICE_FLAGS_*).
pub mod device_flags {
    pub const RESET: u32 = 1 << 0;
    pub const PCI: u32 = 1 << 1;
}

/// DEVICE_GET_REGION_INFO payload head (32 bytes), followed by a capability chain.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    /// Offset of the first capability from the start of this struct, 0 if none.
    pub cap_offset: u32,
    pub size: u64,
    /// Offset to pass to mmap() on the region fd.
    pub offset: u64,
}

/// Region flag bits (VFIO_REGION_INFO_FLAG_*).
pub mod region_flags {
    pub const READ: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const MMAP: u32 = 1 << 2;
    pub const CAPS: u32 = 1 << 3;
}

/// Region capability header (VFIO `vfio_info_cap_header`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct CapHeader {
    pub id: u16,
    pub version: u16,
    /// Offset of the next capability from the start of the region info, 0 if last.
    pub next: u32,
}

/// Capability id of the sparse mmap capability.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// Capability id of the region type capability.
pub const REGION_INFO_CAP_TYPE: u16 = 2;

/// Sparse mmap capability body after its header.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SparseMmapHead {
    pub nr_areas: u32,
    pub reserved: u32,
}

/// One sparse mmap area.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct SparseMmapArea {
    pub offset: u64,
    pub size: u64,
}

/// DEVICE_GET_REGION_IO_FDS request and reply head (16 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RegionIoFds {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// One ioeventfd sub-region of a DEVICE_GET_REGION_IO_FDS reply (40 bytes, spec layout).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct IoFdSubRegion {
    pub offset: u64,
    pub size: u64,
    pub fd_index: u32,
    /// 0 = ioeventfd, 1 = ioregionfd.
    pub kind: u32,
    pub flags: u32,
    pub padding: u32,
    pub datamatch: u64,
}

/// IO fd sub-region kinds and flags.
pub mod iofd {
    pub const TYPE_IOEVENTFD: u32 = 0;
    pub const TYPE_IOREGIONFD: u32 = 1;
    /// ioeventfd: only trigger when the written value equals `datamatch`.
    pub const FLAG_DATAMATCH: u32 = 1 << 0;
}

/// DEVICE_GET_IRQ_INFO payload (16 bytes both ways).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// IRQ info flag bits (VFIO_IRQ_INFO_*).
pub mod irq_info_flags {
    pub const EVENTFD: u32 = 1 << 0;
    pub const MASKABLE: u32 = 1 << 1;
    pub const AUTOMASKED: u32 = 1 << 2;
    pub const NORESIZE: u32 = 1 << 3;
}

/// VFIO PCI IRQ indexes.
pub mod irq_index {
    pub const INTX: u32 = 0;
    pub const MSI: u32 = 1;
    pub const MSIX: u32 = 2;
    pub const ERR: u32 = 3;
    pub const REQ: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// VFIO PCI region indexes.
pub mod region_index {
    pub const BAR0: u32 = 0;
    pub const BAR5: u32 = 5;
    pub const ROM: u32 = 6;
    pub const CONFIG: u32 = 7;
    pub const VGA: u32 = 8;
    /// Regions a PCI device reports (QEMU needs at least CONFIG + 1).
    pub const COUNT: u32 = 9;
}

/// DEVICE_SET_IRQS payload head (20 bytes); BOOL data or eventfds follow.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// DEVICE_SET_IRQS flag bits (VFIO_IRQ_SET_*).
pub mod irq_set_flags {
    pub const DATA_NONE: u32 = 1 << 0;
    pub const DATA_BOOL: u32 = 1 << 1;
    pub const DATA_EVENTFD: u32 = 1 << 2;
    pub const ACTION_MASK: u32 = 1 << 3;
    pub const ACTION_UNMASK: u32 = 1 << 4;
    pub const ACTION_TRIGGER: u32 = 1 << 5;
    pub const DATA_TYPE_MASK: u32 = DATA_NONE | DATA_BOOL | DATA_EVENTFD;
    pub const ACTION_TYPE_MASK: u32 = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;
}

/// REGION_READ / REGION_WRITE payload head (16 bytes); data follows.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

/// Spec layout of DMA_READ / DMA_WRITE (16 bytes); data follows.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DmaAccess {
    pub address: u64,
    pub count: u64,
}

/// QEMU 11.1's layout of DMA_READ / DMA_WRITE (`VFIOUserDMARW`): a u32 count and data at
/// payload offset 12 (message byte 28). See `docs/architecture.md` for the deviation.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C, packed)]
pub struct DmaAccessQemu {
    pub address: u64,
    pub count: u32,
}

/// REGION_WRITE_MULTI head: the number of entries that follow.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct WriteMultiHead {
    pub wr_cnt: u64,
}

/// One REGION_WRITE_MULTI entry (24 bytes; at most 8 data bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct WriteMultiEntry {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
    pub data: [u8; 8],
}

/// Most entries a REGION_WRITE_MULTI may carry (QEMU batches at most 200).
pub const MAX_WRITE_MULTI: u64 = 1024;

/// DEVICE_FEATURE payload head (8 bytes); feature data follows.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct DeviceFeature {
    pub argsz: u32,
    pub flags: u32,
}

/// DEVICE_FEATURE flag bits.
pub mod feature_flags {
    pub const MASK: u32 = 0xffff;
    pub const GET: u32 = 1 << 16;
    pub const SET: u32 = 1 << 17;
    pub const PROBE: u32 = 1 << 18;
}

/// MIG_DATA_READ / MIG_DATA_WRITE head (8 bytes).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MigData {
    pub argsz: u32,
    pub size: u32,
}

const _: () = {
    assert!(core::mem::size_of::<Header>() == 16);
    assert!(core::mem::size_of::<Version>() == 4);
    assert!(core::mem::size_of::<DmaMap>() == 32);
    assert!(core::mem::size_of::<DmaUnmap>() == 24);
    assert!(core::mem::size_of::<DeviceInfo>() == 16);
    assert!(core::mem::size_of::<RegionInfo>() == 32);
    assert!(core::mem::size_of::<CapHeader>() == 8);
    assert!(core::mem::size_of::<SparseMmapHead>() == 8);
    assert!(core::mem::size_of::<SparseMmapArea>() == 16);
    assert!(core::mem::size_of::<RegionIoFds>() == 16);
    assert!(core::mem::size_of::<IoFdSubRegion>() == 40);
    assert!(core::mem::size_of::<IrqInfo>() == 16);
    assert!(core::mem::size_of::<IrqSet>() == 20);
    assert!(core::mem::size_of::<RegionAccess>() == 16);
    assert!(core::mem::size_of::<DmaAccess>() == 16);
    assert!(core::mem::size_of::<DmaAccessQemu>() == 12);
    assert!(core::mem::size_of::<WriteMultiHead>() == 8);
    assert!(core::mem::size_of::<WriteMultiEntry>() == 24);
    assert!(core::mem::size_of::<DeviceFeature>() == 8);
    assert!(core::mem::size_of::<MigData>() == 8);
};
