//! Transport tests with a mock device type and a mock engine: PCI identity, the capability
//! chain as a driver walks it, driver bring-up, resets, doorbells, interrupts and the
//! PCI-cfg window.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use emudev::device::{DeviceError, DeviceModel};
use emudev::pci::{cap_id, walk_capabilities};
use emudev::GuestMemory;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::common_cfg::{offset as co, status};
use super::features::{VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};
use super::layout::{self, cfg_type, MSIX_BAR, VIRTIO_BAR};
use super::*;
use crate::engine::{Completion, Engine, EngineError, Kick, Notifier, QueueErrorCallback};
use crate::queue::{QueueConfig, QueueError, QueueState};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Features(u64),
    Memory(usize),
    Start(u16, QueueConfig),
    Stop(u16),
    Pause,
    Resume,
    Destroy,
}

#[derive(Default)]
struct Shared {
    events: Vec<Ev>,
    notifiers: Vec<(u16, Arc<dyn Notifier>)>,
    kicks: Vec<(u16, Kick)>,
    error_cb: Option<QueueErrorCallback>,
    fail_start: bool,
}

struct MockEngine(Arc<Mutex<Shared>>);

impl Engine for MockEngine {
    fn features_changed(&mut self, features: u64) -> Completion {
        self.0.lock().unwrap().events.push(Ev::Features(features));
        Completion::ready(Ok(()))
    }
    fn memory_changed(&mut self, mem: Arc<GuestMemory>) -> Completion {
        self.0
            .lock()
            .unwrap()
            .events
            .push(Ev::Memory(mem.region_count()));
        Completion::ready(Ok(()))
    }
    fn queue_start(
        &mut self,
        qidx: u16,
        cfg: QueueConfig,
        notifier: Arc<dyn Notifier>,
        kick: Kick,
    ) -> Completion {
        let mut s = self.0.lock().unwrap();
        if s.fail_start {
            return Completion::ready(Err(EngineError::Queue {
                qidx,
                err: QueueError::BadSize(cfg.size),
            }));
        }
        s.events.push(Ev::Start(qidx, cfg));
        s.notifiers.push((qidx, notifier));
        s.kicks.push((qidx, kick));
        Completion::ready(Ok(()))
    }
    fn queue_stop(&mut self, qidx: u16) -> Completion<QueueState> {
        self.0.lock().unwrap().events.push(Ev::Stop(qidx));
        Completion::ready(Ok(QueueState::default()))
    }
    fn kick(&mut self, _qidx: u16) {}
    fn set_error_callback(&mut self, cb: QueueErrorCallback) {
        self.0.lock().unwrap().error_cb = Some(cb);
    }
    fn destroy(&mut self) -> Completion {
        self.0.lock().unwrap().events.push(Ev::Destroy);
        Completion::ready(Ok(()))
    }
    fn pause(&mut self) -> Completion {
        self.0.lock().unwrap().events.push(Ev::Pause);
        Completion::ready(Ok(()))
    }
    fn resume(&mut self) -> Completion {
        self.0.lock().unwrap().events.push(Ev::Resume);
        Completion::ready(Ok(()))
    }
}

/// A block-like device: 8-byte capacity (read-only) + 4-byte writable word.
struct MockDev {
    shared: Arc<Mutex<Shared>>,
    config: [u8; 12],
    refuse: u64,
    resets: usize,
    sizes: Vec<u16>,
}

const DEV_FEATURES: u64 = (1 << 9) | (1 << 1) | VIRTIO_F_RING_RESET;

