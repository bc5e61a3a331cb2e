//! Helpers of the daemon tests: temporary directories, the daemon as a child process, and
//! a line client of its control socket.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const EMUDEVD: &str = env!("CARGO_BIN_EXE_emudevd");
pub const EMUDEVCTL: &str = env!("CARGO_BIN_EXE_emudevctl");
pub const WAIT: Duration = Duration::from_secs(10);

/// A fresh directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("emudevd-t{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Names of the entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("read dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running emudevd, killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Daemon {
    /// Start emudevd with `args`, its stderr in `dir/stderr`.
    pub fn spawn(dir: &TempDir, args: &[String]) -> Self {
        Self::spawn_with(dir, args, |_| {})
    }

    pub fn spawn_with(dir: &TempDir, args: &[String], f: impl FnOnce(&mut Command)) -> Self {
        let stderr = dir.path("stderr");
        let file = std::fs::File::create(&stderr).expect("stderr file");
        let mut cmd = Command::new(EMUDEVD);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        f(&mut cmd);
        let child = cmd.spawn().expect("spawn emudevd");
        Self { child, stderr }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Wait for the exit, at most `WAIT`.
    pub fn wait(&mut self) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                t0.elapsed() < WAIT,
                "emudevd did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait until a server listens on `path`.
pub fn wait_listening(d: &mut Daemon, path: &Path) {
    let t0 = Instant::now();
    while UnixStream::connect(path).is_err() {
        if let Ok(Some(s)) = d.child.try_wait() {
            panic!("emudevd exited with {s}; log:\n{}", d.log());
        }
        assert!(
            t0.elapsed() < WAIT,
            "{} never listened; log:\n{}",
            path.display(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run emudevd to completion (for flag errors): exit status and stderr.
pub fn run_to_end(dir: &TempDir, args: &[String]) -> (ExitStatus, String) {
    let mut d = Daemon::spawn(dir, args);
    let st = d.wait();
    let log = d.log();
    let _ = std::fs::remove_file(&d.stderr);
    (st, log)
}

/// A control-socket connection.
pub struct Ctl {
    pub w: UnixStream,
    pub r: BufReader<UnixStream>,
    pub greeting: Value,
}

impl Ctl {
    pub fn connect(path: &Path) -> Self {
        let w = UnixStream::connect(path).expect("connect control");
        w.set_read_timeout(Some(WAIT)).unwrap();
        let mut r = BufReader::new(w.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).expect("greeting");
        let greeting = serde_json::from_str(&line).expect("greeting JSON");
        Self { w, r, greeting }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("write control");
    }

    /// The next reply line, or None at EOF.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("reply JSON")),
        }
    }

    pub fn call(&mut self, req: Value) -> Value {
        let mut l = req.to_string();
        l.push('\n');
        self.send_raw(l.as_bytes());
        self.recv().expect("reply")
    }
}

pub fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
