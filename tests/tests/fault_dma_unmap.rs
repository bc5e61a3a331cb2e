//! DMA_UNMAP while I/O is in flight: the unmap of the memory holding the rings and buffers
//! returns (the device has quiesced its use of it) well within the 5 s a vfio-user client
//! waits for a reply; the device then sits idle without faulting, and serves again once the
//! driver remaps memory and resets it.

mod blkrig;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blkrig::{BlkRig, RAM_MIB};
use emudev_blk::backend::raw::{RawFile, RawFileOptions};
use emudev_virtio::poller::PollerPool;

#[test]
fn unmap_during_io_is_answered_within_the_client_timeout() {
    let pool = PollerPool::new(1).expect("pool");
    let img = std::env::temp_dir().join(format!("emudev-fault-unmap-{}.img", std::process::id()));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image");
    let backend = RawFile::open(&img, &RawFileOptions::default()).expect("open image");
    let mut r = BlkRig::new(Arc::new(backend), pool);
    let ram = RAM_MIB << 20;
    let mut worst = Duration::ZERO;
    for round in 0..20u64 {
        // Keep the queue busy: a full ring of 64 KiB reads, kicked, then unmap at once.
        for i in 0..15u64 {
            r.push_read(i % 8, i * 128, 64 << 10);
        }
        r.kick();
        std::thread::sleep(Duration::from_micros(50 * round));
        let t = Instant::now();
        r.io.unmap(0, ram).expect("DMA_UNMAP");
        let took = t.elapsed();
        worst = worst.max(took);
        assert!(
            took < Duration::from_secs(5),
            "round {round}: unmap took {took:?}"
        );
        // No memory: the device must not fault and must stay answerable.
        let _ = r.status();
        r.io.map_fd(0, ram).expect("DMA_MAP again");
        r.bring_up();
        r.check_serves(0, round as u8);
    }
    eprintln!("worst DMA_UNMAP latency under I/O: {worst:?}");
    drop(r);
    let _ = std::fs::remove_file(&img);
}
