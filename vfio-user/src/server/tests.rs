use super::dma_msg::{parse_dma_reply, PendingDma};
use super::*;
use crate::client::{Client, ClientError, ClientMemory, SetIrqData};
use crate::codec::{self, Message};
use crate::device::{DeviceDesc, IrqDesc, RegionDesc, RegionMmap, SparseArea};
use crate::dma::DmaError;
use crate::wire::{self, hdr_flags, irq_set_flags as isf};
use crate::wire::{irq_index, region_flags as rf, Header};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;
use zerocopy::{FromBytes, IntoBytes};

#[derive(Default)]
struct Shared {
    events: Vec<String>,
    dma: Option<DmaPort>,
    table_len: usize,
    loop_dma: Option<Result<(), DmaError>>,
}

struct TestDev {
    bar0: Vec<u8>,
    bar1_fd: Arc<OwnedFd>,
    s: Arc<Mutex<Shared>>,
}

impl TestDev {
    fn new() -> (Self, Arc<Mutex<Shared>>) {
        let fd =
            nix::sys::memfd::memfd_create(c"bar1", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        nix::unistd::ftruncate(&fd, 0x2000).unwrap();
        let s = Arc::new(Mutex::new(Shared::default()));
        (
            Self {
                bar0: vec![0; 0x100],
                bar1_fd: Arc::new(fd),
                s: s.clone(),
            },
            s,
        )
    }
    fn ev(&self, e: String) {
        self.s.lock().unwrap().events.push(e);
    }
}

impl ServerDevice for TestDev {
    fn device_desc(&self) -> DeviceDesc {
        DeviceDesc {
            flags: wire::device_flags::PCI | wire::device_flags::RESET,
            num_regions: 9,
            num_irqs: 5,
        }
    }
    fn region(&self, index: u32) -> Option<RegionDesc> {
        match index {
            0 => Some(RegionDesc {
                size: 0x100,
                flags: rf::READ | rf::WRITE,
                mmap: None,
            }),
            1 => Some(RegionDesc {
                size: 0x2000,
                flags: rf::READ | rf::WRITE,
                mmap: Some(RegionMmap {
                    fd: self.bar1_fd.clone(),
                    file_offset: 0,
                    areas: vec![SparseArea {
                        offset: 0x1000,
                        size: 0x1000,
                    }],
                }),
            }),
            2 => Some(RegionDesc {
                size: 0x10,
                flags: rf::READ,
                mmap: None,
            }),
            3..=8 => Some(RegionDesc::default()),
            _ => None,
        }
    }
    fn irq(&self, index: u32) -> Option<IrqDesc> {
        let count = match index {
            irq_index::INTX | irq_index::ERR | irq_index::REQ => 1,
            irq_index::MSI => 0,
            irq_index::MSIX => 8,
            _ => return None,
        };
        Some(IrqDesc {
            flags: wire::irq_info_flags::EVENTFD,
            count,
        })
    }
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if index == 0 {
            let o = offset as usize;
            data.copy_from_slice(&self.bar0[o..o + data.len()]);
        }
        Ok(())
    }
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if index == 0 && offset == 0xf0 {
            // Message DMA from the loop thread must refuse, not hang.
            let port = self.s.lock().unwrap().dma.clone();
            if let Some(p) = port {
                let mut b = [0u8; 4];
                self.s.lock().unwrap().loop_dma = Some(p.read(0, &mut b));
            }
        }
        if index == 0 && offset == 0x80 {
            return Err(Errno::EIO);
        }
        let o = offset as usize;
        self.bar0[o..o + data.len()].copy_from_slice(data);
        self.ev(format!("write {index} {offset:#x} {data:?}"));
        Ok(())
    }
    fn region_io_fds(&mut self, index: u32) -> Result<Vec<crate::device::IoEventFd>, Errno> {
        if index != 0 {
            return Err(Errno::ENOTSUP);
        }
        let fd = Arc::new(eventfd());
        Ok(vec![
            crate::device::IoEventFd {
                offset: 0x40,
                size: 4,
                fd: fd.clone(),
                datamatch: None,
            },
            crate::device::IoEventFd {
                offset: 0x44,
                size: 4,
                fd,
                datamatch: Some(7),
            },
        ])
    }
    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), Errno> {
        let d = match data {
            IrqData::None => "none".to_string(),
            IrqData::Bool(b) => format!("bool{b:?}"),
            IrqData::Eventfds(f) => {
                format!("fds{:?}", f.iter().map(|x| x.is_some()).collect::<Vec<_>>())
            }
        };
        self.ev(format!("irqs {index} {action:?} {start} {count} {d}"));
        Ok(())
    }
    fn dma_map(&mut self, table: &[DmaRegion], added: &DmaRegion) -> Result<(), Errno> {
        self.s.lock().unwrap().table_len = table.len();
        self.ev(format!(
            "map {:#x} {:#x} {}",
            added.iova,
            added.size,
            added.mapping.is_some()
        ));
        Ok(())
    }
    fn dma_unmap(&mut self, table: &[DmaRegion], removed: &[DmaRegion]) -> Result<(), Errno> {
        self.s.lock().unwrap().table_len = table.len();
        self.ev(format!("unmap {}", removed.len()));
        Ok(())
    }
    fn reset(&mut self) -> Result<(), Errno> {
        self.ev("reset".into());
        Ok(())
    }
    fn attach(&mut self, dma: DmaPort) {
        self.s.lock().unwrap().dma = Some(dma);
        self.ev("attach".into());
    }
    fn detach(&mut self) {
        self.s.lock().unwrap().dma = None;
        self.ev("detach".into());
    }
}

