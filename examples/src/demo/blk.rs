//! A small virtio-pci driver for virtio-blk over a vfio-user socket.
//!
//! It finds the common, notify and device configuration structures through the virtio
//! vendor capabilities, negotiates VERSION_1 (and FLUSH when offered), sets up one split
//! queue with an MSI-X vector, then keeps `depth` requests in flight: each a fixed chain of
//! header, data buffer and status byte. Completions are found in the used ring after the
//! queue's MSI-X eventfd fires.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use emudev::pci::EventFd;
use emudev_vfio_user::Client;
use vm_memory::{Bytes, VolatileMemory, VolatileSlice};

use super::pci::{self, Config};
use super::virtio::{common, status, DESC_WRITE, VIRTIO_F_VERSION_1};
use super::{pattern, wait_irq, DemoError, Progress, SharedRam, Step};

/// What to do.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Sectors (512 bytes) written then read, from sector `first_sector`.
    pub sectors: u64,
    pub first_sector: u64,
    /// Sectors per request.
    pub sectors_per_request: u32,
    /// Requests kept in flight.
    pub depth: u16,
    pub seed: u64,
    /// Print progress bars and results.
    pub verbose: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            sectors: 8192,
            first_sector: 0,
            sectors_per_request: 8,
            depth: 16,
            seed: 0x5eed_0001,
            verbose: true,
        }
    }
}

/// One pass (write or read).
#[derive(Debug, Clone, Copy, Default)]
pub struct Phase {
    pub requests: u64,
    pub bytes: u64,
    /// Wall time of the pass, without the time spent making and verifying the pattern.
    pub elapsed: Duration,
    pub interrupts: u64,
}

impl Phase {
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What the run found.
#[derive(Debug, Clone, Default)]
pub struct BlkReport {
    pub capacity_sectors: u64,
    pub features: u64,
    pub queue_size: u16,
    pub write: Phase,
    pub read: Phase,
    pub flushed: bool,
}

const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const DESC_NEXT: u16 = 1;

// Guest RAM layout (IOVA = offset in the memfd).
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x4000;
const STATUS: u64 = 0x6000;
const DATA: u64 = 0x10_0000;
const MAX_REQ_BYTES: u64 = 64 * 1024;
const MAX_DEPTH: u16 = 64;
const RAM: usize = (DATA + MAX_REQ_BYTES * MAX_DEPTH as u64) as usize;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a virtio structure lives: (BAR, offset).
#[derive(Debug, Clone, Copy)]
struct Loc {
    bar: u32,
    off: u64,
}

struct Driver<'a> {
    c: &'a mut Client,
    ram: &'a SharedRam,
    common: Loc,
    notify: Loc,
    notify_mult: u32,
    device: Loc,
    qsize: u16,
    notify_addr: u64,
    avail_idx: u16,
    last_used: u16,
    irq: EventFd,
    interrupts: u64,
}

fn mem(ram: &SharedRam) -> VolatileSlice<'_> {
    ram.map.as_volatile_slice()
}

