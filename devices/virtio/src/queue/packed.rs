//! Packed virtqueue (virtio 1.x §2.8), device side.

use std::sync::atomic::{fence, Ordering};

use emudev::{Access, GuestMemory};

use super::chain::DescChain;
use super::ring::RingArea;
use super::split::walk_indirect;
use super::{
    check_align, desc_flags, features, need_event, QueueConfig, QueueError, QueueState,
    MAX_QUEUE_SIZE,
};

const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;

pub(crate) struct PackedRing {
    desc: RingArea,
    /// Driver event suppression (we read it).
    driver: RingArea,
    /// Device event suppression (we write it).
    device: RingArea,
    size: u16,
    event_idx: bool,
    indirect: bool,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// Ring slots each in-flight buffer id occupied, set at pop.
    desc_count: Vec<u16>,
    /// Staged `(id, len)` completions.
    shadow: Vec<(u16, u32)>,
    notify_carry: bool,
    signalled_used: u16,
    signalled_valid: bool,
    notify_enabled: bool,
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

#[inline]
fn is_avail(flags: u16, wrap: bool) -> bool {
    let a = flags & desc_flags::AVAIL != 0;
    let u = flags & desc_flags::USED != 0;
    a == wrap && u != wrap
}

impl PackedRing {
    pub fn new(
        cfg: &QueueConfig,
        feats: u64,
        mem: &GuestMemory,
        state: QueueState,
    ) -> Result<Self, QueueError> {
        let size = cfg.size;
        if size == 0 || size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadSize(size));
        }
        if state.next_avail >= size || state.next_used >= size {
            return Err(QueueError::DescIndexOutOfRange {
                index: u32::from(state.next_avail.max(state.next_used)),
                size: u32::from(size),
            });
        }
        check_align("descriptor ring", cfg.desc_addr, 16)?;
        check_align("driver event area", cfg.driver_addr, 4)?;
        check_align("device event area", cfg.device_addr, 4)?;
        let n = usize::from(size);
        let desc = translate(
            mem,
            "descriptor ring",
            cfg.desc_addr,
            16 * n,
            &[Access::Read, Access::Write],
            16,
        )?;
        let driver = translate(
            mem,
            "driver event area",
            cfg.driver_addr,
            4,
            &[Access::Read],
            4,
        )?;
        let device = translate(
            mem,
            "device event area",
            cfg.device_addr,
            4,
            &[Access::Write],
            4,
        )?;
        Ok(Self {
            desc,
            driver,
            device,
            size,
            event_idx: feats & features::EVENT_IDX != 0,
            indirect: feats & features::INDIRECT_DESC != 0,
            next_avail: state.next_avail,
            avail_wrap: state.avail_wrap,
            next_used: state.next_used,
            used_wrap: state.used_wrap,
            desc_count: vec![1; n],
            shadow: Vec::with_capacity(n),
            notify_carry: false,
            signalled_used: state.next_used,
            signalled_valid: false,
            notify_enabled: true,
        })
    }

    pub fn carry_from(&mut self, old: &PackedRing) {
        self.desc_count.copy_from_slice(&old.desc_count);
        self.signalled_used = old.signalled_used;
        self.signalled_valid = old.signalled_valid;
        self.notify_enabled = old.notify_enabled;
    }

    /// No part is reached through a host pointer.
    pub fn by_message(&self) -> bool {
        !self.desc.is_host() && !self.driver.is_host() && !self.device.is_host()
    }

    pub fn is_host(&self) -> bool {
        self.desc.is_host() && self.driver.is_host() && self.device.is_host()
    }

    pub fn staged(&self) -> usize {
        self.shadow.len()
    }

    /// Advance a ring position by `n` slots, toggling `wrap` when passing the end.
    fn advance(&self, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
        let p = u32::from(pos) + u32::from(n);
        let s = u32::from(self.size);
        if p >= s {
            ((p - s) as u16, !wrap)
        } else {
            (p as u16, wrap)
        }
    }

    pub fn state(&self) -> QueueState {
        // Staged completions count as used.
        let (mut pos, mut wrap) = (self.next_used, self.used_wrap);
        for &(id, _) in &self.shadow {
            let n = self.desc_count.get(usize::from(id)).copied().unwrap_or(1);
            (pos, wrap) = self.advance(pos, wrap, n);
        }
        QueueState {
            next_avail: self.next_avail,
            next_used: pos,
            avail_wrap: self.avail_wrap,
            used_wrap: wrap,
        }
    }

    pub fn has_available(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        let flags = self.desc.load_u16(
            mem,
            16 * usize::from(self.next_avail) + 14,
            Ordering::Acquire,
        )?;
        Ok(is_avail(flags, self.avail_wrap))
    }

    #[inline]
    pub fn pop(&mut self, mem: &GuestMemory, chain: &mut DescChain) -> Result<bool, QueueError> {
        let head = self.next_avail;
        // Acquire on the head flags: the driver makes the head available last.
        let hflags = self
            .desc
            .load_u16(mem, 16 * usize::from(head) + 14, Ordering::Acquire)?;
        if !is_avail(hflags, self.avail_wrap) {
            return Ok(false);
        }
        chain.reset(0, 0);
        let (mut pos, mut wrap) = (head, self.avail_wrap);
        let mut count: u16 = 0;
        let id = loop {
            if count >= self.size {
                return Err(QueueError::ChainLoop);
            }
            count += 1;
            let mut d = self.desc.load_desc(mem, 16 * usize::from(pos))?;
            if pos == head {
                d.w4 = hflags;
            }
            let flags = d.w4;
            if flags & desc_flags::INDIRECT != 0 {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated);
                }
                if flags & desc_flags::NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                walk_indirect(mem, chain, &d, self.size, true)?;
            } else {
                chain.push(d.addr, d.len, flags & desc_flags::WRITE != 0)?;
            }
            (pos, wrap) = self.advance(pos, wrap, 1);
            if flags & desc_flags::NEXT == 0 {
                break d.w3;
            }
        };
        if id >= self.size {
            return Err(QueueError::BadBufferId(id));
        }
        self.desc_count[usize::from(id)] = count;
        chain.set_head(id);
        chain.set_ring_descs(count);
        self.next_avail = pos;
        self.avail_wrap = wrap;
        Ok(true)
    }

    #[inline]
    pub fn add_used(&mut self, mem: &GuestMemory, id: u16, len: u32) -> Result<(), QueueError> {
        if id >= self.size {
            return Err(QueueError::BadBufferId(id));
        }
        if self.shadow.len() >= usize::from(self.size) {
            self.notify_carry |= self.flush(mem)?;
        }
        self.shadow.push((id, len));
        Ok(())
    }

    fn used_flags(&self, wrap: bool, len: u32) -> u16 {
        let mut f = if wrap {
            desc_flags::AVAIL | desc_flags::USED
        } else {
            0
        };
        if len != 0 {
            f |= desc_flags::WRITE;
        }
        f
    }

    pub fn flush(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        if self.shadow.is_empty() {
            return Ok(std::mem::take(&mut self.notify_carry));
        }
        // Pass 1: ids and lengths.
        let (mut pos, mut wrap) = (self.next_used, self.used_wrap);
        for &(id, len) in &self.shadow {
            let off = 16 * usize::from(pos);
            self.desc.store_u32(mem, off + 8, len)?;
            self.desc.store_u16(mem, off + 12, id, Ordering::Relaxed)?;
            let n = self.desc_count[usize::from(id)];
            (pos, wrap) = self.advance(pos, wrap, n);
        }
        let (end_pos, end_wrap) = (pos, wrap);
        fence(Ordering::Release);
        // Pass 2: flags, the first entry last so the driver sees the burst at once.
        let (first_pos, first_wrap) = (self.next_used, self.used_wrap);
        let (mut pos, mut wrap) = (first_pos, first_wrap);
        for (i, &(id, len)) in self.shadow.iter().enumerate() {
            if i > 0 {
                let f = self.used_flags(wrap, len);
                self.desc
                    .store_u16(mem, 16 * usize::from(pos) + 14, f, Ordering::Release)?;
            }
            let n = self.desc_count[usize::from(id)];
            (pos, wrap) = self.advance(pos, wrap, n);
        }
        let f0 = self.used_flags(first_wrap, self.shadow[0].1);
        self.desc
            .store_u16(mem, 16 * usize::from(first_pos) + 14, f0, Ordering::Release)?;
        self.shadow.clear();
        self.next_used = end_pos;
        self.used_wrap = end_wrap;

        fence(Ordering::SeqCst);
        let off_wrap = self.driver.load_u16(mem, 0, Ordering::Relaxed)?;
        let flags = self.driver.load_u16(mem, 2, Ordering::Relaxed)?;
        let old = self.signalled_used;
        let new = self.next_used;
        let valid = self.signalled_valid;
        self.signalled_used = new;
        self.signalled_valid = true;
        let notify = match flags {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx && valid => {
                // Bring everything into one index space: positions before the wrap are
                // shifted down by the ring size (DPDK vhost_vring_call_packed).
                let mut off = off_wrap & 0x7fff;
                let mut old = old;
                if new <= old {
                    old = old.wrapping_sub(self.size);
                }
                if self.used_wrap != (off_wrap >> 15 != 0) {
                    off = off.wrapping_sub(self.size);
                }
                need_event(off, new, old)
            }
            _ => true,
        };
        Ok(notify | std::mem::take(&mut self.notify_carry))
    }

    pub fn set_notifications(&mut self, mem: &GuestMemory, enable: bool) -> Result<(), QueueError> {
        let _ = EVENT_ENABLE;
        let flags = if enable { EVENT_ENABLE } else { EVENT_DISABLE };
        self.device.store_u16(mem, 2, flags, Ordering::Relaxed)?;
        self.notify_enabled = enable;
        Ok(())
    }
}
