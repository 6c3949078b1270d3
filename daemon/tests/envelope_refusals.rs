//! PROTOCOL §3: envelopes that must be refused, each with its exact code and
//! the variant naming the cause.
// A test crate: its helper functions (outside `#[test]`) panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lavd::bounds::{BoundError, Unit};
use lavd::codec::{b64_encode, parse_time};
use lavd::envelope::hpke::{self, Aead};
use lavd::envelope::{
    open_envelope, seal_envelope, Envelope, EnvelopeError, EnvelopeLimits, HeaderBuilder,
};
use lavd::jwk::P256PrivateKey;

const HEADER: &str = r#"{"kid":"2026-11","suite":"16-1-2","provider":"spiffe://provider.example/mail","target":"acct:alice@example.com","time":"2026-11-26T07:25:21Z","ref":"msg-8812"}"#;

struct Fixture {
    key: P256PrivateKey,
    enc: String,
    ct: String,
}

/// A real sealed envelope whose parts the tests recombine.
fn fixture() -> Fixture {
    let key = P256PrivateKey::generate().unwrap();
    let env = seal_envelope(key.public(), HEADER.as_bytes(), &[0x42; 32]).unwrap();
    Fixture {
        enc: b64_encode(env.enc().sec1()),
        ct: b64_encode(env.ct()),
        key,
    }
}

fn envelope_json(header: &str, enc: &str, ct: &str) -> String {
    format!(
        r#"{{"v":1,"header":"{}","enc":"{enc}","ct":"{ct}"}}"#,
        b64_encode(header)
    )
}

fn parse(json: &str) -> Result<Envelope, EnvelopeError> {
    Envelope::parse(json.as_bytes(), &EnvelopeLimits::default())
}

fn refused(json: &str) -> EnvelopeError {
    let err = parse(json).unwrap_err();
    assert_eq!(err.code(), "malformed_envelope", "{err}");
    err
}

#[test]
fn fixture_itself_parses_and_opens() {
    let f = fixture();
    let env = parse(&envelope_json(HEADER, &f.enc, &f.ct)).unwrap();
    assert_eq!(env.header_bytes(), HEADER.as_bytes());
    let dek = open_envelope(&env, f.key.public(), |e| hpke::software_dh(&f.key, e)).unwrap();
    assert_eq!(&dek[..], &[0x42; 32]);
}

