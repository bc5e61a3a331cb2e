//! Replays QEMU 11.1's exact start-up sequence (from the strace captures in
//! `shared/fixtures`) against our server with the gpio-like test device, and checks every
//! reply against the spec (not against the rust-vmm replies in the capture).
//!
//! The captures are found relative to this package (`../../shared/fixtures`); when they are
//! absent the tests print SKIP and pass.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use emudev_tests::device::{SeenDma, BAR2_SIZE, CONFIG_SIZE};
use emudev_tests::fixtures::{self, CapturedMsg};
use emudev_tests::harness::TestServer;
use emudev_tests::raw::{self, check_ok, Reply};
use emudev_vfio_user::wire::{
    self, cmd, device_flags, hdr_flags, irq_set_flags, region_flags, DeviceInfo, DmaMap, DmaUnmap,
    IrqInfo, IrqSet, RegionAccess, RegionInfo, Version, HEADER_SIZE,
};
use zerocopy::FromBytes;

fn read<T: FromBytes>(b: &[u8]) -> T {
    T::read_from_prefix(b).expect("payload too short").0
}

/// The DMA table the server should hold, computed from the capture alone.
#[derive(Default)]
struct DmaModel(Vec<SeenDma>);

impl DmaModel {
    fn map(&mut self, m: &DmaMap, with_fd: bool) {
        let r = SeenDma {
            iova: m.address,
            size: m.size,
            prot: m.flags,
            mapped: with_fd,
        };
        assert!(
            !self
                .0
                .iter()
                .any(|x| x.iova < r.iova + r.size && r.iova < x.iova + x.size),
            "capture maps over an existing region: {r:?}"
        );
        self.0.push(r);
        self.0.sort_by_key(|r| r.iova);
    }

    /// Remove `[addr, addr+size)`, splitting regions that straddle its edges.
    fn unmap(&mut self, addr: u64, size: u64) {
        let end = addr + size;
        let mut out = Vec::new();
        for r in self.0.drain(..) {
            let (rs, re) = (r.iova, r.iova + r.size);
            if re <= addr || rs >= end {
                out.push(r);
                continue;
            }
            if rs < addr {
                out.push(SeenDma {
                    size: addr - rs,
                    ..r
                });
            }
            if re > end {
                out.push(SeenDma {
                    iova: end,
                    size: re - end,
                    ..r
                });
            }
        }
        self.0 = out;
    }
}

/// fds to send with a captured message: the guest-RAM memfd for DMA_MAP, fresh eventfds for
/// SET_IRQS (kept by the caller to check they reach the device).
fn fds_for<'a>(
    m: &CapturedMsg,
    ram: &'a OwnedFd,
    eventfds: &'a mut Vec<OwnedFd>,
) -> Vec<BorrowedFd<'a>> {
    match (m.header.command, m.nfds) {
        (_, 0) => Vec::new(),
        (cmd::DMA_MAP, 1) => vec![ram.as_fd()],
        (cmd::DEVICE_SET_IRQS, n) => {
            let start = eventfds.len();
            eventfds.extend((0..n).map(|_| raw::eventfd()));
            eventfds[start..].iter().map(|f| f.as_fd()).collect()
        }
        (c, n) => panic!("capture has {n} fds on {}", cmd::name(c)),
    }
}

