//! Harness for `lavd serve` tests: a throwaway PKI made with rcgen, a
//! `lavd serve` child process on a SoftHSM token (its addresses and
//! lifecycle read from its sd_notify datagrams), and a small blocking
//! HTTP/1.1 client over rustls with client certificates.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::OffsetDateTime;

use crate::TestToken;

/// A certificate authority for one test.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    next_serial: std::sync::atomic::AtomicU64,
    /// Its own serial (0 for a root), for its issuer's CRLs.
    serial: u64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

/// A client (or server) certificate with its key.
#[derive(Debug)]
pub struct Issued {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    /// Its serial, for CRLs.
    pub serial: u64,
}

impl Issued {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    /// A certificate and its key read back from [`Issued::pem`]'s PEM (a
    /// child process rebuilding a party the test made).
    pub fn from_pem(cert: &str, key: &str) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        let cert = CertificateDer::from_pem_slice(cert.as_bytes()).expect("certificate PEM");
        let key = PrivatePkcs8KeyDer::from_pem_slice(key.as_bytes()).expect("PKCS#8 key PEM");
        Issued {
            chain: vec![cert],
            key: key.secret_pkcs8_der().to_vec(),
            serial: 0,
        }
    }

    /// The leaf certificate and its key, in PEM.
    pub fn pem(&self) -> (String, String) {
        (
            pem("CERTIFICATE", &self.chain[0]),
            pem("PRIVATE KEY", &self.key),
        )
    }
}

/// A URI SAN.
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("URI SAN"))
}

