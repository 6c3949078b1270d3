//! The config file as written: serde types with `deny_unknown_fields`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// A value that may hold a secret someone wrongly wrote into the file (a
/// PIN, a password, a URL with one): `Debug` prints a placeholder, so that
/// printing a raw config can never show it.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct Unshown<T>(pub(super) T);

impl<T> std::fmt::Debug for Unshown<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<not shown>")
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[hsm]`
    pub hsm: RawHsm,
    /// `[store]`
    pub store: RawStore,
    /// `[audit]`
    #[serde(default)]
    pub audit: RawAudit,
    /// `[server]` (`lavd serve`)
    #[serde(default)]
    pub server: RawServer,
    /// `[tls]` (required by `lavd serve`)
    pub tls: Option<RawTls>,
    /// `[admin]` (`lavd serve`)
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[roles]`: identity (URI SAN) → role names.
    #[serde(default)]
    pub roles: BTreeMap<String, Vec<String>>,
    /// `[limits]` (`lavd serve`)
    #[serde(default)]
    pub limits: RawLimits,
    /// `[log]`
    #[serde(default)]
    pub log: RawLog,
    /// `[[authorities]]`: who may sign warrants (see `warrant::trust`).
    #[serde(default)]
    pub authorities: Vec<crate::warrant::trust::AuthorityConfig>,
    /// `[policy]`: how many distinct authorities of each role must sign.
    #[serde(default)]
    pub policy: Option<crate::warrant::trust::PolicyConfig>,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) shutdown_grace_secs: Option<u64>,
    pub(super) blocking_threads: Option<u64>,
}

/// `[tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_cas: Vec<PathBuf>,
    #[serde(default)]
    pub(super) crls: Vec<PathBuf>,
    pub(super) min_version: Option<String>,
    pub(super) allow_unknown_revocation_status: Option<bool>,
    pub(super) enforce_crl_expiry: Option<bool>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub(super) listen: Option<String>,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub(super) max_body_bytes: Option<u64>,
    pub(super) max_body_bytes_in_flight: Option<u64>,
    pub(super) max_header_bytes: Option<u64>,
    pub(super) max_batch: Option<u64>,
    pub(super) max_envelopes_in_flight: Option<u64>,
    pub(super) max_warrant_bytes: Option<u64>,
    pub(super) max_warrant_signatures: Option<u64>,
    pub(super) max_envelope_bytes: Option<u64>,
    pub(super) max_envelope_header_bytes: Option<u64>,
    pub(super) handshake_timeout_secs: Option<u64>,
    pub(super) header_read_timeout_secs: Option<u64>,
    pub(super) body_read_timeout_secs: Option<u64>,
    pub(super) idle_timeout_secs: Option<u64>,
    pub(super) max_connections: Option<u64>,
    pub(super) max_connections_per_ip: Option<u64>,
    pub(super) rate_limit_per_second: Option<f64>,
    pub(super) rate_limit_burst: Option<u64>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
}

/// `[hsm]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHsm {
    pub(super) module: PathBuf,
    pub(super) token_label: Option<String>,
    pub(super) token_serial: Option<String>,
    /// Present only to refuse it with a reason.
    pub(super) slot: Option<toml::Value>,
    pub(super) pin_file: Option<PathBuf>,
    pub(super) pin_env: Option<String>,
    /// Present only to refuse it with a reason.
    pub(super) pin: Option<Unshown<toml::Value>>,
    pub(super) refused_pin_record: Option<PathBuf>,
    pub(super) sessions: Option<usize>,
    pub(super) call_timeout_ms: Option<u64>,
    pub(super) quirks: Option<RawQuirks>,
    pub(super) env: Option<std::collections::BTreeMap<String, String>>,
}

/// `[hsm.quirks]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuirks {
    pub(super) derive_sets_value_len: Option<bool>,
    pub(super) reset_module_after_opens: Option<u64>,
}

