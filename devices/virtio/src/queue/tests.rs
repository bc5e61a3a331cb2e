//! Queue core tests: a test driver writes rings into guest memory, the device side pops.

use std::sync::Arc;

use emudev::{GuestMemory, MemError};
use emudev_vfio_user::DmaRegion;
use vm_memory::MmapRegion;

use super::testdriver::{anon_memory, message_memory, Buf, PackedDriver, SplitDriver};
use super::*;

const BASE: u64 = 0x10_0000;
const MEM: usize = 0x40_0000;
const RING: u64 = BASE;
const DATA: u64 = BASE + 0x10_0000;
const ALL: u64 = features::VERSION_1 | features::INDIRECT_DESC | features::EVENT_IDX;

fn split(mem: &Arc<GuestMemory>, size: u16, feats: u64) -> (SplitDriver, Queue) {
    let d = SplitDriver::new(mem.clone(), RING, size);
    let q = Queue::new(d.config(), feats, mem.clone()).unwrap();
    (d, q)
}

fn packed(mem: &Arc<GuestMemory>, size: u16, feats: u64) -> (PackedDriver, Queue) {
    let d = PackedDriver::new(mem.clone(), RING, size);
    let q = Queue::new(d.config(), feats | features::RING_PACKED, mem.clone()).unwrap();
    (d, q)
}

fn memories() -> Vec<(&'static str, Arc<GuestMemory>)> {
    vec![
        ("mapped", anon_memory(BASE, MEM)),
        ("message", message_memory(BASE, MEM)),
    ]
}

/// Echo: read the readable part, write it to the writable part, return bytes written.
fn echo(q: &Queue, c: &DescChain) -> u32 {
    let mem = q.memory().clone();
    let mut r = c.reader(&mem);
    let mut buf = vec![0u8; r.remaining()];
    r.read_exact(&mut buf).unwrap();
    let mut w = c.writer(&mem);
    w.write(&buf).unwrap();
    w.bytes_written() as u32
}

#[test]
fn need_event_math_including_wrap() {
    // Event inside (old, new]: notify.
    assert!(need_event(5, 6, 5));
    assert!(need_event(5, 10, 3));
    assert!(!need_event(10, 10, 3)); // event not yet reached
    assert!(!need_event(2, 10, 3)); // event already passed before old
                                    // Across the 65535 -> 0 wrap.
    assert!(need_event(0xffff, 0x0001, 0xfffe));
    assert!(need_event(0x0000, 0x0001, 0xffff));
    assert!(!need_event(0x0001, 0x0001, 0xffff));
    assert!(!need_event(0xfffd, 0x0001, 0xfffe));
    // Nothing moved: never notify.
    assert!(!need_event(7, 7, 7));
}

#[test]
fn split_pop_read_write_and_burst_flush() {
    for (name, mem) in memories() {
        let (mut d, mut q) = split(&mem, 16, ALL);
        assert_eq!(q.is_fast_path(), name == "mapped", "{name}");
        assert!(q.pop().unwrap().is_none());
        mem.write(DATA, b"hello world!").unwrap();
        let mut heads = Vec::new();
        for i in 0..3u64 {
            heads.push(d.add_chain(&[
                Buf::r(DATA, 5),
                Buf::r(DATA + 5, 7),
                Buf::w(DATA + 0x1000 * (i + 1), 8),
                Buf::w(DATA + 0x1000 * (i + 1) + 0x100, 8),
            ]));
        }
        for (i, &h) in heads.iter().enumerate() {
            let c = q.pop().unwrap().expect("chain");
            assert_eq!(c.head(), h);
            assert_eq!(c.readable().len(), 2);
            assert_eq!(c.writable().len(), 2);
            assert_eq!(c.readable_len(), 12);
            assert_eq!(c.writable_len(), 16);
            let n = echo(&q, &c);
            assert_eq!(n, 12);
            q.add_used(c.head(), n);
            // Staged, not yet visible.
            assert_eq!(d.used_idx(), 0, "{name}");
            assert_eq!(q.staged(), i + 1);
        }
        assert!(q.pop().unwrap().is_none());
        assert!(q.flush_used(), "first flush must notify");
        assert_eq!(d.used_idx(), 3);
        for &h in &heads {
            assert_eq!(d.pop_used(), Some((u32::from(h), 12)));
        }
        let mut out = [0u8; 16];
        mem.read(DATA + 0x2000, &mut out[..8]).unwrap();
        mem.read(DATA + 0x2100, &mut out[8..]).unwrap();
        assert_eq!(&out[..12], b"hello world!");
        assert_eq!(q.state().next_avail, 3);
        assert_eq!(q.state().next_used, 3);
    }
}