struct Fixture {
    path: PathBuf,
    handle: ServerHandle,
    join: Option<JoinHandle<Result<TestDev, ServerError>>>,
    s: Arc<Mutex<Shared>>,
}

impl Fixture {
    fn new(opts: ServerOptions) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "evu-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let (dev, s) = TestDev::new();
        let server = Server::bind(&path, dev, opts).unwrap();
        let (handle, join) = server.spawn();
        Self {
            path,
            handle,
            join: Some(join),
            s,
        }
    }
    fn client(&self) -> Client {
        let mut c = Client::connect(&self.path).unwrap();
        c.set_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }
    fn events(&self) -> Vec<String> {
        self.s.lock().unwrap().events.clone()
    }
    fn wait_event(&self, e: &str) {
        self.wait_events(e, 1)
    }
    fn wait_events(&self, e: &str, n: usize) {
        for _ in 0..500 {
            if self.events().iter().filter(|x| *x == e).count() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("event {e} never came: {:?}", self.events());
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        assert!(!self.path.exists(), "socket file left behind");
    }
}

fn server_err(r: Result<impl std::fmt::Debug, ClientError>) -> Errno {
    match r {
        Err(ClientError::Server(e)) => e,
        other => panic!("expected server error, got {other:?}"),
    }
}

fn memfd(size: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .unwrap();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    fd
}

fn eventfd() -> OwnedFd {
    nix::sys::eventfd::EventFd::new().unwrap().into()
}

