//! The audit log's storage: leaves, the hashes of every complete subtree
//! (so that proofs read O(log n) rows), and signed checkpoints.
//!
//! Appends use **group commit**: concurrent callers queue their batches, and
//! whichever caller gets the connection first commits every queued batch in
//! one transaction (one WAL fsync), each batch's checks and spend inside its
//! own savepoint so that one batch refused there does not sink the others
//! (a failure writing the leaves, after the commit hook, fails the whole
//! group: the hook has seen the group's tree). A batch's budget spend
//! or revocation ([`Spend`]) commits in the same transaction as its leaves:
//! there is never a spend without its audit record, nor the reverse. When
//! [`AuditStore::append`] returns `Ok`, the leaves are durable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use time::OffsetDateTime;

use super::{KeyRecord, Reservation, Revocation, SqliteStore, StoreError};
use crate::audit::leaf::{DenyReason, Event, LeafTime, Unwrap};
use crate::audit::merkle::{self, Hash, HashReader, TreeError};
use crate::codec::format_time;

/// The largest leaf index or tree size the store can hold: SQLite's INTEGER
/// is a signed 64-bit number. Every index or size that comes from outside
/// (a query parameter) is checked against this bound at the API edge.
pub const MAX_INDEX: u64 = i64::MAX as u64;

/// The SQL of migration 3.
pub(super) const MIGRATION: &str = "
    CREATE TABLE audit_leaves (
        idx  INTEGER PRIMARY KEY NOT NULL CHECK (idx >= 0),
        leaf BLOB NOT NULL
    ) STRICT;
    CREATE TABLE audit_nodes (
        level INTEGER NOT NULL CHECK (level BETWEEN 0 AND 63),
        idx   INTEGER NOT NULL CHECK (idx >= 0),
        hash  BLOB NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (level, idx)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE audit_checkpoints (
        size      INTEGER PRIMARY KEY NOT NULL CHECK (size >= 0),
        note      TEXT NOT NULL,
        signed_at TEXT NOT NULL
    ) STRICT;";

/// The SQL of migration 4: witness cosignatures, one line per checkpoint
/// size and witness, each verified against the configured key before it is
/// stored.
pub(super) const COSIGNATURES_MIGRATION: &str = "
    CREATE TABLE audit_cosignatures (
        size    INTEGER NOT NULL CHECK (size >= 0),
        witness TEXT NOT NULL,
        line    TEXT NOT NULL,
        PRIMARY KEY (size, witness)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX audit_cosignatures_by_witness ON audit_cosignatures (witness, size);";

/// Open intents ([`super::WarrantStore::reserve_with_intent`]): `leaves` is
/// the JSON array of the [`Unwrap`] leaves to write should the request's
/// process stop before its audit commit.
pub(super) const OPEN_INTENTS_MIGRATION: &str = "
    CREATE TABLE open_intents (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        warrant_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        leaves     BLOB NOT NULL
    ) STRICT;";

/// An open intent whose request will not settle it: its process stopped
/// between the HSM opens and the audit commit
/// ([`AuditStore::orphaned_intents`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenIntent {
    /// Its row (`open_intents.id`), for [`Spend::ClearIntent`].
    pub id: i64,
    /// The warrant its request opened under.
    pub warrant_id: String,
    /// When it was written.
    pub created_at: OffsetDateTime,
    /// The leaves to write for it, each denied `open_interrupted`.
    pub leaves: Vec<Unwrap>,
}

/// Parses an intent's leaves, as [`super::WarrantStore::reserve_with_intent`]
/// wrote them; anything else is a corrupt row.
pub(super) fn intent_leaves(
    id: i64,
    parts: &[&[u8]],
    corrupt: impl Fn(String) -> StoreError,
) -> Result<Vec<Unwrap>, StoreError> {
    parts
        .iter()
        .map(|part| {
            crate::codec::from_object_slice::<Unwrap>(part)
                .map_err(|e| corrupt(format!("open_intents {id}: a leaf does not parse: {e}")))
        })
        .collect()
}

/// The database server a read was made on ([`AuditStore::tree_size_on`]):
/// for PostgreSQL, when its server process started (a failover or a restart
/// changes it); SQLite's one file has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Server(Option<String>);

impl Server {
    /// The server named `started` (PostgreSQL's start time, as the store
    /// reads it).
    pub fn started(started: String) -> Self {
        Server(Some(started))
    }

    /// Its name, if it has one.
    pub(crate) fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// Leaf rows as read: each index with its leaf's bytes.
pub type LeafRows = Vec<(u64, Vec<u8>)>;

/// Node rows of one level as read: each index with its stored bytes, not
/// yet checked to be a hash.
pub type NodeRows = Vec<(u64, Vec<u8>)>;

/// How far a read of leaf or node rows vouches that none is missing
/// ([`AuditStore::leaves_vouched`], [`AuditStore::node_rows_vouched`]), in
/// leaves: a row missing within it (a node row's subtree complete within
/// it) was deleted behind lavd; beyond it, the read may only be behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouched {
    /// Every leaf the store was ever given: its reads are never behind
    /// (SQLite, one file).
    All,
    /// The leaves below this tree size, as the same read's snapshot of the
    /// store's head counts them (PostgreSQL: a standby's snapshot may be
    /// behind the primary's, but it holds a leaf exactly when it holds the
    /// head that counts it, both being written in one transaction).
    Below(u64),
}

impl Vouched {
    /// Whether the leaves below `end` are all vouched for.
    #[must_use]
    pub fn covers(self, end: u64) -> bool {
        match self {
            Vouched::All => true,
            Vouched::Below(size) => end <= size,
        }
    }
}

/// A stored witness cosignature: the checkpoint size it is on, the
/// witness's key name, and the signature line (with its newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cosignature {
    /// The tree size of the cosigned checkpoint.
    pub size: u64,
    /// The witness's key name.
    pub witness: String,
    /// The `— <name> <base64>` line, newline-terminated.
    pub line: String,
}

