//! The client demo: drive devices served over vfio-user the way a guest driver would, from
//! an ordinary process with our [`Client`]: guest RAM is a memfd shared with the server by
//! DMA_MAP, registers are REGION_READ/WRITE, interrupts are MSI-X eventfds from SET_IRQS.
//!
//! - [`blk`]: a small virtio-pci driver for virtio-blk: writes a pattern, reads it back.
//! - [`testdev`]: the test device's DMA engine (FILL, CHECKSUM) and an MSI-X interrupt.
//! - [`net`]: two virtio-net NICs on one switch exchange frames (driver in `virtio.rs`).
//!
//! Used by the `demo-client` binary and by emudevd's integration tests.

pub mod blk;
pub mod net;
mod pci;
pub mod testdev;
mod virtio;

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use emudev::doorbell::wait_eventfd;
use emudev::pci::EventFd;
use emudev_vfio_user::wire::dma_flags;
use emudev_vfio_user::{Client, ClientError};
use vm_memory::{FileOffset, MmapRegion};

/// Why the demo failed. Every variant says which step.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{step}: {source}")]
    Client {
        step: &'static str,
        source: ClientError,
    },
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Memory {
        step: &'static str,
        source: vm_memory::VolatileMemoryError,
    },
    #[error("device: {0}")]
    Device(String),
    #[error("data mismatch: {0}")]
    Mismatch(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

pub(crate) trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, DemoError>;
}

impl<T> Step<T> for Result<T, ClientError> {
    fn step(self, step: &'static str) -> Result<T, DemoError> {
        self.map_err(|source| DemoError::Client { step, source })
    }
}

impl<T> Step<T> for std::io::Result<T> {
    fn step(self, step: &'static str) -> Result<T, DemoError> {
        self.map_err(|source| DemoError::Io { step, source })
    }
}

impl<T> Step<T> for Result<T, vm_memory::VolatileMemoryError> {
    fn step(self, step: &'static str) -> Result<T, DemoError> {
        self.map_err(|source| DemoError::Memory { step, source })
    }
}

/// Guest RAM: a memfd mapped here and, by DMA_MAP with its fd, in the server.
pub(crate) struct SharedRam {
    fd: OwnedFd,
    pub map: MmapRegion,
}

impl SharedRam {
    pub fn new(size: usize) -> Result<Self, DemoError> {
        let fd = emudev::transport::inproc::memfd("demo-ram", size as u64).step("memfd")?;
        let file = std::fs::File::from(fd.try_clone().step("memfd dup")?);
        let map =
            MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(|e| DemoError::Io {
                step: "mmap guest RAM",
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(Self { fd, map })
    }

    /// Map all of it at IOVA 0, read-write.
    pub fn dma_map(&self, c: &mut Client) -> Result<(), DemoError> {
        c.dma_map(
            0,
            self.map.size() as u64,
            dma_flags::READ | dma_flags::WRITE,
            Some((self.fd.as_fd(), 0)),
        )
        .step("DMA_MAP")
    }
}

/// Wait for an interrupt on `ev` (true) or give up after `timeout` (false).
pub(crate) fn wait_irq(ev: &EventFd, timeout: Duration) -> Result<bool, DemoError> {
    Ok(wait_eventfd(ev.as_fd(), timeout).step("wait for interrupt")? > 0)
}

pub(crate) fn rd32(c: &mut Client, region: u32, off: u64) -> Result<u32, DemoError> {
    let v = c.region_read(region, off, 4).step("REGION_READ")?;
    let b: [u8; 4] = v
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or(DemoError::Device("short REGION_READ".into()))?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn wr32(c: &mut Client, region: u32, off: u64, v: u32) -> Result<(), DemoError> {
    c.region_write(region, off, &v.to_le_bytes())
        .step("REGION_WRITE")
}

/// The demo's data pattern: every byte depends on the seed, the sector and its offset, so
/// misplaced, stale or zeroed sectors are caught.
pub fn pattern(seed: u64, first_sector: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let sector = first_sector + (i as u64 * 8) / 512;
        let word = (i as u64 * 8) % 512 / 8;
        let mut z = seed ^ (sector << 6 | word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let b = z.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A one-line progress bar, redrawn in place on a terminal and printed once otherwise.
pub(crate) struct Progress {
    label: &'static str,
    total: u64,
    shown: u64,
    tty: bool,
    enabled: bool,
}

impl Progress {
    pub fn new(label: &'static str, total: u64, enabled: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            label,
            total: total.max(1),
            shown: u64::MAX,
            tty: std::io::stdout().is_terminal(),
            enabled,
        }
    }

    pub fn update(&mut self, done: u64) {
        if !self.enabled {
            return;
        }
        let pct = done.min(self.total) * 100 / self.total;
        if pct == self.shown || (!self.tty && pct != 100) {
            return;
        }
        self.shown = pct;
        let filled = (pct / 4) as usize;
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(25 - filled));
        if self.tty {
            print!("\r  {:<6} [{bar}] {pct:>3}%", self.label);
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else {
            print!("  {:<6} [{bar}] {pct:>3}%", self.label);
        }
    }

    pub fn finish(&mut self, suffix: &str) {
        self.update(self.total);
        if self.enabled {
            println!("  {suffix}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn pattern_depends_on_sector_offset_and_seed() {
        let mut a = vec![0u8; 1024];
        pattern(1, 10, &mut a);
        let mut b = vec![0u8; 512];
        pattern(1, 11, &mut b);
        assert_eq!(
            &a[512..],
            &b[..],
            "same sector, same bytes whatever the request"
        );
        assert_ne!(&a[..512], &b[..]);
        let mut c = vec![0u8; 512];
        pattern(2, 11, &mut c);
        assert_ne!(b, c);
        assert_ne!(&a[..8], &a[8..16]);
    }
}
