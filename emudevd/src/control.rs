//! The control socket (`--control PATH`): JSON lines in the style of QMP.
//!
//! On connect the server sends a greeting line, then answers one line per request:
//!
//! ```text
//! <- {"emudevd":{"version":"0.1.0","devices":2},"capabilities":[]}
//! -> {"execute":"query-devices","id":1}
//! <- {"return":[{"name":"virtio-blk0",...}],"id":1}
//! -> {"execute":"device-del","arguments":{"id":"nope"}}
//! <- {"error":{"class":"DeviceNotFound","desc":"no device named nope"}}
//! ```
//!
//! Commands: `query-devices`, `query-stats` (`device`, `format`: `json` or `prometheus`),
//! `device-add` (`spec` in `--device` syntax, or the options as JSON fields with `type`),
//! `device-del` (`id` or `name`), `set-link` (`name`, `up`), `qmp_capabilities` (accepted,
//! no effect), `query-commands`. An optional `id` is echoed back.
//!
//! Clients: up to [`MAX_CLIENTS`] at once, each on its own thread; commands from different
//! clients may interleave (the device registry serializes adds and removes). Lines longer
//! than [`MAX_LINE`] bytes end the connection after an error reply; malformed JSON only
//! gets an error reply.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde_json::{json, Map, Value};

use crate::devices::{DeviceError, DeviceStat, PollerStat, Registry};
use crate::sockets::{self, SocketError};

/// Longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 64 * 1024;
/// Most clients connected at once; more are refused with an error line.
pub const MAX_CLIENTS: usize = 16;

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-devices",
    "query-stats",
    "device-add",
    "device-del",
    "set-link",
];

/// A command's failure, as sent in `{"error":{...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError {
    pub class: &'static str,
    pub desc: String,
}

impl CmdError {
    fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl From<DeviceError> for CmdError {
    fn from(e: DeviceError) -> Self {
        let class = match e {
            DeviceError::NotFound(_) => "DeviceNotFound",
            _ => "GenericError",
        };
        Self {
            class,
            desc: e.to_string(),
        }
    }
}

fn error_value(e: &CmdError) -> Value {
    json!({"error": {"class": e.class, "desc": e.desc}})
}

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CmdError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(CmdError::generic(format!(
            "argument '{key}' must be a string"
        ))),
    }
}

fn check_args(cmd: &str, args: &Map<String, Value>, known: &[&str]) -> Result<(), CmdError> {
    match args.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(CmdError::generic(format!(
            "{cmd}: unknown argument '{k}' (known: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))),
    }
}

/// Turn `device-add`'s JSON fields into a `--device` string: `type` first, then each
/// field as `key=value` (booleans as on/off).
pub fn spec_from_fields(args: &Map<String, Value>) -> Result<String, CmdError> {
    let kind = str_arg(args, "type")?
        .ok_or_else(|| CmdError::generic("device-add: give 'spec' or 'type'"))?;
    let mut out = kind.to_string();
    for (k, v) in args {
        if k == "type" {
            continue;
        }
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            Value::Number(n) if n.is_u64() => n.to_string(),
            _ => {
                return Err(CmdError::generic(format!(
                    "device-add: field '{k}' must be a string, a boolean or a non-negative integer"
                )))
            }
        };
        if k.contains([',', '=']) || v.contains(',') || kind.contains(',') {
            return Err(CmdError::generic(format!(
                "device-add: field '{k}': ',' is not allowed in names or values"
            )));
        }
        out.push(',');
        out.push_str(k);
        out.push('=');
        out.push_str(&v);
    }
    Ok(out)
}

fn state_name(s: emudev::DeviceState) -> &'static str {
    use emudev::DeviceState::*;
    match s {
        Configured => "configured",
        Running => "running",
        Quiesced => "quiesced",
        Stopped => "stopped",
        Failed => "failed",
    }
}

