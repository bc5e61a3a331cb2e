//! `sendmsg`/`recvmsg` with SCM_RIGHTS on a UNIX stream socket.
//!
//! Every fd the kernel installs for us becomes an [`OwnedFd`] before anything else can fail,
//! so no error path (including `MSG_CTRUNC`) leaks a descriptor. The control buffer has room
//! for `SCM_MAX_FD` (253) descriptors, far above what we accept per message, so a peer that
//! sends too many is detected (and its fds closed) rather than silently truncated.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The kernel's per-`sendmsg` fd limit (`SCM_MAX_FD`); one stream read never returns more.
const SCM_MAX_FD: usize = 253;

/// Result of one successful receive.
#[derive(Debug, Default)]
pub struct Received {
    /// Bytes placed in the buffer; 0 means the peer closed the stream.
    pub bytes: usize,
    /// Descriptors that came with these bytes, already owned.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors (`MSG_CTRUNC`): the message they belong to is bad.
    pub truncated: bool,
}

fn cmsg_space(nfds: usize) -> usize {
    let payload = (nfds * std::mem::size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE(payload) as usize }
}

/// Receive into `buf`, collecting SCM_RIGHTS descriptors. `EINTR` is retried; `EAGAIN`
/// is returned as `io::ErrorKind::WouldBlock` for non-blocking sockets.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let space = cmsg_space(SCM_MAX_FD);
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: `mh` points at `iov` (which covers `buf`) and `cbuf`, all live and
        // writable for the duration of the call, with lengths that match.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let mut out = Received {
            bytes: n as usize,
            fds: Vec::new(),
            truncated: mh.msg_flags & libc::MSG_CTRUNC != 0,
        };
        // Each SCM_RIGHTS entry holds fds the kernel just installed in our table, which
        // nobody else owns, so wrapping each in an OwnedFd exactly once is sound.
        // SAFETY: the kernel filled `mh.msg_control` with `msg_controllen` valid bytes; the
        // CMSG_* macros walk only inside that range.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&mh);
            while !cmsg.is_null() {
                let hdr = &*cmsg;
                if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let hdr_len = data.offset_from(cmsg.cast::<u8>()) as usize;
                    let len = (hdr.cmsg_len as usize).saturating_sub(hdr_len);
                    let count = len / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        if fd >= 0 {
                            out.fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&mh, cmsg);
            }
        }
        return Ok(out);
    }
}

/// Send `bufs` with `fds` attached to the first byte. Returns the bytes written, which may
/// be fewer than offered on a non-blocking socket; the fds went out iff the result is > 0.
/// `EINTR` is retried; the peer having closed gives `BrokenPipe` (never SIGPIPE).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    let space = if fds.is_empty() {
        0
    } else {
        cmsg_space(fds.len())
    };
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    loop {
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on unix; the kernel only reads through it.
        mh.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        mh.msg_iovlen = bufs.len() as _;
        if !fds.is_empty() {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = space as _;
            // SAFETY: `cbuf` holds CMSG_SPACE(n fds) zeroed, aligned bytes, so the first
            // header and its data area lie inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&mh);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len =
                    libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as _) as _;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
                }
            }
        }
        // SAFETY: `mh` references `bufs` and `cbuf`, both live for the call; the kernel only
        // reads them. MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(n as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MAX_MSG_FDS;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn memfd() -> OwnedFd {
        nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap()
    }

    #[test]
    fn fds_travel_with_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let f1 = memfd();
        let f2 = memfd();
        let n = send_with_fds(
            a.as_fd(),
            &[IoSlice::new(b"hello")],
            &[f1.as_fd(), f2.as_fd()],
        )
        .unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(r.bytes, 5);
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(r.fds.len(), 2);
        assert!(!r.truncated);
        // Received fds are distinct descriptors from the sent ones.
        assert_ne!(r.fds[0].as_raw_fd(), f1.as_raw_fd());
    }

    #[test]
    fn many_fds_detected_not_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<OwnedFd> = (0..MAX_MSG_FDS + 4).map(|_| memfd()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        send_with_fds(a.as_fd(), &[IoSlice::new(b"x")], &borrowed).unwrap();
        let mut buf = [0u8; 4];
        let r = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(r.fds.len(), MAX_MSG_FDS + 4);
        assert!(!r.truncated);
    }

    #[test]
    fn eof_and_wouldblock() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4];
        let e = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().bytes, 0);
    }

    #[test]
    fn send_to_closed_peer_is_epipe() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let e = send_with_fds(a.as_fd(), &[IoSlice::new(b"x")], &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
