//! Envelopes (PROTOCOL §3): a provider seals a message data-encryption key
//! (DEK) to an escrow key with HPKE; the daemon opens it (DH in the HSM) only
//! under a warrant; the opened DEKs go back to the agency sealed in one reply
//! ([`reply`], PROTOCOL §5).
//!
//! This is the edge where untrusted envelope bytes become a typed
//! [`Envelope`]: strict JSON, a strict header, `enc` checked to be a P-256
//! point, sizes bounded by [`EnvelopeLimits`]. Code past [`Envelope::parse`]
//! never sees an unchecked envelope. The header bytes are kept exactly as
//! received: they, not a re-serialization, are what HPKE binds.
//!
//! Trusts: aws-lc for the primitives, the caller's DH closure for the escrow
//! private key. Builds without the `daemon` feature (the provider side).
//!
//! Construction, byte for byte, in `docs/envelope.md`.

pub mod hpke;
pub mod reply;

use std::convert::Infallible;

use crate::secret::Secret;
use aws_lc_rs::digest;
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use crate::codec::{b64_decode, b64_encode, format_time};
use crate::jwk::{P256PublicKey, LAV_SUITE};
use hpke::{Aead, DhOutput, HpkeError};

/// The only envelope format version (`"v":1`).
pub const ENVELOPE_VERSION: u64 = 1;
/// HPKE `info` prefix for envelopes; the full info is
/// `"lav-envelope-v1" || 0x00 || header`.
pub const ENVELOPE_INFO_LABEL: &[u8] = b"lav-envelope-v1";
/// Shortest DEK a provider may seal (AES-128).
pub const DEK_MIN_LEN: usize = 16;
/// Longest DEK a provider may seal (e.g. an AES-256-SIV or a key pair of keys).
pub const DEK_MAX_LEN: usize = 64;
/// Shortest valid `ct`: the smallest DEK plus the AES-GCM tag.
pub const CT_MIN_LEN: usize = DEK_MIN_LEN + hpke::N_T;
/// Longest valid `ct`: the largest DEK plus the AES-GCM tag.
pub const CT_MAX_LEN: usize = DEK_MAX_LEN + hpke::N_T;
/// PROTOCOL §3: `ref` is at most 256 bytes. Fixed by the protocol, so not a
/// configurable limit.
pub const REF_MAX_LEN: usize = crate::bounds::MAX_REF_BYTES;

/// Configurable size bounds for untrusted envelopes (PROTOCOL: "every size has
/// a configured upper bound"). The `ct` length is not here: PROTOCOL fixes the
/// DEK at 16..=64 bytes, so `ct` is always [`CT_MIN_LEN`]..=[`CT_MAX_LEN`].
/// Nor are the header fields' own bounds: each has one definition in
/// [`crate::bounds`], shared with the warrant claims and the audit leaves, so
/// that a header this accepts can always be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeLimits {
    /// Whole envelope JSON. Default and least value [`MIN_ENVELOPE_BOUND`].
    pub max_envelope_bytes: usize,
    /// Header bytes as sent (before base64url), JSON escapes included.
    /// Default and least value [`MIN_HEADER_BOUND`].
    pub max_header_bytes: usize,
}

/// The least bound on a header's bytes: every field at its PROTOCOL limit
/// (kid 64, provider 512, target 512, `ref` 256 bytes), every byte of them
/// written as a six-byte JSON escape (`\u0026` for `&`, as Go's
/// `encoding/json` writes `<`, `>` and `&` by default; Python's `json.dumps`
/// writes `\u00e9` for the two bytes of `é`, three times their size), plus
/// the time, the other members and their names: 8,089 bytes; rounded up to
/// leave room for whitespace. A lower bound would deny envelopes PROTOCOL
/// allows, and their keys could never be opened. (Until 2026-12-04 it was
/// 4608, which held Python's escapes but not Go's.)
pub const MIN_HEADER_BOUND: usize = 9216;

/// What an envelope holds besides its header's base64url: `enc` (87
/// characters), the longest `ct` (107), the framing and room for
/// whitespace.
pub const ENVELOPE_ALLOWANCE: usize = 1024;

/// The least envelope bound that carries every header of `header_bound`
/// bytes: its unpadded base64url, and [`ENVELOPE_ALLOWANCE`]. The
/// configuration holds `max_envelope_bytes` to it, so that the header
/// bound it also sets is one an envelope can reach.
pub const fn envelope_bound_for_header(header_bound: usize) -> usize {
    (header_bound * 4).div_ceil(3) + ENVELOPE_ALLOWANCE
}

