//! The served devices: built from their specifications, each served on its own vfio-user
//! socket by its own thread, added and removed at runtime, and read for statistics.
//!
//! We keep our own registry rather than `emudev::DeviceManager` because the manager erases
//! the device type, and statistics need the typed device (`VirtioPciDevice::stats`,
//! `VirtioBlkDevice::queue_stats`) and the block backend (flushed on removal).

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use emudev::device::DeviceError as ModelError;
use emudev::lifecycle::{guarded, StateCell};
use emudev::testdev::{regs, TestDevice};
use emudev::{DeviceModel, DeviceState, VfioUserAdapter};
use emudev_blk::backend::null::NullBackend;
use emudev_blk::backend::raw::{RawFile, RawFileOptions};
use emudev_blk::backend::BlockBackend;
use emudev_blk::config::BlkOptions;
use emudev_blk::device::VirtioBlkDevice;
use emudev_vfio_user::{Server, ServerHandle, ServerOptions};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::poller::PollerPool;

use crate::config::{
    self, BlkBackendSpec, BlkSpec, ConfigError, DeviceKind, DeviceSpec, VhostDevice, VhostSpec,
};
use crate::sockets::{self, SocketError};

/// Why a device could not be added, removed or changed. Every message names the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("device {0}: a device with this name exists")]
    Exists(String),
    #[error("device {name}: socket {path} is used by device {other}")]
    SocketInUse {
        name: String,
        path: String,
        other: String,
    },
    #[error("device {name}: socket=fd:N is only for the command line (--fd)")]
    FdAtRuntime { name: String },
    #[error("no device named {0}")]
    NotFound(String),
    #[error("device {name} ({kind}): {reason}")]
    Build {
        name: String,
        kind: &'static str,
        reason: String,
    },
    #[error("device {name}: {source}")]
    Socket { name: String, source: SocketError },
    #[error("device {name} ({kind}) has no link")]
    NoLink { name: String, kind: &'static str },
    #[error("device {name}: {reason}")]
    Attr { name: String, reason: String },
}

