//! `lavd seal` and `lavd open` end to end through real files: a provider
//! seals from the `GET /v1/keys` JWK Set, the daemon side opens (software DH
//! standing in for the HSM) and seals the reply, the agency's tool prints the
//! DEKs.
#![cfg(feature = "daemon")]
// A test crate: its helper functions (outside `#[test]`) panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use clap::Parser;
use lavd::cli::seal::{OpenArgs, SealArgs};
use lavd::envelope::hpke::software_dh;
use lavd::envelope::reply::{AuditRef, DenyReason, ReplyBuilder};
use lavd::envelope::{open_envelope, Envelope, EnvelopeLimits};
use lavd::jwk::{JwkSet, P256PrivateKey, LAV_SUITE};

/// The two subcommands as the lead will wire them, to test the flag names.
#[derive(Parser)]
enum Cmd {
    Seal(SealArgs),
    Open(OpenArgs),
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn jwks(escrow: &P256PrivateKey, suite: &str) -> String {
    let mut jwk = escrow.public().to_jwk();
    jwk.kid = Some("2026-11".into());
    jwk.use_ = Some("enc".into());
    jwk.lav_suite = Some(suite.into());
    jwk.not_before = Some("2026-11-01T00:00:00Z".into());
    jwk.not_after = Some("2026-12-01T00:00:00Z".into());
    serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap()
}

/// Runs `lavd seal` with default flags, each replaceable by `overrides`
/// (flag, value) pairs; a flag not among the defaults is appended.
fn seal(jwks_path: &Path, overrides: &[(&str, &str)]) -> (anyhow::Result<()>, String, String) {
    seal_with(jwks_path, overrides, &[])
}

/// [`seal`] at `time` with `--allow-outside-validity`.
fn seal_allowing(jwks_path: &Path, time: &str) -> (anyhow::Result<()>, String, String) {
    seal_with(
        jwks_path,
        &[("--time", time)],
        &["--allow-outside-validity"],
    )
}

/// [`seal`], with `switches` (flags without a value) after the others.
fn seal_with(
    jwks_path: &Path,
    overrides: &[(&str, &str)],
    switches: &[&str],
) -> (anyhow::Result<()>, String, String) {
    let mut flags = vec![
        ("--jwks", jwks_path.to_str().unwrap()),
        ("--kid", "2026-11"),
        ("--target", "acct:alice@example.com"),
        ("--time", "2026-11-26T07:25:21Z"),
        ("--provider", "spiffe://provider.example/mail"),
        ("--dek-hex", "000102030405060708090a0b0c0d0e0f"),
    ];
    for (flag, value) in overrides {
        match flags.iter_mut().find(|(f, _)| f == flag) {
            Some(slot) => slot.1 = value,
            None => flags.push((flag, value)),
        }
    }
    let mut argv = vec!["lavd", "seal"];
    for (flag, value) in flags {
        argv.extend([flag, value]);
    }
    argv.extend_from_slice(switches);
    let Cmd::Seal(args) = Cmd::try_parse_from(argv).unwrap() else {
        unreachable!()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = args.run_with(&mut out, &mut err);
    (
        result,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn seal_then_open_prints_each_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let escrow = P256PrivateKey::generate().unwrap();
    let jwks_path = write(dir.path(), "keys.json", &jwks(&escrow, LAV_SUITE));

    // A `ref` with a right-to-left override: printed escaped, so it cannot
    // reorder the agency's terminal line.
    let (r, env1, warn) = seal(&jwks_path, &[("--ref", "msg-8812\u{202e}")]);
    r.unwrap();
    assert_eq!(warn, "");
    let (r, env2, _) = seal(&jwks_path, &[]);
    r.unwrap();

    // The daemon's side, with software DH in place of the HSM.
    let recipient = P256PrivateKey::generate().unwrap();
    let mut builder = ReplyBuilder::new(recipient.public()).unwrap();
    let e1 = Envelope::parse(env1.trim_end().as_bytes(), &EnvelopeLimits::default()).unwrap();
    assert_eq!(e1.header().provider(), "spiffe://provider.example/mail");
    let dek = open_envelope(&e1, escrow.public(), |e| software_dh(&escrow, e)).unwrap();
    builder.push_opened(e1.header_bytes(), &dek).unwrap();
    builder.push_denied(DenyReason::OutOfWindow);
    let e2 = Envelope::parse(env2.trim_end().as_bytes(), &EnvelopeLimits::default()).unwrap();
    let dek = open_envelope(&e2, escrow.public(), |e| software_dh(&escrow, e)).unwrap();
    builder.push_opened(e2.header_bytes(), &dek).unwrap();
    let reply = builder
        .finish(AuditRef {
            checkpoint: "c".into(),
            first_index: 7,
            count: 3,
        })
        .to_json();

    let request = format!(
        r#"{{"warrant":{{"payload":"e30","signatures":[]}},"envelopes":[{},{},{}]}}"#,
        env1.trim_end(),
        env2.trim_end(),
        env2.trim_end()
    );
    let request_path = write(dir.path(), "request.json", &request);
    let reply_path = write(dir.path(), "reply.json", &reply);
    let key_path = write(
        dir.path(),
        "recipient.jwk",
        &serde_json::to_string(&recipient.to_private_jwk()).unwrap(),
    );

    // Request envelopes: env1 (ok), env2 (denied), env2 (ok).
    let Cmd::Open(args) = Cmd::try_parse_from([
        "lavd",
        "open",
        "--recipient-key",
        key_path.to_str().unwrap(),
        "--request",
        request_path.to_str().unwrap(),
        "--reply",
        reply_path.to_str().unwrap(),
    ])
    .unwrap() else {
        unreachable!()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    args.run_with(&mut out, &mut err).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "\"msg-8812\\u{202e}\"\tok\t000102030405060708090a0b0c0d0e0f\n\
         #1\tdenied\tout_of_window\n\
         #2\tok\t000102030405060708090a0b0c0d0e0f\n"
    );
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "audit: 3 leaves from index 7 (checkpoint not verified by this tool)\n"
    );

    // The public half for the key, the reply for the request: each refused
    // with its code before anything is printed.
    let public_path = write(
        dir.path(),
        "public.jwk",
        &serde_json::to_string(&recipient.public().to_jwk()).unwrap(),
    );
    for (key, request, code) in [
        (&public_path, &request_path, "recipient_key_malformed"),
        (&key_path, &reply_path, "request_malformed"),
    ] {
        let Cmd::Open(args) = Cmd::try_parse_from([
            "lavd",
            "open",
            "--recipient-key",
            key.to_str().unwrap(),
            "--request",
            request.to_str().unwrap(),
            "--reply",
            reply_path.to_str().unwrap(),
        ])
        .unwrap() else {
            unreachable!()
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let e = args.run_with(&mut out, &mut err).unwrap_err();
        assert_eq!(lavd::cli::error_code(&e), Some(code), "{e:#}");
        assert!(out.is_empty());
    }
}

#[test]
fn seal_refuses_unknown_kid_and_other_suite() {
    let dir = tempfile::tempdir().unwrap();
    let escrow = P256PrivateKey::generate().unwrap();
    let good = write(dir.path(), "keys.json", &jwks(&escrow, LAV_SUITE));
    let (r, out, _) = seal(&good, &[("--kid", "2027-01")]);
    let e = r.unwrap_err();
    assert_eq!(lavd::cli::error_code(&e), Some("jwks_kid_unknown"), "{e:#}");
    let err = format!("{e:#}");
    assert!(
        err.contains("key `2027-01`: not in the set (it has: 2026-11)"),
        "{err}"
    );
    assert_eq!(out, "");

    // The kid twice: which key is meant cannot be told.
    let mut twice: serde_json::Value = serde_json::from_str(&jwks(&escrow, LAV_SUITE)).unwrap();
    let again = twice["keys"][0].clone();
    twice["keys"].as_array_mut().unwrap().push(again);
    let twice = write(dir.path(), "twice.json", &twice.to_string());
    let (r, out, _) = seal(&twice, &[]);
    let e = r.unwrap_err();
    assert_eq!(
        lavd::cli::error_code(&e),
        Some("jwks_kid_ambiguous"),
        "{e:#}"
    );
    assert_eq!(out, "");

    // A signing key, and a key whose coordinates are not on the curve.
    for (member, value, says) in [
        ("use", "sig", "`use` is Some(\"sig\")"),
        (
            "x",
            &*lavd::codec::b64_encode([1u8; 32]),
            "not a valid P-256 key",
        ),
    ] {
        let mut bad: serde_json::Value = serde_json::from_str(&jwks(&escrow, LAV_SUITE)).unwrap();
        bad["keys"][0][member] = serde_json::json!(value);
        let bad = write(dir.path(), "bad.json", &bad.to_string());
        let (r, out, _) = seal(&bad, &[]);
        let e = r.unwrap_err();
        assert_eq!(
            lavd::cli::error_code(&e),
            Some("jwks_key_unusable"),
            "{e:#}"
        );
        assert!(format!("{e:#}").contains(says), "{e:#}");
        assert_eq!(out, "");
    }

    // A set in which a key, even another than the one asked for, carries
    // its private half: refused, with its code.
    let mut leaked: serde_json::Value = serde_json::from_str(&jwks(&escrow, LAV_SUITE)).unwrap();
    let mut other = leaked["keys"][0].clone();
    other["kid"] = serde_json::json!("2026-10");
    other["d"] = serde_json::json!(lavd::codec::b64_encode([7u8; 32]));
    leaked["keys"].as_array_mut().unwrap().push(other);
    let leaked = write(dir.path(), "leaked.json", &leaked.to_string());
    let (r, out, _) = seal(&leaked, &[]);
    let e = r.unwrap_err();
    assert_eq!(lavd::cli::error_code(&e), Some("jwks_private_key"), "{e:#}");
    assert_eq!(out, "");

    let other = write(dir.path(), "other.json", &jwks(&escrow, "16-1-1"));
    let (r, out, _) = seal(&other, &[]);
    let e = r.unwrap_err();
    assert_eq!(
        lavd::cli::error_code(&e),
        Some("jwks_key_unusable"),
        "{e:#}"
    );
    let err = format!("{e:#}");
    assert!(err.contains("`lav_suite` is Some(\"16-1-1\")"), "{err}");
    assert_eq!(out, "");
}

/// A JWK Set, or a key in it, written as an array of its members' values
/// (serde_json's derive reads that form too) is not a JWK Set.
#[test]
fn seal_refuses_arrays_where_objects_belong() {
    let dir = tempfile::tempdir().unwrap();
    let escrow = P256PrivateKey::generate().unwrap();
    let set: serde_json::Value = serde_json::from_str(&jwks(&escrow, LAV_SUITE)).unwrap();
    let key = &set["keys"][0];
    let members = [
        "kty",
        "crv",
        "x",
        "y",
        "d",
        "kid",
        "use",
        "alg",
        "lav_suite",
        "not_before",
        "not_after",
    ];
    let positional: Vec<serde_json::Value> = members.iter().map(|m| key[m].clone()).collect();
    for (name, text) in [
        ("set.json", serde_json::json!([set["keys"]])),
        ("key.json", serde_json::json!({ "keys": [positional] })),
    ] {
        let path = write(dir.path(), name, &text.to_string());
        let (r, out, _) = seal(&path, &[]);
        let e = r.unwrap_err();
        assert_eq!(lavd::cli::error_code(&e), Some("jwks_malformed"), "{e:#}");
        let err = format!("{e:#}");
        assert!(err.contains("not a JWK Set"), "{err}");
        assert!(err.contains("expected a JSON object"), "{err}");
        assert_eq!(out, "");
    }
}

/// A `--time` outside the key's validity is refused (PROTOCOL §2:
/// providers seal to a key only inside it), nothing written; with
/// `--allow-outside-validity` it is sealed with a warning. Before, it was
/// sealed with a warning alone, exit 0.
#[test]
fn seal_refuses_a_time_outside_the_key_validity_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let escrow = P256PrivateKey::generate().unwrap();
    let path = write(dir.path(), "keys.json", &jwks(&escrow, LAV_SUITE));
    for (time, says) in [
        (
            "2026-12-01T00:00:00Z",
            "time 2026-12-01T00:00:00Z is at or after its not_after 2026-12-01T00:00:00Z",
        ),
        ("2026-10-31T23:59:59Z", "is before its not_before"),
    ] {
        let (r, out, warn) = seal(&path, &[("--time", time)]);
        let e = r.unwrap_err();
        assert_eq!(
            lavd::cli::error_code(&e),
            Some("jwks_key_unusable"),
            "{e:#}"
        );
        assert!(
            format!("{e:#}").contains(says)
                && format!("{e:#}").contains("--allow-outside-validity"),
            "{e:#}"
        );
        assert_eq!((out.as_str(), warn.as_str()), ("", ""));
    }
    let (r, out, warn) = seal_allowing(&path, "2026-12-01T00:00:00Z");
    r.unwrap();
    assert!(out.starts_with(r#"{"v":1,"header":""#), "{out}");
    assert_eq!(
        warn,
        "warning: key `2026-11`: time 2026-12-01T00:00:00Z is at or after its not_after 2026-12-01T00:00:00Z\n"
    );
    // Without dates: refused likewise, sealed only when allowed.
    let undated = jwks(&escrow, LAV_SUITE).replace(r#","not_after":"2026-12-01T00:00:00Z""#, "");
    assert!(!undated.contains("not_after"), "{undated}");
    let undated = write(dir.path(), "undated.json", &undated);
    let e = seal(&undated, &[]).0.unwrap_err();
    assert!(format!("{e:#}").contains("has no `not_after`"), "{e:#}");
    seal_allowing(&undated, "2026-11-26T07:25:21Z").0.unwrap();
    // A window that holds no time: refused, allowed or not.
    let inverted = jwks(&escrow, LAV_SUITE).replace("2026-12-01T00:00:00Z", "2026-10-01T00:00:00Z");
    let inverted = write(dir.path(), "inverted.json", &inverted);
    let e = seal_allowing(&inverted, "2026-11-26T07:25:21Z")
        .0
        .unwrap_err();
    assert_eq!(
        lavd::cli::error_code(&e),
        Some("jwks_key_unusable"),
        "{e:#}"
    );
    assert!(format!("{e:#}").contains("no time is inside it"), "{e:#}");
}

/// `lavd seal` with only `--time` and `--dek-hex` varying.
fn parse_seal(time: &str, dek_hex: &str) -> Result<Cmd, clap::Error> {
    Cmd::try_parse_from([
        "lavd",
        "seal",
        "--jwks",
        "k",
        "--kid",
        "k",
        "--target",
        "t",
        "--time",
        time,
        "--provider",
        "p",
        "--dek-hex",
        dek_hex,
    ])
}

#[test]
fn dek_hex_is_checked_and_never_printed() {
    const TIME: &str = "2026-11-26T07:25:21Z";
    const DEK: &str = "deadbeefdeadbeefdeadbeefdeadbeef";
    let bad = parse_seal(TIME, "00ff").err().unwrap().to_string();
    assert!(
        bad.contains("the DEK is 2 bytes; expected 16..=64"),
        "{bad}"
    );
    // clap quotes a refused value; this one is a secret, and is not.
    assert!(!bad.contains("00ff"), "{bad}");
    // A fraction of a second is refused, not dropped from the header.
    let fraction = parse_seal("2026-11-26T07:25:21.9Z", DEK)
        .err()
        .unwrap()
        .to_string();
    assert!(fraction.contains("fraction of a second"), "{fraction}");

    let Cmd::Seal(args) = parse_seal(TIME, DEK).unwrap() else {
        unreachable!()
    };
    let text = format!("{args:?}");
    assert!(
        text.contains("DekHex(<redacted>)") && !text.contains("dead"),
        "{text}"
    );
}

#[test]
fn provider_has_no_default() {
    // (Assumes LAV_PROVIDER_ID is not set in the test environment; tests do
    // not modify the process environment.)
    let err = Cmd::try_parse_from([
        "lavd",
        "seal",
        "--jwks",
        "k",
        "--kid",
        "k",
        "--target",
        "t",
        "--time",
        "2026-11-26T07:25:21Z",
        "--dek-hex",
        "000102030405060708090a0b0c0d0e0f",
    ])
    .err()
    .unwrap();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    assert!(err.to_string().contains("--provider <URI>"), "{err}");
}

/// `--dek-file FILE` (or `-` for standard input) keeps the DEK out of the
/// process list; exactly one of it and `--dek-hex` is given.
#[test]
fn seal_reads_the_dek_from_a_file_or_standard_input() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let escrow = P256PrivateKey::generate().unwrap();
    let jwks_path = write(dir.path(), "keys.json", &jwks(&escrow, LAV_SUITE));
    let dek = "f0e1d2c3b4a5968778695a4b3c2d1e0f";
    let opened = |envelope: &str| {
        let e =
            Envelope::parse(envelope.trim_end().as_bytes(), &EnvelopeLimits::default()).unwrap();
        let dek = open_envelope(&e, escrow.public(), |e| software_dh(&escrow, e)).unwrap();
        hex::encode(&*dek)
    };
    let base = [
        "--jwks",
        jwks_path.to_str().unwrap(),
        "--kid",
        "2026-11",
        "--target",
        "acct:alice@example.com",
        "--time",
        "2026-11-26T07:25:21Z",
        "--provider",
        "spiffe://provider.example/mail",
    ];
    let parse = |extra: &[&str]| {
        let mut argv = vec!["lavd", "seal"];
        argv.extend(base);
        argv.extend(extra);
        Cmd::try_parse_from(argv)
    };

    // A file, with its line end.
    let file = write(dir.path(), "dek", &format!("{dek}\n"));
    let Ok(Cmd::Seal(args)) = parse(&["--dek-file", file.to_str().unwrap()]) else {
        panic!("--dek-file refused")
    };
    let mut out = Vec::new();
    args.run_with(&mut out, &mut Vec::new()).unwrap();
    assert_eq!(opened(&String::from_utf8(out).unwrap()), dek);

    // Standard input, through the real binary.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lavd"))
        .arg("seal")
        .args(base)
        .args(["--dek-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{dek}\n").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(opened(&String::from_utf8(output.stdout).unwrap()), dek);

    // Not hex, too short, or too long a file: refused, naming the file.
    for bad in ["zz\n", "00ff\n", &"0".repeat(300)] {
        let file = write(dir.path(), "bad", bad);
        let Ok(Cmd::Seal(args)) = parse(&["--dek-file", file.to_str().unwrap()]) else {
            panic!("parse")
        };
        let e = args.run_with(&mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("bad"), "{e}");
        assert_eq!(lavd::cli::error_code(&e), Some("invalid_dek"), "{e:#}");
    }
    // A file that is not there.
    let Ok(Cmd::Seal(args)) = parse(&["--dek-file", dir.path().join("absent").to_str().unwrap()])
    else {
        panic!("parse")
    };
    let e = args.run_with(&mut Vec::new(), &mut Vec::new()).unwrap_err();
    assert_eq!(lavd::cli::error_code(&e), Some("input_unreadable"), "{e:#}");
    assert!(e.to_string().contains("absent"), "{e}");
    // Both, or neither.
    let both = parse(&["--dek-file", "-", "--dek-hex", dek]).err().unwrap();
    assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    let neither = parse(&[]).err().unwrap();
    assert_eq!(
        neither.kind(),
        clap::error::ErrorKind::MissingRequiredArgument
    );
}
