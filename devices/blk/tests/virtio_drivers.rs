//! virtio-blk driven by an independent guest driver: the `virtio-drivers` crate (rcore-os).
//!
//! virtio-drivers reaches a PCI device's BARs through raw MMIO pointers, which cannot reach
//! registers that are trapped and emulated. So the test implements its two seams:
//! - [`Transport`] over [`InProc`]: every register access is a vfio-user region read or write,
//!   and the structure offsets come from walking the virtio capabilities in config space, as
//!   a guest driver finds them (nothing is taken from our layout constants).
//! - [`Hal`] over guest memory: DMA pages come from the test's view of guest RAM (paddr = guest
//!   address, vaddr = host pointer), and shared buffers are bounced through guest memory, so
//!   the device only ever sees guest addresses. The pools can be memfd RAM or a map reached
//!   only by DMA messages.
//!
//! On top of that, `VirtIOBlk` (one queue) and a small multi-queue driver built from
//! virtio-drivers' `VirtQueue` run requests against a raw image file and the file is checked.
//!
//! Our transport waits for a reset to complete (status reads 0) before going on, as the spec
//! requires and Linux does; virtio-drivers' own PCI transport does not, which matters here
//! because our reset completes asynchronously.

use std::cell::{RefCell, RefMut};
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::transport::inproc::IrqWaiter;
use emudev::transport::InProc;
use emudev_blk::backend::raw::{RawFile, RawFileOptions};
use emudev_blk::{BlkOptions, BlkStatsSnapshot, VirtioBlkDevice};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::PollerPool;
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use vm_memory::MmapRegion;
use zerocopy::{FromBytes, Immutable, IntoBytes};

type Dev = VirtioPciDevice<VirtioBlkDevice>;

/// Longest any test may run before the process is aborted (a lost completion would otherwise
/// spin forever inside virtio-drivers' blocking calls).
const WATCHDOG: Duration = Duration::from_secs(60);
/// How long to wait for completions and interrupts.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Byte the Hal fills device-writable bounce buffers with, so data the device claims to have
/// written but did not shows up as a mismatch.
const POISON: u8 = 0xa5;

// ---- helpers ---------------------------------------------------------------------------

/// Aborts the process if the test is still running after [`WATCHDOG`].
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn start(name: &'static str) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + WATCHDOG;
            while Instant::now() < end {
                if d.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("{name}: still running after {WATCHDOG:?}, aborting");
            std::process::abort();
        });
        Self(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A temporary image file, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn with_contents(data: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "emudev-blk-vd-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        File::create(&p).unwrap().write_all(data).unwrap();
        Self(p)
    }

    fn contents(&self) -> Vec<u8> {
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

/// A deterministic byte pattern that differs per sector and per seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(13)
                .wrapping_add(seed.wrapping_mul(71))
                .wrapping_add((i / SECTOR_SIZE) as u8)
        })
        .collect()
}

/// A blk device over a raw file of `image`, with the given options, through virtio-pci.
fn blk_device(image: &TempImage, opts: BlkOptions, pollers: usize) -> Dev {
    let raw = RawFileOptions {
        id: Some("vd-drivers-test".into()),
        ..Default::default()
    };
    let backend = Arc::new(RawFile::open(&image.0, &raw).unwrap());
    let pool = PollerPool::new(pollers).unwrap();
    let blk = VirtioBlkDevice::new(backend, opts, pool).unwrap();
    VirtioPciDevice::new("vd0", blk).unwrap()
}

fn blk_stats(io: &Rc<RefCell<InProc<Dev>>>) -> BlkStatsSnapshot {
    io.borrow().with_device(|d| d.device().stats())
}

// ---- Hal: guest memory pools -----------------------------------------------------------

/// Pages of guest memory the Hal hands out: guest address `gpa` is host address `host`.
struct Pool {
    gpa: u64,
    host: *mut u8,
    used: Vec<bool>,
    /// Keeps the host mapping alive while pointers into it are out.
    _region: Arc<MmapRegion>,
}

impl Pool {
    /// `pages` pages of `region` from byte `offset`, which the device sees at guest address
    /// `region_gpa + offset`.
    fn new(region: &Arc<MmapRegion>, region_gpa: u64, offset: usize, pages: usize) -> Self {
        assert!(offset % PAGE_SIZE == 0);
        assert!(offset + pages * PAGE_SIZE <= region.size());
        // SAFETY: `offset` is inside the mapping (checked above), which `_region` keeps alive.
        let host = unsafe { region.as_ptr().add(offset) };
        Self {
            gpa: region_gpa + offset as u64,
            host,
            used: vec![false; pages],
            _region: region.clone(),
        }
    }

