//! `lavd audit …`: export the log (operators) and verify an export offline
//! (auditors, oversight bodies). `verify` needs no HSM, config or daemon:
//! only the log's verifier key.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use super::ConfigArg;
use crate::audit::export::{verify_export, verify_export_against, Export, VerifyError};
use crate::audit::log::AuditLog;
use crate::audit::note::VerifierKey;
use crate::hsm::Hsm;
use crate::store::Store;

/// Audit log subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Print the log's signed-note verifier key (give it to auditors).
    Key {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write every leaf and a freshly signed checkpoint to a file.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// Where to write the export (JSON).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Verify an export offline: checkpoint signatures, every leaf against
    /// the signed root, sequence numbers, and consistency with what you saw
    /// before. Prints a summary; names the first bad index on failure.
    Verify {
        /// The verifier key (`<origin>+<key id>+<base64 key>`), or a file
        /// holding it.
        #[arg(long, value_name = "KEY|FILE")]
        key: String,
        /// The export to check.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "url",
            conflicts_with = "url"
        )]
        export: Option<PathBuf>,
        /// Fetch the log from a running daemon instead (`https://host:port`),
        /// as an auditor: needs `--ca`, `--cert` and `--client-key`.
        #[arg(long, value_name = "URL", requires_all = ["ca", "cert", "client_key"])]
        url: Option<String>,
        /// CA bundle that the daemon's server certificate chains to.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// The auditor's client certificate (PEM).
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// The auditor's client private key (PEM).
        #[arg(long, value_name = "FILE")]
        client_key: Option<PathBuf>,
        /// With `--url`: the largest reply the daemon may send to one
        /// request, in bytes (a page of 1000 leaves is well under 1 MiB).
        #[arg(
            long,
            value_name = "BYTES",
            default_value_t = super::https::DEFAULT_MAX_RESPONSE_BYTES,
            value_parser = clap::value_parser!(usize)
        )]
        max_response_bytes: usize,
        /// With `--url`: the longest one request may take, in seconds, from
        /// connecting to the last byte of the reply.
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = super::https::DEFAULT_TIMEOUT_SECS,
            value_parser = clap::value_parser!(u64).range(1..=3600)
        )]
        timeout: u64,
        /// A signed checkpoint you kept from earlier: the export must extend it.
        #[arg(long, value_name = "FILE", conflicts_with = "previous")]
        checkpoint: Option<PathBuf>,
        /// An export you verified earlier: its leaves must be a prefix of
        /// this one's (locates a rewritten leaf exactly).
        #[arg(long, value_name = "FILE")]
        previous: Option<PathBuf>,
        /// Also write the new export's checkpoint here, to pass as
        /// `--checkpoint` next time.
        #[arg(long, value_name = "FILE")]
        save_checkpoint: Option<PathBuf>,
    },
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

impl AuditCommand {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// A config, HSM or store error, or the [`VerifyError`] that failed.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            AuditCommand::Key { config } => {
                let log = open_log(&config)?;
                println!("{}", log.verifier_key()?);
            }
            AuditCommand::Export { config, out } => {
                let log = open_log(&config)?;
                let export = log.export()?;
                std::fs::write(&out, export.to_json()?)
                    .with_context(|| format!("writing {}", out.display()))?;
                eprintln!(
                    "exported {} entries to {}",
                    export.entries.len(),
                    out.display()
                );
            }
            AuditCommand::Verify {
                key,
                export,
                url,
                ca,
                cert,
                client_key,
                max_response_bytes,
                timeout,
                checkpoint,
                previous,
                save_checkpoint,
            } => {
                let limits = super::https::Limits {
                    max_response_bytes,
                    timeout: std::time::Duration::from_secs(timeout),
                };
                let key_text = match std::fs::read_to_string(&key) {
                    Ok(text) => text.trim().to_string(),
                    Err(_) => key,
                };
                let key = VerifierKey::parse(&key_text).context("the verifier key")?;
                let new = match (export, url, ca, cert, client_key) {
                    (Some(export), ..) => Export::parse(&read(&export)?)?,
                    (None, Some(url), Some(ca), Some(cert), Some(client_key)) => {
                        fetch_export(&url, &ca, &cert, &client_key, &key, limits)?
                    }
                    _ => anyhow::bail!(
                        "give --export FILE, or --url with --ca, --cert and --client-key"
                    ),
                };
                let summary = match (checkpoint, previous) {
                    (Some(path), _) => {
                        let older = String::from_utf8(read(&path)?)
                            .context("the checkpoint file is not UTF-8")?;
                        verify_export(&new, &key, Some(&older))?
                    }
                    (None, Some(path)) => {
                        let previous = Export::parse(&read(&path)?)?;
                        verify_export_against(&new, &key, &previous)?
                    }
                    (None, None) => verify_export(&new, &key, None)?,
                };
                print!("{summary}");
                println!("verdict: the log verifies");
                if let Some(path) = save_checkpoint {
                    std::fs::write(&path, &new.checkpoint)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
        }
        Ok(())
    }
}

/// Fetches the whole log from a daemon's audit endpoints (PROTOCOL §6): the
/// current checkpoint, then every leaf up to its size in pages. Nothing
/// fetched is trusted; [`verify_export`] checks it all against `key`.
fn fetch_export(
    url: &str,
    ca: &std::path::Path,
    cert: &std::path::Path,
    client_key: &std::path::Path,
    key: &VerifierKey,
    limits: super::https::Limits,
) -> anyhow::Result<Export> {
    let client = super::https::Client::new(url, ca, cert, client_key, limits)?;
    let checkpoint = client.get_json("/v1/audit/checkpoint")?["checkpoint"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no checkpoint in the reply"))?
        .to_string();
    let signed = crate::audit::note::verify_checkpoint(&checkpoint, key)
        .context("the daemon's checkpoint")?;
    let mut entries = Vec::new();
    let mut start = 0u64;
    while start < signed.size {
        let end = signed
            .size
            .min(start + crate::api::handlers::MAX_ENTRIES_PAGE);
        let page = client.get_json(&format!("/v1/audit/entries?start={start}&end={end}"))?;
        let items = page["entries"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("no entries in the reply"))?;
        if items.is_empty() {
            break; // the verifier reports the missing entries
        }
        for item in items {
            entries.push(serde_json::from_value(item.clone()).context("an entry")?);
        }
        start += items.len() as u64;
    }
    Ok(Export {
        origin: signed.origin,
        checkpoint,
        earlier_checkpoints: Vec::new(),
        entries,
    })
}

fn open_log(config: &ConfigArg) -> anyhow::Result<AuditLog> {
    let settings = config.load()?;
    let store = Arc::new(Store::open_settings(&settings.store)?);
    let hsm = Hsm::open(settings.hsm)?;
    Ok(AuditLog::new(
        store,
        hsm,
        &settings.audit.key_label,
        &settings.audit.origin,
    )?)
}

/// The first bad index of a verification failure, for the error line.
pub fn describe(e: &VerifyError) -> String {
    match (e.first_bad_index(), e.bad_range()) {
        (Some(i), _) => format!("first bad index: {i}"),
        (None, Some(r)) => format!("first bad index in {}..{}", r.start, r.end),
        (None, None) => String::new(),
    }
}
