//! Strict parsing of the JWS JSON serializations (RFC 7515 §7.2) as
//! PROTOCOL §4 (and §8, v1.1) profiles them.
//!
//! Accepted: the General form `{"payload": "<b64url>", "signatures":
//! [{"protected": "<b64url>", "signature": "<b64url>"}, …]}`, and the
//! flattened form `{"payload", "protected", "signature"}` (RFC 7515 §7.2.2),
//! read as a General JWS with that one signature; nothing else. Each
//! protected header is exactly `{"alg", "kid"}` plus an optional `typ`.
//! Refused: unknown or duplicate members anywhere, an object that mixes both
//! forms (`signatures` next to a top-level `protected`, `signature` or
//! `header`), the unprotected `header` member (its contents are not signed),
//! `crit` (RFC 7515 §4.1.11: extensions we do not understand must be
//! refused, and we understand none), `alg` other than `ES256` and `EdDSA`
//! (so `none` too), and the compact serialization.
//!
//! Nothing here checks a signature; that is [`super::verify`]'s job. The
//! values this module returns are structurally valid, not trusted.

use serde::{Deserialize, Deserializer};

use super::verify::WarrantLimits;
use super::WarrantError;
use crate::codec::{b64_decode, b64_encode};

/// Longest `kid` accepted in a protected header.
pub const MAX_KID_CHARS: usize = crate::bounds::MAX_AUTHORITY_KID_CHARS;
/// Longest `typ` accepted in a protected header.
const MAX_TYP_CHARS: usize = 64;

/// A JWS algorithm this protocol accepts (RFC 7518 §3.4, RFC 8037 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA P-256 with SHA-256; the signature is the 64-byte `r ‖ s`.
    Es256,
    /// Ed25519 (RFC 8037 `EdDSA` with an OKP `Ed25519` key).
    EdDsa,
}

impl Algorithm {
    /// Reads a JOSE `alg` name.
    ///
    /// # Errors
    /// [`WarrantError::UnsupportedAlgorithm`] for anything but `ES256` and
    /// `EdDSA` (names are case-sensitive, RFC 7515 §4.1.1).
    pub fn from_name(name: &str) -> Result<Self, WarrantError> {
        match name {
            "ES256" => Ok(Self::Es256),
            "EdDSA" => Ok(Self::EdDsa),
            // Echoed in errors and logs: bounded and escaped.
            other => Err(WarrantError::UnsupportedAlgorithm(
                truncate(other, 32).escape_debug().to_string(),
            )),
        }
    }

    /// The JOSE `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One signature of a parsed JWS, with its decoded protected header.
#[derive(Debug, Clone)]
pub struct JwsSignature {
    protected_b64: String,
    alg: Algorithm,
    kid: String,
    typ: Option<String>,
    signature: Vec<u8>,
}

impl JwsSignature {
    /// The header's algorithm.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// The header's key id (the authority).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The header's optional `typ`.
    pub fn typ(&self) -> Option<&str> {
        self.typ.as_deref()
    }

    /// The decoded signature bytes.
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }
}

/// A structurally valid, unverified JWS.
#[derive(Debug, Clone)]
pub struct ParsedJws {
    payload_b64: String,
    payload: Vec<u8>,
    signatures: Vec<JwsSignature>,
}

impl ParsedJws {
    /// The decoded payload bytes (the claims JSON).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The signatures, in order.
    pub fn signatures(&self) -> &[JwsSignature] {
        &self.signatures
    }

    /// The JWS Signing Input of one signature (RFC 7515 §5.1 step 8):
    /// `ASCII(BASE64URL(protected) ‖ '.' ‖ BASE64URL(payload))`, built from
    /// the exact strings received, never re-encoded.
    pub fn signing_input(&self, sig: &JwsSignature) -> Vec<u8> {
        signing_input(&sig.protected_b64, &self.payload_b64)
    }

    /// Appends a signature made over `protected_b64` (used by the signer).
    pub(crate) fn push_signature(
        &mut self,
        protected_b64: String,
        alg: Algorithm,
        kid: String,
        signature: Vec<u8>,
    ) {
        self.signatures.push(JwsSignature {
            protected_b64,
            alg,
            kid,
            typ: None,
            signature,
        });
    }

