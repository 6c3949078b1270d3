//! `lavd audit …`: export the log (operators), verify an export offline and
//! turn it into the oversight report (auditors, oversight bodies; `report`
//! is in [`super::report`]). `verify` and `report` need no HSM, config or
//! daemon: only the log's verifier key.

use super::{out, outln};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use super::{read_regular, ConfigArg};
use crate::audit::export::{verify_export, verify_export_against, Export, VerifyError};
use crate::audit::log::AuditLog;
use crate::audit::note::VerifierKey;
use crate::hsm::Hsm;

/// Audit log subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Print the log's signed-note verifier key (give it to auditors).
    Key {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write a freshly signed checkpoint, every leaf it covers and the
    /// checkpoints signed before it to a file.
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
        #[command(flatten)]
        source: LogSource,
        /// Also write the new export's checkpoint here, to pass as
        /// `--checkpoint` next time.
        #[arg(long, value_name = "FILE")]
        save_checkpoint: Option<PathBuf>,
    },
    /// Verify the log exactly as `verify` does, then write the oversight
    /// report: one self-contained HTML page and, optionally, the same
    /// figures as JSON. Nothing is written from a log that does not verify.
    Report(super::report::ReportArgs),
    /// Mirror the log's C2SP tiles into a directory, incrementally: fetch
    /// the newest checkpoint, check its signature and that it extends the
    /// one already mirrored, fetch only the tiles and entry bundles the
    /// directory lacks, hold every tile to the signed root, and only then
    /// replace the mirrored checkpoint. Safe to interrupt and run again.
    Mirror {
        /// The log's verifier key (`<origin>+<key id>+<base64 key>`), or a
        /// file holding it.
        #[arg(long, value_name = "KEY|FILE")]
        key: String,
        /// The prefix the tiles are served under (`https://host:port/v1/log`).
        #[arg(long, value_name = "URL")]
        url: String,
        /// The mirror directory (created if missing); `lavd audit verify
        /// --tiles DIR` reads it.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
}

/// The most a tlog-policy file may hold: a few lines per witness.
const MAX_POLICY_FILE_BYTES: u64 = 1 << 20;

/// The most one entry of an export, or of an entries page, may take as
/// JSON: a leaf of at most 65,535 bytes in base64 (87,380 characters), its
/// index and the object around them.
const ENTRY_JSON_BYTES: u64 = 88 * 1024;

/// The most base64 characters a leaf of [`crate::audit::leaf::MAX_LEAF_BYTES`]
/// takes (without padding, as exports and pages carry it).
const LEAF_B64_CHARS: usize = (crate::audit::leaf::MAX_LEAF_BYTES * 4).div_ceil(3);

/// The most an export file may hold for `max_entries` entries: each leaf at
/// most 65,535 bytes ([`ENTRY_JSON_BYTES`]), plus the checkpoints.
fn export_file_bound(max_entries: u64) -> u64 {
    max_entries
        .saturating_mul(ENTRY_JSON_BYTES)
        .saturating_add(1 << 24)
}

/// Reads an input file: a regular file only (not a FIFO that never ends or
/// a link to `/dev/zero` in a handed-over bundle), of at most `limit` bytes.
fn read(path: &std::path::Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    Ok(super::read_input_within(path, limit)?)
}

/// Parses an export file, refusing one of more entries than `max_entries`.
fn read_export(path: &std::path::Path, max_entries: u64) -> anyhow::Result<Export> {
    let export = Export::parse(&read(path, export_file_bound(max_entries))?)?;
    within_max_entries(export.entries.len() as u64, max_entries)?;
    Ok(export)
}

impl AuditCommand {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// A config, HSM or store error, or the [`VerifyError`] that failed.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            AuditCommand::Key { config } => {
                // The token's key alone: no store is opened, so none is made.
                let settings = config.load()?;
                let hsm = super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
                    Hsm::open(settings.hsm)
                })?;
                let public = hsm.audit_key(&settings.audit.key_label)?.public;
                outln!(
                    "{}",
                    crate::audit::note::verifier_key(&settings.audit.origin, public.bytes())?
                );
            }
            AuditCommand::Export { config, out } => {
                let log = open_log(&config)?;
                let export = log.export()?;
                write_atomically(&out, &export.to_json()?)
                    .with_context(|| format!("writing {}", out.display()))?;
                eprintln!(
                    "exported {} entries to {}",
                    export.entries.len(),
                    out.display()
                );
            }
            AuditCommand::Verify {
                source,
                save_checkpoint,
            } => {
                let verified = source.verify()?;
                // Saved first: a run that exits 1 never printed the verdict.
                if let Some(path) = save_checkpoint {
                    write_atomically(&path, verified.export.checkpoint.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                out!("{}", verified.summary);
                for (name, at) in &verified.cosigned {
                    outln!("cosigned by witness {name} at {}", unix_time_text(*at));
                }
                if let Some(at) = verified.quorum_as_of {
                    outln!("witness quorum as of {}", unix_time_text(at));
                }
                outln!("verdict: the log verifies");
            }
            AuditCommand::Report(args) => args.run()?,
            AuditCommand::Mirror {
                key,
                url,
                dir,
                remote,
            } => mirror(&verifier_key(key)?, &url, &dir, &remote)?,
        }
        Ok(())
    }
}

/// Where the log to verify comes from and what it must extend: the inputs
/// of `lavd audit verify`, shared with `lavd audit report` so that both
/// verify the same way.
#[derive(Debug, clap::Args)]
pub struct LogSource {
    /// The verifier key (`<origin>+<key id>+<base64 key>`), or a file
    /// holding it.
    #[arg(long, value_name = "KEY|FILE")]
    pub key: String,
    /// The export to check.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["url", "tiles"],
        conflicts_with_all = ["url", "tiles"]
    )]
    pub export: Option<PathBuf>,
    /// Fetch the log from a running daemon instead (`https://host:port`),
    /// as an auditor: needs `--ca`, `--cert` and `--client-key`.
    #[arg(long, value_name = "URL", conflicts_with = "tiles")]
    pub url: Option<String>,
    /// Read the log as C2SP tlog-tiles instead: a directory laid out as the
    /// tiles are served (`checkpoint`, `tile/…`), or the prefix they are
    /// served under (`https://host:port/v1/log`, as an auditor: needs
    /// `--ca`, `--cert` and `--client-key`).
    #[arg(long, value_name = "DIR|URL")]
    pub tiles: Option<String>,
    #[command(flatten)]
    pub remote: Remote,
    /// A C2SP tlog-policy file: the log's checkpoint must be signed by one
    /// of its logs and cosigned by a quorum of its witnesses.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// With `--policy`: refuse the checkpoint (`checkpoint_stale`) unless
    /// its witness quorum cosigned it within the last SECS seconds. A
    /// mirror or cache that keeps serving an old checkpoint, and its
    /// tiles, hides everything the log appended since; the witnesses'
    /// clocks are what show it.
    #[arg(
        long,
        value_name = "SECS",
        requires = "policy",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_cosignature_age: Option<u64>,
    /// A signed checkpoint you kept from earlier: the export must extend it.
    #[arg(long, value_name = "FILE", conflicts_with = "previous")]
    pub checkpoint: Option<PathBuf>,
    /// An export you verified earlier: its leaves must be a prefix of
    /// this one's (locates a rewritten leaf exactly).
    #[arg(long, value_name = "FILE")]
    pub previous: Option<PathBuf>,
}

