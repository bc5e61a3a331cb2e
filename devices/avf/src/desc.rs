//! Datapath descriptor formats (avf-device.md §5.2–5.7) as pure decode/encode functions,
//! and the mapping of TX offload requests onto the netback `virtio_net_hdr_v1`.
//!
//! Not yet wired to rings: the next step is a poller that walks `[head, tail)` of each
//! enabled queue with these.

use emudev_netback::hdr::{gso, F_NEEDS_CSUM};
use emudev_netback::VirtioNetHdr;

/// TX descriptor size in bytes.
pub const TX_DESC_LEN: usize = 16;
/// RX descriptor size in bytes (32-byte legacy format).
pub const RX_DESC_LEN: usize = 32;
/// qword1 the device writes back on an RS descriptor (DTYPE = DESC_DONE).
pub const TX_DESC_DONE: u64 = 0xF;

/// TX DTYPE values.
pub const DTYPE_DATA: u8 = 0x0;
pub const DTYPE_CONTEXT: u8 = 0x1;

/// TX data CMD bits (relative to bit 4 of qword1).
pub mod tx_cmd {
    pub const EOP: u16 = 0x001;
    pub const RS: u16 = 0x002;
    pub const ICRC: u16 = 0x004;
    pub const IL2TAG1: u16 = 0x008;
    pub const DUMMY: u16 = 0x010;
    pub const IIPT_MASK: u16 = 0x060;
    pub const IIPT_IPV6: u16 = 0x020;
    pub const IIPT_IPV4: u16 = 0x040;
    pub const IIPT_IPV4_CSUM: u16 = 0x060;
    pub const L4T_MASK: u16 = 0x300;
    pub const L4T_TCP: u16 = 0x100;
    pub const L4T_SCTP: u16 = 0x200;
    pub const L4T_UDP: u16 = 0x300;
}

/// TX context CMD bits (relative to bit 4 of qword1).
pub const CTX_CMD_TSO: u16 = 0x01;

/// A decoded TX data descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxData {
    pub addr: u64,
    /// Buffer size in bytes (14 bits).
    pub len: u16,
    pub cmd: u16,
    /// MAC header length in bytes.
    pub maclen: u16,
    /// IP header length in bytes.
    pub iplen: u16,
    /// L4 header length in bytes.
    pub l4len: u16,
    pub l2tag1: u16,
}

impl TxData {
    pub fn eop(&self) -> bool {
        self.cmd & tx_cmd::EOP != 0
    }
    pub fn rs(&self) -> bool {
        self.cmd & tx_cmd::RS != 0
    }
}

/// A decoded TX context descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxContext {
    pub cmd: u16,
    /// Payload bytes of a TSO packet (18 bits).
    pub tso_len: u32,
    /// Segment payload size (14 bits).
    pub mss: u16,
}

impl TxContext {
    pub fn tso(&self) -> bool {
        self.cmd & CTX_CMD_TSO != 0
    }
}

/// One TX descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDesc {
    Data(TxData),
    Context(TxContext),
    /// Any other DTYPE (skipped).
    Other(u8),
}

fn bits(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1u64 << width) - 1)
}

/// Decode a 16-byte TX descriptor.
pub fn decode_tx(raw: &[u8; TX_DESC_LEN]) -> TxDesc {
    let mut q0 = [0u8; 8];
    let mut q1 = [0u8; 8];
    q0.copy_from_slice(&raw[..8]);
    q1.copy_from_slice(&raw[8..]);
    let (qw0, qw1) = (u64::from_le_bytes(q0), u64::from_le_bytes(q1));
    match bits(qw1, 0, 4) as u8 {
        DTYPE_DATA => TxDesc::Data(TxData {
            addr: qw0,
            cmd: bits(qw1, 4, 10) as u16,
            maclen: bits(qw1, 16, 7) as u16 * 2,
            iplen: bits(qw1, 23, 7) as u16 * 4,
            l4len: bits(qw1, 30, 4) as u16 * 4,
            len: bits(qw1, 34, 14) as u16,
            l2tag1: bits(qw1, 48, 16) as u16,
        }),
        DTYPE_CONTEXT => TxDesc::Context(TxContext {
            cmd: bits(qw1, 4, 16) as u16,
            tso_len: bits(qw1, 30, 18) as u32,
            mss: bits(qw1, 50, 14) as u16,
        }),
        other => TxDesc::Other(other),
    }
}

