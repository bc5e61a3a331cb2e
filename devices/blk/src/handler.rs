//! Per-queue glue between the vring core (`emudev_virtio::poller`) and [`BlkEngine`].

use std::sync::Arc;

use emudev::GuestMemory;
use emudev_virtio::poller::QueueHandler;
use emudev_virtio::queue::DescChain;
use emudev_virtio::Queue;

use crate::backend::BlockBackend;
use crate::config::BlkConfig;
use crate::engine::{BlkEngine, BlkStats, Completion};

/// Handles the requests of one virtio-blk queue, synchronously: each popped chain is executed
/// to completion before its used entry is staged, so a completion never precedes its data.
#[derive(Debug)]
pub struct BlkQueueHandler {
    engine: BlkEngine,
    /// Reused across pops (no allocation per request).
    chain: DescChain,
}

impl BlkQueueHandler {
    /// A handler for a device configured as `config` whose driver acked `acked` features.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        config: &BlkConfig,
        acked: u64,
        stats: Arc<BlkStats>,
    ) -> Self {
        Self::with_engine(BlkEngine::new(backend, config, acked, stats))
    }

    /// A handler around an existing engine.
    pub fn with_engine(engine: BlkEngine) -> Self {
        Self {
            engine,
            chain: DescChain::new(),
        }
    }

    /// Counters of this queue.
    pub fn stats(&self) -> &Arc<BlkStats> {
        self.engine.stats()
    }

    /// Execute one popped chain.
    pub fn handle_chain(&mut self, mem: &GuestMemory, chain: &DescChain) -> Completion {
        self.engine.process(mem, chain.readable(), chain.writable())
    }
}

