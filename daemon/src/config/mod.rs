//! Configuration: a TOML file parsed into raw serde types (unknown fields
//! refused), then validated once into typed settings. Nothing downstream sees
//! a raw value.
//!
//! Relative paths in the file are resolved against the file's own directory,
//! so a config and its neighbours can move together. The HSM PIN is never in
//! the file: it comes from a file or an environment variable that the file
//! names, read through an injectable [`Env`] so tests never touch the process
//! environment.
//!
//! A bad config names the file, the field and the reason; `main` exits 64.

mod raw;
mod server;
mod witness;
mod witnesses;

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use cryptoki::types::AuthPin;

use crate::hsm::refused_pin::{LoginIdentity, RefusedPinRecord};
use crate::hsm::{HsmSettings, Quirks, TokenSelector};

pub use raw::RawConfig;
pub use server::{
    AdminSettings, Limits, LogFormat, LogSettings, PublicLogSettings, ServerSettings, TlsSettings,
    TlsVersion,
};
pub use witnesses::{WitnessClientSettings, WitnessEndpoint};

pub use witness::{PublicTlsSettings, WitnessKeySource, WitnessSettings, WitnessedLog};

use crate::api::identity::RoleMap;

/// The default config path.
pub const DEFAULT_PATH: &str = "/etc/lavd/lavd.toml";

/// `[hsm] call_timeout_ms` when unset: far above any healthy call (SoftHSM
/// answers in well under a millisecond, network HSMs in tens), short enough
/// that a hung HSM answers clients with 503 rather than holding them.
pub const DEFAULT_HSM_CALL_TIMEOUT_MS: u64 = 5_000;

/// The bounds of `[hsm.quirks] reset_module_after_opens` other than 0: a
/// reset costs a `C_Initialize` and a login for each session, so not more
/// often than every 100 opens.
const RESET_AFTER_OPENS_MIN: u64 = 100;
const RESET_AFTER_OPENS_MAX: u64 = 1_000_000_000;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("config {}: {field}: {reason}", file.display())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// The dotted field path (`hsm.token_label`), or `(file)` for the file as a whole.
    pub field: String,
    /// What is wrong and, where it helps, what to do.
    pub reason: String,
}

/// Where environment variables come from (the process, or a test's map).
/// `Send + Sync` so that the server can keep it to reload the file on SIGHUP.
pub trait Env: Send + Sync {
    /// The variable's value.
    ///
    /// # Errors
    /// [`std::env::VarError::NotPresent`] when it is not set,
    /// [`std::env::VarError::NotUnicode`] when it is not UTF-8.
    fn var(&self, name: &str) -> Result<String, std::env::VarError>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Result<String, std::env::VarError> {
        std::env::var(name)
    }
}

/// Validated settings.
#[derive(Debug)]
pub struct Settings {
    /// The file these came from.
    pub file: PathBuf,
    /// The HSM.
    pub hsm: HsmSettings,
    /// `[hsm] refused_pin_record`, with the login this config would try
    /// (the module, the token and the PIN file as read): a PIN the token
    /// refused is not tried again by a later start or command that would
    /// log in the same way (`cli::open_hsm_minding`).
    pub refused_pin_record: Option<RefusedPinRecord>,
    /// `[store]`: an SQLite file or a PostgreSQL database.
    pub store: crate::store::StoreSettings,
    /// The audit log.
    pub audit: AuditSettings,
    /// `[server]`: the API listener.
    pub server: ServerSettings,
    /// `[tls]`: absent in a file used only for key lifecycle commands;
    /// `lavd serve` refuses to start without it.
    pub tls: Option<TlsSettings>,
    /// `[admin]`: the operations listener.
    pub admin: AdminSettings,
    /// `[roles]`: who may do what.
    pub roles: RoleMap,
    /// `[limits]`.
    pub limits: Limits,
    /// `[log]`.
    pub log: LogSettings,
    /// Things that are allowed but unwise (a PIN file readable by others),
    /// for the caller to log once logging is set up.
    pub warnings: Vec<String>,
    /// `[[authorities]]` and `[policy]`, validated; `lavd serve` needs them.
    pub trust: Option<std::sync::Arc<crate::warrant::TrustStore>>,
}

