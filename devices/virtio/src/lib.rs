//! emudev-virtio: the polled vring core (split and packed virtqueues, the engine seam, the
//! poller threads) and the modern virtio-pci transport.
//!
//! - [`queue`]: device-side split/packed virtqueues with burst flush and notification
//!   suppression; [`queue::DescChain`] with `Reader`/`Writer` cursors.
//! - [`engine`]: the [`Engine`] trait a transport drives (rte_vhost2 style).
//! - [`poller`]: [`poller::PollerPool`] threads and the built-in [`poller::PollerEngine`];
//!   devices plug in a [`poller::QueueHandler`] per queue.
//! - [`pci`]: the virtio-pci transport.

pub mod engine;
pub mod pci;
pub mod poller;
pub mod queue;

pub use engine::{Completer, Completion, Engine, EngineError, Kick, Notifier, QueueErrorCallback};
pub use poller::{PollerConfig, PollerEngine, PollerPool, QueueHandler};
pub use queue::{DescChain, Queue, QueueConfig, QueueError, QueueState};
