//! virtio-blk request wire format and the split of a descriptor chain into header, data and
//! status byte.
//!
//! A request is `virtio_blk_outhdr` (16 bytes, device-readable), then data (readable for
//! writes, writable for reads), then one writable status byte: the LAST writable byte of the
//! chain. The header may share a descriptor with data, and data may span any number of
//! descriptors; this module only looks at byte positions.

use emudev::GuestMemory;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Request types (`virtio_blk_outhdr.type`).
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    /// Legacy synonym of FLUSH.
    pub const FLUSH_OUT: u32 = 5;
    pub const GET_ID: u32 = 8;
    pub const GET_LIFETIME: u32 = 10;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
    pub const SECURE_ERASE: u32 = 14;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// `virtio_blk_outhdr`.
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VirtioBlkOutHdr {
    pub type_: U32,
    pub ioprio: U32,
    /// Offset in 512-byte sectors.
    pub sector: U64,
}

/// `virtio_blk_discard_write_zeroes`: one DISCARD / WRITE_ZEROES range.
#[repr(C)]
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
pub struct VirtioBlkDiscardWriteZeroes {
    pub sector: U64,
    pub num_sectors: U32,
    pub flags: U32,
}

/// `flags` bit of [`VirtioBlkDiscardWriteZeroes`]: WRITE_ZEROES may deallocate.
pub const DWZ_FLAG_UNMAP: u32 = 1;

/// Size of [`VirtioBlkOutHdr`].
pub const OUTHDR_LEN: usize = 16;
/// Size of [`VirtioBlkDiscardWriteZeroes`].
pub const DWZ_LEN: usize = 16;

const _: () = assert!(core::mem::size_of::<VirtioBlkOutHdr>() == OUTHDR_LEN);
const _: () = assert!(core::mem::size_of::<VirtioBlkDiscardWriteZeroes>() == DWZ_LEN);

/// One guest buffer (a descriptor): the vring core's segment type, used as is so a popped
/// chain's `readable()` / `writable()` slices feed the engine without copying.
pub use emudev_virtio::queue::Segment;

/// A segment (the `writable` flag is informational for the engine).
pub const fn seg(addr: u64, len: u32, writable: bool) -> Segment {
    Segment {
        addr,
        len,
        writable,
    }
}

/// Why a chain cannot carry a virtio-blk request at all (no status can be reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("status byte address overflows")]
    StatusOverflow,
    #[error("request header shorter than 16 bytes ({0})")]
    ShortHeader(u64),
    #[error("request header is not readable guest memory")]
    HeaderUnreadable,
    #[error("status byte is not writable guest memory")]
    StatusUnwritable,
}

/// Sum of segment lengths (cannot overflow u64 for any realistic count; saturates).
pub fn segs_len(segs: &[Segment]) -> u64 {
    segs.iter()
        .fold(0u64, |acc, s| acc.saturating_add(u64::from(s.len)))
}

/// Find the status byte (the last writable byte) and put the writable data segments (all
/// writable bytes before it, without empty segments) into `data`.
pub fn split_status(writable: &[Segment], data: &mut Vec<Segment>) -> Result<u64, Malformed> {
    data.clear();
    let last = writable
        .iter()
        .rposition(|s| s.len > 0)
        .ok_or(Malformed::NoStatus)?;
    let s = writable[last];
    let status = s
        .addr
        .checked_add(u64::from(s.len) - 1)
        .ok_or(Malformed::StatusOverflow)?;
    data.extend(writable[..last].iter().copied().filter(|s| s.len > 0));
    if s.len > 1 {
        data.push(seg(s.addr, s.len - 1, true));
    }
    Ok(status)
}

/// Read the 16-byte header from the front of the readable segments and put the rest of the
/// readable bytes (the data) into `data`.
pub fn read_header(
    mem: &GuestMemory,
    readable: &[Segment],
    data: &mut Vec<Segment>,
) -> Result<VirtioBlkOutHdr, Malformed> {
    data.clear();
    let total = segs_len(readable);
    if total < OUTHDR_LEN as u64 {
        return Err(Malformed::ShortHeader(total));
    }
    let mut hdr = VirtioBlkOutHdr::default();
    let buf = hdr.as_mut_bytes();
    let mut got = 0usize;
    for s in readable {
        let len = s.len as usize;
        if got < OUTHDR_LEN {
            let n = len.min(OUTHDR_LEN - got);
            if n > 0 {
                mem.read(s.addr, &mut buf[got..got + n])
                    .map_err(|_| Malformed::HeaderUnreadable)?;
            }
            got += n;
            if n < len {
                // The header ends inside this segment; the remainder is data. n ≤ 16, and
                // s.addr + n cannot overflow because the read above covered it.
                data.push(seg(s.addr + n as u64, s.len - n as u32, false));
            }
        } else if s.len > 0 {
            data.push(*s);
        }
    }
    Ok(hdr)
}

