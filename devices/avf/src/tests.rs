//! Device tests over the in-process transport, driving the admin queue the way the Linux
//! iavf driver does: descriptor rings and buffers in guest RAM, doorbells through BAR0.

use std::time::{Duration, Instant};

use emudev::InProc;
use zerocopy::{FromBytes, IntoBytes};

use crate::adminq::{aq_op, flags, AqDesc};
use crate::pf::VfConfig;
use crate::regs::*;
use crate::virtchnl::{self as vc, cap, op, status};
use crate::AvfDevice;
use emudev::DeviceModel;

const ATQ_BASE: u64 = 0x1_0000;
const ARQ_BASE: u64 = 0x1_1000;
const ATQ_BUFS: u64 = 0x2_0000;
const ARQ_BUFS: u64 = 0x4_0000;
const RING: u32 = 32;
const TIMEOUT: Duration = Duration::from_secs(2);
/// What Linux 6.12 requests in GET_VF_RESOURCES.
const LINUX_CAPS: u32 = 0x1ABD_8CF9;

/// A minimal iavf-like driver.
struct Drv {
    ip: InProc<AvfDevice>,
    atq_ntu: u32,
    arq_ntc: u32,
}

fn ok<T, E: std::fmt::Debug>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e:?}"))
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

impl Drv {
    fn new(queue_pairs: u16) -> Self {
        let cfg = VfConfig {
            queue_pairs,
            ..VfConfig::default()
        };
        Self::with_device(ok(AvfDevice::new("avf-test", cfg, None)))
    }

    fn with_device(dev: AvfDevice) -> Self {
        let mut d = Self {
            ip: ok(InProc::new(dev, 4)),
            atq_ntu: 0,
            arq_ntc: 0,
        };
        d.init_aq();
        d
    }

    fn rd(&mut self, off: u64) -> u32 {
        ok(self.ip.read32(0, off))
    }

    fn wr(&mut self, off: u64, v: u32) {
        ok(self.ip.write32(0, off, v));
    }

    fn put(&self, gpa: u64, data: &[u8]) {
        ok(self.ip.mem().write(gpa, data));
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        ok(self.ip.mem().read(gpa, &mut b));
        b
    }

    fn desc(&self, gpa: u64) -> AqDesc {
        ok(AqDesc::read_from_bytes(&self.get(gpa, 32)))
    }

    fn post_arq(&self, i: u32) {
        let buf = ARQ_BUFS + u64::from(i) * 4096;
        let d = AqDesc {
            flags: (flags::BUF | flags::LB).into(),
            datalen: 4096.into(),
            addr_high: ((buf >> 32) as u32).into(),
            addr_low: (buf as u32).into(),
            ..AqDesc::default()
        };
        self.put(ARQ_BASE + u64::from(i) * 32, d.as_bytes());
    }

    /// §3.3/§3.4 init order, with the read-backs the driver does.
    fn init_aq(&mut self) {
        self.atq_ntu = 0;
        self.arq_ntc = 0;
        self.wr(VF_ATQH, 0);
        self.wr(VF_ATQT, 0);
        self.wr(VF_ATQLEN, RING | AQ_LEN_ENABLE);
        self.wr(VF_ATQBAL, ATQ_BASE as u32);
        self.wr(VF_ATQBAH, 0);
        assert_eq!(self.rd(VF_ATQBAL), ATQ_BASE as u32);
        for i in 0..RING {
            self.post_arq(i);
        }
        self.wr(VF_ARQH, 0);
        self.wr(VF_ARQT, 0);
        self.wr(VF_ARQLEN, RING | AQ_LEN_ENABLE);
        self.wr(VF_ARQBAL, ARQ_BASE as u32);
        self.wr(VF_ARQBAH, 0);
        self.wr(VF_ARQT, RING - 1);
        assert_eq!(self.rd(VF_ARQBAL), ARQ_BASE as u32);
        assert_eq!(self.rd(VF_ARQLEN), RING | AQ_LEN_ENABLE);
    }

    /// Put a raw descriptor on the ATQ and ring the doorbell; returns its index.
    fn push(&mut self, d: AqDesc) -> u32 {
        let i = self.atq_ntu;
        self.put(ATQ_BASE + u64::from(i) * 32, d.as_bytes());
        self.atq_ntu = (i + 1) % RING;
        let t = self.atq_ntu;
        self.wr(VF_ATQT, t);
        i
    }

    fn wait_atq(&mut self) {
        let want = self.atq_ntu;
        let ip = &mut self.ip;
        assert!(
            wait_until(|| ok(ip.read32(0, VF_ATQH)) == want),
            "ATQ head did not reach {want}"
        );
    }

    /// Send a virtchnl message as Linux does (SI|BUF|RD, LB above 512 bytes) and wait until
    /// the device consumed it.
    fn send_len(&mut self, v_op: u32, payload: &[u8], datalen: u16) -> u32 {
        let i = self.push_msg(v_op, payload, datalen);
        self.wait_atq();
        i
    }

    /// Put a virtchnl message on the ATQ as Linux does and ring the doorbell, without
    /// waiting; returns its index.
    fn push_msg(&mut self, v_op: u32, payload: &[u8], datalen: u16) -> u32 {
        let buf = ATQ_BUFS + u64::from(self.atq_ntu) * 4096;
        let mut fl = flags::SI;
        if !payload.is_empty() {
            self.put(buf, payload);
            fl |= flags::BUF | flags::RD;
            if payload.len() > 512 {
                fl |= flags::LB;
            }
        }
        let d = AqDesc {
            flags: fl.into(),
            opcode: aq_op::SEND_TO_PF.into(),
            datalen: datalen.into(),
            cookie_high: v_op.into(),
            addr_high: ((buf >> 32) as u32).into(),
            addr_low: (buf as u32).into(),
            ..AqDesc::default()
        };
        self.push(d)
    }

    fn send(&mut self, v_op: u32, payload: &[u8]) -> u32 {
        self.send_len(v_op, payload, payload.len() as u16)
    }

