//! Revocations (PROTOCOL §6): the admin body `{"id","reason"}`, the
//! authority body `{"revocation": <JWS>}`, and the JWS payload
//! `{"id","reason","time"}` validly signed by an authority.

use lavd::unwrap::AdminRevocation;
use lavd::warrant::RevocationClaims;
use proptest::prelude::*;

use crate::common::{self, apply, apply_json, edits, field_text, json_edits};
use crate::targets::{self, assert_code, WARRANT_PARSE_CODES, WARRANT_VERIFY_CODES};
use crate::warrant::fixture;
use crate::warrant_common as wc;

fn in_bounds(id: &str, reason: &str) -> bool {
    lavd::bounds::warrant_id(id).is_ok() && lavd::bounds::reason(reason).is_ok()
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..400)) {
        targets::revocation(&data);
    }

    /// The admin form: accepted exactly when both fields keep their bounds,
    /// and then unchanged; every edit a typed `malformed_request` or a body
    /// that still has in-bound fields.
    #[test]
    fn admin_body(id in field_text(128), reason in field_text(1024), edits in edits(), jedits in json_edits()) {
        let body = serde_json::json!({"id": id, "reason": reason});
        let bytes = body.to_string().into_bytes();
        match AdminRevocation::parse(&bytes) {
            Ok(r) => {
                prop_assert!(in_bounds(&id, &reason));
                prop_assert_eq!((r.id, r.reason), (id.clone(), reason.clone()));
            }
            Err(e) => {
                prop_assert!(!in_bounds(&id, &reason));
                prop_assert_eq!(e.code(), "malformed_request");
            }
        }
        targets::revocation(&apply(&bytes, &edits));
        targets::revocation(apply_json(&body, &jedits).to_string().as_bytes());
        if let Some(dup) = common::with_duplicate_member(&body) {
            prop_assert_eq!(AdminRevocation::parse(dup.as_bytes()).unwrap_err().code(), "malformed_request");
        }
    }

    /// The authority form, signed by a policy authority: verifies exactly
    /// when the payload is in bounds; edited payloads, signed again, are
    /// typed refusals.
    #[test]
    fn authority_jws(id in field_text(128), reason in field_text(1024), jedits in json_edits(), edit in any::<bool>(), edits in edits()) {
        let (a, verifier) = fixture();
        let payload = serde_json::json!({"id": id, "reason": reason, "time": "2026-11-25T11:00:00Z"});
        let payload = if edit { apply_json(&payload, &jedits) } else { payload };
        let jws = wc::signed_bytes(payload.to_string().as_bytes(), &[&a.jud1]);
        match verifier.verify_revocation(&jws, wc::now()) {
            Ok(r) => {
                prop_assert!(in_bounds(r.id(), r.reason()));
                prop_assert_eq!(r.id(), payload["id"].as_str().unwrap());
            }
            Err(e) => {
                prop_assert!(edit || !in_bounds(&id, &reason), "{}", e);
                assert_code(e.code(), &[WARRANT_PARSE_CODES, WARRANT_VERIFY_CODES], "verify_revocation", &jws);
            }
        }
        let body = format!(r#"{{"revocation":{}}}"#, String::from_utf8_lossy(&jws));
        targets::revocation(body.as_bytes());
        targets::revocation(&apply(body.as_bytes(), &edits));
        match RevocationClaims::parse(payload.to_string().as_bytes()) {
            Ok(r) => prop_assert!(in_bounds(&r.id, &r.reason)),
            Err(e) => prop_assert_eq!(e.code(), "malformed_warrant"),
        }
    }
}
