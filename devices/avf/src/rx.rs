//! Receive-side policy (avf-device.md §5.7, §5.8, §8 phase 2): the VSI's MAC filter, the
//! packet type and checksum status reported in the RX write-back, and RSS (Toeplitz hash,
//! queue from the LUT, hash in the descriptor).
//!
//! Everything here is a pure function of the frame bytes and a [`RxPolicy`] snapshot taken
//! by the datapath under the core lock, so it is tested (and fuzzed) without a device.

use emudev_netback::hdr::ones_sum;

use crate::desc::{rx_error, rx_status};
use crate::pf::VfState;
use crate::virtchnl::{PROMISC_MULTICAST, PROMISC_UNICAST};

/// Legacy packet types (i40e/ice numbering, §5.7).
pub mod ptype {
    pub const UNKNOWN: u8 = 0;
    pub const L2: u8 = 1;
    pub const IPV4_FRAG: u8 = 22;
    pub const IPV4_OTHER: u8 = 23;
    pub const IPV4_UDP: u8 = 24;
    pub const IPV4_TCP: u8 = 26;
    pub const IPV4_SCTP: u8 = 27;
    pub const IPV4_ICMP: u8 = 28;
    pub const IPV6_FRAG: u8 = 88;
    pub const IPV6_OTHER: u8 = 89;
    pub const IPV6_UDP: u8 = 90;
    pub const IPV6_TCP: u8 = 92;
    pub const IPV6_SCTP: u8 = 93;
    pub const IPV6_ICMP: u8 = 94;
}

/// HENA PCTYPE bit numbers (§4.4.10).
pub mod pctype {
    pub const IPV4_UDP_UNICAST: u32 = 29;
    pub const IPV4_UDP_MULTICAST: u32 = 30;
    pub const IPV4_UDP: u32 = 31;
    pub const IPV4_TCP_SYN_NO_ACK: u32 = 32;
    pub const IPV4_TCP: u32 = 33;
    pub const IPV4_SCTP: u32 = 34;
    pub const IPV4_OTHER: u32 = 35;
    pub const IPV4_FRAG: u32 = 36;
    /// The IPv6 bit is the IPv4 one plus this.
    pub const IPV6_DELTA: u32 = 10;
}

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_IPV6_FRAG: u8 = 44;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;

/// RSS parameters in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rss {
    /// Toeplitz key (52 bytes).
    pub key: Vec<u8>,
    /// Queue per `hash % lut.len()` (64 entries).
    pub lut: Vec<u8>,
    /// PCTYPE bits hashed on.
    pub hena: u64,
}

/// What the receive path needs from the virtchnl state, copied once per datapath pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RxPolicy {
    /// The VF's primary unicast MAC (all-zero: none).
    pub primary: [u8; 6],
    /// Unicast and multicast addresses from ADD_ETH_ADDR.
    pub filters: Vec<[u8; 6]>,
    /// CONFIG_PROMISCUOUS_MODE flags.
    pub promisc: u16,
    /// VLAN ids accepted on tagged frames; `None` when the VF did not negotiate the VLAN
    /// capability (no VLAN filtering).
    pub vlans: Option<Vec<u16>>,
    /// Strip the outer 802.1Q tag into the descriptor (ENABLE_VLAN_STRIPPING).
    pub strip: bool,
    pub rss: Rss,
}

impl RxPolicy {
    /// The policy of `vf`. `regs_rss` gives the key, LUT and HENA from BAR0 when the VF did
    /// not negotiate RSS_PF (the Linux fallback "RSS_REG" mode).
    pub fn from_vf(vf: &VfState, regs_rss: impl FnOnce() -> Rss) -> Self {
        let rss = if vf.caps & crate::virtchnl::cap::RSS_PF != 0 {
            Rss {
                key: vf.rss_key.clone(),
                lut: vf.rss_lut.clone(),
                hena: vf.rss_hena,
            }
        } else {
            regs_rss()
        };
        Self {
            primary: vf.primary_mac,
            filters: vf.mac_filters.clone(),
            promisc: vf.promisc,
            vlans: (vf.caps & crate::virtchnl::cap::VLAN != 0).then(|| vf.vlan_filters.clone()),
            strip: vf.caps & crate::virtchnl::cap::VLAN != 0 && vf.vlan_strip,
            rss,
        }
    }

