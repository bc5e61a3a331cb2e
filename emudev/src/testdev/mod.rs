//! The test device: a small PCI function that exercises every part of the device layer.
//!
//! Identity: vendor 0xe0de, device 0xe0de, class 0xff0000 (see [`regs`]; QEMU's pci-testdev
//! ids 0x1b36/0x0005 are taken, and an unassigned class keeps guest drivers away).
//!
//! - BAR0 (4 KiB): registers ([`regs`] has the map): magic, scratch, a trapped doorbell
//!   (also reachable as an ioeventfd through DEVICE_GET_REGION_IO_FDS), an IRQ trigger and
//!   a DMA engine (fill / checksum / copy guest memory, optionally repeated) that runs on a
//!   worker thread and raises a vector on completion.
//! - BAR2 (4 KiB): a polled doorbell page, exported as a sparse mmap area and polled by a
//!   thread that counts and acknowledges doorbells.
//! - BAR4 (4 KiB): MSI-X table (4 vectors) and PBA.
//! - Capabilities: power management, a vendor capability ("EMUDEV" tag), MSI-X. INTx pin A.

pub mod engine;
pub mod regs;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use emudev_vfio_user::{IoEventFd, RegionMmap};

use crate::device::{DeviceError, DeviceModel};
use crate::doorbell::{DoorbellPage, IoEventFdSet};
use crate::memory::GuestMemory;
use crate::pci::{
    BarDef, Capability, IntxLine, Msix, MsixLayout, PciDevice, PciDeviceBuilder, PciError, PciIds,
};

use engine::{DmaEngine, DmaJob, DoorbellPoller, SharedRegs};