#[test]
fn every_message_round_trip() {
    let f = Fixture::new(ServerOptions::default());
    let mut c = f.client();
    let qemu = crate::caps::tests::qemu_payload();
    let caps = c.negotiate_with(&qemu).unwrap();
    assert_eq!(caps.max_msg_fds, 16);
    f.wait_event("attach");

    let ram = memfd(0x10000);
    c.dma_map(0, 0x10000, 3, Some((ram.as_fd(), 0))).unwrap();
    c.dma_map(0x100000, 0x1000, 1, None).unwrap();
    assert_eq!(
        server_err(c.dma_map(0x8000, 0x1000, 3, None)),
        Errno::EEXIST
    );
    let echo = c.dma_unmap(0x100000, 0x1000).unwrap();
    assert_eq!(
        (echo.argsz, echo.address, echo.size),
        (24, 0x100000, 0x1000)
    );

    let info = c.get_info().unwrap();
    assert_eq!((info.num_regions, info.num_irqs, info.argsz), (9, 5, 16));

    let r0 = c.region_info(0).unwrap();
    assert_eq!(
        (r0.info.size, r0.info.flags, r0.info.cap_offset),
        (0x100, rf::READ | rf::WRITE, 0)
    );
    assert!(r0.fd.is_none());
    let r1 = c.region_info(1).unwrap();
    assert_eq!(r1.info.flags, rf::READ | rf::WRITE | rf::MMAP | rf::CAPS);
    assert_eq!(r1.info.cap_offset, 32);
    assert_eq!(
        r1.areas,
        vec![SparseArea {
            offset: 0x1000,
            size: 0x1000
        }]
    );
    assert!(r1.fd.is_some());
    // argsz too small: needed size, no caps, no fd.
    let req = wire::RegionInfo {
        argsz: 32,
        index: 1,
        ..Default::default()
    };
    let m = c
        .request(cmd::DEVICE_GET_REGION_INFO, req.as_bytes(), &[])
        .unwrap();
    assert_eq!(m.payload.len(), 32);
    assert!(m.fds.is_empty());
    let short = wire::RegionInfo::read_from_prefix(&m.payload).unwrap().0;
    assert_eq!(short.argsz, 32 + 8 + 8 + 16);
    // No CAPS with cap_offset 0: QEMU would reject that before retrying.
    assert_eq!(
        (short.flags, short.cap_offset),
        (rf::READ | rf::WRITE | rf::MMAP, 0)
    );
    assert_eq!(server_err(c.region_info(9)), Errno::EINVAL);

    assert_eq!(server_err(c.region_io_fds(1)), Errno::ENOTSUP);
    let (subs, fds) = c.region_io_fds(0).unwrap();
    assert_eq!(fds.len(), 1, "a shared eventfd is sent once");
    assert_eq!(subs.len(), 2);
    assert_eq!(
        (subs[0].offset, subs[0].fd_index, subs[0].flags),
        (0x40, 0, 0)
    );
    assert_eq!(
        (
            subs[1].offset,
            subs[1].fd_index,
            subs[1].flags,
            subs[1].datamatch
        ),
        (0x44, 0, 1, 7)
    );
    // Nonzero count/flags in the request are invalid.
    let bad = wire::RegionIoFds {
        argsz: 16,
        flags: 0,
        index: 0,
        count: 1,
    };
    assert_eq!(
        server_err(c.request(cmd::DEVICE_GET_REGION_IO_FDS, bad.as_bytes(), &[])),
        Errno::EINVAL
    );
    let ii = c.irq_info(irq_index::MSIX).unwrap();
    assert_eq!((ii.count, ii.index), (8, irq_index::MSIX));
    assert_eq!(server_err(c.irq_info(5)), Errno::EINVAL);

    // Eventfds in runs: 3 fds, 2 de-assigned, 1 fd.
    let e: Vec<OwnedFd> = (0..4).map(|_| eventfd()).collect();
    let v = [
        Some(e[0].as_fd()),
        Some(e[1].as_fd()),
        Some(e[2].as_fd()),
        None,
        None,
        Some(e[3].as_fd()),
    ];
    c.set_irqs(
        irq_index::MSIX,
        isf::ACTION_TRIGGER,
        0,
        6,
        SetIrqData::Eventfds(&v),
    )
    .unwrap();
    c.set_irqs(
        irq_index::MSIX,
        isf::ACTION_MASK,
        1,
        2,
        SetIrqData::Bool(&[true, false]),
    )
    .unwrap();
    c.set_irqs(irq_index::MSIX, isf::ACTION_TRIGGER, 0, 0, SetIrqData::None)
        .unwrap();

    c.region_write(0, 4, &[1, 2, 3, 4]).unwrap();
    assert_eq!(c.region_read(0, 2, 6).unwrap(), vec![0, 0, 1, 2, 3, 4]);
    assert_eq!(c.region_read(0, 0, 0).unwrap(), Vec::<u8>::new());
    c.region_write_posted(0, 8, &[9]).unwrap();
    assert_eq!(c.region_read(0, 8, 1).unwrap(), vec![9]);
    let n = c
        .write_multi(&[(0, 0x10, &[1, 1][..]), (0, 0x20, &[2; 8][..])], false)
        .unwrap();
    assert_eq!(n, 2);
    c.write_multi(&[(0, 0x30, &[3][..])], true).unwrap();
    assert_eq!(c.region_read(0, 0x30, 1).unwrap(), vec![3]);
    assert_eq!(c.region_read(0, 0x20, 8).unwrap(), vec![2; 8]);
    c.reset().unwrap();
    assert_eq!(
        server_err(c.device_feature(wire::feature_flags::PROBE | 1, &[])),
        Errno::ENOTSUP
    );
    let all = c.dma_unmap_all().unwrap();
    assert_eq!(all.flags, wire::dma_flags::UNMAP_ALL);

    let ev = f.events();
    let want = [
        "map 0x0 0x10000 true",
        "map 0x100000 0x1000 false",
        "unmap 1",
        "irqs 2 Trigger 0 3 fds[true, true, true]",
        "irqs 2 Trigger 3 2 fds[false, false]",
        "irqs 2 Trigger 5 1 fds[true]",
        "irqs 2 Mask 1 2 bool[true, false]",
        "irqs 2 Trigger 0 0 none",
        "reset",
    ];
    for w in want {
        assert!(ev.iter().any(|e| e == w), "missing {w} in {ev:?}");
    }
    assert_eq!(f.s.lock().unwrap().table_len, 0);
}

