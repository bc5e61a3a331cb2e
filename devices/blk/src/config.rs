//! virtio-blk device configuration space, feature bits, and the builder that derives both from
//! the options and the backend.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::backend::BlockBackend;

/// Sector size used by every virtio-blk request field (`sector`, `capacity`), independent of
/// the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID string.
pub const ID_BYTES: usize = 20;
/// Upper bound of `max_discard_seg` / `max_write_zeroes_seg`.
pub const MAX_DISCARD_SEG: u32 = 256;

/// Feature bits (as masks) that virtio-blk devices offer.
pub mod feature {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// `geometry` is valid.
    pub const GEOMETRY: u64 = 1 << 4;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH requests are supported.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology fields are valid.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// `writeback` is writable by the driver.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// `num_queues` is valid.
    pub const MQ: u64 = 1 << 12;
    /// DISCARD requests are supported.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES requests are supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Device lifetime reporting.
    pub const LIFETIME: u64 = 1 << 15;
    /// SECURE_ERASE requests are supported.
    pub const SECURE_ERASE: u64 = 1 << 16;
    /// Zoned block device.
    pub const ZONED: u64 = 1 << 17;

    /// Transport: indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// Transport: used/avail event index.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Transport: modern (non-legacy) device, mandatory.
    pub const VERSION_1: u64 = 1 << 32;
    /// Transport: the device accesses memory through the platform IOMMU (IOVAs).
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
}

/// `virtio_blk_config.geometry`.
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VirtioBlkGeometry {
    pub cylinders: U16,
    pub heads: u8,
    pub sectors: u8,
}

/// `virtio_blk_config.zoned` (`virtio_blk_zoned_characteristics`).
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VirtioBlkZoned {
    pub zone_sectors: U32,
    pub max_open_zones: U32,
    pub max_active_zones: U32,
    pub max_append_sectors: U32,
    pub write_granularity: U32,
    pub model: u8,
    pub unused2: [u8; 3],
}

/// `struct virtio_blk_config` as the driver sees it (little-endian, packed).
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VirtioBlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: U64,
    pub size_max: U32,
    pub seg_max: U32,
    pub geometry: VirtioBlkGeometry,
    pub blk_size: U32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: U16,
    pub opt_io_size: U32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: U16,
    pub max_discard_sectors: U32,
    pub max_discard_seg: U32,
    pub discard_sector_alignment: U32,
    pub max_write_zeroes_sectors: U32,
    pub max_write_zeroes_seg: U32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
    pub max_secure_erase_sectors: U32,
    pub max_secure_erase_seg: U32,
    pub secure_erase_sector_alignment: U32,
    pub zoned: VirtioBlkZoned,
}

const _: () = assert!(core::mem::size_of::<VirtioBlkGeometry>() == 4);
const _: () = assert!(core::mem::size_of::<VirtioBlkZoned>() == 24);
const _: () = assert!(core::mem::size_of::<VirtioBlkConfig>() == 96);

/// Why a [`BlkOptions`] set cannot be turned into a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("logical block size {0} is not a power of two in 512..=65536")]
    BlockSize(u32),
    #[error(
        "physical block size {phys} is not a power-of-two multiple of the logical size {logical}"
    )]
    PhysicalBlockSize { phys: u32, logical: u32 },
    #[error("num_queues must be in 1..=65535, got {0}")]
    NumQueues(u32),
    #[error("seg_max must be at least 1")]
    SegMax,
    #[error("size_max {0} must be at least 4096")]
    SizeMax(u32),
    #[error("backend of {size} bytes is smaller than one logical block of {block} bytes")]
    TooSmall { size: u64, block: u32 },
}

