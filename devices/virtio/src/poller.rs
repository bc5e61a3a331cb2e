//! Polling threads that run the virtqueues of one or more devices.
//!
//! Each thread owns several queues (assigned round-robin) and loops: process every active
//! queue in bursts through its [`QueueHandler`], publish the burst's completions with one
//! `flush_used`, and raise interrupts per the [`IrqPolicy`]. After `idle_before_sleep` without
//! work it re-enables driver notifications, re-checks the rings (no lost kick), and sleeps in
//! `poll(2)` on the kick eventfds, handler wake fds and its control eventfd.
//!
//! Control (add/stop queue, memory change, pause/resume) arrives on a channel and is applied
//! between bursts, so acks come within one loop iteration plus the time in-flight requests of
//! the device need to finish. A broken ring stops only its own queue and is reported through
//! the engine's error callback.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender, TryRecvError};
use emudev::GuestMemory;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::engine::{
    Completer, Completion, Engine, EngineError, Kick, Notifier, QueueErrorCallback,
};
use crate::queue::{Queue, QueueConfig, QueueError, QueueState};

/// The device-specific work on one queue (virtio-blk, virtio-net, ...).
pub trait QueueHandler: Send {
    /// Pop and handle up to `budget` chains and/or reap finished requests, staging their
    /// completions with `q.add_used`. Returns the work done (0 = idle). The poller flushes.
    /// Ring errors from `q.pop()` are recorded in the queue; just return.
    fn process(&mut self, q: &mut Queue, budget: usize) -> usize;

    /// Reap finished requests without popping new ones (while the queue stops or the device
    /// quiesces). Synchronous handlers keep the default.
    fn poll_completions(&mut self, _q: &mut Queue) -> usize {
        0
    }

    /// Requests popped but not yet completed.
    fn in_flight(&self) -> usize {
        0
    }

    /// An fd that becomes readable when in-flight requests finish (e.g. an io_uring or AIO
    /// eventfd), so the poller can sleep while requests are in flight.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }

    /// The queue switched to a new memory snapshot (no request was in flight).
    fn memory_changed(&mut self, _mem: &Arc<GuestMemory>) {}

    /// True when the buffers the driver made available are not work by themselves: the
    /// handler fills them only when its [`QueueHandler::wake_fd`] (a backend) has data, as a
    /// NIC's receive queue with room does. The poller then sleeps with buffers available
    /// instead of spinning on them.
    fn avail_is_idle(&self) -> bool {
        false
    }
}

/// Builds the handler of each started queue.
pub type HandlerFactory = Box<dyn FnMut(u16, &Queue) -> Box<dyn QueueHandler> + Send>;

/// When used-buffer interrupts are raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqPolicy {
    /// Right after each burst's flush (lowest latency).
    EndOfBurst,
    /// Once per loop iteration, after all queues of the thread were processed.
    EndOfIteration,
    /// After `max_completions` completions or `max_delay`, whichever comes first (and always
    /// before sleeping).
    Coalesce {
        max_completions: u32,
        max_delay: Duration,
    },
}

/// Tuning of the poller threads.
///
/// After the last work a thread keeps polling for an idle window before it sleeps on its
/// eventfds. The window adapts per thread between `idle_before_sleep` and `max_idle_spin`
/// (see [`SpinWindow`]): it grows when work came shortly after the thread went to sleep (a
/// longer spin would have caught it without a kick and a wakeup) and shrinks when the thread
/// slept longer than any window could cover, or when idle polling used more than
/// `spin_budget_pct` of the thread's wall time. Equal bounds give a fixed window.
#[derive(Debug, Clone, Copy)]
pub struct PollerConfig {
    /// Chains handed to a handler per burst.
    pub budget: usize,
    /// Shortest idle window (and the starting one).
    pub idle_before_sleep: Duration,
    /// Longest idle window the adaptation may reach; below `idle_before_sleep` it is raised
    /// to it.
    pub max_idle_spin: Duration,
    /// Share of wall time (percent, 1..=100) a thread may spend polling idle queues before its
    /// window stops growing and shrinks. On a host whose cores are shared with the vCPUs
    /// (2-core TCG machines) idle polling takes CPU from the guest, and measured QD1 latency
    /// got worse with long spins; with dedicated cores raise it (100: no limit).
    pub spin_budget_pct: u8,
    /// Give the CPU to other runnable threads (`sched_yield`) between idle polls once the
    /// thread has been idle this long. `None` (default): never. Measured harmful on a loaded
    /// host: a yielding poller with notifications off can lose the CPU for a whole slice.
    pub yield_after: Option<Duration>,
    pub irq: IrqPolicy,
}

impl Default for PollerConfig {
    fn default() -> Self {
        Self {
            budget: 64,
            idle_before_sleep: Duration::from_micros(DEFAULT_MIN_SPIN_US),
            max_idle_spin: Duration::from_micros(DEFAULT_MAX_SPIN_US),
            spin_budget_pct: DEFAULT_SPIN_BUDGET_PCT,
            yield_after: None,
            irq: IrqPolicy::EndOfBurst,
        }
    }
}

impl PollerConfig {
    /// A fixed idle window of `d` (no adaptation), as before adaptive polling.
    pub fn fixed_spin(d: Duration) -> Self {
        Self {
            idle_before_sleep: d,
            max_idle_spin: d,
            ..Self::default()
        }
    }

    /// An adaptive window bounded by `max` (the lower bound stays the default, or `max` if
    /// that is smaller).
    pub fn adaptive_spin(max: Duration) -> Self {
        let d = Self::default();
        Self {
            idle_before_sleep: d.idle_before_sleep.min(max),
            max_idle_spin: max,
            ..d
        }
    }
}

// The idle window and its defaults live in the emudev layer, shared with other pollers.
pub use emudev::poller::{
    SpinWindow, DEFAULT_MAX_SPIN_US, DEFAULT_MIN_SPIN_US, DEFAULT_SPIN_BUDGET_PCT,
};

/// Per-queue counters, readable from any thread.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Work units (requests) handlers reported.
    pub requests: AtomicU64,
    /// Kick eventfd signals consumed.
    pub kicks: AtomicU64,
    pub interrupts: AtomicU64,
    /// Handler invocations.
    pub polls: AtomicU64,
    /// Thread time spent awake (polling) while this queue was on it.
    pub poll_ns: AtomicU64,
    /// Thread time spent asleep while this queue was on it.
    pub sleep_ns: AtomicU64,
    pub errors: AtomicU64,
}

/// Per-thread counters.
#[derive(Debug, Default)]
pub struct ThreadStats {
    pub iterations: AtomicU64,
    pub sleeps: AtomicU64,
    pub poll_ns: AtomicU64,
    pub sleep_ns: AtomicU64,
    /// The current adaptive idle window, ns (see [`SpinWindow`]).
    pub spin_window_ns: AtomicU64,
}

/// Waits for several threads to acknowledge one operation.
struct Countdown {
    left: AtomicUsize,
    done: Mutex<Option<Completer<()>>>,
}

