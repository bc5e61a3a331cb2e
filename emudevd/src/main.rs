//! emudevd: serves emulated PCI devices to QEMU's `vfio-user-pci` over UNIX sockets.
//!
//! Follows the vhost-user backend program conventions that libvirt uses: no daemonizing,
//! `--socket-path` / `--fd` for a single device, `--print-capabilities`, SIGTERM/SIGINT for
//! a clean stop, and `sd_notify` READY=1 once every socket listens.

use emudevd::{config, control, devices, notify, sockets};

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use config::DeviceSpec;

const USAGE: &str = "\
usage: emudevd [OPTIONS] --device TYPE,socket=PATH[,key=value...] [--device ...]

Serves emulated PCI devices over vfio-user, one UNIX socket per device.

Options:
  --device SPEC          a device to serve (repeatable). Types and their options:
                           virtio-blk,socket=PATH,path=IMAGE[,readonly=on][,direct=on]
                                     [,num-queues=N][,queue-size=N][,serial=STR]
                                     [,tcg-boot=on]  (firmware boot under QEMU TCG)
                           virtio-blk,socket=PATH,backend=null[,size=1G]
                           virtio-blk,socket=PATH,engine=vhost-user,path=BACKEND_SOCK
                                     [,queue-size=N]  (rings run by a vhost-user backend)
                           virtio-fs,socket=PATH,path=VIRTIOFSD_SOCK,tag=TAG
                                     [,num-request-queues=N][,queue-size=N]
                           virtio-net,socket=PATH[,backend=switch][,switch=NAME]
                                     | backend=tap,ifname=TAP [,mac=52:54:00:..]
                                     [,queue-pairs=N][,queue-size=N][,mtu=N][,offloads=off]
                           avf,socket=PATH[,backend=...][,mac=..][,queue-pairs=N]
                           testdev,socket=PATH
                         every type also takes id=NAME (default: TYPE followed by its index)
  --socket-path PATH     socket for a single --device given without socket=
  --fd N                 serve a single device on listening socket fd N (from the launcher)
  --socket-group GID     make sockets 0660 with this group (default: 0600, owner only)
  --pollers N            poller threads shared by all devices (default 1)
  --pidfile PATH         write our pid here (removed on exit)
  --config FILE          devices and settings from a TOML file ([[device]] tables with
                         type = \"...\" and the --device keys); flags win over the file
  --control PATH         control socket (JSON lines, QMP style; see emudevctl)
  --print-capabilities   print device types and features as JSON, then exit
  -h, --help             this text
  -V, --version          version
Logging: RUST_LOG=error|warn|info|debug|trace (default info).";

/// Parsed command line.
#[derive(Debug, Default)]
struct Args {
    devices: Vec<String>,
    socket_path: Option<PathBuf>,
    fd: Option<i32>,
    socket_group: Option<u32>,
    pollers: usize,
    pidfile: Option<PathBuf>,
    control: Option<PathBuf>,
    print_capabilities: bool,
    /// `--pollers` was given (it then wins over the config file).
    pollers_set: bool,
    config: Option<PathBuf>,
}

fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    let mut a = Args {
        pollers: 1,
        ..Default::default()
    };
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("emudevd {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--device" => a.devices.push(value("--device")?),
            "--socket-path" => a.socket_path = Some(value("--socket-path")?.into()),
            "--fd" => {
                let v = value("--fd")?;
                a.fd = Some(v.parse().map_err(|_| format!("--fd {v}: not a number"))?);
            }
            "--socket-group" => {
                let v = value("--socket-group")?;
                a.socket_group = Some(
                    v.parse()
                        .map_err(|_| format!("--socket-group {v}: not a numeric gid"))?,
                );
            }
            "--pollers" => {
                let v = value("--pollers")?;
                a.pollers_set = true;
                a.pollers = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| format!("--pollers {v}: expected 1 to 64"))?;
            }
            "--pidfile" => a.pidfile = Some(value("--pidfile")?.into()),
            "--config" => a.config = Some(value("--config")?.into()),
            "--control" => a.control = Some(value("--control")?.into()),
            "--print-capabilities" => a.print_capabilities = true,
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    Ok(Some(a))
}

