//! The vfio-user server: a mio event loop serving one client at a time for one device.
//!
//! Every request is validated here before the device sees it (see [`ServerDevice`]).
//! Requests are handled strictly in order; NO_REPLY requests never get a reply, not even an
//! error. After a client disconnects, all its DMA maps are removed (the device is told),
//! `detach` is called, and the next client is accepted; device state is kept.
//!
//! Decisions:
//! - A command other than VERSION before VERSION, and a second VERSION, get an EINVAL error
//!   reply; the connection stays open (the client may retry VERSION).
//! - An unsolicited reply from the client is dropped (logged) unless it matches an
//!   outstanding server-initiated DMA_READ/DMA_WRITE.
//! - A second concurrent client is accepted and closed at once.
//!
//! Server-initiated DMA (`DmaPort`): a worker thread's request is queued to the loop (channel
//! plus mio `Waker`); the loop sends it and routes the reply back; the worker waits with a
//! timeout. The loop itself never waits for a DMA reply.
//!
//! **QEMU layout deviation.** QEMU 11.1 (`hw/vfio-user/pci.c`, `VFIOUserDMARW`) uses a u32
//! count with data at payload offset 12 (message byte 28), a 32-byte minimum message, a
//! header-only DMA_WRITE reply and a DMA_READ reply of `32 + count` bytes with data at
//! byte 28. The spec uses a u64 count with data at payload offset 16 and a DMA_WRITE reply
//! echoing address and count. [`DmaLayout`] picks what we send (automatic: QEMU layout when
//! the client's VERSION JSON has QEMU's fingerprint); replies are parsed tolerantly in both.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use zerocopy::{FromBytes, IntoBytes};

use crate::caps::{self, PeerCaps, ServerCaps};
use crate::codec::{self, Decoder, Frame, Message, OutQueue, Outgoing};
use crate::device::{Errno, IrqAction, IrqData, ServerDevice};
use crate::dma::{DmaError, DmaPort, DmaRegion, DmaTransport};
use crate::dma_table::DmaTable;
use crate::wire::{self, cmd, dma_flags, hdr_flags, irq_set_flags as isf};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const CONN: Token = Token(2);

/// Stop reading from the client while this many replies wait to be written.
const OUT_HIGH_WATER: usize = 1024;

/// Which DMA_READ/DMA_WRITE layout the server sends (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaLayout {
    /// `docs/interop/vfio-user.rst`: u64 count, data at payload offset 16.
    Spec,
    /// QEMU 11.1's `VFIOUserDMARW`: u32 count, data at payload offset 12.
    Qemu,
}

/// Server tunables.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// DMA maps a client may hold (advertised as `max_dma_maps`).
    pub max_dma_maps: u32,
    /// `None`: QEMU layout for clients that look like QEMU, spec layout otherwise.
    pub dma_layout: Option<DmaLayout>,
    /// Advertise `write_multiple` (REGION_WRITE_MULTI is always accepted). Off by default:
    /// in QEMU it also forces every send through its queue (doc §2.4).
    pub write_multiple: bool,
    /// How long a server-initiated DMA transfer waits for the client's reply.
    pub msg_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_dma_maps: caps::DEFAULT_MAX_DMA_MAPS,
            dma_layout: None,
            write_multiple: false,
            msg_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("listener setup: {0}")]
    Listener(io::Error),
    #[error("event loop: {0}")]
    Poll(io::Error),
}

/// Cloneable, thread-safe handle to stop a running server.
#[derive(Clone)]
pub struct ServerHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("stop", &self.stop)
            .finish()
    }
}

impl ServerHandle {
    /// Ask the loop to disconnect the client (if any) and return from `run`.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::error!("vfio-user: cannot wake server loop: {e}");
        }
    }
}

/// One server-initiated DMA chunk on its way to the loop.
struct DmaRequest {
    conn_gen: u64,
    write: bool,
    addr: u64,
    len: usize,
    data: Vec<u8>,
    reply: Sender<Result<Vec<u8>, DmaError>>,
}

struct PendingDma {
    write: bool,
    addr: u64,
    len: usize,
    deadline: Instant,
    reply: Sender<Result<Vec<u8>, DmaError>>,
}

/// The `DmaTransport` of one connection.
struct ConnTransport {
    gen: u64,
    tx: Sender<DmaRequest>,
    waker: Arc<Waker>,
    loop_thread: ThreadId,
    alive: AtomicBool,
    chunk: usize,
    timeout: Duration,
}

impl ConnTransport {
    fn one(&self, write: bool, addr: u64, len: usize, data: Vec<u8>) -> Result<Vec<u8>, DmaError> {
        if !self.alive.load(Ordering::Acquire) {
            return Err(DmaError::Disconnected);
        }
        let (rtx, rrx) = crossbeam_channel::bounded(1);
        let req = DmaRequest {
            conn_gen: self.gen,
            write,
            addr,
            len,
            data,
            reply: rtx,
        };
        self.tx.send(req).map_err(|_| DmaError::Disconnected)?;
        self.waker.wake().map_err(|_| DmaError::Disconnected)?;
        match rrx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(DmaError::Timeout {
                addr,
                len: len as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(DmaError::Disconnected),
        }
    }

    fn check_thread(&self) -> Result<(), DmaError> {
        if std::thread::current().id() == self.loop_thread {
            Err(DmaError::WouldDeadlock)
        } else {
            Ok(())
        }
    }
}

impl DmaTransport for ConnTransport {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.check_thread()?;
        let mut done = 0usize;
        for chunk in buf.chunks_mut(self.chunk) {
            let a = addr
                .checked_add(done as u64)
                .ok_or(DmaError::BadReply("address overflow"))?;
            let data = self.one(false, a, chunk.len(), Vec::new())?;
            if data.len() != chunk.len() {
                return Err(DmaError::BadReply("short DMA_READ reply"));
            }
            chunk.copy_from_slice(&data);
            done += chunk.len();
        }
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.check_thread()?;
        let mut done = 0usize;
        for chunk in data.chunks(self.chunk) {
            let a = addr
                .checked_add(done as u64)
                .ok_or(DmaError::BadReply("address overflow"))?;
            self.one(true, a, chunk.len(), chunk.to_vec())?;
            done += chunk.len();
        }
        Ok(())
    }
}

/// A reply to send, or nothing.
enum Reply {
    Ok(Vec<u8>, Vec<Arc<OwnedFd>>),
    Err(Errno),
}

fn ok(payload: Vec<u8>) -> Result<Reply, Errno> {
    Ok(Reply::Ok(payload, Vec::new()))
}

/// Per-client state.
struct Conn {
    stream: UnixStream,
    gen: u64,
    decoder: Decoder,
    out: OutQueue,
    writable_armed: bool,
    want_read: bool,
    peer: Option<PeerCaps>,
    layout: DmaLayout,
    table: DmaTable,
    pending: HashMap<u16, PendingDma>,
    next_dma_id: u16,
    transport: Option<Arc<ConnTransport>>,
}

/// A vfio-user server for one device.
pub struct Server<D: ServerDevice> {
    poll: Poll,
    listener: UnixListener,
    bound_path: PathGuard,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    dma_tx: Sender<DmaRequest>,
    dma_rx: Receiver<DmaRequest>,
    device: D,
    options: ServerOptions,
    conn: Option<Conn>,
    next_gen: u64,
}

impl<D: ServerDevice> Server<D> {
    /// Bind a listening socket at `path` (a stale socket file there is replaced).
    pub fn bind(
        path: impl AsRef<Path>,
        device: D,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = StdUnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        let mut s = Self::from_listener(l, device, options)?;
        s.bound_path = PathGuard(Some(path.to_path_buf()));
        Ok(s)
    }

