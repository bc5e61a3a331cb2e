//! The reference: a lean null virtio-blk handler on rust-vmm `virtio-queue` 0.16 and
//! `vm-memory` 0.16, doing the same work per request as our engine with `NullBackend`:
//! walk the chain, read and check the 16-byte header, bounds-check the transfer, zero-fill
//! (read) or just map (write) the data buffers, write the status byte, add_used, and one
//! notification decision per burst. No Reader/Writer, no backend trait, no stats: a floor for
//! what a virtio-queue based device costs, so the ratio against it is conservative.

use virtio_queue::{Queue as VQueue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryMmap};

use crate::ours::RING_FEATURES;
use crate::setup::{Fixture, QUEUE_SIZE};

const CAPACITY: u64 = 1 << 30;
const MAX_DESCS: usize = 8;

/// Errors building the reference queue.
#[derive(Debug, thiserror::Error)]
#[error("virtio-queue: {0}")]
pub struct RefError(#[from] virtio_queue::Error);

/// The reference queue and its counters.
pub struct Reference {
    vq: VQueue,
    pub requests: u64,
    pub failed: u64,
}

impl Reference {
    pub fn new(fx: &Fixture) -> Result<Self, RefError> {
        let mut vq = VQueue::new(QUEUE_SIZE)?;
        vq.try_set_desc_table_address(GuestAddress(fx.ring.desc_addr))?;
        vq.try_set_avail_ring_address(GuestAddress(fx.ring.driver_addr))?;
        vq.try_set_used_ring_address(GuestAddress(fx.ring.device_addr))?;
        vq.set_event_idx(RING_FEATURES & emudev_virtio::queue::features::EVENT_IDX != 0);
        vq.set_ready(true);
        let mut r = Self {
            vq,
            requests: 0,
            failed: 0,
        };
        r.resync(fx);
        Ok(r)
    }

    /// Re-position at the fixture's avail idx (after our queue ran on the same ring).
    pub fn resync(&mut self, fx: &Fixture) {
        self.vq.set_next_avail(fx.idx);
        self.vq.set_next_used(fx.idx);
    }
}

/// One request: returns (used length, ok).
#[inline(always)]
fn handle(gm: &GuestMemoryMmap<()>, d: &[(u64, u32, bool)]) -> (u32, bool) {
    let (Some(&(hdr, hlen, hw)), Some(&(st, slen, sw))) = (d.first(), d.last()) else {
        return (0, false);
    };
    if d.len() < 2 || hw || hlen < 16 || !sw || slen < 1 {
        return (0, false);
    }
    let (Ok(ty), Ok(sector)) = (
        gm.read_obj::<u32>(GuestAddress(hdr)),
        gm.read_obj::<u64>(GuestAddress(hdr + 8)),
    ) else {
        return (0, false);
    };
    let data = &d[1..d.len() - 1];
    let want_w = match u32::from_le(ty) {
        0 => true,
        1 => false,
        _ => return (0, false),
    };
    let len: u64 = data.iter().map(|x| u64::from(x.1)).sum();
    let ok = len % 512 == 0
        && data.iter().all(|x| x.2 == want_w)
        && u64::from_le(sector)
            .checked_mul(512)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= CAPACITY)
        && data.iter().all(
            |&(a, l, _)| match gm.get_slice(GuestAddress(a), l as usize) {
                Ok(s) => {
                    if want_w {
                        let g = s.ptr_guard_mut();
                        // SAFETY: the guard's pointer is valid for `g.len()` writable bytes while
                        // the slice lives (same fill as NullBackend::read_vectored).
                        unsafe { std::ptr::write_bytes(g.as_ptr(), 0, g.len()) };
                    }
                    true
                }
                Err(_) => false,
            },
        );
    let status = if ok { 0u8 } else { 1u8 };
    if gm.write_obj(status, GuestAddress(st)).is_err() {
        return (0, false);
    }
    let written = if ok && want_w { len as u32 } else { 0 };
    (written + 1, ok)
}

/// The measured loop (see `emudev_bench_loop_ours`).
#[no_mangle]
#[inline(never)]
pub fn emudev_bench_loop_ref(r: &mut Reference, fx: &mut Fixture, rounds: u32) -> u64 {
    let mut done = 0u64;
    for _ in 0..rounds {
        fx.refill();
        let gm = &fx.gm;
        while let Some(chain) = r.vq.pop_descriptor_chain(gm) {
            let head = chain.head_index();
            let mut d = [(0u64, 0u32, false); MAX_DESCS];
            let mut n = 0;
            for desc in chain {
                if n == MAX_DESCS {
                    n = 0;
                    break;
                }
                d[n] = (desc.addr().0, desc.len(), desc.is_write_only());
                n += 1;
            }
            let (used, ok) = handle(gm, &d[..n]);
            r.requests += 1;
            r.failed += u64::from(!ok);
            if r.vq.add_used(gm, head, used).is_err() {
                r.failed += 1;
            }
            done += 1;
        }
        if r.vq.needs_notification(gm).unwrap_or(false) {
            done += 1 << 32;
        }
    }
    done
}

/// Ring handling only (see `emudev_bench_loop_ours_ring`).
#[no_mangle]
#[inline(never)]
pub fn emudev_bench_loop_ref_ring(r: &mut Reference, fx: &mut Fixture, rounds: u32) -> u64 {
    let mut sink = 0u64;
    for _ in 0..rounds {
        fx.refill();
        let gm = &fx.gm;
        while let Some(chain) = r.vq.pop_descriptor_chain(gm) {
            let head = chain.head_index();
            for d in chain {
                sink = sink.wrapping_add(d.addr().0 ^ u64::from(d.len()));
            }
            r.requests += 1;
            if r.vq.add_used(gm, head, 1).is_err() {
                r.failed += 1;
            }
        }
        if r.vq.needs_notification(gm).unwrap_or(false) {
            sink = sink.wrapping_add(1 << 32);
        }
    }
    sink
}
