//! [`Frontend`]: one connection to a vhost-user backend, request by request.
//!
//! Blocking I/O with a bounded wait on every read and write: a backend that stops answering
//! fails the request (and the connection) instead of hanging the device's control thread.
//! After any I/O or protocol error the stream may be out of step, so the connection is
//! marked broken and every later request fails until a new connection replaces it.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use zerocopy::IntoBytes;

use crate::protocol::{
    self, flags, parse_header, parse_reply, proto, req, ConfigHead, Expect, MemRegion,
    MemTableHead, ProtocolError, Reply, VringAddr, VringState, F_PROTOCOL_FEATURES, HEADER_SIZE,
    MAX_CONFIG_SIZE, MAX_MEM_REGIONS,
};

/// Protocol features we ask for when the backend has them.
pub const WANTED_PROTOCOL_FEATURES: u64 = proto::MQ | proto::REPLY_ACK | proto::CONFIG;

/// Why a request to the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connecting to vhost-user backend {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user request {request}: {source}")]
    Io {
        request: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user request {request}: {source}")]
    Protocol {
        request: u32,
        #[source]
        source: ProtocolError,
    },
    #[error("the connection to the vhost-user backend is broken by an earlier error")]
    Broken,
    #[error("the backend does not support {0}")]
    Unsupported(&'static str),
    #[error("{0}")]
    Invalid(String),
}

impl ConnError {
    /// True when the connection is unusable (as opposed to a refused request).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            ConnError::Protocol {
                source: ProtocolError::Nack { .. },
                ..
            } | ConnError::Unsupported(_)
                | ConnError::Invalid(_)
        )
    }
}

/// What the backend told us at connection time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Virtio features, including [`F_PROTOCOL_FEATURES`] if it speaks them.
    pub features: u64,
    /// Negotiated protocol features (ours & theirs).
    pub protocol: u64,
    /// Queues it serves (GET_QUEUE_NUM), when it has the MQ protocol feature.
    pub max_queues: Option<u64>,
}

/// A connection to a vhost-user backend.
#[derive(Debug)]
pub struct Frontend {
    sock: UnixStream,
    info: BackendInfo,
    broken: bool,
}

impl Frontend {
    /// Connect to `path` and negotiate (GET_FEATURES, protocol features, GET_QUEUE_NUM,
    /// SET_OWNER). `timeout` bounds every later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ConnError> {
        let sock = UnixStream::connect(path).map_err(|source| ConnError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_stream(sock, timeout)
    }

    /// Negotiate over an already connected stream.
    pub fn from_stream(sock: UnixStream, timeout: Duration) -> Result<Self, ConnError> {
        let io = |source| ConnError::Io { request: 0, source };
        sock.set_read_timeout(Some(timeout)).map_err(io)?;
        sock.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut f = Self {
            sock,
            info: BackendInfo::default(),
            broken: false,
        };
        let features = f.get_u64(req::GET_FEATURES)?;
        let mut info = BackendInfo {
            features,
            ..BackendInfo::default()
        };
        if features & F_PROTOCOL_FEATURES != 0 {
            let theirs = f.get_u64(req::GET_PROTOCOL_FEATURES)?;
            info.protocol = theirs & WANTED_PROTOCOL_FEATURES;
            f.set_u64(req::SET_PROTOCOL_FEATURES, info.protocol)?;
        }
        f.info = info;
        if info.protocol & proto::MQ != 0 {
            f.info.max_queues = Some(f.get_u64(req::GET_QUEUE_NUM)?);
        }
        f.request(req::SET_OWNER, &[], &[])?;
        Ok(f)
    }

    pub fn info(&self) -> BackendInfo {
        self.info
    }

    /// Our socket, to watch for the backend hanging up.
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    fn fail<T>(&mut self, e: ConnError) -> Result<T, ConnError> {
        if e.is_fatal() {
            self.broken = true;
        }
        Err(e)
    }

