//! [`VirtioPciDevice`]: a modern virtio-pci function around a [`VirtioDeviceType`].
//!
//! The transport owns the PCI function (IDs, BARs, capabilities, MSI-X), the common
//! configuration, the ISR and the doorbells, and drives the device type's [`Engine`]:
//! DRIVER_OK -> `features_changed` + `queue_start` for every enabled queue (queues enabled
//! later start at enable time), queue_reset -> `queue_stop`, status 0 -> stop everything,
//! DMA map changes -> `memory_changed`. Engine calls are waited for (bounded), so the
//! register read that follows already sees the outcome, except lazy memory changes
//! ([`DeviceModel::set_memory_lazy`]), which must not wait.
//!
//! Doorbells are trapped writes to the notify window; each one rings the queue's [`Kick`]
//! eventfd the engine sleeps on. No region is mmappable, so QEMU posts these writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::device::{DeviceError, DeviceModel};
use emudev::events::{DeviceEvent, EventBus};
use emudev::pci::{
    cap_id, BarDef, Capability, ConfigSize, MsixLayout, PciDevice, PciDeviceBuilder, PciError,
    PciIds, PcieCapConfig, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS,
};
use emudev::GuestMemory;
use log::{debug, error, warn};

use super::common_cfg::{offset, status, CommonCfg, CommonCfgHooks};
use super::device_type::VirtioDeviceType;
use super::features::{VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};
use super::interrupt::{QueueNotifier, VirtioInterrupts};
use super::layout::{
    self, cfg_type, decode, BarRegion, MAX_QUEUES, MSIX_BAR, NOTIFY_OFF_MULTIPLIER, VIRTIO_BAR,
    VIRTIO_BAR_SIZE,
};
use super::pci_cfg::{PciCfgAccess, PciCfgCap};
use super::stats::{inc, QueueStats, TransportCounters, TransportStats};
use crate::engine::{Completion, Engine, EngineError, Kick};
use crate::queue::{QueueConfig, QueueError, MAX_QUEUE_SIZE};

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio PCI device ids are this plus the virtio device id.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Features the transport implements itself and always offers: modern interface and
/// per-queue reset (the common window covers `queue_reset`).
pub const TRANSPORT_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_RESET;
/// Default bound on waiting for the engine; below QEMU's 5 s message timeout.
pub const DEFAULT_ENGINE_TIMEOUT: Duration = Duration::from_secs(2);

/// Construction options of a [`VirtioPciDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioPciOptions {
    /// Present a PCI Express endpoint (4 KiB config space, PCIe capability with FLR)
    /// instead of a conventional PCI function.
    pub pcie: bool,
    /// Bound on waiting for engine operations.
    pub engine_timeout: Duration,
}

impl Default for VirtioPciOptions {
    fn default() -> Self {
        Self {
            pcie: false,
            engine_timeout: DEFAULT_ENGINE_TIMEOUT,
        }
    }
}

