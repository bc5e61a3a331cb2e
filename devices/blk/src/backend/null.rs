//! A backend that stores nothing: reads return zeroes, writes are dropped. For benchmarks of
//! the request path without storage cost.

use vm_memory::VolatileSlice;

use super::{check_range, make_id, total_len, BackendError, BackendResult, BlockBackend};

/// The null backend.
#[derive(Debug, Clone)]
pub struct NullBackend {
    size: u64,
    read_only: bool,
    id: Vec<u8>,
}

impl NullBackend {
    /// A writable null disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            read_only: false,
            id: make_id("emudev-null"),
        }
    }

    /// Same, refusing writes.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Set the GET_ID string.
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = make_id(id);
        self
    }

    fn check(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BackendResult<()> {
        let len = total_len(bufs).ok_or(BackendError::OutOfRange {
            offset,
            len: u64::MAX,
            size: self.size,
        })?;
        check_range(offset, len, self.size)
    }
}

impl BlockBackend for NullBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> &[u8] {
        &self.id
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BackendResult<()> {
        self.check(offset, bufs)?;
        for b in bufs {
            let g = b.ptr_guard_mut();
            // A plain byte fill: VolatileSlice::copy_from would do it with slow volatile word
            // stores. Guest memory may be accessed concurrently by the guest; a byte fill
            // tolerates that exactly like a device DMA or the kernel's copy in preadv.
            // SAFETY: the guard's pointer is valid for `g.len()` writable bytes while the
            // VolatileSlice (borrowed for this call) and the guard live.
            unsafe { std::ptr::write_bytes(g.as_ptr(), 0, g.len()) };
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BackendResult<()> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        self.check(offset, bufs)
    }

    fn flush(&self) -> BackendResult<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> BackendResult<()> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BackendResult<()> {
        self.discard(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_zero_fill_and_bounds_are_checked() {
        let b = NullBackend::new(16384);
        let mut buf = vec![0xaau8; 10000];
        b.read_vectored(0, &[VolatileSlice::from(&mut buf[..])])
            .unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        let mut buf = vec![0u8; 512];
        assert!(matches!(
            b.read_vectored(16384, &[VolatileSlice::from(&mut buf[..])]),
            Err(BackendError::OutOfRange { .. })
        ));
        let ro = NullBackend::new(4096).read_only(true);
        assert!(matches!(
            ro.write_vectored(0, &[VolatileSlice::from(&mut buf[..])]),
            Err(BackendError::ReadOnly)
        ));
    }
}