/// Spec checks of one reply; returns a description of the first violation.
fn check_reply(
    srv: &TestServer,
    req: &CapturedMsg,
    r: &Reply,
    model: &mut DmaModel,
    eventfds: &[OwnedFd],
) -> Result<(), String> {
    let c = req.header.command;
    let name = cmd::name(c);
    if r.header.is_error() {
        return Err(format!(
            "{name} id={} failed: flags {:#x} errno {}",
            req.header.msg_id, r.header.flags, r.header.error
        ));
    }
    check_ok(&req.bytes, r)?;
    if !r.fds.is_empty() && c != cmd::DEVICE_GET_REGION_INFO {
        return Err(format!("{name} reply carries {} fds", r.fds.len()));
    }
    let p = &r.payload;
    let rq = req.payload();
    match c {
        cmd::VERSION => {
            // QEMU: reply no larger than its request, NUL-terminated, same major, minor <= ours.
            if r.header.msg_size > req.header.msg_size {
                return Err(format!(
                    "VERSION reply {} > request {}",
                    r.header.msg_size, req.header.msg_size
                ));
            }
            let v: Version = read(p);
            if v.major != 0 || v.minor > 0 {
                return Err(format!("VERSION reply {}.{}", v.major, v.minor));
            }
            let json = &p[4..];
            let Some((&0, text)) = json.split_last() else {
                return Err("VERSION JSON not NUL-terminated".into());
            };
            let val: serde_json::Value =
                serde_json::from_slice(text).map_err(|e| format!("VERSION JSON: {e}"))?;
            let caps = val
                .get("capabilities")
                .and_then(|c| c.as_object())
                .ok_or("no capabilities object")?;
            // QEMU's check_* limits.
            if let Some(n) = caps.get("max_msg_fds") {
                let n = n.as_u64().ok_or("max_msg_fds type")?;
                if n > 16 {
                    return Err(format!("max_msg_fds {n} > 16"));
                }
            }
            if let Some(n) = caps.get("max_data_xfer_size") {
                let n = n.as_u64().ok_or("max_data_xfer_size type")?;
                if n == 0 || n > 64 << 20 {
                    return Err(format!("max_data_xfer_size {n}"));
                }
            }
            if let Some(n) = caps.get("pgsizes") {
                let n = n.as_u64().ok_or("pgsizes type")?;
                if n == 0 || n % 4096 != 0 {
                    return Err(format!("pgsizes {n}"));
                }
            }
            if let Some(n) = caps.get("max_dma_maps") {
                if n.as_u64().is_none_or(|n| n > 65535) {
                    return Err(format!("max_dma_maps {n}"));
                }
            }
            if let Some(w) = caps.get("write_multiple") {
                w.as_bool().ok_or("write_multiple type")?;
            }
            if caps.contains_key("twin_socket") {
                return Err("twin_socket offered although QEMU did not ask".into());
            }
        }
        cmd::DMA_MAP => {
            if !p.is_empty() {
                return Err(format!("DMA_MAP reply has {} payload bytes", p.len()));
            }
            model.map(&read::<DmaMap>(rq), req.nfds == 1);
        }
        cmd::DMA_UNMAP => {
            if p.len() != 24 {
                return Err(format!("DMA_UNMAP reply payload {} != 24", p.len()));
            }
            let (got, want): (DmaUnmap, DmaUnmap) = (read(p), read(rq));
            if (got.address, got.size, got.flags) != (want.address, want.size, want.flags) {
                return Err(format!("DMA_UNMAP echo {got:?} != {want:?}"));
            }
            model.unmap(want.address, want.size);
        }
        cmd::DEVICE_GET_INFO => {
            if r.header.msg_size > 32 || p.len() != 16 {
                return Err(format!("GET_INFO reply size {}", r.header.msg_size));
            }
            let i: DeviceInfo = read(p);
            if i.argsz != 16
                || i.flags != device_flags::PCI | device_flags::RESET
                || i.num_regions != wire::region_index::COUNT
                || i.num_irqs != wire::irq_index::COUNT
            {
                return Err(format!("GET_INFO {i:?}"));
            }
        }
        cmd::DEVICE_GET_REGION_INFO => {
            let q: RegionInfo = read(rq);
            if r.header.msg_size as usize > HEADER_SIZE + q.argsz as usize {
                return Err(format!(
                    "REGION_INFO reply {} > 16 + argsz {}",
                    r.header.msg_size, q.argsz
                ));
            }
            let i: RegionInfo = read(p);
            let (size, flags) = match q.index {
                2 => (BAR2_SIZE, region_flags::READ | region_flags::WRITE),
                7 => (CONFIG_SIZE, region_flags::READ | region_flags::WRITE),
                _ => (0, 0),
            };
            if i.index != q.index
                || i.size != size
                || i.flags != flags
                || i.cap_offset != 0
                || i.argsz != 32
            {
                return Err(format!("REGION_INFO {} reply {i:?}", q.index));
            }
            if !r.fds.is_empty() {
                return Err("REGION_INFO of a non-mmap region carries an fd".into());
            }
        }
        cmd::DEVICE_GET_IRQ_INFO => {
            let q: IrqInfo = read(rq);
            let i: IrqInfo = read(p);
            if p.len() != 16 || i.index != q.index || i.argsz != 16 {
                return Err(format!("IRQ_INFO reply {i:?}"));
            }
            let want = if q.index <= 1 || q.index >= 3 { 1 } else { 0 };
            if i.count != want || i.flags & wire::irq_info_flags::EVENTFD == 0 {
                return Err(format!("IRQ_INFO {} count/flags {i:?}", q.index));
            }
        }
        cmd::DEVICE_SET_IRQS => {
            if !p.is_empty() {
                return Err("SET_IRQS reply has a payload".into());
            }
            let s: IrqSet = read(rq);
            let dev = srv.dev.lock();
            if s.flags & irq_set_flags::DATA_EVENTFD != 0 && s.count == 1 {
                // Our eventfd reached the device: signalling the device's copy wakes ours.
                let theirs = dev
                    .irq_fd(s.index, s.start)
                    .ok_or("device got no eventfd")?;
                let ours = eventfds.last().ok_or("no eventfd sent")?;
                // SAFETY: `theirs` is open while we hold the device lock; borrowed briefly.
                let theirs = unsafe { BorrowedFd::borrow_raw(theirs) };
                raw::eventfd_signal(theirs).map_err(|e| e.to_string())?;
                if raw::eventfd_take(ours.as_fd()) != 1 {
                    return Err("device's eventfd is not the one we sent".into());
                }
            }
            if s.flags & irq_set_flags::DATA_NONE != 0
                && s.count == 0
                && dev.irq_fd(s.index, 0).is_some()
            {
                return Err("SET_IRQS count=0 did not disable the index".into());
            }
        }
        cmd::REGION_READ => {
            let q: RegionAccess = read(rq);
            if p.len() != 16 + q.count as usize {
                return Err(format!(
                    "REGION_READ reply payload {} for count {}",
                    p.len(),
                    q.count
                ));
            }
            let e: RegionAccess = read(p);
            if (e.offset, e.region, e.count) != (q.offset, q.region, q.count) {
                return Err(format!("REGION_READ echo {e:?} != {q:?}"));
            }
            let dev = srv.dev.lock();
            let src = match q.region {
                7 => &dev.config,
                2 => &dev.bar2,
                _ => return Err(format!("capture reads region {}", q.region)),
            };
            let (o, n) = (q.offset as usize, q.count as usize);
            if p[16..] != src[o..o + n] {
                return Err(format!(
                    "REGION_READ {:#x}+{n}: {:02x?} != device {:02x?}",
                    o,
                    &p[16..],
                    &src[o..o + n]
                ));
            }
        }
        cmd::REGION_WRITE => {
            let q: RegionAccess = read(rq);
            if p.len() != 16 {
                return Err(format!("REGION_WRITE reply payload {} != 16", p.len()));
            }
            let e: RegionAccess = read(p);
            if (e.offset, e.region, e.count) != (q.offset, q.region, q.count) {
                return Err(format!("REGION_WRITE echo {e:?} != {q:?}"));
            }
        }
        cmd::DEVICE_RESET => {
            if !p.is_empty() {
                return Err("RESET reply has a payload".into());
            }
        }
        _ => return Err(format!("capture has unexpected command {name}")),
    }
    if matches!(c, cmd::DMA_MAP | cmd::DMA_UNMAP) {
        let got = srv.dev.lock().dma_table.clone();
        if got != model.0 {
            return Err(format!(
                "{name} id={}: device DMA table\n  {got:x?}\nmodel\n  {:x?}",
                req.header.msg_id, model.0
            ));
        }
    }
    Ok(())
}

