//! systemd's readiness protocol (`sd_notify(3)`), written directly: one
//! datagram of `KEY=VALUE` lines to the socket named by `NOTIFY_SOCKET` (a
//! path, or an abstract name when it starts with `@`). Without the variable
//! every call does nothing, so the daemon runs the same outside systemd.
//!
//! A failed send is logged and otherwise ignored: the service manager's
//! bookkeeping must never stop the daemon from serving.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// What a stop may take beyond the drain's grace and one HSM call's
/// timeout: the audit commits of the requests the drain cut, their deferred
/// leaves written (5 s at most), the HSM closed. The 10 s OPERATIONS has
/// always advised for `TimeoutStopSec` over the grace and the call timeout.
/// Reloads queued by SIGHUPs during the drain are not counted: each may
/// take a call timeout more (a trust change signs a checkpoint), and a
/// second stop signal stops waiting for them.
pub const STOP_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<SocketAddr>,
}

impl Notifier {
    /// From the value of `NOTIFY_SOCKET` (None: not under systemd).
    pub fn new(notify_socket: Option<String>) -> Self {
        let target = notify_socket.and_then(|name| match address(&name) {
            Ok(addr) => Some(addr),
            Err(e) => {
                tracing::warn!(socket = %name, error = %e, "NOTIFY_SOCKET is unusable; not notifying");
                None
            }
        });
        Notifier { target }
    }

    /// `READY=1`: serving (after start, and after each reload).
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` expects.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading configuration\n",
            monotonic_usec()
        ));
    }

    /// `STOPPING=1`: draining before exit, which may take up to `within`
    /// (the drain's grace, what it cut finishing, [`STOP_MARGIN`]). With
    /// it, `EXTEND_TIMEOUT_USEC` asks for that long, so that a grace longer
    /// than the unit's `TimeoutStopSec` is not cut by SIGKILL (systemd only
    /// ever extends the timeout with it, never shortens it).
    pub fn stopping(&self, within: std::time::Duration) {
        self.send(&format!(
            "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=draining connections\n",
            within.as_micros()
        ));
    }

    fn send(&self, message: &str) {
        let Some(target) = &self.target else { return };
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(message.as_bytes(), target));
        if let Err(e) = sent {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

fn address(name: &str) -> std::io::Result<SocketAddr> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = abstract_name;
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "abstract socket names exist only on Linux",
            ))
        }
    } else if name.starts_with('/') {
        SocketAddr::from_pathname(name)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "neither an absolute path nor an @abstract name",
        ))
    }
}

/// `STATUS=` is one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares against.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(path.to_str().unwrap().into()));
        n.ready("serving\napi=x");
        n.reloading();
        n.stopping(std::time::Duration::from_secs(120));
        let mut buf = [0u8; 512];
        let mut next = || {
            let len = rx.recv(&mut buf).unwrap();
            String::from_utf8(buf[..len].to_vec()).unwrap()
        };
        assert_eq!(next(), "READY=1\nSTATUS=serving api=x\n");
        let reloading = next();
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
        let usec: u64 = reloading.lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert!(usec <= monotonic_usec());
        assert_eq!(
            next(),
            "STOPPING=1\nEXTEND_TIMEOUT_USEC=120000000\nSTATUS=draining connections\n"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn datagrams_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("lavd-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        Notifier::new(Some(format!("@{name}"))).stopping(STOP_MARGIN);
        let mut buf = [0u8; 128];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..len],
            b"STOPPING=1\nEXTEND_TIMEOUT_USEC=10000000\nSTATUS=draining connections\n"
        );
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        Notifier::new(None).ready("x");
        Notifier::new(Some("relative/path".into())).ready("x");
    }
}