impl VirtioDeviceType for MockDev {
    fn device_id(&self) -> u16 {
        2
    }
    fn class_code(&self) -> u32 {
        0x01_8000
    }
    fn features(&self) -> u64 {
        DEV_FEATURES
    }
    fn features_ok(&mut self, features: u64) -> bool {
        features & self.refuse == 0
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.sizes.clone()
    }
    fn config_len(&self) -> usize {
        self.config.len()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let o = offset as usize;
        data.copy_from_slice(&self.config[o..o + data.len()]);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        let o = offset as usize;
        if o < 8 {
            return false;
        }
        self.config[o..o + data.len()].copy_from_slice(data);
        true
    }
    fn create_engine(&mut self) -> Result<Box<dyn Engine>, DeviceError> {
        Ok(Box::new(MockEngine(self.shared.clone())))
    }
    fn reset(&mut self) {
        self.resets += 1;
    }
    fn set_attr(&mut self, key: &str, value: &str) -> Result<bool, DeviceError> {
        if key != "capacity" {
            return Err(DeviceError::UnknownAttribute {
                device: "mock".into(),
                key: key.into(),
            });
        }
        let v: u64 = value.parse().map_err(|_| DeviceError::InvalidAttribute {
            device: "mock".into(),
            key: key.into(),
            reason: "not a number".into(),
        })?;
        self.config[..8].copy_from_slice(&v.to_le_bytes());
        Ok(true)
    }
}

fn mock_dev(shared: &Arc<Mutex<Shared>>, sizes: &[u16]) -> MockDev {
    let mut config = [0u8; 12];
    config[..8].copy_from_slice(&0x1000u64.to_le_bytes());
    MockDev {
        shared: shared.clone(),
        config,
        refuse: 0,
        resets: 0,
        sizes: sizes.to_vec(),
    }
}

fn device() -> (VirtioPciDevice<MockDev>, Arc<Mutex<Shared>>) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let d = VirtioPciDevice::new("vblk-test", mock_dev(&shared, &[256, 128])).unwrap();
    // The engine gets (empty) memory before anything else.
    assert_eq!(events(&shared), vec![Ev::Memory(0)]);
    (d, shared)
}

fn events(s: &Arc<Mutex<Shared>>) -> Vec<Ev> {
    std::mem::take(&mut s.lock().unwrap().events)
}

