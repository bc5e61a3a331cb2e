//! [`VfioUserAdapter`]: a [`DeviceModel`] as a vfio-user [`ServerDevice`].
//!
//! Routing:
//! - Region 7 (config) goes to the PCI model; the device hears about applied writes through
//!   [`DeviceModel::config_written`] and [`DeviceModel::config_events`]. An FLR event resets
//!   the device like DEVICE_RESET.
//! - BAR regions: MSI-X table/PBA ranges go to the PCI model, the rest to
//!   [`DeviceModel::bar_read`] / [`DeviceModel::bar_write`]. ROM reads return zeroes.
//! - DMA map changes: quiesce, [`DeviceModel::set_memory`] with a new [`GuestMemory`]
//!   snapshot, resume. The unmap reply goes out only after `set_memory` returned.
//!
//! IRQ info (decisions):
//! - INTx: count 1 when the function has an interrupt pin, EVENTFD | MASKABLE | AUTOMASKED.
//! - MSI: count 0. We model no MSI capability; QEMU falls back MSI-X -> INTx.
//! - MSI-X: count = table size, EVENTFD | MASKABLE and **no NORESIZE**: vectors can be
//!   (de)assigned one at a time at any point (the PBA keeps what fires meanwhile), so QEMU's
//!   dynamic allocation path works and it never has to disable and re-enable the whole
//!   table (which risks losing interrupts) to add a vector.
//! - ERR and REQ: count 1, EVENTFD.
//!
//! Robustness: every device call runs behind [`guarded`]. A panic marks the device Failed
//! (logged with its name); a failed device answers EIO to everything except DEVICE_RESET
//! (which tries to recover it), DMA table updates (memory is still swapped so nothing keeps
//! a removed range) and detach.
//!
//! Message DMA: fd-less maps are reached through the attached [`DmaPort`], wrapped in a
//! gate per snapshot. Before an unmap quiesces the device, the old gate is closed, so a
//! worker blocked on a DMA message (which the event loop cannot answer while it waits for
//! the quiesce) fails its next transfer instead of touching the old table.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use emudev_vfio_user::wire::{device_flags, irq_index, irq_info_flags, region_flags, region_index};
use emudev_vfio_user::{
    DeviceDesc, DmaError, DmaPort, DmaRegion, DmaTransport, Errno, IoEventFd, IrqAction, IrqData,
    IrqDesc, RegionDesc, ServerDevice,
};

use crate::device::{DeviceModel, DeviceState};
use crate::events::{DeviceEvent, EventBus};
use crate::lifecycle::{guarded, StateCell, Transition};
use crate::memory::GuestMemory;
use crate::pci::{ConfigEvent, IrqLine};

/// A device shared between its transport and the manager (attributes at runtime).
pub type SharedDevice<D> = Arc<Mutex<D>>;

fn lock_dev<D: ?Sized>(d: &Mutex<D>) -> MutexGuard<'_, D> {
    // After a panic the device is Failed; the guard only protects memory safety.
    d.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `DmaPort` that stops working once its snapshot is retired.
struct GatedPort {
    inner: DmaPort,
    open: Arc<AtomicBool>,
}

impl DmaTransport for GatedPort {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if !self.open.load(Ordering::Acquire) {
            return Err(DmaError::Disconnected);
        }
        self.inner.read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        if !self.open.load(Ordering::Acquire) {
            return Err(DmaError::Disconnected);
        }
        self.inner.write(addr, data)
    }
}

