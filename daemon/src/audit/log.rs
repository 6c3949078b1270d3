//! The running audit log: the store's durable leaves plus checkpoints signed
//! in the HSM. This is what the daemon and the `lavd audit` commands use;
//! the rest of [`crate::audit`] is storage- and HSM-independent.
//!
//! A checkpoint is handed out, saved or logged only once the leaves it
//! covers are durable. Its signature, though, is started before: the caller
//! that commits an append transaction (group commit), if no other signer is
//! busy, proves the uncommitted tree consistent inside that transaction and
//! hands the HSM signature to an HSM worker, then commits; the signature
//! and the commit's fsync run at the same time, and the note is kept only if
//! both succeed (see [`AuditLog::append`]). Otherwise checkpoints are signed
//! after the commit and outside the store lock. Concurrent callers share
//! signatures: a caller whose leaves are already covered by the newest
//! checkpoint reuses it.
//!
//! The log does not sign whatever tree head the store presents. At open it
//! verifies the newest stored checkpoint's signature and proves the stored
//! tree consistent with it; before each new checkpoint it proves the tree
//! consistent with the last checkpoint this process signed (an RFC 6962
//! consistency proof read from the stored subtree hashes, checked with
//! [`super::merkle::verify_consistency`]: one proof per checkpoint), and each
//! append must land at or beyond the largest tree size already seen (so a
//! truncation refilled to the old size is not "covered" by the old
//! checkpoint unproved). A failure
//! means the database was truncated or rewritten behind the daemon's back:
//! the log turns [inconsistent](AuditLog::inconsistency) for the rest of the
//! process's life, logs an ERROR naming both sizes and signs nothing more.
//! What this does not detect is in `docs/THREAT_MODEL.md`.
//!
//! With several replicas on one PostgreSQL store, the in-memory state here
//! (the last checkpoint this process signed, the largest size it saw) stays
//! valid: the shared tree only grows, so another replica's appends never
//! invalidate it; they only make a later checkpoint necessary, which is
//! proved consistent with this process's last one like any other. Tree sizes
//! and indices always come from the store, inside its transactions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};

use time::OffsetDateTime;

use super::export::{Export, ExportEntry};
use super::leaf::Event;
use super::merkle::{self, Hash};
use super::note::{self, Checkpoint};
use crate::hsm::{Hsm, HsmError, PendingCall};
use crate::jwk::Ed25519PublicKey;
use crate::store::{Appended, AuditAppend, AuditStore, StoreError, Uncommitted, Vouched};

/// A log operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The store failed (or refused the batch's spend).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HSM could not sign a checkpoint, or has no audit key.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// A checkpoint could not be formed or failed its self-check: the HSM
    /// returned a signature that does not verify under the audit key.
    #[error("checkpoint signing: {0}")]
    Sign(String),
    /// The stored tree is not an extension of the last checkpoint this log
    /// signed, or of the newest checkpoint in the store: leaves or subtree
    /// hashes were removed or rewritten behind the daemon's back (or the
    /// stored checkpoint does not verify under the audit key). Nothing is
    /// signed until an operator has investigated and restarted the daemon.
    #[error("the audit log is inconsistent: {0}")]
    Inconsistent(String),
}

impl LogError {
    /// The stable error code, as the command line prints it.
    pub fn code(&self) -> &'static str {
        match self {
            LogError::Store(_) => "store_unavailable",
            LogError::Inconsistent(_) => "log_inconsistent",
            LogError::Hsm(HsmError::KeyNotFound { kind: "audit", .. }) => "no_audit_key",
            LogError::Hsm(h) => h.code(),
            LogError::Sign(_) => "hsm_unavailable",
        }
    }
}

/// What [`AuditLog::prove_leaf`] found of a leaf.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafProof {
    /// The leaf is in a tree signed with the audit key.
    Included,
    /// It is not the leaf the subtree hashes hold (the log is now
    /// inconsistent, saying why).
    NotInTree,
}

/// The newest checkpoint this log has signed or verified: the tree every
/// later one must extend.
#[derive(Debug, Clone)]
struct Signed {
    size: u64,
    root: Hash,
    note: String,
}

/// Where a batch landed, and a signed checkpoint that includes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Where the leaves are.
    pub appended: Appended,
    /// A C2SP checkpoint of a tree that contains them.
    pub checkpoint: String,
}

/// The audit log of one daemon.
#[derive(Debug, Clone)]
pub struct AuditLog {
    store: Arc<dyn AuditStore>,
    hsm: Hsm,
    key_label: String,
    public: Ed25519PublicKey,
    origin: String,
    latest: Arc<Mutex<Option<Signed>>>,
    /// Set once, on the first inconsistency found; never cleared.
    inconsistent: Arc<OnceLock<String>>,
    /// The largest tree size this process has seen the store hold; the
    /// store's tree never shrinks.
    seen: Arc<AtomicU64>,
    /// The largest tree size an append of this process was acknowledged
    /// at: every leaf below it committed before that acknowledged commit,
    /// so it is on the synchronous standbys ([`AuditStore::replicated`]
    /// has nothing to add for a tree no larger).
    acked: Arc<AtomicU64>,
    commit_timer: Option<CommitTimer>,
    /// Told the size of every checkpoint this process signs (the witness
    /// submitters).
    on_signed: Option<SignedHook>,
    /// Signatures started inside an append transaction, kept or not.
    overlapped: Arc<AtomicU64>,
    /// Leaves written after their own append failed ([`Self::append_later`]).
    deferred: Arc<Deferred>,
}

/// Batches of leaves waiting for the store, and the thread that writes them.
#[derive(Debug, Default)]
struct Deferred {
    /// The batches not yet written, oldest first; the leaves they hold.
    queue: Mutex<(std::collections::VecDeque<AuditAppend>, usize)>,
    wake: std::sync::Condvar,
    /// The writer thread, while it runs.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The orphaned intents' sweeper ([`AuditLog::start_intent_sweeper`]),
    /// and what wakes it to stop.
    sweeper: Mutex<Option<std::thread::JoinHandle<()>>>,
    sweeper_wake: std::sync::Condvar,
    /// Set by [`AuditLog::stop_deferred`]: the writer ends, and with it its
    /// handle on the log and the HSM (whose workers end only then).
    stop: std::sync::atomic::AtomicBool,
}

/// A checkpoint signature started inside an append transaction, before its
/// COMMIT, by [`AuditLog::start_signing`]; and the `latest` lock taken for
/// it, held until the append has returned.
struct Overlap<'log> {
    latest: Option<MutexGuard<'log, Option<Signed>>>,
    signing: Option<Signing>,
}

/// A signature under way on an HSM worker: the tree size and root signed,
/// and the call.
struct Signing {
    size: u64,
    root: Hash,
    signature: PendingCall<(String, Vec<u8>), [u8; 64]>,
}