impl Countdown {
    fn new(n: usize) -> (Arc<Self>, Completion<()>) {
        let (c, done) = Completion::pair();
        let cd = Arc::new(Self {
            left: AtomicUsize::new(n),
            done: Mutex::new(Some(c)),
        });
        if n == 0 {
            cd.finish();
        }
        (cd, done)
    }

    fn finish(&self) {
        if let Ok(mut g) = self.done.lock() {
            if let Some(c) = g.take() {
                c.complete(Ok(()));
            }
        }
    }

    fn arrive(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }
}

type QueueKey = (u64, u16);

/// Add to a counter only this thread writes (cheaper than a locked read-modify-write).
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

enum Ctl {
    /// Not acknowledged: `queue_start` completes when it sends this (see there).
    AddQueue(Box<Slot>),
    StopQueue(QueueKey, Completer<QueueState>),
    StopDevice(u64, Arc<Countdown>),
    Memory(u64, Arc<GuestMemory>, Arc<Countdown>),
    Pause(u64, Arc<Countdown>),
    Resume(u64, Arc<Countdown>),
    Shutdown,
}

struct ThreadHandle {
    tx: Sender<Ctl>,
    wake: Arc<EventFd>,
    join: Option<JoinHandle<()>>,
    stats: Arc<ThreadStats>,
    tid: Arc<AtomicI32>,
}

/// A set of poller threads shared by devices.
pub struct PollerPool {
    threads: Vec<ThreadHandle>,
    next_thread: AtomicUsize,
    next_dev: AtomicU64,
}

impl std::fmt::Debug for PollerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollerPool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl PollerPool {
    /// `n_threads` poller threads (at least one) with the default configuration.
    pub fn new(n_threads: usize) -> std::io::Result<Arc<Self>> {
        Self::with_config(n_threads, PollerConfig::default())
    }

    pub fn with_config(n_threads: usize, cfg: PollerConfig) -> std::io::Result<Arc<Self>> {
        let mut threads = Vec::new();
        for i in 0..n_threads.max(1) {
            let (tx, rx) = unbounded();
            let wake = Arc::new(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .map_err(std::io::Error::from)?,
            );
            let stats = Arc::new(ThreadStats::default());
            let tid = Arc::new(AtomicI32::new(0));
            let mut w = Worker {
                rx,
                wake: wake.clone(),
                cfg,
                slots: Vec::new(),
                devs: HashMap::new(),
                tombstones: HashMap::new(),
                stats: stats.clone(),
                pollfds: Vec::new(),
                device_stops: Vec::new(),
            };
            let t = tid.clone();
            let join = std::thread::Builder::new()
                .name(format!("vq-poller-{i}"))
                .spawn(move || {
                    t.store(nix::unistd::gettid().as_raw(), Ordering::Release);
                    w.run();
                })?;
            threads.push(ThreadHandle {
                tx,
                wake,
                join: Some(join),
                stats,
                tid,
            });
        }
        Ok(Arc::new(Self {
            threads,
            next_thread: AtomicUsize::new(0),
            next_dev: AtomicU64::new(1),
        }))
    }

    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    pub fn thread_stats(&self, i: usize) -> Option<Arc<ThreadStats>> {
        self.threads.get(i).map(|t| t.stats.clone())
    }

    /// Kernel thread id of poller `i` (0 until the thread started).
    pub fn thread_tid(&self, i: usize) -> Option<i32> {
        self.threads.get(i).map(|t| t.tid.load(Ordering::Acquire))
    }

    /// CPU time consumed so far by poller thread `i`.
    pub fn thread_cpu_time(&self, i: usize) -> Option<Duration> {
        use std::os::unix::thread::JoinHandleExt;
        let h = self.threads.get(i)?.join.as_ref()?;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the pthread handle belongs to a thread we have not joined yet (joined only
        // in Drop), and `clock` is a valid out pointer.
        let rc = unsafe { libc::pthread_getcpuclockid(h.as_pthread_t(), &mut clock) };
        if rc != 0 {
            return None;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out pointer; `clock` came from pthread_getcpuclockid.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    fn send(&self, t: usize, msg: Ctl) -> Result<(), EngineError> {
        let th = self.threads.get(t).ok_or(EngineError::Shutdown)?;
        th.tx.send(msg).map_err(|_| EngineError::Shutdown)?;
        let _ = th.wake.write(1);
        Ok(())
    }

    /// Send one message per thread, built by `f`, with a shared countdown.
    fn broadcast(&self, f: impl Fn(Arc<Countdown>) -> Ctl) -> Completion<()> {
        let (cd, done) = Countdown::new(self.threads.len());
        for t in 0..self.threads.len() {
            if self.send(t, f(cd.clone())).is_err() {
                cd.arrive();
            }
        }
        done
    }

    /// An engine for one device whose queue handlers `factory` builds.
    pub fn engine(self: &Arc<Self>, factory: HandlerFactory) -> PollerEngine {
        PollerEngine {
            pool: self.clone(),
            dev: self.next_dev.fetch_add(1, Ordering::Relaxed),
            factory,
            features: 0,
            mem: Arc::new(GuestMemory::empty()),
            queues: HashMap::new(),
            bases: HashMap::new(),
            on_error: Arc::new(|q, e| log::error!("virtqueue {q} stopped: {e}")),
        }
    }
}

impl Drop for PollerPool {
    fn drop(&mut self) {
        for t in &self.threads {
            let _ = t.tx.send(Ctl::Shutdown);
            let _ = t.wake.write(1);
        }
        for t in &mut self.threads {
            if let Some(j) = t.join.take() {
                let _ = j.join();
            }
        }
    }
}

struct QueueEntry {
    thread: usize,
    kick: Kick,
    stats: Arc<QueueStats>,
}

/// The built-in [`Engine`]: runs a device's queues on a [`PollerPool`].
pub struct PollerEngine {
    pool: Arc<PollerPool>,
    dev: u64,
    factory: HandlerFactory,
    features: u64,
    mem: Arc<GuestMemory>,
    queues: HashMap<u16, QueueEntry>,
    bases: HashMap<u16, QueueState>,
    on_error: QueueErrorCallback,
}

impl std::fmt::Debug for PollerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollerEngine")
            .field("dev", &self.dev)
            .field("features", &self.features)
            .finish()
    }
}

impl PollerEngine {
    /// Counters of a started queue.
    pub fn queue_stats(&self, qidx: u16) -> Option<Arc<QueueStats>> {
        self.queues.get(&qidx).map(|q| q.stats.clone())
    }

    /// Stop popping new requests on every queue of this device; completes once none is in
    /// flight.
    pub fn pause(&mut self) -> Completion {
        let dev = self.dev;
        self.pool.broadcast(|cd| Ctl::Pause(dev, cd))
    }

