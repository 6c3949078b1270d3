//! The config file of `lavd witness serve`: its own small TOML file, parsed
//! and validated like lavd's (unknown keys refused, relative paths against
//! the file, exit 64 naming file, field and reason), reusing lavd's
//! `[hsm]`, `[server]`, `[admin]`, `[limits]` and `[log]` tables and their
//! checks.
//!
//! ```toml
//! name = "witness.example.org/w1"   # the cosigner key name
//! state = "witness.db"              # SQLite: what it last cosigned, per log
//! key_label = "lav-witness"         # its Ed25519 key on the [hsm] token
//! [server]  listen, shutdown_grace_secs
//! [tls]     cert, key, min_version  (server-only TLS: no client certificates)
//! [admin]   listen                  (/healthz, /readyz, /metrics)
//! [limits]  max_body_bytes (133,940 bytes unless set), max_body_bytes_in_flight,
//!           max_header_bytes, max_connections(_per_ip), the rate
//!           limit and the timeouts (the unwrap and warrant limits are
//!           refused: a witness serves neither)
//! [hsm]     as lavd's
//! [[logs]]  origin, vkey            (each log it witnesses)
//! ```
//!
//! `dev = true` with `key_file` (a hex Ed25519 seed) replaces `[hsm]`;
//! without `dev = true` a key file is refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::raw::{RawAdmin, RawHsm, RawLimits, RawLog, RawServer};
use super::{
    AdminSettings, ConfigError, Env, Limits, LogSettings, ServerSettings, TlsVersion, Validator,
};

/// `limits.max_connections_per_ip` of `lavd witness serve` unset: as the
/// public log listener's (`[audit.public]`), whose callers are anyone too.
const WITNESS_CONNECTIONS_PER_IP: usize = 32;

/// `lavd witness serve`'s `[limits] max_body_bytes` when unset (lavd's is
/// 1 MiB): the largest `add-checkpoint` body it parses
/// ([`crate::audit::witness::MAX_ADD_CHECKPOINT_BYTES`], 133,940 bytes: a
/// note with the 16 signatures, post-quantum ones included, that C2SP
/// signed-note asks verifiers to take, and 63 proof lines). One bound for
/// the field: a smaller one, set, refuses conformant checkpoints with 413
/// and is a warning at load.
pub const WITNESS_MAX_BODY_BYTES: usize = crate::audit::witness::MAX_ADD_CHECKPOINT_BYTES;
use crate::audit::note::VerifierKey;
use crate::hsm::HsmSettings;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitnessConfig {
    name: String,
    state: PathBuf,
    #[serde(default)]
    dev: bool,
    key_file: Option<PathBuf>,
    key_label: Option<String>,
    hsm: Option<RawHsm>,
    #[serde(default)]
    server: RawServer,
    tls: Option<RawPublicTls>,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    logs: Vec<RawWitnessedLog>,
}

/// `[tls]` of a listener without client certificates.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublicTls {
    cert: PathBuf,
    key: PathBuf,
    min_version: Option<String>,
}

/// `[[logs]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitnessedLog {
    origin: String,
    vkey: String,
}

/// The server certificate of a listener that asks for no client
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicTlsSettings {
    /// PEM chain, leaf first (`tls.cert`).
    pub cert: PathBuf,
    /// PEM private key (`tls.key`).
    pub key: PathBuf,
    /// `tls.min_version`, `"1.3"` (default) or `"1.2"`.
    pub min_version: TlsVersion,
}

/// Where the witness's signing key is.
#[derive(Debug)]
pub enum WitnessKeySource {
    /// An Ed25519 key pair labelled `label` on the `[hsm]` token.
    Hsm {
        /// The token.
        hsm: HsmSettings,
        /// `key_label`.
        label: String,
        /// `[hsm] refused_pin_record`, minded by every witness command that
        /// logs in, as by lavd's (boxed: the variants' sizes stay close).
        refused_pin_record: Option<Box<crate::hsm::refused_pin::RefusedPinRecord>>,
    },
    /// A hex Ed25519 seed in a file (`dev = true` only).
    DevFile(PathBuf),
}

/// One log the witness cosigns: its origin and a key it trusts for it.
#[derive(Debug, Clone)]
pub struct WitnessedLog {
    /// The checkpoint origin line.
    pub origin: String,
    /// The log's signed-note verifier key.
    pub key: VerifierKey,
}

