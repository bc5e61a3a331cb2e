//! A popped descriptor chain and cursors over its readable and writable parts.
//!
//! The chain holds validated `(addr, len, writable)` segments, readable ones first, in an
//! inline array that spills to a reusable `Vec` only for long chains, so the common path does
//! not allocate. Guest addresses are checked against the DMA maps when the cursors touch them.

use emudev::{Access, GuestMemory, MemError};
use vm_memory::VolatileSlice;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::QueueError;

/// Segments kept inline before spilling to the heap.
pub const INLINE_SEGMENTS: usize = 8;

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A descriptor chain taken from the available ring.
///
/// Zero-length descriptors are dropped. A writable descriptor followed by a readable one is
/// rejected at pop ([`QueueError::WritableBeforeReadable`]), as QEMU does: every virtio device
/// type requires readable buffers first.
#[derive(Debug, Clone)]
pub struct DescChain {
    head: u16,
    /// Ring slots the chain used (packed rings advance by this).
    ring_descs: u16,
    count: usize,
    readable: usize,
    /// Total bytes; bounded by `u32::MAX`.
    total: u64,
    /// Set once a writable segment was pushed.
    seen_writable: bool,
    inline: [Segment; INLINE_SEGMENTS],
    spill: Vec<Segment>,
}

impl Default for DescChain {
    fn default() -> Self {
        Self::new()
    }
}

impl DescChain {
    /// An empty chain, e.g. to reuse with `Queue::pop_into`.
    pub fn new() -> Self {
        Self {
            head: 0,
            ring_descs: 0,
            count: 0,
            readable: 0,
            total: 0,
            seen_writable: false,
            inline: [Segment::default(); INLINE_SEGMENTS],
            spill: Vec::new(),
        }
    }

    /// Head descriptor index (split) or buffer id (packed): what `add_used` takes.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Number of ring descriptors the chain occupied (an indirect table counts as one).
    pub fn ring_descs(&self) -> u16 {
        self.ring_descs
    }

    /// All segments, readable ones first.
    pub fn segments(&self) -> &[Segment] {
        if self.count <= INLINE_SEGMENTS {
            &self.inline[..self.count]
        } else {
            &self.spill[..]
        }
    }

    /// The device-readable segments.
    pub fn readable(&self) -> &[Segment] {
        &self.segments()[..self.readable]
    }

    /// The device-writable segments.
    pub fn writable(&self) -> &[Segment] {
        &self.segments()[self.readable..]
    }

    /// Total bytes of the readable part.
    pub fn readable_len(&self) -> u64 {
        self.readable().iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes of the writable part.
    pub fn writable_len(&self) -> u64 {
        self.total - self.readable_len()
    }

    /// A cursor over the readable part.
    pub fn reader<'a>(&'a self, mem: &'a GuestMemory) -> Reader<'a> {
        Reader(Cursor::new(mem, self.readable(), Access::Read))
    }

    /// A cursor over the writable part.
    pub fn writer<'a>(&'a self, mem: &'a GuestMemory) -> Writer<'a> {
        Writer(Cursor::new(mem, self.writable(), Access::Write))
    }

    #[inline(always)]
    pub(crate) fn reset(&mut self, head: u16, ring_descs: u16) {
        self.head = head;
        self.ring_descs = ring_descs;
        self.count = 0;
        self.readable = 0;
        self.total = 0;
        self.seen_writable = false;
        self.spill.clear();
    }

    pub(crate) fn set_head(&mut self, head: u16) {
        self.head = head;
    }

    pub(crate) fn set_ring_descs(&mut self, n: u16) {
        self.ring_descs = n;
    }

    /// Append one descriptor's buffer, enforcing order and the 4 GiB total.
    #[inline]
    pub(crate) fn push(&mut self, addr: u64, len: u32, writable: bool) -> Result<(), QueueError> {
        if len == 0 {
            return Ok(());
        }
        self.total += u64::from(len);
        if self.total > u64::from(u32::MAX) {
            return Err(QueueError::ChainTooLong);
        }
        if writable {
            self.seen_writable = true;
        } else {
            if self.seen_writable {
                return Err(QueueError::WritableBeforeReadable);
            }
            self.readable += 1;
        }
        let seg = Segment {
            addr,
            len,
            writable,
        };
        if self.count < INLINE_SEGMENTS {
            self.inline[self.count] = seg;
        } else {
            if self.count == INLINE_SEGMENTS {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(seg);
        }
        self.count += 1;
        Ok(())
    }
}

/// Why a cursor access failed. These are per-request errors (the device reports them in its
/// status), not ring errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("guest buffer access failed: {0}")]
    Memory(#[from] MemError),
    #[error("chain has {available} bytes left, {wanted} needed")]
    Short { wanted: usize, available: usize },
    #[error("buffer at {gpa:#x} has no host mapping; copy instead of using iovecs")]
    NotMappable { gpa: u64 },
}

/// One contiguous piece of a segment, as the cursor sees it.
enum Piece<'a> {
    Host(VolatileSlice<'a>),
    Guest(u64, usize),
}

struct Cursor<'a> {
    mem: &'a GuestMemory,
    segs: &'a [Segment],
    access: Access,
    /// Current segment and offset in it.
    idx: usize,
    off: u32,
    /// Host view of `segs[idx]` from `off`, when translated.
    cur: Option<VolatileSlice<'a>>,
    done: usize,
    remaining: usize,
}

impl<'a> Cursor<'a> {
    fn new(mem: &'a GuestMemory, segs: &'a [Segment], access: Access) -> Self {
        let remaining = segs.iter().map(|s| s.len as usize).sum();
        Self {
            mem,
            segs,
            access,
            idx: 0,
            off: 0,
            cur: None,
            done: 0,
            remaining,
        }
    }

