//! systemd's notify protocol, without libsystemd: one datagram per state
//! change to the unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name starting with `@`).

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `READY=1`, `WATCHDOG=1`, `STOPPING=1`… to the service manager, or
/// nothing when kith is not run by one.
pub struct Notifier {
    /// The unbound socket we send from and the manager's address.
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a notifier that does nothing when it is unset
    /// or unusable (the reason is logged).
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
            return Notifier { target: None };
        };
        let target = address(&name.to_string_lossy()).and_then(|addr| {
            let socket = UnixDatagram::unbound()?;
            Ok((socket, addr))
        });
        match target {
            Ok(t) => Notifier { target: Some(t) },
            Err(e) => {
                tracing::warn!(socket = ?name, error = %e, "NOTIFY_SOCKET is unusable; not notifying systemd");
                Notifier { target: None }
            }
        }
    }

    /// Whether a service manager is listening.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one state string, e.g. `"READY=1\nSTATUS=serving"`.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(state.as_bytes(), addr)
        {
            tracing::warn!(error = %e, state, "could not notify systemd");
        }
    }
}

fn address(name: &str) -> std::io::Result<SocketAddr> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(abstract_name.as_bytes())
    } else {
        SocketAddr::from_pathname(name)
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when it is set
/// for this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().expect("socket"),
                address(path.to_str().expect("utf-8")).expect("address"),
            )),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1");
    }

    #[test]
    fn an_abstract_name_is_an_abstract_address() {
        use std::os::linux::net::SocketAddrExt;
        let addr = address("@kith-test").expect("address");
        assert_eq!(addr.as_abstract_name(), Some(&b"kith-test"[..]));
    }
}