/// Check a device's configuration and backing resources before anything is created.
pub fn prepare(spec: &DeviceSpec) -> Result<(), DeviceError> {
    if let DeviceKind::VirtioBlk(BlkSpec {
        backend: BlkBackendSpec::File { path, .. },
        ..
    }) = &spec.kind
    {
        let build = |reason: String| DeviceError::Build {
            name: spec.name(),
            kind: spec.kind.type_name(),
            reason,
        };
        let md =
            std::fs::metadata(path).map_err(|e| build(format!("path {}: {e}", path.display())))?;
        if !md.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()) {
            return Err(build(format!(
                "path {}: not a regular file or block device",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The typed handle statistics are read from.
#[derive(Clone)]
enum Typed {
    Blk(Arc<Mutex<VirtioPciDevice<VirtioBlkDevice>>>),
    Net(Arc<Mutex<VirtioPciDevice<emudev_net::VirtioNetDevice>>>),
    Avf,
    TestDev,
    /// Bridged to a vhost-user backend: transport and connection counters (the backend
    /// keeps its own request statistics).
    Vhost(Arc<Mutex<VirtioPciDevice<emudev_vhost::VhostUserDevice>>>),
}

struct Served {
    spec: DeviceSpec,
    /// The socket file we created (None for an inherited `--fd`); removed with the device.
    socket_file: Option<PathBuf>,
    state: StateCell,
    model: Arc<Mutex<dyn DeviceModel>>,
    typed: Typed,
    backend: Option<Arc<dyn BlockBackend>>,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl Served {
    /// Stop the server (client disconnected, device stopped), join it, flush the backend and
    /// remove the socket file.
    fn stop(mut self) {
        let name = self.spec.name();
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("{name}: server thread panicked");
            }
        }
        if let Some(b) = &self.backend {
            if let Err(e) = b.flush() {
                log::error!("{name}: flushing the block backend failed: {e}");
            }
        }
        if let Some(p) = &self.socket_file {
            if let Err(e) = std::fs::remove_file(p) {
                log::warn!("{name}: cannot remove socket {}: {e}", p.display());
            }
        }
        log::info!("{name}: removed");
    }
}

/// What `query-devices` reports about one device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: &'static str,
    /// The socket path, or `fd:N` for an inherited socket.
    pub socket: String,
    pub state: DeviceState,
    /// The serving thread is alive.
    pub serving: bool,
}

/// Counters of one virtqueue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStat {
    pub index: u16,
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub kicks: u64,
    pub interrupts: u64,
}

/// Counters of one device: per queue, plus device-wide named counters.
#[derive(Debug, Clone)]
pub struct DeviceStat {
    pub name: String,
    pub kind: &'static str,
    pub state: DeviceState,
    pub queues: Vec<QueueStat>,
    pub counters: Vec<(&'static str, u64)>,
}

/// Counters of one poller thread (shared by every virtio device).
#[derive(Debug, Clone, Default)]
pub struct PollerStat {
    pub thread: usize,
    pub iterations: u64,
    pub sleeps: u64,
    pub poll_ns: u64,
    pub sleep_ns: u64,
    pub cpu_ns: Option<u64>,
}

/// Every served device, by name.
pub struct Registry {
    pool: Arc<PollerPool>,
    /// The emudev polling thread all AVF datapaths share (`avf-dp`), started with the first
    /// AVF device.
    avf_pool: Mutex<Option<Arc<emudev::poller::PollerPool>>>,
    group: Option<u32>,
    devices: Mutex<BTreeMap<String, Served>>,
    /// Index of the next runtime-added device (after the command line's).
    next_index: AtomicUsize,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// A registry whose virtio devices share `pollers` poller threads; sockets it creates are
    /// 0600, or 0660 with `group`. `first_index` numbers runtime-added devices.
    pub fn new(pollers: usize, group: Option<u32>, first_index: usize) -> Result<Self, String> {
        let pool =
            PollerPool::new(pollers).map_err(|e| format!("cannot start poller threads: {e}"))?;
        Ok(Self {
            pool,
            avf_pool: Mutex::new(None),
            group,
            devices: Mutex::new(BTreeMap::new()),
            next_index: AtomicUsize::new(first_index),
        })
    }

    /// The shared AVF datapath pool, started on first use (one thread: AVF passes are
    /// short, and the virtio pollers keep their own threads).
    fn avf_pool(&self) -> Result<Arc<emudev::poller::PollerPool>, String> {
        let mut p = lock(&self.avf_pool);
        if let Some(pool) = p.as_ref() {
            return Ok(pool.clone());
        }
        let pool =
            emudev::poller::PollerPool::named("avf-dp", 1, emudev::poller::PollConfig::default())
                .map_err(|e| e.to_string())?;
        *p = Some(pool.clone());
        Ok(pool)
    }

    /// Serve a checked device on a listening socket. `socket_file` is removed when the device
    /// is, and also if this fails.
    pub fn add_listening(
        &self,
        spec: DeviceSpec,
        listener: UnixListener,
        socket_file: Option<PathBuf>,
    ) -> Result<(), DeviceError> {
        let mut map = lock(&self.devices);
        let r = self.insert(&mut map, spec, listener, socket_file.clone());
        if r.is_err() {
            if let Some(p) = socket_file {
                let _ = std::fs::remove_file(p);
            }
        }
        r
    }

    /// Parse, check, bind and serve a device at runtime (`device-add`). Returns its name.
    pub fn add_spec(&self, arg: &str) -> Result<String, DeviceError> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let spec = config::parse_device(index, arg)?;
        let name = spec.name();
        if spec.socket.to_string_lossy().starts_with("fd:") {
            return Err(DeviceError::FdAtRuntime { name });
        }
        // Held across bind and insert, so two concurrent adds cannot both take a name.
        let mut map = lock(&self.devices);
        if map.contains_key(&name) {
            return Err(DeviceError::Exists(name));
        }
        if let Some(other) = map.values().find(|s| s.spec.socket == spec.socket) {
            return Err(DeviceError::SocketInUse {
                name,
                path: spec.socket.display().to_string(),
                other: other.spec.name(),
            });
        }
        prepare(&spec)?;
        let listener =
            sockets::bind(&spec.socket, self.group).map_err(|source| DeviceError::Socket {
                name: name.clone(),
                source,
            })?;
        let path = spec.socket.clone();
        let r = self.insert(&mut map, spec, listener, Some(path.clone()));
        if r.is_err() {
            let _ = std::fs::remove_file(path);
        }
        r.map(|()| name)
    }

    fn insert(
        &self,
        map: &mut BTreeMap<String, Served>,
        spec: DeviceSpec,
        listener: UnixListener,
        socket_file: Option<PathBuf>,
    ) -> Result<(), DeviceError> {
        let name = spec.name();
        if map.contains_key(&name) {
            return Err(DeviceError::Exists(name));
        }
        let build = |reason: String| DeviceError::Build {
            name: name.clone(),
            kind: spec.kind.type_name(),
            reason,
        };
        let (model, typed, backend, (handle, thread, state)) = match &spec.kind {
            DeviceKind::TestDev => {
                let dev = TestDevice::new(&name).map_err(|e| build(e.to_string()))?;
                let adapter = VfioUserAdapter::new(dev);
                let (shared, run) = serve(&name, listener, adapter).map_err(build)?;
                let model: Arc<Mutex<dyn DeviceModel>> = shared;
                (model, Typed::TestDev, None, run)
            }
            DeviceKind::VirtioNet(n) => {
                let opts = emudev_net::NetOptions {
                    mac: n.mac,
                    queue_pairs: n.queue_pairs,
                    queue_size: n.queue_size,
                    mtu: n.mtu,
                    offloads: n.offloads,
                    ..Default::default()
                };
                let dev = emudev_net::virtio_net_pci(&name, &n.backend, opts, &self.pool)
                    .map_err(build)?;
                let adapter = VfioUserAdapter::new(dev);
                let (shared, run) = serve(&name, listener, adapter).map_err(build)?;
                let model: Arc<Mutex<dyn DeviceModel>> = shared.clone();
                (model, Typed::Net(shared), None, run)
            }
            DeviceKind::Avf(a) => {
                let backend = emudev_net::open_backend(&a.backend, a.queue_pairs)
                    .map_err(|e| build(e.to_string()))?;
                let cfg = emudev_avf::VfConfig {
                    mac: a.mac,
                    queue_pairs: a.queue_pairs,
                    link_speed_mbps: 25_000,
                };
                let pool = self.avf_pool().map_err(build)?;
                let dev = emudev_avf::AvfDevice::with_poller(&name, cfg, Some(backend), pool)
                    .map_err(|e| build(e.to_string()))?;
                let adapter = VfioUserAdapter::new(dev);
                let (shared, run) = serve(&name, listener, adapter).map_err(build)?;
                let model: Arc<Mutex<dyn DeviceModel>> = shared;
                (model, Typed::Avf, None, run)
            }
            DeviceKind::VhostUser(v) => {
                let dev = vhost_user(&name, v).map_err(build)?;
                let adapter = VfioUserAdapter::new(dev);
                let (shared, run) = serve(&name, listener, adapter).map_err(build)?;
                let model: Arc<Mutex<dyn DeviceModel>> = shared.clone();
                (model, Typed::Vhost(shared), None, run)
            }
            DeviceKind::VirtioBlk(b) => {
                let (dev, backend) = virtio_blk(&name, b, &self.pool).map_err(build)?;
                let mut adapter = VfioUserAdapter::new(dev);
                if b.tcg_boot {
                    // A boot disk under TCG: QEMU must see our writes below 1 MiB (boot
                    // sectors load code over code that already ran), so DMA_WRITE them.
                    adapter.set_message_writes_below(emudev::memory::LEGACY_LOW_MEM_END);
                }
                let (shared, run) = serve(&name, listener, adapter).map_err(build)?;
                let model: Arc<Mutex<dyn DeviceModel>> = shared.clone();
                (model, Typed::Blk(shared), Some(backend), run)
            }
        };
        match &socket_file {
            Some(p) => log::info!("{name}: serving on {}", p.display()),
            None => log::info!("{name}: serving on {}", spec.socket.display()),
        }
        map.insert(
            name,
            Served {
                spec,
                socket_file,
                state,
                model,
                typed,
                backend,
                handle,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// Stop serving `name`, flush its backend and remove its socket.
    pub fn remove(&self, name: &str) -> Result<(), DeviceError> {
        let s = lock(&self.devices)
            .remove(name)
            .ok_or_else(|| DeviceError::NotFound(name.to_string()))?;
        s.stop();
        Ok(())
    }

    /// Stop every device: all servers are told to stop first, then each is joined.
    pub fn shutdown(&self) {
        let all = std::mem::take(&mut *lock(&self.devices));
        for s in all.values() {
            s.handle.shutdown();
        }
        for (_, s) in all {
            s.stop();
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.devices).len()
    }

    /// True when no device is served.
    pub fn is_empty(&self) -> bool {
        lock(&self.devices).is_empty()
    }

    pub fn list(&self) -> Vec<DeviceInfo> {
        lock(&self.devices)
            .iter()
            .map(|(name, s)| DeviceInfo {
                name: name.clone(),
                kind: s.spec.kind.type_name(),
                socket: s.spec.socket.display().to_string(),
                state: s.state.get(),
                serving: s.thread.as_ref().is_some_and(|t| !t.is_finished()),
            })
            .collect()
    }

    /// Set a NIC's link up or down.
    pub fn set_link(&self, name: &str, up: bool) -> Result<(), DeviceError> {
        let (model, kind) = {
            let map = lock(&self.devices);
            let s = map
                .get(name)
                .ok_or_else(|| DeviceError::NotFound(name.to_string()))?;
            (s.model.clone(), s.spec.kind.type_name())
        };
        let r = guarded(|| lock(&model).set_attr("link", if up { "up" } else { "down" }));
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(ModelError::UnknownAttribute { .. })) => Err(DeviceError::NoLink {
                name: name.to_string(),
                kind,
            }),
            Ok(Err(e)) => Err(DeviceError::Attr {
                name: name.to_string(),
                reason: e.to_string(),
            }),
            Err(panic) => Err(DeviceError::Attr {
                name: name.to_string(),
                reason: format!("device panicked: {panic}"),
            }),
        }
    }

    /// Counters of every device (or only `only`).
    pub fn stats(&self, only: Option<&str>) -> Result<Vec<DeviceStat>, DeviceError> {
        struct Pick {
            name: String,
            kind: &'static str,
            state: DeviceState,
            model: Arc<Mutex<dyn DeviceModel>>,
            typed: Typed,
        }
        // Collected first, so device locks are not taken under the registry lock.
        let picked: Vec<Pick> = {
            let map = lock(&self.devices);
            if let Some(n) = only {
                if !map.contains_key(n) {
                    return Err(DeviceError::NotFound(n.to_string()));
                }
            }
            map.iter()
                .filter(|(n, _)| only.is_none_or(|o| o == n.as_str()))
                .map(|(n, s)| Pick {
                    name: n.clone(),
                    kind: s.spec.kind.type_name(),
                    state: s.state.get(),
                    model: s.model.clone(),
                    typed: s.typed.clone(),
                })
                .collect()
        };
        Ok(picked
            .into_iter()
            .map(|p| {
                let (queues, counters) = match &p.typed {
                    Typed::Blk(d) => blk_stats(d),
                    Typed::Net(d) => (Vec::new(), lock(d).device().named_stats()),
                    Typed::Avf => (Vec::new(), Vec::new()),
                    Typed::TestDev => (Vec::new(), testdev_stats(&p.model)),
                    Typed::Vhost(d) => vhost_stats(d),
                };
                DeviceStat {
                    name: p.name,
                    kind: p.kind,
                    state: p.state,
                    queues,
                    counters,
                }
            })
            .collect())
    }

    /// Counters of the poller threads.
    pub fn poller_stats(&self) -> Vec<PollerStat> {
        (0..self.pool.thread_count())
            .filter_map(|i| {
                let s = self.pool.thread_stats(i)?;
                let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                Some(PollerStat {
                    thread: i,
                    iterations: ld(&s.iterations),
                    sleeps: ld(&s.sleeps),
                    poll_ns: ld(&s.poll_ns),
                    sleep_ns: ld(&s.sleep_ns),
                    cpu_ns: self
                        .pool
                        .thread_cpu_time(i)
                        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                })
            })
            .collect()
    }
}

fn blk_stats(
    d: &Mutex<VirtioPciDevice<VirtioBlkDevice>>,
) -> (Vec<QueueStat>, Vec<(&'static str, u64)>) {
    let d = lock(d);
    let t = d.stats();
    let b = d.device().stats();
    let queues = t
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let qi = u16::try_from(i).unwrap_or(u16::MAX);
            let bs = d
                .device()
                .queue_stats(qi)
                .map(|s| s.snapshot())
                .unwrap_or_default();
            QueueStat {
                index: qi,
                requests: bs.requests,
                read_bytes: bs.read_bytes,
                write_bytes: bs.write_bytes,
                errors: q.errors + bs.io_errors + bs.malformed,
                kicks: q.kicks,
                interrupts: q.interrupts,
            }
        })
        .collect();
    let counters = vec![
        ("bar_reads", t.bar_reads),
        ("bar_writes", t.bar_writes),
        ("resets", t.resets),
        ("needs_reset", t.needs_reset),
        ("engine_timeouts", t.engine_timeouts),
        ("config_interrupts", t.config_interrupts),
        ("flushes", b.flushes),
        ("discards", b.discards),
        ("write_zeroes", b.write_zeroes),
        ("io_errors", b.io_errors),
        ("unsupported", b.unsupported),
        ("malformed", b.malformed),
        ("bounced", b.bounced),
    ];
    (queues, counters)
}

fn vhost_stats(
    d: &Mutex<VirtioPciDevice<emudev_vhost::VhostUserDevice>>,
) -> (Vec<QueueStat>, Vec<(&'static str, u64)>) {
    let d = lock(d);
    let t = d.stats();
    let queues = t
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| QueueStat {
            index: u16::try_from(i).unwrap_or(u16::MAX),
            errors: q.errors,
            kicks: q.kicks,
            interrupts: q.interrupts,
            ..QueueStat::default()
        })
        .collect();
    let b = d.device().backend();
    let (disconnects, reconnects) = b.connection_counts();
    let counters = vec![
        ("bar_reads", t.bar_reads),
        ("bar_writes", t.bar_writes),
        ("resets", t.resets),
        ("needs_reset", t.needs_reset),
        ("engine_timeouts", t.engine_timeouts),
        ("config_interrupts", t.config_interrupts),
        ("vhost_connected", u64::from(b.connected())),
        ("vhost_disconnects", disconnects),
        ("vhost_reconnects", reconnects),
    ];
    (queues, counters)
}

/// The test device's counters are registers; reading them has no side effect.
fn testdev_stats(model: &Mutex<dyn DeviceModel>) -> Vec<(&'static str, u64)> {
    let mut d = lock(model);
    let mut rd = |off: u64| {
        let mut b = [0u8; 4];
        d.bar_read(regs::REGS_BAR, off, &mut b);
        u64::from(u32::from_le_bytes(b))
    };
    vec![
        ("interrupts", rd(regs::IRQ_COUNT)),
        ("doorbells", rd(regs::DOORBELL_COUNT)),
        ("page_doorbells", rd(regs::PAGE_COUNT)),
        ("dma_passes", rd(regs::DMA_PASSES)),
        ("dma_errors", rd(regs::DMA_ERRORS)),
    ]
}

/// Serve `adapter` on `listener` from its own thread: the device's shared handle, and the
/// server's handle, thread and state cell.
#[allow(clippy::type_complexity)]
fn serve<D: DeviceModel + Send + 'static>(
    name: &str,
    listener: UnixListener,
    adapter: VfioUserAdapter<D>,
) -> Result<(Arc<Mutex<D>>, (ServerHandle, JoinHandle<()>, StateCell)), String> {
    let shared = adapter.device().clone();
    let st = adapter.state_cell().clone();
    let server = Server::from_listener(listener, adapter, ServerOptions::default())
        .map_err(|e| e.to_string())?;
    let run = Runner::new(server, st)
        .spawn(name)
        .map_err(|e| e.to_string())?;
    Ok((shared, run))
}

/// A server not yet running, with the state cell its adapter updates.
struct Runner<D: emudev_vfio_user::ServerDevice + Send + 'static> {
    server: Server<D>,
    state: StateCell,
}

