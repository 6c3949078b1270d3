//! The `lavd serve` tables: `[server]`, `[tls]`, `[admin]`, `[roles]`,
//! `[limits]` and `[log]`. Every limit has a documented default
//! (docs/configuration.md) and a range outside which the file is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawAdmin, RawLimits, RawLog, RawPublicLog, RawServer, RawTls};
use super::{ConfigError, Validator};
use crate::api::identity::{Role, RoleMap};
use crate::envelope::EnvelopeLimits;
use crate::warrant::WarrantLimits;

/// `[server]`: the mutual-TLS API listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Where the API listens (`listen`, default `0.0.0.0:8443`).
    pub listen: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT
    /// (`shutdown_grace_secs`, default 30).
    pub shutdown_grace: Duration,
    /// Most threads doing blocking request work at once: store reads and
    /// commits, and waiting for a batch's HSM opens (`blocking_threads`,
    /// default 512, 4 to 4096). The HSM calls themselves run on one worker
    /// thread per `[hsm] sessions`, not on these.
    pub blocking_threads: usize,
}

/// `[admin]`: the plain-HTTP operations listener (`/healthz`, `/readyz`,
/// `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where it listens (`listen`, default `127.0.0.1:9090`).
    pub listen: SocketAddr,
}

/// `[audit.public]`: a listener that serves the log's tiles and checkpoint
/// (`/v1/log/…`) over TLS without asking for a client certificate, for an
/// oversight body that publishes the log. What that reveals is in
/// docs/THREAT_MODEL.md ("A public log").
#[derive(Debug, Clone, PartialEq)]
pub struct PublicLogSettings {
    /// Where it listens (`listen`, required).
    pub listen: SocketAddr,
    /// Most simultaneous connections (`max_connections`, default 256).
    pub max_connections: usize,
    /// Most simultaneous connections from one IPv4 address or IPv6 /64
    /// (`max_connections_per_ip`, default 32, at most `max_connections`);
    /// one more is closed before its handshake.
    pub max_connections_per_ip: usize,
    /// Sustained requests per second from one IP address
    /// (`rate_limit_per_second`, default 50).
    pub rate_limit_per_second: f64,
    /// Requests one IP address may make in a burst (`rate_limit_burst`,
    /// default 200: a mirror catching up fetches many tiles at once).
    pub rate_limit_burst: u32,
}

/// The lowest TLS version the API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (`min_version = "1.2"`), for clients that cannot do 1.3.
    Tls12,
    /// TLS 1.3 only (the default; PROTOCOL §1).
    Tls13,
}

/// `[tls]`: the server certificate and the client CAs. Files are read when
/// the server is built and again on every reload (SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM chain of the server certificate, leaf first (`cert`).
    pub cert: PathBuf,
    /// PEM private key of the server certificate (`key`).
    pub key: PathBuf,
    /// PEM bundles of the CAs that client certificates must chain to
    /// (`client_cas`, at least one).
    pub client_cas: Vec<PathBuf>,
    /// CRLs (PEM or DER) checked for every client certificate (`crls`).
    pub crls: Vec<PathBuf>,
    /// `min_version`, `"1.3"` (default) or `"1.2"`.
    pub min_version: TlsVersion,
    /// Accept a client certificate whose issuer has no configured CRL
    /// (`allow_unknown_revocation_status`, default false). Only meaningful
    /// when `crls` is not empty.
    pub allow_unknown_revocation_status: bool,
    /// Refuse clients when a CRL is past its `nextUpdate`
    /// (`enforce_crl_expiry`, default true): a stale CRL may miss revocations.
    pub enforce_crl_expiry: bool,
}

