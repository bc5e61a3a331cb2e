//! In-process transport: drive a device from a test or benchmark with no socket.
//!
//! [`InProc`] owns a [`VfioUserAdapter`] and calls its `ServerDevice` methods directly, so
//! routing, memory swaps and IRQ plumbing are exactly the vfio-user ones. Guest RAM is a
//! memfd of N MiB mapped at guest address 0 through a real DMA table (the same mmap path as
//! a client's DMA_MAP); the test sees the same bytes through [`InProc::mem`] /
//! [`InProc::ram`]. Extra fd-backed maps and fd-less maps (served by an in-process stand-in
//! for the client's DMA_READ/DMA_WRITE handling) can be added and removed at runtime.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use emudev_vfio_user::wire::{dma_flags, irq_index, region_index, DmaMap};
use emudev_vfio_user::{
    DmaError, DmaPort, DmaTable, DmaTransport, Errno, IrqAction, IrqData, ServerDevice,
};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vm_memory::MmapRegion;

use super::vfio_user::VfioUserAdapter;
use crate::device::DeviceModel;
use crate::doorbell::{drain_eventfd, wait_eventfd};
use crate::memory::GuestMemory;
use crate::pci::{cap_id, EventFd};

/// Errors of the in-process transport's setup helpers.
#[derive(Debug, thiserror::Error)]
pub enum InProcError {
    #[error("guest RAM setup: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what}: device answered {errno}")]
    Device { what: &'static str, errno: Errno },
    #[error("the device has no {0}")]
    Missing(&'static str),
}

fn dev_err(what: &'static str) -> impl Fn(Errno) -> InProcError {
    move |errno| InProcError::Device { what, errno }
}

/// Client memory reached by messages: what a vfio-user client does for fd-less maps.
#[derive(Default)]
struct LocalClientMemory {
    regions: Mutex<Vec<(u64, Arc<MmapRegion>)>>,
}

impl LocalClientMemory {
    fn with<R>(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(vm_memory::VolatileSlice<'_>) -> R,
    ) -> Result<R, DmaError> {
        use vm_memory::VolatileMemory;
        let regions = self.regions.lock().unwrap_or_else(PoisonError::into_inner);
        let refused = DmaError::Refused {
            addr,
            len: len as u64,
            errno: Errno::EFAULT as u32,
        };
        let (base, m) = regions
            .iter()
            .find(|(b, m)| *b <= addr && addr - *b < m.size() as u64)
            .ok_or(refused.clone())?;
        let off = usize::try_from(addr - base).map_err(|_| refused.clone())?;
        let s = m.get_slice(off, len).map_err(|_| refused)?;
        Ok(f(s))
    }
}

impl DmaTransport for LocalClientMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.with(addr, buf.len(), |s| s.copy_to(buf)).map(|_| ())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.with(addr, data.len(), |s| s.copy_from(data))
            .map(|_| ())
    }
}

/// A memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> std::io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(std::io::Error::other)?;
    let fd = memfd_create(&cname, MemFdCreateFlag::MFD_CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(file.into())
}

/// An MSI-X vector or INTx line the test waits on.
#[derive(Debug)]
pub struct IrqWaiter(EventFd);

impl IrqWaiter {
    /// Wait up to `timeout`; returns the number of signals (0 on timeout).
    pub fn wait(&self, timeout: Duration) -> u64 {
        wait_eventfd(self.0.as_fd(), timeout).unwrap_or(0)
    }
    /// Signals since the last call, without waiting.
    pub fn take(&self) -> u64 {
        drain_eventfd(self.0.as_fd()).unwrap_or(0)
    }
}

/// A device driven in-process.
pub struct InProc<D: DeviceModel> {
    adapter: VfioUserAdapter<D>,
    table: DmaTable,
    client: Arc<LocalClientMemory>,
    ram: Arc<MmapRegion>,
    ram_size: u64,
    mem: Arc<GuestMemory>,
}

impl<D: DeviceModel> InProc<D> {
    /// Attach `dev` with `ram_mib` MiB of memfd guest RAM at guest address 0.
    pub fn new(dev: D, ram_mib: u64) -> Result<Self, InProcError> {
        let ram_size = ram_mib
            .checked_mul(1 << 20)
            .filter(|s| *s > 0)
            .ok_or_else(|| std::io::Error::other("RAM size must be 1 MiB or more"))?;
        let mut adapter = VfioUserAdapter::new(dev);
        let client = Arc::new(LocalClientMemory::default());
        adapter.attach(DmaPort::new(client.clone()));
        let mut s = Self {
            adapter,
            table: DmaTable::new(1024),
            client,
            ram: Arc::new(MmapRegion::new(4096).map_err(std::io::Error::other)?),
            ram_size,
            mem: Arc::new(GuestMemory::empty()),
        };
        s.ram = s.map_fd(0, ram_size)?;
        Ok(s)
    }

