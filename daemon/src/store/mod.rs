//! The store: what must outlive the process and is not key material: escrow
//! key metadata (the private keys themselves stay in the HSM), warrant
//! budgets and revocations, and the audit log. Each concern is a small trait
//! ([`KeyStore`], [`WarrantStore`], [`AuditStore`]).
//!
//! Two backends implement them:
//! - [`SqliteStore`], the embedded default (`[store] path`): SQLite (through
//!   `rusqlite`, bundled) in WAL mode with `synchronous=FULL`, so a committed
//!   transaction survives a crash or power loss. One process per file.
//! - [`PgStore`] (`[store] url`): PostgreSQL, shared by several `lavd serve`
//!   replicas; what it guarantees across them is in [`postgres`]'s own doc.
//!
//! [`Store`], what callers hold, is an enum over the two rather than a trait
//! object: the backend set is closed, callers keep taking `&Store` and
//! calling `Store::open` unchanged, and the SQLite-only internals
//! (`settle_with`, the `rusqlite` transaction helpers) stay typed.
//!
//! Trust: the database file is *not* trusted for the audit log (its integrity
//! comes from signed checkpoints), but it is trusted for budgets and
//! revocations, so its permissions matter (see docs/OPERATIONS.md).

mod audit;
mod keys;
pub mod postgres;
mod warrants;

pub use self::postgres::{PgSettings, PgStore};

pub use audit::{
    Appended, AuditAppend, AuditStore, BeforeCommit, Cosignature, LeafRows, NodeRows, OpenIntent,
    Server, Spend, Uncommitted, Vouched, Withdrawn, MAX_INDEX,
};
pub use keys::{KeyRecord, KeyStore};

/// Whether `settings` names a store lavd has written, looked at without
/// creating or migrating anything: `Ok(Err(why))` when it is none (a SQLite
/// path with no file, a directory, a file that is no database or holds no
/// lavd schema; a PostgreSQL database without lavd's schema), `Err` when
/// the store cannot be read (permissions, I/O, a server that does not
/// answer). For the commands that read or change what a store already
/// records, which must not make an empty one where the config points by
/// mistake.
///
/// # Errors
/// [`StoreError::Sqlite`], [`StoreError::Postgres`] or
/// [`StoreError::Unavailable`] when the store cannot be read.
pub fn probe_existing(settings: &StoreSettings) -> Result<Result<(), String>, StoreError> {
    match settings {
        StoreSettings::Sqlite { path } => probe_sqlite(path),
        StoreSettings::Postgres(pg) => Ok(if PgStore::holds_schema(pg)? {
            Ok(())
        } else {
            Err(format!("{} is not a lavd store (no lavd schema)", pg.url))
        }),
    }
}

/// [`probe_existing`], and a log begun in it: `Ok(Err(why))` also for a
/// store that holds lavd's schema but no audit leaf, which is a new store
/// however it got its schema (a `lavd store copy` refused after it
/// migrated its target, a `lavd store migrate --new`, a first start that
/// stopped before its first commit). For the commands that may make a
/// store, which must refuse to begin a log beside a token that holds
/// another store's escrow keys: every store that recorded anything holds a
/// leaf (a key's generation, a start's `authorities_loaded`).
///
/// # Errors
/// As [`probe_existing`].
pub fn probe_log_begun(settings: &StoreSettings) -> Result<Result<(), String>, StoreError> {
    if let Err(why) = probe_existing(settings)? {
        return Ok(Err(why));
    }
    let begun = match settings {
        StoreSettings::Sqlite { path } => {
            let read = || -> Result<bool, rusqlite::Error> {
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                conn.query_row("SELECT EXISTS (SELECT 1 FROM audit_leaves)", [], |row| {
                    row.get(0)
                })
            };
            read().map_err(|source| StoreError::Sqlite {
                path: path.clone(),
                source,
            })?
        }
        StoreSettings::Postgres(pg) => PgStore::holds_leaves(pg)?,
    };
    Ok(if begun {
        Ok(())
    } else {
        let store = match settings {
            StoreSettings::Sqlite { path } => path.display().to_string(),
            StoreSettings::Postgres(pg) => pg.url.clone(),
        };
        Err(format!(
            "{store} holds lavd's schema but no audit leaf: no log was begun in it (a \
             `lavd store copy` refused, a `lavd store migrate --new`, or a first `lavd keys \
             generate` whose store commit did not happen, whose key pair on the token is then \
             deleted by its label)"
        ))
    })
}

