//! BAR0 register map of the AVF VF (avf-device.md §2.1) and the bits the device interprets.

/// BAR0 size: the driver touches offsets up to 0xD040, 128 KiB as recommended.
pub const BAR0_SIZE: u64 = 128 * 1024;
/// BAR3 (MSI-X table at 0, PBA at 0x2000) size.
pub const BAR3_SIZE: u64 = 16 * 1024;
/// BAR index of the register file.
pub const REGS_BAR: u8 = 0;
/// BAR index of the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 3;
/// MSI-X table offset inside BAR3.
pub const MSIX_TABLE_OFFSET: u32 = 0;
/// PBA offset inside BAR3.
pub const MSIX_PBA_OFFSET: u32 = 0x2000;

/// Most queue pairs the device can advertise.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// `QTX_TAIL1(q)`: TX tail doorbells.
pub const QTX_TAIL: u64 = 0x0000;
/// `QRX_TAIL1(q)`: RX tail doorbells.
pub const QRX_TAIL: u64 = 0x2000;
/// `VFINT_ITRN1(i, k)`: 0x2800 + 0x40 i + 4 k.
pub const VFINT_ITRN: u64 = 0x2800;
/// `VFINT_DYN_CTLN1(k)`: control of MSI-X vector k+1.
pub const VFINT_DYN_CTLN: u64 = 0x3800;
/// Number of `DYN_CTLN1` registers.
pub const DYN_CTLN_COUNT: u64 = 64;
/// Read-to-clear cause register of vector 0.
pub const VFINT_ICR01: u64 = 0x4800;
/// `VFINT_ITR01(i)`.
pub const VFINT_ITR01: u64 = 0x4C00;
/// Enable mask of the vector-0 causes.
pub const VFINT_ICR0_ENA1: u64 = 0x5000;
/// `VFINT_STAT_CTL01`.
pub const VFINT_STAT_CTL01: u64 = 0x5400;
/// Control of MSI-X vector 0.
pub const VFINT_DYN_CTL01: u64 = 0x5C00;
pub const VF_ARQBAH: u64 = 0x6000;
pub const VF_ATQH: u64 = 0x6400;
pub const VF_ATQLEN: u64 = 0x6800;
pub const VF_ARQBAL: u64 = 0x6C00;
pub const VF_ARQT: u64 = 0x7000;
pub const VF_ARQH: u64 = 0x7400;
pub const VF_ATQBAH: u64 = 0x7800;
pub const VF_ATQBAL: u64 = 0x7C00;
pub const VF_ARQLEN: u64 = 0x8000;
pub const VF_ATQT: u64 = 0x8400;
/// Reset state (bits 1:0), read-only for the VF.
pub const VFGEN_RSTAT: u64 = 0x8800;
/// `VFQF_HENA(i)`, i < 2.
pub const VFQF_HENA: u64 = 0xC400;
/// `VFQF_HKEY(i)`, i <= 12 (13 is the driver's stray write).
pub const VFQF_HKEY: u64 = 0xCC00;
/// `VFQF_HLUT(i)`, i <= 15 (16 is the driver's stray write).
pub const VFQF_HLUT: u64 = 0xD000;
/// The driver's off-by-one writes, ignored.
pub const HKEY_STRAY: u64 = VFQF_HKEY + 4 * 13;
pub const HLUT_STRAY: u64 = VFQF_HLUT + 4 * 16;

/// RSTAT values.
pub const RSTAT_INPROGRESS: u32 = 0;
pub const RSTAT_COMPLETED: u32 = 1;
pub const RSTAT_VFACTIVE: u32 = 2;

/// ATQLEN/ARQLEN: ring length mask.
pub const AQ_LEN_MASK: u32 = 0x3FF;
/// ATQLEN/ARQLEN: error flags (VFE, OVFL, CRIT).
pub const AQ_LEN_VFE: u32 = 1 << 28;
pub const AQ_LEN_OVFL: u32 = 1 << 29;
pub const AQ_LEN_CRIT: u32 = 1 << 30;
/// ATQLEN/ARQLEN: ring enabled.
pub const AQ_LEN_ENABLE: u32 = 1 << 31;
/// ATQH/ARQH/ATQT/ARQT index mask.
pub const AQ_PTR_MASK: u32 = 0x3FF;

/// DYN_CTL bits.
pub const DYN_CTL_INTENA: u32 = 1 << 0;
pub const DYN_CTL_CLEARPBA: u32 = 1 << 1;
pub const DYN_CTL_SWINT_TRIG: u32 = 1 << 2;
pub const DYN_CTL_INTENA_MSK: u32 = 1 << 31;

/// ICR01 / ICR0_ENA1 cause bits.
pub const ICR0_QUEUE_0: u32 = 1 << 1;
pub const ICR0_LINK_STAT_CHANGE: u32 = 1 << 25;
pub const ICR0_ADMINQ: u32 = 1 << 30;

/// Whether `off` (4-byte aligned) is the tail register of a TX queue; returns the queue.
pub fn tx_tail_queue(off: u64) -> Option<u16> {
    queue_of(off, QTX_TAIL)
}

/// Whether `off` (4-byte aligned) is the tail register of an RX queue; returns the queue.
pub fn rx_tail_queue(off: u64) -> Option<u16> {
    queue_of(off, QRX_TAIL)
}

fn queue_of(off: u64, base: u64) -> Option<u16> {
    let rel = off.checked_sub(base)?;
    let q = rel / 4;
    (q < u64::from(MAX_QUEUE_PAIRS)).then_some(q as u16)
}

/// The MSI-X vector a DYN_CTL register controls, if `off` is one.
pub fn dyn_ctl_vector(off: u64) -> Option<u16> {
    if off == VFINT_DYN_CTL01 {
        return Some(0);
    }
    let rel = off.checked_sub(VFINT_DYN_CTLN)?;
    let k = rel / 4;
    (k < DYN_CTLN_COUNT).then_some(k as u16 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_and_vector_decoding() {
        assert_eq!(tx_tail_queue(0x0), Some(0));
        assert_eq!(tx_tail_queue(0x3C), Some(15));
        assert_eq!(tx_tail_queue(0x40), None);
        assert_eq!(rx_tail_queue(0x2004), Some(1));
        assert_eq!(rx_tail_queue(0x1FFC), None);
        assert_eq!(dyn_ctl_vector(VFINT_DYN_CTL01), Some(0));
        assert_eq!(dyn_ctl_vector(0x3800), Some(1));
        assert_eq!(dyn_ctl_vector(0x3800 + 4 * 63), Some(64));
        assert_eq!(dyn_ctl_vector(0x3800 + 4 * 64), None);
        assert_eq!(HKEY_STRAY, 0xCC34);
        assert_eq!(HLUT_STRAY, 0xD040);
    }
}