/// Polls the INTx unmask eventfd (KVM resampler) and unmasks the line when it fires.
struct Resampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Resampler {
    fn spawn(
        name: &str,
        intx: Arc<crate::pci::IntxLine>,
        fd: Arc<crate::pci::EventFd>,
    ) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-intx"))
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    match crate::doorbell::wait_eventfd(fd.as_fd(), Duration::from_millis(50)) {
                        Ok(0) => {}
                        Ok(_) => {
                            if let Err(e) = intx.unmask() {
                                log::warn!("INTx re-delivery failed: {e}");
                            }
                        }
                        Err(e) => {
                            log::warn!("INTx unmask eventfd {}: {e}", fd.as_raw_fd());
                            return;
                        }
                    }
                }
            })
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Resampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A [`DeviceModel`] served over vfio-user (or driven in-process, see `inproc`).
pub struct VfioUserAdapter<D: DeviceModel> {
    dev: SharedDevice<D>,
    name: String,
    state: StateCell,
    events: Arc<EventBus>,
    port: Option<DmaPort>,
    gate: Option<Arc<AtomicBool>>,
    attached: bool,
    err: IrqLine,
    req: IrqLine,
    resampler: Option<Resampler>,
}

impl<D: DeviceModel> std::fmt::Debug for VfioUserAdapter<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserAdapter")
            .field("name", &self.name)
            .field("state", &self.state.get())
            .finish_non_exhaustive()
    }
}

impl<D: DeviceModel> VfioUserAdapter<D> {
    pub fn new(dev: D) -> Self {
        Self::with_parts(
            Arc::new(Mutex::new(dev)),
            StateCell::default(),
            Arc::default(),
        )
    }

    /// Build around a device the caller also keeps (the manager does, for attributes).
    pub fn with_parts(dev: SharedDevice<D>, state: StateCell, events: Arc<EventBus>) -> Self {
        let name = lock_dev(&dev).name().to_string();
        Self {
            dev,
            name,
            state,
            events,
            port: None,
            gate: None,
            attached: false,
            err: IrqLine::new(),
            req: IrqLine::new(),
            resampler: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> DeviceState {
        self.state.get()
    }

    pub fn state_cell(&self) -> &StateCell {
        &self.state
    }

    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    pub fn device(&self) -> &SharedDevice<D> {
        &self.dev
    }

    /// Run `f` on the device directly (tests, benchmarks).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut lock_dev(&self.dev))
    }

    /// The ERR line (the device layer raises it for unrecoverable device errors).
    pub fn err_irq(&self) -> &IrqLine {
        &self.err
    }

    /// The REQ line (asks the client to release the device).
    pub fn req_irq(&self) -> &IrqLine {
        &self.req
    }

    fn transition(&self, t: Transition) {
        if let Some((from, to)) = self.state.apply(t, self.attached) {
            log::debug!("{}: {from:?} -> {to:?}", self.name);
            self.events.publish(DeviceEvent::StateChanged { from, to });
        }
    }

    fn fail(&self, what: &str, why: &str) {
        log::error!("{}: {what} failed, device marked Failed: {why}", self.name);
        self.transition(Transition::Fail);
        if let Err(e) = self.err.trigger() {
            log::warn!("{}: cannot signal ERR: {e}", self.name);
        }
    }

    /// One call into the device behind the panic fence. A failed device is not called.
    fn call<R>(&self, what: &str, f: impl FnOnce(&mut D) -> R) -> Result<R, Errno> {
        if self.state.is_failed() {
            return Err(Errno::EIO);
        }
        self.call_always(what, f)
    }

    /// Like `call`, also for a failed device (reset, memory updates, detach).
    fn call_always<R>(&self, what: &str, f: impl FnOnce(&mut D) -> R) -> Result<R, Errno> {
        let mut d = lock_dev(&self.dev);
        match guarded(|| f(&mut d)) {
            Ok(r) => Ok(r),
            Err(msg) => {
                drop(d);
                self.fail(what, &format!("panicked: {msg}"));
                Err(Errno::EIO)
            }
        }
    }

    /// Replace the device's memory: quiesce, set_memory, resume. Used for every DMA table
    /// change. On a quiesce failure the memory is still swapped (so the device drops its
    /// references to removed ranges) and the device is marked Failed.
    fn update_memory(&mut self, table: &[DmaRegion], what: &str) -> Result<(), Errno> {
        if let Some(old) = self.gate.take() {
            old.store(false, Ordering::Release);
        }
        let port = self.port.clone().map(|p| {
            let open = Arc::new(AtomicBool::new(true));
            self.gate = Some(open.clone());
            DmaPort::new(Arc::new(GatedPort { inner: p, open }))
        });
        let mem = Arc::new(GuestMemory::from_dma(table, port));
        let regions = mem.region_count();
        let was_failed = self.state.is_failed();
        let res = self.call_always(what, |d| {
            let q = d.quiesce();
            d.set_memory(mem);
            if q.is_ok() {
                d.resume();
            }
            q
        });
        self.events.publish(DeviceEvent::MemoryChanged { regions });
        match res {
            Ok(Ok(())) if was_failed => Err(Errno::EIO),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.fail(what, &e.to_string());
                Err(Errno::EIO)
            }
            Err(e) => Err(e),
        }
    }

