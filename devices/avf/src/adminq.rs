//! The admin queue engine (avf-device.md §3): consumes the ATQ, hands virtchnl requests to
//! [`crate::pf::VfState`], produces replies and events into the ARQ and raises vector 0.
//!
//! It runs on a worker thread, never on the control thread: ring and buffer accesses may be
//! DMA messages whose replies only the control thread routes. The state lock is never held
//! across a guest-memory access; the reset epoch tells a pass that its snapshot went stale
//! (a reset or an AQ shutdown happened meanwhile), so it commits nothing.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use emudev::GuestMemory;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::irq::Irqs;
use crate::pf::{ArqMsg, VfState};
use crate::regs;
use crate::virtchnl::status;

/// Admin-queue descriptor (32 bytes, both rings; §3.1). `addr_high` precedes `addr_low`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AqDesc {
    pub flags: U16,
    pub opcode: U16,
    pub datalen: U16,
    pub retval: U16,
    pub cookie_high: U32,
    pub cookie_low: U32,
    pub param0: U32,
    pub param1: U32,
    pub addr_high: U32,
    pub addr_low: U32,
}

impl AqDesc {
    /// The external buffer address.
    pub fn addr(&self) -> u64 {
        (u64::from(self.addr_high.get()) << 32) | u64::from(self.addr_low.get())
    }
}

/// Descriptor size.
pub const DESC_SIZE: u64 = 32;
/// Largest message buffer (IAVF_MAX_AQ_BUF_SIZE).
pub const MAX_BUF: usize = 4096;
/// Messages waiting for ARQ slots beyond which the oldest is dropped (OVFL).
pub const OUTBOX_LIMIT: usize = 64;
/// Descriptors handled per pass before re-checking for pause/shutdown.
const PASS_BUDGET: usize = 1024;

/// Descriptor flags (§3.2).
pub mod flags {
    pub const DD: u16 = 1 << 0;
    pub const CMP: u16 = 1 << 1;
    pub const ERR: u16 = 1 << 2;
    pub const LB: u16 = 1 << 9;
    pub const RD: u16 = 1 << 10;
    pub const BUF: u16 = 1 << 12;
    pub const SI: u16 = 1 << 13;
}

/// AQ opcodes.
pub mod aq_op {
    pub const QUEUE_SHUTDOWN: u16 = 0x0003;
    pub const SEND_TO_PF: u16 = 0x0801;
    pub const SEND_TO_VF: u16 = 0x0802;
}

/// AQ return code for an opcode we do not know (IAVF_AQ_RC_ENOSYS).
pub const AQ_RC_ENOSYS: u16 = 17;

/// The BAR0 register file as plain 32-bit storage, shared with the worker.
#[derive(Debug)]
pub struct RegFile(Vec<AtomicU32>);

impl RegFile {
    pub fn new() -> Self {
        Self(
            (0..regs::BAR0_SIZE / 4)
                .map(|_| AtomicU32::new(0))
                .collect(),
        )
    }

    fn slot(&self, off: u64) -> Option<&AtomicU32> {
        usize::try_from(off / 4).ok().and_then(|i| self.0.get(i))
    }

    pub fn get(&self, off: u64) -> u32 {
        self.slot(off).map_or(0, |r| r.load(Ordering::Acquire))
    }

    pub fn set(&self, off: u64, v: u32) {
        if let Some(r) = self.slot(off) {
            r.store(v, Ordering::Release);
        }
    }

    pub fn or(&self, off: u64, v: u32) {
        if let Some(r) = self.slot(off) {
            r.fetch_or(v, Ordering::AcqRel);
        }
    }

    /// Read and clear (ICR01).
    pub fn take(&self, off: u64) -> u32 {
        self.slot(off).map_or(0, |r| r.swap(0, Ordering::AcqRel))
    }

    /// Every register to 0.
    pub fn clear(&self) {
        self.0.iter().for_each(|r| r.store(0, Ordering::Release));
    }
}

impl Default for RegFile {
    fn default() -> Self {
        Self::new()
    }
}

/// State protected by the core lock.
#[derive(Debug)]
pub struct Core {
    pub vf: VfState,
    pub outbox: VecDeque<ArqMsg>,
    /// Reset the VF once the outbox drained (REQUEST_QUEUES granted).
    pub reset_after_drain: bool,
    /// ARQ messages delivered since creation.
    pub delivered: u64,
    /// Received frames the MAC filter refused.
    pub rx_filtered: u64,
}

