//! The virtio-blk request engine: validates one request and executes it on the backend.
//!
//! Input is a chain already split by direction into readable and writable [`Segment`]s (the
//! vring core copies each descriptor once, so the addresses here cannot change under us).
//! The engine never panics on guest input: every malformed request becomes IOERR / UNSUPP, or
//! for chains with no status byte or header, a [`Completion`] with no status.
//!
//! Data moves directly between the backend and guest memory (preadv/pwritev on host views)
//! when every segment lies in one fd-backed DMA region; otherwise (message-backed memory, or
//! a segment straddling two regions) it goes through a reusable bounce buffer.
//!
//! Limits that are only hints to the driver (`seg_max`, `size_max`) are not enforced:
//! SeaBIOS puts a whole request in one descriptor regardless of `size_max`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use emudev::{Access, GuestMemory, MemError};
use vm_memory::VolatileSlice;
use zerocopy::{FromBytes, IntoBytes};

use crate::backend::{AlignedBuf, BackendError, BlockBackend};
use crate::config::{feature, BlkConfig, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE};
use crate::request::{
    read_header, req_type, segs_len, split_status, status, Malformed, SegCursor, Segment,
    VirtioBlkDiscardWriteZeroes, VirtioBlkOutHdr, DWZ_FLAG_UNMAP, DWZ_LEN, OUTHDR_LEN,
};

/// Bounce buffer size for message-backed memory; larger transfers go in pieces.
const BOUNCE_LEN: usize = 256 * 1024;
/// 4 KiB alignment lets an O_DIRECT backend use the bounce buffer without bouncing again.
const BOUNCE_ALIGN: usize = 4096;

/// Counters of one queue (or one device, if shared), readable from any thread.
#[derive(Debug, Default)]
pub struct BlkStats {
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    /// Requests completed with IOERR.
    pub io_errors: AtomicU64,
    /// Requests completed with UNSUPP.
    pub unsupported: AtomicU64,
    /// Chains that could not carry a status (no status byte, header too short, ...).
    pub malformed: AtomicU64,
    /// Requests whose data went through the bounce buffer.
    pub bounced: AtomicU64,
}

/// A plain copy of [`BlkStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkStatsSnapshot {
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub io_errors: u64,
    pub unsupported: u64,
    pub malformed: u64,
    pub bounced: u64,
}

impl BlkStats {
    /// Read every counter (each individually atomic).
    pub fn snapshot(&self) -> BlkStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStatsSnapshot {
            requests: l(&self.requests),
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            write_zeroes: l(&self.write_zeroes),
            io_errors: l(&self.io_errors),
            unsupported: l(&self.unsupported),
            malformed: l(&self.malformed),
            bounced: l(&self.bounced),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Outcome of one chain: what to put in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written to the device-writable part, status byte included (0 if malformed).
    pub used_len: u32,
    /// Status written to the guest; None when the chain was malformed and nothing was written.
    pub status: Option<u8>,
}

/// What the engine enforces, fixed when the driver's features are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    capacity_bytes: u64,
    read_only: bool,
    /// FLUSH offered but not negotiated: every write must be durable before completion.
    write_through: bool,
    /// (max sectors per segment, max segments) when DISCARD is negotiated.
    discard: Option<(u32, u32)>,
    /// Same for WRITE_ZEROES.
    write_zeroes: Option<(u32, u32)>,
    may_unmap: bool,
}

/// A request failure, mapped to a status byte.
#[derive(Debug)]
enum Fail {
    IoErr,
    Unsupp,
}

/// Backend failures logged so far (a failing disk must not flood the log).
static BACKEND_ERRORS: AtomicU64 = AtomicU64::new(0);

impl From<BackendError> for Fail {
    fn from(e: BackendError) -> Self {
        let n = BACKEND_ERRORS.fetch_add(1, Ordering::Relaxed);
        if n < 16 || n % 10_000 == 0 {
            log::warn!("virtio-blk backend error #{}: {e}", n + 1);
        }
        match e {
            BackendError::Unsupported => Fail::Unsupp,
            _ => Fail::IoErr,
        }
    }
}

type ReqResult<T> = Result<T, Fail>;

fn guest_fault<T>(what: &str, e: MemError) -> ReqResult<T> {
    log::debug!("virtio-blk: {what}: {e}");
    Err(Fail::IoErr)
}

