//! PCI config-space chores of a driver: the capability list, bus mastering, MSI-X enable.

use emudev_vfio_user::wire::{irq_index, irq_set_flags, region_index};
use emudev_vfio_user::{Client, SetIrqData};

use super::{DemoError, Step};
use emudev::pci::EventFd;

/// PCI capability ids we look for.
pub const CAP_VENDOR: u8 = 0x09;
pub const CAP_MSIX: u8 = 0x11;

/// The config space (first 256 bytes) and its capabilities as (id, offset).
pub struct Config {
    pub bytes: Vec<u8>,
    pub caps: Vec<(u8, usize)>,
}

impl Config {
    pub fn read(c: &mut Client) -> Result<Self, DemoError> {
        let bytes = c
            .region_read(region_index::CONFIG, 0, 256)
            .step("read config space")?;
        if bytes.len() < 256 {
            return Err(DemoError::Device(
                "config space shorter than 256 bytes".into(),
            ));
        }
        let mut caps = Vec::new();
        // Status bit 4: capability list present.
        if bytes[6] & 0x10 != 0 {
            let mut off = usize::from(bytes[0x34] & 0xfc);
            // At most 48 capabilities fit in 192 bytes: a bound against loops.
            while off >= 0x40 && off + 1 < bytes.len() && caps.len() < 48 {
                caps.push((bytes[off], off));
                off = usize::from(bytes[off + 1] & 0xfc);
            }
        }
        Ok(Self { bytes, caps })
    }

    pub fn u16_at(&self, off: usize) -> u16 {
        match self.bytes.get(off..off + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]),
            None => 0,
        }
    }

    pub fn u32_at(&self, off: usize) -> u32 {
        match self.bytes.get(off..off + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    pub fn find(&self, id: u8) -> Option<usize> {
        self.caps.iter().find(|c| c.0 == id).map(|c| c.1)
    }
}

/// Memory decoding and bus mastering on, as firmware and drivers do.
pub fn enable_bus_master(c: &mut Client, cfg: &Config) -> Result<(), DemoError> {
    let cmd = cfg.u16_at(4) | 0x6;
    c.region_write(region_index::CONFIG, 4, &cmd.to_le_bytes())
        .step("enable bus mastering")
}

/// One eventfd per MSI-X vector (given to the server with SET_IRQS), then MSI-X enabled in
/// the capability, in QEMU's order.
pub fn enable_msix(c: &mut Client, cfg: &Config, vectors: u32) -> Result<Vec<EventFd>, DemoError> {
    let cap = cfg
        .find(CAP_MSIX)
        .ok_or_else(|| DemoError::Device("no MSI-X capability".into()))?;
    let table = u32::from(cfg.u16_at(cap + 2) & 0x7ff) + 1;
    if table < vectors {
        return Err(DemoError::Device(format!(
            "MSI-X has {table} vectors, the demo needs {vectors}"
        )));
    }
    let evs = (0..vectors)
        .map(|_| emudev::doorbell::new_eventfd())
        .collect::<Result<Vec<_>, _>>()
        .step("eventfd")?;
    let fds: Vec<_> = evs
        .iter()
        .map(|e| Some(std::os::fd::AsFd::as_fd(e)))
        .collect();
    c.set_irqs(
        irq_index::MSIX,
        irq_set_flags::ACTION_TRIGGER,
        0,
        vectors,
        SetIrqData::Eventfds(&fds),
    )
    .step("SET_IRQS (MSI-X eventfds)")?;
    let ctrl = (cap + 3) as u64;
    let hi = cfg.bytes.get(cap + 3).copied().unwrap_or(0);
    c.region_write(region_index::CONFIG, ctrl, &[(hi | 0x80) & !0x40])
        .step("enable MSI-X")?;
    Ok(evs)
}
