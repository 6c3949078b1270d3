//! The witness side of C2SP `tlog-witness`: what `lavd witness serve` runs
//! for each `add-checkpoint` ([`serve`] is its HTTP side). It keeps, per
//! log origin, the size and root it last cosigned, in SQLite, and records a
//! new checkpoint and cosigns it in one transaction that re-reads the
//! recorded state under SQLite's write lock: a compare-and-swap, so two
//! requests can never roll the recorded size back (the race the spec
//! describes).
//!
//! Trust: the request is untrusted; the checks are
//! [`crate::audit::witness::check_add_checkpoint`]. The store file is
//! trusted for the witness's own history.

pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _, TransactionBehavior};

use crate::audit::merkle::Hash;
use crate::audit::note::VerifierKey;
use crate::audit::witness::{
    authenticate_checkpoint, check_against_record, cosignature_line, AddCheckpoint, AddOutcome,
    CosignerKey,
};

/// A witness state store failure: the witness answers 503 and cosigns
/// nothing.
#[derive(Debug, thiserror::Error)]
#[error("witness store {path}: {source}")]
pub struct StateError {
    path: PathBuf,
    #[source]
    source: rusqlite::Error,
}

impl StateError {
    /// The file opened but is no witness state: an empty file, or another
    /// SQLite database (see [`WitnessState::open`]).
    pub fn not_a_state(&self) -> bool {
        matches!(&self.source, rusqlite::Error::SqliteFailure(e, Some(_))
            if e.code == rusqlite::ErrorCode::NotADatabase)
    }
}

/// How far behind the latest timestamp given the clock may read before the
/// witness warns, in seconds.
const CLOCK_BEHIND_WARNING_SECS: u64 = 60;

/// What a witness has cosigned, per log.
#[derive(Debug)]
pub struct WitnessState {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl WitnessState {
    /// Opens the state file, which must exist, WAL with `synchronous=FULL`:
    /// an answered cosignature's state is on disk. A missing file is not
    /// made here: a witness started on an empty state (a typo in `state`, a
    /// volume mounted empty, a deleted file) would cosign, from size 0, a
    /// branch that contradicts what it cosigned before. [`Self::create`]
    /// makes a new witness's state. For the same reason a file without the
    /// state's table is refused ([`StateError::not_a_state`]): SQLite takes
    /// a zero-length file (a placeholder, a failed restore) for an empty
    /// database, and `state` naming another database would start empty too.
    ///
    /// # Errors
    /// [`StateError`], for a missing file too.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
    }

