//! Escrow key lifecycle: generation, publication as a JWK Set, and
//! destruction at the end of retention. Ties the HSM (where the private keys
//! live) to the store (where their metadata lives).
//!
//! Order of writes, chosen so that a crash between two steps fails closed:
//! - generate: HSM first, then the store. A crash leaves an unlisted key on the
//!   token (nothing is sealed to it: it was never published), never a listed
//!   key without a private half. The next generation of that kid names it
//!   ([`KeyError::OrphanPair`]), and [`discard_orphan`] removes it.
//! - destroy: the store first, then the HSM. A crash leaves a key the daemon
//!   already treats as destroyed; running `keys destroy` again finishes the
//!   job on the token.

use time::OffsetDateTime;

use crate::audit::leaf::{Event, KeyDestroyed, KeyGenerated};
use crate::audit::log::{AuditLog, LeafProof, LogError};
use crate::codec::format_time;
use crate::hsm::{Hsm, HsmError};
use crate::jwk::{Jwk, JwkSet, LAV_SUITE};
use crate::store::{AuditAppend, AuditStore, KeyRecord, KeyStore, Spend, StoreError};

/// A key lifecycle request that was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The kid is not 1–64 characters of `A-Z a-z 0-9 . _ -`.
    #[error("invalid kid {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    InvalidKid(String),
    /// The dates, in whole seconds as the store and the log keep them, are
    /// not ordered `not_before < not_after <= destroy_after`; says which
    /// pair is not, with the two dates as kept.
    #[error(
        "invalid validity: need not_before < not_after <= destroy_after (whole seconds, as the \
         store and the log keep them), but {0}"
    )]
    InvalidDates(String),
    /// A key with this kid exists or existed (kids are never reused).
    #[error("escrow key {0:?} already exists (kids are never reused, even after destruction)")]
    DuplicateKid(String),
    /// No key has this kid.
    #[error("no escrow key {0:?}")]
    UnknownKid(String),
    /// The token holds a key pair under the kid's label that the store does
    /// not record: a generation that stopped between the HSM and its
    /// commit (a crash, a kill) left it, or the store was restored from a
    /// backup older than the key.
    #[error(
        "the token holds a key pair under escrow key {0:?}'s label that the store does not \
         record. Either a generation that stopped before its commit left it (it was never \
         published, nothing is sealed to it): if no other `lavd keys generate --kid {0}` is \
         running, remove it with `lavd keys discard-orphan --kid {0}`, then generate again. \
         Or the store was restored from a backup older than the key (OPERATIONS §6), or a PIN \
         holder made it outside lavd: then do not discard it (a restored key was published, \
         and envelopes are sealed to it); use another kid"
    )]
    OrphanPair(String),
    /// `keys discard-orphan` of a kid the store records: it is no orphan.
    #[error(
        "escrow key {0:?} is recorded in the store: it is no orphan, and its pair stays (destroy \
         it with `lavd keys destroy`)"
    )]
    Recorded(String),
    /// `keys discard-orphan` on a store that cannot be shown to be the
    /// token's (missing, never served, or its newest checkpoint not signed
    /// by the token's audit key): in another store every kid looks
    /// unrecorded, and a recorded key would be destroyed.
    #[error(
        "the store cannot be shown to be this token's: {0}. Discarding against another store \
         would destroy a key this token's store records; point --config at the daemon's \
         configuration"
    )]
    StoreUnproven(String),
    /// `keys list` or `keys destroy` on a SQLite store that is not there,
    /// or is no lavd store (no schema): made and migrated, it would be an
    /// empty store in which nothing is due, and the retention job would
    /// report success having destroyed nothing (a volume not mounted, a
    /// mistyped path).
    #[error(
        "{0}; only `lavd keys generate`, `lavd serve` and `lavd store migrate --new` make a \
         store: point --config at the daemon's configuration"
    )]
    StoreMissing(String),
    /// `keys discard-orphan` removed a pair while a generation of the same
    /// kid committed it: the store now lists a key whose private half is
    /// gone (never published: the published keys are checked against the
    /// token).
    #[error(
        "escrow key {0:?} was recorded by a generation that ran while its pair was discarded: \
         the store lists it without its private key; destroy it with `lavd keys destroy --kid \
         {0} --force --reason ...` and generate another kid"
    )]
    RecordedWhileDiscarded(String),
    /// Destruction before the end of retention needs `--force --reason`.
    #[error(
        "escrow key {kid:?} is retained until {destroy_after}; destroying it earlier needs --force and --reason"
    )]
    RetentionNotReached {
        /// The key.
        kid: String,
        /// Its retention end.
        destroy_after: String,
    },
    /// `--force` without a reason (the reason goes to the audit log).
    #[error("--force needs a non-empty --reason")]
    ReasonRequired,
    /// A `--reason` outside the rules of a revocation reason
    /// ([`crate::bounds::reason`]): it is stored and printed by `keys list`.
    #[error("--reason {0}")]
    ReasonInvalid(String),
    /// The token holds private key objects of this key that say
    /// `CKA_DESTROYABLE` false, which it would refuse to destroy: nothing
    /// was recorded (a private half so made is refused at look-up, so it
    /// opens nothing).
    #[error(
        "escrow key {kid:?}: {objects} of its private key objects on the token say \
         CKA_DESTROYABLE false, so the token would refuse to destroy them; nothing was \
         recorded: remove them, or make them destroyable, with the token's own tools, then run \
         this again"
    )]
    NotDestroyable {
        /// The key.
        kid: String,
        /// How many private key objects.
        objects: usize,
    },
    /// After destruction the token still reports the private key.
    #[error("escrow key {0:?} is still on the token after destruction")]
    StillPresent(String),
    /// The destruction is recorded and done, but the token held no private
    /// key for it before: the store listed a key the token had lost, or
    /// that was removed outside lavd, while it was retained.
    #[error(
        "escrow key {0}: destroyed and logged, but the token held no private key for it \
         before this destruction: it was removed or lost outside lavd while the store listed \
         it (look at the token's own log; envelopes of it were denied key_destroyed since)"
    )]
    MissingBeforeDestruction(String),
    /// The store marks the key destroyed, the token still holds its
    /// private key, and the signed audit log holds no `key_destroyed` leaf
    /// for it (`why` says what was found): a real destruction commits its
    /// leaf with the mark, so the mark, or the leaf row, was made outside
    /// lavd. The key is left on the token.
    #[error(
        "the store marks escrow key {kid} destroyed, but {why}: its private key is left on \
         the token (a destruction commits its leaf with the mark, so the store was changed \
         outside lavd); investigate, verify the log (lavd audit verify), and put the store's \
         row right"
    )]
    DestructionUnlogged {
        /// The key.
        kid: String,
        /// What the log holds instead.
        why: String,
    },
    /// `keys destroy --expired`: every due key was destroyed, but these
    /// were missing from the token before (each reported before).
    #[error("destroyed, but missing from the token before their destruction: {0}")]
    LostBeforeDestruction(String),
    /// `keys destroy --expired`: these keys were not all destroyed (each
    /// reported before, with its code).
    #[error("could not destroy: {0}")]
    DestroyIncomplete(String),
    /// `keys list --all`: these rows could not be read (each reported
    /// before, with its code).
    #[error("could not read: {0}")]
    ListIncomplete(String),
    /// The audit leaf could not be formed (a bug: inputs were validated).
    #[error("audit leaf: {0}")]
    Audit(String),
    /// The HSM failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The audit log could not be opened or used (to prove a destruction's
    /// leaf): its own code ([`LogError::code`]).
    #[error(transparent)]
    Log(LogError),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl KeyError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::InvalidKid(_) => "invalid_kid",
            KeyError::InvalidDates(_) => "invalid_dates",
            KeyError::DuplicateKid(_) => "duplicate_kid",
            KeyError::UnknownKid(_) => "unknown_key",
            KeyError::OrphanPair(_) => "orphan_key_pair",
            KeyError::Recorded(_) => "key_recorded",
            KeyError::RecordedWhileDiscarded(_) => "key_discarded_while_recorded",
            KeyError::StoreUnproven(_) => "store_unproven",
            KeyError::StoreMissing(_) => "store_missing",
            KeyError::RetentionNotReached { .. } => "retention_not_reached",
            KeyError::ReasonRequired => "reason_required",
            KeyError::ReasonInvalid(_) => "invalid_reason",
            KeyError::StillPresent(_) => "key_still_present",
            KeyError::NotDestroyable { .. } => "key_not_destroyable",
            KeyError::DestructionUnlogged { .. } => "destroy_unlogged",
            KeyError::MissingBeforeDestruction(_) | KeyError::LostBeforeDestruction(_) => {
                "key_missing_before_destruction"
            }
            KeyError::DestroyIncomplete(_) => "destroy_incomplete",
            KeyError::ListIncomplete(_) => "keys_unreadable",
            KeyError::Audit(_) => "internal_error",
            // A PIN refused at a login the command made after its first
            // (a session it opened again) is exit 77 as at its start.
            KeyError::Hsm(e) => e.code(),
            KeyError::Log(e) => e.code(),
            KeyError::Store(_) => "store_unavailable",
        }
    }
}

