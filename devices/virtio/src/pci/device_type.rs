//! What a virtio device type (blk, net, ...) provides to the PCI transport.

use emudev::device::DeviceError;

use crate::engine::Engine;

/// A virtio device type behind [`super::VirtioPciDevice`].
///
/// The transport owns the PCI function, the common configuration, interrupts and doorbells;
/// the device type supplies identity, features, its configuration space and the datapath
/// engine. Methods run on the device's control thread.
pub trait VirtioDeviceType: Send {
    /// Virtio device id (1 net, 2 block, ...); the PCI device id is 0x1040 + this.
    fn device_id(&self) -> u16;

    /// 24-bit PCI class code (block 0x018000, network 0x020000).
    fn class_code(&self) -> u32;

    /// Features offered, device-specific and transport bits (INDIRECT_DESC, EVENT_IDX,
    /// ACCESS_PLATFORM, RING_PACKED... as the engine supports them). The transport adds
    /// VIRTIO_F_VERSION_1 and VIRTIO_F_RING_RESET.
    fn features(&self) -> u64;

    /// Device-type check of the driver's features at FEATURES_OK (the transport has already
    /// checked they are a subset of the offered ones and include VERSION_1). Refusing
    /// leaves FEATURES_OK clear.
    fn features_ok(&mut self, _features: u64) -> bool {
        true
    }

    /// Largest size of each queue; the length is the number of queues (at most 1024).
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Size of the device configuration structure in bytes (at most 4096).
    fn config_len(&self) -> usize;

    /// Driver read of the device configuration; `offset + data.len() <= config_len()`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Driver write of the device configuration; `offset + data.len() <= config_len()`.
    /// Returns true if the configuration changed, so the transport advances
    /// `config_generation`.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }

    /// The datapath engine; called once when the transport is built.
    fn create_engine(&mut self) -> Result<Box<dyn Engine>, DeviceError>;

    /// Device reset (status 0 or function reset), after every queue was stopped.
    fn reset(&mut self) {}

    /// Read a device-specific attribute.
    fn attr(&self, _key: &str) -> Option<String> {
        None
    }

    /// Set a device-specific attribute. `Ok(true)` means the device configuration changed:
    /// the transport advances `config_generation` and sends a configuration interrupt.
    fn set_attr(&mut self, key: &str, _value: &str) -> Result<bool, DeviceError> {
        Err(DeviceError::UnknownAttribute {
            device: format!("virtio-{}", self.device_id()),
            key: key.to_string(),
        })
    }
}