    fn irq_desc(&self, index: u32) -> Option<IrqDesc> {
        const EV: u32 = irq_info_flags::EVENTFD;
        let mut d = lock_dev(&self.dev);
        let pci = d.pci();
        Some(match index {
            irq_index::INTX => IrqDesc {
                flags: EV | irq_info_flags::MASKABLE | irq_info_flags::AUTOMASKED,
                count: u32::from(pci.config().u8_at(crate::pci::reg::INTERRUPT_PIN) != 0),
            },
            irq_index::MSI => IrqDesc {
                flags: EV,
                count: 0,
            },
            irq_index::MSIX => IrqDesc {
                flags: EV | irq_info_flags::MASKABLE,
                count: pci.msix().map_or(0, |m| u32::from(m.num_vectors())),
            },
            irq_index::ERR | irq_index::REQ => IrqDesc {
                flags: EV,
                count: 1,
            },
            _ => return None,
        })
    }

    fn set_intx(&mut self, action: IrqAction, count: u32, data: IrqData) -> Result<(), Errno> {
        let intx = lock_dev(&self.dev).pci().intx().clone();
        let io = |r: std::io::Result<bool>| r.map(|_| ()).map_err(|_| Errno::EIO);
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(mut fds)) => {
                io(intx.set_trigger_fd(fds.pop().flatten()))
            }
            (IrqAction::Unmask, IrqData::Eventfds(mut fds)) => {
                let fd = fds.pop().flatten();
                self.resampler = None;
                intx.set_unmask_fd(fd);
                if let Some(ufd) = intx.unmask_fd() {
                    self.resampler = Resampler::spawn(&self.name, intx.clone(), ufd);
                }
                Ok(())
            }
            (IrqAction::Mask, IrqData::Eventfds(_)) => Err(Errno::EINVAL),
            (IrqAction::Trigger, IrqData::None) if count == 0 => {
                // "Whole index, no data": tear INTx down.
                self.resampler = None;
                intx.set_unmask_fd(None);
                io(intx.set_trigger_fd(None))
            }
            (action, data) => {
                if !first_flag(&data) {
                    return Ok(());
                }
                match action {
                    IrqAction::Mask => {
                        intx.mask();
                        Ok(())
                    }
                    IrqAction::Unmask => io(intx.unmask()),
                    IrqAction::Trigger => {
                        let r = intx.assert();
                        intx.deassert();
                        io(r)
                    }
                }
            }
        }
    }

    fn set_msix(
        &mut self,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), Errno> {
        let Some(msix) = lock_dev(&self.dev).pci().msix().cloned() else {
            return if count == 0 {
                Ok(())
            } else {
                Err(Errno::EINVAL)
            };
        };
        let mut result = Ok(());
        let mut note = |r: Result<(), Errno>| {
            if result.is_ok() {
                result = r;
            }
        };
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                for (i, fd) in fds.into_iter().enumerate() {
                    let v = start.saturating_add(i as u32);
                    note(
                        msix.set_vector_fd(v, fd)
                            .map(|_| ())
                            .map_err(|_| Errno::EINVAL),
                    );
                }
            }
            (_, IrqData::Eventfds(_)) => return Err(Errno::EINVAL),
            (IrqAction::Trigger, IrqData::None) if count == 0 => msix.clear_client_state(),
            (action, data) => {
                for i in 0..count {
                    if !nth_flag(&data, i as usize) {
                        continue;
                    }
                    let v = start.saturating_add(i);
                    let r = match action {
                        IrqAction::Mask => msix.set_client_mask(v, true).map(|_| ()),
                        IrqAction::Unmask => msix.set_client_mask(v, false).map(|_| ()),
                        IrqAction::Trigger => u16::try_from(v)
                            .map_err(|_| crate::pci::MsixError::BadVector {
                                vector: v,
                                size: msix.num_vectors(),
                            })
                            .and_then(|v| msix.trigger(v))
                            .map(|_| ()),
                    };
                    note(r.map_err(|_| Errno::EINVAL));
                }
            }
        }
        result
    }

    fn set_line(line: &IrqLine, action: IrqAction, count: u32, data: IrqData) -> Result<(), Errno> {
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(mut fds)) => {
                line.set_fd(fds.pop().flatten());
                Ok(())
            }
            (IrqAction::Trigger, IrqData::None) if count == 0 => {
                line.set_fd(None);
                Ok(())
            }
            (IrqAction::Trigger, data) => {
                if first_flag(&data) {
                    line.trigger().map(|_| ()).map_err(|_| Errno::EIO)
                } else {
                    Ok(())
                }
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn bar_access_read(d: &mut D, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if let Some(r) = d.pci().msix_bar_read(bar, offset, data) {
            return r.map_err(|_| Errno::EINVAL);
        }
        d.bar_read(bar, offset, data);
        Ok(())
    }

    fn bar_access_write(d: &mut D, bar: u8, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if let Some(r) = d.pci().msix_bar_write(bar, offset, data) {
            return r.map_err(|_| Errno::EINVAL);
        }
        d.bar_write(bar, offset, data);
        Ok(())
    }

    fn config_write(d: &mut D, offset: u64, data: &[u8]) -> Result<bool, Errno> {
        let events = d
            .pci()
            .config_write(offset, data)
            .map_err(|_| Errno::EINVAL)?;
        d.config_written(offset, data.len());
        if !events.is_empty() {
            d.config_events(&events);
        }
        Ok(events.contains(&ConfigEvent::FunctionLevelReset))
    }

    fn do_reset(&mut self, what: &str) -> Result<(), Errno> {
        let r = self.call_always(what, |d| {
            d.reset();
            d.pci().reset();
        });
        if r.is_ok() {
            self.transition(Transition::Reset);
            self.events.publish(DeviceEvent::Reset);
        }
        r
    }
}

