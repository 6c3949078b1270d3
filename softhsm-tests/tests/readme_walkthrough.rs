//! The README's "Five minutes with lavd" walkthrough, run exactly as written
//! (read from README.md between its `walkthrough` markers, not copied here)
//! against a real `lavd dev` process: a provider seals a message key, two
//! authorities sign a warrant in turn, the agency unwraps with curl and opens
//! the reply, an auditor verifies the log over the API, and an oversight
//! report is made from it (and rendered in headless Chromium: the README's
//! picture of it is that screenshot). Then `lavd dev` restarts on the same
//! directory with the same state, and `lavd serve` runs on its config.

use std::path::Path;
use std::process::Command;

use softhsm_tests::dev::{chromium, stop, Dev};

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

/// `GET /v1/keys` with the provider's certificate of the dev directory
/// `dir`, through curl, as the README's reader would.
fn provider_keys(dir: &Path, api: u16) -> String {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "60", "--cacert"])
        .arg(dir.join("pki/ca.pem"))
        .arg("--cert")
        .arg(dir.join("pki/provider.pem"))
        .arg("--key")
        .arg(dir.join("pki/provider.key"))
        .arg(format!("https://localhost:{api}/v1/keys"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_readme_walkthrough_works_as_written() {
    let work = tempfile::tempdir().unwrap();
    let dev = Dev::new(work.path().join("lavd-dev"));
    let (dir, api) = (dev.dir.clone(), dev.api);
    let child = dev.start(&work.path().join("dev.log"));

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
    chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,2300",
        ],
        &work.path().join("report.html"),
        &work.path().join("chromium"),
    );
    assert_eq!(&std::fs::read(&shot).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let keys_before = std::fs::read_to_string(work.path().join("keys.json")).unwrap();

    // curl without a client certificate does not get past the handshake
    // (exit 35 or 56: the server requires a certificate), and gets no reply.
    let no_cert = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "60",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ])
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
    // Ctrl-C stops it (SIGINT, exit 0).
    softhsm_tests::dev::interrupt(child);
    // The loud warning the README promises.
    let first = std::fs::read_to_string(work.path().join("dev.log")).unwrap();
    assert!(
        first.contains("WARNING: lavd is running in DEVELOPMENT mode"),
        "{first}"
    );

    // Started again on the same directory: same keys, same log.
    let child = dev.start(&work.path().join("dev2.log"));
    let second = std::fs::read_to_string(work.path().join("dev2.log")).unwrap();
    assert!(second.contains("using the existing"), "{second}");
    assert_eq!(provider_keys(&dir, api), keys_before);
    stop(child);
    // `lavd dev` on `dir` with `flags`, refused as a usage error (exit 2);
    // its stderr. Bounded: a `lavd dev` that took them would serve.
    let refused = |dir: &std::path::Path, flags: &[&str]| {
        let out = softhsm_tests::output_within(
            Command::new(softhsm_tests::lavd_binary())
                .args(["dev", "--dir", dir.to_str().unwrap()])
                .args(flags)
                .env("LAVD_LOG", "warn"),
            std::time::Duration::from_secs(60),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        stderr
    };
    // Another address for it is refused, naming the field that keeps it,
    // not ignored with a banner that shows the flag's.
    let stderr = refused(&dir, &["--listen", &format!("127.0.0.1:{}", dev.admin)]);
    assert!(
        stderr.contains("lavd: usage: --listen")
            && stderr.contains(&format!("server.listen = \"127.0.0.1:{api}\"")),
        "{stderr}"
    );

    // A new directory with one address for both listeners is refused
    // before anything is written: the config's own check came after the
    // directory was made, and every later run on it failed the same way.
    let fresh = work.path().join("one-address");
    let stderr = refused(
        &fresh,
        &[
            "--listen",
            "127.0.0.1:7000",
            "--admin-listen",
            "127.0.0.1:7000",
        ],
    );
    assert!(
        stderr.contains("lavd: usage: --admin-listen 127.0.0.1:7000"),
        "{stderr}"
    );
    assert!(!fresh.exists(), "the directory was made");
    // So is a path SoftHSM's configuration would cut (at `=` or `#`): its
    // tokens would go elsewhere.
    let cut = work.path().join("a=b");
    let stderr = refused(&cut, &[]);
    assert!(
        stderr.contains("without control characters, `#` or `=`"),
        "{stderr}"
    );
    assert!(!cut.exists(), "the directory was made");

    // `lavd serve --config lavd-dev/lavd.toml` takes the dev config as it
    // is (the README says so): ready, and serving the same keys.
    let serve_log = work.path().join("serve.log");
    let serve = Command::new(softhsm_tests::lavd_binary())
        .arg("serve")
        .arg("--config")
        .arg(dir.join("lavd.toml"))
        .env("LAVD_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&serve_log).unwrap())
        .spawn()
        .unwrap();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], dev.admin));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !softhsm_tests::dev::ready(admin) {
        assert!(
            std::time::Instant::now() < deadline,
            "lavd serve on the dev config did not become ready:\n{}",
            std::fs::read_to_string(&serve_log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(provider_keys(&dir, api), keys_before);
    stop(serve);
}
