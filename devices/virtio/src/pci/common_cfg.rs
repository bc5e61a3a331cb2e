//! The virtio-pci common configuration structure (virtio 1.2 §4.1.4.3) as a register file.
//!
//! [`CommonCfg`] holds the registers and enforces their semantics: feature windows, the
//! status machine (FEATURES_OK refusal, reset on 0, sticky bits), per-queue fields writable
//! only while the queue is disabled (at any status, since older SeaBIOS sets its queue up
//! before FEATURES_OK), queue size limits, MSI-X vector read-back and queue
//! reset. Side effects (stopping queues, starting the datapath, device-type feature checks)
//! are delegated to a [`CommonCfgHooks`] implementation, called synchronously inside the
//! write so that the next read already sees the outcome (a reset is complete before
//! `device_status` reads 0).
//!
//! Accesses: width 1, 2 or 4 at a naturally aligned offset; width 8 is split into two
//! dword accesses. Reads compose bytes from the registers they cover; writes must match one
//! register exactly (offset and width), otherwise they are ignored. Anything else reads as
//! zero and is ignored on write.

use log::debug;

use super::features::{VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};

/// Size of the register block (up to and including `admin_queue_num`).
pub const COMMON_CFG_LEN: u64 = 0x40;

/// "No vector" value for `config_msix_vector` / `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// `device_status` bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Register offsets inside the common configuration structure.
pub mod offset {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    pub const QUEUE_RESET: u64 = 0x3a;
    pub const ADMIN_QUEUE_INDEX: u64 = 0x3c;
    pub const ADMIN_QUEUE_NUM: u64 = 0x3e;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDescLo,
    QueueDescHi,
    QueueDriverLo,
    QueueDriverHi,
    QueueDeviceLo,
    QueueDeviceHi,
    QueueNotifyData,
    QueueReset,
    AdminQueueIndex,
    AdminQueueNum,
}

/// (offset, width, register), sorted by offset, covering 0..COMMON_CFG_LEN without gaps.
const REGS: [(u64, u64, Reg); 23] = [
    (offset::DEVICE_FEATURE_SELECT, 4, Reg::DeviceFeatureSelect),
    (offset::DEVICE_FEATURE, 4, Reg::DeviceFeature),
    (offset::DRIVER_FEATURE_SELECT, 4, Reg::DriverFeatureSelect),
    (offset::DRIVER_FEATURE, 4, Reg::DriverFeature),
    (offset::CONFIG_MSIX_VECTOR, 2, Reg::ConfigMsixVector),
    (offset::NUM_QUEUES, 2, Reg::NumQueues),
    (offset::DEVICE_STATUS, 1, Reg::DeviceStatus),
    (offset::CONFIG_GENERATION, 1, Reg::ConfigGeneration),
    (offset::QUEUE_SELECT, 2, Reg::QueueSelect),
    (offset::QUEUE_SIZE, 2, Reg::QueueSize),
    (offset::QUEUE_MSIX_VECTOR, 2, Reg::QueueMsixVector),
    (offset::QUEUE_ENABLE, 2, Reg::QueueEnable),
    (offset::QUEUE_NOTIFY_OFF, 2, Reg::QueueNotifyOff),
    (offset::QUEUE_DESC_LO, 4, Reg::QueueDescLo),
    (offset::QUEUE_DESC_HI, 4, Reg::QueueDescHi),
    (offset::QUEUE_DRIVER_LO, 4, Reg::QueueDriverLo),
    (offset::QUEUE_DRIVER_HI, 4, Reg::QueueDriverHi),
    (offset::QUEUE_DEVICE_LO, 4, Reg::QueueDeviceLo),
    (offset::QUEUE_DEVICE_HI, 4, Reg::QueueDeviceHi),
    (offset::QUEUE_NOTIFY_DATA, 2, Reg::QueueNotifyData),
    (offset::QUEUE_RESET, 2, Reg::QueueReset),
    (offset::ADMIN_QUEUE_INDEX, 2, Reg::AdminQueueIndex),
    (offset::ADMIN_QUEUE_NUM, 2, Reg::AdminQueueNum),
];

/// The register containing byte `off`, with its offset and width.
fn reg_at(off: u64) -> Option<(u64, u64, Reg)> {
    let idx = REGS.partition_point(|&(o, w, _)| o + w <= off);
    REGS.get(idx).copied().filter(|&(o, _, _)| o <= off)
}

