//! The test device driven through the in-process transport: the same adapter code the
//! vfio-user server uses, with memfd guest RAM and eventfd interrupts.

use std::time::{Duration, Instant};

use emudev::testdev::engine::checksum;
use emudev::testdev::{regs, TestDevice};
use emudev::transport::InProc;
use emudev::DeviceState;
use emudev_vfio_user::wire::{irq_index, irq_info_flags, region_flags, region_index};
use emudev_vfio_user::ServerDevice;
use vm_memory::VolatileMemory;

const BAR0: u32 = 0;
const WAIT: Duration = Duration::from_secs(5);

fn setup() -> InProc<TestDevice> {
    InProc::new(TestDevice::new("testdev0").unwrap(), 4).unwrap()
}

fn wait_status(d: &mut InProc<TestDevice>, want: u32) -> u32 {
    let t0 = Instant::now();
    loop {
        let s = d.read32(BAR0, regs::DMA_STATUS).unwrap();
        if s == want || t0.elapsed() > WAIT {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn program(d: &mut InProc<TestDevice>, cmd: u32, dst: u64, src: u64, len: u32, pattern: u32) {
    d.write64(BAR0, regs::DMA_DST, dst).unwrap();
    d.write64(BAR0, regs::DMA_SRC, src).unwrap();
    d.write32(BAR0, regs::DMA_LEN, len).unwrap();
    d.write32(BAR0, regs::DMA_PATTERN, pattern).unwrap();
    d.write32(BAR0, regs::DMA_CMD, cmd).unwrap();
}

#[test]
fn device_info_regions_and_irqs() {
    let mut d = setup();
    let a = d.adapter();
    let info = a.device_desc();
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    let bar0 = a.region(0).unwrap();
    assert_eq!(bar0.size, 4096);
    assert_eq!(bar0.flags, region_flags::READ | region_flags::WRITE);
    assert!(bar0.mmap.is_none());
    assert_eq!(a.region(1).unwrap().size, 0, "unused BAR");
    let bar2 = a.region(2).unwrap();
    let m = bar2.mmap.expect("doorbell page is mappable");
    assert_eq!(m.areas.len(), 1);
    assert_eq!((m.areas[0].offset, m.areas[0].size), (0, 4096));
    assert_eq!(a.region(region_index::ROM).unwrap().size, 0);
    assert_eq!(a.region(region_index::CONFIG).unwrap().size, 256);
    assert!(a.region(9).is_none());
    let msix = a.irq(irq_index::MSIX).unwrap();
    assert_eq!(msix.count, u32::from(regs::MSIX_VECTORS));
    assert_eq!(msix.flags & irq_info_flags::NORESIZE, 0);
    assert_ne!(msix.flags & irq_info_flags::MASKABLE, 0);
    assert_eq!(a.irq(irq_index::INTX).unwrap().count, 1);
    assert_eq!(a.irq(irq_index::MSI).unwrap().count, 0);
    assert_eq!(a.irq(irq_index::ERR).unwrap().count, 1);
    assert!(a.irq(5).is_none());
    assert_eq!(a.state(), DeviceState::Running);
}

#[test]
fn registers_and_config_space() {
    let mut d = setup();
    let mut id = [0u8; 4];
    d.config_read(0, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), regs::VENDOR_ID);
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), regs::DEVICE_ID);
    assert_eq!(d.read32(BAR0, regs::ID).unwrap(), regs::MAGIC);
    // Read-only magic ignores writes.
    d.write32(BAR0, regs::ID, 0).unwrap();
    assert_eq!(d.read32(BAR0, regs::ID).unwrap(), regs::MAGIC);
    d.write32(BAR0, regs::SCRATCH, 0x1234_5678).unwrap();
    assert_eq!(d.read32(BAR0, regs::SCRATCH).unwrap(), 0x1234_5678);
    // Sub-word reads assemble bytes from the register.
    let mut b = [0u8; 2];
    d.region_read(BAR0, regs::SCRATCH + 1, &mut b).unwrap();
    assert_eq!(b, [0x56, 0x34]);
    // Trapped doorbell.
    for i in 1..=3 {
        d.write32(BAR0, regs::DOORBELL, i).unwrap();
    }
    assert_eq!(d.read32(BAR0, regs::DOORBELL_COUNT).unwrap(), 3);
    assert_eq!(d.read32(BAR0, regs::DOORBELL_LAST).unwrap(), 3);
    // Out-of-range access is refused before the device sees it.
    assert!(d.read32(BAR0, 4094).is_err());
    // Reset clears the scratch register.
    d.reset().unwrap();
    assert_eq!(d.read32(BAR0, regs::SCRATCH).unwrap(), 0);
    assert_eq!(d.read32(BAR0, regs::DOORBELL_COUNT).unwrap(), 0);
}

