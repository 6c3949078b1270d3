//! Audit log leaves: the events of PROTOCOL §6 as canonical JSON.
//!
//! A leaf is one JSON object with `seq` (its index in the log, assigned by
//! the store at append), `time` (RFC 3339 UTC, seconds), `event` (the event
//! type) and a fixed set of fields per event type; a field that does not
//! apply is `null`, never absent, so every leaf of one type has the same
//! keys. Canonical form: keys sorted by byte order, no insignificant
//! whitespace, strings escaped the way `serde_json` writes them (only `"`,
//! `\` and control characters), integers in plain decimal. For the values
//! leaves hold (ASCII keys, strings, booleans, integers below 2^53) this is
//! the RFC 8785 (JCS) serialization. `serde_json::Value` gives it because its
//! map is a `BTreeMap` (the `preserve_order` feature is off; a test proves
//! it).
//!
//! Digests are SHA-256, base64url without padding like every binary field of
//! the protocol: `warrant_digest` over the JWS payload bytes (the decoded
//! `payload`, i.e. the claims JSON exactly as signed), `envelope_digest` over
//! `header ‖ enc` (the decoded header bytes then the 65-byte point; `enc` has
//! a fixed length, so the split is unambiguous), `config_digest` over the
//! trust configuration file bytes.
//!
//! # Security
//! Leaves never hold a key, DEK, PIN or ciphertext. The constructors take
//! only identities, identifiers, [`Digest`]s (which can only be made by
//! hashing) and reason codes (`&'static str` or enums, so no runtime secret
//! can become a reason); text is bounded and free of control characters.

use std::collections::BTreeMap;

use aws_lc_rs::digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::bounds;
use crate::codec;

/// The largest leaf accepted or written, in bytes: 65,535, the most a
/// C2SP `tlog-tiles` entry bundle can carry (a big-endian `u16` length), so
/// that every leaf can be served as a tile entry.
pub const MAX_LEAF_BYTES: usize = u16::MAX as usize;
/// The longest algorithm name, in bytes. Warrant ids, escrow kids,
/// authority kids, roles and revocation reasons have their bounds in
/// [`crate::bounds`], shared with every layer that reads them.
const MAX_ID_BYTES: usize = 512;
/// The most authorities one `authorities_loaded` leaf lists.
const MAX_AUTHORITIES: usize = 256;

/// A leaf that could not be built or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum LeafError {
    /// A value given to a constructor breaks the leaf rules (empty, too long,
    /// control characters, whitespace in an identity, an opened unwrap
    /// without its envelope): a bug in the caller.
    #[error("audit field `{field}`: {why}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The leaf exceeds [`MAX_LEAF_BYTES`].
    #[error("the leaf is larger than {MAX_LEAF_BYTES} bytes")]
    TooLarge,
    /// The bytes are not JSON (or not UTF-8, or carry trailing data).
    #[error("the leaf is not JSON: {0}")]
    NotJson(String),
    /// The leaf is JSON but not exactly the bytes lavd writes for it: other
    /// key order, whitespace, escapes, number spelling, a duplicate or
    /// missing key. Leaves are hashed as bytes, so a second spelling of an
    /// event is refused; it points at an edited leaf.
    #[error("the leaf is not in canonical form")]
    NotCanonical,
    /// The leaf is canonical JSON but not a valid audit event: unknown event
    /// type, unknown or mistyped field, or inconsistent values.
    #[error("the leaf is not a valid audit event: {0}")]
    Schema(String),
    /// Serializing failed; cannot happen for the types here, kept so the
    /// path has no panic.
    #[error("encoding the leaf: {0}")]
    Encode(String),
}

impl LeafError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Field { .. } => "audit_field_invalid",
            Self::TooLarge => "leaf_too_large",
            Self::NotJson(_) => "leaf_not_json",
            Self::NotCanonical => "leaf_not_canonical",
            Self::Schema(_) => "leaf_invalid",
            Self::Encode(_) => "leaf_encode",
        }
    }
}

fn field(field: &'static str, why: &'static str) -> LeafError {
    LeafError::Field { field, why }
}

/// Free text: non-empty, bounded, no control characters.
fn check_text(name: &'static str, value: &str, max: usize) -> Result<(), LeafError> {
    if value.is_empty() {
        return Err(field(name, "empty"));
    }
    if value.len() > max {
        return Err(field(name, "too long"));
    }
    if value.chars().any(char::is_control) {
        return Err(field(name, "contains a control character"));
    }
    Ok(())
}

/// An identity or identifier: free text without whitespace.
fn check_token(name: &'static str, value: &str, max: usize) -> Result<(), LeafError> {
    check_text(name, value, max)?;
    if value.chars().any(char::is_whitespace) {
        return Err(field(name, "contains whitespace"));
    }
    Ok(())
}

/// A reason code: snake_case ASCII, as the error codes of this project.
fn check_code(name: &'static str, value: &str) -> Result<(), LeafError> {
    let ok = (1..=64).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(field(name, "not a snake_case code"))
    }
}

/// A field with one definition in [`crate::bounds`].
fn check_bound(
    name: &'static str,
    value: &str,
    check: fn(&str) -> Result<(), bounds::BoundError>,
) -> Result<(), LeafError> {
    check(value).map_err(|why| field(name, why.as_str()))
}

fn check_caller(value: &str) -> Result<(), LeafError> {
    check_bound("caller", value, bounds::logged::identity)
}

