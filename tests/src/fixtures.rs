//! Parser for the strace captures of QEMU's vfio-user client in `shared/fixtures`.
//!
//! The captures are `strace -f -e trace=sendmsg,recvmsg -s 65536` of the QEMU process, so a
//! `sendmsg` is a client->server transfer and a `recvmsg` a server->client one. The bytes of
//! every call are concatenated per socket fd and per direction, then split into messages by
//! the header's `msg_size`; fds are attributed to the message holding the first byte of the
//! call that carried them (QEMU attaches them to a message's first `sendmsg`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use emudev_vfio_user::wire::{Header, HEADER_SIZE};
use zerocopy::FromBytes;

/// Which way a message travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    /// QEMU `sendmsg`: client to server.
    ToServer,
    /// QEMU `recvmsg`: server to client.
    ToClient,
}

/// One whole message as the capture shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedMsg {
    pub header: Header,
    /// The whole message, header included.
    pub bytes: Vec<u8>,
    /// How many fds rode with it.
    pub nfds: usize,
}

impl CapturedMsg {
    pub fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_SIZE..]
    }
}

/// Why a capture could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: {what}")]
    Syntax { line: usize, what: &'static str },
    #[error("line {line}: string truncated by strace (-s too small)")]
    Truncated { line: usize },
    #[error("fd {fd}: message at stream offset {offset} has size {size} < 16")]
    BadSize { fd: i32, offset: usize, size: u32 },
    #[error("fd {fd}: {left} trailing bytes do not form a whole message")]
    Trailing { fd: i32, left: usize },
}

/// A parsed capture: messages per (socket fd, direction), in stream order.
#[derive(Debug, Default)]
pub struct Capture {
    pub streams: BTreeMap<(i32, Direction), Vec<CapturedMsg>>,
}

impl Capture {
    /// The client->server messages of the only (or lowest-numbered) vfio-user socket.
    pub fn to_server(&self) -> &[CapturedMsg] {
        self.streams
            .iter()
            .find(|((_, d), _)| *d == Direction::ToServer)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }

    /// The server->client messages of the same socket as [`Capture::to_server`].
    pub fn to_client(&self) -> &[CapturedMsg] {
        self.streams
            .iter()
            .find(|((_, d), _)| *d == Direction::ToClient)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }
}

/// `shared/fixtures`, found relative to this package; `None` when absent (tests skip then).
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures");
    dir.is_dir().then_some(dir)
}

/// Names of the two QEMU 11.1 captures.
pub const CAPTURES: [&str; 2] = [
    "qemu-11.1-gpio-shared.strace",
    "qemu-11.1-gpio-no-shared.strace",
];

