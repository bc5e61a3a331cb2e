//! Software TCP segmentation: turns a TSO frame (vnet header with GSO_TCPV4/TCPV6) into
//! MSS-sized frames with complete IP and TCP checksums, for receivers that did not
//! negotiate segmentation offload (e.g. a switch port whose guest lacks GUEST_TSO).

use crate::hdr::{fold, gso, ones_sum, VirtioNetHdr, VNET_HDR_LEN};

/// Why a frame could not be segmented (it is then dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    #[error("not a TCP GSO frame")]
    NotTcp,
    #[error("headers truncated or inconsistent")]
    Malformed,
    #[error("gso_size is zero")]
    NoMss,
    #[error("more than {0} segments")]
    TooManySegments(usize),
}

/// Segments produced at most per frame (64 KiB / 536-byte MSS is 123).
const MAX_SEGMENTS: usize = 256;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Split `frame` (vnet header + Ethernet frame) into segments; `emit` gets each one (vnet
/// header with no offload flags + frame), built in `scratch`. Returns the segment count.
pub fn segment_tcp(
    frame: &[u8],
    scratch: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> Result<usize, GsoError> {
    let h = VirtioNetHdr::parse(frame).ok_or(GsoError::Malformed)?;
    let v6 = match h.gso_kind() {
        gso::TCPV4 => false,
        gso::TCPV6 => true,
        _ => return Err(GsoError::NotTcp),
    };
    let mss = usize::from(h.gso_size.get());
    if mss == 0 {
        return Err(GsoError::NoMss);
    }
    let eth = &frame[VNET_HDR_LEN..];
    let get = |r: std::ops::Range<usize>| eth.get(r).ok_or(GsoError::Malformed);
    let mut l3 = 14;
    let mut ethertype =
        u16::from_be_bytes(get(12..14)?.try_into().map_err(|_| GsoError::Malformed)?);
    if ethertype == 0x8100 {
        l3 = 18;
        ethertype = u16::from_be_bytes(get(16..18)?.try_into().map_err(|_| GsoError::Malformed)?);
    }
    let (iphl, proto) = if v6 {
        if ethertype != 0x86dd {
            return Err(GsoError::Malformed);
        }
        (40, get(l3 + 6..l3 + 7)?[0])
    } else {
        if ethertype != 0x0800 {
            return Err(GsoError::Malformed);
        }
        let vihl = get(l3..l3 + 1)?[0];
        if vihl >> 4 != 4 {
            return Err(GsoError::Malformed);
        }
        (usize::from(vihl & 0xf) * 4, get(l3 + 9..l3 + 10)?[0])
    };
    if proto != 6 || iphl < 20 {
        return Err(GsoError::NotTcp);
    }
    let l4 = l3 + iphl;
    let thl = usize::from(get(l4 + 12..l4 + 13)?[0] >> 4) * 4;
    if thl < 20 {
        return Err(GsoError::Malformed);
    }
    let payload = l4 + thl;
    let total = eth.len();
    if payload > total {
        return Err(GsoError::Malformed);
    }
    let count = (total - payload).div_ceil(mss).max(1);
    if count > MAX_SEGMENTS {
        return Err(GsoError::TooManySegments(MAX_SEGMENTS));
    }
    let seq0 = u32::from_be_bytes(
        get(l4 + 4..l4 + 8)?
            .try_into()
            .map_err(|_| GsoError::Malformed)?,
    );
    let id0 = u16::from_be_bytes(
        get(l3 + 4..l3 + 6)?
            .try_into()
            .map_err(|_| GsoError::Malformed)?,
    );
    let flags0 = get(l4 + 13..l4 + 14)?[0];
    for i in 0..count {
        let start = payload + i * mss;
        let end = (start + mss).min(total);
        let seg_len = end - start;
        scratch.clear();
        scratch.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        scratch[10] = 1; // num_buffers, rewritten by the receiver
        scratch.extend_from_slice(&eth[..payload]);
        scratch.extend_from_slice(&eth[start..end]);
        let f = &mut scratch[VNET_HDR_LEN..];
        let tcp_len = thl + seg_len;
        if v6 {
            f[l3 + 4..l3 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        } else {
            f[l3 + 2..l3 + 4].copy_from_slice(&((iphl + tcp_len) as u16).to_be_bytes());
            f[l3 + 4..l3 + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let c = !fold(ones_sum(&f[l3..l4]));
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        f[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut fl = flags0;
        if i + 1 < count {
            fl &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            fl &= !TCP_CWR;
        }
        f[l4 + 13] = fl;
        f[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let mut sum = if v6 {
            let mut s = ones_sum(&f[l3 + 8..l3 + 40]);
            s += (tcp_len as u32 >> 16) + (tcp_len as u32 & 0xffff) + 6;
            s
        } else {
            ones_sum(&f[l3 + 12..l3 + 20]) + 6 + tcp_len as u32
        };
        sum = u32::from(fold(sum)) + ones_sum(&f[l4..]);
        let c = !fold(sum);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        emit(scratch);
    }
    Ok(count)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    pub(crate) fn tso_v4(payload: usize, mss: u16, flags: u8) -> Vec<u8> {
        let h = VirtioNetHdr {
            flags: crate::hdr::F_NEEDS_CSUM,
            gso_type: gso::TCPV4,
            hdr_len: 54.into(),
            gso_size: mss.into(),
            csum_start: 34.into(),
            csum_offset: 16.into(),
            ..Default::default()
        };
        let mut f = h.as_bytes().to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        let tot = (40 + payload) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (tot >> 8) as u8,
            tot as u8,
            0x12,
            0x34,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ]);
        f.extend_from_slice(&[169, 254, 0, 1, 169, 254, 0, 2]);
        f.extend_from_slice(&[0x30, 0x39, 0x14, 0x51]); // ports
        f.extend_from_slice(&0xffff_ff00u32.to_be_bytes()); // seq, wraps
        f.extend_from_slice(&[0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload).map(|i| i as u8));
        f
    }

    pub(crate) fn tcp_ok(seg: &[u8]) -> bool {
        let f = &seg[VNET_HDR_LEN..];
        let tcp = &f[34..];
        let mut s = ones_sum(&f[26..34]) + 6 + tcp.len() as u32;
        s = u32::from(fold(s)) + ones_sum(tcp);
        fold(s) == 0xffff && fold(ones_sum(&f[14..34])) == 0xffff
    }

    #[test]
    fn v4_segments_have_right_lengths_seq_flags_and_checksums() {
        let f = tso_v4(3000, 1400, 0x18 | TCP_CWR | TCP_FIN); // PSH|ACK|CWR|FIN
        let mut segs = Vec::new();
        let n = segment_tcp(&f, &mut Vec::new(), &mut |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 3);
        let lens: Vec<_> = segs.iter().map(|s| s.len() - VNET_HDR_LEN - 54).collect();
        assert_eq!(lens, vec![1400, 1400, 200]);
        let mut data = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let e = &s[VNET_HDR_LEN..];
            assert!(tcp_ok(s), "segment {i} checksum");
            assert_eq!(s[0], 0);
            assert_eq!(s[1], gso::NONE);
            assert_eq!(u16::from_be_bytes([e[16], e[17]]) as usize, e.len() - 14);
            assert_eq!(u16::from_be_bytes([e[18], e[19]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([e[38], e[39], e[40], e[41]]);
            assert_eq!(seq, 0xffff_ff00u32.wrapping_add(1400 * i as u32));
            let fl = e[47];
            assert_eq!(fl & TCP_CWR != 0, i == 0);
            assert_eq!(fl & (TCP_FIN | TCP_PSH) != 0, i == 2);
            data.extend_from_slice(&e[54..]);
        }
        assert_eq!(data, (0..3000).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[test]
    fn refuses_bad_frames() {
        let mut sc = Vec::new();
        let mut f = tso_v4(100, 0, 0x10);
        assert_eq!(segment_tcp(&f, &mut sc, &mut |_| {}), Err(GsoError::NoMss));
        f[VNET_HDR_LEN + 14 + 9] = 17; // UDP
        f[4] = 100;
        assert_eq!(segment_tcp(&f, &mut sc, &mut |_| {}), Err(GsoError::NotTcp));
        let f = tso_v4(100, 10, 0x10);
        assert_eq!(
            segment_tcp(&f[..VNET_HDR_LEN + 40], &mut sc, &mut |_| {}),
            Err(GsoError::Malformed)
        );
        let f = tso_v4(3000, 1, 0x10);
        assert!(matches!(
            segment_tcp(&f, &mut sc, &mut |_| {}),
            Err(GsoError::TooManySegments(_))
        ));
    }

    #[test]
    fn v6_segments_carry_payload_length_and_valid_checksums() {
        let h = VirtioNetHdr {
            gso_type: gso::TCPV6,
            gso_size: 1000.into(),
            ..Default::default()
        };
        let mut f = h.as_bytes().to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0x08, 0x20, 6, 64]);
        let (src, dst) = (
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        );
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&[
            0x30, 0x39, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        f.extend(std::iter::repeat_n(7u8, 2500));
        let mut segs = Vec::new();
        assert_eq!(
            segment_tcp(&f, &mut Vec::new(), &mut |s| segs.push(s.to_vec())).unwrap(),
            3
        );
        for s in &segs {
            let e = &s[VNET_HDR_LEN..];
            let tcp = &e[54..];
            assert_eq!(u16::from_be_bytes([e[18], e[19]]) as usize, tcp.len());
            let mut sum = ones_sum(&e[22..54]) + tcp.len() as u32 + 6;
            sum = u32::from(fold(sum)) + ones_sum(tcp);
            assert_eq!(fold(sum), 0xffff);
        }
        assert_eq!(segs[2].len() - VNET_HDR_LEN - 74, 500);
    }
}
