//! Shared by the integration tests: a minimal virtio-pci driver over the in-process
//! transport, and a qemu-storage-daemon vhost-user-blk export.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::transport::inproc::IrqWaiter;
use emudev::transport::InProc;
use emudev::GuestMemory;
use emudev_vhost::VhostUserDevice;
use emudev_virtio::pci::common_cfg::{offset as co, status};
use emudev_virtio::pci::layout::{NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, VIRTIO_BAR};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::queue::testdriver::{Buf, SplitDriver};

pub const QSD: &str = "/usr/bin/qemu-storage-daemon";

pub type Dev = InProc<VirtioPciDevice<VhostUserDevice>>;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "emudev-vhost-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A qemu-storage-daemon serving `image` as vhost-user-blk on `sock`; killed on drop.
pub struct Qsd(Child);

impl Qsd {
    pub fn start(image: &Path, sock: &Path) -> Self {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,writable=on,\
                 addr.type=unix,addr.path={}",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child)
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn have_qsd() -> bool {
    if Path::new(QSD).exists() {
        true
    } else {
        eprintln!("SKIP: {QSD} is not installed");
        false
    }
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn bar() -> u32 {
    u32::from(VIRTIO_BAR)
}

pub fn wr(d: &mut Dev, off: u64, len: usize, v: u64) {
    d.region_write(bar(), off, &v.to_le_bytes()[..len]).unwrap();
}

pub fn rd(d: &mut Dev, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.region_read(bar(), off, &mut b[..len]).unwrap();
    u64::from_le_bytes(b)
}

pub fn device_features(d: &mut Dev) -> u64 {
    wr(d, co::DEVICE_FEATURE_SELECT, 4, 0);
    let lo = rd(d, co::DEVICE_FEATURE, 4);
    wr(d, co::DEVICE_FEATURE_SELECT, 4, 1);
    let hi = rd(d, co::DEVICE_FEATURE, 4);
    lo | (hi << 32)
}

/// Driver init up to FEATURES_OK with `features`; returns the status read back.
pub fn negotiate(d: &mut Dev, features: u64) -> u8 {
    wr(d, co::DEVICE_STATUS, 1, 0);
    wr(
        d,
        co::DEVICE_STATUS,
        1,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
    );
    wr(d, co::DRIVER_FEATURE_SELECT, 4, 0);
    wr(d, co::DRIVER_FEATURE, 4, features & 0xffff_ffff);
    wr(d, co::DRIVER_FEATURE_SELECT, 4, 1);
    wr(d, co::DRIVER_FEATURE, 4, features >> 32);
    wr(
        d,
        co::DEVICE_STATUS,
        1,
        u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
    );
    rd(d, co::DEVICE_STATUS, 1) as u8
}

/// Program queue `q` from `drv` with MSI-X vector `vector` and enable it.
pub fn setup_queue(d: &mut Dev, q: u16, drv: &SplitDriver, vector: u16) {
    wr(d, co::QUEUE_SELECT, 2, u64::from(q));
    wr(d, co::QUEUE_SIZE, 2, u64::from(drv.config().size));
    wr(d, co::QUEUE_DESC_LO, 8, drv.desc);
    wr(d, co::QUEUE_DRIVER_LO, 8, drv.avail);
    wr(d, co::QUEUE_DEVICE_LO, 8, drv.used);
    wr(d, co::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
    wr(d, co::QUEUE_ENABLE, 2, 1);
}

pub fn driver_ok(d: &mut Dev) -> u8 {
    let s = rd(d, co::DEVICE_STATUS, 1) | u64::from(status::DRIVER_OK);
    wr(d, co::DEVICE_STATUS, 1, s);
    rd(d, co::DEVICE_STATUS, 1) as u8
}

pub fn notify(d: &mut Dev, q: u16) {
    let off = NOTIFY_OFFSET + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER);
    wr(d, off, 2, u64::from(q));
}

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;

/// Guest addresses a block request of ours uses (inside 1 MiB..2 MiB).
pub struct Req {
    pub hdr: u64,
    pub data: u64,
    pub status: u64,
}

pub fn req_at(slot: u64) -> Req {
    let base = 0x10_0000 + slot * 0x2000;
    Req {
        hdr: base,
        data: base + 0x1000,
        status: base + 0x800,
    }
}

/// Submit one virtio-blk request of `len` bytes at `sector` and wait for it; returns the
/// status byte.
#[allow(clippy::too_many_arguments)]
pub fn blk_io(
    d: &mut Dev,
    drv: &mut SplitDriver,
    mem: &Arc<GuestMemory>,
    irq: &IrqWaiter,
    slot: u64,
    kind: u32,
    sector: u64,
    len: u32,
) -> u8 {
    let r = req_at(slot);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write(r.hdr, &hdr).unwrap();
    mem.write(r.status, &[0xff]).unwrap();
    let data = if kind == VIRTIO_BLK_T_IN {
        Buf::w(r.data, len)
    } else {
        Buf::r(r.data, len)
    };
    let head = drv.add_chain(&[Buf::r(r.hdr, 16), data, Buf::w(r.status, 1)]);
    notify(d, 0);
    let mut used = None;
    wait_for("used entry", || {
        used = drv.pop_used();
        used.is_some()
    });
    assert_eq!(used.map(|u| u.0), Some(u32::from(head)));
    assert!(irq.wait(Duration::from_secs(5)) > 0, "no interrupt");
    let mut st = [0u8];
    mem.read(r.status, &mut st).unwrap();
    st[0]
}
