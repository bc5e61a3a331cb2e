//! The monitor thread of one bridged device: forwards the backend's call eventfds to the
//! queues' notifiers (MSI-X / INTx), reports signals on the err eventfds as ring errors,
//! watches the socket for the backend hanging up, and reconnects while it is gone.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use emudev_virtio::{Notifier, QueueError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;

use crate::backend::Backend;

struct Watch {
    queue: u16,
    call: Arc<EventFd>,
    err: Arc<EventFd>,
    notifier: Arc<dyn Notifier>,
}

struct WatchSet {
    queues: Vec<Watch>,
    sock: Option<Arc<OwnedFd>>,
}

fn snapshot(b: &Backend) -> WatchSet {
    let s = b.lock();
    let queues = s
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, slot)| {
            let r = slot.running.as_ref().filter(|r| !r.lost)?;
            Some(Watch {
                // Bounded by MAX_RINGS.
                queue: i as u16,
                call: r.call.clone(),
                err: r.err.clone(),
                notifier: r.notifier.clone(),
            })
        })
        .collect();
    WatchSet {
        queues,
        sock: s.watch.clone(),
    }
}

/// Run until `b.stop` is set (and `b.wake` written).
pub(crate) fn run(b: Arc<Backend>) {
    let mut seen = u64::MAX;
    let mut set = WatchSet {
        queues: Vec::new(),
        sock: None,
    };
    let mut last_attempt = Instant::now();
    let interval = b.opts.reconnect_interval;
    while !b.stop.load(Ordering::SeqCst) {
        let v = b.version.load(Ordering::SeqCst);
        if v != seen {
            set = snapshot(&b);
            seen = v;
        }
        let mut fds: Vec<PollFd> = Vec::with_capacity(2 + 2 * set.queues.len());
        fds.push(PollFd::new(b.wake.as_fd(), PollFlags::POLLIN));
        if let Some(s) = &set.sock {
            fds.push(PollFd::new(
                s.as_fd(),
                PollFlags::from_bits_retain(libc::POLLRDHUP),
            ));
        }
        for w in &set.queues {
            fds.push(PollFd::new(w.call.as_fd(), PollFlags::POLLIN));
            fds.push(PollFd::new(w.err.as_fd(), PollFlags::POLLIN));
        }
        let timeout = if set.sock.is_none() {
            PollTimeout::try_from(interval).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        if let Err(e) = poll(&mut fds, timeout) {
            if e != nix::errno::Errno::EINTR {
                log::error!("{}: monitor poll failed: {e}", b.name);
                return;
            }
            continue;
        }
        // `revents()` is None when bits nix has no name for are set (POLLRDHUP): ready.
        let ready = |i: usize| {
            fds.get(i)
                .is_some_and(|f| f.revents().is_none_or(|r| !r.is_empty()))
        };
        if ready(0) {
            let _ = b.wake.read();
        }
        let mut at = 1;
        if let Some(s) = &set.sock {
            if ready(1) {
                let s = s.clone();
                drop(fds);
                b.hung_up(&s);
                continue;
            }
            at = 2;
        }
        for (k, w) in set.queues.iter().enumerate() {
            let (ci, ei) = (at + 2 * k, at + 2 * k + 1);
            if ready(ci) && w.call.read().is_ok_and(|n| n > 0) {
                w.notifier.notify();
            }
            if ready(ei) && w.err.read().is_ok_and(|n| n > 0) {
                report_ring_error(&b, w.queue);
            }
        }
        drop(fds);
        if set.sock.is_none() && last_attempt.elapsed() >= interval {
            last_attempt = Instant::now();
            b.try_reconnect();
        }
    }
}

fn report_ring_error(b: &Backend, queue: u16) {
    log::warn!(
        "{}: the vhost-user backend reported an error on ring {queue}",
        b.name
    );
    let cb = b.lock().err_cb.clone();
    if let Some(cb) = cb {
        cb(
            queue,
            &QueueError::Backend("the vhost-user backend reported a ring error".into()),
        );
    }
}
