//! The TX/RX datapath (avf-device.md §5): a [`PollTask`] on an emudev [`PollerPool`] walks
//! the enabled queues' rings, sends TX frames to the network backend (offloads as a vnet
//! header) and fills RX buffers from it.
//!
//! Like the admin-queue worker it never holds the core lock across guest-memory access: a
//! pass snapshots the queue contexts, does its DMA, then commits heads and counters only if
//! no reset happened meanwhile. A pass runs under `Shared::dp_pass`; DISABLE_QUEUES and VF
//! resets take that lock before their reply is delivered, so no DMA follows the reply.
//!
//! Wake sources while the pool thread sleeps: the device's kick eventfd (`Shared::dp_kick`:
//! TX/RX tail writes, queue enables, resume, new memory) and the backend RX wake fd of every
//! queue that can take frames. A queue whose ring is full or disabled is left out (its
//! backend fd would stay readable and spin the thread); the RX tail write that gives it
//! buffers kicks us.
//!
//! [`PollerPool`]: emudev::poller::PollerPool

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use emudev::poller::PollTask;
use emudev::GuestMemory;
use emudev_netback::hdr::F_DATA_VALID;
use emudev_netback::{NetBackend, NetRx, NetTx, RxVerdict, TxBurst, MAX_FRAME_LEN, VNET_HDR_LEN};
use zerocopy::IntoBytes;

use crate::adminq::{lock, Shared};
use crate::desc::{self, decode_tx, offload_header, owned, tx_cmd, RxWriteback, TxContext, TxDesc};
use crate::pf::{QueuePair, RxRing, TxRing};
use crate::regs;
use crate::rx::{self, Rss, RxInfo, RxPolicy};
use crate::virtchnl::EthStats;

/// Most data descriptors one TX packet may use.
pub const MAX_TX_BUFS: usize = 64;
/// Frames taken from the backend per queue and pass.
const RX_BURST: usize = 64;
/// Longest sleep while an open backend RX queue has no wake fd (its frames cannot wake the
/// pool thread). Every other wake source signals an fd, so otherwise the sleep is unbounded.
const NO_WAKE_FD_WAIT: Duration = Duration::from_millis(20);

/// Counters a pass accumulates before committing them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub rx_bytes: u64,
    pub rx_unicast: u64,
    pub rx_multicast: u64,
    pub rx_broadcast: u64,
    pub rx_discards: u64,
    pub tx_bytes: u64,
    pub tx_unicast: u64,
    pub tx_multicast: u64,
    pub tx_broadcast: u64,
    pub tx_errors: u64,
    /// Frames refused by the MAC filter (not a guest-visible counter).
    pub rx_filtered: u64,
}

impl Counters {
    fn add_to(&self, s: &mut EthStats) {
        let add = |f: &mut zerocopy::little_endian::U64, v: u64| f.set(f.get().wrapping_add(v));
        add(&mut s.rx_bytes, self.rx_bytes);
        add(&mut s.rx_unicast, self.rx_unicast);
        add(&mut s.rx_multicast, self.rx_multicast);
        add(&mut s.rx_broadcast, self.rx_broadcast);
        add(&mut s.rx_discards, self.rx_discards);
        add(&mut s.tx_bytes, self.tx_bytes);
        add(&mut s.tx_unicast, self.tx_unicast);
        add(&mut s.tx_multicast, self.tx_multicast);
        add(&mut s.tx_broadcast, self.tx_broadcast);
        add(&mut s.tx_errors, self.tx_errors);
    }
}

/// Unicast / multicast / broadcast by destination MAC.
fn classify(frame: &[u8]) -> u8 {
    match frame.get(..6) {
        Some(d) if d == [0xff; 6] => 2,
        Some(d) if d[0] & 1 != 0 => 1,
        _ => 0,
    }
}

/// Per-queue backend halves, opened when a queue is first enabled.
struct QueueIo {
    tx: Option<Box<dyn NetTx>>,
    rx: Option<Box<dyn NetRx>>,
    /// The last pass could not deliver from this backend queue (guest ring full or not
    /// receiving): its wake fd is not waited on until a kick.
    rx_parked: bool,
}

/// The datapath task's own state.
pub struct Poller {
    shared: Arc<Shared>,
    backend: Option<Arc<dyn NetBackend>>,
    io: Vec<QueueIo>,
    burst: TxBurst,
    scratch: Vec<u8>,
    /// Queue pairs last reported to the backend as active.
    active: u16,
}

