//! A minimal driver side for tests: places split or packed rings in guest memory, adds chains
//! of buffers and consumes used entries, like a guest driver would.
//!
//! Enabled for this crate's tests and, with the `test-utils` feature, for other crates.
//! Test code: panics on misuse are acceptable here.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};

use emudev::{Access, GuestMemory};
use emudev_vfio_user::{DmaError, DmaPort, DmaRegion, DmaTransport};
use vm_memory::{Bytes, MmapRegion};

use super::{desc_flags, QueueConfig};

const RW: u32 = 3; // dma_flags::READ | dma_flags::WRITE

/// Guest memory of `size` bytes at `base`, backed by an anonymous mapping (the fd-backed
/// fast path).
pub fn anon_memory(base: u64, size: usize) -> Arc<GuestMemory> {
    mapped_memory(base, &anon_region(size))
}

/// An anonymous mapping to build (several snapshots of) guest memory from.
pub fn anon_region(size: usize) -> Arc<MmapRegion> {
    Arc::new(MmapRegion::new(size).expect("anonymous mmap"))
}

/// A snapshot mapping all of `m` at `base`, read-write.
pub fn mapped_memory(base: u64, m: &Arc<MmapRegion>) -> Arc<GuestMemory> {
    let size = m.size();
    let m = m.clone();
    Arc::new(GuestMemory::from_dma(
        &[DmaRegion {
            iova: base,
            size: size as u64,
            prot: RW,
            mapping: Some(m),
            map_offset: 0,
        }],
        None,
    ))
}

/// Client memory reached only by messages (the `--no-shared-mem` path), kept in a Vec.
pub struct MessageMemory {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl DmaTransport for MessageMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let m = self.bytes.lock().map_err(|_| DmaError::Disconnected)?;
        let o = (addr - self.base) as usize;
        buf.copy_from_slice(&m[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut m = self.bytes.lock().map_err(|_| DmaError::Disconnected)?;
        let o = (addr - self.base) as usize;
        m[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Guest memory of `size` bytes at `base` reached by messages only.
pub fn message_memory(base: u64, size: usize) -> Arc<GuestMemory> {
    let port = Arc::new(MessageMemory {
        base,
        bytes: Mutex::new(vec![0; size]),
    });
    Arc::new(GuestMemory::from_dma(
        &[DmaRegion {
            iova: base,
            size: size as u64,
            prot: RW,
            mapping: None,
            map_offset: 0,
        }],
        Some(DmaPort::new(port)),
    ))
}

/// One buffer of a chain the test driver adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// Release-store a u16 the device polls (atomic when mapped, ordered message otherwise).
pub fn store_u16(mem: &GuestMemory, gpa: u64, v: u16) {
    if let Ok(s) = mem.slice(gpa, 2, Access::Write) {
        s.store(v.to_le(), 0, Ordering::Release).expect("store");
    } else {
        fence(Ordering::Release);
        mem.write_obj(gpa, &v.to_le()).expect("write");
    }
}

/// Acquire-load a u16 the device publishes.
pub fn load_u16(mem: &GuestMemory, gpa: u64) -> u16 {
    let v = if let Ok(s) = mem.slice(gpa, 2, Access::Read) {
        s.load::<u16>(0, Ordering::Acquire).expect("load")
    } else {
        let v: u16 = mem.read_obj(gpa).expect("read");
        fence(Ordering::Acquire);
        v
    };
    u16::from_le(v)
}

fn write_desc16(mem: &GuestMemory, gpa: u64, addr: u64, len: u32, w3: u16, w4: u16) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&w3.to_le_bytes());
    b[14..16].copy_from_slice(&w4.to_le_bytes());
    mem.write(gpa, &b).expect("descriptor write");
}

/// Driver side of a split ring.
pub struct SplitDriver {
    pub mem: Arc<GuestMemory>,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl SplitDriver {
    /// Lay out a zeroed split ring of `size` entries starting at `base` (page aligned parts).
    pub fn new(mem: Arc<GuestMemory>, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = (desc + 16 * n + 0xfff) & !0xfff;
        let used = (avail + 6 + 2 * n + 0xfff) & !0xfff;
        let total = (used + 6 + 8 * n - base) as usize;
        mem.write(base, &vec![0u8; total]).expect("zero ring");
        Self {
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            size: self.size,
            desc_addr: self.desc,
            driver_addr: self.avail,
            device_addr: self.used,
            packed: false,
        }
    }

    /// Write descriptor `idx` raw (for malformed-ring tests).
    pub fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc16(
            &self.mem,
            self.desc + 16 * u64::from(idx),
            addr,
            len,
            flags,
            next,
        );
    }

    /// Put `head` into the avail ring and publish the new avail idx.
    pub fn push_head(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(self.avail + 4 + 2 * slot, &head.to_le())
            .expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        store_u16(&self.mem, self.avail + 2, self.avail_idx);
    }

    /// Publish an arbitrary avail idx (for runaway-index tests).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        store_u16(&self.mem, self.avail + 2, idx);
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Add a chain of direct descriptors; returns its head.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { desc_flags::WRITE } else { 0 };
            if !last {
                flags |= desc_flags::NEXT;
            }
            self.write_desc(idx, b.addr, b.len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.push_head(head);
        head
    }

    /// Add a chain made of one descriptor pointing at an indirect table at `table`.
    pub fn add_indirect(&mut self, table: u64, bufs: &[Buf]) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { desc_flags::WRITE } else { 0 };
            if !last {
                flags |= desc_flags::NEXT;
            }
            write_desc16(
                &self.mem,
                table + 16 * i as u64,
                b.addr,
                b.len,
                flags,
                i as u16 + 1,
            );
        }
        let head = self.next_desc;
        self.write_desc(head, table, 16 * bufs.len() as u32, desc_flags::INDIRECT, 0);
        self.next_desc = (head + 1) % self.size;
        self.push_head(head);
        head
    }