/// The table `lavd store copy` writes into a SQLite store it copied, in the
/// transaction that read it (made only then: a store never copied has no
/// such table, whatever its schema version).
pub(crate) const MOVED_TABLE: &str = "CREATE TABLE IF NOT EXISTS store_moved (
        id   INTEGER PRIMARY KEY CHECK (id = 0),
        to_store TEXT NOT NULL,
        at   TEXT NOT NULL,
        size INTEGER NOT NULL
    ) STRICT";

/// Where, when and how many leaves `lavd store copy` copied the store on
/// `conn` to, if it did.
pub(crate) fn moved(conn: &Connection) -> Result<Option<(String, String, i64)>, rusqlite::Error> {
    // Prepared once a connection (every SQLite group commit asks).
    let marked: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'store_moved'",
        )?
        .query_row([], |row| row.get(0))?;
    if marked == 0 {
        return Ok(None);
    }
    use rusqlite::OptionalExtension as _;
    conn.query_row(
        "SELECT to_store, at, size FROM store_moved WHERE id = 0",
        [],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )
    .optional()
    // The table without its row: marked all the same.
    .map(|row| Some(row.unwrap_or_else(|| ("(not recorded)".into(), "(not recorded)".into(), 0))))
}

/// [`probe_existing`] for a SQLite file. Read only: the file is not
/// changed (SQLite may create the `-wal` and `-shm` files of a WAL
/// database beside it).
///
/// # Errors
/// [`StoreError::Sqlite`] when the file is there but cannot be read.
pub fn probe_sqlite(path: &std::path::Path) -> Result<Result<(), String>, StoreError> {
    // Not `exists()`, which says false for a path that cannot be searched:
    // only a path that is not there is no store.
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Err(format!("{} does not exist", path.display())));
        }
        Err(e) => {
            return Err(StoreError::Unavailable {
                store: path.display().to_string(),
                reason: format!("cannot be looked at: {e}"),
            })
        }
        Ok(m) if m.is_dir() => {
            return Ok(Err(format!("{} is a directory", path.display())));
        }
        Ok(_) => {}
    }
    let failed = |source: rusqlite::Error| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let read = || -> Result<(i64, i64), rusqlite::Error> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // A daemon may hold the write lock for a moment.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let tables = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' \
             AND name IN ('escrow_keys', 'audit_leaves')",
            [],
            |row| row.get(0),
        )?;
        Ok((version, tables))
    };
    match read() {
        // A file SQLite cannot read at all is no store; one it cannot open
        // or read for another reason is the store failing.
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) => {
            Ok(Err(format!("{} is not a lavd store: {e}", path.display())))
        }
        Err(e) => Err(failed(e)),
        Ok((version, tables)) if version == 0 || tables != 2 => Ok(Err(format!(
            "{} is not a lavd store (schema version {version}, {tables} of its tables \
             `escrow_keys` and `audit_leaves`)",
            path.display()
        ))),
        Ok(_) => Ok(Ok(())),
    }
}
pub use warrants::{Registration, Reservation, Revocation, WarrantRecord, WarrantStore};

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

