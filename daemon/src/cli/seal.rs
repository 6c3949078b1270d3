//! `lavd seal` (a provider's tool: seal one DEK to an escrow key from the
//! `GET /v1/keys` JWK Set) and `lavd open` (an agency's tool: open an unwrap
//! reply with its recipient key and print the DEKs).
//!
//! Both trust the files they are given (they are the operator's own); they
//! still parse them strictly and refuse anything ambiguous.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context as _;
use serde::Deserialize;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::Refused;

use crate::codec::{b64_decode, format_time, parse_time};
use crate::envelope::reply::{open_reply, Outcome};
use crate::envelope::{seal_envelope, HeaderBuilder, DEK_MAX_LEN, DEK_MIN_LEN};
use crate::jwk::{Jwk, JwkSet, P256PrivateKey, P256PublicKey, LAV_SUITE};

/// A DEK given in hex on the command line, held zeroized and never printed.
#[derive(Clone)]
pub struct DekHex(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for DekHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DekHex(<redacted>)")
    }
}

impl FromStr for DekHex {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = Zeroizing::new(hex::decode(text).map_err(|_| "not hex".to_owned())?);
        if !(DEK_MIN_LEN..=DEK_MAX_LEN).contains(&bytes.len()) {
            return Err(format!(
                "the DEK is {} bytes; expected {DEK_MIN_LEN}..={DEK_MAX_LEN}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }
}

/// Parses `--dek-hex` with an error that never repeats the value: clap's
/// own error for a value parser quotes the value it refused, and this one
/// is a secret (a DEK of the wrong length is still someone's DEK).
#[derive(Debug, Clone, Copy)]
pub struct DekHexParser;

impl clap::builder::TypedValueParser for DekHexParser {
    type Value = DekHex;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<DekHex, clap::Error> {
        let refused = |why: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("--dek-hex: {why} (the value is not repeated here)\n"),
            )
            .with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refused("not hex"))?;
        DekHex::from_str(text).map_err(|e| refused(&e))
    }
}

/// `--time`: RFC 3339 UTC to the second, as the header holds it. A
/// fraction is refused, not dropped: the header would say another time than
/// the one given, and the warrant's window is judged on the header's.
fn parse_time_arg(text: &str) -> Result<OffsetDateTime, String> {
    if text.contains('.') {
        return Err(format!(
            "{text:?} has a fraction of a second; the envelope header holds whole seconds \
             (`2026-11-26T07:25:21Z`)"
        ));
    }
    parse_time(text).map_err(|e| e.to_string())
}

/// `lavd seal`: seal one DEK to an escrow key and print the envelope JSON.
#[derive(Debug, clap::Args)]
pub struct SealArgs {
    /// The escrow keys: the JWK Set served by `GET /v1/keys`.
    #[arg(long, value_name = "FILE")]
    pub jwks: PathBuf,
    /// The escrow key to seal to (for example `2026-11`).
    #[arg(long, value_name = "KID")]
    pub kid: String,
    /// The target identifier (for example `acct:alice@example.com`).
    #[arg(long, value_name = "TARGET")]
    pub target: String,
    /// When the message was sent: RFC 3339 UTC (`2026-11-26T07:25:21Z`).
    #[arg(long, value_name = "TS", value_parser = parse_time_arg)]
    pub time: OffsetDateTime,
    /// This provider's identity: the URI SAN of its client certificate, e.g.
    /// `spiffe://provider.example/mail`. No default: it is bound into the
    /// header and the audit log for good, so a guessed value would be wrong
    /// forever.
    #[arg(long, value_name = "URI", env = "LAV_PROVIDER_ID")]
    pub provider: String,
    /// Optional opaque message reference (at most 256 bytes).
    #[arg(long = "ref", value_name = "REF")]
    pub reference: Option<String>,
    /// The DEK in hex, 16 to 64 bytes. Visible in the process list and the
    /// shell's history: prefer `--dek-file`.
    #[arg(
        long,
        value_name = "HEX",
        required_unless_present = "dek_file",
        value_parser = DekHexParser
    )]
    pub dek_hex: Option<DekHex>,
    /// A file holding the DEK in hex (one line), or `-` for standard input:
    /// kept out of the process list.
    #[arg(long, value_name = "FILE", conflicts_with = "dek_hex")]
    pub dek_file: Option<PathBuf>,
    /// Seal even when `--time` is outside the key's `[not_before,
    /// not_after)`, or the key has no such dates (with a warning each):
    /// PROTOCOL §2 lets providers seal to a key only inside them, and a
    /// key past `not_after` is destroyed at its `destroy_after`, which may
    /// come before the message's own retention ends.
    #[arg(long)]
    pub allow_outside_validity: bool,
}

