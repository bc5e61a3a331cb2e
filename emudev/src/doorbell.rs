//! Doorbells: how a guest driver tells the device "there is work".
//!
//! Three kinds, cheapest for the guest last:
//! 1. **Trapped register writes**: a plain BAR write the device model turns into a kick in
//!    `bar_write`. Nothing to provide here; every write is a socket round-trip (or a posted
//!    message).
//! 2. **ioeventfds** ([`IoEventFdSet`]): for clients that ask for DEVICE_GET_REGION_IO_FDS
//!    the device hands out eventfds bound to BAR ranges; the client signals them instead of
//!    sending REGION_WRITE. QEMU 11.1 never asks (vfio-user.md §2.3), so devices must keep
//!    serving the trapped path too.
//! 3. **Polled doorbell pages** ([`DoorbellPage`]): a memfd-backed window of a BAR exported
//!    as a sparse mmap area. The guest's store lands in shared memory with no exit and no
//!    message; a device thread polls it. Clients that do not mmap reach the same bytes
//!    through REGION_READ/WRITE ([`DoorbellPage::read`] / [`DoorbellPage::write`]), so
//!    both paths see one state.
//!
//! [`Backoff`] is the polling helper: spin briefly, then yield, then sleep with a growing
//! interval up to a cap, so an idle poller costs little CPU.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use emudev_vfio_user::{IoEventFd, RegionMmap, SparseArea};
use nix::sys::eventfd::EfdFlags;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::pci::EventFd;

/// Page size doorbell windows are aligned to.
pub const PAGE_SIZE: u64 = 4096;

/// Why a doorbell object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DoorbellError {
    #[error("doorbell window {offset:#x}+{size:#x} is not page aligned or is empty")]
    Alignment { offset: u64, size: u64 },
    #[error("doorbell {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ioeventfd range {offset:#x}+{size:#x} is invalid (size 1/2/4/8, no overlap)")]
    BadRange { offset: u64, size: u64 },
}

/// A polled doorbell window: `size` bytes at `region_offset` inside a BAR, backed by a
/// memfd the client can mmap and that this process maps shared.
///
/// The memfd spans `[0, region_offset + size)` of the BAR (the part before the window is a
/// hole that is never mapped or touched, so it costs nothing), which lets the region's mmap
/// offset be 0 and the sparse area sit at its real BAR offset.
#[derive(Debug)]
pub struct DoorbellPage {
    fd: Arc<OwnedFd>,
    map: MmapRegion,
    region_offset: u64,
    size: u64,
}

impl DoorbellPage {
    /// Create a zeroed window of `size` bytes at BAR offset `region_offset` (both multiples
    /// of [`PAGE_SIZE`], size > 0).
    pub fn new(name: &str, region_offset: u64, size: u64) -> Result<Self, DoorbellError> {
        let misaligned = size == 0 || size % PAGE_SIZE != 0 || region_offset % PAGE_SIZE != 0;
        let total = region_offset.checked_add(size);
        let (Some(total), false) = (total, misaligned) else {
            return Err(DoorbellError::Alignment {
                offset: region_offset,
                size,
            });
        };
        let map_len = usize::try_from(size).map_err(|_| DoorbellError::Alignment {
            offset: region_offset,
            size,
        })?;
        let io_err = |what| move |e: io::Error| DoorbellError::Io { what, source: e };
        let cname = CString::new(format!("emudev-doorbell-{name}"))
            .map_err(|e| io_err("name")(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let fd = memfd_create(&cname, MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| io_err("memfd_create")(e.into()))?;
        let file = File::from(fd);
        file.set_len(total).map_err(io_err("ftruncate"))?;
        let keep: OwnedFd = file.try_clone().map_err(io_err("dup"))?.into();
        let map = MmapRegion::from_file(FileOffset::new(file, region_offset), map_len)
            .map_err(|e| io_err("mmap")(io::Error::other(e.to_string())))?;
        Ok(Self {
            fd: Arc::new(keep),
            map,
            region_offset,
            size,
        })
    }

    /// What to report in the region info: one sparse area covering the window.
    pub fn region_mmap(&self) -> RegionMmap {
        RegionMmap {
            fd: self.fd.clone(),
            file_offset: 0,
            areas: vec![SparseArea {
                offset: self.region_offset,
                size: self.size,
            }],
        }
    }

    /// BAR offset of the window.
    pub fn region_offset(&self) -> u64 {
        self.region_offset
    }

    /// Window size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The window offset of a BAR access `[offset, offset+len)` that lies entirely inside the
    /// window, `None` otherwise.
    pub fn window_offset(&self, offset: u64, len: usize) -> Option<usize> {
        let rel = offset.checked_sub(self.region_offset)?;
        let end = rel.checked_add(len as u64)?;
        if end > self.size {
            return None;
        }
        usize::try_from(rel).ok()
    }

    /// REGION_READ of the window: `offset` is relative to the BAR. Out-of-window bytes read
    /// as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        match self
            .window_offset(offset, data.len())
            .and_then(|o| self.map.get_slice(o, data.len()).ok())
        {
            Some(s) => {
                s.copy_to(data);
            }
            None => data.fill(0),
        }
    }

    /// REGION_WRITE of the window: `offset` is relative to the BAR. Out-of-window writes are
    /// dropped. Returns whether the write landed.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        match self
            .window_offset(offset, data.len())
            .and_then(|o| self.map.get_slice(o, data.len()).ok())
        {
            Some(s) => {
                s.copy_from(data);
                true
            }
            None => false,
        }
    }

