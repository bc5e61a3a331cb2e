//! State shared by a device's control thread and its queue handlers on poller threads:
//! link and announce status, active queue pairs, the receive filter, and counters.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use emudev_netback::NetBackend;

/// Entries per MAC table (as QEMU); more sets the table's overflow flag (accept all).
pub const MAC_TABLE_ENTRIES: usize = 64;

/// Which destination MACs the receive path accepts (CTRL_RX / CTRL_MAC state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    pub mac: [u8; 6],
    pub promisc: bool,
    pub allmulti: bool,
    pub uni: Vec<[u8; 6]>,
    pub multi: Vec<[u8; 6]>,
    pub uni_overflow: bool,
    pub multi_overflow: bool,
}

impl RxFilter {
    /// The state after reset: promiscuous, as QEMU (a driver without CTRL_RX gets all).
    pub fn new(mac: [u8; 6]) -> Self {
        Self {
            mac,
            promisc: true,
            allmulti: false,
            uni: Vec::new(),
            multi: Vec::new(),
            uni_overflow: false,
            multi_overflow: false,
        }
    }

    /// Whether a frame to `dst` is delivered.
    pub fn accepts(&self, dst: &[u8; 6]) -> bool {
        if self.promisc {
            return true;
        }
        if dst[0] & 1 != 0 {
            *dst == [0xff; 6] || self.allmulti || self.multi_overflow || self.multi.contains(dst)
        } else {
            *dst == self.mac || self.uni_overflow || self.uni.contains(dst)
        }
    }
}

/// Device-wide counters.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Dropped by the MAC filter.
    pub rx_filtered: AtomicU64,
    /// Dropped: no guest buffer big enough (without MRG_RXBUF), or malformed frame.
    pub rx_dropped: AtomicU64,
    /// Dropped: an offload the driver did not negotiate (segmentation).
    pub rx_offload_dropped: AtomicU64,
    /// Dropped while the link was down (both directions).
    pub link_down_dropped: AtomicU64,
    /// TX chains too short, too long or unreadable.
    pub tx_malformed: AtomicU64,
    /// TX frames the backend refused.
    pub tx_dropped: AtomicU64,
    pub ctrl_commands: AtomicU64,
    pub ctrl_errors: AtomicU64,
    /// Guest memory faults while writing received frames.
    pub rx_faults: AtomicU64,
}

/// A plain copy of [`NetStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStatsSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_filtered: u64,
    pub rx_dropped: u64,
    pub rx_offload_dropped: u64,
    pub link_down_dropped: u64,
    pub tx_malformed: u64,
    pub tx_dropped: u64,
    pub ctrl_commands: u64,
    pub ctrl_errors: u64,
    pub rx_faults: u64,
}

impl NetStats {
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStatsSnapshot {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            rx_filtered: l(&self.rx_filtered),
            rx_dropped: l(&self.rx_dropped),
            rx_offload_dropped: l(&self.rx_offload_dropped),
            link_down_dropped: l(&self.link_down_dropped),
            tx_malformed: l(&self.tx_malformed),
            tx_dropped: l(&self.tx_dropped),
            ctrl_commands: l(&self.ctrl_commands),
            ctrl_errors: l(&self.ctrl_errors),
            rx_faults: l(&self.rx_faults),
        }
    }

    /// (name, value) pairs for management interfaces.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        let s = self.snapshot();
        vec![
            ("rx_frames", s.rx_frames),
            ("rx_bytes", s.rx_bytes),
            ("tx_frames", s.tx_frames),
            ("tx_bytes", s.tx_bytes),
            ("rx_filtered", s.rx_filtered),
            ("rx_dropped", s.rx_dropped),
            ("rx_offload_dropped", s.rx_offload_dropped),
            ("link_down_dropped", s.link_down_dropped),
            ("tx_malformed", s.tx_malformed),
            ("tx_dropped", s.tx_dropped),
            ("ctrl_commands", s.ctrl_commands),
            ("ctrl_errors", s.ctrl_errors),
            ("rx_faults", s.rx_faults),
        ]
    }
}

/// Add to a shared counter once per burst.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    if n > 0 {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Everything the queue handlers of one device share.
pub struct NetShared {
    pub backend: Arc<dyn NetBackend>,
    pub max_pairs: u16,
    pub link_up: AtomicBool,
    pub announce: AtomicBool,
    pub active_pairs: AtomicU16,
    filter: Mutex<RxFilter>,
    /// Bumped on every filter change; handlers re-read the filter when it moves.
    filter_gen: AtomicU64,
    pub stats: NetStats,
}

impl NetShared {
    pub fn new(backend: Arc<dyn NetBackend>, max_pairs: u16, mac: [u8; 6]) -> Self {
        Self {
            backend,
            max_pairs,
            link_up: AtomicBool::new(true),
            announce: AtomicBool::new(false),
            active_pairs: AtomicU16::new(1),
            filter: Mutex::new(RxFilter::new(mac)),
            filter_gen: AtomicU64::new(1),
            stats: NetStats::default(),
        }
    }

    /// Change the filter.
    pub fn update_filter(&self, f: impl FnOnce(&mut RxFilter)) {
        let mut g = self.filter.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
        self.filter_gen.fetch_add(1, Ordering::Release);
    }

    /// A copy of the filter if it changed since `seen` (then `seen` is updated).
    pub fn filter_if_changed(&self, seen: &mut u64) -> Option<RxFilter> {
        let g = self.filter_gen.load(Ordering::Acquire);
        if g == *seen {
            return None;
        }
        let f = self
            .filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *seen = g;
        Some(f)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.filter.lock().unwrap_or_else(|p| p.into_inner()).mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_modes() {
        let me = [0x52, 0x54, 0, 0, 0, 1];
        let other = [0x52, 0x54, 0, 0, 0, 2];
        let mcast = [0x33, 0x33, 0, 0, 0, 1];
        let mut f = RxFilter::new(me);
        assert!(f.accepts(&other));
        f.promisc = false;
        assert!(f.accepts(&me));
        assert!(!f.accepts(&other));
        assert!(f.accepts(&[0xff; 6]));
        assert!(!f.accepts(&mcast));
        f.multi.push(mcast);
        assert!(f.accepts(&mcast));
        assert!(!f.accepts(&[0x01, 0, 0x5e, 0, 0, 1]));
        f.allmulti = true;
        assert!(f.accepts(&[0x01, 0, 0x5e, 0, 0, 1]));
        f.uni.push(other);
        assert!(f.accepts(&other));
        f.uni.clear();
        f.uni_overflow = true;
        assert!(f.accepts(&[0x02, 0, 0, 0, 0, 9]));
    }
}
