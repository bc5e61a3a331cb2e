//! Stateful fuzzing of the vfio-user server: the input is a stream of client messages fed to
//! a live `Server` (with the gpio-like test device) over a real UNIX socket, split into
//! chunks to exercise reassembly, with fds attached where the commands take them. Each
//! input is one client connection to the server's listener; the server runs on this thread,
//! one `Server::turn` (accept, read, dispatch, flush) after each chunk we write, so every
//! chunk is read on its own and an input costs no thread hand-offs. The server must neither
//! panic nor hang (every input must end with the server closing the connection within 5 s
//! after we close our side).
//!
//! Input layout: byte 0 is a control byte, the rest is the message stream.
//! - bit 0: prepend a valid VERSION (so random inputs get past negotiation);
//! - bit 1: attach fds (a 1 GiB sparse memfd on DMA_MAP, `count` eventfds on SET_IRQS, one memfd
//!   on any other command when bit 2 is also set);
//! - bits 3-7: chunking seed (0 = whole messages; otherwise a per-message split pattern).

#![no_main]

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use emudev_tests::device::{DeviceHandle, TestDevice};
use emudev_tests::raw::{self, version_request, QEMU_CAPS_JSON};
use emudev_vfio_user::socket::{recv_with_fds, send_with_fds};
use emudev_vfio_user::wire::{cmd, Header, IrqSet};
use emudev_vfio_user::{Server, ServerOptions};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

const DEADLINE: Duration = Duration::from_secs(5);

/// Fds the inputs attach; shared by every input (the server only reads them).
struct Fds {
    ram: OwnedFd,
    eventfds: Vec<OwnedFd>,
}

struct Live {
    server: Server<TestDevice>,
    /// The device's observation log (for tests' assertions); emptied per input so a long
    /// run's RSS reflects the server, not a log that grows by one entry per SET_IRQS.
    device: DeviceHandle,
    path: PathBuf,
    fds: Fds,
}

thread_local! {
    /// One server for the process (device state persists across inputs, as with a real
    /// server serving one client after another); libFuzzer calls us on one thread.
    static LIVE: RefCell<Option<Live>> = const { RefCell::new(None) };
}

fn new_live() -> Live {
    let dir = std::env::temp_dir().join(format!("emudev-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("server.sock");
    let (dev, device) = TestDevice::new();
    let server = Server::bind(
        &path,
        dev,
        ServerOptions {
            max_dma_maps: 64,
            ..Default::default()
        },
    )
    .expect("bind fuzz server");
    Live {
        server,
        device,
        path,
        fds: Fds {
            // Sparse; large enough for the 1 GiB guest-RAM maps of the QEMU captures.
            ram: raw::memfd(1 << 30),
            eventfds: (0..16).map(|_| raw::eventfd()).collect(),
        },
    }
}

/// Split `stream` into messages by their headers (clamped to what is there), so fds can be
/// attached to each message's first byte.
fn messages(stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < stream.len() {
        let rest = &stream[off..];
        let size = Header::read_from_prefix(rest)
            .map(|(h, _)| h.msg_size as usize)
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        out.push(&rest[..size]);
        off += size;
    }
    out
}

fn fds_for<'a>(live: &'a Fds, m: &[u8], ctl: u8) -> Vec<BorrowedFd<'a>> {
    if ctl & 2 == 0 {
        return Vec::new();
    }
    let Ok((h, body)) = Header::read_from_prefix(m) else {
        return Vec::new();
    };
    match h.command {
        cmd::DMA_MAP => vec![live.ram.as_fd()],
        cmd::DEVICE_SET_IRQS => {
            let n = IrqSet::read_from_prefix(body)
                .map(|(s, _)| s.count as usize)
                .unwrap_or(1);
            live.eventfds
                .iter()
                .take(n.min(live.eventfds.len()))
                .map(|f| f.as_fd())
                .collect()
        }
        _ if ctl & 4 != 0 => vec![live.ram.as_fd()],
        _ => Vec::new(),
    }
}