/// `[store]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// An SQLite file.
    pub(super) path: Option<PathBuf>,
    /// Or a PostgreSQL URL, with the settings below (one holding a
    /// password is refused, after this is printed, if ever).
    pub(super) url: Option<Unshown<String>>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_env: Option<String>,
    /// Present only to refuse it with a reason.
    pub(super) password: Option<Unshown<toml::Value>>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) pool_size: Option<u64>,
    pub(super) pool_wait_secs: Option<u64>,
    pub(super) statement_timeout_secs: Option<u64>,
    pub(super) reservation_lease_secs: Option<u64>,
}

/// `[audit]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    #[serde(default = "default_audit_label")]
    pub(super) key_label: String,
    /// `None` when absent: the placeholder [`DEFAULT_ORIGIN`], with a warning.
    #[serde(default)]
    pub(super) origin: Option<String>,
    /// `[audit.public]`: absent unless the log is published.
    #[serde(default)]
    pub(super) public: Option<RawPublicLog>,
    /// `[[audit.witnesses]]`
    #[serde(default)]
    pub(super) witnesses: Vec<RawWitness>,
    pub(super) witness_policy: Option<PathBuf>,
    pub(super) release_after_witness: Option<bool>,
    pub(super) witness_timeout_secs: Option<u64>,
    pub(super) witness_request_timeout_secs: Option<u64>,
    pub(super) witness_refresh_secs: Option<u64>,
}

/// `[audit.public]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublicLog {
    pub(super) listen: String,
    pub(super) max_connections: Option<u64>,
    pub(super) max_connections_per_ip: Option<u64>,
    pub(super) rate_limit_per_second: Option<f64>,
    pub(super) rate_limit_burst: Option<u64>,
}

/// `[[audit.witnesses]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWitness {
    pub(super) name: String,
    pub(super) url: String,
    pub(super) key: String,
    pub(super) ca_file: Option<PathBuf>,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            key_label: default_audit_label(),
            origin: None,
            public: None,
            witnesses: Vec::new(),
            witness_policy: None,
            release_after_witness: None,
            witness_timeout_secs: None,
            witness_request_timeout_secs: None,
            witness_refresh_secs: None,
        }
    }
}

fn default_audit_label() -> String {
    "lav-audit".into()
}

/// The origin of a log whose configuration names none: a placeholder that
/// says so (`.invalid`, RFC 6761), kept for configurations written before
/// the warning.
pub(super) const DEFAULT_ORIGIN: &str = "lavd.invalid/audit";

impl RawConfig {
    /// Parses TOML. On error returns `(field, reason)`: the dotted path of the
    /// offending key where the parser knows it, and its message.
    ///
    /// # Errors
    /// `(field, reason)` as above.
    pub fn parse(text: &str) -> Result<Self, (String, String)> {
        parse_toml(text)
    }
}

/// Parses TOML into `T`; on error `(field, reason)` as [`RawConfig::parse`].
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (String, String)> {
    toml::from_str(text).map_err(|mut e| {
        let place = e
            .span()
            .map(|span| locate(text, span.start))
            .unwrap_or_else(|| "(file)".into());
        let reason = e.message().trim().to_string();
        // The key's path as the field, its place in the reason.
        match key_path(&mut e) {
            Some(path) => (path, format!("{reason} (at {place})")),
            None => (place, reason),
        }
    })
}

/// The dotted path of the key a type or range error is about
/// (`limits.max_batch` for `max_batch = -1`), where the parser knows it:
/// toml keeps it but shows it only in an error's text without the input,
/// as its last line, `in `…``.
fn key_path(e: &mut toml::de::Error) -> Option<String> {
    e.set_input(None);
    let shown = e.to_string();
    let path = shown
        .lines()
        .last()?
        .strip_prefix("in `")?
        .strip_suffix('`')?;
    (!path.is_empty()).then(|| path.to_string())
}

/// `line N` plus the enclosing `[table]`, for a byte offset.
fn locate(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .unwrap_or("(top level)");
    format!("{table} line {line}")
}
