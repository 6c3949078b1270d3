//! The unwrap path, in PROTOCOL §5's order of checks: role (checked by the
//! API before this is called) → warrant validity → `agency` equals the caller
//! → per envelope: parse, key known and not destroyed, `kid` allowed,
//! `target` in `targets`, `time` in `window` → budget → HSM open → audit →
//! reply.
//!
//! Audit before release: the opened DEKs exist only in zeroizing buffers
//! until the store has committed, in one transaction, every envelope's leaf
//! and the budget spend; only then are they sealed to the warrant's
//! recipient. If the audit commit fails, the DEKs are dropped and the request
//! fails with 503. That transaction also looks at revocation once more: a
//! revocation that committed while the request was in flight turns every
//! would-be `opened` envelope into `warrant_revoked` (PROTOCOL §8), and its
//! DEKs are dropped. Every leaf is built before the budget is reserved and
//! before the HSM is called, so nothing after the HSM can fail on input. A
//! refused warrant is itself logged (durably) before the refusal is
//! returned.
//!
//! Everything here is synchronous and blocking (HSM and SQLite): the API
//! calls it on the blocking pool. A batch's HSM opens run concurrently on
//! the HSM's worker threads, one per session, shared fairly with other
//! requests ([`Hsm::spread`]); the replies keep request order.

pub mod gate;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::audit::leaf::{
    Digest, Event, Revocation as RevocationEvent, Unwrap, UnwrapOutcome, WarrantRef, WarrantRefused,
};
use crate::audit::log::{AuditLog, LogError, Receipt};
use crate::audit::witnessing::{WaitError, Witnessing};
use crate::envelope::reply::{AuditRef, DenyReason, ReplyBuilder};
use crate::envelope::{open_envelope, Envelope, EnvelopeError, EnvelopeLimits};
use crate::hsm::{Hsm, HsmError, JobOutcome};
use crate::jwk::P256PublicKey;
use crate::store::{AuditAppend, KeyStore, Revocation, Spend, Store, StoreError, WarrantStore};
use crate::warrant::{admit, Verifier, WarrantError};

/// What an unwrap needs.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The HSM holding the escrow keys.
    pub hsm: &'a Hsm,
    /// Key metadata, budgets, revocations.
    pub store: &'a Store,
    /// The audit log (the same store, plus checkpoint signing).
    pub log: &'a AuditLog,
    /// The trust store and policy in force when the request was admitted.
    pub verifier: &'a Verifier,
    /// Called once the request has its turn at the gate, when its work
    /// starts: `Ok(None)` if the configuration it was admitted under is
    /// still in force, `Ok(Some(newer))` with the trust of a configuration
    /// reloaded meanwhile that admitted the caller again, or
    /// [`UnwrapError::Withdrawn`] if that one does not admit it. `None`:
    /// no reload applies (a library caller).
    pub readmit: Option<Readmit<'a>>,
    /// The same question once more, just before the audit commit, for a
    /// reload that applied while the request's HSM opens ran; see
    /// [`Recheck`]. `None`: no reload applies (a library caller).
    pub recheck: Option<Recheck<'a>>,
    /// Envelope size limits.
    pub envelope_limits: &'a EnvelopeLimits,
    /// Most envelopes in one request.
    pub max_batch: usize,
    /// Bounds the envelopes all requests work on at once.
    pub gate: &'a gate::EnvelopeGate,
    /// The witnesses, when configured: the reply carries a checkpoint their
    /// quorum cosigned when there is one, and under
    /// `release_after_witness` nothing is released without it.
    pub witnessing: Option<&'a Witnessing>,
}

/// See [`Context::readmit`].
#[derive(Clone, Copy)]
pub struct Readmit<'a>(pub &'a (dyn Fn() -> Result<Option<Arc<Verifier>>, UnwrapError> + Sync));

/// A request's last look at the configuration, before its audit commit.
///
/// `readmit` answers as [`Context::readmit`] does. With a newer
/// configuration the warrant is verified again under its trust, at the
/// time of the look; a request that no longer passes is refused whole, its
/// leaves denied (the HSM did open). `fence` is held (shared) from that
/// look to the end of the commit, and by a reload that changes authorities
/// or policy (exclusive) from before its `authorities_loaded` leaf to the
/// swap of the configuration: so no
/// `opened` leaf judged under one trust commits after the leaf that says
/// another applies.
#[derive(Clone, Copy)]
pub struct Recheck<'a> {
    /// As [`Context::readmit`].
    pub readmit: Readmit<'a>,
    /// The reload's fence.
    pub fence: &'a std::sync::RwLock<()>,
}

impl std::fmt::Debug for Recheck<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recheck(..)")
    }
}

impl std::fmt::Debug for Readmit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readmit(..)")
    }
}

/// A whole-request failure. The API maps each to its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum UnwrapError {
    /// The body is not `{"warrant": …, "envelopes": […]}` (unknown or
    /// duplicate members, trailing data, wrong types) (HTTP 400).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// More envelopes than the configured batch limit (HTTP 413
    /// `batch_too_large`). None is [`UnwrapError::Malformed`].
    #[error("a request carries 1 to {max} envelopes, this one has {got}")]
    BatchSize {
        /// The limit.
        max: usize,
        /// What was sent.
        got: usize,
    },
    /// The warrant was refused (400/403/413 by its class; logged).
    #[error(transparent)]
    Warrant(#[from] WarrantError),
    /// The HSM failed, or did not answer within the call deadline; nothing
    /// was released (HTTP 503 `hsm_unavailable`).
    #[error("HSM unavailable: {0}")]
    HsmUnavailable(String),
    /// Something that should not fail did (a bug); nothing was released
    /// (HTTP 500 `internal_error`).
    #[error("internal error: {0}")]
    Internal(String),
    /// The store failed or could not be reached (a PostgreSQL server down,
    /// a pool wait or statement timeout, a commit that failed); nothing was
    /// released (HTTP 503 `store_unavailable`).
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// A configuration reloaded while the request waited for its turn no
    /// longer admits the caller (its certificate or role); nothing was
    /// done or logged (the API answers as for a refused admission, whose
    /// stable code `code` is).
    #[error("not admitted under the reloaded configuration: {why}")]
    Withdrawn {
        /// The refused admission's stable code.
        code: &'static str,
        /// What the admission said.
        why: String,
    },
    /// The audit log found that its stored tree does not extend its last
    /// signed checkpoint; nothing was released (HTTP 503
    /// `log_inconsistent`).
    #[error("audit log inconsistent: {0}")]
    LogInconsistent(String),
    /// `release_after_witness`: no checkpoint covering the request's leaves
    /// was cosigned by the witness quorum in time. The leaves are logged
    /// and the budget spent; the DEKs were dropped, nothing was released
    /// (HTTP 503 `witness_unavailable`).
    #[error("{0}")]
    WitnessUnavailable(WaitError),
    /// The request's leaves and a spend of at least one envelope
    /// committed, or may have (a COMMIT whose answer was lost, on
    /// PostgreSQL), but nothing was released: the checkpoint over them
    /// could not be signed (HSM) or saved (store), or the commit's outcome
    /// could not be learned. A retry would spend the budget again, so the
    /// client is told apart from `hsm_unavailable` and `store_unavailable`,
    /// after which nothing was spent (HTTP 503 `spent_not_released`).
    #[error("{0}")]
    SpentNotReleased(String),
}

impl UnwrapError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            UnwrapError::Malformed(_) => "malformed_request",
            UnwrapError::BatchSize { .. } => "batch_too_large",
            UnwrapError::Warrant(w) => w.code(),
            UnwrapError::HsmUnavailable(_) => "hsm_unavailable",
            UnwrapError::StoreUnavailable(_) => "store_unavailable",
            UnwrapError::Internal(_) => "internal_error",
            UnwrapError::WitnessUnavailable(_) => "witness_unavailable",
            UnwrapError::Withdrawn { code, .. } => code,
            UnwrapError::LogInconsistent(_) => "log_inconsistent",
            UnwrapError::SpentNotReleased(_) => "spent_not_released",
        }
    }
}

