//! Rough latency numbers for the device layer with the test device.
//!
//! ```text
//! testdev-bench [ITERATIONS]
//! ```
//!
//! Measures, per operation: a BAR register write+read in-process (adapter routing cost
//! only), the same over a vfio-user socket (protocol round trips), and an IRQ_RAISE write
//! until the MSI-X eventfd fires, over the socket. Build with `--release` for real numbers.

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use emudev::doorbell::{new_eventfd, wait_eventfd};
use emudev::testdev::{regs, TestDevice};
use emudev::transport::InProc;
use emudev::DeviceManager;
use emudev_vfio_user::wire::{irq_index, irq_set_flags};
use emudev_vfio_user::{Client, ServerOptions, SetIrqData};

fn report(what: &str, n: u32, d: Duration) {
    let per = d.as_nanos() / u128::from(n.max(1));
    println!("{what:<40} {n:>8} ops  {per:>8} ns/op");
}

fn run(n: u32) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let dev = TestDevice::new("bench-inproc").map_err(|x| e(&x))?;
    let mut ip = InProc::new(dev, 1).map_err(|x| e(&x))?;
    let t0 = Instant::now();
    for i in 0..n {
        ip.write32(0, regs::SCRATCH, i).map_err(|x| e(&x))?;
        ip.read32(0, regs::SCRATCH).map_err(|x| e(&x))?;
    }
    report("in-process write+read", n, t0.elapsed());

    let path = std::env::temp_dir().join(format!("emudev-bench-{}.sock", std::process::id()));
    let mgr = DeviceManager::new();
    let dev = TestDevice::new("bench-sock").map_err(|x| e(&x))?;
    mgr.add(dev, &path, ServerOptions::default())
        .map_err(|x| e(&x))?;
    let mut c = Client::connect(&path).map_err(|x| e(&x))?;
    c.negotiate().map_err(|x| e(&x))?;
    let t0 = Instant::now();
    for i in 0..n {
        c.region_write(0, regs::SCRATCH, &i.to_le_bytes())
            .map_err(|x| e(&x))?;
        c.region_read(0, regs::SCRATCH, 4).map_err(|x| e(&x))?;
    }
    report("vfio-user write+read", n, t0.elapsed());

    let ev = new_eventfd().map_err(|x| e(&x))?;
    c.set_irqs(
        irq_index::MSIX,
        irq_set_flags::ACTION_TRIGGER,
        0,
        1,
        SetIrqData::Eventfds(&[Some(ev.as_fd())]),
    )
    .map_err(|x| e(&x))?;
    let t0 = Instant::now();
    for _ in 0..n {
        c.region_write(0, regs::IRQ_RAISE, &0u32.to_le_bytes())
            .map_err(|x| e(&x))?;
        if wait_eventfd(ev.as_fd(), Duration::from_secs(5)).map_err(|x| e(&x))? == 0 {
            return Err("MSI-X vector did not fire".into());
        }
    }
    report("vfio-user IRQ_RAISE -> MSI-X eventfd", n, t0.elapsed());
    drop(c);
    mgr.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    emudev_examples::logger::init();
    let n = match std::env::args().nth(1).map(|s| s.parse::<u32>()) {
        None => 10_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: testdev-bench [ITERATIONS]");
            return ExitCode::from(2);
        }
    };
    match run(n) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testdev-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