#[test]
fn dma_fill_checksum_and_copy_through_memfd_ram() {
    let mut d = setup();
    let irqs = d.enable_msix(u32::from(regs::MSIX_VECTORS)).unwrap();
    d.write32(BAR0, regs::DMA_VECTOR, 1).unwrap();
    // Fill 10000 bytes (not a chunk multiple) at an unaligned address.
    program(&mut d, regs::DMA_CMD_FILL, 0x10003, 0, 10000, 0xa1b2_c3d4);
    assert_eq!(irqs[1].wait(WAIT), 1, "completion vector fired");
    assert_eq!(
        wait_status(&mut d, regs::DMA_STATUS_DONE),
        regs::DMA_STATUS_DONE
    );
    let mut got = vec![0u8; 10002];
    d.ram()
        .get_slice(0x10002, 10002)
        .unwrap()
        .copy_to(&mut got[..]);
    assert_eq!(got[0], 0, "byte before the range untouched");
    assert_eq!(got[10001], 0, "byte after the range untouched");
    let pat = 0xa1b2_c3d4u32.to_le_bytes();
    for (i, b) in got[1..10001].iter().enumerate() {
        assert_eq!(*b, pat[i % 4], "byte {i}");
    }
    // Checksum of bytes the test wrote.
    let data: Vec<u8> = (0..20000u32).map(|i| (i * 7 + 3) as u8).collect();
    d.mem().write(0x40000, &data).unwrap();
    program(&mut d, regs::DMA_CMD_CHECKSUM, 0, 0x40000, 20000, 0);
    assert_eq!(irqs[1].wait(WAIT), 1);
    assert_eq!(
        wait_status(&mut d, regs::DMA_STATUS_DONE),
        regs::DMA_STATUS_DONE
    );
    assert_eq!(d.read32(BAR0, regs::DMA_RESULT).unwrap(), checksum(&data));
    // Copy.
    program(&mut d, regs::DMA_CMD_COPY, 0x80000, 0x40000, 20000, 0);
    assert_eq!(irqs[1].wait(WAIT), 1);
    let mut back = vec![0u8; 20000];
    d.mem().read(0x80000, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(irqs[0].take(), 0, "other vectors quiet");
}

#[test]
fn dma_outside_guest_memory_reports_error() {
    let mut d = setup();
    let irqs = d.enable_msix(2).unwrap();
    d.write32(BAR0, regs::DMA_VECTOR, 0).unwrap();
    let end = d.ram_size();
    program(&mut d, regs::DMA_CMD_FILL, end - 100, 0, 4096, 1);
    assert_eq!(irqs[0].wait(WAIT), 1);
    assert_eq!(
        wait_status(&mut d, regs::DMA_STATUS_ERROR),
        regs::DMA_STATUS_ERROR
    );
    assert_eq!(d.read32(BAR0, regs::DMA_ERRORS).unwrap(), 1);
}

#[test]
fn msix_vector_fires_and_masked_vector_pends_until_unmask() {
    let mut d = setup();
    let irqs = d.enable_msix(u32::from(regs::MSIX_VECTORS)).unwrap();
    d.write32(BAR0, regs::IRQ_RAISE, 2).unwrap();
    assert_eq!(irqs[2].wait(WAIT), 1);
    // Mask vector 3: raising it sets its PBA bit and signals nothing.
    d.mask_vector(3, true).unwrap();
    d.write32(BAR0, regs::IRQ_RAISE, 3).unwrap();
    assert_eq!(irqs[3].wait(Duration::from_millis(50)), 0);
    let pba = d
        .read32(u32::from(regs::MSIX_BAR), u64::from(regs::MSIX_PBA_OFFSET))
        .unwrap();
    assert_eq!(pba, 1 << 3);
    // Unmask delivers the pending vector and clears the bit.
    d.mask_vector(3, false).unwrap();
    assert_eq!(irqs[3].wait(WAIT), 1);
    let pba = d
        .read32(u32::from(regs::MSIX_BAR), u64::from(regs::MSIX_PBA_OFFSET))
        .unwrap();
    assert_eq!(pba, 0);
    assert_eq!(d.read32(BAR0, regs::IRQ_COUNT).unwrap(), 2);
}

#[test]
fn intx_when_msix_is_off_with_automask_and_eoi() {
    let mut d = setup();
    let intx = d.enable_intx().unwrap();
    d.write32(BAR0, regs::IRQ_RAISE, 0).unwrap();
    assert_eq!(intx.wait(WAIT), 1);
    assert_eq!(
        d.read32(BAR0, regs::IRQ_STATUS).unwrap(),
        regs::IRQ_STATUS_INTX
    );
    // Config status shows the interrupt bit.
    assert_ne!(d.config_read16(0x06).unwrap() & (1 << 3), 0);
    // Automasked: a second raise does not signal until EOI (unmask) re-delivers.
    d.write32(BAR0, regs::IRQ_RAISE, 0).unwrap();
    assert_eq!(intx.wait(Duration::from_millis(30)), 0);
    d.unmask_intx().unwrap();
    assert_eq!(
        intx.wait(WAIT),
        1,
        "level still high: re-delivered on unmask"
    );
    // Driver clears the status: line low, unmask is quiet.
    d.write32(BAR0, regs::IRQ_STATUS, regs::IRQ_STATUS_INTX)
        .unwrap();
    d.unmask_intx().unwrap();
    assert_eq!(intx.wait(Duration::from_millis(30)), 0);
}

#[test]
fn polled_doorbell_page_counts_and_acknowledges() {
    let mut d = setup();
    let page = d.with_device(|dev| dev.doorbell_page().clone());
    for v in [5u32, 6, 7] {
        // The guest's store through the mmap.
        page.store(0, v);
        let t0 = Instant::now();
        while page.load(0) != 0 && t0.elapsed() < WAIT {
            std::thread::sleep(Duration::from_micros(100));
        }
        assert_eq!(page.load(0), 0, "acknowledged");
    }
    assert_eq!(d.read32(BAR0, regs::PAGE_COUNT).unwrap(), 3);
    assert_eq!(d.read32(BAR0, regs::PAGE_LAST).unwrap(), 7);
    // The same page through REGION_WRITE (a client that does not mmap).
    d.write32(u32::from(regs::PAGE_BAR), 0, 9).unwrap();
    let t0 = Instant::now();
    while d.read32(BAR0, regs::PAGE_COUNT).unwrap() != 4 && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_micros(100));
    }
    assert_eq!(d.read32(BAR0, regs::PAGE_LAST).unwrap(), 9);
    assert_eq!(d.read32(u32::from(regs::PAGE_BAR), 0).unwrap(), 0);
}

