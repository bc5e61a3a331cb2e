//! [`PciDevice`]: config space, BARs, capabilities, MSI-X and INTx of one function.
//!
//! Build one with [`PciDeviceBuilder`]. The transport routes config accesses to
//! [`PciDevice::config_read`] / [`PciDevice::config_write`]; the write returns the
//! [`ConfigEvent`]s the device model may react to. MSI-X table and PBA accesses inside a BAR
//! go to [`PciDevice::msix_bar_read`] / [`PciDevice::msix_bar_write`], which answer `None`
//! for offsets outside them so the device handles its own registers.

use std::sync::Arc;

use thiserror::Error;

use super::bar::{BarDef, BarKind, RomBar, BAR_COUNT};
use super::caps::{
    self, cap_id, CapError, CapInfo, Capability, ExtCapInfo, ExtCapability, PowerState, MSIX_CTRL,
    PCIE_DEVCTL, PCIE_DEVCTL_FLR, PM_CTRL,
};
use super::config::{command, reg, status, ConfigError, ConfigSize, ConfigSpace, PciIds};
use super::irq::IntxLine;
use super::msix::{Msix, MsixError, MSIX_MAX_VECTORS};

/// Where the MSI-X table and PBA live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// 1..=2048.
    pub vectors: u16,
    pub table_bar: u8,
    /// 8-byte aligned offset in `table_bar`.
    pub table_offset: u32,
    pub pba_bar: u8,
    /// 8-byte aligned offset in `pba_bar`.
    pub pba_offset: u32,
}

/// Errors building a [`PciDevice`].
#[derive(Debug, Error)]
pub enum PciError {
    #[error("BAR index {0} out of range")]
    BadBarIndex(usize),
    #[error("BAR {index} overlaps a BAR already defined (64-bit BARs use two slots)")]
    BarSlotTaken { index: usize },
    #[error("BAR {index}: invalid size {size:#x} for {kind:?}")]
    BadBarSize {
        index: usize,
        kind: BarKind,
        size: u64,
    },
    #[error("invalid expansion ROM size {0:#x} (power of two, 2 KiB..=16 MiB)")]
    BadRomSize(u32),
    #[error("invalid interrupt pin {0} (0 = none, 1..=4 = INTA..INTD)")]
    BadInterruptPin(u8),
    #[error("capability {0:#04x} added twice")]
    DuplicateCapability(u8),
    #[error("MSI-X {what} BAR {bar} is absent or not a memory BAR")]
    MsixBar { what: &'static str, bar: u8 },
    #[error("MSI-X {what} at {offset:#x} (+{len:#x}) is misaligned or outside its BAR")]
    MsixPlacement {
        what: &'static str,
        offset: u32,
        len: u64,
    },
    #[error("MSI-X table and PBA overlap")]
    MsixOverlap,
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error(transparent)]
    Capability(#[from] CapError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Something a config write changed that the device model may care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEvent {
    /// The command register changed (decode enables, bus master, INTx disable).
    CommandChanged { old: u16, new: u16 },
    /// A BAR register changed (programming or sizing); `index` is the BAR's first slot and
    /// `address` the full decoded address. Meaningful while the decode bit is set.
    BarChanged { index: u8, address: u64 },
    /// The expansion ROM BAR changed.
    RomChanged { address: u32, enabled: bool },
    /// MSI-X enable or function mask changed (already applied to [`Msix`]).
    MsixControlChanged {
        enabled: bool,
        function_masked: bool,
    },
    /// The PM capability's power state changed (D1/D2 writes are dropped).
    PowerStateChanged(PowerState),
    /// The guest set Initiate FLR: the device model should reset itself and call
    /// [`PciDevice::reset`].
    FunctionLevelReset,
    /// A write touched a capability this module does not interpret (vendor-specific or
    /// raw): `offset`/`len` are the touched bytes relative to the capability start.
    CapabilityWritten {
        id: u8,
        cap_offset: u16,
        offset: u16,
        len: u16,
    },
    /// A write touched an extended capability; fields as for `CapabilityWritten`.
    ExtCapabilityWritten {
        id: u16,
        cap_offset: u16,
        offset: u16,
        len: u16,
    },
}

#[derive(Debug)]
enum CapSpec {
    Plain(Capability),
    Msix(MsixLayout),
}

/// Builder for [`PciDevice`].
#[derive(Debug)]
pub struct PciDeviceBuilder {
    ids: PciIds,
    size: ConfigSize,
    interrupt_pin: u8,
    bars: Vec<(usize, BarDef)>,
    rom: Option<u32>,
    caps: Vec<CapSpec>,
    ext_caps: Vec<ExtCapability>,
}

impl PciDeviceBuilder {
    /// A 256-byte config space with no interrupt pin, BARs or capabilities.
    pub fn new(ids: PciIds) -> Self {
        Self {
            ids,
            size: ConfigSize::Conventional,
            interrupt_pin: 0,
            bars: Vec::new(),
            rom: None,
            caps: Vec::new(),
            ext_caps: Vec::new(),
        }
    }

