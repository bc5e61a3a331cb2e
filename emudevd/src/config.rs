//! Device specifications from the command line: `TYPE,socket=PATH,key=value,...`.
//!
//! Everything is parsed and checked before any socket or file is created, so a bad flag
//! fails the daemon with a precise message and leaves nothing behind.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A configuration error, naming the device and the cause.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("device {index}: empty specification")]
    Empty { index: usize },
    #[error("device {index}: unknown type '{kind}' (known: {known})")]
    UnknownType {
        index: usize,
        kind: String,
        known: &'static str,
    },
    #[error("device {index} ({kind}): option '{item}' is not key=value")]
    NotKeyValue {
        index: usize,
        kind: String,
        item: String,
    },
    #[error("device {index} ({kind}): option '{key}' given twice")]
    Duplicate {
        index: usize,
        kind: String,
        key: String,
    },
    #[error("device {index} ({kind}): unknown option '{key}' (known: {known})")]
    UnknownOption {
        index: usize,
        kind: String,
        key: String,
        known: String,
    },
    #[error("device {index} ({kind}): missing option '{key}'")]
    Missing {
        index: usize,
        kind: String,
        key: &'static str,
    },
    #[error("device {index} ({kind}): option {key}={value}: {reason}")]
    BadValue {
        index: usize,
        kind: String,
        key: String,
        value: String,
        reason: String,
    },
    #[error("device {index} ({kind}): id '{id}': use 1 to 32 letters, digits, '-', '_' or '.'")]
    BadId {
        index: usize,
        kind: String,
        id: String,
    },
    #[error("devices {first} and {second} both use socket {path}")]
    SocketReused {
        first: usize,
        second: usize,
        path: String,
    },
    #[error("devices {first} and {second} are both named {name}")]
    NameReused {
        first: usize,
        second: usize,
        name: String,
    },
}

/// Block backend choice for virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkBackendSpec {
    /// A raw image file.
    File { path: PathBuf, direct: bool },
    /// Discards writes, reads zeroes; for benchmarks.
    Null { size: u64 },
}

/// virtio-blk options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkSpec {
    pub backend: BlkBackendSpec,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
    /// `tcg-boot=on`: write guest memory below 1 MiB by DMA_WRITE message, so firmware can
    /// boot from this disk under QEMU's TCG (issue 11). Off by default: a client must then
    /// serve DMA_WRITE for fd-backed maps too (QEMU does; simple test clients do not).
    pub tcg_boot: bool,
}

/// virtio-net options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// A kernel tap (`backend=tap,ifname=NAME`) or a port on an in-process switch
    /// (`backend=switch[,switch=NAME]`, the default when no backend is given).
    pub backend: emudev_net::BackendSpec,
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: Option<u16>,
    pub offloads: bool,
}

/// AVF NIC options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvfSpec {
    /// Same choices as virtio-net: the in-process switch by default, or a tap.
    pub backend: emudev_net::BackendSpec,
    pub mac: [u8; 6],
    pub queue_pairs: u16,
}

/// Which virtio device a vhost-user bridge presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostDevice {
    /// virtio-blk, configuration from the backend (GET_CONFIG).
    Blk,
    /// virtio-fs with this mount tag and number of request queues.
    Fs { tag: String, request_queues: u16 },
}

/// `engine=vhost-user`: the rings run in an external vhost-user backend at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostSpec {
    pub device: VhostDevice,
    /// The backend's vhost-user socket.
    pub path: PathBuf,
    pub queue_size: u16,
}

/// What kind of device, with its typed options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    VirtioBlk(BlkSpec),
    VirtioNet(NetSpec),
    /// An Intel AVF-like NIC (8086:1889) that the stock Linux iavf driver drives.
    Avf(AvfSpec),
    /// The emudev test device (registers, DMA engine, doorbell page, MSI-X).
    TestDev,
    /// A virtio device bridged to a vhost-user backend (`engine=vhost-user`).
    VhostUser(VhostSpec),
}

impl DeviceKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            DeviceKind::VirtioBlk(_) => "virtio-blk",
            DeviceKind::VirtioNet(_) => "virtio-net",
            DeviceKind::Avf(_) => "avf",
            DeviceKind::TestDev => "testdev",
            DeviceKind::VhostUser(v) => match v.device {
                VhostDevice::Blk => "virtio-blk",
                VhostDevice::Fs { .. } => "virtio-fs",
            },
        }
    }
}

/// One device to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Position on the command line, from 0; used in messages.
    pub index: usize,
    pub socket: PathBuf,
    /// `id=` if given: the device's name in logs and on the control socket.
    pub id: Option<String>,
    pub kind: DeviceKind,
}

