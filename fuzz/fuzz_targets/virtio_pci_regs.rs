//! virtio-pci register sequences: a virtio-blk device (null backend) behind the modern
//! virtio-pci transport, driven through emudev's in-process transport (the same adapter and
//! range checks as vfio-user) by fuzzed reads and writes of BAR4 (common cfg, ISR, device
//! cfg, notify) and PCI config space (including the virtio PCI-cfg access window and the
//! MSI-X capability). Ring addresses the fuzzer programs point into 1 MiB of guest RAM at 0,
//! so DRIVER_OK can start real queues on the shared poller thread.
//!
//! Input: a sequence of 12-byte ops `[kind, off_lo, off_hi, width, value(8)]`:
//! - kind % 8: 0-2 BAR4 write, 3 BAR4 read, 4 config write, 5 config read, 6 guest RAM write
//!   (8 bytes at `off * 8`), 7 DEVICE_RESET; kind bit 3 sets `off` to a common-cfg register
//!   (off % 0x40) so the status machine is reached quickly.
//! - width: 1 << (width % 4) bytes.

#![no_main]

use std::sync::{Arc, OnceLock};

use emudev::transport::InProc;
use emudev_blk::backend::null::NullBackend;
use emudev_blk::config::BlkOptions;
use emudev_blk::device::VirtioBlkDevice;
use emudev_vfio_user::wire::region_index;
use emudev_virtio::pci::layout::{VIRTIO_BAR, VIRTIO_BAR_SIZE};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::poller::{PollerConfig, PollerPool};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

const MAX_OPS: usize = 256;

fn pool() -> Arc<PollerPool> {
    static POOL: OnceLock<Arc<PollerPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        PollerPool::with_config(1, PollerConfig::fixed_spin(Duration::ZERO)).expect("poller pool")
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let opts = BlkOptions {
        num_queues: 2,
        queue_size: 64,
        ..Default::default()
    };
    let blk = VirtioBlkDevice::new(Arc::new(NullBackend::new(1 << 20)), opts, pool())
        .expect("blk device");
    let mut dev = VirtioPciDevice::new("fuzz-blk", blk).expect("virtio-pci device");
    // Keep a wedged engine from stalling the fuzzer.
    dev.set_engine_timeout(Duration::from_millis(500));
    let Ok(mut io) = InProc::new(dev, 1) else {
        return;
    };
    let bar = u32::from(VIRTIO_BAR);
    let ram = io.ram_size();
    for op in data.chunks_exact(12).take(MAX_OPS) {
        let kind = op[0];
        let mut off = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = 1usize << (op[3] % 4);
        let value = &op[4..4 + width];
        if kind & 8 != 0 {
            off %= 0x40;
        }
        match kind % 8 {
            0..=2 => {
                let _ = io.region_write(bar, off % VIRTIO_BAR_SIZE, value);
            }
            3 => {
                let mut b = [0u8; 8];
                let _ = io.region_read(bar, off % VIRTIO_BAR_SIZE, &mut b[..width]);
            }
            4 => {
                let _ = io.region_write(region_index::CONFIG, off % 0x1000, value);
            }
            5 => {
                let mut b = [0u8; 8];
                let _ = io.region_read(region_index::CONFIG, off % 0x1000, &mut b[..width]);
            }
            6 => {
                let at = (off * 8) % ram;
                let _ = io.mem().write(at, &op[4..12]);
            }
            _ => {
                let _ = io.reset();
            }
        }
    }
});
