//! A small PCI device for protocol tests, modelled on the gpio sample QEMU was captured with:
//! an I/O BAR2 of 256 bytes, a 256-byte config space, INTx plus ERR/REQ notifiers.
//!
//! Every call the server makes is recorded in a [`DeviceState`] shared with the test through
//! [`DeviceHandle`], so tests can check what the device saw (DMA table, IRQ fds, resets).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use emudev_vfio_user::wire::{device_flags, irq_index, irq_info_flags, region_flags, region_index};
use emudev_vfio_user::{
    DeviceDesc, DmaPort, DmaRegion, Errno, IrqAction, IrqData, IrqDesc, RegionDesc, RegionMmap,
    ServerDevice, SparseArea,
};

/// PCI IDs of the gpio sample (vendor 0x494f, device 0x0dc8).
pub const VENDOR_ID: u16 = 0x494f;
pub const DEVICE_ID: u16 = 0x0dc8;
/// Size of BAR2 (I/O) and of the config space.
pub const BAR2_SIZE: u64 = 256;
pub const CONFIG_SIZE: u64 = 256;
/// Size of the optional mmap-able BAR0.
pub const BAR0_SIZE: u64 = 0x2000;

/// A DMA region as the device saw it, without the mapping itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenDma {
    pub iova: u64,
    pub size: u64,
    pub prot: u32,
    /// The client passed an fd and the server mapped it.
    pub mapped: bool,
}

impl From<&DmaRegion> for SeenDma {
    fn from(r: &DmaRegion) -> Self {
        Self {
            iova: r.iova,
            size: r.size,
            prot: r.prot,
            mapped: r.mapping.is_some(),
        }
    }
}

/// What the device observed, for assertions.
#[derive(Debug, Default)]
pub struct DeviceState {
    pub config: Vec<u8>,
    pub bar0: Vec<u8>,
    pub bar2: Vec<u8>,
    /// The whole DMA table after the last map/unmap call.
    pub dma_table: Vec<SeenDma>,
    pub dma_maps: usize,
    pub dma_unmaps: usize,
    /// Removed pieces of the last unmap call.
    pub last_unmapped: Vec<SeenDma>,
    /// Eventfds per IRQ index and vector.
    pub irq_fds: Vec<Vec<Option<OwnedFd>>>,
    /// Every SET_IRQS the device got: (index, action, start, count).
    pub set_irqs: Vec<(u32, IrqAction, u32, u32)>,
    pub resets: usize,
    pub attaches: usize,
    pub detaches: usize,
    pub region_reads: usize,
    pub region_writes: usize,
    pub dma_port: Option<DmaPort>,
}

impl DeviceState {
    /// Raw fd of an IRQ vector's eventfd, if one is assigned.
    pub fn irq_fd(&self, index: u32, vector: u32) -> Option<RawFd> {
        self.irq_fds
            .get(index as usize)?
            .get(vector as usize)?
            .as_ref()
            .map(|f| f.as_raw_fd())
    }
}

/// Shared view of a [`TestDevice`]'s state.
#[derive(Clone, Debug)]
pub struct DeviceHandle(Arc<Mutex<DeviceState>>);

impl DeviceHandle {
    pub fn lock(&self) -> MutexGuard<'_, DeviceState> {
        // A test device panicking while holding the lock is a test failure anyway.
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// The gpio-like test device.
pub struct TestDevice {
    state: Arc<Mutex<DeviceState>>,
    /// Bits of each config byte a write may change.
    config_wmask: Vec<u8>,
    irq_counts: [u32; irq_index::COUNT as usize],
    bar0_mmap: Option<RegionMmap>,
}

fn initial_config() -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_SIZE as usize];
    c[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
    c[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
    c[0x08] = 0; // revision
    c[0x0b] = 0xff; // class: "unassigned"
    c[0x18] = 0x01; // BAR2: I/O space
    c[0x3d] = 0x01; // interrupt pin A
    c
}

impl TestDevice {
    /// The device and a handle to its state.
    pub fn new() -> (Self, DeviceHandle) {
        let mut wmask = vec![0u8; CONFIG_SIZE as usize];
        wmask[0x04] = 0x07; // command: I/O, memory, bus master
        wmask[0x05] = 0x04; // command: INTx disable
        wmask[0x19..0x1c].fill(0xff); // BAR2 address bits 8..31 (size 256)
        wmask[0x3c] = 0xff; // interrupt line
        let state = DeviceState {
            config: initial_config(),
            bar0: vec![0; BAR0_SIZE as usize],
            bar2: vec![0; BAR2_SIZE as usize],
            irq_fds: (0..irq_index::COUNT).map(|_| Vec::new()).collect(),
            ..DeviceState::default()
        };
        let dev = Self {
            state: Arc::new(Mutex::new(state)),
            config_wmask: wmask,
            irq_counts: [1, 1, 0, 1, 1],
            bar0_mmap: None,
        };
        for (i, &n) in dev.irq_counts.iter().enumerate() {
            dev.lock().irq_fds[i] = (0..n).map(|_| None).collect();
        }
        let h = DeviceHandle(dev.state.clone());
        (dev, h)
    }

    /// Also expose a BAR0 of [`BAR0_SIZE`] bytes backed by `fd`, mmap-able in the given
    /// sparse areas (empty: whole region), so region info carries a capability chain.
    pub fn with_mmap_bar0(mut self, fd: Arc<OwnedFd>, areas: Vec<SparseArea>) -> Self {
        self.bar0_mmap = Some(RegionMmap {
            fd,
            file_offset: 0,
            areas,
        });
        self
    }

    fn lock(&self) -> MutexGuard<'_, DeviceState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn region_len(&self, index: u32) -> u64 {
        match index {
            0 if self.bar0_mmap.is_some() => BAR0_SIZE,
            2 => BAR2_SIZE,
            region_index::CONFIG => CONFIG_SIZE,
            _ => 0,
        }
    }
}

