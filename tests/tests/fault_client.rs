//! Client faults against a live vfio-user server running virtio-blk over a raw image file
//! in this process (the server thread is what emudevd runs per device):
//! - our client (the demo virtio-blk driver of emudev-examples) runs in a child process and
//!   is SIGKILLed while requests are in flight; the server accepts the next client, and every
//!   write the child saw acknowledged (whole passes it reported done, each verified by a
//!   read-back) is in the image;
//! - 1000 connect / negotiate / DMA_MAP / disconnect cycles leave the fd count and RSS of
//!   this process (which runs the server) flat.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use emudev::VfioUserAdapter;
use emudev_blk::backend::raw::{RawFile, RawFileOptions};
use emudev_blk::backend::BlockBackend;
use emudev_blk::config::BlkOptions;
use emudev_blk::device::VirtioBlkDevice;
use emudev_examples::demo::{blk, pattern};
use emudev_tests::raw::{memfd, open_fds};
use emudev_vfio_user::{Client, Server, ServerHandle, ServerOptions};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::poller::PollerPool;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const CHILD_ENV: &str = "EMUDEV_FAULT_CLIENT_SOCK";
/// Sectors per pass of the child; passes cover disjoint ranges.
const PASS: u64 = 64;
const SEED: u64 = 0x5eed_0001;
const IMAGE: u64 = 16 << 20;

/// fd and RSS counts are per process: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Served {
    dir: PathBuf,
    sock: PathBuf,
    image: PathBuf,
    handle: ServerHandle,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("emudev-fault-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("blk.sock");
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE))
            .expect("image");
        let backend: Arc<dyn BlockBackend> =
            Arc::new(RawFile::open(&image, &RawFileOptions::default()).expect("open image"));
        let pool = PollerPool::new(1).expect("pool");
        let blk = VirtioBlkDevice::new(backend, BlkOptions::default(), pool).expect("blk");
        let pci = VirtioPciDevice::new("fault-blk", blk).expect("virtio-pci");
        let server =
            Server::bind(&sock, VfioUserAdapter::new(pci), ServerOptions::default()).expect("bind");
        let (handle, join) = server.spawn();
        let join = std::thread::spawn(move || {
            let _ = join.join();
        });
        Self {
            dir,
            sock,
            image,
            handle,
            join: Some(join),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn opts(first: u64, sectors: u64) -> blk::BlkOptions {
    blk::BlkOptions {
        sectors,
        first_sector: first,
        sectors_per_request: 8,
        depth: 8,
        seed: SEED,
        verbose: false,
    }
}

fn check_range(image: &Path, first: u64, sectors: u64) {
    let img = std::fs::read(image).expect("read image");
    let (a, b) = ((first * 512) as usize, ((first + sectors) * 512) as usize);
    let mut want = vec![0u8; b - a];
    pattern(SEED, first, &mut want);
    assert!(
        img[a..b] == want[..],
        "acknowledged sectors {first}..{} not in the image",
        first + sectors
    );
}

/// The child: passes of write + read-back over disjoint ranges until killed, reporting
/// each completed pass on stdout. Runs only when spawned by `client_killed_mid_io`.
#[test]
#[ignore = "child process of client_killed_mid_io"]
fn child_client() {
    let Ok(sock) = std::env::var(CHILD_ENV) else {
        return;
    };
    let passes = IMAGE / 512 / PASS;
    for i in 0..passes {
        let first = i * PASS;
        blk::run(Path::new(&sock), &opts(first, PASS)).expect("demo pass");
        println!("DONE {first} {PASS}");
    }
}

#[test]
fn client_killed_mid_io() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Served::start("kill");
    for round in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "child_client",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &s.sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child client");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut done = Vec::new();
        let start = Instant::now();
        for line in out.lines() {
            let line = line.expect("child stdout");
            if let Some(rest) = line.strip_prefix("DONE ") {
                let mut it = rest.split(' ').map(|v| v.parse::<u64>().expect("number"));
                done.push((it.next().expect("first"), it.next().expect("n")));
                if done.len() as u64 >= 3 + round {
                    // Let the next pass get its requests in flight, then kill.
                    std::thread::sleep(Duration::from_millis(2 + 3 * round));
                    break;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(60), "child too slow");
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill child");
        let st = child.wait().expect("wait child");
        assert!(!st.success(), "child finished before the kill");
        assert!(!done.is_empty(), "child completed no pass");
        // Every pass the child saw acknowledged is in the image.
        for &(first, n) in &done {
            check_range(&s.image, first, n);
        }
        // The server takes the next client: a full pass over a range past the child's.
        let first = (IMAGE / 512) - PASS * (round + 1);
        let r = blk::run(&s.sock, &opts(first, PASS)).expect("next client after the kill");
        assert_eq!(r.write.requests, PASS / 8);
        check_range(&s.image, first, PASS);
    }
}

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn cycle(sock: &Path, ram: &std::os::fd::OwnedFd) {
    use std::os::fd::AsFd;
    let mut c = Client::connect(sock).expect("connect");
    c.negotiate().expect("negotiate");
    c.dma_map(0, 1 << 20, 3, Some((ram.as_fd(), 0)))
        .expect("dma map");
    c.get_info().expect("get info");
    drop(c);
}

#[test]
fn thousand_connect_disconnect_cycles_stay_flat() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Served::start("cycles");
    let ram = memfd(1 << 20);
    // Warm up: first-use allocations (thread stacks, caches) are not leaks.
    for _ in 0..50 {
        cycle(&s.sock, &ram);
    }
    std::thread::sleep(Duration::from_millis(100));
    let (fds0, rss0) = (open_fds(), vm_rss_kib());
    for _ in 0..1000 {
        cycle(&s.sock, &ram);
    }
    // The server drops a connection asynchronously after our close.
    let mut fds1 = open_fds();
    for _ in 0..200 {
        if fds1 <= fds0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        fds1 = open_fds();
    }
    let rss1 = vm_rss_kib();
    eprintln!("fds {fds0} -> {fds1}, VmRSS {rss0} kB -> {rss1} kB");
    assert_eq!(fds1, fds0, "fd count after 1000 cycles");
    assert!(
        rss1 < rss0 + 4096,
        "RSS grew by {} kB over 1000 cycles",
        rss1.saturating_sub(rss0)
    );
}
