//! Two virtio-net devices on one in-process switch, driven through their engines and poller
//! threads by the split-ring test driver: frames cross, the control queue changes the RX
//! filter, and link down stops delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::GuestMemory;
use emudev_net::config::feature;
use emudev_net::ctrl::cmd;
use emudev_net::{NetOptions, VirtioNetDevice};
use emudev_netback::hdr::{VirtioNetHdr, F_NEEDS_CSUM};
use emudev_netback::switch::{L2Switch, SwitchOptions};
use emudev_netback::VNET_HDR_LEN;
use emudev_virtio::engine::{Kick, Notifier};
use emudev_virtio::pci::VirtioDeviceType;
use emudev_virtio::poller::PollerPool;
use emudev_virtio::queue::features as qf;
use emudev_virtio::queue::testdriver::{anon_memory, Buf, SplitDriver};
use emudev_virtio::Engine;
use zerocopy::IntoBytes;

const T: Duration = Duration::from_secs(5);
const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
const BUFS: u64 = 0x10_0000;

struct Nic {
    dev: VirtioNetDevice,
    eng: Box<dyn Engine>,
    mem: Arc<GuestMemory>,
    rx: SplitDriver,
    tx: SplitDriver,
    ctrl: SplitDriver,
    kicks: [Kick; 3],
    next_buf: u64,
}

impl Nic {
    fn new(
        backend: emudev_netback::switch::SwitchPort,
        mac: [u8; 6],
        pool: &Arc<PollerPool>,
        drop_tso: bool,
    ) -> Self {
        let opts = NetOptions {
            mac,
            ..NetOptions::default()
        };
        let mut dev = VirtioNetDevice::new(Arc::new(backend), opts, pool.clone());
        let mut eng = dev.create_engine().unwrap();
        let mut f = dev.features() | qf::VERSION_1;
        if drop_tso {
            f &= !(feature::GUEST_CSUM
                | feature::GUEST_TSO4
                | feature::GUEST_TSO6
                | feature::GUEST_ECN);
        }
        assert!(dev.features_ok(f));
        eng.features_changed(f).wait_timeout(T).unwrap();
        let mem = anon_memory(0, 8 << 20);
        eng.memory_changed(mem.clone()).wait_timeout(T).unwrap();
        let rx = SplitDriver::new(mem.clone(), 0, 64);
        let tx = SplitDriver::new(mem.clone(), 0x1_0000, 64);
        let ctrl = SplitDriver::new(mem.clone(), 0x2_0000, 16);
        let kicks = [
            Kick::new().unwrap(),
            Kick::new().unwrap(),
            Kick::new().unwrap(),
        ];
        for (i, d) in [&rx, &tx, &ctrl].into_iter().enumerate() {
            let n: Arc<dyn Notifier> = Arc::new(|| {});
            eng.queue_start(i as u16, d.config(), n, kicks[i].clone())
                .wait_timeout(T)
                .unwrap();
        }
        Self {
            dev,
            eng,
            mem,
            rx,
            tx,
            ctrl,
            kicks,
            next_buf: BUFS,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(0x1000);
        a
    }

    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let a = self.alloc(u64::from(len));
            self.rx.add_chain(&[Buf::w(a, len)]);
        }
        self.kicks[0].signal();
    }

    fn send(&mut self, hdr: VirtioNetHdr, dst: [u8; 6], payload: &[u8]) {
        let mut f = hdr.as_bytes().to_vec();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&self.dev_mac());
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        let a = self.alloc(f.len() as u64);
        self.mem.write(a, &f).unwrap();
        // Header and frame in separate descriptors, as Linux does without ANY_LAYOUT hints.
        self.tx
            .add_chain(&[Buf::r(a, 12), Buf::r(a + 12, f.len() as u32 - 12)]);
        self.kicks[1].signal();
        wait_used(&mut self.tx, 1);
    }

    fn dev_mac(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        self.dev.read_config(0, &mut m);
        m
    }

    fn ctrl(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
        let a = self.alloc(0x100);
        self.mem.write(a, &[class, command]).unwrap();
        self.mem.write(a + 0x10, data).unwrap();
        let mut bufs = vec![Buf::r(a, 2)];
        if !data.is_empty() {
            bufs.push(Buf::r(a + 0x10, data.len() as u32));
        }
        bufs.push(Buf::w(a + 0x80, 1));
        self.mem.write(a + 0x80, &[0xee]).unwrap();
        self.ctrl.add_chain(&bufs);
        self.kicks[2].signal();
        let u = wait_used(&mut self.ctrl, 1);
        assert_eq!(u[0].1, 1);
        let mut ack = [0u8];
        self.mem.read(a + 0x80, &mut ack).unwrap();
        ack[0]
    }
}