impl From<StoreError> for UnwrapError {
    fn from(e: StoreError) -> Self {
        UnwrapError::StoreUnavailable(e.to_string())
    }
}

impl From<LogError> for UnwrapError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Store(e) => e.into(),
            LogError::Hsm(_) | LogError::Sign(_) => UnwrapError::HsmUnavailable(e.to_string()),
            LogError::Inconsistent(_) => UnwrapError::LogInconsistent(e.to_string()),
        }
    }
}

impl From<HsmError> for UnwrapError {
    fn from(e: HsmError) -> Self {
        UnwrapError::HsmUnavailable(e.to_string())
    }
}

/// A completed unwrap.
#[derive(Debug)]
pub struct Unwrapped {
    /// The reply body (PROTOCOL §5); carries no plaintext key.
    pub reply: String,
    /// The warrant's `id`, for the request's log span.
    pub warrant_id: String,
    /// How many envelopes were opened.
    pub opened: usize,
    /// Denials by reason code, for metrics.
    pub denied: BTreeMap<&'static str, usize>,
    /// Where the request's leaves are.
    pub receipt: Receipt,
    /// Where its time went.
    pub phases: Phases,
}

/// Where a successful unwrap's time went, phase by phase, in the order they
/// run (`lavd_unwrap_phase_seconds`): what an operator reads to see whether
/// a slow request waited on the HSM, the store or its own work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    /// The request's outer JSON parsed, its turn at the envelope gate
    /// (`max_envelopes_in_flight`) waited for and, after a reload, the
    /// caller admitted again.
    pub gate: std::time::Duration,
    /// The warrant and every envelope parsed and checked, the keys read,
    /// the leaves built: up to the budget.
    pub admit: std::time::Duration,
    /// The budget reserved and the open intent written, one durable commit.
    pub intent: std::time::Duration,
    /// The HSM opens, spread over the session pool, and their outcomes
    /// sorted (on a missing key, a look at the token and the store).
    pub hsm: std::time::Duration,
    /// The audit append (leaves and spend, one durable commit, group commit
    /// included) and the checkpoint signature over it.
    pub audit: std::time::Duration,
    /// The witnesses' cosigned checkpoint (a wait under
    /// `release_after_witness` only).
    pub witness: std::time::Duration,
    /// The opened keys sealed to the recipient and the reply encoded.
    pub reply: std::time::Duration,
}

