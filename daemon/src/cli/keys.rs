//! `lavd keys …`: escrow and audit key lifecycle against the configured HSM.

use anyhow::Context as _;
use time::OffsetDateTime;

use super::ConfigArg;
use crate::codec::parse_time;
use crate::hsm::Hsm;
use crate::keys::{self, DestroyReason, Validity};
use crate::store::Store;

/// Key lifecycle subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Generate a P-256 escrow key pair inside the HSM (derive-only,
    /// sensitive, non-extractable) and record its validity and retention.
    Generate {
        #[command(flatten)]
        config: ConfigArg,
        /// The epoch name, e.g. 2026-12.
        #[arg(long)]
        kid: String,
        /// Providers may seal to it from this time (RFC 3339 UTC).
        #[arg(long, value_parser = time_arg)]
        not_before: OffsetDateTime,
        /// Providers stop sealing to it at this time (RFC 3339 UTC).
        #[arg(long, value_parser = time_arg)]
        not_after: OffsetDateTime,
        /// End of retention: after it the private key is destroyed (RFC 3339 UTC).
        #[arg(long, value_parser = time_arg)]
        destroy_after: OffsetDateTime,
    },
    /// Print the JWK Set of usable escrow public keys (PROTOCOL §2).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Destroy an escrow key's private half in the HSM. Refused before its
    /// retention ends unless --force and --reason are given.
    Destroy {
        #[command(flatten)]
        config: ConfigArg,
        /// The key to destroy.
        #[arg(long)]
        kid: String,
        /// Destroy before the end of retention.
        #[arg(long, requires = "reason")]
        force: bool,
        /// Why (recorded with the key and in the audit log).
        #[arg(long, requires = "force")]
        reason: Option<String>,
    },
    /// Generate the Ed25519 audit signing key inside the HSM (sign-only,
    /// non-extractable) and print its public key.
    GenerateAudit {
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn time_arg(s: &str) -> Result<OffsetDateTime, String> {
    parse_time(s).map_err(|e| e.to_string())
}

impl KeysCommand {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// A config, HSM, store or lifecycle error.
    pub fn run(self) -> anyhow::Result<()> {
        let now = OffsetDateTime::now_utc();
        match self {
            KeysCommand::Generate {
                config,
                kid,
                not_before,
                not_after,
                destroy_after,
            } => {
                let settings = config.load()?;
                keys::check_kid(&kid)?;
                let store = Store::open(&settings.store_path)?;
                let hsm = Hsm::open(settings.hsm)?;
                let validity = Validity {
                    not_before,
                    not_after,
                    destroy_after,
                };
                let record = keys::generate(&hsm, &store, &kid, validity, now)?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &keys::jwks(&store, now)?
                            .keys
                            .into_iter()
                            .find(|k| k.kid.as_deref() == Some(record.kid.as_str()))
                            .unwrap_or_else(|| record.public.to_jwk())
                    )?
                );
            }
            KeysCommand::List { config } => {
                let settings = config.load()?;
                let store = Store::open(&settings.store_path)?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&keys::jwks(&store, now)?)?
                );
            }
            KeysCommand::Destroy {
                config,
                kid,
                force,
                reason,
            } => {
                let settings = config.load()?;
                let store = Store::open(&settings.store_path)?;
                let hsm = Hsm::open(settings.hsm)?;
                let reason = if force {
                    DestroyReason::Forced(reason.unwrap_or_default())
                } else {
                    DestroyReason::Retention
                };
                let record = keys::destroy(&hsm, &store, &kid, reason, now)?;
                eprintln!(
                    "escrow key {} destroyed ({}); envelopes sealed to it can no longer be opened",
                    record.kid,
                    record.destroy_reason.as_deref().unwrap_or("")
                );
            }
            KeysCommand::GenerateAudit { config } => {
                let settings = config.load()?;
                let hsm = Hsm::open(settings.hsm)?;
                let info = hsm
                    .generate_audit_key(&settings.audit.key_label)
                    .context("generating the audit key")?;
                println!("{}", serde_json::to_string_pretty(&info.public.to_jwk())?);
            }
        }
        Ok(())
    }
}
