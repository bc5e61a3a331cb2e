//! Bad-input matrix against our server (vfio-user doc §5.5, classes 1-15).
//!
//! Every case checks: the exact reply (error replies are header-only, flags 0x21, id and
//! command echoed, the expected errno), that the server still serves the next request on
//! the same connection (or a new one, where the stream cannot be resynchronised), and that
//! no fd leaked (the server runs in this process, so /proc/self/fd counts its fds too).
//! Tests are serialised by a lock so fd counts are not disturbed by other tests.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use emudev_tests::device::{SeenDma, TestDevice, BAR0_SIZE, BAR2_SIZE};
use emudev_tests::harness::{connect_retry, TestServer};
use emudev_tests::raw::{
    self, check_err, check_ok, msg, open_fds, version_request, RawClient, QEMU_CAPS_JSON,
};
use emudev_vfio_user::wire::{
    cmd, dma_flags, hdr_flags, irq_index, irq_set_flags as isf, region_flags, DeviceInfo, DmaMap,
    DmaUnmap, Header, IrqSet, RegionAccess, RegionInfo, HEADER_SIZE,
};
use emudev_vfio_user::{ServerOptions, SparseArea};
use libc::{E2BIG, EEXIST, EINVAL, ENOSPC, ENOTSUP};
use zerocopy::{FromBytes, IntoBytes};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn get_info(id: u16) -> Vec<u8> {
    msg(
        id,
        cmd::DEVICE_GET_INFO,
        0,
        DeviceInfo {
            argsz: 16,
            ..Default::default()
        }
        .as_bytes(),
    )
}

/// The connection still serves requests: GET_INFO gets a well-formed success reply.
fn assert_alive(c: &RawClient) {
    let req = get_info(0x7777);
    let r = c.call(&req, &[]).expect("server stopped answering");
    check_ok(&req, &r).expect("GET_INFO after a bad request");
    let i = DeviceInfo::read_from_bytes(&r.payload[..]).expect("GET_INFO payload");
    assert_eq!(i.num_regions, 9);
}

/// Send `req` with `fds`, expect a header-only error with `errno`, then a working
/// connection and the same fd count as before (fds we hold are counted in both).
fn expect_err(c: &RawClient, req: &[u8], fds: &[BorrowedFd<'_>], errno: i32) {
    let before = open_fds();
    let r = c.call(req, fds).expect("no reply");
    if let Err(e) = check_err(req, &r, errno) {
        panic!("{e}");
    }
    assert_alive(c);
    assert_eq!(
        open_fds(),
        before,
        "fd leak after {}",
        cmd::name(Header::read_from_prefix(req).unwrap().0.command)
    );
}

fn expect_ok(c: &RawClient, req: &[u8], fds: &[BorrowedFd<'_>]) -> raw::Reply {
    let r = c.call(req, fds).expect("no reply");
    if let Err(e) = check_ok(req, &r) {
        panic!("{e}");
    }
    r
}

fn dma_map(id: u16, flags: u32, offset: u64, address: u64, size: u64) -> Vec<u8> {
    let m = DmaMap {
        argsz: 32,
        flags,
        offset,
        address,
        size,
    };
    msg(id, cmd::DMA_MAP, 0, m.as_bytes())
}

fn dma_unmap(id: u16, flags: u32, address: u64, size: u64) -> Vec<u8> {
    let m = DmaUnmap {
        argsz: 24,
        flags,
        address,
        size,
    };
    msg(id, cmd::DMA_UNMAP, 0, m.as_bytes())
}

fn region_read(id: u16, region: u32, offset: u64, count: u32) -> Vec<u8> {
    msg(
        id,
        cmd::REGION_READ,
        0,
        RegionAccess {
            offset,
            region,
            count,
        }
        .as_bytes(),
    )
}

fn region_write(id: u16, flags: u32, region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = RegionAccess {
        offset,
        region,
        count: data.len() as u32,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(data);
    msg(id, cmd::REGION_WRITE, flags, &p)
}

fn set_irqs(id: u16, flags: u32, index: u32, start: u32, count: u32, extra: &[u8]) -> Vec<u8> {
    let s = IrqSet {
        argsz: 20 + extra.len() as u32,
        flags,
        index,
        start,
        count,
    };
    let mut p = s.as_bytes().to_vec();
    p.extend_from_slice(extra);
    msg(id, cmd::DEVICE_SET_IRQS, 0, &p)
}

fn region_info(id: u16, argsz: u32, index: u32) -> Vec<u8> {
    msg(
        id,
        cmd::DEVICE_GET_REGION_INFO,
        0,
        RegionInfo {
            argsz,
            index,
            ..Default::default()
        }
        .as_bytes(),
    )
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

// ---- 1. Header sanity -------------------------------------------------------------------

#[test]
fn header_size_below_header_is_einval() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    for size in [0u32, 8, 15] {
        let h = Header {
            msg_id: 3,
            command: cmd::DEVICE_GET_INFO,
            msg_size: size,
            flags: 0,
            error: 0,
        };
        expect_err(&c, h.as_bytes(), &[], EINVAL);
    }
}

#[test]
fn header_claiming_4gib_is_refused_without_allocating() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    let rss = rss_kib();
    let h = Header {
        msg_id: 9,
        command: cmd::REGION_WRITE,
        msg_size: u32::MAX,
        flags: 0,
        error: 0,
    };
    let t = Instant::now();
    let r = c
        .call(h.as_bytes(), &[])
        .expect("reply to an oversized header");
    check_err(h.as_bytes(), &r, E2BIG).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "oversized header answered slowly"
    );
    assert!(
        rss_kib() < rss + 64 * 1024,
        "RSS grew from {rss} KiB to {} KiB",
        rss_kib()
    );
    // A size beyond any plausible message means the stream cannot be trusted: after the
    // error reply the server closes the connection (instead of skipping 4 GiB), and the
    // next client is served at once.
    c.expect_eof()
        .expect("server closes a connection that claimed 4 GiB");
    drop(c);
    let c2 = connect_retry(&srv.path).unwrap();
    assert_alive(&c2);
}

#[test]
fn oversized_message_body_is_drained_and_stream_stays_in_sync() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    // 2 MiB + header: above the 1 MiB + 4 KiB limit; the body really follows.
    let body = vec![0xa5u8; 2 << 20];
    let req = msg(4, cmd::REGION_WRITE, 0, &body);
    let w = std::thread::scope(|s| {
        let h = s.spawn(|| c.send(&req, &[]));
        let r = c.recv().expect("reply");
        h.join().expect("sender").expect("send");
        r
    });
    check_err(&req, &w, E2BIG).unwrap();
    assert_alive(&c);
}

