//! `[[audit.witnesses]]` and `[audit] witness_policy`: the witnesses the
//! daemon submits its checkpoints to (C2SP `tlog-witness`) and the quorum
//! (C2SP `tlog-policy`) that serving and `release_after_witness` use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::raw::RawAudit;
use super::{ConfigError, Validator};
use crate::audit::witness::{CosignerKey, Policy};

/// Default of `witness_timeout_secs`: how long an unwrap under
/// `release_after_witness` waits for the quorum.
pub const DEFAULT_WITNESS_TIMEOUT_SECS: u64 = 10;
/// Default of `witness_request_timeout_secs`: one `add-checkpoint` request.
pub const DEFAULT_WITNESS_REQUEST_TIMEOUT_SECS: u64 = 5;
/// The longest either wait may be configured to.
const MAX_WITNESS_TIMEOUT_SECS: u64 = 300;
/// Default of `witness_refresh_secs`: how old a witness's cosignature of
/// the newest checkpoint may grow before it is asked for a newer one.
pub const DEFAULT_WITNESS_REFRESH_SECS: u64 = 300;
/// The most `witness_refresh_secs` may be: a day.
const MAX_WITNESS_REFRESH_SECS: u64 = 86_400;

/// One configured witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessEndpoint {
    /// The witness's key name (the vkey's name).
    pub name: String,
    /// The submission prefix: requests go to `<url>/add-checkpoint`.
    pub url: String,
    /// Its `cosignature/v1` key.
    pub key: CosignerKey,
    /// The CA bundle its TLS certificate is checked against (https); none
    /// for plain http.
    pub ca_file: Option<PathBuf>,
}

/// The validated witness configuration.
#[derive(Debug, Clone)]
pub struct WitnessClientSettings {
    /// Every configured witness, in file order.
    pub witnesses: Vec<WitnessEndpoint>,
    /// The policy file's path.
    pub policy_file: PathBuf,
    /// The parsed policy: the quorum that serving and release use.
    pub policy: Arc<Policy>,
    /// The policy file as read, to tell whether it changed.
    pub(crate) policy_text: Vec<u8>,
    /// No DEK leaves until its leaves are in a checkpoint the quorum
    /// cosigned.
    pub release_after_witness: bool,
    /// How long an unwrap waits for that quorum.
    pub timeout: Duration,
    /// The bound on one `add-checkpoint` request.
    pub request_timeout: Duration,
    /// How old a witness's cosignature of the newest checkpoint may grow
    /// while the log takes no leaves before that checkpoint is sent to it
    /// again, for a newer one: a cosignature dates the checkpoint
    /// (`lavd audit verify --max-cosignature-age`).
    pub refresh_after: Duration,
}

impl PartialEq for WitnessClientSettings {
    fn eq(&self, other: &Self) -> bool {
        self.witnesses == other.witnesses
            && self.policy_file == other.policy_file
            && self.policy_text == other.policy_text
            && self.release_after_witness == other.release_after_witness
            && self.timeout == other.timeout
            && self.request_timeout == other.request_timeout
            && self.refresh_after == other.refresh_after
    }
}

impl Eq for WitnessClientSettings {}