impl Ca {
    /// A new root CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key).expect("self-signed CA");
        Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            next_serial: std::sync::atomic::AtomicU64::new(100),
            serial: 0,
        }
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        pem("CERTIFICATE", &self.cert)
    }

    /// The CA certificate.
    pub fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// A client certificate with `sans`, valid from yesterday for a week.
    pub fn client(&self, sans: Vec<SanType>) -> Issued {
        let now = OffsetDateTime::now_utc();
        self.client_valid(
            sans,
            now - time::Duration::days(1),
            now + time::Duration::days(7),
        )
    }

    /// A client certificate for one URI identity.
    pub fn identity(&self, identity: &str) -> Issued {
        self.client(vec![uri(identity)])
    }

    /// [`Ca::identity`] from an intermediate CA: the chain sent is the leaf,
    /// then this CA's certificate.
    pub fn chained_identity(&self, identity: &str) -> Issued {
        let mut issued = self.identity(identity);
        issued.chain.push(self.cert.clone());
        issued
    }

    /// A client certificate with `sans` valid in `[not_before, not_after]`.
    pub fn client_valid(
        &self,
        sans: Vec<SanType>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Issued {
        self.client_for(
            sans,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            not_before,
            not_after,
        )
    }

    /// A certificate with `sans` whose extended key usages are `purposes`
    /// (a client certificate when they hold `ClientAuth`), valid in
    /// `[not_before, not_after]`.
    pub fn client_for(
        &self,
        sans: Vec<SanType>,
        purposes: Vec<ExtendedKeyUsagePurpose>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans;
        params.extended_key_usages = purposes;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        self.issue(params)
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(7);
        self.issue(params)
    }

    /// An intermediate CA named `name`, issued by this one: its
    /// [`Ca::server`] certificates chain through it.
    pub fn intermediate(&self, name: &str) -> Ca {
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate");
        Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            next_serial: std::sync::atomic::AtomicU64::new(100),
            serial,
        }
    }

    fn issue(&self, mut params: CertificateParams) -> Issued {
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued {
            chain: vec![cert.der().clone()],
            key: key.serialize_der(),
            serial,
        }
    }

    /// A CRL (PEM) revoking `revoked`, valid for a day.
    pub fn crl(&self, revoked: &[&Issued]) -> String {
        self.crl_until(revoked, OffsetDateTime::now_utc() + time::Duration::days(1))
    }

    /// A CRL (PEM) revoking the intermediate CAs `revoked`, valid for a day.
    pub fn crl_of_cas(&self, revoked: &[&Ca]) -> String {
        let serials: Vec<u64> = revoked.iter().map(|c| c.serial).collect();
        self.crl_of(
            &serials,
            OffsetDateTime::now_utc() + time::Duration::days(1),
        )
    }

    /// A CRL (PEM) revoking `revoked`, whose `nextUpdate` is `next_update`.
    pub fn crl_until(&self, revoked: &[&Issued], next_update: OffsetDateTime) -> String {
        let serials: Vec<u64> = revoked.iter().map(|c| c.serial).collect();
        self.crl_of(&serials, next_update)
    }

    fn crl_of(&self, serials: &[u64], next_update: OffsetDateTime) -> String {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            next_update,
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .expect("sign CRL")
            .pem()
            .expect("CRL PEM")
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The PKI of one test: a client CA, a server certificate from a server
/// CA, written under `tls/` next to the config.
#[derive(Debug)]
pub struct Pki {
    /// Issues client certificates.
    pub clients: Ca,
    /// Issued the server certificate; clients trust it.
    pub servers: Ca,
    dir: PathBuf,
}

impl Pki {
    /// Makes both CAs and writes `tls/server.pem`, `tls/server.key`,
    /// `tls/clients.pem` into `token`'s working directory.
    pub fn new(token: &TestToken) -> Self {
        let dir = token.path("tls");
        std::fs::create_dir_all(&dir).expect("tls dir");
        let pki = Pki {
            clients: Ca::new("lavd test client CA"),
            servers: Ca::new("lavd test server CA"),
            dir,
        };
        let (cert, key) = pki.servers.server().pem();
        pki.write("server.pem", &cert);
        pki.write("server.key", &key);
        crate::restrict(&pki.dir.join("server.key"));
        pki.write("clients.pem", &pki.clients.pem());
        pki
    }

    /// Writes a file under `tls/`.
    pub fn write(&self, name: &str, contents: &str) {
        std::fs::write(self.dir.join(name), contents).expect("write tls file");
    }

    /// `lavd audit mirror` of the log at `url` (`https://…/v1/log`) into
    /// `dir`, checked against the log's verifier key `key`, as the party
    /// whose [`Self::cli_files`] are `files`, with `extra` arguments.
    pub fn audit_mirror(
        t: &crate::TestToken,
        key: &str,
        url: &str,
        dir: &str,
        (ca, cert, client_key): &(String, String, String),
        extra: &[&str],
    ) -> std::process::Output {
        let mut args = vec![
            "audit",
            "mirror",
            "--key",
            key,
            "--url",
            url,
            "--dir",
            dir,
            "--ca",
            ca,
            "--cert",
            cert,
            "--client-key",
            client_key,
        ];
        args.extend_from_slice(extra);
        t.lavd(&args)
    }

    /// Writes the server CA and `who`'s certificate and key (`chmod 600`)
    /// under `tls/` as `servers-ca.pem`, `<name>.pem` and `<name>.key`, for
    /// the `lavd audit` commands' `--ca`, `--cert` and `--client-key`;
    /// returns those three paths.
    pub fn cli_files(&self, who: &Issued, name: &str) -> (String, String, String) {
        let (cert, key) = who.pem();
        self.write("servers-ca.pem", &self.servers.pem());
        self.write(&format!("{name}.pem"), &cert);
        self.write(&format!("{name}.key"), &key);
        crate::restrict(&self.dir.join(format!("{name}.key")));
        let path = |f: String| self.dir.join(f).to_str().expect("utf-8 path").to_string();
        (
            path("servers-ca.pem".into()),
            path(format!("{name}.pem")),
            path(format!("{name}.key")),
        )
    }

    /// A client of the API at `addr` presenting `identity` (or no
    /// certificate).
    pub fn client(&self, addr: SocketAddr, identity: Option<&Issued>) -> Client {
        Client::new(addr, &self.servers, identity, &[&rustls::version::TLS13])
    }
}

/// `[tls]`, `[server]` and `[admin]` for a test daemon on ephemeral ports,
/// plus `extra` tables (`[roles]`, `[limits]`, …), and the double-lock
/// trust configuration of [`authorities`].
pub fn serve_config(extra: &str) -> String {
    format!(
        "\n[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 10\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [tls]\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\nclient_cas = [\"tls/clients.pem\"]\n\
         {extra}\n{}",
        authorities().trust_toml()
    )
}

/// `lavd serve` on a fresh token whose config is [`serve_config`] of
/// `extra`, started.
pub fn start_serve(extra: &str) -> (TestToken, Pki, Daemon) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(extra));
    let daemon = Daemon::start(&t);
    (t, pki, daemon)
}

