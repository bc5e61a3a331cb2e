//! Per-queue glue between the vring core and [`BlkEngine`].

use std::sync::Arc;

use emudev::GuestMemory;

use crate::engine::{BlkEngine, BlkStats, Completion};
use crate::request::{seg, Segment};

/// Handles the requests of one virtio-blk queue.
#[derive(Debug)]
pub struct BlkQueueHandler {
    engine: BlkEngine,
    rd: Vec<Segment>,
    wr: Vec<Segment>,
}

impl BlkQueueHandler {
    /// A handler around `engine`.
    pub fn new(engine: BlkEngine) -> Self {
        Self {
            engine,
            rd: Vec::new(),
            wr: Vec::new(),
        }
    }

    /// Counters of this queue.
    pub fn stats(&self) -> &Arc<BlkStats> {
        self.engine.stats()
    }

    /// Process one chain given as (addr, len, device-writable) descriptors in chain order.
    /// Readable descriptors after a writable one are a driver error: the chain is completed
    /// with IOERR if it still has a status byte.
    pub fn process_descs(
        &mut self,
        mem: &GuestMemory,
        descs: impl IntoIterator<Item = (u64, u32, bool)>,
    ) -> Completion {
        self.rd.clear();
        self.wr.clear();
        for (addr, len, writable) in descs {
            if writable {
                self.wr.push(seg(addr, len, true));
            } else {
                self.rd.push(seg(addr, len, false));
            }
        }
        self.engine.process(mem, &self.rd, &self.wr)
    }
}