/// What commits atomically with a batch's leaves.
#[derive(Debug)]
pub enum Spend {
    /// Nothing: the leaves alone (refused warrants, key events).
    None,
    /// An unwrap's budget: `opened` of the reservation's units are spent, the
    /// rest given back. Unless something changed while the unwrap was in
    /// flight, as the transaction that commits this batch finds it
    /// ([`Withdrawn`]): the warrant was revoked (PROTOCOL §8), an envelope's
    /// key was destroyed, or (PostgreSQL) the reservation's lease ran out
    /// and other replicas spent the budget. Then the `opened` unwrap leaves
    /// it concerns are written as denied instead, their units are not
    /// spent, and [`Appended::withdrawn`] tells the caller which of its
    /// opened keys it must not release.
    Settle {
        /// The reservation made before opening.
        reservation: Reservation,
        /// How many envelopes were opened.
        opened: u64,
    },
    /// A revocation.
    Revoke(Revocation),
    /// A newly generated escrow key's record.
    InsertKey(KeyRecord),
    /// An escrow key's destruction (first record kept).
    DestroyKey {
        /// The key.
        kid: String,
        /// When.
        at: OffsetDateTime,
        /// Why (`retention` or the operator's reason).
        reason: String,
    },
    /// Leaves that replace an open intent (`open_interrupted`, or
    /// `audit_commit_failed` after a failed settle): its row is deleted in
    /// the same transaction. If it is gone already, nothing of the batch is
    /// written ([`StoreError::IntentSettled`]).
    ClearIntent(i64),
}

/// One batch of leaves to append.
#[derive(Debug)]
pub struct AuditAppend {
    /// The events, in order; each becomes one leaf.
    pub events: Vec<Event>,
    /// The time written into every leaf.
    pub time: OffsetDateTime,
    /// What commits with them.
    pub spend: Spend,
}

/// What the transaction that settled an unwrap found changed since the
/// unwrap was planned. Each makes the batch's unwrap leaves that would have
/// said `opened` say denied instead (for the reason [`Withdrawn::reason`]
/// gives), and what they name is neither spent nor released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Withdrawn {
    /// The warrant was revoked: `warrant_revoked`, for every envelope.
    pub revoked: bool,
    /// (PostgreSQL) the reservation outlived its lease and other replicas
    /// spent the budget it held: `budget_exhausted`, for every envelope.
    pub budget_lapsed: bool,
    /// These keys were destroyed: `key_destroyed`, for their envelopes.
    pub destroyed_kids: Vec<String>,
    /// (PostgreSQL) the request outlived its lease and a sweep (of any
    /// replica, this one's included) already wrote its open intent's
    /// `open_interrupted` leaves, saying nothing of them was released:
    /// `audit_commit_failed`, for every envelope, nothing spent, and the
    /// request is refused whole (503 `store_unavailable`), so that the log
    /// does not also say they were opened and released.
    pub intent_swept: bool,
}

impl Withdrawn {
    /// Why an envelope of key `kid` that opened must be denied, if it must.
    pub fn reason(&self, kid: &str) -> Option<DenyReason> {
        if self.intent_swept {
            Some(DenyReason::AuditCommitFailed)
        } else if self.revoked {
            Some(DenyReason::WarrantRevoked)
        } else if self.budget_lapsed {
            Some(DenyReason::BudgetExhausted)
        } else if self.destroyed_kids.iter().any(|k| k == kid) {
            Some(DenyReason::KeyDestroyed)
        } else {
            None
        }
    }

    /// Whether anything was withdrawn.
    pub fn any(&self) -> bool {
        self.intent_swept || self.revoked || self.budget_lapsed || !self.destroyed_kids.is_empty()
    }
}

/// The distinct keys of the batch's unwrap leaves of warrant `id` that say
/// `opened`, and how many such leaves each key has.
pub(super) fn opened_kids(batch: &AuditAppend, id: &str) -> Vec<(String, u64)> {
    let mut kids: Vec<(String, u64)> = Vec::new();
    for kid in batch.events.iter().filter_map(|e| e.opened_kid(id)) {
        match kids.iter_mut().find(|(k, _)| k == kid) {
            Some((_, n)) => *n += 1,
            None => kids.push((kid.to_string(), 1)),
        }
    }
    kids
}

/// `opened` less the leaves of `destroyed` keys among `kids` (as
/// [`opened_kids`] counts them): the units a settle spends.
pub(super) fn spendable(opened: u64, kids: &[(String, u64)], destroyed: &[String]) -> u64 {
    let withheld: u64 = kids
        .iter()
        .filter(|(k, _)| destroyed.contains(k))
        .map(|(_, n)| n)
        .sum();
    opened.saturating_sub(withheld)
}

/// Where a committed batch landed. Returned only once it is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Index of the batch's first leaf.
    pub first_index: u64,
    /// Number of leaves.
    pub count: u64,
    /// Tree size after the commit that made the batch durable (at least
    /// `first_index + count`).
    pub tree_size: u64,
    /// For [`Spend::Revoke`]: false if the id was already revoked.
    pub newly_revoked: bool,
    /// For [`Spend::Revoke`]: whether a warrant of that id had been
    /// presented before (its budget is registered). A revocation of an id
    /// never seen is recorded all the same (a warrant can be revoked before
    /// its first use), but may be a typo for the one meant.
    pub warrant_seen: bool,
    /// For [`Spend::Settle`]: what the transaction that settled it found
    /// withdrawn. The leaves it concerns say denied where they would have
    /// said `opened`, their units were not spent, and the caller must not
    /// release those keys.
    pub withdrawn: Withdrawn,
}

/// What a [`Spend::Revoke`] found in the store, in its transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RevokeFound {
    /// False if the id was already revoked.
    pub(crate) newly_revoked: bool,
    /// Whether a warrant of that id had been presented before.
    pub(crate) warrant_seen: bool,
}

/// The tree an append transaction is about to commit, read through that
/// transaction (its own rows, or on SQLite the new nodes it holds in memory
/// until it writes them): what the hook of [`AuditStore::append_with`] is
/// given, before COMMIT.
///
/// # Security
/// Until the append returns `Ok`, this tree may never exist: the COMMIT can
/// still fail. Whatever is computed from it (a signed checkpoint) must be
/// kept back until then and dropped otherwise.
pub struct Uncommitted<'a> {
    pub(super) size: u64,
    pub(super) nodes: &'a dyn HashReader<Error = StoreError>,
    /// Other appends of this process are queued for the next transaction.
    pub(super) queued: bool,
}