    /// First fit of `pages` free pages, zeroed.
    fn alloc(&mut self, pages: usize) -> Option<(u64, *mut u8)> {
        let n = self.used.len();
        let first =
            (0..n.checked_sub(pages)? + 1).find(|&i| !self.used[i..i + pages].contains(&true))?;
        self.used[first..first + pages].fill(true);
        // SAFETY: pages `first..first+pages` are inside the pool and now reserved for the
        // caller; nothing else references them.
        let host = unsafe {
            let p = self.host.add(first * PAGE_SIZE);
            std::ptr::write_bytes(p, 0, pages * PAGE_SIZE);
            p
        };
        Some((self.gpa + (first * PAGE_SIZE) as u64, host))
    }

    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.gpa + (self.used.len() * PAGE_SIZE) as u64
    }

    /// Host address of guest address `gpa` (inside the pool).
    fn host_of(&self, gpa: u64) -> *mut u8 {
        assert!(self.contains(gpa));
        // SAFETY: `gpa` is inside the pool, so the offset is inside the mapping.
        unsafe { self.host.add((gpa - self.gpa) as usize) }
    }

    /// Free the pages covering `[gpa, gpa + len)`.
    fn free(&mut self, gpa: u64, len: usize) {
        let first = ((gpa - self.gpa) as usize) / PAGE_SIZE;
        let last = ((gpa - self.gpa) as usize + len.max(1) - 1) / PAGE_SIZE;
        for u in &mut self.used[first..=last] {
            assert!(*u, "double free of guest page at {gpa:#x}");
            *u = false;
        }
    }

    fn pages_in_use(&self) -> usize {
        self.used.iter().filter(|u| **u).count()
    }
}

/// What the Hal works over, per test thread.
struct HalState {
    /// Queue rings (`dma_alloc`).
    rings: Pool,
    /// Bounce buffers (`share`); `None`: the ring pool.
    buffers: Option<Pool>,
    /// Bytes into its first page at which each bounce buffer starts (0: page aligned).
    bounce_offset: usize,
    /// Buffers shared so far.
    shares: usize,
}

impl HalState {
    fn buffer_pool(&mut self) -> &mut Pool {
        self.buffers.as_mut().unwrap_or(&mut self.rings)
    }

    fn pool_of(&mut self, gpa: u64) -> &mut Pool {
        if self.rings.contains(gpa) {
            &mut self.rings
        } else {
            self.buffers
                .as_mut()
                .filter(|p| p.contains(gpa))
                .unwrap_or_else(|| panic!("{gpa:#x} was not handed out by the Hal"))
        }
    }
}

thread_local! {
    // virtio-drivers' Hal has no receiver, so its state is per thread (libtest runs each test
    // on its own thread, and the driver calls the Hal only from the thread that uses it).
    static HAL: RefCell<Option<HalState>> = const { RefCell::new(None) };
}

fn with_hal<R>(f: impl FnOnce(&mut HalState) -> R) -> R {
    HAL.with(|h| {
        f(h.borrow_mut()
            .as_mut()
            .expect("no GuestHal installed on this thread"))
    })
}

/// Installs a [`HalState`] for this thread; uninstalls it on drop. Declare it before the
/// driver so the driver (which frees its rings on drop) goes first.
struct HalGuard;

impl HalGuard {
    fn install(state: HalState) -> Self {
        HAL.with(|h| *h.borrow_mut() = Some(state));
        Self
    }

    /// (ring pages in use, buffer pages in use, buffers shared so far)
    fn usage(&self) -> (usize, usize, usize) {
        with_hal(|s| {
            let b = s.buffers.as_ref().map_or(0, Pool::pages_in_use);
            (s.rings.pages_in_use(), b, s.shares)
        })
    }
}

impl Drop for HalGuard {
    fn drop(&mut self) {
        HAL.with(|h| *h.borrow_mut() = None);
    }
}

/// virtio-drivers' DMA and address-translation hooks over the test's guest memory.
struct GuestHal;

// SAFETY: `dma_alloc` returns page-aligned, zeroed, exclusively reserved pages of a live
// mapping (the pool holds the mapping); `share` copies into pages reserved the same way and
// `unshare` releases them; no MMIO pointer is ever handed out.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match with_hal(|s| s.rings.alloc(pages)) {
            Some((gpa, host)) => (gpa, NonNull::new(host).expect("mapping is not null")),
            // paddr 0 is virtio-drivers' "allocation failed".
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        // The driver may be dropped after the guard in a failing test: then nothing to free.
        let _ = HAL.with(|h| {
            h.borrow_mut()
                .as_mut()
                .map(|s| s.rings.free(paddr, pages * PAGE_SIZE))
        });
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the in-process transport reaches registers by region accesses, not MMIO")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        with_hal(|s| {
            s.shares += 1;
            let off = s.bounce_offset;
            let pages = (off + len).div_ceil(PAGE_SIZE);
            let pool = s.buffer_pool();
            let (gpa, host) = pool
                .alloc(pages)
                .unwrap_or_else(|| panic!("bounce pool exhausted ({pages} pages)"));
            // SAFETY: `host + off .. + len` is inside the pages just reserved; the caller
            // guarantees `buffer` is valid for `len` bytes and not otherwise accessed now.
            unsafe {
                let dst = host.add(off);
                match direction {
                    BufferDirection::DeviceToDriver => std::ptr::write_bytes(dst, POISON, len),
                    BufferDirection::DriverToDevice | BufferDirection::Both => {
                        std::ptr::copy_nonoverlapping(buffer.as_ptr().cast::<u8>(), dst, len)
                    }
                }
            }
            gpa + off as u64
        })
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let len = buffer.len();
        with_hal(|s| {
            let pool = s.pool_of(paddr);
            if direction != BufferDirection::DriverToDevice {
                // SAFETY: `paddr` came from `share` for this buffer, so `len` bytes from its
                // host address are inside reserved pages; the caller guarantees `buffer`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        pool.host_of(paddr),
                        buffer.as_ptr().cast::<u8>(),
                        len,
                    )
                }
            }
            pool.free(paddr, len);
        });
    }
}

// ---- Transport: registers through vfio-user region accesses --------------------------

