//! The rustls side of the API listener: the server configuration (one
//! crypto provider, aws-lc-rs), the client-certificate verifier, and the
//! names under which handshake failures are counted.
//!
//! Choices, each failing closed:
//! - TLS 1.3 only unless `tls.min_version = "1.2"`;
//! - a client certificate is required and must chain to a configured client
//!   CA; with CRLs configured, a certificate whose status is unknown is
//!   refused (unless `allow_unknown_revocation_status`) and so is every
//!   certificate once a CRL is past its `nextUpdate` (unless
//!   `enforce_crl_expiry = false`);
//! - no session resumption: a resumed TLS session would skip the revocation
//!   and expiry checks of the client certificate, and one full handshake per
//!   keep-alive connection costs little;
//! - ALPN offers `http/1.1` only: the API is served by hyper's HTTP/1 server,
//!   which has the fewest moving parts to bound (no stream multiplexing).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{CertificateError, RootCertStore, ServerConfig};

use crate::config::{ConfigError, TlsSettings, TlsVersion};

/// The TLS material of one configuration generation.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// What the acceptor uses for new connections.
    pub server_config: Arc<ServerConfig>,
    /// The same certificate without client authentication, for the public
    /// log listener (`[audit.public]`).
    pub public_config: Arc<ServerConfig>,
    /// The same verifier as in `server_config`, kept to re-check the
    /// certificate of connections that outlive a reload.
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    /// Until when (seconds since the Unix epoch) a chain that passed
    /// [`TlsMaterial::recheck`] keeps passing as far as the CRLs go: the
    /// earliest `nextUpdate` of the configured CRLs; `u64::MAX` without CRLs
    /// or when none has a `nextUpdate` (a CRL lavd cannot read is refused at
    /// load).
    pub crls_valid_until: u64,
    /// What each configured CRL covers and until when it counts: what the
    /// next reload weighs a CRL past its `nextUpdate` against ([`load`]).
    pub crl_coverage: Vec<CrlCoverage>,
    /// `tls.min_version = "1.2"`: TLS 1.2 is accepted. A connection made
    /// with it under an earlier configuration is refused at its next
    /// request once it is not ([`TlsMaterial::recheck`]).
    pub accepts_tls12: bool,
}

/// The certificates one configured CRL covers, and until when it counts.
#[derive(Debug, Clone)]
pub struct CrlCoverage {
    issuer: Vec<u8>,
    scope: super::identity::CrlScope,
    /// Its `nextUpdate` (seconds since the Unix epoch) under
    /// `enforce_crl_expiry`; `None` when it counts for ever (it has none,
    /// or the expiry is not enforced).
    counts_until: Option<u64>,
    /// Its `thisUpdate` (seconds since the Unix epoch).
    this_update: u64,
    /// Its cRLNumber, if it has one.
    number: Option<super::identity::CrlNumber>,
    /// The file it came from.
    path: std::path::PathBuf,
}

impl CrlCoverage {
    /// Why this CRL is older than `running`, a CRL of the same issuer and
    /// scope: a lower cRLNumber (RFC 5280 §5.2.3: it only increases for one
    /// issuer and scope), or, without both numbers, an earlier
    /// `thisUpdate`. `None` when it is not older.
    fn older_than(&self, running: &CrlCoverage) -> Option<String> {
        if self.issuer != running.issuer || self.scope != running.scope {
            return None;
        }
        match (&self.number, &running.number) {
            (Some(new), Some(old)) => {
                (new < old).then(|| format!("cRLNumber {new}, the running one's {old}"))
            }
            _ => (self.this_update < running.this_update).then(|| {
                format!(
                    "thisUpdate {}, the running one's {}",
                    time_text(self.this_update),
                    time_text(running.this_update)
                )
            }),
        }
    }
}

/// Whether two CRLs of one issuer cover no certificate in common: one
/// covers only end-entity certificates, the other only CA certificates.
fn disjoint(a: super::identity::CrlScope, b: super::identity::CrlScope) -> bool {
    use super::identity::CrlScope;
    matches!(
        (a, b),
        (CrlScope::UserCerts, CrlScope::CaCerts) | (CrlScope::CaCerts, CrlScope::UserCerts)
    )
}

