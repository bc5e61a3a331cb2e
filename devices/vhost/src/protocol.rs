//! vhost-user wire format (the frontend's side): message header, payload structs, request
//! codes, feature bits, and the parser of backend replies.
//!
//! Everything a backend sends goes through [`parse_header`] and [`parse_reply`]: sizes are
//! bounded before anything is read, the reply flag, version and request code are checked,
//! and payload sizes must match the request exactly.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Request codes we send.
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
}

/// Header flag bits.
pub mod flags {
    pub const VERSION_MASK: u32 = 0x3;
    pub const VERSION: u32 = 0x1;
    pub const REPLY: u32 = 1 << 2;
    pub const NEED_REPLY: u32 = 1 << 3;
}

/// Protocol feature bits we use.
pub mod proto {
    pub const MQ: u64 = 1 << 0;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const CONFIG: u64 = 1 << 9;
}

/// Virtio feature bit 30: the backend speaks GET/SET_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// SET_VRING_KICK/CALL/ERR payload bit: no fd is attached.
pub const VRING_NOFD: u64 = 1 << 8;
/// Regions in one SET_MEM_TABLE without CONFIGURE_MEM_SLOTS.
pub const MAX_MEM_REGIONS: usize = 8;
/// Largest device configuration a GET_CONFIG may carry.
pub const MAX_CONFIG_SIZE: u32 = 256;
/// Largest reply payload we read; every reply we expect is far smaller.
pub const MAX_REPLY_PAYLOAD: u32 = 4096;
/// Size of the message header.
pub const HEADER_SIZE: usize = 12;

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

/// SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE payload.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VringState {
    pub index: u32,
    pub num: u32,
}

/// SET_VRING_ADDR payload; addresses are frontend "user" addresses (see [`MemRegion`]).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VringAddr {
    pub index: u32,
    pub flags: u32,
    pub desc: u64,
    pub used: u64,
    pub avail: u64,
    pub log: u64,
}

/// SET_MEM_TABLE payload head; `nregions` [`MemRegion`]s follow.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MemTableHead {
    pub nregions: u32,
    pub padding: u32,
}

/// One shared region. `user_addr` is only a translation key for ring addresses; we use
/// the guest address itself, so ring addresses are guest addresses.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct MemRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

/// GET_CONFIG / SET_CONFIG payload head; `size` bytes of configuration follow.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ConfigHead {
    pub offset: u32,
    pub size: u32,
    pub flags: u32,
}

/// Why a backend message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("reply header has version {0}, expected 1")]
    Version(u32),
    #[error("message for request {got} is not a reply")]
    NotReply { got: u32 },
    #[error("reply to request {got} while waiting for request {want}")]
    WrongRequest { want: u32, got: u32 },
    #[error("reply payload of {size} bytes is over the {max}-byte limit")]
    TooLarge { size: u32, max: u32 },
    #[error("reply to request {request}: payload of {got} bytes, expected {want}")]
    BadSize {
        request: u32,
        want: usize,
        got: usize,
    },
    #[error("GET_CONFIG reply is for {got_off:#x}+{got_size}, asked {want_off:#x}+{want_size}")]
    ConfigMismatch {
        want_off: u32,
        want_size: u32,
        got_off: u32,
        got_size: u32,
    },
    #[error("backend refused request {request} (status {status:#x})")]
    Nack { request: u32, status: u64 },
}

/// A decoded reply payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, or a REPLY_ACK status.
    U64(u64),
    /// GET_VRING_BASE.
    State(VringState),
    /// GET_CONFIG: the configuration bytes.
    Config(Vec<u8>),
}

/// What kind of reply a request expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    U64,
    State,
    /// GET_CONFIG of `size` bytes at `offset`.
    Config {
        offset: u32,
        size: u32,
    },
}

/// Check a reply header for request `want`; returns the payload size to read next.
pub fn parse_header(bytes: &[u8; HEADER_SIZE], want: u32) -> Result<usize, ProtocolError> {
    let (h, _) = Header::read_from_prefix(bytes).map_err(|_| ProtocolError::BadSize {
        request: want,
        want: HEADER_SIZE,
        got: bytes.len(),
    })?;
    if h.flags & flags::VERSION_MASK != flags::VERSION {
        return Err(ProtocolError::Version(h.flags & flags::VERSION_MASK));
    }
    if h.flags & flags::REPLY == 0 {
        return Err(ProtocolError::NotReply { got: h.request });
    }
    if h.request != want {
        return Err(ProtocolError::WrongRequest {
            want,
            got: h.request,
        });
    }
    if h.size > MAX_REPLY_PAYLOAD {
        return Err(ProtocolError::TooLarge {
            size: h.size,
            max: MAX_REPLY_PAYLOAD,
        });
    }
    // Bounded by MAX_REPLY_PAYLOAD above.
    Ok(h.size as usize)
}