impl QueueHandler for BlkQueueHandler {
    fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
        let mem = q.memory().clone();
        let mut done = 0;
        while done < budget {
            // A ring error is recorded in the queue (sticky); the poller handles it.
            match q.pop_into(&mut self.chain) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
            let c = self
                .engine
                .process(&mem, self.chain.readable(), self.chain.writable());
            // Malformed chains (no status byte) complete with length 0.
            q.add_used(self.chain.head(), c.used_len);
            done += 1;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::raw::{RawFile, RawFileOptions};
    use crate::config::BlkOptions;
    use crate::request::{req_type, status, VirtioBlkOutHdr};
    use crate::testutil::{pattern, TempImage};
    use emudev_virtio::queue::features;
    use emudev_virtio::queue::testdriver::{
        anon_memory, message_memory, Buf, PackedDriver, SplitDriver,
    };
    use zerocopy::little_endian::{U32, U64};
    use zerocopy::IntoBytes;

    const MEM: usize = 4 << 20;
    const BUF: u64 = 0x10_0000;

    struct Setup {
        img: TempImage,
        handler: BlkQueueHandler,
        stats: Arc<BlkStats>,
    }

    fn setup(acked_extra: u64) -> Setup {
        let img = TempImage::new(1 << 20);
        let backend: Arc<dyn BlockBackend> = Arc::new(
            RawFile::open(
                &img.0,
                &RawFileOptions {
                    id: Some("ring-disk".into()),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let cfg = BlkConfig::new(&BlkOptions::default(), backend.as_ref()).unwrap();
        let stats = Arc::new(BlkStats::default());
        let handler =
            BlkQueueHandler::new(backend, &cfg, cfg.features() | acked_extra, stats.clone());
        Setup {
            img,
            handler,
            stats,
        }
    }

    fn put_hdr(mem: &GuestMemory, at: u64, ty: u32, sector: u64) {
        let h = VirtioBlkOutHdr {
            type_: U32::new(ty),
            ioprio: U32::new(0),
            sector: U64::new(sector),
        };
        mem.write(at, h.as_bytes()).unwrap();
    }

    fn read_back(mem: &GuestMemory, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read(at, &mut v).unwrap();
        v
    }

    /// Write, read, GET_ID and a chain without a status byte through a split ring; then the
    /// used ring must hold the right ids and lengths, and guest memory the data and statuses.
    fn split_ring_round_trip(mem: Arc<GuestMemory>, base: u64) -> Setup {
        let mut s = setup(features::INDIRECT_DESC);
        let buf = base + BUF;
        let mut drv = SplitDriver::new(mem.clone(), base, 16);
        let data = pattern(8192, 7);
        put_hdr(&mem, buf, req_type::OUT, 16);
        mem.write(buf + 0x1000, &data).unwrap();
        let w = drv.add_chain(&[
            Buf::r(buf, 16),
            Buf::r(buf + 0x1000, 4096),
            Buf::r(buf + 0x2000, 4096),
            Buf::w(buf + 0x100, 1),
        ]);
        put_hdr(&mem, buf + 0x200, req_type::IN, 16);
        let r = drv.add_indirect(
            buf + 0x300,
            &[
                Buf::r(buf + 0x200, 16),
                Buf::w(buf + 0x10000, 8192),
                Buf::w(buf + 0x101, 1),
            ],
        );
        put_hdr(&mem, buf + 0x400, req_type::GET_ID, 0);
        let id = drv.add_chain(&[Buf::r(buf + 0x400, 16), Buf::w(buf + 0x500, 21)]);
        let bad = drv.add_chain(&[Buf::r(buf + 0x400, 16)]);

        let mut q = Queue::new(
            drv.config(),
            features::VERSION_1 | features::INDIRECT_DESC,
            mem.clone(),
        )
        .unwrap();
        assert_eq!(s.handler.process(&mut q, 64), 4);
        q.flush_used();
        assert!(q.error().is_none());
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used()).collect();
        assert_eq!(
            used,
            vec![
                (u32::from(w), 1),
                (u32::from(r), 8193),
                (u32::from(id), 21),
                (u32::from(bad), 0)
            ]
        );
        assert_eq!(read_back(&mem, buf + 0x100, 2), [status::OK, status::OK]);
        assert_eq!(&s.img.contents()[16 * 512..16 * 512 + 8192], &data[..]);
        assert_eq!(read_back(&mem, buf + 0x10000, 8192), data);
        let mut want = [0u8; 21];
        want[..9].copy_from_slice(b"ring-disk");
        assert_eq!(read_back(&mem, buf + 0x500, 21), want);
        s
    }

    #[test]
    fn split_ring_with_mapped_memory() {
        let s = split_ring_round_trip(anon_memory(0, MEM), 0);
        let st = s.stats.snapshot();
        assert_eq!((st.requests, st.malformed, st.bounced), (4, 1, 0));
    }

    #[test]
    fn split_ring_with_message_memory() {
        let s = split_ring_round_trip(message_memory(0x1_0000_0000, MEM), 0x1_0000_0000);
        let st = s.stats.snapshot();
        assert_eq!((st.requests, st.malformed, st.bounced), (4, 1, 2));
    }

    #[test]
    fn packed_ring_write_then_read() {
        let mem = anon_memory(0, MEM);
        let mut s = setup(features::RING_PACKED);
        let mut drv = PackedDriver::new(mem.clone(), 0, 8);
        let data = pattern(4096, 9);
        put_hdr(&mem, BUF, req_type::OUT, 1);
        mem.write(BUF + 0x1000, &data).unwrap();
        let w = drv.add_chain(&[
            Buf::r(BUF, 16),
            Buf::r(BUF + 0x1000, 4096),
            Buf::w(BUF + 0x100, 1),
        ]);
        put_hdr(&mem, BUF + 0x200, req_type::IN, 1);
        let r = drv.add_chain(&[Buf::r(BUF + 0x200, 16), Buf::w(BUF + 0x4000, 4097)]);
        // An unknown request type still completes, with UNSUPP.
        put_hdr(&mem, BUF + 0x300, 77, 0);
        let u = drv.add_chain(&[Buf::r(BUF + 0x300, 16), Buf::w(BUF + 0x102, 1)]);
        let mut q = Queue::new(
            drv.config(),
            features::VERSION_1 | features::RING_PACKED,
            mem.clone(),
        )
        .unwrap();
        // Budget is honoured: two now, one later.
        assert_eq!(s.handler.process(&mut q, 2), 2);
        assert_eq!(s.handler.process(&mut q, 2), 1);
        assert_eq!(s.handler.process(&mut q, 2), 0);
        q.flush_used();
        let used: Vec<_> = std::iter::from_fn(|| drv.pop_used()).collect();
        assert_eq!(used, vec![(w, 1), (r, 4097), (u, 1)]);
        assert_eq!(read_back(&mem, BUF + 0x4000, 4096), data);
        assert_eq!(read_back(&mem, BUF + 0x4000 + 4096, 1), [status::OK]);
        assert_eq!(
            read_back(&mem, BUF + 0x100, 3),
            [status::OK, 0, status::UNSUPP]
        );
    }

    /// Per-request cost of the device side (pop, parse, 4 KiB null read, status, used),
    /// driver side included. `cargo test --release -p emudev-blk -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_null_4k_reads() {
        const BENCH_LEN: u32 = 4096;
        let mem = anon_memory(0, MEM);
        let backend = Arc::new(crate::backend::null::NullBackend::new(1 << 30));
        let cfg = BlkConfig::new(&BlkOptions::default(), backend.as_ref()).unwrap();
        let stats = Arc::new(BlkStats::default());
        let mut h = BlkQueueHandler::new(backend, &cfg, cfg.features(), stats);
        let mut drv = SplitDriver::new(mem.clone(), 0, 256);
        let mut q = Queue::new(drv.config(), features::VERSION_1, mem.clone()).unwrap();
        for i in 0..64u64 {
            put_hdr(&mem, BUF + 0x100 * i, req_type::IN, i * 8);
        }
        let rounds: u64 = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            for i in 0..64u64 {
                drv.add_chain(&[
                    Buf::r(BUF + 0x100 * i, 16),
                    Buf::w(BUF + 0x10000 + 0x1000 * i, BENCH_LEN),
                    Buf::w(BUF + 0x8000 + i, 1),
                ]);
            }
            assert_eq!(h.process(&mut q, 64), 64);
            q.flush_used();
            for _ in 0..64 {
                assert!(drv.pop_used().is_some());
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / (rounds * 64) as f64;
        eprintln!("null 4k read: {ns:.0} ns/request (driver side included)");
    }
}