fn rd(d: &mut VirtioPciDevice<MockDev>, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(VIRTIO_BAR, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wr(d: &mut VirtioPciDevice<MockDev>, off: u64, len: usize, v: u64) {
    d.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
}

fn cfg_rd(d: &mut VirtioPciDevice<MockDev>, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.config_reading(off, len);
    d.pci().config_read(off, &mut b[..len]).unwrap();
    u64::from_le_bytes(b)
}

fn cfg_wr(d: &mut VirtioPciDevice<MockDev>, off: u64, len: usize, v: u64) {
    d.pci().config_write(off, &v.to_le_bytes()[..len]).unwrap();
    d.config_written(off, len);
}

/// Driver bring-up as Linux does it, with queue 0 (size 64) and queue 1 (max size) enabled
/// and vectors 1 and 2. Returns the status read back.
fn bring_up(d: &mut VirtioPciDevice<MockDev>, features: u64) -> u8 {
    wr(d, co::DEVICE_STATUS, 1, 0);
    assert_eq!(rd(d, co::DEVICE_STATUS, 1), 0);
    wr(d, co::DEVICE_STATUS, 1, 3);
    wr(d, co::DRIVER_FEATURE_SELECT, 4, 0);
    wr(d, co::DRIVER_FEATURE, 4, features & 0xffff_ffff);
    wr(d, co::DRIVER_FEATURE_SELECT, 4, 1);
    wr(d, co::DRIVER_FEATURE, 4, features >> 32);
    wr(d, co::DEVICE_STATUS, 1, 0xb);
    if rd(d, co::DEVICE_STATUS, 1) & 8 == 0 {
        return rd(d, co::DEVICE_STATUS, 1) as u8;
    }
    wr(d, co::CONFIG_MSIX_VECTOR, 2, 0);
    for q in 0..2u64 {
        wr(d, co::QUEUE_SELECT, 2, q);
        if q == 0 {
            wr(d, co::QUEUE_SIZE, 2, 64);
        }
        wr(d, co::QUEUE_DESC_LO, 8, 0x10_0000 + q * 0x1_0000);
        wr(d, co::QUEUE_DRIVER_LO, 8, 0x10_4000 + q * 0x1_0000);
        wr(d, co::QUEUE_DEVICE_LO, 8, 0x10_8000 + q * 0x1_0000);
        wr(d, co::QUEUE_MSIX_VECTOR, 2, q + 1);
        assert_eq!(rd(d, co::QUEUE_MSIX_VECTOR, 2), q + 1);
        assert_eq!(rd(d, co::QUEUE_NOTIFY_OFF, 2), q);
    }
    for q in 0..2u64 {
        wr(d, co::QUEUE_SELECT, 2, q);
        wr(d, co::QUEUE_ENABLE, 2, 1);
    }
    wr(d, co::DEVICE_STATUS, 1, 0xf);
    rd(d, co::DEVICE_STATUS, 1) as u8
}

fn nix_eventfd() -> EventFd {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap()
}

#[test]
fn pci_identity() {
    let (mut d, _) = device();
    let c = d.pci().config().clone();
    assert_eq!(c.u16_at(0x00), 0x1af4);
    assert_eq!(c.u16_at(0x02), 0x1042);
    assert_eq!(c.u8_at(0x08), 1, "revision 1 (OVMF)");
    assert_eq!(c.u32_at(0x08) >> 8, 0x01_8000, "class code");
    assert_eq!(c.u16_at(0x2c), 0x1af4);
    assert!(c.u16_at(0x2e) >= 0x40, "subsystem id >= 0x40 (OVMF)");
    assert_eq!(c.u8_at(0x3d), 1, "INTA");
    assert_ne!(c.u16_at(0x06) & 0x10, 0, "capability list");
    assert_eq!(d.pci().bar_size(usize::from(VIRTIO_BAR)), 0x4000);
    assert!(d.pci().bar_size(usize::from(MSIX_BAR)) >= 0x1000);
    assert!(d.bar_mmap(VIRTIO_BAR).is_none() && d.bar_mmap(MSIX_BAR).is_none());
}

#[test]
fn capability_chain_as_a_driver_walks_it() {
    let (mut d, _) = device();
    let c = d.pci().config().clone();
    let chain = walk_capabilities(c.bytes()).unwrap();
    let mut seen = Vec::new();
    for &(id, off) in &chain {
        if id == cap_id::MSIX {
            let table = c.u32_at(off + 4);
            let pba = c.u32_at(off + 8);
            assert_eq!(table & 7, u32::from(MSIX_BAR));
            assert_eq!(pba & 7, u32::from(MSIX_BAR));
            assert_eq!(c.u16_at(off + 2) & 0x7ff, 2, "3 vectors: 2 queues + config");
            continue;
        }
        if id != cap_id::VENDOR {
            continue;
        }
        let (len, ty, bar) = (c.u8_at(off + 2), c.u8_at(off + 3), c.u8_at(off + 4));
        let (o, l) = (c.u32_at(off + 8), c.u32_at(off + 12));
        seen.push(ty);
        match ty {
            cfg_type::COMMON => {
                assert_eq!((len, bar, o), (16, VIRTIO_BAR, 0));
                assert!(l >= 0x3c, "covers queue_reset (Linux vp_check_common_size)");
            }
            cfg_type::NOTIFY => {
                assert_eq!((len, bar, o), (20, VIRTIO_BAR, 0x3000));
                let mult = c.u32_at(off + 16);
                assert_eq!(mult, 4);
                // Every queue's notify address is inside the cap (spec: +2 for 16-bit writes).
                for q in 0..2u32 {
                    assert!(q * mult + 2 <= l);
                }
            }
            cfg_type::ISR => assert_eq!((len, bar, o, l), (16, VIRTIO_BAR, 0x1000, 1)),
            cfg_type::DEVICE => assert_eq!((len, bar, o, l), (16, VIRTIO_BAR, 0x2000, 12)),
            cfg_type::PCI_CFG => assert_eq!(len, 20),
            t => panic!("unexpected cfg_type {t}"),
        }
        // Every BAR range sits inside the BAR.
        assert!(u64::from(o) + u64::from(l) <= layout::VIRTIO_BAR_SIZE);
    }
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    assert!(chain.iter().any(|&(id, _)| id == cap_id::POWER_MANAGEMENT));
}

#[test]
fn bring_up_starts_queues_after_features() {
    let (mut d, s) = device();
    assert_eq!(events(&s), vec![]);
    let f = VIRTIO_F_VERSION_1 | (1 << 9);
    assert_eq!(bring_up(&mut d, f), 0xf);
    let ev = events(&s);
    assert_eq!(ev[0], Ev::Features(f));
    assert_eq!(
        ev[1],
        Ev::Start(
            0,
            QueueConfig {
                size: 64,
                desc_addr: 0x10_0000,
                driver_addr: 0x10_4000,
                device_addr: 0x10_8000,
                packed: false
            }
        )
    );
    assert!(matches!(
        ev[2],
        Ev::Start(
            1,
            QueueConfig {
                size: 128,
                desc_addr: 0x11_0000,
                ..
            }
        )
    ));
    assert_eq!(ev.len(), 3);
    assert!(d.queue_started(0) && d.queue_started(1));
    assert_eq!(d.stats().queues[0].starts, 1);
    // Queue events reach the bus.
    let bus = Arc::new(emudev::events::EventBus::default());
    let rx = bus.subscribe();
    d.set_event_bus(bus);
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    let got: Vec<_> = rx.try_iter().collect();
    assert_eq!(
        got,
        vec![
            emudev::events::DeviceEvent::QueueStopped { queue: 0 },
            emudev::events::DeviceEvent::QueueStopped { queue: 1 }
        ]
    );
}

#[test]
fn queue_enabled_after_driver_ok_starts_at_enable() {
    let (mut d, s) = device();
    wr(&mut d, co::DEVICE_STATUS, 1, 3);
    wr(&mut d, co::DRIVER_FEATURE_SELECT, 4, 1);
    wr(&mut d, co::DRIVER_FEATURE, 4, 1);
    wr(&mut d, co::DEVICE_STATUS, 1, 0xb);
    wr(&mut d, co::QUEUE_SELECT, 2, 1);
    wr(&mut d, co::QUEUE_ENABLE, 2, 1);
    wr(&mut d, co::DEVICE_STATUS, 1, 0xf);
    let ev = events(&s);
    assert!(matches!(ev.as_slice(), [Ev::Features(_), Ev::Start(1, _)]));
    wr(&mut d, co::QUEUE_SELECT, 2, 0);
    wr(&mut d, co::QUEUE_ENABLE, 2, 1);
    assert!(matches!(events(&s).as_slice(), [Ev::Start(0, _)]));
}

#[test]
fn features_ok_refused_by_device_type_and_for_missing_version_1() {
    let (mut d, s) = device();
    d.device_mut().refuse = 1 << 9;
    assert_eq!(bring_up(&mut d, VIRTIO_F_VERSION_1 | (1 << 9)), 3);
    assert_eq!(bring_up(&mut d, 1 << 9), 3);
    // Not offered.
    assert_eq!(bring_up(&mut d, VIRTIO_F_VERSION_1 | (1 << 3)), 3);
    assert!(!events(&s).iter().any(|e| matches!(e, Ev::Start(..))));
    // The device offers VERSION_1 even though the type did not list it.
    wr(&mut d, co::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(rd(&mut d, co::DEVICE_FEATURE, 4) & 1, 1);
}

#[test]
fn status_reset_stops_queues_before_reading_zero() {
    let (mut d, s) = device();
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    events(&s);
    let resets = d.device().resets;
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    // The write returned: both queues were stopped synchronously, the type was reset.
    assert_eq!(events(&s), vec![Ev::Stop(0), Ev::Stop(1)]);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0);
    assert_eq!(d.device().resets, resets + 1);
    assert!(!d.queue_started(0));
    wr(&mut d, co::QUEUE_SELECT, 2, 0);
    assert_eq!(rd(&mut d, co::QUEUE_ENABLE, 2), 0);
    assert_eq!(rd(&mut d, co::QUEUE_MSIX_VECTOR, 2), 0xffff);
    // A second reset with nothing running stops nothing.
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    assert_eq!(events(&s), vec![]);
}

#[test]
fn queue_reset_stops_one_queue_and_reenable_restarts_it() {
    let (mut d, s) = device();
    bring_up(&mut d, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_RESET);
    events(&s);
    wr(&mut d, co::QUEUE_SELECT, 2, 1);
    wr(&mut d, co::QUEUE_RESET, 2, 1);
    assert_eq!(events(&s), vec![Ev::Stop(1)]);
    assert_eq!(rd(&mut d, co::QUEUE_RESET, 2), 0);
    assert_eq!(rd(&mut d, co::QUEUE_ENABLE, 2), 0);
    assert!(d.queue_started(0) && !d.queue_started(1));
    wr(&mut d, co::QUEUE_DESC_LO, 4, 0x20_0000);
    wr(&mut d, co::QUEUE_ENABLE, 2, 1);
    assert!(matches!(
        events(&s).as_slice(),
        [Ev::Start(
            1,
            QueueConfig {
                desc_addr: 0x20_0000,
                ..
            }
        )]
    ));
}

#[test]
fn notify_write_rings_the_kick() {
    let (mut d, s) = device();
    // Before the queue runs, a notify does nothing.
    wr(&mut d, layout::NOTIFY_OFFSET + 4, 2, 1);
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    let kick1 = s
        .lock()
        .unwrap()
        .kicks
        .iter()
        .find(|k| k.0 == 1)
        .unwrap()
        .1
        .clone();
    // The start itself rings once so buffers queued before DRIVER_OK are seen.
    assert_eq!(kick1.drain(), 1);
    wr(&mut d, layout::NOTIFY_OFFSET + 4, 2, 1);
    wr(&mut d, layout::NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(kick1.drain(), 2);
    // Queue 0's doorbell is separate; misaligned and out-of-range writes are ignored.
    wr(&mut d, layout::NOTIFY_OFFSET + 6, 2, 1);
    wr(&mut d, layout::NOTIFY_OFFSET + 0x800, 2, 1);
    assert_eq!(kick1.drain(), 0);
    assert_eq!(d.stats().queues[1].kicks, 2);
}

#[test]
fn isr_read_to_clear_with_intx() {
    let (mut d, s) = device();
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    let n0 = s.lock().unwrap().notifiers[0].1.clone();
    let intx = d.pci().intx().clone();
    assert_eq!(rd(&mut d, layout::ISR_OFFSET, 1), 0);
    // MSI-X is disabled: a used-buffer notification raises INTx with ISR bit 0.
    n0.notify();
    assert!(intx.level());
    assert_eq!(rd(&mut d, layout::ISR_OFFSET, 1), 1);
    assert!(!intx.level(), "the read lowered the line");
    assert_eq!(rd(&mut d, layout::ISR_OFFSET, 1), 0, "read cleared it");
    // A configuration change sets bit 1.
    d.set_attr("capacity", "8192").unwrap();
    n0.notify();
    assert_eq!(rd(&mut d, layout::ISR_OFFSET, 1), 3);
    assert_eq!(d.stats().queues[0].interrupts, 2);
}

#[test]
fn msix_vectors_route_queue_and_config_interrupts() {
    let (mut d, s) = device();
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    let msix = d.pci().msix().unwrap().clone();
    let efds: Vec<EventFd> = (0..3).map(|_| nix_eventfd()).collect();
    for (v, e) in efds.iter().enumerate() {
        msix.set_vector_fd(v as u32, Some(e.as_fd().try_clone_to_owned().unwrap()))
            .unwrap();
    }
    let cap = d.pci().find_capability(cap_id::MSIX).unwrap();
    cfg_wr(&mut d, u64::from(cap.offset) + 3, 1, 0x80);
    let n1 = s.lock().unwrap().notifiers[1].1.clone();
    n1.notify();
    assert_eq!(efds[2].read().unwrap(), 1, "queue 1 -> vector 2");
    assert!(efds[1].read().is_err());
    assert_eq!(rd(&mut d, layout::ISR_OFFSET, 1), 0, "no ISR with MSI-X");
    d.set_attr("capacity", "1").unwrap();
    assert_eq!(efds[0].read().unwrap(), 1, "config -> vector 0");
    // Unassigning the vector silences the queue.
    wr(&mut d, co::QUEUE_SELECT, 2, 1);
    wr(&mut d, co::QUEUE_MSIX_VECTOR, 2, 0xffff);
    n1.notify();
    assert!(efds[2].read().is_err());
    // A vector beyond the table (3 entries) reads back NO_VECTOR.
    wr(&mut d, co::CONFIG_MSIX_VECTOR, 2, 3);
    assert_eq!(rd(&mut d, co::CONFIG_MSIX_VECTOR, 2), 0xffff);
}

#[test]
fn ring_error_sets_needs_reset_and_interrupts() {
    let (mut d, s) = device();
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    let cb = s.lock().unwrap().error_cb.clone().unwrap();
    cb(0, &QueueError::ChainLoop);
    cb(1, &QueueError::ChainLoop);
    assert_eq!(
        rd(&mut d, co::DEVICE_STATUS, 1) as u8,
        0xf | status::DEVICE_NEEDS_RESET
    );
    assert_eq!(rd(&mut d, layout::ISR_OFFSET, 1), 2, "config change, once");
    let st = d.stats();
    assert_eq!((st.needs_reset, st.config_interrupts), (1, 1));
    assert_eq!(st.queues[0].errors, 1);
    // Reset clears it.
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0);
}

#[test]
fn failed_queue_start_sets_needs_reset() {
    let (mut d, s) = device();
    s.lock().unwrap().fail_start = true;
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    assert_ne!(
        rd(&mut d, co::DEVICE_STATUS, 1) as u8 & status::DEVICE_NEEDS_RESET,
        0
    );
    assert!(!d.queue_started(0));
}

#[test]
fn device_config_and_generation() {
    let (mut d, _) = device();
    assert_eq!(rd(&mut d, layout::DEVICE_CFG_OFFSET, 8), 0x1000);
    assert_eq!(rd(&mut d, layout::DEVICE_CFG_OFFSET + 8, 4), 0);
    let g0 = rd(&mut d, co::CONFIG_GENERATION, 1);
    // Read-only part: no change, no bump.
    wr(&mut d, layout::DEVICE_CFG_OFFSET, 4, 5);
    assert_eq!(rd(&mut d, co::CONFIG_GENERATION, 1), g0);
    wr(&mut d, layout::DEVICE_CFG_OFFSET + 8, 4, 0x1234_abcd);
    assert_eq!(rd(&mut d, layout::DEVICE_CFG_OFFSET + 8, 4), 0x1234_abcd);
    assert_eq!(rd(&mut d, co::CONFIG_GENERATION, 1), g0 + 1);
    // Beyond the structure: zero, writes ignored.
    assert_eq!(rd(&mut d, layout::DEVICE_CFG_OFFSET + 12, 4), 0);
    assert_eq!(
        rd(&mut d, layout::DEVICE_CFG_OFFSET + 10, 4),
        0x1234,
        "partly inside"
    );
    wr(&mut d, layout::DEVICE_CFG_OFFSET + 10, 4, 0xffff_ffff);
    assert_eq!(rd(&mut d, layout::DEVICE_CFG_OFFSET + 8, 4), 0x1234_abcd);
    // Device-side change through an attribute.
    d.set_attr("capacity", "77").unwrap();
    assert_eq!(rd(&mut d, layout::DEVICE_CFG_OFFSET, 8), 77);
    assert_eq!(rd(&mut d, co::CONFIG_GENERATION, 1), g0 + 2);
    assert!(d.set_attr("nope", "1").is_err());
}

#[test]
fn pci_cfg_window_reaches_the_bar() {
    let (mut d, s) = device();
    let cap = d
        .pci()
        .capabilities()
        .iter()
        .copied()
        .filter(|c| c.id == cap_id::VENDOR)
        .nth(4)
        .unwrap();
    let base = u64::from(cap.offset);
    let set_window = |d: &mut VirtioPciDevice<MockDev>, bar: u8, off: u32, len: u32| {
        cfg_wr(d, base + 4, 1, u64::from(bar));
        cfg_wr(d, base + 8, 4, u64::from(off));
        cfg_wr(d, base + 12, 4, u64::from(len));
    };
    // Read device_feature (select 0) through the window: 4 bytes at BAR4 + 0x4.
    set_window(&mut d, VIRTIO_BAR, 0x4, 4);
    assert_eq!(cfg_rd(&mut d, base + 16, 4), DEV_FEATURES & 0xffff_ffff);
    // Write device_status through the window (SeaBIOS: bar, offset, length=1, data).
    set_window(&mut d, VIRTIO_BAR, 0x14, 1);
    cfg_wr(&mut d, base + 16, 1, 3);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 3);
    assert_eq!(cfg_rd(&mut d, base + 16, 1), 3);
    // Queue size via a 2-byte window.
    set_window(&mut d, VIRTIO_BAR, 0x18, 2);
    assert_eq!(cfg_rd(&mut d, base + 16, 2), 256);
    // A notify through the window kicks the queue.
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    let kick0 = s.lock().unwrap().kicks[0].1.clone();
    kick0.drain();
    set_window(&mut d, VIRTIO_BAR, 0x3000, 2);
    cfg_wr(&mut d, base + 16, 2, 0);
    assert_eq!(kick0.drain(), 1);
    // ISR through the window is read-to-clear too.
    d.interrupts().signal_config();
    set_window(&mut d, VIRTIO_BAR, 0x1000, 1);
    assert_eq!(cfg_rd(&mut d, base + 16, 1), 2);
    assert_eq!(cfg_rd(&mut d, base + 16, 1), 0);
    // Invalid lengths and misaligned offsets do nothing.
    set_window(&mut d, VIRTIO_BAR, 0x14, 3);
    cfg_wr(&mut d, base + 16, 1, 0);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0xf);
    set_window(&mut d, VIRTIO_BAR, 0x15, 2);
    cfg_wr(&mut d, base + 16, 2, 0);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0xf);
    // cfg_type stays read-only.
    cfg_wr(&mut d, base + 3, 1, 0x77);
    assert_eq!(
        d.pci().config().u8_at(cap.offset as usize + 3),
        cfg_type::PCI_CFG
    );
}

