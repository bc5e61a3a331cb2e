//! `guest-mmio`: runs inside the test guest. Reads and writes a PCI BAR through its sysfs
//! resource file with mmap, the way a user-space driver would, so guest tests can reach
//! mappable areas (which QEMU maps straight to our memfd) and trapped registers alike.
//!
//! usage: guest-mmio FILE read OFFSET [WIDTH]      (prints the value in hex)
//!        guest-mmio FILE write OFFSET VALUE [WIDTH]
//! WIDTH is 1, 2, 4 or 8 bytes (default 4). OFFSET and VALUE take 0x prefixes.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

fn parse(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("bad number {s}: {e}"))
}

fn run(args: &[String]) -> Result<Option<u64>, String> {
    let usage = "usage: guest-mmio FILE read OFFSET [WIDTH] | FILE write OFFSET VALUE [WIDTH]";
    let (file, op, offset) = match args {
        [f, op, off, ..] => (f, op.as_str(), parse(off)?),
        _ => return Err(usage.into()),
    };
    let (value, width) = match (op, &args[3..]) {
        ("read", []) => (None, 4),
        ("read", [w]) => (None, parse(w)?),
        ("write", [v]) => (Some(parse(v)?), 4),
        ("write", [v, w]) => (Some(parse(v)?), parse(w)?),
        _ => return Err(usage.into()),
    };
    if ![1, 2, 4, 8].contains(&width) || offset % width != 0 {
        return Err(format!("bad width {width} or unaligned offset {offset:#x}"));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .map_err(|e| format!("open {file}: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if offset + width > len {
        return Err(format!(
            "offset {offset:#x} outside {file} ({len:#x} bytes)"
        ));
    }
    let page = 4096u64;
    let map_off = offset & !(page - 1);
    let map_len = ((offset - map_off + width).div_ceil(page) * page) as usize;
    // SAFETY: mapping a sysfs resource file we opened read-write; the kernel validates the
    // range against the BAR, and the result is checked for MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            map_off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {file}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `offset - map_off + width <= map_len`, so the pointer stays in the mapping.
    let at = unsafe { (p as *mut u8).add((offset - map_off) as usize) };
    // SAFETY: aligned volatile MMIO access of `width` bytes inside the mapping.
    let out = unsafe {
        match (value, width) {
            (None, 1) => Some(std::ptr::read_volatile(at) as u64),
            (None, 2) => Some(std::ptr::read_volatile(at as *const u16) as u64),
            (None, 4) => Some(std::ptr::read_volatile(at as *const u32) as u64),
            (None, _) => Some(std::ptr::read_volatile(at as *const u64)),
            (Some(v), 1) => {
                std::ptr::write_volatile(at, v as u8);
                None
            }
            (Some(v), 2) => {
                std::ptr::write_volatile(at as *mut u16, v as u16);
                None
            }
            (Some(v), 4) => {
                std::ptr::write_volatile(at as *mut u32, v as u32);
                None
            }
            (Some(v), _) => {
                std::ptr::write_volatile(at as *mut u64, v);
                None
            }
        }
    };
    // SAFETY: unmapping exactly what we mapped.
    unsafe { libc::munmap(p, map_len) };
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(Some(v)) => {
            println!("{v:#x}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-mmio: {e}");
            ExitCode::from(2)
        }
    }
}