/// Receives the duration of every durable append, in seconds (the daemon's
/// `lavd_store_commit_duration_seconds`).
#[derive(Clone)]
struct CommitTimer(Arc<dyn Fn(f64) + Send + Sync>);

impl std::fmt::Debug for CommitTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitTimer")
    }
}

/// Receives the tree size of every checkpoint signed.
#[derive(Clone)]
struct SignedHook(Arc<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for SignedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignedHook")
    }
}

impl AuditLog {
    /// Opens the log with the HSM's audit key `key_label`, and checks the
    /// store against its newest checkpoint: the signature verifies under the
    /// audit key, and the stored tree is consistent with it. A log that fails
    /// this check still opens (so that it can be exported and examined) but
    /// is [inconsistent](Self::inconsistency) and signs nothing.
    ///
    /// # Errors
    /// [`LogError::Hsm`] if the audit key is missing; [`LogError::Store`]
    /// when the store cannot be read at all.
    pub fn new(
        store: Arc<dyn AuditStore>,
        hsm: Hsm,
        key_label: &str,
        origin: &str,
    ) -> Result<Self, LogError> {
        let public = hsm.audit_key(key_label)?.public;
        let log = AuditLog {
            store,
            hsm,
            key_label: key_label.to_string(),
            public,
            origin: origin.to_string(),
            latest: Arc::new(Mutex::new(None)),
            inconsistent: Arc::new(OnceLock::new()),
            seen: Arc::new(AtomicU64::new(0)),
            acked: Arc::new(AtomicU64::new(0)),
            commit_timer: None,
            on_signed: None,
            overlapped: Arc::new(AtomicU64::new(0)),
            deferred: Arc::new(Deferred::default()),
        };
        if let Some((size, note)) = log.store.latest_checkpoint()? {
            let signed = match log.verify_stored(size, &note) {
                Ok(signed) => signed,
                Err(LogError::Inconsistent(reason)) => {
                    return Ok(log.mark_inconsistent(reason));
                }
                Err(e) => return Err(e),
            };
            let tree = log.store.tree_size()?;
            log.seen.fetch_max(tree, Ordering::SeqCst);
            match log.prove_extends(&signed, tree) {
                Ok(_) => {}
                Err(LogError::Inconsistent(reason)) => return Ok(log.mark_inconsistent(reason)),
                Err(e) => return Err(e),
            }
            *log.latest
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(signed);
        }
        Ok(log)
    }

    /// The origin the store's newest checkpoint was signed under, when it
    /// is not `configured` and the checkpoint does verify under it with this
    /// log's audit key: the configuration changed `audit.origin` (or
    /// `audit.key_label`'s key signs another log), which no checkpoint can
    /// follow, since the origin is part of what every signature covers.
    /// `None` when the origins agree, when there is no checkpoint yet, or
    /// when it verifies under neither (that is [`Self::inconsistency`]'s to
    /// report).
    pub fn origin_changed(&self) -> Result<Option<String>, LogError> {
        Ok(self
            .store
            .latest_checkpoint()?
            .and_then(|(_, note)| self.signed_under_another_origin(&note)))
    }

    /// The origin `note` names, if it is not this log's and `note` verifies
    /// under it with this log's audit key.
    fn signed_under_another_origin(&self, note: &str) -> Option<String> {
        let stored = note.split('\n').next().unwrap_or_default();
        if stored == self.origin {
            return None;
        }
        let key = note::VerifierKey::new(stored, self.public.bytes()).ok()?;
        note::verify_checkpoint(note, &key)
            .ok()
            .map(|_| stored.to_string())
    }

    /// Why the log is inconsistent, once it is: the daemon then refuses
    /// unwraps (503 `log_inconsistent`) and `/readyz` is false.
    pub fn inconsistency(&self) -> Option<&str> {
        self.inconsistent.get().map(String::as_str)
    }

    /// Records the first inconsistency and logs it.
    fn mark_inconsistent(self, reason: String) -> Self {
        self.record_inconsistency(reason);
        self
    }

    fn record_inconsistency(&self, reason: String) -> LogError {
        if self.inconsistent.set(reason.clone()).is_ok() {
            tracing::error!(
                "audit log inconsistent: {reason}; no checkpoint will be signed and no key \
                 released until an operator has investigated (lavd audit export | lavd audit \
                 verify) and started lavd again (a daemon keeps refusing until restarted)"
            );
        }
        LogError::Inconsistent(reason)
    }

    /// Checks that `note`, a stored checkpoint about to be served with its
    /// witnesses' cosignatures ([`crate::audit::witnessing::Witnessing::served`]),
    /// carries a valid signature by the audit key; one that does not (a
    /// row edited behind lavd's back) marks the log inconsistent, as
    /// [`Self::latest_signed`] does. Returns the checkpoint it states.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`].
    pub fn check_served(&self, note: &str) -> Result<note::Checkpoint, LogError> {
        if let Some(reason) = self.inconsistency() {
            return Err(LogError::Inconsistent(reason.to_string()));
        }
        let key = note::VerifierKey::new(&self.origin, self.public.bytes())
            .map_err(|e| LogError::Sign(e.to_string()))?;
        match note::verify_checkpoint(note, &key) {
            Ok(checkpoint) => Ok(checkpoint),
            Err(e) => Err(self.record_inconsistency(format!(
                "a stored checkpoint with witness cosignatures does not verify under the audit \
                 key: {e}"
            ))),
        }
    }

    /// The newest stored checkpoint's size and root, checked as
    /// [`Self::latest_signed`] checks it; `None` while none is stored.
    ///
    /// # Errors
    /// As [`Self::latest_signed`], but none for a log with no checkpoint.
    pub fn latest_signed_head(&self) -> Result<Option<(u64, Hash)>, LogError> {
        Ok(self
            .latest_verified()?
            .map(|signed| (signed.size, signed.root)))
    }

    /// Checks a tile's nodes against a signed tree head `(size, root)`
    /// ([`Self::latest_signed_head`]), before the tile is served as
    /// immutable: `hashes`, the nodes of tree level `level` from index
    /// `first` (an entry bundle's: its leaves' hashes, level 0), must give
    /// `root` when the root is computed through them
    /// ([`AuditStore::root_through`], one store read). Nodes that do not,
    /// the tile's or the stored ones read with them, are the store's tree
    /// rewritten behind lavd (a row edited where no root the signer
    /// computes would notice): the log is marked inconsistent, as for a
    /// checkpoint row that does not verify.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`]; the store's error.
    pub fn check_tile(
        &self,
        (size, root): (u64, Hash),
        level: u8,
        first: u64,
        hashes: &[Hash],
    ) -> Result<(), LogError> {
        let end = first.saturating_add(hashes.len() as u64);
        let through = self
            .store
            .root_through(size, level, first, hashes)
            .map_err(|e| self.covered_read_failed(size, e))?;
        if through != root {
            return Err(self.record_inconsistency(format!(
                "the stored tree (the nodes {first}..{end} of level {level} a tile is made of, or \
                 the nodes read with them) does not give the root of the signed checkpoint of \
                 size {size}: a node row edited behind lavd"
            )));
        }
        Ok(())
    }

