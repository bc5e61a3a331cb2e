//! Differential test of our split-ring core against rust-vmm `virtio-queue` 0.16.
//!
//! Two identical guest memories get the same driver-side ring contents, written with
//! virtio-queue's mock utilities ([`DescriptorTable`], [`AvailRing`], [`UsedRing`]): direct chains and
//! indirect tables, with the indices starting just below the u16 wrap. Our [`Queue`] serves
//! one memory and `virtio_queue::Queue` the other, step by step, and after every step the two
//! must agree: the chains popped (indirect tables expanded), the bytes of the used ring, the
//! EVENT_IDX interrupt decision for each burst, and `avail_event` after re-enabling
//! notifications. (`queue/tests.rs` in emudev-virtio compares popping direct chains; this
//! covers the rest of the ring protocol.)

use std::sync::Arc;

use emudev::GuestMemory;
use emudev_vfio_user::DmaRegion;
use emudev_virtio::queue::{features, QueueState, Segment};
use emudev_virtio::{Queue, QueueConfig};
use virtio_queue::desc::split::Descriptor as VqDesc;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryMmap, MmapRegion};

const SIZE: u16 = 8;
const MEM_LEN: usize = 0x10_0000;
/// Indirect tables go here (one 0x100 slot per chain of a round).
const INDIRECT_BASE: u64 = 0x8_0000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// `vring_need_event` (virtio 1.2 §2.7.10.2): was `event` crossed when the index moved from
/// `old` to `new`? Written here from the spec, independent of both implementations.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Our view of `gm`'s single region, without owning it.
fn alias(gm: &GuestMemoryMmap<()>) -> Arc<GuestMemory> {
    let host = gm.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: `gm` outlives every use of the alias (both live for the whole test), and the
    // alias covers exactly its one region of MEM_LEN bytes.
    let region = unsafe {
        MmapRegion::build_raw(
            host,
            MEM_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .unwrap();
    Arc::new(GuestMemory::from_dma(
        &[DmaRegion {
            iova: 0,
            size: MEM_LEN as u64,
            prot: 3,
            mapping: Some(Arc::new(region)),
            map_offset: 0,
        }],
        None,
    ))
}

/// One buffer of a chain: guest address, length, device-writable.
type Buf = (u64, u32, bool);

/// A chain the driver offers: direct, or one ring descriptor pointing at an indirect table.
#[derive(Clone)]
struct ChainSpec {
    bufs: Vec<Buf>,
    indirect: bool,
}

/// Ring placement. Not `MockSplitQueue::create`: in virtio-queue 0.16 it puts the used ring
/// inside the available ring (`SplitQueueRing::end` counts elements as bytes; upstream
/// rust-vmm/vm-virtio#400), which breaks as soon as the device writes the used ring.
const DESC_ADDR: u64 = 0x0;
const AVAIL_ADDR: u64 = 0x1000;
const USED_ADDR: u64 = 0x2000;

/// The driver side, writing the same thing into one memory with the mock's ring accessors.
struct Driver<'a> {
    gm: &'a GuestMemoryMmap<()>,
    desc: DescriptorTable<'a, GuestMemoryMmap<()>>,
    avail: AvailRing<'a, GuestMemoryMmap<()>>,
    used: UsedRing<'a, GuestMemoryMmap<()>>,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    fn new(gm: &'a GuestMemoryMmap<()>, start: u16) -> Self {
        let d = Self {
            gm,
            desc: DescriptorTable::new(gm, GuestAddress(DESC_ADDR), SIZE),
            avail: AvailRing::new(gm, GuestAddress(AVAIL_ADDR), SIZE),
            used: UsedRing::new(gm, GuestAddress(USED_ADDR), SIZE),
            avail_idx: start,
        };
        d.avail.idx().store(start);
        d.used.idx().store(start);
        d
    }

    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(AVAIL_ADDR + 4 + 2 * u64::from(SIZE))
    }

    fn avail_event(&self) -> u16 {
        let at = GuestAddress(USED_ADDR + 4 + 8 * u64::from(SIZE));
        self.gm.read_obj(at).unwrap()
    }

    /// Used ring bytes: flags, idx and every element.
    fn used_ring(&self) -> Vec<u8> {
        let mut v = vec![0u8; 4 + 8 * usize::from(SIZE)];
        self.gm.read_slice(&mut v, GuestAddress(USED_ADDR)).unwrap();
        v
    }

    /// The used element in `slot`, through the mock's accessor: (id, len).
    fn used_elem(&self, slot: u16) -> (u32, u32) {
        let e = self
            .used
            .ring()
            .ref_at(usize::from(slot % SIZE))
            .unwrap()
            .load();
        (e.id(), e.len())
    }

    fn set_used_event(&self, v: u16) {
        self.gm.write_obj(v, self.used_event_addr()).unwrap();
    }

    /// Offer `chains` (the whole descriptor table is free: every round is fully used).
    fn offer(&mut self, chains: &[ChainSpec]) {
        let mut next_desc = 0u16;
        for (c, spec) in chains.iter().enumerate() {
            let head = next_desc;
            if spec.indirect {
                let addr = INDIRECT_BASE + 0x100 * c as u64;
                let n = spec.bufs.len() as u16;
                let table = DescriptorTable::new(self.gm, GuestAddress(addr), n);
                for (i, &(a, l, w)) in spec.bufs.iter().enumerate() {
                    let i = i as u16;
                    let flags = if w { WRITE } else { 0 } | if i + 1 < n { NEXT } else { 0 };
                    table
                        .store(i, RawDescriptor::from(VqDesc::new(a, l, flags, i + 1)))
                        .unwrap();
                }
                let d = VqDesc::new(addr, u32::from(n) * 16, INDIRECT, 0);
                self.desc.store(head, RawDescriptor::from(d)).unwrap();
                next_desc += 1;
            } else {
                let n = spec.bufs.len() as u16;
                for (i, &(a, l, w)) in spec.bufs.iter().enumerate() {
                    let i = i as u16;
                    let idx = head + i;
                    let flags = if w { WRITE } else { 0 } | if i + 1 < n { NEXT } else { 0 };
                    let d = VqDesc::new(a, l, flags, idx + 1);
                    self.desc.store(idx, RawDescriptor::from(d)).unwrap();
                }
                next_desc += n;
            }
            assert!(next_desc <= SIZE);
            let slot = usize::from(self.avail_idx % SIZE);
            self.avail.ring().ref_at(slot).unwrap().store(head);
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.avail.idx().store(self.avail_idx);
    }
}

