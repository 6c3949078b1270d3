//! A verifier keeps the warrants it verified (`lavd::warrant::cache`): what
//! is checked again at every use (each signer's validity, the time, the
//! agency) refuses a kept warrant with the code and message a fresh
//! verifier gives; refusals are not kept; an entry goes at the warrant's end
//! of usability; a verifier built for new trust (as a reload builds one)
//! knows nothing of the old one's warrants.

// The helpers are test code: a failed fixture should panic the test (clippy
// only recognises `#[test]` functions as tests).
#![allow(clippy::unwrap_used)]

mod warrant_common;

use std::path::Path;

use lavd::warrant::{TrustStore, Verifier, WarrantError, WarrantLimits};
use time::OffsetDateTime;
use warrant_common::*;

/// `verify` on `kept` (which holds the warrant) and on a fresh verifier
/// for the same trust must refuse alike; returns the code.
fn refused_alike(
    kept: &Verifier,
    fresh: &Verifier,
    bytes: &[u8],
    at: OffsetDateTime,
    caller: &str,
) -> &'static str {
    let from_cache = kept.verify(bytes, at, caller).unwrap_err();
    let from_scratch = fresh.verify(bytes, at, caller).unwrap_err();
    assert_eq!(from_cache.code(), from_scratch.code());
    assert_eq!(from_cache.to_string(), from_scratch.to_string());
    from_cache.code()
}

#[test]
fn a_kept_warrant_is_still_checked_for_time_agency_and_signers() {
    let a = Authorities::new();
    let kept = a.verifier(DOUBLE_LOCK);
    let fresh = || a.verifier(DOUBLE_LOCK);
    // Executable past the authorities' validity (which ends 2028-01-01).
    let mut c = claims("W-kept");
    c["expires"] = "2028-06-01T00:00:00Z".into();
    let bytes = signed(&c, &[&a.exec1, &a.jud1]);

    assert!(kept.verify(&bytes, now(), AGENCY).is_ok());
    assert_eq!(kept.cached_warrants(), 1);

    // Another caller with the same bytes.
    let other = "spiffe://agency.example/lea/unit-8";
    let code = refused_alike(&kept, &fresh(), &bytes, now(), other);
    assert_eq!(code, "agency_mismatch");
    // A clock that went back before `not_before`.
    let early = t("2026-11-23T23:59:59Z");
    let code = refused_alike(&kept, &fresh(), &bytes, early, AGENCY);
    assert_eq!(code, "warrant_not_yet_valid");
    // The signers' validity ends before the warrant's.
    let code = refused_alike(&kept, &fresh(), &bytes, t("2028-01-01T00:00:00Z"), AGENCY);
    assert_eq!(code, "authority_not_valid");
    // None of those refusals dropped or spoiled the kept warrant.
    assert_eq!(kept.cached_warrants(), 1);
    assert!(kept.verify(&bytes, now(), AGENCY).is_ok());
}

#[test]
fn an_entry_ends_with_its_warrant() {
    let a = Authorities::new();
    let kept = a.verifier(DOUBLE_LOCK);
    let bytes = signed(&claims("W-ends"), &[&a.exec1, &a.jud1]);
    assert!(kept
        .verify(&bytes, t("2026-12-23T23:59:59Z"), AGENCY)
        .is_ok());
    assert_eq!(kept.cached_warrants(), 1);
    let code = refused_alike(
        &kept,
        &a.verifier(DOUBLE_LOCK),
        &bytes,
        t("2026-12-24T00:00:00Z"),
        AGENCY,
    );
    assert_eq!(code, "warrant_expired");
    assert_eq!(kept.cached_warrants(), 0, "an expired warrant is dropped");

    // An urgent warrant ends with its emergency period, before `expires`.
    let kept = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
    let mut c = claims("W-urgent");
    c["emergency"] = true.into();
    let bytes = signed(&c, &[&a.exec1]);
    let w = kept.verify(&bytes, now(), AGENCY).unwrap();
    assert_eq!(w.usable_until(), t("2026-11-27T00:00:00Z"));
    assert_eq!(kept.cached_warrants(), 1);
    let code = refused_alike(
        &kept,
        &a.verifier(DOUBLE_LOCK_WITH_EMERGENCY),
        &bytes,
        t("2026-11-27T00:00:00Z"),
        AGENCY,
    );
    assert_eq!(code, "emergency_expired");
    assert_eq!(kept.cached_warrants(), 0);
}

#[test]
fn refusals_are_not_kept() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let c = claims("W-refused");
    let cases: Vec<(Vec<u8>, OffsetDateTime, &str, &str)> = vec![
        (signed(&c, &[&a.exec1]), now(), AGENCY, "policy_not_met"),
        (
            signed(&c, &[&a.exec1, &a.stranger]),
            now(),
            AGENCY,
            "unknown_authority",
        ),
        (
            signed(&c, &[&a.exec1, &a.jud1]),
            now(),
            "spiffe://agency.example/other",
            "agency_mismatch",
        ),
        (
            signed(&c, &[&a.exec1, &a.jud1]),
            t("2026-12-24T00:00:00Z"),
            AGENCY,
            "warrant_expired",
        ),
    ];
    for (bytes, at, caller, expected) in &cases {
        let e: WarrantError = v.verify(bytes, *at, caller).unwrap_err();
        assert_eq!(e.code(), *expected);
        assert_eq!(v.cached_warrants(), 0, "{expected} was kept");
    }
    // The same bytes as the agency_mismatch case, from the agency: kept.
    assert!(v.verify(&cases[2].0, now(), AGENCY).is_ok());
    assert_eq!(v.cached_warrants(), 1);
}

#[test]
fn new_trust_starts_with_nothing_kept() {
    let a = Authorities::new();
    let before = a.verifier(DOUBLE_LOCK);
    let bytes = signed(&claims("W-reload"), &[&a.exec1, &a.jud1]);
    assert!(before.verify(&bytes, now(), AGENCY).is_ok());
    assert_eq!(before.cached_warrants(), 1);

    // A reload builds a new verifier. Here the judicial authority that
    // signed is gone and the policy needs only an executive: the old
    // verifier's memory of the warrant must not make it pass.
    let without_jud1 = a
        .trust_toml("[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n")
        .replace(&jud1_entry(&a), "");
    let trust = TrustStore::from_toml(&without_jud1, Path::new(".")).unwrap();
    let after = Verifier::new(trust, WarrantLimits::default());
    assert_eq!(after.cached_warrants(), 0);
    let e = after.verify(&bytes, now(), AGENCY).unwrap_err();
    assert_eq!(e.code(), "unknown_authority");
    assert!(e.to_string().contains("judicial-1"), "{e}");
}

/// The `[[authorities]]` entry of `judicial-1` in [`Authorities::trust_toml`].
fn jud1_entry(a: &Authorities) -> String {
    let full = a.trust_toml("");
    let start = full.find("kid = \"judicial-1\"").unwrap();
    let start = full[..start].rfind("[[authorities]]").unwrap();
    let end = start + full[start..].find("\n\n").unwrap() + 2;
    full[start..end].to_string()
}
