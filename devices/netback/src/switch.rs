//! In-process L2 learning switch: one port per NIC, so NICs served by the same process talk
//! with no host networking.
//!
//! Frames (vnet header included) are copied once into a buffer owned by the receiving port's
//! queue and copied again by the receiver into its guest. The forwarding database learns
//! source MACs (bounded size; when full, unknown destinations are flooded). Every port queue
//! is bounded and drops (and counts) when full; flooded frames (broadcast, multicast,
//! unknown unicast) may fill only half of a queue, so floods cannot starve unicast traffic.
//! Offloads the receiving port cannot take are finished here: checksums completed, TCP
//! segmentation done in software (other segmentation offloads are dropped).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::gso::segment_tcp;
use crate::hdr::{finish_checksum, Acceptance, VirtioNetHdr, VNET_HDR_LEN};
use crate::{NetBackend, NetError, NetRx, NetTx, Offloads, RxVerdict, TxBurst, MAX_FRAME_LEN};

/// Switch limits.
#[derive(Debug, Clone, Copy)]
pub struct SwitchOptions {
    /// Frames each port queue holds before dropping.
    pub queue_len: usize,
    /// Learned MAC addresses kept.
    pub fdb_max: usize,
    /// Ports the switch accepts.
    pub max_ports: usize,
}

impl Default for SwitchOptions {
    fn default() -> Self {
        Self {
            queue_len: 1024,
            fdb_max: 4096,
            max_ports: 64,
        }
    }
}

/// Counters of one port.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Frames the port's NIC sent into the switch.
    pub tx_frames: AtomicU64,
    /// Frames queued for the port's NIC.
    pub rx_queued: AtomicU64,
    /// Frames for this port dropped because its queue was full.
    pub rx_dropped_full: AtomicU64,
    /// Frames for this port dropped because it cannot take their offload.
    pub rx_dropped_offload: AtomicU64,
    /// TSO frames for this port segmented in software.
    pub rx_segmented: AtomicU64,
    /// Frames from this port that were malformed (too short) or hairpinned.
    pub tx_dropped: AtomicU64,
    /// Frames from this port that were flooded.
    pub tx_flooded: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct PortQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// Recycled buffers (bounded by the queue length).
    free: Mutex<Vec<Vec<u8>>>,
    wake: EventFd,
}

struct PortInner {
    id: usize,
    queues: Vec<PortQueue>,
    active: AtomicU16,
    offloads: AtomicU32,
    stats: PortStats,
}