    /// Take the next ARQ message if one arrives within `timeout`.
    fn recv_within(&mut self, timeout: Duration) -> Option<(u32, i32, Vec<u8>)> {
        let ntc = self.arq_ntc;
        let deadline = Instant::now() + timeout;
        while self.rd(VF_ARQH) == ntc {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let gpa = ARQ_BASE + u64::from(ntc) * 32;
        let d = self.desc(gpa);
        assert_eq!(
            d.flags.get() & (flags::DD | flags::CMP),
            flags::DD | flags::CMP
        );
        assert_eq!(d.flags.get() & flags::ERR, 0, "ERR never set on the ARQ");
        assert_eq!(d.opcode.get(), aq_op::SEND_TO_VF);
        let data = self.get(d.addr(), usize::from(d.datalen.get()));
        self.post_arq(ntc);
        self.wr(VF_ARQT, ntc);
        self.arq_ntc = (ntc + 1) % RING;
        Some((d.cookie_high.get(), d.cookie_low.get() as i32, data))
    }

    fn recv(&mut self) -> (u32, i32, Vec<u8>) {
        self.recv_within(TIMEOUT)
            .unwrap_or_else(|| panic!("no ARQ message"))
    }

    fn no_message(&mut self) {
        assert!(self.recv_within(Duration::from_millis(50)).is_none());
    }

    /// Request/reply; checks the reply's opcode.
    fn call(&mut self, v_op: u32, payload: &[u8]) -> (i32, Vec<u8>) {
        self.send(v_op, payload);
        let (o, st, data) = self.recv();
        assert_eq!(o, v_op, "reply opcode");
        (st, data)
    }

    fn status(&mut self, v_op: u32, payload: &[u8]) -> i32 {
        self.call(v_op, payload).0
    }

    /// VERSION + GET_VF_RESOURCES as Linux sends them.
    fn negotiate(&mut self) -> Vec<u8> {
        let v = vc::VersionInfo {
            major: 1.into(),
            minor: 1.into(),
        };
        let (st, data) = self.call(op::VERSION, v.as_bytes());
        assert_eq!(st, status::SUCCESS);
        assert_eq!(data, [1, 0, 0, 0, 1, 0, 0, 0]);
        let (st, res) = self.call(op::GET_VF_RESOURCES, &LINUX_CAPS.to_le_bytes());
        assert_eq!(st, status::SUCCESS);
        res
    }
}

fn qpair(q: u16, tx: (u64, u16), rx: (u64, u32)) -> vc::QueuePairInfo {
    vc::QueuePairInfo {
        txq: vc::TxqInfo {
            vsi_id: 1.into(),
            queue_id: q.into(),
            ring_len: tx.1.into(),
            dma_ring_addr: tx.0.into(),
            ..Default::default()
        },
        rxq: vc::RxqInfo {
            vsi_id: 1.into(),
            queue_id: q.into(),
            ring_len: rx.1.into(),
            databuffer_size: 1536.into(),
            max_pkt_size: 9728.into(),
            dma_ring_addr: rx.0.into(),
            ..Default::default()
        },
    }
}

/// CONFIG_VSI_QUEUES with Linux's legacy padding (one extra element).
fn vsi_queues(pairs: &[vc::QueuePairInfo], n: u16) -> Vec<u8> {
    let h = vc::VsiQueueConfigHdr {
        vsi_id: 1.into(),
        num_queue_pairs: n.into(),
        pad: 0.into(),
    };
    let mut m = h.as_bytes().to_vec();
    for p in pairs {
        m.extend_from_slice(p.as_bytes());
    }
    m.extend_from_slice(&[0; 64]);
    m
}

fn irq_map(maps: &[(u16, u16, u16, u16)], n: u16) -> Vec<u8> {
    let mut m = n.to_le_bytes().to_vec();
    for &(vsi, vector, rx, tx) in maps {
        let e = vc::VectorMap {
            vsi_id: vsi.into(),
            vector_id: vector.into(),
            rxq_map: rx.into(),
            txq_map: tx.into(),
            rxitr_idx: 0.into(),
            txitr_idx: 1.into(),
        };
        m.extend_from_slice(e.as_bytes());
    }
    m.extend_from_slice(&[0; 12]);
    m
}

fn select(vsi: u16, rx: u32, tx: u32) -> Vec<u8> {
    vc::QueueSelect {
        vsi_id: vsi.into(),
        pad: 0.into(),
        rx_queues: rx.into(),
        tx_queues: tx.into(),
    }
    .as_bytes()
    .to_vec()
}

/// A CONFIG_RSS_KEY / CONFIG_RSS_LUT payload for VSI 1 (header, bytes, one pad byte).
fn rss_array(bytes: &[u8]) -> Vec<u8> {
    let mut m = vc::RssArrayHdr {
        vsi_id: 1.into(),
        len: (bytes.len() as u16).into(),
    }
    .as_bytes()
    .to_vec();
    m.extend_from_slice(bytes);
    m.push(0);
    m
}

fn addrs(vsi: u16, list: &[([u8; 6], u8)], n: u16) -> Vec<u8> {
    let h = vc::EtherAddrListHdr {
        vsi_id: vsi.into(),
        num_elements: n.into(),
    };
    let mut m = h.as_bytes().to_vec();
    for &(addr, kind) in list {
        m.extend_from_slice(vc::EtherAddr { addr, kind, pad: 0 }.as_bytes());
    }
    m
}

const TX_RING: u64 = 0x10_0000;
const RX_RING: u64 = 0x18_0000;
const MAC2: [u8; 6] = [0x02, 0, 0, 0, 0, 7];

#[test]
fn pci_identity_bars_and_msix() {
    let mut d = Drv::new(4);
    let ip = &mut d.ip;
    assert_eq!(ok(ip.config_read16(0x00)), 0x8086);
    assert_eq!(ok(ip.config_read16(0x02)), 0x1889);
    let mut cls = [0u8; 4];
    ok(ip.config_read(0x08, &mut cls));
    assert_eq!(&cls[1..], &[0x00, 0x00, 0x02], "class 02/00/00");
    assert_eq!(ok(ip.config_read16(0x2c)), 0x8086, "subsystem vendor");
    assert_eq!(ok(ip.config_read16(0x2e)), 0x0000, "subsystem id");
    let mut pin = [0u8; 1];
    ok(ip.config_read(0x3d, &mut pin));
    assert_eq!(pin[0], 0, "no INTx");
    let mut bar0 = [0u8; 4];
    ok(ip.config_read(0x10, &mut bar0));
    assert_eq!(bar0[0] & 0xf, 0xc, "BAR0 64-bit prefetchable");
    let mut bar3 = [0u8; 4];
    ok(ip.config_read(0x1c, &mut bar3));
    assert_eq!(bar3[0] & 0xf, 0xc, "BAR3 64-bit prefetchable");
    let (msix, sizes) = ip.with_device(|dev| {
        let p = dev.pci();
        (p.msix_layout(), (p.bar_size(0), p.bar_size(3)))
    });
    let msix = msix.unwrap_or_else(|| panic!("no MSI-X"));
    assert_eq!(msix.vectors, 5, "queue pairs + 1");
    assert_eq!((msix.table_bar, msix.table_offset), (3, 0));
    assert_eq!((msix.pba_bar, msix.pba_offset), (3, 0x2000));
    assert_eq!(sizes, (BAR0_SIZE, BAR3_SIZE));
    assert!(
        ip.with_device(|dev| dev.pci().find_capability(0x10))
            .is_some(),
        "PCIe cap"
    );
}

#[test]
fn register_file_semantics() {
    let mut d = Drv::new(1);
    assert_eq!(d.rd(VFGEN_RSTAT), RSTAT_VFACTIVE);
    d.wr(VFGEN_RSTAT, 0);
    assert_eq!(d.rd(VFGEN_RSTAT), RSTAT_VFACTIVE, "RSTAT is read-only");
    // Tails latch at any time.
    d.wr(QRX_TAIL, 511);
    d.wr(QTX_TAIL + 4 * 15, 7);
    assert_eq!(d.rd(QRX_TAIL), 511);
    assert_eq!(d.rd(QTX_TAIL + 60), 7);
    // Plain storage.
    d.wr(VFINT_ITRN + 0x40 + 4, 0x3e);
    assert_eq!(d.rd(VFINT_ITRN + 0x44), 0x3e);
    d.wr(VFQF_HKEY, 0xdead_beef);
    assert_eq!(d.rd(VFQF_HKEY), 0xdead_beef);
    // The driver's off-by-one RSS writes are ignored.
    d.wr(HKEY_STRAY, 1);
    d.wr(HLUT_STRAY, 1);
    assert_eq!((d.rd(HKEY_STRAY), d.rd(HLUT_STRAY)), (0, 0));
    // ICR0_ENA1 reads back.
    d.wr(VFINT_ICR0_ENA1, ICR0_ADMINQ);
    assert_eq!(d.rd(VFINT_ICR0_ENA1), ICR0_ADMINQ);
    // ICR01 is read-to-clear and set by ARQ deliveries even when disabled.
    d.wr(VFINT_ICR0_ENA1, 0);
    d.negotiate();
    assert_ne!(d.rd(VFINT_ICR01) & ICR0_ADMINQ, 0);
    assert_eq!(d.rd(VFINT_ICR01), 0);
    // Unaligned / odd-size writes are dropped, unknown offsets read 0.
    ok(d.ip.region_write(0, VF_ATQBAL + 1, &[1]));
    assert_eq!(d.rd(VF_ATQBAL), ATQ_BASE as u32);
    assert_eq!(d.rd(0x1_F000), 0);
}

#[test]
fn version_and_resources_match_the_byte_image() {
    let mut d = Drv::new(1);
    let res = d.negotiate();
    // Appendix B, with VLAN and RSS_PF granted since the device implements them (0x900A1).
    let mut want = vec![
        0x01, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x26, 0xa1, 0x00, 0x09, 0x00, 0x34, 0x00, 0x00,
        0x00, 0x40, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    want.extend_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    assert_eq!(res, want);
    assert_eq!(d.ip.with_device(|dev| dev.vf_state().caps), 0x900A1);
    // v1.0 request: no payload; treated as L2|VLAN requested, both granted.
    let (st, res) = d.call(op::GET_VF_RESOURCES, &[]);
    assert_eq!(st, status::SUCCESS);
    assert_eq!(&res[8..12], &(cap::L2 | cap::VLAN).to_le_bytes());
    // A 1.0 VF gets 1.0.
    let v = vc::VersionInfo {
        major: 1.into(),
        minor: 0.into(),
    };
    let (_, data) = d.call(op::VERSION, v.as_bytes());
    assert_eq!(data, [1, 0, 0, 0, 0, 0, 0, 0]);
    // Malformed VERSION still gets an answer.
    let (st, data) = d.call(op::VERSION, &[1, 0]);
    assert_eq!(st, status::ERR_PARAM);
    assert_eq!(data.len(), 8);
}

#[test]
fn bring_up_like_linux() {
    let mut d = Drv::new(2);
    d.negotiate();
    // DOWN state: IRQ map (vector per queue, then vector 0 empty), RSS key and LUT.
    let m = irq_map(&[(1, 1, 1, 1), (1, 2, 2, 2), (1, 0, 0, 0)], 3);
    assert_eq!(d.status(op::CONFIG_IRQ_MAP, &m), status::SUCCESS);
    let st = d.ip.with_device(|dev| dev.vf_state());
    assert_eq!(st.queues[0].rx_vector, Some(1));
    assert_eq!(st.queues[1].tx_vector, Some(2));
    let mut key = vec![1u8, 0, 52, 0];
    key.extend((0..52).map(|i| i as u8));
    key.push(0);
    assert_eq!(d.status(op::CONFIG_RSS_KEY, &key), status::SUCCESS);
    let mut lut = vec![1u8, 0, 64, 0];
    lut.extend((0..64).map(|i| (i % 2) as u8));
    lut.push(0);
    assert_eq!(d.status(op::CONFIG_RSS_LUT, &lut), status::SUCCESS);
    let st = d.ip.with_device(|dev| dev.vf_state());
    assert_eq!(st.rss_key[51], 51);
    assert_eq!(st.rss_lut[63], 1);
    // open: RX tails written before CONFIG_VSI_QUEUES.
    d.wr(QRX_TAIL, 511);
    d.wr(QRX_TAIL + 4, 511);
    let a = addrs(1, &[(d.ip.with_device(|dev| dev.vf_state().cfg.mac), 1)], 1);
    assert_eq!(d.status(op::ADD_ETH_ADDR, &a), status::SUCCESS);
    let pairs = [
        qpair(0, (TX_RING, 512), (RX_RING, 512)),
        qpair(1, (TX_RING + 0x2000, 512), (RX_RING + 0x4000, 512)),
    ];
    assert_eq!(
        d.status(op::CONFIG_VSI_QUEUES, &vsi_queues(&pairs, 2)),
        status::SUCCESS
    );
    assert_eq!(
        d.rd(QRX_TAIL),
        511,
        "latched tail kept across CONFIG_VSI_QUEUES"
    );
    // ENABLE_QUEUES: the reply, then LINK_CHANGE up in Mb/s.
    d.send(op::ENABLE_QUEUES, &select(1, 3, 3));
    let (o, s, _) = d.recv();
    assert_eq!((o, s), (op::ENABLE_QUEUES, status::SUCCESS));
    let (o, s, ev) = d.recv();
    assert_eq!((o, s), (op::EVENT, status::SUCCESS));
    assert_eq!(ev, [1, 0, 0, 0, 0x10, 0x27, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        d.rd(QRX_TAIL + 4),
        511,
        "latched tail kept across ENABLE_QUEUES"
    );
    let st = d.ip.with_device(|dev| dev.vf_state());
    assert!(st.queues.iter().all(|q| q.rx_enabled && q.tx_enabled));
    assert_eq!(
        st.queues[1].rx.map(|r| (r.addr, r.len, r.buf_size)),
        Some((RX_RING + 0x4000, 512, 1536))
    );
    assert_eq!(st.primary_mac, st.cfg.mac);
    // Running: promisc, extra MAC, stats.
    let p = vc::PromiscInfo {
        vsi_id: 1.into(),
        flags: 3.into(),
    };
    assert_eq!(
        d.status(op::CONFIG_PROMISCUOUS_MODE, p.as_bytes()),
        status::SUCCESS
    );
    assert_eq!(d.ip.with_device(|dev| dev.vf_state().promisc), 3);
    assert_eq!(
        d.status(op::ADD_ETH_ADDR, &addrs(1, &[(MAC2, 2)], 1)),
        status::SUCCESS
    );
    let (s, stats) = d.call(op::GET_STATS, &select(1, 0, 0));
    assert_eq!((s, stats.len()), (status::SUCCESS, 96));
    // RSS hash-enable caps and set; a hena outside the caps is refused.
    let (s, caps) = d.call(op::GET_RSS_HENA_CAPS, &[]);
    assert_eq!(
        (s, caps),
        (status::SUCCESS, vc::HENA_CAPS.to_le_bytes().to_vec())
    );
    assert_eq!(
        d.status(op::SET_RSS_HENA, &(1u64 << 33).to_le_bytes()),
        status::SUCCESS
    );
    assert_eq!(d.ip.with_device(|dev| dev.vf_state().rss_hena), 1 << 33);
    assert_eq!(
        d.status(op::SET_RSS_HENA, &(1u64 << 63).to_le_bytes()),
        status::ERR_PARAM
    );
    let hf = vc::RssHfunc {
        vsi_id: 1.into(),
        rss_algorithm: 0.into(),
        reserved: 0.into(),
    };
    assert_eq!(
        d.status(op::CONFIG_RSS_HFUNC, hf.as_bytes()),
        status::SUCCESS
    );
    let hf = vc::RssHfunc {
        rss_algorithm: 3.into(),
        ..hf
    };
    assert_eq!(
        d.status(op::CONFIG_RSS_HFUNC, hf.as_bytes()),
        status::ERR_NOT_SUPPORTED
    );
    // down: DEL_ETH_ADDR of everything, then DISABLE_QUEUES.
    let mac = d.ip.with_device(|dev| dev.vf_state().cfg.mac);
    assert_eq!(
        d.status(op::DEL_ETH_ADDR, &addrs(1, &[(mac, 1), (MAC2, 2)], 2)),
        status::SUCCESS
    );
    assert!(d
        .ip
        .with_device(|dev| dev.vf_state().mac_filters.is_empty()));
    assert_eq!(
        d.status(op::DISABLE_QUEUES, &select(1, 3, 3)),
        status::SUCCESS
    );
    assert!(!d.ip.with_device(|dev| dev.vf_state().any_queue_enabled()));
    d.no_message();
    // DPDK style: one queue per message, no link event problems.
    assert_eq!(
        d.status(op::ENABLE_QUEUES, &select(1, 0, 2)),
        status::SUCCESS
    );
    assert_eq!(d.recv().0, op::EVENT);
}

#[test]
fn legacy_link_speed_without_adv_cap() {
    let mut d = Drv::new(1);
    assert_eq!(
        d.status(op::GET_VF_RESOURCES, &cap::L2.to_le_bytes()),
        status::SUCCESS
    );
    let pairs = [qpair(0, (TX_RING, 64), (RX_RING, 64))];
    assert_eq!(
        d.status(op::CONFIG_VSI_QUEUES, &vsi_queues(&pairs, 1)),
        status::SUCCESS
    );
    d.send(op::ENABLE_QUEUES, &select(1, 1, 1));
    assert_eq!(d.recv().0, op::ENABLE_QUEUES);
    let (_, _, ev) = d.recv();
    assert_eq!(&ev[4..8], &[8, 0, 0, 0]);
    // RSS messages need RSS_PF.
    assert_eq!(
        d.status(op::GET_RSS_HENA_CAPS, &[]),
        status::ERR_NOT_SUPPORTED
    );
    let mut key = vec![1u8, 0, 52, 0];
    key.extend([0; 53]);
    assert_eq!(
        d.status(op::CONFIG_RSS_KEY, &key),
        status::ERR_NOT_SUPPORTED
    );
}

#[test]
fn bad_virtchnl_input_gets_error_status() {
    let mut d = Drv::new(2);
    d.negotiate();
    let good = qpair(0, (TX_RING, 512), (RX_RING, 512));
    let cases: Vec<(&str, u32, Vec<u8>, i32)> = vec![
        (
            "vsi_queues short header",
            op::CONFIG_VSI_QUEUES,
            vec![1, 0, 1],
            status::ERR_PARAM,
        ),
        (
            "vsi_queues count beyond length",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[good], 2)[..8 + 64 + 10].to_vec(),
            status::ERR_PARAM,
        ),
        (
            "vsi_queues zero pairs",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[], 0),
            status::ERR_PARAM,
        ),
        (
            "vsi_queues too many pairs",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[good, good, good], 3),
            status::ERR_PARAM,
        ),
        (
            "vsi_queues queue id out of range",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[qpair(2, (TX_RING, 512), (RX_RING, 512))], 1),
            status::ERR_PARAM,
        ),
        (
            "vsi_queues tx/rx queue mismatch",
            op::CONFIG_VSI_QUEUES,
            {
                let mut p = good;
                p.rxq.queue_id = 1.into();
                vsi_queues(&[p], 1)
            },
            status::ERR_PARAM,
        ),
        (
            "vsi_queues wrong vsi",
            op::CONFIG_VSI_QUEUES,
            {
                let mut m = vsi_queues(&[good], 1);
                m[0] = 9;
                m
            },
            status::ERR_PARAM,
        ),
        (
            "tx ring outside DMA maps",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[qpair(0, (0x1_0000_0000, 512), (RX_RING, 512))], 1),
            status::ERR_PARAM,
        ),
        (
            "rx ring straddles end of RAM",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(
                &[qpair(0, (TX_RING, 512), (4 * 1024 * 1024 - 4096, 512))],
                1,
            ),
            status::ERR_PARAM,
        ),
        (
            "ring address overflows",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[qpair(0, (u64::MAX - 15, 32), (RX_RING, 512))], 1),
            status::ERR_PARAM,
        ),
        (
            "absurd tx ring length",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[qpair(0, (TX_RING, 65504), (RX_RING, 512))], 1),
            status::ERR_PARAM,
        ),
        (
            "rx ring length not a multiple of 32",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[qpair(0, (TX_RING, 512), (RX_RING, 33))], 1),
            status::ERR_PARAM,
        ),
        (
            "absurd rx ring length",
            op::CONFIG_VSI_QUEUES,
            vsi_queues(&[qpair(0, (TX_RING, 512), (RX_RING, 0x10_0000))], 1),
            status::ERR_PARAM,
        ),
        (
            "rx buffer size absurd",
            op::CONFIG_VSI_QUEUES,
            {
                let mut p = good;
                p.rxq.databuffer_size = 0x10_0000.into();
                vsi_queues(&[p], 1)
            },
            status::ERR_PARAM,
        ),
        (
            "rx max packet absurd",
            op::CONFIG_VSI_QUEUES,
            {
                let mut p = good;
                p.rxq.max_pkt_size = 20_000.into();
                vsi_queues(&[p], 1)
            },
            status::ERR_PARAM,
        ),
        (
            "irq map empty",
            op::CONFIG_IRQ_MAP,
            vec![],
            status::ERR_PARAM,
        ),
        (
            "irq map count beyond length",
            op::CONFIG_IRQ_MAP,
            irq_map(&[(1, 1, 1, 1)], 2)[..2 + 12 + 4].to_vec(),
            status::ERR_PARAM,
        ),
        (
            "irq map vector out of range",
            op::CONFIG_IRQ_MAP,
            irq_map(&[(1, 3, 1, 1)], 1),
            status::ERR_PARAM,
        ),
        (
            "irq map queue out of range",
            op::CONFIG_IRQ_MAP,
            irq_map(&[(1, 1, 4, 0)], 1),
            status::ERR_PARAM,
        ),
        (
            "irq map too many vectors",
            op::CONFIG_IRQ_MAP,
            irq_map(&[(1, 1, 1, 1); 4], 4),
            status::ERR_PARAM,
        ),
        (
            "irq map wrong vsi",
            op::CONFIG_IRQ_MAP,
            irq_map(&[(2, 1, 1, 1)], 1),
            status::ERR_PARAM,
        ),
        (
            "enable unconfigured queue",
            op::ENABLE_QUEUES,
            select(1, 1, 1),
            status::ERR_PARAM,
        ),
        (
            "enable queue out of range",
            op::ENABLE_QUEUES,
            select(1, 1 << 5, 0),
            status::ERR_PARAM,
        ),
        (
            "enable nothing",
            op::ENABLE_QUEUES,
            select(1, 0, 0),
            status::ERR_PARAM,
        ),
        (
            "enable short",
            op::ENABLE_QUEUES,
            select(1, 1, 1)[..8].to_vec(),
            status::ERR_PARAM,
        ),
        (
            "disable queue out of range",
            op::DISABLE_QUEUES,
            select(1, 0, 1 << 31),
            status::ERR_PARAM,
        ),
        (
            "disable wrong vsi",
            op::DISABLE_QUEUES,
            select(0, 1, 1),
            status::ERR_PARAM,
        ),
        (
            "add addr count beyond length",
            op::ADD_ETH_ADDR,
            addrs(1, &[(MAC2, 0)], 3),
            status::ERR_PARAM,
        ),
        (
            "add addr zero entries",
            op::ADD_ETH_ADDR,
            addrs(1, &[], 0),
            status::ERR_PARAM,
        ),
        (
            "add addr wrong vsi",
            op::ADD_ETH_ADDR,
            addrs(7, &[(MAC2, 0)], 1),
            status::ERR_PARAM,
        ),
        (
            "del addr short",
            op::DEL_ETH_ADDR,
            vec![1, 0],
            status::ERR_PARAM,
        ),
        (
            "promisc short",
            op::CONFIG_PROMISCUOUS_MODE,
            vec![1],
            status::ERR_PARAM,
        ),
        ("stats short", op::GET_STATS, vec![1, 0], status::ERR_PARAM),
        (
            "rss key wrong size",
            op::CONFIG_RSS_KEY,
            {
                let mut k = vec![1u8, 0, 40, 0];
                k.extend([0; 41]);
                k
            },
            status::ERR_PARAM,
        ),
        (
            "rss key truncated",
            op::CONFIG_RSS_KEY,
            vec![1u8, 0, 52, 0, 1, 2, 3],
            status::ERR_PARAM,
        ),
        (
            "rss lut entry out of range",
            op::CONFIG_RSS_LUT,
            {
                let mut l = vec![1u8, 0, 64, 0];
                l.extend([5; 65]);
                l
            },
            status::ERR_PARAM,
        ),
        (
            "set hena short",
            op::SET_RSS_HENA,
            vec![0; 4],
            status::ERR_PARAM,
        ),
        (
            "request queues short",
            op::REQUEST_QUEUES,
            vec![1],
            status::ERR_PARAM,
        ),
        (
            "config tx queue (legacy op)",
            op::CONFIG_TX_QUEUE,
            vec![0; 24],
            status::ERR_NOT_SUPPORTED,
        ),
        ("unknown opcode", 9999, vec![], status::ERR_NOT_SUPPORTED),
        ("opcode zero", 0, vec![1, 2, 3], status::ERR_NOT_SUPPORTED),
    ];
    let before = d.ip.with_device(|dev| dev.vf_state());
    for (what, o, msg, want) in cases {
        assert_eq!(d.status(o, &msg), want, "{what}");
    }
    let after = d.ip.with_device(|dev| dev.vf_state());
    assert_eq!(
        before.queues, after.queues,
        "refused messages change nothing"
    );
    assert_eq!(before.mac_filters, after.mac_filters);
    assert_eq!(before.rss_lut, after.rss_lut);
    assert_eq!(before.rss_key, after.rss_key);
}