    pub fn used_idx(&self) -> u16 {
        load_u16(&self.mem, self.used + 2)
    }

    /// Consume the next used entry `(id, len)`.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let id: u32 = self
            .mem
            .read_obj(self.used + 4 + 8 * slot)
            .expect("used id");
        let len: u32 = self
            .mem
            .read_obj(self.used + 8 + 8 * slot)
            .expect("used len");
        self.last_used = self.last_used.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }

    pub fn set_used_event(&self, v: u16) {
        store_u16(&self.mem, self.avail + 4 + 2 * u64::from(self.size), v);
    }

    pub fn set_avail_flags(&self, v: u16) {
        store_u16(&self.mem, self.avail, v);
    }

    pub fn avail_event(&self) -> u16 {
        load_u16(&self.mem, self.used + 4 + 8 * u64::from(self.size))
    }

    pub fn used_flags(&self) -> u16 {
        load_u16(&self.mem, self.used)
    }

    /// Whether a driver that just moved avail idx from `old` to `new` must kick.
    pub fn must_kick(&self, event_idx: bool, old: u16, new: u16) -> bool {
        fence(Ordering::SeqCst);
        if event_idx {
            super::need_event(self.avail_event(), new, old)
        } else {
            self.used_flags() & 1 == 0
        }
    }
}

/// Driver side of a packed ring.
pub struct PackedDriver {
    pub mem: Arc<GuestMemory>,
    pub size: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    next: u16,
    wrap: bool,
    used_pos: u16,
    used_wrap: bool,
    next_id: u16,
    id_count: Vec<u16>,
}

impl PackedDriver {
    /// Lay out a zeroed packed ring of `size` entries at `base`.
    pub fn new(mem: Arc<GuestMemory>, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let driver = (desc + 16 * n + 0xfff) & !0xfff;
        let device = driver + 0x100;
        let total = (device + 4 - base) as usize;
        mem.write(base, &vec![0u8; total]).expect("zero ring");
        Self {
            mem,
            size,
            desc,
            driver,
            device,
            next: 0,
            wrap: true,
            used_pos: 0,
            used_wrap: true,
            next_id: 0,
            id_count: vec![0; usize::from(size)],
        }
    }

    pub fn config(&self) -> QueueConfig {
        QueueConfig {
            size: self.size,
            desc_addr: self.desc,
            driver_addr: self.driver,
            device_addr: self.device,
            packed: true,
        }
    }