    /// The 32-bit slot at window offset `off` (4-aligned, inside the window), for polling.
    pub fn slot(&self, off: usize) -> Option<&AtomicU32> {
        if off % 4 != 0 {
            return None;
        }
        self.map.get_atomic_ref::<AtomicU32>(off).ok()
    }

    /// Load a slot with acquire ordering; 0 for a bad offset.
    pub fn load(&self, off: usize) -> u32 {
        self.slot(off).map_or(0, |s| s.load(Ordering::Acquire))
    }

    /// Store a slot with release ordering; ignored for a bad offset.
    pub fn store(&self, off: usize, v: u32) {
        if let Some(s) = self.slot(off) {
            s.store(v, Ordering::Release);
        }
    }
}

/// Polling backoff: spin, then yield, then sleep from `min_sleep` doubling up to `max_sleep`.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: u32,
    spins: u32,
    yields: u32,
    sleep: Duration,
    min_sleep: Duration,
    max_sleep: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(64, 16, Duration::from_micros(20), Duration::from_millis(1))
    }
}

impl Backoff {
    pub fn new(spins: u32, yields: u32, min_sleep: Duration, max_sleep: Duration) -> Self {
        Self {
            step: 0,
            spins,
            yields,
            sleep: min_sleep,
            min_sleep,
            max_sleep: max_sleep.max(min_sleep),
        }
    }

    /// Work was found: poll hot again.
    pub fn reset(&mut self) {
        self.step = 0;
        self.sleep = self.min_sleep;
    }

    /// Nothing was found: wait a little, longer each time.
    pub fn idle(&mut self) {
        if self.step < self.spins {
            std::hint::spin_loop();
        } else if self.step < self.spins.saturating_add(self.yields) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(self.max_sleep);
        }
        self.step = self.step.saturating_add(1);
    }

    /// True once the backoff has reached the sleeping phase (the poller is idle).
    pub fn is_sleeping(&self) -> bool {
        self.step > self.spins.saturating_add(self.yields)
    }
}

/// One ioeventfd bound to a BAR range.
#[derive(Debug)]
struct IoEventEntry {
    offset: u64,
    size: u64,
    datamatch: Option<u64>,
    fd: Arc<OwnedFd>,
    event: Arc<EventFd>,
}

/// The ioeventfds of one BAR, for DEVICE_GET_REGION_IO_FDS.
///
/// The device keeps the [`EventFd`]s to wait on (or polls them); the client gets duplicates
/// of the same eventfds and signals them instead of sending REGION_WRITE. A trapped write to
/// the same range should call [`IoEventFdSet::trapped_write`], so both paths kick alike.
#[derive(Debug, Default)]
pub struct IoEventFdSet {
    entries: Vec<IoEventEntry>,
}

