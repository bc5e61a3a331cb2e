//! Guest memory built from the client's DMA maps.
//!
//! A [`GuestMemory`] is an immutable snapshot of the DMA table: fd-backed regions are reached
//! through their mmap (vm-memory `MmapRegion`), fd-less regions through DMA_READ/DMA_WRITE
//! messages on a [`DmaPort`]. Every access is bounds-checked against the regions, honours the
//! map's protection (a device never writes a read-only map), and may span several regions.
//!
//! Users hold an `Arc<GuestMemory>` between quiesce points. When the client unmaps memory, the
//! device layer quiesces every user, swaps in a new snapshot and only then lets the unmap
//! reply go out, so no user touches memory after its unmap.

use std::sync::Arc;

use emudev_vfio_user::{DmaError, DmaPort, DmaRegion};
use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// End of the x86 legacy first MiB (real-mode memory, boot sectors, option ROMs). The
/// vfio-user transport writes guest memory below it by messages, see
/// [`GuestMemory::from_dma_messages_below`].
pub const LEGACY_LOW_MEM_END: u64 = 0x10_0000;

/// Why a guest-memory access failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    #[error("guest range {gpa:#x}+{len:#x} is not inside any DMA map")]
    Unmapped { gpa: u64, len: u64 },
    #[error("guest range {gpa:#x}+{len:#x} overflows the address space")]
    Overflow { gpa: u64, len: u64 },
    #[error("guest range {gpa:#x}+{len:#x} is mapped read-only")]
    ReadOnly { gpa: u64, len: u64 },
    #[error("guest range {gpa:#x}+{len:#x} is mapped write-only")]
    WriteOnly { gpa: u64, len: u64 },
    #[error("guest range {gpa:#x}+{len:#x} has no host mapping (reached by messages only)")]
    NotMappable { gpa: u64, len: u64 },
    #[error("guest range {gpa:#x}+{len:#x} spans several DMA maps")]
    Discontiguous { gpa: u64, len: u64 },
    #[error("DMA by message failed: {0}")]
    Dma(#[from] DmaError),
}

/// What an access does to guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

#[derive(Debug, Clone)]
enum Backing {
    /// Host mapping plus the offset of the region start inside it.
    Mapped {
        mapping: Arc<MmapRegion>,
        offset: usize,
    },
    /// Reached through DMA_READ / DMA_WRITE messages.
    Message,
}

#[derive(Debug, Clone)]
struct GuestRegion {
    start: u64,
    /// Length, > 0; `start + len` does not overflow.
    len: u64,
    readable: bool,
    writable: bool,
    backing: Backing,
    /// Device writes go out as DMA_WRITE messages even though the region is mapped (reads
    /// still use the mapping); see [`GuestMemory::from_dma_messages_below`].
    write_by_message: bool,
}

impl GuestRegion {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// One region of [`GuestMemory::sharing_view`].
#[derive(Debug, Clone, Copy)]
pub struct ShareableRegion<'a> {
    pub gpa: u64,
    pub len: u64,
    pub writable: bool,
    /// The backing file and the offset of `gpa` in it; `None` when the region cannot be
    /// shared by fd.
    pub file: Option<(&'a std::fs::File, u64)>,
}

/// An immutable snapshot of guest memory.
#[derive(Debug, Default)]
pub struct GuestMemory {
    /// Sorted by `start`, non-overlapping.
    regions: Vec<GuestRegion>,
    port: Option<DmaPort>,
}

impl GuestMemory {
    /// Memory with no regions: every access fails.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Build a snapshot from a DMA table. Regions that overlap an earlier one, are empty,
    /// overflow, or whose mapping is smaller than claimed are left out (the protocol table
    /// already rejects those; this keeps the snapshot sound on its own).
    pub fn from_dma(table: &[DmaRegion], port: Option<DmaPort>) -> Self {
        Self::from_dma_messages_below(table, port, 0)
    }

