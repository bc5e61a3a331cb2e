//! A blocking vfio-user client, for tests, demos and inspection tools.
//!
//! Each request waits for its reply. Server-initiated DMA_READ/DMA_WRITE that arrive in the
//! meantime (or during [`Client::serve`]) are answered from a caller-supplied
//! [`ClientMemory`], so a server may DMA while the client waits for it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use zerocopy::{FromBytes, IntoBytes};

use crate::caps::{self, PeerCaps};
use crate::codec::{self, Decoder, Frame, Message};
use crate::device::{Errno, SparseArea};
use crate::server::DmaLayout;
use crate::wire::{self, cmd, MAX_DATA_XFER_SIZE, MAX_MSG_FDS};

/// Client memory the server reaches with DMA_READ / DMA_WRITE.
pub trait ClientMemory: Send {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), Errno>;
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("server replied with error {0}")]
    Server(Errno),
    #[error("malformed reply: {0}")]
    BadReply(&'static str),
    #[error("server closed the connection")]
    Closed,
    #[error("no reply in time")]
    Timeout,
}

/// DEVICE_GET_REGION_INFO answer.
#[derive(Debug)]
pub struct RegionInfo {
    pub info: wire::RegionInfo,
    pub areas: Vec<SparseArea>,
    pub fd: Option<OwnedFd>,
}

/// The data of a SET_IRQS request.
#[derive(Debug, Clone, Copy)]
pub enum SetIrqData<'a> {
    None,
    Bool(&'a [bool]),
    /// One entry per vector; `None` de-assigns. Sent in runs like QEMU does: runs of fds of
    /// at most the server's `max_msg_fds`, and runs of `None` as count>0 without fds.
    Eventfds(&'a [Option<BorrowedFd<'a>>]),
}

/// A blocking client connection.
pub struct Client {
    sock: UnixStream,
    decoder: Decoder,
    next_id: u16,
    server: Option<PeerCaps>,
    memory: Option<Box<dyn ClientMemory>>,
    layout: DmaLayout,
    dma_served: u64,
}