use crate::audit::merkle;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused an operation: disk full, I/O error, a locked or corrupt
    /// file. The store is unavailable, not the request wrong (HTTP 503).
    #[error("store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// PostgreSQL refused an operation or could not be reached (connection
    /// refused or lost, statement timeout, a serialization failure still
    /// failing after its retries). The store is unavailable (HTTP 503).
    #[error("store {store}: {}", postgres_text(error))]
    Postgres {
        /// The server and database (never the password).
        store: String,
        /// The client's error. Not the error's `source`: its own text
        /// ([`postgres_text`]) says what the server said, which the
        /// client's `Display` does not ("db error"), and a chain printed
        /// whole would say it twice.
        error: ::postgres::Error,
    },
    /// No database connection became free within the pool wait, or none
    /// could be opened: the store is unavailable (HTTP 503).
    #[error("store {store}: {reason}")]
    Unavailable {
        /// The server and database.
        store: String,
        /// What happened.
        reason: String,
    },
    /// The file was written by a newer `lavd` whose schema this one does not know.
    #[error(
        "store {store}: schema version {found} is newer than this lavd supports ({supported})"
    )]
    SchemaTooNew {
        /// The database file or server.
        store: String,
        /// `PRAGMA user_version` in the file, or `schema_version` in PostgreSQL.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// An escrow key with this `kid` already exists (kids are never reused,
    /// even after destruction, so a ciphertext names one key forever).
    #[error("an escrow key with kid `{0}` already exists")]
    DuplicateKid(String),
    /// No escrow key has this `kid`.
    #[error("no escrow key with kid `{0}`")]
    UnknownKid(String),
    /// A warrant `id` was seen before with a different payload (and this is
    /// not the replacement of an urgent warrant by its fully signed version).
    #[error("a different warrant with id `{0}` was seen before")]
    WarrantIdConflict(String),
    /// An urgent warrant whose `id` already has its fully signed version
    /// recorded: the full one replaced it.
    #[error("urgent warrant `{0}` was replaced by its fully signed version")]
    EmergencySuperseded(String),
    /// Budget asked for a warrant `id` that was never registered: a caller
    /// that skipped `register`.
    #[error("no warrant with id `{0}` is registered")]
    UnknownWarrant(String),
    /// Budget asked for a revoked warrant (revoked after it was verified).
    #[error("warrant `{0}` is revoked")]
    WarrantRevoked(String),
    /// A reservation was settled twice, or on another store than the one
    /// that made it: a caller bug.
    #[error("reservation for warrant `{0}` is unknown or already settled")]
    UnknownReservation(String),
    /// More envelopes reported opened than the reservation granted: a caller
    /// bug, refused so that the budget can never be exceeded.
    #[error("settle reports {opened} opened but only {granted} were reserved")]
    SettleExceedsReservation {
        /// Units the reservation granted.
        granted: u64,
        /// Units reported opened.
        opened: u64,
    },
    /// Committing the spend would exceed `max_unwraps`. Reservations prevent
    /// this (in SQLite within the one process; in PostgreSQL across replicas
    /// while their lease runs); it happens when a second process wrongly
    /// shares an SQLite file or a PostgreSQL reservation outlived its lease,
    /// and then nothing is released.
    #[error("spending on warrant `{0}` would exceed its max_unwraps")]
    BudgetOverrun(String),
    /// Another process holds this SQLite file's lock (`flock`): a `lavd
    /// serve` serving it, or a `lavd store copy` copying it. One daemon
    /// serves an SQLite store; a second would take the first one's open
    /// intents in flight for a crashed run's and log them again, and the
    /// two would share budgets through errors. Several replicas run on
    /// PostgreSQL.
    #[error(
        "store {store}: another lavd serve is serving it, or a lavd store copy is copying it \
         (it holds the file's lock); one daemon serves an SQLite store: stop that one first, \
         or run replicas on PostgreSQL"
    )]
    InUse {
        /// The database file.
        store: String,
    },
    /// The SQLite store was copied to PostgreSQL by `lavd store copy`, which
    /// marked it so: its log goes on there, and a write here (a `lavd keys
    /// destroy` timer, a `lavd serve` on the old path after a rollback)
    /// would fork it or record what the copy never sees.
    #[error(
        "store {store}: copied to {to} at {at} by lavd store copy (its log of {size} leaves \
         goes on there); point [store] at that database. This file is kept as the copy left \
         it, and lavd writes nothing more to it (if that database does not hold the log, a \
         copy that stopped before PostgreSQL committed: remove the mark, sqlite3 FILE 'DROP \
         TABLE store_moved', and copy again)"
    )]
    Moved {
        /// The SQLite file.
        store: String,
        /// Where it was copied (the PostgreSQL URL, no password).
        to: String,
        /// When (RFC 3339).
        at: String,
        /// The leaves copied.
        size: i64,
    },
    /// `lavd store copy` refused: the target is not empty, or the source log
    /// does not verify. Nothing was committed.
    #[error("store copy refused: {0}")]
    CopyRefused(String),
    /// A key's destruction was recorded already (two destructions raced),
    /// or the store has no such key: no `key_destroyed` leaf is written.
    #[error("escrow key `{0}` is unknown or already recorded as destroyed")]
    KeyAlreadyDestroyed(String),
    /// The open intent a batch was to replace ([`Spend::ClearIntent`]) is
    /// gone: its request's own leaves committed after all, or another
    /// writer (a PostgreSQL replica's sweep) already wrote its leaves.
    /// Nothing of the batch is written, so no open is logged twice.
    #[error("open intent {0} was already settled or written")]
    IntentSettled(i64),
    /// A number does not fit the database's signed 64-bit integers.
    #[error("{0} is out of range for the store")]
    OutOfRange(&'static str),
    /// A proof or root was asked for outside the tree (index or size too
    /// large, `from > to`): the client's request is wrong (HTTP 400).
    #[error("bad proof request: {0}")]
    BadProofRequest(String),
    /// An audit event could not be turned into a leaf (a bug: constructors
    /// validate their input).
    #[error("audit leaf: {0}")]
    BadLeaf(String),
    /// The group commit that carried this batch failed; nothing of it is
    /// durable and its budget reservation was given back.
    ///
    /// One exception, on SQLite: a COMMIT that failed with an I/O error
    /// (`SQLITE_IOERR_FSYNC`, say) after writing its frames to the WAL is
    /// not visible, and the next commit writes over it; but should the
    /// process crash before that, recovery at the next open can replay it.
    /// Its leaves then say `opened` (and its spend counts) for keys that
    /// were never released, beside the `audit_commit_failed` leaves written
    /// for them if the process got that far. Never the other way round: no
    /// key is released on this error.
    #[error("audit commit failed: {0}")]
    CommitFailed(String),
    /// PostgreSQL: the connection died with the group's COMMIT in flight,
    /// and the transaction's fate could not be read afterwards: the batch
    /// may or may not be durable. Its reservation was given back; nothing
    /// of it may be released, and nothing it created may be undone as
    /// though it had not been recorded.
    #[error("audit commit outcome unknown: {0}")]
    CommitUnknown(String),
    /// A value read back from the file is not what this code wrote: the
    /// database was edited or is corrupt.
    #[error("store {store}: corrupt row: {what}")]
    Corrupt {
        /// The database file or server.
        store: String,
        /// What was wrong.
        what: String,
    },
}

