//! Warrant claims (PROTOCOL §4 table): strict, bounded, typed.
//!
//! Bounds beyond PROTOCOL's own (`id` ≤ 128 characters, 1..=1000 targets):
//! every string is non-empty and free of control characters, and
//! `legal_basis` of bidirectional controls; `agency` is a caller identity
//! under the rule the TLS accept loop applies to certificates
//! ([`crate::bounds::identity`]: printable ASCII, a URI, at most
//! [`crate::bounds::MAX_IDENTITY_BYTES`] bytes); `id`, each
//! target and each of `kids` are checked by the one function of
//! [`crate::bounds`] that every other layer uses for that field (a target is
//! at most [`MAX_TARGET_BYTES`] bytes without whitespace, a kid at most
//! [`crate::bounds::MAX_KID_BYTES`]); `legal_basis` at most
//! [`MAX_LEGAL_BASIS_CHARS`] characters; `kids`, when present, holds 1..=[`MAX_KIDS`]
//! entries; targets and kids have no duplicates; `max_unwraps` is in
//! 1..=2^53−1 (the I-JSON exact-integer range, RFC 7493 §2.2); `window.from <
//! window.to` and `not_before < expires`; `recipient` is a P-256 *public* JWK
//! (a `d` member is refused: a private key has no business in a warrant).
//! Explicit `null` is refused for the optional members.

use std::collections::BTreeSet;

use aws_lc_rs::digest;
use serde::Deserialize;
use time::OffsetDateTime;

use super::WarrantError;
use crate::codec::{rfc3339, Object};
use crate::jwk::{Jwk, P256PublicKey};

/// Longest warrant `id`, in characters (PROTOCOL §4).
pub const MAX_ID_CHARS: usize = crate::bounds::MAX_WARRANT_ID_CHARS;
/// Most targets in one warrant (PROTOCOL §4).
pub const MAX_TARGETS: usize = 1000;
/// Longest target identifier, in bytes.
pub const MAX_TARGET_BYTES: usize = crate::bounds::MAX_TARGET_BYTES;
/// Longest `legal_basis`, in characters.
pub const MAX_LEGAL_BASIS_CHARS: usize = 1024;
/// Most escrow key ids in `kids`.
pub const MAX_KIDS: usize = 1000;
/// The longest `recipient.kid`, in characters (a name or a thumbprint).
pub const MAX_RECIPIENT_KID_CHARS: usize = 256;
/// Largest `max_unwraps`: 2^53 − 1, so every JSON implementation reads it exactly.
pub const MAX_UNWRAPS_LIMIT: u64 = (1 << 53) - 1;

/// `window`: envelope `time` must lie in `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Inclusive start.
    pub from: OffsetDateTime,
    /// Exclusive end.
    pub to: OffsetDateTime,
}

impl Window {
    /// Whether `t` lies in `[from, to)`.
    pub fn contains(&self, t: OffsetDateTime) -> bool {
        self.from <= t && t < self.to
    }
}

/// The claims of a warrant, checked against every bound above. Holding one
/// says nothing about who signed it: see [`super::VerifiedWarrant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The authorisation reference, unique.
    pub id: String,
    /// Statute or legal type, free text.
    pub legal_basis: String,
    /// The identity (URI SAN) of the one agency allowed to execute it.
    pub agency: String,
    /// Results are sealed to this key.
    pub recipient: P256PublicKey,
    /// Target identifiers, in the warrant's order, without duplicates.
    pub targets: Vec<String>,
    /// Envelope time window.
    pub window: Window,
    /// Start of executability.
    pub not_before: OffsetDateTime,
    /// End of executability (exclusive).
    pub expires: OffsetDateTime,
    /// The most envelopes it may ever open.
    pub max_unwraps: u64,
    /// Escrow keys it may use; `None` means any.
    pub kids: Option<Vec<String>>,
    /// Whether it claims the policy's emergency rule.
    pub emergency: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaims {
    id: String,
    legal_basis: String,
    agency: String,
    recipient: Object<Jwk>,
    targets: Vec<String>,
    window: Object<RawWindow>,
    #[serde(with = "rfc3339")]
    not_before: OffsetDateTime,
    #[serde(with = "rfc3339")]
    expires: OffsetDateTime,
    max_unwraps: u64,
    #[serde(default, deserialize_with = "crate::codec::non_null")]
    kids: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::codec::non_null")]
    emergency: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    #[serde(with = "rfc3339")]
    from: OffsetDateTime,
    #[serde(with = "rfc3339")]
    to: OffsetDateTime,
}