#[test]
fn split_indirect_chain() {
    for (name, mem) in memories() {
        let (mut d, mut q) = split(&mem, 8, ALL);
        mem.write(DATA, &[0xaa; 16]).unwrap();
        let table = DATA + 0x8000;
        let h = d.add_indirect(
            table,
            &[
                Buf::r(DATA, 16),
                Buf::w(DATA + 0x100, 4),
                Buf::w(DATA + 0x200, 20),
            ],
        );
        let c = q.pop().unwrap().expect("chain");
        assert_eq!(c.head(), h, "{name}");
        assert_eq!(
            c.segments(),
            &[
                Segment {
                    addr: DATA,
                    len: 16,
                    writable: false
                },
                Segment {
                    addr: DATA + 0x100,
                    len: 4,
                    writable: true
                },
                Segment {
                    addr: DATA + 0x200,
                    len: 20,
                    writable: true
                },
            ]
        );
        assert_eq!(echo(&q, &c), 16);
        // Without the feature the same chain is a ring error.
        let (mut d, mut q) = split(&mem, 8, features::VERSION_1);
        d.add_indirect(table, &[Buf::r(DATA, 16)]);
        assert_eq!(q.pop().unwrap_err(), QueueError::IndirectNotNegotiated);
    }
}

#[test]
fn split_event_idx_interrupt_suppression() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = split(&mem, 8, ALL);
    let complete = |d: &mut SplitDriver, q: &mut Queue, n: usize| {
        for _ in 0..n {
            d.add_chain(&[Buf::w(DATA, 4)]);
            let c = q.pop().unwrap().unwrap();
            q.add_used(c.head(), 0);
        }
        let r = q.flush_used();
        while d.pop_used().is_some() {}
        r
    };
    // First flush always notifies (no signal yet).
    d.set_used_event(100);
    assert!(complete(&mut d, &mut q, 1));
    // used idx 1 -> 2, driver wants an interrupt once entry 5 is used.
    d.set_used_event(5);
    assert!(!complete(&mut d, &mut q, 1)); // 2
    assert!(!complete(&mut d, &mut q, 3)); // 5: event 5 not yet crossed (5 used means idx 6)
    assert!(complete(&mut d, &mut q, 1)); // 6: crossed
    assert!(!complete(&mut d, &mut q, 1)); // 7: event stays behind
    d.set_used_event(7);
    assert!(complete(&mut d, &mut q, 2)); // 9: 7 in [7, 9)
}

#[test]
fn split_event_idx_wraps_at_65535() {
    let mem = anon_memory(BASE, MEM);
    let d = SplitDriver::new(mem.clone(), RING, 8);
    // Start near the u16 wrap, as a restarted queue would.
    let state = QueueState {
        next_avail: 0xfffd,
        next_used: 0xfffd,
        ..QueueState::default()
    };
    let mut d = d;
    d.set_avail_idx(0xfffd);
    // The used idx in memory must match the state for the driver helper.
    super::testdriver::store_u16(&mem, d.used + 2, 0xfffd);
    let mut q = Queue::with_state(d.config(), ALL, mem.clone(), state).unwrap();
    let step = |d: &mut SplitDriver, q: &mut Queue| {
        d.add_chain(&[Buf::w(DATA, 4)]);
        let c = q.pop().unwrap().unwrap();
        q.add_used(c.head(), 0);
        q.flush_used()
    };
    d.set_used_event(0x1234);
    assert!(step(&mut d, &mut q)); // first signal always: used idx 0xfffe
    d.set_used_event(0xffff);
    assert!(!step(&mut d, &mut q)); // used idx 0xffff: entry 0xffff not used yet
    assert!(step(&mut d, &mut q)); // used idx 0x0000: entry 0xffff used across the wrap
    assert_eq!(q.state().next_used, 0x0000);
    d.set_used_event(0x0000);
    assert!(step(&mut d, &mut q)); // used idx 1
    assert!(!step(&mut d, &mut q)); // used idx 2
    assert_eq!(q.state().next_avail, 0x0002);
}

#[test]
fn split_no_interrupt_flag_without_event_idx() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = split(&mem, 8, features::VERSION_1);
    d.set_avail_flags(1);
    d.add_chain(&[Buf::w(DATA, 4)]);
    let c = q.pop().unwrap().unwrap();
    q.add_used(c.head(), 4);
    assert!(!q.flush_used());
    d.set_avail_flags(0);
    d.add_chain(&[Buf::w(DATA, 4)]);
    let c = q.pop().unwrap().unwrap();
    q.add_used(c.head(), 4);
    assert!(q.flush_used());
    // Nothing staged: nothing to signal.
    assert!(!q.flush_used());
}

#[test]
fn split_notification_enable_recheck() {
    for feats in [features::VERSION_1, ALL] {
        let event_idx = feats & features::EVENT_IDX != 0;
        let mem = anon_memory(BASE, MEM);
        let (mut d, mut q) = split(&mem, 8, feats);
        q.disable_notifications();
        let old = d.avail_idx();
        d.add_chain(&[Buf::w(DATA, 4)]);
        assert!(
            !d.must_kick(event_idx, old, d.avail_idx()),
            "kick while polling"
        );
        // A buffer added while disabled is reported by the re-check: do not sleep.
        assert!(q.enable_notifications());
        q.pop().unwrap().unwrap();
        // Empty now: safe to sleep, and the next add must kick.
        assert!(!q.enable_notifications());
        let old = d.avail_idx();
        d.add_chain(&[Buf::w(DATA, 4)]);
        assert!(
            d.must_kick(event_idx, old, d.avail_idx()),
            "lost kick (feats {feats:#x})"
        );
    }
}

