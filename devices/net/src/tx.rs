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