/// Load and parse one capture from [`fixtures_dir`]. `Ok(None)` (with a message on stderr)
/// when the fixture is missing, so callers can skip.
pub fn load(name: &str) -> Result<Option<Capture>, String> {
    let Some(dir) = fixtures_dir() else {
        eprintln!("SKIP: fixtures directory ../../shared/fixtures not found");
        return Ok(None);
    };
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIP: fixture {} not readable: {e}", path.display());
            return Ok(None);
        }
    };
    parse_strace(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// One `sendmsg`/`recvmsg` call: its bytes (as many as the call returned) and fd count.
#[derive(Debug)]
struct Call {
    fd: i32,
    dir: Direction,
    bytes: Vec<u8>,
    nfds: usize,
}

/// Decode a C string literal as strace prints it, starting right after the opening quote.
/// Returns the bytes and the rest of the input after the closing quote.
fn c_string(s: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => return Some((out, &s[i + 1..])),
            b'\\' => {
                let c = *s.get(i + 1)?;
                i += 2;
                match c {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'v' => out.push(0x0b),
                    b'f' => out.push(0x0c),
                    b'a' => out.push(0x07),
                    b'b' => out.push(0x08),
                    b'"' | b'\\' | b'\'' | b'?' => out.push(c),
                    b'x' => {
                        let mut v: u32 = 0;
                        let mut n = 0;
                        while n < 2 && i < s.len() && s[i].is_ascii_hexdigit() {
                            v = v * 16 + (s[i] as char).to_digit(16)?;
                            i += 1;
                            n += 1;
                        }
                        if n == 0 {
                            return None;
                        }
                        out.push(v as u8);
                    }
                    b'0'..=b'7' => {
                        let mut v = u32::from(c - b'0');
                        let mut n = 1;
                        while n < 3 && i < s.len() && (b'0'..=b'7').contains(&s[i]) {
                            v = v * 8 + u32::from(s[i] - b'0');
                            i += 1;
                            n += 1;
                        }
                        out.push(u8::try_from(v).ok()?);
                    }
                    _ => return None,
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_int(s: &[u8]) -> Option<(i64, &[u8])> {
    let neg = s.first() == Some(&b'-');
    let digits = if neg { &s[1..] } else { s };
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let v: i64 = std::str::from_utf8(&digits[..n]).ok()?.parse().ok()?;
    Some((if neg { -v } else { v }, &digits[n..]))
}

/// Parse one strace line; `Ok(None)` for lines that are not a completed send/recv.
fn parse_line(line: &[u8], lineno: usize) -> Result<Option<Call>, ParseError> {
    let syntax = |what| ParseError::Syntax { line: lineno, what };
    let (dir, at) = if let Some(p) = find(line, b" sendmsg(") {
        (Direction::ToServer, p + b" sendmsg(".len())
    } else if let Some(p) = find(line, b" recvmsg(") {
        (Direction::ToClient, p + b" recvmsg(".len())
    } else {
        return Ok(None);
    };
    if find(line, b"<unfinished").is_some() || find(line, b"resumed>").is_some() {
        return Err(syntax("split (unfinished/resumed) calls are not supported"));
    }
    let (fd, rest) = parse_int(&line[at..]).ok_or(syntax("no fd"))?;
    let fd = i32::try_from(fd).map_err(|_| syntax("fd out of range"))?;
    // Return value: the text after the last ") = ".
    let ret_at = line
        .windows(4)
        .rposition(|w| w == b") = ")
        .ok_or(syntax("no return value"))?;
    let (ret, _) = parse_int(&line[ret_at + 4..]).ok_or(syntax("bad return value"))?;
    if ret <= 0 {
        return Ok(None);
    }
    let ret = usize::try_from(ret).map_err(|_| syntax("bad return value"))?;
    let mut bytes = Vec::new();
    let mut rest = rest;
    while let Some(p) = find(rest, b"iov_base=\"") {
        let (s, after) = c_string(&rest[p + b"iov_base=\"".len()..]).ok_or(syntax("bad string"))?;
        if after.starts_with(b"...") {
            return Err(ParseError::Truncated { line: lineno });
        }
        bytes.extend(s);
        rest = after;
    }
    // strace shows only the returned bytes of a recvmsg, and the whole iovec of a sendmsg.
    bytes.truncate(ret);
    if bytes.len() != ret {
        return Err(syntax("fewer bytes shown than the call returned"));
    }
    let mut nfds = 0;
    let mut ctl = rest;
    while let Some(p) = find(ctl, b"cmsg_data=[") {
        let body = &ctl[p + b"cmsg_data=[".len()..];
        let end = body
            .iter()
            .position(|&b| b == b']')
            .ok_or(syntax("bad cmsg_data"))?;
        let list = &body[..end];
        if !list.iter().all(|b| b.is_ascii_whitespace()) {
            nfds += list.split(|&b| b == b',').count();
        }
        ctl = &body[end..];
    }
    Ok(Some(Call {
        fd,
        dir,
        bytes,
        nfds,
    }))
}

/// The bytes of one call and its fd count.
type CallBytes = (Vec<u8>, usize);

/// Split one direction's byte stream into messages.
fn split(fd: i32, calls: &[CallBytes]) -> Result<Vec<CapturedMsg>, ParseError> {
    let mut stream = Vec::new();
    // (stream offset of the call's first byte, fd count)
    let mut fd_marks = Vec::new();
    for (bytes, nfds) in calls {
        if *nfds > 0 {
            fd_marks.push((stream.len(), *nfds));
        }
        stream.extend_from_slice(bytes);
    }
    let mut out = Vec::new();
    let mut off = 0;
    while off < stream.len() {
        let left = stream.len() - off;
        let Ok((header, _)) = Header::read_from_prefix(&stream[off..]) else {
            return Err(ParseError::Trailing { fd, left });
        };
        let size = header.msg_size as usize;
        if size < HEADER_SIZE {
            return Err(ParseError::BadSize {
                fd,
                offset: off,
                size: header.msg_size,
            });
        }
        if size > left {
            return Err(ParseError::Trailing { fd, left });
        }
        let nfds = fd_marks
            .iter()
            .filter(|(at, _)| (off..off + size).contains(at))
            .map(|(_, n)| n)
            .sum();
        out.push(CapturedMsg {
            header,
            bytes: stream[off..off + size].to_vec(),
            nfds,
        });
        off += size;
    }
    Ok(out)
}

/// Parse a whole capture.
pub fn parse_strace(text: &str) -> Result<Capture, ParseError> {
    let mut calls: BTreeMap<(i32, Direction), Vec<CallBytes>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(c) = parse_line(line.as_bytes(), i + 1)? {
            calls
                .entry((c.fd, c.dir))
                .or_default()
                .push((c.bytes, c.nfds));
        }
    }
    let mut cap = Capture::default();
    for ((fd, dir), v) in calls {
        cap.streams.insert((fd, dir), split(fd, &v)?);
    }
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_take_at_most_three_digits() {
        // "\2\0000" is 02, 00 (three digits), then the character '0'.
        let (b, rest) = c_string(br#"\2\0000\377\"x\\"tail"#).unwrap();
        assert_eq!(b, vec![2, 0, b'0', 0xff, b'"', b'x', b'\\']);
        assert_eq!(rest, b"tail");
    }

    #[test]
    fn sendmsg_with_fds_and_split_messages() {
        // One message split over two calls, fds on the first call; then a second message.
        let text = concat!(
            "1 0.1 sendmsg(11, {msg_iov=[{iov_base=\"\\1\\0\\2\\0\\24\\0\\0\\0\\0\\0\\0\\0\", iov_len=12}], ",
            "msg_control=[{cmsg_len=24, cmsg_level=SOL_SOCKET, cmsg_type=SCM_RIGHTS, cmsg_data=[9, 10]}]}, 0) = 12\n",
            "1 0.2 sendmsg(11, {msg_iov=[{iov_base=\"\\0\\0\\0\\0abcd\", iov_len=8}]}, 0) = 8\n",
            "2 0.3 recvmsg(11, {msg_namelen=0}, MSG_CMSG_CLOEXEC) = -1 EAGAIN (x)\n",
            "1 0.4 sendmsg(11, {msg_iov=[{iov_base=\"\\2\\0\\r\\0\\20\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\", iov_len=16}]}, 0) = 16\n",
        );
        let cap = parse_strace(text).unwrap();
        let msgs = cap.to_server();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].header.msg_id, 1);
        assert_eq!(msgs[0].header.msg_size, 20);
        assert_eq!(msgs[0].payload(), b"abcd");
        assert_eq!(msgs[0].nfds, 2);
        assert_eq!(msgs[1].header.command, 13);
        assert_eq!(msgs[1].nfds, 0);
        assert!(cap.to_client().is_empty());
    }

    #[test]
    fn missing_fixture_means_skip_not_failure() {
        assert!(matches!(load("no-such-capture.strace"), Ok(None)));
    }

    #[test]
    fn truncated_string_is_an_error() {
        let text = "1 0.1 sendmsg(11, {msg_iov=[{iov_base=\"\\1\\0\"..., iov_len=99}]}, 0) = 99\n";
        assert_eq!(
            parse_strace(text).unwrap_err(),
            ParseError::Truncated { line: 1 }
        );
    }

    #[test]
    fn trailing_partial_message_is_an_error() {
        let text = "1 0.1 sendmsg(3, {msg_iov=[{iov_base=\"\\1\\0\\2\\0\\40\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\\0\", iov_len=16}]}, 0) = 16\n";
        assert!(matches!(
            parse_strace(text),
            Err(ParseError::Trailing { fd: 3, left: 16 })
        ));
    }
}