fn malformed(what: impl std::fmt::Display) -> WarrantError {
    WarrantError::Malformed(format!("claims: {what}"))
}

fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), WarrantError> {
    if value.is_empty() {
        return Err(malformed(format_args!("`{field}` is empty")));
    }
    if value.chars().count() > max_chars {
        return Err(malformed(format_args!(
            "`{field}` is longer than {max_chars} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(malformed(format_args!(
            "`{field}` contains a control character"
        )));
    }
    crate::bounds::prose(value).map_err(|e| malformed(format_args!("`{field}` {e}")))
}

/// A field with one definition in [`crate::bounds`]; the message names the
/// field and what is wrong ("`id` is longer than 128 characters").
pub(crate) fn check_bound(
    field: &str,
    value: &str,
    check: fn(&str) -> Result<(), crate::bounds::BoundError>,
) -> Result<(), WarrantError> {
    check(value).map_err(|why| malformed(format_args!("`{field}` {why}")))
}

fn check_list(
    field: &str,
    values: &[String],
    max: usize,
    check: fn(&str) -> Result<(), crate::bounds::BoundError>,
) -> Result<(), WarrantError> {
    if values.is_empty() || values.len() > max {
        return Err(malformed(format_args!(
            "`{field}` must hold 1 to {max} entries, found {}",
            values.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for (i, v) in values.iter().enumerate() {
        let name = format!("{field}[{i}]");
        check_bound(&name, v, check)?;
        if !seen.insert(v.as_str()) {
            return Err(malformed(format_args!("`{name}` is a duplicate")));
        }
    }
    Ok(())
}

/// The warrant's `recipient`: a public P-256 key agreement key, the one
/// definition of what may be one, for the claims and for `lavd warrant
/// new --recipient` alike.
///
/// # Errors
/// [`WarrantError::Malformed`] naming the member.
pub fn recipient_key(jwk: &Jwk) -> Result<P256PublicKey, WarrantError> {
    if jwk.d.is_some() {
        return Err(malformed(
            "`recipient` contains a private key (`d`); give the public JWK only",
        ));
    }
    // A key agreement key (RFC 7517 §4.2 `use`: `enc`; an `alg`, if
    // any, of the ECDH-ES family, RFC 7518 §4.6, which JOSE libraries
    // write on such keys), and nothing that belongs to another kind of
    // key: a signing algorithm, an escrow key's suite and dates.
    if jwk.use_.as_deref().is_some_and(|u| u != "enc") {
        return Err(malformed(
            "`recipient.use` must be \"enc\" (results are sealed to it), or absent",
        ));
    }
    if let Some(alg) = jwk.alg.as_deref() {
        if !matches!(
            alg,
            "ECDH-ES" | "ECDH-ES+A128KW" | "ECDH-ES+A192KW" | "ECDH-ES+A256KW"
        ) {
            return Err(malformed(
                "`recipient.alg` must name key agreement (ECDH-ES, RFC 7518 §4.6), or be \
                 absent: results are sealed to this key",
            ));
        }
    }
    for (member, present) in [
        ("lav_suite", jwk.lav_suite.is_some()),
        ("not_before", jwk.not_before.is_some()),
        ("not_after", jwk.not_after.is_some()),
    ] {
        if present {
            return Err(malformed(format_args!(
                "`recipient.{member}` is not a member of a recipient key (kty, crv, x, y, \
                 and optionally kid, use and alg)"
            )));
        }
    }
    if let Some(kid) = &jwk.kid {
        check_text("recipient.kid", kid, MAX_RECIPIENT_KID_CHARS)?;
    }
    P256PublicKey::from_jwk(jwk).map_err(|e| malformed(format_args!("`recipient`: {e}")))
}

impl Claims {
    /// Parses the JWS payload bytes strictly (unknown, duplicate or `null`
    /// members, trailing data, out-of-bounds values are all refused).
    ///
    /// # Errors
    /// [`WarrantError::Malformed`] naming the member.
    pub fn parse(payload: &[u8]) -> Result<Self, WarrantError> {
        let raw: RawClaims = crate::codec::from_object_slice(payload).map_err(malformed)?;
        check_bound("id", &raw.id, crate::bounds::warrant_id)?;
        check_text("legal_basis", &raw.legal_basis, MAX_LEGAL_BASIS_CHARS)?;
        check_bound("agency", &raw.agency, crate::bounds::identity)?;
        let recipient = recipient_key(&raw.recipient.0)?;
        check_list("targets", &raw.targets, MAX_TARGETS, crate::bounds::target)?;
        if let Some(kids) = &raw.kids {
            check_list("kids", kids, MAX_KIDS, crate::bounds::kid)?;
        }
        if raw.window.0.from >= raw.window.0.to {
            return Err(malformed("`window.from` must be before `window.to`"));
        }
        if raw.not_before >= raw.expires {
            return Err(malformed("`not_before` must be before `expires`"));
        }
        if raw.max_unwraps == 0 || raw.max_unwraps > MAX_UNWRAPS_LIMIT {
            return Err(malformed(format_args!(
                "`max_unwraps` must be in 1..={MAX_UNWRAPS_LIMIT}"
            )));
        }
        Ok(Self {
            id: raw.id,
            legal_basis: raw.legal_basis,
            agency: raw.agency,
            recipient,
            targets: raw.targets,
            window: Window {
                from: raw.window.0.from,
                to: raw.window.0.to,
            },
            not_before: raw.not_before,
            expires: raw.expires,
            max_unwraps: raw.max_unwraps,
            kids: raw.kids,
            emergency: raw.emergency.unwrap_or(false),
        })
    }
}

/// SHA-256 of the claims with `emergency` removed, in a canonical JSON form
/// (object members sorted by name, no whitespace, serde_json's string and
/// number spelling, and each time member, `not_before`, `expires`,
/// `window.from` and `window.to`, in one spelling: [`canonical_time`]). Two
/// payloads with equal digests are the same warrant up to urgency and
/// formatting: this is what lets a fully signed warrant replace an urgent
/// one with the same `id` (PROTOCOL §4), though one tool wrote
/// `…T00:00:00Z` and another `…T00:00:00.000Z` for the same instant.
///
/// The form is written to the store: changing it would make every recorded
/// urgent warrant look like a conflict, so it is fixed here and not left to a
/// serializer's defaults.
///
/// # Errors
/// [`WarrantError::Malformed`] if `payload` is not a JSON object; callers pass
/// payloads that [`Claims::parse`] accepted.
pub fn normalized_digest(payload: &[u8]) -> Result<[u8; 32], WarrantError> {
    digest_without_emergency(payload, true)
}

/// [`normalized_digest`] as lavd computed it before 2026-12-06: the time
/// members hashed as spelled. The store keeps, for an urgent warrant
/// registered before then, this form; a replacement whose canonical digest
/// does not match it is matched against this one too
/// ([`super::admit`]), so what replaced such a warrant then still does.
/// `None` when it is the canonical digest (every whole-second `Z`
/// spelling).
///
/// # Errors
/// As [`normalized_digest`].
pub fn legacy_normalized_digest(payload: &[u8]) -> Result<Option<[u8; 32]>, WarrantError> {
    let legacy = digest_without_emergency(payload, false)?;
    Ok((legacy != normalized_digest(payload)?).then_some(legacy))
}

fn digest_without_emergency(
    payload: &[u8],
    canonical_times: bool,
) -> Result<[u8; 32], WarrantError> {
    let mut value: serde_json::Value = serde_json::from_slice(payload).map_err(malformed)?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| malformed("not a JSON object"))?;
    object.remove("emergency");
    let times = if canonical_times {
        &["not_before", "expires"][..]
    } else {
        &[]
    };
    for member in times {
        if let Some(v) = object.get_mut(*member) {
            canonical_time(v);
        }
    }
    if let Some(window) = object
        .get_mut("window")
        .and_then(serde_json::Value::as_object_mut)
        .filter(|_| canonical_times)
    {
        for member in ["from", "to"] {
            if let Some(v) = window.get_mut(member) {
                canonical_time(v);
            }
        }
    }
    let mut canonical = String::new();
    write_canonical(&value, &mut canonical);
    Ok(sha256(canonical.as_bytes()))
}

/// A time member's one spelling in the digest: as [`crate::codec::parse_time`]
/// reads it, written back by [`crate::codec::format_time_exact`]
/// (`…T00:00:00Z`, `…T00:00:00.5Z`). Whole-second `Z` spellings, all `lavd warrant new`
/// writes, are unchanged, so the digests recorded for them still match.
/// Anything else is left as it is (a caller passes claims that parsed).
fn canonical_time(value: &mut serde_json::Value) {
    let Some(t) = value
        .as_str()
        .and_then(|text| crate::codec::parse_time(text).ok())
    else {
        return;
    };
    *value = serde_json::Value::String(crate::codec::format_time_exact(t));
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwk::P256PrivateKey;

    fn base() -> serde_json::Value {
        let recipient = P256PrivateKey::generate().unwrap().public().to_jwk();
        serde_json::json!({
            "id": "W-1",
            "legal_basis": "IPA 2016 s.19",
            "agency": "spiffe://agency.example/lea/unit-7",
            "recipient": recipient,
            "targets": ["acct:alice@example.com"],
            "window": {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"},
            "not_before": "2026-11-20T00:00:00Z",
            "expires": "2026-12-20T00:00:00Z",
            "max_unwraps": 10
        })
    }

    /// The normalized digest's form, pinned: members sorted, no
    /// whitespace, `emergency` dropped, and the time members in one
    /// spelling; the legacy form (before 2026-12-06) hashed them as spelled,
    /// and differs only when a spelling is not already the one.
    #[test]
    fn the_normalized_form_is_pinned() {
        let payload = r#"{"window":{"to":"2026-12-01T00:00:00Z","from":"2026-11-01T00:00:00.000Z"},"id":"W-1","emergency":true,"max_unwraps":10,"expires":"2026-12-20T00:00:00.50Z","not_before":"2026-11-20T00:00:00Z"}"#;
        let canonical = r#"{"expires":"2026-12-20T00:00:00.5Z","id":"W-1","max_unwraps":10,"not_before":"2026-11-20T00:00:00Z","window":{"from":"2026-11-01T00:00:00Z","to":"2026-12-01T00:00:00Z"}}"#;
        let as_spelled = r#"{"expires":"2026-12-20T00:00:00.50Z","id":"W-1","max_unwraps":10,"not_before":"2026-11-20T00:00:00Z","window":{"from":"2026-11-01T00:00:00.000Z","to":"2026-12-01T00:00:00Z"}}"#;
        assert_eq!(
            normalized_digest(payload.as_bytes()).unwrap(),
            sha256(canonical.as_bytes())
        );
        assert_eq!(
            legacy_normalized_digest(payload.as_bytes()).unwrap(),
            Some(sha256(as_spelled.as_bytes()))
        );
        // Whole seconds with `Z`: one form, the one stored before.
        assert_eq!(
            legacy_normalized_digest(canonical.as_bytes()).unwrap(),
            None
        );
        assert_eq!(
            normalized_digest(canonical.as_bytes()).unwrap(),
            sha256(canonical.as_bytes())
        );
    }

    #[test]
    fn valid_claims_parse() {
        let claims = Claims::parse(base().to_string().as_bytes()).unwrap();
        assert_eq!(claims.id, "W-1");
        assert!(!claims.emergency);
        assert_eq!(claims.kids, None);
    }

    /// The recipient is a key agreement key: `use` other than `enc`, a
    /// signing key's `alg`, an escrow key's suite or dates are refused,
    /// each named; `kid` and `use: enc` are taken.
    #[test]
    fn a_recipient_with_members_of_another_kind_of_key_is_refused() {
        let mut ok = base();
        ok["recipient"]["kid"] = "agency-2026".into();
        ok["recipient"]["use"] = "enc".into();
        ok["recipient"]["alg"] = "ECDH-ES".into();
        Claims::parse(ok.to_string().as_bytes()).unwrap();
        for (member, value, named) in [
            ("use", "sig", "recipient.use"),
            ("alg", "ES256", "recipient.alg"),
            ("lav_suite", "16-1-2", "recipient.lav_suite"),
            ("not_before", "junk", "recipient.not_before"),
            ("not_after", "2026-12-01T00:00:00Z", "recipient.not_after"),
            ("kid", "\u{1b}[31m", "recipient.kid"),
            ("kid", "", "recipient.kid"),
        ] {
            let mut c = base();
            c["recipient"][member] = value.into();
            let e = Claims::parse(c.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.code(), "malformed_warrant", "{member}");
            assert!(e.to_string().contains(named), "{member}: {e}");
        }
        // An optional member given as `null` is refused, as everywhere in
        // the claims: absent and `null` would be two spellings of one key.
        for member in ["kid", "use", "alg", "lav_suite", "not_before"] {
            let mut c = base();
            c["recipient"][member] = serde_json::Value::Null;
            let e = Claims::parse(c.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.code(), "malformed_warrant", "{member}");
            assert!(e.to_string().contains("null"), "{member}: {e}");
        }
    }

    /// `agency` follows the rule certificates follow (bounds::identity): a
    /// warrant no caller could execute is refused as malformed, by name.
    #[test]
    fn an_agency_no_certificate_could_carry_is_refused() {
        for agency in [
            String::new(),
            "lea-unit-7".to_string(),
            ":no-scheme".to_string(),
            "spiffe://agency.example/lea unit".to_string(),
            "spiffe://agency.example/léa".to_string(),
            "spiffe://agency.example/\u{202e}lea".to_string(),
            format!("spiffe://{}", "a".repeat(2048)),
        ] {
            let mut c = base();
            c["agency"] = agency.clone().into();
            let e = Claims::parse(c.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.code(), "malformed_warrant", "{agency}");
            assert!(e.to_string().contains("`agency`"), "{agency}: {e}");
        }
        let mut c = base();
        c["agency"] = format!("spiffe://{}", "a".repeat(2048 - 9)).into();
        Claims::parse(c.to_string().as_bytes()).unwrap();
    }

    /// A value of the wrong type or range is named by its member.
    #[test]
    fn a_member_of_the_wrong_type_is_named() {
        for (member, value, named) in [
            ("max_unwraps", serde_json::json!(-1), "`max_unwraps`"),
            ("max_unwraps", serde_json::json!(1.5), "`max_unwraps`"),
            ("max_unwraps", serde_json::json!("10"), "`max_unwraps`"),
            ("emergency", serde_json::json!("yes"), "`emergency`"),
            ("targets", serde_json::json!(["a", 2]), "`targets[1]`"),
            (
                "window",
                serde_json::json!({"from": 1, "to": "2026-12-01T00:00:00Z"}),
                "`window.from`",
            ),
            ("expires", serde_json::json!("tomorrow"), "`expires`"),
        ] {
            let mut c = base();
            c[member] = value;
            let e = Claims::parse(c.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.code(), "malformed_warrant", "{member}");
            assert!(e.to_string().contains(named), "{member}: {e}");
        }
    }

    #[test]
    fn normalized_digest_ignores_emergency_order_and_spacing() {
        let a = base();
        let mut b = a.clone();
        b["emergency"] = serde_json::Value::Bool(true);
        let spaced = serde_json::to_string_pretty(&a).unwrap();
        let da = normalized_digest(a.to_string().as_bytes()).unwrap();
        assert_eq!(da, normalized_digest(b.to_string().as_bytes()).unwrap());
        assert_eq!(da, normalized_digest(spaced.as_bytes()).unwrap());
        let mut c = a.clone();
        c["max_unwraps"] = 11.into();
        assert_ne!(da, normalized_digest(c.to_string().as_bytes()).unwrap());
    }
}