/// [`StoreError::Postgres`]'s text of the client's error, and that of any
/// other message quoting one: for an error the server answered, what it
/// said (severity, SQLSTATE and message; the client's own text is only
/// "db error"), and for any other its cause (the I/O error, the refused
/// connection, the URL's bad option). Escaped for a terminal: a message may
/// quote a value a client sent, such as a warrant id. The severity is the
/// server's unlocalized one where it sent it (`lc_messages` translates the
/// other). The server's DETAIL and HINT lines are left out: they may quote
/// whole rows.
pub(crate) fn postgres_text(e: &::postgres::Error) -> String {
    let said = match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!(
            "{} {}: {}",
            db.parsed_severity()
                .map_or_else(|| db.severity().to_string(), |s| s.to_string()),
            db.code().code(),
            db.message()
        ),
        (None, Some(cause)) => cause.to_string(),
        (None, None) => return e.to_string(),
    };
    format!("{e}: {}", crate::codec::escape_for_terminal(&said))
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many
/// have run. Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: escrow key metadata.
    "CREATE TABLE escrow_keys (
        kid            TEXT PRIMARY KEY NOT NULL,
        public_sec1    BLOB NOT NULL,
        not_before     TEXT NOT NULL,
        not_after      TEXT NOT NULL,
        destroy_after  TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        destroyed_at   TEXT,
        destroy_reason TEXT
    ) STRICT;",
    // 2: warrants (first-seen digest and budget per id) and revocations.
    // `spent` only ever grows, and never past `max_unwraps`. Revocations are
    // keyed by id alone: an id may be revoked before it is ever presented.
    "CREATE TABLE warrants (
        id                TEXT PRIMARY KEY NOT NULL,
        payload_digest    BLOB NOT NULL CHECK (length(payload_digest) = 32),
        normalized_digest BLOB NOT NULL CHECK (length(normalized_digest) = 32),
        emergency         INTEGER NOT NULL CHECK (emergency IN (0, 1)),
        max_unwraps       INTEGER NOT NULL CHECK (max_unwraps > 0),
        spent             INTEGER NOT NULL CHECK (spent >= 0 AND spent <= max_unwraps),
        first_seen        TEXT NOT NULL,
        upgraded_at       TEXT
    ) STRICT;
    CREATE TABLE warrant_revocations (
        id          TEXT PRIMARY KEY NOT NULL,
        reason      TEXT NOT NULL,
        revoked_by  TEXT NOT NULL,
        revoked_at  TEXT NOT NULL
    ) STRICT;",
    // 3: the audit log: leaves, complete-subtree hashes, signed checkpoints.
    audit::MIGRATION,
    // 4: witness cosignatures of checkpoints.
    audit::COSIGNATURES_MIGRATION,
    // 5: open intents: written with an unwrap's reservation, before its HSM
    // opens; deleted with its audit leaves (docs/audit.md, `open_interrupted`).
    audit::OPEN_INTENTS_MIGRATION,
];

