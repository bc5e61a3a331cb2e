//! The AVF NIC as an emudev [`DeviceModel`]: PCI identity 8086:1889, BAR0 register file,
//! BAR3 MSI-X, the admin-queue worker, and the datapath task on an emudev poller pool.

use std::sync::Arc;
use std::thread::JoinHandle;

use emudev::pci::{
    BarDef, Capability, ConfigSize, MsixLayout, PciDevice, PciDeviceBuilder, PciError, PciIds,
    PcieCapConfig,
};
use emudev::poller::{PollConfig, PollerError, PollerPool, TaskHandle};
use emudev::{DeviceError, DeviceModel, GuestMemory};

use emudev_netback::{NetBackend, Offloads};

use crate::adminq::{self, AdminMode, Shared};
use crate::datapath::Poller;
use crate::irq::Irqs;
use crate::pf::{VfConfig, VfState};
use crate::regs;

/// PCI identity (§1.1).
pub const VENDOR_ID: u16 = 0x8086;
pub const DEVICE_ID: u16 = 0x1889;
pub const REVISION_ID: u8 = 0x01;
/// Network controller, Ethernet.
pub const CLASS_CODE: u32 = 0x02_00_00;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x8086;
pub const SUBSYSTEM_ID: u16 = 0x0000;

/// Errors building the device.
#[derive(Debug, thiserror::Error)]
pub enum AvfError {
    #[error("{device}: PCI model: {source}")]
    Pci { device: String, source: PciError },
    #[error("{device}: admin-queue worker thread: {source}")]
    Thread {
        device: String,
        source: std::io::Error,
    },
    #[error("{device}: datapath poller: {source}")]
    Poller { device: String, source: PollerError },
}

/// The emulated AVF VF.
pub struct AvfDevice {
    name: String,
    pci: PciDevice,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    /// The datapath task; removed (blocking) before the rest is torn down.
    datapath: Option<TaskHandle>,
}

impl std::fmt::Debug for AvfDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvfDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AvfDevice {
    /// Build the device: `cfg.queue_pairs` (clamped to 1..=16 and to what the backend
    /// carries) queue pairs, one MSI-X vector each plus the mailbox vector. Without a
    /// backend, TX frames are completed and dropped and nothing is received.
    ///
    /// The datapath runs on a private one-thread pool (thread `<name>-dp`), so a pass that
    /// waits on DMA messages stalls no other device. Use [`AvfDevice::with_poller`] to
    /// share a pool between devices.
    pub fn new(
        name: &str,
        cfg: VfConfig,
        backend: Option<Arc<dyn NetBackend>>,
    ) -> Result<Self, AvfError> {
        let pool = PollerPool::named(&format!("{name}-dp"), 1, PollConfig::default()).map_err(
            |source| AvfError::Poller {
                device: name.to_string(),
                source,
            },
        )?;
        Self::with_poller(name, cfg, backend, pool)
    }

    /// Like [`AvfDevice::new`], with the datapath as a task on `pool` (shared with other
    /// devices; a task must not block, so memory should be mapped, not reached by messages).
    pub fn with_poller(
        name: &str,
        cfg: VfConfig,
        backend: Option<Arc<dyn NetBackend>>,
        pool: Arc<PollerPool>,
    ) -> Result<Self, AvfError> {
        Self::build(name, cfg, backend, pool, AdminMode::Worker)
    }

    /// Like [`AvfDevice::with_poller`], with admin-queue passes run synchronously on the
    /// thread that writes the doorbell ([`AdminMode::Inline`]): no worker thread and no
    /// cross-thread round trip per message. For single-threaded harnesses (the
    /// `avf_device` fuzz target) whose guest memory is fully mapped; not for vfio-user
    /// clients that reach memory by DMA messages.
    pub fn new_inline(
        name: &str,
        cfg: VfConfig,
        backend: Option<Arc<dyn NetBackend>>,
        pool: Arc<PollerPool>,
    ) -> Result<Self, AvfError> {
        Self::build(name, cfg, backend, pool, AdminMode::Inline)
    }

