//! Warrants (PROTOCOL §4): is this request authorised?
//!
//! A warrant is a JWS in General JSON Serialization (RFC 7515 §7.2.1) with one
//! signature per approving authority (a one-signature warrant may also come
//! flattened, §7.2.2). This module turns those untrusted bytes
//! into a [`VerifiedWarrant`] and nothing else can: [`Verifier::verify`] is its
//! only constructor. On the way it checks, in this order:
//!
//! 1. size and JWS structure ([`jws`]): protected header exactly `alg` + `kid`
//!    (+ optional `typ`); `none`, unknown algorithms, `crit` and unprotected
//!    headers refused;
//! 2. every signature, against the configured authorities ([`trust`]): a known
//!    `kid`, valid at `now`, with its configured algorithm; one bad signature
//!    refuses the whole warrant;
//! 3. the claims ([`claims`]), strictly typed and bounded;
//! 4. the policy: enough *distinct* authorities per role (the emergency rule
//!    for `"emergency": true`, which is then usable for at most `max_hours`);
//! 5. the time (`[not_before, expires)`) and the agency (the caller's identity).
//!
//! What needs durable state is done by [`admit`] against a
//! [`crate::store::WarrantStore`]: revocation, and the first-seen payload
//! digest of each `id` (a different warrant with a known `id` is refused,
//! except a fully signed replacement of an urgent one). Per-envelope scope
//! (`kids`, `targets`, `window`) is [`VerifiedWarrant::check_envelope`].
//!
//! Trust: only the configured authority keys and policy ([`TrustStore`]) and
//! the caller's identity as established by mutual TLS. The warrant bytes are
//! attacker-controlled until verified.

pub mod cache;
pub mod claims;
pub mod jws;
pub mod scope;
pub mod sign;
pub mod trust;
pub mod verify;

pub use claims::{Claims, Window};
pub use jws::Algorithm;
pub use scope::Denial;
pub use sign::{AuthorityKey, SignError};
pub use trust::{Authority, Policy, RoleRule, TrustConfig, TrustConfigError, TrustStore};
pub use verify::{
    RevocationClaims, Signer, VerifiedRevocation, VerifiedWarrant, Verifier, WarrantLimits,
};

use time::OffsetDateTime;

use crate::codec::format_time;
use crate::store::{Registration, StoreError, WarrantRecord, WarrantStore};

/// How the API should answer a [`WarrantError`]; the API module maps these to
/// HTTP statuses (400, 413, 403, 503) in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The bytes are not a warrant this protocol accepts (HTTP 400).
    Malformed,
    /// A configured size bound was exceeded (HTTP 413).
    TooLarge,
    /// A well-formed warrant that does not authorise this request (HTTP 403).
    Forbidden,
    /// The store could not answer (HTTP 503): not the request's fault.
    Unavailable,
}

