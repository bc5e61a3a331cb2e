//! VERSION negotiation: parsing the peer's capabilities JSON and formatting ours.
//!
//! Parsing is strict about what it reads (wrong types or out-of-range values are EINVAL,
//! the JSON must be NUL-terminated and at most [`MAX_VERSION_JSON`] bytes) and lenient about
//! what it does not know (unknown keys are ignored). Our reply is kept short: QEMU rejects a
//! VERSION reply larger than its own request, so keys are added in priority order only
//! while they fit.

use serde_json::{Map, Value};
use zerocopy::{FromBytes, IntoBytes};

use crate::device::Errno;
use crate::wire::{
    Version, MAX_DATA_XFER_SIZE, MAX_MSG_FDS, MAX_VERSION_JSON, VERSION_MAJOR, VERSION_MINOR,
};

/// Spec default of `max_msg_fds` when the peer leaves it out.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Spec default of `max_dma_maps`.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Spec default of `pgsizes`.
pub const DEFAULT_PGSIZES: u64 = 4096;

/// Capabilities a peer announced (spec defaults for what it left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCaps {
    pub major: u16,
    pub minor: u16,
    pub max_msg_fds: u32,
    pub max_data_xfer_size: u64,
    pub max_dma_maps: u32,
    pub pgsizes: u64,
    pub write_multiple: bool,
    pub twin_socket: bool,
    /// The JSON has QEMU's fingerprint (`write_multiple` plus `migration.max_bitmap_size`).
    pub looks_like_qemu: bool,
    /// The JSON itself (bytes after the version numbers, NUL included) was present.
    pub has_json: bool,
}

impl Default for PeerCaps {
    fn default() -> Self {
        Self {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: MAX_DATA_XFER_SIZE as u64,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: DEFAULT_PGSIZES,
            write_multiple: false,
            twin_socket: false,
            looks_like_qemu: false,
            has_json: false,
        }
    }
}

fn get_u64(caps: &Map<String, Value>, key: &str, min: u64, max: u64) -> Result<Option<u64>, Errno> {
    match caps.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => {
                log::warn!("VERSION: capability {key} = {v} is invalid");
                Err(Errno::EINVAL)
            }
        },
    }
}

/// Parse a VERSION payload (`u16 major, u16 minor, [json NUL]`).
pub fn parse_version(payload: &[u8]) -> Result<PeerCaps, Errno> {
    let (ver, json) = Version::read_from_prefix(payload).map_err(|_| Errno::EINVAL)?;
    let mut caps = PeerCaps {
        major: ver.major,
        minor: ver.minor,
        ..PeerCaps::default()
    };
    if json.is_empty() {
        return Ok(caps);
    }
    if json.len() > MAX_VERSION_JSON {
        log::warn!("VERSION: JSON of {} bytes is too long", json.len());
        return Err(Errno::E2BIG);
    }
    let Some((&0, text)) = json.split_last() else {
        log::warn!("VERSION: JSON is not NUL-terminated");
        return Err(Errno::EINVAL);
    };
    if text.contains(&0) {
        return Err(Errno::EINVAL);
    }
    caps.has_json = true;
    let value: Value = serde_json::from_slice(text).map_err(|e| {
        log::warn!("VERSION: malformed JSON: {e}");
        Errno::EINVAL
    })?;
    let top = value.as_object().ok_or(Errno::EINVAL)?;
    let Some(c) = top.get("capabilities") else {
        return Ok(caps);
    };
    let c = c.as_object().ok_or_else(|| {
        log::warn!("VERSION: capabilities is not an object");
        Errno::EINVAL
    })?;
    if let Some(n) = get_u64(c, "max_msg_fds", 1, u32::MAX as u64)? {
        caps.max_msg_fds = n as u32;
    }
    if let Some(n) = get_u64(c, "max_data_xfer_size", 1, u32::MAX as u64)? {
        caps.max_data_xfer_size = n;
    }
    if let Some(n) = get_u64(c, "max_dma_maps", 1, u32::MAX as u64)? {
        caps.max_dma_maps = n as u32;
    }
    if let Some(n) = get_u64(c, "pgsizes", 1, u64::MAX)? {
        if n & DEFAULT_PGSIZES == 0 {
            log::warn!("VERSION: pgsizes {n:#x} lacks 4 KiB pages");
            return Err(Errno::EINVAL);
        }
        caps.pgsizes = n;
    }
    let mut bitmap = false;
    if let Some(m) = c.get("migration") {
        let m = m.as_object().ok_or(Errno::EINVAL)?;
        bitmap = m.contains_key("max_bitmap_size");
    }
    if let Some(w) = c.get("write_multiple") {
        caps.write_multiple = w.as_bool().ok_or(Errno::EINVAL)?;
    }
    if let Some(t) = c.get("twin_socket") {
        let t = t.as_object().ok_or(Errno::EINVAL)?;
        if let Some(s) = t.get("supported") {
            caps.twin_socket = s.as_bool().ok_or(Errno::EINVAL)?;
        }
    }
    caps.looks_like_qemu = c.contains_key("write_multiple") && bitmap;
    Ok(caps)
}

