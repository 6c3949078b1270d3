//! Unwrap replies (PROTOCOL §5): the DEKs the daemon opened for one request,
//! sealed to the warrant's `recipient` key so that only the agency holding
//! that key can read them, even if TLS were terminated early.
//!
//! One HPKE base-mode context (suite 16-1-2, `info = "lav-result-v1"`) per
//! reply, one `enc` per reply: the i-th `ok` result is the i-th `Seal` of the
//! context with `aad` = the header bytes of the envelope it answers. The
//! `aad` binds each DEK to its envelope's header; the sequence number binds
//! it to its position among the `ok` results, so reordering, dropping an
//! earlier `ok` result or moving one onto an envelope with another header
//! fails to open. Two envelopes of one request whose headers are the same
//! bytes (same kid, provider, target and second, no `ref`) cannot be told
//! apart this way: an `ok` result moved onto the other, with the `denied`
//! it swapped places with, still opens, as that one's DEK. Only TLS stands
//! against that edit; PROTOCOL v1's `aad` is the header alone (binding
//! `enc` too, or `envelope_digest`, would close it in a later version).
//!
//! [`ReplyBuilder`] is the daemon side, [`open_reply`] the agency side.
//!
//! # Security
//! `denied` results and the `audit` member are not covered by the HPKE
//! context: their integrity comes from TLS (and the audit checkpoint from its
//! own signature).

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::hpke::{self, Aead, ContextS};
use super::{present_string, EnvelopeLimits, Header, DEK_MAX_LEN, DEK_MIN_LEN};
use crate::codec::{b64_decode, b64_encode};
use crate::jwk::{P256PrivateKey, P256PublicKey};

/// HPKE `info` of every reply context.
pub const REPLY_INFO: &[u8] = b"lav-result-v1";

/// Why the daemon did not open an envelope: exactly the PROTOCOL §5 reasons,
/// `warrant_revoked` (PROTOCOL §8), and, in audit leaves only, lavd's
/// `warrant_expired`, `emergency_expired` and `authority_not_valid` (a
/// deadline passed in flight; docs/warrants.md), `audit_commit_failed`
/// (opened, but the audit commit failed, so not released) and
/// `open_interrupted` (the process stopped while the envelope was being
/// opened, before its audit commit; nothing released).
/// Serialized as the wire string (`out_of_window`), in replies and audit leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The envelope could not be parsed.
    MalformedEnvelope,
    /// No escrow key has the envelope's `kid`.
    UnknownKey,
    /// The escrow key is past `destroy_after` and gone from the HSM.
    KeyDestroyed,
    /// The warrant's `kids` does not include the envelope's `kid`.
    KeyNotAllowed,
    /// The envelope's `target` is not in the warrant's `targets`.
    TargetNotInWarrant,
    /// The envelope's `time` is outside the warrant's `window`.
    OutOfWindow,
    /// HPKE opening failed: tampered, or sealed to another key.
    OpenFailed,
    /// The warrant's `max_unwraps` is used up.
    BudgetExhausted,
    /// The warrant was revoked while the request was in flight: the
    /// revocation's leaf committed before this request's leaves, so nothing
    /// of it is released (PROTOCOL §8). Requests that arrive after the
    /// revocation are refused whole with 403 `warrant_revoked` instead.
    WarrantRevoked,
    /// In audit leaves only: the warrant's `expires` passed while the
    /// request was in flight, after it was admitted and before its audit
    /// commit. Nothing of it is released; the request is refused whole
    /// (403 `warrant_expired`, as one that arrives later), so no reply
    /// carries this reason.
    WarrantExpired,
    /// As [`Self::WarrantExpired`], for the end of an urgent warrant's
    /// hours (403 `emergency_expired`).
    EmergencyExpired,
    /// As [`Self::WarrantExpired`], for the end of a signing authority's
    /// validity (`valid_until`; 403 `authority_not_valid`).
    AuthorityNotValid,
    /// In audit leaves only: the HSM opened the envelope, but the request's
    /// audit commit failed (503 `store_unavailable`), so nothing of it was
    /// released. The daemon writes these leaves once the store takes them
    /// again, so that no HSM open goes unlogged.
    AuditCommitFailed,
    /// In audit leaves only: the envelope's HSM open was under way when the
    /// process stopped (a crash, SIGKILL, power loss), before its request's
    /// audit commit, so nothing of it was released or spent. Its intent,
    /// written durably with the budget reservation before the HSM was
    /// called, is turned into this leaf by the next daemon that finds it
    /// (at start on SQLite; on PostgreSQL once the reservation's lease has
    /// run out, by any replica), so that no HSM open goes unlogged, even
    /// across a crash. The HSM may not have finished the open.
    OpenInterrupted,
    /// In audit leaves only: a reload applied while the request was in
    /// flight, after its work started and before its audit commit (new
    /// authorities or policy, roles, client CAs or CRLs), and the request
    /// no longer passes under it: the caller's certificate or role is gone,
    /// or the warrant no longer verifies. Nothing of it is released or
    /// spent; the request is refused whole with the new configuration's
    /// answer (403 `forbidden`, the warrant's code, or the connection
    /// closed for a certificate no longer accepted).
    ConfigurationChanged,
}

