//! systemd readiness notification (`sd_notify`), without libsystemd: one datagram to
//! `$NOTIFY_SOCKET` (a path, or an abstract name starting with '@').

use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. "READY=1") if a notify socket is configured. Returns whether it was sent.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_ready_to_a_path_socket() {
        let p = std::env::temp_dir().join(format!("emudevd-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let rx = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
        // SAFETY-free: tests in this module run the env mutation alone.
        std::env::set_var("NOTIFY_SOCKET", &p);
        assert!(super::notify("READY=1").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_file(&p).unwrap();
    }
}