/// The SQLite schema version this build writes.
pub const SQLITE_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a write waits for another process's write lock before failing.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The store a daemon uses: one of the two backends.
#[derive(Debug)]
pub enum Store {
    /// The embedded SQLite file.
    Sqlite(SqliteStore),
    /// A PostgreSQL database shared by replicas (boxed: its pool and queue
    /// are larger than the SQLite store).
    Postgres(Box<PgStore>),
}

/// Where the store is, as `[store]` configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    /// `[store] path`: an SQLite file.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// `[store] url`: a PostgreSQL database.
    Postgres(PgSettings),
}

impl Store {
    /// Opens an SQLite store (see [`SqliteStore::open`]).
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        SqliteStore::open(path).map(Store::Sqlite)
    }

    /// Opens the configured store, applying pending migrations.
    ///
    /// # Errors
    /// As [`SqliteStore::open`] or [`PgStore::connect`].
    pub fn open_settings(settings: &StoreSettings) -> Result<Self, StoreError> {
        match settings {
            StoreSettings::Sqlite { path } => Self::open(path),
            StoreSettings::Postgres(pg) => {
                PgStore::connect(pg).map(|s| Store::Postgres(Box::new(s)))
            }
        }
    }

    /// Whether a write could start now: the check behind `/readyz`.
    ///
    /// # Errors
    /// The backend's reason.
    pub fn check_writable(&self, wait: std::time::Duration) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.check_writable(wait),
            Store::Postgres(s) => s.check_writable(wait),
        }
    }

    /// Where the store is, for logs (never a password).
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite(s) => s.path().display().to_string(),
            Store::Postgres(s) => s.describe().to_string(),
        }
    }

    /// Database transactions that failed on a serialization failure or a
    /// deadlock and were retried (always 0 for SQLite, whose one writer
    /// cannot deadlock).
    pub fn retries(&self) -> u64 {
        match self {
            Store::Sqlite(_) => 0,
            Store::Postgres(s) => s.retries(),
        }
    }
}

impl KeyStore for Store {
    fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.insert_key(key),
            Store::Postgres(s) => s.insert_key(key),
        }
    }
    fn list_keys_each(&self) -> Result<Vec<keys::KeyRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.list_keys_each(),
            Store::Postgres(s) => s.list_keys_each(),
        }
    }
    fn get_key(&self, kid: &str) -> Result<Option<KeyRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.get_key(kid),
            Store::Postgres(s) => s.get_key(kid),
        }
    }
    fn mark_destroyed(
        &self,
        kid: &str,
        at: time::OffsetDateTime,
        reason: &str,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.mark_destroyed(kid, at, reason),
            Store::Postgres(s) => s.mark_destroyed(kid, at, reason),
        }
    }
}

impl WarrantStore for Store {
    fn register(&self, record: &WarrantRecord) -> Result<Registration, StoreError> {
        match self {
            Store::Sqlite(s) => s.register(record),
            Store::Postgres(s) => s.register(record),
        }
    }
    fn reserve(&self, id: &str, n: u64) -> Result<Reservation, StoreError> {
        match self {
            Store::Sqlite(s) => s.reserve(id, n),
            Store::Postgres(s) => s.reserve(id, n),
        }
    }
    fn reserve_with_intent(&self, id: &str, intent: &[Vec<u8>]) -> Result<Reservation, StoreError> {
        match self {
            Store::Sqlite(s) => s.reserve_with_intent(id, intent),
            Store::Postgres(s) => s.reserve_with_intent(id, intent),
        }
    }
    fn settle(&self, reservation: Reservation, opened: u64) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.settle(reservation, opened),
            Store::Postgres(s) => s.settle(reservation, opened),
        }
    }
    fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.revoke(revocation),
            Store::Postgres(s) => s.revoke(revocation),
        }
    }
    fn revocation(&self, id: &str) -> Result<Option<Revocation>, StoreError> {
        match self {
            Store::Sqlite(s) => s.revocation(id),
            Store::Postgres(s) => s.revocation(id),
        }
    }
    fn spent(&self, id: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Sqlite(s) => s.spent(id),
            Store::Postgres(s) => s.spent(id),
        }
    }
}