#[test]
fn split_disabled_notifications_stay_quiet_over_many_wraps() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = split(&mem, 8, ALL);
    q.disable_notifications();
    for i in 0..70_000u32 {
        let old = d.avail_idx();
        d.add_chain(&[Buf::w(DATA, 4)]);
        assert!(!d.must_kick(true, old, d.avail_idx()), "kick at {i}");
        let c = q.pop().unwrap().unwrap();
        q.add_used(c.head(), 0);
        q.flush_used();
        d.pop_used().unwrap();
    }
}

#[test]
fn packed_pop_used_in_order_across_wraps() {
    for (name, mem) in memories() {
        let (mut d, mut q) = packed(&mem, 8, ALL);
        mem.write(DATA, b"packed!!").unwrap();
        assert!(q.pop().unwrap().is_none());
        // 3-descriptor chains over a size-8 ring wrap repeatedly.
        for round in 0..20u64 {
            let id = d.add_chain(&[
                Buf::r(DATA, 4),
                Buf::r(DATA + 4, 4),
                Buf::w(DATA + 0x1000 + round * 8, 8),
            ]);
            let c = q.pop().unwrap().expect("chain");
            assert_eq!(c.head(), id, "{name} round {round}");
            assert_eq!(c.ring_descs(), 3);
            assert_eq!(c.segments().len(), 3);
            let n = echo(&q, &c);
            assert_eq!(n, 8);
            q.add_used(c.head(), n);
            assert_eq!(d.pop_used(), None, "visible before flush");
            q.flush_used();
            assert_eq!(d.pop_used(), Some((id, 8)), "{name} round {round}");
            let mut b = [0u8; 8];
            mem.read(DATA + 0x1000 + round * 8, &mut b).unwrap();
            assert_eq!(&b, b"packed!!");
        }
        assert_eq!(q.state(), {
            let s = q.state();
            QueueState {
                next_avail: (20 * 3 % 8) as u16,
                ..s
            }
        });
    }
}

#[test]
fn packed_burst_flush_and_out_of_order_completion() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = packed(&mem, 8, ALL);
    let a = d.add_chain(&[Buf::r(DATA, 4), Buf::w(DATA + 0x100, 4)]);
    let b = d.add_chain(&[Buf::w(DATA + 0x200, 4)]);
    let c = d.add_indirect(DATA + 0x8000, &[Buf::r(DATA, 4), Buf::w(DATA + 0x300, 16)]);
    let ca = q.pop().unwrap().unwrap();
    let cb = q.pop().unwrap().unwrap();
    let cc = q.pop().unwrap().unwrap();
    assert_eq!((ca.head(), cb.head(), cc.head()), (a, b, c));
    assert_eq!(cc.ring_descs(), 1);
    assert_eq!(cc.segments().len(), 2);
    // Complete out of order; used descriptors are written in completion order.
    q.add_used(b, 1);
    q.add_used(c, 2);
    q.add_used(a, 3);
    q.flush_used();
    assert_eq!(d.pop_used(), Some((b, 1)));
    assert_eq!(d.pop_used(), Some((c, 2)));
    assert_eq!(d.pop_used(), Some((a, 3)));
    assert_eq!(d.pop_used(), None);
    let st = q.state();
    assert_eq!((st.next_avail, st.next_used), (4, 4));
}

#[test]
fn packed_event_suppression() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = packed(&mem, 4, ALL);
    let one = |d: &mut PackedDriver, q: &mut Queue| {
        let id = d.add_chain(&[Buf::w(DATA, 4)]);
        let c = q.pop().unwrap().unwrap();
        assert_eq!(c.head(), id);
        q.add_used(id, 0);
        let r = q.flush_used();
        d.pop_used().unwrap();
        r
    };
    d.set_driver_event(1, 0); // DISABLE
    assert!(!one(&mut d, &mut q));
    d.set_driver_event(0, 0); // ENABLE
    assert!(one(&mut d, &mut q));
    // DESC: interrupt when the used index passes slot 3 with wrap 1. Used pos is now 2.
    d.set_driver_event(2, 3 | 0x8000);
    assert!(!one(&mut d, &mut q)); // used pos 3
    assert!(one(&mut d, &mut q)); // used pos 0 (wrapped): slot 3 used
                                  // Event in the next lap: slot 1 with wrap 0.
    d.set_driver_event(2, 1);
    assert!(!one(&mut d, &mut q)); // pos 1
    assert!(one(&mut d, &mut q)); // pos 2: slot 1 used
    assert!(!one(&mut d, &mut q));
}

#[test]
fn packed_notification_enable_recheck() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = packed(&mem, 8, ALL);
    q.disable_notifications();
    assert_eq!(d.device_event_flags(), 1);
    d.add_chain(&[Buf::w(DATA, 4)]);
    assert!(q.enable_notifications());
    assert_eq!(d.device_event_flags(), 0);
    q.pop().unwrap().unwrap();
    assert!(!q.enable_notifications());
}