/// Why a packet's offload request cannot be expressed for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("TSO requested without L4T = TCP (cmd {0:#x})")]
    TsoNotTcp(u16),
    #[error("TSO requested without an IP type (cmd {0:#x})")]
    TsoNotIp(u16),
    #[error("TSO with MSS 0")]
    ZeroMss,
    #[error("SCTP CRC32c insertion is not implemented")]
    Sctp,
    #[error("header offsets {0} beyond the packet length {1}")]
    Offsets(usize, usize),
}

/// The vnet header that asks the backend for the offloads of a packet whose first data
/// descriptor is `first` (Linux repeats the offsets on every descriptor) and whose context
/// descriptor, if any, is `ctx`. `pkt_len` is the frame length (for offset checks).
pub fn offload_header(
    first: &TxData,
    ctx: Option<&TxContext>,
    pkt_len: usize,
) -> Result<VirtioNetHdr, OffloadError> {
    let mut h = VirtioNetHdr::default();
    let l4_start = usize::from(first.maclen) + usize::from(first.iplen);
    let l4t = first.cmd & tx_cmd::L4T_MASK;
    let iipt = first.cmd & tx_cmd::IIPT_MASK;
    let csum_offset = match l4t {
        tx_cmd::L4T_TCP => Some(16u16),
        tx_cmd::L4T_UDP => Some(6),
        tx_cmd::L4T_SCTP => return Err(OffloadError::Sctp),
        _ => None,
    };
    if let Some(off) = csum_offset {
        let end = l4_start + usize::from(off) + 2;
        if end > pkt_len {
            return Err(OffloadError::Offsets(end, pkt_len));
        }
        h.flags = F_NEEDS_CSUM;
        h.csum_start = (l4_start as u16).into();
        h.csum_offset = off.into();
    }
    if let Some(c) = ctx.filter(|c| c.tso()) {
        if l4t != tx_cmd::L4T_TCP {
            return Err(OffloadError::TsoNotTcp(first.cmd));
        }
        h.gso_type = match iipt {
            tx_cmd::IIPT_IPV6 => gso::TCPV6,
            tx_cmd::IIPT_IPV4 | tx_cmd::IIPT_IPV4_CSUM => gso::TCPV4,
            _ => return Err(OffloadError::TsoNotIp(first.cmd)),
        };
        if c.mss == 0 {
            return Err(OffloadError::ZeroMss);
        }
        let hdr_len = l4_start + usize::from(first.l4len);
        if hdr_len > pkt_len {
            return Err(OffloadError::Offsets(hdr_len, pkt_len));
        }
        h.gso_size = c.mss.into();
        h.hdr_len = (hdr_len as u16).into();
    }
    Ok(h)
}