#[test]
fn bad_message_type_and_unsolicited_reply() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    // Type 2 is neither command nor reply.
    expect_err(
        &c,
        &msg(
            5,
            cmd::DEVICE_GET_INFO,
            2,
            &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        &[],
        EINVAL,
    );
    // An unsolicited reply (with a body) is dropped silently; the next request is answered.
    c.send(
        &msg(6, cmd::DMA_READ, hdr_flags::TYPE_REPLY, &[0u8; 40]),
        &[],
    )
    .unwrap();
    c.send(
        &msg(
            7,
            cmd::REGION_READ,
            hdr_flags::TYPE_REPLY | hdr_flags::ERROR,
            &[],
        ),
        &[],
    )
    .unwrap();
    assert_alive(&c);
}

#[test]
fn unknown_and_unsupported_commands_drain_their_body() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    for command in [0u16, 19, 99, 0xffff, cmd::DMA_READ, cmd::DMA_WRITE] {
        // A body that looks like a GET_INFO request: if it were not drained, it would be
        // answered as one and the next check would see the wrong reply.
        expect_err(&c, &msg(11, command, 0, &get_info(12)), &[], EINVAL);
    }
    for command in [
        cmd::DIRTY_PAGES,
        cmd::DEVICE_FEATURE,
        cmd::MIG_DATA_READ,
        cmd::MIG_DATA_WRITE,
    ] {
        expect_err(&c, &msg(13, command, 0, &[0u8; 16]), &[], ENOTSUP);
    }
}

#[test]
fn short_payloads_are_einval() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    for command in [
        cmd::DMA_MAP,
        cmd::DMA_UNMAP,
        cmd::DEVICE_GET_INFO,
        cmd::DEVICE_GET_REGION_INFO,
        cmd::DEVICE_GET_IRQ_INFO,
        cmd::DEVICE_SET_IRQS,
        cmd::REGION_READ,
        cmd::REGION_WRITE,
        cmd::REGION_WRITE_MULTI,
    ] {
        expect_err(&c, &msg(1, command, 0, &[]), &[], EINVAL);
        expect_err(&c, &msg(2, command, 0, &[4, 0, 0]), &[], EINVAL);
    }
}

// ---- 2. VERSION first and only first -------------------------------------------------------

#[test]
fn commands_before_version_are_refused() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect();
    let r = c.call(&get_info(1), &[]).unwrap();
    check_err(&get_info(1), &r, EINVAL).unwrap();
    let rr = region_read(2, 7, 0, 4);
    check_err(&rr, &c.call(&rr, &[]).unwrap(), EINVAL).unwrap();
    // The client may still negotiate afterwards.
    c.negotiate().unwrap();
    assert_alive(&c);
    assert_eq!(srv.dev.lock().region_reads, 0);
}