impl AuditStore for Store {
    fn append_with(
        &self,
        batch: AuditAppend,
        before_commit: &mut BeforeCommit<'_>,
    ) -> Result<Appended, StoreError> {
        match self {
            Store::Sqlite(s) => s.append_with(batch, before_commit),
            Store::Postgres(s) => s.append_with(batch, before_commit),
        }
    }
    fn tree_size(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.tree_size(),
            Store::Postgres(s) => s.tree_size(),
        }
    }
    fn root(&self, size: u64) -> Result<merkle::Hash, StoreError> {
        match self {
            Store::Sqlite(s) => s.root(size),
            Store::Postgres(s) => s.root(size),
        }
    }
    fn root_through(
        &self,
        size: u64,
        level: u8,
        first: u64,
        nodes: &[merkle::Hash],
    ) -> Result<merkle::Hash, StoreError> {
        match self {
            Store::Sqlite(s) => s.root_through(size, level, first, nodes),
            Store::Postgres(s) => s.root_through(size, level, first, nodes),
        }
    }
    fn leaves(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.leaves(start, end),
            Store::Postgres(s) => s.leaves(start, end),
        }
    }
    fn reads_never_behind(&self) -> bool {
        match self {
            Store::Sqlite(s) => s.reads_never_behind(),
            Store::Postgres(s) => s.reads_never_behind(),
        }
    }
    fn leaves_vouched(&self, start: u64, end: u64) -> Result<(LeafRows, Vouched), StoreError> {
        match self {
            Store::Sqlite(s) => s.leaves_vouched(start, end),
            Store::Postgres(s) => s.leaves_vouched(start, end),
        }
    }
    fn node_rows_vouched(
        &self,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(NodeRows, Vouched), StoreError> {
        match self {
            Store::Sqlite(s) => s.node_rows_vouched(level, start, end),
            Store::Postgres(s) => s.node_rows_vouched(level, start, end),
        }
    }
    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<merkle::Hash>, StoreError> {
        match self {
            Store::Sqlite(s) => s.inclusion_proof(index, size),
            Store::Postgres(s) => s.inclusion_proof(index, size),
        }
    }
    fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<merkle::Hash>, StoreError> {
        match self {
            Store::Sqlite(s) => s.consistency_proof(from, to),
            Store::Postgres(s) => s.consistency_proof(from, to),
        }
    }
    fn save_checkpoint(
        &self,
        size: u64,
        note: &str,
        at: time::OffsetDateTime,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.save_checkpoint(size, note, at),
            Store::Postgres(s) => s.save_checkpoint(size, note, at),
        }
    }
    fn tree_size_on(&self) -> Result<(u64, Server), StoreError> {
        match self {
            Store::Sqlite(s) => s.tree_size_on(),
            Store::Postgres(s) => s.tree_size_on(),
        }
    }
    fn replicated(&self, read_on: &Server) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.replicated(read_on),
            Store::Postgres(s) => s.replicated(read_on),
        }
    }
    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.latest_checkpoint(),
            Store::Postgres(s) => s.latest_checkpoint(),
        }
    }
    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.checkpoints(),
            Store::Postgres(s) => s.checkpoints(),
        }
    }
    fn save_cosignature(&self, cosignature: &Cosignature) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.save_cosignature(cosignature),
            Store::Postgres(s) => s.save_cosignature(cosignature),
        }
    }
    fn replace_cosignature(
        &self,
        cosignature: &Cosignature,
        previous: &str,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.replace_cosignature(cosignature, previous),
            Store::Postgres(s) => s.replace_cosignature(cosignature, previous),
        }
    }
    fn last_cosigned(&self, witness: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Sqlite(s) => s.last_cosigned(witness),
            Store::Postgres(s) => s.last_cosigned(witness),
        }
    }
    fn cosignatures(
        &self,
        sizes: std::ops::Range<u64>,
        limit: u64,
    ) -> Result<Vec<Cosignature>, StoreError> {
        match self {
            Store::Sqlite(s) => s.cosignatures(sizes, limit),
            Store::Postgres(s) => s.cosignatures(sizes, limit),
        }
    }
    fn checkpoint_at(&self, size: u64) -> Result<Option<String>, StoreError> {
        match self {
            Store::Sqlite(s) => s.checkpoint_at(size),
            Store::Postgres(s) => s.checkpoint_at(size),
        }
    }
    fn audit_commits(&self) -> u64 {
        match self {
            Store::Sqlite(s) => s.audit_commits(),
            Store::Postgres(s) => s.audit_commits(),
        }
    }
    fn orphaned_intents(&self, limit: u64) -> Result<Vec<audit::OpenIntent>, StoreError> {
        match self {
            Store::Sqlite(s) => s.orphaned_intents(limit),
            Store::Postgres(s) => s.orphaned_intents(limit),
        }
    }
}

/// The SQLite store. One writer connection behind a mutex: SQLite serialises
/// writers anyway, and one connection lets concurrent callers share a commit.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    group: audit::GroupCommit,
}

