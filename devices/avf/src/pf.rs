//! The PF side of virtchnl: per-VF state and the handler of each request (avf-device.md §4).
//!
//! [`VfState::handle`] is pure state logic: it never touches guest memory except to check
//! that ring addresses lie inside DMA maps. The admin-queue engine feeds it requests and
//! delivers the [`Outcome`] (reply, events, reset).

use emudev::{Access, GuestMemory};
use zerocopy::IntoBytes;

use crate::virtchnl::{self as vc, cap, op, status};

/// The VSI id we hand out and expect in every request (ice uses 1).
pub const VSI_ID: u16 = 1;
/// Largest frame the VF may configure (`max_mtu` in GET_VF_RESOURCES).
pub const MAX_FRAME: u16 = 9728;
/// Most MAC filters a VF may hold.
pub const MAX_MAC_FILTERS: usize = 256;
/// Most VLAN filters a VF may hold.
pub const MAX_VLAN_FILTERS: usize = 256;
/// Largest VLAN id.
pub const MAX_VLAN_ID: u16 = 4095;
/// TX descriptor size.
pub const TX_DESC_SIZE: u64 = 16;
/// RX descriptor size (32-byte legacy format).
pub const RX_DESC_SIZE: u64 = 32;
/// Longest ring accepted (ice: 8160, a multiple of 32).
pub const MAX_RING_LEN: u32 = 8160;

/// Static configuration of the VF as the host sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfConfig {
    /// Default MAC reported in GET_VF_RESOURCES.
    pub mac: [u8; 6],
    /// Queue pairs advertised (1..=16).
    pub queue_pairs: u16,
    /// Link speed reported in LINK_CHANGE, in Mb/s.
    pub link_speed_mbps: u32,
}

impl Default for VfConfig {
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            queue_pairs: 1,
            link_speed_mbps: 10_000,
        }
    }
}

/// A configured TX ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRing {
    pub addr: u64,
    pub len: u16,
}

/// A configured RX ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxRing {
    pub addr: u64,
    pub len: u16,
    pub buf_size: u32,
    pub max_pkt: u32,
}

/// Per queue pair state. Tails live in the register file (they are latched at any time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuePair {
    pub tx: Option<TxRing>,
    pub rx: Option<RxRing>,
    pub tx_head: u16,
    pub rx_head: u16,
    pub tx_enabled: bool,
    pub rx_enabled: bool,
    /// MSI-X vector of RX/TX events from CONFIG_IRQ_MAP.
    pub rx_vector: Option<u16>,
    pub tx_vector: Option<u16>,
}

/// A message for the ARQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArqMsg {
    pub opcode: u32,
    pub status: i32,
    pub data: Vec<u8>,
}

/// What the engine must do after a request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Messages for the ARQ, in order (the reply first, then events).
    pub messages: Vec<ArqMsg>,
    /// Perform a VF reset (RESET_VF, or after granting REQUEST_QUEUES).
    pub reset: bool,
}

impl Outcome {
    fn reply(opcode: u32, status: i32, data: Vec<u8>) -> Self {
        Self {
            messages: vec![ArqMsg {
                opcode,
                status,
                data,
            }],
            reset: false,
        }
    }
}

/// virtchnl state of one VF.
#[derive(Debug, Clone)]
pub struct VfState {
    pub cfg: VfConfig,
    /// Queue pairs currently exposed (REQUEST_QUEUES may lower it).
    pub num_queue_pairs: u16,
    /// Negotiated version (minor of 1.x); kept across VF resets.
    pub version_minor: Option<u32>,
    /// Capabilities granted by the last GET_VF_RESOURCES.
    pub caps: u32,
    pub queues: Vec<QueuePair>,
    pub mac_filters: Vec<[u8; 6]>,
    pub primary_mac: [u8; 6],
    /// VLAN ids from ADD_VLAN (honoured only when the VLAN capability was granted).
    pub vlan_filters: Vec<u16>,
    /// Strip the outer 802.1Q tag on receive (ENABLE_VLAN_STRIPPING).
    pub vlan_strip: bool,
    pub promisc: u16,
    pub rss_key: Vec<u8>,
    pub rss_lut: Vec<u8>,
    pub rss_hena: u64,
    pub link_up: bool,
    pub stats: vc::EthStats,
}

