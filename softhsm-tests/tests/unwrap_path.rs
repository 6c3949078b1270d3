//! The whole unwrap path in-process on a real SoftHSM token and SQLite file
//! (the HTTP layer adds only the role check and status mapping): a provider
//! seals envelopes to the published key, two authorities sign a double-lock
//! warrant, the agency unwraps, and opens the reply with its own key. Then
//! per-envelope denials, the budget, refusals logged before they are
//! returned, and revocation.

use std::path::Path;
use std::sync::Arc;

use lavd::audit::log::AuditLog;
use lavd::envelope::reply::open_reply;
use lavd::envelope::{seal_envelope, EnvelopeLimits, HeaderBuilder};
use lavd::hsm::Hsm;
use lavd::jwk::{P256PrivateKey, P256PublicKey};
use lavd::keys::{self, Validity};
use lavd::store::{AuditStore, Store, WarrantStore};
use lavd::unwrap::gate::EnvelopeGate;
use lavd::unwrap::{revoke, unwrap, Context, RevocationRequest, UnwrapError};
use lavd::warrant::sign::{add_signature, unsigned_warrant};
use lavd::warrant::{Algorithm, AuthorityKey, TrustStore, Verifier, WarrantLimits};
use softhsm_tests::{assert_ok, TestToken};
use time::OffsetDateTime;

const AGENCY: &str = "spiffe://agency.example/lea";
const PROVIDER: &str = "spiffe://provider.example/messaging";

fn t(s: &str) -> OffsetDateTime {
    lavd::codec::parse_time(s).unwrap()
}

struct World {
    _token: TestToken,
    hsm: Hsm,
    store: Arc<Store>,
    log: AuditLog,
    verifier: Verifier,
    gate: EnvelopeGate,
    exec: AuthorityKey,
    judge: AuthorityKey,
    recipient: P256PrivateKey,
    escrow: P256PublicKey,
}

impl Drop for World {
    /// The log's deferred writer holds the log, and so the HSM, until it
    /// is stopped, as `lavd serve` does at its end.
    fn drop(&mut self) {
        self.log.stop_deferred();
    }
}

impl World {
    fn new() -> Self {
        let token = TestToken::new();
        assert_ok(&token.lavd_with_config(&["keys", "generate-audit"]));
        let settings = token.settings();
        let store = Arc::new(Store::open_settings(&settings.store).unwrap());
        let hsm = Hsm::open(settings.hsm).unwrap();
        let record = keys::generate(
            &hsm,
            &*store,
            "2026-12",
            Validity {
                not_before: t("2026-12-01T00:00:00Z"),
                not_after: t("2027-01-01T00:00:00Z"),
                destroy_after: t("2028-01-01T00:00:00Z"),
            },
            t("2026-11-30T00:00:00Z"),
        )
        .unwrap();
        let log =
            AuditLog::new(store.clone(), hsm.clone(), "lav-audit", "lavd.test/audit").unwrap();
        let exec = AuthorityKey::generate(Algorithm::Es256, "home-office-1").unwrap();
        let judge = AuthorityKey::generate(Algorithm::EdDsa, "ipc-judicial-3").unwrap();
        let entry = |k: &AuthorityKey, role: &str| {
            format!(
                "[[authorities]]\nkid = \"{}\"\nrole = \"{role}\"\nalg = \"{}\"\njwk = '{}'\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n\n",
                k.kid(),
                k.alg(),
                serde_json::to_string(&k.public_jwk().unwrap()).unwrap()
            )
        };
        let trust = format!(
            "{}{}[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n[[policy.require]]\nrole = \"judicial\"\ncount = 1\n",
            entry(&exec, "executive"),
            entry(&judge, "judicial")
        );
        let verifier = Verifier::new(
            TrustStore::from_toml(&trust, Path::new(".")).unwrap(),
            WarrantLimits::default(),
        );
        World {
            _token: token,
            hsm,
            store,
            log,
            verifier,
            gate: EnvelopeGate::new(64),
            exec,
            judge,
            recipient: P256PrivateKey::generate().unwrap(),
            escrow: record.public,
        }
    }

    /// The unwrap context over this world, with `limits`.
    fn context<'a>(&'a self, limits: &'a EnvelopeLimits) -> Context<'a> {
        Context {
            hsm: &self.hsm,
            store: &self.store,
            log: &self.log,
            verifier: &self.verifier,
            readmit: None,
            recheck: None,
            envelope_limits: limits,
            max_batch: 16,
            gate: &self.gate,
            witnessing: None,
        }
    }