    fn refresh_view(&mut self) {
        self.mem = Arc::new(GuestMemory::from_dma(
            self.table.regions(),
            Some(DmaPort::new(self.client.clone())),
        ));
    }

    /// Map a new memfd of `size` bytes at `gpa` (like a DMA_MAP with an fd); returns the
    /// test's view of it.
    pub fn map_fd(&mut self, gpa: u64, size: u64) -> Result<Arc<MmapRegion>, InProcError> {
        let fd = memfd("emudev-inproc-ram", size)?;
        let req = map_req(gpa, size);
        let added = self.table.map(&req, Some(fd)).map_err(dev_err("DMA_MAP"))?;
        let view = added
            .mapping
            .clone()
            .ok_or(InProcError::Missing("mapping"))?;
        let r = self.adapter.dma_map(self.table.regions(), &added);
        self.refresh_view();
        r.map_err(dev_err("DMA_MAP"))?;
        Ok(view)
    }

    /// Map `size` bytes at `gpa` with no fd: the device reaches them by "messages" served
    /// from test-owned memory (returned).
    pub fn map_message(&mut self, gpa: u64, size: u64) -> Result<Arc<MmapRegion>, InProcError> {
        let len = usize::try_from(size).map_err(std::io::Error::other)?;
        let m = Arc::new(MmapRegion::new(len).map_err(std::io::Error::other)?);
        let req = map_req(gpa, size);
        let added = self.table.map(&req, None).map_err(dev_err("DMA_MAP"))?;
        self.client
            .regions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((gpa, m.clone()));
        let r = self.adapter.dma_map(self.table.regions(), &added);
        self.refresh_view();
        r.map_err(dev_err("DMA_MAP"))?;
        Ok(m)
    }

    /// Unmap `[gpa, gpa+size)`; returns once the device no longer uses it.
    pub fn unmap(&mut self, gpa: u64, size: u64) -> Result<(), InProcError> {
        let removed = self.table.unmap(gpa, size).map_err(dev_err("DMA_UNMAP"))?;
        let r = self.adapter.dma_unmap(self.table.regions(), &removed);
        self.refresh_view();
        r.map_err(dev_err("DMA_UNMAP"))
    }

    /// The adapter, to call `ServerDevice` methods directly.
    pub fn adapter(&mut self) -> &mut VfioUserAdapter<D> {
        &mut self.adapter
    }

    /// Run `f` on the device model.
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        self.adapter.with_device(f)
    }

