//! The test device's datapath: the register file shared with worker threads, the DMA
//! worker and the doorbell poller.
//!
//! DMA runs on its own thread in chunks of at most [`CHUNK`] bytes. Each chunk takes the
//! current guest-memory snapshot under the control lock and marks itself in flight;
//! [`DmaEngine::quiesce`] sets `paused` and waits until no chunk is in flight, so after it
//! returns the worker neither touches memory nor starts a chunk until `resume`. A memory
//! swap therefore takes effect at the next chunk boundary.
//!
//! Exception: a chunk that reaches guest memory by DMA messages is not waited for. Its
//! reply has to be routed by the vfio-user event loop, which is the very thread calling
//! `quiesce` for a DMA_UNMAP; waiting would stall both until the message timeout. The
//! transport closes the old snapshot's message port before quiescing, so such a chunk
//! fails its next transfer instead of using the old table.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::doorbell::{drain_eventfd, Backoff, DoorbellPage};
use crate::memory::{Access, GuestMemory, MemError};
use crate::pci::EventFd;

use super::regs;

/// Largest piece of guest memory one chunk touches.
pub const CHUNK: usize = 4096;

/// How long quiesce and reset wait for a chunk in flight.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

/// Raises an interrupt vector (MSI-X vector, or INTx when MSI-X is off).
pub type RaiseIrq = Arc<dyn Fn(u32) + Send + Sync>;

/// Register values worker threads update; the control thread reads them for BAR reads.
#[derive(Debug, Default)]
pub struct SharedRegs {
    pub doorbell_count: AtomicU32,
    pub doorbell_last: AtomicU32,
    pub dma_status: AtomicU32,
    pub dma_result: AtomicU32,
    pub dma_passes: AtomicU32,
    pub dma_errors: AtomicU32,
    pub page_count: AtomicU32,
    pub page_last: AtomicU32,
    pub irq_count: AtomicU32,
}

impl SharedRegs {
    pub fn reset(&self) {
        for r in [
            &self.doorbell_count,
            &self.doorbell_last,
            &self.dma_status,
            &self.dma_result,
            &self.dma_passes,
            &self.dma_errors,
            &self.page_count,
            &self.page_last,
            &self.irq_count,
        ] {
            r.store(0, Ordering::Release);
        }
    }
}

/// A DMA command as programmed through BAR0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaJob {
    pub cmd: u32,
    pub dst: u64,
    pub src: u64,
    pub len: u32,
    pub pattern: u32,
    /// Passes to run; 0 and 1 both mean once, `u32::MAX` means until stopped.
    pub repeat: u32,
    /// Vector raised on completion or error; `u32::MAX` for none.
    pub vector: u32,
}

#[derive(Debug)]
struct Progress {
    job: DmaJob,
    /// Offset inside the current pass.
    pos: u32,
    passes: u32,
    /// FNV-1a state of the current checksum pass.
    hash: u32,
    /// Checksum of the last completed pass.
    result: u32,
}

#[derive(Debug)]
struct Ctl {
    mem: Arc<GuestMemory>,
    job: Option<Progress>,
    /// Bumped by every start and cancel; a chunk whose job is stale is discarded.
    gen: u64,
    paused: bool,
    in_chunk: bool,
    shutdown: bool,
}

