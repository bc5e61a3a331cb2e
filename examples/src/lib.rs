//! Shared helpers of the demo tools: a tiny stderr logger and the lspci-style decoder used by
//! `lsvfio`.

pub mod decode;
pub mod demo;
pub mod logger;
