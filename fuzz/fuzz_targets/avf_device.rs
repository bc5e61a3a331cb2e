//! The whole AVF device behind emudev's in-process transport: after a fixed Linux-like
//! bring-up (admin queue, VERSION, GET_VF_RESOURCES, IRQ map, one queue pair configured and
//! enabled), fuzzed operations hit it the way a hostile guest and network can: raw TX
//! descriptors and tail doorbells, admin-queue descriptors with arbitrary flags, lengths,
//! buffer addresses and virtchnl payloads, any BAR0 register write or read, guest RAM
//! scribbles (rings and buffers change under the device), frames from the backend, and
//! device resets. Admin-queue passes run inline on the fuzz thread (`AvfDevice::new_inline`:
//! the same pass code as the worker, without a thread and round trip per message; an
//! announced reset follows at once); the datapath is a task on a manual poller pool
//! (`PollerPool::manual`) that the fuzz thread polls after every operation until it is idle
//! (at most 4 passes), so inputs replay deterministically and without thread switches.
//!
//! Input: 20-byte ops `[kind, a, b, c, value(16)]`.

#![no_main]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use emudev::poller::PollerPool;
use emudev::transport::InProc;
use emudev_avf::adminq::{aq_op, flags, AqDesc};
use emudev_avf::regs::*;
use emudev_avf::virtchnl::op;
use emudev_avf::{AvfDevice, VfConfig};
use emudev_netback::{NetBackend, NetError, NetRx, NetTx, RxVerdict, TxBurst, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;
use zerocopy::IntoBytes;

const MAX_OPS: usize = 128;
const ATQ: u64 = 0x1_0000;
const ARQ: u64 = 0x1_1000;
const ATQ_BUF: u64 = 0x2_0000;
const ARQ_BUF: u64 = 0x4_0000;
const TX_RING: u64 = 0x6_0000;
const RX_RING: u64 = 0x7_0000;
const BUFS: u64 = 0x8_0000;
const RING: u32 = 32;

#[derive(Default, Clone)]
struct Backend(Arc<Mutex<VecDeque<Vec<u8>>>>);
struct Tx;
struct Rx(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl NetBackend for Backend {
    fn describe(&self) -> String {
        "fuzz".into()
    }
    fn max_queue_pairs(&self) -> u16 {
        2
    }
    fn rx(&self, _pair: u16) -> Result<Box<dyn NetRx>, NetError> {
        Ok(Box::new(Rx(self.0.clone())))
    }
    fn tx(&self, _pair: u16) -> Result<Box<dyn NetTx>, NetError> {
        Ok(Box::new(Tx))
    }
}

impl NetTx for Tx {
    fn send_burst(&mut self, burst: &TxBurst) -> Result<usize, NetError> {
        let mut f = Vec::new();
        for i in 0..burst.len() {
            burst.copy_frame(i, &mut f, usize::MAX);
        }
        Ok(burst.len())
    }
}

impl NetRx for Rx {
    fn recv_burst(
        &mut self,
        max: usize,
        sink: &mut dyn FnMut(&[u8]) -> RxVerdict,
    ) -> Result<usize, NetError> {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < max {
            let Some(f) = q.front() else { break };
            if sink(f) == RxVerdict::NoRoom {
                break;
            }
            q.pop_front();
            n += 1;
        }
        Ok(n)
    }
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

struct Drv {
    io: InProc<AvfDevice>,
    ntu: u32,
}

impl Drv {
    fn wr(&mut self, off: u64, v: u32) {
        let _ = self.io.write32(0, off, v);
    }
    fn put(&self, gpa: u64, data: &[u8]) {
        let _ = self.io.mem().write(gpa, data);
    }
    /// Queue one ATQ descriptor (payload in its slot's buffer) and ring the doorbell.
    fn send(&mut self, d: AqDesc, payload: &[u8]) {
        let i = u64::from(self.ntu);
        self.put(ATQ_BUF + i * 4096, payload);
        self.put(ATQ + i * 32, d.as_bytes());
        self.ntu = (self.ntu + 1) % RING;
        let t = self.ntu;
        self.wr(VF_ATQT, t);
        // The driver's head read (a no-op wait: the pass ran inline in the write).
        let _ = self.io.read32(0, VF_ATQH);
    }
    fn msg(&mut self, v_op: u32, payload: &[u8]) {
        let buf = ATQ_BUF + u64::from(self.ntu) * 4096;
        let d = AqDesc {
            flags: (flags::SI | flags::BUF | flags::RD).into(),
            opcode: aq_op::SEND_TO_PF.into(),
            datalen: (payload.len() as u16).into(),
            cookie_high: v_op.into(),
            addr_high: ((buf >> 32) as u32).into(),
            addr_low: (buf as u32).into(),
            ..AqDesc::default()
        };
        self.send(d, payload);
    }
    fn bring_up(&mut self) {
        self.wr(VF_ATQLEN, RING | AQ_LEN_ENABLE);
        self.wr(VF_ATQBAL, ATQ as u32);
        for i in 0..u64::from(RING) {
            let buf = ARQ_BUF + i * 4096;
            let d = AqDesc {
                flags: (flags::BUF | flags::LB).into(),
                datalen: 4096.into(),
                addr_low: (buf as u32).into(),
                ..AqDesc::default()
            };
            self.put(ARQ + i * 32, d.as_bytes());
        }
        self.wr(VF_ARQLEN, RING | AQ_LEN_ENABLE);
        self.wr(VF_ARQBAL, ARQ as u32);
        self.wr(VF_ARQT, RING - 1);
        self.msg(op::VERSION, &[1, 0, 0, 0, 1, 0, 0, 0]);
        self.msg(op::GET_VF_RESOURCES, &0x1ABD_8CF9u32.to_le_bytes());
        // One vector for queue 0, then the empty vector-0 entry (Linux's shape).
        let mut m = vec![2, 0];
        m.extend_from_slice(&[1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0]);
        m.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        self.msg(op::CONFIG_IRQ_MAP, &m);
        for i in 0..u64::from(RING) {
            self.put(RX_RING + i * 32, &(BUFS + i * 2048).to_le_bytes());
        }
        self.wr(QRX_TAIL, RING - 1);
        let mut q = vec![1, 0, 1, 0, 0, 0, 0, 0];
        let mut p = [0u8; 64];
        p[0] = 1;
        p[4..6].copy_from_slice(&(RING as u16).to_le_bytes());
        p[8..16].copy_from_slice(&TX_RING.to_le_bytes());
        p[24] = 1;
        p[28..32].copy_from_slice(&RING.to_le_bytes());
        p[36..40].copy_from_slice(&2048u32.to_le_bytes());
        p[40..44].copy_from_slice(&9728u32.to_le_bytes());
        p[48..56].copy_from_slice(&RX_RING.to_le_bytes());
        q.extend_from_slice(&p);
        self.msg(op::CONFIG_VSI_QUEUES, &q);
        self.msg(op::ENABLE_QUEUES, &[1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
    }
}

/// Run the datapath task until it is idle (bounded: a hostile ring may keep it busy).
fn run_datapath(pool: &PollerPool) {
    for _ in 0..4 {
        if pool.poll_manual() == 0 {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let backend = Backend::default();
    let inbox = backend.0.clone();
    let cfg = VfConfig::default();
    let Ok(pool) = PollerPool::manual("fuzz-avf-dp") else {
        return;
    };
    let Ok(dev) = AvfDevice::new_inline("fuzz-avf", cfg, Some(Arc::new(backend)), pool.clone())
    else {
        return;
    };
    let Ok(io) = InProc::new(dev, 1) else { return };
    let mut d = Drv { io, ntu: 0 };
    d.bring_up();
    run_datapath(&pool);
    for o in data.chunks_exact(20).take(MAX_OPS) {
        let (kind, a, b, c) = (o[0], o[1], o[2], o[3]);
        let v = &o[4..20];
        let w32 = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        match kind % 8 {
            0 => d.put(TX_RING + u64::from(a % 32) * 16, v),
            1 => d.wr(QTX_TAIL, u32::from(a % 33)),
            2 => {
                let mut desc = AqDesc {
                    flags: u16::from_le_bytes([b, c]).into(),
                    opcode: if a & 0x80 != 0 {
                        aq_op::SEND_TO_PF
                    } else {
                        u16::from(a)
                    }
                    .into(),
                    datalen: u16::from_le_bytes([v[0], v[1] & 0x1F]).into(),
                    cookie_high: u32::from(v[2] % 64).into(),
                    ..AqDesc::default()
                };
                let buf = if a & 0x40 != 0 {
                    u64::from(w32)
                } else {
                    ATQ_BUF + u64::from(d.ntu) * 4096
                };
                desc.addr_high = ((buf >> 32) as u32).into();
                desc.addr_low = (buf as u32).into();
                d.send(desc, &v[3..]);
            }
            3 => {
                let off = u64::from(u16::from_le_bytes([a, b])) * 4 % BAR0_SIZE;
                d.wr(off, w32);
            }
            4 => {
                let off = u64::from(u16::from_le_bytes([a, b])) * 4 % BAR0_SIZE;
                let _ = d.io.read32(0, off);
            }
            5 => {
                let gpa = u64::from(u32::from_le_bytes([a, b, c, 0])) % (1 << 20);
                d.put(gpa, &v[..8]);
            }
            6 => {
                let mut f = vec![0u8; VNET_HDR_LEN];
                f[0] = a & 3;
                let len = usize::from(u16::from_le_bytes([b, c]) % 9800);
                f.extend(v.iter().copied().cycle().take(len));
                if let Ok(mut q) = inbox.lock() {
                    q.push_back(f);
                }
                d.wr(QRX_TAIL, u32::from(a % 33));
            }
            _ => {
                let _ = d.io.reset();
                d.ntu = 0;
                d.bring_up();
            }
        }
        run_datapath(&pool);
    }
});
