//! `lavd dev`: a complete development daemon on its own SoftHSM token, in the
//! spirit of `vault server -dev`. In an empty or missing directory it creates
//! everything a demo needs, then serves in the foreground; in a directory it
//! made before, it serves again with the same state.
//!
//! The files are part of the interface (README "Five minutes with lavd"):
//!
//! | path | what |
//! |---|---|
//! | `softhsm2.conf`, `tokens/` | the SoftHSM configuration and token directory |
//! | `pin` | the token's user PIN |
//! | `lavd.toml` | the daemon's config; `lavd serve --config` accepts it too |
//! | `lavd.db` | the store |
//! | `audit.vkey` | the audit log's signed-note verifier key |
//! | `pki/ca.pem` | the CA of every certificate below |
//! | `pki/server.pem`, `pki/server.key` | the API's certificate, for `localhost` and `127.0.0.1` |
//! | `pki/NAME.pem`, `pki/NAME.key` | client certificates: `provider`, `agency`, `auditor`, `admin` |
//! | `authorities/executive.jwk`, `authorities/judicial.jwk` | the two authorities' private ES256 JWKs |
//! | `agency-recipient.jwk`, `agency-recipient.pub.jwk` | the agency's P-256 key pair for opening replies |
//!
//! Nothing here is for production: keys sit in files next to the PIN that
//! protects them, and the CA key is thrown away.

pub mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cryptoki::types::AuthPin;
use time::OffsetDateTime;

use crate::config::{ProcessEnv, Settings};
use crate::hsm::Hsm;
use crate::jwk::P256PrivateKey;
use crate::keys::{self, Validity};
use crate::store::Store;
use crate::warrant::{Algorithm, AuthorityKey};

/// The identities of the demo's four clients, by certificate file name.
pub const CLIENTS: [(&str, &str, &str); 4] = [
    (
        "provider",
        "spiffe://provider.example/messaging",
        "provider",
    ),
    ("agency", "spiffe://agency.example/lea", "agency"),
    ("auditor", "spiffe://oversight.example/auditor", "auditor"),
    ("admin", "spiffe://agency.example/admin", "admin"),
];

/// `lavd dev` arguments.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The directory holding the demo's token, keys, certificates and store.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The API's address (mutual TLS), written into a new directory's
    /// config [default: 127.0.0.1:8443]. An existing directory keeps its
    /// own: one that differs is refused.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The admin listener's address (`/healthz`, `/readyz`, `/metrics`), as
    /// `--listen` [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
}

/// `--listen`'s address for a new directory.
const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8443);
/// `--admin-listen`'s address for a new directory.
const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);

/// Where SoftHSM's module is on Debian-family systems.
const SOFTHSM_MODULES: [&str; 3] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
];

impl DevArgs {
    /// Creates the directory if needed, then serves until SIGTERM/SIGINT.
    ///
    /// # Errors
    /// Anything that stops the set-up or the daemon.
    pub fn run(self) -> anyhow::Result<()> {
        let dir = absolute(&self.dir)?;
        let config = dir.join("lavd.toml");
        let (listen, admin) = if config.exists() {
            eprintln!("lavd dev: using the existing {}", dir.display());
            let settings = crate::config::Settings::load(&config, &crate::config::ProcessEnv)?;
            let kept = (settings.server.listen, settings.admin.listen);
            for (flag, given, field, has) in [
                ("--listen", self.listen, "server.listen", kept.0),
                ("--admin-listen", self.admin_listen, "admin.listen", kept.1),
            ] {
                if let Some(given) = given.filter(|g| *g != has) {
                    return Err(crate::cli::Refused::new(
                        "usage",
                        format!(
                            "{flag} {given}: the existing {} has {field} = \"{has}\", and an \
                             existing directory keeps its own; edit it there, or give a new \
                             --dir",
                            config.display()
                        ),
                    )
                    .into());
                }
            }
            kept
        } else {
            let listen = self.listen.unwrap_or(DEFAULT_LISTEN);
            let admin = self.admin_listen.unwrap_or(DEFAULT_ADMIN_LISTEN);
            // Refused before anything is written (the config's own check
            // would come after the directory was made).
            if crate::config::same_listener(listen, admin) {
                return Err(crate::cli::Refused::new(
                    "usage",
                    format!(
                        "--admin-listen {admin} takes the address of --listen {listen}: give each \
                         its own"
                    ),
                )
                .into());
            }
            // Written into SoftHSM's configuration, which has no quoting: it
            // cuts a line at `#`, splits it at `=`, and reads at most 1023
            // bytes of it.
            if dir.to_str().is_none_or(|d| {
                d.len() > 900 || d.chars().any(|c| c.is_control() || c == '#' || c == '=')
            }) {
                return Err(crate::cli::Refused::new(
                    "usage",
                    format!(
                        "--dir {}: give a path of UTF-8 text, at most 900 bytes, without control \
                         characters, `#` or `=` (SoftHSM's configuration holds it unquoted)",
                        crate::codec::escape_for_terminal(&dir.to_string_lossy())
                    ),
                )
                .into());
            }
            create(&dir, listen, admin)?;
            (listen, admin)
        };
        print_banner(&dir, listen, admin);
        super::cli::serve::run(super::cli::serve::ServeArgs {
            config: super::cli::ConfigArg { config },
        })
    }
}

fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.is_absolute() {
        return Ok(dir.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("the current directory")?
        .join(dir))
}

fn write(path: &Path, contents: impl AsRef<[u8]>, private: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_ref())
        .with_context(|| format!("writing {}", path.display()))
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    Ok(hex::encode(buf))
}

fn json(value: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// Makes everything in an empty (or missing) `dir`.
fn create(dir: &Path, listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        return Err(crate::cli::Refused::new(
            "usage",
            format!(
                "--dir {} is not empty and has no lavd.toml (a set-up that failed half-way \
                 leaves it so): give an empty or new directory",
                crate::codec::escape_for_terminal(&dir.display().to_string())
            ),
        )
        .into());
    }
    let module = SOFTHSM_MODULES
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            crate::cli::Refused::new(
                "softhsm_missing",
                "SoftHSM 2 is not installed: apt-get install softhsm2 (or run .ci/setup)",
            )
        })?;
    eprintln!("lavd dev: creating {}", dir.display());
    for sub in ["", "tokens", "pki", "authorities"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let softhsm_conf = dir.join("softhsm2.conf");
    write(
        &softhsm_conf,
        format!(
            "# SoftHSM 2 configuration of this lavd dev directory.\n\
             directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
        false,
    )?;
    let pin = random_hex(16)?;
    write(&dir.join("pin"), format!("{pin}\n"), true)?;

    // Certificates.
    let ca = pki::DevCa::new().context("the development CA")?;
    write(&dir.join("pki/ca.pem"), &ca.ca.cert_pem, false)?;
    let server = ca.server().context("the server certificate")?;
    write(&dir.join("pki/server.pem"), &server.cert_pem, false)?;
    write(&dir.join("pki/server.key"), &server.key_pem, true)?;
    for (name, identity, _) in CLIENTS {
        let issued = ca.client(identity).context("a client certificate")?;
        write(
            &dir.join(format!("pki/{name}.pem")),
            &issued.cert_pem,
            false,
        )?;
        write(&dir.join(format!("pki/{name}.key")), &issued.key_pem, true)?;
    }

    // Authorities and the agency's recipient key.
    let executive = AuthorityKey::generate(Algorithm::Es256, "executive-dev")?;
    let judicial = AuthorityKey::generate(Algorithm::Es256, "judicial-dev")?;
    write(
        &dir.join("authorities/executive.jwk"),
        json(&executive.private_jwk()?)?,
        true,
    )?;
    write(
        &dir.join("authorities/judicial.jwk"),
        json(&judicial.private_jwk()?)?,
        true,
    )?;
    let recipient = P256PrivateKey::generate()?;
    write(
        &dir.join("agency-recipient.jwk"),
        json(&recipient.to_private_jwk())?,
        true,
    )?;
    write(
        &dir.join("agency-recipient.pub.jwk"),
        json(&recipient.public().to_jwk())?,
        false,
    )?;

    // Under another name until the token and its keys are made: the
    // directory is "made" once `lavd.toml` is there, and a set-up that
    // failed half-way must not look made (run again, it would serve a
    // directory without its token).
    let config = dir.join("lavd.toml.partial");
    write(
        &config,
        config_text(
            module,
            &softhsm_conf,
            listen,
            admin,
            &serde_json::to_string(&executive.public_jwk()?)?,
            &serde_json::to_string(&judicial.public_jwk()?)?,
        ),
        false,
    )?;

    // The token, its audit key and this month's escrow key.
    let settings = Settings::load(&config, &ProcessEnv)?;
    crate::hsm::init_dev_token(
        &settings.hsm.module,
        &settings.hsm.module_env,
        "lavd-dev",
        &AuthPin::new(random_hex(16)?.into()),
        &AuthPin::new(pin.into()),
    )
    .context("initialising the SoftHSM token")?;
    let store = Store::open_settings(&settings.store)?;
    let hsm = Hsm::open(settings.hsm)?;
    let audit = hsm.generate_audit_key(&settings.audit.key_label)?;
    write(
        &dir.join("audit.vkey"),
        format!(
            "{}\n",
            crate::audit::note::verifier_key(&settings.audit.origin, audit.public.bytes())?
        ),
        false,
    )?;
    let now = OffsetDateTime::now_utc();
    let (kid, validity) = this_month(now)?;
    keys::generate(&hsm, &store, &kid, validity, now)?;
    std::fs::rename(&config, dir.join("lavd.toml"))
        .with_context(|| format!("renaming {} to lavd.toml", config.display()))?;
    Ok(())
}

/// `YYYY-MM` of `now`, valid for the calendar month, retained a year.
fn this_month(now: OffsetDateTime) -> anyhow::Result<(String, Validity)> {
    let start = now.replace_day(1)?.replace_time(time::Time::MIDNIGHT);
    let next = if start.month() == time::Month::December {
        start
            .replace_year(start.year() + 1)?
            .replace_month(time::Month::January)?
    } else {
        start.replace_month(start.month().next())?
    };
    let destroy = next.replace_year(next.year() + 1)?;
    Ok((
        format!("{:04}-{:02}", start.year(), u8::from(start.month())),
        Validity {
            not_before: start,
            not_after: next,
            destroy_after: destroy,
        },
    ))
}

fn config_text(
    module: &Path,
    softhsm_conf: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    executive_jwk: &str,
    judicial_jwk: &str,
) -> String {
    let roles: String = CLIENTS
        .iter()
        .map(|(_, identity, role)| format!("\"{identity}\" = [\"{role}\"]\n"))
        .collect();
    format!(
        r#"# lavd configuration written by `lavd dev`. `lavd serve --config` accepts
# it as is. Relative paths are relative to this file. Every table is
# documented in README.md ("Configuration") and docs/configuration.md.

# The HSM: this directory's own SoftHSM token.
[hsm]
module = {module}
token_label = "lavd-dev"
# The PIN comes from a file or an environment variable, never from here.
pin_file = "pin"
# SoftHSM computes in this process: one session per core (docs/OPERATIONS.md §7).
sessions = {sessions}

# SoftHSM keeps every object destroyed in a session until the module is
# finalised: reset it after this many envelope opens (docs/OPERATIONS.md §7).
[hsm.quirks]
reset_module_after_opens = 10000

# Environment the PKCS#11 module reads when it loads.
[hsm.env]
SOFTHSM2_CONF = {softhsm_conf}

# The store: key metadata, budgets, revocations and the audit log.
[store]
path = "lavd.db"

# The audit log: the Ed25519 key on the token that signs checkpoints, and
# the log's name in them.
[audit]
key_label = "lav-audit"
origin = "lavd.dev/audit"

# The mutual-TLS API.
[server]
listen = "{listen}"
shutdown_grace_secs = 10

[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_cas = ["pki/ca.pem"]

# Operations endpoints, plain HTTP: keep them on loopback.
[admin]
listen = "{admin}"

# Who may do what: a client certificate's URI SAN → roles.
[roles]
{roles}
[limits]
max_batch = 100

[log]
format = "human"
level = "info"

# Who may sign warrants, and the policy: the UK "double lock", one executive
# and one judicial signature.
[[authorities]]
kid = "executive-dev"
role = "executive"
alg = "ES256"
jwk = '{executive_jwk}'
valid_from = "2020-01-01T00:00:00Z"
valid_until = "2100-01-01T00:00:00Z"

[[authorities]]
kid = "judicial-dev"
role = "judicial"
alg = "ES256"
jwk = '{judicial_jwk}'
valid_from = "2020-01-01T00:00:00Z"
valid_until = "2100-01-01T00:00:00Z"

[policy]
[[policy.require]]
role = "executive"
count = 1

[[policy.require]]
role = "judicial"
count = 1
"#,
        // As TOML strings, quoted and escaped.
        module = toml::Value::String(module.display().to_string()),
        softhsm_conf = toml::Value::String(softhsm_conf.display().to_string()),
        sessions = std::thread::available_parallelism().map_or(1, |n| n.get().min(256)),
    )
}

fn print_banner(dir: &Path, listen: SocketAddr, admin: SocketAddr) {
    let d = dir.display();
    let lines = [
        String::new(),
        "==> WARNING: lavd is running in DEVELOPMENT mode.".into(),
        format!("    Its keys live in files next to the PIN that protects them, in {d}."),
        "    Never use dev mode for real escrow keys or real warrants.".into(),
        String::new(),
        format!("API (mutual TLS): https://{listen}    admin: http://{admin}"),
        format!("Config: {d}/lavd.toml (`lavd serve --config` serves the same)"),
        String::new(),
        "Walkthrough (README.md, \"Five minutes with lavd\"), in another terminal:".into(),
        format!("  export D={d} API=https://localhost:{}", listen.port()),
        "  # a provider fetches the escrow keys".into(),
        "  curl -s --cacert $D/pki/ca.pem --cert $D/pki/provider.pem --key $D/pki/provider.key $API/v1/keys"
            .into(),
        "  # then: lavd seal …, lavd warrant new/sign with $D/authorities/*.jwk,".into(),
        "  # curl $API/v1/unwrap with $D/pki/agency.*, lavd open with $D/agency-recipient.jwk,".into(),
        "  # lavd audit verify --key $D/audit.vkey --url $API (auditor certificate)".into(),
        String::new(),
    ];
    for line in lines {
        eprintln!("{line}");
    }
}
