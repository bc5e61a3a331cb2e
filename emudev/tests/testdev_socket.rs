//! The test device over a real vfio-user socket, served by the device manager and driven
//! by the protocol crate's client: fd-backed and fd-less DMA maps, interrupts, unmap
//! during DMA, table changes under load, and failure isolation between devices.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use emudev::doorbell::{new_eventfd, wait_eventfd};
use emudev::pci::{BarDef, PciDevice, PciDeviceBuilder, PciIds};
use emudev::testdev::engine::checksum;
use emudev::testdev::{regs, TestDevice};
use emudev::transport::inproc::memfd;
use emudev::{DeviceError, DeviceManager, DeviceModel, DeviceState, GuestMemory};
use emudev_vfio_user::wire::{dma_flags, irq_index, irq_set_flags, region_index};
use emudev_vfio_user::{Client, ClientError, ClientMemory, Errno, ServerOptions, SetIrqData};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

const WAIT: Duration = Duration::from_secs(5);
const RW: u32 = dma_flags::READ | dma_flags::WRITE;

fn sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("emudev-{}-{name}.sock", std::process::id()))
}

fn serve(mgr: &DeviceManager, name: &str) -> PathBuf {
    let path = sock(name);
    mgr.add(
        TestDevice::new(name).unwrap(),
        &path,
        ServerOptions::default(),
    )
    .unwrap();
    path
}

fn connect(path: &PathBuf) -> Client {
    let mut c = Client::connect(path).unwrap();
    c.negotiate().unwrap();
    c
}

fn rd32(c: &mut Client, bar: u32, off: u64) -> u32 {
    let v = c.region_read(bar, off, 4).unwrap();
    u32::from_le_bytes([v[0], v[1], v[2], v[3]])
}

fn wr32(c: &mut Client, bar: u32, off: u64, v: u32) {
    c.region_write(bar, off, &v.to_le_bytes()).unwrap();
}

fn wr64(c: &mut Client, bar: u32, off: u64, v: u64) {
    c.region_write(bar, off, &v.to_le_bytes()).unwrap();
}

/// Poll a register until it equals `want` (each read also serves pending DMA).
fn wait_reg(c: &mut Client, off: u64, want: impl Fn(u32) -> bool) -> u32 {
    let t0 = Instant::now();
    loop {
        let v = rd32(c, 0, off);
        if want(v) || t0.elapsed() > WAIT {
            return v;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn program(c: &mut Client, cmd: u32, dst: u64, src: u64, len: u32, pattern: u32) {
    wr64(c, 0, regs::DMA_DST, dst);
    wr64(c, 0, regs::DMA_SRC, src);
    wr32(c, 0, regs::DMA_LEN, len);
    wr32(c, 0, regs::DMA_PATTERN, pattern);
    wr32(c, 0, regs::DMA_CMD, cmd);
}

/// Guest RAM the test shares with the server by fd.
fn shared_ram(size: u64) -> (OwnedFd, MmapRegion) {
    let fd = memfd("test-ram", size).unwrap();
    let file = std::fs::File::from(fd.try_clone().unwrap());
    let m = MmapRegion::<()>::from_file(FileOffset::new(file, 0), size as usize).unwrap();
    (fd, m)
}

/// Client memory served by messages (fd-less maps).
#[derive(Clone)]
struct VecMemory {
    base: u64,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl ClientMemory for VecMemory {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let m = self.bytes.lock().unwrap();
        let o = addr.checked_sub(self.base).ok_or(Errno::EFAULT)? as usize;
        let s = m.get(o..o + buf.len()).ok_or(Errno::EFAULT)?;
        buf.copy_from_slice(s);
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        let mut m = self.bytes.lock().unwrap();
        let o = addr.checked_sub(self.base).ok_or(Errno::EFAULT)? as usize;
        let s = m.get_mut(o..o + data.len()).ok_or(Errno::EFAULT)?;
        s.copy_from_slice(data);
        Ok(())
    }
}

fn msix_eventfds(c: &mut Client, n: u32) -> Vec<emudev::pci::EventFd> {
    let evs: Vec<_> = (0..n).map(|_| new_eventfd().unwrap()).collect();
    let fds: Vec<_> = evs.iter().map(|e| Some(e.as_fd())).collect();
    c.set_irqs(
        irq_index::MSIX,
        irq_set_flags::ACTION_TRIGGER,
        0,
        n,
        SetIrqData::Eventfds(&fds),
    )
    .unwrap();
    evs
}

#[test]
fn info_and_fd_backed_dma_with_msix() {
    let mgr = DeviceManager::new();
    let path = serve(&mgr, "sock-fd");
    let mut c = connect(&path);
    let (fd, ram) = shared_ram(1 << 20);
    c.dma_map(0, 1 << 20, RW, Some((fd.as_fd(), 0))).unwrap();
    let info = c.get_info().unwrap();
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    let cfg = c.region_info(region_index::CONFIG).unwrap();
    assert_eq!(cfg.info.size, 256);
    let bar2 = c.region_info(2).unwrap();
    assert_eq!(bar2.areas.len(), 1);
    assert!(bar2.fd.is_some());
    assert_eq!(c.irq_info(irq_index::MSIX).unwrap().count, 4);
    let id = c.region_read(region_index::CONFIG, 0, 4).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), regs::VENDOR_ID);
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::MAGIC);

    let irqs = msix_eventfds(&mut c, 4);
    wr32(&mut c, 0, regs::DMA_VECTOR, 2);
    program(&mut c, regs::DMA_CMD_FILL, 0x1000, 0, 9000, 0x0102_0304);
    assert_eq!(wait_eventfd(irqs[2].as_fd(), WAIT).unwrap(), 1);
    let mut got = vec![0u8; 9000];
    ram.get_slice(0x1000, 9000).unwrap().copy_to(&mut got[..]);
    assert!(got.chunks(4).all(|c| c == [4, 3, 2, 1]));
    let data: Vec<u8> = (0..7000u32).map(|i| (i ^ (i >> 8)) as u8).collect();
    ram.get_slice(0x8000, 7000).unwrap().copy_from(&data[..]);
    program(&mut c, regs::DMA_CMD_CHECKSUM, 0, 0x8000, 7000, 0);
    assert_eq!(wait_eventfd(irqs[2].as_fd(), WAIT).unwrap(), 1);
    assert_eq!(rd32(&mut c, 0, regs::DMA_RESULT), checksum(&data));
    assert_eq!(mgr.state("sock-fd"), Some(DeviceState::Running));
    drop(c);
    // The client left: the device is stopped, its state kept.
    let t0 = Instant::now();
    while mgr.state("sock-fd") != Some(DeviceState::Stopped) && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(mgr.state("sock-fd"), Some(DeviceState::Stopped));
    // The next client finds the device and its registers as left.
    let mut c = connect(&path);
    assert_eq!(rd32(&mut c, 0, regs::DMA_RESULT), checksum(&data));
}

