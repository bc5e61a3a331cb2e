//! The SET_MEM_TABLE we send for a [`GuestMemory`] snapshot.
//!
//! Only file-backed regions can be shared; fd-less (message) memory is left out and
//! reported, and a ring placed there is refused at queue start. Neighbouring regions of the
//! same file at contiguous offsets are merged (QEMU splits guest RAM around ROMs and the
//! legacy hole, and a backend takes at most 8 regions).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;

use emudev::GuestMemory;

use crate::protocol::{MemRegion, MAX_MEM_REGIONS};

/// One merged region and the identity of its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
    /// `(st_dev, st_ino)` of the backing file: the same memory arrives under a new fd
    /// with every DMA map.
    pub file_id: (u64, u64),
    /// An fd of the file, valid while the snapshot it came from is alive.
    pub fd: RawFd,
}

/// Identity of a table: `(gpa, len, file_offset, file_id)` per entry.
pub type TableKey = Vec<(u64, u64, u64, (u64, u64))>;

/// The shareable table of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemTable {
    pub entries: Vec<TableEntry>,
    /// Guest ranges `(gpa, len)` that have no fd and cannot be shared.
    pub unshared: Vec<(u64, u64)>,
}

impl MemTable {
    /// Build the table of `mem`. Regions whose file cannot be examined count as unshared.
    pub fn from_memory(mem: &GuestMemory) -> Self {
        let mut t = MemTable::default();
        for r in mem.sharing_view() {
            let Some((file, off)) = r.file else {
                t.unshared.push((r.gpa, r.len));
                continue;
            };
            let Ok(md) = file.metadata() else {
                t.unshared.push((r.gpa, r.len));
                continue;
            };
            let e = TableEntry {
                gpa: r.gpa,
                len: r.len,
                file_offset: off,
                file_id: (md.dev(), md.ino()),
                fd: file.as_raw_fd(),
            };
            if let Some(last) = t.entries.last_mut() {
                let adjacent = last.gpa.checked_add(last.len) == Some(e.gpa)
                    && last.file_id == e.file_id
                    && last.file_offset.checked_add(last.len) == Some(e.file_offset);
                if adjacent {
                    // Sum of two ranges that are adjacent in a u64 address space.
                    last.len += e.len;
                    continue;
                }
            }
            t.entries.push(e);
        }
        t
    }

    /// The identity of the table, for deciding whether the backend must hear about a
    /// change (fd numbers differ between snapshots of the same memory).
    pub fn key(&self) -> TableKey {
        self.entries
            .iter()
            .map(|e| (e.gpa, e.len, e.file_offset, e.file_id))
            .collect()
    }

    /// SET_MEM_TABLE regions; ring and buffer addresses are guest addresses
    /// (`user_addr == guest_addr`).
    pub fn wire(&self) -> Result<Vec<(MemRegion, RawFd)>, String> {
        if self.entries.len() > MAX_MEM_REGIONS {
            return Err(format!(
                "guest memory has {} shareable regions; a vhost-user backend takes at most \
                 {MAX_MEM_REGIONS}",
                self.entries.len()
            ));
        }
        Ok(self
            .entries
            .iter()
            .map(|e| {
                (
                    MemRegion {
                        guest_addr: e.gpa,
                        size: e.len,
                        user_addr: e.gpa,
                        mmap_offset: e.file_offset,
                    },
                    e.fd,
                )
            })
            .collect())
    }

    /// Whether `[gpa, gpa+len)` lies inside one shared region.
    pub fn covers(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.entries
            .iter()
            .any(|e| e.gpa <= gpa && e.gpa.checked_add(e.len).is_some_and(|x| end <= x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev_vfio_user::DmaRegion;
    use std::sync::Arc;
    use vm_memory::{FileOffset, MmapRegion};

    fn memfd(size: u64) -> std::fs::File {
        let fd = nix::sys::memfd::memfd_create(
            c"vhost-test",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        nix::unistd::ftruncate(&fd, size as i64).unwrap();
        std::fs::File::from(fd)
    }

    fn map(file: &std::fs::File, off: u64, iova: u64, size: u64) -> DmaRegion {
        let f = file.try_clone().unwrap();
        let m = MmapRegion::build(
            Some(FileOffset::new(f, off)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap();
        DmaRegion {
            iova,
            size,
            prot: 3,
            mapping: Some(Arc::new(m)),
            map_offset: 0,
        }
    }

    #[test]
    fn contiguous_pieces_of_one_file_merge_and_message_memory_is_left_out() {
        let ram = memfd(0x40_0000);
        let other = memfd(0x1000);
        let table = vec![
            map(&ram, 0, 0, 0xc_0000),
            DmaRegion {
                iova: 0xc_0000,
                size: 0x4_0000,
                prot: 1,
                mapping: None,
                map_offset: 0,
            },
            map(&ram, 0x10_0000, 0x10_0000, 0x10_0000),
            map(&ram, 0x20_0000, 0x20_0000, 0x20_0000),
            map(&other, 0, 0x40_0000, 0x1000),
        ];
        let mem = GuestMemory::from_dma(&table, None);
        let t = MemTable::from_memory(&mem);
        let spans: Vec<_> = t
            .entries
            .iter()
            .map(|e| (e.gpa, e.len, e.file_offset))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, 0xc_0000, 0),
                (0x10_0000, 0x30_0000, 0x10_0000),
                (0x40_0000, 0x1000, 0)
            ]
        );
        assert_eq!(t.unshared, vec![(0xc_0000, 0x4_0000)]);
        assert!(t.covers(0x10_0000, 0x30_0000));
        assert!(!t.covers(0xb_f000, 0x2000));
        assert!(!t.covers(u64::MAX, 2));
        let w = t.wire().unwrap();
        assert_eq!(w[1].0.user_addr, 0x10_0000);
        assert_eq!(w[1].0.mmap_offset, 0x10_0000);
    }

    #[test]
    fn same_memory_under_new_fds_has_the_same_key() {
        let ram = memfd(0x10_0000);
        let a = GuestMemory::from_dma(&[map(&ram, 0, 0, 0x10_0000)], None);
        let b = GuestMemory::from_dma(&[map(&ram, 0, 0, 0x10_0000)], None);
        let (ta, tb) = (MemTable::from_memory(&a), MemTable::from_memory(&b));
        assert_ne!(ta.entries[0].fd, tb.entries[0].fd);
        assert_eq!(ta.key(), tb.key());
        let c = GuestMemory::from_dma(&[map(&ram, 0, 0, 0x8_0000)], None);
        assert_ne!(ta.key(), MemTable::from_memory(&c).key());
    }

    #[test]
    fn too_many_regions_are_refused() {
        let files: Vec<_> = (0..9).map(|_| memfd(0x1000)).collect();
        let table: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, f)| map(f, 0, i as u64 * 0x2000, 0x1000))
            .collect();
        let t = MemTable::from_memory(&GuestMemory::from_dma(&table, None));
        assert_eq!(t.entries.len(), 9);
        assert!(t.wire().unwrap_err().contains("at most 8"));
    }
}
