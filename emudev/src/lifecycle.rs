//! Device lifecycle: the state machine and the panic fence around device calls.
//!
//! ```text
//!   Configured --attach--> Running <--resume/quiesce--> Quiesced
//!        ^                   |  ^                          |
//!        |                 detach attach                 detach
//!      reset                 v  |                          v
//!   Failed (any state, on a panic or a failed quiesce)   Stopped
//! ```
//!
//! The state lives in a [`StateCell`] shared between the device's control thread (which
//! changes it) and the manager (which reads it from any thread). [`guarded`] runs one device
//! call behind `catch_unwind`, so a panicking device is marked Failed and answered EIO while
//! every other device keeps running.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::device::DeviceState;

fn to_u8(s: DeviceState) -> u8 {
    match s {
        DeviceState::Configured => 0,
        DeviceState::Running => 1,
        DeviceState::Quiesced => 2,
        DeviceState::Stopped => 3,
        DeviceState::Failed => 4,
    }
}

fn from_u8(v: u8) -> DeviceState {
    match v {
        0 => DeviceState::Configured,
        1 => DeviceState::Running,
        2 => DeviceState::Quiesced,
        3 => DeviceState::Stopped,
        _ => DeviceState::Failed,
    }
}

/// What moves a device between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A client attached.
    Attach,
    /// DMA stopped for a memory change.
    Quiesce,
    /// DMA allowed again.
    Resume,
    /// The client went away.
    Detach,
    /// DEVICE_RESET or FLR; the only way out of Failed.
    Reset,
    /// A device call panicked or could not quiesce.
    Fail,
}

/// The next state, or `None` when the transition is not allowed from `from`.
pub fn next_state(from: DeviceState, t: Transition, attached: bool) -> Option<DeviceState> {
    use DeviceState::*;
    match (from, t) {
        (_, Transition::Fail) => Some(Failed),
        (Configured | Stopped | Running, Transition::Attach) => Some(Running),
        (Running, Transition::Quiesce) => Some(Quiesced),
        (Quiesced, Transition::Resume) => Some(Running),
        (Running | Quiesced | Configured, Transition::Detach) => Some(Stopped),
        (Stopped, Transition::Detach) => Some(Stopped),
        (Failed, Transition::Detach) => Some(Failed),
        (_, Transition::Reset) => Some(if attached { Running } else { Configured }),
        _ => None,
    }
}

/// A device state readable from any thread.
#[derive(Debug, Clone)]
pub struct StateCell(Arc<AtomicU8>);

impl Default for StateCell {
    fn default() -> Self {
        Self::new(DeviceState::Configured)
    }
}

impl StateCell {
    pub fn new(s: DeviceState) -> Self {
        Self(Arc::new(AtomicU8::new(to_u8(s))))
    }
    pub fn get(&self) -> DeviceState {
        from_u8(self.0.load(Ordering::Acquire))
    }
    pub fn set(&self, s: DeviceState) {
        self.0.store(to_u8(s), Ordering::Release);
    }
    /// Apply `t`; returns `(old, new)` when the state changed, `None` otherwise (an
    /// illegal transition leaves the state untouched).
    pub fn apply(&self, t: Transition, attached: bool) -> Option<(DeviceState, DeviceState)> {
        let old = self.get();
        let new = next_state(old, t, attached)?;
        if new == old {
            return None;
        }
        self.set(new);
        Some((old, new))
    }
    pub fn is_failed(&self) -> bool {
        self.get() == DeviceState::Failed
    }
}

/// Run `f` (one call into a device model) and turn a panic into `Err(message)`.
///
/// `AssertUnwindSafe` is deliberate: after a panic the device is marked Failed and only
/// `reset` (which rebuilds its state) or `detach` touches it again.
pub fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref()))
}

/// The text of a panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceState::*;

    #[test]
    fn normal_life() {
        let c = StateCell::default();
        assert_eq!(
            c.apply(Transition::Attach, true),
            Some((Configured, Running))
        );
        assert_eq!(
            c.apply(Transition::Quiesce, true),
            Some((Running, Quiesced))
        );
        // Attach is not legal while quiesced.
        assert_eq!(c.apply(Transition::Attach, true), None);
        assert_eq!(c.get(), Quiesced);
        assert_eq!(c.apply(Transition::Resume, true), Some((Quiesced, Running)));
        assert_eq!(c.apply(Transition::Detach, false), Some((Running, Stopped)));
        assert_eq!(c.apply(Transition::Attach, true), Some((Stopped, Running)));
    }

    #[test]
    fn failed_is_sticky_until_reset() {
        let c = StateCell::new(Running);
        c.apply(Transition::Fail, true);
        for t in [Transition::Attach, Transition::Quiesce, Transition::Resume] {
            assert_eq!(c.apply(t, true), None);
            assert!(c.is_failed());
        }
        // Detach keeps Failed: the next client sees a failed device until it resets it.
        assert_eq!(c.apply(Transition::Detach, false), None);
        assert!(c.is_failed());
        assert_eq!(
            c.apply(Transition::Reset, false),
            Some((Failed, Configured))
        );
        c.apply(Transition::Fail, true);
        assert_eq!(c.apply(Transition::Reset, true), Some((Failed, Running)));
    }

    #[test]
    fn guarded_catches_panics_with_message() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r: Result<u32, String> = guarded(|| panic!("boom {}", 7));
        let s: Result<u32, String> = guarded(|| panic!("static"));
        std::panic::set_hook(prev);
        assert_eq!(r, Err("boom 7".to_string()));
        assert_eq!(s, Err("static".to_string()));
        assert_eq!(guarded(|| 5), Ok(5));
    }
}
