//! Block backends: where virtio-blk requests end up.
//!
//! A backend is shared by every queue of a device (`Arc<dyn BlockBackend>`), so all methods
//! take `&self` and must be safe to call concurrently. Data buffers are [`VolatileSlice`]s:
//! host views of guest memory (or of a bounce buffer) that the guest may change at any time,
//! which is why no `&[u8]` into guest memory is ever formed.

use std::io;

use vm_memory::VolatileSlice;

mod aligned;
pub mod faulty;
pub mod null;
pub mod raw;

pub use aligned::AlignedBuf;

/// Why a backend operation failed. The request engine maps [`BackendError::Unsupported`] to
/// `VIRTIO_BLK_S_UNSUPP` and everything else to `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend is read-only")]
    ReadOnly,
    #[error("range {offset:#x}+{len:#x} is beyond the backend size {size:#x}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("unexpected end of file at {offset:#x}")]
    UnexpectedEof { offset: u64 },
    #[error("{op} at {offset:#x}+{len:#x} is not aligned to {align} for direct I/O")]
    Unaligned {
        op: &'static str,
        offset: u64,
        len: u64,
        align: usize,
    },
    #[error("operation not supported by the backend")]
    Unsupported,
    #[error("{op} at {offset:#x}+{len:#x}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

impl BackendError {
    /// An I/O error with context.
    pub fn io(op: &'static str, offset: u64, len: u64, source: io::Error) -> Self {
        Self::Io {
            op,
            offset,
            len,
            source,
        }
    }
}

/// Result of backend operations.
pub type BackendResult<T> = Result<T, BackendError>;

/// A block device the virtio-blk engine reads and writes.
///
/// Offsets and lengths are in bytes. The engine only issues ranges inside `size()` whose offset
/// and length are multiples of 512, but backends re-check the range themselves.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// True when the backend refuses writes (opened read-only).
    fn read_only(&self) -> bool;

    /// Device id string for GET_ID (at most 20 bytes are used).
    fn id(&self) -> &[u8];

    /// Whether `discard` can deallocate (and so whether WRITE_ZEROES may unmap).
    fn supports_discard(&self) -> bool {
        false
    }

    /// Fill `bufs` in order with the bytes at `offset`. Either everything is read or an error
    /// is returned (a short read at end of file is an error).
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BackendResult<()>;

    /// Write `bufs` in order at `offset`; all or error.
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BackendResult<()>;

    /// Make every completed write durable.
    fn flush(&self) -> BackendResult<()>;

    /// Deallocate a range (advisory: may do nothing; reads afterwards are unspecified).
    fn discard(&self, offset: u64, len: u64) -> BackendResult<()>;

    /// Make a range read as zeroes, deallocating it if `may_unmap` and possible.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BackendResult<()>;
}

/// Total length of `bufs`; None on overflow.
pub fn total_len(bufs: &[VolatileSlice<'_>]) -> Option<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, b| acc.checked_add(b.len() as u64))
}

/// Check `[offset, offset+len)` against `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> BackendResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len, size }),
    }
}

/// Encode an id string the way GET_ID returns it: at most 20 bytes, NUL-padded by the caller.
pub fn make_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    b[..b.len().min(crate::config::ID_BYTES)].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_catch_overflow_and_past_end() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 0, 512).is_ok());
        assert!(matches!(
            check_range(512, 1, 512),
            Err(BackendError::OutOfRange { .. })
        ));
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
        assert_eq!(make_id("0123456789abcdefghijXYZ").len(), 20);
        assert_eq!(make_id("disk"), b"disk");
    }
}
