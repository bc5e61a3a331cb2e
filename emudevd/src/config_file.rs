//! `--config FILE`: the daemon's configuration as TOML, for launchers that prefer a file to
//! a long command line. Every `[[device]]` table becomes the same `TYPE,key=value,...` spec
//! that `--device` takes, so both paths share one parser and one set of error messages.
//!
//! ```toml
//! pollers = 2
//! control = "/run/emudev/control.sock"
//!
//! [[device]]
//! type = "virtio-blk"
//! socket = "/run/emudev/vda.sock"
//! path = "/var/lib/images/disk.img"
//! num-queues = 2
//!
//! [[device]]
//! type = "virtio-net"
//! socket = "/run/emudev/net0.sock"
//! backend = "tap"
//! ifname = "tap0"
//! ```

use std::path::PathBuf;

/// What a configuration file says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    /// Device specs, in `--device` syntax, in file order.
    pub devices: Vec<String>,
    pub pollers: Option<usize>,
    pub control: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    pub socket_group: Option<u32>,
}

/// A device value as spec text: strings as they are, integers in decimal, booleans as on/off.
fn spec_value(dev: usize, key: &str, v: &toml::Value) -> Result<String, String> {
    let s = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Boolean(b) => if *b { "on" } else { "off" }.to_string(),
        other => {
            return Err(format!(
                "device {dev}: {key}: expected a string, integer or boolean, not {}",
                other.type_str()
            ))
        }
    };
    if s.contains(',') {
        return Err(format!("device {dev}: {key}: a value may not contain ','"));
    }
    Ok(s)
}

/// Parse the text of a configuration file. `name` is used in messages.
pub fn parse(name: &str, text: &str) -> Result<FileConfig, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("{name}: {e}"))?;
    let mut cfg = FileConfig::default();
    for (key, value) in &table {
        let bad = |what: &str| format!("{name}: {key}: {what}");
        match key.as_str() {
            "pollers" => {
                let n = value
                    .as_integer()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| bad("expected an integer from 1 to 64"))?;
                cfg.pollers = Some(n as usize);
            }
            "control" | "pidfile" => {
                let p = value
                    .as_str()
                    .ok_or_else(|| bad("expected a path string"))?;
                let p = Some(PathBuf::from(p));
                if key == "control" {
                    cfg.control = p;
                } else {
                    cfg.pidfile = p;
                }
            }
            "socket-group" => {
                let g = value
                    .as_integer()
                    .and_then(|g| u32::try_from(g).ok())
                    .ok_or_else(|| bad("expected a numeric gid"))?;
                cfg.socket_group = Some(g);
            }
            "device" => {
                let list = value
                    .as_array()
                    .ok_or_else(|| bad("expected [[device]] tables"))?;
                for (i, d) in list.iter().enumerate() {
                    let t = d
                        .as_table()
                        .ok_or_else(|| format!("{name}: device {i}: expected a table"))?;
                    let kind = t
                        .get("type")
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| format!("{name}: device {i}: missing type = \"...\""))?;
                    let mut spec = kind.to_string();
                    for (k, v) in t.iter().filter(|(k, _)| k.as_str() != "type") {
                        let v = spec_value(i, k, v).map_err(|e| format!("{name}: {e}"))?;
                        spec.push_str(&format!(",{k}={v}"));
                    }
                    cfg.devices.push(spec);
                }
            }
            other => {
                return Err(format!(
                    "{name}: unknown key '{other}' (known: pollers, control, pidfile, \
                     socket-group, [[device]])"
                ))
            }
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_devices, DeviceKind};

    #[test]
    fn the_documented_example_parses_into_device_specs() {
        let text = r#"
pollers = 2
control = "/run/emudev/control.sock"

[[device]]
type = "virtio-blk"
socket = "/run/emudev/vda.sock"
path = "/var/lib/images/disk.img"
num-queues = 2
readonly = true

[[device]]
type = "virtio-net"
socket = "/run/emudev/net0.sock"
backend = "tap"
ifname = "tap0"
"#;
        let c = parse("emudev.toml", text).unwrap();
        assert_eq!(c.pollers, Some(2));
        assert_eq!(c.control, Some(PathBuf::from("/run/emudev/control.sock")));
        assert_eq!(c.devices.len(), 2);
        let specs = parse_devices(&c.devices).unwrap();
        let DeviceKind::VirtioBlk(b) = &specs[0].kind else {
            panic!("not blk: {:?}", specs[0]);
        };
        assert_eq!((b.num_queues, b.readonly), (2, true));
        assert!(matches!(specs[1].kind, DeviceKind::VirtioNet(_)));
    }

    #[test]
    fn errors_are_precise() {
        let e = parse("f.toml", "pollers = 0").unwrap_err();
        assert_eq!(e, "f.toml: pollers: expected an integer from 1 to 64");
        let e = parse("f.toml", "bogus = 1").unwrap_err();
        assert!(e.starts_with("f.toml: unknown key 'bogus'"), "{e}");
        let e = parse("f.toml", "[[device]]\nsocket = \"s\"").unwrap_err();
        assert_eq!(e, "f.toml: device 0: missing type = \"...\"");
        let e = parse("f.toml", "[[device]]\ntype = \"testdev\"\nsocket = \"a,b\"").unwrap_err();
        assert_eq!(e, "f.toml: device 0: socket: a value may not contain ','");
        let e = parse("f.toml", "[[device]]\ntype = \"testdev\"\nsocket = [1]").unwrap_err();
        assert!(
            e.contains("expected a string, integer or boolean, not array"),
            "{e}"
        );
        assert!(parse("f.toml", "pollers = ")
            .unwrap_err()
            .starts_with("f.toml: "));
        // Unknown device options are caught by the shared --device parser.
        let c = parse(
            "f.toml",
            "[[device]]\ntype = \"testdev\"\nsocket = \"s\"\nx = 1",
        )
        .unwrap();
        assert!(parse_devices(&c.devices).is_err());
    }

    #[test]
    fn vhost_user_devices_from_toml() {
        let cfg = parse(
            "t.toml",
            r#"
[[device]]
type = "virtio-fs"
socket = "/run/emudev/fs.sock"
engine = "vhost-user"
path = "/run/virtiofsd.sock"
tag = "share"
"#,
        )
        .unwrap();
        let specs = crate::config::parse_devices(&cfg.devices).unwrap();
        let DeviceKind::VhostUser(v) = &specs[0].kind else {
            panic!("not vhost-user")
        };
        assert_eq!(v.path, PathBuf::from("/run/virtiofsd.sock"));
        assert_eq!(specs[0].kind.type_name(), "virtio-fs");
    }
}
