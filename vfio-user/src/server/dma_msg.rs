//! Server-initiated DMA through messages: the `DmaTransport` a device worker uses, and the
//! loop's side (request encoding in either layout, tolerant reply parsing, timeouts).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use mio::Waker;
use zerocopy::{FromBytes, IntoBytes};

use super::{Conn, DmaLayout};
use crate::codec::{self, Message};
use crate::dma::{DmaError, DmaTransport};
use crate::wire;

/// One server-initiated DMA chunk on its way to the loop.
pub(super) struct DmaRequest {
    pub(super) conn_gen: u64,
    pub(super) write: bool,
    pub(super) addr: u64,
    pub(super) len: usize,
    pub(super) data: Vec<u8>,
    pub(super) reply: Sender<Result<Vec<u8>, DmaError>>,
}

pub(super) struct PendingDma {
    pub(super) write: bool,
    pub(super) addr: u64,
    pub(super) len: usize,
    pub(super) deadline: Instant,
    pub(super) reply: Sender<Result<Vec<u8>, DmaError>>,
}

/// The `DmaTransport` of one connection.
pub(super) struct ConnTransport {
    pub(super) gen: u64,
    pub(super) tx: Sender<DmaRequest>,
    pub(super) waker: Arc<Waker>,
    pub(super) loop_thread: ThreadId,
    pub(super) alive: AtomicBool,
    pub(super) chunk: usize,
    pub(super) timeout: Duration,
}

impl ConnTransport {
    fn one(&self, write: bool, addr: u64, len: usize, data: Vec<u8>) -> Result<Vec<u8>, DmaError> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(DmaError::Disconnected);
        }
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        let req = DmaRequest {
            conn_gen: self.gen,
            write,
            addr,
            len,
            data,
            reply: rtx,
        };
        self.tx.send(req).map_err(|_| DmaError::Disconnected)?;
        self.waker.wake().map_err(|_| DmaError::Disconnected)?;
        match rrx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(DmaError::Timeout {
                addr,
                len: len as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(DmaError::Disconnected),
        }
    }

    fn check_thread(&self) -> Result<(), DmaError> {
        if std::thread::current().id() == self.loop_thread {
            Err(DmaError::WouldDeadlock)
        } else {
            Ok(())
        }
    }
}

impl DmaTransport for ConnTransport {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.check_thread()?;
        let mut done = 0usize;
        for chunk in buf.chunks_mut(self.chunk) {
            let a = addr
                .checked_add(done as u64)
                .ok_or(DmaError::BadReply("address overflow"))?;
            let data = self.one(false, a, chunk.len(), Vec::new())?;
            if data.len() != chunk.len() {
                return Err(DmaError::BadReply("short DMA_READ reply"));
            }
            chunk.copy_from_slice(&data);
            done += chunk.len();
        }
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.check_thread()?;
        let mut done = 0usize;
        for chunk in data.chunks(self.chunk) {
            let a = addr
                .checked_add(done as u64)
                .ok_or(DmaError::BadReply("address overflow"))?;
            self.one(true, a, chunk.len(), chunk.to_vec())?;
            done += chunk.len();
        }
        Ok(())
    }
}

pub(super) fn expire_pending(c: &mut Conn) {
    let now = Instant::now();
    c.pending.retain(|id, p| {
        let keep = p.deadline > now;
        if !keep {
            log::warn!(
                "vfio-user: DMA request id={id} addr={:#x} timed out",
                p.addr
            );
            // Say so explicitly: a dropped sender would read as Disconnected.
            let _ = p.reply.send(Err(DmaError::Timeout {
                addr: p.addr,
                len: p.len as u64,
            }));
        }
        keep
    });
}

pub(super) fn encode_dma_request(
    layout: DmaLayout,
    id: u16,
    command: u16,
    addr: u64,
    len: usize,
    data: &[u8],
) -> Vec<u8> {
    match layout {
        DmaLayout::Spec => {
            let head = wire::DmaAccess {
                address: addr,
                count: len as u64,
            };
            codec::request(id, command, false, &[head.as_bytes(), data])
        }
        DmaLayout::Qemu => {
            let head = wire::DmaAccessQemu {
                address: addr,
                count: len as u32,
            };
            // QEMU's struct is 32 bytes with data at 28: pad after the data for DMA_WRITE
            // (QEMU wants size >= 32 + count), after the head for DMA_READ.
            codec::request(id, command, false, &[head.as_bytes(), data, &[0u8; 4]])
        }
    }
}

/// Parse the client's reply to one of our DMA requests.
pub(super) fn parse_dma_reply(
    layout: DmaLayout,
    p: &PendingDma,
    msg: &Message,
) -> Result<Vec<u8>, DmaError> {
    let len = p.len as u64;
    if msg.header.is_error() {
        return Err(DmaError::Refused {
            addr: p.addr,
            len,
            errno: msg.header.error,
        });
    }
    if !msg.fds.is_empty() {
        return Err(DmaError::BadReply("reply carries fds"));
    }
    let pl = &msg.payload;
    let addr_ok = u64::read_from_prefix(pl).is_ok_and(|(a, _)| a == p.addr);
    if p.write {
        // QEMU replies header-only; the spec echoes address and count.
        return if pl.is_empty() || (pl.len() >= 12 && addr_ok) {
            Ok(Vec::new())
        } else {
            Err(DmaError::BadReply(
                "DMA_WRITE reply does not match the request",
            ))
        };
    }
    if !addr_ok {
        return Err(DmaError::BadReply("DMA_READ reply address mismatch"));
    }
    let count64 = pl.get(8..16).and_then(|b| u64::read_from_bytes(b).ok());
    let count32 = pl.get(8..12).and_then(|b| u32::read_from_bytes(b).ok());
    let spec_ok = pl.len() as u64 == 16 + len && count64 == Some(len);
    // QEMU's reply is 32 + count bytes with data at byte 28: its last 4 bytes are the
    // zeroed tail of its buffer, which tells it apart from a spec reply in most cases.
    let qemu_ok = count32.map(u64::from) == Some(len)
        && (pl.len() as u64 == 12 + len
            || (pl.len() as u64 == 16 + len && pl[pl.len() - 4..].iter().all(|&b| b == 0)));
    let order = match layout {
        DmaLayout::Spec => [(spec_ok, 16usize), (qemu_ok, 12)],
        DmaLayout::Qemu => [(qemu_ok, 12), (spec_ok, 16)],
    };
    for (okay, off) in order {
        if okay {
            return Ok(pl[off..off + p.len].to_vec());
        }
    }
    Err(DmaError::BadReply("DMA_READ reply size or count mismatch"))
}