/// Turn the driver's TSO template into what a vnet-header GSO consumer (the kernel's
/// `virtio_net_hdr_to_skb` + GSO, our software segmenter) expects: IPv4 `tot_len` and header
/// checksum, or IPv6 `payload_len`, for the whole super-frame, and the TCP checksum field
/// seeded with the pseudo-header sum *including* the TCP length (iavf seeds it without).
/// `frame` is the Ethernet frame without vnet header.
pub fn fix_tso_template(frame: &mut [u8], first: &TxData) -> Result<(), OffloadError> {
    use emudev_netback::hdr::{fold, ones_sum};
    let l3 = usize::from(first.maclen);
    let l4 = l3 + usize::from(first.iplen);
    let len = frame.len();
    if l4 + 20 > len {
        return Err(OffloadError::Offsets(l4 + 20, len));
    }
    let tcp_len = len - l4;
    let pseudo = match first.cmd & tx_cmd::IIPT_MASK {
        tx_cmd::IIPT_IPV6 => {
            if first.iplen < 40 {
                return Err(OffloadError::Offsets(l4, len));
            }
            let pl = u16::try_from(len - l3 - 40).map_err(|_| OffloadError::Offsets(len, 0))?;
            frame[l3 + 4..l3 + 6].copy_from_slice(&pl.to_be_bytes());
            ones_sum(&frame[l3 + 8..l3 + 40]) + (tcp_len as u32) + 6
        }
        _ => {
            if first.iplen < 20 {
                return Err(OffloadError::Offsets(l4, len));
            }
            let tot = u16::try_from(len - l3).map_err(|_| OffloadError::Offsets(len, 0))?;
            frame[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
            frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let csum = !fold(ones_sum(&frame[l3..l4]));
            frame[l3 + 10..l3 + 12].copy_from_slice(&csum.to_be_bytes());
            ones_sum(&frame[l3 + 12..l3 + 20]) + (tcp_len as u32) + 6
        }
    };
    frame[l4 + 16..l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
    Ok(())
}

/// RX write-back status bits (qword1 bits 18:0).
pub mod rx_status {
    pub const DD: u64 = 1 << 0;
    pub const EOF: u64 = 1 << 1;
    /// The stripped VLAN tag is in qword0[31:16].
    pub const L2TAG1P: u64 = 1 << 2;
    pub const L3L4P: u64 = 1 << 3;
    /// FLTSTAT = 3: RSS hash valid in qword0[63:32].
    pub const FLTSTAT_RSS: u64 = 3 << 12;
}

/// RX write-back error bits (qword1 bits 26:19).
pub mod rx_error {
    pub const RXE: u64 = 1 << 19;
    pub const IPE: u64 = 1 << 22;
    pub const L4E: u64 = 1 << 23;
}

/// An RX write-back for one descriptor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxWriteback {
    /// Bytes written to this descriptor's buffer (14 bits).
    pub len: u16,
    /// Last descriptor of the frame.
    pub eof: bool,
    /// Packet type (only meaningful on EOF).
    pub ptype: u8,
    /// Extra status bits (L3L4P, FLTSTAT) and error bits, already shifted.
    pub flags: u64,
    /// RSS hash (qword0[63:32]) when FLTSTAT_RSS is set.
    pub hash: u32,
    /// The VLAN TCI stripped from the frame (qword0[31:16], status L2TAG1P).
    pub l2tag1: Option<u16>,
}

impl RxWriteback {
    /// The four qwords; write 0, 2 and 3 first, then qword1 (DD) after a release fence.
    pub fn encode(&self) -> [u64; 4] {
        let mut q1 = rx_status::DD | (u64::from(self.len & 0x3FFF) << 38);
        if self.eof {
            q1 |= rx_status::EOF | (u64::from(self.ptype) << 30) | self.flags;
        }
        let mut q0 = if self.eof && self.flags & rx_status::FLTSTAT_RSS == rx_status::FLTSTAT_RSS {
            u64::from(self.hash) << 32
        } else {
            0
        };
        if let (true, Some(tag)) = (self.eof, self.l2tag1) {
            q0 |= u64::from(tag) << 16;
            q1 |= rx_status::L2TAG1P;
        }
        [q0, q1, 0, 0]
    }
}

/// Descriptors owned by the device on a ring: `[head, tail)` modulo `len`. `None` when an
/// index is out of range.
pub fn owned(head: u16, tail: u16, len: u16) -> Option<u16> {
    if len == 0 || head >= len || tail >= len {
        return None;
    }
    Some(if tail >= head {
        tail - head
    } else {
        len - head + tail
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(qw0: u64, qw1: u64) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&qw0.to_le_bytes());
        r[8..].copy_from_slice(&qw1.to_le_bytes());
        r
    }

    /// qword1 of a data descriptor as the Linux driver builds it.
    fn data_qw1(cmd: u16, maclen: u64, iplen: u64, l4len: u64, size: u64, tag: u64) -> u64 {
        let off = (maclen / 2) | ((iplen / 4) << 7) | ((l4len / 4) << 14);
        (u64::from(cmd) << 4) | (off << 16) | (size << 34) | (tag << 48)
    }

    #[test]
    fn decodes_data_descriptor_fields() {
        let cmd = tx_cmd::EOP | tx_cmd::RS | tx_cmd::ICRC | tx_cmd::IIPT_IPV4 | tx_cmd::L4T_TCP;
        let d = decode_tx(&raw(0x1234_5000, data_qw1(cmd, 14, 20, 20, 1514, 0x0abc)));
        let TxDesc::Data(d) = d else {
            panic!("not data: {d:?}")
        };
        assert_eq!(d.addr, 0x1234_5000);
        assert_eq!((d.maclen, d.iplen, d.l4len, d.len), (14, 20, 20, 1514));
        assert_eq!(d.l2tag1, 0x0abc);
        assert!(d.eop() && d.rs());
        assert_eq!(d.cmd & tx_cmd::L4T_MASK, tx_cmd::L4T_TCP);
        // Largest buffer size is 14 bits.
        let TxDesc::Data(d) = decode_tx(&raw(0, data_qw1(0, 0, 0, 0, 16383, 0))) else {
            panic!("not data")
        };
        assert_eq!(d.len, 16383);
    }

    #[test]
    fn decodes_context_and_other() {
        let qw1 = 1 | (u64::from(CTX_CMD_TSO) << 4) | (62_000u64 << 30) | (1448u64 << 50);
        assert_eq!(
            decode_tx(&raw(0, qw1)),
            TxDesc::Context(TxContext {
                cmd: CTX_CMD_TSO,
                tso_len: 62_000,
                mss: 1448
            })
        );
        assert_eq!(decode_tx(&raw(0, TX_DESC_DONE)), TxDesc::Other(0xF));
    }

    fn data(cmd: u16) -> TxData {
        TxData {
            addr: 0,
            len: 0,
            cmd,
            maclen: 14,
            iplen: 20,
            l4len: 20,
            l2tag1: 0,
        }
    }

    #[test]
    fn checksum_and_tso_map_to_vnet_header() {
        let h = offload_header(&data(tx_cmd::IIPT_IPV4 | tx_cmd::L4T_UDP), None, 100)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!((h.csum_start.get(), h.csum_offset.get()), (34, 6));
        assert_eq!(h.gso_type, gso::NONE);
        let ctx = TxContext {
            cmd: CTX_CMD_TSO,
            tso_len: 60_000,
            mss: 1448,
        };
        let h = offload_header(
            &data(tx_cmd::IIPT_IPV4_CSUM | tx_cmd::L4T_TCP),
            Some(&ctx),
            60_054,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (h.gso_type, h.gso_size.get(), h.hdr_len.get()),
            (gso::TCPV4, 1448, 54)
        );
        assert_eq!(h.csum_offset.get(), 16);
        let h6 = offload_header(
            &data(tx_cmd::IIPT_IPV6 | tx_cmd::L4T_TCP),
            Some(&ctx),
            60_074,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h6.gso_type, gso::TCPV6);
        // No offload requested: a plain header.
        let h =
            offload_header(&data(tx_cmd::IIPT_IPV4), None, 60).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h, VirtioNetHdr::default());
    }

    #[test]
    fn bad_offload_requests_are_refused() {
        let ctx = TxContext {
            cmd: CTX_CMD_TSO,
            tso_len: 1,
            mss: 0,
        };
        let tcp4 = data(tx_cmd::IIPT_IPV4 | tx_cmd::L4T_TCP);
        assert_eq!(
            offload_header(&tcp4, Some(&ctx), 100),
            Err(OffloadError::ZeroMss)
        );
        let ctx = TxContext { mss: 100, ..ctx };
        assert!(matches!(
            offload_header(&data(tx_cmd::IIPT_IPV4 | tx_cmd::L4T_UDP), Some(&ctx), 100),
            Err(OffloadError::TsoNotTcp(_))
        ));
        assert!(matches!(
            offload_header(&data(tx_cmd::L4T_TCP), Some(&ctx), 100),
            Err(OffloadError::TsoNotIp(_))
        ));
        assert_eq!(
            offload_header(&data(tx_cmd::L4T_SCTP), None, 100),
            Err(OffloadError::Sctp)
        );
        // Checksum field beyond the frame.
        assert_eq!(
            offload_header(&tcp4, None, 40),
            Err(OffloadError::Offsets(52, 40))
        );
    }

    #[test]
    fn tso_template_gets_lengths_and_seeded_checksum() {
        use emudev_netback::hdr::{fold, ones_sum};
        // Ethernet + IPv4 (tot_len 0, csum 0) + TCP, 100 payload bytes.
        let mut f = vec![0u8; 14 + 20 + 20 + 100];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&[169, 254, 0, 2]);
        f[14 + 16..14 + 20].copy_from_slice(&[169, 254, 0, 1]);
        let first = data(tx_cmd::IIPT_IPV4_CSUM | tx_cmd::L4T_TCP);
        fix_tso_template(&mut f, &first).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 140, "tot_len");
        assert_eq!(
            fold(ones_sum(&f[14..34])),
            0xffff,
            "IPv4 header checksum valid"
        );
        // Seed + sum over the TCP segment (seed field included) complemented = a valid
        // checksum once stored: verify by finishing it like a NIC would.
        let seed = u16::from_be_bytes([f[50], f[51]]);
        let want = fold(ones_sum(&f[26..34]) + 120 + 6);
        assert_eq!(seed, want);
        // Truncated frames are refused, not indexed out of bounds.
        let mut short = vec![0u8; 40];
        assert!(fix_tso_template(&mut short, &first).is_err());
        let mut v6 = vec![0u8; 14 + 40 + 20 + 10];
        let first6 = TxData {
            iplen: 40,
            ..data(tx_cmd::IIPT_IPV6 | tx_cmd::L4T_TCP)
        };
        fix_tso_template(&mut v6, &first6).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u16::from_be_bytes([v6[18], v6[19]]), 30, "payload_len");
    }

    #[test]
    fn rx_writeback_bits() {
        let wb = RxWriteback {
            len: 1514,
            eof: true,
            ptype: 26,
            flags: rx_status::L3L4P | rx_status::FLTSTAT_RSS,
            hash: 0xdead_beef,
            l2tag1: Some(0x2064),
        };
        let q = wb.encode();
        assert_eq!(q[1] & 1, 1, "DD");
        assert_eq!(q[1] >> 1 & 1, 1, "EOF");
        assert_eq!(q[1] >> 3 & 1, 1, "L3L4P");
        assert_eq!(q[1] >> 12 & 3, 3, "FLTSTAT");
        assert_eq!(q[1] >> 30 & 0xff, 26, "PTYPE");
        assert_eq!(q[1] >> 38 & 0x3fff, 1514, "LENGTH_PBUF");
        assert_eq!(q[0] >> 32, 0xdead_beef);
        assert_eq!((q[0] >> 16 & 0xffff, q[1] >> 2 & 1), (0x2064, 1), "L2TAG1");
        // Not the last buffer: DD and length only.
        let mid = RxWriteback {
            len: 1536,
            eof: false,
            ..wb
        }
        .encode();
        assert_eq!(mid[1], 1 | (1536u64 << 38));
        assert_eq!(mid[0], 0);
    }

    #[test]
    fn ring_ownership() {
        assert_eq!(owned(0, 511, 512), Some(511));
        assert_eq!(owned(500, 10, 512), Some(22));
        assert_eq!(owned(7, 7, 512), Some(0));
        assert_eq!(owned(0, 512, 512), None);
        assert_eq!(owned(0, 0, 0), None);
    }
}