#[test]
fn state_restart_continues_where_stopped() {
    for packed_ring in [false, true] {
        let mem = anon_memory(BASE, MEM);
        let feats = if packed_ring {
            ALL | features::RING_PACKED
        } else {
            ALL
        };
        let mut sd = SplitDriver::new(mem.clone(), RING, 8);
        let mut pd = PackedDriver::new(mem.clone(), RING + 0x8000, 8);
        let cfg = if packed_ring {
            pd.config()
        } else {
            sd.config()
        };
        let mut add = |n: usize| {
            for _ in 0..n {
                if packed_ring {
                    pd.add_chain(&[Buf::w(DATA, 4), Buf::w(DATA + 8, 4)]);
                } else {
                    sd.add_chain(&[Buf::w(DATA, 4), Buf::w(DATA + 8, 4)]);
                }
            }
        };
        add(3);
        let mut q = Queue::new(cfg, feats, mem.clone()).unwrap();
        for _ in 0..2 {
            let c = q.pop().unwrap().unwrap();
            q.add_used(c.head(), 4);
        }
        q.flush_used();
        let st = q.state();
        drop(q);
        let mut q = Queue::with_state(cfg, feats, mem.clone(), st).unwrap();
        let c = q.pop().unwrap().expect("third chain after restart");
        q.add_used(c.head(), 4);
        q.flush_used();
        assert!(q.pop().unwrap().is_none());
        // The driver reclaims used slots before reusing them.
        let mut got = 0;
        while pd.pop_used().is_some() {
            got += 1;
        }
        let mut add = |n: usize| {
            for _ in 0..n {
                if packed_ring {
                    pd.add_chain(&[Buf::w(DATA, 4), Buf::w(DATA + 8, 4)]);
                } else {
                    sd.add_chain(&[Buf::w(DATA, 4), Buf::w(DATA + 8, 4)]);
                }
            }
        };
        add(4);
        for _ in 0..4 {
            let c = q.pop().unwrap().unwrap();
            q.add_used(c.head(), 4);
        }
        q.flush_used();
        let st = q.state();
        if packed_ring {
            // 7 chains x 2 descriptors = 14 slots: position 6 on the second lap.
            assert_eq!(
                (st.next_avail, st.avail_wrap, st.next_used, st.used_wrap),
                (6, false, 6, false)
            );
            while pd.pop_used().is_some() {
                got += 1;
            }
            assert_eq!(got, 7);
        } else {
            assert_eq!((st.next_avail, st.next_used), (7, 7));
            assert_eq!(sd.used_idx(), 7);
        }
    }
}

// ---- malformed rings: every case is an error, sticky, and never a panic ----

fn sticky(q: &mut Queue, want: QueueError) {
    assert_eq!(q.pop().unwrap_err(), want);
    assert_eq!(q.pop().unwrap_err(), want, "error must stick");
    assert_eq!(q.error(), Some(&want));
    assert!(!q.enable_notifications());
}

#[test]
fn split_malformed_rings() {
    let mem = anon_memory(BASE, MEM);
    // Descriptor loop 0 -> 1 -> 0.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.write_desc(0, DATA, 4, desc_flags::NEXT, 1);
    d.write_desc(1, DATA, 4, desc_flags::NEXT, 0);
    d.push_head(0);
    sticky(&mut q, QueueError::ChainLoop);

    // Head index out of range.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.push_head(8);
    sticky(
        &mut q,
        QueueError::DescIndexOutOfRange { index: 8, size: 8 },
    );

    // Next index out of range.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.write_desc(0, DATA, 4, desc_flags::NEXT, 200);
    d.push_head(0);
    sticky(
        &mut q,
        QueueError::DescIndexOutOfRange {
            index: 200,
            size: 8,
        },
    );

    // Avail idx jumping more than the queue size.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.set_avail_idx(9);
    sticky(&mut q, QueueError::AvailIdxJump { avail: 9, next: 0 });

    // Indirect table length not a multiple of 16, empty, and too long.
    for len in [17u32, 0, 16 * (MAX_INDIRECT_FLOOR + 1)] {
        let (mut d, mut q) = split(&mem, 8, ALL);
        d.write_desc(0, DATA, len, desc_flags::INDIRECT, 0);
        d.push_head(0);
        sticky(&mut q, QueueError::BadIndirectLen(len));
    }

    // Nested indirect.
    let (mut d, mut q) = split(&mem, 8, ALL);
    let table = DATA + 0x8000;
    mem.write(table, &{
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&DATA.to_le_bytes());
        b[8..12].copy_from_slice(&16u32.to_le_bytes());
        b[12..14].copy_from_slice(&desc_flags::INDIRECT.to_le_bytes());
        b
    })
    .unwrap();
    d.write_desc(0, table, 16, desc_flags::INDIRECT, 0);
    d.push_head(0);
    sticky(&mut q, QueueError::NestedIndirect);

    // Loop inside an indirect table.
    let (mut d, mut q) = split(&mem, 8, ALL);
    for i in 0..2u64 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&DATA.to_le_bytes());
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        b[12..14].copy_from_slice(&desc_flags::NEXT.to_le_bytes());
        b[14..16].copy_from_slice(&((1 - i) as u16).to_le_bytes());
        mem.write(table + 16 * i, &b).unwrap();
    }
    d.write_desc(0, table, 32, desc_flags::INDIRECT, 0);
    d.push_head(0);
    sticky(&mut q, QueueError::ChainLoop);

    // INDIRECT together with NEXT.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.write_desc(0, table, 16, desc_flags::INDIRECT | desc_flags::NEXT, 1);
    d.push_head(0);
    sticky(&mut q, QueueError::IndirectWithNext);

    // Indirect table outside the DMA maps.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.write_desc(0, 0x1000, 16, desc_flags::INDIRECT, 0);
    d.push_head(0);
    assert!(matches!(
        q.pop().unwrap_err(),
        QueueError::RingNotMapped {
            what: "indirect table",
            ..
        }
    ));

    // Chain longer than 4 GiB.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.write_desc(0, DATA, 0xc000_0000, desc_flags::NEXT, 1);
    d.write_desc(1, DATA, 0xc000_0000, 0, 0);
    d.push_head(0);
    sticky(&mut q, QueueError::ChainTooLong);

    // Writable before readable.
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.add_chain(&[Buf::w(DATA, 4), Buf::r(DATA, 4)]);
    sticky(&mut q, QueueError::WritableBeforeReadable);
}

