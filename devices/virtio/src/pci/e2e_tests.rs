//! End to end: an "echo" device type on the real poller engine, driven through the BAR
//! registers like a guest driver, with a split ring in guest memory and an MSI-X eventfd.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::device::{DeviceError, DeviceModel};
use emudev::pci::cap_id;
use emudev::transport::InProc;
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::common_cfg::offset as co;
use super::features::VIRTIO_F_VERSION_1;
use super::layout::{self, VIRTIO_BAR};
use super::*;
use crate::engine::Engine;
use crate::poller::{PollerPool, QueueHandler};
use crate::queue::testdriver::{anon_memory, Buf, SplitDriver};
use crate::queue::Queue;

/// Copies each chain's readable bytes into its writable buffers.
struct Echo;

impl QueueHandler for Echo {
    fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            let Ok(Some(chain)) = q.pop() else { break };
            let mem = q.memory().clone();
            let mut buf = vec![0u8; chain.readable_len() as usize];
            let read = chain.reader(&mem).read(&mut buf).unwrap_or(0);
            let written = chain.writer(&mem).write(&buf[..read]).unwrap_or(0);
            q.add_used(chain.head(), written as u32);
            n += 1;
        }
        n
    }
}

struct EchoDev {
    pool: Arc<PollerPool>,
}

