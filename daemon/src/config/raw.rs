//! The config file as written: serde types with `deny_unknown_fields`.

use std::path::PathBuf;

use serde::Deserialize;

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
    pub(super) pin: Option<toml::Value>,
    pub(super) sessions: Option<usize>,
    pub(super) quirks: Option<RawQuirks>,
}

/// `[hsm.quirks]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuirks {
    pub(super) derive_sets_value_len: Option<bool>,
}

/// `[store]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub(super) path: PathBuf,
}

/// `[audit]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    #[serde(default = "default_audit_label")]
    pub(super) key_label: String,
    #[serde(default = "default_origin")]
    pub(super) origin: String,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            key_label: default_audit_label(),
            origin: default_origin(),
        }
    }
}

fn default_audit_label() -> String {
    "lav-audit".into()
}

fn default_origin() -> String {
    "lavd.invalid/audit".into()
}

impl RawConfig {
    /// Parses TOML. On error returns `(field, reason)`: the dotted path of the
    /// offending key where the parser knows it, and its message.
    ///
    /// # Errors
    /// `(field, reason)` as above.
    pub fn parse(text: &str) -> Result<Self, (String, String)> {
        toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|span| locate(text, span.start))
                .unwrap_or_else(|| "(file)".into());
            (field, e.message().trim().to_string())
        })
    }
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
