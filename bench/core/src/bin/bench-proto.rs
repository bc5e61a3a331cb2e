//! Protocol benchmark: vfio-user message rates from our client to our server (the test
//! device behind emudev's `DeviceManager`), beside the rust-vmm `vfio_user` 0.1.7 example
//! `Server` with a trivial register-file backend, over the same kind of UNIX socket.
//!
//! ```text
//! bench-proto [--ops N] [--runs N] [--batch N] [--only ours|rustvmm]
//! ```
//!
//! Per server, per operation, `--runs` timed runs of `--ops` messages (after one warm-up):
//! - `read`: REGION_READ of 4 bytes, a round trip each;
//! - `write`: REGION_WRITE of 4 bytes, a round trip each;
//! - `posted`: posted (NO_REPLY) REGION_WRITEs, one REGION_READ at the end to know they were
//!   all taken in (QEMU posts its doorbell writes like this);
//! - `multi`: posted REGION_WRITE_MULTI with `--batch` writes each, closed by one read.
//!
//! Prints one `RESULT` line per (server, op): messages per second, median/min/max over the
//! runs. An operation the server does not support prints `RESULT ... unsupported=REASON`.
//! Our side goes through the whole device layer (PCI model, BAR routing, the test device's
//! registers); the rust-vmm backend only copies bytes, so the comparison favours it.

use std::fs::File;
use std::io;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use emudev::testdev::{regs, TestDevice};
use emudev::DeviceManager;
use emudev_vfio_user::{Client, ServerOptions};
use vfio_bindings::bindings::vfio::vfio_region_info;
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

#[derive(Debug, thiserror::Error)]
enum ProtoError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {msg}")]
    Step { what: &'static str, msg: String },
}

fn step<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ProtoError {
    move |e| ProtoError::Step {
        what,
        msg: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Ours,
    RustVmm,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::RustVmm => "rustvmm",
        }
    }
}

#[derive(Debug)]
struct Args {
    ops: u32,
    runs: usize,
    batch: usize,
    sides: Vec<Side>,
}

fn parse_args() -> Result<Args, ProtoError> {
    let mut a = Args {
        ops: 20_000,
        runs: 5,
        batch: 8,
        sides: vec![Side::Ours, Side::RustVmm],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| ProtoError::Usage(format!("{k}: missing value")))?;
        let bad = || ProtoError::Usage(format!("{k} {v}: bad value"));
        match k.as_str() {
            "--ops" => a.ops = v.parse().map_err(|_| bad())?,
            "--runs" => a.runs = v.parse().map_err(|_| bad())?,
            "--batch" => a.batch = v.parse().map_err(|_| bad())?,
            "--only" => {
                a.sides = match v.as_str() {
                    "ours" => vec![Side::Ours],
                    "rustvmm" => vec![Side::RustVmm],
                    _ => return Err(bad()),
                }
            }
            _ => return Err(ProtoError::Usage(format!("unknown option {k}"))),
        }
    }
    if a.runs == 0 || a.ops == 0 || !(1..=64).contains(&a.batch) {
        return Err(ProtoError::Usage(
            "--runs and --ops must be at least 1, --batch 1..64".into(),
        ));
    }
    Ok(a)
}

/// The rust-vmm server's device: region 0 is a 256-byte register file.
#[derive(Default)]
struct RegFile {
    regs: Vec<u8>,
}

impl RegFile {
    fn range(&mut self, region: u32, offset: u64, len: usize) -> io::Result<&mut [u8]> {
        if self.regs.is_empty() {
            self.regs = vec![0; 256];
        }
        let start = usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(22))?;
        let end = start
            .checked_add(len)
            .filter(|&e| region == 0 && e <= self.regs.len())
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        Ok(&mut self.regs[start..end])
    }
}

impl ServerBackend for RegFile {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let len = data.len();
        data.copy_from_slice(self.range(region, offset, len)?);
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.range(region, offset, data.len())?
            .copy_from_slice(data);
        Ok(())
    }
    fn dma_map(
        &mut self,
        _: DmaMapFlags,
        _: u64,
        _: u64,
        _: u64,
        _: Option<File>,
    ) -> io::Result<()> {
        Ok(())
    }
    fn dma_unmap(&mut self, _: DmaUnmapFlags, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: Vec<File>) -> io::Result<()> {
        Ok(())
    }
}

fn rustvmm_server(path: &Path) -> Result<(), ProtoError> {
    let regions = (0..9u32)
        .map(|index| {
            let size = if index == 0 { 256 } else { 0 };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: 32,
                    flags: if size > 0 { 3 } else { 0 },
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect();
    let irqs = vec![IrqInfo {
        index: 0,
        flags: 1,
        count: 1,
    }];
    let server = Server::new(path, true, irqs, regions).map_err(step("rust-vmm Server::new"))?;
    // It serves one connection and returns when the client goes away.
    std::thread::spawn(move || {
        let mut b = RegFile::default();
        let _ = server.run(&mut b);
    });
    Ok(())
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Posted,
    Multi,
}

impl Op {
    const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Posted, Op::Multi];
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Posted => "posted",
            Op::Multi => "multi",
        }
    }
}