#[test]
fn quiesce_pauses_the_engine_around_the_memory_switch() {
    let (mut d, s) = device();
    d.quiesce().unwrap();
    d.quiesce().unwrap();
    d.set_memory(Arc::new(GuestMemory::empty()));
    d.resume();
    d.resume();
    assert_eq!(events(&s), vec![Ev::Pause, Ev::Memory(0), Ev::Resume]);
    // A client that goes away while paused: queues stop, the pause is lifted.
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    events(&s);
    d.quiesce().unwrap();
    d.stop();
    assert_eq!(
        events(&s),
        vec![Ev::Pause, Ev::Stop(0), Ev::Stop(1), Ev::Resume]
    );
    assert!(!d.queue_started(0));
}

#[test]
fn function_reset_stops_queues_and_clears_registers() {
    let (mut d, s) = device();
    bring_up(&mut d, VIRTIO_F_VERSION_1);
    events(&s);
    DeviceModel::reset(&mut d);
    assert_eq!(events(&s), vec![Ev::Stop(0), Ev::Stop(1)]);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0);
    assert_eq!(d.stats().resets, 2, "bring-up reset + function reset");
}

#[test]
fn odd_bar_accesses_are_harmless() {
    let (mut d, _) = device();
    let mut b = [0xaau8; 8];
    d.bar_read(VIRTIO_BAR, 0x3ffe, &mut b[..4]);
    assert_eq!(&b[..4], &[0; 4]);
    d.bar_read(VIRTIO_BAR, u64::MAX - 1, &mut b[..2]);
    d.bar_write(VIRTIO_BAR, u64::MAX - 1, &[1, 2]);
    d.bar_read(0, 0, &mut b[..4]);
    assert_eq!(&b[..4], &[0; 4]);
    d.bar_write(VIRTIO_BAR, 0x14, &[]);
    let mut empty: [u8; 0] = [];
    d.bar_read(VIRTIO_BAR, 0x1000, &mut empty);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0);
}

