//! emudevd as its launchers see it: flags, `--fd`, readiness, signals, socket files.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use emudev_vfio_user::Client;

#[test]
fn print_capabilities_is_json_listing_the_types() {
    let out = std::process::Command::new(EMUDEVD)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["type"], "vfio-user");
    let devs = v["devices"].as_object().unwrap();
    assert!(
        devs.contains_key("virtio-blk") && devs.contains_key("testdev"),
        "{v}"
    );
    let opts = devs["virtio-blk"]["options"].as_array().unwrap();
    assert!(opts.iter().any(|o| o == "num-queues"));
    assert!(v["features"].as_array().unwrap().iter().any(|f| f == "fd"));
}

#[test]
fn bad_flags_and_configs_fail_precisely_and_create_nothing() {
    let d = TempDir::new("bad");
    let cases: Vec<(Vec<String>, String)> = vec![
        (args(&["--bogus"]), "unknown argument '--bogus'".into()),
        (
            args(&["--pollers", "0"]),
            "--pollers 0: expected 1 to 64".into(),
        ),
        (args(&[]), "no --device given".into()),
        (
            vec![
                "--device".into(),
                format!("testdev,socket={},bogus=1", d.s("a.sock")),
            ],
            "device 0 (testdev): unknown option 'bogus'".into(),
        ),
        (
            vec![
                "--device".into(),
                format!(
                    "virtio-blk,socket={},path={}",
                    d.s("a.sock"),
                    d.s("missing.img")
                ),
            ],
            format!(
                "device virtio-blk0 (virtio-blk): path {}: No such file",
                d.s("missing.img")
            ),
        ),
        (
            // The first device is fine; the second's directory does not exist. Checked
            // before anything is bound, so no a.sock, pidfile or control socket appears.
            vec![
                "--device".into(),
                format!("testdev,socket={}", d.s("a.sock")),
                "--device".into(),
                format!("testdev,socket={}", d.s("nodir/b.sock")),
                "--pidfile".into(),
                d.s("pid"),
                "--control".into(),
                d.s("ctl.sock"),
            ],
            format!("device testdev1: socket {}: directory", d.s("nodir/b.sock")),
        ),
        (
            vec![
                "--device".into(),
                format!("testdev,socket={}", d.s("a.sock")),
                "--control".into(),
                d.s("a.sock"),
            ],
            format!("--control {}: also a device socket", d.s("a.sock")),
        ),
        (
            vec![
                "--device".into(),
                "testdev".into(),
                "--fd".into(),
                "1".into(),
            ],
            "--fd 1: not a listening UNIX stream socket: fds 0-2 are stdio".into(),
        ),
    ];
    for (argv, want) in cases {
        let (st, log) = run_to_end(&d, &argv);
        assert!(!st.success(), "{argv:?} succeeded");
        assert!(
            log.contains(&want),
            "{argv:?}: expected {want:?} in:\n{log}"
        );
        assert!(d.entries().is_empty(), "{argv:?} left {:?}", d.entries());
    }
}