#[test]
fn mac_filter_limit() {
    let mut d = Drv::new(1);
    d.negotiate();
    let list: Vec<([u8; 6], u8)> = (0..200u16)
        .map(|i| ([2, 0, 0, 0, (i >> 8) as u8, i as u8], 2))
        .collect();
    assert_eq!(
        d.status(op::ADD_ETH_ADDR, &addrs(1, &list, 200)),
        status::SUCCESS
    );
    let more: Vec<([u8; 6], u8)> = (0..100u16)
        .map(|i| ([4, 0, 0, 0, (i >> 8) as u8, i as u8], 2))
        .collect();
    assert_eq!(
        d.status(op::ADD_ETH_ADDR, &addrs(1, &more, 100)),
        status::ERR_NO_MEMORY
    );
    assert_eq!(
        d.ip.with_device(|dev| dev.vf_state().mac_filters.len()),
        200
    );
}

#[test]
fn bad_admin_queue_input_never_crashes() {
    let mut d = Drv::new(1);
    // datalen above the 4 KiB buffer limit: ERR_PARAM reply.
    d.send_len(op::VERSION, &[1, 0, 0, 0, 1, 0, 0, 0], 5000);
    assert_eq!(d.recv().1, status::ERR_PARAM);
    // Payload buffer outside every DMA map: ERR_PARAM reply.
    let desc = AqDesc {
        flags: (flags::SI | flags::BUF | flags::RD).into(),
        opcode: aq_op::SEND_TO_PF.into(),
        datalen: 8.into(),
        cookie_high: op::VERSION.into(),
        addr_high: 0x10.into(),
        ..AqDesc::default()
    };
    d.push(desc);
    d.wait_atq();
    let (o, s, _) = d.recv();
    assert_eq!((o, s), (op::VERSION, status::ERR_PARAM));
    // Unknown AQ opcode: completed with ENOSYS, no ARQ message.
    let i = d.push(AqDesc {
        flags: flags::SI.into(),
        opcode: 0x0777.into(),
        ..AqDesc::default()
    });
    d.wait_atq();
    let back = d.desc(ATQ_BASE + u64::from(i) * 32);
    assert_eq!(back.retval.get(), crate::adminq::AQ_RC_ENOSYS);
    assert_eq!(
        back.flags.get() & (flags::DD | flags::CMP),
        flags::DD | flags::CMP
    );
    d.no_message();
    // Queue shutdown (0x0003): completed OK, no ARQ message.
    let i = d.push(AqDesc {
        flags: flags::SI.into(),
        opcode: aq_op::QUEUE_SHUTDOWN.into(),
        param0: 1.into(),
        ..AqDesc::default()
    });
    d.wait_atq();
    assert_eq!(d.desc(ATQ_BASE + u64::from(i) * 32).retval.get(), 0);
    d.no_message();
    // A tail beyond the ring length: CRIT, head unchanged.
    let h = d.rd(VF_ATQH);
    d.wr(VF_ATQT, 100);
    assert!(wait_until(|| d.rd(VF_ATQLEN) & AQ_LEN_CRIT != 0));
    assert_eq!(d.rd(VF_ATQH), h);
    // ATQ ring outside the DMA maps: CRIT, nothing processed, device still answers reads.
    d.wr(VF_ATQLEN, 0);
    d.wr(VF_ATQH, 0);
    d.wr(VF_ATQT, 0);
    d.wr(VF_ATQLEN, RING | AQ_LEN_ENABLE);
    d.wr(VF_ATQBAH, 0x100);
    d.wr(VF_ATQT, 1);
    assert!(wait_until(|| d.rd(VF_ATQLEN) & AQ_LEN_CRIT != 0));
    assert_eq!(d.rd(VF_ATQH), 0);
    // The driver re-inits and everything works again.
    d.wr(VF_ATQLEN, 0);
    d.wr(VF_ARQLEN, 0);
    d.init_aq();
    d.negotiate();
}