#[test]
fn construction_rejects_bad_queue_layouts() {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let new = |sizes: &[u16]| VirtioPciDevice::new("bad", mock_dev(&shared, sizes));
    assert!(matches!(
        new(&[]),
        Err(VirtioPciError::QueueCount { num: 0, .. })
    ));
    assert!(matches!(
        new(&vec![8; 1025]),
        Err(VirtioPciError::QueueCount { num: 1025, .. })
    ));
    assert!(matches!(
        new(&[256, 100]),
        Err(VirtioPciError::QueueSize { size: 100, .. })
    ));
    // An unavailable queue (size 0) is allowed and reads as size 0.
    let mut d = new(&[8, 0]).unwrap();
    wr(&mut d, co::QUEUE_SELECT, 2, 1);
    assert_eq!(rd(&mut d, co::QUEUE_SIZE, 2), 0);
    // 1024 queues fit the notify window; the MSI-X table has one vector per queue + config.
    let d = new(&vec![8; 1024]).unwrap();
    assert_eq!(d.common_cfg().num_queues(), 1024);
}

#[test]
fn pcie_option_adds_express_capability() {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let opts = VirtioPciOptions {
        pcie: true,
        ..Default::default()
    };
    let mut d = VirtioPciDevice::with_options("pcie", mock_dev(&shared, &[8]), opts).unwrap();
    assert_eq!(d.pci().config_size(), 4096);
    let chain = walk_capabilities(d.pci().config().bytes()).unwrap();
    let ids: Vec<u8> = chain.iter().map(|c| c.0).collect();
    assert_eq!(
        ids,
        [
            9,
            9,
            9,
            9,
            9,
            cap_id::MSIX,
            cap_id::POWER_MANAGEMENT,
            cap_id::PCI_EXPRESS
        ]
    );
}

