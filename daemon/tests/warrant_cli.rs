//! `lavd warrant keygen | new | sign | inspect`, end to end on real files,
//! parsed through clap with the real flag names: an executive and then a
//! judicial authority sign in turn, and `inspect` accepts the result against
//! a double-lock trust config; with one signature it names the missing role.
//!
//! (`main.rs` does not dispatch to these yet; the commands run through
//! `WarrantCommand::run`, exactly as `main` will call them.)

// Helpers outside `#[test]` functions are test code too: a failure should
// panic the test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use clap::Parser;
use lavd::cli::warrant::{NotAccepted, Verdict, WarrantCommand};
use lavd::jwk::P256PrivateKey;

#[derive(Debug, Parser)]
#[command(name = "lavd-warrant")]
struct Cli {
    #[command(subcommand)]
    command: WarrantCommand,
}

fn cmd(args: &[&str]) -> WarrantCommand {
    let mut argv = vec!["lavd-warrant"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).unwrap().command
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    cmd(args).run()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn inspect(args: &[&str]) -> lavd::cli::warrant::InspectReport {
    match cmd(args) {
        WarrantCommand::Inspect(a) => a.report().unwrap(),
        other => panic!("not inspect: {other:?}"),
    }
}

const NEW_FLAGS: &[&str] = &[
    "--id",
    "OP-2026-0042",
    "--legal-basis",
    "Investigatory Powers Act 2016 s.19",
    "--agency",
    "spiffe://agency.example/lea/unit-7",
    "--target",
    "acct:alice@example.com",
    "--target",
    "acct:bob@example.com",
    "--window-from",
    "2026-11-01T00:00:00Z",
    "--window-to",
    "2026-12-01T00:00:00Z",
    "--not-before",
    "2026-11-24T00:00:00Z",
    "--expires",
    "2026-12-24T00:00:00Z",
    "--max-unwraps",
    "25",
    "--kid",
    "2026-11",
];

/// A new agency recipient's public JWK, written to `dir`; its path.
fn write_recipient(dir: &Path) -> std::path::PathBuf {
    let recipient = dir.join("agency.pub.jwk");
    std::fs::write(
        &recipient,
        serde_json::to_string(&P256PrivateKey::generate().unwrap().public().to_jwk()).unwrap(),
    )
    .unwrap();
    recipient
}

fn write_trust(dir: &Path, exec_pub: &Path, jud_pub: &Path) -> std::path::PathBuf {
    let jwk = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    let text = format!(
        "[[authorities]]\nkid = \"home-office-1\"\nrole = \"executive\"\nalg = \"ES256\"\njwk = '{}'\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n\n\
         [[authorities]]\nkid = \"ipc-judicial-3\"\nrole = \"judicial\"\nalg = \"EdDSA\"\njwk = '{}'\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n\n\
         [policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n[[policy.require]]\nrole = \"judicial\"\ncount = 1\n",
        jwk(exec_pub),
        jwk(jud_pub)
    );
    let path = dir.join("trust.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn executive_then_judicial_signing_is_accepted_by_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (exec_key, exec_pub) = (d.join("exec.jwk"), d.join("exec.pub.jwk"));
    let (jud_key, jud_pub) = (d.join("jud.jwk"), d.join("jud.pub.jwk"));
    run(&[
        "keygen",
        "--alg",
        "ES256",
        "--kid",
        "home-office-1",
        "--out",
        s(&exec_key),
        "--public-out",
        s(&exec_pub),
    ])
    .unwrap();
    run(&[
        "keygen",
        "--alg",
        "EdDSA",
        "--kid",
        "ipc-judicial-3",
        "--out",
        s(&jud_key),
        "--public-out",
        s(&jud_pub),
    ])
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&exec_key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // keygen never overwrites a key.
    assert!(run(&["keygen", "--kid", "home-office-1", "--out", s(&exec_key)]).is_err());
    // A public half that cannot be written (here a directory) leaves no
    // private key behind, so the same command can run again.
    let orphan = d.join("orphan.jwk");
    for _ in 0..2 {
        let e = run(&[
            "keygen",
            "--kid",
            "k-1",
            "--out",
            s(&orphan),
            "--public-out",
            s(d),
        ])
        .unwrap_err();
        assert!(format!("{e:#}").contains("writing"), "{e:#}");
        assert!(!orphan.exists());
    }
    let trust = write_trust(d, &exec_pub, &jud_pub);

    let recipient = write_recipient(d);
    let unsigned = d.join("w0.json");
    let mut args = vec!["new", "--recipient", s(&recipient), "--out", s(&unsigned)];
    args.extend_from_slice(NEW_FLAGS);
    run(&args).unwrap();

    let at = "2026-11-25T12:00:00Z";
    let agency = "spiffe://agency.example/lea/unit-7";
    let report = inspect(&["inspect", s(&unsigned), "--trust", s(&trust), "--at", at]);
    assert!(
        matches!(
            &report.verdict,
            Verdict::Refused {
                code: "policy_not_met",
                ..
            }
        ),
        "{}",
        report.text
    );

    let once = d.join("w1.json");
    run(&[
        "sign",
        "--key",
        s(&exec_key),
        "--in",
        s(&unsigned),
        "--out",
        s(&once),
    ])
    .unwrap();
    // A warrant names its targets: only its owner may read the file.
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&once).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // A file that cannot be written (here a directory) is
    // `output_unwritable`, and leaves no partial file behind.
    let taken = d.join("taken");
    std::fs::create_dir(&taken).unwrap();
    let e = run(&[
        "sign",
        "--key",
        s(&exec_key),
        "--in",
        s(&unsigned),
        "--out",
        s(&taken),
    ])
    .unwrap_err();
    assert_eq!(
        e.downcast_ref::<lavd::cli::Refused>().map(|r| r.code),
        Some("output_unwritable"),
        "{e:#}"
    );
    assert!(!taken.with_extension("partial-download").exists());
    let report = inspect(&[
        "inspect",
        s(&once),
        "--trust",
        s(&trust),
        "--at",
        at,
        "--agency",
        agency,
    ]);
    match &report.verdict {
        Verdict::Refused { code, message } => {
            assert_eq!(*code, "policy_not_met");
            assert_eq!(
                message,
                "warrant policy not met: needs 1 judicial (found 0)"
            );
        }
        other => panic!("expected refusal, got {other:?}\n{}", report.text),
    }
    assert!(report.text.contains("home-office-1"), "{}", report.text);
    assert!(
        report
            .text
            .contains("verdict: refused at 2026-11-25T12:00:00Z: policy_not_met"),
        "{}",
        report.text
    );
    // `run` fails with the exact code, so `main` exits non-zero.
    let err = run(&["inspect", s(&once), "--trust", s(&trust), "--at", at]).unwrap_err();
    let refused = err.downcast_ref::<NotAccepted>().unwrap();
    assert_eq!(refused.code, "policy_not_met");

    // The same authority cannot sign twice.
    let err = run(&["sign", "--key", s(&exec_key), "--in", s(&once)]).unwrap_err();
    assert_eq!(
        lavd::cli::error_code(&err),
        Some("already_signed"),
        "{err:#}"
    );

    // The judicial authority signs what it reviewed: the digest inspect
    // printed. Another digest signs nothing.
    let reviewed = inspect(&["inspect", s(&once)]);
    let digest = reviewed
        .text
        .lines()
        .find_map(|l| l.strip_prefix("digest")?.trim().strip_prefix("sha-256 "))
        .unwrap()
        .to_string();
    let twice = d.join("w2.json");
    let sign_expecting = |expected: &str| {
        run(&[
            "sign",
            "--key",
            s(&jud_key),
            "--in",
            s(&once),
            "--out",
            s(&twice),
            "--expect-digest",
            expected,
        ])
    };
    // Another digest; and one that begins with `-` (base64url, one in 64),
    // which is the value, not an unknown option (this test failed on such
    // digests before).
    for other in [
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "-Zm9vAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let err = sign_expecting(other).unwrap_err();
        assert_eq!(
            lavd::cli::error_code(&err),
            Some("digest_mismatch"),
            "{err:#}"
        );
        assert!(!twice.exists());
    }
    // A digest left out (the next option taken as it) is refused by its
    // shape, as clap refuses any bad value.
    let parsed = Cli::try_parse_from([
        "lavd-warrant",
        "sign",
        "--key",
        s(&jud_key),
        "--in",
        s(&once),
        "--expect-digest",
        "--out",
    ]);
    let e = parsed.unwrap_err().to_string();
    assert!(e.contains("not a SHA-256 digest"), "{e}");
    sign_expecting(&digest).unwrap();
    let report = inspect(&[
        "inspect",
        s(&twice),
        "--trust",
        s(&trust),
        "--at",
        at,
        "--agency",
        agency,
    ]);
    assert_eq!(report.verdict, Verdict::Accepted, "{}", report.text);
    assert!(report.text.contains("OP-2026-0042"));
    assert!(report.text.contains("ipc-judicial-3"));
    run(&["inspect", s(&twice), "--trust", s(&trust), "--at", at]).unwrap();

    // The second signature did not disturb the first: the payload and the
    // executive's signature are byte-for-byte those of w1.
    let v1: serde_json::Value = serde_json::from_slice(&std::fs::read(&once).unwrap()).unwrap();
    let v2: serde_json::Value = serde_json::from_slice(&std::fs::read(&twice).unwrap()).unwrap();
    assert_eq!(v1["payload"], v2["payload"]);
    assert_eq!(v1["signatures"][0], v2["signatures"][0]);

    // The daemon's refusals come through inspect with their codes.
    let report = inspect(&[
        "inspect",
        s(&twice),
        "--trust",
        s(&trust),
        "--at",
        at,
        "--agency",
        "spiffe://agency.example/lea/unit-8",
    ]);
    assert!(matches!(
        report.verdict,
        Verdict::Refused {
            code: "agency_mismatch",
            ..
        }
    ));
    let report = inspect(&[
        "inspect",
        s(&twice),
        "--trust",
        s(&trust),
        "--at",
        "2026-12-24T00:00:00Z",
    ]);
    assert!(matches!(
        report.verdict,
        Verdict::Refused {
            code: "warrant_expired",
            ..
        }
    ));
    // Without a trust config nothing is claimed.
    let report = inspect(&["inspect", s(&twice)]);
    assert_eq!(report.verdict, Verdict::NotChecked);
}

#[test]
fn new_from_claims_file_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipient = P256PrivateKey::generate().unwrap();
    let claims = serde_json::json!({
        "id": "OP-7",
        "legal_basis": "s.19",
        "agency": "spiffe://agency.example/lea/unit-7",
        "recipient": recipient.public().to_jwk(),
        "targets": ["acct:alice@example.com"],
        "window": {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"},
        "not_before": "2026-11-24T00:00:00Z",
        "expires": "2026-12-24T00:00:00Z",
        "max_unwraps": 1,
        "emergency": true
    });
    let claims_path = d.join("claims.json");
    std::fs::write(&claims_path, claims.to_string()).unwrap();
    let out = d.join("w.json");
    run(&["new", "--claims", s(&claims_path), "--out", s(&out)]).unwrap();
    let jws: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(jws["signatures"], serde_json::json!([]));
    assert_eq!(
        lavd::codec::b64_decode(jws["payload"].as_str().unwrap()).unwrap(),
        claims.to_string().into_bytes()
    );

    // Claims and flags do not mix.
    let mut argv = vec![
        "lavd-warrant",
        "new",
        "--claims",
        s(&claims_path),
        "--id",
        "x",
    ];
    argv.push("--emergency");
    assert!(Cli::try_parse_from(argv).is_err());

    // Bad claims are refused with the daemon's code.
    let mut bad = claims.clone();
    bad["targets"] = serde_json::json!([]);
    std::fs::write(&claims_path, bad.to_string()).unwrap();
    let err = run(&["new", "--claims", s(&claims_path)]).unwrap_err();
    assert_eq!(
        lavd::cli::error_code(&err),
        Some("malformed_warrant"),
        "{err}"
    );

    // The recipient must be a public key: an agency's private key file is refused.
    let private = d.join("agency.jwk");
    std::fs::write(
        &private,
        serde_json::to_string(&recipient.to_private_jwk()).unwrap(),
    )
    .unwrap();
    let mut args = vec!["new", "--recipient", s(&private)];
    args.extend_from_slice(NEW_FLAGS);
    let err = run(&args).unwrap_err();
    assert!(err.to_string().contains("private key"), "{err}");

    // A missing flag is named.
    let public = d.join("agency.pub.jwk");
    std::fs::write(
        &public,
        serde_json::to_string(&recipient.public().to_jwk()).unwrap(),
    )
    .unwrap();
    let err = run(&["new", "--recipient", s(&public), "--id", "x"]).unwrap_err();
    assert!(err.to_string().contains("--legal-basis"), "{err}");

    // Signing needs a key with a kid.
    let mut no_kid = lavd::warrant::AuthorityKey::generate(lavd::warrant::Algorithm::Es256, "k")
        .unwrap()
        .private_jwk()
        .unwrap();
    no_kid.kid = None;
    let key = d.join("nokid.jwk");
    std::fs::write(&key, serde_json::to_string(&no_kid).unwrap()).unwrap();
    std::fs::write(&claims_path, claims.to_string()).unwrap();
    run(&["new", "--claims", s(&claims_path), "--out", s(&out)]).unwrap();
    let err = run(&["sign", "--key", s(&key), "--in", s(&out)]).unwrap_err();
    assert!(format!("{err:#}").contains("no `kid`"), "{err:#}");
}

/// A flag `new` needs, or an unknown `--alg` for `keygen`, is a usage
/// error (`usage`, exit 2 from `main`) naming the flag, as clap's own are.
#[test]
fn missing_flags_and_an_unknown_alg_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = run(&["new", "--id", "x"]).unwrap_err();
    assert_eq!(lavd::cli::error_code(&e), Some("usage"), "{e:#}");
    assert!(
        format!("{e:#}").contains("--legal-basis is required"),
        "{e:#}"
    );
    let out = dir.path().join("k.jwk");
    let e = run(&["keygen", "--alg", "RS256", "--kid", "k", "--out", s(&out)]).unwrap_err();
    assert_eq!(lavd::cli::error_code(&e), Some("usage"), "{e:#}");
    assert!(format!("{e:#}").starts_with("--alg: "), "{e:#}");
    assert!(!out.exists());
    // One file for both halves: refused before anything is written (the
    // public half was renamed over the private one, exit 0).
    let e = run(&[
        "keygen",
        "--kid",
        "k",
        "--out",
        s(&out),
        "--public-out",
        s(&out),
    ])
    .unwrap_err();
    assert_eq!(lavd::cli::error_code(&e), Some("usage"), "{e:#}");
    assert!(format!("{e:#}").contains("the same file"), "{e:#}");
    assert!(!out.exists());
    // Another spelling of one path (`d/../k.jwk`), or the public half's
    // temporary file (`k.partial-download`, removed before it is written):
    // refused, and nothing left. Before, the private key was replaced or
    // removed, exit 0.
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let dotted = dir.path().join("d").join("..").join("k.jwk");
    let temporary = dir.path().join("k.partial-download");
    for (private, public) in [(&out, &dotted), (&temporary, &out)] {
        let e = run(&[
            "keygen",
            "--kid",
            "k",
            "--out",
            s(private),
            "--public-out",
            s(public),
        ])
        .unwrap_err();
        assert_eq!(lavd::cli::error_code(&e), Some("usage"), "{e:#}");
        assert!(format!("{e:#}").contains("--out is --public-out"), "{e:#}");
        assert!(!private.exists() && !public.exists());
    }
}

