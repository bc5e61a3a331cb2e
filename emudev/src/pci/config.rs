//! Type-0 configuration space: the byte image and its per-bit access masks.
//!
//! Every byte has a write mask (bits the guest may change) and a write-1-to-clear mask (bits
//! the guest clears by writing 1). Bits in neither mask are read-only. Guest accesses of any
//! offset and length inside the space are accepted; device-side setters bypass the masks.

use std::ops::Range;

use thiserror::Error;

/// Standard header register offsets.
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION_ID: usize = 0x08;
    /// Programming interface, then sub-class, then base class (3 bytes, little endian).
    pub const CLASS_CODE: usize = 0x09;
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    pub const LATENCY_TIMER: usize = 0x0d;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BIST: usize = 0x0f;
    pub const BAR0: usize = 0x10;
    pub const CARDBUS_CIS: usize = 0x28;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const ROM_ADDRESS: usize = 0x30;
    pub const CAPABILITY_LIST: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// First byte available to capabilities.
    pub const CAP_START: usize = 0x40;
    /// First byte of the PCI Express extended space.
    pub const EXT_CAP_START: usize = 0x100;
    /// End of the PCI Express extended space.
    pub const EXT_CAP_SPACE_END: usize = 0x1000;
}

/// Command register bits.
pub mod command {
    pub const IO_SPACE: u16 = 1 << 0;
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    pub const SERR_ENABLE: u16 = 1 << 8;
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits.
pub mod status {
    /// INTx asserted (read-only, reflects the line).
    pub const INTERRUPT: u16 = 1 << 3;
    /// A capability list is present at 0x34.
    pub const CAP_LIST: u16 = 1 << 4;
    pub const MASTER_DATA_PARITY_ERROR: u16 = 1 << 8;
    pub const SIGNALED_TARGET_ABORT: u16 = 1 << 11;
    pub const RECEIVED_TARGET_ABORT: u16 = 1 << 12;
    pub const RECEIVED_MASTER_ABORT: u16 = 1 << 13;
    pub const SIGNALED_SYSTEM_ERROR: u16 = 1 << 14;
    pub const DETECTED_PARITY_ERROR: u16 = 1 << 15;
    /// The error bits software clears by writing 1.
    pub const W1C: u16 = MASTER_DATA_PARITY_ERROR
        | SIGNALED_TARGET_ABORT
        | RECEIVED_TARGET_ABORT
        | RECEIVED_MASTER_ABORT
        | SIGNALED_SYSTEM_ERROR
        | DETECTED_PARITY_ERROR;
}

/// Size of the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSize {
    /// 256 bytes (conventional PCI).
    Conventional,
    /// 4096 bytes (PCI Express extended space).
    Express,
}

impl ConfigSize {
    pub const fn bytes(self) -> usize {
        match self {
            ConfigSize::Conventional => 256,
            ConfigSize::Express => 4096,
        }
    }
}

/// An access outside the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("config space access at {offset:#x} len {len} outside the {size}-byte space")]
    OutOfRange {
        offset: u64,
        len: usize,
        size: usize,
    },
}

/// The identity registers of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// 24-bit class code: base class << 16 | sub-class << 8 | programming interface.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// A configuration space image with its access masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    data: Box<[u8]>,
    wmask: Box<[u8]>,
    w1cmask: Box<[u8]>,
}

impl ConfigSpace {
    /// An all-zero, all-read-only space.
    pub fn new(size: ConfigSize) -> Self {
        let n = size.bytes();
        Self {
            data: vec![0; n].into_boxed_slice(),
            wmask: vec![0; n].into_boxed_slice(),
            w1cmask: vec![0; n].into_boxed_slice(),
        }
    }

