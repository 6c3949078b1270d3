//! The running audit log: the store's durable leaves plus checkpoints signed
//! in the HSM. This is what the daemon and the `lavd audit` commands use;
//! the rest of [`crate::audit`] is storage- and HSM-independent.
//!
//! Checkpoints are signed after the leaves are durable and outside the store
//! lock. Concurrent callers share signatures: a caller whose leaves are
//! already covered by the newest checkpoint reuses it.

use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

use super::export::{Export, ExportEntry};
use super::note::{self, Checkpoint};
use crate::hsm::{Hsm, HsmError};
use crate::jwk::Ed25519PublicKey;
use crate::store::{Appended, AuditAppend, AuditStore, StoreError};

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
    latest: Arc<Mutex<Option<(u64, String)>>>,
    commit_timer: Option<CommitTimer>,
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

impl AuditLog {
    /// Opens the log with the HSM's audit key `key_label`.
    ///
    /// # Errors
    /// [`LogError::Hsm`] if the audit key is missing; [`LogError::Store`].
    pub fn new(
        store: Arc<dyn AuditStore>,
        hsm: Hsm,
        key_label: &str,
        origin: &str,
    ) -> Result<Self, LogError> {
        let public = hsm.audit_key(key_label)?.public;
        let latest = store.latest_checkpoint()?;
        Ok(AuditLog {
            store,
            hsm,
            key_label: key_label.to_string(),
            public,
            origin: origin.to_string(),
            latest: Arc::new(Mutex::new(latest)),
            commit_timer: None,
        })
    }

    /// Reports how long each durable append took (group commit included).
    #[must_use]
    pub fn with_commit_timer(mut self, timer: Arc<dyn Fn(f64) + Send + Sync>) -> Self {
        self.commit_timer = Some(CommitTimer(timer));
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
    pub fn append(&self, batch: AuditAppend) -> Result<Receipt, LogError> {
        let started = std::time::Instant::now();
        let appended = self.store.append(batch)?;
        if let Some(timer) = &self.commit_timer {
            (timer.0)(started.elapsed().as_secs_f64());
        }
        let checkpoint = self.checkpoint_covering(appended.first_index + appended.count)?;
        Ok(Receipt {
            appended,
            checkpoint,
        })
    }

    /// A signed checkpoint of a tree of at least `size` leaves.
    ///
    /// # Errors
    /// As [`AuditLog::append`].
    pub fn checkpoint_covering(&self, size: u64) -> Result<String, LogError> {
        // One signer at a time; whoever waits here will most likely find
        // that the checkpoint just signed already covers it.
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((signed, note)) = latest.as_ref() {
            if *signed >= size {
                return Ok(note.clone());
            }
        }
        let tree = self.store.tree_size()?;
        let root = self.store.root(tree)?;
        let checkpoint = Checkpoint {
            origin: self.origin.clone(),
            size: tree,
            root,
        };
        let note = note::sign_checkpoint(&checkpoint, self.public.bytes(), |msg| {
            self.hsm.sign_ed25519(&self.key_label, msg)
        })
        .map_err(|e| match e {
            note::SignError::Signer(h) => LogError::Hsm(h),
            other => LogError::Sign(other.to_string()),
        })?;
        self.store
            .save_checkpoint(tree, &note, OffsetDateTime::now_utc())?;
        *latest = Some((tree, note.clone()));
        Ok(note)
    }

    /// The newest checkpoint, signing one if the log has grown since.
    ///
    /// # Errors
    /// As [`AuditLog::append`].
    pub fn current_checkpoint(&self) -> Result<String, LogError> {
        let size = self.store.tree_size()?;
        self.checkpoint_covering(size)
    }

    /// The whole log with a checkpoint covering exactly its leaves, for
    /// `lavd audit export`.
    ///
    /// # Errors
    /// As [`AuditLog::append`].
    pub fn export(&self) -> Result<Export, LogError> {
        let key = note::VerifierKey::new(&self.origin, self.public.bytes())
            .map_err(|e| LogError::Sign(e.to_string()))?;
        let checkpoint = match self.current_checkpoint() {
            Ok(c) => c,
            // The stored tree does not hash (rows were edited, inserted or
            // deleted behind lavd's back): export what is there under the
            // newest checkpoint signed before, and let the verifier say
            // where it breaks.
            Err(LogError::Store(e @ StoreError::Corrupt { .. })) => {
                tracing::warn!(error = %e, "audit tree is corrupt; exporting under the last signed checkpoint");
                match self.store.latest_checkpoint()? {
                    Some((_, note)) => note,
                    None => return Err(LogError::Store(e)),
                }
            }
            Err(e) => return Err(e),
        };
        let size = note::verify_checkpoint(&checkpoint, &key)
            .map_err(|e| LogError::Sign(e.to_string()))?
            .size;
        // Every row the table holds, also beyond the checkpoint: extra or
        // missing rows are for the verifier to report, not to hide here.
        let end = self.store.tree_size()?.max(size);
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
