//! Raw access to one ring area (descriptor table, avail/used ring, event structures).
//!
//! An area is translated once per queue start: to a host pointer when the guest range lies in
//! one fd-backed DMA map and is naturally aligned on the host too, otherwise it is reached
//! through [`GuestMemory::read`]/[`GuestMemory::write`] (message-backed memory). All `unsafe`
//! of the queue code lives here.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, Ordering};

use emudev::{Access, GuestMemory, MemError};

/// One 16-byte descriptor as read from the guest: split `{addr, len, flags, next}` or packed
/// `{addr, len, id, flags}` (for packed, `w3` is the id and `w4` the flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RawDesc {
    pub addr: u64,
    pub len: u32,
    /// Split: flags. Packed: buffer id.
    pub w3: u16,
    /// Split: next. Packed: flags.
    pub w4: u16,
}

#[derive(Debug, Clone, Copy)]
enum Where {
    /// Host address of the area start; valid for `len` bytes while the owning
    /// `Arc<GuestMemory>` (held by the queue) is alive.
    Host(*mut u8),
    /// Guest address, accessed by copies through `GuestMemory`.
    Guest(u64),
}

/// A translated ring area of `len` bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingArea {
    at: Where,
    len: usize,
}

// SAFETY: the host pointer refers to a shared mapping kept alive by the `Arc<GuestMemory>`
// that the owning queue holds; all accesses through it are atomic or volatile, so moving the
// area to another thread is sound.
unsafe impl Send for RingArea {}

fn oob(off: usize, n: usize) -> MemError {
    MemError::Unmapped {
        gpa: off as u64,
        len: n as u64,
    }
}

impl RingArea {
    /// Translate `[gpa, gpa+len)`, which must be inside DMA maps allowing every access in
    /// `access`. `align` is the required alignment (checked on the guest address by the caller;
    /// here on the host address to decide whether atomics can be used).
    pub fn translate(
        mem: &GuestMemory,
        gpa: u64,
        len: usize,
        access: &[Access],
        align: usize,
    ) -> Result<Self, MemError> {
        for &a in access {
            if !mem.check_range(gpa, len as u64, a) {
                return Err(match mem.slice(gpa, len, a) {
                    Err(e @ (MemError::ReadOnly { .. } | MemError::WriteOnly { .. })) => e,
                    _ => MemError::Unmapped {
                        gpa,
                        len: len as u64,
                    },
                });
            }
        }
        let want = access.last().copied().unwrap_or(Access::Read);
        match mem.slice(gpa, len, want) {
            Ok(vs) => {
                let ptr = vs.ptr_guard_mut().as_ptr();
                if (ptr as usize) % align == 0 {
                    Ok(Self {
                        at: Where::Host(ptr),
                        len,
                    })
                } else {
                    Ok(Self {
                        at: Where::Guest(gpa),
                        len,
                    })
                }
            }
            Err(MemError::NotMappable { .. } | MemError::Discontiguous { .. }) => Ok(Self {
                at: Where::Guest(gpa),
                len,
            }),
            Err(e) => Err(e),
        }
    }

    /// A direct view of a descriptor table of `count` entries, when host-mapped and large
    /// enough; the fast path for walking chains.
    pub fn host_descs(&self, count: u16) -> Option<HostDescs> {
        match self.at {
            Where::Host(p) if self.len >= 16 * usize::from(count) => {
                Some(HostDescs { ptr: p, count })
            }
            _ => None,
        }
    }

    /// A direct view of a split used ring of `size` (power of two) entries, when host-mapped.
    pub fn host_used(&self, size: u16) -> Option<HostUsed> {
        match self.at {
            Where::Host(p) if size.is_power_of_two() && self.len >= 4 + 8 * usize::from(size) => {
                Some(HostUsed {
                    ptr: p,
                    mask: size - 1,
                })
            }
            _ => None,
        }
    }

    /// A direct view of the ring entries of a split avail ring of `size` (power of two).
    pub fn host_avail(&self, size: u16) -> Option<HostAvail> {
        match self.at {
            Where::Host(p) if size.is_power_of_two() && self.len >= 4 + 2 * usize::from(size) => {
                Some(HostAvail {
                    ptr: p,
                    mask: size - 1,
                })
            }
            _ => None,
        }
    }