    /// A tile's node rows of tree level `level` from index `first`
    /// (`width` of them), as read with how far the read vouches for them
    /// ([`AuditStore::node_rows_vouched`]), for a tile that needs a tree of
    /// `needed` leaves (`Tile::needs_tree_size`: the last of its subtrees
    /// is complete there), which the signed checkpoint of `size` covers:
    /// the hashes the tile is made of.
    ///
    /// Found otherwise, the store was changed behind lavd, and the log is
    /// marked inconsistent: a row that is not 32 bytes (rows are written
    /// whole: no read that is behind shows one; looked for first), or a row
    /// missing where the same read vouched for every row the tile needs (on SQLite always;
    /// on PostgreSQL when the head its snapshot counts reaches `needed`). A
    /// row missing beyond what the read vouched for is only the store's
    /// error (503 `store_unavailable`): a read on a standby that has not
    /// replayed it yet looks the same.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`]; [`StoreError::Corrupt`] for missing
    /// rows not vouched for.
    pub fn check_nodes(
        &self,
        (size, needed): (u64, u64),
        level: u8,
        first: u64,
        width: u16,
        (rows, vouched): (&[(u64, Vec<u8>)], Vouched),
    ) -> Result<Vec<Hash>, LogError> {
        let end = first.saturating_add(u64::from(width));
        let mut hashes = Vec::with_capacity(rows.len());
        for (index, bytes) in rows {
            let Ok(hash) = Hash::try_from(bytes.as_slice()) else {
                return Err(self.record_inconsistency(format!(
                    "the stored node ({level}, {index}), which the signed checkpoint of size \
                     {size} covers, is {} bytes, not a hash: a node row edited behind lavd",
                    bytes.len()
                )));
            };
            hashes.push(hash);
        }
        let all_there = rows.len() == usize::from(width)
            && rows
                .iter()
                .zip(first..)
                .all(|((index, _), want)| *index == want);
        if all_there {
            return Ok(hashes);
        }
        if vouched.covers(needed) {
            return Err(self.record_inconsistency(format!(
                "the stored nodes {first}..{end} of level {level}, which the signed checkpoint of \
                 size {size} covers and the store counts, are not all there: a node row deleted \
                 behind lavd"
            )));
        }
        Err(LogError::Store(StoreError::Corrupt {
            store: "audit_nodes".into(),
            what: format!(
                "the nodes {first}..{end} of level {level}, which the signed checkpoint of size \
                 {size} covers, are not all there (read on a standby that has not replayed them, \
                 or deleted behind lavd)"
            ),
        }))
    }

    /// An entry bundle's stored `rows` and their level-0 `hashes`, read
    /// for a tile of `width` leaves from `first` that the signed
    /// checkpoint `head` covers, must be exactly those leaves, each
    /// matching its hash, and the hashes must give the checkpoint's root
    /// ([`Self::check_tile`]).
    ///
    /// Found otherwise, the store was changed behind lavd, and the log is
    /// marked inconsistent, as for an edited node row: a row there that is
    /// not the leaf hashed (rows are never rewritten), or a row missing
    /// where the same read vouched for every row (`vouched`: on SQLite
    /// always; on PostgreSQL below the head its snapshot counts). A row
    /// missing beyond what the read vouched for is only the store's error
    /// (503 `store_unavailable`): a read on a standby that has not
    /// replayed it yet looks the same.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`]; [`StoreError::Corrupt`] for missing
    /// rows not vouched for; the store's error.
    pub fn check_bundle(
        &self,
        head: (u64, Hash),
        first: u64,
        width: u16,
        (rows, vouched): (&[(u64, Vec<u8>)], Vouched),
        hashes: &[Hash],
    ) -> Result<(), LogError> {
        let end = first + u64::from(width);
        let all_there = rows.len() == usize::from(width)
            && hashes.len() == rows.len()
            && rows
                .iter()
                .zip(first..)
                .all(|((index, _), want)| *index == want);
        if !all_there && vouched.covers(end) {
            return Err(self.record_inconsistency(format!(
                "the stored leaves {first}..{end}, which the signed checkpoint of size {} covers \
                 and the store counts, are not all there: a leaf row deleted behind lavd",
                head.0
            )));
        }
        if !all_there {
            return Err(LogError::Store(StoreError::Corrupt {
                store: "audit_leaves".into(),
                what: format!(
                    "the leaves {first}..{end}, which the signed checkpoint of size {} covers, \
                     are not all there (read on a standby that has not replayed them, or deleted \
                     behind lavd)",
                    head.0
                ),
            }));
        }
        if let Some(((index, _), _)) = rows
            .iter()
            .zip(hashes)
            .find(|((_, leaf), hash)| merkle::leaf_hash(leaf) != **hash)
        {
            return Err(self.record_inconsistency(format!(
                "the stored leaf {index}, which the signed checkpoint of size {} covers, does not \
                 match the tree's hash of it: a leaf row edited behind lavd",
                head.0
            )));
        }
        self.check_tile(head, 0, first, hashes)
    }

    /// What a failed read of the stored tree, for a tile the signed
    /// checkpoint of `size` covers, is. A row missing or malformed
    /// ([`StoreError::Corrupt`]), or fewer leaves than signed
    /// ([`StoreError::BadProofRequest`] from the store, which would blame
    /// the client): on a store whose reads are never behind
    /// ([`AuditStore::reads_never_behind`], SQLite) the store changed
    /// behind lavd, and the log is marked inconsistent; on PostgreSQL a
    /// read on a standby that has not replayed the rows looks the same, so
    /// it is the store's error (503 `store_unavailable`; a deleted leaf is
    /// found by its entry bundle, [`Self::check_bundle`]). Any other error
    /// is the store's as it is.
    pub fn covered_read_failed(&self, size: u64, e: StoreError) -> LogError {
        match e {
            StoreError::Corrupt { .. } | StoreError::BadProofRequest(_)
                if self.store.reads_never_behind() =>
            {
                self.record_inconsistency(format!(
                    "the stored tree cannot be read as the signed checkpoint of size {size} \
                     covers it: {e}"
                ))
            }
            StoreError::BadProofRequest(m) => LogError::Store(StoreError::Corrupt {
                store: "audit_nodes".into(),
                what: format!(
                    "the stored tree has fewer leaves than the signed checkpoint of size {size} \
                     covers (read on a standby that has not replayed them, or deleted behind \
                     lavd): {m}"
                ),
            }),
            other => LogError::Store(other),
        }
    }

