//! Runs our vfio-user [`Server`] with a [`TestDevice`] on a thread, on a socket in a fresh
//! temporary directory, and stops it when dropped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use emudev_vfio_user::{Server, ServerError, ServerHandle, ServerOptions};

use crate::device::{DeviceHandle, TestDevice};
use crate::raw::{RawClient, RawError};

/// A unique, empty temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> std::io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("emudev-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server.
pub struct TestServer {
    pub path: PathBuf,
    pub handle: ServerHandle,
    pub dev: DeviceHandle,
    join: Option<JoinHandle<Result<TestDevice, ServerError>>>,
    _dir: TempDir,
}

impl TestServer {
    /// Server with the default test device and options.
    pub fn start() -> Self {
        let (dev, h) = TestDevice::new();
        Self::start_with(dev, h, ServerOptions::default())
    }

    /// Server with a given device (and its handle) and options.
    pub fn start_with(dev: TestDevice, h: DeviceHandle, options: ServerOptions) -> Self {
        let dir = TempDir::new("srv").expect("temp dir");
        let path = dir.0.join("vfio-user.sock");
        let server = Server::bind(&path, dev, options).expect("bind server");
        let (handle, join) = server.spawn();
        Self {
            path,
            handle,
            dev: h,
            join: Some(join),
            _dir: dir,
        }
    }

    /// A raw client connection (not yet negotiated).
    pub fn connect(&self) -> RawClient {
        RawClient::connect(&self.path).expect("connect")
    }

    /// A raw client after a successful VERSION with QEMU's capabilities.
    pub fn connect_negotiated(&self) -> RawClient {
        let c = self.connect();
        c.negotiate().expect("VERSION");
        c
    }

    /// Wait until `f` holds for the device state (the server works asynchronously to
    /// disconnects), at most 5 s.
    pub fn wait_for(&self, what: &str, f: impl Fn(&crate::device::DeviceState) -> bool) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if f(&self.dev.lock()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("timed out waiting for: {what}");
    }

    /// Stop the server and return its device (panics if the server thread failed).
    pub fn stop(mut self) -> TestDevice {
        self.handle.shutdown();
        let j = self.join.take().expect("joined once");
        match j.join() {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => panic!("server failed: {e}"),
            Err(_) => panic!("server thread panicked"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(j) = self.join.take() {
            self.handle.shutdown();
            let r = j.join();
            if !std::thread::panicking() {
                assert!(r.is_ok(), "server thread panicked");
            }
        }
    }
}

/// Connect and negotiate, retrying for up to 2 s: right after a client closes, the server
/// may not have seen its EOF yet and refuses the newcomer as a second concurrent client.
pub fn connect_retry(path: &std::path::Path) -> Result<RawClient, RawError> {
    let t = Instant::now();
    loop {
        let r = RawClient::connect(path).and_then(|c| c.negotiate().map(|_| c));
        match r {
            Ok(c) => return Ok(c),
            Err(e) if t.elapsed() > Duration::from_secs(2) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}
