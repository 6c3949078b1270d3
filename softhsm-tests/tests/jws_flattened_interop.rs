//! A warrant and an authority revocation signed by an independent JOSE
//! implementation (Python `jwcrypto`, which writes a one-signature JWS in
//! the flattened JSON serialization, RFC 7515 §7.2.2) are accepted by a real
//! `lavd serve` over mTLS (PROTOCOL §8); an object mixing the flattened and
//! General forms is refused `malformed_warrant`. A double-lock warrant
//! jwcrypto signs with both authorities, ES256 and EdDSA (Ed25519, RFC
//! 8037), in the General form it writes for two signatures, unwraps too.
//!
//! Every leaf the run logged (authorities, key, unwraps, refusals, the
//! revocation with a reason of quotes, a backslash and characters beyond
//! ASCII and the BMP) is byte for byte what an independent RFC 8785 (JCS)
//! encoder, Python `rfc8785`, writes for it: PROTOCOL §6's canonical JSON
//! (`interop/jcs_check.py`).
//!
//! jwcrypto and rfc8785 live in the venv that `.ci/setup --tests` makes;
//! this test installs nothing, and fails (never skips) when the venv is
//! missing.

use std::path::Path;
use std::process::Command;

use softhsm_tests::server::{authorities, serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{interop_python, TestToken};
use time::{Duration, OffsetDateTime};

/// Signs the payload bytes of file argv[1] with each private JWK file of
/// argv[2..] (`alg:kid:path`), in turn, and prints jwcrypto's JSON
/// serialization (flattened for one signature, General for more).
const SIGN: &str = r#"
import json, sys
from jwcrypto import jwk, jws
token = jws.JWS(open(sys.argv[1], "rb").read())
for spec in sys.argv[2:]:
    alg, kid, path = spec.split(":", 2)
    token.add_signature(jwk.JWK.from_json(open(path).read()), alg=alg,
                        protected=json.dumps({"alg": alg, "kid": kid}))
sys.stdout.write(token.serialize())
"#;

/// jwcrypto's JWS over `payload`, signed by each of `keys` in turn.
fn jwcrypto(
    dir: &Path,
    payload: &[u8],
    keys: &[&lavd::warrant::AuthorityKey],
) -> serde_json::Value {
    let data = dir.join("payload");
    std::fs::write(&data, payload).unwrap();
    let mut specs = Vec::new();
    for key in keys {
        let file = dir.join(format!("{}.jwk", key.kid()));
        std::fs::write(
            &file,
            serde_json::to_string(&key.private_jwk().unwrap()).unwrap(),
        )
        .unwrap();
        specs.push(format!(
            "{}:{}:{}",
            key.alg().name(),
            key.kid(),
            file.display()
        ));
    }
    let out = Command::new(interop_python())
        .args(["-c", SIGN])
        .arg(&data)
        .args(&specs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "jwcrypto: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// jwcrypto's JWS over `payload` signed by both of the harness's
/// authorities (ES256 `executive-1`, EdDSA `judicial-1`): the General form.
fn jwcrypto_double_lock(dir: &Path, payload: &[u8]) -> serde_json::Value {
    let a = authorities();
    let jws = jwcrypto(dir, payload, &[&a.executive, &a.judicial]);
    let algs: Vec<String> = jws["signatures"]
        .as_array()
        .unwrap_or_else(|| panic!("not the General form: {jws}"))
        .iter()
        .map(|s| {
            let protected = lavd::codec::b64_decode(s["protected"].as_str().unwrap()).unwrap();
            let header: serde_json::Value = serde_json::from_slice(&protected).unwrap();
            header["alg"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(algs, ["ES256", "EdDSA"], "{jws}");
    jws
}

/// jwcrypto's JWS over `payload`, signed by the harness's executive
/// authority (ES256, `executive-1`): the flattened form.
fn jwcrypto_sign(dir: &Path, payload: &[u8]) -> serde_json::Value {
    let jws = jwcrypto(dir, payload, &[&authorities().executive]);
    let mut members: Vec<&str> = jws
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    members.sort_unstable();
    assert_eq!(members, ["payload", "protected", "signature"], "{jws}");
    jws
}

#[test]
fn a_flattened_jws_from_jwcrypto_unwraps_and_revokes() {
    let dir = tempfile::tempdir().unwrap();
    // Fail early, before any daemon, if the venv is missing.
    interop_python();
    let t = TestToken::new();
    let pki = Pki::new(&t);
    // The harness's authorities, with an emergency rule that one executive
    // signature meets.
    let config = serve_config(&vault::roles_toml())
        + "[policy.emergency]\nmax_hours = 72\n[[policy.emergency.require]]\n\
           role = \"executive\"\ncount = 1\n";
    t.write_config(&config);
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let now = OffsetDateTime::now_utc();
    let envelope = vault::seal(
        &escrow,
        "E-1",
        TARGET,
        now - Duration::hours(1),
        "m",
        &[7; 32],
    );

    let recipient = vault::recipient();
    let mut claims = vault::claims("URGENT-FLAT-1", recipient.public(), 5);
    claims["emergency"] = serde_json::Value::Bool(true);
    let warrant = jwcrypto_sign(dir.path(), claims.to_string().as_bytes());

    // Mixed with a General `signatures` member: refused whole.
    let mut mixed = warrant.clone();
    mixed["signatures"] = serde_json::json!([{
        "protected": warrant["protected"],
        "signature": warrant["signature"],
    }]);
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": mixed, "envelopes": [envelope]}),
    );
    let message = r.assert_error(400, "malformed_warrant");
    assert!(message.contains("mixes"), "{message}");

    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"]);

    // A double-lock warrant, both signatures made by jwcrypto.
    let full = vault::claims("FULL-JWCRYPTO-1", recipient.public(), 5);
    let double = jwcrypto_double_lock(dir.path(), full.to_string().as_bytes());
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": double, "envelopes": [envelope]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"]);

    // The executive revokes it with a flattened JWS too.
    let revocation = serde_json::json!({
        "id": "URGENT-FLAT-1",
        "reason": "signed in \"error\" \\ by the café ☕ 𝄞",
        "time": lavd::codec::format_time(now),
    });
    let signed = jwcrypto_sign(dir.path(), revocation.to_string().as_bytes());
    let r = vault::post(
        &c.provider,
        "/v1/warrants/revocations",
        &serde_json::json!({ "revocation": signed }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revoked"], true);
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
    );
    r.assert_error(403, "warrant_revoked");

    // Every leaf, through the independent JCS encoder.
    let leaves = vault::entries(&c.auditor, 0, vault::tree_size(&c.auditor));
    let file = dir.path().join("leaves");
    let lines: String = leaves
        .iter()
        .map(|e| lavd::codec::b64_encode(&e.bytes) + "\n")
        .collect();
    std::fs::write(&file, lines).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/jcs_check.py");
    let out = Command::new(interop_python())
        .arg(&script)
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for e in &leaves {
        *counts
            .entry(e.leaf["event"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let expected: String = counts.iter().map(|(k, n)| format!("{k} {n}\n")).collect();
    assert_eq!(stdout, expected, "rfc8785 read every leaf");
    for event in [
        "authorities_loaded",
        "revocation",
        "unwrap",
        "warrant_refused",
    ] {
        assert!(counts.contains_key(event), "no {event} leaf: {counts:?}");
    }
    assert!(
        leaves
            .iter()
            .any(|e| e.leaf["reason"] == "signed in \"error\" \\ by the café ☕ 𝄞"),
        "the revocation's reason, as given"
    );
}
