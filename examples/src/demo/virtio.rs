//! A minimal modern virtio-pci driver over vfio-user: finds the virtio capabilities,
//! negotiates features, sets up split queues with MSI-X vectors, and keeps single-descriptor
//! chains on them (one descriptor per slot, so a used id is the slot it came from).
//!
//! Used by the net demo; the virtio-blk demo keeps its own request-shaped driver and shares
//! the register tables here.

use std::sync::atomic::Ordering;

use emudev_vfio_user::Client;
use vm_memory::{Bytes, VolatileMemory, VolatileSlice};

use super::pci::{self, Config};
use super::{DemoError, SharedRam, Step};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
}

pub(super) mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

pub(super) const DESC_WRITE: u16 = 2;

/// Where a virtio structure lives: (BAR, offset).
#[derive(Debug, Clone, Copy)]
struct Loc {
    bar: u32,
    off: u64,
}

/// The device's virtio-pci structures, found through its vendor capabilities.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    common: Loc,
    notify: Loc,
    notify_mult: u32,
    device: Loc,
}

impl Transport {
    /// Check the PCI id is `1af4:device_id`, find the virtio structures and turn on bus
    /// mastering.
    pub fn probe(c: &mut Client, device_id: u16) -> Result<(Self, Config), DemoError> {
        let cfg = Config::read(c)?;
        let (vendor, devid) = (cfg.u16_at(0), cfg.u16_at(2));
        if vendor != 0x1af4 || devid != device_id {
            return Err(DemoError::Device(format!(
                "{vendor:04x}:{devid:04x} is not the expected virtio device 1af4:{device_id:04x}"
            )));
        }
        let (mut common, mut notify, mut device) = (None, None, None);
        let mut mult = 0;
        for &(id, off) in &cfg.caps {
            if id != pci::CAP_VENDOR {
                continue;
            }
            let ty = cfg.bytes.get(off + 3).copied().unwrap_or(0);
            let loc = Loc {
                bar: u32::from(cfg.bytes.get(off + 4).copied().unwrap_or(0xff)),
                off: u64::from(cfg.u32_at(off + 8)),
            };
            match ty {
                1 => common = common.or(Some(loc)),
                2 if notify.is_none() => {
                    notify = Some(loc);
                    mult = cfg.u32_at(off + 16);
                }
                4 => device = device.or(Some(loc)),
                _ => {}
            }
        }
        let t = match (common, notify, device) {
            (Some(c), Some(n), Some(d)) if c.bar < 6 && n.bar < 6 && d.bar < 6 => Transport {
                common: c,
                notify: n,
                notify_mult: mult,
                device: d,
            },
            _ => {
                return Err(DemoError::Device(
                    "virtio common/notify/device capabilities not found".into(),
                ))
            }
        };
        pci::enable_bus_master(c, &cfg)?;
        Ok((t, cfg))
    }

    fn rd(c: &mut Client, loc: Loc, off: u64, len: u32) -> Result<u64, DemoError> {
        let v = c
            .region_read(loc.bar, loc.off + off, len)
            .step("virtio register read")?;
        let mut b = [0u8; 8];
        let n = v.len().min(8);
        b[..n].copy_from_slice(&v[..n]);
        Ok(u64::from_le_bytes(b))
    }

    fn wr(c: &mut Client, loc: Loc, off: u64, len: usize, v: u64) -> Result<(), DemoError> {
        c.region_write(loc.bar, loc.off + off, &v.to_le_bytes()[..len])
            .step("virtio register write")
    }

    /// Write the device status and read it back.
    pub fn set_status(&self, c: &mut Client, s: u8) -> Result<u8, DemoError> {
        Self::wr(c, self.common, common::DEVICE_STATUS, 1, u64::from(s))?;
        Ok(Self::rd(c, self.common, common::DEVICE_STATUS, 1)? as u8)
    }

