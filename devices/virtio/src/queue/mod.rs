//! Split and packed virtqueues, device side, built for burst polling.
//!
//! A [`Queue`] is started from a [`QueueConfig`], the negotiated features and a guest-memory
//! snapshot. Ring areas are validated and translated once per start (host pointers when the
//! memory is fd-backed, message copies otherwise). `pop` walks one chain with every index,
//! length and loop bounded; `add_used` stages a completion and `flush_used` publishes the
//! whole burst with one index store and decides whether the driver wants an interrupt.
//!
//! Errors that mean the driver broke the ring ([`QueueError`]) stick: the queue refuses further
//! work and the owner should stop it and set DEVICE_NEEDS_RESET.

mod chain;
mod packed;
mod ring;
mod split;
#[cfg(any(test, feature = "test-utils"))]
pub mod testdriver;

use std::sync::Arc;

use emudev::{GuestMemory, MemError};
use emudev_vfio_user::DmaError;

pub use chain::{ChainError, DescChain, Reader, Segment, Writer, INLINE_SEGMENTS};

use packed::PackedRing;
use split::SplitRing;

/// Feature bits the queue core understands.
pub mod features {
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_PACKED: u64 = 1 << 34;
}

/// Descriptor flags (split layout; packed adds AVAIL/USED).
pub(crate) mod desc_flags {
    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;
    pub const INDIRECT: u16 = 4;
    pub const AVAIL: u16 = 1 << 7;
    pub const USED: u16 = 1 << 15;
}

/// Largest queue size the spec allows (split and packed).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Longest indirect table accepted, in descriptors, when the queue is smaller than this
/// (the spec bounds tables by the queue size; QEMU accepts up to 1024 entries).
pub const MAX_INDIRECT_FLOOR: u32 = 1024;

/// Where the driver placed a queue, as programmed through the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueConfig {
    pub size: u16,
    /// Descriptor table (split) or descriptor ring (packed).
    pub desc_addr: u64,
    /// Available ring (split) or driver event suppression (packed).
    pub driver_addr: u64,
    /// Used ring (split) or device event suppression (packed).
    pub device_addr: u64,
    pub packed: bool,
}

/// Device-side position in a queue: enough to restart a stopped queue where it left off
/// (vhost GET/SET_VRING_BASE). Wrap counters only matter for packed rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub next_avail: u16,
    pub next_used: u16,
    pub avail_wrap: bool,
    pub used_wrap: bool,
}

impl Default for QueueState {
    /// A freshly enabled queue.
    fn default() -> Self {
        Self {
            next_avail: 0,
            next_used: 0,
            avail_wrap: true,
            used_wrap: true,
        }
    }
}

/// The driver broke the ring (or its memory went away). Sticky for the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("invalid queue size {0}")]
    BadSize(u16),
    #[error("{what} address {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        what: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("{what} at {addr:#x} is not accessible: {err}")]
    RingNotMapped {
        what: &'static str,
        addr: u64,
        err: MemError,
    },
    #[error("ring access failed: {0}")]
    Memory(#[from] MemError),
    #[error("available index {avail} is more than the queue size ahead of {next}")]
    AvailIdxJump { avail: u16, next: u16 },
    #[error("descriptor index {index} out of range (size {size})")]
    DescIndexOutOfRange { index: u32, size: u32 },
    #[error("descriptor chain loops or exceeds its table")]
    ChainLoop,
    #[error("descriptor chain longer than 4 GiB")]
    ChainTooLong,
    #[error("indirect descriptor used without VIRTIO_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    #[error("indirect table length {0} is zero, not a multiple of 16, or too long")]
    BadIndirectLen(u32),
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("descriptor has both INDIRECT and NEXT")]
    IndirectWithNext,
    #[error("device-writable descriptor before a readable one")]
    WritableBeforeReadable,
    #[error("packed buffer id {0} out of range")]
    BadBufferId(u16),
    #[error("the device's queue handler failed (panicked)")]
    HandlerFailed,
    /// An external datapath (a vhost-user backend) failed or went away. (Added for the
    /// vhost-user bridge, issue 10.)
    #[error("external backend: {0}")]
    Backend(String),
}