impl Driver<'_> {
    fn rd(&mut self, loc: Loc, off: u64, len: u32) -> Result<u64, DemoError> {
        let v = self
            .c
            .region_read(loc.bar, loc.off + off, len)
            .step("virtio register read")?;
        let mut b = [0u8; 8];
        let n = v.len().min(8);
        b[..n].copy_from_slice(&v[..n]);
        Ok(u64::from_le_bytes(b))
    }

    fn wr(&mut self, loc: Loc, off: u64, len: usize, v: u64) -> Result<(), DemoError> {
        self.c
            .region_write(loc.bar, loc.off + off, &v.to_le_bytes()[..len])
            .step("virtio register write")
    }

    fn set_status(&mut self, s: u8) -> Result<u8, DemoError> {
        self.wr(self.common, common::DEVICE_STATUS, 1, u64::from(s))?;
        Ok(self.rd(self.common, common::DEVICE_STATUS, 1)? as u8)
    }

    fn write_desc(
        &self,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DemoError> {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem(self.ram)
            .write_slice(&d, (DESC + 16 * u64::from(i)) as usize)
            .map_err(|e| DemoError::Device(format!("descriptor write: {e}")))
    }

    /// Publish the chain at `head` and tell the device.
    fn submit(&mut self, heads: &[u16]) -> Result<(), DemoError> {
        let m = mem(self.ram);
        for &h in heads {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.qsize);
            m.store(h, slot as usize, Ordering::Relaxed)
                .map_err(|e| DemoError::Device(format!("avail ring: {e}")))?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        // Release: the device sees the ring entries and descriptors before the index.
        m.store(self.avail_idx, (AVAIL + 2) as usize, Ordering::Release)
            .map_err(|e| DemoError::Device(format!("avail idx: {e}")))?;
        std::sync::atomic::fence(Ordering::SeqCst);
        self.c
            .region_write(self.notify.bar, self.notify_addr, &0u16.to_le_bytes())
            .step("queue notify")
    }

    /// Used entries (head, len) published since the last call, waiting for the interrupt
    /// when there are none yet.
    fn reap(&mut self) -> Result<Vec<(u16, u32)>, DemoError> {
        let m = mem(self.ram);
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let used: u16 = m
                .load((USED + 2) as usize, Ordering::Acquire)
                .map_err(|e| DemoError::Device(format!("used idx: {e}")))?;
            let n = used.wrapping_sub(self.last_used);
            if n > self.qsize {
                return Err(DemoError::Device(format!(
                    "used index jumped by {n} on a ring of {}",
                    self.qsize
                )));
            }
            if n > 0 {
                let mut out = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    let e = USED + 4 + 8 * u64::from(self.last_used % self.qsize);
                    let id: u32 = m
                        .load(e as usize, Ordering::Relaxed)
                        .map_err(|e| DemoError::Device(e.to_string()))?;
                    let len: u32 = m
                        .load((e + 4) as usize, Ordering::Relaxed)
                        .map_err(|e| DemoError::Device(e.to_string()))?;
                    let id = u16::try_from(id)
                        .ok()
                        .filter(|&i| i < self.qsize)
                        .ok_or_else(|| DemoError::Device(format!("used id {id} out of range")))?;
                    out.push((id, len));
                    self.last_used = self.last_used.wrapping_add(1);
                }
                return Ok(out);
            }
            if Instant::now() > deadline {
                return Err(DemoError::Timeout("virtio-blk completions"));
            }
            if wait_irq(&self.irq, Duration::from_millis(50))? {
                self.interrupts += 1;
            }
        }
    }
}

fn find_virtio_caps(cfg: &Config) -> Result<(Loc, Loc, u32, Loc), DemoError> {
    let (mut common, mut notify, mut device) = (None, None, None);
    let mut mult = 0;
    for &(id, off) in &cfg.caps {
        if id != pci::CAP_VENDOR {
            continue;
        }
        let ty = cfg.bytes.get(off + 3).copied().unwrap_or(0);
        let loc = Loc {
            bar: u32::from(cfg.bytes.get(off + 4).copied().unwrap_or(0xff)),
            off: u64::from(cfg.u32_at(off + 8)),
        };
        match ty {
            1 => common = common.or(Some(loc)),
            2 if notify.is_none() => {
                notify = Some(loc);
                mult = cfg.u32_at(off + 16);
            }
            4 => device = device.or(Some(loc)),
            _ => {}
        }
    }
    match (common, notify, device) {
        (Some(c), Some(n), Some(d)) if c.bar < 6 && n.bar < 6 && d.bar < 6 => Ok((c, n, mult, d)),
        _ => Err(DemoError::Device(
            "virtio common/notify/device capabilities not found".into(),
        )),
    }
}