    /// Reset, then ACKNOWLEDGE, DRIVER and FEATURES_OK with the offered subset of `wanted`
    /// (VERSION_1 is required). Returns the negotiated features.
    pub fn negotiate(&self, c: &mut Client, wanted: u64) -> Result<u64, DemoError> {
        if self.set_status(c, 0)? != 0 {
            return Err(DemoError::Device(
                "device_status did not read 0 after reset".into(),
            ));
        }
        self.set_status(c, status::ACKNOWLEDGE | status::DRIVER)?;
        let mut offered = 0u64;
        for sel in 0..2u64 {
            Self::wr(c, self.common, common::DEVICE_FEATURE_SELECT, 4, sel)?;
            offered |= Self::rd(c, self.common, common::DEVICE_FEATURE, 4)? << (32 * sel);
        }
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(DemoError::Device("VIRTIO_F_VERSION_1 not offered".into()));
        }
        let features = offered & (wanted | VIRTIO_F_VERSION_1);
        for sel in 0..2u64 {
            Self::wr(c, self.common, common::DRIVER_FEATURE_SELECT, 4, sel)?;
            let half = (features >> (32 * sel)) & 0xffff_ffff;
            Self::wr(c, self.common, common::DRIVER_FEATURE, 4, half)?;
        }
        let st = self.set_status(
            c,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        )?;
        if st & status::FEATURES_OK == 0 {
            return Err(DemoError::Device("FEATURES_OK refused".into()));
        }
        Ok(features)
    }

    /// Send configuration-change interrupts to MSI-X vector `v`.
    pub fn set_config_vector(&self, c: &mut Client, v: u16) -> Result<(), DemoError> {
        Self::wr(c, self.common, common::CONFIG_MSIX_VECTOR, 2, u64::from(v))
    }

    /// Set up and enable queue `index` with at most `max_size` entries at the addresses of
    /// `q`'s layout, interrupting on MSI-X `vector`.
    pub fn setup_queue(
        &self,
        c: &mut Client,
        index: u16,
        max_size: u16,
        layout: QueueLayout,
        vector: u16,
    ) -> Result<SplitQueue, DemoError> {
        Self::wr(c, self.common, common::QUEUE_SELECT, 2, u64::from(index))?;
        let max = Self::rd(c, self.common, common::QUEUE_SIZE, 2)? as u16;
        if max == 0 {
            return Err(DemoError::Device(format!("queue {index} is not available")));
        }
        let size = max.min(max_size);
        Self::wr(c, self.common, common::QUEUE_SIZE, 2, u64::from(size))?;
        Self::wr(
            c,
            self.common,
            common::QUEUE_MSIX_VECTOR,
            2,
            u64::from(vector),
        )?;
        if Self::rd(c, self.common, common::QUEUE_MSIX_VECTOR, 2)? != u64::from(vector) {
            return Err(DemoError::Device(format!(
                "MSI-X vector {vector} refused for queue {index}"
            )));
        }
        for (reg, addr) in [
            (common::QUEUE_DESC, layout.desc),
            (common::QUEUE_DRIVER, layout.avail),
            (common::QUEUE_DEVICE, layout.used),
        ] {
            Self::wr(c, self.common, reg, 4, addr & 0xffff_ffff)?;
            Self::wr(c, self.common, reg + 4, 4, addr >> 32)?;
        }
        let notify_off = Self::rd(c, self.common, common::QUEUE_NOTIFY_OFF, 2)?;
        let notify_addr = self.notify.off + notify_off * u64::from(self.notify_mult);
        Self::wr(c, self.common, common::QUEUE_ENABLE, 2, 1)?;
        Ok(SplitQueue {
            index,
            size,
            layout,
            notify_bar: self.notify.bar,
            notify_addr,
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// Set DRIVER_OK and check the device took it.
    pub fn driver_ok(&self, c: &mut Client) -> Result<(), DemoError> {
        let st = self.set_status(
            c,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        )?;
        if st & status::DRIVER_OK == 0 || st & status::NEEDS_RESET != 0 {
            return Err(DemoError::Device(format!(
                "device status {st:#x} after DRIVER_OK"
            )));
        }
        Ok(())
    }

    /// Read `len` bytes of the device-specific configuration at `off`.
    pub fn device_config(&self, c: &mut Client, off: u64, len: u32) -> Result<Vec<u8>, DemoError> {
        c.region_read(self.device.bar, self.device.off + off, len)
            .step("device config read")
    }
}

/// Where a split queue's parts live in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A split virtqueue driven with one descriptor per chain: the slot is the head.
#[derive(Debug)]
pub struct SplitQueue {
    pub index: u16,
    pub size: u16,
    layout: QueueLayout,
    notify_bar: u32,
    notify_addr: u64,
    avail_idx: u16,
    last_used: u16,
}

fn mem(ram: &SharedRam) -> VolatileSlice<'_> {
    ram.map.as_volatile_slice()
}

fn at(addr: u64) -> Result<usize, DemoError> {
    usize::try_from(addr).map_err(|_| DemoError::Device(format!("address {addr:#x}")))
}

impl SplitQueue {
    /// Put buffer `addr`/`len` in descriptor `slot` (device-writable if `write`) and make it
    /// available. The device sees it after [`Self::kick`].
    pub fn add(
        &mut self,
        ram: &SharedRam,
        slot: u16,
        addr: u64,
        len: u32,
        write: bool,
    ) -> Result<(), DemoError> {
        if slot >= self.size {
            return Err(DemoError::Device(format!("slot {slot} out of range")));
        }
        let m = mem(ram);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        let flags = if write { DESC_WRITE } else { 0 };
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&d, at(self.layout.desc + 16 * u64::from(slot))?)
            .map_err(|e| DemoError::Device(format!("descriptor write: {e}")))?;
        let entry = self.layout.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        m.store(slot, at(entry)?, Ordering::Relaxed)
            .map_err(|e| DemoError::Device(format!("avail ring: {e}")))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publish the new avail index and notify the device.
    pub fn kick(&mut self, c: &mut Client, ram: &SharedRam) -> Result<(), DemoError> {
        // Release: the device sees the descriptors and ring entries before the index.
        mem(ram)
            .store(
                self.avail_idx,
                at(self.layout.avail + 2)?,
                Ordering::Release,
            )
            .map_err(|e| DemoError::Device(format!("avail idx: {e}")))?;
        std::sync::atomic::fence(Ordering::SeqCst);
        c.region_write(self.notify_bar, self.notify_addr, &self.index.to_le_bytes())
            .step("queue notify")
    }

    /// Used entries (slot, written length) published since the last call.
    pub fn pop_used(&mut self, ram: &SharedRam) -> Result<Vec<(u16, u32)>, DemoError> {
        let m = mem(ram);
        let used: u16 = m
            .load(at(self.layout.used + 2)?, Ordering::Acquire)
            .map_err(|e| DemoError::Device(format!("used idx: {e}")))?;
        let n = used.wrapping_sub(self.last_used);
        if n > self.size {
            return Err(DemoError::Device(format!(
                "queue {}: used index jumped by {n} on a ring of {}",
                self.index, self.size
            )));
        }
        let mut out = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let e = self.layout.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = m
                .load(at(e)?, Ordering::Relaxed)
                .map_err(|e| DemoError::Device(e.to_string()))?;
            let len: u32 = m
                .load(at(e + 4)?, Ordering::Relaxed)
                .map_err(|e| DemoError::Device(e.to_string()))?;
            let slot = u16::try_from(id)
                .ok()
                .filter(|&i| i < self.size)
                .ok_or_else(|| DemoError::Device(format!("used id {id} out of range")))?;
            out.push((slot, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(out)
    }
}
