//! Interrupt sinks that are not MSI-X: the eventfd wrapper, the INTx line and single-vector
//! lines (vfio-user ERR and REQ).
//!
//! All types use interior mutability so a poller thread can raise interrupts while the
//! control thread applies SET_IRQS; share them behind an `Arc`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;

/// An eventfd given by the client; signalling adds 1 to its counter.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Write 1 (a native-endian u64). A saturated counter (EAGAIN on a non-blocking fd)
    /// already means "signalled" and counts as success. No allocation.
    pub fn signal(&self) -> io::Result<()> {
        match nix::unistd::write(&self.0, &1u64.to_ne_bytes()) {
            Ok(8) | Err(Errno::EAGAIN) => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short eventfd write of {n} bytes"),
            )),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl From<OwnedFd> for EventFd {
    fn from(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

/// Lock ignoring poisoning: the protected state stays consistent at every step, so a panic
/// elsewhere must not turn into a panic on the interrupt path.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A single-vector interrupt (vfio-user ERR or REQ index): an optional eventfd.
#[derive(Debug, Default)]
pub struct IrqLine {
    fd: Mutex<Option<EventFd>>,
}

impl IrqLine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the eventfd (`None` de-assigns); the old one is closed.
    pub fn set_fd(&self, fd: Option<OwnedFd>) {
        *lock(&self.fd) = fd.map(EventFd);
    }

    pub fn has_fd(&self) -> bool {
        lock(&self.fd).is_some()
    }

    /// Signal the eventfd. `Ok(false)` if none is assigned.
    pub fn trigger(&self) -> io::Result<bool> {
        match lock(&self.fd).as_ref() {
            Some(fd) => fd.signal().map(|()| true),
            None => Ok(false),
        }
    }
}

#[derive(Debug, Default)]
struct IntxState {
    /// The device drives the line high.
    level: bool,
    /// Masked, by the client (SET_IRQS MASK) or automatically after each delivery.
    masked: bool,
    /// Command register INTx Disable.
    disabled: bool,
    trigger: Option<EventFd>,
    unmask: Option<std::sync::Arc<EventFd>>,
}

/// A level-triggered INTx line with vfio semantics: each delivery (one eventfd signal)
/// masks the line automatically; the client unmasks it after the guest's EOI, either with
/// SET_IRQS(INTX, ACTION_UNMASK) or by signalling the unmask eventfd (KVM resampler), and if
/// the device still holds the level the line fires again.
#[derive(Debug, Default)]
pub struct IntxLine {
    state: Mutex<IntxState>,
}

impl IntxLine {
    pub fn new() -> Self {
        Self::default()
    }

    fn deliver(s: &mut IntxState) -> io::Result<bool> {
        if !s.level || s.masked || s.disabled {
            return Ok(false);
        }
        match s.trigger.as_ref() {
            Some(fd) => {
                s.masked = true;
                fd.signal().map(|()| true)
            }
            None => Ok(false),
        }
    }

    /// Raise the line. Returns whether the eventfd was signalled.
    pub fn assert(&self) -> io::Result<bool> {
        let mut s = lock(&self.state);
        s.level = true;
        Self::deliver(&mut s)
    }

    /// Lower the line.
    pub fn deassert(&self) {
        lock(&self.state).level = false;
    }

    /// Whether the device holds the line high (the status register's interrupt bit).
    pub fn level(&self) -> bool {
        lock(&self.state).level
    }

    /// Client mask (SET_IRQS ACTION_MASK).
    pub fn mask(&self) {
        lock(&self.state).masked = true;
    }

    /// Client unmask (SET_IRQS ACTION_UNMASK, or the unmask eventfd fired): re-delivers if
    /// the level is still high.
    pub fn unmask(&self) -> io::Result<bool> {
        let mut s = lock(&self.state);
        s.masked = false;
        Self::deliver(&mut s)
    }

    pub fn is_masked(&self) -> bool {
        lock(&self.state).masked
    }

    /// Follow the command register's INTx Disable bit.
    pub fn set_disabled(&self, disabled: bool) -> io::Result<bool> {
        let mut s = lock(&self.state);
        s.disabled = disabled;
        Self::deliver(&mut s)
    }

    /// SET_IRQS(INTX, EVENTFD|TRIGGER): the eventfd to signal; `None` de-assigns. A newly
    /// assigned fd starts unmasked, and a pending level is delivered.
    pub fn set_trigger_fd(&self, fd: Option<OwnedFd>) -> io::Result<bool> {
        let mut s = lock(&self.state);
        let assigned = fd.is_some();
        s.trigger = fd.map(EventFd);
        if assigned {
            s.masked = false;
            Self::deliver(&mut s)
        } else {
            Ok(false)
        }
    }

    /// SET_IRQS(INTX, EVENTFD|UNMASK): the eventfd the client signals to unmask. The
    /// transport polls it (see [`IntxLine::unmask_fd`]) and calls [`IntxLine::unmask`].
    pub fn set_unmask_fd(&self, fd: Option<OwnedFd>) {
        lock(&self.state).unmask = fd.map(|f| std::sync::Arc::new(EventFd(f)));
    }

    /// The unmask eventfd, for the transport's poll set.
    pub fn unmask_fd(&self) -> Option<std::sync::Arc<EventFd>> {
        lock(&self.state).unmask.clone()
    }

    /// Device reset: lower the line, keep the client's fds and mask.
    pub fn reset(&self) {
        let mut s = lock(&self.state);
        s.level = false;
        s.disabled = false;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nix::sys::eventfd::{EfdFlags, EventFd as NixEventFd};

    /// A non-blocking eventfd pair: the fd to hand over and a reader to count signals.
    pub(crate) fn eventfd_pair() -> (OwnedFd, NixEventFd) {
        let efd = NixEventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap();
        let dup = efd.as_fd().try_clone_to_owned().unwrap();
        (dup, efd)
    }

    /// Signals received since the last call.
    pub(crate) fn count(efd: &NixEventFd) -> u64 {
        efd.read().unwrap_or(0)
    }

    #[test]
    fn irq_line_signals_only_with_fd() {
        let l = IrqLine::new();
        assert!(!l.trigger().unwrap());
        let (fd, r) = eventfd_pair();
        l.set_fd(Some(fd));
        assert!(l.trigger().unwrap());
        assert!(l.trigger().unwrap());
        assert_eq!(count(&r), 2);
        l.set_fd(None);
        assert!(!l.trigger().unwrap());
        assert_eq!(count(&r), 0);
    }

    #[test]
    fn intx_automask_and_resample() {
        let l = IntxLine::new();
        let (fd, r) = eventfd_pair();
        l.set_trigger_fd(Some(fd)).unwrap();
        assert!(l.assert().unwrap());
        // Masked after delivery: a second assert does not signal.
        assert!(!l.assert().unwrap());
        assert_eq!(count(&r), 1);
        // EOI while still asserted: unmask re-delivers.
        assert!(l.unmask().unwrap());
        assert_eq!(count(&r), 1);
        // Lowered then unmasked: nothing.
        l.deassert();
        assert!(!l.unmask().unwrap());
        assert_eq!(count(&r), 0);
        assert!(!l.level());
    }

    #[test]
    fn intx_disable_and_client_mask() {
        let l = IntxLine::new();
        let (fd, r) = eventfd_pair();
        l.set_trigger_fd(Some(fd)).unwrap();
        l.set_disabled(true).unwrap();
        assert!(!l.assert().unwrap());
        assert_eq!(count(&r), 0);
        // Re-enabling with the level high delivers.
        assert!(l.set_disabled(false).unwrap());
        assert_eq!(count(&r), 1);
        l.deassert();
        l.unmask().unwrap();
        l.mask();
        assert!(!l.assert().unwrap());
        assert!(l.unmask().unwrap());
        assert_eq!(count(&r), 1);
    }

    #[test]
    fn intx_level_before_fd_is_delivered_on_assign() {
        let l = IntxLine::new();
        assert!(!l.assert().unwrap());
        let (fd, r) = eventfd_pair();
        assert!(l.set_trigger_fd(Some(fd)).unwrap());
        assert_eq!(count(&r), 1);
        let (ufd, _u) = eventfd_pair();
        l.set_unmask_fd(Some(ufd));
        assert!(l.unmask_fd().is_some());
        l.set_unmask_fd(None);
        assert!(l.unmask_fd().is_none());
    }
}