#[derive(Debug)]
struct Inner {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

fn lock(m: &Mutex<Ctl>) -> MutexGuard<'_, Ctl> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a 32-bit: the checksum DMA_CMD_CHECKSUM stores in DMA_RESULT.
pub fn fnv1a(mut h: u32, data: &[u8]) -> u32 {
    for &b in data {
        h ^= u32::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a of `data` from the standard offset basis.
pub fn checksum(data: &[u8]) -> u32 {
    fnv1a(FNV_OFFSET, data)
}

/// The DMA worker thread and its control handshake.
pub struct DmaEngine {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DmaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaEngine").finish_non_exhaustive()
    }
}

impl DmaEngine {
    pub fn new(name: &str, regs: Arc<SharedRegs>, raise: RaiseIrq) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            ctl: Mutex::new(Ctl {
                mem: Arc::new(GuestMemory::empty()),
                job: None,
                gen: 0,
                paused: false,
                in_chunk: false,
                shutdown: false,
            }),
            cv: Condvar::new(),
        });
        let worker = inner.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-dma"))
            .spawn(move || worker_loop(&worker, &regs, &raise))?;
        Ok(Self {
            inner,
            thread: Some(thread),
        })
    }

    /// Start a job, replacing any running one (at a chunk boundary).
    pub fn start(&self, job: DmaJob, regs: &SharedRegs) {
        let mut c = lock(&self.inner.ctl);
        regs.dma_status
            .store(regs::DMA_STATUS_BUSY, Ordering::Release);
        regs.dma_passes.store(0, Ordering::Release);
        c.gen = c.gen.wrapping_add(1);
        c.job = Some(Progress {
            job,
            pos: 0,
            passes: 0,
            hash: FNV_OFFSET,
            result: 0,
        });
        self.inner.cv.notify_all();
    }

    /// Drop the running job after its chunk in flight. Returns whether the worker went idle
    /// in time.
    pub fn cancel(&self, regs: &SharedRegs) -> bool {
        let mut c = lock(&self.inner.ctl);
        c.job = None;
        c.gen = c.gen.wrapping_add(1);
        let _ = regs.dma_status.compare_exchange(
            regs::DMA_STATUS_BUSY,
            regs::DMA_STATUS_IDLE,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.wait_idle(c).1
    }

    fn wait_idle<'a>(&'a self, c: MutexGuard<'a, Ctl>) -> (MutexGuard<'a, Ctl>, bool) {
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        let mut c = c;
        while c.in_chunk {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (c, false);
            }
            c = self
                .inner
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        (c, true)
    }

    /// Stop starting chunks and wait for the one in flight. Returns false on timeout (the
    /// engine stays paused either way).
    pub fn quiesce(&self) -> bool {
        let mut c = lock(&self.inner.ctl);
        c.paused = true;
        self.wait_idle(c).1
    }

    pub fn resume(&self) {
        lock(&self.inner.ctl).paused = false;
        self.inner.cv.notify_all();
    }

    /// Swap the memory snapshot the next chunk uses.
    pub fn set_memory(&self, mem: Arc<GuestMemory>) {
        lock(&self.inner.ctl).mem = mem;
    }

    /// True when no job is queued or running.
    pub fn is_idle(&self) -> bool {
        let c = lock(&self.inner.ctl);
        c.job.is_none() && !c.in_chunk
    }
}

