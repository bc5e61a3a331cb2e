//! Scale benchmark: N virtio-blk devices (null backend) on ONE poller thread, each behind
//! emudev's in-process transport (the vfio-user adapter with its range checks, MSI-X
//! eventfds), driven by a split-ring driver in this process. No guest: a TCG guest with 16
//! vfio-user devices is too slow to say anything about the server.
//!
//! ```text
//! bench-scale [--devices N] [--queues Q] [--idle-secs S] [--busy-secs S] [--runs R] [--depth D]
//! ```
//!
//! Measures, for N devices with Q queues each, all enabled and polled:
//! - idle CPU: utime+stime of this process (`/proc/self/stat`) over S idle seconds, as % of one
//!   core, after a 1 s settle (the driver thread sleeps meanwhile, so this is the server side);
//! - memory: growth of `RssAnon` (`/proc/self/status`) from before the devices were created to
//!   after bring-up and I/O, per device (guest RAM is a memfd, counted as RssShmem, not here);
//! - throughput: one driver thread keeps D 4 KiB reads in flight on every queue round-robin
//!   (kicking only when the device asks for it, yielding when a round completed nothing) for
//!   S seconds, R runs: IOPS per device.
//!
//! Prints one `RESULT` line (parsed by `bench/report.py`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::transport::InProc;
use emudev_blk::backend::null::NullBackend;
use emudev_blk::config::BlkOptions;
use emudev_blk::device::VirtioBlkDevice;
use emudev_virtio::pci::common_cfg::{offset as co, status as st};
use emudev_virtio::pci::layout::{NOTIFY_OFFSET, VIRTIO_BAR};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::poller::PollerPool;
use emudev_virtio::queue::features as qf;
use emudev_virtio::queue::testdriver::{Buf, SplitDriver};
use std::process::ExitCode;

type Dev = VirtioPciDevice<VirtioBlkDevice>;

const BAR: u32 = VIRTIO_BAR as u32;
const RAM_MIB: u64 = 2;
const QSIZE: u16 = 128;
/// Per queue q: ring at RING + q * 0x4000, header/status at REQ + q * 0x1000, data at DATA.
const RING: u64 = 0x1_0000;
const REQ: u64 = 0x10_0000;
const DATA: u64 = 0x18_0000;
const T_IN: u32 = 0;

#[derive(Debug, thiserror::Error)]
enum ScaleError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {msg}")]
    Step { what: String, msg: String },
}

fn step<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> ScaleError {
    let what = what.into();
    move |e| ScaleError::Step {
        what,
        msg: e.to_string(),
    }
}

#[derive(Debug)]
struct Args {
    devices: usize,
    queues: u16,
    idle_secs: f64,
    busy_secs: f64,
    runs: usize,
    depth: u16,
}

fn parse_args() -> Result<Args, ScaleError> {
    let mut a = Args {
        devices: 1,
        queues: 1,
        idle_secs: 5.0,
        busy_secs: 2.0,
        runs: 3,
        depth: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| ScaleError::Usage(format!("{k}: missing value")))?;
        let bad = || ScaleError::Usage(format!("{k} {v}: bad value"));
        match k.as_str() {
            "--devices" => a.devices = v.parse().map_err(|_| bad())?,
            "--queues" => a.queues = v.parse().map_err(|_| bad())?,
            "--idle-secs" => a.idle_secs = v.parse().map_err(|_| bad())?,
            "--busy-secs" => a.busy_secs = v.parse().map_err(|_| bad())?,
            "--runs" => a.runs = v.parse().map_err(|_| bad())?,
            "--depth" => a.depth = v.parse().map_err(|_| bad())?,
            _ => return Err(ScaleError::Usage(format!("unknown option {k}"))),
        }
    }
    let ok = (1..=64).contains(&a.devices)
        && (1..=8).contains(&a.queues)
        && (1..=QSIZE / 3).contains(&a.depth)
        && a.runs > 0
        && a.idle_secs > 0.0
        && a.busy_secs > 0.0;
    if !ok {
        return Err(ScaleError::Usage(format!(
            "--devices 1..64, --queues 1..8, --depth 1..{}, --runs >= 1, positive seconds",
            QSIZE / 3
        )));
    }
    Ok(a)
}

