//! The test device driven through its registers: a DMA FILL and a CHECKSUM, each
//! completing with an MSI-X interrupt, and an interrupt raised on request.

use std::path::Path;
use std::time::Duration;

use emudev::testdev::regs;
use emudev_vfio_user::Client;
use vm_memory::{Bytes, VolatileMemory};

use super::pci::{self, Config};
use super::{pattern, rd32, wait_irq, wr32, DemoError, SharedRam, Step};

/// What the run found.
#[derive(Debug, Clone, Default)]
pub struct TestdevReport {
    pub fill_bytes: u32,
    pub checksum: u32,
    /// IRQ_COUNT at the end: interrupts the device raised.
    pub irq_count: u32,
}

const BAR: u32 = regs::REGS_BAR as u32;
const RAM: usize = 1 << 20;
const FILL_AT: u64 = 0x1000;
const FILL_LEN: u32 = 64 * 1024;
const FILL_PATTERN: u32 = 0xdeca_fbad;
const SUM_AT: u64 = 0x4_0000;
const SUM_LEN: u32 = 48 * 1024 + 7;
const WAIT: Duration = Duration::from_secs(5);

/// FNV-1a, 32 bits: computed here independently of the device.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn wr64(c: &mut Client, off: u64, v: u64) -> Result<(), DemoError> {
    wr32(c, BAR, off, v as u32)?;
    wr32(c, BAR, off + 4, (v >> 32) as u32)
}

fn dma(
    c: &mut Client,
    cmd: u32,
    irq: &emudev::pci::EventFd,
    what: &'static str,
) -> Result<(), DemoError> {
    wr32(c, BAR, regs::DMA_CMD, cmd)?;
    if !wait_irq(irq, WAIT)? {
        return Err(DemoError::Timeout(what));
    }
    match rd32(c, BAR, regs::DMA_STATUS)? {
        regs::DMA_STATUS_DONE => Ok(()),
        s => Err(DemoError::Device(format!(
            "{what}: DMA status {s} after the interrupt"
        ))),
    }
}

/// Connect to a test device at `path` and exercise its DMA engine and interrupts.
pub fn run(path: &Path, verbose: bool) -> Result<TestdevReport, DemoError> {
    let mut c = Client::connect(path).step("connect")?;
    c.negotiate().step("negotiate")?;
    let id = rd32(&mut c, BAR, regs::ID)?;
    if id != regs::MAGIC {
        return Err(DemoError::Device(format!(
            "ID register {id:#x}, expected {:#x}",
            regs::MAGIC
        )));
    }
    let ram = SharedRam::new(RAM)?;
    ram.dma_map(&mut c)?;
    let cfg = Config::read(&mut c)?;
    pci::enable_bus_master(&mut c, &cfg)?;
    let irqs = pci::enable_msix(&mut c, &cfg, u32::from(regs::MSIX_VECTORS))?;
    let [_, done_irq, _, raise_irq] = irqs.as_slice() else {
        return Err(DemoError::Device("expected 4 MSI-X vectors".into()));
    };
    let m = ram.map.as_volatile_slice();

    // FILL: the device writes the pattern into our memory.
    wr64(&mut c, regs::DMA_DST, FILL_AT)?;
    wr32(&mut c, BAR, regs::DMA_LEN, FILL_LEN)?;
    wr32(&mut c, BAR, regs::DMA_PATTERN, FILL_PATTERN)?;
    wr32(&mut c, BAR, regs::DMA_REPEAT, 1)?;
    wr32(&mut c, BAR, regs::DMA_VECTOR, 1)?;
    dma(&mut c, regs::DMA_CMD_FILL, done_irq, "DMA FILL")?;
    let mut got = vec![0u8; FILL_LEN as usize + 8];
    m.read_slice(&mut got, FILL_AT as usize - 4)
        .map_err(|e| DemoError::Device(e.to_string()))?;
    let want = FILL_PATTERN.to_le_bytes();
    if got[..4] != [0; 4] || got[FILL_LEN as usize + 4..] != [0; 4] {
        return Err(DemoError::Mismatch(
            "DMA FILL wrote outside its buffer".into(),
        ));
    }
    if let Some(i) = got[4..FILL_LEN as usize + 4]
        .chunks(4)
        .position(|w| w != want)
    {
        return Err(DemoError::Mismatch(format!(
            "DMA FILL: word {i} is not the pattern"
        )));
    }
    if verbose {
        println!("testdev: DMA FILL of {FILL_LEN} bytes verified, MSI-X vector 1 fired");
    }

    // CHECKSUM: the device reads our data and hashes it.
    let mut data = vec![0u8; SUM_LEN as usize];
    pattern(0x7e57, 0, &mut data);
    m.get_slice(SUM_AT as usize, data.len())
        .step("checksum buffer")?
        .write_slice(&data, 0)
        .map_err(|e| DemoError::Device(e.to_string()))?;
    wr64(&mut c, regs::DMA_SRC, SUM_AT)?;
    wr32(&mut c, BAR, regs::DMA_LEN, SUM_LEN)?;
    dma(&mut c, regs::DMA_CMD_CHECKSUM, done_irq, "DMA CHECKSUM")?;
    let sum = rd32(&mut c, BAR, regs::DMA_RESULT)?;
    let want = fnv1a(&data);
    if sum != want {
        return Err(DemoError::Mismatch(format!(
            "DMA CHECKSUM: device {sum:#010x}, expected {want:#010x}"
        )));
    }
    if verbose {
        println!("testdev: DMA CHECKSUM of {SUM_LEN} bytes = {sum:#010x}, matches");
    }

    // An interrupt on request.
    wr32(&mut c, BAR, regs::IRQ_RAISE, 3)?;
    if !wait_irq(raise_irq, WAIT)? {
        return Err(DemoError::Timeout("MSI-X vector 3 after IRQ_RAISE"));
    }
    let irq_count = rd32(&mut c, BAR, regs::IRQ_COUNT)?;
    if verbose {
        println!("testdev: IRQ_RAISE fired MSI-X vector 3; {irq_count} interrupts raised in all");
    }
    c.dma_unmap_all().step("DMA_UNMAP")?;
    Ok(TestdevReport {
        fill_bytes: FILL_LEN,
        checksum: sum,
        irq_count,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(super::fnv1a(b""), 0x811c_9dc5);
        assert_eq!(super::fnv1a(b"a"), 0xe40c_292c);
        assert_eq!(super::fnv1a(b"foobar"), 0xbf9c_f968);
    }
}
