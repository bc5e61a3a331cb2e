//! The bridge against a real qemu-storage-daemon vhost-user-blk export: our in-process
//! vfio-user transport and virtio-pci device, a test driver's split ring in memfd guest
//! memory, qsd running the ring. Skips when qsd is not installed.

mod common;

use std::time::Duration;

use common::*;
use emudev::transport::InProc;
use emudev_vhost::{BackendOptions, VhostDeviceOptions, VhostKind, VhostUserDevice};
use emudev_virtio::pci::common_cfg::{offset as co, status};
use emudev_virtio::pci::layout::DEVICE_CFG_OFFSET;
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::queue::testdriver::SplitDriver;

const VERSION_1: u64 = 1 << 32;
const IMAGE_SIZE: u64 = 4 << 20;

fn pattern(sector: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| (i ^ sector.wrapping_mul(31)) as u8)
        .collect()
}

fn open(dir: &TempDir) -> (Qsd, Dev, std::path::PathBuf) {
    let image = dir.0.join("disk.img");
    let mut img = Vec::with_capacity(IMAGE_SIZE as usize);
    for s in 0..IMAGE_SIZE / 512 {
        img.extend_from_slice(&pattern(s));
    }
    std::fs::write(&image, &img).unwrap();
    let sock = dir.0.join("vhost.sock");
    let qsd = Qsd::start(&image, &sock);
    let opts = VhostDeviceOptions {
        kind: VhostKind::Blk,
        queue_size: 64,
        backend: BackendOptions::default(),
    };
    let dev = VhostUserDevice::connect("vblk", &sock, opts).unwrap();
    let pci = VirtioPciDevice::new("vblk", dev).unwrap();
    let d = InProc::new(pci, 16).unwrap();
    (qsd, d, image)
}

#[test]
fn qsd_blk_reads_writes_and_resets_through_the_bridge() {
    if !have_qsd() {
        return;
    }
    let dir = TempDir::new("qsd");
    let (_qsd, mut d, image) = open(&dir);
    // Capacity from the backend's configuration (GET_CONFIG).
    let cap = rd(&mut d, DEVICE_CFG_OFFSET, 8);
    assert_eq!(cap, IMAGE_SIZE / 512);
    let offered = device_features(&mut d);
    assert!(offered & VERSION_1 != 0);
    assert_eq!(offered & (1 << 34), 0, "packed rings must not be offered");

    let irqs = d.enable_msix(2).unwrap();
    let st = negotiate(&mut d, VERSION_1);
    assert_ne!(st & status::FEATURES_OK, 0);
    let mem = d.mem().clone();
    let mut drv = SplitDriver::new(mem.clone(), 0x8_0000, 64);
    setup_queue(&mut d, 0, &drv, 1);
    assert_eq!(driver_ok(&mut d) & status::DEVICE_NEEDS_RESET, 0);

    for s in [0u64, 7, 100] {
        let st = blk_io(&mut d, &mut drv, &mem, &irqs[1], 0, VIRTIO_BLK_T_IN, s, 512);
        assert_eq!(st, 0);
        let mut got = vec![0u8; 512];
        mem.read(req_at(0).data, &mut got).unwrap();
        assert_eq!(got, pattern(s), "sector {s}");
    }
    let data: Vec<u8> = (0..512).map(|i| (i * 7 + 1) as u8).collect();
    mem.write(req_at(1).data, &data).unwrap();
    let st = blk_io(
        &mut d,
        &mut drv,
        &mem,
        &irqs[1],
        1,
        VIRTIO_BLK_T_OUT,
        3,
        512,
    );
    assert_eq!(st, 0);
    let file = std::fs::read(&image).unwrap();
    assert_eq!(&file[3 * 512..4 * 512], &data[..]);

    // Reset: the ring stops (GET_VRING_BASE); status reads 0 once it has.
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    wait_for("reset", || rd(&mut d, co::DEVICE_STATUS, 1) == 0);
    assert!(!d.with_device(|p| p.queue_started(0)));

    // A fresh driver instance on the same backend works again from index 0.
    let st = negotiate(&mut d, VERSION_1);
    assert_ne!(st & status::FEATURES_OK, 0);
    let mut drv = SplitDriver::new(mem.clone(), 0xa_0000, 64);
    setup_queue(&mut d, 0, &drv, 1);
    driver_ok(&mut d);
    let st = blk_io(&mut d, &mut drv, &mem, &irqs[1], 2, VIRTIO_BLK_T_IN, 3, 512);
    assert_eq!(st, 0);
    let mut got = vec![0u8; 512];
    mem.read(req_at(2).data, &mut got).unwrap();
    assert_eq!(got, data);
    let _ = irqs[0].wait(Duration::from_millis(0));
}

#[test]
fn qsd_backend_restart_sets_needs_reset_and_reconnects() {
    if !have_qsd() {
        return;
    }
    let dir = TempDir::new("qsd-restart");
    let (mut qsd, mut d, image) = open(&dir);
    let irqs = d.enable_msix(2).unwrap();
    negotiate(&mut d, VERSION_1);
    wr(&mut d, co::CONFIG_MSIX_VECTOR, 2, 0);
    let mem = d.mem().clone();
    let mut drv = SplitDriver::new(mem.clone(), 0x8_0000, 64);
    setup_queue(&mut d, 0, &drv, 1);
    driver_ok(&mut d);
    assert_eq!(
        blk_io(&mut d, &mut drv, &mem, &irqs[1], 0, VIRTIO_BLK_T_IN, 1, 512),
        0
    );

    qsd.kill();
    // DEVICE_NEEDS_RESET with a configuration interrupt.
    assert!(
        irqs[0].wait(Duration::from_secs(10)) > 0,
        "no config interrupt"
    );
    wait_for("NEEDS_RESET", || {
        rd(&mut d, co::DEVICE_STATUS, 1) as u8 & status::DEVICE_NEEDS_RESET != 0
    });
    assert!(!d.with_device(|p| p.device().backend().connected()));

    // The backend comes back; the monitor reconnects; a driver reset recovers the device.
    let _qsd2 = Qsd::start(&image, &dir.0.join("vhost.sock"));
    wait_for("reconnect", || {
        d.with_device(|p| p.device().backend().connected())
    });
    wr(&mut d, co::DEVICE_STATUS, 1, 0);
    wait_for("reset", || rd(&mut d, co::DEVICE_STATUS, 1) == 0);
    negotiate(&mut d, VERSION_1);
    let mut drv = SplitDriver::new(mem.clone(), 0xa_0000, 64);
    setup_queue(&mut d, 0, &drv, 1);
    assert_eq!(driver_ok(&mut d) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        blk_io(&mut d, &mut drv, &mem, &irqs[1], 1, VIRTIO_BLK_T_IN, 5, 512),
        0
    );
    let mut got = vec![0u8; 512];
    mem.read(req_at(1).data, &mut got).unwrap();
    assert_eq!(got, pattern(5));
}

#[test]
fn qsd_hang_up_is_seen_without_running_rings() {
    if !have_qsd() {
        return;
    }
    let dir = TempDir::new("qsd-idle");
    let (mut qsd, d, _image) = open(&dir);
    assert!(d.with_device(|p| p.device().backend().connected()));
    qsd.kill();
    wait_for("disconnect", || {
        !d.with_device(|p| p.device().backend().connected())
    });
}