    /// True when the area is reached through a host pointer.
    pub fn is_host(&self) -> bool {
        matches!(self.at, Where::Host(_))
    }

    #[inline(always)]
    fn host_at(&self, p: *mut u8, off: usize, n: usize) -> Result<*mut u8, MemError> {
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(p.wrapping_add(off)),
            _ => Err(oob(off, n)),
        }
    }

    fn guest_at(&self, gpa: u64, off: usize, n: usize) -> Result<u64, MemError> {
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(gpa + off as u64),
            _ => Err(oob(off, n)),
        }
    }

    /// Load a little-endian u16 at `off` (must be 2-aligned within the area).
    #[inline(always)]
    pub fn load_u16(
        &self,
        mem: &GuestMemory,
        off: usize,
        order: Ordering,
    ) -> Result<u16, MemError> {
        match self.at {
            Where::Host(p) => {
                let q = self.host_at(p, off, 2)?;
                // SAFETY: `q` is inside the live mapping (bounds checked above) and 2-aligned
                // (area start aligned at translate time, offsets are even); the guest writes it
                // concurrently, hence an atomic access.
                let v = unsafe { AtomicU16::from_ptr(q.cast::<u16>()) }.load(order);
                Ok(u16::from_le(v))
            }
            Where::Guest(g) => {
                let v: u16 = mem.read_obj(self.guest_at(g, off, 2)?)?;
                if order != Ordering::Relaxed {
                    fence(Ordering::Acquire);
                }
                Ok(u16::from_le(v))
            }
        }
    }

    /// Store a little-endian u16 at `off`.
    #[inline(always)]
    pub fn store_u16(
        &self,
        mem: &GuestMemory,
        off: usize,
        v: u16,
        order: Ordering,
    ) -> Result<(), MemError> {
        match self.at {
            Where::Host(p) => {
                let q = self.host_at(p, off, 2)?;
                // SAFETY: as in `load_u16`.
                unsafe { AtomicU16::from_ptr(q.cast::<u16>()) }.store(v.to_le(), order);
                Ok(())
            }
            Where::Guest(g) => {
                if order != Ordering::Relaxed {
                    fence(Ordering::Release);
                }
                mem.write_obj(self.guest_at(g, off, 2)?, &v.to_le())
            }
        }
    }

    /// Store a little-endian u32 at `off` (4-aligned), relaxed.
    #[inline(always)]
    pub fn store_u32(&self, mem: &GuestMemory, off: usize, v: u32) -> Result<(), MemError> {
        match self.at {
            Where::Host(p) => {
                let q = self.host_at(p, off, 4)?;
                // SAFETY: inside the live mapping, 4-aligned (area aligned to 4 and offsets
                // multiples of 4); atomic because the guest may read concurrently.
                unsafe { AtomicU32::from_ptr(q.cast::<u32>()) }.store(v.to_le(), Ordering::Relaxed);
                Ok(())
            }
            Where::Guest(g) => mem.write_obj(self.guest_at(g, off, 4)?, &v.to_le()),
        }
    }

    /// Copy bytes to `off` (slow path helper for batched used-entry writes).
    pub fn write_bytes(&self, mem: &GuestMemory, off: usize, data: &[u8]) -> Result<(), MemError> {
        match self.at {
            Where::Host(p) => {
                let q = self.host_at(p, off, data.len())?;
                for (i, b) in data.iter().enumerate() {
                    // SAFETY: `q..q+len` is inside the live mapping (checked above); volatile
                    // byte stores never tear.
                    unsafe { q.add(i).write_volatile(*b) };
                }
                Ok(())
            }
            Where::Guest(g) => mem.write(self.guest_at(g, off, data.len())?, data),
        }
    }

    /// Load the 16-byte descriptor at `off` (16-aligned), relaxed: the caller has already
    /// ordered this after the acquire load that made it visible.
    #[inline(always)]
    pub fn load_desc(&self, mem: &GuestMemory, off: usize) -> Result<RawDesc, MemError> {
        let (lo, hi) = match self.at {
            Where::Host(p) => {
                let q = self.host_at(p, off, 16)?;
                // SAFETY: `q..q+16` is inside the live mapping and 8-aligned (descriptor areas
                // and indirect tables are only translated to host pointers when 16-aligned).
                let lo = unsafe { AtomicU64::from_ptr(q.cast::<u64>()) }.load(Ordering::Relaxed);
                // SAFETY: as above, second half.
                let hi =
                    unsafe { AtomicU64::from_ptr(q.add(8).cast::<u64>()) }.load(Ordering::Relaxed);
                (u64::from_le(lo), u64::from_le(hi))
            }
            Where::Guest(g) => {
                let b: [u8; 16] = mem.read_obj(self.guest_at(g, off, 16)?)?;
                let mut lo = [0u8; 8];
                let mut hi = [0u8; 8];
                lo.copy_from_slice(&b[..8]);
                hi.copy_from_slice(&b[8..]);
                (u64::from_le_bytes(lo), u64::from_le_bytes(hi))
            }
        };
        Ok(RawDesc {
            addr: lo,
            len: hi as u32,
            w3: (hi >> 32) as u16,
            w4: (hi >> 48) as u16,
        })
    }
}