fn wait_used(d: &mut SplitDriver, n: usize) -> Vec<(u32, u32)> {
    let start = Instant::now();
    let mut v = Vec::new();
    while v.len() < n && start.elapsed() < T {
        match d.pop_used() {
            Some(u) => v.push(u),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    assert_eq!(v.len(), n, "timed out waiting for used entries");
    v
}

/// Nothing more shows up within a short while.
fn quiet(d: &mut SplitDriver) {
    std::thread::sleep(Duration::from_millis(50));
    assert!(d.pop_used().is_none());
}

#[test]
fn two_nics_exchange_frames_through_the_switch() {
    let pool = PollerPool::new(2).unwrap();
    let sw = L2Switch::new("pair", SwitchOptions::default());
    let mut a = Nic::new(sw.add_port(1).unwrap(), A, &pool, false);
    let mut b = Nic::new(sw.add_port(1).unwrap(), B, &pool, false);
    b.post_rx(4, 2048);
    a.post_rx(4, 2048);

    // A -> B, header carried along (partial checksum kept: B negotiated GUEST_CSUM).
    let h = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        csum_start: 14.into(),
        csum_offset: 2.into(),
        ..Default::default()
    };
    a.send(h, B, &[0x5a; 100]);
    let u = wait_used(&mut b.rx, 1);
    assert_eq!(u[0].1 as usize, VNET_HDR_LEN + 14 + 100);
    let mut got = vec![0u8; u[0].1 as usize];
    b.mem.read(BUFS, &mut got).unwrap();
    let gh = VirtioNetHdr::parse(&got).unwrap();
    assert_eq!(gh.flags, F_NEEDS_CSUM);
    assert_eq!(gh.num_buffers.get(), 1);
    assert_eq!(&got[12..18], &B);
    assert_eq!(&got[18..24], &A);
    assert!(got[26..].iter().all(|&x| x == 0x5a));

    // B -> A.
    b.send(VirtioNetHdr::default(), A, &[1; 60]);
    wait_used(&mut a.rx, 1);

    // B leaves promiscuous mode: a frame for another MAC (flooded) is filtered.
    assert_eq!(b.ctrl(cmd::CLASS_RX, cmd::RX_PROMISC, &[0]), cmd::OK);
    a.send(
        VirtioNetHdr::default(),
        [0x52, 0x54, 0, 0, 0, 0xc],
        &[2; 60],
    );
    a.send(VirtioNetHdr::default(), B, &[3; 60]);
    let u = wait_used(&mut b.rx, 1);
    assert_eq!(u[0].1 as usize, VNET_HDR_LEN + 14 + 60);
    assert_eq!(b.dev.stats().rx_filtered, 1);

    // Queue pairs: MQ not offered with one pair, so the command fails; unknown class too.
    assert_eq!(
        b.ctrl(cmd::CLASS_MQ, cmd::MQ_VQ_PAIRS_SET, &[1, 0]),
        cmd::ERR
    );
    assert_eq!(b.ctrl(9, 0, &[]), cmd::ERR);
    // MAC table: multicast group joins, then a multicast frame passes.
    let mut tbl = 0u32.to_le_bytes().to_vec();
    tbl.extend_from_slice(&1u32.to_le_bytes());
    tbl.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(b.ctrl(cmd::CLASS_MAC, cmd::MAC_TABLE_SET, &tbl), cmd::OK);
    a.send(VirtioNetHdr::default(), [0x33, 0x33, 0, 0, 0, 1], &[4; 60]);
    a.send(VirtioNetHdr::default(), [0x33, 0x33, 0, 0, 0, 2], &[5; 60]);
    wait_used(&mut b.rx, 1);
    quiet(&mut b.rx);
    assert_eq!(b.dev.stats().rx_filtered, 2);

    // Link down on B: A's frames are dropped at B, the guest sees nothing.
    assert!(b.dev.set_attr("link", "down").unwrap());
    let mut st = [0u8; 2];
    b.dev.read_config(6, &mut st);
    assert_eq!(st, [0, 0]);
    a.send(VirtioNetHdr::default(), B, &[6; 60]);
    quiet(&mut b.rx);
    assert_eq!(b.dev.stats().link_down_dropped, 1);
    assert!(b.dev.set_attr("link", "up").unwrap());
    assert!(!b.dev.set_attr("link", "up").unwrap());
    a.send(VirtioNetHdr::default(), B, &[7; 60]);
    wait_used(&mut b.rx, 1);

    a.eng.destroy().wait_timeout(T).unwrap();
    b.eng.destroy().wait_timeout(T).unwrap();
    let _ = (&a.kicks, &b.kicks);
}

/// A 3000-byte frame into 1024-byte mergeable buffers, and a TSO frame to a peer that did
/// not negotiate GUEST_TSO (dropped) while a partial-checksum one is finished in software.
#[test]
fn mergeable_delivery_and_offload_fallback() {
    let pool = PollerPool::new(1).unwrap();
    let sw = L2Switch::new("mrg", SwitchOptions::default());
    let mut a = Nic::new(sw.add_port(1).unwrap(), A, &pool, false);
    let mut b = Nic::new(sw.add_port(1).unwrap(), B, &pool, true);
    b.post_rx(2, 1024);
    a.send(VirtioNetHdr::default(), B, &[9; 3000]);
    // Only two buffers: the frame waits (nothing partial), then two more arrive.
    quiet(&mut b.rx);
    b.post_rx(2, 1024);
    let u = wait_used(&mut b.rx, 3);
    assert_eq!(
        u.iter().map(|x| x.1).collect::<Vec<_>>(),
        vec![1024, 1024, (VNET_HDR_LEN + 14 + 3000 - 2048) as u32]
    );
    let mut h = [0u8; 12];
    b.mem.read(BUFS, &mut h).unwrap();
    assert_eq!(VirtioNetHdr::parse(&h).unwrap().num_buffers.get(), 3);

    let tso = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: emudev_netback::hdr::gso::TCPV4,
        gso_size: 1448.into(),
        csum_start: 14.into(),
        csum_offset: 2.into(),
        ..Default::default()
    };
    a.send(tso, B, &[1; 4000]);
    let partial = VirtioNetHdr {
        gso_type: 0,
        gso_size: 0.into(),
        ..tso
    };
    a.send(partial, B, &[0; 100]);
    let u = wait_used(&mut b.rx, 1);
    assert_eq!(u[0].1 as usize, VNET_HDR_LEN + 14 + 100);
    let mut got = vec![0u8; u[0].1 as usize];
    b.mem.read(BUFS + 3 * 0x1000, &mut got).unwrap();
    assert_eq!(got[0] & F_NEEDS_CSUM, 0);
    // Sum over [csum_start..] of a frame whose payload is zeros: only the ethertype and
    // the stored checksum; it folds to 0xffff.
    let s = emudev_netback::hdr::fold(emudev_netback::hdr::ones_sum(&got[VNET_HDR_LEN + 14..]));
    assert_eq!(s, 0xffff);
    a.eng.destroy().wait_timeout(T).unwrap();
    b.eng.destroy().wait_timeout(T).unwrap();
}