impl std::fmt::Debug for Uncommitted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uncommitted")
            .field("size", &self.size)
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl Uncommitted<'_> {
    /// The number of leaves the transaction commits.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether other appends of this process were queued, waiting for this
    /// transaction to end, when the hook was called.
    pub fn others_queued(&self) -> bool {
        self.queued
    }

    /// The RFC 6962 root of the whole uncommitted tree.
    ///
    /// # Errors
    /// As [`AuditStore::root`].
    pub fn root(&self) -> Result<Hash, StoreError> {
        merkle::root(&self.nodes, self.size).map_err(tree_error)
    }

    /// The consistency proof from tree size `from` to the uncommitted tree.
    ///
    /// # Errors
    /// As [`AuditStore::consistency_proof`].
    pub fn consistency_proof(&self, from: u64) -> Result<Vec<Hash>, StoreError> {
        merkle::consistency_proof(&self.nodes, from, self.size).map_err(tree_error)
    }

    /// [`Self::root`] and [`Self::consistency_proof`] from `from`, with the
    /// subtree hashes of both read at once ([`merkle::fetch_ahead`]): one
    /// query on PostgreSQL, where each read is a round trip made while the
    /// transaction holds the head lock.
    ///
    /// # Errors
    /// As the two.
    pub fn root_and_consistency_proof(&self, from: u64) -> Result<(Hash, Vec<Hash>), StoreError> {
        merkle::fetch_ahead(&self.nodes, |nodes| {
            Ok((
                merkle::root(nodes, self.size)?,
                merkle::consistency_proof(nodes, from, self.size)?,
            ))
        })
        .map_err(tree_error)
    }
}

/// The hook of [`AuditStore::append_with`].
pub type BeforeCommit<'a> = dyn FnMut(&Uncommitted<'_>) + 'a;

/// A tree computation's error as the store reports it: the reader's own
/// error, or a request outside the tree.
pub(super) fn tree_error(e: TreeError<StoreError>) -> StoreError {
    match e {
        TreeError::Reader(e) => e,
        other => StoreError::BadProofRequest(other.to_string()),
    }
}

/// The leaves of `batch` from index `first`, and their RFC 6962 leaf
/// hashes, as both stores write them; the batch's time is formatted once.
/// With `withdrawn` (the settled warrant's id and what its settle found),
/// that warrant's unwraps that would say `opened` say denied for the reason
/// [`Withdrawn::reason`] gives, where it gives one.
pub(super) fn encode_leaves(
    batch: &AuditAppend,
    first: u64,
    withdrawn: Option<(&str, &Withdrawn)>,
) -> Result<(Vec<Vec<u8>>, Vec<Hash>), StoreError> {
    let time = LeafTime::new(batch.time);
    let mut leaves = Vec::with_capacity(batch.events.len());
    let mut hashes = Vec::with_capacity(batch.events.len());
    for (i, event) in batch.events.iter().enumerate() {
        let denied = withdrawn.and_then(|(id, w)| {
            let reason = w.reason(event.opened_kid(id)?)?;
            event.denied_if_opened(id, reason)
        });
        let leaf = denied
            .as_ref()
            .unwrap_or(event)
            .to_leaf_at(first + i as u64, &time)
            .map_err(|e| StoreError::BadLeaf(e.to_string()))?;
        hashes.push(merkle::leaf_hash(&leaf));
        leaves.push(leaf);
    }
    Ok((leaves, hashes))
}

