//! Fault injection for tests: wraps a backend and fails operations after a number of
//! successful ones, so that tests can check the device reports IOERR instead of losing data.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::VolatileSlice;

use super::{BackendError, BackendResult, BlockBackend};

/// Which operations a [`FaultyBackend`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Number of mutating operations (write, flush, discard, write-zeroes) that succeed
    /// before the failures start.
    pub ok_writes: u64,
    /// Also fail reads once failing.
    pub fail_reads: bool,
    /// errno of the injected failure (e.g. ENOSPC, EIO).
    pub errno: i32,
}

impl FaultPlan {
    /// Fail every mutating op after `n` successes with `errno`.
    pub fn writes_after(n: u64, errno: i32) -> Self {
        Self {
            ok_writes: n,
            fail_reads: false,
            errno,
        }
    }
}

/// A backend that injects failures according to a [`FaultPlan`].
pub struct FaultyBackend {
    inner: Arc<dyn BlockBackend>,
    plan: FaultPlan,
    writes: AtomicU64,
    injected: AtomicU64,
}

impl FaultyBackend {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn BlockBackend>, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan,
            writes: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Number of failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn failing(&self) -> bool {
        self.writes.load(Ordering::Relaxed) >= self.plan.ok_writes
    }

    fn fail(&self, op: &'static str, offset: u64, len: u64) -> BackendError {
        self.injected.fetch_add(1, Ordering::Relaxed);
        BackendError::io(
            op,
            offset,
            len,
            io::Error::from_raw_os_error(self.plan.errno),
        )
    }

    fn mutate(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> BackendResult<()>,
    ) -> BackendResult<()> {
        if self.writes.fetch_add(1, Ordering::Relaxed) >= self.plan.ok_writes {
            return Err(self.fail(op, offset, len));
        }
        f()
    }
}

impl BlockBackend for FaultyBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn id(&self) -> &[u8] {
        self.inner.id()
    }

    fn supports_discard(&self) -> bool {
        self.inner.supports_discard()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BackendResult<()> {
        if self.plan.fail_reads && self.failing() {
            return Err(self.fail("read", offset, 0));
        }
        self.inner.read_vectored(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BackendResult<()> {
        self.mutate("write", offset, 0, || {
            self.inner.write_vectored(offset, bufs)
        })
    }

    fn flush(&self) -> BackendResult<()> {
        self.mutate("flush", 0, 0, || self.inner.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.mutate("discard", offset, len, || self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BackendResult<()> {
        self.mutate("write zeroes", offset, len, || {
            self.inner.write_zeroes(offset, len, may_unmap)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::null::NullBackend;

    #[test]
    fn fails_after_n_mutations_and_counts() {
        let f = FaultyBackend::new(
            Arc::new(NullBackend::new(1 << 20)),
            FaultPlan::writes_after(2, libc::ENOSPC),
        );
        let mut b = vec![0u8; 512];
        assert!(f
            .write_vectored(0, &[VolatileSlice::from(&mut b[..])])
            .is_ok());
        assert!(f.flush().is_ok());
        match f.write_vectored(0, &[VolatileSlice::from(&mut b[..])]) {
            Err(BackendError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC))
            }
            other => panic!("expected injected ENOSPC, got {other:?}"),
        }
        assert!(f.flush().is_err());
        // Reads still work unless asked to fail.
        assert!(f
            .read_vectored(0, &[VolatileSlice::from(&mut b[..])])
            .is_ok());
        assert_eq!(f.injected(), 2);
    }
}