/// `vring_need_event`: should the other side be signalled when its index moves from `old` to
/// `new` and it asked to be signalled at `event`? All in wrapping u16 arithmetic.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

enum Ring {
    Split(SplitRing),
    Packed(PackedRing),
}

/// A started virtqueue.
pub struct Queue {
    mem: Arc<GuestMemory>,
    cfg: QueueConfig,
    features: u64,
    ring: Ring,
    error: Option<QueueError>,
    /// The current memory does not cover the ring (a remap is in progress, e.g. QEMU unmaps
    /// all RAM and maps it back in pieces). The queue idles, without touching the ring,
    /// until a memory snapshot that covers it arrives. Not an error of the driver's.
    waiting_for_memory: Option<QueueError>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("cfg", &self.cfg)
            .field("state", &self.state())
            .field("error", &self.error)
            .finish()
    }
}

impl Queue {
    /// Start a fresh queue.
    pub fn new(cfg: QueueConfig, features: u64, mem: Arc<GuestMemory>) -> Result<Self, QueueError> {
        Self::with_state(cfg, features, mem, QueueState::default())
    }

    /// Start a queue at a saved position.
    pub fn with_state(
        cfg: QueueConfig,
        features: u64,
        mem: Arc<GuestMemory>,
        state: QueueState,
    ) -> Result<Self, QueueError> {
        let ring = if cfg.packed {
            Ring::Packed(PackedRing::new(&cfg, features, &mem, state)?)
        } else {
            Ring::Split(SplitRing::new(&cfg, features, &mem, state)?)
        };
        Ok(Self {
            mem,
            cfg,
            features,
            ring,
            error: None,
            waiting_for_memory: None,
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn size(&self) -> u16 {
        self.cfg.size
    }

    pub fn is_packed(&self) -> bool {
        self.cfg.packed
    }

    /// The guest memory this queue works over; use it for chain cursors.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The sticky ring error, if the driver broke the ring.
    pub fn error(&self) -> Option<&QueueError> {
        self.error.as_ref()
    }

    /// True when ring areas are reached through host pointers (fd-backed memory).
    pub fn is_fast_path(&self) -> bool {
        match &self.ring {
            Ring::Split(r) => r.is_host(),
            Ring::Packed(r) => r.is_host(),
        }
    }

    #[cold]
    fn fail<T>(&mut self, e: QueueError) -> Result<T, QueueError> {
        self.error = Some(e.clone());
        Err(e)
    }

    /// Record a ring-access failure: sticky, unless our own side revoked the DMA port
    /// (see [`is_revocation`]); then the queue waits for the next memory snapshot, keeping
    /// its position and staged completions.
    #[cold]
    fn record(&mut self, e: QueueError) {
        if is_revocation(&e) {
            self.waiting_for_memory = Some(e);
        } else {
            self.error = Some(e);
        }
    }

    /// Like [`Queue::fail`] for accesses that report "nothing available" while waiting.
    #[cold]
    fn fail_or_idle(&mut self, e: QueueError) -> Result<bool, QueueError> {
        if is_revocation(&e) {
            self.waiting_for_memory = Some(e);
            return Ok(false);
        }
        self.fail(e)
    }

    /// True while the current memory does not cover the ring (see [`Queue::set_memory`]).
    pub fn waiting_for_memory(&self) -> Option<&QueueError> {
        self.waiting_for_memory.as_ref()
    }

    /// Switch to a new memory snapshot (between bursts), flushing staged completions into
    /// the old one first and re-translating the rings. If the new memory does not cover the
    /// ring, the queue waits (idles) until a later snapshot does; other failures are sticky.
    pub fn set_memory(&mut self, mem: Arc<GuestMemory>) -> Result<bool, QueueError> {
        let by_message = self.by_message();
        let notify = if self.waiting_for_memory.is_some() && by_message {
            // Completions stranded by a revoked port go out through the new snapshot: ring
            // parts reached by messages address the guest, not a host mapping.
            let r = match &mut self.ring {
                Ring::Split(r) => r.flush(&mem),
                Ring::Packed(r) => r.flush(&mem),
            };
            r.unwrap_or(false)
        } else {
            self.flush_used()
        };
        if self.staged() > 0 && self.error.is_none() {
            self.mem = mem.clone();
            if !by_message {
                // Staged into a host ring that can no longer be published.
                return self.fail(QueueError::RingNotMapped {
                    what: "used ring",
                    addr: self.cfg.device_addr,
                    err: MemError::Unmapped {
                        gpa: self.cfg.device_addr,
                        len: 0,
                    },
                });
            }
            // Keep them in the old ring and wait for a snapshot that reaches it.
            self.waiting_for_memory = Some(QueueError::RingNotMapped {
                what: "used ring",
                addr: self.cfg.device_addr,
                err: MemError::Unmapped {
                    gpa: self.cfg.device_addr,
                    len: 0,
                },
            });
            return Ok(notify);
        }
        let state = self.state();
        let ring = match &self.ring {
            Ring::Split(r) => SplitRing::new(&self.cfg, self.features, &mem, state).map(|mut n| {
                n.carry_from(r);
                Ring::Split(n)
            }),
            Ring::Packed(r) => {
                PackedRing::new(&self.cfg, self.features, &mem, state).map(|mut n| {
                    n.carry_from(r);
                    Ring::Packed(n)
                })
            }
        };
        match ring {
            Ok(r) => {
                self.ring = r;
                self.mem = mem;
                self.waiting_for_memory = None;
                Ok(notify)
            }
            Err(e @ QueueError::RingNotMapped { .. }) => {
                // Keep the old ring only for its position; it is not touched while waiting.
                self.mem = mem;
                self.waiting_for_memory = Some(e);
                Ok(notify)
            }
            Err(e) => {
                self.mem = mem;
                self.fail(e)
            }
        }
    }

    /// Take the next available chain, or `None` if the ring is empty.
    pub fn pop(&mut self) -> Result<Option<DescChain>, QueueError> {
        let mut chain = DescChain::new();
        Ok(self.pop_into(&mut chain)?.then_some(chain))
    }

    /// Like [`Queue::pop`] but reuses `chain` (no allocation even for long chains once the
    /// spill buffer has grown). Returns false if the ring is empty.
    #[inline(always)]
    pub fn pop_into(&mut self, chain: &mut DescChain) -> Result<bool, QueueError> {
        if let Ring::Split(r) = &mut self.ring {
            if self.error.is_none() && self.waiting_for_memory.is_none() {
                // Hot path, kept small enough to inline into handler loops.
                return match r.pop(&self.mem, chain) {
                    Ok(v) => Ok(v),
                    Err(e) => self.fail_or_idle(e),
                };
            }
        }
        self.pop_slow(chain)
    }

    #[inline(never)]
    fn pop_slow(&mut self, chain: &mut DescChain) -> Result<bool, QueueError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.waiting_for_memory.is_some() {
            return Ok(false);
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.pop(&self.mem, chain),
            Ring::Packed(r) => r.pop(&self.mem, chain),
        };
        match r {
            Ok(v) => Ok(v),
            Err(e) => self.fail_or_idle(e),
        }
    }

    /// True if a chain is available (does not consume it).
    pub fn has_available(&mut self) -> Result<bool, QueueError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.waiting_for_memory.is_some() {
            return Ok(false);
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.has_available(&self.mem),
            Ring::Packed(r) => r.has_available(&self.mem),
        };
        match r {
            Ok(v) => Ok(v),
            Err(e) => self.fail_or_idle(e),
        }
    }

    /// Stage a completion: `head` from [`DescChain::head`], `len` bytes written to the
    /// writable part. Invisible to the driver until [`Queue::flush_used`].
    #[inline(always)]
    pub fn add_used(&mut self, head: u16, len: u32) {
        if let Ring::Split(r) = &mut self.ring {
            if self.error.is_none()
                && self.waiting_for_memory.is_none()
                && r.add_used_fast(head, len)
            {
                return;
            }
        }
        self.add_used_slow(head, len);
    }

    #[inline(never)]
    fn add_used_slow(&mut self, head: u16, len: u32) {
        if self.error.is_some() {
            return;
        }
        // While waiting, completions of requests still in flight are staged only where that
        // needs no access to memory that may be gone: a ring reached by messages (staged
        // in the shadow), or the unswapped snapshot after a revocation.
        if let Some(w) = &self.waiting_for_memory {
            if !is_revocation(w) && !self.by_message() {
                return;
            }
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.add_used(&self.mem, head, len),
            Ring::Packed(r) => r.add_used(&self.mem, head, len),
        };
        if let Err(e) = r {
            self.record(e);
        }
    }

    /// True when no ring part is reached through a host pointer.
    fn by_message(&self) -> bool {
        match &self.ring {
            Ring::Split(r) => r.by_message(),
            Ring::Packed(r) => r.by_message(),
        }
    }

    /// Number of completions staged and not yet published.
    pub fn staged(&self) -> usize {
        match &self.ring {
            Ring::Split(r) => r.staged(),
            Ring::Packed(r) => r.staged(),
        }
    }

    /// Publish staged completions (one index/flags release per burst) and return whether the
    /// driver asked to be interrupted for them. Errors are recorded (see [`Queue::error`]).
    #[inline]
    pub fn flush_used(&mut self) -> bool {
        if self.error.is_some() || self.waiting_for_memory.is_some() {
            return false;
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.flush(&self.mem),
            Ring::Packed(r) => r.flush(&self.mem),
        };
        match r {
            Ok(v) => v,
            Err(e) => {
                self.record(e);
                false
            }
        }
    }

    /// Ask the driver not to notify (kick) us: we are polling.
    pub fn disable_notifications(&mut self) {
        if self.error.is_some() || self.waiting_for_memory.is_some() {
            return;
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.set_notifications(&self.mem, false),
            Ring::Packed(r) => r.set_notifications(&self.mem, false),
        };
        if let Err(e) = r {
            self.record(e);
        }
    }

    /// Re-enable driver notifications, then re-check the ring after a full fence. Returns
    /// true if buffers are available (the caller must not sleep), so no kick is lost. A broken
    /// queue returns false (nothing more to do on it).
    pub fn enable_notifications(&mut self) -> bool {
        if self.error.is_some() || self.waiting_for_memory.is_some() {
            return false;
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.set_notifications(&self.mem, true),
            Ring::Packed(r) => r.set_notifications(&self.mem, true),
        };
        if let Err(e) = r {
            self.record(e);
            return false;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.has_available().unwrap_or(false)
    }

    /// Position to restart from. Staged completions count as used, so flush first.
    pub fn state(&self) -> QueueState {
        match &self.ring {
            Ring::Split(r) => r.state(),
            Ring::Packed(r) => r.state(),
        }
    }
}

/// A ring access failed because our side revoked the DMA port of the snapshot (a memory
/// change retiring a host mapping closes it so blocked transfers fail fast) or the client
/// went away: not the driver's fault, so not sticky. A bad address fails before any
/// message (`Unmapped`) and a client refusal (`Refused`) stays sticky.
fn is_revocation(e: &QueueError) -> bool {
    matches!(
        e,
        QueueError::Memory(MemError::Dma(DmaError::Disconnected))
            | QueueError::RingNotMapped {
                err: MemError::Dma(DmaError::Disconnected),
                ..
            }
    )
}

/// Check `addr` alignment for a ring part.
pub(crate) fn check_align(what: &'static str, addr: u64, align: u64) -> Result<(), QueueError> {
    if addr % align != 0 {
        return Err(QueueError::Misaligned { what, addr, align });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
