//! Observations of the rust-vmm `vfio_user` 0.1.7 *server* with our raw client, pinning the
//! facts in tests/RUSTVMM-DEVIATIONS.md (it is not our code: these tests document it, and
//! fail if a new version changes behaviour, so the notes stay true).

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;

use emudev_tests::harness::TempDir;
use emudev_tests::raw::{msg, version_request, RawClient, QEMU_CAPS_JSON};
use emudev_vfio_user::wire::{cmd, hdr_flags, RegionAccess};
use vfio_bindings::bindings::vfio::vfio_region_info;
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};
use zerocopy::IntoBytes;

/// Region writes the backend saw: (region, offset, data).
type Writes = Arc<Mutex<Vec<(u32, u64, Vec<u8>)>>>;

#[derive(Default)]
struct Backend {
    writes: Writes,
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        if region == 2 && offset >= 0x80 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        data.fill(0x11);
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((region, offset, data.to_vec()));
        Ok(())
    }
    fn dma_map(
        &mut self,
        _: DmaMapFlags,
        _: u64,
        _: u64,
        _: u64,
        _: Option<File>,
    ) -> io::Result<()> {
        Ok(())
    }
    fn dma_unmap(&mut self, _: DmaUnmapFlags, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: Vec<File>) -> io::Result<()> {
        Ok(())
    }
}

fn region(index: u32, size: u64) -> ServerRegion {
    ServerRegion {
        region_info: vfio_region_info {
            argsz: 32,
            flags: if size > 0 { 3 } else { 0 },
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

/// Their server on a thread (it serves one connection), and our connected raw client.
fn start() -> (RawClient, Writes, TempDir) {
    let dir = TempDir::new("rvmm").expect("temp dir");
    let path = dir.0.join("s.sock");
    let regions = (0..9)
        .map(|i| region(i, if matches!(i, 2 | 7) { 256 } else { 0 }))
        .collect();
    let irqs = vec![IrqInfo {
        index: 0,
        flags: 1,
        count: 1,
    }];
    let server = Server::new(&path, true, irqs, regions).expect("rust-vmm server");
    let backend = Backend::default();
    let writes = backend.writes.clone();
    std::thread::spawn(move || {
        let mut b = backend;
        let _ = server.run(&mut b);
    });
    let c = RawClient::connect(&path).expect("connect");
    (c, writes, dir)
}

fn read_req(id: u16, region: u32, offset: u64, count: u32) -> Vec<u8> {
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

#[test]
fn rustvmm_server_version_posted_writes_and_errors() {
    let (c, writes, _dir) = start();
    // VERSION: 0.0, its fixed caps; the reply is shorter than QEMU's request.
    let req = version_request(0, 0, 0, Some(QEMU_CAPS_JSON));
    let r = c.call(&req, &[]).expect("VERSION reply");
    assert_eq!(r.header.flags, hdr_flags::TYPE_REPLY);
    assert!(r.header.msg_size as usize <= req.len());
    assert_eq!(&r.payload[..4], &[0, 0, 0, 0]);
    let json = std::str::from_utf8(&r.payload[4..r.payload.len() - 1]).expect("utf8");
    assert!(json.contains("\"max_msg_fds\":1"), "{json}");

    // A posted write is not answered (NO_REPLY is honoured in 0.1.7 for valid requests).
    let mut p = RegionAccess {
        offset: 0,
        region: 2,
        count: 2,
    }
    .as_bytes()
    .to_vec();
    p.extend([7, 8]);
    c.send(&msg(1, cmd::REGION_WRITE, hdr_flags::NO_REPLY, &p), &[])
        .expect("send");
    let r = c.call(&read_req(2, 2, 0, 2), &[]).expect("read reply");
    assert_eq!(r.header.msg_id, 2, "a posted write was answered");
    assert_eq!(writes.lock().unwrap_or_else(|e| e.into_inner()).len(), 1);

    // A backend error: the reply has Reply|Error but errno 0.
    let bad = read_req(3, 2, 0x80, 4);
    let r = c.call(&bad, &[]).expect("error reply");
    assert_eq!(
        (r.header.msg_id, r.header.flags, r.header.msg_size),
        (3, 0x21, 16)
    );
    assert_eq!(
        r.header.error, 0,
        "errno now reported? update the deviations doc"
    );

    // Bad region index (InvalidInput): errno EINVAL.
    let r = c.call(&read_req(4, 42, 0, 4), &[]).expect("error reply");
    assert_eq!(
        (r.header.flags, r.header.error),
        (0x21, libc::EINVAL as u32)
    );

    // A posted write that fails still gets an error reply, and its data is not drained:
    // the 16 data bytes are then parsed as the next header.
    let mut p = RegionAccess {
        offset: 0,
        region: 42,
        count: 16,
    }
    .as_bytes()
    .to_vec();
    p.extend(read_req(6, 2, 0, 1)[..16].iter());
    c.send(&msg(5, cmd::REGION_WRITE, hdr_flags::NO_REPLY, &p), &[])
        .expect("send");
    let r = c.recv().expect("reply to a failed posted write");
    assert_eq!(
        (r.header.msg_id, r.header.flags),
        (5, 0x21),
        "failed posted write not answered"
    );
    // The undrained data bytes were taken as a REGION_READ header (id 6); the next 16 bytes
    // we send complete it, and the server executes a command hidden in a write's data.
    c.send(
        RegionAccess {
            offset: 0,
            region: 2,
            count: 1,
        }
        .as_bytes(),
        &[],
    )
    .expect("send");
    let r = c.recv().expect("reply to the smuggled read");
    assert_eq!(
        (r.header.msg_id, r.header.command, r.header.flags),
        (6, cmd::REGION_READ, 1)
    );
}