/// Errors building a [`VirtioPciDevice`].
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("{device}: {num} queues (1..={MAX_QUEUES} supported)")]
    QueueCount { device: String, num: usize },
    #[error("{device}: queue size {size} is not a power of two <= 32768")]
    QueueSize { device: String, size: u16 },
    #[error("{device}: device configuration of {len} bytes exceeds its 4 KiB window")]
    ConfigTooLarge { device: String, len: usize },
    #[error("{device}: virtio device id {id} out of range")]
    DeviceId { device: String, id: u16 },
    #[error("{device}: building the PCI function: {source}")]
    Pci {
        device: String,
        #[source]
        source: PciError,
    },
    #[error("{device}: the PCI-cfg access capability was not placed")]
    NoPciCfgCap { device: String },
    #[error("{device}: creating doorbell eventfds: {source}")]
    Kick {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{device}: engine setup: {source}")]
    Engine {
        device: String,
        #[source]
        source: EngineError,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Datapath state the common-config hooks act on (split from the registers for borrowing).
struct Runtime {
    name: String,
    engine: Box<dyn Engine>,
    irqs: Arc<VirtioInterrupts>,
    kicks: Vec<Kick>,
    started: Vec<bool>,
    /// DEVICE_NEEDS_RESET requested by the datapath (poller threads) or a failed start;
    /// folded into the status register on the control thread.
    needs_reset: Arc<AtomicBool>,
    /// Per queue: true from the start request until the stop request. A ring error from a
    /// queue instance that is being stopped (device or queue reset) belongs to the instance
    /// the driver reset and raises nothing.
    live: Arc<[AtomicBool]>,
    counters: Arc<TransportCounters>,
    timeout: Duration,
    /// Where queue start/stop events go (set by the transport adapter).
    events: Option<Arc<EventBus>>,
    /// A device reset whose queue stops still run on the engine.
    resetting: Option<PendingReset>,
}

/// A device reset in progress. The control thread does not wait for the engine's queue
/// stops (a poller may be blocked in a DMA message only the control thread routes);
/// instead `device_status` reads return `status` until they finish, and drivers poll it
/// until it reads 0 (virtio 1.2 §4.1.4.3.2; Linux `vp_reset`).
struct PendingReset {
    stops: Vec<(u16, Completion<crate::queue::QueueState>)>,
    status: u8,
    since: Instant,
}

/// Raise DEVICE_NEEDS_RESET once and send the configuration interrupt.
fn raise_needs_reset(flag: &AtomicBool, irqs: &VirtioInterrupts, counters: &TransportCounters) {
    if !flag.swap(true, Ordering::SeqCst) {
        inc(&counters.needs_reset);
        irqs.signal_config();
    }
}

impl Runtime {
    fn set_live(&self, index: u16, live: bool) {
        if let Some(l) = self.live.get(usize::from(index)) {
            l.store(live, Ordering::SeqCst);
        }
    }

    fn publish(&self, ev: DeviceEvent) {
        if let Some(bus) = &self.events {
            bus.publish(ev);
        }
    }

    fn wait<T>(&self, what: &str, c: Completion<T>) -> Result<T, EngineError> {
        let r = c.wait_timeout(self.timeout);
        match &r {
            Err(EngineError::Timeout) => {
                inc(&self.counters.engine_timeouts);
                error!(
                    "{}: engine {what} timed out after {:?}",
                    self.name, self.timeout
                );
            }
            Err(e) => warn!("{}: engine {what}: {e}", self.name),
            Ok(_) => {}
        }
        r
    }

    fn start_queue(&mut self, cfg: &CommonCfg, index: u16) {
        let i = usize::from(index);
        let (Some(q), Some(kick)) = (cfg.queue(index), self.kicks.get(i)) else {
            return;
        };
        if !q.enabled || self.started.get(i).copied().unwrap_or(true) {
            return;
        }
        let qc = QueueConfig {
            size: q.size,
            desc_addr: q.desc,
            driver_addr: q.driver,
            device_addr: q.device,
            packed: cfg.driver_features() & VIRTIO_F_RING_PACKED != 0,
        };
        // A stale doorbell from before the start must not count as a kick.
        kick.drain();
        self.set_live(index, true);
        let notifier = Arc::new(QueueNotifier::new(self.irqs.clone(), index));
        let c = self.engine.queue_start(index, qc, notifier, kick.clone());
        match self.wait("queue_start", c) {
            Ok(()) => {
                if let Some(s) = self.started.get_mut(i) {
                    *s = true;
                }
                if let Some(qc) = self.counters.queue(index) {
                    inc(&qc.starts);
                }
                self.publish(DeviceEvent::QueueReady { queue: index });
                // Buffers made available before the start are found by this kick.
                if let Some(k) = self.kicks.get(i) {
                    k.signal();
                }
            }
            Err(e) => {
                warn!("{}: queue {index} did not start: {e}", self.name);
                if let Some(qc) = self.counters.queue(index) {
                    inc(&qc.errors);
                }
                raise_needs_reset(&self.needs_reset, &self.irqs, &self.counters);
            }
        }
    }

    fn stop_queue(&mut self, index: u16) {
        let i = usize::from(index);
        if !self.started.get(i).copied().unwrap_or(false) {
            return;
        }
        self.set_live(index, false);
        let c = self.engine.queue_stop(index);
        if let Err(e) = self.wait("queue_stop", c) {
            error!("{}: queue {index} stop failed: {e}", self.name);
        }
        if let Some(s) = self.started.get_mut(i) {
            *s = false;
        }
        if let Some(qc) = self.counters.queue(index) {
            inc(&qc.stops);
        }
        self.publish(DeviceEvent::QueueStopped { queue: index });
    }

    /// Stop every started queue without waiting (device reset); the stops are tracked in
    /// `resetting` and finish in [`Runtime::reset_status`].
    fn stop_all_nowait(&mut self) {
        let mut stops = Vec::new();
        for i in 0..self.started.len() {
            if !self.started[i] {
                continue;
            }
            // Queue counts were bounded by MAX_QUEUES at construction.
            let index = i as u16;
            self.set_live(index, false);
            stops.push((index, self.engine.queue_stop(index)));
            self.started[i] = false;
            if let Some(qc) = self.counters.queue(index) {
                inc(&qc.stops);
            }
            self.publish(DeviceEvent::QueueStopped { queue: index });
        }
        if stops.is_empty() {
            return;
        }
        match &mut self.resetting {
            Some(p) => p.stops.extend(stops),
            None => {
                self.resetting = Some(PendingReset {
                    stops,
                    status: 0,
                    since: Instant::now(),
                })
            }
        }
    }

    /// While a device reset's queue stops are still running: the status the driver reads
    /// meanwhile. Gives up (logged, like a timed-out wait) after the engine timeout.
    fn reset_status(&mut self) -> Option<u8> {
        let p = self.resetting.as_mut()?;
        p.stops.retain(|(q, c)| match c.try_get() {
            None => true,
            Some(Ok(_)) => false,
            Some(Err(e)) => {
                warn!("{}: queue {q} stop failed: {e}", self.name);
                false
            }
        });
        if p.stops.is_empty() {
            self.resetting = None;
            return None;
        }
        if p.since.elapsed() > self.timeout {
            inc(&self.counters.engine_timeouts);
            error!(
                "{}: engine queue_stop of {} queue(s) timed out after {:?}; reset completes anyway",
                self.name,
                p.stops.len(),
                self.timeout
            );
            self.resetting = None;
            return None;
        }
        Some(p.status)
    }

    fn engine_memory(&mut self, mem: Arc<GuestMemory>) -> Completion {
        self.engine.memory_changed(mem)
    }

    fn stop_all(&mut self) {
        for i in 0..self.started.len() {
            // Queue counts were bounded by MAX_QUEUES at construction.
            self.stop_queue(i as u16);
        }
    }
}

impl Drop for Runtime {
    /// Release everything the engine keeps for this device (queues, and per-device state
    /// on shared poller threads, which otherwise outlives the device); not waited for.
    fn drop(&mut self) {
        drop(self.engine.destroy());
    }
}

/// [`CommonCfgHooks`] over the device type and the runtime.
struct Hooks<'a, T: VirtioDeviceType> {
    dev: &'a mut T,
    rt: &'a mut Runtime,
}

impl<T: VirtioDeviceType> CommonCfgHooks for Hooks<'_, T> {
    fn features_ok(&mut self, features: u64) -> bool {
        self.dev.features_ok(features)
    }

    fn driver_ok(&mut self, cfg: &CommonCfg) {
        let c = self.rt.engine.features_changed(cfg.driver_features());
        if self.rt.wait("features_changed", c).is_err() {
            raise_needs_reset(&self.rt.needs_reset, &self.rt.irqs, &self.rt.counters);
            return;
        }
        for index in 0..cfg.num_queues() {
            self.rt.start_queue(cfg, index);
        }
    }

    fn queue_enabled(&mut self, cfg: &CommonCfg, index: u16) {
        if cfg.driver_ok() {
            self.rt.start_queue(cfg, index);
        }
    }

    fn queue_reset(&mut self, index: u16) {
        self.rt.stop_queue(index);
    }

    fn device_reset(&mut self) {
        self.rt.stop_all_nowait();
        self.dev.reset();
        self.rt.irqs.reset();
        self.rt.needs_reset.store(false, Ordering::SeqCst);
        for k in &self.rt.kicks {
            k.drain();
        }
        inc(&self.rt.counters.resets);
    }
}