    /// Size in bytes (256 or 4096).
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// The raw image.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn range(&self, offset: u64, len: usize) -> Result<Range<usize>, ConfigError> {
        let err = ConfigError::OutOfRange {
            offset,
            len,
            size: self.data.len(),
        };
        let start = usize::try_from(offset).map_err(|_| err)?;
        let end = start.checked_add(len).ok_or(err)?;
        if end > self.data.len() {
            return Err(err);
        }
        Ok(start..end)
    }

    /// Guest read of `data.len()` bytes at `offset` (any length, any alignment).
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError> {
        let r = self.range(offset, data.len())?;
        data.copy_from_slice(&self.data[r]);
        Ok(())
    }

    /// Guest write: writable bits take the new value, W1C bits written as 1 clear, the
    /// rest stay.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigError> {
        let r = self.range(offset, data.len())?;
        for (i, &val) in r.zip(data) {
            let old = self.data[i];
            let wm = self.wmask[i];
            let w1c = self.w1cmask[i];
            self.data[i] = (old & !wm & !w1c) | (val & wm) | (old & w1c & !val);
        }
        Ok(())
    }

    /// Device-side store of raw bytes, ignoring the masks.
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) -> Result<(), ConfigError> {
        let r = self.range(offset as u64, bytes.len())?;
        self.data[r].copy_from_slice(bytes);
        Ok(())
    }

    /// Device-side store of a byte.
    pub fn set_u8(&mut self, offset: usize, v: u8) -> Result<(), ConfigError> {
        self.set_bytes(offset, &[v])
    }

    /// Device-side store of a little-endian word.
    pub fn set_u16(&mut self, offset: usize, v: u16) -> Result<(), ConfigError> {
        self.set_bytes(offset, &v.to_le_bytes())
    }

    /// Device-side store of a little-endian dword.
    pub fn set_u32(&mut self, offset: usize, v: u32) -> Result<(), ConfigError> {
        self.set_bytes(offset, &v.to_le_bytes())
    }

    fn get<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = offset
            .checked_add(N)
            .and_then(|end| self.data.get(offset..end))
        {
            out.copy_from_slice(src);
        }
        out
    }

    /// The byte at `offset`; 0 outside the space.
    pub fn u8_at(&self, offset: usize) -> u8 {
        self.get::<1>(offset)[0]
    }

    /// The little-endian word at `offset`; 0 outside the space.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes(self.get(offset))
    }

    /// The little-endian dword at `offset`; 0 outside the space.
    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.get(offset))
    }

    /// Set the guest-writable bits of `bytes.len()` bytes at `offset`. Bits that are also
    /// write-1-to-clear lose that property.
    pub fn set_wmask(&mut self, offset: usize, bytes: &[u8]) -> Result<(), ConfigError> {
        let r = self.range(offset as u64, bytes.len())?;
        for (i, &m) in r.zip(bytes) {
            self.wmask[i] = m;
            self.w1cmask[i] &= !m;
        }
        Ok(())
    }

    /// Set the write-1-to-clear bits of `bytes.len()` bytes at `offset`. Bits that were
    /// plain writable become W1C.
    pub fn set_w1cmask(&mut self, offset: usize, bytes: &[u8]) -> Result<(), ConfigError> {
        let r = self.range(offset as u64, bytes.len())?;
        for (i, &m) in r.zip(bytes) {
            self.w1cmask[i] = m;
            self.wmask[i] &= !m;
        }
        Ok(())
    }

    /// The guest-writable bits of the byte at `offset` (0 outside the space).
    pub fn wmask_at(&self, offset: usize) -> u8 {
        self.wmask.get(offset).copied().unwrap_or(0)
    }

    /// The W1C bits of the byte at `offset` (0 outside the space).
    pub fn w1cmask_at(&self, offset: usize) -> u8 {
        self.w1cmask.get(offset).copied().unwrap_or(0)
    }

    /// Write the identity registers, header type 0 (single function) and the interrupt pin
    /// (0 none, 1..=4 INTA..INTD), and make the standard header registers writable that
    /// every type-0 function has: command bits, status W1C bits, cache line size and
    /// interrupt line. BAR, ROM and capability masks are set by their owners.
    pub fn init_header(&mut self, ids: &PciIds, interrupt_pin: u8) -> Result<(), ConfigError> {
        self.set_u16(reg::VENDOR_ID, ids.vendor_id)?;
        self.set_u16(reg::DEVICE_ID, ids.device_id)?;
        self.set_u8(reg::REVISION_ID, ids.revision_id)?;
        let class = ids.class_code.to_le_bytes();
        self.set_bytes(reg::CLASS_CODE, &class[..3])?;
        self.set_u8(reg::HEADER_TYPE, 0)?;
        self.set_u16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id)?;
        self.set_u16(reg::SUBSYSTEM_ID, ids.subsystem_id)?;
        self.set_u8(reg::INTERRUPT_PIN, interrupt_pin)?;
        let cmd = command::BUS_MASTER
            | command::PARITY_ERROR_RESPONSE
            | command::SERR_ENABLE
            | command::INTX_DISABLE;
        self.set_wmask(reg::COMMAND, &cmd.to_le_bytes())?;
        self.set_w1cmask(reg::STATUS, &status::W1C.to_le_bytes())?;
        self.set_wmask(reg::CACHE_LINE_SIZE, &[0xff])?;
        self.set_wmask(reg::INTERRUPT_LINE, &[0xff])?;
        Ok(())
    }

    /// Make extra command bits writable (I/O or memory decode, added with BARs).
    pub fn allow_command_bits(&mut self, bits: u16) -> Result<(), ConfigError> {
        let cur =
            u16::from_le_bytes([self.wmask_at(reg::COMMAND), self.wmask_at(reg::COMMAND + 1)]);
        self.set_wmask(reg::COMMAND, &(cur | bits).to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ConfigSpace {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let ids = PciIds {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision_id: 3,
            class_code: 0x020000,
            subsystem_vendor_id: 0xabcd,
            subsystem_id: 0xef01,
        };
        c.init_header(&ids, 1).unwrap();
        c
    }

    #[test]
    fn ids_are_little_endian_and_read_only() {
        let mut c = header();
        let mut b = [0u8; 4];
        c.read(0, &mut b).unwrap();
        assert_eq!(b, [0x34, 0x12, 0x78, 0x56]);
        c.write(0, &[0xff; 4]).unwrap();
        c.read(0, &mut b).unwrap();
        assert_eq!(b, [0x34, 0x12, 0x78, 0x56]);
        assert_eq!(c.u32_at(0x08), 0x0200_0003);
        assert_eq!(c.u16_at(reg::SUBSYSTEM_ID), 0xef01);
        assert_eq!(c.u8_at(reg::INTERRUPT_PIN), 1);
        c.write(reg::INTERRUPT_PIN as u64, &[4]).unwrap();
        assert_eq!(c.u8_at(reg::INTERRUPT_PIN), 1);
    }

    #[test]
    fn command_only_takes_writable_bits() {
        let mut c = header();
        c.write(reg::COMMAND as u64, &0xffffu16.to_le_bytes())
            .unwrap();
        assert_eq!(
            c.u16_at(reg::COMMAND),
            command::BUS_MASTER
                | command::PARITY_ERROR_RESPONSE
                | command::SERR_ENABLE
                | command::INTX_DISABLE
        );
        c.allow_command_bits(command::MEMORY_SPACE).unwrap();
        c.write(reg::COMMAND as u64, &[0x02]).unwrap();
        // Byte write only touches the low byte; INTX_DISABLE (bit 10) stays set.
        assert_eq!(
            c.u16_at(reg::COMMAND),
            command::MEMORY_SPACE | command::SERR_ENABLE | command::INTX_DISABLE
        );
    }

    #[test]
    fn status_w1c_clears_only_written_ones() {
        let mut c = header();
        let set = status::CAP_LIST
            | status::RECEIVED_MASTER_ABORT
            | status::DETECTED_PARITY_ERROR
            | status::SIGNALED_TARGET_ABORT;
        c.set_u16(reg::STATUS, set).unwrap();
        // Writing zeros changes nothing.
        c.write(reg::STATUS as u64, &[0, 0]).unwrap();
        assert_eq!(c.u16_at(reg::STATUS), set);
        // Writing 1 to master abort and to the RO cap-list bit clears only master abort.
        let w = status::RECEIVED_MASTER_ABORT | status::CAP_LIST;
        c.write(reg::STATUS as u64, &w.to_le_bytes()).unwrap();
        assert_eq!(
            c.u16_at(reg::STATUS),
            status::CAP_LIST | status::DETECTED_PARITY_ERROR | status::SIGNALED_TARGET_ABORT
        );
        // A dword write at 0x04 reaches status through the upper half.
        let dw = u32::from(status::DETECTED_PARITY_ERROR) << 16;
        c.write(reg::COMMAND as u64, &dw.to_le_bytes()).unwrap();
        assert_eq!(
            c.u16_at(reg::STATUS),
            status::CAP_LIST | status::SIGNALED_TARGET_ABORT
        );
    }

    #[test]
    fn unaligned_and_wide_accesses() {
        let mut c = header();
        // 8-byte read straddling vendor/device/command/status.
        let mut b = [0u8; 8];
        c.read(0, &mut b).unwrap();
        assert_eq!(&b[..4], &[0x34, 0x12, 0x78, 0x56]);
        // Unaligned 3-byte write covering cache line (RW), latency timer (RO), header (RO).
        c.write(0x0c, &[0x10, 0x20, 0x80]).unwrap();
        assert_eq!(c.u8_at(0x0c), 0x10);
        assert_eq!(c.u8_at(0x0d), 0);
        assert_eq!(c.u8_at(0x0e), 0);
        // Unaligned read of 3 bytes across the class code.
        let mut b3 = [0u8; 3];
        c.read(0x09, &mut b3).unwrap();
        assert_eq!(b3, [0x00, 0x00, 0x02]);
    }

    #[test]
    fn out_of_range_is_an_error() {
        let mut c = header();
        let mut b = [0u8; 4];
        assert!(c.read(254, &mut b).is_err());
        assert!(c.read(256, &mut b[..1]).is_err());
        assert!(c.read(u64::MAX, &mut b).is_err());
        assert!(c.write(253, &[0; 4]).is_err());
        c.read(252, &mut b).unwrap();
        let mut e = ConfigSpace::new(ConfigSize::Express);
        e.write(4092, &[1, 2, 3, 4]).unwrap();
        assert!(e.write(4093, &[1, 2, 3, 4]).is_err());
        assert_eq!(e.size(), 4096);
    }

    #[test]
    fn masks_are_exclusive() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        c.set_wmask(0x40, &[0xff]).unwrap();
        c.set_w1cmask(0x40, &[0x0f]).unwrap();
        assert_eq!(c.wmask_at(0x40), 0xf0);
        assert_eq!(c.w1cmask_at(0x40), 0x0f);
        c.set_u8(0x40, 0x0f).unwrap();
        c.write(0x40, &[0xa5]).unwrap();
        // High nibble takes 0xa; low nibble: 0x0f with 0x5 written -> clears bits 0 and 2.
        assert_eq!(c.u8_at(0x40), 0xaa);
    }
}