#[test]
fn protocol_state_and_header_errors() {
    let f = Fixture::new(ServerOptions::default());
    let mut c = f.client();
    // Anything before VERSION: EINVAL, connection stays.
    assert_eq!(server_err(c.get_info()), Errno::EINVAL);
    // Bad major.
    assert_eq!(
        server_err(c.request(cmd::VERSION, &[1, 0, 0, 0], &[])),
        Errno::ENOTSUP
    );
    // fds on VERSION.
    let fd = memfd(16);
    assert_eq!(
        server_err(c.request(cmd::VERSION, &[0, 0, 0, 0], &[fd.as_fd()])),
        Errno::EINVAL
    );
    // Malformed JSON.
    assert_eq!(
        server_err(c.request(cmd::VERSION, b"\0\0\0\0{\0", &[])),
        Errno::EINVAL
    );
    c.negotiate().unwrap();
    assert_eq!(server_err(c.negotiate()), Errno::EINVAL);
    // Unknown and misdirected commands.
    assert_eq!(server_err(c.request(99, &[0; 8], &[])), Errno::EINVAL);
    assert_eq!(
        server_err(c.request(cmd::DMA_READ, &[0; 16], &[])),
        Errno::EINVAL
    );
    assert_eq!(
        server_err(c.request(cmd::MIG_DATA_READ, &[0; 8], &[])),
        Errno::ENOTSUP
    );
    // fds on a command that takes none.
    assert_eq!(
        server_err(c.request(
            cmd::DEVICE_GET_INFO,
            &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[fd.as_fd()]
        )),
        Errno::EINVAL
    );
    // Oversized message: error reply right away, body skipped, server keeps serving.
    let mut big = codec::request(77, cmd::REGION_WRITE, false, &[]);
    let size = (wire::MAX_MSG_SIZE + 100) as u32;
    big[4..8].copy_from_slice(&size.to_ne_bytes());
    c.send_raw(&big, &[]).unwrap();
    c.send_raw(&vec![0u8; size as usize - 16], &[]).unwrap();
    let m = c.recv_raw().unwrap();
    assert_eq!(
        (m.header.msg_id, m.header.flags, m.header.error),
        (77, 0x21, libc::E2BIG as u32)
    );
    assert_eq!(m.header.msg_size, 16);
    // msg_size < 16.
    let mut small = codec::request(78, cmd::DEVICE_GET_INFO, false, &[]);
    small[4..8].copy_from_slice(&4u32.to_ne_bytes());
    c.send_raw(&small, &[]).unwrap();
    let m = c.recv_raw().unwrap();
    assert_eq!((m.header.msg_id, m.header.flags), (78, 0x21));
    // Bad message type.
    let bad = codec::encode(79, cmd::DEVICE_RESET, 0x3, 0, &[]);
    c.send_raw(&bad, &[]).unwrap();
    assert_eq!(c.recv_raw().unwrap().header.error, libc::EINVAL as u32);
    // An unsolicited reply is dropped silently; the next request still works.
    let stray = codec::encode(80, cmd::DMA_READ, hdr_flags::TYPE_REPLY, 0, &[&[0; 16]]);
    c.send_raw(&stray, &[]).unwrap();
    // A failing posted write gets no reply at all; the read after it gets its own.
    c.region_write_posted(0, 0x80, &[1]).unwrap();
    c.region_write_posted(0, 0x1000, &[1]).unwrap();
    assert_eq!(c.region_read(0, 0, 1).unwrap(), vec![0]);
    assert_eq!(c.get_info().unwrap().num_regions, 9);
}

