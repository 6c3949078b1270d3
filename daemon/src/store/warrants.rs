//! Warrant state that must outlive the process: the first-seen payload digest
//! of each warrant `id`, its budget, and revocations.
//!
//! Budget protocol (PROTOCOL §5, "the count never exceeds `max_unwraps`"):
//! [`WarrantStore::reserve`] grants up to `n` units that are neither spent nor
//! reserved, atomically; the caller opens at most that many envelopes and
//! [`WarrantStore::settle`]s with the number actually opened, which commits
//! the spend and gives the rest back. Reservations live in a `TEMP` table of
//! the store's one connection: they are per process and vanish with it, so a
//! crash between reserve and settle leaks nothing (and nothing was released
//! for a reservation that never settled, because release comes after the
//! settle transaction commits). The settle `UPDATE` also refuses, in SQL, to
//! push `spent` past `max_unwraps`, so even a second process wrongly sharing
//! the file cannot make released keys exceed the budget.
//!
//! Revocation: `reserve` refuses a revoked `id`, but a revocation can commit
//! between `reserve` and the settle. The audit append that settles an unwrap
//! ([`super::Spend::Settle`]) therefore reads the revocation again in its own
//! transaction (`SqliteStore::revoked_in`) and, if it finds one, spends nothing
//! and records the would-be opened envelopes as denied `warrant_revoked`.

use rusqlite::{params, OptionalExtension as _, Transaction, TransactionBehavior};
use time::OffsetDateTime;

use super::{SqliteStore, StoreError};
use crate::codec::{format_time, parse_time};

/// What is recorded about a warrant the first time its `id` is seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarrantRecord {
    /// The warrant `id`.
    pub id: String,
    /// SHA-256 of the JWS payload bytes.
    pub payload_digest: [u8; 32],
    /// SHA-256 of the canonical claims without `emergency`.
    pub normalized_digest: [u8; 32],
    /// Whether it is an urgent warrant.
    pub emergency: bool,
    /// Its budget.
    pub max_unwraps: u64,
    /// When it was presented.
    pub seen_at: OffsetDateTime,
}

/// What [`WarrantStore::register`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// First time this `id` is seen; its budget starts at zero spent.
    New,
    /// The same payload was seen before.
    Known,
    /// A fully signed warrant replaced the urgent one with this `id`; the
    /// spent count carries over and the urgent payload is refused from now on.
    Upgraded,
}

/// Units of budget granted to one request, to be settled exactly once.
/// Deliberately not `Clone`. If dropped unsettled, its units stay reserved
/// until the process restarts (SQLite) or its lease expires (PostgreSQL,
/// `reservation_lease_secs`): the budget is under-used, never exceeded.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation must be settled, or its units stay reserved until restart"]
pub struct Reservation {
    id: String,
    requested: u64,
    granted: u64,
    token: Option<i64>,
    intent: Option<i64>,
}

impl Reservation {
    /// A reservation a backend granted; `token` names its row, if any.
    pub(super) fn new(id: &str, requested: u64, granted: u64, token: Option<i64>) -> Self {
        Self {
            id: id.to_string(),
            requested,
            granted,
            token,
            intent: None,
        }
    }

    /// The reservation with its open intent's row (`open_intents.id`).
    pub(super) fn with_intent(mut self, intent: Option<i64>) -> Self {
        self.intent = intent;
        self
    }

    /// The row of `open_intents` written with the reservation
    /// ([`WarrantStore::reserve_with_intent`]), if any: the settle deletes
    /// it, and after a failed settle the leaves that replace it name it
    /// ([`crate::store::Spend::ClearIntent`]).
    pub fn intent(&self) -> Option<i64> {
        self.intent
    }

    /// The backend's handle on the reservation's row.
    pub(super) fn token(&self) -> Option<i64> {
        self.token
    }

    /// The warrant `id`.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// How many units were asked for.
    pub fn requested(&self) -> u64 {
        self.requested
    }
    /// How many were granted (`≤ requested`); the rest are `budget_exhausted`.
    pub fn granted(&self) -> u64 {
        self.granted
    }
}

