//! Control queue: RX mode, MAC table and address, announce acknowledgement, queue pairs.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use emudev::GuestMemory;
use emudev_virtio::poller::QueueHandler;
use emudev_virtio::queue::Reader;
use emudev_virtio::{DescChain, Queue};

use crate::config::feature;
use crate::shared::{NetShared, MAC_TABLE_ENTRIES};

/// Command classes and commands (virtio 1.2 §5.1.6.5).
pub mod cmd {
    pub const CLASS_RX: u8 = 0;
    pub const RX_PROMISC: u8 = 0;
    pub const RX_ALLMULTI: u8 = 1;
    pub const CLASS_MAC: u8 = 1;
    pub const MAC_TABLE_SET: u8 = 0;
    pub const MAC_ADDR_SET: u8 = 1;
    pub const CLASS_ANNOUNCE: u8 = 3;
    pub const ANNOUNCE_ACK: u8 = 0;
    pub const CLASS_MQ: u8 = 4;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
}

/// Handler of the control queue.
pub struct CtrlHandler {
    shared: Arc<NetShared>,
    features: u64,
    chain: DescChain,
}

fn read_mac(r: &mut Reader<'_>) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    r.read_exact(&mut m).ok()?;
    Some(m)
}

/// One MAC table: u32 count then count addresses. None if malformed.
fn read_table(r: &mut Reader<'_>) -> Option<(Vec<[u8; 6]>, bool)> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n).ok()?;
    let n = u32::from_le_bytes(n) as usize;
    if n.checked_mul(6)? > r.remaining() {
        return None;
    }
    let mut v = Vec::with_capacity(n.min(MAC_TABLE_ENTRIES));
    for _ in 0..n {
        let m = read_mac(r)?;
        if v.len() < MAC_TABLE_ENTRIES {
            v.push(m);
        }
    }
    Some((v, n > MAC_TABLE_ENTRIES))
}

impl CtrlHandler {
    pub fn new(shared: Arc<NetShared>, features: u64) -> Self {
        Self {
            shared,
            features,
            chain: DescChain::new(),
        }
    }

    fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// Execute one command; returns the ack byte.
    pub fn execute(&self, mem: &GuestMemory, chain: &DescChain) -> u8 {
        let mut r = chain.reader(mem);
        let mut head = [0u8; 2];
        if r.read_exact(&mut head).is_err() {
            return cmd::ERR;
        }
        let ok = match (head[0], head[1]) {
            (cmd::CLASS_RX, c @ (cmd::RX_PROMISC | cmd::RX_ALLMULTI))
                if self.has(feature::CTRL_RX) =>
            {
                let mut on = [0u8; 1];
                if r.read_exact(&mut on).is_ok() {
                    self.shared.update_filter(|f| {
                        if c == cmd::RX_PROMISC {
                            f.promisc = on[0] != 0;
                        } else {
                            f.allmulti = on[0] != 0;
                        }
                    });
                    true
                } else {
                    false
                }
            }
            (cmd::CLASS_MAC, cmd::MAC_TABLE_SET) if self.has(feature::CTRL_RX) => {
                match (read_table(&mut r), read_table(&mut r)) {
                    (Some((uni, uo)), Some((multi, mo))) => {
                        self.shared.update_filter(|f| {
                            f.uni = uni;
                            f.uni_overflow = uo;
                            f.multi = multi;
                            f.multi_overflow = mo;
                        });
                        true
                    }
                    _ => false,
                }
            }
            (cmd::CLASS_MAC, cmd::MAC_ADDR_SET) if self.has(feature::CTRL_MAC_ADDR) => {
                match read_mac(&mut r) {
                    Some(m) if m[0] & 1 == 0 => {
                        self.shared.update_filter(|f| f.mac = m);
                        self.shared.backend.set_mac(m);
                        true
                    }
                    _ => false,
                }
            }
            (cmd::CLASS_ANNOUNCE, cmd::ANNOUNCE_ACK) if self.has(feature::GUEST_ANNOUNCE) => {
                self.shared.announce.store(false, Ordering::Relaxed);
                true
            }
            (cmd::CLASS_MQ, cmd::MQ_VQ_PAIRS_SET) if self.has(feature::MQ) => {
                let mut n = [0u8; 2];
                match r.read_exact(&mut n) {
                    Ok(()) => {
                        let n = u16::from_le_bytes(n);
                        if (1..=self.shared.max_pairs).contains(&n) {
                            self.shared.active_pairs.store(n, Ordering::Relaxed);
                            if let Err(e) = self.shared.backend.set_active_pairs(n) {
                                log::warn!("virtio-net: backend refused {n} queue pairs: {e}");
                            }
                            true
                        } else {
                            false
                        }
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        self.shared
            .stats
            .ctrl_commands
            .fetch_add(1, Ordering::Relaxed);
        if ok {
            cmd::OK
        } else {
            self.shared
                .stats
                .ctrl_errors
                .fetch_add(1, Ordering::Relaxed);
            cmd::ERR
        }
    }
}

impl QueueHandler for CtrlHandler {
    fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
        let mem = q.memory().clone();
        let mut n = 0;
        while n < budget {
            match q.pop_into(&mut self.chain) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
            let ack = self.execute(&mem, &self.chain);
            // The ack is the last writable byte the driver gave (Linux: one byte).
            let mut w = self.chain.writer(&mem);
            let used = match w.write(&[ack]) {
                Ok(k) => k as u32,
                Err(_) => 0,
            };
            q.add_used(self.chain.head(), used);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev_netback::switch::{L2Switch, SwitchOptions};
    use emudev_virtio::queue::features as qf;
    use emudev_virtio::queue::testdriver::{anon_memory, Buf, SplitDriver};

    const BUF: u64 = 0x10_0000;

    struct Fixture {
        mem: Arc<GuestMemory>,
        drv: SplitDriver,
        q: Queue,
        h: CtrlHandler,
        shared: Arc<NetShared>,
        next: u64,
    }

    fn fixture(features: u64, pairs: u16) -> Fixture {
        let mem = anon_memory(0, 4 << 20);
        let drv = SplitDriver::new(mem.clone(), 0, 32);
        let q = Queue::new(drv.config(), qf::VERSION_1, mem.clone()).unwrap();
        let sw = L2Switch::new("ctrl", SwitchOptions::default());
        let port = sw.add_port(pairs).unwrap();
        let shared = Arc::new(NetShared::new(
            Arc::new(port),
            pairs,
            [0x52, 0x54, 0, 0, 0, 1],
        ));
        let h = CtrlHandler::new(shared.clone(), features);
        Fixture {
            mem,
            drv,
            q,
            h,
            shared,
            next: BUF,
        }
    }

    impl Fixture {
        /// Submit one command (header and data in separate descriptors); returns the ack.
        fn run(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
            let a = self.next;
            self.next += 0x1000;
            self.mem.write(a, &[class, command]).unwrap();
            self.mem.write(a + 0x10, data).unwrap();
            let mut bufs = vec![Buf::r(a, 2)];
            if !data.is_empty() {
                bufs.push(Buf::r(a + 0x10, data.len() as u32));
            }
            bufs.push(Buf::w(a + 0xf00, 1));
            self.drv.add_chain(&bufs);
            assert_eq!(self.h.process(&mut self.q, 8), 1);
            self.q.flush_used();
            assert_eq!(self.drv.pop_used().map(|u| u.1), Some(1));
            let mut ack = [0u8];
            self.mem.read(a + 0xf00, &mut ack).unwrap();
            ack[0]
        }

        fn filter(&self) -> crate::shared::RxFilter {
            let mut seen = 0;
            self.shared.filter_if_changed(&mut seen).unwrap()
        }
    }

    fn table(entries: u32, macs: usize) -> Vec<u8> {
        let mut v = entries.to_le_bytes().to_vec();
        for i in 0..macs {
            v.extend_from_slice(&[0x33, 0x33, 0, 0, 0, i as u8]);
        }
        v
    }

    #[test]
    fn rx_mode_mac_table_and_address() {
        let all = feature::CTRL_VQ | feature::CTRL_RX | feature::CTRL_MAC_ADDR;
        let mut f = fixture(all, 1);
        assert_eq!(f.run(cmd::CLASS_RX, cmd::RX_PROMISC, &[0]), cmd::OK);
        assert_eq!(f.run(cmd::CLASS_RX, cmd::RX_ALLMULTI, &[1]), cmd::OK);
        let fl = f.filter();
        assert!(!fl.promisc && fl.allmulti);
        // Missing data byte.
        assert_eq!(f.run(cmd::CLASS_RX, cmd::RX_PROMISC, &[]), cmd::ERR);
        // Two unicast entries, then 70 multicast ones: the second table overflows.
        let mut t = 2u32.to_le_bytes().to_vec();
        t.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
        t.extend_from_slice(&table(70, 70));
        assert_eq!(f.run(cmd::CLASS_MAC, cmd::MAC_TABLE_SET, &t), cmd::OK);
        let fl = f.filter();
        assert_eq!(fl.uni.len(), 2);
        assert!(!fl.uni_overflow);
        assert_eq!(fl.multi.len(), MAC_TABLE_ENTRIES);
        assert!(fl.multi_overflow);
        // A count larger than the data is refused and leaves the filter alone.
        let mut t = table(1000, 1);
        t.extend_from_slice(&table(0, 0));
        assert_eq!(f.run(cmd::CLASS_MAC, cmd::MAC_TABLE_SET, &t), cmd::ERR);
        assert_eq!(f.filter().uni.len(), 2);
        // Address set: unicast only.
        assert_eq!(
            f.run(cmd::CLASS_MAC, cmd::MAC_ADDR_SET, &[0x52, 0, 0, 0, 0, 9]),
            cmd::OK
        );
        assert_eq!(f.shared.mac(), [0x52, 0, 0, 0, 0, 9]);
        assert_eq!(
            f.run(cmd::CLASS_MAC, cmd::MAC_ADDR_SET, &[0x01, 0, 0, 0, 0, 9]),
            cmd::ERR
        );
        assert_eq!(f.shared.stats.ctrl_errors.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn commands_need_their_feature() {
        let mut f = fixture(feature::CTRL_VQ, 4);
        assert_eq!(f.run(cmd::CLASS_RX, cmd::RX_PROMISC, &[0]), cmd::ERR);
        assert_eq!(
            f.run(cmd::CLASS_MQ, cmd::MQ_VQ_PAIRS_SET, &[2, 0]),
            cmd::ERR
        );
        f.shared.announce.store(true, Ordering::Relaxed);
        assert_eq!(f.run(cmd::CLASS_ANNOUNCE, cmd::ANNOUNCE_ACK, &[]), cmd::ERR);
        assert!(f.shared.announce.load(Ordering::Relaxed));
        assert!(f.filter().promisc);
    }

    #[test]
    fn queue_pairs_and_announce_ack() {
        let mut f = fixture(feature::CTRL_VQ | feature::MQ | feature::GUEST_ANNOUNCE, 4);
        assert_eq!(f.run(cmd::CLASS_MQ, cmd::MQ_VQ_PAIRS_SET, &[3, 0]), cmd::OK);
        assert_eq!(f.shared.active_pairs.load(Ordering::Relaxed), 3);
        for bad in [[0u8, 0], [5, 0], [0, 1]] {
            assert_eq!(f.run(cmd::CLASS_MQ, cmd::MQ_VQ_PAIRS_SET, &bad), cmd::ERR);
        }
        assert_eq!(f.run(cmd::CLASS_MQ, cmd::MQ_VQ_PAIRS_SET, &[4]), cmd::ERR);
        assert_eq!(f.shared.active_pairs.load(Ordering::Relaxed), 3);
        f.shared.announce.store(true, Ordering::Relaxed);
        assert_eq!(f.run(cmd::CLASS_ANNOUNCE, cmd::ANNOUNCE_ACK, &[]), cmd::OK);
        assert!(!f.shared.announce.load(Ordering::Relaxed));
    }
}