/// The warrant authorities of this test process: one executive (ES256) and
/// one judicial (EdDSA), under a double-lock policy.
pub struct Authorities {
    /// `executive-1`.
    pub executive: lavd::warrant::AuthorityKey,
    /// `judicial-1`.
    pub judicial: lavd::warrant::AuthorityKey,
}

impl std::fmt::Debug for Authorities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorities").finish_non_exhaustive()
    }
}

/// The process's [`Authorities`], made on first use.
pub fn authorities() -> &'static Authorities {
    static AUTHORITIES: std::sync::OnceLock<Authorities> = std::sync::OnceLock::new();
    AUTHORITIES.get_or_init(|| {
        use lavd::warrant::{Algorithm, AuthorityKey};
        Authorities {
            executive: AuthorityKey::generate(Algorithm::Es256, "executive-1").expect("key"),
            judicial: AuthorityKey::generate(Algorithm::EdDsa, "judicial-1").expect("key"),
        }
    })
}

impl Authorities {
    /// `[[authorities]]` and `[policy]` for lavd.toml.
    pub fn trust_toml(&self) -> String {
        let entry = |k: &lavd::warrant::AuthorityKey, role: &str| {
            format!(
                "[[authorities]]\nkid = \"{}\"\nrole = \"{role}\"\nalg = \"{}\"\njwk = '{}'\n\
                 valid_from = \"2020-01-01T00:00:00Z\"\nvalid_until = \"2100-01-01T00:00:00Z\"\n\n",
                k.kid(),
                k.alg(),
                serde_json::to_string(&k.public_jwk().expect("jwk")).expect("json")
            )
        };
        format!(
            "{}{}[policy]\n[[policy.require]]\nrole = \"executive\"\ncount = 1\n\
             [[policy.require]]\nrole = \"judicial\"\ncount = 1\n",
            entry(&self.executive, "executive"),
            entry(&self.judicial, "judicial")
        )
    }

    /// An authority revocation JWS (General JSON Serialization) over
    /// `{"id","reason","time"}` (the time now), signed by the judicial
    /// authority.
    pub fn revocation(&self, id: &str, reason: &str) -> serde_json::Value {
        self.revocation_by(&self.judicial, id, reason)
    }

    /// As [`Authorities::revocation`], signed by `key`.
    pub fn revocation_by(
        &self,
        key: &lavd::warrant::AuthorityKey,
        id: &str,
        reason: &str,
    ) -> serde_json::Value {
        use lavd::codec::b64_encode;
        let payload = serde_json::json!({
            "id": id,
            "reason": reason,
            "time": crate::vault::at(OffsetDateTime::now_utc(), time::Duration::ZERO),
        })
        .to_string();
        let protected =
            b64_encode(serde_json::json!({"alg": key.alg().name(), "kid": key.kid()}).to_string());
        let payload = b64_encode(payload);
        let signature = key
            .sign(format!("{protected}.{payload}").as_bytes())
            .expect("sign");
        serde_json::json!({
            "payload": payload,
            "signatures": [{"protected": protected, "signature": b64_encode(signature)}],
        })
    }

