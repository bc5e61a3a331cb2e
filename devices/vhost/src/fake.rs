//! A scripted vhost-user backend for unit tests: records every request (with its fds) and
//! answers the ones that need answers. One connection at a time; `hang_up` drops it and
//! the listener accepts the next.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use zerocopy::{FromBytes, IntoBytes};

use crate::protocol::{flags, proto, req, ConfigHead, VringState, F_PROTOCOL_FEATURES};

pub const FAKE_FEATURES: u64 = F_PROTOCOL_FEATURES | (1 << 32) | (1 << 29) | (1 << 9) | (1 << 34);
pub const FAKE_PROTOCOL: u64 = proto::MQ | proto::REPLY_ACK | proto::CONFIG;

#[derive(Debug)]
pub struct Msg {
    pub req: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

pub struct Fake {
    pub path: PathBuf,
    dir: PathBuf,
    pub rx: Receiver<Msg>,
    current: Arc<Mutex<Option<UnixStream>>>,
    /// Next GET_VRING_BASE answer.
    pub base: Arc<Mutex<u32>>,
}

fn recv_msg(s: &UnixStream) -> Option<Msg> {
    let mut head = [0u8; 12];
    let mut cbuf = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [std::io::IoSliceMut::new(&mut head)];
    let m =
        recvmsg::<UnixAddr>(s.as_raw_fd(), &mut iov, Some(&mut cbuf), MsgFlags::empty()).ok()?;
    if m.bytes != 12 {
        return None;
    }
    let mut fds = Vec::new();
    for c in m.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: the kernel just installed these fds for us; we own them now.
            fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let req = u32::from_le_bytes(head[0..4].try_into().ok()?);
    let fl = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let size = u32::from_le_bytes(head[8..12].try_into().ok()?) as usize;
    let mut payload = vec![0u8; size];
    std::io::Read::read_exact(&mut &*s, &mut payload).ok()?;
    Some(Msg {
        req,
        flags: fl,
        payload,
        fds,
    })
}

fn reply(s: &UnixStream, request: u32, payload: &[u8]) {
    let m = crate::protocol::encode(request, flags::REPLY, payload);
    let _ = std::io::Write::write_all(&mut &*s, &m);
}

fn serve(s: UnixStream, tx: &Sender<Msg>, base: &Mutex<u32>) {
    while let Some(m) = recv_msg(&s) {
        match m.req {
            req::GET_FEATURES => reply(&s, m.req, &FAKE_FEATURES.to_le_bytes()),
            req::GET_PROTOCOL_FEATURES => reply(&s, m.req, &FAKE_PROTOCOL.to_le_bytes()),
            req::GET_QUEUE_NUM => reply(&s, m.req, &4u64.to_le_bytes()),
            req::GET_VRING_BASE => {
                let (st, _) = VringState::read_from_prefix(&m.payload).unwrap_or_default();
                let num = *base.lock().unwrap();
                reply(
                    &s,
                    m.req,
                    VringState {
                        index: st.index,
                        num,
                    }
                    .as_bytes(),
                );
            }
            req::GET_CONFIG => {
                let (h, _) = ConfigHead::read_from_prefix(&m.payload).unwrap_or_default();
                let mut p = h.as_bytes().to_vec();
                p.extend((0..h.size).map(|i| (h.offset + i) as u8));
                reply(&s, m.req, &p);
            }
            _ if m.flags & flags::NEED_REPLY != 0 => reply(&s, m.req, &0u64.to_le_bytes()),
            _ => {}
        }
        if tx.send(m).is_err() {
            return;
        }
    }
}

impl Fake {
    pub fn start(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("emudev-vhost-fake-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("be.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = channel();
        let current = Arc::new(Mutex::new(None));
        let base = Arc::new(Mutex::new(0));
        let (cur, b) = (current.clone(), base.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                *cur.lock().unwrap() = s.try_clone().ok();
                serve(s, &tx, &b);
            }
        });
        Self {
            path,
            dir,
            rx,
            current,
            base,
        }
    }

    /// Drop the current connection as a crashing backend would.
    pub fn hang_up(&self) {
        if let Some(s) = self.current.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Requests received so far (waits briefly for stragglers).
    pub fn drain(&self) -> Vec<Msg> {
        let mut v = Vec::new();
        while let Ok(m) = self.rx.recv_timeout(Duration::from_millis(50)) {
            v.push(m);
        }
        v
    }

    /// Wait for the next request of kind `req`.
    pub fn wait_for(&self, request: u32) -> Msg {
        loop {
            let m = self
                .rx
                .recv_timeout(Duration::from_secs(10))
                .expect("fake backend: request never came");
            if m.req == request {
                return m;
            }
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.hang_up();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn reqs(v: &[Msg]) -> Vec<u32> {
    v.iter().map(|m| m.req).collect()
}
