//! The whole unwrap path over mutual TLS against a real `lavd serve` on
//! SoftHSM, with each party holding only what it would hold in life: the
//! provider fetches the published escrow key and seals three message keys;
//! two authorities sign a double-lock warrant; the agency unwraps and opens
//! the reply with its own key; the auditor checks the reply's checkpoint with
//! the published verifier key, proves each of the reply's leaves into it,
//! and reads them back.

use lavd::audit::merkle::{leaf_hash, verify_inclusion, Hash};
use lavd::audit::note::verify_note;
use lavd::envelope::reply::{open_reply, Outcome};
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, AGENCY, TARGET};
use softhsm_tests::TestToken;
use time::{Duration, OffsetDateTime};

#[test]
fn a_double_lock_warrant_opens_sealed_keys_and_the_log_proves_it() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let generated = vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);

    // Provider: seal three DEKs to the published key.
    let escrow = vault::published_key(&c.provider, "E-1");
    assert_eq!(escrow, generated);
    let now = OffsetDateTime::now_utc();
    let deks: Vec<Vec<u8>> = vec![vec![0x11; 16], vec![0x22; 32], vec![0x33; 64]];
    let envelopes: Vec<serde_json::Value> = deks
        .iter()
        .enumerate()
        .map(|(i, dek)| {
            vault::seal(
                &escrow,
                "E-1",
                TARGET,
                now - Duration::hours(i as i64 + 1),
                &format!("msg-{i}"),
                dek,
            )
        })
        .collect();

    // Authorities: a double-lock warrant sealed to the agency's key.
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("UK-IPA-E2E-1", recipient.public(), 10));
    let payload = lavd::codec::b64_decode(warrant["payload"].as_str().unwrap()).unwrap();
    let warrant_digest = lavd::codec::b64_encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &payload,
    ));

    // Agency: unwrap and open the reply.
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    for dek in &deks {
        assert!(
            !r.text().contains(&lavd::codec::b64_encode(dek)),
            "a plaintext DEK in the reply"
        );
    }
    let reply = r.json();
    assert_eq!(vault::statuses(&reply), ["ok", "ok", "ok"]);
    let opened = open_reply(&recipient, &vault::headers(&envelopes), &r.body).unwrap();
    assert_eq!(opened.results.len(), 3);
    for (i, (result, dek)) in opened.results.iter().zip(&deks).enumerate() {
        assert_eq!(result.index, i);
        assert_eq!(
            result.reference.as_deref(),
            Some(format!("msg-{i}").as_str())
        );
        match &result.outcome {
            Outcome::Ok(got) => assert_eq!(got.as_slice(), dek.as_slice()),
            other => panic!("envelope {i}: {other:?}"),
        }
    }
    // Another key cannot open it.
    assert_eq!(
        open_reply(&vault::recipient(), &vault::headers(&envelopes), &r.body)
            .unwrap_err()
            .code(),
        "recipient_mismatch"
    );

    // Auditor: the reply's checkpoint verifies with the published key and
    // covers the reply's leaves.
    let key = vault::verifier_key(&c.auditor);
    let checkpoint = verify_note(opened.audit.checkpoint.as_str(), &key).unwrap();
    let (first, count) = (opened.audit.first_index, opened.audit.count);
    assert_eq!(count, 3);
    assert!(first + count <= checkpoint.size, "{checkpoint:?}");
    let leaves = vault::entries(&c.auditor, first, first + count);
    for (i, entry) in leaves.iter().enumerate() {
        let r = c.auditor.get(&format!(
            "/v1/audit/proof/inclusion?index={}&size={}",
            entry.index, checkpoint.size
        ));
        assert_eq!(r.status, 200, "{}", r.text());
        let proof = r.json();
        assert_eq!(proof["index"], entry.index);
        assert_eq!(proof["size"], checkpoint.size);
        let path: Vec<Hash> = proof["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                lavd::codec::b64_decode(h.as_str().unwrap())
                    .unwrap()
                    .try_into()
                    .unwrap()
            })
            .collect();
        verify_inclusion(
            &leaf_hash(&entry.bytes),
            entry.index,
            checkpoint.size,
            &path,
            &checkpoint.root,
        )
        .unwrap();
        // A proof for another leaf's bytes does not verify.
        let other = &leaves[(i + 1) % leaves.len()];
        assert_eq!(
            verify_inclusion(
                &leaf_hash(&other.bytes),
                entry.index,
                checkpoint.size,
                &path,
                &checkpoint.root,
            )
            .unwrap_err()
            .code(),
            "root_mismatch"
        );

        let leaf = &entry.leaf;
        assert_eq!(leaf["event"], "unwrap");
        assert_eq!(leaf["outcome"], "opened");
        assert_eq!(leaf["reason"], serde_json::Value::Null);
        assert_eq!(leaf["seq"], entry.index);
        assert_eq!(leaf["caller"], AGENCY);
        assert_eq!(leaf["warrant_id"], "UK-IPA-E2E-1");
        assert_eq!(leaf["warrant_digest"], warrant_digest);
        assert_eq!(leaf["emergency"], false);
        assert_eq!(leaf["kid"], "E-1");
        assert_eq!(
            leaf["envelope_digest"],
            vault::envelope_digest(&envelopes[i])
        );
        // No key material in the log.
        let text = String::from_utf8(entry.bytes.clone()).unwrap();
        assert!(!text.contains(&lavd::codec::b64_encode(&deks[i])));
    }
}