/// `keygen --alg ECDH-ES` makes an agency's recipient key: a P-256 pair
/// marked for key agreement, whose public half `new --recipient` takes and
/// whose private half opens (its public key is the one in the warrant).
#[test]
fn keygen_makes_a_recipient_key_that_new_takes() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = (dir.path().join("r.jwk"), dir.path().join("r.pub.jwk"));
    run(&[
        "keygen",
        "--alg",
        "ECDH-ES",
        "--kid",
        "agency-recipient-1",
        "--out",
        s(&private),
        "--public-out",
        s(&public),
    ])
    .unwrap();
    let public_jwk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&public).unwrap()).unwrap();
    assert_eq!(public_jwk["use"], "enc");
    assert_eq!(public_jwk["alg"], "ECDH-ES");
    assert_eq!(public_jwk["kid"], "agency-recipient-1");
    assert!(public_jwk.get("d").is_none());
    let key = lavd::jwk::P256PrivateKey::from_jwk(
        &lavd::jwk::Jwk::from_json(&std::fs::read(&private).unwrap()).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("w.json");
    let mut args: Vec<&str> = vec!["new"];
    args.extend_from_slice(NEW_FLAGS);
    args.extend_from_slice(&["--recipient", s(&public), "--out", s(&out)]);
    run(&args).unwrap();
    let jws: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&lavd::codec::b64_decode(jws["payload"].as_str().unwrap()).unwrap())
            .unwrap();
    let recipient = lavd::jwk::P256PublicKey::from_jwk(
        &lavd::jwk::Jwk::from_json(claims["recipient"].to_string().as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(recipient, *key.public());
}

/// A time flag that is not RFC 3339 UTC is a usage error naming the flag;
/// a recipient that is not a public P-256 JWK is `recipient_key_malformed`,
/// an authority key file that is not a JWK `invalid_authority_key`. Before,
/// each was `command_failed`.
#[test]
fn bad_times_and_key_files_have_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let recipient = write_recipient(dir.path());
    let out = dir.path().join("w.jws");
    let new_with = |flag: &str, value: &str, recipient: &Path| {
        let mut args: Vec<&str> = vec!["new"];
        args.extend_from_slice(NEW_FLAGS);
        if let Some(at) = args.iter().position(|a| *a == flag) {
            args[at + 1] = value;
        }
        args.extend_from_slice(&["--recipient", s(recipient), "--out", s(&out)]);
        run(&args).unwrap_err()
    };
    let e = new_with("--window-from", "2026-11-01 00:00", &recipient);
    assert_eq!(lavd::cli::error_code(&e), Some("usage"), "{e:#}");
    assert!(
        format!("{e:#}").starts_with("--window-from `2026-11-01 00:00`: "),
        "{e:#}"
    );
    // Read before its `--at`: a file, whatever it holds.
    let some = dir.path().join("some.jws");
    std::fs::write(&some, "x").unwrap();
    let e = match cmd(&["inspect", "--at", "yesterday", s(&some)]) {
        WarrantCommand::Inspect(a) => a.report().unwrap_err(),
        other => panic!("not inspect: {other:?}"),
    };
    assert_eq!(lavd::cli::error_code(&e), Some("usage"), "{e:#}");
    assert!(format!("{e:#}").starts_with("--at `yesterday`: "), "{e:#}");

    let private = dir.path().join("agency.jwk");
    std::fs::write(
        &private,
        serde_json::to_string(&P256PrivateKey::generate().unwrap().to_private_jwk()).unwrap(),
    )
    .unwrap();
    let not_json = dir.path().join("not.jwk");
    std::fs::write(&not_json, "not json").unwrap();
    // A signing key (an authority's, from `keygen --alg ES256`) or an
    // escrow key is no recipient: the flag takes what the claims take
    // (helper-219's 1: it took them, dropping their members, and results
    // were sealed to a key no agency opens with).
    let signing = dir.path().join("signing.pub.jwk");
    let e = run(&[
        "keygen",
        "--kid",
        "exec-9",
        "--out",
        s(&dir.path().join("signing.jwk")),
        "--public-out",
        s(&signing),
    ]);
    e.unwrap();
    let public = P256PrivateKey::generate().unwrap().public().to_jwk();
    let with = |name: &str, member: &str, value: &str| {
        let path = dir.path().join(name);
        let mut jwk = serde_json::to_value(&public).unwrap();
        jwk[member] = serde_json::Value::String(value.into());
        std::fs::write(&path, jwk.to_string()).unwrap();
        path
    };
    let use_sig = with("use-sig.jwk", "use", "sig");
    let alg_es256 = with("alg.jwk", "alg", "ES256");
    let escrow = with("escrow.jwk", "lav_suite", "16-1-2");
    for (file, says) in [
        (&private, "private key (`d`)"),
        (&not_json, "recipient "),
        (&signing, "`recipient.use` must be \"enc\""),
        (&use_sig, "`recipient.use` must be \"enc\""),
        (&alg_es256, "`recipient.alg` must name key agreement"),
        (&escrow, "`recipient.lav_suite` is not a member"),
    ] {
        let e = new_with("--id", "OP-2026-0042", file);
        assert_eq!(
            lavd::cli::error_code(&e),
            Some("recipient_key_malformed"),
            "{e:#}"
        );
        assert!(format!("{e:#}").contains(says), "{e:#}");
    }
    assert!(!out.exists());

    let e = run(&["sign", "--key", s(&not_json), "--in", s(&out)]).unwrap_err();
    assert_eq!(
        lavd::cli::error_code(&e),
        Some("invalid_authority_key"),
        "{e:#}"
    );
}

