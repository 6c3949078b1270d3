//! Warrant JWS and claims (PROTOCOL §4): arbitrary bytes, byte edits of a
//! signed warrant, claims edited as a JSON tree and then *validly signed*
//! (so the claims parser is reached behind real signatures), and the round
//! trip of the JWS serializer.

use lavd::warrant::{jws, WarrantLimits};
use proptest::prelude::*;

use crate::common::{self, apply, apply_json, edits, field_text, json_edits};
use crate::targets::{self, assert_code, WARRANT_PARSE_CODES, WARRANT_VERIFY_CODES};
use crate::warrant_common::{self as wc, Authorities, AGENCY, DOUBLE_LOCK_WITH_EMERGENCY};

/// Every authority of the warrant tests, and a verifier of the double lock
/// with the urgent procedure (shared with the revocation properties).
pub fn fixture() -> &'static (Authorities, lavd::warrant::Verifier) {
    static F: std::sync::OnceLock<(Authorities, lavd::warrant::Verifier)> =
        std::sync::OnceLock::new();
    F.get_or_init(|| {
        let a = Authorities::new();
        let v = a.verifier(DOUBLE_LOCK_WITH_EMERGENCY);
        (a, v)
    })
}

/// Valid claims with the free-text fields anywhere in or out of bounds.
fn claims() -> impl Strategy<Value = serde_json::Value> {
    (
        field_text(128),
        field_text(1024),
        prop::collection::vec(field_text(512), 0..4),
        prop::option::of(prop::collection::vec(field_text(64), 0..3)),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(10),
            Just((1 << 53) - 1),
            Just(1 << 53)
        ],
        any::<bool>(),
    )
        .prop_map(|(id, basis, targets, kids, max, emergency)| {
            let mut c = wc::claims(&id);
            c["legal_basis"] = basis.into();
            if !targets.is_empty() {
                c["targets"] = targets.into();
            }
            if let Some(kids) = kids {
                c["kids"] = kids.into();
            }
            c["max_unwraps"] = max.into();
            if emergency {
                c["emergency"] = true.into();
            }
            c
        })
}

fn verify(bytes: &[u8]) -> Result<lavd::warrant::VerifiedWarrant, lavd::warrant::WarrantError> {
    fixture().1.verify(bytes, wc::now(), AGENCY)
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        targets::warrant(&data);
    }

    /// Claims edited as JSON, then signed by both authorities: whatever the
    /// claims parser decides, it is a typed refusal or a warrant whose
    /// claims are the signed ones.
    #[test]
    fn signed_claims_in_and_out_of_bounds(c in claims(), edits in json_edits(), edit in any::<bool>()) {
        let (a, _) = fixture();
        let value = if edit { apply_json(&c, &edits) } else { c };
        let payload = value.to_string();
        let signed = wc::signed_bytes(payload.as_bytes(), &[&a.exec1, &a.jud1]);
        match verify(&signed) {
            Ok(w) => {
                prop_assert_eq!(w.id(), value["id"].as_str().unwrap());
                prop_assert_eq!(w.claims().max_unwraps, value["max_unwraps"].as_u64().unwrap());
                prop_assert!(lavd::bounds::warrant_id(w.id()).is_ok());
                for t in &w.claims().targets {
                    prop_assert!(lavd::bounds::target(t).is_ok());
                }
            }
            Err(e) => assert_code(e.code(), &[WARRANT_PARSE_CODES, WARRANT_VERIFY_CODES], "verify", &signed),
        }
        targets::warrant(&signed);
        targets::warrant(payload.as_bytes());
        if let Some(dup) = common::with_duplicate_member(&value) {
            let signed = wc::signed_bytes(dup.as_bytes(), &[&a.exec1, &a.jud1]);
            prop_assert_eq!(verify(&signed).unwrap_err().code(), "malformed_warrant");
        }
    }

    /// Byte edits of a valid, signed warrant never verify unless they left
    /// the signed bytes alone, and never fail in an undocumented way.
    #[test]
    fn edits_of_a_signed_warrant(edits in edits(), flattened in any::<bool>()) {
        let (a, _) = fixture();
        let payload = wc::claims("W-prop").to_string();
        let signed = if flattened {
            let general: serde_json::Value = serde_json::from_slice(&wc::signed_bytes(payload.as_bytes(), &[&a.exec1])).unwrap();
            let sig = &general["signatures"][0];
            serde_json::json!({"payload": general["payload"], "protected": sig["protected"], "signature": sig["signature"]}).to_string().into_bytes()
        } else {
            wc::signed_bytes(payload.as_bytes(), &[&a.exec1, &a.jud1])
        };
        let edited = apply(&signed, &edits);
        targets::warrant(&edited);
        if let Ok(w) = verify(&edited) {
            // Only edits outside what is signed (whitespace, member order)
            // can leave a warrant that verifies, and it is the same warrant.
            let original = jws::parse(&signed, &WarrantLimits::default()).unwrap();
            let digest = lavd::audit::leaf::Digest::of_warrant_payload(original.payload());
            prop_assert_eq!(w.digest(), digest.as_bytes());
        }
    }
}

/// A refused request's claimed warrant id (for its log span and refusal
/// leaf) is read only up to the verifier's size bound, like the warrant
/// itself: one byte over it claims nothing. Found by review: the probe
/// parsed any size into a `serde_json::Value` tree.
#[test]
fn a_claimed_warrant_id_is_read_within_the_size_bound_only() {
    let (a, _) = fixture();
    let max = WarrantLimits::default().max_warrant_bytes;
    let warrant = wc::signed(&wc::claims("W-CLAIMED"), &[&a.exec1, &a.jud1]);
    let padded = |len: usize| {
        let pad = " ".repeat(len - warrant.len());
        format!("{{{pad}{}", std::str::from_utf8(&warrant[1..]).unwrap())
    };
    let body = |w: &str| format!(r#"{{"envelopes":[],"warrant":{w}}}"#);
    let at_max = padded(max);
    assert_eq!(at_max.len(), max);
    assert_eq!(
        lavd::unwrap::claimed_warrant_id(body(&at_max).as_bytes(), max).as_deref(),
        Some("W-CLAIMED")
    );
    assert_eq!(
        lavd::unwrap::claimed_warrant_id(body(&padded(max + 1)).as_bytes(), max),
        None
    );
    // Not an object, or no warrant: nothing, and no error.
    for junk in [
        "[0,0,0]",
        "{}",
        r#"{"warrant":[0,0]}"#,
        r#"{"warrant":"x"}"#,
    ] {
        assert_eq!(
            lavd::unwrap::claimed_warrant_id(junk.as_bytes(), max),
            None,
            "{junk}"
        );
    }
}