/// Virtio-pci common configuration register offsets (virtio 1.2 §4.1.4.3), from the spec.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Length of the structure up to `queue_device` (what this driver uses).
    pub const MIN_LEN: u64 = 0x38;
}

/// One virtio structure: `len` bytes at `offset` of BAR `bar`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    bar: u32,
    offset: u64,
    len: u64,
}

/// Where the virtio structures are, found from the capability list.
#[derive(Debug, Clone, Copy)]
struct VirtioCaps {
    common: Window,
    notify: Window,
    notify_off_multiplier: u32,
    isr: Window,
    device: Window,
}

const PCI_STATUS_CAP_LIST: u16 = 0x10;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

fn cfg_bytes<const N: usize>(io: &mut InProc<Dev>, off: u8) -> [u8; N] {
    let mut b = [0u8; N];
    io.config_read(u64::from(off), &mut b).unwrap();
    b
}

fn cfg_u8(io: &mut InProc<Dev>, off: u8) -> u8 {
    cfg_bytes::<1>(io, off)[0]
}

fn cfg_u16(io: &mut InProc<Dev>, off: u8) -> u16 {
    u16::from_le_bytes(cfg_bytes(io, off))
}

fn cfg_u32(io: &mut InProc<Dev>, off: u8) -> u32 {
    u32::from_le_bytes(cfg_bytes(io, off))
}

/// Walk the capability list like a guest driver: first capability of each virtio type whose
/// BAR is a valid index wins.
fn find_virtio_caps(io: &mut InProc<Dev>) -> VirtioCaps {
    assert_ne!(
        cfg_u16(io, 0x06) & PCI_STATUS_CAP_LIST,
        0,
        "capability list bit"
    );
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut mult = 0;
    let mut ptr = cfg_u8(io, 0x34) & 0xfc;
    let mut seen = 0;
    while ptr != 0 {
        seen += 1;
        assert!(seen <= 48, "capability list loops");
        let id = cfg_u8(io, ptr);
        let next = cfg_u8(io, ptr + 1) & 0xfc;
        if id == PCI_CAP_ID_VNDR && cfg_u8(io, ptr + 2) >= 16 {
            let bar = cfg_u8(io, ptr + 4);
            let w = Window {
                bar: u32::from(bar),
                offset: u64::from(cfg_u32(io, ptr + 8)),
                len: u64::from(cfg_u32(io, ptr + 12)),
            };
            if bar <= 5 {
                match cfg_u8(io, ptr + 3) {
                    VIRTIO_PCI_CAP_COMMON_CFG => {
                        common.get_or_insert(w);
                    }
                    VIRTIO_PCI_CAP_NOTIFY_CFG if notify.is_none() => {
                        notify = Some(w);
                        mult = cfg_u32(io, ptr + 16);
                    }
                    VIRTIO_PCI_CAP_ISR_CFG => {
                        isr.get_or_insert(w);
                    }
                    VIRTIO_PCI_CAP_DEVICE_CFG => {
                        device.get_or_insert(w);
                    }
                    _ => {}
                }
            }
        }
        ptr = next;
    }
    VirtioCaps {
        common: common.expect("common cfg capability"),
        notify: notify.expect("notify capability"),
        notify_off_multiplier: mult,
        isr: isr.expect("ISR capability"),
        device: device.expect("device cfg capability"),
    }
}

/// virtio-drivers' [`Transport`] over an [`InProc`] device: a modern virtio-pci driver whose
/// every register access is a region read or write.
struct InProcTransport {
    io: Rc<RefCell<InProc<Dev>>>,
    caps: VirtioCaps,
    device_type: DeviceType,
    /// Give queue `q` MSI-X vector `q + 1` (config: vector 0), as Linux does.
    msix: bool,
}

impl InProcTransport {
    fn new(io: Rc<RefCell<InProc<Dev>>>, msix: bool) -> Self {
        let (caps, device_type) = {
            let mut d = io.borrow_mut();
            assert_eq!(cfg_u16(&mut d, 0x00), 0x1af4, "virtio vendor id");
            let pci_id = cfg_u16(&mut d, 0x02);
            assert!(pci_id >= 0x1040, "modern virtio device id, got {pci_id:#x}");
            let ty = DeviceType::try_from(pci_id - 0x1040).expect("known virtio device type");
            (find_virtio_caps(&mut d), ty)
        };
        assert!(caps.common.len >= common::MIN_LEN);
        assert!(caps.isr.len >= 1);
        let t = Self {
            io,
            caps,
            device_type,
            msix,
        };
        if msix {
            t.wr(common::CONFIG_MSIX_VECTOR, &0u16.to_le_bytes());
            assert_eq!(t.rd::<2>(common::CONFIG_MSIX_VECTOR), 0u16.to_le_bytes());
        }
        t
    }

