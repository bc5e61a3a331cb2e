//! lspci-style decoding of a PCI config image and of vfio-user region/IRQ flags.
//!
//! Everything here reads untrusted bytes from a server: every offset is bounds-checked,
//! capability chains are walked with loop and length limits, and nothing panics on short or
//! hostile images (missing bytes read as 0xff, like an absent device).

use std::collections::BTreeSet;
use std::fmt::Write;

use emudev_vfio_user::wire::{irq_info_flags, region_flags};

/// Little-endian reads that return all-ones past the end.
struct Cfg<'a>(&'a [u8]);

impl Cfg<'_> {
    fn u8(&self, o: usize) -> u8 {
        self.0.get(o).copied().unwrap_or(0xff)
    }
    fn u16(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.u8(o), self.u8(o.saturating_add(1))])
    }
    fn u32(&self, o: usize) -> u32 {
        u32::from(self.u16(o)) | (u32::from(self.u16(o.saturating_add(2))) << 16)
    }
}

fn flag(name: &str, on: bool) -> String {
    format!("{name}{}", if on { '+' } else { '-' })
}

/// Name of a PCI base class / sub-class.
pub fn class_name(class_code: u32) -> &'static str {
    let base = (class_code >> 16) as u8;
    let sub = (class_code >> 8) as u8;
    match (base, sub) {
        (0x01, 0x00) => "SCSI storage controller",
        (0x01, 0x06) => "SATA controller",
        (0x01, 0x08) => "Non-Volatile memory controller",
        (0x01, _) => "Mass storage controller",
        (0x02, 0x00) => "Ethernet controller",
        (0x02, _) => "Network controller",
        (0x03, _) => "Display controller",
        (0x04, _) => "Multimedia controller",
        (0x05, _) => "Memory controller",
        (0x06, _) => "Bridge",
        (0x07, _) => "Communication controller",
        (0x08, _) => "Generic system peripheral",
        (0x0c, _) => "Serial bus controller",
        (0xff, _) => "Unassigned class",
        _ => "Unknown class",
    }
}

fn size_str(size: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (u, s) in UNITS {
        if size >= u && size % u == 0 {
            return format!("{}{s}", size / u);
        }
    }
    format!("{size}")
}

/// The header lines: ids, class, command/status, BARs (sizes from the region infos),
/// interrupt pin. `bar_sizes[i]` is region i's size.
pub fn header(cfg: &[u8], bar_sizes: &[u64; 6]) -> Vec<String> {
    let c = Cfg(cfg);
    let class =
        (u32::from(c.u8(0x0b)) << 16) | (u32::from(c.u8(0x0a)) << 8) | u32::from(c.u8(0x09));
    let mut out = vec![format!(
        "{:04x}:{:04x}  {} [{:04x}] (rev {:02x}, prog-if {:02x})",
        c.u16(0),
        c.u16(2),
        class_name(class),
        class >> 8,
        c.u8(0x08),
        c.u8(0x09)
    )];
    out.push(format!(
        "Subsystem: {:04x}:{:04x}",
        c.u16(0x2c),
        c.u16(0x2e)
    ));
    let cmd = c.u16(0x04);
    out.push(format!(
        "Control: {} {} {} {}",
        flag("I/O", cmd & 1 != 0),
        flag("Mem", cmd & 2 != 0),
        flag("BusMaster", cmd & 4 != 0),
        flag("DisINTx", cmd & (1 << 10) != 0)
    ));
    let st = c.u16(0x06);
    out.push(format!(
        "Status: {} {}",
        flag("Cap", st & (1 << 4) != 0),
        flag("INTx", st & (1 << 3) != 0)
    ));
    let pin = c.u8(0x3d);
    out.push(match pin {
        0 => "Interrupt: none".to_string(),
        1..=4 => format!("Interrupt: pin {}", (b'A' + pin - 1) as char),
        p => format!("Interrupt: invalid pin {p}"),
    });
    let mut i = 0usize;
    while i < 6 {
        let lo = c.u32(0x10 + 4 * i);
        let size = bar_sizes[i];
        let mut slots = 1;
        if size != 0 {
            let desc = if lo & 1 != 0 {
                "I/O ports".to_string()
            } else {
                let is64 = (lo >> 1) & 3 == 2;
                if is64 {
                    slots = 2;
                }
                format!(
                    "Memory {}, {}",
                    if is64 { "64-bit" } else { "32-bit" },
                    if lo & 8 != 0 {
                        "prefetchable"
                    } else {
                        "non-prefetchable"
                    }
                )
            };
            out.push(format!("Region {i}: {desc} [size={}]", size_str(size)));
        }
        i += slots;
    }
    out
}