    fn build(
        name: &str,
        cfg: VfConfig,
        backend: Option<Arc<dyn NetBackend>>,
        pool: Arc<PollerPool>,
        mode: AdminMode,
    ) -> Result<Self, AvfError> {
        let mut cfg = cfg;
        if let Some(b) = &backend {
            cfg.queue_pairs = cfg.queue_pairs.min(b.max_queue_pairs().max(1));
            b.set_mac(cfg.mac);
            // We write finished frames into RX buffers: no partial checksums or GSO.
            if let Err(e) = b.set_rx_offloads(Offloads::empty()) {
                log::warn!("{name}: backend RX offloads: {e}");
            }
        }
        let vf = VfState::new(cfg);
        let pairs = vf.cfg.queue_pairs;
        if let Some(b) = &backend {
            if let Err(e) = b.set_active_pairs(pairs) {
                log::warn!("{name}: backend queue pairs: {e}");
            }
        }
        let vectors = vf.max_vectors();
        let pci_err = |source| AvfError::Pci {
            device: name.to_string(),
            source,
        };
        let pci = PciDeviceBuilder::new(PciIds {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            revision_id: REVISION_ID,
            class_code: CLASS_CODE,
            subsystem_vendor_id: SUBSYSTEM_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
        })
        .config_size(ConfigSize::Express)
        .bar(
            usize::from(regs::REGS_BAR),
            BarDef::mem64(regs::BAR0_SIZE).prefetchable(),
        )
        .bar(
            usize::from(regs::MSIX_BAR),
            BarDef::mem64(regs::BAR3_SIZE).prefetchable(),
        )
        .capability(Capability::pci_express(PcieCapConfig { flr: true }))
        .msix(MsixLayout {
            vectors,
            table_bar: regs::MSIX_BAR,
            table_offset: regs::MSIX_TABLE_OFFSET,
            pba_bar: regs::MSIX_BAR,
            pba_offset: regs::MSIX_PBA_OFFSET,
        })
        .build()
        .map_err(pci_err)?;
        let irqs = Irqs::new(pci.msix().cloned(), vectors);
        let thread_err = |source| AvfError::Thread {
            device: name.to_string(),
            source,
        };
        let shared = Arc::new(Shared::with_mode(vf, irqs, mode).map_err(thread_err)?);
        let worker = match mode {
            AdminMode::Worker => {
                let w = shared.clone();
                let t = std::thread::Builder::new()
                    .name(format!("{name}-aq"))
                    .spawn(move || adminq::worker_loop(&w))
                    .map_err(thread_err)?;
                Some(t)
            }
            AdminMode::Inline => None,
        };
        let mut dev = Self {
            name: name.to_string(),
            pci,
            shared: shared.clone(),
            worker,
            datapath: None,
        };
        let dp = Poller::new(shared, backend, pairs);
        // On error `dev` drops here and stops the worker.
        let task = pool
            .add(name, Box::new(dp))
            .map_err(|source| AvfError::Poller {
                device: name.to_string(),
                source,
            })?;
        dev.datapath = Some(task);
        Ok(dev)
    }

    /// A copy of the virtchnl state (for tests and diagnostics).
    pub fn vf_state(&self) -> VfState {
        self.shared.core().vf.clone()
    }

    /// ARQ messages waiting for a free ARQ slot.
    pub fn outbox_len(&self) -> usize {
        self.shared.core().outbox.len()
    }

    /// MSI-X triggers issued by the interrupt model.
    pub fn interrupts_fired(&self) -> u64 {
        self.shared.irqs.fired()
    }

    fn reg_read(&self, off: u64) -> u32 {
        match off {
            regs::VFINT_ICR01 => self.shared.regs.take(off),
            regs::VFINT_ICR0_ENA1 => self.shared.irqs.icr0_ena(),
            regs::VF_ATQH | regs::VF_ARQH => {
                // The driver's completion checks: let the worker catch up with doorbells.
                self.shared.settle();
                self.shared.regs.get(off)
            }
            _ => self.shared.regs.get(off),
        }
    }

    fn reg_write(&self, off: u64, v: u32) {
        let r = &self.shared.regs;
        match off {
            regs::VFGEN_RSTAT | regs::VFINT_ICR01 => {}
            regs::HKEY_STRAY | regs::HLUT_STRAY => {}
            regs::VFINT_ICR0_ENA1 => {
                r.set(off, v);
                self.shared.irqs.set_icr0_ena(v);
            }
            regs::VF_ATQT | regs::VF_ARQT => {
                r.set(off, v & regs::AQ_PTR_MASK);
                self.shared.kick();
            }
            regs::VF_ATQH | regs::VF_ARQH => r.set(off, v & regs::AQ_PTR_MASK),
            regs::VF_ATQLEN | regs::VF_ARQLEN => {
                let old = r.get(off);
                r.set(off, v);
                self.shared.aq_len_written(off, old, v);
            }
            _ => {
                r.set(off, v);
                if let Some(vector) = regs::dyn_ctl_vector(off) {
                    self.shared.irqs.dyn_ctl(vector, v);
                } else if regs::tx_tail_queue(off).is_some() || regs::rx_tail_queue(off).is_some() {
                    // Latched here; wake the poller so it does not wait out its idle sleep
                    // (that made every TX doorbell after an idle spell cost up to 20 ms).
                    self.shared.kick_datapath();
                }
            }
        }
    }
}

impl Drop for AvfDevice {
    fn drop(&mut self) {
        self.shared.shutdown();
        // Blocks until the pool thread dropped the task: no datapath DMA after this.
        if let Some(t) = self.datapath.take() {
            t.remove();
        }
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
    }
}

