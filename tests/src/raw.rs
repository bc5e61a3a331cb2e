//! A raw vfio-user peer for tests: sends arbitrary bytes with fds and receives whole
//! messages, every read bounded by a timeout so a test can never hang.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use emudev_vfio_user::socket::{recv_with_fds, send_with_fds};
use emudev_vfio_user::wire::{cmd, hdr_flags, Header, Version, HEADER_SIZE};
use zerocopy::{FromBytes, IntoBytes};

/// Default bound on every wait for a reply.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// QEMU 11.1's VERSION JSON, byte for byte (NUL added by [`version_request`]).
pub const QEMU_CAPS_JSON: &str = r#"{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, "max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, "write_multiple": true}}"#;

/// One received message.
#[derive(Debug)]
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// Flags 0x21 and the errno, or a description of what is wrong.
    pub fn errno(&self) -> Option<u32> {
        self.header.is_error().then_some(self.header.error)
    }
}

/// Build a message: header (msg_size computed) + payload.
pub fn msg(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        msg_id: id,
        command,
        msg_size: (HEADER_SIZE + payload.len()) as u32,
        flags,
        error: 0,
    };
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A VERSION request with the given version and JSON (NUL appended).
pub fn version_request(id: u16, major: u16, minor: u16, json: Option<&str>) -> Vec<u8> {
    let mut p = Version { major, minor }.as_bytes().to_vec();
    if let Some(j) = json {
        p.extend_from_slice(j.as_bytes());
        p.push(0);
    }
    msg(id, cmd::VERSION, 0, &p)
}

/// A raw client connection.
pub struct RawClient {
    pub sock: UnixStream,
}

/// Something went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("timed out after {0:?} waiting for a message")]
    Timeout(Duration),
    #[error("server closed the connection")]
    Eof,
    #[error("bad message from server: {0}")]
    Bad(String),
}

impl RawClient {
    /// Connect to a server socket.
    pub fn connect(path: &Path) -> Result<Self, RawError> {
        let sock = UnixStream::connect(path)?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.set_write_timeout(Some(TIMEOUT))?;
        Ok(Self { sock })
    }

    /// Wrap an already connected stream (e.g. one end of a socketpair).
    pub fn from_stream(sock: UnixStream) -> Result<Self, RawError> {
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.set_write_timeout(Some(TIMEOUT))?;
        Ok(Self { sock })
    }