fn virtio_cfg_type(t: u8) -> &'static str {
    match t {
        1 => "CommonCfg",
        2 => "Notify",
        3 => "ISR",
        4 => "DeviceCfg",
        5 => "PCICfg",
        8 => "SharedMemory",
        9 => "VendorCfg",
        _ => "unknown",
    }
}

fn pcie_type(t: u16) -> &'static str {
    match t {
        0 => "Endpoint",
        1 => "Legacy Endpoint",
        4 => "Root Port",
        5 => "Upstream Port",
        6 => "Downstream Port",
        9 => "Root Complex Integrated Endpoint",
        _ => "other",
    }
}

fn decode_cap(c: &Cfg<'_>, id: u8, o: usize, vendor_id: u16) -> Vec<String> {
    let mut v = Vec::new();
    match id {
        0x01 => {
            let pmc = c.u16(o + 2);
            let csr = c.u16(o + 4);
            v.push(format!(
                "[{o:02x}] Power Management version {}: state D{} {}",
                pmc & 7,
                csr & 3,
                flag("NoSoftRst", csr & 8 != 0)
            ));
        }
        0x05 => {
            let ctl = c.u16(o + 2);
            v.push(format!(
                "[{o:02x}] MSI: {} Count={}/{} {} {}",
                flag("Enable", ctl & 1 != 0),
                1u32 << ((ctl >> 4) & 7),
                1u32 << ((ctl >> 1) & 7),
                flag("64bit", ctl & 0x80 != 0),
                flag("Maskable", ctl & 0x100 != 0)
            ));
        }
        0x09 => {
            let len = c.u8(o + 2);
            if vendor_id == 0x1af4 {
                let t = c.u8(o + 3);
                let mut s = format!(
                    "[{o:02x}] Vendor Specific (virtio): {} BAR={} offset={:08x} size={:08x}",
                    virtio_cfg_type(t),
                    c.u8(o + 4),
                    c.u32(o + 8),
                    c.u32(o + 12)
                );
                if t == 2 {
                    let _ = write!(s, " multiplier={:08x}", c.u32(o + 16));
                }
                v.push(s);
            } else {
                let n = usize::from(len).saturating_sub(3).min(32);
                let bytes: Vec<String> =
                    (0..n).map(|i| format!("{:02x}", c.u8(o + 3 + i))).collect();
                v.push(format!(
                    "[{o:02x}] Vendor Specific (len {len}): {}",
                    bytes.join(" ")
                ));
            }
        }
        0x10 => {
            let caps = c.u16(o + 2);
            let devcap = c.u32(o + 4);
            let lnkcap = c.u32(o + 0x0c);
            let lnksta = c.u16(o + 0x12);
            v.push(format!(
                "[{o:02x}] Express (v{}) {}, MaxPayload {} bytes, {}",
                caps & 0xf,
                pcie_type((caps >> 4) & 0xf),
                128u32 << (devcap & 7).min(5),
                flag("FLReset", devcap & (1 << 28) != 0)
            ));
            v.push(format!(
                "      LnkCap: Speed gen{}, Width x{}; LnkSta: Speed gen{}, Width x{}",
                lnkcap & 0xf,
                (lnkcap >> 4) & 0x3f,
                lnksta & 0xf,
                (lnksta >> 4) & 0x3f
            ));
        }
        0x11 => {
            let ctl = c.u16(o + 2);
            let table = c.u32(o + 4);
            let pba = c.u32(o + 8);
            v.push(format!(
                "[{o:02x}] MSI-X: {} Count={} {}",
                flag("Enable", ctl & 0x8000 != 0),
                (ctl & 0x7ff) + 1,
                flag("Masked", ctl & 0x4000 != 0)
            ));
            v.push(format!(
                "      Vector table: BAR={} offset={:08x}",
                table & 7,
                table & !7
            ));
            v.push(format!(
                "      PBA: BAR={} offset={:08x}",
                pba & 7,
                pba & !7
            ));
        }
        _ => v.push(format!("[{o:02x}] Capability {id:#04x}")),
    }
    v
}