    /// MAC filtering: broadcast always; unicast to the primary or a listed address, or any
    /// with unicast promiscuous; multicast if listed, or any with multicast (allmulti) or
    /// unicast promiscuous. Then VLAN filtering, when negotiated: an 802.1Q-tagged frame
    /// needs its VLAN id listed (id 0, priority only, always passes; unicast promiscuous
    /// takes every id). Frames shorter than a MAC header are refused.
    pub fn accepts(&self, frame: &[u8]) -> bool {
        let Some(dst) = frame.get(..6) else {
            return false;
        };
        if self.promisc & PROMISC_UNICAST != 0 {
            return true;
        }
        if let (Some(list), Some(tci)) = (&self.vlans, vlan_tci(frame)) {
            let vid = tci & 0x0fff;
            if vid != 0 && !list.contains(&vid) {
                return false;
            }
        }
        if dst == [0xff; 6] {
            return true;
        }
        let listed = self.filters.iter().any(|m| m == dst);
        if dst[0] & 1 != 0 {
            listed || self.promisc & PROMISC_MULTICAST != 0
        } else {
            listed || (dst == self.primary && self.primary != [0; 6])
        }
    }

    /// The queue RSS picks for `hash`, if the LUT has an entry for it.
    pub fn queue_for(&self, hash: u32) -> Option<u16> {
        let n = self.rss.lut.len();
        if n == 0 {
            return None;
        }
        let i = usize::try_from(hash).ok()? % n;
        self.rss.lut.get(i).map(|&q| u16::from(q))
    }
}

/// The TCI of an 802.1Q-tagged frame.
pub fn vlan_tci(frame: &[u8]) -> Option<u16> {
    match frame.get(12..16)? {
        [0x81, 0x00, hi, lo] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// The frame without its 802.1Q tag, in `out`, and the tag; `None` if it is not tagged.
pub fn strip_vlan(frame: &[u8], out: &mut Vec<u8>) -> Option<u16> {
    let tci = vlan_tci(frame)?;
    out.clear();
    out.extend_from_slice(frame.get(..12)?);
    out.extend_from_slice(frame.get(16..)?);
    Some(tci)
}

/// What the EOF write-back reports for a frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxInfo {
    pub ptype: u8,
    /// L3L4P, IPE, L4E and FLTSTAT bits, already in qword1 position.
    pub flags: u64,
    /// RSS hash (FLTSTAT = 3) when the packet type is enabled in HENA.
    pub hash: Option<u32>,
    /// VLAN TCI stripped from the frame.
    pub l2tag1: Option<u16>,
}

/// Standard Toeplitz hash of `input` with `key` (bytes past the key's end count as zero).
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let kb = |i: usize| u64::from(key.get(i).copied().unwrap_or(0));
    // Bits 63..32 of `win` are the 32 key bits aligned with the current input bit.
    let mut win = (0..8).fold(0u64, |w, i| (w << 8) | kb(i));
    let mut hash = 0u32;
    for (next, &b) in (8..).zip(input) {
        for bit in (0..8).rev() {
            if b >> bit & 1 != 0 {
                hash ^= (win >> 32) as u32;
            }
            win <<= 1;
        }
        win |= kb(next);
    }
    hash
}

fn fold64(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// True if the Internet checksum over `parts` (each summed as a big-endian word stream,
/// every part but the last of even length) plus `extra` verifies.
fn csum_ok(parts: &[&[u8]], extra: u64) -> bool {
    let s = parts.iter().fold(extra, |a, p| a + u64::from(ones_sum(p)));
    fold64(s) == 0xffff
}

/// The L4 part of a packet: protocol, bytes (header and payload, trimmed to the IP length).
struct L4<'a> {
    proto: u8,
    data: &'a [u8],
}

