//! [`Backend`]: the state one bridged device shares between its control thread (the
//! [`crate::VhostUserEngine`] and [`crate::VhostUserDevice`]) and its monitor thread
//! ([`crate::monitor`]): the connection, the guest memory table the backend has, and the
//! running rings with their call/err eventfds.
//!
//! Disconnects: any fatal I/O error, or the monitor seeing the socket hang up, drops the
//! connection, marks every running ring lost and reports each through the error callback
//! (the transport sets DEVICE_NEEDS_RESET). The monitor reconnects when the backend's socket
//! accepts again; control-thread operations also try once. Lost rings are not restarted
//! behind the driver's back: the backend may have lost requests, so the driver must reset.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use emudev::GuestMemory;
use emudev_virtio::{Kick, Notifier, QueueConfig, QueueError, QueueErrorCallback, QueueState};
use log::{info, warn};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::conn::{BackendInfo, ConnError, Frontend};
use crate::memtable::{MemTable, TableKey};
use crate::protocol::{req, VringAddr, F_PROTOCOL_FEATURES};

/// Largest number of rings a bridged device may have (the transport's limit).
pub const MAX_RINGS: usize = 1024;

/// Construction options of a [`Backend`].
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Bound on each read and write of one request (below the transport's engine timeout).
    pub io_timeout: Duration,
    /// How often the monitor retries connecting after a disconnect.
    pub reconnect_interval: Duration,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_millis(1500),
            reconnect_interval: Duration::from_millis(250),
        }
    }
}

/// A ring the backend runs.
pub(crate) struct Running {
    pub cfg: QueueConfig,
    /// The backend's call fd: we forward its signals to `notifier`.
    pub call: Arc<EventFd>,
    /// The backend's err fd: a signal is a ring error on its side.
    pub err: Arc<EventFd>,
    pub notifier: Arc<dyn Notifier>,
    /// Our doorbell eventfd, which the backend holds as its kick fd.
    pub kick: Kick,
    /// The connection went away while it ran: nothing runs it any more.
    pub lost: bool,
}

#[derive(Default)]
pub(crate) struct Slot {
    pub running: Option<Running>,
    pub base: Option<QueueState>,
}

pub(crate) struct State {
    pub conn: Option<Frontend>,
    /// A duplicate of the connection's socket the monitor polls for hang-ups.
    pub watch: Option<Arc<OwnedFd>>,
    pub info: BackendInfo,
    mem: Option<Arc<GuestMemory>>,
    table: MemTable,
    /// Identity of the table the backend has (None: it has none from us).
    sent: Option<TableKey>,
    /// Driver features to send with SET_FEATURES, and whether the backend has them.
    features: Option<u64>,
    features_sent: bool,
    pub slots: Vec<Slot>,
    pub err_cb: Option<QueueErrorCallback>,
    pub disconnects: u64,
    pub reconnects: u64,
    warned_unshared: bool,
}

/// Rings the connection loss stopped, to report once the state lock is released.
#[must_use]
pub(crate) struct Lost {
    queues: Vec<u16>,
    cb: Option<QueueErrorCallback>,
    reason: String,
}

impl Lost {
    pub fn report(self) {
        if let Some(cb) = &self.cb {
            let e = QueueError::Backend(self.reason.clone());
            for q in &self.queues {
                cb(*q, &e);
            }
        }
    }
}

/// One bridged device's backend connection and rings.
pub struct Backend {
    pub(crate) name: String,
    path: PathBuf,
    pub(crate) opts: BackendOptions,
    state: Mutex<State>,
    /// Bumped whenever the monitor's watch set changes; `wake` tells it to look.
    pub(crate) version: AtomicU64,
    pub(crate) wake: EventFd,
    pub(crate) stop: AtomicBool,
}

fn eventfd() -> Result<EventFd, ConnError> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| {
        ConnError::Io {
            request: 0,
            source: e.into(),
        }
    })
}