    /// The payload as it travels (base64url).
    pub(crate) fn payload_b64(&self) -> &str {
        &self.payload_b64
    }

    /// Serializes back to General JSON, keeping every received protected
    /// header string as it was (so existing signatures still verify).
    pub fn to_json(&self) -> String {
        let signatures: Vec<serde_json::Value> = self
            .signatures
            .iter()
            .map(|s| {
                serde_json::json!({
                    "protected": s.protected_b64,
                    "signature": b64_encode(&s.signature),
                })
            })
            .collect();
        serde_json::json!({ "payload": self.payload_b64, "signatures": signatures }).to_string()
    }

    /// A JWS with `payload` and no signature yet (what `lavd warrant new` writes).
    pub fn unsigned(payload: &[u8]) -> Self {
        Self {
            payload_b64: b64_encode(payload),
            payload: payload.to_vec(),
            signatures: Vec::new(),
        }
    }
}

pub(crate) fn signing_input(protected_b64: &str, payload_b64: &str) -> Vec<u8> {
    let mut input = Vec::with_capacity(protected_b64.len() + 1 + payload_b64.len());
    input.extend_from_slice(protected_b64.as_bytes());
    input.push(b'.');
    input.extend_from_slice(payload_b64.as_bytes());
    input
}

/// Either JSON serialization as received; which one it is, and that it is
/// not both, is decided in [`parse`]. The flattened members are kept as
/// values so that even `null` counts as present when looking for a mix.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJws {
    payload: String,
    /// `Some(None)` for an explicit `null`: present, so a mix still shows.
    #[serde(default, deserialize_with = "present_or_null")]
    signatures: Option<Option<Vec<crate::codec::Object<RawSignature>>>>,
    #[serde(default, deserialize_with = "some_value")]
    protected: Option<serde_json::Value>,
    /// Any value, even `null`, counts as present: the member must not exist.
    #[serde(default, deserialize_with = "present")]
    header: bool,
    #[serde(default, deserialize_with = "some_value")]
    signature: Option<serde_json::Value>,
}

impl RawJws {
    /// The signatures of either form, refusing a mix of both.
    fn into_signatures(self) -> Result<(String, Vec<RawSignature>), WarrantError> {
        let flattened = self.protected.is_some() || self.signature.is_some() || self.header;
        let signatures = match (self.signatures, flattened) {
            (Some(_), true) => {
                return Err(WarrantError::Malformed(
                    "the JWS mixes the General (`signatures`) and flattened (`protected`, \
                     `header`, `signature`) JSON serializations"
                        .into(),
                ))
            }
            (Some(None), false) => {
                return Err(WarrantError::Malformed(
                    "`signatures` must be an array, not null".into(),
                ))
            }
            (Some(Some(signatures)), false) => signatures.into_iter().map(|s| s.0).collect(),
            (None, true) => {
                let text = |v: Option<serde_json::Value>, name: &str| match v {
                    None => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s)),
                    Some(_) => Err(WarrantError::Malformed(format!(
                        "flattened JWS: `{name}` must be a string"
                    ))),
                };
                let protected = text(self.protected, "protected")?;
                let signature = text(self.signature, "signature")?.ok_or_else(|| {
                    WarrantError::Malformed("flattened JWS: `signature` is required".into())
                })?;
                vec![RawSignature {
                    protected,
                    header: self.header,
                    signature,
                }]
            }
            (None, false) => {
                return Err(WarrantError::Malformed(
                    "not a JWS in JSON serialization: neither `signatures` nor `signature`".into(),
                ))
            }
        };
        Ok((self.payload, signatures))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    protected: Option<String>,
    /// Any value, even `null`, counts as present: the member must not exist.
    #[serde(default, deserialize_with = "present")]
    header: bool,
    signature: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    alg: String,
    kid: String,
    #[serde(default, deserialize_with = "crate::codec::non_null")]
    typ: Option<String>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

fn present_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn some_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