/// Audit log settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    /// `CKA_LABEL` of the Ed25519 audit key pair on the token.
    pub key_label: String,
    /// The log's origin line in checkpoints (C2SP tlog-checkpoint), e.g.
    /// `lavd.agency.example/audit`.
    pub origin: String,
    /// `[audit.public]`: a listener serving the log's tiles without a
    /// client certificate, or `None` (the default: only the auditor role
    /// reads the log).
    pub public: Option<PublicLogSettings>,
    /// `[[audit.witnesses]]` and the witness policy: absent when no witness
    /// is configured.
    pub witnesses: Option<WitnessClientSettings>,
}

impl Settings {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, field and reason.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        Self::from_raw(read_toml(path)?, path, env)
    }

    /// Validates a parsed config. `path` locates relative paths and names the
    /// file in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field and reason.
    pub fn from_raw(raw: RawConfig, path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let v = Validator {
            file: path,
            base: path.parent().unwrap_or(Path::new(".")),
            warnings: RefCell::new(Vec::new()),
        };
        // What decides who may do what, or runs inside the daemon: anyone
        // who can replace one of these files controls lavd.
        v.warn_if_replaceable("the configuration file", path, CONTROLS);
        v.warn_if_replaceable(
            "the PKCS#11 module (hsm.module)",
            &v.path(&raw.hsm.module),
            CONTROLS,
        );
        for (i, a) in raw.authorities.iter().enumerate() {
            if let Some(pem) = &a.pem_file {
                v.warn_if_replaceable(
                    &format!("authorities[{i}].pem_file"),
                    &v.path(pem),
                    CONTROLS,
                );
            }
        }
        // And the secrets lavd reads: a PIN file others could write would
        // let them spend the token's login tries.
        for (what, file, harm) in [
            ("hsm.pin_file", raw.hsm.pin_file.as_ref(), PIN_HARM),
            (
                "store.password_file",
                raw.store.password_file.as_ref(),
                "could make lavd log in to a database of theirs",
            ),
            (
                "store.ca_file",
                raw.store.ca_file.as_ref(),
                "could make lavd trust a database of theirs",
            ),
        ] {
            if let Some(file) = file {
                v.warn_if_replaceable(what, &v.path(file), harm);
            }
        }
        if let Some(tls) = &raw.tls {
            let serving = "could serve lavd's API as lavd";
            v.warn_if_replaceable("tls.cert", &v.path(&tls.cert), serving);
            v.warn_if_replaceable("tls.key", &v.path(&tls.key), serving);
            for (field, files) in [("tls.client_cas", &tls.client_cas), ("tls.crls", &tls.crls)] {
                for (i, file) in files.iter().enumerate() {
                    v.warn_if_replaceable(&format!("{field}[{i}]"), &v.path(file), CONTROLS);
                }
            }
        }
        if let Some(policy) = &raw.audit.witness_policy {
            v.warn_if_replaceable("audit.witness_policy", &v.path(policy), CONTROLS);
        }
        let (hsm, refused_pin_record) = v.hsm(raw.hsm, env)?;
        let store = v.store(raw.store, env)?;
        if let crate::store::StoreSettings::Postgres(pg) = &store {
            // One HSM call may take the whole call timeout; a request that
            // waits that long past its lease may be swept as interrupted and
            // then releases nothing (docs/audit.md, "Open intents").
            if hsm.call_timeout >= pg.reservation_lease {
                v.warnings.borrow_mut().push(format!(
                    "hsm.call_timeout_ms ({} ms) is not shorter than \
                     store.reservation_lease_secs ({} s): a request whose HSM call runs that \
                     long outlives its lease, may have its opens swept as interrupted, and then \
                     releases nothing (503 store_unavailable); keep the lease above your \
                     slowest request (docs/configuration.md, the store)",
                    hsm.call_timeout.as_millis(),
                    pg.reservation_lease.as_secs()
                ));
            }
        }
        let witnesses = v.witnesses(&raw.audit)?;
        let origin = match raw.audit.origin {
            Some(origin) => v.origin(origin)?,
            None => {
                v.warnings.borrow_mut().push(format!(
                    "audit.origin is not set: checkpoints are signed under the placeholder \
                     {:?}, and a log's origin can never change after its first checkpoint; \
                     set it (e.g. \"lavd.agency.example/audit\") before the log's first start",
                    raw::DEFAULT_ORIGIN
                ));
                raw::DEFAULT_ORIGIN.to_string()
            }
        };
        let audit = AuditSettings {
            key_label: v.audit_key_label(raw.audit.key_label)?,
            origin,
            public: raw.audit.public.map(|p| v.public_log(p)).transpose()?,
            witnesses,
        };
        let server = v.server(raw.server)?;
        let tls = raw.tls.map(|t| v.tls(t)).transpose()?;
        let admin = v.admin(raw.admin)?;
        let roles = v.roles(raw.roles)?;
        let trust = v.trust(raw.authorities, raw.policy)?;
        let limits = v.limits(raw.limits)?;
        if let Some(trust) = &trust {
            let needed = trust.policy().signatures_needed();
            if needed > limits.max_warrant_signatures {
                return Err(v.err(
                    "limits.max_warrant_signatures",
                    format!(
                        "is below the {needed} signatures [policy] requires: no warrant could pass"
                    ),
                ));
            }
        }
        let log = v.log(raw.log)?;
        if same_listener(server.listen, admin.listen) {
            return Err(v.err(
                "admin.listen",
                "must differ from server.listen: the admin listener is plain HTTP",
            ));
        }
        if let Some(public) = &audit.public {
            if same_listener(public.listen, server.listen)
                || same_listener(public.listen, admin.listen)
            {
                return Err(v.err(
                    "audit.public.listen",
                    "must differ from server.listen and admin.listen: the public log listener \
                     asks for no client certificate",
                ));
            }
        }
        Ok(Settings {
            file: path.to_path_buf(),
            hsm,
            refused_pin_record,
            store,
            audit,
            server,
            tls,
            admin,
            roles,
            limits,
            log,
            warnings: v.warnings.into_inner(),
            trust,
        })
    }

    /// The authorities and policy, which `lavd serve` needs.
    ///
    /// # Errors
    /// [`ConfigError`] on field `policy` when they are absent.
    pub fn require_trust(
        &self,
    ) -> Result<&std::sync::Arc<crate::warrant::TrustStore>, ConfigError> {
        self.trust.as_ref().ok_or_else(|| ConfigError {
            file: self.file.clone(),
            field: "policy".into(),
            reason: "lavd serve needs [[authorities]] and a [policy] table".into(),
        })
    }

    /// The `[tls]` table, which `lavd serve` needs.
    ///
    /// # Errors
    /// [`ConfigError`] on field `tls` when the table is absent.
    pub fn require_tls(&self) -> Result<&TlsSettings, ConfigError> {
        self.tls.as_ref().ok_or_else(|| ConfigError {
            file: self.file.clone(),
            field: "tls".into(),
            reason: "lavd serve needs a [tls] table with cert, key and client_cas".into(),
        })
    }
}