#[test]
fn buffers_outside_maps_fail_the_request_not_the_queue() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = split(&mem, 8, ALL);
    let outside = BASE + MEM as u64 - 2;
    d.add_chain(&[Buf::r(outside, 8), Buf::w(0x10, 8)]);
    let c = q.pop().unwrap().unwrap();
    let mut r = c.reader(q.memory());
    let mut b = [0u8; 8];
    assert!(matches!(
        r.read_exact(&mut b),
        Err(ChainError::Memory(MemError::Unmapped { .. }))
    ));
    let mut w = c.writer(q.memory());
    assert!(w.write(&[1; 8]).is_err());
    assert!(w.iovecs(8, &mut Vec::new()).is_err());
    assert!(q.error().is_none());
    q.add_used(c.head(), 0);
    q.flush_used();
    assert_eq!(d.pop_used(), Some((u32::from(c.head()), 0)));
}

#[test]
fn packed_malformed_rings() {
    let mem = anon_memory(BASE, MEM);
    // Every descriptor says NEXT: the chain never ends.
    let (d, mut q) = packed(&mem, 4, ALL);
    for i in 0..4 {
        d.write_desc(i, DATA, 4, 0, d.avail_flags(desc_flags::NEXT));
    }
    sticky(&mut q, QueueError::ChainLoop);

    // Buffer id out of range.
    let (d, mut q) = packed(&mem, 4, ALL);
    d.write_desc(0, DATA, 4, 9, d.avail_flags(0));
    sticky(&mut q, QueueError::BadBufferId(9));

    // Nested indirect, bad indirect length, indirect without the feature.
    let (mut d, mut q) = packed(&mem, 4, ALL);
    let table = DATA + 0x8000;
    d.add_indirect(table, &[Buf::r(DATA, 4)]);
    mem.write_obj(table + 14, &desc_flags::INDIRECT).unwrap();
    sticky(&mut q, QueueError::NestedIndirect);
    let (d, mut q) = packed(&mem, 4, ALL);
    d.write_desc(0, table, 24, 0, d.avail_flags(desc_flags::INDIRECT));
    sticky(&mut q, QueueError::BadIndirectLen(24));
    let (mut d, mut q) = packed(&mem, 4, features::VERSION_1);
    d.add_indirect(table, &[Buf::r(DATA, 4)]);
    sticky(&mut q, QueueError::IndirectNotNegotiated);

    // add_used with a bogus id is recorded, not a panic.
    let (_d, mut q) = packed(&mem, 4, ALL);
    q.add_used(77, 0);
    assert_eq!(q.error(), Some(&QueueError::BadBufferId(77)));
}

#[test]
fn start_validation() {
    let mem = anon_memory(BASE, MEM);
    let good = SplitDriver::new(mem.clone(), RING, 8).config();
    let bad = |cfg: QueueConfig, feats: u64| Queue::new(cfg, feats, mem.clone()).unwrap_err();
    assert_eq!(
        bad(QueueConfig { size: 0, ..good }, ALL),
        QueueError::BadSize(0)
    );
    assert_eq!(
        bad(QueueConfig { size: 6, ..good }, ALL),
        QueueError::BadSize(6)
    );
    assert!(matches!(
        bad(
            QueueConfig {
                desc_addr: good.desc_addr + 8,
                ..good
            },
            ALL
        ),
        QueueError::Misaligned { .. }
    ));
    assert!(matches!(
        bad(
            QueueConfig {
                device_addr: good.device_addr + 2,
                ..good
            },
            ALL
        ),
        QueueError::Misaligned { .. }
    ));
    // Used ring running off the end of memory.
    let end = BASE + MEM as u64;
    assert!(matches!(
        bad(
            QueueConfig {
                device_addr: end - 0x40,
                ..good
            },
            ALL
        ),
        QueueError::RingNotMapped {
            what: "used ring",
            ..
        }
    ));
    // Packed sizes need not be powers of two, but must fit.
    let p = PackedDriver::new(mem.clone(), RING, 6).config();
    assert!(Queue::new(p, ALL | features::RING_PACKED, mem.clone()).is_ok());
    // The used ring must be writable.
    let m = Arc::new(MmapRegion::new(0x10000).unwrap());
    let ro = Arc::new(GuestMemory::from_dma(
        &[DmaRegion {
            iova: 0,
            size: 0x10000,
            prot: 1,
            mapping: Some(m),
            map_offset: 0,
        }],
        None,
    ));
    let cfg = QueueConfig {
        size: 8,
        desc_addr: 0,
        driver_addr: 0x1000,
        device_addr: 0x2000,
        packed: false,
    };
    assert!(matches!(
        Queue::new(cfg, ALL, ro).unwrap_err(),
        QueueError::RingNotMapped {
            err: MemError::ReadOnly { .. },
            ..
        }
    ));
}

