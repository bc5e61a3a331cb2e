//! Capability bodies, the chain builder and a chain walker.
//!
//! A [`Capability`] is its id plus the bytes after the two-byte header (id, next), with a
//! write mask and a write-1-to-clear mask of the same length. [`install`] places the chain
//! at 0x40 upwards, 4-byte aligned, links the `next` pointers, sets the capabilities pointer
//! (0x34) and the status CAP_LIST bit. Id and next bytes are always read-only.

use std::collections::BTreeSet;

use thiserror::Error;

use super::config::{reg, status, ConfigError, ConfigSpace};

/// Capability ids.
pub mod cap_id {
    pub const POWER_MANAGEMENT: u8 = 0x01;
    pub const VENDOR: u8 = 0x09;
    pub const PCI_EXPRESS: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
}

/// Longest capability body (the length must fit the 8-bit vendor length byte and the space).
const MAX_CAP_LEN: usize = 0xc0;

/// Power-management control/status register offset inside the PM capability.
pub(crate) const PM_CTRL: usize = 4;
const PM_STATE_MASK: u16 = 0x3;
const PM_NO_SOFT_RESET: u16 = 1 << 3;

/// MSI-X message control offset inside the MSI-X capability.
pub(crate) const MSIX_CTRL: usize = 2;
pub(crate) const MSIX_CTRL_ENABLE: u16 = 1 << 15;
pub(crate) const MSIX_CTRL_FMASK: u16 = 1 << 14;

/// PCI Express device control offset inside the PCIe capability.
pub(crate) const PCIE_DEVCTL: usize = 8;
pub(crate) const PCIE_DEVCTL_FLR: u16 = 1 << 15;
const PCIE_CAP_LEN: usize = 0x3c;

/// A power state of the PM capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    D0,
    D3Hot,
}

impl PowerState {
    pub(crate) fn from_pmcsr(v: u16) -> Self {
        if v & PM_STATE_MASK == 3 {
            PowerState::D3Hot
        } else {
            PowerState::D0
        }
    }
}

/// Knobs of the PCI Express capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PcieCapConfig {
    /// Advertise Function Level Reset (DevCap bit 28); the Initiate FLR bit then produces a
    /// `ConfigEvent::FunctionLevelReset`.
    pub flr: bool,
}

/// One capability, without its id/next header bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    id: u8,
    body: Vec<u8>,
    wmask: Vec<u8>,
    w1cmask: Vec<u8>,
}

/// Where a capability was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapInfo {
    pub id: u8,
    /// Offset of the id byte in config space.
    pub offset: u16,
    /// Length including the two header bytes.
    pub len: u16,
}

impl CapInfo {
    /// Whether `[start, start+len)` overlaps the capability.
    pub fn overlaps(&self, start: usize, len: usize) -> bool {
        let cs = usize::from(self.offset);
        let ce = cs + usize::from(self.len);
        start < ce && start.saturating_add(len) > cs
    }
}

