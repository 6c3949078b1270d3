//! `lavd store`: schema management for the configured store.

use super::outln;
use std::path::PathBuf;

use clap::Subcommand;

use super::ConfigArg;
use crate::store::{PgStore, SqliteStore, StoreError, StoreSettings, SQLITE_SCHEMA_VERSION};

/// `lavd store …`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Apply pending schema migrations to the configured store (SQLite or
    /// PostgreSQL) and print the schema version. Refuses a schema newer than
    /// this binary. `lavd serve` also migrates at start. A store that is not
    /// there (no file, no lavd schema) is refused (`store_missing`) unless
    /// `--new` is given.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Make the store if it is not there (a new deployment's). Without
        /// it, a volume not mounted or a database re-created is refused,
        /// not made anew: the daemons would then begin a second log under
        /// the same origin and key, a fork.
        #[arg(long)]
        new: bool,
    },
    /// Copy an SQLite store into a new, empty PostgreSQL database: key
    /// metadata, warrants and budgets, revocations, the whole log and its
    /// checkpoints, in one transaction. The log is re-verified on the way
    /// (every checkpoint's signature under `--key` and its root against the
    /// copied leaves; the root must come out identical). Refuses a target
    /// that is not empty; an interrupted copy commits none of the copied
    /// rows (the target may keep lavd's schema), so it is safe to run again.
    /// A copy that committed marks the SQLite file copied, which lavd then
    /// refuses to open (`store_moved`). Stop the daemon that uses the SQLite file first.
    Copy {
        /// The SQLite database file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The target, a `postgresql://` URL as in `[store] url`.
        #[arg(long, value_name = "URL")]
        to: String,
        /// File holding the target's password.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Environment variable holding the target's password.
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
        /// CA of the target server's certificate (for `sslmode=verify-full`).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// The audit log's verifier key (`lavd audit key`), or a file
        /// holding it.
        #[arg(long, value_name = "VKEY|FILE")]
        key: String,
    },
}

impl StoreCommand {
    /// Runs the command.
    ///
    /// # Errors
    /// A bad config (exit 64) or the store's error.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            StoreCommand::Migrate { config, new } => {
                let settings = config.load()?;
                if let (Err(why), false) = (crate::store::probe_existing(&settings.store)?, new) {
                    return Err(super::Refused::new(
                        "store_missing",
                        format!(
                            "{why}: nothing to migrate. If the store was lost (a volume not \
                             mounted, a database re-created), restore it: a new one would \
                             begin a second audit log under the same origin and key, a fork. \
                             For a new deployment's store, give --new"
                        ),
                    )
                    .into());
                }
                let (store, version) = match &settings.store {
                    StoreSettings::Sqlite { path } => {
                        SqliteStore::open(path)?;
                        (path.display().to_string(), SQLITE_SCHEMA_VERSION)
                    }
                    StoreSettings::Postgres(pg) => {
                        let store = PgStore::connect(pg)?;
                        (store.describe().to_string(), store.migrate()?)
                    }
                };
                outln!("{store}: schema version {version}");
                Ok(())
            }
            StoreCommand::Copy {
                from,
                to,
                password_file,
                password_env,
                ca_file,
                key,
            } => {
                let target = crate::config::postgres_target(
                    to,
                    password_file,
                    password_env,
                    ca_file,
                    &crate::config::ProcessEnv,
                )?;
                let StoreSettings::Postgres(pg) = target else {
                    anyhow::bail!("--to must be a postgresql:// URL");
                };
                // As `lavd audit verify` takes it: the key, or a file
                // holding it; a bad one keeps its code.
                let key = anyhow::Context::context(super::audit::verifier_key(key), "--key")?;
                // Named before the lock, which makes a file beside it: a
                // path with no file, or a directory, is no store.
                refuse_unless_lavd_store(&from)?;
                // Not beside a `lavd serve` on it: what it commits after the
                // copy's snapshot would be missing from the copy.
                super::serve::lock_sqlite_store(&from)?;
                refuse_unless_lavd_store(&from)?;
                let source = SqliteStore::open(&from)?;
                let target = PgStore::connect(&pg)?;
                let report = target.copy_from_sqlite(&source, &key)?;
                outln!(
                    "copied {} keys, {} warrants, {} revocations, {} leaves, {} checkpoints and \
                     {} cosignatures from {} to {}; root {}",
                    report.keys,
                    report.warrants,
                    report.revocations,
                    report.leaves,
                    report.checkpoints,
                    report.cosignatures,
                    from.display(),
                    target.describe(),
                    crate::codec::b64_encode(report.root)
                );
                Ok(())
            }
        }
    }
}

/// Refuses a `--from` that is not a lavd SQLite store: opening it as one
/// would write lavd's schema into it (a zero-length placeholder, another
/// program's database), and copy an empty log, from which the target
/// would start a new one. Read only: the file itself is not changed
/// (SQLite may create the `-wal` and `-shm` files of a WAL database beside
/// it).
fn refuse_unless_lavd_store(from: &std::path::Path) -> Result<(), StoreError> {
    crate::store::probe_sqlite(from)?
        .map_err(|why| StoreError::CopyRefused(format!("--from: {why}")))
}