    fn io(&self) -> RefMut<'_, InProc<Dev>> {
        self.io.borrow_mut()
    }

    fn access(w: &Window, off: u64, len: usize) -> u64 {
        assert!(
            off + len as u64 <= w.len,
            "access {off:#x}+{len} outside {w:?}"
        );
        w.offset + off
    }

    fn rd_in<const N: usize>(&self, w: &Window, off: u64) -> [u8; N] {
        let mut b = [0u8; N];
        let at = Self::access(w, off, N);
        self.io().region_read(w.bar, at, &mut b).unwrap();
        b
    }

    fn wr_in(&self, w: &Window, off: u64, data: &[u8]) {
        let at = Self::access(w, off, data.len());
        self.io().region_write(w.bar, at, data).unwrap();
    }

    fn rd<const N: usize>(&self, off: u64) -> [u8; N] {
        self.rd_in(&self.caps.common, off)
    }

    fn wr(&self, off: u64, data: &[u8]) {
        self.wr_in(&self.caps.common, off, data)
    }

    fn rd16(&self, off: u64) -> u16 {
        u16::from_le_bytes(self.rd(off))
    }

    fn rd32(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.rd(off))
    }

    /// A 64-bit register as two dword writes, low first (as Linux does).
    fn wr64(&self, off: u64, v: u64) {
        self.wr(off, &(v as u32).to_le_bytes());
        self.wr(off + 4, &((v >> 32) as u32).to_le_bytes());
    }

    fn select(&self, queue: u16) {
        self.wr(common::QUEUE_SELECT, &queue.to_le_bytes());
    }

    fn num_queues(&self) -> u16 {
        self.rd16(common::NUM_QUEUES)
    }

    /// `len` bytes of device configuration at `offset`, in dword (or smaller) accesses.
    fn config_bytes(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        if offset + len > self.caps.device.len as usize {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while pos < offset + len {
            let n = match offset + len - pos {
                1 => 1,
                2 | 3 => 2,
                _ => 4,
            };
            let mut b = [0u8; 4];
            let at = Self::access(&self.caps.device, pos as u64, n);
            self.io()
                .region_read(self.caps.device.bar, at, &mut b[..n])
                .unwrap();
            out.extend_from_slice(&b[..n]);
            pos += n;
        }
        Some(out)
    }
}

impl Transport for InProcTransport {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.wr(common::DEVICE_FEATURE_SELECT, &0u32.to_le_bytes());
        let lo = self.rd32(common::DEVICE_FEATURE);
        self.wr(common::DEVICE_FEATURE_SELECT, &1u32.to_le_bytes());
        let hi = self.rd32(common::DEVICE_FEATURE);
        u64::from(hi) << 32 | u64::from(lo)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.wr(common::DRIVER_FEATURE_SELECT, &0u32.to_le_bytes());
        self.wr(
            common::DRIVER_FEATURE,
            &(driver_features as u32).to_le_bytes(),
        );
        self.wr(common::DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        self.wr(
            common::DRIVER_FEATURE,
            &((driver_features >> 32) as u32).to_le_bytes(),
        );
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.select(queue);
        u32::from(self.rd16(common::QUEUE_SIZE))
    }

    fn notify(&mut self, queue: u16) {
        self.select(queue);
        let off = u64::from(self.rd16(common::QUEUE_NOTIFY_OFF))
            * u64::from(self.caps.notify_off_multiplier);
        let notify = self.caps.notify;
        self.wr_in(&notify, off, &queue.to_le_bytes());
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(u32::from(self.rd::<1>(common::DEVICE_STATUS)[0]))
    }