/// The least bound on an envelope's bytes: what carries a header of
/// [`MIN_HEADER_BOUND`] (its base64url is 12,288 characters): 13,312.
/// (7168 until 2026-12-04.)
pub const MIN_ENVELOPE_BOUND: usize = envelope_bound_for_header(MIN_HEADER_BOUND);

/// The greatest header bound an envelope of at most 64 KiB (the top of
/// `max_envelope_bytes`) can carry: 48,384.
pub const MAX_HEADER_BOUND: usize = ((64 << 10) - ENVELOPE_ALLOWANCE) / 4 * 3;

impl Default for EnvelopeLimits {
    fn default() -> Self {
        Self {
            max_envelope_bytes: MIN_ENVELOPE_BOUND,
            max_header_bytes: MIN_HEADER_BOUND,
        }
    }
}

/// An envelope that could not be parsed, sealed or opened. `E` is the error
/// type of the caller's DH step in [`open_envelope`]; [`Infallible`]
/// elsewhere.
///
/// Every error of [`Envelope::parse`] has code `malformed_envelope` and every
/// error of [`open_envelope`] except [`EnvelopeError::KeyAgreement`] has code
/// `open_failed`, so the daemon can put [`EnvelopeError::code`] straight into
/// a per-envelope `denied` result (PROTOCOL §5 reasons).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError<E = Infallible> {
    /// The envelope JSON is longer than [`EnvelopeLimits::max_envelope_bytes`].
    #[error("envelope is larger than {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The envelope is not a JSON object of exactly `v`, `header`, `enc`,
    /// `ct`: unknown or duplicate members, wrong types, trailing data. A buggy
    /// provider, or an attempt to smuggle a second reading.
    #[error("envelope JSON: {0}")]
    Json(String),
    /// `v` is not 1: a newer format this daemon does not speak.
    #[error("envelope version {0} is not supported (only 1)")]
    UnsupportedVersion(u64),
    /// A binary member is not canonical base64url without padding.
    #[error("envelope member `{0}` is not base64url without padding")]
    Base64(&'static str),
    /// The decoded header exceeds [`EnvelopeLimits::max_header_bytes`].
    #[error("header is larger than {limit} bytes")]
    HeaderTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The header is not a JSON object of exactly `kid`, `suite`, `provider`,
    /// `target`, `time` and optional `ref` (unknown/duplicate members,
    /// trailing data, a non-UTC or non-RFC 3339 `time`).
    #[error("header JSON: {0}")]
    HeaderJson(String),
    /// `suite` is not `16-1-2`: sealed with another HPKE suite.
    #[error("header suite is not {LAV_SUITE}")]
    UnsupportedSuite,
    /// A header field is outside its bounds ([`crate::bounds`]): empty, too
    /// long, a control character, whitespace in an identifier (`kid`,
    /// `provider`, `target`). A buggy provider, or an attempt to put text
    /// into the audit log or the operator's terminal.
    #[error("header field `{field}` {why}")]
    HeaderField {
        /// The field name.
        field: &'static str,
        /// What is wrong with it.
        why: crate::bounds::BoundError,
    },
    /// `enc` is not a 65-byte uncompressed P-256 point on the curve (wrong
    /// length, compressed, identity, off-curve), or is the curve's
    /// generator G (the ephemeral key of the private scalar 1, which no
    /// honest sender draws; refused so that a derive on G is only ever
    /// lavd's own pair check, not as a security bound: −G is as well
    /// known). A buggy provider, or an invalid-curve attack.
    #[error("`enc` is not an uncompressed P-256 point")]
    InvalidEnc,
    /// `ct` has a length no DEK of 16..=64 bytes can produce.
    #[error("`ct` is {0} bytes; expected {CT_MIN_LEN}..={CT_MAX_LEN}")]
    CtLength(usize),
    /// Opening failed: the envelope was sealed to another key, its header,
    /// `enc` or `ct` was modified, or the caller passed the wrong `pk_r`.
    #[error("the envelope does not open with this key")]
    OpenFailed,
    /// The caller's DH step failed (the HSM is unavailable or refused). Not
    /// the envelope's fault: the daemon should fail the request (503), not
    /// deny the envelope.
    #[error("the DH step failed")]
    KeyAgreement(#[source] E),
    /// Sealing: the DEK is not 16..=64 bytes.
    #[error("DEK is {0} bytes; expected {DEK_MIN_LEN}..={DEK_MAX_LEN}")]
    InvalidDek(usize),
    /// Sealing: the RNG or aws-lc failed. Should never happen.
    #[error("sealing failed inside the crypto library")]
    SealFailed,
}

impl<E> EnvelopeError<E> {
    /// The stable snake_case code: `malformed_envelope` and `open_failed` are
    /// PROTOCOL §5 reasons; `key_agreement_failed`, `invalid_dek` and
    /// `seal_failed` never reach the wire as reasons.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. }
            | Self::Json(_)
            | Self::UnsupportedVersion(_)
            | Self::Base64(_)
            | Self::HeaderTooLarge { .. }
            | Self::HeaderJson(_)
            | Self::UnsupportedSuite
            | Self::HeaderField { .. }
            | Self::InvalidEnc
            | Self::CtLength(_) => "malformed_envelope",
            Self::OpenFailed => "open_failed",
            Self::KeyAgreement(_) => "key_agreement_failed",
            Self::InvalidDek(_) => "invalid_dek",
            Self::SealFailed => "seal_failed",
        }
    }

    /// The PROTOCOL §5 denial reason for this error, or `None` when the error
    /// is not the envelope's fault ([`EnvelopeError::KeyAgreement`]: fail the
    /// request instead) or cannot come from parsing or opening.
    pub fn deny_reason(&self) -> Option<reply::DenyReason> {
        match self.code() {
            "malformed_envelope" => Some(reply::DenyReason::MalformedEnvelope),
            "open_failed" => Some(reply::DenyReason::OpenFailed),
            _ => None,
        }
    }
}

