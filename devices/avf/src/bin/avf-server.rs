//! Serve one emulated AVF NIC on a vfio-user socket (guest cases).
//!
//! ```text
//! avf-server --socket PATH [--backend tap:IFNAME|switch:NAME] [--mac 52:54:00:12:34:56]
//!            [--queue-pairs N] [--speed MBPS]
//! ```
//! Without `--backend`, transmitted frames are completed and dropped.

use emudev::VfioUserAdapter;
use std::sync::Arc;

use emudev_avf::{AvfDevice, VfConfig};
use emudev_netback::switch::L2Switch;
use emudev_netback::tap::Tap;
use emudev_netback::NetBackend;
use emudev_vfio_user::{Server, ServerOptions};

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

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s}: expected six hex bytes"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|e| format!("{s}: {e}"))?;
    }
    Ok(mac)
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut cfg = VfConfig::default();
    let mut backend = None;
    while let Some(a) = args.next() {
        let v = args.next().ok_or(format!("{a}: missing value"))?;
        match a.as_str() {
            "--socket" => socket = Some(v),
            "--backend" => backend = Some(v),
            "--mac" => cfg.mac = parse_mac(&v)?,
            "--queue-pairs" => cfg.queue_pairs = v.parse().map_err(|e| format!("{v}: {e}"))?,
            "--speed" => cfg.link_speed_mbps = v.parse().map_err(|e| format!("{v}: {e}"))?,
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let socket = socket.ok_or("--socket is required")?;
    let backend: Option<Arc<dyn NetBackend>> = match backend.as_deref().map(|b| b.split_once(':')) {
        None => None,
        Some(Some(("tap", n))) => Some(Arc::new(
            Tap::open(n, cfg.queue_pairs).map_err(|e| e.to_string())?,
        )),
        Some(Some(("switch", n))) => Some(Arc::new(
            L2Switch::named(n)
                .add_port(cfg.queue_pairs)
                .map_err(|e| e.to_string())?,
        )),
        Some(_) => return Err("--backend: expected tap:IFNAME or switch:NAME".into()),
    };
    let dev = AvfDevice::new("avf0", cfg, backend).map_err(|e| e.to_string())?;
    let adapter = VfioUserAdapter::new(dev);
    let mut server =
        Server::bind(&socket, adapter, ServerOptions::default()).map_err(|e| e.to_string())?;
    log::info!("avf0: serving on {socket}");
    server.run().map_err(|e| e.to_string())
}

fn main() {
    log::set_max_level(match std::env::var("RUST_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    });
    let _ = log::set_logger(&StderrLog);
    if let Err(e) = run() {
        eprintln!("avf-server: {e}");
        std::process::exit(1);
    }
}
