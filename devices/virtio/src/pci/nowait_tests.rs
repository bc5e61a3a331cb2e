//! Message DMA (`--no-shared-mem`): the control thread is also the thread that routes DMA
//! replies, so it must never wait on a poller that may be blocked in a DMA message. These
//! tests hold a poller inside a transfer and check that memory changes, queue starts and a
//! device reset still return at once, and that a port revoked by our own side idles a queue
//! instead of breaking it.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use emudev::device::{DeviceError, DeviceModel};
use emudev::GuestMemory;
use emudev_vfio_user::{DmaError, DmaPort, DmaRegion, DmaTransport};

use super::common_cfg::offset as co;
use super::features::VIRTIO_F_VERSION_1;
use super::layout::{self, VIRTIO_BAR};
use super::*;
use crate::engine::Engine;
use crate::poller::{PollerPool, QueueHandler};
use crate::queue::testdriver::{Buf, SplitDriver};
use crate::queue::{features, Queue, QueueError};

const MEM: usize = 1 << 20;

/// Guest bytes reached only by messages.
struct Bytes(Mutex<Vec<u8>>);

/// What a [`Port`] does with a transfer.
const PASS: u8 = 0;
/// Block until set back to PASS: the client's reply is not routed yet.
const HOLD: u8 = 1;
/// Fail like a gate our side closed.
const REVOKED: u8 = 2;
/// Fail like a client refusing the address.
const REFUSED: u8 = 3;

struct Port {
    bytes: Arc<Bytes>,
    mode: AtomicU8,
    held: AtomicUsize,
}