impl IoEventFdSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bind a new eventfd to `[offset, offset+size)`; `size` is 1, 2, 4 or 8 and ranges do
    /// not overlap. Returns the eventfd the device waits on.
    pub fn add(
        &mut self,
        offset: u64,
        size: u64,
        datamatch: Option<u64>,
    ) -> Result<Arc<EventFd>, DoorbellError> {
        let bad = DoorbellError::BadRange { offset, size };
        let end = offset
            .checked_add(size)
            .ok_or_else(|| bad_range(offset, size))?;
        if !matches!(size, 1 | 2 | 4 | 8)
            || self
                .entries
                .iter()
                .any(|e| e.offset < end && offset < e.offset + e.size)
        {
            return Err(bad);
        }
        let io_err = |what| move |e: io::Error| DoorbellError::Io { what, source: e };
        let event = Arc::new(new_eventfd().map_err(io_err("eventfd"))?);
        let fd = event
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_err("dup eventfd"))?;
        self.entries.push(IoEventEntry {
            offset,
            size,
            datamatch,
            fd: Arc::new(fd),
            event: event.clone(),
        });
        Ok(event)
    }

    /// The wire description for DEVICE_GET_REGION_IO_FDS.
    pub fn to_io_fds(&self) -> Vec<IoEventFd> {
        self.entries
            .iter()
            .map(|e| IoEventFd {
                offset: e.offset,
                size: e.size,
                fd: e.fd.clone(),
                datamatch: e.datamatch,
            })
            .collect()
    }

    /// A trapped REGION_WRITE: signal the eventfd it would have hit, if any (exact range and,
    /// with datamatch, the same value). Returns whether one was signalled.
    pub fn trapped_write(&self, offset: u64, data: &[u8]) -> bool {
        let Some(e) = self
            .entries
            .iter()
            .find(|e| e.offset == offset && e.size == data.len() as u64)
        else {
            return false;
        };
        if let Some(m) = e.datamatch {
            let mut v = [0u8; 8];
            v[..data.len()].copy_from_slice(data);
            if u64::from_le_bytes(v) != m {
                return false;
            }
        }
        e.event.signal().is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn bad_range(offset: u64, size: u64) -> DoorbellError {
    DoorbellError::BadRange { offset, size }
}

/// A new non-blocking, close-on-exec eventfd with counter 0.
pub fn new_eventfd() -> io::Result<EventFd> {
    let efd = nix::sys::eventfd::EventFd::from_value_and_flags(
        0,
        EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
    )?;
    Ok(EventFd::new(OwnedFd::from(efd)))
}

/// Read and reset an eventfd counter; 0 when it was not signalled (non-blocking fd).
pub fn drain_eventfd(fd: impl AsFd) -> io::Result<u64> {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd.as_fd().as_raw_fd(), &mut b) {
        Ok(8) => Ok(u64::from_ne_bytes(b)),
        Ok(n) => Err(io::Error::other(format!("short eventfd read of {n} bytes"))),
        Err(nix::errno::Errno::EAGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Wait up to `timeout` for an eventfd to be signalled; returns its counter (0 on timeout).
pub fn wait_eventfd(fd: impl AsFd, timeout: Duration) -> io::Result<u64> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let n = drain_eventfd(fd.as_fd())?;
        if n > 0 {
            return Ok(n);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(0);
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_is_shared_between_mmap_and_region_access() {
        let page = DoorbellPage::new("t", 0x1000, 0x1000).unwrap();
        let m = page.region_mmap();
        assert_eq!(m.file_offset, 0);
        assert_eq!(
            m.areas,
            vec![SparseArea {
                offset: 0x1000,
                size: 0x1000
            }]
        );
        // A client mmap of the sparse area (what QEMU does) sees the same bytes.
        let file = File::from(m.fd.as_fd().try_clone_to_owned().unwrap());
        let client = MmapRegion::<()>::from_file(FileOffset::new(file, 0x1000), 0x1000).unwrap();
        client
            .get_slice(8, 4)
            .unwrap()
            .copy_from(&0xdead_beefu32.to_le_bytes());
        assert_eq!(page.load(8), 0xdead_beef);
        let mut b = [0u8; 4];
        page.read(0x1008, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert!(page.write(0x1010, &7u32.to_le_bytes()));
        let mut c = [0u8; 4];
        client.get_slice(0x10, 4).unwrap().copy_to(&mut c);
        assert_eq!(u32::from_le_bytes(c), 7);
    }

    #[test]
    fn page_refuses_bad_windows_and_out_of_range_access() {
        assert!(DoorbellPage::new("t", 0x10, 0x1000).is_err());
        assert!(DoorbellPage::new("t", 0, 0).is_err());
        assert!(DoorbellPage::new("t", u64::MAX - 0xfff, 0x1000).is_err());
        let page = DoorbellPage::new("t", 0, 0x1000).unwrap();
        assert!(!page.write(0xffe, &[1, 2, 3, 4]));
        assert!(!page.write(u64::MAX, &[1]));
        let mut b = [0xffu8; 4];
        page.read(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(page.slot(2).is_none());
        assert!(page.slot(0x1000).is_none());
    }

    #[test]
    fn ioeventfds_bind_ranges_and_trapped_writes_signal_them() {
        let mut set = IoEventFdSet::new();
        let a = set.add(0x100, 4, None).unwrap();
        let b = set.add(0x104, 2, Some(5)).unwrap();
        assert!(set.add(0x102, 4, None).is_err(), "overlap");
        assert!(set.add(0x200, 3, None).is_err(), "size");
        assert!(set.add(u64::MAX, 8, None).is_err(), "overflow");
        let fds = set.to_io_fds();
        assert_eq!(fds.len(), 2);
        assert_eq!(fds[1].datamatch, Some(5));
        // The client's copy and the device's eventfd are the same object.
        nix::unistd::write(fds[0].fd.as_fd(), &1u64.to_ne_bytes()).unwrap();
        assert_eq!(drain_eventfd(&*a).unwrap(), 1);
        assert!(set.trapped_write(0x100, &[9, 0, 0, 0]));
        assert_eq!(wait_eventfd(&*a, Duration::from_secs(1)).unwrap(), 1);
        assert_eq!(drain_eventfd(&*a).unwrap(), 0);
        assert!(!set.trapped_write(0x104, &[4, 0]), "datamatch miss");
        assert!(set.trapped_write(0x104, &[5, 0]));
        assert_eq!(drain_eventfd(&*b).unwrap(), 1);
        assert!(!set.trapped_write(0x300, &[0]));
    }

    #[test]
    fn backoff_reaches_sleep_and_resets() {
        let mut b = Backoff::new(2, 1, Duration::from_micros(1), Duration::from_micros(4));
        for _ in 0..4 {
            b.idle();
        }
        assert!(b.is_sleeping());
        b.reset();
        assert!(!b.is_sleeping());
    }
}