/// A SHA-256 digest of protocol bytes, written as base64url without padding.
/// Only the hashing constructors make one, so no raw bytes reach a leaf.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    fn sha256(parts: &[&[u8]]) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in parts {
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        // SHA-256 output is always 32 bytes.
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }

    /// A digest computed elsewhere with the same definition (e.g.
    /// [`crate::envelope::Envelope::digest`], or a verified warrant's payload
    /// digest).
    pub fn from_sha256(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// `warrant_digest`: SHA-256 of the JWS payload bytes (the decoded
    /// `payload` member, exactly as the authorities signed it).
    pub fn of_warrant_payload(payload: &[u8]) -> Self {
        Self::sha256(&[payload])
    }

    /// `envelope_digest`: SHA-256 of the decoded header bytes followed by the
    /// decoded 65-byte `enc`.
    pub fn of_envelope(header: &[u8], enc: &[u8]) -> Self {
        Self::sha256(&[header, enc])
    }

    /// `config_digest`: SHA-256 of the trust configuration as loaded, as
    /// canonical JSON (`crate::api::state`'s `trust_canonical`).
    pub fn of_trust_config(config: &[u8]) -> Self {
        Self::sha256(&[config])
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", codec::b64_encode(self.0))
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&codec::b64_encode(self.0))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&codec::b64_encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = codec::b64_decode(&text).map_err(serde::de::Error::custom)?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a digest is 32 bytes"))?;
        Ok(Self(bytes))
    }
}

/// Why an envelope was not opened: the one PROTOCOL §5 list, shared with the
/// unwrap reply so that the log and the reply can never disagree.
pub use crate::envelope::reply::DenyReason;

/// The result of one envelope of an unwrap request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnwrapOutcome {
    /// The DEK was opened (and will be released once this leaf is durable).
    Opened,
    /// Refused, with the reason sent to the agency.
    Denied(DenyReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutcomeTag {
    Opened,
    Denied,
}

/// The warrant an unwrap ran under, as the audit log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarrantRef<'a> {
    /// The warrant's `id` claim.
    pub id: &'a str,
    /// [`Digest::of_warrant_payload`] of the JWS payload.
    pub digest: Digest,
    /// Whether the warrant is usable only under the emergency rule.
    pub emergency: bool,
}

/// `unwrap`: one envelope of an unwrap request, opened or denied.
///
/// Fields: `caller`, `warrant_id`, `warrant_digest`, `emergency`, `kid`
/// (null when the envelope did not parse far enough), `envelope_digest`
/// (null likewise), `outcome` (`opened`/`denied`), `reason` (null when
/// opened).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unwrap {
    caller: String,
    warrant_id: String,
    warrant_digest: Digest,
    emergency: bool,
    kid: Option<String>,
    envelope_digest: Option<Digest>,
    outcome: OutcomeTag,
    reason: Option<DenyReason>,
}

impl Unwrap {
    /// One envelope's audit record.
    ///
    /// # Errors
    /// [`LeafError::Field`] for a bad identity or id, or an `Opened` outcome
    /// without `kid` and `envelope_digest` (an opened envelope was parsed).
    pub fn new(
        caller: &str,
        warrant: &WarrantRef<'_>,
        kid: Option<&str>,
        envelope_digest: Option<Digest>,
        outcome: UnwrapOutcome,
    ) -> Result<Self, LeafError> {
        let (outcome, reason) = match outcome {
            UnwrapOutcome::Opened => (OutcomeTag::Opened, None),
            UnwrapOutcome::Denied(r) => (OutcomeTag::Denied, Some(r)),
        };
        let record = Self {
            caller: caller.to_owned(),
            warrant_id: warrant.id.to_owned(),
            warrant_digest: warrant.digest,
            emergency: warrant.emergency,
            kid: kid.map(str::to_owned),
            envelope_digest,
            outcome,
            reason,
        };
        record.validate()?;
        Ok(record)
    }

    fn validate(&self) -> Result<(), LeafError> {
        check_caller(&self.caller)?;
        check_bound("warrant_id", &self.warrant_id, bounds::logged::warrant_id)?;
        if let Some(kid) = &self.kid {
            check_bound("kid", kid, bounds::kid)?;
        }
        match (self.outcome, self.reason) {
            (OutcomeTag::Opened, None) => {
                if self.kid.is_none() || self.envelope_digest.is_none() {
                    return Err(field("kid", "an opened envelope names its key and digest"));
                }
            }
            (OutcomeTag::Denied, Some(_)) => {}
            _ => {
                return Err(field(
                    "reason",
                    "present exactly when the outcome is denied",
                ))
            }
        }
        Ok(())
    }

    /// Turns the outcome into `denied` with `reason` (a no-op's worth of
    /// change for an already denied one: its reason is replaced). Cannot
    /// fail: a denied record needs nothing an opened one lacks. This is how
    /// the unwrap path builds every leaf before the budget and the HSM, as
    /// `opened` for a candidate, and then only ever downgrades it, so that
    /// nothing after the HSM can fail on input.
    pub fn deny(&mut self, reason: DenyReason) {
        self.outcome = OutcomeTag::Denied;
        self.reason = Some(reason);
    }

    /// The agency identity that asked.
    pub fn caller(&self) -> &str {
        &self.caller
    }
    /// The warrant's `id`.
    pub fn warrant_id(&self) -> &str {
        &self.warrant_id
    }
    /// The digest of the warrant's payload.
    pub fn warrant_digest(&self) -> Digest {
        self.warrant_digest
    }
    /// Whether the warrant was an emergency one.
    pub fn emergency(&self) -> bool {
        self.emergency
    }
    /// The envelope's escrow key, when it parsed.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }
    /// The envelope digest, when it parsed.
    pub fn envelope_digest(&self) -> Option<Digest> {
        self.envelope_digest
    }
    /// Opened or denied (with the reason).
    pub fn outcome(&self) -> UnwrapOutcome {
        match self.reason {
            Some(r) => UnwrapOutcome::Denied(r),
            None => UnwrapOutcome::Opened,
        }
    }
}

/// `warrant_refused`: a whole request refused for its warrant.
///
/// Fields: `caller`, `warrant_id` (null when the payload did not parse),
/// `warrant_digest` (null when there was no decodable payload), `reason`
/// (the request error code, e.g. `warrant_expired`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarrantRefused {
    caller: String,
    warrant_id: Option<String>,
    warrant_digest: Option<Digest>,
    reason: String,
}

impl WarrantRefused {
    /// A refused warrant. `reason` is the stable error code sent to the
    /// caller; it is `'static` so that no runtime text can become one.
    ///
    /// # Errors
    /// [`LeafError::Field`] for a bad identity, id or code.
    pub fn new(
        caller: &str,
        warrant_id: Option<&str>,
        warrant_digest: Option<Digest>,
        reason: &'static str,
    ) -> Result<Self, LeafError> {
        let record = Self {
            caller: caller.to_owned(),
            warrant_id: warrant_id.map(str::to_owned),
            warrant_digest,
            reason: reason.to_owned(),
        };
        record.validate()?;
        Ok(record)
    }