    /// The next piece of at most `max` bytes without consuming it.
    fn peek(&mut self, max: usize) -> Result<Option<Piece<'a>>, ChainError> {
        let Some(seg) = self.segs.get(self.idx) else {
            return Ok(None);
        };
        if let Some(vs) = self.cur {
            let n = vs.len().min(max);
            return Ok(Some(Piece::Host(vs.subslice(0, n).map_err(|_| {
                MemError::Unmapped {
                    gpa: seg.addr,
                    len: u64::from(seg.len),
                }
            })?)));
        }
        let gpa = seg
            .addr
            .checked_add(u64::from(self.off))
            .ok_or(MemError::Overflow {
                gpa: seg.addr,
                len: u64::from(seg.len),
            })?;
        let left = (seg.len - self.off) as usize;
        match host_prefix(self.mem, gpa, left, self.access) {
            Ok(vs) => {
                self.cur = Some(vs);
                let n = vs.len().min(max);
                Ok(Some(Piece::Host(
                    vs.subslice(0, n)
                        .map_err(|_| MemError::Unmapped { gpa, len: n as u64 })?,
                )))
            }
            Err(MemError::NotMappable { .. }) => Ok(Some(Piece::Guest(gpa, left.min(max)))),
            Err(e) => Err(e.into()),
        }
    }

    fn advance(&mut self, n: usize) {
        self.done += n;
        self.remaining -= n;
        if let Some(vs) = self.cur {
            self.cur = if n < vs.len() {
                vs.offset(n).ok()
            } else {
                None
            };
        }
        let Some(seg) = self.segs.get(self.idx) else {
            return;
        };
        self.off += n as u32;
        if self.off >= seg.len {
            self.idx += 1;
            self.off = 0;
            self.cur = None;
        }
    }

    fn skip(&mut self, mut n: usize) -> usize {
        n = n.min(self.remaining);
        let total = n;
        while n > 0 {
            let Some(seg) = self.segs.get(self.idx) else {
                break;
            };
            let step = ((seg.len - self.off) as usize).min(n);
            self.cur = None;
            self.done += step;
            self.remaining -= step;
            self.off += step as u32;
            if self.off >= seg.len {
                self.idx += 1;
                self.off = 0;
            }
            n -= step;
        }
        total
    }

    fn iovecs(&mut self, len: usize, out: &mut Vec<libc::iovec>) -> Result<usize, ChainError> {
        // Check first so a failure consumes nothing.
        let mut probe = Cursor {
            mem: self.mem,
            segs: self.segs,
            access: self.access,
            idx: self.idx,
            off: self.off,
            cur: self.cur,
            done: self.done,
            remaining: self.remaining,
        };
        let want = len.min(self.remaining);
        let start = out.len();
        let mut got = 0;
        while got < want {
            match probe.peek(want - got) {
                Ok(Some(Piece::Host(vs))) => {
                    let n = vs.len();
                    out.push(libc::iovec {
                        iov_base: vs.ptr_guard_mut().as_ptr().cast(),
                        iov_len: n,
                    });
                    probe.advance(n);
                    got += n;
                }
                Ok(Some(Piece::Guest(gpa, _))) => {
                    out.truncate(start);
                    return Err(ChainError::NotMappable { gpa });
                }
                Ok(None) => break,
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
        }
        *self = probe;
        Ok(got)
    }
}

/// Largest host-mapped prefix of `[gpa, gpa+len)` (len > 0): the whole range, or up to the
/// end of the DMA map holding `gpa` when the range continues into another map.
fn host_prefix(
    mem: &GuestMemory,
    gpa: u64,
    len: usize,
    access: Access,
) -> Result<VolatileSlice<'_>, MemError> {
    match mem.slice(gpa, len, access) {
        Err(MemError::Discontiguous { .. }) => {
            // Binary search the boundary; only reached for buffers straddling two maps.
            let (mut lo, mut hi) = (1usize, len - 1);
            let mut best = None;
            while lo <= hi {
                let mid = lo + (hi - lo) / 2;
                match mem.slice(gpa, mid, access) {
                    Ok(vs) => {
                        best = Some(vs);
                        lo = mid + 1;
                    }
                    Err(_) => hi = mid - 1,
                }
            }
            best.ok_or(MemError::Unmapped {
                gpa,
                len: len as u64,
            })
        }
        r => r,
    }
}