/// Apply `--socket-path` / `--fd` to a single device given without `socket=`.
fn device_args(a: &Args) -> Result<Vec<String>, String> {
    let single = a.socket_path.is_some() || a.fd.is_some();
    if a.socket_path.is_some() && a.fd.is_some() {
        return Err("--socket-path and --fd exclude each other".into());
    }
    if !single {
        return Ok(a.devices.clone());
    }
    if a.devices.len() != 1 {
        return Err("--socket-path and --fd need exactly one --device".into());
    }
    let d = &a.devices[0];
    if d.split(',').any(|kv| kv.starts_with("socket=")) {
        return Err("--device already has socket=; drop --socket-path/--fd".into());
    }
    let sock = match (&a.socket_path, a.fd) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(fd)) => format!("fd:{fd}"),
        (None, None) => unreachable!("checked above"),
    };
    Ok(vec![format!("{d},socket={sock}")])
}

fn capabilities() -> serde_json::Value {
    serde_json::json!({
        "type": "vfio-user",
        "protocol": { "major": 0, "minor": 0 },
        "devices": {
            "virtio-blk": {
                "options": ["socket", "id", "path", "backend", "size", "readonly", "direct",
                            "num-queues", "queue-size", "serial", "tcg-boot", "engine"],
                "engines": ["builtin", "vhost-user"],
                "features": ["seg-max", "size-max", "blk-size", "flush", "mq", "get-id",
                             "discard", "write-zeroes", "ro", "packed-ring", "event-idx",
                             "indirect-desc", "ring-reset"]
            },
            "virtio-fs": {
                "options": ["socket", "id", "engine", "path", "tag", "num-request-queues",
                            "queue-size"],
                "engines": ["vhost-user"]
            },
            "virtio-net": {
                "options": ["socket", "id", "backend", "ifname", "switch", "mac", "queue-pairs",
                            "queue-size", "mtu", "offloads"],
                "backends": ["tap", "switch"],
                "features": ["mac", "status", "mrg-rxbuf", "csum", "guest-csum", "host-tso4",
                             "host-tso6", "host-ecn", "guest-tso4", "guest-tso6", "guest-ecn",
                             "mq", "ctrl-vq", "ctrl-rx", "ctrl-mac-addr", "announce", "mtu"]
            },
            "avf": {
                "options": ["socket", "id", "backend", "ifname", "switch", "mac", "queue-pairs"],
                "backends": ["tap", "switch"],
                "pci-id": "8086:1889"
            },
            "testdev": { "options": ["socket", "id"] }
        },
        "features": ["fd", "socket-path", "pidfile", "sd-notify", "no-shared-mem-dma", "control"],
        "control": ["query-devices", "query-stats", "device-add", "device-del", "set-link"]
    })
}

