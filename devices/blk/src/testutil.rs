//! Test helpers: guest memory built the way the device layer builds it, and temp images.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use emudev::GuestMemory;
use emudev_vfio_user::wire::dma_flags;
use emudev_vfio_user::{DmaError, DmaPort, DmaRegion, DmaTransport};
use vm_memory::MmapRegion;

const RW: u32 = dma_flags::READ | dma_flags::WRITE;

/// Guest RAM at guest address 0.
pub struct GuestRam {
    pub mem: GuestMemory,
}

/// Client memory reached only through DMA messages.
struct MsgRam {
    bytes: Mutex<Vec<u8>>,
    base: u64,
}

impl DmaTransport for MsgRam {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let m = self.bytes.lock().map_err(|_| DmaError::Disconnected)?;
        let o = (addr - self.base) as usize;
        buf.copy_from_slice(&m[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut m = self.bytes.lock().map_err(|_| DmaError::Disconnected)?;
        let o = (addr - self.base) as usize;
        m[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

impl GuestRam {
    /// One fd-style (mmapped) read-write region of `size` bytes at 0.
    pub fn new(size: usize) -> Self {
        let m = Arc::new(MmapRegion::new(size).unwrap());
        let table = [DmaRegion {
            iova: 0,
            size: size as u64,
            prot: RW,
            mapping: Some(m),
            map_offset: 0,
        }];
        Self {
            mem: GuestMemory::from_dma(&table, None),
        }
    }

    /// Mapped RAM `[0, size)`, message-backed RAM `[size, 2*size)`, and a read-only mapped
    /// page at `[2*size, 2*size + 4096)`.
    pub fn mixed(size: usize) -> Self {
        let a = Arc::new(MmapRegion::new(size).unwrap());
        let ro = Arc::new(MmapRegion::new(4096).unwrap());
        let port = Arc::new(MsgRam {
            bytes: Mutex::new(vec![0; size]),
            base: size as u64,
        });
        let table = [
            DmaRegion {
                iova: 0,
                size: size as u64,
                prot: RW,
                mapping: Some(a),
                map_offset: 0,
            },
            DmaRegion {
                iova: size as u64,
                size: size as u64,
                prot: RW,
                mapping: None,
                map_offset: 0,
            },
            DmaRegion {
                iova: 2 * size as u64,
                size: 4096,
                prot: dma_flags::READ,
                mapping: Some(ro),
                map_offset: 0,
            },
        ];
        Self {
            mem: GuestMemory::from_dma(&table, Some(DmaPort::new(port))),
        }
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(addr, &mut v).unwrap();
        v
    }
}

/// A temporary image file removed on drop (under the system temp dir, which may be a real
/// filesystem or a tmpfs).
pub struct TempImage(pub PathBuf);

impl TempImage {
    pub fn new(len: u64) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "emudev-blk-t{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        Self(p)
    }

    pub fn contents(&self) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(&self.0).unwrap().read_to_end(&mut v).unwrap();
        v
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                .wrapping_add((i >> 8) as u8)
        })
        .collect()
}
