//! A small guest-side virtio-blk driver over the full device stack, shared by the ring
//! bad-input and fault tests: `VirtioPciDevice<VirtioBlkDevice>` behind emudev's in-process
//! transport (the vfio-user adapter with its range checks), MSI-X eventfds, and a split ring
//! written by the test like a guest driver would. Every register access is a region access.
#![allow(dead_code)] // Each test binary uses a different part.

use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::transport::inproc::IrqWaiter;
use emudev::transport::InProc;
use emudev_blk::backend::BlockBackend;
use emudev_blk::config::BlkOptions;
use emudev_blk::device::VirtioBlkDevice;
use emudev_blk::request::{req_type, status, VirtioBlkOutHdr};
use emudev_virtio::pci::common_cfg::{offset as co, status as st};
use emudev_virtio::pci::layout::{NOTIFY_OFFSET, VIRTIO_BAR};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::poller::PollerPool;
use emudev_virtio::queue::features as qf;
use emudev_virtio::queue::testdriver::{Buf, SplitDriver};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

pub type Dev = VirtioPciDevice<VirtioBlkDevice>;

pub const T: Duration = Duration::from_secs(5);
/// Queue size the rig negotiates.
pub const QSIZE: u16 = 16;
/// Guest RAM the rig maps at 0.
pub const RAM_MIB: u64 = 4;
/// Split ring location.
pub const RING: u64 = 0x1_0000;
/// Request scratch area: header, data, status per slot (0x4000 apart).
pub const REQS: u64 = 0x10_0000;

const BAR: u32 = VIRTIO_BAR as u32;

/// One virtio-blk device on the full stack, with a split-ring driver.
pub struct BlkRig {
    pub io: InProc<Dev>,
    pub drv: SplitDriver,
    /// MSI-X vector 0 (config changes) and 1 (queue 0).
    pub config_irq: IrqWaiter,
    pub queue_irq: IrqWaiter,
    notify: u64,
}

/// `virtio_blk_outhdr` bytes.
pub fn hdr(ty: u32, sector: u64) -> VirtioBlkOutHdr {
    VirtioBlkOutHdr {
        type_: U32::new(ty),
        ioprio: U32::new(0),
        sector: U64::new(sector),
    }
}

