//! The `lavd` command line: one subcommand family per role that uses it
//! (operators: `serve`, `keys`; providers: `seal`; authorities: `warrant`;
//! agencies: `open`; auditors: `audit`).

pub mod keys;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Lawful Access Vault daemon and tools.
#[derive(Debug, Parser)]
#[command(name = "lavd", version, about, max_term_width = 100)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Escrow and audit key lifecycle (operators).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
}

impl Command {
    /// Runs the command.
    ///
    /// # Errors
    /// Whatever the command reports; `main` turns a [`crate::config::ConfigError`]
    /// into exit code 64.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Keys(cmd) => cmd.run(),
        }
    }
}

/// `--config FILE`, shared by every subcommand that touches the HSM or store.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The daemon's config file.
    #[arg(long, value_name = "FILE", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

impl ConfigArg {
    /// Loads and validates the config from the process environment.
    ///
    /// # Errors
    /// [`crate::config::ConfigError`].
    pub fn load(&self) -> Result<crate::config::Settings, crate::config::ConfigError> {
        crate::config::Settings::load(&self.config, &crate::config::ProcessEnv)
    }
}
