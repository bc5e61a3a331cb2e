//! emudevctl: a small client of emudevd's control socket.
//!
//! ```text
//! emudevctl --control PATH query-devices [--json]
//! emudevctl --control PATH query-stats [--prometheus | --json] [--device NAME]
//! emudevctl --control PATH device-add SPEC
//! emudevctl --control PATH device-del NAME
//! emudevctl --control PATH set-link NAME up|down
//! emudevctl --control PATH raw JSON
//! ```
//!
//! Exits 0 on a `return`, 1 on an `error` reply (printed to stderr as `CLASS: desc`), 2 on
//! a usage error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

const USAGE: &str = "\
usage: emudevctl --control PATH COMMAND [ARGS]   (or EMUDEV_CONTROL=PATH)

Commands:
  query-devices [--json]                         served devices
  query-stats [--prometheus|--json] [--device N] per device and queue counters, pollers
  device-add SPEC                                add a device (--device syntax of emudevd)
  device-del NAME                                remove a device and its socket
  set-link NAME up|down                          a NIC's link
  raw JSON                                       send one request line, print the reply";

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Protocol { path: String, what: String },
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
}

struct Conn {
    path: String,
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn open(path: &str) -> Result<Self, CtlError> {
        let io = |source| CtlError::Io {
            path: path.to_string(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        let r = BufReader::new(s.try_clone().map_err(io)?);
        let mut c = Self {
            path: path.to_string(),
            w: s,
            r,
        };
        let greeting = c.read_line()?;
        if greeting.get("emudevd").is_none() {
            return Err(c.protocol(format!("unexpected greeting {greeting}")));
        }
        Ok(c)
    }

    fn protocol(&self, what: String) -> CtlError {
        CtlError::Protocol {
            path: self.path.clone(),
            what,
        }
    }

    fn read_line(&mut self) -> Result<Value, CtlError> {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).map_err(|source| CtlError::Io {
            path: self.path.clone(),
            source,
        })?;
        if n == 0 {
            return Err(self.protocol("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("bad reply: {e}")))
    }

    /// Send one request line; return the reply.
    fn request_line(&mut self, line: &str) -> Result<Value, CtlError> {
        let mut l = line.trim_end().to_string();
        l.push('\n');
        self.w
            .write_all(l.as_bytes())
            .map_err(|source| CtlError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.read_line()
    }

    /// Run a command; `Ok(return value)` or the error reply as `CtlError::Command`.
    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, CtlError> {
        let reply = self.request_line(&json!({"execute": cmd, "arguments": args}).to_string())?;
        unwrap_reply(reply).map_err(|e| match e {
            CtlError::Protocol { what, .. } => self.protocol(what),
            e => e,
        })
    }
}

fn unwrap_reply(mut reply: Value) -> Result<Value, CtlError> {
    if let Some(v) = reply.get_mut("return") {
        return Ok(v.take());
    }
    if let Some(e) = reply.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        return Err(CtlError::Command {
            class: s("class"),
            desc: s("desc"),
        });
    }
    Err(CtlError::Protocol {
        path: String::new(),
        what: format!("reply without return or error: {reply}"),
    })
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn print_devices(v: &Value) {
    println!("{:<16} {:<12} {:<11} SOCKET", "NAME", "TYPE", "STATE");
    for d in v.as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<12} {:<11} {}",
            s(d, "name"),
            s(d, "type"),
            s(d, "state"),
            s(d, "socket")
        );
    }
}

fn print_stats(v: &Value) {
    println!(
        "{:<16} {:<12} {:>5} {:>10} {:>12} {:>12} {:>7} {:>9} {:>10}",
        "DEVICE",
        "TYPE",
        "QUEUE",
        "REQUESTS",
        "READ_BYTES",
        "WRITE_BYTES",
        "ERRORS",
        "KICKS",
        "INTERRUPTS"
    );
    let empty = Vec::new();
    for d in v["devices"].as_array().unwrap_or(&empty) {
        for q in d["queues"].as_array().unwrap_or(&empty) {
            println!(
                "{:<16} {:<12} {:>5} {:>10} {:>12} {:>12} {:>7} {:>9} {:>10}",
                s(d, "name"),
                s(d, "type"),
                u(q, "index"),
                u(q, "requests"),
                u(q, "read_bytes"),
                u(q, "write_bytes"),
                u(q, "errors"),
                u(q, "kicks"),
                u(q, "interrupts")
            );
        }
        let counters: Vec<String> = d["counters"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_u64() != Some(0))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<16} {:<12} state {}{}{}",
            s(d, "name"),
            s(d, "type"),
            s(d, "state"),
            if counters.is_empty() { "" } else { ", " },
            counters.join(" ")
        );
    }
    for p in v["pollers"].as_array().unwrap_or(&empty) {
        let secs = |k: &str| u(p, k) as f64 / 1e9;
        let cpu = p["cpu_ns"]
            .as_u64()
            .map_or_else(|| "?".to_string(), |n| format!("{:.3} s", n as f64 / 1e9));
        println!(
            "poller {}: polling {:.3} s, sleeping {:.3} s, cpu {cpu}, {} iterations, {} sleeps",
            u(p, "thread"),
            secs("poll_ns"),
            secs("sleep_ns"),
            u(p, "iterations"),
            u(p, "sleeps")
        );
    }
}

