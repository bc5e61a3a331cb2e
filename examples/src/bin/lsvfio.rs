//! lspci for a vfio-user socket: connect as a client and print what the device exposes.
//!
//! ```text
//! lsvfio /tmp/testdev.sock
//! ```
//!
//! Prints the server's capabilities, the PCI header and capability chain read from the
//! config region, every region with its flags and sparse mmap areas, and every IRQ index
//! with its count and flags. It maps no memory and changes nothing on the device.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use emudev_examples::decode;
use emudev_vfio_user::wire::{device_flags, region_index};
use emudev_vfio_user::{Client, ClientError};

/// One line of the report. Writing to a String cannot fail.
macro_rules! out {
    ($o:expr) => { $o.push('\n') };
    ($o:expr, $($t:tt)*) => {{
        let _ = writeln!($o, $($t)*);
    }};
}

/// Inspect the device at `path`, appending the report to `o` (kept when a later step fails).
fn inspect(path: &str, o: &mut String) -> Result<(), ClientError> {
    let mut c = Client::connect(path)?;
    let caps = c.negotiate()?;
    out!(o, "vfio-user device at {path}");
    out!(o,
        "Server: protocol {}.{}, max_msg_fds {}, max_data_xfer_size {}, max_dma_maps {}, pgsizes {:#x}{}",
        caps.major,
        caps.minor,
        caps.max_msg_fds,
        caps.max_data_xfer_size,
        caps.max_dma_maps,
        caps.pgsizes,
        if caps.write_multiple { ", write_multiple" } else { "" }
    );
    let info = c.get_info()?;
    let mut flags = Vec::new();
    if info.flags & device_flags::PCI != 0 {
        flags.push("PCI");
    }
    if info.flags & device_flags::RESET != 0 {
        flags.push("RESET");
    }
    out!(
        o,
        "Device: {} ({} regions, {} IRQ indexes)",
        flags.join(" "),
        info.num_regions,
        info.num_irqs
    );

    let mut regions = Vec::new();
    for i in 0..info.num_regions.min(100) {
        match c.region_info(i) {
            Ok(r) => regions.push((i, Some(r))),
            Err(ClientError::Server(e)) => {
                out!(o, "  region {i}: error {e}");
                regions.push((i, None));
            }
            Err(e) => return Err(e),
        }
    }
    let mut bar_sizes = [0u64; 6];
    for (i, r) in &regions {
        if let (Some(r), Some(slot)) = (r, bar_sizes.get_mut(*i as usize)) {
            *slot = r.info.size;
        }
    }

    if info.flags & device_flags::PCI != 0 {
        let cfg_size = regions
            .iter()
            .find(|(i, _)| *i == region_index::CONFIG)
            .and_then(|(_, r)| r.as_ref())
            .map_or(0, |r| r.info.size.min(4096));
        out!(o);
        if cfg_size == 0 {
            out!(o, "(no config region)");
        } else {
            let cfg = c.region_read(region_index::CONFIG, 0, cfg_size as u32)?;
            let mut lines = decode::header(&cfg, &bar_sizes).into_iter();
            if let Some(first) = lines.next() {
                out!(o, "{first}");
            }
            for l in lines {
                out!(o, "\t{l}");
            }
            let caps = decode::capabilities(&cfg);
            if caps.is_empty() {
                out!(o, "\tCapabilities: none");
            } else {
                out!(o, "\tCapabilities:");
                for l in caps {
                    out!(o, "\t  {l}");
                }
            }
        }
    }

    out!(o);
    out!(o, "Regions:");
    for (i, r) in &regions {
        let Some(r) = r else { continue };
        if r.info.size == 0 && r.info.flags == 0 {
            out!(o, "  {:>2} {:<6} -", i, decode::region_name(*i));
            continue;
        }
        let mut line = format!(
            "  {:>2} {:<6} size {:#10x}  {}",
            i,
            decode::region_name(*i),
            r.info.size,
            decode::region_flag_names(r.info.flags)
        );
        if r.fd.is_some() {
            line.push_str(&format!("  fd offset {:#x}", r.info.offset));
        }
        out!(o, "{line}");
        for a in &r.areas {
            out!(o, "       sparse mmap {:#x}+{:#x}", a.offset, a.size);
        }
    }

    out!(o);
    out!(o, "IRQs:");
    for i in 0..info.num_irqs.min(50) {
        match c.irq_info(i) {
            Ok(irq) => out!(
                o,
                "  {} {:<6} count {:<5} {}",
                i,
                decode::irq_name(i),
                irq.count,
                decode::irq_flag_names(irq.flags)
            ),
            Err(ClientError::Server(e)) => out!(o, "  {i} {:<6} error {e}", decode::irq_name(i)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    emudev_examples::logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: lsvfio SOCKET");
        return ExitCode::from(2);
    };
    let mut report = String::new();
    let r = inspect(path, &mut report);
    // A reader that went away (`lsvfio sock | head`) is not an error worth a panic.
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(report.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            eprintln!("lsvfio: stdout: {e}");
            return ExitCode::FAILURE;
        }
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lsvfio: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
