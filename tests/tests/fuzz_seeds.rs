//! Writes the seed corpus of the `vfio_user_server` fuzz target (fuzz/corpus/) from the QEMU
//! captures plus handmade malformed messages. Run on demand:
//! `cargo test -p emudev-tests --test fuzz_seeds -- --ignored`.
//!
//! Seed layout (see fuzz/fuzz_targets/vfio_user_server.rs): a control byte, then messages.

use std::path::PathBuf;

use emudev_tests::fixtures;
use emudev_tests::raw::{msg, version_request, QEMU_CAPS_JSON};
use emudev_vfio_user::wire::{cmd, hdr_flags, DmaMap, Header, IrqSet, RegionAccess};
use zerocopy::IntoBytes;

/// Control byte bits of the fuzz target.
const AUTO_VERSION: u8 = 1;
const WITH_FDS: u8 = 2;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vfio_user_server")
}

fn handmade() -> Vec<(&'static str, u8, Vec<u8>)> {
    let ra = |region, offset, count| RegionAccess {
        offset,
        region,
        count,
    };
    let mut huge = Header {
        msg_id: 1,
        command: cmd::REGION_WRITE,
        msg_size: u32::MAX,
        flags: 0,
        error: 0,
    }
    .as_bytes()
    .to_vec();
    huge.extend_from_slice(&[0u8; 64]);
    vec![
        (
            "hand-size-zero",
            AUTO_VERSION,
            Header::default().as_bytes().to_vec(),
        ),
        ("hand-size-huge", AUTO_VERSION, huge),
        (
            "hand-unknown-cmd",
            AUTO_VERSION,
            msg(2, 0x77, 0, &[1u8; 40]),
        ),
        (
            "hand-before-version",
            0,
            msg(3, cmd::REGION_READ, 0, ra(7, 0, 4).as_bytes()),
        ),
        (
            "hand-version-no-nul",
            0,
            msg(
                4,
                cmd::VERSION,
                0,
                &[&[0u8, 0, 0, 0][..], br#"{"capabilities":{}}"#].concat(),
            ),
        ),
        (
            "hand-version-twice",
            0,
            [
                version_request(5, 0, 0, Some(QEMU_CAPS_JSON)),
                version_request(6, 0, 0, None),
            ]
            .concat(),
        ),
        (
            "hand-read-overflow",
            AUTO_VERSION,
            msg(7, cmd::REGION_READ, 0, ra(2, u64::MAX - 1, 4).as_bytes()),
        ),
        (
            "hand-posted-write-then-read",
            AUTO_VERSION,
            [
                msg(
                    8,
                    cmd::REGION_WRITE,
                    hdr_flags::NO_REPLY,
                    &[ra(2, 0, 2).as_bytes(), &[1, 2]].concat(),
                ),
                msg(9, cmd::REGION_READ, 0, ra(2, 0, 2).as_bytes()),
            ]
            .concat(),
        ),
        (
            "hand-irqs-overflow",
            AUTO_VERSION | WITH_FDS,
            msg(
                10,
                cmd::DEVICE_SET_IRQS,
                0,
                IrqSet {
                    argsz: 20,
                    flags: 0x24,
                    index: 0,
                    start: u32::MAX,
                    count: 2,
                }
                .as_bytes(),
            ),
        ),
        (
            "hand-dma-overlap",
            AUTO_VERSION | WITH_FDS,
            [
                msg(
                    11,
                    cmd::DMA_MAP,
                    0,
                    DmaMap {
                        argsz: 32,
                        flags: 3,
                        offset: 0,
                        address: 0x1000,
                        size: 0x2000,
                    }
                    .as_bytes(),
                ),
                msg(
                    12,
                    cmd::DMA_MAP,
                    0,
                    DmaMap {
                        argsz: 32,
                        flags: 1,
                        offset: 0,
                        address: 0x2000,
                        size: 0x2000,
                    }
                    .as_bytes(),
                ),
                msg(
                    13,
                    cmd::DMA_UNMAP,
                    0,
                    &[
                        24, 0, 0, 0, 0, 0, 0, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0,
                        0,
                    ],
                ),
            ]
            .concat(),
        ),
        (
            "hand-fds-on-get-info",
            AUTO_VERSION | WITH_FDS | 4,
            msg(
                14,
                cmd::DEVICE_GET_INFO,
                0,
                &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        ),
        // Chunked (seed 5 in the upper bits): a region read split in small pieces.
        (
            "hand-chunked-read",
            AUTO_VERSION | (5 << 3),
            msg(15, cmd::REGION_READ, 0, ra(7, 0, 64).as_bytes()),
        ),
    ]
}

#[test]
#[ignore = "writes fuzz/corpus; run on demand"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let mut n = 0;
    for (name, ctl_fds) in [
        (fixtures::CAPTURES[0], WITH_FDS),
        (fixtures::CAPTURES[1], 0),
    ] {
        let Some(cap) = fixtures::load(name).expect("parse") else {
            return;
        };
        let msgs = cap.to_server();
        let tag = if ctl_fds != 0 { "shared" } else { "noshared" };
        // Prefixes ending after each phase of QEMU's start-up, and the whole sequence.
        let mut cuts: Vec<usize> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let next = msgs.get(i + 1).map(|n| n.header.command);
            if next != Some(m.header.command) {
                cuts.push(i + 1);
            }
        }
        cuts.dedup();
        for cut in cuts.into_iter().take(24).chain([msgs.len()]) {
            let mut seed = vec![ctl_fds];
            for m in &msgs[..cut] {
                seed.extend_from_slice(&m.bytes);
            }
            std::fs::write(dir.join(format!("qemu-{tag}-{cut:03}")), seed).expect("write seed");
            n += 1;
        }
    }
    for (name, ctl, bytes) in handmade() {
        let mut seed = vec![ctl];
        seed.extend(bytes);
        std::fs::write(dir.join(name), seed).expect("write seed");
        n += 1;
    }
    eprintln!("wrote {n} seeds to {}", dir.display());
}
