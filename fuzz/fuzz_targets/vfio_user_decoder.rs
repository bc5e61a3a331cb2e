//! Differential fuzzing of the message decoder: a byte stream decoded in one piece and the
//! same stream pushed in fuzzer-chosen chunks must yield the same frames, and every frame
//! must respect the size limits. Small limits make the oversized-message path reachable.
//!
//! Input: byte 0 seeds the chunk sizes, the rest is the stream.

#![no_main]

use emudev_vfio_user::codec::{Decoder, Frame};
use emudev_vfio_user::wire::HEADER_SIZE;
use libfuzzer_sys::fuzz_target;

const MAX_MSG: usize = 512;

/// A comparable summary of a frame.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Msg {
        id: u16,
        cmd: u16,
        size: u32,
        payload: Vec<u8>,
    },
    Rejected {
        id: u16,
        cmd: u16,
        size: u32,
        error: String,
    },
}

fn drain(d: &mut Decoder, out: &mut Vec<Seen>) {
    while let Some(f) = d.next_frame() {
        out.push(match f {
            Frame::Message(m) => {
                let size = m.header.msg_size as usize;
                assert!(
                    (HEADER_SIZE..=MAX_MSG).contains(&size),
                    "accepted size {size}"
                );
                assert_eq!(m.payload.len(), size - HEADER_SIZE);
                Seen::Msg {
                    id: m.header.msg_id,
                    cmd: m.header.command,
                    size: m.header.msg_size,
                    payload: m.payload,
                }
            }
            Frame::Rejected { header, error } => Seen::Rejected {
                id: header.msg_id,
                cmd: header.command,
                size: header.msg_size,
                error: error.to_string(),
            },
        });
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let mut whole = Decoder::with_limits(MAX_MSG, 16);
    whole.push(stream, Vec::new(), false);
    let mut a = Vec::new();
    drain(&mut whole, &mut a);

    let mut chunked = Decoder::with_limits(MAX_MSG, 16);
    let mut b = Vec::new();
    let mut s = u32::from(seed) | 1;
    let mut off = 0;
    while off < stream.len() {
        s = s.wrapping_mul(1103515245).wrapping_add(12345);
        let n = ((s >> 16) as usize % 64) + 1;
        let end = (off + n).min(stream.len());
        chunked.push(&stream[off..end], Vec::new(), false);
        drain(&mut chunked, &mut b);
        off = end;
    }
    assert_eq!(a, b, "chunking changed the decoded frames");
    assert_eq!(whole.buffered(), chunked.buffered());
    assert!(whole.buffered() < MAX_MSG);
});