/// Wait up to `t` for `f`.
pub fn wait_until(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + t;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl BlkRig {
    /// A device over `backend` with queues on `pool`, brought up to DRIVER_OK with
    /// VERSION_1 and INDIRECT_DESC.
    pub fn new(backend: Arc<dyn BlockBackend>, pool: Arc<PollerPool>) -> Self {
        let opts = BlkOptions {
            num_queues: 1,
            queue_size: 64,
            ..Default::default()
        };
        let blk = VirtioBlkDevice::new(backend, opts, pool).expect("blk device");
        let dev = VirtioPciDevice::new("rig-blk", blk).expect("virtio-pci device");
        let mut io = InProc::new(dev, RAM_MIB).expect("in-process transport");
        let mut irqs = io.enable_msix(2).expect("MSI-X").into_iter();
        let config_irq = irqs.next().expect("vector 0");
        let queue_irq = irqs.next().expect("vector 1");
        let drv = SplitDriver::new(io.mem().clone(), RING, QSIZE);
        let mut rig = Self {
            io,
            drv,
            config_irq,
            queue_irq,
            notify: 0,
        };
        rig.bring_up();
        rig
    }

    pub fn wr(&mut self, off: u64, len: usize, v: u64) {
        self.io
            .region_write(BAR, off, &v.to_le_bytes()[..len])
            .expect("BAR write");
    }

    pub fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.io
            .region_read(BAR, off, &mut b[..len])
            .expect("BAR read");
        u64::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u8 {
        self.rd(co::DEVICE_STATUS, 1) as u8
    }

    /// Reset (status 0), lay out a fresh ring and bring the device up again.
    pub fn bring_up(&mut self) {
        self.wr(co::DEVICE_STATUS, 1, 0);
        assert!(
            wait_until(T, || self.status() == 0),
            "reset did not complete"
        );
        self.drv = SplitDriver::new(self.io.mem().clone(), RING, QSIZE);
        self.wr(co::DEVICE_STATUS, 1, u64::from(st::ACKNOWLEDGE));
        self.wr(
            co::DEVICE_STATUS,
            1,
            u64::from(st::ACKNOWLEDGE | st::DRIVER),
        );
        let want = qf::VERSION_1 | qf::INDIRECT_DESC;
        for sel in 0..2u64 {
            self.wr(co::DEVICE_FEATURE_SELECT, 4, sel);
            let offered = self.rd(co::DEVICE_FEATURE, 4) << (32 * sel);
            self.wr(co::DRIVER_FEATURE_SELECT, 4, sel);
            self.wr(
                co::DRIVER_FEATURE,
                4,
                ((want & offered) >> (32 * sel)) & 0xffff_ffff,
            );
        }
        self.wr(co::DEVICE_STATUS, 1, 0xb);
        assert_eq!(self.status(), 0xb, "FEATURES_OK refused");
        self.wr(co::CONFIG_MSIX_VECTOR, 2, 0);
        self.wr(co::QUEUE_SELECT, 2, 0);
        self.wr(co::QUEUE_SIZE, 2, u64::from(QSIZE));
        self.wr(co::QUEUE_DESC_LO, 8, self.drv.desc);
        self.wr(co::QUEUE_DRIVER_LO, 8, self.drv.avail);
        self.wr(co::QUEUE_DEVICE_LO, 8, self.drv.used);
        self.wr(co::QUEUE_MSIX_VECTOR, 2, 1);
        self.wr(co::QUEUE_ENABLE, 2, 1);
        self.notify = NOTIFY_OFFSET + 4 * self.rd(co::QUEUE_NOTIFY_OFF, 2);
        self.wr(co::DEVICE_STATUS, 1, 0xf);
        assert_eq!(self.status(), 0xf, "DRIVER_OK refused");
        assert!(
            self.io.with_device(|d| d.queue_started(0)),
            "queue 0 not started"
        );
        self.config_irq.take();
        self.queue_irq.take();
    }

    /// Kick queue 0.
    pub fn kick(&mut self) {
        self.wr(self.notify, 2, 0);
    }

    /// Wait for the next used entry.
    pub fn wait_used(&mut self, t: Duration) -> Option<(u32, u32)> {
        let mut u = None;
        wait_until(t, || {
            u = self.drv.pop_used();
            u.is_some()
        });
        u
    }

    /// True once DEVICE_NEEDS_RESET is set (waits up to `t`).
    pub fn wait_needs_reset(&mut self, t: Duration) -> bool {
        wait_until(t, || self.status() & st::DEVICE_NEEDS_RESET != 0)
    }

    fn slot(i: u64) -> (u64, u64, u64) {
        let base = REQS + i * 0x4000;
        (base, base + 0x1000, base + 0x20)
    }

    /// Queue a write of `data` at `sector` in scratch slot `i` (not kicked).
    pub fn push_write(&mut self, i: u64, sector: u64, data: &[u8]) -> u64 {
        let (h, d, s) = Self::slot(i);
        let mem = self.io.mem().clone();
        mem.write(h, hdr(req_type::OUT, sector).as_bytes())
            .expect("hdr");
        mem.write(d, data).expect("data");
        mem.write(s, &[0xff]).expect("status");
        self.drv
            .add_chain(&[Buf::r(h, 16), Buf::r(d, data.len() as u32), Buf::w(s, 1)]);
        s
    }

    /// Queue a read of `len` bytes at `sector` in scratch slot `i`; returns (data, status)
    /// addresses.
    pub fn push_read(&mut self, i: u64, sector: u64, len: u32) -> (u64, u64) {
        let (h, d, s) = Self::slot(i);
        let mem = self.io.mem().clone();
        mem.write(h, hdr(req_type::IN, sector).as_bytes())
            .expect("hdr");
        mem.write(s, &[0xff]).expect("status");
        self.drv
            .add_chain(&[Buf::r(h, 16), Buf::w(d, len), Buf::w(s, 1)]);
        (d, s)
    }

    pub fn byte(&self, gpa: u64) -> u8 {
        let mut b = [0u8];
        self.io.mem().read(gpa, &mut b).expect("read byte");
        b[0]
    }

    /// Write `data` at `sector` and wait for its completion; returns the status byte.
    pub fn write_sync(&mut self, sector: u64, data: &[u8]) -> u8 {
        let s = self.push_write(0, sector, data);
        self.kick();
        self.wait_used(T).expect("write completion");
        self.byte(s)
    }

    /// Read `len` bytes at `sector`; returns (status, data).
    pub fn read_sync(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let (d, s) = self.push_read(1, sector, len);
        self.kick();
        self.wait_used(T).expect("read completion");
        let mut out = vec![0u8; len as usize];
        self.io.mem().read(d, &mut out).expect("read data");
        (self.byte(s), out)
    }

    /// A full write + read-back round trip; panics unless both succeed with the same data.
    pub fn check_serves(&mut self, sector: u64, seed: u8) {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed)
            .collect();
        assert_eq!(self.write_sync(sector, &data), status::OK, "write status");
        let (s, back) = self.read_sync(sector, 4096);
        assert_eq!(s, status::OK, "read status");
        assert!(back == data, "read-back differs from what was written");
    }
}