impl Validator<'_> {
    fn trust(
        &self,
        authorities: Vec<crate::warrant::trust::AuthorityConfig>,
        policy: Option<crate::warrant::trust::PolicyConfig>,
    ) -> Result<Option<std::sync::Arc<crate::warrant::TrustStore>>, ConfigError> {
        use crate::warrant::trust::{TrustConfig, TrustConfigError};
        let policy = match (authorities.is_empty(), policy) {
            (true, None) => return Ok(None),
            (false, None) => {
                return Err(self.err("policy", "[[authorities]] without a [policy] table"))
            }
            (_, Some(policy)) => policy,
        };
        let config = TrustConfig {
            authorities,
            policy,
        };
        config
            .validate(self.base)
            .map(|t| Some(std::sync::Arc::new(t)))
            .map_err(|e| match e {
                TrustConfigError::Invalid { field, reason } => self.err(&field, reason),
                other => self.err("authorities", other.to_string()),
            })
    }
}

/// Reads and parses the TOML file `path` into `T` (unknown fields refused
/// by `T`'s serde attributes).
fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        field: "(file)".into(),
        reason: format!("cannot read: {e}"),
    })?;
    raw::parse_toml(&text).map_err(|(field, reason)| ConfigError {
        file: path.to_path_buf(),
        field,
        reason,
    })
}

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
    warnings: RefCell<Vec<String>>,
}