/// The one crypto provider of the process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads the files `tls` names and builds the server configuration.
///
/// # Errors
/// [`ConfigError`] naming the `tls.*` field whose file is missing, empty or
/// not what it should be, with `config_file` as the file.
///
/// `running` is the running configuration's material at a reload, `None` at
/// the start.
pub fn load(
    tls: &TlsSettings,
    config_file: &Path,
    running: Option<&TlsMaterial>,
) -> Result<TlsMaterial, ConfigError> {
    let err = |field: &str, reason: String| file_error(config_file, field, reason);
    let read = |field: &str, path: &Path| read_file(config_file, field, path);

    let (chain, key) = read_identity(&tls.cert, &tls.key, config_file)?;

    let mut roots = RootCertStore::empty();
    // Each client CA's key, for the CRLs' signatures.
    let mut ca_keys: Vec<(&Path, super::identity::CaKey)> = Vec::new();
    for path in &tls.client_cas {
        let pem = read("tls.client_cas", path)?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                err(
                    "tls.client_cas",
                    format!("{}: bad PEM: {e}", path.display()),
                )
            })?;
            if let Ok(key) = super::identity::ca_key(cert.as_ref()) {
                ca_keys.push((path, key));
            }
            roots.add(cert).map_err(|e| {
                err(
                    "tls.client_cas",
                    format!("{}: not a usable CA certificate: {e}", path.display()),
                )
            })?;
            n += 1;
        }
        if n == 0 {
            return Err(err(
                "tls.client_cas",
                format!("{} holds no CERTIFICATE block", path.display()),
            ));
        }
    }

    // Each CRL with the file it came from, in the configured order.
    let mut crls: Vec<(&Path, CertificateRevocationListDer<'static>)> = Vec::new();
    for path in &tls.crls {
        let bytes = read("tls.crls", path)?;
        if bytes.starts_with(b"-----BEGIN") {
            let before = crls.len();
            for crl in CertificateRevocationListDer::pem_slice_iter(&bytes) {
                crls.push((
                    path,
                    crl.map_err(|e| err("tls.crls", format!("{}: bad PEM: {e}", path.display())))?,
                ));
            }
            if crls.len() == before {
                return Err(err(
                    "tls.crls",
                    format!("{} holds no X509 CRL block", path.display()),
                ));
            }
        } else {
            crls.push((path, CertificateRevocationListDer::from(bytes)));
        }
    }
    let (crls_valid_until, crl_coverage) = check_crls(
        &crls,
        tls.enforce_crl_expiry,
        running.map(|r| r.crl_coverage.as_slice()),
        unix_now(),
    )
    .map_err(|reason| err("tls.crls", reason))?;
    check_crl_signatures(&crls, &crl_coverage, &ca_keys)
        .map_err(|reason| err("tls.crls", reason))?;
    let crls: Vec<_> = crls.into_iter().map(|(_, crl)| crl).collect();

    let provider = provider();
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(crls)
            // The CertificateRequest would name every client CA to anyone
            // who connects, before they authenticate (which agencies and
            // partners this vault trusts); clients here hold one
            // certificate each and need no hint to pick it.
            .clear_root_hint_subjects();
    if tls.allow_unknown_revocation_status {
        verifier = verifier.allow_unknown_revocation_status();
    }
    if tls.enforce_crl_expiry {
        verifier = verifier.enforce_revocation_expiration();
    }
    let client_verifier = verifier
        .build()
        .map_err(|e| err("tls.crls", format!("cannot build the client verifier: {e}")))?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(tls.min_version))
        .map_err(|e| err("tls.min_version", e.to_string()))?
        .with_client_cert_verifier(client_verifier.clone())
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| mismatch(&tls.cert, &tls.key, config_file, &e))?;
    one_shot_sessions(&mut config);
    // `[audit.public]`: the same certificate and versions, and no client
    // certificate asked for.
    let public = no_client_auth(
        chain,
        key,
        tls.min_version,
        &tls.cert,
        &tls.key,
        config_file,
    )?;
    Ok(TlsMaterial {
        server_config: Arc::new(config),
        public_config: Arc::new(public),
        client_verifier,
        crls_valid_until,
        crl_coverage,
        accepts_tls12: matches!(tls.min_version, crate::config::TlsVersion::Tls12),
    })
}