    /// A JWS warrant over `claims`, signed by `signers` in turn.
    pub fn sign(
        claims: &serde_json::Value,
        signers: &[&lavd::warrant::AuthorityKey],
    ) -> serde_json::Value {
        use lavd::warrant::sign::{add_signature, unsigned_warrant};
        let limits = lavd::warrant::WarrantLimits::default();
        let mut jws = unsigned_warrant(claims.to_string().as_bytes()).expect("claims");
        for key in signers {
            jws = add_signature(jws.as_bytes(), key, &limits).expect("sign");
        }
        serde_json::from_str(&jws).expect("json")
    }
}

/// A `lavd serve` child process.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    notify: UnixDatagram,
    /// The API address.
    pub api: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
    /// The public log listener's address, when `[audit.public]` is set.
    pub public_log: Option<SocketAddr>,
    stderr: PathBuf,
}

/// Makes the audit signing key `lavd serve` needs, once per token (every
/// [`Daemon`] start calls it; a test whose token will refuse the PIN calls
/// it first).
pub fn make_audit_key(token: &TestToken) {
    let marker = token.path("audit-key-made");
    if !marker.exists() {
        let out = token.lavd_with_config(&["keys", "generate-audit"]);
        assert!(out.status.success(), "generate-audit: {out:?}");
        std::fs::write(&marker, "").expect("marker");
    }
}

impl Daemon {
    /// Starts `lavd serve --config` for `token` and waits for `READY=1`.
    pub fn start(token: &TestToken) -> Self {
        Self::try_start(token).unwrap_or_else(|(status, stderr)| {
            panic!("lavd serve did not start ({status:?}):\n{stderr}")
        })
    }

    /// Starts it with `LAVD_LOG=level` (the harness default is `warn`).
    pub fn start_logging(token: &TestToken, level: &str) -> Self {
        Self::spawn(token, Some(level)).unwrap_or_else(|(status, stderr)| {
            panic!("lavd serve did not start ({status:?}):\n{stderr}")
        })
    }

    /// Starts it; on failure returns the exit status and stderr.
    pub fn try_start(token: &TestToken) -> Result<Self, (Option<ExitStatus>, String)> {
        Self::spawn(token, None)
    }

    /// [`Daemon::try_start`] under `name` (its notify socket and stderr
    /// apart from a daemon already running on the token).
    pub fn try_start_named(
        token: &TestToken,
        name: &str,
    ) -> Result<Self, (Option<ExitStatus>, String)> {
        Self::spawn_named(token, None, name)
    }

    /// Starts one of several replicas of `token`'s config (all on one
    /// token and one shared store): `name` keeps its notify socket and
    /// stderr apart from the others'.
    pub fn start_replica(token: &TestToken, name: &str) -> Self {
        Self::spawn_named(token, None, name).unwrap_or_else(|(status, stderr)| {
            panic!("lavd serve replica {name} did not start ({status:?}):\n{stderr}")
        })
    }

    fn spawn(
        token: &TestToken,
        log_level: Option<&str>,
    ) -> Result<Self, (Option<ExitStatus>, String)> {
        Self::spawn_named(token, log_level, "lavd")
    }

    fn spawn_named(
        token: &TestToken,
        log_level: Option<&str>,
        name: &str,
    ) -> Result<Self, (Option<ExitStatus>, String)> {
        make_audit_key(token);
        let config = token.config();
        Self::spawn_process(
            token,
            &["serve", "--config", config.to_str().expect("utf-8")],
            log_level,
            name,
        )
    }

    /// Starts `lavd serve --config config` (another config on `token`,
    /// e.g. another store) and waits for `READY=1`; `name` keeps its notify
    /// socket and stderr apart.
    pub fn start_config(token: &TestToken, config: &Path, name: &str) -> Self {
        Self::spawn_process(
            token,
            &["serve", "--config", config.to_str().expect("utf-8")],
            None,
            name,
        )
        .unwrap_or_else(|(status, stderr)| {
            panic!("lavd serve {name} did not start ({status:?}):\n{stderr}")
        })
    }