    /// Like [`GuestMemory::from_dma`], but with a port, device writes to fd-backed memory
    /// below `message_below` go out as DMA_WRITE messages instead of through our mmap
    /// (reads still use the mmap: they need no one's attention).
    ///
    /// Why (issue 11, firmware boot under TCG): QEMU's TCG drops translated code only for
    /// pages it sees written, and a write through our own mapping of the shared memfd is
    /// invisible to it. Boot code loads code over code it already ran below 1 MiB (SeaBIOS
    /// reads the MBR to 0x7c00, the MBR then reads the partition's boot sector to 0x7c00),
    /// so an mmap write there leaves the vCPU running the stale translation. A DMA_WRITE is
    /// done by QEMU itself, which invalidates it. Linux keeps its first MiB out of use, so
    /// this costs nothing after boot.
    pub fn from_dma_messages_below(
        table: &[DmaRegion],
        port: Option<DmaPort>,
        message_below: u64,
    ) -> Self {
        let message_below = if port.is_some() { message_below } else { 0 };
        let mut regions: Vec<GuestRegion> = Vec::with_capacity(table.len());
        let mut sorted: Vec<&DmaRegion> = table.iter().collect();
        sorted.sort_by_key(|r| r.iova);
        for r in sorted {
            let Some(end) = r.iova.checked_add(r.size) else {
                continue;
            };
            if r.size == 0 || regions.last().is_some_and(|p| p.end() > r.iova) {
                continue;
            }
            let backing = match &r.mapping {
                Some(m) => {
                    let Ok(offset) = usize::try_from(r.map_offset) else {
                        continue;
                    };
                    let fits = usize::try_from(r.size)
                        .ok()
                        .and_then(|s| offset.checked_add(s))
                        .is_some_and(|e| e <= m.size());
                    if !fits {
                        continue;
                    }
                    Backing::Mapped {
                        mapping: m.clone(),
                        offset,
                    }
                }
                None => Backing::Message,
            };
            let (readable, writable) = (r.readable(), r.writable());
            let mapped = matches!(backing, Backing::Mapped { .. });
            if r.iova < message_below && end > message_below && mapped {
                // Straddles the limit: the low part writes by message, the rest as usual.
                let cut = message_below;
                let Backing::Mapped { mapping, offset } = backing else {
                    continue;
                };
                regions.push(GuestRegion {
                    start: r.iova,
                    len: cut - r.iova,
                    readable,
                    writable,
                    backing: Backing::Mapped {
                        mapping: mapping.clone(),
                        offset,
                    },
                    write_by_message: true,
                });
                regions.push(GuestRegion {
                    start: cut,
                    len: end - cut,
                    readable,
                    writable,
                    // cut - iova < size, and `offset + size` fits (checked above).
                    backing: Backing::Mapped {
                        mapping,
                        offset: offset + (cut - r.iova) as usize,
                    },
                    write_by_message: false,
                });
                continue;
            }
            regions.push(GuestRegion {
                start: r.iova,
                len: end - r.iova,
                readable,
                writable,
                backing,
                write_by_message: mapped && r.iova < message_below,
            });
        }
        Self { regions, port }
    }

    /// Number of regions in the snapshot.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// True when every region has a host mapping (no message DMA needed).
    pub fn all_mapped(&self) -> bool {
        self.regions
            .iter()
            .all(|r| matches!(r.backing, Backing::Mapped { .. }) && !r.write_by_message)
    }

    /// The snapshot as seen by another process that maps the same files (vhost-user
    /// SET_MEM_TABLE): each region is either file-backed, with the file and the offset of
    /// the region's start in it, or not shareable (fd-less message memory, anonymous maps).
    /// Sorted by guest address. (Added for the vhost-user bridge, issue 10.)
    pub fn sharing_view(&self) -> Vec<ShareableRegion<'_>> {
        self.regions
            .iter()
            .map(|r| {
                let file = match &r.backing {
                    Backing::Mapped { mapping, offset } => {
                        mapping.file_offset().and_then(|fo| {
                            // `offset` fits the mapping (checked in the constructor).
                            fo.start()
                                .checked_add(*offset as u64)
                                .map(|o| (fo.file(), o))
                        })
                    }
                    Backing::Message => None,
                };
                ShareableRegion {
                    gpa: r.start,
                    len: r.len,
                    writable: r.writable,
                    file,
                }
            })
            .collect()
    }

