//! Receive queue: frames from the backend into guest buffers.
//!
//! Guest buffers are popped in bursts as frames need them and held across calls, so a frame
//! that needs more buffers than the ring has now is kept by the backend and delivered whole
//! later (never partially written). With MRG_RXBUF a frame spans as many buffers as it needs
//! and `num_buffers` in its header says how many; without it one chain must hold it all.

use std::os::fd::RawFd;
use std::sync::Arc;

use emudev::GuestMemory;
use emudev_netback::hdr::{finish_checksum, Acceptance, VirtioNetHdr, F_DATA_VALID};
use emudev_netback::{NetRx, Offloads, RxVerdict, VNET_HDR_LEN};
use emudev_virtio::poller::QueueHandler;
use emudev_virtio::{DescChain, Queue};

use crate::shared::{add, NetShared, RxFilter};

/// Outcome of placing one frame in guest buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Written, using this many buffers.
    Delivered(u16),
    /// Not enough guest buffers now; nothing written.
    NoRoom,
    /// Without MRG_RXBUF: the next buffer is smaller than the frame (frame dropped).
    TooBig,
    /// A guest memory fault; the buffers were returned.
    Fault,
}

/// Guest receive buffers popped but not yet used, and the logic that fills them.
#[derive(Debug, Default)]
pub struct RxRing {
    pub mrg: bool,
    chains: Vec<DescChain>,
    held: usize,
    /// Chains returned unused because they had no writable part.
    pub malformed: u64,
}

impl RxRing {
    pub fn new(mrg: bool) -> Self {
        Self {
            mrg,
            ..Default::default()
        }
    }

    /// Buffers held for the next frames.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Pop one more chain into the held set; false when the ring is empty (or broken).
    fn pop_one(&mut self, q: &mut Queue) -> bool {
        loop {
            if self.held == self.chains.len() {
                self.chains.push(DescChain::new());
            }
            match q.pop_into(&mut self.chains[self.held]) {
                Ok(true) => {}
                Ok(false) | Err(_) => return false,
            }
            let c = &self.chains[self.held];
            if c.writable_len() == 0 {
                q.add_used(c.head(), 0);
                self.malformed += 1;
                continue;
            }
            self.held += 1;
            return true;
        }
    }

    /// Buffers needed for `need` bytes from the held ones, popping more as needed.
    fn reserve(&mut self, q: &mut Queue, need: usize) -> Result<usize, Fill> {
        if !self.mrg {
            if self.held == 0 && !self.pop_one(q) {
                return Err(Fill::NoRoom);
            }
            if self.chains[0].writable_len() < need as u64 {
                return Err(Fill::TooBig);
            }
            return Ok(1);
        }
        let mut have = 0u64;
        let mut k = 0;
        loop {
            while k < self.held {
                have += self.chains[k].writable_len();
                k += 1;
                if have >= need as u64 {
                    return Ok(k);
                }
            }
            if !self.pop_one(q) {
                return Err(Fill::NoRoom);
            }
        }
    }

    /// Place `hdr` then `data` in guest buffers and stage their used entries.
    pub fn fill(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemory,
        hdr: &mut VirtioNetHdr,
        data: &[u8],
    ) -> Fill {
        let need = VNET_HDR_LEN + data.len();
        let k = match self.reserve(q, need) {
            Ok(k) => k,
            // On TooBig the small buffer stays held for a smaller frame.
            Err(e) => return e,
        };
        hdr.num_buffers = (k as u16).into();
        let mut off = 0usize;
        let mut fault = false;
        for (i, c) in self.chains[..k].iter().enumerate() {
            let mut w = c.writer(mem);
            if !fault {
                if i == 0 && w.write(zerocopy::IntoBytes::as_bytes(hdr)).is_err() {
                    fault = true;
                }
                if !fault {
                    match w.write(&data[off..]) {
                        Ok(n) => off += n,
                        Err(_) => fault = true,
                    }
                }
            }
            let used = if fault { 0 } else { w.bytes_written() };
            q.add_used(c.head(), used as u32);
        }
        self.chains[..self.held].rotate_left(k);
        self.held -= k;
        if fault {
            Fill::Fault
        } else {
            Fill::Delivered(k as u16)
        }
    }
}

/// Handler of one receive queue.
pub struct RxHandler {
    rx: Box<dyn NetRx>,
    shared: Arc<NetShared>,
    ring: RxRing,
    /// Offloads the driver takes on receive.
    accept: Offloads,
    filter: RxFilter,
    filter_gen: u64,
    /// Frame copy for a checksum finished in software.
    scratch: Vec<u8>,
    /// The last burst stopped for lack of guest buffers: sleep on the kick only.
    starved: bool,
}

