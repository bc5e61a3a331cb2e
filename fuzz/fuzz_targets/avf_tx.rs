//! AVF TX descriptors and offloads: a chain of arbitrary 16-byte descriptors is decoded
//! ([`decode_tx`]) and gathered into packets the way the datapath does (context descriptor
//! for the next packet, data descriptors up to EOP); each packet's offload request becomes
//! a vnet header ([`offload_header`]) and, for TSO, the template fix-up
//! ([`fix_tso_template`]). What the device accepts is then finished by netback exactly as
//! the L2 switch does for a port without offloads (checksum completion, TCP segmentation),
//! so a header the device builds can never make a backend index out of bounds.
//!
//! Input: `[n_desc, descriptors (16 bytes each)..., packet bytes...]`; buffer contents are
//! taken from the packet bytes, cycling.

#![no_main]

use emudev_avf::desc::{decode_tx, fix_tso_template, offload_header, TxDesc, TX_DESC_LEN};
use emudev_netback::gso::segment_tcp;
use emudev_netback::hdr::{finish_checksum, gso, F_NEEDS_CSUM};
use emudev_netback::{VirtioNetHdr, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;
use zerocopy::IntoBytes;

const MAX_PKT: usize = 65_536;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 32);
    let Some(descs) = rest.get(..n * TX_DESC_LEN) else {
        return;
    };
    let bytes = &rest[n * TX_DESC_LEN..];
    let mut ctx = None;
    let mut bufs = Vec::new();
    for d in descs.chunks_exact(TX_DESC_LEN) {
        let mut raw = [0u8; TX_DESC_LEN];
        raw.copy_from_slice(d);
        match decode_tx(&raw) {
            TxDesc::Context(c) => ctx = Some(c),
            TxDesc::Other(t) => assert!(t > 1),
            TxDesc::Data(d) => {
                assert!(d.len < 1 << 14);
                bufs.push(d);
                if !d.eop() {
                    continue;
                }
                let total: usize = bufs.iter().map(|b| usize::from(b.len)).sum();
                let first = bufs[0];
                bufs.clear();
                let c = ctx.take();
                if total == 0 || total > MAX_PKT {
                    continue;
                }
                let mut frame: Vec<u8> = if bytes.is_empty() {
                    vec![0; total]
                } else {
                    bytes.iter().copied().cycle().take(total).collect()
                };
                let Ok(h) = offload_header(&first, c.as_ref(), total) else {
                    continue;
                };
                if h.flags & F_NEEDS_CSUM != 0 {
                    let end =
                        usize::from(h.csum_start.get()) + usize::from(h.csum_offset.get()) + 2;
                    assert!(end <= total, "checksum field inside the frame");
                }
                if h.gso_type != gso::NONE {
                    assert!(usize::from(h.hdr_len.get()) <= total);
                    if fix_tso_template(&mut frame, &first).is_err() {
                        continue;
                    }
                }
                let mut buf = h.as_bytes().to_vec();
                buf.extend_from_slice(&frame);
                assert_eq!(
                    VirtioNetHdr::parse(&buf).map(|p| p.gso_type),
                    Some(h.gso_type)
                );
                if h.gso_type == gso::NONE {
                    let _ = finish_checksum(&mut buf);
                } else {
                    let mut scratch = Vec::new();
                    let _ = segment_tcp(&buf, &mut scratch, &mut |seg| {
                        assert!(seg.len() >= VNET_HDR_LEN);
                    });
                }
            }
        }
    }
});