    #[inline(always)]
    fn find(&self, gpa: u64) -> Option<&GuestRegion> {
        let idx = self.regions.partition_point(|r| r.end() <= gpa);
        self.regions.get(idx).filter(|r| r.start <= gpa)
    }

    fn check_access(r: &GuestRegion, access: Access, gpa: u64, len: u64) -> Result<(), MemError> {
        match access {
            Access::Read if !r.readable => Err(MemError::WriteOnly { gpa, len }),
            Access::Write if !r.writable => Err(MemError::ReadOnly { gpa, len }),
            _ => Ok(()),
        }
    }

    /// Walk `[gpa, gpa+len)` region by region, checking protection for every piece before any
    /// byte moves, then call `f(region, offset_in_region, range_in_buffer)` for each piece.
    fn for_each_piece(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        mut f: impl FnMut(&GuestRegion, u64, std::ops::Range<usize>) -> Result<(), MemError>,
    ) -> Result<(), MemError> {
        let len64 = len as u64;
        let end = gpa
            .checked_add(len64)
            .ok_or(MemError::Overflow { gpa, len: len64 })?;
        // First pass: coverage and protection, so a failing access moves no byte.
        let mut pieces: [(usize, u64, usize, usize); 4] = [(0, 0, 0, 0); 4];
        let mut spill: Vec<(usize, u64, usize, usize)> = Vec::new();
        let mut count = 0usize;
        let mut cur = gpa;
        let mut idx = self.regions.partition_point(|r| r.end() <= gpa);
        while cur < end {
            let r = self
                .regions
                .get(idx)
                .filter(|r| r.start <= cur)
                .ok_or(MemError::Unmapped { gpa, len: len64 })?;
            Self::check_access(r, access, gpa, len64)?;
            let piece_end = end.min(r.end());
            let piece = (
                idx,
                cur - r.start,
                (cur - gpa) as usize,
                (piece_end - gpa) as usize,
            );
            if count < pieces.len() {
                pieces[count] = piece;
            } else {
                spill.push(piece);
            }
            count += 1;
            cur = piece_end;
            idx += 1;
        }
        for &(idx, off, b0, b1) in pieces.iter().take(count.min(4)).chain(spill.iter()) {
            f(&self.regions[idx], off, b0..b1)?;
        }
        Ok(())
    }

    fn port(&self) -> Result<&DmaPort, MemError> {
        self.port
            .as_ref()
            .ok_or(MemError::Dma(DmaError::Disconnected))
    }

    /// Host address of `[gpa, gpa+len)` when it lies inside one mapped region that allows
    /// `access` through the mapping (`by_message_ok`: ignore `write_by_message`). `None` for
    /// everything else, which the general path then handles (or refuses) in full: pieces,
    /// message-backed memory, protection errors, out-of-range addresses.
    #[inline(always)]
    fn host_range(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        by_message_ok: bool,
    ) -> Option<*mut u8> {
        let end = gpa.checked_add(len as u64)?;
        let r = self.find(gpa)?;
        if end > r.end() {
            return None;
        }
        let allowed = match access {
            Access::Read => r.readable,
            Access::Write => r.writable && (by_message_ok || !r.write_by_message),
        };
        match &r.backing {
            Backing::Mapped { mapping, offset } if allowed => {
                // `offset + r.len <= mapping.size()` (checked when the snapshot was built) and
                // `gpa - r.start + len <= r.len` (checked above), so this stays in the mapping.
                let at = offset + (gpa - r.start) as usize;
                Some(mapping.as_ptr().wrapping_add(at))
            }
            _ => None,
        }
    }