impl VirtioDeviceType for EchoDev {
    fn device_id(&self) -> u16 {
        0x20
    }
    fn class_code(&self) -> u32 {
        0xff_0000
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn config_len(&self) -> usize {
        0
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn create_engine(&mut self) -> Result<Box<dyn Engine>, DeviceError> {
        Ok(Box::new(self.pool.engine(Box::new(|_, _| {
            Box::new(Echo) as Box<dyn QueueHandler>
        }))))
    }
}

fn wr(d: &mut VirtioPciDevice<EchoDev>, off: u64, len: usize, v: u64) {
    d.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
}

fn rd(d: &mut VirtioPciDevice<EchoDev>, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(VIRTIO_BAR, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn echo_device_over_the_poller() {
    let pool = PollerPool::new(1).unwrap();
    let mem = anon_memory(0, 1 << 20);
    let mut d = VirtioPciDevice::new("echo0", EchoDev { pool }).unwrap();
    d.quiesce().unwrap();
    d.set_memory(mem.clone());
    d.resume();

    // MSI-X as QEMU sets it up: an eventfd per vector, then Enable in the capability.
    let irq = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap();
    let msix = d.pci().msix().unwrap().clone();
    msix.set_vector_fd(1, Some(irq.as_fd().try_clone_to_owned().unwrap()))
        .unwrap();
    let ctrl = u64::from(d.pci().find_capability(cap_id::MSIX).unwrap().offset) + 3;
    d.pci().config_write(ctrl, &[0x80]).unwrap();
    d.config_written(ctrl, 1);

    let mut drv = SplitDriver::new(mem.clone(), 0x1_0000, 16);
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    wr(&mut d, co::DEVICE_STATUS, 1, 3);
    wr(&mut d, co::DRIVER_FEATURE_SELECT, 4, 1);
    wr(&mut d, co::DRIVER_FEATURE, 4, VIRTIO_F_VERSION_1 >> 32);
    wr(&mut d, co::DEVICE_STATUS, 1, 0xb);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0xb);
    wr(&mut d, co::QUEUE_SELECT, 2, 0);
    wr(&mut d, co::QUEUE_DESC_LO, 8, drv.desc);
    wr(&mut d, co::QUEUE_DRIVER_LO, 8, drv.avail);
    wr(&mut d, co::QUEUE_DEVICE_LO, 8, drv.used);
    wr(&mut d, co::QUEUE_MSIX_VECTOR, 2, 1);
    wr(&mut d, co::QUEUE_ENABLE, 2, 1);
    wr(&mut d, co::DEVICE_STATUS, 1, 0xf);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0xf);
    assert!(d.queue_started(0));

    for (i, msg) in [&b"hello"[..], b"virtio-pci"].iter().enumerate() {
        let src = 0x8_0000 + 0x1000 * i as u64;
        let dst = 0x9_0000 + 0x1000 * i as u64;
        mem.write(src, msg).unwrap();
        let head = drv.add_chain(&[Buf::r(src, msg.len() as u32), Buf::w(dst, 64)]);
        wr(&mut d, layout::NOTIFY_OFFSET, 2, 0);
        let mut used = None;
        wait_for("used entry", || {
            used = drv.pop_used();
            used.is_some()
        });
        assert_eq!(used, Some((u32::from(head), msg.len() as u32)));
        let mut out = vec![0u8; msg.len()];
        mem.read(dst, &mut out).unwrap();
        assert_eq!(&out, msg);
        wait_for("MSI-X interrupt", || irq.read().is_ok());
    }
    let st = d.stats();
    assert!(st.queues[0].kicks >= 2 && st.queues[0].interrupts >= 2);

    // Reset: the queue is stopped before status reads 0 (the driver polls it, since the
    // control thread does not wait for the poller), and a later kick does nothing.
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    wait_for("reset", || rd(&mut d, co::DEVICE_STATUS, 1) == 0);
    assert!(!d.queue_started(0));
    let used_before = drv.used_idx();
    mem.write(0x8_0000, b"late").unwrap();
    drv.add_chain(&[Buf::r(0x8_0000, 4), Buf::w(0x9_0000, 64)]);
    wr(&mut d, layout::NOTIFY_OFFSET, 2, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.used_idx(), used_before);
}

/// The PCI-cfg access window, as SeaBIOS uses it when the virtio BAR is above 4 GiB.
struct Window {
    cap: u64,
}

impl Window {
    fn find(io: &mut InProc<VirtioPciDevice<EchoDev>>) -> Self {
        let cap = io.with_device(|d| {
            let pci = d.pci();
            pci.capabilities()
                .iter()
                .filter(|c| c.id == cap_id::VENDOR)
                .map(|c| c.offset)
                .find(|&o| pci.config().u8_at(usize::from(o) + 3) == 5)
                .unwrap()
        });
        Self {
            cap: u64::from(cap),
        }
    }

    fn setup(&self, io: &mut InProc<VirtioPciDevice<EchoDev>>, off: u64, len: usize) {
        io.config_write(self.cap + 4, &[VIRTIO_BAR]).unwrap();
        io.config_write(self.cap + 8, &(off as u32).to_le_bytes())
            .unwrap();
        io.config_write(self.cap + 12, &(len as u32).to_le_bytes())
            .unwrap();
    }

    fn write(&self, io: &mut InProc<VirtioPciDevice<EchoDev>>, off: u64, len: usize, v: u64) {
        self.setup(io, off, len);
        io.config_write(self.cap + 16, &v.to_le_bytes()[..len])
            .unwrap();
    }

    fn read(&self, io: &mut InProc<VirtioPciDevice<EchoDev>>, off: u64, len: usize) -> u64 {
        self.setup(io, off, len);
        let mut b = [0u8; 8];
        io.config_read(self.cap + 16, &mut b[..len]).unwrap();
        u64::from_le_bytes(b)
    }
}

#[test]
fn echo_through_the_vfio_user_adapter_with_intx_and_the_pci_cfg_window() {
    let pool = PollerPool::new(1).unwrap();
    let dev = VirtioPciDevice::new("echo1", EchoDev { pool }).unwrap();
    let mut io = InProc::new(dev, 2).unwrap();
    let intx = io.enable_intx().unwrap();
    let w = Window::find(&mut io);
    let mem = io.mem().clone();
    let mut drv = SplitDriver::new(mem.clone(), 0x1_0000, 8);

    // SeaBIOS-style bring-up, every access through config space.
    w.write(&mut io, co::DEVICE_STATUS, 1, 0);
    w.write(&mut io, co::DEVICE_STATUS, 1, 3);
    w.write(&mut io, co::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(w.read(&mut io, co::DEVICE_FEATURE, 4) & 1, 1, "VERSION_1");
    w.write(&mut io, co::DRIVER_FEATURE_SELECT, 4, 1);
    w.write(&mut io, co::DRIVER_FEATURE, 4, 1);
    w.write(&mut io, co::DEVICE_STATUS, 1, 0xb);
    assert_eq!(w.read(&mut io, co::DEVICE_STATUS, 1), 0xb);
    w.write(&mut io, co::QUEUE_SELECT, 2, 0);
    assert_eq!(w.read(&mut io, co::QUEUE_SIZE, 2), 16);
    w.write(&mut io, co::QUEUE_SIZE, 2, 8);
    for (lo, v) in [
        (co::QUEUE_DESC_LO, drv.desc),
        (co::QUEUE_DRIVER_LO, drv.avail),
        (co::QUEUE_DEVICE_LO, drv.used),
    ] {
        w.write(&mut io, lo, 4, v & 0xffff_ffff);
        w.write(&mut io, lo + 4, 4, v >> 32);
    }
    w.write(&mut io, co::QUEUE_ENABLE, 2, 1);
    w.write(&mut io, co::DEVICE_STATUS, 1, 0xf);
    assert!(io.with_device(|d| d.queue_started(0)));

    mem.write(0x8_0000, b"ping").unwrap();
    let head = drv.add_chain(&[Buf::r(0x8_0000, 4), Buf::w(0x9_0000, 16)]);
    let notify_off = w.read(&mut io, co::QUEUE_NOTIFY_OFF, 2);
    w.write(&mut io, layout::NOTIFY_OFFSET + 4 * notify_off, 2, 0);
    let mut used = None;
    wait_for("used entry", || {
        used = drv.pop_used();
        used.is_some()
    });
    assert_eq!(used, Some((u32::from(head), 4)));
    let mut out = [0u8; 4];
    mem.read(0x9_0000, &mut out).unwrap();
    assert_eq!(&out, b"ping");

    // INTx with ISR bit 0; reading the ISR clears it and lowers the line.
    assert!(intx.wait(Duration::from_secs(5)) >= 1);
    let mut st = [0u8; 2];
    io.config_read(6, &mut st).unwrap();
    assert_ne!(u16::from_le_bytes(st) & 0x8, 0, "status interrupt bit");
    assert_eq!(w.read(&mut io, layout::ISR_OFFSET, 1), 1);
    assert_eq!(w.read(&mut io, layout::ISR_OFFSET, 1), 0);
    io.config_read(6, &mut st).unwrap();
    assert_eq!(u16::from_le_bytes(st) & 0x8, 0);

    // DEVICE_RESET from the client: queues stopped, registers at power-on values.
    io.reset().unwrap();
    assert!(!io.with_device(|d| d.queue_started(0)));
    wait_for("reset", || w.read(&mut io, co::DEVICE_STATUS, 1) == 0);
}