/// Audit log storage.
pub trait AuditStore: Send + Sync + std::fmt::Debug {
    /// Appends a batch durably (with its spend) and says where it landed.
    ///
    /// # Errors
    /// The spend's error (nothing of the batch is committed) or
    /// [`StoreError::Sqlite`].
    fn append(&self, batch: AuditAppend) -> Result<Appended, StoreError> {
        self.append_with(batch, &mut |_| {})
    }
    /// As [`AuditStore::append`]; and when this caller commits the
    /// transaction that carries its batch (group commit: the caller that
    /// finds no commit running commits every batch queued), `before_commit`
    /// is called inside that transaction, once every batch of the group is
    /// checked and its spend written, before COMMIT (on SQLite before the
    /// leaves and tree nodes are written, so that a signature started there
    /// overlaps their writing), with the tree it commits. It is not
    /// called when another caller's transaction carries the batch, and it
    /// may be called more than once (PostgreSQL runs a transaction again
    /// after a serialization failure): each call supersedes the ones before,
    /// whose transactions never committed. The tree it saw is committed
    /// only if this returns `Ok` with `tree_size` equal to its size.
    ///
    /// # Errors
    /// As [`AuditStore::append`].
    fn append_with(
        &self,
        batch: AuditAppend,
        before_commit: &mut BeforeCommit<'_>,
    ) -> Result<Appended, StoreError>;
    /// The number of leaves.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn tree_size(&self) -> Result<u64, StoreError>;
    /// The RFC 6962 root of the first `size` leaves.
    ///
    /// # Errors
    /// [`StoreError::BadProofRequest`] if `size` exceeds the tree.
    fn root(&self, size: u64) -> Result<Hash, StoreError>;
    /// The root of the tree of `size` computed through `nodes`, the nodes
    /// of tree level `level` from index `first` taken as given
    /// ([`merkle::Through`]), the others read from the store at once (on
    /// PostgreSQL, two queries on one connection: the tree size, then the
    /// nodes): what checks a tile against a signed root. `nodes` must be
    /// complete subtrees of that tree.
    ///
    /// # Errors
    /// As [`AuditStore::root`].
    fn root_through(
        &self,
        size: u64,
        level: u8,
        first: u64,
        nodes: &[Hash],
    ) -> Result<Hash, StoreError>;
    /// Leaves `[start, end)`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn leaves(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Whether this store's reads are never behind its writes (SQLite's
    /// one file: [`Vouched::All`]), so that a row missing or malformed
    /// below a signed checkpoint can only have been changed behind lavd.
    /// PostgreSQL's may be read on a standby that is.
    fn reads_never_behind(&self) -> bool;
    /// [`Self::leaves`], with how far the same read vouches that no leaf
    /// is missing: what tells a row deleted behind lavd from a read on a
    /// standby that has not replayed it yet.
    ///
    /// # Errors
    /// As [`Self::leaves`].
    fn leaves_vouched(&self, start: u64, end: u64) -> Result<(LeafRows, Vouched), StoreError>;
    /// The rows of [`Self::node_hashes`] as read, unchecked, with how far
    /// the same read vouches that none is missing ([`Vouched`], in leaves:
    /// the subtree `(level, i)` is complete in a tree of `(i + 1) << level`
    /// leaves): what tells a node row deleted behind lavd from a read on a
    /// standby that has not replayed it yet.
    ///
    /// # Errors
    /// As [`Self::leaves`].
    fn node_rows_vouched(
        &self,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(NodeRows, Vouched), StoreError>;
    /// The stored hashes of the complete subtrees `(level, i)` for `i` in
    /// `[start, end)`, in one read ([`Self::node_rows_vouched`]'s): what a
    /// C2SP tile is made of. (The tile routes judge the rows themselves:
    /// `AuditLog::check_nodes`.)
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if any of them is missing or not 32 bytes
    /// (the caller asks only for subtrees its checkpoint says are
    /// complete); the read's error.
    fn node_hashes(&self, level: u8, start: u64, end: u64) -> Result<Vec<Hash>, StoreError> {
        let (rows, _) = self.node_rows_vouched(level, start, end)?;
        let corrupt = |what: String| StoreError::Corrupt {
            store: "audit_nodes".into(),
            what,
        };
        let mut out = Vec::with_capacity(rows.len());
        for (expected, (idx, hash)) in (start..end).zip(&rows) {
            if *idx != expected {
                return Err(corrupt(format!("({level}, {expected}) is missing")));
            }
            out.push(
                Hash::try_from(hash.as_slice())
                    .map_err(|_| corrupt(format!("({level}, {idx}) is not 32 bytes")))?,
            );
        }
        if (out.len() as u64) < end.saturating_sub(start) {
            return Err(corrupt(format!(
                "({level}, {}) is missing",
                start + out.len() as u64
            )));
        }
        Ok(out)
    }
    /// The inclusion proof of leaf `index` in the tree of `size`.
    ///
    /// # Errors
    /// [`StoreError::BadProofRequest`] for an index or size outside the tree.
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError>;
    /// The consistency proof between tree sizes `from` and `to`.
    ///
    /// # Errors
    /// [`StoreError::BadProofRequest`] unless `from <= to <= tree size`.
    fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, StoreError>;
    /// Keeps a signed checkpoint of tree size `size`.
    ///
    /// Not flushed to disk on its own: the checkpoint is durable once the
    /// next append commits (SQLite `synchronous=NORMAL` for this one write,
    /// PostgreSQL `synchronous_commit = off` for its transaction), so a
    /// crash may lose the newest checkpoints, never a leaf. Nothing is lost
    /// with them: a checkpoint is a function of durable leaves and the audit
    /// key (the note has no timestamp and Ed25519 is deterministic), so the
    /// same bytes can be signed again.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn save_checkpoint(&self, size: u64, note: &str, at: OffsetDateTime) -> Result<(), StoreError>;
    /// [`Self::tree_size`], with the server it was read on: what
    /// [`Self::replicated`] holds the barrier to. SQLite has one file, and
    /// no name for it.
    ///
    /// # Errors
    /// As [`Self::tree_size`].
    fn tree_size_on(&self) -> Result<(u64, Server), StoreError> {
        Ok((self.tree_size()?, Server::default()))
    }
    /// Returns once every leaf of a tree read on `read_on` is as durable as
    /// an acknowledged append: before a checkpoint is signed over leaves
    /// this process did not itself commit. On PostgreSQL a transaction whose
    /// wait for a synchronous standby was cut short (lavd or an operator
    /// ending its backend after a lost connection) or that a crashed
    /// primary replayed is visible on the primary only; a failover would
    /// lose it, and a checkpoint signed over it would then be a fork. One
    /// commit that writes WAL after it, on the same server, waits for the
    /// standbys through it. SQLite has nothing to wait for.
    ///
    /// # Errors
    /// A store error, or the server is no longer the one `read_on` names
    /// (a failover between the read and now): nothing may be signed over
    /// the tree read.
    fn replicated(&self, read_on: &Server) -> Result<(), StoreError> {
        let _ = read_on;
        Ok(())
    }
    /// The newest saved checkpoint, `(size, note)`.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError>;
    /// Every saved checkpoint, `(size, note)`, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError>;
    /// Keeps a witness's cosignature line of the checkpoint of tree size
    /// `size` (already verified by the caller). A second line by the same
    /// witness on the same size is ignored: the first is kept.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] / [`StoreError::Postgres`].
    fn save_cosignature(&self, cosignature: &Cosignature) -> Result<(), StoreError>;
    /// Puts a newer line of the same witness on the same size (a refreshed
    /// cosignature, verified by the caller) in place of `previous`, the
    /// line the caller read; `false`, changing nothing, when the stored
    /// line is no longer `previous` (another replica refreshed it first).
    ///
    /// # Errors
    /// As [`AuditStore::save_cosignature`].
    fn replace_cosignature(
        &self,
        cosignature: &Cosignature,
        previous: &str,
    ) -> Result<bool, StoreError>;
    /// The largest checkpoint size `witness` has cosigned, if any.
    ///
    /// # Errors
    /// As [`AuditStore::save_cosignature`].
    fn last_cosigned(&self, witness: &str) -> Result<Option<u64>, StoreError>;
    /// The cosignatures of checkpoints whose size is in `sizes`, largest
    /// size first, at most `limit` of them.
    ///
    /// # Errors
    /// As [`AuditStore::save_cosignature`].
    fn cosignatures(
        &self,
        sizes: std::ops::Range<u64>,
        limit: u64,
    ) -> Result<Vec<Cosignature>, StoreError>;
    /// The saved checkpoint of tree size `size`, if any.
    ///
    /// # Errors
    /// As [`AuditStore::save_cosignature`].
    fn checkpoint_at(&self, size: u64) -> Result<Option<String>, StoreError>;
    /// How many append transactions have committed since open (group commit
    /// makes this far smaller than the number of appends under load).
    fn audit_commits(&self) -> u64;

    /// Up to `limit` open intents that no running request will settle,
    /// oldest first. On SQLite, every intent in the file: call it only
    /// before serving (one process uses the file). On PostgreSQL, those
    /// whose lease (`reservation_lease_secs`, as the reservation's) has run
    /// out: their replica stopped, or their request outlived its lease.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`], a PostgreSQL error, or
    /// [`StoreError::Corrupt`] for a row this code did not write.
    fn orphaned_intents(&self, limit: u64) -> Result<Vec<OpenIntent>, StoreError>;
}

/// A queued batch and the place its result goes.
pub(super) struct Pending {
    batch: AuditAppend,
    slot: Arc<Mutex<Option<Result<Appended, StoreError>>>>,
}

/// Group-commit state, part of each store: the leader/follower queue that
/// lets one transaction carry every batch queued while the previous one
/// committed. The backend supplies the commit.
#[derive(Default)]
pub(super) struct GroupCommit {
    state: Mutex<GroupState>,
    /// Signalled when a group commit finishes.
    finished: std::sync::Condvar,
    commits: AtomicU64,
}

#[derive(Default)]
struct GroupState {
    queue: Vec<Pending>,
    /// A caller is committing a group right now.
    leader: bool,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("commits", &self.commits.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent (push, take),
    // so a poisoned lock is usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pending {
    /// The batch to commit.
    pub(super) fn batch(&self) -> &AuditAppend {
        &self.batch
    }

    /// Hands the caller its result.
    pub(super) fn answer(&self, result: Result<Appended, StoreError>) {
        *lock(&self.slot) = Some(result);
    }
}

impl Drop for Pending {
    /// A batch dropped unanswered (the commit that carried it panicked)
    /// fails, so that its caller neither waits forever nor takes it as
    /// written.
    fn drop(&mut self) {
        let mut slot = lock(&self.slot);
        if slot.is_none() {
            *slot = Some(Err(StoreError::CommitFailed(
                "the group commit that carried this batch ended without an answer".into(),
            )));
        }
    }
}

/// The leader's turn: ended when dropped, also when its commit panics, so
/// that the callers queued behind it can form the next group.
struct Leading<'a>(&'a GroupCommit);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).leader = false;
        self.0.finished.notify_all();
    }
}

