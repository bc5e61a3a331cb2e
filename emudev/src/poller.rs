//! A pool of polling threads any device backend can run its datapath on.
//!
//! A device adds a [`PollTask`] and gets a [`TaskHandle`]. Each thread owns several tasks
//! (the least loaded thread takes a new one) and loops: poll every task for one burst; while
//! some task did work, loop again. After an idle window (a [`SpinWindow`]: adaptive, with a
//! CPU budget) it asks every task to re-arm its notifications ([`PollTask::prepare_sleep`]),
//! then sleeps in `poll(2)` on all tasks' wake fds and its control eventfd. An idle pool uses
//! no CPU.
//!
//! Control (add, remove, shutdown) arrives on a channel with a control eventfd and is applied
//! between bursts. [`TaskHandle::remove`] (and its `Drop`) returns only once the thread has
//! dropped the task, so a device may free what the task touches (guest memory, rings)
//! afterwards. A task that panics is dropped (logged) and the thread goes on serving the
//! others; its handle's `remove` then returns at once.
//!
//! Tasks must not block for long in `poll`: every task of the thread waits for it.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TryRecvError};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Work a poller thread runs: one device's datapath (or part of it).
pub trait PollTask: Send {
    /// Run one burst; returns the work done (0 = found nothing to do).
    fn poll(&mut self) -> usize;

    /// Append the fds that become readable when new work may arrive while the thread
    /// sleeps (kick eventfds, backend sockets). Called before every sleep.
    fn wake_fds(&self, out: &mut Vec<RawFd>);

    /// The thread is about to sleep: re-arm notifications (drain a kick eventfd, enable
    /// driver notifications) and re-check. True if work appeared: the thread keeps polling.
    fn prepare_sleep(&mut self) -> bool {
        false
    }

    /// Longest sleep this task tolerates, if some of its work cannot signal a wake fd.
    /// `None` (default): it may sleep until a wake fd or a kick.
    fn max_sleep(&self) -> Option<Duration> {
        None
    }
}

/// Default lower bound of the idle window, µs.
pub const DEFAULT_MIN_SPIN_US: u64 = 50;
/// Default upper bound of the idle window, µs.
pub const DEFAULT_MAX_SPIN_US: u64 = 1000;
/// Default idle-polling budget, percent of wall time.
pub const DEFAULT_SPIN_BUDGET_PCT: u8 = 10;
/// Period over which the idle-polling budget of a [`SpinWindow`] is accounted.
pub const SPIN_BUDGET_PERIOD: Duration = Duration::from_millis(100);

/// Tuning of a [`PollerPool`]'s threads: the bounds and CPU budget of their [`SpinWindow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollConfig {
    /// Shortest idle window (and the starting one).
    pub idle_before_sleep: Duration,
    /// Longest idle window the adaptation may reach.
    pub max_idle_spin: Duration,
    /// Share of wall time (percent, 1..=100) a thread may spend polling idle tasks.
    pub spin_budget_pct: u8,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            idle_before_sleep: Duration::from_micros(DEFAULT_MIN_SPIN_US),
            max_idle_spin: Duration::from_micros(DEFAULT_MAX_SPIN_US),
            spin_budget_pct: DEFAULT_SPIN_BUDGET_PCT,
        }
    }
}

/// The adaptive idle window of one poller thread.
///
/// The gap a sleep ended is the idle time before it (the window) plus the time asleep. A
/// wakeup by work whose gap is within `max` means a window of about that gap would have
/// avoided the sleep and its kick: the window grows to cover it (at least doubling). A gap
/// beyond `max` means spinning could not have helped: the window halves. Independently, idle
/// polling is accounted per [`SPIN_BUDGET_PERIOD`]: a period over the budget halves the
/// window and blocks growth until a period stays within it. Bounded by `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinWindow {
    cur: Duration,
    min: Duration,
    max: Duration,
    budget_pct: u32,
    period_start: Option<Instant>,
    spun: Duration,
    over_budget: bool,
}