fn ext_cap_name(id: u16) -> &'static str {
    match id {
        0x0001 => "Advanced Error Reporting",
        0x0003 => "Device Serial Number",
        0x000b => "Vendor Specific",
        0x000e => "Alternative Routing-ID",
        0x0010 => "Single Root I/O Virtualization",
        0x0018 => "Latency Tolerance Reporting",
        0x001e => "L1 PM Substates",
        _ => "Unknown",
    }
}

/// The capability chain (and the extended chain for a 4096-byte image), decoded.
pub fn capabilities(cfg: &[u8]) -> Vec<String> {
    let c = Cfg(cfg);
    let mut out = Vec::new();
    if c.u16(0x06) & (1 << 4) == 0 {
        return out;
    }
    let vendor = c.u16(0);
    let mut seen = BTreeSet::new();
    let mut ptr = usize::from(c.u8(0x34)) & !3;
    while ptr != 0 {
        if !(0x40..0x100).contains(&ptr) || ptr >= cfg.len() {
            out.push(format!(
                "[{ptr:02x}] <chain points outside the capability area>"
            ));
            break;
        }
        if !seen.insert(ptr) {
            out.push(format!("[{ptr:02x}] <chain loops>"));
            break;
        }
        out.extend(decode_cap(&c, c.u8(ptr), ptr, vendor));
        ptr = usize::from(c.u8(ptr + 1)) & !3;
    }
    if cfg.len() > 0x100 {
        let mut seen = BTreeSet::new();
        let mut ptr = 0x100usize;
        while ptr != 0 && ptr + 4 <= cfg.len() {
            let h = c.u32(ptr);
            if h == 0 || h == u32::MAX || !seen.insert(ptr) {
                break;
            }
            let id = (h & 0xffff) as u16;
            out.push(format!(
                "[{ptr:03x} v{}] {} ({id:#06x})",
                (h >> 16) & 0xf,
                ext_cap_name(id)
            ));
            ptr = (h >> 20) as usize & !3;
            if ptr < 0x100 {
                break;
            }
        }
    }
    out
}

pub fn region_name(index: u32) -> String {
    match index {
        0..=5 => format!("BAR{index}"),
        6 => "ROM".to_string(),
        7 => "CONFIG".to_string(),
        8 => "VGA".to_string(),
        i => format!("region{i}"),
    }
}

