//! Shared helpers for the protocol-level integration tests in `tests/tests/`: the QEMU
//! capture parser, a gpio-like test device, and a raw vfio-user peer with timeouts.

pub mod device;
pub mod fixtures;
pub mod harness;
pub mod raw;