impl PortInner {
    /// Queue a frame for this port. `buf` is taken (swapped for a recycled buffer).
    /// Offloads the port cannot take are finished here: partial checksums are completed and
    /// TCP segmentation is done in software; other segmentation offloads are dropped.
    fn enqueue(&self, buf: &mut Vec<u8>, hash: u32, flooded: bool, opts: &SwitchOptions) -> bool {
        let offloads = Offloads::from_bits_truncate(self.offloads.load(Ordering::Relaxed));
        if let Some(h) = VirtioNetHdr::parse(buf) {
            match h.acceptable(offloads) {
                Acceptance::AsIs => {}
                Acceptance::FinishChecksum => {
                    if finish_checksum(buf).is_err() {
                        self.stats
                            .rx_dropped_offload
                            .fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                }
                Acceptance::Drop => {
                    let mut scratch = Vec::new();
                    let mut all = true;
                    let r = segment_tcp(buf, &mut scratch, &mut |seg| {
                        let mut b = self.free_buffer(hash);
                        b.extend_from_slice(seg);
                        all &= self.push(b, hash, flooded, opts);
                    });
                    if r.is_err() {
                        self.stats
                            .rx_dropped_offload
                            .fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    self.stats.rx_segmented.fetch_add(1, Ordering::Relaxed);
                    return all;
                }
            }
        }
        let fresh = self.free_buffer(hash);
        self.push(std::mem::replace(buf, fresh), hash, flooded, opts)
    }

    fn queue_for(&self, hash: u32) -> Option<&PortQueue> {
        let active = self.active.load(Ordering::Relaxed).max(1) as u32;
        let qi = (hash % active) as usize;
        self.queues.get(qi).or(self.queues.first())
    }

    /// An empty recycled buffer (or a new one).
    fn free_buffer(&self, hash: u32) -> Vec<u8> {
        let mut b = self
            .queue_for(hash)
            .and_then(|q| lock(&q.free).pop())
            .unwrap_or_default();
        b.clear();
        b
    }

    /// Append a finished frame to the queue the flow hashes to; false if dropped.
    fn push(&self, frame: Vec<u8>, hash: u32, flooded: bool, opts: &SwitchOptions) -> bool {
        let Some(q) = self.queue_for(hash) else {
            return false;
        };
        let limit = if flooded {
            opts.queue_len / 2
        } else {
            opts.queue_len
        };
        let mut frames = lock(&q.frames);
        if frames.len() >= limit {
            drop(frames);
            self.stats.rx_dropped_full.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let was_empty = frames.is_empty();
        frames.push_back(frame);
        drop(frames);
        self.stats.rx_queued.fetch_add(1, Ordering::Relaxed);
        if was_empty {
            let _ = q.wake.write(1);
        }
        true
    }
}

#[derive(Default)]
struct State {
    ports: Vec<Option<Arc<PortInner>>>,
    /// MAC -> port id.
    fdb: HashMap<[u8; 6], usize>,
}

/// An in-process learning switch.
pub struct L2Switch {
    name: String,
    opts: SwitchOptions,
    state: RwLock<State>,
}

impl std::fmt::Debug for L2Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Switch")
            .field("name", &self.name)
            .finish()
    }
}

static NAMED: Mutex<Option<HashMap<String, Weak<L2Switch>>>> = Mutex::new(None);

impl L2Switch {
    pub fn new(name: &str, opts: SwitchOptions) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            opts,
            state: RwLock::new(State::default()),
        })
    }

    /// The process-wide switch called `name`, created on first use (with default options);
    /// it lives while a port or handle holds it.
    pub fn named(name: &str) -> Arc<Self> {
        let mut g = lock(&NAMED);
        let map = g.get_or_insert_with(HashMap::new);
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = map.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Self::new(name, SwitchOptions::default());
        map.insert(name.to_string(), Arc::downgrade(&s));
        s
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Attach a NIC with `queue_pairs` queue pairs.
    pub fn add_port(self: &Arc<Self>, queue_pairs: u16) -> Result<SwitchPort, NetError> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let id = match st.ports.iter().position(Option::is_none) {
            Some(i) => i,
            None if st.ports.len() < self.opts.max_ports => {
                st.ports.push(None);
                st.ports.len() - 1
            }
            None => {
                return Err(NetError::Switch {
                    switch: self.name.clone(),
                    reason: format!("all {} ports are taken", self.opts.max_ports),
                })
            }
        };
        let mut queues = Vec::new();
        for _ in 0..queue_pairs.max(1) {
            let wake =
                EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .map_err(std::io::Error::from)?;
            queues.push(PortQueue {
                frames: Mutex::new(VecDeque::with_capacity(self.opts.queue_len)),
                free: Mutex::new(Vec::new()),
                wake,
            });
        }
        let inner = Arc::new(PortInner {
            id,
            queues,
            active: AtomicU16::new(1),
            offloads: AtomicU32::new(0),
            stats: PortStats::default(),
        });
        st.ports[id] = Some(inner.clone());
        Ok(SwitchPort {
            switch: self.clone(),
            inner,
        })
    }

    /// Learned entries.
    pub fn fdb_len(&self) -> usize {
        self.state.read().map(|s| s.fdb.len()).unwrap_or(0)
    }

    /// Port a MAC was learned on.
    pub fn lookup(&self, mac: [u8; 6]) -> Option<usize> {
        self.state.read().ok()?.fdb.get(&mac).copied()
    }

    fn learn(&self, mac: [u8; 6], port: usize) {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return;
        }
        if let Ok(st) = self.state.read() {
            if st.fdb.get(&mac) == Some(&port) {
                return;
            }
        }
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let known = st.fdb.contains_key(&mac);
        if known || st.fdb.len() < self.opts.fdb_max {
            st.fdb.insert(mac, port);
        }
    }

    /// Forward one frame (header included) from port `from`. `buf` may be swapped for a
    /// recycled buffer.
    fn forward(&self, from: &PortInner, buf: &mut Vec<u8>) {
        let Some(eth) = buf.get(VNET_HDR_LEN..VNET_HDR_LEN + 14) else {
            from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&eth[..6]);
        src.copy_from_slice(&eth[6..12]);
        let hash = flow_hash(&dst, &src);
        self.learn(src, from.id);
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let target = if dst[0] & 1 == 0 {
            st.fdb.get(&dst).copied()
        } else {
            None
        };
        match target {
            Some(p) if p == from.id => {
                from.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Some(p) => {
                if let Some(Some(port)) = st.ports.get(p) {
                    port.enqueue(buf, hash, false, &self.opts);
                }
            }
            None => {
                from.stats.tx_flooded.fetch_add(1, Ordering::Relaxed);
                let mut copy = Vec::new();
                for port in st.ports.iter().flatten() {
                    if port.id == from.id {
                        continue;
                    }
                    copy.clear();
                    copy.extend_from_slice(buf);
                    port.enqueue(&mut copy, hash, true, &self.opts);
                }
            }
        }
    }

    fn remove_port(&self, id: usize) {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = st.ports.get_mut(id) {
            *slot = None;
        }
        st.fdb.retain(|_, p| *p != id);
    }
}