fn engine_err(e: impl std::fmt::Display) -> emudev_virtio::EngineError {
    emudev_virtio::EngineError::Other(e.to_string())
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Connect to the backend at `path` and negotiate.
    pub fn connect(name: &str, path: &Path, opts: BackendOptions) -> Result<Arc<Self>, ConnError> {
        let conn = Frontend::connect(path, opts.io_timeout)?;
        let watch = conn
            .socket()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| ConnError::Io { request: 0, source })?;
        let info = conn.info();
        Ok(Arc::new(Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            opts,
            state: Mutex::new(State {
                conn: Some(conn),
                watch: Some(Arc::new(watch)),
                info,
                mem: None,
                table: MemTable::default(),
                sent: None,
                features: None,
                features_sent: false,
                slots: Vec::new(),
                err_cb: None,
                disconnects: 0,
                reconnects: 0,
                warned_unshared: false,
            }),
            version: AtomicU64::new(0),
            wake: eventfd()?,
            stop: AtomicBool::new(false),
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tell the monitor its watch set changed.
    pub(crate) fn poke(&self) {
        self.version.fetch_add(1, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// What the backend offered when we connected (or last reconnected).
    pub fn info(&self) -> BackendInfo {
        self.lock().info
    }

    /// Whether a connection is up.
    pub fn connected(&self) -> bool {
        self.lock().conn.is_some()
    }

    /// `(disconnects, reconnects)` so far.
    pub fn connection_counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.disconnects, s.reconnects)
    }

    /// GET_CONFIG.
    pub fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>, ConnError> {
        let (r, lost) = {
            let mut s = self.lock();
            let r = self.with_conn(&mut s, |c| c.get_config(offset, size));
            let lost = s.lose_on_fatal(self, &r);
            (r, lost)
        };
        if let Some(l) = lost {
            l.report();
        }
        r
    }

    /// SET_CONFIG.
    pub fn set_config(&self, offset: u32, data: &[u8]) -> Result<(), ConnError> {
        let (r, lost) = {
            let mut s = self.lock();
            let r = self.with_conn(&mut s, |c| c.set_config(offset, data));
            let lost = s.lose_on_fatal(self, &r);
            (r, lost)
        };
        if let Some(l) = lost {
            l.report();
        }
        r
    }

    /// Run `f` on the connection, reconnecting first if there is none.
    fn with_conn<T>(
        &self,
        s: &mut State,
        f: impl FnOnce(&mut Frontend) -> Result<T, ConnError>,
    ) -> Result<T, ConnError> {
        if s.conn.is_none() {
            self.reconnect(s)?;
        }
        match s.conn.as_mut() {
            Some(c) => f(c),
            None => Err(ConnError::Broken),
        }
    }

    /// Connect again; the new backend gets our memory table and features on next use.
    pub(crate) fn reconnect(&self, s: &mut State) -> Result<(), ConnError> {
        let conn = Frontend::connect(&self.path, self.opts.io_timeout)?;
        let watch = conn
            .socket()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| ConnError::Io { request: 0, source })?;
        let info = conn.info();
        if info.features & s.info.features != s.info.features {
            warn!(
                "{}: reconnected backend offers features {:#x}, fewer than the {:#x} offered \
                 to the driver",
                self.name, info.features, s.info.features
            );
        }
        info!(
            "{}: reconnected to vhost-user backend {}",
            self.name,
            self.path.display()
        );
        s.conn = Some(conn);
        s.watch = Some(Arc::new(watch));
        s.sent = None;
        s.features_sent = false;
        s.reconnects += 1;
        self.poke();
        Ok(())
    }

    /// Driver features accepted: SET_FEATURES now (or at the next connection).
    pub(crate) fn features_changed(&self, features: u64) -> Result<(), emudev_virtio::EngineError> {
        let mut s = self.lock();
        s.features = Some(features);
        s.features_sent = false;
        let r = self
            .with_conn(&mut s, |_| Ok(()))
            .and_then(|()| s.send_features());
        let lost = s.lose_on_fatal(self, &r);
        drop(s);
        if let Some(l) = lost {
            l.report();
        }
        r.map_err(engine_err)
    }

    /// New guest memory: SET_MEM_TABLE when the shareable part changed.
    pub(crate) fn memory_changed(
        &self,
        mem: Arc<GuestMemory>,
    ) -> Result<(), emudev_virtio::EngineError> {
        let mut s = self.lock();
        let table = MemTable::from_memory(&mem);
        if !table.unshared.is_empty() && !s.warned_unshared {
            s.warned_unshared = true;
            warn!(
                "{}: guest memory {} has no fd and cannot be shared with the vhost-user \
                 backend; rings or buffers there will fail (reported once)",
                self.name,
                table
                    .unshared
                    .iter()
                    .map(|(a, l)| format!("{a:#x}+{l:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s.mem = Some(mem);
        s.table = table;
        // Like QEMU's vhost, the backend hears about memory only while rings run (and at
        // the next ring start): no churn while firmware reprograms PAM, and no table that
        // lacks the old addresses of a stopped ring (libvhost-user remaps those too).
        let running = s
            .slots
            .iter()
            .any(|q| q.running.as_ref().is_some_and(|r| !r.lost));
        if s.conn.is_none() || !running {
            return Ok(());
        }
        let r = s.send_table();
        let lost = s.lose_on_fatal(self, &r);
        drop(s);
        if let Some(l) = lost {
            l.report();
        }
        match r {
            Err(e) => Err(engine_err(e)),
            Ok(()) => Ok(()),
        }
    }

    /// Start ring `q` on the backend with our doorbell as its kick fd.
    pub(crate) fn queue_start(
        &self,
        q: u16,
        cfg: QueueConfig,
        notifier: Arc<dyn Notifier>,
        kick: Kick,
    ) -> Result<(), emudev_virtio::EngineError> {
        use emudev_virtio::EngineError;
        let i = usize::from(q);
        if i >= MAX_RINGS {
            return Err(EngineError::Other(format!("ring {q} out of range")));
        }
        if cfg.packed {
            return Err(EngineError::Other(
                "packed rings are not bridged to vhost-user backends".into(),
            ));
        }
        let mut s = self.lock();
        if s.slots.len() <= i {
            s.slots.resize_with(i + 1, Slot::default);
        }
        if s.slots[i].running.as_ref().is_some_and(|r| !r.lost) {
            return Err(EngineError::QueueAlreadyStarted(q));
        }
        let size = u64::from(cfg.size);
        let rings = [
            ("descriptor table", cfg.desc_addr, 16 * size),
            ("available ring", cfg.driver_addr, 6 + 2 * size),
            ("used ring", cfg.device_addr, 6 + 8 * size),
        ];
        for (what, addr, len) in rings {
            if !s.table.covers(addr, len) {
                return Err(EngineError::Other(format!(
                    "ring {q}: {what} at {addr:#x}+{len:#x} is not in fd-backed guest memory; \
                     message-only memory cannot be shared with a vhost-user backend"
                )));
            }
        }
        let base = s.slots[i].base.take().map_or(0, |b| b.next_avail);
        let call = Arc::new(eventfd().map_err(engine_err)?);
        let err = Arc::new(eventfd().map_err(engine_err)?);
        let r = self.with_conn(&mut s, |_| Ok(())).and_then(|()| {
            s.send_features()?;
            s.send_table()?;
            let protocol = s.info.features & F_PROTOCOL_FEATURES != 0;
            let c = s.conn.as_mut().ok_or(ConnError::Broken)?;
            c.set_vring_num(q, cfg.size)?;
            c.set_vring_base(q, base)?;
            c.set_vring_addr(&VringAddr {
                index: u32::from(q),
                flags: 0,
                desc: cfg.desc_addr,
                used: cfg.device_addr,
                avail: cfg.driver_addr,
                log: 0,
            })?;
            c.set_vring_fd(req::SET_VRING_KICK, q, kick.as_raw_fd())?;
            c.set_vring_fd(req::SET_VRING_CALL, q, call.as_fd().as_raw_fd())?;
            c.set_vring_fd(req::SET_VRING_ERR, q, err.as_fd().as_raw_fd())?;
            if protocol {
                c.set_vring_enable(q, true)?;
            }
            Ok(())
        });
        if r.is_ok() {
            s.slots[i].running = Some(Running {
                cfg,
                call,
                err,
                notifier,
                kick,
                lost: false,
            });
            self.poke();
        }
        let lost = s.lose_on_fatal(self, &r);
        drop(s);
        if let Some(l) = lost {
            l.report();
        }
        r.map_err(engine_err)
    }

    /// Stop ring `q` (GET_VRING_BASE) and return where it stopped.
    pub(crate) fn queue_stop(&self, q: u16) -> Result<QueueState, emudev_virtio::EngineError> {
        let mut s = self.lock();
        let Some(run) = s
            .slots
            .get_mut(usize::from(q))
            .and_then(|slot| slot.running.take())
        else {
            return Err(emudev_virtio::EngineError::QueueNotStarted(q));
        };
        self.poke();
        let used = s.used_idx(&run.cfg);
        let mut state = QueueState {
            next_avail: used,
            next_used: used,
            ..QueueState::default()
        };
        let mut lost = None;
        if !run.lost {
            if let Some(c) = s.conn.as_mut() {
                let r = c.get_vring_base(q);
                match &r {
                    Ok(avail) => state.next_avail = *avail,
                    Err(e) => warn!("{}: GET_VRING_BASE of ring {q}: {e}", self.name),
                }
                lost = s.lose_on_fatal(self, &r);
            }
        }
        drop(s);
        // A completion signalled just before the stop still reaches the driver.
        if run.call.read().is_ok_and(|n| n > 0) {
            run.notifier.notify();
        }
        if let Some(l) = lost {
            l.report();
        }
        Ok(state)
    }

    pub(crate) fn set_queue_base(&self, q: u16, state: QueueState) {
        let mut s = self.lock();
        let i = usize::from(q);
        if i < MAX_RINGS {
            if s.slots.len() <= i {
                s.slots.resize_with(i + 1, Slot::default);
            }
            s.slots[i].base = Some(state);
        }
    }

    pub(crate) fn kick(&self, q: u16) {
        let s = self.lock();
        if let Some(r) = s.slots.get(usize::from(q)).and_then(|x| x.running.as_ref()) {
            r.kick.signal();
        }
    }

    pub(crate) fn set_error_callback(&self, cb: QueueErrorCallback) {
        self.lock().err_cb = Some(cb);
    }

    /// The monitor saw the socket `watch` hang up.
    pub(crate) fn hung_up(&self, watch: &Arc<OwnedFd>) {
        let lost = {
            let mut s = self.lock();
            if !s.watch.as_ref().is_some_and(|w| Arc::ptr_eq(w, watch)) {
                return;
            }
            warn!("{}: vhost-user backend hung up", self.name);
            s.lose(self, "the vhost-user backend disconnected")
        };
        lost.report();
    }

    /// The monitor's periodic reconnect attempt; true when connected afterwards.
    pub(crate) fn try_reconnect(&self) -> bool {
        let mut s = self.lock();
        if s.conn.is_some() {
            return true;
        }
        // Rings were lost with the old connection; the next ring start sends the table.
        self.reconnect(&mut s).is_ok()
    }
}

impl State {
    fn send_features(&mut self) -> Result<(), ConnError> {
        let (Some(f), false) = (self.features, self.features_sent) else {
            return Ok(());
        };
        let offered = self.info.features;
        let c = self.conn.as_mut().ok_or(ConnError::Broken)?;
        c.set_features((f & offered) | (offered & F_PROTOCOL_FEATURES))?;
        self.features_sent = true;
        Ok(())
    }

    fn send_table(&mut self) -> Result<(), ConnError> {
        let key = self.table.key();
        // An empty table is never sent: nothing can run without memory.
        if self.sent.as_ref() == Some(&key) || key.is_empty() {
            return Ok(());
        }
        // A table that drops memory under a running ring is held back: backends cannot
        // run a ring they cannot map (libvhost-user panics). QEMU passes through such
        // tables inside one memory transaction (unmap, then map the pieces again); the
        // backend keeps its old mapping of the same files until a table that covers the
        // rings again arrives.
        if let Some(q) = self.uncovered_ring() {
            log::debug!("SET_MEM_TABLE held back: it does not cover running ring {q}");
            return Ok(());
        }
        let wire = self.table.wire().map_err(ConnError::Invalid)?;
        let c = self.conn.as_mut().ok_or(ConnError::Broken)?;
        c.set_mem_table(&wire)?;
        self.sent = Some(key);
        Ok(())
    }

    /// A running ring the current table does not cover.
    fn uncovered_ring(&self) -> Option<usize> {
        self.slots.iter().position(|slot| {
            slot.running.as_ref().is_some_and(|r| {
                let size = u64::from(r.cfg.size);
                let covered = self.table.covers(r.cfg.desc_addr, 16 * size)
                    && self.table.covers(r.cfg.driver_addr, 6 + 2 * size)
                    && self.table.covers(r.cfg.device_addr, 6 + 8 * size);
                !r.lost && !covered
            })
        })
    }

    /// The used index the driver sees in guest memory (0 if unreadable).
    fn used_idx(&self, cfg: &QueueConfig) -> u16 {
        self.mem
            .as_ref()
            .and_then(|m| {
                cfg.device_addr
                    .checked_add(2)
                    .and_then(|a| m.read_obj::<u16>(a).ok())
            })
            .map_or(0, u16::from_le)
    }

    fn lose_on_fatal<T>(&mut self, b: &Backend, r: &Result<T, ConnError>) -> Option<Lost> {
        match r {
            Err(e) if e.is_fatal() && self.conn.is_some() => {
                warn!("{}: dropping the vhost-user connection: {e}", b.name);
                Some(self.lose(b, &format!("vhost-user backend failed: {e}")))
            }
            _ => None,
        }
    }

    /// Drop the connection; every running ring is lost.
    fn lose(&mut self, b: &Backend, reason: &str) -> Lost {
        self.conn = None;
        self.watch = None;
        self.sent = None;
        self.features_sent = false;
        self.disconnects += 1;
        let mut queues = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(r) = slot.running.as_mut().filter(|r| !r.lost) {
                r.lost = true;
                // Bounded by MAX_RINGS.
                queues.push(i as u16);
            }
        }
        b.poke();
        Lost {
            queues,
            cb: self.err_cb.clone(),
            reason: reason.to_string(),
        }
    }
}
