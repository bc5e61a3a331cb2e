//! virtchnl wire format (avf-device.md §4): opcodes, status codes, capability bits and the
//! message layouts, as little-endian unaligned zerocopy structs.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// virtchnl opcodes (`cookie_high` of an admin-queue descriptor).
pub mod op {
    pub const VERSION: u32 = 1;
    pub const RESET_VF: u32 = 2;
    pub const GET_VF_RESOURCES: u32 = 3;
    pub const CONFIG_TX_QUEUE: u32 = 4;
    pub const CONFIG_RX_QUEUE: u32 = 5;
    pub const CONFIG_VSI_QUEUES: u32 = 6;
    pub const CONFIG_IRQ_MAP: u32 = 7;
    pub const ENABLE_QUEUES: u32 = 8;
    pub const DISABLE_QUEUES: u32 = 9;
    pub const ADD_ETH_ADDR: u32 = 10;
    pub const DEL_ETH_ADDR: u32 = 11;
    pub const ADD_VLAN: u32 = 12;
    pub const DEL_VLAN: u32 = 13;
    pub const CONFIG_PROMISCUOUS_MODE: u32 = 14;
    pub const GET_STATS: u32 = 15;
    pub const EVENT: u32 = 17;
    pub const CONFIG_RSS_HFUNC: u32 = 18;
    pub const CONFIG_RSS_KEY: u32 = 23;
    pub const CONFIG_RSS_LUT: u32 = 24;
    pub const GET_RSS_HENA_CAPS: u32 = 25;
    pub const SET_RSS_HENA: u32 = 26;
    pub const ENABLE_VLAN_STRIPPING: u32 = 27;
    pub const DISABLE_VLAN_STRIPPING: u32 = 28;
    pub const REQUEST_QUEUES: u32 = 29;
}

/// virtchnl status codes (`cookie_low` of a PF→VF descriptor), as s32.
pub mod status {
    pub const SUCCESS: i32 = 0;
    pub const ERR_PARAM: i32 = -5;
    pub const ERR_NO_MEMORY: i32 = -18;
    pub const ERR_ADMIN_QUEUE_ERROR: i32 = -53;
    pub const ERR_NOT_SUPPORTED: i32 = -64;
}

/// `vf_cap_flags` bits (§4.2).
pub mod cap {
    pub const L2: u32 = 1 << 0;
    pub const RSS_AQ: u32 = 1 << 3;
    pub const RSS_REG: u32 = 1 << 4;
    pub const WB_ON_ITR: u32 = 1 << 5;
    pub const REQ_QUEUES: u32 = 1 << 6;
    pub const ADV_LINK_SPEED: u32 = 1 << 7;
    pub const VLAN: u32 = 1 << 16;
    pub const RSS_PF: u32 = 1 << 19;
    /// What this device implements; grants are `requested & IMPLEMENTED`.
    pub const IMPLEMENTED: u32 = L2 | WB_ON_ITR | ADV_LINK_SPEED | VLAN | RSS_PF;
}

/// PF event codes (`virtchnl_pf_event.event`).
pub mod event {
    pub const LINK_CHANGE: u32 = 1;
    pub const RESET_IMPENDING: u32 = 2;
    pub const SEVERITY_INFO: u32 = 0;
    pub const SEVERITY_CERTAIN_DOOM: u32 = 255;
}

/// `VIRTCHNL_VSI_SRIOV`: the only VSI type the VF accepts.
pub const VSI_TYPE_SRIOV: u32 = 6;
/// RSS key size we advertise (bytes).
pub const RSS_KEY_SIZE: u16 = 52;
/// RSS LUT size we advertise (entries).
pub const RSS_LUT_SIZE: u16 = 64;
/// PCTYPE bits we can hash on (the "expanded" set without L2 payload, as ice).
pub const HENA_CAPS: u64 = 0x0000_7F9F_E000_0000;
/// Legacy link speed enum value for 10 Gb/s.
pub const LINK_SPEED_10GB_LEGACY: u32 = 0x8;

/// `virtchnl_version_info`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VersionInfo {
    pub major: U32,
    pub minor: U32,
}

/// `virtchnl_vf_resource` header (20 bytes); `num_vsis` VSI entries follow.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VfResource {
    pub num_vsis: U16,
    pub num_queue_pairs: U16,
    pub max_vectors: U16,
    pub max_mtu: U16,
    pub vf_cap_flags: U32,
    pub rss_key_size: U32,
    pub rss_lut_size: U32,
}

/// `virtchnl_vsi_resource` (16 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VsiResource {
    pub vsi_id: U16,
    pub num_queue_pairs: U16,
    pub vsi_type: U32,
    pub qset_handle: U16,
    pub default_mac_addr: [u8; 6],
}

/// `virtchnl_vsi_queue_config_info` header (8 bytes); 64-byte queue pairs follow.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VsiQueueConfigHdr {
    pub vsi_id: U16,
    pub num_queue_pairs: U16,
    pub pad: U32,
}

/// `virtchnl_txq_info` (24 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TxqInfo {
    pub vsi_id: U16,
    pub queue_id: U16,
    pub ring_len: U16,
    pub headwb_enabled: U16,
    pub dma_ring_addr: U64,
    pub dma_headwb_addr: U64,
}

