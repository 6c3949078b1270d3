//! PROTOCOL §4 urgent warrants: usable under the emergency rule for at most
//! `max_hours` after `not_before`, refused without an emergency rule, and
//! replaced by a fully signed warrant with the same `id` and claims, which
//! keeps the budget already spent. Once replaced, the urgent payload is
//! refused.

mod warrant_common;

use lavd::store::{Registration, Store, WarrantStore};
use lavd::warrant::admit;
use warrant_common::*;

fn urgent(id: &str) -> serde_json::Value {
    let mut c = claims(id);
    c["emergency"] = true.into();
    c
}

#[test]
fn urgent_warrant_is_usable_for_max_hours_only() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    let bytes = signed(&urgent("U-1"), &[&a.exec1]);
    // not_before is 2026-11-24T00:00:00Z; 72 hours later is 2026-11-27T00:00:00Z.
    let w = v.verify(&bytes, t("2026-11-24T00:00:00Z"), AGENCY).unwrap();
    assert!(w.is_emergency());
    assert_eq!(w.usable_until(), t("2026-11-27T00:00:00Z"));
    assert!(v.verify(&bytes, t("2026-11-26T23:59:59Z"), AGENCY).is_ok());
    let err = v
        .verify(&bytes, t("2026-11-27T00:00:00Z"), AGENCY)
        .unwrap_err();
    assert_eq!(err.code(), "emergency_expired");
    assert!(err.to_string().contains("2026-11-27T00:00:00Z"), "{err}");
    assert_eq!(
        v.verify(&bytes, t("2026-12-10T00:00:00Z"), AGENCY)
            .unwrap_err()
            .code(),
        "emergency_expired"
    );
    assert_eq!(
        v.verify(&bytes, t("2026-11-23T00:00:00Z"), AGENCY)
            .unwrap_err()
            .code(),
        "warrant_not_yet_valid"
    );

    // When `expires` comes before the emergency period ends, it wins.
    let mut short = urgent("U-short");
    short["expires"] = "2026-11-25T00:00:00Z".into();
    let bytes = signed(&short, &[&a.exec1]);
    let w = v.verify(&bytes, t("2026-11-24T12:00:00Z"), AGENCY).unwrap();
    assert_eq!(w.usable_until(), t("2026-11-25T00:00:00Z"));
    assert_eq!(
        v.verify(&bytes, t("2026-11-25T00:00:00Z"), AGENCY)
            .unwrap_err()
            .code(),
        "warrant_expired"
    );
}

/// `not_before` + `max_hours` past the last representable time (year
/// 9999): refused with its code, not a panic.
#[test]
fn urgent_warrant_at_the_end_of_time_is_refused_not_a_panic() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    let mut c = urgent("U-9999");
    c["not_before"] = "9999-12-31T00:00:00Z".into();
    c["expires"] = "9999-12-31T12:00:00Z".into();
    let bytes = signed(&c, &[&a.exec1]);
    assert_eq!(
        v.verify(&bytes, now(), AGENCY).unwrap_err().code(),
        "warrant_not_yet_valid"
    );
}