    /// The stored checkpoint `note` of tree size `size`, verified under the
    /// audit key.
    fn verify_stored(&self, size: u64, note: &str) -> Result<Signed, LogError> {
        let key = note::VerifierKey::new(&self.origin, self.public.bytes())
            .map_err(|e| LogError::Sign(e.to_string()))?;
        let checkpoint = note::verify_checkpoint(note, &key).map_err(|e| {
            LogError::Inconsistent(match self.signed_under_another_origin(note) {
                // Not tampering: the configuration names another origin.
                Some(stored) => format!(
                    "the stored checkpoints are signed under the origin {stored:?}, and \
                     audit.origin is {:?}; a log's origin is fixed at its first checkpoint: \
                     set audit.origin = {stored:?}",
                    self.origin
                ),
                None => format!(
                    "the newest stored checkpoint (size {size}) does not verify under the \
                     audit key: {e}"
                ),
            })
        })?;
        if checkpoint.size != size {
            return Err(LogError::Inconsistent(format!(
                "the newest stored checkpoint is filed under size {size} but says size {}",
                checkpoint.size
            )));
        }
        Ok(Signed {
            size,
            root: checkpoint.root,
            note: note.to_string(),
        })
    }

    /// Proves that the stored tree of `tree` leaves extends `signed`, and
    /// returns its root. The proof comes from the store's subtree hashes and
    /// is checked with our own verifier.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`] (already recorded) naming both sizes;
    /// [`LogError::Store`] for a store that cannot be read.
    fn prove_extends(&self, signed: &Signed, tree: u64) -> Result<Hash, LogError> {
        self.check_extends(
            signed,
            tree,
            || self.store.root(tree),
            || self.store.consistency_proof(signed.size, tree),
        )
    }

    /// [`Self::prove_extends`] with the new tree's root and the proof read
    /// by `root` and `proof` (from the store, or inside a transaction).
    fn check_extends(
        &self,
        signed: &Signed,
        tree: u64,
        root: impl FnOnce() -> Result<Hash, StoreError>,
        proof: impl FnOnce() -> Result<Vec<Hash>, StoreError>,
    ) -> Result<Hash, LogError> {
        let (old, new) = (signed.size, tree);
        let broken = |what: String| {
            self.record_inconsistency(format!(
                "the stored tree of size {new} does not extend the checkpoint of size {old}: {what}"
            ))
        };
        if new < old {
            return Err(broken("it has fewer leaves".into()));
        }
        // Missing or malformed subtree hashes, or a size the store no
        // longer has, are the same finding: the tree was changed under us.
        let read = |e: StoreError| match e {
            StoreError::Corrupt { .. } | StoreError::BadProofRequest(_) => broken(e.to_string()),
            other => LogError::Store(other),
        };
        let root = root().map_err(read)?;
        let proof = proof().map_err(read)?;
        merkle::verify_consistency(old, new, &signed.root, &root, &proof)
            .map_err(|e| broken(format!("consistency proof: {e}")))?;
        Ok(root)
    }

    /// Reports how long each durable append took (group commit included).
    #[must_use]
    pub fn with_commit_timer(mut self, timer: Arc<dyn Fn(f64) + Send + Sync>) -> Self {
        self.commit_timer = Some(CommitTimer(timer));
        self
    }

    /// Tells `hook` the tree size of every checkpoint this log signs, once
    /// it is stored (the witness submitters wait on it).
    #[must_use]
    pub fn with_signed_hook(mut self, hook: Arc<dyn Fn(u64) + Send + Sync>) -> Self {
        self.on_signed = Some(SignedHook(hook));
        self
    }

    /// The signed-note verifier key (`<origin>+<key id>+<base64 key>`).
    ///
    /// # Errors
    /// [`LogError::Sign`] if the origin is not a valid key name.
    pub fn verifier_key(&self) -> Result<String, LogError> {
        note::verifier_key(&self.origin, self.public.bytes())
            .map_err(|e| LogError::Sign(e.to_string()))
    }

    /// Checks, with a fresh search of the token (not the handle cache), that
    /// the token still holds this log's signing key. A token whose object
    /// store is gone (a network HSM's partition lost, a SoftHSM token
    /// directory removed) can keep answering session calls and even signing
    /// with handles it already knows while finding no key at all, so a
    /// logged-in session alone does not prove the token is usable.
    ///
    /// # Errors
    /// [`HsmError::KeyNotFound`] when the key is not found,
    /// [`HsmError::KeyReplaced`] when another key carries its label, or the
    /// failing PKCS#11 call.
    pub fn key_on_token(&self) -> Result<(), HsmError> {
        let found = self.hsm.audit_key(&self.key_label)?;
        if found.public == self.public {
            Ok(())
        } else {
            Err(HsmError::KeyReplaced(self.key_label.clone()))
        }
    }

    /// The log's origin.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The store behind the log.
    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// Appends durably, then returns a checkpoint that covers the batch.
    ///
    /// # Errors
    /// [`LogError::Store`] (nothing was appended) or, after the leaves are
    /// durable, [`LogError::Hsm`]/[`LogError::Sign`] if no checkpoint could
    /// be signed: the leaves stay in the log, and the caller must not
    /// release anything that needed the checkpoint.
    ///
    /// The leaves are written even when the log is inconsistent (they are
    /// the best record there is), but no checkpoint is then signed:
    /// [`LogError::Inconsistent`].
    ///
    /// # Security
    /// The checkpoint may have been signed while the leaves were being
    /// committed (see [`Self::start_signing`]): it is returned and saved
    /// only after the store has said the commit succeeded, with the tree
    /// the signature covers. A signature over a tree whose commit failed
    /// stays inside this call and is dropped: never saved, returned, served
    /// or logged (signing it is harmless on its own; letting it out would
    /// be a signed tree head the log does not have, which a witness would
    /// take for a fork).
    pub fn append(&self, batch: AuditAppend) -> Result<Receipt, LogError> {
        let (_, receipt) = self.append_committed(batch)?;
        receipt
    }

    /// As [`Self::append`], but telling a batch that was not committed
    /// (`Err`) from one whose leaves are durable although no checkpoint
    /// covering them could be had (`Ok((appended, Err(_)))`: the HSM
    /// failed to sign after the commit, or the log is inconsistent). For a
    /// caller whose effect must follow its leaf, such as a change of the
    /// authorities, the committed leaf is the fact that counts.
    ///
    /// # Errors
    /// As [`Self::append`], for a batch that was not committed.
    pub fn append_committed(
        &self,
        batch: AuditAppend,
    ) -> Result<(Appended, Result<Receipt, LogError>), LogError> {
        self.append_committed_then(batch, |_| {})
    }