/// Cursor over the device-readable part of a chain.
pub struct Reader<'a>(Cursor<'a>);

impl Reader<'_> {
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.0.remaining
    }

    /// Bytes read or skipped so far.
    pub fn bytes_read(&self) -> usize {
        self.0.done
    }

    /// Copy up to `buf.len()` bytes; returns how many were copied.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mut got = 0;
        while got < buf.len() {
            match self.0.peek(buf.len() - got)? {
                None => break,
                Some(Piece::Host(vs)) => {
                    let n = vs.len();
                    vs.copy_to(&mut buf[got..got + n]);
                    self.0.advance(n);
                    got += n;
                }
                Some(Piece::Guest(gpa, n)) => {
                    self.0.mem.read(gpa, &mut buf[got..got + n])?;
                    self.0.advance(n);
                    got += n;
                }
            }
        }
        Ok(got)
    }

    /// Fill `buf` completely or fail without a partial guarantee.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ChainError> {
        if buf.len() > self.0.remaining {
            return Err(ChainError::Short {
                wanted: buf.len(),
                available: self.0.remaining,
            });
        }
        self.read(buf).map(|_| ())
    }

    /// Read a plain-data object (may straddle descriptors).
    pub fn read_obj<T: FromBytes + IntoBytes>(&mut self) -> Result<T, ChainError> {
        let mut v = T::new_zeroed();
        self.read_exact(v.as_mut_bytes())?;
        Ok(v)
    }

    /// Skip up to `n` bytes; returns how many were skipped.
    pub fn skip(&mut self, n: usize) -> usize {
        self.0.skip(n)
    }

    /// Append host iovecs for the next `len` bytes (or fewer if the chain is shorter) and
    /// consume them; returns the byte count. Fails without consuming if part of the range is
    /// only reachable by messages. The pointers stay valid while the `GuestMemory` lives.
    pub fn iovecs(&mut self, len: usize, out: &mut Vec<libc::iovec>) -> Result<usize, ChainError> {
        self.0.iovecs(len, out)
    }
}

/// Cursor over the device-writable part of a chain.
pub struct Writer<'a>(Cursor<'a>);

impl Writer<'_> {
    /// Writable bytes left.
    pub fn remaining(&self) -> usize {
        self.0.remaining
    }

    /// Bytes written (or handed out as iovecs) so far: the used length to report.
    pub fn bytes_written(&self) -> usize {
        self.0.done
    }

    /// Copy as much of `data` as fits; returns how many bytes were written.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, ChainError> {
        let mut put = 0;
        while put < data.len() {
            match self.0.peek(data.len() - put)? {
                None => break,
                Some(Piece::Host(vs)) => {
                    let n = vs.len();
                    vs.copy_from(&data[put..put + n]);
                    self.0.advance(n);
                    put += n;
                }
                Some(Piece::Guest(gpa, n)) => {
                    self.0.mem.write(gpa, &data[put..put + n])?;
                    self.0.advance(n);
                    put += n;
                }
            }
        }
        Ok(put)
    }

    /// Write all of `data` or fail (checked for room first).
    pub fn write_all(&mut self, data: &[u8]) -> Result<(), ChainError> {
        if data.len() > self.0.remaining {
            return Err(ChainError::Short {
                wanted: data.len(),
                available: self.0.remaining,
            });
        }
        self.write(data).map(|_| ())
    }

    /// Write a plain-data object (may straddle descriptors).
    pub fn write_obj<T: IntoBytes + Immutable>(&mut self, v: &T) -> Result<(), ChainError> {
        self.write_all(v.as_bytes())
    }

    /// Skip up to `n` bytes without writing them (they do not count as written).
    pub fn skip(&mut self, n: usize) -> usize {
        let before = self.0.done;
        let k = self.0.skip(n);
        self.0.done = before;
        k
    }

    /// Like [`Reader::iovecs`]; the bytes count as written.
    pub fn iovecs(&mut self, len: usize, out: &mut Vec<libc::iovec>) -> Result<usize, ChainError> {
        self.0.iovecs(len, out)
    }
}
