//! Our side: `emudev_virtio::Queue` (split ring) driving `BlkQueueHandler` + `NullBackend`,
//! with the poller's per-iteration sequence (process a budget, then flush_used).

use std::sync::Arc;

use emudev_blk::backend::null::NullBackend;
use emudev_blk::{BlkConfig, BlkOptions, BlkQueueHandler, BlkStats, BlockBackend, ConfigError};
use emudev_virtio::poller::QueueHandler;
use emudev_virtio::queue::{features, DescChain};
use emudev_virtio::{Queue, QueueError, QueueState};

use crate::setup::Fixture;

/// Ring features both sides use.
pub const RING_FEATURES: u64 = features::VERSION_1 | features::EVENT_IDX;

/// Errors building our queue.
#[derive(Debug, thiserror::Error)]
pub enum OursError {
    #[error("virtio-blk config: {0}")]
    Config(#[from] ConfigError),
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
}

/// Our queue and handler, positioned at the fixture's avail idx.
pub struct Ours {
    queue: Queue,
    handler: BlkQueueHandler,
    stats: Arc<BlkStats>,
    /// For the ring-only loop.
    chain: DescChain,
}

impl Ours {
    pub fn new(fx: &Fixture) -> Result<Self, OursError> {
        let backend: Arc<dyn BlockBackend> = Arc::new(NullBackend::new(1 << 30));
        let cfg = BlkConfig::new(&BlkOptions::default(), backend.as_ref())?;
        let stats = Arc::new(BlkStats::default());
        let handler = BlkQueueHandler::new(backend, &cfg, cfg.features(), stats.clone());
        let queue = Self::queue_at(fx)?;
        Ok(Self {
            queue,
            handler,
            stats,
            chain: DescChain::new(),
        })
    }

    fn queue_at(fx: &Fixture) -> Result<Queue, QueueError> {
        Queue::with_state(
            fx.ring,
            RING_FEATURES,
            fx.mem.clone(),
            QueueState {
                next_avail: fx.idx,
                next_used: fx.idx,
                ..QueueState::default()
            },
        )
    }

    /// Re-position at the fixture's avail idx (after the reference ran on the same ring).
    pub fn resync(&mut self, fx: &Fixture) -> Result<(), QueueError> {
        self.queue = Self::queue_at(fx)?;
        Ok(())
    }

    /// (requests seen by the engine, requests that did not complete OK).
    pub fn counts(&self) -> (u64, u64) {
        let s = self.stats.snapshot();
        (s.requests, s.io_errors + s.unsupported + s.malformed)
    }
}

/// The measured loop: `rounds` bursts. Not inlined and not mangled, so callgrind can count
/// exactly this function (`--toggle-collect=emudev_bench_loop_ours`).
#[no_mangle]
#[inline(never)]
pub fn emudev_bench_loop_ours(o: &mut Ours, fx: &mut Fixture, rounds: u32) -> u64 {
    let budget = usize::from(fx.burst);
    let mut done = 0u64;
    for _ in 0..rounds {
        fx.refill();
        done += o.handler.process(&mut o.queue, budget) as u64;
        if o.queue.staged() > 0 && o.queue.flush_used() {
            done += 1 << 32;
        }
    }
    done
}

/// Ring handling only (no virtio-blk work): pop, walk the segments, add_used, flush.
#[no_mangle]
#[inline(never)]
pub fn emudev_bench_loop_ours_ring(o: &mut Ours, fx: &mut Fixture, rounds: u32) -> u64 {
    let mut sink = 0u64;
    for _ in 0..rounds {
        fx.refill();
        while let Ok(true) = o.queue.pop_into(&mut o.chain) {
            for s in o.chain.segments() {
                sink = sink.wrapping_add(s.addr ^ u64::from(s.len));
            }
            o.queue.add_used(o.chain.head(), 1);
        }
        if o.queue.flush_used() {
            sink = sink.wrapping_add(1 << 32);
        }
    }
    sink
}