/// A durable, final revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The revoked warrant `id`.
    pub id: String,
    /// Why, as given by the revoker.
    pub reason: String,
    /// Who: the admin identity or the authority `kid`.
    pub revoked_by: String,
    /// When.
    pub revoked_at: OffsetDateTime,
}

/// Warrant id, budget and revocation storage.
pub trait WarrantStore: Send + Sync {
    /// Records `record` the first time its `id` is seen; afterwards accepts
    /// the same payload, and lets a fully signed warrant replace an urgent one
    /// with the same normalized claims.
    ///
    /// # Errors
    /// [`StoreError::WarrantIdConflict`] for a different warrant with a known
    /// id; [`StoreError::EmergencySuperseded`] for an urgent warrant whose id
    /// already has a fully signed version; [`StoreError::Sqlite`].
    fn register(&self, record: &WarrantRecord) -> Result<Registration, StoreError>;

    /// Reserves up to `n` units of the warrant's budget. Grants fewer (maybe
    /// zero) when fewer remain; never more than `max_unwraps − spent −
    /// reserved`, whatever the concurrency.
    ///
    /// # Errors
    /// [`StoreError::UnknownWarrant`] if `id` was not registered,
    /// [`StoreError::WarrantRevoked`] if it is revoked; [`StoreError::Sqlite`].
    fn reserve(&self, id: &str, n: u64) -> Result<Reservation, StoreError>;

    /// As [`WarrantStore::reserve`] for `intent.len()` envelopes, and, in the
    /// same durable transaction when anything is granted, the open intent:
    /// a row of `open_intents` holding the first `granted` of `intent`, the
    /// serialized [`crate::audit::leaf::Unwrap`] leaves (each denied
    /// `open_interrupted`) to write should the process stop between the
    /// HSM opens and the audit commit. The settle deletes it with the
    /// request's leaves; otherwise [`crate::store::AuditStore::orphaned_intents`]
    /// finds it. So every HSM open is preceded by a durable record of it.
    ///
    /// # Errors
    /// As [`WarrantStore::reserve`].
    fn reserve_with_intent(&self, id: &str, intent: &[Vec<u8>]) -> Result<Reservation, StoreError>;

    /// Commits `opened` units as spent and gives the rest of the reservation
    /// back, in one transaction. On error nothing is spent and the whole
    /// reservation is given back.
    ///
    /// # Errors
    /// [`StoreError::SettleExceedsReservation`], [`StoreError::UnknownReservation`],
    /// [`StoreError::BudgetOverrun`], [`StoreError::Sqlite`].
    fn settle(&self, reservation: Reservation, opened: u64) -> Result<(), StoreError>;

    /// Revokes a warrant id, durably and finally. Returns `false` if it was
    /// already revoked (the first revocation is kept).
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError>;

    /// The revocation of `id`, if any.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] or [`StoreError::Corrupt`].
    fn revocation(&self, id: &str) -> Result<Option<Revocation>, StoreError>;

    /// Whether `id` is revoked.
    ///
    /// # Errors
    /// As [`WarrantStore::revocation`].
    fn is_revoked(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.revocation(id)?.is_some())
    }

    /// Units spent (committed) on `id`, or `None` if it was never registered.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] or [`StoreError::Corrupt`].
    fn spent(&self, id: &str) -> Result<Option<u64>, StoreError>;
}

const CREATE_RESERVATIONS: &str = "CREATE TEMP TABLE IF NOT EXISTS warrant_reservations (
    token      INTEGER PRIMARY KEY,
    warrant_id TEXT NOT NULL,
    granted    INTEGER NOT NULL CHECK (granted > 0)
) STRICT";

pub(super) fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange(what))
}

impl SqliteStore {
    fn to_u64(&self, v: i64, what: &str) -> Result<u64, StoreError> {
        u64::try_from(v).map_err(|_| self.corrupt(format!("negative {what}")))
    }