impl DenyReason {
    /// Every reason, in PROTOCOL order, then lavd's additions.
    pub const ALL: [Self; 15] = [
        Self::MalformedEnvelope,
        Self::UnknownKey,
        Self::KeyDestroyed,
        Self::KeyNotAllowed,
        Self::TargetNotInWarrant,
        Self::OutOfWindow,
        Self::OpenFailed,
        Self::BudgetExhausted,
        Self::WarrantRevoked,
        Self::WarrantExpired,
        Self::EmergencyExpired,
        Self::AuthorityNotValid,
        Self::AuditCommitFailed,
        Self::OpenInterrupted,
        Self::ConfigurationChanged,
    ];

    /// The wire string.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MalformedEnvelope => "malformed_envelope",
            Self::UnknownKey => "unknown_key",
            Self::KeyDestroyed => "key_destroyed",
            Self::KeyNotAllowed => "key_not_allowed",
            Self::TargetNotInWarrant => "target_not_in_warrant",
            Self::OutOfWindow => "out_of_window",
            Self::OpenFailed => "open_failed",
            Self::BudgetExhausted => "budget_exhausted",
            Self::WarrantRevoked => "warrant_revoked",
            Self::WarrantExpired => "warrant_expired",
            Self::EmergencyExpired => "emergency_expired",
            Self::AuthorityNotValid => "authority_not_valid",
            Self::AuditCommitFailed => "audit_commit_failed",
            Self::OpenInterrupted => "open_interrupted",
            Self::ConfigurationChanged => "configuration_changed",
        }
    }

    /// Whether a reply may carry it: not the reasons of audit leaves only
    /// (`warrant_expired`, `emergency_expired`, `authority_not_valid`,
    /// `audit_commit_failed`, `configuration_changed`, which come with a
    /// request refused whole, and `open_interrupted`, written after the
    /// process that opened stopped).
    pub const fn in_replies(self) -> bool {
        !matches!(
            self,
            Self::WarrantExpired
                | Self::EmergencyExpired
                | Self::AuthorityNotValid
                | Self::AuditCommitFailed
                | Self::OpenInterrupted
                | Self::ConfigurationChanged
        )
    }

    /// The reason for a wire string (or an [`super::EnvelopeError::code`]),
    /// if it is one of PROTOCOL's.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == code)
    }
}

/// The reply's `audit` member: where the request's leaves are in the log,
/// and a signed checkpoint that includes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRef {
    /// The C2SP signed-note checkpoint text.
    pub checkpoint: String,
    /// Index of the request's first leaf.
    pub first_index: u64,
    /// Number of leaves the request added (one per envelope).
    pub count: u64,
}

/// A reply that could not be built or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    /// The reply is not JSON of the PROTOCOL §5 shape (unknown or duplicate
    /// members, wrong types, trailing data), or a result is inconsistent
    /// (`ok` without `ct`, `denied` with one, unknown status or reason, bad
    /// base64url, `enc` not a P-256 point).
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// `sealed_to.kid` is not the RFC 7638 thumbprint of the recipient key
    /// given: the wrong key file, or the warrant names another recipient.
    #[error(
        "the reply is sealed to key {found}, but this recipient key's RFC 7638 thumbprint is {expected}: wrong recipient key, or the warrant names another one"
    )]
    RecipientMismatch {
        /// The thumbprint of the key we hold.
        expected: String,
        /// The reply's `sealed_to.kid`.
        found: String,
    },
    /// The reply has a different number of results than the request had
    /// envelopes: the wrong request file, or a truncated reply.
    #[error("the reply has {found} results but the request had {expected} envelopes")]
    CountMismatch {
        /// Envelopes in the request.
        expected: usize,
        /// Results in the reply.
        found: usize,
    },
    /// The `ok` result at this index does not open: results reordered, moved
    /// or modified, the wrong request file, or the wrong key.
    #[error("result {index} does not open (reordered, modified, or the wrong request/key)")]
    OpenFailed {
        /// Position of the result in `results`.
        index: usize,
    },
    /// A DEK outside 16..=64 bytes: given to the builder, or opened from a
    /// reply (a buggy daemon).
    #[error("result {index} holds a DEK of {len} bytes; expected 16..=64")]
    InvalidDek {
        /// Position of the result in `results`.
        index: usize,
        /// The DEK's length.
        len: usize,
    },
    /// Software ECDH, the RNG or the AEAD failed. Should never happen.
    #[error("the crypto library failed")]
    Crypto,
}

