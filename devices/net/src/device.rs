//! virtio-net as a [`VirtioDeviceType`]: identity, features, configuration space, link and
//! announce attributes, and an engine whose queue handlers run on a shared [`PollerPool`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use emudev::device::DeviceError;
use emudev_netback::switch::L2Switch;
use emudev_netback::tap::Tap;
use emudev_netback::{NetBackend, NetError, Offloads};
use emudev_virtio::pci::{VirtioDeviceType, VirtioPciDevice};
use emudev_virtio::poller::{PollerPool, QueueHandler};
use emudev_virtio::{Engine, Queue};
use zerocopy::IntoBytes;

use crate::config::{
    feature, format_mac, NetConfigSpace, NetOptions, CONFIG_LEN, MAX_QUEUE_PAIRS, STATUS_ANNOUNCE,
    STATUS_LINK_UP,
};
use crate::ctrl::CtrlHandler;
use crate::rx::RxHandler;
use crate::shared::{NetShared, NetStatsSnapshot, RxFilter};
use crate::tx::TxHandler;

/// Virtio device id of a network device.
pub const VIRTIO_ID_NET: u16 = 1;
/// PCI class: network controller, Ethernet.
pub const NET_CLASS_CODE: u32 = 0x02_0000;

/// A virtio-net device model.
pub struct VirtioNetDevice {
    opts: NetOptions,
    pairs: u16,
    shared: Arc<NetShared>,
    pool: Arc<PollerPool>,
    acked: u64,
}

impl std::fmt::Debug for VirtioNetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNetDevice")
            .field("opts", &self.opts)
            .field("backend", &self.shared.backend.describe())
            .finish_non_exhaustive()
    }
}

/// Does nothing: stands in for a queue whose backend half could not be opened. TX chains
/// are completed (and so dropped); RX buffers stay with the guest.
struct DeadQueue {
    rx: bool,
}

impl QueueHandler for DeadQueue {
    fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
        if self.rx {
            return 0;
        }
        let mut n = 0;
        while n < budget {
            match q.pop() {
                Ok(Some(c)) => q.add_used(c.head(), 0),
                _ => break,
            }
            n += 1;
        }
        n
    }
}

impl VirtioNetDevice {
    /// A device on `backend`, its queues run by `pool`.
    pub fn new(backend: Arc<dyn NetBackend>, opts: NetOptions, pool: Arc<PollerPool>) -> Self {
        let pairs = opts
            .queue_pairs
            .clamp(1, MAX_QUEUE_PAIRS)
            .min(backend.max_queue_pairs().max(1));
        backend.set_mac(opts.mac);
        let shared = Arc::new(NetShared::new(backend, pairs, opts.mac));
        Self {
            opts,
            pairs,
            shared,
            pool,
            acked: 0,
        }
    }

    /// Queue pairs offered.
    pub fn queue_pairs(&self) -> u16 {
        self.pairs
    }

    pub fn stats(&self) -> NetStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Named counters for management interfaces.
    pub fn named_stats(&self) -> Vec<(&'static str, u64)> {
        self.shared.stats.named()
    }

    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::Relaxed)
    }

    /// Set the link state; true if it changed (the caller raises a config interrupt, as
    /// `set_attr("link", ..)` through the transport does).
    pub fn set_link(&mut self, up: bool) -> bool {
        self.shared.link_up.swap(up, Ordering::Relaxed) != up
    }

    fn config_space(&self) -> NetConfigSpace {
        let mut status = 0;
        if self.shared.link_up.load(Ordering::Relaxed) {
            status |= STATUS_LINK_UP;
        }
        if self.shared.announce.load(Ordering::Relaxed) {
            status |= STATUS_ANNOUNCE;
        }
        NetConfigSpace {
            mac: self.opts.mac,
            status: status.into(),
            max_virtqueue_pairs: self.pairs.into(),
            mtu: self.opts.mtu.unwrap_or(1500).into(),
        }
    }
}

/// Receive offloads a driver with `features` takes.
pub fn rx_offloads(features: u64) -> Offloads {
    let mut o = Offloads::empty();
    if features & feature::GUEST_CSUM != 0 {
        o |= Offloads::CSUM;
    }
    if features & feature::GUEST_TSO4 != 0 {
        o |= Offloads::TSO4;
    }
    if features & feature::GUEST_TSO6 != 0 {
        o |= Offloads::TSO6;
    }
    if features & feature::GUEST_ECN != 0 {
        o |= Offloads::TSO_ECN;
    }
    o.normalized()
}

/// Index of the control queue for a driver with `features` and a device with `pairs`.
pub fn ctrl_queue_index(features: u64, pairs: u16) -> u16 {
    if features & feature::MQ != 0 {
        2 * pairs
    } else {
        2
    }
}