/// Sequential replay; returns the device's (config, BAR2, DMA table) before the disconnect.
fn replay(name: &str) -> Option<(Vec<u8>, Vec<u8>, Vec<SeenDma>)> {
    let cap = fixtures::load(name).expect("parse capture")?;
    let msgs = cap.to_server();
    assert!(!msgs.is_empty(), "{name}: no client messages");
    assert_eq!(msgs[0].header.command, cmd::VERSION);

    // One memfd stands for guest RAM; size it to cover every fd-backed map.
    let ram_size = msgs
        .iter()
        .filter(|m| m.header.command == cmd::DMA_MAP && m.nfds > 0)
        .map(|m| {
            let d: DmaMap = read(m.payload());
            d.offset + d.size
        })
        .max()
        .unwrap_or(4096);
    let ram = raw::memfd(ram_size);

    let srv = TestServer::start();
    let client = srv.connect();
    let mut model = DmaModel::default();
    let mut eventfds = Vec::new();
    let mut replies = 0;
    let mut posted = 0;
    for m in msgs {
        let fds = fds_for(m, &ram, &mut eventfds);
        client.send(&m.bytes, &fds).expect("send");
        drop(fds);
        if m.header.flags & hdr_flags::NO_REPLY != 0 {
            posted += 1;
            continue;
        }
        let r = client.recv().unwrap_or_else(|e| {
            panic!(
                "{name}: no reply to {} id={}: {e}",
                cmd::name(m.header.command),
                m.header.msg_id
            )
        });
        if let Err(e) = check_reply(&srv, m, &r, &mut model, &eventfds) {
            panic!(
                "{name}: {} id={}: {e}",
                cmd::name(m.header.command),
                m.header.msg_id
            );
        }
        replies += 1;
    }
    // Nothing else is pending: a final request's reply is the next message.
    let probe = raw::msg(
        0xfff0,
        cmd::DEVICE_GET_INFO,
        0,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    let r = client.call(&probe, &[]).expect("final GET_INFO");
    check_ok(&probe, &r).expect("final GET_INFO reply");
    eprintln!(
        "{name}: {} messages replayed, {replies} replies checked, {posted} posted",
        msgs.len()
    );

    {
        let dev = srv.dev.lock();
        assert_eq!(
            dev.resets,
            msgs.iter()
                .filter(|m| m.header.command == cmd::DEVICE_RESET)
                .count()
        );
        assert_eq!(dev.attaches, 1);
        assert!(!dev.dma_table.is_empty());
    }
    // Disconnect: the server unmaps everything and detaches, keeping device state.
    let config_before = srv.dev.lock().config.clone();
    let state = {
        let d = srv.dev.lock();
        (d.config.clone(), d.bar2.clone(), d.dma_table.clone())
    };
    drop(client);
    srv.wait_for("detach after disconnect", |d| d.detaches == 1);
    let dev = srv.dev.lock();
    assert!(
        dev.dma_table.is_empty(),
        "DMA table not emptied on disconnect: {:x?}",
        dev.dma_table
    );
    assert!(dev.irq_fds.iter().flatten().all(|f| f.is_none()));
    assert_eq!(dev.config, config_before, "device state lost on disconnect");
    Some(state)
}

#[test]
fn captures_parse_and_match_decoded_listings() {
    for name in fixtures::CAPTURES {
        let Some(cap) = fixtures::load(name).expect("parse capture") else {
            return;
        };
        let Some(dir) = fixtures::fixtures_dir() else {
            return;
        };
        let decoded = std::fs::read_to_string(dir.join(name.replace(".strace", ".decoded.txt")))
            .unwrap_or_default();
        let listed: Vec<(u16, usize)> = decoded
            .lines()
            .filter(|l| l.starts_with("client->server id="))
            .map(|l| {
                let id = l["client->server id=".len()..]
                    .split(' ')
                    .next()
                    .unwrap_or("");
                (id.parse().expect("id"), usize::from(l.contains(" +1fd ")))
            })
            .collect();
        let parsed: Vec<(u16, usize)> = cap
            .to_server()
            .iter()
            .map(|m| (m.header.msg_id, m.nfds))
            .collect();
        if !decoded.is_empty() {
            assert_eq!(
                parsed, listed,
                "{name}: parsed ids/fds differ from the decoded listing"
            );
        }
        // Every client message got exactly one server message back in the capture.
        assert_eq!(cap.to_client().len(), cap.to_server().len(), "{name}");
        let ids: Vec<u16> = cap.to_client().iter().map(|m| m.header.msg_id).collect();
        assert_eq!(
            ids,
            parsed.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{name}"
        );
    }
}

#[test]
fn replay_qemu_shared_memory_startup() {
    let _ = replay(fixtures::CAPTURES[0]);
}

#[test]
fn replay_qemu_anonymous_memory_startup() {
    let _ = replay(fixtures::CAPTURES[1]);
}

/// The VERSION golden test: our reply to QEMU's exact request bytes.
#[test]
fn version_reply_to_qemu_request_bytes() {
    let Some(cap) = fixtures::load(fixtures::CAPTURES[0]).expect("parse") else {
        return;
    };
    let req = &cap.to_server()[0];
    let srv = TestServer::start();
    let c = srv.connect();
    let r = c.call(&req.bytes, &[]).expect("VERSION");
    let mut model = DmaModel::default();
    check_reply(&srv, req, &r, &mut model, &[]).expect("VERSION reply");
    let json = std::str::from_utf8(&r.payload[4..r.payload.len() - 1]).expect("utf8");
    eprintln!("VERSION reply ({} bytes): {json}", r.header.msg_size);
}

/// The same start-up, pipelined the way QEMU's iothread may send it: every REGION_WRITE
/// posted (NO_REPLY, as QEMU does for BAR writes when no region is mappable), the whole
/// stream written by one thread in small chunks that cross message boundaries (fds ride on a
/// chunk that starts their message), replies read concurrently. Only non-posted requests
/// get replies, in order, all successful; the device ends in the same state as after the
/// sequential replay.
#[test]
fn replay_pipelined_with_posted_writes_and_small_chunks() {
    for name in fixtures::CAPTURES {
        let Some(want) = replay(name) else { return };
        let cap = fixtures::load(name).expect("parse").expect("present");
        let mut msgs: Vec<CapturedMsg> = cap.to_server().to_vec();
        for m in msgs
            .iter_mut()
            .filter(|m| m.header.command == cmd::REGION_WRITE)
        {
            m.header.flags |= hdr_flags::NO_REPLY;
            m.bytes[8..12].copy_from_slice(&m.header.flags.to_ne_bytes());
        }
        let expect_ids: Vec<u16> = msgs
            .iter()
            .filter(|m| m.header.flags & hdr_flags::NO_REPLY == 0)
            .map(|m| m.header.msg_id)
            .collect();
        let ram = raw::memfd(1 << 30);
        let srv = TestServer::start();
        let client = srv.connect();
        let got = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let mut evs = Vec::new();
                let mut pending: Vec<u8> = Vec::new();
                let mut seed = 0x2545_f491u32;
                let mut next = |max: u32| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    ((seed >> 16) % max + 1) as usize
                };
                for m in &msgs {
                    let fds = fds_for(m, &ram, &mut evs);
                    if fds.is_empty() {
                        pending.extend_from_slice(&m.bytes);
                    } else {
                        // Flush, then start this message with its fds.
                        while !pending.is_empty() {
                            let n = next(40).min(pending.len());
                            client.send(&pending[..n], &[]).expect("send");
                            pending.drain(..n);
                        }
                        let n = next(7).min(m.bytes.len());
                        client.send(&m.bytes[..n], &fds).expect("send with fds");
                        pending.extend_from_slice(&m.bytes[n..]);
                    }
                    while pending.len() > 64 {
                        let n = next(40);
                        client.send(&pending[..n], &[]).expect("send");
                        pending.drain(..n);
                    }
                }
                client.send(&pending, &[]).expect("send tail");
                evs
            });
            let mut got = Vec::new();
            for _ in 0..expect_ids.len() {
                let r = client.recv().expect("pipelined reply");
                assert_eq!(
                    r.header.flags,
                    hdr_flags::TYPE_REPLY,
                    "{name}: error reply {r:?}"
                );
                got.push(r.header.msg_id);
            }
            let _evs = sender.join().expect("sender");
            got
        });
        assert_eq!(
            got, expect_ids,
            "{name}: replies missing, extra or out of order"
        );
        // Nothing more: the next reply is our probe's.
        let probe = raw::msg(
            0xfff1,
            cmd::DEVICE_GET_INFO,
            0,
            &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        check_ok(&probe, &client.call(&probe, &[]).expect("probe")).expect("probe reply");
        let d = srv.dev.lock();
        assert_eq!(
            (&d.config, &d.bar2, &d.dma_table),
            (&want.0, &want.1, &want.2),
            "{name}"
        );
    }
}