#[test]
fn region_access_and_dma_validation() {
    let f = Fixture::new(ServerOptions {
        max_dma_maps: 2,
        ..ServerOptions::default()
    });
    let mut c = f.client();
    c.negotiate().unwrap();
    assert_eq!(server_err(c.region_read(9, 0, 4)), Errno::EINVAL);
    assert_eq!(server_err(c.region_read(0, 0xfe, 4)), Errno::EINVAL);
    assert_eq!(server_err(c.region_read(0, u64::MAX - 1, 4)), Errno::EINVAL);
    assert_eq!(
        server_err(c.region_read(0, 0, (wire::MAX_DATA_XFER_SIZE + 1) as u32)),
        Errno::EINVAL
    );
    assert_eq!(server_err(c.region_write(2, 0, &[1])), Errno::EINVAL); // read-only
    assert_eq!(server_err(c.region_read(3, 0, 1)), Errno::EINVAL); // no READ flag, size 0
                                                                   // Write payload length != count.
    let req = wire::RegionAccess {
        offset: 0,
        region: 0,
        count: 4,
    };
    assert_eq!(
        server_err(c.request(cmd::REGION_WRITE, &[req.as_bytes(), &[1, 2]].concat(), &[])),
        Errno::EINVAL
    );
    // Short payloads.
    assert_eq!(
        server_err(c.request(cmd::REGION_READ, &[0; 8], &[])),
        Errno::EINVAL
    );
    assert_eq!(
        server_err(c.request(
            cmd::DEVICE_GET_INFO,
            &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[]
        )),
        Errno::EINVAL
    );
    // WRITE_MULTI: a bad entry rejects the whole batch before any write.
    assert_eq!(
        server_err(c.write_multi(&[(0, 0x40, &[7][..]), (0, 0x100, &[1][..])], false)),
        Errno::EINVAL
    );
    assert_eq!(c.region_read(0, 0x40, 1).unwrap(), vec![0]);
    assert_eq!(server_err(c.write_multi(&[], false)), Errno::EINVAL);

    // DMA_MAP / UNMAP.
    let ram = memfd(0x1000);
    let raw = ram.as_raw_fd();
    assert_eq!(
        server_err(c.dma_map(0, 0x2000, 3, Some((ram.as_fd(), 0)))),
        Errno::EINVAL
    );
    let _ = raw;
    assert_eq!(server_err(c.dma_map(0, 0, 3, None)), Errno::EINVAL);
    assert_eq!(server_err(c.dma_map(u64::MAX, 2, 3, None)), Errno::EINVAL);
    assert_eq!(server_err(c.dma_map(0, 0x1000, 0x10, None)), Errno::EINVAL);
    let two = [memfd(0x1000), memfd(0x1000)];
    let req = wire::DmaMap {
        argsz: 32,
        flags: 3,
        offset: 0,
        address: 0,
        size: 0x1000,
    };
    assert_eq!(
        server_err(c.request(
            cmd::DMA_MAP,
            req.as_bytes(),
            &[two[0].as_fd(), two[1].as_fd()]
        )),
        Errno::EINVAL
    );
    c.dma_map(0, 0x1000, 3, None).unwrap();
    c.dma_map(0x1000, 0x3000, 3, None).unwrap();
    assert_eq!(
        server_err(c.dma_map(0x10000, 0x1000, 3, None)),
        Errno::ENOSPC
    );
    // Partial unmap that would split past the limit.
    assert_eq!(server_err(c.dma_unmap(0x2000, 0x1000)), Errno::ENOSPC);
    // Trimming an edge is fine; unmapping nothing succeeds.
    c.dma_unmap(0x1000, 0x1000).unwrap();
    c.dma_unmap(0x50000, 0x1000).unwrap();
    // UNMAP_ALL with an address, unknown flags.
    let bad = wire::DmaUnmap {
        argsz: 24,
        flags: wire::dma_flags::UNMAP_ALL,
        address: 0x1000,
        size: 0,
    };
    assert_eq!(
        server_err(c.request(cmd::DMA_UNMAP, bad.as_bytes(), &[])),
        Errno::EINVAL
    );
    let bad = wire::DmaUnmap {
        argsz: 24,
        flags: 0x8,
        address: 0,
        size: 0x1000,
    };
    assert_eq!(
        server_err(c.request(cmd::DMA_UNMAP, bad.as_bytes(), &[])),
        Errno::EINVAL
    );
    assert_eq!(f.s.lock().unwrap().table_len, 2);
}