fn flow_hash(a: &[u8; 6], b: &[u8; 6]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for x in a.iter().chain(b.iter()) {
        h = (h ^ u32::from(*x)).wrapping_mul(0x0100_0193);
    }
    h
}

/// One NIC's port; the NIC's backend. Dropping it detaches the port.
pub struct SwitchPort {
    switch: Arc<L2Switch>,
    inner: Arc<PortInner>,
}

impl std::fmt::Debug for SwitchPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchPort")
            .field("switch", &self.switch.name)
            .field("id", &self.inner.id)
            .finish()
    }
}

impl SwitchPort {
    pub fn id(&self) -> usize {
        self.inner.id
    }

    pub fn stats(&self) -> &PortStats {
        &self.inner.stats
    }

    pub fn switch(&self) -> &Arc<L2Switch> {
        &self.switch
    }
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        self.switch.remove_port(self.inner.id);
    }
}

impl NetBackend for SwitchPort {
    fn describe(&self) -> String {
        format!("switch:{}/port{}", self.switch.name, self.inner.id)
    }

    fn max_queue_pairs(&self) -> u16 {
        self.inner.queues.len() as u16
    }

    fn rx(&self, pair: u16) -> Result<Box<dyn NetRx>, NetError> {
        if usize::from(pair) >= self.inner.queues.len() {
            return Err(NetError::NoSuchQueue {
                pair,
                pairs: self.max_queue_pairs(),
            });
        }
        Ok(Box::new(SwitchRx {
            port: self.inner.clone(),
            qi: usize::from(pair),
            queue_len: self.switch.opts.queue_len,
        }))
    }

    fn tx(&self, pair: u16) -> Result<Box<dyn NetTx>, NetError> {
        if usize::from(pair) >= self.inner.queues.len() {
            return Err(NetError::NoSuchQueue {
                pair,
                pairs: self.max_queue_pairs(),
            });
        }
        Ok(Box::new(SwitchTx {
            switch: self.switch.clone(),
            port: self.inner.clone(),
            buf: Vec::new(),
        }))
    }

    fn set_rx_offloads(&self, offloads: Offloads) -> Result<(), NetError> {
        self.inner
            .offloads
            .store(offloads.normalized().bits(), Ordering::Relaxed);
        Ok(())
    }

    fn set_active_pairs(&self, pairs: u16) -> Result<(), NetError> {
        let n = pairs.clamp(1, self.inner.queues.len() as u16);
        self.inner.active.store(n, Ordering::Relaxed);
        Ok(())
    }

    fn set_mac(&self, mac: [u8; 6]) {
        self.switch.learn(mac, self.inner.id);
    }
}

struct SwitchRx {
    port: Arc<PortInner>,
    qi: usize,
    queue_len: usize,
}

impl NetRx for SwitchRx {
    fn recv_burst(
        &mut self,
        max: usize,
        sink: &mut dyn FnMut(&[u8]) -> RxVerdict,
    ) -> Result<usize, NetError> {
        let Some(q) = self.port.queues.get(self.qi) else {
            return Ok(0);
        };
        let mut taken = 0;
        let mut drained = false;
        while taken < max {
            let next = lock(&q.frames).pop_front();
            let Some(buf) = next else {
                if drained {
                    break;
                }
                // Clear the wakeup before the final look, so a frame queued after this look
                // leaves the eventfd readable.
                let _ = q.wake.read();
                drained = true;
                continue;
            };
            match sink(&buf) {
                RxVerdict::Taken => {
                    taken += 1;
                    let mut free = lock(&q.free);
                    if free.len() < self.queue_len {
                        free.push(buf);
                    }
                }
                RxVerdict::NoRoom => {
                    lock(&q.frames).push_front(buf);
                    break;
                }
            }
        }
        Ok(taken)
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.port
            .queues
            .get(self.qi)
            .map(|q| q.wake.as_fd().as_raw_fd())
    }
}

struct SwitchTx {
    switch: Arc<L2Switch>,
    port: Arc<PortInner>,
    buf: Vec<u8>,
}