    fn warrant(&self, id: &str, max: u64, signers: &[&AuthorityKey]) -> serde_json::Value {
        let claims = serde_json::json!({
            "id": id,
            "legal_basis": "Investigatory Powers Act 2016 s.19",
            "agency": AGENCY,
            "recipient": self.recipient.public().to_jwk(),
            "targets": ["acct:alice@example.com"],
            "window": {"from": "2026-12-01T00:00:00Z", "to": "2026-12-15T00:00:00Z"},
            "not_before": "2026-12-01T00:00:00Z",
            "expires": "2026-12-31T00:00:00Z",
            "max_unwraps": max
        });
        let mut jws = unsigned_warrant(claims.to_string().as_bytes()).unwrap();
        for key in signers {
            jws = add_signature(jws.as_bytes(), key, &WarrantLimits::default()).unwrap();
        }
        serde_json::from_str(&jws).unwrap()
    }

    fn envelope(&self, target: &str, time: &str, reference: &str, dek: &[u8]) -> serde_json::Value {
        self.envelope_spelled(target, time, time, reference, dek)
    }

    /// As [`World::envelope`], with `time` written in the header as
    /// `spelled` (another RFC 3339 spelling of it).
    fn envelope_spelled(
        &self,
        target: &str,
        time: &str,
        spelled: &str,
        reference: &str,
        dek: &[u8],
    ) -> serde_json::Value {
        let header = HeaderBuilder::new("2026-12", PROVIDER, target, t(time))
            .reference(reference)
            .build()
            .unwrap();
        let text = String::from_utf8(header).unwrap();
        let quoted = format!("\"{time}\"");
        assert_eq!(text.matches(&quoted).count(), 1, "{text}");
        let header = text.replace(&quoted, &format!("\"{spelled}\""));
        serde_json::from_str(
            &seal_envelope(&self.escrow, header.as_bytes(), dek)
                .unwrap()
                .to_json(),
        )
        .unwrap()
    }

    fn unwrap(
        &self,
        body: &serde_json::Value,
        caller: &str,
        now: &str,
    ) -> Result<lavd::unwrap::Unwrapped, UnwrapError> {
        let limits = EnvelopeLimits::default();
        unwrap(
            &self.context(&limits),
            caller,
            body.to_string().as_bytes(),
            &|| t(now),
        )
    }
}

fn headers(envelopes: &[serde_json::Value]) -> Vec<Vec<u8>> {
    envelopes
        .iter()
        .map(|e| lavd::codec::b64_decode(e["header"].as_str().unwrap()).unwrap())
        .collect()
}

#[test]
fn double_lock_unwrap_releases_sealed_deks_and_logs_each() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let deks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 32]).collect();
    let envelopes: Vec<_> = deks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            // The last one's time as Python's `isoformat()` writes UTC.
            let spelled = [
                "2026-12-03T10:00:00Z",
                "2026-12-03T10:00:00z",
                "2026-12-03T10:00:00+00:00",
            ];
            w.envelope_spelled(
                "acct:alice@example.com",
                "2026-12-03T10:00:00Z",
                spelled[i],
                &format!("msg-{i}"),
                d,
            )
        })
        .collect();
    let body = serde_json::json!({"warrant": w.warrant("W-1", 10, &[&w.exec, &w.judge]), "envelopes": envelopes});
    let done = w.unwrap(&body, AGENCY, "2026-12-05T00:00:00Z").unwrap();
    assert_eq!(done.opened, 3);
    assert!(!done.reply.contains(&hex::encode(&deks[0])));

    let opened = open_reply(&w.recipient, &headers(&envelopes), done.reply.as_bytes()).unwrap();
    let got: Vec<Vec<u8>> = opened
        .results
        .iter()
        .map(|r| match &r.outcome {
            lavd::envelope::reply::Outcome::Ok(dek) => dek.to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, deks);

    // The leaves are durable and the checkpoint covers them.
    let size = w.store.tree_size().unwrap();
    let first = done.receipt.appended.first_index;
    assert_eq!(done.receipt.appended.count, 3);
    assert!(first + 3 <= size);
    for (i, leaf) in w.store.leaves(first, first + 3).unwrap() {
        let v: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
        assert_eq!(v["event"], "unwrap");
        assert_eq!(v["outcome"], "opened");
        assert_eq!(v["warrant_id"], "W-1");
        assert_eq!(v["seq"], i);
        assert_eq!(v["caller"], AGENCY);
    }
    let vkey = w.log.verifier_key().unwrap();
    let cp = lavd::audit::note::verify_note(&done.receipt.checkpoint, &vkey).unwrap();
    assert!(cp.size >= first + 3);
    assert_eq!(w.store.spent("W-1").unwrap(), Some(3));
}