impl ReplyError {
    /// The stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_reply",
            Self::RecipientMismatch { .. } => "recipient_mismatch",
            Self::CountMismatch { .. } => "result_count_mismatch",
            Self::OpenFailed { .. } => "open_failed",
            Self::InvalidDek { .. } => "invalid_dek",
            Self::Crypto => "crypto_failure",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedTo {
    kid: String,
    enc: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultJson {
    status: String,
    #[serde(
        default,
        deserialize_with = "present_string",
        skip_serializing_if = "Option::is_none"
    )]
    ct: Option<String>,
    #[serde(
        default,
        deserialize_with = "present_string",
        skip_serializing_if = "Option::is_none"
    )]
    reason: Option<String>,
}

/// The reply as it is on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyJson {
    #[serde(deserialize_with = "crate::codec::object")]
    sealed_to: SealedTo,
    #[serde(deserialize_with = "crate::codec::objects")]
    results: Vec<ResultJson>,
    #[serde(deserialize_with = "crate::codec::object")]
    audit: AuditRef,
}

/// A sealed reply, ready to send; only [`ReplyBuilder`] makes one.
/// Serializes to the PROTOCOL §5 JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Reply(ReplyJson);

impl Reply {
    /// The reply JSON.
    pub fn to_json(&self) -> String {
        // Invariant: every member is a string, an integer or a struct of
        // them; serde_json cannot fail on such a value.
        #[allow(clippy::expect_used)]
        serde_json::to_string(self).expect("serializing strings and integers cannot fail")
    }

    /// The number of results.
    pub fn len(&self) -> usize {
        self.0.results.len()
    }

    /// Whether there are no results.
    pub fn is_empty(&self) -> bool {
        self.0.results.is_empty()
    }
}

/// Builds one reply (the daemon's side): call [`ReplyBuilder::push_opened`]
/// or [`ReplyBuilder::push_denied`] once per request envelope, in request
/// order, then [`ReplyBuilder::finish`].
#[derive(Debug)]
pub struct ReplyBuilder {
    ctx: ContextS,
    sealed_to: SealedTo,
    results: Vec<ResultJson>,
}

impl ReplyBuilder {
    /// Starts a reply sealed to the warrant's `recipient`: one key agreement
    /// for the whole batch.
    ///
    /// # Errors
    /// [`ReplyError::Crypto`] if the RNG or ECDH fails.
    pub fn new(recipient: &P256PublicKey) -> Result<Self, ReplyError> {
        let (enc, ctx) = hpke::setup_base_s(recipient, REPLY_INFO, Aead::Aes256Gcm)
            .map_err(|_| ReplyError::Crypto)?;
        Ok(Self {
            ctx,
            sealed_to: SealedTo {
                kid: recipient.thumbprint(),
                enc: b64_encode(enc.sec1()),
            },
            results: Vec::new(),
        })
    }

    /// Appends an `ok` result: the next `Seal` of the context, with `aad` =
    /// the envelope's header bytes exactly as received.
    ///
    /// # Errors
    /// [`ReplyError::InvalidDek`] for a DEK outside 16..=64 bytes (nothing
    /// is appended); [`ReplyError::Crypto`] if the AEAD fails.
    pub fn push_opened(&mut self, header_bytes: &[u8], dek: &[u8]) -> Result<(), ReplyError> {
        if !(DEK_MIN_LEN..=DEK_MAX_LEN).contains(&dek.len()) {
            return Err(ReplyError::InvalidDek {
                index: self.results.len(),
                len: dek.len(),
            });
        }
        let ct = self
            .ctx
            .seal(header_bytes, dek)
            .map_err(|_| ReplyError::Crypto)?;
        self.results.push(ResultJson {
            status: "ok".into(),
            ct: Some(b64_encode(ct)),
            reason: None,
        });
        Ok(())
    }

    /// Appends a `denied` result; it does not advance the context.
    pub fn push_denied(&mut self, reason: DenyReason) {
        self.results.push(ResultJson {
            status: "denied".into(),
            ct: None,
            reason: Some(reason.as_str().into()),
        });
    }

    /// The finished reply with the caller's `audit` member.
    pub fn finish(self, audit: AuditRef) -> Reply {
        Reply(ReplyJson {
            sealed_to: self.sealed_to,
            results: self.results,
            audit,
        })
    }
}