fn stats_json(devs: &[DeviceStat], pollers: &[PollerStat]) -> Value {
    let devices: Vec<Value> = devs
        .iter()
        .map(|d| {
            let queues: Vec<Value> = d
                .queues
                .iter()
                .map(|q| {
                    json!({
                        "index": q.index,
                        "requests": q.requests,
                        "read_bytes": q.read_bytes,
                        "write_bytes": q.write_bytes,
                        "bytes": q.read_bytes.saturating_add(q.write_bytes),
                        "errors": q.errors,
                        "kicks": q.kicks,
                        "interrupts": q.interrupts,
                    })
                })
                .collect();
            let counters: Map<String, Value> = d
                .counters
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({
                "name": d.name,
                "type": d.kind,
                "state": state_name(d.state),
                "queues": queues,
                "counters": counters,
            })
        })
        .collect();
    let pollers: Vec<Value> = pollers
        .iter()
        .map(|p| {
            json!({
                "thread": p.thread,
                "iterations": p.iterations,
                "sleeps": p.sleeps,
                "poll_ns": p.poll_ns,
                "sleep_ns": p.sleep_ns,
                "cpu_ns": p.cpu_ns,
            })
        })
        .collect();
    json!({"devices": devices, "pollers": pollers})
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The statistics in the Prometheus text exposition format.
pub fn stats_prometheus(devs: &[DeviceStat], pollers: &[PollerStat]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let family = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
    };
    family(
        &mut o,
        "emudev_device_state",
        "gauge",
        "1 for the device's current state.",
    );
    for d in devs {
        let _ = writeln!(
            o,
            "emudev_device_state{{device=\"{}\",type=\"{}\",state=\"{}\"}} 1",
            label(&d.name),
            d.kind,
            state_name(d.state)
        );
    }
    type Field = fn(&crate::devices::QueueStat) -> u64;
    let queue_fields: [(&str, &str, Field); 6] = [
        ("requests", "Requests completed.", |q| q.requests),
        (
            "read_bytes",
            "Bytes of read requests (backend to driver).",
            |q| q.read_bytes,
        ),
        (
            "write_bytes",
            "Bytes of write requests (driver to backend).",
            |q| q.write_bytes,
        ),
        ("errors", "Ring, I/O and malformed-request errors.", |q| {
            q.errors
        }),
        ("kicks", "Driver notifications.", |q| q.kicks),
        ("interrupts", "Used-buffer interrupts raised.", |q| {
            q.interrupts
        }),
    ];
    for (f, help, get) in queue_fields {
        let name = format!("emudev_queue_{f}_total");
        family(&mut o, &name, "counter", help);
        for d in devs {
            for q in &d.queues {
                let _ = writeln!(
                    o,
                    "{name}{{device=\"{}\",type=\"{}\",queue=\"{}\"}} {}",
                    label(&d.name),
                    d.kind,
                    q.index,
                    get(q)
                );
            }
        }
    }
    let mut names: Vec<&str> = devs
        .iter()
        .flat_map(|d| d.counters.iter().map(|c| c.0))
        .collect();
    names.sort_unstable();
    names.dedup();
    for c in names {
        let name = format!("emudev_device_{c}_total");
        family(&mut o, &name, "counter", &format!("Device counter {c}."));
        for d in devs {
            for (_, v) in d.counters.iter().filter(|(k, _)| *k == c) {
                let _ = writeln!(
                    o,
                    "{name}{{device=\"{}\",type=\"{}\"}} {v}",
                    label(&d.name),
                    d.kind
                );
            }
        }
    }
    fn secs(ns: u64) -> f64 {
        ns as f64 / 1e9
    }
    type PField = fn(&PollerStat) -> Option<f64>;
    let poller_fields: [(&str, &str, PField); 5] = [
        (
            "emudev_poller_iterations_total",
            "Poll loop iterations.",
            |p| Some(p.iterations as f64),
        ),
        (
            "emudev_poller_sleeps_total",
            "Times the poller went to sleep.",
            |p| Some(p.sleeps as f64),
        ),
        (
            "emudev_poller_polling_seconds_total",
            "Time spent awake, polling.",
            |p| Some(secs(p.poll_ns)),
        ),
        (
            "emudev_poller_sleeping_seconds_total",
            "Time spent asleep.",
            |p| Some(secs(p.sleep_ns)),
        ),
        (
            "emudev_poller_cpu_seconds_total",
            "CPU time of the poller thread.",
            |p| p.cpu_ns.map(secs),
        ),
    ];
    for (name, help, get) in poller_fields {
        family(&mut o, name, "counter", help);
        for p in pollers {
            if let Some(v) = get(p) {
                let _ = writeln!(o, "{name}{{thread=\"{}\"}} {v}", p.thread);
            }
        }
    }
    o
}