/// The most a PIN or password file may hold.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

impl Validator<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Opens a PIN or password file: a regular file only (a FIFO would
    /// hold the start, or a reload, for ever; a device's read never ends).
    fn open_secret(&self, field: &str, file: &Path) -> Result<std::fs::File, ConfigError> {
        crate::cli::open_regular(file)
            .map_err(|e| self.err(field, format!("cannot read {}: {e}", file.display())))
    }

    /// Reads a PIN or password from `handle`, at most
    /// [`MAX_SECRET_FILE_BYTES`], leaving no copy of it unwiped
    /// ([`crate::cli::read_wiping`]).
    fn read_secret(
        &self,
        field: &str,
        file: &Path,
        handle: &mut std::fs::File,
    ) -> Result<zeroize::Zeroizing<String>, ConfigError> {
        let cannot = |e: &dyn std::fmt::Display| {
            self.err(field, format!("cannot read {}: {e}", file.display()))
        };
        let too_large = || {
            self.err(
                field,
                format!(
                    "{} is larger than {MAX_SECRET_FILE_BYTES} bytes: not a PIN or password",
                    file.display()
                ),
            )
        };
        let len = handle.metadata().map_err(|e| cannot(&e))?.len();
        if len > MAX_SECRET_FILE_BYTES {
            return Err(too_large());
        }
        let bytes =
            crate::cli::read_wiping(handle, len, MAX_SECRET_FILE_BYTES).map_err(|e| cannot(&e))?;
        if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
            return Err(too_large());
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| cannot(&"it is not UTF-8 text"))?;
        Ok(zeroize::Zeroizing::new(text.to_string()))
    }

    /// A PIN or password as read from a file or an environment variable
    /// (`source` names which): one rule for both, its line ends removed (a
    /// file written by `echo`, a Kubernetes Secret made `--from-file`,
    /// end in one), refused when nothing is left.
    fn secret_text<'t>(
        &self,
        field: &str,
        source: &str,
        text: &'t str,
    ) -> Result<&'t str, ConfigError> {
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            return Err(self.err(field, format!("{source} is empty")));
        }
        Ok(secret)
    }

    /// The secret in environment variable `var`, named by `field`. Its
    /// value is never shown: a value that is not UTF-8 is said so, not
    /// "not set".
    fn env_secret(
        &self,
        env: &dyn Env,
        field: &str,
        var: &str,
    ) -> Result<zeroize::Zeroizing<String>, ConfigError> {
        match env.var(var) {
            Ok(value) => Ok(zeroize::Zeroizing::new(value)),
            Err(std::env::VarError::NotPresent) => {
                Err(self.err(field, format!("environment variable {var} is not set")))
            }
            Err(std::env::VarError::NotUnicode(value)) => {
                drop(zeroize::Zeroizing::new(value.into_encoded_bytes()));
                Err(self.err(
                    field,
                    format!("environment variable {var} holds bytes that are not UTF-8"),
                ))
            }
        }
    }

    /// Warns when users other than root and lavd's could replace `file`
    /// ([`replaceable_by_others`]); `harm` says what whoever did could do.
    pub(super) fn warn_if_replaceable(&self, what: &str, file: &Path, harm: &str) {
        if let Some(why) = replaceable_by_others(file) {
            self.warnings.borrow_mut().push(format!(
                "{what} {} {why} (whoever could replace it {harm})",
                file.display()
            ));
        }
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn nonempty(&self, field: &str, value: String) -> Result<String, ConfigError> {
        if value.trim().is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        Ok(value)
    }

    /// `audit.key_label`: not empty, and not under the escrow keys' label
    /// prefix, where `lavd keys destroy` would take it for an escrow key
    /// (a destroyed kid of that name) and delete it.
    fn audit_key_label(&self, label: String) -> Result<String, ConfigError> {
        let label = self.nonempty("audit.key_label", label)?;
        if label.starts_with(crate::hsm::ESCROW_LABEL_PREFIX) {
            return Err(self.err(
                "audit.key_label",
                format!(
                    "must not start with {:?}, the escrow keys' label prefix",
                    crate::hsm::ESCROW_LABEL_PREFIX
                ),
            ));
        }
        Ok(label)
    }

    fn origin(&self, origin: String) -> Result<String, ConfigError> {
        // C2SP tlog-checkpoint: the origin is a schema-less URL-like name, one
        // line, no whitespace, so it cannot forge note structure; and it is
        // the log key's name, held to signed-note's rule for names (no `+`,
        // at most 256 bytes) by the one check the signer applies: a name
        // that passed here and failed there stopped `lavd serve` after its
        // first leaf, with exit 1 and no field named.
        crate::audit::note::check_name(&origin).map_err(|e| {
            self.err(
                "audit.origin",
                format!("{e}: it must be a name such as lavd.agency.example/audit"),
            )
        })?;
        Ok(origin)
    }

    fn hsm(
        &self,
        raw: raw::RawHsm,
        env: &dyn Env,
    ) -> Result<(HsmSettings, Option<RefusedPinRecord>), ConfigError> {
        if raw.slot.is_some() {
            return Err(self.err(
                "hsm.slot",
                "a slot number alone is refused: slot numbers change when tokens are added or \
                 re-initialised, and the daemon would open the wrong token; use token_label or \
                 token_serial",
            ));
        }
        if raw.pin.is_some() {
            return Err(self.err(
                "hsm.pin",
                "the PIN is never read from the config file; use pin_file or pin_env",
            ));
        }
        let token = match (raw.token_label, raw.token_serial) {
            (Some(label), None) => TokenSelector::Label(self.nonempty("hsm.token_label", label)?),
            (None, Some(serial)) => {
                TokenSelector::Serial(self.nonempty("hsm.token_serial", serial)?)
            }
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "hsm.token_label",
                    "set token_label or token_serial, not both",
                ))
            }
            (None, None) => {
                return Err(self.err("hsm.token_label", "set token_label or token_serial"))
            }
        };
        let module = self.path(&raw.module);
        // What a refused-PIN record names: the login this start would try.
        let mut login = None;
        let pin = match (raw.pin_file, raw.pin_env) {
            (Some(file), None) => {
                let file = self.path(&file);
                let cannot_read = |e: std::io::Error| {
                    self.err(
                        "hsm.pin_file",
                        format!("cannot read {}: {e}", file.display()),
                    )
                };
                // One handle for the bytes and the metadata, so that both
                // describe the same file even if it is replaced meanwhile;
                // its metadata taken before and after the read, so that both
                // describe the same version of it.
                let mut handle = self.open_secret("hsm.pin_file", &file)?;
                let identity = |handle: &std::fs::File| {
                    let meta = handle.metadata().map_err(cannot_read)?;
                    Ok::<_, ConfigError>(LoginIdentity::of(&module, &token, &file, &meta))
                };
                let before = identity(&handle)?;
                let text = self.read_secret("hsm.pin_file", &file, &mut handle)?;
                if raw.refused_pin_record.is_some() {
                    if before != identity(&handle)? {
                        return Err(self.err(
                            "hsm.pin_file",
                            format!("{} changed while it was read; start again", file.display()),
                        ));
                    }
                    login = Some(before);
                }
                if readable_by_others(&file) {
                    self.warnings.borrow_mut().push(format!(
                        "the HSM PIN file {} is readable by other users; chmod 600 it",
                        file.display()
                    ));
                }
                let pin = self.secret_text("hsm.pin_file", &file.display().to_string(), &text)?;
                AuthPin::new(pin.into())
            }
            (None, Some(var)) => {
                let value = self.env_secret(env, "hsm.pin_env", &var)?;
                AuthPin::new(self.secret_text("hsm.pin_env", &var, &value)?.into())
            }
            (Some(_), Some(_)) => {
                return Err(self.err("hsm.pin_file", "set pin_file or pin_env, not both"))
            }
            (None, None) => return Err(self.err("hsm.pin_file", "set pin_file or pin_env")),
        };
        let sessions = raw.sessions.unwrap_or(4);
        if !(1..=256).contains(&sessions) {
            return Err(self.err("hsm.sessions", "must be between 1 and 256"));
        }
        let call_timeout_ms = raw.call_timeout_ms.unwrap_or(DEFAULT_HSM_CALL_TIMEOUT_MS);
        if !(50..=600_000).contains(&call_timeout_ms) {
            return Err(self.err(
                "hsm.call_timeout_ms",
                "must be between 50 and 600000 (10 minutes)",
            ));
        }
        let defaults = Quirks::default();
        let raw_quirks = raw.quirks.as_ref();
        let reset_module_after_opens = raw_quirks
            .and_then(|q| q.reset_module_after_opens)
            .unwrap_or(defaults.reset_module_after_opens);
        if reset_module_after_opens != 0
            && !(RESET_AFTER_OPENS_MIN..=RESET_AFTER_OPENS_MAX).contains(&reset_module_after_opens)
        {
            return Err(self.err(
                "hsm.quirks.reset_module_after_opens",
                format!(
                    "must be 0 (never) or between {RESET_AFTER_OPENS_MIN} and {RESET_AFTER_OPENS_MAX}"
                ),
            ));
        }
        let quirks = Quirks {
            derive_sets_value_len: raw_quirks
                .and_then(|q| q.derive_sets_value_len)
                .unwrap_or(defaults.derive_sets_value_len),
            reset_module_after_opens,
        };
        let mut module_env = Vec::new();
        for (name, value) in raw.env.unwrap_or_default() {
            let ok = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !value.contains('\0');
            if !ok {
                return Err(self.err(
                    &format!("hsm.env.{name}"),
                    "names are letters, digits and `_`; values have no NUL",
                ));
            }
            module_env.push((name, value));
        }
        let refused_pin_record = match (raw.refused_pin_record, login) {
            (None, _) => None,
            (Some(record), Some(login)) => Some(RefusedPinRecord {
                record: self.path(&record),
                login,
            }),
            (Some(_), None) => {
                return Err(self.err(
                    "hsm.refused_pin_record",
                    "needs pin_file: a refusal is recorded against the PIN file, whose change \
                     is what lets lavd try again; a PIN from the environment has none",
                ))
            }
        };
        let settings = HsmSettings {
            module,
            token,
            pin,
            sessions,
            quirks,
            module_env,
            call_timeout: std::time::Duration::from_millis(call_timeout_ms),
        };
        Ok((settings, refused_pin_record))
    }
}