    /// Copy guest memory at `gpa` into `buf`.
    #[inline]
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        // Fast path: one mapped region (headers, small objects).
        if let Some(src) = self.host_range(gpa, buf.len(), Access::Read, false) {
            // SAFETY: `host_range` returned a pointer to `buf.len()` bytes inside a live
            // mapping that this snapshot keeps alive (`&self`); `buf` is a distinct host buffer.
            unsafe { copy_from_guest(src, buf) };
            return Ok(());
        }
        self.read_slow(gpa, buf)
    }

    #[inline(never)]
    fn read_slow(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.for_each_piece(gpa, buf.len(), Access::Read, |r, off, range| {
            let dst = &mut buf[range];
            match &r.backing {
                Backing::Mapped { mapping, offset } => {
                    let vs = mapped_slice(mapping, *offset, off, dst.len())?;
                    vs.copy_to(dst);
                    Ok(())
                }
                Backing::Message => Ok(self.port()?.read(r.start + off, dst)?),
            }
        })
    }

    /// Copy `data` into guest memory at `gpa`.
    #[inline]
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        if let Some(dst) = self.host_range(gpa, data.len(), Access::Write, false) {
            // SAFETY: as in `read`: `data.len()` bytes inside a live, writable mapping.
            unsafe { copy_to_guest(dst, data) };
            return Ok(());
        }
        self.write_slow(gpa, data)
    }

    #[inline(never)]
    fn write_slow(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.for_each_piece(gpa, data.len(), Access::Write, |r, off, range| {
            let src = &data[range];
            match &r.backing {
                Backing::Mapped { .. } if r.write_by_message => {
                    Ok(self.port()?.write(r.start + off, src)?)
                }
                Backing::Mapped { mapping, offset } => {
                    let vs = mapped_slice(mapping, *offset, off, src.len())?;
                    vs.copy_from(src);
                    Ok(())
                }
                Backing::Message => Ok(self.port()?.write(r.start + off, src)?),
            }
        })
    }

    /// Like [`GuestMemory::write`], but mapped memory is written through the mapping even
    /// where device writes normally go by message for TCG's sake (`from_dma_messages_below`).
    /// Only for small fields that are never code, such as a virtio-blk status byte written
    /// after its data: it saves a DMA_WRITE round trip per request during firmware boot.
    #[inline]
    pub fn write_not_code(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        if let Some(dst) = self.host_range(gpa, data.len(), Access::Write, true) {
            // SAFETY: as in `write`.
            unsafe { copy_to_guest(dst, data) };
            return Ok(());
        }
        self.write_not_code_slow(gpa, data)
    }

    #[inline(never)]
    fn write_not_code_slow(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.for_each_piece(gpa, data.len(), Access::Write, |r, off, range| {
            let src = &data[range];
            match &r.backing {
                Backing::Mapped { mapping, offset } => {
                    let vs = mapped_slice(mapping, *offset, off, src.len())?;
                    vs.copy_from(src);
                    Ok(())
                }
                Backing::Message => Ok(self.port()?.write(r.start + off, src)?),
            }
        })
    }

    /// Read a plain-data object.
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, gpa: u64) -> Result<T, MemError> {
        let mut v = T::new_zeroed();
        self.read(gpa, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Write a plain-data object.
    pub fn write_obj<T: IntoBytes + Immutable>(&self, gpa: u64, v: &T) -> Result<(), MemError> {
        self.write(gpa, v.as_bytes())
    }

    /// A host view of `[gpa, gpa+len)`, which must lie inside one fd-backed region that allows
    /// `access`. This is the fast path: rings and data buffers are translated once, then
    /// accessed directly. Message-backed memory gives `NotMappable`; use `read`/`write`.
    #[inline]
    pub fn slice(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
    ) -> Result<VolatileSlice<'_>, MemError> {
        if let Some(p) = self.host_range(gpa, len, access, false) {
            // SAFETY: `host_range` checked that `len` bytes at `p` lie in one live mapping that
            // allows `access`; the slice borrows `self`, which keeps the mapping alive.
            return Ok(unsafe { VolatileSlice::new(p, len) });
        }
        self.slice_slow(gpa, len, access)
    }

    #[inline(never)]
    fn slice_slow(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
    ) -> Result<VolatileSlice<'_>, MemError> {
        let len64 = len as u64;
        let end = gpa
            .checked_add(len64)
            .ok_or(MemError::Overflow { gpa, len: len64 })?;
        let r = self
            .find(gpa)
            .ok_or(MemError::Unmapped { gpa, len: len64 })?;
        if end > r.end() {
            return if self.find(r.end()).is_some_and(|n| n.start == r.end()) {
                Err(MemError::Discontiguous { gpa, len: len64 })
            } else {
                Err(MemError::Unmapped { gpa, len: len64 })
            };
        }
        Self::check_access(r, access, gpa, len64)?;
        match &r.backing {
            Backing::Mapped { .. } if r.write_by_message && access == Access::Write => {
                Err(MemError::NotMappable { gpa, len: len64 })
            }
            Backing::Mapped { mapping, offset } => {
                mapped_slice(mapping, *offset, gpa - r.start, len)
            }
            Backing::Message => Err(MemError::NotMappable { gpa, len: len64 }),
        }
    }

    /// True when `[gpa, gpa+len)` is entirely covered by regions allowing `access`.
    pub fn check_range(&self, gpa: u64, len: u64, access: Access) -> bool {
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        self.for_each_piece(gpa, len, access, |_, _, _| Ok(()))
            .is_ok()
    }
}