/// User-facing options of a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkOptions {
    /// Number of request queues (MQ is offered when > 1).
    pub num_queues: u16,
    /// Present the disk read-only even when the backend is writable.
    pub read_only: bool,
    /// Logical block size; 512 unless the guest is known to cope (SeaBIOS only boots 512).
    pub logical_block_size: u32,
    /// Physical block size (TOPOLOGY is offered when larger than the logical size).
    pub physical_block_size: u32,
    /// Queue size the transport offers; used to derive the default `seg_max`.
    pub queue_size: u16,
    /// Max segments per request; default `queue_size - 2` (QEMU's choice).
    pub seg_max: Option<u32>,
    /// Max bytes per segment; None = no limit, SIZE_MAX not offered.
    pub size_max: Option<u32>,
    /// Offer FLUSH (and keep a volatile write cache); if false, writes are not made durable.
    pub flush: bool,
    /// Offer DISCARD when the backend supports it.
    pub discard: bool,
    /// Offer WRITE_ZEROES when the backend supports it.
    pub write_zeroes: bool,
    /// Max sectors per DISCARD / WRITE_ZEROES segment.
    pub max_discard_sectors: u32,
    /// Max segments per DISCARD / WRITE_ZEROES request (clamped to 1..=256).
    pub max_discard_seg: u32,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            read_only: false,
            logical_block_size: 512,
            physical_block_size: 512,
            queue_size: 256,
            seg_max: None,
            size_max: None,
            flush: true,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1 << 22, // 2 GiB
            max_discard_seg: 32,
        }
    }
}

/// The offered feature set and the config space of one virtio-blk device, plus the limits
/// the request engine enforces (derived from the same values so they cannot disagree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    features: u64,
    space: VirtioBlkConfig,
}

impl BlkConfig {
    /// Derive features and config space from `opts` and the backend's size and abilities.
    pub fn new(opts: &BlkOptions, backend: &dyn BlockBackend) -> Result<Self, ConfigError> {
        let lbs = opts.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=65536).contains(&lbs) {
            return Err(ConfigError::BlockSize(lbs));
        }
        if lbs != 512 {
            log::warn!("virtio-blk: logical block size {lbs}: SeaBIOS cannot boot from it");
        }
        if lbs > 4096 {
            log::warn!("virtio-blk: logical block size {lbs} > 4096: older Linux guests refuse it");
        }
        let pbs = opts.physical_block_size;
        if !pbs.is_power_of_two() || pbs < lbs {
            return Err(ConfigError::PhysicalBlockSize {
                phys: pbs,
                logical: lbs,
            });
        }
        if opts.num_queues == 0 {
            return Err(ConfigError::NumQueues(0));
        }
        let seg_max = match opts.seg_max {
            Some(s) => s,
            None => u32::from(opts.queue_size.saturating_sub(2)).max(1),
        };
        if seg_max == 0 {
            return Err(ConfigError::SegMax);
        }
        if let Some(s) = opts.size_max {
            if s < 4096 {
                return Err(ConfigError::SizeMax(s));
            }
        }
        // Capacity in 512-byte sectors, rounded down to whole logical blocks.
        let size = backend.size();
        let block = u64::from(lbs);
        let usable = size - size % block;
        if usable == 0 {
            return Err(ConfigError::TooSmall { size, block: lbs });
        }
        let read_only = opts.read_only || backend.read_only();

