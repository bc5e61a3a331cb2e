//! Message framing: reassembly of vfio-user messages from a stream, and encoding.
//!
//! The [`Decoder`] accepts bytes in arbitrary chunks (a header split across reads, many
//! pipelined messages in one read) and yields whole [`Frame`]s. A header whose `msg_size` is
//! out of bounds is rejected before anything is allocated for it; its body is skipped as it
//! arrives, so the server can answer with an error and keep serving.
//!
//! fd ownership: Linux ends a stream read right after the segment that carried SCM_RIGHTS
//! data, so the fds returned by one read belong to the message holding the *last* byte of
//! that read (the sender put them on the first byte of that message). fds that land in a
//! skipped or rejected message are closed.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use zerocopy::{FromBytes, IntoBytes};

use crate::socket::{recv_with_fds, send_with_fds};
use crate::wire::{hdr_flags, Header, HEADER_SIZE, MAX_MSG_FDS, MAX_MSG_SIZE};

/// One complete message with the fds that came with it.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    /// Bytes after the header (`msg_size - 16` of them).
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Why a frame was rejected by the decoder; the stream stays in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message size {0} is smaller than the header")]
    TooSmall(u32),
    #[error("message size {0} exceeds the maximum")]
    TooLarge(u32),
    #[error("message carried {0} fds, more than allowed")]
    TooManyFds(usize),
    #[error("the kernel truncated the fds of the message")]
    FdsTruncated,
}

/// What the decoder produces.
#[derive(Debug)]
pub enum Frame {
    Message(Message),
    /// A malformed message that was dropped (its fds closed, its body skipped).
    Rejected {
        header: Header,
        error: FrameError,
    },
}