    /// Starts `lavd witness serve --config config` in `token`'s working
    /// directory and waits for `READY=1`; `api` is then the witness's
    /// listener. `name` keeps its notify socket and stderr apart. On
    /// failure returns the exit status and stderr.
    pub fn try_start_witness(
        token: &TestToken,
        config: &Path,
        name: &str,
    ) -> Result<Self, (Option<ExitStatus>, String)> {
        Self::spawn_process(
            token,
            &[
                "witness",
                "serve",
                "--config",
                config.to_str().expect("utf-8"),
            ],
            None,
            name,
        )
    }

    /// [`Daemon::try_start_witness`], panicking with stderr on failure.
    pub fn start_witness(token: &TestToken, config: &Path, name: &str) -> Self {
        Self::try_start_witness(token, config, name).unwrap_or_else(|(status, stderr)| {
            panic!("lavd witness serve {name} did not start ({status:?}):\n{stderr}")
        })
    }

    fn spawn_process(
        token: &TestToken,
        args: &[&str],
        log_level: Option<&str>,
        name: &str,
    ) -> Result<Self, (Option<ExitStatus>, String)> {
        Self::spawn_under(token, &[], args, log_level, name)
    }

    /// Starts `lavd serve` on `token`'s config through `wrapper` (a program
    /// and its arguments that exec the lavd binary given after them, such
    /// as `prlimit --nofile=…`), and waits for `READY=1`.
    pub fn start_under(token: &TestToken, wrapper: &[&str]) -> Self {
        make_audit_key(token);
        let config = token.config();
        Self::spawn_under(
            token,
            wrapper,
            &["serve", "--config", config.to_str().expect("utf-8")],
            None,
            "lavd",
        )
        .unwrap_or_else(|(status, stderr)| {
            panic!("lavd serve under {wrapper:?} did not start ({status:?}):\n{stderr}")
        })
    }