    fn validate(&self) -> Result<(), LeafError> {
        check_caller(&self.caller)?;
        if let Some(id) = &self.warrant_id {
            check_bound("warrant_id", id, bounds::logged::warrant_id)?;
        }
        check_code("reason", &self.reason)
    }

    /// The identity that presented the warrant.
    pub fn caller(&self) -> &str {
        &self.caller
    }
    /// The warrant's `id`, if it parsed.
    pub fn warrant_id(&self) -> Option<&str> {
        self.warrant_id.as_deref()
    }
    /// The payload digest, if there was a payload.
    pub fn warrant_digest(&self) -> Option<Digest> {
        self.warrant_digest
    }
    /// The refusal code.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RevokedBy {
    Admin,
    Authority,
}

/// `revocation`: a warrant revoked, durably and finally.
///
/// Fields: `caller` (who sent the request), `warrant_id`, `reason` (the
/// revoker's free text), `by` (`admin` for the admin role, `authority` for a
/// revocation JWS), `authority` (the signing authority's `kid`, null for
/// `admin`); for a revocation JWS also `revocation_digest` (SHA-256 of the
/// payload the authority signed, which ties the leaf to the signed object)
/// and `signed_time` (the `time` in it). Leaves written before those two
/// were added lack them, and stay valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    caller: String,
    warrant_id: String,
    reason: String,
    by: RevokedBy,
    authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation_digest: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signed_time: Option<String>,
}

/// What an authority signed, for its revocation's leaf.
#[derive(Debug, Clone, Copy)]
pub struct SignedRevocation<'a> {
    /// The signing authority's `kid`.
    pub authority: &'a str,
    /// SHA-256 of the JWS payload.
    pub digest: [u8; 32],
    /// The payload's `time`.
    pub time: OffsetDateTime,
}

impl Revocation {
    /// A revocation; `signed` is what the authority whose JWS authorised
    /// it signed, `None` when the caller's `admin` role did.
    ///
    /// # Errors
    /// [`LeafError::Field`] for bad text.
    pub fn new(
        caller: &str,
        warrant_id: &str,
        reason: &str,
        signed: Option<SignedRevocation<'_>>,
    ) -> Result<Self, LeafError> {
        let record = Self {
            caller: caller.to_owned(),
            warrant_id: warrant_id.to_owned(),
            reason: reason.to_owned(),
            by: if signed.is_some() {
                RevokedBy::Authority
            } else {
                RevokedBy::Admin
            },
            authority: signed.map(|s| s.authority.to_owned()),
            revocation_digest: signed.map(|s| Digest::from_sha256(s.digest)),
            signed_time: signed.map(|s| codec::format_time(s.time)),
        };
        record.validate()?;
        Ok(record)
    }

    fn validate(&self) -> Result<(), LeafError> {
        check_caller(&self.caller)?;
        check_bound("warrant_id", &self.warrant_id, bounds::logged::warrant_id)?;
        check_bound("reason", &self.reason, bounds::logged::reason)?;
        if let Some(t) = &self.signed_time {
            // The one spelling `format_time` writes.
            if codec::parse_time(t).map(codec::format_time).as_deref() != Ok(t.as_str()) {
                return Err(field("signed_time", "not a time to the second, in UTC"));
            }
        }
        let signed = (self.revocation_digest.is_some(), self.signed_time.is_some());
        match (&self.by, &self.authority, signed) {
            (RevokedBy::Admin, None, (false, false)) => Ok(()),
            // Before 2026-12-04, without the digest and time.
            (RevokedBy::Authority, Some(kid), (true, true) | (false, false)) => {
                check_bound("authority", kid, bounds::logged::authority_kid)
            }
            (_, _, (true, false) | (false, true)) => Err(field(
                "revocation_digest",
                "present exactly when `signed_time` is",
            )),
            (RevokedBy::Admin, None, _) => Err(field(
                "revocation_digest",
                "only for a revocation an authority signed",
            )),
            _ => Err(field("authority", "present exactly when `by` is authority")),
        }
    }

    /// The identity that sent the revocation.
    pub fn caller(&self) -> &str {
        &self.caller
    }
    /// The revoked warrant's `id`.
    pub fn warrant_id(&self) -> &str {
        &self.warrant_id
    }
    /// The revoker's reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
    /// The authority kid, for an authority-signed revocation.
    pub fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }
    /// SHA-256 of the payload the authority signed (leaves since
    /// 2026-12-04).
    pub fn revocation_digest(&self) -> Option<&Digest> {
        self.revocation_digest.as_ref()
    }
}

/// `key_generated`: an escrow key pair created in the HSM.
///
/// Fields: `kid`, `not_before`, `not_after`, `destroy_after`, `caller` (null
/// for the local CLI or the daemon's own schedule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyGenerated {
    kid: String,
    #[serde(with = "codec::rfc3339")]
    not_before: OffsetDateTime,
    #[serde(with = "codec::rfc3339")]
    not_after: OffsetDateTime,
    #[serde(with = "codec::rfc3339")]
    destroy_after: OffsetDateTime,
    caller: Option<String>,
}

impl KeyGenerated {
    /// A generated key. Times are recorded to the second.
    ///
    /// # Errors
    /// [`LeafError::Field`] for a bad kid or identity, or times out of order
    /// (`not_before < not_after <= destroy_after`).
    pub fn new(
        kid: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        destroy_after: OffsetDateTime,
        caller: Option<&str>,
    ) -> Result<Self, LeafError> {
        let record = Self {
            kid: kid.to_owned(),
            not_before,
            not_after,
            destroy_after,
            caller: caller.map(str::to_owned),
        };
        record.validate()?;
        Ok(record)
    }

