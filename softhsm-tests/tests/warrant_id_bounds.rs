//! One bound for a warrant `id` (1..=128 characters) and for a revocation
//! `reason` (1..=1024 characters), at every entry point of a real `lavd
//! serve` over mutual TLS: an id of 128 Cyrillic letters (256 bytes) unwraps,
//! is revoked by the admin and by an authority JWS, and is then refused with
//! 403 `warrant_revoked`; an id of 129 characters, or with an invisible
//! format character, is refused with its exact code by the unwrap, the admin
//! revocation and the authority revocation.
//! Before the fix, revocation counted bytes: such a warrant could never be
//! revoked.

use lavd::codec::b64_encode;
use softhsm_tests::server::{authorities, serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Clients, Parties, TARGET};
use softhsm_tests::TestToken;
use time::{Duration, OffsetDateTime};

/// The `revocation` leaf at `reply`'s index.
fn revocation_leaf(c: &Clients, reply: &serde_json::Value) -> serde_json::Value {
    let index = reply["audit"]["first_index"].as_u64().unwrap();
    let leaf = vault::entries(&c.auditor, index, index + 1).remove(0).leaf;
    assert_eq!(leaf["event"], "revocation");
    leaf
}

#[test]
fn non_ascii_ids_and_reasons_have_one_bound_everywhere() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let envelopes = [vault::seal(
        &escrow,
        "E-1",
        TARGET,
        OffsetDateTime::now_utc() - Duration::hours(1),
        "a",
        &[7; 32],
    )];
    let recipient = vault::recipient();
    let unwrap = |warrant: &serde_json::Value| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
        )
    };

    // 128 characters, 256 bytes: a valid id, executable and revocable by
    // both forms. (The 69 Cyrillic characters are 137 bytes.)
    let by_admin = format!("ОРДЕР-{}", "Ж".repeat(122));
    let by_authority = format!("ОРДЕР-{}", "Щ".repeat(122));
    for id in [&by_admin, &by_authority] {
        assert_eq!(id.chars().count(), 128);
        assert!(id.len() > 250, "{} bytes", id.len());
    }
    let reason = "Постановление отменено судом — «ордер» недействителен";
    let admin_warrant = vault::double_lock(&vault::claims(&by_admin, recipient.public(), 10));
    let authority_warrant =
        vault::double_lock(&vault::claims(&by_authority, recipient.public(), 10));
    for w in [&admin_warrant, &authority_warrant] {
        let r = unwrap(w);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"]);
    }

    let r = vault::post(
        &c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": by_admin, "reason": reason}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], by_admin.as_str());
    let leaf = revocation_leaf(&c, &r.json());
    assert_eq!(leaf["warrant_id"], by_admin.as_str());
    assert_eq!(leaf["reason"], reason);
    assert_eq!(leaf["by"], "admin");
    assert!(leaf.get("revocation_digest").is_none(), "{leaf}");

    // An authority's JWS, delivered by the agency (any authenticated caller
    // may deliver one); a reason of 1024 Cyrillic characters (2048 bytes).
    let long_reason = "ё".repeat(1024);
    let jws = authorities().revocation(&by_authority, &long_reason);
    let r = vault::post(
        &c.agency,
        "/v1/warrants/revocations",
        &serde_json::json!({"revocation": jws}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let leaf = revocation_leaf(&c, &r.json());
    assert_eq!(leaf["warrant_id"], by_authority.as_str());
    assert_eq!(leaf["reason"], long_reason.as_str());
    assert_eq!(leaf["by"], "authority");
    assert_eq!(leaf["authority"], "judicial-1");
    // The leaf names what the authority signed: the payload's digest and
    // its time, so an auditor holding the JWS can tie the two.
    let payload = lavd::codec::b64_decode(jws["payload"].as_str().unwrap()).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &payload);
    assert_eq!(
        leaf["revocation_digest"],
        b64_encode(digest.as_ref()),
        "{leaf}"
    );
    let signed: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(leaf["signed_time"], signed["time"], "{leaf}");

    // Both are refused from now on, and the refusal leaf names the id the
    // warrant claims (the claimed id has the same bound).
    for (id, w) in [
        (&by_admin, &admin_warrant),
        (&by_authority, &authority_warrant),
    ] {
        let message = unwrap(w).assert_error(403, "warrant_revoked");
        assert!(message.contains(id.as_str()), "{message}");
    }
    let size = vault::tree_size(&c.auditor);
    let refused: Vec<_> = vault::entries(&c.auditor, 0, size)
        .into_iter()
        .filter(|e| e.leaf["event"] == "warrant_refused")
        .map(|e| {
            e.leaf["warrant_id"]
                .as_str()
                .unwrap_or("<null>")
                .to_string()
        })
        .collect();
    assert_eq!(refused, [by_admin.clone(), by_authority.clone()]);

    // 129 characters, and an id with an invisible format character (it
    // would look like `W-1`): refused with their exact code at every entry
    // point.
    let too_long = format!("ОРДЕР-{}", "Ж".repeat(123));
    assert_eq!(too_long.chars().count(), 129);
    let a = authorities();
    for (bad, why) in [
        (too_long.as_str(), "`id` is longer than 128 characters"),
        ("W-1\u{200b}", "`id` contains an invisible format character"),
    ] {
        // A warrant carrying it: the authorities' own tools refuse to sign
        // it, so sign over the raw claims.
        let claims = vault::claims(bad, recipient.public(), 10);
        let payload = b64_encode(claims.to_string());
        let sig = |k: &lavd::warrant::AuthorityKey| {
            let protected =
                b64_encode(serde_json::json!({"alg": k.alg().name(), "kid": k.kid()}).to_string());
            let s = k.sign(format!("{protected}.{payload}").as_bytes()).unwrap();
            serde_json::json!({"protected": protected, "signature": b64_encode(s)})
        };
        let bad_warrant = serde_json::json!({
            "payload": payload,
            "signatures": [sig(&a.executive), sig(&a.judicial)],
        });
        let message = unwrap(&bad_warrant).assert_error(400, "malformed_warrant");
        assert!(message.contains(why), "{message}");
        let message = vault::post(
            &c.admin,
            "/v1/warrants/revocations",
            &serde_json::json!({"id": bad, "reason": reason}),
        )
        .assert_error(400, "malformed_request");
        assert!(message.contains(why), "{message}");
        let message = vault::post(
            &c.agency,
            "/v1/warrants/revocations",
            &serde_json::json!({"revocation": authorities().revocation(bad, reason)}),
        )
        .assert_error(400, "malformed_warrant");
        assert!(message.contains(why), "{message}");
    }

    // The reason's bound, in both forms: 1025 characters, only whitespace,
    // a control character, a bidirectional override.
    for bad in [
        "ё".repeat(1025),
        " \u{a0} ".to_string(),
        "a\u{85}b".to_string(),
        "quashed \u{202e}lacol".to_string(),
    ] {
        vault::post(
            &c.admin,
            "/v1/warrants/revocations",
            &serde_json::json!({"id": "W-OTHER", "reason": bad}),
        )
        .assert_error(400, "malformed_request");
        vault::post(
            &c.agency,
            "/v1/warrants/revocations",
            &serde_json::json!({"revocation": authorities().revocation("W-OTHER", &bad)}),
        )
        .assert_error(400, "malformed_warrant");
    }

    // The refused warrant's leaf leaves out the id it claims: too long to
    // be an id.
    let size_after = vault::tree_size(&c.auditor);
    let last_refusal = vault::entries(&c.auditor, size, size_after)
        .into_iter()
        .find(|e| e.leaf["event"] == "warrant_refused")
        .expect("the refusal is logged");
    assert_eq!(last_refusal.leaf["reason"], "malformed_warrant");
    assert_eq!(last_refusal.leaf["warrant_id"], serde_json::Value::Null);
}
