//! A real `lavd dev` process for the tests that follow the README: start it
//! on free loopback ports, wait until `/readyz` says 200, stop it with
//! SIGTERM and expect a clean exit.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind loopback")
        .local_addr()
        .expect("local address")
        .port()
}

/// Whether the admin listener at `admin` answers `/readyz` with 200.
pub fn ready(admin: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200")
}

/// Where a `lavd dev` keeps its state and listens.
#[derive(Debug, Clone)]
pub struct Dev {
    /// `--dir`.
    pub dir: PathBuf,
    /// The API port (`--listen 127.0.0.1:<api>`).
    pub api: u16,
    /// The admin port.
    pub admin: u16,
}

impl Dev {
    /// A `lavd dev` in `dir` on two free ports.
    pub fn new(dir: PathBuf) -> Self {
        Dev {
            dir,
            api: free_port(),
            admin: free_port(),
        }
    }

    /// Starts `lavd dev`, its stderr going to `log`, and waits (up to two
    /// minutes) until it is ready.
    pub fn start(&self, log: &Path) -> Child {
        let child = Command::new(crate::lavd_binary())
            .args(["dev", "--dir", self.dir.to_str().expect("utf-8 path")])
            .args(["--listen", &format!("127.0.0.1:{}", self.api)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin)])
            .env("LAVD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn lavd dev");
        let admin = SocketAddr::from(([127, 0, 0, 1], self.admin));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready(admin) {
            assert!(
                Instant::now() < deadline,
                "lavd dev did not become ready:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        child
    }

    /// The API's URL, as the README writes it.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.api)
    }
}

/// Stops a `lavd dev` (or `serve`) with SIGTERM and expects exit 0 within
/// 30 s.
pub fn stop(child: Child) {
    stop_with(child, rustix::process::Signal::TERM);
}

/// [`stop`] with SIGINT, what Ctrl-C in a terminal sends (the README's
/// "Ctrl-C stops it").
pub fn interrupt(child: Child) {
    stop_with(child, rustix::process::Signal::INT);
}

fn stop_with(mut child: Child, signal: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), signal)
        .expect("signal lavd");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert_eq!(status.code(), Some(0));
            return;
        }
        assert!(Instant::now() < deadline, "lavd dev did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Headless Chromium on the local file `page` with `args` (a screenshot,
/// `--dump-dom`), its profile in `profile`; fails (never skips) when
/// Chromium is missing.
pub fn chromium(args: &[&str], page: &Path, profile: &Path) -> std::process::Output {
    let out = Command::new("timeout")
        .args([
            // SIGKILL 10 s after the SIGTERM, for a Chromium that ignores it.
            "-k",
            "10",
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--no-first-run",
            "--hide-scrollbars",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run timeout(1)");
    assert!(
        out.status.code() != Some(127),
        "chromium is missing: run .ci/setup --tests (it installs Debian's chromium)"
    );
    assert!(
        out.status.success(),
        "chromium failed: {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
