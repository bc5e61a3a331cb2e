//! Register map of the test device. All registers are 32 bits, little endian.
//!
//! BAR0 (4 KiB, registers):
//!
//! | offset | name           | access | meaning                                               |
//! |--------|----------------|--------|-------------------------------------------------------|
//! | 0x00   | ID             | RO     | [`MAGIC`]                                              |
//! | 0x04   | VERSION        | RO     | [`VERSION`]                                            |
//! | 0x08   | SCRATCH        | RW     | free for the driver                                   |
//! | 0x0c   | DOORBELL       | WO     | trapped doorbell: counts in DOORBELL_COUNT            |
//! | 0x10   | DOORBELL_COUNT | RO     | trapped doorbell writes + ioeventfd signals            |
//! | 0x14   | DOORBELL_LAST  | RO     | last value written to DOORBELL                        |
//! | 0x18   | IRQ_RAISE      | WO     | raise MSI-X vector N (INTx when MSI-X is off)         |
//! | 0x1c   | IRQ_STATUS     | RW1C   | bit 0: INTx asserted; writing 1 lowers the line       |
//! | 0x20   | DMA_DST        | RW     | 64-bit destination guest address (lo, hi at 0x24)     |
//! | 0x28   | DMA_SRC        | RW     | 64-bit source guest address (lo, hi at 0x2c)          |
//! | 0x30   | DMA_LEN        | RW     | bytes per pass                                        |
//! | 0x34   | DMA_PATTERN    | RW     | FILL pattern, little endian, repeated from DST        |
//! | 0x38   | DMA_REPEAT     | RW     | passes (0/1 once, 0xffffffff until DMA_CMD_STOP)      |
//! | 0x3c   | DMA_VECTOR     | RW     | vector raised at completion; 0xffffffff none          |
//! | 0x40   | DMA_CMD        | WO     | 1 FILL, 2 CHECKSUM (FNV-1a 32), 3 COPY, 0x80 STOP     |
//! | 0x44   | DMA_STATUS     | RO     | 0 idle, 1 busy, 2 done, 3 error                       |
//! | 0x48   | DMA_RESULT     | RO     | checksum of the last CHECKSUM pass                    |
//! | 0x4c   | DMA_PASSES     | RO     | passes completed by the current/last job             |
//! | 0x50   | DMA_ERRORS     | RO     | jobs that failed on a memory error                   |
//! | 0x54   | PAGE_COUNT     | RO     | doorbells seen on the polled page (BAR2)              |
//! | 0x58   | PAGE_LAST      | RO     | last non-zero value seen on the polled page          |
//! | 0x5c   | IRQ_COUNT      | RO     | interrupts raised                                     |
//!
//! BAR2 (4 KiB): the polled doorbell page, mmappable. Write a non-zero u32 at offset 0; the
//! device swaps it back to 0 when it has seen it.
//!
//! BAR4 (4 KiB): MSI-X table at 0 ([`MSIX_VECTORS`] vectors), PBA at [`MSIX_PBA_OFFSET`].

pub const MAGIC: u32 = 0xe0de_7e57;
pub const VERSION: u32 = 1;

pub const ID: u64 = 0x00;
pub const VERSION_REG: u64 = 0x04;
pub const SCRATCH: u64 = 0x08;
pub const DOORBELL: u64 = 0x0c;
pub const DOORBELL_COUNT: u64 = 0x10;
pub const DOORBELL_LAST: u64 = 0x14;
pub const IRQ_RAISE: u64 = 0x18;
pub const IRQ_STATUS: u64 = 0x1c;
pub const DMA_DST: u64 = 0x20;
pub const DMA_SRC: u64 = 0x28;
pub const DMA_LEN: u64 = 0x30;
pub const DMA_PATTERN: u64 = 0x34;
pub const DMA_REPEAT: u64 = 0x38;
pub const DMA_VECTOR: u64 = 0x3c;
pub const DMA_CMD: u64 = 0x40;
pub const DMA_STATUS: u64 = 0x44;
pub const DMA_RESULT: u64 = 0x48;
pub const DMA_PASSES: u64 = 0x4c;
pub const DMA_ERRORS: u64 = 0x50;
pub const PAGE_COUNT: u64 = 0x54;
pub const PAGE_LAST: u64 = 0x58;
pub const IRQ_COUNT: u64 = 0x5c;

pub const DMA_CMD_FILL: u32 = 1;
pub const DMA_CMD_CHECKSUM: u32 = 2;
pub const DMA_CMD_COPY: u32 = 3;
pub const DMA_CMD_STOP: u32 = 0x80;

pub const DMA_STATUS_IDLE: u32 = 0;
pub const DMA_STATUS_BUSY: u32 = 1;
pub const DMA_STATUS_DONE: u32 = 2;
pub const DMA_STATUS_ERROR: u32 = 3;

pub const IRQ_STATUS_INTX: u32 = 1;

/// BAR indexes.
pub const REGS_BAR: u8 = 0;
pub const PAGE_BAR: u8 = 2;
pub const MSIX_BAR: u8 = 4;
pub const BAR_SIZE: u64 = 4096;

pub const MSIX_VECTORS: u16 = 4;
pub const MSIX_TABLE_OFFSET: u32 = 0;
pub const MSIX_PBA_OFFSET: u32 = 0x800;

/// PCI identity: vendor 0xe0de, device 0xe0de (a vendor absent from the pci.ids database;
/// 0x1de5, used at first, is Eideticom's), class 0xff0000 ("unassigned class"), so no guest
/// driver binds by accident.
pub const VENDOR_ID: u16 = 0xe0de;
pub const DEVICE_ID: u16 = 0xe0de;
pub const CLASS_CODE: u32 = 0xff_0000;
