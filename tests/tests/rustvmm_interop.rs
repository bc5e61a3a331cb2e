//! Interop: our `Server` serving the `Client` of the independent rust-vmm `vfio_user` crate
//! (crates.io 0.1.7). Deviations of that client from the spec are observed here and listed
//! in tests/RUSTVMM-DEVIATIONS.md.
//!
//! That client sets no socket timeouts and ignores error replies, so every call runs on a
//! worker thread under a watchdog: a stuck call fails the test instead of hanging it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use emudev_tests::device::{
    SeenDma, TestDevice, BAR0_SIZE, BAR2_SIZE, CONFIG_SIZE, DEVICE_ID, VENDOR_ID,
};
use emudev_tests::harness::TestServer;
use emudev_tests::raw;
use emudev_vfio_user::wire::{irq_info_flags, irq_set_flags as isf, region_flags};
use emudev_vfio_user::{ServerOptions, SparseArea};

/// Run `f` on a thread; fail if it does not finish within `secs`.
fn watchdog<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("rust-vmm client call stuck: {what}"),
    }
}

fn server_with_mmap_bar0() -> TestServer {
    let bar = Arc::new(raw::memfd(BAR0_SIZE));
    let (dev, h) = TestDevice::new();
    let dev = dev.with_mmap_bar0(
        bar,
        vec![SparseArea {
            offset: 0x1000,
            size: 0x1000,
        }],
    );
    TestServer::start_with(dev, h, ServerOptions::default())
}

