//! [`DeviceManager`]: devices added and removed at runtime, each served on its own
//! vfio-user socket by its own thread.
//!
//! Isolation: each device call runs behind the adapter's panic fence (a panicking device
//! is marked Failed and answers EIO), and the serving thread itself runs behind
//! `catch_unwind`, so neither a device bug nor a protocol-layer bug in one device's thread
//! reaches another device. Removing a device stops its server (the client is disconnected,
//! the device detached) and joins its thread.

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use emudev_vfio_user::{Server, ServerError, ServerHandle, ServerOptions};

use crate::device::{DeviceError, DeviceModel, DeviceState};
use crate::events::{DeviceEvent, EventBus};
use crate::lifecycle::{guarded, StateCell};
use crate::transport::VfioUserAdapter;

/// Why a manager operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("a device named {0:?} already exists")]
    Exists(String),
    #[error("no device named {0:?}")]
    NotFound(String),
    #[error("{name}: cannot serve on {path}: {reason}")]
    Serve {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("{0}: device call panicked; the device is marked Failed")]
    Panicked(String),
}

/// What the manager reports about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub name: String,
    pub socket: PathBuf,
    pub state: DeviceState,
    /// The serving thread is still running.
    pub serving: bool,
}

struct Managed {
    socket: PathBuf,
    state: StateCell,
    events: Arc<EventBus>,
    device: Arc<Mutex<dyn DeviceModel>>,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl Managed {
    fn stop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!(
                    "device thread for {} panicked on exit",
                    self.socket.display()
                );
            }
        }
    }
}

/// Devices served over vfio-user, by name.
#[derive(Default)]
pub struct DeviceManager {
    devices: Mutex<BTreeMap<String, Managed>>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("devices", &self.lock().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Managed>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serve `dev` on a new socket at `socket`, on its own thread. The device's name is its
    /// key. The socket is listening when this returns and is removed with the device.
    pub fn add<D: DeviceModel + 'static>(
        &self,
        dev: D,
        socket: impl AsRef<Path>,
        options: ServerOptions,
    ) -> Result<(), ManagerError> {
        let path = socket.as_ref().to_path_buf();
        self.add_with(dev, Some(path.clone()), |adapter| {
            Server::bind(&path, adapter, options)
        })
    }

    /// Serve `dev` on an already-listening socket (socket activation, `--fd`). `path`, if
    /// known, is only reported; the caller owns the socket file.
    pub fn add_listener<D: DeviceModel + 'static>(
        &self,
        dev: D,
        listener: UnixListener,
        path: Option<PathBuf>,
        options: ServerOptions,
    ) -> Result<(), ManagerError> {
        self.add_with(dev, path, |adapter| {
            Server::from_listener(listener, adapter, options)
        })
    }

    fn add_with<D: DeviceModel + 'static>(
        &self,
        dev: D,
        path: Option<PathBuf>,
        make: impl FnOnce(VfioUserAdapter<D>) -> Result<Server<VfioUserAdapter<D>>, ServerError>,
    ) -> Result<(), ManagerError> {
        let name = dev.name().to_string();
        let shown = path.clone().unwrap_or_default();
        let mut devices = self.lock();
        if devices.contains_key(&name) {
            return Err(ManagerError::Exists(name));
        }
        let shared = Arc::new(Mutex::new(dev));
        let state = StateCell::default();
        let events = Arc::new(EventBus::default());
        let adapter = VfioUserAdapter::with_parts(shared.clone(), state.clone(), events.clone());
        let serve_err = |reason: String| ManagerError::Serve {
            name: name.clone(),
            path: shown.clone(),
            reason,
        };
        let mut server = make(adapter).map_err(|e| serve_err(e.to_string()))?;
        let handle = server.handle();
        let thread_state = state.clone();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("emudev-{name}"))
            .spawn(move || match guarded(|| server.run()) {
                Ok(Ok(())) => log::info!("{thread_name}: server stopped"),
                Ok(Err(e)) => {
                    log::error!("{thread_name}: server failed: {e}");
                    thread_state.set(DeviceState::Failed);
                }
                Err(msg) => {
                    log::error!("{thread_name}: server thread panicked: {msg}");
                    thread_state.set(DeviceState::Failed);
                }
            })
            .map_err(|e| serve_err(e.to_string()))?;
        log::info!("{name}: serving on {}", shown.display());
        devices.insert(
            name,
            Managed {
                socket: shown,
                state,
                events,
                device: shared,
                handle,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    /// Stop serving `name` (its client is disconnected, the device detached) and drop it.
    pub fn remove(&self, name: &str) -> Result<(), ManagerError> {
        let mut m = self
            .lock()
            .remove(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        m.stop();
        log::info!("{name}: removed");
        Ok(())
    }

    /// Stop and drop every device.
    pub fn shutdown(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (name, mut m) in all {
            m.stop();
            log::info!("{name}: removed");
        }
    }

    pub fn state(&self, name: &str) -> Option<DeviceState> {
        self.lock().get(name).map(|m| m.state.get())
    }

    pub fn list(&self) -> Vec<DeviceStatus> {
        self.lock()
            .iter()
            .map(|(name, m)| DeviceStatus {
                name: name.clone(),
                socket: m.socket.clone(),
                state: m.state.get(),
                serving: m.thread.as_ref().is_some_and(|t| !t.is_finished()),
            })
            .collect()
    }

    /// Subscribe to a device's events.
    pub fn subscribe(&self, name: &str) -> Result<Receiver<DeviceEvent>, ManagerError> {
        self.lock()
            .get(name)
            .map(|m| m.events.subscribe())
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    fn with_device<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut dyn DeviceModel) -> R,
    ) -> Result<R, ManagerError> {
        let (dev, state) = self
            .lock()
            .get(name)
            .map(|m| (m.device.clone(), m.state.clone()))
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        let mut d = dev.lock().unwrap_or_else(PoisonError::into_inner);
        guarded(|| f(&mut *d)).map_err(|msg| {
            log::error!("{name}: attribute call panicked, device marked Failed: {msg}");
            state.set(DeviceState::Failed);
            ManagerError::Panicked(name.to_string())
        })
    }

    /// Read a device attribute (e.g. "link").
    pub fn attr(&self, name: &str, key: &str) -> Result<Option<String>, ManagerError> {
        self.with_device(name, |d| d.attr(key))
    }

    /// Set a device attribute at runtime.
    pub fn set_attr(&self, name: &str, key: &str, value: &str) -> Result<(), ManagerError> {
        Ok(self.with_device(name, |d| d.set_attr(key, value))??)
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}