        let mut features = feature::VERSION_1 | feature::SEG_MAX | feature::BLK_SIZE;
        let mut space = VirtioBlkConfig {
            capacity: U64::new(usable >> SECTOR_SHIFT),
            seg_max: U32::new(seg_max),
            blk_size: U32::new(lbs),
            num_queues: U16::new(opts.num_queues),
            ..Default::default()
        };
        if let Some(s) = opts.size_max {
            features |= feature::SIZE_MAX;
            space.size_max = U32::new(s);
        }
        if opts.num_queues > 1 {
            features |= feature::MQ;
        }
        if read_only {
            features |= feature::RO;
        }
        if opts.flush {
            features |= feature::FLUSH;
            space.writeback = 1;
        }
        if pbs > lbs {
            features |= feature::TOPOLOGY;
            // Both are powers of two with pbs > lbs, so the quotient is a power of two > 1.
            space.physical_block_exp = (pbs / lbs).trailing_zeros() as u8;
            space.min_io_size = U16::new(1);
        }
        let lbs_sectors = lbs >> SECTOR_SHIFT;
        let max_sectors = opts.max_discard_sectors.max(lbs_sectors);
        // Linux uses at most 256 (MAX_DISCARD_SEGMENTS); the cap also bounds the payload the
        // engine reads per request.
        let max_seg = opts.max_discard_seg.clamp(1, MAX_DISCARD_SEG);
        if !read_only && opts.discard && backend.supports_discard() {
            features |= feature::DISCARD;
            space.max_discard_sectors = U32::new(max_sectors);
            space.max_discard_seg = U32::new(max_seg);
            space.discard_sector_alignment = U32::new(lbs_sectors);
        }
        if !read_only && opts.write_zeroes {
            // Every backend can write zeroes (at worst by writing them).
            features |= feature::WRITE_ZEROES;
            space.max_write_zeroes_sectors = U32::new(max_sectors);
            space.max_write_zeroes_seg = U32::new(max_seg);
            space.write_zeroes_may_unmap = u8::from(backend.supports_discard());
        }
        Ok(Self { features, space })
    }

    /// Offered device features, including VERSION_1 (the transport adds ring features).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The config structure.
    pub fn space(&self) -> &VirtioBlkConfig {
        &self.space
    }

    /// The config space bytes.
    pub fn bytes(&self) -> &[u8] {
        self.space.as_bytes()
    }

    /// Copy config bytes at `offset` into `data`; bytes past the end read as 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes = self.bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = bytes.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.space.capacity.get()
    }

    /// True when RO is offered.
    pub fn read_only(&self) -> bool {
        self.features & feature::RO != 0
    }

    /// Max sectors per DISCARD segment (0 when DISCARD is not offered).
    pub fn max_discard_sectors(&self) -> u32 {
        self.space.max_discard_sectors.get()
    }

    /// Max segments per DISCARD request (0 when DISCARD is not offered).
    pub fn max_discard_seg(&self) -> u32 {
        self.space.max_discard_seg.get()
    }

    /// Max sectors per WRITE_ZEROES segment (0 when not offered).
    pub fn max_write_zeroes_sectors(&self) -> u32 {
        self.space.max_write_zeroes_sectors.get()
    }

    /// Max segments per WRITE_ZEROES request (0 when not offered).
    pub fn max_write_zeroes_seg(&self) -> u32 {
        self.space.max_write_zeroes_seg.get()
    }

    /// Whether WRITE_ZEROES may deallocate.
    pub fn write_zeroes_may_unmap(&self) -> bool {
        self.space.write_zeroes_may_unmap != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::null::NullBackend;
    use core::mem::offset_of;

    #[test]
    fn layout_matches_the_spec_offsets() {
        assert_eq!(offset_of!(VirtioBlkConfig, capacity), 0);
        assert_eq!(offset_of!(VirtioBlkConfig, size_max), 8);
        assert_eq!(offset_of!(VirtioBlkConfig, seg_max), 12);
        assert_eq!(offset_of!(VirtioBlkConfig, geometry), 16);
        assert_eq!(offset_of!(VirtioBlkConfig, blk_size), 20);
        assert_eq!(offset_of!(VirtioBlkConfig, physical_block_exp), 24);
        assert_eq!(offset_of!(VirtioBlkConfig, min_io_size), 26);
        assert_eq!(offset_of!(VirtioBlkConfig, opt_io_size), 28);
        assert_eq!(offset_of!(VirtioBlkConfig, writeback), 32);
        assert_eq!(offset_of!(VirtioBlkConfig, num_queues), 34);
        assert_eq!(offset_of!(VirtioBlkConfig, max_discard_sectors), 36);
        assert_eq!(offset_of!(VirtioBlkConfig, max_discard_seg), 40);
        assert_eq!(offset_of!(VirtioBlkConfig, discard_sector_alignment), 44);
        assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(VirtioBlkConfig, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(VirtioBlkConfig, max_secure_erase_sectors), 60);
        assert_eq!(
            offset_of!(VirtioBlkConfig, secure_erase_sector_alignment),
            68
        );
        assert_eq!(offset_of!(VirtioBlkConfig, zoned), 72);
    }

    #[test]
    fn defaults_give_512_byte_blocks_and_le_capacity() {
        let b = NullBackend::new(1 << 20);
        let c = BlkConfig::new(&BlkOptions::default(), &b).unwrap();
        let f = c.features();
        assert_ne!(f & feature::VERSION_1, 0);
        assert_ne!(f & feature::FLUSH, 0);
        assert_eq!(f & feature::MQ, 0);
        assert_eq!(f & feature::RO, 0);
        assert_eq!(f & feature::SIZE_MAX, 0);
        let bytes = c.bytes();
        assert_eq!(bytes.len(), 96);
        assert_eq!(&bytes[0..8], &2048u64.to_le_bytes());
        assert_eq!(&bytes[12..16], &254u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &512u32.to_le_bytes());
        assert_eq!(&bytes[34..36], &1u16.to_le_bytes());
        // Partial and out-of-range reads.
        let mut v = [0xffu8; 4];
        c.read(20, &mut v);
        assert_eq!(v, 512u32.to_le_bytes());
        c.read(94, &mut v);
        assert_eq!(v, [0, 0, 0, 0]);
    }

    #[test]
    fn read_only_mq_and_block_size_options() {
        let b = NullBackend::new((1 << 20) + 1000);
        let opts = BlkOptions {
            num_queues: 4,
            read_only: true,
            logical_block_size: 4096,
            physical_block_size: 16384,
            size_max: Some(65536),
            ..Default::default()
        };
        let c = BlkConfig::new(&opts, &b).unwrap();
        let f = c.features();
        assert_ne!(f & feature::MQ, 0);
        assert_ne!(f & feature::RO, 0);
        assert_ne!(f & feature::SIZE_MAX, 0);
        assert_ne!(f & feature::TOPOLOGY, 0);
        // A read-only disk offers neither discard nor write-zeroes.
        assert_eq!(f & (feature::DISCARD | feature::WRITE_ZEROES), 0);
        // The odd tail is cut to whole 4 KiB blocks.
        assert_eq!(c.capacity_sectors(), 2048);
        assert_eq!(c.space().physical_block_exp, 2);
        assert_eq!(c.space().num_queues.get(), 4);
        assert_eq!(c.space().size_max.get(), 65536);
        // Discard segments are capped.
        let c = BlkConfig::new(
            &BlkOptions {
                max_discard_seg: 100_000,
                ..Default::default()
            },
            &b,
        )
        .unwrap();
        assert_eq!(c.max_discard_seg(), MAX_DISCARD_SEG);
        assert_eq!(c.max_write_zeroes_seg(), MAX_DISCARD_SEG);
    }

    #[test]
    fn bad_options_are_refused() {
        let b = NullBackend::new(1 << 20);
        for (opts, want) in [
            (
                BlkOptions {
                    logical_block_size: 1000,
                    ..Default::default()
                },
                ConfigError::BlockSize(1000),
            ),
            (
                BlkOptions {
                    num_queues: 0,
                    ..Default::default()
                },
                ConfigError::NumQueues(0),
            ),
            (
                BlkOptions {
                    seg_max: Some(0),
                    ..Default::default()
                },
                ConfigError::SegMax,
            ),
        ] {
            assert_eq!(BlkConfig::new(&opts, &b), Err(want));
        }
        let tiny = NullBackend::new(100);
        assert!(matches!(
            BlkConfig::new(&BlkOptions::default(), &tiny),
            Err(ConfigError::TooSmall { .. })
        ));
    }
}
