//! Split virtqueue (virtio 1.x §2.7), device side.

use std::sync::atomic::{fence, Ordering};

use emudev::{Access, GuestMemory};

use super::chain::DescChain;
use super::ring::{HostAvail, HostDescs, HostUsed, RawDesc, RingArea};
use super::{
    check_align, desc_flags, features, need_event, QueueConfig, QueueError, QueueState,
    MAX_INDIRECT_FLOOR, MAX_QUEUE_SIZE,
};

const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

pub(crate) struct SplitRing {
    desc: RingArea,
    /// `desc` as a direct table when host-mapped (the fast path).
    desc_host: Option<HostDescs>,
    used_host: Option<HostUsed>,
    avail_host: Option<HostAvail>,
    avail: RingArea,
    used: RingArea,
    size: u16,
    mask: u16,
    event_idx: bool,
    indirect: bool,
    next_avail: u16,
    /// Last avail idx read from the guest; chains up to it need no new acquire load.
    avail_cache: u16,
    next_used: u16,
    /// Completions written to the ring (host path) or `shadow` (message path), unpublished.
    staged: u16,
    shadow: Vec<(u32, u32)>,
    /// Interrupt decision from an automatic flush, reported by the next `flush`.
    notify_carry: bool,
    signalled_used: u16,
    signalled_valid: bool,
    notify_enabled: bool,
    /// avail idx the far-away avail_event was based on while notifications are off.
    event_base: u16,
}

fn translate(
    mem: &GuestMemory,
    what: &'static str,
    addr: u64,
    len: usize,
    access: &[Access],
    align: usize,
) -> Result<RingArea, QueueError> {
    RingArea::translate(mem, addr, len, access, align).map_err(|err| QueueError::RingNotMapped {
        what,
        addr,
        err,
    })
}