fn status_only(opcode: u32, st: i32) -> Outcome {
    Outcome::reply(opcode, st, Vec::new())
}

fn bitmap_ok(map: u32, n: u16) -> bool {
    u64::from(map) >> n == 0
}

impl VfState {
    pub fn new(cfg: VfConfig) -> Self {
        let qp = cfg.queue_pairs.clamp(1, crate::regs::MAX_QUEUE_PAIRS);
        let cfg = VfConfig {
            queue_pairs: qp,
            ..cfg
        };
        let mut s = Self {
            cfg,
            num_queue_pairs: qp,
            version_minor: None,
            caps: 0,
            queues: Vec::new(),
            mac_filters: Vec::new(),
            primary_mac: cfg.mac,
            vlan_filters: Vec::new(),
            vlan_strip: false,
            promisc: 0,
            rss_key: Vec::new(),
            rss_lut: Vec::new(),
            rss_hena: 0,
            link_up: true,
            stats: vc::EthStats::default(),
        };
        s.reset_vf();
        s
    }

    /// MSI-X vectors advertised: one per queue pair plus the mailbox vector.
    pub fn max_vectors(&self) -> u16 {
        self.cfg.queue_pairs + 1
    }

    /// VF reset (§6.2 step 3): forget queues, IRQ map, filters, promisc and RSS; keep the
    /// version, caps, default MAC and link state.
    pub fn reset_vf(&mut self) {
        self.queues = vec![QueuePair::default(); usize::from(self.num_queue_pairs)];
        self.mac_filters.clear();
        self.primary_mac = self.cfg.mac;
        self.vlan_filters.clear();
        self.vlan_strip = false;
        self.promisc = 0;
        self.rss_key = vec![0; usize::from(vc::RSS_KEY_SIZE)];
        self.rss_lut = (0..vc::RSS_LUT_SIZE)
            .map(|i| (i % self.num_queue_pairs) as u8)
            .collect();
        self.rss_hena = vc::HENA_CAPS;
    }

    /// Device reset (§6.1): a VF reset that also forgets the negotiation and counters.
    pub fn reset_device(&mut self) {
        self.num_queue_pairs = self.cfg.queue_pairs;
        self.version_minor = None;
        self.caps = 0;
        self.stats = vc::EthStats::default();
        self.reset_vf();
    }

    /// True when any queue may do DMA.
    pub fn any_queue_enabled(&self) -> bool {
        self.queues.iter().any(|q| q.tx_enabled || q.rx_enabled)
    }

    /// The LINK_CHANGE event for the current link state, in the format the caps select.
    pub fn link_event(&self) -> ArqMsg {
        let speed = if self.caps & cap::ADV_LINK_SPEED != 0 {
            self.cfg.link_speed_mbps
        } else {
            vc::LINK_SPEED_10GB_LEGACY
        };
        let ev = vc::PfEvent {
            event: vc::event::LINK_CHANGE.into(),
            link_speed: speed.into(),
            link_status: u8::from(self.link_up),
            pad: [0; 3],
            severity: vc::event::SEVERITY_INFO.into(),
        };
        ArqMsg {
            opcode: op::EVENT,
            status: status::SUCCESS,
            data: ev.as_bytes().to_vec(),
        }
    }