    /// Undo [`PollerEngine::pause`].
    pub fn resume(&mut self) -> Completion {
        let dev = self.dev;
        self.pool.broadcast(|cd| Ctl::Resume(dev, cd))
    }
}

impl Engine for PollerEngine {
    fn features_changed(&mut self, features: u64) -> Completion {
        self.features = features;
        Completion::ready(Ok(()))
    }

    fn memory_changed(&mut self, mem: Arc<GuestMemory>) -> Completion {
        self.mem = mem.clone();
        let dev = self.dev;
        self.pool.broadcast(|cd| Ctl::Memory(dev, mem.clone(), cd))
    }

    fn queue_start(
        &mut self,
        qidx: u16,
        cfg: QueueConfig,
        notifier: Arc<dyn Notifier>,
        kick: Kick,
    ) -> Completion {
        if self.queues.contains_key(&qidx) {
            return Completion::ready(Err(EngineError::QueueAlreadyStarted(qidx)));
        }
        let base = self.bases.remove(&qidx).unwrap_or_default();
        let queue = match Queue::with_state(cfg, self.features, self.mem.clone(), base) {
            Ok(q) => q,
            Err(err) => return Completion::ready(Err(EngineError::Queue { qidx, err })),
        };
        // No ring access here: this is the control thread, and for message-backed memory a
        // ring access would be a DMA message the control thread itself must route. The
        // poller thread disables notifications when it adopts the queue.
        let handler = (self.factory)(qidx, &queue);
        let stats = Arc::new(QueueStats::default());
        let n = self.pool.thread_count().max(1);
        let thread = self.pool.next_thread.fetch_add(1, Ordering::Relaxed) % n;
        let slot = Box::new(Slot {
            dev: self.dev,
            qidx,
            queue,
            handler,
            notifier,
            kick: kick.clone(),
            stats: stats.clone(),
            on_error: self.on_error.clone(),
            stopping: None,
            failed: None,
            irq_pending: false,
            irq_count: 0,
            irq_since: None,
        });
        if let Err(e) = self.pool.send(thread, Ctl::AddQueue(slot)) {
            return Completion::ready(Err(e));
        }
        self.queues.insert(
            qidx,
            QueueEntry {
                thread,
                kick,
                stats,
            },
        );
        // Complete now rather than on the poller's ack: the poller may be blocked in a DMA
        // message of another queue that only the (waiting) control thread can route. The
        // queue is validated above, and later control messages to the thread are ordered
        // after the AddQueue.
        Completion::ready(Ok(()))
    }

    fn queue_stop(&mut self, qidx: u16) -> Completion<QueueState> {
        let Some(e) = self.queues.remove(&qidx) else {
            return Completion::ready(Err(EngineError::QueueNotStarted(qidx)));
        };
        let (c, done) = Completion::pair();
        if let Err(err) = self
            .pool
            .send(e.thread, Ctl::StopQueue((self.dev, qidx), c))
        {
            return Completion::ready(Err(err));
        }
        done
    }

    fn set_queue_base(&mut self, qidx: u16, state: QueueState) {
        self.bases.insert(qidx, state);
    }

    fn kick(&mut self, qidx: u16) {
        if let Some(e) = self.queues.get(&qidx) {
            e.kick.signal();
        }
    }

    fn set_error_callback(&mut self, cb: QueueErrorCallback) {
        self.on_error = cb;
    }

    fn pause(&mut self) -> Completion {
        PollerEngine::pause(self)
    }

    fn resume(&mut self) -> Completion {
        PollerEngine::resume(self)
    }

    fn destroy(&mut self) -> Completion {
        self.queues.clear();
        let dev = self.dev;
        self.pool.broadcast(|cd| Ctl::StopDevice(dev, cd))
    }
}

impl Drop for PollerEngine {
    fn drop(&mut self) {
        if !self.queues.is_empty() {
            let _ = self.destroy();
        }
    }
}

struct Slot {
    dev: u64,
    qidx: u16,
    queue: Queue,
    handler: Box<dyn QueueHandler>,
    notifier: Arc<dyn Notifier>,
    kick: Kick,
    stats: Arc<QueueStats>,
    on_error: QueueErrorCallback,
    stopping: Option<Completer<QueueState>>,
    /// Set when the handler panicked.
    failed: Option<QueueError>,
    irq_pending: bool,
    irq_count: u32,
    irq_since: Option<Instant>,
}

impl Slot {
    fn fire(&mut self) {
        if self.irq_pending {
            self.notifier.notify();
            bump(&self.stats.interrupts, 1);
            self.irq_pending = false;
            self.irq_count = 0;
            self.irq_since = None;
        }
    }
}

#[derive(Default)]
struct DevCtl {
    paused: bool,
    pause_waiters: Vec<Arc<Countdown>>,
    mem: Option<(Arc<GuestMemory>, Vec<Arc<Countdown>>)>,
}

impl DevCtl {
    fn quiescing(&self) -> bool {
        self.paused || self.mem.is_some()
    }
}

struct Worker {
    rx: Receiver<Ctl>,
    wake: Arc<EventFd>,
    cfg: PollerConfig,
    slots: Vec<Slot>,
    devs: HashMap<u64, DevCtl>,
    /// State of queues that stopped on an error, for a later `queue_stop`.
    tombstones: HashMap<QueueKey, QueueState>,
    stats: Arc<ThreadStats>,
    pollfds: Vec<libc::pollfd>,
    /// Device stops waiting for their queues to drain.
    device_stops: Vec<(u64, Vec<Completion<QueueState>>, Arc<Countdown>)>,
}

impl Worker {
    fn run(&mut self) {
        let mut window = SpinWindow::with_budget(
            self.cfg.idle_before_sleep,
            self.cfg.max_idle_spin,
            self.cfg.spin_budget_pct,
        );
        self.publish_window(&window);
        let mut last_work = Instant::now();
        let mut awake_since = Instant::now();
        // End of the last iteration that found nothing, since `last_work`.
        let mut last_idle: Option<Instant> = None;
        loop {
            if !self.handle_ctl() {
                return;
            }
            let work = self.iteration();
            bump(&self.stats.iterations, 1);
            let now = Instant::now();
            if work > 0 {
                if let Some(t) = last_idle.take() {
                    window.spun(t.saturating_duration_since(last_work), now);
                }
                last_work = now;
                continue;
            }
            last_idle = Some(now);
            let idle = now.duration_since(last_work);
            if idle >= window.get() {
                if let Some(wake) = self.try_sleep(now.duration_since(awake_since)) {
                    window.spun(idle, now);
                    last_idle = None;
                    if wake.by_work {
                        window.woken_by_work(idle, wake.slept);
                        self.publish_window(&window);
                    }
                    awake_since = Instant::now();
                    last_work = awake_since;
                }
            } else if self.cfg.yield_after.is_some_and(|y| idle >= y) {
                // Spinning with nothing to do: let a runnable vCPU have this core first.
                std::thread::yield_now();
            }
        }
    }