/// A modern virtio-pci function.
pub struct VirtioPciDevice<T: VirtioDeviceType> {
    name: String,
    dev: T,
    pci: PciDevice,
    common: CommonCfg,
    rt: Runtime,
    pci_cfg: PciCfgCap,
    quiesced: bool,
}

impl<T: VirtioDeviceType> std::fmt::Debug for VirtioPciDevice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("name", &self.name)
            .field("status", &self.common.status())
            .field("started", &self.rt.started)
            .field("quiesced", &self.quiesced)
            .finish_non_exhaustive()
    }
}

/// Size of the MSI-X BAR and the PBA offset for `vectors` vectors: table at 0, PBA at the
/// next 2 KiB boundary, BAR a power of two of at least 4 KiB.
fn msix_bar_layout(vectors: u16) -> (u64, u32) {
    let table = u64::from(vectors) * MSIX_ENTRY_SIZE as u64;
    let pba_off = table.div_ceil(0x800) * 0x800;
    let pba_len = u64::from(vectors).div_ceil(64) * 8;
    let size = (pba_off + pba_len).next_power_of_two().max(0x1000);
    // At most 2048 vectors: 32 KiB table; fits u32.
    (size, pba_off as u32)
}

impl<T: VirtioDeviceType> VirtioPciDevice<T> {
    /// Build the PCI function for `dev` with default options and create its engine.
    pub fn new(name: impl Into<String>, dev: T) -> Result<Self, VirtioPciError> {
        Self::with_options(name, dev, VirtioPciOptions::default())
    }

