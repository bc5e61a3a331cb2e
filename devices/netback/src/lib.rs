//! Network backends shared by every emulated NIC (virtio-net, the AVF NIC).
//!
//! A backend carries Ethernet frames, each prefixed by a 12-byte `virtio_net_hdr_v1` that
//! describes checksum and segmentation offloads ([`hdr`]). Frames leave a NIC in bursts
//! ([`TxBurst`], zero-copy iovecs into guest memory) and arrive one at a time through a sink
//! callback, so a backend can hand over its own buffer without another copy. Every receive
//! queue exposes an fd the NIC's poller sleeps on ([`NetRx::wake_fd`]).
//!
//! Backends: [`tap::Tap`] (kernel tap, IFF_VNET_HDR, multiqueue) and [`switch::L2Switch`]
//! (in-process learning switch, one port per NIC).

pub mod burst;
pub mod gso;
pub mod hdr;
pub mod switch;
pub mod tap;

use std::os::fd::RawFd;

pub use burst::TxBurst;
pub use hdr::{Offloads, VirtioNetHdr, VNET_HDR_LEN};

/// Largest frame a backend carries: a 64 KiB GSO packet plus Ethernet and VLAN headers, plus
/// the vnet header.
pub const MAX_FRAME_LEN: usize = 65_536 + 14 + 4 + VNET_HDR_LEN;

/// Why a backend operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap {name}: {op} failed: {source}")]
    Tap {
        name: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    TapName(String),
    #[error("queue pair {pair} out of range (backend has {pairs})")]
    NoSuchQueue { pair: u16, pairs: u16 },
    #[error("switch {switch}: {reason}")]
    Switch { switch: String, reason: String },
    #[error("backend I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What the receiver does with a frame offered by [`NetRx::recv_burst`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxVerdict {
    /// Consumed (delivered or dropped): offer the next one.
    Taken,
    /// No room now: keep this frame for the next call and stop the burst.
    NoRoom,
}

/// A backend shared by the queues of one NIC.
pub trait NetBackend: Send + Sync {
    /// Short description for logs ("tap:tap0", "switch:sw0/port1").
    fn describe(&self) -> String;

    /// Queue pairs the backend can carry.
    fn max_queue_pairs(&self) -> u16;

    /// The receive half of queue pair `pair` (may be called again after a queue restart).
    fn rx(&self, pair: u16) -> Result<Box<dyn NetRx>, NetError>;

    /// The transmit half of queue pair `pair`.
    fn tx(&self, pair: u16) -> Result<Box<dyn NetTx>, NetError>;

    /// Offloads the receiving NIC accepts (what may appear in received headers). Backends
    /// that cannot honour a subset fall back to delivering finished frames.
    fn set_rx_offloads(&self, _offloads: Offloads) -> Result<(), NetError> {
        Ok(())
    }

    /// The NIC's driver uses `pairs` queue pairs now; receive traffic goes only to those.
    fn set_active_pairs(&self, _pairs: u16) -> Result<(), NetError> {
        Ok(())
    }

    /// The NIC's unicast MAC address (the switch learns it ahead of traffic).
    fn set_mac(&self, _mac: [u8; 6]) {}
}

/// Receive half of one queue pair. Used by one poller thread at a time.
pub trait NetRx: Send {
    /// Offer up to `max` frames (vnet header first) to `sink`, stopping early when it
    /// answers [`RxVerdict::NoRoom`] (that frame is offered again next time) or when the
    /// backend has nothing more. Returns the frames taken. Never blocks.
    fn recv_burst(
        &mut self,
        max: usize,
        sink: &mut dyn FnMut(&[u8]) -> RxVerdict,
    ) -> Result<usize, NetError>;

    /// Readable when frames may be waiting; the poller adds it to its sleep set.
    fn wake_fd(&self) -> Option<RawFd>;
}

/// Transmit half of one queue pair. Used by one poller thread at a time.
pub trait NetTx: Send {
    /// Send every frame of `burst`. Returns how many were sent; the rest were dropped
    /// (backend full or frame refused) and counted by the backend.
    fn send_burst(&mut self, burst: &TxBurst) -> Result<usize, NetError>;
}
