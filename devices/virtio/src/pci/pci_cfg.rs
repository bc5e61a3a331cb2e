//! The PCI configuration access capability (cfg_type 5): a window in config space through
//! which a driver reaches the BARs (SeaBIOS uses it when the virtio BAR is above 4 GiB).
//!
//! The driver writes `bar`, `offset` and `length` into the capability, then reads or writes
//! `pci_cfg_data`; the device performs a `length`-byte access at `offset` in BAR `bar`.
//! This module only decodes the window; the transport performs the access through its
//! normal BAR handlers.

use emudev::pci::ConfigSpace;

use super::layout::cap_off;

/// A decoded, valid window access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciCfgAccess {
    pub bar: u8,
    pub offset: u64,
    /// 1, 2 or 4.
    pub len: usize,
}

/// The capability at config offset `cap` (its id byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciCfgCap {
    cap: usize,
}

impl PciCfgCap {
    pub fn new(cap_offset: u16) -> Self {
        Self {
            cap: usize::from(cap_offset),
        }
    }

    /// Config-space offset of `pci_cfg_data`.
    pub fn data_offset(&self) -> usize {
        self.cap + cap_off::EXTRA
    }

    /// Whether the config access `[offset, offset+len)` touches `pci_cfg_data`.
    pub fn touches_data(&self, offset: u64, len: usize) -> bool {
        let start = self.data_offset() as u64;
        let end = offset.saturating_add(len as u64);
        offset < start + 4 && end > start
    }

    /// The access the driver programmed, if valid: length 1, 2 or 4, offset aligned to it.
    /// (The spec leaves other values undefined; they are ignored.)
    pub fn access(&self, cfg: &ConfigSpace) -> Option<PciCfgAccess> {
        let bar = cfg.u8_at(self.cap + cap_off::BAR);
        let offset = u64::from(cfg.u32_at(self.cap + cap_off::OFFSET));
        let len = cfg.u32_at(self.cap + cap_off::LENGTH);
        let len = match len {
            1 | 2 | 4 => len as usize,
            _ => return None,
        };
        if bar > 5 || offset % len as u64 != 0 {
            return None;
        }
        Some(PciCfgAccess { bar, offset, len })
    }

    /// The first `len` bytes of `pci_cfg_data` (what a window write carries).
    pub fn data(&self, cfg: &ConfigSpace, len: usize) -> [u8; 4] {
        let v = cfg.u32_at(self.data_offset()).to_le_bytes();
        let mut out = [0u8; 4];
        out[..len.min(4)].copy_from_slice(&v[..len.min(4)]);
        out
    }
}
