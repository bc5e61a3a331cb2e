//! lsvfio against a live test device: a full report, and no panic when its reader is gone.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Server {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lsvfio-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("t.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_testdev-server"))
            .arg("--socket")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, dir, sock }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lsvfio(sock: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lsvfio"));
    c.arg(sock);
    c
}

#[test]
fn prints_the_device() {
    let s = Server::start("print");
    let out = lsvfio(&s.sock).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Regions:"), "{text}");
    assert!(text.contains("IRQs:"), "{text}");
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    let s = Server::start("pipe");
    let (rd, wr): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    // The reader is gone before lsvfio writes anything: its write gets EPIPE.
    drop(rd);
    let out = lsvfio(&s.sock)
        .stdout(Stdio::from(wr))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