/// Decode the payload of a reply to `request` (its header passed [`parse_header`]).
pub fn parse_reply(request: u32, expect: Expect, payload: &[u8]) -> Result<Reply, ProtocolError> {
    let bad = |want: usize| ProtocolError::BadSize {
        request,
        want,
        got: payload.len(),
    };
    match expect {
        Expect::U64 => u64::read_from_bytes(payload)
            .map(Reply::U64)
            .map_err(|_| bad(8)),
        Expect::State => VringState::read_from_bytes(payload)
            .map(Reply::State)
            .map_err(|_| bad(8)),
        Expect::Config { offset, size } => {
            let (head, rest) = ConfigHead::read_from_prefix(payload).map_err(|_| bad(12))?;
            if head.offset != offset || head.size != size {
                return Err(ProtocolError::ConfigMismatch {
                    want_off: offset,
                    want_size: size,
                    got_off: head.offset,
                    got_size: head.size,
                });
            }
            // size <= MAX_CONFIG_SIZE is checked by the sender; the length must match.
            let want = 12usize.saturating_add(size as usize);
            if rest.len() != size as usize {
                return Err(bad(want));
            }
            Ok(Reply::Config(rest.to_vec()))
        }
    }
}

/// Encode a message: header plus payload.
pub fn encode(request: u32, extra_flags: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        request,
        flags: flags::VERSION | extra_flags,
        // Payloads we build are a few hundred bytes at most.
        size: u32::try_from(payload.len()).unwrap_or(u32::MAX),
    };
    let mut v = Vec::with_capacity(HEADER_SIZE + payload.len());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(payload);
    v
}

/// Decode a whole reply message (header and payload in one buffer), for fuzzing and tests.
pub fn parse_message(bytes: &[u8], request: u32, expect: Expect) -> Result<Reply, ProtocolError> {
    let head: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|h| h.try_into().ok())
        .ok_or(ProtocolError::BadSize {
            request,
            want: HEADER_SIZE,
            got: bytes.len(),
        })?;
    let size = parse_header(head, request)?;
    let payload =
        bytes
            .get(HEADER_SIZE..)
            .filter(|p| p.len() == size)
            .ok_or(ProtocolError::BadSize {
                request,
                want: size,
                got: bytes.len().saturating_sub(HEADER_SIZE),
            })?;
    parse_reply(request, expect, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(request: u32, payload: &[u8]) -> Vec<u8> {
        encode(request, flags::REPLY, payload)
    }

    #[test]
    fn u64_and_state_replies_decode() {
        let m = reply(req::GET_FEATURES, &0x1234u64.to_le_bytes());
        assert_eq!(
            parse_message(&m, req::GET_FEATURES, Expect::U64),
            Ok(Reply::U64(0x1234))
        );
        let s = VringState { index: 1, num: 77 };
        let m = reply(req::GET_VRING_BASE, s.as_bytes());
        assert_eq!(
            parse_message(&m, req::GET_VRING_BASE, Expect::State),
            Ok(Reply::State(s))
        );
    }

    #[test]
    fn header_checks_reply_flag_version_request_and_size() {
        let mut m = encode(req::GET_FEATURES, 0, &0u64.to_le_bytes());
        assert!(matches!(
            parse_message(&m, req::GET_FEATURES, Expect::U64),
            Err(ProtocolError::NotReply { .. })
        ));
        m[4] = (flags::REPLY | 2) as u8;
        assert_eq!(
            parse_message(&m, req::GET_FEATURES, Expect::U64),
            Err(ProtocolError::Version(2))
        );
        let m = reply(req::GET_QUEUE_NUM, &0u64.to_le_bytes());
        assert!(matches!(
            parse_message(&m, req::GET_FEATURES, Expect::U64),
            Err(ProtocolError::WrongRequest { want: 1, got: 17 })
        ));
        let mut m = reply(req::GET_FEATURES, &[]);
        m[8..12].copy_from_slice(&(MAX_REPLY_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            parse_header(m[..12].try_into().unwrap(), req::GET_FEATURES),
            Err(ProtocolError::TooLarge { .. })
        ));
        let m = reply(req::GET_FEATURES, &[0; 4]);
        assert!(matches!(
            parse_message(&m, req::GET_FEATURES, Expect::U64),
            Err(ProtocolError::BadSize {
                want: 8,
                got: 4,
                ..
            })
        ));
    }

    #[test]
    fn config_reply_must_match_the_request() {
        let mut p = ConfigHead {
            offset: 0,
            size: 4,
            flags: 0,
        }
        .as_bytes()
        .to_vec();
        p.extend_from_slice(&[1, 2, 3, 4]);
        let want = Expect::Config { offset: 0, size: 4 };
        assert_eq!(
            parse_reply(req::GET_CONFIG, want, &p),
            Ok(Reply::Config(vec![1, 2, 3, 4]))
        );
        // Short body, and a reply for other bytes (libvhost-user answers size 0 on error).
        assert!(parse_reply(req::GET_CONFIG, want, &p[..14]).is_err());
        let bad = Expect::Config { offset: 0, size: 8 };
        assert!(matches!(
            parse_reply(req::GET_CONFIG, bad, &p),
            Err(ProtocolError::ConfigMismatch { .. })
        ));
    }
}