    /// As [`Self::append_committed`], calling `ended` once the store's
    /// transaction has ended, with whether it committed, before the
    /// checkpoint's signature is waited for: a caller holding a lock that
    /// orders commits (the reload fence) lets it go there, not after an
    /// HSM call. `ended` is called exactly once (a transaction the store
    /// runs again is still one call), and not with `true` for a commit
    /// whose fate is unknown (`StoreError::CommitUnknown`).
    ///
    /// `ended` must not use this log: it may run while this append holds
    /// the log's signer lock, taken for the overlapped signature. It must
    /// not panic: the leaves are committed by then, and the caller's
    /// effect (a trust reload's swap) would not be applied.
    ///
    /// # Errors
    /// As [`Self::append_committed`].
    pub fn append_committed_then(
        &self,
        batch: AuditAppend,
        ended: impl FnOnce(bool),
    ) -> Result<(Appended, Result<Receipt, LogError>), LogError> {
        // Every commit whose result was seen before this append started is
        // in an earlier group: this batch lands at or beyond its size.
        let floor = self.seen.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        // A signature whose result is not taken (a failed commit) is
        // dropped with `overlap`: the worker finishes it and drops it.
        let mut overlap = Overlap {
            latest: None,
            signing: None,
        };
        let appended = self.store.append_with(batch, &mut |tree| {
            self.start_signing(&mut overlap, tree);
        });
        ended(appended.is_ok());
        let appended = appended?;
        self.acked.fetch_max(appended.tree_size, Ordering::SeqCst);
        if let Some(timer) = &self.commit_timer {
            (timer.0)(started.elapsed().as_secs_f64());
        }
        let receipt = self.receipt(appended.clone(), floor, overlap);
        Ok((appended, receipt))
    }

