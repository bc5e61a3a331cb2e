//! The datapath seam between a virtio transport and whatever runs the rings.
//!
//! Modelled on rte_vhost2: the transport tells the engine about features, guest memory and
//! queue start/stop; each call may finish later, so it returns a [`Completion`] the caller can
//! wait on with a timeout. The built-in engine is the polling one in [`crate::poller`]; a
//! vhost-user engine can implement the same trait.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use emudev::GuestMemory;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::queue::{QueueConfig, QueueError, QueueState};

/// Why an engine operation did not complete successfully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("queue {0} is not started")]
    QueueNotStarted(u16),
    #[error("queue {0} is already started")]
    QueueAlreadyStarted(u16),
    #[error("queue {qidx} refused: {err}")]
    Queue { qidx: u16, err: QueueError },
    #[error("the engine is shut down")]
    Shutdown,
    #[error("timed out waiting for the engine")]
    Timeout,
    #[error("engine failure: {0}")]
    Other(String),
}

/// Receiving half of a one-shot result: an engine operation that may finish later.
#[derive(Debug)]
pub struct Completion<T = ()> {
    rx: Receiver<Result<T, EngineError>>,
}

/// Sending half of a [`Completion`]; dropping it unsignalled completes with `Shutdown`.
#[derive(Debug)]
pub struct Completer<T = ()> {
    tx: Sender<Result<T, EngineError>>,
}

impl<T> Completion<T> {
    /// A pending completion and the completer that finishes it.
    pub fn pair() -> (Completer<T>, Completion<T>) {
        let (tx, rx) = bounded(1);
        (Completer { tx }, Completion { rx })
    }

    /// An already finished completion.
    pub fn ready(v: Result<T, EngineError>) -> Self {
        let (c, done) = Self::pair();
        c.complete(v);
        done
    }

    /// Wait at most `timeout` for the result.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<T, EngineError> {
        match self.rx.recv_timeout(timeout) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => Err(EngineError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(EngineError::Shutdown),
        }
    }

    /// Wait without a time limit.
    pub fn wait(&self) -> Result<T, EngineError> {
        self.rx.recv().unwrap_or(Err(EngineError::Shutdown))
    }

    /// The result if it is already there.
    pub fn try_get(&self) -> Option<Result<T, EngineError>> {
        match self.rx.try_recv() {
            Ok(v) => Some(v),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(EngineError::Shutdown)),
        }
    }
}

impl<T> Completer<T> {
    /// Finish the operation. The waiter may be gone; that is not an error.
    pub fn complete(self, v: Result<T, EngineError>) {
        let _ = self.tx.try_send(v);
    }
}

/// How the core signals the driver that a queue has used buffers (an MSI-X vector write, an
/// INTx assert, ...). Supplied by the transport per queue.
pub trait Notifier: Send + Sync {
    fn notify(&self);
}

impl<F: Fn() + Send + Sync> Notifier for F {
    fn notify(&self) {
        self()
    }
}

/// A [`Notifier`] that writes an eventfd (e.g. the irqfd the client gave for a vector).
#[derive(Debug, Clone)]
pub struct EventFdNotifier(pub Arc<EventFd>);

impl Notifier for EventFdNotifier {
    fn notify(&self) {
        // EAGAIN only when the counter is saturated, which still means "signalled".
        let _ = self.0.write(1);
    }
}

/// Called (from a poller thread) when a queue stops on a malformed ring; the transport should
/// set DEVICE_NEEDS_RESET and raise a config interrupt.
pub type QueueErrorCallback = Arc<dyn Fn(u16, &QueueError) + Send + Sync>;

/// Doorbell of one queue: an eventfd the transport writes when the driver writes the notify
/// register; the engine sleeps on it. Cloning shares the same eventfd.
#[derive(Debug, Clone)]
pub struct Kick(Arc<EventFd>);

impl Kick {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> std::io::Result<Self> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(std::io::Error::from)?;
        Ok(Self(Arc::new(fd)))
    }

    /// Wrap an eventfd received from elsewhere (e.g. an ioeventfd); it is switched to
    /// non-blocking mode so draining never blocks the poller.
    pub fn from_eventfd(fd: Arc<EventFd>) -> std::io::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let raw = fd.as_fd().as_raw_fd();
        let fl = fcntl(raw, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
        let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
        fcntl(raw, FcntlArg::F_SETFL(fl)).map_err(std::io::Error::from)?;
        Ok(Self(fd))
    }

    /// Ring the doorbell.
    pub fn signal(&self) {
        let _ = self.0.write(1);
    }

    /// Consume pending doorbells; returns how many were counted (0 if none).
    pub fn drain(&self) -> u64 {
        self.0.read().unwrap_or(0)
    }

    /// The underlying eventfd.
    pub fn eventfd(&self) -> &Arc<EventFd> {
        &self.0
    }
}

impl AsFd for Kick {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Kick {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The datapath of one device. Calls come from the transport's control thread, in order.
///
/// Contract: `memory_changed` is called before the first `queue_start` and after every DMA map
/// change; its completion means the old snapshot is no longer used by any queue.
/// `queue_stop` completes with the state to restart from (vhost GET_VRING_BASE), after which
/// the engine touches neither the rings nor the buffers of that queue.
pub trait Engine: Send {
    /// Driver features were accepted (FEATURES_OK). Applies to queues started afterwards.
    fn features_changed(&mut self, features: u64) -> Completion;
    /// New guest memory snapshot; running queues switch to it between bursts.
    fn memory_changed(&mut self, mem: Arc<GuestMemory>) -> Completion;
    /// Start a queue (queue_enable or DRIVER_OK). Ring addresses are stable until stop.
    fn queue_start(
        &mut self,
        qidx: u16,
        cfg: QueueConfig,
        notifier: Arc<dyn Notifier>,
        kick: Kick,
    ) -> Completion;
    /// Stop a queue; in-flight requests are finished first.
    fn queue_stop(&mut self, qidx: u16) -> Completion<QueueState>;
    /// Position the next `queue_start` of `qidx` begins at (vhost SET_VRING_BASE); without
    /// it a queue starts fresh. Engines that cannot resume may ignore it.
    fn set_queue_base(&mut self, _qidx: u16, _state: QueueState) {}
    /// The driver notified `qidx` by a route other than the kick eventfd (e.g. a trapped
    /// register write).
    fn kick(&mut self, qidx: u16);
    /// Where malformed-ring errors are reported. Set before starting queues.
    fn set_error_callback(&mut self, cb: QueueErrorCallback);
    /// Stop every queue and release resources (device reset or removal).
    fn destroy(&mut self) -> Completion;
    /// Stop popping new requests on every queue; completes once none is in flight (the
    /// transport's quiesce). Default: nothing to pause. (Added by h7 for the PCI transport.)
    fn pause(&mut self) -> Completion {
        Completion::ready(Ok(()))
    }
    /// Undo [`Engine::pause`].
    fn resume(&mut self) -> Completion {
        Completion::ready(Ok(()))
    }
}
