//! The client demo: drive a virtio-blk and a test device served by emudevd, as a guest
//! driver would, from an ordinary process. Needs no root and no QEMU.
//!
//! ```text
//! demo-client [--blk SOCK] [--testdev SOCK] [--net SOCK --net SOCK] [--sectors N]
//!             [--request-sectors N] [--depth N] [--frames N] [--frame-len N] [--quiet]
//! ```
//!
//! For the virtio-blk: writes a pattern to N sectors, reads it back and verifies it, with a
//! progress bar and the IOPS. For the test device: a DMA FILL and a CHECKSUM with MSI-X
//! completion interrupts. For two virtio-net NICs on the same switch: frames both ways,
//! each checked on arrival, with the frame rate. Exits 1 on any error or mismatch, 2 on a
//! usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use emudev_examples::demo::{blk, net, testdev};

const USAGE: &str = "usage: demo-client [--blk SOCK] [--testdev SOCK] [--net SOCK --net SOCK] \
[--sectors N] [--request-sectors N] [--depth N] [--frames N] [--frame-len N] [--quiet]";

struct Args {
    blk: Option<PathBuf>,
    testdev: Option<PathBuf>,
    net: Vec<PathBuf>,
    opts: blk::BlkOptions,
    net_opts: net::NetOptions,
}

fn parse(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        blk: None,
        testdev: None,
        net: Vec::new(),
        opts: blk::BlkOptions::default(),
        net_opts: net::NetOptions::default(),
    };
    let mut it = argv.iter();
    while let Some(f) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{f} needs a value"));
        let num = |v: &String| {
            v.parse::<u64>()
                .map_err(|_| format!("{f} {v}: not a number"))
        };
        match f.as_str() {
            "--blk" => a.blk = Some(val()?.into()),
            "--testdev" => a.testdev = Some(val()?.into()),
            "--sectors" => a.opts.sectors = num(val()?)?,
            "--request-sectors" => {
                a.opts.sectors_per_request =
                    u32::try_from(num(val()?)?).map_err(|_| "--request-sectors: too large")?
            }
            "--depth" => {
                a.opts.depth = u16::try_from(num(val()?)?).map_err(|_| "--depth: too large")?
            }
            "--net" => a.net.push(val()?.into()),
            "--frames" => a.net_opts.frames = num(val()?)?,
            "--frame-len" => {
                a.net_opts.frame_len =
                    usize::try_from(num(val()?)?).map_err(|_| "--frame-len: too large")?
            }
            "--quiet" => {
                a.opts.verbose = false;
                a.net_opts.verbose = false;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if !matches!(a.net.len(), 0 | 2) {
        return Err("--net takes two NICs: --net SOCK --net SOCK".into());
    }
    if a.blk.is_none() && a.testdev.is_none() && a.net.is_empty() {
        return Err("give --blk, --testdev and/or --net".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    emudev_examples::logger::init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("demo-client: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let verbose = args.opts.verbose;
    if let Some(p) = &args.testdev {
        if let Err(e) = testdev::run(p, verbose) {
            eprintln!("demo-client: testdev {}: {e}", p.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(p) = &args.blk {
        match blk::run(p, &args.opts) {
            Ok(r) => {
                if verbose {
                    println!(
                        "virtio-blk: {} sectors written and verified ({:.0} write IOPS, {:.0} read IOPS){}",
                        args.opts.sectors,
                        r.write.iops(),
                        r.read.iops(),
                        if r.flushed { ", flushed" } else { "" }
                    );
                }
            }
            Err(e) => {
                eprintln!("demo-client: virtio-blk {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if let [na, nb] = args.net.as_slice() {
        match net::run(na, nb, &args.net_opts) {
            Ok(r) => {
                if verbose {
                    println!(
                        "virtio-net: {} frames A->B and {} frames B->A through the switch, all checked",
                        r.a_to_b.received, r.b_to_a.received
                    );
                }
            }
            Err(e) => {
                eprintln!(
                    "demo-client: virtio-net {} <-> {}: {e}",
                    na.display(),
                    nb.display()
                );
                return ExitCode::FAILURE;
            }
        }
    }
    if verbose {
        println!("demo-client: all checks passed");
    }
    ExitCode::SUCCESS
}