/// The most a `--dek-file` holds: 64 bytes in hex and a line end, with room.
const MAX_DEK_FILE_BYTES: u64 = 256;

impl SealArgs {
    /// The DEK, from `--dek-hex` or `--dek-file`.
    fn dek(&self) -> anyhow::Result<DekHex> {
        use std::io::Read as _;
        if let Some(dek) = &self.dek_hex {
            return Ok(DekHex(dek.0.clone()));
        }
        let Some(path) = &self.dek_file else {
            return Err(Refused::new("usage", "give the DEK with --dek-file or --dek-hex").into());
        };
        // Room for the bound and the byte that shows it exceeded: read_to_end
        // never reallocates, so no freed buffer keeps DEK hex behind.
        let mut text = Zeroizing::new(Vec::with_capacity(MAX_DEK_FILE_BYTES as usize + 1));
        let read = if path.as_os_str() == "-" {
            std::io::stdin()
                .lock()
                .take(MAX_DEK_FILE_BYTES + 1)
                .read_to_end(&mut text)
        } else {
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_DEK_FILE_BYTES + 1).read_to_end(&mut text))
        };
        read.map_err(|e| {
            Refused::new(
                "input_unreadable",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let invalid = |why: &str| Refused::new("invalid_dek", format!("{}: {why}", path.display()));
        if text.len() as u64 > MAX_DEK_FILE_BYTES {
            return Err(invalid(&format!(
                "more than {MAX_DEK_FILE_BYTES} bytes: not a DEK in hex"
            ))
            .into());
        }
        let text = std::str::from_utf8(&text).map_err(|_| invalid("not hex"))?;
        Ok(DekHex::from_str(text.trim_end_matches(['\n', '\r'])).map_err(|e| invalid(&e))?)
    }
}

impl SealArgs {
    /// Seals and prints the envelope JSON on stdout; warnings go to stderr.
    ///
    /// # Errors
    /// An unreadable or invalid JWK Set, a `kid` that is not in it (or is in
    /// it twice), a key that is not an `enc` key of suite `16-1-2`, or a
    /// header the daemon would refuse.
    pub fn run(self) -> anyhow::Result<()> {
        super::stdout_errors(
            self.run_with(&mut std::io::stdout().lock(), &mut std::io::stderr().lock()),
        )
    }

    /// [`SealArgs::run`] writing to the given streams.
    ///
    /// # Errors
    /// As [`SealArgs::run`].
    pub fn run_with(self, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<()> {
        let jwks = read_file(&self.jwks)?;
        let set: JwkSet = crate::codec::from_object_slice(&jwks).map_err(|e| {
            Refused::new(
                "jwks_malformed",
                format!("{}: not a JWK Set: {e}", self.jwks.display()),
            )
        })?;
        // A published escrow key never carries its private half (it never
        // leaves the HSM): a set in which any key does is not the escrow
        // service's, or its publisher has leaked a key. Nothing is sealed
        // with it.
        if let Some(leaked) = set.keys.iter().find(|k| k.d.is_some()) {
            return Err(Refused::new(
                "jwks_private_key",
                format!(
                    "{}: key {:?} carries a private key (`d`): a published escrow key never \
                     does; seal nothing with this set, and tell its publisher",
                    self.jwks.display(),
                    leaked.kid.as_deref().unwrap_or("(no kid)")
                ),
            )
            .into());
        }
        let named = |code: &'static str, why: &str| {
            Refused::new(
                code,
                format!("{}: key `{}`: {why}", self.jwks.display(), self.kid),
            )
        };
        let jwk = find_key(&set, &self.kid).map_err(|(code, why)| named(code, &why))?;
        let public = P256PublicKey::from_jwk(jwk)
            .map_err(|e| named("jwks_key_unusable", &format!("not a valid P-256 key: {e}")))?;
        let warnings =
            validity_warnings(jwk, self.time).map_err(|why| named("jwks_key_unusable", &why))?;
        if !warnings.is_empty() && !self.allow_outside_validity {
            return Err(named(
                "jwks_key_unusable",
                &format!(
                    "{}: not sealed (providers seal to a key only inside its validity, \
                     PROTOCOL §2; pick the key whose validity holds --time, or give \
                     --allow-outside-validity)",
                    warnings.join("; ")
                ),
            )
            .into());
        }
        for warning in warnings {
            writeln!(err, "warning: key `{}`: {warning}", self.kid)?;
        }

        let mut header = HeaderBuilder::new(&self.kid, &self.provider, &self.target, self.time);
        if let Some(reference) = &self.reference {
            header = header.reference(reference);
        }
        let header = header.build().context("invalid header")?;
        let dek = self.dek()?;
        let envelope = seal_envelope(&public, &header, &dek.0).context("sealing")?;
        writeln!(out, "{}", envelope.to_json())?;
        Ok(())
    }
}

/// The one key named `kid`, usable for sealing; else the refusal's code
/// and why.
fn find_key<'a>(set: &'a JwkSet, kid: &str) -> Result<&'a Jwk, (&'static str, String)> {
    let mut matches = set.keys.iter().filter(|k| k.kid.as_deref() == Some(kid));
    let jwk = matches.next().ok_or_else(|| {
        let known: Vec<&str> = set.keys.iter().filter_map(|k| k.kid.as_deref()).collect();
        (
            "jwks_kid_unknown",
            format!("not in the set (it has: {})", known.join(", ")),
        )
    })?;
    if matches.next().is_some() {
        return Err((
            "jwks_kid_ambiguous",
            "appears more than once in the set".to_owned(),
        ));
    }
    if jwk.lav_suite.as_deref() != Some(LAV_SUITE) {
        return Err((
            "jwks_key_unusable",
            format!(
                "`lav_suite` is {:?}, not {LAV_SUITE:?}: this tool only seals with suite \
                 {LAV_SUITE}",
                jwk.lav_suite
            ),
        ));
    }
    if jwk.use_.as_deref() != Some("enc") {
        return Err((
            "jwks_key_unusable",
            format!("`use` is {:?}, not \"enc\"", jwk.use_),
        ));
    }
    Ok(jwk)
}

