//! [`VhostUserDevice`]: a virtio device type (virtio-blk or virtio-fs) whose datapath is a
//! vhost-user backend. Identity and configuration come from the backend (blk: GET_CONFIG)
//! or from our options (fs: the tag); the transport around it is our virtio-pci.

use std::path::Path;
use std::sync::Arc;

use emudev::device::DeviceError;
use emudev_virtio::pci::VirtioDeviceType;
use emudev_virtio::Engine;

use crate::backend::{Backend, BackendOptions, MAX_RINGS};
use crate::conn::ConnError;
use crate::engine::VhostUserEngine;

/// Virtio device id of block devices.
pub const VIRTIO_ID_BLOCK: u16 = 2;
/// Virtio device id of file system devices.
pub const VIRTIO_ID_FS: u16 = 26;
/// Bytes of `virtio_blk_config` we present (through `write_zeroes_may_unmap` and padding;
/// secure-erase and zoned fields are not offered).
pub const BLK_CONFIG_LEN: usize = 60;
/// `virtio_fs_config`: tag[36] + num_request_queues.
pub const FS_CONFIG_LEN: usize = 40;
/// Longest virtio-fs tag.
pub const FS_TAG_MAX: usize = 36;

const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_SECURE_ERASE: u64 = 1 << 16;
const VIRTIO_BLK_F_ZONED: u64 = 1 << 17;
const VIRTIO_FS_F_NOTIFICATION: u64 = 1 << 0;
/// Device-type bits (0..=23) plus the ring features a backend implements on its own.
const BRIDGED_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | (1 << 32);
/// Offset of `num_queues` in `virtio_blk_config`.
const BLK_NUM_QUEUES_OFF: usize = 34;
/// Offset of `wce` (the only field a driver writes) in `virtio_blk_config`.
const BLK_WCE_OFF: u64 = 32;

/// Which device the bridge presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostKind {
    /// virtio-blk; configuration and queue count from the backend.
    Blk,
    /// virtio-fs with this tag and number of request queues (plus the hiprio queue).
    Fs { tag: String, request_queues: u16 },
}

/// Options of a [`VhostUserDevice`].
#[derive(Debug, Clone)]
pub struct VhostDeviceOptions {
    pub kind: VhostKind,
    /// Largest ring size offered to the driver.
    pub queue_size: u16,
    pub backend: BackendOptions,
}

/// Why a bridged device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("{0}")]
    Config(String),
}

/// A virtio device whose rings a vhost-user backend runs.
#[derive(Debug)]
pub struct VhostUserDevice {
    backend: Arc<Backend>,
    kind: VhostKind,
    features: u64,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
}

impl VhostUserDevice {
    /// Connect to the backend at `path` and learn the device from it.
    pub fn connect(name: &str, path: &Path, opts: VhostDeviceOptions) -> Result<Self, VhostError> {
        if !opts.queue_size.is_power_of_two() || opts.queue_size > 32768 {
            return Err(VhostError::Config(format!(
                "queue size {} is not a power of two <= 32768",
                opts.queue_size
            )));
        }
        let backend = Backend::connect(name, path, opts.backend.clone())?;
        let info = backend.info();
        let max_queues = info.max_queues.unwrap_or(u64::MAX);
        let (features, config, nq) = match &opts.kind {
            VhostKind::Blk => {
                let features = info.features
                    & BRIDGED_FEATURES
                    & !(VIRTIO_BLK_F_SECURE_ERASE | VIRTIO_BLK_F_ZONED);
                let config = backend.get_config(0, BLK_CONFIG_LEN as u32).map_err(|e| {
                    VhostError::Config(format!(
                        "the backend did not give the virtio-blk configuration: {e}"
                    ))
                })?;
                let nq = if features & VIRTIO_BLK_F_MQ != 0 {
                    let n = config
                        .get(BLK_NUM_QUEUES_OFF..BLK_NUM_QUEUES_OFF + 2)
                        .map_or(1, |b| u16::from_le_bytes([b[0], b[1]]));
                    u64::from(n.max(1))
                } else {
                    1
                };
                (features, config, nq)
            }
            VhostKind::Fs {
                tag,
                request_queues,
            } => {
                if tag.is_empty() || tag.len() > FS_TAG_MAX {
                    return Err(VhostError::Config(format!(
                        "virtio-fs tag '{tag}' must be 1 to {FS_TAG_MAX} bytes"
                    )));
                }
                let mut config = vec![0u8; FS_CONFIG_LEN];
                config[..tag.len()].copy_from_slice(tag.as_bytes());
                config[FS_TAG_MAX..].copy_from_slice(&u32::from(*request_queues).to_le_bytes());
                let features = info.features & BRIDGED_FEATURES & !VIRTIO_FS_F_NOTIFICATION;
                (features, config, 1 + u64::from(*request_queues))
            }
        };
        if nq > max_queues || nq as usize > MAX_RINGS {
            return Err(VhostError::Config(format!(
                "the device needs {nq} queues, the backend serves {max_queues}"
            )));
        }
        Ok(Self {
            backend,
            kind: opts.kind,
            features,
            config,
            queue_sizes: vec![opts.queue_size; nq as usize],
        })
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    pub fn kind(&self) -> &VhostKind {
        &self.kind
    }
}

impl VirtioDeviceType for VhostUserDevice {
    fn device_id(&self) -> u16 {
        match self.kind {
            VhostKind::Blk => VIRTIO_ID_BLOCK,
            VhostKind::Fs { .. } => VIRTIO_ID_FS,
        }
    }

    fn class_code(&self) -> u32 {
        // Mass storage, other (QEMU uses the same for vhost-user-fs-pci).
        0x01_8000
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn config_len(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get(o..o.checked_add(data.len())?));
        match src {
            Some(s) => data.copy_from_slice(s),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        // Only virtio-blk's writeback flag is driver-writable.
        if self.kind != VhostKind::Blk || offset != BLK_WCE_OFF || data.len() != 1 {
            return false;
        }
        match self.backend.set_config(BLK_WCE_OFF as u32, data) {
            Ok(()) => {
                self.config[BLK_WCE_OFF as usize] = data[0];
                true
            }
            Err(e) => {
                log::warn!("{}: SET_CONFIG (wce): {e}", self.backend.name);
                false
            }
        }
    }

    fn create_engine(&mut self) -> Result<Box<dyn Engine>, DeviceError> {
        let e = VhostUserEngine::new(self.backend.clone()).map_err(|e| DeviceError::Failed {
            device: self.backend.name.clone(),
            reason: format!("starting the vhost-user monitor thread: {e}"),
        })?;
        Ok(Box::new(e))
    }

    fn attr(&self, key: &str) -> Option<String> {
        match key {
            "vhost_connected" => Some(self.backend.connected().to_string()),
            "vhost_disconnects" => Some(self.backend.connection_counts().0.to_string()),
            "vhost_reconnects" => Some(self.backend.connection_counts().1.to_string()),
            _ => None,
        }
    }
}