#[test]
fn fd_less_dma_is_served_by_messages() {
    let mgr = DeviceManager::new();
    let path = serve(&mgr, "sock-msg");
    let mut c = connect(&path);
    let mem = VecMemory {
        base: 0x10_0000,
        bytes: Arc::new(Mutex::new(vec![0u8; 0x4000])),
    };
    c.set_memory(Box::new(mem.clone()));
    c.dma_map(0x10_0000, 0x4000, RW, None).unwrap();
    program(&mut c, regs::DMA_CMD_FILL, 0x10_0010, 0, 5000, 0x7777_7777);
    let st = wait_reg(&mut c, regs::DMA_STATUS, |s| s == regs::DMA_STATUS_DONE);
    assert_eq!(st, regs::DMA_STATUS_DONE);
    {
        let b = mem.bytes.lock().unwrap();
        assert_eq!(b[0x0f], 0);
        assert!(b[0x10..0x10 + 5000].iter().all(|x| *x == 0x77));
        assert_eq!(b[0x10 + 5000], 0);
    }
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 13) as u8).collect();
    mem.bytes.lock().unwrap()[0x2000..0x2000 + 3000].copy_from_slice(&data);
    program(&mut c, regs::DMA_CMD_CHECKSUM, 0, 0x10_2000, 3000, 0);
    wait_reg(&mut c, regs::DMA_STATUS, |s| s == regs::DMA_STATUS_DONE);
    assert_eq!(rd32(&mut c, 0, regs::DMA_RESULT), checksum(&data));
    // Two DMA_WRITE chunks for the fill, one DMA_READ for the checksum.
    assert!(c.dma_served() >= 3);
}