/// What a server is willing to advertise.
#[derive(Debug, Clone, Copy)]
pub struct ServerCaps {
    pub max_msg_fds: u32,
    pub max_data_xfer_size: u64,
    pub max_dma_maps: u32,
    pub pgsizes: u64,
    pub write_multiple: bool,
}

impl Default for ServerCaps {
    fn default() -> Self {
        Self {
            max_msg_fds: MAX_MSG_FDS as u32,
            max_data_xfer_size: MAX_DATA_XFER_SIZE as u64,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: DEFAULT_PGSIZES,
            write_multiple: false,
        }
    }
}

/// Our VERSION reply payload for a client that sent `request_payload_len` payload bytes.
/// The result is never longer than the request, always NUL-terminated when it carries
/// JSON, and its minor is ≤ the client's. Keys are added by priority while they fit.
pub fn format_reply(client: &PeerCaps, request_payload_len: usize, ours: &ServerCaps) -> Vec<u8> {
    // Kept as min() so that raising VERSION_MINOR stays correct.
    #[allow(clippy::unnecessary_min_or_max)]
    let minor = client.minor.min(VERSION_MINOR);
    let ver = Version {
        major: VERSION_MAJOR,
        minor,
    };
    let head = ver.as_bytes();
    let budget = request_payload_len.saturating_sub(head.len());
    let mut entries: Vec<String> = vec![
        format!("\"max_msg_fds\":{}", ours.max_msg_fds),
        format!("\"max_data_xfer_size\":{}", ours.max_data_xfer_size),
    ];
    if ours.write_multiple && client.write_multiple {
        entries.push("\"write_multiple\":true".to_string());
    }
    entries.push(format!(
        "\"max_dma_maps\":{}",
        ours.max_dma_maps.min(client.max_dma_maps)
    ));
    entries.push(format!("\"pgsizes\":{}", ours.pgsizes & client.pgsizes));
    let render = |keys: &[&String]| -> String {
        let inner: Vec<&str> = keys.iter().map(|s| s.as_str()).collect();
        format!("{{\"capabilities\":{{{}}}}}", inner.join(","))
    };
    let mut chosen: Vec<&String> = Vec::new();
    for e in &entries {
        chosen.push(e);
        if render(&chosen).len() + 1 > budget {
            chosen.pop();
        }
    }
    let mut out = head.to_vec();
    if !chosen.is_empty() {
        out.extend_from_slice(render(&chosen).as_bytes());
        out.push(0);
    } else if budget > "{}".len() && client.has_json {
        out.extend_from_slice(b"{}\0");
    }
    out
}