/// Copy guest bytes at `src` into `dst`, the way vm-memory does: short copies with volatile
/// loads (the guest may write concurrently), longer ones with `memcpy`.
///
/// # Safety
/// `src..src + dst.len()` must be readable memory of a live mapping, not overlapping `dst`.
#[inline(always)]
unsafe fn copy_from_guest(src: *const u8, dst: &mut [u8]) {
    if dst.len() <= 8 {
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: `i < dst.len()`, inside the source range (caller's contract).
            *b = unsafe { src.add(i).read_volatile() };
        }
    } else {
        // SAFETY: both ranges are valid for `dst.len()` bytes and disjoint (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
    }
}

/// Copy `src` to guest bytes at `dst`; see [`copy_from_guest`].
///
/// # Safety
/// `dst..dst + src.len()` must be writable memory of a live mapping, not overlapping `src`.
#[inline(always)]
unsafe fn copy_to_guest(dst: *mut u8, src: &[u8]) {
    if src.len() <= 8 {
        for (i, b) in src.iter().enumerate() {
            // SAFETY: `i < src.len()`, inside the destination range (caller's contract).
            unsafe { dst.add(i).write_volatile(*b) };
        }
    } else {
        // SAFETY: both ranges are valid for `src.len()` bytes and disjoint (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }
}

/// View `len` bytes at `off` inside a region that starts `base` bytes into `mapping`.
fn mapped_slice(
    mapping: &MmapRegion,
    base: usize,
    off: u64,
    len: usize,
) -> Result<VolatileSlice<'_>, MemError> {
    let err = MemError::Unmapped {
        gpa: off,
        len: len as u64,
    };
    let start = usize::try_from(off)
        .ok()
        .and_then(|o| o.checked_add(base))
        .ok_or(err.clone())?;
    mapping.get_slice(start, len).map_err(|_| err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev_vfio_user::wire::dma_flags;
    use emudev_vfio_user::DmaTransport;
    use std::sync::Mutex;

    fn anon(size: usize) -> Arc<MmapRegion> {
        Arc::new(MmapRegion::new(size).unwrap())
    }

    fn mapped(iova: u64, size: u64, prot: u32, m: &Arc<MmapRegion>, off: u64) -> DmaRegion {
        DmaRegion {
            iova,
            size,
            prot,
            mapping: Some(m.clone()),
            map_offset: off,
        }
    }

    /// A client memory reached by messages, recording every transfer.
    struct FakePort {
        mem: Mutex<Vec<u8>>,
        base: u64,
        log: Mutex<Vec<(bool, u64, usize)>>,
    }
    impl DmaTransport for FakePort {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            self.log.lock().unwrap().push((false, addr, buf.len()));
            let m = self.mem.lock().unwrap();
            let o = (addr - self.base) as usize;
            buf.copy_from_slice(&m[o..o + buf.len()]);
            Ok(())
        }
        fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
            self.log.lock().unwrap().push((true, addr, data.len()));
            let mut m = self.mem.lock().unwrap();
            let o = (addr - self.base) as usize;
            m[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    const RW: u32 = dma_flags::READ | dma_flags::WRITE;

    #[test]
    fn read_write_within_and_across_regions() {
        let a = anon(0x2000);
        let b = anon(0x1000);
        let mem = GuestMemory::from_dma(
            &[
                mapped(0x1000, 0x2000, RW, &a, 0),
                mapped(0x3000, 0x1000, RW, &b, 0),
            ],
            None,
        );
        let data: Vec<u8> = (0..64u8).collect();
        // Straddles the boundary between the two regions at 0x3000.
        mem.write(0x3000 - 32, &data).unwrap();
        let mut back = [0u8; 64];
        mem.read(0x3000 - 32, &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
        // The second half really landed in region b at offset 0.
        let mut b0 = [0u8; 32];
        b.get_slice(0, 32).unwrap().copy_to(&mut b0[..]);
        assert_eq!(&b0[..], &data[32..]);
        // slice() refuses to span regions.
        assert!(matches!(
            mem.slice(0x3000 - 32, 64, Access::Read),
            Err(MemError::Discontiguous { .. })
        ));
    }

    #[test]
    fn out_of_bounds_and_overflow_are_refused_without_side_effects() {
        let a = anon(0x1000);
        let mem = GuestMemory::from_dma(&[mapped(0x1000, 0x1000, RW, &a, 0)], None);
        assert!(matches!(
            mem.read(0x0fff, &mut [0u8; 2]),
            Err(MemError::Unmapped { .. })
        ));
        assert!(matches!(
            mem.write(0x1fff, &[1u8, 2]),
            Err(MemError::Unmapped { .. })
        ));
        assert!(matches!(
            mem.read(u64::MAX - 1, &mut [0u8; 4]),
            Err(MemError::Overflow { .. })
        ));
        // The failed straddling write must not have written its first byte.
        let mut last = [0u8; 1];
        mem.read(0x1fff, &mut last).unwrap();
        assert_eq!(last[0], 0);
    }

    #[test]
    fn read_only_maps_refuse_device_writes() {
        let a = anon(0x1000);
        let mem = GuestMemory::from_dma(&[mapped(0x0, 0x1000, dma_flags::READ, &a, 0)], None);
        assert!(matches!(
            mem.write(0x10, &[1]),
            Err(MemError::ReadOnly { .. })
        ));
        assert!(matches!(
            mem.slice(0x10, 1, Access::Write),
            Err(MemError::ReadOnly { .. })
        ));
        assert!(mem.slice(0x10, 1, Access::Read).is_ok());
    }

    #[test]
    fn split_pieces_share_one_mapping_with_offsets() {
        let a = anon(0x3000);
        // A region split in two by a partial unmap of its middle page.
        let mem = GuestMemory::from_dma(
            &[
                mapped(0x10000, 0x1000, RW, &a, 0),
                mapped(0x12000, 0x1000, RW, &a, 0x2000),
            ],
            None,
        );
        mem.write(0x12000, &[0xab]).unwrap();
        let mut v = [0u8];
        a.get_slice(0x2000, 1).unwrap().copy_to(&mut v[..]);
        assert_eq!(v[0], 0xab);
        assert!(mem.read(0x11000, &mut [0u8]).is_err());
    }

    #[test]
    fn message_backed_regions_go_through_the_port_in_pieces() {
        let a = anon(0x1000);
        let port = Arc::new(FakePort {
            mem: Mutex::new(vec![0; 0x1000]),
            base: 0x2000,
            log: Mutex::new(Vec::new()),
        });
        let table = [
            mapped(0x1000, 0x1000, RW, &a, 0),
            DmaRegion {
                iova: 0x2000,
                size: 0x1000,
                prot: RW,
                mapping: None,
                map_offset: 0,
            },
        ];
        let mem = GuestMemory::from_dma(&table, Some(DmaPort::new(port.clone())));
        assert!(!mem.all_mapped());
        mem.write(0x1ff0, &[7u8; 32]).unwrap();
        assert_eq!(port.log.lock().unwrap().as_slice(), &[(true, 0x2000, 16)]);
        assert_eq!(&port.mem.lock().unwrap()[..16], &[7u8; 16]);
        let mut back = [0u8; 32];
        mem.read(0x1ff0, &mut back).unwrap();
        assert_eq!(back, [7u8; 32]);
        assert!(matches!(
            mem.slice(0x2000, 16, Access::Read),
            Err(MemError::NotMappable { .. })
        ));
        // Without a port, message-backed memory is unreachable.
        let mem = GuestMemory::from_dma(&table, None);
        assert!(matches!(
            mem.read(0x2000, &mut [0u8; 4]),
            Err(MemError::Dma(DmaError::Disconnected))
        ));
    }

    #[test]
    fn low_memory_goes_through_messages_when_asked() {
        use vm_memory::Bytes;
        let a = anon(0x3000);
        a.as_volatile_slice().write_obj(0x55u8, 0x2000).unwrap();
        let port = Arc::new(FakePort {
            mem: Mutex::new(vec![0; 0x2000]),
            base: 0,
            log: Mutex::new(Vec::new()),
        });
        // One map straddling the limit at 0x2000: writes to [0, 0x2000) by message, the
        // rest through the mapping at the right offset; reads always through the mapping.
        let table = [mapped(0x0, 0x3000, RW, &a, 0)];
        let mem =
            GuestMemory::from_dma_messages_below(&table, Some(DmaPort::new(port.clone())), 0x2000);
        assert_eq!(mem.region_count(), 2);
        mem.write(0x1ffe, &[9u8; 4]).unwrap();
        assert_eq!(port.log.lock().unwrap().as_slice(), &[(true, 0x1ffe, 2)]);
        assert_eq!(a.as_volatile_slice().read_obj::<u8>(0x1ffe).unwrap(), 0);
        assert_eq!(
            a.as_volatile_slice().read_obj::<u16>(0x2000).unwrap(),
            0x0909
        );
        let mut back = [0xffu8; 4];
        mem.read(0x1ffe, &mut back).unwrap();
        assert_eq!(back, [0, 0, 9, 9], "reads come from the mapping");
        assert_eq!(
            port.log.lock().unwrap().len(),
            1,
            "no read went to the port"
        );
        assert!(matches!(
            mem.slice(0x1000, 16, Access::Write),
            Err(MemError::NotMappable { .. })
        ));
        assert!(mem.slice(0x1000, 16, Access::Read).is_ok());
        // write_not_code goes through the mapping even there.
        mem.write_not_code(0x1000, &[5u8]).unwrap();
        assert_eq!(a.as_volatile_slice().read_obj::<u8>(0x1000).unwrap(), 5);
        assert_eq!(port.log.lock().unwrap().len(), 1);
        assert!(mem.slice(0x2800, 16, Access::Write).is_ok());
        assert!(!mem.all_mapped());
        // Without a port nothing changes: everything stays mapped.
        let mem = GuestMemory::from_dma_messages_below(&table, None, 0x2000);
        assert!(mem.all_mapped());
        assert_eq!(mem.region_count(), 1);
    }

    /// Accesses that fit in one region take the direct path; it must still honour message
    /// backing, write-by-message, protection and the region's offset in its mapping.
    #[test]
    fn accesses_inside_one_region_keep_every_rule() {
        use vm_memory::Bytes;
        let a = anon(0x4000);
        let port = Arc::new(FakePort {
            mem: Mutex::new(vec![0; 0x9000]),
            base: 0,
            log: Mutex::new(Vec::new()),
        });
        let table = [
            // Write-by-message below 0x2000, mapped at offset 0x1000 of `a`.
            mapped(0x1000, 0x2000, RW, &a, 0x1000),
            mapped(0x4000, 0x1000, dma_flags::READ, &a, 0),
            DmaRegion {
                iova: 0x8000,
                size: 0x1000,
                prot: RW,
                mapping: None,
                map_offset: 0,
            },
        ];
        let mem =
            GuestMemory::from_dma_messages_below(&table, Some(DmaPort::new(port.clone())), 0x2000);
        let hdr: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        // Mapped, direct: lands at mapping offset 0x1000 + (0x2100 - 0x1000).
        mem.write(0x2100, &hdr).unwrap();
        let mut back = [0u8; 16];
        a.get_slice(0x2100, 16).unwrap().copy_to(&mut back[..]);
        assert_eq!(back, hdr);
        let mut r = [0u8; 16];
        mem.read(0x2100, &mut r).unwrap();
        assert_eq!(r, hdr);
        // 1 byte below the message limit: by message for `write`, direct for write_not_code.
        mem.write(0x1800, &[0xaa]).unwrap();
        assert_eq!(port.log.lock().unwrap().as_slice(), &[(true, 0x1800, 1)]);
        assert_eq!(a.as_volatile_slice().read_obj::<u8>(0x1800).unwrap(), 0);
        mem.write_not_code(0x1801, &[0xbb]).unwrap();
        assert_eq!(a.as_volatile_slice().read_obj::<u8>(0x1801).unwrap(), 0xbb);
        assert_eq!(port.log.lock().unwrap().len(), 1);
        // Read-only: refused, nothing written, even for one byte.
        assert!(matches!(
            mem.write(0x4010, &[1]),
            Err(MemError::ReadOnly { .. })
        ));
        assert!(matches!(
            mem.write_not_code(0x4010, &[1]),
            Err(MemError::ReadOnly { .. })
        ));
        assert_eq!(a.as_volatile_slice().read_obj::<u8>(0x10).unwrap(), 0);
        // Message-backed: every access inside it goes to the port.
        mem.write(0x8010, &hdr).unwrap();
        mem.read(0x8010, &mut r).unwrap();
        assert_eq!(r, hdr);
        assert_eq!(
            &port.log.lock().unwrap()[1..],
            &[(true, 0x8010, 16), (false, 0x8010, 16)]
        );
        // slice() of the same kinds.
        let vs = mem.slice(0x2100, 16, Access::Read).unwrap();
        let mut via = [0u8; 16];
        vs.copy_to(&mut via[..]);
        assert_eq!(via, hdr);
        assert!(matches!(
            mem.slice(0x8010, 16, Access::Read),
            Err(MemError::NotMappable { .. })
        ));
        assert!(matches!(
            mem.slice(0x1800, 1, Access::Write),
            Err(MemError::NotMappable { .. })
        ));
        // Ends exactly at a region end: fine; one byte more: unmapped (0x5000 has no map).
        mem.read(0x5000 - 16, &mut r).unwrap();
        assert!(matches!(
            mem.read(0x5000 - 15, &mut r),
            Err(MemError::Unmapped { .. })
        ));
    }

    #[test]
    fn bogus_tables_are_sanitised() {
        let a = anon(0x1000);
        let mem = GuestMemory::from_dma(
            &[
                mapped(0x0, 0x1000, RW, &a, 0),
                mapped(0x800, 0x1000, RW, &a, 0),      // overlaps
                mapped(0x4000, 0x2000, RW, &a, 0),     // larger than its mapping
                mapped(u64::MAX - 10, 100, RW, &a, 0), // overflows
            ],
            None,
        );
        assert_eq!(mem.region_count(), 1);
    }
}
