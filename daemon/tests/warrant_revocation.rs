//! PROTOCOL §6 revocation by an authority: a JWS whose payload is exactly
//! `{"id","reason","time"}`, every signature verifying, signed by at least one
//! authority of a role the policy names. Once recorded, the warrant is refused.

mod warrant_common;

use lavd::store::{Revocation, Store, WarrantStore};
use lavd::warrant::admit;
use warrant_common::*;

fn revocation(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "reason": "authorisation quashed on review", "time": NOW})
}

#[test]
fn authority_revocation_is_verified_and_final() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    let w = v
        .verify(&signed(&claims("W-r"), &[&a.exec1, &a.jud1]), now(), AGENCY)
        .unwrap();
    admit(&store, &w, now()).unwrap();

    // One judicial authority alone may revoke.
    let rev = v
        .verify_revocation(&signed(&revocation("W-r"), &[&a.jud2]), now())
        .unwrap();
    assert_eq!(
        (rev.id(), rev.reason()),
        ("W-r", "authorisation quashed on review")
    );
    assert_eq!(rev.signers()[0].kid, "judicial-2");
    assert!(store
        .revoke(&Revocation {
            id: rev.id().into(),
            reason: rev.reason().into(),
            revoked_by: rev.signers()[0].kid.clone(),
            revoked_at: now(),
        })
        .unwrap());
    assert_eq!(
        admit(&store, &w, now()).unwrap_err().code(),
        "warrant_revoked"
    );
    assert!(matches!(
        store.reserve("W-r", 1),
        Err(lavd::store::StoreError::WarrantRevoked(_))
    ));
}

#[test]
fn bad_revocations_are_refused_with_their_codes() {
    let a = Authorities::new();
    let v = a.verifier(DOUBLE_LOCK);
    let code = |bytes: Vec<u8>| v.verify_revocation(&bytes, now()).unwrap_err().code();

    assert_eq!(
        code(signed(&revocation("W-r"), &[&a.stranger])),
        "unknown_authority"
    );
    assert_eq!(
        code(signed(&revocation("W-r"), &[&a.retired])),
        "authority_not_valid"
    );
    assert_eq!(
        code(signed(&revocation("W-r"), &[&a.jud1, &a.stranger])),
        "unknown_authority"
    );
    assert_eq!(code(signed(&revocation("W-r"), &[])), "policy_not_met");
    let mut extra = revocation("W-r");
    extra["scope"] = "all".into();
    assert_eq!(code(signed(&extra, &[&a.jud1])), "malformed_warrant");
    assert_eq!(
        code(signed(&revocation(""), &[&a.jud1])),
        "malformed_warrant"
    );
    // A warrant is not a revocation.
    assert_eq!(
        code(signed(&claims("W-r"), &[&a.exec1, &a.jud1])),
        "malformed_warrant"
    );
    // Tampered payload.
    let good = signed(&revocation("W-r"), &[&a.jud1]);
    let mut value: serde_json::Value = serde_json::from_slice(&good).unwrap();
    value["payload"] = lavd::codec::b64_encode(revocation("W-other").to_string()).into();
    assert_eq!(code(value.to_string().into_bytes()), "bad_signature");

    // An authority whose role the policy does not name may not revoke.
    let exec_only = "[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n";
    let v = a.verifier(exec_only);
    let err = v
        .verify_revocation(&signed(&revocation("W-r"), &[&a.jud1]), now())
        .unwrap_err();
    assert_eq!(err.code(), "policy_not_met");
    assert!(err.to_string().contains("executive"), "{err}");
    assert!(v
        .verify_revocation(&signed(&revocation("W-r"), &[&a.exec2]), now())
        .is_ok());
}

/// A revocation co-signed by an authority whose role the policy does not
/// name is recorded under the one whose role it names, though the other's
/// kid sorts first.
#[test]
fn a_revocation_is_credited_to_the_signer_the_policy_names() {
    let a = Authorities::new();
    let judicial_only = "[policy]\n[[policy.require]]\nrole = \"judicial\"\ncount = 1\n";
    let v = a.verifier(judicial_only);
    let rev = v
        .verify_revocation(&signed(&revocation("W-r"), &[&a.exec1, &a.jud1]), now())
        .unwrap();
    assert_eq!(rev.signers()[0].kid, "executive-1");
    assert_eq!(rev.authorised_by(), "judicial-1");
}