#[test]
fn cursors_straddle_dma_maps_and_give_iovecs() {
    // Two maps back to back: a buffer crossing 0x20000 spans both.
    let a = Arc::new(MmapRegion::new(0x10000).unwrap());
    let b = Arc::new(MmapRegion::new(0x10000).unwrap());
    let mem = Arc::new(GuestMemory::from_dma(
        &[
            DmaRegion {
                iova: 0x10000,
                size: 0x10000,
                prot: 3,
                mapping: Some(a),
                map_offset: 0,
            },
            DmaRegion {
                iova: 0x20000,
                size: 0x10000,
                prot: 3,
                mapping: Some(b),
                map_offset: 0,
            },
        ],
        None,
    ));
    let mut d = SplitDriver::new(mem.clone(), 0x10000, 8);
    let src: Vec<u8> = (0..200u8).collect();
    mem.write(0x20000 - 100, &src).unwrap();
    d.add_chain(&[Buf::r(0x20000 - 100, 200), Buf::w(0x20000 - 50, 100)]);
    let mut q = Queue::new(d.config(), ALL, mem.clone()).unwrap();
    let c = q.pop().unwrap().unwrap();
    let mut r = c.reader(&mem);
    let hdr: [u8; 10] = r.read_obj().unwrap();
    assert_eq!(hdr, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let mut iov = Vec::new();
    assert_eq!(r.iovecs(1000, &mut iov).unwrap(), 190);
    assert_eq!(iov.len(), 2, "split at the map boundary");
    assert_eq!(iov[0].iov_len, 90);
    assert_eq!(iov[1].iov_len, 100);
    // SAFETY: test: both iovecs point into live mappings held by `mem`.
    let first = unsafe { std::slice::from_raw_parts(iov[0].iov_base as *const u8, 90) };
    assert_eq!(first, &src[10..100]);
    assert_eq!(r.remaining(), 0);
    let mut w = c.writer(&mem);
    w.write_obj(&0xdead_beef_u32).unwrap();
    assert_eq!(w.bytes_written(), 4);
    assert_eq!(w.skip(40), 40);
    assert_eq!(w.bytes_written(), 4);
    assert!(matches!(
        w.write_all(&[0; 57]),
        Err(ChainError::Short {
            wanted: 57,
            available: 56
        })
    ));
    assert_eq!(w.write(&[7; 60]).unwrap(), 56);
    assert_eq!(w.bytes_written(), 60);
    let back: u32 = mem.read_obj(0x20000 - 50).unwrap();
    assert_eq!(back, 0xdead_beef);
}

#[test]
fn message_memory_refuses_iovecs_but_copies() {
    let mem = message_memory(BASE, MEM);
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.add_chain(&[Buf::r(DATA, 16)]);
    let c = q.pop().unwrap().unwrap();
    let mut r = c.reader(&mem);
    let mut iov = Vec::new();
    assert!(matches!(
        r.iovecs(16, &mut iov),
        Err(ChainError::NotMappable { .. })
    ));
    assert!(iov.is_empty());
    assert_eq!(r.remaining(), 16, "failed iovecs consume nothing");
    let mut b = [1u8; 16];
    r.read_exact(&mut b).unwrap();
    assert_eq!(b, [0; 16]);
}

#[test]
fn long_chains_spill_and_reuse() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = split(&mem, 64, ALL);
    let bufs: Vec<Buf> = (0..40).map(|i| Buf::r(DATA + 16 * i, 16)).collect();
    d.add_chain(&bufs);
    d.add_chain(&bufs[..2]);
    let mut c = DescChain::new();
    assert!(q.pop_into(&mut c).unwrap());
    assert_eq!(c.segments().len(), 40);
    assert_eq!(c.segments()[39].addr, DATA + 16 * 39);
    assert!(q.pop_into(&mut c).unwrap());
    assert_eq!(c.segments().len(), 2);
    assert!(!q.pop_into(&mut c).unwrap());
}