/// The envelope as it is on the wire; only [`Envelope::parse`] reads it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeJson {
    v: u64,
    header: String,
    enc: String,
    ct: String,
}

/// The header as it is on the wire.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderJson {
    kid: String,
    suite: String,
    provider: String,
    target: String,
    #[serde(deserialize_with = "crate::codec::rfc3339_sealed::deserialize")]
    time: OffsetDateTime,
    #[serde(rename = "ref", default, deserialize_with = "present_string")]
    reference: Option<String>,
}

/// `ref` is optional, but when present it is a string: `"ref":null` is a
/// second spelling of "absent" and is refused.
pub(crate) fn present_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// A parsed, validated envelope header (PROTOCOL §3). Its `suite` is always
/// `16-1-2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    kid: String,
    provider: String,
    target: String,
    time: OffsetDateTime,
    reference: Option<String>,
}

impl Header {
    /// Parses header bytes strictly.
    ///
    /// # Errors
    /// An [`EnvelopeError`] with code `malformed_envelope` naming what was
    /// wrong.
    pub fn parse(bytes: &[u8], limits: &EnvelopeLimits) -> Result<Self, EnvelopeError> {
        if bytes.len() > limits.max_header_bytes {
            return Err(EnvelopeError::HeaderTooLarge {
                limit: limits.max_header_bytes,
            });
        }
        let raw: HeaderJson = crate::codec::from_object_slice(bytes)
            .map_err(|e| EnvelopeError::HeaderJson(e.to_string()))?;
        if raw.suite != LAV_SUITE {
            return Err(EnvelopeError::UnsupportedSuite);
        }
        // Every field with the one rule the warrant claims and the audit
        // leaves use too: nothing accepted here can be refused later, after
        // the HSM has opened a key.
        let field = |field: &'static str,
                     check: fn(&str) -> Result<(), crate::bounds::BoundError>,
                     value: &str| {
            check(value).map_err(|why| EnvelopeError::HeaderField { field, why })
        };
        field("kid", crate::bounds::kid, &raw.kid)?;
        field("provider", crate::bounds::provider, &raw.provider)?;
        field("target", crate::bounds::target, &raw.target)?;
        if let Some(reference) = &raw.reference {
            field("ref", crate::bounds::message_ref, reference)?;
        }
        Ok(Self {
            kid: raw.kid,
            provider: raw.provider,
            target: raw.target,
            time: raw.time,
            reference: raw.reference,
        })
    }

    /// The escrow key the envelope is sealed to.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The sealing provider's identity (its URI SAN).
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The target identifier, matched exactly against a warrant's `targets`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// When the message was sealed, matched against a warrant's `window`.
    pub fn time(&self) -> OffsetDateTime {
        self.time
    }

    /// The provider's opaque message reference, if any.
    pub fn reference(&self) -> Option<&str> {
        self.reference.as_deref()
    }
}