    /// Handle one request. `mem` is used only to check ring addresses against DMA maps.
    pub fn handle(&mut self, opcode: u32, msg: &[u8], mem: &GuestMemory) -> Outcome {
        match opcode {
            op::VERSION => self.version(msg),
            op::RESET_VF => Outcome {
                messages: Vec::new(),
                reset: true,
            },
            op::GET_VF_RESOURCES => self.get_vf_resources(msg),
            op::CONFIG_VSI_QUEUES => status_only(opcode, self.config_vsi_queues(msg, mem)),
            op::CONFIG_IRQ_MAP => status_only(opcode, self.config_irq_map(msg)),
            op::ENABLE_QUEUES => {
                let st = self.enable_queues(msg);
                let mut out = status_only(opcode, st);
                if st == status::SUCCESS {
                    out.messages.push(self.link_event());
                }
                out
            }
            op::DISABLE_QUEUES => status_only(opcode, self.disable_queues(msg)),
            op::ADD_ETH_ADDR => status_only(opcode, self.eth_addr(msg, true)),
            op::DEL_ETH_ADDR => status_only(opcode, self.eth_addr(msg, false)),
            op::CONFIG_PROMISCUOUS_MODE => status_only(opcode, self.promisc(msg)),
            op::ADD_VLAN
            | op::DEL_VLAN
            | op::ENABLE_VLAN_STRIPPING
            | op::DISABLE_VLAN_STRIPPING
                if self.caps & cap::VLAN == 0 =>
            {
                status_only(opcode, status::ERR_NOT_SUPPORTED)
            }
            op::ADD_VLAN => status_only(opcode, self.vlan(msg, true)),
            op::DEL_VLAN => status_only(opcode, self.vlan(msg, false)),
            op::ENABLE_VLAN_STRIPPING | op::DISABLE_VLAN_STRIPPING => {
                self.vlan_strip = opcode == op::ENABLE_VLAN_STRIPPING;
                status_only(opcode, status::SUCCESS)
            }
            op::GET_STATS => self.get_stats(msg),
            op::CONFIG_RSS_KEY | op::CONFIG_RSS_LUT | op::CONFIG_RSS_HFUNC | op::SET_RSS_HENA
                if self.caps & cap::RSS_PF == 0 =>
            {
                status_only(opcode, status::ERR_NOT_SUPPORTED)
            }
            op::CONFIG_RSS_KEY => status_only(opcode, self.rss_key(msg)),
            op::CONFIG_RSS_LUT => status_only(opcode, self.rss_lut(msg)),
            op::CONFIG_RSS_HFUNC => status_only(opcode, self.rss_hfunc(msg)),
            op::GET_RSS_HENA_CAPS => {
                if self.caps & cap::RSS_PF == 0 {
                    status_only(opcode, status::ERR_NOT_SUPPORTED)
                } else {
                    Outcome::reply(
                        opcode,
                        status::SUCCESS,
                        vc::HENA_CAPS.to_le_bytes().to_vec(),
                    )
                }
            }
            op::SET_RSS_HENA => status_only(opcode, self.set_hena(msg)),
            op::REQUEST_QUEUES => self.request_queues(msg),
            _ => status_only(opcode, status::ERR_NOT_SUPPORTED),
        }
    }

    fn version(&mut self, msg: &[u8]) -> Outcome {
        let Some((v, _)) = vc::header::<vc::VersionInfo>(msg) else {
            let reply = vc::VersionInfo {
                major: 1.into(),
                minor: 1.into(),
            };
            return Outcome::reply(op::VERSION, status::ERR_PARAM, reply.as_bytes().to_vec());
        };
        // Answer 1.0 only to a 1.0 VF; everything else gets 1.1.
        let minor = if v.major.get() == 1 && v.minor.get() == 0 {
            0
        } else {
            1
        };
        self.version_minor = Some(minor);
        let reply = vc::VersionInfo {
            major: 1.into(),
            minor: minor.into(),
        };
        Outcome::reply(op::VERSION, status::SUCCESS, reply.as_bytes().to_vec())
    }

    fn get_vf_resources(&mut self, msg: &[u8]) -> Outcome {
        // §4.1 rule 7: infer 1.1 from a caps payload, 1.0 from none.
        let requested = match vc::header::<zerocopy::little_endian::U32>(msg) {
            Some((c, _)) => c.get(),
            None => cap::L2 | cap::VLAN,
        };
        self.caps = requested & cap::IMPLEMENTED;
        let res = vc::VfResource {
            num_vsis: 1.into(),
            num_queue_pairs: self.num_queue_pairs.into(),
            max_vectors: self.max_vectors().into(),
            max_mtu: MAX_FRAME.into(),
            vf_cap_flags: self.caps.into(),
            rss_key_size: u32::from(vc::RSS_KEY_SIZE).into(),
            rss_lut_size: u32::from(vc::RSS_LUT_SIZE).into(),
        };
        let vsi = vc::VsiResource {
            vsi_id: VSI_ID.into(),
            num_queue_pairs: self.num_queue_pairs.into(),
            vsi_type: vc::VSI_TYPE_SRIOV.into(),
            qset_handle: 0.into(),
            default_mac_addr: self.cfg.mac,
        };
        let mut data = res.as_bytes().to_vec();
        data.extend_from_slice(vsi.as_bytes());
        Outcome::reply(op::GET_VF_RESOURCES, status::SUCCESS, data)
    }

