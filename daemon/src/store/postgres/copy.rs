//! `lavd store copy`: an SQLite store into an empty PostgreSQL one, in one
//! PostgreSQL transaction.
//!
//! Copied: key metadata, warrants (first-seen payloads, budgets with their
//! `spent`), revocations, every audit leaf, every saved checkpoint and every
//! witness cosignature (each on a copied checkpoint; the lines were verified
//! against the witness keys before they were stored, and a verifier checks
//! them again against its own policy).
//! Not copied: the subtree hashes, which are recomputed from the leaves
//! here; and reservations (per-process in SQLite, gone with the process).
//! A source that holds open intents (HSM opens of a process that stopped
//! before their audit commit) is refused: `lavd serve` on it writes their
//! `open_interrupted` leaves at its start, and then it can be copied.
//!
//! The log is re-verified while copying: each leaf's `seq` is its index,
//! every stored checkpoint's signature verifies under the audit key and its
//! root equals the root recomputed from the copied leaves, and the
//! recomputed root of the whole tree equals SQLite's. Anything else aborts
//! the transaction. The target must be empty; an interrupted copy commits
//! nothing, so running it again is safe.

use postgres::Transaction;

use super::{PgNodes, PgStore};
use crate::audit::merkle;
use crate::audit::note::{self, VerifierKey};
use crate::store::{AuditStore as _, SqliteStore, StoreError};

/// What a copy moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Escrow key records.
    pub keys: u64,
    /// Warrants.
    pub warrants: u64,
    /// Revocations.
    pub revocations: u64,
    /// Audit leaves (the tree size).
    pub leaves: u64,
    /// Saved checkpoints, each verified.
    pub checkpoints: u64,
    /// Witness cosignatures.
    pub cosignatures: u64,
    /// The RFC 6962 root of the whole tree, identical on both sides.
    pub root: merkle::Hash,
}

/// Leaves per insert.
const CHUNK: usize = 1000;

