//! Server-initiated DMA_READ / DMA_WRITE (the fd-less DMA path) against a raw client playing
//! QEMU or a spec client: both wire layouts (spec by default, QEMU's u32 header on request), chunking to the client's max_data_xfer_size,
//! error replies, timeouts with late replies, client loss while a transfer is outstanding,
//! and the server answering region requests while its own DMA request is unanswered
//! (doc §2.7 deadlock hazard).

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use emudev_tests::device::TestDevice;
use emudev_tests::harness::TestServer;
use emudev_tests::raw::{check_ok, msg, version_request, RawClient, Reply, QEMU_CAPS_JSON};
use emudev_vfio_user::wire::{cmd, hdr_flags, RegionAccess, HEADER_SIZE};
use emudev_vfio_user::{DmaError, DmaLayout, DmaPort, ServerOptions};
use zerocopy::IntoBytes;

const SPEC_CAPS: &str = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096}}"#;

fn port(srv: &TestServer) -> DmaPort {
    srv.dev
        .lock()
        .dma_port
        .clone()
        .expect("device got no DmaPort on attach")
}

fn negotiated(srv: &TestServer, json: &str) -> RawClient {
    let c = srv.connect();
    let req = version_request(0, 0, 0, Some(json));
    check_ok(&req, &c.call(&req, &[]).expect("VERSION")).expect("VERSION ok");
    c
}

fn u64_at(p: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(p[off..off + 8].try_into().expect("8 bytes"))
}

fn u32_at(p: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(p[off..off + 4].try_into().expect("4 bytes"))
}

fn reply_to(req: &Reply, payload: &[u8]) -> Vec<u8> {
    msg(
        req.header.msg_id,
        req.header.command,
        hdr_flags::TYPE_REPLY,
        payload,
    )
}

/// Run a DMA read of `len` bytes at `addr` on a worker thread.
fn spawn_read(p: DmaPort, addr: u64, len: usize) -> JoinHandle<Result<Vec<u8>, DmaError>> {
    std::thread::spawn(move || {
        let mut b = vec![0u8; len];
        p.read(addr, &mut b).map(|_| b)
    })
}

/// Guest memory pattern the raw client serves.
fn pattern(addr: u64) -> u8 {
    (addr as u8).wrapping_mul(7) ^ (addr >> 8) as u8
}

