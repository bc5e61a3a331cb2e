//! The PF side of virtchnl ([`VfState::handle`]) on sequences of arbitrary messages, as the
//! admin-queue engine feeds it: any opcode, any length, any bytes. Checks the protocol
//! invariants after every message: exactly one reply with the request's opcode (none for
//! RESET_VF), queue state within the advertised counts, LUT entries within the queue
//! pairs, MAC filters bounded.
//!
//! Input: records `[op, len_lo, len_hi, bytes...]`; `op` < 0xF0 picks from the opcode
//! table, otherwise it is the raw opcode `op & 0x3F`; `len` is capped by what remains.

#![no_main]

use std::cell::RefCell;

use emudev::transport::InProc;
use emudev_avf::pf::{VfState, MAX_MAC_FILTERS, MAX_VLAN_FILTERS, MAX_VLAN_ID};
use emudev_avf::virtchnl::op;
use emudev_avf::{AvfDevice, VfConfig};
use libfuzzer_sys::fuzz_target;

const OPS: [u32; 24] = [
    op::VERSION,
    op::RESET_VF,
    op::GET_VF_RESOURCES,
    op::CONFIG_TX_QUEUE,
    op::CONFIG_RX_QUEUE,
    op::CONFIG_VSI_QUEUES,
    op::CONFIG_IRQ_MAP,
    op::ENABLE_QUEUES,
    op::DISABLE_QUEUES,
    op::ADD_ETH_ADDR,
    op::DEL_ETH_ADDR,
    op::CONFIG_PROMISCUOUS_MODE,
    op::GET_STATS,
    op::EVENT,
    op::CONFIG_RSS_HFUNC,
    op::CONFIG_RSS_KEY,
    op::CONFIG_RSS_LUT,
    op::GET_RSS_HENA_CAPS,
    op::SET_RSS_HENA,
    op::REQUEST_QUEUES,
    op::ADD_VLAN,
    op::DEL_VLAN,
    op::ENABLE_VLAN_STRIPPING,
    op::DISABLE_VLAN_STRIPPING,
];

thread_local! {
    /// 1 MiB of guest RAM at 0 for the ring-address checks (the device itself is idle).
    static RAM: RefCell<Option<InProc<AvfDevice>>> = RefCell::new(
        AvfDevice::new("fuzz-avf-vc", VfConfig::default(), None)
            .ok()
            .and_then(|d| InProc::new(d, 1).ok()),
    );
}

fuzz_target!(|data: &[u8]| {
    RAM.with(|ram| {
        let ram = ram.borrow();
        let Some(io) = ram.as_ref() else { return };
        let mem = io.mem().clone();
        let pairs = data.first().map_or(1, |b| u16::from(b % 17));
        let mut vf = VfState::new(VfConfig {
            queue_pairs: pairs,
            ..VfConfig::default()
        });
        let mut rest = data.get(1..).unwrap_or_default();
        while rest.len() >= 3 {
            let o = if rest[0] < 0xF0 {
                OPS[usize::from(rest[0]) % OPS.len()]
            } else {
                u32::from(rest[0] & 0x3F)
            };
            let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
            let msg = &rest[3..3 + len];
            rest = &rest[3 + len..];
            let out = vf.handle(o, msg, &mem);
            if o == op::RESET_VF {
                assert!(out.messages.is_empty() && out.reset);
            } else {
                assert_eq!(out.messages.first().map(|m| m.opcode), Some(o), "one reply");
            }
            if out.reset {
                vf.reset_vf();
            }
            let nq = vf.num_queue_pairs;
            assert!((1..=vf.cfg.queue_pairs).contains(&nq));
            assert_eq!(vf.queues.len(), usize::from(nq));
            assert!(vf.rss_lut.iter().all(|&q| u16::from(q) < nq));
            assert!(vf.mac_filters.len() <= MAX_MAC_FILTERS);
            assert!(vf.vlan_filters.len() <= MAX_VLAN_FILTERS);
            assert!(vf.vlan_filters.iter().all(|&v| v <= MAX_VLAN_ID));
            for q in &vf.queues {
                for v in [q.rx_vector, q.tx_vector].into_iter().flatten() {
                    assert!(v < vf.max_vectors());
                }
                assert!(!q.tx_enabled || q.tx.is_some());
                assert!(!q.rx_enabled || q.rx.is_some());
                if let Some(r) = q.rx {
                    assert!(r.len > 0 && r.buf_size > 0);
                }
            }
        }
    });
});