/// Run one command.
pub fn execute(reg: &Registry, cmd: &str, args: &Map<String, Value>) -> Result<Value, CmdError> {
    match cmd {
        "qmp_capabilities" => {
            check_args(cmd, args, &[])?;
            Ok(json!({}))
        }
        "query-commands" => {
            check_args(cmd, args, &[])?;
            Ok(COMMANDS.iter().map(|c| json!({"name": c})).collect())
        }
        "query-devices" => {
            check_args(cmd, args, &[])?;
            Ok(reg
                .list()
                .into_iter()
                .map(|d| {
                    json!({
                        "name": d.name,
                        "type": d.kind,
                        "socket": d.socket,
                        "state": state_name(d.state),
                        "serving": d.serving,
                    })
                })
                .collect())
        }
        "query-stats" => {
            check_args(cmd, args, &["device", "format"])?;
            let only = str_arg(args, "device")?;
            let devs = reg.stats(only)?;
            let pollers = reg.poller_stats();
            match str_arg(args, "format")?.unwrap_or("json") {
                "json" => Ok(stats_json(&devs, &pollers)),
                "prometheus" => Ok(Value::String(stats_prometheus(&devs, &pollers))),
                other => Err(CmdError::generic(format!(
                    "query-stats: format '{other}': expected json or prometheus"
                ))),
            }
        }
        "device-add" => {
            let spec = match str_arg(args, "spec")? {
                Some(s) => {
                    check_args(cmd, args, &["spec"])?;
                    s.to_string()
                }
                None => spec_from_fields(args)?,
            };
            let name = reg.add_spec(&spec)?;
            Ok(json!({"name": name}))
        }
        "device-del" => {
            check_args(cmd, args, &["id", "name"])?;
            let name = match (str_arg(args, "id")?, str_arg(args, "name")?) {
                (Some(n), None) | (None, Some(n)) => n,
                _ => {
                    return Err(CmdError::generic(
                        "device-del: give exactly one of 'id' or 'name'",
                    ))
                }
            };
            reg.remove(name)?;
            Ok(json!({}))
        }
        "set-link" => {
            check_args(cmd, args, &["name", "up"])?;
            let name = str_arg(args, "name")?
                .ok_or_else(|| CmdError::generic("set-link: missing 'name'"))?;
            let up = match args.get("up") {
                Some(Value::Bool(b)) => *b,
                _ => return Err(CmdError::generic("set-link: 'up' must be true or false")),
            };
            reg.set_link(name, up)?;
            Ok(json!({}))
        }
        other => Err(CmdError {
            class: "CommandNotFound",
            desc: format!("the command {other} has not been found"),
        }),
    }
}

/// Answer one request line (never fails: errors become error replies).
pub fn handle_line(reg: &Registry, line: &[u8]) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_value(&CmdError::generic(format!("invalid JSON: {e}"))),
    };
    let Value::Object(mut req) = req else {
        return error_value(&CmdError::generic("expected a JSON object"));
    };
    let id = req.remove("id");
    let mut reply = (|| {
        let cmd = match req.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(CmdError::generic("'execute' must be a string")),
            None => return Err(CmdError::generic("missing 'execute'")),
        };
        let args = match req.remove("arguments") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(CmdError::generic("'arguments' must be an object")),
        };
        if let Some(k) = req.keys().next() {
            return Err(CmdError::generic(format!("unknown member '{k}'")));
        }
        log::debug!("control: {cmd} {}", Value::Object(args.clone()));
        execute(reg, &cmd, &args)
    })()
    .map_or_else(|e| error_value(&e), |v| json!({"return": v}));
    if let (Some(id), Value::Object(m)) = (id, &mut reply) {
        m.insert("id".into(), id);
    }
    reply
}

fn send(stream: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// Serve one client until it closes, a write fails, or a line is too long; then shut the
/// connection down (the accept loop keeps a clone of the stream, so dropping is not enough).
fn serve_client(reg: &Registry, mut stream: UnixStream) -> io::Result<()> {
    let r = serve_lines(reg, &mut stream);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    r
}

fn serve_lines(reg: &Registry, stream: &mut UnixStream) -> io::Result<()> {
    let greeting = json!({
        "emudevd": {"version": env!("CARGO_PKG_VERSION"), "devices": reg.len()},
        "capabilities": [],
    });
    send(stream, &greeting)?;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let reply = handle_line(reg, line);
            send(stream, &reply)?;
        }
        if pending.len() > MAX_LINE {
            let e = CmdError::generic(format!("request line longer than {MAX_LINE} bytes"));
            let _ = send(stream, &error_value(&e));
            return Ok(());
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&buf[..n]);
    }
}