/// How the tools reach a daemon (or a tile server): mutual TLS with the
/// auditor's certificate, or plain server-authenticated TLS for a public log
/// listener, every request bounded.
#[derive(Debug, clap::Args)]
pub struct Remote {
    /// CA bundle that the daemon's server certificate chains to.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The auditor's client certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The auditor's client private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// With `--url`: the largest reply the daemon may send to one
    /// request, in bytes (a page of 1000 leaves is well under 1 MiB).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = super::https::DEFAULT_MAX_RESPONSE_BYTES,
        value_parser = clap::value_parser!(usize)
    )]
    pub max_response_bytes: usize,
    /// With `--url`: the longest one request may take, in seconds, from
    /// connecting to the last byte of the reply.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = super::https::DEFAULT_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub timeout: u64,
    /// The most entries a log read from a URL or tiles may claim: its
    /// signed size is refused above this (`log_too_large`) before anything
    /// else is fetched. The whole log is held in memory while it is
    /// verified, some hundreds of bytes an entry; raise it for a larger log.
    #[arg(
        long,
        value_name = "N",
        default_value_t = DEFAULT_MAX_ENTRIES,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_entries: u64,
}

pub use crate::audit::witness::COSIGNATURE_FUTURE_SKEW_SECS;

/// The witness policy's verdict on a checkpoint ([`judge_cosignatures`]).
#[derive(Debug, Default)]
pub struct Judged {
    /// The witnesses whose cosignatures verified and count, each with the
    /// newest time it cosigned at (Unix seconds), in policy order.
    pub cosigned: crate::audit::witness::Cosigned,
    /// The latest time the quorum held ([`Policy::quorum_as_of`]); `None`
    /// under `quorum none`.
    ///
    /// [`Policy::quorum_as_of`]: crate::audit::witness::Policy::quorum_as_of
    pub as_of: Option<u64>,
    /// Witnesses whose cosignature verified but is stamped more than
    /// [`COSIGNATURE_FUTURE_SKEW_SECS`] past the verifier's clock: set aside,
    /// not counted.
    pub ahead: crate::audit::witness::Cosigned,
}

/// Judges a checkpoint against the witness policy and the verifier's clock.
///
/// A cosignature stamped more than [`COSIGNATURE_FUTURE_SKEW_SECS`] past
/// `now` is set aside (its witness's clock runs ahead, and counting it would
/// make a frozen view look fresh); the checkpoint passes when the other
/// witnesses still make the quorum, so that one witness's clock cannot fail
/// a log the quorum vouches for.
///
/// # Errors
/// What [`Policy::verify`] refuses; `cosignature_in_future` when the
/// quorum needs a cosignature set aside; `checkpoint_stale` when the
/// quorum's time is more than `max_age` seconds before `now` (under
/// `quorum none` there is no quorum time, and `max_age` is not looked at).
///
/// [`Policy::verify`]: crate::audit::witness::Policy::verify
pub fn judge_cosignatures(
    policy: &crate::audit::witness::Policy,
    checkpoint: &str,
    now: u64,
    max_age: Option<u64>,
) -> anyhow::Result<Judged> {
    let shown = unix_time_text;
    let (ahead, cosigned): (Vec<_>, Vec<_>) = policy
        .verify(checkpoint)?
        .1
        .into_iter()
        .partition(|(_, at)| crate::audit::witness::ahead_of(*at, now));
    let counted: Vec<String> = cosigned.iter().map(|(name, _)| name.clone()).collect();
    if !policy.quorum_met_by_names(&counted) {
        let named: Vec<String> = ahead
            .iter()
            .map(|(name, at)| format!("witness `{name}` at {}", shown(*at)))
            .collect();
        return Err(super::Refused::new(
            "cosignature_in_future",
            format!(
                "the witness quorum needs cosignatures stamped more than \
                 {COSIGNATURE_FUTURE_SKEW_SECS} s after this machine's clock ({}): {}; a witness \
                 clock that runs ahead cannot vouch for the checkpoint's age",
                shown(now),
                named.join(", ")
            ),
        )
        .into());
    }
    // `None` only under `quorum none`, with which a bound is the caller's
    // usage error (refused before anything is fetched).
    let as_of = policy.quorum_as_of(&cosigned);
    if let (Some(max_age), Some(t)) = (max_age, as_of) {
        if now.saturating_sub(t) > max_age {
            return Err(super::Refused::new(
                "checkpoint_stale",
                format!(
                    "the witness quorum last cosigned the checkpoint at {}, {} s ago, more than \
                     --max-cosignature-age {max_age}: it may be an old view of the log, hiding \
                     what was appended since",
                    shown(t),
                    now.saturating_sub(t)
                ),
            )
            .into());
        }
    }
    Ok(Judged {
        cosigned,
        as_of,
        ahead,
    })
}

/// A cosignature's timestamp as RFC 3339 UTC, or as the number when it is
/// beyond what a date can show.
fn unix_time_text(t: u64) -> String {
    i64::try_from(t)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .map_or_else(|| format!("{t} (Unix seconds)"), crate::codec::format_time)
}

/// `--max-entries` by default: 2^24 entries, a few GiB of memory to verify.
pub const DEFAULT_MAX_ENTRIES: u64 = 1 << 24;

/// Refuses a signed tree larger than `--max-entries`: a log holding its key
/// can sign any size up to 2^64 − 1, and the verifier would fetch and hold
/// entries until memory ran out.
fn within_max_entries(size: u64, max: u64) -> anyhow::Result<()> {
    if size > max {
        return Err(super::Refused::new(
            "log_too_large",
            format!("the signed checkpoint claims {size} entries, more than --max-entries {max}"),
        )
        .into());
    }
    Ok(())
}

impl Remote {
    /// A client for `url` (`https://host:port[/prefix]`).
    ///
    /// # Errors
    /// A missing `--ca`, `--cert` or `--client-key`, or what
    /// [`super::https::Client::new`] refuses.
    pub fn client(&self, url: &str) -> anyhow::Result<super::https::Client> {
        if !url.starts_with("https://") {
            return Err(super::Refused::new(
                "usage",
                format!(
                    "`{}` is not an https:// URL (lavd reads a log over HTTPS only)",
                    crate::codec::escape_for_terminal(url)
                ),
            )
            .into());
        }
        let Some(ca) = &self.ca else {
            return Err(super::Refused::new(
                "usage",
                "a URL needs --ca (and, for the API, --cert and --client-key)",
            )
            .into());
        };
        // The API wants the auditor's certificate; a public log listener
        // (`[audit.public]`) wants none.
        let client = match (&self.cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(super::Refused::new(
                    "usage",
                    "give both --cert and --client-key, or neither",
                )
                .into())
            }
        };
        let limits = super::https::Limits {
            max_response_bytes: self.max_response_bytes,
            timeout: std::time::Duration::from_secs(self.timeout),
        };
        super::https::Client::new(url, ca, client, limits)
    }
}