/// This process's utime+stime in seconds.
fn proc_cpu_secs() -> Result<f64, ScaleError> {
    let s = std::fs::read_to_string("/proc/self/stat").map_err(step("/proc/self/stat"))?;
    let rest = s
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| step::<&str>("/proc/self/stat")("no comm"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ": field 3 (state) is f[0], so utime (14) is f[11], stime (15) f[12].
    let ticks: u64 = f
        .get(11..13)
        .ok_or_else(|| step::<&str>("/proc/self/stat")("short"))?
        .iter()
        .map(|x| x.parse::<u64>().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

/// `RssAnon` of this process in KiB.
fn rss_anon_kib() -> Result<u64, ScaleError> {
    let s = std::fs::read_to_string("/proc/self/status").map_err(step("/proc/self/status"))?;
    parse_kib(&s, "RssAnon:").ok_or_else(|| step::<&str>("/proc/self/status")("no RssAnon"))
}

fn parse_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

struct QueueDrv {
    drv: SplitDriver,
    notify: u64,
    hdr: u64,
    in_flight: u16,
}

struct Rig {
    io: InProc<Dev>,
    queues: Vec<QueueDrv>,
    _irqs: Vec<emudev::transport::inproc::IrqWaiter>,
}

impl Rig {
    fn wr(&mut self, off: u64, len: usize, v: u64) -> Result<(), ScaleError> {
        self.io
            .region_write(BAR, off, &v.to_le_bytes()[..len])
            .map_err(step(format!("BAR write {off:#x}")))
    }

    fn rd(&mut self, off: u64, len: usize) -> Result<u64, ScaleError> {
        let mut b = [0u8; 8];
        self.io
            .region_read(BAR, off, &mut b[..len])
            .map_err(step(format!("BAR read {off:#x}")))?;
        Ok(u64::from_le_bytes(b))
    }

    /// A device on `pool`, brought up to DRIVER_OK with `queues` enabled queues.
    fn new(i: usize, queues: u16, pool: Arc<PollerPool>) -> Result<Self, ScaleError> {
        let opts = BlkOptions {
            num_queues: queues,
            queue_size: QSIZE,
            ..Default::default()
        };
        let backend = Arc::new(NullBackend::new(1 << 30));
        let blk = VirtioBlkDevice::new(backend, opts, pool).map_err(step("blk device"))?;
        let dev = VirtioPciDevice::new(format!("scale-{i}"), blk).map_err(step("virtio-pci"))?;
        let mut io = InProc::new(dev, RAM_MIB).map_err(step("in-process transport"))?;
        let irqs = io
            .enable_msix(u32::from(queues) + 1)
            .map_err(step("MSI-X"))?;
        let mut rig = Rig {
            io,
            queues: Vec::new(),
            _irqs: irqs,
        };
        rig.bring_up(queues)?;
        Ok(rig)
    }

    fn bring_up(&mut self, queues: u16) -> Result<(), ScaleError> {
        self.wr(co::DEVICE_STATUS, 1, 0)?;
        self.wr(
            co::DEVICE_STATUS,
            1,
            u64::from(st::ACKNOWLEDGE | st::DRIVER),
        )?;
        let mq = 1u64 << 12; // VIRTIO_BLK_F_MQ
        let want = qf::VERSION_1 | if queues > 1 { mq } else { 0 };
        for sel in 0..2u64 {
            self.wr(co::DEVICE_FEATURE_SELECT, 4, sel)?;
            let offered = self.rd(co::DEVICE_FEATURE, 4)? << (32 * sel);
            self.wr(co::DRIVER_FEATURE_SELECT, 4, sel)?;
            self.wr(
                co::DRIVER_FEATURE,
                4,
                ((want & offered) >> (32 * sel)) & 0xffff_ffff,
            )?;
        }
        let fok = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK;
        self.wr(co::DEVICE_STATUS, 1, u64::from(fok))?;
        if self.rd(co::DEVICE_STATUS, 1)? != u64::from(fok) {
            return Err(step::<&str>("bring-up")("FEATURES_OK refused"));
        }
        self.wr(co::CONFIG_MSIX_VECTOR, 2, 0)?;
        for q in 0..queues {
            let base = RING + u64::from(q) * 0x4000;
            let drv = SplitDriver::new(self.io.mem().clone(), base, QSIZE);
            self.wr(co::QUEUE_SELECT, 2, u64::from(q))?;
            self.wr(co::QUEUE_SIZE, 2, u64::from(QSIZE))?;
            self.wr(co::QUEUE_DESC_LO, 8, drv.desc)?;
            self.wr(co::QUEUE_DRIVER_LO, 8, drv.avail)?;
            self.wr(co::QUEUE_DEVICE_LO, 8, drv.used)?;
            self.wr(co::QUEUE_MSIX_VECTOR, 2, u64::from(q) + 1)?;
            self.wr(co::QUEUE_ENABLE, 2, 1)?;
            let notify = NOTIFY_OFFSET + 4 * self.rd(co::QUEUE_NOTIFY_OFF, 2)?;
            // One read header per queue (all requests read sector 0; the null backend
            // zero-fills), shared data buffer: the device side work is what is measured.
            let hdr = REQ + u64::from(q) * 0x1000;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&T_IN.to_le_bytes());
            self.io
                .mem()
                .write(hdr, &h)
                .map_err(step("request header"))?;
            self.queues.push(QueueDrv {
                drv,
                notify,
                hdr,
                in_flight: 0,
            });
        }
        self.wr(co::DEVICE_STATUS, 1, u64::from(fok | st::DRIVER_OK))?;
        if self.rd(co::DEVICE_STATUS, 1)? != u64::from(fok | st::DRIVER_OK) {
            return Err(step::<&str>("bring-up")("DRIVER_OK refused"));
        }
        Ok(())
    }

    /// Reap what completed on every queue and refill to `depth`; returns completions.
    fn pump(&mut self, depth: u16) -> Result<u64, ScaleError> {
        let mut done = 0u64;
        for qi in 0..self.queues.len() {
            let q = &mut self.queues[qi];
            while q.drv.pop_used().is_some() {
                q.in_flight = q.in_flight.saturating_sub(1);
                done += 1;
            }
            if q.in_flight >= depth {
                continue;
            }
            let old = q.drv.avail_idx();
            while q.in_flight < depth {
                let status = q.hdr + 0x100 + u64::from(q.in_flight);
                q.drv
                    .add_chain(&[Buf::r(q.hdr, 16), Buf::w(DATA, 4096), Buf::w(status, 1)]);
                q.in_flight += 1;
            }
            let new = q.drv.avail_idx();
            if q.drv.must_kick(false, old, new) {
                let n = q.notify;
                self.wr(n, 2, qi as u64)?;
            }
        }
        Ok(done)
    }
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn run(a: &Args) -> Result<(), ScaleError> {
    let pool = PollerPool::new(1).map_err(step("poller pool"))?;
    let rss0 = rss_anon_kib()?;
    let mut rigs = (0..a.devices)
        .map(|i| Rig::new(i, a.queues, pool.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let rss_up = rss_anon_kib()?;

    // Idle: every queue enabled and polled, nothing to do.
    std::thread::sleep(Duration::from_secs(1));
    let (c0, p0, t0) = (proc_cpu_secs()?, pool.thread_cpu_time(0), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(a.idle_secs));
    let (c1, p1, wall) = (proc_cpu_secs()?, pool.thread_cpu_time(0), t0.elapsed());
    let idle_pct = 100.0 * (c1 - c0) / wall.as_secs_f64();
    let poller_idle_pct = match (p0, p1) {
        (Some(a0), Some(a1)) => format!(
            "{:.2}",
            100.0 * a1.saturating_sub(a0).as_secs_f64() / wall.as_secs_f64()
        ),
        _ => "-".into(),
    };

    // Busy: runs of busy_secs, all queues kept at depth.
    let mut per_dev = Vec::new();
    let mut busy_cpu = Vec::new();
    for run in 0..=a.runs {
        let c0 = proc_cpu_secs()?;
        let t0 = Instant::now();
        let mut done = 0u64;
        while t0.elapsed().as_secs_f64() < a.busy_secs {
            let mut got = 0;
            for r in rigs.iter_mut() {
                got += r.pump(a.depth)?;
            }
            done += got;
            if got == 0 {
                // Nothing completed: let the poller have the CPU if it shares ours.
                std::thread::yield_now();
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        if run > 0 {
            per_dev.push(done as f64 / secs / a.devices as f64);
            busy_cpu.push(100.0 * (proc_cpu_secs()? - c0) / secs);
        }
    }
    // Drain so no request is left in flight on exit.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rigs
        .iter()
        .any(|r| r.queues.iter().any(|q| q.in_flight > 0))
        && Instant::now() < deadline
    {
        for r in rigs.iter_mut() {
            for q in r.queues.iter_mut() {
                while q.drv.pop_used().is_some() {
                    q.in_flight = q.in_flight.saturating_sub(1);
                }
            }
        }
        std::thread::yield_now();
    }
    let rss_io = rss_anon_kib()?;
    let (m, lo, hi) = stats(&mut per_dev);
    let (bm, _, _) = stats(&mut busy_cpu);
    let n = a.devices as f64;
    println!(
        "RESULT devices={} queues_per_dev={} polled_queues={} idle_secs={:.1} idle_cpu_pct={idle_pct:.2} \
         poller_idle_cpu_pct={poller_idle_pct} rss_anon_kib_per_dev_up={:.0} rss_anon_kib_per_dev_io={:.0} \
         depth={} runs={} iops_per_dev[median={m:.0} min={lo:.0} max={hi:.0}] iops_total={:.0} busy_cpu_pct={bm:.0}",
        a.devices,
        a.queues,
        a.devices * usize::from(a.queues),
        wall.as_secs_f64(),
        rss_up.saturating_sub(rss0) as f64 / n,
        rss_io.saturating_sub(rss0) as f64 / n,
        a.depth,
        a.runs,
        m * n,
    );
    drop(rigs);
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-scale: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let s = "Name:\tx\nRssAnon:\t    1234 kB\nRssFile:\t 9 kB\n";
        assert_eq!(parse_kib(s, "RssAnon:"), Some(1234));
        assert_eq!(parse_kib(s, "RssShmem:"), None);
        assert!(rss_anon_kib().unwrap() > 0);
        assert!(proc_cpu_secs().unwrap() >= 0.0);
    }

    #[test]
    fn two_devices_complete_reads_on_one_poller() {
        let pool = PollerPool::new(1).unwrap();
        let mut rigs: Vec<Rig> = (0..2)
            .map(|i| Rig::new(i, 2, pool.clone()).unwrap())
            .collect();
        let mut done = 0;
        let t0 = Instant::now();
        while done < 400 && t0.elapsed() < Duration::from_secs(10) {
            for r in rigs.iter_mut() {
                done += r.pump(4).unwrap();
            }
        }
        assert!(done >= 400, "only {done} completions");
        // Every status byte the device wrote is OK (0).
        let r = &rigs[0];
        let mut b = [0xffu8; 4];
        r.io.mem().read(r.queues[0].hdr + 0x100, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
    }
}