/// Validated `lavd witness serve` settings.
#[derive(Debug)]
pub struct WitnessSettings {
    /// The file these came from.
    pub file: PathBuf,
    /// The cosigner key name.
    pub name: String,
    /// The SQLite state file.
    pub state: PathBuf,
    /// The signing key.
    pub key: WitnessKeySource,
    /// `[server]`: the witness listener.
    pub server: ServerSettings,
    /// `[tls]`.
    pub tls: Option<PublicTlsSettings>,
    /// `[admin]`.
    pub admin: AdminSettings,
    /// `[limits]`.
    pub limits: Limits,
    /// `[log]`.
    pub log: LogSettings,
    /// `[[logs]]`.
    pub logs: Vec<WitnessedLog>,
    /// Allowed but unwise things, to log once logging is set up.
    pub warnings: Vec<String>,
}

impl WitnessSettings {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, field and reason.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let raw: RawWitnessConfig = super::read_toml(path)?;
        let v = Validator {
            file: path,
            base: path.parent().unwrap_or(Path::new(".")),
            warnings: std::cell::RefCell::new(Vec::new()),
        };
        crate::audit::note::check_name(&raw.name).map_err(|e| v.err("name", e.to_string()))?;
        // As `lavd serve`'s: the config, the module that runs inside the
        // witness, and its PIN file.
        v.warn_if_replaceable("the configuration file", path, super::CONTROLS);
        if let Some(hsm) = &raw.hsm {
            v.warn_if_replaceable(
                "the PKCS#11 module (hsm.module)",
                &v.path(&hsm.module),
                super::CONTROLS,
            );
            if let Some(pin) = &hsm.pin_file {
                v.warn_if_replaceable("hsm.pin_file", &v.path(pin), super::PIN_HARM);
            }
        }
        let key = match (raw.dev, raw.key_file, raw.hsm) {
            (_, Some(_), Some(_)) => {
                return Err(v.err("key_file", "set key_file (dev only) or [hsm], not both"))
            }
            (false, Some(_), None) => {
                return Err(v.err(
                    "key_file",
                    "a witness key in a file is allowed only with dev = true: a production \
                     witness keeps its key in an HSM ([hsm] and key_label)",
                ))
            }
            (true, Some(file), None) => {
                if raw.key_label.is_some() {
                    return Err(v.err("key_label", "names a key in [hsm]; unused with key_file"));
                }
                WitnessKeySource::DevFile(v.path(&file))
            }
            (_, None, Some(hsm)) => {
                let (hsm, refused_pin_record) = v.hsm(hsm, env)?;
                WitnessKeySource::Hsm {
                    hsm,
                    label: v.nonempty(
                        "key_label",
                        raw.key_label.unwrap_or_else(|| "lav-witness".into()),
                    )?,
                    refused_pin_record: refused_pin_record.map(Box::new),
                }
            }
            (_, None, None) => {
                return Err(v.err(
                    "hsm",
                    "the witness key: set [hsm] (and key_label), or key_file with dev = true",
                ))
            }
        };
        let tls = raw.tls.map(|t| v.public_tls(t)).transpose()?;
        let server = v.server(raw.server)?;
        let admin = v.admin(raw.admin)?;
        if super::same_listener(server.listen, admin.listen) {
            return Err(v.err(
                "admin.listen",
                "must differ from server.listen: the admin listener is plain HTTP",
            ));
        }
        let mut logs = Vec::new();
        for (i, log) in raw.logs.into_iter().enumerate() {
            let field = |f: &str| format!("logs[{i}].{f}");
            if log.origin.is_empty()
                || log
                    .origin
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(v.err(
                    &field("origin"),
                    "must be a non-empty name without spaces, as in the log's checkpoints",
                ));
            }
            let key = VerifierKey::parse(&log.vkey)
                .map_err(|e| v.err(&field("vkey"), format!("not a signed-note vkey: {e}")))?;
            // A C2SP checkpoint's key name is its origin: a vkey named
            // otherwise verifies none of this log's checkpoints, and the
            // witness would answer 403 for ever.
            if key.name() != log.origin {
                return Err(v.err(
                    &field("vkey"),
                    format!(
                        "is the key of `{}`, not of origin `{}`: a log's checkpoints are \
                         signed by a key named as its origin",
                        key.name(),
                        log.origin
                    ),
                ));
            }
            logs.push(WitnessedLog {
                origin: log.origin,
                key,
            });
        }
        if logs.is_empty() {
            return Err(v.err("logs", "list at least one [[logs]] entry (origin, vkey)"));
        }
        // lavd's `[limits]` table, less the limits of unwraps and warrants:
        // a witness would ignore them, so setting one is a mistake to name.
        let unwrap_only = [
            ("max_batch", raw.limits.max_batch.is_some()),
            (
                "max_envelopes_in_flight",
                raw.limits.max_envelopes_in_flight.is_some(),
            ),
            ("max_warrant_bytes", raw.limits.max_warrant_bytes.is_some()),
            (
                "max_warrant_signatures",
                raw.limits.max_warrant_signatures.is_some(),
            ),
            (
                "max_envelope_bytes",
                raw.limits.max_envelope_bytes.is_some(),
            ),
            (
                "max_envelope_header_bytes",
                raw.limits.max_envelope_header_bytes.is_some(),
            ),
        ];
        if let Some((name, _)) = unwrap_only.iter().find(|(_, set)| *set) {
            return Err(v.err(
                &format!("limits.{name}"),
                "limits unwraps and warrants, which a witness does not serve; remove it",
            ));
        }
        // An add-checkpoint body is at most WITNESS_MAX_BODY_BYTES (a
        // routine one, a few KiB): with lavd's 1 MiB, 64 slow senders would
        // fill the default max_body_bytes_in_flight; with this, about 500.
        // Set before the checks, which compare the other bounds with it. A
        // `max_body_bytes_in_flight` set below it but at least the old
        // default, 64 KiB (a config that loaded then), is the bound then,
        // with the warning below; one below 64 KiB is refused as before.
        let mut raw_limits = raw.limits;
        let in_flight = raw_limits.max_body_bytes_in_flight;
        let body_bound = *raw_limits.max_body_bytes.get_or_insert(
            in_flight.map_or(WITNESS_MAX_BODY_BYTES as u64, |budget| {
                budget.clamp(64 << 10, WITNESS_MAX_BODY_BYTES as u64)
            }),
        );
        if body_bound < WITNESS_MAX_BODY_BYTES as u64 {
            v.warnings.borrow_mut().push(format!(
                "limits.max_body_bytes is {body_bound}, below the {WITNESS_MAX_BODY_BYTES} \
                 bytes of the largest add-checkpoint body C2SP lets a log send (16 signatures, \
                 post-quantum ones included, and 63 proof lines): such a checkpoint is refused \
                 413; unset max_body_bytes (and set max_body_bytes_in_flight to at least that, \
                 or unset it) to take them"
            ));
        }
        // Anyone may connect to a witness, as to the public log listener:
        // one address may not hold every slot unless the file says so.
        let per_ip_unset = raw_limits.max_connections_per_ip.is_none();
        let mut limits = v.limits(raw_limits)?;
        // Nor above it, once checked as lavd's is: a larger body would be
        // read whole and held, only to be refused by the parser with
        // another answer (400, not 413 `body_too_large`). Lowered, not
        // refused: such a file loaded before 2026-12-07.
        if limits.max_body_bytes > WITNESS_MAX_BODY_BYTES {
            v.warnings.borrow_mut().push(format!(
                "limits.max_body_bytes is {body_bound}, above the {WITNESS_MAX_BODY_BYTES} bytes \
                 of the largest add-checkpoint body C2SP lets a log send; {WITNESS_MAX_BODY_BYTES} \
                 is the bound (a larger body is refused 413 body_too_large unread)"
            ));
            limits.max_body_bytes = WITNESS_MAX_BODY_BYTES;
        }
        if per_ip_unset {
            limits.max_connections_per_ip = WITNESS_CONNECTIONS_PER_IP.min(limits.max_connections);
        }
        Ok(WitnessSettings {
            file: path.to_path_buf(),
            name: raw.name,
            state: v.path(&raw.state),
            key,
            server,
            tls,
            admin,
            limits,
            log: v.log(raw.log)?,
            logs,
            warnings: v.warnings.into_inner(),
        })
    }

    /// The `[tls]` table, which `lavd witness serve` needs.
    ///
    /// # Errors
    /// [`ConfigError`] on field `tls` when the table is absent.
    pub fn require_tls(&self) -> Result<&PublicTlsSettings, ConfigError> {
        self.tls.as_ref().ok_or_else(|| ConfigError {
            file: self.file.clone(),
            field: "tls".into(),
            reason: "lavd witness serve needs a [tls] table with cert and key".into(),
        })
    }
}

impl Validator<'_> {
    fn public_tls(&self, raw: RawPublicTls) -> Result<PublicTlsSettings, ConfigError> {
        Ok(PublicTlsSettings {
            cert: self.path(&raw.cert),
            key: self.tls_key(&raw.key),
            min_version: self.tls_version(raw.min_version.as_deref())?,
        })
    }
}