/// Errors building a capability or a chain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CapError {
    #[error("capability {id:#04x} body of {len} bytes is too long")]
    TooLong { id: u16, len: usize },
    #[error("capability {id:#04x} masks must match the body length {len}")]
    MaskLength { id: u16, len: usize },
    #[error("capability {id:#04x} of {len} bytes does not fit at {offset:#x}")]
    NoRoom { id: u16, offset: usize, len: usize },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Capability {
    /// A capability from raw parts: `body` is everything after the id/next bytes; `wmask`
    /// and `w1cmask` have the body's length.
    pub fn raw(id: u8, body: Vec<u8>, wmask: Vec<u8>, w1cmask: Vec<u8>) -> Result<Self, CapError> {
        if body.len() + 2 > MAX_CAP_LEN {
            return Err(CapError::TooLong {
                id: id.into(),
                len: body.len(),
            });
        }
        if wmask.len() != body.len() || w1cmask.len() != body.len() {
            return Err(CapError::MaskLength {
                id: id.into(),
                len: body.len(),
            });
        }
        Ok(Self {
            id,
            body,
            wmask,
            w1cmask,
        })
    }

    /// A vendor-specific capability (0x09). `data` is what follows the length byte (for
    /// virtio: cfg_type, bar, id, padding, offset, length, ...); the length byte is filled
    /// in as `3 + data.len()`. Read-only.
    pub fn vendor(data: &[u8]) -> Result<Self, CapError> {
        Self::vendor_with_wmask(data, &vec![0; data.len()])
    }

    /// A vendor-specific capability with guest-writable bits in `wmask` (same length as
    /// `data`), e.g. the virtio PCI-cfg access capability.
    pub fn vendor_with_wmask(data: &[u8], wmask: &[u8]) -> Result<Self, CapError> {
        let len = data.len() + 3;
        let len8 = u8::try_from(len).map_err(|_| CapError::TooLong {
            id: cap_id::VENDOR.into(),
            len: data.len(),
        })?;
        if wmask.len() != data.len() {
            return Err(CapError::MaskLength {
                id: cap_id::VENDOR.into(),
                len: data.len(),
            });
        }
        let mut body = Vec::with_capacity(len - 2);
        body.push(len8);
        body.extend_from_slice(data);
        let mut wm = Vec::with_capacity(len - 2);
        wm.push(0);
        wm.extend_from_slice(wmask);
        let n = body.len();
        Self::raw(cap_id::VENDOR, body, wm, vec![0; n])
    }

    /// Power management (0x01), version 3 (PM 1.2), D0 and D3hot only, No_Soft_Reset set
    /// (the device keeps its state across D3hot -> D0). The power-state field is writable;
    /// writes of D1/D2 are dropped by `PciDevice`.
    pub fn power_management() -> Self {
        let pmc: u16 = 0x0003;
        let pmcsr: u16 = PM_NO_SOFT_RESET;
        let mut body = vec![0u8; 6];
        body[0..2].copy_from_slice(&pmc.to_le_bytes());
        body[2..4].copy_from_slice(&pmcsr.to_le_bytes());
        let mut wmask = vec![0u8; 6];
        wmask[2..4].copy_from_slice(&PM_STATE_MASK.to_le_bytes());
        Self {
            id: cap_id::POWER_MANAGEMENT,
            body,
            wmask,
            w1cmask: vec![0; 6],
        }
    }

    /// PCI Express (0x10), capability version 2, endpoint, 2.5 GT/s x1 link, 128-byte max
    /// payload, role-based error reporting. Device control, link control and the device
    /// status error bits (W1C) are writable; everything else is read-only.
    pub fn pci_express(cfg: PcieCapConfig) -> Self {
        // Offsets below are relative to the capability start; body index = offset - 2.
        let mut body = vec![0u8; PCIE_CAP_LEN - 2];
        let mut wmask = vec![0u8; PCIE_CAP_LEN - 2];
        let mut w1c = vec![0u8; PCIE_CAP_LEN - 2];
        fn put(v: &mut [u8], off: usize, bytes: &[u8]) {
            v[off - 2..off - 2 + bytes.len()].copy_from_slice(bytes);
        }
        // 0x02 PCIe capabilities: version 2, device/port type 0 (endpoint).
        put(&mut body, 0x02, &0x0002u16.to_le_bytes());
        // 0x04 device capabilities: MPS 128 B, role-based error reporting, optional FLR.
        let devcap: u32 = (1 << 15) | if cfg.flr { 1 << 28 } else { 0 };
        put(&mut body, 0x04, &devcap.to_le_bytes());
        // 0x08 device control: spec defaults relaxed ordering, no snoop, MRRS 512 B.
        put(&mut body, 0x08, &0x2810u16.to_le_bytes());
        let devctl_w: u16 = 0x78ff | if cfg.flr { PCIE_DEVCTL_FLR } else { 0 };
        put(&mut wmask, 0x08, &devctl_w.to_le_bytes());
        // 0x0a device status: error detected bits are W1C.
        put(&mut w1c, 0x0a, &0x000fu16.to_le_bytes());
        // 0x0c link capabilities: 2.5 GT/s, x1.
        put(&mut body, 0x0c, &0x0000_0011u32.to_le_bytes());
        // 0x10 link control: ASPM, RCB, common clock, extended synch writable.
        put(&mut wmask, 0x10, &0x00cbu16.to_le_bytes());
        // 0x12 link status: 2.5 GT/s, x1.
        put(&mut body, 0x12, &0x0011u16.to_le_bytes());
        // 0x2c link capabilities 2: supported speeds vector = 2.5 GT/s.
        put(&mut body, 0x2c, &0x0000_0002u32.to_le_bytes());
        // 0x30 link control 2: target link speed 2.5 GT/s.
        put(&mut body, 0x30, &0x0001u16.to_le_bytes());
        Self {
            id: cap_id::PCI_EXPRESS,
            body,
            wmask,
            w1cmask: w1c,
        }
    }

    /// MSI-X (0x11) with `vectors` (1..=2048) entries, table and PBA at `(bar, offset)`
    /// (offsets 8-byte aligned, checked by the caller). Enable and function mask writable.
    pub(crate) fn msix(vectors: u16, table: (u8, u32), pba: (u8, u32)) -> Self {
        let ctrl = vectors.saturating_sub(1) & 0x07ff;
        let mut body = vec![0u8; 10];
        body[0..2].copy_from_slice(&ctrl.to_le_bytes());
        body[2..6].copy_from_slice(&(table.1 | u32::from(table.0 & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba.1 | u32::from(pba.0 & 7)).to_le_bytes());
        let mut wmask = vec![0u8; 10];
        wmask[0..2].copy_from_slice(&(MSIX_CTRL_ENABLE | MSIX_CTRL_FMASK).to_le_bytes());
        Self {
            id: cap_id::MSIX,
            body,
            wmask,
            w1cmask: vec![0; 10],
        }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Length including the id/next bytes.
    pub fn len(&self) -> usize {
        self.body.len() + 2
    }

    /// Never true: a capability has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Place `caps` in order from 0x40, link them and point 0x34 at the first one.
pub(crate) fn install(
    cfg: &mut ConfigSpace,
    caps: &[Capability],
) -> Result<Vec<CapInfo>, CapError> {
    let mut infos = Vec::with_capacity(caps.len());
    let mut off = reg::CAP_START;
    for cap in caps {
        let end = off + cap.len();
        if end > reg::EXT_CAP_START {
            return Err(CapError::NoRoom {
                id: cap.id.into(),
                offset: off,
                len: cap.len(),
            });
        }
        infos.push(CapInfo {
            id: cap.id,
            offset: off as u16,
            len: cap.len() as u16,
        });
        off = (end + 3) & !3;
    }
    for (i, (cap, info)) in caps.iter().zip(&infos).enumerate() {
        let o = usize::from(info.offset);
        let next = infos.get(i + 1).map_or(0, |n| n.offset as u8);
        cfg.set_bytes(o, &[cap.id, next])?;
        cfg.set_bytes(o + 2, &cap.body)?;
        cfg.set_wmask(o + 2, &cap.wmask)?;
        cfg.set_w1cmask(o + 2, &cap.w1cmask)?;
    }
    if let Some(first) = infos.first() {
        cfg.set_u8(reg::CAPABILITY_LIST, first.offset as u8)?;
        let st = cfg.u16_at(reg::STATUS) | status::CAP_LIST;
        cfg.set_u16(reg::STATUS, st)?;
    }
    Ok(infos)
}

/// A malformed capability chain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CapWalkError {
    #[error("capability pointer {0:#x} is outside 0x40..0x100 or not dword aligned")]
    BadPointer(usize),
    #[error("capability chain loops back to {0:#x}")]
    Loop(usize),
    #[error("the image is shorter than 256 bytes")]
    Short,
}

/// Walk the standard capability chain of a config image: `(id, offset)` in chain order.
/// Empty if the status CAP_LIST bit is clear. Rejects pointers outside 0x40..0xff, unaligned
/// pointers and loops (a strict version of what guests do).
pub fn walk_capabilities(image: &[u8]) -> Result<Vec<(u8, usize)>, CapWalkError> {
    if image.len() < 256 {
        return Err(CapWalkError::Short);
    }
    let st = u16::from_le_bytes([image[reg::STATUS], image[reg::STATUS + 1]]);
    if st & status::CAP_LIST == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut ptr = usize::from(image[reg::CAPABILITY_LIST]);
    while ptr != 0 {
        if !(reg::CAP_START..reg::EXT_CAP_START - 1).contains(&ptr) || ptr % 4 != 0 {
            return Err(CapWalkError::BadPointer(ptr));
        }
        if !seen.insert(ptr) {
            return Err(CapWalkError::Loop(ptr));
        }
        out.push((image[ptr], ptr));
        ptr = usize::from(image[ptr + 1]);
    }
    Ok(out)
}

/// A PCI Express extended capability (in the 4096-byte space, from 0x100): id, version and
/// the bytes after the 4-byte header, with masks of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtCapability {
    id: u16,
    version: u8,
    body: Vec<u8>,
    wmask: Vec<u8>,
    w1cmask: Vec<u8>,
}

/// Where an extended capability was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtCapInfo {
    pub id: u16,
    /// Offset of the header dword.
    pub offset: u16,
    /// Length including the header.
    pub len: u16,
}