impl DeviceSpec {
    /// The device's name: its `id=`, or the type followed by its index ("virtio-blk0").
    pub fn name(&self) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => format!("{}{}", self.kind.type_name(), self.index),
        }
    }
}

/// Whether `id` is usable as a device name (it appears in logs, paths and metrics labels).
pub fn valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Device types this daemon serves, for messages and `--print-capabilities`.
pub const KNOWN_TYPES: &str = "virtio-blk, virtio-fs, virtio-net, avf, testdev";

struct Opts {
    index: usize,
    kind: String,
    map: BTreeMap<String, String>,
}

impl Opts {
    fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }
    fn bad(&self, key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::BadValue {
            index: self.index,
            kind: self.kind.clone(),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
    fn bool(&mut self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(self.bad(key, &v, "expected on/off")),
            },
        }
    }
    fn num<T: TryFrom<u64>>(
        &mut self,
        key: &str,
        default: T,
        min: u64,
        max: u64,
    ) -> Result<T, ConfigError> {
        let Some(v) = self.take(key) else {
            return Ok(default);
        };
        let n = parse_size(&v).map_err(|e| self.bad(key, &v, e))?;
        if n < min || n > max {
            return Err(self.bad(key, &v, format!("must be between {min} and {max}")));
        }
        T::try_from(n).map_err(|_| self.bad(key, &v, "out of range"))
    }
    fn finish(self, known: &[&str]) -> Result<(), ConfigError> {
        match self.map.into_keys().next() {
            None => Ok(()),
            Some(key) => Err(ConfigError::UnknownOption {
                index: self.index,
                kind: self.kind,
                key,
                known: known.join(", "),
            }),
        }
    }
}

/// Parse a number with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix '{c}'")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = if let Some(h) = digits.strip_prefix("0x") {
        u64::from_str_radix(h, 16).map_err(|e| e.to_string())?
    } else {
        digits
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())?
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

/// `backend=`, `ifname=`, `switch=` and `mac=` of a NIC; the default MAC is locally
/// administered and distinct per device index.
fn nic_backend_and_mac(
    o: &mut Opts,
    index: usize,
    kind: &str,
) -> Result<(emudev_net::BackendSpec, [u8; 6]), ConfigError> {
    // A NIC given no backend joins the in-process switch.
    let backend = match o.take("backend").as_deref().unwrap_or("switch") {
        "tap" => emudev_net::BackendSpec::Tap {
            ifname: o.take("ifname").ok_or(ConfigError::Missing {
                index,
                kind: kind.to_string(),
                key: "ifname",
            })?,
        },
        "switch" => emudev_net::BackendSpec::Switch {
            name: o.take("switch").unwrap_or_else(|| "default".into()),
        },
        other => return Err(o.bad("backend", other, "expected tap or switch")),
    };
    let mac = match o.take("mac") {
        Some(m) => emudev_net::parse_mac(&m).map_err(|e| o.bad("mac", &m, e.to_string()))?,
        None => [0x52, 0x54, 0x00, 0xe0, (index >> 8) as u8, index as u8],
    };
    Ok((backend, mac))
}

/// `engine=vhost-user` options shared by the bridged types: `path=` (the backend socket) and
/// `queue-size=`.
fn vhost_common(o: &mut Opts, index: usize, kind: &str) -> Result<(PathBuf, u16), ConfigError> {
    let path = o.take("path").ok_or(ConfigError::Missing {
        index,
        kind: kind.to_string(),
        key: "path",
    })?;
    if path.is_empty() {
        return Err(o.bad("path", "", "empty path"));
    }
    let queue_size: u16 = o.num("queue-size", 256u16, 2, 32768)?;
    if !queue_size.is_power_of_two() {
        return Err(o.bad(
            "queue-size",
            &queue_size.to_string(),
            "must be a power of two",
        ));
    }
    Ok((PathBuf::from(path), queue_size))
}

/// `engine=`: true for `vhost-user`, false for `builtin` (the default when `builtin_ok`).
fn vhost_engine(o: &mut Opts, builtin_ok: bool) -> Result<bool, ConfigError> {
    match o.take("engine").as_deref() {
        None => Ok(!builtin_ok),
        Some("vhost-user") => Ok(true),
        Some("builtin") if builtin_ok => Ok(false),
        Some(other) => Err(o.bad(
            "engine",
            other,
            if builtin_ok {
                "expected builtin or vhost-user"
            } else {
                "this type only runs with engine=vhost-user"
            },
        )),
    }
}