#[test]
fn urgent_warrant_needs_an_emergency_rule_and_meets_it() {
    let a = Authorities::new();
    let c = urgent("U-2");
    // No emergency rule: refused, even when fully signed.
    let v = a.verifier(DOUBLE_LOCK);
    assert_eq!(
        v.verify(&signed(&c, &[&a.exec1]), now(), AGENCY)
            .unwrap_err()
            .code(),
        "emergency_not_allowed"
    );
    assert_eq!(
        v.verify(&signed(&c, &[&a.exec1, &a.jud1]), now(), AGENCY)
            .unwrap_err()
            .code(),
        "emergency_not_allowed"
    );

    let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    // The emergency rule wants an executive; a judicial alone does not do.
    let err = v
        .verify(&signed(&c, &[&a.jud1]), now(), AGENCY)
        .unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(
        err.to_string()
            .contains("emergency policy not met: needs 1 executive (found 0)"),
        "{err}"
    );
    // An ordinary warrant does not get the emergency rule's lower bar.
    let err = v
        .verify(&signed(&claims("N-1"), &[&a.exec1]), now(), AGENCY)
        .unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(
        err.to_string().contains("needs 1 judicial (found 0)"),
        "{err}"
    );
    // Extra signatures do not lift the urgent limit: `emergency: true` is a claim.
    let w = v
        .verify(&signed(&c, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    assert!(w.is_emergency());
    assert_eq!(w.usable_until(), t("2026-11-27T00:00:00Z"));
}

/// The fully signed replacement may spell a time otherwise than the urgent
/// warrant did (`.000Z`, as JavaScript's `toISOString` writes it): the same
/// instant, so the same warrant, and it replaces the urgent one. Before,
/// the digest hashed the spelling, and the replacement was refused
/// `warrant_id_conflict` for good. Another instant is still a conflict.
#[test]
fn a_replacement_may_spell_the_same_times_otherwise() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    let urgent_claims = urgent("U-9");
    let urgent_w = v
        .verify(&signed(&urgent_claims, &[&a.exec1]), now(), AGENCY)
        .unwrap();
    assert_eq!(admit(&store, &urgent_w, now()).unwrap(), Registration::New);
    let respelled = |claims: &serde_json::Value, suffix: &str| {
        let mut full = claims.clone();
        full.as_object_mut().unwrap().remove("emergency");
        for time in ["/not_before", "/expires", "/window/from", "/window/to"] {
            let text = full.pointer(time).unwrap().as_str().unwrap().to_string();
            assert!(text.ends_with(":00Z"), "{time}: {text}");
            *full.pointer_mut(time).unwrap() = text.replace(":00Z", suffix).into();
        }
        v.verify(&signed(&full, &[&a.exec2, &a.jud1]), now(), AGENCY)
            .unwrap()
    };
    let other_instant = respelled(&urgent("U-9"), ":00.5Z");
    assert_eq!(
        admit(&store, &other_instant, now()).unwrap_err().code(),
        "warrant_id_conflict"
    );
    let full_w = respelled(&urgent_claims, ":00.000Z");
    assert_eq!(urgent_w.normalized_digest(), full_w.normalized_digest());
    assert_eq!(
        admit(&store, &full_w, now()).unwrap(),
        Registration::Upgraded
    );
}

/// An urgent warrant registered before 2026-12-06, whose stored normalized
/// digest hashed its times as spelled (`.000Z`), is still replaced by the
/// fully signed warrant spelled the same way: the legacy form is compared
/// too. Without that second look it would be `warrant_id_conflict`.
#[test]
fn a_replacement_matches_an_urgent_warrant_registered_in_the_legacy_form() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    let spelled = |mut c: serde_json::Value| {
        let text = c["expires"].as_str().unwrap().replace(":00Z", ":00.000Z");
        c["expires"] = text.into();
        c
    };
    let urgent_claims = spelled(urgent("U-10"));
    let urgent_w = v
        .verify(&signed(&urgent_claims, &[&a.exec1]), now(), AGENCY)
        .unwrap();
    let legacy = *urgent_w
        .legacy_normalized_digest()
        .expect("spelled otherwise");
    assert_ne!(&legacy, urgent_w.normalized_digest());
    // As lavd before 2026-12-06 registered it.
    let registered = store
        .register(&lavd::store::WarrantRecord {
            id: "U-10".into(),
            payload_digest: *urgent_w.digest(),
            normalized_digest: legacy,
            emergency: true,
            max_unwraps: urgent_w.claims().max_unwraps,
            seen_at: now(),
        })
        .unwrap();
    assert_eq!(registered, Registration::New);
    let mut full_claims = urgent_claims.clone();
    full_claims.as_object_mut().unwrap().remove("emergency");
    let full_w = v
        .verify(&signed(&full_claims, &[&a.exec2, &a.jud1]), now(), AGENCY)
        .unwrap();
    assert_eq!(
        admit(&store, &full_w, now()).unwrap(),
        Registration::Upgraded
    );
}