    /// Appends `batch` later, on a thread of its own, retrying until the
    /// store takes it (every 50 ms at first, then every 2 s at most): for
    /// the leaves of HSM opens whose own append was not committed. Nothing
    /// of them was released; these leaves say so, so that no HSM open goes
    /// unlogged once the store is back. Its spend must be
    /// [`crate::store::Spend::None`] or, in place of the request's open
    /// intent, [`crate::store::Spend::ClearIntent`] (the reservation was
    /// given back with the failed append). The leaves take the time they
    /// are written at, so the log's times stay in order. While any wait,
    /// the daemon opens nothing more ([`Self::deferred_leaves`]), so the
    /// queue holds at most what the requests in flight had opened. What is
    /// still waiting when the process ends is not written by this process
    /// (its log says how many); the request's open intent stays in the
    /// store, and becomes `open_interrupted` leaves ([`Self::write_orphaned_intents`]).
    pub fn append_later(&self, batch: AuditAppend) {
        debug_assert!(matches!(
            batch.spend,
            crate::store::Spend::None | crate::store::Spend::ClearIntent(_)
        ));
        let leaves = batch.events.len();
        if self.deferred.stop.load(std::sync::atomic::Ordering::SeqCst) {
            // After the stop's last flush: no writer will take them. The
            // stop waits for requests' work first, so this is a bug.
            tracing::error!(
                leaves,
                "leaves of HSM opens deferred after the deferred writer stopped: they are lost \
                 (docs/audit.md, `audit_commit_failed`)"
            );
            return;
        }
        {
            let mut queue = self
                .deferred
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queue.0.push_back(batch);
            queue.1 += leaves;
        }
        self.deferred.wake.notify_one();
        let mut running = self
            .deferred
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if running.is_none() {
            let log = self.clone();
            match std::thread::Builder::new()
                .name("lavd-deferred-leaves".into())
                .spawn(move || log.write_deferred())
            {
                Ok(handle) => *running = Some(handle),
                // Tried again with the next batch; meanwhile nothing more
                // is opened (the queue is not empty).
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the thread that writes deferred audit leaves")
                }
            }
        }
    }

    /// Waits up to `timeout` for the deferred leaves to be written; returns
    /// how many still wait.
    pub fn flush_deferred(&self, timeout: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let waiting = self.deferred_leaves();
            if waiting == 0 || std::time::Instant::now() >= deadline {
                return waiting;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Ends the deferred writer, if it runs, and waits for it: at the end of
    /// the process, after [`Self::flush_deferred`]. What still waits is
    /// not written (the caller says so). The writer holds a handle on the
    /// log, so while it runs the HSM's workers do too, and a process that
    /// exited beside them could end inside a PKCS#11 call.
    pub fn stop_deferred(&self) {
        self.deferred
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        {
            // Under the queue's lock, so the writer cannot miss the wake-up
            // between its check and its wait.
            let _queue = self
                .deferred
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.deferred.wake.notify_all();
            self.deferred.sweeper_wake.notify_all();
        }
        for thread in [&self.deferred.writer, &self.deferred.sweeper] {
            let handle = thread
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        }
    }

    /// Starts a thread that runs [`Self::write_orphaned_intents`] every
    /// `every` until [`Self::stop_deferred`]: on PostgreSQL, where another
    /// replica's intents become orphans while this one serves (a replica
    /// killed and not restarted).
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start_intent_sweeper(&self, every: std::time::Duration) -> std::io::Result<()> {
        let log = self.clone();
        let handle = std::thread::Builder::new()
            .name("lavd-intent-sweep".into())
            .spawn(move || {
                let stopped = || log.deferred.stop.load(std::sync::atomic::Ordering::SeqCst);
                loop {
                    {
                        let queue = log
                            .deferred
                            .queue
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if stopped() {
                            return;
                        }
                        let _ = log.deferred.sweeper_wake.wait_timeout(queue, every);
                    }
                    if stopped() {
                        return;
                    }
                    // A panic (a bug, or one in a group commit this pass
                    // led) is one failed pass, not the end of the sweeper:
                    // another replica's orphans would wait for a restart.
                    let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        log.write_orphaned_intents()
                    }));
                    match pass {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "cannot write the leaves of orphaned open intents; retrying");
                        }
                        Err(_) => {
                            tracing::error!("writing the leaves of orphaned open intents panicked (a bug); retrying at the next pass");
                        }
                    }
                }
            })?;
        *self
            .deferred
            .sweeper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
        Ok(())
    }

    /// How many leaves [`Self::append_later`] holds that the store has not
    /// taken yet.
    pub fn deferred_leaves(&self) -> usize {
        self.deferred
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }

    /// Writes the `open_interrupted` leaves of every orphaned open intent
    /// ([`crate::store::AuditStore::orphaned_intents`]): each intent's
    /// leaves, with the time they are written, in one transaction with
    /// its row's deletion, so that no HSM open goes unlogged across a
    /// crash. An intent another writer took first is skipped. Returns the
    /// leaves written.
    ///
    /// On SQLite call it before serving only: every intent in the file is
    /// then an orphan.
    ///
    /// # Errors
    /// The first failure to read or write; what was written before it stays.
    pub fn write_orphaned_intents(&self) -> Result<u64, LogError> {
        let mut written = 0u64;
        loop {
            // A stop does not wait for the rest: they stay in the store.
            if self.deferred.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(written);
            }
            let orphans = self.store.orphaned_intents(64)?;
            if orphans.is_empty() {
                return Ok(written);
            }
            // One taken by another writer first is gone from the next read.
            for orphan in orphans {
                if self.deferred.stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return Ok(written);
                }
                let leaves = orphan.leaves.len() as u64;
                let batch = AuditAppend {
                    events: orphan.leaves.into_iter().map(Event::from).collect(),
                    time: OffsetDateTime::now_utc(),
                    spend: crate::store::Spend::ClearIntent(orphan.id),
                };
                match self.append_committed(batch) {
                    Ok((appended, _)) => {
                        written += leaves;
                        tracing::warn!(
                            intent = orphan.id,
                            warrant_id = %crate::codec::escape_for_terminal(&orphan.warrant_id),
                            intent_written = %crate::codec::format_time(orphan.created_at),
                            leaves,
                            first_index = appended.first_index,
                            "logged the HSM opens of a request whose process stopped before \
                             its audit commit (open_interrupted; nothing of them was released)"
                        );
                    }
                    Err(LogError::Store(StoreError::IntentSettled(_))) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// The deferred writer's loop: the oldest batch, until the store takes
    /// it, then the next.
    fn write_deferred(&self) {
        let first_wait = std::time::Duration::from_millis(50);
        let mut wait = first_wait;
        let mut failures = 0u64;
        let stopped = || self.deferred.stop.load(std::sync::atomic::Ordering::SeqCst);
        loop {
            let batch = {
                let mut queue = self
                    .deferred
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                loop {
                    if stopped() {
                        return;
                    }
                    match queue.0.front() {
                        Some(batch) => {
                            break AuditAppend {
                                events: batch.events.clone(),
                                time: OffsetDateTime::now_utc(),
                                spend: match batch.spend {
                                    crate::store::Spend::ClearIntent(id) => {
                                        crate::store::Spend::ClearIntent(id)
                                    }
                                    _ => crate::store::Spend::None,
                                },
                            }
                        }
                        None => {
                            queue = self
                                .deferred
                                .wake
                                .wait(queue)
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                        }
                    }
                }
            };
            let leaves = batch.events.len();
            // A panic (a bug) is one more failed attempt, not the end of
            // the writer: the leaves stay queued, and nothing more opens.
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.append_committed(batch)
            }))
            .unwrap_or_else(|_| {
                Err(LogError::Store(StoreError::CommitFailed(
                    "writing deferred leaves panicked".into(),
                )))
            });
            // Its intent already gone: the request's commit landed after
            // all (an outcome PostgreSQL could not report), or, on
            // PostgreSQL, a replica wrote the intent's leaves once its lease
            // ran out while the store was away. Which, this process cannot
            // tell: the batch is written all the same, at once, without the
            // intent (the log may then say some of these envelopes twice:
            // over-reporting, never under-reporting).
            if let Err(LogError::Store(StoreError::IntentSettled(id))) = &attempt {
                tracing::warn!(
                    intent = id,
                    leaves,
                    "the open intent of these deferred leaves is already settled or written \
                     (the request's commit may have landed after all, or its lease ran out); \
                     writing them anyway"
                );
                let mut queue = self
                    .deferred
                    .queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(front) = queue.0.front_mut() {
                    front.spend = crate::store::Spend::None;
                }
                continue;
            }
            match attempt {
                Ok((appended, _)) => {
                    let mut queue = self
                        .deferred
                        .queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    queue.0.pop_front();
                    queue.1 -= leaves;
                    tracing::warn!(
                        leaves,
                        first_index = appended.first_index,
                        still_waiting = queue.1,
                        "wrote the leaves of HSM opens whose request's audit commit had failed \
                         (nothing of them was released)"
                    );
                    wait = first_wait;
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    // Every failure while it backs off, then one in 30 (a
                    // minute at the longest wait).
                    if wait < std::time::Duration::from_secs(2) || failures.is_multiple_of(30) {
                        tracing::error!(
                            error = %e,
                            waiting = self.deferred_leaves(),
                            "the leaves of HSM opens whose request's audit commit failed \
                             still cannot be written; retrying"
                        );
                    }
                    // Asleep on the condition variable, so a stop wakes it.
                    let queue = self
                        .deferred
                        .queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if !stopped() {
                        let _ = self.deferred.wake.wait_timeout(queue, wait);
                    }
                    wait = (wait * 2).min(std::time::Duration::from_secs(2));
                }
            }
        }
    }

    /// The checkpoint of a committed append, signed overlapped or now.
    fn receipt(
        &self,
        appended: Appended,
        floor: u64,
        overlap: Overlap,
    ) -> Result<Receipt, LogError> {
        // Leaves put below a size this process had already seen mean the
        // store lost leaves (a truncation, perhaps refilled to the same
        // size): the old checkpoint would otherwise "cover" them unproved.
        if appended.first_index < floor {
            return Err(self.record_inconsistency(format!(
                "the store had a tree of size {} when this process had already seen size \
                 {floor}: leaves were removed",
                appended.first_index
            )));
        }
        self.seen.fetch_max(appended.tree_size, Ordering::SeqCst);
        let checkpoint = match overlap {
            // Committed, and the tree committed is the one signed (the
            // hook's last call was in the transaction that committed).
            Overlap {
                latest: Some(latest),
                signing:
                    Some(Signing {
                        size,
                        root,
                        signature,
                    }),
            } if size == appended.tree_size
                // A failed read falls to `checkpoint_covering` below: the
                // append is committed, and should not fail for this.
                && !self.newer_stored_exists(latest.as_ref()).unwrap_or(true) =>
            {
                let note = self.sign_with(size, root, |_| signature.wait())?;
                self.keep(latest, size, root, note)?
            }
            _ => {
                drop(overlap);
                self.checkpoint_covering(appended.first_index + appended.count)?
            }
        };
        Ok(Receipt {
            appended,
            checkpoint,
        })
    }

    /// The hook [`Self::append`] gives the store: called inside the append
    /// transaction, before COMMIT (on SQLite before the leaves and tree
    /// nodes are written), by the caller that commits it.
    /// Unless another signer holds `latest`, or other appends are queued
    /// behind this transaction (then the commit goes ahead alone, and this
    /// append signs, or finds its leaves covered, after it), it takes
    /// `latest`, proves the uncommitted tree consistent with the last
    /// checkpoint (the transaction sees its own rows, or on SQLite the
    /// group's new nodes held in memory) and starts the
    /// signature of its root on an HSM worker. A consistency failure
    /// is recorded as for any checkpoint; the append then signs nothing.
    ///
    /// Why not under load: the next group's transaction then takes the
    /// store as soon as this one commits, so saving this checkpoint waits
    /// for that commit while `latest` is held, and the callers queued
    /// there could sign a larger tree after it (batch-1 throughput at 16
    /// clients fell when every group overlapped: `docs/benchmarks-history.md`).
    fn start_signing<'log>(&'log self, overlap: &mut Overlap<'log>, tree: &Uncommitted<'_>) {
        // A signature started by an earlier call belongs to a transaction
        // that was run again (PostgreSQL): it never committed. Dropped here;
        // the worker finishes it and drops the result.
        overlap.signing = None;
        if self.inconsistency().is_some() || tree.others_queued() {
            return;
        }
        if overlap.latest.is_none() {
            overlap.latest = match self.latest.try_lock() {
                Ok(latest) => Some(latest),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                // Never wait for it here: its holder may be waiting for the
                // store this transaction holds.
                Err(TryLockError::WouldBlock) => return,
            };
        }
        let Some(latest) = overlap.latest.as_ref() else {
            return;
        };
        let size = tree.size();
        let root = match latest.as_ref() {
            Some(signed) if signed.size >= size => return,
            Some(signed) => {
                // Read at once; `check_extends` sees the root's error first,
                // as when it reads them itself.
                let (root, proof) = match tree.root_and_consistency_proof(signed.size) {
                    Ok((root, proof)) => (Ok(root), Ok(proof)),
                    Err(e) => (Err(e), Ok(Vec::new())),
                };
                self.check_extends(signed, size, || root, || proof)
            }
            None => tree.root().map_err(LogError::Store),
        };
        // An inconsistency is recorded already; a read that failed is tried
        // again after the commit, by `checkpoint_covering`.
        let Ok(root) = root else {
            return;
        };
        self.overlapped.fetch_add(1, Ordering::Relaxed);
        // The bytes `sign_with` will ask for: the checkpoint's note body.
        let body = self.checkpoint(size, root).to_body();
        overlap.signing = Some(Signing {
            size,
            root,
            signature: self
                .hsm
                .start_sign_ed25519(&self.key_label, body.into_bytes()),
        });
    }

    /// How many checkpoint signatures were started inside an append
    /// transaction, before its COMMIT (kept or not).
    pub fn signatures_overlapped(&self) -> u64 {
        self.overlapped.load(Ordering::Relaxed)
    }

    /// Signs the checkpoint of the tree of `size` leaves and root `root` in
    /// the HSM, and checks the signature under the audit key.
    fn sign(&self, size: u64, root: Hash) -> Result<String, LogError> {
        self.sign_with(size, root, |msg| {
            self.hsm.sign_ed25519(&self.key_label, msg)
        })
    }

    /// The checkpoint of the tree of `size` leaves and root `root`.
    fn checkpoint(&self, size: u64, root: Hash) -> Checkpoint {
        Checkpoint {
            origin: self.origin.clone(),
            size,
            root,
        }
    }

    /// [`Self::sign`] with `signer` giving the HSM's signature of the note
    /// body (a signature started earlier, say). The signature is checked
    /// under the audit key either way, so one over other bytes is refused.
    fn sign_with(
        &self,
        size: u64,
        root: Hash,
        signer: impl FnOnce(&[u8]) -> Result<[u8; 64], HsmError>,
    ) -> Result<String, LogError> {
        note::sign_checkpoint(&self.checkpoint(size, root), self.public.bytes(), signer).map_err(
            |e| match e {
                note::SignError::Signer(h) => LogError::Hsm(h),
                other => LogError::Sign(other.to_string()),
            },
        )
    }

    /// Saves `note`, the checkpoint of a durable tree of `size` leaves and
    /// root `root`, makes it the newest, and tells the witnesses.
    fn keep(
        &self,
        mut latest: MutexGuard<'_, Option<Signed>>,
        size: u64,
        root: Hash,
        note: String,
    ) -> Result<String, LogError> {
        self.store
            .save_checkpoint(size, &note, OffsetDateTime::now_utc())?;
        *latest = Some(Signed {
            size,
            root,
            note: note.clone(),
        });
        drop(latest);
        if let Some(hook) = &self.on_signed {
            (hook.0)(size);
        }
        Ok(note)
    }

    /// The newest checkpoint another process saved (a replica on
    /// PostgreSQL; on SQLite, `lavd audit export` run beside the daemon),
    /// when it is newer than `latest`, verified under the audit key. This
    /// process proves the tree extends it as well as its own latest:
    /// otherwise leaves rewritten behind another process's checkpoint,
    /// above this process's own latest, would pass this process's proof
    /// and be signed over, a fork of the log.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`] (recorded) for a stored checkpoint that
    /// does not verify; [`LogError::Store`].
    fn newer_stored(&self, latest: Option<&Signed>) -> Result<Option<Signed>, LogError> {
        let Some((size, note)) = self.store.latest_checkpoint()? else {
            return Ok(None);
        };
        if latest.is_some_and(|signed| signed.size >= size) {
            return Ok(None);
        }
        match self.verify_stored(size, &note) {
            Ok(signed) => Ok(Some(signed)),
            Err(LogError::Inconsistent(reason)) => Err(self.record_inconsistency(reason)),
            Err(e) => Err(e),
        }
    }

    /// Whether [`Self::newer_stored`] finds one: then a signature started
    /// inside the append's transaction, proved from `latest` only, is not
    /// kept, and [`Self::checkpoint_covering`] proves from both.
    fn newer_stored_exists(&self, latest: Option<&Signed>) -> Result<bool, LogError> {
        let Some((size, _)) = self.store.latest_checkpoint()? else {
            return Ok(false);
        };
        Ok(latest.is_none_or(|signed| signed.size < size))
    }

    /// A signed checkpoint of a tree of at least `size` leaves.
    ///
    /// # Errors
    /// As [`AuditLog::append`].
    ///
    /// Before signing, the stored tree must be proved consistent with the
    /// last checkpoint signed (or verified at open); otherwise
    /// [`LogError::Inconsistent`], now and for every later call.
    pub fn checkpoint_covering(&self, size: u64) -> Result<String, LogError> {
        if let Some(reason) = self.inconsistency() {
            return Err(LogError::Inconsistent(reason.to_string()));
        }
        // One signer at a time; whoever waits here will most likely find
        // that the checkpoint just signed already covers it.
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(signed) = latest.as_ref() {
            if signed.size >= size {
                return Ok(signed.note.clone());
            }
        }
        // Read before the tree's size: a checkpoint is saved only for a
        // durable tree, and leaves are never removed, so the size read
        // after it is at least its size (read the other way round, another
        // replica could append and sign in between).
        let newer = self.newer_stored(latest.as_ref())?;
        let (tree, server) = self.store.tree_size_on()?;
        self.seen.fetch_max(tree, Ordering::SeqCst);
        let root = match latest.as_ref() {
            Some(signed) => self.prove_extends(signed, tree)?,
            None => self.store.root(tree)?,
        };
        if let Some(newer) = newer {
            // The tree extends another replica's newest checkpoint too (a
            // tree it signed, rewritten since, is refused here, not signed
            // over), which becomes this process's latest.
            self.prove_extends(&newer, tree)?;
            let covers = newer.size >= size;
            *latest = Some(newer);
            if covers {
                return Ok(latest.as_ref().map(|s| s.note.clone()).unwrap_or_default());
            }
        }
        // The tree read may hold leaves this process did not commit, whose
        // commit was never acknowledged (PostgreSQL: on the primary only):
        // a failover would lose them, and this signature would be a fork.
        // Not when this process's own acknowledged commit came after all of
        // them.
        if tree > self.acked.load(Ordering::SeqCst) {
            self.store.replicated(&server)?;
        }
        let note = self.sign(tree, root)?;
        self.keep(latest, tree, root, note)
    }

    /// Whether `leaf` is leaf `index` of a tree signed with the audit key,
    /// signing a checkpoint that covers it when none does yet (which first
    /// proves that the stored tree extends the last one signed).
    /// [`LeafProof::NotInTree`] (and the log
    /// [inconsistent](Self::inconsistency), saying why) for a
    /// leaf row that is not the one the subtree hashes hold: written into
    /// the store outside lavd, over a leaf a checkpoint signed or beside
    /// the hashes. (A leaf row written above the newest checkpoint with its
    /// hashes, as lavd writes one, is the log's from then on, and the
    /// checkpoint signed here signs it.)
    ///
    /// # Errors
    /// As [`Self::checkpoint_covering`].
    pub fn prove_leaf(&self, index: u64, leaf: &[u8]) -> Result<LeafProof, LogError> {
        self.checkpoint_covering(index.saturating_add(1))?;
        let signed = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| LogError::Sign("no checkpoint after signing one".into()))?;
        let not_in = |what: String| {
            self.record_inconsistency(format!(
                "the stored leaf {index} is not the one in the signed tree of size {}: {what}",
                signed.size
            ));
            Ok(LeafProof::NotInTree)
        };
        let proof = match self.store.inclusion_proof(index, signed.size) {
            Ok(proof) => proof,
            Err(e @ (StoreError::Corrupt { .. } | StoreError::BadProofRequest(_))) => {
                return not_in(e.to_string())
            }
            Err(e) => return Err(e.into()),
        };
        match merkle::verify_inclusion(
            &merkle::leaf_hash(leaf),
            index,
            signed.size,
            &proof,
            &signed.root,
        ) {
            Ok(()) => Ok(LeafProof::Included),
            Err(e) => not_in(format!("inclusion proof: {e}")),
        }
    }

    /// The newest checkpoint, signing one if the log has grown since.
    ///
    /// # Errors
    /// As [`AuditLog::append`].
    pub fn current_checkpoint(&self) -> Result<String, LogError> {
        let size = self.store.tree_size()?;
        self.checkpoint_covering(size)
    }

    /// The newest checkpoint signed (by this process, or stored by
    /// another replica), without signing one and without the signer's
    /// lock: for callers no one authenticated.
    ///
    /// # Errors
    /// [`LogError::Inconsistent`] once the log was found inconsistent, or
    /// if the newest stored checkpoint does not verify (then recorded, as
    /// the signer would); [`StoreError::Unavailable`] while none is stored
    /// (`lavd serve` signs one as it starts); the store's error.
    pub fn latest_signed(&self) -> Result<String, LogError> {
        self.latest_verified()?
            .map(|signed| signed.note)
            .ok_or_else(|| {
                LogError::Store(StoreError::Unavailable {
                    store: "audit log".into(),
                    reason: "no checkpoint has been signed yet".into(),
                })
            })
    }

    /// The newest stored checkpoint, if any, checked as the signer checks
    /// it (its signature, its size): a row edited behind lavd's back is not
    /// taken as the log's, and the log is then inconsistent.
    fn latest_verified(&self) -> Result<Option<Signed>, LogError> {
        if let Some(reason) = self.inconsistency() {
            return Err(LogError::Inconsistent(reason.to_string()));
        }
        match self.store.latest_checkpoint()? {
            Some((size, note)) => match self.verify_stored(size, &note) {
                Ok(signed) => Ok(Some(signed)),
                Err(LogError::Inconsistent(reason)) => Err(self.record_inconsistency(reason)),
                Err(e) => Err(e),
            },
            None => Ok(None),
        }
    }

    /// The whole log with a checkpoint covering exactly its leaves, for
    /// `lavd audit export`: the tree the checkpoint signs, not the leaves
    /// appended after it (beside a running daemon). A damaged tree (one
    /// that does not hash, or does not extend the last checkpoint) is
    /// exported whole under the last checkpoint signed before.
    ///
    /// # Errors
    /// As [`AuditLog::append`].
    pub fn export(&self) -> Result<Export, LogError> {
        let key = note::VerifierKey::new(&self.origin, self.public.bytes())
            .map_err(|e| LogError::Sign(e.to_string()))?;
        // `damaged`: the stored tree did not extend the last checkpoint.
        let (checkpoint, damaged) = match self.current_checkpoint() {
            Ok(c) => (c, false),
            // The stored tree does not hash (rows were edited, inserted or
            // deleted behind lavd's back): export what is there under the
            // newest checkpoint signed before, and let the verifier say
            // where it breaks.
            Err(LogError::Store(e @ StoreError::Corrupt { .. })) => {
                tracing::warn!(error = %e, "audit tree is corrupt; exporting under the last signed checkpoint");
                match self.store.latest_checkpoint()? {
                    Some((_, note)) => (note, true),
                    None => return Err(LogError::Store(e)),
                }
            }
            // The same for a tree that does not extend its checkpoint.
            Err(e @ LogError::Inconsistent(_)) => match self.store.latest_checkpoint()? {
                Some((_, note)) => (note, true),
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let size = note::verify_checkpoint(&checkpoint, &key)
            .map_err(|e| LogError::Sign(e.to_string()))?
            .size;
        // A sound tree: the leaves the checkpoint covers, no more. Leaves
        // appended since it was signed (a running daemon, a replica) are the
        // next export's; exported here, beyond the checkpoint, the verifier
        // would refuse them as slipped in (`entries_extra`). A damaged one:
        // every row the table holds, also beyond the checkpoint, for the
        // verifier to report, not to hide here.
        let end = if damaged {
            self.store.tree_size()?.max(size)
        } else {
            size
        };
        let entries = self
            .store
            .leaves(0, end)?
            .into_iter()
            .map(|(index, leaf)| ExportEntry::new(index, &leaf))
            .collect();
        // Every checkpoint the log ever signed: each one pins a prefix, so a
        // verifier can locate an altered leaf between two of them.
        let earlier_checkpoints = self
            .store
            .checkpoints()?
            .into_iter()
            .filter(|(s, _)| *s < size)
            .map(|(_, note)| note)
            .collect();
        Ok(Export {
            origin: self.origin.clone(),
            checkpoint,
            earlier_checkpoints,
            entries,
        })
    }
}