    fn digest_from(&self, bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
        bytes
            .try_into()
            .map_err(|_| self.corrupt(format!("warrants.{what} is not 32 bytes")))
    }

    /// [`WarrantStore::reserve`], with the open intent when `intent` is
    /// given: then the transaction writes the main file, and commits with
    /// a flush (`synchronous = FULL`), before any HSM open.
    fn reserve_in(
        &self,
        id: &str,
        n: u64,
        intent: Option<&[Vec<u8>]>,
    ) -> Result<Reservation, StoreError> {
        // No candidate, no intent: nothing to write.
        let intent = intent.filter(|leaves| !leaves.is_empty());
        let mut conn = self.conn();
        conn.prepare_cached(CREATE_RESERVATIONS)
            .and_then(|mut s| s.execute([]))
            .map_err(|e| self.sqlite_err(e))?;
        if intent.is_some() {
            // Whatever an earlier checkpoint save left set.
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(|e| self.sqlite_err(e))?;
        }
        // The connection mutex is held from here to commit, so no other
        // reservation or settle of this process interleaves. With an intent
        // it writes the main file: IMMEDIATE takes the write lock first, and
        // waits for another process's (a `lavd` command) under the busy
        // timeout, where a read upgraded to a write would fail at once.
        let behavior = if intent.is_some() {
            TransactionBehavior::Immediate
        } else {
            TransactionBehavior::Deferred
        };
        let tx = conn
            .transaction_with_behavior(behavior)
            .map_err(|e| self.sqlite_err(e))?;
        let (max, spent) = tx
            .prepare_cached("SELECT max_unwraps, spent FROM warrants WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([id], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
                })
            })
            .optional()
            .map_err(|e| self.sqlite_err(e))?
            .ok_or_else(|| StoreError::UnknownWarrant(id.to_string()))?;
        if self.revoked_in(&tx, id)? {
            return Err(StoreError::WarrantRevoked(id.to_string()));
        }
        let reserved: i64 = tx
            .prepare_cached(
                "SELECT COALESCE(SUM(granted), 0) FROM temp.warrant_reservations WHERE warrant_id = ?1",
            )
            .and_then(|mut s| s.query_row([id], |row| row.get(0)))
            .map_err(|e| self.sqlite_err(e))?;
        let (max, spent, reserved) = (
            self.to_u64(max, "max_unwraps")?,
            self.to_u64(spent, "spent")?,
            self.to_u64(reserved, "reserved")?,
        );
        let available = max
            .checked_sub(spent)
            .and_then(|left| left.checked_sub(reserved))
            .ok_or_else(|| {
                self.corrupt(format!("warrant `{id}` has spent + reserved > max_unwraps"))
            })?;
        let granted = n.min(available);
        let token = if granted > 0 {
            let granted = to_i64(granted, "granted")?;
            tx.prepare_cached(
                "INSERT INTO temp.warrant_reservations (warrant_id, granted) VALUES (?1, ?2)",
            )
            .and_then(|mut s| s.execute(params![id, granted]))
            .map_err(|e| self.sqlite_err(e))?;
            Some(tx.last_insert_rowid())
        } else {
            None
        };
        let intent = match intent {
            Some(leaves) if granted > 0 => {
                let granted = usize::try_from(granted).unwrap_or(usize::MAX);
                let leaves = leaves.get(..granted).unwrap_or(leaves);
                let mut blob =
                    Vec::with_capacity(leaves.iter().map(|l| l.len() + 1).sum::<usize>() + 2);
                blob.push(b'[');
                for (i, leaf) in leaves.iter().enumerate() {
                    if i > 0 {
                        blob.push(b',');
                    }
                    blob.extend_from_slice(leaf);
                }
                blob.push(b']');
                tx.prepare_cached(
                    "INSERT INTO open_intents (warrant_id, created_at, leaves) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut s| {
                    s.execute(params![id, format_time(OffsetDateTime::now_utc()), blob])
                })
                .map_err(|e| self.sqlite_err(e))?;
                Some(tx.last_insert_rowid())
            }
            _ => None,
        };
        tx.commit().map_err(|e| self.sqlite_err(e))?;
        Ok(Reservation {
            id: id.to_string(),
            requested: n,
            granted,
            token,
            intent,
        })
    }

    /// The SQL half of settling, inside a transaction the caller owns, so that
    /// other records (audit leaves) can commit atomically with the spend.
    /// Deletes the reservation row and adds `opened` to `spent`, refusing to
    /// pass `max_unwraps`.
    ///
    /// # Errors
    /// As [`WarrantStore::settle`]; on error the caller must not commit.
    pub(crate) fn settle_in(
        &self,
        tx: &rusqlite::Connection,
        reservation: &Reservation,
        opened: u64,
    ) -> Result<(), StoreError> {
        if opened > reservation.granted {
            return Err(StoreError::SettleExceedsReservation {
                granted: reservation.granted,
                opened,
            });
        }
        if let Some(token) = reservation.token {
            let granted = to_i64(reservation.granted, "granted")?;
            let deleted = tx
                .prepare_cached(
                    "DELETE FROM temp.warrant_reservations
                     WHERE token = ?1 AND warrant_id = ?2 AND granted = ?3",
                )
                .and_then(|mut s| s.execute(params![token, reservation.id, granted]))
                .map_err(|e| self.sqlite_err(e))?;
            if deleted != 1 {
                return Err(StoreError::UnknownReservation(reservation.id.clone()));
            }
        }
        if opened > 0 {
            let opened = to_i64(opened, "opened")?;
            let updated = tx
                .prepare_cached(
                    "UPDATE warrants SET spent = spent + ?2
                     WHERE id = ?1 AND spent + ?2 <= max_unwraps",
                )
                .and_then(|mut s| s.execute(params![reservation.id, opened]))
                .map_err(|e| self.sqlite_err(e))?;
            if updated != 1 {
                return Err(StoreError::BudgetOverrun(reservation.id.clone()));
            }
        }
        if let Some(intent) = reservation.intent {
            tx.prepare_cached("DELETE FROM open_intents WHERE id = ?1")
                .and_then(|mut s| s.execute([intent]))
                .map_err(|e| self.sqlite_err(e))?;
        }
        Ok(())
    }

    /// Settles `reservation` and runs `extra` in the same transaction (the
    /// audit log appends its leaves here), then commits. If anything fails,
    /// nothing is committed and the reservation is given back in full.
    ///
    /// # Errors
    /// As [`WarrantStore::settle`], or whatever `extra` returns.
    pub(crate) fn settle_with<T>(
        &self,
        reservation: Reservation,
        opened: u64,
        extra: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let result = (|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| self.sqlite_err(e))?;
            self.settle_in(&tx, &reservation, opened)?;
            let value = extra(&tx)?;
            tx.commit().map_err(|e| self.sqlite_err(e))?;
            Ok(value)
        })();
        if result.is_err() {
            Self::give_back(&conn, &reservation);
        }
        result
    }

    /// Returns a reservation's units after its settlement failed. Best
    /// effort: the row is in this connection's TEMP table and vanishes at
    /// restart anyway; failing here only under-uses the budget until then.
    pub(crate) fn give_back(conn: &rusqlite::Connection, reservation: &Reservation) {
        if let Some(token) = reservation.token {
            let _ = conn.execute(
                "DELETE FROM temp.warrant_reservations WHERE token = ?1",
                [token],
            );
        }
    }

    /// Whether `id` is revoked, read inside the caller's transaction.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub(crate) fn revoked_in(
        &self,
        tx: &rusqlite::Connection,
        id: &str,
    ) -> Result<bool, StoreError> {
        let row = tx
            .prepare_cached("SELECT 1 FROM warrant_revocations WHERE id = ?1")
            .and_then(|mut s| s.query_row([id], |_| Ok(())))
            .optional()
            .map_err(|e| self.sqlite_err(e))?;
        Ok(row.is_some())
    }

    /// Records a revocation inside the caller's transaction (so the
    /// revocation's audit leaf can commit with it). `false` if `id` was
    /// already revoked.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub(crate) fn revoke_in(
        &self,
        tx: &rusqlite::Connection,
        revocation: &Revocation,
    ) -> Result<super::audit::RevokeFound, StoreError> {
        let seen: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM warrants WHERE id = ?1)",
                params![revocation.id],
                |r| r.get(0),
            )
            .map_err(|e| self.sqlite_err(e))?;
        let inserted = tx
            .execute(
                "INSERT INTO warrant_revocations (id, reason, revoked_by, revoked_at)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING",
                params![
                    revocation.id,
                    revocation.reason,
                    revocation.revoked_by,
                    format_time(revocation.revoked_at)
                ],
            )
            .map_err(|e| self.sqlite_err(e))?;
        Ok(super::audit::RevokeFound {
            newly_revoked: inserted == 1,
            warrant_seen: seen,
        })
    }
}

