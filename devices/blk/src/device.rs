//! virtio-blk as a [`VirtioDeviceType`]: identity, features, config space, and an engine
//! whose queue handlers are [`BlkQueueHandler`]s running on a shared [`PollerPool`].

use std::sync::Arc;

use emudev::device::DeviceError;
use emudev_virtio::pci::features::{
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_RESET,
};
use emudev_virtio::pci::VirtioDeviceType;
use emudev_virtio::poller::{PollerPool, QueueHandler};
use emudev_virtio::{Engine, Queue};

use crate::backend::BlockBackend;
use crate::config::{BlkConfig, BlkOptions, ConfigError};
use crate::engine::{BlkStats, BlkStatsSnapshot};
use crate::handler::BlkQueueHandler;

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u16 = 2;
/// PCI class: mass storage, other (as cloud-hypervisor; Linux and firmware ignore it).
pub const BLK_CLASS_CODE: u32 = 0x01_8000;
/// Ring features offered by default (the queue core implements them).
pub const DEFAULT_RING_FEATURES: u64 =
    VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_RESET;

/// A virtio-blk device model.
pub struct VirtioBlkDevice {
    backend: Arc<dyn BlockBackend>,
    opts: BlkOptions,
    config: BlkConfig,
    ring_features: u64,
    pool: Arc<PollerPool>,
    /// One per queue, kept across engine restarts.
    stats: Vec<Arc<BlkStats>>,
}

impl std::fmt::Debug for VirtioBlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlkDevice")
            .field("opts", &self.opts)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VirtioBlkDevice {
    /// A device over `backend`, its queues run by `pool`.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        opts: BlkOptions,
        pool: Arc<PollerPool>,
    ) -> Result<Self, ConfigError> {
        let config = BlkConfig::new(&opts, backend.as_ref())?;
        let stats = (0..opts.num_queues)
            .map(|_| Arc::new(BlkStats::default()))
            .collect();
        Ok(Self {
            backend,
            opts,
            config,
            ring_features: DEFAULT_RING_FEATURES,
            pool,
            stats,
        })
    }

    /// Replace the offered ring feature bits (e.g. add VIRTIO_F_RING_PACKED).
    pub fn with_ring_features(mut self, bits: u64) -> Self {
        self.ring_features = bits;
        self
    }

    /// The configuration presented to the driver.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Counters of queue `qidx`.
    pub fn queue_stats(&self, qidx: u16) -> Option<&Arc<BlkStats>> {
        self.stats.get(usize::from(qidx))
    }

    /// Counters summed over every queue.
    pub fn stats(&self) -> BlkStatsSnapshot {
        self.stats
            .iter()
            .map(|s| s.snapshot())
            .fold(BlkStatsSnapshot::default(), |a, b| BlkStatsSnapshot {
                requests: a.requests + b.requests,
                read_bytes: a.read_bytes + b.read_bytes,
                write_bytes: a.write_bytes + b.write_bytes,
                flushes: a.flushes + b.flushes,
                discards: a.discards + b.discards,
                write_zeroes: a.write_zeroes + b.write_zeroes,
                io_errors: a.io_errors + b.io_errors,
                unsupported: a.unsupported + b.unsupported,
                malformed: a.malformed + b.malformed,
                bounced: a.bounced + b.bounced,
            })
    }
}

impl VirtioDeviceType for VirtioBlkDevice {
    fn device_id(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn class_code(&self) -> u32 {
        BLK_CLASS_CODE
    }

    fn features(&self) -> u64 {
        self.config.features() | self.ring_features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.opts.queue_size; usize::from(self.opts.num_queues)]
    }