/// Older SeaBIOS order: queue set up and enabled right after ACKNOWLEDGE|DRIVER, features
/// afterwards; the queue starts at DRIVER_OK with the final features.
#[test]
fn seabios_order_queue_before_features() {
    let (mut d, s) = device();
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    assert_eq!(rd(&mut d, layout::ISR_OFFSET, 1), 0);
    wr(&mut d, co::DEVICE_STATUS, 1, 3);
    wr(&mut d, co::QUEUE_SELECT, 2, 0);
    assert_eq!(rd(&mut d, co::QUEUE_SIZE, 2), 256);
    wr(&mut d, co::QUEUE_SIZE, 2, 128);
    assert_eq!(rd(&mut d, co::QUEUE_SIZE, 2), 128);
    assert_eq!(rd(&mut d, co::QUEUE_ENABLE, 2), 0);
    wr(&mut d, co::QUEUE_DESC_LO, 4, 0x7000);
    wr(&mut d, co::QUEUE_DESC_HI, 4, 0);
    wr(&mut d, co::QUEUE_ENABLE, 2, 1);
    assert_eq!(rd(&mut d, co::QUEUE_ENABLE, 2), 1);
    wr(&mut d, co::DRIVER_FEATURE_SELECT, 4, 1);
    wr(&mut d, co::DRIVER_FEATURE, 4, 1);
    wr(&mut d, co::DEVICE_STATUS, 1, 0xb);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0xb);
    assert_eq!(events(&s), vec![]);
    wr(&mut d, co::DEVICE_STATUS, 1, 0xf);
    assert_eq!(
        events(&s),
        vec![
            Ev::Features(VIRTIO_F_VERSION_1),
            Ev::Start(
                0,
                QueueConfig {
                    size: 128,
                    desc_addr: 0x7000,
                    driver_addr: 0,
                    device_addr: 0,
                    packed: false
                }
            )
        ]
    );
}

/// Dropping the device destroys its engine even with no queue running: a shared poller
/// keeps per-device state until then (found as a slowdown growing with every device a
/// fuzzer created and dropped).
#[test]
fn dropping_the_device_destroys_the_engine() {
    let (mut d, s) = device();
    d.set_memory(Arc::new(GuestMemory::empty()));
    events(&s);
    drop(d);
    assert_eq!(events(&s), vec![Ev::Destroy]);
}