/// `lavd warrant new` writes the instants it was given, fraction and all,
/// and `lavd warrant inspect` shows them as the verifier enforces them.
/// Before, both dropped the fraction: `--window-from …00.7Z` was signed as
/// `…00Z`, 0.7 s earlier than asked.
#[test]
fn new_and_inspect_keep_fractional_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipient = write_recipient(d);
    let flags: Vec<&str> = NEW_FLAGS
        .iter()
        .map(|f| match *f {
            "2026-11-01T00:00:00Z" => "2026-11-01T00:00:00.7Z",
            "2026-12-24T00:00:00Z" => "2026-12-24T00:00:00.500Z",
            other => other,
        })
        .collect();
    let unsigned = d.join("w0.json");
    let mut args = vec!["new", "--recipient", s(&recipient), "--out", s(&unsigned)];
    args.extend_from_slice(&flags);
    run(&args).unwrap();
    let jws: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&unsigned).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&lavd::codec::b64_decode(jws["payload"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(claims["window"]["from"], "2026-11-01T00:00:00.7Z");
    assert_eq!(claims["expires"], "2026-12-24T00:00:00.5Z");
    assert_eq!(claims["not_before"], "2026-11-24T00:00:00Z");
    let report = inspect(&["inspect", s(&unsigned)]);
    assert!(
        report
            .text
            .contains("[2026-11-01T00:00:00.7Z, 2026-12-01T00:00:00Z)"),
        "{}",
        report.text
    );
    assert!(
        report
            .text
            .contains("[2026-11-24T00:00:00Z, 2026-12-24T00:00:00.5Z)"),
        "{}",
        report.text
    );
}

/// `inspect` shows the first ten targets and how many more; with
/// `--all-targets`, every one, so that an authority sees all it authorises.
#[test]
fn inspect_shows_every_target_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipient = write_recipient(d);
    let targets: Vec<String> = (1..=12).map(|i| format!("acct:t{i}@example.com")).collect();
    let out = d.join("w.json");
    let mut args = vec!["new", "--recipient", s(&recipient), "--out", s(&out)];
    let mut flags: Vec<&str> = NEW_FLAGS.to_vec();
    // NEW_FLAGS' two targets, then twelve more.
    for t in &targets {
        flags.push("--target");
        flags.push(t);
    }
    args.extend_from_slice(&flags);
    run(&args).unwrap();
    let short = inspect(&["inspect", s(&out)]).text;
    assert!(
        short.contains("targets      14: ") && short.contains("(4 more)"),
        "{short}"
    );
    assert!(!short.contains("acct:t12@example.com"), "{short}");
    let all = inspect(&["inspect", s(&out), "--all-targets"]).text;
    assert!(all.contains("acct:t12@example.com"), "{all}");
    assert!(!all.contains("more)"), "{all}");
}