#[test]
fn per_envelope_denials_and_the_budget() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let good = |r: &str| {
        w.envelope(
            "acct:alice@example.com",
            "2026-12-03T10:00:00Z",
            r,
            &[9; 32],
        )
    };
    let mut tampered = good("tampered");
    let header = lavd::codec::b64_decode(tampered["header"].as_str().unwrap()).unwrap();
    let header = String::from_utf8(header)
        .unwrap()
        .replace("\"tampered\"", "\"tampereX\"");
    tampered["header"] = lavd::codec::b64_encode(header.as_bytes()).into();
    let mut unknown_kid = good("unknown");
    let h = String::from_utf8(
        lavd::codec::b64_decode(unknown_kid["header"].as_str().unwrap()).unwrap(),
    )
    .unwrap()
    .replace("2026-12", "2025-01");
    unknown_kid["header"] = lavd::codec::b64_encode(h.as_bytes()).into();
    let envelopes = vec![
        good("a"),
        w.envelope(
            "acct:bob@example.com",
            "2026-12-03T10:00:00Z",
            "b",
            &[9; 32],
        ),
        w.envelope(
            "acct:alice@example.com",
            "2026-12-20T10:00:00Z",
            "c",
            &[9; 32],
        ),
        unknown_kid,
        tampered,
        serde_json::json!({"v": 1}),
        good("d"),
        good("e"),
    ];
    let body = serde_json::json!({"warrant": w.warrant("W-2", 2, &[&w.exec, &w.judge]), "envelopes": envelopes});
    let done = w.unwrap(&body, AGENCY, "2026-12-05T00:00:00Z").unwrap();
    let reply: serde_json::Value = serde_json::from_str(&done.reply).unwrap();
    let statuses: Vec<String> = reply["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| match r["status"].as_str().unwrap() {
            "ok" => "ok".to_string(),
            _ => r["reason"].as_str().unwrap().to_string(),
        })
        .collect();
    assert_eq!(
        statuses,
        [
            "ok",
            "target_not_in_warrant",
            "out_of_window",
            "unknown_key",
            "open_failed",
            "malformed_envelope",
            "budget_exhausted",
            "budget_exhausted"
        ]
    );
    // "tampered" took the second unit of budget and failed: its unit was
    // given back, but the later envelopes had already been refused.
    assert_eq!(w.store.spent("W-2").unwrap(), Some(1));
    let again = serde_json::json!({"warrant": w.warrant("W-2", 2, &[&w.exec, &w.judge]), "envelopes": [good("f"), good("g")]});
    let done = w.unwrap(&again, AGENCY, "2026-12-05T00:00:00Z").unwrap();
    assert_eq!(done.opened, 1);
    assert_eq!(w.store.spent("W-2").unwrap(), Some(2));
}