    fn config_vsi_queues(&mut self, msg: &[u8], mem: &GuestMemory) -> i32 {
        let Some((hdr, rest)) = vc::header::<vc::VsiQueueConfigHdr>(msg) else {
            return status::ERR_PARAM;
        };
        let n = hdr.num_queue_pairs.get();
        if hdr.vsi_id.get() != VSI_ID || n == 0 || n > self.num_queue_pairs {
            return status::ERR_PARAM;
        }
        let Some(pairs) = vc::elements::<vc::QueuePairInfo>(rest, usize::from(n)) else {
            return status::ERR_PARAM;
        };
        // Validate everything first: a refused message changes nothing.
        let mut plan = Vec::with_capacity(pairs.len());
        for p in &pairs {
            let q = p.txq.queue_id.get();
            if q >= self.num_queue_pairs || p.rxq.queue_id.get() != q {
                return status::ERR_PARAM;
            }
            let tx = match u32::from(p.txq.ring_len.get()) {
                0 => None,
                len => match ring(mem, p.txq.dma_ring_addr.get(), len, TX_DESC_SIZE) {
                    Some(len) => Some(TxRing {
                        addr: p.txq.dma_ring_addr.get(),
                        len,
                    }),
                    None => return status::ERR_PARAM,
                },
            };
            let rx = match p.rxq.ring_len.get() {
                0 => None,
                len => {
                    let Some(len) = ring(mem, p.rxq.dma_ring_addr.get(), len, RX_DESC_SIZE) else {
                        return status::ERR_PARAM;
                    };
                    let buf_size = match p.rxq.databuffer_size.get() {
                        0 => 2048,
                        b @ 128..=16256 => b,
                        _ => return status::ERR_PARAM,
                    };
                    let max_pkt = match p.rxq.max_pkt_size.get() {
                        0 => 16382,
                        m @ 64..=16382 => m,
                        _ => return status::ERR_PARAM,
                    };
                    Some(RxRing {
                        addr: p.rxq.dma_ring_addr.get(),
                        len,
                        buf_size,
                        max_pkt,
                    })
                }
            };
            plan.push((usize::from(q), tx, rx));
        }
        for (q, tx, rx) in plan {
            let Some(qp) = self.queues.get_mut(q) else {
                return status::ERR_PARAM;
            };
            if tx.is_some() {
                qp.tx = tx;
                qp.tx_head = 0;
            }
            if rx.is_some() {
                qp.rx = rx;
                qp.rx_head = 0;
            }
        }
        status::SUCCESS
    }

    fn config_irq_map(&mut self, msg: &[u8]) -> i32 {
        let Some((n, rest)) = vc::header::<zerocopy::little_endian::U16>(msg) else {
            return status::ERR_PARAM;
        };
        let n = n.get();
        if n == 0 || n > self.max_vectors() {
            return status::ERR_PARAM;
        }
        let Some(maps) = vc::elements::<vc::VectorMap>(rest, usize::from(n)) else {
            return status::ERR_PARAM;
        };
        let nq = self.num_queue_pairs;
        for m in &maps {
            if m.vsi_id.get() != VSI_ID
                || m.vector_id.get() >= self.max_vectors()
                || !bitmap_ok(u32::from(m.rxq_map.get()), nq)
                || !bitmap_ok(u32::from(m.txq_map.get()), nq)
            {
                return status::ERR_PARAM;
            }
        }
        for m in &maps {
            let v = m.vector_id.get();
            for (i, q) in self.queues.iter_mut().enumerate() {
                if m.rxq_map.get() >> i & 1 != 0 {
                    q.rx_vector = Some(v);
                }
                if m.txq_map.get() >> i & 1 != 0 {
                    q.tx_vector = Some(v);
                }
            }
        }
        status::SUCCESS
    }

    fn queue_select(&self, msg: &[u8]) -> Option<(u32, u32)> {
        let (sel, _) = vc::header::<vc::QueueSelect>(msg)?;
        let (rx, tx) = (sel.rx_queues.get(), sel.tx_queues.get());
        let ok = sel.vsi_id.get() == VSI_ID
            && (rx | tx) != 0
            && bitmap_ok(rx, self.num_queue_pairs)
            && bitmap_ok(tx, self.num_queue_pairs);
        ok.then_some((rx, tx))
    }

