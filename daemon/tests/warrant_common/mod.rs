//! Shared fixtures for the warrant tests: a set of authorities (ES256 and
//! EdDSA, current, retired and future), trust configs, claims, and a JWS
//! builder that signs *any* payload and header (the production signer refuses
//! malformed claims, and these tests need to sign them).

// Each test file uses a different subset of these helpers, and they are test
// code: a failed fixture should panic the test (clippy only recognises
// `#[test]` functions as tests).
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use lavd::codec::{b64_encode, parse_time};
use lavd::jwk::P256PrivateKey;
use lavd::warrant::{Algorithm, AuthorityKey, TrustStore, Verifier, WarrantLimits};
use time::OffsetDateTime;

/// The time most tests verify at.
pub const NOW: &str = "2026-11-25T12:00:00Z";
/// The agency identity the claims name.
pub const AGENCY: &str = "spiffe://agency.example/lea/unit-7";

pub fn t(text: &str) -> OffsetDateTime {
    parse_time(text).unwrap()
}

pub fn now() -> OffsetDateTime {
    t(NOW)
}

/// The UK double lock.
pub const DOUBLE_LOCK: &str = "[policy]
[[policy.require]]
role = \"executive\"
count = 1
[[policy.require]]
role = \"judicial\"
count = 1
";

/// The double lock plus the urgent procedure: one executive, 72 hours.
pub const DOUBLE_LOCK_WITH_EMERGENCY: &str = "[policy]
[[policy.require]]
role = \"executive\"
count = 1
[[policy.require]]
role = \"judicial\"
count = 1
[policy.emergency]
max_hours = 72
[[policy.emergency.require]]
role = \"executive\"
count = 1
";

pub struct Authorities {
    /// executive, ES256, valid now.
    pub exec1: AuthorityKey,
    /// executive, EdDSA, valid now.
    pub exec2: AuthorityKey,
    /// judicial, EdDSA, valid now.
    pub jud1: AuthorityKey,
    /// judicial, ES256, valid now.
    pub jud2: AuthorityKey,
    /// judicial, ES256, validity ended in 2025.
    pub retired: AuthorityKey,
    /// judicial, ES256, valid only from 2027.
    pub future: AuthorityKey,
    /// ES256 key that is in no trust config.
    pub stranger: AuthorityKey,
}

impl Authorities {
    pub fn new() -> Self {
        let key = |alg, kid| AuthorityKey::generate(alg, kid).unwrap();
        Self {
            exec1: key(Algorithm::Es256, "executive-1"),
            exec2: key(Algorithm::EdDsa, "executive-2"),
            jud1: key(Algorithm::EdDsa, "judicial-1"),
            jud2: key(Algorithm::Es256, "judicial-2"),
            retired: key(Algorithm::Es256, "judicial-retired"),
            future: key(Algorithm::Es256, "judicial-future"),
            stranger: key(Algorithm::Es256, "judicial-1x"),
        }
    }

    fn entry(key: &AuthorityKey, role: &str, from: &str, until: &str) -> String {
        let jwk = serde_json::to_string(&key.public_jwk().unwrap()).unwrap();
        format!(
            "[[authorities]]\nkid = \"{}\"\nrole = \"{role}\"\nalg = \"{}\"\njwk = '{jwk}'\nvalid_from = \"{from}\"\nvalid_until = \"{until}\"\n\n",
            key.kid(),
            key.alg()
        )
    }

    /// A trust config with every authority but `stranger`, and `policy`.
    pub fn trust_toml(&self, policy: &str) -> String {
        let (from, until) = ("2026-01-01T00:00:00Z", "2028-01-01T00:00:00Z");
        let mut text = String::new();
        text += &Self::entry(&self.exec1, "executive", from, until);
        text += &Self::entry(&self.exec2, "executive", from, until);
        text += &Self::entry(&self.jud1, "judicial", from, until);
        text += &Self::entry(&self.jud2, "judicial", from, until);
        text += &Self::entry(
            &self.retired,
            "judicial",
            "2024-01-01T00:00:00Z",
            "2025-01-01T00:00:00Z",
        );
        text += &Self::entry(
            &self.future,
            "judicial",
            "2027-01-01T00:00:00Z",
            "2028-01-01T00:00:00Z",
        );
        text + policy
    }

    pub fn verifier(&self, policy: &str) -> Verifier {
        let trust = TrustStore::from_toml(&self.trust_toml(policy), Path::new(".")).unwrap();
        Verifier::new(trust, WarrantLimits::default())
    }
}

/// Valid claims for `id`, executable around [`NOW`].
pub fn claims(id: &str) -> serde_json::Value {
    let recipient = P256PrivateKey::generate().unwrap().public().to_jwk();
    serde_json::json!({
        "id": id,
        "legal_basis": "Investigatory Powers Act 2016 s.19",
        "agency": AGENCY,
        "recipient": recipient,
        "targets": ["acct:alice@example.com", "acct:bob@example.com"],
        "window": {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"},
        "not_before": "2026-11-24T00:00:00Z",
        "expires": "2026-12-24T00:00:00Z",
        "max_unwraps": 10
    })
}

/// A protected header with exactly `alg` and `kid`.
pub fn header(key: &AuthorityKey) -> String {
    format!(r#"{{"alg":"{}","kid":"{}"}}"#, key.alg(), key.kid())
}

/// A General JSON JWS over `payload` with one signature per `(header, key)`,
/// each made by `key` over that exact header.
pub fn jws_raw(payload: &[u8], sigs: &[(String, &AuthorityKey)]) -> Vec<u8> {
    let payload_b64 = b64_encode(payload);
    let signatures: Vec<serde_json::Value> = sigs
        .iter()
        .map(|(h, key)| {
            let protected = b64_encode(h.as_bytes());
            let sig = key
                .sign(format!("{protected}.{payload_b64}").as_bytes())
                .unwrap();
            serde_json::json!({"protected": protected, "signature": b64_encode(sig)})
        })
        .collect();
    serde_json::json!({"payload": payload_b64, "signatures": signatures})
        .to_string()
        .into_bytes()
}

/// `payload` signed by each of `keys` with their normal headers.
pub fn signed_bytes(payload: &[u8], keys: &[&AuthorityKey]) -> Vec<u8> {
    let sigs: Vec<(String, &AuthorityKey)> = keys.iter().map(|k| (header(k), *k)).collect();
    jws_raw(payload, &sigs)
}

/// `claims` signed by each of `keys`.
pub fn signed(claims: &serde_json::Value, keys: &[&AuthorityKey]) -> Vec<u8> {
    signed_bytes(claims.to_string().as_bytes(), keys)
}
