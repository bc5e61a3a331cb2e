//! DMA regions the client mapped, and the port that reaches fd-less client memory.

use std::sync::Arc;

use vm_memory::MmapRegion;

/// One DMA mapping as the client declared it.
#[derive(Debug, Clone)]
pub struct DmaRegion {
    /// I/O virtual address (guest physical address for QEMU without a vIOMMU).
    pub iova: u64,
    pub size: u64,
    /// `wire::dma_flags` READ / WRITE: what the *device* may do.
    pub prot: u32,
    /// Host mapping when the client passed an fd; `None` means reach it through `DmaPort`.
    /// After a partial unmap split a region, several pieces share one mapping.
    pub mapping: Option<Arc<MmapRegion>>,
    /// Offset of `iova` inside `mapping` (0 unless the region is a piece of a split one).
    pub map_offset: u64,
}

impl DmaRegion {
    /// One past the last address; `iova + size` never overflows for a region in a table.
    pub fn end(&self) -> u64 {
        self.iova + self.size
    }
    pub fn readable(&self) -> bool {
        self.prot & crate::wire::dma_flags::READ != 0
    }
    pub fn writable(&self) -> bool {
        self.prot & crate::wire::dma_flags::WRITE != 0
    }
}

/// Why a message-based DMA transfer failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DmaError {
    #[error("no client is attached")]
    Disconnected,
    #[error("client answered DMA at {addr:#x}+{len:#x} with errno {errno}")]
    Refused { addr: u64, len: u64, errno: u32 },
    #[error("client did not answer DMA at {addr:#x}+{len:#x} in time")]
    Timeout { addr: u64, len: u64 },
    #[error("malformed DMA reply: {0}")]
    BadReply(&'static str),
    #[error("DMA through messages from the event-loop thread would deadlock")]
    WouldDeadlock,
}

/// Something that can move bytes to and from client memory by messages.
pub trait DmaTransport: Send + Sync {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError>;
}

/// Cloneable handle to client memory reached by DMA_READ / DMA_WRITE messages.
/// Transfers are split to the negotiated `max_data_xfer_size` by the transport.
#[derive(Clone)]
pub struct DmaPort {
    inner: Arc<dyn DmaTransport>,
}

impl std::fmt::Debug for DmaPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DmaPort")
    }
}

impl DmaPort {
    pub fn new(inner: Arc<dyn DmaTransport>) -> Self {
        Self { inner }
    }
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.inner.read(addr, buf)
    }
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.inner.write(addr, data)
    }
}