#[test]
fn refused_warrants_are_logged_and_revocation_is_final() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let env = w.envelope(
        "acct:alice@example.com",
        "2026-12-03T10:00:00Z",
        "a",
        &[9; 32],
    );
    let size = |w: &World| w.store.tree_size().unwrap();
    let before = size(&w);

    let one_sig =
        serde_json::json!({"warrant": w.warrant("W-3", 5, &[&w.exec]), "envelopes": [env.clone()]});
    let e = w
        .unwrap(&one_sig, AGENCY, "2026-12-05T00:00:00Z")
        .unwrap_err();
    assert_eq!(e.code(), "policy_not_met");
    let e = w
        .unwrap(&serde_json::json!({"warrant": w.warrant("W-3", 5, &[&w.exec, &w.judge]), "envelopes": [env.clone()]}), "spiffe://other.example/x", "2026-12-05T00:00:00Z")
        .unwrap_err();
    assert_eq!(e.code(), "agency_mismatch");
    let e = w
        .unwrap(&serde_json::json!({"warrant": w.warrant("W-3", 5, &[&w.exec, &w.judge]), "envelopes": [env.clone()]}), AGENCY, "2027-01-05T00:00:00Z")
        .unwrap_err();
    assert_eq!(e.code(), "warrant_expired");
    assert_eq!(size(&w), before + 3, "each refusal is a leaf");
    let last = w.store.leaves(before, before + 3).unwrap();
    let reasons: Vec<String> = last
        .iter()
        .map(|(_, l)| {
            serde_json::from_slice::<serde_json::Value>(l).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        reasons,
        ["policy_not_met", "agency_mismatch", "warrant_expired"]
    );

    let e = w
        .unwrap(
            &serde_json::json!({"warrant": {}, "envelopes": [], "x": 1}),
            AGENCY,
            "2026-12-05T00:00:00Z",
        )
        .unwrap_err();
    assert_eq!(e.code(), "malformed_request");
    let e = w
        .unwrap(
            &serde_json::json!({"warrant": {}, "envelopes": []}),
            AGENCY,
            "2026-12-05T00:00:00Z",
        )
        .unwrap_err();
    assert_eq!(e.code(), "malformed_request");
    assert!(e.to_string().contains("this one has none"), "{e}");

    // Revoke, then the warrant never opens again (after a restart:
    // `store_conformance.rs`, `daemon/tests/warrant_budget.rs`).
    let limits = EnvelopeLimits::default();
    let ctx = w.context(&limits);
    let r = revoke(
        &ctx,
        RevocationRequest::Admin {
            caller: "spiffe://agency.example/admin",
            body: br#"{"id":"W-4","reason":"court order quashed"}"#,
        },
        &|| t("2026-12-05T00:00:00Z"),
    )
    .unwrap();
    assert!(r.newly_revoked);
    let body = serde_json::json!({"warrant": w.warrant("W-4", 5, &[&w.exec, &w.judge]), "envelopes": [env]});
    assert_eq!(
        w.unwrap(&body, AGENCY, "2026-12-05T00:00:00Z")
            .unwrap_err()
            .code(),
        "warrant_revoked"
    );
    let again = revoke(
        &ctx,
        RevocationRequest::Admin {
            caller: "spiffe://agency.example/admin",
            body: br#"{"id":"W-4","reason":"again"}"#,
        },
        &|| t("2026-12-06T00:00:00Z"),
    )
    .unwrap();
    assert!(!again.newly_revoked);
    assert_eq!(
        w.store.revocation("W-4").unwrap().unwrap().reason,
        "court order quashed"
    );
}

#[test]
fn destroyed_keys_never_open_again() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let env = w.envelope(
        "acct:alice@example.com",
        "2026-12-03T10:00:00Z",
        "a",
        &[9; 32],
    );
    let body = |id: &str| serde_json::json!({"warrant": w.warrant(id, 5, &[&w.exec, &w.judge]), "envelopes": [env.clone()]});
    let reasons = |done: lavd::unwrap::Unwrapped| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&done.reply).unwrap();
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["reason"].as_str().unwrap_or("ok").to_string())
            .collect()
    };
    assert_eq!(
        reasons(
            w.unwrap(&body("W-5"), AGENCY, "2026-12-05T00:00:00Z")
                .unwrap()
        ),
        ["ok"]
    );

    // Gone from the token while the store still lists it (an older store
    // backup restored): refused per envelope, not a failed request.
    assert!(w.hsm.destroy_escrow_key("2026-12").unwrap());
    assert_eq!(
        reasons(
            w.unwrap(&body("W-6"), AGENCY, "2026-12-05T00:00:00Z")
                .unwrap()
        ),
        ["key_destroyed"]
    );
    // Destroyed through the lifecycle: refused before the HSM is asked.
    // The destruction says that the token had lost the key before it.
    let destroyed = keys::destroy(
        &w.hsm,
        &*w.store,
        &|| Ok(w.log.clone()),
        "2026-12",
        keys::DestroyReason::Forced("test".into()),
        t("2026-12-05T00:00:00Z"),
    )
    .unwrap();
    assert!(destroyed.missing_before);
    assert_eq!(
        reasons(
            w.unwrap(&body("W-7"), AGENCY, "2026-12-05T00:00:00Z")
                .unwrap()
        ),
        ["key_destroyed"]
    );
    assert_eq!(w.store.spent("W-7").unwrap(), Some(0));
}