    /// Serve on an already-listening socket (e.g. `--fd`).
    pub fn from_listener(
        listener: StdUnixListener,
        device: D,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        listener
            .set_nonblocking(true)
            .map_err(ServerError::Listener)?;
        let mut listener = UnixListener::from_std(listener);
        let poll = Poll::new().map_err(ServerError::Listener)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(ServerError::Listener)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ServerError::Listener)?);
        let (dma_tx, dma_rx) = crossbeam_channel::unbounded();
        Ok(Self {
            poll,
            listener,
            bound_path: PathGuard(None),
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            dma_tx,
            dma_rx,
            device,
            options,
            conn: None,
            next_gen: 1,
        })
    }

    /// Serve on a listening socket fd.
    pub fn from_fd(fd: OwnedFd, device: D, options: ServerOptions) -> Result<Self, ServerError> {
        Self::from_listener(StdUnixListener::from(fd), device, options)
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            waker: self.waker.clone(),
            stop: self.stop.clone(),
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The socket path, when the server bound it.
    pub fn path(&self) -> Option<&Path> {
        self.bound_path.0.as_deref()
    }

    /// Take the device back (the client, if any, is disconnected first).
    pub fn into_device(mut self) -> D {
        self.disconnect("server stopped");
        self.device
    }

    /// Run on a new thread. The thread returns the device when the server stops.
    pub fn spawn(mut self) -> (ServerHandle, JoinHandle<Result<D, ServerError>>)
    where
        D: 'static,
    {
        let handle = self.handle();
        // Failing to create a thread is an environment failure, not protocol input.
        #[allow(clippy::expect_used)]
        let join = std::thread::Builder::new()
            .name("vfio-user-server".into())
            .spawn(move || {
                self.run()?;
                Ok(self.into_device())
            })
            .expect("cannot spawn the vfio-user server thread");
        (handle, join)
    }

    /// Serve clients until [`ServerHandle::shutdown`].
    pub fn run(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(16);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                self.disconnect("server shutting down");
                return Ok(());
            }
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.disconnect("event loop failed");
                return Err(ServerError::Poll(e));
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    CONN if ev.is_readable() || ev.is_read_closed() || ev.is_error() => {
                        if let Some(c) = self.conn.as_mut() {
                            c.want_read = true;
                        }
                    }
                    _ => {}
                }
            }
            self.service();
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let c = self.conn.as_ref()?;
        let now = Instant::now();
        c.pending
            .values()
            .map(|p| p.deadline.saturating_duration_since(now))
            .min()
            .map(|d| d + Duration::from_millis(1))
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conn.is_some() {
                        log::warn!("vfio-user: refusing a second client while one is connected");
                        drop(stream);
                        continue;
                    }
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut stream, CONN, Interest::READABLE)
                    {
                        log::error!("vfio-user: cannot register client: {e}");
                        continue;
                    }
                    let gen = self.next_gen;
                    self.next_gen += 1;
                    log::info!("vfio-user: client connected");
                    self.conn = Some(Conn {
                        stream,
                        gen,
                        decoder: Decoder::new(),
                        out: OutQueue::default(),
                        writable_armed: false,
                        want_read: true,
                        peer: None,
                        layout: DmaLayout::Spec,
                        table: DmaTable::new(self.options.max_dma_maps as usize),
                        pending: HashMap::new(),
                        next_dma_id: 0,
                        transport: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vfio-user: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Read, dispatch, run DMA requests and flush until nothing more can be done now.
    fn service(&mut self) {
        self.run_dma_requests();
        let Some(c) = self.conn.as_mut() else { return };
        let mut closed = None;
        if c.want_read && c.out.len() < OUT_HIGH_WATER {
            loop {
                match c.decoder.read_from(c.stream.as_fd()) {
                    Ok(0) => {
                        closed = Some(if c.decoder.is_idle() {
                            "client disconnected"
                        } else {
                            "client disconnected mid-message"
                        });
                        c.want_read = false;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.want_read = false;
                        break;
                    }
                    Err(e) => {
                        log::warn!("vfio-user: read error: {e}");
                        closed = Some("read error");
                        break;
                    }
                }
                while let Some(frame) = c.decoder.next_frame() {
                    dispatch_frame(
                        c,
                        &mut self.device,
                        &self.options,
                        &self.dma_tx,
                        &self.waker,
                        frame,
                    );
                }
                if c.out.len() >= OUT_HIGH_WATER {
                    break;
                }
            }
            // Frames may complete on the final read before EOF.
            while let Some(frame) = c.decoder.next_frame() {
                dispatch_frame(
                    c,
                    &mut self.device,
                    &self.options,
                    &self.dma_tx,
                    &self.waker,
                    frame,
                );
            }
        }
        expire_pending(c);
        match c.out.flush(c.stream.as_fd()) {
            Ok(empty) => {
                if empty == c.writable_armed {
                    let interest = if empty {
                        Interest::READABLE
                    } else {
                        Interest::READABLE | Interest::WRITABLE
                    };
                    if let Err(e) = self
                        .poll
                        .registry()
                        .reregister(&mut c.stream, CONN, interest)
                    {
                        log::warn!("vfio-user: reregister failed: {e}");
                    }
                    c.writable_armed = !empty;
                }
                // Reading stopped at the high-water mark: resume once drained.
                if empty && c.want_read {
                    let _ = self.waker.wake();
                }
            }
            Err(e) => {
                if closed.is_none() {
                    log::warn!("vfio-user: write error: {e}");
                    closed = Some("write error");
                }
            }
        }
        if let Some(why) = closed {
            self.disconnect(why);
        }
    }

    fn run_dma_requests(&mut self) {
        while let Ok(req) = self.dma_rx.try_recv() {
            let Some(c) = self
                .conn
                .as_mut()
                .filter(|c| c.gen == req.conn_gen && c.peer.is_some())
            else {
                // Dropping `req.reply` reports Disconnected to the worker.
                continue;
            };
            let mut id = c.next_dma_id;
            while c.pending.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            c.next_dma_id = id.wrapping_add(1);
            let command = if req.write {
                cmd::DMA_WRITE
            } else {
                cmd::DMA_READ
            };
            let bytes = encode_dma_request(c.layout, id, command, req.addr, req.len, &req.data);
            log::debug!(
                "vfio-user: -> {} id={id} addr={:#x} len={:#x}",
                cmd::name(command),
                req.addr,
                req.len
            );
            c.out.push(Outgoing {
                bytes,
                fds: Vec::new(),
            });
            c.pending.insert(
                id,
                PendingDma {
                    write: req.write,
                    addr: req.addr,
                    len: req.len,
                    deadline: Instant::now() + self.options.msg_timeout,
                    reply: req.reply,
                },
            );
        }
    }

    fn disconnect(&mut self, why: &str) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        log::info!("vfio-user: {why}");
        let _ = self.poll.registry().deregister(&mut c.stream);
        if let Some(t) = &c.transport {
            t.alive.store(false, Ordering::Release);
        }
        c.pending.clear();
        let removed = c.table.clear();
        if !removed.is_empty() {
            if let Err(e) = self.device.dma_unmap(&[], &removed) {
                log::warn!("vfio-user: device failed to unmap DMA on disconnect: {e}");
            }
        }
        if c.peer.is_some() {
            self.device.detach();
        }
        // Drop queued DMA requests for this connection.
        while self.dma_rx.try_recv().is_ok() {}
    }
}

/// Removes the socket file the server bound when the server goes away.
struct PathGuard(Option<PathBuf>);

impl Drop for PathGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn expire_pending(c: &mut Conn) {
    let now = Instant::now();
    c.pending.retain(|id, p| {
        let keep = p.deadline > now;
        if !keep {
            log::warn!(
                "vfio-user: DMA request id={id} addr={:#x} timed out",
                p.addr
            );
        }
        keep
    });
}

fn encode_dma_request(
    layout: DmaLayout,
    id: u16,
    command: u16,
    addr: u64,
    len: usize,
    data: &[u8],
) -> Vec<u8> {
    match layout {
        DmaLayout::Spec => {
            let head = wire::DmaAccess {
                address: addr,
                count: len as u64,
            };
            codec::request(id, command, false, &[head.as_bytes(), data])
        }
        DmaLayout::Qemu => {
            let head = wire::DmaAccessQemu {
                address: addr,
                count: len as u32,
            };
            // QEMU's struct is 32 bytes with data at 28: pad after the data for DMA_WRITE
            // (QEMU wants size >= 32 + count), after the head for DMA_READ.
            codec::request(id, command, false, &[head.as_bytes(), data, &[0u8; 4]])
        }
    }
}

/// Parse the client's reply to one of our DMA requests.
fn parse_dma_reply(layout: DmaLayout, p: &PendingDma, msg: &Message) -> Result<Vec<u8>, DmaError> {
    let len = p.len as u64;
    if msg.header.is_error() {
        return Err(DmaError::Refused {
            addr: p.addr,
            len,
            errno: msg.header.error,
        });
    }
    if !msg.fds.is_empty() {
        return Err(DmaError::BadReply("reply carries fds"));
    }
    let pl = &msg.payload;
    let addr_ok = u64::read_from_prefix(pl).is_ok_and(|(a, _)| a == p.addr);
    if p.write {
        // QEMU replies header-only; the spec echoes address and count.
        return if pl.is_empty() || (pl.len() >= 12 && addr_ok) {
            Ok(Vec::new())
        } else {
            Err(DmaError::BadReply(
                "DMA_WRITE reply does not match the request",
            ))
        };
    }
    if !addr_ok {
        return Err(DmaError::BadReply("DMA_READ reply address mismatch"));
    }
    let count64 = pl.get(8..16).and_then(|b| u64::read_from_bytes(b).ok());
    let count32 = pl.get(8..12).and_then(|b| u32::read_from_bytes(b).ok());
    let spec_ok = pl.len() as u64 == 16 + len && count64 == Some(len);
    // QEMU's reply is 32 + count bytes with data at byte 28: its last 4 bytes are the
    // zeroed tail of its buffer, which tells it apart from a spec reply in most cases.
    let qemu_ok = count32.map(u64::from) == Some(len)
        && (pl.len() as u64 == 12 + len
            || (pl.len() as u64 == 16 + len && pl[pl.len() - 4..].iter().all(|&b| b == 0)));
    let order = match layout {
        DmaLayout::Spec => [(spec_ok, 16usize), (qemu_ok, 12)],
        DmaLayout::Qemu => [(qemu_ok, 12), (spec_ok, 16)],
    };
    for (okay, off) in order {
        if okay {
            return Ok(pl[off..off + p.len].to_vec());
        }
    }
    Err(DmaError::BadReply("DMA_READ reply size or count mismatch"))
}