struct ClientSlot {
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

/// Connected clients by id. A client's thread removes its own slot when it ends, so a
/// closed connection's fds are released at once, not at the next accept.
type Clients = Arc<Mutex<BTreeMap<u64, ClientSlot>>>;

/// The running control socket.
pub struct Control {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    clients: Clients,
}

impl Control {
    /// Bind the control socket (0600, or 0660 with `group`) and start accepting clients.
    pub fn start(path: &Path, group: Option<u32>, reg: Arc<Registry>) -> Result<Self, SocketError> {
        let listener = sockets::bind(path, group)?;
        let io_err = |op: &'static str| {
            let path = path.to_path_buf();
            move |source: io::Error| SocketError::Io { path, op, source }
        };
        listener
            .set_nonblocking(true)
            .map_err(io_err("set non-blocking"))?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| io_err("eventfd")(e.into()));
        let wake = match wake {
            Ok(w) => Arc::new(w),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::default();
        let (s, w, c) = (stop.clone(), wake.clone(), clients.clone());
        let thread = std::thread::Builder::new()
            .name("emudevd-control".into())
            .spawn(move || accept_loop(listener, reg, s, w, c))
            .map_err(|e| {
                let _ = std::fs::remove_file(path);
                io_err("spawn thread")(e)
            })?;
        log::info!("control socket on {}", path.display());
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            wake,
            thread: Some(thread),
            clients,
        })
    }

    /// Stop accepting, disconnect every client, join all threads, remove the socket.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let slots =
            std::mem::take(&mut *self.clients.lock().unwrap_or_else(PoisonError::into_inner));
        for s in slots.values() {
            let _ = s.stream.shutdown(std::net::Shutdown::Both);
        }
        for (_, mut s) in slots {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    reg: Arc<Registry>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    clients: Clients,
) {
    let mut next_id = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                log::error!("control socket: poll: {e}");
                return;
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                continue;
            }
        };
        // Held until the new slot is in: its thread cannot remove the slot before that.
        let mut slots = clients.lock().unwrap_or_else(PoisonError::into_inner);
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        if slots.len() >= MAX_CLIENTS {
            let e = CmdError::generic(format!("too many control clients (at most {MAX_CLIENTS})"));
            let _ = send(&mut stream, &error_value(&e));
            continue;
        }
        let Ok(watch) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        let r = reg.clone();
        let mine = clients.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("emudevd-ctl{id}"))
            .spawn(move || {
                if let Err(e) = serve_client(&r, stream) {
                    log::debug!("control client {id}: {e}");
                }
                // Our slot (the watch clone of the stream, and our own handle, which is
                // dropped: this thread is ending). Gone already if the control socket stops.
                let slot = mine
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                drop(slot);
            });
        match spawned {
            Ok(t) => {
                slots.insert(
                    id,
                    ClientSlot {
                        stream: watch,
                        thread: Some(t),
                    },
                );
            }
            Err(e) => log::warn!("control socket: cannot start a client thread: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn reg() -> Registry {
        Registry::new(1, None, 0).unwrap()
    }

    #[test]
    fn malformed_requests_get_error_replies() {
        let r = reg();
        let e = handle_line(&r, b"{not json");
        assert_eq!(e["error"]["class"], "GenericError");
        assert!(e["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON"));
        assert_eq!(
            handle_line(&r, b"[1,2]")["error"]["desc"],
            "expected a JSON object"
        );
        assert_eq!(handle_line(&r, b"{}")["error"]["desc"], "missing 'execute'");
        assert_eq!(
            handle_line(&r, b"\xff\xfe")["error"]["class"],
            "GenericError"
        );
        let e = handle_line(&r, br#"{"execute":"launch-missiles","id":7}"#);
        assert_eq!(e["error"]["class"], "CommandNotFound");
        assert_eq!(e["id"], 7);
        let e = handle_line(&r, br#"{"execute":"query-devices","arguments":{"x":1}}"#);
        assert!(e["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("unknown argument 'x'"));
        let e = handle_line(&r, br#"{"execute":"query-devices","arguments":[]}"#);
        assert_eq!(e["error"]["desc"], "'arguments' must be an object");
    }

    #[test]
    fn replies_echo_the_id() {
        let r = reg();
        let v = handle_line(&r, br#"{"execute":"query-devices","id":"abc"}"#);
        assert_eq!(v, json!({"return": [], "id": "abc"}));
    }

    #[test]
    fn device_del_and_set_link_of_unknown_devices() {
        let r = reg();
        let e = execute(&r, "device-del", &obj(json!({"id": "nope"}))).unwrap_err();
        assert_eq!(e.class, "DeviceNotFound");
        let e = execute(&r, "device-del", &obj(json!({}))).unwrap_err();
        assert!(e.desc.contains("exactly one"));
        let e = execute(&r, "set-link", &obj(json!({"name": "nope", "up": true}))).unwrap_err();
        assert_eq!(e.class, "DeviceNotFound");
        let e = execute(&r, "set-link", &obj(json!({"name": "nope", "up": "yes"}))).unwrap_err();
        assert!(e.desc.contains("true or false"));
    }

    #[test]
    fn json_fields_become_a_device_spec() {
        let s = spec_from_fields(&obj(json!({
            "type": "virtio-blk", "socket": "/tmp/a.sock", "backend": "null",
            "readonly": true, "num-queues": 2
        })))
        .unwrap();
        // serde_json's map is sorted by key.
        assert_eq!(
            s,
            "virtio-blk,backend=null,num-queues=2,readonly=on,socket=/tmp/a.sock"
        );
        let e = spec_from_fields(&obj(json!({"type": "testdev", "socket": "a,b=c"}))).unwrap_err();
        assert!(e.desc.contains("','"));
        let e = spec_from_fields(&obj(json!({"type": "testdev", "size": -1}))).unwrap_err();
        assert!(e.desc.contains("non-negative"));
        assert!(spec_from_fields(&obj(json!({"socket": "x"}))).is_err());
    }

    #[test]
    fn add_query_and_delete_at_runtime() {
        let r = reg();
        let dir = std::env::temp_dir().join(format!("emudevd-ctl-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("blk.sock");
        let spec = format!(
            "virtio-blk,id=vdb,socket={},backend=null,size=1M",
            sock.display()
        );
        let v = execute(&r, "device-add", &obj(json!({"spec": spec}))).unwrap();
        assert_eq!(v, json!({"name": "vdb"}));
        assert!(sock.exists());
        // Same name or same socket again: refused, nothing changes.
        let e = execute(&r, "device-add", &obj(json!({"spec": spec}))).unwrap_err();
        assert!(e.desc.contains("exists"), "{}", e.desc);
        let e = execute(
            &r,
            "device-add",
            &obj(json!({"type": "testdev", "socket": sock.display().to_string()})),
        )
        .unwrap_err();
        assert!(e.desc.contains("is used by device vdb"), "{}", e.desc);
        let e = execute(
            &r,
            "device-add",
            &obj(json!({"spec": "testdev,socket=fd:3"})),
        )
        .unwrap_err();
        assert!(e.desc.contains("only for the command line"), "{}", e.desc);

        let list = execute(&r, "query-devices", &Map::new()).unwrap();
        assert_eq!(list[0]["name"], "vdb");
        assert_eq!(list[0]["type"], "virtio-blk");
        let st = execute(&r, "query-stats", &Map::new()).unwrap();
        assert_eq!(st["devices"][0]["queues"][0]["requests"], 0);
        assert_eq!(st["pollers"].as_array().unwrap().len(), 1);
        let p = execute(&r, "query-stats", &obj(json!({"format": "prometheus"}))).unwrap();
        let p = p.as_str().unwrap();
        assert!(
            p.contains(
                "emudev_queue_requests_total{device=\"vdb\",type=\"virtio-blk\",queue=\"0\"} 0"
            ),
            "{p}"
        );
        assert!(p.contains("# TYPE emudev_poller_sleeping_seconds_total counter"));
        let e = execute(&r, "query-stats", &obj(json!({"format": "xml"}))).unwrap_err();
        assert!(e.desc.contains("xml"));

        let e = execute(&r, "set-link", &obj(json!({"name": "vdb", "up": false}))).unwrap_err();
        assert_eq!(e.desc, "device vdb (virtio-blk) has no link");

        execute(&r, "device-del", &obj(json!({"name": "vdb"}))).unwrap();
        assert!(!sock.exists());
        assert_eq!(
            execute(&r, "query-devices", &Map::new()).unwrap(),
            json!([])
        );
        let _ = std::fs::remove_dir(&dir);
    }
}