/// One opened result (the agency's side).
#[derive(Debug)]
pub struct OpenedResult {
    /// Position in the request's `envelopes`.
    pub index: usize,
    /// The envelope header's `ref`, when the request's header parses.
    pub reference: Option<String>,
    /// The DEK, or why the daemon refused.
    pub outcome: Outcome,
}

/// What the daemon did with one envelope.
pub enum Outcome {
    /// Opened: the DEK (zeroized on drop, never printed by `Debug`).
    Ok(Zeroizing<Vec<u8>>),
    /// Refused, with the PROTOCOL reason.
    Denied(DenyReason),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ok(_) => f.write_str("Ok(<redacted DEK>)"),
            Self::Denied(r) => f.debug_tuple("Denied").field(r).finish(),
        }
    }
}

/// An opened reply.
#[derive(Debug)]
pub struct OpenedReply {
    /// One entry per request envelope, in request order.
    pub results: Vec<OpenedResult>,
    /// The reply's audit member, as received (not verified here).
    pub audit: AuditRef,
}

/// Opens a reply with the agency's recipient key. `request_headers` are the
/// header bytes of the request's envelopes, in request order (an empty vector
/// for an envelope whose header could not be decoded; the daemon denies
/// those).
///
/// # Errors
/// [`ReplyError::RecipientMismatch`] when `sealed_to.kid` is not this key's
/// thumbprint; [`ReplyError::CountMismatch`] when the reply does not answer
/// every envelope; [`ReplyError::OpenFailed`] naming the first `ok` result
/// that does not authenticate; [`ReplyError::Malformed`] for anything else
/// out of shape. No DEK is returned unless every `ok` result opens.
pub fn open_reply(
    recipient: &P256PrivateKey,
    request_headers: &[Vec<u8>],
    reply_json: &[u8],
) -> Result<OpenedReply, ReplyError> {
    let reply: ReplyJson = crate::codec::from_object_slice(reply_json)
        .map_err(|e| ReplyError::Malformed(e.to_string()))?;
    let expected = recipient.public().thumbprint();
    if reply.sealed_to.kid != expected {
        return Err(ReplyError::RecipientMismatch {
            expected,
            // From the reply file: escaped, as it ends up on a terminal.
            found: crate::codec::escape_for_terminal(&reply.sealed_to.kid),
        });
    }
    if reply.results.len() != request_headers.len() {
        return Err(ReplyError::CountMismatch {
            expected: request_headers.len(),
            found: reply.results.len(),
        });
    }
    let enc = b64_decode(&reply.sealed_to.enc)
        .ok()
        .and_then(|bytes| P256PublicKey::from_sec1(&bytes).ok())
        .ok_or_else(|| ReplyError::Malformed("`sealed_to.enc` is not a P-256 point".into()))?;
    let mut ctx = hpke::setup_base_r(&enc, recipient.public(), REPLY_INFO, Aead::Aes256Gcm, |e| {
        hpke::software_dh(recipient, e)
    })
    .map_err(|_| ReplyError::Crypto)?;

    // Only for display: a header the daemon refused may still carry a ref.
    let lenient = EnvelopeLimits {
        max_envelope_bytes: usize::MAX,
        max_header_bytes: usize::MAX,
    };
    let mut results = Vec::with_capacity(reply.results.len());
    for (index, (result, header)) in reply.results.iter().zip(request_headers).enumerate() {
        let bad = |what: &str| ReplyError::Malformed(format!("result {index}: {what}"));
        let outcome = match (result.status.as_str(), &result.ct, &result.reason) {
            ("ok", Some(ct), None) => {
                let ct = b64_decode(ct).map_err(|_| bad("`ct` is not base64url"))?;
                let dek = ctx
                    .open(header, &ct)
                    .map_err(|_| ReplyError::OpenFailed { index })?;
                if !(DEK_MIN_LEN..=DEK_MAX_LEN).contains(&dek.len()) {
                    return Err(ReplyError::InvalidDek {
                        index,
                        len: dek.len(),
                    });
                }
                Outcome::Ok(dek)
            }
            ("denied", None, Some(reason)) => Outcome::Denied(
                DenyReason::from_code(reason)
                    .filter(|r| r.in_replies())
                    .ok_or_else(|| bad("unknown denial reason"))?,
            ),
            ("ok", _, _) => return Err(bad("`ok` needs `ct` and no `reason`")),
            ("denied", _, _) => return Err(bad("`denied` needs `reason` and no `ct`")),
            _ => return Err(bad("`status` is neither `ok` nor `denied`")),
        };
        let reference = Header::parse(header, &lenient)
            .ok()
            .and_then(|h| h.reference().map(str::to_owned));
        results.push(OpenedResult {
            index,
            reference,
            outcome,
        });
    }
    Ok(OpenedReply {
        results,
        audit: reply.audit,
    })
}