impl DeviceModel for AvfDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn pci(&mut self) -> &mut PciDevice {
        &mut self.pci
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != regs::REGS_BAR {
            data.fill(0);
            return;
        }
        // Bytes come from the covering 32-bit registers; ICR01 clears only on a read that
        // starts at it.
        let mut cached: Option<(u64, u32)> = None;
        for (i, b) in data.iter_mut().enumerate() {
            let Some(a) = offset.checked_add(i as u64) else {
                *b = 0;
                continue;
            };
            let reg = a & !3;
            let v = match cached {
                Some((r, v)) if r == reg => v,
                _ => {
                    let v = self.reg_read(reg);
                    cached = Some((reg, v));
                    v
                }
            };
            *b = v.to_le_bytes()[(a & 3) as usize];
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != regs::REGS_BAR {
            return;
        }
        if offset % 4 != 0 || !matches!(data.len(), 4 | 8) {
            log::debug!(
                "{}: dropped {}-byte BAR0 write at {offset:#x}",
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

    fn set_memory(&mut self, mem: Arc<GuestMemory>) {
        self.shared.set_memory(mem);
        self.shared.kick_datapath();
    }

    fn set_memory_lazy(&mut self, mem: &Arc<GuestMemory>) -> bool {
        // The worker takes the snapshot at the start of each pass.
        self.shared.set_memory(mem.clone());
        self.shared.kick_datapath();
        true
    }

    fn quiesce(&mut self) -> Result<(), DeviceError> {
        if self.shared.quiesce() {
            Ok(())
        } else {
            Err(DeviceError::QuiesceTimeout {
                device: self.name.clone(),
                millis: adminq::QUIESCE_TIMEOUT.as_millis() as u64,
            })
        }
    }

    fn resume(&mut self) {
        self.shared.resume();
        self.shared.kick();
        // The datapath sleeps without a timeout; let it look at the rings again.
        self.shared.kick_datapath();
    }

    fn stop(&mut self) {
        // Wait for a pass in flight, then let the next client's driver use the AQ again.
        if !self.shared.quiesce() {
            log::warn!("{}: admin-queue pass did not finish on detach", self.name);
        }
        self.shared.resume();
        self.shared.kick_datapath();
    }

    fn reset(&mut self) {
        let mut core = self.shared.core();
        self.shared.vf_reset(&mut core, true);
        drop(core);
        // Wait out a datapath pass that still saw the old queues (bounded; skipped when
        // memory is reached by messages).
        if !self.shared.quiesce() {
            log::warn!("{}: datapath did not stop for reset", self.name);
        }
        self.shared.resume();
        self.shared.kick_datapath();
    }

    fn attr(&self, key: &str) -> Option<String> {
        let core = self.shared.core();
        match key {
            "link" => Some(if core.vf.link_up { "up" } else { "down" }.to_string()),
            "mac" => {
                let m = core.vf.cfg.mac;
                Some(format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ))
            }
            "caps" => Some(format!("{:#x}", core.vf.caps)),
            "rx_filtered" => Some(core.rx_filtered.to_string()),
            _ => None,
        }
    }

    fn set_attr(&mut self, key: &str, value: &str) -> Result<(), DeviceError> {
        match key {
            "link" => {
                let up = match value {
                    "up" => true,
                    "down" => false,
                    _ => {
                        return Err(DeviceError::InvalidAttribute {
                            device: self.name.clone(),
                            key: key.to_string(),
                            reason: format!("{value:?} is not up/down"),
                        })
                    }
                };
                let mut core = self.shared.core();
                if core.vf.link_up != up {
                    core.vf.link_up = up;
                    if core.vf.any_queue_enabled() {
                        let ev = core.vf.link_event();
                        core.outbox.push_back(ev);
                    }
                }
                drop(core);
                self.shared.kick();
                Ok(())
            }
            _ => Err(DeviceError::UnknownAttribute {
                device: self.name.clone(),
                key: key.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[test]
    fn devices_share_a_pool_and_drop_removes_their_task() {
        let pool = PollerPool::new(1, PollConfig::default()).unwrap();
        let a = AvfDevice::with_poller("a", VfConfig::default(), None, pool.clone()).unwrap();
        let b = AvfDevice::with_poller("b", VfConfig::default(), None, pool.clone()).unwrap();
        assert_eq!(pool.task_count(), 2);
        drop(a);
        assert_eq!(pool.task_count(), 1, "drop returns after the task is gone");
        // Idle devices: the shared thread sleeps instead of polling.
        std::thread::sleep(Duration::from_millis(30));
        let st = pool.thread_stats(0).unwrap();
        let it = st.iterations.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        let busy = st.iterations.load(Ordering::Relaxed) - it;
        assert!(busy <= 2, "{busy} iterations while idle");
        // A tail doorbell wakes it.
        let mut b = b;
        b.bar_write(regs::REGS_BAR, regs::QTX_TAIL, &1u32.to_le_bytes());
        let t0 = std::time::Instant::now();
        while st.iterations.load(Ordering::Relaxed) == it + busy && t0.elapsed().as_secs() < 5 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(st.iterations.load(Ordering::Relaxed) > it + busy);
        drop(b);
        assert_eq!(pool.task_count(), 0);
    }
}