impl PgStore {
    /// Copies `from` into this (empty) store; see the module doc.
    ///
    /// # Errors
    /// [`StoreError::CopyRefused`] for a non-empty target or a log that does
    /// not verify; the backends' errors. Nothing is committed on error.
    pub fn copy_from_sqlite(
        &self,
        from: &SqliteStore,
        key: &VerifierKey,
    ) -> Result<CopyReport, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction().map_err(|e| self.pg_err(e))?;
        // Keep any lavd already pointed at the target from appending.
        self.size_in(&mut tx, true)?;
        let used: i64 = tx
            .query_one(
                // Every table a store writes, and the head's size: a
                // database emptied by hand of some tables only (its open
                // intents kept, which a replica's sweep would log as
                // `open_interrupted` for warrants never asked of it) is
                // not empty.
                "SELECT (SELECT count(*) FROM escrow_keys) + (SELECT count(*) FROM warrants)
                      + (SELECT count(*) FROM warrant_revocations)
                      + (SELECT count(*) FROM warrant_reservations)
                      + (SELECT count(*) FROM cancelled_reservations)
                      + (SELECT count(*) FROM open_intents)
                      + (SELECT count(*) FROM audit_leaves)
                      + (SELECT count(*) FROM audit_nodes)
                      + (SELECT count(*) FROM audit_commit_marks)
                      + (SELECT count(*) FROM audit_checkpoints)
                      + (SELECT count(*) FROM audit_cosignatures)
                      + (SELECT coalesce(sum(size), 0) FROM audit_head)::bigint",
                &[],
            )
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.pg_err(e))?;
        if used > 0 {
            return Err(StoreError::CopyRefused(format!(
                "the target {} is not empty ({used} rows); copy only into a new database",
                self.describe
            )));
        }
        let sqlite = from.conn();
        // One transaction, holding the source's write lock: a consistent
        // snapshot, and no other writer (a `lavd keys destroy` timer, a
        // `lavd keys generate`: `lavd serve` holds the file's lock and is
        // refused before) commits to it from here until it is marked
        // copied, which refuses every later open of it (a write there
        // would fork the log or record what the copy never sees).
        sqlite
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| from.sqlite_err(e))?;
        let intents: rusqlite::Result<i64> =
            sqlite.query_row("SELECT count(*) FROM open_intents", [], |r| r.get(0));
        let result = match intents {
            Err(e) => Err(from.sqlite_err(e)),
            Ok(n) if n > 0 => Err(StoreError::CopyRefused(format!(
                "the source holds {n} open intent(s): HSM opens of a process that stopped before \
                 their audit commit, not yet in the log; run `lavd serve` on it once (it logs \
                 them as open_interrupted at its start), stop it, then copy"
            ))),
            Ok(_) => self.copy_rows(&sqlite, from, &mut tx, key),
        };
        // The transaction stays open on the connection; the store's own
        // reads below take the connection again, inside it.
        drop(sqlite);
        let copied = result.and_then(|report| {
            // The source's own stored tree: the root must be identical.
            if from.tree_size()? != report.leaves || from.root(report.leaves)? != report.root {
                return Err(StoreError::CopyRefused(
                    "the source's stored tree does not match its leaves".into(),
                ));
            }
            Ok(report)
        });
        let sqlite = from.conn();
        let report = match copied {
            Ok(report) => report,
            Err(e) => {
                // Nothing copied: the source as it was.
                let _ = sqlite.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        // The source is marked copied before PostgreSQL commits, in the
        // transaction that read it: whatever happens from here (an answer
        // lost, a crash between the two commits), the file is never
        // written to while the copy may be the log. Taken back only when
        // PostgreSQL says for certain it did not commit.
        let at = crate::codec::format_time(time::OffsetDateTime::now_utc());
        let size = i64::try_from(report.leaves).unwrap_or(i64::MAX);
        let marked = sqlite
            .execute_batch(crate::store::MOVED_TABLE)
            .and_then(|()| {
                sqlite.execute(
                    "INSERT INTO store_moved (id, to_store, at, size) VALUES (0, ?1, ?2, ?3)",
                    rusqlite::params![self.describe, at, size],
                )
            })
            .and_then(|_| sqlite.execute_batch("COMMIT"));
        if let Err(e) = marked {
            let _ = sqlite.execute_batch("ROLLBACK");
            return Err(from.sqlite_err(e));
        }
        drop(sqlite);
        let (committed, warned) = super::warned_during(|| tx.commit());
        if let Err(e) = committed {
            // Only the server's own refusal of the statement says the
            // COMMIT did not happen; a connection lost while it was sent,
            // or a server going down or crashing as it answered, says
            // nothing (the group commit's rule, `commit_fate_unknown`).
            let refused = !super::commit_fate_unknown(
                e.as_db_error().and_then(|d| d.parsed_severity()),
                e.code().map(postgres::error::SqlState::code),
            );
            let e = self.pg_err(e);
            if !refused {
                return Err(StoreError::CommitUnknown(format!(
                    "the copy's COMMIT got no answer ({e}): whether {} holds the copy is \
                     unknown, so this file stays marked copied. If that database holds the log \
                     (its leaves), use it; if it is empty, remove the mark (sqlite3 FILE 'DROP \
                     TABLE store_moved') and copy again",
                    self.describe
                )));
            }
            // Not committed: the source is the store again (the table
            // itself marks it, row or not).
            let unmarked = from
                .conn()
                .execute_batch("BEGIN IMMEDIATE; DROP TABLE store_moved; COMMIT;");
            if let Err(u) = unmarked {
                let _ = from.conn().execute_batch("ROLLBACK");
                return Err(StoreError::Unavailable {
                    store: from.path().display().to_string(),
                    reason: format!(
                        "the copy did not commit ({e}), and the mark this file was given before \
                         could not be taken back ({u}): remove it (sqlite3 FILE 'DROP TABLE \
                         store_moved') before using the file again"
                    ),
                });
            }
            return Err(e);
        }
        // Answered with a WARNING (a wait for the synchronous standbys
        // cancelled): the copy is on this server only until a barrier on
        // the same connection shows it replicated. The source stays marked.
        if warned {
            self.barrier_on(&mut conn).map_err(|e| {
                StoreError::CommitUnknown(format!(
                    "the copy committed with a warning (a wait for the synchronous standbys \
                     cancelled?), and is not known to be on them: {e}"
                ))
            })?;
        }
        Ok(report)
    }

    fn copy_rows(
        &self,
        sqlite: &rusqlite::Connection,
        from: &SqliteStore,
        tx: &mut Transaction<'_>,
        key: &VerifierKey,
    ) -> Result<CopyReport, StoreError> {
        let se = |e| from.sqlite_err(e);
        let refused = |what: String| StoreError::CopyRefused(what);

        let mut keys = 0;
        let mut stmt = sqlite
            .prepare(
                "SELECT kid, public_sec1, not_before, not_after, destroy_after, created_at,
                        destroyed_at, destroy_reason FROM escrow_keys ORDER BY kid",
            )
            .map_err(se)?;
        let mut rows = stmt.query([]).map_err(se)?;
        while let Some(r) = rows.next().map_err(se)? {
            let kid: String = r.get(0).map_err(se)?;
            let sec1: Vec<u8> = r.get(1).map_err(se)?;
            let times: [String; 4] = [
                r.get(2).map_err(se)?,
                r.get(3).map_err(se)?,
                r.get(4).map_err(se)?,
                r.get(5).map_err(se)?,
            ];
            let [nb, na, da, ca] = &times;
            let dd: Option<String> = r.get(6).map_err(se)?;
            let dr: Option<String> = r.get(7).map_err(se)?;
            tx.execute(
                "INSERT INTO escrow_keys (kid, public_sec1, not_before, not_after, destroy_after,
                                          created_at, destroyed_at, destroy_reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&kid, &sec1, &nb, &na, &da, &ca, &dd, &dr],
            )
            .map_err(|e| self.pg_err(e))?;
            keys += 1;
        }
        drop(rows);
        drop(stmt);

        let mut warrants = 0;
        let mut stmt = sqlite
            .prepare(
                "SELECT id, payload_digest, normalized_digest, emergency, max_unwraps, spent,
                        first_seen, upgraded_at FROM warrants ORDER BY id",
            )
            .map_err(se)?;
        let mut rows = stmt.query([]).map_err(se)?;
        while let Some(r) = rows.next().map_err(se)? {
            let id: String = r.get(0).map_err(se)?;
            let pd: Vec<u8> = r.get(1).map_err(se)?;
            let nd: Vec<u8> = r.get(2).map_err(se)?;
            let em: bool = r.get(3).map_err(se)?;
            let max: i64 = r.get(4).map_err(se)?;
            let spent: i64 = r.get(5).map_err(se)?;
            let fs: String = r.get(6).map_err(se)?;
            let up: Option<String> = r.get(7).map_err(se)?;
            tx.execute(
                "INSERT INTO warrants (id, payload_digest, normalized_digest, emergency,
                                       max_unwraps, spent, first_seen, upgraded_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&id, &pd, &nd, &em, &max, &spent, &fs, &up],
            )
            .map_err(|e| self.pg_err(e))?;
            warrants += 1;
        }
        drop(rows);
        drop(stmt);

        let mut revocations = 0;
        let mut stmt = sqlite
            .prepare(
                "SELECT id, reason, revoked_by, revoked_at FROM warrant_revocations ORDER BY id",
            )
            .map_err(se)?;
        let mut rows = stmt.query([]).map_err(se)?;
        while let Some(r) = rows.next().map_err(se)? {
            let (id, reason, by, at): (String, String, String, String) = (
                r.get(0).map_err(se)?,
                r.get(1).map_err(se)?,
                r.get(2).map_err(se)?,
                r.get(3).map_err(se)?,
            );
            tx.execute(
                "INSERT INTO warrant_revocations (id, reason, revoked_by, revoked_at)
                 VALUES ($1, $2, $3, $4)",
                &[&id, &reason, &by, &at],
            )
            .map_err(|e| self.pg_err(e))?;
            revocations += 1;
        }
        drop(rows);
        drop(stmt);

        // The leaves, in order, with the tree recomputed as they go in.
        let mut size: u64 = 0;
        let mut stmt = sqlite
            .prepare("SELECT idx, leaf FROM audit_leaves ORDER BY idx")
            .map_err(se)?;
        let mut rows = stmt.query([]).map_err(se)?;
        let mut chunk: Vec<Vec<u8>> = Vec::with_capacity(CHUNK);
        loop {
            let row = rows.next().map_err(se)?;
            if let Some(r) = row {
                let idx: i64 = r.get(0).map_err(se)?;
                let leaf: Vec<u8> = r.get(1).map_err(se)?;
                let expected = size + chunk.len() as u64;
                if u64::try_from(idx).ok() != Some(expected) {
                    return Err(refused(format!(
                        "the source log has leaf {idx} where leaf {expected} should be"
                    )));
                }
                let seq = serde_json::from_slice::<serde_json::Value>(&leaf)
                    .ok()
                    .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64));
                if seq != Some(expected) {
                    return Err(refused(format!(
                        "the source leaf {expected} does not carry seq {expected}"
                    )));
                }
                chunk.push(leaf);
            }
            let last = row.is_none();
            if chunk.len() == CHUNK || (last && !chunk.is_empty()) {
                let hashes: Vec<_> = chunk.iter().map(|l| merkle::leaf_hash(l)).collect();
                self.write_leaves(tx, size, &chunk, &hashes, None, None)?;
                size += chunk.len() as u64;
                chunk.clear();
            }
            if last {
                break;
            }
        }
        drop(rows);
        drop(stmt);
        tx.execute(
            "UPDATE audit_head SET size = $1 WHERE id = 1",
            &[&i64::try_from(size).map_err(|_| StoreError::OutOfRange("tree size"))?],
        )
        .map_err(|e| self.pg_err(e))?;

        // Every checkpoint: signed by the audit key, and a root of the
        // recomputed tree.
        let mut checkpoints = 0;
        let mut stmt = sqlite
            .prepare("SELECT size, note, signed_at FROM audit_checkpoints ORDER BY size")
            .map_err(se)?;
        let stored = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(se)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(se)?;
        drop(stmt);
        for (cp_size, text, signed_at) in stored {
            let cp_size = u64::try_from(cp_size)
                .map_err(|_| refused(format!("negative checkpoint size {cp_size}")))?;
            let cp = note::verify_checkpoint(&text, key).map_err(|e| {
                refused(format!(
                    "the stored checkpoint of size {cp_size} does not verify under the audit key: {e}"
                ))
            })?;
            if cp.size != cp_size || cp.size > size {
                return Err(refused(format!(
                    "the stored checkpoint filed under size {cp_size} says size {} (tree {size})",
                    cp.size
                )));
            }
            let root = {
                let reader = PgNodes::new(&mut *tx, self);
                merkle::root(&reader, cp.size).map_err(Self::tree_err)?
            };
            if root != cp.root {
                return Err(refused(format!(
                    "the leaves do not hash to the checkpoint of size {cp_size}: the source log \
                     was altered"
                )));
            }
            tx.execute(
                "INSERT INTO audit_checkpoints (size, note, signed_at) VALUES ($1, $2, $3)",
                &[
                    &i64::try_from(cp_size).map_err(|_| StoreError::OutOfRange("tree size"))?,
                    &text,
                    &signed_at,
                ],
            )
            .map_err(|e| self.pg_err(e))?;
            checkpoints += 1;
        }
        // Every cosignature, on a checkpoint copied above.
        let mut cosignatures = 0;
        let mut stmt = sqlite
            .prepare("SELECT size, witness, line FROM audit_cosignatures ORDER BY size, witness")
            .map_err(se)?;
        let mut rows = stmt.query([]).map_err(se)?;
        while let Some(r) = rows.next().map_err(se)? {
            let (cp_size, witness, line): (i64, String, String) = (
                r.get(0).map_err(se)?,
                r.get(1).map_err(se)?,
                r.get(2).map_err(se)?,
            );
            let inserted = tx
                .execute(
                    "INSERT INTO audit_cosignatures (size, witness, line)
                     SELECT $1, $2, $3 WHERE EXISTS
                         (SELECT 1 FROM audit_checkpoints WHERE size = $1)",
                    &[&cp_size, &witness, &line],
                )
                .map_err(|e| self.pg_err(e))?;
            if inserted != 1 {
                return Err(refused(format!(
                    "the source has a cosignature by {witness} of size {cp_size}, which has no \
                     saved checkpoint"
                )));
            }
            cosignatures += 1;
        }
        drop(rows);
        drop(stmt);
        let root = {
            let reader = PgNodes::new(&mut *tx, self);
            merkle::root(&reader, size).map_err(Self::tree_err)?
        };
        Ok(CopyReport {
            keys,
            warrants,
            revocations,
            leaves: size,
            checkpoints,
            cosignatures,
            root,
        })
    }
}