impl LogSource {
    /// Reads or fetches the log and verifies it: the export, what the
    /// verifier says it contains, and (with `--policy`) the names of the
    /// policy's witnesses whose cosignatures on the checkpoint verified.
    ///
    /// # Errors
    /// An unreadable file or a failed fetch, or the [`VerifyError`] that
    /// failed.
    pub fn verify(self) -> anyhow::Result<Verified> {
        let key = verifier_key(self.key)?;
        let client = |url: &str| self.remote.client(url);
        // A log read from the daemon whose checkpoint was its newest (the
        // daemon held no entry past it once the read was done) held nothing
        // else from before the read began (to within the time a request
        // takes to commit). A served checkpoint can be older than the log
        // (the newest one the witness quorum cosigned), and tiles may come
        // through a cache or a mirror: neither says when the log was
        // complete.
        let started = time::OffsetDateTime::now_utc();
        let now = u64::try_from(started.unix_timestamp()).unwrap_or(0);
        // The witness policy first, and on the checkpoint before any entry
        // is fetched: a checkpoint without its quorum (or a stale one) is
        // not one the verifier may rely on, whatever the leaves say.
        let policy = match &self.policy {
            Some(path) => Some(
                crate::audit::witness::Policy::parse(&read(path, MAX_POLICY_FILE_BYTES)?)
                    .with_context(|| format!("the policy {}", path.display()))?,
            ),
            None => None,
        };
        for (log, kind) in policy.iter().flat_map(|p| p.unverifiable_logs()) {
            tracing::warn!(
                log = %crate::codec::escape_for_terminal(log),
                key_type = %format!("{kind:#04x}"),
                "the policy names a log key whose type lavd does not verify (only Ed25519, 0x01): \
                 a checkpoint signed only by it is refused (unknown_log)"
            );
        }
        for (witness, kind) in policy.iter().flat_map(|p| p.unverifiable_witnesses()) {
            tracing::warn!(
                witness = %crate::codec::escape_for_terminal(witness),
                key_type = %format!("{kind:#04x}"),
                "the policy names a witness whose key type lavd does not verify (only Ed25519 \
                 cosignatures, 0x04): its cosignatures are not counted toward the quorum"
            );
        }
        let max_age = self.max_cosignature_age;
        // Said before anything is fetched.
        if max_age.is_some() && policy.as_ref().is_some_and(|p| p.quorum_is_none()) {
            return Err(super::Refused::new(
                "usage",
                "--max-cosignature-age needs a policy whose quorum names witnesses, not \
                 `quorum none`",
            )
            .into());
        }
        let judge = |checkpoint: &str| match &policy {
            Some(p) => judge_cosignatures(p, checkpoint, now, max_age).map(Some),
            None => Ok(None),
        };
        let vet = |checkpoint: &str| judge(checkpoint).map(drop);
        let (new, complete_when_read) = match (&self.export, &self.url, &self.tiles) {
            (Some(export), ..) => (read_export(export, self.remote.max_entries)?, false),
            (None, Some(url), _) => {
                // The API's paths are absolute: a path given with the URL
                // would be dropped, and another resource read than the one
                // named.
                let rest = url.strip_prefix("https://").unwrap_or_default();
                if let Some(path) = rest.find('/').map(|i| &rest[i..]) {
                    if !path.trim_end_matches('/').is_empty() {
                        return Err(super::Refused::new(
                            "usage",
                            format!(
                                "--url takes the daemon's https://host[:port] only, not the path \
                                 `{}` (for tiles served under a path: --tiles URL)",
                                crate::codec::escape_for_terminal(path)
                            ),
                        )
                        .into());
                    }
                }
                let daemon = client(url)?;
                let export = fetch_export(&daemon, &key, self.remote.max_entries, &vet)?;
                let size = crate::audit::note::verify_checkpoint(&export.checkpoint, &key)?.size;
                let newest = !holds_entries_from(&daemon, size)?;
                (export, newest)
            }
            (None, None, Some(tiles)) => {
                // A URL of another scheme is refused, not read as the
                // directory `http:/host/…`.
                let source = if tiles.contains("://") {
                    TilesAt::url(client(tiles)?, tiles)
                } else {
                    TilesAt::Dir(PathBuf::from(tiles))
                };
                (
                    fetch_tiles(&source, &key, self.remote.max_entries, &vet)?,
                    false,
                )
            }
            _ => anyhow::bail!("give --export FILE, --url URL or --tiles DIR|URL"),
        };
        let Judged {
            cosigned,
            as_of: quorum_as_of,
            ahead,
        } = judge(&new.checkpoint)?.unwrap_or_default();
        for (name, at) in &ahead {
            eprintln!(
                "warning: witness {name}'s cosignature is stamped {}, more than \
                 {COSIGNATURE_FUTURE_SKEW_SECS} s after this machine's clock: not counted (the \
                 others make the quorum)",
                unix_time_text(*at)
            );
        }
        // What ties this view to more than the file's own signature: a
        // copy cut back to an earlier checkpoint verifies the same
        // without them.
        let mut anchored_by = Vec::new();
        if complete_when_read {
            anchored_by.push("fetch");
        }
        if self.checkpoint.is_some() {
            anchored_by.push("checkpoint");
        }
        if self.previous.is_some() {
            anchored_by.push("previous");
        }
        if quorum_as_of.is_some() {
            anchored_by.push("witnesses");
        }
        let summary = match (self.checkpoint, self.previous) {
            (Some(path), _) => {
                let older =
                    String::from_utf8(read(&path, crate::audit::note::MAX_NOTE_BYTES as u64)?)
                        .map_err(|_| {
                            super::Refused::new(
                                "note_malformed",
                                format!("{}: the checkpoint file is not UTF-8", path.display()),
                            )
                        })?;
                verify_export(&new, &key, Some(&older))?
            }
            (None, Some(path)) => {
                let previous = read_export(&path, self.remote.max_entries)?;
                verify_export_against(&new, &key, &previous)?
            }
            (None, None) => verify_export(&new, &key, None)?,
        };
        // The log's line and the policy witnesses' that verified; any other
        // line was checked by nobody, so it is not shown as a signature.
        let checked = |name: &str, key_id: u32| {
            (name == key.name() && key_id == key.key_id())
                || cosigned.iter().any(|(w, _)| {
                    policy
                        .as_ref()
                        .and_then(|p| p.witness_key(w))
                        .is_some_and(|k| k.name() == name && k.key_id() == key_id)
                })
        };
        let checked_checkpoint = crate::audit::note::with_signatures_by(&new.checkpoint, checked)?;
        Ok(Verified {
            fetched_at: complete_when_read.then_some(started),
            anchored_by,
            export: new,
            summary,
            cosigned,
            quorum_as_of,
            checked_checkpoint,
        })
    }
}

/// What [`LogSource::verify`] verified.
#[derive(Debug)]
pub struct Verified {
    /// The log as read.
    pub export: Export,
    /// What it holds, every check passed.
    pub summary: crate::audit::export::Summary,
    /// The policy witnesses whose cosignatures verified (`--policy`), in
    /// policy order, each with the newest time it cosigned at (Unix
    /// seconds).
    pub cosigned: crate::audit::witness::Cosigned,
    /// The latest time the policy's quorum cosigned the checkpoint (Unix
    /// seconds); `None` without `--policy` or under `quorum none`.
    pub quorum_as_of: Option<u64>,
    /// The newest checkpoint with only the signature lines that verified:
    /// the log's and those witnesses'.
    pub checked_checkpoint: String,
    /// For a log read from the daemon (`--url`) whose served checkpoint was
    /// its newest: when the read began.
    pub fetched_at: Option<time::OffsetDateTime>,
    /// What ties this view to more than the log's own signature: `fetch`
    /// (read from the daemon, its newest checkpoint then: the one that
    /// shows the log held nothing more, as of the fetch), `checkpoint`
    /// (`--checkpoint`) and `previous` (`--previous`: it extends one the
    /// reader held, so it is not cut back below that), `witnesses`
    /// (`--policy`'s quorum cosigned it, at the times its lines say).
    /// Empty for a file verified against the log's key alone.
    pub anchored_by: Vec<&'static str>,
}