    /// Build the PCI function for `dev` and create its engine.
    pub fn with_options(
        name: impl Into<String>,
        mut dev: T,
        opts: VirtioPciOptions,
    ) -> Result<Self, VirtioPciError> {
        let name = name.into();
        let max_sizes = dev.queue_max_sizes();
        let nq = max_sizes.len();
        let num_queues = match u16::try_from(nq) {
            Ok(n) if (1..=MAX_QUEUES).contains(&n) => n,
            _ => {
                return Err(VirtioPciError::QueueCount {
                    device: name,
                    num: nq,
                })
            }
        };
        if let Some(&size) = max_sizes
            .iter()
            .find(|&&m| m != 0 && (!m.is_power_of_two() || m > MAX_QUEUE_SIZE))
        {
            return Err(VirtioPciError::QueueSize { device: name, size });
        }
        let cfg_len = dev.config_len();
        if cfg_len as u64 > layout::DEVICE_CFG_SIZE {
            return Err(VirtioPciError::ConfigTooLarge {
                device: name,
                len: cfg_len,
            });
        }
        let id = dev.device_id();
        let pci_device_id = VIRTIO_PCI_DEVICE_ID_BASE
            .checked_add(id)
            .filter(|d| *d <= 0x107f)
            .ok_or(VirtioPciError::DeviceId {
                device: name.clone(),
                id,
            })?;

        let vectors = (num_queues + 1).min(MSIX_MAX_VECTORS);
        let (msix_size, pba_offset) = msix_bar_layout(vectors);
        let pci_err = |source| VirtioPciError::Pci {
            device: name.clone(),
            source,
        };
        let mut builder = PciDeviceBuilder::new(PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: pci_device_id,
            revision_id: 1,
            class_code: dev.class_code() & 0x00ff_ffff,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            // OVMF refuses subsystem ids below 0x40 (transitional devices).
            subsystem_id: pci_device_id,
        })
        .interrupt_pin(1)
        .bar(usize::from(MSIX_BAR), BarDef::mem32(msix_size))
        .bar(
            usize::from(VIRTIO_BAR),
            BarDef::mem64(VIRTIO_BAR_SIZE).prefetchable(),
        );
        for cap in layout::virtio_caps(num_queues, cfg_len as u64) {
            let c = Capability::vendor_with_wmask(&cap.data, &cap.wmask)
                .map_err(|e| pci_err(PciError::Capability(e)))?;
            builder = builder.capability(c);
        }
        builder = builder
            .msix(MsixLayout {
                vectors,
                table_bar: MSIX_BAR,
                table_offset: 0,
                pba_bar: MSIX_BAR,
                pba_offset,
            })
            .capability(Capability::power_management());
        if opts.pcie {
            builder = builder
                .config_size(ConfigSize::Express)
                .capability(Capability::pci_express(PcieCapConfig { flr: true }));
        }
        let pci = builder.build().map_err(pci_err)?;
        let pci_cfg = pci
            .capabilities()
            .iter()
            .find(|c| {
                c.id == cap_id::VENDOR
                    && pci
                        .config()
                        .u8_at(usize::from(c.offset) + layout::cap_off::CFG_TYPE)
                        == cfg_type::PCI_CFG
            })
            .map(|c| PciCfgCap::new(c.offset))
            .ok_or_else(|| VirtioPciError::NoPciCfgCap {
                device: name.clone(),
            })?;

