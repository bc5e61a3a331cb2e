//! emudev.