    fn send(
        &mut self,
        request: u32,
        extra: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), ConnError> {
        if self.broken {
            return Err(ConnError::Broken);
        }
        let msg = protocol::encode(request, extra, payload);
        let iov = [IoSlice::new(&msg)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let r = sendmsg::<UnixAddr>(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        match r {
            Ok(n) if n == msg.len() => Ok(()),
            Ok(n) => self.fail(ConnError::Io {
                request,
                source: std::io::Error::other(format!("short send: {n} of {} bytes", msg.len())),
            }),
            Err(e) => self.fail(ConnError::Io {
                request,
                source: e.into(),
            }),
        }
    }

    fn recv(&mut self, request: u32, expect: Expect) -> Result<Reply, ConnError> {
        let mut head = [0u8; HEADER_SIZE];
        if let Err(source) = self.sock.read_exact(&mut head) {
            return self.fail(ConnError::Io { request, source });
        }
        let size = match parse_header(&head, request) {
            Ok(s) => s,
            Err(source) => return self.fail(ConnError::Protocol { request, source }),
        };
        let mut payload = vec![0u8; size];
        if let Err(source) = self.sock.read_exact(&mut payload) {
            return self.fail(ConnError::Io { request, source });
        }
        match parse_reply(request, expect, &payload) {
            Ok(r) => Ok(r),
            Err(source) => self.fail(ConnError::Protocol { request, source }),
        }
    }

    /// A request without a reply of its own; with REPLY_ACK negotiated, waits for the ack.
    pub fn request(
        &mut self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), ConnError> {
        let ack = self.info.protocol & proto::REPLY_ACK != 0;
        self.send(
            request,
            if ack { flags::NEED_REPLY } else { 0 },
            payload,
            fds,
        )?;
        if !ack {
            return Ok(());
        }
        match self.recv(request, Expect::U64)? {
            Reply::U64(0) => Ok(()),
            Reply::U64(status) => self.fail(ConnError::Protocol {
                request,
                source: ProtocolError::Nack { request, status },
            }),
            _ => self.fail(ConnError::Broken),
        }
    }

    fn get_u64(&mut self, request: u32) -> Result<u64, ConnError> {
        self.send(request, 0, &[], &[])?;
        match self.recv(request, Expect::U64)? {
            Reply::U64(v) => Ok(v),
            _ => self.fail(ConnError::Broken),
        }
    }

    fn set_u64(&mut self, request: u32, v: u64) -> Result<(), ConnError> {
        self.request(request, &v.to_le_bytes(), &[])
    }

    /// SET_FEATURES.
    pub fn set_features(&mut self, features: u64) -> Result<(), ConnError> {
        self.set_u64(req::SET_FEATURES, features)
    }

    /// SET_MEM_TABLE with one fd per region.
    pub fn set_mem_table(&mut self, regions: &[(MemRegion, RawFd)]) -> Result<(), ConnError> {
        if regions.len() > MAX_MEM_REGIONS {
            return Err(ConnError::Invalid(format!(
                "{} memory regions, the backend takes at most {MAX_MEM_REGIONS}",
                regions.len()
            )));
        }
        let mut p = MemTableHead {
            // At most MAX_MEM_REGIONS.
            nregions: regions.len() as u32,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        for (r, _) in regions {
            p.extend_from_slice(r.as_bytes());
        }
        let fds: Vec<RawFd> = regions.iter().map(|(_, fd)| *fd).collect();
        self.request(req::SET_MEM_TABLE, &p, &fds)
    }

    fn vring_state(&mut self, request: u32, index: u16, num: u32) -> Result<(), ConnError> {
        let s = VringState {
            index: u32::from(index),
            num,
        };
        self.request(request, s.as_bytes(), &[])
    }

    pub fn set_vring_num(&mut self, index: u16, num: u16) -> Result<(), ConnError> {
        self.vring_state(req::SET_VRING_NUM, index, u32::from(num))
    }

    pub fn set_vring_base(&mut self, index: u16, base: u16) -> Result<(), ConnError> {
        self.vring_state(req::SET_VRING_BASE, index, u32::from(base))
    }

    pub fn set_vring_enable(&mut self, index: u16, on: bool) -> Result<(), ConnError> {
        self.vring_state(req::SET_VRING_ENABLE, index, u32::from(on))
    }

    pub fn set_vring_addr(&mut self, addr: &VringAddr) -> Result<(), ConnError> {
        self.request(req::SET_VRING_ADDR, addr.as_bytes(), &[])
    }

    /// SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR with an eventfd.
    pub fn set_vring_fd(&mut self, request: u32, index: u16, fd: RawFd) -> Result<(), ConnError> {
        let v = u64::from(index);
        self.request(request, &v.to_le_bytes(), &[fd])
    }

    /// GET_VRING_BASE: stops the ring; returns the next available index the backend
    /// would have read.
    pub fn get_vring_base(&mut self, index: u16) -> Result<u16, ConnError> {
        let s = VringState {
            index: u32::from(index),
            num: 0,
        };
        self.send(req::GET_VRING_BASE, 0, s.as_bytes(), &[])?;
        match self.recv(req::GET_VRING_BASE, Expect::State)? {
            // Split rings: the index is 16 bits (bit 15 would be a packed wrap counter).
            Reply::State(s) if u32::from(index) == s.index => Ok(s.num as u16),
            Reply::State(s) => self.fail(ConnError::Invalid(format!(
                "GET_VRING_BASE for ring {index} answered for ring {}",
                s.index
            ))),
            _ => self.fail(ConnError::Broken),
        }
    }

    /// GET_CONFIG of `size` bytes at `offset` of the device configuration.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, ConnError> {
        if self.info.protocol & proto::CONFIG == 0 {
            return Err(ConnError::Unsupported("GET_CONFIG"));
        }
        if size == 0 || size > MAX_CONFIG_SIZE {
            return Err(ConnError::Invalid(format!("GET_CONFIG of {size} bytes")));
        }
        let mut p = ConfigHead {
            offset,
            size,
            flags: 0,
        }
        .as_bytes()
        .to_vec();
        p.resize(12 + size as usize, 0);
        self.send(req::GET_CONFIG, 0, &p, &[])?;
        match self.recv(req::GET_CONFIG, Expect::Config { offset, size })? {
            Reply::Config(c) => Ok(c),
            _ => self.fail(ConnError::Broken),
        }
    }

    /// SET_CONFIG of `data` at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), ConnError> {
        if self.info.protocol & proto::CONFIG == 0 {
            return Err(ConnError::Unsupported("SET_CONFIG"));
        }
        let size = u32::try_from(data.len())
            .ok()
            .filter(|s| *s <= MAX_CONFIG_SIZE)
            .ok_or_else(|| ConnError::Invalid(format!("SET_CONFIG of {} bytes", data.len())))?;
        let mut p = ConfigHead {
            offset,
            size,
            flags: 0,
        }
        .as_bytes()
        .to_vec();
        p.extend_from_slice(data);
        self.request(req::SET_CONFIG, &p, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode;
    use std::io::Write;

    fn backend_says(stream: &[u8]) -> Result<Frontend, ConnError> {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(stream).unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        // Keep the peer open for reading our requests until the test ends.
        std::mem::forget(theirs);
        Frontend::from_stream(ours, Duration::from_millis(200))
    }

    #[test]
    fn a_bad_reply_breaks_the_connection_for_good() {
        // Features without protocol features, SET_OWNER needs no reply, then a
        // GET_VRING_BASE reply for another request, then a well-formed one.
        let mut s = encode(req::GET_FEATURES, flags::REPLY, &(1u64 << 32).to_le_bytes());
        s.extend(encode(req::GET_FEATURES, flags::REPLY, &[0; 8]));
        s.extend(encode(req::GET_VRING_BASE, flags::REPLY, &[0; 8]));
        let mut f = backend_says(&s).unwrap();
        assert_eq!(f.info().protocol, 0);
        let e = f.get_vring_base(0).unwrap_err();
        assert!(matches!(
            e,
            ConnError::Protocol {
                source: ProtocolError::WrongRequest { .. },
                ..
            }
        ));
        assert!(matches!(f.get_vring_base(0), Err(ConnError::Broken)));
        // Without CONFIG negotiated GET_CONFIG is refused locally, not sent.
        assert!(matches!(f.get_config(0, 4), Err(ConnError::Unsupported(_))));
    }

    #[test]
    fn silence_and_eof_fail_within_the_timeout() {
        let t = std::time::Instant::now();
        assert!(matches!(
            backend_says(&[]),
            Err(ConnError::Io {
                request: req::GET_FEATURES,
                ..
            })
        ));
        let (ours, _theirs) = UnixStream::pair().unwrap();
        assert!(matches!(
            Frontend::from_stream(ours, Duration::from_millis(100)),
            Err(ConnError::Io { .. })
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn reply_ack_nack_is_a_refusal_not_a_broken_stream() {
        let feats = F_PROTOCOL_FEATURES.to_le_bytes();
        let mut s = encode(req::GET_FEATURES, flags::REPLY, &feats);
        s.extend(encode(
            req::GET_PROTOCOL_FEATURES,
            flags::REPLY,
            &proto::REPLY_ACK.to_le_bytes(),
        ));
        s.extend(encode(req::SET_OWNER, flags::REPLY, &0u64.to_le_bytes()));
        s.extend(encode(
            req::SET_VRING_NUM,
            flags::REPLY,
            &1u64.to_le_bytes(),
        ));
        s.extend(encode(
            req::SET_VRING_NUM,
            flags::REPLY,
            &0u64.to_le_bytes(),
        ));
        let mut f = backend_says(&s).unwrap();
        let e = f.set_vring_num(0, 64).unwrap_err();
        assert!(!e.is_fatal(), "{e}");
        f.set_vring_num(0, 64).unwrap();
    }
}
