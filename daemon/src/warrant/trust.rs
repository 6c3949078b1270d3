//! The trust store: which authorities may sign warrants, with which keys, and
//! how many of each role a warrant needs (PROTOCOL §4).
//!
//! Configuration (TOML, unknown keys refused; the same sections are embedded
//! in the daemon's config file and used alone by `lavd warrant inspect --trust`):
//!
//! ```toml
//! [[authorities]]
//! kid = "executive-1"              # the JWS `kid` this authority signs with
//! role = "executive"               # free text; the policy counts roles
//! alg = "ES256"                    # `ES256` (P-256) or `EdDSA` (Ed25519)
//! # The public key: exactly one of
//! jwk = { kty = "EC", crv = "P-256", x = "…", y = "…" }   # inline table, or
//! # jwk = '{"kty":"EC","crv":"P-256","x":"…","y":"…"}'   # the JWK as a JSON string, or
//! # pem_file = "authorities/executive-1.pem"             # SubjectPublicKeyInfo PEM,
//! #                                      relative to the config file's directory
//! valid_from = "2026-01-01T00:00:00Z"  # RFC 3339 UTC, quoted (a string)
//! valid_until = "2028-01-01T00:00:00Z" # exclusive
//!
//! [policy]
//! [[policy.require]]
//! role = "executive"
//! count = 1
//! [[policy.require]]
//! role = "judicial"
//! count = 1
//!
//! [policy.emergency]                 # optional: the urgent procedure
//! max_hours = 72                     # usable for at most this long after `not_before`
//! [[policy.emergency.require]]
//! role = "executive"
//! count = 1
//! ```
//!
//! A JWK given here must be public (no `d`); if it carries `kid`, `alg` or
//! `use`, they must agree with the entry (`use` = `sig`). Validation refuses
//! policies that could never be met (a role with fewer configured authorities
//! than its count) and an empty `require` list (which would accept unsigned
//! warrants).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{ParsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519};
use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use time::OffsetDateTime;

use super::jws::Algorithm;
use crate::codec::{format_time, parse_time};
use crate::jwk::{Ed25519PublicKey, Jwk, P256PublicKey};

/// Longest emergency usability, in hours (30 days): beyond that it is not urgent.
pub const MAX_EMERGENCY_HOURS: u32 = 720;

/// A trust configuration that cannot be used. Its code is the
/// configuration's, `bad_config` (exit 64): inside the daemon's config it
/// becomes a [`crate::config::ConfigError`] naming the field, and a trust
/// file given alone (`lavd warrant inspect --trust`) exits the same way.
#[derive(Debug, thiserror::Error)]
pub enum TrustConfigError {
    /// The TOML does not parse or has the wrong shape (unknown key, wrong
    /// type); the message names the key and line.
    #[error("trust config: {0}")]
    Toml(String),
    /// A value is out of range or inconsistent; `field` is its path, e.g.
    /// `authorities[1].jwk` or `policy.require[0].count`.
    #[error("trust config: `{field}`: {reason}")]
    Invalid {
        /// Path of the offending field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A file the config names (a PEM key, or the config itself) cannot be read.
    #[error("trust config: cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> TrustConfigError {
    TrustConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The `[[authorities]]` and `[policy]` sections as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// The authorities that may sign.
    pub authorities: Vec<AuthorityConfig>,
    /// What a warrant needs.
    pub policy: PolicyConfig,
}

/// One `[[authorities]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityConfig {
    /// JWS `kid`.
    pub kid: String,
    /// Role counted by the policy.
    pub role: String,
    /// Who holds the key: a person or an office. Authorities with one
    /// holder count once, as the old and the new key of a rotation whose
    /// validities overlap must. Absent, the `kid`.
    #[serde(default)]
    pub holder: Option<String>,
    /// `ES256` or `EdDSA`.
    pub alg: String,
    /// Public key as a JWK (inline table or JSON string).
    #[serde(default)]
    pub jwk: Option<JwkSource>,
    /// Public key as a SubjectPublicKeyInfo PEM file.
    #[serde(default)]
    pub pem_file: Option<PathBuf>,
    /// Start of validity, RFC 3339 UTC.
    pub valid_from: String,
    /// End of validity (exclusive), RFC 3339 UTC.
    pub valid_until: String,
}