/// Host views of a request's data buffers: inline for the usual few segments, so the fast
/// path does not allocate.
// Short-lived and on the stack by design; boxing the array would defeat its purpose.
#[allow(clippy::large_enum_variant)]
enum HostSlices<'m> {
    Inline([VolatileSlice<'m>; INLINE_SLICES], usize),
    Heap(Vec<VolatileSlice<'m>>),
}

/// Data segments handled without allocation.
const INLINE_SLICES: usize = 8;

impl<'m> HostSlices<'m> {
    fn new(n: usize) -> Self {
        if n <= INLINE_SLICES {
            let empty: &'static mut [u8] = &mut [];
            Self::Inline([VolatileSlice::from(empty); INLINE_SLICES], 0)
        } else {
            Self::Heap(Vec::with_capacity(n))
        }
    }

    fn push(&mut self, s: VolatileSlice<'m>) {
        match self {
            Self::Inline(a, n) => {
                if let Some(slot) = a.get_mut(*n) {
                    *slot = s;
                    *n += 1;
                } else {
                    let mut v = a.to_vec();
                    v.push(s);
                    *self = Self::Heap(v);
                }
            }
            Self::Heap(v) => v.push(s),
        }
    }

    fn as_slice(&self) -> &[VolatileSlice<'m>] {
        match self {
            Self::Inline(a, n) => &a[..*n],
            Self::Heap(v) => v,
        }
    }
}

/// Executes virtio-blk requests of one queue on a shared backend.
pub struct BlkEngine {
    backend: Arc<dyn BlockBackend>,
    limits: Limits,
    id: [u8; ID_BYTES],
    stats: Arc<BlkStats>,
    /// Scratch: readable data segments of the current request.
    rd: Vec<Segment>,
    /// Scratch: writable data segments of the current request.
    wr: Vec<Segment>,
    /// Scratch: DISCARD / WRITE_ZEROES ranges.
    ranges: Vec<VirtioBlkDiscardWriteZeroes>,
    /// Bounce buffer for memory without a host mapping; allocated on first use.
    bounce: Option<AlignedBuf>,
}

impl std::fmt::Debug for BlkEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkEngine")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl BlkEngine {
    /// An engine for a device configured as `config`, with the driver's `acked` features.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        config: &BlkConfig,
        acked: u64,
        stats: Arc<BlkStats>,
    ) -> Self {
        let offered = config.features();
        let on = |f: u64| offered & acked & f != 0;
        let mut id = [0u8; ID_BYTES];
        let src = backend.id();
        let n = src.len().min(ID_BYTES);
        id[..n].copy_from_slice(&src[..n]);
        let limits = Limits {
            capacity_bytes: config.capacity_sectors() << SECTOR_SHIFT,
            read_only: offered & feature::RO != 0,
            write_through: offered & feature::FLUSH != 0 && acked & feature::FLUSH == 0,
            discard: on(feature::DISCARD)
                .then(|| (config.max_discard_sectors(), config.max_discard_seg())),
            write_zeroes: on(feature::WRITE_ZEROES).then(|| {
                (
                    config.max_write_zeroes_sectors(),
                    config.max_write_zeroes_seg(),
                )
            }),
            may_unmap: config.write_zeroes_may_unmap(),
        };
        Self {
            backend,
            limits,
            id,
            stats,
            rd: Vec::new(),
            wr: Vec::new(),
            ranges: Vec::new(),
            bounce: None,
        }
    }

    /// The counters this engine updates.
    pub fn stats(&self) -> &Arc<BlkStats> {
        &self.stats
    }

    /// Process one chain. The completion is only returned after the request's effect is
    /// complete (data in guest memory or on the backend, flush done).
    pub fn process(
        &mut self,
        mem: &GuestMemory,
        readable: &[Segment],
        writable: &[Segment],
    ) -> Completion {
        bump(&self.stats.requests, 1);
        match self.process_inner(mem, readable, writable) {
            Ok(c) => c,
            Err(m) => {
                log::debug!("virtio-blk: malformed request: {m}");
                bump(&self.stats.malformed, 1);
                Completion {
                    used_len: 0,
                    status: None,
                }
            }
        }
    }

    fn process_inner(
        &mut self,
        mem: &GuestMemory,
        readable: &[Segment],
        writable: &[Segment],
    ) -> Result<Completion, Malformed> {
        // The layout every driver we know uses: the header in a descriptor of its own and the
        // status byte in a descriptor of its own. The data are then the segments in between,
        // as they are: no splitting, no copying of segment lists.
        if let (Some((h, rd)), Some((s, wr))) = (readable.split_first(), writable.split_last()) {
            if h.len as usize == OUTHDR_LEN && s.len == 1 {
                let mut hdr = VirtioBlkOutHdr::default();
                mem.read(h.addr, hdr.as_mut_bytes())
                    .map_err(|_| Malformed::HeaderUnreadable)?;
                return self.run(mem, &hdr, s.addr, rd, wr);
            }
        }
        let mut wr = std::mem::take(&mut self.wr);
        let mut rd = std::mem::take(&mut self.rd);
        let res = (|| {
            let status_addr = split_status(writable, &mut wr)?;
            let hdr = read_header(mem, readable, &mut rd)?;
            self.run(mem, &hdr, status_addr, &rd, &wr)
        })();
        self.wr = wr;
        self.rd = rd;
        res
    }

    /// Execute a parsed request and write its status byte.
    #[inline(always)]
    fn run(
        &mut self,
        mem: &GuestMemory,
        hdr: &VirtioBlkOutHdr,
        status_addr: u64,
        rd: &[Segment],
        wr: &[Segment],
    ) -> Result<Completion, Malformed> {
        let (st, written) = match self.execute(mem, hdr.type_.get(), hdr.sector.get(), rd, wr) {
            Ok(written) => (status::OK, written),
            Err(Fail::IoErr) => {
                bump(&self.stats.io_errors, 1);
                (status::IOERR, 0)
            }
            Err(Fail::Unsupp) => {
                bump(&self.stats.unsupported, 1);
                (status::UNSUPP, 0)
            }
        };
        // Through the mapping even below 1 MiB (tcg-boot): the status byte is never
        // code, and the data it follows has already reached guest memory.
        mem.write_not_code(status_addr, &[st])
            .map_err(|_| Malformed::StatusUnwritable)?;
        Ok(Completion {
            used_len: written.saturating_add(1),
            status: Some(st),
        })
    }

    /// Run one request; returns the number of data bytes written to the guest.
    #[inline(always)]
    fn execute(
        &mut self,
        mem: &GuestMemory,
        ty: u32,
        sector: u64,
        rd: &[Segment],
        wr: &[Segment],
    ) -> ReqResult<u32> {
        match ty {
            req_type::IN => {
                // (Empty segments carry no data; the vring core drops them anyway.)
                if rd.iter().any(|s| s.len > 0) {
                    log::debug!("virtio-blk: read request with device-readable data");
                    return Err(Fail::IoErr);
                }
                let len = segs_len(wr);
                let offset = self.check_io(sector, len)?;
                self.read_to_guest(mem, offset, wr)?;
                bump(&self.stats.read_bytes, len);
                Ok(u32::try_from(len).unwrap_or(u32::MAX))
            }
            req_type::OUT => {
                if self.limits.read_only {
                    return Err(Fail::IoErr);
                }
                if wr.iter().any(|s| s.len > 0) {
                    log::debug!("virtio-blk: write request with device-writable data");
                    return Err(Fail::IoErr);
                }
                let len = segs_len(rd);
                let offset = self.check_io(sector, len)?;
                self.write_from_guest(mem, offset, rd)?;
                if self.limits.write_through {
                    self.backend.flush()?;
                }
                bump(&self.stats.write_bytes, len);
                Ok(0)
            }
            req_type::FLUSH | req_type::FLUSH_OUT => {
                self.backend.flush()?;
                bump(&self.stats.flushes, 1);
                Ok(0)
            }
            req_type::GET_ID => {
                let n = usize::try_from(segs_len(wr))
                    .unwrap_or(usize::MAX)
                    .min(ID_BYTES);
                let id = self.id;
                let mut c = SegCursor::new(wr);
                c.walk(n, |addr, r| mem.write(addr, &id[r]))
                    .or_else(|e| guest_fault("GET_ID buffer", e))?;
                // n ≤ 20.
                Ok(n as u32)
            }
            req_type::DISCARD => {
                let (max_sectors, max_seg) = self.limits.discard.ok_or(Fail::Unsupp)?;
                self.discard_or_zero(mem, rd, wr, max_sectors, max_seg, false)?;
                Ok(0)
            }
            req_type::WRITE_ZEROES => {
                let (max_sectors, max_seg) = self.limits.write_zeroes.ok_or(Fail::Unsupp)?;
                self.discard_or_zero(mem, rd, wr, max_sectors, max_seg, true)?;
                Ok(0)
            }
            other => {
                log::debug!("virtio-blk: unsupported request type {other}");
                Err(Fail::Unsupp)
            }
        }
    }

    /// Validate a data transfer of `len` bytes at `sector`; returns the byte offset.
    #[inline(always)]
    fn check_io(&self, sector: u64, len: u64) -> ReqResult<u64> {
        match sector.checked_mul(SECTOR_SIZE) {
            Some(offset)
                if len % SECTOR_SIZE == 0
                    && offset
                        .checked_add(len)
                        .is_some_and(|end| end <= self.limits.capacity_bytes) =>
            {
                Ok(offset)
            }
            _ => Self::bad_io(sector, len),
        }
    }

    #[cold]
    fn bad_io(sector: u64, len: u64) -> ReqResult<u64> {
        if len % SECTOR_SIZE != 0 {
            log::debug!("virtio-blk: data length {len} is not a multiple of 512");
        } else {
            log::debug!("virtio-blk: sector {sector} + {len} bytes is beyond capacity");
        }
        Err(Fail::IoErr)
    }

    /// Fill `out` with host views of every segment; false if some segment has no single host
    /// mapping (then the caller bounces). `out` lives in the caller's frame so the inline
    /// array is never moved.
    fn host_slices<'m>(
        mem: &'m GuestMemory,
        segs: &[Segment],
        access: Access,
        out: &mut HostSlices<'m>,
    ) -> ReqResult<bool> {
        for s in segs {
            if s.len == 0 {
                continue;
            }
            match mem.slice(s.addr, s.len as usize, access) {
                Ok(vs) => out.push(vs),
                Err(MemError::NotMappable { .. } | MemError::Discontiguous { .. }) => {
                    return Ok(false)
                }
                Err(e) => return guest_fault("data buffer", e),
            }
        }
        Ok(true)
    }

    /// Check that every segment is reachable with `access` before any byte moves.
    fn check_segs(mem: &GuestMemory, segs: &[Segment], access: Access) -> ReqResult<()> {
        for s in segs {
            if !mem.check_range(s.addr, u64::from(s.len), access) {
                log::debug!(
                    "virtio-blk: data buffer {:#x}+{:#x} not accessible",
                    s.addr,
                    s.len
                );
                return Err(Fail::IoErr);
            }
        }
        Ok(())
    }

    fn bounce(&mut self) -> ReqResult<AlignedBuf> {
        match self.bounce.take() {
            Some(b) => Ok(b),
            None => AlignedBuf::new(BOUNCE_LEN, BOUNCE_ALIGN).ok_or(Fail::IoErr),
        }
    }

    /// Read from the backend into the guest buffers `segs`.
    #[inline(always)]
    fn read_to_guest(&mut self, mem: &GuestMemory, offset: u64, segs: &[Segment]) -> ReqResult<()> {
        // The usual 4 KiB request: one segment in one mapped region, no slice list to build.
        if let [s] = segs {
            if let Ok(vs) = mem.slice(s.addr, s.len as usize, Access::Write) {
                return Ok(self.backend.read_vectored(offset, &[vs])?);
            }
        }
        self.read_to_guest_slow(mem, offset, segs)
    }

    #[inline(never)]
    fn read_to_guest_slow(
        &mut self,
        mem: &GuestMemory,
        offset: u64,
        segs: &[Segment],
    ) -> ReqResult<()> {
        if segs.is_empty() {
            return Ok(());
        }
        let mut slices = HostSlices::new(segs.len());
        if Self::host_slices(mem, segs, Access::Write, &mut slices)? {
            return Ok(self.backend.read_vectored(offset, slices.as_slice())?);
        }
        Self::check_segs(mem, segs, Access::Write)?;
        bump(&self.stats.bounced, 1);
        let mut buf = self.bounce()?;
        let mut cursor = SegCursor::new(segs);
        let mut pos = offset;
        let mut left = segs_len(segs);
        let res = (|| {
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let chunk = &mut buf[..n];
                self.backend
                    .read_vectored(pos, &[VolatileSlice::from(&mut *chunk)])?;
                cursor
                    .walk(n, |addr, r| mem.write(addr, &chunk[r]))
                    .or_else(|e| guest_fault("data buffer", e))?;
                pos += n as u64;
                left -= n as u64;
            }
            Ok(())
        })();
        self.bounce = Some(buf);
        res
    }

    /// Write the guest buffers `segs` to the backend.
    #[inline(always)]
    fn write_from_guest(
        &mut self,
        mem: &GuestMemory,
        offset: u64,
        segs: &[Segment],
    ) -> ReqResult<()> {
        if let [s] = segs {
            if let Ok(vs) = mem.slice(s.addr, s.len as usize, Access::Read) {
                return Ok(self.backend.write_vectored(offset, &[vs])?);
            }
        }
        self.write_from_guest_slow(mem, offset, segs)
    }

    #[inline(never)]
    fn write_from_guest_slow(
        &mut self,
        mem: &GuestMemory,
        offset: u64,
        segs: &[Segment],
    ) -> ReqResult<()> {
        if segs.is_empty() {
            return Ok(());
        }
        let mut slices = HostSlices::new(segs.len());
        if Self::host_slices(mem, segs, Access::Read, &mut slices)? {
            return Ok(self.backend.write_vectored(offset, slices.as_slice())?);
        }
        Self::check_segs(mem, segs, Access::Read)?;
        bump(&self.stats.bounced, 1);
        let mut buf = self.bounce()?;
        let mut cursor = SegCursor::new(segs);
        let mut pos = offset;
        let mut left = segs_len(segs);
        let res = (|| {
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let chunk = &mut buf[..n];
                cursor
                    .walk(n, |addr, r| mem.read(addr, &mut chunk[r]))
                    .or_else(|e| guest_fault("data buffer", e))?;
                self.backend
                    .write_vectored(pos, &[VolatileSlice::from(&mut *chunk)])?;
                pos += n as u64;
                left -= n as u64;
            }
            Ok(())
        })();
        self.bounce = Some(buf);
        res
    }

    /// DISCARD (`zero == false`) or WRITE_ZEROES: validate every range, then apply them.
    fn discard_or_zero(
        &mut self,
        mem: &GuestMemory,
        rd: &[Segment],
        wr: &[Segment],
        max_sectors: u32,
        max_seg: u32,
        zero: bool,
    ) -> ReqResult<()> {
        if self.limits.read_only {
            return Err(Fail::IoErr);
        }
        if wr.iter().any(|s| s.len > 0) {
            log::debug!("virtio-blk: discard/write-zeroes with device-writable data");
            return Err(Fail::IoErr);
        }
        let len = segs_len(rd);
        if len == 0 || len % DWZ_LEN as u64 != 0 {
            log::debug!("virtio-blk: discard/write-zeroes payload of {len} bytes");
            return Err(Fail::IoErr);
        }
        let count = len / DWZ_LEN as u64;
        if count > u64::from(max_seg) {
            log::debug!("virtio-blk: {count} discard/write-zeroes segments > {max_seg}");
            return Err(Fail::Unsupp);
        }
        // count ≤ max_seg (u32), and the payload is count * 16 bytes.
        let mut raw = vec![0u8; len as usize];
        SegCursor::new(rd)
            .walk(raw.len(), |addr, r| mem.read(addr, &mut raw[r]))
            .or_else(|e| guest_fault("discard payload", e))?;
        self.ranges.clear();
        for chunk in raw.chunks_exact(DWZ_LEN) {
            let r = VirtioBlkDiscardWriteZeroes::read_from_bytes(chunk).map_err(|_| Fail::IoErr)?;
            let flags = r.flags.get();
            let allowed = if zero { DWZ_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 {
                log::debug!("virtio-blk: discard/write-zeroes flags {flags:#x}");
                return Err(Fail::Unsupp);
            }
            if r.num_sectors.get() > max_sectors {
                log::debug!(
                    "virtio-blk: discard/write-zeroes of {} sectors > {max_sectors}",
                    r.num_sectors.get()
                );
                return Err(Fail::IoErr);
            }
            self.check_io(
                r.sector.get(),
                u64::from(r.num_sectors.get()) << SECTOR_SHIFT,
            )?;
            self.ranges.push(r);
        }
        for r in &self.ranges {
            let offset = r.sector.get() << SECTOR_SHIFT;
            let bytes = u64::from(r.num_sectors.get()) << SECTOR_SHIFT;
            if zero {
                let unmap = r.flags.get() & DWZ_FLAG_UNMAP != 0 && self.limits.may_unmap;
                self.backend.write_zeroes(offset, bytes, unmap)?;
            } else {
                self.backend.discard(offset, bytes)?;
            }
        }
        if zero && self.limits.write_through {
            self.backend.flush()?;
        }
        bump(
            if zero {
                &self.stats.write_zeroes
            } else {
                &self.stats.discards
            },
            1,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::faulty::{FaultPlan, FaultyBackend};
    use crate::backend::null::NullBackend;
    use crate::backend::raw::{RawFile, RawFileOptions};
    use crate::config::BlkOptions;
    use crate::request::{seg, VirtioBlkOutHdr};
    use crate::testutil::{pattern, GuestRam, TempImage};
    use zerocopy::little_endian::{U32, U64};
    use zerocopy::IntoBytes;

    const HDR: u64 = 0x1000;
    const STATUS: u64 = 0x2000;
    const DATA: u64 = 0x10000;
    const DISK: u64 = 1 << 20;

    struct Rig {
        ram: GuestRam,
        engine: BlkEngine,
        stats: Arc<BlkStats>,
    }

    fn rig_with(
        ram: GuestRam,
        backend: Arc<dyn BlockBackend>,
        opts: BlkOptions,
        acked: u64,
    ) -> Rig {
        let cfg = BlkConfig::new(&opts, backend.as_ref()).unwrap();
        let stats = Arc::new(BlkStats::default());
        let acked = if acked == u64::MAX {
            cfg.features()
        } else {
            acked
        };
        let engine = BlkEngine::new(backend, &cfg, acked, stats.clone());
        Rig { ram, engine, stats }
    }

    fn rig(backend: Arc<dyn BlockBackend>) -> Rig {
        rig_with(
            GuestRam::new(4 << 20),
            backend,
            BlkOptions::default(),
            u64::MAX,
        )
    }

    fn file_backend(img: &TempImage) -> Arc<dyn BlockBackend> {
        Arc::new(
            RawFile::open(
                &img.0,
                &RawFileOptions {
                    id: Some("serial-42".into()),
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    }

    impl Rig {
        fn hdr(&self, ty: u32, sector: u64) -> Segment {
            let h = VirtioBlkOutHdr {
                type_: U32::new(ty),
                ioprio: U32::new(0),
                sector: U64::new(sector),
            };
            self.ram.mem.write(HDR, h.as_bytes()).unwrap();
            self.ram.mem.write(STATUS, &[0xff]).unwrap();
            seg(HDR, 16, false)
        }

        fn run(&mut self, readable: &[Segment], writable: &[Segment]) -> Completion {
            let c = self.engine.process(&self.ram.mem, readable, writable);
            if let Some(st) = c.status {
                // The status is really in guest memory at the last writable byte.
                let last = writable.iter().rev().find(|s| s.len > 0).unwrap();
                let addr = last.addr + u64::from(last.len) - 1;
                assert_eq!(self.ram.bytes(addr, 1)[0], st);
            }
            c
        }

        /// Write `data` at `sector` with one data descriptor.
        fn write(&mut self, sector: u64, data: &[u8]) -> Completion {
            self.ram.mem.write(DATA, data).unwrap();
            let h = self.hdr(req_type::OUT, sector);
            self.run(
                &[h, seg(DATA, data.len() as u32, false)],
                &[seg(STATUS, 1, true)],
            )
        }

        /// Read `len` bytes at `sector` into DATA.
        fn read(&mut self, sector: u64, len: u32) -> (Completion, Vec<u8>) {
            let h = self.hdr(req_type::IN, sector);
            let c = self.run(&[h], &[seg(DATA, len, true), seg(STATUS, 1, true)]);
            (c, self.ram.bytes(DATA, len as usize))
        }

        fn dwz(&mut self, ty: u32, ranges: &[(u64, u32, u32)]) -> Completion {
            let mut payload = Vec::new();
            for &(sector, n, flags) in ranges {
                let r = VirtioBlkDiscardWriteZeroes {
                    sector: U64::new(sector),
                    num_sectors: U32::new(n),
                    flags: U32::new(flags),
                };
                payload.extend_from_slice(r.as_bytes());
            }
            self.ram.mem.write(DATA, &payload).unwrap();
            let h = self.hdr(ty, 0);
            self.run(
                &[h, seg(DATA, payload.len() as u32, false)],
                &[seg(STATUS, 1, true)],
            )
        }
    }

    fn ok(used: u32) -> Completion {
        Completion {
            used_len: used,
            status: Some(status::OK),
        }
    }
    fn st(s: u8) -> Completion {
        Completion {
            used_len: 1,
            status: Some(s),
        }
    }
    const MALFORMED: Completion = Completion {
        used_len: 0,
        status: None,
    };

    #[test]
    fn write_then_read_back_through_a_file() {
        let img = TempImage::new(DISK);
        let mut r = rig(file_backend(&img));
        let data = pattern(8192, 5);
        // Data split over two descriptors, status in its own.
        r.ram.mem.write(DATA, &data[..4096]).unwrap();
        r.ram.mem.write(DATA + 0x8000, &data[4096..]).unwrap();
        let h = r.hdr(req_type::OUT, 3);
        let c = r.run(
            &[h, seg(DATA, 4096, false), seg(DATA + 0x8000, 4096, false)],
            &[seg(STATUS, 1, true)],
        );
        assert_eq!(c, ok(1));
        assert_eq!(&img.contents()[3 * 512..3 * 512 + 8192], &data[..]);
        // Read back with data and status sharing the last writable descriptor.
        let h = r.hdr(req_type::IN, 3);
        let c = r.run(
            &[h],
            &[
                seg(DATA + 0x20000, 4096, true),
                seg(DATA + 0x30000, 4097, true),
            ],
        );
        assert_eq!(c, ok(8193));
        assert_eq!(r.ram.bytes(DATA + 0x20000, 4096), &data[..4096]);
        assert_eq!(r.ram.bytes(DATA + 0x30000, 4096), &data[4096..]);
        assert_eq!(r.ram.bytes(DATA + 0x30000 + 4096, 1), [status::OK]);
        let s = r.stats.snapshot();
        assert_eq!(
            (s.requests, s.read_bytes, s.write_bytes, s.bounced),
            (2, 8192, 8192, 0)
        );
    }

    #[test]
    fn many_data_segments_spill_past_the_inline_slices() {
        let img = TempImage::new(DISK);
        let mut r = rig(file_backend(&img));
        let n = INLINE_SLICES + 5;
        let data = pattern(512 * n, 8);
        let mut readable = vec![r.hdr(req_type::OUT, 2)];
        for i in 0..n {
            let at = DATA + 0x1000 * i as u64;
            r.ram.mem.write(at, &data[512 * i..512 * (i + 1)]).unwrap();
            readable.push(seg(at, 512, false));
        }
        assert_eq!(r.run(&readable, &[seg(STATUS, 1, true)]), ok(1));
        assert_eq!(&img.contents()[1024..1024 + 512 * n], &data[..]);
        let h = r.hdr(req_type::IN, 2);
        let mut writable: Vec<_> = (0..n)
            .map(|i| seg(DATA + 0x100000 + 0x1000 * i as u64, 512, true))
            .collect();
        writable.push(seg(STATUS, 1, true));
        assert_eq!(r.run(&[h], &writable), ok(512 * n as u32 + 1));
        for i in 0..n {
            let at = DATA + 0x100000 + 0x1000 * i as u64;
            assert_eq!(r.ram.bytes(at, 512), &data[512 * i..512 * (i + 1)]);
        }
    }

    /// Random chains (addresses in and out of memory, odd lengths, any type and sector) never
    /// panic, and every completion is coherent.
    #[test]
    fn random_chains_never_panic() {
        let mut r = rig_with(
            GuestRam::mixed(1 << 20),
            Arc::new(NullBackend::new(DISK)),
            BlkOptions::default(),
            u64::MAX,
        );
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let types = [0, 1, 4, 8, 11, 13, 99];
        for _ in 0..3000 {
            let addr = |v: u64| match v % 8 {
                0 => v % (3 << 20),                     // mapped, message or RO page, or past it
                1 => (1 << 20) - (v % 64),              // straddles mapped/message
                2 => u64::MAX - (v % 4096),             // near the top
                3 | 4 => (1 << 20) + (v % 0x8000) * 16, // message-backed
                _ => DATA + (v % 0x1000) * 16,
            };
            let len = |v: u64| {
                if v % 2 == 0 {
                    512 * ((v >> 8) % 8) as u32
                } else {
                    ((v >> 8) % 3000) as u32
                }
            };
            let ty = types[(rnd() % types.len() as u64) as usize];
            let sector = match rnd() % 3 {
                0 => rnd() % (DISK / 512 + 2),
                1 => rnd(),
                _ => 0,
            };
            r.hdr(ty, sector);
            let mut readable = vec![seg(HDR, 16, false)];
            for _ in 0..rnd() % 4 {
                readable.push(seg(addr(rnd()), len(rnd()), false));
            }
            let mut writable = Vec::new();
            for _ in 0..rnd() % 4 {
                writable.push(seg(addr(rnd()), len(rnd()), true));
            }
            if rnd() % 4 != 0 {
                writable.push(seg(STATUS, 1, true));
            }
            if rnd() % 8 == 0 {
                readable[0].len = (rnd() % 16) as u32;
            }
            let c = r.engine.process(&r.ram.mem, &readable, &writable);
            match c.status {
                Some(st) => {
                    assert!(st <= status::UNSUPP);
                    assert!(c.used_len >= 1);
                    assert!(u64::from(c.used_len) <= segs_len(&writable));
                }
                None => assert_eq!(c.used_len, 0),
            }
        }
        let s = r.stats.snapshot();
        assert_eq!(s.requests, 3000);
        // The mix reaches every outcome (deterministic generator).
        assert!(s.read_bytes > 0 && s.write_bytes > 0 && s.bounced > 0);
        assert!(s.io_errors > 0 && s.unsupported > 0 && s.malformed > 0);
    }

    #[test]
    fn header_and_data_in_one_descriptor() {
        let img = TempImage::new(DISK);
        let mut r = rig(file_backend(&img));
        let data = pattern(512, 1);
        r.hdr(req_type::OUT, 1);
        r.ram.mem.write(HDR + 16, &data).unwrap();
        let c = r.run(&[seg(HDR, 16 + 512, false)], &[seg(STATUS, 1, true)]);
        assert_eq!(c, ok(1));
        assert_eq!(&img.contents()[512..1024], &data[..]);
    }

    #[test]
    fn malformed_chains_get_no_status() {
        let mut r = rig(Arc::new(NullBackend::new(DISK)));
        let h = r.hdr(req_type::IN, 0);
        // No writable byte at all.
        assert_eq!(r.run(&[h], &[]), MALFORMED);
        // Header too short.
        assert_eq!(
            r.run(&[seg(HDR, 15, false)], &[seg(STATUS, 1, true)]),
            MALFORMED
        );
        assert_eq!(r.ram.bytes(STATUS, 1), [0xff]);
        // No readable part.
        assert_eq!(r.run(&[], &[seg(STATUS, 1, true)]), MALFORMED);
        // Header in unmapped memory.
        assert_eq!(
            r.run(&[seg(1 << 40, 16, false)], &[seg(STATUS, 1, true)]),
            MALFORMED
        );
        // Status byte outside guest memory.
        assert_eq!(r.run(&[h], &[seg(1 << 40, 1, true)]), MALFORMED);
        assert_eq!(r.stats.snapshot().malformed, 5);
    }

    #[test]
    fn range_and_length_errors_are_ioerr() {
        let img = TempImage::new(DISK);
        let mut r = rig(file_backend(&img));
        let sectors = DISK / 512;
        // Last sector is fine, one past is not.
        assert_eq!(r.read(sectors - 1, 512).0, ok(513));
        assert_eq!(r.read(sectors, 512).0, st(status::IOERR));
        assert_eq!(r.read(sectors - 1, 1024).0, st(status::IOERR));
        // sector * 512 overflows, and offset + len overflows.
        assert_eq!(r.read(u64::MAX / 256, 512).0, st(status::IOERR));
        assert_eq!(r.read((u64::MAX >> 9) - 1, 4096).0, st(status::IOERR));
        // Not a multiple of 512.
        assert_eq!(r.read(0, 513).0, st(status::IOERR));
        assert_eq!(r.write(0, &[1u8; 100]), st(status::IOERR));
        assert!(img.contents().iter().all(|&b| b == 0));
        assert_eq!(r.stats.snapshot().io_errors, 6);
    }

    #[test]
    fn unknown_and_unimplemented_types_are_unsupp() {
        let mut r = rig(Arc::new(NullBackend::new(DISK)));
        for ty in [2, 3, 10, 14, 15, 16, 99, u32::MAX] {
            let h = r.hdr(ty, 0);
            assert_eq!(
                r.run(&[h], &[seg(STATUS, 1, true)]),
                st(status::UNSUPP),
                "type {ty}"
            );
        }
    }

    #[test]
    fn data_in_the_wrong_direction_is_ioerr() {
        let img = TempImage::new(DISK);
        let mut r = rig(file_backend(&img));
        // A write whose data is device-writable.
        let h = r.hdr(req_type::OUT, 0);
        assert_eq!(
            r.run(&[h], &[seg(DATA, 512, true), seg(STATUS, 1, true)]),
            st(status::IOERR)
        );
        // A read with extra device-readable data.
        let h = r.hdr(req_type::IN, 0);
        assert_eq!(
            r.run(
                &[h, seg(DATA, 512, false)],
                &[seg(DATA + 0x1000, 512, true), seg(STATUS, 1, true)]
            ),
            st(status::IOERR)
        );
    }

    #[test]
    fn read_only_device_refuses_writes_without_touching_data() {
        let img = TempImage::new(DISK);
        let backend: Arc<dyn BlockBackend> = Arc::new(
            RawFile::open(
                &img.0,
                &RawFileOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let mut r = rig(backend);
        assert_eq!(r.write(0, &[7u8; 512]), st(status::IOERR));
        // RO devices offer neither discard nor write-zeroes.
        assert_eq!(r.dwz(req_type::DISCARD, &[(0, 1, 0)]), st(status::UNSUPP));
        assert_eq!(
            r.dwz(req_type::WRITE_ZEROES, &[(0, 1, 0)]),
            st(status::UNSUPP)
        );
        // Flush on a read-only device is harmless.
        let h = r.hdr(req_type::FLUSH, 0);
        assert_eq!(r.run(&[h], &[seg(STATUS, 1, true)]), ok(1));
        assert!(img.contents().iter().all(|&b| b == 0));
        // The RO option alone (writable file) also refuses.
        let img2 = TempImage::new(DISK);
        let mut r2 = rig_with(
            GuestRam::new(1 << 20),
            file_backend(&img2),
            BlkOptions {
                read_only: true,
                ..Default::default()
            },
            u64::MAX,
        );
        assert_eq!(r2.write(0, &[7u8; 512]), st(status::IOERR));
        assert!(img2.contents().iter().all(|&b| b == 0));
    }

    #[test]
    fn get_id_returns_the_padded_serial() {
        let img = TempImage::new(DISK);
        let mut r = rig(file_backend(&img));
        r.ram.mem.write(DATA, &[0xee; 32]).unwrap();
        let h = r.hdr(req_type::GET_ID, 0);
        let c = r.run(&[h], &[seg(DATA, 20, true), seg(STATUS, 1, true)]);
        assert_eq!(c, ok(21));
        let mut want = [0u8; 20];
        want[..9].copy_from_slice(b"serial-42");
        assert_eq!(r.ram.bytes(DATA, 20), want);
        // A short buffer gets a prefix.
        let h = r.hdr(req_type::GET_ID, 0);
        let c = r.run(&[h], &[seg(DATA + 0x100, 4, true), seg(STATUS, 1, true)]);
        assert_eq!(c, ok(5));
        assert_eq!(r.ram.bytes(DATA + 0x100, 4), b"seri");
    }

    #[test]
    fn backend_failures_become_ioerr_never_silent_loss() {
        let img = TempImage::new(DISK);
        let faulty = Arc::new(FaultyBackend::new(
            file_backend(&img),
            FaultPlan::writes_after(1, libc::ENOSPC),
        ));
        let mut r = rig(faulty.clone());
        assert_eq!(r.write(0, &[1u8; 512]), ok(1));
        assert_eq!(r.write(1, &[2u8; 512]), st(status::IOERR));
        let h = r.hdr(req_type::FLUSH, 0);
        assert_eq!(r.run(&[h], &[seg(STATUS, 1, true)]), st(status::IOERR));
        assert_eq!(
            r.dwz(req_type::WRITE_ZEROES, &[(0, 1, 0)]),
            st(status::IOERR)
        );
        assert_eq!(faulty.injected(), 3);
        assert_eq!(r.stats.snapshot().io_errors, 3);
        // Failing reads too.
        let eio = Arc::new(FaultyBackend::new(
            Arc::new(NullBackend::new(DISK)),
            FaultPlan {
                ok_writes: 0,
                fail_reads: true,
                errno: libc::EIO,
            },
        ));
        let mut r = rig(eio);
        assert_eq!(r.read(0, 512).0, st(status::IOERR));
    }

    #[test]
    fn write_through_when_flush_offered_but_not_negotiated() {
        // One mutation allowed: the write succeeds, the implied flush fails -> IOERR.
        let make = || {
            Arc::new(FaultyBackend::new(
                Arc::new(NullBackend::new(DISK)),
                FaultPlan::writes_after(1, libc::EIO),
            ))
        };
        let cfg_features = {
            let b = NullBackend::new(DISK);
            BlkConfig::new(&BlkOptions::default(), &b)
                .unwrap()
                .features()
        };
        let mut wt = rig_with(
            GuestRam::new(1 << 20),
            make(),
            BlkOptions::default(),
            cfg_features & !feature::FLUSH,
        );
        assert_eq!(wt.write(0, &[1u8; 512]), st(status::IOERR));
        let mut wb = rig_with(
            GuestRam::new(1 << 20),
            make(),
            BlkOptions::default(),
            cfg_features,
        );
        assert_eq!(wb.write(0, &[1u8; 512]), ok(1));
    }

    #[test]
    fn discard_and_write_zeroes_validation() {
        let img = TempImage::new(DISK);
        std::fs::write(&img.0, vec![0xaau8; DISK as usize]).unwrap();
        let mut r = rig(file_backend(&img));
        let max_seg = BlkOptions::default().max_discard_seg;
        let max_sectors = BlkOptions::default().max_discard_sectors;
        assert_eq!(
            r.dwz(
                req_type::WRITE_ZEROES,
                &[(2, 2, 0), (10, 1, DWZ_FLAG_UNMAP)]
            ),
            ok(1)
        );
        let disk = img.contents();
        for (i, &b) in disk[..16 * 512].iter().enumerate() {
            let zero = (1024..2048).contains(&i) || (5120..5632).contains(&i);
            assert_eq!(b, if zero { 0 } else { 0xaa }, "byte {i}");
        }
        assert_eq!(r.dwz(req_type::DISCARD, &[(100, 8, 0)]), ok(1));
        // Flags: unmap is not allowed on discard, unknown bits on neither.
        assert_eq!(
            r.dwz(req_type::DISCARD, &[(0, 1, DWZ_FLAG_UNMAP)]),
            st(status::UNSUPP)
        );
        assert_eq!(
            r.dwz(req_type::WRITE_ZEROES, &[(0, 1, 2)]),
            st(status::UNSUPP)
        );
        // Too many segments, too many sectors, beyond capacity, empty or ragged payload.
        let many: Vec<_> = (0..=max_seg).map(|i| (u64::from(i), 1, 0)).collect();
        assert_eq!(r.dwz(req_type::DISCARD, &many), st(status::UNSUPP));
        assert_eq!(
            r.dwz(req_type::DISCARD, &[(0, max_sectors + 1, 0)]),
            st(status::IOERR)
        );
        assert_eq!(
            r.dwz(req_type::WRITE_ZEROES, &[(DISK / 512, 1, 0)]),
            st(status::IOERR)
        );
        assert_eq!(
            r.dwz(req_type::DISCARD, &[(u64::MAX, 1, 0)]),
            st(status::IOERR)
        );
        assert_eq!(r.dwz(req_type::DISCARD, &[]), st(status::IOERR));
        let h = r.hdr(req_type::DISCARD, 0);
        assert_eq!(
            r.run(&[h, seg(DATA, 15, false)], &[seg(STATUS, 1, true)]),
            st(status::IOERR)
        );
        // A bad range after a good one: nothing is applied (validated first).
        let before = img.contents();
        assert_eq!(
            r.dwz(req_type::WRITE_ZEROES, &[(20, 1, 0), (DISK / 512, 1, 0)]),
            st(status::IOERR)
        );
        assert_eq!(img.contents(), before);
        let s = r.stats.snapshot();
        assert_eq!((s.discards, s.write_zeroes), (1, 1));
    }

    #[test]
    fn discard_not_negotiated_is_unsupp() {
        let b = NullBackend::new(DISK);
        let f = BlkConfig::new(&BlkOptions::default(), &b)
            .unwrap()
            .features();
        let mut r = rig_with(
            GuestRam::new(1 << 20),
            Arc::new(b),
            BlkOptions::default(),
            f & !(feature::DISCARD | feature::WRITE_ZEROES),
        );
        assert_eq!(r.dwz(req_type::DISCARD, &[(0, 1, 0)]), st(status::UNSUPP));
        assert_eq!(
            r.dwz(req_type::WRITE_ZEROES, &[(0, 1, 0)]),
            st(status::UNSUPP)
        );
    }

    #[test]
    fn one_descriptor_larger_than_size_max_is_accepted() {
        // SeaBIOS ignores size_max and puts a whole request in one descriptor.
        let img = TempImage::new(DISK);
        let mut r = rig_with(
            GuestRam::new(4 << 20),
            file_backend(&img),
            BlkOptions {
                size_max: Some(4096),
                seg_max: Some(1),
                ..Default::default()
            },
            u64::MAX,
        );
        let data = pattern(65536, 3);
        assert_eq!(r.write(0, &data), ok(1));
        let (c, back) = r.read(0, 65536);
        assert_eq!(c, ok(65537));
        assert_eq!(back, data);
    }

    #[test]
    fn bad_data_buffers_are_ioerr_before_any_io() {
        let img = TempImage::new(DISK);
        let size = 1 << 20;
        let mut r = rig_with(
            GuestRam::mixed(size),
            file_backend(&img),
            BlkOptions::default(),
            u64::MAX,
        );
        let ro_page = 2 * size as u64;
        // Write from unmapped guest memory: nothing reaches the disk.
        let h = r.hdr(req_type::OUT, 0);
        assert_eq!(
            r.run(
                &[h, seg(DATA, 512, false), seg(1 << 40, 512, false)],
                &[seg(STATUS, 1, true)]
            ),
            st(status::IOERR)
        );
        // Read into a read-only map, mapped-fast-path and mixed forms.
        let h = r.hdr(req_type::IN, 0);
        assert_eq!(
            r.run(&[h], &[seg(ro_page, 512, true), seg(STATUS, 1, true)]),
            st(status::IOERR)
        );
        let h = r.hdr(req_type::IN, 0);
        assert_eq!(
            r.run(
                &[h],
                &[
                    seg(size as u64, 512, true),
                    seg(ro_page, 512, true),
                    seg(STATUS, 1, true)
                ]
            ),
            st(status::IOERR)
        );
        assert!(img.contents().iter().all(|&b| b == 0));
    }

    #[test]
    fn message_backed_and_straddling_buffers_use_the_bounce_path() {
        let img = TempImage::new(4 << 20);
        let size = 1 << 20;
        let mut r = rig_with(
            GuestRam::mixed(size),
            file_backend(&img),
            BlkOptions::default(),
            u64::MAX,
        );
        let msg = size as u64 + 0x1000;
        // 300 KiB: more than one bounce chunk. Half in mapped RAM straddling into message RAM.
        let len = 300 * 1024;
        let data = pattern(len, 11);
        let split = size as u64 - 4096;
        r.ram.mem.write(split, &data[..8192]).unwrap();
        r.ram.mem.write(msg + 0x10000, &data[8192..]).unwrap();
        let h = r.hdr(req_type::OUT, 8);
        let c = r.run(
            &[
                h,
                seg(split, 8192, false),
                seg(msg + 0x10000, (len - 8192) as u32, false),
            ],
            &[seg(STATUS, 1, true)],
        );
        assert_eq!(c, ok(1));
        assert_eq!(&img.contents()[4096..4096 + len], &data[..]);
        // Read it back into message memory, status in message memory too.
        let h = r.hdr(req_type::IN, 8);
        let c = r.run(&[h], &[seg(msg + 0x80000, len as u32 + 1, true)]);
        assert_eq!(c, ok(len as u32 + 1));
        assert_eq!(r.ram.bytes(msg + 0x80000, len), data);
        assert_eq!(r.ram.bytes(msg + 0x80000 + len as u64, 1), [status::OK]);
        assert_eq!(r.stats.snapshot().bounced, 2);
    }
}