fn truncate(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// Parses a JWS in General or flattened JSON Serialization (the latter as a
/// General JWS with one signature), enforcing `limits`.
///
/// # Errors
/// [`WarrantError::TooLarge`] before anything is parsed if the bytes (or,
/// after parsing, the signatures) exceed `limits`;
/// [`WarrantError::UnprotectedHeader`], [`WarrantError::CritNotSupported`],
/// [`WarrantError::UnsupportedAlgorithm`] for the refused header forms;
/// [`WarrantError::Malformed`] naming anything else that is wrong.
pub fn parse(bytes: &[u8], limits: &WarrantLimits) -> Result<ParsedJws, WarrantError> {
    if bytes.len() > limits.max_warrant_bytes {
        return Err(WarrantError::TooLarge {
            what: "bytes",
            found: bytes.len(),
            limit: limits.max_warrant_bytes,
        });
    }
    let raw: RawJws = crate::codec::from_object_slice(bytes)
        .map_err(|e| WarrantError::Malformed(format!("not a JWS in JSON Serialization: {e}")))?;
    let (payload_b64, raw_signatures) = raw.into_signatures()?;
    if raw_signatures.len() > limits.max_signatures {
        return Err(WarrantError::TooLarge {
            what: "signatures",
            found: raw_signatures.len(),
            limit: limits.max_signatures,
        });
    }
    let payload = b64_decode(&payload_b64).map_err(|_| {
        WarrantError::Malformed("`payload` is not base64url without padding".into())
    })?;
    let signatures = raw_signatures
        .into_iter()
        .enumerate()
        .map(|(i, s)| parse_signature(i, s))
        .collect::<Result<Vec<_>, _>>()?;
    // PROTOCOL §4: one signature per approving authority. A repeat would
    // count once anyway; refused here, before any signature is verified,
    // it cannot make a request cost many verifications.
    for (i, sig) in signatures.iter().enumerate() {
        if let Some(first) = signatures[..i].iter().position(|s| s.kid() == sig.kid()) {
            return Err(WarrantError::Malformed(format!(
                "signatures[{i}]: `kid` {:?} signed already (signatures[{first}]): one signature \
                 per authority",
                sig.kid()
            )));
        }
    }
    Ok(ParsedJws {
        payload_b64,
        payload,
        signatures,
    })
}

fn parse_signature(index: usize, raw: RawSignature) -> Result<JwsSignature, WarrantError> {
    let malformed = |what: &str| WarrantError::Malformed(format!("signatures[{index}]: {what}"));
    if raw.header {
        return Err(WarrantError::UnprotectedHeader);
    }
    let protected_b64 = raw
        .protected
        .ok_or_else(|| malformed("`protected` is required"))?;
    let protected = b64_decode(&protected_b64)
        .map_err(|_| malformed("`protected` is not base64url without padding"))?;
    // `crit` gets its own code whatever else is in the header, so look for it
    // before the strict parse (which would report it as an unknown member).
    let loose: serde_json::Value = serde_json::from_slice(&protected)
        .map_err(|e| malformed(&format!("protected header is not JSON: {e}")))?;
    if loose.get("crit").is_some() {
        return Err(WarrantError::CritNotSupported);
    }
    let header: RawHeader = crate::codec::from_object_slice(&protected)
        .map_err(|e| malformed(&format!("protected header: {e}")))?;
    let alg = Algorithm::from_name(&header.alg)?;
    // The kid is echoed in errors, logs and audit leaves: the one rule of
    // `crate::bounds` for authority kids, as the trust config has.
    if let Err(e) = crate::bounds::authority_kid(&header.kid) {
        return Err(malformed(&format!(
            "`kid` {e} (1 to {MAX_KID_CHARS} characters, no control characters or whitespace)"
        )));
    }
    if let Some(typ) = &header.typ {
        if typ.chars().count() > MAX_TYP_CHARS {
            return Err(malformed(&format!(
                "`typ` must be at most {MAX_TYP_CHARS} characters"
            )));
        }
    }
    let signature = b64_decode(&raw.signature)
        .map_err(|_| malformed("`signature` is not base64url without padding"))?;
    Ok(JwsSignature {
        protected_b64,
        alg,
        kid: header.kid,
        typ: header.typ,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jws_with_header(header: &str) -> Vec<u8> {
        format!(
            r#"{{"payload":"e30","signatures":[{{"protected":"{}","signature":"AAAA"}}]}}"#,
            b64_encode(header)
        )
        .into_bytes()
    }

    fn code(bytes: &[u8]) -> &'static str {
        parse(bytes, &WarrantLimits::default()).unwrap_err().code()
    }

    #[test]
    fn well_formed_header_parses() {
        let jws = parse(
            &jws_with_header(r#"{"alg":"ES256","kid":"judicial-3","typ":"JOSE+JSON"}"#),
            &WarrantLimits::default(),
        )
        .unwrap();
        assert_eq!(jws.payload(), b"{}");
        let sig = &jws.signatures()[0];
        assert_eq!(
            (sig.alg(), sig.kid(), sig.typ()),
            (Algorithm::Es256, "judicial-3", Some("JOSE+JSON"))
        );
        // Signing input uses the received strings.
        let protected = b64_encode(r#"{"alg":"ES256","kid":"judicial-3","typ":"JOSE+JSON"}"#);
        assert_eq!(
            jws.signing_input(sig),
            format!("{protected}.e30").into_bytes()
        );
    }

    #[test]
    fn refused_header_forms_have_their_codes() {
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"none","kid":"a"}"#)),
            "unsupported_algorithm"
        );
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"HS256","kid":"a"}"#)),
            "unsupported_algorithm"
        );
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"es256","kid":"a"}"#)),
            "unsupported_algorithm"
        );
        assert_eq!(
            code(&jws_with_header(
                r#"{"alg":"ES256","kid":"a","crit":["exp"],"exp":1}"#
            )),
            "crit_not_supported"
        );
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"ES256","kid":"a","b64":false}"#)),
            "malformed_warrant"
        );
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"ES256","kid":"a","kid":"b"}"#)),
            "malformed_warrant"
        );
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"ES256"}"#)),
            "malformed_warrant"
        );
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"ES256","kid":""}"#)),
            "malformed_warrant"
        );
        assert_eq!(
            code(&jws_with_header(r#"{"alg":"ES256","kid":"a\nb"}"#)),
            "malformed_warrant"
        );
        let unprotected = br#"{"payload":"e30","signatures":[{"protected":"e30","header":{"kid":"a"},"signature":"AAAA"}]}"#;
        assert_eq!(code(unprotected), "unprotected_header");
        let null_header = br#"{"payload":"e30","signatures":[{"header":null,"signature":"AAAA"}]}"#;
        assert_eq!(code(null_header), "unprotected_header");
    }

    #[test]
    fn flattened_form_is_one_general_signature() {
        let header = b64_encode(r#"{"alg":"ES256","kid":"a"}"#);
        let flattened = format!(r#"{{"payload":"e30","protected":"{header}","signature":"AAAA"}}"#);
        let jws = parse(flattened.as_bytes(), &WarrantLimits::default()).unwrap();
        assert_eq!(jws.signatures().len(), 1);
        let sig = &jws.signatures()[0];
        assert_eq!((sig.alg(), sig.kid()), (Algorithm::Es256, "a"));
        assert_eq!(jws.signing_input(sig), format!("{header}.e30").into_bytes());
        // It re-serializes in the General form, keeping the header string.
        let general = parse(jws.to_json().as_bytes(), &WarrantLimits::default()).unwrap();
        assert_eq!(
            general.signing_input(&general.signatures()[0]),
            jws.signing_input(sig)
        );
    }

    #[test]
    fn flattened_form_keeps_every_other_rule() {
        let header = b64_encode(r#"{"alg":"ES256","kid":"a"}"#);
        let general_sig = format!(r#"[{{"protected":"{header}","signature":"AAAA"}}]"#);
        // Mixed forms, even with `null` members.
        for mixed in [
            format!(
                r#"{{"payload":"e30","signatures":{general_sig},"protected":"{header}","signature":"AAAA"}}"#
            ),
            format!(r#"{{"payload":"e30","signatures":{general_sig},"signature":"AAAA"}}"#),
            format!(r#"{{"payload":"e30","signatures":{general_sig},"protected":null}}"#),
            format!(r#"{{"payload":"e30","signatures":{general_sig},"header":{{}}}}"#),
            format!(
                r#"{{"payload":"e30","signatures":null,"protected":"{header}","signature":"AAAA"}}"#
            ),
        ] {
            let e = parse(mixed.as_bytes(), &WarrantLimits::default()).unwrap_err();
            assert_eq!(e.code(), "malformed_warrant", "{mixed}");
            assert!(e.to_string().contains("mixes"), "{mixed}: {e}");
        }
        // The unprotected header, crit, a missing or non-string member.
        let unprotected = format!(
            r#"{{"payload":"e30","protected":"{header}","header":{{"kid":"a"}},"signature":"AAAA"}}"#
        );
        assert_eq!(code(unprotected.as_bytes()), "unprotected_header");
        let crit = b64_encode(r#"{"alg":"ES256","kid":"a","crit":["exp"],"exp":1}"#);
        let with_crit = format!(r#"{{"payload":"e30","protected":"{crit}","signature":"AAAA"}}"#);
        assert_eq!(code(with_crit.as_bytes()), "crit_not_supported");
        // `typ` given as `null`: refused, not read as absent.
        let typ_null = b64_encode(r#"{"alg":"ES256","kid":"a","typ":null}"#);
        let with_typ_null =
            format!(r#"{{"payload":"e30","protected":"{typ_null}","signature":"AAAA"}}"#);
        assert_eq!(code(with_typ_null.as_bytes()), "malformed_warrant");
        assert_eq!(
            code(format!(r#"{{"payload":"e30","protected":"{header}"}}"#).as_bytes()),
            "malformed_warrant"
        );
        assert_eq!(
            code(br#"{"payload":"e30","signature":"AAAA"}"#),
            "malformed_warrant"
        );
        let null = parse(
            br#"{"payload":"e30","signatures":null}"#,
            &WarrantLimits::default(),
        )
        .unwrap_err();
        assert_eq!(null.code(), "malformed_warrant");
        assert!(null.to_string().contains("not null"), "{null}");
        assert_eq!(
            code(format!(r#"{{"payload":"e30","protected":"{header}","signature":1}}"#).as_bytes()),
            "malformed_warrant"
        );
        assert_eq!(
            code(format!(r#"{{"payload":"e30","protected":"{header}","signature":"AAAA","signature":"AAAA"}}"#).as_bytes()),
            "malformed_warrant"
        );
        assert_eq!(code(br#"{"payload":"e30"}"#), "malformed_warrant");
    }

    #[test]
    fn other_serializations_and_trailing_data_are_refused() {
        // The compact serialization (RFC 7515 §7.1).
        let header = b64_encode(r#"{"alg":"ES256","kid":"a"}"#);
        assert_eq!(
            code(format!("{header}.e30.AAAA").as_bytes()),
            "malformed_warrant"
        );
        let mut trailing = jws_with_header(r#"{"alg":"ES256","kid":"a"}"#);
        trailing.extend_from_slice(b"{}");
        assert_eq!(code(&trailing), "malformed_warrant");
        assert_eq!(
            code(br#"{"payload":"e30=","signatures":[]}"#),
            "malformed_warrant"
        );
        assert_eq!(
            code(br#"{"payload":"e30","signatures":[],"payload":"e30"}"#),
            "malformed_warrant"
        );
    }

    #[test]
    fn limits_are_enforced() {
        let limits = WarrantLimits {
            max_warrant_bytes: 64,
            max_signatures: 1,
        };
        let big = vec![b' '; 65];
        assert!(matches!(
            parse(&big, &limits),
            Err(WarrantError::TooLarge {
                what: "bytes",
                found: 65,
                limit: 64
            })
        ));
        let two = br#"{"payload":"","signatures":[{"signature":""},{"signature":""}]}"#;
        let limits = WarrantLimits {
            max_warrant_bytes: 1024,
            max_signatures: 1,
        };
        assert!(matches!(
            parse(two, &limits),
            Err(WarrantError::TooLarge {
                what: "signatures",
                found: 2,
                limit: 1
            })
        ));
    }
}