struct FdBatch {
    /// Stream position of the last byte of the read that carried these fds.
    last_pos: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

const INITIAL_BUF: usize = 64 * 1024;

/// Incremental message decoder.
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream position of `buf[start]`.
    pos: u64,
    /// Total bytes received so far (stream position of `buf[end]`).
    received: u64,
    /// Bytes of a rejected body still to drop.
    skip: u64,
    batches: VecDeque<FdBatch>,
    max_msg_size: usize,
    max_fds: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self::with_limits(MAX_MSG_SIZE, MAX_MSG_FDS)
    }

    /// A decoder with explicit limits (`max_msg_size` includes the header).
    pub fn with_limits(max_msg_size: usize, max_fds: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            pos: 0,
            received: 0,
            skip: 0,
            batches: VecDeque::new(),
            max_msg_size: max_msg_size.max(HEADER_SIZE),
            max_fds,
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// True when no partial message is pending (a clean place for the peer to stop).
    pub fn is_idle(&self) -> bool {
        self.buffered() == 0 && self.skip == 0
    }

    fn make_room(&mut self, want: usize) {
        if self.start > 0 && self.buf.len() - self.end < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            let need = self.end + want;
            let new_len = need.max(self.buf.len().saturating_mul(2)).max(INITIAL_BUF);
            self.buf.resize(new_len, 0);
        }
    }

    fn record(&mut self, n: usize, fds: Vec<OwnedFd>, truncated: bool) {
        if n > 0 && (!fds.is_empty() || truncated) {
            self.batches.push_back(FdBatch {
                last_pos: self.received + n as u64 - 1,
                fds,
                truncated,
            });
        }
        self.received += n as u64;
    }

    /// Append bytes (and the fds that came with them), as if read from a socket.
    pub fn push(&mut self, bytes: &[u8], fds: Vec<OwnedFd>, truncated: bool) {
        self.make_room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
        self.record(bytes.len(), fds, truncated);
    }

    /// One `recvmsg` from `sock` into the buffer. Returns the bytes read (0 = EOF).
    /// Call [`Decoder::next_frame`] until it returns `None` before reading again.
    pub fn read_from(&mut self, sock: BorrowedFd<'_>) -> io::Result<usize> {
        // Room for the rest of the current message, or a generous chunk of pipelined ones;
        // never more than one maximal message beyond what is buffered.
        let mut want = INITIAL_BUF;
        if self.skip == 0 && self.buffered() >= HEADER_SIZE {
            if let Ok(h) = Header::read_from_bytes(&self.buf[self.start..self.start + HEADER_SIZE])
            {
                let size = h.msg_size as usize;
                if size <= self.max_msg_size && size > self.buffered() {
                    want = want.max(size - self.buffered());
                }
            }
        }
        self.make_room(want);
        let r = recv_with_fds(sock, &mut self.buf[self.end..])?;
        self.end += r.bytes;
        self.record(r.bytes, r.fds, r.truncated);
        Ok(r.bytes)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.pos += n as u64;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Drop (close) fd batches that belong entirely to bytes before `pos`.
    fn drop_batches_before(&mut self, pos: u64) {
        while self.batches.front().is_some_and(|b| b.last_pos < pos) {
            self.batches.pop_front();
        }
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Option<Frame> {
        if self.skip > 0 {
            let n = self.skip.min(self.buffered() as u64) as usize;
            self.consume(n);
            self.skip -= n as u64;
            self.drop_batches_before(self.pos);
            if self.skip > 0 {
                return None;
            }
        }
        if self.buffered() < HEADER_SIZE {
            return None;
        }
        let header =
            Header::read_from_bytes(&self.buf[self.start..self.start + HEADER_SIZE]).ok()?;
        let size = header.msg_size as usize;
        if size < HEADER_SIZE {
            self.consume(HEADER_SIZE);
            self.drop_batches_before(self.pos);
            return Some(Frame::Rejected {
                header,
                error: FrameError::TooSmall(header.msg_size),
            });
        }
        if size > self.max_msg_size {
            self.consume(HEADER_SIZE);
            self.skip = (size - HEADER_SIZE) as u64;
            self.drop_batches_before(self.pos);
            // Skip whatever of the body is already here.
            let n = self.skip.min(self.buffered() as u64) as usize;
            self.consume(n);
            self.skip -= n as u64;
            self.drop_batches_before(self.pos);
            return Some(Frame::Rejected {
                header,
                error: FrameError::TooLarge(header.msg_size),
            });
        }
        if self.buffered() < size {
            return None;
        }
        let msg_end = self.pos + size as u64;
        let mut fds = Vec::new();
        let mut truncated = false;
        while self.batches.front().is_some_and(|b| b.last_pos < msg_end) {
            if let Some(b) = self.batches.pop_front() {
                truncated |= b.truncated;
                fds.extend(b.fds);
            }
        }
        let payload = self.buf[self.start + HEADER_SIZE..self.start + size].to_vec();
        self.consume(size);
        if truncated {
            return Some(Frame::Rejected {
                header,
                error: FrameError::FdsTruncated,
            });
        }
        if fds.len() > self.max_fds {
            return Some(Frame::Rejected {
                header,
                error: FrameError::TooManyFds(fds.len()),
            });
        }
        Some(Frame::Message(Message {
            header,
            payload,
            fds,
        }))
    }
}

/// Encode a message; `msg_size` is computed from the parts.
pub fn encode(msg_id: u16, command: u16, flags: u32, error: u32, parts: &[&[u8]]) -> Vec<u8> {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let total = HEADER_SIZE + body;
    let header = Header {
        msg_id,
        command,
        msg_size: u32::try_from(total).unwrap_or(u32::MAX),
        flags,
        error,
    };
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(header.as_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// A command (request) message.
pub fn request(msg_id: u16, command: u16, no_reply: bool, parts: &[&[u8]]) -> Vec<u8> {
    let flags = hdr_flags::TYPE_COMMAND | if no_reply { hdr_flags::NO_REPLY } else { 0 };
    encode(msg_id, command, flags, 0, parts)
}

/// A success reply to `req`: same id and command, type REPLY.
pub fn reply(req: &Header, parts: &[&[u8]]) -> Vec<u8> {
    encode(req.msg_id, req.command, hdr_flags::TYPE_REPLY, 0, parts)
}

/// A header-only error reply to `req` (flags REPLY|ERROR); errno is forced into 1..4096.
pub fn error_reply(req: &Header, errno: u32) -> Vec<u8> {
    let errno = if (1..4096).contains(&errno) {
        errno
    } else {
        libc::EINVAL as u32
    };
    encode(
        req.msg_id,
        req.command,
        hdr_flags::TYPE_REPLY | hdr_flags::ERROR,
        errno,
        &[],
    )
}

/// One queued outgoing message.
#[derive(Debug)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    /// Sent with the first byte of `bytes`.
    pub fds: Vec<Arc<OwnedFd>>,
}

/// Queue of outgoing messages for a non-blocking socket; partial writes are resumed and fds
/// are attached to the first byte of their message only.
#[derive(Debug, Default)]
pub struct OutQueue {
    queue: VecDeque<Outgoing>,
    /// Bytes of the front message already written.
    offset: usize,
}

impl OutQueue {
    pub fn push(&mut self, msg: Outgoing) {
        self.queue.push_back(msg);
    }
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Write as much as the socket takes. `Ok(true)` when the queue is empty.
    pub fn flush(&mut self, sock: BorrowedFd<'_>) -> io::Result<bool> {
        const MAX_IOV: usize = 64;
        while let Some(front) = self.queue.front() {
            let with_fds = self.offset == 0 && !front.fds.is_empty();
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(8);
            iov.push(IoSlice::new(&front.bytes[self.offset..]));
            if !with_fds {
                // Coalesce following messages that carry no fds.
                for m in self.queue.iter().skip(1).take(MAX_IOV - 1) {
                    if !m.fds.is_empty() {
                        break;
                    }
                    iov.push(IoSlice::new(&m.bytes));
                }
            }
            let fds: Vec<BorrowedFd<'_>> = if with_fds {
                front.fds.iter().map(|f| f.as_fd()).collect()
            } else {
                Vec::new()
            };
            let mut n = match send_with_fds(sock, &iov, &fds) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            drop(iov);
            if n == 0 {
                return Ok(false);
            }
            while n > 0 {
                let Some(front) = self.queue.front() else {
                    break;
                };
                let left = front.bytes.len() - self.offset;
                if n >= left {
                    n -= left;
                    self.offset = 0;
                    self.queue.pop_front();
                } else {
                    self.offset += n;
                    n = 0;
                }
            }
        }
        Ok(true)
    }
}

/// Write a whole message with fds on a blocking socket (client side).
pub fn write_all(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut off = 0;
    let mut first = true;
    while off < bytes.len() || first {
        let f: &[BorrowedFd<'_>] = if first { fds } else { &[] };
        match send_with_fds(sock, &[IoSlice::new(&bytes[off..])], f) {
            Ok(0) if !bytes.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket took no bytes",
                ))
            }
            Ok(n) => {
                off += n;
                first = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = [nix::poll::PollFd::new(sock, nix::poll::PollFlags::POLLOUT)];
                nix::poll::poll(&mut pfd, nix::poll::PollTimeout::NONE).map_err(io::Error::from)?;
            }
            Err(e) => return Err(e),
        }
        if bytes.is_empty() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::cmd;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn memfd() -> OwnedFd {
        nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap()
    }

    fn msg(frame: Option<Frame>) -> Message {
        match frame {
            Some(Frame::Message(m)) => m,
            other => panic!("expected message, got {other:?}"),
        }
    }

    #[test]
    fn header_and_body_split_byte_by_byte() {
        let bytes = request(7, cmd::REGION_READ, false, &[&[1u8; 16]]);
        let mut d = Decoder::new();
        for (i, b) in bytes.iter().enumerate() {
            assert!(d.next_frame().is_none(), "frame before byte {i}");
            d.push(std::slice::from_ref(b), vec![], false);
        }
        let m = msg(d.next_frame());
        assert_eq!(m.header.msg_id, 7);
        assert_eq!(m.payload, vec![1u8; 16]);
        assert!(d.next_frame().is_none());
        assert!(d.is_idle());
    }

    #[test]
    fn pipelined_messages_in_one_chunk_with_fds_on_last() {
        let mut all = request(1, cmd::DEVICE_GET_INFO, false, &[&[0u8; 16]]);
        all.extend(request(2, cmd::DEVICE_RESET, false, &[]));
        let third = request(3, cmd::DMA_MAP, false, &[&[0u8; 32]]);
        let mut d = Decoder::new();
        // Tail of two messages and the whole third, fds came with the read: they belong to
        // the third (the message holding the last byte).
        let split = 5;
        d.push(&all[..split], vec![], false);
        assert!(d.next_frame().is_none());
        let mut chunk = all[split..].to_vec();
        chunk.extend(&third);
        d.push(&chunk, vec![memfd()], false);
        let a = msg(d.next_frame());
        let b = msg(d.next_frame());
        let c = msg(d.next_frame());
        assert_eq!((a.header.msg_id, a.fds.len()), (1, 0));
        assert_eq!((b.header.msg_id, b.fds.len(), b.payload.len()), (2, 0, 0));
        assert_eq!((c.header.msg_id, c.fds.len()), (3, 1));
    }

    #[test]
    fn fds_with_first_bytes_of_split_message() {
        let bytes = request(9, cmd::DEVICE_SET_IRQS, false, &[&[0u8; 20]]);
        let mut d = Decoder::new();
        d.push(&bytes[..3], vec![memfd(), memfd()], false);
        d.push(&bytes[3..], vec![], false);
        assert_eq!(msg(d.next_frame()).fds.len(), 2);
    }

    #[test]
    fn too_small_is_rejected_and_stream_continues() {
        let mut bad = request(4, cmd::DEVICE_GET_INFO, false, &[]);
        bad[4..8].copy_from_slice(&8u32.to_ne_bytes());
        let good = request(5, cmd::DEVICE_RESET, false, &[]);
        let mut d = Decoder::new();
        d.push(&bad, vec![], false);
        d.push(&good, vec![], false);
        match d.next_frame() {
            Some(Frame::Rejected {
                header,
                error: FrameError::TooSmall(8),
            }) => {
                assert_eq!(header.msg_id, 4)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(msg(d.next_frame()).header.msg_id, 5);
    }

    #[test]
    fn too_large_is_skipped_without_allocating() {
        let mut d = Decoder::with_limits(64, 4);
        let body_len = 1000usize;
        let mut hdr = request(1, cmd::REGION_WRITE, false, &[]);
        hdr[4..8].copy_from_slice(&((16 + body_len) as u32).to_ne_bytes());
        d.push(&hdr, vec![], false);
        match d.next_frame() {
            Some(Frame::Rejected {
                error: FrameError::TooLarge(1016),
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // The body arrives in pieces, some with fds: all dropped.
        // A pipe's write end rides along: once it is closed, the read end sees EOF. (Checking
        // the raw fd number would race with other tests reusing it.)
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        d.push(&vec![0xaa; 500], vec![pipe_w], false);
        assert!(d.next_frame().is_none());
        // The fd was closed when its bytes were skipped.
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(pipe_r.as_raw_fd(), &mut b).unwrap(), 0);
        let mut tail = vec![0xaa; 500];
        tail.extend(request(2, cmd::DEVICE_RESET, false, &[]));
        d.push(&tail, vec![], false);
        assert_eq!(msg(d.next_frame()).header.msg_id, 2);
        assert!(
            d.buf.len() <= INITIAL_BUF,
            "decoder allocated for the oversized body"
        );
    }

    #[test]
    fn too_many_fds_and_truncation_are_rejected() {
        let mut d = Decoder::with_limits(MAX_MSG_SIZE, 2);
        let m = request(1, cmd::DMA_MAP, false, &[&[0u8; 32]]);
        d.push(&m, vec![memfd(), memfd(), memfd()], false);
        assert!(matches!(
            d.next_frame(),
            Some(Frame::Rejected {
                error: FrameError::TooManyFds(3),
                ..
            })
        ));
        d.push(&m, vec![memfd()], true);
        assert!(matches!(
            d.next_frame(),
            Some(Frame::Rejected {
                error: FrameError::FdsTruncated,
                ..
            })
        ));
        d.push(&m, vec![memfd()], false);
        assert_eq!(msg(d.next_frame()).fds.len(), 1);
    }

    #[test]
    fn error_reply_shape() {
        let req = Header {
            msg_id: 0x1234,
            command: cmd::DMA_MAP,
            msg_size: 48,
            flags: 0,
            error: 0,
        };
        let r = error_reply(&req, libc::EEXIST as u32);
        let h = Header::read_from_bytes(&r[..]).unwrap();
        assert_eq!(r.len(), 16);
        assert_eq!(
            (h.msg_id, h.command, h.msg_size, h.flags),
            (0x1234, cmd::DMA_MAP, 16, 0x21)
        );
        assert_eq!(h.error, libc::EEXIST as u32);
        let h0 = Header::read_from_bytes(&error_reply(&req, 0)[..]).unwrap();
        assert_eq!(h0.error, libc::EINVAL as u32);
        let hbig = Header::read_from_bytes(&error_reply(&req, 99999)[..]).unwrap();
        assert_eq!(hbig.error, libc::EINVAL as u32);
    }

    #[test]
    fn socket_roundtrip_large_and_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let big = vec![0x5au8; 300_000];
        let m1 = request(1, cmd::REGION_WRITE, false, &[&big]);
        let m2 = request(2, cmd::DMA_MAP, false, &[&[0u8; 32]]);
        let t = std::thread::spawn(move || {
            let f = memfd();
            write_all(a.as_fd(), &m1, &[]).unwrap();
            write_all(a.as_fd(), &m2, &[f.as_fd()]).unwrap();
            a
        });
        let mut d = Decoder::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            match d.read_from(b.as_fd()) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
            while let Some(f) = d.next_frame() {
                got.push(msg(Some(f)));
            }
        }
        let _a = t.join().unwrap();
        assert_eq!(got[0].payload.len(), 300_000);
        assert_eq!(got[0].fds.len(), 0);
        assert_eq!(got[1].fds.len(), 1);
    }

    #[test]
    fn outqueue_resumes_partial_writes() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut q = OutQueue::default();
        let f = Arc::new(memfd());
        for i in 0..64u16 {
            q.push(Outgoing {
                bytes: request(i, cmd::REGION_WRITE, false, &[&[i as u8; 8192]]),
                fds: vec![],
            });
        }
        q.push(Outgoing {
            bytes: request(64, cmd::DMA_MAP, false, &[&[0u8; 32]]),
            fds: vec![f],
        });
        let reader = std::thread::spawn(move || {
            let mut d = Decoder::new();
            let mut out = Vec::new();
            while out.len() < 65 {
                if d.read_from(b.as_fd()).unwrap() == 0 {
                    break;
                }
                while let Some(fr) = d.next_frame() {
                    out.push(msg(Some(fr)));
                }
            }
            out
        });
        while !q.flush(a.as_fd()).unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let out = reader.join().unwrap();
        assert_eq!(out.len(), 65);
        for (i, m) in out.iter().enumerate().take(64) {
            assert_eq!(m.header.msg_id as usize, i);
            assert!(m.payload.iter().all(|&x| x == i as u8));
            assert!(m.fds.is_empty());
        }
        assert_eq!(out[64].fds.len(), 1);
    }

    #[test]
    fn kernel_fd_boundaries_match_the_last_byte_rule() {
        // Queue A (no fd), B (fd), C (no fd), D (fd) before reading anything, then read with
        // a large buffer: whatever the kernel glues together, each fd lands on its message.
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let f1 = memfd();
        let f2 = memfd();
        let pad = [7u8; 100];
        write_all(
            a.as_fd(),
            &request(1, cmd::REGION_WRITE, false, &[&pad]),
            &[],
        )
        .unwrap();
        write_all(
            a.as_fd(),
            &request(2, cmd::DMA_MAP, false, &[&[0u8; 32]]),
            &[f1.as_fd()],
        )
        .unwrap();
        write_all(
            a.as_fd(),
            &request(3, cmd::REGION_WRITE, false, &[&pad]),
            &[],
        )
        .unwrap();
        write_all(
            a.as_fd(),
            &request(4, cmd::DMA_MAP, false, &[&[0u8; 32]]),
            &[f2.as_fd()],
        )
        .unwrap();
        let mut d = Decoder::new();
        let mut got = Vec::new();
        while got.len() < 4 {
            match d.read_from(b.as_fd()) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            while let Some(f) = d.next_frame() {
                let m = msg(Some(f));
                got.push((m.header.msg_id, m.fds.len()));
            }
        }
        assert_eq!(got, vec![(1, 0), (2, 1), (3, 0), (4, 1)]);
    }
}