    /// Creates a new, empty state file for a new witness, refusing one that
    /// exists.
    ///
    /// # Errors
    /// [`StateError`].
    pub fn create(path: &Path) -> Result<Self, StateError> {
        if path.exists() {
            return Err(StateError {
                path: path.to_path_buf(),
                source: rusqlite::Error::InvalidPath(path.to_path_buf()),
            });
        }
        // Owner-only, whatever the umask (as lavd's store).
        crate::store::create_private(path).map_err(|e| StateError {
            path: path.to_path_buf(),
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("cannot create it: {e}")),
            ),
        })?;
        Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<Self, StateError> {
        let err = |source| StateError {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(err)?;
        // Before anything is written to it.
        if !flags.contains(OpenFlags::SQLITE_OPEN_CREATE) {
            let tables: i64 = conn
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'cosigned'",
                    [],
                    |row| row.get(0),
                )
                .map_err(err)?;
            if tables == 0 {
                return Err(err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
                    Some(
                        "not a witness state: it has no `cosigned` table (an empty file, or \
                         another database); a witness started on it would cosign from size 0"
                            .into(),
                    ),
                )));
            }
        }
        // The answer is the mode in force: a file system without the shared
        // memory WAL needs answers with the old mode, and no error.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!(
                    "SQLite cannot use its write-ahead log here (journal mode stayed {mode:?}); \
                     put the state on a local file system"
                )),
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS cosigned (
                origin     TEXT PRIMARY KEY NOT NULL,
                size       INTEGER NOT NULL CHECK (size >= 0),
                root       BLOB NOT NULL CHECK (length(root) = 32),
                checkpoint TEXT NOT NULL
            ) STRICT;
            CREATE TABLE IF NOT EXISTS cosigned_time (
                id   INTEGER PRIMARY KEY CHECK (id = 0),
                last INTEGER NOT NULL CHECK (last >= 0)
            ) STRICT;",
        )
        .map_err(err)?;
        Ok(WitnessState {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The size and root last cosigned for `origin`.
    ///
    /// # Errors
    /// [`StateError`].
    pub fn recorded(&self, origin: &str) -> Result<Option<(u64, Hash)>, StateError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        read(&conn, origin).map_err(|source| self.err(source))
    }

    /// Reads the state file (the readiness check).
    ///
    /// # Errors
    /// [`StateError`].
    pub fn check(&self) -> Result<(), StateError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        conn.query_row("SELECT count(*) FROM cosigned", [], |row| {
            row.get::<_, i64>(0)
        })
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    fn err(&self, source: rusqlite::Error) -> StateError {
        StateError {
            path: self.path.clone(),
            source,
        }
    }

    /// Handles one `add-checkpoint` body: checks it against the recorded
    /// state, and on success records the checkpoint and returns its
    /// cosignature line, all inside one write transaction. `trusted` gives
    /// the log keys the witness trusts for an origin; `sign` signs with the
    /// witness key (`key`); `clock` gives the cosignature's timestamp, read
    /// once the transaction holds the state (a request that waited behind
    /// another is not stamped before it), and never earlier than one this
    /// state gave already, before a restart too.
    ///
    /// # Errors
    /// [`StateError`] (answer 503); a signing failure rolls the record back
    /// and is returned as `Ok(Err(e))`.
    pub fn add_checkpoint<E>(
        &self,
        body: &[u8],
        trusted: &dyn Fn(&str) -> Vec<VerifierKey>,
        key: &CosignerKey,
        clock: &dyn Fn() -> u64,
        sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
    ) -> Result<Result<AddOutcome, E>, StateError> {
        self.add_checkpoint_weighing_forks(body, trusted, key, clock, sign)
            .map(|r| r.map(|(outcome, _)| outcome))
    }

    /// [`WitnessState::add_checkpoint`], also saying whether the refused
    /// checkpoint is evidence of a fork: signed by the log, of the size
    /// this witness recorded, with another root. Decided on the state read
    /// in the same transaction (a request that lands between would
    /// otherwise hide it), whatever the client's old size made the answer
    /// (409, 422, or 400 for an old size above the checkpoint's).
    ///
    /// # Errors
    /// As [`WitnessState::add_checkpoint`].
    pub fn add_checkpoint_weighing_forks<E>(
        &self,
        body: &[u8],
        trusted: &dyn Fn(&str) -> Vec<VerifierKey>,
        key: &CosignerKey,
        clock: &dyn Fn() -> u64,
        sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
    ) -> Result<Result<(AddOutcome, bool), E>, StateError> {
        let request = match AddCheckpoint::parse(body) {
            Ok(r) => r,
            Err(why) => return Ok(Ok((AddOutcome::BadRequest(why.to_string()), false))),
        };
        // The log's signatures are checked before the state is taken: they
        // do not depend on it, and a note may carry many lines to check.
        let checkpoint = match authenticate_checkpoint(&request, trusted) {
            Ok(c) => c,
            Err(outcome) => return Ok(Ok((outcome, false))),
        };
        let (signed_size, signed_root) = (checkpoint.size, checkpoint.root);
        let origin = checkpoint.origin.clone();
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let recorded = read(&tx, &origin).map_err(|e| self.err(e))?;
        let checkpoint = match check_against_record(&request, checkpoint, recorded) {
            Ok(c) => c,
            Err(outcome) => {
                // Signed by the log (it passed above), at the size recorded,
                // with another root.
                let fork = matches!(
                    outcome,
                    AddOutcome::BadProof(_)
                        | AddOutcome::Conflict { .. }
                        | AddOutcome::BadRequest(_)
                ) && recorded
                    .is_some_and(|(size, root)| signed_size == size && signed_root != root);
                return Ok(Ok((outcome, fork)));
            }
        };
        // The state holds sizes as SQLite integers: a larger one (which a
        // log could sign) is refused before anything is signed.
        let Ok(size) = i64::try_from(checkpoint.size) else {
            return Ok(Ok((
                AddOutcome::BadRequest(format!(
                    "checkpoint size {} is above the {} this witness records",
                    checkpoint.size,
                    i64::MAX
                )),
                false,
            )));
        };
        // The newest timestamp this state ever gave, read in the write
        // transaction: a restart with the clock stepped back, or another
        // process on the same state file, must not stamp a larger tree
        // earlier than a smaller one (a state written before this table
        // starts at 0).
        // A row that cannot be read is the state's failure, not "never":
        // the floor would fall to 0.
        let last = tx
            .query_row("SELECT last FROM cosigned_time WHERE id = 0", [], |row| {
                let t = row.get::<_, i64>(0)?;
                u64::try_from(t).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, t))
            })
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or(0);
        let read = clock();
        // A request that waited behind another reads a second or so behind
        // it; more is a clock that stepped back, or one that once ran
        // ahead and now pins every timestamp there (OPERATIONS §13).
        if read.saturating_add(CLOCK_BEHIND_WARNING_SECS) < last {
            tracing::warn!(
                clock = read,
                stamped = last,
                "this host's clock is behind the latest cosignature timestamp the witness state \
                 gave; cosignatures are stamped with that one until the clock passes it"
            );
        }
        let now = read.max(last);
        // A cosignature stamped 0 says nothing of when (C2SP allows it;
        // a clock at 1970 is broken). Nothing is recorded (the transaction
        // rolls back when dropped).
        if now == 0 {
            return Ok(Ok((AddOutcome::NoTimestamp, false)));
        }
        let body_end = request.checkpoint.rfind("\n\n").map_or(0, |i| i + 1);
        let line = match cosignature_line(key, &request.checkpoint[..body_end], now, sign) {
            Ok(line) => line,
            Err(e) => return Ok(Err(e)),
        };
        tx.execute(
            "INSERT INTO cosigned (origin, size, root, checkpoint) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (origin) DO UPDATE SET size = ?2, root = ?3, checkpoint = ?4",
            params![origin, size, checkpoint.root.to_vec(), request.checkpoint],
        )
        .map_err(|e| self.err(e))?;
        // Seconds since 1970: i64 holds any a clock gives.
        let stamped = i64::try_from(now).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO cosigned_time (id, last) VALUES (0, ?1)
             ON CONFLICT (id) DO UPDATE SET last = max(last, ?1)",
            params![stamped],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Ok((AddOutcome::Cosigned(line), false)))
    }
}