/// A round's chains: 1..=4 chains using at most SIZE ring descriptors, readable buffers
/// before writable ones, some behind indirect tables.
fn gen_chains(rng: &mut Rng, round: u64) -> Vec<ChainSpec> {
    let want = 1 + rng.below(4) as usize;
    let mut used = 0u16;
    let mut chains = Vec::new();
    for c in 0..want {
        let indirect = rng.below(3) == 0;
        let n = if indirect {
            1 + rng.below(6) as usize
        } else {
            1 + rng.below(3) as usize
        };
        let ring_descs = if indirect { 1 } else { n as u16 };
        if used + ring_descs > SIZE {
            break;
        }
        used += ring_descs;
        let readable = rng.below(n as u64 + 1) as usize;
        let bufs = (0..n)
            .map(|i| {
                let addr = 0x1_0000 + round * 0x800 + c as u64 * 0x200 + i as u64 * 0x20;
                (addr, 1 + rng.below(0x1000) as u32, i >= readable)
            })
            .collect();
        chains.push(ChainSpec { bufs, indirect });
    }
    chains
}

#[test]
fn split_ring_protocol_matches_virtio_queue_across_the_index_wrap() {
    let gm_theirs = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap();
    let gm_ours = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap();
    let start = 65_530u16;
    let mut drv_theirs = Driver::new(&gm_theirs, start);
    let mut drv_ours = Driver::new(&gm_ours, start);

    let mut theirs = virtio_queue::Queue::new(SIZE).unwrap();
    theirs.set_size(SIZE);
    theirs
        .try_set_desc_table_address(GuestAddress(DESC_ADDR))
        .unwrap();
    theirs
        .try_set_avail_ring_address(GuestAddress(AVAIL_ADDR))
        .unwrap();
    theirs
        .try_set_used_ring_address(GuestAddress(USED_ADDR))
        .unwrap();
    theirs.set_ready(true);
    theirs.set_event_idx(true);
    theirs.set_next_avail(start);
    theirs.set_next_used(start);
    let cfg = QueueConfig {
        size: SIZE,
        desc_addr: DESC_ADDR,
        driver_addr: AVAIL_ADDR,
        device_addr: USED_ADDR,
        packed: false,
    };
    let feats = features::VERSION_1 | features::INDIRECT_DESC | features::EVENT_IDX;
    let state = QueueState {
        next_avail: start,
        next_used: start,
        ..QueueState::default()
    };
    let mut ours = Queue::with_state(cfg, feats, alias(&gm_ours), state).unwrap();

    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut notified, mut quiet, mut indirect_chains) = (0, 0, 0);
    let mut used_idx = start;
    // Our side's used index and where it last interrupted (None: not since the start).
    let mut ours_used = start;
    let mut signalled: Option<u16> = None;
    let mut extra = 0;
    for round in 0..60u64 {
        let chains = gen_chains(&mut rng, round);
        indirect_chains += chains.iter().filter(|c| c.indirect).count();
        // used_event: at, inside, just past or far behind this round's completions.
        let m = chains.len() as u16;
        let used_event = match rng.below(4) {
            0 => used_idx,
            1 => used_idx.wrapping_add(m - 1),
            2 => used_idx.wrapping_add(m),
            _ => used_idx.wrapping_sub(100),
        };
        for d in [&mut drv_theirs, &mut drv_ours] {
            d.offer(&chains);
            d.set_used_event(used_event);
        }

        // Pop everything on both sides.
        let mut popped_theirs = Vec::new();
        while let Some(chain) = theirs.pop_descriptor_chain(&gm_theirs) {
            let head = chain.head_index();
            let segs: Vec<Segment> = chain
                .map(|d| Segment {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            popped_theirs.push((head, segs));
        }
        let mut popped_ours = Vec::new();
        while let Some(c) = ours.pop().unwrap() {
            popped_ours.push((c.head(), c.segments().to_vec()));
        }
        assert_eq!(popped_ours, popped_theirs, "round {round}: chains");
        assert_eq!(
            popped_ours.len(),
            chains.len(),
            "round {round}: every chain"
        );
        for ((_, segs), spec) in popped_ours.iter().zip(&chains) {
            let want: Vec<Segment> = spec
                .bufs
                .iter()
                .map(|&(addr, len, writable)| Segment {
                    addr,
                    len,
                    writable,
                })
                .collect();
            assert_eq!(segs, &want, "round {round}: chain as offered");
        }

        // Complete in a rotated order, in one or two bursts; the interrupt decision of every
        // burst must match.
        let rot = rng.below(u64::from(m)) as usize;
        let order: Vec<u16> = (0..popped_ours.len())
            .map(|i| popped_ours[(i + rot) % popped_ours.len()].0)
            .collect();
        let split = if m > 1 && rng.below(2) == 0 {
            1 + rng.below(u64::from(m) - 1) as usize
        } else {
            order.len()
        };
        for burst in [&order[..split], &order[split..]] {
            if burst.is_empty() {
                continue;
            }
            for &head in burst {
                let len = u32::from(head) * 3 + round as u32;
                theirs.add_used(&gm_theirs, head, len).unwrap();
                ours.add_used(head, len);
            }
            let old = ours_used;
            let new = old.wrapping_add(burst.len() as u16);
            ours_used = new;
            let n_theirs = theirs.needs_notification(&gm_theirs).unwrap();
            let n_ours = ours.flush_used();
            let ctx = format!(
                "round {round}: used_event {used_event}, burst {old}..{new}, last signal {signalled:?}"
            );
            // virtio-queue: exactly "used_event crossed by this burst".
            assert_eq!(n_theirs, need_event(used_event, new, old), "{ctx}");
            // Ours never stays quiet where virtio-queue interrupts...
            assert!(n_ours || !n_theirs, "lost interrupt: {ctx}");
            // ...and interrupts beyond it only vhost-style: on the first flush after a start,
            // or when used_event was crossed since the last interrupt (by an earlier burst
            // that did not signal).
            if n_ours && !n_theirs {
                extra += 1;
                if let Some(s) = signalled {
                    assert!(need_event(used_event, old, s), "spurious interrupt: {ctx}");
                }
            }
            if n_ours {
                notified += 1;
                signalled = Some(new);
            } else {
                quiet += 1;
            }
            assert_eq!(
                drv_ours.used_ring(),
                drv_theirs.used_ring(),
                "round {round}: used ring"
            );
        }
        for (i, &head) in order.iter().enumerate() {
            let slot = used_idx.wrapping_add(i as u16);
            let want = (u32::from(head), u32::from(head) * 3 + round as u32);
            assert_eq!(
                drv_ours.used_elem(slot),
                want,
                "round {round}: used slot {slot}"
            );
        }
        used_idx = used_idx.wrapping_add(m);
        assert_eq!(ours.state().next_used, used_idx);
        assert_eq!(theirs.next_used(), used_idx);

        // Re-arm driver notifications: both see the ring empty and publish the same
        // avail_event.
        assert!(
            !ours.enable_notifications(),
            "round {round}: nothing pending"
        );
        assert!(!theirs.enable_notification(&gm_theirs).unwrap());
        assert_eq!(drv_ours.avail_event(), drv_theirs.avail_event());
        assert_eq!(drv_ours.avail_event(), drv_ours.avail_idx);
    }
    assert!(ours.error().is_none());
    assert!(used_idx < start, "indices wrapped past 65535");
    assert!(
        notified > 5 && quiet > 5,
        "both decisions exercised: {notified}/{quiet}"
    );
    assert!(
        extra >= 1,
        "the vhost-style extra interrupts were exercised"
    );
    assert!(indirect_chains > 10);
}
