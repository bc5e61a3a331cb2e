//! The shared fixture: fd-backed guest RAM seen by both implementations, a split ring in it,
//! and a burst of 3-descriptor virtio-blk requests (header, 4 KiB data, status).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use emudev::GuestMemory;
use emudev_vfio_user::DmaRegion;
use emudev_virtio::queue::testdriver::SplitDriver;
use emudev_virtio::QueueConfig;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest RAM size: ring + headers + up to 128 data pages.
pub const MEM_SIZE: usize = 4 << 20;
/// Queue size (Linux virtio-blk default under QEMU).
pub const QUEUE_SIZE: u16 = 256;
/// Request headers (one 64-byte slot each, status byte at +16, like Linux's per-request struct).
const HDR_BASE: u64 = 0x1_0000;
/// Data pages.
const DATA_BASE: u64 = 0x10_0000;
/// Virtio-blk request data size.
pub const DATA_LEN: u32 = 4096;
/// Split-ring descriptor flags (virtio 1.x 2.7.5).
mod desc_flags {
    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;
}

/// Largest burst the layout has room for.
pub const MAX_BURST: u16 = 128;

/// Errors setting up the fixture.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("memfd_create: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the memfd to {MEM_SIZE} bytes: {0}")]
    Truncate(std::io::Error),
    #[error("mapping guest RAM: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    #[error("building the vm-memory view: {0}")]
    VmMemory(vm_memory::mmap::Error),
    #[error("burst {0} is not a divisor of the queue size {QUEUE_SIZE} in 1..={MAX_BURST}")]
    Burst(u16),
}

/// Which virtio-blk request every chain carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// VIRTIO_BLK_T_IN: the null backend zero-fills the 4 KiB data buffer.
    Read,
    /// VIRTIO_BLK_T_OUT: the null backend drops the data (pure ring + request overhead).
    Write,
    /// Read requests, but only the ring is handled (pop, walk, add_used): no blk work.
    Ring,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::Read => "read",
            Mix::Write => "write",
            Mix::Ring => "ring",
        }
    }
}

/// Guest RAM, the split ring in it and the burst of requests.
pub struct Fixture {
    /// Our view (as the vfio-user layer builds it from an fd-backed DMA_MAP).
    pub mem: Arc<GuestMemory>,
    /// rust-vmm's view of the same mapping.
    pub gm: GuestMemoryMmap<()>,
    pub ring: QueueConfig,
    pub burst: u16,
    /// Host address of the avail ring's `idx` field.
    avail_idx: *const AtomicU16,
    /// Driver's avail idx (= next_avail of whichever implementation runs next).
    pub idx: u16,
    /// Keeps the mapping alive for `gm`'s alias and `avail_idx`.
    _ram: Arc<MmapRegion>,
}

impl Fixture {
    pub fn new(mix: Mix, burst: u16) -> Result<Self, SetupError> {
        if burst == 0 || burst > MAX_BURST || QUEUE_SIZE % burst != 0 {
            return Err(SetupError::Burst(burst));
        }
        // SAFETY: the name is a NUL-terminated literal; the returned fd is checked below.
        let fd = unsafe { libc::memfd_create(c"bench-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(SetupError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64)
            .map_err(SetupError::Truncate)?;
        let ram = Arc::new(
            MmapRegion::from_file(FileOffset::new(file, 0), MEM_SIZE).map_err(SetupError::Mmap)?,
        );
        let mem = Arc::new(GuestMemory::from_dma(
            &[DmaRegion {
                iova: 0,
                size: MEM_SIZE as u64,
                prot: 3,
                mapping: Some(ram.clone()),
                map_offset: 0,
            }],
            None,
        ));
        // SAFETY: aliases the live shared mapping `ram` (kept in the fixture, which owns `gm`
        // too); build_raw regions do not unmap on drop.
        let alias = unsafe {
            MmapRegion::build_raw(
                ram.as_ptr(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(SetupError::Mmap)?;
        let region = GuestRegionMmap::new(alias, GuestAddress(0)).map_err(SetupError::VmMemory)?;
        let gm = GuestMemoryMmap::from_regions(vec![region]).map_err(SetupError::VmMemory)?;

        let d = SplitDriver::new(mem.clone(), 0, QUEUE_SIZE);
        let (ty, data_flags) = match mix {
            Mix::Read | Mix::Ring => (0u32, desc_flags::WRITE), // VIRTIO_BLK_T_IN
            Mix::Write => (1u32, 0),                            // VIRTIO_BLK_T_OUT
        };
        for i in 0..burst {
            let hdr = HDR_BASE + 64 * u64::from(i);
            let data = DATA_BASE + u64::from(DATA_LEN) * u64::from(i);
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&ty.to_le_bytes());
            h[8..].copy_from_slice(&(8 * u64::from(i)).to_le_bytes());
            mem.write(hdr, &h).map_err(|_| SetupError::Burst(burst))?;
            d.write_desc(3 * i, hdr, 16, desc_flags::NEXT, 3 * i + 1);
            d.write_desc(
                3 * i + 1,
                data,
                DATA_LEN,
                desc_flags::NEXT | data_flags,
                3 * i + 2,
            );
            d.write_desc(3 * i + 2, hdr + 16, 1, desc_flags::WRITE, 0);
        }
        // Slot s always carries request s % burst: a refill is only an avail idx store.
        for s in 0..QUEUE_SIZE {
            let head = 3 * (s % burst);
            mem.write(d.avail + 4 + 2 * u64::from(s), &head.to_le_bytes())
                .map_err(|_| SetupError::Burst(burst))?;
        }
        let ring = d.config();
        let off = usize::try_from(ring.driver_addr + 2).map_err(|_| SetupError::Burst(burst))?;
        // SAFETY: `off` is inside the mapping (the ring is in its first pages) and 2-aligned.
        let avail_idx = unsafe { ram.as_ptr().add(off) } as *const AtomicU16;
        Ok(Self {
            mem,
            gm,
            ring,
            burst,
            avail_idx,
            idx: 0,
            _ram: ram,
        })
    }

    /// Driver side: make the next burst available (one release store of avail idx).
    #[inline(always)]
    pub fn refill(&mut self) {
        self.idx = self.idx.wrapping_add(self.burst);
        // SAFETY: points into the live mapping owned by `self` (see `new`).
        unsafe { &*self.avail_idx }.store(self.idx.to_le(), Ordering::Release);
    }
}
