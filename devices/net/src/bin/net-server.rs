//! Serve virtio-net devices on vfio-user sockets (guest cases and benchmarks).
//!
//! ```text
//! net-server [--pollers N] [--poll-us IDLE_US] [--control FIFO]
//!     --device socket=PATH,backend=tap:IFNAME|switch:NAME[,mac=M][,queue-pairs=N]
//!              [,queue-size=N][,mtu=N][,offloads=on|off][,mrg=on|off]   (repeatable)
//! ```
//! Control lines on the FIFO: `link IDX up|down`, `announce IDX`, `stats IDX` (to stderr).

use std::io::BufRead;
use std::sync::{Arc, Mutex};

use emudev::{DeviceModel, VfioUserAdapter};
use emudev_net::{parse_mac, virtio_net_pci, BackendSpec, NetOptions, VirtioNetDevice};
use emudev_vfio_user::{Server, ServerOptions};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::poller::PollerPool;

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
    }
    fn flush(&self) {}
}

struct Spec {
    socket: String,
    backend: BackendSpec,
    opts: NetOptions,
}

fn on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" | "1" | "true" => Ok(true),
        "off" | "0" | "false" => Ok(false),
        _ => Err(format!("expected on/off, got {v}")),
    }
}

fn parse_device(arg: &str, index: usize) -> Result<Spec, String> {
    let mut socket = None;
    let mut backend = None;
    let mut opts = NetOptions {
        mac: [0x52, 0x54, 0x00, 0xe0, 0xde, index as u8],
        ..NetOptions::default()
    };
    for kv in arg.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv}: expected key=value"))?;
        let num = |v: &str| v.parse::<u16>().map_err(|e| format!("{k}={v}: {e}"));
        match k {
            "socket" => socket = Some(v.to_string()),
            "backend" => {
                backend = Some(match v.split_once(':') {
                    Some(("tap", n)) => BackendSpec::Tap {
                        ifname: n.to_string(),
                    },
                    Some(("switch", n)) => BackendSpec::Switch {
                        name: n.to_string(),
                    },
                    _ => return Err(format!("backend={v}: expected tap:IFNAME or switch:NAME")),
                })
            }
            "mac" => opts.mac = parse_mac(v).map_err(|e| e.to_string())?,
            "queue-pairs" => opts.queue_pairs = num(v)?,
            "queue-size" => opts.queue_size = num(v)?,
            "mtu" => opts.mtu = Some(num(v)?),
            "offloads" => opts.offloads = on_off(v)?,
            "mrg" => opts.mrg_rxbuf = on_off(v)?,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(Spec {
        socket: socket.ok_or("socket= is required")?,
        backend: backend.ok_or("backend= is required")?,
        opts,
    })
}

type Shared = Arc<Mutex<VirtioPciDevice<VirtioNetDevice>>>;

fn control(line: &str, devs: &[Shared]) -> Result<(), String> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let dev = |i: &str| -> Result<&Shared, String> {
        let i: usize = i.parse().map_err(|e| format!("{i}: {e}"))?;
        devs.get(i).ok_or(format!("no device {i}"))
    };
    match w.as_slice() {
        ["link", i, state] => dev(i)?
            .lock()
            .map_err(|_| "poisoned".to_string())?
            .set_attr("link", state)
            .map_err(|e| e.to_string()),
        ["announce", i] => dev(i)?
            .lock()
            .map_err(|_| "poisoned".to_string())?
            .set_attr("announce", "1")
            .map_err(|e| e.to_string()),
        ["stats", i] => {
            let d = dev(i)?.lock().map_err(|_| "poisoned".to_string())?;
            eprintln!("stats {i}: {:?}", d.device().stats());
            Ok(())
        }
        [] => Ok(()),
        _ => Err(format!("unknown command {line:?}")),
    }
}

fn main() {
    log::set_max_level(match std::env::var("RUST_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    });
    let _ = log::set_logger(&StderrLog);
    let mut args = std::env::args().skip(1);
    let mut specs = Vec::new();
    let mut pollers = 1usize;
    let mut control_path = None;
    let mut cfg = emudev_virtio::PollerConfig::default();
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_default();
        match a.as_str() {
            "--device" => match parse_device(&val(), specs.len()) {
                Ok(s) => specs.push(s),
                Err(e) => {
                    eprintln!("net-server: --device: {e}");
                    std::process::exit(2);
                }
            },
            "--pollers" => pollers = val().parse().unwrap_or(1),
            "--control" => control_path = Some(val()),
            "--poll-us" => {
                let us = val().parse().unwrap_or(50);
                cfg.idle_before_sleep = std::time::Duration::from_micros(us);
            }
            _ => {
                eprintln!("net-server: unknown argument {a}");
                std::process::exit(2);
            }
        }
    }
    let pool = match PollerPool::with_config(pollers, cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("net-server: pollers: {e}");
            std::process::exit(1);
        }
    };
    let mut devs = Vec::new();
    let mut threads = Vec::new();
    for (i, s) in specs.into_iter().enumerate() {
        let name = format!("virtio-net{i}");
        let pci = match virtio_net_pci(&name, &s.backend, s.opts, &pool) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("net-server: {name}: {e}");
                std::process::exit(1);
            }
        };
        log::info!(
            "{name}: {} on {}",
            emudev_virtio::pci::VirtioDeviceType::attr(pci.device(), "backend").unwrap_or_default(),
            s.socket
        );
        let adapter = VfioUserAdapter::new(pci);
        devs.push(adapter.device().clone());
        let mut server = match Server::bind(&s.socket, adapter, ServerOptions::default()) {
            Ok(sv) => sv,
            Err(e) => {
                eprintln!("net-server: {name}: {e}");
                std::process::exit(1);
            }
        };
        threads.push(std::thread::spawn(move || {
            if let Err(e) = server.run() {
                log::error!("{name}: server failed: {e}");
            }
        }));
    }
    if let Some(p) = control_path {
        match std::fs::OpenOptions::new().read(true).write(true).open(&p) {
            Ok(f) => {
                for line in std::io::BufReader::new(f).lines() {
                    let Ok(line) = line else { break };
                    match control(&line, &devs) {
                        Ok(()) => log::info!("control: {line}: ok"),
                        Err(e) => log::warn!("control: {line}: {e}"),
                    }
                }
            }
            Err(e) => log::error!("control {p}: {e}"),
        }
    }
    for t in threads {
        let _ = t.join();
    }
}