#[test]
fn serves_on_a_listening_fd_passed_by_the_launcher() {
    let d = TempDir::new("fd");
    let path = d.path("launcher.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    let argv = vec![
        "--device".into(),
        "testdev".into(),
        "--fd".into(),
        fd.to_string(),
    ];
    let mut daemon = Daemon::spawn_with(&d, &argv, |cmd| {
        // SAFETY: only fcntl, async-signal-safe, runs in the child between fork and exec;
        // it makes the inherited listener survive exec there (the parent's copy keeps
        // CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map(|_| ())
                .map_err(std::io::Error::from)
            });
        }
    });
    drop(listener);
    // The launcher's socket, now served by emudevd.
    let t0 = Instant::now();
    let mut c = loop {
        match Client::connect(&path) {
            Ok(c) => break c,
            Err(e) => {
                assert!(t0.elapsed() < WAIT, "{e}; log:\n{}", daemon.log());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    c.negotiate().unwrap();
    let id = c.region_read(0, emudev::testdev::regs::ID, 4).unwrap();
    assert_eq!(id, emudev::testdev::regs::MAGIC.to_le_bytes());
    drop(c);
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
    // The launcher owns the socket file: emudevd leaves it.
    assert!(path.exists());
}

#[test]
fn ready_only_after_listening_and_sigterm_cleans_up() {
    let d = TempDir::new("ready");
    let notify = d.path("notify");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let img = d.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let argv = vec![
        "--device".into(),
        format!("testdev,socket={}", d.s("t.sock")),
        "--device".into(),
        format!(
            "virtio-blk,id=vda,socket={},path={}",
            d.s("vda.sock"),
            img.display()
        ),
        "--pidfile".into(),
        d.s("emudevd.pid"),
        "--control".into(),
        d.s("ctl.sock"),
    ];
    let mut daemon = Daemon::spawn_with(&d, &argv, |cmd| {
        cmd.env("NOTIFY_SOCKET", &notify);
    });
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("READY=1 within 10 s");
    assert_eq!(&buf[..n], b"READY=1");
    // At READY, every socket listens already and the pidfile is written.
    for s in ["t.sock", "vda.sock", "ctl.sock"] {
        let p = d.path(s);
        UnixStream::connect(&p).unwrap_or_else(|e| panic!("{s} not listening at READY: {e}"));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{s}");
    }
    let pid = std::fs::read_to_string(d.path("emudevd.pid")).unwrap();
    assert_eq!(pid.trim(), daemon.pid().to_string());

    let st = daemon.stop();
    assert!(st.success(), "exit {st}; log:\n{}", daemon.log());
    let n = rx.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let left: Vec<String> = d
        .entries()
        .into_iter()
        .filter(|e| !["notify", "stderr", "disk.img"].contains(&e.as_str()))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn sigint_stops_too() {
    let d = TempDir::new("int");
    let argv = vec![
        "--device".into(),
        format!("testdev,socket={}", d.s("t.sock")),
    ];
    let mut daemon = Daemon::spawn(&d, &argv);
    wait_listening(&mut daemon, &d.path("t.sock"));
    daemon.signal(nix::sys::signal::Signal::SIGINT);
    assert!(daemon.wait().success());
    assert!(!d.path("t.sock").exists());
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let d = TempDir::new("live");
    let sock = d.path("t.sock");
    let argv = vec![
        "--device".into(),
        format!("testdev,socket={}", sock.display()),
    ];
    let mut first = Daemon::spawn(&d, &argv);
    wait_listening(&mut first, &sock);

    let d2 = TempDir::new("live2");
    let (st, log) = run_to_end(&d2, &argv);
    assert!(!st.success());
    assert!(log.contains("another server is listening there"), "{log}");
    // The first daemon still serves its socket.
    let mut c = Client::connect(&sock).unwrap();
    c.negotiate().unwrap();
    drop(c);
    first.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = first.wait();
    // Killed: the socket file stays behind, stale. The next daemon replaces it.
    assert!(sock.exists());
    let mut second = Daemon::spawn(&d2, &argv);
    wait_listening(&mut second, &sock);
    let mut c = Client::connect(&sock).unwrap();
    c.negotiate().unwrap();
    drop(c);
    assert!(second.stop().success());
    assert!(!sock.exists());

    // A regular file is never replaced.
    std::fs::write(&sock, b"data").unwrap();
    let (st, log) = run_to_end(&d2, &argv);
    assert!(!st.success());
    assert!(log.contains("exists and is not a socket"), "{log}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"data");
}

#[test]
fn devices_and_settings_come_from_a_toml_config_file() {
    let d = TempDir::new("toml");
    let conf = d.path("emudev.toml");
    std::fs::write(
        &conf,
        format!(
            "control = \"{}\"\npidfile = \"{}\"\n\n[[device]]\ntype = \"testdev\"\nsocket = \"{}\"\nid = \"td\"\n",
            d.s("ctl.sock"),
            d.s("pid"),
            d.s("t.sock")
        ),
    )
    .unwrap();
    // A device from the command line joins the file's.
    let argv = vec![
        "--config".into(),
        conf.display().to_string(),
        "--device".into(),
        format!("testdev,socket={}", d.s("u.sock")),
    ];
    let mut daemon = Daemon::spawn(&d, &argv);
    wait_listening(&mut daemon, &d.path("t.sock"));
    wait_listening(&mut daemon, &d.path("u.sock"));
    wait_listening(&mut daemon, &d.path("ctl.sock"));
    let mut ctl = Ctl::connect(&d.path("ctl.sock"));
    let r = ctl.call(serde_json::json!({"execute": "query-devices"}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"td"), "{r}");
    assert_eq!(names.len(), 2, "{r}");
    assert!(d.path("pid").exists());
    assert!(daemon.stop().success());
    assert!(!d.path("t.sock").exists() && !d.path("pid").exists());

    // A bad file fails before anything is created, naming the file and the key.
    std::fs::write(
        &conf,
        format!(
            "[[device]]\ntype = \"testdev\"\nsocket = \"{}\"\nbogus = 1\n",
            d.s("t.sock")
        ),
    )
    .unwrap();
    let (st, log) = run_to_end(&d, &["--config".into(), conf.display().to_string()]);
    assert!(!st.success());
    assert!(log.contains("unknown option 'bogus'"), "{log}");
    assert!(!d.path("t.sock").exists());
}
