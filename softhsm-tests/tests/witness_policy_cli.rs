//! `lavd audit verify --policy FILE` (C2SP tlog-policy) on a real export:
//! the checkpoint must be signed by a log the policy names and cosigned by a
//! quorum of its witnesses (C2SP tlog-cosignature, Ed25519 `cosignature/v1`).
//! The cosignatures here are made by ed25519-dalek from the spec's message
//! format, independently of lavd's signing code; each refusal asserts its
//! exact code.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use softhsm_tests::vault;
use softhsm_tests::{assert_fails_with, assert_ok, TestToken};

/// A witness: its signing key and its `cosignature/v1` vkey, written out by
/// hand from the spec (type 0x04).
fn witness(name: &str, seed: u8) -> (ed25519_dalek::SigningKey, u32, String) {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let (id, vkey) = vkey(name, 0x04, &sk.verifying_key().to_bytes());
    (sk, id, vkey)
}

/// The key ID and vkey of `name`'s key of signature type `kind`, written
/// out by hand from C2SP signed-note and tlog-cosignature (key ID over
/// name ‖ 0x0A ‖ type ‖ key).
fn vkey(name: &str, kind: u8, public: &[u8]) -> (u32, String) {
    let mut input = name.as_bytes().to_vec();
    input.extend_from_slice(&[0x0A, kind]);
    input.extend_from_slice(public);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
    let id = u32::from_be_bytes(digest.as_ref()[..4].try_into().unwrap());
    let mut typed = vec![kind];
    typed.extend_from_slice(public);
    (id, format!("{name}+{id:08x}+{}", STANDARD.encode(typed)))
}

/// The time the tests' cosignatures are stamped at unless they say:
/// 2025-11-24, long before any run of this test.
const OLD: u64 = 1_764_000_000;

/// `checkpoint` with a cosignature line by the witness appended.
fn cosign(checkpoint: &str, name: &str, sk: &ed25519_dalek::SigningKey, id: u32) -> String {
    cosign_at(checkpoint, name, sk, id, OLD)
}

/// [`cosign`], stamped at `time` (Unix seconds).
fn cosign_at(
    checkpoint: &str,
    name: &str,
    sk: &ed25519_dalek::SigningKey,
    id: u32,
    time: u64,
) -> String {
    let body = &checkpoint[..checkpoint.rfind("\n\n").unwrap() + 1];
    let message = format!("cosignature/v1\ntime {time}\n{body}");
    let mut bytes = id.to_be_bytes().to_vec();
    bytes.extend_from_slice(&time.to_be_bytes());
    bytes.extend_from_slice(&sk.sign(message.as_bytes()).to_bytes());
    format!("{checkpoint}\u{2014} {name} {}\n", STANDARD.encode(bytes))
}

/// The log's verifier key and an export of it (`lavd audit export`, of an
/// empty store made for it: an export makes no store).
struct Exported {
    key: String,
    path: std::path::PathBuf,
    export: serde_json::Value,
    checkpoint: String,
}

fn exported(t: &TestToken) -> Exported {
    let key = assert_ok(&t.lavd_with_config(&["audit", "key"]))
        .trim()
        .to_string();
    let path = t.path("export.json");
    assert_ok(&t.lavd_with_config(&["store", "migrate", "--new"]));
    assert_ok(&t.lavd_with_config(&["audit", "export", "--out", path.to_str().unwrap()]));
    let export: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let checkpoint = export["checkpoint"].as_str().unwrap().to_string();
    Exported {
        key,
        path,
        export,
        checkpoint,
    }
}