    fn enable_queues(&mut self, msg: &[u8]) -> i32 {
        let Some((rx, tx)) = self.queue_select(msg) else {
            return status::ERR_PARAM;
        };
        // Every selected queue must have a ring.
        for (i, q) in self.queues.iter().enumerate() {
            if (rx >> i & 1 != 0 && q.rx.is_none()) || (tx >> i & 1 != 0 && q.tx.is_none()) {
                return status::ERR_PARAM;
            }
        }
        for (i, q) in self.queues.iter_mut().enumerate() {
            if rx >> i & 1 != 0 {
                q.rx_enabled = true;
            }
            if tx >> i & 1 != 0 {
                q.tx_enabled = true;
            }
        }
        status::SUCCESS
    }

    fn disable_queues(&mut self, msg: &[u8]) -> i32 {
        let Some((rx, tx)) = self.queue_select(msg) else {
            return status::ERR_PARAM;
        };
        for (i, q) in self.queues.iter_mut().enumerate() {
            if rx >> i & 1 != 0 {
                q.rx_enabled = false;
            }
            if tx >> i & 1 != 0 {
                q.tx_enabled = false;
            }
        }
        status::SUCCESS
    }

    fn eth_addr(&mut self, msg: &[u8], add: bool) -> i32 {
        let Some((hdr, rest)) = vc::header::<vc::EtherAddrListHdr>(msg) else {
            return status::ERR_PARAM;
        };
        let n = usize::from(hdr.num_elements.get());
        if hdr.vsi_id.get() != VSI_ID || n == 0 {
            return status::ERR_PARAM;
        }
        let Some(list) = vc::elements::<vc::EtherAddr>(rest, n) else {
            return status::ERR_PARAM;
        };
        if add {
            let new = list
                .iter()
                .filter(|e| !self.mac_filters.contains(&e.addr))
                .count();
            if self.mac_filters.len().saturating_add(new) > MAX_MAC_FILTERS {
                return status::ERR_NO_MEMORY;
            }
            for e in &list {
                if e.addr == [0; 6] {
                    continue;
                }
                if !self.mac_filters.contains(&e.addr) {
                    self.mac_filters.push(e.addr);
                }
                if e.kind & 3 == vc::ETH_ADDR_PRIMARY {
                    self.primary_mac = e.addr;
                }
            }
        } else {
            self.mac_filters
                .retain(|m| !list.iter().any(|e| e.addr == *m));
            // The primary goes too (Linux deletes every filter at ifdown); a new primary
            // arrives with ADD_ETH_ADDR.
            if list.iter().any(|e| e.addr == self.primary_mac) {
                self.primary_mac = [0; 6];
            }
        }
        status::SUCCESS
    }

    fn vlan(&mut self, msg: &[u8], add: bool) -> i32 {
        let Some((hdr, rest)) = vc::header::<vc::VlanFilterListHdr>(msg) else {
            return status::ERR_PARAM;
        };
        let n = usize::from(hdr.num_elements.get());
        if hdr.vsi_id.get() != VSI_ID || n == 0 {
            return status::ERR_PARAM;
        }
        let Some(ids) = vc::elements::<zerocopy::little_endian::U16>(rest, n) else {
            return status::ERR_PARAM;
        };
        if ids.iter().any(|v| v.get() > MAX_VLAN_ID) {
            return status::ERR_PARAM;
        }
        if add {
            let new = ids
                .iter()
                .filter(|v| !self.vlan_filters.contains(&v.get()))
                .count();
            if self.vlan_filters.len().saturating_add(new) > MAX_VLAN_FILTERS {
                return status::ERR_NO_MEMORY;
            }
            for v in &ids {
                if !self.vlan_filters.contains(&v.get()) {
                    self.vlan_filters.push(v.get());
                }
            }
        } else {
            self.vlan_filters
                .retain(|f| !ids.iter().any(|v| v.get() == *f));
        }
        status::SUCCESS
    }

    fn promisc(&mut self, msg: &[u8]) -> i32 {
        match vc::header::<vc::PromiscInfo>(msg) {
            Some((p, _)) if p.vsi_id.get() == VSI_ID => {
                self.promisc = p.flags.get() & (vc::PROMISC_UNICAST | vc::PROMISC_MULTICAST);
                status::SUCCESS
            }
            _ => status::ERR_PARAM,
        }
    }

