//! virtio-net on the polled vring core.
//!
//! Queue handlers: [`rx::RxHandler`] (backend frames into guest buffers, MRG_RXBUF),
//! [`tx::TxHandler`] (guest frames to the backend in zero-copy bursts) and
//! [`ctrl::CtrlHandler`] (RX mode, MAC table, announce, queue pairs). Offloads travel as
//! `virtio_net_hdr_v1` between the guest and backends (`emudev_netback`).

pub mod config;
pub mod ctrl;
pub mod device;
pub mod rx;
pub mod shared;
pub mod tx;

pub use config::{parse_mac, NetOptions};
pub use device::{open_backend, virtio_net_pci, BackendSpec, VirtioNetDevice};