impl Poller {
    pub fn new(shared: Arc<Shared>, backend: Option<Arc<dyn NetBackend>>, pairs: u16) -> Self {
        let io = (0..pairs)
            .map(|_| QueueIo {
                tx: None,
                rx: None,
                rx_parked: false,
            })
            .collect();
        Self {
            shared,
            backend,
            io,
            burst: TxBurst::new(),
            scratch: Vec::new(),
            active: 0,
        }
    }

    /// One pass over every enabled queue; true if any work was done.
    fn pass(&mut self) -> bool {
        let Some(mem) = self.shared.dp_memory() else {
            // Quiesced: do not wake on backend frames until resume kicks us.
            for q in &mut self.io {
                q.rx_parked = true;
            }
            return false;
        };
        let (epoch, queues, policy) = {
            let core = self.shared.core();
            let policy = RxPolicy::from_vf(&core.vf, || regs_rss(&self.shared.regs));
            (
                self.shared.epoch.load(Ordering::Acquire),
                core.vf.queues.clone(),
                policy,
            )
        };
        self.steer(&queues);
        let mut counters = Counters::default();
        let mut heads: Vec<(usize, Option<u16>, Option<u16>)> = Vec::new();
        let mut vectors: Vec<u16> = Vec::new();
        let mut busy = false;
        for (q, qp) in queues.iter().enumerate() {
            let mut tx_head = None;
            if let (true, Some(ring)) = (qp.tx_enabled, qp.tx) {
                if let Some((h, raised)) = self.tx_queue(&mem, q, qp, ring, &mut counters) {
                    busy |= h != qp.tx_head;
                    tx_head = Some(h);
                    if raised {
                        vectors.extend(qp.tx_vector);
                    }
                }
            }
            heads.push((q, tx_head, None));
        }
        let rx_heads = self.rx_all(&mem, &queues, &policy, &mut counters);
        for ((q, _, rx), new) in heads.iter_mut().zip(rx_heads) {
            let Some(h) = new else { continue };
            if let Some(qp) = queues.get(*q) {
                if h != qp.rx_head {
                    busy = true;
                    vectors.extend(qp.rx_vector);
                }
            }
            *rx = Some(h);
        }
        {
            let mut core = self.shared.core();
            if self.shared.epoch.load(Ordering::Acquire) != epoch {
                // Stale snapshot: nothing committed; poll again with the new state.
                return true;
            }
            for (q, tx, rx) in heads {
                let (Some(now), Some(was)) = (core.vf.queues.get_mut(q), queues.get(q)) else {
                    continue;
                };
                if let Some(h) = tx.filter(|_| now.tx == was.tx) {
                    now.tx_head = h;
                }
                if let Some(h) = rx.filter(|_| now.rx == was.rx) {
                    now.rx_head = h;
                }
            }
            counters.add_to(&mut core.vf.stats);
            core.rx_filtered = core.rx_filtered.wrapping_add(counters.rx_filtered);
        }
        vectors.sort_unstable();
        vectors.dedup();
        for v in vectors {
            self.shared.irqs.event(v);
        }
        busy
    }

    /// Tell the backend how many queue pairs receive (up to the last RX-enabled queue), so
    /// it does not steer flows to queues the driver stopped using (`ethtool -L`).
    fn steer(&mut self, queues: &[QueuePair]) {
        let active = queues
            .iter()
            .rposition(|q| q.rx_enabled)
            .map_or(0, |i| i as u16 + 1);
        if active == 0 || active == self.active {
            return;
        }
        self.active = active;
        if let Some(b) = &self.backend {
            if let Err(e) = b.set_active_pairs(active) {
                log::debug!("avf: backend active pairs {active}: {e}");
            }
        }
    }

    fn tx_half(&mut self, q: usize) -> Option<&mut Box<dyn NetTx>> {
        let io = self.io.get_mut(q)?;
        if io.tx.is_none() {
            let b = self.backend.as_ref()?;
            match b.tx(q as u16) {
                Ok(t) => io.tx = Some(t),
                Err(e) => log::warn!("avf: TX queue {q}: {e}"),
            }
        }
        io.tx.as_mut()
    }