#[test]
fn ioeventfd_doorbell_counts() {
    let mut d = setup();
    let fds = d.adapter().region_io_fds(0).unwrap();
    assert_eq!(fds.len(), 1);
    assert_eq!((fds[0].offset, fds[0].size), (regs::DOORBELL, 4));
    nix::unistd::write(&*fds[0].fd, &1u64.to_ne_bytes()).unwrap();
    let t0 = Instant::now();
    while d.read32(BAR0, regs::DOORBELL_COUNT).unwrap() == 0 && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_micros(100));
    }
    assert_eq!(d.read32(BAR0, regs::DOORBELL_COUNT).unwrap(), 1);
}

#[test]
fn message_backed_memory_is_reached_from_the_worker() {
    let mut d = setup();
    let client = d.map_message(0x1000_0000, 0x10000).unwrap();
    let irqs = d.enable_msix(1).unwrap();
    d.write32(BAR0, regs::DMA_VECTOR, 0).unwrap();
    program(
        &mut d,
        regs::DMA_CMD_FILL,
        0x1000_0100,
        0,
        5000,
        0x5a5a_5a5a,
    );
    assert_eq!(irqs[0].wait(WAIT), 1);
    assert_eq!(
        wait_status(&mut d, regs::DMA_STATUS_DONE),
        regs::DMA_STATUS_DONE
    );
    let mut got = vec![0u8; 5000];
    client.get_slice(0x100, 5000).unwrap().copy_to(&mut got[..]);
    assert!(got.iter().all(|b| *b == 0x5a));
    // Copy from memfd RAM into message memory and back out.
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    d.mem().write(0x2000, &data).unwrap();
    program(&mut d, regs::DMA_CMD_COPY, 0x1000_8000, 0x2000, 3000, 0);
    assert_eq!(irqs[0].wait(WAIT), 1);
    let mut back = vec![0u8; 3000];
    client
        .get_slice(0x8000, 3000)
        .unwrap()
        .copy_to(&mut back[..]);
    assert_eq!(back, data);
}