    fn validate(&self) -> Result<(), LeafError> {
        check_bound("kid", &self.kid, bounds::kid)?;
        if let Some(c) = &self.caller {
            check_caller(c)?;
        }
        if !(self.not_before < self.not_after && self.not_after <= self.destroy_after) {
            return Err(field(
                "not_after",
                "times must satisfy not_before < not_after <= destroy_after",
            ));
        }
        Ok(())
    }

    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }
    /// Start of the key's validity.
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }
    /// End of the key's validity (providers stop sealing to it).
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
    /// End of retention: the key is due for destruction after it.
    pub fn destroy_after(&self) -> OffsetDateTime {
        self.destroy_after
    }
}

/// `key_destroyed`: an escrow key destroyed in the HSM.
///
/// Fields: `kid`, `reason` (a code: `retention`, `forced`), `forced`
/// (destroyed before its `destroy_after`), `caller` (null for the local CLI
/// or the daemon's own schedule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDestroyed {
    kid: String,
    reason: String,
    forced: bool,
    caller: Option<String>,
}

impl KeyDestroyed {
    /// A destroyed key.
    ///
    /// # Errors
    /// [`LeafError::Field`] for a bad kid, code or identity.
    pub fn new(
        kid: &str,
        reason: &'static str,
        forced: bool,
        caller: Option<&str>,
    ) -> Result<Self, LeafError> {
        let record = Self {
            kid: kid.to_owned(),
            reason: reason.to_owned(),
            forced,
            caller: caller.map(str::to_owned),
        };
        record.validate()?;
        Ok(record)
    }

    fn validate(&self) -> Result<(), LeafError> {
        check_bound("kid", &self.kid, bounds::kid)?;
        check_code("reason", &self.reason)?;
        if let Some(c) = &self.caller {
            check_caller(c)?;
        }
        Ok(())
    }

    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }
    /// The reason code (`retention`, `forced`).
    pub fn reason(&self) -> &str {
        &self.reason
    }
    /// Whether it was destroyed before its `destroy_after`.
    pub fn forced(&self) -> bool {
        self.forced
    }
}

/// One configured authority, as `authorities_loaded` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoritySummary {
    /// The authority's `kid`.
    pub kid: String,
    /// Its role (`executive`, `judicial`, …).
    pub role: String,
    /// Its JWS algorithm (`ES256`, `EdDSA`).
    pub alg: String,
    /// Who holds its key, when configured as other than its `kid`: the
    /// policy counts each holder once (absent from leaves written before
    /// holders, and when it is the `kid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

/// The policy in force: how many distinct authorities of each role sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySummary {
    /// Role → number of distinct authorities required.
    pub require: BTreeMap<String, u32>,
    /// The emergency rule, if the policy has one.
    pub emergency: Option<EmergencySummary>,
}

/// The emergency rule of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencySummary {
    /// Role → number of distinct authorities required.
    pub require: BTreeMap<String, u32>,
    /// How long an emergency warrant is usable from its `not_before`.
    pub max_hours: u32,
}

/// `authorities_loaded`: the trust configuration in force from now on.
///
/// Fields: `config_digest`, `authorities` (sorted by `kid`), `policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoritiesLoaded {
    config_digest: Digest,
    authorities: Vec<AuthoritySummary>,
    policy: PolicySummary,
}

impl AuthoritiesLoaded {
    /// The loaded configuration; authorities are sorted by `kid`.
    ///
    /// # Errors
    /// [`LeafError::Field`] for an empty or oversized list, duplicate kids,
    /// bad names, or an empty policy.
    pub fn new(
        config_digest: Digest,
        mut authorities: Vec<AuthoritySummary>,
        policy: PolicySummary,
    ) -> Result<Self, LeafError> {
        authorities.sort_by(|a, b| a.kid.cmp(&b.kid));
        let record = Self {
            config_digest,
            authorities,
            policy,
        };
        record.validate()?;
        Ok(record)
    }

    fn validate(&self) -> Result<(), LeafError> {
        if self.authorities.is_empty() || self.authorities.len() > MAX_AUTHORITIES {
            return Err(field("authorities", "between 1 and 256 authorities"));
        }
        for pair in self.authorities.windows(2) {
            if let [a, b] = pair {
                if a.kid >= b.kid {
                    return Err(field("authorities", "sorted by kid, each kid once"));
                }
            }
        }
        for a in &self.authorities {
            check_bound("authorities.kid", &a.kid, bounds::logged::authority_kid)?;
            check_bound("authorities.role", &a.role, bounds::logged::role)?;
            check_token("authorities.alg", &a.alg, MAX_ID_BYTES)?;
            if let Some(holder) = &a.holder {
                check_bound("authorities.holder", holder, bounds::logged::authority_kid)?;
            }
        }
        check_requirements(&self.policy.require)?;
        if let Some(e) = &self.policy.emergency {
            check_requirements(&e.require)?;
            if e.max_hours == 0 {
                return Err(field("policy.emergency.max_hours", "zero"));
            }
        }
        Ok(())
    }

    /// The configuration file digest.
    pub fn config_digest(&self) -> Digest {
        self.config_digest
    }
    /// The authorities, sorted by kid.
    pub fn authorities(&self) -> &[AuthoritySummary] {
        &self.authorities
    }
    /// The policy.
    pub fn policy(&self) -> &PolicySummary {
        &self.policy
    }
}

fn check_requirements(require: &BTreeMap<String, u32>) -> Result<(), LeafError> {
    if require.is_empty() || require.values().any(|n| *n == 0) {
        return Err(field(
            "policy.require",
            "at least one role, each needing 1 or more",
        ));
    }
    for role in require.keys() {
        check_bound("policy.require", role, bounds::logged::role)?;
    }
    Ok(())
}

/// One audit event, without its position and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `unwrap`.
    Unwrap(Unwrap),
    /// `warrant_refused`.
    WarrantRefused(WarrantRefused),
    /// `revocation`.
    Revocation(Revocation),
    /// `key_generated`.
    KeyGenerated(KeyGenerated),
    /// `key_destroyed`.
    KeyDestroyed(KeyDestroyed),
    /// `authorities_loaded`.
    AuthoritiesLoaded(AuthoritiesLoaded),
}

