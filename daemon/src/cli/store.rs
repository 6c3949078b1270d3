//! `lavd store`: schema management for the configured store.

use clap::Subcommand;

use super::ConfigArg;
use crate::store::{PgStore, SqliteStore, StoreSettings, SQLITE_SCHEMA_VERSION};

/// `lavd store …`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Apply pending schema migrations to the configured store (SQLite or
    /// PostgreSQL) and print the schema version. Refuses a schema newer than
    /// this binary. `lavd serve` also migrates at start.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
}

impl StoreCommand {
    /// Runs the command.
    ///
    /// # Errors
    /// A bad config (exit 64) or the store's error.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            StoreCommand::Migrate { config } => {
                let settings = config.load()?;
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
                println!("{store}: schema version {version}");
                Ok(())
            }
        }
    }
}