/// Side effects of common-config writes, implemented by the transport.
///
/// Every method runs synchronously inside [`CommonCfg::write`]; when it returns, the effect
/// must be complete (e.g. a stopped queue no longer touches guest memory).
pub trait CommonCfgHooks {
    /// Device-type check of the driver's features at FEATURES_OK. The subset and VERSION_1
    /// checks have already passed.
    fn features_ok(&mut self, features: u64) -> bool;
    /// Whether `vector` (already checked to be inside the MSI-X table) can be used.
    fn vector_ok(&mut self, _vector: u16) -> bool {
        true
    }
    /// DRIVER_OK was set: start the datapath (features, then every enabled queue).
    fn driver_ok(&mut self, cfg: &CommonCfg);
    /// Queue `index` was enabled. `cfg` holds its final configuration.
    fn queue_enabled(&mut self, cfg: &CommonCfg, index: u16);
    /// Stop queue `index` (queue_reset). Its registers are reset after this returns.
    fn queue_reset(&mut self, index: u16);
    /// The driver wrote 0 to `device_status`: stop every queue. The registers are reset
    /// after this returns.
    fn device_reset(&mut self);
}

/// Driver-visible configuration of one virtqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRegs {
    /// Largest size the device supports; 0 means the queue is unavailable.
    pub max_size: u16,
    /// Current size (the driver may shrink it while the queue is disabled).
    pub size: u16,
    /// MSI-X vector for used-buffer notifications, or [`VIRTIO_MSI_NO_VECTOR`].
    pub msix_vector: u16,
    /// `queue_enable`.
    pub enabled: bool,
    /// Descriptor area guest address.
    pub desc: u64,
    /// Driver (available) area guest address.
    pub driver: u64,
    /// Device (used) area guest address.
    pub device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            msix_vector: VIRTIO_MSI_NO_VECTOR,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }
}

/// The common configuration register file.
#[derive(Debug, Clone)]
pub struct CommonCfg {
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_msix_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    msix_table_size: u16,
}

