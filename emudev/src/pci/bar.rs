//! Base address registers and the expansion ROM BAR.
//!
//! BAR sizing falls out of the config-space write masks: the address bits below the size are
//! read-only zero and the type bits are read-only, so writing all-ones reads back
//! `!(size - 1) | type`. The programmed address is whatever the guest left in the register.

use super::config::{reg, ConfigError, ConfigSpace};

/// Number of BAR slots in a type-0 header.
pub const BAR_COUNT: usize = 6;

const MEM_TYPE_64: u32 = 0x4;
const MEM_PREFETCH: u32 = 0x8;
const IO_SPACE: u32 = 0x1;
const MEM_ADDR_MASK: u32 = !0xf;
const IO_ADDR_MASK: u32 = !0x3;
const ROM_ADDR_MASK: u32 = !0x7ff;
const ROM_ENABLE: u32 = 0x1;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space, 4..=256 bytes.
    Io,
    /// 32-bit memory space.
    Memory32 { prefetchable: bool },
    /// 64-bit memory space; occupies this slot and the next.
    Memory64 { prefetchable: bool },
}

/// One BAR: kind and size (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarDef {
    pub kind: BarKind,
    pub size: u64,
}

impl BarDef {
    pub const fn io(size: u64) -> Self {
        Self {
            kind: BarKind::Io,
            size,
        }
    }

    pub const fn mem32(size: u64) -> Self {
        Self {
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size,
        }
    }

    pub const fn mem64(size: u64) -> Self {
        Self {
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size,
        }
    }

    /// The same BAR marked prefetchable (no effect on I/O BARs).
    pub const fn prefetchable(self) -> Self {
        let kind = match self.kind {
            BarKind::Io => BarKind::Io,
            BarKind::Memory32 { .. } => BarKind::Memory32 { prefetchable: true },
            BarKind::Memory64 { .. } => BarKind::Memory64 { prefetchable: true },
        };
        Self { kind, ..self }
    }

    /// Slots used: 2 for 64-bit memory, else 1.
    pub const fn slots(&self) -> usize {
        match self.kind {
            BarKind::Memory64 { .. } => 2,
            _ => 1,
        }
    }

    pub const fn is_memory(&self) -> bool {
        !matches!(self.kind, BarKind::Io)
    }

    /// Whether the size is legal for the kind: a power of two, memory 16 B..=2 GiB (32-bit)
    /// or ..=2^63 (64-bit), I/O 4..=256 B.
    pub fn size_is_valid(&self) -> bool {
        let (min, max) = match self.kind {
            BarKind::Io => (4, 256),
            BarKind::Memory32 { .. } => (16, 1 << 31),
            BarKind::Memory64 { .. } => (16, 1 << 63),
        };
        self.size.is_power_of_two() && self.size >= min && self.size <= max
    }

    /// The read-only low bits of the lower register.
    pub const fn type_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => IO_SPACE,
            BarKind::Memory32 { prefetchable } => {
                if prefetchable {
                    MEM_PREFETCH
                } else {
                    0
                }
            }
            BarKind::Memory64 { prefetchable } => {
                MEM_TYPE_64 | if prefetchable { MEM_PREFETCH } else { 0 }
            }
        }
    }

    /// Guest-writable bits of the (lower, upper) registers. Call only on a valid size.
    fn wmasks(&self) -> (u32, u32) {
        let mask = !(self.size.wrapping_sub(1));
        match self.kind {
            BarKind::Io => ((mask as u32) & IO_ADDR_MASK, 0),
            BarKind::Memory32 { .. } => ((mask as u32) & MEM_ADDR_MASK, 0),
            BarKind::Memory64 { .. } => ((mask as u32) & MEM_ADDR_MASK, (mask >> 32) as u32),
        }
    }

    /// Write the type bits and sizing masks of a BAR at `slot` (caller checked the slot
    /// range and the size).
    pub(crate) fn install(&self, cfg: &mut ConfigSpace, slot: usize) -> Result<(), ConfigError> {
        let off = reg::BAR0 + 4 * slot;
        let (lo, hi) = self.wmasks();
        cfg.set_u32(off, self.type_bits())?;
        cfg.set_wmask(off, &lo.to_le_bytes())?;
        if self.slots() == 2 {
            cfg.set_u32(off + 4, 0)?;
            cfg.set_wmask(off + 4, &hi.to_le_bytes())?;
        }
        Ok(())
    }

    /// The address the guest programmed into the BAR at `slot`.
    pub(crate) fn address(&self, cfg: &ConfigSpace, slot: usize) -> u64 {
        let off = reg::BAR0 + 4 * slot;
        let lo = cfg.u32_at(off);
        match self.kind {
            BarKind::Io => u64::from(lo & IO_ADDR_MASK),
            BarKind::Memory32 { .. } => u64::from(lo & MEM_ADDR_MASK),
            BarKind::Memory64 { .. } => {
                u64::from(lo & MEM_ADDR_MASK) | (u64::from(cfg.u32_at(off + 4)) << 32)
            }
        }
    }
}

/// The expansion ROM BAR at 0x30: size a power of two, 2 KiB..=16 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RomBar {
    pub size: u32,
}

impl RomBar {
    pub fn size_is_valid(&self) -> bool {
        self.size.is_power_of_two() && (0x800..=(1 << 24)).contains(&self.size)
    }