impl From<StoreError> for KeyError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DuplicateKid(k) => KeyError::DuplicateKid(k),
            StoreError::UnknownKid(k) => KeyError::UnknownKid(k),
            other => KeyError::Store(other),
        }
    }
}

/// Checks a kid's spelling.
///
/// # Errors
/// [`KeyError::InvalidKid`].
pub fn check_kid(kid: &str) -> Result<(), KeyError> {
    // Inside the kid bound every layer uses ([`crate::bounds::kid`]): a
    // portable charset for the keys lavd makes.
    let ok = crate::bounds::kid(kid).is_ok()
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::InvalidKid(kid.to_string()))
    }
}

/// The validity of a new key.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Providers may seal to it from here.
    pub not_before: OffsetDateTime,
    /// Providers stop sealing to it here.
    pub not_after: OffsetDateTime,
    /// The private key is destroyed after this.
    pub destroy_after: OffsetDateTime,
}

/// Generates escrow key `kid` in the HSM and records it, with its
/// `key_generated` audit leaf in the same transaction.
///
/// # Errors
/// [`KeyError::InvalidKid`], [`KeyError::InvalidDates`],
/// [`KeyError::DuplicateKid`], or an HSM/store failure.
pub fn generate(
    hsm: &Hsm,
    store: &(impl KeyStore + AuditStore),
    kid: &str,
    validity: Validity,
    now: OffsetDateTime,
) -> Result<KeyRecord, KeyError> {
    check_kid(kid)?;
    // The store and the `key_generated` leaf keep whole seconds: the dates
    // are checked as they will be kept, or a fraction could pass here and
    // make a leaf that no longer parses (`not_before == not_after`).
    let whole = |t: OffsetDateTime| t.replace_nanosecond(0).unwrap_or(t);
    let validity = Validity {
        not_before: whole(validity.not_before),
        not_after: whole(validity.not_after),
        destroy_after: whole(validity.destroy_after),
    };
    let shown = crate::codec::format_time;
    if validity.not_before >= validity.not_after {
        return Err(KeyError::InvalidDates(format!(
            "not_before {} is not before not_after {}",
            shown(validity.not_before),
            shown(validity.not_after)
        )));
    }
    if validity.not_after > validity.destroy_after {
        return Err(KeyError::InvalidDates(format!(
            "not_after {} is after destroy_after {}",
            shown(validity.not_after),
            shown(validity.destroy_after)
        )));
    }
    if store.get_key(kid)?.is_some() {
        return Err(KeyError::DuplicateKid(kid.to_string()));
    }
    let generated = match hsm.generate_escrow_key(kid) {
        // Read again: another generation of the kid may have committed
        // since the look above.
        Err(HsmError::DuplicateKey(_)) => {
            return Err(match store.get_key(kid)? {
                Some(_) => KeyError::DuplicateKid(kid.to_string()),
                None => KeyError::OrphanPair(kid.to_string()),
            })
        }
        other => other?,
    };
    let record = KeyRecord {
        kid: kid.to_string(),
        public: generated.public.clone(),
        not_before: validity.not_before,
        not_after: validity.not_after,
        destroy_after: validity.destroy_after,
        created_at: now.replace_nanosecond(0).unwrap_or(now),
        destroyed_at: None,
        destroy_reason: None,
    };
    let event: Event = KeyGenerated::new(
        kid,
        record.not_before,
        record.not_after,
        record.destroy_after,
        None,
    )
    .map_err(|e| KeyError::Audit(e.to_string()))?
    .into();
    if let Err(e) = store.append(AuditAppend {
        events: vec![event],
        time: now,
        spend: Spend::InsertKey(record.clone()),
    }) {
        // The pair is on the token: unknown to the store, it would hold the
        // label forever and never be destroyed at retention.
        let label = generated.label();
        let discard = || {
            if let Err(d) = hsm.discard_generated(&generated) {
                tracing::error!(kid, %label, error = %d, "could not delete the key pair the store did not record; delete it (the private key whose public half is not the one `lavd keys list` shows) before generating this kid again");
            }
        };
        if matches!(e, crate::store::StoreError::CommitUnknown(_)) {
            // It may be recorded, or become visible a moment from now: the
            // pair stays (a recorded key without its private half could
            // never open again).
            tracing::error!(kid, %label, error = %e, "whether the store recorded this kid is unknown, so its key pair is kept: if `lavd keys list` does not show it once the store is back, delete the pair by its label before generating this kid again");
            return Err(e.into());
        }
        return match store.get_key(kid) {
            // The commit took effect after all (its outcome was unknown).
            Ok(Some(stored)) if stored.public == record.public => Ok(record),
            Ok(None) => {
                discard();
                Err(e.into())
            }
            // Another generation of this kid, at the same time, was
            // recorded instead: this pair is not the one the store names,
            // and must not stay beside it under the same label (every
            // lookup would be ambiguous, and the destruction at retention
            // would stop at the ambiguity and leave both private keys).
            Ok(Some(_)) => {
                discard();
                Err(KeyError::DuplicateKid(kid.to_string()))
            }
            Err(read) => {
                tracing::error!(kid, %label, error = %read, "the store failed, and whether it recorded this kid cannot be read: if `lavd keys list` does not show it once the store is back, delete the pair by its label before generating this kid again");
                Err(e.into())
            }
        };
    }
    Ok(record)
}