impl SplitRing {
    pub fn new(
        cfg: &QueueConfig,
        feats: u64,
        mem: &GuestMemory,
        state: QueueState,
    ) -> Result<Self, QueueError> {
        let size = cfg.size;
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(QueueError::BadSize(size));
        }
        check_align("descriptor table", cfg.desc_addr, 16)?;
        check_align("available ring", cfg.driver_addr, 2)?;
        check_align("used ring", cfg.device_addr, 4)?;
        let n = usize::from(size);
        let event_idx = feats & features::EVENT_IDX != 0;
        let extra = if event_idx { 2 } else { 0 };
        let desc = translate(
            mem,
            "descriptor table",
            cfg.desc_addr,
            16 * n,
            &[Access::Read],
            16,
        )?;
        let avail = translate(
            mem,
            "available ring",
            cfg.driver_addr,
            4 + 2 * n + extra,
            &[Access::Read],
            2,
        )?;
        let used = translate(
            mem,
            "used ring",
            cfg.device_addr,
            4 + 8 * n + extra,
            &[Access::Write],
            4,
        )?;
        Ok(Self {
            desc_host: desc.host_descs(size),
            used_host: used.host_used(size),
            avail_host: avail.host_avail(size),
            desc,
            avail,
            used,
            size,
            mask: size - 1,
            event_idx,
            indirect: feats & features::INDIRECT_DESC != 0,
            next_avail: state.next_avail,
            avail_cache: state.next_avail,
            next_used: state.next_used,
            staged: 0,
            shadow: Vec::new(),
            notify_carry: false,
            signalled_used: state.next_used,
            signalled_valid: false,
            notify_enabled: true,
            event_base: state.next_avail,
        })
    }

    /// Keep notification bookkeeping across a memory switch.
    pub fn carry_from(&mut self, old: &SplitRing) {
        self.signalled_used = old.signalled_used;
        self.signalled_valid = old.signalled_valid;
        self.notify_enabled = old.notify_enabled;
        self.event_base = old.event_base;
        self.avail_cache = old.avail_cache;
    }

    /// No part is reached through a host pointer.
    pub fn by_message(&self) -> bool {
        !self.desc.is_host() && !self.avail.is_host() && !self.used.is_host()
    }

    pub fn is_host(&self) -> bool {
        self.desc.is_host() && self.avail.is_host() && self.used.is_host()
    }

    pub fn staged(&self) -> usize {
        usize::from(self.staged)
    }

    pub fn state(&self) -> QueueState {
        QueueState {
            next_avail: self.next_avail,
            next_used: self.next_used.wrapping_add(self.staged),
            avail_wrap: true,
            used_wrap: true,
        }
    }

    fn used_event_off(&self) -> usize {
        4 + 2 * usize::from(self.size)
    }

    fn avail_event_off(&self) -> usize {
        4 + 8 * usize::from(self.size)
    }

    /// Refresh the cached avail idx; returns the number of pending chains.
    #[inline]
    fn refresh_avail(&mut self, mem: &GuestMemory) -> Result<u16, QueueError> {
        let idx = self.avail.load_u16(mem, 2, Ordering::Acquire)?;
        let pending = idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(QueueError::AvailIdxJump {
                avail: idx,
                next: self.next_avail,
            });
        }
        self.avail_cache = idx;
        if !self.notify_enabled
            && self.event_idx
            && idx.wrapping_sub(self.event_base) > self.size / 2
        {
            self.park_avail_event(mem)?;
        }
        Ok(pending)
    }

    pub fn has_available(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        if self.avail_cache != self.next_avail {
            return Ok(true);
        }
        Ok(self.refresh_avail(mem)? != 0)
    }

    #[inline(always)]
    pub fn pop(&mut self, mem: &GuestMemory, chain: &mut DescChain) -> Result<bool, QueueError> {
        if self.avail_cache == self.next_avail && self.refresh_avail(mem)? == 0 {
            return Ok(false);
        }
        let head = match self.avail_host {
            Some(a) => a.entry(self.next_avail),
            None => {
                let slot = usize::from(self.next_avail & self.mask);
                self.avail.load_u16(mem, 4 + 2 * slot, Ordering::Relaxed)?
            }
        };
        chain.reset(head, 1);
        match self.desc_host {
            Some(t) => self.walk_host(t, mem, chain, head)?,
            None => {
                if head >= self.size {
                    return Err(QueueError::DescIndexOutOfRange {
                        index: u32::from(head),
                        size: u32::from(self.size),
                    });
                }
                self.walk(mem, chain, head)?
            }
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(true)
    }

    /// `walk` over a host-mapped table: the index check is the bounds check.
    #[inline(always)]
    fn walk_host(
        &self,
        t: HostDescs,
        mem: &GuestMemory,
        chain: &mut DescChain,
        head: u16,
    ) -> Result<(), QueueError> {
        let mut idx = head;
        let mut ttl = self.size;
        loop {
            let Some(d) = t.get(idx) else {
                return Err(QueueError::DescIndexOutOfRange {
                    index: u32::from(idx),
                    size: u32::from(self.size),
                });
            };
            if ttl == 0 {
                return Err(QueueError::ChainLoop);
            }
            ttl -= 1;
            let flags = d.w3;
            if flags & desc_flags::INDIRECT != 0 {
                return self.indirect(mem, chain, &d);
            }
            chain.push(d.addr, d.len, flags & desc_flags::WRITE != 0)?;
            if flags & desc_flags::NEXT == 0 {
                return Ok(());
            }
            idx = d.w4;
        }
    }

    #[cold]
    fn indirect(
        &self,
        mem: &GuestMemory,
        chain: &mut DescChain,
        d: &RawDesc,
    ) -> Result<(), QueueError> {
        if !self.indirect {
            return Err(QueueError::IndirectNotNegotiated);
        }
        if d.w3 & desc_flags::NEXT != 0 {
            return Err(QueueError::IndirectWithNext);
        }
        walk_indirect(mem, chain, d, self.size, false)
    }

    fn walk(&self, mem: &GuestMemory, chain: &mut DescChain, head: u16) -> Result<(), QueueError> {
        let mut idx = head;
        let mut ttl = self.size;
        loop {
            if ttl == 0 {
                return Err(QueueError::ChainLoop);
            }
            ttl -= 1;
            let d = self.desc.load_desc(mem, 16 * usize::from(idx))?;
            let flags = d.w3;
            if flags & desc_flags::INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                if flags & desc_flags::NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                return walk_indirect(mem, chain, &d, self.size, false);
            }
            chain.push(d.addr, d.len, flags & desc_flags::WRITE != 0)?;
            if flags & desc_flags::NEXT == 0 {
                return Ok(());
            }
            idx = d.w4;
            if idx >= self.size {
                return Err(QueueError::DescIndexOutOfRange {
                    index: u32::from(idx),
                    size: u32::from(self.size),
                });
            }
        }
    }

    /// `add_used` for a host-mapped used ring with room; false means take the slow path.
    #[inline(always)]
    pub fn add_used_fast(&mut self, head: u16, len: u32) -> bool {
        match self.used_host {
            Some(u) if self.staged < self.size => {
                u.put(
                    self.next_used.wrapping_add(self.staged),
                    u32::from(head),
                    len,
                );
                self.staged += 1;
                true
            }
            _ => false,
        }
    }

    #[inline]
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        if self.staged == self.size {
            // More completions than ring slots without a flush: publish what we have.
            self.notify_carry |= self.flush(mem)?;
        }
        if let Some(u) = self.used_host {
            u.put(
                self.next_used.wrapping_add(self.staged),
                u32::from(head),
                len,
            );
        } else {
            self.shadow.push((u32::from(head), len));
        }
        self.staged += 1;
        Ok(())
    }

    /// Write shadowed entries with as few guest writes as possible (message path).
    fn write_shadow(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        let mut buf = [0u8; 8 * 32];
        let mut i = 0;
        while i < self.shadow.len() {
            let slot = usize::from(self.next_used.wrapping_add(i as u16) & self.mask);
            // Entries up to the ring end or the buffer size go in one write.
            let run = (self.shadow.len() - i)
                .min(usize::from(self.size) - slot)
                .min(32);
            for k in 0..run {
                let (id, l) = self.shadow[i + k];
                buf[8 * k..8 * k + 4].copy_from_slice(&id.to_le_bytes());
                buf[8 * k + 4..8 * k + 8].copy_from_slice(&l.to_le_bytes());
            }
            self.used.write_bytes(mem, 4 + 8 * slot, &buf[..8 * run])?;
            i += run;
        }
        self.shadow.clear();
        Ok(())
    }

    #[inline]
    pub fn flush(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        if self.staged == 0 {
            return Ok(std::mem::take(&mut self.notify_carry));
        }
        if !self.shadow.is_empty() {
            self.write_shadow(mem)?;
        }
        let old = self.next_used;
        let new = old.wrapping_add(self.staged);
        self.used.store_u16(mem, 2, new, Ordering::Release)?;
        self.next_used = new;
        self.staged = 0;
        // Order the used idx store before reading the driver's suppression state.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let event = self
                .avail
                .load_u16(mem, self.used_event_off(), Ordering::Relaxed)?;
            // `signalled_used` is only meaningful within one u16 window.
            let valid = self.signalled_valid
                && new.wrapping_sub(self.signalled_used) >= new.wrapping_sub(old);
            let n = !valid || need_event(event, new, self.signalled_used);
            if n {
                self.signalled_used = new;
                self.signalled_valid = true;
            }
            n
        } else {
            let flags = self.avail.load_u16(mem, 0, Ordering::Relaxed)?;
            flags & AVAIL_F_NO_INTERRUPT == 0
        };
        Ok(notify | std::mem::take(&mut self.notify_carry))
    }

    /// Point avail_event half a ring-index space away from where the driver is, so it does
    /// not kick while we poll.
    fn park_avail_event(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        self.event_base = self.avail_cache;
        let far = self.avail_cache.wrapping_add(0x8000);
        self.used
            .store_u16(mem, self.avail_event_off(), far, Ordering::Relaxed)?;
        Ok(())
    }

    pub fn set_notifications(&mut self, mem: &GuestMemory, enable: bool) -> Result<(), QueueError> {
        if self.event_idx {
            if enable {
                self.used.store_u16(
                    mem,
                    self.avail_event_off(),
                    self.next_avail,
                    Ordering::Relaxed,
                )?;
            } else {
                self.park_avail_event(mem)?;
            }
        } else {
            let flags = if enable { 0 } else { USED_F_NO_NOTIFY };
            self.used.store_u16(mem, 0, flags, Ordering::Relaxed)?;
        }
        self.notify_enabled = enable;
        Ok(())
    }
}