        let irqs = Arc::new(VirtioInterrupts::new(
            num_queues,
            pci.msix().cloned(),
            pci.intx().clone(),
        ));
        let kicks = (0..num_queues)
            .map(|_| Kick::new())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VirtioPciError::Kick {
                device: name.clone(),
                source,
            })?;
        let counters = Arc::new(TransportCounters::new(num_queues));
        let needs_reset = Arc::new(AtomicBool::new(false));
        let live: Arc<[AtomicBool]> = (0..num_queues).map(|_| AtomicBool::new(false)).collect();
        let mut engine = dev.create_engine()?;
        {
            let (flag, live, irqs, counters, n) = (
                needs_reset.clone(),
                live.clone(),
                irqs.clone(),
                counters.clone(),
                name.clone(),
            );
            engine.set_error_callback(Arc::new(move |q: u16, e: &QueueError| {
                if let Some(c) = counters.queue(q) {
                    inc(&c.errors);
                }
                if !live
                    .get(usize::from(q))
                    .is_some_and(|l| l.load(Ordering::SeqCst))
                {
                    debug!("{n}: queue {q} hit a ring error while stopping: {e}");
                    return;
                }
                warn!("{n}: queue {q} stopped on a ring error: {e}");
                raise_needs_reset(&flag, &irqs, &counters);
            }));
        }
        let mut rt = Runtime {
            name: name.clone(),
            engine,
            irqs,
            kicks,
            started: vec![false; usize::from(num_queues)],
            needs_reset,
            live,
            counters,
            timeout: opts.engine_timeout,
            events: None,
            resetting: None,
        };
        // The engine contract wants memory before the first queue start.
        let c = rt.engine_memory(Arc::new(GuestMemory::empty()));
        rt.wait("memory_changed", c)
            .map_err(|source| VirtioPciError::Engine {
                device: name.clone(),
                source,
            })?;
        let common = CommonCfg::new(dev.features() | TRANSPORT_FEATURES, &max_sizes, vectors);
        Ok(Self {
            name,
            dev,
            pci,
            common,
            rt,
            pci_cfg,
            quiesced: false,
        })
    }

    /// Bound on waiting for engine operations (default [`DEFAULT_ENGINE_TIMEOUT`]).
    pub fn set_engine_timeout(&mut self, timeout: Duration) {
        self.rt.timeout = timeout;
    }

    /// The device type.
    pub fn device(&self) -> &T {
        &self.dev
    }

    /// The device type, mutably (e.g. for attribute changes made outside `set_attr`; call
    /// [`VirtioPciDevice::config_changed`] afterwards if the configuration changed).
    pub fn device_mut(&mut self) -> &mut T {
        &mut self.dev
    }

    /// The common configuration registers.
    pub fn common_cfg(&self) -> &CommonCfg {
        &self.common
    }

    /// Interrupt state (ISR, vectors), shareable with other threads.
    pub fn interrupts(&self) -> &Arc<VirtioInterrupts> {
        &self.rt.irqs
    }

    /// The doorbell of queue `index`.
    pub fn kick(&self, index: u16) -> Option<&Kick> {
        self.rt.kicks.get(usize::from(index))
    }

    /// Whether queue `index` is running in the engine.
    pub fn queue_started(&self, index: u16) -> bool {
        self.rt
            .started
            .get(usize::from(index))
            .copied()
            .unwrap_or(false)
    }

    /// The device configuration changed on the device side: advance `config_generation` and
    /// interrupt the driver (once DRIVER_OK is set).
    pub fn config_changed(&mut self) {
        self.common.bump_generation();
        if self.common.driver_ok() {
            self.rt.irqs.signal_config();
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        let c = &self.rt.counters;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        TransportStats {
            bar_reads: ld(&c.bar_reads),
            bar_writes: ld(&c.bar_writes),
            resets: ld(&c.resets),
            needs_reset: ld(&c.needs_reset),
            engine_timeouts: ld(&c.engine_timeouts),
            config_interrupts: self.rt.irqs.config_irq_count(),
            status: self.common.status(),
            driver_features: self.common.driver_features(),
            queues: c
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| QueueStats {
                    kicks: ld(&q.kicks),
                    interrupts: self.rt.irqs.queue_irq_count(i as u16),
                    starts: ld(&q.starts),
                    stops: ld(&q.stops),
                    errors: ld(&q.errors),
                })
                .collect(),
        }
    }

    /// A reset just issued queue stops: until they finish, status reads show the status
    /// from before the reset (nonzero), so the driver keeps polling.
    fn note_reset_status(&mut self, before: u8) {
        if let Some(p) = &mut self.rt.resetting {
            if p.status == 0 {
                p.status = if before == 0 {
                    status::ACKNOWLEDGE
                } else {
                    before
                };
            }
        }
    }

    /// Fold a datapath DEVICE_NEEDS_RESET request into the status register.
    /// Never after a reset (status 0): a driver polling for 0 (Linux `vp_reset`) would
    /// wait forever.
    fn sync_needs_reset(&mut self) {
        if self.common.status() == 0 {
            self.rt.needs_reset.store(false, Ordering::SeqCst);
            return;
        }
        if self.rt.needs_reset.load(Ordering::SeqCst) {
            // The interrupt was sent by whoever raised the flag.
            let _ = self.common.set_needs_reset();
        }
    }

    /// Push the registers' vector assignments to the interrupt state.
    fn sync_vectors(&self) {
        self.rt
            .irqs
            .set_config_vector(self.common.config_msix_vector());
        for (i, q) in self.common.queues().iter().enumerate() {
            self.rt.irqs.set_queue_vector(i as u16, q.msix_vector);
        }
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let before = self.common.status();
        let mut hooks = Hooks {
            dev: &mut self.dev,
            rt: &mut self.rt,
        };
        self.common.write(off, data, &mut hooks);
        self.note_reset_status(before);
        if matches!(
            off,
            offset::CONFIG_MSIX_VECTOR
                | offset::QUEUE_MSIX_VECTOR
                | offset::QUEUE_RESET
                | offset::DEVICE_STATUS
        ) {
            self.sync_vectors();
        }
        self.sync_needs_reset();
    }

    fn device_cfg_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let len = self.dev.config_len() as u64;
        if off >= len {
            return;
        }
        // Read the part inside the structure; the rest stays zero.
        let inside = (len - off).min(data.len() as u64) as usize;
        if let Some(d) = data.get_mut(..inside) {
            self.dev.read_config(off, d);
        }
    }

    fn device_cfg_write(&mut self, off: u64, data: &[u8]) {
        let fits = off
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.dev.config_len() as u64);
        if !fits {
            debug!("{}: device config write at {off:#x} outside", self.name);
            return;
        }
        if self.dev.write_config(off, data) {
            self.common.bump_generation();
        }
    }

    fn notify_write(&mut self, off: u64, data: &[u8]) {
        if off % u64::from(NOTIFY_OFF_MULTIPLIER) != 0 || data.is_empty() || data.len() > 4 {
            debug!(
                "{}: notify write at {off:#x} len {} ignored",
                self.name,
                data.len()
            );
            return;
        }
        let Ok(index) = u16::try_from(off / u64::from(NOTIFY_OFF_MULTIPLIER)) else {
            return;
        };
        if self.queue_started(index) {
            if let Some(k) = self.rt.kicks.get(usize::from(index)) {
                k.signal();
            }
            if let Some(c) = self.rt.counters.queue(index) {
                inc(&c.kicks);
            }
        }
    }

    /// Read of the virtio BAR.
    fn virtio_bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((region, rel)) = decode(offset, data.len()) else {
            debug!(
                "{}: BAR read at {offset:#x} len {} ignored",
                self.name,
                data.len()
            );
            return;
        };
        match region {
            BarRegion::Common => {
                let covers_status =
                    rel <= offset::DEVICE_STATUS && rel + data.len() as u64 > offset::DEVICE_STATUS;
                if covers_status {
                    self.sync_needs_reset();
                }
                self.common.read(rel, data);
                if covers_status {
                    if let Some(st) = self.rt.reset_status() {
                        if let Some(b) = usize::try_from(offset::DEVICE_STATUS - rel)
                            .ok()
                            .and_then(|i| data.get_mut(i))
                        {
                            *b = st;
                        }
                    }
                }
            }
            BarRegion::Isr => {
                if rel == 0 {
                    if let Some(b) = data.first_mut() {
                        *b = self.rt.irqs.read_isr();
                    }
                }
            }
            BarRegion::DeviceCfg => self.device_cfg_read(rel, data),
            BarRegion::Notify => {}
        }
    }

    /// Write of the virtio BAR.
    fn virtio_bar_write(&mut self, offset: u64, data: &[u8]) {
        let Some((region, rel)) = decode(offset, data.len()) else {
            debug!(
                "{}: BAR write at {offset:#x} len {} ignored",
                self.name,
                data.len()
            );
            return;
        };
        match region {
            BarRegion::Common => self.common_write(rel, data),
            BarRegion::Isr => {}
            BarRegion::DeviceCfg => self.device_cfg_write(rel, data),
            BarRegion::Notify => self.notify_write(rel, data),
        }
    }

    /// A BAR access from the PCI-cfg window: the virtio BAR, or the MSI-X table/PBA.
    fn window_read(&mut self, a: PciCfgAccess, data: &mut [u8]) {
        if a.bar == VIRTIO_BAR {
            self.virtio_bar_read(a.offset, data);
        } else if let Some(r) = self.pci.msix_bar_read(a.bar, a.offset, data) {
            if let Err(e) = r {
                debug!("{}: PCI-cfg MSI-X read: {e}", self.name);
            }
        } else {
            data.fill(0);
        }
    }

    fn window_write(&mut self, a: PciCfgAccess, data: &[u8]) {
        if a.bar == VIRTIO_BAR {
            self.virtio_bar_write(a.offset, data);
        } else if let Some(Err(e)) = self.pci.msix_bar_write(a.bar, a.offset, data) {
            debug!("{}: PCI-cfg MSI-X write: {e}", self.name);
        }
    }
}

