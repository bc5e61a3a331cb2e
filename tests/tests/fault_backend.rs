//! Backing store failures through the full device: a [`FaultyBackend`] over a real image
//! file starts failing (ENOSPC, EIO) after some writes. The driver must get
//! VIRTIO_BLK_S_IOERR for every failed request, never OK for data that did not land; writes
//! acknowledged before the failure stay in the image; the device keeps answering (reads of
//! acknowledged data still succeed when only writes fail) and a later device over the
//! healed file serves normally.

mod blkrig;

use std::sync::Arc;

use blkrig::{BlkRig, T};
use emudev_blk::backend::faulty::{FaultPlan, FaultyBackend};
use emudev_blk::backend::raw::{RawFile, RawFileOptions};
use emudev_blk::backend::BlockBackend;
use emudev_blk::request::status;
use emudev_virtio::poller::PollerPool;

fn image(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("emudev-fault-be-{}-{tag}.img", std::process::id()));
    let f = std::fs::File::create(&p).expect("image");
    f.set_len(1 << 20).expect("size");
    p
}

fn block(seed: u8) -> Vec<u8> {
    (0..4096u32).map(|i| (i as u8) ^ seed).collect()
}

fn run(errno: i32, fail_reads: bool) {
    let tag = format!("{errno}-{fail_reads}");
    let path = image(&tag);
    let raw: Arc<dyn BlockBackend> =
        Arc::new(RawFile::open(&path, &RawFileOptions::default()).expect("open"));
    // The rig does not negotiate FLUSH, so the device is write-through: each write is a
    // write plus an implied flush, two mutations. Six mutations = three writes.
    let plan = FaultPlan {
        ok_writes: 6,
        fail_reads,
        errno,
    };
    let faulty = Arc::new(FaultyBackend::new(raw, plan));
    let pool = PollerPool::new(1).expect("pool");
    let mut r = BlkRig::new(faulty.clone(), pool.clone());

    // Three writes succeed and are acknowledged.
    for i in 0..3u8 {
        assert_eq!(
            r.write_sync(u64::from(i) * 8, &block(i)),
            status::OK,
            "write {i}"
        );
    }
    // Then every write fails: IOERR, never OK.
    for i in 3..8u8 {
        assert_eq!(
            r.write_sync(u64::from(i) * 8, &block(i)),
            status::IOERR,
            "failing write {i} (errno {errno})"
        );
    }
    assert!(
        faulty.injected() >= 5,
        "failures injected: {}",
        faulty.injected()
    );
    // Reads: acknowledged data is still readable unless reads fail too.
    let (st, data) = r.read_sync(8, 4096);
    if fail_reads {
        assert_eq!(st, status::IOERR, "read while failing");
    } else {
        assert_eq!(st, status::OK);
        assert_eq!(data, block(1), "acknowledged write read back");
    }
    // The device did not break: no NEEDS_RESET, it keeps answering.
    assert_eq!(
        r.status() & 0x40,
        0,
        "DEVICE_NEEDS_RESET after backend errors"
    );
    assert_eq!(
        r.write_sync(64, &block(9)),
        status::IOERR,
        "still failing, still answering"
    );
    drop(r);

    // The image holds exactly the acknowledged writes.
    let img = std::fs::read(&path).expect("read image");
    for i in 0..3usize {
        assert_eq!(
            &img[i * 4096..(i + 1) * 4096],
            &block(i as u8)[..],
            "acked write {i}"
        );
    }
    // A device over the healed file serves normally.
    let raw: Arc<dyn BlockBackend> =
        Arc::new(RawFile::open(&path, &RawFileOptions::default()).expect("reopen"));
    let mut r = BlkRig::new(raw, pool);
    r.check_serves(128, 5);
    let (st, data) = r.read_sync(16, 4096);
    assert_eq!((st, data), (status::OK, block(2)));
    drop(r);
    let _ = std::fs::remove_file(&path);
    let _ = T;
}

#[test]
fn enospc_gives_ioerr() {
    run(libc::ENOSPC, false);
}

#[test]
fn eio_gives_ioerr_for_writes_and_reads() {
    run(libc::EIO, true);
}