/// What the witness recorded for `origin`. A row that cannot be read (a
/// negative size, a root not of 32 bytes: a hand edit, a damaged file) is
/// an error, not "never cosigned": from size 0 the witness would cosign a
/// branch that contradicts what it cosigned before.
fn read(conn: &Connection, origin: &str) -> Result<Option<(u64, Hash)>, rusqlite::Error> {
    conn.query_row(
        "SELECT size, root FROM cosigned WHERE origin = ?1",
        [origin],
        |row| {
            let size = row.get::<_, i64>(0)?;
            let root = row.get::<_, Vec<u8>>(1)?;
            let size = u64::try_from(size)
                .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, size))?;
            let root = <Hash>::try_from(root).map_err(|root| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Blob,
                    format!("a root of {} bytes", root.len()).into(),
                )
            })?;
            Ok((size, root))
        },
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::MemoryTree;
    use crate::audit::witness::verify_cosignatures;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;

    fn signed(tree: &MemoryTree, n: u64) -> String {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let key = VerifierKey::new("log.example/a", sk.verifying_key().as_bytes()).unwrap();
        let body = format!(
            "log.example/a\n{n}\n{}\n",
            STANDARD.encode(tree.root(n).unwrap())
        );
        let mut line = key.key_id().to_be_bytes().to_vec();
        line.extend_from_slice(&sk.sign(body.as_bytes()).to_bytes());
        format!("{body}\n— log.example/a {}\n", STANDARD.encode(line))
    }

    /// Only a file [`WitnessState::create`] made opens: not a zero-length
    /// one (SQLite's empty database), not another database, not garbage.
    /// A state made and reopened keeps what it recorded.
    #[test]
    fn only_a_witness_state_opens() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let e = WitnessState::open(&empty).unwrap_err();
        assert!(e.not_a_state(), "{e}");
        assert!(e.to_string().contains("not a witness state"), "{e}");
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x INTEGER)")
            .unwrap();
        assert!(WitnessState::open(&other).unwrap_err().not_a_state());

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, [0x5a; 4096]).unwrap();
        assert!(WitnessState::open(&garbage).is_err());

        let made = dir.path().join("witness.db");
        drop(WitnessState::create(&made).unwrap());
        let reopened = WitnessState::open(&made).unwrap();
        assert_eq!(reopened.recorded("log.example/a").unwrap(), None);
    }

    /// Many clients race to add checkpoints of growing sizes, each with the
    /// old size it last saw: every cosigned checkpoint extends the one
    /// recorded before it, the recorded size never goes back, and every
    /// cosignature verifies under the witness key. Half of them go through
    /// a second handle on the same file, as a second process would (the
    /// state's mutex orders one handle's requests; only the transaction
    /// orders two: a record read before it began would let both cosign
    /// from one size).
    #[test]
    fn racing_add_checkpoints_never_roll_the_recorded_size_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.db");
        let first = WitnessState::create(&path).unwrap();
        let second = WitnessState::open(&path).unwrap();
        let states = [&first, &second];
        let state = &first;
        let mut tree = MemoryTree::new();
        for i in 0..200u32 {
            tree.push_leaf(&i.to_be_bytes());
        }
        let log_sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let log = VerifierKey::new("log.example/a", log_sk.verifying_key().as_bytes()).unwrap();
        let trusted = |origin: &str| {
            if origin == "log.example/a" {
                vec![log.clone()]
            } else {
                Vec::new()
            }
        };
        let witness_sk = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let key =
            CosignerKey::new("witness.example/w", witness_sk.verifying_key().as_bytes()).unwrap();
        let cosigned = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (state, tree, trusted, key, witness_sk, cosigned) = (
                    states[usize::from(t % 2 == 1)],
                    &tree,
                    &trusted,
                    &key,
                    &witness_sk,
                    &cosigned,
                );
                s.spawn(move || {
                    for round in 0..20u64 {
                        let size = 1 + (t * 20 + round * 7) % 200;
                        let old = state.recorded("log.example/a").unwrap().map_or(0, |r| r.0);
                        let proof = if old == 0 || old > size {
                            Vec::new()
                        } else {
                            crate::audit::merkle::consistency_proof(tree, old, size).unwrap()
                        };
                        let body = AddCheckpoint {
                            old_size: old,
                            proof,
                            checkpoint: signed(tree, size),
                        }
                        .encode();
                        let outcome = state
                            .add_checkpoint(body.as_bytes(), trusted, key, &|| 1_700_000_000, |m| {
                                Ok::<_, ()>(witness_sk.sign(m).to_bytes())
                            })
                            .unwrap()
                            .unwrap();
                        match outcome {
                            AddOutcome::Cosigned(line) => {
                                let note = format!("{}{line}", signed(tree, size));
                                assert_eq!(verify_cosignatures(&note, key).unwrap().len(), 1);
                                cosigned.lock().unwrap().push((old, size));
                            }
                            // Another client moved the state: learn and go on.
                            AddOutcome::Conflict { .. } | AddOutcome::BadRequest(_) => {}
                            other => panic!("{other:?}"),
                        }
                    }
                });
            }
        });
        let cosigned = cosigned.into_inner().unwrap();
        assert!(cosigned.len() >= 8, "{cosigned:?}");
        // Each cosignature was made from the size recorded just before it,
        // and the recorded size never goes back, so the state's own order
        // is the cosignatures sorted by (old, new): at each recorded size
        // the same-size ones, then the one advance. The list is in the
        // order the calls returned, which can differ; sorted, each must
        // start where the last ended.
        let mut chain: Vec<(u64, u64)> = cosigned.clone();
        chain.sort_unstable();
        let mut recorded = 0;
        for &(old, size) in &chain {
            assert_eq!(old, recorded, "unchained cosignatures: {chain:?}");
            assert!(size >= old, "{chain:?}");
            recorded = size;
        }
        assert_eq!(
            state.recorded("log.example/a").unwrap().map(|r| r.0),
            Some(recorded)
        );
    }

    /// The state is written with every commit synced (a cosignature is
    /// answered only once what it records survives a power cut).
    #[test]
    fn the_state_commits_with_synchronous_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.db");
        drop(WitnessState::create(&path).unwrap());
        let state = WitnessState::open(&path).unwrap();
        let conn = state.conn.lock().unwrap();
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .unwrap();
        assert_eq!(synchronous, 2, "FULL is 2");
    }

    /// The log's signatures are checked before the state is taken: a
    /// request refused on them (403 here, a trusted key's line that does
    /// not verify) is answered while another holds the state. Before, every
    /// signature line of a note (up to 64) was checked holding it, so a
    /// note repeating the log's line held every other request back.
    #[test]
    fn signatures_are_checked_without_holding_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = WitnessState::create(&dir.path().join("witness.db")).unwrap();
        let (log, log_sk, key, witness_sk) = one_log();
        let trusted = |origin: &str| {
            if origin == "log.example/a" {
                vec![log.clone()]
            } else {
                Vec::new()
            }
        };
        let empty = crate::audit::merkle::empty_root();
        let good = note(&log_sk, 0, empty);
        // The log's key line over another text: it does not verify.
        let forged = good.replacen("\n0\n", "\n1\n", 1);
        let body = AddCheckpoint {
            old_size: 0,
            proof: Vec::new(),
            checkpoint: forged,
        }
        .encode();
        let held = state.conn.lock().unwrap();
        let (done, answered) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let outcome = state
                    .add_checkpoint(body.as_bytes(), &trusted, &key, &|| 1_700_000_000, |m| {
                        Ok::<_, ()>(witness_sk.sign(m).to_bytes())
                    })
                    .unwrap()
                    .unwrap();
                done.send(outcome).unwrap();
            });
            let outcome = answered.recv_timeout(std::time::Duration::from_secs(5));
            drop(held);
            assert!(matches!(outcome, Ok(AddOutcome::Forbidden)), "{outcome:?}");
        });
    }

    /// A state where SQLite cannot keep a write-ahead log (its in-memory
    /// database answers "memory") is refused, as lavd's own store is.
    #[test]
    fn a_state_that_cannot_use_wal_is_refused() {
        let e = WitnessState::create(Path::new(":memory:")).unwrap_err();
        assert!(
            e.to_string().contains("journal mode stayed \"memory\""),
            "{e}"
        );
    }

    /// A log key, a witness key and a signed checkpoint of `size` leaves
    /// with an arbitrary root, for the single-request cases below.
    fn one_log() -> (
        VerifierKey,
        ed25519_dalek::SigningKey,
        CosignerKey,
        ed25519_dalek::SigningKey,
    ) {
        let log_sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let log = VerifierKey::new("log.example/a", log_sk.verifying_key().as_bytes()).unwrap();
        let witness_sk = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let key =
            CosignerKey::new("witness.example/w", witness_sk.verifying_key().as_bytes()).unwrap();
        (log, log_sk, key, witness_sk)
    }

    fn note(log_sk: &ed25519_dalek::SigningKey, size: u64, root: [u8; 32]) -> String {
        let body = format!("log.example/a\n{size}\n{}\n", STANDARD.encode(root));
        let key = VerifierKey::new("log.example/a", log_sk.verifying_key().as_bytes()).unwrap();
        let mut line = key.key_id().to_be_bytes().to_vec();
        line.extend_from_slice(&log_sk.sign(body.as_bytes()).to_bytes());
        format!("{body}\n\u{2014} log.example/a {}\n", STANDARD.encode(line))
    }

    /// `state`'s answer to the checkpoint of the empty tree, from old
    /// size 0, with [`one_log`]'s keys and its clock reading `clock`; and
    /// that checkpoint.
    fn add_empty_tree(state: &WitnessState, clock: u64) -> (String, AddOutcome) {
        let (log, log_sk, key, witness_sk) = one_log();
        let checkpoint = note(&log_sk, 0, crate::audit::merkle::empty_root());
        let body = AddCheckpoint {
            old_size: 0,
            proof: Vec::new(),
            checkpoint: checkpoint.clone(),
        }
        .encode();
        let outcome = state
            .add_checkpoint(
                body.as_bytes(),
                &|_| vec![log.clone()],
                &key,
                &|| clock,
                |m| Ok::<_, ()>(witness_sk.sign(m).to_bytes()),
            )
            .unwrap()
            .unwrap();
        (checkpoint, outcome)
    }

    /// A clock at 1970 or before on a fresh state: no cosignature (its
    /// timestamp would be 0, which says nothing of when), 503.
    #[test]
    fn a_clock_at_1970_gives_no_cosignature() {
        let dir = tempfile::tempdir().unwrap();
        let state = WitnessState::create(&dir.path().join("witness.db")).unwrap();
        // A fresh state, a clock at 0 (what a clock before 1970 reads):
        // no timestamp to give, nothing recorded. Before, it signed 0.
        let (checkpoint, outcome) = add_empty_tree(&state, 0);
        assert_eq!(outcome, AddOutcome::NoTimestamp);
        assert_eq!(AddOutcome::NoTimestamp.status(), 503);
        let origin = checkpoint.split('\n').next().unwrap();
        assert_eq!(state.recorded(origin).unwrap(), None);
        assert!(matches!(
            add_empty_tree(&state, 5).1,
            AddOutcome::Cosigned(_)
        ));
    }

    /// A recorded row that cannot be read (a root of one byte, written
    /// past the CHECK constraints) fails the request as the state's
    /// failure. Before, it read as "never cosigned", and the witness
    /// cosigned from size 0 whatever it had cosigned before.
    #[test]
    fn an_unreadable_row_is_a_state_error_not_a_fresh_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.db");
        let state = WitnessState::create(&path).unwrap();
        assert!(matches!(
            add_empty_tree(&state, 5).1,
            AddOutcome::Cosigned(_)
        ));
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "PRAGMA ignore_check_constraints = ON; UPDATE cosigned SET root = x'00';",
            )
            .unwrap();
        let (log, log_sk, key, witness_sk) = one_log();
        let body = AddCheckpoint {
            old_size: 0,
            proof: Vec::new(),
            checkpoint: note(&log_sk, 0, crate::audit::merkle::empty_root()),
        }
        .encode();
        let answer =
            state.add_checkpoint(body.as_bytes(), &|_| vec![log.clone()], &key, &|| 6, |m| {
                Ok::<_, ()>(witness_sk.sign(m).to_bytes())
            });
        let e = answer.expect_err("an unreadable row cosigned from size 0");
        assert!(
            e.to_string().contains("a root of 1 bytes"),
            "the state's error names the row: {e}"
        );
    }

    /// A request stamped by a clock that went back (a step, or a request
    /// that read it before waiting behind another) is not given an earlier
    /// timestamp than a cosignature already given: not by the same process,
    /// and not after a restart (the third request, on the state reopened),
    /// nor by another process on the same state.
    #[test]
    fn cosignature_timestamps_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.db");
        let state = WitnessState::create(&path).unwrap();
        let key = one_log().2;
        // The timestamp `state` stamps the empty tree's checkpoint with,
        // its clock reading `clock`.
        let stamp = |state: &WitnessState, clock: u64| {
            let (checkpoint, AddOutcome::Cosigned(line)) = add_empty_tree(state, clock) else {
                panic!("not cosigned");
            };
            verify_cosignatures(&format!("{checkpoint}{line}"), &key).unwrap()
        };
        assert_eq!(stamp(&state, 200), [200]);
        assert_eq!(stamp(&state, 100), [200]);
        // After a restart too.
        drop(state);
        let state = WitnessState::open(&path).unwrap();
        assert_eq!(stamp(&state, 150), [200]);
        // Two processes on one state file (a rolling update on a shared
        // volume): each reads the floor the other wrote. Before, each kept
        // its own from when it opened the file.
        let other = WitnessState::open(&path).unwrap();
        assert_eq!(stamp(&state, 300), [300]);
        assert_eq!(stamp(&other, 250), [300]);
    }

    /// A checkpoint the log signed at the size this witness recorded, with
    /// another root, is told as fork evidence whatever the client's old
    /// size made the answer (422, 409, 400); one whose only fault is its
    /// proof, or that the log did not sign, is not.
    #[test]
    fn fork_evidence_is_weighed_on_the_state_the_answer_read() {
        let dir = tempfile::tempdir().unwrap();
        let state = WitnessState::create(&dir.path().join("witness.db")).unwrap();
        let (log, log_sk, key, witness_sk) = one_log();
        let add = |old_size: u64, proof: Vec<Hash>, checkpoint: String| {
            let body = AddCheckpoint {
                old_size,
                proof,
                checkpoint,
            }
            .encode();
            state
                .add_checkpoint_weighing_forks(
                    body.as_bytes(),
                    &|_| vec![log.clone()],
                    &key,
                    &|| 100,
                    |m| Ok::<_, ()>(witness_sk.sign(m).to_bytes()),
                )
                .unwrap()
                .unwrap()
        };
        let (recorded, fork) = add(0, Vec::new(), note(&log_sk, 1, [1; 32]));
        assert!(matches!(recorded, AddOutcome::Cosigned(_)) && !fork);
        let forked = || note(&log_sk, 1, [2; 32]);
        for (old, status) in [(1, 422), (0, 409), (5, 400)] {
            let (outcome, fork) = add(old, Vec::new(), forked());
            assert_eq!(outcome.status(), status, "old {old}: {outcome:?}");
            assert!(fork, "old {old}");
        }
        // The log's next checkpoint with a proof that does not verify: the
        // client's fault, no evidence against the log.
        let (outcome, fork) = add(1, vec![[9; 32]], note(&log_sk, 2, [3; 32]));
        assert_eq!(outcome.status(), 422, "{outcome:?}");
        assert!(!fork);
        // Not signed by the log: 403, no evidence.
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
        let (outcome, fork) = add(1, Vec::new(), note(&stranger, 1, [2; 32]));
        assert_eq!(outcome, AddOutcome::Forbidden);
        assert!(!fork);
    }

    /// A size the state cannot record (at or above 2^63), though the log
    /// signed it, is refused as a bad request before it is signed.
    #[test]
    fn a_size_beyond_the_state_is_refused_before_signing() {
        let dir = tempfile::tempdir().unwrap();
        let state = WitnessState::create(&dir.path().join("witness.db")).unwrap();
        let (log, log_sk, key, _) = one_log();
        let body = AddCheckpoint {
            old_size: 0,
            proof: Vec::new(),
            checkpoint: note(&log_sk, 1 << 63, [7; 32]),
        }
        .encode();
        let outcome = state
            .add_checkpoint(body.as_bytes(), &|_| vec![log.clone()], &key, &|| 1, |_| {
                Err::<[u8; 64], _>("signed")
            })
            .unwrap()
            .unwrap();
        assert!(
            matches!(&outcome, AddOutcome::BadRequest(why) if why.contains("above")),
            "{outcome:?}"
        );
    }
}
