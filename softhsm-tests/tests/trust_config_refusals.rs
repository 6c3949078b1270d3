//! Authority keys that would let one key holder, or nobody at all, meet the
//! policy are refused when the config is loaded, by the real `lavd serve` and
//! `lavd warrant inspect --trust` (exit 64, `lavd: bad_config: …`, naming the
//! entries):
//!
//! - one public key configured under two kids (it would count as two
//!   authorities and meet a double lock alone);
//! - an Ed25519 key of small order or in a non-canonical encoding (under a
//!   small-order key the constant signature R = identity, s = 0 verifies on
//!   every payload).

use lavd::codec::b64_encode;
use lavd::warrant::sign::{add_signature, unsigned_warrant};
use lavd::warrant::{Algorithm, AuthorityKey, WarrantLimits};
use softhsm_tests::server::{serve_config, Pki};
use softhsm_tests::vault::{claims, recipient, roles_toml, AGENCY};
use softhsm_tests::{assert_fails_with, lavd_command, TestToken};

const DOUBLE_LOCK: &str = "[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n\
                           [[policy.require]]\nrole = \"judicial\"\ncount = 1\n";

fn entry(kid: &str, role: &str, alg: &str, jwk: &str) -> String {
    format!(
        "[[authorities]]\nkid = \"{kid}\"\nrole = \"{role}\"\nalg = \"{alg}\"\njwk = '{jwk}'\n\
         valid_from = \"2020-01-01T00:00:00Z\"\nvalid_until = \"2100-01-01T00:00:00Z\"\n\n"
    )
}

fn public_jwk(key: &AuthorityKey) -> String {
    serde_json::to_string(&key.public_jwk().unwrap()).unwrap()
}

/// `lavd serve` on a full daemon config (TLS, roles) whose trust section is
/// `trust`; returns its output.
fn serve_with_trust(t: &TestToken, trust: &str) -> std::process::Output {
    let _pki = Pki::new(t);
    // The harness's own authorities are replaced by `trust`.
    let base = serve_config(&roles_toml());
    let cut = base.find("[[authorities]]").unwrap();
    t.write_config(&format!("{}{trust}", &base[..cut]));
    t.lavd_with_config(&["serve"])
}

fn inspect(dir: &std::path::Path, warrant: &str, trust: &str) -> std::process::Output {
    let w = dir.join("warrant.json");
    let tr = dir.join("trust.toml");
    std::fs::write(&w, warrant).unwrap();
    std::fs::write(&tr, trust).unwrap();
    lavd_command(&[
        "warrant",
        "inspect",
        w.to_str().unwrap(),
        "--trust",
        tr.to_str().unwrap(),
        "--agency",
        AGENCY,
    ])
    .output()
    .unwrap()
}

#[test]
fn one_key_under_two_kids_is_refused_at_load() {
    let executive = AuthorityKey::generate(Algorithm::Es256, "executive-1").unwrap();
    let judicial = AuthorityKey::generate(Algorithm::EdDsa, "judicial-1").unwrap();
    // The executive's own key, also configured as a judicial authority.
    let mut twin_jwk = executive.private_jwk().unwrap();
    twin_jwk.kid = Some("judicial-x".into());
    let twin = AuthorityKey::from_jwk(&twin_jwk).unwrap();
    let trust = format!(
        "{}{}{}{DOUBLE_LOCK}",
        entry("executive-1", "executive", "ES256", &public_jwk(&executive)),
        entry("judicial-1", "judicial", "EdDSA", &public_jwk(&judicial)),
        entry("judicial-x", "judicial", "ES256", &public_jwk(&twin)),
    );
    // One key holder signs twice: under a trust config that allowed it, that
    // met the double lock.
    let limits = WarrantLimits::default();
    let body = claims("OP-TWIN-1", recipient().public(), 1).to_string();
    let mut warrant = unsigned_warrant(body.as_bytes()).unwrap();
    for key in [&executive, &twin] {
        warrant = add_signature(warrant.as_bytes(), key, &limits).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let out = inspect(dir.path(), &warrant, &trust);
    let stderr = assert_fails_with(&out, 64, "bad_config");
    assert!(
        stderr.contains("authorities[2]")
            && stderr.contains("judicial-x")
            && stderr.contains("executive-1")
            && stderr.contains("authorities[0]")
            && stderr.contains("same public key"),
        "{stderr}"
    );

    let t = TestToken::new();
    let out = serve_with_trust(&t, &trust);
    let stderr = assert_fails_with(&out, 64, "bad_config");
    assert!(
        stderr.contains("judicial-x") && stderr.contains("executive-1"),
        "{stderr}"
    );
}

/// The eight points of small order on edwards25519, as listed in Chalkias,
/// Garillot, Nikolaenko, "Taming the many EdDSAs" (SSR 2020) and in
/// libsodium's blocklist; each is checked with ed25519-dalek's `is_weak`
/// below, so the list is not taken on trust.
const SMALL_ORDER_POINTS: [&str; 8] = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
];

