//! PROTOCOL §4 refusal matrix: every claim violation and every signature case
//! is refused with its exact code; the double lock is enforced by distinct
//! authorities of each role; warrants signed by independent implementations
//! (the `p256` and `ed25519-dalek` crates, not our signer) are accepted.

mod warrant_common;

use std::path::Path;

use lavd::codec::b64_encode;
use lavd::jwk::P256PrivateKey;
use lavd::store::{Revocation, Store, WarrantStore};
use lavd::warrant::{
    admit, AuthorityKey, Denial, TrustStore, Verifier, WarrantError, WarrantLimits,
};
use warrant_common::*;

fn code(result: Result<lavd::warrant::VerifiedWarrant, WarrantError>) -> &'static str {
    match result {
        Ok(w) => panic!("expected a refusal, got a verified warrant {}", w.id()),
        Err(e) => e.code(),
    }
}

#[test]
fn double_lock_warrant_is_accepted() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let c = claims("W-ok");
    let payload = c.to_string();
    let bytes = signed_bytes(payload.as_bytes(), &[&a.exec1, &a.jud1]);
    let w = v.verify(&bytes, now(), AGENCY).unwrap();
    assert_eq!(w.id(), "W-ok");
    assert!(!w.is_emergency());
    let kids: Vec<&str> = w.signers().iter().map(|s| s.kid.as_str()).collect();
    assert_eq!(kids, ["executive-1", "judicial-1"]);
    // The audit digest is SHA-256 of the decoded payload bytes.
    let expected = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, payload.as_bytes());
    assert_eq!(w.digest().as_slice(), expected.as_ref());
    assert_eq!(w.usable_until(), t("2026-12-24T00:00:00Z"));
    // Signature order does not matter.
    let reversed = signed_bytes(payload.as_bytes(), &[&a.jud1, &a.exec1]);
    assert!(v.verify(&reversed, now(), AGENCY).is_ok());
}