/// What is wrong when `time` is outside the key's `[not_before, not_after)`
/// or the key lacks one of them: the daemon would still open it, but the
/// provider would be sealing to a key outside its published sealing
/// period. `Err` for dates that are not dates, or a window that holds no
/// time at all.
fn validity_warnings(jwk: &Jwk, time: OffsetDateTime) -> Result<Vec<String>, String> {
    if let (Some(from), Some(to)) = (jwk.not_before.as_deref(), jwk.not_after.as_deref()) {
        if let (Ok(a), Ok(b)) = (parse_time(from), parse_time(to)) {
            if a >= b {
                return Err(format!(
                    "its not_before {from} is not before its not_after {to}: no time is inside it"
                ));
            }
        }
    }
    let mut warnings = Vec::new();
    match jwk.not_before.as_deref() {
        None => warnings.push("has no `not_before`".to_owned()),
        Some(text) => {
            let not_before =
                parse_time(text).map_err(|e| format!("`not_before` is not RFC 3339 UTC: {e}"))?;
            if time < not_before {
                warnings.push(format!(
                    "time {} is before its not_before {text}",
                    format_time(time)
                ));
            }
        }
    }
    match jwk.not_after.as_deref() {
        None => warnings.push("has no `not_after`".to_owned()),
        Some(text) => {
            let not_after =
                parse_time(text).map_err(|e| format!("`not_after` is not RFC 3339 UTC: {e}"))?;
            if time >= not_after {
                warnings.push(format!(
                    "time {} is at or after its not_after {text}",
                    format_time(time)
                ));
            }
        }
    }
    Ok(warnings)
}