/// `[limits]`: bounds on what one client can make the daemon do.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request body; larger is refused with 413 `body_too_large`
    /// (`max_body_bytes`, default 1 MiB).
    pub max_body_bytes: usize,
    /// Most bytes of request bodies held at once, from the start of their
    /// read until their bytes are freed (`max_body_bytes_in_flight`,
    /// default 64 MiB, at least `max_body_bytes`); a body that does not fit
    /// is refused at once with 503 `server_busy`. The API keeps two such
    /// budgets, one for revocations (see
    /// [`crate::api::pipeline::BodyBudget`]).
    pub max_body_bytes_in_flight: usize,
    /// Largest request head (request line and headers); larger closes the
    /// connection with 431 (`max_header_bytes`, default 16 KiB).
    pub max_header_bytes: usize,
    /// Most envelopes in one unwrap request (`max_batch`, default 100).
    pub max_batch: usize,
    /// Most envelopes all unwrap requests work on at once; more wait
    /// (`max_envelopes_in_flight`, default 4096; see
    /// [`crate::unwrap::gate`]).
    pub max_envelopes_in_flight: usize,
    /// Largest warrant, the whole JWS JSON (`max_warrant_bytes`, default
    /// 256 KiB or `max_body_bytes` if that is smaller; at most
    /// `max_body_bytes`); larger is 413 `warrant_too_large`.
    pub max_warrant_bytes: usize,
    /// Most signatures in one warrant, each a verification
    /// (`max_warrant_signatures`, default 16); more is 413
    /// `warrant_too_large`.
    pub max_warrant_signatures: usize,
    /// Largest envelope JSON (`max_envelope_bytes`, default and least
    /// [`crate::envelope::MIN_ENVELOPE_BOUND`]).
    pub max_envelope_bytes: usize,
    /// Largest envelope header as sent (`max_envelope_header_bytes`,
    /// default and least [`crate::envelope::MIN_HEADER_BOUND`]; the
    /// envelope bound must carry it,
    /// [`crate::envelope::envelope_bound_for_header`]).
    pub max_envelope_header_bytes: usize,
    /// The TLS handshake must finish within this (`handshake_timeout_secs`,
    /// default 10).
    pub handshake_timeout: Duration,
    /// A request head must arrive within this once its first byte has
    /// (`header_read_timeout_secs`, default 10).
    pub header_read_timeout: Duration,
    /// A request body must arrive within this once its head has
    /// (`body_read_timeout_secs`, default 30); else 408 `request_timeout`.
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this
    /// (`idle_timeout_secs`, default 60).
    pub idle_timeout: Duration,
    /// Most simultaneous API connections; more wait in the listen backlog
    /// (`max_connections`, default 1024).
    pub max_connections: usize,
    /// Most simultaneous connections from one IPv4 address or IPv6 /64
    /// (`max_connections_per_ip`, default `max_connections`, i.e. no bound
    /// of its own): one more is closed before its handshake, so that
    /// whoever can reach the port from one address cannot hold every slot.
    pub max_connections_per_ip: usize,
    /// Sustained requests per second allowed to one identity
    /// (`rate_limit_per_second`, default 20).
    pub rate_limit_per_second: f64,
    /// Requests one identity may make in a burst (`rate_limit_burst`,
    /// default 40).
    pub rate_limit_burst: u32,
}

impl Limits {
    /// The warrant bounds, for the verifier.
    pub fn warrant(&self) -> WarrantLimits {
        WarrantLimits {
            max_warrant_bytes: self.max_warrant_bytes,
            max_signatures: self.max_warrant_signatures,
        }
    }

    /// The envelope bounds, for parsing each envelope of a request.
    pub fn envelope(&self) -> EnvelopeLimits {
        EnvelopeLimits {
            max_envelope_bytes: self.max_envelope_bytes,
            max_header_bytes: self.max_envelope_header_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_body_bytes_in_flight: 64 << 20,
            max_header_bytes: 16 << 10,
            max_batch: 100,
            max_envelopes_in_flight: 4096,
            max_warrant_bytes: WarrantLimits::default().max_warrant_bytes,
            max_warrant_signatures: WarrantLimits::default().max_signatures,
            max_envelope_bytes: EnvelopeLimits::default().max_envelope_bytes,
            max_envelope_header_bytes: EnvelopeLimits::default().max_header_bytes,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_connections_per_ip: 1024,
            rate_limit_per_second: 20.0,
            rate_limit_burst: 40,
        }
    }
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event (`format = "human"`, the default).
    Human,
    /// One JSON object per line, with the request span's fields
    /// (`format = "json"`), for log shippers.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `format`.
    pub format: LogFormat,
    /// A `tracing` filter directive (`level`, default `info`); the
    /// `LAVD_LOG` environment variable overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Tokio's own default for its blocking pool, kept as lavd's.
const DEFAULT_BLOCKING_THREADS: usize = 512;

impl Validator<'_> {
    fn socket_addr(
        &self,
        field: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let text = value.unwrap_or_else(|| default.to_string());
        text.parse().map_err(|_| {
            self.err(
                field,
                format!("{text:?} is not an IP address and port, e.g. 127.0.0.1:9090 or [::]:8443"),
            )
        })
    }