#[test]
fn arq_buffer_outside_maps_and_full_ring() {
    let mut d = Drv::new(1);
    // Replies wait while the ARQ is full (ARQT == ARQH) and flow once a slot is posted.
    d.wr(VF_ARQT, 0);
    d.send(op::GET_STATS, &select(1, 0, 0));
    assert!(d.recv_within(Duration::from_millis(50)).is_none());
    assert_eq!(d.ip.with_device(|dev| dev.outbox_len()), 1);
    d.wr(VF_ARQT, RING - 1);
    let (o, s, data) = d.recv();
    assert_eq!((o, s, data.len()), (op::GET_STATS, status::SUCCESS, 96));
    // A posted ARQ buffer outside the DMA maps: the reply arrives with an AQ error status
    // and no payload instead of being lost.
    let slot = d.arq_ntc;
    let bad = AqDesc {
        flags: (flags::BUF | flags::LB).into(),
        datalen: 4096.into(),
        addr_high: 0x20.into(),
        ..AqDesc::default()
    };
    d.put(ARQ_BASE + u64::from(slot) * 32, bad.as_bytes());
    d.send(op::GET_STATS, &select(1, 0, 0));
    let deadline = Instant::now() + TIMEOUT;
    while d.rd(VF_ARQH) == slot && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let back = d.desc(ARQ_BASE + u64::from(slot) * 32);
    assert_eq!(back.cookie_high.get(), op::GET_STATS);
    assert_eq!(back.cookie_low.get() as i32, status::ERR_ADMIN_QUEUE_ERROR);
    assert_eq!(back.datalen.get(), 0);
}

