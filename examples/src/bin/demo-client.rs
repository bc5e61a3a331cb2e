//! The client demo: drive a virtio-blk and a test device served by emudevd, as a guest
//! driver would, from an ordinary process. Needs no root and no QEMU.
//!
//! ```text
//! demo-client [--blk SOCK] [--testdev SOCK] [--sectors N] [--request-sectors N]
//!             [--depth N] [--quiet]
//! ```
//!
//! For the virtio-blk: writes a pattern to N sectors, reads it back and verifies it, with a
//! progress bar and the IOPS. For the test device: a DMA FILL and a CHECKSUM with MSI-X
//! completion interrupts. Exits 1 on any error or mismatch, 2 on a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use emudev_examples::demo::{blk, testdev};

const USAGE: &str = "usage: demo-client [--blk SOCK] [--testdev SOCK] [--sectors N] \
[--request-sectors N] [--depth N] [--quiet]";

struct Args {
    blk: Option<PathBuf>,
    testdev: Option<PathBuf>,
    opts: blk::BlkOptions,
}

fn parse(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        blk: None,
        testdev: None,
        opts: blk::BlkOptions::default(),
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
            "--quiet" => a.opts.verbose = false,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if a.blk.is_none() && a.testdev.is_none() {
        return Err("give --blk and/or --testdev".into());
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
    if verbose {
        println!("demo-client: all checks passed");
    }
    ExitCode::SUCCESS
}