/// A PostgreSQL store given on the command line (`lavd store copy --to`),
/// validated exactly as `[store] url` and its fields are in a config file;
/// errors name the same fields (`store.url`, …) and exit 64.
///
/// # Errors
/// [`ConfigError`] naming the field.
pub fn postgres_target(
    url: String,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    ca_file: Option<PathBuf>,
    env: &dyn Env,
) -> Result<crate::store::StoreSettings, ConfigError> {
    let v = Validator {
        file: Path::new("(command line)"),
        base: Path::new("."),
        warnings: RefCell::new(Vec::new()),
    };
    v.store(
        raw::RawStore {
            path: None,
            url: Some(raw::Unshown(url)),
            password_file,
            password_env,
            password: None,
            ca_file,
            pool_size: None,
            pool_wait_secs: None,
            statement_timeout_secs: None,
            reservation_lease_secs: None,
        },
        env,
    )
}

impl Validator<'_> {
    fn store(
        &self,
        raw: raw::RawStore,
        env: &dyn Env,
    ) -> Result<crate::store::StoreSettings, ConfigError> {
        use crate::store::{PgSettings, StoreSettings};
        if raw.password.is_some() {
            return Err(self.err(
                "store.password",
                "the database password is never read from the config file; use password_file \
                 or password_env",
            ));
        }
        let url = match (raw.path, raw.url.map(|url| url.0)) {
            (Some(path), None) => {
                for (field, set) in [
                    ("store.password_file", raw.password_file.is_some()),
                    ("store.password_env", raw.password_env.is_some()),
                    ("store.ca_file", raw.ca_file.is_some()),
                    ("store.pool_size", raw.pool_size.is_some()),
                    ("store.pool_wait_secs", raw.pool_wait_secs.is_some()),
                    (
                        "store.statement_timeout_secs",
                        raw.statement_timeout_secs.is_some(),
                    ),
                    (
                        "store.reservation_lease_secs",
                        raw.reservation_lease_secs.is_some(),
                    ),
                ] {
                    if set {
                        return Err(self.err(field, "applies only with store.url (PostgreSQL)"));
                    }
                }
                return Ok(StoreSettings::Sqlite {
                    path: self.path(&path),
                });
            }
            (None, Some(url)) => url,
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "store.url",
                    "set path (SQLite) or url (PostgreSQL), not both",
                ))
            }
            (None, None) => {
                return Err(self.err(
                    "store.path",
                    "set path (an SQLite file) or url (a PostgreSQL database)",
                ))
            }
        };
        let parsed =
            crate::store::postgres::parse_url(&url).map_err(|why| self.err("store.url", why))?;
        let password = match (raw.password_file, raw.password_env) {
            (Some(file), None) => {
                let file = self.path(&file);
                let mut handle = self.open_secret("store.password_file", &file)?;
                let text = self.read_secret("store.password_file", &file, &mut handle)?;
                if readable_by_others(&file) {
                    self.warnings.borrow_mut().push(format!(
                        "the database password file {} is readable by other users; chmod 600 it",
                        file.display()
                    ));
                }
                let password =
                    self.secret_text("store.password_file", &file.display().to_string(), &text)?;
                Some(zeroize::Zeroizing::new(password.to_string()))
            }
            (None, Some(var)) => {
                let value = self.env_secret(env, "store.password_env", &var)?;
                let password = self.secret_text("store.password_env", &var, &value)?;
                Some(zeroize::Zeroizing::new(password.to_string()))
            }
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "store.password_file",
                    "set password_file or password_env, not both",
                ))
            }
            // Certificate or trust authentication: no password.
            (None, None) => None,
        };
        let ca_file = raw.ca_file.map(|f| self.path(&f));
        match (parsed.sslmode, &ca_file) {
            (crate::store::postgres::SslMode::VerifyFull, None) => {
                return Err(self.err(
                    "store.ca_file",
                    "sslmode=verify-full (the default) needs the CA of the server's certificate",
                ))
            }
            (crate::store::postgres::SslMode::VerifyFull, Some(ca)) => {
                let pem = std::fs::read(ca).map_err(|e| {
                    self.err(
                        "store.ca_file",
                        format!("cannot read {}: {e}", ca.display()),
                    )
                })?;
                crate::store::postgres::tls::RustlsConnect::new(&pem)
                    .map_err(|e| self.err("store.ca_file", format!("{}: {e}", ca.display())))?;
            }
            (crate::store::postgres::SslMode::Disable, Some(_)) => {
                return Err(self.err("store.ca_file", "set, but the url says sslmode=disable"))
            }
            (crate::store::postgres::SslMode::Disable, None) => {}
        }
        let bounded = |field: &str, value: Option<u64>, default: u64, max: u64| {
            let value = value.unwrap_or(default);
            if (1..=max).contains(&value) {
                Ok(value)
            } else {
                Err(self.err(field, format!("must be between 1 and {max}")))
            }
        };
        let pool_size = bounded("store.pool_size", raw.pool_size, 8, 256)?;
        let pool_wait = bounded("store.pool_wait_secs", raw.pool_wait_secs, 5, 300)?;
        let statement_timeout = bounded(
            "store.statement_timeout_secs",
            raw.statement_timeout_secs,
            5,
            300,
        )?;
        let lease = bounded(
            "store.reservation_lease_secs",
            raw.reservation_lease_secs,
            300,
            86_400,
        )?;
        if lease <= statement_timeout {
            // A request's commit may wait a whole statement timeout: by then
            // another replica may have written its opens as interrupted.
            self.warnings.borrow_mut().push(format!(
                "store.reservation_lease_secs ({lease}) is not longer than \
                 store.statement_timeout_secs ({statement_timeout}): a request whose audit \
                 commit waits that long may have its HSM opens swept as interrupted and then \
                 release nothing (503 store_unavailable); keep the lease above your slowest \
                 request (docs/configuration.md, the store)"
            ));
        }
        Ok(StoreSettings::Postgres(PgSettings {
            url,
            password,
            ca_file,
            pool_size: pool_size as usize,
            pool_wait: std::time::Duration::from_secs(pool_wait),
            statement_timeout: std::time::Duration::from_secs(statement_timeout),
            reservation_lease: std::time::Duration::from_secs(lease),
        }))
    }
}

