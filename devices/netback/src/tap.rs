//! Kernel tap backend: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, one non-blocking fd per queue
//! pair (IFF_MULTI_QUEUE when there is more than one), 12-byte vnet headers so frames pass
//! between guest buffers and the tap unchanged, and TUNSETOFFLOAD from the guest's
//! negotiated receive offloads.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::hdr::VNET_HDR_LEN;
use crate::{NetBackend, NetError, NetRx, NetTx, Offloads, RxVerdict, TxBurst, MAX_FRAME_LEN};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

/// `struct ifreq` as TUNSETIFF / TUNSETQUEUE use it (name and flags, padded to 40 bytes).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Counters of a tap, shared by its queues.
#[derive(Debug, Default)]
pub struct TapStats {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Frames the kernel refused (EAGAIN, EINVAL for a bad header, ...).
    pub tx_dropped: AtomicU64,
    pub rx_errors: AtomicU64,
}

/// A tap device opened (or created) by name.
#[derive(Debug)]
pub struct Tap {
    name: String,
    fds: Vec<Arc<OwnedFd>>,
    multi_queue: bool,
    /// Queues currently attached (multiqueue only).
    attached: Mutex<u16>,
    stats: Arc<TapStats>,
}

fn ioctl_err(name: &str, op: &'static str) -> NetError {
    NetError::Tap {
        name: name.to_string(),
        op,
        source: std::io::Error::last_os_error(),
    }
}

impl Tap {
    /// Open the tap `name` with `queue_pairs` queues, creating it if it does not exist
    /// (creation needs CAP_NET_ADMIN; an existing tap must belong to us or be persistent
    /// and ours). Every fd is non-blocking and close-on-exec.
    pub fn open(name: &str, queue_pairs: u16) -> Result<Self, NetError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(NetError::TapName(name.to_string()));
        }
        let pairs = queue_pairs.max(1);
        let multi_queue = pairs > 1;
        let mut fds = Vec::with_capacity(usize::from(pairs));
        let mut actual = name.to_string();
        for _ in 0..pairs {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(|source| NetError::Tap {
                    name: name.to_string(),
                    op: "open /dev/net/tun",
                    source,
                })?;
            let fd: OwnedFd = f.into();
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
                _pad: [0; 22],
            };
            if multi_queue {
                req.flags |= IFF_MULTI_QUEUE;
            }
            for (d, s) in req.name.iter_mut().zip(actual.bytes()) {
                *d = s as libc::c_char;
            }
            // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is laid out as
            // (and at least as large); the fd is open.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
                return Err(ioctl_err(name, "TUNSETIFF"));
            }
            // The kernel may have filled in a name (e.g. for "tap%d").
            // SAFETY: the kernel NUL-terminates ifr_name within IFNAMSIZ.
            let got = unsafe { CStr::from_ptr(req.name.as_ptr()) };
            actual = got.to_string_lossy().into_owned();
            let hdr_len = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
                return Err(ioctl_err(name, "TUNSETVNETHDRSZ"));
            }
            fds.push(Arc::new(fd));
        }
        let tap = Self {
            name: actual,
            fds,
            multi_queue,
            attached: Mutex::new(pairs),
            stats: Arc::new(TapStats::default()),
        };
        // No offloads until the guest says what it takes.
        tap.set_rx_offloads(Offloads::empty())?;
        Ok(tap)
    }

    /// The interface name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> &Arc<TapStats> {
        &self.stats
    }

    fn fd(&self, pair: u16) -> Result<Arc<OwnedFd>, NetError> {
        self.fds
            .get(usize::from(pair))
            .cloned()
            .ok_or(NetError::NoSuchQueue {
                pair,
                pairs: self.fds.len() as u16,
            })
    }
}

impl NetBackend for Tap {
    fn describe(&self) -> String {
        format!("tap:{}", self.name)
    }

    fn max_queue_pairs(&self) -> u16 {
        self.fds.len() as u16
    }