/// HTTP/1.1 only, and no session resumption: no tickets, no session cache,
/// so no 0-RTT data and every connection proves its certificate afresh.
fn one_shot_sessions(config: &mut ServerConfig) {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// The server configuration of a listener that asks for no client
/// certificate (a witness's, which anyone may call): the same provider,
/// versions, ALPN and no-resumption choices as the API's.
///
/// # Errors
/// [`ConfigError`] naming `tls.cert` or `tls.key`, with `config_file` as
/// the file.
pub fn load_public(
    tls: &crate::config::PublicTlsSettings,
    config_file: &Path,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let (chain, key) = read_identity(&tls.cert, &tls.key, config_file)?;
    no_client_auth(
        chain,
        key,
        tls.min_version,
        &tls.cert,
        &tls.key,
        config_file,
    )
    .map(Arc::new)
}

/// A server configuration for `chain` and `key` that asks for no client
/// certificate (`[audit.public]`, `lavd witness serve`).
fn no_client_auth(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    min_version: TlsVersion,
    cert_path: &Path,
    key_path: &Path,
    config_file: &Path,
) -> Result<ServerConfig, ConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(min_version))
        .map_err(|e| file_error(config_file, "tls.min_version", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| mismatch(cert_path, key_path, config_file, &e))?;
    one_shot_sessions(&mut config);
    Ok(config)
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    static TLS12: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    match min {
        TlsVersion::Tls13 => &TLS13,
        TlsVersion::Tls12 => &TLS12,
    }
}

fn mismatch(cert: &Path, key: &Path, config_file: &Path, e: &rustls::Error) -> ConfigError {
    ConfigError {
        file: config_file.to_path_buf(),
        field: "tls.key".into(),
        reason: format!(
            "{} does not go with the certificate in {}: {e}",
            key.display(),
            cert.display()
        ),
    }
}