fn init_logging() {
    let level = match std::env::var("RUST_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Info,
    };
    static LOGGER: StderrLogger = StderrLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

struct StderrLogger;
impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "emudevd[{}] {:5} {}",
                std::process::id(),
                r.level(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

/// Merge `--config FILE` into the command line: its devices come first; a flag given on the
/// command line wins over the same setting in the file.
fn apply_config_file(args: &mut Args, path: &std::path::Path) -> Result<(), String> {
    let name = format!("--config {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
    let file = emudevd::config_file::parse(&name, &text)?;
    let mut devices = file.devices;
    devices.append(&mut args.devices);
    args.devices = devices;
    if !args.pollers_set {
        args.pollers = file.pollers.unwrap_or(args.pollers);
    }
    args.control = args.control.take().or(file.control);
    args.pidfile = args.pidfile.take().or(file.pidfile);
    args.socket_group = args.socket_group.or(file.socket_group);
    Ok(())
}

fn run() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(mut args) = parse_args(&argv)? else {
        return Ok(());
    };
    if let Some(path) = args.config.clone() {
        apply_config_file(&mut args, &path)?;
    }
    if args.print_capabilities {
        println!("{:#}", capabilities());
        return Ok(());
    }
    let specs: Vec<DeviceSpec> =
        config::parse_devices(&device_args(&args)?).map_err(|e| e.to_string())?;
    if specs.is_empty() {
        return Err("no --device given (see --help)".into());
    }
    // Everything that can be checked without side effects is checked before we create
    // anything: device options, backing files, socket paths.
    for s in &specs {
        devices::prepare(s).map_err(|e| e.to_string())?;
    }
    if let Some(c) = &args.control {
        if specs.iter().any(|s| &s.socket == c) {
            return Err(format!("--control {}: also a device socket", c.display()));
        }
        sockets::check_path(c).map_err(|e| format!("--control: {e}"))?;
    }
    if let Some(p) = &args.pidfile {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            return Err(format!("--pidfile {}: no such directory", p.display()));
        }
    }
    for s in specs
        .iter()
        .filter(|s| !s.socket.to_string_lossy().starts_with("fd:"))
    {
        sockets::check_path(&s.socket).map_err(|e| format!("device {}: {e}", s.name()))?;
    }

    // Block the stop signals in every thread (threads inherit the mask); the main thread
    // waits for them.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let registry = Arc::new(devices::Registry::new(
        args.pollers,
        args.socket_group,
        specs.len(),
    )?);
    for s in &specs {
        let name = s.name();
        let sock = s.socket.display().to_string();
        let r = match sock.strip_prefix("fd:") {
            Some(fd) => fd
                .parse()
                .map_err(|_| format!("device {name}: bad fd {fd}"))
                .and_then(|fd| sockets::from_fd(fd).map_err(|e| format!("device {name}: {e}")))
                .map(|l| (l, None)),
            None => sockets::bind(&s.socket, args.socket_group)
                .map(|l| (l, Some(s.socket.clone())))
                .map_err(|e| format!("device {name} ({}): {e}", s.kind.type_name())),
        };
        let r = r.and_then(|(l, path): (UnixListener, Option<PathBuf>)| {
            registry
                .add_listening(s.clone(), l, path)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = r {
            registry.shutdown();
            return Err(e);
        }
    }
    let control = match &args.control {
        None => None,
        Some(p) => match control::Control::start(p, args.socket_group, registry.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                registry.shutdown();
                return Err(format!("--control: {e}"));
            }
        },
    };
    let stop_all = |control: Option<control::Control>| {
        if let Some(c) = control {
            c.stop();
        }
        registry.shutdown();
    };

    if let Some(p) = &args.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            stop_all(control);
            return Err(format!("--pidfile {}: {e}", p.display()));
        }
    }
    match notify::notify("READY=1") {
        Ok(true) => log::info!("notified readiness"),
        Ok(false) => {}
        Err(e) => log::warn!("sd_notify failed: {e}"),
    }
    log::info!("ready: {} device(s)", specs.len());

    let sig = sigs.wait().map_err(|e| format!("sigwait: {e}"))?;
    log::info!("{sig:?}: shutting down");
    let _ = notify::notify("STOPPING=1");
    stop_all(control);
    if let Some(p) = &args.pidfile {
        let _ = std::fs::remove_file(p);
    }
    log::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emudevd: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Option<Args>, String> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn socket_path_applies_to_a_single_device() {
        let a = args(&["--device", "testdev", "--socket-path", "/tmp/x.sock"])
            .unwrap()
            .unwrap();
        assert_eq!(device_args(&a).unwrap(), vec!["testdev,socket=/tmp/x.sock"]);
        let a = args(&["--device=testdev", "--fd=5"]).unwrap().unwrap();
        assert_eq!(device_args(&a).unwrap(), vec!["testdev,socket=fd:5"]);
        let a = args(&["--device", "testdev", "--device", "testdev", "--fd", "5"])
            .unwrap()
            .unwrap();
        assert!(device_args(&a).is_err());
    }

    #[test]
    fn bad_flags_are_precise() {
        assert_eq!(
            args(&["--bogus"]).unwrap_err(),
            "unknown argument '--bogus' (see --help)"
        );
        assert_eq!(args(&["--device"]).unwrap_err(), "--device needs a value");
        assert!(args(&["--pollers", "0"]).unwrap_err().contains("1 to 64"));
    }
}