#[test]
fn aq_disable_drops_the_outbox() {
    let mut d = Drv::new(1);
    d.wr(VF_ARQT, 0);
    d.send(op::GET_STATS, &select(1, 0, 0));
    assert_eq!(d.ip.with_device(|dev| dev.outbox_len()), 1);
    d.wr(VF_ARQLEN, 0);
    assert_eq!(d.ip.with_device(|dev| dev.outbox_len()), 0);
    d.wr(VF_ATQLEN, 0);
    d.init_aq();
    // Only the fresh reply arrives after re-init.
    let (st, _) = d.call(op::VERSION, &[1, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(st, status::SUCCESS);
    d.no_message();
}

#[test]
fn reset_vf_tears_down_and_renegotiates_without_version() {
    let mut d = Drv::new(2);
    d.negotiate();
    let pairs = [qpair(0, (TX_RING, 512), (RX_RING, 512))];
    assert_eq!(
        d.status(op::CONFIG_VSI_QUEUES, &vsi_queues(&pairs, 1)),
        status::SUCCESS
    );
    assert_eq!(
        d.status(op::ADD_ETH_ADDR, &addrs(1, &[(MAC2, 2)], 1)),
        status::SUCCESS
    );
    d.wr(QRX_TAIL, 511);
    d.wr(VFINT_DYN_CTL01, 0x19);
    // RESET_VF has no payload and no reply; the head is zeroed by the reset itself.
    d.push(AqDesc {
        flags: flags::SI.into(),
        opcode: aq_op::SEND_TO_PF.into(),
        cookie_high: op::RESET_VF.into(),
        ..AqDesc::default()
    });
    // No reply; ARQLEN.ENABLE reads 0 and RSTAT ends at VFACTIVE.
    assert!(wait_until(|| d.rd(VF_ARQLEN) & AQ_LEN_ENABLE == 0));
    assert_eq!(d.rd(VFGEN_RSTAT), RSTAT_VFACTIVE);
    assert_eq!(
        (d.rd(VF_ATQLEN), d.rd(VF_ATQBAL), d.rd(VF_ARQBAL)),
        (0, 0, 0)
    );
    assert_eq!(d.rd(QRX_TAIL), 0, "tails zeroed");
    assert_eq!(d.rd(VFINT_DYN_CTL01), 0);
    let st = d.ip.with_device(|dev| dev.vf_state());
    assert!(st.queues.iter().all(|q| q.rx.is_none() && q.tx.is_none()));
    assert!(st.mac_filters.is_empty());
    assert_eq!(st.version_minor, Some(1), "version survives a VF reset");
    // Reset task: re-init AQ, GET_VF_RESOURCES straight away.
    d.init_aq();
    let (s, res) = d.call(op::GET_VF_RESOURCES, &LINUX_CAPS.to_le_bytes());
    assert_eq!((s, res.len()), (status::SUCCESS, 36));
    // Kick with the AQ disabled (iavf_remove does this): ignored.
    let h = d.rd(VF_ATQH);
    d.wr(VF_ATQLEN, 0);
    d.wr(VF_ATQT, 3);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.rd(VF_ATQH), h);
}

#[test]
fn device_reset_forgets_negotiation() {
    let mut d = Drv::new(1);
    d.negotiate();
    ok(d.ip.reset());
    assert_eq!(d.rd(VFGEN_RSTAT), RSTAT_VFACTIVE);
    assert_eq!(d.rd(VF_ARQLEN), 0);
    let st = d.ip.with_device(|dev| dev.vf_state());
    assert_eq!((st.caps, st.version_minor), (0, None));
    d.init_aq();
    d.negotiate();
}

#[test]
fn request_queues_grants_then_resets() {
    let mut d = Drv::new(4);
    d.negotiate();
    let (s, data) = d.call(op::REQUEST_QUEUES, &9u16.to_le_bytes());
    assert_eq!(
        (s, data),
        (status::SUCCESS, 4u16.to_le_bytes().to_vec()),
        "refusal names the maximum"
    );
    let (s, data) = d.call(op::REQUEST_QUEUES, &2u16.to_le_bytes());
    assert_eq!((s, data), (status::SUCCESS, 2u16.to_le_bytes().to_vec()));
    let (o, _, ev) = d.recv();
    assert_eq!(
        (o, &ev[..4]),
        (op::EVENT, &[2u8, 0, 0, 0][..]),
        "RESET_IMPENDING"
    );
    assert!(wait_until(|| d.rd(VF_ARQLEN) & AQ_LEN_ENABLE == 0));
    // Like iavf: the admin queue is torn down once the reset started; wait for it to end.
    assert!(wait_until(|| d.rd(VFGEN_RSTAT) == RSTAT_VFACTIVE));
    d.init_aq();
    let (_, res) = d.call(op::GET_VF_RESOURCES, &LINUX_CAPS.to_le_bytes());
    assert_eq!(&res[2..4], &2u16.to_le_bytes(), "two queue pairs now");
    assert_eq!(
        &res[4..6],
        &5u16.to_le_bytes(),
        "vectors stay at the MSI-X table size"
    );
}

/// The driver reads ATQH once, ~30 ms after the doorbell, and then the ARQ head: each read
/// must already see the request done and its reply delivered, however late the worker runs.
#[test]
fn head_reads_right_after_a_doorbell_see_its_effect() {
    let mut d = Drv::new(1);
    for round in 0..40u32 {
        let v = vc::VersionInfo {
            major: 1.into(),
            minor: 1.into(),
        };
        let buf = ATQ_BUFS + u64::from(d.atq_ntu) * 4096;
        d.put(buf, v.as_bytes());
        let i = d.push(AqDesc {
            flags: (flags::SI | flags::BUF | flags::RD).into(),
            opcode: aq_op::SEND_TO_PF.into(),
            datalen: 8.into(),
            cookie_high: op::VERSION.into(),
            addr_high: ((buf >> 32) as u32).into(),
            addr_low: (buf as u32).into(),
            ..AqDesc::default()
        });
        assert_eq!(d.rd(VF_ATQH), (i + 1) % RING, "round {round}: ATQ head");
        assert_eq!(
            d.rd(VF_ARQH),
            (d.arq_ntc + 1) % RING,
            "round {round}: reply"
        );
        let (o, st, _) = d.recv();
        assert_eq!((o, st), (op::VERSION, status::SUCCESS));
    }
}

#[test]
fn mailbox_interrupt_automask_and_rearm() {
    let mut d = Drv::new(1);
    let irqs = ok(d.ip.enable_msix(2));
    d.wr(VFINT_DYN_CTL01, DYN_CTL_INTENA | (3 << 3));
    d.wr(VFINT_ICR0_ENA1, ICR0_ADMINQ);
    d.send(op::VERSION, &[1, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(irqs[0].wait(TIMEOUT), 1, "vector 0 on ARQ delivery");
    d.recv();
    // Auto-masked: the next delivery does not fire until the driver re-arms.
    d.send(op::GET_STATS, &select(1, 0, 0));
    d.recv();
    assert_eq!(irqs[0].wait(Duration::from_millis(50)), 0);
    d.wr(VFINT_DYN_CTL01, DYN_CTL_INTENA | (3 << 3));
    assert_eq!(irqs[0].wait(TIMEOUT), 1, "pending event fires on re-arm");
    // Queue vector: SWINT_TRIG with INTENA fires (iavf_force_wb).
    d.wr(
        VFINT_DYN_CTLN,
        DYN_CTL_INTENA | DYN_CTL_SWINT_TRIG | (3 << 3),
    );
    assert_eq!(irqs[1].wait(TIMEOUT), 1);
    assert_eq!(irqs[0].take(), 0);
}

#[test]
fn message_backed_rings_are_served_off_the_control_thread() {
    let cfg = VfConfig::default();
    let dev = ok(AvfDevice::new("avf-msg", cfg, None));
    let mut ip = ok(InProc::new(dev, 1));
    // Rings and buffers in a region reached only by DMA messages.
    let base = 0x1000_0000u64;
    ok(ip.map_message(base, 0x10_0000));
    let mut d = Drv {
        ip,
        atq_ntu: 0,
        arq_ntc: 0,
    };
    // Relocate the driver's rings into the message region.
    let (atq, arq, abuf, rbuf) = (base, base + 0x1000, base + 0x2000, base + 0x3000);
    d.wr(VF_ATQLEN, RING | AQ_LEN_ENABLE);
    d.wr(VF_ATQBAL, atq as u32);
    d.wr(VF_ATQBAH, 0);
    let arq_desc = AqDesc {
        flags: (flags::BUF | flags::LB).into(),
        datalen: 4096.into(),
        addr_high: ((rbuf >> 32) as u32).into(),
        addr_low: (rbuf as u32).into(),
        ..AqDesc::default()
    };
    d.put(arq, arq_desc.as_bytes());
    d.wr(VF_ARQLEN, RING | AQ_LEN_ENABLE);
    d.wr(VF_ARQBAL, arq as u32);
    d.wr(VF_ARQBAH, 0);
    d.wr(VF_ARQT, 1);
    d.put(abuf, &[1, 0, 0, 0, 1, 0, 0, 0]);
    let req = AqDesc {
        flags: (flags::SI | flags::BUF | flags::RD).into(),
        opcode: aq_op::SEND_TO_PF.into(),
        datalen: 8.into(),
        cookie_high: op::VERSION.into(),
        addr_high: ((abuf >> 32) as u32).into(),
        addr_low: (abuf as u32).into(),
        ..AqDesc::default()
    };
    d.put(atq, req.as_bytes());
    d.wr(VF_ATQT, 1);
    assert!(wait_until(|| d.rd(VF_ARQH) == 1));
    let back = d.desc(arq);
    assert_eq!(back.cookie_high.get(), op::VERSION);
    assert_eq!(d.get(rbuf, 8), [1, 0, 0, 0, 1, 0, 0, 0]);
}

#[test]
fn link_attribute_sends_events_while_running() {
    let mut d = Drv::new(1);
    d.negotiate();
    let pairs = [qpair(0, (TX_RING, 64), (RX_RING, 64))];
    assert_eq!(
        d.status(op::CONFIG_VSI_QUEUES, &vsi_queues(&pairs, 1)),
        status::SUCCESS
    );
    d.send(op::ENABLE_QUEUES, &select(1, 1, 1));
    d.recv();
    d.recv();
    ok(d.ip.with_device(|dev| dev.set_attr("link", "down")));
    let (o, _, ev) = d.recv();
    assert_eq!((o, ev[8]), (op::EVENT, 0), "link down event");
    assert_eq!(
        d.ip.with_device(|dev| { dev.attr("link") }),
        Some("down".to_string())
    );
    assert!(d
        .ip
        .with_device(|dev| { dev.set_attr("link", "sideways").is_err() }));
}

mod datapath {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use emudev_netback::{
        NetBackend, NetError, NetRx, NetTx, RxVerdict, TxBurst, VirtioNetHdr, VNET_HDR_LEN,
    };

    use crate::desc::{tx_cmd, CTX_CMD_TSO, TX_DESC_DONE};

    /// A backend that records sent frames and delivers queued ones.
    #[derive(Default, Clone)]
    struct Mock {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
        active: Arc<std::sync::atomic::AtomicU16>,
    }

    struct MockTx(Arc<Mutex<Vec<Vec<u8>>>>);
    struct MockRx(Arc<Mutex<VecDeque<Vec<u8>>>>);

    impl NetBackend for Mock {
        fn describe(&self) -> String {
            "mock".into()
        }
        fn max_queue_pairs(&self) -> u16 {
            4
        }
        fn rx(&self, _pair: u16) -> Result<Box<dyn NetRx>, NetError> {
            Ok(Box::new(MockRx(self.inbox.clone())))
        }
        fn tx(&self, _pair: u16) -> Result<Box<dyn NetTx>, NetError> {
            Ok(Box::new(MockTx(self.sent.clone())))
        }
        fn set_active_pairs(&self, pairs: u16) -> Result<(), NetError> {
            self.active
                .store(pairs, std::sync::atomic::Ordering::Release);
            Ok(())
        }
    }

    impl NetTx for MockTx {
        fn send_burst(&mut self, burst: &TxBurst) -> Result<usize, NetError> {
            let mut sent = self.0.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..burst.len() {
                let mut f = Vec::new();
                burst.copy_frame(i, &mut f, usize::MAX);
                sent.push(f);
            }
            Ok(burst.len())
        }
    }

    impl NetRx for MockRx {
        fn recv_burst(
            &mut self,
            max: usize,
            sink: &mut dyn FnMut(&[u8]) -> RxVerdict,
        ) -> Result<usize, NetError> {
            let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let mut n = 0;
            while n < max {
                let Some(f) = q.front() else { break };
                if sink(f) == RxVerdict::NoRoom {
                    break;
                }
                q.pop_front();
                n += 1;
            }
            Ok(n)
        }
        fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
    }

    const RX_BUFS: u64 = 0x30_0000;

    fn running(mock: &Mock) -> Drv {
        running_with(Arc::new(mock.clone()), 1)
    }

    /// Queue pair `q`'s rings and RX buffers.
    fn tx_ring(q: u64) -> u64 {
        TX_RING + q * 0x1000
    }
    fn rx_ring(q: u64) -> u64 {
        RX_RING + q * 0x1000
    }
    fn rx_buf(q: u64, i: u64) -> u64 {
        RX_BUFS + q * 0x2_0000 + i * 2048
    }

    /// A device on `backend` brought up like Linux with `pairs` queue pairs, all enabled,
    /// queue q on vector q+1, 64 RX buffers posted on each.
    fn running_with(backend: Arc<dyn NetBackend>, pairs: u16) -> Drv {
        let cfg = VfConfig {
            queue_pairs: pairs,
            ..VfConfig::default()
        };
        let dev = ok(AvfDevice::new("avf-dp", cfg, Some(backend)));
        let mut d = Drv {
            ip: ok(InProc::new(dev, 4)),
            atq_ntu: 0,
            arq_ntc: 0,
        };
        d.init_aq();
        d.negotiate();
        let mut maps: Vec<(u16, u16, u16, u16)> =
            (0..pairs).map(|q| (1, q + 1, 1 << q, 1 << q)).collect();
        maps.push((1, 0, 0, 0));
        let m = irq_map(&maps, pairs + 1);
        assert_eq!(d.status(op::CONFIG_IRQ_MAP, &m), status::SUCCESS);
        let mut qps = Vec::new();
        for q in 0..u64::from(pairs) {
            // RX buffers posted before the queue config, like Linux.
            for i in 0..64u64 {
                d.put(rx_ring(q) + i * 32, &rx_buf(q, i).to_le_bytes());
                d.put(rx_ring(q) + i * 32 + 8, &[0; 24]);
            }
            d.wr(QRX_TAIL + 4 * q, 63);
            qps.push(qpair(q as u16, (tx_ring(q), 64), (rx_ring(q), 64)));
        }
        assert_eq!(
            d.status(op::CONFIG_VSI_QUEUES, &vsi_queues(&qps, pairs)),
            status::SUCCESS
        );
        let all = (1u32 << pairs) - 1;
        d.send(op::ENABLE_QUEUES, &select(1, all, all));
        assert_eq!(d.recv().0, op::ENABLE_QUEUES);
        assert_eq!(d.recv().0, op::EVENT);
        d
    }

    fn tx_desc(d: &Drv, idx: u64, addr: u64, qw1: u64) {
        let mut raw = addr.to_le_bytes().to_vec();
        raw.extend_from_slice(&qw1.to_le_bytes());
        d.put(TX_RING + idx * 16, &raw);
    }

    fn data_qw1(cmd: u16, size: u64) -> u64 {
        // MACLEN 14, IPLEN 20, L4LEN 20.
        let off = 7u64 | (5 << 7) | (5 << 14);
        (u64::from(cmd) << 4) | (off << 16) | (size << 34)
    }

    fn stats(d: &mut Drv) -> vc::EthStats {
        let (_, s) = d.call(op::GET_STATS, &select(1, 0, 0));
        ok(vc::EthStats::read_from_bytes(&s))
    }

    #[test]
    fn tx_tso_packet_reaches_backend_with_offload_header() {
        let mock = Mock::default();
        let mut d = running(&mock);
        let irqs = ok(d.ip.enable_msix(2));
        d.wr(VFINT_DYN_CTLN, DYN_CTL_INTENA | (3 << 3));
        // A 3000-byte TSO frame in two buffers after a context descriptor.
        let frame: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        d.put(0x28_0000, &frame[..1000]);
        d.put(0x29_0000, &frame[1000..]);
        let ctx = 1 | (u64::from(CTX_CMD_TSO) << 4) | (2946u64 << 30) | (1448u64 << 50);
        tx_desc(&d, 0, 0, ctx);
        let cmd = tx_cmd::IIPT_IPV4_CSUM | tx_cmd::L4T_TCP | tx_cmd::ICRC;
        tx_desc(&d, 1, 0x28_0000, data_qw1(cmd, 1000));
        tx_desc(
            &d,
            2,
            0x29_0000,
            data_qw1(cmd | tx_cmd::EOP | tx_cmd::RS, 2000),
        );
        d.wr(QTX_TAIL, 3);
        assert!(wait_until(|| !mock
            .sent
            .lock()
            .map(|s| s.is_empty())
            .unwrap_or(true)));
        let sent = mock.sent.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(sent.len(), 1);
        let hdr = ok(VirtioNetHdr::read_from_bytes(&sent[0][..VNET_HDR_LEN]));
        assert_eq!(hdr.gso_type, emudev_netback::hdr::gso::TCPV4);
        assert_eq!((hdr.gso_size.get(), hdr.hdr_len.get()), (1448, 54));
        assert_eq!((hdr.csum_start.get(), hdr.csum_offset.get()), (34, 16));
        let out = &sent[0][VNET_HDR_LEN..];
        assert_eq!(out.len(), frame.len());
        assert!(out[54..] == frame[54..], "payload unchanged");
        assert_eq!(
            &out[16..18],
            &(3000u16 - 14).to_be_bytes(),
            "IPv4 tot_len filled in"
        );
        // RS write-back on the EOP descriptor, then the TX vector fires.
        assert!(wait_until(|| {
            let q = d.get(TX_RING + 2 * 16 + 8, 8);
            u64::from_le_bytes(q.try_into().unwrap_or([0; 8])) == TX_DESC_DONE
        }));
        assert_eq!(irqs[1].wait(TIMEOUT), 1, "TX completion interrupt");
        let s = stats(&mut d);
        assert_eq!((s.tx_bytes.get(), s.tx_unicast.get()), (3000, 1));
    }

    #[test]
    fn backend_steers_to_enabled_rx_queues() {
        let mock = Mock::default();
        let cfg = VfConfig {
            queue_pairs: 3,
            ..VfConfig::default()
        };
        let dev = ok(AvfDevice::new(
            "avf-steer",
            cfg,
            Some(Arc::new(mock.clone())),
        ));
        let mut d = Drv {
            ip: ok(InProc::new(dev, 4)),
            atq_ntu: 0,
            arq_ntc: 0,
        };
        d.init_aq();
        d.negotiate();
        let active = || mock.active.load(std::sync::atomic::Ordering::Acquire);
        assert_eq!(active(), 3, "all pairs at creation");
        let pairs = [
            qpair(0, (TX_RING, 64), (RX_RING, 64)),
            qpair(1, (TX_RING + 0x1000, 64), (RX_RING + 0x2000, 64)),
        ];
        assert_eq!(
            d.status(op::CONFIG_VSI_QUEUES, &vsi_queues(&pairs, 2)),
            status::SUCCESS
        );
        d.send(op::ENABLE_QUEUES, &select(1, 3, 3));
        d.recv();
        d.recv();
        assert!(
            wait_until(|| active() == 2),
            "ethtool -L 2: steer to two pairs"
        );
    }

    #[test]
    fn tx_bad_buffer_is_counted_and_still_completed() {
        let mock = Mock::default();
        let mut d = running(&mock);
        tx_desc(&d, 0, 0x7000_0000, data_qw1(tx_cmd::EOP | tx_cmd::RS, 100));
        // An incomplete packet (no EOP) is left for later.
        tx_desc(&d, 1, 0x28_0000, data_qw1(0, 100));
        d.wr(QTX_TAIL, 2);
        assert!(wait_until(|| {
            let q = d.get(TX_RING + 8, 8);
            u64::from_le_bytes(q.try_into().unwrap_or([0; 8])) == TX_DESC_DONE
        }));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(d.ip.with_device(|dev| dev.vf_state().queues[0].tx_head), 1);
        assert_eq!(stats(&mut d).tx_errors.get(), 1);
        assert!(mock.sent.lock().map(|s| s.is_empty()).unwrap_or(false));
    }

    fn rx_qw1(d: &Drv, i: u64) -> u64 {
        u64::from_le_bytes(d.get(RX_RING + i * 32 + 8, 8).try_into().unwrap_or([0; 8]))
    }

    #[test]
    fn rx_frame_spans_descriptors_and_oversize_is_dropped() {
        let mock = Mock::default();
        let mut d = running(&mock);
        let irqs = ok(d.ip.enable_msix(2));
        d.wr(VFINT_DYN_CTLN, DYN_CTL_INTENA | (3 << 3));
        let mut frame: Vec<u8> = (0..3000u32).map(|i| (i * 3) as u8).collect();
        // To our MAC, or the filter drops it.
        frame[..6].copy_from_slice(&VfConfig::default().mac);
        let with_hdr = |f: &[u8]| {
            let mut v = vec![0u8; VNET_HDR_LEN];
            v.extend_from_slice(f);
            v
        };
        if let Ok(mut q) = mock.inbox.lock() {
            q.push_back(with_hdr(&vec![0xff; 10_000]));
            q.push_back(with_hdr(&frame));
        }
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| rx_qw1(&d, 1) & 1 == 1));
        let (q0, q1) = (rx_qw1(&d, 0), rx_qw1(&d, 1));
        assert_eq!(q0 & 3, 1, "first: DD, no EOF");
        assert_eq!(q0 >> 38 & 0x3fff, 1536);
        assert_eq!(q1 & 3, 3, "last: DD|EOF");
        assert_eq!(q1 >> 38 & 0x3fff, 3000 - 1536);
        let mut got = d.get(RX_BUFS, 1536);
        got.extend(d.get(RX_BUFS + 2048, 3000 - 1536));
        assert_eq!(got, frame);
        assert_eq!(irqs[1].wait(TIMEOUT), 1, "RX interrupt");
        assert_eq!(d.ip.with_device(|dev| dev.vf_state().queues[0].rx_head), 2);
        let s = stats(&mut d);
        assert_eq!(
            (s.rx_bytes.get(), s.rx_unicast.get(), s.rx_discards.get()),
            (3000, 1, 1)
        );
        assert_eq!(s.rx_broadcast.get(), 0);
    }

    #[test]
    fn rx_waits_for_buffers_and_disable_stops_dma() {
        let mock = Mock::default();
        let mut d = running(&mock);
        // Head 0, tail 0: no buffers owned; the frame waits in the backend.
        d.wr(QRX_TAIL, 0);
        if let Ok(mut q) = mock.inbox.lock() {
            let mut f = vec![0u8; VNET_HDR_LEN];
            f.extend_from_slice(&[0xff; 60]);
            q.push_back(f);
        }
        d.wr(QRX_TAIL, 0);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(rx_qw1(&d, 0), 0);
        assert_eq!(mock.inbox.lock().map(|q| q.len()).unwrap_or(0), 1);
        d.wr(QRX_TAIL, 1);
        assert!(wait_until(|| rx_qw1(&d, 0) & 3 == 3));
        assert_eq!(stats(&mut d).rx_broadcast.get(), 1);
        // After the DISABLE_QUEUES reply nothing touches the rings.
        assert_eq!(
            d.status(op::DISABLE_QUEUES, &select(1, 1, 1)),
            status::SUCCESS
        );
        tx_desc(&d, 0, 0x28_0000, data_qw1(tx_cmd::EOP | tx_cmd::RS, 60));
        d.wr(QTX_TAIL, 1);
        if let Ok(mut q) = mock.inbox.lock() {
            q.push_back(vec![0u8; VNET_HDR_LEN + 60]);
        }
        d.wr(QRX_TAIL, 2);
        std::thread::sleep(Duration::from_millis(60));
        assert!(mock.sent.lock().map(|s| s.is_empty()).unwrap_or(false));
        assert_eq!(rx_qw1(&d, 1), 0);
        let q = d.get(TX_RING + 8, 8);
        assert_ne!(
            u64::from_le_bytes(q.try_into().unwrap_or([0; 8])),
            TX_DESC_DONE
        );
    }

    fn put_frame(mock: &Mock, flags: u8, frame: &[u8]) {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = flags;
        f.extend_from_slice(frame);
        if let Ok(mut q) = mock.inbox.lock() {
            q.push_back(f);
        }
    }

    fn rx_qw(d: &Drv, q: u64, i: u64) -> (u64, u64) {
        let b = d.get(rx_ring(q) + i * 32, 16);
        let w = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        (w(0), w(8))
    }

    const ME: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn rx_reports_packet_type_and_checksum_status() {
        use crate::desc::{rx_error, rx_status};
        use crate::rx::{ptype, tests::ipv4};
        let mock = Mock::default();
        let mut d = running(&mock);
        let good = ipv4(6, 20, b"good segment", ME);
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        put_frame(&mock, 0, &good);
        put_frame(&mock, 0, &bad);
        put_frame(&mock, emudev_netback::hdr::F_DATA_VALID, &bad);
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| rx_qw(&d, 0, 2).1 & 1 == 1));
        let errs = rx_status::L3L4P | rx_error::IPE | rx_error::L4E;
        let (_, q1) = rx_qw(&d, 0, 0);
        assert_eq!(q1 >> 30 & 0xff, u64::from(ptype::IPV4_TCP));
        assert_eq!(q1 & errs, rx_status::L3L4P, "checked, good");
        assert_eq!(q1 >> 38 & 0x3fff, good.len() as u64);
        let (_, q1) = rx_qw(&d, 0, 1);
        assert_eq!(
            q1 & errs,
            rx_status::L3L4P | rx_error::L4E,
            "bad L4 checksum"
        );
        let (_, q1) = rx_qw(&d, 0, 2);
        assert_eq!(q1 & errs, rx_status::L3L4P, "backend vouched for it");
        assert_eq!(d.get(rx_buf(0, 0), good.len()), good);
        assert_eq!(stats(&mut d).rx_unicast.get(), 3);
    }

    #[test]
    fn mac_filters_and_promiscuous_mode_gate_reception() {
        use crate::rx::tests::ipv4;
        let mock = Mock::default();
        let mut d = running(&mock);
        let foreign = [0x52, 0x54, 0, 9, 9, 9];
        let group = [0x01, 0x00, 0x5e, 0, 0, 0xfb];
        let delivered = |d: &mut Drv| d.ip.with_device(|dev| dev.vf_state().queues[0].rx_head);
        let filtered = |d: &mut Drv| {
            d.ip.with_device(|dev| dev.attr("rx_filtered"))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        put_frame(&mock, 0, &ipv4(17, 8, b"x", foreign));
        put_frame(&mock, 0, &ipv4(17, 8, b"x", group));
        put_frame(&mock, 0, &ipv4(17, 8, b"x", ME));
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| delivered(&mut d) == 1));
        assert_eq!(
            filtered(&mut d),
            2,
            "foreign unicast and unlisted multicast"
        );
        // The group joins (Linux: ADD_ETH_ADDR type EXTRA), allmulti, then promiscuous.
        assert_eq!(
            d.status(op::ADD_ETH_ADDR, &addrs(1, &[(group, 2)], 1)),
            status::SUCCESS
        );
        put_frame(&mock, 0, &ipv4(17, 8, b"x", group));
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| delivered(&mut d) == 2));
        let promisc = |flags: u16| {
            vc::PromiscInfo {
                vsi_id: 1.into(),
                flags: flags.into(),
            }
            .as_bytes()
            .to_vec()
        };
        assert_eq!(
            d.status(op::CONFIG_PROMISCUOUS_MODE, &promisc(vc::PROMISC_MULTICAST)),
            status::SUCCESS
        );
        put_frame(&mock, 0, &ipv4(17, 8, b"x", [0x01, 0x00, 0x5e, 1, 2, 3]));
        put_frame(&mock, 0, &ipv4(17, 8, b"x", foreign));
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| filtered(&mut d) == 3));
        assert_eq!(
            delivered(&mut d),
            3,
            "allmulti: any group, not foreign unicast"
        );
        assert_eq!(
            d.status(
                op::CONFIG_PROMISCUOUS_MODE,
                &promisc(vc::PROMISC_UNICAST | vc::PROMISC_MULTICAST)
            ),
            status::SUCCESS
        );
        put_frame(&mock, 0, &ipv4(17, 8, b"x", foreign));
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| delivered(&mut d) == 4), "promiscuous");
        // Leaving promiscuous mode and deleting our address (ifdown) stops unicast.
        assert_eq!(
            d.status(op::CONFIG_PROMISCUOUS_MODE, &promisc(0)),
            status::SUCCESS
        );
        assert_eq!(
            d.status(op::DEL_ETH_ADDR, &addrs(1, &[(ME, 1)], 1)),
            status::SUCCESS
        );
        put_frame(&mock, 0, &ipv4(17, 8, b"x", ME));
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| filtered(&mut d) == 4));
        assert_eq!(stats(&mut d).rx_multicast.get(), 2);
    }

    #[test]
    fn rss_picks_the_queue_from_the_lut_and_reports_the_hash() {
        use crate::desc::rx_status;
        use crate::rx::{tests::ipv4, tests::MS_KEY, toeplitz};
        let mock = Mock::default();
        let mut d = running_with(Arc::new(mock.clone()), 2);
        let mut key = MS_KEY.to_vec();
        key.resize(52, 0);
        assert_eq!(
            d.status(op::CONFIG_RSS_KEY, &rss_array(&key)),
            status::SUCCESS
        );
        assert_eq!(
            d.status(op::CONFIG_RSS_LUT, &rss_array(&[1; 64])),
            status::SUCCESS
        );
        // The backend hands everything to its queue 0; the LUT sends it to queue 1.
        let f = ipv4(6, 20, b"rss", ME);
        put_frame(&mock, 0, &f);
        d.wr(QRX_TAIL + 4, 63);
        assert!(wait_until(|| rx_qw(&d, 1, 0).1 & 1 == 1));
        let (q0, q1) = rx_qw(&d, 1, 0);
        let mut input = vec![169, 254, 0, 1, 169, 254, 0, 2];
        input.extend_from_slice(&[0x03, 0xe8, 0x07, 0xd0]);
        assert_eq!(
            q0 >> 32,
            u64::from(toeplitz(&key, &input)),
            "hash in qword0"
        );
        assert_eq!(q1 & rx_status::FLTSTAT_RSS, rx_status::FLTSTAT_RSS);
        assert_eq!(rx_qw(&d, 0, 0).1, 0, "nothing on queue 0");
        // LUT back to queue 0; SET_RSS_HENA(0) turns hashing off (no FLTSTAT).
        assert_eq!(
            d.status(op::CONFIG_RSS_LUT, &rss_array(&[0; 64])),
            status::SUCCESS
        );
        assert_eq!(
            d.status(op::SET_RSS_HENA, &0u64.to_le_bytes()),
            status::SUCCESS
        );
        put_frame(&mock, 0, &f);
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| rx_qw(&d, 0, 0).1 & 1 == 1));
        assert_eq!(rx_qw(&d, 0, 0).1 & rx_status::FLTSTAT_RSS, 0);
        // A LUT entry beyond the queue pairs is refused.
        assert_eq!(
            d.status(op::CONFIG_RSS_LUT, &rss_array(&[2; 64])),
            status::ERR_PARAM
        );
    }

    /// What `ethtool -X ... hkey` does in the guest: a CONFIG_RSS_KEY while running takes
    /// effect from the next frame, with no reset and no new LUT. A zero key hashes every
    /// flow to 0, so to `lut[0]`; the guest case uses that to see the key reach the device.
    #[test]
    fn a_new_rss_key_steers_the_next_frame() {
        use crate::rx::{tests::ipv4, tests::MS_KEY, toeplitz};
        let mock = Mock::default();
        let mut d = running_with(Arc::new(mock.clone()), 2);
        let mut key = MS_KEY.to_vec();
        key.resize(52, 0);
        let input = [169, 254, 0, 1, 169, 254, 0, 2, 0x03, 0xe8, 0x07, 0xd0];
        let hash = toeplitz(&key, &input);
        assert_ne!(
            hash % 64,
            0,
            "the flow must not use lut[0] under the real key"
        );
        // lut[0] = queue 0, every other entry queue 1.
        let mut lut = [1u8; 64];
        lut[0] = 0;
        assert_eq!(
            d.status(op::CONFIG_RSS_LUT, &rss_array(&lut)),
            status::SUCCESS
        );
        assert_eq!(
            d.status(op::CONFIG_RSS_KEY, &rss_array(&key)),
            status::SUCCESS
        );
        let f = ipv4(6, 20, b"key", ME);
        put_frame(&mock, 0, &f);
        d.wr(QRX_TAIL + 4, 63);
        assert!(wait_until(|| rx_qw(&d, 1, 0).1 & 1 == 1));
        assert_eq!(rx_qw(&d, 1, 0).0 >> 32, u64::from(hash));
        // Zero key: hash 0, so lut[0] = queue 0.
        assert_eq!(
            d.status(op::CONFIG_RSS_KEY, &rss_array(&[0; 52])),
            status::SUCCESS
        );
        put_frame(&mock, 0, &f);
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| rx_qw(&d, 0, 0).1 & 1 == 1));
        assert_eq!(rx_qw(&d, 0, 0).0 >> 32, 0, "hash under a zero key");
        assert_eq!(rx_qw(&d, 1, 1).1, 0, "nothing more on queue 1");
        // The real key again: back to queue 1.
        assert_eq!(
            d.status(op::CONFIG_RSS_KEY, &rss_array(&key)),
            status::SUCCESS
        );
        put_frame(&mock, 0, &f);
        d.wr(QRX_TAIL + 4, 63);
        assert!(wait_until(|| rx_qw(&d, 1, 1).1 & 1 == 1));
        assert_eq!(rx_qw(&d, 1, 1).0 >> 32, u64::from(hash));
        assert_eq!(rx_qw(&d, 0, 1).1, 0, "nothing more on queue 0");
    }

    /// The AVF NIC and a virtio-net NIC on one in-process L2 switch, each driven by its own
    /// test driver: a TCP frame with a checksum-offload request goes AVF -> virtio-net (the
    /// partial checksum arrives as a vnet header and finishes to the right bytes), a UDP
    /// frame goes virtio-net -> AVF (checked, typed), and a frame for a MAC nobody has is
    /// flooded by the switch and refused by the AVF filter.
    #[test]
    fn avf_and_virtio_net_exchange_frames_over_the_switch() {
        use crate::rx::tests::ipv4;
        use emudev_net::{NetOptions, VirtioNetDevice};
        use emudev_netback::hdr::{finish_checksum, ones_sum, F_NEEDS_CSUM};
        use emudev_netback::switch::{L2Switch, SwitchOptions};
        use emudev_virtio::engine::{Kick, Notifier};
        use emudev_virtio::pci::VirtioDeviceType;
        use emudev_virtio::poller::PollerPool;
        use emudev_virtio::queue::features as qf;
        use emudev_virtio::queue::testdriver::{anon_memory, Buf, SplitDriver};

        const V: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
        const VBUFS: u64 = 0x10_0000;
        let sw = L2Switch::new("avf-vnet", SwitchOptions::default());
        let mut d = running_with(Arc::new(ok(sw.add_port(1))), 1);

        let pool = ok(PollerPool::new(1));
        let opts = NetOptions {
            mac: V,
            ..NetOptions::default()
        };
        let mut dev = VirtioNetDevice::new(Arc::new(ok(sw.add_port(1))), opts, pool);
        let mut eng = ok(dev.create_engine());
        let f = dev.features() | qf::VERSION_1;
        assert!(dev.features_ok(f));
        ok(eng.features_changed(f).wait_timeout(TIMEOUT));
        let vmem = anon_memory(0, 4 << 20);
        ok(eng.memory_changed(vmem.clone()).wait_timeout(TIMEOUT));
        let mut vrx = SplitDriver::new(vmem.clone(), 0, 64);
        let mut vtx = SplitDriver::new(vmem.clone(), 0x1_0000, 64);
        let kicks = [ok(Kick::new()), ok(Kick::new())];
        for (i, q) in [&vrx, &vtx].into_iter().enumerate() {
            let n: Arc<dyn Notifier> = Arc::new(|| {});
            ok(eng
                .queue_start(i as u16, q.config(), n, kicks[i].clone())
                .wait_timeout(TIMEOUT));
        }
        for i in 0..4u64 {
            vrx.add_chain(&[Buf::w(VBUFS + i * 0x1000, 2048)]);
        }
        kicks[0].signal();
        let wait_used = |q: &mut SplitDriver| {
            let mut got = None;
            assert!(wait_until(|| {
                got = q.pop_used();
                got.is_some()
            }));
            got.unwrap_or_default()
        };

        // AVF -> virtio-net: TCP with L4 checksum offload, the field seeded like Linux.
        let mut out = ipv4(6, 20, &[0x5a; 200], V);
        out[6..12].copy_from_slice(&ME);
        let want = out.clone();
        let tcp_len = out.len() - 34;
        let seed = emudev_netback::hdr::fold(ones_sum(&out[26..34]) + 6 + tcp_len as u32);
        out[50..52].copy_from_slice(&seed.to_be_bytes());
        d.put(0x28_0000, &out);
        let cmd = tx_cmd::IIPT_IPV4_CSUM | tx_cmd::L4T_TCP | tx_cmd::EOP | tx_cmd::RS;
        tx_desc(&d, 0, 0x28_0000, data_qw1(cmd, out.len() as u64));
        d.wr(QTX_TAIL, 1);
        let (_, len) = wait_used(&mut vrx);
        assert_eq!(len as usize, VNET_HDR_LEN + want.len());
        let mut got = vec![0u8; len as usize];
        ok(vmem.read(VBUFS, &mut got));
        assert_eq!(
            got[0] & F_NEEDS_CSUM,
            F_NEEDS_CSUM,
            "partial checksum passed on"
        );
        ok(finish_checksum(&mut got));
        assert_eq!(
            &got[VNET_HDR_LEN..],
            &want[..],
            "finishes to the right checksum"
        );

        // virtio-net -> AVF: a finished UDP frame; the AVF reports it checked.
        let mut back = ipv4(17, 8, &[7; 100], ME);
        back[6..12].copy_from_slice(&V);
        let mut wire = VirtioNetHdr::default().as_bytes().to_vec();
        wire.extend_from_slice(&back);
        ok(vmem.write(0x30_0000, &wire));
        vtx.add_chain(&[Buf::r(0x30_0000, wire.len() as u32)]);
        kicks[1].signal();
        wait_used(&mut vtx);
        assert!(wait_until(|| rx_qw(&d, 0, 0).1 & 1 == 1));
        let (_, q1) = rx_qw(&d, 0, 0);
        assert_eq!(q1 >> 30 & 0xff, u64::from(crate::rx::ptype::IPV4_UDP));
        assert_eq!(
            q1 & (crate::desc::rx_status::L3L4P | crate::desc::rx_error::L4E),
            crate::desc::rx_status::L3L4P
        );
        assert_eq!(d.get(rx_buf(0, 0), back.len()), back);

        // virtio-net -> a MAC nobody has: flooded by the switch, refused by the AVF filter.
        let mut lost = ipv4(17, 8, &[8; 60], [0x52, 0x54, 0, 0, 0, 0xcc]);
        lost[6..12].copy_from_slice(&V);
        let mut wire = VirtioNetHdr::default().as_bytes().to_vec();
        wire.extend_from_slice(&lost);
        ok(vmem.write(0x30_1000, &wire));
        vtx.add_chain(&[Buf::r(0x30_1000, wire.len() as u32)]);
        kicks[1].signal();
        wait_used(&mut vtx);
        assert!(wait_until(|| d
            .ip
            .with_device(|dev| dev.attr("rx_filtered"))
            .as_deref()
            == Some("1")));
        assert_eq!(rx_qw(&d, 0, 1).1, 0);
        let s = stats(&mut d);
        assert_eq!((s.tx_unicast.get(), s.rx_unicast.get()), (1, 1));
        ok(eng.destroy().wait_timeout(TIMEOUT));
    }

    /// Legacy VLAN capability: ADD/DEL_VLAN filter tagged receive, stripping moves the tag
    /// into the descriptor, and IL2TAG1 inserts it on transmit with the offsets shifted.
    #[test]
    fn vlan_filters_stripping_and_insertion() {
        use crate::rx::tests::ipv4;
        let mock = Mock::default();
        let mut d = running(&mock);
        let vlans = |ids: &[u16], n: u16| {
            let mut m = vc::VlanFilterListHdr {
                vsi_id: 1.into(),
                num_elements: n.into(),
            }
            .as_bytes()
            .to_vec();
            for id in ids {
                m.extend_from_slice(&id.to_le_bytes());
            }
            m
        };
        assert_eq!(
            d.status(op::ADD_VLAN, &vlans(&[100, 200], 2)),
            status::SUCCESS
        );
        assert_eq!(
            d.status(op::ADD_VLAN, &vlans(&[4096], 1)),
            status::ERR_PARAM
        );
        assert_eq!(
            d.status(op::ADD_VLAN, &vlans(&[1], 2)),
            status::ERR_PARAM,
            "short"
        );
        assert_eq!(d.status(op::DEL_VLAN, &vlans(&[200], 1)), status::SUCCESS);
        assert_eq!(d.status(op::ENABLE_VLAN_STRIPPING, &[]), status::SUCCESS);
        let tagged = |vid: u16| {
            let f = ipv4(17, 8, b"tagged", ME);
            let mut t = f[..12].to_vec();
            t.extend_from_slice(&[0x81, 0x00]);
            t.extend_from_slice(&(0x6000 | vid).to_be_bytes());
            t.extend_from_slice(&f[12..]);
            (t, f)
        };
        let (t200, _) = tagged(200);
        let (t100, plain) = tagged(100);
        put_frame(&mock, 0, &t200);
        put_frame(&mock, 0, &t100);
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| rx_qw(&d, 0, 0).1 & 1 == 1));
        let (q0, q1) = rx_qw(&d, 0, 0);
        assert_eq!(q1 >> 2 & 1, 1, "L2TAG1P");
        assert_eq!(q0 >> 16 & 0xffff, 0x6000 | 100, "TCI in qword0");
        assert_eq!(q1 >> 38 & 0x3fff, plain.len() as u64, "tag stripped");
        assert_eq!(d.get(rx_buf(0, 0), plain.len()), plain);
        assert_eq!(
            d.ip.with_device(|dev| dev.attr("rx_filtered")).as_deref(),
            Some("1"),
            "VLAN 200 was deleted"
        );
        // Stripping off: the tag stays in the frame.
        assert_eq!(d.status(op::DISABLE_VLAN_STRIPPING, &[]), status::SUCCESS);
        put_frame(&mock, 0, &t100);
        d.wr(QRX_TAIL, 63);
        assert!(wait_until(|| rx_qw(&d, 0, 1).1 & 1 == 1));
        assert_eq!(rx_qw(&d, 0, 1).1 >> 2 & 1, 0);
        assert_eq!(d.get(rx_buf(0, 1), t100.len()), t100);
        // TX: IL2TAG1 with a checksum request.
        let out = ipv4(17, 8, &[1; 40], [0x52, 0x54, 0, 0, 0, 9]);
        d.put(0x28_0000, &out);
        let cmd = tx_cmd::IIPT_IPV4 | tx_cmd::L4T_UDP | tx_cmd::IL2TAG1 | tx_cmd::EOP | tx_cmd::RS;
        tx_desc(
            &d,
            0,
            0x28_0000,
            data_qw1(cmd, out.len() as u64) | (0x6064u64 << 48),
        );
        d.wr(QTX_TAIL, 1);
        assert!(wait_until(|| !mock
            .sent
            .lock()
            .map(|s| s.is_empty())
            .unwrap_or(true)));
        let sent = mock.sent.lock().map(|s| s.clone()).unwrap_or_default();
        let hdr = ok(VirtioNetHdr::read_from_bytes(&sent[0][..VNET_HDR_LEN]));
        let f = &sent[0][VNET_HDR_LEN..];
        assert_eq!(&f[12..16], &[0x81, 0x00, 0x60, 0x64]);
        assert_eq!(&f[16..], &out[12..]);
        assert_eq!((hdr.csum_start.get(), hdr.csum_offset.get()), (38, 6));
    }

    #[test]
    fn vlan_messages_need_the_capability() {
        let mut d = Drv::new(1);
        d.call(
            op::VERSION,
            vc::VersionInfo {
                major: 1.into(),
                minor: 1.into(),
            }
            .as_bytes(),
        );
        let (st, _) = d.call(op::GET_VF_RESOURCES, &cap::L2.to_le_bytes());
        assert_eq!(st, status::SUCCESS);
        for o in [op::ADD_VLAN, op::ENABLE_VLAN_STRIPPING] {
            assert_eq!(d.status(o, &[1, 0, 1, 0, 5, 0]), status::ERR_NOT_SUPPORTED);
        }
    }
}