#[test]
fn unmap_during_dma_waits_for_the_device() {
    let mgr = DeviceManager::new();
    let path = serve(&mgr, "sock-unmap");
    let mut c = connect(&path);
    let (fd, ram) = shared_ram(2 << 20);
    c.dma_map(0, 1 << 20, RW, Some((fd.as_fd(), 0))).unwrap();
    c.dma_map(1 << 20, 1 << 20, RW, Some((fd.as_fd(), 1 << 20)))
        .unwrap();
    wr32(&mut c, 0, regs::DMA_REPEAT, u32::MAX);
    program(&mut c, regs::DMA_CMD_FILL, 1 << 20, 0, 1 << 20, 0xabab_abab);
    let p = wait_reg(&mut c, regs::DMA_PASSES, |p| p >= 2);
    assert!(p >= 2);
    c.dma_unmap(1 << 20, 1 << 20).unwrap();
    // The reply is out: the device must not write the range any more.
    let zero = vec![0u8; 1 << 20];
    ram.get_slice(1 << 20, 1 << 20)
        .unwrap()
        .copy_from(&zero[..]);
    std::thread::sleep(Duration::from_millis(100));
    let mut buf = vec![0u8; 1 << 20];
    ram.get_slice(1 << 20, 1 << 20)
        .unwrap()
        .copy_to(&mut buf[..]);
    assert!(buf.iter().all(|b| *b == 0), "write after unmap reply");
    assert_eq!(
        wait_reg(&mut c, regs::DMA_STATUS, |s| s == regs::DMA_STATUS_ERROR),
        regs::DMA_STATUS_ERROR
    );
    // The rest of memory is still usable.
    program(&mut c, regs::DMA_CMD_FILL, 0, 0, 64, 0x1);
    wr32(&mut c, 0, regs::DMA_REPEAT, 1);
    program(&mut c, regs::DMA_CMD_FILL, 0, 0, 64, 0x1);
    assert_eq!(
        wait_reg(&mut c, regs::DMA_STATUS, |s| s == regs::DMA_STATUS_DONE),
        regs::DMA_STATUS_DONE
    );
    assert_eq!(mgr.state("sock-unmap"), Some(DeviceState::Running));
}

#[test]
fn table_changes_under_load() {
    let mgr = DeviceManager::new();
    let path = serve(&mgr, "sock-churn");
    let mut c = connect(&path);
    let mem = VecMemory {
        base: 0x4000_0000,
        bytes: Arc::new(Mutex::new(vec![0u8; 0x1000])),
    };
    c.set_memory(Box::new(mem));
    let (fd, ram) = shared_ram(4 << 20);
    c.dma_map(0, 1 << 20, RW, Some((fd.as_fd(), 0))).unwrap();
    let src: Vec<u8> = (0..0x4_0000u32).map(|i| (i * 31) as u8).collect();
    ram.get_slice(0, src.len()).unwrap().copy_from(&src[..]);
    wr32(&mut c, 0, regs::DMA_REPEAT, u32::MAX);
    program(&mut c, regs::DMA_CMD_COPY, 0x8_0000, 0, 0x4_0000, 0);
    for i in 0..30u64 {
        let gpa = (1 << 20) + (i % 3) * (1 << 20);
        c.dma_map(gpa, 1 << 20, RW, Some((fd.as_fd(), gpa)))
            .unwrap();
        c.dma_map(0x4000_0000, 0x1000, RW, None).unwrap();
        c.dma_unmap(0x4000_0000, 0x1000).unwrap();
        c.dma_unmap(gpa, 1 << 20).unwrap();
    }
    let p = wait_reg(&mut c, regs::DMA_PASSES, |p| p >= 1);
    assert!(p >= 1);
    assert_eq!(rd32(&mut c, 0, regs::DMA_ERRORS), 0);
    assert_eq!(rd32(&mut c, 0, regs::DMA_STATUS), regs::DMA_STATUS_BUSY);
    wr32(&mut c, 0, regs::DMA_CMD, regs::DMA_CMD_STOP);
    let mut got = vec![0u8; src.len()];
    ram.get_slice(0x8_0000, src.len())
        .unwrap()
        .copy_to(&mut got[..]);
    assert_eq!(got, src);
    assert_eq!(mgr.state("sock-churn"), Some(DeviceState::Running));
}

/// A device whose BAR writes panic.
struct Crasher {
    pci: PciDevice,
}

impl DeviceModel for Crasher {
    fn name(&self) -> &str {
        "crasher"
    }
    fn pci(&mut self) -> &mut PciDevice {
        &mut self.pci
    }
    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {
        panic!("crasher: bar_write bug");
    }
    fn set_memory(&mut self, _mem: Arc<GuestMemory>) {}
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn resume(&mut self) {}
    fn reset(&mut self) {}
}

