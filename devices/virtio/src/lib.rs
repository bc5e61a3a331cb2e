//! emudev-virtio: the polled vring core (split and packed virtqueues, the engine seam, the
//! poller threads) and the modern virtio-pci transport.

pub mod engine;
pub mod pci;
pub mod poller;
pub mod queue;

pub use engine::{Completer, Completion, Engine, EngineError, Kick, Notifier, QueueErrorCallback};
pub use queue::{DescChain, Queue, QueueConfig, QueueError, QueueState};