/// Walk an indirect table (split or packed layout) into `chain`.
pub(crate) fn walk_indirect(
    mem: &GuestMemory,
    chain: &mut DescChain,
    d: &RawDesc,
    queue_size: u16,
    packed: bool,
) -> Result<(), QueueError> {
    let max = u32::from(queue_size).max(MAX_INDIRECT_FLOOR);
    if d.len == 0 || d.len % 16 != 0 || d.len / 16 > max {
        return Err(QueueError::BadIndirectLen(d.len));
    }
    let n = d.len / 16;
    let align = if d.addr % 16 == 0 { 16 } else { usize::MAX };
    // A misaligned table is still legal; it is then read by copies (align never matches).
    let table = RingArea::translate(mem, d.addr, d.len as usize, &[Access::Read], align).map_err(
        |err| QueueError::RingNotMapped {
            what: "indirect table",
            addr: d.addr,
            err,
        },
    )?;
    if packed {
        // Packed tables are sequential; NEXT is ignored.
        for i in 0..n as usize {
            let e = table.load_desc(mem, 16 * i)?;
            let flags = e.w4;
            if flags & desc_flags::INDIRECT != 0 {
                return Err(QueueError::NestedIndirect);
            }
            chain.push(e.addr, e.len, flags & desc_flags::WRITE != 0)?;
        }
        return Ok(());
    }
    let mut idx = 0u32;
    let mut ttl = n;
    loop {
        if ttl == 0 {
            return Err(QueueError::ChainLoop);
        }
        ttl -= 1;
        let e = table.load_desc(mem, 16 * idx as usize)?;
        let flags = e.w3;
        if flags & desc_flags::INDIRECT != 0 {
            return Err(QueueError::NestedIndirect);
        }
        chain.push(e.addr, e.len, flags & desc_flags::WRITE != 0)?;
        if flags & desc_flags::NEXT == 0 {
            return Ok(());
        }
        idx = u32::from(e.w4);
        if idx >= n {
            return Err(QueueError::DescIndexOutOfRange {
                index: idx,
                size: n,
            });
        }
    }
}
