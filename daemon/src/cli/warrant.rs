//! `lavd warrant …`: tools for authorities and operators, not the daemon.
//!
//! - `new`: an unsigned warrant from flags or a claims JSON file;
//! - `sign`: adds one authority's signature (authorities sign in turn);
//! - `inspect`: claims, signers, and whether a trust config accepts it;
//! - `keygen`: a fresh authority key (private JWK file, public JWK).
//!
//! Every file is parsed with the daemon's own strict parsers, so a warrant
//! these tools produce is one the daemon can accept, and `inspect` gives the
//! daemon's exact refusal code.

use super::{out, outln};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use time::OffsetDateTime;

use crate::codec::{b64_encode, format_time_exact, parse_time};
use crate::jwk::Jwk;
use crate::warrant::sign::{add_signature, unsigned_warrant};
use crate::warrant::{
    jws, Algorithm, AuthorityKey, Claims, TrustStore, Verifier, WarrantError, WarrantLimits,
};

/// `lavd warrant` subcommands.
// Parsed once per process: the size of the largest variant does not matter,
// and boxing it would only make the type harder to build in tests.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum WarrantCommand {
    /// Write an unsigned warrant, from claims given as flags or as a JSON file.
    New(NewArgs),
    /// Add one authority's signature to a warrant.
    Sign(SignArgs),
    /// Show a warrant's claims and signers, and whether a trust config accepts it.
    Inspect(InspectArgs),
    /// Generate an authority signing key: a private JWK file and its public JWK.
    Keygen(KeygenArgs),
}

/// `lavd warrant new`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NewArgs {
    /// Claims JSON file (PROTOCOL §4 table); replaces all claim flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "id", "legal_basis", "agency", "recipient", "targets", "window_from", "window_to",
        "not_before", "expires", "max_unwraps", "kids", "emergency",
    ])]
    pub claims: Option<PathBuf>,
    /// Warrant id (the authorisation reference, ≤ 128 characters).
    #[arg(long)]
    pub id: Option<String>,
    /// Statute or legal type.
    #[arg(long)]
    pub legal_basis: Option<String>,
    /// Identity (URI SAN) of the agency that may execute it.
    #[arg(long)]
    pub agency: Option<String>,
    /// The agency's P-256 public JWK file; results are sealed to it.
    #[arg(long, value_name = "JWK_FILE")]
    pub recipient: Option<PathBuf>,
    /// A target identifier (repeat for each).
    #[arg(long = "target", value_name = "TARGET")]
    pub targets: Vec<String>,
    /// Envelope time window start (RFC 3339 UTC, inclusive).
    #[arg(long)]
    pub window_from: Option<String>,
    /// Envelope time window end (RFC 3339 UTC, exclusive).
    #[arg(long)]
    pub window_to: Option<String>,
    /// Executable from (RFC 3339 UTC).
    #[arg(long)]
    pub not_before: Option<String>,
    /// Executable until (RFC 3339 UTC, exclusive).
    #[arg(long)]
    pub expires: Option<String>,
    /// The most envelopes it may ever open.
    #[arg(long)]
    pub max_unwraps: Option<u64>,
    /// An escrow key it may use (repeat; omit for any).
    #[arg(long = "kid", value_name = "KID")]
    pub kids: Vec<String>,
    /// An urgent warrant under the policy's emergency rule.
    #[arg(long)]
    pub emergency: bool,
    /// Output file (default: standard output).
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `lavd warrant sign`.
#[derive(Debug, Clone, clap::Args)]
pub struct SignArgs {
    /// The authority's private JWK file (must carry `kid`).
    #[arg(long, value_name = "AUTHORITY_JWK")]
    pub key: PathBuf,
    /// The warrant to sign.
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Output file (default: standard output).
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Sign only if the claims' digest is this one (`lavd warrant inspect`
    /// prints it on its `digest` line, `sha-256 …`; with or without that
    /// prefix): what was reviewed is what is signed.
    // A base64url digest may begin with `-` (one in 64): taken as the
    // value, not as another option; a value that is no digest (`--in`, when
    // the digest was left out) is refused by its shape.
    #[arg(
        long,
        value_name = "SHA256",
        allow_hyphen_values = true,
        value_parser = digest_arg
    )]
    pub expect_digest: Option<String>,
}