impl RxHandler {
    pub fn new(rx: Box<dyn NetRx>, shared: Arc<NetShared>, mrg: bool, accept: Offloads) -> Self {
        let mut filter_gen = 0;
        let filter = shared
            .filter_if_changed(&mut filter_gen)
            .unwrap_or_else(|| RxFilter::new(shared.mac()));
        Self {
            rx,
            shared,
            ring: RxRing::new(mrg),
            accept,
            filter,
            filter_gen,
            scratch: Vec::new(),
            starved: false,
        }
    }
}

#[derive(Default)]
struct Burst {
    frames: u64,
    bytes: u64,
    filtered: u64,
    dropped: u64,
    offload: u64,
    link: u64,
    faults: u64,
}

impl QueueHandler for RxHandler {
    fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
        if let Some(f) = self.shared.filter_if_changed(&mut self.filter_gen) {
            self.filter = f;
        }
        let mem = q.memory().clone();
        let link_up = self
            .shared
            .link_up
            .load(std::sync::atomic::Ordering::Relaxed);
        let Self {
            rx,
            ring,
            accept,
            filter,
            scratch,
            starved,
            ..
        } = self;
        let accept = *accept;
        *starved = false;
        let mut b = Burst::default();
        let mut sink = |frame: &[u8]| -> RxVerdict {
            let Some(mut hdr) = VirtioNetHdr::parse(frame) else {
                b.dropped += 1;
                return RxVerdict::Taken;
            };
            let data = &frame[VNET_HDR_LEN..];
            if data.len() < 14 {
                b.dropped += 1;
                return RxVerdict::Taken;
            }
            if !link_up {
                b.link += 1;
                return RxVerdict::Taken;
            }
            let mut dst = [0u8; 6];
            dst.copy_from_slice(&data[..6]);
            if !filter.accepts(&dst) {
                b.filtered += 1;
                return RxVerdict::Taken;
            }
            let data = match hdr.acceptable(accept) {
                Acceptance::AsIs => data,
                Acceptance::Drop => {
                    b.offload += 1;
                    return RxVerdict::Taken;
                }
                Acceptance::FinishChecksum => {
                    scratch.clear();
                    scratch.extend_from_slice(frame);
                    if finish_checksum(scratch).is_err() {
                        b.dropped += 1;
                        return RxVerdict::Taken;
                    }
                    hdr.flags = 0;
                    &scratch[VNET_HDR_LEN..]
                }
            };
            if !accept.contains(Offloads::CSUM) {
                hdr.flags &= !F_DATA_VALID;
            }
            match ring.fill(q, &mem, &mut hdr, data) {
                Fill::Delivered(_) => {
                    b.frames += 1;
                    b.bytes += data.len() as u64;
                    RxVerdict::Taken
                }
                Fill::NoRoom => {
                    *starved = true;
                    RxVerdict::NoRoom
                }
                Fill::TooBig => {
                    b.dropped += 1;
                    RxVerdict::Taken
                }
                Fill::Fault => {
                    b.faults += 1;
                    RxVerdict::Taken
                }
            }
        };
        if let Err(e) = rx.recv_burst(budget, &mut sink) {
            log::debug!("virtio-net rx: backend error: {e}");
        }
        let s = &self.shared.stats;
        add(&s.rx_frames, b.frames);
        add(&s.rx_bytes, b.bytes);
        add(&s.rx_filtered, b.filtered);
        add(
            &s.rx_dropped,
            b.dropped + std::mem::take(&mut ring.malformed),
        );
        add(&s.rx_offload_dropped, b.offload);
        add(&s.link_down_dropped, b.link);
        add(&s.rx_faults, b.faults);
        (b.frames + b.filtered + b.dropped + b.offload + b.link + b.faults) as usize
    }

    /// With room in the ring, receive buffers wait for frames from the backend's wake fd.
    fn avail_is_idle(&self) -> bool {
        !self.starved && self.rx.wake_fd().is_some()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        if self.starved {
            None
        } else {
            self.rx.wake_fd()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev_virtio::queue::features;
    use emudev_virtio::queue::testdriver::{anon_memory, Buf, SplitDriver};

    const BUF: u64 = 0x10_0000;

    fn hdr_of(mem: &GuestMemory, at: u64) -> VirtioNetHdr {
        let mut b = [0u8; VNET_HDR_LEN];
        mem.read(at, &mut b).unwrap();
        VirtioNetHdr::parse(&b).unwrap()
    }

    #[test]
    fn mergeable_buffers_span_a_large_frame_and_hold_the_rest() {
        let mem = anon_memory(0, 4 << 20);
        let mut drv = SplitDriver::new(mem.clone(), 0, 16);
        let mut q = Queue::new(drv.config(), features::VERSION_1, mem.clone()).unwrap();
        let mut ring = RxRing::new(true);
        // Three 1000-byte buffers and one without a writable part.
        for i in 0..3 {
            drv.add_chain(&[Buf::w(BUF + i * 0x1000, 1000)]);
        }
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut h = VirtioNetHdr::default();
        // 2512 bytes: three buffers.
        assert_eq!(ring.fill(&mut q, &mem, &mut h, &data), Fill::Delivered(3));
        q.flush_used();
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used()).collect();
        assert_eq!(used, vec![(0, 1000), (1, 1000), (2, 512)]);
        assert_eq!(hdr_of(&mem, BUF).num_buffers.get(), 3);
        let mut back = vec![0u8; 2500];
        mem.read(BUF + 12, &mut back[..988]).unwrap();
        mem.read(BUF + 0x1000, &mut back[988..1988]).unwrap();
        mem.read(BUF + 0x2000, &mut back[1988..]).unwrap();
        assert_eq!(back, data);
        // Only one buffer for a 1500-byte frame: nothing is written, the buffer is held.
        drv.add_chain(&[Buf::w(BUF + 0x3000, 1000)]);
        let big = vec![7u8; 1500];
        assert_eq!(ring.fill(&mut q, &mem, &mut h, &big), Fill::NoRoom);
        assert_eq!(ring.held(), 1);
        q.flush_used();
        assert!(drv.pop_used().is_none());
        // A second buffer arrives: the frame goes into both; a third stays untouched.
        drv.add_chain(&[Buf::w(BUF + 0x4000, 600), Buf::w(BUF + 0x5000, 600)]);
        assert_eq!(ring.fill(&mut q, &mem, &mut h, &big), Fill::Delivered(2));
        q.flush_used();
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used()).collect();
        assert_eq!(used, vec![(3, 1000), (4, 512)]);
        assert_eq!(hdr_of(&mem, BUF + 0x3000).num_buffers.get(), 2);
        assert_eq!(ring.held(), 0);
    }

    #[test]
    fn without_mrg_one_chain_holds_a_frame_or_the_frame_is_dropped() {
        let mem = anon_memory(0, 4 << 20);
        let mut drv = SplitDriver::new(mem.clone(), 0, 16);
        let mut q = Queue::new(drv.config(), features::VERSION_1, mem.clone()).unwrap();
        let mut ring = RxRing::new(false);
        drv.add_chain(&[Buf::w(BUF, 100)]);
        drv.add_chain(&[Buf::w(BUF + 0x1000, 12), Buf::w(BUF + 0x2000, 1514)]);
        let mut h = VirtioNetHdr::default();
        assert_eq!(ring.fill(&mut q, &mem, &mut h, &[1u8; 200]), Fill::TooBig);
        assert_eq!(
            ring.fill(&mut q, &mem, &mut h, &[2u8; 60]),
            Fill::Delivered(1)
        );
        assert_eq!(
            ring.fill(&mut q, &mem, &mut h, &[3u8; 1514]),
            Fill::Delivered(1)
        );
        assert_eq!(ring.fill(&mut q, &mem, &mut h, &[3u8; 10]), Fill::NoRoom);
        q.flush_used();
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used()).collect();
        assert_eq!(used, vec![(0, 72), (1, 1526)]);
        assert_eq!(hdr_of(&mem, BUF + 0x1000).num_buffers.get(), 1);
        let mut b = [0u8; 1];
        mem.read(BUF + 0x2000 + 1513, &mut b).unwrap();
        assert_eq!(b[0], 3);
    }

    #[test]
    fn chains_without_writable_buffers_are_returned_empty() {
        let mem = anon_memory(0, 4 << 20);
        let mut drv = SplitDriver::new(mem.clone(), 0, 16);
        let mut q = Queue::new(drv.config(), features::VERSION_1, mem.clone()).unwrap();
        let mut ring = RxRing::new(true);
        let bad = drv.add_chain(&[Buf::r(BUF, 100)]);
        let good = drv.add_chain(&[Buf::w(BUF + 0x1000, 2048)]);
        let mut h = VirtioNetHdr::default();
        assert_eq!(
            ring.fill(&mut q, &mem, &mut h, &[1u8; 60]),
            Fill::Delivered(1)
        );
        assert_eq!(ring.malformed, 1);
        q.flush_used();
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used()).collect();
        assert_eq!(used, vec![(u32::from(bad), 0), (u32::from(good), 72)]);
    }
}