#[test]
fn memory_switch_keeps_position() {
    let mem = anon_memory(BASE, MEM);
    let (mut d, mut q) = split(&mem, 8, ALL);
    d.add_chain(&[Buf::w(DATA, 4)]);
    let c = q.pop().unwrap().unwrap();
    q.add_used(c.head(), 4);
    // A new snapshot of the same memory: staged completions are flushed into the old one.
    assert!(q.set_memory(mem.clone()).unwrap());
    assert_eq!(d.used_idx(), 1);
    d.add_chain(&[Buf::w(DATA, 4)]);
    assert!(q.pop().unwrap().is_some());
    // A snapshot without the ring (a remap in progress): the queue idles without touching
    // the ring, then resumes at the same position once the ring is mapped again.
    assert!(!q.set_memory(Arc::new(GuestMemory::empty())).unwrap());
    assert!(q.waiting_for_memory().is_some());
    d.add_chain(&[Buf::w(DATA, 4)]);
    assert!(q.pop().unwrap().is_none());
    assert!(!q.enable_notifications());
    q.set_memory(mem.clone()).unwrap();
    assert!(q.waiting_for_memory().is_none());
    assert!(q.pop().unwrap().is_some());
    assert_eq!(q.state().next_avail, 3);
}

/// Random ring contents never panic, never loop, and every chain that pops is in bounds.
#[test]
fn random_rings_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mem = anon_memory(BASE, MEM);
    for round in 0..400 {
        let packed_ring = round % 2 == 1;
        let size = if packed_ring {
            1 + (rnd() % 64) as u16
        } else {
            1 << (rnd() % 7)
        };
        let feats = ALL
            | if packed_ring {
                features::RING_PACKED
            } else {
                0
            };
        // Random bytes over the rings and a small table area, with plausible addresses
        // mixed in so some chains are valid.
        let mut junk = vec![0u8; 0x4000];
        for c in junk.chunks_mut(8) {
            let v = match rnd() % 4 {
                0 => DATA + rnd() % 0x1000,
                1 => rnd() % 8,
                2 => RING + rnd() % 0x4000,
                _ => rnd(),
            };
            c.copy_from_slice(&v.to_le_bytes());
        }
        mem.write(RING, &junk).unwrap();
        let cfg = QueueConfig {
            size,
            desc_addr: RING,
            driver_addr: RING + 0x1000,
            device_addr: RING + 0x2000,
            packed: packed_ring,
        };
        let Ok(mut q) = Queue::new(cfg, feats, mem.clone()) else {
            continue;
        };
        for _ in 0..(2 * u32::from(size) + 4) {
            match q.pop() {
                Ok(Some(c)) => {
                    assert!(c.readable_len() + c.writable_len() <= u64::from(u32::MAX));
                    let mut r = c.reader(&mem);
                    let mut b = [0u8; 64];
                    while let Ok(n) = r.read(&mut b) {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = c.writer(&mem).write(&[0; 16]);
                    q.add_used(c.head(), 0);
                }
                Ok(None) | Err(_) => break,
            }
            q.flush_used();
        }
        let _ = q.enable_notifications();
    }
}

