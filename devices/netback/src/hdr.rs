//! `virtio_net_hdr_v1` (12 bytes, the VERSION_1 layout with `num_buffers`), offload flags,
//! and the software checksum used when a receiver cannot take a partial checksum.

use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bytes of the header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;

/// `flags`: the checksum from `csum_start` to the end still has to be folded in.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was already verified.
pub const F_DATA_VALID: u8 = 2;

/// `gso_type` values.
pub mod gso {
    pub const NONE: u8 = 0;
    pub const TCPV4: u8 = 1;
    pub const UDP: u8 = 3;
    pub const TCPV6: u8 = 4;
    pub const UDP_L4: u8 = 5;
    pub const ECN: u8 = 0x80;
}

/// The header as it sits in guest and backend buffers (little endian).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: U16,
    pub gso_size: U16,
    pub csum_start: U16,
    pub csum_offset: U16,
    pub num_buffers: U16,
}

const _: () = assert!(std::mem::size_of::<VirtioNetHdr>() == VNET_HDR_LEN);

impl VirtioNetHdr {
    /// Parse the header at the start of `frame` (None if shorter than a header).
    pub fn parse(frame: &[u8]) -> Option<Self> {
        Self::read_from_prefix(frame).ok().map(|(h, _)| h)
    }

    /// GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !gso::ECN
    }

    /// Whether a receiver accepting `rx` can take this header as is.
    pub fn acceptable(&self, rx: Offloads) -> Acceptance {
        let kind = self.gso_kind();
        if kind != gso::NONE {
            let ok = match kind {
                gso::TCPV4 => rx.contains(Offloads::TSO4),
                gso::TCPV6 => rx.contains(Offloads::TSO6),
                gso::UDP => rx.contains(Offloads::UFO),
                _ => false,
            } && (self.gso_type & gso::ECN == 0 || rx.contains(Offloads::TSO_ECN));
            if !ok {
                return Acceptance::Drop;
            }
        }
        if self.flags & F_NEEDS_CSUM != 0 && !rx.contains(Offloads::CSUM) {
            return Acceptance::FinishChecksum;
        }
        Acceptance::AsIs
    }
}

/// What a receiver must do with a header it was offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    AsIs,
    /// Compute the partial checksum in software, then clear the flags.
    FinishChecksum,
    /// A segmentation offload the receiver cannot take: drop (we do not segment).
    Drop,
}

bitflags::bitflags! {
    /// Offloads a receiver accepts, as the tap's TUN_F_* bits.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Offloads: u32 {
        const CSUM = 0x01;
        const TSO4 = 0x02;
        const TSO6 = 0x04;
        const TSO_ECN = 0x08;
        const UFO = 0x10;
    }
}

impl Offloads {
    /// Drop combinations the kernel refuses: segmentation needs checksum offload.
    pub fn normalized(self) -> Self {
        if !self.contains(Self::CSUM) {
            return Self::empty();
        }
        if !self.intersects(Self::TSO4 | Self::TSO6) {
            return self - Self::TSO_ECN;
        }
        self
    }
}

/// Why a partial checksum could not be finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("checksum start {start} / offset {offset} outside a {len}-byte frame")]
pub struct ChecksumError {
    pub start: usize,
    pub offset: usize,
    pub len: usize,
}

/// Finish a NEEDS_CSUM frame in place: `buf` is header plus Ethernet frame. The field at
/// `csum_start + csum_offset` holds the pseudo-header sum (Linux's CHECKSUM_PARTIAL); the
/// one's complement sum from `csum_start` to the end is stored there and the flags cleared.
pub fn finish_checksum(buf: &mut [u8]) -> Result<(), ChecksumError> {
    let h = VirtioNetHdr::parse(buf).ok_or(ChecksumError {
        start: 0,
        offset: 0,
        len: buf.len(),
    })?;
    let frame_len = buf.len() - VNET_HDR_LEN;
    let start = usize::from(h.csum_start.get());
    let offset = usize::from(h.csum_offset.get());
    let err = ChecksumError {
        start,
        offset,
        len: frame_len,
    };
    let field = start.checked_add(offset).ok_or(err)?;
    if start >= frame_len || field.checked_add(2).is_none_or(|e| e > frame_len) {
        return Err(err);
    }
    let frame = &mut buf[VNET_HDR_LEN..];
    let sum = !fold(ones_sum(&frame[start..]));
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    buf[0] &= !F_NEEDS_CSUM;
    Ok(())
}

