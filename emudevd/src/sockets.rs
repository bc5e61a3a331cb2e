//! Listening sockets for devices: created 0600 (optionally group-accessible), never over a
//! live socket, replacing a stale one; or inherited from the launcher with `--fd`.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket {path}: another server is listening there")]
    Live { path: PathBuf },
    #[error("socket {path}: exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("socket {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("--fd {fd}: not a listening UNIX stream socket: {reason}")]
    BadFd { fd: RawFd, reason: String },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Check, without changing anything, that a socket can be created at `path`: its directory
/// exists, and the path is absent or a stale socket (nobody listening).
pub fn check_path(path: &Path) -> Result<(), SocketError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !std::fs::metadata(dir)
        .map_err(io_err(path, "directory"))?
        .is_dir()
    {
        return Err(io_err(path, "directory")(io::Error::from(
            io::ErrorKind::NotADirectory,
        )));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "stat")(e)),
        Ok(md) if !md.file_type().is_socket() => Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(SocketError::Live {
                path: path.to_path_buf(),
            }),
            Err(_) => Ok(()),
        },
    }
}

/// Check that `path` can be used: absent, or a stale socket (which is removed).
pub fn prepare_path(path: &Path) -> Result<(), SocketError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "stat")(e)),
        Ok(md) if !md.file_type().is_socket() => Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(SocketError::Live {
                path: path.to_path_buf(),
            }),
            Err(_) => {
                log::info!("replacing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io_err(path, "remove stale socket"))
            }
        },
    }
}

/// Bind a listening socket at `path`, mode 0600, or 0660 with `group` as its group.
///
/// The mode is set on the socket before `bind` (Linux creates the file with the socket
/// inode's mode masked by the umask), so the file is private from its first instant without
/// touching the process-wide umask, which other threads' file creation would see.
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, SocketError> {
    use nix::sys::socket::{self as sock, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use nix::sys::stat::Mode;
    use std::os::fd::AsRawFd;

    prepare_path(path)?;
    let errno = |op: &'static str| move |e: nix::errno::Errno| io_err(path, op)(e.into());
    let addr = UnixAddr::new(path).map_err(errno("address"))?;
    let fd = sock::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(errno("socket"))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
        .map_err(errno("fchmod"))?;
    sock::bind(fd.as_raw_fd(), &addr).map_err(errno("bind"))?;
    let listener = UnixListener::from(fd);
    let finish = || -> Result<(), SocketError> {
        sock::listen(&listener, Backlog::MAXCONN).map_err(errno("listen"))?;
        // The exact mode: the umask may have taken the group bits, which we give back (never
        // more than the mode set before bind).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(path, "chmod"))?;
        if let Some(gid) = group {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(errno("chown"))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Take over a listening socket the launcher opened (`--fd N`).
pub fn from_fd(fd: RawFd) -> Result<UnixListener, SocketError> {
    use nix::sys::socket::{getsockopt, sockopt};
    let bad = |reason: String| SocketError::BadFd { fd, reason };
    if fd < 3 {
        return Err(bad("fds 0-2 are stdio".into()));
    }
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(|e| bad(e.to_string()))?;
    // SAFETY: fd is open (F_GETFD succeeded) and the launcher handed it to us to own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let ty = getsockopt(&owned, sockopt::SockType).map_err(|e| bad(e.to_string()))?;
    if ty != nix::sys::socket::SockType::Stream {
        return Err(bad(format!("socket type {ty:?}")));
    }
    if !getsockopt(&owned, sockopt::AcceptConn).map_err(|e| bad(e.to_string()))? {
        return Err(bad("not listening".into()));
    }
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok(UnixListener::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("emudevd-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn creates_0600_and_refuses_a_live_socket() {
        let p = tmp("live");
        let l = bind(&p, None).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&p, None), Err(SocketError::Live { .. })));
        drop(l);
        // Now stale: replaced.
        let _l2 = bind(&p, None).unwrap();
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn bind_leaves_the_umask_alone_and_honours_a_group() {
        let before = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let p = tmp("group");
        let gid = nix::unistd::getgid().as_raw();
        let l = bind(&p, Some(gid)).unwrap();
        // umask 022 would have dropped the group write bit: it was given back.
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&md), gid);
        let after = nix::sys::stat::umask(before);
        assert_eq!(after.bits(), 0o022, "bind changed the process umask");
        // It listens.
        UnixStream::connect(&p).unwrap();
        drop(l);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn refuses_a_regular_file() {
        let p = tmp("file");
        std::fs::write(&p, b"x").unwrap();
        assert!(matches!(
            bind(&p, None),
            Err(SocketError::NotASocket { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn from_fd_checks_the_socket() {
        let p = tmp("fd");
        let l = bind(&p, None).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
        assert!(from_fd(fd).is_ok());
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        assert!(matches!(from_fd(fd), Err(SocketError::BadFd { .. })));
        std::fs::remove_file(&p).unwrap();
    }
}
