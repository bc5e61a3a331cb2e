//! BAR layout and the virtio vendor-specific capabilities that describe it.
//!
//! The virtio structures live in one 64-bit memory BAR ([`VIRTIO_BAR`], 16 KiB, QEMU's
//! offsets): common configuration at 0x0, ISR at 0x1000, device configuration at 0x2000,
//! notifications at 0x3000 with one dword per queue. The MSI-X table and PBA are in their
//! own 32-bit BAR ([`MSIX_BAR`]). Nothing is mmappable, so QEMU posts the notify writes.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::common_cfg::COMMON_CFG_LEN;

/// BAR holding the virtio structures (64-bit: uses BAR4 and BAR5).
pub const VIRTIO_BAR: u8 = 4;
/// Size of [`VIRTIO_BAR`].
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;

/// Offset and size of the common configuration window.
pub const COMMON_OFFSET: u64 = 0x0;
pub const COMMON_SIZE: u64 = 0x1000;
/// Offset and size of the ISR window.
pub const ISR_OFFSET: u64 = 0x1000;
pub const ISR_SIZE: u64 = 0x1000;
/// Offset and size of the device configuration window.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Offset and size of the notification window.
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_SIZE: u64 = 0x1000;
/// Bytes between two queues' notify addresses (`queue_notify_off` is the queue index).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Most queues the notify window can address.
pub const MAX_QUEUES: u16 = (NOTIFY_SIZE / NOTIFY_OFF_MULTIPLIER as u64) as u16;

const _: () = assert!(COMMON_CFG_LEN <= COMMON_SIZE);

/// `cfg_type` values of the virtio vendor capability.
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// Which virtio structure a [`VIRTIO_BAR`] offset falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarRegion {
    Common,
    Isr,
    DeviceCfg,
    Notify,
}

/// Split an offset of [`VIRTIO_BAR`] into (structure, offset inside it). `None` if the
/// access `[offset, offset+len)` is not inside a single structure.
pub fn decode(offset: u64, len: usize) -> Option<(BarRegion, u64)> {
    let (region, base, size) = match offset {
        o if o < ISR_OFFSET => (BarRegion::Common, COMMON_OFFSET, COMMON_SIZE),
        o if o < DEVICE_CFG_OFFSET => (BarRegion::Isr, ISR_OFFSET, ISR_SIZE),
        o if o < NOTIFY_OFFSET => (BarRegion::DeviceCfg, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE),
        o if o < VIRTIO_BAR_SIZE => (BarRegion::Notify, NOTIFY_OFFSET, NOTIFY_SIZE),
        _ => return None,
    };
    let rel = offset - base;
    let end = rel.checked_add(len as u64)?;
    (end <= size).then_some((region, rel))
}

/// `struct virtio_pci_cap` after the id, next and length bytes (which the PCI capability
/// builder owns).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct VirtioPciCapBody {
    pub cfg_type: u8,
    pub bar: u8,
    pub id: u8,
    pub padding: [u8; 2],
    pub offset: U32,
    pub length: U32,
}

/// Offsets inside the whole capability (from its id byte).
pub mod cap_off {
    pub const CFG_TYPE: usize = 3;
    pub const BAR: usize = 4;
    pub const OFFSET: usize = 8;
    pub const LENGTH: usize = 12;
    /// notify_off_multiplier (notify cap) or pci_cfg_data (PCI-cfg cap).
    pub const EXTRA: usize = 16;
    /// Length of the common, ISR and device caps.
    pub const CAP_LEN: usize = 16;
    /// Length of the notify and PCI-cfg caps.
    pub const CAP_LEN_EXTRA: usize = 20;
}

/// One virtio vendor capability: the bytes after the length byte and the guest-writable
/// mask for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioCap {
    pub data: Vec<u8>,
    pub wmask: Vec<u8>,
}

fn body(cfg_type: u8, bar: u8, offset: u64, length: u64) -> VirtioPciCapBody {
    VirtioPciCapBody {
        cfg_type,
        bar,
        id: 0,
        padding: [0; 2],
        // Layout constants are far below 4 GiB.
        offset: U32::new(offset as u32),
        length: U32::new(length as u32),
    }
}