pub fn region_flag_names(flags: u32) -> String {
    let mut v = Vec::new();
    for (bit, name) in [
        (region_flags::READ, "READ"),
        (region_flags::WRITE, "WRITE"),
        (region_flags::MMAP, "MMAP"),
        (region_flags::CAPS, "CAPS"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    let unknown = flags
        & !(region_flags::READ | region_flags::WRITE | region_flags::MMAP | region_flags::CAPS);
    let mut s = v.join(" ");
    if unknown != 0 {
        let _ = write!(s, " unknown={unknown:#x}");
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

pub fn irq_name(index: u32) -> String {
    match index {
        0 => "INTx".to_string(),
        1 => "MSI".to_string(),
        2 => "MSI-X".to_string(),
        3 => "ERR".to_string(),
        4 => "REQ".to_string(),
        i => format!("irq{i}"),
    }
}

pub fn irq_flag_names(flags: u32) -> String {
    let mut v = Vec::new();
    for (bit, name) in [
        (irq_info_flags::EVENTFD, "EVENTFD"),
        (irq_info_flags::MASKABLE, "MASKABLE"),
        (irq_info_flags::AUTOMASKED, "AUTOMASKED"),
        (irq_info_flags::NORESIZE, "NORESIZE"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    if v.is_empty() {
        "-".to_string()
    } else {
        v.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use emudev::testdev::TestDevice;
    use emudev::DeviceModel;

    fn testdev_config() -> Vec<u8> {
        let mut d = TestDevice::new("decode").unwrap();
        let mut cfg = vec![0u8; d.pci().config_size()];
        d.pci().config_read(0, &mut cfg).unwrap();
        cfg
    }

    #[test]
    fn decodes_the_test_device() {
        let cfg = testdev_config();
        let h = header(&cfg, &[4096, 0, 4096, 0, 4096, 0]);
        assert!(
            h[0].starts_with("e0de:e0de  Unassigned class [ff00]"),
            "{}",
            h[0]
        );
        assert!(h.contains(&"Interrupt: pin A".to_string()));
        assert!(h.contains(&"Region 2: Memory 32-bit, non-prefetchable [size=4K]".to_string()));
        let caps = capabilities(&cfg).join("\n");
        assert!(caps.contains("Power Management version 3"), "{caps}");
        assert!(caps.contains("MSI-X: Enable- Count=4 Masked-"), "{caps}");
        assert!(caps.contains("PBA: BAR=4 offset=00000800"), "{caps}");
        assert!(
            caps.contains("Vendor Specific (len 12): 45 4d 55 44 45 56"),
            "{caps}"
        );
    }

    #[test]
    fn hostile_images_do_not_panic() {
        // Loop, pointer past the end, short image.
        let mut cfg = vec![0u8; 256];
        cfg[0x06] = 0x10;
        cfg[0x34] = 0x40;
        cfg[0x40] = 0x11;
        cfg[0x41] = 0x40;
        assert!(capabilities(&cfg).last().unwrap().contains("loops"));
        cfg[0x41] = 0xfc;
        cfg[0xfc] = 0x09;
        cfg[0xfd] = 0;
        cfg[0xfe] = 200;
        let _ = capabilities(&cfg);
        let _ = capabilities(&cfg[..0x50]);
        let _ = header(&[0u8; 3], &[0; 6]);
        // Extended chain looping on itself stops.
        let mut big = vec![0u8; 4096];
        big[0x100..0x104].copy_from_slice(&(0x1000_0001u32).to_le_bytes());
        assert_eq!(capabilities(&big).len(), 0, "no CAP_LIST bit: nothing");
        big[0x06] = 0x10;
        let c = capabilities(&big);
        assert_eq!(c.len(), 1, "{c:?}");
    }

    #[test]
    fn virtio_vendor_caps_are_decoded() {
        let mut cfg = vec![0u8; 256];
        cfg[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        cfg[0x06] = 0x10;
        cfg[0x34] = 0x40;
        let cap = [
            0x09u8, 0, 20, 2, 4, 0, 0, 0, 0, 0x30, 0, 0, 0, 0x10, 0, 0, 4, 0, 0, 0,
        ];
        cfg[0x40..0x40 + cap.len()].copy_from_slice(&cap);
        let c = capabilities(&cfg);
        assert_eq!(
            c[0],
            "[40] Vendor Specific (virtio): Notify BAR=4 offset=00003000 size=00001000 multiplier=00000004"
        );
        assert_eq!(region_flag_names(3 | 4), "READ WRITE MMAP");
        assert_eq!(irq_flag_names(0), "-");
    }
}