    fn get_stats(&mut self, msg: &[u8]) -> Outcome {
        match vc::header::<vc::QueueSelect>(msg) {
            Some((s, _)) if s.vsi_id.get() == VSI_ID => Outcome::reply(
                op::GET_STATS,
                status::SUCCESS,
                self.stats.as_bytes().to_vec(),
            ),
            _ => status_only(op::GET_STATS, status::ERR_PARAM),
        }
    }

    fn rss_array(msg: &[u8], expect: u16) -> Option<&[u8]> {
        let (hdr, rest) = vc::header::<vc::RssArrayHdr>(msg)?;
        if hdr.vsi_id.get() != VSI_ID || hdr.len.get() != expect {
            return None;
        }
        rest.get(..usize::from(expect))
    }

    fn rss_key(&mut self, msg: &[u8]) -> i32 {
        match Self::rss_array(msg, vc::RSS_KEY_SIZE) {
            Some(k) => {
                self.rss_key = k.to_vec();
                status::SUCCESS
            }
            None => status::ERR_PARAM,
        }
    }

    fn rss_lut(&mut self, msg: &[u8]) -> i32 {
        let nq = self.num_queue_pairs;
        match Self::rss_array(msg, vc::RSS_LUT_SIZE) {
            Some(l) if l.iter().all(|&q| u16::from(q) < nq) => {
                self.rss_lut = l.to_vec();
                status::SUCCESS
            }
            _ => status::ERR_PARAM,
        }
    }

    fn rss_hfunc(&mut self, msg: &[u8]) -> i32 {
        match vc::header::<vc::RssHfunc>(msg) {
            Some((h, _)) if h.vsi_id.get() == VSI_ID => {
                if h.rss_algorithm.get() == 0 {
                    status::SUCCESS
                } else {
                    status::ERR_NOT_SUPPORTED
                }
            }
            _ => status::ERR_PARAM,
        }
    }

    fn set_hena(&mut self, msg: &[u8]) -> i32 {
        match vc::header::<zerocopy::little_endian::U64>(msg) {
            Some((h, _)) if h.get() & !vc::HENA_CAPS == 0 => {
                self.rss_hena = h.get();
                status::SUCCESS
            }
            _ => status::ERR_PARAM,
        }
    }

    /// REQUEST_QUEUES: grant a count within our maximum (the VF is then reset with the new
    /// count, announced by RESET_IMPENDING); otherwise answer with what is available.
    fn request_queues(&mut self, msg: &[u8]) -> Outcome {
        let Some((req, _)) = vc::header::<zerocopy::little_endian::U16>(msg) else {
            return status_only(op::REQUEST_QUEUES, status::ERR_PARAM);
        };
        let req = req.get();
        let max = self.cfg.queue_pairs;
        if req == 0 || req > max {
            return Outcome::reply(
                op::REQUEST_QUEUES,
                status::SUCCESS,
                max.to_le_bytes().to_vec(),
            );
        }
        let mut out = Outcome::reply(
            op::REQUEST_QUEUES,
            status::SUCCESS,
            req.to_le_bytes().to_vec(),
        );
        if req != self.num_queue_pairs {
            self.num_queue_pairs = req;
            let ev = vc::PfEvent {
                event: vc::event::RESET_IMPENDING.into(),
                severity: vc::event::SEVERITY_CERTAIN_DOOM.into(),
                ..Default::default()
            };
            out.messages.push(ArqMsg {
                opcode: op::EVENT,
                status: status::SUCCESS,
                data: ev.as_bytes().to_vec(),
            });
            out.reset = true;
        }
        out
    }
}

/// Validate a ring: length a multiple of 32 in 32..=MAX_RING_LEN and the whole ring inside
/// readable and writable DMA maps. Returns the length as u16.
fn ring(mem: &GuestMemory, addr: u64, len: u32, desc: u64) -> Option<u16> {
    if len == 0 || len % 32 != 0 || len > MAX_RING_LEN {
        return None;
    }
    let bytes = u64::from(len).checked_mul(desc)?;
    let ok =
        mem.check_range(addr, bytes, Access::Read) && mem.check_range(addr, bytes, Access::Write);
    ok.then(|| u16::try_from(len).ok()).flatten()
}