/// Reads the server certificate chain (`tls.cert`) and its private key
/// (`tls.key`).
fn read_identity(
    cert: &Path,
    key: &Path,
    config_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ConfigError> {
    let err = |field: &str, reason: String| file_error(config_file, field, reason);
    let read = |field: &str, path: &Path| read_file(config_file, field, path);
    let chain_pem = read("tls.cert", cert)?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("tls.cert", format!("{}: bad PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(err(
            "tls.cert",
            format!("{} holds no CERTIFICATE block", cert.display()),
        ));
    }
    let key_pem = zeroize::Zeroizing::new(read("tls.key", key)?);
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        err(
            "tls.key",
            format!("{}: no usable private key: {e}", key.display()),
        )
    })?;
    Ok((chain, private))
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks the configured CRLs as a whole, before any is used, and returns
/// the earliest `nextUpdate` among those not past it
/// ([`TlsMaterial::crls_valid_until`]; a chain a stale CRL covers fails the
/// check anyway, and is never kept), and what each covers. Refused, with
/// the files named:
/// - a CRL lavd cannot read its issuer, scope or times from;
/// - two CRLs of one issuer, unless one covers only end-entity and the
///   other only CA certificates: the handshake consults only the first CRL
///   that covers a certificate (rustls-webpki compares neither `thisUpdate`
///   nor the CRL number), so a newer CRL listed after an older one, or a
///   partition beside a full CRL, would revoke nothing;
/// - under `enforce` at a reload (`running` is the running configuration's
///   coverage), a CRL already past its `nextUpdate` that would replace a
///   running CRL of the same certificates that still counts: every client
///   it covers would be refused, and the running one stays. Otherwise such
///   a CRL is a warning (a start; a CA whose running CRL lapsed too, or that
///   had none), so that CRLs that lapsed do not block every reload (a role
///   or an authority withdrawn in a hurry): the clients it covers are
///   refused (`crl_expired`) until a fresh one comes;
/// - at a reload, a CRL older than the running CRL of its issuer and scope
///   (a lower cRLNumber, or without both numbers an earlier `thisUpdate`),
///   with the expiry enforced or not: it would take back the revocations
///   the newer one added (a stale mirror, a rolled-back secret, a replayed
///   fetch), and the running one stays.
fn check_crls(
    crls: &[(&Path, CertificateRevocationListDer<'_>)],
    enforce: bool,
    running: Option<&[CrlCoverage]>,
    now: u64,
) -> Result<(u64, Vec<CrlCoverage>), String> {
    let mut until = u64::MAX;
    let mut coverage: Vec<CrlCoverage> = Vec::with_capacity(crls.len());
    for (i, (path, crl)) in crls.iter().enumerate() {
        let fields = super::identity::crl_fields(crl.as_ref()).map_err(|_| {
            format!(
                "{} (CRL {} of tls.crls): not a DER X.509 CRL with RFC 5280 times",
                path.display(),
                i + 1
            )
        })?;
        // One coverage per CRL before this one, in order.
        if let Some(first) = coverage
            .iter()
            .position(|c| c.issuer == fields.issuer && !disjoint(c.scope, fields.scope))
        {
            return Err(format!(
                "CRL {} ({}) and CRL {} ({}) of tls.crls have the same issuer and can cover the \
                 same certificates: the handshake would consult only the first, so list one \
                 CRL per CA (or one of its end-entity and one of its CA certificates)",
                first + 1,
                crls[first].0.display(),
                i + 1,
                path.display()
            ));
        }
        let stale = enforce && fields.next_update.is_some_and(|next| next <= now);
        let replaces_fresh = stale
            && running.is_some_and(|running| {
                running.iter().any(|c| {
                    c.issuer == fields.issuer
                        && !disjoint(c.scope, fields.scope)
                        && c.counts_until.is_none_or(|u| u > now)
                })
            });
        coverage.push(CrlCoverage {
            issuer: fields.issuer,
            scope: fields.scope,
            counts_until: fields.next_update.filter(|_| enforce),
            this_update: fields.this_update,
            number: fields.number,
            path: path.to_path_buf(),
        });
        let Some(next) = fields.next_update else {
            continue;
        };
        if next > now {
            until = until.min(next);
            continue;
        }
        if !enforce {
            continue;
        }
        let past = format!(
            "{} (CRL {} of tls.crls) is past its nextUpdate ({})",
            path.display(),
            i + 1,
            time::OffsetDateTime::from_unix_timestamp(i64::try_from(next).unwrap_or(0))
                .map_or_else(|_| next.to_string(), crate::codec::format_time)
        );
        if replaces_fresh {
            return Err(format!(
                "{past}: it would replace a running CRL of the same certificates that has not \
                 lapsed, and with enforce_crl_expiry every client it covers would be refused; \
                 fetch a fresh CRL"
            ));
        }
        tracing::warn!(
            "{past}: every client it covers is refused (crl_expired) until a fresh CRL is \
             loaded (SIGHUP)"
        );
    }
    // A reload that puts back an older CRL of the same certificates (a
    // stale mirror, a rolled-back secret, a replayed fetch) would take back
    // every revocation the newer one added, silently: refused, whether or
    // not the expiry is enforced.
    for (i, (new, (path, _))) in coverage.iter().zip(crls).enumerate() {
        if let Some(why) = running
            .unwrap_or_default()
            .iter()
            .find_map(|running| new.older_than(running))
        {
            return Err(format!(
                "{} (CRL {} of tls.crls) is older than the running CRL of its issuer and scope \
                 ({why}): loading it would take back the revocations the newer one added; put \
                 the newer CRL back, or a newer one still (a CA whose numbering started again \
                 is taken by a restart, which compares with nothing)",
                path.display(),
                i + 1
            ));
        }
    }
    Ok((until, coverage))
}

/// Seconds since the Unix epoch as RFC 3339 UTC, or as the number when no
/// date can show it.
fn time_text(t: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(t).unwrap_or(i64::MAX))
        .map_or_else(|_| t.to_string(), crate::codec::format_time)
}

/// Checks each CRL's signature as the handshake will: it picks a CRL by
/// its issuer's name and verifies it with the key of the CA that issued
/// the certificate being checked. `coverage` is [`check_crls`]'s, in the
/// same order.
/// - A CRL that no client CA bearing its issuer's name verifies (a CRL of
///   another CA under that name, or of a CA re-keyed since) would refuse
///   every client certificate of that name (`crl_invalid`), with nothing in
///   the configuration named: refused, naming the file.
/// - One that some such CAs verify and others do not (a CA re-keyed under
///   its name, both keys listed) is a warning naming them: the clients of
///   the others are refused (`crl_invalid`), since one CA name cannot have
///   CRLs for two keys, and the rest are served.
///
/// A CRL whose issuer is no client CA (an intermediate that clients send)
/// is checked only in handshakes, as is one whose signature algorithm this
/// does not know (RSA-PSS, say). keyUsage is not looked at: the handshake
/// does not check a trust anchor's.
fn check_crl_signatures(
    crls: &[(&Path, CertificateRevocationListDer<'_>)],
    coverage: &[CrlCoverage],
    cas: &[(&Path, super::identity::CaKey)],
) -> Result<(), String> {
    let shown = |paths: &[&Path]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, ((path, crl), covered)) in crls.iter().zip(coverage).enumerate() {
        let what = || format!("{} (CRL {} of tls.crls)", path.display(), i + 1);
        let signed = super::identity::crl_signed(crl.as_ref())
            .map_err(|_| format!("{}: not a DER X.509 CRL", what()))?;
        let (mut verified, mut failed, mut unchecked) = (Vec::new(), Vec::new(), false);
        for (ca_path, ca) in cas.iter().filter(|(_, ca)| ca.subject == covered.issuer) {
            let Some(algorithm) = crl_verification(signed.algorithm, ca) else {
                unchecked = true;
                continue;
            };
            let key = aws_lc_rs::signature::UnparsedPublicKey::new(algorithm, &ca.key);
            if key.verify(signed.tbs, signed.signature).is_ok() {
                verified.push(*ca_path);
            } else {
                failed.push(*ca_path);
            }
        }
        if unchecked {
            tracing::info!(
                crl = %path.display(),
                "a CRL's signature algorithm (or its CA's key type) is not one lavd checks when \
                 loading; the handshake checks it"
            );
        }
        if failed.is_empty() {
            continue;
        }
        if verified.is_empty() && !unchecked {
            return Err(format!(
                "{}: its signature does not verify under the key of any client CA bearing its \
                 issuer's name (in {}): the handshake would refuse every client certificate of \
                 that name (crl_invalid). Is it the CRL of another CA, or of a CA re-keyed since?",
                what(),
                shown(&failed)
            ));
        }
        tracing::warn!(
            "{}: its signature verifies under the client CA in {} but not under the one in {}, \
             which bears the same name: that one's clients are refused (crl_invalid), since one \
             CA name cannot have CRLs for two keys",
            what(),
            shown(&verified),
            shown(&failed)
        );
    }
    Ok(())
}

/// The aws-lc verification algorithm for a CRL signed with `algorithm`
/// (an OID's contents) by `ca`'s key, for the algorithms rustls' aws-lc
/// provider takes for certificates, RSA-PSS aside; `None` otherwise.
fn crl_verification(
    algorithm: &[u8],
    ca: &super::identity::CaKey,
) -> Option<&'static dyn aws_lc_rs::signature::VerificationAlgorithm> {
    use aws_lc_rs::signature as s;
    // ecdsa-with-SHA256/384 (RFC 5758 §3.2), sha256/384/512WithRSAEncryption
    // (RFC 4055 §5), Ed25519 (RFC 8410 §3).
    const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const RSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    const RSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const RSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    // id-ecPublicKey with P-256 or P-384 (RFC 5480 §2.1.1), rsaEncryption.
    const EC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    const RSA_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let key = (ca.algorithm.as_slice(), ca.curve.as_slice());
    Some(match (algorithm, key) {
        (ECDSA_SHA256, (EC_KEY, P256)) => &s::ECDSA_P256_SHA256_ASN1,
        (ECDSA_SHA256, (EC_KEY, P384)) => &s::ECDSA_P384_SHA256_ASN1,
        (ECDSA_SHA384, (EC_KEY, P256)) => &s::ECDSA_P256_SHA384_ASN1,
        (ECDSA_SHA384, (EC_KEY, P384)) => &s::ECDSA_P384_SHA384_ASN1,
        (RSA_SHA256, (RSA_KEY, _)) => &s::RSA_PKCS1_2048_8192_SHA256,
        (RSA_SHA384, (RSA_KEY, _)) => &s::RSA_PKCS1_2048_8192_SHA384,
        (RSA_SHA512, (RSA_KEY, _)) => &s::RSA_PKCS1_2048_8192_SHA512,
        (ED25519, (ED25519, _)) => &s::ED25519,
        _ => return None,
    })
}

/// A [`ConfigError`] on `field` of `config_file`.
fn file_error(config_file: &Path, field: &str, reason: String) -> ConfigError {
    ConfigError {
        file: config_file.to_path_buf(),
        field: field.into(),
        reason,
    }
}

/// Reads the file that `field` names.
fn read_file(config_file: &Path, field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        file_error(
            config_file,
            field,
            format!("cannot read {}: {e}", path.display()),
        )
    })
}