fn errno_u32(e: Errno) -> u32 {
    e as i32 as u32
}

fn dispatch_frame<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    opts: &ServerOptions,
    dma_tx: &Sender<DmaRequest>,
    waker: &Arc<Waker>,
    frame: Frame,
) {
    let msg = match frame {
        Frame::Message(m) => m,
        Frame::Rejected { header, error } => {
            log::warn!(
                "vfio-user: rejected {} id={}: {error}",
                cmd::name(header.command),
                header.msg_id
            );
            if !header.no_reply() && !header.is_reply() {
                let errno = match error {
                    crate::codec::FrameError::TooLarge(_) => Errno::E2BIG,
                    _ => Errno::EINVAL,
                };
                c.out.push(Outgoing {
                    bytes: codec::error_reply(&header, errno_u32(errno)),
                    fds: vec![],
                });
            }
            return;
        }
    };
    let h = msg.header;
    log::debug!(
        "vfio-user: <- {} id={} size={} flags={:#x} fds={}",
        cmd::name(h.command),
        h.msg_id,
        h.msg_size,
        h.flags,
        msg.fds.len()
    );
    if h.is_reply() {
        let matched = c.pending.get(&h.msg_id).is_some_and(|p| {
            h.command
                == if p.write {
                    cmd::DMA_WRITE
                } else {
                    cmd::DMA_READ
                }
        });
        if matched {
            if let Some(p) = c.pending.remove(&h.msg_id) {
                let r = parse_dma_reply(c.layout, &p, &msg);
                if let Err(e) = &r {
                    log::warn!("vfio-user: DMA reply id={}: {e}", h.msg_id);
                }
                let _ = p.reply.send(r);
            }
        } else {
            log::warn!(
                "vfio-user: dropping unsolicited reply {} id={}",
                cmd::name(h.command),
                h.msg_id
            );
        }
        return;
    }
    let no_reply = h.no_reply();
    let result = if h.msg_type() != hdr_flags::TYPE_COMMAND {
        log::warn!("vfio-user: bad message type {:#x}", h.msg_type());
        Err(Errno::EINVAL)
    } else {
        handle_command(c, dev, opts, dma_tx, waker, msg)
    };
    let reply = match result {
        Ok(r) => r,
        Err(e) => Reply::Err(e),
    };
    match reply {
        Reply::Err(e) => {
            if no_reply {
                log::warn!(
                    "vfio-user: posted {} id={} failed: {e}",
                    cmd::name(h.command),
                    h.msg_id
                );
            } else {
                log::debug!(
                    "vfio-user: -> error {e} for {} id={}",
                    cmd::name(h.command),
                    h.msg_id
                );
                c.out.push(Outgoing {
                    bytes: codec::error_reply(&h, errno_u32(e)),
                    fds: vec![],
                });
            }
        }
        Reply::Ok(payload, fds) => {
            if !no_reply {
                c.out.push(Outgoing {
                    bytes: codec::reply(&h, &[&payload]),
                    fds,
                });
            }
        }
    }
}

fn read_struct<T: FromBytes>(payload: &[u8]) -> Result<T, Errno> {
    T::read_from_prefix(payload)
        .map(|(t, _)| t)
        .map_err(|_| Errno::EINVAL)
}

fn handle_command<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    opts: &ServerOptions,
    dma_tx: &Sender<DmaRequest>,
    waker: &Arc<Waker>,
    msg: Message,
) -> Result<Reply, Errno> {
    let command = msg.header.command;
    let takes_fds = matches!(command, cmd::DMA_MAP | cmd::DEVICE_SET_IRQS);
    if !takes_fds && !msg.fds.is_empty() {
        log::warn!(
            "vfio-user: {} carried {} unexpected fds",
            cmd::name(command),
            msg.fds.len()
        );
        return Err(Errno::EINVAL);
    }
    if command == cmd::VERSION {
        return version(c, dev, opts, dma_tx, waker, &msg.payload);
    }
    let Some(peer) = c.peer else {
        log::warn!("vfio-user: {} before VERSION", cmd::name(command));
        return Err(Errno::EINVAL);
    };
    let Message { payload, fds, .. } = msg;
    match command {
        cmd::DMA_MAP => dma_map(c, dev, &payload, fds),
        cmd::DMA_UNMAP => dma_unmap(c, dev, &payload),
        cmd::DEVICE_GET_INFO => get_info(dev, &payload),
        cmd::DEVICE_GET_REGION_INFO => region_info(dev, &payload),
        cmd::DEVICE_GET_REGION_IO_FDS => region_io_fds(dev, &peer, &payload),
        cmd::DEVICE_GET_IRQ_INFO => irq_info(dev, &payload),
        cmd::DEVICE_SET_IRQS => set_irqs(dev, &payload, fds),
        cmd::REGION_READ => region_read(dev, &payload),
        cmd::REGION_WRITE => region_write(dev, &payload),
        cmd::REGION_WRITE_MULTI => write_multi(dev, &payload),
        cmd::DEVICE_RESET => {
            if dev.device_desc().flags & wire::device_flags::RESET == 0 {
                return Err(Errno::EINVAL);
            }
            dev.reset()?;
            ok(Vec::new())
        }
        cmd::DIRTY_PAGES | cmd::DEVICE_FEATURE | cmd::MIG_DATA_READ | cmd::MIG_DATA_WRITE => {
            Err(Errno::ENOTSUP)
        }
        _ => {
            log::warn!("vfio-user: unknown or misdirected command {command}");
            Err(Errno::EINVAL)
        }
    }
}

fn version<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    opts: &ServerOptions,
    dma_tx: &Sender<DmaRequest>,
    waker: &Arc<Waker>,
    payload: &[u8],
) -> Result<Reply, Errno> {
    if c.peer.is_some() {
        log::warn!("vfio-user: second VERSION");
        return Err(Errno::EINVAL);
    }
    let peer = caps::parse_version(payload)?;
    if peer.major != wire::VERSION_MAJOR {
        log::warn!("vfio-user: client major version {} unsupported", peer.major);
        return Err(Errno::ENOTSUP);
    }
    let ours = ServerCaps {
        max_dma_maps: opts.max_dma_maps,
        write_multiple: opts.write_multiple,
        ..ServerCaps::default()
    };
    let reply = caps::format_reply(&peer, payload.len(), &ours);
    c.layout = opts.dma_layout.unwrap_or(if peer.looks_like_qemu {
        DmaLayout::Qemu
    } else {
        DmaLayout::Spec
    });
    let chunk = peer
        .max_data_xfer_size
        .min(wire::MAX_DATA_XFER_SIZE as u64)
        .max(1) as usize;
    let t = Arc::new(ConnTransport {
        gen: c.gen,
        tx: dma_tx.clone(),
        waker: waker.clone(),
        loop_thread: std::thread::current().id(),
        alive: AtomicBool::new(true),
        chunk,
        timeout: opts.msg_timeout,
    });
    c.transport = Some(t.clone());
    c.peer = Some(peer);
    log::info!(
        "vfio-user: negotiated v{}.{} (client max_msg_fds={} xfer={} dma layout {:?})",
        peer.major,
        peer.minor,
        peer.max_msg_fds,
        peer.max_data_xfer_size,
        c.layout
    );
    dev.attach(DmaPort::new(t));
    ok(reply)
}

fn dma_map<D: ServerDevice>(
    c: &mut Conn,
    dev: &mut D,
    payload: &[u8],
    mut fds: Vec<OwnedFd>,
) -> Result<Reply, Errno> {
    let req: wire::DmaMap = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::DmaMap>() {
        return Err(Errno::EINVAL);
    }
    if fds.len() > 1 {
        log::warn!("vfio-user: DMA_MAP with {} fds", fds.len());
        return Err(Errno::EINVAL);
    }
    let added = c.table.map(&req, fds.pop())?;
    if let Err(e) = dev.dma_map(c.table.regions(), &added) {
        log::warn!(
            "vfio-user: device refused DMA map {:#x}+{:#x}: {e}",
            added.iova,
            added.size
        );
        c.table.remove_at(added.iova);
        return Err(e);
    }
    ok(Vec::new())
}

fn dma_unmap<D: ServerDevice>(c: &mut Conn, dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::DmaUnmap = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::DmaUnmap>() {
        return Err(Errno::EINVAL);
    }
    let removed: Vec<DmaRegion> = match req.flags {
        0 => c.table.unmap(req.address, req.size)?,
        dma_flags::UNMAP_ALL => {
            if req.address != 0 || req.size != 0 {
                return Err(Errno::EINVAL);
            }
            c.table.clear()
        }
        dma_flags::UNMAP_GET_DIRTY_BITMAP => return Err(Errno::ENOTSUP),
        _ => return Err(Errno::EINVAL),
    };
    if removed.is_empty() {
        log::debug!(
            "vfio-user: DMA_UNMAP {:#x}+{:#x} matched nothing",
            req.address,
            req.size
        );
    } else if let Err(e) = dev.dma_unmap(c.table.regions(), &removed) {
        log::warn!("vfio-user: device failed DMA unmap: {e}");
        return Err(e);
    }
    ok(req.as_bytes().to_vec())
}

