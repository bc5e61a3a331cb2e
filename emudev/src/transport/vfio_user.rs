//! [`VfioUserAdapter`]: a [`DeviceModel`] as a vfio-user [`ServerDevice`].
//!
//! Routing:
//! - Region 7 (config) goes to the PCI model; the device hears about applied writes through
//!   [`DeviceModel::config_written`] and [`DeviceModel::config_events`]. An FLR event resets
//!   the device like DEVICE_RESET.
//! - BAR regions: MSI-X table/PBA ranges go to the PCI model, the rest to
//!   [`DeviceModel::bar_read`] / [`DeviceModel::bar_write`]. ROM reads return zeroes.
//! - DMA map changes: a change that removes an fd-backed range quiesces, calls
//!   [`DeviceModel::set_memory`] with a new [`GuestMemory`] snapshot and resumes; the unmap
//!   reply goes out only after `set_memory` returned. Any other change (a map, an unmap of
//!   message-only ranges) goes to [`DeviceModel::set_memory_lazy`] without waiting, falling
//!   back to the quiesce path when the device cannot switch lazily.
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
//! gate shared by snapshots until a change retires a host mapping. Before such a change
//! quiesces the device, the gate is closed, so a worker blocked on a DMA message (which the
//! event loop cannot answer while it waits for the quiesce) fails its next transfer instead
//! of touching the old table. Lazy changes keep the gate open: the client validates every
//! message DMA against its own map.

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
    /// Gate of the current snapshots' port, and that gated port (shared by successive
    /// snapshots until a change retires a host mapping).
    gate: Option<Arc<AtomicBool>>,
    gated: Option<DmaPort>,
    attached: bool,
    err: IrqLine,
    req: IrqLine,
    resampler: Option<Resampler>,
    /// Device writes below this guest address go out as DMA_WRITE messages even to fd-backed
    /// maps, so QEMU's TCG sees them (see [`Self::set_message_writes_below`]).
    message_writes_below: u64,
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
        let name = {
            let mut d = lock_dev(&dev);
            d.set_event_bus(events.clone());
            d.name().to_string()
        };
        Self {
            dev,
            name,
            state,
            events,
            port: None,
            gate: None,
            gated: None,
            attached: false,
            err: IrqLine::new(),
            req: IrqLine::new(),
            resampler: None,
            message_writes_below: 0,
        }
    }

    /// Set the guest address below which device writes go by DMA_WRITE message, even to
    /// fd-backed maps (default 0: off). A boot device for QEMU clients sets
    /// [`crate::memory::LEGACY_LOW_MEM_END`]: under TCG, firmware loads code over code it
    /// already ran there, and QEMU only notices writes made through it (issue 11). The client
    /// must serve DMA_WRITE for every mapped address (QEMU does; simple test clients serve
    /// fd-less maps only). Takes effect at the next DMA table change.
    pub fn set_message_writes_below(&mut self, limit: u64) {
        self.message_writes_below = limit;
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

    /// The port for a new snapshot. With `fresh`, the gate of the previous snapshots is
    /// closed first, so a worker blocked on a DMA message fails fast instead of touching
    /// the old table.
    fn snapshot_port(&mut self, fresh: bool) -> Option<DmaPort> {
        if fresh || self.gated.is_none() {
            if let Some(old) = self.gate.take() {
                old.store(false, Ordering::Release);
            }
            self.gated = self.port.clone().map(|p| {
                let open = Arc::new(AtomicBool::new(true));
                self.gate = Some(open.clone());
                DmaPort::new(Arc::new(GatedPort { inner: p, open }))
            });
        }
        self.gated.clone()
    }

    /// Replace the device's memory. Used for every DMA table change.
    ///
    /// `retires_mapping`: the change removed an fd-backed (mmapped) range. Only then must
    /// every user let go of the old snapshot before the reply: quiesce, set_memory, resume.
    /// Otherwise (a map, or an unmap of message-only ranges, which the client validates on
    /// every DMA) the device may switch lazily ([`DeviceModel::set_memory_lazy`]), so the
    /// control thread never waits on a datapath thread that may itself wait for a DMA
    /// message only this thread routes.
    ///
    /// On a quiesce failure the memory is still swapped (so the device drops its
    /// references to removed ranges) and the device is marked Failed. Returns the outcome
    /// and whether the device now uses `table`.
    fn update_memory(
        &mut self,
        table: &[DmaRegion],
        retires_mapping: bool,
        what: &str,
    ) -> (Result<(), Errno>, bool) {
        let was_failed = self.state.is_failed();
        if !retires_mapping {
            // Writes below 1 MiB by messages: TCG sees them (memory.rs, issue 11).
            let limit = self.message_writes_below;
            let mem = Arc::new(GuestMemory::from_dma_messages_below(
                table,
                self.snapshot_port(false),
                limit,
            ));
            let regions = mem.region_count();
            match self.call_always(what, |d| d.set_memory_lazy(&mem)) {
                Ok(true) => {
                    self.events.publish(DeviceEvent::MemoryChanged { regions });
                    let r = if was_failed { Err(Errno::EIO) } else { Ok(()) };
                    return (r, true);
                }
                Ok(false) => {}
                Err(e) => return (Err(e), false),
            }
        }
        let port = self.snapshot_port(true);
        let mem = Arc::new(GuestMemory::from_dma_messages_below(
            table,
            port,
            self.message_writes_below,
        ));
        let regions = mem.region_count();
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
            Ok(Ok(())) if was_failed => (Err(Errno::EIO), true),
            Ok(Ok(())) => (Ok(()), true),
            Ok(Err(e)) => {
                self.fail(what, &e.to_string());
                (Err(Errno::EIO), true)
            }
            Err(e) => (Err(e), false),
        }
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

fn region_desc<D: DeviceModel>(d: &mut D, index: u32) -> Option<RegionDesc> {
    let rw = region_flags::READ | region_flags::WRITE;
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

fn irq_desc<D: DeviceModel>(d: &mut D, index: u32) -> Option<IrqDesc> {
    const EV: u32 = irq_info_flags::EVENTFD;
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
        // Region layout is static for a device, so it is answered even when Failed (QEMU
        // needs it to realize); only a panic while computing it gives "no such region".
        self.call_always("region info", |d| region_desc(d, index))
            .ok()
            .flatten()
    }

    fn irq(&self, index: u32) -> Option<IrqDesc> {
        self.call_always("IRQ info", |d| irq_desc(d, index))
            .ok()
            .flatten()
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
        // A refused map is rolled back by the server, so only refuse it when the device
        // did not take the new table; a failed device keeps exact bookkeeping and reports
        // its failure on device accesses instead.
        match self.update_memory(table, false, "DMA map") {
            (Err(e), false) => Err(e),
            _ => Ok(()),
        }
    }

    fn dma_unmap(&mut self, table: &[DmaRegion], removed: &[DmaRegion]) -> Result<(), Errno> {
        // Removal happens regardless of the answer; the device uses `table` either way
        // unless its set_memory panicked, which leaves it Failed.
        let retires_mapping = removed.iter().any(|r| r.mapping.is_some());
        self.update_memory(table, retires_mapping, "DMA unmap").0
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.do_reset("reset")
    }

    fn attach(&mut self, dma: DmaPort) {
        if let Some(g) = self.gate.take() {
            g.store(false, Ordering::Release);
        }
        self.gated = None;
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
        self.gated = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::{drain_eventfd, new_eventfd};
    use crate::pci::{
        cap_id, BarDef, Capability, MsixLayout, PciDevice, PciDeviceBuilder, PciIds, PcieCapConfig,
    };
    use crate::DeviceError;
    use emudev_vfio_user::wire::dma_flags;
    use vm_memory::MmapRegion;

    #[derive(Default)]
    struct Calls {
        resets: u32,
        regions: Option<usize>,
        stops: u32,
        quiesces: u32,
        lazy: u32,
        /// The last snapshot the device got.
        mem: Option<Arc<GuestMemory>>,
    }

    struct Fake {
        pci: PciDevice,
        calls: Arc<Mutex<Calls>>,
        panic_on_write: bool,
        fail_quiesce: bool,
        /// Accept lazy memory switches.
        lazy: bool,
        bus: Option<Arc<EventBus>>,
    }

    impl DeviceModel for Fake {
        fn name(&self) -> &str {
            "fake0"
        }
        fn pci(&mut self) -> &mut PciDevice {
            &mut self.pci
        }
        fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(0xee);
        }
        fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {
            assert!(!self.panic_on_write, "fake device bug");
        }
        fn set_memory(&mut self, mem: Arc<GuestMemory>) {
            let mut c = self.calls.lock().unwrap();
            c.regions = Some(mem.region_count());
            c.mem = Some(mem);
        }
        fn set_memory_lazy(&mut self, mem: &Arc<GuestMemory>) -> bool {
            if self.lazy {
                let mut c = self.calls.lock().unwrap();
                c.lazy += 1;
                c.regions = Some(mem.region_count());
                c.mem = Some(mem.clone());
            }
            self.lazy
        }
        fn quiesce(&mut self) -> Result<(), DeviceError> {
            self.calls.lock().unwrap().quiesces += 1;
            if self.fail_quiesce {
                return Err(DeviceError::QuiesceTimeout {
                    device: "fake0".into(),
                    millis: 1,
                });
            }
            Ok(())
        }
        fn resume(&mut self) {}
        fn reset(&mut self) {
            self.calls.lock().unwrap().resets += 1;
            self.panic_on_write = false;
        }
        fn stop(&mut self) {
            self.calls.lock().unwrap().stops += 1;
        }
        fn set_event_bus(&mut self, bus: Arc<EventBus>) {
            self.bus = Some(bus);
        }
    }

    fn fake() -> (VfioUserAdapter<Fake>, Arc<Mutex<Calls>>) {
        let pci = PciDeviceBuilder::new(PciIds {
            vendor_id: 0xe0de,
            device_id: 1,
            revision_id: 0,
            class_code: 0xff0000,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        })
        .interrupt_pin(1)
        .bar(0, BarDef::mem32(0x1000))
        .msix(MsixLayout {
            vectors: 2,
            table_bar: 0,
            table_offset: 0x800,
            pba_bar: 0,
            pba_offset: 0xc00,
        })
        .capability(Capability::pci_express(PcieCapConfig { flr: true }))
        .build()
        .unwrap();
        let calls = Arc::new(Mutex::new(Calls::default()));
        let dev = Fake {
            pci,
            calls: calls.clone(),
            panic_on_write: false,
            fail_quiesce: false,
            lazy: false,
            bus: None,
        };
        let mut a = VfioUserAdapter::new(dev);
        a.attach(DmaPort::new(Arc::new(NoPort)));
        (a, calls)
    }

    struct NoPort;
    impl DmaTransport for NoPort {
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DmaError> {
            Err(DmaError::Disconnected)
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), DmaError> {
            Err(DmaError::Disconnected)
        }
    }

    fn quiet_panics<R>(f: impl FnOnce() -> R) -> R {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = f();
        std::panic::set_hook(prev);
        r
    }

    fn fds(n: usize) -> (Vec<crate::pci::EventFd>, IrqData) {
        let evs: Vec<_> = (0..n).map(|_| new_eventfd().unwrap()).collect();
        let owned = evs
            .iter()
            .map(|e| Some(e.as_fd().try_clone_to_owned().unwrap()))
            .collect();
        (evs, IrqData::Eventfds(owned))
    }

    #[test]
    fn device_gets_the_event_bus_and_msix_table_is_routed_to_the_pci_model() {
        let (mut a, _) = fake();
        assert!(a.with_device(|d| d.bus.as_ref().is_some_and(|b| Arc::ptr_eq(b, a.events()))));
        // Table entry 1 data word: routed to the PCI model, not to bar_read (0xee).
        a.region_write(0, 0x800 + 16 + 8, &0x4321u32.to_le_bytes())
            .unwrap();
        let mut b = [0u8; 4];
        a.region_read(0, 0x800 + 16 + 8, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x4321);
        a.region_read(0, 0x10, &mut b).unwrap();
        assert_eq!(b, [0xee; 4]);
    }

    #[test]
    fn flr_resets_device_and_function() {
        let (mut a, calls) = fake();
        let ev = a.events().subscribe();
        let cap = a
            .with_device(|d| d.pci().find_capability(cap_id::PCI_EXPRESS))
            .unwrap();
        let devctl = u64::from(cap.offset) + 8;
        a.region_write(region_index::CONFIG, 0x04, &[0x06, 0])
            .unwrap();
        a.region_write(region_index::CONFIG, devctl, &0x8000u16.to_le_bytes())
            .unwrap();
        assert_eq!(calls.lock().unwrap().resets, 1);
        let mut cmd = [0u8; 2];
        a.region_read(region_index::CONFIG, 0x04, &mut cmd).unwrap();
        assert_eq!(cmd, [0, 0], "command register back to its reset value");
        assert!(ev.try_iter().any(|e| e == DeviceEvent::Reset));
    }

    #[test]
    fn panic_fails_the_device_signals_err_and_reset_recovers() {
        let (mut a, calls) = fake();
        let (err, data) = fds(1);
        a.set_irqs(irq_index::ERR, IrqAction::Trigger, 0, 1, data)
            .unwrap();
        a.with_device(|d| d.panic_on_write = true);
        let r = quiet_panics(|| a.region_write(0, 0, &[0; 4]));
        assert_eq!(r, Err(Errno::EIO));
        assert_eq!(a.state(), DeviceState::Failed);
        assert_eq!(drain_eventfd(err[0].as_fd()).unwrap(), 1, "ERR signalled");
        let mut b = [0u8; 4];
        assert_eq!(
            a.region_read(region_index::CONFIG, 0, &mut b),
            Err(Errno::EIO)
        );
        // IRQ teardown still works on a failed device.
        a.set_irqs(irq_index::ERR, IrqAction::Trigger, 0, 0, IrqData::None)
            .unwrap();
        a.reset().unwrap();
        assert_eq!(calls.lock().unwrap().resets, 1);
        assert_eq!(a.state(), DeviceState::Running);
        a.region_write(0, 0, &[0; 4]).unwrap();
    }

    #[test]
    fn quiesce_failure_still_swaps_memory_and_fails_the_device() {
        let (mut a, calls) = fake();
        let m = Arc::new(MmapRegion::new(0x1000).unwrap());
        let r = DmaRegion {
            iova: 0,
            size: 0x1000,
            prot: dma_flags::READ | dma_flags::WRITE,
            mapping: Some(m),
            map_offset: 0,
        };
        a.dma_map(std::slice::from_ref(&r), &r).unwrap();
        assert_eq!(calls.lock().unwrap().regions, Some(1));
        a.with_device(|d| d.fail_quiesce = true);
        assert_eq!(a.dma_unmap(&[], std::slice::from_ref(&r)), Err(Errno::EIO));
        assert_eq!(
            calls.lock().unwrap().regions,
            Some(0),
            "removed range dropped"
        );
        assert_eq!(a.state(), DeviceState::Failed);
        // Maps on a failed device are accepted (not rolled back) and tracked exactly.
        a.dma_map(std::slice::from_ref(&r), &r).unwrap();
        assert_eq!(calls.lock().unwrap().regions, Some(1));
        assert_eq!(a.state(), DeviceState::Failed);
    }

    /// Answers every message DMA with zeroes.
    struct ZeroPort;
    impl DmaTransport for ZeroPort {
        fn read(&self, _: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            buf.fill(0);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), DmaError> {
            Ok(())
        }
    }

    #[test]
    fn only_retiring_a_host_mapping_quiesces() {
        let (mut a, calls) = fake();
        a.with_device(|d| d.lazy = true);
        a.attach(DmaPort::new(Arc::new(ZeroPort)));
        let rw = dma_flags::READ | dma_flags::WRITE;
        let msg = DmaRegion {
            iova: 0x10_0000,
            size: 0x1000,
            prot: rw,
            mapping: None,
            map_offset: 0,
        };
        let mapped = DmaRegion {
            iova: 0,
            size: 0x1000,
            prot: rw,
            mapping: Some(Arc::new(MmapRegion::new(0x1000).unwrap())),
            map_offset: 0,
        };
        let both = [mapped.clone(), msg.clone()];
        let snap = |c: &Arc<Mutex<Calls>>| c.lock().unwrap().mem.clone().unwrap();
        let counts = |c: &Arc<Mutex<Calls>>| {
            let c = c.lock().unwrap();
            (c.lazy, c.quiesces, c.regions)
        };

        // Maps never quiesce, whatever their backing.
        a.dma_map(std::slice::from_ref(&msg), &msg).unwrap();
        let first = snap(&calls);
        a.dma_map(&both, &mapped).unwrap();
        assert_eq!(counts(&calls), (2, 0, Some(2)));
        // Removing a message-only range does not either, and the earlier snapshots' port
        // stays open: a worker still on them finishes its transfer.
        a.dma_unmap(std::slice::from_ref(&mapped), std::slice::from_ref(&msg))
            .unwrap();
        assert_eq!(counts(&calls), (3, 0, Some(1)));
        let mut b = [1u8; 4];
        first.read(msg.iova, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        // Retiring the host mapping quiesces, and closes the old port first.
        a.dma_map(&both, &msg).unwrap();
        let before = snap(&calls);
        a.dma_unmap(std::slice::from_ref(&msg), std::slice::from_ref(&mapped))
            .unwrap();
        assert_eq!(counts(&calls), (4, 1, Some(1)));
        assert_eq!(
            before.read(msg.iova, &mut b),
            Err(crate::MemError::Dma(DmaError::Disconnected))
        );
        snap(&calls).read(msg.iova, &mut b).unwrap();
        assert_eq!(a.state(), DeviceState::Running);

        // A device that cannot switch lazily is quiesced for every change.
        a.with_device(|d| d.lazy = false);
        a.dma_map(&both, &mapped).unwrap();
        assert_eq!(counts(&calls), (4, 2, Some(2)));
    }

    #[test]
    fn set_irqs_routing() {
        let (mut a, _) = fake();
        let msix = a.with_device(|d| d.pci().msix().cloned()).unwrap();
        let (evs, data) = fds(2);
        a.set_irqs(irq_index::MSIX, IrqAction::Trigger, 0, 2, data)
            .unwrap();
        // DATA_BOOL mask of vector 1 only.
        a.set_irqs(
            irq_index::MSIX,
            IrqAction::Mask,
            0,
            2,
            IrqData::Bool(vec![false, true]),
        )
        .unwrap();
        a.set_irqs(irq_index::MSIX, IrqAction::Trigger, 0, 2, IrqData::None)
            .unwrap();
        assert_eq!(drain_eventfd(evs[0].as_fd()).unwrap(), 1);
        assert_eq!(drain_eventfd(evs[1].as_fd()).unwrap(), 0);
        assert!(msix.is_pending(1).unwrap());
        a.set_irqs(irq_index::MSIX, IrqAction::Unmask, 1, 1, IrqData::None)
            .unwrap();
        assert_eq!(drain_eventfd(evs[1].as_fd()).unwrap(), 1);
        // A run of de-assigns (count > 0, no fds), then whole-index teardown.
        a.set_irqs(
            irq_index::MSIX,
            IrqAction::Trigger,
            1,
            1,
            IrqData::Eventfds(vec![None]),
        )
        .unwrap();
        assert!(!msix.has_vector_fd(1).unwrap());
        assert!(msix.has_vector_fd(0).unwrap());
        a.set_irqs(irq_index::MSIX, IrqAction::Trigger, 0, 0, IrqData::None)
            .unwrap();
        assert!(!msix.has_vector_fd(0).unwrap());
        // Eventfds only make sense for TRIGGER (and INTx UNMASK).
        let (_e, data) = fds(1);
        assert_eq!(
            a.set_irqs(irq_index::MSIX, IrqAction::Mask, 0, 1, data),
            Err(Errno::EINVAL)
        );
        let (_e, data) = fds(1);
        assert_eq!(
            a.set_irqs(irq_index::INTX, IrqAction::Mask, 0, 1, data),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            a.set_irqs(irq_index::MSI, IrqAction::Trigger, 0, 0, IrqData::None),
            Ok(())
        );
    }

    #[test]
    fn intx_resampler_eventfd_unmasks() {
        let (mut a, _) = fake();
        let intx = a.with_device(|d| d.pci().intx().clone());
        let (trig, data) = fds(1);
        a.set_irqs(irq_index::INTX, IrqAction::Trigger, 0, 1, data)
            .unwrap();
        let (res, data) = fds(1);
        a.set_irqs(irq_index::INTX, IrqAction::Unmask, 0, 1, data)
            .unwrap();
        intx.assert().unwrap();
        assert_eq!(drain_eventfd(trig[0].as_fd()).unwrap(), 1);
        assert!(intx.is_masked());
        // The guest's EOI: KVM signals the resample eventfd.
        nix::unistd::write(res[0].as_fd(), &1u64.to_ne_bytes()).unwrap();
        let n = crate::doorbell::wait_eventfd(trig[0].as_fd(), Duration::from_secs(5)).unwrap();
        assert_eq!(n, 1, "level still high: re-delivered after resample");
    }

    #[test]
    fn detach_stops_and_drops_client_state() {
        let (mut a, calls) = fake();
        let msix = a.with_device(|d| d.pci().msix().cloned()).unwrap();
        let (_evs, data) = fds(2);
        a.set_irqs(irq_index::MSIX, IrqAction::Trigger, 0, 2, data)
            .unwrap();
        a.with_device(|d| d.pci().config_mut().set_u16(0x04, 0x6).unwrap());
        a.detach();
        assert_eq!(a.state(), DeviceState::Stopped);
        let c = calls.lock().unwrap();
        assert_eq!((c.stops, c.regions), (1, Some(0)));
        assert!(!msix.has_vector_fd(0).unwrap());
        // Device state (config space) is kept for the next client.
        assert_eq!(a.with_device(|d| d.pci().command()), 0x6);
    }
}