fn set_half(v: &mut u64, hi: bool, half: u32) {
    if hi {
        *v = (*v & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(half);
    }
}

fn half(v: u64, hi: bool) -> u32 {
    if hi {
        (v >> 32) as u32
    } else {
        v as u32
    }
}

impl CommonCfg {
    /// A register file offering `device_features`, with one queue per entry of
    /// `queue_max_sizes` (each ≤ 32768) and an MSI-X table of `msix_table_size` vectors
    /// (0: no MSI-X, every vector write reads back NO_VECTOR).
    pub fn new(device_features: u64, queue_max_sizes: &[u16], msix_table_size: u16) -> Self {
        Self {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_msix_vector: VIRTIO_MSI_NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueRegs::new(m.min(32768)))
                .collect(),
            msix_table_size,
        }
    }

    /// Features the device offers.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }
    /// Features the driver wrote (final once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }
    /// Current `device_status`.
    pub fn status(&self) -> u8 {
        self.status
    }
    /// True once DRIVER_OK is set (and until reset).
    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }
    /// Current `config_generation`.
    pub fn config_generation(&self) -> u8 {
        self.config_generation
    }
    /// Advance `config_generation` after a device configuration change.
    pub fn bump_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }
    /// `config_msix_vector`.
    pub fn config_msix_vector(&self) -> u16 {
        self.config_msix_vector
    }
    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        // Construction takes a slice whose length is not bounded; clamp for the register.
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }
    /// Configuration of queue `index`.
    pub fn queue(&self, index: u16) -> Option<&QueueRegs> {
        self.queues.get(usize::from(index))
    }
    /// All queue configurations, by index.
    pub fn queues(&self) -> &[QueueRegs] {
        &self.queues
    }

    /// Set DEVICE_NEEDS_RESET (the device hit an error it cannot recover from). Returns true
    /// if the bit was newly set and DRIVER_OK is set, i.e. the caller should send a
    /// configuration-change notification.
    pub fn set_needs_reset(&mut self) -> bool {
        let was = self.status & status::DEVICE_NEEDS_RESET != 0;
        self.status |= status::DEVICE_NEEDS_RESET;
        !was && self.driver_ok()
    }

    /// Power-on state of every register except `config_generation` (kept so a driver never
    /// sees an old generation again) and the device's limits.
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Read `data.len()` bytes at `off`. Unsupported sizes or offsets read as zero.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        match data.len() {
            8 if off % 8 == 0 => {
                let (lo, hi) = data.split_at_mut(4);
                self.read(off, lo);
                if let Some(off_hi) = off.checked_add(4) {
                    self.read(off_hi, hi);
                }
            }
            1 | 2 | 4 if off % data.len() as u64 == 0 => {
                let mut cached: Option<(u64, u64, u32)> = None;
                for (i, byte) in data.iter_mut().enumerate() {
                    let Some(pos) = off.checked_add(i as u64) else {
                        return;
                    };
                    let (ro, _, val) = match cached {
                        Some(c @ (ro, w, _)) if pos < ro + w => c,
                        _ => {
                            let Some((ro, w, reg)) = reg_at(pos) else {
                                return;
                            };
                            let c = (ro, w, self.read_reg(reg));
                            cached = Some(c);
                            c
                        }
                    };
                    *byte = (val >> (8 * (pos - ro))) as u8;
                }
            }
            _ => {}
        }
    }

    /// Write `data` at `off`, running side effects through `hooks`. Writes that do not match
    /// a register exactly are ignored.
    pub fn write(&mut self, off: u64, data: &[u8], hooks: &mut dyn CommonCfgHooks) {
        if data.len() == 8 && off % 8 == 0 {
            let (lo, hi) = data.split_at(4);
            self.write(off, lo, hooks);
            if let Some(off_hi) = off.checked_add(4) {
                self.write(off_hi, hi, hooks);
            }
            return;
        }
        let Some((ro, w, reg)) = reg_at(off) else {
            debug!("common cfg: write outside registers at {off:#x}");
            return;
        };
        if ro != off || w != data.len() as u64 {
            debug!(
                "common cfg: ignored {}-byte write at {off:#x} (register {reg:?} is {w} bytes at {ro:#x})",
                data.len()
            );
            return;
        }
        let mut buf = [0u8; 4];
        buf[..data.len()].copy_from_slice(data);
        self.write_reg(reg, u32::from_le_bytes(buf), hooks);
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn read_reg(&self, reg: Reg) -> u32 {
        let q = self.selected();
        let qf = |f: fn(&QueueRegs) -> u32| q.map(f).unwrap_or(0);
        match reg {
            Reg::DeviceFeatureSelect => self.device_feature_select,
            Reg::DeviceFeature => match self.device_feature_select {
                0 => half(self.device_features, false),
                1 => half(self.device_features, true),
                _ => 0,
            },
            Reg::DriverFeatureSelect => self.driver_feature_select,
            Reg::DriverFeature => match self.driver_feature_select {
                0 => half(self.driver_features, false),
                1 => half(self.driver_features, true),
                _ => 0,
            },
            Reg::ConfigMsixVector => u32::from(self.config_msix_vector),
            Reg::NumQueues => u32::from(self.num_queues()),
            Reg::DeviceStatus => u32::from(self.status),
            Reg::ConfigGeneration => u32::from(self.config_generation),
            Reg::QueueSelect => u32::from(self.queue_select),
            Reg::QueueSize => qf(|q| u32::from(q.size)),
            Reg::QueueMsixVector => q.map_or(u32::from(VIRTIO_MSI_NO_VECTOR), |q| {
                u32::from(q.msix_vector)
            }),
            Reg::QueueEnable => qf(|q| u32::from(q.enabled)),
            // One notify slot per queue: notify_off is the queue index.
            Reg::QueueNotifyOff | Reg::QueueNotifyData => {
                q.map_or(0, |_| u32::from(self.queue_select))
            }
            Reg::QueueDescLo => qf(|q| half(q.desc, false)),
            Reg::QueueDescHi => qf(|q| half(q.desc, true)),
            Reg::QueueDriverLo => qf(|q| half(q.driver, false)),
            Reg::QueueDriverHi => qf(|q| half(q.driver, true)),
            Reg::QueueDeviceLo => qf(|q| half(q.device, false)),
            Reg::QueueDeviceHi => qf(|q| half(q.device, true)),
            // Resets complete synchronously, so a reset is never seen in progress.
            Reg::QueueReset => 0,
            Reg::AdminQueueIndex | Reg::AdminQueueNum => 0,
        }
    }

    /// Check an MSI-X vector write: NO_VECTOR, or a vector inside the table the device can
    /// map; anything else becomes NO_VECTOR.
    fn check_vector(&self, v: u16, hooks: &mut dyn CommonCfgHooks) -> u16 {
        if v == VIRTIO_MSI_NO_VECTOR || (v < self.msix_table_size && hooks.vector_ok(v)) {
            v
        } else {
            debug!(
                "common cfg: MSI-X vector {v} refused (table size {})",
                self.msix_table_size
            );
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_reg(&mut self, reg: Reg, val: u32, hooks: &mut dyn CommonCfgHooks) {
        // Widths were checked by the caller; truncation to the register width is exact.
        let v16 = val as u16;
        match reg {
            Reg::DeviceFeatureSelect => self.device_feature_select = val,
            Reg::DriverFeatureSelect => self.driver_feature_select = val,
            Reg::DriverFeature => {
                if self.status & status::FEATURES_OK != 0 {
                    debug!("common cfg: driver_feature write after FEATURES_OK ignored");
                    return;
                }
                match self.driver_feature_select {
                    0 => set_half(&mut self.driver_features, false, val),
                    1 => set_half(&mut self.driver_features, true, val),
                    _ => {}
                }
            }
            Reg::ConfigMsixVector => self.config_msix_vector = self.check_vector(v16, hooks),
            Reg::DeviceStatus => self.write_status(val as u8, hooks),
            Reg::QueueSelect => self.queue_select = v16,
            Reg::QueueMsixVector => {
                if self.selected().is_some() {
                    let v = self.check_vector(v16, hooks);
                    if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
                        q.msix_vector = v;
                    }
                }
            }
            Reg::QueueSize => {
                let packed = self.driver_features & VIRTIO_F_RING_PACKED != 0;
                if let Some(q) = self.disabled_queue_mut() {
                    // Split rings need a power of two; packed rings any size ≤ max.
                    let ok = v16 != 0 && v16 <= q.max_size && (packed || v16.is_power_of_two());
                    if ok {
                        q.size = v16;
                    } else {
                        debug!("common cfg: queue_size {v16} refused (max {})", q.max_size);
                    }
                }
            }
            Reg::QueueEnable => self.write_queue_enable(v16, hooks),
            Reg::QueueDescLo | Reg::QueueDescHi => {
                if let Some(q) = self.disabled_queue_mut() {
                    set_half(&mut q.desc, reg == Reg::QueueDescHi, val);
                }
            }
            Reg::QueueDriverLo | Reg::QueueDriverHi => {
                if let Some(q) = self.disabled_queue_mut() {
                    set_half(&mut q.driver, reg == Reg::QueueDriverHi, val);
                }
            }
            Reg::QueueDeviceLo | Reg::QueueDeviceHi => {
                if let Some(q) = self.disabled_queue_mut() {
                    set_half(&mut q.device, reg == Reg::QueueDeviceHi, val);
                }
            }
            Reg::QueueReset => {
                let index = self.queue_select;
                if v16 == 1
                    && self.driver_features & VIRTIO_F_RING_RESET != 0
                    && self.status & status::FEATURES_OK != 0
                    && self.selected().is_some()
                {
                    hooks.queue_reset(index);
                    if let Some(q) = self.queues.get_mut(usize::from(index)) {
                        q.reset();
                    }
                }
            }
            Reg::DeviceFeature
            | Reg::NumQueues
            | Reg::ConfigGeneration
            | Reg::QueueNotifyOff
            | Reg::QueueNotifyData
            | Reg::AdminQueueIndex
            | Reg::AdminQueueNum => debug!("common cfg: write to read-only {reg:?} ignored"),
        }
    }

    /// The selected queue if it exists and is disabled (its fields are writable).
    fn disabled_queue_mut(&mut self) -> Option<&mut QueueRegs> {
        let q = self.queues.get_mut(usize::from(self.queue_select))?;
        if q.enabled || q.max_size == 0 {
            debug!("common cfg: queue field write while enabled or unavailable ignored");
            return None;
        }
        Some(q)
    }

    fn write_queue_enable(&mut self, v: u16, hooks: &mut dyn CommonCfgHooks) {
        let index = self.queue_select;
        if v != 1 {
            // The driver must not write 0; a queue is disabled only by a (queue) reset.
            debug!("common cfg: queue_enable={v} ignored");
            return;
        }
        // No FEATURES_OK requirement: SeaBIOS before 2023 enables its queue before it
        // negotiates features. The queue still starts only at DRIVER_OK.
        match self.queues.get_mut(usize::from(index)) {
            Some(q) if !q.enabled && q.max_size != 0 && q.size != 0 => q.enabled = true,
            _ => return,
        }
        hooks.queue_enabled(self, index);
    }

    fn write_status(&mut self, val: u8, hooks: &mut dyn CommonCfgHooks) {
        if val == 0 {
            hooks.device_reset();
            self.reset();
            return;
        }
        let old = self.status;
        // Bits stay set until reset; DEVICE_NEEDS_RESET belongs to the device.
        let mut new = old | (val & !status::DEVICE_NEEDS_RESET);
        if old & !status::DEVICE_NEEDS_RESET & !val != 0 {
            debug!("common cfg: status write {val:#x} would clear bits of {old:#x}; kept");
        }
        let added = new & !old;
        if added & status::FEATURES_OK != 0 && !self.accept_features(hooks) {
            new &= !(status::FEATURES_OK | status::DRIVER_OK);
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            debug!("common cfg: DRIVER_OK without FEATURES_OK refused");
            new &= !status::DRIVER_OK;
        }
        self.status = new;
        if new & !old & status::DRIVER_OK != 0 {
            hooks.driver_ok(self);
        }
    }

    fn accept_features(&self, hooks: &mut dyn CommonCfgHooks) -> bool {
        let f = self.driver_features;
        if f & !self.device_features != 0 {
            debug!(
                "common cfg: FEATURES_OK refused: driver features {f:#x} not offered ({:#x})",
                self.device_features
            );
            return false;
        }
        if f & VIRTIO_F_VERSION_1 == 0 {
            debug!("common cfg: FEATURES_OK refused: VERSION_1 not negotiated");
            return false;
        }
        if !hooks.features_ok(f) {
            debug!("common cfg: FEATURES_OK refused by the device type ({f:#x})");
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        DriverOk,
        Enabled(u16),
        QueueReset(u16),
        DeviceReset,
    }

    #[derive(Default)]
    struct Hooks {
        events: Vec<Ev>,
        refuse_features: bool,
        refuse_vector: Option<u16>,
    }

    impl CommonCfgHooks for Hooks {
        fn features_ok(&mut self, _features: u64) -> bool {
            !self.refuse_features
        }
        fn vector_ok(&mut self, v: u16) -> bool {
            self.refuse_vector != Some(v)
        }
        fn driver_ok(&mut self, cfg: &CommonCfg) {
            assert!(cfg.driver_ok(), "hook runs after the bit is set");
            self.events.push(Ev::DriverOk);
        }
        fn queue_enabled(&mut self, cfg: &CommonCfg, index: u16) {
            assert!(cfg.queue(index).is_some_and(|q| q.enabled));
            self.events.push(Ev::Enabled(index));
        }
        fn queue_reset(&mut self, index: u16) {
            self.events.push(Ev::QueueReset(index));
        }
        fn device_reset(&mut self) {
            self.events.push(Ev::DeviceReset);
        }
    }

    const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_RESET | 0b110;

    fn cfg() -> CommonCfg {
        CommonCfg::new(OFFERED, &[256, 128, 0], 4)
    }

    fn r(c: &CommonCfg, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        c.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(c: &mut CommonCfg, h: &mut Hooks, off: u64, len: usize, v: u64) {
        c.write(off, &v.to_le_bytes()[..len], h);
    }

    /// Negotiate `features` and set FEATURES_OK; returns the status read back.
    fn negotiate(c: &mut CommonCfg, h: &mut Hooks, features: u64) -> u8 {
        w(c, h, offset::DEVICE_STATUS, 1, 0);
        w(c, h, offset::DEVICE_STATUS, 1, 3);
        w(c, h, offset::DRIVER_FEATURE_SELECT, 4, 0);
        w(c, h, offset::DRIVER_FEATURE, 4, features & 0xffff_ffff);
        w(c, h, offset::DRIVER_FEATURE_SELECT, 4, 1);
        w(c, h, offset::DRIVER_FEATURE, 4, features >> 32);
        w(c, h, offset::DEVICE_STATUS, 1, 0xb);
        r(c, offset::DEVICE_STATUS, 1) as u8
    }

    #[test]
    fn register_table_is_contiguous() {
        let mut next = 0;
        for &(o, w, _) in &REGS {
            assert_eq!(o, next);
            assert_eq!(o % w, 0, "naturally aligned");
            next = o + w;
        }
        assert_eq!(next, COMMON_CFG_LEN);
    }

    #[test]
    fn device_feature_windows() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        assert_eq!(r(c, offset::DEVICE_FEATURE, 4), OFFERED & 0xffff_ffff);
        w(c, h, offset::DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(r(c, offset::DEVICE_FEATURE_SELECT, 4), 1);
        assert_eq!(r(c, offset::DEVICE_FEATURE, 4), OFFERED >> 32);
        w(c, h, offset::DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(r(c, offset::DEVICE_FEATURE, 4), 0);
        // Read-only: a write changes nothing.
        w(c, h, offset::DEVICE_FEATURE_SELECT, 4, 0);
        w(c, h, offset::DEVICE_FEATURE, 4, 0xdead);
        assert_eq!(r(c, offset::DEVICE_FEATURE, 4), OFFERED & 0xffff_ffff);
    }

    #[test]
    fn driver_feature_windows_and_freeze_after_features_ok() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        w(c, h, offset::DRIVER_FEATURE_SELECT, 4, 1);
        w(c, h, offset::DRIVER_FEATURE, 4, 1);
        w(c, h, offset::DRIVER_FEATURE_SELECT, 4, 0);
        w(c, h, offset::DRIVER_FEATURE, 4, 2);
        w(c, h, offset::DRIVER_FEATURE_SELECT, 4, 5);
        w(c, h, offset::DRIVER_FEATURE, 4, 0xffff_ffff);
        assert_eq!(r(c, offset::DRIVER_FEATURE, 4), 0);
        assert_eq!(c.driver_features(), VIRTIO_F_VERSION_1 | 2);
        w(c, h, offset::DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(r(c, offset::DRIVER_FEATURE, 4), 1);

        assert_eq!(negotiate(c, h, VIRTIO_F_VERSION_1 | 4), 0xb);
        w(c, h, offset::DRIVER_FEATURE_SELECT, 4, 0);
        w(c, h, offset::DRIVER_FEATURE, 4, 2);
        assert_eq!(c.driver_features(), VIRTIO_F_VERSION_1 | 4);
    }

    #[test]
    fn features_ok_refusals() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        // Not offered.
        assert_eq!(negotiate(c, h, VIRTIO_F_VERSION_1 | 1), 3);
        // Missing VERSION_1.
        assert_eq!(negotiate(c, h, 2), 3);
        // Device-type check.
        h.refuse_features = true;
        assert_eq!(negotiate(c, h, VIRTIO_F_VERSION_1), 3);
        h.refuse_features = false;
        assert_eq!(negotiate(c, h, VIRTIO_F_VERSION_1 | 2), 0xb);
    }

    #[test]
    fn driver_ok_needs_features_ok_and_bits_are_sticky() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        w(c, h, offset::DEVICE_STATUS, 1, 3);
        w(c, h, offset::DEVICE_STATUS, 1, 7);
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 3);
        assert!(h.events.is_empty());
        assert_eq!(negotiate(c, h, VIRTIO_F_VERSION_1), 0xb);
        w(c, h, offset::DEVICE_STATUS, 1, 0xf);
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 0xf);
        assert_eq!(h.events, vec![Ev::DeviceReset, Ev::DriverOk]);
        // Clearing bits (not a reset) is not honoured; FAILED is added.
        w(c, h, offset::DEVICE_STATUS, 1, 0x81);
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 0x8f);
        // The driver cannot set DEVICE_NEEDS_RESET; the device can.
        w(c, h, offset::DEVICE_STATUS, 1, 0xcf);
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 0x8f);
        assert!(c.set_needs_reset());
        assert!(!c.set_needs_reset(), "only the first error notifies");
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 0xcf);
        assert_eq!(h.events.iter().filter(|e| **e == Ev::DriverOk).count(), 1);
    }

    #[test]
    fn reset_stops_queues_before_registers_clear() {
        /// Records that the stop ran inside the write, before the registers were cleared.
        struct Check<'a> {
            cfg_status: &'a mut Option<u8>,
        }
        impl CommonCfgHooks for Check<'_> {
            fn features_ok(&mut self, _: u64) -> bool {
                true
            }
            fn driver_ok(&mut self, _: &CommonCfg) {}
            fn queue_enabled(&mut self, _: &CommonCfg, _: u16) {}
            fn queue_reset(&mut self, _: u16) {}
            fn device_reset(&mut self) {
                *self.cfg_status = Some(0xff);
            }
        }
        let c = &mut cfg();
        let h = &mut Hooks::default();
        negotiate(c, h, VIRTIO_F_VERSION_1);
        w(c, h, offset::QUEUE_MSIX_VECTOR, 2, 1);
        w(c, h, offset::CONFIG_MSIX_VECTOR, 2, 0);
        w(c, h, offset::QUEUE_SIZE, 2, 64);
        w(c, h, offset::QUEUE_ENABLE, 2, 1);
        w(c, h, offset::DEVICE_STATUS, 1, 0xf);
        c.bump_generation();
        let mut seen = None;
        c.write(
            offset::DEVICE_STATUS,
            &[0],
            &mut Check {
                cfg_status: &mut seen,
            },
        );
        assert_eq!(seen, Some(0xff), "device_reset hook ran");
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 0);
        assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 0);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 256);
        assert_eq!(r(c, offset::QUEUE_MSIX_VECTOR, 2), 0xffff);
        assert_eq!(r(c, offset::CONFIG_MSIX_VECTOR, 2), 0xffff);
        assert_eq!(c.driver_features(), 0);
        assert_eq!(
            r(c, offset::CONFIG_GENERATION, 1),
            1,
            "generation survives reset"
        );
    }

    #[test]
    fn queue_size_rules() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        assert_eq!(r(c, offset::NUM_QUEUES, 2), 3);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 256);
        w(c, h, offset::QUEUE_SIZE, 2, 128);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 128);
        for bad in [0, 100, 512, 0xffff] {
            w(c, h, offset::QUEUE_SIZE, 2, bad);
            assert_eq!(r(c, offset::QUEUE_SIZE, 2), 128, "size {bad} refused");
        }
        w(c, h, offset::QUEUE_SIZE, 2, 1);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 1);
        // Unavailable queue (max 0) and out-of-range select read 0 and ignore writes.
        for sel in [2, 3, 0xffff] {
            w(c, h, offset::QUEUE_SELECT, 2, sel);
            assert_eq!(r(c, offset::QUEUE_SELECT, 2), sel);
            w(c, h, offset::QUEUE_SIZE, 2, 64);
            assert_eq!(r(c, offset::QUEUE_SIZE, 2), 0);
            w(c, h, offset::QUEUE_DESC_LO, 4, 0x1000);
            assert_eq!(r(c, offset::QUEUE_DESC_LO, 4), 0);
            assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 0);
        }
    }

    #[test]
    fn packed_ring_allows_any_size() {
        let c = &mut CommonCfg::new(OFFERED | VIRTIO_F_RING_PACKED, &[256], 2);
        let h = &mut Hooks::default();
        negotiate(c, h, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
        w(c, h, offset::QUEUE_SIZE, 2, 100);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 100);
    }

    #[test]
    fn queue_addresses_as_halves_and_frozen_while_enabled() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        w(c, h, offset::QUEUE_SELECT, 2, 1);
        w(c, h, offset::QUEUE_DESC_LO, 4, 0x1000);
        w(c, h, offset::QUEUE_DESC_HI, 4, 0x2);
        // 8-byte access is split into lo/hi dwords.
        w(c, h, offset::QUEUE_DRIVER_LO, 8, 0x3_0000_2000);
        w(c, h, offset::QUEUE_DEVICE_HI, 4, 0x4);
        w(c, h, offset::QUEUE_DEVICE_LO, 4, 0x3000);
        assert_eq!(r(c, offset::QUEUE_DESC_LO, 8), 0x2_0000_1000);
        assert_eq!(r(c, offset::QUEUE_DRIVER_HI, 4), 3);
        assert_eq!(r(c, offset::QUEUE_DEVICE_LO, 4), 0x3000);
        let q = c.queue(1).cloned().unwrap_or_else(|| QueueRegs::new(0));
        assert_eq!(
            (q.desc, q.driver, q.device),
            (0x2_0000_1000, 0x3_0000_2000, 0x4_0000_3000)
        );

        // Enable before FEATURES_OK is accepted (older SeaBIOS does it in that order).
        w(c, h, offset::QUEUE_ENABLE, 2, 1);
        assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 1);
        assert_eq!(h.events.last(), Some(&Ev::Enabled(1)));
        negotiate(c, h, VIRTIO_F_VERSION_1);
        assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 0, "reset disabled it");
        h.events.clear();
        w(c, h, offset::QUEUE_SELECT, 2, 1);
        w(c, h, offset::QUEUE_DESC_LO, 4, 0x1000);
        w(c, h, offset::QUEUE_ENABLE, 2, 1);
        assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 1);
        assert_eq!(h.events.last(), Some(&Ev::Enabled(1)));
        w(c, h, offset::QUEUE_DESC_LO, 4, 0x5000);
        w(c, h, offset::QUEUE_SIZE, 2, 64);
        assert_eq!(r(c, offset::QUEUE_DESC_LO, 4), 0x1000);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 128);
        // Writing 0 does not disable; enabling twice does not re-run the hook.
        w(c, h, offset::QUEUE_ENABLE, 2, 0);
        w(c, h, offset::QUEUE_ENABLE, 2, 1);
        assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 1);
        assert_eq!(h.events.iter().filter(|e| **e == Ev::Enabled(1)).count(), 1);
    }

    #[test]
    fn msix_vector_read_back() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        w(c, h, offset::CONFIG_MSIX_VECTOR, 2, 3);
        assert_eq!(r(c, offset::CONFIG_MSIX_VECTOR, 2), 3);
        w(c, h, offset::CONFIG_MSIX_VECTOR, 2, 4);
        assert_eq!(r(c, offset::CONFIG_MSIX_VECTOR, 2), 0xffff);
        w(c, h, offset::QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(r(c, offset::QUEUE_MSIX_VECTOR, 2), 1);
        h.refuse_vector = Some(2);
        w(c, h, offset::QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(r(c, offset::QUEUE_MSIX_VECTOR, 2), 0xffff);
        w(c, h, offset::QUEUE_MSIX_VECTOR, 2, 0x800);
        assert_eq!(r(c, offset::QUEUE_MSIX_VECTOR, 2), 0xffff);
        // No MSI-X table: nothing maps.
        let c2 = &mut CommonCfg::new(OFFERED, &[8], 0);
        w(c2, h, offset::QUEUE_MSIX_VECTOR, 2, 0);
        assert_eq!(r(c2, offset::QUEUE_MSIX_VECTOR, 2), 0xffff);
    }

    #[test]
    fn queue_reset_needs_ring_reset_feature() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        negotiate(c, h, VIRTIO_F_VERSION_1);
        w(c, h, offset::QUEUE_SIZE, 2, 64);
        w(c, h, offset::QUEUE_ENABLE, 2, 1);
        w(c, h, offset::QUEUE_RESET, 2, 1);
        assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 1, "no RING_RESET: ignored");
        assert!(!h.events.contains(&Ev::QueueReset(0)));

        negotiate(c, h, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_RESET);
        w(c, h, offset::QUEUE_SIZE, 2, 64);
        w(c, h, offset::QUEUE_MSIX_VECTOR, 2, 2);
        w(c, h, offset::QUEUE_DESC_LO, 4, 0x1000);
        w(c, h, offset::QUEUE_ENABLE, 2, 1);
        w(c, h, offset::DEVICE_STATUS, 1, 0xf);
        w(c, h, offset::QUEUE_RESET, 2, 1);
        assert_eq!(h.events.last(), Some(&Ev::QueueReset(0)));
        assert_eq!(r(c, offset::QUEUE_RESET, 2), 0);
        assert_eq!(r(c, offset::QUEUE_ENABLE, 2), 0);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 256);
        assert_eq!(r(c, offset::QUEUE_DESC_LO, 4), 0);
        assert_eq!(r(c, offset::QUEUE_MSIX_VECTOR, 2), 0xffff);
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 0xf, "device keeps running");
        // Re-enable after reset.
        w(c, h, offset::QUEUE_ENABLE, 2, 1);
        assert_eq!(h.events.last(), Some(&Ev::Enabled(0)));
    }

    #[test]
    fn access_widths() {
        let c = &mut cfg();
        let h = &mut Hooks::default();
        w(c, h, offset::QUEUE_SELECT, 2, 1);
        // Byte reads of a 16-bit register compose.
        assert_eq!(r(c, offset::QUEUE_SIZE, 1), 128);
        assert_eq!(r(c, offset::QUEUE_SIZE + 1, 1), 0);
        // A dword read across two registers: queue_size | queue_msix_vector << 16.
        assert_eq!(r(c, offset::QUEUE_SIZE, 4), 0xffff_0080);
        // num_queues + status + generation as one dword at 0x10.
        assert_eq!(r(c, 0x10, 4), 0x0003_ffff);
        // Misaligned or odd widths read 0.
        assert_eq!(r(c, offset::QUEUE_SIZE + 1, 2), 0);
        assert_eq!(r(c, 0x01, 4), 0);
        let mut three = [0xaau8; 3];
        c.read(0x18, &mut three);
        assert_eq!(three, [0; 3]);
        // Beyond the registers.
        assert_eq!(r(c, 0x40, 4), 0);
        assert_eq!(r(c, 0xffc, 4), 0);
        assert_eq!(r(c, !3, 4), 0);
        // Writes must match the register width: a byte write into queue_size is ignored,
        // and so is a dword write covering queue_select + queue_size.
        w(c, h, offset::QUEUE_SIZE, 1, 64);
        assert_eq!(r(c, offset::QUEUE_SIZE, 2), 128);
        w(c, h, 0x14, 4, 0x0001_0003);
        assert_eq!(r(c, offset::DEVICE_STATUS, 1), 0);
        assert_eq!(r(c, offset::QUEUE_SELECT, 2), 1);
        w(c, h, u64::MAX - 7, 8, 1);
        // Read-only registers.
        w(c, h, offset::NUM_QUEUES, 2, 9);
        w(c, h, offset::CONFIG_GENERATION, 1, 9);
        w(c, h, offset::QUEUE_NOTIFY_OFF, 2, 9);
        assert_eq!(r(c, offset::NUM_QUEUES, 2), 3);
        assert_eq!(r(c, offset::CONFIG_GENERATION, 1), 0);
        assert_eq!(r(c, offset::QUEUE_NOTIFY_OFF, 2), 1);
        assert_eq!(r(c, offset::QUEUE_NOTIFY_DATA, 2), 1);
        assert_eq!(r(c, offset::ADMIN_QUEUE_NUM, 2), 0);
    }
}