/// Our capabilities JSON as a client (QEMU-like, without the migration leftovers).
pub fn format_client_request(
    max_msg_fds: u32,
    max_data_xfer_size: u64,
    max_dma_maps: u32,
) -> Vec<u8> {
    let ver = Version {
        major: VERSION_MAJOR,
        minor: VERSION_MINOR,
    };
    let mut out = ver.as_bytes().to_vec();
    out.extend_from_slice(
        format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{max_msg_fds},\"max_data_xfer_size\":{max_data_xfer_size},\"max_dma_maps\":{max_dma_maps},\"pgsizes\":4096}}}}"
        )
        .as_bytes(),
    );
    out.push(0);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The JSON QEMU 11.1 sent in `qemu-11.1-gpio-shared.decoded.txt` (message size 214).
    pub(crate) const QEMU_JSON: &str = "{\"capabilities\": {\"pgsizes\": 4096, \"max_msg_fds\": 16, \"max_dma_maps\": 65535, \"max_data_xfer_size\": 1048576, \"migration\": {\"max_bitmap_size\": 268435456, \"pgsize\": 4096}, \"write_multiple\": true}}";

    pub(crate) fn qemu_payload() -> Vec<u8> {
        let mut p = vec![0u8, 0, 0, 0];
        p.extend_from_slice(QEMU_JSON.as_bytes());
        p.push(0);
        p
    }

    fn payload(json: &str) -> Vec<u8> {
        let mut p = vec![0u8, 0, 0, 0];
        p.extend_from_slice(json.as_bytes());
        p.push(0);
        p
    }

    #[test]
    fn qemu_request_parses_and_reply_fits() {
        let p = qemu_payload();
        assert_eq!(p.len() + 16, 214);
        let c = parse_version(&p).unwrap();
        assert_eq!(c.max_msg_fds, 16);
        assert_eq!(c.max_data_xfer_size, 1 << 20);
        assert_eq!(c.max_dma_maps, 65535);
        assert!(c.write_multiple && c.looks_like_qemu);
        let r = format_reply(&c, p.len(), &ServerCaps::default());
        assert!(r.len() <= p.len());
        assert_eq!(*r.last().unwrap(), 0);
        let json = std::str::from_utf8(&r[4..r.len() - 1]).unwrap();
        assert_eq!(
            json,
            "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,\"max_dma_maps\":65535,\"pgsizes\":4096}}"
        );
        assert!(!json.contains("write_multiple"));
        assert!(!json.contains("twin_socket"));
        // Our own parser accepts our reply.
        let back = parse_version(&r).unwrap();
        assert_eq!(back.max_msg_fds, 16);
    }

    #[test]
    fn write_multiple_only_when_enabled_and_offered() {
        let c = parse_version(&qemu_payload()).unwrap();
        let ours = ServerCaps {
            write_multiple: true,
            ..ServerCaps::default()
        };
        let r = format_reply(&c, 4096, &ours);
        assert!(std::str::from_utf8(&r[4..])
            .unwrap()
            .contains("\"write_multiple\":true"));
        let plain = parse_version(&payload("{\"capabilities\":{}}")).unwrap();
        let r = format_reply(&plain, 4096, &ours);
        assert!(!std::str::from_utf8(&r[4..])
            .unwrap()
            .contains("write_multiple"));
    }

    #[test]
    fn tiny_request_gets_tiny_reply() {
        let c = parse_version(&[0, 0, 0, 0]).unwrap();
        assert!(!c.has_json);
        let r = format_reply(&c, 4, &ServerCaps::default());
        assert_eq!(r, vec![0, 0, 0, 0]);
        // A 40-byte budget only fits max_msg_fds.
        let c = parse_version(&payload("{}")).unwrap();
        let r = format_reply(&c, 40, &ServerCaps::default());
        assert!(r.len() <= 40);
        assert_eq!(&r[4..], b"{\"capabilities\":{\"max_msg_fds\":16}}\0");
        let r = format_reply(&c, 8, &ServerCaps::default());
        assert_eq!(&r[4..], b"{}\0");
    }

    #[test]
    fn minor_never_above_clients() {
        let mut p = qemu_payload();
        p[2] = 5; // client minor 5
        let c = parse_version(&p).unwrap();
        let r = format_reply(&c, p.len(), &ServerCaps::default());
        assert_eq!(u16::from_ne_bytes([r[2], r[3]]), VERSION_MINOR);
    }

    #[test]
    fn bad_inputs_are_einval() {
        let cases = [
            "{\"capabilities\": 5}",
            "{\"capabilities\": {\"max_msg_fds\": \"16\"}}",
            "{\"capabilities\": {\"max_msg_fds\": 0}}",
            "{\"capabilities\": {\"max_msg_fds\": -1}}",
            "{\"capabilities\": {\"max_data_xfer_size\": 1.5}}",
            "{\"capabilities\": {\"max_data_xfer_size\": 99999999999999}}",
            "{\"capabilities\": {\"pgsizes\": 8192}}",
            "{\"capabilities\": {\"write_multiple\": 1}}",
            "{\"capabilities\": {\"migration\": []}}",
            "{\"capabilities\": {\"twin_socket\": {\"supported\": \"yes\"}}}",
            "[1,2]",
            "{\"capabilities\": {",
        ];
        for j in cases {
            assert_eq!(parse_version(&payload(j)), Err(Errno::EINVAL), "{j}");
        }
        // Not NUL-terminated.
        let mut p = payload("{}");
        p.pop();
        assert_eq!(parse_version(&p), Err(Errno::EINVAL));
        // Interior NUL.
        assert_eq!(parse_version(&payload("{}\0{}")), Err(Errno::EINVAL));
        // Too short for the version head.
        assert_eq!(parse_version(&[0, 0]), Err(Errno::EINVAL));
        // Too long.
        let long = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_VERSION_JSON));
        assert_eq!(parse_version(&payload(&long)), Err(Errno::E2BIG));
    }

    #[test]
    fn unknown_keys_ignored_and_defaults_apply() {
        let c = parse_version(&payload(
            "{\"capabilities\":{\"frobnicate\":[1],\"pgsizes\":4096}}",
        ))
        .unwrap();
        assert_eq!(c.max_msg_fds, DEFAULT_MAX_MSG_FDS);
        assert!(!c.looks_like_qemu);
        let c = parse_version(&payload("{\"other\":1}")).unwrap();
        assert_eq!(c.max_dma_maps, DEFAULT_MAX_DMA_MAPS);
    }

    #[test]
    fn client_request_roundtrips() {
        let r = format_client_request(8, 65536, 100);
        let c = parse_version(&r).unwrap();
        assert_eq!(
            (c.max_msg_fds, c.max_data_xfer_size, c.max_dma_maps),
            (8, 65536, 100)
        );
    }
}