/// Host view of a descriptor table: `count` 16-byte entries at a 16-aligned `ptr`, valid while
/// the owning queue's `Arc<GuestMemory>` lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostDescs {
    ptr: *mut u8,
    count: u16,
}

// SAFETY: like `RingArea`: the pointer targets a shared mapping kept alive by the owning
// queue's `Arc<GuestMemory>` and is only used for atomic loads.
unsafe impl Send for HostDescs {}

impl HostDescs {
    /// Descriptor `idx`, or `None` when `idx` is outside the table (the index validation).
    #[inline(always)]
    pub fn get(&self, idx: u16) -> Option<RawDesc> {
        if idx >= self.count {
            return None;
        }
        let q = self.ptr.wrapping_add(16 * usize::from(idx));
        // SAFETY: `idx < count` and the area holds `16 * count` bytes of a live mapping
        // (checked in `host_descs`); `q` is 16-aligned; atomic loads because the guest may
        // write concurrently.
        let lo = unsafe { AtomicU64::from_ptr(q.cast::<u64>()) }.load(Ordering::Relaxed);
        // SAFETY: as above, second half of the same descriptor.
        let hi = unsafe { AtomicU64::from_ptr(q.add(8).cast::<u64>()) }.load(Ordering::Relaxed);
        let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
        Some(RawDesc {
            addr: lo,
            len: hi as u32,
            w3: (hi >> 32) as u16,
            w4: (hi >> 48) as u16,
        })
    }
}

/// Host view of a split used ring: header plus `mask + 1` 8-byte elements at a 4-aligned
/// `ptr`, valid while the owning queue's `Arc<GuestMemory>` lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostUsed {
    ptr: *mut u8,
    mask: u16,
}

// SAFETY: as for `HostDescs`; only atomic stores go through the pointer.
unsafe impl Send for HostUsed {}

impl HostUsed {
    /// Write used element `idx & mask`.
    #[inline(always)]
    pub fn put(&self, idx: u16, id: u32, len: u32) {
        let q = self.ptr.wrapping_add(4 + 8 * usize::from(idx & self.mask));
        // SAFETY: the element index is masked below the ring size and the area holds
        // `4 + 8 * size` bytes of a live mapping (checked in `host_used`); `q` is 4-aligned.
        unsafe { AtomicU32::from_ptr(q.cast::<u32>()) }.store(id.to_le(), Ordering::Relaxed);
        // SAFETY: as above, the second word of the same element.
        unsafe { AtomicU32::from_ptr(q.add(4).cast::<u32>()) }
            .store(len.to_le(), Ordering::Relaxed);
    }
}

/// Host view of a split avail ring: header plus `mask + 1` u16 entries at a 2-aligned `ptr`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostAvail {
    ptr: *mut u8,
    mask: u16,
}

// SAFETY: as for `HostDescs`; only atomic loads go through the pointer.
unsafe impl Send for HostAvail {}

impl HostAvail {
    /// Ring entry `idx & mask`.
    #[inline(always)]
    pub fn entry(&self, idx: u16) -> u16 {
        let q = self.ptr.wrapping_add(4 + 2 * usize::from(idx & self.mask));
        // SAFETY: the entry index is masked below the ring size and the area holds
        // `4 + 2 * size` bytes of a live mapping (checked in `host_avail`); `q` is 2-aligned.
        u16::from_le(unsafe { AtomicU16::from_ptr(q.cast::<u16>()) }.load(Ordering::Relaxed))
    }
}
