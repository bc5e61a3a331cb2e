//! End to end: an "echo" device type on the real poller engine, driven through the BAR
//! registers like a guest driver, with a split ring in guest memory and an MSI-X eventfd.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::device::{DeviceError, DeviceModel};
use emudev::pci::cap_id;
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

    // Reset: the queue is stopped before status reads 0, and a later kick does nothing.
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0);
    assert!(!d.queue_started(0));
    let used_before = drv.used_idx();
    mem.write(0x8_0000, b"late").unwrap();
    drv.add_chain(&[Buf::r(0x8_0000, 4), Buf::w(0x9_0000, 64)]);
    wr(&mut d, layout::NOTIFY_OFFSET, 2, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.used_idx(), used_before);
}