impl SpinWindow {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_budget(min, max, 100)
    }

    /// A window whose idle polling may use `budget_pct` percent of wall time (clamped to
    /// 1..=100; 100 means no limit).
    pub fn with_budget(min: Duration, max: Duration, budget_pct: u8) -> Self {
        let max = max.max(min);
        Self {
            cur: min,
            min,
            max,
            budget_pct: u32::from(budget_pct.clamp(1, 100)),
            period_start: None,
            spun: Duration::ZERO,
            over_budget: false,
        }
    }

    /// The current window.
    pub fn get(&self) -> Duration {
        self.cur
    }

    /// The thread slept after idling `idle` and was woken by work after `slept`.
    pub fn woken_by_work(&mut self, idle: Duration, slept: Duration) {
        let gap = idle.saturating_add(slept);
        if gap <= self.max && !self.over_budget {
            let want = gap.saturating_add(gap / 4).max(self.cur.saturating_mul(2));
            self.cur = want.min(self.max);
        } else if gap > self.max {
            self.cur = (self.cur / 2).max(self.min);
        }
    }

    /// The thread polled idle queues for `idle` (ending in work or in a sleep) at `now`.
    pub fn spun(&mut self, idle: Duration, now: Instant) {
        if self.budget_pct >= 100 {
            return;
        }
        self.spun = self.spun.saturating_add(idle);
        let start = *self.period_start.get_or_insert(now);
        let wall = now.saturating_duration_since(start);
        if wall < SPIN_BUDGET_PERIOD {
            return;
        }
        // spun / wall > budget / 100, in integer nanoseconds (u128: no overflow).
        self.over_budget =
            self.spun.as_nanos() * 100 > wall.as_nanos() * u128::from(self.budget_pct);
        if self.over_budget {
            self.cur = (self.cur / 2).max(self.min);
        }
        self.period_start = Some(now);
        self.spun = Duration::ZERO;
    }
}

/// Errors of the pool.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    #[error("poller pool {pool}: {what}: {source}")]
    Io {
        pool: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("poller pool {pool}: thread {thread} is gone; cannot add task {task}")]
    Gone {
        pool: String,
        thread: usize,
        task: String,
    },
}