/// y = p = 2^255 - 19: a non-canonical encoding of y = 0 (RFC 8032 §5.1.3
/// says decoding fails when y ≥ p).
const NON_CANONICAL: &str = "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";

fn okp_jwk(point: &[u8]) -> String {
    format!(
        r#"{{"kty":"OKP","crv":"Ed25519","x":"{}"}}"#,
        b64_encode(point)
    )
}

/// A JWS over `payload` signed by `executive`, plus a `judicial-1` EdDSA
/// signature that is the constant R = identity, s = 0.
fn with_constant_signature(executive: &AuthorityKey, payload: &[u8]) -> String {
    let limits = WarrantLimits::default();
    let signed = add_signature(
        unsigned_warrant(payload).unwrap().as_bytes(),
        executive,
        &limits,
    )
    .unwrap();
    let mut jws: serde_json::Value = serde_json::from_str(&signed).unwrap();
    let protected = b64_encode(br#"{"alg":"EdDSA","kid":"judicial-1"}"#);
    let mut constant = hex::decode(SMALL_ORDER_POINTS[0]).unwrap();
    constant.extend_from_slice(&[0; 32]);
    jws["signatures"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"protected": protected, "signature": b64_encode(&constant)}));
    jws.to_string()
}

#[test]
fn small_order_and_non_canonical_ed25519_keys_are_refused_at_load() {
    let executive = AuthorityKey::generate(Algorithm::Es256, "executive-1").unwrap();
    let payload = claims("OP-SMALL-ORDER-1", recipient().public(), 1).to_string();
    let forged = with_constant_signature(&executive, payload.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let trust_with = |x: &[u8]| {
        format!(
            "{}{}{DOUBLE_LOCK}",
            entry("executive-1", "executive", "ES256", &public_jwk(&executive)),
            entry("judicial-1", "judicial", "EdDSA", &okp_jwk(x)),
        )
    };
    for point in SMALL_ORDER_POINTS {
        let bytes: [u8; 32] = hex::decode(point).unwrap().try_into().unwrap();
        assert!(
            ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .unwrap()
                .is_weak(),
            "{point} is not of small order per ed25519-dalek"
        );
        let out = inspect(dir.path(), &forged, &trust_with(&bytes));
        let stderr = assert_fails_with(&out, 64, "bad_config");
        assert!(
            stderr.contains("authorities[1].jwk")
                && stderr.contains("judicial-1")
                && stderr.contains("small order"),
            "{point}: {stderr}"
        );
    }
    let out = inspect(
        dir.path(),
        &forged,
        &trust_with(&hex::decode(NON_CANONICAL).unwrap()),
    );
    let stderr = assert_fails_with(&out, 64, "bad_config");
    assert!(
        stderr.contains("authorities[1].jwk") && stderr.contains("non-canonical"),
        "{stderr}"
    );

    // The daemon refuses the identity key too.
    let t = TestToken::new();
    let identity = hex::decode(SMALL_ORDER_POINTS[0]).unwrap();
    let out = serve_with_trust(&t, &trust_with(&identity));
    let stderr = assert_fails_with(&out, 64, "bad_config");
    assert!(
        stderr.contains("authorities[1].jwk") && stderr.contains("small order"),
        "{stderr}"
    );

    // Under a real judicial key the constant signature is just a bad one.
    let judicial = AuthorityKey::generate(Algorithm::EdDsa, "judicial-1").unwrap();
    let trust = format!(
        "{}{}{DOUBLE_LOCK}",
        entry("executive-1", "executive", "ES256", &public_jwk(&executive)),
        entry("judicial-1", "judicial", "EdDSA", &public_jwk(&judicial)),
    );
    let out = inspect(dir.path(), &forged, &trust);
    assert_fails_with(&out, 1, "bad_signature");
}

/// A warrant signature bound below what the policy requires would refuse
/// every warrant: `lavd serve` refuses the config instead, naming the field.
#[test]
fn a_signature_bound_below_the_policy_is_refused() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "{}[limits]\nmax_warrant_signatures = 1\n",
        roles_toml()
    )));
    let stderr = assert_fails_with(&t.lavd_with_config(&["serve"]), 64, "bad_config");
    assert!(
        stderr.contains("limits.max_warrant_signatures") && stderr.contains("2 signatures"),
        "{stderr}"
    );
}