    /// Writing 0 resets the device; the reset may finish asynchronously, so poll until the
    /// status reads 0 before going on (virtio 1.2 §4.1.4.3.2, Linux `vp_reset`).
    /// virtio-drivers' own PCI transport does not wait, and its `begin_init` writes
    /// ACKNOWLEDGE right after the 0.
    fn set_status(&mut self, status: DeviceStatus) {
        self.wr(common::DEVICE_STATUS, &[status.bits() as u8]);
        if status.is_empty() {
            let deadline = Instant::now() + TIMEOUT;
            while self.rd::<1>(common::DEVICE_STATUS)[0] != 0 {
                assert!(Instant::now() < deadline, "device reset never completed");
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.select(queue);
        self.wr(common::QUEUE_SIZE, &(size as u16).to_le_bytes());
        self.wr64(common::QUEUE_DESC, descriptors);
        self.wr64(common::QUEUE_DRIVER, driver_area);
        self.wr64(common::QUEUE_DEVICE, device_area);
        if self.msix {
            let v = queue + 1;
            self.wr(common::QUEUE_MSIX_VECTOR, &v.to_le_bytes());
            assert_eq!(self.rd16(common::QUEUE_MSIX_VECTOR), v, "vector accepted");
        }
        self.wr(common::QUEUE_ENABLE, &1u16.to_le_bytes());
    }

    fn queue_unset(&mut self, _queue: u16) {
        // A PCI driver cannot disable one queue (without VIRTIO_F_RING_RESET); virtio-drivers'
        // own PCI transport does nothing here either. The device reset at the end of each
        // test stops the queues.
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.select(queue);
        self.rd16(common::QUEUE_ENABLE) == 1
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let isr = self.caps.isr;
        InterruptStatus::from_bits_retain(u32::from(self.rd_in::<1>(&isr, 0)[0]))
    }

    fn read_config_generation(&self) -> u32 {
        u32::from(self.rd::<1>(common::CONFIG_GENERATION)[0])
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let b = self
            .config_bytes(offset, size_of::<T>())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        Ok(T::read_from_bytes(&b).expect("length matches"))
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        let b = value.as_bytes();
        if offset + b.len() > self.caps.device.len as usize {
            return Err(virtio_drivers::Error::ConfigSpaceTooSmall);
        }
        let device = self.caps.device;
        self.wr_in(&device, offset as u64, b);
        Ok(())
    }
}

// ---- tests ------------------------------------------------------------------------------

/// A blk device on a 1 MiB image (its initial content kept), attached in-process. Fields
/// drop in order: the device (which holds the file) before the image is removed.
struct Rig {
    io: Rc<RefCell<InProc<Dev>>>,
    /// MSI-X vectors 0 (config) and 1 + queue, or INTx alone.
    irqs: Vec<IrqWaiter>,
    image: TempImage,
    initial: Vec<u8>,
}

const IMAGE_LEN: usize = 1 << 20;

fn rig(opts: BlkOptions, pollers: usize, ram_mib: u64) -> Rig {
    rig_with(opts, pollers, ram_mib, true)
}

/// `msix`: MSI-X with one vector per queue plus config; otherwise INTx (`irqs[0]`).
fn rig_with(opts: BlkOptions, pollers: usize, ram_mib: u64, msix: bool) -> Rig {
    let initial = pattern(IMAGE_LEN, 0xee);
    let image = TempImage::with_contents(&initial);
    let vectors = u32::from(opts.num_queues) + 1;
    let mut io = InProc::new(blk_device(&image, opts, pollers), ram_mib).unwrap();
    let irqs = if msix {
        io.enable_msix(vectors).unwrap()
    } else {
        vec![io.enable_intx().unwrap()]
    };
    Rig {
        io: Rc::new(RefCell::new(io)),
        irqs,
        image,
        initial,
    }
}

/// Submit reads of `count` sectors at each of `sectors` at once, then collect them in
/// whatever order the device completes them. Returns the data per request.
fn read_many<T: Transport>(
    blk: &mut VirtIOBlk<GuestHal, T>,
    sectors: &[usize],
    count: usize,
) -> Vec<Vec<u8>> {
    let n = sectors.len();
    let mut reqs: Vec<BlkReq> = (0..n).map(|_| BlkReq::default()).collect();
    let mut resps: Vec<BlkResp> = (0..n).map(|_| BlkResp::default()).collect();
    let mut bufs = vec![vec![0u8; count * SECTOR_SIZE]; n];
    let mut tokens = Vec::new();
    for i in 0..n {
        // SAFETY: reqs/bufs/resps are not touched again until their completion below, and
        // outlive it; the vectors are not resized.
        let t =
            unsafe { blk.read_blocks_nb(sectors[i], &mut reqs[i], &mut bufs[i], &mut resps[i]) }
                .unwrap();
        tokens.push(t);
    }
    let mut left = n;
    let deadline = Instant::now() + TIMEOUT;
    while left > 0 {
        assert!(Instant::now() < deadline, "{left} reads never completed");
        let Some(tok) = blk.peek_used() else {
            std::thread::yield_now();
            continue;
        };
        let i = tokens.iter().position(|&t| t == tok).expect("known token");
        // SAFETY: the same buffers as submitted with this token.
        unsafe { blk.complete_read_blocks(tok, &reqs[i], &mut bufs[i], &mut resps[i]) }.unwrap();
        assert_eq!(resps[i].status(), RespStatus::OK);
        tokens[i] = u16::MAX;
        left -= 1;
    }
    bufs
}

#[test]
fn virtio_drivers_blk_reads_writes_and_flushes_a_raw_file() {
    let _wd = Watchdog::start("virtio_drivers_blk_reads_writes_and_flushes_a_raw_file");
    let r = rig(BlkOptions::default(), 1, 4);
    let ram = r.io.borrow().ram().clone();
    // Rings and buffers in memfd RAM, from 1 MiB up.
    let hal = HalGuard::install(HalState {
        rings: Pool::new(&ram, 0, 1 << 20, 256),
        buffers: None,
        bounce_offset: 0,
        shares: 0,
    });
    let transport = InProcTransport::new(r.io.clone(), true);
    assert_eq!(transport.device_type(), DeviceType::Block);
    let mut blk = VirtIOBlk::<GuestHal, _>::new(transport).unwrap();

    assert_eq!(blk.capacity(), (IMAGE_LEN / SECTOR_SIZE) as u64);
    assert!(!blk.readonly());
    let mut id = [0u8; 20];
    let n = blk.device_id(&mut id).unwrap();
    assert_eq!(&id[..n], b"vd-drivers-test");

    // What is on the file before any write.
    let mut buf = vec![0u8; 8 * SECTOR_SIZE];
    blk.read_blocks(3, &mut buf).unwrap();
    assert_eq!(buf, r.initial[3 * SECTOR_SIZE..11 * SECTOR_SIZE]);

    // Writes: a 16 KiB run, one sector, and the last sector of the disk.
    let last = blk.capacity() as usize - 1;
    let big = pattern(32 * SECTOR_SIZE, 1);
    let one = pattern(SECTOR_SIZE, 2);
    let tail = pattern(SECTOR_SIZE, 3);
    blk.write_blocks(64, &big).unwrap();
    blk.write_blocks(200, &one).unwrap();
    blk.write_blocks(last, &tail).unwrap();

    // Read back (also a read that crosses the edge of the 16 KiB run).
    let mut back = vec![0u8; big.len()];
    blk.read_blocks(64, &mut back).unwrap();
    assert_eq!(back, big);
    let mut edge = vec![0u8; 2 * SECTOR_SIZE];
    blk.read_blocks(95, &mut edge).unwrap();
    assert_eq!(edge[..SECTOR_SIZE], big[31 * SECTOR_SIZE..]);
    assert_eq!(
        edge[SECTOR_SIZE..],
        r.initial[96 * SECTOR_SIZE..97 * SECTOR_SIZE]
    );
    let mut s = vec![0u8; SECTOR_SIZE];
    blk.read_blocks(last, &mut s).unwrap();
    assert_eq!(s, tail);

    // Past the end: refused with IOERR, the queue keeps working.
    let mut over = vec![0u8; 2 * SECTOR_SIZE];
    assert_eq!(
        blk.read_blocks(last, &mut over),
        Err(virtio_drivers::Error::IoError)
    );
    assert_eq!(
        blk.write_blocks(last + 1, &one),
        Err(virtio_drivers::Error::IoError)
    );

    // Eight reads in flight at once (direct descriptors or indirect tables, whichever the
    // driver picks), completed in the device's order.
    let got = read_many(&mut blk, &[64, 72, 80, 88, 200, 0, 500, last], 1);
    assert_eq!(got[0], big[..SECTOR_SIZE]);
    assert_eq!(got[1], big[8 * SECTOR_SIZE..9 * SECTOR_SIZE]);
    assert_eq!(got[4], one);
    assert_eq!(got[5], r.initial[..SECTOR_SIZE]);
    assert_eq!(got[6], r.initial[500 * SECTOR_SIZE..501 * SECTOR_SIZE]);
    assert_eq!(got[7], tail);

    blk.flush().unwrap();
    let st = blk_stats(&r.io);
    assert_eq!(st.flushes, 1);
    assert_eq!(st.io_errors, 2);
    assert_eq!(st.write_bytes, (big.len() + 2 * SECTOR_SIZE) as u64);
    assert_eq!(st.bounced, 0, "memfd RAM is reached through host pointers");
    assert!(r.irqs[1].take() >= 1, "queue 0 interrupts on vector 1");
    assert_eq!(r.irqs[0].take(), 0, "no config change");

    // The file: exactly the three writes on top of the initial content.
    let mut want = r.initial.clone();
    want[64 * SECTOR_SIZE..96 * SECTOR_SIZE].copy_from_slice(&big);
    want[200 * SECTOR_SIZE..201 * SECTOR_SIZE].copy_from_slice(&one);
    want[last * SECTOR_SIZE..].copy_from_slice(&tail);
    assert!(r.image.contents() == want, "file content");

    drop(blk);
    let (rings, bufs, shares) = hal.usage();
    assert_eq!(
        (rings, bufs),
        (0, 0),
        "every DMA page and bounce buffer returned"
    );
    assert!(shares > 20);
    // Reset: status reads 0 and the queue is stopped.
    let mut t = InProcTransport::new(r.io.clone(), false);
    t.set_status(DeviceStatus::empty());
    assert_eq!(t.get_status(), DeviceStatus::empty());
    assert!(!r.io.borrow().with_device(|d| d.queue_started(0)));
}

/// Rings and data in memory the device reaches only by DMA messages (an fd-less map), with
/// bounce buffers that start at an odd offset into their page.
#[test]
fn virtio_drivers_blk_over_message_memory() {
    let _wd = Watchdog::start("virtio_drivers_blk_over_message_memory");
    let r = rig(BlkOptions::default(), 1, 1);
    let msg_gpa = 0x4000_0000;
    let msg = r.io.borrow_mut().map_message(msg_gpa, 1 << 20).unwrap();
    let _hal = HalGuard::install(HalState {
        rings: Pool::new(&msg, msg_gpa, 0, 64),
        buffers: Some(Pool::new(&msg, msg_gpa, 64 * PAGE_SIZE, 128)),
        bounce_offset: 0x1c8,
        shares: 0,
    });
    let mut blk = VirtIOBlk::<GuestHal, _>::new(InProcTransport::new(r.io.clone(), true)).unwrap();
    assert_eq!(blk.capacity(), (IMAGE_LEN / SECTOR_SIZE) as u64);

    let data = pattern(16 * SECTOR_SIZE, 9);
    blk.write_blocks(1000, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    blk.read_blocks(1000, &mut back).unwrap();
    assert_eq!(back, data);
    let mut first = vec![0u8; SECTOR_SIZE];
    blk.read_blocks(0, &mut first).unwrap();
    assert_eq!(first, r.initial[..SECTOR_SIZE]);
    blk.flush().unwrap();

    let st = blk_stats(&r.io);
    assert_eq!(st.requests, 4);
    assert!(st.bounced >= 3, "data went through DMA messages: {st:?}");
    assert_eq!(
        r.image.contents()[1000 * SECTOR_SIZE..1016 * SECTOR_SIZE],
        data[..]
    );
    drop(blk);
}

/// Without MSI-X: completions raise INTx and set ISR bit 0, which virtio-drivers'
/// `ack_interrupt` reads (and so clears) through the ISR capability.
#[test]
fn virtio_drivers_blk_intx_and_isr() {
    let _wd = Watchdog::start("virtio_drivers_blk_intx_and_isr");
    let r = rig_with(BlkOptions::default(), 1, 4, false);
    let ram = r.io.borrow().ram().clone();
    let _hal = HalGuard::install(HalState {
        rings: Pool::new(&ram, 0, 1 << 20, 256),
        buffers: None,
        bounce_offset: 0,
        shares: 0,
    });
    let mut blk = VirtIOBlk::<GuestHal, _>::new(InProcTransport::new(r.io.clone(), false)).unwrap();
    assert_eq!(
        blk.ack_interrupt().bits(),
        InterruptStatus::empty().bits(),
        "nothing pending yet"
    );
    let data = pattern(4 * SECTOR_SIZE, 0x44);
    blk.write_blocks(40, &data).unwrap();
    assert!(r.irqs[0].wait(TIMEOUT) >= 1, "INTx raised");
    assert_eq!(
        blk.ack_interrupt().bits(),
        InterruptStatus::QUEUE_INTERRUPT.bits()
    );
    assert_eq!(
        blk.ack_interrupt().bits(),
        InterruptStatus::empty().bits(),
        "read clears the ISR"
    );
    r.io.borrow_mut().unmask_intx().unwrap();

    let mut back = vec![0u8; data.len()];
    blk.read_blocks(40, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(
        r.irqs[0].wait(TIMEOUT) >= 1,
        "INTx raised again after the EOI"
    );
    assert_eq!(
        blk.ack_interrupt().bits(),
        InterruptStatus::QUEUE_INTERRUPT.bits()
    );
    drop(blk);
}

/// A second driver instance takes over after a reset: the reset (asynchronous on our side)
/// completes before status reads 0, the old rings are no longer used, and the new driver's
/// rings at other guest addresses see the data the first one wrote.
#[test]
fn virtio_drivers_blk_reinitializes_after_reset() {
    let _wd = Watchdog::start("virtio_drivers_blk_reinitializes_after_reset");
    let r = rig(BlkOptions::default(), 1, 4);
    let ram = r.io.borrow().ram().clone();
    let hal = HalGuard::install(HalState {
        rings: Pool::new(&ram, 0, 1 << 20, 256),
        buffers: None,
        bounce_offset: 0,
        shares: 0,
    });
    let mut blk = VirtIOBlk::<GuestHal, _>::new(InProcTransport::new(r.io.clone(), true)).unwrap();
    let data = pattern(8 * SECTOR_SIZE, 0x33);
    blk.write_blocks(10, &data).unwrap();

    let mut ctl = InProcTransport::new(r.io.clone(), false);
    ctl.set_status(DeviceStatus::empty());
    assert!(!r.io.borrow().with_device(|d| d.queue_started(0)));
    assert!(!ctl.queue_used(0), "queue_enable cleared by the reset");
    drop(blk);
    // Keep the old ring pages' neighbours busy so the new rings land elsewhere.
    let hole = with_hal(|s| s.rings.alloc(8)).unwrap();

    let mut blk = VirtIOBlk::<GuestHal, _>::new(InProcTransport::new(r.io.clone(), true)).unwrap();
    let mut back = vec![0u8; data.len()];
    blk.read_blocks(10, &mut back).unwrap();
    assert_eq!(back, data);
    blk.write_blocks(11, &data[..SECTOR_SIZE]).unwrap();
    blk.flush().unwrap();
    let st = blk_stats(&r.io);
    assert_eq!((st.requests, st.flushes, st.io_errors), (4, 1, 0));
    let file = r.image.contents();
    assert_eq!(
        file[10 * SECTOR_SIZE..11 * SECTOR_SIZE],
        data[..SECTOR_SIZE]
    );
    assert_eq!(
        file[11 * SECTOR_SIZE..12 * SECTOR_SIZE],
        data[..SECTOR_SIZE]
    );
    assert_eq!(
        file[12 * SECTOR_SIZE..18 * SECTOR_SIZE],
        data[2 * SECTOR_SIZE..]
    );
    drop(blk);
    with_hal(|s| s.rings.free(hole.0, 8 * PAGE_SIZE));
    assert_eq!(hal.usage().0, 0);
}

/// Raw request header (virtio 1.2 §5.2.6), built here rather than taken from either side.
fn req_header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

/// One in-flight request on a [`VirtQueue`]: its buffers stay here until popped.
struct Pending {
    queue: usize,
    token: u16,
    hdr: [u8; 16],
    data: Vec<u8>,
    write: bool,
    status: [u8; 1],
}

/// `VirtIOBlk` drives queue 0 only, so the multi-queue case is a small driver made of
/// virtio-drivers' `VirtQueue`s and the same transport: four queues with requests in flight
/// on all of them at once, on two poller threads.
#[test]
fn virtio_drivers_queues_drive_every_blk_queue_at_once() {
    let _wd = Watchdog::start("virtio_drivers_queues_drive_every_blk_queue_at_once");
    const NQ: u16 = 4;
    let opts = BlkOptions {
        num_queues: NQ,
        queue_size: 64,
        ..Default::default()
    };
    let r = rig(opts, 2, 4);
    let ram = r.io.borrow().ram().clone();
    let _hal = HalGuard::install(HalState {
        rings: Pool::new(&ram, 0, 1 << 20, 512),
        buffers: None,
        bounce_offset: 0,
        shares: 0,
    });
    let mut t = InProcTransport::new(r.io.clone(), true);

    // Initialization (virtio 1.2 §3.1.1), by hand to negotiate MQ.
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = t.read_device_features();
    for f in [F_VERSION_1, F_MQ, F_FLUSH, F_EVENT_IDX] {
        assert_ne!(offered & f, 0, "feature {f:#x} offered");
    }
    t.write_driver_features(F_VERSION_1 | F_MQ | F_FLUSH | F_EVENT_IDX);
    let st = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    t.set_status(st);
    assert_eq!(t.get_status(), st, "FEATURES_OK accepted");
    let lo: u32 = t.read_config_space(0).unwrap();
    let hi: u32 = t.read_config_space(4).unwrap();
    let capacity = u64::from(hi) << 32 | u64::from(lo);
    assert_eq!(capacity, (IMAGE_LEN / SECTOR_SIZE) as u64);
    let num_queues: u16 = t.read_config_space(34).unwrap();
    assert_eq!(num_queues, NQ);
    assert_eq!(t.num_queues(), NQ);
    let mut queues: Vec<VirtQueue<GuestHal, 16>> = (0..NQ)
        .map(|q| VirtQueue::new(&mut t, q, false, true).unwrap())
        .collect();
    t.finish_init();
    assert!(t.get_status().contains(DeviceStatus::DRIVER_OK));
    assert!(r
        .io
        .borrow()
        .with_device(|d| (0..NQ).all(|q| d.queue_started(q))));

    // Queue q writes 4 runs of 2 sectors into its own 64-sector area.
    let area = |q: usize, i: usize| 256 + q * 64 + i * 8;
    let mut pending = Vec::new();
    for q in 0..NQ as usize {
        for i in 0..4 {
            pending.push(Pending {
                queue: q,
                token: 0,
                hdr: req_header(T_OUT, area(q, i) as u64),
                data: pattern(2 * SECTOR_SIZE, (q * 4 + i) as u8),
                write: true,
                status: [0xff],
            });
        }
    }
    run_all(&mut t, &mut queues, &mut pending);
    for p in &pending {
        assert_eq!(p.status, [0], "write on queue {} ok", p.queue);
    }

    // Read each area back through a different queue than the one that wrote it.
    let mut reads = Vec::new();
    for q in 0..NQ as usize {
        for i in 0..4 {
            reads.push(Pending {
                queue: (q + 1) % NQ as usize,
                token: 0,
                hdr: req_header(T_IN, area(q, i) as u64),
                data: vec![0u8; 2 * SECTOR_SIZE],
                write: false,
                status: [0xff],
            });
        }
    }
    run_all(&mut t, &mut queues, &mut reads);
    for (w, rd) in pending.iter().zip(&reads) {
        assert_eq!(rd.status, [0]);
        assert!(rd.data == w.data, "read back via queue {}", rd.queue);
    }

    // Flush on the last queue.
    let mut flush = vec![Pending {
        queue: NQ as usize - 1,
        token: 0,
        hdr: req_header(T_FLUSH, 0),
        data: Vec::new(),
        write: true,
        status: [0xff],
    }];
    run_all(&mut t, &mut queues, &mut flush);
    assert_eq!(flush[0].status, [0]);

    // Every queue did its share, and interrupted on its own vector.
    r.io.borrow().with_device(|d| {
        for q in 0..NQ {
            let s = d.device().queue_stats(q).unwrap().snapshot();
            let want = 8 + u64::from(q == NQ - 1);
            assert_eq!(s.requests, want, "requests on queue {q}");
        }
    });
    for q in 0..NQ as usize {
        assert!(r.irqs[q + 1].take() >= 1, "interrupt on queue {q}'s vector");
    }

    let file = r.image.contents();
    let mut want = r.initial.clone();
    for p in &pending {
        let sector = u64::from_le_bytes(p.hdr[8..].try_into().unwrap()) as usize;
        want[sector * SECTOR_SIZE..(sector + 2) * SECTOR_SIZE].copy_from_slice(&p.data);
    }
    assert!(file == want, "file content");
    drop(queues);
}

/// Add every request to its queue (at most 16 descriptors per queue, direct), notify each
/// queue once, and wait until all are used.
fn run_all(t: &mut InProcTransport, queues: &mut [VirtQueue<GuestHal, 16>], reqs: &mut [Pending]) {
    for p in reqs.iter_mut() {
        let q = &mut queues[p.queue];
        // SAFETY: the buffers live in `reqs`, which is neither moved nor touched until each
        // request is popped below.
        let (hdr, status) = (&p.hdr[..], &mut p.status[..]);
        p.token = unsafe {
            match (p.write, p.data.is_empty()) {
                (true, false) => q.add(&[hdr, &p.data[..]], &mut [status]),
                (true, true) => q.add(&[hdr], &mut [status]),
                (false, _) => q.add(&[hdr], &mut [&mut p.data[..], status]),
            }
        }
        .unwrap();
    }
    for (i, q) in queues.iter().enumerate() {
        if reqs.iter().any(|p| p.queue == i) && q.should_notify() {
            t.notify(i as u16);
        }
    }
    let mut left = reqs.len();
    let deadline = Instant::now() + TIMEOUT;
    while left > 0 {
        assert!(Instant::now() < deadline, "{left} requests never completed");
        let mut progress = false;
        for (qi, q) in queues.iter_mut().enumerate() {
            while let Some(tok) = q.peek_used() {
                let p = reqs
                    .iter_mut()
                    .find(|p| p.queue == qi && p.token == tok && p.status == [0xff])
                    .expect("completion of a pending request");
                // SAFETY: the same buffers as added with this token.
                let (hdr, status) = (&p.hdr[..], &mut p.status[..]);
                let len = unsafe {
                    match (p.write, p.data.is_empty()) {
                        (true, false) => q.pop_used(tok, &[hdr, &p.data[..]], &mut [status]),
                        (true, true) => q.pop_used(tok, &[hdr], &mut [status]),
                        (false, _) => q.pop_used(tok, &[hdr], &mut [&mut p.data[..], status]),
                    }
                }
                .unwrap();
                let want = if p.write { 1 } else { p.data.len() as u32 + 1 };
                assert_eq!(len, want, "used length");
                left -= 1;
                progress = true;
            }
        }
        if !progress {
            std::thread::yield_now();
        }
    }
}