/// Counters of one poller thread, readable from any thread.
#[derive(Debug, Default)]
pub struct ThreadStats {
    /// Loop iterations (each polls every task once).
    pub iterations: AtomicU64,
    /// Sleeps in `poll(2)`.
    pub sleeps: AtomicU64,
    /// Tasks dropped because they panicked.
    pub panics: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

enum Ctl {
    Add(u64, String, Box<dyn PollTask>),
    /// Drop the task, then acknowledge.
    Remove(u64, Sender<()>),
    Shutdown,
}

struct ThreadHandle {
    tx: Sender<Ctl>,
    wake: Arc<EventFd>,
    join: Option<JoinHandle<()>>,
    id: ThreadId,
    tasks: Arc<AtomicUsize>,
    stats: Arc<ThreadStats>,
}

/// A set of polling threads shared by device backends.
pub struct PollerPool {
    name: String,
    threads: Vec<ThreadHandle>,
    next_id: AtomicU64,
    /// [`PollerPool::manual`]: the one "thread" is this worker, run by the owner.
    manual: Option<Mutex<Worker>>,
}

impl std::fmt::Debug for PollerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollerPool")
            .field("name", &self.name)
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl PollerPool {
    /// `threads` polling threads (at least one) named `poller-<i>`.
    pub fn new(threads: usize, cfg: PollConfig) -> Result<Arc<Self>, PollerError> {
        Self::named("poller", threads, cfg)
    }

    /// Like [`PollerPool::new`], threads named `<name>-<i>` (or `<name>` for one thread).
    pub fn named(name: &str, threads: usize, cfg: PollConfig) -> Result<Arc<Self>, PollerError> {
        let n = threads.max(1);
        let io = |what, source| PollerError::Io {
            pool: name.to_string(),
            what,
            source,
        };
        let mut pool = Self {
            name: name.to_string(),
            threads: Vec::with_capacity(n),
            next_id: AtomicU64::new(1),
            manual: None,
        };
        for i in 0..n {
            let (mut w, mut th) = Worker::new(cfg).map_err(|e| io("control eventfd", e))?;
            let tname = if n == 1 {
                name.to_string()
            } else {
                format!("{name}-{i}")
            };
            // On error the threads started so far are shut down by `pool`'s Drop.
            let join = std::thread::Builder::new()
                .name(tname)
                .spawn(move || w.run())
                .map_err(|e| io("spawn thread", e))?;
            th.id = join.thread().id();
            th.join = Some(join);
            pool.threads.push(th);
        }
        Ok(Arc::new(pool))
    }

    /// A pool without threads: its tasks are polled only by [`PollerPool::poll_manual`],
    /// on the caller's thread, and [`TaskHandle::remove`] drops the task at once. For
    /// deterministic single-threaded harnesses (fuzz targets, tests), where a polling
    /// thread would only add context switches and scheduling noise. A task must not add or
    /// remove tasks of this pool from its `poll` (the pool is locked meanwhile).
    pub fn manual(name: &str) -> Result<Arc<Self>, PollerError> {
        let (worker, th) =
            Worker::new(PollConfig::default()).map_err(|source| PollerError::Io {
                pool: name.to_string(),
                what: "control eventfd",
                source,
            })?;
        Ok(Arc::new(Self {
            name: name.to_string(),
            threads: vec![th],
            next_id: AtomicU64::new(1),
            manual: Some(Mutex::new(worker)),
        }))
    }

    /// [`PollerPool::manual`] pools: apply pending adds and removes, then poll every task
    /// once. Returns the work done (0 on a threaded pool, whose threads poll by themselves).
    pub fn poll_manual(&self) -> usize {
        let Some(m) = &self.manual else {
            return 0;
        };
        let mut w = m.lock().unwrap_or_else(PoisonError::into_inner);
        if !w.handle_ctl() {
            return 0;
        }
        bump(&w.stats.iterations);
        w.poll_all()
    }

    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// Tasks currently served (all threads).
    pub fn task_count(&self) -> usize {
        self.threads
            .iter()
            .map(|t| t.tasks.load(Ordering::Acquire))
            .sum()
    }

    pub fn thread_stats(&self, i: usize) -> Option<Arc<ThreadStats>> {
        self.threads.get(i).map(|t| t.stats.clone())
    }

    /// Run `task` on the least loaded thread until its handle is removed or dropped.
    pub fn add(
        self: &Arc<Self>,
        name: &str,
        task: Box<dyn PollTask>,
    ) -> Result<TaskHandle, PollerError> {
        let (thread, th) = self
            .threads
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| t.tasks.load(Ordering::Acquire))
            .ok_or_else(|| PollerError::Gone {
                pool: self.name.clone(),
                thread: 0,
                task: name.to_string(),
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Counted before the thread sees it, so concurrent adds spread out.
        th.tasks.fetch_add(1, Ordering::AcqRel);
        if th.tx.send(Ctl::Add(id, name.to_string(), task)).is_err() {
            th.tasks.fetch_sub(1, Ordering::AcqRel);
            return Err(PollerError::Gone {
                pool: self.name.clone(),
                thread,
                task: name.to_string(),
            });
        }
        let _ = th.wake.write(1);
        Ok(TaskHandle {
            pool: self.clone(),
            thread,
            id,
            name: name.to_string(),
            removed: false,
        })
    }

    fn wake(&self, thread: usize) {
        if let Some(t) = self.threads.get(thread) {
            let _ = t.wake.write(1);
        }
    }
}

impl Drop for PollerPool {
    fn drop(&mut self) {
        for t in &self.threads {
            let _ = t.tx.send(Ctl::Shutdown);
            let _ = t.wake.write(1);
        }
        let me = std::thread::current().id();
        for t in &mut self.threads {
            if t.id == me {
                // Dropped from a task of this very thread: it exits after this iteration.
                continue;
            }
            if let Some(j) = t.join.take() {
                if j.join().is_err() {
                    log::error!("poller pool {}: a thread panicked", self.name);
                }
            }
        }
    }
}

/// A task running on a pool. Removing or dropping it waits until the task is dropped.
pub struct TaskHandle {
    pool: Arc<PollerPool>,
    thread: usize,
    id: u64,
    name: String,
    removed: bool,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("name", &self.name)
            .field("thread", &self.thread)
            .finish()
    }
}

impl TaskHandle {
    /// Wake the task's thread if it sleeps; it polls all its tasks at once.
    pub fn kick(&self) {
        self.pool.wake(self.thread);
    }

    /// Index of the thread running the task.
    pub fn thread(&self) -> usize {
        self.thread
    }

    /// Stop the task. Returns once the thread has dropped it: it is never polled again.
    pub fn remove(mut self) {
        self.remove_inner();
    }