enum L3<'a> {
    V4 {
        hdr: &'a [u8],
        frag: bool,
    },
    V6 {
        hdr: &'a [u8],
        /// The fragment header was the first extension.
        frag: bool,
    },
}

impl L3<'_> {
    /// Source and destination addresses, in wire order.
    fn addrs(&self) -> &[u8] {
        match self {
            L3::V4 { hdr, .. } => &hdr[12..20],
            L3::V6 { hdr, .. } => &hdr[8..40],
        }
    }
}

/// Parse Ethernet (one VLAN tag at most), then IPv4 or IPv6 (no extension headers other
/// than a leading fragment header). `None` for non-IP or a malformed IP header.
fn parse(frame: &[u8]) -> Option<(L3<'_>, Option<L4<'_>>)> {
    let be16 = |b: &[u8], o: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*b.get(o)?, *b.get(o + 1)?]))
    };
    let mut off = 12;
    let mut et = be16(frame, off)?;
    if et == ETH_P_8021Q || et == ETH_P_8021AD {
        off += 4;
        et = be16(frame, off)?;
    }
    let l3 = frame.get(off + 2..)?;
    match et {
        ETH_P_IPV4 => {
            let vihl = *l3.first()?;
            let ihl = usize::from(vihl & 0xf) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            let tot = usize::from(be16(l3, 2)?);
            if tot < ihl || tot > l3.len() {
                return None;
            }
            let hdr = &l3[..ihl];
            let fragoff = be16(l3, 6)?;
            let frag = fragoff & 0x3fff != 0;
            let proto = l3[9];
            let l4 = (!frag).then(|| L4 {
                proto,
                data: &l3[ihl..tot],
            });
            Some((L3::V4 { hdr, frag }, l4))
        }
        ETH_P_IPV6 => {
            if l3.len() < 40 || l3[0] >> 4 != 6 {
                return None;
            }
            let end = 40usize.checked_add(usize::from(be16(l3, 4)?))?;
            let body = l3.get(40..end)?;
            let hdr = &l3[..40];
            let nh = l3[6];
            if nh == IPPROTO_IPV6_FRAG {
                return Some((L3::V6 { hdr, frag: true }, None));
            }
            Some((
                L3::V6 { hdr, frag: false },
                Some(L4 {
                    proto: nh,
                    data: body,
                }),
            ))
        }
        _ => None,
    }
}