    fn spawn_under(
        token: &TestToken,
        wrapper: &[&str],
        args: &[&str],
        log_level: Option<&str>,
        name: &str,
    ) -> Result<Self, (Option<ExitStatus>, String)> {
        let (socket, stderr) = if name == "lavd" {
            (token.path("notify.sock"), token.path("lavd.stderr"))
        } else {
            (
                token.path(&format!("notify-{name}.sock")),
                token.path(&format!("{name}.stderr")),
            )
        };
        let _ = std::fs::remove_file(&socket);
        let notify = UnixDatagram::bind(&socket).expect("notify socket");
        let mut command = match wrapper.split_first() {
            None => crate::lavd_command(args),
            Some((program, before)) => {
                let mut command = crate::lavd_command(args);
                let lavd = command.get_program().to_owned();
                let lavd_args: Vec<std::ffi::OsString> =
                    command.get_args().map(ToOwned::to_owned).collect();
                let envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> = command
                    .get_envs()
                    .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
                    .collect();
                command = Command::new(program);
                command.args(before).arg(lavd).args(lavd_args);
                for (k, v) in envs {
                    if let Some(v) = v {
                        command.env(k, v);
                    }
                }
                command
            }
        };
        if let Some(level) = log_level {
            command.env("LAVD_LOG", level);
        }
        let child = command
            .env("NOTIFY_SOCKET", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn lavd");
        let mut daemon = Daemon {
            child,
            notify,
            api: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            public_log: None,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err((Some(status), daemon.stderr()));
            }
            if Instant::now() > deadline {
                return Err((None, daemon.stderr()));
            }
            let Some(message) = daemon.recv_notify(Duration::from_millis(200)) else {
                continue;
            };
            if message.lines().any(|l| l == "READY=1") {
                let status = message
                    .lines()
                    .find_map(|l| l.strip_prefix("STATUS="))
                    .expect("READY=1 carries STATUS");
                for word in status.split_whitespace() {
                    if let Some(a) = word.strip_prefix("api=") {
                        daemon.api = a.parse().expect("api address");
                    }
                    if let Some(a) = word.strip_prefix("admin=") {
                        daemon.admin = a.parse().expect("admin address");
                    }
                    if let Some(a) = word.strip_prefix("public_log=") {
                        daemon.public_log = Some(a.parse().expect("public log address"));
                    }
                }
                return Ok(daemon);
            }
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next sd_notify datagram, if one arrives within `timeout`.
    pub fn recv_notify(&self, timeout: Duration) -> Option<String> {
        self.notify
            .set_read_timeout(Some(timeout))
            .expect("socket timeout");
        let mut buf = [0u8; 4096];
        match self.notify.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Waits for a datagram containing the line `line`; returns it.
    pub fn expect_notify(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(m) = self.recv_notify(Duration::from_millis(200)) {
                if m.lines().any(|l| l == line) {
                    return m;
                }
            }
        }
        panic!("no {line} notification; stderr:\n{}", self.stderr());
    }

    /// Sends a signal (`rustix::process::Signal::HUP`, …).
    pub fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig)
            .expect("kill");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "lavd did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process exits within `timeout`, else None.
    pub fn wait_exit_or_running(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `GET path` on the admin listener.
    pub fn admin_get(&self, path: &str) -> Response {
        self.admin_request("GET", path)
    }

    /// `method path`, without a body, on the admin listener.
    pub fn admin_request(&self, method: &str, path: &str) -> Response {
        let tcp = TcpStream::connect(self.admin).expect("connect admin");
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Conn::new(tcp)
            .request(method, path, &[], None)
            .expect("admin request")
    }

    /// Polls `/readyz` until it answers `status` (200 or 503).
    pub fn wait_readyz(&self, status: u16) -> Response {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.admin_get("/readyz");
            if r.status == status {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed {} ({}); stderr:\n{}",
                r.status,
                r.text(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the metric `series` reads `value` (the daemon counts
    /// some events just after the client has seen their effect); returns
    /// the last value read.
    pub fn wait_metric(&self, series: &str, value: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(series);
            if now == value || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of one metric line (`name{labels}`), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.admin_get("/metrics").text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(|v| v.parse().expect("metric value"))
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connects to the API with a client certificate.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

impl Client {
    /// A client trusting `server_ca`, presenting `identity`, offering
    /// `versions`.
    pub fn new(
        addr: SocketAddr,
        server_ca: &Ca,
        identity: Option<&Issued>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        Self::trusting(addr, server_ca.cert(), identity, versions)
    }

    /// A client trusting the CA certificate `server_ca`.
    pub fn trusting(
        addr: SocketAddr,
        server_ca: CertificateDer<'static>,
        identity: Option<&Issued>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_ca).expect("server CA");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key())
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Client {
            addr,
            config: Arc::new(config),
        }
    }

    /// The address it connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A new TLS connection, handshake done from the client's side (in TLS
    /// 1.3 the server's verdict on the client certificate arrives with the
    /// first read).
    pub fn connect(&self) -> std::io::Result<TlsConn> {
        self.connect_over(TcpStream::connect(self.addr)?)
    }

    /// As [`Client::connect`], over `tcp`, already connected to
    /// [`Client::addr`] (with socket options of the test's choosing).
    pub fn connect_over(&self, mut tcp: TcpStream) -> std::io::Result<TlsConn> {
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        // Without it, Nagle's algorithm holds the request behind the
        // handshake's last flight until a delayed ACK (~40 ms a connection).
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(std::io::Error::other)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)?;
        }
        Ok(Conn::new(rustls::StreamOwned::new(tls, tcp)))
    }

    /// One request on a new connection.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        self.connect()?.request(method, path, &[], body)
    }

    /// `GET path` on a new connection, returning transport errors.
    pub fn get_raw(&self, path: &str) -> std::io::Result<Response> {
        self.request("GET", path, None)
    }

    /// `GET path` on a new connection, which must succeed at the HTTP level.
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None).expect("request")
    }
}

/// A TLS connection to the API.
pub type TlsConn = Conn<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// An HTTP/1.1 keep-alive connection.
#[derive(Debug)]
pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts the PROTOCOL error shape with `status` and `code`; returns
    /// the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        let error = v["error"].as_object().expect("error object");
        assert_eq!(error.len(), 2, "{v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
        assert_eq!(error["code"], code, "{v}");
        error["message"].as_str().expect("message").to_string()
    }
}

