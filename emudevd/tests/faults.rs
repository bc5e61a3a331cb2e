//! Faults around the daemon process (issue #9): emudevd killed with SIGKILL while a client
//! is attached and restarted; a client killed with SIGKILL mid-I/O. Our client stands in for
//! QEMU (the QEMU-specific parts are the guest cases `case-daemon-restart.sh` and
//! `case-qemu-kill.sh`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use emudev_examples::demo::{self, blk};
use nix::sys::signal::Signal;
use serde_json::json;

/// Set in the environment of a re-executed test binary: it then runs the I/O client below
/// on this socket until killed.
const CLIENT_ENV: &str = "EMUDEVD_FAULT_TEST_CLIENT";

fn blk_opts(first_sector: u64, sectors: u64, seed: u64) -> blk::BlkOptions {
    blk::BlkOptions {
        sectors,
        first_sector,
        sectors_per_request: 8,
        depth: 8,
        seed,
        verbose: false,
    }
}

fn image(d: &TempDir, mib: u64) -> std::path::PathBuf {
    let img = d.path("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    img
}

fn blk_daemon_args(d: &TempDir, img: &Path) -> Vec<String> {
    vec![
        "--device".into(),
        format!(
            "virtio-blk,id=vda,socket={},path={}",
            d.s("vda.sock"),
            img.display()
        ),
        "--control".into(),
        d.s("ctl.sock"),
    ]
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Mappings of the demo client's guest RAM (a memfd named demo-ram) in `pid`.
fn guest_ram_maps(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("memfd:demo-ram"))
        .count()
}

/// Wait until `f` holds, at most `WAIT`; whether it did.
fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > WAIT {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Wait until `f` holds, at most `WAIT`.
fn wait_for(what: &str, f: impl FnMut() -> bool) {
    assert!(wait_until(f), "timed out waiting for {what}");
}

/// What `pid`'s fds point to, for failure messages.
fn fd_list(pid: i32) -> String {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    let t = std::fs::read_link(e.path()).unwrap_or_default();
                    format!("{}->{}", e.file_name().to_string_lossy(), t.display())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.join(" ")
}

fn requests(ctl: &mut Ctl) -> u64 {
    let v = ctl.call(json!({"execute": "query-stats", "arguments": {"device": "vda"}}));
    v["return"]["devices"][0]["queues"]
        .as_array()
        .map_or(0, |q| q.iter().filter_map(|x| x["requests"].as_u64()).sum())
}

/// Not a test on its own: the client process the SIGKILL test re-executes this binary as.
#[test]
fn fault_client_process() {
    let Ok(sock) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let mut seed = 1000;
    loop {
        if let Err(e) = blk::run(Path::new(&sock), &blk_opts(0, 16384, seed)) {
            eprintln!("client: {e}");
            std::process::exit(3);
        }
        seed += 1;
    }
}

#[test]
fn a_client_killed_mid_io_is_cleaned_up_and_the_next_is_served() {
    let d = TempDir::new("fault-client");
    let img = image(&d, 16);
    let mut daemon = Daemon::spawn(&d, &blk_daemon_args(&d, &img));
    wait_listening(&mut daemon, &d.path("ctl.sock"));
    let pid = daemon.pid();
    let vda = d.path("vda.sock");

    // What is open with no client is the steady state, and a clean client returns to it.
    let mut ctl = Ctl::connect(&d.path("ctl.sock"));
    // wait_listening's probe of the control socket has gone: only our connection is left.
    wait_for("the probe connection to close", || {
        accepted_on(pid, &d.path("ctl.sock")) == 1
    });
    let base_fds = fd_count(pid);
    let base_list = fd_list(pid);
    blk::run(&vda, &blk_opts(0, 512, 1)).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    wait_for("a clean client's fds to be released", || {
        fd_count(pid) == base_fds
    });
    assert_eq!(guest_ram_maps(pid), 0);

    let mut client = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fault_client_process", "--nocapture"])
        .env(CLIENT_ENV, &vda)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Mid-I/O: requests are flowing and the client's RAM is mapped in the daemon.
    let r0 = requests(&mut ctl);
    wait_for("the client's I/O", || {
        requests(&mut ctl) > r0 + 200 && guest_ram_maps(pid) > 0
    });
    assert!(
        fd_count(pid) > base_fds,
        "the client's fds are not in the daemon"
    );
    client.kill().unwrap();
    client.wait().unwrap();

    // The daemon stays up, drops the client's maps and fds...
    let released = || fd_count(pid) == base_fds && guest_ram_maps(pid) == 0;
    if !wait_until(released) {
        panic!(
            "the client's fds and maps were not released: {} fds (steady {base_fds}), {} maps\n\
             fds: {}\nsteady fds: {base_list}\nlog:\n{}",
            fd_count(pid),
            guest_ram_maps(pid),
            fd_list(pid),
            daemon.log()
        );
    }
    assert!(daemon.child.try_wait().unwrap().is_none(), "emudevd died");
    let v = ctl.call(json!({"execute": "query-devices"}));
    assert_eq!(v["return"][0]["serving"], true, "{v}");
    // ... and serves the next client, whose data is verified.
    blk::run(&vda, &blk_opts(4096, 2048, 2)).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    // Its connection was still open when run() returned: equal again means cleaned up.
    if !wait_until(|| fd_count(pid) == base_fds) {
        panic!(
            "{} fds (steady {base_fds}): {}\nlog:\n{}",
            fd_count(pid),
            fd_list(pid),
            daemon.log()
        );
    }
    drop(ctl);
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[test]
fn a_daemon_killed_under_a_client_fails_it_and_a_restart_serves_a_fresh_one() {
    let d = TempDir::new("fault-daemon");
    let img = image(&d, 16);
    let args = blk_daemon_args(&d, &img);
    let vda = d.path("vda.sock");
    let mut daemon = Daemon::spawn(&d, &args);
    wait_listening(&mut daemon, &d.path("ctl.sock"));

    // Acknowledged writes before the kill.
    blk::run(&vda, &blk_opts(0, 2048, 11)).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    // A client attached (negotiated, RAM mapped) when the daemon dies.
    let mut c = emudev_vfio_user::Client::connect(&vda).unwrap();
    c.negotiate().unwrap();
    let ram = demo_ram();
    c.dma_map(
        0,
        1 << 20,
        emudev_vfio_user::wire::dma_flags::READ | emudev_vfio_user::wire::dma_flags::WRITE,
        Some((std::os::fd::AsFd::as_fd(&ram), 0)),
    )
    .unwrap();
    daemon.signal(Signal::SIGKILL);
    assert!(!daemon.wait().success());

    // The client's next request fails promptly: no hang.
    let t0 = Instant::now();
    assert!(c.region_read(0, 0, 4).is_err(), "a dead server answered");
    assert!(t0.elapsed() < Duration::from_secs(5));
    drop(c);

    // The socket file is stale now (nobody listens): a restart replaces it and serves.
    assert!(vda.exists());
    let mut daemon = Daemon::spawn(&d, &args);
    wait_listening(&mut daemon, &vda);
    assert!(
        daemon.log().contains("replacing stale socket") || wait_log(&daemon, "replacing stale"),
        "{}",
        daemon.log()
    );
    blk::run(&vda, &blk_opts(4096, 2048, 12)).unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());

    // Both runs' data are on the image: the kill lost no acknowledged write.
    let bytes = std::fs::read(&img).unwrap();
    for (first, seed) in [(0u64, 11u64), (4096, 12)] {
        let mut want = vec![0u8; 2048 * 512];
        demo::pattern(seed, first, &mut want);
        let at = (first * 512) as usize;
        assert!(
            bytes[at..at + want.len()] == want[..],
            "data of seed {seed} missing"
        );
    }
}

fn wait_log(d: &Daemon, what: &str) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < WAIT {
        if d.log().contains(what) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// 1 MiB of memfd to map into the server.
fn demo_ram() -> std::os::fd::OwnedFd {
    emudev::transport::inproc::memfd("demo-ram", 1 << 20).unwrap()
}

/// Connections accepted on the UNIX socket at `path` that `pid` holds open (not counting
/// the listening socket), from /proc/PID/fd and /proc/net/unix.
fn accepted_on(pid: i32, path: &Path) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.to_string_lossy().into_owned();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let path = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
            f.len() == 8 && f[3] != "00010000" && f[7] == path && inodes.iter().any(|i| i == f[6])
        })
        .count()
}

#[test]
fn a_closed_control_connection_releases_its_fds_at_once() {
    let d = TempDir::new("fault-ctl");
    let ctl_path = d.path("ctl.sock");
    let argv = vec![
        "--device".into(),
        format!("testdev,socket={}", d.s("t.sock")),
        "--control".into(),
        d.s("ctl.sock"),
    ];
    let mut daemon = Daemon::spawn(&d, &argv);
    wait_listening(&mut daemon, &ctl_path);
    let pid = daemon.pid();
    let ctl = Ctl::connect(&ctl_path);
    assert!(wait_until(|| accepted_on(pid, &ctl_path) >= 1));
    drop(ctl);
    for _ in 0..20 {
        let mut ctl = Ctl::connect(&ctl_path);
        let v = ctl.call(json!({"execute": "query-devices"}));
        assert!(v.get("return").is_some(), "{v}");
    }
    // No further connection comes to reap them: each client released its own.
    let released = wait_until(|| accepted_on(pid, &ctl_path) == 0);
    assert!(
        released,
        "{} control connections still open: {}",
        accepted_on(pid, &ctl_path),
        fd_list(pid)
    );
    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
}