/// `forced: true` in a `key_destroyed` leaf means "before its
/// destroy_after": a `--force` once that date has passed is logged as a
/// retention destruction, and the operator's text stays in the store.
#[test]
fn a_forced_destruction_after_the_due_date_is_logged_as_retention() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let before = w.store.tree_size().unwrap();
    let destroyed = keys::destroy(
        &w.hsm,
        &*w.store,
        &|| Ok(w.log.clone()),
        "2026-12",
        keys::DestroyReason::Forced("court order 7".into()),
        t("2028-02-01T00:00:00Z"),
    )
    .unwrap();
    assert!(!destroyed.missing_before, "the key was on the token");
    let record = destroyed.record;
    assert_eq!(
        record.destroy_reason.as_deref(),
        Some("forced: court order 7")
    );
    let (_, leaf) = &w.store.leaves(before, before + 1).unwrap()[0];
    let leaf: serde_json::Value = serde_json::from_slice(leaf).unwrap();
    assert_eq!(leaf["event"], "key_destroyed", "{leaf}");
    assert_eq!(leaf["reason"], "retention", "{leaf}");
    assert_eq!(leaf["forced"], false, "{leaf}");
}

#[test]
fn a_refused_warrant_leaf_names_the_claimed_id_and_digest() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let env = w.envelope(
        "acct:alice@example.com",
        "2026-12-03T10:00:00Z",
        "a",
        &[9; 32],
    );
    let warrant = w.warrant("W-8", 5, &[&w.exec]);
    let payload = lavd::codec::b64_decode(warrant["payload"].as_str().unwrap()).unwrap();
    let body = serde_json::json!({"warrant": warrant, "envelopes": [env]});
    let before = w.store.tree_size().unwrap();
    assert_eq!(
        w.unwrap(&body, AGENCY, "2026-12-05T00:00:00Z")
            .unwrap_err()
            .code(),
        "policy_not_met"
    );
    let (_, leaf) = &w.store.leaves(before, before + 1).unwrap()[0];
    let leaf: serde_json::Value = serde_json::from_slice(leaf).unwrap();
    assert_eq!(leaf["event"], "warrant_refused");
    assert_eq!(leaf["warrant_id"], "W-8");
    assert_eq!(
        leaf["warrant_digest"],
        lavd::codec::b64_encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &payload
        ))
    );
}

/// The clock is read when the request's turn at the envelope gate comes,
/// not when it arrived: a warrant that expires while its request waits at
/// the gate behind other work is refused `warrant_expired`, and nothing
/// opens. Before, the time was taken before the wait, and the envelope
/// opened after the warrant's expiry.
#[test]
fn a_warrant_that_expires_while_its_request_waits_at_the_gate_is_refused() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let env = w.envelope(
        "acct:alice@example.com",
        "2026-12-03T00:00:00Z",
        "gate-1",
        &[5; 32],
    );
    // It expires at 2026-12-31T00:00:00Z.
    let body = serde_json::json!({
        "warrant": w.warrant("W-GATE", 5, &[&w.exec, &w.judge]),
        "envelopes": [env],
    })
    .to_string();
    let clock = std::sync::Mutex::new(t("2026-12-30T23:59:59Z"));
    let before = w.store.tree_size().unwrap();
    let held = w.gate.enter(64);
    let limits = EnvelopeLimits::default();
    let ctx = w.context(&limits);
    let e = std::thread::scope(|s| {
        let waiting = s.spawn(|| unwrap(&ctx, AGENCY, body.as_bytes(), &|| *clock.lock().unwrap()));
        // The request waits for the gate's whole capacity, held here.
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !waiting.is_finished(),
            "the request did not wait at the gate"
        );
        *clock.lock().unwrap() = t("2026-12-31T00:00:01Z");
        drop(held);
        waiting.join().unwrap().unwrap_err()
    });
    assert_eq!(e.code(), "warrant_expired");
    // Its only leaf is the refusal.
    let leaves = w
        .store
        .leaves(before, w.store.tree_size().unwrap())
        .unwrap();
    let events: Vec<String> = leaves
        .iter()
        .map(|(_, l)| serde_json::from_slice::<serde_json::Value>(l).unwrap()["event"].to_string())
        .collect();
    assert_eq!(events, ["\"warrant_refused\""]);
}