impl Client {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::from_stream(UnixStream::connect(path)?)
    }

    pub fn from_stream(sock: UnixStream) -> Result<Self, ClientError> {
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            sock,
            decoder: Decoder::new(),
            next_id: 0,
            server: None,
            memory: None,
            layout: DmaLayout::Spec,
            dma_served: 0,
        })
    }

    /// How long to wait for a reply (None: forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<(), ClientError> {
        self.sock.set_read_timeout(t)?;
        Ok(())
    }

    /// Memory used to answer server DMA.
    pub fn set_memory(&mut self, m: Box<dyn ClientMemory>) {
        self.memory = Some(m);
    }

    /// Layout used to answer server DMA (QEMU's, to emulate QEMU 11.1).
    pub fn set_dma_layout(&mut self, l: DmaLayout) {
        self.layout = l;
    }

    /// Server DMA requests answered so far.
    pub fn dma_served(&self) -> u64 {
        self.dma_served
    }

    /// The server's capabilities, after [`Client::negotiate`].
    pub fn server_caps(&self) -> Option<&PeerCaps> {
        self.server.as_ref()
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    fn alloc_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Send raw bytes with fds (for malformed-message tests).
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        codec::write_all(self.sock.as_fd(), bytes, fds)?;
        Ok(())
    }

    /// Receive the next message of any kind (server DMA requests are *not* served).
    pub fn recv_raw(&mut self) -> Result<Message, ClientError> {
        loop {
            if let Some(f) = self.decoder.next_frame() {
                return match f {
                    Frame::Message(m) => Ok(m),
                    Frame::Rejected { .. } => Err(ClientError::BadReply("malformed frame")),
                };
            }
            match self.decoder.read_from(self.sock.as_fd()) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Send a command and wait for its reply, serving server DMA meanwhile. An error reply
    /// becomes `ClientError::Server`.
    pub fn request(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, ClientError> {
        let id = self.alloc_id();
        let bytes = codec::request(id, command, false, &[payload]);
        self.send_raw(&bytes, fds)?;
        self.wait_reply(id, command)
    }

    /// Send a command with NO_REPLY.
    pub fn post(&mut self, command: u16, payload: &[u8]) -> Result<(), ClientError> {
        let id = self.alloc_id();
        let bytes = codec::request(id, command, true, &[payload]);
        self.send_raw(&bytes, &[])
    }

    fn wait_reply(&mut self, id: u16, command: u16) -> Result<Message, ClientError> {
        loop {
            let m = self.recv_raw()?;
            if m.header.is_reply() {
                if m.header.msg_id == id && m.header.command == command {
                    if m.header.is_error() {
                        return Err(ClientError::Server(Errno::from_raw(m.header.error as i32)));
                    }
                    return Ok(m);
                }
                log::warn!(
                    "client: unexpected reply id={} cmd={}",
                    m.header.msg_id,
                    m.header.command
                );
                continue;
            }
            self.serve_one(m)?;
        }
    }

    /// Serve server requests until `timeout` passes with nothing arriving. Returns how many
    /// were served.
    pub fn serve(&mut self, timeout: Duration) -> Result<usize, ClientError> {
        let old = self.sock.read_timeout()?;
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut n = 0;
        let r = loop {
            match self.recv_raw() {
                Ok(m) if !m.header.is_reply() => {
                    if let Err(e) = self.serve_one(m) {
                        break Err(e);
                    }
                    n += 1;
                }
                Ok(m) => log::warn!("client: stray reply id={}", m.header.msg_id),
                Err(ClientError::Timeout) => break Ok(n),
                Err(e) => break Err(e),
            }
        };
        self.sock.set_read_timeout(old)?;
        r
    }

    fn serve_one(&mut self, m: Message) -> Result<(), ClientError> {
        let h = m.header;
        let reply = self.handle_server_request(&m);
        if h.no_reply() {
            return Ok(());
        }
        let bytes = match reply {
            Ok(b) => b,
            Err(e) => codec::error_reply(&h, e as i32 as u32),
        };
        self.send_raw(&bytes, &[])
    }

    fn handle_server_request(&mut self, m: &Message) -> Result<Vec<u8>, Errno> {
        let h = m.header;
        if !m.fds.is_empty() {
            return Err(Errno::EINVAL);
        }
        if h.command != cmd::DMA_READ && h.command != cmd::DMA_WRITE {
            return Err(Errno::ENOSYS);
        }
        let p = &m.payload;
        let (addr, count, data_off) = match self.layout {
            DmaLayout::Spec => {
                let a = wire::DmaAccess::read_from_prefix(p)
                    .map_err(|_| Errno::EINVAL)?
                    .0;
                (a.address, a.count, 16usize)
            }
            DmaLayout::Qemu => {
                if p.len() < 16 {
                    return Err(Errno::EINVAL);
                }
                let a = wire::DmaAccessQemu::read_from_prefix(p)
                    .map_err(|_| Errno::EINVAL)?
                    .0;
                (a.address, a.count as u64, 12usize)
            }
        };
        if count > MAX_DATA_XFER_SIZE as u64 {
            return Err(Errno::E2BIG);
        }
        let count = count as usize;
        let mem = self.memory.as_mut().ok_or(Errno::EFAULT)?;
        self.dma_served += 1;
        if h.command == cmd::DMA_READ {
            let mut data = vec![0u8; count];
            mem.read(addr, &mut data)?;
            Ok(match self.layout {
                DmaLayout::Spec => {
                    let head = wire::DmaAccess {
                        address: addr,
                        count: count as u64,
                    };
                    codec::reply(&h, &[head.as_bytes(), &data])
                }
                DmaLayout::Qemu => {
                    let head = wire::DmaAccessQemu {
                        address: addr,
                        count: count as u32,
                    };
                    codec::reply(&h, &[head.as_bytes(), &data, &[0u8; 4]])
                }
            })
        } else {
            let end = data_off.checked_add(count).ok_or(Errno::EINVAL)?;
            let data = p.get(data_off..end).ok_or(Errno::EINVAL)?;
            mem.write(addr, data)?;
            Ok(match self.layout {
                DmaLayout::Spec => {
                    let head = wire::DmaAccess {
                        address: addr,
                        count: count as u64,
                    };
                    codec::reply(&h, &[head.as_bytes()])
                }
                DmaLayout::Qemu => codec::reply(&h, &[]),
            })
        }
    }

    /// VERSION with our default capabilities; returns the server's.
    pub fn negotiate(&mut self) -> Result<PeerCaps, ClientError> {
        let payload =
            caps::format_client_request(MAX_MSG_FDS as u32, MAX_DATA_XFER_SIZE as u64, 65535);
        self.negotiate_with(&payload)
    }

    /// VERSION with a caller-supplied payload (e.g. QEMU's exact JSON).
    pub fn negotiate_with(&mut self, payload: &[u8]) -> Result<PeerCaps, ClientError> {
        let m = self.request(cmd::VERSION, payload, &[])?;
        if m.payload.len() > payload.len() {
            return Err(ClientError::BadReply(
                "VERSION reply larger than the request",
            ));
        }
        let c = caps::parse_version(&m.payload)
            .map_err(|_| ClientError::BadReply("bad VERSION reply"))?;
        self.server = Some(c);
        Ok(c)
    }

    /// DMA_MAP; `fd` is `(fd, file offset)` for shared memory, `None` for message DMA.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        flags: u32,
        fd: Option<(BorrowedFd<'_>, u64)>,
    ) -> Result<(), ClientError> {
        let req = wire::DmaMap {
            argsz: 32,
            flags,
            offset: fd.map(|f| f.1).unwrap_or(0),
            address: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.map(|f| f.0).into_iter().collect();
        self.request(cmd::DMA_MAP, req.as_bytes(), &fds)?;
        Ok(())
    }

    /// DMA_UNMAP of a range; returns the echoed request.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<wire::DmaUnmap, ClientError> {
        self.unmap_raw(0, iova, size)
    }

    /// DMA_UNMAP with FLAG_ALL.
    pub fn dma_unmap_all(&mut self) -> Result<wire::DmaUnmap, ClientError> {
        self.unmap_raw(wire::dma_flags::UNMAP_ALL, 0, 0)
    }

    fn unmap_raw(
        &mut self,
        flags: u32,
        address: u64,
        size: u64,
    ) -> Result<wire::DmaUnmap, ClientError> {
        let req = wire::DmaUnmap {
            argsz: 24,
            flags,
            address,
            size,
        };
        let m = self.request(cmd::DMA_UNMAP, req.as_bytes(), &[])?;
        if m.payload.len() != 24 {
            return Err(ClientError::BadReply("DMA_UNMAP reply is not 24 bytes"));
        }
        wire::DmaUnmap::read_from_bytes(&m.payload[..])
            .map_err(|_| ClientError::BadReply("DMA_UNMAP"))
    }

    pub fn get_info(&mut self) -> Result<wire::DeviceInfo, ClientError> {
        let req = wire::DeviceInfo {
            argsz: 16,
            ..Default::default()
        };
        let m = self.request(cmd::DEVICE_GET_INFO, req.as_bytes(), &[])?;
        Ok(wire::DeviceInfo::read_from_prefix(&m.payload)
            .map_err(|_| ClientError::BadReply("GET_INFO"))?
            .0)
    }

    /// GET_REGION_INFO, retrying with the argsz the server asks for (as QEMU does).
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, ClientError> {
        let mut argsz = 32u32;
        for _ in 0..2 {
            let req = wire::RegionInfo {
                argsz,
                index,
                ..Default::default()
            };
            let mut m = self.request(cmd::DEVICE_GET_REGION_INFO, req.as_bytes(), &[])?;
            if m.payload.len() > argsz as usize {
                return Err(ClientError::BadReply("region info larger than argsz"));
            }
            let info = wire::RegionInfo::read_from_prefix(&m.payload)
                .map_err(|_| ClientError::BadReply("GET_REGION_INFO"))?
                .0;
            if info.argsz > argsz {
                if !m.fds.is_empty() {
                    return Err(ClientError::BadReply("fd with a truncated region info"));
                }
                argsz = info.argsz;
                continue;
            }
            if m.fds.len() > 1 {
                return Err(ClientError::BadReply("more than one region fd"));
            }
            let areas = parse_sparse(&m.payload, info.cap_offset)?;
            return Ok(RegionInfo {
                info,
                areas,
                fd: m.fds.pop(),
            });
        }
        Err(ClientError::BadReply("argsz kept growing"))
    }

    /// GET_REGION_IO_FDS: sub-regions and the fds they index.
    pub fn region_io_fds(
        &mut self,
        index: u32,
    ) -> Result<(Vec<wire::IoFdSubRegion>, Vec<OwnedFd>), ClientError> {
        let mut argsz = 16u32;
        for _ in 0..2 {
            let req = wire::RegionIoFds {
                argsz,
                flags: 0,
                index,
                count: 0,
            };
            let m = self.request(cmd::DEVICE_GET_REGION_IO_FDS, req.as_bytes(), &[])?;
            let head = wire::RegionIoFds::read_from_prefix(&m.payload)
                .map_err(|_| ClientError::BadReply("GET_REGION_IO_FDS"))?
                .0;
            if head.argsz > argsz {
                argsz = head.argsz;
                continue;
            }
            let subs = m.payload[16..]
                .chunks_exact(40)
                .take(head.count as usize)
                .filter_map(|c| wire::IoFdSubRegion::read_from_bytes(c).ok())
                .collect();
            return Ok((subs, m.fds));
        }
        Err(ClientError::BadReply("argsz kept growing"))
    }

    pub fn irq_info(&mut self, index: u32) -> Result<wire::IrqInfo, ClientError> {
        let req = wire::IrqInfo {
            argsz: 16,
            flags: 0,
            index,
            count: 0,
        };
        let m = self.request(cmd::DEVICE_GET_IRQ_INFO, req.as_bytes(), &[])?;
        Ok(wire::IrqInfo::read_from_prefix(&m.payload)
            .map_err(|_| ClientError::BadReply("GET_IRQ_INFO"))?
            .0)
    }

    /// SET_IRQS; `action` is one of `irq_set_flags::ACTION_*`. Eventfd data is split into
    /// messages the server accepts (see [`SetIrqData::Eventfds`]).
    pub fn set_irqs(
        &mut self,
        index: u32,
        action: u32,
        start: u32,
        count: u32,
        data: SetIrqData<'_>,
    ) -> Result<(), ClientError> {
        use wire::irq_set_flags as f;
        match data {
            SetIrqData::None => {
                let req = wire::IrqSet {
                    argsz: 20,
                    flags: f::DATA_NONE | action,
                    index,
                    start,
                    count,
                };
                self.request(cmd::DEVICE_SET_IRQS, req.as_bytes(), &[])?;
            }
            SetIrqData::Bool(b) => {
                let req = wire::IrqSet {
                    argsz: 20 + b.len() as u32,
                    flags: f::DATA_BOOL | action,
                    index,
                    start,
                    count,
                };
                let bytes: Vec<u8> = b.iter().map(|&x| x as u8).collect();
                let mut p = req.as_bytes().to_vec();
                p.extend_from_slice(&bytes);
                self.request(cmd::DEVICE_SET_IRQS, &p, &[])?;
            }
            SetIrqData::Eventfds(fds) => {
                let max = self
                    .server
                    .map(|s| s.max_msg_fds as usize)
                    .unwrap_or(1)
                    .clamp(1, MAX_MSG_FDS);
                let mut i = 0usize;
                while i < fds.len() {
                    let valid = fds[i].is_some();
                    let mut j = i;
                    while j < fds.len() && fds[j].is_some() == valid && (!valid || j - i < max) {
                        j += 1;
                    }
                    let run: Vec<BorrowedFd<'_>> = fds[i..j].iter().flatten().copied().collect();
                    let req = wire::IrqSet {
                        argsz: 20,
                        flags: f::DATA_EVENTFD | action,
                        index,
                        start: start + i as u32,
                        count: (j - i) as u32,
                    };
                    self.request(cmd::DEVICE_SET_IRQS, req.as_bytes(), &run)?;
                    i = j;
                }
            }
        }
        Ok(())
    }

    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let req = wire::RegionAccess {
            offset,
            region,
            count,
        };
        let m = self.request(cmd::REGION_READ, req.as_bytes(), &[])?;
        if m.payload.len() != 16 + count as usize {
            return Err(ClientError::BadReply("REGION_READ reply size"));
        }
        Ok(m.payload[16..].to_vec())
    }

    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = wire::RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.request(cmd::REGION_WRITE, &[req.as_bytes(), data].concat(), &[])?;
        Ok(())
    }

    /// A posted (NO_REPLY) REGION_WRITE.
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = wire::RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.post(cmd::REGION_WRITE, &[req.as_bytes(), data].concat())
    }

    /// REGION_WRITE_MULTI of `(region, offset, data ≤ 8 bytes)` entries. Returns the
    /// server's wr_cnt, or 0 when posted.
    pub fn write_multi(
        &mut self,
        writes: &[(u32, u64, &[u8])],
        posted: bool,
    ) -> Result<u64, ClientError> {
        let mut p = wire::WriteMultiHead {
            wr_cnt: writes.len() as u64,
        }
        .as_bytes()
        .to_vec();
        for (region, offset, data) in writes {
            let mut e = wire::WriteMultiEntry {
                offset: *offset,
                region: *region,
                count: data.len() as u32,
                data: [0; 8],
            };
            let n = data.len().min(8);
            e.data[..n].copy_from_slice(&data[..n]);
            p.extend_from_slice(e.as_bytes());
        }
        if posted {
            self.post(cmd::REGION_WRITE_MULTI, &p)?;
            return Ok(0);
        }
        let m = self.request(cmd::REGION_WRITE_MULTI, &p, &[])?;
        Ok(wire::WriteMultiHead::read_from_prefix(&m.payload)
            .map_err(|_| ClientError::BadReply("WRITE_MULTI"))?
            .0
            .wr_cnt)
    }

    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.request(cmd::DEVICE_RESET, &[], &[])?;
        Ok(())
    }

    /// DEVICE_FEATURE; returns the reply payload.
    pub fn device_feature(&mut self, flags: u32, data: &[u8]) -> Result<Vec<u8>, ClientError> {
        let head = wire::DeviceFeature {
            argsz: 8 + data.len() as u32,
            flags,
        };
        let m = self.request(cmd::DEVICE_FEATURE, &[head.as_bytes(), data].concat(), &[])?;
        Ok(m.payload)
    }
}