/// Builds canonical header bytes for a provider: members in PROTOCOL order
/// (`kid`, `suite`, `provider`, `target`, `time`, `ref`), no whitespace, the
/// time at second precision.
#[derive(Debug, Clone)]
pub struct HeaderBuilder {
    kid: String,
    provider: String,
    target: String,
    time: OffsetDateTime,
    reference: Option<String>,
}

impl HeaderBuilder {
    /// A header for `kid`, sealed by `provider` (its URI SAN) for `target`
    /// at `time`.
    pub fn new(
        kid: impl Into<String>,
        provider: impl Into<String>,
        target: impl Into<String>,
        time: OffsetDateTime,
    ) -> Self {
        Self {
            kid: kid.into(),
            provider: provider.into(),
            target: target.into(),
            time,
            reference: None,
        }
    }

    /// Sets the optional message reference.
    #[must_use]
    pub fn reference(mut self, reference: impl Into<String>) -> Self {
        self.reference = Some(reference.into());
        self
    }

    /// The header bytes, checked with [`Header::parse`] under default limits
    /// so a provider cannot make a header the daemon would refuse.
    ///
    /// # Errors
    /// The [`EnvelopeError`] the daemon would give.
    pub fn build(&self) -> Result<Vec<u8>, EnvelopeError> {
        #[derive(Serialize)]
        struct Canonical<'a> {
            kid: &'a str,
            suite: &'a str,
            provider: &'a str,
            target: &'a str,
            time: String,
            #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
            reference: Option<&'a str>,
        }
        let bytes = serde_json::to_vec(&Canonical {
            kid: &self.kid,
            suite: LAV_SUITE,
            provider: &self.provider,
            target: &self.target,
            time: format_time(self.time),
            reference: self.reference.as_deref(),
        })
        .map_err(|e| EnvelopeError::HeaderJson(e.to_string()))?;
        Header::parse(&bytes, &EnvelopeLimits::default())?;
        Ok(bytes)
    }
}

/// A parsed envelope (PROTOCOL §3): the header bytes exactly as received,
/// their parsed form, `enc` as a validated P-256 point and `ct` of a length a
/// valid DEK produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    header_bytes: Vec<u8>,
    header: Header,
    enc: P256PublicKey,
    ct: Vec<u8>,
}

impl Envelope {
    /// Parses untrusted envelope JSON.
    ///
    /// # Errors
    /// An [`EnvelopeError`] with code `malformed_envelope` naming what was
    /// wrong.
    pub fn parse(bytes: &[u8], limits: &EnvelopeLimits) -> Result<Self, EnvelopeError> {
        if bytes.len() > limits.max_envelope_bytes {
            return Err(EnvelopeError::TooLarge {
                limit: limits.max_envelope_bytes,
            });
        }
        // serde_json refuses trailing data; the derive with
        // `deny_unknown_fields` refuses unknown and duplicate members.
        let raw: EnvelopeJson = crate::codec::from_object_slice(bytes)
            .map_err(|e| EnvelopeError::Json(e.to_string()))?;
        if raw.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(raw.v));
        }
        let header_bytes = b64_decode(&raw.header).map_err(|_| EnvelopeError::Base64("header"))?;
        let header = Header::parse(&header_bytes, limits)?;
        let enc = b64_decode(&raw.enc).map_err(|_| EnvelopeError::Base64("enc"))?;
        // G is refused too: a derive on G is then only ever lavd's own
        // check that a key's halves agree (`Hsm::check_pair`), which the
        // crash tests' count of opens relies on.
        if enc == crate::jwk::P256_GENERATOR {
            return Err(EnvelopeError::InvalidEnc);
        }
        let enc = P256PublicKey::from_sec1(&enc).map_err(|_| EnvelopeError::InvalidEnc)?;
        let ct = b64_decode(&raw.ct).map_err(|_| EnvelopeError::Base64("ct"))?;
        if !(CT_MIN_LEN..=CT_MAX_LEN).contains(&ct.len()) {
            return Err(EnvelopeError::CtLength(ct.len()));
        }
        Ok(Self {
            header_bytes,
            header,
            enc,
            ct,
        })
    }

    /// The header bytes exactly as received: HPKE `info` and the reply's
    /// `aad` bind these.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The sender's ephemeral public key.
    pub fn enc(&self) -> &P256PublicKey {
        &self.enc
    }

    /// The sealed DEK with its tag.
    pub fn ct(&self) -> &[u8] {
        &self.ct
    }

    /// PROTOCOL §6 `envelope_digest`: SHA-256(header ‖ enc).
    pub fn digest(&self) -> [u8; 32] {
        envelope_digest(&self.header_bytes, &self.enc)
    }

    /// The wire JSON, members in PROTOCOL order.
    pub fn to_json(&self) -> String {
        // Built by hand: every value is a base64url string or the constant 1,
        // none needs escaping, and there is no failure path to handle.
        format!(
            r#"{{"v":{ENVELOPE_VERSION},"header":"{}","enc":"{}","ct":"{}"}}"#,
            b64_encode(&self.header_bytes),
            b64_encode(self.enc.sec1()),
            b64_encode(&self.ct)
        )
    }
}