impl TlsMaterial {
    /// Logs the CRLs in force, each with its number and `thisUpdate`: at
    /// start, and after a reload once nothing can fail it any more.
    pub fn log_crls(&self) {
        for crl in &self.crl_coverage {
            tracing::info!(
                crl = %crl.path.display(),
                number = %crl.number.as_ref().map_or_else(|| "none".into(), ToString::to_string),
                this_update = %time_text(crl.this_update),
                "CRL in force"
            );
        }
    }

    /// Checks a connection's client chain (leaf first) against this
    /// generation's CAs and CRLs at `now`, and refuses a TLS 1.2 connection
    /// (`tls12`) when this generation no longer accepts TLS 1.2.
    ///
    /// # Errors
    /// The metrics reason of the failure (`certificate_revoked`, …).
    pub fn recheck(
        &self,
        chain: &[CertificateDer<'static>],
        tls12: bool,
        now: UnixTime,
    ) -> Result<(), &'static str> {
        // A handshake now would be refused: `tls.min_version` was raised
        // since the connection was made (after a TLS 1.2 advisory, say).
        if tls12 && !self.accepts_tls12 {
            return Err("tls_version_refused");
        }
        let (leaf, intermediates) = chain.split_first().ok_or("no_client_certificate")?;
        self.client_verifier
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ())
            .map_err(|e| rustls_reason(&e))
    }
}

