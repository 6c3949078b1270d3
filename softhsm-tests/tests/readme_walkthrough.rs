//! The README's "Five minutes with lavd" walkthrough, run exactly as written
//! (read from README.md between its `walkthrough` markers, not copied here)
//! against a real `lavd dev` process: a provider seals a message key, two
//! authorities sign a warrant in turn, the agency unwraps with curl and opens
//! the reply, an auditor verifies the log over the API, and an oversight
//! report is made from it (and rendered in headless Chromium: the README's
//! picture of it is that screenshot). Then `lavd dev` restarts on the same
//! directory with the same state.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ready(admin: SocketAddr) -> bool {
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

fn start_dev(dir: &Path, api: u16, admin: u16, log: &Path) -> Child {
    let child = Command::new(softhsm_tests::lavd_binary())
        .args(["dev", "--dir", dir.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .env("LAVD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
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

fn stop(mut child: Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            return;
        }
        assert!(Instant::now() < deadline, "lavd dev did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough:begin -->")
        .expect("begin marker");
    let end = readme.find("<!-- walkthrough:end -->").expect("end marker");
    let block = &readme[start..end];
    let code_start = block.find("```sh\n").expect("sh block") + "```sh\n".len();
    let code_end = block[code_start..].find("```").expect("block end") + code_start;
    block[code_start..code_end].to_string()
}

#[test]
fn the_readme_walkthrough_works_as_written() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("lavd-dev");
    let (api, admin) = (free_port(), free_port());
    let log = work.path().join("dev.log");
    let child = start_dev(&dir, api, admin, &log);

    // `lavd` on PATH is the binary under test.
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(softhsm_tests::lavd_binary(), bin.join("lavd")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let script = walkthrough();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(work.path())
        .env("PATH", path)
        .env("D", &dir)
        .env("API", format!("https://localhost:{api}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walkthrough failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("\"msg-1\"\tok\t00112233445566778899aabbccddeeff"),
        "the agency did not get the message key:\n{stdout}"
    );
    assert!(stdout.contains("unwrap                      1"), "{stdout}");
    assert!(stdout.contains("verdict: the log verifies"), "{stdout}");
    // Step 5: the report counts the one envelope opened above, and renders.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["totals"]["opened"], 1, "{report}");
    let shot_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("readme-walkthrough");
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("report-walkthrough.png");
    let _ = std::fs::remove_file(&shot);
    let chromium = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1200,2300",
        ])
        .arg(format!(
            "--user-data-dir={}",
            work.path().join("chromium").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!(
            "file://{}",
            work.path().join("report.html").display()
        ))
        .output()
        .expect("chromium is missing: run .ci/setup --tests (it installs Debian's chromium)");
    assert!(chromium.status.success(), "{chromium:?}");
    assert_eq!(&std::fs::read(&shot).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let keys_before = std::fs::read_to_string(work.path().join("keys.json")).unwrap();

    // curl without a client certificate does not get past the handshake
    // (exit 35 or 56: the server requires a certificate), and gets no reply.
    let no_cert = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(dir.join("pki/ca.pem"))
        .arg(format!("https://localhost:{api}/v1/keys"))
        .output()
        .unwrap();
    assert!(
        matches!(no_cert.status.code(), Some(35) | Some(56)),
        "curl without a certificate: {:?} {}",
        no_cert.status.code(),
        String::from_utf8_lossy(&no_cert.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&no_cert.stdout), "000");
    stop(child);

    // Started again on the same directory: same keys, same log.
    let child = start_dev(&dir, api, admin, &work.path().join("dev2.log"));
    let second = std::fs::read_to_string(work.path().join("dev2.log")).unwrap();
    assert!(second.contains("using the existing"), "{second}");
    let keys_after = Command::new("curl")
        .args(["-sf", "--cacert"])
        .arg(dir.join("pki/ca.pem"))
        .arg("--cert")
        .arg(dir.join("pki/provider.pem"))
        .arg("--key")
        .arg(dir.join("pki/provider.key"))
        .arg(format!("https://localhost:{api}/v1/keys"))
        .output()
        .unwrap();
    assert!(keys_after.status.success());
    assert_eq!(String::from_utf8_lossy(&keys_after.stdout), keys_before);
    stop(child);
}
