//! Envelopes and headers (PROTOCOL §3): arbitrary bytes, byte edits of a
//! sealed envelope, JSON-tree edits of its header, and the round trip.

use lavd::codec::{b64_encode, parse_time};
use lavd::envelope::{seal_envelope, Envelope, EnvelopeLimits, Header, HeaderBuilder};
use lavd::jwk::P256PrivateKey;
use proptest::prelude::*;

use crate::common::{self, apply, apply_json, edits, field_text, json_edits, time, token};
use crate::targets;

/// A sealed envelope whose header fields are in bounds.
fn sealed() -> impl Strategy<Value = Envelope> {
    (
        token(),
        token(),
        token(),
        time(),
        proptest::option::of(field_text(256)),
        16usize..=64,
    )
        .prop_filter_map(
            "ref out of bounds",
            |(kid, provider, target, t, reference, n)| {
                let mut builder = HeaderBuilder::new(kid, provider, target, t);
                if let Some(r) = reference {
                    builder = builder.reference(r);
                }
                let header = builder.build().ok()?;
                let key = P256PrivateKey::generate().unwrap();
                Some(seal_envelope(key.public(), &header, &vec![7u8; n]).unwrap())
            },
        )
}

/// A header as a JSON value, fields anywhere in or out of their bounds.
fn header_json() -> impl Strategy<Value = serde_json::Value> {
    (
        field_text(64),
        field_text(512),
        field_text(512),
        time(),
        proptest::option::of(field_text(256)),
    )
        .prop_map(|(kid, provider, target, t, reference)| {
            let mut h = serde_json::json!({
                "kid": kid, "suite": "16-1-2", "provider": provider, "target": target,
                "time": lavd::codec::format_time(t),
            });
            if let Some(r) = reference {
                h["ref"] = r.into();
            }
            h
        })
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        targets::envelope(&data);
    }

    #[test]
    fn edits_of_a_sealed_envelope(env in sealed(), edits in edits()) {
        let json = env.to_json();
        // The round trip of the canonical form, byte for byte.
        let parsed = Envelope::parse(json.as_bytes(), &EnvelopeLimits::default()).unwrap();
        prop_assert_eq!(&parsed, &env);
        prop_assert_eq!(parsed.to_json(), json.clone());
        targets::envelope(&apply(json.as_bytes(), &edits));
        // The same edits inside the header, re-wrapped in valid base64url.
        let header = apply(env.header_bytes(), &edits);
        let rewrapped = json.replacen(&b64_encode(env.header_bytes()), &b64_encode(&header), 1);
        targets::envelope(rewrapped.as_bytes());
        targets::envelope(&header);
    }

    /// Header fields anywhere in or out of bounds, and JSON-tree edits: a
    /// header parses exactly when every field keeps its one bound.
    #[test]
    fn header_fields_and_structure(h in header_json(), edits in json_edits(), edit in any::<bool>()) {
        let value = if edit { apply_json(&h, &edits) } else { h.clone() };
        let bytes = value.to_string().into_bytes();
        targets::envelope(&bytes);
        let parsed = Header::parse(&bytes, &EnvelopeLimits::default());
        if !edit {
            let ok = |f: &str, check: fn(&str) -> Result<(), lavd::bounds::BoundError>| {
                check(h[f].as_str().unwrap()).is_ok()
            };
            let expected = ok("kid", lavd::bounds::kid)
                && ok("provider", lavd::bounds::provider)
                && ok("target", lavd::bounds::target)
                && h.get("ref").is_none_or(|_| ok("ref", lavd::bounds::message_ref))
                && bytes.len() <= EnvelopeLimits::default().max_header_bytes;
            prop_assert_eq!(parsed.is_ok(), expected, "{}", value);
        }
        if let Some(dup) = common::with_duplicate_member(&value) {
            let e = Header::parse(dup.as_bytes(), &EnvelopeLimits::default()).unwrap_err();
            prop_assert_eq!(e.code(), "malformed_envelope");
        }
    }
}

#[test]
fn fractional_seconds_and_offsets() {
    // The builder writes whole seconds in `Z`; fractions parse (the header
    // bytes are kept as received).
    let t = parse_time("2026-11-26T07:25:21.5Z").unwrap();
    let h = String::from_utf8(HeaderBuilder::new("k", "p", "t", t).build().unwrap()).unwrap();
    assert!(h.contains("\"2026-11-26T07:25:21Z\""), "{h}");
    // A header's time is read as sealed (`parse_sealed_time`): UTC in any
    // spelling RFC 3339 has for it is the same time; another offset is
    // refused (`parse_time`, for what lavd's own tools take, takes only `Z`).
    let header = |time: &str| {
        let bytes = h.replace("2026-11-26T07:25:21Z", time);
        Header::parse(bytes.as_bytes(), &EnvelopeLimits::default())
    };
    let z = header("2026-11-26T07:25:21Z").unwrap().time();
    for utc in [
        "2026-11-26T07:25:21+00:00",
        "2026-11-26T07:25:21-00:00",
        "2026-11-26T07:25:21z",
    ] {
        assert_eq!(header(utc).unwrap().time(), z, "{utc}");
    }
    let e = header("2026-11-26T08:25:21+01:00").unwrap_err();
    assert_eq!(e.code(), "malformed_envelope");
    assert!(parse_time("2026-11-26T07:25:21+00:00").is_err());
}