/// The most bytes `GET /v1/audit/checkpoint`'s reply can hold: a signed
/// note's bound, each byte as JSON's longest escape (`\u001f`, six), and
/// the object around it.
const CHECKPOINT_REPLY_BYTES: u64 = 6 * crate::audit::note::MAX_NOTE_BYTES as u64 + 64;

/// `GET /v1/audit/checkpoint`'s reply (PROTOCOL §6).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointReply {
    checkpoint: String,
}

/// `GET /v1/audit/entries`' reply (PROTOCOL §6).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesReply {
    /// Objects only, as in an export (an array in an entry's place is
    /// refused).
    #[serde(deserialize_with = "crate::codec::objects")]
    entries: Vec<crate::audit::export::ExportEntry>,
}

/// A page of `GET /v1/audit/entries` from `start` to `end`: its reply held
/// to what that many entries can take ([`ENTRY_JSON_BYTES`] each), and
/// refused when it holds more entries than asked for or a leaf longer than
/// any leaf can be, before it is kept. So a server that sends one huge
/// entry a page, each page within the reply bound, cannot make the
/// verifier hold more than a file of the same entries could.
fn entries_page(
    client: &super::https::Client,
    start: u64,
    end: u64,
) -> anyhow::Result<Vec<crate::audit::export::ExportEntry>> {
    let asked = end.saturating_sub(start);
    let page: EntriesReply = client.get_json_within(
        &format!("/v1/audit/entries?start={start}&end={end}"),
        asked.saturating_mul(ENTRY_JSON_BYTES).saturating_add(64),
    )?;
    if page.entries.len() as u64 > asked {
        return Err(super::Refused::new(
            "unexpected_reply",
            format!(
                "GET /v1/audit/entries?start={start}&end={end} answered {} entries, more than \
                 the {asked} asked for",
                page.entries.len()
            ),
        )
        .into());
    }
    if let Some(entry) = page.entries.iter().find(|e| e.leaf.len() > LEAF_B64_CHARS) {
        return Err(super::Refused::new(
            "leaf_too_large",
            format!(
                "entry {} from GET /v1/audit/entries is {} base64 characters, more than a leaf \
                 of {} bytes takes",
                entry.index,
                entry.leaf.len(),
                crate::audit::leaf::MAX_LEAF_BYTES
            ),
        )
        .into());
    }
    Ok(page.entries)
}

/// Whether the daemon holds an entry at index `size` or beyond: then the
/// checkpoint it served was not its newest.
fn holds_entries_from(client: &super::https::Client, size: u64) -> anyhow::Result<bool> {
    Ok(!entries_page(client, size, size.saturating_add(1))?.is_empty())
}

/// Fetches the whole log from a daemon's audit endpoints (PROTOCOL §6): the
/// current checkpoint, then every leaf up to its size in pages. Nothing
/// fetched is trusted; [`verify_export`] checks it all against `key`.
fn fetch_export(
    client: &super::https::Client,
    key: &VerifierKey,
    max_entries: u64,
    vet: &dyn Fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<Export> {
    let CheckpointReply { checkpoint } =
        client.get_json_within("/v1/audit/checkpoint", CHECKPOINT_REPLY_BYTES)?;
    let signed = crate::audit::note::verify_checkpoint(&checkpoint, key)
        .context("the daemon's checkpoint")?;
    within_max_entries(signed.size, max_entries)?;
    vet(&checkpoint)?;
    let mut entries = Vec::new();
    let mut start = 0u64;
    while start < signed.size {
        let end = signed
            .size
            .min(start + crate::api::handlers::MAX_ENTRIES_PAGE);
        let page = entries_page(client, start, end)?;
        if page.is_empty() {
            break; // the verifier reports the missing entries
        }
        start += page.len() as u64;
        entries.extend(page);
    }
    Ok(Export {
        origin: signed.origin,
        checkpoint,
        earlier_checkpoints: Vec::new(),
        entries,
    })
}

/// The verifier key given on the command line, or read from the file it
/// names. The key's text first: `origin+id+base64` is also a relative path
/// (origins hold `/`, and so can base64), and a file put at that path by
/// whoever handed over the log, holding their own key for the same origin,
/// must never stand in for the key the auditor typed.
pub(super) fn verifier_key(key: String) -> anyhow::Result<VerifierKey> {
    let literal = VerifierKey::parse(&key);
    if let Ok(parsed) = literal {
        return Ok(parsed);
    }
    // A key is one short line: a larger file is not one.
    match read_regular(std::path::Path::new(&key), 4096).map(String::from_utf8) {
        Ok(Ok(text)) => {
            VerifierKey::parse(text.trim()).with_context(|| format!("the verifier key in {key}"))
        }
        // Not a key, nor a file holding one: say both, so that a mistyped
        // path is not taken for a malformed key.
        Ok(Err(_)) => literal.context(format!(
            "the verifier key (nor is {key} a file holding one: it is not UTF-8)"
        )),
        Err(e) => literal.context(format!(
            "the verifier key (nor is {key} a file that can be read: {e:#})"
        )),
    }
}

/// `lavd audit mirror`: see [`AuditCommand::Mirror`].
fn mirror(
    key: &VerifierKey,
    url: &str,
    dir: &std::path::Path,
    remote: &Remote,
) -> anyhow::Result<()> {
    refuse_links_below(dir)?;
    // The mirror is as private as its directory: made `0o700` (its files
    // `0o600`) when it is new; one its owner opened to others to republish
    // it (`chmod -R u=rwX,go=rX`) gets files and directories they can read
    // on every later run. Read bits only: nobody but its owner may write a
    // tile, whatever the directory allows.
    create_dirs_for(dir, 0o600).with_context(|| format!("creating {}", dir.display()))?;
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .permissions()
            .mode()
            & 0o644
    };
    let held_file = dir.join("checkpoint");
    let held = match std::fs::symlink_metadata(&held_file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => {
            let bytes = read_regular(&held_file, max_resource_bytes("checkpoint"))
                .with_context(|| format!("reading {}", held_file.display()))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                super::Refused::new("note_malformed", "the mirrored checkpoint is not UTF-8")
            })?;
            Some(
                crate::audit::note::verify_checkpoint(&text, key)
                    .context("the mirrored checkpoint")?,
            )
        }
    };
    let upstream = TilesAt::url(remote.client(url)?, url);
    let checkpoint = String::from_utf8(upstream.get("checkpoint")?)
        .map_err(|_| super::Refused::new("note_malformed", "the log's checkpoint is not UTF-8"))?;
    let state = std::rc::Rc::new(MirrorRun {
        mode,
        ..MirrorRun::default()
    });
    let source = TilesAt::Mirror {
        dir: dir.to_path_buf(),
        remote: Box::new(upstream),
        run: state.clone(),
    };
    let incoming = dir.join(INCOMING);
    let export = match read_tiles(
        &source,
        key,
        checkpoint.clone(),
        held.as_ref(),
        remote.max_entries,
    ) {
        Ok(export) => export,
        Err(e) => {
            // Tiles that were fetched whole but refused are dropped, so
            // that the next run fetches them again instead of failing on
            // the same bytes; after a failed fetch (a cut connection, a
            // limit) they are kept for the next run to resume with.
            if !state.fetch_failed.get() {
                let _ = std::fs::remove_dir_all(&incoming);
            }
            return Err(e);
        }
    };
    // Every tile is verified: the new ones move into place, their
    // directories and every directory above them up to the mirror's are
    // synced (so that a crash cannot leave the new checkpoint on disk
    // without the tiles it covers, nor the directories that hold them),
    // then the checkpoint.
    let mut moved_into = std::collections::BTreeSet::new();
    for path in state.staged.borrow().iter() {
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            create_dirs_for(parent, mode)
                .with_context(|| format!("creating {}", parent.display()))?;
            for above in parent.ancestors() {
                moved_into.insert(above.to_path_buf());
                if above == dir {
                    break;
                }
            }
        }
        std::fs::rename(incoming.join(path), &file)
            .with_context(|| format!("moving {} into place", file.display()))?;
    }
    for parent in &moved_into {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", parent.display()))?;
    }
    let _ = std::fs::remove_dir_all(&incoming);
    write_atomically_with_mode(&dir.join("checkpoint"), checkpoint.as_bytes(), mode)
        .with_context(|| format!("writing {}", dir.join("checkpoint").display()))?;
    outln!(
        "mirrored {} entries of {} into {}: {} tiles fetched, the rest already held",
        export.entries.len(),
        export.origin,
        dir.display(),
        state.fetched.get()
    );
    Ok(())
}