#[test]
fn a_panicking_device_fails_alone_and_devices_come_and_go() {
    let mgr = DeviceManager::new();
    let good = serve(&mgr, "sock-good");
    let bad = sock("crasher");
    let pci = PciDeviceBuilder::new(PciIds {
        vendor_id: 0xe0de,
        device_id: 0xbad0,
        revision_id: 0,
        class_code: 0xff0000,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
    })
    .bar(0, BarDef::mem32(4096))
    .build()
    .unwrap();
    mgr.add(Crasher { pci }, &bad, ServerOptions::default())
        .unwrap();
    assert!(matches!(
        mgr.add(
            TestDevice::new("sock-good").unwrap(),
            sock("dup"),
            ServerOptions::default()
        ),
        Err(emudev::ManagerError::Exists(_))
    ));
    let events = mgr.subscribe("crasher").unwrap();

    let mut g = connect(&good);
    let mut b = connect(&bad);
    wr32(&mut g, 0, regs::SCRATCH, 42);
    assert_eq!(b.region_read(0, 0, 4).unwrap(), vec![0x5a; 4]);
    match b.region_write(0, 0, &[1, 2, 3, 4]) {
        Err(ClientError::Server(e)) => assert_eq!(e, Errno::EIO),
        other => panic!("expected EIO, got {other:?}"),
    }
    assert_eq!(mgr.state("crasher"), Some(DeviceState::Failed));
    // A failed device refuses work but the connection and the other device live on.
    assert!(matches!(
        b.region_read(0, 0, 4),
        Err(ClientError::Server(Errno::EIO))
    ));
    assert_eq!(rd32(&mut g, 0, regs::SCRATCH), 42);
    assert!(events.try_iter().any(|e| matches!(
        e,
        emudev::DeviceEvent::StateChanged {
            to: DeviceState::Failed,
            ..
        }
    )));
    // DEVICE_RESET recovers it.
    b.reset().unwrap();
    assert_eq!(mgr.state("crasher"), Some(DeviceState::Running));
    assert_eq!(b.region_read(0, 0, 4).unwrap(), vec![0x5a; 4]);

    // Runtime attributes and removal.
    mgr.set_attr("sock-good", "scratch", "7").unwrap();
    assert_eq!(rd32(&mut g, 0, regs::SCRATCH), 7);
    assert_eq!(
        mgr.attr("sock-good", "scratch").unwrap().as_deref(),
        Some("7")
    );
    assert!(mgr.set_attr("sock-good", "nope", "1").is_err());
    assert_eq!(mgr.list().len(), 2);
    mgr.remove("crasher").unwrap();
    assert!(!bad.exists(), "socket removed with the device");
    assert!(
        b.region_read(0, 0, 4).is_err(),
        "client of a removed device is cut off"
    );
    assert_eq!(rd32(&mut g, 0, regs::SCRATCH), 7);
    assert!(matches!(
        mgr.remove("crasher"),
        Err(emudev::ManagerError::NotFound(_))
    ));
}

/// Unmap of an fd-less map while the engine loops over it. The event loop cannot wait for
/// a message chunk (it routes that chunk's reply), so the guarantee is weaker than for fd
/// maps: the old snapshot's port is closed before the reply, and at most the one chunk
/// already queued to the loop reaches the client after the reply.
#[test]
fn unmap_of_message_memory_during_dma_bounds_stale_access() {
    let mgr = DeviceManager::new();
    let path = serve(&mgr, "sock-msg-unmap");
    let mut c = connect(&path);
    let mem = VecMemory {
        base: 0x10_0000,
        bytes: Arc::new(Mutex::new(vec![0u8; 0x8000])),
    };
    c.set_memory(Box::new(mem.clone()));
    c.dma_map(0x10_0000, 0x8000, RW, None).unwrap();
    wr32(&mut c, 0, regs::DMA_REPEAT, u32::MAX);
    program(
        &mut c,
        regs::DMA_CMD_FILL,
        0x10_0000,
        0,
        0x8000,
        0xcdcd_cdcd,
    );
    let p = wait_reg(&mut c, regs::DMA_PASSES, |p| p >= 2);
    assert!(p >= 2);
    let t0 = Instant::now();
    c.dma_unmap(0x10_0000, 0x8000).unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "unmap must not wait for message DMA"
    );
    mem.bytes.lock().unwrap().fill(0);
    c.serve(Duration::from_millis(100)).unwrap();
    let dirty = mem
        .bytes
        .lock()
        .unwrap()
        .iter()
        .filter(|b| **b != 0)
        .count();
    assert!(dirty <= 4096, "{dirty} bytes written after the unmap reply");
    assert_eq!(
        wait_reg(&mut c, regs::DMA_STATUS, |s| s == regs::DMA_STATUS_ERROR),
        regs::DMA_STATUS_ERROR
    );
    assert_eq!(mgr.state("sock-msg-unmap"), Some(DeviceState::Running));
}

#[test]
fn serves_on_a_listener_the_caller_bound() {
    let mgr = DeviceManager::new();
    let path = sock("listener");
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    mgr.add_listener(
        TestDevice::new("from-fd").unwrap(),
        l,
        Some(path.clone()),
        ServerOptions::default(),
    )
    .unwrap();
    let mut c = connect(&path);
    assert_eq!(rd32(&mut c, 0, regs::ID), regs::MAGIC);
    let st = mgr.list();
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].name.as_str(), st[0].serving), ("from-fd", true));
    mgr.remove("from-fd").unwrap();
    assert!(rd_fails(&mut c));
    let _ = std::fs::remove_file(&path);
}

fn rd_fails(c: &mut Client) -> bool {
    c.region_read(0, 0, 4).is_err()
}