fn get_info<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::DeviceInfo = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::DeviceInfo>() {
        return Err(Errno::EINVAL);
    }
    let d = dev.device_desc();
    let info = wire::DeviceInfo {
        argsz: std::mem::size_of::<wire::DeviceInfo>() as u32,
        flags: d.flags,
        num_regions: d.num_regions,
        num_irqs: d.num_irqs,
    };
    ok(info.as_bytes().to_vec())
}

fn region_info<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::RegionInfo = read_struct(payload)?;
    let head = std::mem::size_of::<wire::RegionInfo>();
    if (req.argsz as usize) < head {
        return Err(Errno::EINVAL);
    }
    if req.index >= dev.device_desc().num_regions {
        return Err(Errno::EINVAL);
    }
    let desc = dev.region(req.index).ok_or(Errno::EINVAL)?;
    let mut flags = desc.flags & (wire::region_flags::READ | wire::region_flags::WRITE);
    let mut cap = Vec::new();
    let mut file_offset = 0;
    if let Some(m) = &desc.mmap {
        flags |= wire::region_flags::MMAP;
        file_offset = m.file_offset;
        let areas: Vec<_> = m
            .areas
            .iter()
            .filter(|a| a.offset.checked_add(a.size).is_some_and(|e| e <= desc.size))
            .collect();
        if !areas.is_empty() {
            flags |= wire::region_flags::CAPS;
            let ch = wire::CapHeader {
                id: wire::REGION_INFO_CAP_SPARSE_MMAP,
                version: 1,
                next: 0,
            };
            cap.extend_from_slice(ch.as_bytes());
            let sh = wire::SparseMmapHead {
                nr_areas: areas.len() as u32,
                reserved: 0,
            };
            cap.extend_from_slice(sh.as_bytes());
            for a in areas {
                cap.extend_from_slice(
                    wire::SparseMmapArea {
                        offset: a.offset,
                        size: a.size,
                    }
                    .as_bytes(),
                );
            }
        }
    }
    let needed = head + cap.len();
    let mut info = wire::RegionInfo {
        argsz: needed as u32,
        flags,
        index: req.index,
        cap_offset: 0,
        size: desc.size,
        offset: file_offset,
    };
    if (req.argsz as usize) < needed {
        // Too small for the caps: report the size needed, no caps, no fd; the client retries.
        // The CAPS flag is cleared too (as libvfio-user does): QEMU rejects CAPS with a
        // cap_offset of 0 ("failed to get region info: Invalid argument") before retrying.
        info.flags &= !wire::region_flags::CAPS;
        return ok(info.as_bytes().to_vec());
    }
    if !cap.is_empty() {
        info.cap_offset = head as u32;
    }
    let mut out = info.as_bytes().to_vec();
    out.extend_from_slice(&cap);
    let fds = desc.mmap.map(|m| vec![m.fd]).unwrap_or_default();
    Ok(Reply::Ok(out, fds))
}

fn region_io_fds<D: ServerDevice>(
    dev: &mut D,
    peer: &PeerCaps,
    payload: &[u8],
) -> Result<Reply, Errno> {
    let req: wire::RegionIoFds = read_struct(payload)?;
    let head = std::mem::size_of::<wire::RegionIoFds>();
    if (req.argsz as usize) < head || req.flags != 0 || req.count != 0 {
        return Err(Errno::EINVAL);
    }
    if req.index >= dev.device_desc().num_regions || dev.region(req.index).is_none() {
        return Err(Errno::EINVAL);
    }
    let list = dev.region_io_fds(req.index)?;
    let mut fds: Vec<Arc<OwnedFd>> = Vec::new();
    let mut subs = Vec::with_capacity(list.len());
    for e in &list {
        let idx = match fds.iter().position(|f| Arc::ptr_eq(f, &e.fd)) {
            Some(i) => i,
            None => {
                fds.push(e.fd.clone());
                fds.len() - 1
            }
        };
        subs.push(wire::IoFdSubRegion {
            offset: e.offset,
            size: e.size,
            fd_index: idx as u32,
            kind: wire::iofd::TYPE_IOEVENTFD,
            flags: if e.datamatch.is_some() {
                wire::iofd::FLAG_DATAMATCH
            } else {
                0
            },
            padding: 0,
            datamatch: e.datamatch.unwrap_or(0),
        });
    }
    if fds.len() > peer.max_msg_fds as usize || fds.len() > wire::MAX_MSG_FDS {
        return Err(Errno::E2BIG);
    }
    let needed = head + subs.len() * std::mem::size_of::<wire::IoFdSubRegion>();
    let reply_head = wire::RegionIoFds {
        argsz: needed as u32,
        flags: 0,
        index: req.index,
        count: subs.len() as u32,
    };
    let mut out = reply_head.as_bytes().to_vec();
    if (req.argsz as usize) < needed {
        return ok(out);
    }
    for s in &subs {
        out.extend_from_slice(s.as_bytes());
    }
    Ok(Reply::Ok(out, fds))
}

fn irq_info<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::IrqInfo = read_struct(payload)?;
    if (req.argsz as usize) < std::mem::size_of::<wire::IrqInfo>() {
        return Err(Errno::EINVAL);
    }
    if req.index >= dev.device_desc().num_irqs {
        return Err(Errno::EINVAL);
    }
    let d = dev.irq(req.index).ok_or(Errno::EINVAL)?;
    let info = wire::IrqInfo {
        argsz: std::mem::size_of::<wire::IrqInfo>() as u32,
        flags: d.flags,
        index: req.index,
        count: d.count,
    };
    ok(info.as_bytes().to_vec())
}

