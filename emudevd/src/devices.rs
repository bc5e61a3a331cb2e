//! Building devices from their specifications and serving them.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;

use std::sync::Arc;

use emudev::testdev::TestDevice;
use emudev::VfioUserAdapter;
use emudev_blk::backend::null::NullBackend;
use emudev_blk::backend::raw::{RawFile, RawFileOptions};
use emudev_blk::backend::BlockBackend;
use emudev_blk::config::BlkOptions;
use emudev_blk::device::VirtioBlkDevice;
use emudev_vfio_user::{Server, ServerHandle, ServerOptions};
use emudev_virtio::pci::VirtioPciDevice;
use emudev_virtio::poller::PollerPool;

use crate::config::{BlkBackendSpec, BlkSpec, DeviceKind, DeviceSpec};

/// A device checked and ready to build.
pub struct Prepared {
    spec: DeviceSpec,
}

/// Check a device's configuration and backing resources before anything is created.
pub fn prepare(spec: &DeviceSpec) -> Result<Prepared, String> {
    match &spec.kind {
        DeviceKind::TestDev => {}
        DeviceKind::VirtioBlk(b) => {
            if let crate::config::BlkBackendSpec::File { path, .. } = &b.backend {
                let md = std::fs::metadata(path).map_err(|e| {
                    format!("device {} (virtio-blk): path {}: {e}", spec.index, path.display())
                })?;
                if !md.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()) {
                    return Err(format!(
                        "device {} (virtio-blk): path {}: not a regular file or block device",
                        spec.index,
                        path.display()
                    ));
                }
            }
        }
    }
    Ok(Prepared { spec: spec.clone() })
}

struct Served {
    name: String,
    path: Option<PathBuf>,
    handle: ServerHandle,
    thread: JoinHandle<()>,
}

/// Every served device.
pub struct Running {
    served: Vec<Served>,
}

impl Running {
    /// Stop every server (clients disconnected, devices quiesced), join, remove sockets.
    pub fn shutdown(self) {
        for s in &self.served {
            s.handle.shutdown();
        }
        for s in self.served {
            if s.thread.join().is_err() {
                log::error!("{}: server thread panicked", s.name);
            }
            if let Some(p) = s.path {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn serve<D: emudev::DeviceModel + 'static>(
    name: String,
    dev: D,
    listener: UnixListener,
    path: Option<PathBuf>,
) -> Result<Served, String> {
    let server = Server::from_listener(listener, VfioUserAdapter::new(dev), ServerOptions::default())
        .map_err(|e| format!("{name}: {e}"))?;
    let (handle, join) = server.spawn();
    let n = name.clone();
    let thread = std::thread::Builder::new()
        .name(format!("wait-{name}"))
        .spawn(move || match join.join() {
            Ok(Ok(_)) => log::info!("{n}: server stopped"),
            Ok(Err(e)) => log::error!("{n}: server failed: {e}"),
            Err(_) => log::error!("{n}: server thread panicked"),
        })
        .map_err(|e| format!("{name}: {e}"))?;
    if let Some(p) = &path {
        log::info!("{name}: serving on {}", p.display());
    }
    Ok(Served {
        name,
        path,
        handle,
        thread,
    })
}

fn virtio_blk(name: &str, b: &BlkSpec, pool: &Arc<PollerPool>) -> Result<VirtioPciDevice<VirtioBlkDevice>, String> {
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
            .map_err(|e| format!("{name}: {e}"))?,
        ),
        BlkBackendSpec::Null { size } => Arc::new(NullBackend::new(*size).with_id(&b.serial)),
    };
    let opts = BlkOptions {
        num_queues: b.num_queues,
        read_only: b.readonly,
        queue_size: b.queue_size,
        ..BlkOptions::default()
    };
    let dev = VirtioBlkDevice::new(backend, opts, pool.clone()).map_err(|e| format!("{name}: {e}"))?;
    VirtioPciDevice::new(name, dev).map_err(|e| format!("{name}: {e}"))
}

/// Build and serve every device. On failure, what was started is stopped again.
pub fn start(
    prepared: Vec<Prepared>,
    listeners: Vec<(UnixListener, Option<PathBuf>)>,
    pollers: usize,
) -> Result<Running, String> {
    let mut running = Running { served: Vec::new() };
    let pool = PollerPool::new(pollers).map_err(|e| format!("cannot start poller threads: {e}"))?;
    for (p, (listener, path)) in prepared.into_iter().zip(listeners) {
        let name = format!("{}{}", p.spec.kind.type_name(), p.spec.index);
        let r = match &p.spec.kind {
            DeviceKind::TestDev => TestDevice::new(&name)
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|d| serve(name.clone(), d, listener, path.clone())),
            DeviceKind::VirtioBlk(b) => virtio_blk(&name, b, &pool)
                .and_then(|d| serve(name.clone(), d, listener, path.clone())),
        };
        match r {
            Ok(s) => running.served.push(s),
            Err(e) => {
                if let Some(p) = path {
                    let _ = std::fs::remove_file(p);
                }
                running.shutdown();
                return Err(e);
            }
        }
    }
    Ok(running)
}