fn slice_mut(buf: &mut [u8], offset: u64, len: usize) -> Result<&mut [u8], Errno> {
    let start = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
    let end = start.checked_add(len).ok_or(Errno::EINVAL)?;
    buf.get_mut(start..end).ok_or(Errno::EINVAL)
}

impl ServerDevice for TestDevice {
    fn device_desc(&self) -> DeviceDesc {
        DeviceDesc {
            flags: device_flags::PCI | device_flags::RESET,
            num_regions: region_index::COUNT,
            num_irqs: irq_index::COUNT,
        }
    }

    fn region(&self, index: u32) -> Option<RegionDesc> {
        if index >= region_index::COUNT {
            return None;
        }
        let size = self.region_len(index);
        let flags = if size > 0 {
            region_flags::READ | region_flags::WRITE
        } else {
            0
        };
        let mmap = if index == 0 {
            self.bar0_mmap.clone()
        } else {
            None
        };
        Some(RegionDesc { size, flags, mmap })
    }

    fn irq(&self, index: u32) -> Option<IrqDesc> {
        let count = *self.irq_counts.get(index as usize)?;
        let mut flags = irq_info_flags::EVENTFD;
        if index == irq_index::INTX {
            flags |= irq_info_flags::MASKABLE | irq_info_flags::AUTOMASKED;
        } else if count > 0 {
            flags |= irq_info_flags::NORESIZE;
        }
        Some(IrqDesc { flags, count })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let mut st = self.lock();
        st.region_reads += 1;
        let src = match index {
            0 => &mut st.bar0,
            2 => &mut st.bar2,
            region_index::CONFIG => &mut st.config,
            _ => return Err(Errno::EINVAL),
        };
        let n = data.len();
        data.copy_from_slice(slice_mut(src, offset, n)?);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let mut st = self.lock();
        st.region_writes += 1;
        match index {
            0 => slice_mut(&mut st.bar0, offset, data.len())?.copy_from_slice(data),
            2 => slice_mut(&mut st.bar2, offset, data.len())?.copy_from_slice(data),
            region_index::CONFIG => {
                let dst = slice_mut(&mut st.config, offset, data.len())?;
                let start = offset as usize; // in range: checked by slice_mut
                for (i, (d, s)) in dst.iter_mut().zip(data).enumerate() {
                    let m = self.config_wmask[start + i];
                    *d = (*d & !m) | (s & m);
                }
            }
            _ => return Err(Errno::EINVAL),
        }
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), Errno> {
        let mut st = self.lock();
        st.set_irqs.push((index, action, start, count));
        let vectors = st.irq_fds.get_mut(index as usize).ok_or(Errno::EINVAL)?;
        match (action, data) {
            (IrqAction::Trigger, IrqData::Eventfds(fds)) => {
                for (i, fd) in fds.into_iter().enumerate() {
                    let v = (start as usize).checked_add(i).ok_or(Errno::EINVAL)?;
                    *vectors.get_mut(v).ok_or(Errno::EINVAL)? = fd;
                }
            }
            (IrqAction::Trigger, IrqData::None) if count == 0 => {
                vectors.iter_mut().for_each(|v| *v = None);
            }
            _ => {}
        }
        Ok(())
    }

    fn dma_map(&mut self, table: &[DmaRegion], _added: &DmaRegion) -> Result<(), Errno> {
        let mut st = self.lock();
        st.dma_maps += 1;
        st.dma_table = table.iter().map(SeenDma::from).collect();
        Ok(())
    }

    fn dma_unmap(&mut self, table: &[DmaRegion], removed: &[DmaRegion]) -> Result<(), Errno> {
        let mut st = self.lock();
        st.dma_unmaps += 1;
        st.dma_table = table.iter().map(SeenDma::from).collect();
        st.last_unmapped = removed.iter().map(SeenDma::from).collect();
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        let mut st = self.lock();
        st.resets += 1;
        for v in st.irq_fds.iter_mut() {
            v.iter_mut().for_each(|f| *f = None);
        }
        Ok(())
    }

    fn attach(&mut self, dma: DmaPort) {
        let mut st = self.lock();
        st.attaches += 1;
        st.dma_port = Some(dma);
    }

    fn detach(&mut self) {
        let mut st = self.lock();
        st.detaches += 1;
        st.dma_port = None;
        for v in st.irq_fds.iter_mut() {
            v.iter_mut().for_each(|f| *f = None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_writes_respect_the_mask() {
        let (mut d, h) = TestDevice::new();
        d.region_write(region_index::CONFIG, 0x18, &[0xff; 4])
            .unwrap();
        d.region_write(region_index::CONFIG, 0x00, &[0; 4]).unwrap();
        let mut b = [0u8; 4];
        d.region_read(region_index::CONFIG, 0x18, &mut b).unwrap();
        // BAR2 sizing: 256-byte I/O BAR.
        assert_eq!(u32::from_le_bytes(b), 0xffff_ff01);
        assert_eq!(&h.lock().config[0..2], &VENDOR_ID.to_le_bytes());
    }

    #[test]
    fn out_of_range_access_is_einval() {
        let (mut d, _h) = TestDevice::new();
        let mut b = [0u8; 4];
        assert_eq!(d.region_read(2, BAR2_SIZE - 2, &mut b), Err(Errno::EINVAL));
        assert_eq!(d.region_read(2, u64::MAX, &mut b), Err(Errno::EINVAL));
    }
}