    /// Process TX descriptors `[head, tail)`. Returns the new head and whether any RS
    /// write-back happened; `None` if the tail is out of range.
    fn tx_queue(
        &mut self,
        mem: &GuestMemory,
        q: usize,
        qp: &QueuePair,
        ring: TxRing,
        c: &mut Counters,
    ) -> Option<(u16, bool)> {
        let tail = (self.shared.regs.get(regs::QTX_TAIL + 4 * q as u64) & 0xFFFF) as u16;
        let n = owned(qp.tx_head, tail, ring.len)?;
        let mut h = qp.tx_head;
        let mut pkt_start = h;
        let mut ctx: Option<TxContext> = None;
        let mut bufs: Vec<desc::TxData> = Vec::new();
        let mut rs_pending: Vec<u16> = Vec::new();
        let mut rs_done: Vec<u16> = Vec::new();
        self.burst.clear();
        for _ in 0..n {
            let gpa = ring.addr + u64::from(h) * desc::TX_DESC_LEN as u64;
            let mut raw = [0u8; desc::TX_DESC_LEN];
            if let Err(e) = mem.read(gpa, &mut raw) {
                log::warn!("avf: TX queue {q} descriptor {h}: {e}");
                break;
            }
            let idx = h;
            h = (h + 1) % ring.len;
            match decode_tx(&raw) {
                TxDesc::Context(cx) => ctx = Some(cx),
                TxDesc::Other(_) => {}
                TxDesc::Data(d) => {
                    bufs.push(d);
                    if d.rs() {
                        rs_pending.push(idx);
                    }
                    if !d.eop() {
                        continue;
                    }
                    self.build_frame(mem, q, &bufs, ctx.as_ref(), c);
                    bufs.clear();
                    ctx = None;
                    rs_done.append(&mut rs_pending);
                    pkt_start = h;
                }
            }
        }
        if !self.burst.is_empty() {
            let burst = std::mem::take(&mut self.burst);
            if let Some(tx) = self.tx_half(q) {
                if let Err(e) = tx.send_burst(&burst) {
                    log::debug!("avf: TX queue {q}: {e}");
                }
            }
            self.burst = burst;
            self.burst.clear();
        }
        // Completion: qword1 = DESC_DONE on every RS descriptor of a finished packet.
        for idx in &rs_done {
            let gpa = ring.addr + u64::from(*idx) * desc::TX_DESC_LEN as u64 + 8;
            if let Err(e) = mem.write(gpa, &desc::TX_DESC_DONE.to_le_bytes()) {
                log::warn!("avf: TX queue {q} write-back {idx}: {e}");
            }
        }
        Some((pkt_start, !rs_done.is_empty()))
    }

    /// Gather one packet into the burst with its offload header (or count it as an error).
    fn build_frame(
        &mut self,
        mem: &GuestMemory,
        q: usize,
        bufs: &[desc::TxData],
        ctx: Option<&TxContext>,
        c: &mut Counters,
    ) {
        let Some(first) = bufs.first() else { return };
        if first.cmd & tx_cmd::DUMMY != 0 {
            return;
        }
        let total: usize = bufs.iter().map(|b| usize::from(b.len)).sum();
        if bufs.len() > MAX_TX_BUFS || total == 0 || total + VNET_HDR_LEN > MAX_FRAME_LEN {
            c.tx_errors += 1;
            return;
        }
        self.scratch.clear();
        self.scratch.resize(VNET_HDR_LEN + total, 0);
        let mut off = VNET_HDR_LEN;
        for b in bufs {
            let len = usize::from(b.len);
            if let Err(e) = mem.read(b.addr, &mut self.scratch[off..off + len]) {
                log::debug!("avf: TX queue {q} buffer {:#x}+{len}: {e}", b.addr);
                c.tx_errors += 1;
                return;
            }
            off += len;
        }
        let hdr = match offload_header(first, ctx, total) {
            Ok(h) => h,
            Err(e) => {
                log::debug!("avf: TX queue {q}: {e}");
                c.tx_errors += 1;
                return;
            }
        };
        if hdr.gso_type != emudev_netback::hdr::gso::NONE {
            if let Err(e) = desc::fix_tso_template(&mut self.scratch[VNET_HDR_LEN..], first) {
                log::debug!("avf: TX queue {q}: TSO template: {e}");
                c.tx_errors += 1;
                return;
            }
        }
        let mut hdr = hdr;
        if first.cmd & tx_cmd::IL2TAG1 != 0 {
            // Insert the 802.1Q tag after the MAC addresses; offsets move by 4.
            let tag = [0x81, 0x00, (first.l2tag1 >> 8) as u8, first.l2tag1 as u8];
            let at = VNET_HDR_LEN + 12;
            if self.scratch.len() < at || total + 4 + VNET_HDR_LEN > MAX_FRAME_LEN {
                c.tx_errors += 1;
                return;
            }
            self.scratch.splice(at..at, tag);
            if hdr.flags & emudev_netback::hdr::F_NEEDS_CSUM != 0 {
                hdr.csum_start = (hdr.csum_start.get() + 4).into();
            }
            if hdr.gso_type != emudev_netback::hdr::gso::NONE {
                hdr.hdr_len = (hdr.hdr_len.get() + 4).into();
            }
        }
        self.scratch[..VNET_HDR_LEN].copy_from_slice(hdr.as_bytes());
        let frame = &self.scratch[VNET_HDR_LEN..];
        c.tx_bytes += total as u64;
        match classify(frame) {
            0 => c.tx_unicast += 1,
            1 => c.tx_multicast += 1,
            _ => c.tx_broadcast += 1,
        }
        if self.backend.is_some() {
            self.burst.push_copy(&self.scratch);
            self.burst.end_frame();
        }
    }