    pub fn config_size(mut self, size: ConfigSize) -> Self {
        self.size = size;
        self
    }

    /// 0 = none, 1..=4 = INTA..INTD.
    pub fn interrupt_pin(mut self, pin: u8) -> Self {
        self.interrupt_pin = pin;
        self
    }

    /// Define BAR `index` (a 64-bit BAR also takes `index + 1`).
    pub fn bar(mut self, index: usize, def: BarDef) -> Self {
        self.bars.push((index, def));
        self
    }

    /// An expansion ROM BAR of `size` bytes (its contents are the transport's business).
    pub fn rom(mut self, size: u32) -> Self {
        self.rom = Some(size);
        self
    }

    /// Append a capability to the chain (chain order = call order).
    pub fn capability(mut self, cap: Capability) -> Self {
        self.caps.push(CapSpec::Plain(cap));
        self
    }

    /// Append an extended capability (needs `ConfigSize::Express`), placed from 0x100.
    pub fn ext_capability(mut self, cap: ExtCapability) -> Self {
        self.ext_caps.push(cap);
        self
    }

    /// Append the MSI-X capability to the chain and create the [`Msix`] state.
    pub fn msix(mut self, layout: MsixLayout) -> Self {
        self.caps.push(CapSpec::Msix(layout));
        self
    }

    pub fn build(self) -> Result<PciDevice, PciError> {
        if self.interrupt_pin > 4 {
            return Err(PciError::BadInterruptPin(self.interrupt_pin));
        }
        let mut cfg = ConfigSpace::new(self.size);
        cfg.init_header(&self.ids, self.interrupt_pin)?;

        let mut bars: [Option<BarDef>; BAR_COUNT] = [None; BAR_COUNT];
        let mut used = [false; BAR_COUNT];
        for &(index, def) in &self.bars {
            if index >= BAR_COUNT || index + def.slots() > BAR_COUNT {
                return Err(PciError::BadBarIndex(index));
            }
            if !def.size_is_valid() {
                return Err(PciError::BadBarSize {
                    index,
                    kind: def.kind,
                    size: def.size,
                });
            }
            if used[index..index + def.slots()].iter().any(|&u| u) {
                return Err(PciError::BarSlotTaken { index });
            }
            used[index..index + def.slots()].fill(true);
            def.install(&mut cfg, index)?;
            let bit = if def.is_memory() {
                command::MEMORY_SPACE
            } else {
                command::IO_SPACE
            };
            cfg.allow_command_bits(bit)?;
            bars[index] = Some(def);
        }

        let rom = match self.rom {
            Some(size) => {
                let r = RomBar { size };
                if !r.size_is_valid() {
                    return Err(PciError::BadRomSize(size));
                }
                r.install(&mut cfg)?;
                cfg.allow_command_bits(command::MEMORY_SPACE)?;
                Some(r)
            }
            None => None,
        };

        let mut caps_list = Vec::with_capacity(self.caps.len());
        let mut msix_layout = None;
        for spec in self.caps {
            let cap = match spec {
                CapSpec::Plain(c) => c,
                CapSpec::Msix(l) => {
                    if msix_layout.is_some() {
                        return Err(PciError::DuplicateCapability(cap_id::MSIX));
                    }
                    validate_msix(&bars, &l)?;
                    msix_layout = Some(l);
                    Capability::msix(
                        l.vectors,
                        (l.table_bar, l.table_offset),
                        (l.pba_bar, l.pba_offset),
                    )
                }
            };
            let unique = [cap_id::MSIX, cap_id::POWER_MANAGEMENT, cap_id::PCI_EXPRESS];
            if unique.contains(&cap.id())
                && caps_list.iter().any(|c: &Capability| c.id() == cap.id())
            {
                return Err(PciError::DuplicateCapability(cap.id()));
            }
            caps_list.push(cap);
        }
        let caps = caps::install(&mut cfg, &caps_list)?;
        let ext_caps = caps::install_ext(&mut cfg, &self.ext_caps)?;
        let find = |id| caps.iter().find(|c| c.id == id).map(|c| c.offset);

        let msix = match msix_layout {
            Some(layout) => Some(MsixState {
                cap: find(cap_id::MSIX).unwrap_or(0),
                layout,
                msix: Arc::new(Msix::new(layout.vectors)?),
            }),
            None => None,
        };
        let pm = find(cap_id::POWER_MANAGEMENT);
        let pcie = find(cap_id::PCI_EXPRESS);

        Ok(PciDevice {
            initial: cfg.clone(),
            config: cfg,
            bars,
            rom,
            msix,
            pm,
            pcie,
            caps,
            ext_caps,
            intx: Arc::new(IntxLine::new()),
        })
    }
}

fn validate_msix(bars: &[Option<BarDef>; BAR_COUNT], l: &MsixLayout) -> Result<(), PciError> {
    if l.vectors == 0 || l.vectors > MSIX_MAX_VECTORS {
        return Err(MsixError::BadVector {
            vector: u32::from(l.vectors),
            size: MSIX_MAX_VECTORS,
        }
        .into());
    }
    let table_len = u64::from(l.vectors) * 16;
    let pba_len = u64::from(l.vectors).div_ceil(64) * 8;
    let check = |what, bar: u8, offset: u32, len: u64| -> Result<(), PciError> {
        let def = bars
            .get(usize::from(bar))
            .copied()
            .flatten()
            .filter(BarDef::is_memory)
            .ok_or(PciError::MsixBar { what, bar })?;
        let end = u64::from(offset) + len;
        if offset % 8 != 0 || end > def.size {
            return Err(PciError::MsixPlacement { what, offset, len });
        }
        Ok(())
    };
    check("table", l.table_bar, l.table_offset, table_len)?;
    check("PBA", l.pba_bar, l.pba_offset, pba_len)?;
    if l.table_bar == l.pba_bar {
        let (t0, t1) = (
            u64::from(l.table_offset),
            u64::from(l.table_offset) + table_len,
        );
        let (p0, p1) = (u64::from(l.pba_offset), u64::from(l.pba_offset) + pba_len);
        if t0 < p1 && p0 < t1 {
            return Err(PciError::MsixOverlap);
        }
    }
    Ok(())
}

#[derive(Debug)]
struct MsixState {
    cap: u16,
    layout: MsixLayout,
    msix: Arc<Msix>,
}

/// Register values compared before and after a config write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    command: u16,
    bars: [u64; BAR_COUNT],
    rom: (u32, bool),
    msix_ctrl: u16,
    pmcsr: u16,
}