/// 32-bit accumulation of big-endian 16-bit words (odd tail padded with zero).
pub fn ones_sum(data: &[u8]) -> u32 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Fold a 32-bit sum to 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, gso_type: u8, start: u16, off: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags,
            gso_type,
            csum_start: U16::new(start),
            csum_offset: U16::new(off),
            ..Default::default()
        }
    }

    #[test]
    fn parse_reads_little_endian_fields() {
        let b = [1u8, 4, 0x36, 0, 0xa8, 0x05, 34, 0, 16, 0, 3, 0, 0xee];
        let h = VirtioNetHdr::parse(&b).unwrap();
        assert_eq!(h.flags, F_NEEDS_CSUM);
        assert_eq!(h.gso_kind(), gso::TCPV6);
        assert_eq!(h.hdr_len.get(), 54);
        assert_eq!(h.gso_size.get(), 1448);
        assert_eq!((h.csum_start.get(), h.csum_offset.get()), (34, 16));
        assert_eq!(h.num_buffers.get(), 3);
        assert!(VirtioNetHdr::parse(&b[..11]).is_none());
    }

    #[test]
    fn acceptance_follows_offloads() {
        let all = Offloads::all();
        let csum_only = Offloads::CSUM;
        assert_eq!(
            hdr(0, 0, 0, 0).acceptable(Offloads::empty()),
            Acceptance::AsIs
        );
        let partial = hdr(F_NEEDS_CSUM, 0, 34, 16);
        assert_eq!(partial.acceptable(csum_only), Acceptance::AsIs);
        assert_eq!(
            partial.acceptable(Offloads::empty()),
            Acceptance::FinishChecksum
        );
        let tso = hdr(F_NEEDS_CSUM, gso::TCPV4, 34, 16);
        assert_eq!(tso.acceptable(all), Acceptance::AsIs);
        assert_eq!(tso.acceptable(csum_only), Acceptance::Drop);
        let ecn = hdr(F_NEEDS_CSUM, gso::TCPV4 | gso::ECN, 34, 16);
        assert_eq!(
            ecn.acceptable(Offloads::CSUM | Offloads::TSO4),
            Acceptance::Drop
        );
        assert_eq!(hdr(0, gso::UDP_L4, 0, 0).acceptable(all), Acceptance::Drop);
    }

    #[test]
    fn normalized_requires_csum_for_tso() {
        assert_eq!(Offloads::TSO4.normalized(), Offloads::empty());
        assert_eq!(
            (Offloads::CSUM | Offloads::TSO_ECN).normalized(),
            Offloads::CSUM
        );
        assert_eq!(Offloads::all().normalized(), Offloads::all());
    }

    /// A UDP/IPv4 frame whose checksum we finish must verify: the sum over the pseudo
    /// header and the UDP segment folds to 0xffff.
    #[test]
    fn finish_checksum_produces_a_valid_udp_checksum() {
        let payload = b"hello, switch!!"; // odd length
        let udp_len = 8 + payload.len();
        let (src, dst) = ([169u8, 254, 0, 1], [169u8, 254, 0, 2]);
        let mut f = vec![0u8; VNET_HDR_LEN + 14 + 20];
        f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x08, 0]);
        let ip = VNET_HDR_LEN + 14;
        f[ip] = 0x45;
        f[ip + 9] = 17;
        f[ip + 12..ip + 16].copy_from_slice(&src);
        f[ip + 16..ip + 20].copy_from_slice(&dst);
        let mut udp = vec![0u8; 8];
        udp[0..2].copy_from_slice(&1234u16.to_be_bytes());
        udp[2..4].copy_from_slice(&5678u16.to_be_bytes());
        udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        // Pseudo-header sum, not complemented, as Linux leaves it for CHECKSUM_PARTIAL.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp[6..8].copy_from_slice(&fold(ones_sum(&pseudo)).to_be_bytes());
        f.extend_from_slice(&udp);
        f.extend_from_slice(payload);
        let h = hdr(F_NEEDS_CSUM, 0, 34, 6);
        f[..VNET_HDR_LEN].copy_from_slice(h.as_bytes());
        finish_checksum(&mut f).unwrap();
        assert_eq!(f[0] & F_NEEDS_CSUM, 0);
        let mut all = pseudo.clone();
        all.extend_from_slice(&f[VNET_HDR_LEN + 34..]);
        assert_eq!(fold(ones_sum(&all)), 0xffff);
    }

    #[test]
    fn finish_checksum_rejects_out_of_range_offsets() {
        let mut f = vec![0u8; VNET_HDR_LEN + 40];
        f[..VNET_HDR_LEN].copy_from_slice(hdr(F_NEEDS_CSUM, 0, 39, 0).as_bytes());
        assert!(finish_checksum(&mut f).is_err());
        f[..VNET_HDR_LEN].copy_from_slice(hdr(F_NEEDS_CSUM, 0, 30, 9).as_bytes());
        assert!(finish_checksum(&mut f).is_err());
        f[..VNET_HDR_LEN].copy_from_slice(hdr(F_NEEDS_CSUM, 0, 0xffff, 0xffff).as_bytes());
        assert!(finish_checksum(&mut f).is_err());
        f[..VNET_HDR_LEN].copy_from_slice(hdr(F_NEEDS_CSUM, 0, 30, 8).as_bytes());
        assert!(finish_checksum(&mut f).is_ok());
    }
}