impl VirtioDeviceType for VirtioNetDevice {
    fn device_id(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn class_code(&self) -> u32 {
        NET_CLASS_CODE
    }

    fn features(&self) -> u64 {
        let mut f = feature::MAC
            | feature::STATUS
            | feature::CTRL_VQ
            | feature::CTRL_RX
            | feature::GUEST_ANNOUNCE
            | feature::CTRL_MAC_ADDR
            | self.opts.ring_features;
        if self.opts.mrg_rxbuf {
            f |= feature::MRG_RXBUF;
        }
        if self.opts.offloads {
            f |= feature::OFFLOADS;
        }
        if self.opts.mtu.is_some() {
            f |= feature::MTU;
        }
        if self.pairs > 1 {
            f |= feature::MQ;
        }
        f
    }

    fn features_ok(&mut self, f: u64) -> bool {
        let needs = |bit: u64, req: u64| f & bit == 0 || f & req == req;
        let valid = needs(
            feature::GUEST_TSO4 | feature::GUEST_TSO6,
            feature::GUEST_CSUM,
        ) && needs(feature::HOST_TSO4 | feature::HOST_TSO6, feature::CSUM)
            && needs(feature::GUEST_ECN, feature::GUEST_CSUM)
            && needs(feature::HOST_ECN, feature::CSUM)
            && needs(
                feature::MQ | feature::CTRL_RX | feature::GUEST_ANNOUNCE | feature::CTRL_MAC_ADDR,
                feature::CTRL_VQ,
            );
        if !valid {
            return false;
        }
        self.acked = f;
        if let Err(e) = self.shared.backend.set_rx_offloads(rx_offloads(f)) {
            log::error!("virtio-net: backend refused the guest's offloads: {e}");
            return false;
        }
        true
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.opts.queue_size; usize::from(self.pairs) * 2 + 1]
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_space();
        let b = c.as_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
        let end = start.saturating_add(data.len()).min(b.len());
        data[..end - start].copy_from_slice(&b[start..end]);
        data[end - start..].fill(0);
    }

    fn create_engine(&mut self) -> Result<Box<dyn Engine>, DeviceError> {
        let shared = self.shared.clone();
        let pairs = self.pairs;
        let factory = Box::new(move |qidx: u16, q: &Queue| -> Box<dyn QueueHandler> {
            let f = q.features();
            if f & feature::CTRL_VQ != 0 && qidx == ctrl_queue_index(f, pairs) {
                return Box::new(CtrlHandler::new(shared.clone(), f));
            }
            let pair = qidx / 2;
            let backend = &shared.backend;
            if qidx % 2 == 0 {
                match backend.rx(pair) {
                    Ok(rx) => Box::new(RxHandler::new(
                        rx,
                        shared.clone(),
                        f & feature::MRG_RXBUF != 0,
                        rx_offloads(f),
                    )),
                    Err(e) => {
                        log::error!("virtio-net: rx queue {pair}: {e}");
                        Box::new(DeadQueue { rx: true })
                    }
                }
            } else {
                match backend.tx(pair) {
                    Ok(tx) => Box::new(TxHandler::new(tx, shared.clone())),
                    Err(e) => {
                        log::error!("virtio-net: tx queue {pair}: {e}");
                        Box::new(DeadQueue { rx: false })
                    }
                }
            }
        });
        Ok(Box::new(self.pool.engine(factory)))
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.shared.active_pairs.store(1, Ordering::Relaxed);
        self.shared.announce.store(false, Ordering::Relaxed);
        let mac = self.opts.mac;
        self.shared.update_filter(|f| *f = RxFilter::new(mac));
        self.shared.backend.set_mac(mac);
        if let Err(e) = self.shared.backend.set_active_pairs(1) {
            log::warn!("virtio-net: backend reset to one queue pair failed: {e}");
        }
    }

    fn attr(&self, key: &str) -> Option<String> {
        Some(match key {
            "link" => if self.link_up() { "up" } else { "down" }.to_string(),
            "mac" => format_mac(&self.shared.mac()),
            "queue_pairs" => self.pairs.to_string(),
            "active_pairs" => self.shared.active_pairs.load(Ordering::Relaxed).to_string(),
            "backend" => self.shared.backend.describe(),
            "features" => format!("{:#x}", self.acked),
            _ => {
                return self
                    .named_stats()
                    .into_iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            }
        })
    }