/// One PCI function's configuration-side state.
#[derive(Debug)]
pub struct PciDevice {
    config: ConfigSpace,
    /// The image right after build, restored by [`PciDevice::reset`].
    initial: ConfigSpace,
    bars: [Option<BarDef>; BAR_COUNT],
    rom: Option<RomBar>,
    msix: Option<MsixState>,
    pm: Option<u16>,
    pcie: Option<u16>,
    caps: Vec<CapInfo>,
    ext_caps: Vec<ExtCapInfo>,
    intx: Arc<IntxLine>,
}

impl PciDevice {
    /// Config space size in bytes (what region 7 reports).
    pub fn config_size(&self) -> usize {
        self.config.size()
    }

    /// The raw config image (without the live INTx status bit).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Device-side access to the image, e.g. to fill a virtio PCI-cfg data window before a
    /// guest read. Masks still apply to guest writes.
    pub fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    /// Placed capabilities in chain order.
    pub fn capabilities(&self) -> &[CapInfo] {
        &self.caps
    }

    /// Placed extended capabilities in chain order.
    pub fn ext_capabilities(&self) -> &[ExtCapInfo] {
        &self.ext_caps
    }

    /// The first capability with `id`.
    pub fn find_capability(&self, id: u8) -> Option<CapInfo> {
        self.caps.iter().copied().find(|c| c.id == id)
    }

    /// The BAR defined at `index` (`None` for absent BARs and upper halves).
    pub fn bar(&self, index: usize) -> Option<BarDef> {
        self.bars.get(index).copied().flatten()
    }

    /// Region size for BAR `index` (0 when absent or an upper half), for GET_REGION_INFO.
    pub fn bar_size(&self, index: usize) -> u64 {
        self.bar(index).map_or(0, |b| b.size)
    }