/// One timed run: `ops` messages; returns messages per second.
fn run_op(c: &mut Client, op: Op, reg: (u32, u64), ops: u32, batch: usize) -> Result<f64, String> {
    let (bar, off) = reg;
    let e = |x: emudev_vfio_user::ClientError| x.to_string();
    let t = Instant::now();
    match op {
        Op::Read => {
            for _ in 0..ops {
                let v = c.region_read(bar, off, 4).map_err(e)?;
                std::hint::black_box(v);
            }
        }
        Op::Write => {
            for i in 0..ops {
                c.region_write(bar, off, &i.to_le_bytes()).map_err(e)?;
            }
        }
        Op::Posted => {
            for i in 0..ops {
                c.region_write_posted(bar, off, &i.to_le_bytes())
                    .map_err(e)?;
            }
            let last = c.region_read(bar, off, 4).map_err(e)?;
            if last != (ops - 1).to_le_bytes() {
                return Err(format!(
                    "after {ops} posted writes the register reads {last:?}"
                ));
            }
        }
        Op::Multi => {
            let vals: Vec<[u8; 4]> = (0..batch as u32).map(|i| i.to_le_bytes()).collect();
            let writes: Vec<(u32, u64, &[u8])> =
                vals.iter().map(|v| (bar, off, v.as_slice())).collect();
            // One answered WRITE_MULTI first: a server that does not know the command
            // answers posted ones with errors nobody reads, and both sides then block on
            // full socket buffers.
            let n = c.write_multi(&writes, false).map_err(e)?;
            if n != batch as u64 {
                return Err(format!("WRITE_MULTI answered wr_cnt {n} for {batch}"));
            }
            for _ in 0..ops {
                c.write_multi(&writes, true).map_err(e)?;
            }
            let last = c.region_read(bar, off, 4).map_err(e)?;
            if last != (batch as u32 - 1).to_le_bytes() {
                return Err(format!("WRITE_MULTI not applied: register reads {last:?}"));
            }
        }
    }
    Ok(f64::from(ops) / t.elapsed().as_secs_f64().max(1e-9))
}

/// A connected client, the manager serving ours (None for rust-vmm's thread), and the
/// (region, offset) of a 4-byte register to hit.
type Conn = (Client, Option<DeviceManager>, (u32, u64));

/// A server of `side` on a fresh socket, and our client connected to it. Each gets its own
/// path: a manager removes its socket on its own thread after `shutdown`.
fn connect(side: Side, dir: &Path) -> Result<Conn, ProtoError> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{}-{n}.sock", side.name()));
    let mgr = match side {
        Side::Ours => {
            let mgr = DeviceManager::new();
            let dev = TestDevice::new("bench-proto").map_err(step("test device"))?;
            mgr.add(dev, &path, ServerOptions::default())
                .map_err(step("serve test device"))?;
            Some(mgr)
        }
        Side::RustVmm => {
            rustvmm_server(&path)?;
            None
        }
    };
    // rust-vmm's server may bind on its thread: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = loop {
        match Client::connect(&path) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(step("connect")(e)),
        }
    };
    c.set_timeout(Some(Duration::from_secs(5)))
        .map_err(step("timeout"))?;
    c.negotiate().map_err(step("VERSION"))?;
    let reg = match side {
        Side::Ours => (0, regs::SCRATCH),
        Side::RustVmm => (0, 0x10),
    };
    Ok((c, mgr, reg))
}

fn run(a: &Args) -> Result<(), ProtoError> {
    let dir = std::env::temp_dir().join(format!("emudev-bench-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(step("temp dir"))?;
    let res = (|| {
        for &side in &a.sides {
            for op in Op::ALL {
                // A fresh connection per operation: a server that fails one (e.g. an unknown
                // command) does not spoil the next.
                let (mut c, mgr, reg) = connect(side, &dir)?;
                let mut v = Vec::new();
                let mut unsupported = None;
                for r in 0..=a.runs {
                    match run_op(&mut c, op, reg, a.ops, a.batch) {
                        Ok(x) if r > 0 => v.push(x),
                        Ok(_) => {}
                        Err(e) => {
                            unsupported = Some(e);
                            break;
                        }
                    }
                }
                let batch = if op == Op::Multi { a.batch } else { 1 };
                match unsupported {
                    Some(e) => println!(
                        "RESULT side={} op={} batch={batch} unsupported={}",
                        side.name(),
                        op.name(),
                        e.replace(char::is_whitespace, "_")
                    ),
                    None => {
                        let (m, lo, hi) = stats(&mut v);
                        println!(
                            "RESULT side={} op={} batch={batch} ops_per_run={} runs={} msgs_per_s[median={m:.0} min={lo:.0} max={hi:.0}]",
                            side.name(),
                            op.name(),
                            a.ops,
                            a.runs
                        );
                    }
                }
                drop(c);
                if let Some(m) = mgr {
                    m.shutdown();
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    res
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-proto: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regfile_bounds() {
        let mut r = RegFile::default();
        r.region_write(0, 252, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        r.region_read(0, 252, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(r.region_write(0, 253, &[0; 4]).is_err());
        assert!(r.region_read(1, 0, &mut b).is_err());
        assert!(r.region_read(0, u64::MAX, &mut b).is_err());
    }

    #[test]
    fn both_servers_answer_every_op() {
        let dir = std::env::temp_dir().join(format!("bench-proto-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for side in [Side::Ours, Side::RustVmm] {
            for op in [Op::Read, Op::Write, Op::Posted] {
                let (mut c, mgr, reg) = connect(side, &dir).unwrap();
                let rate = run_op(&mut c, op, reg, 50, 4).unwrap();
                assert!(rate > 0.0);
                drop(c);
                if let Some(m) = mgr {
                    m.shutdown();
                }
            }
        }
        // Ours applies WRITE_MULTI (the last write of the batch wins).
        let (mut c, mgr, reg) = connect(Side::Ours, &dir).unwrap();
        run_op(&mut c, Op::Multi, reg, 10, 4).unwrap();
        drop(c);
        mgr.unwrap().shutdown();
        // rust-vmm 0.1.7 has no WRITE_MULTI: reported as unsupported, without hanging.
        let (mut c, _, reg) = connect(Side::RustVmm, &dir).unwrap();
        assert!(run_op(&mut c, Op::Multi, reg, 10, 4).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