/// DATA_NONE means "all"; DATA_BOOL carries one flag per vector.
fn nth_flag(data: &IrqData, i: usize) -> bool {
    match data {
        IrqData::Bool(v) => v.get(i).copied().unwrap_or(false),
        _ => true,
    }
}

fn first_flag(data: &IrqData) -> bool {
    nth_flag(data, 0)
}

impl<D: DeviceModel> ServerDevice for VfioUserAdapter<D> {
    fn device_desc(&self) -> DeviceDesc {
        DeviceDesc {
            flags: device_flags::PCI | device_flags::RESET,
            num_regions: region_index::COUNT,
            num_irqs: irq_index::COUNT,
        }
    }

    fn region(&self, index: u32) -> Option<RegionDesc> {
        let rw = region_flags::READ | region_flags::WRITE;
        let mut d = lock_dev(&self.dev);
        match index {
            0..=5 => {
                let size = d.pci().bar_size(index as usize);
                if size == 0 {
                    return Some(RegionDesc::default());
                }
                let mmap = d.bar_mmap(index as u8);
                Some(RegionDesc {
                    size,
                    flags: rw,
                    mmap,
                })
            }
            region_index::ROM => {
                let size = u64::from(d.pci().rom_size());
                Some(RegionDesc {
                    size,
                    flags: if size == 0 { 0 } else { region_flags::READ },
                    mmap: None,
                })
            }
            region_index::CONFIG => Some(RegionDesc {
                size: d.pci().config_size() as u64,
                flags: rw,
                mmap: None,
            }),
            region_index::VGA => Some(RegionDesc::default()),
            _ => None,
        }
    }