    fn publish_window(&self, w: &SpinWindow) {
        let ns = u64::try_from(w.get().as_nanos()).unwrap_or(u64::MAX);
        self.stats.spin_window_ns.store(ns, Ordering::Relaxed);
    }

    /// One pass over all queues; returns the work done.
    fn iteration(&mut self) -> usize {
        let budget = self.cfg.budget;
        let policy = self.cfg.irq;
        let any_quiescing = self.devs.values().any(DevCtl::quiescing);
        let now = Instant::now();
        let mut work = 0;
        let mut broken = false;
        for slot in &mut self.slots {
            let quiesce = slot.stopping.is_some()
                || (any_quiescing && self.devs.get(&slot.dev).is_some_and(DevCtl::quiescing));
            // A panicking handler takes down its queue only, like a broken ring.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if quiesce {
                    slot.handler.poll_completions(&mut slot.queue)
                } else {
                    slot.handler.process(&mut slot.queue, budget)
                }
            }));
            let n = match ran {
                Ok(n) => n,
                Err(_) => {
                    slot.failed = Some(QueueError::HandlerFailed);
                    broken = true;
                    0
                }
            };
            bump(&slot.stats.polls, 1);
            if n > 0 {
                work += n;
                bump(&slot.stats.requests, n as u64);
            }
            if slot.queue.staged() > 0 && slot.queue.flush_used() {
                slot.irq_pending = true;
                slot.irq_since.get_or_insert(now);
            }
            if slot.irq_pending {
                slot.irq_count = slot.irq_count.saturating_add(n as u32);
            }
            if slot.queue.error().is_some() {
                broken = true;
            }
            match policy {
                IrqPolicy::EndOfBurst => slot.fire(),
                IrqPolicy::EndOfIteration => {}
                IrqPolicy::Coalesce {
                    max_completions,
                    max_delay,
                } => {
                    if slot.irq_pending
                        && (slot.irq_count >= max_completions
                            || slot
                                .irq_since
                                .is_some_and(|t| now.duration_since(t) >= max_delay))
                    {
                        slot.fire();
                    }
                }
            }
        }
        if policy == IrqPolicy::EndOfIteration {
            for slot in &mut self.slots {
                slot.fire();
            }
        }
        if broken {
            self.reap_broken();
        }
        self.finish_stops();
        self.finish_quiesce();
        if !self.device_stops.is_empty() {
            let devs = &mut self.devs;
            self.device_stops.retain_mut(|(dev, left, cd)| {
                left.retain(|c| c.try_get().is_none());
                if left.is_empty() {
                    devs.remove(dev);
                    cd.arrive();
                    false
                } else {
                    true
                }
            });
        }
        work
    }

    fn reap_broken(&mut self) {
        let mut i = 0;
        while i < self.slots.len() {
            let s = &self.slots[i];
            let Some(err) = s.failed.clone().or_else(|| s.queue.error().cloned()) else {
                i += 1;
                continue;
            };
            let mut slot = self.slots.swap_remove(i);
            slot.fire();
            slot.stats.errors.fetch_add(1, Ordering::Relaxed);
            let state = slot.queue.state();
            log::warn!("device {} queue {} broken: {err}", slot.dev, slot.qidx);
            (slot.on_error)(slot.qidx, &err);
            if let Some(c) = slot.stopping.take() {
                c.complete(Ok(state));
            } else {
                self.tombstones.insert((slot.dev, slot.qidx), state);
            }
        }
    }

    fn finish_stops(&mut self) {
        let mut i = 0;
        while i < self.slots.len() {
            let s = &self.slots[i];
            if s.stopping.is_none() || s.handler.in_flight() > 0 {
                i += 1;
                continue;
            }
            let mut slot = self.slots.swap_remove(i);
            if slot.queue.flush_used() {
                slot.irq_pending = true;
            }
            slot.fire();
            let state = slot.queue.state();
            if let Some(c) = slot.stopping.take() {
                c.complete(Ok(state));
            }
        }
    }

    fn finish_quiesce(&mut self) {
        for (dev, ctl) in self.devs.iter_mut() {
            if !ctl.quiescing() {
                continue;
            }
            let busy = self
                .slots
                .iter()
                .any(|s| s.dev == *dev && s.handler.in_flight() > 0);
            if busy {
                continue;
            }
            if let Some((mem, acks)) = ctl.mem.take() {
                for s in self.slots.iter_mut().filter(|s| s.dev == *dev) {
                    match s.queue.set_memory(mem.clone()) {
                        Ok(true) => s.irq_pending = true,
                        Ok(false) => {}
                        Err(_) => continue, // reaped on the next iteration
                    }
                    s.handler.memory_changed(&mem);
                    s.fire();
                }
                for a in acks {
                    a.arrive();
                }
            }
            if ctl.paused {
                for a in ctl.pause_waiters.drain(..) {
                    a.arrive();
                }
            }
        }
    }

    /// Apply pending control messages; false on shutdown.
    fn handle_ctl(&mut self) -> bool {
        loop {
            let msg = match self.rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            };
            match msg {
                Ctl::AddQueue(mut slot) => {
                    let key = (slot.dev, slot.qidx);
                    self.tombstones.remove(&key);
                    self.devs.entry(slot.dev).or_default();
                    slot.queue.disable_notifications();
                    self.slots.push(*slot);
                }
                Ctl::StopQueue(key, ack) => {
                    if let Some(s) = self
                        .slots
                        .iter_mut()
                        .find(|s| (s.dev, s.qidx) == key && s.stopping.is_none())
                    {
                        s.stopping = Some(ack);
                    } else if let Some(st) = self.tombstones.remove(&key) {
                        ack.complete(Ok(st));
                    } else {
                        ack.complete(Err(EngineError::QueueNotStarted(key.1)));
                    }
                }
                Ctl::StopDevice(dev, cd) => {
                    // Abandon nothing silently: wait for in-flight requests like a stop.
                    let mut left = Vec::new();
                    for s in self.slots.iter_mut().filter(|s| s.dev == dev) {
                        if s.stopping.is_none() {
                            let (c, done) = Completion::pair();
                            s.stopping = Some(c);
                            left.push(done);
                        }
                    }
                    self.tombstones.retain(|k, _| k.0 != dev);
                    if left.is_empty() {
                        self.devs.remove(&dev);
                        cd.arrive();
                    } else {
                        self.device_stops.push((dev, left, cd));
                    }
                }
                Ctl::Memory(dev, mem, cd) => {
                    let ctl = self.devs.entry(dev).or_default();
                    match &mut ctl.mem {
                        Some((m, acks)) => {
                            *m = mem;
                            acks.push(cd);
                        }
                        None => ctl.mem = Some((mem, vec![cd])),
                    }
                }
                Ctl::Pause(dev, cd) => {
                    let ctl = self.devs.entry(dev).or_default();
                    ctl.paused = true;
                    ctl.pause_waiters.push(cd);
                }
                Ctl::Resume(dev, cd) => {
                    if let Some(ctl) = self.devs.get_mut(&dev) {
                        ctl.paused = false;
                        for a in ctl.pause_waiters.drain(..) {
                            a.arrive();
                        }
                    }
                    cd.arrive();
                }
                Ctl::Shutdown => return false,
            }
        }
    }

    /// Re-enable notifications and sleep if every queue is still empty. Returns how the
    /// sleep went, or `None` if work showed up before it.
    fn try_sleep(&mut self, awake: Duration) -> Option<Wake> {
        for s in &mut self.slots {
            s.fire();
        }
        let pending_ops = self.devs.values().any(DevCtl::quiescing)
            && self.slots.iter().any(|s| s.handler.in_flight() > 0);
        if pending_ops
            || !self.device_stops.is_empty()
            || self.slots.iter().any(|s| {
                s.stopping.is_some() || (s.handler.in_flight() > 0 && s.handler.wake_fd().is_none())
            })
        {
            return None;
        }
        // Drain before enabling: a kick after the enable must wake us.
        for s in &self.slots {
            let k = s.kick.drain();
            if k > 0 {
                s.stats.kicks.fetch_add(k, Ordering::Relaxed);
            }
        }
        let mut busy = false;
        for s in &mut self.slots {
            let paused = self.devs.get(&s.dev).is_some_and(DevCtl::quiescing);
            if !paused
                && s.queue.error().is_none()
                && s.queue.enable_notifications()
                && !s.handler.avail_is_idle()
            {
                busy = true;
            }
        }
        if busy || self.slots.iter().any(|s| s.queue.error().is_some()) {
            for s in &mut self.slots {
                s.queue.disable_notifications();
            }
            return None;
        }
        self.pollfds.clear();
        self.pollfds.push(libc::pollfd {
            fd: self.wake.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for s in &self.slots {
            self.pollfds.push(libc::pollfd {
                fd: s.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            if let Some(fd) = s.handler.wake_fd() {
                self.pollfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        let start = Instant::now();
        let mut by_work = false;
        if self.rx.is_empty() {
            // SAFETY: `pollfds` is a valid array of `len` pollfd structs that outlives the
            // call; the fds are owned by slots/self and stay open during it.
            let _ = unsafe {
                libc::poll(
                    self.pollfds.as_mut_ptr(),
                    self.pollfds.len() as libc::nfds_t,
                    -1,
                )
            };
            // Entry 0 is the control eventfd; any other ready fd is a kick or a completion.
            by_work = self.pollfds.iter().skip(1).any(|p| p.revents != 0);
        }
        let slept = start.elapsed();
        let _ = self.wake.read();
        let (a, b) = (awake.as_nanos() as u64, slept.as_nanos() as u64);
        self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
        self.stats.poll_ns.fetch_add(a, Ordering::Relaxed);
        self.stats.sleep_ns.fetch_add(b, Ordering::Relaxed);
        for s in &mut self.slots {
            s.stats.poll_ns.fetch_add(a, Ordering::Relaxed);
            s.stats.sleep_ns.fetch_add(b, Ordering::Relaxed);
            let k = s.kick.drain();
            if k > 0 {
                s.stats.kicks.fetch_add(k, Ordering::Relaxed);
            }
            s.queue.disable_notifications();
        }
        Some(Wake { slept, by_work })
    }
}

/// How a poller thread's sleep ended.
struct Wake {
    slept: Duration,
    /// A kick or a handler's wake fd ended it (not a control message).
    by_work: bool,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::queue::features;
    use crate::queue::testdriver::{
        anon_memory, anon_region, mapped_memory, message_memory, Buf, PackedDriver, SplitDriver,
    };
    use crate::queue::{DescChain, QueueError};

    const BASE: u64 = 0x10_0000;
    const MEM: usize = 0x40_0000;
    const DATA: u64 = BASE + 0x20_0000;
    const FEATS: u64 = features::VERSION_1 | features::INDIRECT_DESC | features::EVENT_IDX;
    const T: Duration = Duration::from_secs(5);

    /// Copies the readable part into the writable part.
    struct Echo {
        chain: DescChain,
        buf: Vec<u8>,
    }

    impl QueueHandler for Echo {
        fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
            let mut n = 0;
            while n < budget {
                match q.pop_into(&mut self.chain) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => break,
                }
                let mem = q.memory().clone();
                let mut r = self.chain.reader(&mem);
                self.buf.resize(r.remaining(), 0);
                let len = match r.read_exact(&mut self.buf) {
                    Ok(()) => {
                        let mut w = self.chain.writer(&mem);
                        w.write(&self.buf).map(|k| k as u32).unwrap_or(0)
                    }
                    Err(_) => 0,
                };
                q.add_used(self.chain.head(), len);
                n += 1;
            }
            n
        }
    }

    fn echo_factory() -> HandlerFactory {
        Box::new(|_, _| {
            Box::new(Echo {
                chain: DescChain::new(),
                buf: Vec::new(),
            })
        })
    }

    fn counter() -> (Arc<AtomicU64>, Arc<dyn Notifier>) {
        let c = Arc::new(AtomicU64::new(0));
        let c2 = c.clone();
        (
            c,
            Arc::new(move || {
                c2.fetch_add(1, Ordering::Relaxed);
            }),
        )
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + T;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        f()
    }

    /// Add an echo request and kick if the device asks for it.
    fn submit(d: &mut SplitDriver, kick: &Kick, i: u64) -> u16 {
        d.mem.write(DATA + 0x100 * i, &i.to_le_bytes()).unwrap();
        let old = d.avail_idx();
        let h = d.add_chain(&[
            Buf::r(DATA + 0x100 * i, 8),
            Buf::w(DATA + 0x10_0000 + 0x100 * i, 8),
        ]);
        if d.must_kick(true, old, d.avail_idx()) {
            kick.signal();
        }
        h
    }

    fn collect(d: &mut SplitDriver, n: usize) -> Vec<(u32, u32)> {
        let mut got = Vec::new();
        assert!(
            wait_until(|| {
                while let Some(u) = d.pop_used() {
                    got.push(u);
                }
                got.len() >= n
            }),
            "only {} of {n} completions",
            got.len()
        );
        got
    }

    struct Setup {
        pool: Arc<PollerPool>,
        eng: PollerEngine,
        mem: Arc<GuestMemory>,
    }

    fn setup(mem: Arc<GuestMemory>, factory: HandlerFactory) -> Setup {
        let pool = PollerPool::new(1).unwrap();
        let mut eng = pool.engine(factory);
        eng.features_changed(FEATS).wait_timeout(T).unwrap();
        eng.memory_changed(mem.clone()).wait_timeout(T).unwrap();
        Setup { pool, eng, mem }
    }

    #[test]
    fn echo_requests_complete_over_mapped_and_message_memory() {
        for mem in [anon_memory(BASE, MEM), message_memory(BASE, MEM)] {
            let mut s = setup(mem.clone(), echo_factory());
            let mut d = SplitDriver::new(mem.clone(), BASE, 64);
            let kick = Kick::new().unwrap();
            let (irqs, notifier) = counter();
            s.eng
                .queue_start(0, d.config(), notifier, kick.clone())
                .wait_timeout(T)
                .unwrap();
            let mut done = 0;
            for batch in 0..10u64 {
                for i in 0..20 {
                    submit(&mut d, &kick, batch * 20 + i);
                }
                done += collect(&mut d, 20).len();
            }
            assert_eq!(done, 200);
            for i in 0..200u64 {
                let v: u64 = s.mem.read_obj(DATA + 0x10_0000 + 0x100 * i).unwrap();
                assert_eq!(v, i);
            }
            assert!(wait_until(|| irqs.load(Ordering::Relaxed) > 0));
            let st = s.eng.queue_stats(0).unwrap();
            assert_eq!(st.requests.load(Ordering::Relaxed), 200);
            let state = s.eng.queue_stop(0).wait_timeout(T).unwrap();
            assert_eq!(state.next_avail, 200);
            assert_eq!(state.next_used, 200);
        }
    }

    #[test]
    fn packed_queue_through_the_poller() {
        let mem = anon_memory(BASE, MEM);
        let mut s = setup(mem.clone(), echo_factory());
        s.eng
            .features_changed(FEATS | features::RING_PACKED)
            .wait_timeout(T)
            .unwrap();
        let mut d = PackedDriver::new(mem.clone(), BASE, 16);
        let kick = Kick::new().unwrap();
        let (_irqs, notifier) = counter();
        s.eng
            .queue_start(0, d.config(), notifier, kick.clone())
            .wait_timeout(T)
            .unwrap();
        let mut got = 0;
        for i in 0..100u64 {
            mem.write(DATA, &i.to_le_bytes()).unwrap();
            let id = d.add_chain(&[Buf::r(DATA, 8), Buf::w(DATA + 0x100, 8)]);
            kick.signal();
            assert!(wait_until(|| match d.pop_used() {
                Some((uid, len)) => {
                    assert_eq!((uid, len), (id, 8));
                    true
                }
                None => false,
            }));
            let v: u64 = mem.read_obj(DATA + 0x100).unwrap();
            assert_eq!(v, i);
            got += 1;
        }
        assert_eq!(got, 100);
    }

    #[test]
    fn idle_poller_uses_little_cpu() {
        let mem = anon_memory(BASE, MEM);
        let mut s = setup(mem.clone(), echo_factory());
        let mut d = SplitDriver::new(mem.clone(), BASE, 64);
        let kick = Kick::new().unwrap();
        let (_irqs, notifier) = counter();
        s.eng
            .queue_start(0, d.config(), notifier, kick.clone())
            .wait_timeout(T)
            .unwrap();
        for i in 0..10 {
            submit(&mut d, &kick, i);
        }
        collect(&mut d, 10);
        std::thread::sleep(Duration::from_millis(100));
        let c0 = s.pool.thread_cpu_time(0).unwrap();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        let used = s.pool.thread_cpu_time(0).unwrap() - c0;
        let share = used.as_secs_f64() / t0.elapsed().as_secs_f64();
        assert!(share < 0.02, "idle poller used {:.2}% CPU", share * 100.0);
        let ts = s.pool.thread_stats(0).unwrap();
        assert!(ts.sleeps.load(Ordering::Relaxed) >= 1);
        // And it still wakes up on a kick.
        submit(&mut d, &kick, 11);
        collect(&mut d, 1);
        assert!(s.eng.queue_stats(0).unwrap().kicks.load(Ordering::Relaxed) >= 1);
    }

    fn pool_with(cfg: PollerConfig, mem: &Arc<GuestMemory>) -> (Arc<PollerPool>, PollerEngine) {
        let pool = PollerPool::with_config(1, cfg).unwrap();
        let mut eng = pool.engine(echo_factory());
        eng.features_changed(FEATS).wait_timeout(T).unwrap();
        eng.memory_changed(mem.clone()).wait_timeout(T).unwrap();
        (pool, eng)
    }

    #[test]
    fn requests_shortly_after_sleeping_grow_the_window() {
        let mem = anon_memory(BASE, MEM);
        // A generous upper bound, so scheduling delays on a loaded machine still count as
        // short gaps.
        let cfg = PollerConfig {
            idle_before_sleep: Duration::from_micros(10),
            max_idle_spin: Duration::from_millis(50),
            spin_budget_pct: 100,
            ..PollerConfig::default()
        };
        let (pool, mut eng) = pool_with(cfg, &mem);
        let mut d = SplitDriver::new(mem.clone(), BASE, 64);
        let kick = Kick::new().unwrap();
        let (_i, n) = counter();
        eng.queue_start(0, d.config(), n, kick.clone())
            .wait_timeout(T)
            .unwrap();
        let ts = pool.thread_stats(0).unwrap();
        let window = || Duration::from_nanos(ts.spin_window_ns.load(Ordering::Relaxed));
        assert_eq!(window(), Duration::from_micros(10));
        let mut widest = Duration::ZERO;
        for i in 0..8 {
            // Wait until the poller is asleep, then kick it 300 µs later.
            let sleeps = ts.sleeps.load(Ordering::Relaxed);
            assert!(wait_until(
                || ts.sleeps.load(Ordering::Relaxed) > sleeps || pool_asleep(&pool)
            ));
            std::thread::sleep(Duration::from_micros(300));
            submit(&mut d, &kick, i);
            collect(&mut d, 1);
            widest = widest.max(window());
        }
        assert!(
            widest >= Duration::from_micros(300),
            "window stayed at {widest:?}"
        );
    }

    /// True when poller 0 is blocked in the kernel (state S in /proc).
    fn pool_asleep(pool: &PollerPool) -> bool {
        let tid = pool.thread_tid(0).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| r.trim_start().starts_with('S'))
            })
            .unwrap_or(false)
    }

    /// Fills an available buffer only when its wake eventfd has data (a NIC receive queue).
    struct BackendFed {
        wake: Arc<nix::sys::eventfd::EventFd>,
        chain: DescChain,
    }

    impl QueueHandler for BackendFed {
        fn process(&mut self, q: &mut Queue, _budget: usize) -> usize {
            if self.wake.read().is_err() {
                return 0;
            }
            match q.pop_into(&mut self.chain) {
                Ok(true) => {
                    q.add_used(self.chain.head(), 0);
                    1
                }
                _ => 0,
            }
        }
        fn wake_fd(&self) -> Option<RawFd> {
            Some(self.wake.as_fd().as_raw_fd())
        }
        fn avail_is_idle(&self) -> bool {
            true
        }
    }

    #[test]
    fn available_buffers_waiting_for_a_backend_let_the_poller_sleep() {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let mem = anon_memory(BASE, MEM);
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .unwrap(),
        );
        let w = wake.clone();
        let mut s = setup(
            mem.clone(),
            Box::new(move |_, _| {
                Box::new(BackendFed {
                    wake: w.clone(),
                    chain: DescChain::new(),
                })
            }),
        );
        let mut d = SplitDriver::new(mem.clone(), BASE, 16);
        let kick = Kick::new().unwrap();
        let (_irqs, notifier) = counter();
        s.eng
            .queue_start(0, d.config(), notifier, kick.clone())
            .wait_timeout(T)
            .unwrap();
        // Receive buffers posted, nothing to receive: the poller must sleep, not spin.
        for i in 0..8 {
            d.add_chain(&[Buf::w(DATA + 0x100 * i, 64)]);
        }
        kick.signal();
        assert!(wait_until(|| pool_asleep(&s.pool)), "poller never slept");
        let c0 = s.pool.thread_cpu_time(0).unwrap();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        let share =
            (s.pool.thread_cpu_time(0).unwrap() - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
        assert!(
            share < 0.02,
            "idle receive queue: {:.1}% CPU",
            share * 100.0
        );
        // The backend's data wakes it and a buffer is filled.
        wake.write(1).unwrap();
        assert_eq!(collect(&mut d, 1).len(), 1);
        s.eng.destroy().wait_timeout(T).unwrap();
    }

    #[test]
    fn sixteen_idle_queues_sleep_soon_after_a_burst() {
        let mem = anon_memory(BASE, MEM);
        // The widest window the default adaptation can reach, from the start.
        let max = Duration::from_micros(DEFAULT_MAX_SPIN_US);
        let cfg = PollerConfig {
            idle_before_sleep: max,
            max_idle_spin: max,
            ..PollerConfig::default()
        };
        let (pool, mut eng) = pool_with(cfg, &mem);
        let (_i, n) = counter();
        let mut drivers = Vec::new();
        for q in 0..16u16 {
            let d = SplitDriver::new(mem.clone(), BASE + 0x4000 * u64::from(q), 8);
            let kick = Kick::new().unwrap();
            eng.queue_start(q, d.config(), n.clone(), kick.clone())
                .wait_timeout(T)
                .unwrap();
            drivers.push((d, kick));
        }
        // A busy burst over every queue.
        for round in 0..20u64 {
            for (d, kick) in &mut drivers {
                submit(d, kick, round);
            }
            for (d, _) in &mut drivers {
                collect(d, 1);
            }
        }
        let busy_end = pool.thread_cpu_time(0).unwrap();
        // Back to sleep: at most the window plus slack of CPU after the last completion.
        assert!(wait_until(|| pool_asleep(&pool)));
        let to_sleep = pool.thread_cpu_time(0).unwrap() - busy_end;
        assert!(to_sleep < max * 10, "{to_sleep:?} of CPU before sleeping");
        // Idle: under 2% of a core over 200 ms.
        let c0 = pool.thread_cpu_time(0).unwrap();
        let t0 = Instant::now();
        let sleeps = pool.thread_stats(0).unwrap().sleeps.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        let used = pool.thread_cpu_time(0).unwrap() - c0;
        let share = used.as_secs_f64() / t0.elapsed().as_secs_f64();
        assert!(share < 0.02, "16 idle queues: {:.2}% CPU", share * 100.0);
        assert!(pool_asleep(&pool));
        assert_eq!(
            pool.thread_stats(0).unwrap().sleeps.load(Ordering::Relaxed),
            sleeps,
            "woke up while idle"
        );
        // Still responsive on any queue.
        let (d, kick) = &mut drivers[9];
        submit(d, kick, 99);
        collect(d, 1);
        eng.destroy().wait_timeout(T).unwrap();
    }

    #[test]
    fn memory_swap_is_acked_and_queues_keep_working() {
        let region = anon_region(MEM);
        let mem = mapped_memory(BASE, &region);
        let mut s = setup(mem.clone(), echo_factory());
        let mut d = SplitDriver::new(mem.clone(), BASE, 64);
        let kick = Kick::new().unwrap();
        let (_irqs, notifier) = counter();
        s.eng
            .queue_start(0, d.config(), notifier, kick.clone())
            .wait_timeout(T)
            .unwrap();
        for round in 0..5u64 {
            submit(&mut d, &kick, round);
            collect(&mut d, 1);
            let new = mapped_memory(BASE, &region);
            let before = Arc::strong_count(&s.mem);
            s.eng
                .memory_changed(new.clone())
                .wait_timeout(Duration::from_secs(1))
                .unwrap();
            // Acked means the engine and the queue no longer hold the old snapshot.
            assert_eq!(Arc::strong_count(&s.mem), before - 2, "round {round}");
            d.mem = new.clone();
            s.mem = new;
        }
        submit(&mut d, &kick, 9);
        collect(&mut d, 1);
    }

    #[test]
    fn stop_returns_position_and_restart_continues() {
        let mem = anon_memory(BASE, MEM);
        let mut s = setup(mem.clone(), echo_factory());
        let mut d = SplitDriver::new(mem.clone(), BASE, 64);
        let kick = Kick::new().unwrap();
        let (_irqs, notifier) = counter();
        s.eng
            .queue_start(0, d.config(), notifier.clone(), kick.clone())
            .wait_timeout(T)
            .unwrap();
        for i in 0..5 {
            submit(&mut d, &kick, i);
        }
        collect(&mut d, 5);
        let st = s.eng.queue_stop(0).wait_timeout(T).unwrap();
        assert_eq!((st.next_avail, st.next_used), (5, 5));
        assert!(matches!(
            s.eng.queue_stop(0).wait_timeout(T),
            Err(EngineError::QueueNotStarted(0))
        ));
        // Requests queued while stopped are served after the restart, once.
        for i in 5..8 {
            submit(&mut d, &kick, i);
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(d.pop_used(), None);
        s.eng.set_queue_base(0, st);
        s.eng
            .queue_start(0, d.config(), notifier, kick.clone())
            .wait_timeout(T)
            .unwrap();
        kick.signal();
        let got = collect(&mut d, 3);
        assert_eq!(got.len(), 3);
        let st = s.eng.queue_stop(0).wait_timeout(T).unwrap();
        assert_eq!((st.next_avail, st.next_used), (8, 8));
    }

    #[test]
    fn broken_ring_stops_only_its_queue() {
        let mem = anon_memory(BASE, MEM);
        let mut s = setup(mem.clone(), echo_factory());
        let errors: Arc<Mutex<Vec<(u16, QueueError)>>> = Arc::default();
        let e2 = errors.clone();
        s.eng.set_error_callback(Arc::new(move |q, e| {
            e2.lock().unwrap().push((q, e.clone()))
        }));
        let mut good = SplitDriver::new(mem.clone(), BASE, 64);
        let mut bad = SplitDriver::new(mem.clone(), BASE + 0x10_0000, 8);
        let (kg, kb) = (Kick::new().unwrap(), Kick::new().unwrap());
        let (_i, n) = counter();
        s.eng
            .queue_start(0, good.config(), n.clone(), kg.clone())
            .wait_timeout(T)
            .unwrap();
        s.eng
            .queue_start(1, bad.config(), n.clone(), kb.clone())
            .wait_timeout(T)
            .unwrap();
        // A second device on the same pool keeps running too.
        let mut other = s.pool.engine(echo_factory());
        other.features_changed(FEATS).wait_timeout(T).unwrap();
        other.memory_changed(mem.clone()).wait_timeout(T).unwrap();
        let mut od = SplitDriver::new(mem.clone(), BASE + 0x18_0000, 8);
        let ko = Kick::new().unwrap();
        other
            .queue_start(0, od.config(), n.clone(), ko.clone())
            .wait_timeout(T)
            .unwrap();

        bad.write_desc(0, DATA, 4, 1, 0); // loops onto itself
        bad.push_head(0);
        kb.signal();
        assert!(wait_until(|| !errors.lock().unwrap().is_empty()));
        assert_eq!(errors.lock().unwrap()[0], (1, QueueError::ChainLoop));
        for i in 0..20 {
            submit(&mut good, &kg, i);
        }
        collect(&mut good, 20);
        od.add_chain(&[Buf::w(DATA, 4)]);
        ko.signal();
        assert!(wait_until(|| od.pop_used().is_some()));
        // The broken queue can still be stopped, reporting where it stood.
        let st = s.eng.queue_stop(1).wait_timeout(T).unwrap();
        assert_eq!(st.next_avail, 0);
        assert_eq!(
            s.eng
                .queue_stats(0)
                .map(|st| st.errors.load(Ordering::Relaxed)),
            Some(0)
        );
        other.destroy().wait_timeout(T).unwrap();
    }

    struct Panics;
    impl QueueHandler for Panics {
        fn process(&mut self, q: &mut Queue, _budget: usize) -> usize {
            if q.has_available().unwrap_or(false) {
                panic!("handler bug");
            }
            0
        }
    }

    #[test]
    fn panicking_handler_stops_only_its_queue() {
        let mem = anon_memory(BASE, MEM);
        let mut s = setup(
            mem.clone(),
            Box::new(|qidx, _| -> Box<dyn QueueHandler> {
                if qidx == 1 {
                    Box::new(Panics)
                } else {
                    Box::new(Echo {
                        chain: DescChain::new(),
                        buf: Vec::new(),
                    })
                }
            }),
        );
        let errors: Arc<Mutex<Vec<(u16, QueueError)>>> = Arc::default();
        let e2 = errors.clone();
        s.eng.set_error_callback(Arc::new(move |q, e| {
            e2.lock().unwrap().push((q, e.clone()))
        }));
        let mut good = SplitDriver::new(mem.clone(), BASE, 64);
        let mut bad = SplitDriver::new(mem.clone(), BASE + 0x10_0000, 8);
        let (kg, kb) = (Kick::new().unwrap(), Kick::new().unwrap());
        let (_i, n) = counter();
        s.eng
            .queue_start(0, good.config(), n.clone(), kg.clone())
            .wait_timeout(T)
            .unwrap();
        s.eng
            .queue_start(1, bad.config(), n, kb.clone())
            .wait_timeout(T)
            .unwrap();
        bad.add_chain(&[Buf::w(DATA, 4)]);
        kb.signal();
        assert!(wait_until(|| !errors.lock().unwrap().is_empty()));
        assert_eq!(errors.lock().unwrap()[0], (1, QueueError::HandlerFailed));
        for i in 0..5 {
            submit(&mut good, &kg, i);
        }
        collect(&mut good, 5);
    }

    /// Holds each request in flight until `release` is set.
    struct Slow {
        held: Vec<(u16, u32)>,
        release: Arc<AtomicBool>,
        chain: DescChain,
    }

    impl QueueHandler for Slow {
        fn process(&mut self, q: &mut Queue, budget: usize) -> usize {
            let mut n = self.poll_completions(q);
            for _ in 0..budget {
                match q.pop_into(&mut self.chain) {
                    Ok(true) => self.held.push((self.chain.head(), 0)),
                    _ => break,
                }
                n += 1;
            }
            n
        }
        fn poll_completions(&mut self, q: &mut Queue) -> usize {
            if !self.release.load(Ordering::Acquire) {
                return 0;
            }
            let n = self.held.len();
            for (h, l) in self.held.drain(..) {
                q.add_used(h, l);
            }
            n
        }
        fn in_flight(&self) -> usize {
            self.held.len()
        }
    }

    #[test]
    fn pause_waits_for_in_flight_and_stops_popping() {
        let mem = anon_memory(BASE, MEM);
        let release = Arc::new(AtomicBool::new(false));
        let r2 = release.clone();
        let mut s = setup(
            mem.clone(),
            Box::new(move |_, _| {
                Box::new(Slow {
                    held: Vec::new(),
                    release: r2.clone(),
                    chain: DescChain::new(),
                })
            }),
        );
        let mut d = SplitDriver::new(mem.clone(), BASE, 64);
        let kick = Kick::new().unwrap();
        let (_i, n) = counter();
        s.eng
            .queue_start(0, d.config(), n, kick.clone())
            .wait_timeout(T)
            .unwrap();
        for i in 0..3 {
            submit(&mut d, &kick, i);
        }
        assert!(wait_until(|| s
            .eng
            .queue_stats(0)
            .unwrap()
            .requests
            .load(Ordering::Relaxed)
            >= 3));
        let pause = s.eng.pause();
        std::thread::sleep(Duration::from_millis(20));
        assert!(pause.try_get().is_none(), "acked with requests in flight");
        release.store(true, Ordering::Release);
        pause.wait_timeout(T).unwrap();
        assert_eq!(collect(&mut d, 3).len(), 3);
        // Paused: new requests stay in the ring.
        submit(&mut d, &kick, 10);
        kick.signal();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(d.pop_used(), None);
        s.eng.resume().wait_timeout(T).unwrap();
        kick.signal();
        assert_eq!(collect(&mut d, 1).len(), 1);
        s.eng.destroy().wait_timeout(T).unwrap();
    }

    #[test]
    fn coalesced_interrupts_fire_within_the_delay() {
        let mem = anon_memory(BASE, MEM);
        let pool = PollerPool::with_config(
            1,
            PollerConfig {
                irq: IrqPolicy::Coalesce {
                    max_completions: 1000,
                    max_delay: Duration::from_micros(200),
                },
                ..PollerConfig::default()
            },
        )
        .unwrap();
        let mut eng = pool.engine(echo_factory());
        eng.features_changed(FEATS).wait_timeout(T).unwrap();
        eng.memory_changed(mem.clone()).wait_timeout(T).unwrap();
        let mut d = SplitDriver::new(mem.clone(), BASE, 64);
        let kick = Kick::new().unwrap();
        let (irqs, n) = counter();
        eng.queue_start(0, d.config(), n, kick.clone())
            .wait_timeout(T)
            .unwrap();
        submit(&mut d, &kick, 0);
        collect(&mut d, 1);
        assert!(wait_until(|| irqs.load(Ordering::Relaxed) == 1));
    }
}