/// A JWK given either as a TOML inline table or as a JSON string.
#[derive(Debug, Clone)]
pub struct JwkSource(pub Jwk);

impl<'de> Deserialize<'de> for JwkSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JwkSource;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JWK as an inline table or a JSON string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<JwkSource, E> {
                Jwk::from_json(v.as_bytes())
                    .map(JwkSource)
                    .map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<JwkSource, A::Error> {
                Jwk::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(JwkSource)
            }
        }
        d.deserialize_any(V)
    }
}

/// `[policy]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Distinct authorities needed per role.
    pub require: Vec<RoleRuleConfig>,
    /// The optional urgent procedure.
    #[serde(default)]
    pub emergency: Option<EmergencyConfig>,
}

/// One `[[policy.require]]` rule as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRuleConfig {
    /// The role.
    pub role: String,
    /// How many distinct authorities of it must sign.
    pub count: u32,
}

/// `[policy.emergency]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmergencyConfig {
    /// Distinct authorities needed per role for an urgent warrant.
    pub require: Vec<RoleRuleConfig>,
    /// Hours after `not_before` during which an urgent warrant is usable.
    pub max_hours: u32,
}

/// A configured authority's verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorityPublicKey {
    /// ES256.
    P256(P256PublicKey),
    /// EdDSA.
    Ed25519(Ed25519PublicKey),
}

/// A validated authority.
pub struct Authority {
    kid: String,
    role: String,
    holder: String,
    alg: Algorithm,
    key: AuthorityPublicKey,
    parsed: ParsedPublicKey,
    valid_from: OffsetDateTime,
    valid_until: OffsetDateTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("kid", &self.kid)
            .field("role", &self.role)
            .field("holder", &self.holder)
            .field("alg", &self.alg)
            .field("key", &self.key)
            .field("valid_from", &format_time(self.valid_from))
            .field("valid_until", &format_time(self.valid_until))
            .finish()
    }
}

impl Authority {
    /// The JWS `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }
    /// The role the policy counts.
    pub fn role(&self) -> &str {
        &self.role
    }
    /// Who holds the key (the `kid` unless configured): the policy counts
    /// each holder once.
    pub fn holder(&self) -> &str {
        &self.holder
    }
    /// The one algorithm this authority signs with.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }
    /// The public key.
    pub fn key(&self) -> &AuthorityPublicKey {
        &self.key
    }
    /// Start of validity.
    pub fn valid_from(&self) -> OffsetDateTime {
        self.valid_from
    }
    /// End of validity (exclusive).
    pub fn valid_until(&self) -> OffsetDateTime {
        self.valid_until
    }
    /// Whether `now` lies in `[valid_from, valid_until)`.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.valid_from <= now && now < self.valid_until
    }
    /// Verifies a signature made with this authority's key. ES256 signatures
    /// are the fixed 64-byte `r ‖ s` (RFC 7518 §3.4), never DER.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        self.parsed.verify_sig(message, signature).is_ok()
    }
}

/// Distinct authorities of `role` that must sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRule {
    /// The role.
    pub role: String,
    /// How many distinct authorities.
    pub count: usize,
}

/// The urgent procedure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmergencyRule {
    /// What an urgent warrant needs.
    pub require: Vec<RoleRule>,
    /// How long after `not_before` it is usable.
    pub max_hours: u32,
}

/// The validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What every ordinary warrant needs.
    pub require: Vec<RoleRule>,
    /// The urgent procedure, if allowed.
    pub emergency: Option<EmergencyRule>,
}