/// The metrics reason for a failed handshake (as tokio-rustls reports it).
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return rustls_reason(tls);
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => "connection_closed",
        _ => "io_error",
    }
}

/// A short, bounded label for a rustls error.
pub fn rustls_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "certificate_expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate_not_yet_valid"
            }
            CertificateError::Revoked => "certificate_revoked",
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::UnknownRevocationStatus => "unknown_revocation_status",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "crl_expired",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "certificate_wrong_purpose"
            }
            CertificateError::BadSignature => "certificate_bad_signature",
            _ => "certificate_invalid",
        },
        rustls::Error::InvalidCertRevocationList(_) => "crl_invalid",
        rustls::Error::PeerIncompatible(_) => "incompatible_peer",
        rustls::Error::NoApplicationProtocol => "no_application_protocol",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::PeerMisbehaved(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => "protocol_error",
        _ => "tls_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CRL of one CA, with `scope` as its issuingDistributionPoint, its
    /// `nextUpdate` at `next_update` (seconds since the epoch).
    fn crl(
        issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
        scope: Option<rcgen::CrlScope>,
        next_update: u64,
    ) -> CertificateRevocationListDer<'static> {
        numbered_crl(issuer, scope, next_update, next_update)
    }

    /// [`crl`] with the cRLNumber `number`.
    fn numbered_crl(
        issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
        scope: Option<rcgen::CrlScope>,
        next_update: u64,
        number: u64,
    ) -> CertificateRevocationListDer<'static> {
        let at = |s: u64| time::OffsetDateTime::from_unix_timestamp(s as i64).unwrap();
        rcgen::CertificateRevocationListParams {
            this_update: at(next_update - 3600),
            next_update: at(next_update),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: scope.map(|scope| rcgen::CrlIssuingDistributionPoint {
                distribution_point: rcgen::CrlDistributionPoint {
                    uris: vec!["http://crl.example/ca.crl".into()],
                },
                scope: Some(scope),
            }),
            revoked_certs: vec![],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(issuer)
        .unwrap()
        .der()
        .clone()
    }

    /// A CA with a new key, named `common_name` (rcgen's default name
    /// without one), as an issuer of CRLs.
    fn ca(common_name: Option<&str>) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        if let Some(name) = common_name {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
        }
        rcgen::Issuer::new(params, rcgen::KeyPair::generate().unwrap())
    }

    /// A CA named "client CA", with `key` and `usages` (none: no keyUsage
    /// extension): its certificate's DER and its issuer for CRLs.
    fn named_ca(
        key: rcgen::KeyPair,
        usages: Vec<rcgen::KeyUsagePurpose>,
    ) -> (Vec<u8>, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = usages;
        let der = params.self_signed(&key).unwrap().der().to_vec();
        (der, rcgen::Issuer::new(params, key))
    }

    /// The handshake verifies a CRL with the key of the CA that issued the
    /// certificate it checks, found by name: a CRL that no client CA of
    /// that name verifies (another key under the same name) is refused at
    /// load, naming both files, instead of refusing every client of that
    /// name as `crl_invalid`. One that verifies under one of two CAs of
    /// that name (a re-keyed CA, both listed) is taken, with a warning. A
    /// CRL of a CA that is not a client CA (an intermediate) is left to the
    /// handshake, and a client CA's keyUsage is not looked at (the
    /// handshake does not check a trust anchor's).
    #[test]
    fn a_crl_no_client_ca_of_its_name_verifies_is_refused_at_load() {
        let now: u64 = 2_000_000_000;
        let (ca_der, issuer) = named_ca(rcgen::KeyPair::generate().unwrap(), Vec::new());
        let (rekeyed_der, rekeyed) = named_ca(rcgen::KeyPair::generate().unwrap(), Vec::new());
        let elsewhere = {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            rcgen::Issuer::new(params, key)
        };
        // A CA certificate without cRLSign, and its key signing a CRL all
        // the same (rcgen itself would not sign one for that certificate).
        let key = rcgen::KeyPair::generate().unwrap();
        let copy = rcgen::KeyPair::try_from(key.serialize_der().as_slice()).unwrap();
        let (no_crl_sign_der, _) = named_ca(key, vec![rcgen::KeyUsagePurpose::KeyCertSign]);
        let (_, no_crl_sign) = named_ca(copy, Vec::new());
        let cas = |ders: &[&Vec<u8>]| {
            ders.iter()
                .map(|der| {
                    (
                        Path::new("client-cas.pem"),
                        crate::api::identity::ca_key(der).unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let check = |crl: CertificateRevocationListDer<'static>, ders: &[&Vec<u8>]| {
            let crls = vec![(Path::new("ca.crl"), crl)];
            let coverage = check_crls(&crls, false, None, now).unwrap().1;
            check_crl_signatures(&crls, &coverage, &cas(ders))
        };

        // Its own CA's: taken.
        assert!(check(crl(&issuer, None, now), &[&ca_der]).is_ok());
        // Another key under the CA's name: refused, naming the files.
        let e = check(crl(&rekeyed, None, now), &[&ca_der]).unwrap_err();
        assert!(
            e.starts_with(
                "ca.crl (CRL 1 of tls.crls): its signature does not verify under the key of any \
                 client CA bearing its issuer's name (in client-cas.pem): the handshake"
            ),
            "{e}"
        );
        // Both keys of the name among the client CAs: the clients of the
        // key that signed it are served; a warning names the other.
        assert!(check(crl(&issuer, None, now), &[&ca_der, &rekeyed_der]).is_ok());
        // A CRL of a CA that is no client CA: the handshake's to check.
        assert!(check(crl(&elsewhere, None, now), &[&ca_der]).is_ok());
        // A client CA whose keyUsage lacks cRLSign: the handshake takes its
        // CRL (a trust anchor's keyUsage is not checked), and so does this.
        assert!(check(crl(&no_crl_sign, None, now), &[&no_crl_sign_der]).is_ok());
        // And in the handshake, such a CRL is named for what it is.
        assert_eq!(
            rustls_reason(&rustls::Error::InvalidCertRevocationList(
                rustls::CertRevocationListError::BadSignature
            )),
            "crl_invalid"
        );
    }

    /// One CA's CRLs of two scopes (end-entity and CA certificates) are
    /// taken: no certificate is covered by both. Any other two CRLs of one
    /// issuer are refused: two of one scope, two without one, or one
    /// without a scope beside a scoped one (a certificate is covered by
    /// both, and only the first would be consulted). A CRL past its
    /// `nextUpdate` is refused at a reload where it would replace a running
    /// CRL of the same certificates that has not lapsed, taken with a
    /// warning otherwise (a start; the running one lapsed too; another
    /// CA's; the other scope), taken silently when the expiry is not
    /// enforced, and never counts towards the time a checked chain is kept.
    #[test]
    fn crls_are_refused_only_where_the_handshake_would_misread_them() {
        let issuer = ca(None);
        let now: u64 = 2_000_000_000;
        let path = Path::new("ca.crl");
        let list = |crls: Vec<CertificateRevocationListDer<'static>>| {
            crls.into_iter().map(|c| (path, c)).collect::<Vec<_>>()
        };
        let (users, cas) = (
            Some(rcgen::CrlScope::UserCertsOnly),
            Some(rcgen::CrlScope::CaCertsOnly),
        );

        let scoped = list(vec![
            crl(&issuer, users, now + 60),
            crl(&issuer, cas, now + 30),
        ]);
        assert_eq!(
            check_crls(&scoped, true, Some(&[]), now).unwrap().0,
            now + 30
        );
        for twice in [
            list(vec![
                crl(&issuer, users, now + 60),
                crl(&issuer, users, now + 90),
            ]),
            list(vec![
                crl(&issuer, None, now + 60),
                crl(&issuer, None, now + 90),
            ]),
            list(vec![
                crl(&issuer, None, now + 60),
                crl(&issuer, users, now + 90),
            ]),
            list(vec![
                crl(&issuer, cas, now + 60),
                crl(&issuer, None, now + 90),
            ]),
        ] {
            let e = check_crls(&twice, true, None, now).unwrap_err();
            assert!(e.contains("CRL 1 (ca.crl) and CRL 2 (ca.crl)"), "{e}");
            assert!(e.contains("can cover the same certificates"), "{e}");
        }
        let stale = list(vec![crl(&issuer, None, now - 1)]);
        let running = |crls: Vec<CertificateRevocationListDer<'static>>, enforce: bool| {
            check_crls(&list(crls), enforce, None, now - 100).unwrap().1
        };
        let fresh = running(vec![crl(&issuer, None, now + 60)], true);
        let e = check_crls(&stale, true, Some(&fresh), now).unwrap_err();
        assert!(e.contains("is past its nextUpdate"), "{e}");
        assert!(e.contains("would replace a running CRL"), "{e}");
        // A start, and no running CRL of these certificates.
        assert_eq!(check_crls(&stale, true, None, now).unwrap().0, u64::MAX);
        assert_eq!(
            check_crls(&stale, true, Some(&[]), now).unwrap().0,
            u64::MAX
        );
        // The running one lapsed too.
        let lapsed = running(vec![crl(&issuer, None, now - 10)], true);
        assert_eq!(
            check_crls(&stale, true, Some(&lapsed), now).unwrap().0,
            u64::MAX
        );
        // The running one is of the other scope: it covers none of these.
        let cas_only = running(vec![crl(&issuer, cas, now + 60)], true);
        let stale_users = list(vec![crl(&issuer, users, now - 1)]);
        assert!(check_crls(&stale_users, true, Some(&cas_only), now).is_ok());
        // Another CA's.
        let other = ca(Some("another CA"));
        let others = running(vec![crl(&other, None, now + 60)], true);
        assert!(check_crls(&stale, true, Some(&others), now).is_ok());
        // A running CRL whose expiry was not enforced counts for ever.
        let unenforced = running(vec![crl(&issuer, None, now - 10)], false);
        assert!(check_crls(&stale, true, Some(&unenforced), now).is_err());
        // Not enforced: taken (over a running CRL that has not lapsed, and
        // that it follows).
        let fresh_but_earlier = running(vec![numbered_crl(&issuer, None, now + 60, 0)], true);
        assert_eq!(
            check_crls(&stale, false, Some(&fresh_but_earlier), now)
                .unwrap()
                .0,
            u64::MAX
        );
        let e = check_crls(
            &list(vec![CertificateRevocationListDer::from(vec![0x30, 0])]),
            true,
            None,
            now,
        )
        .unwrap_err();
        assert!(e.contains("not a DER X.509 CRL"), "{e}");
    }

    /// A reload that puts back an older CRL of the same issuer and scope (a
    /// lower cRLNumber; an earlier `thisUpdate` when a number is missing)
    /// is refused, whether or not the expiry is enforced: it would take
    /// back the revocations the newer one added. The same CRL again, a
    /// newer one, another scope's or another CA's are taken, and a start
    /// has nothing to compare with.
    #[test]
    fn a_reload_refuses_an_older_crl_of_the_same_certificates() {
        let issuer = ca(None);
        let now: u64 = 2_000_000_000;
        let path = Path::new("ca.crl");
        let list = |crls: Vec<CertificateRevocationListDer<'static>>| {
            crls.into_iter().map(|c| (path, c)).collect::<Vec<_>>()
        };
        let load = |crls, running: Option<&[CrlCoverage]>, enforce| {
            check_crls(&list(crls), enforce, running, now)
        };
        let running = load(vec![numbered_crl(&issuer, None, now + 60, 42)], None, true)
            .unwrap()
            .1;
        // #41, though its nextUpdate is later.
        let older = || vec![numbered_crl(&issuer, None, now + 600, 41)];
        for enforce in [true, false] {
            let e = load(older(), Some(&running), enforce).unwrap_err();
            assert!(
                e.contains("ca.crl (CRL 1 of tls.crls) is older than the running CRL")
                    && e.contains("cRLNumber 41, the running one's 42"),
                "{e}"
            );
        }
        assert!(load(older(), None, true).is_ok(), "a start");
        for taken in [42, 43] {
            let crls = vec![numbered_crl(&issuer, None, now + 60, taken)];
            assert!(load(crls, Some(&running), true).is_ok(), "#{taken}");
        }
        let users = Some(rcgen::CrlScope::UserCertsOnly);
        let crls = vec![numbered_crl(&issuer, users, now + 60, 1)];
        assert!(load(crls, Some(&running), true).is_ok(), "another scope");
        let other = ca(Some("another CA"));
        let crls = vec![numbered_crl(&other, None, now + 60, 1)];
        assert!(load(crls, Some(&running), true).is_ok(), "another CA");
        // Without a number on one side, thisUpdate decides.
        let mut unnumbered = running[0].clone();
        unnumbered.number = None;
        let mut earlier = unnumbered.clone();
        earlier.this_update -= 1;
        let why = earlier.older_than(&unnumbered).unwrap();
        assert!(why.starts_with("thisUpdate "), "{why}");
        assert!(unnumbered.older_than(&earlier).is_none());
        assert!(unnumbered.older_than(&unnumbered).is_none());
    }
}