/// Why a warrant was refused. Every variant has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
pub enum WarrantError {
    /// Not a JWS in (General or flattened) JSON Serialization, bad base64url, an unknown or
    /// duplicate member, a claim out of its bounds. A buggy client, or probing.
    #[error("malformed warrant: {0}")]
    Malformed(String),
    /// The warrant exceeds a configured bound (bytes or number of signatures).
    /// A misconfigured client, or an attempt to exhaust CPU on verification.
    #[error("warrant too large: {what} is {found}, the limit is {limit}")]
    TooLarge {
        /// What was counted: `bytes` or `signatures`.
        what: &'static str,
        /// The count found.
        found: usize,
        /// The configured bound.
        limit: usize,
    },
    /// `alg` is `none` or not one of `ES256`, `EdDSA`. An old or foreign JOSE
    /// library, or an algorithm-confusion attempt.
    #[error("unsupported JWS algorithm `{0}` (only ES256 and EdDSA)")]
    UnsupportedAlgorithm(String),
    /// A protected header carries `crit`: extensions are not supported, and
    /// RFC 7515 §4.1.11 requires refusing what is not understood.
    #[error("JWS `crit` header parameter is not supported")]
    CritNotSupported,
    /// A signature carries an unprotected `header` member, whose contents no
    /// signature covers.
    #[error("unprotected JWS header (`header` member) is not accepted; put `alg` and `kid` in `protected`")]
    UnprotectedHeader,
    /// `kid` names no configured authority: an authority not (yet) configured
    /// here, a typo, or a forged signer.
    #[error("signature by `{0}`, which is not a configured authority")]
    UnknownAuthority(String),
    /// The header's `alg` is not the algorithm configured for that authority
    /// (RFC 8725 §3.1: one key, one algorithm). A mis-issued key, or confusion.
    #[error("authority `{kid}` is configured for {configured}, but the signature says {header}")]
    AlgorithmMismatch {
        /// The authority.
        kid: String,
        /// Its configured algorithm.
        configured: Algorithm,
        /// The header's algorithm.
        header: Algorithm,
    },
    /// A signature does not verify: the payload or header changed after
    /// signing, the wrong key, or a forgery.
    #[error("the signature by `{0}` does not verify")]
    BadSignature(String),
    /// The authority exists but `now` is outside its `[valid_from, valid_until)`:
    /// a retired or not yet active authority key.
    #[error("authority `{kid}` is valid only in [{valid_from}, {valid_until})")]
    AuthorityNotValid {
        /// The authority.
        kid: String,
        /// Start of its validity (RFC 3339).
        valid_from: String,
        /// End of its validity (RFC 3339).
        valid_until: String,
    },
    /// Not enough distinct authorities of some role signed. The message lists
    /// every shortfall, e.g. `needs 1 judicial (found 0)`.
    #[error("{} policy not met: {}", if *.emergency { "emergency" } else { "warrant" }, describe_shortfalls(.missing))]
    PolicyNotMet {
        /// Whether the emergency rule was the one applied.
        emergency: bool,
        /// Each unmet rule: (role, required, found).
        missing: Vec<(String, usize, usize)>,
    },
    /// A revocation JWS none of whose signers holds a role the policy names
    /// (listed in the message): only the policy's authorities may revoke.
    #[error("a revocation must be signed by an authority of a policy role ({0})")]
    RevokerNotInPolicy(String),
    /// `now` is before the warrant's `not_before`.
    #[error("warrant is not valid before {0}")]
    NotYetValid(String),
    /// `now` is at or after the warrant's `expires`.
    #[error("warrant expired at {0}")]
    Expired(String),
    /// `"emergency": true` but the policy has no emergency rule.
    #[error("emergency warrants are not allowed by this policy")]
    EmergencyNotAllowed,
    /// An urgent warrant used after its `max_hours` from `not_before`: it must
    /// be replaced by a fully signed warrant with the same `id`.
    #[error(
        "emergency warrant was usable until {0}; a fully signed warrant with the same id is needed"
    )]
    EmergencyExpired(String),
    /// The warrant names another agency than the caller's TLS identity: a
    /// warrant passed to the wrong agency, or a stolen one.
    #[error("warrant is for agency `{warrant}`, the caller is `{caller}`")]
    AgencyMismatch {
        /// The warrant's `agency` claim.
        warrant: String,
        /// The caller's identity.
        caller: String,
    },
    /// The warrant `id` was revoked (durable and final).
    #[error("warrant `{id}` was revoked at {at}")]
    Revoked {
        /// The warrant id.
        id: String,
        /// When (RFC 3339).
        at: String,
    },
    /// A different warrant with this `id` was seen before. Ids are unique;
    /// re-issuing under the same id would let a new payload inherit or reset a
    /// budget.
    #[error("a different warrant with id `{0}` was seen before")]
    IdConflict(String),
    /// An urgent warrant whose `id` already has a fully signed version: the
    /// full warrant replaced it, and the urgent one is no longer usable.
    #[error("urgent warrant `{0}` was replaced by its fully signed version")]
    EmergencySuperseded(String),
    /// The store could not record or read warrant state (I/O, disk full).
    #[error("warrant store unavailable: {0}")]
    Store(#[source] StoreError),
}