/// `virtchnl_rxq_info` (40 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RxqInfo {
    pub vsi_id: U16,
    pub queue_id: U16,
    pub ring_len: U32,
    pub hdr_size: U16,
    pub splithdr_enabled: U16,
    pub databuffer_size: U32,
    pub max_pkt_size: U32,
    pub crc_disable: u8,
    pub rxdid: u8,
    pub pad: [u8; 2],
    pub dma_ring_addr: U64,
    pub rx_split_pos: U32,
    pub pad2: U32,
}

/// `virtchnl_queue_pair_info` (64 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct QueuePairInfo {
    pub txq: TxqInfo,
    pub rxq: RxqInfo,
}

/// `virtchnl_vector_map` (12 bytes); follows a u16 `num_vectors` in CONFIG_IRQ_MAP.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VectorMap {
    pub vsi_id: U16,
    pub vector_id: U16,
    pub rxq_map: U16,
    pub txq_map: U16,
    pub rxitr_idx: U16,
    pub txitr_idx: U16,
}

/// `virtchnl_queue_select` (12 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct QueueSelect {
    pub vsi_id: U16,
    pub pad: U16,
    pub rx_queues: U32,
    pub tx_queues: U32,
}

/// `virtchnl_ether_addr_list` header (4 bytes); 8-byte entries follow.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EtherAddrListHdr {
    pub vsi_id: U16,
    pub num_elements: U16,
}

/// `virtchnl_ether_addr` (8 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EtherAddr {
    pub addr: [u8; 6],
    pub kind: u8,
    pub pad: u8,
}

/// `EtherAddr::kind` values (low 2 bits).
pub const ETH_ADDR_PRIMARY: u8 = 1;

/// `virtchnl_vlan_filter_list` header (4 bytes); u16 VLAN ids follow.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VlanFilterListHdr {
    pub vsi_id: U16,
    pub num_elements: U16,
}

/// `virtchnl_promisc_info` (4 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PromiscInfo {
    pub vsi_id: U16,
    pub flags: U16,
}

/// Promiscuous flags.
pub const PROMISC_UNICAST: u16 = 1 << 0;
pub const PROMISC_MULTICAST: u16 = 1 << 1;

/// `virtchnl_eth_stats` (96 bytes).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct EthStats {
    pub rx_bytes: U64,
    pub rx_unicast: U64,
    pub rx_multicast: U64,
    pub rx_broadcast: U64,
    pub rx_discards: U64,
    pub rx_unknown_protocol: U64,
    pub tx_bytes: U64,
    pub tx_unicast: U64,
    pub tx_multicast: U64,
    pub tx_broadcast: U64,
    pub tx_discards: U64,
    pub tx_errors: U64,
}

/// `virtchnl_pf_event` (16 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PfEvent {
    pub event: U32,
    pub link_speed: U32,
    pub link_status: u8,
    pub pad: [u8; 3],
    pub severity: U32,
}

/// `virtchnl_rss_key` / `virtchnl_rss_lut` header (4 bytes); the bytes follow.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RssArrayHdr {
    pub vsi_id: U16,
    pub len: U16,
}

/// `virtchnl_rss_hfunc` (8 bytes).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RssHfunc {
    pub vsi_id: U16,
    pub rss_algorithm: U16,
    pub reserved: U32,
}

/// Parse the `T` at the start of `msg`; `None` if `msg` is too short.
pub fn header<T: FromBytes + KnownLayout + Immutable>(msg: &[u8]) -> Option<(T, &[u8])> {
    T::read_from_prefix(msg).ok()
}

/// Parse `count` elements of `T` from `rest`, ignoring trailing bytes (legacy padding,
/// Appendix A); `None` if `rest` is too short.
pub fn elements<T: FromBytes + KnownLayout + Immutable + Copy>(
    rest: &[u8],
    count: usize,
) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    let need = size.checked_mul(count)?;
    let body = rest.get(..need)?;
    body.chunks_exact(size)
        .map(|c| T::read_from_bytes(c).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_wire() {
        assert_eq!(std::mem::size_of::<VersionInfo>(), 8);
        assert_eq!(std::mem::size_of::<VfResource>(), 20);
        assert_eq!(std::mem::size_of::<VsiResource>(), 16);
        assert_eq!(std::mem::size_of::<VsiQueueConfigHdr>(), 8);
        assert_eq!(std::mem::size_of::<TxqInfo>(), 24);
        assert_eq!(std::mem::size_of::<RxqInfo>(), 40);
        assert_eq!(std::mem::size_of::<QueuePairInfo>(), 64);
        assert_eq!(std::mem::size_of::<VectorMap>(), 12);
        assert_eq!(std::mem::size_of::<QueueSelect>(), 12);
        assert_eq!(std::mem::size_of::<EtherAddr>(), 8);
        assert_eq!(std::mem::size_of::<EthStats>(), 96);
        assert_eq!(std::mem::size_of::<PfEvent>(), 16);
        assert_eq!(std::mem::size_of::<RssHfunc>(), 8);
    }

    #[test]
    fn elements_checks_length_and_ignores_padding() {
        let mut b = vec![0u8; 12 * 2 + 5];
        b[2] = 7;
        let v: Vec<VectorMap> = elements(&b, 2).unwrap_or_default();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].vector_id.get(), 7);
        assert!(elements::<VectorMap>(&b, 3).is_none());
        assert!(elements::<VectorMap>(&b, usize::MAX).is_none());
    }
}
