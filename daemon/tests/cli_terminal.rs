//! What the real `lavd` binary writes to a terminal or a pipe:
//!
//! - untrusted text quoted in an error line (here a JWK Set's kid, which
//!   `lavd seal` names when the asked key is not in the set) is escaped,
//!   never written raw: a bidirectional override or an escape sequence
//!   cannot reorder or restyle what the user reads;
//! - `lavd warrant inspect` shows a target holding a bidirectional control
//!   (the target bound allows one) escaped;
//! - a closed standard output (`lavd … | head -1`) is the error
//!   `output_closed`, exit 1, not a panic (exit 101).

// Helpers outside `#[test]` functions are test code too: a failure should
// panic the test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use lavd::jwk::{JwkSet, P256PrivateKey};

const RLO: char = '\u{202e}';

fn lavd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lavd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// `lavd seal` of a fixed message key to key `2026-11` of the set `set`.
fn seal(set: &Path) -> Vec<&str> {
    vec![
        "seal",
        "--jwks",
        set.to_str().unwrap(),
        "--kid",
        "2026-11",
        "--target",
        "acct:alice@example.com",
        "--time",
        "2026-11-26T07:25:21Z",
        "--provider",
        "spiffe://provider.example/mail",
        "--dek-hex",
        "000102030405060708090a0b0c0d0e0f",
    ]
}

/// An unsigned warrant whose one target holds a right-to-left override.
fn warrant(dir: &Path) -> PathBuf {
    let recipient = write(
        dir,
        "agency.pub.jwk",
        &serde_json::to_string(&P256PrivateKey::generate().unwrap().public().to_jwk()).unwrap(),
    );
    let out = dir.join("w.json");
    let target = format!("acct:{RLO}moc.elpmaxe@ecila");
    let r = lavd(&[
        "warrant",
        "new",
        "--recipient",
        recipient.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--id",
        "W-TERMINAL",
        "--legal-basis",
        "Investigatory Powers Act 2016 s.19",
        "--agency",
        "spiffe://agency.example/lea/unit-7",
        "--target",
        &target,
        "--window-from",
        "2026-11-01T00:00:00Z",
        "--window-to",
        "2026-12-01T00:00:00Z",
        "--not-before",
        "2026-11-24T00:00:00Z",
        "--expires",
        "2026-12-24T00:00:00Z",
        "--max-unwraps",
        "5",
    ]);
    assert!(r.status.success(), "{r:?}");
    out
}

#[test]
fn an_error_line_quotes_untrusted_text_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let mut jwk = P256PrivateKey::generate().unwrap().public().to_jwk();
    jwk.kid = Some(format!("2026-12{RLO}\u{1b}[31m"));
    jwk.use_ = Some("enc".into());
    let set = write(
        dir.path(),
        "keys.json",
        &serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    );
    let r = lavd(&seal(&set));
    let stderr = String::from_utf8(r.stderr).unwrap();
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not in the set"), "{stderr}");
    assert!(stderr.contains("2026-12\\u{202e}\\u{1b}[31m"), "{stderr}");
    assert!(
        !stderr.contains(RLO) && !stderr.contains('\u{1b}'),
        "{stderr:?}"
    );
}

#[test]
fn warrant_inspect_shows_a_target_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let w = warrant(dir.path());
    let r = lavd(&["warrant", "inspect", w.to_str().unwrap()]);
    let stdout = String::from_utf8(r.stdout).unwrap();
    assert!(r.status.success(), "{stdout} {:?}", r.stderr);
    assert!(
        stdout.contains("acct:\\u{202e}moc.elpmaxe@ecila"),
        "{stdout}"
    );
    assert!(!stdout.contains(RLO), "{stdout:?}");
}

/// Runs `lavd args` with a standard output whose reading end is closed
/// before the command starts (one end of a socket pair, the other dropped:
/// `std::io::pipe` is newer than the project's Rust 1.85), so that its
/// first write fails with a broken pipe; returns its exit code and stderr.
fn with_stdout_closed(args: &[&str]) -> (Option<i32>, String) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(ours);
    let r = Command::new(env!("CARGO_BIN_EXE_lavd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::os::fd::OwnedFd::from(theirs))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (r.status.code(), String::from_utf8(r.stderr).unwrap())
}

#[test]
fn a_closed_standard_output_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let w = warrant(dir.path());
    // Through `cli::write_out`, and through `lavd seal`'s own writer.
    let mut jwk = P256PrivateKey::generate().unwrap().public().to_jwk();
    jwk.kid = Some("2026-11".into());
    jwk.use_ = Some("enc".into());
    jwk.lav_suite = Some("16-1-2".into());
    jwk.not_before = Some("2026-11-01T00:00:00Z".into());
    jwk.not_after = Some("2026-12-01T00:00:00Z".into());
    let set = write(
        dir.path(),
        "keys.json",
        &serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
    );
    for args in [vec!["warrant", "inspect", w.to_str().unwrap()], seal(&set)] {
        let (code, stderr) = with_stdout_closed(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("lavd: output_closed: "),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// The config files the README names as the defaults: every subcommand
/// that touches the HSM or the store reads `/etc/lavd/lavd.toml` unless
/// given `--config`, and `lavd witness` reads
/// `/etc/lavd-witness/witness.toml` (as each command's help says; not
/// read here, so that the test does not depend on what `/etc` holds).
#[test]
fn the_default_config_files_are_the_readmes() {
    let default_of = |args: &[&str]| {
        let out = lavd(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        help.lines()
            .find(|l| l.trim_start().starts_with("--config <FILE>"))
            .and_then(|l| l.split_once("[default: "))
            .map(|(_, d)| d.trim_end_matches(']').to_string())
            .unwrap_or_else(|| panic!("{args:?}: no --config default in\n{help}"))
    };
    for command in [
        &["serve", "--help"][..],
        &["keys", "list", "--help"],
        &["keys", "generate-audit", "--help"],
        &["audit", "export", "--help"],
        &["store", "migrate", "--help"],
    ] {
        assert_eq!(default_of(command), "/etc/lavd/lavd.toml", "{command:?}");
    }
    for command in [
        &["witness", "serve", "--help"][..],
        &["witness", "vkey", "--help"],
    ] {
        assert_eq!(
            default_of(command),
            "/etc/lavd-witness/witness.toml",
            "{command:?}"
        );
    }
}

/// The README's error line: `lavd: <code>: <message>`, with
/// `command_failed` where no more precise code applies (here, a key file
/// that cannot be created in a directory that does not exist), exit 1.
#[test]
fn an_error_with_no_precise_code_is_command_failed() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("missing").join("k.json");
    let out = lavd(&[
        "warrant",
        "keygen",
        "--kid",
        "judicial-1",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("lavd: command_failed: creating ") && stderr.contains("k.json"),
        "{stderr}"
    );
}
