//! The table of DMA regions a client mapped; it owns their host mmaps.
//!
//! Regions are kept sorted by iova and never overlap. A region that came with an fd is
//! mmapped (MAP_SHARED, PROT from its flags) when it is added; the fd itself is kept by the
//! `MmapRegion`. A partial DMA_UNMAP splits a region: the remainders share the same
//! `Arc<MmapRegion>` with an adjusted `map_offset`, and the host mapping goes away when the
//! last piece does.
//!
//! Decision: an unmap range that touches no region succeeds and removes nothing, like the
//! kernel's VFIO type1 IOMMU (which reports an unmapped size of 0). QEMU sends unmaps for
//! sections whose map may have failed; failing those only adds noise.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion};

use crate::device::Errno;
use crate::dma::DmaRegion;
use crate::wire::{dma_flags, DmaMap};

/// Largest single DMA region (8 TiB, as libvfio-user on x86_64).
pub const MAX_DMA_REGION_SIZE: u64 = 1 << 43;

/// Sorted, non-overlapping DMA regions with a size limit.
#[derive(Debug)]
pub struct DmaTable {
    regions: Vec<DmaRegion>,
    max_maps: usize,
}

impl DmaTable {
    pub fn new(max_maps: usize) -> Self {
        Self {
            regions: Vec::new(),
            max_maps,
        }
    }