/// Connect to a virtio-blk at `path`, write the pattern, read it back and verify it.
pub fn run(path: &Path, o: &BlkOptions) -> Result<BlkReport, DemoError> {
    let req_bytes = u64::from(o.sectors_per_request) * 512;
    if o.sectors_per_request == 0 || req_bytes > MAX_REQ_BYTES {
        return Err(DemoError::Device(format!(
            "sectors per request must be 1 to {}",
            MAX_REQ_BYTES / 512
        )));
    }
    let mut c = Client::connect(path).step("connect")?;
    c.negotiate().step("negotiate")?;
    let ram = SharedRam::new(RAM)?;
    ram.dma_map(&mut c)?;
    let cfg = Config::read(&mut c)?;
    let (vendor, devid) = (cfg.u16_at(0), cfg.u16_at(2));
    if vendor != 0x1af4 || devid != 0x1042 {
        return Err(DemoError::Device(format!(
            "{vendor:04x}:{devid:04x} is not a modern virtio-blk (1af4:1042)"
        )));
    }
    let (common, notify, notify_mult, device) = find_virtio_caps(&cfg)?;
    pci::enable_bus_master(&mut c, &cfg)?;
    let mut irqs = pci::enable_msix(&mut c, &cfg, 2)?;
    let irq = irqs
        .pop()
        .ok_or(DemoError::Device("no MSI-X vector".into()))?;
    let mut d = Driver {
        c: &mut c,
        ram: &ram,
        common,
        notify,
        notify_mult,
        device,
        qsize: 0,
        notify_addr: 0,
        avail_idx: 0,
        last_used: 0,
        irq,
        interrupts: 0,
    };
    let mut report = BlkReport::default();

    // Reset, then the bring-up sequence of virtio 1.2 §3.1.1.
    if d.set_status(0)? != 0 {
        return Err(DemoError::Device(
            "device_status did not read 0 after reset".into(),
        ));
    }
    d.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
    let mut features = 0u64;
    for sel in 0..2u64 {
        d.wr(d.common, common::DEVICE_FEATURE_SELECT, 4, sel)?;
        features |= d.rd(d.common, common::DEVICE_FEATURE, 4)? << (32 * sel);
    }
    if features & VIRTIO_F_VERSION_1 == 0 {
        return Err(DemoError::Device("VIRTIO_F_VERSION_1 not offered".into()));
    }
    if features & VIRTIO_BLK_F_RO != 0 {
        return Err(DemoError::Device(
            "the disk is read-only; the demo writes".into(),
        ));
    }
    let driver = VIRTIO_F_VERSION_1 | (features & VIRTIO_BLK_F_FLUSH);
    for sel in 0..2u64 {
        d.wr(d.common, common::DRIVER_FEATURE_SELECT, 4, sel)?;
        d.wr(
            d.common,
            common::DRIVER_FEATURE,
            4,
            (driver >> (32 * sel)) & 0xffff_ffff,
        )?;
    }
    let st = d.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)?;
    if st & status::FEATURES_OK == 0 {
        return Err(DemoError::Device("FEATURES_OK refused".into()));
    }
    report.features = driver;
    d.wr(d.common, common::CONFIG_MSIX_VECTOR, 2, 0)?;

    d.wr(d.common, common::QUEUE_SELECT, 2, 0)?;
    let max = d.rd(d.common, common::QUEUE_SIZE, 2)? as u16;
    if max == 0 {
        return Err(DemoError::Device("queue 0 is not available".into()));
    }
    d.qsize = max.min(128);
    d.wr(d.common, common::QUEUE_SIZE, 2, u64::from(d.qsize))?;
    d.wr(d.common, common::QUEUE_MSIX_VECTOR, 2, 1)?;
    if d.rd(d.common, common::QUEUE_MSIX_VECTOR, 2)? != 1 {
        return Err(DemoError::Device(
            "MSI-X vector 1 refused for queue 0".into(),
        ));
    }
    for (reg, addr) in [
        (common::QUEUE_DESC, DESC),
        (common::QUEUE_DRIVER, AVAIL),
        (common::QUEUE_DEVICE, USED),
    ] {
        d.wr(d.common, reg, 4, addr & 0xffff_ffff)?;
        d.wr(d.common, reg + 4, 4, addr >> 32)?;
    }
    let notify_off = d.rd(d.common, common::QUEUE_NOTIFY_OFF, 2)?;
    d.notify_addr = d.notify.off + notify_off * u64::from(d.notify_mult);
    d.wr(d.common, common::QUEUE_ENABLE, 2, 1)?;
    let st = d.set_status(
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    )?;
    if st & status::DRIVER_OK == 0 || st & status::NEEDS_RESET != 0 {
        return Err(DemoError::Device(format!(
            "device status {st:#x} after DRIVER_OK"
        )));
    }
    let cap_lo = d.rd(d.device, 0, 4)?;
    let cap_hi = d.rd(d.device, 4, 4)?;
    report.capacity_sectors = cap_lo | cap_hi << 32;
    report.queue_size = d.qsize;
    let end = o
        .first_sector
        .checked_add(o.sectors)
        .filter(|&e| e <= report.capacity_sectors)
        .ok_or_else(|| {
            DemoError::Device(format!(
                "sectors {}..+{} do not fit a disk of {} sectors",
                o.first_sector, o.sectors, report.capacity_sectors
            ))
        })?;
    if o.verbose {
        println!(
            "virtio-blk: {} MiB, queue size {}, features {:#x}, {} KiB requests, depth {}",
            report.capacity_sectors / 2048,
            d.qsize,
            driver,
            req_bytes / 1024,
            o.depth
        );
    }

    let depth = o.depth.clamp(1, MAX_DEPTH.min(d.qsize / 3));
    report.write = transfer(&mut d, o, true, depth, end)?;
    report.read = transfer(&mut d, o, false, depth, end)?;

    if driver & VIRTIO_BLK_F_FLUSH != 0 {
        write_header(&d, 0, T_FLUSH, 0)?;
        d.write_desc(0, HEADERS, 16, DESC_NEXT, 2)?;
        d.write_desc(2, STATUS, 1, DESC_WRITE, 0)?;
        set_status_byte(&d, 0, 0xff)?;
        d.submit(&[0])?;
        let done = d.reap()?;
        check_status(&d, 0, "flush")?;
        report.flushed = done.len() == 1;
    }
    // Leave the device as a guest driver would on unload.
    d.set_status(0)?;
    drop(d);
    c.dma_unmap_all().step("DMA_UNMAP")?;
    Ok(report)
}