    /// Send `bytes` with `fds` on the first byte.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), RawError> {
        let mut off = 0;
        let mut first = true;
        while off < bytes.len() {
            let f = if first { fds } else { &[] };
            let n = send_with_fds(self.sock.as_fd(), &[IoSlice::new(&bytes[off..])], f)?;
            if n == 0 {
                return Err(RawError::Eof);
            }
            off += n;
            first = false;
        }
        Ok(())
    }

    fn read_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
    ) -> Result<(), RawError> {
        let mut off = 0;
        while off < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RawError::Timeout(TIMEOUT));
            }
            self.sock.set_read_timeout(Some(left))?;
            match recv_with_fds(self.sock.as_fd(), &mut buf[off..]) {
                Ok(r) if r.bytes == 0 => return Err(RawError::Eof),
                Ok(r) => {
                    off += r.bytes;
                    fds.extend(r.fds);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Err(RawError::Timeout(TIMEOUT))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Receive one whole message within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Reply, RawError> {
        let deadline = Instant::now() + timeout;
        let mut fds = Vec::new();
        let mut hb = [0u8; HEADER_SIZE];
        self.read_exact(&mut hb, &mut fds, deadline)?;
        let header =
            Header::read_from_bytes(&hb[..]).map_err(|_| RawError::Bad("header".into()))?;
        let size = header.msg_size as usize;
        if !(HEADER_SIZE..=(1 << 21)).contains(&size) {
            return Err(RawError::Bad(format!("msg_size {size}")));
        }
        let mut payload = vec![0u8; size - HEADER_SIZE];
        self.read_exact(&mut payload, &mut fds, deadline)?;
        Ok(Reply {
            header,
            payload,
            fds,
        })
    }

    /// Receive one whole message within [`TIMEOUT`].
    pub fn recv(&self) -> Result<Reply, RawError> {
        self.recv_timeout(TIMEOUT)
    }

    /// Send a request and wait for its reply.
    pub fn call(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<Reply, RawError> {
        self.send(bytes, fds)?;
        self.recv()
    }

    /// Nothing arrives within `wait` (neither bytes nor EOF).
    pub fn assert_silent(&self, wait: Duration) -> Result<(), RawError> {
        self.sock.set_nonblocking(true)?;
        let start = Instant::now();
        let mut byte = [0u8; 1];
        let res = loop {
            match nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                &mut byte,
                nix::sys::socket::MsgFlags::MSG_PEEK,
            )
            .map_err(io::Error::from)
            {
                Ok(0) => break Err(RawError::Eof),
                Ok(_) => break Err(RawError::Bad("unexpected message".into())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if start.elapsed() >= wait {
                        break Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => break Err(e.into()),
            }
        };
        self.sock.set_nonblocking(false)?;
        res
    }

    /// The server closes the connection within [`TIMEOUT`] (after any queued messages,
    /// which are returned).
    pub fn expect_eof(&self) -> Result<Vec<Reply>, RawError> {
        let mut got = Vec::new();
        loop {
            match self.recv() {
                Err(RawError::Eof) => return Ok(got),
                Err(RawError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(got)
                }
                Ok(m) => got.push(m),
                Err(e) => return Err(e),
            }
        }
    }

    /// VERSION with QEMU's JSON; returns the reply.
    pub fn negotiate(&self) -> Result<Reply, RawError> {
        let r = self.call(&version_request(0, 0, 0, Some(QEMU_CAPS_JSON)), &[])?;
        if r.header.is_error() {
            return Err(RawError::Bad(format!(
                "VERSION refused: errno {}",
                r.header.error
            )));
        }
        Ok(r)
    }
}

/// Check the shape of a success reply to `req`: id and command echoed, flags = REPLY.
pub fn check_ok(req: &[u8], r: &Reply) -> Result<(), String> {
    let h = Header::read_from_prefix(req)
        .map_err(|_| "short request".to_string())?
        .0;
    if r.header.msg_id != h.msg_id || r.header.command != h.command {
        return Err(format!(
            "reply id/cmd {}/{} for request {}/{}",
            r.header.msg_id, r.header.command, h.msg_id, h.command
        ));
    }
    if r.header.flags != hdr_flags::TYPE_REPLY || r.header.error != 0 {
        return Err(format!(
            "{}: expected success, got flags {:#x} errno {}",
            cmd::name(h.command),
            r.header.flags,
            r.header.error
        ));
    }
    if r.header.msg_size as usize != HEADER_SIZE + r.payload.len() {
        return Err("msg_size does not match".into());
    }
    Ok(())
}

/// Check an error reply to `req`: header only, flags 0x21, id and command echoed, `errno`.
pub fn check_err(req: &[u8], r: &Reply, errno: i32) -> Result<(), String> {
    let h = Header::read_from_prefix(req)
        .map_err(|_| "short request".to_string())?
        .0;
    let want = (
        h.msg_id,
        h.command,
        HEADER_SIZE as u32,
        0x21u32,
        errno as u32,
    );
    let got = (
        r.header.msg_id,
        r.header.command,
        r.header.msg_size,
        r.header.flags,
        r.header.error,
    );
    if want != got || !r.payload.is_empty() || !r.fds.is_empty() {
        return Err(format!(
            "{}: expected (id, cmd, size, flags, errno) = {want:?}, got {got:?}, {} payload bytes",
            cmd::name(h.command),
            r.payload.len()
        ));
    }
    Ok(())
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A memfd of `size` bytes (sparse).
pub fn memfd(size: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        c"emudev-test",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .expect("memfd_create");
    nix::unistd::ftruncate(&fd, size as i64).expect("ftruncate");
    fd
}

/// A non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    let efd = nix::sys::eventfd::EventFd::from_flags(
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
    )
    .expect("eventfd");
    OwnedFd::from(efd)
}

/// Signal an eventfd through any fd that refers to it (e.g. the server's dup).
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    nix::unistd::write(fd, &one)
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Read (and reset) an eventfd's counter; 0 if it was not signalled.
pub fn eventfd_take(fd: BorrowedFd<'_>) -> u64 {
    let mut b = [0u8; 8];
    match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}