fn describe_shortfalls(missing: &[(String, usize, usize)]) -> String {
    missing
        .iter()
        .map(|(role, required, found)| format!("needs {required} {role} (found {found})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl WarrantError {
    /// The stable snake_case code used on the wire and in the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_warrant",
            Self::TooLarge { .. } => "warrant_too_large",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::CritNotSupported => "crit_not_supported",
            Self::UnprotectedHeader => "unprotected_header",
            Self::UnknownAuthority(_) => "unknown_authority",
            Self::AlgorithmMismatch { .. } => "algorithm_mismatch",
            Self::BadSignature(_) => "bad_signature",
            Self::AuthorityNotValid { .. } => "authority_not_valid",
            Self::PolicyNotMet { .. } | Self::RevokerNotInPolicy(_) => "policy_not_met",
            Self::NotYetValid(_) => "warrant_not_yet_valid",
            Self::Expired(_) => "warrant_expired",
            Self::EmergencyNotAllowed => "emergency_not_allowed",
            Self::EmergencyExpired(_) => "emergency_expired",
            Self::AgencyMismatch { .. } => "agency_mismatch",
            Self::Revoked { .. } => "warrant_revoked",
            Self::IdConflict(_) => "warrant_id_conflict",
            Self::EmergencySuperseded(_) => "emergency_superseded",
            Self::Store(_) => "store_unavailable",
        }
    }

    /// How the API should answer. Structural refusals (including `crit`,
    /// unprotected headers and unknown algorithms, which are about the format
    /// rather than about authority) are [`ErrorClass::Malformed`].
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Malformed(_)
            | Self::UnsupportedAlgorithm(_)
            | Self::CritNotSupported
            | Self::UnprotectedHeader => ErrorClass::Malformed,
            Self::TooLarge { .. } => ErrorClass::TooLarge,
            Self::Store(_) => ErrorClass::Unavailable,
            _ => ErrorClass::Forbidden,
        }
    }

    /// True when the warrant is structurally unacceptable (HTTP 400).
    pub fn is_malformed(&self) -> bool {
        self.class() == ErrorClass::Malformed
    }
}

/// Checks the durable state of a verified warrant and records it: refuses a
/// revoked `id`, records the payload digest the first time an `id` is seen,
/// refuses a different warrant with a known `id`, and lets a fully signed
/// warrant replace an urgent one with the same `id` and claims (keeping its
/// budget). Call it after [`Verifier::verify`] and before reserving budget.
///
/// # Errors
/// [`WarrantError::Revoked`], [`WarrantError::IdConflict`],
/// [`WarrantError::EmergencySuperseded`], or [`WarrantError::Store`].
///
/// # Security
/// Revocation is checked again by [`WarrantStore::reserve`] and, the check
/// that decides, inside the audit transaction that settles the unwrap's
/// budget and writes its leaves ([`crate::store::Spend::Settle`]); this
/// early check only avoids needless work.
pub fn admit(
    store: &dyn WarrantStore,
    warrant: &VerifiedWarrant,
    now: OffsetDateTime,
) -> Result<Registration, WarrantError> {
    if let Some(rev) = store
        .revocation(warrant.id())
        .map_err(WarrantError::Store)?
    {
        return Err(WarrantError::Revoked {
            id: rev.id,
            at: format_time(rev.revoked_at),
        });
    }
    let mut record = WarrantRecord {
        id: warrant.id().to_string(),
        payload_digest: *warrant.digest(),
        normalized_digest: *warrant.normalized_digest(),
        emergency: warrant.is_emergency(),
        max_unwraps: warrant.claims().max_unwraps,
        seen_at: now,
    };
    let mut registered = store.register(&record);
    // An urgent warrant registered before 2026-12-06 is stored with the
    // normalized digest of its times as spelled: a replacement that
    // matched it then matches it still (the row exists by now, so this
    // second look only compares).
    if let (Err(StoreError::WarrantIdConflict(_)), Some(legacy)) =
        (&registered, warrant.legacy_normalized_digest())
    {
        record.normalized_digest = *legacy;
        registered = store.register(&record);
    }
    registered.map_err(|e| match e {
        StoreError::WarrantIdConflict(id) => WarrantError::IdConflict(id),
        StoreError::EmergencySuperseded(id) => WarrantError::EmergencySuperseded(id),
        other => WarrantError::Store(other),
    })
}