macro_rules! event_from {
    ($($variant:ident),*) => {
        $(impl From<$variant> for Event {
            fn from(e: $variant) -> Self {
                Self::$variant(e)
            }
        })*
    };
}
event_from!(
    Unwrap,
    WarrantRefused,
    Revocation,
    KeyGenerated,
    KeyDestroyed,
    AuthoritiesLoaded
);

fn object<T: Serialize>(value: &T) -> Result<Map<String, Value>, LeafError> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(LeafError::Encode("an event is not a JSON object".into())),
        Err(e) => Err(LeafError::Encode(e.to_string())),
    }
}

fn from_object<T: serde::de::DeserializeOwned>(map: Map<String, Value>) -> Result<T, LeafError> {
    serde_json::from_value(Value::Object(map)).map_err(|e| LeafError::Schema(e.to_string()))
}

impl Event {
    /// The `event` value of the leaf.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unwrap(_) => "unwrap",
            Self::WarrantRefused(_) => "warrant_refused",
            Self::Revocation(_) => "revocation",
            Self::KeyGenerated(_) => "key_generated",
            Self::KeyDestroyed(_) => "key_destroyed",
            Self::AuthoritiesLoaded(_) => "authorities_loaded",
        }
    }

    /// For an `unwrap` event of warrant `id` that says `opened`: its key's
    /// `kid` (an opened envelope always names one). `None` for every other
    /// event.
    pub fn opened_kid(&self, id: &str) -> Option<&str> {
        match self {
            Self::Unwrap(u) if u.warrant_id == id && u.outcome == OutcomeTag::Opened => {
                u.kid.as_deref()
            }
            _ => None,
        }
    }

    /// For an `unwrap` event of warrant `id` that says `opened`: the same
    /// event denied with `reason`. `None` for every other event. The store
    /// uses it inside the transaction that settles an unwrap, when it finds
    /// the warrant revoked by then (PROTOCOL §8), or the envelope's key
    /// destroyed.
    pub fn denied_if_opened(&self, id: &str, reason: DenyReason) -> Option<Self> {
        match self {
            Self::Unwrap(u) if u.warrant_id == id && u.outcome == OutcomeTag::Opened => {
                let mut denied = u.clone();
                denied.deny(reason);
                Some(Self::Unwrap(denied))
            }
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), LeafError> {
        match self {
            Self::Unwrap(e) => e.validate(),
            Self::WarrantRefused(e) => e.validate(),
            Self::Revocation(e) => e.validate(),
            Self::KeyGenerated(e) => e.validate(),
            Self::KeyDestroyed(e) => e.validate(),
            Self::AuthoritiesLoaded(e) => e.validate(),
        }
    }

    /// The canonical leaf bytes of this event at index `seq`, recorded at
    /// `time` (to the second).
    ///
    /// # Errors
    /// [`LeafError::TooLarge`]; [`LeafError::Encode`] (not expected).
    pub fn to_leaf(&self, seq: u64, time: OffsetDateTime) -> Result<Vec<u8>, LeafError> {
        self.to_leaf_at(seq, &LeafTime::new(time))
    }

    /// [`Event::to_leaf`] with the time already formatted: the store
    /// formats a batch's one time once for all its leaves, inside the
    /// transaction that assigns `seq`.
    ///
    /// # Errors
    /// As [`Event::to_leaf`].
    pub fn to_leaf_at(&self, seq: u64, time: &LeafTime) -> Result<Vec<u8>, LeafError> {
        let mut map = match self {
            Self::Unwrap(e) => object(e)?,
            Self::WarrantRefused(e) => object(e)?,
            Self::Revocation(e) => object(e)?,
            Self::KeyGenerated(e) => object(e)?,
            Self::KeyDestroyed(e) => object(e)?,
            Self::AuthoritiesLoaded(e) => object(e)?,
        };
        map.insert("seq".into(), Value::from(seq));
        map.insert("time".into(), Value::String(time.0.clone()));
        map.insert("event".into(), Value::String(self.name().into()));
        let bytes = serde_json::to_vec(&Value::Object(map))
            .map_err(|e| LeafError::Encode(e.to_string()))?;
        if bytes.len() > MAX_LEAF_BYTES {
            return Err(LeafError::TooLarge);
        }
        Ok(bytes)
    }
}

/// A leaf's `time` field, formatted (RFC 3339, UTC, to the second).
#[derive(Debug, Clone)]
pub struct LeafTime(String);

impl LeafTime {
    /// `time`, as every leaf recorded at it says it.
    pub fn new(time: OffsetDateTime) -> Self {
        Self(codec::format_time(time))
    }
}

/// A leaf read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// The leaf's index, as written into it.
    pub seq: u64,
    /// When it was recorded.
    pub time: OffsetDateTime,
    /// What happened.
    pub event: Event,
}

impl Leaf {
    /// Parses leaf bytes strictly: JSON, canonical, a known event with
    /// exactly its fields, consistent values, and byte-identical to what
    /// [`Event::to_leaf`] writes for it.
    ///
    /// # Errors
    /// [`LeafError::TooLarge`], [`LeafError::NotJson`],
    /// [`LeafError::NotCanonical`], [`LeafError::Schema`].
    pub fn parse(bytes: &[u8]) -> Result<Self, LeafError> {
        if bytes.len() > MAX_LEAF_BYTES {
            return Err(LeafError::TooLarge);
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| LeafError::NotJson(e.to_string()))?;
        // First the JSON-level form (key order, whitespace, escapes,
        // duplicate keys), so such edits are named as such.
        let again = serde_json::to_vec(&value).map_err(|e| LeafError::Encode(e.to_string()))?;
        if again != bytes {
            return Err(LeafError::NotCanonical);
        }
        let Value::Object(mut map) = value else {
            return Err(LeafError::Schema("a leaf is a JSON object".into()));
        };
        let seq = map.remove("seq").and_then(|v| v.as_u64()).ok_or_else(|| {
            LeafError::Schema("`seq` is missing or not an unsigned integer".into())
        })?;
        let time = map
            .remove("time")
            .and_then(|v| v.as_str().and_then(|t| codec::parse_time(t).ok()))
            .ok_or_else(|| LeafError::Schema("`time` is missing or not RFC 3339 UTC".into()))?;
        let name = match map.remove("event") {
            Some(Value::String(name)) => name,
            _ => {
                return Err(LeafError::Schema(
                    "`event` is missing or not a string".into(),
                ))
            }
        };
        let event = match name.as_str() {
            "unwrap" => Event::Unwrap(from_object(map)?),
            "warrant_refused" => Event::WarrantRefused(from_object(map)?),
            "revocation" => Event::Revocation(from_object(map)?),
            "key_generated" => Event::KeyGenerated(from_object(map)?),
            "key_destroyed" => Event::KeyDestroyed(from_object(map)?),
            "authorities_loaded" => Event::AuthoritiesLoaded(from_object(map)?),
            other => {
                return Err(LeafError::Schema(format!("unknown event type `{other}`")));
            }
        };
        event
            .validate()
            .map_err(|e| LeafError::Schema(e.to_string()))?;
        // Then the schema-level form: absent-instead-of-null fields,
        // fractional seconds, unsorted authority lists.
        if event.to_leaf(seq, time)? != bytes {
            return Err(LeafError::NotCanonical);
        }
        Ok(Self { seq, time, event })
    }