    fn remove_inner(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        let Some(th) = self.pool.threads.get(self.thread) else {
            return;
        };
        let (ack_tx, ack_rx) = bounded(1);
        if th.tx.send(Ctl::Remove(self.id, ack_tx)).is_err() {
            return; // The thread is gone, and its tasks with it.
        }
        let _ = th.wake.write(1);
        if let Some(m) = &self.pool.manual {
            // No thread: apply the removal here (the pool lock waits out a poll_manual).
            m.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .handle_ctl();
            return;
        }
        if std::thread::current().id() == th.id {
            // Removed from a task of the same thread: it is dropped after this iteration;
            // waiting here would deadlock.
            log::debug!("poller task {}: removed from its own thread", self.name);
            return;
        }
        // Err: the thread exited (its tasks were dropped with it).
        let _ = ack_rx.recv();
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.remove_inner();
    }
}

struct Entry {
    id: u64,
    name: String,
    task: Box<dyn PollTask>,
}

struct Worker {
    rx: Receiver<Ctl>,
    wake: Arc<EventFd>,
    cfg: PollConfig,
    tasks: Vec<Entry>,
    count: Arc<AtomicUsize>,
    stats: Arc<ThreadStats>,
    fds: Vec<RawFd>,
    pollfds: Vec<libc::pollfd>,
}

impl Worker {
    /// A worker and the pool's handle to it, joined by a control channel and eventfd. The
    /// handle names the calling thread and has no join handle; a threaded pool fills both
    /// in once it has spawned the worker's thread.
    fn new(cfg: PollConfig) -> std::io::Result<(Self, ThreadHandle)> {
        let (tx, rx) = unbounded();
        let wake = Arc::new(EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        let tasks = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(ThreadStats::default());
        let worker = Self {
            rx,
            wake: wake.clone(),
            cfg,
            tasks: Vec::new(),
            count: tasks.clone(),
            stats: stats.clone(),
            fds: Vec::new(),
            pollfds: Vec::new(),
        };
        let handle = ThreadHandle {
            tx,
            wake,
            join: None,
            id: std::thread::current().id(),
            tasks,
            stats,
        };
        Ok((worker, handle))
    }

    fn run(&mut self) {
        let mut window = SpinWindow::with_budget(
            self.cfg.idle_before_sleep,
            self.cfg.max_idle_spin,
            self.cfg.spin_budget_pct,
        );
        let mut last_work = Instant::now();
        // End of the last idle iteration since `last_work`.
        let mut last_idle: Option<Instant> = None;
        loop {
            if !self.handle_ctl() {
                return;
            }
            let work = self.poll_all();
            bump(&self.stats.iterations);
            let now = Instant::now();
            if work > 0 {
                if let Some(t) = last_idle.take() {
                    window.spun(t.saturating_duration_since(last_work), now);
                }
                last_work = now;
                continue;
            }
            last_idle = Some(now);
            let idle = now.saturating_duration_since(last_work);
            if idle < window.get() {
                continue;
            }
            if self.prepare_sleep_all() {
                // Work appeared while re-arming: another idle window before sleeping.
                last_work = Instant::now();
                last_idle = None;
                continue;
            }
            window.spun(idle, now);
            last_idle = None;
            let start = Instant::now();
            let by_work = self.sleep();
            if by_work {
                window.woken_by_work(idle, start.elapsed());
            }
            last_work = Instant::now();
        }
    }

    /// Apply pending control messages; false on shutdown.
    fn handle_ctl(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Ctl::Add(id, name, task)) => self.tasks.push(Entry { id, name, task }),
                Ok(Ctl::Remove(id, ack)) => {
                    if let Some(i) = self.tasks.iter().position(|e| e.id == id) {
                        let e = self.tasks.swap_remove(i);
                        self.drop_task(e);
                    }
                    let _ = ack.send(());
                }
                Ok(Ctl::Shutdown) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn drop_task(&mut self, e: Entry) {
        let name = e.name.clone();
        if catch_unwind(AssertUnwindSafe(move || drop(e))).is_err() {
            log::error!("poller task {name}: panicked while dropped");
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    /// Run `f` on every task; a task that panics is dropped. Returns the sum of results.
    fn each(&mut self, mut f: impl FnMut(&mut dyn PollTask) -> usize) -> usize {
        let mut total = 0usize;
        let mut i = 0;
        while i < self.tasks.len() {
            let task = &mut self.tasks[i].task;
            match catch_unwind(AssertUnwindSafe(|| f(task.as_mut()))) {
                Ok(n) => {
                    total = total.saturating_add(n);
                    i += 1;
                }
                Err(_) => {
                    let e = self.tasks.swap_remove(i);
                    log::error!("poller task {}: panicked; dropped", e.name);
                    bump(&self.stats.panics);
                    self.drop_task(e);
                }
            }
        }
        total
    }

    fn poll_all(&mut self) -> usize {
        self.each(|t| t.poll())
    }

    fn prepare_sleep_all(&mut self) -> bool {
        // Every task re-arms (no short-circuit): each must be ready for the sleep.
        self.each(|t| usize::from(t.prepare_sleep())) > 0
    }

    /// Sleep until a wake fd, the control eventfd or the shortest `max_sleep`. True if
    /// something (not the timeout) woke the thread.
    fn sleep(&mut self) -> bool {
        bump(&self.stats.sleeps);
        self.fds.clear();
        let mut timeout: Option<Duration> = None;
        for e in &self.tasks {
            e.task.wake_fds(&mut self.fds);
            if let Some(d) = e.task.max_sleep() {
                timeout = Some(timeout.map_or(d, |t| t.min(d)));
            }
        }
        self.pollfds.clear();
        self.pollfds.push(libc::pollfd {
            fd: self.wake.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        self.pollfds.extend(self.fds.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        let ms = timeout.map_or(-1, |d| {
            // Round up so a short limit does not become a busy 0 ms poll.
            i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        let Ok(nfds) = libc::nfds_t::try_from(self.pollfds.len()) else {
            return false;
        };
        // SAFETY: `pollfds` is a valid array of `nfds` pollfd structs that outlives the call;
        // the fds belong to the tasks (alive: owned by this thread) and the control eventfd.
        let rc = unsafe { libc::poll(self.pollfds.as_mut_ptr(), nfds, ms) };
        let _ = self.wake.read();
        rc > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    const T: Duration = Duration::from_secs(5);

    /// A task doing `pending` units of work, one per poll; woken by an eventfd.
    struct Counter {
        polls: Arc<AtomicU64>,
        done: Arc<AtomicU64>,
        pending: Arc<AtomicU64>,
        efd: Arc<EventFd>,
        dropped: Arc<AtomicBool>,
        panic_on_poll: bool,
    }

    #[derive(Clone)]
    struct Probe {
        polls: Arc<AtomicU64>,
        done: Arc<AtomicU64>,
        pending: Arc<AtomicU64>,
        efd: Arc<EventFd>,
        dropped: Arc<AtomicBool>,
    }

    impl Probe {
        fn new() -> Self {
            Self {
                polls: Arc::default(),
                done: Arc::default(),
                pending: Arc::default(),
                efd: Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap()),
                dropped: Arc::default(),
            }
        }
        fn task(&self, panic_on_poll: bool) -> Box<dyn PollTask> {
            Box::new(Counter {
                polls: self.polls.clone(),
                done: self.done.clone(),
                pending: self.pending.clone(),
                efd: self.efd.clone(),
                dropped: self.dropped.clone(),
                panic_on_poll,
            })
        }
        /// Add work and signal the eventfd.
        fn post(&self, n: u64) {
            self.pending.fetch_add(n, Ordering::SeqCst);
            self.efd.write(1).unwrap();
        }
        fn wait_done(&self, n: u64, within: Duration) -> bool {
            let t0 = Instant::now();
            while t0.elapsed() < within {
                if self.done.load(Ordering::SeqCst) >= n {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        }
    }

    impl PollTask for Counter {
        fn poll(&mut self) -> usize {
            assert!(!self.panic_on_poll, "test task panics");
            self.polls.fetch_add(1, Ordering::SeqCst);
            let p = self.pending.load(Ordering::SeqCst);
            if p == 0 {
                return 0;
            }
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.done.fetch_add(1, Ordering::SeqCst);
            1
        }
        fn wake_fds(&self, out: &mut Vec<RawFd>) {
            out.push(self.efd.as_fd().as_raw_fd());
        }
        fn prepare_sleep(&mut self) -> bool {
            let signalled = self.efd.read().is_ok();
            signalled || self.pending.load(Ordering::SeqCst) > 0
        }
    }

    impl Drop for Counter {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn pool(threads: usize) -> Arc<PollerPool> {
        PollerPool::new(threads, PollConfig::default()).unwrap()
    }

    /// Wait until thread 0 is asleep: its iteration count stays put for 20 ms.
    fn wait_asleep(p: &PollerPool) {
        let st = p.thread_stats(0).unwrap();
        let t0 = Instant::now();
        let mut last = st.iterations.load(Ordering::SeqCst);
        while t0.elapsed() < T {
            std::thread::sleep(Duration::from_millis(20));
            let now = st.iterations.load(Ordering::SeqCst);
            if now == last && st.sleeps.load(Ordering::SeqCst) > 0 {
                return;
            }
            last = now;
        }
        panic!("poller thread never went to sleep");
    }

    #[test]
    fn a_manual_pool_polls_only_when_asked_and_removes_at_once() {
        let p = PollerPool::manual("m").unwrap();
        let a = Probe::new();
        let h = p.add("a", a.task(false)).unwrap();
        a.post(3);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(a.polls.load(Ordering::SeqCst), 0, "no thread polls it");
        assert_eq!(p.poll_manual(), 1);
        assert_eq!(p.poll_manual(), 1);
        assert_eq!(a.done.load(Ordering::SeqCst), 2);
        assert_eq!(p.task_count(), 1);
        h.remove();
        assert!(a.dropped.load(Ordering::SeqCst), "dropped by remove()");
        assert_eq!(p.task_count(), 0);
        assert_eq!(p.poll_manual(), 0);
        assert_eq!(
            a.done.load(Ordering::SeqCst),
            2,
            "never polled after remove()"
        );
        // A threaded pool's poll_manual does nothing.
        assert_eq!(pool(1).poll_manual(), 0);
    }

    #[test]
    fn work_is_polled_and_an_idle_pool_sleeps() {
        let p = pool(1);
        let a = Probe::new();
        let _h = p.add("a", a.task(false)).unwrap();
        a.post(100);
        assert!(a.wait_done(100, T));
        // Let it settle into its sleep, then check it stays asleep.
        wait_asleep(&p);
        let before = a.polls.load(Ordering::SeqCst);
        let sleeps = p.thread_stats(0).unwrap().sleeps.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        let polls = a.polls.load(Ordering::SeqCst) - before;
        assert!(polls <= 2, "{polls} polls while idle");
        assert!(sleeps >= 1);
    }

    #[test]
    fn a_wake_fd_or_a_kick_wakes_a_sleeping_task_promptly() {
        let p = pool(1);
        let a = Probe::new();
        let h = p.add("a", a.task(false)).unwrap();
        wait_asleep(&p);
        let t0 = Instant::now();
        a.post(1);
        assert!(a.wait_done(1, T));
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        // Work without the eventfd: only the kick wakes the thread.
        wait_asleep(&p);
        let polls = a.polls.load(Ordering::SeqCst);
        a.pending.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(a.done.load(Ordering::SeqCst), 1, "polled without a wakeup");
        assert!(a.polls.load(Ordering::SeqCst) - polls <= 1);
        h.kick();
        assert!(a.wait_done(2, T));
    }

    #[test]
    fn remove_returns_after_the_task_is_dropped_and_it_is_never_polled_again() {
        let p = pool(1);
        let a = Probe::new();
        let h = p.add("a", a.task(false)).unwrap();
        // Keep it busy so removal races with polls.
        a.pending.store(u64::MAX / 2, Ordering::SeqCst);
        a.efd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        h.remove();
        assert!(a.dropped.load(Ordering::SeqCst));
        let polls = a.polls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(a.polls.load(Ordering::SeqCst), polls);
        assert_eq!(p.task_count(), 0);
        // Dropping a handle removes as well.
        let b = Probe::new();
        drop(p.add("b", b.task(false)).unwrap());
        assert!(b.dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn several_tasks_on_one_thread_are_all_served() {
        let p = pool(1);
        let probes: Vec<Probe> = (0..4).map(|_| Probe::new()).collect();
        let _hs: Vec<TaskHandle> = probes
            .iter()
            .enumerate()
            .map(|(i, pr)| p.add(&format!("t{i}"), pr.task(false)).unwrap())
            .collect();
        // A busy task does not starve the others.
        probes[0].post(1_000_000);
        for pr in &probes[1..] {
            pr.post(10);
        }
        for pr in &probes[1..] {
            assert!(pr.wait_done(10, T));
        }
    }

    #[test]
    fn tasks_spread_over_threads() {
        let p = pool(2);
        let a = Probe::new();
        let b = Probe::new();
        let ha = p.add("a", a.task(false)).unwrap();
        let hb = p.add("b", b.task(false)).unwrap();
        assert_ne!(ha.thread(), hb.thread());
        assert_eq!(p.task_count(), 2);
    }

    #[test]
    fn a_panicking_task_is_dropped_and_the_others_go_on() {
        let p = pool(1);
        let good = Probe::new();
        let bad = Probe::new();
        let _g = p.add("good", good.task(false)).unwrap();
        let hb = p.add("bad", bad.task(true)).unwrap();
        good.post(5);
        assert!(good.wait_done(5, T));
        let t0 = Instant::now();
        while !bad.dropped.load(Ordering::SeqCst) && t0.elapsed() < T {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(bad.dropped.load(Ordering::SeqCst));
        assert_eq!(p.thread_stats(0).unwrap().panics.load(Ordering::SeqCst), 1);
        hb.remove(); // Returns at once.
        good.post(1);
        assert!(good.wait_done(6, T));
    }

    #[test]
    fn max_sleep_bounds_the_sleep() {
        struct Timed(Arc<Mutex<Vec<Instant>>>);
        impl PollTask for Timed {
            fn poll(&mut self) -> usize {
                self.0.lock().unwrap().push(Instant::now());
                0
            }
            fn wake_fds(&self, _: &mut Vec<RawFd>) {}
            fn max_sleep(&self) -> Option<Duration> {
                Some(Duration::from_millis(10))
            }
        }
        let p = pool(1);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let _h = p.add("timed", Box::new(Timed(seen.clone()))).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let n = seen.lock().unwrap().len();
        // About 20 sleeps of 10 ms, each followed by an idle window of polls; not a spin.
        assert!(n >= 5, "only {n} polls");
        assert!(n < 20_000, "{n} polls: spinning");
    }

    #[test]
    fn spin_window_adapts_within_its_bounds() {
        let us = Duration::from_micros;
        let mut w = SpinWindow::new(us(10), us(1000));
        assert_eq!(w.get(), us(10));
        // Work 200 µs after the last: the window grows past that gap.
        w.woken_by_work(us(10), us(190));
        assert_eq!(w.get(), us(250));
        // Growth at least doubles, and stops at the bound.
        w.woken_by_work(us(250), us(10));
        assert_eq!(w.get(), us(500));
        w.woken_by_work(us(500), us(400));
        assert_eq!(w.get(), us(1000));
        // A gap no window could cover halves it, down to the floor.
        w.woken_by_work(us(1000), Duration::from_secs(3));
        assert_eq!(w.get(), us(500));
        for _ in 0..20 {
            w.woken_by_work(w.get(), Duration::from_secs(1));
        }
        assert_eq!(w.get(), us(10));
        // Over the idle-polling budget: the window halves and stops growing until a
        // period stays within it.
        let t0 = Instant::now();
        let mut b = SpinWindow::with_budget(us(10), us(1000), 10);
        b.woken_by_work(us(10), us(190));
        assert_eq!(b.get(), us(250));
        b.spun(us(60_000), t0); // opens the period
        b.spun(us(1), t0 + SPIN_BUDGET_PERIOD); // 60 ms of 100: over 10 %
        assert_eq!(b.get(), us(125));
        b.woken_by_work(us(125), us(100));
        assert_eq!(b.get(), us(125), "grew while over budget");
        b.spun(us(5_000), t0 + SPIN_BUDGET_PERIOD * 2); // 5 %: within
        assert_eq!(b.get(), us(125));
        b.woken_by_work(us(125), us(100));
        assert_eq!(b.get(), Duration::from_nanos(281_250));
        // Bounds given the wrong way round make a fixed window.
        let mut f = SpinWindow::new(us(50), us(20));
        f.woken_by_work(us(50), us(5));
        assert_eq!(f.get(), us(50));
        f.woken_by_work(us(50), Duration::from_secs(1));
        assert_eq!(f.get(), us(50));
    }
}