impl<T: VirtioDeviceType> DeviceModel for VirtioPciDevice<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn pci(&mut self) -> &mut PciDevice {
        &mut self.pci
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        inc(&self.rt.counters.bar_reads);
        if bar == VIRTIO_BAR {
            self.virtio_bar_read(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        inc(&self.rt.counters.bar_writes);
        if bar == VIRTIO_BAR {
            self.virtio_bar_write(offset, data);
        }
    }

    fn config_written(&mut self, offset: u64, len: usize) {
        if !self.pci_cfg.touches_data(offset, len) {
            return;
        }
        let Some(a) = self.pci_cfg.access(self.pci.config()) else {
            debug!("{}: PCI-cfg window write with an invalid window", self.name);
            return;
        };
        let buf = self.pci_cfg.data(self.pci.config(), a.len);
        if let Some(d) = buf.get(..a.len) {
            self.window_write(a, d);
        }
    }

    fn config_reading(&mut self, offset: u64, len: usize) {
        if !self.pci_cfg.touches_data(offset, len) {
            return;
        }
        let Some(a) = self.pci_cfg.access(self.pci.config()) else {
            return;
        };
        let mut buf = [0u8; 4];
        if let Some(d) = buf.get_mut(..a.len) {
            self.window_read(a, d);
        }
        let at = self.pci_cfg.data_offset();
        if let Err(e) = self.pci.config_mut().set_bytes(at, &buf[..a.len.min(4)]) {
            debug!("{}: PCI-cfg window store: {e}", self.name);
        }
    }

    fn set_memory(&mut self, mem: Arc<GuestMemory>) {
        let c = self.rt.engine_memory(mem);
        if self.rt.wait("memory_changed", c).is_err() && self.common.driver_ok() {
            raise_needs_reset(&self.rt.needs_reset, &self.rt.irqs, &self.rt.counters);
        }
    }

    /// Hand the snapshot to the engine without waiting: its queues adopt it at their next
    /// burst boundary. Waiting here could deadlock: a poller may be blocked in a DMA
    /// message that only the (waiting) control thread routes.
    fn set_memory_lazy(&mut self, mem: &Arc<GuestMemory>) -> bool {
        // The completion only reports when the old snapshot is released; nobody needs that.
        drop(self.rt.engine_memory(mem.clone()));
        true
    }

    /// Pause the engine: no new requests are popped and none is in flight when this
    /// returns. (`set_memory` additionally waits for the memory switch itself.)
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        if self.quiesced {
            return Ok(());
        }
        let c = self.rt.engine.pause();
        match self.rt.wait("pause", c) {
            Ok(()) => {
                self.quiesced = true;
                Ok(())
            }
            Err(EngineError::Timeout) => Err(DeviceError::QuiesceTimeout {
                device: self.name.clone(),
                millis: u64::try_from(self.rt.timeout.as_millis()).unwrap_or(u64::MAX),
            }),
            Err(e) => Err(DeviceError::Failed {
                device: self.name.clone(),
                reason: format!("engine pause: {e}"),
            }),
        }
    }

