//! Split and packed ring walking over fuzzed guest memory.
//!
//! The fuzzer writes the descriptor table / ring and the avail (driver) area of a 64 KiB
//! guest memory window at 0x10000 (below it nothing is mapped), then drives the device side
//! with a sequence of operations: pop a chain and consume it (read the readable part, write
//! the writable part), complete it, flush, toggle notifications, and let the "driver" scribble
//! over memory between steps. The queue must never panic, and every access goes through
//! `GuestMemory`, which refuses anything outside the window.
//!
//! Input layout:
//! - byte 0: bit 0 packed, bit 1 INDIRECT_DESC, bit 2 EVENT_IDX, bit 3 message-backed memory
//!   (the `--no-shared-mem` path, no host pointers), bits 4-7 queue size exponent (size =
//!   1 << (n % 9), so 1..=256); n == 15 uses byte 1..3 as a raw size.
//! - bytes 1..3: raw queue size (only when selected above).
//! - then `INIT_LEN` bytes copied to the start of the window (descriptors, rings).
//! - then ops, 1 byte each plus operands, until the input ends.

#![no_main]

use std::sync::Arc;

use emudev::GuestMemory;
use emudev_virtio::queue::features as qf;
use emudev_virtio::queue::testdriver::{anon_memory, message_memory};
use emudev_virtio::{DescChain, Queue, QueueConfig};
use libfuzzer_sys::fuzz_target;

const BASE: u64 = 0x1_0000;
const SIZE: usize = 0x1_0000;
const DESC: u64 = BASE;
const DRIVER: u64 = BASE + 0x1000;
const DEVICE: u64 = BASE + 0x2000;
const INIT_LEN: usize = 0x1040;
/// Upper bound on ops per input, so one input cannot run for long.
const MAX_OPS: usize = 512;

struct Input<'a> {
    d: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.d.split_first()?;
        self.d = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.d.len());
        let (a, b) = self.d.split_at(n);
        self.d = b;
        a
    }
}

fn consume(mem: &GuestMemory, chain: &DescChain, limit: usize) -> u32 {
    let mut buf = vec![0u8; (chain.readable_len() as usize).min(limit)];
    let _ = chain.reader(mem).read(&mut buf);
    let mut w = chain.writer(mem);
    let n = (chain.writable_len() as usize).min(limit);
    let out = vec![0xa5u8; n];
    w.write(&out).unwrap_or(0) as u32
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input { d: data };
    let Some(ctl) = inp.byte() else { return };
    let packed = ctl & 1 != 0;
    let exp = ctl >> 4;
    let size = if exp == 15 {
        let Some(s) = inp.u16() else { return };
        s
    } else {
        1u16 << (exp % 9)
    };
    let mut features = qf::VERSION_1;
    if ctl & 2 != 0 {
        features |= qf::INDIRECT_DESC;
    }
    if ctl & 4 != 0 {
        features |= qf::EVENT_IDX;
    }
    if packed {
        features |= qf::RING_PACKED;
    }
    let mem: Arc<GuestMemory> = if ctl & 8 != 0 {
        message_memory(BASE, SIZE)
    } else {
        anon_memory(BASE, SIZE)
    };
    let init = inp.take(INIT_LEN);
    mem.write(BASE, init).expect("window write");

    let cfg = QueueConfig {
        size,
        desc_addr: DESC,
        driver_addr: DRIVER,
        device_addr: DEVICE,
        packed,
    };
    let Ok(mut q) = Queue::new(cfg, features, mem.clone()) else {
        return;
    };
    let mut chain = DescChain::new();
    let mut outstanding: Vec<(u16, u32)> = Vec::new();
    for _ in 0..MAX_OPS {
        let Some(op) = inp.byte() else { break };
        match op % 8 {
            // Pop and consume up to (op >> 3) + 1 chains; complete them now or later.
            0 | 1 => {
                for _ in 0..=(op >> 3) {
                    match q.pop_into(&mut chain) {
                        Ok(true) => {
                            let len = consume(&mem, &chain, 1 << 16);
                            if op % 8 == 0 {
                                q.add_used(chain.head(), len);
                            } else {
                                outstanding.push((chain.head(), len));
                            }
                        }
                        Ok(false) | Err(_) => break,
                    }
                }
            }
            2 => {
                for (head, len) in outstanding.drain(..) {
                    q.add_used(head, len);
                }
            }
            3 => {
                let _ = q.flush_used();
            }
            4 => {
                let _ = q.enable_notifications();
            }
            5 => q.disable_notifications(),
            // The driver writes: `len` bytes at an offset in the window.
            6 => {
                let Some(off) = inp.u16() else { break };
                let Some(len) = inp.byte() else { break };
                let bytes = inp.take(usize::from(len));
                let off = u64::from(off) % SIZE as u64;
                let n = bytes.len().min(SIZE - off as usize);
                let _ = mem.write(BASE + off, &bytes[..n]);
            }
            // Complete a bogus head (a driver-visible lie the device must survive).
            _ => {
                let Some(head) = inp.u16() else { break };
                q.add_used(head, 0);
            }
        }
        let _ = q.has_available();
    }
    let _ = q.flush_used();
    let _ = q.state();
});