/// Where a mirror run keeps the tiles it fetched until the tree they make
/// is verified: a tile in the mirror itself is always a verified one.
const INCOMING: &str = ".incoming";

/// What one mirror run fetched.
#[derive(Debug, Default)]
struct MirrorRun {
    /// Tiles fetched from the log, this run or an earlier one cut short.
    fetched: std::cell::Cell<u64>,
    /// Their paths under [`INCOMING`], to move into place once verified.
    staged: std::cell::RefCell<std::collections::BTreeSet<String>>,
    /// Whether a fetch failed (rather than a fetched tile being refused).
    fetch_failed: std::cell::Cell<bool>,
    /// The mode of the files it writes (the mirror directory's read and
    /// write bits).
    mode: u32,
}

/// Where C2SP tiles are read from: a directory in the served layout, or an
/// HTTPS prefix.
#[derive(Debug)]
enum TilesAt {
    Dir(PathBuf),
    Url {
        client: Box<super::https::Client>,
        prefix: String,
    },
    /// A local mirror of a remote: tiles already there are read from the
    /// directory (a served tile never changes), the others fetched and
    /// staged until verified.
    Mirror {
        dir: PathBuf,
        remote: Box<TilesAt>,
        run: std::rc::Rc<MirrorRun>,
    },
}

impl TilesAt {
    /// The tiles served under `url`'s path (`https://host:port/v1/log`).
    fn url(client: super::https::Client, url: &str) -> Self {
        let rest = url.strip_prefix("https://").unwrap_or(url);
        let prefix = rest.find('/').map_or("", |i| &rest[i..]);
        TilesAt::Url {
            client: Box::new(client),
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The resource at `path` below the prefix (`checkpoint`, `tile/…`).
    /// Whatever kept the source from giving it is
    /// [`crate::audit::tiles::TileError::Fetch`] (`tile_unavailable`), with
    /// the failure's own code, if it has one, first in its text: the same
    /// for the checkpoint, the entry bundles and the hash tiles.
    ///
    /// A partial tile the source does not have (no such file, a 404, or a
    /// 403: an S3 bucket read without `ListBucket` says 403 for a key that
    /// is not there) is read from the full tile
    /// at its place, when the source has that: its first hashes or entries
    /// are the partial tile's (C2SP tlog-tiles lets a log delete a partial
    /// tile once the full one is there, and clients fetch the full one
    /// instead). What it gives is verified as the partial tile would be.
    /// Not for a mirror, whose remote does it: a full tile beyond the
    /// signed tree must not be staged as verified.
    fn get(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut got = self.get_from_source(path);
        let missing = got.as_ref().err().is_some_and(is_missing);
        if missing && !matches!(self, TilesAt::Mirror { .. }) {
            if let Some((full, width, entries)) = full_tile_of(path) {
                let prefix = self
                    .get_from_source(&full)
                    .ok()
                    .and_then(|bytes| partial_of_full(&bytes, width, entries));
                if let Some(prefix) = prefix {
                    got = Ok(prefix);
                }
            }
        }
        got.map_err(|e| {
            let why = match crate::cli::error_code(&e) {
                Some(code) => format!("{code}: {e:#}"),
                None => format!("{e:#}"),
            };
            anyhow::Error::new(crate::audit::tiles::TileError::Fetch {
                path: path.to_string(),
                why,
            })
        })
    }

    fn get_from_source(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        match self {
            TilesAt::Dir(dir) => read_regular(&dir.join(path), max_resource_bytes(path))
                .with_context(|| format!("reading {}", dir.join(path).display())),
            // Held to the resource's own bound as it arrives, as a file is.
            TilesAt::Url { client, prefix } => client
                .get_bytes_within(&format!("{prefix}/{path}"), max_resource_bytes(path))
                .map(|b| b.to_vec()),
            TilesAt::Mirror { dir, remote, run } => {
                let limit = max_resource_bytes(path);
                if let Ok(bytes) = read_regular(&dir.join(path), limit) {
                    return Ok(bytes);
                }
                let staged = dir.join(INCOMING).join(path);
                let bytes = match read_regular(&staged, limit) {
                    Ok(bytes) => bytes,
                    Err(_) => {
                        let bytes = remote
                            .get(path)
                            .inspect_err(|_| run.fetch_failed.set(true))?;
                        write_atomically_with_mode(&staged, &bytes, run.mode)
                            .with_context(|| format!("writing {}", staged.display()))?;
                        run.fetched.set(run.fetched.get() + 1);
                        bytes
                    }
                };
                run.staged.borrow_mut().insert(path.to_string());
                Ok(bytes)
            }
        }
    }
}

/// Whether `e` may say the resource is not there: no such file, a 404, or
/// a 403 (what an S3 bucket read without `ListBucket` answers for a key it
/// does not hold). Only a fallback that is verified as the resource would
/// be is tried on it.
fn is_missing(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
            || matches!(
                cause.downcast_ref::<super::https::HttpsError>(),
                Some(super::https::HttpsError::Status {
                    status: 403 | 404,
                    ..
                })
            )
    })
}

/// For a partial tile's path (`tile/0/005.p/44`, `tile/entries/005.p/44`):
/// the full tile's path, the partial width, and whether it is an entry
/// bundle.
fn full_tile_of(path: &str) -> Option<(String, usize, bool)> {
    let (full, width) = path.split_once(".p/")?;
    let width: usize = width.parse().ok()?;
    let entries = full.starts_with("tile/entries/");
    (full.starts_with("tile/") && (1..256).contains(&width))
        .then(|| (full.to_string(), width, entries))
}

/// The first `width` hashes (or, for an entry bundle, `width` entries with
/// their length prefixes) of a full tile; `None` when `bytes` is not a
/// full hash tile's length, or holds fewer than `width` entries (what it
/// holds past them is not looked at: only the prefix is used, and
/// verified).
fn partial_of_full(bytes: &[u8], width: usize, entries: bool) -> Option<Vec<u8>> {
    use crate::audit::tiles::TILE_WIDTH;
    if !entries {
        let whole = usize::try_from(TILE_WIDTH).ok()? * 32;
        return (bytes.len() == whole).then(|| bytes[..width * 32].to_vec());
    }
    let mut end = 0usize;
    for _ in 0..width {
        let [hi, lo] = *bytes.get(end..end + 2)? else {
            return None;
        };
        end += 2 + usize::from(u16::from_be_bytes([hi, lo]));
        if end > bytes.len() {
            return None;
        }
    }
    Some(bytes[..end].to_vec())
}