    fn resume(&mut self) {
        if !self.quiesced {
            return;
        }
        self.quiesced = false;
        let c = self.rt.engine.resume();
        if self.rt.wait("resume", c).is_err() && self.common.driver_ok() {
            raise_needs_reset(&self.rt.needs_reset, &self.rt.irqs, &self.rt.counters);
        }
    }

    fn reset(&mut self) {
        let before = self.common.status();
        let mut hooks = Hooks {
            dev: &mut self.dev,
            rt: &mut self.rt,
        };
        hooks.device_reset();
        self.note_reset_status(before);
        self.common.reset();
        // Nothing runs after a reset; a pause would only block the next start.
        self.resume();
        // The transport resets the PCI function (config space, MSI-X, INTx) after this.
        self.sync_vectors();
    }

    /// Stop every queue; the registers stay (the next client's guest driver resets the
    /// device). A pause is lifted since nothing runs any more.
    fn stop(&mut self) {
        self.rt.stop_all();
        self.resume();
    }

    fn set_event_bus(&mut self, bus: Arc<EventBus>) {
        self.rt.events = Some(bus);
    }

    fn attr(&self, key: &str) -> Option<String> {
        match key {
            "status" => Some(format!("{:#04x}", self.common.status())),
            "driver_features" => Some(format!("{:#x}", self.common.driver_features())),
            _ => self.dev.attr(key),
        }
    }

    fn set_attr(&mut self, key: &str, value: &str) -> Result<(), DeviceError> {
        if self.dev.set_attr(key, value)? {
            self.config_changed();
        }
        Ok(())
    }
}