/// What whoever could replace a file that decides who may do what, or runs
/// inside the daemon, could do ([`Validator::warn_if_replaceable`]).
pub(super) const CONTROLS: &str = "controls lavd";
/// What whoever could replace a PIN file could do.
pub(super) const PIN_HARM: &str = "could spend the token's login tries, or lock it";

#[cfg(unix)]
pub(super) fn readable_by_others(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(file).is_ok_and(|meta| meta.permissions().mode() & 0o004 != 0)
}

/// Why users other than root and this process's could replace `file`, if
/// they could, with what to do: the file (after symbolic links) is group-
/// or world-writable, or owned by another user; or a directory above it,
/// on the path as written (where a symbolic link may be swapped) or the
/// path it resolves to, is group- or world-writable without the sticky bit
/// (which keeps others from renaming or removing what they do not own), or
/// owned by another user; or a symbolic link on the path as written is
/// owned by another user. The owner rules apply only when this process is
/// not root: run as root (an operator's CLI command, a container), it
/// cannot tell lavd's user from another. `None` when none holds, or when
/// the file cannot be looked at (the read that follows says why).
#[cfg(unix)]
pub(super) fn replaceable_by_others(file: &Path) -> Option<String> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let me = rustix::process::geteuid().as_raw();
    let foreign = |meta: &std::fs::Metadata| me != 0 && meta.uid() != 0 && meta.uid() != me;
    let writable = |meta: &std::fs::Metadata| meta.permissions().mode() & 0o022 != 0;
    let meta = std::fs::metadata(file).ok()?;
    if writable(&meta) {
        return Some("is writable by its group or by everyone: chmod go-w it".into());
    }
    if foreign(&meta) {
        return Some(format!(
            "is owned by another user (uid {}) than root or this process's (uid {me}): give \
             it to one of them",
            meta.uid()
        ));
    }
    let given = std::path::absolute(file).ok()?;
    // Symbolic links on the path as written: whoever owns one can point
    // it elsewhere.
    for link in given.ancestors() {
        let Ok(meta) = std::fs::symlink_metadata(link) else {
            continue;
        };
        if meta.file_type().is_symlink() && foreign(&meta) {
            return Some(format!(
                "is reached through the symbolic link {}, owned by another user (uid {}): give \
                 it to root or to this process's user",
                link.display(),
                meta.uid()
            ));
        }
    }
    let resolved = std::fs::canonicalize(file).ok()?;
    let mut dirs: Vec<&Path> = given.ancestors().skip(1).collect();
    dirs.extend(resolved.ancestors().skip(1));
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if writable(&meta) && meta.permissions().mode() & 0o1000 == 0 {
            return Some(format!(
                "is under {}, which its group or everyone may write to: chmod go-w that \
                 directory",
                dir.display()
            ));
        }
        if foreign(&meta) {
            return Some(format!(
                "is under {}, owned by another user (uid {}) than root or this process's (uid \
                 {me}): give it to one of them",
                dir.display(),
                meta.uid()
            ));
        }
    }
    None
}

#[cfg(not(unix))]
pub(super) fn replaceable_by_others(_: &Path) -> Option<String> {
    None
}

#[cfg(not(unix))]
pub(super) fn readable_by_others(_: &Path) -> bool {
    false
}

/// Whether two listeners would take the same address, which only one
/// can bind: the same port (not 0, which the kernel picks anew for each)
/// on the same address, or where one listens on every address that the
/// other's includes (`0.0.0.0` takes every IPv4 address, `[::]` every
/// address of both families, as Linux binds it by default, with
/// `net.ipv6.bindv6only` 0). An IPv4-mapped IPv6 address is its IPv4
/// address, as Linux binds it. One definition for the config, the
/// witness's config and `lavd dev`.
pub(crate) fn same_listener(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    let covers = |wide: std::net::IpAddr, other: std::net::IpAddr| {
        wide.is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() != 0 && a.port() == b.port() && (ia == ib || covers(ia, ib) || covers(ib, ia))
}

#[cfg(test)]
mod tests;