impl<S: Read + Write> Conn<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n");
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        self.send(&bytes)?;
        self.read_response()
    }

    /// Writes raw bytes (and flushes).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Reads one response (with a `content-length`).
    pub fn read_response(&mut self) -> std::io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| std::io::Error::other("response without content-length"))?;
        let start = head_end + 4;
        while self.buf.len() < start + len {
            self.fill()?;
        }
        let body = self.buf[start..start + len].to_vec();
        self.buf.drain(..start + len);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Whether the peer closed the connection (EOF or reset) within
    /// `timeout`, with nothing left unread.
    pub fn closed_within(&mut self, timeout: Duration) -> bool
    where
        S: Read,
    {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let mut chunk = [0u8; 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The TLS alert the server sent, from a failed request's error.
pub fn alert(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Asserts that `result` failed with the TLS alert `expected`.
pub fn assert_alert<T: std::fmt::Debug>(
    result: std::io::Result<T>,
    expected: rustls::AlertDescription,
) {
    match result {
        Ok(v) => panic!("expected alert {expected:?}, got {v:?}"),
        Err(e) => assert_eq!(alert(&e), Some(expected), "error: {e}"),
    }
}

/// Sets the read timeout of a TLS connection's socket.
pub fn set_read_timeout(conn: &mut TlsConn, timeout: Duration) {
    conn.stream()
        .sock
        .set_read_timeout(Some(timeout))
        .expect("set timeout");
}

/// A path inside a token's working directory, as a string for configs.
pub fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// A TCP connection to `to` from the loopback address `from` (any of
/// 127.0.0.0/8 on Linux), for tests of bounds kept per client address.
pub fn tcp_from(from: std::net::Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    rustix::net::bind(&fd, &SocketAddr::from((from, 0)))?;
    rustix::net::connect(&fd, &to)?;
    Ok(TcpStream::from(fd))
}

/// Whether the server closes `tcp` (EOF or a reset) within `within`,
/// without sending anything.
pub fn closed_unanswered(tcp: &mut TcpStream, within: Duration) -> bool {
    tcp.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 16];
    match tcp.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Asserts that `addr` (a listener of `daemon`) holds at most `per_ip`
/// connections from one address, counted before the handshake:
/// - with `per_ip` silent connections held from 127.0.0.1, one more from
///   there is closed unanswered, and the `refused` series reaches 1;
/// - meanwhile 127.0.0.2 is served (`served` makes one request over a
///   fresh TCP connection and returns its status);
/// - once the held ones close, 127.0.0.1 is served again.
pub fn assert_connections_bounded_per_address(
    daemon: &Daemon,
    addr: SocketAddr,
    per_ip: usize,
    refused: &str,
    served: impl Fn(TcpStream) -> u16,
) {
    let here = std::net::Ipv4Addr::new(127, 0, 0, 1);
    let elsewhere = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let held: Vec<TcpStream> = (0..per_ip)
        .map(|_| tcp_from(here, addr).expect("connect"))
        .collect();
    let mut one_more = tcp_from(here, addr).expect("connect");
    assert!(
        closed_unanswered(&mut one_more, Duration::from_secs(5)),
        "a connection over the per-address bound was not closed"
    );
    assert_eq!(daemon.wait_metric(refused, 1.0), 1.0, "{refused}");
    assert_eq!(
        served(tcp_from(elsewhere, addr).expect("connect")),
        200,
        "another address is served"
    );
    drop(held);
    // The daemon sees them close at its next read of each.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = served(tcp_from(here, addr).expect("connect"));
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "127.0.0.1 not served again");
        std::thread::sleep(Duration::from_millis(100));
    }
}