impl Drop for DmaEngine {
    fn drop(&mut self) {
        {
            let mut c = lock(&self.inner.ctl);
            c.shutdown = true;
            c.job = None;
        }
        self.inner.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Step {
    /// Keep going with the same job.
    More,
    /// The job finished all passes.
    Done,
    Failed(MemError),
}

/// Whether the next chunk of `p` touches only host-mapped guest memory.
fn chunk_is_mapped(mem: &GuestMemory, p: &Progress) -> bool {
    let n = (p.job.len.saturating_sub(p.pos) as usize).min(CHUNK);
    let off = u64::from(p.pos);
    let ok = |base: u64, access| {
        base.checked_add(off)
            .is_some_and(|a| mem.slice(a, n, access).is_ok())
    };
    match p.job.cmd {
        regs::DMA_CMD_FILL => ok(p.job.dst, Access::Write),
        regs::DMA_CMD_CHECKSUM => ok(p.job.src, Access::Read),
        _ => ok(p.job.src, Access::Read) && ok(p.job.dst, Access::Write),
    }
}

/// Run one chunk of `p` against `mem`. Pure datapath; no locks held.
fn run_chunk(mem: &GuestMemory, p: &mut Progress, buf: &mut [u8; CHUNK]) -> Step {
    let job = p.job;
    let left = job.len.saturating_sub(p.pos) as usize;
    let n = left.min(CHUNK);
    let off = u64::from(p.pos);
    let res = match job.cmd {
        regs::DMA_CMD_FILL => {
            let pat = job.pattern.to_le_bytes();
            for (i, b) in buf[..n].iter_mut().enumerate() {
                // Pattern bytes follow the guest address, so chunks line up.
                *b = pat[(p.pos as usize + i) % 4];
            }
            job.dst
                .checked_add(off)
                .ok_or(MemError::Overflow {
                    gpa: job.dst,
                    len: u64::from(job.len),
                })
                .and_then(|a| mem.write(a, &buf[..n]))
        }
        regs::DMA_CMD_CHECKSUM => job
            .src
            .checked_add(off)
            .ok_or(MemError::Overflow {
                gpa: job.src,
                len: u64::from(job.len),
            })
            .and_then(|a| mem.read(a, &mut buf[..n]))
            .map(|()| p.hash = fnv1a(p.hash, &buf[..n])),
        regs::DMA_CMD_COPY => {
            let src = job.src.checked_add(off);
            let dst = job.dst.checked_add(off);
            match (src, dst) {
                (Some(s), Some(d)) => mem
                    .read(s, &mut buf[..n])
                    .and_then(|()| mem.write(d, &buf[..n])),
                _ => Err(MemError::Overflow {
                    gpa: job.src,
                    len: u64::from(job.len),
                }),
            }
        }
        _ => Ok(()),
    };
    if let Err(e) = res {
        return Step::Failed(e);
    }
    p.pos = p.pos.saturating_add(n as u32);
    if p.pos < job.len {
        return Step::More;
    }
    p.passes = p.passes.saturating_add(1);
    p.pos = 0;
    p.result = p.hash;
    p.hash = FNV_OFFSET;
    let target = job.repeat.max(1);
    if target != u32::MAX && p.passes >= target {
        Step::Done
    } else {
        Step::More
    }
}

fn worker_loop(inner: &Inner, regs: &SharedRegs, raise: &RaiseIrq) {
    let mut buf = Box::new([0u8; CHUNK]);
    let mut c = lock(&inner.ctl);
    loop {
        while !c.shutdown && (c.paused || c.job.is_none()) {
            c = inner.cv.wait(c).unwrap_or_else(PoisonError::into_inner);
        }
        if c.shutdown {
            return;
        }
        let mem = c.mem.clone();
        let gen = c.gen;
        let Some(mut p) = c.job.take() else {
            continue;
        };
        // Chunks reaching memory by messages are not waited for by quiesce: their reply
        // needs the event loop that may be the one waiting (see the module doc).
        let waited = chunk_is_mapped(&mem, &p);
        c.in_chunk = waited;
        drop(c);

        let step = run_chunk(&mem, &mut p, &mut buf);
        drop(mem);

        c = lock(&inner.ctl);
        if waited {
            c.in_chunk = false;
        }
        inner.cv.notify_all();
        // A job started or cancelled by the control thread meanwhile wins.
        let replaced = c.gen != gen || c.shutdown;
        let vector = p.job.vector;
        match step {
            Step::More if !replaced => {
                regs.dma_passes.store(p.passes, Ordering::Release);
                c.job = Some(p);
            }
            Step::Done if !replaced => {
                if p.job.cmd == regs::DMA_CMD_CHECKSUM {
                    regs.dma_result.store(p.result, Ordering::Release);
                }
                regs.dma_passes.store(p.passes, Ordering::Release);
                regs.dma_status
                    .store(regs::DMA_STATUS_DONE, Ordering::Release);
                drop(c);
                if vector != u32::MAX {
                    raise(vector);
                }
                c = lock(&inner.ctl);
            }
            Step::Failed(e) if !replaced => {
                log::debug!("testdev DMA failed: {e}");
                regs.dma_errors.fetch_add(1, Ordering::AcqRel);
                regs.dma_status
                    .store(regs::DMA_STATUS_ERROR, Ordering::Release);
                drop(c);
                if vector != u32::MAX {
                    raise(vector);
                }
                c = lock(&inner.ctl);
            }
            _ => {}
        }
    }
}

/// The doorbell poller: watches slot 0 of the polled page and the doorbell ioeventfd.
pub struct DoorbellPoller {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DoorbellPoller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoorbellPoller").finish_non_exhaustive()
    }
}

impl DoorbellPoller {
    /// Poll `page` slot 0: a non-zero value is a doorbell; it is swapped back to 0 (the
    /// acknowledgement the guest can watch), counted in PAGE_COUNT and kept in PAGE_LAST.
    /// Two writes between polls count once. `ioevent` signals count in DOORBELL_COUNT.
    pub fn spawn(
        name: &str,
        page: Arc<DoorbellPage>,
        ioevent: Option<Arc<EventFd>>,
        regs: Arc<SharedRegs>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-poll"))
            .spawn(move || {
                let mut backoff = Backoff::default();
                while !s.load(Ordering::Acquire) {
                    let mut busy = false;
                    if let Some(slot) = page.slot(0) {
                        let v = slot.swap(0, Ordering::AcqRel);
                        if v != 0 {
                            regs.page_last.store(v, Ordering::Release);
                            regs.page_count.fetch_add(1, Ordering::AcqRel);
                            busy = true;
                        }
                    }
                    if let Some(ev) = &ioevent {
                        if let Ok(n) = drain_eventfd(&**ev) {
                            if n > 0 {
                                let n = u32::try_from(n).unwrap_or(u32::MAX);
                                regs.doorbell_count.fetch_add(n, Ordering::AcqRel);
                                busy = true;
                            }
                        }
                    }
                    if busy {
                        backoff.reset();
                    } else {
                        backoff.idle();
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DoorbellPoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev_vfio_user::wire::dma_flags;
    use emudev_vfio_user::{DmaError, DmaPort, DmaRegion, DmaTransport};
    use std::sync::atomic::AtomicU64;
    use vm_memory::{MmapRegion, VolatileMemory};

    const RW: u32 = dma_flags::READ | dma_flags::WRITE;

    fn engine() -> (DmaEngine, Arc<SharedRegs>, Arc<AtomicU64>) {
        let regs = Arc::new(SharedRegs::default());
        let irqs = Arc::new(AtomicU64::new(0));
        let i = irqs.clone();
        let e = DmaEngine::new(
            "t",
            regs.clone(),
            Arc::new(move |_| {
                i.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        (e, regs, irqs)
    }

    fn wait_for(f: impl Fn() -> bool) -> bool {
        let t0 = Instant::now();
        while !f() {
            if t0.elapsed() > Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn job(cmd: u32, dst: u64, src: u64, len: u32, repeat: u32) -> DmaJob {
        DmaJob {
            cmd,
            dst,
            src,
            len,
            pattern: 0,
            repeat,
            vector: 0,
        }
    }

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(checksum(b""), 0x811c_9dc5);
        assert_eq!(checksum(b"a"), 0xe40c_292c);
        assert_eq!(checksum(b"foobar"), 0xbf9c_f968);
        // Chunked hashing equals one-shot hashing.
        assert_eq!(fnv1a(checksum(b"foo"), b"bar"), checksum(b"foobar"));
    }

    #[test]
    fn quiesced_engine_touches_nothing_until_resume() {
        let (e, regs, _) = engine();
        let m = Arc::new(MmapRegion::new(0x20000).unwrap());
        let table = [DmaRegion {
            iova: 0,
            size: 0x20000,
            prot: RW,
            mapping: Some(m.clone()),
            map_offset: 0,
        }];
        e.set_memory(Arc::new(GuestMemory::from_dma(&table, None)));
        e.start(
            job(regs::DMA_CMD_COPY, 0x10000, 0, 0x10000, u32::MAX),
            &regs,
        );
        assert!(wait_for(|| regs.dma_passes.load(Ordering::Acquire) >= 1));
        assert!(e.quiesce());
        // Change the source; a quiesced engine must not copy it.
        m.get_slice(0, 0x10000)
            .unwrap()
            .copy_from(&[0x77u8; 0x10000][..]);
        std::thread::sleep(Duration::from_millis(30));
        let mut dst = vec![0u8; 0x10000];
        m.get_slice(0x10000, 0x10000).unwrap().copy_to(&mut dst[..]);
        assert!(dst.iter().all(|b| *b == 0), "copied while quiesced");
        e.resume();
        assert!(wait_for(|| {
            let mut b = [0u8; 1];
            m.get_slice(0x1ffff, 1).unwrap().copy_to(&mut b[..]);
            b[0] == 0x77
        }));
        assert!(e.cancel(&regs));
        assert_eq!(
            regs.dma_status.load(Ordering::Acquire),
            regs::DMA_STATUS_IDLE
        );
        assert!(e.is_idle());
    }

    /// A client that never answers until released.
    struct StuckPort(Mutex<bool>, Condvar);
    impl DmaTransport for StuckPort {
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DmaError> {
            self.write(0, &[])
        }
        fn write(&self, addr: u64, _: &[u8]) -> Result<(), DmaError> {
            let mut g = self.0.lock().unwrap();
            while !*g {
                g = self.1.wait(g).unwrap();
            }
            Err(DmaError::Timeout { addr, len: 0 })
        }
    }

    #[test]
    fn quiesce_does_not_wait_for_message_dma() {
        let (e, regs, irqs) = engine();
        let port = Arc::new(StuckPort(Mutex::new(false), Condvar::new()));
        let table = [DmaRegion {
            iova: 0,
            size: 0x1000,
            prot: RW,
            mapping: None,
            map_offset: 0,
        }];
        e.set_memory(Arc::new(GuestMemory::from_dma(
            &table,
            Some(DmaPort::new(port.clone())),
        )));
        e.start(job(regs::DMA_CMD_FILL, 0, 0, 0x1000, 1), &regs);
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        assert!(e.quiesce());
        assert!(t0.elapsed() < Duration::from_millis(500));
        e.set_memory(Arc::new(GuestMemory::empty()));
        e.resume();
        *port.0.lock().unwrap() = true;
        port.1.notify_all();
        assert!(wait_for(
            || regs.dma_status.load(Ordering::Acquire) == regs::DMA_STATUS_ERROR
        ));
        assert_eq!(regs.dma_errors.load(Ordering::Acquire), 1);
        assert!(
            wait_for(|| irqs.load(Ordering::SeqCst) == 1),
            "error raises the vector"
        );
    }

    #[test]
    fn repeat_counts_passes_and_new_job_replaces_old() {
        let (e, regs, irqs) = engine();
        let m = Arc::new(MmapRegion::new(0x4000).unwrap());
        let table = [DmaRegion {
            iova: 0x1000,
            size: 0x4000,
            prot: RW,
            mapping: Some(m),
            map_offset: 0,
        }];
        e.set_memory(Arc::new(GuestMemory::from_dma(&table, None)));
        e.start(job(regs::DMA_CMD_CHECKSUM, 0, 0x1000, 0x3000, 3), &regs);
        assert!(wait_for(
            || regs.dma_status.load(Ordering::Acquire) == regs::DMA_STATUS_DONE
        ));
        assert_eq!(regs.dma_passes.load(Ordering::Acquire), 3);
        assert_eq!(
            regs.dma_result.load(Ordering::Acquire),
            checksum(&[0u8; 0x3000])
        );
        assert!(wait_for(|| irqs.load(Ordering::SeqCst) == 1));
        // A forever job replaced by a one-shot job: the one-shot completes.
        e.start(job(regs::DMA_CMD_FILL, 0x1000, 0, 0x4000, u32::MAX), &regs);
        e.start(job(regs::DMA_CMD_FILL, 0x1000, 0, 0x100, 1), &regs);
        assert!(wait_for(
            || regs.dma_status.load(Ordering::Acquire) == regs::DMA_STATUS_DONE
        ));
        assert_eq!(regs.dma_passes.load(Ordering::Acquire), 1);
    }
}