/// Classify a received frame: packet type, checksum status and RSS hash. `l4_valid` is the
/// backend's word that the L4 checksum was verified (vnet header DATA_VALID); the IPv4
/// header checksum is checked regardless. L3L4P is reported only for TCP, UDP and ICMP,
/// whose checksums are verified here; other packets leave verification to the guest.
pub fn classify(frame: &[u8], l4_valid: bool, policy: &RxPolicy) -> RxInfo {
    let Some((l3, l4)) = parse(frame) else {
        // Non-IP (ARP, LLDP...) or malformed IP: L2, no checksum or hash.
        let is_eth = frame.len() >= 14;
        return RxInfo {
            ptype: if is_eth { ptype::L2 } else { ptype::UNKNOWN },
            ..RxInfo::default()
        };
    };
    let v6 = matches!(l3, L3::V6 { .. });
    let (ptype_frag, ptype_other) = if v6 {
        (ptype::IPV6_FRAG, ptype::IPV6_OTHER)
    } else {
        (ptype::IPV4_FRAG, ptype::IPV4_OTHER)
    };
    let ip_ok = match &l3 {
        L3::V4 { hdr, .. } => csum_ok(&[hdr], 0),
        L3::V6 { .. } => true,
    };
    let frag = match &l3 {
        L3::V4 { frag, .. } | L3::V6 { frag, .. } => *frag,
    };
    let mut info = RxInfo {
        ptype: if frag { ptype_frag } else { ptype_other },
        ..RxInfo::default()
    };
    let mut ports: Option<&[u8]> = None;
    let mut pct = if frag {
        pctype::IPV4_FRAG
    } else {
        pctype::IPV4_OTHER
    };
    let mut pct_alt = None;
    if let Some(l4) = &l4 {
        let pseudo = |proto: u8| -> u64 {
            u64::from(ones_sum(l3.addrs())) + u64::from(proto) + l4.data.len() as u64
        };
        let checked = match (l4.proto, v6) {
            (IPPROTO_TCP, _) if l4.data.len() >= 20 => {
                info.ptype = if v6 { ptype::IPV6_TCP } else { ptype::IPV4_TCP };
                ports = l4.data.get(..4);
                pct = pctype::IPV4_TCP;
                pct_alt = Some(pctype::IPV4_TCP_SYN_NO_ACK);
                Some(l4_valid || csum_ok(&[l4.data], pseudo(IPPROTO_TCP)))
            }
            (IPPROTO_UDP, _) if l4.data.len() >= 8 => {
                info.ptype = if v6 { ptype::IPV6_UDP } else { ptype::IPV4_UDP };
                ports = l4.data.get(..4);
                pct = pctype::IPV4_UDP;
                let multicast = frame.first().is_some_and(|b| b & 1 != 0);
                pct_alt = Some(if multicast {
                    pctype::IPV4_UDP_MULTICAST
                } else {
                    pctype::IPV4_UDP_UNICAST
                });
                let no_csum = !v6 && l4.data[6..8] == [0, 0];
                Some(l4_valid || no_csum || csum_ok(&[l4.data], pseudo(IPPROTO_UDP)))
            }
            (IPPROTO_ICMP, false) if l4.data.len() >= 4 => {
                info.ptype = ptype::IPV4_ICMP;
                Some(l4_valid || csum_ok(&[l4.data], 0))
            }
            (IPPROTO_ICMPV6, true) if l4.data.len() >= 4 => {
                info.ptype = ptype::IPV6_ICMP;
                Some(l4_valid || csum_ok(&[l4.data], pseudo(IPPROTO_ICMPV6)))
            }
            (IPPROTO_SCTP, _) if l4.data.len() >= 12 => {
                info.ptype = if v6 {
                    ptype::IPV6_SCTP
                } else {
                    ptype::IPV4_SCTP
                };
                ports = l4.data.get(..4);
                pct = pctype::IPV4_SCTP;
                None
            }
            _ => None,
        };
        if let Some(l4_ok) = checked {
            info.flags |= rx_status::L3L4P;
            if !l4_ok {
                info.flags |= rx_error::L4E;
            }
        }
    }
    if !ip_ok {
        info.flags |= rx_status::L3L4P | rx_error::IPE;
    }
    // RSS: the packet's own PCTYPE with ports, else IP "other" without them.
    let shift = if v6 { pctype::IPV6_DELTA } else { 0 };
    let on = |bit: u32| policy.rss.hena >> (bit + shift) & 1 != 0;
    let with_ports = ports.is_some() && (on(pct) || pct_alt.is_some_and(on));
    let input_ports = if with_ports { ports } else { None };
    if with_ports || on(pct) || on(pctype::IPV4_OTHER) {
        let mut input = [0u8; 36];
        let a = l3.addrs();
        input[..a.len()].copy_from_slice(a);
        let mut n = a.len();
        if let Some(p) = input_ports {
            input[n..n + 4].copy_from_slice(p);
            n += 4;
        }
        info.hash = Some(toeplitz(&policy.rss.key, &input[..n]));
        info.flags |= rx_status::FLTSTAT_RSS;
    }
    info
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use emudev_netback::hdr::fold;

    /// Microsoft's RSS verification key.
    pub(crate) const MS_KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];

    #[test]
    fn toeplitz_matches_the_published_vectors() {
        // src 66.9.149.187:2794 -> dst 161.142.100.80:1766
        let ip = [66, 9, 149, 187, 161, 142, 100, 80];
        assert_eq!(toeplitz(&MS_KEY, &ip), 0x323e_8fc2);
        let mut l4 = ip.to_vec();
        l4.extend_from_slice(&2794u16.to_be_bytes());
        l4.extend_from_slice(&1766u16.to_be_bytes());
        assert_eq!(toeplitz(&MS_KEY, &l4), 0x51cc_c178);
        // src 199.92.111.2:14230 -> dst 65.69.140.83:4739
        let ip = [199, 92, 111, 2, 65, 69, 140, 83];
        assert_eq!(toeplitz(&MS_KEY, &ip), 0xd718_262a);
        // IPv6: 3ffe:2501:200:1fff::7 -> 3ffe:2501:200:3::1, ports 2794 -> 1766
        let mut v6 = vec![0u8; 32];
        v6[..8].copy_from_slice(&[0x3f, 0xfe, 0x25, 0x01, 0x02, 0x00, 0x1f, 0xff]);
        v6[15] = 7;
        v6[16..24].copy_from_slice(&[0x3f, 0xfe, 0x25, 0x01, 0x02, 0x00, 0x00, 0x03]);
        v6[31] = 1;
        assert_eq!(toeplitz(&MS_KEY, &v6), 0x2cc1_8cd5);
        v6.extend_from_slice(&2794u16.to_be_bytes());
        v6.extend_from_slice(&1766u16.to_be_bytes());
        assert_eq!(toeplitz(&MS_KEY, &v6), 0x4020_7d3d);
    }

    fn csum(data: &[u8], extra: u64) -> u16 {
        !fold64(u64::from(ones_sum(data)) + extra)
    }

    /// An Ethernet + IPv4 + `proto` frame with valid checksums and `payload` after an
    /// L4 header of `l4_hdr` bytes (ports 1000 -> 2000).
    pub(crate) fn ipv4(proto: u8, l4_hdr: usize, payload: &[u8], dst: [u8; 6]) -> Vec<u8> {
        let l4_len = l4_hdr + payload.len();
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x08, 0x00]);
        let tot = (20 + l4_len) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        ip.extend_from_slice(&[169, 254, 0, 1, 169, 254, 0, 2]);
        let c = csum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut l4 = vec![0u8; l4_hdr];
        if l4_hdr >= 4 && proto != IPPROTO_ICMP {
            l4[..2].copy_from_slice(&1000u16.to_be_bytes());
            l4[2..4].copy_from_slice(&2000u16.to_be_bytes());
        }
        if proto == IPPROTO_UDP {
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        if proto == IPPROTO_TCP {
            l4[12] = 0x50;
        }
        l4.extend_from_slice(payload);
        let (field, extra) = match proto {
            IPPROTO_TCP => (16, u64::from(ones_sum(&ip[12..20])) + 6 + l4_len as u64),
            IPPROTO_UDP => (6, u64::from(ones_sum(&ip[12..20])) + 17 + l4_len as u64),
            _ => (2, 0),
        };
        let c = csum(&l4, extra);
        l4[field..field + 2].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }

    const ME: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn policy() -> RxPolicy {
        RxPolicy {
            primary: ME,
            filters: vec![ME, [0x33, 0x33, 0, 0, 0, 1]],
            promisc: 0,
            vlans: None,
            strip: false,
            rss: Rss {
                key: MS_KEY.to_vec(),
                lut: (0..64).map(|i| (i % 4) as u8).collect(),
                hena: crate::virtchnl::HENA_CAPS,
            },
        }
    }

    #[test]
    fn good_checksums_are_reported_with_packet_type() {
        let p = policy();
        for (proto, hdr, want) in [
            (IPPROTO_TCP, 20, ptype::IPV4_TCP),
            (IPPROTO_UDP, 8, ptype::IPV4_UDP),
            (IPPROTO_ICMP, 8, ptype::IPV4_ICMP),
        ] {
            let f = ipv4(proto, hdr, b"hello, world!", ME);
            let i = classify(&f, false, &p);
            assert_eq!(i.ptype, want, "proto {proto}");
            assert_eq!(
                i.flags & (rx_status::L3L4P | rx_error::IPE | rx_error::L4E),
                rx_status::L3L4P,
                "proto {proto}: checked, no errors"
            );
        }
    }

    #[test]
    fn bad_checksums_set_the_error_bits() {
        let p = policy();
        let mut f = ipv4(IPPROTO_TCP, 20, b"payload", ME);
        let last = f.len() - 1;
        f[last] ^= 0x55;
        let i = classify(&f, false, &p);
        assert_eq!(i.flags & (rx_error::L4E | rx_error::IPE), rx_error::L4E);
        // The backend vouches for L4: no L4E.
        assert_eq!(classify(&f, true, &p).flags & rx_error::L4E, 0);
        // IPv4 header checksum broken.
        let mut f = ipv4(IPPROTO_UDP, 8, b"payload", ME);
        f[14 + 8] ^= 1; // TTL
        let i = classify(&f, false, &p);
        assert_ne!(i.flags & rx_error::IPE, 0);
        assert_ne!(i.flags & rx_status::L3L4P, 0);
        // UDP with no checksum (0) over IPv4 is fine.
        let mut f = ipv4(IPPROTO_UDP, 8, b"x", ME);
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        assert_eq!(classify(&f, false, &p).flags & rx_error::L4E, 0);
    }

    #[test]
    fn other_packets_leave_checksums_to_the_guest() {
        let p = policy();
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[0, 1, 2, 3, 4, 5, 0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        let i = classify(&arp, false, &p);
        assert_eq!((i.ptype, i.flags, i.hash), (ptype::L2, 0, None));
        // SCTP: typed and hashed with ports, but not checked.
        let f = ipv4(IPPROTO_SCTP, 12, b"data", ME);
        let i = classify(&f, false, &p);
        assert_eq!(i.ptype, ptype::IPV4_SCTP);
        assert_eq!(i.flags & rx_status::L3L4P, 0);
        // A fragment: no L4 parsing.
        let mut f = ipv4(IPPROTO_UDP, 8, b"frag", ME);
        f[14 + 6] = 0x20; // MF
        f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = csum(&f[14..34], 0);
        f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        let i = classify(&f, false, &p);
        assert_eq!(i.ptype, ptype::IPV4_FRAG);
        assert_eq!(i.flags & rx_status::L3L4P, 0);
        // IP total length beyond the frame: treated as non-IP, never indexed past the end.
        let mut f = ipv4(IPPROTO_TCP, 20, b"", ME);
        f[14 + 2..14 + 4].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(classify(&f, false, &p).ptype, ptype::L2);
        assert_eq!(classify(&f[..13], false, &p).ptype, ptype::UNKNOWN);
    }

    #[test]
    fn ipv6_tcp_is_typed_checked_and_hashed() {
        let p = policy();
        let payload = b"six";
        let l4_len = 20 + payload.len();
        let mut f = ME.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x86, 0xdd]);
        let mut ip = vec![0x60, 0, 0, 0, 0, 0, IPPROTO_TCP, 64];
        ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        let mut src = [0u8; 16];
        src[..2].copy_from_slice(&[0xfe, 0x80]);
        src[15] = 1;
        let mut dst = src;
        dst[15] = 2;
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let mut tcp = vec![0u8; 20];
        tcp[..2].copy_from_slice(&1000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&2000u16.to_be_bytes());
        tcp[12] = 0x50;
        tcp.extend_from_slice(payload);
        let c = csum(&tcp, u64::from(ones_sum(&ip[8..40])) + 6 + l4_len as u64);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&tcp);
        let i = classify(&f, false, &p);
        assert_eq!(i.ptype, ptype::IPV6_TCP);
        assert_eq!(
            i.flags & (rx_status::L3L4P | rx_error::L4E),
            rx_status::L3L4P
        );
        let mut input = ip[8..40].to_vec();
        input.extend_from_slice(&tcp[..4]);
        assert_eq!(i.hash, Some(toeplitz(&MS_KEY, &input)));
        assert_eq!(i.flags & rx_status::FLTSTAT_RSS, rx_status::FLTSTAT_RSS);
    }

    #[test]
    fn rss_follows_hena_and_the_lut() {
        let mut p = policy();
        let f = ipv4(IPPROTO_TCP, 20, b"flow", ME);
        let mut input = vec![169, 254, 0, 1, 169, 254, 0, 2];
        let four_tuple = {
            let mut v = input.clone();
            v.extend_from_slice(&[0x03, 0xe8, 0x07, 0xd0]);
            toeplitz(&MS_KEY, &v)
        };
        assert_eq!(classify(&f, false, &p).hash, Some(four_tuple));
        assert_eq!(p.queue_for(four_tuple), Some((four_tuple % 64 % 4) as u16));
        // TCP not enabled but IPv4-other is: the address-only hash.
        p.rss.hena = 1 << pctype::IPV4_OTHER;
        input.truncate(8);
        assert_eq!(
            classify(&f, false, &p).hash,
            Some(toeplitz(&MS_KEY, &input))
        );
        // Nothing enabled: no hash, no FLTSTAT.
        p.rss.hena = 0;
        let i = classify(&f, false, &p);
        assert_eq!(i.hash, None);
        assert_eq!(i.flags & rx_status::FLTSTAT_RSS, 0);
        p.rss.lut.clear();
        assert_eq!(p.queue_for(7), None);
    }

    #[test]
    fn mac_filter_follows_list_and_promiscuous_flags() {
        let mut p = policy();
        let frame = |dst: [u8; 6]| {
            let mut f = dst.to_vec();
            f.extend_from_slice(&[0; 8]);
            f
        };
        let other = [0x52, 0x54, 0, 9, 9, 9];
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 0xfb];
        assert!(p.accepts(&frame([0xff; 6])), "broadcast");
        assert!(p.accepts(&frame(ME)), "own unicast");
        assert!(
            p.accepts(&frame([0x33, 0x33, 0, 0, 0, 1])),
            "listed multicast"
        );
        assert!(!p.accepts(&frame(other)), "foreign unicast");
        assert!(!p.accepts(&frame(mcast)), "unlisted multicast");
        assert!(!p.accepts(&[0xff; 5]), "runt");
        p.promisc = PROMISC_MULTICAST;
        assert!(p.accepts(&frame(mcast)), "allmulti");
        assert!(!p.accepts(&frame(other)), "allmulti is not unicast promisc");
        p.promisc = PROMISC_UNICAST;
        assert!(
            p.accepts(&frame(other)) && p.accepts(&frame(mcast)),
            "promisc"
        );
        // Primary removed (DEL_ETH_ADDR at ifdown) and not listed: refused.
        p.promisc = 0;
        p.primary = [0; 6];
        p.filters.clear();
        assert!(!p.accepts(&frame(ME)));
        assert!(
            !p.accepts(&frame([0; 6])),
            "all-zero primary matches nothing"
        );
    }

    #[test]
    fn vlan_filter_and_strip() {
        let mut p = policy();
        let tagged = |vid: u16| {
            let mut f = ME.to_vec();
            f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x81, 0x00]);
            f.extend_from_slice(&(0x2000 | vid).to_be_bytes());
            f.extend_from_slice(&[0x08, 0x06]);
            f.extend_from_slice(&[0; 28]);
            f
        };
        assert!(
            p.accepts(&tagged(100)),
            "no VLAN capability: no VLAN filtering"
        );
        p.vlans = Some(vec![100]);
        assert!(p.accepts(&tagged(100)));
        assert!(!p.accepts(&tagged(101)), "unlisted VLAN id");
        assert!(p.accepts(&tagged(0)), "priority tag");
        let mut untagged = ME.to_vec();
        untagged.extend_from_slice(&[0; 8]);
        assert!(p.accepts(&untagged));
        p.promisc = PROMISC_UNICAST;
        assert!(p.accepts(&tagged(101)), "promiscuous takes every VLAN");
        let mut out = Vec::new();
        let f = tagged(100);
        assert_eq!(strip_vlan(&f, &mut out), Some(0x2064));
        assert_eq!(out.len(), f.len() - 4);
        assert_eq!(&out[..12], &f[..12]);
        assert_eq!(&out[12..], &f[16..]);
        assert_eq!(strip_vlan(&untagged, &mut out), None);
    }

    #[test]
    fn fold_helper_agrees_with_netback() {
        assert_eq!(fold64(0x1_fffe), fold(0x1_fffe));
    }
}
