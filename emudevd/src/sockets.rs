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
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener, SocketError> {
    prepare_path(path)?;
    // Create it private from the first instant: umask covers the window before chmod.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let r = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = r.map_err(io_err(path, "bind"))?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| io_err(path, "chown")(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io_err(path, "chmod"))?;
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