/// Parse one `--device` argument.
pub fn parse_device(index: usize, arg: &str) -> Result<DeviceSpec, ConfigError> {
    let mut parts = arg.split(',');
    let kind = parts.next().unwrap_or("").trim().to_string();
    if kind.is_empty() {
        return Err(ConfigError::Empty { index });
    }
    let mut map = BTreeMap::new();
    for item in parts {
        let Some((k, v)) = item.split_once('=') else {
            return Err(ConfigError::NotKeyValue {
                index,
                kind,
                item: item.to_string(),
            });
        };
        if map.insert(k.trim().to_string(), v.to_string()).is_some() {
            return Err(ConfigError::Duplicate {
                index,
                kind,
                key: k.to_string(),
            });
        }
    }
    let mut o = Opts {
        index,
        kind: kind.clone(),
        map,
    };
    let socket = o.take("socket").ok_or(ConfigError::Missing {
        index,
        kind: kind.clone(),
        key: "socket",
    })?;
    if socket.is_empty() {
        return Err(o.bad("socket", "", "empty path"));
    }
    let id = o.take("id");
    if let Some(id) = &id {
        if !valid_id(id) {
            return Err(ConfigError::BadId {
                index,
                kind: kind.clone(),
                id: id.clone(),
            });
        }
    }
    let kind = match kind.as_str() {
        "virtio-blk" if vhost_engine(&mut o, true)? => {
            let (path, queue_size) = vhost_common(&mut o, index, &kind)?;
            o.finish(&["socket", "id", "engine", "path", "queue-size"])?;
            DeviceKind::VhostUser(VhostSpec {
                device: VhostDevice::Blk,
                path,
                queue_size,
            })
        }
        "virtio-fs" => {
            vhost_engine(&mut o, false)?;
            let (path, queue_size) = vhost_common(&mut o, index, &kind)?;
            let tag = o.take("tag").ok_or(ConfigError::Missing {
                index,
                kind: kind.clone(),
                key: "tag",
            })?;
            if tag.is_empty() || tag.len() > 36 {
                return Err(o.bad("tag", &tag, "1 to 36 bytes"));
            }
            let request_queues = o.num("num-request-queues", 1u16, 1, 64)?;
            o.finish(&[
                "socket",
                "id",
                "engine",
                "path",
                "tag",
                "num-request-queues",
                "queue-size",
            ])?;
            DeviceKind::VhostUser(VhostSpec {
                device: VhostDevice::Fs {
                    tag,
                    request_queues,
                },
                path,
                queue_size,
            })
        }
        "virtio-blk" => {
            const KNOWN: &[&str] = &[
                "socket",
                "path",
                "backend",
                "size",
                "readonly",
                "direct",
                "num-queues",
                "queue-size",
                "serial",
                "tcg-boot",
            ];
            let backend_name = o.take("backend").unwrap_or_else(|| "file".into());
            let direct = o.bool("direct", false)?;
            let backend = match backend_name.as_str() {
                "file" => {
                    let path = o.take("path").ok_or(ConfigError::Missing {
                        index,
                        kind: kind.clone(),
                        key: "path",
                    })?;
                    BlkBackendSpec::File {
                        path: PathBuf::from(path),
                        direct,
                    }
                }
                "null" => BlkBackendSpec::Null {
                    size: o.num("size", 1u64 << 30, 512, 1 << 50)?,
                },
                other => return Err(o.bad("backend", other, "expected file or null")),
            };
            let readonly = o.bool("readonly", false)?;
            let tcg_boot = o.bool("tcg-boot", false)?;
            let num_queues = o.num("num-queues", 1u16, 1, 64)?;
            let queue_size: u16 = o.num("queue-size", 256u16, 2, 32768)?;
            if !queue_size.is_power_of_two() {
                return Err(o.bad(
                    "queue-size",
                    &queue_size.to_string(),
                    "must be a power of two",
                ));
            }
            let serial = o
                .take("serial")
                .unwrap_or_else(|| format!("emudev-blk{index}"));
            if serial.len() > 20 {
                return Err(o.bad("serial", &serial, "at most 20 bytes"));
            }
            o.finish(KNOWN)?;
            DeviceKind::VirtioBlk(BlkSpec {
                backend,
                readonly,
                num_queues,
                queue_size,
                serial,
                tcg_boot,
            })
        }
        "virtio-net" => {
            const KNOWN: &[&str] = &[
                "socket",
                "id",
                "backend",
                "ifname",
                "switch",
                "mac",
                "queue-pairs",
                "queue-size",
                "mtu",
                "offloads",
            ];
            let (backend, mac) = nic_backend_and_mac(&mut o, index, &kind)?;
            let queue_pairs = o.num("queue-pairs", 1u16, 1, 64)?;
            let queue_size: u16 = o.num("queue-size", 256u16, 2, 32768)?;
            if !queue_size.is_power_of_two() {
                return Err(o.bad(
                    "queue-size",
                    &queue_size.to_string(),
                    "must be a power of two",
                ));
            }
            let mtu = match o.take("mtu") {
                None => None,
                Some(v) => Some(
                    v.parse::<u16>()
                        .ok()
                        .filter(|m| *m >= 68)
                        .ok_or_else(|| o.bad("mtu", &v, "expected 68 to 65535"))?,
                ),
            };
            let offloads = o.bool("offloads", true)?;
            o.finish(KNOWN)?;
            DeviceKind::VirtioNet(NetSpec {
                backend,
                mac,
                queue_pairs,
                queue_size,
                mtu,
                offloads,
            })
        }
        "avf" => {
            let (backend, mac) = nic_backend_and_mac(&mut o, index, &kind)?;
            let queue_pairs = o.num("queue-pairs", 4u16, 1, 16)?;
            o.finish(&[
                "socket",
                "id",
                "backend",
                "ifname",
                "switch",
                "mac",
                "queue-pairs",
            ])?;
            DeviceKind::Avf(AvfSpec {
                backend,
                mac,
                queue_pairs,
            })
        }
        "testdev" => {
            o.finish(&["socket", "id"])?;
            DeviceKind::TestDev
        }
        _ => {
            return Err(ConfigError::UnknownType {
                index,
                kind,
                known: KNOWN_TYPES,
            })
        }
    };
    Ok(DeviceSpec {
        index,
        socket: PathBuf::from(socket),
        id,
        kind,
    })
}