/// Worker control.
#[derive(Debug)]
struct WorkCtl {
    mem: Arc<GuestMemory>,
    kick: bool,
    paused: bool,
    busy: bool,
    /// The pass in flight reaches memory only through mappings (never waits on DMA
    /// messages), so the control thread may wait for it.
    pass_mapped: bool,
    shutdown: bool,
    /// A VF reset due at this time unless the epoch moved on (REQUEST_QUEUES granted: the
    /// VF first gets a moment to read RESET_IMPENDING, §6.3).
    reset_at: Option<(Instant, u64)>,
}

/// Everything the control thread and the worker share.
#[derive(Debug)]
pub struct Shared {
    pub regs: RegFile,
    pub core: Mutex<Core>,
    pub irqs: Irqs,
    /// Bumped by every reset and AQ shutdown; passes that saw an older value commit nothing.
    pub epoch: AtomicU64,
    work: Mutex<WorkCtl>,
    cv: Condvar,
    /// Held by the datapath for each pass; taking it waits out the pass in flight.
    pub dp_pass: Mutex<()>,
    /// Wakes the datapath poller (tail writes, queue enables).
    pub dp_kick: emudev::pci::EventFd,
    dp_stop: std::sync::atomic::AtomicBool,
    /// Threads waiting in [`Shared::fence_datapath`]; the datapath skips passes meanwhile so
    /// that a busy poller cannot keep re-taking `dp_pass` ahead of them.
    dp_fencing: std::sync::atomic::AtomicUsize,
    /// Passes run on the thread that kicks ([`AdminMode::Inline`]), not on a worker.
    inline: bool,
}

/// Where admin-queue passes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminMode {
    /// On the device's worker thread (the default): ring and buffer accesses may be DMA
    /// messages that only the control thread routes, so it must not run them itself.
    #[default]
    Worker,
    /// On the thread that rings the doorbell (or writes a LEN register, or resumes), before
    /// that call returns; a reset announced by RESET_IMPENDING follows at once instead of
    /// after [`RESET_IMPENDING_GRACE`]. Only for single-threaded harnesses (fuzzing,
    /// deterministic tests) whose guest memory is fully mapped: with message-based DMA the
    /// pass would wait on messages its own thread has to route.
    Inline,
}

/// Lock, ignoring poisoning (the state stays consistent: every update is a plain store).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long quiesce waits for a pass in flight.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);
/// Delay between RESET_IMPENDING reaching the ARQ and the reset it announces.
pub const RESET_IMPENDING_GRACE: Duration = Duration::from_millis(10);
/// How long a head-register read waits for the worker ([`Shared::settle`]).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

impl Shared {
    pub fn new(vf: VfState, irqs: Irqs) -> std::io::Result<Self> {
        Self::with_mode(vf, irqs, AdminMode::Worker)
    }

    pub fn with_mode(vf: VfState, irqs: Irqs, mode: AdminMode) -> std::io::Result<Self> {
        let s = Self {
            regs: RegFile::new(),
            core: Mutex::new(Core {
                vf,
                outbox: VecDeque::new(),
                reset_after_drain: false,
                delivered: 0,
                rx_filtered: 0,
            }),
            irqs,
            epoch: AtomicU64::new(0),
            work: Mutex::new(WorkCtl {
                mem: Arc::new(GuestMemory::empty()),
                kick: false,
                paused: false,
                busy: false,
                pass_mapped: true,
                shutdown: false,
                reset_at: None,
            }),
            cv: Condvar::new(),
            dp_pass: Mutex::new(()),
            dp_kick: emudev::doorbell::new_eventfd()?,
            dp_stop: std::sync::atomic::AtomicBool::new(false),
            dp_fencing: std::sync::atomic::AtomicUsize::new(0),
            inline: mode == AdminMode::Inline,
        };
        s.regs.set(regs::VFGEN_RSTAT, regs::RSTAT_VFACTIVE);
        Ok(s)
    }

    /// Wake the datapath poller.
    pub fn kick_datapath(&self) {
        if let Err(e) = self.dp_kick.signal() {
            log::debug!("avf: datapath kick: {e}");
        }
    }

    /// True once the device is being dropped.
    pub fn dp_stopping(&self) -> bool {
        self.dp_stop.load(Ordering::Acquire)
    }