    /// Receive from the backend into the guest's RX rings. Backend queue `b` is polled while
    /// guest queue `b` can receive (the backend spreads flows over the active pairs); each
    /// accepted frame goes to the queue RSS picks from its hash and the LUT, or to `b` when
    /// that queue cannot receive. Returns the new RX head of every ready queue.
    fn rx_all(
        &mut self,
        mem: &GuestMemory,
        queues: &[QueuePair],
        policy: &RxPolicy,
        c: &mut Counters,
    ) -> Vec<Option<u16>> {
        // (ring, head, tail) of the queues that can receive now.
        let mut rings: Vec<Option<(RxRing, u16, u16)>> = queues
            .iter()
            .enumerate()
            .map(|(q, qp)| {
                let ring = qp.rx.filter(|_| qp.rx_enabled)?;
                let tail = (self.shared.regs.get(regs::QRX_TAIL + 4 * q as u64) & 0xFFFF) as u16;
                owned(qp.rx_head, tail, ring.len)?;
                Some((ring, qp.rx_head, tail))
            })
            .collect();
        let Some(backend) = self.backend.clone() else {
            return rings.iter().map(|r| r.map(|(_, h, _)| h)).collect();
        };
        for b in 0..rings.len() {
            let Some(io) = self.io.get_mut(b) else {
                continue;
            };
            if rings[b].is_none() {
                io.rx_parked = true;
                continue;
            }
            if io.rx.is_none() {
                match backend.rx(b as u16) {
                    Ok(r) => io.rx = Some(r),
                    Err(e) => {
                        log::warn!("avf: RX queue {b}: {e}");
                        continue;
                    }
                }
            }
            let Some(rx) = io.rx.as_mut() else { continue };
            let mut no_room = false;
            let mut stripped = Vec::new();
            let mut sink = |frame: &[u8]| -> RxVerdict {
                let Some(mut data) = frame.get(VNET_HDR_LEN..) else {
                    return RxVerdict::Taken;
                };
                if !policy.accepts(data) {
                    c.rx_filtered += 1;
                    return RxVerdict::Taken;
                }
                let tag = if policy.strip {
                    rx::strip_vlan(data, &mut stripped)
                } else {
                    None
                };
                if tag.is_some() {
                    data = &stripped;
                }
                let valid = frame.first().is_some_and(|f| f & F_DATA_VALID != 0);
                let mut info = rx::classify(data, valid, policy);
                info.l2tag1 = tag;
                let t = info
                    .hash
                    .and_then(|h| policy.queue_for(h))
                    .map(usize::from)
                    .filter(|&t| rings.get(t).is_some_and(Option::is_some))
                    .unwrap_or(b);
                let Some(Some((ring, head, tail))) = rings.get_mut(t) else {
                    return RxVerdict::Taken;
                };
                match rx_frame(mem, *ring, *head, *tail, data, &info) {
                    RxResult::Delivered(nh) => {
                        *head = nh;
                        c.rx_bytes += data.len() as u64;
                        match classify(data) {
                            0 => c.rx_unicast += 1,
                            1 => c.rx_multicast += 1,
                            _ => c.rx_broadcast += 1,
                        }
                        RxVerdict::Taken
                    }
                    RxResult::NoRoom => {
                        no_room = true;
                        RxVerdict::NoRoom
                    }
                    RxResult::Dropped => {
                        c.rx_discards += 1;
                        RxVerdict::Taken
                    }
                }
            };
            if let Err(e) = rx.recv_burst(RX_BURST, &mut sink) {
                log::debug!("avf: RX queue {b}: {e}");
            }
            io.rx_parked = no_room;
        }
        rings.iter().map(|r| r.map(|(_, h, _)| h)).collect()
    }
}