    fn set_attr(&mut self, key: &str, value: &str) -> Result<bool, DeviceError> {
        let invalid = |reason: &str| DeviceError::InvalidAttribute {
            device: "virtio-net".into(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        match key {
            "link" => {
                let up = match value {
                    "up" | "on" | "1" => true,
                    "down" | "off" | "0" => false,
                    _ => return Err(invalid("expected up or down")),
                };
                Ok(self.set_link(up))
            }
            "announce" => {
                if self.acked & feature::GUEST_ANNOUNCE == 0 {
                    return Err(invalid("the driver did not negotiate GUEST_ANNOUNCE"));
                }
                Ok(!self.shared.announce.swap(true, Ordering::Relaxed))
            }
            _ => Err(DeviceError::UnknownAttribute {
                device: "virtio-net".into(),
                key: key.to_string(),
            }),
        }
    }
}

/// Which backend a device uses (the daemon's `backend=` choice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A kernel tap, opened or created by name.
    Tap { ifname: String },
    /// A port on the process-wide in-process switch of this name.
    Switch { name: String },
}

/// Open the backend for a device with `queue_pairs` queue pairs.
pub fn open_backend(spec: &BackendSpec, queue_pairs: u16) -> Result<Arc<dyn NetBackend>, NetError> {
    Ok(match spec {
        BackendSpec::Tap { ifname } => Arc::new(Tap::open(ifname, queue_pairs)?),
        BackendSpec::Switch { name } => Arc::new(L2Switch::named(name).add_port(queue_pairs)?),
    })
}

/// Build a virtio-net PCI function named `name` (the daemon's constructor).
pub fn virtio_net_pci(
    name: &str,
    backend: &BackendSpec,
    opts: NetOptions,
    pool: &Arc<PollerPool>,
) -> Result<VirtioPciDevice<VirtioNetDevice>, String> {
    let b = open_backend(backend, opts.queue_pairs).map_err(|e| e.to_string())?;
    let dev = VirtioNetDevice::new(b, opts, pool.clone());
    VirtioPciDevice::new(name, dev).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev_netback::switch::SwitchOptions;

    fn device(pairs: u16, backend_pairs: u16) -> VirtioNetDevice {
        let sw = L2Switch::new("dev", SwitchOptions::default());
        let port = sw.add_port(backend_pairs).unwrap();
        let opts = NetOptions {
            queue_pairs: pairs,
            mtu: Some(9000),
            ..NetOptions::default()
        };
        VirtioNetDevice::new(Arc::new(port), opts, PollerPool::new(1).unwrap())
    }

    #[test]
    fn queues_features_and_config_follow_the_options() {
        let d = device(4, 2);
        // Capped by the backend's pairs: 2 pairs + control queue.
        assert_eq!(d.queue_pairs(), 2);
        assert_eq!(d.queue_max_sizes().len(), 5);
        let f = d.features();
        for bit in [
            feature::MQ,
            feature::MTU,
            feature::MRG_RXBUF,
            feature::HOST_TSO4,
        ] {
            assert_ne!(f & bit, 0);
        }
        let mut c = [0u8; CONFIG_LEN];
        d.read_config(0, &mut c);
        assert_eq!(&c[..6], &NetOptions::default().mac);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), STATUS_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
        // A read past the end is zero-filled, not a panic.
        let mut tail = [0xffu8; 4];
        d.read_config(10, &mut tail);
        assert_eq!(tail, [0x28, 0x23, 0, 0]);
        assert!(device(1, 1).features() & feature::MQ == 0);
        assert_eq!(ctrl_queue_index(feature::MQ, 2), 4);
        assert_eq!(ctrl_queue_index(0, 2), 2);
    }

    #[test]
    fn features_ok_enforces_dependencies_and_attrs_work() {
        let mut d = device(1, 1);
        assert!(!d.features_ok(feature::GUEST_TSO4));
        assert!(!d.features_ok(feature::HOST_TSO6));
        assert!(!d.features_ok(feature::CTRL_RX));
        assert!(d.features_ok(feature::GUEST_CSUM | feature::GUEST_TSO4));
        assert_eq!(
            rx_offloads(feature::GUEST_CSUM | feature::GUEST_TSO4 | feature::GUEST_ECN),
            Offloads::CSUM | Offloads::TSO4 | Offloads::TSO_ECN
        );
        // Announce needs the feature.
        assert!(d.set_attr("announce", "1").is_err());
        assert!(d.features_ok(feature::CTRL_VQ | feature::GUEST_ANNOUNCE));
        assert!(d.set_attr("announce", "1").unwrap());
        let mut st = [0u8; 2];
        d.read_config(6, &mut st);
        assert_eq!(u16::from_le_bytes(st), STATUS_LINK_UP | STATUS_ANNOUNCE);
        assert!(d.set_attr("link", "sideways").is_err());
        assert!(d.set_attr("link", "down").unwrap());
        assert_eq!(d.attr("link").as_deref(), Some("down"));
        assert!(d.set_attr("speed", "1").is_err());
        d.reset();
        d.read_config(6, &mut st);
        assert_eq!(u16::from_le_bytes(st), 0);
        assert_eq!(d.attr("rx_frames").as_deref(), Some("0"));
    }
}