/// The most bytes the resource at `path` can hold: a signed note, a hash
/// tile (32 bytes a hash) or an entry bundle (a length prefix and at most
/// [`crate::audit::tiles::MAX_ENTRY_BYTES`] an entry), of its width (256
/// unless the path says `.p/W`).
fn max_resource_bytes(path: &str) -> u64 {
    use crate::audit::tiles::{Tile, MAX_ENTRY_BYTES, TILE_WIDTH};
    if path == "checkpoint" {
        return crate::audit::note::MAX_NOTE_BYTES as u64;
    }
    let tile = path.strip_prefix("tile/").and_then(|p| Tile::parse(p).ok());
    let width = tile.as_ref().map_or(TILE_WIDTH, |t| u64::from(t.width));
    if tile.as_ref().is_some_and(|t| t.level.is_none()) || path.starts_with("tile/entries/") {
        width * (2 + MAX_ENTRY_BYTES as u64)
    } else {
        width * 32
    }
}

/// Refuses a mirror directory holding a symbolic link anywhere below it: a
/// mirror holds only the files and directories it made, and writing
/// through a link (a seed mirror handed over with `tile -> /elsewhere` or
/// `checkpoint.partial-download -> ~/.bashrc`) would put fetched bytes
/// outside the mirror, before they are verified.
fn refuse_links_below(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        let entries = match std::fs::read_dir(&at) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", at.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", at.display()))?;
            let kind = entry
                .file_type()
                .with_context(|| format!("reading {}", entry.path().display()))?;
            if kind.is_symlink() {
                anyhow::bail!(
                    "{} is a symbolic link: a mirror directory holds only the files it wrote",
                    entry.path().display()
                );
            }
            if kind.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to `file` through a temporary file, synced, and a rename,
/// so that an interrupted mirror never leaves half a tile, and an
/// interrupted report or export never half a file, even across a crash. The temporary file is created new:
/// a link left at its name is removed (not followed), and anything put
/// there meanwhile makes the write fail. A link at `file` itself is
/// replaced, not written through.
///
/// The file is created `0o600`, and a directory it needs `0o700` (less the
/// umask): exports and detail reports hold the log's leaves (callers,
/// warrant ids, reasons, times), which are not for publication
/// (THREAT_MODEL §4.10). [`write_atomically_with_mode`] for a file meant for
/// others (an aggregate report; a mirror, as its directory).
pub(super) fn write_atomically(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_with_mode(file, bytes, 0o600)
}

/// `std::fs::create_dir_all` for files of mode `file_mode`: each directory
/// it makes may be searched by whoever may read them (`0o600` files,
/// `0o700` directories; `0o644`, `0o755`), less the umask. The one rule
/// for the directories of what these commands write.
fn create_dirs_for(dir: &std::path::Path, file_mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    let file_mode = file_mode & 0o666;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(file_mode | ((file_mode & 0o444) >> 2))
        .create(dir)
}