fn write_header(d: &Driver<'_>, slot: u16, ty: u32, sector: u64) -> Result<(), DemoError> {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem(d.ram)
        .write_slice(&h, (HEADERS + 16 * u64::from(slot)) as usize)
        .map_err(|e| DemoError::Device(format!("header write: {e}")))
}

fn set_status_byte(d: &Driver<'_>, slot: u16, v: u8) -> Result<(), DemoError> {
    mem(d.ram)
        .write_obj(v, (STATUS + u64::from(slot)) as usize)
        .map_err(|e| DemoError::Device(e.to_string()))
}

fn check_status(d: &Driver<'_>, slot: u16, what: &str) -> Result<(), DemoError> {
    let s: u8 = mem(d.ram)
        .read_obj((STATUS + u64::from(slot)) as usize)
        .map_err(|e| DemoError::Device(e.to_string()))?;
    match s {
        0 => Ok(()),
        1 => Err(DemoError::Device(format!("{what}: VIRTIO_BLK_S_IOERR"))),
        2 => Err(DemoError::Device(format!("{what}: VIRTIO_BLK_S_UNSUPP"))),
        s => Err(DemoError::Device(format!(
            "{what}: status byte {s:#x} (not written?)"
        ))),
    }
}

/// Write (or read and verify) sectors `first_sector..end` with `depth` requests in flight.
fn transfer(
    d: &mut Driver<'_>,
    o: &BlkOptions,
    write: bool,
    depth: u16,
    end: u64,
) -> Result<Phase, DemoError> {
    let spr = u64::from(o.sectors_per_request);
    let total = (end - o.first_sector).div_ceil(spr);
    let mut bar = Progress::new(if write { "write" } else { "read" }, total, o.verbose);
    let mut next = o.first_sector;
    // slot -> first sector of its request in flight.
    let mut inflight: Vec<Option<(u64, u32)>> = vec![None; usize::from(depth)];
    let mut free: Vec<u16> = (0..depth).rev().collect();
    let (mut done, irqs0) = (0u64, d.interrupts);
    let mut phase = Phase::default();
    let t0 = Instant::now();
    let mut buf = vec![0u8; (spr * 512) as usize];
    let mut got = vec![0u8; (spr * 512) as usize];
    let poison = vec![0xa5u8; (spr * 512) as usize];
    // Time the demo spends making and checking data, left out of the IOPS.
    let mut own = Duration::ZERO;
    while done < total {
        let mut heads = Vec::new();
        while next < end {
            let Some(slot) = free.pop() else { break };
            let n = (end - next).min(spr);
            let len = (n * 512) as u32;
            let data = DATA + u64::from(slot) * MAX_REQ_BYTES;
            if write {
                let tp = Instant::now();
                pattern(o.seed, next, &mut buf[..len as usize]);
                own += tp.elapsed();
                mem(d.ram)
                    .write_slice(&buf[..len as usize], data as usize)
                    .map_err(|e| DemoError::Device(e.to_string()))?;
            } else {
                // Poison, so a read that transfers nothing cannot pass.
                mem(d.ram)
                    .get_slice(data as usize, len as usize)
                    .step("data buffer")?
                    .write_slice(&poison[..len as usize], 0)
                    .map_err(|e| DemoError::Device(e.to_string()))?;
            }
            write_header(d, slot, if write { T_OUT } else { T_IN }, next)?;
            set_status_byte(d, slot, 0xff)?;
            let h = slot * 3;
            d.write_desc(h, HEADERS + 16 * u64::from(slot), 16, DESC_NEXT, h + 1)?;
            let dflags = DESC_NEXT | if write { 0 } else { DESC_WRITE };
            d.write_desc(h + 1, data, len, dflags, h + 2)?;
            d.write_desc(h + 2, STATUS + u64::from(slot), 1, DESC_WRITE, 0)?;
            inflight[usize::from(slot)] = Some((next, len));
            heads.push(h);
            next += n;
        }
        if !heads.is_empty() {
            d.submit(&heads)?;
        }
        for (head, used_len) in d.reap()? {
            let slot = head / 3;
            let (sector, len) = inflight
                .get_mut(usize::from(slot))
                .and_then(Option::take)
                .filter(|_| head % 3 == 0)
                .ok_or_else(|| {
                    DemoError::Device(format!("used id {head} is not a request in flight"))
                })?;
            let what = if write { "write" } else { "read" };
            check_status(d, slot, &format!("{what} of sector {sector}"))?;
            if !write {
                let want = len + 1;
                if used_len != want {
                    return Err(DemoError::Device(format!(
                        "read of sector {sector}: used length {used_len}, expected {want}"
                    )));
                }
                let data = DATA + u64::from(slot) * MAX_REQ_BYTES;
                let g = &mut got[..len as usize];
                mem(d.ram)
                    .read_slice(g, data as usize)
                    .map_err(|e| DemoError::Device(e.to_string()))?;
                let tv = Instant::now();
                pattern(o.seed, sector, &mut buf[..len as usize]);
                let bad = g.iter().zip(&buf[..len as usize]).position(|(a, b)| a != b);
                own += tv.elapsed();
                if let Some(i) = bad {
                    return Err(DemoError::Mismatch(format!(
                        "sector {} byte {}: read {:#04x}, wrote {:#04x}",
                        sector + i as u64 / 512,
                        i % 512,
                        g[i],
                        buf[i]
                    )));
                }
            }
            phase.bytes += u64::from(len);
            free.push(slot);
            done += 1;
        }
        bar.update(done);
    }
    phase.requests = done;
    phase.elapsed = t0.elapsed().saturating_sub(own);
    phase.interrupts = d.interrupts - irqs0;
    bar.finish(&format!(
        "{} requests, {:.0} IOPS, {:.1} MiB/s{}",
        phase.requests,
        phase.iops(),
        phase.mib_per_s(),
        if write { "" } else { ", verified" }
    ));
    Ok(phase)
}