/// Errors building the test device.
#[derive(Debug, thiserror::Error)]
pub enum TestDevError {
    #[error("PCI model: {0}")]
    Pci(#[from] PciError),
    #[error("doorbell: {0}")]
    Doorbell(#[from] crate::doorbell::DoorbellError),
    #[error("worker thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("vendor capability: {0}")]
    Cap(String),
}

/// DMA registers the driver programs before writing DMA_CMD.
#[derive(Debug, Default, Clone, Copy)]
struct DmaRegs {
    dst: u64,
    src: u64,
    len: u32,
    pattern: u32,
    repeat: u32,
    vector: u32,
}

/// The test device. See the module doc and [`regs`].
pub struct TestDevice {
    name: String,
    pci: PciDevice,
    shared: Arc<SharedRegs>,
    scratch: u32,
    dma: DmaRegs,
    engine: DmaEngine,
    page: Arc<DoorbellPage>,
    ioevents: IoEventFdSet,
    intx: Arc<IntxLine>,
    mmap_page: bool,
    // Dropped last: stops the poller thread.
    _poller: DoorbellPoller,
}

impl std::fmt::Debug for TestDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Raise `vector`: MSI-X when enabled or when the client gave the vector an eventfd,
/// otherwise INTx (level stays high until IRQ_STATUS is cleared).
fn raise(msix: &Msix, intx: &IntxLine, shared: &SharedRegs, vector: u32) {
    shared.irq_count.fetch_add(1, Ordering::AcqRel);
    let use_msix = msix.control().0 || msix.has_vector_fd(vector).unwrap_or(false);
    if use_msix {
        let r = u16::try_from(vector)
            .map_err(|_| "vector out of range".to_string())
            .and_then(|v| msix.trigger(v).map_err(|e| e.to_string()));
        if let Err(e) = r {
            log::debug!("testdev: MSI-X vector {vector}: {e}");
        }
    } else if let Err(e) = intx.assert() {
        log::debug!("testdev: INTx: {e}");
    }
}

impl TestDevice {
    pub fn new(name: &str) -> Result<Self, TestDevError> {
        let ids = PciIds {
            vendor_id: regs::VENDOR_ID,
            device_id: regs::DEVICE_ID,
            revision_id: 1,
            class_code: regs::CLASS_CODE,
            subsystem_vendor_id: regs::VENDOR_ID,
            subsystem_id: regs::DEVICE_ID,
        };
        let vendor =
            Capability::vendor(b"EMUDEV\0\0\0").map_err(|e| TestDevError::Cap(e.to_string()))?;
        let pci = PciDeviceBuilder::new(ids)
            .interrupt_pin(1)
            .bar(usize::from(regs::REGS_BAR), BarDef::mem32(regs::BAR_SIZE))
            .bar(usize::from(regs::PAGE_BAR), BarDef::mem32(regs::BAR_SIZE))
            .bar(usize::from(regs::MSIX_BAR), BarDef::mem32(regs::BAR_SIZE))
            .capability(Capability::power_management())
            .capability(vendor)
            .msix(MsixLayout {
                vectors: regs::MSIX_VECTORS,
                table_bar: regs::MSIX_BAR,
                table_offset: regs::MSIX_TABLE_OFFSET,
                pba_bar: regs::MSIX_BAR,
                pba_offset: regs::MSIX_PBA_OFFSET,
            })
            .build()?;
        let msix = pci
            .msix()
            .cloned()
            .ok_or(TestDevError::Pci(PciError::MsixOverlap))?;
        let intx = pci.intx().clone();
        let shared = Arc::new(SharedRegs::default());
        let raise_irq: engine::RaiseIrq = {
            let (msix, intx, shared) = (msix.clone(), intx.clone(), shared.clone());
            Arc::new(move |v| raise(&msix, &intx, &shared, v))
        };
        let engine = DmaEngine::new(name, shared.clone(), raise_irq)?;
        let page = Arc::new(DoorbellPage::new(name, 0, regs::BAR_SIZE)?);
        let mut ioevents = IoEventFdSet::new();
        let doorbell_ev = ioevents.add(regs::DOORBELL, 4, None)?;
        let poller = DoorbellPoller::spawn(name, page.clone(), Some(doorbell_ev), shared.clone())?;
        Ok(Self {
            name: name.to_string(),
            pci,
            shared,
            scratch: 0,
            dma: DmaRegs {
                vector: u32::MAX,
                ..DmaRegs::default()
            },
            engine,
            page,
            ioevents,
            intx,
            mmap_page: true,
            _poller: poller,
        })
    }

    /// Whether BAR2 is offered for mmap (default on). QEMU turns off posted writes for a
    /// device with any mappable region (vfio-user.md §2.2), so a device without one shows
    /// the posted-write path; the page is then reached by REGION_READ/WRITE only.
    pub fn with_mmap_page(mut self, on: bool) -> Self {
        self.mmap_page = on;
        self
    }

    fn reg_read(&self, off: u64) -> u32 {
        let s = &self.shared;
        let ld = |a: &std::sync::atomic::AtomicU32| a.load(Ordering::Acquire);
        match off {
            regs::ID => regs::MAGIC,
            regs::VERSION_REG => regs::VERSION,
            regs::SCRATCH => self.scratch,
            regs::DOORBELL_COUNT => ld(&s.doorbell_count),
            regs::DOORBELL_LAST => ld(&s.doorbell_last),
            regs::IRQ_STATUS => u32::from(self.intx.level()) * regs::IRQ_STATUS_INTX,
            regs::DMA_DST => self.dma.dst as u32,
            o if o == regs::DMA_DST + 4 => (self.dma.dst >> 32) as u32,
            regs::DMA_SRC => self.dma.src as u32,
            o if o == regs::DMA_SRC + 4 => (self.dma.src >> 32) as u32,
            regs::DMA_LEN => self.dma.len,
            regs::DMA_PATTERN => self.dma.pattern,
            regs::DMA_REPEAT => self.dma.repeat,
            regs::DMA_VECTOR => self.dma.vector,
            regs::DMA_STATUS => ld(&s.dma_status),
            regs::DMA_RESULT => ld(&s.dma_result),
            regs::DMA_PASSES => ld(&s.dma_passes),
            regs::DMA_ERRORS => ld(&s.dma_errors),
            regs::PAGE_COUNT => ld(&s.page_count),
            regs::PAGE_LAST => ld(&s.page_last),
            regs::IRQ_COUNT => ld(&s.irq_count),
            _ => 0,
        }
    }

    fn reg_write(&mut self, off: u64, v: u32) {
        let lo = |x: u64| (x & !0xffff_ffff) | u64::from(v);
        let hi = |x: u64| (x & 0xffff_ffff) | (u64::from(v) << 32);
        match off {
            regs::SCRATCH => self.scratch = v,
            regs::DOORBELL => {
                self.shared.doorbell_last.store(v, Ordering::Release);
                self.shared.doorbell_count.fetch_add(1, Ordering::AcqRel);
            }
            regs::IRQ_RAISE => {
                if let Some(m) = self.pci.msix() {
                    raise(m, &self.intx, &self.shared, v);
                }
            }
            regs::IRQ_STATUS if v & regs::IRQ_STATUS_INTX != 0 => self.intx.deassert(),
            regs::DMA_DST => self.dma.dst = lo(self.dma.dst),
            o if o == regs::DMA_DST + 4 => self.dma.dst = hi(self.dma.dst),
            regs::DMA_SRC => self.dma.src = lo(self.dma.src),
            o if o == regs::DMA_SRC + 4 => self.dma.src = hi(self.dma.src),
            regs::DMA_LEN => self.dma.len = v,
            regs::DMA_PATTERN => self.dma.pattern = v,
            regs::DMA_REPEAT => self.dma.repeat = v,
            regs::DMA_VECTOR => self.dma.vector = v,
            regs::DMA_CMD => match v {
                regs::DMA_CMD_FILL | regs::DMA_CMD_CHECKSUM | regs::DMA_CMD_COPY => {
                    let job = DmaJob {
                        cmd: v,
                        dst: self.dma.dst,
                        src: self.dma.src,
                        len: self.dma.len,
                        pattern: self.dma.pattern,
                        repeat: self.dma.repeat,
                        vector: self.dma.vector,
                    };
                    self.engine.start(job, &self.shared);
                }
                regs::DMA_CMD_STOP => {
                    if !self.engine.cancel(&self.shared) {
                        log::warn!("{}: DMA stop timed out", self.name);
                    }
                }
                _ => log::debug!("{}: unknown DMA command {v:#x}", self.name),
            },
            _ => {}
        }
    }

    /// The polled doorbell page (tests poke it directly like an mmapping client).
    pub fn doorbell_page(&self) -> &Arc<DoorbellPage> {
        &self.page
    }

    /// True when the DMA engine has no job.
    pub fn dma_idle(&self) -> bool {
        self.engine.is_idle()
    }
}

impl DeviceModel for TestDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn pci(&mut self) -> &mut PciDevice {
        &mut self.pci
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            regs::REGS_BAR => {
                // Any size: bytes come from the covering 32-bit registers.
                for (i, b) in data.iter_mut().enumerate() {
                    let Some(a) = offset.checked_add(i as u64) else {
                        *b = 0;
                        continue;
                    };
                    let v = self.reg_read(a & !3);
                    *b = v.to_le_bytes()[(a & 3) as usize];
                }
            }
            regs::PAGE_BAR => self.page.read(offset, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            regs::REGS_BAR => {
                // Aligned 4- and 8-byte writes; an 8-byte write is two register writes.
                if offset % 4 != 0 || !matches!(data.len(), 4 | 8) {
                    log::debug!(
                        "{}: dropped {}-byte write at {offset:#x}",
                        self.name,
                        data.len()
                    );
                    return;
                }
                for (i, c) in data.chunks_exact(4).enumerate() {
                    let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    self.reg_write(offset + 4 * i as u64, v);
                }
            }
            regs::PAGE_BAR => {
                self.page.write(offset, data);
            }
            _ => {}
        }
    }

    fn bar_mmap(&self, bar: u8) -> Option<RegionMmap> {
        (self.mmap_page && bar == regs::PAGE_BAR).then(|| self.page.region_mmap())
    }

    fn ioeventfds(&mut self, bar: u8) -> Vec<IoEventFd> {
        if bar == regs::REGS_BAR {
            self.ioevents.to_io_fds()
        } else {
            Vec::new()
        }
    }

    fn set_memory(&mut self, mem: Arc<GuestMemory>) {
        self.engine.set_memory(mem);
    }

    fn quiesce(&mut self) -> Result<(), DeviceError> {
        if self.engine.quiesce() {
            Ok(())
        } else {
            Err(DeviceError::QuiesceTimeout {
                device: self.name.clone(),
                millis: engine::QUIESCE_TIMEOUT.as_millis() as u64,
            })
        }
    }

    fn resume(&mut self) {
        self.engine.resume();
    }

    fn reset(&mut self) {
        if !self.engine.cancel(&self.shared) {
            log::warn!("{}: DMA did not stop for reset", self.name);
        }
        self.engine.resume();
        self.shared.reset();
        self.scratch = 0;
        self.dma = DmaRegs {
            vector: u32::MAX,
            ..DmaRegs::default()
        };
        self.page.store(0, 0);
        self.intx.deassert();
    }

    fn stop(&mut self) {
        if !self.engine.cancel(&self.shared) {
            log::warn!("{}: DMA did not stop on detach", self.name);
        }
    }

    fn attr(&self, key: &str) -> Option<String> {
        match key {
            "scratch" => Some(self.scratch.to_string()),
            "doorbells" => Some(
                self.shared
                    .doorbell_count
                    .load(Ordering::Acquire)
                    .to_string(),
            ),
            _ => None,
        }
    }

    fn set_attr(&mut self, key: &str, value: &str) -> Result<(), DeviceError> {
        match key {
            "scratch" => {
                self.scratch = value.parse().map_err(|_| DeviceError::InvalidAttribute {
                    device: self.name.clone(),
                    key: key.to_string(),
                    reason: format!("{value:?} is not a u32"),
                })?;
                Ok(())
            }
            _ => Err(DeviceError::UnknownAttribute {
                device: self.name.clone(),
                key: key.to_string(),
            }),
        }
    }
}
