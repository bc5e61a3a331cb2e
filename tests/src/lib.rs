//! Shared helpers for the protocol-level integration tests in `tests/tests/`.

pub mod fixtures;