#[test]
fn unknown_member_is_refused() {
    let f = fixture();
    let json = envelope_json(HEADER, &f.enc, &f.ct).replace(r#""v":1,"#, r#""v":1,"x":0,"#);
    assert!(matches!(refused(&json), EnvelopeError::Json(m) if m.contains("unknown field `x`")));
}

#[test]
fn duplicate_member_is_refused() {
    let f = fixture();
    let json = envelope_json(HEADER, &f.enc, &f.ct).replace(r#""v":1,"#, r#""v":1,"v":1,"#);
    assert!(matches!(refused(&json), EnvelopeError::Json(m) if m.contains("duplicate field `v`")));
}

#[test]
fn trailing_data_is_refused() {
    let f = fixture();
    let json = format!("{} {{}}", envelope_json(HEADER, &f.enc, &f.ct));
    assert!(matches!(refused(&json), EnvelopeError::Json(m) if m.contains("trailing")));
}

#[test]
fn version_other_than_1_is_refused() {
    let f = fixture();
    let json = envelope_json(HEADER, &f.enc, &f.ct).replace(r#""v":1"#, r#""v":2"#);
    assert_eq!(refused(&json), EnvelopeError::UnsupportedVersion(2));
    let json = envelope_json(HEADER, &f.enc, &f.ct).replace(r#""v":1"#, r#""v":"1""#);
    assert!(matches!(refused(&json), EnvelopeError::Json(_)));
}

#[test]
fn wrong_suite_is_refused() {
    let f = fixture();
    let header = HEADER.replace("16-1-2", "16-1-1");
    assert_eq!(
        refused(&envelope_json(&header, &f.enc, &f.ct)),
        EnvelopeError::UnsupportedSuite
    );
}

#[test]
fn bad_base64_is_refused_per_member() {
    let f = fixture();
    let good = envelope_json(HEADER, &f.enc, &f.ct);
    // Padding, the standard alphabet, and a character outside both.
    let padded_header = good.replace(&b64_encode(HEADER), &format!("{}==", b64_encode(HEADER)));
    assert_eq!(refused(&padded_header), EnvelopeError::Base64("header"));
    let std_enc = good.replace(&f.enc, &format!("+{}", &f.enc[1..]));
    assert_eq!(refused(&std_enc), EnvelopeError::Base64("enc"));
    let bad_enc = good.replace(&f.enc, &format!("*{}", &f.enc[1..]));
    assert_eq!(refused(&bad_enc), EnvelopeError::Base64("enc"));
    let std_ct = good.replace(&f.ct, &format!("{}/", &f.ct[..f.ct.len() - 1]));
    assert_eq!(refused(&std_ct), EnvelopeError::Base64("ct"));
}

#[test]
fn enc_of_64_bytes_is_refused() {
    let f = fixture();
    let short = b64_encode(&lavd::codec::b64_decode(&f.enc).unwrap()[..64]);
    assert_eq!(
        refused(&envelope_json(HEADER, &short, &f.ct)),
        EnvelopeError::InvalidEnc
    );
}

#[test]
fn off_curve_enc_is_refused() {
    let f = fixture();
    let mut point = lavd::codec::b64_decode(&f.enc).unwrap();
    point[64] ^= 0x01;
    assert_eq!(
        refused(&envelope_json(HEADER, &b64_encode(&point), &f.ct)),
        EnvelopeError::InvalidEnc
    );
    // The all-zero "point" (a common encoding of the identity) is not on the curve.
    let mut zero = [0u8; 65];
    zero[0] = 0x04;
    assert_eq!(
        refused(&envelope_json(HEADER, &b64_encode(zero), &f.ct)),
        EnvelopeError::InvalidEnc
    );
    // P-256's generator G, a point on the curve: the ephemeral key of the
    // scalar 1, which no honest sender draws (and a derive on G is lavd's
    // own pair check).
    assert_eq!(
        refused(&envelope_json(
            HEADER,
            &b64_encode(lavd::hsm::P256_GENERATOR),
            &f.ct
        )),
        EnvelopeError::InvalidEnc
    );
}

#[test]
fn oversize_ref_is_refused_and_256_bytes_is_accepted() {
    let f = fixture();
    let at_limit = HEADER.replace("msg-8812", &"r".repeat(256));
    parse(&envelope_json(&at_limit, &f.enc, &f.ct)).unwrap();
    let over = HEADER.replace("msg-8812", &"r".repeat(257));
    assert_eq!(
        refused(&envelope_json(&over, &f.enc, &f.ct)),
        EnvelopeError::HeaderField {
            field: "ref",
            why: BoundError::TooLong {
                max: 256,
                unit: Unit::Bytes
            }
        }
    );
    let time = parse_time("2026-11-26T07:25:21Z").unwrap();
    let built = HeaderBuilder::new("2026-11", "spiffe://p", "acct:a", time)
        .reference("r".repeat(257))
        .build()
        .unwrap_err();
    assert!(
        matches!(built, EnvelopeError::HeaderField { field: "ref", .. }),
        "{built:?}"
    );
}

#[test]
fn header_refusals() {
    let f = fixture();
    let cases: [(String, &str); 7] = [
        (
            HEADER.replace(r#""ref""#, r#""extra":1,"ref""#),
            "unknown field `extra`",
        ),
        (
            HEADER.replace(r#""kid":"2026-11","#, r#""kid":"2026-11","kid":"2026-12","#),
            "duplicate field `kid`",
        ),
        (format!("{HEADER}\n{{}}"), "trailing"),
        (HEADER.replace("07:25:21Z", "07:25:21+01:00"), "RFC 3339"),
        (HEADER.replace(r#""msg-8812""#, "null"), "null"),
        (
            HEADER.replace(r#","time":"2026-11-26T07:25:21Z""#, ""),
            "missing field `time`",
        ),
        (
            HEADER.replace(r#""kid":"2026-11""#, r#""kid":11"#),
            "invalid type",
        ),
    ];
    for (header, needle) in cases {
        let err = refused(&envelope_json(&header, &f.enc, &f.ct));
        assert!(
            matches!(&err, EnvelopeError::HeaderJson(m) if m.contains(needle)),
            "{header}: {err:?}"
        );
    }
    let empty_target = HEADER.replace("acct:alice@example.com", "");
    assert!(matches!(
        refused(&envelope_json(&empty_target, &f.enc, &f.ct)),
        EnvelopeError::HeaderField {
            field: "target",
            ..
        }
    ));
}

#[test]
fn size_limits_are_enforced() {
    let f = fixture();
    let json = envelope_json(HEADER, &f.enc, &f.ct);
    let limits = EnvelopeLimits {
        max_envelope_bytes: json.len() - 1,
        ..EnvelopeLimits::default()
    };
    let err = Envelope::parse(json.as_bytes(), &limits).unwrap_err();
    assert_eq!(err.code(), "malformed_envelope");
    assert_eq!(
        err,
        EnvelopeError::TooLarge {
            limit: json.len() - 1
        }
    );

    let limits = EnvelopeLimits {
        max_header_bytes: HEADER.len() - 1,
        ..EnvelopeLimits::default()
    };
    let err = Envelope::parse(json.as_bytes(), &limits).unwrap_err();
    assert_eq!(
        err,
        EnvelopeError::HeaderTooLarge {
            limit: HEADER.len() - 1
        }
    );

    let long_target = HEADER.replace("acct:alice@example.com", &"t".repeat(513));
    assert_eq!(
        refused(&envelope_json(&long_target, &f.enc, &f.ct)),
        EnvelopeError::HeaderField {
            field: "target",
            why: BoundError::TooLong {
                max: 512,
                unit: Unit::Bytes
            }
        }
    );
}

/// Every header field has the rule the audit leaf (and, for `kid` and
/// `target`, the warrant claims) use: nothing that parses here can be
/// refused after the HSM has opened a key.
#[test]
fn header_fields_have_the_audit_leafs_rules() {
    let f = fixture();
    let cases: [(&str, &str, &'static str, BoundError); 8] = [
        ("\"2026-11\"", "\"2026 11\"", "kid", BoundError::Whitespace),
        (
            "\"2026-11\"",
            "\"2026\\u00a011\"",
            "kid",
            BoundError::Whitespace,
        ),
        (
            "\"2026-11\"",
            "\"2026\\u202811\"",
            "kid",
            BoundError::Whitespace,
        ),
        (
            "\"2026-11\"",
            "\"2026\\u001b11\"",
            "kid",
            BoundError::Control,
        ),
        ("\"2026-11\"", "\"\"", "kid", BoundError::Empty),
        (
            "acct:alice@example.com",
            "acct:alice\\u0085@example.com",
            "target",
            BoundError::Control,
        ),
        (
            "acct:alice@example.com",
            "acct:alice\\u3000@example.com",
            "target",
            BoundError::Whitespace,
        ),
        (
            "spiffe://provider.example/mail",
            "spiffe://provider.example/mail x",
            "provider",
            BoundError::Whitespace,
        ),
    ];
    for (from, to, field, why) in cases {
        let header = HEADER.replacen(from, to, 1);
        assert_ne!(header, HEADER, "{from} not in the header");
        assert_eq!(
            refused(&envelope_json(&header, &f.enc, &f.ct)),
            EnvelopeError::HeaderField { field, why },
            "{header}"
        );
        let err: EnvelopeError = EnvelopeError::HeaderField { field, why };
        assert_eq!(err.code(), "malformed_envelope");
    }
    // `ref` is opaque (PROTOCOL §3; the audit leaves do not hold it): a
    // control character, or the empty string, is a `ref` like another.
    for (to, read) in [("msg\\n8812", "msg\n8812"), ("", "")] {
        let header = HEADER.replacen("msg-8812", to, 1);
        let env = parse(&envelope_json(&header, &f.enc, &f.ct)).unwrap();
        assert_eq!(env.header().reference(), Some(read), "{header}");
    }
    // At the bound: a 64-byte kid parses (and opens nothing, being unknown).
    let header = HEADER.replacen("2026-11", &"k".repeat(64), 1);
    parse(&envelope_json(&header, &f.enc, &f.ct)).unwrap();
    let header = HEADER.replacen("2026-11", &"k".repeat(65), 1);
    assert!(matches!(
        refused(&envelope_json(&header, &f.enc, &f.ct)),
        EnvelopeError::HeaderField { field: "kid", .. }
    ));
}

/// Seals `dek` with HPKE directly (bypassing `seal_envelope`'s length check)
/// using the documented `info`, as a non-conforming provider might.
fn raw_seal(f: &Fixture, dek: &[u8]) -> String {
    let mut info = b"lav-envelope-v1\x00".to_vec();
    info.extend_from_slice(HEADER.as_bytes());
    let (enc, mut ctx) = hpke::setup_base_s(f.key.public(), &info, Aead::Aes256Gcm).unwrap();
    let ct = ctx.seal(b"", dek).unwrap();
    envelope_json(HEADER, &b64_encode(enc.sec1()), &b64_encode(ct))
}

#[test]
fn dek_of_15_or_65_bytes_is_refused() {
    let f = fixture();
    let key = &f.key;
    for len in [15usize, 65] {
        let err = seal_envelope(key.public(), HEADER.as_bytes(), &vec![1; len]).unwrap_err();
        assert_eq!(err, EnvelopeError::InvalidDek(len));
        assert_eq!(err.code(), "invalid_dek");
        assert_eq!(
            refused(&raw_seal(&f, &vec![1; len])),
            EnvelopeError::CtLength(len + 16)
        );
    }
    // The bounds themselves are accepted, and the documented info opens.
    for len in [16usize, 64] {
        let env = parse(&raw_seal(&f, &vec![1; len])).unwrap();
        let dek = open_envelope(&env, key.public(), |e| hpke::software_dh(key, e)).unwrap();
        assert_eq!(dek.len(), len);
    }
}

/// An envelope or its header written as an array of the members' values
/// (which serde_json would read into the same struct) is
/// `malformed_envelope`: PROTOCOL's envelope and header are objects.
#[test]
fn an_envelope_or_header_written_as_an_array_is_malformed() {
    let f = fixture();
    assert!(parse(&envelope_json(HEADER, &f.enc, &f.ct)).is_ok());
    let array_header = r#"["2026-11","16-1-2","spiffe://provider.example/mail","acct:alice@example.com","2026-11-26T07:25:21Z","msg-8812"]"#;
    let array_envelope = format!(r#"[1,"{}","{}","{}"]"#, b64_encode(HEADER), f.enc, f.ct);
    for json in [envelope_json(array_header, &f.enc, &f.ct), array_envelope] {
        let e = parse(&json).unwrap_err();
        assert_eq!(e.code(), "malformed_envelope", "{json}: {e}");
        assert!(e.to_string().contains("expected a JSON object"), "{e}");
    }
}

/// The default header bound holds every header PROTOCOL allows: each field
/// at its limit (kid 64, provider 512, target 512, `ref` 256 bytes), all of
/// it written with `\u` escapes, seals and opens with the defaults: non-ASCII
/// as Python's `json.dumps` writes it by default (6 bytes for the 2 of `é`),
/// and ASCII as Go's `encoding/json` writes `<`, `>` and `&` (6 bytes for 1).
#[test]
fn a_maximal_header_with_escapes_fits_the_default_bounds() {
    for (escape, width) in [("\\u00e9", 2), ("\\u0026", 1)] {
        let escaped = |bytes: usize| escape.repeat(bytes / width);
        let (provider, target) = ((512 - 9) / width * width, (512 - 5) / width * width);
        let header = format!(
            r#"{{"kid":"{}","suite":"16-1-2","provider":"spiffe://{}","target":"acct:{}","time":"2026-11-26T07:25:21Z","ref":"{}"}}"#,
            escaped(64),
            escaped(provider),
            escaped(target),
            escaped(256),
        );
        assert!(header.len() > 4000 * (3 - width), "{}", header.len());
        let key = P256PrivateKey::generate().unwrap();
        let env = seal_envelope(key.public(), header.as_bytes(), &[0x42; 32]).unwrap();
        let parsed = Envelope::parse(env.to_json().as_bytes(), &EnvelopeLimits::default())
            .unwrap_or_else(|e| panic!("{escape}, header of {} bytes: {e}", header.len()));
        assert_eq!(parsed.header().provider().len(), 9 + provider);
        assert_eq!(parsed.header().target().len(), 5 + target);
        let dek = open_envelope(&parsed, key.public(), |e| hpke::software_dh(&key, e)).unwrap();
        assert_eq!(&dek[..], &[0x42; 32]);
    }
}
