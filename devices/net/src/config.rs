//! virtio-net feature bits, options and the device configuration space.

use zerocopy::little_endian::U16;
use zerocopy::{Immutable, IntoBytes, KnownLayout};

/// Device feature bits (virtio 1.2 §5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const CTRL_RX: u64 = 1 << 18;
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    pub const MQ: u64 = 1 << 22;
    pub const CTRL_MAC_ADDR: u64 = 1 << 23;

    /// Every offload bit, offered when the backend carries vnet headers.
    pub const OFFLOADS: u64 =
        CSUM | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | HOST_TSO4 | HOST_TSO6 | HOST_ECN;
}

/// `status` bits.
pub const STATUS_LINK_UP: u16 = 1;
pub const STATUS_ANNOUNCE: u16 = 2;

/// Largest queue pair count we offer (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX is 0x8000; we stay far
/// below the transport's 1024 queues).
pub const MAX_QUEUE_PAIRS: u16 = 256;

/// How a virtio-net device is configured.
#[derive(Debug, Clone)]
pub struct NetOptions {
    pub mac: [u8; 6],
    /// Queue pairs offered (capped by the backend's).
    pub queue_pairs: u16,
    pub queue_size: u16,
    /// MTU advertised with VIRTIO_NET_F_MTU.
    pub mtu: Option<u16>,
    /// Offer checksum and segmentation offloads.
    pub offloads: bool,
    /// Offer VIRTIO_NET_F_MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Ring feature bits offered (INDIRECT_DESC, EVENT_IDX, ...).
    pub ring_features: u64,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            queue_size: 256,
            mtu: None,
            offloads: true,
            mrg_rxbuf: true,
            ring_features: emudev_virtio::pci::features::VIRTIO_F_RING_INDIRECT_DESC
                | emudev_virtio::pci::features::VIRTIO_F_RING_EVENT_IDX,
        }
    }
}

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (want six hex bytes separated by ':', unicast)")]
pub struct MacError(pub String);

/// Parse "52:54:00:12:34:56"; multicast addresses are refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(|| MacError(s.to_string()))?;
        if p.is_empty() || p.len() > 2 {
            return Err(MacError(s.to_string()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| MacError(s.to_string()))?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(MacError(s.to_string()));
    }
    Ok(mac)
}

/// Format a MAC as "52:54:00:12:34:56".
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `struct virtio_net_config` up to `mtu` (what we offer; speed/duplex/RSS are not).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, IntoBytes, Immutable, KnownLayout)]
pub struct NetConfigSpace {
    pub mac: [u8; 6],
    pub status: U16,
    pub max_virtqueue_pairs: U16,
    pub mtu: U16,
}

/// Bytes of the configuration space.
pub const CONFIG_LEN: usize = std::mem::size_of::<NetConfigSpace>();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_the_spec() {
        let c = NetConfigSpace {
            mac: [1, 2, 3, 4, 5, 6],
            status: U16::new(STATUS_LINK_UP),
            max_virtqueue_pairs: U16::new(4),
            mtu: U16::new(9000),
        };
        let b = c.as_bytes();
        assert_eq!(b.len(), 12);
        assert_eq!(&b[..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&b[6..8], &[1, 0]);
        assert_eq!(&b[8..10], &[4, 0]);
        assert_eq!(&b[10..12], &9000u16.to_le_bytes());
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "53:54:00:00:00:01",
            "5g:00:00:00:00:00",
            "520:54:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 1, 2, 0xff]),
            "52:54:00:01:02:ff"
        );
    }
}