#[test]
fn fully_signed_replacement_keeps_the_budget() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lavd.db");

    let urgent_claims = urgent("U-3");
    let mut full_claims = urgent_claims.clone();
    full_claims.as_object_mut().unwrap().remove("emergency");
    let urgent_w = v
        .verify(&signed(&urgent_claims, &[&a.exec1]), now(), AGENCY)
        .unwrap();
    let full_w = v
        .verify(
            &signed(&full_claims, &[&a.exec2, &a.jud1]),
            t("2026-11-28T00:00:00Z"),
            AGENCY,
        )
        .unwrap();
    assert_ne!(urgent_w.digest(), full_w.digest());
    assert_eq!(urgent_w.normalized_digest(), full_w.normalized_digest());

    {
        let store = Store::open(&path).unwrap();
        assert_eq!(admit(&store, &urgent_w, now()).unwrap(), Registration::New);
        let r = store.reserve("U-3", 4).unwrap();
        assert_eq!(r.granted(), 4);
        store.settle(r, 4).unwrap();
    }
    // After a restart, past the emergency period, the full warrant replaces it.
    let store = Store::open(&path).unwrap();
    assert_eq!(
        v.verify(
            &signed(&urgent_claims, &[&a.exec1]),
            t("2026-11-28T00:00:00Z"),
            AGENCY
        )
        .unwrap_err()
        .code(),
        "emergency_expired"
    );
    assert_eq!(
        admit(&store, &full_w, t("2026-11-28T00:00:00Z")).unwrap(),
        Registration::Upgraded
    );
    assert_eq!(store.spent("U-3").unwrap(), Some(4));
    let r = store.reserve("U-3", 100).unwrap();
    assert_eq!(
        r.granted(),
        6,
        "max_unwraps 10 minus the 4 spent under the urgent warrant"
    );
    store.settle(r, 0).unwrap();
    assert_eq!(admit(&store, &full_w, now()).unwrap(), Registration::Known);
    // The urgent payload is no longer usable, even inside its hours.
    assert_eq!(
        admit(&store, &urgent_w, now()).unwrap_err().code(),
        "emergency_superseded"
    );
}

#[test]
fn replacement_must_have_the_same_claims() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();

    let urgent_claims = urgent("U-4");
    admit(
        &store,
        &v.verify(&signed(&urgent_claims, &[&a.exec1]), now(), AGENCY)
            .unwrap(),
        now(),
    )
    .unwrap();
    // A "replacement" that also raises the budget is a different warrant.
    let mut bigger = urgent_claims.clone();
    bigger.as_object_mut().unwrap().remove("emergency");
    bigger["max_unwraps"] = 1000.into();
    let w = v
        .verify(&signed(&bigger, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    assert_eq!(
        admit(&store, &w, now()).unwrap_err().code(),
        "warrant_id_conflict"
    );
    // As is a second urgent warrant with the same id and other targets.
    let mut other = urgent_claims.clone();
    other["targets"] = serde_json::json!(["acct:carol@example.com"]);
    let w = v
        .verify(&signed(&other, &[&a.exec1]), now(), AGENCY)
        .unwrap();
    assert_eq!(
        admit(&store, &w, now()).unwrap_err().code(),
        "warrant_id_conflict"
    );
    // `"emergency": false` is the fully signed form too.
    let mut explicit = urgent_claims.clone();
    explicit["emergency"] = false.into();
    let w = v
        .verify(&signed(&explicit, &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    assert_eq!(admit(&store, &w, now()).unwrap(), Registration::Upgraded);
}