impl<D: emudev_vfio_user::ServerDevice + Send + 'static> Runner<D> {
    fn new(server: Server<D>, state: StateCell) -> Self {
        Self { server, state }
    }

    /// Run the server on its own thread, behind a panic fence.
    fn spawn(self, name: &str) -> std::io::Result<(ServerHandle, JoinHandle<()>, StateCell)> {
        let Runner { mut server, state } = self;
        let handle = server.handle();
        let st = state.clone();
        let n = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("emudevd-{name}"))
            .spawn(move || match guarded(|| server.run()) {
                Ok(Ok(())) => log::info!("{n}: server stopped"),
                Ok(Err(e)) => {
                    log::error!("{n}: server failed: {e}");
                    st.set(DeviceState::Failed);
                }
                Err(msg) => {
                    log::error!("{n}: server thread panicked: {msg}");
                    st.set(DeviceState::Failed);
                }
            })?;
        Ok((handle, thread, state))
    }
}

fn virtio_blk(
    name: &str,
    b: &BlkSpec,
    pool: &Arc<PollerPool>,
) -> Result<(VirtioPciDevice<VirtioBlkDevice>, Arc<dyn BlockBackend>), String> {
    let backend: Arc<dyn BlockBackend> = match &b.backend {
        BlkBackendSpec::File { path, direct } => Arc::new(
            RawFile::open(
                path,
                &RawFileOptions {
                    read_only: b.readonly,
                    direct: *direct,
                    id: Some(b.serial.clone()),
                    ..RawFileOptions::default()
                },
            )
            .map_err(|e| e.to_string())?,
        ),
        BlkBackendSpec::Null { size } => Arc::new(NullBackend::new(*size).with_id(&b.serial)),
    };
    let opts = BlkOptions {
        num_queues: b.num_queues,
        read_only: b.readonly,
        queue_size: b.queue_size,
        ..BlkOptions::default()
    };
    let dev =
        VirtioBlkDevice::new(backend.clone(), opts, pool.clone()).map_err(|e| e.to_string())?;
    let pci = VirtioPciDevice::new(name, dev).map_err(|e| e.to_string())?;
    Ok((pci, backend))
}