/// Differential check against rust-vmm virtio-queue: the same split ring popped by both
/// gives the same heads and descriptors.
#[test]
fn split_matches_virtio_queue() {
    use virtio_queue::desc::{split::Descriptor as VqDesc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryMmap};

    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let host = gm.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: test: alias the mock's memory (alive for the whole test) without owning it.
    let alias = unsafe {
        MmapRegion::build_raw(
            host,
            0x10_0000,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .unwrap();
    let mem = Arc::new(GuestMemory::from_dma(
        &[DmaRegion {
            iova: 0,
            size: 0x10_0000,
            prot: 3,
            mapping: Some(Arc::new(alias)),
            map_offset: 0,
        }],
        None,
    ));
    let mock = MockSplitQueue::create(&gm, GuestAddress(0), 16);
    let descs = [
        RawDescriptor::from(VqDesc::new(0x8000, 0x10, desc_flags::NEXT, 1)),
        RawDescriptor::from(VqDesc::new(
            0x9000,
            0x200,
            desc_flags::NEXT | desc_flags::WRITE,
            2,
        )),
        RawDescriptor::from(VqDesc::new(0xa000, 1, desc_flags::WRITE, 0)),
        RawDescriptor::from(VqDesc::new(0xb000, 0x30, 0, 0)),
        RawDescriptor::from(VqDesc::new(0xc000, 0x40, desc_flags::WRITE, 0)),
    ];
    mock.build_multiple_desc_chains(&descs).unwrap();
    let mut vq: virtio_queue::Queue = mock.create_queue().unwrap();
    let cfg = QueueConfig {
        size: 16,
        desc_addr: mock.desc_table_addr().0,
        driver_addr: mock.avail_addr().0,
        device_addr: mock.used_addr().0,
        packed: false,
    };
    let mut ours = Queue::new(cfg, features::VERSION_1, mem).unwrap();
    let mut theirs = Vec::new();
    for chain in vq.iter(&gm).unwrap() {
        let segs: Vec<Segment> = chain
            .map(|d| Segment {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        theirs.push(segs);
    }
    let mut mine = Vec::new();
    while let Some(c) = ours.pop().unwrap() {
        mine.push(c.segments().to_vec());
    }
    assert!(!theirs.is_empty());
    assert_eq!(mine, theirs);
}

/// Ring-handling cost per chain, ours vs rust-vmm virtio-queue, on identical rings: 64
/// blk-like 3-descriptor chains per burst, pop + walk + add_used + one notification decision.
/// Run with `cargo test --release -p emudev-virtio --lib bench_ -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_split_vs_virtio_queue() {
    use std::time::Instant;
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemory as _, GuestMemoryMmap};

    const SIZE: u16 = 256;
    const BURST: u16 = 64;
    const ROUNDS: u32 = 1_000;
    let trials: u32 = std::env::var("BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let only_ours = std::env::var("BENCH_ONLY_OURS").is_ok();
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let host = gm.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: test: alias the mapping owned by `gm`, which outlives `mem`.
    let alias = unsafe {
        MmapRegion::build_raw(
            host,
            0x10_0000,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .unwrap();
    let mem = Arc::new(GuestMemory::from_dma(
        &[DmaRegion {
            iova: 0,
            size: 0x10_0000,
            prot: 3,
            mapping: Some(Arc::new(alias)),
            map_offset: 0,
        }],
        None,
    ));
    let d = SplitDriver::new(mem.clone(), 0, SIZE);
    // 3-descriptor chains (header, data, status) at fixed descriptors 3i..3i+2.
    for i in 0..BURST {
        let b = 0x8_0000 + u64::from(i) * 0x1000;
        d.write_desc(3 * i, b, 16, desc_flags::NEXT, 3 * i + 1);
        d.write_desc(
            3 * i + 1,
            b + 0x200,
            4096,
            desc_flags::NEXT | desc_flags::WRITE,
            3 * i + 2,
        );
        d.write_desc(3 * i + 2, b + 0x100, 1, desc_flags::WRITE, 0);
    }
    let avail = d.avail;
    let refill = |idx: &mut u16| {
        for i in 0..BURST {
            let slot = u64::from(idx.wrapping_add(i) % SIZE);
            // SAFETY: test: inside the mapping.
            unsafe { *(host.add((avail + 4 + 2 * slot) as usize) as *mut u16) = 3 * i };
        }
        *idx = idx.wrapping_add(BURST);
        // SAFETY: test: avail idx, 2-aligned, inside the mapping.
        unsafe { std::sync::atomic::AtomicU16::from_ptr(host.add(avail as usize + 2) as *mut u16) }
            .store(*idx, std::sync::atomic::Ordering::Release);
    };

    // Alternate short trials and keep the best of each: the build machine is shared.
    let mut q = Queue::new(d.config(), ALL, mem.clone()).unwrap();
    let mut vq = virtio_queue::Queue::new(SIZE).unwrap();
    vq.set_desc_table_address(Some(d.desc as u32), Some(0));
    vq.set_avail_ring_address(Some(d.avail as u32), Some(0));
    vq.set_used_ring_address(Some(d.used as u32), Some(0));
    vq.set_event_idx(true);
    vq.set_ready(true);
    let mut chain = DescChain::new();
    let mut idx = 0u16;
    let mut sink = 0u64;
    let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
    // Each loop in its own non-inlined function so neither side's inlining affects the other.
    #[inline(never)]
    fn run_ours(
        q: &mut Queue,
        chain: &mut DescChain,
        refill: &impl Fn(&mut u16),
        idx: &mut u16,
        rounds: u32,
    ) -> u64 {
        let mut sink = 0u64;
        for _ in 0..rounds {
            refill(idx);
            while q.pop_into(chain).unwrap() {
                for s in chain.segments() {
                    sink = sink.wrapping_add(s.addr ^ u64::from(s.len));
                }
                q.add_used(chain.head(), 1);
            }
            sink += u64::from(q.flush_used());
        }
        sink
    }
    #[inline(never)]
    fn run_theirs(
        vq: &mut virtio_queue::Queue,
        gm: &GuestMemoryMmap<()>,
        refill: &impl Fn(&mut u16),
        idx: &mut u16,
        rounds: u32,
    ) -> u64 {
        let mut sink = 0u64;
        for _ in 0..rounds {
            refill(idx);
            while let Some(c) = vq.pop_descriptor_chain(gm) {
                let head = c.head_index();
                for desc in c {
                    sink = sink.wrapping_add(desc.addr().0 ^ u64::from(desc.len()));
                }
                vq.add_used(gm, head, 1).unwrap();
            }
            sink += u64::from(vq.needs_notification(gm).unwrap());
        }
        sink
    }
    for _ in 0..trials {
        let t = Instant::now();
        sink = sink.wrapping_add(run_ours(&mut q, &mut chain, &refill, &mut idx, ROUNDS));
        ours = ours.min(t.elapsed().as_nanos() as f64 / f64::from(ROUNDS * u32::from(BURST)));
        // virtio-queue continues on the same ring from the same avail position.
        if only_ours {
            continue;
        }
        vq.set_next_avail(idx);
        vq.set_next_used(idx);
        let t = Instant::now();
        sink = sink.wrapping_add(run_theirs(&mut vq, &gm, &refill, &mut idx, ROUNDS));
        theirs = theirs.min(t.elapsed().as_nanos() as f64 / f64::from(ROUNDS * u32::from(BURST)));
        q = Queue::with_state(
            d.config(),
            ALL,
            mem.clone(),
            QueueState {
                next_avail: idx,
                next_used: idx,
                ..QueueState::default()
            },
        )
        .unwrap();
    }
    println!("ns/chain (best of {trials}): ours {ours:.1}, virtio-queue {theirs:.1}, ratio {:.3} ({sink})", ours / theirs);
}
