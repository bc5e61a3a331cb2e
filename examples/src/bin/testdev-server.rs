//! Serve the emudev test device over vfio-user.
//!
//! ```text
//! testdev-server [--no-mmap] --socket /tmp/testdev.sock [--socket /tmp/testdev1.sock ...]
//! ```
//!
//! `--no-mmap` keeps the polled doorbell page (BAR2) out of mmap, so QEMU keeps posted
//! writes on.
//!
//! Each `--socket` gets its own test device (`testdev0`, `testdev1`, ...) and thread. Stop
//! with SIGINT or SIGTERM. `RUST_LOG=debug` for more detail.

use std::path::PathBuf;
use std::process::ExitCode;

use emudev::testdev::TestDevice;
use emudev::DeviceManager;
use emudev_vfio_user::ServerOptions;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

const USAGE: &str = "usage: testdev-server [--no-mmap] --socket PATH [--socket PATH ...]";

fn parse_args() -> Result<(Vec<PathBuf>, bool), String> {
    let mut sockets = Vec::new();
    let mut mmap = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" | "-s" => {
                sockets.push(PathBuf::from(args.next().ok_or("--socket needs a path")?))
            }
            "--no-mmap" => mmap = false,
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if sockets.is_empty() {
        return Err(USAGE.to_string());
    }
    Ok((sockets, mmap))
}

fn main() -> ExitCode {
    emudev_examples::logger::init();
    let (sockets, mmap) = match parse_args() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    // Block the stop signals before any thread starts so only `wait` below sees them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&stop), None) {
        eprintln!("cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let mgr = DeviceManager::new();
    for (i, path) in sockets.iter().enumerate() {
        let name = format!("testdev{i}");
        let dev = match TestDevice::new(&name) {
            Ok(d) => d.with_mmap_page(mmap),
            Err(e) => {
                log::error!("{name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = mgr.add(dev, path, ServerOptions::default()) {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    match stop.wait() {
        Ok(sig) => log::info!("{sig:?}: shutting down"),
        Err(e) => log::error!("sigwait: {e}"),
    }
    mgr.shutdown();
    ExitCode::SUCCESS
}