    /// The memory snapshot for a datapath pass; `None` while quiesced.
    pub fn dp_memory(&self) -> Option<Arc<GuestMemory>> {
        let w = lock(&self.work);
        (!w.paused).then(|| w.mem.clone())
    }

    /// Wait until no datapath pass is in flight (the next one sees the current state).
    pub fn fence_datapath(&self) {
        self.dp_fencing.fetch_add(1, Ordering::AcqRel);
        drop(lock(&self.dp_pass));
        self.dp_fencing.fetch_sub(1, Ordering::AcqRel);
    }

    /// True while some thread waits in [`Shared::fence_datapath`].
    pub fn dp_fence_pending(&self) -> bool {
        self.dp_fencing.load(Ordering::Acquire) > 0
    }

    pub fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.core)
    }

    /// Ask the worker for a pass (inline mode: run it now).
    pub fn kick(&self) {
        let mut w = lock(&self.work);
        w.kick = true;
        self.cv.notify_all();
        if self.inline && !w.busy {
            drop(w);
            self.run_inline();
        }
    }

    /// [`AdminMode::Inline`]: run passes (and a reset they announced) until no kick is
    /// left. A kick arriving meanwhile (from another thread) is picked up by the loop.
    fn run_inline(&self) {
        loop {
            let (mem, reset) = {
                let mut w = lock(&self.work);
                if w.shutdown || w.paused || w.busy {
                    return;
                }
                let reset = w.reset_at.take().map(|(_, epoch)| epoch);
                if reset.is_none() && !w.kick {
                    return;
                }
                claim(&mut w, reset)
            };
            run_claimed(self, &mem, reset);
        }
    }

    pub fn set_memory(&self, mem: Arc<GuestMemory>) {
        lock(&self.work).mem = mem;
    }

    /// Pause the worker and wait (bounded) for its pass in flight. A pass that may be
    /// waiting for DMA messages is not waited for (the caller routes them).
    pub fn quiesce(&self) -> bool {
        let mut w = lock(&self.work);
        w.paused = true;
        if !w.mem.all_mapped() {
            // Commits only touch registers; the closed message port fails its DMA.
            return true;
        }
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        while w.busy {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            w = self
                .cv
                .wait_timeout(w, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(w);
        self.fence_datapath();
        true
    }

    /// Wait (bounded by [`SETTLE_TIMEOUT`]) until the worker has no pass pending or in
    /// flight, so that a register read following a doorbell sees its effect, as on hardware
    /// that completes the ATQ before the next read. The Linux driver checks `ATQH` about
    /// 30 ms after the VERSION doorbell and polls the ARQ head; a worker delayed by host load
    /// made it log "Admin queue command never completed" and restart init. Skipped when
    /// memory is reached by messages (a pass may wait on DMA replies the caller routes:
    /// neither the current snapshot nor the pass in flight may use them) and while the
    /// worker is paused. Returns false if it did not settle.
    pub fn settle(&self) -> bool {
        let mut w = lock(&self.work);
        if !w.mem.all_mapped() {
            return false;
        }
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while (w.kick || w.busy) && !w.paused && !w.shutdown {
            let now = Instant::now();
            if now >= deadline || (w.busy && !w.pass_mapped) {
                return false;
            }
            w = self
                .cv
                .wait_timeout(w, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    pub fn resume(&self) {
        let mut w = lock(&self.work);
        w.paused = false;
        self.cv.notify_all();
    }

    pub fn shutdown(&self) {
        let mut w = lock(&self.work);
        w.shutdown = true;
        self.cv.notify_all();
        drop(w);
        self.dp_stop.store(true, Ordering::Release);
        self.kick_datapath();
    }

    /// The AQ part of a reset, with the core lock held: AQ registers zeroed, outbox dropped.
    fn teardown_aq(&self, core: &mut Core) {
        for r in [
            regs::VF_ATQH,
            regs::VF_ATQT,
            regs::VF_ATQLEN,
            regs::VF_ATQBAL,
            regs::VF_ATQBAH,
            regs::VF_ARQH,
            regs::VF_ARQT,
            regs::VF_ARQLEN,
            regs::VF_ARQBAL,
            regs::VF_ARQBAH,
        ] {
            self.regs.set(r, 0);
        }
        core.outbox.clear();
        core.reset_after_drain = false;
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// VF reset (§6.2 device actions): RSTAT 0, AQ torn down, queues/IRQ map/filters/RSS
    /// forgotten, every register back to 0, then RSTAT 2.
    pub fn vf_reset(&self, core: &mut Core, device: bool) {
        self.regs.set(regs::VFGEN_RSTAT, regs::RSTAT_INPROGRESS);
        self.teardown_aq(core);
        if device {
            core.vf.reset_device();
        } else {
            core.vf.reset_vf();
        }
        self.irqs.reset();
        self.regs.clear();
        self.regs.set(regs::VFGEN_RSTAT, regs::RSTAT_VFACTIVE);
    }

    /// ATQLEN or ARQLEN written; `old` is the previous value.
    pub fn aq_len_written(&self, off: u64, old: u32, new: u32) {
        if old & regs::AQ_LEN_ENABLE != 0 && new & regs::AQ_LEN_ENABLE == 0 {
            let mut core = self.core();
            core.outbox.clear();
            core.reset_after_drain = false;
            self.epoch.fetch_add(1, Ordering::AcqRel);
            log::debug!("avf: AQ disabled via {off:#x}; outbox dropped");
        }
        self.kick();
    }
}

/// The worker thread body: a pass per kick, and the deferred reset when it is due.
pub fn worker_loop(shared: &Shared) {
    loop {
        let (mem, reset) = {
            let mut w = lock(&shared.work);
            let reset = loop {
                if w.shutdown {
                    return;
                }
                if !w.paused {
                    let now = Instant::now();
                    if let Some((at, epoch)) = w.reset_at {
                        if now >= at {
                            w.reset_at = None;
                            break Some(epoch);
                        }
                    }
                    if w.kick {
                        break None;
                    }
                    if let Some((at, _)) = w.reset_at {
                        w = shared
                            .cv
                            .wait_timeout(w, at - now)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        continue;
                    }
                }
                w = shared.cv.wait(w).unwrap_or_else(PoisonError::into_inner);
            };
            claim(&mut w, reset)
        };
        run_claimed(shared, &mem, reset);
    }
}

/// Take the next work item under the work lock: a due reset (`reset`), or else the pending
/// kick, which is consumed. Marks the worker busy and returns the memory to use.
fn claim(w: &mut WorkCtl, reset: Option<u64>) -> (Arc<GuestMemory>, Option<u64>) {
    if reset.is_none() {
        w.kick = false;
    }
    w.busy = true;
    w.pass_mapped = w.mem.all_mapped();
    (w.mem.clone(), reset)
}

/// Run a claimed item, then release it: not busy, kicked again if work remains.
fn run_claimed(shared: &Shared, mem: &GuestMemory, reset: Option<u64>) {
    let again = work_item(shared, mem, reset);
    let mut w = lock(&shared.work);
    w.busy = false;
    w.kick |= again;
    shared.cv.notify_all();
}

/// The deferred reset announced for `reset` (an epoch), if it is still current, or else a
/// pass. Returns true if work remains.
fn work_item(shared: &Shared, mem: &GuestMemory, reset: Option<u64>) -> bool {
    match reset {
        Some(epoch) => {
            let mut core = shared.core();
            if shared.epoch.load(Ordering::Acquire) == epoch {
                shared.vf_reset(&mut core, false);
            }
            drop(core);
            shared.fence_datapath();
            false
        }
        None => run_pass(shared, mem),
    }
}

/// One pass: drain the ATQ, then deliver the outbox. Returns true if work remains.
pub fn run_pass(shared: &Shared, mem: &GuestMemory) -> bool {
    let (more, fence) = process_atq(shared, mem);
    // No datapath pass that snapshotted the state before these messages (queues, filters,
    // VLAN stripping) outlives their replies: DISABLE_QUEUES and resets need no DMA after
    // the reply, and frames the VF expects after a reply get the new RX policy. A pass in
    // flight is short, and messages are rare.
    shared.fence_datapath();
    if !fence {
        shared.kick_datapath();
    }
    deliver_arq(shared, mem);
    let drained_reset = {
        let mut core = shared.core();
        if core.reset_after_drain && core.outbox.is_empty() {
            core.reset_after_drain = false;
            true
        } else {
            false
        }
    };
    if drained_reset {
        // §6.3: give the VF a moment to see RESET_IMPENDING before the reset. Deferred to
        // the worker loop so that head reads ([`Shared::settle`]) do not wait for it.
        let due = Instant::now() + RESET_IMPENDING_GRACE;
        lock(&shared.work).reset_at = Some((due, shared.epoch.load(Ordering::Acquire)));
    }
    more
}

/// Ring geometry read from the registers; `None` if disabled or inconsistent (then the
/// CRIT flag is set on the LEN register).
fn ring(
    shared: &Shared,
    len_reg: u64,
    bal: u64,
    bah: u64,
    h: u64,
    t: u64,
) -> Option<(u64, u32, u32, u32)> {
    let lenv = shared.regs.get(len_reg);
    let len = lenv & regs::AQ_LEN_MASK;
    if lenv & regs::AQ_LEN_ENABLE == 0 || len == 0 {
        return None;
    }
    let base = (u64::from(shared.regs.get(bah)) << 32) | u64::from(shared.regs.get(bal));
    let head = shared.regs.get(h) & regs::AQ_PTR_MASK;
    let tail = shared.regs.get(t) & regs::AQ_PTR_MASK;
    if head >= len || tail >= len {
        log::warn!("avf: AQ {len_reg:#x}: head {head} / tail {tail} outside ring of {len}");
        shared.regs.or(len_reg, regs::AQ_LEN_CRIT);
        return None;
    }
    Some((base, len, head, tail))
}

fn desc_addr(base: u64, idx: u32) -> Option<u64> {
    base.checked_add(u64::from(idx) * DESC_SIZE)
}

/// Write a descriptor, its flags word last after a release fence.
fn write_desc(mem: &GuestMemory, gpa: u64, d: &AqDesc) -> Result<(), emudev::MemError> {
    let bytes = d.as_bytes();
    mem.write(gpa.wrapping_add(2), &bytes[2..])?;
    fence(Ordering::Release);
    mem.write(gpa, &bytes[..2])
}

fn process_atq(shared: &Shared, mem: &GuestMemory) -> (bool, bool) {
    let mut fence = false;
    for _ in 0..PASS_BUDGET {
        let epoch = shared.epoch.load(Ordering::Acquire);
        let Some((base, len, head, tail)) = ring(
            shared,
            regs::VF_ATQLEN,
            regs::VF_ATQBAL,
            regs::VF_ATQBAH,
            regs::VF_ATQH,
            regs::VF_ATQT,
        ) else {
            return (false, fence);
        };
        if head == tail {
            return (false, fence);
        }
        let Some(gpa) = desc_addr(base, head) else {
            shared.regs.or(regs::VF_ATQLEN, regs::AQ_LEN_CRIT);
            return (false, fence);
        };
        let mut desc = match mem.read_obj::<AqDesc>(gpa) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("avf: ATQ descriptor at {gpa:#x}: {e}");
                shared.regs.or(regs::VF_ATQLEN, regs::AQ_LEN_CRIT);
                return (false, fence);
            }
        };
        // Payload: only with BUF and a non-zero length.
        let dlen = usize::from(desc.datalen.get());
        let payload: Result<Vec<u8>, i32> = if desc.flags.get() & flags::BUF != 0 && dlen > 0 {
            if dlen > MAX_BUF {
                Err(status::ERR_PARAM)
            } else {
                let mut buf = vec![0u8; dlen];
                match mem.read(desc.addr(), &mut buf) {
                    Ok(()) => Ok(buf),
                    Err(e) => {
                        log::warn!("avf: ATQ buffer {:#x}+{dlen}: {e}", desc.addr());
                        Err(status::ERR_PARAM)
                    }
                }
            }
        } else {
            Ok(Vec::new())
        };
        let v_op = desc.cookie_high.get();
        log::debug!(
            "avf: ATQ[{head}] aq op {:#x} virtchnl op {v_op} len {dlen}",
            desc.opcode.get()
        );
        let (retval, outcome) = match desc.opcode.get() {
            aq_op::SEND_TO_PF => {
                let mut core = shared.core();
                if shared.epoch.load(Ordering::Acquire) != epoch {
                    continue;
                }
                let out = match payload {
                    Ok(msg) => core.vf.handle(v_op, &msg, mem),
                    Err(st) => crate::pf::Outcome {
                        messages: vec![ArqMsg {
                            opcode: v_op,
                            status: st,
                            data: Vec::new(),
                        }],
                        reset: false,
                    },
                };
                (0, Some(out))
            }
            aq_op::QUEUE_SHUTDOWN => (0, None),
            other => {
                log::debug!("avf: unknown AQ opcode {other:#x}");
                (AQ_RC_ENOSYS, None)
            }
        };
        desc.flags = (desc.flags.get() | flags::DD | flags::CMP).into();
        desc.retval = retval.into();
        if let Err(e) = write_desc(mem, gpa, &desc) {
            log::warn!("avf: ATQ write-back at {gpa:#x}: {e}");
        }
        let mut core = shared.core();
        if shared.epoch.load(Ordering::Acquire) != epoch {
            continue;
        }
        shared.regs.set(regs::VF_ATQH, (head + 1) % len);
        fence |= v_op == crate::virtchnl::op::DISABLE_QUEUES;
        if let Some(out) = outcome {
            for m in out.messages {
                if core.outbox.len() >= OUTBOX_LIMIT {
                    core.outbox.pop_front();
                    shared.regs.or(regs::VF_ARQLEN, regs::AQ_LEN_OVFL);
                }
                core.outbox.push_back(m);
            }
            if out.reset {
                if core.outbox.is_empty() {
                    shared.vf_reset(&mut core, false);
                    return (false, true);
                }
                core.reset_after_drain = true;
            }
        }
    }
    (true, fence)
}

fn deliver_arq(shared: &Shared, mem: &GuestMemory) {
    loop {
        let epoch = shared.epoch.load(Ordering::Acquire);
        let (msg, base, len, head) = {
            let core = shared.core();
            let Some(msg) = core.outbox.front().cloned() else {
                return;
            };
            let Some((base, len, head, tail)) = ring(
                shared,
                regs::VF_ARQLEN,
                regs::VF_ARQBAL,
                regs::VF_ARQBAH,
                regs::VF_ARQH,
                regs::VF_ARQT,
            ) else {
                return;
            };
            if head == tail {
                return;
            }
            (msg, base, len, head)
        };
        let Some(gpa) = desc_addr(base, head) else {
            shared.regs.or(regs::VF_ARQLEN, regs::AQ_LEN_CRIT);
            return;
        };
        let mut desc = match mem.read_obj::<AqDesc>(gpa) {
            Ok(d) => d,
            Err(e) => {
                log::warn!("avf: ARQ descriptor at {gpa:#x}: {e}");
                shared.regs.or(regs::VF_ARQLEN, regs::AQ_LEN_CRIT);
                return;
            }
        };
        let posted = desc.flags.get();
        let cap = if posted & flags::BUF != 0 {
            usize::from(desc.datalen.get()).min(MAX_BUF)
        } else {
            0
        };
        let n = msg.data.len().min(cap);
        let mut st = msg.status;
        let mut written = n;
        if n < msg.data.len() {
            log::warn!(
                "avf: ARQ buffer of {cap} bytes too small for {}",
                msg.data.len()
            );
            st = status::ERR_ADMIN_QUEUE_ERROR;
            written = 0;
        } else if n > 0 {
            if let Err(e) = mem.write(desc.addr(), &msg.data[..n]) {
                log::warn!("avf: ARQ buffer {:#x}: {e}", desc.addr());
                st = status::ERR_ADMIN_QUEUE_ERROR;
                written = 0;
            }
        }
        log::debug!(
            "avf: ARQ[{head}] op {} status {st} len {written}",
            msg.opcode
        );
        desc.flags = ((posted & !flags::ERR) | flags::DD | flags::CMP).into();
        desc.opcode = aq_op::SEND_TO_VF.into();
        desc.datalen = (written as u16).into();
        desc.retval = 0.into();
        desc.cookie_high = msg.opcode.into();
        desc.cookie_low = (st as u32).into();
        desc.param0 = 0.into();
        desc.param1 = 0.into();
        if let Err(e) = write_desc(mem, gpa, &desc) {
            log::warn!("avf: ARQ descriptor write at {gpa:#x}: {e}");
            shared.regs.or(regs::VF_ARQLEN, regs::AQ_LEN_CRIT);
            return;
        }
        {
            let mut core = shared.core();
            if shared.epoch.load(Ordering::Acquire) != epoch {
                return;
            }
            core.outbox.pop_front();
            core.delivered += 1;
            shared.regs.set(regs::VF_ARQH, (head + 1) % len);
        }
        shared.regs.or(regs::VFINT_ICR01, regs::ICR0_ADMINQ);
        shared.irqs.event(0);
    }
}