#[test]
fn bad_version_requests() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect();
    let cases: Vec<(Vec<u8>, i32)> = vec![
        (version_request(1, 1, 0, Some(QEMU_CAPS_JSON)), ENOTSUP),
        // JSON without the NUL.
        (
            msg(
                2,
                cmd::VERSION,
                0,
                &[&[0u8, 0, 0, 0][..], br#"{"capabilities":{}}"#].concat(),
            ),
            EINVAL,
        ),
        (
            version_request(3, 0, 0, Some(r#"{"capabilities": {"max_msg_fds": 16"#)),
            EINVAL,
        ),
        (
            version_request(4, 0, 0, Some(r#"{"capabilities": 5}"#)),
            EINVAL,
        ),
        (
            version_request(5, 0, 0, Some(r#"{"capabilities": {"max_msg_fds": "16"}}"#)),
            EINVAL,
        ),
        (
            version_request(6, 0, 0, Some(r#"{"capabilities": {"max_msg_fds": -1}}"#)),
            EINVAL,
        ),
        (
            version_request(
                7,
                0,
                0,
                Some(r#"{"capabilities": {"max_data_xfer_size": 0}}"#),
            ),
            EINVAL,
        ),
        (
            version_request(8, 0, 0, Some(r#"{"capabilities": {"pgsizes": 512}}"#)),
            EINVAL,
        ),
        (
            version_request(9, 0, 0, Some(r#"{"capabilities": {"migration": 1}}"#)),
            EINVAL,
        ),
        (version_request(10, 0, 0, Some(r#"[1,2]"#)), EINVAL),
        (msg(11, cmd::VERSION, 0, &[0, 0]), EINVAL),
        (
            msg(
                12,
                cmd::VERSION,
                0,
                &[&[0u8; 4][..], &vec![b' '; 8000], &[0]].concat(),
            ),
            E2BIG,
        ),
    ];
    for (req, errno) in &cases {
        let r = c.call(req, &[]).unwrap();
        check_err(req, &r, *errno).unwrap();
    }
    // fds on VERSION are refused and closed.
    let f = raw::memfd(4096);
    let before = open_fds();
    let req = version_request(13, 0, 0, Some(QEMU_CAPS_JSON));
    check_err(&req, &c.call(&req, &[f.as_fd()]).unwrap(), EINVAL).unwrap();
    assert_eq!(open_fds(), before);
    // None of that counted as negotiation.
    check_err(&get_info(14), &c.call(&get_info(14), &[]).unwrap(), EINVAL).unwrap();
    // Unknown keys are ignored.
    let ok = version_request(
        15,
        0,
        0,
        Some(r#"{"capabilities": {"frobnicate": [1], "max_msg_fds": 4}, "x": 1}"#),
    );
    let r = expect_ok(&c, &ok, &[]);
    assert_eq!(&r.payload[..4], &[0, 0, 0, 0]);
    assert!(r.header.msg_size <= Header::read_from_prefix(&ok).unwrap().0.msg_size);
    // A second VERSION is refused; the first negotiation stands.
    let again = version_request(16, 0, 0, Some(QEMU_CAPS_JSON));
    check_err(&again, &c.call(&again, &[]).unwrap(), EINVAL).unwrap();
    assert_alive(&c);
    assert_eq!(srv.dev.lock().attaches, 1);
}

#[test]
fn version_without_json_and_with_a_tiny_json() {
    let _g = serial();
    let srv = TestServer::start();
    // No JSON: the reply must not be larger than the request (20 bytes: no room for JSON).
    let c = srv.connect();
    let req = version_request(1, 0, 0, None);
    let r = expect_ok(&c, &req, &[]);
    assert!(
        r.header.msg_size as usize <= req.len(),
        "reply {} > request {}",
        r.header.msg_size,
        req.len()
    );
    assert_alive(&c);
    drop(c);
    // "{}": the reply fits in 3 bytes of JSON at most.
    srv.wait_for("detach", |d| d.detaches == 1);
    let c = srv.connect();
    let req = version_request(2, 0, 0, Some("{}"));
    let r = expect_ok(&c, &req, &[]);
    assert!(r.header.msg_size as usize <= req.len());
    if r.payload.len() > 4 {
        assert_eq!(r.payload.last(), Some(&0));
    }
}

// ---- 4. NO_REPLY honoured -----------------------------------------------------------------

#[test]
fn posted_writes_are_never_answered_and_stay_ordered() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    // A posted write, then a read of the same bytes: only the read is answered and it sees
    // the write.
    c.send(
        &region_write(20, hdr_flags::NO_REPLY, 2, 0x10, &[1, 2, 3, 4]),
        &[],
    )
    .unwrap();
    // A posted write that fails (bad region) gets no error reply either.
    c.send(&region_write(21, hdr_flags::NO_REPLY, 42, 0, &[1]), &[])
        .unwrap();
    c.send(&msg(22, 0x99, hdr_flags::NO_REPLY, &[0u8; 8]), &[])
        .unwrap();
    let rd = region_read(23, 2, 0x10, 4);
    let r = expect_ok(&c, &rd, &[]);
    assert_eq!(&r.payload[16..], &[1, 2, 3, 4]);
    c.assert_silent(Duration::from_millis(100)).unwrap();
    // Posted WRITE_MULTI.
    let mut p = 1u64.to_ne_bytes().to_vec();
    p.extend_from_slice(&0x20u64.to_ne_bytes());
    p.extend_from_slice(&2u32.to_ne_bytes());
    p.extend_from_slice(&2u32.to_ne_bytes());
    p.extend_from_slice(&[9, 8, 0, 0, 0, 0, 0, 0]);
    c.send(
        &msg(24, cmd::REGION_WRITE_MULTI, hdr_flags::NO_REPLY, &p),
        &[],
    )
    .unwrap();
    let r = expect_ok(&c, &region_read(25, 2, 0x20, 2), &[]);
    assert_eq!(&r.payload[16..], &[9, 8]);
    c.assert_silent(Duration::from_millis(100)).unwrap();
}

// ---- 6. Region access bounds --------------------------------------------------------------

#[test]
fn region_access_bounds() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    expect_err(&c, &region_read(1, 9, 0, 4), &[], EINVAL);
    expect_err(&c, &region_read(1, u32::MAX, 0, 4), &[], EINVAL);
    expect_err(&c, &region_read(2, 2, BAR2_SIZE - 2, 4), &[], EINVAL);
    expect_err(&c, &region_read(3, 2, u64::MAX - 1, 4), &[], EINVAL);
    expect_err(&c, &region_read(4, 2, 0, (1 << 20) + 1), &[], EINVAL);
    expect_err(&c, &region_read(4, 2, 0, u32::MAX), &[], EINVAL);
    // Region 1 has size 0 and neither READ nor WRITE.
    expect_err(&c, &region_read(5, 1, 0, 1), &[], EINVAL);
    expect_err(&c, &region_write(6, 0, 1, 0, &[1]), &[], EINVAL);
    expect_err(&c, &region_write(7, 0, 2, u64::MAX, &[1, 2]), &[], EINVAL);
    // Write whose payload length differs from count.
    let mut w = region_write(8, 0, 2, 0, &[1, 2, 3, 4]);
    w.truncate(w.len() - 1);
    let len = w.len() as u32;
    w[4..8].copy_from_slice(&len.to_ne_bytes());
    expect_err(&c, &w, &[], EINVAL);
    let mut p = RegionAccess {
        offset: 0,
        region: 2,
        count: 2,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(&[1, 2, 3]);
    expect_err(&c, &msg(9, cmd::REGION_WRITE, 0, &p), &[], EINVAL);
    // A read request carrying data is answered with count bytes only.
    let mut p = RegionAccess {
        offset: 0,
        region: 2,
        count: 2,
    }
    .as_bytes()
    .to_vec();
    p.extend_from_slice(&[0; 6]);
    let r = expect_ok(&c, &msg(10, cmd::REGION_READ, 0, &p), &[]);
    assert_eq!(r.payload.len(), 18);
    // count 0 is an empty success.
    let r = expect_ok(&c, &region_read(11, 2, 0, 0), &[]);
    assert_eq!(r.payload.len(), 16);
    assert_eq!(
        srv.dev.lock().bar2,
        vec![0; BAR2_SIZE as usize],
        "a refused write reached the device"
    );
    // The last byte is reachable.
    let r = expect_ok(&c, &region_read(12, 2, BAR2_SIZE - 1, 1), &[]);
    assert_eq!(r.payload.len(), 17);
}

// ---- 7. argsz handling --------------------------------------------------------------------

#[test]
fn argsz_too_small_is_einval() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    expect_err(
        &c,
        &msg(
            1,
            cmd::DEVICE_GET_INFO,
            0,
            DeviceInfo {
                argsz: 15,
                ..Default::default()
            }
            .as_bytes(),
        ),
        &[],
        EINVAL,
    );
    expect_err(&c, &region_info(2, 31, 7), &[], EINVAL);
    expect_err(&c, &region_info(2, 0, 7), &[], EINVAL);
    let irq = emudev_vfio_user::wire::IrqInfo {
        argsz: 8,
        index: 0,
        ..Default::default()
    };
    expect_err(
        &c,
        &msg(3, cmd::DEVICE_GET_IRQ_INFO, 0, irq.as_bytes()),
        &[],
        EINVAL,
    );
    let m = DmaMap {
        argsz: 31,
        flags: 3,
        offset: 0,
        address: 0x1000,
        size: 0x1000,
    };
    expect_err(&c, &msg(4, cmd::DMA_MAP, 0, m.as_bytes()), &[], EINVAL);
    let u = DmaUnmap {
        argsz: 23,
        flags: 0,
        address: 0x1000,
        size: 0x1000,
    };
    expect_err(&c, &msg(5, cmd::DMA_UNMAP, 0, u.as_bytes()), &[], EINVAL);
    let mut s = set_irqs(6, isf::DATA_NONE | isf::ACTION_TRIGGER, 0, 0, 1, &[]);
    s[HEADER_SIZE..HEADER_SIZE + 4].copy_from_slice(&19u32.to_ne_bytes());
    expect_err(&c, &s, &[], EINVAL);
    // Huge argsz: the reply is only as big as needed.
    let r = expect_ok(&c, &region_info(7, u32::MAX, 7), &[]);
    assert_eq!(r.payload.len(), 32);
    let r = expect_ok(
        &c,
        &msg(
            8,
            cmd::DEVICE_GET_INFO,
            0,
            DeviceInfo {
                argsz: u32::MAX,
                ..Default::default()
            }
            .as_bytes(),
        ),
        &[],
    );
    assert_eq!(r.payload.len(), 16);
    expect_err(&c, &region_info(9, 32, 9), &[], EINVAL);
    expect_err(&c, &region_info(9, 32, u32::MAX), &[], EINVAL);
}

#[test]
fn region_info_with_caps_and_small_argsz() {
    let _g = serial();
    let bar = std::sync::Arc::new(raw::memfd(BAR0_SIZE));
    let (dev, h) = TestDevice::new();
    let dev = dev.with_mmap_bar0(
        bar,
        vec![SparseArea {
            offset: 0x1000,
            size: 0x1000,
        }],
    );
    let srv = TestServer::start_with(dev, h, ServerOptions::default());
    let c = srv.connect_negotiated();
    let before = open_fds();
    // argsz 32: the needed argsz comes back, without caps and without an fd.
    let r = expect_ok(&c, &region_info(1, 32, 0), &[]);
    let i = RegionInfo::read_from_prefix(&r.payload).unwrap().0;
    assert_eq!(r.payload.len(), 32);
    assert!(r.fds.is_empty(), "fd sent with a truncated region info");
    assert_eq!(i.argsz, 32 + 8 + 8 + 16);
    assert_eq!(i.cap_offset, 0);
    assert_eq!(i.size, BAR0_SIZE);
    // No caps included, so no CAPS flag (as the kernel's VFIO and libvfio-user do).
    assert_eq!(
        i.flags,
        region_flags::READ | region_flags::WRITE | region_flags::MMAP
    );
    // Retry with the needed size: caps and exactly one fd.
    let r = expect_ok(&c, &region_info(2, i.argsz, 0), &[]);
    assert!(r.header.msg_size as usize <= HEADER_SIZE + i.argsz as usize);
    assert_eq!(r.fds.len(), 1);
    let i2 = RegionInfo::read_from_prefix(&r.payload).unwrap().0;
    assert_eq!(i2.cap_offset, 32);
    assert_eq!(
        i2.flags,
        region_flags::READ | region_flags::WRITE | region_flags::MMAP | region_flags::CAPS
    );
    let cap = &r.payload[32..];
    assert_eq!(&cap[0..4], &[1, 0, 1, 0], "sparse mmap cap id 1 version 1");
    assert_eq!(u32::from_ne_bytes(cap[4..8].try_into().unwrap()), 0, "next");
    assert_eq!(
        u32::from_ne_bytes(cap[8..12].try_into().unwrap()),
        1,
        "nr_areas"
    );
    assert_eq!(u64::from_ne_bytes(cap[16..24].try_into().unwrap()), 0x1000);
    assert_eq!(u64::from_ne_bytes(cap[24..32].try_into().unwrap()), 0x1000);
    drop(r);
    assert_eq!(open_fds(), before);
}

// ---- 8. DMA_MAP ---------------------------------------------------------------------------

#[test]
fn dma_map_validation() {
    let _g = serial();
    let (dev, h) = TestDevice::new();
    let srv = TestServer::start_with(
        dev,
        h,
        ServerOptions {
            max_dma_maps: 3,
            ..ServerOptions::default()
        },
    );
    let c = srv.connect_negotiated();
    let ram = raw::memfd(0x10_0000);
    let ok1 = dma_map(1, 3, 0, 0x10000, 0x10000);
    expect_ok(&c, &ok1, &[ram.as_fd()]);
    // Overlaps: same, inside, straddling either edge.
    for (a, s) in [
        (0x10000, 0x10000),
        (0x18000, 0x1000),
        (0x8000, 0x10000),
        (0x1f000, 0x2000),
    ] {
        expect_err(&c, &dma_map(2, 3, 0, a, s), &[ram.as_fd()], EEXIST);
        expect_err(&c, &dma_map(2, 1, 0, a, s), &[], EEXIST);
    }
    expect_err(&c, &dma_map(3, 3, 0, 0x40000, 0), &[], EINVAL);
    expect_err(&c, &dma_map(4, 3, 0, u64::MAX - 0xfff, 0x2000), &[], EINVAL);
    expect_err(&c, &dma_map(5, 3, 0, 0x40000, 1 << 44), &[], EINVAL);
    expect_err(&c, &dma_map(6, 0x13, 0, 0x40000, 0x1000), &[], EINVAL);
    expect_err(&c, &dma_map(6, 0, 0, 0x40000, 0x1000), &[], EINVAL);
    // Two fds.
    let extra = raw::memfd(0x1000);
    expect_err(
        &c,
        &dma_map(7, 3, 0, 0x40000, 0x1000),
        &[ram.as_fd(), extra.as_fd()],
        EINVAL,
    );
    // fd range beyond the file, and offset+size overflowing.
    expect_err(
        &c,
        &dma_map(8, 3, 0xff000, 0x40000, 0x2000),
        &[ram.as_fd()],
        EINVAL,
    );
    expect_err(
        &c,
        &dma_map(8, 3, u64::MAX - 0xfff, 0x40000, 0x2000),
        &[ram.as_fd()],
        EINVAL,
    );
    // An fd that cannot be mmapped (an eventfd).
    let ev = raw::eventfd();
    expect_err(
        &c,
        &dma_map(9, 3, 0, 0x40000, 0x1000),
        &[ev.as_fd()],
        EINVAL,
    );
    assert_eq!(srv.dev.lock().dma_table.len(), 1);
    // Table full at 3.
    expect_ok(&c, &dma_map(10, 1, 0, 0x40000, 0x1000), &[]);
    expect_ok(&c, &dma_map(11, 3, 0x1000, 0x50000, 0x1000), &[ram.as_fd()]);
    expect_err(&c, &dma_map(12, 3, 0, 0x60000, 0x1000), &[], ENOSPC);
    let t = srv.dev.lock().dma_table.clone();
    assert_eq!(
        t,
        vec![
            SeenDma {
                iova: 0x10000,
                size: 0x10000,
                prot: 3,
                mapped: true
            },
            SeenDma {
                iova: 0x40000,
                size: 0x1000,
                prot: 1,
                mapped: false
            },
            SeenDma {
                iova: 0x50000,
                size: 0x1000,
                prot: 3,
                mapped: true
            },
        ]
    );
}

// ---- 9. DMA_UNMAP -------------------------------------------------------------------------

#[test]
fn dma_unmap_validation_and_echo() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    let ram = raw::memfd(0x10_0000);
    expect_ok(&c, &dma_map(1, 3, 0, 0x10000, 0x10000), &[ram.as_fd()]);
    expect_ok(&c, &dma_map(2, 1, 0, 0x40000, 0x4000), &[]);
    expect_err(
        &c,
        &dma_unmap(3, dma_flags::UNMAP_ALL, 0x10000, 0),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &dma_unmap(3, dma_flags::UNMAP_ALL, 0, 0x1000),
        &[],
        EINVAL,
    );
    expect_err(&c, &dma_unmap(4, 1 << 2, 0x10000, 0x10000), &[], EINVAL);
    expect_err(
        &c,
        &dma_unmap(4, dma_flags::UNMAP_GET_DIRTY_BITMAP, 0x10000, 0x10000),
        &[],
        ENOTSUP,
    );
    expect_err(&c, &dma_unmap(5, 0, 0x10000, 0), &[], EINVAL);
    expect_err(&c, &dma_unmap(5, 0, u64::MAX, 2), &[], EINVAL);
    // The reply echoes the 24-byte request.
    let u = dma_unmap(6, 0, 0x40000, 0x4000);
    let r = expect_ok(&c, &u, &[]);
    assert_eq!(r.payload, u[HEADER_SIZE..]);
    // Decision (h1, dma_table.rs): no match succeeds and removes nothing; a partial unmap
    // splits the region.
    let u = dma_unmap(7, 0, 0x80000, 0x1000);
    assert_eq!(expect_ok(&c, &u, &[]).payload, u[HEADER_SIZE..]);
    expect_ok(&c, &dma_unmap(8, 0, 0x14000, 0x4000), &[]);
    assert_eq!(
        srv.dev.lock().dma_table,
        vec![
            SeenDma {
                iova: 0x10000,
                size: 0x4000,
                prot: 3,
                mapped: true
            },
            SeenDma {
                iova: 0x18000,
                size: 0x8000,
                prot: 3,
                mapped: true
            },
        ]
    );
    let u = dma_unmap(9, dma_flags::UNMAP_ALL, 0, 0);
    assert_eq!(expect_ok(&c, &u, &[]).payload, u[HEADER_SIZE..]);
    assert!(srv.dev.lock().dma_table.is_empty());
}

// ---- 10. SET_IRQS -------------------------------------------------------------------------

#[test]
fn set_irqs_validation() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    let trig = isf::ACTION_TRIGGER;
    let ev = raw::eventfd();
    let ev2 = raw::eventfd();
    expect_err(
        &c,
        &set_irqs(1, isf::DATA_NONE | trig, 5, 0, 1, &[]),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(1, isf::DATA_NONE | trig, u32::MAX, 0, 1, &[]),
        &[],
        EINVAL,
    );
    // start + count overflow, start beyond count.
    expect_err(
        &c,
        &set_irqs(2, isf::DATA_NONE | trig, 0, u32::MAX, 2, &[]),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(2, isf::DATA_NONE | trig, 0, 1, 1, &[]),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(2, isf::DATA_NONE | trig, 0, 0, 2, &[]),
        &[],
        EINVAL,
    );
    // Two action bits, two data bits, no bits, unknown bits.
    expect_err(
        &c,
        &set_irqs(3, isf::DATA_NONE | trig | isf::ACTION_MASK, 0, 0, 1, &[]),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(3, isf::DATA_NONE | isf::DATA_BOOL | trig, 0, 0, 1, &[1]),
        &[],
        EINVAL,
    );
    expect_err(&c, &set_irqs(3, 0, 0, 0, 1, &[]), &[], EINVAL);
    expect_err(
        &c,
        &set_irqs(3, isf::DATA_NONE | trig | 0x40, 0, 0, 1, &[]),
        &[],
        EINVAL,
    );
    // BOOL of the wrong length.
    expect_err(
        &c,
        &set_irqs(4, isf::DATA_BOOL | trig, 0, 0, 1, &[]),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(4, isf::DATA_BOOL | trig, 0, 0, 1, &[1, 1]),
        &[],
        EINVAL,
    );
    // fds with a non-EVENTFD type; fd count != count.
    expect_err(
        &c,
        &set_irqs(5, isf::DATA_NONE | trig, 0, 0, 1, &[]),
        &[ev.as_fd()],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(5, isf::DATA_EVENTFD | trig, 0, 0, 1, &[]),
        &[ev.as_fd(), ev2.as_fd()],
        EINVAL,
    );
    // count 0 with start != 0 or not DATA_NONE|TRIGGER.
    expect_err(
        &c,
        &set_irqs(6, isf::DATA_NONE | trig, 0, 1, 0, &[]),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(6, isf::DATA_NONE | isf::ACTION_MASK, 0, 0, 0, &[]),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(6, isf::DATA_EVENTFD | trig, 0, 0, 0, &[]),
        &[],
        EINVAL,
    );
    // ERR / REQ: TRIGGER only, count <= 1.
    expect_err(
        &c,
        &set_irqs(
            7,
            isf::DATA_NONE | isf::ACTION_MASK,
            irq_index::ERR,
            0,
            1,
            &[],
        ),
        &[],
        EINVAL,
    );
    expect_err(
        &c,
        &set_irqs(7, isf::DATA_EVENTFD | trig, irq_index::REQ, 0, 2, &[]),
        &[ev.as_fd(), ev2.as_fd()],
        EINVAL,
    );
    // MSI-X has 0 vectors on this device.
    expect_err(
        &c,
        &set_irqs(8, isf::DATA_EVENTFD | trig, irq_index::MSIX, 0, 1, &[]),
        &[ev.as_fd()],
        EINVAL,
    );
    assert!(
        srv.dev.lock().set_irqs.is_empty(),
        "a refused SET_IRQS reached the device"
    );

    // Valid: argsz 20 with an fd (QEMU), then enable-update replacing the fd, then
    // de-assign with count 1 and no fds, then disable all.
    let before = open_fds();
    expect_ok(
        &c,
        &set_irqs(9, isf::DATA_EVENTFD | trig, irq_index::INTX, 0, 1, &[]),
        &[ev.as_fd()],
    );
    assert_eq!(open_fds(), before + 1, "the device keeps one fd");
    expect_ok(
        &c,
        &set_irqs(10, isf::DATA_EVENTFD | trig, irq_index::INTX, 0, 1, &[]),
        &[ev2.as_fd()],
    );
    assert_eq!(
        open_fds(),
        before + 1,
        "the replaced eventfd was not closed"
    );
    {
        let d = srv.dev.lock();
        let theirs = d.irq_fd(0, 0).expect("fd assigned");
        // SAFETY: the device holds the fd open while we hold its lock.
        raw::eventfd_signal(unsafe { BorrowedFd::borrow_raw(theirs) }).unwrap();
    }
    assert_eq!(raw::eventfd_take(ev2.as_fd()), 1);
    assert_eq!(raw::eventfd_take(ev.as_fd()), 0);
    expect_ok(
        &c,
        &set_irqs(11, isf::DATA_EVENTFD | trig, irq_index::INTX, 0, 1, &[]),
        &[],
    );
    assert_eq!(open_fds(), before);
    assert!(srv.dev.lock().irq_fd(0, 0).is_none());
    expect_ok(
        &c,
        &set_irqs(12, isf::DATA_BOOL | trig, irq_index::INTX, 0, 1, &[1]),
        &[],
    );
    expect_ok(
        &c,
        &set_irqs(
            13,
            isf::DATA_NONE | isf::ACTION_UNMASK,
            irq_index::INTX,
            0,
            1,
            &[],
        ),
        &[],
    );
    expect_ok(
        &c,
        &set_irqs(14, isf::DATA_NONE | trig, irq_index::INTX, 0, 0, &[]),
        &[],
    );
}

// ---- 11. fd hygiene -----------------------------------------------------------------------

#[test]
fn fds_on_commands_that_take_none_are_closed() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    let f = raw::memfd(4096);
    let g = raw::eventfd();
    expect_err(&c, &get_info(1), &[f.as_fd()], EINVAL);
    expect_err(
        &c,
        &region_read(2, 7, 0, 4),
        &[f.as_fd(), g.as_fd()],
        EINVAL,
    );
    expect_err(&c, &region_write(3, 0, 2, 0, &[1]), &[g.as_fd()], EINVAL);
    expect_err(&c, &dma_unmap(4, 0, 0, 0x1000), &[f.as_fd()], EINVAL);
    expect_err(&c, &region_info(5, 32, 7), &[f.as_fd()], EINVAL);
    expect_err(&c, &msg(6, cmd::DEVICE_RESET, 0, &[]), &[f.as_fd()], EINVAL);
    // A posted write with an fd: no reply, fd closed anyway.
    let before = open_fds();
    c.send(
        &region_write(7, hdr_flags::NO_REPLY, 2, 0, &[1]),
        &[f.as_fd()],
    )
    .unwrap();
    assert_alive(&c);
    assert_eq!(open_fds(), before);
    assert_eq!(srv.dev.lock().resets, 0);
}

#[test]
fn more_fds_than_allowed_are_closed() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    let fds: Vec<OwnedFd> = (0..40).map(|_| raw::eventfd()).collect();
    let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    // 40 fds on a SET_IRQS that takes fds: more than the 16 we advertise.
    expect_err(
        &c,
        &set_irqs(1, isf::DATA_EVENTFD | isf::ACTION_TRIGGER, 0, 0, 1, &[]),
        &b,
        EINVAL,
    );
    expect_err(&c, &dma_map(2, 3, 0, 0, 0x1000), &b[..17], EINVAL);
    assert!(srv.dev.lock().dma_table.is_empty());
}

// ---- 12. Partial I/O ----------------------------------------------------------------------

#[test]
fn byte_by_byte_and_pipelined_requests() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    // A DMA_MAP whose fd rides with the first byte, then sent one byte at a time.
    let ram = raw::memfd(0x4000);
    let req = dma_map(1, 3, 0, 0x1000, 0x4000);
    c.send(&req[..1], &[ram.as_fd()]).unwrap();
    for b in &req[1..] {
        std::thread::sleep(Duration::from_micros(200));
        c.send(std::slice::from_ref(b), &[]).unwrap();
    }
    check_ok(&req, &c.recv().unwrap()).unwrap();
    assert_eq!(
        srv.dev.lock().dma_table,
        vec![SeenDma {
            iova: 0x1000,
            size: 0x4000,
            prot: 3,
            mapped: true
        }]
    );
    // 500 requests in one write; replies in order.
    let mut all = Vec::new();
    for i in 0..500u16 {
        all.extend(region_read(i, 7, u64::from(i % 64) * 4, 4));
    }
    let (tx_done, replies) = std::thread::scope(|s| {
        let h = s.spawn(|| c.send(&all, &[]));
        let mut got = Vec::new();
        for _ in 0..500 {
            got.push(c.recv().expect("pipelined reply"));
        }
        (h.join().expect("sender"), got)
    });
    tx_done.unwrap();
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.header.msg_id as usize, i);
        assert_eq!(r.payload.len(), 20);
    }
}

#[test]
fn peer_closing_mid_message_then_next_client() {
    let _g = serial();
    let srv = TestServer::start();
    let before = open_fds();
    for cut in [3usize, 16, 30] {
        let n = srv.dev.lock().detaches;
        let c = connect_retry(&srv.path).unwrap();
        let ram = raw::memfd(0x1000);
        expect_ok(&c, &dma_map(1, 3, 0, 0x1000, 0x1000), &[ram.as_fd()]);
        let req = dma_map(2, 3, 0, 0x8000, 0x1000);
        c.send(&req[..cut], &[ram.as_fd()]).unwrap();
        drop(c);
        drop(ram);
        srv.wait_for("detach", |d| d.detaches == n + 1);
    }
    let c = connect_retry(&srv.path).unwrap();
    assert_alive(&c);
    srv.wait_for("all cut clients detached", |d| d.detaches == 3);
    assert!(srv.dev.lock().dma_table.is_empty());
    // Our connection is the only extra fd pair (client + server side).
    assert_eq!(open_fds(), before + 2);
}

// ---- 13. Disconnect and reconnect ---------------------------------------------------------

#[test]
fn second_concurrent_client_is_refused_cleanly() {
    let _g = serial();
    let srv = TestServer::start();
    let c1 = srv.connect_negotiated();
    let c2 = srv.connect();
    // c2 is closed by the server; a request on it gets no reply.
    let _ = c2.send(&version_request(0, 0, 0, Some(QEMU_CAPS_JSON)), &[]);
    let got = c2.expect_eof().expect("second client not closed");
    assert!(got.is_empty(), "second client got replies");
    assert_alive(&c1);
    assert_eq!(srv.dev.lock().attaches, 1);
}

#[test]
fn reconnect_keeps_device_state_and_drops_dma_and_irqs() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    let ram = raw::memfd(0x1000);
    let ev = raw::eventfd();
    expect_ok(&c, &dma_map(1, 3, 0, 0x1000, 0x1000), &[ram.as_fd()]);
    expect_ok(
        &c,
        &set_irqs(2, isf::DATA_EVENTFD | isf::ACTION_TRIGGER, 0, 0, 1, &[]),
        &[ev.as_fd()],
    );
    expect_ok(&c, &region_write(3, 0, 2, 0, &[0xaa]), &[]);
    let before = open_fds();
    drop(c);
    srv.wait_for("detach", |d| d.detaches == 1);
    {
        let d = srv.dev.lock();
        assert!(d.dma_table.is_empty());
        assert!(d.irq_fd(0, 0).is_none());
    }
    // Client socket, server socket, the DMA mapping's fd and the eventfd copy are gone.
    assert_eq!(open_fds(), before - 4);
    let c = connect_retry(&srv.path).unwrap();
    let r = expect_ok(&c, &region_read(4, 2, 0, 1), &[]);
    assert_eq!(r.payload[16], 0xaa, "device state lost across reconnect");
}

// ---- 14. Ids --------------------------------------------------------------------------------

#[test]
fn repeated_and_wrapping_message_ids() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    for id in [0xffffu16, 0, 0, 0xffff, 1] {
        let r = expect_ok(&c, &get_info(id), &[]);
        assert_eq!(r.header.msg_id, id);
    }
}

// ---- 15. Config space ---------------------------------------------------------------------

#[test]
fn config_space_access_sizes() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    for (off, n) in [
        (0u64, 1u32),
        (1, 2),
        (3, 4),
        (0, 8),
        (0xf8, 8),
        (0, 256),
        (0xff, 1),
    ] {
        let r = expect_ok(&c, &region_read(1, 7, off, n), &[]);
        let d = srv.dev.lock();
        assert_eq!(
            &r.payload[16..],
            &d.config[off as usize..(off + u64::from(n)) as usize]
        );
    }
    expect_err(&c, &region_read(2, 7, 0, 257), &[], EINVAL);
    expect_err(&c, &region_read(2, 7, 0x100, 1), &[], EINVAL);
    // BAR sizing through config writes.
    expect_ok(&c, &region_write(3, 0, 7, 0x18, &[0xff; 4]), &[]);
    let r = expect_ok(&c, &region_read(4, 7, 0x18, 4), &[]);
    assert_eq!(&r.payload[16..], &0xffff_ff01u32.to_le_bytes());
    // Read-only vendor id.
    expect_ok(&c, &region_write(5, 0, 7, 0, &[0, 0]), &[]);
    let r = expect_ok(&c, &region_read(6, 7, 0, 2), &[]);
    assert_eq!(
        &r.payload[16..],
        &emudev_tests::device::VENDOR_ID.to_le_bytes()
    );
}

#[test]
fn reset_reaches_the_device() {
    let _g = serial();
    let srv = TestServer::start();
    let c = srv.connect_negotiated();
    let req = msg(1, cmd::DEVICE_RESET, 0, &[]);
    let r = expect_ok(&c, &req, &[]);
    assert!(r.payload.is_empty());
    assert_eq!(srv.dev.lock().resets, 1);
}