/// A byte cursor over segments, used to cut a list of segments into bounce-sized pieces.
#[derive(Debug)]
pub struct SegCursor<'a> {
    segs: &'a [Segment],
    idx: usize,
    off: u32,
}

impl<'a> SegCursor<'a> {
    /// Start at the first byte of `segs`.
    pub fn new(segs: &'a [Segment]) -> Self {
        Self {
            segs,
            idx: 0,
            off: 0,
        }
    }

    /// Visit the next `len` bytes as `(guest addr, range in the piece)` and advance. Stops
    /// early (and returns Err) if `f` fails.
    pub fn walk<E>(
        &mut self,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut done = 0usize;
        while done < len {
            let Some(s) = self.segs.get(self.idx) else {
                return Ok(());
            };
            let left = (s.len - self.off) as usize;
            let n = left.min(len - done);
            f(s.addr.wrapping_add(u64::from(self.off)), done..done + n)?;
            done += n;
            // n ≤ left ≤ u32::MAX.
            self.off += n as u32;
            if self.off == s.len {
                self.idx += 1;
                self.off = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::GuestRam;

    #[test]
    fn status_is_the_last_writable_byte() {
        let mut data = Vec::new();
        let w = [
            seg(0x1000, 512, true),
            seg(0x3000, 0, true),
            seg(0x2000, 513, true),
            seg(0x4000, 0, true),
        ];
        assert_eq!(split_status(&w, &mut data), Ok(0x2000 + 512));
        assert_eq!(data, vec![seg(0x1000, 512, true), seg(0x2000, 512, true)]);
        // A 1-byte last segment leaves no data piece for it.
        assert_eq!(split_status(&[seg(0x9000, 1, true)], &mut data), Ok(0x9000));
        assert!(data.is_empty());
        assert_eq!(split_status(&[], &mut data), Err(Malformed::NoStatus));
        assert_eq!(
            split_status(&[seg(0x10, 0, true)], &mut data),
            Err(Malformed::NoStatus)
        );
        assert_eq!(
            split_status(&[seg(u64::MAX, 2, true)], &mut data),
            Err(Malformed::StatusOverflow)
        );
    }

    #[test]
    fn header_may_span_segments_and_share_one_with_data() {
        let ram = GuestRam::new(0x10000);
        let hdr = VirtioBlkOutHdr {
            type_: U32::new(req_type::OUT),
            ioprio: U32::new(7),
            sector: U64::new(0x1122_3344),
        };
        let b = hdr.as_bytes();
        // 5 bytes in one descriptor, 11 + 100 data bytes in the next.
        ram.mem.write(0x100, &b[..5]).unwrap();
        ram.mem.write(0x200, &b[5..]).unwrap();
        let mut data = Vec::new();
        let got = read_header(
            &ram.mem,
            &[seg(0x100, 5, false), seg(0x200, 111, false)],
            &mut data,
        )
        .unwrap();
        assert_eq!(got, hdr);
        assert_eq!(data, vec![seg(0x200 + 11, 100, false)]);
        assert_eq!(
            read_header(&ram.mem, &[seg(0x100, 15, false)], &mut data),
            Err(Malformed::ShortHeader(15))
        );
        assert_eq!(
            read_header(&ram.mem, &[seg(0x20000, 16, false)], &mut data),
            Err(Malformed::HeaderUnreadable)
        );
    }

    #[test]
    fn cursor_cuts_segments_into_pieces() {
        let segs = [seg(0x1000, 10, false), seg(0x2000, 6, false)];
        let mut c = SegCursor::new(&segs);
        let mut seen = Vec::new();
        c.walk::<()>(12, |a, r| {
            seen.push((a, r));
            Ok(())
        })
        .unwrap();
        c.walk::<()>(4, |a, r| {
            seen.push((a, r));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(0x1000, 0..10), (0x2000, 10..12), (0x2002, 0..4)]
        );
    }
}