#[test]
fn every_claim_violation_is_malformed() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let private_recipient = P256PrivateKey::generate().unwrap().to_private_jwk();
    let mut off_curve = P256PrivateKey::generate().unwrap().public().to_jwk();
    off_curve.y = Some(b64_encode([7u8; 32]));
    let ed_recipient = AuthorityKey::generate(lavd::warrant::Algorithm::EdDsa, "x")
        .unwrap()
        .public_jwk()
        .unwrap();
    let many_targets: Vec<String> = (0..1001).map(|i| format!("acct:{i}@example.com")).collect();

    type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, &str, Mutation)> = vec![
        (
            "missing id",
            "id",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("id");
            }),
        ),
        ("empty id", "id", Box::new(|c| c["id"] = "".into())),
        (
            "129-char id",
            "id",
            Box::new(|c| c["id"] = "x".repeat(129).into()),
        ),
        (
            "control char in id",
            "id",
            Box::new(|c| c["id"] = "W\n1".into()),
        ),
        ("id not a string", "", Box::new(|c| c["id"] = 7.into())),
        (
            "missing legal_basis",
            "legal_basis",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("legal_basis");
            }),
        ),
        (
            "empty agency",
            "agency",
            Box::new(|c| c["agency"] = "".into()),
        ),
        (
            "unknown member",
            "colour",
            Box::new(|c| c["colour"] = "red".into()),
        ),
        (
            "recipient with d",
            "recipient",
            Box::new(move |c| c["recipient"] = serde_json::to_value(&private_recipient).unwrap()),
        ),
        (
            "recipient off curve",
            "recipient",
            Box::new(move |c| c["recipient"] = serde_json::to_value(&off_curve).unwrap()),
        ),
        (
            "recipient not P-256",
            "recipient",
            Box::new(move |c| c["recipient"] = serde_json::to_value(&ed_recipient).unwrap()),
        ),
        (
            "no targets",
            "targets",
            Box::new(|c| c["targets"] = serde_json::json!([])),
        ),
        (
            "1001 targets",
            "targets",
            Box::new(move |c| c["targets"] = serde_json::json!(many_targets)),
        ),
        (
            "duplicate target",
            "targets[1]",
            Box::new(|c| c["targets"] = serde_json::json!(["a", "a"])),
        ),
        (
            "empty target",
            "targets[0]",
            Box::new(|c| c["targets"] = serde_json::json!([""])),
        ),
        (
            "oversized target",
            "targets[0]",
            Box::new(|c| c["targets"] = serde_json::json!(["t".repeat(513)])),
        ),
        (
            "window reversed",
            "window",
            Box::new(|c| {
                c["window"] = serde_json::json!({"from": "2026-12-01T00:00:00Z", "to": "2026-11-01T00:00:00Z"})
            }),
        ),
        (
            "empty window",
            "window",
            Box::new(|c| {
                c["window"] = serde_json::json!({"from": "2026-12-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"})
            }),
        ),
        (
            "window extra member",
            "until",
            Box::new(|c| c["window"]["until"] = "2026-12-01T00:00:00Z".into()),
        ),
        (
            "not_before after expires",
            "not_before",
            Box::new(|c| c["not_before"] = "2026-12-25T00:00:00Z".into()),
        ),
        (
            "time with offset",
            "",
            Box::new(|c| c["expires"] = "2026-12-24T00:00:00+01:00".into()),
        ),
        (
            "date only",
            "",
            Box::new(|c| c["not_before"] = "2026-11-24".into()),
        ),
        (
            "max_unwraps zero",
            "max_unwraps",
            Box::new(|c| c["max_unwraps"] = 0.into()),
        ),
        (
            "max_unwraps 2^53",
            "max_unwraps",
            Box::new(|c| c["max_unwraps"] = (1u64 << 53).into()),
        ),
        (
            "max_unwraps negative",
            "",
            Box::new(|c| c["max_unwraps"] = (-1).into()),
        ),
        (
            "max_unwraps float",
            "",
            Box::new(|c| c["max_unwraps"] = 1.5.into()),
        ),
        (
            "empty kids",
            "kids",
            Box::new(|c| c["kids"] = serde_json::json!([])),
        ),
        (
            "null kids",
            "",
            Box::new(|c| c["kids"] = serde_json::Value::Null),
        ),
        (
            "duplicate kid",
            "kids[1]",
            Box::new(|c| c["kids"] = serde_json::json!(["2026-11", "2026-11"])),
        ),
        (
            "emergency not bool",
            "",
            Box::new(|c| c["emergency"] = "yes".into()),
        ),
        (
            "emergency null",
            "",
            Box::new(|c| c["emergency"] = serde_json::Value::Null),
        ),
    ];
    for (name, field, mutate) in cases {
        let mut c = claims("W-bad");
        mutate(&mut c);
        let err = v
            .verify(&signed(&c, &[&a.exec1, &a.jud1]), now(), AGENCY)
            .expect_err(name);
        assert_eq!(err.code(), "malformed_warrant", "{name}: {err}");
        assert!(
            err.to_string().contains(field),
            "{name}: message `{err}` should name `{field}`"
        );
        assert!(err.is_malformed(), "{name}");
    }

    // Byte-level violations that a JSON value cannot express.
    let text = claims("W-bad").to_string();
    let duplicated = text.replacen("{\"", "{\"id\":\"W-dup\",\"", 1);
    let trailing = format!("{text}{{}}");
    for (name, payload) in [
        ("duplicate member", duplicated.as_bytes()),
        ("trailing data", trailing.as_bytes()),
        ("not JSON", b"not json".as_slice()),
        ("JSON array", b"[]".as_slice()),
        ("empty payload", b"".as_slice()),
    ] {
        let err = v
            .verify(&signed_bytes(payload, &[&a.exec1, &a.jud1]), now(), AGENCY)
            .expect_err(name);
        assert_eq!(err.code(), "malformed_warrant", "{name}: {err}");
    }
}