    fn rx(&self, pair: u16) -> Result<Box<dyn NetRx>, NetError> {
        Ok(Box::new(TapRx {
            fd: self.fd(pair)?,
            buf: vec![0u8; MAX_FRAME_LEN].into_boxed_slice(),
            pending: None,
            stats: self.stats.clone(),
        }))
    }

    fn tx(&self, pair: u16) -> Result<Box<dyn NetTx>, NetError> {
        Ok(Box::new(TapTx {
            fd: self.fd(pair)?,
            stats: self.stats.clone(),
        }))
    }

    fn set_rx_offloads(&self, offloads: Offloads) -> Result<(), NetError> {
        let bits = offloads.normalized().bits() as libc::c_ulong;
        for fd in &self.fds {
            // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is open.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, bits) } < 0 {
                return Err(ioctl_err(&self.name, "TUNSETOFFLOAD"));
            }
        }
        Ok(())
    }

    fn set_active_pairs(&self, pairs: u16) -> Result<(), NetError> {
        if !self.multi_queue {
            return Ok(());
        }
        let want = pairs.clamp(1, self.fds.len() as u16);
        let mut cur = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        for (i, fd) in self.fds.iter().enumerate() {
            let attach = i < usize::from(want);
            let was = i < usize::from(*cur);
            if attach == was {
                continue;
            }
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: if attach {
                    IFF_ATTACH_QUEUE
                } else {
                    IFF_DETACH_QUEUE
                },
                _pad: [0; 22],
            };
            // SAFETY: TUNSETQUEUE reads a `struct ifreq` (only the flags matter).
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
                return Err(ioctl_err(&self.name, "TUNSETQUEUE"));
            }
        }
        *cur = want;
        Ok(())
    }
}

struct TapRx {
    fd: Arc<OwnedFd>,
    buf: Box<[u8]>,
    /// Length of a frame read but not yet taken.
    pending: Option<usize>,
    stats: Arc<TapStats>,
}

impl NetRx for TapRx {
    fn recv_burst(
        &mut self,
        max: usize,
        sink: &mut dyn FnMut(&[u8]) -> RxVerdict,
    ) -> Result<usize, NetError> {
        let mut taken = 0;
        while taken < max {
            let len = match self.pending.take() {
                Some(n) => n,
                None => {
                    // SAFETY: `buf` is a live, exclusively borrowed buffer of `buf.len()` bytes.
                    let n = unsafe {
                        libc::read(
                            self.fd.as_raw_fd(),
                            self.buf.as_mut_ptr() as *mut libc::c_void,
                            self.buf.len(),
                        )
                    };
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        match e.raw_os_error() {
                            Some(libc::EAGAIN) | Some(libc::EINTR) => break,
                            _ => {
                                self.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                                return Err(NetError::Io(e));
                            }
                        }
                    }
                    n as usize
                }
            };
            let frame = self.buf.get(..len).unwrap_or(&[]);
            match sink(frame) {
                RxVerdict::Taken => {
                    taken += 1;
                    self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                }
                RxVerdict::NoRoom => {
                    self.pending = Some(len);
                    break;
                }
            }
        }
        Ok(taken)
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

struct TapTx {
    fd: Arc<OwnedFd>,
    stats: Arc<TapStats>,
}

impl NetTx for TapTx {
    fn send_burst(&mut self, burst: &TxBurst) -> Result<usize, NetError> {
        let mut sent = 0;
        for i in 0..burst.len() {
            let iov = burst.frame(i);
            // SAFETY: the burst's iovecs describe readable memory until it is cleared (its
            // contract), and `iov` is a valid array of `iov.len()` iovecs.
            let n = unsafe {
                libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int)
            };
            if n < 0 {
                let n = self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                if n < 8 {
                    log::warn!("tap write failed: {}", std::io::Error::last_os_error());
                }
            } else {
                sent += 1;
            }
        }
        self.stats
            .tx_frames
            .fetch_add(sent as u64, Ordering::Relaxed);
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `struct ifreq` with a sockaddr_in or flags payload.
    #[repr(C)]
    struct IfReqAddr {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: [u8; 24],
    }