impl GroupCommit {
    /// Queues `batch` and waits for its result. Whichever caller finds no
    /// commit running becomes the leader and calls `commit` with every batch
    /// queued so far (its own included); `commit` must answer each one. New
    /// callers queue up meanwhile and form the next group.
    pub(super) fn submit(
        &self,
        batch: AuditAppend,
        mut commit: impl FnMut(Vec<Pending>),
    ) -> Result<Appended, StoreError> {
        let slot = Arc::new(Mutex::new(None));
        let mut state = lock(&self.state);
        state.queue.push(Pending {
            batch,
            slot: slot.clone(),
        });
        loop {
            if let Some(result) = lock(&slot).take() {
                return result;
            }
            if state.leader {
                // Someone is committing; our batch goes in the next group.
                state = self
                    .finished
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            state.leader = true;
            let batches = std::mem::take(&mut state.queue);
            drop(state);
            let leading = Leading(self);
            commit(batches);
            drop(leading);
            state = lock(&self.state);
        }
    }

    /// Whether batches are queued for the next group.
    pub(super) fn queued(&self) -> bool {
        !lock(&self.state).queue.is_empty()
    }

    /// Counts one committed transaction.
    pub(super) fn committed(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Transactions committed since open.
    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// Complete-subtree hashes read through a connection (inside a transaction
/// or savepoint, so that a batch sees its own earlier nodes).
struct SqlNodes<'a> {
    conn: &'a Connection,
    store: &'a SqliteStore,
}

/// An append group's tree before its rows are written: the stored nodes,
/// and the group's new ones in memory.
struct GroupNodes<'a> {
    stored: SqlNodes<'a>,
    fresh: &'a std::collections::HashMap<(u8, u64), Hash>,
}

impl HashReader for GroupNodes<'_> {
    type Error = StoreError;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, StoreError> {
        match self.fresh.get(&(level, index)) {
            Some(hash) => Ok(*hash),
            None => self.stored.subtree(level, index),
        }
    }
}

/// One batch's leaves (from index `first`) and tree nodes, to be written.
struct Rows {
    first: u64,
    leaves: Vec<Vec<u8>>,
    nodes: Vec<merkle::Node>,
}

impl HashReader for SqlNodes<'_> {
    type Error = StoreError;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, StoreError> {
        let idx = i64::try_from(index).map_err(|_| StoreError::OutOfRange("audit index"))?;
        let hash: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT hash FROM audit_nodes WHERE level = ?1 AND idx = ?2")
            .and_then(|mut s| s.query_row(params![level, idx], |row| row.get(0)))
            .optional()
            .map_err(|e| self.store.sqlite_err(e))?;
        let hash = hash.ok_or_else(|| {
            self.store
                .corrupt(format!("audit_nodes ({level}, {index}) is missing"))
        })?;
        hash.try_into().map_err(|_| {
            self.store
                .corrupt(format!("audit_nodes ({level}, {index}) is not 32 bytes"))
        })
    }
}

impl SqliteStore {
    fn size_in(&self, conn: &Connection) -> Result<u64, StoreError> {
        let max: Option<i64> = conn
            .prepare_cached("SELECT MAX(idx) FROM audit_leaves")
            .and_then(|mut s| s.query_row([], |row| row.get(0)))
            .map_err(|e| self.sqlite_err(e))?;
        match max {
            None => Ok(0),
            Some(m) => u64::try_from(m)
                .map(|m| m + 1)
                .map_err(|_| self.corrupt("negative audit index")),
        }
    }

    /// One batch's part of an append transaction, up to its rows: the
    /// spend (with its checks) written, its leaves encoded and its tree
    /// nodes computed over the stored nodes and `fresh`, those of the
    /// group's earlier batches. The leaves and nodes are written by
    /// [`Self::write_rows`], after the group's tree is handed to the
    /// commit hook. Returns what a revocation found and what a settlement
    /// found withdrawn, with the rows.
    fn prepare_in(
        &self,
        conn: &Connection,
        batch: &AuditAppend,
        first: u64,
        fresh: &std::collections::HashMap<(u8, u64), Hash>,
    ) -> Result<(RevokeFound, Withdrawn, Rows), StoreError> {
        // The revocation and destruction checks that count: in the
        // transaction that writes the unwrap's leaves, so they see every
        // revocation or destruction whose leaf comes before them in the log
        // (an earlier group, or an earlier batch of this group, which has
        // written its row in this same transaction), and none after. The
        // checks before the HSM opens only save work.
        let mut withdrawn = Withdrawn::default();
        let mut settled = None;
        let found = match &batch.spend {
            Spend::None => RevokeFound::default(),
            Spend::Settle {
                reservation,
                opened,
            } => {
                let kids = opened_kids(batch, reservation.id());
                withdrawn.destroyed_kids = self.destroyed_among(conn, &kids)?;
                if self.revoked_in(conn, reservation.id())? {
                    self.settle_in(conn, reservation, 0)?;
                    withdrawn.revoked = true;
                } else {
                    let spend = spendable(*opened, &kids, &withdrawn.destroyed_kids);
                    self.settle_in(conn, reservation, spend)?;
                }
                settled = Some(reservation.id());
                RevokeFound::default()
            }
            Spend::Revoke(revocation) => self.revoke_in(conn, revocation)?,
            Spend::InsertKey(record) => {
                self.insert_key_in(conn, record)?;
                RevokeFound::default()
            }
            Spend::DestroyKey { kid, at, reason } => {
                // One `key_destroyed` leaf per key: a second destruction
                // that raced the first fails alone.
                if !self.mark_destroyed_in(conn, kid, *at, reason)? {
                    return Err(StoreError::KeyAlreadyDestroyed(kid.clone()));
                }
                RevokeFound::default()
            }
            Spend::ClearIntent(id) => {
                let deleted = conn
                    .prepare_cached("DELETE FROM open_intents WHERE id = ?1")
                    .and_then(|mut s| s.execute([id]))
                    .map_err(|e| self.sqlite_err(e))?;
                if deleted != 1 {
                    return Err(StoreError::IntentSettled(*id));
                }
                RevokeFound::default()
            }
        };
        let (leaves, hashes) = encode_leaves(batch, first, settled.map(|id| (id, &withdrawn)))?;
        let tree = GroupNodes {
            stored: SqlNodes { conn, store: self },
            fresh,
        };
        let nodes = merkle::appended_nodes_batch(first, &hashes, &tree).map_err(tree_error)?;
        Ok((
            found,
            withdrawn,
            Rows {
                first,
                leaves,
                nodes,
            },
        ))
    }