impl PollTask for Poller {
    fn poll(&mut self) -> usize {
        if self.shared.dp_stopping() {
            return 0;
        }
        if self.shared.dp_fence_pending() {
            // Let the fencing thread have `dp_pass` first; poll again right after.
            return 1;
        }
        let shared = self.shared.clone();
        let _pass = lock(&shared.dp_pass);
        usize::from(self.pass())
    }

    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.shared.dp_kick.as_fd().as_raw_fd());
        out.extend(
            self.io
                .iter()
                .filter(|q| !q.rx_parked)
                .filter_map(|q| q.rx.as_ref().and_then(|r| r.wake_fd())),
        );
    }

    fn prepare_sleep(&mut self) -> bool {
        // A kick since the last drain may be for work the last pass did not see.
        match emudev::doorbell::drain_eventfd(&self.shared.dp_kick) {
            Ok(n) => n > 0,
            Err(e) => {
                log::debug!("avf: datapath kick drain: {e}");
                false
            }
        }
    }

    fn max_sleep(&self) -> Option<Duration> {
        self.io
            .iter()
            .any(|q| !q.rx_parked && q.rx.as_ref().is_some_and(|r| r.wake_fd().is_none()))
            .then_some(NO_WAKE_FD_WAIT)
    }
}

/// RSS parameters from the BAR0 registers (RSS_REG mode: the VF did not negotiate RSS_PF).
fn regs_rss(r: &crate::adminq::RegFile) -> Rss {
    let bytes = |base: u64, dwords: u64| -> Vec<u8> {
        (0..dwords)
            .flat_map(|i| r.get(base + 4 * i).to_le_bytes())
            .collect()
    };
    let hena = u64::from(r.get(regs::VFQF_HENA)) | (u64::from(r.get(regs::VFQF_HENA + 4)) << 32);
    Rss {
        key: bytes(regs::VFQF_HKEY, 13),
        lut: bytes(regs::VFQF_HLUT, 16),
        hena,
    }
}

/// What happened to one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxResult {
    /// Written; the new head.
    Delivered(u16),
    /// Not enough descriptors owned: keep the frame.
    NoRoom,
    /// Too big, empty, or a DMA error: counted as a discard.
    Dropped,
}

/// Write `data` into the RX descriptors starting at `head` (device owns `[head, tail)`):
/// data first, then write-backs in order, the last with EOF, each qword1 after a fence.
/// `info` (packet type, checksum status, hash) goes on the EOF descriptor only.
pub fn rx_frame(
    mem: &GuestMemory,
    ring: RxRing,
    head: u16,
    tail: u16,
    data: &[u8],
    info: &RxInfo,
) -> RxResult {
    let len = data.len();
    let buf = ring.buf_size as usize;
    if len == 0 || len > ring.max_pkt as usize || buf == 0 {
        return RxResult::Dropped;
    }
    let k = len.div_ceil(buf);
    let Some(avail) = owned(head, tail, ring.len) else {
        return RxResult::Dropped;
    };
    if k > usize::from(avail) {
        return RxResult::NoRoom;
    }
    let slot = |i: usize| ((usize::from(head) + i) % usize::from(ring.len)) as u64;
    let desc_gpa = |i: usize| ring.addr + slot(i) * desc::RX_DESC_LEN as u64;
    let mut chunks = Vec::with_capacity(k);
    for (i, chunk) in data.chunks(buf).enumerate() {
        let addr = match mem.read_obj::<zerocopy::little_endian::U64>(desc_gpa(i)) {
            Ok(a) => a.get(),
            Err(_) => return RxResult::Dropped,
        };
        if mem.write(addr, chunk).is_err() {
            return RxResult::Dropped;
        }
        chunks.push(chunk.len());
    }
    for (i, n) in chunks.iter().enumerate() {
        let eof = i + 1 == k;
        let wb = RxWriteback {
            len: *n as u16,
            eof,
            ptype: info.ptype,
            flags: info.flags,
            hash: info.hash.unwrap_or(0),
            l2tag1: info.l2tag1,
        }
        .encode();
        let gpa = desc_gpa(i);
        let mut rest = [0u8; 24];
        rest[..8].copy_from_slice(&wb[0].to_le_bytes());
        let ok = mem.write(gpa, &rest[..8]).is_ok() && mem.write(gpa + 16, &rest[8..]).is_ok();
        fence(Ordering::Release);
        if !ok || mem.write(gpa + 8, &wb[1].to_le_bytes()).is_err() {
            return RxResult::Dropped;
        }
    }
    RxResult::Delivered(((usize::from(head) + k) % usize::from(ring.len)) as u16)
}