    pub fn regions(&self) -> &[DmaRegion] {
        &self.regions
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The region containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&DmaRegion> {
        let i = self.regions.partition_point(|r| r.end() <= addr);
        self.regions.get(i).filter(|r| r.iova <= addr)
    }

    /// Validate and add a DMA_MAP request. On any error the fd is closed and the table is
    /// unchanged. Returns a copy of the added region.
    pub fn map(&mut self, req: &DmaMap, fd: Option<OwnedFd>) -> Result<DmaRegion, Errno> {
        let prot = req.flags;
        if prot & !(dma_flags::READ | dma_flags::WRITE) != 0 || prot == 0 {
            log::warn!("DMA_MAP: bad flags {prot:#x}");
            return Err(Errno::EINVAL);
        }
        if req.size == 0 || req.size > MAX_DMA_REGION_SIZE {
            log::warn!("DMA_MAP: bad size {:#x}", req.size);
            return Err(Errno::EINVAL);
        }
        let end = req.address.checked_add(req.size).ok_or(Errno::EINVAL)?;
        let i = self.regions.partition_point(|r| r.end() <= req.address);
        if self.regions.get(i).is_some_and(|r| r.iova < end) {
            log::warn!(
                "DMA_MAP: {:#x}+{:#x} overlaps an existing map",
                req.address,
                req.size
            );
            return Err(Errno::EEXIST);
        }
        if self.regions.len() >= self.max_maps {
            log::warn!("DMA_MAP: table full ({} maps)", self.max_maps);
            return Err(Errno::ENOSPC);
        }
        let mapping = match fd {
            None => None,
            Some(fd) => Some(Arc::new(mmap_fd(fd, req.offset, req.size, prot)?)),
        };
        let region = DmaRegion {
            iova: req.address,
            size: req.size,
            prot,
            mapping,
            map_offset: 0,
        };
        self.regions.insert(i, region.clone());
        Ok(region)
    }

    /// Remove exactly the region starting at `iova` (used to roll back a map the device
    /// refused).
    pub fn remove_at(&mut self, iova: u64) -> Option<DmaRegion> {
        let i = self.regions.iter().position(|r| r.iova == iova)?;
        Some(self.regions.remove(i))
    }

    /// Remove `[addr, addr+size)`: whole regions inside it go, regions straddling its
    /// edges are split and their outside parts kept. Returns the removed pieces.
    pub fn unmap(&mut self, addr: u64, size: u64) -> Result<Vec<DmaRegion>, Errno> {
        if size == 0 {
            return Err(Errno::EINVAL);
        }
        let end = addr.checked_add(size).ok_or(Errno::EINVAL)?;
        let first = self.regions.partition_point(|r| r.end() <= addr);
        let last = first + self.regions[first..].partition_point(|r| r.iova < end);
        if first == last {
            return Ok(Vec::new());
        }
        let mut kept = Vec::new();
        let mut removed = Vec::new();
        for r in &self.regions[first..last] {
            let cut_start = r.iova.max(addr);
            let cut_end = r.end().min(end);
            if r.iova < cut_start {
                kept.push(piece(r, r.iova, cut_start));
            }
            removed.push(piece(r, cut_start, cut_end));
            if cut_end < r.end() {
                kept.push(piece(r, cut_end, r.end()));
            }
        }
        let new_len = self.regions.len() - (last - first) + kept.len();
        if new_len > self.max_maps {
            log::warn!("DMA_UNMAP: split would exceed {} maps", self.max_maps);
            return Err(Errno::ENOSPC);
        }
        self.regions.splice(first..last, kept);
        Ok(removed)
    }

    /// Remove every region.
    pub fn clear(&mut self) -> Vec<DmaRegion> {
        std::mem::take(&mut self.regions)
    }
}

/// The part `[start, end)` of `r` (inside it).
fn piece(r: &DmaRegion, start: u64, end: u64) -> DmaRegion {
    DmaRegion {
        iova: start,
        size: end - start,
        prot: r.prot,
        mapping: r.mapping.clone(),
        map_offset: r.map_offset + (start - r.iova),
    }
}

fn mmap_fd(fd: OwnedFd, offset: u64, size: u64, flags: u32) -> Result<MmapRegion, Errno> {
    let file = File::from(fd);
    let file_end = offset.checked_add(size).ok_or(Errno::EINVAL)?;
    let len = usize::try_from(size).map_err(|_| Errno::EINVAL)?;
    if i64::try_from(file_end).is_err() {
        return Err(Errno::EINVAL);
    }
    let meta = file.metadata().map_err(|e| {
        log::warn!("DMA_MAP: fstat failed: {e}");
        Errno::EINVAL
    })?;
    // Regular files (memfd, hugetlbfs, tmpfs) must cover the range, or accesses past the
    // end would SIGBUS the server.
    if meta.file_type().is_file() && meta.len() < file_end {
        log::warn!(
            "DMA_MAP: fd range {offset:#x}+{size:#x} beyond file size {:#x}",
            meta.len()
        );
        return Err(Errno::EINVAL);
    }
    let mut prot = 0;
    if flags & dma_flags::READ != 0 {
        prot |= libc::PROT_READ;
    }
    if flags & dma_flags::WRITE != 0 {
        prot |= libc::PROT_WRITE;
    }
    MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        len,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|e| {
        log::warn!("DMA_MAP: mmap of {size:#x} bytes at fd offset {offset:#x} failed: {e}");
        Errno::EINVAL
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, RawFd};

    fn memfd(size: u64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"dma", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        nix::unistd::ftruncate(&fd, size as i64).unwrap();
        fd
    }

    fn req(address: u64, size: u64) -> DmaMap {
        DmaMap {
            argsz: 32,
            flags: dma_flags::READ | dma_flags::WRITE,
            offset: 0,
            address,
            size,
        }
    }

    /// Identity of the file behind `fd`, to tell "still open" from "closed, and the number
    /// reused by another test's fd" (tests run in parallel threads).
    fn identity(fd: RawFd) -> Option<(u64, u64)> {
        nix::sys::stat::fstat(fd)
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    }

    /// `fd` no longer refers to the file whose identity was `was`.
    fn closed(fd: RawFd, was: Option<(u64, u64)>) -> bool {
        was.is_some() && identity(fd) != was
    }

    fn spans(t: &DmaTable) -> Vec<(u64, u64, u64)> {
        t.regions()
            .iter()
            .map(|r| (r.iova, r.size, r.map_offset))
            .collect()
    }

    #[test]
    fn map_validation() {
        let mut t = DmaTable::new(3);
        assert_eq!(t.map(&req(0x1000, 0), None).unwrap_err(), Errno::EINVAL);
        assert_eq!(
            t.map(&req(u64::MAX - 10, 0x1000), None).unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            t.map(&req(0, MAX_DMA_REGION_SIZE + 1), None).unwrap_err(),
            Errno::EINVAL
        );
        let mut bad = req(0, 0x1000);
        bad.flags = 0x4;
        assert_eq!(t.map(&bad, None).unwrap_err(), Errno::EINVAL);
        bad.flags = 0;
        assert_eq!(t.map(&bad, None).unwrap_err(), Errno::EINVAL);
        t.map(&req(0x2000, 0x1000), None).unwrap();
        t.map(&req(0x0, 0x1000), None).unwrap();
        // Overlaps: inside, straddling either edge, covering.
        for (a, s) in [
            (0x2800, 0x10),
            (0x1800, 0x1000),
            (0x2fff, 2),
            (0x1000, 0x3000),
        ] {
            assert_eq!(
                t.map(&req(a, s), None).unwrap_err(),
                Errno::EEXIST,
                "{a:#x}"
            );
        }
        // Adjacent is fine.
        t.map(&req(0x1000, 0x1000), None).unwrap();
        assert_eq!(
            t.map(&req(0x9000, 0x1000), None).unwrap_err(),
            Errno::ENOSPC
        );
        assert_eq!(
            spans(&t),
            vec![(0, 0x1000, 0), (0x1000, 0x1000, 0), (0x2000, 0x1000, 0)]
        );
        assert_eq!(t.find(0x1fff).unwrap().iova, 0x1000);
        assert!(t.find(0x3000).is_none());
    }

    #[test]
    fn fd_map_is_usable_and_bad_fd_is_closed() {
        let mut t = DmaTable::new(8);
        let fd = memfd(0x4000);
        let mut r = req(0x10000, 0x2000);
        r.offset = 0x1000;
        let added = t.map(&r, Some(fd)).unwrap();
        let m = added.mapping.as_ref().unwrap();
        assert_eq!(m.size(), 0x2000);
        // Range beyond the file: refused, fd closed.
        let fd = memfd(0x1000);
        let raw = fd.as_raw_fd();
        let was = identity(raw);
        assert_eq!(
            t.map(&req(0x20000, 0x2000), Some(fd)).unwrap_err(),
            Errno::EINVAL
        );
        assert!(closed(raw, was));
        // An fd that cannot be mmapped (a pipe): refused, fd closed.
        let (rd, _wr) = nix::unistd::pipe().unwrap();
        let raw = rd.as_raw_fd();
        let was = identity(raw);
        assert_eq!(
            t.map(&req(0x20000, 0x1000), Some(rd)).unwrap_err(),
            Errno::EINVAL
        );
        assert!(closed(raw, was));
        // Overlap with an fd: fd closed too.
        let fd = memfd(0x2000);
        let raw = fd.as_raw_fd();
        let was = identity(raw);
        assert_eq!(
            t.map(&req(0x10000, 0x1000), Some(fd)).unwrap_err(),
            Errno::EEXIST
        );
        assert!(closed(raw, was));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn unmap_exact_multi_and_nothing() {
        let mut t = DmaTable::new(8);
        for a in [0x0, 0x1000, 0x2000, 0x5000] {
            t.map(&req(a, 0x1000), None).unwrap();
        }
        let removed = t.unmap(0x1000, 0x1000).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].iova, 0x1000);
        // A range covering several whole maps (and a hole).
        let removed = t.unmap(0x2000, 0x4000).unwrap();
        assert_eq!(
            removed.iter().map(|r| r.iova).collect::<Vec<_>>(),
            vec![0x2000, 0x5000]
        );
        assert_eq!(spans(&t), vec![(0, 0x1000, 0)]);
        // Nothing there: success, nothing removed.
        assert!(t.unmap(0x8000, 0x1000).unwrap().is_empty());
        assert_eq!(t.unmap(0, 0).unwrap_err(), Errno::EINVAL);
        assert_eq!(t.unmap(u64::MAX, 2).unwrap_err(), Errno::EINVAL);
        assert_eq!(t.clear().len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn partial_unmap_splits_and_shares_mapping() {
        let mut t = DmaTable::new(8);
        let fd = memfd(0x10000);
        let added = t.map(&req(0x100000, 0x10000), Some(fd)).unwrap();
        let map = added.mapping.clone().unwrap();
        // Write a marker through the original mapping at offset 0x9000.
        // SAFETY: the mapping is 0x10000 bytes long and writable.
        unsafe { map.as_ptr().add(0x9000).write(0xab) };
        let removed = t.unmap(0x104000, 0x4000).unwrap();
        assert_eq!(
            (removed[0].iova, removed[0].size, removed[0].map_offset),
            (0x104000, 0x4000, 0x4000)
        );
        assert_eq!(
            spans(&t),
            vec![(0x100000, 0x4000, 0), (0x108000, 0x8000, 0x8000)]
        );
        let tail = &t.regions()[1];
        assert!(Arc::ptr_eq(tail.mapping.as_ref().unwrap(), &map));
        // The tail still reaches the same memory.
        let off = (0x109000 - tail.iova + tail.map_offset) as usize;
        // SAFETY: off < 0x10000, inside the live mapping.
        assert_eq!(
            unsafe { tail.mapping.as_ref().unwrap().as_ptr().add(off).read() },
            0xab
        );
        // Straddling unmap over the end of the first piece and start of the second.
        let removed = t.unmap(0x103000, 0x6000).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(
            spans(&t),
            vec![(0x100000, 0x3000, 0), (0x109000, 0x7000, 0x9000)]
        );
    }

    #[test]
    fn split_respects_limit() {
        let mut t = DmaTable::new(1);
        t.map(&req(0, 0x3000), None).unwrap();
        assert_eq!(t.unmap(0x1000, 0x1000).unwrap_err(), Errno::ENOSPC);
        assert_eq!(spans(&t), vec![(0, 0x3000, 0)]);
        // Trimming an edge does not grow the table.
        t.unmap(0, 0x1000).unwrap();
        assert_eq!(spans(&t), vec![(0x1000, 0x2000, 0x1000)]);
    }
}