#[test]
fn set_irqs_validation() {
    let f = Fixture::new(ServerOptions::default());
    let mut c = f.client();
    c.negotiate().unwrap();
    let e = eventfd();
    let send = |c: &mut Client,
                flags: u32,
                index: u32,
                start: u32,
                count: u32,
                extra: &[u8],
                fds: &[BorrowedFd<'_>]| {
        let req = wire::IrqSet {
            argsz: 20,
            flags,
            index,
            start,
            count,
        };
        c.request(cmd::DEVICE_SET_IRQS, &[req.as_bytes(), extra].concat(), fds)
    };
    let t = isf::ACTION_TRIGGER;
    let cases: Vec<(u32, u32, u32, u32, Vec<u8>, bool)> = vec![
        (isf::DATA_NONE | t, 5, 0, 1, vec![], false), // index >= num_irqs
        (isf::DATA_NONE | t, 2, u32::MAX, 2, vec![], false), // start+count overflow
        (isf::DATA_NONE | t, 2, 8, 1, vec![], false), // start beyond count
        (isf::DATA_NONE | isf::DATA_BOOL | t, 2, 0, 1, vec![], false), // two data types
        (
            isf::DATA_NONE | t | isf::ACTION_MASK,
            2,
            0,
            1,
            vec![],
            false,
        ), // two actions
        (isf::DATA_NONE | 0x100, 2, 0, 1, vec![], false), // unknown bit
        (isf::DATA_BOOL | t, 2, 0, 2, vec![1], false), // bool length
        (isf::DATA_NONE | t, 2, 0, 1, vec![], true),  // fd without EVENTFD
        (isf::DATA_EVENTFD | t, 2, 0, 2, vec![], true), // nr_fds != count
        (isf::DATA_NONE | t, 2, 1, 0, vec![], false), // count 0, start 1
        (isf::DATA_NONE | isf::ACTION_MASK, 2, 0, 0, vec![], false), // count 0, not trigger
        (isf::DATA_NONE | isf::ACTION_MASK, 3, 0, 1, vec![], false), // ERR non-trigger
        (isf::DATA_NONE | t, 4, 0, 2, vec![], false), // REQ count > 1
        (isf::DATA_NONE | t, 1, 0, 1, vec![], false), // MSI has 0 vectors
    ];
    for (i, (flags, index, start, count, extra, with_fd)) in cases.into_iter().enumerate() {
        let fds: Vec<BorrowedFd<'_>> = if with_fd { vec![e.as_fd()] } else { vec![] };
        assert_eq!(
            server_err(send(&mut c, flags, index, start, count, &extra, &fds)),
            Errno::EINVAL,
            "case {i}"
        );
    }
    // QEMU's shape: argsz 20 with one fd attached, and de-assign with no fds.
    send(
        &mut c,
        isf::DATA_EVENTFD | t,
        irq_index::INTX,
        0,
        1,
        &[],
        &[e.as_fd()],
    )
    .unwrap();
    send(
        &mut c,
        isf::DATA_EVENTFD | t,
        irq_index::MSIX,
        2,
        3,
        &[],
        &[],
    )
    .unwrap();
    send(
        &mut c,
        isf::DATA_EVENTFD | t,
        irq_index::ERR,
        0,
        1,
        &[],
        &[e.as_fd()],
    )
    .unwrap();
    let ev = f.events();
    assert!(
        ev.contains(&"irqs 0 Trigger 0 1 fds[true]".to_string()),
        "{ev:?}"
    );
    assert!(
        ev.contains(&"irqs 2 Trigger 2 3 fds[false, false, false]".to_string()),
        "{ev:?}"
    );
    assert_eq!(ev.iter().filter(|e| e.starts_with("irqs")).count(), 3);
}

struct Mem(Arc<Mutex<Vec<u8>>>);
impl ClientMemory for Mem {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let m = self.0.lock().unwrap();
        let a = addr as usize;
        buf.copy_from_slice(m.get(a..a + buf.len()).ok_or(Errno::EFAULT)?);
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        let mut m = self.0.lock().unwrap();
        let a = addr as usize;
        m.get_mut(a..a + data.len())
            .ok_or(Errno::EFAULT)?
            .copy_from_slice(data);
        Ok(())
    }
}

