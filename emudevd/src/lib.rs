//! emudevd's building blocks as a library, so the fuzz targets (fuzz/) and tests can reach
//! the `--device` parser and the control-socket dispatcher without starting the daemon.
//! The `emudevd` binary (src/main.rs) is built on this.

pub mod config;
pub mod config_file;
pub mod control;
pub mod devices;
pub mod notify;
pub mod sockets;