    fn avail_bits(wrap: bool) -> u16 {
        if wrap {
            desc_flags::AVAIL
        } else {
            desc_flags::USED
        }
    }

    /// Write raw descriptor slot `pos` (addr, len, id, flags) without publishing order.
    pub fn write_desc(&self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        write_desc16(
            &self.mem,
            self.desc + 16 * u64::from(pos),
            addr,
            len,
            id,
            flags,
        );
    }

    /// Current avail wrap counter and position (for hand-made descriptors).
    pub fn position(&self) -> (u16, bool) {
        (self.next, self.wrap)
    }

    /// Flags making a descriptor available at the current wrap.
    pub fn avail_flags(&self, extra: u16) -> u16 {
        extra | Self::avail_bits(self.wrap)
    }

    fn add_descs(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let id = self.next_id;
        self.next_id = (self.next_id + 1) % self.size;
        let (head, head_wrap) = (self.next, self.wrap);
        let mut head_desc = (0, 0, 0);
        for (i, &(addr, len, f)) in descs.iter().enumerate() {
            let flags = f | Self::avail_bits(self.wrap);
            if i == 0 {
                head_desc = (addr, len, flags);
            } else {
                self.write_desc(self.next, addr, len, id, flags);
            }
            self.next += 1;
            if self.next == self.size {
                self.next = 0;
                self.wrap = !self.wrap;
            }
        }
        // Head last, flags with release.
        let off = self.desc + 16 * u64::from(head);
        let mut b = [0u8; 14];
        b[..8].copy_from_slice(&head_desc.0.to_le_bytes());
        b[8..12].copy_from_slice(&head_desc.1.to_le_bytes());
        b[12..14].copy_from_slice(&id.to_le_bytes());
        self.mem.write(off, &b).expect("head");
        let _ = head_wrap;
        store_u16(&self.mem, off + 14, head_desc.2);
        self.id_count[usize::from(id)] = descs.len() as u16;
        id
    }

    /// Add a chain of direct descriptors; returns its buffer id.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let descs: Vec<(u64, u32, u16)> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut f = if b.writable { desc_flags::WRITE } else { 0 };
                if i + 1 != bufs.len() {
                    f |= desc_flags::NEXT;
                }
                (b.addr, b.len, f)
            })
            .collect();
        self.add_descs(&descs)
    }

    /// Add one descriptor pointing at an indirect table written at `table`.
    pub fn add_indirect(&mut self, table: u64, bufs: &[Buf]) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let f = if b.writable { desc_flags::WRITE } else { 0 };
            write_desc16(&self.mem, table + 16 * i as u64, b.addr, b.len, 0, f);
        }
        self.add_descs(&[(table, 16 * bufs.len() as u32, desc_flags::INDIRECT)])
    }

    /// Consume the next used descriptor `(id, len)`.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let off = self.desc + 16 * u64::from(self.used_pos);
        let flags = load_u16(&self.mem, off + 14);
        let a = flags & desc_flags::AVAIL != 0;
        let u = flags & desc_flags::USED != 0;
        if !(a == self.used_wrap && u == self.used_wrap) {
            return None;
        }
        let len: u32 = self.mem.read_obj(off + 8).expect("len");
        let id: u16 = self.mem.read_obj(off + 12).expect("id");
        let id = u16::from_le(id);
        let n = self
            .id_count
            .get(usize::from(id))
            .copied()
            .unwrap_or(1)
            .max(1);
        let p = u32::from(self.used_pos) + u32::from(n);
        if p >= u32::from(self.size) {
            self.used_pos = (p - u32::from(self.size)) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.used_pos = p as u16;
        }
        Some((id, u32::from_le(len)))
    }

    /// Driver event suppression: what the device reads before interrupting.
    pub fn set_driver_event(&self, flags: u16, off_wrap: u16) {
        store_u16(&self.mem, self.driver, off_wrap);
        store_u16(&self.mem, self.driver + 2, flags);
    }

    /// Device event suppression flags (0 enable, 1 disable, 2 desc).
    pub fn device_event_flags(&self) -> u16 {
        load_u16(&self.mem, self.device + 2)
    }

    /// Used position and wrap as the driver tracks them.
    pub fn used_position(&self) -> (u16, bool) {
        (self.used_pos, self.used_wrap)
    }
}