#[test]
fn claim_bounds_are_inclusive() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let mut c = claims(&"i".repeat(128));
    c["targets"] = serde_json::json!((0..1000)
        .map(|i| format!("acct:{i}@example.com"))
        .collect::<Vec<_>>());
    c["max_unwraps"] = ((1u64 << 53) - 1).into();
    c["kids"] = serde_json::json!(["2026-11"]);
    c["emergency"] = false.into();
    let w = v
        .verify(&signed(&c, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    assert_eq!(w.claims().targets.len(), 1000);
    assert_eq!(w.id().chars().count(), 128);
}

#[test]
fn size_limits_are_warrant_too_large() {
    let a = Authorities::new();
    let trust = TrustStore::from_toml(&a.trust_toml(DOUBLE_LOCK), Path::new(".")).unwrap();
    let bytes = signed(&claims("W-big"), &[&a.exec1, &a.jud1]);
    let v = Verifier::new(
        trust,
        WarrantLimits {
            max_warrant_bytes: bytes.len() - 1,
            max_signatures: 2,
        },
    );
    let err = v.verify(&bytes, now(), AGENCY).unwrap_err();
    assert_eq!(err.code(), "warrant_too_large");
    assert!(!err.is_malformed());

    let trust = TrustStore::from_toml(&a.trust_toml(DOUBLE_LOCK), Path::new(".")).unwrap();
    let v = Verifier::new(
        trust,
        WarrantLimits {
            max_warrant_bytes: 1 << 20,
            max_signatures: 2,
        },
    );
    assert!(v.verify(&bytes, now(), AGENCY).is_ok());
    let three = signed(&claims("W-3"), &[&a.exec1, &a.jud1, &a.jud2]);
    assert_eq!(code(v.verify(&three, now(), AGENCY)), "warrant_too_large");
}

#[test]
fn every_signature_case_has_its_code() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let c = claims("W-sig");
    let payload = c.to_string();
    let p = payload.as_bytes();
    let jud = (header(&a.jud1), &a.jud1);

    let with_exec_header = |h: &str| jws_raw(p, &[(h.to_string(), &a.exec1), jud.clone()]);
    assert_eq!(
        code(v.verify(
            &with_exec_header(r#"{"alg":"none","kid":"executive-1"}"#),
            now(),
            AGENCY
        )),
        "unsupported_algorithm"
    );
    assert_eq!(
        code(v.verify(
            &with_exec_header(r#"{"alg":"HS256","kid":"executive-1"}"#),
            now(),
            AGENCY
        )),
        "unsupported_algorithm"
    );
    assert_eq!(
        code(v.verify(
            &with_exec_header(r#"{"alg":"ES384","kid":"executive-1"}"#),
            now(),
            AGENCY
        )),
        "unsupported_algorithm"
    );
    assert_eq!(
        code(v.verify(
            &with_exec_header(r#"{"alg":"ES256","kid":"executive-1","crit":["lav"],"lav":1}"#),
            now(),
            AGENCY
        )),
        "crit_not_supported"
    );
    assert_eq!(
        code(v.verify(
            &with_exec_header(
                r#"{"alg":"ES256","kid":"executive-1","jku":"https://evil.example/"}"#
            ),
            now(),
            AGENCY
        )),
        "malformed_warrant"
    );
    // Typ is allowed.
    assert!(v
        .verify(
            &with_exec_header(r#"{"alg":"ES256","kid":"executive-1","typ":"JOSE+JSON"}"#),
            now(),
            AGENCY
        )
        .is_ok());

    // Unprotected header member next to a valid protected one.
    let good = signed_bytes(p, &[&a.exec1, &a.jud1]);
    let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
    value["signatures"][0]["header"] = serde_json::json!({"kid": "executive-1"});
    assert_eq!(
        code(v.verify(value.to_string().as_bytes(), now(), AGENCY)),
        "unprotected_header"
    );

    // Unknown authority.
    assert_eq!(
        code(v.verify(&signed_bytes(p, &[&a.exec1, &a.stranger]), now(), AGENCY)),
        "unknown_authority"
    );

    // A signature that does not verify: a bit flipped in the signature.
    let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let sig =
        lavd::codec::b64_decode(value["signatures"][1]["signature"].as_str().unwrap()).unwrap();
    let mut flipped = sig.clone();
    flipped[10] ^= 1;
    value["signatures"][1]["signature"] = b64_encode(&flipped).into();
    assert_eq!(
        code(v.verify(value.to_string().as_bytes(), now(), AGENCY)),
        "bad_signature"
    );
    // A truncated signature.
    value["signatures"][1]["signature"] = b64_encode(&sig[..63]).into();
    assert_eq!(
        code(v.verify(value.to_string().as_bytes(), now(), AGENCY)),
        "bad_signature"
    );
    // The payload changed after signing.
    let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let mut changed = c.clone();
    changed["max_unwraps"] = 1000.into();
    value["payload"] = b64_encode(changed.to_string()).into();
    assert_eq!(
        code(v.verify(value.to_string().as_bytes(), now(), AGENCY)),
        "bad_signature"
    );
    // A signature copied under another authority's kid.
    let mut value: serde_json::Value =
        serde_json::from_slice(&signed_bytes(p, &[&a.exec1, &a.jud2])).unwrap();
    value["signatures"][1]["protected"] =
        b64_encode(r#"{"alg":"EdDSA","kid":"executive-2"}"#).into();
    assert_eq!(
        code(v.verify(value.to_string().as_bytes(), now(), AGENCY)),
        "bad_signature"
    );

    // ES256 in DER (as some libraries emit) instead of the raw r ‖ s of RFC 7518.
    let der_signer = aws_lc_rs::signature::EcdsaKeyPair::from_private_key_and_public_key(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &lavd::codec::b64_decode(&a.exec1.private_jwk().unwrap().d.unwrap()).unwrap(),
        lavd::jwk::P256PublicKey::from_jwk(&a.exec1.public_jwk().unwrap())
            .unwrap()
            .sec1(),
    )
    .unwrap();
    let protected = b64_encode(header(&a.exec1));
    let der = der_signer
        .sign(
            &aws_lc_rs::rand::SystemRandom::new(),
            format!("{protected}.{}", b64_encode(p)).as_bytes(),
        )
        .unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
    value["signatures"][0]["protected"] = protected.into();
    value["signatures"][0]["signature"] = b64_encode(der.as_ref()).into();
    assert_eq!(
        code(v.verify(value.to_string().as_bytes(), now(), AGENCY)),
        "bad_signature"
    );

    // Authorities outside their validity period, even beside a full policy.
    assert_eq!(
        code(v.verify(&signed_bytes(p, &[&a.exec1, &a.retired]), now(), AGENCY)),
        "authority_not_valid"
    );
    assert_eq!(
        code(v.verify(&signed_bytes(p, &[&a.exec1, &a.future]), now(), AGENCY)),
        "authority_not_valid"
    );
    assert_eq!(
        code(v.verify(
            &signed_bytes(p, &[&a.exec1, &a.jud1, &a.retired]),
            now(),
            AGENCY
        )),
        "authority_not_valid"
    );
    // The future authority becomes usable at its valid_from.
    let at_2027 = t("2027-01-01T00:00:00Z");
    let mut later = c.clone();
    later["not_before"] = "2026-12-31T00:00:00Z".into();
    later["expires"] = "2027-02-01T00:00:00Z".into();
    assert!(v
        .verify(&signed(&later, &[&a.exec1, &a.future]), at_2027, AGENCY)
        .is_ok());

    // An EdDSA authority's kid in an ES256 header (key confusion).
    let confused = jws_raw(
        p,
        &[
            (header(&a.exec1), &a.exec1),
            (r#"{"alg":"ES256","kid":"judicial-1"}"#.into(), &a.jud2),
        ],
    );
    assert_eq!(
        code(v.verify(&confused, now(), AGENCY)),
        "algorithm_mismatch"
    );

    // One bad signature refuses the whole warrant even though the policy is met.
    let extra_bad = signed_bytes(p, &[&a.exec1, &a.jud1, &a.stranger]);
    assert_eq!(
        code(v.verify(&extra_bad, now(), AGENCY)),
        "unknown_authority"
    );
}

#[test]
fn policy_counts_distinct_authorities_per_role() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let c = claims("W-policy");

    // No signatures at all (what `lavd warrant new` writes).
    let err = v.verify(&signed(&c, &[]), now(), AGENCY).unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(
        err.to_string().contains("needs 1 executive (found 0)"),
        "{err}"
    );
    assert!(
        err.to_string().contains("needs 1 judicial (found 0)"),
        "{err}"
    );

    // Two signatures of the same role but not the other.
    let err = v
        .verify(&signed(&c, &[&a.exec1, &a.exec2]), now(), AGENCY)
        .unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(
        err.to_string().contains("needs 1 judicial (found 0)"),
        "{err}"
    );
    assert!(!err.to_string().contains("executive"), "{err}");
    let err = v
        .verify(&signed(&c, &[&a.jud1, &a.jud2]), now(), AGENCY)
        .unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(
        err.to_string().contains("needs 1 executive (found 0)"),
        "{err}"
    );

    // The same authority twice is malformed (PROTOCOL §4: one signature
    // per authority), refused before any signature is verified.
    let twice = signed(&c, &[&a.exec1, &a.exec1]);
    let err = v.verify(&twice, now(), AGENCY).unwrap_err();
    assert_eq!(err.code(), "malformed_warrant");
    assert!(
        err.to_string()
            .contains("signatures[1]: `kid` \"executive-1\" signed already (signatures[0])"),
        "{err}"
    );

    // Counts above one: two distinct executives and one judicial.
    let two_exec = "[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 2\n[[policy.require]]\nrole = \"judicial\"\ncount = 1\n";
    let v2 = a.verifier(two_exec);
    assert!(v2
        .verify(&signed(&c, &[&a.exec1, &a.exec2, &a.jud1]), now(), AGENCY)
        .is_ok());
    let err = v2
        .verify(&signed(&c, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(
        err.to_string().contains("needs 2 executive (found 1)"),
        "{err}"
    );
    // A second judicial does not stand in for a missing executive.
    assert_eq!(
        code(v2.verify(&signed(&c, &[&a.exec1, &a.jud1, &a.jud2]), now(), AGENCY)),
        "policy_not_met"
    );
    // Extra signers beyond the policy are fine when they verify.
    assert!(v
        .verify(
            &signed(&c, &[&a.exec1, &a.exec2, &a.jud1, &a.jud2]),
            now(),
            AGENCY
        )
        .is_ok());
}

/// Two keys with one `holder` (the old and the new key of one judge's
/// overlapping rotation) are one authority: signing with both does not meet
/// a rule of two judicial authorities, though without the `holder` lines
/// it does. A holder under two roles, and a rule needing more holders of a
/// role than are configured, are refused in the trust config.
#[test]
fn one_holders_two_keys_count_once() {
    let a = Authorities::new();
    let two_judges = "[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n[[policy.require]]\nrole = \"judicial\"\ncount = 2\n";
    let c = claims("W-holder");
    let both = signed(&c, &[&a.exec1, &a.jud1, &a.jud2]);
    assert!(a.verifier(two_judges).verify(&both, now(), AGENCY).is_ok());

    let held = |kid: &str, holder: &str, text: String| {
        let line = format!("kid = \"{kid}\"\n");
        assert!(text.contains(&line));
        text.replace(&line, &format!("{line}holder = \"{holder}\"\n"))
    };
    let text = held("judicial-1", "judge-a", a.trust_toml(two_judges));
    let text = held("judicial-2", "judge-a", text);
    let trust = TrustStore::from_toml(&text, Path::new(".")).unwrap();
    let v = Verifier::new(trust, WarrantLimits::default());
    let err = v.verify(&both, now(), AGENCY).unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(
        err.to_string().contains("needs 2 judicial (found 1)"),
        "{err}"
    );

    // One holder, two roles: refused, naming the holder.
    let text = held(
        "executive-1",
        "judge-a",
        held("judicial-1", "judge-a", a.trust_toml(two_judges)),
    );
    let err = TrustStore::from_toml(&text, Path::new(".")).unwrap_err();
    assert!(
        err.to_string()
            .contains("`authorities[2].holder`: `judge-a` has role `judicial` here and `executive` in authorities[0]"),
        "{err}"
    );
    // Four judicial kids, three holders: a rule of four is refused.
    let four = two_judges.replace("count = 2", "count = 4");
    assert!(TrustStore::from_toml(&a.trust_toml(&four), Path::new(".")).is_ok());
    let text = held("judicial-2", "judicial-1", a.trust_toml(&four));
    let err = TrustStore::from_toml(&text, Path::new(".")).unwrap_err();
    assert!(
        err.to_string()
            .contains("needs 4 `judicial` authorities but 3 are configured"),
        "{err}"
    );
    // A holder is a name, bounded as a kid is.
    let text = held("judicial-1", "judge a", a.trust_toml(two_judges));
    let err = TrustStore::from_toml(&text, Path::new(".")).unwrap_err();
    assert!(err.to_string().contains("authorities[2].holder"), "{err}");
}

#[test]
fn independently_signed_warrants_are_accepted() {
    // One `signature::Signer` trait serves both crates (same `signature` version).
    use ed25519_dalek::Signer as _;

    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let payload_b64 = b64_encode(claims("W-independent").to_string());

    // ES256 by the `p256` crate (RFC 6979 deterministic ECDSA), from the
    // authority's private scalar.
    let d = lavd::codec::b64_decode(&a.exec1.private_jwk().unwrap().d.unwrap()).unwrap();
    let p256_key = p256::ecdsa::SigningKey::from_slice(&d).unwrap();
    let es_protected = b64_encode(r#"{"alg":"ES256","kid":"executive-1"}"#);
    let es_sig: p256::ecdsa::Signature =
        p256_key.sign(format!("{es_protected}.{payload_b64}").as_bytes());

    // EdDSA by `ed25519-dalek`, from the authority's seed.
    let seed: [u8; 32] = lavd::codec::b64_decode(&a.jud1.private_jwk().unwrap().d.unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let dalek = ed25519_dalek::SigningKey::from_bytes(&seed);
    let ed_protected = b64_encode(r#"{"kid":"judicial-1","alg":"EdDSA"}"#);
    let ed_sig = dalek.sign(format!("{ed_protected}.{payload_b64}").as_bytes());

    let jws = serde_json::json!({
        "payload": payload_b64,
        "signatures": [
            {"protected": es_protected, "signature": b64_encode(es_sig.to_bytes())},
            {"protected": ed_protected, "signature": b64_encode(ed_sig.to_bytes())},
        ]
    });
    let w = v.verify(jws.to_string().as_bytes(), now(), AGENCY).unwrap();
    assert_eq!(w.signers().len(), 2);

    // And our ES256 signatures verify under the independent implementation.
    let ours = signed(&claims("W-ours"), &[&a.exec1]);
    let value: serde_json::Value = serde_json::from_slice(&ours).unwrap();
    let sig = &value["signatures"][0];
    let input = format!(
        "{}.{}",
        sig["protected"].as_str().unwrap(),
        value["payload"].as_str().unwrap()
    );
    let raw = lavd::codec::b64_decode(sig["signature"].as_str().unwrap()).unwrap();
    use p256::ecdsa::signature::Verifier as _;
    p256_key
        .verifying_key()
        .verify(
            input.as_bytes(),
            &p256::ecdsa::Signature::from_slice(&raw).unwrap(),
        )
        .unwrap();
}

#[test]
fn time_and_agency_are_checked() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let bytes = signed(&claims("W-time"), &[&a.exec1, &a.jud1]);
    assert_eq!(
        code(v.verify(&bytes, t("2026-11-23T23:59:59Z"), AGENCY)),
        "warrant_not_yet_valid"
    );
    assert!(v.verify(&bytes, t("2026-11-24T00:00:00Z"), AGENCY).is_ok());
    assert!(v.verify(&bytes, t("2026-12-23T23:59:59Z"), AGENCY).is_ok());
    assert_eq!(
        code(v.verify(&bytes, t("2026-12-24T00:00:00Z"), AGENCY)),
        "warrant_expired"
    );
    // A fractional end is named as enforced: a refusal at .5 s says .5 s,
    // not the whole second before it, at which the warrant was accepted.
    let mut fractional = claims("W-time-fraction");
    fractional["expires"] = "2026-12-24T00:00:00.5Z".into();
    let bytes_fraction = signed(&fractional, &[&a.exec1, &a.jud1]);
    assert!(v
        .verify(&bytes_fraction, t("2026-12-24T00:00:00Z"), AGENCY)
        .is_ok());
    let err = v
        .verify(&bytes_fraction, t("2026-12-24T00:00:00.5Z"), AGENCY)
        .unwrap_err();
    assert_eq!(err.code(), "warrant_expired");
    assert!(err.to_string().contains("2026-12-24T00:00:00.5Z"), "{err}");
    let err = v
        .verify(&bytes, now(), "spiffe://agency.example/lea/unit-8")
        .unwrap_err();
    assert_eq!(err.code(), "agency_mismatch");
    assert!(!err.is_malformed());
    // Exact match only: no prefix or case folding.
    assert_eq!(
        code(v.verify(&bytes, now(), "spiffe://agency.example/lea/unit-7/")),
        "agency_mismatch"
    );
    assert_eq!(
        code(v.verify(&bytes, now(), "SPIFFE://agency.example/lea/unit-7")),
        "agency_mismatch"
    );
}

#[test]
fn envelope_scope_has_protocol_reason_codes() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let mut c = claims("W-scope");
    c["kids"] = serde_json::json!(["2026-11"]);
    let w = v
        .verify(&signed(&c, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    let alice = "acct:alice@example.com";
    let inside = t("2026-11-15T00:00:00Z");
    assert_eq!(w.check_envelope("2026-11", alice, inside), Ok(()));
    assert_eq!(
        w.check_envelope("2026-11", "acct:bob@example.com", t("2026-11-01T00:00:00Z")),
        Ok(())
    );
    let denial = |r: Result<(), Denial>| r.unwrap_err().code();
    assert_eq!(
        denial(w.check_envelope("2026-10", alice, inside)),
        "key_not_allowed"
    );
    assert_eq!(
        denial(w.check_envelope("2026-11", "acct:carol@example.com", inside)),
        "target_not_in_warrant"
    );
    assert_eq!(
        denial(w.check_envelope("2026-11", "acct:Alice@example.com", inside)),
        "target_not_in_warrant"
    );
    assert_eq!(
        denial(w.check_envelope("2026-11", alice, t("2026-12-01T00:00:00Z"))),
        "out_of_window"
    );
    assert_eq!(
        denial(w.check_envelope("2026-11", alice, t("2026-10-31T23:59:59Z"))),
        "out_of_window"
    );
    // PROTOCOL §5 order: kid before target before time.
    assert_eq!(
        denial(w.check_envelope("2026-10", "nobody", t("2030-01-01T00:00:00Z"))),
        "key_not_allowed"
    );
    assert_eq!(
        denial(w.check_envelope("2026-11", "nobody", t("2030-01-01T00:00:00Z"))),
        "target_not_in_warrant"
    );

    // Without `kids`, any escrow key is allowed.
    let w = v
        .verify(
            &signed(&claims("W-any"), &[&a.exec1, &a.jud1]),
            now(),
            AGENCY,
        )
        .unwrap();
    assert_eq!(w.check_envelope("2027-01", alice, inside), Ok(()));
}

#[test]
fn revoked_and_conflicting_ids_are_refused_after_restart() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.db");

    let c1 = claims("W-1");
    let w1 = v
        .verify(&signed(&c1, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    // Same payload, signed by other authorities: the same warrant.
    let w1_resigned = v
        .verify(&signed(&c1, &[&a.exec2, &a.jud2]), now(), AGENCY)
        .unwrap();
    let w2 = v
        .verify(&signed(&claims("W-2"), &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    // Same id, different claims (a new recipient key).
    let w1_other = v
        .verify(&signed(&claims("W-1"), &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(
            admit(&store, &w1, now()).unwrap(),
            lavd::store::Registration::New
        );
        assert_eq!(
            admit(&store, &w1, now()).unwrap(),
            lavd::store::Registration::Known
        );
        assert_eq!(
            admit(&store, &w1_resigned, now()).unwrap(),
            lavd::store::Registration::Known
        );
        assert_eq!(
            admit(&store, &w1_other, now()).unwrap_err().code(),
            "warrant_id_conflict"
        );
        admit(&store, &w2, now()).unwrap();
        store
            .revoke(&Revocation {
                id: "W-2".into(),
                reason: "authorisation withdrawn".into(),
                revoked_by: "spiffe://oversight.example/admin".into(),
                revoked_at: now(),
            })
            .unwrap();
        assert_eq!(
            admit(&store, &w2, now()).unwrap_err().code(),
            "warrant_revoked"
        );
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(
        admit(&store, &w1_other, now()).unwrap_err().code(),
        "warrant_id_conflict"
    );
    let err = admit(&store, &w2, now()).unwrap_err();
    assert_eq!(err.code(), "warrant_revoked");
    assert!(err.to_string().contains(NOW), "{err}");
    assert_eq!(
        admit(&store, &w1, now()).unwrap(),
        lavd::store::Registration::Known
    );
}

/// serde_json reads a derived struct from an array of its members' values
/// as readily as from an object. PROTOCOL's objects are objects: each of
/// them written as an array, with every signature valid over the bytes
/// sent, is `malformed_warrant`, and the same warrant as objects verifies.
#[test]
fn objects_written_as_arrays_are_malformed() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let c = claims("W-array");
    let ordered = |c: &serde_json::Value| {
        // The members in RawClaims' declaration order, as positional values.
        serde_json::json!([
            c["id"],
            c["legal_basis"],
            c["agency"],
            c["recipient"],
            c["targets"],
            c["window"],
            c["not_before"],
            c["expires"],
            c["max_unwraps"]
        ])
    };
    assert!(v
        .verify(&signed(&c, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .is_ok());

    let mut window = c.clone();
    window["window"] = serde_json::json!([c["window"]["from"], c["window"]["to"]]);
    let mut recipient = c.clone();
    recipient["recipient"] = serde_json::json!([
        c["recipient"]["kty"],
        c["recipient"]["crv"],
        c["recipient"]["x"],
        c["recipient"]["y"]
    ]);
    for (what, payload) in [
        ("the claims", ordered(&c)),
        ("the window", window),
        ("the recipient", recipient),
    ] {
        let e = v
            .verify(&signed(&payload, &[&a.exec1, &a.jud1]), now(), AGENCY)
            .unwrap_err();
        assert_eq!(e.code(), "malformed_warrant", "{what}: {e}");
        assert!(
            e.to_string().contains("expected a JSON object"),
            "{what}: {e}"
        );
    }

    // The JWS itself, a signature entry, and a protected header.
    let good = signed(&c, &[&a.exec1, &a.jud1]);
    let jws: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let as_array = serde_json::json!([jws["payload"], jws["signatures"]]);
    let mut entry = jws.clone();
    entry["signatures"][0] = serde_json::json!([
        jws["signatures"][0]["protected"],
        jws["signatures"][0]["signature"]
    ]);
    let array_header = format!(r#"["{}","{}"]"#, a.exec1.alg(), a.exec1.kid());
    let header = jws_raw(
        c.to_string().as_bytes(),
        &[(array_header, &a.exec1), (self::header(&a.jud1), &a.jud1)],
    );
    for (what, bytes) in [
        ("the JWS", as_array.to_string().into_bytes()),
        ("a signature entry", entry.to_string().into_bytes()),
        ("a protected header", header),
    ] {
        let e = v.verify(&bytes, now(), AGENCY).unwrap_err();
        assert_eq!(e.code(), "malformed_warrant", "{what}: {e}");
    }
}