fn message_dma(layout: DmaLayout, qemu_client: bool) {
    let f = Fixture::new(ServerOptions {
        msg_timeout: Duration::from_millis(500),
        // The spec layout is the default for every client (QEMU 11.1.3 included); the
        // u32-count layout only when asked for.
        dma_layout: (layout == DmaLayout::Qemu).then_some(DmaLayout::Qemu),
        ..ServerOptions::default()
    });
    let mut c = f.client();
    let mem = Arc::new(Mutex::new(
        (0..=255u8).cycle().take(0x1000).collect::<Vec<u8>>(),
    ));
    c.set_memory(Box::new(Mem(mem.clone())));
    c.set_dma_layout(layout);
    if qemu_client {
        c.negotiate_with(&crate::caps::tests::qemu_payload())
            .unwrap();
    } else {
        // Small transfer size forces chunking.
        c.negotiate_with(&crate::caps::format_client_request(8, 64, 100))
            .unwrap();
    }
    let port = f.s.lock().unwrap().dma.clone().unwrap();
    let worker = std::thread::spawn(move || {
        let mut buf = vec![0u8; 200];
        port.read(0x10, &mut buf)?;
        port.write(0x800, &buf)?;
        let mut small = [0u8; 4];
        let bad = port.read(0x2000, &mut small);
        Ok::<_, DmaError>((buf, bad))
    });
    // The client serves DMA while it waits for its own replies.
    let _ = c.get_info().unwrap();
    c.serve(Duration::from_millis(300)).unwrap();
    let (buf, bad) = worker.join().unwrap().unwrap();
    let expect: Vec<u8> = (0x10..0x10 + 200).map(|x| x as u8).collect();
    assert_eq!(buf, expect);
    assert_eq!(&mem.lock().unwrap()[0x800..0x800 + 200], &expect[..]);
    assert!(
        matches!(bad, Err(DmaError::Refused { errno, .. }) if errno == libc::EFAULT as u32),
        "{bad:?}"
    );
    if !qemu_client {
        assert!(c.dma_served() >= 8, "not chunked: {}", c.dma_served());
    }
    // From the loop thread: refused at once.
    c.region_write(0, 0xf0, &[0; 4]).unwrap();
    assert_eq!(
        f.s.lock().unwrap().loop_dma,
        Some(Err(DmaError::WouldDeadlock))
    );
    // A client that never answers: timeout, then Disconnected after it leaves.
    let port = f.s.lock().unwrap().dma.clone().unwrap();
    let mut b = [0u8; 4];
    let r = port.read(0, &mut b);
    assert!(matches!(r, Err(DmaError::Timeout { .. })), "{r:?}");
    drop(c);
    f.wait_event("detach");
    assert_eq!(port.read(0, &mut b), Err(DmaError::Disconnected));
}

#[test]
fn message_dma_spec_layout() {
    message_dma(DmaLayout::Spec, false);
}

#[test]
fn message_dma_qemu_layout() {
    message_dma(DmaLayout::Qemu, true);
}

#[test]
fn disconnect_cleans_up_and_next_client_is_served() {
    let f = Fixture::new(ServerOptions::default());
    let mut c = f.client();
    c.negotiate().unwrap();
    let ram = memfd(0x4000);
    c.dma_map(0, 0x4000, 3, Some((ram.as_fd(), 0))).unwrap();
    // A second client while the first is connected is closed.
    let mut c2 = f.client();
    assert!(matches!(
        c2.negotiate(),
        Err(ClientError::Closed) | Err(ClientError::Io(_))
    ));
    drop(c);
    f.wait_event("detach");
    let ev = f.events();
    let i_unmap = ev.iter().position(|e| e == "unmap 1").unwrap();
    let i_detach = ev.iter().position(|e| e == "detach").unwrap();
    assert!(i_unmap < i_detach);
    assert_eq!(f.s.lock().unwrap().table_len, 0);
    // Disconnect mid-message, then a fresh client works.
    let mut c3 = f.client();
    c3.negotiate().unwrap();
    c3.send_raw(
        &codec::request(1, cmd::REGION_WRITE, false, &[&[0u8; 16]])[..10],
        &[],
    )
    .unwrap();
    drop(c3);
    f.wait_events("detach", 2);
    let mut c4 = f.client();
    c4.negotiate().unwrap();
    assert_eq!(c4.get_info().unwrap().num_irqs, 5);
}