/// `lavd warrant inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// The warrant file.
    pub file: PathBuf,
    /// Trust config (TOML with `[[authorities]]` and `[policy]`) to check it against.
    #[arg(long, value_name = "FILE")]
    pub trust: Option<PathBuf>,
    /// Check as if this agency identity presented it (default: the warrant's own).
    #[arg(long)]
    pub agency: Option<String>,
    /// Check at this time (RFC 3339 UTC; default: now).
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// List every target (by default the first 10 and how many more).
    #[arg(long)]
    pub all_targets: bool,
}

/// `lavd warrant keygen`.
#[derive(Debug, Clone, clap::Args)]
pub struct KeygenArgs {
    /// `ES256` or `EdDSA` (an authority's signing key), or `ECDH-ES` (an
    /// agency's recipient key, P-256, `use` `enc`: what `lavd warrant new
    /// --recipient` takes and `lavd open --recipient-key` opens with).
    #[arg(long, default_value = "ES256")]
    pub alg: String,
    /// The key's kid: an authority's, as it will appear in the trust
    /// config.
    #[arg(long)]
    pub kid: String,
    /// Private JWK file to create (mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Public JWK file (default: standard output).
    #[arg(long, value_name = "FILE")]
    pub public_out: Option<PathBuf>,
}

/// `inspect` found that the trust config refuses the warrant. `main` prints
/// it and exits non-zero.
#[derive(Debug, thiserror::Error)]
#[error("warrant not accepted: {code}: {message}")]
pub struct NotAccepted {
    /// The daemon's refusal code (e.g. `policy_not_met`).
    pub code: &'static str,
    /// The refusal message.
    pub message: String,
}

/// The outcome of checking against a trust config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No `--trust` given: nothing was verified.
    NotChecked,
    /// The trust config accepts the warrant at that time for that agency.
    Accepted,
    /// Refused, with the daemon's exact code and message.
    Refused {
        /// The refusal code.
        code: &'static str,
        /// The refusal message.
        message: String,
    },
}

/// What `inspect` prints, and its verdict.
#[derive(Debug, Clone)]
pub struct InspectReport {
    /// Human-readable report.
    pub text: String,
    /// The verdict.
    pub verdict: Verdict,
}

impl WarrantCommand {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// Any I/O or parse failure, naming the file; for `inspect`, a
    /// [`NotAccepted`] when the trust config refuses the warrant.
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Self::New(args) => {
                let out = args.build()?;
                write_output(args.out.as_deref(), &out, WARRANT_FILE_MODE)
            }
            Self::Sign(args) => {
                let out = args.build()?;
                write_output(args.out.as_deref(), &out, WARRANT_FILE_MODE)
            }
            Self::Inspect(args) => {
                let report = args.report()?;
                out!("{}", report.text);
                match report.verdict {
                    Verdict::Refused { code, message } => Err(NotAccepted { code, message }.into()),
                    Verdict::Accepted | Verdict::NotChecked => Ok(()),
                }
            }
            Self::Keygen(args) => args.run(),
        }
    }
}

/// Only its owner may read a warrant or a revocation file: it names
/// surveillance targets.
const WARRANT_FILE_MODE: u32 = 0o600;