impl ExtCapability {
    /// An extended capability from raw parts (`version` 0..=15). The body is padded to
    /// whole dwords when placed.
    pub fn raw(
        id: u16,
        version: u8,
        body: Vec<u8>,
        wmask: Vec<u8>,
        w1cmask: Vec<u8>,
    ) -> Result<Self, CapError> {
        let len = body.len();
        if version > 0xf || len + 4 > reg::EXT_CAP_SPACE_END - reg::EXT_CAP_START {
            return Err(CapError::TooLong { id, len });
        }
        if wmask.len() != len || w1cmask.len() != len {
            return Err(CapError::MaskLength { id, len });
        }
        Ok(Self {
            id,
            version,
            body,
            wmask,
            w1cmask,
        })
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    /// Length including the header.
    pub fn len(&self) -> usize {
        self.body.len() + 4
    }

    /// Never true: a capability has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Place extended capabilities in order from 0x100 (dword aligned) and link them. With
/// none, the header at 0x100 stays 0 ("no extended capabilities").
pub(crate) fn install_ext(
    cfg: &mut ConfigSpace,
    caps: &[ExtCapability],
) -> Result<Vec<ExtCapInfo>, CapError> {
    let mut infos = Vec::with_capacity(caps.len());
    let mut off = reg::EXT_CAP_START;
    for cap in caps {
        let end = off + cap.len();
        if end > cfg.size() || end > reg::EXT_CAP_SPACE_END {
            return Err(CapError::NoRoom {
                id: cap.id,
                offset: off,
                len: cap.len(),
            });
        }
        infos.push(ExtCapInfo {
            id: cap.id,
            offset: off as u16,
            len: cap.len() as u16,
        });
        off = (end + 3) & !3;
    }
    for (i, (cap, info)) in caps.iter().zip(&infos).enumerate() {
        let o = usize::from(info.offset);
        let next = infos.get(i + 1).map_or(0, |n| u32::from(n.offset));
        let header = u32::from(cap.id) | (u32::from(cap.version) << 16) | (next << 20);
        cfg.set_u32(o, header)?;
        cfg.set_bytes(o + 4, &cap.body)?;
        cfg.set_wmask(o + 4, &cap.wmask)?;
        cfg.set_w1cmask(o + 4, &cap.w1cmask)?;
    }
    Ok(infos)
}

/// Walk the extended capability chain: `(id, version, offset)` in chain order. Empty when
/// the image is 256 bytes or the header at 0x100 is 0 or all-ones.
pub fn walk_ext_capabilities(image: &[u8]) -> Result<Vec<(u16, u8, usize)>, CapWalkError> {
    let mut out = Vec::new();
    if image.len() <= reg::EXT_CAP_START {
        return Ok(out);
    }
    let dword = |o: usize| -> Option<u32> {
        let b = image.get(o..o + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut seen = BTreeSet::new();
    let mut ptr = reg::EXT_CAP_START;
    loop {
        if ptr < reg::EXT_CAP_START || ptr % 4 != 0 {
            return Err(CapWalkError::BadPointer(ptr));
        }
        let h = dword(ptr).ok_or(CapWalkError::BadPointer(ptr))?;
        if h == 0 || h == u32::MAX {
            if ptr == reg::EXT_CAP_START {
                return Ok(out);
            }
            return Err(CapWalkError::BadPointer(ptr));
        }
        if !seen.insert(ptr) {
            return Err(CapWalkError::Loop(ptr));
        }
        out.push(((h & 0xffff) as u16, ((h >> 16) & 0xf) as u8, ptr));
        ptr = (h >> 20) as usize;
        if ptr == 0 {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::ConfigSize;

    fn space_with(caps: &[Capability]) -> (ConfigSpace, Vec<CapInfo>) {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let infos = install(&mut c, caps).unwrap();
        (c, infos)
    }

    #[test]
    fn chain_is_linked_aligned_and_walkable() {
        let caps = [
            Capability::pci_express(PcieCapConfig::default()),
            Capability::power_management(),
            Capability::vendor(&[1, 4, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]).unwrap(),
            // 5 bytes total: the next cap must be realigned to 4.
            Capability::vendor(&[0xaa, 0xbb]).unwrap(),
            Capability::msix(4, (1, 0), (1, 0x800)),
        ];
        let (c, infos) = space_with(&caps);
        let offs: Vec<u16> = infos.iter().map(|i| i.offset).collect();
        assert_eq!(offs, vec![0x40, 0x7c, 0x84, 0x94, 0x9c]);
        assert_eq!(c.u8_at(reg::CAPABILITY_LIST), 0x40);
        assert_ne!(c.u16_at(reg::STATUS) & status::CAP_LIST, 0);
        let walked = walk_capabilities(c.bytes()).unwrap();
        assert_eq!(
            walked,
            vec![
                (cap_id::PCI_EXPRESS, 0x40),
                (cap_id::POWER_MANAGEMENT, 0x7c),
                (cap_id::VENDOR, 0x84),
                (cap_id::VENDOR, 0x94),
                (cap_id::MSIX, 0x9c),
            ]
        );
        // Vendor length bytes.
        assert_eq!(c.u8_at(0x86), 16);
        assert_eq!(c.u8_at(0x96), 5);
        assert_eq!(c.u8_at(0x97), 0xaa);
        // Every cap lies inside the standard space.
        for i in &infos {
            assert!(usize::from(i.offset) + usize::from(i.len) <= 0x100);
        }
    }

    #[test]
    fn no_caps_means_no_list() {
        let (c, infos) = space_with(&[]);
        assert!(infos.is_empty());
        assert_eq!(c.u8_at(reg::CAPABILITY_LIST), 0);
        assert_eq!(c.u16_at(reg::STATUS) & status::CAP_LIST, 0);
        assert_eq!(walk_capabilities(c.bytes()).unwrap(), vec![]);
    }

    #[test]
    fn header_bytes_are_read_only() {
        let (mut c, _) = space_with(&[
            Capability::power_management(),
            Capability::power_management(),
        ]);
        c.write(0x40, &[0xff, 0xff, 0xff, 0xff]).unwrap();
        c.write(reg::CAPABILITY_LIST as u64, &[0x80]).unwrap();
        assert_eq!(c.u8_at(0x40), cap_id::POWER_MANAGEMENT);
        assert_eq!(c.u8_at(0x41), 0x48);
        assert_eq!(c.u16_at(0x42), 0x0003);
        assert_eq!(c.u8_at(reg::CAPABILITY_LIST), 0x40);
    }

    #[test]
    fn chain_overflow_is_refused() {
        let big = Capability::vendor(&[0u8; 100]).unwrap();
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let r = install(&mut c, &[big.clone(), big]);
        assert!(matches!(r, Err(CapError::NoRoom { offset: 0xa8, .. })));
        assert!(Capability::vendor(&[0u8; 253]).is_err());
        assert!(Capability::raw(0x20, vec![0; 4], vec![0; 3], vec![0; 4]).is_err());
    }

    #[test]
    fn walker_rejects_loops_and_bad_pointers() {
        let (c, _) = space_with(&[
            Capability::power_management(),
            Capability::power_management(),
        ]);
        let mut img = c.bytes().to_vec();
        img[0x49] = 0x40;
        assert_eq!(walk_capabilities(&img), Err(CapWalkError::Loop(0x40)));
        img[0x49] = 0x42;
        assert_eq!(walk_capabilities(&img), Err(CapWalkError::BadPointer(0x42)));
        img[0x49] = 0x20;
        assert_eq!(walk_capabilities(&img), Err(CapWalkError::BadPointer(0x20)));
        assert_eq!(walk_capabilities(&img[..100]), Err(CapWalkError::Short));
    }

    #[test]
    fn pcie_masks() {
        let (mut c, _) = space_with(&[Capability::pci_express(PcieCapConfig { flr: true })]);
        // DevCap has FLR and RBER.
        assert_eq!(c.u32_at(0x44), (1 << 28) | (1 << 15));
        // DevCap is read-only.
        c.write(0x44, &[0xff; 4]).unwrap();
        assert_eq!(c.u32_at(0x44), (1 << 28) | (1 << 15));
        // Device control: MPS field writable, phantom functions (bit 9) not.
        c.write(0x48, &0x0220u16.to_le_bytes()).unwrap();
        assert_eq!(c.u16_at(0x48), 0x0020);
        // Device status: W1C error bits.
        c.set_u16(0x4a, 0x0005).unwrap();
        c.write(0x4a, &0x0004u16.to_le_bytes()).unwrap();
        assert_eq!(c.u16_at(0x4a), 0x0001);
        // Link status is read-only.
        c.write(0x52, &[0, 0]).unwrap();
        assert_eq!(c.u16_at(0x52), 0x0011);
    }

    #[test]
    fn msix_cap_control_bits() {
        let (mut c, _) = space_with(&[Capability::msix(2048, (3, 0), (3, 0x8000))]);
        assert_eq!(c.u16_at(0x42), 0x07ff);
        assert_eq!(c.u32_at(0x44), 3);
        assert_eq!(c.u32_at(0x48), 0x8003);
        c.write(0x42, &[0x00, 0xff]).unwrap();
        assert_eq!(c.u16_at(0x42), 0xc7ff);
        c.write(0x44, &[0xff; 8]).unwrap();
        assert_eq!(c.u32_at(0x44), 3);
    }

    #[test]
    fn ext_chain_is_linked_and_walkable() {
        let mut c = ConfigSpace::new(ConfigSize::Express);
        // No extended caps: header 0, walk empty.
        assert_eq!(walk_ext_capabilities(c.bytes()).unwrap(), vec![]);
        let caps = [
            // 6-byte body: the next cap is realigned to a dword.
            ExtCapability::raw(
                0x000b,
                1,
                vec![1, 0, 0x10, 0, 0xaa, 0xbb],
                vec![0; 6],
                vec![0; 6],
            )
            .unwrap(),
            ExtCapability::raw(0x0001, 2, vec![0; 8], vec![0xff; 8], vec![0; 8]).unwrap(),
        ];
        let infos = install_ext(&mut c, &caps).unwrap();
        assert_eq!(infos[0].offset, 0x100);
        assert_eq!(infos[1].offset, 0x10c);
        assert_eq!(c.u32_at(0x100), 0x000b | (1 << 16) | (0x10c << 20));
        assert_eq!(c.u32_at(0x10c), 0x0001 | (2 << 16));
        assert_eq!(
            walk_ext_capabilities(c.bytes()).unwrap(),
            vec![(0x000b, 1, 0x100), (0x0001, 2, 0x10c)]
        );
        // Headers are read-only, bodies follow their masks.
        c.write(0x100, &[0; 4]).unwrap();
        c.write(0x110, &[0x5a; 4]).unwrap();
        assert_eq!(c.u16_at(0x100), 0x000b);
        assert_eq!(c.u32_at(0x110), 0x5a5a_5a5a);
        // Loop detection.
        let mut img = c.bytes().to_vec();
        img[0x10e] = 0x00;
        img[0x10f] = 0x10;
        assert_eq!(walk_ext_capabilities(&img), Err(CapWalkError::Loop(0x100)));
    }

    #[test]
    fn ext_caps_need_the_express_space() {
        let mut c = ConfigSpace::new(ConfigSize::Conventional);
        let cap = ExtCapability::raw(1, 1, vec![0; 4], vec![0; 4], vec![0; 4]).unwrap();
        assert!(matches!(
            install_ext(&mut c, &[cap]),
            Err(CapError::NoRoom { offset: 0x100, .. })
        ));
        assert!(ExtCapability::raw(1, 16, vec![], vec![], vec![]).is_err());
        assert!(ExtCapability::raw(1, 1, vec![0; 4000], vec![0; 4000], vec![0; 4000]).is_err());
    }
}