    /// The guest-programmed address of BAR `index`.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        self.bar(index).map(|b| b.address(&self.config, index))
    }

    /// Expansion ROM size (0 when absent).
    pub fn rom_size(&self) -> u32 {
        self.rom.map_or(0, |r| r.size)
    }

    /// Expansion ROM (address, enabled), `None` when absent.
    pub fn rom_state(&self) -> Option<(u32, bool)> {
        self.rom.map(|_| RomBar::state(&self.config))
    }

    pub fn command(&self) -> u16 {
        self.config.u16_at(reg::COMMAND)
    }

    /// The MSI-X state, shareable with poller threads.
    pub fn msix(&self) -> Option<&Arc<Msix>> {
        self.msix.as_ref().map(|m| &m.msix)
    }

    pub fn msix_layout(&self) -> Option<MsixLayout> {
        self.msix.as_ref().map(|m| m.layout)
    }

    /// The INTx line, shareable with poller threads.
    pub fn intx(&self) -> &Arc<IntxLine> {
        &self.intx
    }

    /// Current PM power state (D0 without a PM capability).
    pub fn power_state(&self) -> PowerState {
        self.pm.map_or(PowerState::D0, |o| {
            PowerState::from_pmcsr(self.config.u16_at(usize::from(o) + PM_CTRL))
        })
    }

    /// Guest read at any offset/length inside the space. The status interrupt bit reflects
    /// the INTx line.
    pub fn config_read(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError> {
        self.config.read(offset, data)?;
        let st = reg::STATUS as u64;
        if offset <= st && st < offset + data.len() as u64 && self.intx.level() {
            let i = (st - offset) as usize;
            if let Some(b) = data.get_mut(i) {
                *b |= status::INTERRUPT as u8;
            }
        }
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        let mut bars = [0u64; BAR_COUNT];
        for (i, b) in bars.iter_mut().enumerate() {
            *b = self.bar_address(i).unwrap_or(0);
        }
        Snapshot {
            command: self.command(),
            bars,
            rom: RomBar::state(&self.config),
            msix_ctrl: self
                .msix
                .as_ref()
                .map_or(0, |m| self.config.u16_at(usize::from(m.cap) + MSIX_CTRL)),
            pmcsr: self
                .pm
                .map_or(0, |o| self.config.u16_at(usize::from(o) + PM_CTRL)),
        }
    }

    /// Guest write at any offset/length inside the space: applies the masks, then the
    /// side effects (MSI-X control, INTx disable, PM state filter, FLR) and reports what
    /// changed.
    pub fn config_write(
        &mut self,
        offset: u64,
        data: &[u8],
    ) -> Result<Vec<ConfigEvent>, ConfigError> {
        let before = self.snapshot();
        self.config.write(offset, data)?;
        let mut events = Vec::new();

        // Power management: only D0 and D3hot exist; other states are dropped.
        if let Some(o) = self.pm {
            let at = usize::from(o) + PM_CTRL;
            let v = self.config.u16_at(at);
            if matches!(v & 3, 1 | 2) {
                self.config.set_u16(at, (v & !3) | (before.pmcsr & 3))?;
            }
        }
        // PCIe Initiate FLR reads as zero.
        if let Some(o) = self.pcie {
            let at = usize::from(o) + PCIE_DEVCTL;
            let v = self.config.u16_at(at);
            if v & PCIE_DEVCTL_FLR != 0 {
                self.config.set_u16(at, v & !PCIE_DEVCTL_FLR)?;
                events.push(ConfigEvent::FunctionLevelReset);
            }
        }

        let after = self.snapshot();
        if after.command != before.command {
            if (after.command ^ before.command) & command::INTX_DISABLE != 0 {
                if let Err(e) = self
                    .intx
                    .set_disabled(after.command & command::INTX_DISABLE != 0)
                {
                    log::warn!("INTx delivery after INTx Disable change failed: {e}");
                }
            }
            events.push(ConfigEvent::CommandChanged {
                old: before.command,
                new: after.command,
            });
        }
        for (i, (a, b)) in after.bars.iter().zip(before.bars.iter()).enumerate() {
            if a != b {
                events.push(ConfigEvent::BarChanged {
                    index: i as u8,
                    address: *a,
                });
            }
        }
        if self.rom.is_some() && after.rom != before.rom {
            events.push(ConfigEvent::RomChanged {
                address: after.rom.0,
                enabled: after.rom.1,
            });
        }
        if let Some(m) = &self.msix {
            if after.msix_ctrl != before.msix_ctrl {
                if let Err(e) = m.msix.set_control(after.msix_ctrl) {
                    log::warn!("MSI-X pending delivery after control write failed: {e}");
                }
                let (enabled, function_masked) = m.msix.control();
                events.push(ConfigEvent::MsixControlChanged {
                    enabled,
                    function_masked,
                });
            }
        }
        if after.pmcsr & 3 != before.pmcsr & 3 {
            events.push(ConfigEvent::PowerStateChanged(PowerState::from_pmcsr(
                after.pmcsr,
            )));
        }

        let (start, len) = (offset as usize, data.len());
        for c in &self.caps {
            let handled = matches!(
                c.id,
                cap_id::MSIX | cap_id::POWER_MANAGEMENT | cap_id::PCI_EXPRESS
            );
            if !handled && c.overlaps(start, len) {
                let cs = usize::from(c.offset);
                let lo = start.max(cs);
                let hi = (start + len).min(cs + usize::from(c.len));
                events.push(ConfigEvent::CapabilityWritten {
                    id: c.id,
                    cap_offset: c.offset,
                    offset: (lo - cs) as u16,
                    len: (hi - lo) as u16,
                });
            }
        }
        for c in &self.ext_caps {
            let cs = usize::from(c.offset);
            let ce = cs + usize::from(c.len);
            if start < ce && start + len > cs {
                let lo = start.max(cs);
                let hi = (start + len).min(ce);
                events.push(ConfigEvent::ExtCapabilityWritten {
                    id: c.id,
                    cap_offset: c.offset,
                    offset: (lo - cs) as u16,
                    len: (hi - lo) as u16,
                });
            }
        }
        Ok(events)
    }

    /// Which MSI-X structure an access `[offset, offset+len)` of BAR `bar` hits:
    /// `Some((is_table, relative offset))`, `Some` with an error for accesses straddling
    /// a structure's start, `None` when it misses both.
    fn msix_route(
        &self,
        bar: u8,
        offset: u64,
        len: usize,
    ) -> Option<Result<(&Msix, bool, u64), MsixError>> {
        let m = self.msix.as_ref()?;
        let l = m.layout;
        let end = offset.saturating_add(len as u64);
        let regions = [
            (
                true,
                l.table_bar,
                u64::from(l.table_offset),
                m.msix.table_len(),
            ),
            (false, l.pba_bar, u64::from(l.pba_offset), m.msix.pba_len()),
        ];
        for (is_table, b, start, size) in regions {
            if b == bar && offset < start + size && end > start {
                return Some(match offset.checked_sub(start) {
                    Some(rel) => Ok((&*m.msix, is_table, rel)),
                    None => Err(MsixError::BadAccess {
                        region: if is_table { "table" } else { "PBA" },
                        offset,
                        len,
                    }),
                });
            }
        }
        None
    }

    /// Read the MSI-X table or PBA if `[offset, offset+len)` of BAR `bar` hits one;
    /// `None` if it hits neither.
    pub fn msix_bar_read(
        &self,
        bar: u8,
        offset: u64,
        data: &mut [u8],
    ) -> Option<Result<(), MsixError>> {
        let r = self.msix_route(bar, offset, data.len())?;
        Some(r.and_then(|(m, is_table, rel)| {
            if is_table {
                m.read_table(rel, data)
            } else {
                m.read_pba(rel, data)
            }
        }))
    }

    /// Write the MSI-X table (PBA writes are ignored) if the access hits one; `None` if it
    /// hits neither.
    pub fn msix_bar_write(
        &self,
        bar: u8,
        offset: u64,
        data: &[u8],
    ) -> Option<Result<(), MsixError>> {
        let r = self.msix_route(bar, offset, data.len())?;
        Some(r.and_then(|(m, is_table, rel)| {
            if is_table {
                m.write_table(rel, data).map(|_| ())
            } else {
                Ok(())
            }
        }))
    }

    /// Function reset: restore the config image as built, reset MSI-X (table, PBA,
    /// control) and lower INTx. Client eventfds are kept.
    pub fn reset(&mut self) {
        self.config = self.initial.clone();
        if let Some(m) = &self.msix {
            m.msix.reset();
        }
        self.intx.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::caps::PcieCapConfig;
    use crate::pci::irq::tests::{count, eventfd_pair};
    use crate::pci::msix::Delivery;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x8086,
            device_id: 0x1889,
            revision_id: 2,
            class_code: 0x020000,
            subsystem_vendor_id: 0x8086,
            subsystem_id: 0,
        }
    }

    fn avf_like() -> PciDevice {
        PciDeviceBuilder::new(ids())
            .config_size(ConfigSize::Express)
            .bar(0, BarDef::mem64(0x20000).prefetchable())
            .bar(3, BarDef::mem64(0x4000).prefetchable())
            .msix(MsixLayout {
                vectors: 5,
                table_bar: 3,
                table_offset: 0,
                pba_bar: 3,
                pba_offset: 0x2000,
            })
            .capability(Capability::pci_express(PcieCapConfig { flr: true }))
            .build()
            .unwrap()
    }

    fn w32(d: &mut PciDevice, off: u64, v: u32) -> Vec<ConfigEvent> {
        d.config_write(off, &v.to_le_bytes()).unwrap()
    }

    fn r32(d: &PciDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn builder_rejects_bad_layouts() {
        let b = || PciDeviceBuilder::new(ids());
        assert!(matches!(
            b().bar(5, BarDef::mem64(0x1000)).build(),
            Err(PciError::BadBarIndex(5))
        ));
        assert!(matches!(
            b().bar(0, BarDef::mem64(0x1000))
                .bar(1, BarDef::mem32(0x1000))
                .build(),
            Err(PciError::BarSlotTaken { index: 1 })
        ));
        assert!(matches!(
            b().bar(0, BarDef::mem32(0x1800)).build(),
            Err(PciError::BadBarSize { index: 0, .. })
        ));
        assert!(matches!(
            b().rom(100).build(),
            Err(PciError::BadRomSize(100))
        ));
        assert!(matches!(
            b().interrupt_pin(5).build(),
            Err(PciError::BadInterruptPin(5))
        ));
        let layout = MsixLayout {
            vectors: 4,
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: 0x20,
        };
        assert!(matches!(
            b().bar(1, BarDef::mem32(0x1000)).msix(layout).build(),
            Err(PciError::MsixOverlap)
        ));
        assert!(matches!(
            b().msix(layout).build(),
            Err(PciError::MsixBar { bar: 1, .. })
        ));
        assert!(matches!(
            b().bar(1, BarDef::io(0x100)).msix(layout).build(),
            Err(PciError::MsixBar { bar: 1, .. })
        ));
        let outside = MsixLayout {
            pba_offset: 0x1000,
            ..layout
        };
        assert!(matches!(
            b().bar(1, BarDef::mem32(0x1000)).msix(outside).build(),
            Err(PciError::MsixPlacement { what: "PBA", .. })
        ));
        let misaligned = MsixLayout {
            table_offset: 0x804,
            pba_offset: 0,
            ..layout
        };
        assert!(matches!(
            b().bar(1, BarDef::mem32(0x1000)).msix(misaligned).build(),
            Err(PciError::MsixPlacement { what: "table", .. })
        ));
        assert!(matches!(
            b().capability(Capability::power_management())
                .capability(Capability::power_management())
                .build(),
            Err(PciError::DuplicateCapability(cap_id::POWER_MANAGEMENT))
        ));
    }

    #[test]
    fn bar_programming_events_and_addresses() {
        let mut d = avf_like();
        assert_eq!(d.bar_size(0), 0x20000);
        assert_eq!(d.bar_size(1), 0);
        assert_eq!(d.bar_size(3), 0x4000);
        assert_eq!(d.bar_size(4), 0);
        // Sizing.
        let ev = w32(&mut d, 0x10, 0xffff_ffff);
        assert_eq!(r32(&d, 0x10), 0xfffe_000c);
        assert_eq!(
            ev,
            vec![ConfigEvent::BarChanged {
                index: 0,
                address: 0xfffe_0000
            }]
        );
        w32(&mut d, 0x14, 0xffff_ffff);
        assert_eq!(r32(&d, 0x14), 0xffff_ffff);
        // Programming, one 8-byte write.
        let ev = d
            .config_write(0x10, &0x0000_0010_c000_0000u64.to_le_bytes())
            .unwrap();
        assert_eq!(
            ev,
            vec![ConfigEvent::BarChanged {
                index: 0,
                address: 0x10_c000_0000
            }]
        );
        assert_eq!(d.bar_address(0), Some(0x10_c000_0000));
        assert_eq!(d.bar_address(1), None);
        // Writing the same value again reports nothing.
        assert!(w32(&mut d, 0x10, 0xc000_0000).is_empty());
        // No ROM: reads 0, writes ignored, no event.
        assert!(w32(&mut d, 0x30, 0xffff_f800).is_empty());
        assert_eq!(r32(&d, 0x30), 0);
        assert_eq!(d.rom_state(), None);
    }

    #[test]
    fn rom_present_and_command_events() {
        let mut d = PciDeviceBuilder::new(ids())
            .bar(2, BarDef::io(0x40))
            .rom(0x8000)
            .interrupt_pin(1)
            .build()
            .unwrap();
        w32(&mut d, 0x30, 0xffff_f800);
        assert_eq!(r32(&d, 0x30), 0xffff_8000);
        let ev = w32(&mut d, 0x30, 0xfe00_0001);
        assert_eq!(
            ev,
            vec![ConfigEvent::RomChanged {
                address: 0xfe00_0000,
                enabled: true
            }]
        );
        assert_eq!(d.rom_size(), 0x8000);
        // I/O and memory decode are both writable (I/O BAR + ROM).
        let ev = d.config_write(0x04, &[0x07, 0x00]).unwrap();
        assert_eq!(ev, vec![ConfigEvent::CommandChanged { old: 0, new: 7 }]);
        // No capabilities: no list bit.
        assert_eq!(r32(&d, 0x04) >> 16, 0);
    }

    #[test]
    fn msix_control_write_drives_msix_state() {
        let mut d = avf_like();
        let cap = d.find_capability(cap_id::MSIX).unwrap();
        let ctrl = u64::from(cap.offset) + 2;
        let m = d.msix().unwrap().clone();
        // Program vector 1 through the BAR and unmask it.
        d.msix_bar_write(3, 16, &0xfee0_0000u32.to_le_bytes())
            .unwrap()
            .unwrap();
        d.msix_bar_write(3, 28, &0u32.to_le_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(m.trigger(1).unwrap(), Delivery::Pending);
        // Enable with function mask via a byte write to the control's high byte.
        let ev = d.config_write(ctrl + 1, &[0xc0]).unwrap();
        assert_eq!(
            ev,
            vec![ConfigEvent::MsixControlChanged {
                enabled: true,
                function_masked: true
            }]
        );
        assert_eq!(m.control(), (true, true));
        // Table size bits are read-only.
        d.config_write(ctrl, &[0xff, 0x80]).unwrap();
        let mut b = [0u8; 2];
        d.config_read(ctrl, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0x8004);
        assert_eq!(m.control(), (true, false));
        // PBA through the BAR: vector 1 still pending (no sink installed).
        let mut pba = [0u8; 8];
        d.msix_bar_read(3, 0x2000, &mut pba).unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        // PBA writes are ignored.
        d.msix_bar_write(3, 0x2000, &[0; 8]).unwrap().unwrap();
        d.msix_bar_read(3, 0x2000, &mut pba).unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        // Outside the structures: not ours.
        assert!(d.msix_bar_read(3, 0x1000, &mut pba).is_none());
        assert!(d.msix_bar_read(0, 0, &mut pba).is_none());
        // Straddling the table start from below is an error, not a miss.
        let mut b16 = [0u8; 8];
        assert!(d.msix_bar_read(3, 0x1ffc, &mut b16).unwrap().is_err());
    }

    #[test]
    fn flr_event_and_reset_restore() {
        let mut d = avf_like();
        let pcie = u64::from(d.find_capability(cap_id::PCI_EXPRESS).unwrap().offset);
        w32(&mut d, 0x10, 0xc000_0000);
        d.config_write(0x04, &[0x06]).unwrap();
        let ev = d.config_write(pcie + 9, &[0x80]).unwrap();
        assert_eq!(ev, vec![ConfigEvent::FunctionLevelReset]);
        let mut b = [0u8; 2];
        d.config_read(pcie + 8, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b) & PCIE_DEVCTL_FLR, 0);
        d.reset();
        assert_eq!(d.bar_address(0), Some(0));
        assert_eq!(d.command(), 0);
        assert_eq!(d.config().bytes(), d.initial.bytes());
    }

    #[test]
    fn pm_state_filter() {
        let mut d = PciDeviceBuilder::new(ids())
            .capability(Capability::power_management())
            .build()
            .unwrap();
        let pmcsr = u64::from(d.find_capability(cap_id::POWER_MANAGEMENT).unwrap().offset) + 4;
        let ev = d.config_write(pmcsr, &[0x03, 0x00]).unwrap();
        assert_eq!(ev, vec![ConfigEvent::PowerStateChanged(PowerState::D3Hot)]);
        assert_eq!(d.power_state(), PowerState::D3Hot);
        // D1 is unsupported: dropped, no event.
        assert!(d.config_write(pmcsr, &[0x01]).unwrap().is_empty());
        assert_eq!(d.power_state(), PowerState::D3Hot);
        let ev = d.config_write(pmcsr, &[0x00]).unwrap();
        assert_eq!(ev, vec![ConfigEvent::PowerStateChanged(PowerState::D0)]);
        // No_Soft_Reset stays set.
        let mut b = [0u8; 2];
        d.config_read(pmcsr, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0x0008);
    }

    #[test]
    fn vendor_cap_writes_are_reported() {
        let mut d = PciDeviceBuilder::new(ids())
            .capability(Capability::power_management())
            .capability(
                Capability::vendor_with_wmask(
                    &[5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
                    &[
                        0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                        0xff, 0xff, 0xff,
                    ],
                )
                .unwrap(),
            )
            .build()
            .unwrap();
        let v = d.find_capability(cap_id::VENDOR).unwrap();
        assert_eq!((v.offset, v.len), (0x48, 20));
        // Write the data window (cap + 16).
        let ev = d.config_write(0x48 + 16, &[9, 9, 9, 9]).unwrap();
        assert_eq!(
            ev,
            vec![ConfigEvent::CapabilityWritten {
                id: cap_id::VENDOR,
                cap_offset: 0x48,
                offset: 16,
                len: 4
            }]
        );
        assert_eq!(d.config().u32_at(0x58), 0x0909_0909);
        // cfg_type (cap + 3) is read-only; bar (cap + 4) writable.
        d.config_write(0x4b, &[0xaa, 0x02]).unwrap();
        assert_eq!(d.config().u8_at(0x4b), 5);
        assert_eq!(d.config().u8_at(0x4c), 2);
    }

    #[test]
    fn intx_status_bit_and_disable() {
        let mut d = PciDeviceBuilder::new(ids())
            .interrupt_pin(1)
            .build()
            .unwrap();
        let (fd, r) = eventfd_pair();
        d.intx().set_trigger_fd(Some(fd)).unwrap();
        d.config_write(0x05, &[0x04]).unwrap(); // INTx Disable.
        assert!(!d.intx().assert().unwrap());
        let mut st = [0u8; 2];
        d.config_read(0x06, &mut st).unwrap();
        assert_eq!(
            u16::from_le_bytes(st) & status::INTERRUPT,
            status::INTERRUPT
        );
        assert_eq!(count(&r), 0);
        // Clearing INTx Disable delivers the held level.
        d.config_write(0x05, &[0x00]).unwrap();
        assert_eq!(count(&r), 1);
        // The status bit is read-only for the guest and drops with the line.
        d.intx().deassert();
        d.config_write(0x06, &[0xff, 0xff]).unwrap();
        assert_eq!(r32(&d, 0x04) >> 16, 0);
    }

    /// Random guest accesses anywhere (in and out of range, any length 0..=8) never panic,
    /// fail exactly when out of range, and never change a bit that is neither writable nor
    /// W1C; the capability chain survives.
    #[test]
    fn random_config_writes_keep_read_only_state() {
        let mut d = avf_like();
        let d0 = avf_like();
        let chain = crate::pci::walk_capabilities(d.config().bytes()).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let r = next();
            let off = r % 4200;
            let len = ((r >> 16) % 9) as usize;
            let val = next().to_le_bytes();
            let res = d.config_write(off, &val[..len]);
            assert_eq!(
                res.is_err(),
                off as usize + len > 4096,
                "write {off:#x}+{len}"
            );
            let mut buf = [0u8; 8];
            let res = d.config_read(off, &mut buf[..len]);
            assert_eq!(
                res.is_err(),
                off as usize + len > 4096,
                "read {off:#x}+{len}"
            );
            let _ = d.msix_bar_read((r >> 40) as u8 % 6, next() % 0x4100, &mut buf[..len]);
            let _ = d.msix_bar_write((r >> 48) as u8 % 6, next() % 0x4100, &val[..len]);
        }
        let (now, init) = (d.config(), d0.config());
        for i in 0..now.size() {
            let free = now.wmask_at(i) | now.w1cmask_at(i);
            assert_eq!(
                (now.u8_at(i) ^ init.u8_at(i)) & !free,
                0,
                "read-only bits changed at {i:#x}"
            );
        }
        assert_eq!(crate::pci::walk_capabilities(now.bytes()).unwrap(), chain);
    }

    #[test]
    fn ext_capability_in_device() {
        let cap = ExtCapability::raw(0x000b, 1, vec![0; 8], vec![0xff; 8], vec![0; 8]).unwrap();
        assert!(PciDeviceBuilder::new(ids())
            .ext_capability(cap.clone())
            .build()
            .is_err());
        let mut d = PciDeviceBuilder::new(ids())
            .config_size(ConfigSize::Express)
            .ext_capability(cap)
            .build()
            .unwrap();
        assert_eq!(d.ext_capabilities().len(), 1);
        assert_eq!(
            crate::pci::walk_ext_capabilities(d.config().bytes()).unwrap(),
            vec![(0x000b, 1, 0x100)]
        );
        let ev = d.config_write(0x106, &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            ev,
            vec![ConfigEvent::ExtCapabilityWritten {
                id: 0x000b,
                cap_offset: 0x100,
                offset: 6,
                len: 4
            }]
        );
    }

    #[test]
    fn out_of_range_config_access() {
        let mut d = avf_like();
        let mut b = [0u8; 4];
        assert!(d.config_read(4096, &mut b).is_err());
        assert!(d.config_write(4094, &[0; 4]).is_err());
        d.config_read(4092, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        assert_eq!(d.config_size(), 4096);
    }
}