/// A virtio device whose rings the vhost-user backend at `v.path` runs; fails when the
/// backend is not there.
fn vhost_user(
    name: &str,
    v: &VhostSpec,
) -> Result<VirtioPciDevice<emudev_vhost::VhostUserDevice>, String> {
    let kind = match &v.device {
        VhostDevice::Blk => emudev_vhost::VhostKind::Blk,
        VhostDevice::Fs {
            tag,
            request_queues,
        } => emudev_vhost::VhostKind::Fs {
            tag: tag.clone(),
            request_queues: *request_queues,
        },
    };
    let opts = emudev_vhost::VhostDeviceOptions {
        kind,
        queue_size: v.queue_size,
        backend: emudev_vhost::BackendOptions::default(),
    };
    let dev = emudev_vhost::VhostUserDevice::connect(name, &v.path, opts)
        .map_err(|e| format!("vhost-user backend {}: {e}", v.path.display()))?;
    VirtioPciDevice::new(name, dev).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vhost_user_device_without_its_backend_fails_naming_the_socket_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("emudevd-vhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let reg = Registry::new(1, None, 0).unwrap();
        let sock = dir.join("dev.sock");
        let spec = format!(
            "virtio-blk,id=vb,socket={},engine=vhost-user,path={}/absent.sock",
            sock.display(),
            dir.display()
        );
        let e = reg.add_spec(&spec).unwrap_err().to_string();
        assert!(
            e.starts_with("device vb (virtio-blk): vhost-user backend"),
            "{e}"
        );
        assert!(e.contains("absent.sock"), "{e}");
        assert!(reg.is_empty());
        assert!(!sock.exists(), "the failed device's socket was removed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn avf_devices_share_one_datapath_thread() {
        let dir = std::env::temp_dir().join(format!("emudevd-avf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let reg = Registry::new(1, None, 0).unwrap();
        assert!(
            lock(&reg.avf_pool).is_none(),
            "started only with an AVF device"
        );
        for id in ["vf0", "vf1"] {
            let spec = format!("avf,id={id},socket={}/{id}.sock", dir.display());
            reg.add_spec(&spec).unwrap();
        }
        let pool = lock(&reg.avf_pool).clone().unwrap();
        assert_eq!((pool.thread_count(), pool.task_count()), (1, 2));
        reg.remove("vf0").unwrap();
        assert_eq!(pool.task_count(), 1, "removal dropped the datapath task");
        reg.shutdown();
        assert_eq!(pool.task_count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