impl Policy {
    /// The most signatures a warrant that meets the policy must carry: the
    /// ordinary rule's, or the urgent procedure's if it needs more. A
    /// signature bound below it would refuse every such warrant.
    pub fn signatures_needed(&self) -> usize {
        let sum = |rules: &[RoleRule]| rules.iter().map(|r| r.count).sum::<usize>();
        sum(&self.require).max(self.emergency.as_ref().map_or(0, |e| sum(&e.require)))
    }
}

/// Validated authorities and policy; the [`super::Verifier`]'s only input
/// besides the warrant.
#[derive(Debug)]
pub struct TrustStore {
    authorities: BTreeMap<String, Authority>,
    policy: Policy,
}

impl TrustStore {
    /// Parses and validates a TOML trust config; relative `pem_file` paths are
    /// resolved against `base_dir`.
    ///
    /// # Errors
    /// Any [`TrustConfigError`], naming the field.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Self, TrustConfigError> {
        let toml_err = |e: toml::de::Error| TrustConfigError::Toml(e.to_string());
        let mut doc: toml::Table = toml::from_str(text).map_err(toml_err)?;
        // A daemon config (it has `[hsm]`) also works: only its
        // `[[authorities]]` and `[policy]` are read, so `lavd warrant inspect
        // --trust /etc/lavd/lavd.toml` checks against what the daemon trusts.
        // A dedicated trust file stays strict: an unknown key is refused.
        if doc.contains_key("hsm") {
            doc.retain(|k, _| k == "authorities" || k == "policy");
        }
        let config: TrustConfig = toml::Value::Table(doc).try_into().map_err(toml_err)?;
        config.validate(base_dir)
    }

    /// Reads and validates a TOML trust config file.
    ///
    /// # Errors
    /// Any [`TrustConfigError`].
    pub fn load(path: &Path) -> Result<Self, TrustConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrustConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, base)
    }

    /// The authority with this `kid`.
    pub fn authority(&self, kid: &str) -> Option<&Authority> {
        self.authorities.get(kid)
    }

    /// All authorities, ordered by `kid` (for the "authorities loaded" audit leaf).
    pub fn authorities(&self) -> impl Iterator<Item = &Authority> {
        self.authorities.values()
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

impl TrustConfig {
    /// Checks every field and builds the typed [`TrustStore`].
    ///
    /// # Errors
    /// [`TrustConfigError::Invalid`] naming the field and the reason;
    /// [`TrustConfigError::Io`] for an unreadable PEM file.
    pub fn validate(&self, base_dir: &Path) -> Result<TrustStore, TrustConfigError> {
        let mut authorities = BTreeMap::new();
        // Each key once: one key holder configured under two kids would
        // count as two authorities and could meet a multi-party policy alone.
        let mut keys: Vec<(usize, String, AuthorityPublicKey)> = Vec::new();
        for (i, a) in self.authorities.iter().enumerate() {
            let authority = validate_authority(&format!("authorities[{i}]"), a, base_dir)?;
            if authorities.contains_key(&authority.kid) {
                return Err(invalid(
                    format!("authorities[{i}].kid"),
                    format!("`{}` is configured twice", authority.kid),
                ));
            }
            if let Some((j, other, _)) = keys.iter().find(|(_, _, k)| *k == authority.key) {
                return Err(invalid(
                    format!("authorities[{i}]"),
                    format!(
                        "`{}` has the same public key as `{other}` (authorities[{j}]): one key \
                         holder would count as two authorities; configure each key once",
                        authority.kid
                    ),
                ));
            }
            keys.push((i, authority.kid.clone(), authority.key.clone()));
            authorities.insert(authority.kid.clone(), authority);
        }
        // One holder, one role: a holder under two would be both locks.
        // In the file's order, so that the error names the later entry.
        let mut holders: BTreeMap<&str, (usize, &Authority)> = BTreeMap::new();
        for (i, a) in self.authorities.iter().enumerate() {
            let Some(a) = authorities.get(&a.kid) else {
                continue;
            };
            match holders.get(a.holder.as_str()) {
                Some((j, first)) if first.role != a.role => {
                    return Err(invalid(
                        format!("authorities[{i}].holder"),
                        format!(
                            "`{}` has role `{}` here and `{}` in authorities[{j}] (kid `{}`): \
                             one holder would count in two roles; give each holder one role",
                            a.holder, a.role, first.role, first.kid
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    holders.insert(&a.holder, (i, a));
                }
            }
        }
        // Each holder once: a rule needing more holders of a role than are
        // configured could never be met.
        let mut per_role: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, a) in holders.values() {
            *per_role.entry(a.role.as_str()).or_default() += 1;
        }
        let require = validate_rules("policy.require", &self.policy.require, &per_role)?;
        let emergency = match &self.policy.emergency {
            None => None,
            Some(e) => {
                if e.max_hours == 0 || e.max_hours > MAX_EMERGENCY_HOURS {
                    return Err(invalid(
                        "policy.emergency.max_hours",
                        format!("must be in 1..={MAX_EMERGENCY_HOURS}"),
                    ));
                }
                Some(EmergencyRule {
                    require: validate_rules("policy.emergency.require", &e.require, &per_role)?,
                    max_hours: e.max_hours,
                })
            }
        };
        Ok(TrustStore {
            authorities,
            policy: Policy { require, emergency },
        })
    }
}

fn validate_rules(
    field: &str,
    rules: &[RoleRuleConfig],
    per_role: &BTreeMap<&str, usize>,
) -> Result<Vec<RoleRule>, TrustConfigError> {
    if rules.is_empty() {
        return Err(invalid(
            field,
            "at least one rule is needed (an empty policy would accept unsigned warrants)",
        ));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(rules.len());
    for (i, r) in rules.iter().enumerate() {
        if !seen.insert(r.role.as_str()) {
            return Err(invalid(
                format!("{field}[{i}].role"),
                format!("role `{}` has two rules", r.role),
            ));
        }
        if r.count == 0 {
            return Err(invalid(format!("{field}[{i}].count"), "must be at least 1"));
        }
        let count = r.count as usize;
        let configured = per_role.get(r.role.as_str()).copied().unwrap_or(0);
        if configured < count {
            return Err(invalid(
                format!("{field}[{i}]"),
                format!(
                    "needs {count} `{}` authorities but {configured} are configured (counting \
                     each holder once): it could never be met",
                    r.role
                ),
            ));
        }
        out.push(RoleRule {
            role: r.role.clone(),
            count,
        });
    }
    Ok(out)
}

/// `rule` (one of `crate::bounds`, shared with the JWS header and the audit
/// leaves that record the name) as a config error naming `field`.
fn check_name(
    field: &str,
    value: &str,
    rule: fn(&str) -> Result<(), crate::bounds::BoundError>,
    max: usize,
) -> Result<(), TrustConfigError> {
    rule(value).map_err(|e| {
        invalid(
            field,
            format!("{e} (1 to {max} characters, no control characters or whitespace)"),
        )
    })
}

fn validate_authority(
    field: &str,
    a: &AuthorityConfig,
    base_dir: &Path,
) -> Result<Authority, TrustConfigError> {
    check_name(
        &format!("{field}.kid"),
        &a.kid,
        crate::bounds::authority_kid,
        crate::bounds::MAX_AUTHORITY_KID_CHARS,
    )?;
    check_name(
        &format!("{field}.role"),
        &a.role,
        crate::bounds::role,
        crate::bounds::MAX_ROLE_CHARS,
    )?;
    if let Some(holder) = &a.holder {
        check_name(
            &format!("{field}.holder"),
            holder,
            crate::bounds::authority_kid,
            crate::bounds::MAX_AUTHORITY_KID_CHARS,
        )?;
    }
    let alg = Algorithm::from_name(&a.alg)
        .map_err(|_| invalid(format!("{field}.alg"), "must be `ES256` or `EdDSA`"))?;
    let time = |name: &str, text: &str| {
        parse_time(text).map_err(|e| invalid(format!("{field}.{name}"), e.to_string()))
    };
    let valid_from = time("valid_from", &a.valid_from)?;
    let valid_until = time("valid_until", &a.valid_until)?;
    if valid_from >= valid_until {
        return Err(invalid(
            format!("{field}.valid_until"),
            "must be after `valid_from`",
        ));
    }
    let (key, key_field) = match (&a.jwk, &a.pem_file) {
        (Some(jwk), None) => {
            let key_field = format!("{field}.jwk");
            (key_from_jwk(&key_field, &jwk.0, a, alg)?, key_field)
        }
        (None, Some(path)) => {
            let key_field = format!("{field}.pem_file");
            let path = base_dir.join(path);
            let text = std::fs::read_to_string(&path)
                .map_err(|source| TrustConfigError::Io { path, source })?;
            (key_from_pem(&key_field, &text, alg)?, key_field)
        }
        _ => {
            return Err(invalid(
                field,
                "give the public key as exactly one of `jwk` and `pem_file`",
            ))
        }
    };
    if let AuthorityPublicKey::Ed25519(k) = &key {
        if let Some(why) = k.weakness() {
            return Err(invalid(key_field, format!("`{}`: {why}", a.kid)));
        }
    }
    let parsed = match &key {
        AuthorityPublicKey::P256(k) => ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, k.sec1()),
        AuthorityPublicKey::Ed25519(k) => ParsedPublicKey::new(&ED25519, k.bytes()),
    }
    .map_err(|_| invalid(field, "the public key is not usable for its algorithm"))?;
    Ok(Authority {
        kid: a.kid.clone(),
        role: a.role.clone(),
        holder: a.holder.clone().unwrap_or_else(|| a.kid.clone()),
        alg,
        key,
        parsed,
        valid_from,
        valid_until,
    })
}

fn key_from_jwk(
    field: &str,
    jwk: &Jwk,
    a: &AuthorityConfig,
    alg: Algorithm,
) -> Result<AuthorityPublicKey, TrustConfigError> {
    if jwk.d.is_some() {
        return Err(invalid(
            field,
            "contains a private key (`d`); configure the public JWK only",
        ));
    }
    if let Some(kid) = &jwk.kid {
        if kid != &a.kid {
            return Err(invalid(
                field,
                format!("JWK `kid` `{kid}` differs from `{}`", a.kid),
            ));
        }
    }
    if let Some(jwk_alg) = &jwk.alg {
        if jwk_alg != alg.name() {
            return Err(invalid(
                field,
                format!("JWK `alg` `{jwk_alg}` differs from `{alg}`"),
            ));
        }
    }
    if let Some(use_) = &jwk.use_ {
        if use_ != "sig" {
            return Err(invalid(
                field,
                format!("JWK `use` is `{use_}`, expected `sig`"),
            ));
        }
    }
    match alg {
        Algorithm::Es256 => P256PublicKey::from_jwk(jwk).map(AuthorityPublicKey::P256),
        Algorithm::EdDsa => Ed25519PublicKey::from_jwk(jwk).map(AuthorityPublicKey::Ed25519),
    }
    .map_err(|e| invalid(field, e.to_string()))
}

/// DER prefix of a P-256 SubjectPublicKeyInfo (RFC 5480: id-ecPublicKey,
/// secp256r1, 66-byte BIT STRING), followed by the 65-byte uncompressed point.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4: id-Ed25519,
/// parameters absent), followed by the 32-byte public key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Reads one `PUBLIC KEY` PEM block (RFC 7468 §13). DER is canonical, so a
/// key of the expected type has exactly the fixed prefix above.
fn key_from_pem(
    field: &str,
    text: &str,
    alg: Algorithm,
) -> Result<AuthorityPublicKey, TrustConfigError> {
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let (Some(&first), Some(&last)) = (lines.first(), lines.last()) else {
        return Err(invalid(field, "empty PEM file"));
    };
    if first != BEGIN || last != END || lines.len() < 3 {
        return Err(invalid(
            field,
            "expected exactly one `PUBLIC KEY` PEM block",
        ));
    }
    let body: String = lines[1..lines.len() - 1].concat();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| invalid(field, "PEM body is not base64"))?;
    let wrong = || invalid(field, format!("not a SubjectPublicKeyInfo for {alg}"));
    match alg {
        Algorithm::Es256 => {
            let point = der.strip_prefix(&P256_SPKI_PREFIX[..]).ok_or_else(wrong)?;
            P256PublicKey::from_sec1(point)
                .map(AuthorityPublicKey::P256)
                .map_err(|e| invalid(field, e.to_string()))
        }
        Algorithm::EdDsa => {
            let key = der
                .strip_prefix(&ED25519_SPKI_PREFIX[..])
                .ok_or_else(wrong)?;
            Ed25519PublicKey::from_bytes(key)
                .map(AuthorityPublicKey::Ed25519)
                .map_err(|e| invalid(field, e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwk::P256PrivateKey;
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::signature::KeyPair as _;

    fn p256_jwk_json() -> String {
        serde_json::to_string(&P256PrivateKey::generate().unwrap().public().to_jwk()).unwrap()
    }

    fn authority(kid: &str, role: &str) -> String {
        format!(
            "[[authorities]]\nkid = \"{kid}\"\nrole = \"{role}\"\nalg = \"ES256\"\njwk = '{}'\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n",
            p256_jwk_json()
        )
    }

    const DOUBLE_LOCK: &str = "[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n[[policy.require]]\nrole = \"judicial\"\ncount = 1\n";

    fn field_of(text: &str) -> String {
        match TrustStore::from_toml(text, Path::new(".")).unwrap_err() {
            TrustConfigError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn double_lock_config_validates() {
        let text = format!(
            "{}{}{DOUBLE_LOCK}",
            authority("exec-1", "executive"),
            authority("jud-1", "judicial")
        );
        let trust = TrustStore::from_toml(&text, Path::new(".")).unwrap();
        assert_eq!(trust.authorities().count(), 2);
        assert_eq!(trust.policy().require.len(), 2);
        assert!(trust.policy().emergency.is_none());
        assert_eq!(trust.authority("jud-1").unwrap().role(), "judicial");
    }

    /// The signatures a warrant must carry are the larger of the ordinary
    /// rule's and the urgent procedure's: a bound set from the ordinary
    /// rule alone would refuse every urgent warrant.
    #[test]
    fn signatures_needed_counts_the_larger_rule() {
        let text = format!(
            "{}{}{}[policy]\n[[policy.require]]\nrole = \"judicial\"\ncount = 1\n\
             [policy.emergency]\nmax_hours = 48\n[[policy.emergency.require]]\n\
             role = \"executive\"\ncount = 1\n[[policy.emergency.require]]\n\
             role = \"judicial\"\ncount = 2\n",
            authority("exec-1", "executive"),
            authority("jud-1", "judicial"),
            authority("jud-2", "judicial")
        );
        let trust = TrustStore::from_toml(&text, Path::new(".")).unwrap();
        assert_eq!(trust.policy().signatures_needed(), 3);
        let double = format!(
            "{}{}{DOUBLE_LOCK}",
            authority("exec-1", "executive"),
            authority("jud-1", "judicial")
        );
        let trust = TrustStore::from_toml(&double, Path::new(".")).unwrap();
        assert_eq!(trust.policy().signatures_needed(), 2);
    }

    #[test]
    fn inline_table_jwk_and_pem_file_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let ed = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        let spki = ed.public_key().as_der().unwrap();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(spki.as_ref())
        );
        std::fs::write(dir.path().join("jud.pem"), pem).unwrap();
        let ec = P256PrivateKey::generate().unwrap();
        let jwk = ec.public().to_jwk();
        let text = format!(
            "[[authorities]]\nkid = \"exec-1\"\nrole = \"executive\"\nalg = \"ES256\"\njwk = {{ kty = \"EC\", crv = \"P-256\", x = \"{}\", y = \"{}\", use = \"sig\" }}\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n\
             [[authorities]]\nkid = \"jud-1\"\nrole = \"judicial\"\nalg = \"EdDSA\"\npem_file = \"jud.pem\"\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n{DOUBLE_LOCK}",
            jwk.x.unwrap(),
            jwk.y.unwrap()
        );
        let path = dir.path().join("trust.toml");
        std::fs::write(&path, text).unwrap();
        let trust = TrustStore::load(&path).unwrap();
        assert_eq!(
            trust.authority("jud-1").unwrap().key(),
            &AuthorityPublicKey::Ed25519(
                Ed25519PublicKey::from_bytes(ed.public_key().as_ref()).unwrap()
            )
        );
        assert_eq!(
            trust.authority("exec-1").unwrap().key(),
            &AuthorityPublicKey::P256(ec.public().clone())
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let two = format!(
            "{}{}",
            authority("exec-1", "executive"),
            authority("jud-1", "judicial")
        );
        // Authority kids and roles follow the one rule of `crate::bounds`
        // that the audit leaves recording them follow: no whitespace.
        for (kid, role, field) in [
            ("judicial 3", "judicial", "authorities[1].kid"),
            ("jud-3", "high court", "authorities[1].role"),
            ("jud\u{a0}3", "judicial", "authorities[1].kid"),
        ] {
            let text = format!(
                "{}{}{DOUBLE_LOCK}",
                authority("exec-1", "executive"),
                authority(kid, role)
            );
            assert_eq!(field_of(&text), field, "{kid:?} {role:?}");
        }
        // A policy that could never be met.
        let text =
            format!("{two}{DOUBLE_LOCK}[[policy.require]]\nrole = \"parliament\"\ncount = 1\n");
        assert_eq!(field_of(&text), "policy.require[2]");
        // Empty policy.
        assert_eq!(
            field_of(&format!("{two}[policy]\nrequire = []\n")),
            "policy.require"
        );
        // Zero count.
        assert_eq!(
            field_of(&format!(
                "{two}[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 0\n"
            )),
            "policy.require[0].count"
        );
        // Duplicate kid.
        let dup = format!(
            "{}{}{DOUBLE_LOCK}",
            authority("exec-1", "executive"),
            authority("exec-1", "judicial")
        );
        assert_eq!(field_of(&dup), "authorities[1].kid");
        // Unknown algorithm.
        let bad_alg = two.replacen("ES256", "RS256", 1) + DOUBLE_LOCK;
        assert_eq!(field_of(&bad_alg), "authorities[0].alg");
        // Validity reversed.
        let reversed =
            two.replacen("2028-01-01T00:00:00Z", "2025-01-01T00:00:00Z", 1) + DOUBLE_LOCK;
        assert_eq!(field_of(&reversed), "authorities[0].valid_until");
        // Emergency hours out of range.
        let e = format!("{two}{DOUBLE_LOCK}[policy.emergency]\nmax_hours = 0\n[[policy.emergency.require]]\nrole = \"executive\"\ncount = 1\n");
        assert_eq!(field_of(&e), "policy.emergency.max_hours");
        // A private key in the trust config.
        let private =
            serde_json::to_string(&P256PrivateKey::generate().unwrap().to_private_jwk()).unwrap();
        let text = format!(
            "[[authorities]]\nkid = \"exec-1\"\nrole = \"executive\"\nalg = \"ES256\"\njwk = '{private}'\nvalid_from = \"2026-01-01T00:00:00Z\"\nvalid_until = \"2028-01-01T00:00:00Z\"\n[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n"
        );
        assert_eq!(field_of(&text), "authorities[0].jwk");
        // An EC key configured as EdDSA.
        let mismatched = two.replacen("ES256", "EdDSA", 1) + DOUBLE_LOCK;
        assert_eq!(field_of(&mismatched), "authorities[0].jwk");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!(
            "{}{DOUBLE_LOCK}colour = \"red\"\n",
            authority("exec-1", "executive")
        );
        assert!(matches!(
            TrustStore::from_toml(&text, Path::new(".")),
            Err(TrustConfigError::Toml(m)) if m.contains("colour")
        ));
    }
}
