//! [`VhostUserEngine`]: the [`Engine`] whose rings a vhost-user backend runs.
//!
//! Every call is a short request/reply exchange on the device's control thread, bounded by
//! the backend's I/O timeout, so completions are always ready when returned. Doorbells need
//! no forwarding: the backend's kick fd *is* the transport's doorbell eventfd. Completions
//! come back on per-ring call eventfds that the monitor thread turns into interrupts.
//!
//! `pause`/`resume` do nothing: the backend keeps running, and `memory_changed` (which the
//! transport calls while paused when memory goes away) sends SET_MEM_TABLE while rings run
//! and, with REPLY_ACK, returns only once the backend has switched to the new table (see
//! `Backend::memory_changed` for when a table is held back).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use emudev::GuestMemory;
use emudev_virtio::{
    Completion, Engine, EngineError, Kick, Notifier, QueueConfig, QueueErrorCallback, QueueState,
};

use crate::backend::Backend;
use crate::monitor;

/// The vhost-user engine of one device.
pub struct VhostUserEngine {
    backend: Arc<Backend>,
    monitor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VhostUserEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserEngine")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl VhostUserEngine {
    /// An engine over `backend`; starts its monitor thread.
    pub fn new(backend: Arc<Backend>) -> std::io::Result<Self> {
        let b = backend.clone();
        let monitor = std::thread::Builder::new()
            .name(format!("vhost-{}", backend.name))
            .spawn(move || monitor::run(b))?;
        Ok(Self {
            backend,
            monitor: Some(monitor),
        })
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    fn stop_all(&mut self) -> Result<(), EngineError> {
        let running: Vec<u16> = {
            let s = self.backend.lock();
            s.slots
                .iter()
                .enumerate()
                .filter(|(_, x)| x.running.is_some())
                // Bounded by MAX_RINGS.
                .map(|(i, _)| i as u16)
                .collect()
        };
        for q in running {
            self.backend.queue_stop(q)?;
        }
        Ok(())
    }
}

impl Engine for VhostUserEngine {
    fn features_changed(&mut self, features: u64) -> Completion {
        Completion::ready(self.backend.features_changed(features))
    }

    fn memory_changed(&mut self, mem: Arc<GuestMemory>) -> Completion {
        Completion::ready(self.backend.memory_changed(mem))
    }

    fn queue_start(
        &mut self,
        qidx: u16,
        cfg: QueueConfig,
        notifier: Arc<dyn Notifier>,
        kick: Kick,
    ) -> Completion {
        Completion::ready(self.backend.queue_start(qidx, cfg, notifier, kick))
    }

    fn queue_stop(&mut self, qidx: u16) -> Completion<QueueState> {
        Completion::ready(self.backend.queue_stop(qidx))
    }

    fn set_queue_base(&mut self, qidx: u16, state: QueueState) {
        self.backend.set_queue_base(qidx, state);
    }

    fn kick(&mut self, qidx: u16) {
        self.backend.kick(qidx);
    }

    fn set_error_callback(&mut self, cb: QueueErrorCallback) {
        self.backend.set_error_callback(cb);
    }

    fn destroy(&mut self) -> Completion {
        Completion::ready(self.stop_all())
    }
}

impl Drop for VhostUserEngine {
    fn drop(&mut self) {
        if let Err(e) = self.stop_all() {
            log::warn!("{}: stopping rings: {e}", self.backend.name);
        }
        self.backend.stop.store(true, Ordering::SeqCst);
        self.backend.poke();
        if let Some(t) = self.monitor.take() {
            let _ = t.join();
        }
    }
}
