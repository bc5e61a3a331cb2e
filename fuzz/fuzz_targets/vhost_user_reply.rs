//! The vhost-user frontend against a hostile backend: every byte a backend sends goes
//! through `emudev_vhost::protocol` (header and reply parsers) and `Frontend`'s receive
//! path. Neither may panic, and a refused reply must leave the connection broken (no
//! later request may be answered from a stream that is out of step).
//!
//! Input: byte 0 picks the mode. Even: the rest is one reply message, parsed for the
//! request and reply kind byte 1 selects. Odd: the rest is everything the backend sends on
//! a socket while the frontend negotiates and then issues a fixed series of requests.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use emudev_vhost::protocol::{parse_message, req, Expect};
use emudev_vhost::{ConnError, Frontend};
use libfuzzer_sys::fuzz_target;

fn one_reply(sel: u8, msg: &[u8]) {
    let (request, expect) = match sel % 4 {
        0 => (req::GET_FEATURES, Expect::U64),
        1 => (req::GET_VRING_BASE, Expect::State),
        2 => (
            req::GET_CONFIG,
            Expect::Config {
                offset: u32::from(sel >> 4),
                size: u32::from(sel >> 2) + 1,
            },
        ),
        _ => (req::SET_MEM_TABLE, Expect::U64),
    };
    if let Ok(r) = parse_message(msg, request, expect) {
        if let (emudev_vhost::protocol::Reply::Config(c), Expect::Config { size, .. }) =
            (&r, expect)
        {
            assert_eq!(c.len(), size as usize);
        }
    }
}

fn conversation(stream: &[u8]) {
    let Ok((ours, mut theirs)) = UnixStream::pair() else {
        return;
    };
    // Everything fits in the socket buffer (inputs are capped below).
    if theirs.write_all(stream).is_err() {
        return;
    }
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let Ok(mut f) = Frontend::from_stream(ours, Duration::from_millis(50)) else {
        return;
    };
    let mut failed = false;
    let mut check = |r: Result<(), ConnError>| {
        if let Err(e) = r {
            if e.is_fatal() {
                failed = true;
            }
        } else {
            assert!(!failed, "a request succeeded on a broken connection");
        }
    };
    check(f.get_config(0, 60).map(|_| ()));
    check(f.set_features(1 << 32));
    check(f.set_vring_num(0, 256));
    check(f.get_vring_base(0).map(|_| ()));
    check(f.get_config(8, 4).map(|_| ()));
    check(f.set_vring_enable(1, true));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() > 64 * 1024 {
        return;
    }
    if mode % 2 == 0 {
        if let Some((&sel, msg)) = rest.split_first() {
            one_reply(sel, msg);
        }
    } else {
        conversation(rest);
    }
});
