//! The README's test command and the deployment check refuse early and say
//! why, rather than failing after the whole build or passing on nothing:
//! - `.ci/test` run as another user than root stops before building, printing
//!   the `sudo` command that keeps the caller's Rust toolchain;
//! - `deploy/check`'s exposure bar fails, naming the unit, when
//!   `systemd-analyze` fails or prints no score (an empty score passed awk's
//!   comparison).
//!
//! Run as root (as CI does): the first runs the script as user nobody
//! through `setpriv`.

use std::process::Command;

const NOBODY: u32 = 65534;

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn the_test_command_as_another_user_stops_at_once_with_the_sudo_command() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs .ci/test as user nobody through setpriv, which needs root: run it as \
         root (as CI does)"
    );
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "bash",
        ])
        .arg(repo().join(".ci/test"))
        // What it would run first if it went on: a PATH holding no cargo
        // shows that it stopped before .ci/setup (which would say "cargo not
        // found").
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr.trim_end(),
        "the suite runs as root; run: sudo env \"PATH=$PATH\" \
         \"RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}\" \
         \"CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}\" .ci/test",
        "{out:?}"
    );
}

/// `deploy/check`'s `check_exposure` function, run alone on `unit`.
fn check_exposure(unit: &std::path::Path, systemd_analyze: Option<&str>) -> std::process::Output {
    let script = std::fs::read_to_string(repo().join("deploy/check")).unwrap();
    let start = script
        .find("max_score=")
        .expect("max_score in deploy/check");
    let end = start + script[start..].find("\n}\n").expect("check_exposure's end") + 3;
    let dir = tempfile::tempdir().unwrap();
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Some(fake) = systemd_analyze {
        // A systemd-analyze that prints `fake` and succeeds: a line with no
        // score.
        let bin = dir.path().join("systemd-analyze");
        std::fs::write(&bin, format!("#!/bin/sh\necho '{fake}'\n")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        path = format!("{}:{path}", dir.path().display());
    }
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail\n{}\ncheck_exposure daemon \"$1\"\necho passed",
            &script[start..end]
        ))
        .arg("check")
        .arg(unit)
        .env("PATH", path)
        .output()
        .unwrap()
}

#[test]
fn the_exposure_bar_fails_when_systemd_analyze_fails_or_prints_no_score() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.service");
    let out = check_exposure(&missing, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("systemd-analyze security --offline=true failed on the daemon unit"),
        "{out:?}"
    );

    let out = check_exposure(&missing, Some("-> Overall exposure level: unknown"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains(
            "no exposure score in the daemon unit's last line: -> Overall exposure level: unknown"
        ),
        "{out:?}"
    );

    // The shipped unit passes the same function (the binary it names need
    // not exist for the score).
    let out = check_exposure(&repo().join("deploy/systemd/lavd.service"), None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), "passed");
}
