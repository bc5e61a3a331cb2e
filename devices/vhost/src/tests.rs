//! Engine behaviour against the scripted backend in [`crate::fake`]: the start sequence,
//! memory-table changes, reset (GET_VRING_BASE), call forwarding, refusal of message-only
//! memory, and disconnect/reconnect.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use emudev::GuestMemory;
use emudev_vfio_user::DmaRegion;
use emudev_virtio::{Engine, Kick, Notifier, QueueConfig, QueueError, QueueState};
use vm_memory::{FileOffset, MmapRegion};
use zerocopy::FromBytes;

use crate::backend::{Backend, BackendOptions};
use crate::engine::VhostUserEngine;
use crate::fake::{reqs, Fake, FAKE_FEATURES};
use crate::protocol::{req, MemRegion, MemTableHead, VringAddr, VringState};

const WAIT: Duration = Duration::from_secs(5);

fn ram(iova: u64, size: u64) -> DmaRegion {
    let fd =
        nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    let m = MmapRegion::build(
        Some(FileOffset::new(std::fs::File::from(fd), 0)),
        size as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .unwrap();
    DmaRegion {
        iova,
        size,
        prot: 3,
        mapping: Some(Arc::new(m)),
        map_offset: 0,
    }
}

fn message(iova: u64, size: u64) -> DmaRegion {
    DmaRegion {
        iova,
        size,
        prot: 3,
        mapping: None,
        map_offset: 0,
    }
}

fn cfg(base: u64) -> QueueConfig {
    QueueConfig {
        size: 16,
        desc_addr: base,
        driver_addr: base + 0x100,
        device_addr: base + 0x200,
        packed: false,
    }
}

struct Counter(AtomicUsize);
impl Notifier for Counter {
    fn notify(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

type Errors = Arc<Mutex<Vec<(u16, QueueError)>>>;

fn setup(tag: &str) -> (Fake, VhostUserEngine, Errors) {
    let fake = Fake::start(tag);
    let opts = BackendOptions {
        reconnect_interval: Duration::from_millis(20),
        ..BackendOptions::default()
    };
    let b = Backend::connect(tag, &fake.path, opts).unwrap();
    assert_eq!(b.info().features, FAKE_FEATURES);
    assert_eq!(b.info().max_queues, Some(4));
    let mut e = VhostUserEngine::new(b).unwrap();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let errs = errors.clone();
    e.set_error_callback(Arc::new(move |q, err: &QueueError| {
        errs.lock().unwrap().push((q, err.clone()))
    }));
    // Handshake: features, protocol features (acked), queue count, owner.
    assert_eq!(
        reqs(&fake.drain()),
        vec![
            req::GET_FEATURES,
            req::GET_PROTOCOL_FEATURES,
            req::SET_PROTOCOL_FEATURES,
            req::GET_QUEUE_NUM,
            req::SET_OWNER
        ]
    );
    (fake, e, errors)
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn start_sends_the_ring_setup_with_our_doorbell_as_kick_and_stop_returns_the_base() {
    let (fake, mut e, _) = setup("start");
    let mem = Arc::new(GuestMemory::from_dma(&[ram(0, 0x10_0000)], None));
    e.memory_changed(mem.clone()).wait_timeout(WAIT).unwrap();
    e.features_changed(FAKE_FEATURES | (1 << 40))
        .wait_timeout(WAIT)
        .unwrap();
    let kick = Kick::new().unwrap();
    let n = Arc::new(Counter(AtomicUsize::new(0)));
    e.set_queue_base(
        1,
        QueueState {
            next_avail: 9,
            ..QueueState::default()
        },
    );
    e.queue_start(1, cfg(0x4000), n.clone(), kick.clone())
        .wait_timeout(WAIT)
        .unwrap();
    let msgs = fake.drain();
    assert_eq!(
        reqs(&msgs),
        vec![
            req::SET_FEATURES,
            req::SET_MEM_TABLE,
            req::SET_VRING_NUM,
            req::SET_VRING_BASE,
            req::SET_VRING_ADDR,
            req::SET_VRING_KICK,
            req::SET_VRING_CALL,
            req::SET_VRING_ERR,
            req::SET_VRING_ENABLE
        ]
    );
    // Features: what the driver took of what the backend offers, plus protocol features.
    let f = u64::from_le_bytes(msgs[0].payload[..8].try_into().unwrap());
    assert_eq!(f, FAKE_FEATURES);
    let (head, rest) = MemTableHead::read_from_prefix(&msgs[1].payload).unwrap();
    assert_eq!(head.nregions, 1);
    let r = MemRegion::read_from_bytes(rest).unwrap();
    assert_eq!(
        (r.guest_addr, r.size, r.user_addr, r.mmap_offset),
        (0, 0x10_0000, 0, 0)
    );
    assert_eq!(msgs[1].fds.len(), 1);
    assert_eq!(
        VringState::read_from_bytes(&msgs[3].payload).unwrap().num,
        9
    );
    let a = VringAddr::read_from_bytes(&msgs[4].payload).unwrap();
    assert_eq!((a.desc, a.avail, a.used), (0x4000, 0x4100, 0x4200));
    // The kick fd the backend got is our doorbell: writing it shows up on our Kick.
    let kick_fd = &msgs[5].fds[0];
    nix::unistd::write(kick_fd, &1u64.to_le_bytes()).unwrap();
    assert_eq!(kick.drain(), 1);
    // The call fd reaches the notifier through the monitor thread.
    nix::unistd::write(&msgs[6].fds[0], &1u64.to_le_bytes()).unwrap();
    wait("notify", || n.0.load(Ordering::SeqCst) == 1);

    mem.write_obj(0x4202, &7u16).unwrap();
    *fake.base.lock().unwrap() = 12;
    let st = e.queue_stop(1).wait_timeout(WAIT).unwrap();
    assert_eq!((st.next_avail, st.next_used), (12, 7));
    assert_eq!(reqs(&fake.drain()), vec![req::GET_VRING_BASE]);
    assert!(matches!(
        e.queue_stop(1).wait_timeout(WAIT),
        Err(emudev_virtio::EngineError::QueueNotStarted(1))
    ));
}

#[test]
fn memory_table_is_resent_only_when_the_shared_memory_changes() {
    let (fake, mut e, _) = setup("memtable");
    let r = ram(0, 0x10_0000);
    // Without a running ring the backend hears nothing (QEMU's vhost does the same).
    e.memory_changed(Arc::new(GuestMemory::from_dma(&[ram(0, 0x1000)], None)))
        .wait_timeout(WAIT)
        .unwrap();
    e.memory_changed(Arc::new(GuestMemory::from_dma(
        std::slice::from_ref(&r),
        None,
    )))
    .wait_timeout(WAIT)
    .unwrap();
    assert!(fake.drain().is_empty());
    let n = Arc::new(Counter(AtomicUsize::new(0)));
    e.queue_start(0, cfg(0x4000), n, Kick::new().unwrap())
        .wait_timeout(WAIT)
        .unwrap();
    assert_eq!(reqs(&fake.drain())[0], req::SET_MEM_TABLE);
    // A new snapshot of the same maps, and an added message-only map: nothing to tell.
    let same = GuestMemory::from_dma(&[r.clone(), message(0x20_0000, 0x1000)], None);
    e.memory_changed(Arc::new(same)).wait_timeout(WAIT).unwrap();
    assert!(fake.drain().is_empty());
    // A second fd-backed map: a new table with both.
    let two = GuestMemory::from_dma(&[r, ram(0x40_0000, 0x1000)], None);
    e.memory_changed(Arc::new(two)).wait_timeout(WAIT).unwrap();
    let m = fake.drain();
    assert_eq!(reqs(&m), vec![req::SET_MEM_TABLE]);
    assert_eq!(m[0].fds.len(), 2);
    assert_eq!(
        MemTableHead::read_from_prefix(&m[0].payload)
            .unwrap()
            .0
            .nregions,
        2
    );
    // Detach: empty memory is never sent.
    e.memory_changed(Arc::new(GuestMemory::empty()))
        .wait_timeout(WAIT)
        .unwrap();
    assert!(fake.drain().is_empty());
}

#[test]
fn rings_in_message_only_memory_are_refused_clearly() {
    let (fake, mut e, _) = setup("msgonly");
    let mem = GuestMemory::from_dma(&[ram(0, 0x1000), message(0x10_0000, 0x10_0000)], None);
    e.memory_changed(Arc::new(mem)).wait_timeout(WAIT).unwrap();
    let n = Arc::new(Counter(AtomicUsize::new(0)));
    let err = e
        .queue_start(0, cfg(0x10_0000), n, Kick::new().unwrap())
        .wait_timeout(WAIT)
        .unwrap_err();
    assert!(err.to_string().contains("message-only memory"), "{err}");
    // Nothing about rings reached the backend.
    assert!(!reqs(&fake.drain()).contains(&req::SET_VRING_NUM));
}

#[test]
fn disconnect_reports_running_rings_and_reconnect_restores_the_table() {
    let (fake, mut e, errors) = setup("reconnect");
    let mem = Arc::new(GuestMemory::from_dma(&[ram(0, 0x10_0000)], None));
    e.memory_changed(mem).wait_timeout(WAIT).unwrap();
    e.features_changed(1 << 32).wait_timeout(WAIT).unwrap();
    let n = Arc::new(Counter(AtomicUsize::new(0)));
    e.queue_start(0, cfg(0x4000), n.clone(), Kick::new().unwrap())
        .wait_timeout(WAIT)
        .unwrap();
    fake.drain();

    fake.hang_up();
    wait("error report", || !errors.lock().unwrap().is_empty());
    let (q, err) = errors.lock().unwrap()[0].clone();
    assert_eq!(q, 0);
    assert!(matches!(err, QueueError::Backend(_)));
    // The monitor reconnects (the listener accepts again).
    fake.wait_for(req::SET_OWNER);
    wait("connected", || e.backend().connected());
    assert_eq!(e.backend().connection_counts(), (1, 1));
    // The lost ring stops without asking the backend; the driver's restart works.
    let st = e.queue_stop(0).wait_timeout(WAIT).unwrap();
    assert_eq!(st.next_avail, 0);
    e.queue_start(0, cfg(0x4000), n, Kick::new().unwrap())
        .wait_timeout(WAIT)
        .unwrap();
    let r = reqs(&fake.drain());
    assert!(!r.contains(&req::GET_VRING_BASE));
    // The new backend gets the features and the memory before the ring.
    assert_eq!(r[..2], [req::SET_FEATURES, req::SET_MEM_TABLE]);
    assert!(r.contains(&req::SET_VRING_KICK));
    assert_eq!(errors.lock().unwrap().len(), 1);
}

#[test]
fn a_backend_ring_error_is_reported_for_its_queue() {
    let (fake, mut e, errors) = setup("errfd");
    let mem = Arc::new(GuestMemory::from_dma(&[ram(0, 0x10_0000)], None));
    e.memory_changed(mem).wait_timeout(WAIT).unwrap();
    let n = Arc::new(Counter(AtomicUsize::new(0)));
    e.queue_start(2, cfg(0x8000), n, Kick::new().unwrap())
        .wait_timeout(WAIT)
        .unwrap();
    let err = fake.wait_for(req::SET_VRING_ERR);
    nix::unistd::write(err.fds[0].as_fd(), &1u64.to_le_bytes()).unwrap();
    wait("ring error", || !errors.lock().unwrap().is_empty());
    assert_eq!(errors.lock().unwrap()[0].0, 2);
}

#[test]
fn a_table_that_drops_a_running_ring_is_held_back_until_memory_returns() {
    let (fake, mut e, errors) = setup("holdback");
    let low = ram(0, 0x10_0000);
    let high = ram(0x10_0000, 0x10_0000);
    e.memory_changed(Arc::new(GuestMemory::from_dma(
        &[low.clone(), high.clone()],
        None,
    )))
    .wait_timeout(WAIT)
    .unwrap();
    let n = Arc::new(Counter(AtomicUsize::new(0)));
    e.queue_start(0, cfg(0x18_0000), n, Kick::new().unwrap())
        .wait_timeout(WAIT)
        .unwrap();
    fake.drain();
    // QEMU's transaction: the ring's region goes away for a moment, then comes back.
    e.memory_changed(Arc::new(GuestMemory::from_dma(
        std::slice::from_ref(&low),
        None,
    )))
    .wait_timeout(WAIT)
    .unwrap();
    assert!(fake.drain().is_empty());
    e.memory_changed(Arc::new(GuestMemory::from_dma(&[low, high], None)))
        .wait_timeout(WAIT)
        .unwrap();
    // Back to the table the backend already has: nothing to send either.
    assert!(fake.drain().is_empty());
    assert!(errors.lock().unwrap().is_empty());
}

#[test]
fn device_types_take_identity_from_backend_and_options() {
    use crate::device::{VhostDeviceOptions, VhostKind, VhostUserDevice};
    use emudev_virtio::pci::VirtioDeviceType;
    let fake = Fake::start("devtype");
    let opts = |kind| VhostDeviceOptions {
        kind,
        queue_size: 128,
        backend: BackendOptions::default(),
    };
    let blk = VhostUserDevice::connect("b", &fake.path, opts(VhostKind::Blk)).unwrap();
    assert_eq!((blk.device_id(), blk.config_len()), (2, 60));
    // Packed rings and the vhost-only protocol bit are not offered to the driver.
    assert_eq!(blk.features(), FAKE_FEATURES & !(1 << 34) & !(1 << 30));
    assert_eq!(blk.queue_max_sizes(), vec![128]);
    let mut c = [0u8; 4];
    blk.read_config(8, &mut c);
    assert_eq!(c, [8, 9, 10, 11], "configuration comes from GET_CONFIG");
    blk.read_config(58, &mut c);
    assert_eq!(c, [0; 4], "reads past the end are zero");
    drop(blk);
    fake.hang_up();

    let fs = VhostKind::Fs {
        tag: "share".into(),
        request_queues: 2,
    };
    let fs = VhostUserDevice::connect("f", &fake.path, opts(fs)).unwrap();
    assert_eq!((fs.device_id(), fs.queue_max_sizes().len()), (26, 3));
    let mut cfg = [0u8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], b"share\0");
    assert_eq!(&cfg[36..], &2u32.to_le_bytes());
    drop(fs);
    fake.hang_up();
    // The fake serves 4 queues: 1 + 4 request queues do not fit.
    let big = VhostKind::Fs {
        tag: "t".into(),
        request_queues: 4,
    };
    let e = VhostUserDevice::connect("f", &fake.path, opts(big)).unwrap_err();
    assert!(e.to_string().contains("needs 5 queues"), "{e}");
}