/// The five virtio capabilities for `num_queues` queues and a device configuration of
/// `device_cfg_len` bytes, in chain order: common, notify, ISR, device, PCI-cfg.
pub fn virtio_caps(num_queues: u16, device_cfg_len: u64) -> Vec<VirtioCap> {
    let ro = |b: VirtioPciCapBody, extra: Option<[u8; 4]>| {
        let mut data = b.as_bytes().to_vec();
        if let Some(e) = extra {
            data.extend_from_slice(&e);
        }
        let wmask = vec![0; data.len()];
        VirtioCap { data, wmask }
    };
    let notify_len = u64::from(num_queues.clamp(1, MAX_QUEUES)) * u64::from(NOTIFY_OFF_MULTIPLIER);
    let mut caps = vec![
        ro(
            body(cfg_type::COMMON, VIRTIO_BAR, COMMON_OFFSET, COMMON_SIZE),
            None,
        ),
        ro(
            body(cfg_type::NOTIFY, VIRTIO_BAR, NOTIFY_OFFSET, notify_len),
            Some(NOTIFY_OFF_MULTIPLIER.to_le_bytes()),
        ),
        ro(body(cfg_type::ISR, VIRTIO_BAR, ISR_OFFSET, 1), None),
        ro(
            body(
                cfg_type::DEVICE,
                VIRTIO_BAR,
                DEVICE_CFG_OFFSET,
                // Linux rejects a capability of length 0 ("bad capability len"), so a
                // device without configuration still gets one readable dword.
                device_cfg_len
                    .div_ceil(4)
                    .saturating_mul(4)
                    .clamp(4, DEVICE_CFG_SIZE),
            ),
            None,
        ),
    ];
    // PCI-cfg: bar, offset, length and pci_cfg_data are written by the driver.
    let data = {
        let mut d = body(cfg_type::PCI_CFG, 0, 0, 0).as_bytes().to_vec();
        d.extend_from_slice(&[0; 4]);
        d
    };
    let mut wmask = vec![0u8; data.len()];
    // Indexes in `data` are capability offsets minus 3 (id, next, len bytes).
    wmask[cap_off::BAR - 3] = 0xff;
    for i in cap_off::OFFSET..cap_off::CAP_LEN_EXTRA {
        wmask[i - 3] = 0xff;
    }
    caps.push(VirtioCap { data, wmask });
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_regions() {
        assert_eq!(decode(0x14, 1), Some((BarRegion::Common, 0x14)));
        assert_eq!(decode(0xffc, 4), Some((BarRegion::Common, 0xffc)));
        assert_eq!(decode(0xffe, 4), None, "straddles common and ISR");
        assert_eq!(decode(0x1000, 1), Some((BarRegion::Isr, 0)));
        assert_eq!(decode(0x2004, 4), Some((BarRegion::DeviceCfg, 4)));
        assert_eq!(decode(0x3008, 2), Some((BarRegion::Notify, 8)));
        assert_eq!(decode(0x3ffc, 4), Some((BarRegion::Notify, 0xffc)));
        assert_eq!(decode(0x3ffe, 4), None);
        assert_eq!(decode(0x4000, 1), None);
        assert_eq!(decode(u64::MAX, 1), None);
    }

    #[test]
    fn cap_bytes() {
        let caps = virtio_caps(3, 60);
        assert_eq!(caps.len(), 5);
        let lens: Vec<usize> = caps.iter().map(|c| c.data.len() + 3).collect();
        assert_eq!(lens, [16, 20, 16, 16, 20]);
        let notify = &caps[1].data;
        assert_eq!(notify[0], cfg_type::NOTIFY);
        assert_eq!(notify[1], VIRTIO_BAR);
        assert_eq!(&notify[5..9], &0x3000u32.to_le_bytes());
        assert_eq!(&notify[9..13], &12u32.to_le_bytes());
        assert_eq!(&notify[13..17], &4u32.to_le_bytes());
        assert_eq!(&caps[3].data[9..13], &60u32.to_le_bytes());
        // Device cap length: whole dwords, never 0.
        assert_eq!(&virtio_caps(1, 0)[3].data[9..13], &4u32.to_le_bytes());
        assert_eq!(&virtio_caps(1, 6)[3].data[9..13], &8u32.to_le_bytes());
        assert_eq!(
            &virtio_caps(1, 1 << 20)[3].data[9..13],
            &0x1000u32.to_le_bytes()
        );
        assert!(caps[..4].iter().all(|c| c.wmask.iter().all(|&m| m == 0)));
        let pcfg = &caps[4];
        assert_eq!(pcfg.data[0], cfg_type::PCI_CFG);
        assert_eq!(pcfg.wmask[0], 0, "cfg_type read-only");
        assert_eq!(pcfg.wmask[1], 0xff, "bar writable");
        assert_eq!(&pcfg.wmask[2..5], &[0, 0, 0]);
        assert!(pcfg.wmask[5..17].iter().all(|&m| m == 0xff));
    }
}