#[test]
fn verify_with_a_policy_requires_the_witness_quorum() {
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    vault::generate_escrow_key(&t, "E-1");
    let Exported {
        key,
        path: export_path,
        export,
        checkpoint,
    } = exported(&t);

    let (a_sk, a_id, a_vkey) = witness("witness-a.example", 1);
    let (b_sk, b_id, b_vkey) = witness("witness-b.example", 2);
    let write = |name: &str, text: &str| {
        let path = t.path(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let with_checkpoint = |name: &str, checkpoint: &str| {
        let mut e = export.clone();
        e["checkpoint"] = checkpoint.into();
        write(name, &e.to_string())
    };
    let quorum2 = write(
        "quorum2.policy",
        &format!(
            "log {key}\nwitness A {a_vkey}\nwitness B {b_vkey}\ngroup both all A B\nquorum both\n"
        ),
    );
    let verify = |export: &str, policy: &str| {
        t.lavd(&[
            "audit", "verify", "--key", &key, "--export", export, "--policy", policy,
        ])
    };

    // No witness has cosigned: refused.
    let plain = export_path.to_str().unwrap();
    assert_fails_with(&verify(plain, &quorum2), 1, "quorum_not_met");
    // One of two: still refused.
    let one = with_checkpoint(
        "one.json",
        &cosign(&checkpoint, "witness-a.example", &a_sk, a_id),
    );
    assert_fails_with(&verify(&one, &quorum2), 1, "quorum_not_met");
    // Both: verifies, with the usual summary.
    let both_checkpoint = cosign(
        &cosign(&checkpoint, "witness-a.example", &a_sk, a_id),
        "witness-b.example",
        &b_sk,
        b_id,
    );
    let both = with_checkpoint("both.json", &both_checkpoint);
    let out = assert_ok(&verify(&both, &quorum2));
    assert!(out.contains("verdict: the log verifies"), "{out}");
    // A line that claims to be B's but is signed by another key.
    let (mallory, _, _) = witness("mallory.example", 3);
    let forged = with_checkpoint(
        "forged.json",
        &cosign(
            &cosign(&checkpoint, "witness-a.example", &a_sk, a_id),
            "witness-b.example",
            &mallory,
            b_id,
        ),
    );
    assert_fails_with(&verify(&forged, &quorum2), 1, "cosignature_invalid");
    // A policy naming another key for the same origin: not this log.
    let origin = key.split('+').next().unwrap();
    let impostor = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let impostor =
        lavd::audit::note::verifier_key(origin, impostor.verifying_key().as_bytes()).unwrap();
    let other_log = write(
        "other-log.policy",
        &format!("log {impostor}\nquorum none\n"),
    );
    assert_fails_with(&verify(plain, &other_log), 1, "unknown_log");
    // `quorum none` and this log: no witness needed.
    let none = write("none.policy", &format!("log {key}\nquorum none\n"));
    assert_ok(&verify(plain, &none));
    // A malformed policy names its line.
    let bad = write("bad.policy", &format!("log {key}\nquorum nobody\n"));
    let stderr = assert_fails_with(&verify(plain, &bad), 1, "bad_policy");
    assert!(stderr.contains("line 2"), "{stderr}");

    // A policy shared with verifiers that know ML-DSA witnesses (C2SP
    // tlog-cosignature's type 0x06, a 1312-byte ML-DSA-44 key; its vkey
    // written by hand): the witness is named and never counted, with a
    // warning, and its line in the note (2,432 bytes: key ID, time,
    // signature) is ignored, as signed-note's verifiers ignore lines of
    // keys they do not know. Before, the policy was refused whole.
    let (c_id, c_vkey) = vkey("witness-c.example", 0x06, &[0x42; 1312]);
    let mut c_line = c_id.to_be_bytes().to_vec();
    c_line.extend_from_slice(&[0x33; 8 + 2420]);
    let with_c = format!(
        "{}— witness-c.example {}\n",
        cosign(&checkpoint, "witness-a.example", &a_sk, a_id),
        STANDARD.encode(c_line)
    );
    let with_c = with_checkpoint("with-c.json", &with_c);
    let either = write(
        "either.policy",
        &format!("log {key}\nwitness A {a_vkey}\nwitness C {c_vkey}\ngroup g any A C\nquorum g\n"),
    );
    let out = verify(&with_c, &either);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = assert_ok(&out);
    assert!(stdout.contains("verdict: the log verifies"), "{stdout}");
    assert!(
        stderr.contains("witness=C")
            && stderr.contains("key_type=0x06")
            && stderr.contains("not counted"),
        "{stderr}"
    );
    // A log line of that type too (C2SP tlog-checkpoint: a log may sign
    // with any type, ML-DSA-44 recommended): named, warned of, lavd's own
    // line verifies the checkpoint.
    let (_, mldsa_log) = vkey("other-log.example", 0x06, &[0x24; 1312]);
    let two_logs = write(
        "two-logs.policy",
        &format!("log {key}\nlog {mldsa_log}\nwitness A {a_vkey}\nquorum A\n"),
    );
    let out = verify(&with_c, &two_logs);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ok(&out);
    assert!(
        stderr.contains("log=other-log.example") && stderr.contains("unknown_log"),
        "{stderr}"
    );
    let needs_c = write(
        "needs-c.policy",
        &format!("log {key}\nwitness A {a_vkey}\nwitness C {c_vkey}\ngroup g all A C\nquorum g\n"),
    );
    assert_fails_with(&verify(&with_c, &needs_c), 1, "quorum_not_met");
}

/// The witnesses' clocks show how fresh a checkpoint is (C2SP
/// tlog-cosignature: a cosignature says the checkpoint was the largest tree
/// its witness had seen as of its time). `verify` prints each witness's
/// time and the quorum's; `--max-cosignature-age` refuses a checkpoint the
/// quorum last vouched for earlier (`checkpoint_stale`: a mirror that keeps
/// serving an old view); a cosignature stamped well past this machine's
/// clock is set aside and not counted, and refused
/// (`cosignature_in_future`) only when the quorum needs it.
#[test]
fn verify_judges_the_cosignatures_times() {
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    let Exported {
        key,
        path: export_path,
        export,
        checkpoint,
    } = exported(&t);
    let (a_sk, a_id, a_vkey) = witness("witness-a.example", 1);
    let (b_sk, b_id, b_vkey) = witness("witness-b.example", 2);
    let policy = t.path("any.policy");
    std::fs::write(
        &policy,
        format!("log {key}\nwitness A {a_vkey}\nwitness B {b_vkey}\ngroup one 1 A B\nquorum one\n"),
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let with = |name: &str, a_at: u64, b_at: u64| {
        let cosigned = cosign_at(
            &cosign_at(&checkpoint, "witness-a.example", &a_sk, a_id, a_at),
            "witness-b.example",
            &b_sk,
            b_id,
            b_at,
        );
        let mut e = export.clone();
        e["checkpoint"] = cosigned.into();
        let path = t.path(name);
        std::fs::write(&path, e.to_string()).unwrap();
        path
    };
    let verify = |export: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "audit",
            "verify",
            "--key",
            &key,
            "--export",
            export.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        t.lavd(&args)
    };

    // A cosigned long ago, B a minute ago: one of them is the quorum, so it
    // held a minute ago, and each time is shown.
    let fresh = with("fresh.json", OLD, now - 60);
    let out = assert_ok(&verify(&fresh, &["--max-cosignature-age", "3600"]));
    assert!(
        out.contains("cosigned by witness A at 2025-11-24T"),
        "{out}"
    );
    let b_time = time::OffsetDateTime::from_unix_timestamp((now - 60) as i64).unwrap();
    let b_text = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        b_time.year(),
        u8::from(b_time.month()),
        b_time.day(),
        b_time.hour(),
        b_time.minute(),
        b_time.second()
    );
    assert!(
        out.contains(&format!("cosigned by witness B at {b_text}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("witness quorum as of {b_text}")),
        "{out}"
    );
    // Both long ago: the same checkpoint, verified without a bound, is
    // refused with one.
    let stale = with("stale.json", OLD, OLD + 1);
    assert_ok(&verify(&stale, &[]));
    let stderr = assert_fails_with(
        &verify(&stale, &["--max-cosignature-age", "86400"]),
        1,
        "checkpoint_stale",
    );
    assert!(stderr.contains("2025-11-24T"), "{stderr}");
    // B ten years ahead of this machine's clock: set aside, said, and not
    // counted; A alone makes the quorum, as of its own time.
    let far = now + 10 * 365 * 86_400;
    let ahead = with("ahead.json", now - 60, far);
    let out = verify(&ahead, &["--max-cosignature-age", "3600"]);
    let stdout = assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("witness B's cosignature is stamped") && stderr.contains("not counted"),
        "{stderr}"
    );
    assert!(!stdout.contains("cosigned by witness B"), "{stdout}");
    assert!(stdout.contains("cosigned by witness A"), "{stdout}");
    assert!(
        stdout.contains(&format!("witness quorum as of {b_text}")),
        "A cosigned a minute ago: {stdout}"
    );
    // Both ahead: the quorum needs a cosignature set aside, refused with or
    // without a bound, and each named.
    let both = with("both-ahead.json", far, far + 1);
    for bound in [&[][..], &["--max-cosignature-age", "3600"][..]] {
        let stderr = assert_fails_with(&verify(&both, bound), 1, "cosignature_in_future");
        assert!(
            stderr.contains("witness `A`") && stderr.contains("witness `B`"),
            "{bound:?}: {stderr}"
        );
    }
    // Within the allowed skew: counted.
    let skewed = with("skewed.json", now + 60, now - 60);
    assert_ok(&verify(&skewed, &["--max-cosignature-age", "3600"]));
    // A bound under `quorum none` has no quorum time to judge: a usage
    // error.
    let none = t.path("none.policy");
    std::fs::write(&none, format!("log {key}\nquorum none\n")).unwrap();
    let stderr = assert_fails_with(
        &t.lavd(&[
            "audit",
            "verify",
            "--key",
            &key,
            "--export",
            export_path.to_str().unwrap(),
            "--policy",
            none.to_str().unwrap(),
            "--max-cosignature-age",
            "60",
        ]),
        2,
        "usage",
    );
    assert!(stderr.contains("quorum none"), "{stderr}");
    // The bound needs a policy (clap's own usage error).
    let plain = export_path.to_str().unwrap();
    let out = t.lavd(&[
        "audit",
        "verify",
        "--key",
        &key,
        "--export",
        plain,
        "--max-cosignature-age",
        "60",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--policy"), "{stderr}");
}