/// Removes from the token the key pair of an escrow key `kid` that the
/// store does not record ([`KeyError::OrphanPair`]): every private and
/// public key object of ours under its label. Returns whether a private key
/// was there; discarding where there is none is not an error, so that it
/// can be run again.
///
/// # Security
/// A pair a stopped generation left was never published (only recorded
/// keys are) and no leaf names it, so nothing was sealed to it and no leaf
/// is written for it. The token cannot tell it from the pair of a key
/// generated after the backup a store was restored from, which was
/// published: the operator's command must only follow a stopped
/// generation. Nothing is removed unless `store` is shown to be the
/// token's: its newest checkpoint verifies under the token's audit key
/// (`log`, built on `store` and `hsm`), else [`KeyError::StoreUnproven`];
/// in another store every kid looks unrecorded. The store is read before and after: a kid
/// it records is refused, and one a generation running at the same time
/// recorded between the two reads is reported (one that commits later is
/// not: it is then a recorded key without its private half, never
/// published, since the published keys are checked against the token).
///
/// # Errors
/// [`KeyError::InvalidKid`], [`KeyError::StoreUnproven`],
/// [`KeyError::Recorded`], [`KeyError::RecordedWhileDiscarded`],
/// [`KeyError::StillPresent`], or an HSM/store failure.
pub fn discard_orphan(
    hsm: &Hsm,
    store: &(impl KeyStore + AuditStore),
    log: &crate::audit::log::AuditLog,
    kid: &str,
) -> Result<bool, KeyError> {
    check_kid(kid)?;
    if store.latest_checkpoint()?.is_none() {
        return Err(KeyError::StoreUnproven(
            "it holds no checkpoint (a store that never served: start `lavd serve` on it once)"
                .into(),
        ));
    }
    if let Some(reason) = log.inconsistency() {
        return Err(KeyError::StoreUnproven(format!(
            "its newest checkpoint does not verify under the token's audit key ({reason})"
        )));
    }
    if store.get_key(kid)?.is_some() {
        return Err(KeyError::Recorded(kid.to_string()));
    }
    // "It held none" only from a session that sees some private key.
    let had_private = finish_destruction(hsm, kid)?;
    if store.get_key(kid)?.is_some() {
        return Err(KeyError::RecordedWhileDiscarded(kid.to_string()));
    }
    Ok(had_private)
}