#[test]
fn spec_layout_read_write_and_chunking() {
    let srv = TestServer::start();
    let c = negotiated(&srv, SPEC_CAPS);
    let p = port(&srv);
    // 10000 bytes with max_data_xfer_size 4096: three requests, served in order.
    let h = spawn_read(p.clone(), 0x10_0000, 10_000);
    let mut served = 0u64;
    let mut sizes = Vec::new();
    while served < 10_000 {
        let r = c.recv().expect("DMA_READ request");
        assert_eq!(r.header.command, cmd::DMA_READ);
        assert_eq!(r.header.flags, 0, "server request must be a command");
        assert_eq!(
            r.payload.len(),
            16,
            "spec DMA_READ request is address + u64 count"
        );
        let (addr, count) = (u64_at(&r.payload, 0), u64_at(&r.payload, 8));
        assert_eq!(addr, 0x10_0000 + served);
        assert!(count <= 4096);
        sizes.push(count);
        let mut pl = r.payload.clone();
        pl.extend((addr..addr + count).map(pattern));
        c.send(&reply_to(&r, &pl), &[]).expect("reply");
        served += count;
    }
    let data = h.join().expect("reader").expect("DMA read");
    assert_eq!(sizes, vec![4096, 4096, 1808]);
    assert!(data
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(0x10_0000 + i as u64)));

    // DMA_WRITE: data at payload offset 16; the spec reply echoes address and count.
    let pw = p.clone();
    let h = std::thread::spawn(move || pw.write(0x2000, &[1, 2, 3, 4, 5]));
    let r = c.recv().expect("DMA_WRITE request");
    assert_eq!(r.header.command, cmd::DMA_WRITE);
    assert_eq!((u64_at(&r.payload, 0), u64_at(&r.payload, 8)), (0x2000, 5));
    assert_eq!(&r.payload[16..], &[1, 2, 3, 4, 5]);
    c.send(&reply_to(&r, &r.payload[..16]), &[]).expect("reply");
    h.join().expect("writer").expect("DMA write");

    // The client refuses: the worker sees the errno.
    let h = spawn_read(p, 0x3000, 8);
    let r = c.recv().expect("DMA_READ");
    let mut e = msg(r.header.msg_id, r.header.command, 0x21, &[]);
    e[12..16].copy_from_slice(&(libc::EFAULT as u32).to_ne_bytes());
    c.send(&e, &[]).expect("error reply");
    match h.join().expect("reader") {
        Err(DmaError::Refused { errno, .. }) => assert_eq!(errno, libc::EFAULT as u32),
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// QEMU 11.1.3 uses the spec layout on the wire (h1 traced it; see server/mod.rs), so a
/// client with QEMU's capabilities gets spec-layout requests, and QEMU's 32-byte DMA_WRITE
/// reply (header + address + count echo) is accepted.
#[test]
fn qemu_client_gets_spec_layout() {
    let srv = TestServer::start();
    let c = negotiated(&srv, QEMU_CAPS_JSON);
    let p = port(&srv);
    let h = std::thread::spawn(move || p.write(0x5000, &[9; 6]));
    let r = c.recv().expect("DMA_WRITE");
    assert_eq!(r.header.msg_size as usize, 32 + 6);
    assert_eq!((u64_at(&r.payload, 0), u64_at(&r.payload, 8)), (0x5000, 6));
    assert_eq!(&r.payload[16..], &[9; 6]);
    c.send(&reply_to(&r, &r.payload[..16]), &[]).expect("reply");
    h.join().expect("writer").expect("write");
}

/// The u32-count layout of QEMU's `VFIOUserDMARW` header, selected explicitly.
#[test]
fn explicit_u32_layout_read_and_write() {
    let (dev, h) = TestDevice::new();
    let opts = ServerOptions {
        dma_layout: Some(DmaLayout::Qemu),
        ..ServerOptions::default()
    };
    let srv = TestServer::start_with(dev, h, opts);
    let c = negotiated(&srv, QEMU_CAPS_JSON);
    let p = port(&srv);
    let h = spawn_read(p.clone(), 0x4000, 16);
    let r = c.recv().expect("DMA_READ");
    // u64 address, u32 count, data at byte 28, 32-byte minimum.
    assert_eq!(r.header.command, cmd::DMA_READ);
    assert_eq!(r.header.msg_size, 32);
    assert_eq!((u64_at(&r.payload, 0), u32_at(&r.payload, 8)), (0x4000, 16));
    // Reply: 32 + count bytes, data at byte 28.
    let mut pl = r.payload[..12].to_vec();
    pl.extend((0x4000..0x4010u64).map(pattern));
    pl.extend([0u8; 4]);
    c.send(&reply_to(&r, &pl), &[]).expect("reply");
    let d = h.join().expect("reader").expect("read");
    assert_eq!(d, (0x4000..0x4010u64).map(pattern).collect::<Vec<_>>());

    let h = std::thread::spawn(move || p.write(0x5000, &[9; 6]));
    let r = c.recv().expect("DMA_WRITE");
    assert_eq!(r.header.msg_size as usize, 32 + 6);
    assert_eq!((u64_at(&r.payload, 0), u32_at(&r.payload, 8)), (0x5000, 6));
    assert_eq!(&r.payload[12..18], &[9; 6]);
    // Header-only reply.
    c.send(&reply_to(&r, &[]), &[]).expect("reply");
    h.join().expect("writer").expect("write");
}

#[test]
fn region_requests_are_served_while_a_dma_request_is_unanswered() {
    let srv = TestServer::start();
    let c = negotiated(&srv, SPEC_CAPS);
    let h = spawn_read(port(&srv), 0x6000, 4);
    let dma = c.recv().expect("DMA_READ");
    // A vCPU's MMIO read arrives before QEMU answers the DMA: it must be answered.
    let rr = msg(
        77,
        cmd::REGION_READ,
        0,
        RegionAccess {
            offset: 0,
            region: 7,
            count: 2,
        }
        .as_bytes(),
    );
    let r = c
        .call(&rr, &[])
        .expect("REGION_READ answered while DMA pending");
    check_ok(&rr, &r).expect("REGION_READ ok");
    let mut pl = dma.payload.clone();
    pl.extend([1, 2, 3, 4]);
    c.send(&reply_to(&dma, &pl), &[]).expect("reply");
    assert_eq!(h.join().expect("reader").expect("read"), vec![1, 2, 3, 4]);
}

#[test]
fn timeout_then_late_reply_is_dropped() {
    let (dev, h) = TestDevice::new();
    let opts = ServerOptions {
        msg_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    };
    let srv = TestServer::start_with(dev, h, opts);
    let c = negotiated(&srv, SPEC_CAPS);
    let t = Instant::now();
    let h = spawn_read(port(&srv), 0x7000, 4);
    let dma = c.recv().expect("DMA_READ");
    match h.join().expect("reader") {
        Err(DmaError::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    // The late reply (with a payload) must not desync the stream.
    let mut pl = dma.payload.clone();
    pl.extend([1, 2, 3, 4]);
    c.send(&reply_to(&dma, &pl), &[]).expect("late reply");
    let rr = msg(
        78,
        cmd::REGION_READ,
        0,
        RegionAccess {
            offset: 0,
            region: 7,
            count: 4,
        }
        .as_bytes(),
    );
    let r = c.call(&rr, &[]).expect("next request");
    check_ok(&rr, &r).expect("REGION_READ ok");
    assert_eq!(r.payload.len(), HEADER_SIZE + 4);
}

#[test]
fn client_loss_fails_outstanding_dma_quickly() {
    let srv = TestServer::start();
    let c = negotiated(&srv, SPEC_CAPS);
    let p = port(&srv);
    let (tx, rx) = mpsc::channel();
    let pr = p.clone();
    std::thread::spawn(move || {
        let mut b = [0u8; 4];
        let _ = tx.send(pr.read(0x8000, &mut b));
    });
    let _dma = c.recv().expect("DMA_READ");
    let t = Instant::now();
    drop(c);
    match rx.recv_timeout(Duration::from_secs(4)) {
        Ok(Err(DmaError::Disconnected)) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "DMA waited for the timeout after client loss"
    );
    srv.wait_for("detach", |d| d.detaches == 1);
    // The old port stays dead; a new client gets a working one.
    let mut b = [0u8; 1];
    assert_eq!(p.read(0, &mut b), Err(DmaError::Disconnected));
    let t = Instant::now();
    let c2 = loop {
        // Spec layout again; retry while the server may still see the old client.
        let c = RawClient::connect(&srv.path).expect("connect");
        let req = version_request(0, 0, 0, Some(SPEC_CAPS));
        match c.call(&req, &[]) {
            Ok(r) if !r.header.is_error() => break c,
            _ if t.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            other => panic!("reconnect failed: {other:?}"),
        }
    };
    let h = spawn_read(port(&srv), 0x9000, 1);
    let dma = c2.recv().expect("DMA_READ on the new client");
    let mut pl = dma.payload.clone();
    pl.push(0x5a);
    c2.send(&reply_to(&dma, &pl), &[]).expect("reply");
    assert_eq!(h.join().expect("reader").expect("read"), vec![0x5a]);
}

/// DMA_UNMAP of a region while a server DMA_READ into it is unanswered: the unmap is
/// answered promptly (well inside QEMU's 5 s), with the 24-byte echo, and the connection
/// keeps working after the late DMA reply.
#[test]
fn unmap_while_message_dma_is_outstanding() {
    let srv = TestServer::start();
    let c = negotiated(&srv, SPEC_CAPS);
    let map = emudev_vfio_user::wire::DmaMap {
        argsz: 32,
        flags: 3,
        offset: 0,
        address: 0x10000,
        size: 0x1000,
    };
    let req = msg(1, cmd::DMA_MAP, 0, map.as_bytes());
    check_ok(&req, &c.call(&req, &[]).expect("map")).expect("map ok");
    let h = spawn_read(port(&srv), 0x10000, 4);
    let dma = c.recv().expect("DMA_READ");
    let un = emudev_vfio_user::wire::DmaUnmap {
        argsz: 24,
        flags: 0,
        address: 0x10000,
        size: 0x1000,
    };
    let ureq = msg(2, cmd::DMA_UNMAP, 0, un.as_bytes());
    let t = Instant::now();
    let r = c
        .call(&ureq, &[])
        .expect("DMA_UNMAP reply while DMA outstanding");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "unmap waited {:?}",
        t.elapsed()
    );
    check_ok(&ureq, &r).expect("unmap ok");
    assert_eq!(r.payload, ureq[HEADER_SIZE..]);
    assert!(srv.dev.lock().dma_table.is_empty());
    // The late reply to the DMA_READ is consumed without desyncing the stream.
    let mut pl = dma.payload.clone();
    pl.extend([1, 2, 3, 4]);
    c.send(&reply_to(&dma, &pl), &[]).expect("late DMA reply");
    let _ = h.join().expect("reader");
    let rr = msg(
        3,
        cmd::REGION_READ,
        0,
        RegionAccess {
            offset: 0,
            region: 7,
            count: 2,
        }
        .as_bytes(),
    );
    check_ok(&rr, &c.call(&rr, &[]).expect("next request")).expect("REGION_READ ok");
}
