//! A burst of outgoing frames as iovecs: zero-copy views of guest buffers, or bytes copied
//! into the burst's own reusable storage when a buffer has no host mapping.

use std::ops::Range;

/// Frames to send, each a run of iovecs whose bytes are the vnet header then the frame.
/// Reused across bursts: clearing keeps the allocations.
#[derive(Debug, Default)]
pub struct TxBurst {
    iov: Vec<libc::iovec>,
    /// iovec range of each frame.
    frames: Vec<Range<usize>>,
    /// Start of the frame being built.
    open: usize,
    /// Storage for copied frames; inner buffers are reused and never shrink.
    copies: Vec<Vec<u8>>,
    copies_used: usize,
}

// SAFETY: the iovecs point either into `copies` (owned) or into memory the pusher promised
// stays valid until `clear`; nothing is thread-bound.
unsafe impl Send for TxBurst {}

impl TxBurst {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget every frame (keeps capacity).
    pub fn clear(&mut self) {
        self.iov.clear();
        self.frames.clear();
        self.open = 0;
        self.copies_used = 0;
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The iovec list of the frame being built, to append views to.
    ///
    /// # Safety
    /// Every iovec appended must describe memory readable for its full length that stays
    /// valid and mapped until [`TxBurst::clear`] (or drop).
    pub unsafe fn iovecs_mut(&mut self) -> &mut Vec<libc::iovec> {
        &mut self.iov
    }

    /// Append a copy of `data` to the frame being built.
    pub fn push_copy(&mut self, data: &[u8]) {
        if self.copies_used == self.copies.len() {
            self.copies.push(Vec::new());
        }
        let buf = &mut self.copies[self.copies_used];
        self.copies_used += 1;
        buf.clear();
        buf.extend_from_slice(data);
        // The inner Vec's heap block does not move when the outer Vec grows, and it is not
        // touched again until `clear`, so the iovec stays valid.
        self.iov.push(libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        });
    }

    /// Drop the iovecs appended since the last finished frame (a frame given up midway).
    pub fn abandon_frame(&mut self) {
        self.iov.truncate(self.open);
    }

    /// Close the frame being built (empty frames are discarded).
    pub fn end_frame(&mut self) {
        if self.iov.len() > self.open {
            self.frames.push(self.open..self.iov.len());
        }
        self.open = self.iov.len();
    }

    /// The iovecs of frame `i`.
    pub fn frame(&self, i: usize) -> &[libc::iovec] {
        self.frames
            .get(i)
            .and_then(|r| self.iov.get(r.clone()))
            .unwrap_or(&[])
    }

    /// Total bytes of frame `i` (header included).
    pub fn frame_len(&self, i: usize) -> usize {
        self.frame(i).iter().map(|v| v.iov_len).sum()
    }

    /// Copy frame `i` into `out` (replacing its contents), at most `max` bytes; returns the
    /// frame's full length.
    pub fn copy_frame(&self, i: usize, out: &mut Vec<u8>, max: usize) -> usize {
        out.clear();
        let mut total = 0;
        for v in self.frame(i) {
            total += v.iov_len;
            let room = max.saturating_sub(out.len());
            let n = v.iov_len.min(room);
            if n == 0 || v.iov_base.is_null() {
                continue;
            }
            // SAFETY: per `iovecs_mut`'s contract (or because it points into `copies`), the
            // iovec is readable for `iov_len >= n` bytes until `clear`, which needs `&mut`.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, n) };
            out.extend_from_slice(src);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_their_bytes_and_copies_survive_growth() {
        let mut b = TxBurst::new();
        let ext = [7u8; 100];
        // SAFETY: `ext` outlives the burst's use below.
        unsafe {
            b.iovecs_mut().push(libc::iovec {
                iov_base: ext.as_ptr() as *mut _,
                iov_len: 100,
            })
        };
        b.push_copy(&[1, 2, 3]);
        b.end_frame();
        b.end_frame(); // empty: ignored
        for i in 0..40u8 {
            b.push_copy(&[i; 5]);
            b.end_frame();
        }
        b.push_copy(&[9]);
        b.abandon_frame();
        b.end_frame();
        assert_eq!(b.len(), 41);
        assert_eq!(b.frame_len(0), 103);
        let mut out = Vec::new();
        assert_eq!(b.copy_frame(0, &mut out, 101), 103);
        assert_eq!(out.len(), 101);
        assert_eq!(out[100], 1);
        b.copy_frame(40, &mut out, usize::MAX);
        assert_eq!(out, vec![39u8; 5]);
        assert_eq!(b.frame_len(41), 0);
        b.clear();
        assert!(b.is_empty());
        b.push_copy(&[4, 4]);
        b.end_frame();
        b.copy_frame(0, &mut out, 10);
        assert_eq!(out, vec![4, 4]);
    }
}