/// Read and discard whatever the server sent; `Ok(true)` on EOF.
fn drain(sock: &UnixStream, buf: &mut [u8]) -> io::Result<bool> {
    loop {
        match recv_with_fds(sock.as_fd(), buf) {
            Ok(r) if r.bytes == 0 => return Ok(true),
            Ok(_) => {} // fds in replies are dropped (closed) here
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Let the server do what it can without blocking.
fn turn(server: &mut Server<TestDevice>) {
    if let Err(e) = server.turn(Some(Duration::ZERO)) {
        panic!("server event loop failed: {e}");
    }
}

/// Send `bytes` (fds on the first byte); whenever the socket is full, let the server read
/// and drain its replies.
fn send_chunk(
    server: &mut Server<TestDevice>,
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    buf: &mut [u8],
    start: Instant,
) -> bool {
    let mut off = 0;
    let mut first = true;
    while off < bytes.len() {
        let f = if first { fds } else { &[] };
        match send_with_fds(sock.as_fd(), &[io::IoSlice::new(&bytes[off..])], f) {
            Ok(n) => {
                off += n;
                first = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() > DEADLINE {
                    panic!("server stopped reading for {DEADLINE:?}");
                }
                turn(server);
                match drain(sock, buf) {
                    Ok(true) | Err(_) => return false,
                    Ok(false) => {}
                }
            }
            // The server may close on us (e.g. a doomed stream); fine.
            Err(_) => return false,
        }
    }
    true
}

fn run(live: &mut Live, data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let Live {
        server,
        device,
        path,
        fds,
    } = live;
    device.lock().set_irqs.clear();
    let start = Instant::now();
    // A UNIX connect completes on the listener's backlog; the next turn accepts it.
    let sock = UnixStream::connect(&*path).expect("connect to the fuzz server");
    while !server.is_connected() {
        if start.elapsed() > DEADLINE {
            panic!("server did not accept within {DEADLINE:?}");
        }
        turn(server);
    }
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; 1 << 16];
    let version = version_request(0, 0, 0, Some(QEMU_CAPS_JSON));
    let mut msgs: Vec<&[u8]> = Vec::new();
    if ctl & 1 != 0 {
        msgs.push(&version);
    }
    msgs.extend(messages(stream));
    let mut seed = u32::from(ctl >> 3);
    'send: for m in msgs {
        let f = fds_for(fds, m, ctl);
        // Chunk pattern: whole message, or pieces of 1..=17 bytes from a tiny LCG.
        let mut off = 0;
        let mut first = true;
        while off < m.len() {
            let n = if seed == 0 {
                m.len()
            } else {
                seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                (((seed >> 16) % 17) + 1) as usize
            };
            let end = (off + n).min(m.len());
            let fl: &[BorrowedFd<'_>] = if first { &f } else { &[] };
            if !send_chunk(server, &sock, &m[off..end], fl, &mut buf, start) {
                break 'send;
            }
            // The server reads each chunk on its own: reassembly is exercised exactly as
            // the split pattern says (deterministically, unlike a racing server thread).
            turn(server);
            off = end;
            first = false;
        }
    }
    // Close our side; the server must finish and close its side.
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + DEADLINE;
    while server.is_connected() {
        if Instant::now() > deadline {
            panic!("server did not close the connection within {DEADLINE:?} after EOF");
        }
        turn(server);
        if let Ok(true) | Err(_) = drain(&sock, &mut buf) {
            // Our side saw EOF: the server closed; one more turn finishes its cleanup.
            turn(server);
        }
    }
    // Replies it flushed before closing.
    let _ = drain(&sock, &mut buf);
}

fuzz_target!(|data: &[u8]| {
    LIVE.with(|l| {
        let mut l = l.borrow_mut();
        let live = l.get_or_insert_with(new_live);
        run(live, data);
    })
});