    fn ifreq(name: &str) -> IfReqAddr {
        let mut r = IfReqAddr {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        for (d, s) in r.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        r
    }

    /// Give `name` 169.254.1.1/16 and bring it up (in the calling thread's namespace).
    fn configure(name: &str) {
        // SAFETY: plain socket(2); the fd is closed below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(s >= 0);
        let mut r = ifreq(name);
        // sockaddr_in: family, port, address.
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        r.data[4..8].copy_from_slice(&[169, 254, 1, 1]);
        // SAFETY: SIOCSIFADDR reads an ifreq with a sockaddr_in, which `r` holds.
        assert_eq!(unsafe { libc::ioctl(s, libc::SIOCSIFADDR, &mut r) }, 0);
        let mut r = ifreq(name);
        r.data[4..8].copy_from_slice(&[255, 255, 0, 0]);
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        // SAFETY: as above, with the netmask.
        assert_eq!(unsafe { libc::ioctl(s, libc::SIOCSIFNETMASK, &mut r) }, 0);
        let mut r = ifreq(name);
        // SAFETY: SIOCGIFFLAGS fills the flags of an ifreq.
        assert_eq!(unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, &mut r) }, 0);
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: SIOCSIFFLAGS reads the flags of an ifreq.
        assert_eq!(unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &mut r) }, 0);
        // SAFETY: `s` is ours.
        unsafe { libc::close(s) };
    }

    /// An ARP request for the tap's address, sent through the tap, comes back as an ARP
    /// reply with a vnet header in front. Needs root; runs in a private network namespace
    /// (this thread only), so nothing leaves it.
    #[test]
    fn arp_round_trip_through_a_multiqueue_tap() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: needs root and /dev/net/tun");
            return;
        }
        let t = std::thread::spawn(|| {
            // SAFETY: unshare of the network namespace affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: cannot unshare the network namespace");
                return;
            }
            let tap = Tap::open("emudevt0", 2).unwrap();
            assert_eq!(tap.max_queue_pairs(), 2);
            tap.set_rx_offloads(Offloads::all()).unwrap();
            tap.set_active_pairs(1).unwrap();
            tap.set_active_pairs(2).unwrap();
            tap.set_active_pairs(1).unwrap();
            configure(tap.name());
            let me = [0x52, 0x54, 0, 0xe0, 0xde, 0x99];
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&me);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&me);
            f.extend_from_slice(&[169, 254, 1, 2]);
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&[169, 254, 1, 1]);
            let mut b = TxBurst::new();
            b.push_copy(&f);
            b.end_frame();
            let mut tx = tap.tx(0).unwrap();
            assert_eq!(tx.send_burst(&b).unwrap(), 1);
            let mut rx = tap.rx(0).unwrap();
            let mut reply = None;
            for _ in 0..200 {
                rx.recv_burst(16, &mut |fr| {
                    let eth = &fr[VNET_HDR_LEN..];
                    if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                        reply = Some(fr.to_vec());
                    }
                    RxVerdict::Taken
                })
                .unwrap();
                if reply.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let r = reply.expect("no ARP reply from the kernel");
            let eth = &r[VNET_HDR_LEN..];
            assert_eq!(&eth[..6], &me);
            assert_eq!(&eth[28..32], &[169, 254, 1, 1]);
            // A partial checksum outside the frame is refused by the kernel: dropped, counted.
            let mut bad = f.clone();
            bad[0] = crate::hdr::F_NEEDS_CSUM;
            bad[6] = 200;
            b.clear();
            b.push_copy(&bad);
            b.end_frame();
            assert_eq!(tx.send_burst(&b).unwrap(), 0);
            assert_eq!(tap.stats().tx_dropped.load(Ordering::Relaxed), 1);
        });
        t.join().unwrap();
    }
}