/// `lavd open`: open an unwrap reply and print one line per envelope.
#[derive(Debug, clap::Args)]
pub struct OpenArgs {
    /// The warrant's recipient key: a private P-256 JWK (with `d`).
    #[arg(long, value_name = "JWK_FILE")]
    pub recipient_key: PathBuf,
    /// The unwrap request body that was sent: `{"warrant":…,"envelopes":[…]}`.
    #[arg(long, value_name = "FILE")]
    pub request: PathBuf,
    /// The reply body that came back.
    #[arg(long, value_name = "FILE")]
    pub reply: PathBuf,
}

/// The unwrap request, read only for its envelopes' header bytes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnwrapRequest {
    // Required so a file that is not an unwrap request is refused; its
    // content is the daemon's concern, not this tool's.
    #[allow(dead_code)]
    warrant: serde::de::IgnoredAny,
    envelopes: Vec<serde_json::Value>,
}

impl OpenArgs {
    /// Opens the reply and prints, one line per request envelope and
    /// tab-separated: the envelope's `ref` as a JSON string (or `#<index>`
    /// when it has none), the status, and the DEK in hex (`ok`) or the
    /// reason (`denied`). The audit position goes to stderr.
    ///
    /// # Errors
    /// Unreadable files, a key file that is not a private P-256 JWK, or any
    /// [`crate::envelope::reply::ReplyError`]: no line is printed unless every
    /// `ok` result opens.
    ///
    /// # Security
    /// Prints DEKs on stdout: that is this tool's purpose.
    pub fn run(self) -> anyhow::Result<()> {
        super::stdout_errors(
            self.run_with(&mut std::io::stdout().lock(), &mut std::io::stderr().lock()),
        )
    }

    /// [`OpenArgs::run`] writing to the given streams.
    ///
    /// # Errors
    /// As [`OpenArgs::run`].
    pub fn run_with(self, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<()> {
        let key_file = Zeroizing::new(read_file(&self.recipient_key)?);
        let malformed = |why: String| {
            Refused::new(
                "recipient_key_malformed",
                format!("{}: {why}", self.recipient_key.display()),
            )
        };
        let jwk = Jwk::from_json(&key_file).map_err(|e| malformed(format!("not a JWK: {e}")))?;
        let key = P256PrivateKey::from_jwk(&jwk)
            .map_err(|e| malformed(format!("not a private P-256 JWK: {e}")))?;

        let request: UnwrapRequest = crate::codec::from_object_slice(&read_file(&self.request)?)
            .map_err(|e| {
                Refused::new(
                    "request_malformed",
                    format!("{}: not an unwrap request: {e}", self.request.display()),
                )
            })?;
        // An envelope whose header does not decode was denied by the daemon;
        // an empty aad makes any `ok` claimed for it fail to open.
        let headers: Vec<Vec<u8>> = request
            .envelopes
            .iter()
            .map(|e| {
                e.get("header")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|h| b64_decode(h).ok())
                    .unwrap_or_default()
            })
            .collect();

        let opened = open_reply(&key, &headers, &read_file(&self.reply)?)
            .with_context(|| format!("{}: cannot open the reply", self.reply.display()))?;
        for result in &opened.results {
            // The provider's `ref`, quoted, with what could reorder or
            // forge the terminal's text escaped (JSON escapes only C0).
            let label = match &result.reference {
                Some(r) => crate::codec::escape_for_terminal(&serde_json::to_string(r)?),
                None => format!("#{}", result.index),
            };
            // At its final size from the start: a buffer grown as the hex
            // is written would free copies of the key's prefix unwiped.
            let mut line = Zeroizing::new(String::with_capacity(
                label.len() + "\tdenied\t".len() + 2 * crate::envelope::DEK_MAX_LEN,
            ));
            match &result.outcome {
                Outcome::Ok(dek) => {
                    write!(line, "{label}\tok\t")?;
                    for byte in dek.iter() {
                        write!(line, "{byte:02x}")?;
                    }
                }
                Outcome::Denied(reason) => {
                    write!(line, "{label}\tdenied\t{}", reason.as_str())?;
                }
            }
            writeln!(out, "{}", line.as_str())?;
        }
        writeln!(
            err,
            "audit: {} leaves from index {} (checkpoint not verified by this tool)",
            opened.audit.count, opened.audit.first_index
        )?;
        Ok(())
    }
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(super::read_input(path)?)
}