/// PROTOCOL §6: `envelope_digest = SHA-256(header ‖ enc)`, over the header
/// bytes as received and the 65-byte `enc` point.
pub fn envelope_digest(header_bytes: &[u8], enc: &P256PublicKey) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(header_bytes);
    ctx.update(enc.sec1());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `info = "lav-envelope-v1" || 0x00 || header`.
fn envelope_info(header_bytes: &[u8]) -> Vec<u8> {
    let mut info = Vec::with_capacity(ENVELOPE_INFO_LABEL.len() + 1 + header_bytes.len());
    info.extend_from_slice(ENVELOPE_INFO_LABEL);
    info.push(0x00);
    info.extend_from_slice(header_bytes);
    info
}

/// Seals a DEK to an escrow key (the provider's operation): HPKE base mode,
/// suite 16-1-2, `info = "lav-envelope-v1" || 0x00 || header`, empty `aad`.
///
/// `header_bytes` should come from [`HeaderBuilder::build`]; they are checked
/// with [`Header::parse`] under default limits either way. The caller is
/// responsible for `recipient` being the key named by the header's `kid`.
///
/// # Errors
/// [`EnvelopeError::InvalidDek`] for a DEK outside 16..=64 bytes; a
/// `malformed_envelope` error for a header the daemon would refuse;
/// [`EnvelopeError::SealFailed`] if the RNG or aws-lc fails.
pub fn seal_envelope(
    recipient: &P256PublicKey,
    header_bytes: &[u8],
    dek: &[u8],
) -> Result<Envelope, EnvelopeError> {
    if !(DEK_MIN_LEN..=DEK_MAX_LEN).contains(&dek.len()) {
        return Err(EnvelopeError::InvalidDek(dek.len()));
    }
    let header = Header::parse(header_bytes, &EnvelopeLimits::default())?;
    let (enc, mut ctx) =
        hpke::setup_base_s(recipient, &envelope_info(header_bytes), Aead::Aes256Gcm)
            .map_err(|_| EnvelopeError::SealFailed)?;
    let ct = ctx.seal(b"", dek).map_err(|_| EnvelopeError::SealFailed)?;
    Ok(Envelope {
        header_bytes: header_bytes.to_vec(),
        header,
        enc,
        ct,
    })
}