    /// Make the address bits above the size and the enable bit writable.
    pub(crate) fn install(&self, cfg: &mut ConfigSpace) -> Result<(), ConfigError> {
        let wmask = (!(self.size.wrapping_sub(1)) & ROM_ADDR_MASK) | ROM_ENABLE;
        cfg.set_u32(reg::ROM_ADDRESS, 0)?;
        cfg.set_wmask(reg::ROM_ADDRESS, &wmask.to_le_bytes())
    }

    /// (programmed address, enable bit).
    pub(crate) fn state(cfg: &ConfigSpace) -> (u32, bool) {
        let v = cfg.u32_at(reg::ROM_ADDRESS);
        (v & ROM_ADDR_MASK, v & ROM_ENABLE != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::ConfigSize;

    fn size_probe(cfg: &mut ConfigSpace, off: usize) -> u32 {
        cfg.write(off as u64, &[0xff; 4]).unwrap();
        cfg.u32_at(off)
    }

    #[test]
    fn mem32_sizing() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let bar = BarDef::mem32(0x4000);
        bar.install(&mut c, 1).unwrap();
        assert_eq!(c.u32_at(0x14), 0);
        assert_eq!(size_probe(&mut c, 0x14), 0xffff_c000);
        c.write(0x14, &0xfebf_0000u32.to_le_bytes()).unwrap();
        assert_eq!(bar.address(&c, 1), 0xfebf_0000);
        // Unaligned address bits are dropped.
        c.write(0x14, &0xfebf_1234u32.to_le_bytes()).unwrap();
        assert_eq!(bar.address(&c, 1), 0xfebf_0000);
    }

    #[test]
    fn mem32_prefetchable_type_bits() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        BarDef::mem32(16).prefetchable().install(&mut c, 0).unwrap();
        assert_eq!(c.u32_at(0x10), 0x8);
        assert_eq!(size_probe(&mut c, 0x10), 0xffff_fff8);
    }

    #[test]
    fn mem64_sizing_spans_two_slots() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let bar = BarDef::mem64(0x4000).prefetchable();
        bar.install(&mut c, 4).unwrap();
        assert_eq!(c.u32_at(0x20), 0xc);
        assert_eq!(size_probe(&mut c, 0x20), 0xffff_c00c);
        assert_eq!(size_probe(&mut c, 0x24), 0xffff_ffff);
        c.write(0x20, &0x0000_4000u32.to_le_bytes()).unwrap();
        c.write(0x24, &0x0000_0080u32.to_le_bytes()).unwrap();
        assert_eq!(bar.address(&c, 4), 0x80_0000_4000);
        // One 8-byte write programs both halves.
        c.write(0x20, &0x0000_0001_8000_0000u64.to_le_bytes())
            .unwrap();
        assert_eq!(bar.address(&c, 4), 0x1_8000_0000);
    }

    #[test]
    fn mem64_larger_than_4g() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let bar = BarDef::mem64(1 << 33);
        assert!(bar.size_is_valid());
        bar.install(&mut c, 0).unwrap();
        assert_eq!(size_probe(&mut c, 0x10), 0x0000_0004);
        assert_eq!(size_probe(&mut c, 0x14), 0xffff_fffe);
    }

    #[test]
    fn io_sizing() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let bar = BarDef::io(0x20);
        bar.install(&mut c, 2).unwrap();
        assert_eq!(c.u32_at(0x18), 1);
        assert_eq!(size_probe(&mut c, 0x18), 0xffff_ffe1);
        c.write(0x18, &0xc040u32.to_le_bytes()).unwrap();
        assert_eq!(bar.address(&c, 2), 0xc040);
    }

    #[test]
    fn size_validation() {
        assert!(!BarDef::mem32(0).size_is_valid());
        assert!(!BarDef::mem32(8).size_is_valid());
        assert!(!BarDef::mem32(0x3000).size_is_valid());
        assert!(!BarDef::mem32(1 << 32).size_is_valid());
        assert!(BarDef::mem32(1 << 31).size_is_valid());
        assert!(!BarDef::io(2).size_is_valid());
        assert!(!BarDef::io(512).size_is_valid());
        assert!(BarDef::io(4).size_is_valid());
        assert!(!RomBar { size: 0x400 }.size_is_valid());
        assert!(RomBar { size: 0x800 }.size_is_valid());
    }

    #[test]
    fn absent_bar_and_rom_read_zero() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        assert_eq!(size_probe(&mut c, 0x10), 0);
        assert_eq!(size_probe(&mut c, reg::ROM_ADDRESS), 0);
    }

    #[test]
    fn rom_sizing_and_enable() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        RomBar { size: 0x10000 }.install(&mut c).unwrap();
        // Linux and QEMU probe with !ENABLE.
        c.write(0x30, &0xffff_f800u32.to_le_bytes()).unwrap();
        assert_eq!(c.u32_at(0x30), 0xffff_0000);
        assert_eq!(size_probe(&mut c, 0x30), 0xffff_0001);
        c.write(0x30, &0xfeb0_0001u32.to_le_bytes()).unwrap();
        assert_eq!(RomBar::state(&c), (0xfeb0_0000, true));
        c.write(0x30, &0xfeb0_0000u32.to_le_bytes()).unwrap();
        assert_eq!(RomBar::state(&c), (0xfeb0_0000, false));
    }
}