    fn irq(&self, index: u32) -> Option<IrqDesc> {
        self.irq_desc(index)
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        match index {
            0..=5 => self.call("BAR read", |d| {
                Self::bar_access_read(d, index as u8, offset, data)
            })?,
            region_index::ROM => {
                data.fill(0);
                Ok(())
            }
            region_index::CONFIG => self.call("config read", |d| {
                d.config_reading(offset, data.len());
                d.pci().config_read(offset, data).map_err(|_| Errno::EINVAL)
            })?,
            _ => Err(Errno::EINVAL),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            0..=5 => self.call("BAR write", |d| {
                Self::bar_access_write(d, index as u8, offset, data)
            })?,
            region_index::ROM => Ok(()),
            region_index::CONFIG => {
                let flr = self.call("config write", |d| Self::config_write(d, offset, data))??;
                if flr {
                    self.do_reset("function-level reset")?;
                }
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn region_io_fds(&mut self, index: u32) -> Result<Vec<IoEventFd>, Errno> {
        let bar = u8::try_from(index)
            .ok()
            .filter(|b| *b <= 5)
            .ok_or(Errno::EINVAL)?;
        self.call("ioeventfds", |d| d.ioeventfds(bar))
    }

    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), Errno> {
        // IRQ plumbing lives in the PCI model and here; it works on a failed device too so
        // the client can tear interrupts down.
        match index {
            irq_index::INTX => self.set_intx(action, count, data),
            irq_index::MSI => {
                if count == 0 {
                    Ok(())
                } else {
                    Err(Errno::EINVAL)
                }
            }
            irq_index::MSIX => self.set_msix(action, start, count, data),
            irq_index::ERR => Self::set_line(&self.err, action, count, data),
            irq_index::REQ => Self::set_line(&self.req, action, count, data),
            _ => Err(Errno::EINVAL),
        }
    }

    fn dma_map(&mut self, table: &[DmaRegion], _added: &DmaRegion) -> Result<(), Errno> {
        self.update_memory(table, "DMA map")
    }

    fn dma_unmap(&mut self, table: &[DmaRegion], _removed: &[DmaRegion]) -> Result<(), Errno> {
        self.update_memory(table, "DMA unmap")
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.do_reset("reset")
    }

    fn attach(&mut self, dma: DmaPort) {
        self.port = Some(dma);
        self.attached = true;
        self.transition(Transition::Attach);
        self.events.publish(DeviceEvent::ClientAttached(true));
    }

    fn detach(&mut self) {
        let _ = self.call_always("stop", |d| d.stop());
        if let Some(g) = self.gate.take() {
            g.store(false, Ordering::Release);
        }
        self.port = None;
        let _ = self.call_always("detach", |d| {
            d.set_memory(Arc::new(GuestMemory::empty()));
            let pci = d.pci();
            if let Some(m) = pci.msix() {
                m.clear_client_state();
            }
            let _ = pci.intx().set_trigger_fd(None);
            pci.intx().set_unmask_fd(None);
        });
        self.resampler = None;
        self.err.set_fd(None);
        self.req.set_fd(None);
        self.attached = false;
        self.transition(Transition::Detach);
        self.events.publish(DeviceEvent::ClientAttached(false));
    }
}