/// [`write_atomically`], the file created with `mode` (less the umask):
/// `0o600` for one that only its owner may read.
///
/// # Errors
/// As [`write_atomically`].
pub(super) fn write_atomically_with_mode(
    file: &std::path::Path,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = file.parent() {
        create_dirs_for(dir, mode)?;
    }
    let tmp = file.with_extension("partial-download");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    // On disk before it takes the name, and the name on disk before this
    // returns: a crash leaves the old file or the whole new one, never an
    // empty or short file under the final name. A failure takes the
    // partial file away.
    let placed = written
        .write_all(bytes)
        .and_then(|()| written.sync_all())
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = file.parent() {
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl crate::audit::tiles::TileSource for &TilesAt {
    fn fetch(&self, tile: &crate::audit::tiles::Tile) -> Result<Vec<u8>, String> {
        // Keep the stable code of a bounded request in the text.
        self.get(&tile.path())
            .map_err(|e| match e.downcast_ref::<super::https::HttpsError>() {
                Some(h) => format!("{}: {e:#}", h.code()),
                None => format!("{e:#}"),
            })
    }
}

/// Reads the whole log as C2SP tlog-tiles: the checkpoint (its signature
/// checked), every entry bundle up to its size, and the hash tiles, whose
/// root must be the checkpoint's. The leaves then go through the same
/// verifier as an export (which recomputes the root from them), so tiles,
/// leaves and checkpoint are all held to one signed root.
fn fetch_tiles(
    source: &TilesAt,
    key: &VerifierKey,
    max_entries: u64,
    vet: &dyn Fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<Export> {
    let checkpoint = String::from_utf8(source.get("checkpoint")?)
        .map_err(|_| super::Refused::new("note_malformed", "the checkpoint is not UTF-8"))?;
    crate::audit::note::verify_checkpoint(&checkpoint, key).context("the tiles' checkpoint")?;
    vet(&checkpoint)?;
    read_tiles(source, key, checkpoint, None, max_entries)
}

/// [`fetch_tiles`] under a given `checkpoint`; with `older` (a checkpoint
/// verified before), the tiles must also prove the tree extends it.
fn read_tiles(
    source: &TilesAt,
    key: &VerifierKey,
    checkpoint: String,
    older: Option<&crate::audit::note::Checkpoint>,
    max_entries: u64,
) -> anyhow::Result<Export> {
    use crate::audit::tiles::{decode_bundle, Tile, TileReader, TILE_WIDTH};
    let signed =
        crate::audit::note::verify_checkpoint(&checkpoint, key).context("the tiles' checkpoint")?;
    within_max_entries(signed.size, max_entries)?;
    if let Some(older) = older {
        if older.size > signed.size {
            return Err(super::Refused::new(
                "consistency_sizes_reversed",
                format!(
                    "the log's checkpoint has size {}, smaller than the {} already held",
                    signed.size, older.size
                ),
            )
            .into());
        }
    }
    // A refused tile is reported by its stable code (`error_code`), then
    // what was wrong.
    let refused = anyhow::Error::from;
    let reader = TileReader::new(source, signed.size);
    let mismatch = |tile: &Tile, i: usize| {
        anyhow::Error::from(super::Refused::new(
            "root_mismatch",
            format!(
                "hash {i} of tile {} is not what the tree of size {} holds there",
                tile.path(),
                signed.size
            ),
        ))
    };
    // The hash tiles first (32 bytes a leaf): every tile above level 0 held
    // to the tiles below it, and the whole to the signed root. Only then
    // the entry bundles, each held to its level-0 hashes (verified by now)
    // as it comes: a source that does not hold the log key cannot make
    // this hold its made-up leaves in memory (or a mirror's disk) before
    // anything signed was checked.
    for level in 1u8..64 {
        let Some(span) = 1u64.checked_shl(u32::from(level) * 8) else {
            break;
        };
        let nodes = signed.size / span;
        if nodes == 0 {
            break;
        }
        for node in (0..nodes).step_by(TILE_WIDTH as usize) {
            let tile = Tile::covering(level, node, signed.size)
                .ok_or_else(|| anyhow::anyhow!("no tile holds hash ({level}, {node})"))?;
            let hashes = reader.tile(&tile).map_err(refused)?;
            for (i, hash) in hashes.iter().enumerate() {
                let at = node + i as u64;
                let below = reader
                    .tile(&Tile::hashes(level - 1, at, TILE_WIDTH as u16))
                    .map_err(refused)?;
                if *hash != fold(below) {
                    return Err(mismatch(&tile, i));
                }
            }
        }
    }
    let root = crate::audit::merkle::root(&reader, signed.size).context("the hash tiles")?;
    if root != signed.root {
        return Err(super::Refused::new(
            "root_mismatch",
            format!(
                "the hash tiles of size {} do not hash to the checkpoint's root",
                signed.size
            ),
        )
        .into());
    }
    // The older tree's root, from the same (verified) tiles: equal means
    // the new tree extends it.
    if let Some(older) = older {
        let old_root = crate::audit::merkle::root(&reader, older.size).context("the hash tiles")?;
        if old_root != older.root {
            return Err(super::Refused::new(
                "old_root_mismatch",
                format!(
                    "the log of size {} does not extend the checkpoint of size {} already held",
                    signed.size, older.size
                ),
            )
            .into());
        }
    }
    let mut entries = Vec::new();
    let mut index = 0u64;
    while index < signed.size {
        let n = index / TILE_WIDTH;
        let width = (signed.size - index).min(TILE_WIDTH) as u16;
        let tile = Tile::entries(n, width);
        let bytes = source.get(&tile.path())?;
        let bundle = decode_bundle(&tile, &bytes).map_err(refused)?;
        let level0 = Tile::covering(0, index, signed.size)
            .ok_or_else(|| anyhow::anyhow!("no tile holds hash (0, {index})"))?;
        let hashes = reader.tile(&level0).map_err(refused)?;
        for (i, leaf) in bundle.into_iter().enumerate() {
            if hashes.get(i) != Some(&crate::audit::merkle::leaf_hash(&leaf)) {
                return Err(mismatch(&level0, i));
            }
            entries.push(crate::audit::export::ExportEntry::new(index, &leaf));
            index += 1;
        }
    }
    Ok(Export {
        origin: signed.origin,
        checkpoint,
        earlier_checkpoints: Vec::new(),
        entries,
    })
}

/// The root of a full tile's 256 hashes: the hash one level of tiles up.
fn fold(mut row: Vec<crate::audit::merkle::Hash>) -> crate::audit::merkle::Hash {
    while row.len() > 1 {
        row = row
            .chunks_exact(2)
            .map(|p| crate::audit::merkle::node_hash(&p[0], &p[1]))
            .collect();
    }
    row.first()
        .copied()
        .unwrap_or_else(crate::audit::merkle::empty_root)
}

/// The log of the daemon's store, which must exist
/// ([`super::open_existing_store`]): an export's checkpoint, signed with the
/// token's key, would make a new store pass for the token's (a second log
/// under the same origin and key, a fork; and `lavd keys discard-orphan`
/// would trust it).
fn open_log(config: &ConfigArg) -> anyhow::Result<AuditLog> {
    let settings = config.load()?;
    let store = Arc::new(super::open_existing_store(&settings.store)?);
    let hsm = super::open_hsm_minding(settings.refused_pin_record.as_ref(), || {
        Hsm::open(settings.hsm)
    })?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An entries page's entries are objects, as an export's are: an
    /// array in an entry's place is refused (one rule for one field).
    #[test]
    fn an_entries_page_takes_objects_only() {
        let page: EntriesReply =
            crate::codec::from_json(br#"{"entries":[{"index":0,"leaf":"e30"}]}"#).unwrap();
        assert_eq!(page.entries.len(), 1);
        assert!(crate::codec::from_json::<EntriesReply>(br#"{"entries":[[0,"e30"]]}"#).is_err());
    }

    /// An input file is a regular file of bounded size: a link to
    /// `/dev/zero` (or a FIFO) in a handed-over bundle is refused, not read
    /// until memory runs out; an export of more entries than
    /// `--max-entries` is `log_too_large`.
    #[test]
    fn input_files_are_regular_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let zero = dir.path().join("export.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = read(&zero, 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 100]).unwrap();
        let e = read(&big, 99).unwrap_err();
        assert!(
            format!("{e:#}").contains("larger than the 99 bytes"),
            "{e:#}"
        );
        let export = dir.path().join("two.json");
        let two = Export {
            origin: "o".into(),
            checkpoint: "c".into(),
            earlier_checkpoints: Vec::new(),
            entries: (0..2)
                .map(|index| crate::audit::export::ExportEntry::new(index, b"{}"))
                .collect(),
        };
        std::fs::write(&export, serde_json::to_vec(&two).unwrap()).unwrap();
        read_export(&export, 2).unwrap();
        let e = read_export(&export, 1).unwrap_err();
        assert_eq!(crate::cli::error_code(&e), Some("log_too_large"), "{e:#}");
        // An entry as an array, not an object: refused.
        let array = serde_json::to_string(&two)
            .unwrap()
            .replace(r#"{"index":0,"leaf":"e30"}"#, r#"[0,"e30"]"#);
        assert!(array.contains(r#"[0,"e30"]"#), "{array}");
        std::fs::write(&export, array).unwrap();
        let e = read_export(&export, 2).unwrap_err();
        assert!(format!("{e:#}").contains("expected a JSON object"), "{e:#}");
    }

    /// A key's text is also a path: a file at that path, holding another
    /// key for the same origin (someone handing over a log bundle with it
    /// inside, the auditor running the verifier from there), is not read.
    #[test]
    fn a_file_at_the_keys_own_text_does_not_replace_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let origin = format!("{}/audit", dir.path().display());
        let real = VerifierKey::new(&origin, &[7; 32]).unwrap();
        let forged = VerifierKey::new(&origin, &[9; 32]).unwrap();
        let path = PathBuf::from(real.to_string());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, forged.to_string()).unwrap();
        assert_eq!(
            verifier_key(real.to_string()).unwrap().to_string(),
            real.to_string()
        );
        // A file is still read when the argument is not a key.
        let file = dir.path().join("audit.vkey");
        std::fs::write(&file, format!("{real}\n")).unwrap();
        assert_eq!(
            verifier_key(file.display().to_string())
                .unwrap()
                .to_string(),
            real.to_string()
        );
        // Neither: the message says both, with the file's own error.
        let err = verifier_key("no-such-file".into()).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("the verifier key"), "{message}");
        assert!(
            message.contains("nor is no-such-file a file that can be read"),
            "{message}"
        );
        assert!(message.contains("No such file"), "{message}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("test signer")]
    struct TestSigner;

    /// A tiles directory holding a checkpoint of `size` leaves and `root`,
    /// signed by a fresh software key; returns the directory and the key.
    fn signed_tiles(size: u64, root: [u8; 32]) -> (tempfile::TempDir, VerifierKey) {
        use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
        let pair = Ed25519KeyPair::generate().unwrap();
        let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let origin = "lavd.test/audit";
        let note = crate::audit::note::sign_checkpoint(
            &crate::audit::note::Checkpoint {
                origin: origin.into(),
                size,
                root,
            },
            &public,
            |m| pair.sign(m).as_ref().try_into().map_err(|_| TestSigner),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkpoint"), note).unwrap();
        (dir, VerifierKey::new(origin, &public).unwrap())
    }

    /// [`fetch_tiles`] of the tiles directory `dir`, with no policy.
    fn fetch_dir(dir: &tempfile::TempDir, key: &VerifierKey) -> anyhow::Result<Export> {
        fetch_tiles(
            &TilesAt::Dir(dir.path().into()),
            key,
            DEFAULT_MAX_ENTRIES,
            &|_| Ok(()),
        )
    }

    /// Writes `bytes` at `path` below the tiles directory `dir`.
    fn write_tile(dir: &tempfile::TempDir, path: &str, bytes: &[u8]) {
        let file = dir.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    }

    /// A full entry bundle of the 256 leaves `0u16..256` (big-endian) and
    /// their level-0 hashes.
    fn full_bundle() -> (Vec<u8>, Vec<crate::audit::merkle::Hash>) {
        let mut bundle = Vec::new();
        let mut level0 = Vec::new();
        for i in 0..256u16 {
            bundle.extend_from_slice(&2u16.to_be_bytes());
            bundle.extend_from_slice(&i.to_be_bytes());
            level0.push(crate::audit::merkle::leaf_hash(&i.to_be_bytes()));
        }
        (bundle, level0)
    }

    /// A log holding its key can sign any size: one above `--max-entries`
    /// is refused before a tile is read.
    #[test]
    fn a_signed_size_above_the_bound_is_refused_before_fetching() {
        let (dir, key) = signed_tiles(1 << 40, [0; 32]);
        let err = fetch_dir(&dir, &key).unwrap_err();
        assert_eq!(
            crate::cli::error_code(&err),
            Some("log_too_large"),
            "{err:#}"
        );
    }

    /// The witness policy judges the checkpoint before any tile is read: a
    /// source whose checkpoint lacks its quorum is refused for that, not
    /// made to serve (and the verifier to hold) the log first.
    #[test]
    fn the_policy_is_judged_before_any_tile_is_read() {
        let (dir, key) = signed_tiles(512, [0; 32]);
        let witness = crate::audit::witness::CosignerKey::new("w.example", &[7; 32]).unwrap();
        let policy = crate::audit::witness::Policy::parse(
            format!("log {key}\nwitness W {witness}\nquorum W\n").as_bytes(),
        )
        .unwrap();
        let vet = |c: &str| judge_cosignatures(&policy, c, 2_000_000_000, None).map(drop);
        let err = fetch_tiles(
            &TilesAt::Dir(dir.path().into()),
            &key,
            DEFAULT_MAX_ENTRIES,
            &vet,
        )
        .unwrap_err();
        assert_eq!(
            crate::cli::error_code(&err),
            Some("quorum_not_met"),
            "{err:#}"
        );
    }

    /// A source that kept only full tiles (a static host that deleted the
    /// partial ones, as C2SP tlog-tiles allows): the partial tiles of a
    /// smaller tree are read from the full ones' first hashes and entries,
    /// and verified as the partial tiles would be. Before, the missing
    /// partial tile was `tile_unavailable`.
    #[test]
    fn a_partial_tile_is_read_from_the_full_tile_when_it_is_gone() {
        use crate::audit::merkle::MemoryTree;
        let (bundle, level0) = full_bundle();
        let mut tree = MemoryTree::new();
        for hash in &level0 {
            tree.push_leaf_hash(*hash);
        }
        let (dir, key) = signed_tiles(5, tree.root(5).unwrap());
        write_tile(&dir, "tile/entries/000", &bundle);
        write_tile(&dir, "tile/0/000", &level0.concat());
        let export = fetch_dir(&dir, &key).unwrap();
        let want: Vec<_> = (0..5u16)
            .map(|i| crate::audit::export::ExportEntry::new(u64::from(i), &i.to_be_bytes()).leaf)
            .collect();
        let got: Vec<_> = export.entries.iter().map(|e| e.leaf.clone()).collect();
        assert_eq!(got, want);
        // A full tile that is not one (too short) is no stand-in.
        write_tile(&dir, "tile/0/000", &level0.concat()[..32 * 200]);
        let err = fetch_dir(&dir, &key).unwrap_err();
        assert_eq!(
            crate::cli::error_code(&err),
            Some("tile_unavailable"),
            "{err:#}"
        );
    }

    /// A 403 is taken as a 404 for the fallback to the full tile (an S3
    /// bucket read without `ListBucket` answers 403 for a key it does not
    /// hold); other statuses are not.
    #[test]
    fn a_403_or_404_may_mean_a_tile_is_not_there() {
        let status = |status| {
            anyhow::Error::new(super::super::https::HttpsError::Status {
                path: "/tile/0/000.p/5".into(),
                status,
                code: "?".into(),
                message: String::new(),
            })
        };
        assert!(is_missing(&status(404)));
        assert!(is_missing(&status(403)));
        assert!(!is_missing(&status(500)));
        assert!(!is_missing(&status(401)));
    }

    /// The hash tiles are held to the signed root before any entry bundle
    /// is read: a source without the log key that makes up bundles and
    /// level-0 tiles to match them (and the level-1 tile above) is refused
    /// at the root, before a bundle is held in memory. Before, the first
    /// bundle passed its made-up tile and the second was fetched (here
    /// there is none: the error was its read).
    #[test]
    fn made_up_bundles_are_refused_before_any_is_read() {
        let (dir, key) = signed_tiles(512, [0; 32]);
        let (bundle, level0) = full_bundle();
        write_tile(&dir, "tile/entries/000", &bundle);
        write_tile(&dir, "tile/0/000", &level0.concat());
        write_tile(&dir, "tile/0/001", &[0; 256 * 32]);
        let level1 = [fold(level0), fold(vec![[0; 32]; 256])];
        write_tile(&dir, "tile/1/000.p/2", &level1.concat());
        let err = fetch_dir(&dir, &key).unwrap_err();
        assert_eq!(
            crate::cli::error_code(&err),
            Some("root_mismatch"),
            "{err:#}"
        );
        assert!(
            format!("{err:#}").starts_with("the hash tiles of size 512"),
            "{err:#}"
        );
    }

    /// A link left at the temporary file's name is replaced, not written
    /// through.
    #[test]
    fn an_atomic_write_does_not_follow_a_link_at_its_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let file = dir.path().join("m/checkpoint");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("m/checkpoint.partial-download"))
            .unwrap();
        write_atomically(&file, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
    }

    /// Reads from an untrusted directory are of regular files, within the
    /// resource's bound.
    #[test]
    fn reads_are_of_bounded_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let zero = dir.path().join("checkpoint");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let err = read_regular(&zero, 1024).unwrap_err();
        assert!(format!("{err}").contains("not a regular file"), "{err}");
        let big = dir.path().join("tile");
        std::fs::write(&big, vec![0u8; 8193]).unwrap();
        let err = read_regular(&big, max_resource_bytes("tile/0/000")).unwrap_err();
        assert!(
            format!("{err}").contains("larger than the 8192 bytes"),
            "{err}"
        );
        std::fs::write(&big, vec![0u8; 8192]).unwrap();
        assert_eq!(read_regular(&big, 8192).unwrap().len(), 8192);
        // A partial tile's bound is its width's.
        assert_eq!(max_resource_bytes("tile/0/000.p/3"), 96);
        assert_eq!(
            max_resource_bytes("tile/entries/000.p/1"),
            2 + crate::audit::tiles::MAX_ENTRY_BYTES as u64
        );
        assert_eq!(
            max_resource_bytes("tile/entries/x001/000"),
            256 * (2 + crate::audit::tiles::MAX_ENTRY_BYTES as u64)
        );
        std::fs::write(&big, vec![0u8; 97]).unwrap();
        let err = read_regular(&big, max_resource_bytes("tile/0/000.p/3")).unwrap_err();
        assert!(
            format!("{err}").contains("larger than the 96 bytes"),
            "{err}"
        );
    }
}
