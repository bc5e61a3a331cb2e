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
//! **DMA message layout.** Upstream QEMU's `hw/vfio-user/protocol.h` declares
//! `VFIOUserDMARW` with a u32 count (data at payload offset 12), which reads as a deviation
//! from the spec's u64 count (data at offset 16). On the wire, QEMU 11.1.3 as packaged by
//! Debian uses the **spec** layout: a traced DMA_WRITE of ours in the u32 layout was refused
//! with E2BIG because QEMU read the first data byte as the top half of the count, while the
//! spec layout works and QEMU answers DMA_WRITE with a 32-byte echo of address and count.
//! So [`DmaLayout::Spec`] is the default for every client; [`DmaLayout::Qemu`] stays as an
//! explicit option for clients built from the u32 header. Replies are parsed tolerantly in
//! both layouts.

mod dma_msg;
mod handlers;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::caps::{self, PeerCaps};
use crate::codec::{Decoder, OutQueue, Outgoing};
use crate::device::{Errno, IrqAction, IrqData, ServerDevice};
use crate::dma::{DmaError, DmaPort, DmaRegion};
use crate::dma_table::DmaTable;
use crate::wire::cmd;

use dma_msg::{encode_dma_request, expire_pending, ConnTransport, DmaRequest, PendingDma};
use handlers::dispatch_frame;

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
    /// `None`: the spec layout (what QEMU 11.1.3 sends and expects on the wire).
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
    /// The server's queue of device DMA requests, so DMA_UNMAP can settle it before replying.
    dma_rx: Receiver<DmaRequest>,
    msg_timeout: Duration,
    /// The stream can no longer be trusted (e.g. a header claiming an absurd size): close
    /// the connection once the pending replies are flushed.
    doomed: Option<&'static str>,
}

/// A message claiming more than this is taken as a desynchronized or hostile stream: it is
/// answered, then the connection is closed instead of skipping gigabytes.
const MAX_SKIP: u64 = 64 << 20;

impl Conn {
    /// Move queued device DMA requests of this connection onto the wire. With `removed`,
    /// requests that touch a removed range fail instead: once the unmap reply is out, no
    /// message may reach that memory.
    fn take_dma_requests(&mut self, removed: &[DmaRegion]) {
        while let Ok(req) = self.dma_rx.try_recv() {
            if req.conn_gen != self.gen || self.peer.is_none() {
                // Dropping `req.reply` reports Disconnected to the worker.
                continue;
            }
            let end = req.addr.saturating_add(req.len as u64);
            if removed.iter().any(|r| req.addr < r.end() && r.iova < end) {
                let _ = req.reply.send(Err(DmaError::Refused {
                    addr: req.addr,
                    len: req.len as u64,
                    errno: Errno::EFAULT as i32 as u32,
                }));
                continue;
            }
            let mut id = self.next_dma_id;
            while self.pending.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            self.next_dma_id = id.wrapping_add(1);
            let command = if req.write {
                cmd::DMA_WRITE
            } else {
                cmd::DMA_READ
            };
            let bytes = encode_dma_request(self.layout, id, command, req.addr, req.len, &req.data);
            log::debug!(
                "vfio-user: -> {} id={id} addr={:#x} len={:#x}",
                cmd::name(command),
                req.addr,
                req.len
            );
            self.out.push(Outgoing {
                bytes,
                fds: Vec::new(),
            });
            self.pending.insert(
                id,
                PendingDma {
                    write: req.write,
                    addr: req.addr,
                    len: req.len,
                    deadline: Instant::now() + self.msg_timeout,
                    reply: req.reply,
                },
            );
        }
    }
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
            self.turn_with(&mut events, timeout)?;
        }
    }

    /// Adopt an already-connected client stream as if it had been accepted, so a caller
    /// can drive the server on its own thread with [`Server::turn`] (a fuzzer or test feeds
    /// one end of a socketpair and reads the replies between turns: no thread hand-offs).
    /// Fails with `AddrInUse` while a client is connected.
    pub fn connect_stream(&mut self, stream: std::os::unix::net::UnixStream) -> io::Result<()> {
        if self.conn.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "a client is already connected",
            ));
        }
        stream.set_nonblocking(true)?;
        self.adopt(UnixStream::from_std(stream))
    }

    /// One iteration of the event loop: wait at most `timeout` (`None`: forever) for
    /// socket events, then read, dispatch and flush what can be done without blocking.
    /// [`Server::run`] is this in a loop; new clients on the listener are accepted here too.
    pub fn turn(&mut self, timeout: Option<Duration>) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(16);
        let timeout = match (timeout, self.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.turn_with(&mut events, timeout)
    }

    /// Whether a client is connected (false again once it disconnected and was cleaned up).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    fn turn_with(
        &mut self,
        events: &mut Events,
        timeout: Option<Duration>,
    ) -> Result<(), ServerError> {
        if let Err(e) = self.poll.poll(events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
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
        Ok(())
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

    /// Make `stream` the connection (there is none).
    fn adopt(&mut self, mut stream: UnixStream) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut stream, CONN, Interest::READABLE)?;
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
            dma_rx: self.dma_rx.clone(),
            msg_timeout: self.options.msg_timeout,
            doomed: None,
        });
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conn.is_some() {
                        // The previous client may have just closed: take in what it left
                        // (and its EOF) before deciding that this one is a second client.
                        self.service();
                    }
                    if self.conn.is_some() {
                        log::warn!("vfio-user: refusing a second client while one is connected");
                        drop(stream);
                        continue;
                    }
                    if let Err(e) = self.adopt(stream) {
                        log::error!("vfio-user: cannot register client: {e}");
                        continue;
                    }
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
        if closed.is_none() && c.out.is_empty() {
            closed = c.doomed;
        }
        if let Some(why) = closed {
            self.disconnect(why);
        }
    }

    fn run_dma_requests(&mut self) {
        match self.conn.as_mut() {
            Some(c) => c.take_dma_requests(&[]),
            // Dropping the requests reports Disconnected to their workers.
            None => while self.dma_rx.try_recv().is_ok() {},
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
        // Drop queued DMA requests for this connection first, so workers blocked on them
        // fail now rather than at their timeout while the device stops below.
        while self.dma_rx.try_recv().is_ok() {}
        let removed = c.table.clear();
        if !removed.is_empty() {
            if let Err(e) = self.device.dma_unmap(&[], &removed) {
                log::warn!("vfio-user: device failed to unmap DMA on disconnect: {e}");
            }
        }
        if c.peer.is_some() {
            self.device.detach();
        }
        // And any the device queued while stopping.
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