    fn secs(
        &self,
        field: &str,
        value: Option<u64>,
        default: Duration,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
            Some(_) => Err(self.err(field, format!("must be between 1 and {max} seconds"))),
        }
    }

    fn count(
        &self,
        field: &str,
        value: Option<u64>,
        default: usize,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if range.contains(&n) => usize::try_from(n)
                .map_err(|_| self.err(field, "does not fit this platform's address size")),
            Some(_) => Err(self.err(
                field,
                format!("must be between {} and {}", range.start(), range.end()),
            )),
        }
    }

    pub(super) fn server(&self, raw: RawServer) -> Result<ServerSettings, ConfigError> {
        Ok(ServerSettings {
            listen: self.socket_addr("server.listen", raw.listen, DEFAULT_LISTEN)?,
            shutdown_grace: self.secs(
                "server.shutdown_grace_secs",
                raw.shutdown_grace_secs,
                Duration::from_secs(30),
                3600,
            )?,
            blocking_threads: self.count(
                "server.blocking_threads",
                raw.blocking_threads,
                DEFAULT_BLOCKING_THREADS,
                4..=4096,
            )?,
        })
    }

    pub(super) fn admin(&self, raw: RawAdmin) -> Result<AdminSettings, ConfigError> {
        let listen = self.socket_addr("admin.listen", raw.listen, DEFAULT_ADMIN_LISTEN)?;
        if !listen.ip().is_loopback() {
            self.warnings.borrow_mut().push(format!(
                "admin.listen {listen} is not a loopback address: /metrics, /readyz and \
                 /healthz answer anyone who can reach it, over plain HTTP without \
                 authentication; restrict it (a firewall, or the Kubernetes NetworkPolicy)"
            ));
        }
        Ok(AdminSettings { listen })
    }

    pub(super) fn public_log(&self, raw: RawPublicLog) -> Result<PublicLogSettings, ConfigError> {
        let max_connections = self.count(
            "audit.public.max_connections",
            raw.max_connections,
            256,
            1..=100_000,
        )?;
        Ok(PublicLogSettings {
            listen: self.socket_addr("audit.public.listen", Some(raw.listen), DEFAULT_LISTEN)?,
            max_connections,
            max_connections_per_ip: self.per_ip_connections(
                "audit.public.max_connections_per_ip",
                raw.max_connections_per_ip,
                32.min(max_connections),
                max_connections,
                "audit.public.max_connections",
            )?,
            rate_limit_per_second: self.rate(
                "audit.public.rate_limit_per_second",
                raw.rate_limit_per_second,
                50.0,
            )?,
            rate_limit_burst: self.burst(
                "audit.public.rate_limit_burst",
                raw.rate_limit_burst,
                200,
            )?,
        })
    }

    pub(super) fn tls(&self, raw: RawTls) -> Result<TlsSettings, ConfigError> {
        if raw.client_cas.is_empty() {
            return Err(self.err(
                "tls.client_cas",
                "list at least one PEM bundle of client CAs: every API client must present a \
                 certificate that chains to one",
            ));
        }
        let min_version = self.tls_version(raw.min_version.as_deref())?;
        let key = self.tls_key(&raw.key);
        Ok(TlsSettings {
            cert: self.path(&raw.cert),
            key,
            client_cas: raw.client_cas.iter().map(|p| self.path(p)).collect(),
            crls: raw.crls.iter().map(|p| self.path(p)).collect(),
            min_version,
            allow_unknown_revocation_status: raw.allow_unknown_revocation_status.unwrap_or(false),
            enforce_crl_expiry: raw.enforce_crl_expiry.unwrap_or(true),
        })
    }

    /// `tls.key`, resolved against the file, with a warning when other
    /// users can read it (lavd's listener and the witness's alike).
    pub(super) fn tls_key(&self, raw: &Path) -> PathBuf {
        let key = self.path(raw);
        if super::readable_by_others(&key) {
            self.warnings.borrow_mut().push(format!(
                "the TLS private key {} is readable by other users; chmod 600 it",
                key.display()
            ));
        }
        key
    }

    /// `tls.min_version`: `"1.3"` (the default) or `"1.2"`.
    pub(super) fn tls_version(&self, raw: Option<&str>) -> Result<TlsVersion, ConfigError> {
        match raw {
            None | Some("1.3") => Ok(TlsVersion::Tls13),
            Some("1.2") => Ok(TlsVersion::Tls12),
            Some(other) => Err(self.err(
                "tls.min_version",
                format!("{other:?} is not \"1.3\" or \"1.2\""),
            )),
        }
    }

    pub(super) fn roles(&self, raw: BTreeMap<String, Vec<String>>) -> Result<RoleMap, ConfigError> {
        let mut map = BTreeMap::new();
        for (identity, names) in raw {
            let field = format!("roles.{identity:?}");
            // The rule the certificate side applies (api::identity::uri_san):
            // an identity that no certificate can carry is a typo.
            if let Err(why) = crate::bounds::identity(&identity) {
                return Err(self.err(
                    &field,
                    format!(
                        "the identity {why}; an identity is a certificate's URI SAN, \
                         e.g. spiffe://agency.example/lea"
                    ),
                ));
            }
            if names.is_empty() {
                return Err(self.err(&field, "list at least one role, or remove the entry"));
            }
            let mut roles = BTreeSet::new();
            for name in &names {
                let role = Role::parse(name).ok_or_else(|| {
                    self.err(
                        &field,
                        format!(
                            "unknown role {name:?}; roles are provider, agency, auditor, admin"
                        ),
                    )
                })?;
                if !roles.insert(role) {
                    return Err(self.err(&field, format!("role {name:?} is listed twice")));
                }
            }
            // A provider puts its identity in every envelope header it
            // seals (PROTOCOL §3), whose `provider` field has one bound
            // (`bounds::provider`): a longer identity would seal envelopes
            // lavd refuses, their keys unopenable for good.
            if roles.contains(&Role::Provider) && identity.len() > crate::bounds::MAX_PROVIDER_BYTES
            {
                return Err(self.err(
                    &field,
                    format!(
                        "an identity with the provider role is at most {} bytes (it is {}): \
                         providers write it in every envelope header, whose provider field \
                         holds no more",
                        crate::bounds::MAX_PROVIDER_BYTES,
                        identity.len()
                    ),
                ));
            }
            map.insert(identity, roles);
        }
        Ok(RoleMap::new(map))
    }

    pub(super) fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let rate = self.rate(
            "limits.rate_limit_per_second",
            raw.rate_limit_per_second,
            d.rate_limit_per_second,
        )?;
        let burst = self.burst(
            "limits.rate_limit_burst",
            raw.rate_limit_burst,
            d.rate_limit_burst,
        )?;
        let max_connections = self.count(
            "limits.max_connections",
            raw.max_connections,
            d.max_connections,
            1..=100_000,
        )?;
        let max_body_bytes = self.count(
            "limits.max_body_bytes",
            raw.max_body_bytes,
            d.max_body_bytes,
            1024..=(64 << 20),
        )?;
        let max_body_bytes_in_flight = self.count(
            "limits.max_body_bytes_in_flight",
            raw.max_body_bytes_in_flight,
            d.max_body_bytes_in_flight,
            1024..=(64 << 30),
        )?;
        if max_body_bytes_in_flight < max_body_bytes {
            return Err(self.err(
                "limits.max_body_bytes_in_flight",
                format!(
                    "must be at least limits.max_body_bytes ({max_body_bytes}): a body of that \
                     size could never be read"
                ),
            ));
        }
        // Unset, it follows a smaller max_body_bytes down.
        let max_warrant_bytes = self.count(
            "limits.max_warrant_bytes",
            raw.max_warrant_bytes,
            d.max_warrant_bytes.min(max_body_bytes),
            1024..=(16 << 20),
        )?;
        if max_warrant_bytes > max_body_bytes {
            return Err(self.err(
                "limits.max_warrant_bytes",
                "must not exceed limits.max_body_bytes, which bounds the request that carries it",
            ));
        }
        // Not below what a PROTOCOL-valid envelope may need: a lower bound
        // would deny envelopes whose keys could then never be opened.
        let max_envelope_bytes = self.count(
            "limits.max_envelope_bytes",
            raw.max_envelope_bytes,
            d.max_envelope_bytes,
            crate::envelope::MIN_ENVELOPE_BOUND as u64..=(64 << 10),
        )?;
        let max_envelope_header_bytes = self.count(
            "limits.max_envelope_header_bytes",
            raw.max_envelope_header_bytes,
            d.max_envelope_header_bytes,
            crate::envelope::MIN_HEADER_BOUND as u64..=crate::envelope::MAX_HEADER_BOUND as u64,
        )?;
        // The header travels in the envelope as base64url: a header bound
        // the envelope bound cannot carry would be a promise never kept.
        let needed = crate::envelope::envelope_bound_for_header(max_envelope_header_bytes);
        if needed > max_envelope_bytes {
            return Err(self.err(
                "limits.max_envelope_header_bytes",
                format!(
                    "a header of {max_envelope_header_bytes} bytes needs limits.max_envelope_bytes \
                     of at least {needed} (its base64url, and {} for the rest of the envelope); \
                     it is {max_envelope_bytes}",
                    crate::envelope::ENVELOPE_ALLOWANCE
                ),
            ));
        }
        Ok(Limits {
            max_body_bytes,
            max_body_bytes_in_flight,
            max_warrant_bytes,
            max_warrant_signatures: self.count(
                "limits.max_warrant_signatures",
                raw.max_warrant_signatures,
                d.max_warrant_signatures,
                1..=64,
            )?,
            max_envelope_bytes,
            max_envelope_header_bytes,
            max_header_bytes: self.count(
                "limits.max_header_bytes",
                raw.max_header_bytes,
                d.max_header_bytes,
                1024..=(1 << 20),
            )?,
            max_batch: self.count("limits.max_batch", raw.max_batch, d.max_batch, 1..=10_000)?,
            max_envelopes_in_flight: self.count(
                "limits.max_envelopes_in_flight",
                raw.max_envelopes_in_flight,
                d.max_envelopes_in_flight,
                1..=10_000_000,
            )?,
            handshake_timeout: self.secs(
                "limits.handshake_timeout_secs",
                raw.handshake_timeout_secs,
                d.handshake_timeout,
                300,
            )?,
            header_read_timeout: self.secs(
                "limits.header_read_timeout_secs",
                raw.header_read_timeout_secs,
                d.header_read_timeout,
                300,
            )?,
            body_read_timeout: self.secs(
                "limits.body_read_timeout_secs",
                raw.body_read_timeout_secs,
                d.body_read_timeout,
                3600,
            )?,
            idle_timeout: self.secs(
                "limits.idle_timeout_secs",
                raw.idle_timeout_secs,
                d.idle_timeout,
                3600,
            )?,
            max_connections,
            max_connections_per_ip: self.per_ip_connections(
                "limits.max_connections_per_ip",
                raw.max_connections_per_ip,
                max_connections,
                max_connections,
                "limits.max_connections",
            )?,
            rate_limit_per_second: rate,
            rate_limit_burst: burst,
        })
    }

    /// A token bucket's sustained rate, requests per second: the one
    /// definition of its bounds for every listener.
    fn rate(&self, field: &str, value: Option<f64>, default: f64) -> Result<f64, ConfigError> {
        match value {
            None => Ok(default),
            // At least one request in 1000 s: below that, the wait a refusal
            // names would not fit a `Duration`.
            Some(r) if r.is_finite() && (0.001..=1e6).contains(&r) => Ok(r),
            Some(_) => Err(self.err(field, "must be a number from 0.001 to 1000000")),
        }
    }

    /// A token bucket's burst, requests: the one definition of its bounds
    /// for every listener, as [`Self::rate`] is of its rate.
    fn burst(&self, field: &str, value: Option<u64>, default: u32) -> Result<u32, ConfigError> {
        let n = self.count(field, value, default as usize, 1..=1_000_000)?;
        u32::try_from(n).map_err(|_| self.err(field, "too large"))
    }

    /// A per-address connection bound: 1 to `max` (the listener's own
    /// bound, named `max_field`), `default` when unset.
    fn per_ip_connections(
        &self,
        field: &str,
        value: Option<u64>,
        default: usize,
        max: usize,
        max_field: &str,
    ) -> Result<usize, ConfigError> {
        let n = self.count(field, value, default, 1..=100_000)?;
        if n > max {
            return Err(self.err(
                field,
                format!(
                    "must not exceed {max_field} ({max}), the bound on all connections; it is {n}"
                ),
            ));
        }
        Ok(n)
    }

    pub(super) fn log(&self, raw: RawLog) -> Result<LogSettings, ConfigError> {
        let d = LogSettings::default();
        let format = match raw.format.as_deref() {
            None | Some("human") => LogFormat::Human,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(self.err(
                    "log.format",
                    format!("{other:?} is not \"human\" or \"json\""),
                ))
            }
        };
        let level = raw.level.unwrap_or(d.level);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            return Err(self.err(
                "log.level",
                format!("{level:?} is not a tracing filter (e.g. info, or lavd=debug,warn): {e}"),
            ));
        }
        Ok(LogSettings { format, level })
    }
}