impl NetTx for SwitchTx {
    fn send_burst(&mut self, burst: &TxBurst) -> Result<usize, NetError> {
        for i in 0..burst.len() {
            let len = burst.copy_frame(i, &mut self.buf, MAX_FRAME_LEN);
            if len > MAX_FRAME_LEN {
                self.port.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.switch.forward(&self.port, &mut self.buf);
        }
        self.port
            .stats
            .tx_frames
            .fetch_add(burst.len() as u64, Ordering::Relaxed);
        Ok(burst.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5, tag]);
        f
    }

    fn send(port: &SwitchPort, frames: &[Vec<u8>]) {
        let mut tx = port.tx(0).unwrap();
        let mut b = TxBurst::new();
        for f in frames {
            b.push_copy(f);
            b.end_frame();
        }
        assert_eq!(tx.send_burst(&b).unwrap(), frames.len());
    }

    fn recv_all(port: &SwitchPort, pair: u16) -> Vec<Vec<u8>> {
        let mut rx = port.rx(pair).unwrap();
        let mut got = Vec::new();
        rx.recv_burst(usize::MAX, &mut |f| {
            got.push(f.to_vec());
            RxVerdict::Taken
        })
        .unwrap();
        got
    }

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 3];
    const BCAST: [u8; 6] = [0xff; 6];

    #[test]
    fn learns_then_forwards_unicast_to_one_port_only() {
        let sw = L2Switch::new("t", SwitchOptions::default());
        let (pa, pb, pc) = (
            sw.add_port(1).unwrap(),
            sw.add_port(1).unwrap(),
            sw.add_port(1).unwrap(),
        );
        // B is unknown: flooded to B and C, and A is learned.
        send(&pa, &[frame(B, A, 1)]);
        assert_eq!(recv_all(&pb, 0).len(), 1);
        assert_eq!(recv_all(&pc, 0).len(), 1);
        assert_eq!(sw.lookup(A), Some(pa.id()));
        // B answers A: unicast, C sees nothing; B is learned.
        send(&pb, &[frame(A, B, 2)]);
        let got = recv_all(&pa, 0);
        assert_eq!(got, vec![frame(A, B, 2)]);
        assert!(recv_all(&pc, 0).is_empty());
        // Now A -> B is unicast too.
        send(&pa, &[frame(B, A, 3)]);
        assert_eq!(recv_all(&pb, 0), vec![frame(B, A, 3)]);
        assert!(recv_all(&pc, 0).is_empty());
        // Broadcast never goes back to the sender.
        send(&pc, &[frame(BCAST, C, 4)]);
        assert!(recv_all(&pc, 0).is_empty());
        assert_eq!(recv_all(&pa, 0).len(), 1);
        assert_eq!(recv_all(&pb, 0).len(), 1);
        // A frame to oneself is dropped and counted.
        send(&pa, &[frame(A, A, 5)]);
        assert_eq!(pa.stats().tx_dropped.load(Ordering::Relaxed), 1);
        // A port going away forgets its MACs.
        let b_id = pb.id();
        drop(pb);
        assert_ne!(sw.lookup(B), Some(b_id));
    }

    #[test]
    fn queues_are_bounded_and_floods_take_half() {
        let opts = SwitchOptions {
            queue_len: 8,
            fdb_max: 2,
            max_ports: 3,
        };
        let sw = L2Switch::new("b", opts);
        let pa = sw.add_port(1).unwrap();
        let pb = sw.add_port(1).unwrap();
        let floods: Vec<_> = (0..10).map(|i| frame(BCAST, A, i)).collect();
        send(&pa, &floods);
        assert_eq!(pb.stats().rx_dropped_full.load(Ordering::Relaxed), 6);
        pb.set_mac(B);
        let uni: Vec<_> = (0..10).map(|i| frame(B, A, i)).collect();
        send(&pa, &uni);
        // 4 floods already queued: 4 unicast fit, 6 more dropped.
        assert_eq!(pb.stats().rx_dropped_full.load(Ordering::Relaxed), 12);
        assert_eq!(recv_all(&pb, 0).len(), 8);
        // The FDB is bounded: a third MAC is not learned, its traffic floods.
        let pc = sw.add_port(1).unwrap();
        assert!(sw.add_port(1).is_err());
        send(&pc, &[frame(BCAST, C, 0)]);
        assert_eq!(sw.fdb_len(), 2);
        assert_eq!(sw.lookup(C), None);
    }

    #[test]
    fn wake_fd_signals_and_no_room_keeps_the_frame() {
        let sw = L2Switch::new("w", SwitchOptions::default());
        let pa = sw.add_port(1).unwrap();
        let pb = sw.add_port(1).unwrap();
        pb.set_mac(B);
        let mut rx = pb.rx(0).unwrap();
        let fd = rx.wake_fd().unwrap();
        assert!(!readable(fd));
        send(&pa, &[frame(B, A, 1), frame(B, A, 2)]);
        assert!(readable(fd));
        let mut seen = Vec::new();
        let n = rx
            .recv_burst(8, &mut |f| {
                seen.push(f[VNET_HDR_LEN + 14]);
                if seen.len() == 2 {
                    RxVerdict::NoRoom
                } else {
                    RxVerdict::Taken
                }
            })
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(seen, vec![1, 2]);
        let got = recv_all(&pb, 0);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0][VNET_HDR_LEN + 14], 2);
        // Empty again: the receive burst cleared the wakeup.
        assert_eq!(rx.recv_burst(8, &mut |_| RxVerdict::Taken).unwrap(), 0);
        assert!(!readable(fd));
    }

    #[test]
    fn offloads_the_receiver_lacks_are_finished_or_dropped() {
        use crate::hdr::{gso, F_NEEDS_CSUM};
        use zerocopy::IntoBytes;
        let sw = L2Switch::new("o", SwitchOptions::default());
        let pa = sw.add_port(1).unwrap();
        let pb = sw.add_port(1).unwrap();
        pb.set_mac(B);
        let mut partial = frame(B, A, 0);
        partial.resize(VNET_HDR_LEN + 40, 0);
        let h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20.into(),
            csum_offset: 4.into(),
            ..Default::default()
        };
        partial[..VNET_HDR_LEN].copy_from_slice(h.as_bytes());
        let mut tso = partial.clone();
        tso[1] = gso::TCPV4;
        send(&pa, &[partial.clone(), tso.clone()]);
        let got = recv_all(&pb, 0);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0][0] & F_NEEDS_CSUM, 0);
        assert_eq!(pb.stats().rx_dropped_offload.load(Ordering::Relaxed), 1);
        pb.set_rx_offloads(Offloads::all()).unwrap();
        send(&pa, &[partial.clone(), tso.clone()]);
        assert_eq!(recv_all(&pb, 0), vec![partial, tso]);
    }

    #[test]
    fn tso_to_a_port_without_tso_is_segmented() {
        let sw = L2Switch::new("g", SwitchOptions::default());
        let pa = sw.add_port(1).unwrap();
        let pb = sw.add_port(1).unwrap();
        let mut f = crate::gso::tests::tso_v4(4000, 1448, 0x18);
        // Addressed to B's MAC (the helper's dst is 02:00:00:00:00:02).
        pb.set_mac([2, 0, 0, 0, 0, 2]);
        pb.set_rx_offloads(Offloads::CSUM).unwrap();
        send(&pa, &[f.clone()]);
        let got = recv_all(&pb, 0);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|s| crate::gso::tests::tcp_ok(s)));
        assert_eq!(pb.stats().rx_segmented.load(Ordering::Relaxed), 1);
        // A receiver with TSO gets the frame as is.
        pb.set_rx_offloads(Offloads::all()).unwrap();
        send(&pa, &[f.clone()]);
        assert_eq!(recv_all(&pb, 0), vec![f.clone()]);
        // UDP GSO (not segmented here) is dropped.
        f[1] = crate::hdr::gso::UDP_L4;
        send(&pa, &[f]);
        assert!(recv_all(&pb, 0).is_empty());
        assert_eq!(pb.stats().rx_dropped_offload.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn active_pairs_spread_frames() {
        let sw = L2Switch::new("m", SwitchOptions::default());
        let pa = sw.add_port(1).unwrap();
        let pb = sw.add_port(4).unwrap();
        pb.set_mac(B);
        let frames: Vec<_> = (0..16u8)
            .map(|i| frame(B, [0x52, 0x54, 0, 0, 1, i], i))
            .collect();
        send(&pa, &frames);
        // One active pair: everything on queue 0.
        assert_eq!(recv_all(&pb, 0).len(), 16);
        pb.set_active_pairs(4).unwrap();
        send(&pa, &frames);
        let per: Vec<_> = (0..4).map(|q| recv_all(&pb, q).len()).collect();
        assert_eq!(per.iter().sum::<usize>(), 16);
        assert!(per.iter().filter(|&&n| n > 0).count() >= 2, "{per:?}");
        assert!(pb.rx(4).is_err());
    }
}