    /// Guest memory as the test sees it (the current table).
    pub fn mem(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The RAM memfd mapping (guest address 0).
    pub fn ram(&self) -> &Arc<MmapRegion> {
        &self.ram
    }

    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    pub fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        self.check_range(index, offset, data.len())?;
        self.adapter.region_read(index, offset, data)
    }

    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.check_range(index, offset, data.len())?;
        self.adapter.region_write(index, offset, data)
    }

    /// The range check the vfio-user server does before calling the device.
    fn check_range(&self, index: u32, offset: u64, len: usize) -> Result<(), Errno> {
        let r = self.adapter.region(index).ok_or(Errno::EINVAL)?;
        let end = offset.checked_add(len as u64).ok_or(Errno::EINVAL)?;
        if end > r.size {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    pub fn read32(&mut self, bar: u32, offset: u64) -> Result<u32, Errno> {
        let mut b = [0u8; 4];
        self.region_read(bar, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write32(&mut self, bar: u32, offset: u64, v: u32) -> Result<(), Errno> {
        self.region_write(bar, offset, &v.to_le_bytes())
    }

    pub fn write64(&mut self, bar: u32, offset: u64, v: u64) -> Result<(), Errno> {
        self.region_write(bar, offset, &v.to_le_bytes())
    }

    pub fn config_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        self.region_read(region_index::CONFIG, offset, data)
    }

    pub fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.region_write(region_index::CONFIG, offset, data)
    }

    pub fn config_read16(&mut self, offset: u64) -> Result<u16, Errno> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn config_write16(&mut self, offset: u64, v: u16) -> Result<(), Errno> {
        self.config_write(offset, &v.to_le_bytes())
    }

    /// Give vectors `0..n` client eventfds (as QEMU does with SET_IRQS) and set MSI-X
    /// Enable in the capability. Returns one waiter per vector.
    pub fn enable_msix(&mut self, n: u32) -> Result<Vec<IrqWaiter>, InProcError> {
        let cap = self
            .adapter
            .with_device(|d| d.pci().find_capability(cap_id::MSIX))
            .ok_or(InProcError::Missing("MSI-X capability"))?;
        let mut waiters = Vec::new();
        let mut fds = Vec::new();
        for _ in 0..n {
            let ev = crate::doorbell::new_eventfd()?;
            fds.push(Some(ev.as_fd().try_clone_to_owned()?));
            waiters.push(IrqWaiter(ev));
        }
        self.adapter
            .set_irqs(
                irq_index::MSIX,
                IrqAction::Trigger,
                0,
                n,
                IrqData::Eventfds(fds),
            )
            .map_err(dev_err("SET_IRQS(MSIX)"))?;
        let ctrl_off = u64::from(cap.offset) + 2;
        let ctrl = self
            .config_read16(ctrl_off)
            .map_err(dev_err("config read"))?;
        self.config_write16(ctrl_off, ctrl | 0x8000)
            .map_err(dev_err("config write"))?;
        Ok(waiters)
    }

    /// SET_IRQS(MSIX, ACTION_MASK or ACTION_UNMASK, DATA_NONE) for one vector.
    pub fn mask_vector(&mut self, vector: u32, masked: bool) -> Result<(), Errno> {
        let action = if masked {
            IrqAction::Mask
        } else {
            IrqAction::Unmask
        };
        self.adapter
            .set_irqs(irq_index::MSIX, action, vector, 1, IrqData::None)
    }

    /// Give INTx an eventfd (SET_IRQS(INTX, EVENTFD|TRIGGER)).
    pub fn enable_intx(&mut self) -> Result<IrqWaiter, InProcError> {
        let ev = crate::doorbell::new_eventfd()?;
        let fd = ev.as_fd().try_clone_to_owned()?;
        self.adapter
            .set_irqs(
                irq_index::INTX,
                IrqAction::Trigger,
                0,
                1,
                IrqData::Eventfds(vec![Some(fd)]),
            )
            .map_err(dev_err("SET_IRQS(INTX)"))?;
        Ok(IrqWaiter(ev))
    }

    /// SET_IRQS(INTX, ACTION_UNMASK, DATA_NONE): the EOI path.
    pub fn unmask_intx(&mut self) -> Result<(), Errno> {
        self.adapter
            .set_irqs(irq_index::INTX, IrqAction::Unmask, 0, 1, IrqData::None)
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<(), Errno> {
        self.adapter.reset()
    }
}

impl<D: DeviceModel> Drop for InProc<D> {
    fn drop(&mut self) {
        // Like a client going away: memory removed, then detach.
        let removed = self.table.clear();
        if !removed.is_empty() {
            let _ = self.adapter.dma_unmap(&[], &removed);
        }
        self.adapter.detach();
    }
}

fn map_req(gpa: u64, size: u64) -> DmaMap {
    DmaMap {
        argsz: std::mem::size_of::<DmaMap>() as u32,
        flags: dma_flags::READ | dma_flags::WRITE,
        offset: 0,
        address: gpa,
        size,
    }
}