/// Writes `text` to `path` (created with `mode`, less the umask), or to
/// stdout. The file takes its name whole or not at all (`--out` may be
/// `--in`'s file: a failed write must not lose the signatures it held).
fn write_output(path: Option<&Path>, text: &str, mode: u32) -> anyhow::Result<()> {
    match path {
        Some(path) => {
            super::audit::write_atomically_with_mode(path, format!("{text}\n").as_bytes(), mode)
                .map_err(|e| {
                    super::Refused::new(
                        "output_unwritable",
                        format!("writing {}: {e}", path.display()),
                    )
                    .into()
                })
        }
        None => {
            outln!("{text}");
            Ok(())
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(super::read_input(path)?)
}

/// A flag `lavd warrant new` needs without `--claims`: a usage error (exit 2).
fn missing(flag: &str) -> anyhow::Error {
    super::Refused::new("usage", format!("--{flag} is required (or give --claims)")).into()
}

/// `--expect-digest`: a SHA-256 digest in unpadded base64url (43
/// characters), as `lavd warrant inspect` prints it, with or without its
/// `sha-256 ` prefix.
fn digest_arg(text: &str) -> Result<String, String> {
    let text = text.trim();
    let digest = text.strip_prefix("sha-256 ").unwrap_or(text).trim();
    let shaped = digest.len() == 43
        && digest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if shaped {
        Ok(digest.to_string())
    } else {
        Err("not a SHA-256 digest in base64url (43 characters), as `lavd warrant inspect` prints it".into())
    }
}

/// A time flag that is not RFC 3339 UTC: a usage error (exit 2) naming the
/// flag, as clap's own parse of `lavd keys`' time flags is.
fn bad_time(flag: &str, text: &str, e: &crate::codec::CodecError) -> anyhow::Error {
    super::Refused::new(
        "usage",
        format!(
            "--{flag} `{}`: {e}",
            crate::codec::escape_for_terminal(text)
        ),
    )
    .into()
}

/// The recipient file is not the agency's public P-256 JWK.
fn bad_recipient(path: &std::path::Path, why: impl std::fmt::Display) -> anyhow::Error {
    super::Refused::new(
        "recipient_key_malformed",
        format!("recipient {}: {why}", path.display()),
    )
    .into()
}

fn time_flag(name: &str, value: Option<&str>) -> anyhow::Result<String> {
    let text = value.ok_or_else(|| missing(name))?;
    let t = parse_time(text).map_err(|e| bad_time(name, text, &e))?;
    // The instant given, fraction and all: the claims an authority signs
    // say what was asked (`format_time` would drop a fraction).
    Ok(format_time_exact(t))
}

impl NewArgs {
    /// The claims payload bytes: the `--claims` file as it is, or JSON built
    /// from the flags.
    ///
    /// # Errors
    /// A missing flag, an unreadable file, a bad time or recipient key.
    pub fn payload(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(path) = &self.claims {
            return read(path);
        }
        let required = |name: &str, v: &Option<String>| -> anyhow::Result<String> {
            v.clone().ok_or_else(|| missing(name))
        };
        // Checked in the order of `--help`, so the first missing flag is named.
        let id = required("id", &self.id)?;
        let legal_basis = required("legal-basis", &self.legal_basis)?;
        let agency = required("agency", &self.agency)?;
        let recipient_path = self
            .recipient
            .as_ref()
            .ok_or_else(|| missing("recipient"))?;
        let jwk =
            Jwk::from_json(&read(recipient_path)?).map_err(|e| bad_recipient(recipient_path, e))?;
        // The claims' one rule for a recipient (a signing key or an escrow
        // key is none), not a looser one of its own: the members it would
        // refuse are not in the claims built below.
        let recipient = crate::warrant::claims::recipient_key(&jwk)
            .map_err(|e| bad_recipient(recipient_path, e))?;
        if self.targets.is_empty() {
            return Err(super::Refused::new(
                "usage",
                "at least one --target is required (or give --claims)",
            )
            .into());
        }
        let mut claims = serde_json::json!({
            "id": id,
            "legal_basis": legal_basis,
            "agency": agency,
            "recipient": recipient.to_jwk(),
            "targets": self.targets,
            "window": {
                "from": time_flag("window-from", self.window_from.as_deref())?,
                "to": time_flag("window-to", self.window_to.as_deref())?,
            },
            "not_before": time_flag("not-before", self.not_before.as_deref())?,
            "expires": time_flag("expires", self.expires.as_deref())?,
            "max_unwraps": self.max_unwraps.ok_or_else(|| missing("max-unwraps"))?,
        });
        if !self.kids.is_empty() {
            claims["kids"] = serde_json::json!(self.kids);
        }
        if self.emergency {
            claims["emergency"] = serde_json::Value::Bool(true);
        }
        Ok(claims.to_string().into_bytes())
    }

    /// The unsigned warrant JSON, after checking the claims strictly.
    ///
    /// # Errors
    /// As [`Self::payload`], or the claims' [`WarrantError`].
    pub fn build(&self) -> anyhow::Result<String> {
        let payload = self.payload()?;
        // Its code is printed by `error_code`.
        unsigned_warrant(&payload).map_err(anyhow::Error::from)
    }
}

impl SignArgs {
    /// The warrant with one more signature.
    ///
    /// # Errors
    /// An unreadable or invalid key or warrant, or a repeated signer.
    pub fn build(&self) -> anyhow::Result<String> {
        // The file holds the private key (`d`): wiped once read.
        let bytes = zeroize::Zeroizing::new(read(&self.key)?);
        let jwk = Jwk::from_json(&bytes).map_err(|e| {
            super::Refused::new(
                "invalid_authority_key",
                format!("authority key {}: {e}", self.key.display()),
            )
        })?;
        let key = AuthorityKey::from_jwk(&jwk)
            .with_context(|| format!("authority key {}", self.key.display()))?;
        let warrant = read(&self.input)?;
        let limits = WarrantLimits::default();
        // Said before signing, and held to `--expect-digest`: the claims
        // signed are the ones reviewed.
        let jws =
            jws::parse(&warrant, &limits).with_context(|| self.input.display().to_string())?;
        let digest = b64_encode(crate::warrant::claims::sha256(jws.payload()));
        if let Some(expected) = &self.expect_digest {
            // Shaped by `digest_arg`, its prefix gone.
            if *expected != digest {
                return Err(super::Refused::new(
                    "digest_mismatch",
                    format!(
                        "{}: the claims' digest is sha-256 {digest}, not the --expect-digest \
                         given ({}); nothing was signed",
                        self.input.display(),
                        crate::codec::escape_for_terminal(expected)
                    ),
                )
                .into());
            }
        }
        eprintln!(
            "signing {} as {}: claims digest sha-256 {digest}",
            self.input.display(),
            crate::codec::escape_for_terminal(key.kid())
        );
        add_signature(&warrant, &key, &limits).with_context(|| self.input.display().to_string())
    }
}

impl InspectArgs {
    /// Builds the report and the verdict.
    ///
    /// # Errors
    /// An unreadable file, an invalid trust config or `--at`, or (without
    /// `--trust`) a warrant that does not even parse.
    pub fn report(&self) -> anyhow::Result<InspectReport> {
        let bytes = read(&self.file)?;
        let at = match &self.at {
            Some(text) => parse_time(text).map_err(|e| bad_time("at", text, &e))?,
            None => OffsetDateTime::now_utc(),
        };
        let trust = self
            .trust
            .as_ref()
            .map(|path| TrustStore::load(path))
            .transpose()?;
        let mut text = String::new();
        let limits = WarrantLimits::default();
        let parsed = match jws::parse(&bytes, &limits) {
            Ok(p) => Some(p),
            // The verdict below gives the exact refusal.
            Err(_) if trust.is_some() => {
                text.push_str(&format!(
                    "{}: not a well-formed warrant\n",
                    self.file.display()
                ));
                None
            }
            Err(e) => return Err(anyhow::Error::new(e).context(self.file.display().to_string())),
        };
        let mut agency = self.agency.clone();
        if let Some(jws) = &parsed {
            match Claims::parse(jws.payload()) {
                Ok(claims) => {
                    describe_claims(&mut text, &claims, jws.payload(), self.all_targets);
                    if agency.is_none() {
                        agency = Some(claims.agency.clone());
                    }
                }
                Err(e) => text.push_str(&format!("claims: {}: {e}\n", e.code())),
            }
            text.push_str(&format!("signatures: {}\n", jws.signatures().len()));
            for sig in jws.signatures() {
                let role = trust
                    .as_ref()
                    .and_then(|t| t.authority(sig.kid()))
                    .map_or("not a configured authority", |a| a.role());
                let role = if trust.is_some() {
                    role
                } else {
                    "(no trust config)"
                };
                text.push_str(&format!(
                    "  {:<24} {:<6} {role}\n",
                    sig.kid(),
                    sig.alg().name()
                ));
            }
        }
        let verdict = match trust {
            None => {
                text.push_str("verdict: not checked (give --trust FILE)\n");
                Verdict::NotChecked
            }
            Some(trust) => {
                let agency_note = if self.agency.is_some() {
                    ""
                } else {
                    " (the warrant's own agency)"
                };
                let caller = agency.unwrap_or_default();
                let verifier = Verifier::new(trust, limits);
                match verifier.verify(&bytes, at, &caller) {
                    Ok(w) => {
                        text.push_str(&format!(
                            "verdict: accepted at {} for agency `{caller}`{agency_note}; usable until {}{}\n",
                            format_time_exact(at),
                            format_time_exact(w.usable_until()),
                            if w.is_emergency() { " (emergency)" } else { "" },
                        ));
                        text.push_str(
                            "  (revocation and id conflicts are checked by the daemon's store)\n",
                        );
                        Verdict::Accepted
                    }
                    Err(e) => {
                        text.push_str(&format!(
                            "verdict: refused at {}: {}: {e}\n",
                            format_time_exact(at),
                            e.code()
                        ));
                        Verdict::Refused {
                            code: e.code(),
                            message: e.to_string(),
                        }
                    }
                }
            }
        };
        Ok(InspectReport { text, verdict })
    }
}

fn describe_claims(text: &mut String, c: &Claims, payload: &[u8], all_targets: bool) {
    const SHOWN_TARGETS: usize = 10;
    let shown_targets = if all_targets {
        c.targets.len()
    } else {
        SHOWN_TARGETS
    };
    let shown: Vec<&str> = c
        .targets
        .iter()
        .take(shown_targets)
        .map(String::as_str)
        .collect();
    let more = c.targets.len().saturating_sub(shown_targets);
    let lines = [
        ("id", c.id.clone()),
        ("legal_basis", c.legal_basis.clone()),
        ("agency", c.agency.clone()),
        (
            "recipient",
            format!("P-256 key, thumbprint {}", c.recipient.thumbprint()),
        ),
        (
            "targets",
            format!(
                "{}: {}{}",
                c.targets.len(),
                shown.join(", "),
                if more > 0 {
                    format!(", … ({more} more)")
                } else {
                    String::new()
                }
            ),
        ),
        (
            "window",
            format!(
                "[{}, {})",
                format_time_exact(c.window.from),
                format_time_exact(c.window.to)
            ),
        ),
        (
            "valid",
            format!(
                "[{}, {})",
                format_time_exact(c.not_before),
                format_time_exact(c.expires)
            ),
        ),
        ("max_unwraps", c.max_unwraps.to_string()),
        (
            "kids",
            c.kids.as_ref().map_or("any".to_string(), |k| k.join(", ")),
        ),
        (
            "emergency",
            if c.emergency { "yes" } else { "no" }.to_string(),
        ),
        (
            "digest",
            format!(
                "sha-256 {}",
                b64_encode(crate::warrant::claims::sha256(payload))
            ),
        ),
    ];
    // Escaped: a target or kid may hold bidirectional or other format
    // characters (their bounds allow them), which must not reorder what
    // the terminal shows.
    for (name, value) in lines {
        let value = crate::codec::escape_for_terminal(&value);
        text.push_str(&format!("{name:<12} {value}\n"));
    }
}

impl KeygenArgs {
    fn run(&self) -> anyhow::Result<()> {
        if self.public_out.as_deref() == Some(self.out.as_path()) {
            return Err(super::Refused::new(
                "usage",
                "--out and --public-out name the same file: the public key would replace the \
                 private one",
            )
            .into());
        }
        let (private, public) = if self.alg == RECIPIENT_ALG {
            // Checked by the one rule for a warrant's recipient before it
            // is written.
            let key = crate::jwk::P256PrivateKey::generate()?;
            let public = Jwk {
                kid: Some(self.kid.clone()),
                use_: Some("enc".into()),
                alg: Some(RECIPIENT_ALG.into()),
                ..key.public().to_jwk()
            };
            crate::warrant::claims::recipient_key(&public)
                .map_err(|e| super::Refused::new("usage", format!("--kid: {e}")))?;
            let private = Jwk {
                d: key.to_private_jwk().d,
                ..public.clone()
            };
            (
                zeroize::Zeroizing::new(serde_json::to_string(&private)?),
                serde_json::to_string(&public)?,
            )
        } else {
            let alg = Algorithm::from_name(&self.alg).map_err(|e: WarrantError| {
                super::Refused::new("usage", format!("--alg: {e}, or {RECIPIENT_ALG}"))
            })?;
            let key = AuthorityKey::generate(alg, &self.kid)?;
            (
                zeroize::Zeroizing::new(serde_json::to_string(&key.private_jwk()?)?),
                serde_json::to_string(&key.public_jwk()?)?,
            )
        };
        write_private(&self.out, &private)?;
        // The same file under another spelling (`d/../k.jwk`, a link), now
        // that the private one exists to compare with: the public half's
        // rename would replace it. The public half's temporary file (`write_atomically_with_mode`
        // removes a stale one first) must not be the private one either.
        #[cfg(unix)]
        if let Some(public_out) = &self.public_out {
            use std::os::unix::fs::MetadataExt as _;
            let private_file = std::fs::metadata(&self.out);
            let public_files = [
                std::fs::metadata(public_out),
                std::fs::metadata(public_out.with_extension("partial-download")),
            ];
            let same = |b: &std::io::Result<std::fs::Metadata>| match (&private_file, b) {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            };
            if public_files.iter().any(same) {
                let _ = std::fs::remove_file(&self.out);
                return Err(super::Refused::new(
                    "usage",
                    "--out is --public-out, or the file the public half is written to first \
                     (its name with the extension `partial-download`): the public key would \
                     replace or remove the private one",
                )
                .into());
            }
        }
        // A public half that cannot be written takes the private one with
        // it: a private key whose public half nobody has would stop a rerun
        // (keygen never overwrites a key) and serve no one.
        write_output(self.public_out.as_deref(), &public, 0o644).inspect_err(|_| {
            if let Err(e) = std::fs::remove_file(&self.out) {
                eprintln!(
                    "warning: could not remove {} after the public key failed: {e}",
                    self.out.display()
                );
            }
        })
    }
}

/// `lavd warrant keygen --alg` for an agency's recipient key.
const RECIPIENT_ALG: &str = "ECDH-ES";

/// Creates a new file readable only by its owner; never overwrites a key.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .inspect_err(|_| {
            // Created by this run (`create_new`): a partial key is removed,
            // so that the same command can run again.
            let _ = std::fs::remove_file(path);
        })
        .with_context(|| format!("writing {}", path.display()))
}