/// Whether SQLite reads `path` as a file's name: not `:memory:` (an
/// in-memory database) nor a `file:` URI.
pub fn names_a_file(path: &Path) -> bool {
    path != Path::new(":memory:") && !path.to_str().is_some_and(|p| p.starts_with("file:"))
}

/// Creates `path`, empty and readable by its owner only (0600), if it does
/// not exist: SQLite would create it under the process's umask (0644 under
/// a container's usual 022), and its `-wal` and `-shm` files take the main
/// file's mode. The budgets, revocations and the log are not for other
/// local users to read. An existing file is left as it is.
///
/// # Errors
/// The file system's, other than "it exists".
pub fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if !names_a_file(path) {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Free space below which the SQLite store is not ready (`/readyz`): room
/// for the leaves and tree hashes of a few thousand envelopes, so that a
/// file system that is filling up turns the daemon not ready before commits
/// start to fail.
pub const SQLITE_MIN_FREE: u64 = 4 * 1024 * 1024;

/// Prepared statements kept per SQLite connection: more than the store has.
const STATEMENT_CACHE: usize = 64;

impl SqliteStore {
    /// Opens (creating if absent) the database at `path`, sets WAL and
    /// `synchronous=FULL`, and applies pending migrations.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] if the file cannot be opened or migrated;
    /// [`StoreError::Unavailable`] if SQLite cannot keep a write-ahead log
    /// there; [`StoreError::SchemaTooNew`] if a newer `lavd` wrote it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        create_private(path).map_err(|e| StoreError::Unavailable {
            store: path.display().to_string(),
            reason: format!("cannot create the store file: {e}"),
        })?;
        let mut conn = Connection::open(path).map_err(err)?;
        // First: switching to WAL takes a lock too, which another process
        // opening the file at the same moment may hold.
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        // WAL: readers do not block the writer. FULL: a commit is on disk
        // (fsync of the WAL) before `commit()` returns; this is what
        // "durable" means everywhere in lavd.
        // SQLite answers a switch to WAL that meets another connection's
        // lock with "database is locked" at once, without waiting: only
        // when processes create the file together (an existing file is in
        // WAL already and the switch is a no-op), so wait here.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            // The answer is the mode in force: a file system without the
            // shared memory WAL needs answers with the old mode, no error.
            match conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            {
                Ok(mode) if mode.eq_ignore_ascii_case("wal") => break,
                Ok(mode) => {
                    return Err(StoreError::Unavailable {
                        store: path.display().to_string(),
                        reason: format!(
                            "SQLite cannot use its write-ahead log here (journal mode stayed \
                             {mode:?}); put the store on a local file system"
                        ),
                    })
                }
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(err(e)),
            }
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        // Before any migration: a store `lavd store copy` moved is opened by
        // no one (the copy's own mark; `lavd store copy`'s source too).
        if let Some((to, at, size)) = moved(&conn).map_err(err)? {
            return Err(StoreError::Moved {
                store: path.display().to_string(),
                to,
                at,
                size,
            });
        }
        // Every statement of the unwrap path stays prepared (the tree's
        // node reads alone are dozens a request): room for all of them.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);

        // How many migrations the file has had: within 0 ..= ours.
        let applied = |version: i64| -> Result<usize, StoreError> {
            let supported = MIGRATIONS.len() as i64;
            if version > supported {
                return Err(StoreError::SchemaTooNew {
                    store: path.display().to_string(),
                    found: version,
                    supported,
                });
            }
            usize::try_from(version).map_err(|_| StoreError::Corrupt {
                store: path.display().to_string(),
                what: format!("schema version (user_version) {version} is negative"),
            })
        };
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(err)?;
        if applied(version)? < MIGRATIONS.len() {
            // Under the write lock, and the version read again under it:
            // processes opening the file at once (a service and a CLI
            // command after an upgrade) migrate it once, not each.
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(err)?;
            let version: i64 = tx
                .pragma_query_value(None, "user_version", |row| row.get(0))
                .map_err(err)?;
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied(version)?) {
                tx.execute_batch(sql).map_err(err)?;
                tx.pragma_update(None, "user_version", i as i64 + 1)
                    .map_err(err)?;
            }
            tx.commit().map_err(err)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            group: audit::GroupCommit::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a write could start now: takes SQLite's write lock
    /// (`BEGIN IMMEDIATE`) and rolls back at once. The check behind
    /// `/readyz`. It fails when another process holds the write lock for
    /// longer than `wait`, or when the file, its WAL or its shared-memory
    /// index cannot be opened for writing. Then the file system: it fails
    /// when it is mounted read-only, has less than [`SQLITE_MIN_FREE`]
    /// bytes free for unprivileged writers, or refuses a one-byte synced
    /// write to `<store>.ready` beside the store (a disk the kernel turned
    /// read-only after an I/O error shows only then). (A commit can still fail for
    /// want of space with more free than that, e.g. a very large batch:
    /// that commit is refused whole, and nothing is released.)
    ///
    /// # Errors
    /// [`StoreError::Sqlite`] with SQLite's reason, or
    /// [`StoreError::Unavailable`] naming the file system's state.
    pub fn check_writable(&self, wait: std::time::Duration) -> Result<(), StoreError> {
        self.check_lock(wait)?;
        let unavailable = |reason: String| StoreError::Unavailable {
            store: self.path.display().to_string(),
            reason,
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let fs = rustix::fs::statvfs(dir)
            .map_err(|e| unavailable(format!("statvfs {}: {e}", dir.display())))?;
        if fs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
            return Err(unavailable(format!(
                "{} is on a read-only file system",
                dir.display()
            )));
        }
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        if free < SQLITE_MIN_FREE {
            return Err(unavailable(format!(
                "{free} bytes free on its file system (at least {SQLITE_MIN_FREE} wanted)"
            )));
        }
        // A file system the kernel turned read-only after an I/O error
        // (ext4 `errors=remount-ro`) still says it is writable to statvfs,
        // and SQLite's write lock lives in shared memory, so it is still
        // granted: only a real write shows it. One byte, synced, in a file
        // beside the store.
        let mut probe = self.path.clone().into_os_string();
        probe.push(".ready");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&probe)?;
            std::io::Write::write_all(&mut f, b"1")?;
            f.sync_data()
        };
        write()
            .map_err(|e| unavailable(format!("cannot write {}: {e}", Path::new(&probe).display())))
    }

    fn check_lock(&self, wait: std::time::Duration) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.busy_timeout(wait).map_err(|e| self.sqlite_err(e))?;
        let result = conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;");
        if result.is_err() && !conn.is_autocommit() {
            // BEGIN succeeded and ROLLBACK failed: do not leave the shared
            // connection inside a transaction.
            let _ = conn.execute_batch("ROLLBACK;");
        }
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| self.sqlite_err(e))?;
        result.map_err(|e| self.sqlite_err(e))
    }

    /// SQLite's `synchronous` on the store's connection, as a number (2 is
    /// `FULL`: each commit flushed before it returns), for the tests that
    /// hold lavd to it: a SIGKILL loses nothing any setting wrote, a power
    /// loss does.
    ///
    /// # Errors
    /// [`StoreError::Sqlite`].
    pub fn synchronous(&self) -> Result<i64, StoreError> {
        self.conn()
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .map_err(|e| self.sqlite_err(e))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction
        // behind (rusqlite rolls back on drop), so a poisoned lock is usable.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sqlite_err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            store: self.path.display().to_string(),
            what: what.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_negative_schema_version_is_refused_and_the_file_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        let other = rusqlite::Connection::open(&path).unwrap();
        other.pragma_update(None, "user_version", -1).unwrap();
        drop(other);
        let e = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("user_version) -1"), "{e}");
        let other = rusqlite::Connection::open(&path).unwrap();
        let tables: i64 = other
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0, "migrations ran on a file of version -1");
    }

    #[test]
    fn check_writable_fails_while_another_connection_holds_the_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lavd.db");
        let store = SqliteStore::open(&path).unwrap();
        store.check_writable(Duration::from_millis(50)).unwrap();

        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE;").unwrap();
        let e = store.check_writable(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, StoreError::Sqlite { .. }), "{e}");
        assert!(store.conn().is_autocommit(), "left inside a transaction");

        other.execute_batch("ROLLBACK;").unwrap();
        store.check_writable(Duration::from_millis(50)).unwrap();
    }

    /// A database where SQLite cannot keep a write-ahead log answers the
    /// switch with its old mode and no error; lavd refuses it rather than
    /// run on another journal than the one it was built for. SQLite's
    /// in-memory database is such a place (it answers "memory").
    #[test]
    fn a_database_that_cannot_use_wal_is_refused() {
        let e = SqliteStore::open(Path::new(":memory:")).unwrap_err();
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
        assert!(
            e.to_string().contains("journal mode stayed \"memory\""),
            "{e}"
        );
    }
}