/// Unmap while a DMA loop is writing the range: once `unmap` returns the device must never
/// touch the range again.
#[test]
fn unmap_during_dma_is_quiesced() {
    let mut d = setup();
    let extra = d.map_fd(0x100_0000, 0x10_0000).unwrap();
    d.write32(BAR0, regs::DMA_REPEAT, u32::MAX).unwrap();
    program(
        &mut d,
        regs::DMA_CMD_FILL,
        0x100_0000,
        0,
        0x10_0000,
        0x1111_1111,
    );
    // Wait for the loop to be running for real.
    let t0 = Instant::now();
    while d.read32(BAR0, regs::DMA_PASSES).unwrap() < 2 && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(d.read32(BAR0, regs::DMA_PASSES).unwrap() >= 2);
    d.unmap(0x100_0000, 0x10_0000).unwrap();
    // From now on nothing may write the old range: clear it and watch it.
    extra
        .get_slice(0, 0x10_0000)
        .unwrap()
        .copy_from(&vec![0u8; 0x10_0000][..]);
    std::thread::sleep(Duration::from_millis(100));
    let mut buf = vec![0u8; 0x10_0000];
    extra.get_slice(0, 0x10_0000).unwrap().copy_to(&mut buf[..]);
    assert!(
        buf.iter().all(|b| *b == 0),
        "device wrote the range after its unmap"
    );
    assert_eq!(
        wait_status(&mut d, regs::DMA_STATUS_ERROR),
        regs::DMA_STATUS_ERROR
    );
    assert_eq!(d.adapter().state(), DeviceState::Running);
}

/// Maps come and go while the DMA engine loops over memory that stays mapped: every swap
/// quiesces, no error, and the loop keeps going.
#[test]
fn memory_table_swapped_under_load() {
    let mut d = setup();
    d.write32(BAR0, regs::DMA_REPEAT, u32::MAX).unwrap();
    program(
        &mut d,
        regs::DMA_CMD_COPY,
        0x20_0000,
        0x10_0000,
        0x8_0000,
        0,
    );
    let mut passes = 0;
    for i in 0..40u64 {
        let gpa = 0x1000_0000 + i * 0x10_0000;
        let view = d.map_fd(gpa, 0x1_0000).unwrap();
        if i % 2 == 0 {
            d.map_message(gpa + 0x8_0000, 0x1000).unwrap();
            d.unmap(gpa + 0x8_0000, 0x1000).unwrap();
        }
        d.unmap(gpa, 0x1_0000).unwrap();
        view.get_slice(0, 16).unwrap().copy_from(&[0u8; 16][..]);
        let p = d.read32(BAR0, regs::DMA_PASSES).unwrap();
        assert!(p >= passes);
        passes = p;
    }
    std::thread::sleep(Duration::from_millis(20));
    assert!(d.read32(BAR0, regs::DMA_PASSES).unwrap() > 0);
    assert_eq!(
        d.read32(BAR0, regs::DMA_STATUS).unwrap(),
        regs::DMA_STATUS_BUSY
    );
    assert_eq!(d.read32(BAR0, regs::DMA_ERRORS).unwrap(), 0);
    d.write32(BAR0, regs::DMA_CMD, regs::DMA_CMD_STOP).unwrap();
    assert_eq!(
        d.read32(BAR0, regs::DMA_STATUS).unwrap(),
        regs::DMA_STATUS_IDLE
    );
    assert_eq!(d.adapter().state(), DeviceState::Running);
}

#[test]
fn page_without_mmap_is_still_served_by_region_access() {
    let dev = TestDevice::new("nommap").unwrap().with_mmap_page(false);
    let mut d = InProc::new(dev, 1).unwrap();
    assert!(d.adapter().region(2).unwrap().mmap.is_none());
    d.write32(u32::from(regs::PAGE_BAR), 0, 3).unwrap();
    let t0 = Instant::now();
    while d.read32(BAR0, regs::PAGE_COUNT).unwrap() != 1 && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_micros(100));
    }
    assert_eq!(d.read32(BAR0, regs::PAGE_LAST).unwrap(), 3);
}
