//! Transmit queue: guest frames to the backend in bursts, as zero-copy iovecs into guest
//! memory (copied only when a buffer has no host mapping).

use std::sync::Arc;

use emudev_netback::{NetTx, TxBurst, MAX_FRAME_LEN, VNET_HDR_LEN};
use emudev_virtio::poller::QueueHandler;
use emudev_virtio::queue::ChainError;
use emudev_virtio::{DescChain, Queue};

use crate::shared::{add, NetShared};

/// Handler of one transmit queue.
pub struct TxHandler {
    tx: Box<dyn NetTx>,
    shared: Arc<NetShared>,
    burst: TxBurst,
    heads: Vec<u16>,
    chain: DescChain,
    copy: Vec<u8>,
}

impl TxHandler {
    pub fn new(tx: Box<dyn NetTx>, shared: Arc<NetShared>) -> Self {
        Self {
            tx,
            shared,
            burst: TxBurst::new(),
            heads: Vec::new(),
            chain: DescChain::new(),
            copy: Vec::new(),
        }
    }
}

impl QueueHandler for TxHandler {
    fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
        // Held for the whole burst: the iovecs below point into this snapshot's mappings.
        let mem = q.memory().clone();
        self.burst.clear();
        self.heads.clear();
        let mut malformed = 0u64;
        let mut bytes = 0u64;
        while self.heads.len() < budget {
            match q.pop_into(&mut self.chain) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
            self.heads.push(self.chain.head());
            let len = self.chain.readable_len() as usize;
            if !(VNET_HDR_LEN + 14..=MAX_FRAME_LEN).contains(&len) {
                malformed += 1;
                continue;
            }
            let mut r = self.chain.reader(&mem);
            // SAFETY: the iovecs point into host mappings of `mem`, which this function keeps
            // alive until the burst is sent and cleared below; the chain's readable part is
            // readable memory by construction.
            let got = r.iovecs(len, unsafe { self.burst.iovecs_mut() });
            match got {
                Ok(n) if n == len => {}
                Err(ChainError::NotMappable { .. }) => {
                    self.burst.abandon_frame();
                    self.copy.resize(len, 0);
                    let mut r = self.chain.reader(&mem);
                    if r.read_exact(&mut self.copy).is_err() {
                        malformed += 1;
                        continue;
                    }
                    self.burst.push_copy(&self.copy);
                }
                _ => {
                    self.burst.abandon_frame();
                    malformed += 1;
                    continue;
                }
            }
            bytes += (len - VNET_HDR_LEN) as u64;
            self.burst.end_frame();
        }
        let s = &self.shared.stats;
        let n = self.burst.len() as u64;
        if n > 0 {
            if self
                .shared
                .link_up
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                let sent = match self.tx.send_burst(&self.burst) {
                    Ok(k) => k as u64,
                    Err(e) => {
                        log::debug!("virtio-net tx: backend error: {e}");
                        0
                    }
                };
                add(&s.tx_frames, sent);
                add(&s.tx_bytes, bytes);
                add(&s.tx_dropped, n - sent.min(n));
            } else {
                add(&s.link_down_dropped, n);
            }
        }
        self.burst.clear();
        add(&s.tx_malformed, malformed);
        for &h in &self.heads {
            q.add_used(h, 0);
        }
        self.heads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev::GuestMemory;
    use emudev_netback::switch::{L2Switch, SwitchOptions};
    use emudev_netback::{NetBackend, RxVerdict};
    use emudev_virtio::queue::features;
    use emudev_virtio::queue::testdriver::{anon_memory, message_memory, Buf, SplitDriver};
    use std::sync::atomic::Ordering;

    /// Good frames go out (mapped or message-backed memory); short, write-only and
    /// oversized chains complete with length 0 and are counted, never sent.
    fn tx_round(mem: Arc<GuestMemory>, base: u64) {
        let sw = L2Switch::new("tx", SwitchOptions::default());
        let pa = sw.add_port(1).unwrap();
        let pb = sw.add_port(1).unwrap();
        let shared = Arc::new(NetShared::new(Arc::new(pa), 1, [2, 0, 0, 0, 0, 1]));
        let mut h = TxHandler::new(shared.backend.tx(0).unwrap(), shared.clone());
        let mut drv = SplitDriver::new(mem.clone(), base, 16);
        let buf = base + 0x10_0000;
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        frame.extend_from_slice(&[0xab; 50]);
        mem.write(buf, &frame).unwrap();
        let good = drv.add_chain(&[Buf::r(buf, 5), Buf::r(buf + 5, frame.len() as u32 - 5)]);
        let short = drv.add_chain(&[Buf::r(buf, 20)]);
        let write_only = drv.add_chain(&[Buf::w(buf + 0x1000, 100)]);
        let huge = drv.add_chain(&[Buf::r(buf, 40_000), Buf::r(buf, 40_000)]);
        let mut q = Queue::new(drv.config(), features::VERSION_1, mem.clone()).unwrap();
        assert_eq!(h.process(&mut q, 64), 4);
        q.flush_used();
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used()).collect();
        let heads: Vec<_> = [good, short, write_only, huge]
            .iter()
            .map(|&x| (u32::from(x), 0))
            .collect();
        assert_eq!(used, heads);
        let s = shared.stats.snapshot();
        assert_eq!((s.tx_frames, s.tx_malformed, s.tx_bytes), (1, 3, 64));
        let mut rx = pb.rx(0).unwrap();
        let mut got = Vec::new();
        rx.recv_burst(8, &mut |f| {
            got.push(f.to_vec());
            RxVerdict::Taken
        })
        .unwrap();
        assert_eq!(got, vec![frame]);
        // Link down: chains complete, nothing is sent.
        shared.link_up.store(false, Ordering::Relaxed);
        drv.add_chain(&[Buf::r(buf, 76)]);
        assert_eq!(h.process(&mut q, 64), 1);
        assert_eq!(shared.stats.snapshot().link_down_dropped, 1);
    }

    #[test]
    fn tx_with_mapped_memory() {
        tx_round(anon_memory(0, 4 << 20), 0);
    }

    #[test]
    fn tx_with_message_memory_copies() {
        tx_round(message_memory(0x1_0000_0000, 4 << 20), 0x1_0000_0000);
    }
}