impl Validator<'_> {
    pub(super) fn witnesses(
        &self,
        raw: &RawAudit,
    ) -> Result<Option<WitnessClientSettings>, ConfigError> {
        let Some(policy_path) = &raw.witness_policy else {
            if let Some(first) = raw.witnesses.first() {
                return Err(self.err(
                    "audit.witness_policy",
                    format!(
                        "[[audit.witnesses]] ({}) without a witness_policy file naming the quorum",
                        first.name
                    ),
                ));
            }
            for (set, field) in [
                (raw.release_after_witness.is_some(), "release_after_witness"),
                (raw.witness_timeout_secs.is_some(), "witness_timeout_secs"),
                (
                    raw.witness_request_timeout_secs.is_some(),
                    "witness_request_timeout_secs",
                ),
                (raw.witness_refresh_secs.is_some(), "witness_refresh_secs"),
            ] {
                if set {
                    return Err(self.err(
                        &format!("audit.{field}"),
                        "needs audit.witness_policy and [[audit.witnesses]]",
                    ));
                }
            }
            return Ok(None);
        };
        let policy_file = self.path(policy_path);
        let policy_text = std::fs::read(&policy_file).map_err(|e| {
            self.err(
                "audit.witness_policy",
                format!("cannot read {}: {e}", policy_file.display()),
            )
        })?;
        let policy = Policy::parse(&policy_text).map_err(|e| {
            self.err(
                "audit.witness_policy",
                format!("{}: {e}", policy_file.display()),
            )
        })?;
        // A verifier may be given a policy naming witnesses whose key type
        // lavd does not verify (their cosignatures then never count); the
        // log's own cannot: it submits to each witness it names and counts
        // their cosignatures, and one it could never count would be
        // configured for nothing.
        if let Some((name, kind)) = policy.unverifiable_witnesses().next() {
            return Err(self.err(
                "audit.witness_policy",
                format!(
                    "{} names witness `{name}` with a key of type {kind:#04x}; lavd verifies \
                     only Ed25519 cosignatures (type 0x04)",
                    policy_file.display()
                ),
            ));
        }
        // The log's own key is Ed25519: another log line is another log's.
        if let Some((name, kind)) = policy.unverifiable_logs().next() {
            return Err(self.err(
                "audit.witness_policy",
                format!(
                    "{} names log key `{name}` of type {kind:#04x}; this log's key is Ed25519 \
                     (type 0x01)",
                    policy_file.display()
                ),
            ));
        }
        // A served checkpoint carries the log's signature and one line per
        // configured witness: within the 64 signature lines a note may
        // have (`audit::note::MAX_SIGNATURES`), which verifiers bound too.
        let most = crate::audit::note::MAX_SIGNATURES - 1;
        if raw.witnesses.len() > most {
            return Err(self.err(
                "audit.witnesses",
                format!(
                    "{} witnesses; at most {most} (a checkpoint with their cosignatures must \
                     stay within {} signature lines)",
                    raw.witnesses.len(),
                    crate::audit::note::MAX_SIGNATURES
                ),
            ));
        }
        let mut witnesses: Vec<WitnessEndpoint> = Vec::new();
        for (i, w) in raw.witnesses.iter().enumerate() {
            let field = |f: &str| format!("audit.witnesses[{i}].{f}");
            let key =
                CosignerKey::parse(&w.key).map_err(|e| self.err(&field("key"), e.to_string()))?;
            if key.name() != w.name {
                return Err(self.err(
                    &field("name"),
                    format!(
                        "`{}` is not the name of its key `{}`: name must equal the key's name",
                        w.name,
                        key.name()
                    ),
                ));
            }
            // The log signs its checkpoints under its origin: a witness
            // named so could have a key whose lines pass for the log's
            // (name and key ID, signed-note), failing every checkpoint.
            let origin = raw.origin.as_deref().unwrap_or(super::raw::DEFAULT_ORIGIN);
            if w.name == origin {
                return Err(self.err(
                    &field("name"),
                    format!(
                        "`{}` is the log's origin (audit.origin): a witness needs a name of its \
                         own, or its cosignature lines could pass for the log's signature",
                        w.name
                    ),
                ));
            }
            if let Some(other) = witnesses.iter().find(|o| o.name == w.name || o.key == key) {
                return Err(self.err(
                    &field("name"),
                    format!(
                        "`{}` is configured twice (also as `{}`)",
                        w.name, other.name
                    ),
                ));
            }
            let url = w.url.trim_end_matches('/');
            // Never echoed when it holds an `@` anywhere: with a scheme
            // mistyped, userinfo (which may hold a password) can hide from
            // the check below.
            let shown = if w.url.contains('@') {
                "the URL (not shown: it holds `@`, which may be a user and password)".to_string()
            } else {
                format!("`{}`", w.url)
            };
            // Userinfo first, and the URL never echoed with it: it may
            // hold a password (whatever else is wrong with the URL).
            let authority = url
                .split_once("://")
                .map_or(url, |(_, after)| after)
                .split('/')
                .next()
                .unwrap_or_default();
            if authority.contains('@') {
                return Err(self.err(
                    &field("url"),
                    "holds userinfo (`…@`): give the host alone, without a user or password \
                     (the URL is not shown: it may hold a password)",
                ));
            }
            let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
                (Some(rest), _) => (true, rest),
                (None, Some(rest)) => (false, rest),
                (None, None) => (false, ""),
            };
            if rest.is_empty() || rest.contains(['?', '#', ' ']) {
                return Err(self.err(
                    &field("url"),
                    format!("{shown} is not an https:// (or http://) submission prefix"),
                ));
            }
            // Over https the witness's certificate is checked against
            // `ca_file`; plain http needs none (the cosignature is checked
            // against the witness key either way).
            let ca_file = match (tls, &w.ca_file) {
                (true, Some(ca)) => {
                    let ca = self.path(ca);
                    if !ca.is_file() {
                        return Err(self.err(
                            &field("ca_file"),
                            format!("{} is not a readable file", ca.display()),
                        ));
                    }
                    Some(ca)
                }
                (true, None) => {
                    return Err(self.err(
                        &field("ca_file"),
                        "an https:// witness needs the CA of its certificate",
                    ))
                }
                (false, Some(_)) => {
                    return Err(self.err(&field("ca_file"), "an http:// witness has no CA"))
                }
                (false, None) => None,
            };
            // What the submitter will build, built once here, so that a bad
            // port or a CA file without a certificate is a config error
            // (exit 64) and not a failure after the start's first leaf.
            if let Err(e) = crate::cli::https::Endpoint::new_plain(&format!("http://{rest}")) {
                return Err(self.err(&field("url"), format!("{shown}: {e:#}")));
            }
            if let Some(ca) = &ca_file {
                if let Err(e) = crate::cli::https::Endpoint::new(url, ca, None) {
                    return Err(self.err(&field("ca_file"), format!("{e:#}")));
                }
            }
            if !policy.witnesses().any(|(_, k, _)| k == &key) {
                return Err(self.err(
                    &field("key"),
                    format!(
                        "witness `{}` is configured but {} does not name its key",
                        w.name,
                        policy_file.display()
                    ),
                ));
            }
            witnesses.push(WitnessEndpoint {
                name: w.name.clone(),
                url: url.to_string(),
                key,
                ca_file,
            });
        }
        if let Some((name, key, _)) = policy
            .witnesses()
            .find(|(_, k, _)| !witnesses.iter().any(|w| &w.key == *k))
        {
            return Err(self.err(
                "audit.witnesses",
                format!(
                    "{} names witness `{name}` ({key}), which no [[audit.witnesses]] entry \
                     configures with that key",
                    policy_file.display()
                ),
            ));
        }
        // Waiting for a quorum of none would wait for a cosignature row
        // that nothing need ever write: every opening unwrap would time out
        // after spending its budget.
        if raw.release_after_witness == Some(true) && !policy.needs_cosignatures() {
            return Err(self.err(
                "audit.release_after_witness",
                format!(
                    "{}'s quorum is `none`: there would be no cosignatures to wait for",
                    policy_file.display()
                ),
            ));
        }
        let secs = |field: &str, value: Option<u64>, default: u64| {
            let s = value.unwrap_or(default);
            if s == 0 || s > MAX_WITNESS_TIMEOUT_SECS {
                return Err(self.err(
                    &format!("audit.{field}"),
                    format!("must be 1 to {MAX_WITNESS_TIMEOUT_SECS} seconds"),
                ));
            }
            Ok(Duration::from_secs(s))
        };
        Ok(Some(WitnessClientSettings {
            witnesses,
            policy_file,
            policy: Arc::new(policy),
            policy_text,
            release_after_witness: raw.release_after_witness.unwrap_or(false),
            timeout: secs(
                "witness_timeout_secs",
                raw.witness_timeout_secs,
                DEFAULT_WITNESS_TIMEOUT_SECS,
            )?,
            request_timeout: secs(
                "witness_request_timeout_secs",
                raw.witness_request_timeout_secs,
                DEFAULT_WITNESS_REQUEST_TIMEOUT_SECS,
            )?,
            refresh_after: match raw
                .witness_refresh_secs
                .unwrap_or(DEFAULT_WITNESS_REFRESH_SECS)
            {
                s @ 1..=MAX_WITNESS_REFRESH_SECS => Duration::from_secs(s),
                _ => {
                    return Err(self.err(
                        "audit.witness_refresh_secs",
                        format!("must be 1 to {MAX_WITNESS_REFRESH_SECS} seconds"),
                    ))
                }
            },
        }))
    }
}