/// Parse every `--device` and check them against each other.
pub fn parse_devices(args: &[String]) -> Result<Vec<DeviceSpec>, ConfigError> {
    let specs = args
        .iter()
        .enumerate()
        .map(|(i, a)| parse_device(i, a))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in specs.iter().enumerate() {
        if let Some(b) = specs[..i].iter().find(|b| b.socket == a.socket) {
            return Err(ConfigError::SocketReused {
                first: b.index,
                second: a.index,
                path: a.socket.display().to_string(),
            });
        }
        if let Some(b) = specs[..i].iter().find(|b| b.name() == a.name()) {
            return Err(ConfigError::NameReused {
                first: b.index,
                second: a.index,
                name: a.name(),
            });
        }
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_boot_is_off_unless_asked() {
        let blk = |spec: &str| match parse_device(0, spec).unwrap().kind {
            DeviceKind::VirtioBlk(b) => b,
            _ => panic!("not blk"),
        };
        assert!(!blk("virtio-blk,socket=s,path=d").tcg_boot);
        assert!(blk("virtio-blk,socket=s,path=d,tcg-boot=on").tcg_boot);
        assert!(parse_device(0, "virtio-blk,socket=s,path=d,tcg-boot=maybe").is_err());
    }

    #[test]
    fn nics_join_the_switch_unless_given_a_tap() {
        let net = |spec: &str| match parse_device(3, spec).unwrap().kind {
            DeviceKind::VirtioNet(n) => n,
            _ => panic!("not net"),
        };
        let n = net("virtio-net,socket=s");
        assert_eq!(
            n.backend,
            emudev_net::BackendSpec::Switch {
                name: "default".into()
            }
        );
        assert_eq!(n.mac, [0x52, 0x54, 0x00, 0xe0, 0, 3]);
        assert!(n.offloads);
        let n = net("virtio-net,socket=s,backend=tap,ifname=tap0,mac=02:00:00:00:00:01,queue-pairs=4,mtu=9000,offloads=off");
        assert_eq!(
            n.backend,
            emudev_net::BackendSpec::Tap {
                ifname: "tap0".into()
            }
        );
        assert_eq!(
            (n.mac[0], n.queue_pairs, n.mtu, n.offloads),
            (2, 4, Some(9000), false)
        );
        let e = parse_device(0, "virtio-net,socket=s,backend=tap").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device 0 (virtio-net): missing option 'ifname'"
        );
        assert!(parse_device(0, "virtio-net,socket=s,mtu=10").is_err());
        assert!(parse_device(0, "virtio-net,socket=s,mac=zz").is_err());
    }

    #[test]
    fn parses_the_documented_disk_example() {
        let d = parse_device(
            0,
            "virtio-blk,socket=/run/emudev/vda.sock,path=disk.img,num-queues=2",
        )
        .unwrap();
        assert_eq!(d.socket, PathBuf::from("/run/emudev/vda.sock"));
        let DeviceKind::VirtioBlk(b) = d.kind else {
            panic!("not blk")
        };
        assert_eq!(b.num_queues, 2);
        assert_eq!(
            b.backend,
            BlkBackendSpec::File {
                path: "disk.img".into(),
                direct: false
            }
        );
        assert!(!b.readonly);
    }

    #[test]
    fn null_backend_with_size_suffix() {
        let d = parse_device(1, "virtio-blk,socket=s,backend=null,size=2G,readonly=on").unwrap();
        let DeviceKind::VirtioBlk(b) = d.kind else {
            panic!("not blk")
        };
        assert_eq!(b.backend, BlkBackendSpec::Null { size: 2 << 30 });
        assert!(b.readonly);
    }

    #[test]
    fn errors_name_the_device_and_the_cause() {
        let e = parse_device(3, "virtio-blk,socket=s,path=x,bogus=1").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("device 3 (virtio-blk): unknown option 'bogus'"),
            "{e}"
        );
        let e = parse_device(0, "virtio-blk,path=x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device 0 (virtio-blk): missing option 'socket'"
        );
        let e = parse_device(0, "virtio-blk,socket=s,path=x,queue-size=100").unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        let e = parse_device(0, "virtio-blk,socket=s,path=x,num-queues=0").unwrap_err();
        assert!(e.to_string().contains("between 1 and 64"), "{e}");
        let e = parse_device(0, "floppy,socket=s").unwrap_err();
        assert!(matches!(e, ConfigError::UnknownType { .. }));
        let e = parse_device(0, "virtio-blk,socket=s,path").unwrap_err();
        assert!(matches!(e, ConfigError::NotKeyValue { .. }));
        let e = parse_devices(&["testdev,socket=a".into(), "testdev,socket=a".into()]).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::SocketReused {
                first: 0,
                second: 1,
                ..
            }
        ));
    }

    #[test]
    fn vhost_user_engine_for_blk_and_fs() {
        let d = parse_device(
            0,
            "virtio-blk,socket=s,engine=vhost-user,path=/run/qsd.sock",
        )
        .unwrap();
        assert_eq!(d.kind.type_name(), "virtio-blk");
        assert_eq!(
            d.kind,
            DeviceKind::VhostUser(VhostSpec {
                device: VhostDevice::Blk,
                path: PathBuf::from("/run/qsd.sock"),
                queue_size: 256,
            })
        );
        // The builtin engine is the default and can be named.
        let b = parse_device(0, "virtio-blk,socket=s,engine=builtin,path=d").unwrap();
        assert!(matches!(b.kind, DeviceKind::VirtioBlk(_)));
        // Builtin-only options are refused with the bridge.
        let e = parse_device(
            0,
            "virtio-blk,socket=s,engine=vhost-user,path=p,readonly=on",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown option 'readonly'"), "{e}");
        assert!(parse_device(0, "virtio-blk,socket=s,engine=spdk,path=p").is_err());

        let f = parse_device(
            1,
            "virtio-fs,socket=s,path=/run/vfs.sock,tag=share,queue-size=128",
        )
        .unwrap();
        assert_eq!(f.name(), "virtio-fs1");
        let DeviceKind::VhostUser(v) = f.kind else {
            panic!("not vhost")
        };
        assert_eq!(
            v.device,
            VhostDevice::Fs {
                tag: "share".into(),
                request_queues: 1
            }
        );
        assert_eq!(v.queue_size, 128);
        let e = parse_device(0, "virtio-fs,socket=s,path=p").unwrap_err();
        assert!(e.to_string().contains("missing option 'tag'"), "{e}");
        let e = parse_device(0, "virtio-fs,socket=s,engine=builtin,path=p,tag=t").unwrap_err();
        assert!(e.to_string().contains("engine=vhost-user"), "{e}");
        let long = "x".repeat(37);
        assert!(parse_device(0, &format!("virtio-fs,socket=s,path=p,tag={long}")).is_err());
    }

    #[test]
    fn ids_name_devices() {
        let d = parse_device(2, "testdev,socket=s,id=td-1").unwrap();
        assert_eq!(d.name(), "td-1");
        assert_eq!(
            parse_device(2, "testdev,socket=s").unwrap().name(),
            "testdev2"
        );
        let e = parse_device(0, "testdev,socket=s,id=a/b").unwrap_err();
        assert!(matches!(e, ConfigError::BadId { .. }), "{e}");
        let e = parse_devices(&[
            "testdev,socket=a,id=x".into(),
            "testdev,socket=b,id=x".into(),
        ])
        .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::NameReused {
                    first: 0,
                    second: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("0x10M"), Ok(16 << 20));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