    /// The canonical bytes of this leaf.
    ///
    /// # Errors
    /// As [`Event::to_leaf`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, LeafError> {
        self.event.to_leaf(self.seq, self.time)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use time::macros::datetime;

    pub(crate) const AGENCY: &str = "spiffe://agency.example/lea/unit-7";

    pub(crate) fn warrant(id: &str, emergency: bool) -> WarrantRef<'_> {
        WarrantRef {
            id,
            digest: Digest::of_warrant_payload(id.as_bytes()),
            emergency,
        }
    }

    pub(crate) fn opened(caller: &str, w: &WarrantRef<'_>, n: u8) -> Event {
        Unwrap::new(
            caller,
            w,
            Some("2026-11"),
            Some(Digest::of_envelope(&[n], &[0x04; 65])),
            UnwrapOutcome::Opened,
        )
        .unwrap()
        .into()
    }

    pub(crate) fn denied(caller: &str, w: &WarrantRef<'_>, reason: DenyReason) -> Event {
        Unwrap::new(
            caller,
            w,
            Some("2026-11"),
            Some(Digest::of_envelope(b"h", b"e")),
            UnwrapOutcome::Denied(reason),
        )
        .unwrap()
        .into()
    }

    pub(crate) fn every_event() -> Vec<Event> {
        let w = warrant("UK-IPA-2026-0042", false);
        let e = warrant("UK-IPA-2026-0043", true);
        vec![
            AuthoritiesLoaded::new(
                Digest::of_trust_config(b"[policy]\n"),
                vec![
                    AuthoritySummary {
                        kid: "judicial-3".into(),
                        role: "judicial".into(),
                        alg: "ES256".into(),
                        holder: None,
                    },
                    AuthoritySummary {
                        kid: "executive-1".into(),
                        role: "executive".into(),
                        alg: "EdDSA".into(),
                        holder: None,
                    },
                ],
                PolicySummary {
                    require: BTreeMap::from([("executive".into(), 1), ("judicial".into(), 1)]),
                    emergency: Some(EmergencySummary {
                        require: BTreeMap::from([("executive".into(), 1)]),
                        max_hours: 72,
                    }),
                },
            )
            .unwrap()
            .into(),
            KeyGenerated::new(
                "2026-11",
                datetime!(2026-11-01 00:00:00 UTC),
                datetime!(2026-12-01 00:00:00 UTC),
                datetime!(2033-12-01 00:00:00 UTC),
                Some("spiffe://vault.example/admin/alice"),
            )
            .unwrap()
            .into(),
            opened(AGENCY, &w, 1),
            denied(AGENCY, &w, DenyReason::OutOfWindow),
            Unwrap::new(
                AGENCY,
                &w,
                None,
                None,
                UnwrapOutcome::Denied(DenyReason::MalformedEnvelope),
            )
            .unwrap()
            .into(),
            opened(AGENCY, &e, 2),
            WarrantRefused::new(
                AGENCY,
                Some("UK-IPA-2026-0099"),
                Some(Digest::of_warrant_payload(b"x")),
                "warrant_expired",
            )
            .unwrap()
            .into(),
            WarrantRefused::new(AGENCY, None, None, "malformed_warrant")
                .unwrap()
                .into(),
            Revocation::new(
                "spiffe://vault.example/admin/alice",
                "UK-IPA-2026-0042",
                "case closed",
                None,
            )
            .unwrap()
            .into(),
            Revocation::new(
                AGENCY,
                "UK-IPA-2026-0043",
                "urgent warrant not confirmed",
                Some(SignedRevocation {
                    authority: "judicial-3",
                    digest: [3; 32],
                    time: datetime!(2026-11-02 10:00:00 UTC),
                }),
            )
            .unwrap()
            .into(),
            KeyDestroyed::new("2019-01", "retention_expired", false, None)
                .unwrap()
                .into(),
        ]
    }

    const T: OffsetDateTime = datetime!(2026-11-26 07:25:21 UTC);

    #[test]
    fn unwrap_leaf_exact_bytes() {
        let w = WarrantRef {
            id: "UK-IPA-2026-0042",
            digest: Digest::of_warrant_payload(b"{}"),
            emergency: false,
        };
        let leaf = opened(AGENCY, &w, 1).to_leaf(1042, T).unwrap();
        let expected = format!(
            concat!(
                r#"{{"caller":"spiffe://agency.example/lea/unit-7","emergency":false,"#,
                r#""envelope_digest":"{}","event":"unwrap","kid":"2026-11","outcome":"opened","#,
                r#""reason":null,"seq":1042,"time":"2026-11-26T07:25:21Z","#,
                r#""warrant_digest":"RBNvo1WzZ4oRRq0W9-hknpT7T8If536DEMBg9hyq_4o","warrant_id":"UK-IPA-2026-0042"}}"#
            ),
            codec::b64_encode(Digest::of_envelope(&[1], &[4; 65]).as_bytes())
        );
        assert_eq!(String::from_utf8(leaf).unwrap(), expected);
    }

    #[test]
    fn every_event_round_trips_canonically() {
        for (i, event) in every_event().into_iter().enumerate() {
            let bytes = event.to_leaf(i as u64, T).unwrap();
            let leaf = Leaf::parse(&bytes).unwrap();
            assert_eq!(leaf.seq, i as u64);
            assert_eq!(leaf.time, T);
            assert_eq!(leaf.event, event);
            assert_eq!(leaf.to_bytes().unwrap(), bytes);
        }
    }

    /// serde_json's default map is a BTreeMap: keys come out sorted whatever
    /// the insertion order. This fails if anything in the dependency tree
    /// turns on serde_json's `preserve_order`.
    #[test]
    fn serde_json_sorts_keys() {
        let mut map = Map::new();
        map.insert("zeta".into(), Value::from(1));
        map.insert("alpha".into(), Value::from(2));
        map.insert("Mid".into(), Value::from(3));
        assert_eq!(
            serde_json::to_string(&Value::Object(map)).unwrap(),
            r#"{"Mid":3,"alpha":2,"zeta":1}"#
        );
    }

    #[test]
    fn non_canonical_leaves_are_refused() {
        let bytes = every_event()[2].to_leaf(7, T).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let code = |s: &str| Leaf::parse(s.as_bytes()).unwrap_err().code();
        // Whitespace.
        assert_eq!(code(&text.replacen(',', ", ", 1)), "leaf_not_canonical");
        assert_eq!(code(&format!("{text}\n")), "leaf_not_canonical");
        // Key order.
        let swapped = text.replacen(r#""caller""#, r#""zzz""#, 1);
        assert_eq!(code(&swapped), "leaf_not_canonical");
        // An escape where the character itself is canonical.
        assert_eq!(
            code(&text.replacen("unit-7", "unit\\u002d7", 1)),
            "leaf_not_canonical"
        );
        // A duplicate key (serde_json keeps the last; the bytes then differ).
        assert_eq!(
            code(&text.replacen(r#"{"caller""#, r#"{"caller":"x","caller""#, 1)),
            "leaf_not_canonical"
        );
        // Absent instead of null.
        assert_eq!(
            code(&text.replacen(r#""reason":null,"#, "", 1)),
            "leaf_not_canonical"
        );
        // Fractional seconds.
        assert_eq!(
            code(&text.replacen("07:25:21Z", "07:25:21.5Z", 1)),
            "leaf_not_canonical"
        );
        // Not JSON, trailing data, too large.
        assert_eq!(code(&text[..text.len() - 1]), "leaf_not_json");
        assert_eq!(code(&format!("{text}{{}}")), "leaf_not_json");
        assert_eq!(
            Leaf::parse(&vec![b' '; MAX_LEAF_BYTES + 1])
                .unwrap_err()
                .code(),
            "leaf_too_large"
        );
    }

    #[test]
    fn invalid_events_are_refused() {
        let text = String::from_utf8(every_event()[2].to_leaf(7, T).unwrap()).unwrap();
        let code = |s: &str| Leaf::parse(s.as_bytes()).unwrap_err().code();
        // An unknown field, placed so the keys stay sorted.
        assert_eq!(
            code(&text.replacen(r#""caller""#, r#""aaa":1,"caller""#, 1)),
            "leaf_invalid"
        );
        assert_eq!(
            code(&text.replacen(r#""event":"unwrap""#, r#""event":"unwrapped""#, 1)),
            "leaf_invalid"
        );
        // Opened with a reason.
        assert_eq!(
            code(&text.replacen(r#""reason":null"#, r#""reason":"open_failed""#, 1)),
            "leaf_invalid"
        );
        // Denied without one.
        let denied = String::from_utf8(every_event()[3].to_leaf(8, T).unwrap()).unwrap();
        assert_eq!(
            code(&denied.replacen(r#""reason":"out_of_window""#, r#""reason":null"#, 1)),
            "leaf_invalid"
        );
        // An unknown reason code.
        assert_eq!(
            code(&denied.replacen("out_of_window", "because", 1)),
            "leaf_invalid"
        );
        // seq as a string, negative, fractional.
        assert_eq!(
            code(&text.replacen(r#""seq":7"#, r#""seq":"7""#, 1)),
            "leaf_invalid"
        );
        assert_eq!(
            code(&text.replacen(r#""seq":7"#, r#""seq":-7"#, 1)),
            "leaf_invalid"
        );
        assert_eq!(
            code(&text.replacen(r#""seq":7"#, r#""seq":7.5"#, 1)),
            "leaf_invalid"
        );
        // A digest of the wrong length.
        assert_eq!(
            code(&text.replacen(r#""warrant_digest":""#, r#""warrant_digest":"AA"#, 1)),
            "leaf_invalid"
        );
        assert_eq!(code("[]"), "leaf_invalid");
    }

    #[test]
    fn only_opened_unwraps_of_the_warrant_are_denied_in_flight() {
        let w = warrant("W-1", false);
        let revoked = DenyReason::WarrantRevoked;
        let denied = opened(AGENCY, &w, 1)
            .denied_if_opened("W-1", revoked)
            .unwrap();
        let Event::Unwrap(u) = &denied else {
            panic!("{denied:?}")
        };
        assert_eq!(u.outcome(), UnwrapOutcome::Denied(revoked));
        assert_eq!(u.kid(), Some("2026-11"));
        // Still a valid leaf, byte for byte what a parse gives back.
        let bytes = denied
            .to_leaf(7, datetime!(2026-12-01 00:00:00 UTC))
            .unwrap();
        assert_eq!(Leaf::parse(&bytes).unwrap().to_bytes().unwrap(), bytes);
        // Another warrant's, an already denied one, another event: untouched.
        assert_eq!(opened(AGENCY, &w, 1).denied_if_opened("W-2", revoked), None);
        assert_eq!(
            super::tests::denied(AGENCY, &w, DenyReason::OutOfWindow)
                .denied_if_opened("W-1", revoked),
            None
        );
        let rev: Event = Revocation::new(AGENCY, "W-1", "r", None).unwrap().into();
        assert_eq!(rev.denied_if_opened("W-1", revoked), None);
    }

    /// Before 2026-12 the edge admitted format characters in ids and
    /// bidirectional controls in reasons, and lavd logged them. Such a
    /// signed log must still parse (and so verify and report), although the
    /// edge now refuses those values.
    #[test]
    fn leaves_an_earlier_lavd_wrote_with_format_characters_still_parse() {
        let plain = Event::from(Revocation::new(AGENCY, "W-1", "case closed", None).unwrap())
            .to_leaf(3, T)
            .unwrap();
        let old = String::from_utf8(plain)
            .unwrap()
            .replace("\"W-1\"", "\"W-1\u{200b}\"")
            .replace("\"case closed\"", "\"\u{200f}case closed\"")
            // An authority's revocation as lavd wrote it then: without
            // `revocation_digest` and `signed_time`, which stays valid.
            .replace(
                "\"authority\":null,\"by\":\"admin\"",
                "\"authority\":\"judge\u{200d}1\",\"by\":\"authority\"",
            );
        let leaf = Leaf::parse(old.as_bytes()).unwrap();
        let Event::Revocation(r) = &leaf.event else {
            panic!("{leaf:?}")
        };
        assert_eq!(r.warrant_id, "W-1\u{200b}");
        assert_eq!(r.reason, "\u{200f}case closed");
        assert_eq!(r.authority.as_deref(), Some("judge\u{200d}1"));
        assert_eq!(leaf.to_bytes().unwrap(), old.as_bytes());
        // The edge refuses them now.
        assert!(crate::bounds::warrant_id(&r.warrant_id).is_err());
        assert!(crate::bounds::reason(&r.reason).is_err());
    }

    #[test]
    fn ids_and_reasons_are_bounded_in_characters_as_the_claims_bound_them() {
        let id = "Ж".repeat(128);
        let reason = "ё".repeat(1024);
        Revocation::new(AGENCY, &id, &reason, None).unwrap();
        WarrantRefused::new(AGENCY, Some(&id), None, "warrant_revoked").unwrap();
        let code = |r: Result<Revocation, LeafError>| r.unwrap_err().code();
        assert_eq!(
            code(Revocation::new(AGENCY, &"Ж".repeat(129), "r", None)),
            "audit_field_invalid"
        );
        assert_eq!(
            code(Revocation::new(AGENCY, "W-1", &"ё".repeat(1025), None)),
            "audit_field_invalid"
        );
    }

    #[test]
    fn constructors_refuse_unsafe_values() {
        let w = warrant("W-1", false);
        let code = |r: Result<Unwrap, LeafError>| r.unwrap_err().code();
        assert_eq!(
            code(Unwrap::new(
                "",
                &w,
                Some("k"),
                None,
                UnwrapOutcome::Denied(DenyReason::UnknownKey)
            )),
            "audit_field_invalid"
        );
        assert_eq!(
            code(Unwrap::new(
                "spiffe://a b",
                &w,
                Some("k"),
                None,
                UnwrapOutcome::Denied(DenyReason::UnknownKey)
            )),
            "audit_field_invalid"
        );
        assert_eq!(
            code(Unwrap::new(
                AGENCY,
                &w,
                Some("k\n"),
                None,
                UnwrapOutcome::Denied(DenyReason::UnknownKey)
            )),
            "audit_field_invalid"
        );
        assert_eq!(
            code(Unwrap::new(AGENCY, &w, None, None, UnwrapOutcome::Opened)),
            "audit_field_invalid"
        );
        let long = "x".repeat(bounds::MAX_IDENTITY_BYTES + 1);
        assert_eq!(
            code(Unwrap::new(
                &long,
                &w,
                None,
                None,
                UnwrapOutcome::Denied(DenyReason::MalformedEnvelope)
            )),
            "audit_field_invalid"
        );
        assert_eq!(
            WarrantRefused::new(AGENCY, None, None, "Not A Code")
                .unwrap_err()
                .code(),
            "audit_field_invalid"
        );
        assert_eq!(
            Revocation::new(AGENCY, "W-1", "", None).unwrap_err().code(),
            "audit_field_invalid"
        );
        assert_eq!(
            KeyGenerated::new("k", T, T, T, None).unwrap_err().code(),
            "audit_field_invalid"
        );
        let dup = vec![
            AuthoritySummary {
                kid: "a".into(),
                role: "judicial".into(),
                alg: "ES256".into(),
                holder: None,
            },
            AuthoritySummary {
                kid: "a".into(),
                role: "executive".into(),
                alg: "ES256".into(),
                holder: None,
            },
        ];
        let policy = PolicySummary {
            require: BTreeMap::from([("judicial".into(), 1)]),
            emergency: None,
        };
        assert_eq!(
            AuthoritiesLoaded::new(Digest::of_trust_config(b""), dup, policy)
                .unwrap_err()
                .code(),
            "audit_field_invalid"
        );
    }

    /// An authority's `holder` is written only when configured (a leaf of a
    /// configuration without holders reads as before), read back, and
    /// bounded as a kid is.
    #[test]
    fn an_authoritys_holder_is_written_only_when_configured() {
        let summary = |kid: &str, holder: Option<&str>| AuthoritySummary {
            kid: kid.into(),
            role: "judicial".into(),
            alg: "ES256".into(),
            holder: holder.map(str::to_string),
        };
        let policy = || PolicySummary {
            require: BTreeMap::from([("judicial".into(), 1)]),
            emergency: None,
        };
        let leaf = |authorities| {
            AuthoritiesLoaded::new(Digest::of_trust_config(b""), authorities, policy())
        };
        let written = leaf(vec![summary("j-1", Some("judge-a")), summary("j-2", None)]).unwrap();
        let json = serde_json::to_value(&written).unwrap();
        assert_eq!(json["authorities"][0]["holder"], "judge-a");
        assert!(json["authorities"][1].get("holder").is_none(), "{json}");
        let read: AuthoritiesLoaded = serde_json::from_value(json).unwrap();
        assert_eq!(read, written);
        assert_eq!(
            leaf(vec![summary("j-1", Some("judge a"))])
                .unwrap_err()
                .code(),
            "audit_field_invalid"
        );
    }
}