#[test]
fn dma_reply_parsing_is_tolerant() {
    let p = PendingDma {
        write: false,
        addr: 0x1000,
        len: 4,
        deadline: Instant::now(),
        reply: crossbeam_channel::bounded(1).0,
    };
    let mk = |payload: Vec<u8>| Message {
        header: Header {
            msg_id: 1,
            command: cmd::DMA_READ,
            msg_size: 16 + payload.len() as u32,
            flags: 1,
            error: 0,
        },
        payload,
        fds: vec![],
    };
    let spec = [
        &0x1000u64.to_ne_bytes()[..],
        &4u64.to_ne_bytes(),
        &[1, 2, 3, 4],
    ]
    .concat();
    let qemu = [
        &0x1000u64.to_ne_bytes()[..],
        &4u32.to_ne_bytes(),
        &[1, 2, 3, 4],
        &[0; 4],
    ]
    .concat();
    let qemu_short = [
        &0x1000u64.to_ne_bytes()[..],
        &4u32.to_ne_bytes(),
        &[1, 2, 3, 4],
    ]
    .concat();
    for layout in [DmaLayout::Spec, DmaLayout::Qemu] {
        assert_eq!(
            parse_dma_reply(layout, &p, &mk(spec.clone())).unwrap(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            parse_dma_reply(layout, &p, &mk(qemu.clone())).unwrap(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            parse_dma_reply(layout, &p, &mk(qemu_short.clone())).unwrap(),
            vec![1, 2, 3, 4]
        );
    }
    let wrong_addr = [
        &0x2000u64.to_ne_bytes()[..],
        &4u64.to_ne_bytes(),
        &[1, 2, 3, 4],
    ]
    .concat();
    assert!(parse_dma_reply(DmaLayout::Spec, &p, &mk(wrong_addr)).is_err());
    assert!(parse_dma_reply(DmaLayout::Spec, &p, &mk(vec![0; 3])).is_err());
    let pw = PendingDma { write: true, ..p };
    assert!(parse_dma_reply(DmaLayout::Qemu, &pw, &mk(vec![])).is_ok());
    assert!(parse_dma_reply(DmaLayout::Spec, &pw, &mk(spec.clone()[..16].to_vec())).is_ok());
    assert!(parse_dma_reply(DmaLayout::Spec, &pw, &mk(vec![9; 16])).is_err());
}

/// A stream adopted with `connect_stream` is served on the calling thread, one `turn` at a
/// time: a request split over two writes is reassembled, fds reach the device, a second
/// stream is refused while one is connected, and EOF disconnects and cleans up.
#[test]
fn adopted_stream_is_served_on_the_calling_thread() {
    let path = std::env::temp_dir().join(format!("emudev-vu-turn-{}.sock", std::process::id()));
    let (dev, s) = TestDev::new();
    let mut server = Server::bind(&path, dev, ServerOptions::default()).unwrap();
    let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    server.connect_stream(theirs).unwrap();
    assert!(server.is_connected());
    let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_eq!(
        server.connect_stream(b).unwrap_err().kind(),
        io::ErrorKind::AddrInUse
    );
    let mut c = Client::from_stream(mine).unwrap();
    let turn = |srv: &mut Server<TestDev>| srv.turn(Some(Duration::ZERO)).unwrap();

    let payload = caps::format_client_request(
        wire::MAX_MSG_FDS as u32,
        wire::MAX_DATA_XFER_SIZE as u64,
        65535,
    );
    let req = codec::request(0, cmd::VERSION, false, &[&payload]);
    c.send_raw(&req[..7], &[]).unwrap();
    turn(&mut server);
    assert!(s.lock().unwrap().events.is_empty());
    c.send_raw(&req[7..], &[]).unwrap();
    turn(&mut server);
    let m = c.recv_raw().unwrap();
    assert_eq!((m.header.command, m.header.error), (cmd::VERSION, 0));

    let ram = memfd(0x4000);
    let map = wire::DmaMap {
        argsz: std::mem::size_of::<wire::DmaMap>() as u32,
        flags: wire::dma_flags::READ | wire::dma_flags::WRITE,
        offset: 0,
        address: 0x10_0000,
        size: 0x4000,
    };
    let req = codec::request(1, cmd::DMA_MAP, false, &[map.as_bytes()]);
    c.send_raw(&req, &[ram.as_fd()]).unwrap();
    turn(&mut server);
    let m = c.recv_raw().unwrap();
    assert_eq!((m.header.command, m.header.error), (cmd::DMA_MAP, 0));
    assert_eq!(s.lock().unwrap().table_len, 1);

    drop(c);
    server.turn(Some(Duration::from_secs(5))).unwrap();
    assert!(!server.is_connected());
    let ev = s.lock().unwrap().events.clone();
    assert_eq!(&ev[ev.len() - 2..], ["unmap 1", "detach"]);
    assert_eq!(s.lock().unwrap().table_len, 0);
    let (_x, y) = std::os::unix::net::UnixStream::pair().unwrap();
    server.connect_stream(y).unwrap();
}