    /// Writes the leaves and tree nodes [`Self::prepare_in`] made.
    fn write_rows(&self, conn: &Connection, rows: &Rows) -> Result<(), StoreError> {
        let to_i = |v: u64| i64::try_from(v).map_err(|_| StoreError::OutOfRange("audit index"));
        let mut insert = conn
            .prepare_cached("INSERT INTO audit_leaves (idx, leaf) VALUES (?1, ?2)")
            .map_err(|e| self.sqlite_err(e))?;
        for (seq, leaf) in (rows.first..).zip(&rows.leaves) {
            insert
                .execute(params![to_i(seq)?, leaf])
                .map_err(|e| self.sqlite_err(e))?;
        }
        let mut insert = conn
            .prepare_cached("INSERT INTO audit_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")
            .map_err(|e| self.sqlite_err(e))?;
        for node in &rows.nodes {
            insert
                .execute(params![node.level, to_i(node.index)?, node.hash.as_slice()])
                .map_err(|e| self.sqlite_err(e))?;
        }
        Ok(())
    }

    /// Which of `kids` (as [`opened_kids`] lists them) are destroyed, as
    /// the transaction `conn` sees them.
    fn destroyed_among(
        &self,
        conn: &Connection,
        kids: &[(String, u64)],
    ) -> Result<Vec<String>, StoreError> {
        let mut destroyed = Vec::new();
        let mut stmt = conn
            .prepare_cached("SELECT 1 FROM escrow_keys WHERE kid = ?1 AND destroyed_at IS NOT NULL")
            .map_err(|e| self.sqlite_err(e))?;
        for (kid, _) in kids {
            let row = stmt
                .query_row([kid], |_| Ok(()))
                .optional()
                .map_err(|e| self.sqlite_err(e))?;
            if row.is_some() {
                destroyed.push(kid.clone());
            }
        }
        Ok(destroyed)
    }

    /// Commits every queued batch in one transaction, calling
    /// `before_commit` once every batch is checked and its spend written,
    /// before the leaves and tree nodes are written and COMMIT. Called with
    /// the connection lock held.
    fn commit_group(
        &self,
        conn: &mut Connection,
        group: Vec<Pending>,
        before_commit: &mut BeforeCommit<'_>,
    ) {
        let mut done: Vec<(Pending, Result<Appended, StoreError>)> =
            Vec::with_capacity(group.len());
        // Outside the transaction closure, so that a group that fails before
        // its first batch (BEGIN IMMEDIATE busy past the timeout) still
        // answers every caller below, with the cause and its budget given
        // back (dropped unanswered, they would get only a generic error).
        let mut queue = group.into_iter();
        let outcome = (|| -> Result<u64, StoreError> {
            // Every append is flushed before it returns, whatever an
            // earlier checkpoint save left set (see `save_checkpoint`).
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(|e| self.sqlite_err(e))?;
            let mut tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| self.sqlite_err(e))?;
            // Marked copied by `lavd store copy` since this handle opened
            // the file (a `lavd keys` command that waited for the copy's
            // lock): its log goes on elsewhere, and nothing more is written
            // here. Read under the write lock, which the copy holds until
            // its mark is committed.
            if let Some((to, at, size)) = super::moved(&tx).map_err(|e| self.sqlite_err(e))? {
                return Err(StoreError::Moved {
                    store: self.path().display().to_string(),
                    to,
                    at,
                    size,
                });
            }
            let mut size = self.size_in(&tx)?;
            // The group's new tree nodes, kept here until they are written:
            // with the stored ones, the tree as it will commit.
            let mut fresh = std::collections::HashMap::new();
            let mut rows = Vec::new();
            for pending in queue.by_ref() {
                let first = size;
                let count = pending.batch.events.len() as u64;
                let result = (|| {
                    let sp = tx.savepoint().map_err(|e| self.sqlite_err(e))?;
                    let prepared = self.prepare_in(&sp, &pending.batch, first, &fresh)?;
                    sp.commit().map_err(|e| self.sqlite_err(e))?;
                    Ok(prepared)
                })();
                match result {
                    Ok((found, withdrawn, batch_rows)) => {
                        fresh.extend(
                            batch_rows
                                .nodes
                                .iter()
                                .map(|n| ((n.level, n.index), n.hash)),
                        );
                        rows.push(batch_rows);
                        size += count;
                        done.push((
                            pending,
                            Ok(Appended {
                                first_index: first,
                                count,
                                tree_size: 0,
                                newly_revoked: found.newly_revoked,
                                warrant_seen: found.warrant_seen,
                                withdrawn,
                            }),
                        ));
                    }
                    Err(e) => {
                        // After some errors (a full disk, an I/O error, an
                        // interrupt, a trigger's RAISE(ROLLBACK)) SQLite has
                        // rolled the whole transaction back by itself. The
                        // next batch's savepoint would then begin a new
                        // transaction, committed alone at its release, after
                        // a gap where this group's earlier batches were.
                        if tx.is_autocommit() {
                            let message = format!("SQLite rolled the append transaction back: {e}");
                            done.push((pending, Err(e)));
                            return Err(StoreError::CommitFailed(message));
                        }
                        done.push((pending, Err(e)));
                    }
                }
            }
            // The hook (the checkpoint signature, started in the HSM) runs
            // before the rows are written, so that the signature overlaps
            // their writing and the commit's flush. What it signs is what
            // commits, or nothing does: a write that fails below fails the
            // whole group.
            before_commit(&Uncommitted {
                size,
                nodes: &GroupNodes {
                    stored: SqlNodes {
                        conn: &tx,
                        store: self,
                    },
                    fresh: &fresh,
                },
                queued: self.group.queued(),
            });
            for batch_rows in &rows {
                // A read of the hook's, or a write before this one, that
                // SQLite answered by rolling the whole transaction back
                // (an I/O error, a full disk): the rows written now would
                // each commit on their own, without their spends. Nothing
                // more is written.
                if tx.is_autocommit() {
                    return Err(StoreError::CommitFailed(
                        "SQLite rolled the append transaction back before its leaves were \
                         written"
                            .into(),
                    ));
                }
                if let Err(e) = self.write_rows(&tx, batch_rows) {
                    return Err(StoreError::CommitFailed(if tx.is_autocommit() {
                        format!("SQLite rolled the append transaction back: {e}")
                    } else {
                        format!("writing the audit leaves and tree nodes: {e}")
                    }));
                }
            }
            tx.commit().map_err(|e| self.sqlite_err(e))?;
            Ok(size)
        })();
        match outcome {
            Ok(size) => {
                self.group.committed();
                for (pending, mut result) in done {
                    if let Ok(a) = result.as_mut() {
                        a.tree_size = size;
                    }
                    if result.is_err() {
                        self.give_back_spend(conn, &pending.batch.spend);
                    }
                    pending.answer(result);
                }
            }
            Err(e) => {
                // Nothing committed: every batch fails, and gets its budget
                // back; a store marked copied says so to each (its own
                // code, `store_moved`), any other failure as one message.
                let answer = |e: &StoreError| match e {
                    StoreError::Moved {
                        store,
                        to,
                        at,
                        size,
                    } => StoreError::Moved {
                        store: store.clone(),
                        to: to.clone(),
                        at: at.clone(),
                        size: *size,
                    },
                    StoreError::CommitFailed(message) => StoreError::CommitFailed(message.clone()),
                    other => StoreError::CommitFailed(other.to_string()),
                };
                for pending in done.into_iter().map(|(p, _)| p).chain(queue) {
                    self.give_back_spend(conn, &pending.batch.spend);
                    pending.answer(Err(answer(&e)));
                }
            }
        }
    }

    fn give_back_spend(&self, conn: &Connection, spend: &Spend) {
        if let Spend::Settle { reservation, .. } = spend {
            Self::give_back(conn, reservation);
        }
    }
}