    fn config_len(&self) -> usize {
        self.config.bytes().len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    // CONFIG_WCE is not offered, so every field is read-only: writes are ignored.

    fn create_engine(&mut self) -> Result<Box<dyn Engine>, DeviceError> {
        let backend = self.backend.clone();
        let config = self.config.clone();
        let stats = self.stats.clone();
        let factory = Box::new(move |qidx: u16, q: &Queue| -> Box<dyn QueueHandler> {
            let s = stats
                .get(usize::from(qidx))
                .cloned()
                .unwrap_or_else(|| Arc::new(BlkStats::default()));
            Box::new(BlkQueueHandler::new(
                backend.clone(),
                &config,
                q.features(),
                s,
            ))
        });
        Ok(Box::new(self.pool.engine(factory)))
    }

    fn attr(&self, key: &str) -> Option<String> {
        let s = self.stats();
        Some(match key {
            "capacity" => self.config.capacity_sectors().to_string(),
            "read_only" => self.config.read_only().to_string(),
            "requests" => s.requests.to_string(),
            "read_bytes" => s.read_bytes.to_string(),
            "write_bytes" => s.write_bytes.to_string(),
            "io_errors" => s.io_errors.to_string(),
            "malformed" => s.malformed.to_string(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::null::NullBackend;
    use crate::config::feature;

    #[test]
    fn identity_features_and_config() {
        let pool = PollerPool::new(1).unwrap();
        let opts = BlkOptions {
            num_queues: 2,
            queue_size: 128,
            ..Default::default()
        };
        let mut d = VirtioBlkDevice::new(Arc::new(NullBackend::new(1 << 30)), opts, pool).unwrap();
        assert_eq!(d.device_id(), 2);
        assert_eq!(d.queue_max_sizes(), vec![128, 128]);
        let f = d.features();
        assert_ne!(f & feature::MQ, 0);
        assert_ne!(f & VIRTIO_F_RING_INDIRECT_DESC, 0);
        assert_eq!(d.config_len(), 96);
        let mut cap = [0u8; 8];
        d.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (1 << 30) / 512);
        let mut seg_max = [0u8; 4];
        d.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), 126);
        assert_eq!(d.attr("capacity").as_deref(), Some("2097152"));
        assert!(d.create_engine().is_ok());
    }

    /// The whole path: transport-style engine calls, a poller thread, a split ring, a file.
    #[test]
    fn requests_complete_through_the_poller() {
        use crate::backend::raw::{RawFile, RawFileOptions};
        use crate::request::{req_type, status, VirtioBlkOutHdr};
        use crate::testutil::{pattern, TempImage};
        use emudev_virtio::engine::{Kick, Notifier};
        use emudev_virtio::queue::features as qf;
        use emudev_virtio::queue::testdriver::{anon_memory, Buf, SplitDriver};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::{Duration, Instant};
        use zerocopy::little_endian::{U32, U64};
        use zerocopy::IntoBytes;

        let img = TempImage::new(1 << 20);
        let backend = Arc::new(RawFile::open(&img.0, &RawFileOptions::default()).unwrap());
        let pool = PollerPool::new(1).unwrap();
        let mut d = VirtioBlkDevice::new(backend, BlkOptions::default(), pool).unwrap();
        let mut eng = d.create_engine().unwrap();
        let t = Duration::from_secs(5);
        eng.features_changed(d.features() | qf::VERSION_1)
            .wait_timeout(t)
            .unwrap();
        let mem = anon_memory(0, 4 << 20);
        eng.memory_changed(mem.clone()).wait_timeout(t).unwrap();
        let mut drv = SplitDriver::new(mem.clone(), 0, 32);
        let irqs = Arc::new(AtomicUsize::new(0));
        let irqs2 = irqs.clone();
        let notifier: Arc<dyn Notifier> = Arc::new(move || {
            irqs2.fetch_add(1, Ordering::Relaxed);
        });
        let kick = Kick::new().unwrap();
        eng.queue_start(0, drv.config(), notifier, kick.clone())
            .wait_timeout(t)
            .unwrap();

        let data = pattern(4096, 4);
        let hdr = |ty: u32, sector: u64| VirtioBlkOutHdr {
            type_: U32::new(ty),
            ioprio: U32::new(0),
            sector: U64::new(sector),
        };
        mem.write(0x10_0000, hdr(req_type::OUT, 8).as_bytes())
            .unwrap();
        mem.write(0x10_1000, &data).unwrap();
        mem.write(0x10_0100, hdr(req_type::IN, 8).as_bytes())
            .unwrap();
        drv.add_chain(&[
            Buf::r(0x10_0000, 16),
            Buf::r(0x10_1000, 4096),
            Buf::w(0x10_0200, 1),
        ]);
        drv.add_chain(&[Buf::r(0x10_0100, 16), Buf::w(0x10_8000, 4097)]);
        kick.signal();
        let start = Instant::now();
        let mut used = Vec::new();
        while used.len() < 2 && start.elapsed() < t {
            if let Some(u) = drv.pop_used() {
                used.push(u);
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // The write and the read are in order on one queue: the read sees the write.
        assert_eq!(used, vec![(0, 1), (3, 4097)]);
        let mut back = vec![0u8; 4097];
        mem.read(0x10_8000, &mut back).unwrap();
        assert_eq!(&back[..4096], &data[..]);
        assert_eq!(back[4096], status::OK);
        assert_eq!(&img.contents()[4096..8192], &data[..]);
        assert!(irqs.load(Ordering::Relaxed) >= 1);
        eng.queue_stop(0).wait_timeout(t).unwrap();
        eng.destroy().wait_timeout(t).unwrap();
        assert_eq!(d.stats().requests, 2);
    }

    /// Two queues on two poller threads share one file backend; each queue's writes land
    /// and read back, and the per-queue counters add up.
    #[test]
    fn two_queues_on_two_threads_share_the_backend() {
        use crate::backend::raw::{RawFile, RawFileOptions};
        use crate::request::{req_type, status, VirtioBlkOutHdr};
        use crate::testutil::{pattern, TempImage};
        use emudev_virtio::engine::{Kick, Notifier};
        use emudev_virtio::queue::features as qf;
        use emudev_virtio::queue::testdriver::{anon_memory, Buf, SplitDriver};
        use std::time::{Duration, Instant};
        use zerocopy::little_endian::{U32, U64};
        use zerocopy::IntoBytes;

        let img = TempImage::new(1 << 20);
        let backend = Arc::new(RawFile::open(&img.0, &RawFileOptions::default()).unwrap());
        let pool = PollerPool::new(2).unwrap();
        let opts = BlkOptions {
            num_queues: 2,
            queue_size: 64,
            ..Default::default()
        };
        let mut d = VirtioBlkDevice::new(backend, opts, pool).unwrap();
        let mut eng = d.create_engine().unwrap();
        let t = Duration::from_secs(5);
        eng.features_changed(d.features() | qf::VERSION_1)
            .wait_timeout(t)
            .unwrap();
        let mem = anon_memory(0, 8 << 20);
        eng.memory_changed(mem.clone()).wait_timeout(t).unwrap();
        let hdr = |ty: u32, sector: u64| VirtioBlkOutHdr {
            type_: U32::new(ty),
            ioprio: U32::new(0),
            sector: U64::new(sector),
        };
        let mut drivers = Vec::new();
        for qidx in 0..2u16 {
            let base = u64::from(qidx) * 0x40_0000;
            let mut drv = SplitDriver::new(mem.clone(), base, 64);
            let kick = Kick::new().unwrap();
            let notifier: Arc<dyn Notifier> = Arc::new(|| {});
            eng.queue_start(qidx, drv.config(), notifier, kick.clone())
                .wait_timeout(t)
                .unwrap();
            // 8 writes of 4 KiB each; queue q owns sectors [q*64, q*64 + 64).
            for i in 0..8u64 {
                let at = base + 0x10_0000 + i * 0x2000;
                let sector = u64::from(qidx) * 64 + i * 8;
                mem.write(at, hdr(req_type::OUT, sector).as_bytes())
                    .unwrap();
                mem.write(at + 0x1000, &pattern(4096, (qidx as u8) * 16 + i as u8))
                    .unwrap();
                drv.add_chain(&[
                    Buf::r(at, 16),
                    Buf::r(at + 0x1000, 4096),
                    Buf::w(at + 0x20, 1),
                ]);
            }
            kick.signal();
            drivers.push((drv, base));
        }
        let start = Instant::now();
        for (drv, base) in &mut drivers {
            let mut n = 0;
            while n < 8 && start.elapsed() < t {
                match drv.pop_used() {
                    Some((_, len)) => {
                        assert_eq!(len, 1);
                        n += 1;
                    }
                    None => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            assert_eq!(n, 8);
            for i in 0..8u64 {
                let mut st = [0xffu8];
                mem.read(*base + 0x10_0000 + i * 0x2000 + 0x20, &mut st)
                    .unwrap();
                assert_eq!(st[0], status::OK);
            }
        }
        let disk = img.contents();
        for q in 0..2usize {
            for i in 0..8usize {
                let off = (q * 64 + i * 8) * 512;
                assert_eq!(
                    &disk[off..off + 4096],
                    &pattern(4096, (q as u8) * 16 + i as u8)[..]
                );
            }
        }
        eng.destroy().wait_timeout(t).unwrap();
        assert_eq!(d.queue_stats(0).unwrap().snapshot().requests, 8);
        assert_eq!(d.queue_stats(1).unwrap().snapshot().requests, 8);
        assert_eq!(d.stats().write_bytes, 16 * 4096);
    }
}