/// The JWK Set of PROTOCOL §2: the keys providers may seal to now or later
/// (not destroyed, `now < not_after`), with their suite and validity.
///
/// # Security
/// Only for showing what the store holds. What is *published* must come from
/// [`jwks_checked`], which compares each key with the HSM's.
///
/// # Errors
/// A store failure.
pub fn jwks(store: &dyn KeyStore, now: OffsetDateTime) -> Result<JwkSet, KeyError> {
    let keys = usable(store, now)?.iter().map(to_jwk).collect();
    Ok(JwkSet { keys })
}

/// [`jwks`], keeping only the keys whose public half in the store equals the
/// one on the token. A store row edited to publish an attacker's key (so that
/// providers would seal to it) is withheld and logged, never published.
///
/// # Errors
/// A store failure, or an HSM failure other than one key's objects missing,
/// ambiguous or unreadable.
pub fn jwks_checked(
    hsm: &Hsm,
    store: &dyn KeyStore,
    now: OffsetDateTime,
) -> Result<JwkSet, KeyError> {
    let mut keys = Vec::new();
    for record in usable(store, now)? {
        // Read from the store, which lavd does not trust to spell it.
        let kid = crate::codec::escape_for_terminal(&record.kid);
        match hsm.escrow_public_key(&record.kid) {
            Ok(public) if public == record.public => keys.push(record),
            Ok(_) => tracing::error!(
                %kid,
                "the store's public key differs from the HSM's; not publishing it"
            ),
            Err(HsmError::KeyNotFound { .. }) => {
                // A token whose objects cannot be seen at all (a session
                // that lost its login, a token directory gone) finds no
                // key either: that is an unusable HSM, not a key set
                // without this key (`TokenUnreadable`).
                hsm.escrow_private_keys_within_deadline(&record.kid)?;
                tracing::error!(
                    %kid,
                    "the store lists a key the HSM does not hold; not publishing it"
                );
            }
            // What is wrong is this key's objects on the token, not the
            // token: the other keys are still published.
            Err(
                e @ (HsmError::DuplicateKey(_)
                | HsmError::InvalidPublicKey(_)
                | HsmError::KeyPairMismatch(_)
                | HsmError::KeyAttributes { .. }),
            ) => {
                tracing::error!(
                    %kid,
                    error = %e,
                    "the HSM's objects for this key are unusable; not publishing it"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Read again after the token's answers: a destruction that committed
    // meanwhile (its key still on the token until its second step) must
    // not be published, or providers would seal to a key already gone.
    // One read of the rows; one that became unreadable in between is not
    // published either.
    let mut still = std::collections::HashSet::new();
    for (kid, key) in store.list_keys_each()? {
        match key {
            Ok(k) if k.destroyed_at.is_none() => {
                still.insert(kid);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(
                kid = %crate::codec::escape_for_terminal(&kid),
                error = %e,
                "an escrow key's store row cannot be read; not publishing it"
            ),
        }
    }
    let keys = keys
        .iter()
        .filter(|record| still.contains(&record.kid))
        .map(to_jwk)
        .collect();
    Ok(JwkSet { keys })
}

/// The keys to publish: not destroyed, before their `not_after`. A row that
/// cannot be read is logged and not published; the others still are.
fn usable(store: &dyn KeyStore, now: OffsetDateTime) -> Result<Vec<KeyRecord>, KeyError> {
    let mut keys = Vec::new();
    for (kid, key) in store.list_keys_each()? {
        match key {
            Ok(k) if k.destroyed_at.is_none() && now < k.not_after => keys.push(k),
            Ok(_) => {}
            Err(e) => tracing::error!(
                kid = %crate::codec::escape_for_terminal(&kid),
                error = %e,
                "an escrow key's store row cannot be read; not publishing it"
            ),
        }
    }
    Ok(keys)
}

/// The JWK of PROTOCOL §2 for `k`: its public key with `kid`, `use`,
/// `lav_suite` and its sealing window.
pub fn to_jwk(k: &KeyRecord) -> Jwk {
    Jwk {
        kid: Some(k.kid.clone()),
        use_: Some("enc".into()),
        lav_suite: Some(LAV_SUITE.into()),
        not_before: Some(format_time(k.not_before)),
        not_after: Some(format_time(k.not_after)),
        ..k.public.to_jwk()
    }
}

/// Why a key is being destroyed.
#[derive(Debug, Clone)]
pub enum DestroyReason {
    /// Its retention ended.
    Retention,
    /// An operator forces it, with a reason: before the end of retention,
    /// or after it (then logged as a retention destruction).
    Forced(String),
}

/// What [`destroy`] did.
#[derive(Debug)]
pub struct Destroyed {
    /// The key's row, destroyed.
    pub record: KeyRecord,
    /// This destruction found the key live in the store but no private key
    /// for it on the token (looked for on a fresh, logged-in session): it
    /// was lost or removed outside lavd before. The destruction is recorded
    /// and done all the same; the caller reports
    /// [`KeyError::MissingBeforeDestruction`]. False when the store already
    /// said destroyed (an interrupted destruction finished).
    pub missing_before: bool,
    /// The store said destroyed before this run (an earlier destruction,
    /// another replica's, or an interrupted one this run finished on the
    /// token): the row's time and reason are that destruction's, not this
    /// run's.
    pub already: bool,
}

/// Destroys escrow key `kid`: marks it destroyed in the store (final, with
/// its `key_destroyed` audit leaf in the same transaction), deletes
/// both halves from the token, and checks with a fresh session that the
/// private key is gone. Before, it looks whether the token holds the
/// private key at all ([`Destroyed::missing_before`]). A key the store
/// already marks destroyed is finished on the token as
/// [`finish_recorded_destruction`] does (`open_log` is called only then).
///
/// # Errors
/// [`KeyError::UnknownKid`], [`KeyError::RetentionNotReached`],
/// [`KeyError::ReasonRequired`], [`KeyError::ReasonInvalid`],
/// [`KeyError::NotDestroyable`], [`KeyError::StillPresent`],
/// [`KeyError::DestructionUnlogged`], or an HSM/store failure.
pub fn destroy(
    hsm: &Hsm,
    store: &(impl KeyStore + AuditStore),
    open_log: OpenLog<'_>,
    kid: &str,
    reason: DestroyReason,
    now: OffsetDateTime,
) -> Result<Destroyed, KeyError> {
    let record = store
        .get_key(kid)?
        .ok_or_else(|| KeyError::UnknownKid(kid.to_string()))?;
    let reason = match reason {
        DestroyReason::Retention if now <= record.destroy_after => {
            return Err(KeyError::RetentionNotReached {
                kid: kid.to_string(),
                destroy_after: format_time(record.destroy_after),
            })
        }
        DestroyReason::Retention => "retention".to_string(),
        DestroyReason::Forced(r) if r.trim().is_empty() => return Err(KeyError::ReasonRequired),
        DestroyReason::Forced(r) => {
            // A control character or a bidirectional control would forge
            // lines or reorder text where the reason is listed.
            crate::bounds::reason(&r).map_err(|e| KeyError::ReasonInvalid(e.to_string()))?;
            format!("forced: {}", r.trim())
        }
    };
    // The leaf's `forced` means "destroyed before its destroy_after": a
    // `--force` after that date is a retention destruction in the log (the
    // operator's text stays in the store row).
    let forced = now < record.destroy_after;
    let code = if forced { "forced" } else { "retention" };
    let mut missing_before = false;
    // Whether this run wrote the mark and its leaf.
    let mut marked_here = false;
    if record.destroyed_at.is_none() {
        // On a fresh session that logs in, so a session that silently lost
        // its login cannot make an intact key look absent.
        missing_before = hsm.escrow_private_keys(kid)? == 0;
        // A key the token would refuse to destroy is refused here, before
        // anything is recorded: the log must not say destroyed a key that
        // stays on the token.
        let kept = hsm.escrow_key_objects_not_destroyable(kid)?;
        if kept > 0 {
            return Err(KeyError::NotDestroyable {
                kid: kid.to_string(),
                objects: kept,
            });
        }
        let event: Event = KeyDestroyed::new(kid, code, forced, None)
            .map_err(|e| KeyError::Audit(e.to_string()))?
            .into();
        match store.append(AuditAppend {
            events: vec![event],
            time: now,
            spend: Spend::DestroyKey {
                kid: kid.to_string(),
                at: now,
                reason,
            },
        }) {
            Ok(_) => marked_here = true,
            // Another destruction (another replica's retention job) was
            // recorded first, with its own leaf: finished on the token
            // below once that leaf is found in the log, as an interrupted
            // one is (the mark may also have been made by hand, with no
            // leaf). It may have taken the key from the token after the
            // look above: not a loss.
            Err(StoreError::KeyAlreadyDestroyed(_)) => missing_before = false,
            Err(e) => return Err(e.into()),
        }
    }
    if marked_here {
        finish_destruction(hsm, kid)?;
    } else {
        // The store already says destroyed: finishes an interrupted
        // destruction on the token, if the log holds its leaf.
        finish_recorded_destruction(hsm, open_log, kid)?;
    }
    let record = store
        .get_key(kid)?
        .ok_or_else(|| KeyError::UnknownKid(kid.to_string()))?;
    Ok(Destroyed {
        record,
        missing_before,
        already: !marked_here,
    })
}

/// Takes escrow key `kid` off the token (every key object under its label:
/// idempotent, so it also finishes an interrupted destruction) and checks,
/// on a fresh session, that no private key is left. Returns whether one was
/// there. "Nothing there" is believed only from a session that sees some
/// private key of ours (`CKA_PRIVATE`; a lavd token always holds at least
/// the audit key, though this does not ask for it by name): a token whose
/// objects cannot be read finds nothing to destroy and nothing left, and a
/// key still on it would be reported destroyed.
///
/// # Errors
/// [`KeyError::StillPresent`]; [`HsmError::TokenUnreadable`] (as
/// [`KeyError::Hsm`]) when nothing was found and the session sees no
/// private key at all; the failing PKCS#11 call.
pub fn finish_destruction(hsm: &Hsm, kid: &str) -> Result<bool, KeyError> {
    let had = hsm.destroy_escrow_key(kid)?;
    let left = if had {
        usize::from(hsm.escrow_key_present(kid)?)
    } else {
        hsm.escrow_private_keys(kid)?
    };
    if left > 0 {
        return Err(KeyError::StillPresent(kid.to_string()));
    }
    Ok(had)
}

/// Opens the audit log, when a destruction must be proved in it: only
/// then, so that the other paths need neither the audit key nor a log that
/// verifies.
pub type OpenLog<'a> = &'a dyn Fn() -> Result<AuditLog, LogError>;

/// Finishes on the token the destruction of escrow key `kid`, which the
/// store already marks destroyed (an interrupted destruction: the mark and
/// its leaf committed, the token not yet done), as [`finish_destruction`].
/// While the token still holds the private key, only if the signed audit
/// log holds a `key_destroyed` leaf for it ([`destruction_logged`]): a
/// mark made in the store by hand (with or without a leaf row beside it)
/// must not delete a key for good, before its retention perhaps, with
/// nothing in the log.
///
/// # Errors
/// [`KeyError::DestructionUnlogged`]; as [`finish_destruction`] and
/// [`destruction_logged`].
pub fn finish_recorded_destruction(
    hsm: &Hsm,
    open_log: OpenLog<'_>,
    kid: &str,
) -> Result<bool, KeyError> {
    if hsm.escrow_private_keys(kid)? > 0 {
        destruction_logged(&open_log().map_err(KeyError::Log)?, kid)?;
    }
    finish_destruction(hsm, kid)
}

/// Checks that the audit log holds a `key_destroyed` leaf for `kid` under a
/// checkpoint signed with the audit key ([`AuditLog::prove_leaf`]: one
/// covering it is signed if none does yet). The leaf is looked for from the
/// newest back (an interrupted destruction's is among the last); a leaf
/// that does not parse is not one.
///
/// # Errors
/// [`KeyError::DestructionUnlogged`] when there is none, or when the leaf
/// row found is not the signed tree's; [`KeyError::Log`] when the log is
/// inconsistent already, or cannot sign; a store failure.
pub fn destruction_logged(log: &AuditLog, kid: &str) -> Result<(), KeyError> {
    const PAGE: u64 = 4096;
    let unlogged = |why: String| KeyError::DestructionUnlogged {
        kid: kid.to_string(),
        why,
    };
    if let Some(reason) = log.inconsistency() {
        return Err(KeyError::Log(LogError::Inconsistent(reason.to_string())));
    }
    let store = log.store();
    let mut end = store.tree_size()?;
    while end > 0 {
        let start = end.saturating_sub(PAGE);
        for (index, bytes) in store.leaves(start, end)?.into_iter().rev() {
            // Most leaves are unwraps: skip them before parsing.
            if !bytes.windows(13).any(|w| w == b"key_destroyed") {
                continue;
            }
            let Ok(leaf) = crate::audit::leaf::Leaf::parse(&bytes) else {
                continue;
            };
            if !matches!(&leaf.event, Event::KeyDestroyed(d) if d.kid() == kid) {
                continue;
            }
            return match log.prove_leaf(index, &bytes) {
                Ok(LeafProof::Included) => Ok(()),
                Ok(LeafProof::NotInTree) => Err(unlogged(format!(
                    "its key_destroyed leaf {index} is not proved in the signed log: {}",
                    log.inconsistency().unwrap_or("the inclusion proof failed")
                ))),
                Err(e) => Err(KeyError::Log(e)),
            };
        }
        end = start;
    }
    Err(unlogged(
        "the audit log holds no key_destroyed leaf for it".into(),
    ))
}

/// What [`due_for_destruction`] finds.
#[derive(Debug, Default)]
pub struct Due {
    /// Keys whose retention has ended and that are not destroyed yet.
    pub keys: Vec<KeyRecord>,
    /// With their kids, the rows that cannot be read: whether they are due
    /// is not known (the caller reports them and fails).
    pub unreadable: Vec<(String, StoreError)>,
}

/// Keys whose retention has ended and that are not destroyed yet, and the
/// rows that cannot be read, apart: one damaged row does not keep every
/// other key past its retention.
///
/// # Errors
/// A store failure reading the table.
pub fn due_for_destruction(store: &dyn KeyStore, now: OffsetDateTime) -> Result<Due, KeyError> {
    let mut due = Due::default();
    for (kid, key) in store.list_keys_each()? {
        match key {
            Ok(k) if k.destroyed_at.is_none() && now > k.destroy_after => due.keys.push(k),
            Ok(_) => {}
            Err(e) => due.unreadable.push((kid, e)),
        }
    }
    Ok(due)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair whose halves disagree is named as such, not as an HSM that
    /// is unavailable.
    #[test]
    fn a_pair_whose_halves_disagree_has_its_own_code() {
        let e = KeyError::Hsm(HsmError::KeyPairMismatch("lav-escrow:2026-12".into()));
        assert_eq!(e.code(), "key_pair_mismatch");
        assert_eq!(
            KeyError::Hsm(HsmError::Wrapper("gone".into())).code(),
            "hsm_unavailable"
        );
    }

    #[test]
    fn kid_spelling() {
        assert!(check_kid("2026-12").is_ok());
        assert!(check_kid(&"k".repeat(crate::bounds::MAX_KID_BYTES)).is_ok());
        assert!(check_kid("a.b_c-1").is_ok());
        for bad in ["", "a b", "ä", "x/y", &"k".repeat(65)] {
            assert_eq!(check_kid(bad).unwrap_err().code(), "invalid_kid", "{bad}");
        }
    }
}
