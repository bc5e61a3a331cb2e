//! AVF receive classification of frames from the network (untrusted bytes from a tap or
//! another guest on the switch): MAC filter, packet type, checksum verification and RSS
//! hash ([`emudev_avf::rx`]), and the write-back encoding of the result. Checks: hash iff
//! FLTSTAT, error bits only with L3L4P, the RSS queue within the LUT, and the encoded
//! descriptor carrying exactly the classified fields.
//!
//! Input: `[flags, promisc, lut_len, key (52 bytes), frame...]`; flags bit 0 = the backend's
//! DATA_VALID, bits 1-2 pick HENA variants, bit 3 turns on VLAN filtering (one id from
//! `promisc >> 2`), bit 4 stripping.

#![no_main]

use emudev_avf::desc::{rx_error, rx_status, RxWriteback};
use emudev_avf::rx::{classify, strip_vlan, vlan_tci, Rss, RxPolicy};
use emudev_avf::virtchnl::HENA_CAPS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 + 52 {
        return;
    }
    let (flags, promisc, lut_len) = (data[0], data[1], usize::from(data[2] % 65));
    let key = data[3..55].to_vec();
    let frame = &data[55..];
    let hena = match flags >> 1 & 3 {
        0 => HENA_CAPS,
        1 => 0,
        2 => 1 << 35 | 1 << 45,
        _ => u64::from_le_bytes(key[..8].try_into().unwrap_or([0; 8])),
    };
    let policy = RxPolicy {
        primary: frame
            .get(..6)
            .and_then(|m| m.try_into().ok())
            .unwrap_or([0; 6]),
        filters: frame
            .chunks_exact(6)
            .skip(1)
            .take(4)
            .filter_map(|m| m.try_into().ok())
            .collect(),
        promisc: u16::from(promisc & 3),
        vlans: (flags & 8 != 0).then(|| vec![u16::from(promisc >> 2)]),
        strip: flags & 16 != 0,
        rss: Rss {
            key,
            lut: (0..lut_len).map(|i| (i % 4) as u8).collect(),
            hena,
        },
    };
    let _ = policy.accepts(frame);
    let mut stripped = Vec::new();
    if let Some(tci) = strip_vlan(frame, &mut stripped) {
        assert_eq!(stripped.len() + 4, frame.len());
        assert_eq!(vlan_tci(frame), Some(tci));
    }
    let info = classify(frame, flags & 1 != 0, &policy);
    assert_eq!(
        info.hash.is_some(),
        info.flags & rx_status::FLTSTAT_RSS == rx_status::FLTSTAT_RSS
    );
    if info.flags & (rx_error::IPE | rx_error::L4E) != 0 {
        assert_ne!(info.flags & rx_status::L3L4P, 0);
    }
    if let Some(h) = info.hash {
        match policy.queue_for(h) {
            Some(q) => assert!(q < 4),
            None => assert_eq!(lut_len, 0),
        }
    }
    let len = frame.len().min(0x3FFF) as u16;
    let wb = RxWriteback {
        len,
        eof: true,
        ptype: info.ptype,
        flags: info.flags,
        hash: info.hash.unwrap_or(0),
        l2tag1: emudev_avf::rx::vlan_tci(frame),
    }
    .encode();
    assert_eq!(wb[1] & 3, 3, "DD|EOF");
    assert_eq!((wb[1] >> 30) as u8, info.ptype);
    assert_eq!((wb[1] >> 38 & 0x3FFF) as u16, len);
    assert_eq!((wb[0] >> 32) as u32, info.hash.unwrap_or(0));
});