impl Port {
    fn check(&self, addr: u64, len: usize) -> Result<(), DmaError> {
        let mut counted = false;
        loop {
            match self.mode.load(Ordering::Acquire) {
                HOLD => {
                    if !counted {
                        self.held.fetch_add(1, Ordering::AcqRel);
                        counted = true;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                REVOKED => return Err(DmaError::Disconnected),
                REFUSED => {
                    return Err(DmaError::Refused {
                        addr,
                        len: len as u64,
                        errno: 14,
                    })
                }
                _ => return Ok(()),
            }
        }
    }
}

impl DmaTransport for Port {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.check(addr, buf.len())?;
        let m = self.bytes.0.lock().map_err(|_| DmaError::Disconnected)?;
        let o = addr as usize;
        buf.copy_from_slice(&m[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.check(addr, data.len())?;
        let mut m = self.bytes.0.lock().map_err(|_| DmaError::Disconnected)?;
        let o = addr as usize;
        m[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// A snapshot of `bytes` (at guest address 0) reached through a port of its own.
fn snapshot(bytes: &Arc<Bytes>) -> (Arc<GuestMemory>, Arc<Port>) {
    let port = Arc::new(Port {
        bytes: bytes.clone(),
        mode: AtomicU8::new(PASS),
        held: AtomicUsize::new(0),
    });
    let mem = GuestMemory::from_dma(
        &[DmaRegion {
            iova: 0,
            size: MEM as u64,
            prot: 3,
            mapping: None,
            map_offset: 0,
        }],
        Some(DmaPort::new(port.clone())),
    );
    (Arc::new(mem), port)
}

fn new_bytes() -> Arc<Bytes> {
    Arc::new(Bytes(Mutex::new(vec![0; MEM])))
}

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

type Dev = VirtioPciDevice<EchoDev>;

fn wr(d: &mut Dev, off: u64, len: usize, v: u64) {
    d.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
}

fn rd(d: &mut Dev, off: u64, len: usize) -> u64 {
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

/// A device whose engine waits would be noticed: 10 s, far above the bounds asserted.
fn device(name: &str, pool: &Arc<PollerPool>) -> Dev {
    let mut d = VirtioPciDevice::new(name, EchoDev { pool: pool.clone() }).unwrap();
    d.set_engine_timeout(Duration::from_secs(10));
    d
}

/// Reset, negotiate, place queue 0 and set DRIVER_OK, as a guest driver does.
fn bring_up(d: &mut Dev, drv: &SplitDriver) {
    wr(d, co::DEVICE_STATUS, 1, 0);
    wr(d, co::DEVICE_STATUS, 1, 3);
    wr(d, co::DRIVER_FEATURE_SELECT, 4, 1);
    wr(d, co::DRIVER_FEATURE, 4, VIRTIO_F_VERSION_1 >> 32);
    wr(d, co::DEVICE_STATUS, 1, 0xb);
    wr(d, co::QUEUE_SELECT, 2, 0);
    wr(d, co::QUEUE_DESC_LO, 8, drv.desc);
    wr(d, co::QUEUE_DRIVER_LO, 8, drv.avail);
    wr(d, co::QUEUE_DEVICE_LO, 8, drv.used);
    wr(d, co::QUEUE_ENABLE, 2, 1);
    wr(d, co::DEVICE_STATUS, 1, 0xf);
}

fn echo(d: &mut Dev, drv: &mut SplitDriver, src: u64, dst: u64, msg: &[u8]) {
    drv.mem.write(src, msg).unwrap();
    let head = drv.add_chain(&[Buf::r(src, msg.len() as u32), Buf::w(dst, 64)]);
    wr(d, layout::NOTIFY_OFFSET, 2, 0);
    let mut used = None;
    wait_for("used entry", || {
        used = drv.pop_used();
        used.is_some()
    });
    assert_eq!(used, Some((u32::from(head), msg.len() as u32)));
    let mut out = vec![0u8; msg.len()];
    drv.mem.read(dst, &mut out).unwrap();
    assert_eq!(out, msg);
}

#[test]
fn control_thread_never_waits_on_a_poller_blocked_in_message_dma() {
    let pool = PollerPool::new(1).unwrap();
    let bytes = new_bytes();
    let (driver_mem, _) = snapshot(&bytes);
    let (dev_mem, port) = snapshot(&bytes);

    // Releases the poller even if an assertion fails (the pool joins it on drop).
    struct Release(Arc<Port>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.mode.store(PASS, Ordering::Release);
        }
    }
    let _release = Release(port.clone());

    let mut d1 = device("held0", &pool);
    // Built before the poller blocks: construction itself waits for the engine.
    let mut d2 = device("held1", &pool);
    assert!(d1.set_memory_lazy(&dev_mem));
    let mut drv1 = SplitDriver::new(driver_mem.clone(), 0x1_0000, 16);
    bring_up(&mut d1, &drv1);
    assert!(d1.queue_started(0));
    echo(&mut d1, &mut drv1, 0x8_0000, 0x9_0000, b"before");

    // The poller thread blocks inside a transfer of d1's queue, as it does while the
    // control thread is busy and cannot route the reply.
    port.mode.store(HOLD, Ordering::Release);
    drv1.mem.write(0x8_0000, b"held").unwrap();
    drv1.add_chain(&[Buf::r(0x8_0000, 4), Buf::w(0x9_0000, 64)]);
    wr(&mut d1, layout::NOTIFY_OFFSET, 2, 0);
    wait_for("a held transfer", || port.held.load(Ordering::Acquire) > 0);

    let t0 = Instant::now();
    // A second device on the same (blocked) poller thread: memory and queue start.
    let (mem2, _) = snapshot(&bytes);
    assert!(d2.set_memory_lazy(&mem2));
    let mut drv2 = SplitDriver::new(driver_mem.clone(), 0x4_0000, 16);
    bring_up(&mut d2, &drv2);
    assert!(
        d2.queue_started(0),
        "queue start must not wait for the poller"
    );
    // A memory change and a device reset of the blocked device.
    let (mem3, _) = snapshot(&bytes);
    assert!(d1.set_memory_lazy(&mem3));
    wr(&mut d1, co::DEVICE_STATUS, 1, 0);
    let status = rd(&mut d1, co::DEVICE_STATUS, 1);
    let spent = t0.elapsed();
    assert!(
        spent < Duration::from_secs(1),
        "control thread waited {spent:?}"
    );
    // The reset is not complete while its queue is still on the poller: status not 0.
    assert_ne!(status, 0);
    assert!(!d1.queue_started(0));

    // The reply arrives: the stop finishes, the reset completes, d2 runs.
    port.mode.store(PASS, Ordering::Release);
    wait_for("reset to complete", || {
        rd(&mut d1, co::DEVICE_STATUS, 1) == 0
    });
    echo(&mut d2, &mut drv2, 0xa_0000, 0xb_0000, b"second device");
    assert_eq!(d1.stats().engine_timeouts, 0);
    assert_eq!(d2.stats().engine_timeouts, 0);
}

#[test]
fn revoked_port_idles_the_queue_and_keeps_staged_completions() {
    let bytes = new_bytes();
    let (driver_mem, _) = snapshot(&bytes);
    let (old, old_port) = snapshot(&bytes);
    let mut drv = SplitDriver::new(driver_mem, 0x1_0000, 16);
    let mut q = Queue::new(drv.config(), features::VERSION_1, old).unwrap();
    let h0 = drv.add_chain(&[Buf::w(0x8_0000, 8)]);
    let h1 = drv.add_chain(&[Buf::w(0x8_1000, 8)]);
    let c0 = q.pop().unwrap().unwrap();
    let c1 = q.pop().unwrap().unwrap();
    assert_eq!((c0.head(), c1.head()), (h0, h1));

    // Our side closes the port (a change retiring a host mapping): the flush fails, but
    // the queue only waits; nothing is lost and nothing is sticky.
    q.add_used(c0.head(), 1);
    old_port.mode.store(REVOKED, Ordering::Release);
    assert!(!q.flush_used());
    assert!(q.error().is_none());
    assert!(q.waiting_for_memory().is_some());
    assert!(q.pop().unwrap().is_none());
    // A request still in flight completes meanwhile.
    q.add_used(c1.head(), 2);
    assert_eq!(drv.used_idx(), 0);

    let (new, new_port) = snapshot(&bytes);
    q.set_memory(new).unwrap();
    assert!(q.waiting_for_memory().is_none());
    assert_eq!(drv.pop_used(), Some((u32::from(h0), 1)));
    assert_eq!(drv.pop_used(), Some((u32::from(h1), 2)));
    assert_eq!(q.state().next_used, 2);

    // A client refusing a ring access is still the driver's problem: sticky.
    drv.add_chain(&[Buf::w(0x8_2000, 8)]);
    new_port.mode.store(REFUSED, Ordering::Release);
    assert!(q.pop().is_err());
    assert!(matches!(q.error(), Some(QueueError::Memory(_))));
}

#[test]
fn ring_error_of_a_queue_stopping_for_reset_does_not_outlive_the_reset() {
    let pool = PollerPool::new(1).unwrap();
    let bytes = new_bytes();
    let (driver_mem, _) = snapshot(&bytes);
    let (dev_mem, port) = snapshot(&bytes);
    struct Release(Arc<Port>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.mode.store(PASS, Ordering::Release);
        }
    }
    let _release = Release(port.clone());

    let mut d = device("late-error", &pool);
    assert!(d.set_memory_lazy(&dev_mem));
    let mut drv = SplitDriver::new(driver_mem, 0x1_0000, 16);
    bring_up(&mut d, &drv);
    echo(&mut d, &mut drv, 0x8_0000, 0x9_0000, b"before");

    // The poller blocks in a transfer; the driver resets meanwhile.
    port.mode.store(HOLD, Ordering::Release);
    drv.add_chain(&[Buf::r(0x8_0000, 4), Buf::w(0x9_0000, 64)]);
    wr(&mut d, layout::NOTIFY_OFFSET, 2, 0);
    wait_for("a held transfer", || port.held.load(Ordering::Acquire) > 0);
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    assert_ne!(
        rd(&mut d, co::DEVICE_STATUS, 1),
        0,
        "reset still in progress"
    );

    // The transfer then fails: the old queue reports a ring error while it stops. That
    // error belongs to the device instance the driver just reset, so the reset still
    // completes to 0 (Linux polls for 0 forever) and stays there.
    port.mode.store(REFUSED, Ordering::Release);
    wait_for("reset to complete", || {
        rd(&mut d, co::DEVICE_STATUS, 1) == 0
    });
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0);

    // The next bring-up starts clean: no DEVICE_NEEDS_RESET carried over.
    port.mode.store(PASS, Ordering::Release);
    let mut drv = SplitDriver::new(drv.mem.clone(), 0x2_0000, 16);
    bring_up(&mut d, &drv);
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0xf);
    echo(&mut d, &mut drv, 0x8_0000, 0x9_0000, b"after");
    assert_eq!(rd(&mut d, co::DEVICE_STATUS, 1), 0xf);
}