fn set_irqs<D: ServerDevice>(
    dev: &mut D,
    payload: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<Reply, Errno> {
    let head = std::mem::size_of::<wire::IrqSet>();
    let req: wire::IrqSet = read_struct(payload)?;
    if (req.argsz as usize) < head {
        return Err(Errno::EINVAL);
    }
    if req.flags & !(isf::DATA_TYPE_MASK | isf::ACTION_TYPE_MASK) != 0 {
        return Err(Errno::EINVAL);
    }
    let data_bits = req.flags & isf::DATA_TYPE_MASK;
    let action_bits = req.flags & isf::ACTION_TYPE_MASK;
    if data_bits.count_ones() != 1 || action_bits.count_ones() != 1 {
        return Err(Errno::EINVAL);
    }
    let action = match action_bits {
        isf::ACTION_MASK => IrqAction::Mask,
        isf::ACTION_UNMASK => IrqAction::Unmask,
        _ => IrqAction::Trigger,
    };
    if req.index >= dev.device_desc().num_irqs {
        return Err(Errno::EINVAL);
    }
    let irq = dev.irq(req.index).ok_or(Errno::EINVAL)?;
    if matches!(req.index, wire::irq_index::ERR | wire::irq_index::REQ)
        && (action != IrqAction::Trigger || req.count > 1)
    {
        return Err(Errno::EINVAL);
    }
    if data_bits != isf::DATA_EVENTFD && !fds.is_empty() {
        return Err(Errno::EINVAL);
    }
    if req.count == 0 {
        // Only "disable the whole index" is meaningful with count 0.
        if req.start != 0 || data_bits != isf::DATA_NONE || action != IrqAction::Trigger {
            return Err(Errno::EINVAL);
        }
        dev.set_irqs(req.index, action, 0, 0, IrqData::None)?;
        return ok(Vec::new());
    }
    let end = req.start.checked_add(req.count).ok_or(Errno::EINVAL)?;
    if end > irq.count {
        return Err(Errno::EINVAL);
    }
    let data = match data_bits {
        isf::DATA_NONE => IrqData::None,
        isf::DATA_BOOL => {
            let bools = &payload[head..];
            if bools.len() != req.count as usize {
                return Err(Errno::EINVAL);
            }
            IrqData::Bool(bools.iter().map(|&b| b != 0).collect())
        }
        _ => {
            if fds.is_empty() {
                IrqData::Eventfds((0..req.count).map(|_| None).collect())
            } else if fds.len() == req.count as usize {
                IrqData::Eventfds(fds.into_iter().map(Some).collect())
            } else {
                log::warn!(
                    "vfio-user: SET_IRQS count {} with {} fds",
                    req.count,
                    fds.len()
                );
                return Err(Errno::EINVAL);
            }
        }
    };
    dev.set_irqs(req.index, action, req.start, req.count, data)?;
    ok(Vec::new())
}

/// Check a region access; returns the region's flags.
fn check_access<D: ServerDevice>(
    dev: &D,
    region: u32,
    offset: u64,
    count: u64,
    write: bool,
) -> Result<(), Errno> {
    if count > wire::MAX_DATA_XFER_SIZE as u64 {
        return Err(Errno::EINVAL);
    }
    if region >= dev.device_desc().num_regions {
        return Err(Errno::EINVAL);
    }
    let desc = dev.region(region).ok_or(Errno::EINVAL)?;
    let need = if write {
        wire::region_flags::WRITE
    } else {
        wire::region_flags::READ
    };
    if desc.flags & need == 0 {
        return Err(Errno::EINVAL);
    }
    let end = offset.checked_add(count).ok_or(Errno::EINVAL)?;
    if end > desc.size {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn region_read<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::RegionAccess = read_struct(payload)?;
    if req.count == 0 {
        return ok(req.as_bytes().to_vec());
    }
    check_access(dev, req.region, req.offset, req.count as u64, false)?;
    let head = std::mem::size_of::<wire::RegionAccess>();
    let mut out = vec![0u8; head + req.count as usize];
    out[..head].copy_from_slice(req.as_bytes());
    dev.region_read(req.region, req.offset, &mut out[head..])?;
    ok(out)
}

fn region_write<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let req: wire::RegionAccess = read_struct(payload)?;
    let head = std::mem::size_of::<wire::RegionAccess>();
    let data = &payload[head..];
    if data.len() as u64 != req.count as u64 {
        return Err(Errno::EINVAL);
    }
    if req.count == 0 {
        return ok(req.as_bytes().to_vec());
    }
    check_access(dev, req.region, req.offset, req.count as u64, true)?;
    dev.region_write(req.region, req.offset, data)?;
    ok(req.as_bytes().to_vec())
}

fn write_multi<D: ServerDevice>(dev: &mut D, payload: &[u8]) -> Result<Reply, Errno> {
    let head: wire::WriteMultiHead = read_struct(payload)?;
    if head.wr_cnt == 0 || head.wr_cnt > wire::MAX_WRITE_MULTI {
        return Err(Errno::EINVAL);
    }
    let esz = std::mem::size_of::<wire::WriteMultiEntry>();
    let body = &payload[std::mem::size_of::<wire::WriteMultiHead>()..];
    if body.len() as u64 != head.wr_cnt * esz as u64 {
        return Err(Errno::EINVAL);
    }
    let mut entries = Vec::with_capacity(head.wr_cnt as usize);
    for chunk in body.chunks_exact(esz) {
        let e = wire::WriteMultiEntry::read_from_bytes(chunk).map_err(|_| Errno::EINVAL)?;
        if e.count == 0 || e.count as usize > e.data.len() {
            return Err(Errno::EINVAL);
        }
        check_access(dev, e.region, e.offset, e.count as u64, true)?;
        entries.push(e);
    }
    for e in &entries {
        dev.region_write(e.region, e.offset, &e.data[..e.count as usize])?;
    }
    ok(head.as_bytes().to_vec())
}

/// Lets a server drive a boxed device (`Server<Box<dyn ServerDevice>>`).
impl<T: ServerDevice + ?Sized> ServerDevice for Box<T> {
    fn device_desc(&self) -> crate::device::DeviceDesc {
        (**self).device_desc()
    }
    fn region(&self, index: u32) -> Option<crate::device::RegionDesc> {
        (**self).region(index)
    }
    fn irq(&self, index: u32) -> Option<crate::device::IrqDesc> {
        (**self).irq(index)
    }
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        (**self).region_read(index, offset, data)
    }
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        (**self).region_write(index, offset, data)
    }
    fn region_io_fds(&mut self, index: u32) -> Result<Vec<crate::device::IoEventFd>, Errno> {
        (**self).region_io_fds(index)
    }
    fn set_irqs(
        &mut self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), Errno> {
        (**self).set_irqs(index, action, start, count, data)
    }
    fn dma_map(&mut self, table: &[DmaRegion], added: &DmaRegion) -> Result<(), Errno> {
        (**self).dma_map(table, added)
    }
    fn dma_unmap(&mut self, table: &[DmaRegion], removed: &[DmaRegion]) -> Result<(), Errno> {
        (**self).dma_unmap(table, removed)
    }
    fn reset(&mut self) -> Result<(), Errno> {
        (**self).reset()
    }
    fn attach(&mut self, dma: DmaPort) {
        (**self).attach(dma)
    }
    fn detach(&mut self) {
        (**self).detach()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Client, ClientError, ClientMemory, SetIrqData};
    use crate::device::{DeviceDesc, IrqDesc, RegionDesc, RegionMmap, SparseArea};
    use crate::wire::{irq_index, region_flags as rf, Header};
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Shared {
        events: Vec<String>,
        dma: Option<DmaPort>,
        table_len: usize,
        loop_dma: Option<Result<(), DmaError>>,
    }

    struct TestDev {
        bar0: Vec<u8>,
        bar1_fd: Arc<OwnedFd>,
        s: Arc<Mutex<Shared>>,
    }

    impl TestDev {
        fn new() -> (Self, Arc<Mutex<Shared>>) {
            let fd = nix::sys::memfd::memfd_create(
                c"bar1",
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
            )
            .unwrap();
            nix::unistd::ftruncate(&fd, 0x2000).unwrap();
            let s = Arc::new(Mutex::new(Shared::default()));
            (
                Self {
                    bar0: vec![0; 0x100],
                    bar1_fd: Arc::new(fd),
                    s: s.clone(),
                },
                s,
            )
        }
        fn ev(&self, e: String) {
            self.s.lock().unwrap().events.push(e);
        }
    }

    impl ServerDevice for TestDev {
        fn device_desc(&self) -> DeviceDesc {
            DeviceDesc {
                flags: wire::device_flags::PCI | wire::device_flags::RESET,
                num_regions: 9,
                num_irqs: 5,
            }
        }
        fn region(&self, index: u32) -> Option<RegionDesc> {
            match index {
                0 => Some(RegionDesc {
                    size: 0x100,
                    flags: rf::READ | rf::WRITE,
                    mmap: None,
                }),
                1 => Some(RegionDesc {
                    size: 0x2000,
                    flags: rf::READ | rf::WRITE,
                    mmap: Some(RegionMmap {
                        fd: self.bar1_fd.clone(),
                        file_offset: 0,
                        areas: vec![SparseArea {
                            offset: 0x1000,
                            size: 0x1000,
                        }],
                    }),
                }),
                2 => Some(RegionDesc {
                    size: 0x10,
                    flags: rf::READ,
                    mmap: None,
                }),
                3..=8 => Some(RegionDesc::default()),
                _ => None,
            }
        }
        fn irq(&self, index: u32) -> Option<IrqDesc> {
            let count = match index {
                irq_index::INTX | irq_index::ERR | irq_index::REQ => 1,
                irq_index::MSI => 0,
                irq_index::MSIX => 8,
                _ => return None,
            };
            Some(IrqDesc {
                flags: wire::irq_info_flags::EVENTFD,
                count,
            })
        }
        fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
            if index == 0 {
                let o = offset as usize;
                data.copy_from_slice(&self.bar0[o..o + data.len()]);
            }
            Ok(())
        }
        fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
            if index == 0 && offset == 0xf0 {
                // Message DMA from the loop thread must refuse, not hang.
                let port = self.s.lock().unwrap().dma.clone();
                if let Some(p) = port {
                    let mut b = [0u8; 4];
                    self.s.lock().unwrap().loop_dma = Some(p.read(0, &mut b));
                }
            }
            if index == 0 && offset == 0x80 {
                return Err(Errno::EIO);
            }
            let o = offset as usize;
            self.bar0[o..o + data.len()].copy_from_slice(data);
            self.ev(format!("write {index} {offset:#x} {data:?}"));
            Ok(())
        }
        fn region_io_fds(&mut self, index: u32) -> Result<Vec<crate::device::IoEventFd>, Errno> {
            if index != 0 {
                return Err(Errno::ENOTSUP);
            }
            let fd = Arc::new(eventfd());
            Ok(vec![
                crate::device::IoEventFd {
                    offset: 0x40,
                    size: 4,
                    fd: fd.clone(),
                    datamatch: None,
                },
                crate::device::IoEventFd {
                    offset: 0x44,
                    size: 4,
                    fd,
                    datamatch: Some(7),
                },
            ])
        }
        fn set_irqs(
            &mut self,
            index: u32,
            action: IrqAction,
            start: u32,
            count: u32,
            data: IrqData,
        ) -> Result<(), Errno> {
            let d = match data {
                IrqData::None => "none".to_string(),
                IrqData::Bool(b) => format!("bool{b:?}"),
                IrqData::Eventfds(f) => {
                    format!("fds{:?}", f.iter().map(|x| x.is_some()).collect::<Vec<_>>())
                }
            };
            self.ev(format!("irqs {index} {action:?} {start} {count} {d}"));
            Ok(())
        }
        fn dma_map(&mut self, table: &[DmaRegion], added: &DmaRegion) -> Result<(), Errno> {
            self.s.lock().unwrap().table_len = table.len();
            self.ev(format!(
                "map {:#x} {:#x} {}",
                added.iova,
                added.size,
                added.mapping.is_some()
            ));
            Ok(())
        }
        fn dma_unmap(&mut self, table: &[DmaRegion], removed: &[DmaRegion]) -> Result<(), Errno> {
            self.s.lock().unwrap().table_len = table.len();
            self.ev(format!("unmap {}", removed.len()));
            Ok(())
        }
        fn reset(&mut self) -> Result<(), Errno> {
            self.ev("reset".into());
            Ok(())
        }
        fn attach(&mut self, dma: DmaPort) {
            self.s.lock().unwrap().dma = Some(dma);
            self.ev("attach".into());
        }
        fn detach(&mut self) {
            self.s.lock().unwrap().dma = None;
            self.ev("detach".into());
        }
    }

    struct Fixture {
        path: PathBuf,
        handle: ServerHandle,
        join: Option<JoinHandle<Result<TestDev, ServerError>>>,
        s: Arc<Mutex<Shared>>,
    }

    impl Fixture {
        fn new(opts: ServerOptions) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "evu-{}-{}.sock",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let (dev, s) = TestDev::new();
            let server = Server::bind(&path, dev, opts).unwrap();
            let (handle, join) = server.spawn();
            Self {
                path,
                handle,
                join: Some(join),
                s,
            }
        }
        fn client(&self) -> Client {
            let mut c = Client::connect(&self.path).unwrap();
            c.set_timeout(Some(Duration::from_secs(5))).unwrap();
            c
        }
        fn events(&self) -> Vec<String> {
            self.s.lock().unwrap().events.clone()
        }
        fn wait_event(&self, e: &str) {
            self.wait_events(e, 1)
        }
        fn wait_events(&self, e: &str, n: usize) {
            for _ in 0..500 {
                if self.events().iter().filter(|x| *x == e).count() >= n {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("event {e} never came: {:?}", self.events());
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.handle.shutdown();
            if let Some(j) = self.join.take() {
                let _ = j.join();
            }
            assert!(!self.path.exists(), "socket file left behind");
        }
    }

    fn server_err(r: Result<impl std::fmt::Debug, ClientError>) -> Errno {
        match r {
            Err(ClientError::Server(e)) => e,
            other => panic!("expected server error, got {other:?}"),
        }
    }

    fn memfd(size: u64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .unwrap();
        nix::unistd::ftruncate(&fd, size as i64).unwrap();
        fd
    }

    fn eventfd() -> OwnedFd {
        nix::sys::eventfd::EventFd::new().unwrap().into()
    }

    #[test]
    fn every_message_round_trip() {
        let f = Fixture::new(ServerOptions::default());
        let mut c = f.client();
        let qemu = crate::caps::tests::qemu_payload();
        let caps = c.negotiate_with(&qemu).unwrap();
        assert_eq!(caps.max_msg_fds, 16);
        f.wait_event("attach");

        let ram = memfd(0x10000);
        c.dma_map(0, 0x10000, 3, Some((ram.as_fd(), 0))).unwrap();
        c.dma_map(0x100000, 0x1000, 1, None).unwrap();
        assert_eq!(
            server_err(c.dma_map(0x8000, 0x1000, 3, None)),
            Errno::EEXIST
        );
        let echo = c.dma_unmap(0x100000, 0x1000).unwrap();
        assert_eq!(
            (echo.argsz, echo.address, echo.size),
            (24, 0x100000, 0x1000)
        );

        let info = c.get_info().unwrap();
        assert_eq!((info.num_regions, info.num_irqs, info.argsz), (9, 5, 16));

        let r0 = c.region_info(0).unwrap();
        assert_eq!(
            (r0.info.size, r0.info.flags, r0.info.cap_offset),
            (0x100, rf::READ | rf::WRITE, 0)
        );
        assert!(r0.fd.is_none());
        let r1 = c.region_info(1).unwrap();
        assert_eq!(r1.info.flags, rf::READ | rf::WRITE | rf::MMAP | rf::CAPS);
        assert_eq!(r1.info.cap_offset, 32);
        assert_eq!(
            r1.areas,
            vec![SparseArea {
                offset: 0x1000,
                size: 0x1000
            }]
        );
        assert!(r1.fd.is_some());
        // argsz too small: needed size, no caps, no fd.
        let req = wire::RegionInfo {
            argsz: 32,
            index: 1,
            ..Default::default()
        };
        let m = c
            .request(cmd::DEVICE_GET_REGION_INFO, req.as_bytes(), &[])
            .unwrap();
        assert_eq!(m.payload.len(), 32);
        assert!(m.fds.is_empty());
        assert_eq!(
            wire::RegionInfo::read_from_prefix(&m.payload)
                .unwrap()
                .0
                .argsz,
            32 + 8 + 8 + 16
        );
        assert_eq!(server_err(c.region_info(9)), Errno::EINVAL);

        assert_eq!(server_err(c.region_io_fds(1)), Errno::ENOTSUP);
        let (subs, fds) = c.region_io_fds(0).unwrap();
        assert_eq!(fds.len(), 1, "a shared eventfd is sent once");
        assert_eq!(subs.len(), 2);
        assert_eq!(
            (subs[0].offset, subs[0].fd_index, subs[0].flags),
            (0x40, 0, 0)
        );
        assert_eq!(
            (
                subs[1].offset,
                subs[1].fd_index,
                subs[1].flags,
                subs[1].datamatch
            ),
            (0x44, 0, 1, 7)
        );
        // Nonzero count/flags in the request are invalid.
        let bad = wire::RegionIoFds {
            argsz: 16,
            flags: 0,
            index: 0,
            count: 1,
        };
        assert_eq!(
            server_err(c.request(cmd::DEVICE_GET_REGION_IO_FDS, bad.as_bytes(), &[])),
            Errno::EINVAL
        );
        let ii = c.irq_info(irq_index::MSIX).unwrap();
        assert_eq!((ii.count, ii.index), (8, irq_index::MSIX));
        assert_eq!(server_err(c.irq_info(5)), Errno::EINVAL);

        // Eventfds in runs: 3 fds, 2 de-assigned, 1 fd.
        let e: Vec<OwnedFd> = (0..4).map(|_| eventfd()).collect();
        let v = [
            Some(e[0].as_fd()),
            Some(e[1].as_fd()),
            Some(e[2].as_fd()),
            None,
            None,
            Some(e[3].as_fd()),
        ];
        c.set_irqs(
            irq_index::MSIX,
            isf::ACTION_TRIGGER,
            0,
            6,
            SetIrqData::Eventfds(&v),
        )
        .unwrap();
        c.set_irqs(
            irq_index::MSIX,
            isf::ACTION_MASK,
            1,
            2,
            SetIrqData::Bool(&[true, false]),
        )
        .unwrap();
        c.set_irqs(irq_index::MSIX, isf::ACTION_TRIGGER, 0, 0, SetIrqData::None)
            .unwrap();

        c.region_write(0, 4, &[1, 2, 3, 4]).unwrap();
        assert_eq!(c.region_read(0, 2, 6).unwrap(), vec![0, 0, 1, 2, 3, 4]);
        assert_eq!(c.region_read(0, 0, 0).unwrap(), Vec::<u8>::new());
        c.region_write_posted(0, 8, &[9]).unwrap();
        assert_eq!(c.region_read(0, 8, 1).unwrap(), vec![9]);
        let n = c
            .write_multi(&[(0, 0x10, &[1, 1][..]), (0, 0x20, &[2; 8][..])], false)
            .unwrap();
        assert_eq!(n, 2);
        c.write_multi(&[(0, 0x30, &[3][..])], true).unwrap();
        assert_eq!(c.region_read(0, 0x30, 1).unwrap(), vec![3]);
        assert_eq!(c.region_read(0, 0x20, 8).unwrap(), vec![2; 8]);
        c.reset().unwrap();
        assert_eq!(
            server_err(c.device_feature(wire::feature_flags::PROBE | 1, &[])),
            Errno::ENOTSUP
        );
        let all = c.dma_unmap_all().unwrap();
        assert_eq!(all.flags, wire::dma_flags::UNMAP_ALL);

        let ev = f.events();
        let want = [
            "map 0x0 0x10000 true",
            "map 0x100000 0x1000 false",
            "unmap 1",
            "irqs 2 Trigger 0 3 fds[true, true, true]",
            "irqs 2 Trigger 3 2 fds[false, false]",
            "irqs 2 Trigger 5 1 fds[true]",
            "irqs 2 Mask 1 2 bool[true, false]",
            "irqs 2 Trigger 0 0 none",
            "reset",
        ];
        for w in want {
            assert!(ev.iter().any(|e| e == w), "missing {w} in {ev:?}");
        }
        assert_eq!(f.s.lock().unwrap().table_len, 0);
    }

    #[test]
    fn protocol_state_and_header_errors() {
        let f = Fixture::new(ServerOptions::default());
        let mut c = f.client();
        // Anything before VERSION: EINVAL, connection stays.
        assert_eq!(server_err(c.get_info()), Errno::EINVAL);
        // Bad major.
        assert_eq!(
            server_err(c.request(cmd::VERSION, &[1, 0, 0, 0], &[])),
            Errno::ENOTSUP
        );
        // fds on VERSION.
        let fd = memfd(16);
        assert_eq!(
            server_err(c.request(cmd::VERSION, &[0, 0, 0, 0], &[fd.as_fd()])),
            Errno::EINVAL
        );
        // Malformed JSON.
        assert_eq!(
            server_err(c.request(cmd::VERSION, b"\0\0\0\0{\0", &[])),
            Errno::EINVAL
        );
        c.negotiate().unwrap();
        assert_eq!(server_err(c.negotiate()), Errno::EINVAL);
        // Unknown and misdirected commands.
        assert_eq!(server_err(c.request(99, &[0; 8], &[])), Errno::EINVAL);
        assert_eq!(
            server_err(c.request(cmd::DMA_READ, &[0; 16], &[])),
            Errno::EINVAL
        );
        assert_eq!(
            server_err(c.request(cmd::MIG_DATA_READ, &[0; 8], &[])),
            Errno::ENOTSUP
        );
        // fds on a command that takes none.
        assert_eq!(
            server_err(c.request(
                cmd::DEVICE_GET_INFO,
                &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[fd.as_fd()]
            )),
            Errno::EINVAL
        );
        // Oversized message: error reply right away, body skipped, server keeps serving.
        let mut big = codec::request(77, cmd::REGION_WRITE, false, &[]);
        let size = (wire::MAX_MSG_SIZE + 100) as u32;
        big[4..8].copy_from_slice(&size.to_ne_bytes());
        c.send_raw(&big, &[]).unwrap();
        c.send_raw(&vec![0u8; size as usize - 16], &[]).unwrap();
        let m = c.recv_raw().unwrap();
        assert_eq!(
            (m.header.msg_id, m.header.flags, m.header.error),
            (77, 0x21, libc::E2BIG as u32)
        );
        assert_eq!(m.header.msg_size, 16);
        // msg_size < 16.
        let mut small = codec::request(78, cmd::DEVICE_GET_INFO, false, &[]);
        small[4..8].copy_from_slice(&4u32.to_ne_bytes());
        c.send_raw(&small, &[]).unwrap();
        let m = c.recv_raw().unwrap();
        assert_eq!((m.header.msg_id, m.header.flags), (78, 0x21));
        // Bad message type.
        let bad = codec::encode(79, cmd::DEVICE_RESET, 0x3, 0, &[]);
        c.send_raw(&bad, &[]).unwrap();
        assert_eq!(c.recv_raw().unwrap().header.error, libc::EINVAL as u32);
        // An unsolicited reply is dropped silently; the next request still works.
        let stray = codec::encode(80, cmd::DMA_READ, hdr_flags::TYPE_REPLY, 0, &[&[0; 16]]);
        c.send_raw(&stray, &[]).unwrap();
        // A failing posted write gets no reply at all; the read after it gets its own.
        c.region_write_posted(0, 0x80, &[1]).unwrap();
        c.region_write_posted(0, 0x1000, &[1]).unwrap();
        assert_eq!(c.region_read(0, 0, 1).unwrap(), vec![0]);
        assert_eq!(c.get_info().unwrap().num_regions, 9);
    }

    #[test]
    fn region_access_and_dma_validation() {
        let f = Fixture::new(ServerOptions {
            max_dma_maps: 2,
            ..ServerOptions::default()
        });
        let mut c = f.client();
        c.negotiate().unwrap();
        assert_eq!(server_err(c.region_read(9, 0, 4)), Errno::EINVAL);
        assert_eq!(server_err(c.region_read(0, 0xfe, 4)), Errno::EINVAL);
        assert_eq!(server_err(c.region_read(0, u64::MAX - 1, 4)), Errno::EINVAL);
        assert_eq!(
            server_err(c.region_read(0, 0, (wire::MAX_DATA_XFER_SIZE + 1) as u32)),
            Errno::EINVAL
        );
        assert_eq!(server_err(c.region_write(2, 0, &[1])), Errno::EINVAL); // read-only
        assert_eq!(server_err(c.region_read(3, 0, 1)), Errno::EINVAL); // no READ flag, size 0
                                                                       // Write payload length != count.
        let req = wire::RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
        };
        assert_eq!(
            server_err(c.request(cmd::REGION_WRITE, &[req.as_bytes(), &[1, 2]].concat(), &[])),
            Errno::EINVAL
        );
        // Short payloads.
        assert_eq!(
            server_err(c.request(cmd::REGION_READ, &[0; 8], &[])),
            Errno::EINVAL
        );
        assert_eq!(
            server_err(c.request(
                cmd::DEVICE_GET_INFO,
                &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[]
            )),
            Errno::EINVAL
        );
        // WRITE_MULTI: a bad entry rejects the whole batch before any write.
        assert_eq!(
            server_err(c.write_multi(&[(0, 0x40, &[7][..]), (0, 0x100, &[1][..])], false)),
            Errno::EINVAL
        );
        assert_eq!(c.region_read(0, 0x40, 1).unwrap(), vec![0]);
        assert_eq!(server_err(c.write_multi(&[], false)), Errno::EINVAL);

        // DMA_MAP / UNMAP.
        let ram = memfd(0x1000);
        let raw = ram.as_raw_fd();
        assert_eq!(
            server_err(c.dma_map(0, 0x2000, 3, Some((ram.as_fd(), 0)))),
            Errno::EINVAL
        );
        let _ = raw;
        assert_eq!(server_err(c.dma_map(0, 0, 3, None)), Errno::EINVAL);
        assert_eq!(server_err(c.dma_map(u64::MAX, 2, 3, None)), Errno::EINVAL);
        assert_eq!(server_err(c.dma_map(0, 0x1000, 0x10, None)), Errno::EINVAL);
        let two = [memfd(0x1000), memfd(0x1000)];
        let req = wire::DmaMap {
            argsz: 32,
            flags: 3,
            offset: 0,
            address: 0,
            size: 0x1000,
        };
        assert_eq!(
            server_err(c.request(
                cmd::DMA_MAP,
                req.as_bytes(),
                &[two[0].as_fd(), two[1].as_fd()]
            )),
            Errno::EINVAL
        );
        c.dma_map(0, 0x1000, 3, None).unwrap();
        c.dma_map(0x1000, 0x3000, 3, None).unwrap();
        assert_eq!(
            server_err(c.dma_map(0x10000, 0x1000, 3, None)),
            Errno::ENOSPC
        );
        // Partial unmap that would split past the limit.
        assert_eq!(server_err(c.dma_unmap(0x2000, 0x1000)), Errno::ENOSPC);
        // Trimming an edge is fine; unmapping nothing succeeds.
        c.dma_unmap(0x1000, 0x1000).unwrap();
        c.dma_unmap(0x50000, 0x1000).unwrap();
        // UNMAP_ALL with an address, unknown flags.
        let bad = wire::DmaUnmap {
            argsz: 24,
            flags: wire::dma_flags::UNMAP_ALL,
            address: 0x1000,
            size: 0,
        };
        assert_eq!(
            server_err(c.request(cmd::DMA_UNMAP, bad.as_bytes(), &[])),
            Errno::EINVAL
        );
        let bad = wire::DmaUnmap {
            argsz: 24,
            flags: 0x8,
            address: 0,
            size: 0x1000,
        };
        assert_eq!(
            server_err(c.request(cmd::DMA_UNMAP, bad.as_bytes(), &[])),
            Errno::EINVAL
        );
        assert_eq!(f.s.lock().unwrap().table_len, 2);
    }

    #[test]
    fn set_irqs_validation() {
        let f = Fixture::new(ServerOptions::default());
        let mut c = f.client();
        c.negotiate().unwrap();
        let e = eventfd();
        let send = |c: &mut Client,
                    flags: u32,
                    index: u32,
                    start: u32,
                    count: u32,
                    extra: &[u8],
                    fds: &[BorrowedFd<'_>]| {
            let req = wire::IrqSet {
                argsz: 20,
                flags,
                index,
                start,
                count,
            };
            c.request(cmd::DEVICE_SET_IRQS, &[req.as_bytes(), extra].concat(), fds)
        };
        let t = isf::ACTION_TRIGGER;
        let cases: Vec<(u32, u32, u32, u32, Vec<u8>, bool)> = vec![
            (isf::DATA_NONE | t, 5, 0, 1, vec![], false), // index >= num_irqs
            (isf::DATA_NONE | t, 2, u32::MAX, 2, vec![], false), // start+count overflow
            (isf::DATA_NONE | t, 2, 8, 1, vec![], false), // start beyond count
            (isf::DATA_NONE | isf::DATA_BOOL | t, 2, 0, 1, vec![], false), // two data types
            (
                isf::DATA_NONE | t | isf::ACTION_MASK,
                2,
                0,
                1,
                vec![],
                false,
            ), // two actions
            (isf::DATA_NONE | 0x100, 2, 0, 1, vec![], false), // unknown bit
            (isf::DATA_BOOL | t, 2, 0, 2, vec![1], false), // bool length
            (isf::DATA_NONE | t, 2, 0, 1, vec![], true),  // fd without EVENTFD
            (isf::DATA_EVENTFD | t, 2, 0, 2, vec![], true), // nr_fds != count
            (isf::DATA_NONE | t, 2, 1, 0, vec![], false), // count 0, start 1
            (isf::DATA_NONE | isf::ACTION_MASK, 2, 0, 0, vec![], false), // count 0, not trigger
            (isf::DATA_NONE | isf::ACTION_MASK, 3, 0, 1, vec![], false), // ERR non-trigger
            (isf::DATA_NONE | t, 4, 0, 2, vec![], false), // REQ count > 1
            (isf::DATA_NONE | t, 1, 0, 1, vec![], false), // MSI has 0 vectors
        ];
        for (i, (flags, index, start, count, extra, with_fd)) in cases.into_iter().enumerate() {
            let fds: Vec<BorrowedFd<'_>> = if with_fd { vec![e.as_fd()] } else { vec![] };
            assert_eq!(
                server_err(send(&mut c, flags, index, start, count, &extra, &fds)),
                Errno::EINVAL,
                "case {i}"
            );
        }
        // QEMU's shape: argsz 20 with one fd attached, and de-assign with no fds.
        send(
            &mut c,
            isf::DATA_EVENTFD | t,
            irq_index::INTX,
            0,
            1,
            &[],
            &[e.as_fd()],
        )
        .unwrap();
        send(
            &mut c,
            isf::DATA_EVENTFD | t,
            irq_index::MSIX,
            2,
            3,
            &[],
            &[],
        )
        .unwrap();
        send(
            &mut c,
            isf::DATA_EVENTFD | t,
            irq_index::ERR,
            0,
            1,
            &[],
            &[e.as_fd()],
        )
        .unwrap();
        let ev = f.events();
        assert!(
            ev.contains(&"irqs 0 Trigger 0 1 fds[true]".to_string()),
            "{ev:?}"
        );
        assert!(
            ev.contains(&"irqs 2 Trigger 2 3 fds[false, false, false]".to_string()),
            "{ev:?}"
        );
        assert_eq!(ev.iter().filter(|e| e.starts_with("irqs")).count(), 3);
    }

    struct Mem(Arc<Mutex<Vec<u8>>>);
    impl ClientMemory for Mem {
        fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
            let m = self.0.lock().unwrap();
            let a = addr as usize;
            buf.copy_from_slice(m.get(a..a + buf.len()).ok_or(Errno::EFAULT)?);
            Ok(())
        }
        fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), Errno> {
            let mut m = self.0.lock().unwrap();
            let a = addr as usize;
            m.get_mut(a..a + data.len())
                .ok_or(Errno::EFAULT)?
                .copy_from_slice(data);
            Ok(())
        }
    }

    fn message_dma(layout: DmaLayout, qemu_client: bool) {
        let f = Fixture::new(ServerOptions {
            msg_timeout: Duration::from_millis(500),
            ..ServerOptions::default()
        });
        let mut c = f.client();
        let mem = Arc::new(Mutex::new(
            (0..=255u8).cycle().take(0x1000).collect::<Vec<u8>>(),
        ));
        c.set_memory(Box::new(Mem(mem.clone())));
        c.set_dma_layout(layout);
        if qemu_client {
            c.negotiate_with(&crate::caps::tests::qemu_payload())
                .unwrap();
        } else {
            // Small transfer size forces chunking.
            c.negotiate_with(&crate::caps::format_client_request(8, 64, 100))
                .unwrap();
        }
        let port = f.s.lock().unwrap().dma.clone().unwrap();
        let worker = std::thread::spawn(move || {
            let mut buf = vec![0u8; 200];
            port.read(0x10, &mut buf)?;
            port.write(0x800, &buf)?;
            let mut small = [0u8; 4];
            let bad = port.read(0x2000, &mut small);
            Ok::<_, DmaError>((buf, bad))
        });
        // The client serves DMA while it waits for its own replies.
        let _ = c.get_info().unwrap();
        c.serve(Duration::from_millis(300)).unwrap();
        let (buf, bad) = worker.join().unwrap().unwrap();
        let expect: Vec<u8> = (0x10..0x10 + 200).map(|x| x as u8).collect();
        assert_eq!(buf, expect);
        assert_eq!(&mem.lock().unwrap()[0x800..0x800 + 200], &expect[..]);
        assert!(
            matches!(bad, Err(DmaError::Refused { errno, .. }) if errno == libc::EFAULT as u32),
            "{bad:?}"
        );
        if !qemu_client {
            assert!(c.dma_served() >= 8, "not chunked: {}", c.dma_served());
        }
        // From the loop thread: refused at once.
        c.region_write(0, 0xf0, &[0; 4]).unwrap();
        assert_eq!(
            f.s.lock().unwrap().loop_dma,
            Some(Err(DmaError::WouldDeadlock))
        );
        // A client that never answers: timeout, then Disconnected after it leaves.
        let port = f.s.lock().unwrap().dma.clone().unwrap();
        let mut b = [0u8; 4];
        assert!(matches!(
            port.read(0, &mut b),
            Err(DmaError::Timeout { .. })
        ));
        drop(c);
        f.wait_event("detach");
        assert_eq!(port.read(0, &mut b), Err(DmaError::Disconnected));
    }

    #[test]
    fn message_dma_spec_layout() {
        message_dma(DmaLayout::Spec, false);
    }

    #[test]
    fn message_dma_qemu_layout() {
        message_dma(DmaLayout::Qemu, true);
    }

    #[test]
    fn disconnect_cleans_up_and_next_client_is_served() {
        let f = Fixture::new(ServerOptions::default());
        let mut c = f.client();
        c.negotiate().unwrap();
        let ram = memfd(0x4000);
        c.dma_map(0, 0x4000, 3, Some((ram.as_fd(), 0))).unwrap();
        // A second client while the first is connected is closed.
        let mut c2 = f.client();
        assert!(matches!(
            c2.negotiate(),
            Err(ClientError::Closed) | Err(ClientError::Io(_))
        ));
        drop(c);
        f.wait_event("detach");
        let ev = f.events();
        let i_unmap = ev.iter().position(|e| e == "unmap 1").unwrap();
        let i_detach = ev.iter().position(|e| e == "detach").unwrap();
        assert!(i_unmap < i_detach);
        assert_eq!(f.s.lock().unwrap().table_len, 0);
        // Disconnect mid-message, then a fresh client works.
        let mut c3 = f.client();
        c3.negotiate().unwrap();
        c3.send_raw(
            &codec::request(1, cmd::REGION_WRITE, false, &[&[0u8; 16]])[..10],
            &[],
        )
        .unwrap();
        drop(c3);
        f.wait_events("detach", 2);
        let mut c4 = f.client();
        c4.negotiate().unwrap();
        assert_eq!(c4.get_info().unwrap().num_irqs, 5);
    }

    #[test]
    fn dma_reply_parsing_is_tolerant() {
        let p = PendingDma {
            write: false,
            addr: 0x1000,
            len: 4,
            deadline: Instant::now(),
            reply: crossbeam_channel::bounded(1).0,
        };
        let mk = |payload: Vec<u8>| Message {
            header: Header {
                msg_id: 1,
                command: cmd::DMA_READ,
                msg_size: 16 + payload.len() as u32,
                flags: 1,
                error: 0,
            },
            payload,
            fds: vec![],
        };
        let spec = [
            &0x1000u64.to_ne_bytes()[..],
            &4u64.to_ne_bytes(),
            &[1, 2, 3, 4],
        ]
        .concat();
        let qemu = [
            &0x1000u64.to_ne_bytes()[..],
            &4u32.to_ne_bytes(),
            &[1, 2, 3, 4],
            &[0; 4],
        ]
        .concat();
        let qemu_short = [
            &0x1000u64.to_ne_bytes()[..],
            &4u32.to_ne_bytes(),
            &[1, 2, 3, 4],
        ]
        .concat();
        for layout in [DmaLayout::Spec, DmaLayout::Qemu] {
            assert_eq!(
                parse_dma_reply(layout, &p, &mk(spec.clone())).unwrap(),
                vec![1, 2, 3, 4]
            );
            assert_eq!(
                parse_dma_reply(layout, &p, &mk(qemu.clone())).unwrap(),
                vec![1, 2, 3, 4]
            );
            assert_eq!(
                parse_dma_reply(layout, &p, &mk(qemu_short.clone())).unwrap(),
                vec![1, 2, 3, 4]
            );
        }
        let wrong_addr = [
            &0x2000u64.to_ne_bytes()[..],
            &4u64.to_ne_bytes(),
            &[1, 2, 3, 4],
        ]
        .concat();
        assert!(parse_dma_reply(DmaLayout::Spec, &p, &mk(wrong_addr)).is_err());
        assert!(parse_dma_reply(DmaLayout::Spec, &p, &mk(vec![0; 3])).is_err());
        let pw = PendingDma { write: true, ..p };
        assert!(parse_dma_reply(DmaLayout::Qemu, &pw, &mk(vec![])).is_ok());
        assert!(parse_dma_reply(DmaLayout::Spec, &pw, &mk(spec.clone()[..16].to_vec())).is_ok());
        assert!(parse_dma_reply(DmaLayout::Spec, &pw, &mk(vec![9; 16])).is_err());
    }
}