impl AuditStore for SqliteStore {
    fn append_with(
        &self,
        batch: AuditAppend,
        before_commit: &mut BeforeCommit<'_>,
    ) -> Result<Appended, StoreError> {
        self.group.submit(batch, |batches| {
            let mut conn = self.conn();
            self.commit_group(&mut conn, batches, before_commit);
        })
    }

    fn tree_size(&self) -> Result<u64, StoreError> {
        self.size_in(&self.conn())
    }

    fn root(&self, size: u64) -> Result<Hash, StoreError> {
        // Through no nodes: every node read from the store.
        self.root_through(size, 0, 0, &[])
    }

    fn root_through(
        &self,
        size: u64,
        level: u8,
        first: u64,
        nodes: &[Hash],
    ) -> Result<Hash, StoreError> {
        let conn = self.conn();
        let tree = self.size_in(&conn)?;
        if size > tree {
            return Err(StoreError::BadProofRequest(format!(
                "size {size} exceeds the tree size {tree}"
            )));
        }
        let stored = SqlNodes {
            conn: &conn,
            store: self,
        };
        let through = merkle::Through {
            base: &stored,
            level,
            first,
            hashes: nodes,
        };
        merkle::root(&through, size).map_err(tree_error)
    }

    fn leaves(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let conn = self.conn();
        let to_i = |v: u64| i64::try_from(v).map_err(|_| StoreError::OutOfRange("audit index"));
        let mut stmt = conn
            .prepare_cached(
                "SELECT idx, leaf FROM audit_leaves WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
            )
            .map_err(|e| self.sqlite_err(e))?;
        let rows = stmt
            .query_map(params![to_i(start)?, to_i(end)?], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| self.sqlite_err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, leaf) = row.map_err(|e| self.sqlite_err(e))?;
            out.push((
                u64::try_from(idx).map_err(|_| self.corrupt("negative audit index"))?,
                leaf,
            ));
        }
        Ok(out)
    }

    fn reads_never_behind(&self) -> bool {
        true
    }

    fn leaves_vouched(&self, start: u64, end: u64) -> Result<(LeafRows, Vouched), StoreError> {
        Ok((self.leaves(start, end)?, Vouched::All))
    }

    fn node_rows_vouched(
        &self,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(NodeRows, Vouched), StoreError> {
        let conn = self.conn();
        let to_i = |v: u64| i64::try_from(v).map_err(|_| StoreError::OutOfRange("audit index"));
        let mut stmt = conn
            .prepare_cached(
                "SELECT idx, hash FROM audit_nodes WHERE level = ?1 AND idx >= ?2 AND idx < ?3 \
                 ORDER BY idx",
            )
            .map_err(|e| self.sqlite_err(e))?;
        let rows = stmt
            .query_map(params![level, to_i(start)?, to_i(end)?], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| self.sqlite_err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, hash) = row.map_err(|e| self.sqlite_err(e))?;
            let idx = u64::try_from(idx).map_err(|_| {
                self.corrupt(format!("audit_nodes ({level}, {idx}): a negative index"))
            })?;
            out.push((idx, hash));
        }
        Ok((out, Vouched::All))
    }

    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        let conn = self.conn();
        let tree = self.size_in(&conn)?;
        if size > tree || index >= size {
            return Err(StoreError::BadProofRequest(format!(
                "need index < size <= {tree}, got index {index}, size {size}"
            )));
        }
        merkle::inclusion_proof(
            &SqlNodes {
                conn: &conn,
                store: self,
            },
            index,
            size,
        )
        .map_err(tree_error)
    }

    fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, StoreError> {
        let conn = self.conn();
        let tree = self.size_in(&conn)?;
        if from > to || to > tree {
            return Err(StoreError::BadProofRequest(format!(
                "need from <= to <= {tree}, got from {from}, to {to}"
            )));
        }
        merkle::consistency_proof(
            &SqlNodes {
                conn: &conn,
                store: self,
            },
            from,
            to,
        )
        .map_err(tree_error)
    }

    fn save_checkpoint(&self, size: u64, note: &str, at: OffsetDateTime) -> Result<(), StoreError> {
        let size = i64::try_from(size).map_err(|_| StoreError::OutOfRange("tree size"))?;
        let conn = self.conn();
        // No WAL fsync of its own: the next append's FULL commit flushes it
        // (the WAL is one sequential file), and a crash before that loses
        // only a checkpoint that can be signed again (see the trait).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| self.sqlite_err(e))?;
        let inserted = conn
            .prepare_cached(
                "INSERT INTO audit_checkpoints (size, note, signed_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (size) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![size, note, format_time(at)]));
        // Back to FULL for every other write on this connection (warrant
        // registrations); the audit append sets it again itself.
        let restored = conn.pragma_update(None, "synchronous", "FULL");
        inserted.map_err(|e| self.sqlite_err(e))?;
        restored.map_err(|e| self.sqlite_err(e))?;
        Ok(())
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn()
            .query_row(
                "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|e| self.sqlite_err(e))?;
        row.map(|(size, note)| {
            u64::try_from(size)
                .map(|s| (s, note))
                .map_err(|_| self.corrupt("negative checkpoint size"))
        })
        .transpose()
    }

    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT size, note FROM audit_checkpoints ORDER BY size")
            .map_err(|e| self.sqlite_err(e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(|e| self.sqlite_err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (size, note) = row.map_err(|e| self.sqlite_err(e))?;
            let size = u64::try_from(size).map_err(|_| self.corrupt("negative checkpoint size"))?;
            out.push((size, note));
        }
        Ok(out)
    }

    fn save_cosignature(&self, c: &Cosignature) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO audit_cosignatures (size, witness, line) VALUES (?1, ?2, ?3)
                 ON CONFLICT (size, witness) DO NOTHING",
                params![
                    i64::try_from(c.size).map_err(|_| StoreError::OutOfRange("tree size"))?,
                    c.witness,
                    c.line
                ],
            )
            .map_err(|e| self.sqlite_err(e))?;
        Ok(())
    }

    fn replace_cosignature(&self, c: &Cosignature, previous: &str) -> Result<bool, StoreError> {
        let changed = self
            .conn()
            .execute(
                "UPDATE audit_cosignatures SET line = ?3
                 WHERE size = ?1 AND witness = ?2 AND line = ?4",
                params![
                    i64::try_from(c.size).map_err(|_| StoreError::OutOfRange("tree size"))?,
                    c.witness,
                    c.line,
                    previous
                ],
            )
            .map_err(|e| self.sqlite_err(e))?;
        Ok(changed == 1)
    }

    fn last_cosigned(&self, witness: &str) -> Result<Option<u64>, StoreError> {
        let size: Option<i64> = self
            .conn()
            .query_row(
                "SELECT MAX(size) FROM audit_cosignatures WHERE witness = ?1",
                params![witness],
                |row| row.get(0),
            )
            .map_err(|e| self.sqlite_err(e))?;
        size.map(|s| u64::try_from(s).map_err(|_| self.corrupt("negative cosigned size")))
            .transpose()
    }

    fn cosignatures(
        &self,
        sizes: std::ops::Range<u64>,
        limit: u64,
    ) -> Result<Vec<Cosignature>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT size, witness, line FROM audit_cosignatures WHERE size >= ?1 AND size < ?2
                 ORDER BY size DESC, witness LIMIT ?3",
            )
            .map_err(|e| self.sqlite_err(e))?;
        let rows = stmt
            .query_map(
                params![
                    i64::try_from(sizes.start).map_err(|_| StoreError::OutOfRange("tree size"))?,
                    // Every size a row can hold is below i64::MAX.
                    i64::try_from(sizes.end).unwrap_or(i64::MAX),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                    ))
                },
            )
            .map_err(|e| self.sqlite_err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (size, witness, line) = row.map_err(|e| self.sqlite_err(e))?;
            let size = u64::try_from(size).map_err(|_| self.corrupt("negative cosigned size"))?;
            out.push(Cosignature {
                size,
                witness,
                line,
            });
        }
        Ok(out)
    }

    fn checkpoint_at(&self, size: u64) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(
                "SELECT note FROM audit_checkpoints WHERE size = ?1",
                params![i64::try_from(size).map_err(|_| StoreError::OutOfRange("tree size"))?],
                |row| row.get(0),
            )
            .optional()
            .map_err(|e| self.sqlite_err(e))
    }

    fn audit_commits(&self) -> u64 {
        self.group.commits()
    }

    fn orphaned_intents(&self, limit: u64) -> Result<Vec<OpenIntent>, StoreError> {
        let limit = super::warrants::to_i64(limit, "limit")?;
        let rows: Vec<(i64, String, String, Vec<u8>)> = self
            .conn()
            .prepare_cached(
                "SELECT id, warrant_id, created_at, leaves FROM open_intents ORDER BY id LIMIT ?1",
            )
            .and_then(|mut s| {
                s.query_map([limit], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect()
            })
            .map_err(|e| self.sqlite_err(e))?;
        rows.into_iter()
            .map(|(id, warrant_id, created_at, blob)| {
                let corrupt = |what: String| self.corrupt(what);
                let created_at = crate::codec::parse_time(&created_at)
                    .map_err(|e| corrupt(format!("open_intents {id}: created_at: {e}")))?;
                let parts: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(&blob)
                    .map_err(|e| corrupt(format!("open_intents {id}: leaves: {e}")))?;
                let parts: Vec<&[u8]> = parts.iter().map(|p| p.get().as_bytes()).collect();
                Ok(OpenIntent {
                    id,
                    warrant_id,
                    created_at,
                    leaves: intent_leaves(id, &parts, corrupt)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::AssertUnwindSafe;
    use std::sync::mpsc;
    use std::time::Duration;

    fn empty() -> AuditAppend {
        AuditAppend {
            events: Vec::new(),
            time: time::OffsetDateTime::UNIX_EPOCH,
            spend: Spend::None,
        }
    }

    fn written(pending: &Pending) {
        pending.answer(Ok(Appended {
            first_index: 0,
            count: 0,
            tree_size: 0,
            newly_revoked: false,
            warrant_seen: false,
            withdrawn: Withdrawn::default(),
        }));
    }

    /// A commit that panics (a bug; release builds check overflow) fails
    /// every batch of its group, and the next group still commits: no
    /// caller waits forever behind it. (Threads are not joined, so that a
    /// caller stuck forever fails the test instead of hanging it.)
    #[test]
    fn a_commit_that_panics_fails_its_group_and_the_next_one_commits() {
        let group = Arc::new(GroupCommit::default());
        let (done, results) = mpsc::channel();
        // The first leader holds its commit while two more queue; they form
        // the next group, whose commit panics.
        let g = group.clone();
        std::thread::spawn(move || {
            g.submit(empty(), |batches| {
                std::thread::sleep(Duration::from_millis(300));
                batches.iter().for_each(written);
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..2 {
            let (g, done) = (group.clone(), done.clone());
            std::thread::spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    g.submit(empty(), |_| panic!("a bug in the commit"))
                }));
                done.send(result.map(|r| r.is_ok()).ok()).unwrap();
            });
        }
        // The second group's leader panicked; the other caller got an error.
        let mut outcomes: Vec<_> = (0..2)
            .map(|_| results.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        outcomes.sort();
        assert_eq!(outcomes, [None, Some(false)]);
        let result = group.submit(empty(), |batches| batches.iter().for_each(written));
        assert!(result.is_ok(), "{result:?}");
    }
}