fn parse_sparse(payload: &[u8], cap_offset: u32) -> Result<Vec<SparseArea>, ClientError> {
    let mut areas = Vec::new();
    let mut off = cap_offset as usize;
    let mut hops = 0;
    while off != 0 {
        hops += 1;
        if hops > 16 || off < 32 {
            return Err(ClientError::BadReply("bad capability chain"));
        }
        let ch = payload
            .get(off..)
            .and_then(|b| wire::CapHeader::read_from_prefix(b).ok())
            .ok_or(ClientError::BadReply("capability outside reply"))?
            .0;
        if ch.id == wire::REGION_INFO_CAP_SPARSE_MMAP {
            let body = off + 8;
            let sh = payload
                .get(body..)
                .and_then(|b| wire::SparseMmapHead::read_from_prefix(b).ok())
                .ok_or(ClientError::BadReply("sparse head"))?
                .0;
            for i in 0..sh.nr_areas as usize {
                let at = body + 8 + i * 16;
                let a = payload
                    .get(at..at + 16)
                    .and_then(|b| wire::SparseMmapArea::read_from_bytes(b).ok())
                    .ok_or(ClientError::BadReply("sparse area outside reply"))?;
                areas.push(SparseArea {
                    offset: a.offset,
                    size: a.size,
                });
            }
        }
        off = ch.next as usize;
    }
    Ok(areas)
}