/// `AdminMode::Inline`: the pass of a doorbell, and a reset it announces, are done when the
/// register write returns; no worker thread exists.
#[test]
fn inline_admin_mode_finishes_each_doorbell_before_the_write_returns() {
    let pool = ok(emudev::poller::PollerPool::new(
        1,
        emudev::poller::PollConfig::default(),
    ));
    let cfg = VfConfig {
        queue_pairs: 4,
        ..VfConfig::default()
    };
    let dev = ok(AvfDevice::new_inline("avf-inl", cfg, None, pool));
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .filter(|c| c.trim() == "avf-inl-aq")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(threads, 0, "no admin-queue worker thread");
    let mut d = Drv::with_device(dev);
    let v = vc::VersionInfo {
        major: 1.into(),
        minor: 1.into(),
    };
    d.push_msg(op::VERSION, v.as_bytes(), v.as_bytes().len() as u16);
    // No waiting: the descriptor is written back and the reply is on the ARQ already.
    let done = d.desc(ATQ_BASE);
    assert_eq!(done.flags.get() & flags::DD, flags::DD);
    let reply = d.desc(ARQ_BASE);
    assert_eq!(reply.flags.get() & flags::DD, flags::DD);
    assert_eq!(reply.cookie_high.get(), op::VERSION);
    assert_eq!(d.recv().0, op::VERSION);
    d.call(op::GET_VF_RESOURCES, &LINUX_CAPS.to_le_bytes());
    // REQUEST_QUEUES: reply, RESET_IMPENDING, and the reset itself within the doorbell.
    let ntc = u64::from(d.arq_ntc);
    d.push_msg(op::REQUEST_QUEUES, &2u16.to_le_bytes(), 2);
    assert_eq!(
        d.desc(ARQ_BASE + ntc * 32).cookie_high.get(),
        op::REQUEST_QUEUES
    );
    let ev = d.desc(ARQ_BASE + ((ntc + 1) % u64::from(RING)) * 32);
    assert_eq!(ev.cookie_high.get(), op::EVENT);
    assert_eq!(
        d.rd(VF_ARQLEN) & AQ_LEN_ENABLE,
        0,
        "the reset tore the AQ down"
    );
    assert_eq!(d.rd(VFGEN_RSTAT), RSTAT_VFACTIVE, "and finished");
    d.init_aq();
    let (_, res) = d.call(op::GET_VF_RESOURCES, &LINUX_CAPS.to_le_bytes());
    assert_eq!(&res[2..4], &2u16.to_le_bytes(), "two queue pairs now");
}