#[test]
fn rustvmm_client_full_session() {
    let srv = server_with_mmap_bar0();
    let path = srv.path.clone();
    // Connect: VERSION (it proposes 0.1), GET_INFO, and REGION_INFO for all 9 regions (BAR0
    // twice: its caps need a second round trip with the larger argsz).
    let mut client = watchdog(10, "Client::new", move || vfio_user::Client::new(&path))
        .expect("rust-vmm client failed to connect/negotiate");
    assert_eq!(srv.dev.lock().attaches, 1);

    // Regions as it parsed them.
    for i in 0..9u32 {
        let r = client
            .region(i)
            .unwrap_or_else(|| panic!("region {i} missing"));
        let want = match i {
            0 => BAR0_SIZE,
            2 => BAR2_SIZE,
            7 => CONFIG_SIZE,
            _ => 0,
        };
        assert_eq!(r.size, want, "region {i} size");
    }
    let bar0 = client.region(0).expect("BAR0");
    assert_eq!(
        bar0.flags,
        region_flags::READ | region_flags::WRITE | region_flags::MMAP | region_flags::CAPS
    );
    assert!(bar0.file_offset.is_some(), "BAR0 fd not received");
    assert_eq!(bar0.sparse_areas.len(), 1);
    assert_eq!(
        (bar0.sparse_areas[0].offset, bar0.sparse_areas[0].size),
        (0x1000, 0x1000)
    );
    assert!(client.region(2).expect("BAR2").file_offset.is_none());

    // Deviation: it computes `resettable` inverted (true when FLAGS_RESET is absent). Our
    // device advertises RESET, so it reports false.
    assert!(
        !client.resettable(),
        "rust-vmm resettable() inversion fixed? update the deviations doc"
    );

    let c = watchdog(10, "region I/O", move || {
        let mut id = [0u8; 4];
        client.region_read(7, 0, &mut id).expect("config read");
        client
            .region_write(2, 0x10, &[0xde, 0xad, 0xbe, 0xef])
            .expect("BAR2 write");
        let mut back = [0u8; 4];
        client.region_read(2, 0x10, &mut back).expect("BAR2 read");
        (client, id, back)
    });
    assert_eq!(&c.1[..2], &VENDOR_ID.to_le_bytes());
    assert_eq!(&c.1[2..], &DEVICE_ID.to_le_bytes());
    assert_eq!(c.2, [0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(&srv.dev.lock().bar2[0x10..0x14], &[0xde, 0xad, 0xbe, 0xef]);

    // DMA: it always passes an fd; it reads a header-only DMA_MAP reply and a 24-byte
    // DMA_UNMAP echo.
    let ram = raw::memfd(0x40000);
    let ram_raw = ram.as_raw_fd();
    let mut client = c.0;
    let mut client = watchdog(10, "dma_map", move || {
        client
            .dma_map(0x10000, 0x100000, 0x20000, ram_raw)
            .expect("dma_map");
        client
    });
    assert_eq!(
        srv.dev.lock().dma_table,
        vec![SeenDma {
            iova: 0x100000,
            size: 0x20000,
            prot: 3,
            mapped: true
        }]
    );
    // Deviation: error replies are not checked. Our EEXIST for an overlapping map comes back
    // as Ok(()) to the caller (the table is unchanged, and the stream stays in sync because
    // the error reply is header-only, which is all it reads).
    client = watchdog(10, "overlapping dma_map", move || {
        let r = client.dma_map(0, 0x100000, 0x1000, ram_raw);
        assert!(r.is_ok(), "the client now checks errors? {r:?}");
        client
    });
    assert_eq!(srv.dev.lock().dma_table.len(), 1);
    client = watchdog(10, "dma_unmap", move || {
        client.dma_unmap(0x100000, 0x20000).expect("dma_unmap");
        client
    });
    assert!(srv.dev.lock().dma_table.is_empty());
    drop(ram);

    // IRQs.
    let efd = raw::eventfd();
    let efd_raw = efd.as_raw_fd();
    let (client, intx, err) = watchdog(10, "irq info", move || {
        let intx = client.get_irq_info(0).expect("irq info 0");
        let err = client.get_irq_info(3).expect("irq info 3");
        client
            .set_irqs(0, isf::DATA_EVENTFD | isf::ACTION_TRIGGER, 0, 1, &[efd_raw])
            .expect("set_irqs");
        (client, intx, err)
    });
    assert_eq!((intx.index, intx.count), (0, 1));
    assert_eq!(
        intx.flags,
        irq_info_flags::EVENTFD | irq_info_flags::MASKABLE | irq_info_flags::AUTOMASKED
    );
    assert_eq!((err.index, err.count), (3, 1));
    {
        let d = srv.dev.lock();
        let theirs = d.irq_fd(0, 0).expect("eventfd reached the device");
        // SAFETY: the device keeps the fd open while we hold its lock.
        raw::eventfd_signal(unsafe { BorrowedFd::borrow_raw(theirs) }).expect("signal");
    }
    assert_eq!(
        raw::eventfd_take(efd.as_fd()),
        1,
        "device's eventfd is not ours"
    );
    let mut client = watchdog(10, "disable irqs + reset", move || {
        let mut client = client;
        client
            .set_irqs(0, isf::DATA_NONE | isf::ACTION_TRIGGER, 0, 0, &[])
            .expect("disable");
        client.reset().expect("reset");
        client
    });
    {
        let d = srv.dev.lock();
        assert!(d.irq_fd(0, 0).is_none());
        assert_eq!(d.resets, 1);
    }
    // Still in sync after everything: the config bytes come back right.
    client = watchdog(10, "final read", move || {
        let mut b = [0u8; 2];
        client.region_read(7, 2, &mut b).expect("read");
        assert_eq!(b, DEVICE_ID.to_le_bytes());
        client
    });
    client.shutdown().expect("shutdown");
    srv.wait_for("detach", |d| d.detaches == 1);
}

/// Deviation: on an error reply to REGION_READ the client keeps waiting for the 16-byte
/// echo and the data, which never come; it only returns when the server closes.
#[test]
fn rustvmm_client_blocks_on_error_reply() {
    let srv = TestServer::start();
    let path = srv.path.clone();
    let mut client =
        watchdog(10, "Client::new", move || vfio_user::Client::new(&path)).expect("connect");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 4];
        // Region 9 does not exist: our server answers EINVAL (header only).
        let _ = tx.send(client.region_read(9, 0, &mut b).map(|_| b));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "rust-vmm client returned on an error reply (deviation fixed?)"
    );
    // Stopping our server closes the connection and unblocks it with a read error.
    srv.handle.shutdown();
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("client still stuck after EOF");
    assert!(r.is_err(), "expected a stream error, got {r:?}");
}