impl Phases {
    /// Each phase with its label, in order.
    pub fn each(&self) -> [(&'static str, std::time::Duration); 7] {
        [
            ("gate", self.gate),
            ("admit", self.admit),
            ("intent", self.intent),
            ("hsm", self.hsm),
            ("audit", self.audit),
            ("witness", self.witness),
            ("reply", self.reply),
        ]
    }
}

/// Times consecutive phases: each call returns the time since the last.
struct Lap(std::time::Instant);

impl Lap {
    fn next(&mut self) -> std::time::Duration {
        let now = std::time::Instant::now();
        let lap = now - self.0;
        self.0 = now;
        lap
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request<'a> {
    #[serde(borrow)]
    warrant: &'a RawValue,
    /// Read by [`batch`], which keeps at most the batch limit of them.
    #[serde(borrow)]
    envelopes: &'a RawValue,
}

/// The envelopes of a request, each as sent, and how many there are: at
/// most `max` are kept, the rest only counted, so that a body of a million
/// `0`s costs no vector of a million references before it is refused.
///
/// # Errors
/// [`UnwrapError::Malformed`] if `envelopes` is not an array.
fn batch(envelopes: &RawValue, max: usize) -> Result<(Vec<&RawValue>, usize), UnwrapError> {
    struct UpTo(usize);
    impl<'de> serde::de::Visitor<'de> for UpTo {
        type Value = (Vec<&'de RawValue>, usize);

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of envelopes")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut kept = Vec::new();
            let mut count = 0usize;
            loop {
                let more = if kept.len() < self.0 {
                    seq.next_element::<&'de RawValue>()?
                        .map(|e| kept.push(e))
                        .is_some()
                } else {
                    seq.next_element::<serde::de::IgnoredAny>()?.is_some()
                };
                if !more {
                    return Ok((kept, count));
                }
                count += 1;
            }
        }
    }
    use serde::Deserializer as _;
    let mut reader = serde_json::Deserializer::from_str(envelopes.get());
    reader
        .deserialize_seq(UpTo(max))
        .and_then(|read| reader.end().map(|()| read))
        .map_err(|e| {
            // Its line and column count within the member, not the body:
            // left out, as they would mislead.
            let text = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            UnwrapError::Malformed(format!(
                "`envelopes`: {}",
                text.strip_suffix(&at).unwrap_or(&text)
            ))
        })
}

/// Lines saying that the token lacks a key the store lists as live.
static LOST_KEY_LINES: std::sync::LazyLock<crate::api::ratelimit::LineThrottle> =
    std::sync::LazyLock::new(crate::api::ratelimit::LineThrottle::new);

/// Lines saying that a key's store row cannot be read.
static UNREADABLE_KEY_LINES: std::sync::LazyLock<crate::api::ratelimit::LineThrottle> =
    std::sync::LazyLock::new(crate::api::ratelimit::LineThrottle::new);

/// Lines saying that the token holds two private keys under a key's label,
/// or one whose attributes make it unsafe to use.
static AMBIGUOUS_KEY_LINES: std::sync::LazyLock<crate::api::ratelimit::LineThrottle> =
    std::sync::LazyLock::new(crate::api::ratelimit::LineThrottle::new);

/// One envelope's fate before the HSM.
enum Plan {
    Denied {
        reason: DenyReason,
        kid: Option<String>,
        digest: Option<Digest>,
    },
    /// Passed every check before the budget; opens with this escrow public
    /// key (from the store: a wrong one could only make HPKE fail, never
    /// open a key, since the DH runs with the HSM's private key).
    Candidate(Box<Envelope>, P256PublicKey),
}

/// Runs one unwrap request for `caller` (already known to hold the agency
/// role). `clock` is read after the request's turn at the envelope gate:
/// the warrant's validity, the keys' retention and the leaves' time are
/// judged when the work starts, not when the request arrived (a request
/// may wait at the gate behind others for as long as they take). It is
/// read once more just before the audit commit, for the deadlines alone: a
/// warrant or key retention that ended while the HSM opened releases
/// nothing past its end.
///
/// # Errors
/// [`UnwrapError`]; per-envelope refusals are not errors but `denied`
/// results in the reply.
pub fn unwrap(
    ctx: &Context<'_>,
    caller: &str,
    body: &[u8],
    clock: &dyn Fn() -> OffsetDateTime,
) -> Result<Unwrapped, UnwrapError> {
    unwrap_counting(ctx, caller, body, clock, &mut 0)
}

/// [`unwrap`], also saying in `withheld` how many envelopes the HSM
/// opened whose leaves say `opened`, charged to the budget (or perhaps
/// charged, after a COMMIT whose outcome was lost), and whose keys were
/// not released (`lavd_envelopes_unreleased_total`): on an error, all
/// that its failure or refusal after the audit commit withheld; on
/// success, those of keys destroyed between the commit and the release.
///
/// # Errors
/// As [`unwrap`].
pub fn unwrap_counting(
    ctx: &Context<'_>,
    caller: &str,
    body: &[u8],
    clock: &dyn Fn() -> OffsetDateTime,
    withheld: &mut usize,
) -> Result<Unwrapped, UnwrapError> {
    *withheld = 0;
    let mut lap = Lap(std::time::Instant::now());
    let mut phases = Phases::default();
    let request: Request<'_> =
        crate::codec::from_object_slice(body).map_err(|e| UnwrapError::Malformed(e.to_string()))?;
    let (envelopes, got) = batch(request.envelopes, ctx.max_batch)?;
    if got == 0 {
        return Err(UnwrapError::Malformed(format!(
            "a request carries 1 to {} envelopes, this one has none",
            ctx.max_batch
        )));
    }
    if got > ctx.max_batch {
        return Err(UnwrapError::BatchSize {
            max: ctx.max_batch,
            got,
        });
    }
    // Held until the reply is built: the envelopes parsed, their leaves,
    // keys and results are what the gate bounds.
    let _permit = ctx.gate.enter(envelopes.len());
    let newer = match ctx.readmit {
        Some(Readmit(readmit)) => readmit()?,
        None => None,
    };
    let verifier = newer.as_deref().unwrap_or(ctx.verifier);
    phases.gate = lap.next();
    let now = clock();

    // Warrant validity and agency (the verifier checks both), then the
    // store's view: revoked, id conflict, emergency replaced.
    let warrant = match verifier
        .verify(request.warrant.get().as_bytes(), now, caller)
        .map_err(|e| revoked_before_agency(ctx, request.warrant.get().as_bytes(), e))
        .and_then(|w| admit(ctx.store, &w, now).map(|_| w))
    {
        Ok(w) => w,
        Err(e) => {
            refuse(ctx, caller, request.warrant.get().as_bytes(), &e, now)?;
            return Err(e.into());
        }
    };
    let warrant_ref = WarrantRef {
        id: warrant.id(),
        digest: Digest::from_sha256(*warrant.digest()),
        emergency: warrant.is_emergency(),
    };

    // Per envelope, in order: parse, key, scope.
    let mut keys: std::collections::HashMap<String, Option<crate::store::KeyRecord>> =
        std::collections::HashMap::new();
    // Kids whose store row cannot be read (an edited or damaged store).
    let mut unreadable = std::collections::HashSet::new();
    let mut plans = Vec::with_capacity(envelopes.len());
    for (index, raw) in envelopes.iter().enumerate() {
        let envelope = match Envelope::parse(raw.get().as_bytes(), ctx.envelope_limits) {
            Ok(e) => e,
            Err(e) => {
                // The reply can say only `malformed_envelope`: what was
                // wrong goes to the log, for whoever debugs the provider.
                tracing::info!(index, code = e.code(), error = %e, "envelope denied as malformed");
                plans.push(Plan::Denied {
                    reason: DenyReason::MalformedEnvelope,
                    kid: None,
                    digest: None,
                });
                continue;
            }
        };
        let header = envelope.header();
        let kid = Some(header.kid().to_string());
        let digest = Some(Digest::from_sha256(envelope.digest()));
        let deny = |reason| Plan::Denied {
            reason,
            kid: kid.clone(),
            digest,
        };
        // One store read per key, not per envelope: a batch usually names
        // one or two epochs. A key whose row cannot be read (an edited or
        // damaged store) opens none of its envelopes (`open_failed`), as a
        // key with two pairs on the token; the others' are opened. Any
        // other store failure fails the request (503).
        if unreadable.contains(header.kid()) {
            plans.push(deny(DenyReason::OpenFailed));
            continue;
        }
        let record = match keys.get(header.kid()) {
            Some(r) => r.clone(),
            None => match ctx.store.get_key(header.kid()) {
                Ok(r) => {
                    keys.insert(header.kid().to_string(), r.clone());
                    r
                }
                Err(e @ StoreError::Corrupt { .. }) => {
                    // Once a request (the set below), and a line a second
                    // per key, counting the rest: an agency can repeat it.
                    if let Some(left_out) =
                        UNREADABLE_KEY_LINES.admit(header.kid(), std::time::Instant::now())
                    {
                        tracing::error!(
                            kid = %crate::codec::escape_for_terminal(header.kid()),
                            error = %e,
                            left_out,
                            "an escrow key's store row cannot be read: its envelopes are denied \
                             open_failed until the row is mended"
                        );
                    }
                    unreadable.insert(header.kid().to_string());
                    plans.push(deny(DenyReason::OpenFailed));
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        let plan = match record {
            None => deny(DenyReason::UnknownKey),
            // Destroyed, or past retention and awaiting destruction: either
            // way it must never open again.
            Some(k) if k.destroyed_at.is_some() || now > k.destroy_after => {
                deny(DenyReason::KeyDestroyed)
            }
            Some(k) => match warrant.check_envelope(header.kid(), header.target(), header.time()) {
                Err(denial) => deny(denial.reason()),
                Ok(()) => Plan::Candidate(Box::new(envelope), k.public),
            },
        };
        plans.push(plan);
    }

    // Every leaf, built now, before the budget and before any HSM call:
    // each candidate's as `opened`, which later steps can only downgrade to
    // `denied` (infallibly). Nothing after the HSM can then fail on input,
    // so no key is opened that the log will not record, and no reservation
    // is left behind by a bad field. A leaf that cannot be built (a field
    // outside the leaf's rules that the header check let through: a bug,
    // since both use the one rule of `crate::bounds`) makes that envelope
    // `malformed_envelope`, and the rest of the batch proceeds.
    let leaf = |kid: Option<&str>, digest: Option<Digest>, outcome| {
        Unwrap::new(caller, &warrant_ref, kid, digest, outcome)
    };
    let mut leaves = Vec::with_capacity(plans.len());
    for plan in &mut plans {
        let built = match plan {
            Plan::Denied {
                reason,
                kid,
                digest,
            } => leaf(kid.as_deref(), *digest, UnwrapOutcome::Denied(*reason)),
            Plan::Candidate(envelope, _) => leaf(
                Some(envelope.header().kid()),
                Some(Digest::from_sha256(envelope.digest())),
                UnwrapOutcome::Opened,
            ),
        };
        let built = match built {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "an envelope the header check accepted does not fit an audit leaf; denied as malformed");
                *plan = Plan::Denied {
                    reason: DenyReason::MalformedEnvelope,
                    kid: None,
                    digest: None,
                };
                // Only the caller and the warrant id are left in it, both
                // checked at the edge: failing here fails the request
                // before anything is reserved or opened.
                leaf(
                    None,
                    None,
                    UnwrapOutcome::Denied(DenyReason::MalformedEnvelope),
                )
                .map_err(|e| UnwrapError::Internal(format!("audit leaf: {e}")))?
            }
        };
        leaves.push(built);
    }
    // Budget: reserve for every candidate; the ones beyond the grant are
    // refused in request order. From here to the settle inside the audit
    // append there is no early return: the reservation is always settled,
    // or given back by the store when the append fails.
    let candidates = plans
        .iter()
        .filter(|p| matches!(p, Plan::Candidate(..)))
        .count() as u64;
    // Leaves of earlier HSM opens that the store has not taken yet: nothing
    // more is opened until they are written (the store is failing, and the
    // queue of such leaves must not grow).
    let waiting = ctx.log.deferred_leaves();
    if waiting > 0 {
        return Err(UnwrapError::StoreUnavailable(format!(
            "{waiting} audit leaves of earlier HSM opens are not written yet; nothing is opened \
             until they are"
        )));
    }
    // The open intent, written durably with the reservation (one
    // transaction) before the HSM is called: each candidate's leaf as it
    // must read should this process stop before the audit commit
    // (`open_interrupted`). The commit deletes it; otherwise the next
    // daemon to find it writes those leaves, so no HSM open goes unlogged,
    // even across a crash.
    let mut interrupted: Vec<Unwrap> = plans
        .iter()
        .zip(&leaves)
        .filter(|(plan, _)| matches!(plan, Plan::Candidate(..)))
        .map(|(_, leaf)| {
            let mut interrupted = leaf.clone();
            interrupted.deny(DenyReason::OpenInterrupted);
            interrupted
        })
        .collect();
    let intent = interrupted
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UnwrapError::Internal(format!("open intent: {e}")))?;
    debug_assert_eq!(intent.len() as u64, candidates);
    phases.admit = lap.next();
    let reservation = match ctx.store.reserve_with_intent(warrant.id(), &intent) {
        Ok(r) => r,
        Err(StoreError::WarrantRevoked(id)) => {
            // Revoked since the admission: the time the store recorded.
            let at = match ctx.store.revocation(&id) {
                Ok(Some(rev)) => rev.revoked_at,
                Ok(None) | Err(_) => now,
            };
            let e = WarrantError::Revoked {
                id,
                at: crate::codec::format_time(at),
            };
            refuse(ctx, caller, request.warrant.get().as_bytes(), &e, now)?;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    drop(intent);
    phases.intent = lap.next();
    let mut granted = reservation.granted();
    let intent = reservation.intent();
    interrupted.truncate(usize::try_from(granted).unwrap_or(usize::MAX));
    let mut guard = IntentGuard {
        log: ctx.log,
        intent: intent.map(|id| (id, interrupted)),
    };

    // HSM open, for the granted candidates only (the first `granted` in
    // request order), spread over the session pool and shared fairly with
    // other requests. Until its open succeeds, a candidate stands as
    // `open_failed`.
    let mut releases = Vec::with_capacity(plans.len());
    let mut to_open = Vec::new();
    for plan in plans {
        releases.push(match plan {
            Plan::Denied { reason, .. } => Release::Denied(reason),
            Plan::Candidate(..) if granted == 0 => Release::Denied(DenyReason::BudgetExhausted),
            Plan::Candidate(envelope, public) => {
                granted -= 1;
                to_open.push((releases.len(), envelope, public));
                Release::Denied(DenyReason::OpenFailed)
            }
        });
    }
    let positions: Vec<usize> = to_open.iter().map(|(at, ..)| *at).collect();
    let positions_empty = positions.is_empty();
    // Keys the token refused to derive with in this request (kid, label,
    // code): their other envelopes are not sent to it (each would cost a
    // look-up and two derives for the same answer, and an agency can send
    // many).
    let refused: Arc<std::sync::Mutex<Vec<(String, String, String)>>> = Arc::default();
    let opening = ctx.hsm.start_spread(
        to_open,
        move |hsm, (_, envelope, public)| {
            let kid = envelope.header().kid();
            let known = refused.lock().ok().and_then(|r| {
                r.iter()
                    .find(|(k, ..)| k == kid)
                    .map(|(_, label, ckr)| (label.clone(), ckr.clone()))
            });
            let opened = match known {
                Some((label, ckr)) => Err(EnvelopeError::KeyAgreement(HsmError::KeyRefused {
                    label,
                    ckr,
                })),
                None => open_envelope(&envelope, &public, |e| hsm.ecdh(kid, e)),
            };
            if let Err(EnvelopeError::KeyAgreement(HsmError::KeyRefused { label, ckr })) = &opened {
                if let Ok(mut r) = refused.lock() {
                    if !r.iter().any(|(k, ..)| k == kid) {
                        r.push((kid.to_string(), label.clone(), ckr.clone()));
                    }
                }
            }
            (envelope, opened)
        },
        // A failing HSM stops the batch: do not keep calling it. A missing,
        // ambiguous, unsafe or refused key is that envelope's own fate,
        // decided below.
        |(_, opened)| {
            matches!(opened, Err(EnvelopeError::KeyAgreement(e))
            if !matches!(
                e,
                HsmError::KeyNotFound { .. }
                    | HsmError::DuplicateKey(_)
                    | HsmError::KeyAttributes { .. }
                    | HsmError::KeyRefused { .. }
            ))
        },
    );
    // While the HSM opens: the reply's key agreement with the recipient, in
    // software, so that it adds nothing to the request's time. It can only
    // fail with the RNG; then nothing is released, and what was opened is
    // logged as not opened, as after an HSM failure.
    let builder = ReplyBuilder::new(warrant.recipient())
        .map_err(|e| UnwrapError::Internal(format!("reply sealing: {e}")));
    let outcomes = opening.wait();
    let mut opened = 0u64;
    let mut hsm_failure = None;
    // Whether the token still finds the audit key, asked once per request.
    let mut token_sound = None;
    // Keys the token lacks, looked at once each (and said, if the store
    // still lists them as live).
    let mut lost_kids: Vec<String> = Vec::new();
    // Keys found twice under their label, said once each.
    let mut ambiguous_kids: Vec<String> = Vec::new();
    // Keys the token refused, with its code.
    let mut refused_kids: Vec<(String, String)> = Vec::new();
    for (at, outcome) in positions.into_iter().zip(outcomes) {
        let release = match outcome {
            JobOutcome::Done((envelope, Ok(dek))) => {
                opened += 1;
                Release::Opened {
                    kid: envelope.header().kid().to_string(),
                    header: envelope.header_bytes().to_vec(),
                    dek,
                }
            }
            // The store lists the key but the token no longer has it
            // (destroyed, e.g. after restoring an older store backup): it
            // can never open again. Unless the token finds no audit key
            // either: then its object store is unusable, the key may well be
            // intact, and saying (and logging) `key_destroyed` would be false.
            JobOutcome::Done((
                envelope,
                Err(EnvelopeError::KeyAgreement(HsmError::KeyNotFound { .. })),
            )) => {
                let sound = *token_sound.get_or_insert_with(|| match ctx.log.key_on_token() {
                    Ok(()) => true,
                    Err(e) => {
                        hsm_failure.get_or_insert(e);
                        false
                    }
                });
                if sound {
                    let kid = envelope.header().kid();
                    // Not when lavd destroyed it meanwhile: a destruction
                    // writes the store before the token, so a row still
                    // live (and in retention) is a loss outside lavd.
                    let live =
                        || {
                            ctx.store.get_key(kid).ok().flatten().is_some_and(|k| {
                                k.destroyed_at.is_none() && clock() <= k.destroy_after
                            })
                        };
                    if !lost_kids.iter().any(|k| k == kid) {
                        lost_kids.push(kid.to_string());
                        // An agency can send such envelopes as fast as
                        // its rate limit lets it: a line a second per key,
                        // counting the rest.
                        let admitted = || LOST_KEY_LINES.admit(kid, std::time::Instant::now());
                        if let Some(left_out) = live().then(admitted).flatten() {
                            tracing::error!(
                                kid = %crate::codec::escape_for_terminal(kid),
                                left_out,
                                "the store lists this escrow key as retained, but the token holds \
                                 no private key for it: it was removed or lost outside lavd (an \
                                 older store backup restored, a vendor tool, an HSM policy); its \
                                 envelopes are denied key_destroyed"
                            );
                        }
                    }
                    Release::Denied(DenyReason::KeyDestroyed)
                } else {
                    Release::Denied(DenyReason::OpenFailed)
                }
            }
            // Two private keys under the kid's label (a generation that
            // lost a race and was stopped before it removed its pair, or
            // another user of the token): either could be the wrong key, so
            // neither is used. That kid's envelopes are `open_failed`
            // (nothing opened, nothing spent); the batch's others proceed,
            // as `lavd keys list` withholds that kid and publishes the rest.
            //
            // Likewise a private key under the label that could leave the
            // token, or serve another operation (made or imported outside
            // lavd), or that the token refuses to derive with (a vendor
            // key type or policy: `hsm::error::key_refused`): it is not
            // used, so nothing opens with it.
            JobOutcome::Done((
                envelope,
                Err(EnvelopeError::KeyAgreement(
                    e @ (HsmError::DuplicateKey(_)
                    | HsmError::KeyAttributes { .. }
                    | HsmError::KeyRefused { .. }),
                )),
            )) => {
                let kid = envelope.header().kid();
                if let HsmError::KeyRefused { ckr, .. } = &e {
                    refused_kids.push((kid.to_string(), ckr.clone()));
                }
                // Once a request, and as for a lost key, a line a second
                // per key, counting the rest.
                let first = !ambiguous_kids.iter().any(|k| k == kid);
                if first {
                    ambiguous_kids.push(kid.to_string());
                }
                let admitted = || AMBIGUOUS_KEY_LINES.admit(kid, std::time::Instant::now());
                if let Some(left_out) = first.then(admitted).flatten() {
                    let kid = crate::codec::escape_for_terminal(kid);
                    let error = crate::codec::escape_for_terminal(&e.to_string());
                    match e {
                        HsmError::DuplicateKey(_) => tracing::error!(
                            %kid,
                            %error,
                            left_out,
                            "the token holds more than one private key under this escrow key's \
                             label, so neither is used: its envelopes are denied open_failed \
                             until one pair is gone (docs/OPERATIONS.md §1)"
                        ),
                        HsmError::KeyRefused { .. } => tracing::error!(
                            %kid,
                            %error,
                            left_out,
                            "the token refuses to derive with this escrow key (its type or the \
                             token's policy): its envelopes are denied open_failed; if every \
                             key is refused, look at the token's policy (docs/OPERATIONS.md §1)"
                        ),
                        _ => tracing::error!(
                            %kid,
                            %error,
                            left_out,
                            "this escrow key's private key on the token is not safe to use, so \
                             it is not: its envelopes are denied open_failed \
                             (docs/OPERATIONS.md §1)"
                        ),
                    }
                }
                Release::Denied(DenyReason::OpenFailed)
            }
            JobOutcome::Done((_, Err(EnvelopeError::KeyAgreement(e)))) => {
                hsm_failure.get_or_insert(e);
                Release::Denied(DenyReason::OpenFailed)
            }
            // Not opened after an HSM failure elsewhere in the batch, or an
            // envelope HPKE refuses: `open_failed`.
            JobOutcome::Done((_, Err(_))) | JobOutcome::NotRun => {
                Release::Denied(DenyReason::OpenFailed)
            }
            JobOutcome::Panicked => {
                hsm_failure.get_or_insert(HsmError::Worker("an envelope open panicked".into()));
                Release::Denied(DenyReason::OpenFailed)
            }
            // The HSM did not answer within the call deadline: whatever
            // the call returns later is dropped by the worker.
            JobOutcome::TimedOut => {
                hsm_failure.get_or_insert(HsmError::Timeout {
                    op: "ecdh_derive",
                    after: ctx.hsm.call_timeout(),
                });
                Release::Denied(DenyReason::OpenFailed)
            }
        };
        releases[at] = release;
    }
    // A key the token opened with and then refused in this one request:
    // its type and attributes cannot have changed between the two, so the
    // token did (its policy, the identity it is logged in as): a failing
    // token, not that key's fault. Nothing is released.
    if let Some((kid, ckr)) = refused_kids.iter().find(|(kid, _)| {
        releases
            .iter()
            .any(|r| matches!(r, Release::Opened { kid: opened, .. } if opened == kid))
    }) {
        tracing::error!(
            kid = %crate::codec::escape_for_terminal(kid),
            ckr = %ckr,
            "the token refused to derive with an escrow key it had opened with in the same \
             request: its policy changed; the request releases nothing"
        );
        hsm_failure.get_or_insert(HsmError::Pkcs11 {
            function: "C_DeriveKey".into(),
            ckr: ckr.clone(),
            session_lost: false,
        });
    }
    phases.hsm = lap.next();
    for (release, leaf) in releases.iter().zip(leaves.iter_mut()) {
        if let Release::Denied(reason) = release {
            leaf.deny(*reason);
        }
    }
    if hsm_failure.is_some() || builder.is_err() {
        // The HSM is failing, or the reply cannot be sealed: nothing is
        // released or spent. DEKs opened before the failure are dropped
        // (zeroized) and logged as not opened.
        deny_opened(&mut releases, &mut leaves, DenyReason::OpenFailed);
        opened = 0;
    }
    // The deadlines once more, at the last moment before the audit commit:
    // the warrant's end (or its urgent hours', or a signer's validity),
    // and each key's retention. A request admitted just before one of them,
    // whose opens ran past it (a large batch, a slow HSM), releases nothing
    // past it. A warrant that lapsed refuses the request whole, as it
    // refuses one that arrives after its end (403 `warrant_expired`,
    // `emergency_expired` or `authority_not_valid`: codes PROTOCOL §5 has),
    // once its leaves, denied with that reason and unspent, are durable:
    // the HSM opened, and every open is logged. A key past its retention
    // denies its envelopes `key_destroyed`.
    // And the configuration: a reload that applied while the opens ran
    // (authorities, policy, roles, client CAs and CRLs) judges the request
    // again, as one at the gate (`Recheck`). Its fence is held to the end
    // of the commit.
    let fence = ctx.recheck.map(|r| {
        r.fence
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    let settling = clock();
    let lapsed = refused_at_settle(
        ctx,
        request.warrant.get().as_bytes(),
        caller,
        &warrant,
        settling,
    );
    if let Some((reason, _)) = &lapsed {
        deny_opened(&mut releases, &mut leaves, *reason);
        opened = 0;
    } else {
        let retained = |kid: &str| {
            keys.get(kid)
                .and_then(Option::as_ref)
                .is_some_and(|k| settling <= k.destroy_after)
        };
        for (release, leaf) in releases.iter_mut().zip(leaves.iter_mut()) {
            if matches!(release, Release::Opened { kid, .. } if !retained(kid)) {
                *release = Release::Denied(DenyReason::KeyDestroyed);
                leaf.deny(DenyReason::KeyDestroyed);
                opened -= 1;
            }
        }
    }

    // Audit before release: every envelope's leaf and the spend in one
    // durable transaction, and a signed checkpoint that includes them. That
    // transaction looks at revocation and key destruction once more: what
    // was revoked or destroyed while this request was in flight (or, on
    // PostgreSQL, a budget spent by others after this reservation's lease
    // ran out) is not spent, and the leaves that would have said `opened`
    // say denied instead (`Withdrawn`).
    // Should this commit fail, the HSM has opened all the same: these
    // leaves, with nothing released, are written once the store takes them.
    let unreleased = (!positions_empty).then(|| {
        let mut unreleased = leaves.clone();
        for (release, leaf) in releases.iter().zip(unreleased.iter_mut()) {
            if matches!(release, Release::Opened { .. }) {
                leaf.deny(DenyReason::AuditCommitFailed);
            }
        }
        unreleased
    });
    // Committed (or failed): a reload may apply from then on, while the
    // checkpoint's signature is still awaited.
    let committed = ctx.log.append_committed_then(
        AuditAppend {
            events: leaves.into_iter().map(Event::from).collect(),
            time: now,
            spend: Spend::Settle {
                reservation,
                opened,
            },
        },
        move |_| drop(fence),
    );
    // Settled with the leaves, or replaced by the deferred ones below.
    guard.intent = None;
    let receipt = match committed {
        // Committed, with budget spent: a failure now (the checkpoint
        // signed in the HSM, or saved in the store) is not told as
        // `hsm_unavailable` or `store_unavailable`, after which nothing was
        // spent: a client would retry and spend again. (A log found
        // inconsistent stays `log_inconsistent`: nothing is served until
        // an operator acts.)
        Ok((appended, receipt)) => {
            // What the settle spent: the opened envelopes it did not
            // withdraw (revoked, destroyed or lapsed in flight). None of
            // them is released until the end.
            let spent = releases
                .iter()
                .filter(|r| {
                    matches!(r, Release::Opened { kid, .. }
                        if appended.withdrawn.reason(kid).is_none())
                })
                .count();
            *withheld = spent;
            receipt.map_err(|e| match e {
                e @ (LogError::Store(_) | LogError::Hsm(_) | LogError::Sign(_)) if spent > 0 => {
                    UnwrapError::SpentNotReleased(format!(
                        "the leaves and the spend of {spent} committed, then the checkpoint \
                         failed: {e}"
                    ))
                }
                other => other.into(),
            })?
        }
        Err(e) => {
            if let Some(unreleased) = unreleased {
                tracing::error!(error = %e, leaves = unreleased.len(), "the audit commit failed after the HSM opened: nothing is released, and the leaves are written when the store takes them");
                ctx.log.append_later(AuditAppend {
                    events: unreleased.into_iter().map(Event::from).collect(),
                    time: now,
                    // In place of the intent, unless the commit landed
                    // after all (PostgreSQL, an outcome not reported).
                    spend: intent.map_or(Spend::None, Spend::ClearIntent),
                });
            }
            return Err(match e {
                LogError::Store(e @ StoreError::CommitUnknown(_)) if opened > 0 => {
                    *withheld = usize::try_from(opened).unwrap_or(usize::MAX);
                    UnwrapError::SpentNotReleased(format!(
                        "the audit commit, spending {opened}, may have landed (its outcome is \
                         unknown): {e}"
                    ))
                }
                other => other.into(),
            });
        }
    };
    let withdrawn = &receipt.appended.withdrawn;
    if withdrawn.any() {
        // As the store wrote it; those DEKs are dropped (zeroized), never
        // sealed.
        for release in &mut releases {
            if let Release::Opened { kid, .. } = release {
                if let Some(reason) = withdrawn.reason(kid) {
                    *release = Release::Denied(reason);
                    opened = opened.saturating_sub(1);
                }
            }
        }
    }
    if let Some(e) = hsm_failure {
        return Err(e.into());
    }
    if let Some((_, refused)) = lapsed {
        return Err(refused);
    }
    // A sweep took this request's open intent (it outlived its reservation's
    // lease) and logged its envelopes `open_interrupted`, nothing
    // released: its leaves say `audit_commit_failed` and nothing was spent,
    // so nothing is released now either, and no reply says otherwise.
    if withdrawn.intent_swept {
        tracing::error!(
            "this request outlived its reservation's lease and its open intent was swept as \
             interrupted: nothing is released (raise [store] reservation_lease_secs above the \
             time a request can take)"
        );
        return Err(UnwrapError::StoreUnavailable(
            "the request outlived its reservation's lease: its opens were logged as \
             interrupted and nothing was released; send it again"
                .into(),
        ));
    }
    let mut builder = builder?;
    phases.audit = lap.next();
    let checkpoint = witnessed(ctx, &receipt, opened)?;
    // Between the settle's checks, inside the audit commit, and here, the
    // checkpoint was signed (up to `[hsm] call_timeout_ms` on a slow
    // module), a PostgreSQL COMMIT may have waited for its synchronous
    // standby, and under `release_after_witness` the witnesses were waited
    // for (seconds): a revocation or a key's destruction committed
    // meanwhile (its admin or operator already told so), or a deadline
    // passed meanwhile, releases nothing. The leaves stay as written,
    // `opened` with the budget spent, as after a wait that timed out; the
    // request is refused as one that arrives now is. A store that cannot
    // say releases nothing.
    let witnessing = ctx
        .witnessing
        .filter(|w| w.settings().release_after_witness && opened > 0);
    if opened > 0 {
        // The spend has committed: a failed read is answered as the wait's
        // own failure, or as spent and not released, never
        // `store_unavailable`, which would invite a retry that spends
        // again.
        let store_failed = |error| match witnessing {
            Some(witnessing) => UnwrapError::WitnessUnavailable(WaitError::Store {
                size: receipt.appended.first_index + receipt.appended.count,
                timeout: witnessing.settings().timeout,
                error,
            }),
            None => UnwrapError::SpentNotReleased(format!(
                "the leaves and the spend of {opened} committed, then the check for a \
                 revocation or a key's destruction since could not be made: {error}"
            )),
        };
        let revoked = ctx.store.revocation(warrant.id()).map_err(store_failed)?;
        if let Some(revocation) = revoked {
            tracing::warn!(
                warrant_id = %crate::codec::escape_for_terminal(warrant.id()),
                opened,
                "the warrant was revoked after its unwrap's audit commit, before the release: \
                 nothing is released (its leaves say opened)"
            );
            return Err(WarrantError::Revoked {
                id: revocation.id,
                at: crate::codec::format_time(revocation.revoked_at),
            }
            .into());
        }

        // A key destroyed meanwhile (final once its leaf committed, and its
        // operator told so), or whose retention ended meanwhile (its
        // `destroy_after` passed, whether or not the daily job has
        // destroyed it yet), releases none of its envelopes: they are
        // denied `key_destroyed` in the reply, their leaves saying opened,
        // as after a wait that timed out. The other keys' are released.
        let mut kids: Vec<&str> = releases
            .iter()
            .filter_map(|r| match r {
                Release::Opened { kid, .. } => Some(kid.as_str()),
                Release::Denied(_) => None,
            })
            .collect();
        kids.sort_unstable();
        kids.dedup();
        let mut destroyed = Vec::new();
        let waited_until = clock();
        for kid in kids {
            let key = ctx.store.get_key(kid).map_err(store_failed)?;
            if key.is_none_or(|k| k.destroyed_at.is_some() || waited_until > k.destroy_after) {
                destroyed.push(kid.to_string());
            }
        }
        if !destroyed.is_empty() {
            tracing::warn!(
                warrant_id = %crate::codec::escape_for_terminal(warrant.id()),
                kids = %crate::codec::escape_for_terminal(&destroyed.join(",")),
                "keys were destroyed, or their retention ended, after this unwrap's audit commit, \
                 before the release: their envelopes are not released (their leaves say opened)"
            );
            for release in &mut releases {
                if let Release::Opened { kid, .. } = release {
                    if destroyed.contains(kid) {
                        *release = Release::Denied(DenyReason::KeyDestroyed);
                        opened = opened.saturating_sub(1);
                    }
                }
            }
        }
        // A warrant that lapsed meanwhile (its `expires`, its emergency
        // period, or a signer's validity passed), or a reload meanwhile
        // that no longer admits the request (authorities, policy, roles,
        // the caller's certificate), releases nothing either: judged as at
        // the settle, after the key reads, as late as can be; refused as a
        // request that arrives now is, its leaves saying opened and the
        // budget spent, as after a wait that timed out.
        if let Some((_, refused)) = refused_at_settle(
            ctx,
            request.warrant.get().as_bytes(),
            caller,
            &warrant,
            clock(),
        ) {
            tracing::warn!(
                warrant_id = %crate::codec::escape_for_terminal(warrant.id()),
                opened,
                code = refused.code(),
                "the warrant lapsed, or a reload withdrew what admitted the request, after its \
                 unwrap's audit commit, before the release: nothing is released (its leaves say \
                 opened)"
            );
            return Err(refused);
        }
    }

    phases.witness = lap.next();

    // Release: seal the opened DEKs to the warrant's recipient, in order.
    let mut denied = BTreeMap::new();
    for release in &releases {
        match release {
            Release::Opened { header, dek, .. } => builder
                .push_opened(header, dek)
                .map_err(|e| UnwrapError::Internal(format!("reply sealing: {e}")))?,
            Release::Denied(reason) => {
                *denied.entry(reason.as_str()).or_default() += 1;
                builder.push_denied(*reason);
            }
        }
    }
    // Released: all that was spent but the envelopes of keys destroyed
    // after the commit.
    *withheld = withheld.saturating_sub(usize::try_from(opened).unwrap_or(usize::MAX));
    let reply = builder.finish(AuditRef {
        checkpoint,
        first_index: receipt.appended.first_index,
        count: receipt.appended.count,
    });
    let reply = reply.to_json();
    phases.reply = lap.next();
    Ok(Unwrapped {
        reply,
        warrant_id: warrant.id().to_string(),
        opened: opened as usize,
        denied,
        receipt,
        phases,
    })
}

/// An open intent whose request has not reached its audit append: should
/// the request's work end first (a panic, a bug), dropping this writes the
/// intent's `open_interrupted` leaves through the deferred writer, so that
/// its opens are logged while the process lives, not only at the next start
/// (SQLite) or after the lease (PostgreSQL). Disarmed (`intent = None`) once
/// the append has returned.
struct IntentGuard<'a> {
    log: &'a AuditLog,
    intent: Option<(i64, Vec<Unwrap>)>,
}

impl Drop for IntentGuard<'_> {
    fn drop(&mut self) {
        if let Some((id, leaves)) = self.intent.take() {
            tracing::error!(
                intent = id,
                leaves = leaves.len(),
                "an unwrap ended between its HSM opens and its audit commit (a bug); its open \
                 intent is written as open_interrupted leaves"
            );
            self.log.append_later(AuditAppend {
                events: leaves.into_iter().map(Event::from).collect(),
                time: OffsetDateTime::now_utc(),
                spend: Spend::ClearIntent(id),
            });
        }
    }
}

/// The checkpoint the reply carries: one the witness quorum cosigned that
/// covers the request's leaves when there is one (waiting for it, bounded,
/// under `release_after_witness` when anything is to be released), else the
/// log's own checkpoint of the receipt. The reply's `first_index` and
/// `count` lie inside either.
///
/// # Errors
/// [`UnwrapError::WitnessUnavailable`] when the wait timed out or the store
/// stayed unreadable until then; under `release_after_witness`, the log's
/// error when the cosigned checkpoint read from the store does not verify
/// under the audit key (the log is then inconsistent), and
/// [`UnwrapError::Internal`] when it does not cover the leaves. The caller
/// returns it, and the opened DEKs are dropped unsealed.
fn witnessed(ctx: &Context<'_>, receipt: &Receipt, opened: u64) -> Result<String, UnwrapError> {
    let Some(witnessing) = ctx.witnessing else {
        return Ok(receipt.checkpoint.clone());
    };
    let needed = receipt.appended.first_index + receipt.appended.count;
    // Read from the store: its cosignatures were verified over it; it must
    // also verify under the audit key and cover the leaves.
    let covering = |cosigned: &str| -> Result<(), UnwrapError> {
        let checkpoint = ctx.log.check_served(cosigned)?;
        if checkpoint.size < needed {
            return Err(UnwrapError::Internal(format!(
                "the stored cosigned checkpoint of size {} does not cover the request's leaves \
                 (size {needed} needed)",
                checkpoint.size
            )));
        }
        Ok(())
    };
    if witnessing.settings().release_after_witness && opened > 0 {
        // Either way the leaves are logged and the budget spent: a
        // store_unavailable would invite a retry that spends it again.
        let cosigned = witnessing
            .wait_for_quorum(needed)
            .map_err(UnwrapError::WitnessUnavailable)?;
        // Or nothing is released.
        covering(&cosigned)?;
        return Ok(cosigned);
    }
    match witnessing.quorum_covering(needed) {
        Ok(Some(cosigned)) => match covering(&cosigned) {
            Ok(()) => Ok(cosigned),
            Err(e) => {
                // Said (and, for a bad signature, recorded as the log's
                // inconsistency); this reply is still sound with the
                // checkpoint the append signed.
                tracing::error!(error = %e, "a stored cosigned checkpoint is not sound; replying with the log's checkpoint");
                Ok(receipt.checkpoint.clone())
            }
        },
        Ok(None) => Ok(receipt.checkpoint.clone()),
        Err(e) => {
            // The reply is still sound with the log's own checkpoint.
            tracing::warn!(error = %e, "cannot read cosignatures; replying with the log's checkpoint");
            Ok(receipt.checkpoint.clone())
        }
    }
}

/// Why a request admitted when its work started is refused at the last
/// look before its audit commit, with its leaves' reason: the warrant's
/// end, its urgent hours' or a signer's validity passed meanwhile
/// ([`crate::warrant::VerifiedWarrant::lapsed`]); or a reload applied
/// meanwhile ([`Context::recheck`]) that no longer admits the caller, or
/// whose trust no longer verifies the warrant (`configuration_changed`,
/// unless the refusal is one of those ends).
fn refused_at_settle(
    ctx: &Context<'_>,
    jws: &[u8],
    caller: &str,
    warrant: &crate::warrant::VerifiedWarrant,
    settling: OffsetDateTime,
) -> Option<(DenyReason, UnwrapError)> {
    let newer = match ctx.recheck.map(|r| (r.readmit.0)()) {
        Some(Err(withdrawn)) => return Some((DenyReason::ConfigurationChanged, withdrawn)),
        Some(Ok(newer)) => newer,
        None => None,
    };
    let refused = match newer {
        Some(verifier) => verifier.verify(jws, settling, caller).err(),
        None => warrant.lapsed(settling),
    }?;
    let reason = match &refused {
        WarrantError::Expired(_) => DenyReason::WarrantExpired,
        WarrantError::EmergencyExpired(_) => DenyReason::EmergencyExpired,
        WarrantError::AuthorityNotValid { .. } => DenyReason::AuthorityNotValid,
        _ => DenyReason::ConfigurationChanged,
    };
    Some((reason, refused.into()))
}

/// Turns every opened envelope into a denial for `reason`, in the reply
/// and in its leaf alike; the DEKs are dropped, and so zeroized.
fn deny_opened(releases: &mut [Release], leaves: &mut [Unwrap], reason: DenyReason) {
    for (release, leaf) in releases.iter_mut().zip(leaves) {
        if matches!(release, Release::Opened { .. }) {
            *release = Release::Denied(reason);
            leaf.deny(reason);
        }
    }
}

/// What the reply says about one envelope.
enum Release {
    Opened {
        kid: String,
        header: Vec<u8>,
        dek: crate::secret::Secret<Vec<u8>>,
    },
    Denied(DenyReason),
}

/// Logs a refused warrant durably (the refusal is an event auditors must
/// see), then lets the caller return the refusal.
fn refuse(
    ctx: &Context<'_>,
    caller: &str,
    jws: &[u8],
    error: &WarrantError,
    now: OffsetDateTime,
) -> Result<(), UnwrapError> {
    if matches!(error, WarrantError::Store(_)) {
        return Err(UnwrapError::StoreUnavailable(error.to_string()));
    }
    let (id, digest) = claimed(jws, ctx.verifier.limits().max_warrant_bytes);
    let event = WarrantRefused::new(caller, id.as_deref(), digest, error.code())
        // A claimed id the leaf refuses (too long, odd characters) is left out.
        .or_else(|_| WarrantRefused::new(caller, None, digest, error.code()))
        .map_err(|e| UnwrapError::Internal(format!("audit leaf: {e}")))?;
    let event: Event = event.into();
    ctx.log.append(AuditAppend {
        events: vec![event],
        time: now,
        spend: Spend::None,
    })?;
    Ok(())
}

/// PROTOCOL §5 checks the warrant's validity before its `agency`, and §4
/// makes "not revoked" part of validity: a revoked warrant presented by
/// another agency is refused as revoked (`warrant_revoked`, and so its
/// refusal leaf says), not as `agency_mismatch`. The verifier checks the
/// agency last, after every signature verified, so the `id` the payload
/// claims is the signed one.
fn revoked_before_agency(ctx: &Context<'_>, jws: &[u8], e: WarrantError) -> WarrantError {
    if !matches!(e, WarrantError::AgencyMismatch { .. }) {
        return e;
    }
    let Some(id) = claimed(jws, usize::MAX).0 else {
        return e;
    };
    match ctx.store.revocation(&id) {
        Ok(Some(rev)) => WarrantError::Revoked {
            id: rev.id,
            at: crate::codec::format_time(rev.revoked_at),
        },
        // Unreadable: the request is refused all the same, as the
        // verifier said.
        Ok(None) | Err(_) => e,
    }
}

/// What a refused warrant claims to be: its `id` and the digest of its
/// payload, for the refusal's audit leaf, so that auditors can tie refusals
/// to warrants. Nothing here is trusted (the warrant did not verify); both
/// are `None` when the JWS does not even decode, or is larger than
/// `max_bytes` (the verifier's bound, which refused it unparsed as
/// `warrant_too_large`). Only the members read are parsed, so a hostile
/// JWS costs no more memory than its own size.
pub(crate) fn claimed(jws: &[u8], max_bytes: usize) -> (Option<String>, Option<Digest>) {
    if jws.len() > max_bytes {
        return (None, None);
    }
    let string = |raw: &serde_json::value::RawValue| serde_json::from_str::<String>(raw.get()).ok();
    let Some(payload) = crate::codec::json_member(jws, "payload")
        .and_then(string)
        .and_then(|p| crate::codec::b64_decode(&p).ok())
    else {
        return (None, None);
    };
    let digest = Digest::of_warrant_payload(&payload);
    let id = crate::codec::json_member(&payload, "id")
        .and_then(string)
        .filter(|id| crate::bounds::warrant_id(id).is_ok());
    (id, Some(digest))
}

/// The warrant `id` an unwrap request body claims, unverified: for the
/// request's log span, so that refused requests can be traced too. `None`
/// above `max_warrant_bytes`, as [`claimed`].
pub fn claimed_warrant_id(body: &[u8], max_warrant_bytes: usize) -> Option<String> {
    let warrant = crate::codec::json_member(body, "warrant")?;
    claimed(warrant.get().as_bytes(), max_warrant_bytes).0
}

/// A revocation request, by an admin (`{"id","reason"}`) or by an authority
/// (`{"revocation": <JWS>}`, PROTOCOL §6).
#[derive(Debug)]
pub enum RevocationRequest<'a> {
    /// From a caller holding the admin role.
    Admin {
        /// The admin's identity.
        caller: &'a str,
        /// The request body.
        body: &'a [u8],
    },
    /// From any authenticated caller carrying an authority-signed JWS.
    Authority {
        /// The caller's identity (who delivered it).
        caller: &'a str,
        /// The request body.
        body: &'a [u8],
    },
}

/// An admin's revocation body `{"id","reason"}` (PROTOCOL §6), parsed and
/// bounded: the edge where those untrusted bytes become values.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRevocation {
    /// The warrant id to revoke.
    pub id: String,
    /// Why.
    pub reason: String,
}

impl AdminRevocation {
    /// Parses an admin's body strictly (unknown, duplicate or missing
    /// members and trailing data refused) and checks `id` and `reason` with
    /// the one definition of their bounds that the claims, the authority
    /// form and the audit leaf use: an id that can be executed can be
    /// revoked.
    ///
    /// # Errors
    /// [`UnwrapError::Malformed`] (`malformed_request`) naming what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, UnwrapError> {
        let r: Self = crate::codec::from_object_slice(body)
            .map_err(|e| UnwrapError::Malformed(e.to_string()))?;
        let bound =
            |field: &str, check: fn(&str) -> Result<(), crate::bounds::BoundError>, v: &str| {
                check(v).map_err(|why| UnwrapError::Malformed(format!("`{field}` {why}")))
            };
        bound("id", crate::bounds::warrant_id, &r.id)?;
        bound("reason", crate::bounds::reason, &r.reason)?;
        Ok(r)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorityRevocation<'a> {
    #[serde(borrow)]
    revocation: &'a RawValue,
}

/// The JWS of an authority's revocation body `{"revocation": <JWS>}`
/// (PROTOCOL §6), as bytes for [`Verifier::verify_revocation`].
///
/// # Errors
/// [`UnwrapError::Malformed`] (`malformed_request`) for any other body.
pub fn authority_revocation_jws(body: &[u8]) -> Result<&[u8], UnwrapError> {
    let r: AuthorityRevocation<'_> =
        crate::codec::from_object_slice(body).map_err(|e| UnwrapError::Malformed(e.to_string()))?;
    Ok(r.revocation.get().as_bytes())
}

/// A recorded revocation.
#[derive(Debug)]
pub struct Revoked {
    /// The warrant id.
    pub id: String,
    /// False if it was already revoked (revocation is final; the first record stands).
    pub newly_revoked: bool,
    /// Whether a warrant of that id had been presented before: a
    /// revocation of an id never seen is recorded (a warrant can be revoked
    /// before its first use), and this says it may be a typo.
    pub warrant_seen: bool,
    /// Where the revocation's leaf is.
    pub appended: crate::store::Appended,
    /// A signed checkpoint covering the leaf, or why none could be had
    /// (the HSM failed to sign after the commit, or the log is
    /// inconsistent). Either way the revocation is committed, so final:
    /// a "retry later" would be false, and a retry would only write a
    /// second leaf.
    pub checkpoint: Result<String, crate::audit::log::LogError>,
}

/// Records a revocation durably with its audit leaf, at `clock`'s time
/// once the configuration judging it is settled (`ctx.recheck`).
///
/// # Errors
/// [`UnwrapError::Malformed`] for a bad body, [`UnwrapError::Warrant`] for an
/// authority JWS that does not verify, [`UnwrapError::Withdrawn`] when
/// the caller is no longer admitted, [`UnwrapError::HsmUnavailable`] or
/// [`UnwrapError::StoreUnavailable`] when nothing was committed. Once the
/// revocation is committed it is `Ok`, with or without a checkpoint.
pub fn revoke(
    ctx: &Context<'_>,
    request: RevocationRequest<'_>,
    clock: &dyn Fn() -> OffsetDateTime,
) -> Result<Revoked, UnwrapError> {
    // Judged under the configuration in force when its work starts (a
    // reload may have applied while it waited for a thread): the caller
    // admitted again (`Recheck`'s readmission), and an authority's
    // signature verified under that trust. The reload's fence is held
    // from then to the end of the commit, as by an unwrap's last look: no
    // revocation judged under one trust commits after the
    // `authorities_loaded` leaf that says another applies.
    // The body first: a malformed one waits for no reload.
    enum Form<'b> {
        Admin(AdminRevocation),
        Authority(&'b [u8]),
    }
    let (caller, form) = match request {
        RevocationRequest::Admin { caller, body } => {
            (caller, Form::Admin(AdminRevocation::parse(body)?))
        }
        RevocationRequest::Authority { caller, body } => {
            (caller, Form::Authority(authority_revocation_jws(body)?))
        }
    };
    let fence = ctx.recheck.map(|r| {
        r.fence
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    });
    let newer = match ctx.recheck {
        Some(r) => (r.readmit.0)()?,
        None => None,
    };
    let verifier = newer.as_deref().unwrap_or(ctx.verifier);
    // Its time once the configuration judging it is settled: no earlier
    // than a reload's leaf it waited for.
    let now = clock();
    let (id, reason, revoked_by, signed) = match form {
        Form::Admin(r) => (r.id, r.reason, caller.to_string(), None),
        Form::Authority(jws) => {
            let verified = verifier.verify_revocation(jws, now)?;
            (
                verified.id().to_string(),
                verified.reason().to_string(),
                verified.authorised_by().to_string(),
                Some((*verified.digest(), verified.time())),
            )
        }
    };
    // `id` and `reason` were checked at the edge by the one definition of
    // their bounds: AdminRevocation::parse, or RevocationClaims::parse
    // inside verify_revocation. An authority's revocation is recorded
    // under the authority that authorised it, with what it signed.
    let signed = signed.map(|(digest, time)| crate::audit::leaf::SignedRevocation {
        authority: &revoked_by,
        digest,
        time,
    });
    let event: Event = RevocationEvent::new(caller, &id, &reason, signed)
        .map_err(|e| UnwrapError::Malformed(e.to_string()))?
        .into();
    let (appended, receipt) = ctx.log.append_committed_then(
        AuditAppend {
            events: vec![event],
            time: now,
            spend: Spend::Revoke(Revocation {
                id: id.clone(),
                reason,
                revoked_by,
                revoked_at: now,
            }),
        },
        move |_| drop(fence),
    )?;
    Ok(Revoked {
        id,
        newly_revoked: appended.newly_revoked,
        warrant_seen: appended.warrant_seen,
        appended,
        checkpoint: receipt.map(|r| r.checkpoint),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_over_the_limit_is_counted_not_kept() {
        let zeros = format!("[{}0]", "0,".repeat(99_999));
        let raw: &RawValue = serde_json::from_str(&zeros).unwrap();
        let (kept, got) = batch(raw, 100).unwrap();
        assert_eq!((kept.len(), got), (100, 100_000));
        assert!(
            kept.capacity() <= 128,
            "{} references kept",
            kept.capacity()
        );

        let raw: &RawValue = serde_json::from_str(r#"[{"a":1}, [2], "3"]"#).unwrap();
        let (kept, got) = batch(raw, 100).unwrap();
        assert_eq!(got, 3);
        assert_eq!(
            kept.iter().map(|e| e.get()).collect::<Vec<_>>(),
            [r#"{"a":1}"#, "[2]", r#""3""#]
        );

        let raw: &RawValue = serde_json::from_str("[]").unwrap();
        assert_eq!(batch(raw, 100).unwrap().1, 0);
        for not_an_array in ["5", r#"{"0":1}"#, "null"] {
            let raw: &RawValue = serde_json::from_str(not_an_array).unwrap();
            let e = batch(raw, 100).unwrap_err();
            assert_eq!(e.code(), "malformed_request", "{not_an_array}");
            let text = e.to_string();
            assert!(text.contains("`envelopes`: invalid type"), "{text}");
            assert!(text.ends_with("expected an array of envelopes"), "{text}");
        }
    }
}