/// Opens an envelope with the escrow key whose public half is `pk_r`; `dh`
/// is that key's DH step (the HSM in the daemon, see
/// [`hpke::setup_base_r`]).
///
/// # Errors
/// [`EnvelopeError::OpenFailed`] (`open_failed`) for every authentication
/// failure; [`EnvelopeError::KeyAgreement`] carrying the closure's error.
///
/// # Security
/// Never returns a DEK that did not authenticate; the DEK is zeroized on drop.
/// The caller must have checked that `pk_r` belongs to `header().kid()`.
pub fn open_envelope<E>(
    envelope: &Envelope,
    pk_r: &P256PublicKey,
    dh: impl FnOnce(&P256PublicKey) -> Result<DhOutput, E>,
) -> Result<Secret<Vec<u8>>, EnvelopeError<E>> {
    let info = envelope_info(&envelope.header_bytes);
    let mut ctx = hpke::setup_base_r(&envelope.enc, pk_r, &info, Aead::Aes256Gcm, dh).map_err(
        |e| match e {
            HpkeError::Dh(e) => EnvelopeError::KeyAgreement(e),
            _ => EnvelopeError::OpenFailed,
        },
    )?;
    let dek = ctx
        .open(b"", &envelope.ct)
        .map_err(|_| EnvelopeError::OpenFailed)?;
    // Implied by the `ct` length check in `parse`; kept so a DEK of a length
    // the protocol forbids can never leave this function.
    if !(DEK_MIN_LEN..=DEK_MAX_LEN).contains(&dek.len()) {
        return Err(EnvelopeError::OpenFailed);
    }
    Ok(Secret::from(dek))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::parse_time;
    use crate::jwk::P256PrivateKey;

    fn header() -> Vec<u8> {
        HeaderBuilder::new(
            "2026-11",
            "spiffe://provider.example/mail",
            "acct:alice@example.com",
            parse_time("2026-11-26T07:25:21Z").unwrap(),
        )
        .reference("msg-8812")
        .build()
        .unwrap()
    }

    #[test]
    fn header_builder_is_canonical() {
        assert_eq!(
            String::from_utf8(header()).unwrap(),
            r#"{"kid":"2026-11","suite":"16-1-2","provider":"spiffe://provider.example/mail","target":"acct:alice@example.com","time":"2026-11-26T07:25:21Z","ref":"msg-8812"}"#
        );
    }

    #[test]
    fn seal_parse_open_round_trip() {
        let sk = P256PrivateKey::generate().unwrap();
        let env = seal_envelope(sk.public(), &header(), &[7u8; 32]).unwrap();
        let parsed = Envelope::parse(env.to_json().as_bytes(), &EnvelopeLimits::default()).unwrap();
        assert_eq!(parsed, env);
        assert_eq!(parsed.header().reference(), Some("msg-8812"));
        assert_eq!(parsed.header().target(), "acct:alice@example.com");
        assert_eq!(parsed.ct().len(), 48);
        let dek = open_envelope(&parsed, sk.public(), |e| hpke::software_dh(&sk, e)).unwrap();
        assert_eq!(&dek[..], &[7u8; 32]);
    }

    /// `ref` is opaque (PROTOCOL §3): the empty string and control
    /// characters are a `ref` like any other; only past 256 bytes is it
    /// refused.
    #[test]
    fn an_opaque_ref_parses_whatever_it_holds() {
        let limits = EnvelopeLimits::default();
        for (reference, parsed) in [
            (r#""""#, Some("")),
            (r#""a\tb\u0000""#, Some("a\tb\u{0}")),
            (r#""\u202emsg""#, Some("\u{202e}msg")),
        ] {
            let bytes = format!(
                r#"{{"kid":"2026-11","suite":"16-1-2","provider":"spiffe://p.example","target":"t","time":"2026-11-26T07:25:21Z","ref":{reference}}}"#
            );
            let header = Header::parse(bytes.as_bytes(), &limits).unwrap();
            assert_eq!(header.reference(), parsed, "{bytes}");
        }
        let long = format!(
            r#"{{"kid":"2026-11","suite":"16-1-2","provider":"spiffe://p.example","target":"t","time":"2026-11-26T07:25:21Z","ref":"{}"}}"#,
            "r".repeat(257)
        );
        let e = Header::parse(long.as_bytes(), &limits).unwrap_err();
        assert_eq!(e.code(), "malformed_envelope");
        assert!(e.to_string().contains("ref"), "{e}");
    }

    #[test]
    fn digest_is_sha256_of_header_then_enc() {
        let sk = P256PrivateKey::generate().unwrap();
        let env = seal_envelope(sk.public(), &header(), &[7u8; 16]).unwrap();
        let mut joined = env.header_bytes().to_vec();
        joined.extend_from_slice(env.enc().sec1());
        assert_eq!(
            env.digest().to_vec(),
            digest::digest(&digest::SHA256, &joined).as_ref().to_vec()
        );
    }

    #[test]
    fn deny_reasons_follow_codes() {
        use reply::DenyReason;
        let parse: EnvelopeError = EnvelopeError::InvalidEnc;
        assert_eq!(parse.deny_reason(), Some(DenyReason::MalformedEnvelope));
        let open: EnvelopeError = EnvelopeError::OpenFailed;
        assert_eq!(open.deny_reason(), Some(DenyReason::OpenFailed));
        let hsm: EnvelopeError<hpke::DhError> = EnvelopeError::KeyAgreement(hpke::DhError);
        assert_eq!(hsm.deny_reason(), None);
        assert_eq!(hsm.code(), "key_agreement_failed");
    }

    #[test]
    fn open_with_another_key_is_open_failed() {
        let sk = P256PrivateKey::generate().unwrap();
        let other = P256PrivateKey::generate().unwrap();
        let env = seal_envelope(sk.public(), &header(), &[7u8; 16]).unwrap();
        let err =
            open_envelope(&env, other.public(), |e| hpke::software_dh(&other, e)).unwrap_err();
        assert_eq!(err.code(), "open_failed");
    }
}