/// A request whose work ends between its HSM opens and its audit commit
/// while the process lives (a panic, a bug: here its clock panics at its
/// second reading, just before the commit) logs its opens at once: its
/// open intent is written as `open_interrupted` leaves by the deferred
/// writer, the intent is gone, and nothing is spent. Only the granted
/// candidates are in it (a budget of 2 for 3 envelopes).
#[test]
fn an_unwrap_that_panics_after_its_opens_logs_them_open_interrupted() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let envelopes: Vec<_> = (0..3)
        .map(|i| {
            w.envelope(
                "acct:alice@example.com",
                "2026-12-03T10:00:00Z",
                &format!("p{i}"),
                &[5; 32],
            )
        })
        .collect();
    let body = serde_json::json!({"warrant": w.warrant("W-P", 2, &[&w.exec, &w.judge]), "envelopes": envelopes});
    let before = w.store.tree_size().unwrap();
    let readings = std::sync::atomic::AtomicUsize::new(0);
    let clock = || {
        assert!(
            readings.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0,
            "the clock's second reading (the test's panic)"
        );
        t("2026-12-05T00:00:00Z")
    };
    let limits = EnvelopeLimits::default();
    let ctx = w.context(&limits);
    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        unwrap(&ctx, AGENCY, body.to_string().as_bytes(), &clock)
    }));
    assert!(ended.is_err(), "the unwrap did not panic");
    assert_eq!(readings.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(w.log.flush_deferred(std::time::Duration::from_secs(10)), 0);
    let size = w.store.tree_size().unwrap();
    let leaves: Vec<serde_json::Value> = w
        .store
        .leaves(before, size)
        .unwrap()
        .iter()
        .map(|(_, leaf)| serde_json::from_slice(leaf).unwrap())
        .collect();
    let digests: Vec<_> = envelopes[..2]
        .iter()
        .map(|e| {
            let mut bytes = lavd::codec::b64_decode(e["header"].as_str().unwrap()).unwrap();
            bytes.extend(lavd::codec::b64_decode(e["enc"].as_str().unwrap()).unwrap());
            lavd::codec::b64_encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                &bytes,
            ))
        })
        .collect();
    let interrupted: Vec<_> = leaves
        .iter()
        .filter(|l| l["event"] == "unwrap")
        .map(|l| {
            (
                l["envelope_digest"].as_str().unwrap().to_string(),
                l["outcome"].as_str().unwrap().to_string(),
                l["reason"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        interrupted,
        digests
            .iter()
            .map(|d| (
                d.clone(),
                "denied".to_string(),
                "open_interrupted".to_string()
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(w.store.orphaned_intents(10).unwrap(), []);
    assert_eq!(w.store.spent("W-P").unwrap(), Some(0));
}

/// Deferred leaves whose open intent is already gone (their request's
/// commit landed after all, or a replica wrote the intent once its lease
/// ran out: the deferred writer cannot tell which) are written all the
/// same: the log may say an envelope twice, never not at all.
#[test]
fn deferred_leaves_whose_intent_is_gone_are_written_all_the_same() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let w = World::new();
    let before = w.store.tree_size().unwrap();
    let warrant = lavd::audit::leaf::WarrantRef {
        id: "W-D",
        digest: lavd::audit::leaf::Digest::of_warrant_payload(b"payload"),
        emergency: false,
    };
    let mut leaf = lavd::audit::leaf::Unwrap::new(
        AGENCY,
        &warrant,
        Some("2026-12"),
        Some(lavd::audit::leaf::Digest::of_envelope(b"{}", &[4; 65])),
        lavd::audit::leaf::UnwrapOutcome::Opened,
    )
    .unwrap();
    leaf.deny(lavd::envelope::reply::DenyReason::AuditCommitFailed);
    w.log.append_later(lavd::store::AuditAppend {
        events: vec![leaf.into()],
        time: t("2026-12-05T00:00:00Z"),
        spend: lavd::store::Spend::ClearIntent(424_242),
    });
    assert_eq!(w.log.flush_deferred(std::time::Duration::from_secs(10)), 0);
    let size = w.store.tree_size().unwrap();
    assert_eq!(size, before + 1);
    let (_, written) = &w.store.leaves(before, size).unwrap()[0];
    let written: serde_json::Value = serde_json::from_slice(written).unwrap();
    assert_eq!(
        (&written["warrant_id"], &written["reason"]),
        (
            &serde_json::json!("W-D"),
            &serde_json::json!("audit_commit_failed")
        )
    );
}