fn run(argv: &[String]) -> Result<(), CtlError> {
    let usage = |m: &str| CtlError::Usage(format!("{m}\n{USAGE}"));
    let mut control = std::env::var("EMUDEV_CONTROL").ok();
    let mut rest: Vec<&str> = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--control" => {
                control = Some(
                    it.next()
                        .ok_or_else(|| usage("--control needs a path"))?
                        .clone(),
                )
            }
            x if x.starts_with("--control=") => control = Some(x["--control=".len()..].to_string()),
            x => rest.push(x),
        }
    }
    let path = control.ok_or_else(|| usage("missing --control PATH"))?;
    let (cmd, args) = rest.split_first().ok_or_else(|| usage("missing command"))?;
    let flag = |f: &str| args.contains(&f);
    let only_flags = |known: &[&str]| -> Result<(), CtlError> {
        match args.iter().find(|a| !known.contains(a)) {
            Some(a) => Err(usage(&format!("{cmd}: unexpected argument '{a}'"))),
            None => Ok(()),
        }
    };
    match *cmd {
        "query-devices" => {
            only_flags(&["--json"])?;
            let v = Conn::open(&path)?.execute("query-devices", json!({}))?;
            if flag("--json") {
                println!("{v:#}");
            } else {
                print_devices(&v);
            }
        }
        "query-stats" => {
            let mut a = serde_json::Map::new();
            let mut i = 0;
            while i < args.len() {
                match args[i] {
                    "--prometheus" => {
                        a.insert("format".into(), json!("prometheus"));
                    }
                    "--json" => {}
                    "--device" => {
                        i += 1;
                        let d = args.get(i).ok_or_else(|| usage("--device needs a name"))?;
                        a.insert("device".into(), json!(d));
                    }
                    other => {
                        return Err(usage(&format!(
                            "query-stats: unexpected argument '{other}'"
                        )))
                    }
                }
                i += 1;
            }
            let v = Conn::open(&path)?.execute("query-stats", Value::Object(a))?;
            match v.as_str() {
                Some(text) => print!("{text}"),
                None if flag("--json") => println!("{v:#}"),
                None => print_stats(&v),
            }
        }
        "device-add" => {
            let [spec] = args else {
                return Err(usage("device-add takes one SPEC"));
            };
            let v = Conn::open(&path)?.execute("device-add", json!({ "spec": spec }))?;
            println!("added {}", s(&v, "name"));
        }
        "device-del" => {
            let [name] = args else {
                return Err(usage("device-del takes one NAME"));
            };
            Conn::open(&path)?.execute("device-del", json!({ "id": name }))?;
            println!("removed {name}");
        }
        "set-link" => {
            let up = match args {
                [_, "up"] => true,
                [_, "down"] => false,
                _ => return Err(usage("set-link takes NAME up|down")),
            };
            Conn::open(&path)?.execute("set-link", json!({ "name": args[0], "up": up }))?;
        }
        "raw" => {
            let [line] = args else {
                return Err(usage("raw takes one JSON argument"));
            };
            let reply = Conn::open(&path)?.request_line(line)?;
            println!("{reply}");
            if reply.get("error").is_some() {
                unwrap_reply(reply)?;
            }
        }
        other => return Err(usage(&format!("unknown command '{other}'"))),
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CtlError::Usage(m)) => {
            eprintln!("emudevctl: {m}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("emudevctl: {e}");
            ExitCode::FAILURE
        }
    }
}