impl WarrantStore for SqliteStore {
    fn register(&self, record: &WarrantRecord) -> Result<Registration, StoreError> {
        let max = to_i64(record.max_unwraps, "max_unwraps")?;
        let mut conn = self.conn();
        // IMMEDIATE: the read and the write below are one decision.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sqlite_err(e))?;
        let existing = tx
            .query_row(
                "SELECT payload_digest, normalized_digest, emergency, max_unwraps
                 FROM warrants WHERE id = ?1",
                [&record.id],
                |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, bool>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.sqlite_err(e))?;
        let outcome = match existing {
            None => {
                tx.execute(
                    "INSERT INTO warrants (id, payload_digest, normalized_digest, emergency,
                                           max_unwraps, spent, first_seen, upgraded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, NULL)",
                    params![
                        record.id,
                        record.payload_digest.as_slice(),
                        record.normalized_digest.as_slice(),
                        record.emergency,
                        max,
                        format_time(record.seen_at)
                    ],
                )
                .map_err(|e| self.sqlite_err(e))?;
                Registration::New
            }
            Some((payload, normalized, emergency, stored_max)) => {
                let payload = self.digest_from(payload, "payload_digest")?;
                let normalized = self.digest_from(normalized, "normalized_digest")?;
                if payload == record.payload_digest {
                    Registration::Known
                } else if normalized != record.normalized_digest || stored_max != max {
                    return Err(StoreError::WarrantIdConflict(record.id.clone()));
                } else {
                    match (emergency, record.emergency) {
                        (true, false) => {
                            tx.execute(
                                "UPDATE warrants SET payload_digest = ?2, emergency = 0, upgraded_at = ?3
                                 WHERE id = ?1",
                                params![
                                    record.id,
                                    record.payload_digest.as_slice(),
                                    format_time(record.seen_at)
                                ],
                            )
                            .map_err(|e| self.sqlite_err(e))?;
                            Registration::Upgraded
                        }
                        (false, true) => {
                            return Err(StoreError::EmergencySuperseded(record.id.clone()))
                        }
                        // Two different urgent (or two different full)
                        // payloads: only urgent → full may change the payload.
                        _ => return Err(StoreError::WarrantIdConflict(record.id.clone())),
                    }
                }
            }
        };
        tx.commit().map_err(|e| self.sqlite_err(e))?;
        Ok(outcome)
    }

    fn reserve(&self, id: &str, n: u64) -> Result<Reservation, StoreError> {
        self.reserve_in(id, n, None)
    }

    fn reserve_with_intent(&self, id: &str, intent: &[Vec<u8>]) -> Result<Reservation, StoreError> {
        self.reserve_in(id, intent.len() as u64, Some(intent))
    }
    fn settle(&self, reservation: Reservation, opened: u64) -> Result<(), StoreError> {
        self.settle_with(reservation, opened, |_| Ok(()))
    }

    fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sqlite_err(e))?;
        let inserted = self.revoke_in(&tx, revocation)?;
        tx.commit().map_err(|e| self.sqlite_err(e))?;
        Ok(inserted.newly_revoked)
    }

    fn revocation(&self, id: &str) -> Result<Option<Revocation>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT reason, revoked_by, revoked_at FROM warrant_revocations WHERE id = ?1",
                [id],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.sqlite_err(e))?;
        row.map(|(reason, revoked_by, at)| {
            Ok(Revocation {
                id: id.to_string(),
                reason,
                revoked_by,
                revoked_at: parse_time(&at)
                    .map_err(|_| self.corrupt("warrant_revocations.revoked_at"))?,
            })
        })
        .transpose()
    }

    fn spent(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.conn();
        let spent: Option<i64> = conn
            .query_row("SELECT spent FROM warrants WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|e| self.sqlite_err(e))?;
        spent.map(|s| self.to_u64(s, "spent")).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, payload: u8, normalized: u8, emergency: bool, max: u64) -> WarrantRecord {
        WarrantRecord {
            id: id.into(),
            payload_digest: [payload; 32],
            normalized_digest: [normalized; 32],
            emergency,
            max_unwraps: max,
            seen_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn open() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("lavd.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn partial_grants_and_give_back() {
        let (_dir, store) = open();
        store.register(&record("w", 1, 1, false, 4)).unwrap();
        let a = store.reserve("w", 3).unwrap();
        assert_eq!((a.requested(), a.granted()), (3, 3));
        let b = store.reserve("w", 3).unwrap();
        assert_eq!(b.granted(), 1);
        let c = store.reserve("w", 1).unwrap();
        assert_eq!(c.granted(), 0);
        store.settle(c, 0).unwrap();
        // Two of three open; one is given back.
        store.settle(a, 2).unwrap();
        let d = store.reserve("w", 5).unwrap();
        assert_eq!(d.granted(), 1);
        assert!(matches!(
            store.settle(b, 2),
            Err(StoreError::SettleExceedsReservation {
                granted: 1,
                opened: 2
            })
        ));
        // A failed settle gives the reservation back whole.
        let e = store.reserve("w", 5).unwrap();
        assert_eq!(e.granted(), 1);
        store.settle(d, 1).unwrap();
        store.settle(e, 1).unwrap();
        assert_eq!(store.spent("w").unwrap(), Some(4));
        assert_eq!(store.reserve("w", 1).unwrap().granted(), 0);
        assert!(matches!(
            store.reserve("nope", 1),
            Err(StoreError::UnknownWarrant(_))
        ));
    }

    #[test]
    fn settle_with_failure_commits_nothing_and_gives_back() {
        let (_dir, store) = open();
        store.register(&record("w", 1, 1, false, 2)).unwrap();
        let r = store.reserve("w", 2).unwrap();
        let err = store
            .settle_with(r, 2, |_| Err::<(), _>(StoreError::OutOfRange("test")))
            .unwrap_err();
        assert!(matches!(err, StoreError::OutOfRange("test")));
        assert_eq!(store.spent("w").unwrap(), Some(0));
        assert_eq!(store.reserve("w", 2).unwrap().granted(), 2);
    }

    #[test]
    fn revocation_is_final_and_stops_reservations() {
        let (_dir, store) = open();
        store.register(&record("w", 1, 1, false, 2)).unwrap();
        let rev = Revocation {
            id: "w".into(),
            reason: "court order quashed".into(),
            revoked_by: "spiffe://oversight.example/admin".into(),
            revoked_at: OffsetDateTime::UNIX_EPOCH,
        };
        assert!(store.revoke(&rev).unwrap());
        let again = Revocation {
            reason: "other".into(),
            ..rev.clone()
        };
        assert!(!store.revoke(&again).unwrap());
        assert_eq!(store.revocation("w").unwrap(), Some(rev));
        assert!(matches!(
            store.reserve("w", 1),
            Err(StoreError::WarrantRevoked(_))
        ));
        assert!(!store.is_revoked("x").unwrap());
    }
}
