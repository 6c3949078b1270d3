//! C2SP signed notes (`c2sp.org/signed-note`) carrying C2SP transparency log
//! checkpoints (`c2sp.org/tlog-checkpoint`), with Ed25519 signatures
//! (signature type `0x01`).
//!
//! A checkpoint body is three lines: the origin, the tree size in decimal,
//! the base64 (RFC 4648 §4, padded) root hash, each ending in `\n`. A signed
//! note is the body, a blank line, then lines `— <key name> <base64(key ID ‖
//! signature)>\n` (U+2014 em dash). The key ID is the first four bytes of
//! `SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)`; a verifier key string is
//! `<name>+<hex key ID>+<base64(0x01 ‖ public key)>`.
//!
//! Choices where the specs leave room, all fail-closed:
//! - lavd never writes checkpoint extension lines, and [`Checkpoint::parse`]
//!   refuses them (the spec makes them optional and not recommended; they are
//!   not auditable, and refusing them keeps one spelling per tree head). A
//!   witness takes them ([`Checkpoint::parse_with_extensions`]): it may
//!   cosign another log, and tlog-cosignature signs them with the body;
//! - the key name of the log's signature equals the origin (tlog-checkpoint
//!   says it SHOULD), and verification requires it;
//! - a signature line from the known key that fails to verify rejects the
//!   whole note (signed-note says clients SHOULD);
//! - lower-case hex only in verifier keys, canonical padded base64 only,
//!   except that a signature line's base64 may have bits set after its last
//!   byte (Go's decoder, and so the reference implementation, accepts them);
//! - at most [`MAX_NOTE_BYTES`] and [`MAX_SIGNATURES`] (the spec asks for at
//!   least 16 signatures, post-quantum ones included).
//!
//! Signing happens in the HSM (`CKM_EDDSA`): [`sign_checkpoint`] takes the
//! signing operation as a closure and checks the signature it returns
//! against the configured public key before publishing anything.

use aws_lc_rs::digest;
use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::merkle::Hash;

/// The signed-note signature type byte for Ed25519.
pub(crate) const ED25519_TYPE: u8 = 0x01;
/// The signature line prefix: em dash (U+2014) and a space.
pub(crate) const SIG_PREFIX: &str = "\u{2014} ";
/// Padded standard base64 that accepts non-zero bits after the last byte,
/// for signature lines only: Go's decoder, which the C2SP reference
/// implementation uses, accepts them, so a witness (or anyone who passes the
/// note on) may write them. The bytes decoded are the same either way, and a
/// signature covers the note's text, not the line. Strict, such a line by a
/// key nobody here knows failed the whole note.
const SIGNATURE_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// The largest note accepted, in bytes: 16 post-quantum signatures fit.
pub const MAX_NOTE_BYTES: usize = 128 * 1024;
/// The most signature lines accepted in one note.
pub const MAX_SIGNATURES: usize = 64;
/// The longest key name / origin accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// A note, checkpoint or verifier key that was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum NoteError {
    /// The note exceeds [`MAX_NOTE_BYTES`] or [`MAX_SIGNATURES`]: a
    /// misbehaving server, or an attempt to exhaust the verifier.
    #[error("the note is larger than this verifier accepts ({0})")]
    TooLarge(&'static str),
    /// The note does not have the signed-note shape (text ending in a newline,
    /// a blank line, signature lines `— <name> <base64>`), contains control
    /// characters, or a signature line does not decode. Truncation in
    /// transit, or a hand-edited note.
    #[error("malformed signed note: {0}")]
    Malformed(&'static str),
    /// No signature line is from the verifier key (same name *and* key ID):
    /// the note was signed by another key, or the wrong verifier key was
    /// configured.
    #[error("the note carries no signature from {name}+{key_id:08x}")]
    NoKnownSignature {
        /// The verifier key's name.
        name: String,
        /// The verifier key's ID.
        key_id: u32,
    },
    /// A signature line names the verifier key but does not verify: the note
    /// text was altered after signing, the signature was damaged, or someone
    /// else used the key's name and ID.
    #[error("a signature from {name}+{key_id:08x} does not verify")]
    SignatureInvalid {
        /// The verifier key's name.
        name: String,
        /// The verifier key's ID.
        key_id: u32,
    },
    /// The note text is not a checkpoint body as lavd writes it (three lines:
    /// origin, decimal size without leading zeros, padded base64 of a 32-byte
    /// root; no extension lines).
    #[error("malformed checkpoint: {0}")]
    Checkpoint(&'static str),
    /// The checkpoint's origin is not the verifier key's name: a checkpoint
    /// of another log, signed by a key that log shares.
    #[error("checkpoint origin `{origin}` is not the key name `{name}`")]
    OriginMismatch {
        /// The checkpoint's origin line.
        origin: String,
        /// The verifier key's name.
        name: String,
    },
    /// The verifier key string is not `<name>+<8 hex digits>+<base64>` with a
    /// valid name and a 33-byte key, or the name (an origin) is not usable
    /// as a key name: empty, too long, containing spaces, `+` or control
    /// characters.
    #[error("malformed verifier key or key name: {0}")]
    VerifierKey(&'static str),
    /// The verifier key's ID is not the hash of its name and key: a typo, or
    /// a key string assembled from two different keys.
    #[error("the verifier key ID does not match its name and public key")]
    VerifierKeyId,
    /// The verifier key is not of type `0x01` (Ed25519), the only type lavd
    /// signs with.
    #[error("unsupported verifier key type {0:#04x} (only Ed25519, 0x01)")]
    UnsupportedKeyType(u8),
}

impl NoteError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "note_too_large",
            Self::Malformed(_) => "note_malformed",
            Self::NoKnownSignature { .. } => "note_unverified",
            Self::SignatureInvalid { .. } => "signature_invalid",
            Self::Checkpoint(_) => "checkpoint_malformed",
            Self::OriginMismatch { .. } => "origin_mismatch",
            Self::VerifierKey(_) => "verifier_key_malformed",
            Self::VerifierKeyId => "verifier_key_id_mismatch",
            Self::UnsupportedKeyType(_) => "verifier_key_unsupported",
        }
    }
}

/// Signing a note failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError<E: std::error::Error + 'static> {
    /// The signer (the HSM) failed; the HSM module's error says why.
    #[error("signing the checkpoint: {0}")]
    Signer(#[source] E),
    /// The text or key name cannot be put in a signed note (see the inner
    /// error): a bug in the caller or a bad origin in the configuration.
    #[error(transparent)]
    Note(NoteError),
    /// The signer returned a signature that does not verify under the public
    /// key the note will name: the HSM used another key object than the one
    /// configured, or the token is faulty. Nothing is published.
    #[error("the signer's signature does not verify under the configured audit public key")]
    SelfCheck,
}

impl<E: std::error::Error + 'static> SignError<E> {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Signer(_) => "signer_failed",
            Self::Note(e) => e.code(),
            Self::SelfCheck => "signature_self_check_failed",
        }
    }
}

/// Checks a key name: non-empty, bounded, no Unicode whitespace, no `+`, no
/// control characters (signed-note §Format).
pub(crate) fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() {
        return Err(NoteError::VerifierKey("empty key name"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NoteError::VerifierKey("key name too long"));
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c == '+' || c.is_control())
    {
        return Err(NoteError::VerifierKey(
            "key name contains a space, `+` or a control character",
        ));
    }
    Ok(())
}

/// The signed-note key ID of an Ed25519 key:
/// `SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4]`, big-endian.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    typed_key_id(name, ED25519_TYPE, public_key)
}

/// The signed-note key ID of a key of any type:
/// `SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4]`, big-endian (C2SP
/// signed-note, "Signatures"; tlog-cosignature's types use the same rule).
pub fn typed_key_id(name: &str, kind: u8, public_key: &[u8]) -> u32 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(&[0x0A, kind]);
    ctx.update(public_key);
    let d = ctx.finish();
    let b = d.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A vkey's parts, `<name>+<8 lower-case hex digits>+<base64(type ‖
/// key)>`: its name (checked), key ID, type and key, for every type.
///
/// # Errors
/// [`NoteError::VerifierKey`] for the wrong shape or no type byte.
pub(crate) fn split_vkey(text: &str) -> Result<(&str, u32, u8, Vec<u8>), NoteError> {
    // The name holds no `+`, the hex none either; base64 may hold some.
    let (name, rest) = text
        .split_once('+')
        .ok_or(NoteError::VerifierKey("expected <name>+<id>+<key>"))?;
    let (id_hex, key_b64) = rest
        .split_once('+')
        .ok_or(NoteError::VerifierKey("expected <name>+<id>+<key>"))?;
    check_name(name)?;
    let id = parse_key_id(id_hex).ok_or(NoteError::VerifierKey(
        "key ID is not 8 lower-case hex digits",
    ))?;
    let typed = STANDARD
        .decode(key_b64)
        .map_err(|_| NoteError::VerifierKey("key is not padded standard base64"))?;
    let (&kind, public) = typed
        .split_first()
        .ok_or(NoteError::VerifierKey("empty key"))?;
    Ok((name, id, kind, public.to_vec()))
}

/// A well-formed vkey `<name>+<8 hex>+<base64(type ‖ key)>` of any type:
/// what a policy names for a key lavd does not verify (an ML-DSA witness,
/// C2SP tlog-cosignature's type 0x06; another log's key of another
/// algorithm). Its key ID is as stated: signed-note only recommends
/// [`typed_key_id`], and some types compute it otherwise (0x02 over the
/// key's DER SPKI, 0x05 over the log's ID); [`OtherKey::recommended_id`]
/// says whether it follows the recommendation, for a type that must. Its
/// signature lines can be told apart from others' (name and key ID); it
/// never verifies one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherKey {
    name: String,
    key_id: u32,
    kind: u8,
    public_key: Vec<u8>,
}

impl OtherKey {
    /// Parses a vkey of any type, its key ID as stated.
    ///
    /// # Errors
    /// [`NoteError::VerifierKey`] for the wrong shape or an empty key.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let (name, key_id, kind, public_key) = split_vkey(text)?;
        if public_key.is_empty() {
            return Err(NoteError::VerifierKey("empty key"));
        }
        Ok(Self {
            name: name.to_owned(),
            key_id,
            kind,
            public_key,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key ID.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The signature type byte.
    pub fn kind(&self) -> u8 {
        self.kind
    }

    /// Whether its key ID is signed-note's recommended one,
    /// `SHA-256(name ‖ 0x0A ‖ type ‖ key)[:4]`.
    pub fn recommended_id(&self) -> bool {
        typed_key_id(&self.name, self.kind, &self.public_key) == self.key_id
    }

    /// The public key bytes, after the type byte.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }
}

/// The key ID of a verifier key string: exactly 8 lower-case hex digits, the
/// spelling lavd writes, so that a key has one string (the log's keys here,
/// witnesses' keys in [`super::witness`]).
pub(crate) fn parse_key_id(hex: &str) -> Option<u32> {
    let canonical = hex.len() == 8
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    canonical
        .then(|| u32::from_str_radix(hex, 16).ok())
        .flatten()
}

/// A signed-note verifier key for an Ed25519 key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_id: u32,
    public_key: [u8; 32],
}

impl std::fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

impl std::fmt::Display for VerifierKey {
    /// `<name>+<hex key ID>+<base64(0x01 ‖ public key)>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_vkey(
            &self.name,
            self.key_id,
            ED25519_TYPE,
            &self.public_key,
        ))
    }
}

/// A signed-note verifier key: `<name>+<hex key ID>+<base64(type ‖ key)>`
/// (the log's type 0x01 keys here, witnesses' type 0x04 in
/// [`super::witness`]).
pub(crate) fn format_vkey(name: &str, key_id: u32, kind: u8, public_key: &[u8; 32]) -> String {
    let mut typed = [0u8; 33];
    typed[0] = kind;
    typed[1..].copy_from_slice(public_key);
    format!("{name}+{key_id:08x}+{}", STANDARD.encode(typed))
}

impl VerifierKey {
    /// The verifier key for `name` and a raw 32-byte Ed25519 public key.
    ///
    /// # Errors
    /// [`NoteError::VerifierKey`] for a name that cannot be a key name.
    pub fn new(name: &str, public_key: &[u8; 32]) -> Result<Self, NoteError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            key_id: key_id(name, public_key),
            public_key: *public_key,
        })
    }

    /// Parses `<name>+<8 lower-case hex digits>+<base64(0x01 ‖ key)>`.
    ///
    /// # Errors
    /// [`NoteError::VerifierKey`] for the wrong shape,
    /// [`NoteError::UnsupportedKeyType`] for a type other than Ed25519,
    /// [`NoteError::VerifierKeyId`] when the ID does not match.
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let (name, id, kind, public) = split_vkey(text)?;
        if kind != ED25519_TYPE {
            return Err(NoteError::UnsupportedKeyType(kind));
        }
        let public_key: [u8; 32] = public
            .as_slice()
            .try_into()
            .map_err(|_| NoteError::VerifierKey("an Ed25519 key is 32 bytes"))?;
        let key = Self::new(name, &public_key)?;
        if key.key_id != id {
            return Err(NoteError::VerifierKeyId);
        }
        Ok(key)
    }

    /// The key name (for lavd's audit key, the log origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key ID.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }
}

/// The verifier key string for `name` and an Ed25519 public key, as served by
/// `GET /v1/audit/key`.
///
/// # Errors
/// [`NoteError::VerifierKey`] for a name that cannot be a key name.
pub fn verifier_key(name: &str, public_key: &[u8; 32]) -> Result<String, NoteError> {
    Ok(VerifierKey::new(name, public_key)?.to_string())
}

/// A transparency log checkpoint: the signed statement "the log `origin` has
/// `size` leaves with root hash `root`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity (and the audit key's name).
    pub origin: String,
    /// The number of leaves.
    pub size: u64,
    /// The RFC 6962 root hash of those leaves.
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: origin, size and base64 root, each followed by `\n`.
    pub fn to_body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// Parses a checkpoint body strictly: exactly three lines, each ending in
    /// `\n`; a usable origin; a decimal size without sign or leading zeros
    /// that fits 64 bits; a padded base64 32-byte root. Extension lines are
    /// refused (see the module documentation).
    ///
    /// # Errors
    /// [`NoteError::Checkpoint`] naming the bad line.
    pub fn parse(body: &str) -> Result<Self, NoteError> {
        Self::parse_body(body, false)
    }

    /// Parses a checkpoint body as [`Checkpoint::parse`] does, but takes
    /// extension lines after the root hash, each non-empty, as
    /// tlog-checkpoint allows: for a witness, which cosigns another log's
    /// checkpoints, extension lines and all (tlog-cosignature signs the
    /// whole body). They are opaque, and not kept in the value.
    ///
    /// # Errors
    /// [`NoteError::Checkpoint`] naming the bad line.
    pub fn parse_with_extensions(body: &str) -> Result<Self, NoteError> {
        Self::parse_body(body, true)
    }

    fn parse_body(body: &str, extensions: bool) -> Result<Self, NoteError> {
        let content = body
            .strip_suffix('\n')
            .ok_or(NoteError::Checkpoint("the body does not end in a newline"))?;
        let mut lines = content.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(NoteError::Checkpoint(
                "expected origin, size and root hash lines",
            ));
        };
        for extension in lines {
            if !extensions {
                return Err(NoteError::Checkpoint(
                    "extension lines are not accepted by lavd",
                ));
            }
            if extension.is_empty() {
                return Err(NoteError::Checkpoint("an extension line is empty"));
            }
        }
        check_name(origin).map_err(|_| {
            NoteError::Checkpoint("the origin is empty, too long, or has spaces, `+` or controls")
        })?;
        let canonical_decimal = !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
            && (size == "0" || !size.starts_with('0'));
        if !canonical_decimal {
            return Err(NoteError::Checkpoint(
                "the tree size is not a decimal number without leading zeros",
            ));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| NoteError::Checkpoint("the tree size does not fit 64 bits"))?;
        let root: Hash = STANDARD
            .decode(root)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(NoteError::Checkpoint(
                "the root hash is not padded base64 of 32 bytes",
            ))?;
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// One signature line of a note, decoded.
pub(crate) struct SignatureLine<'a> {
    pub(crate) name: &'a str,
    pub(crate) key_id: u32,
    pub(crate) signature: Vec<u8>,
}

/// Splits a signed note into its text (ending in `\n`) and its signature
/// lines, checking the signed-note format.
pub(crate) fn split_note(note: &str) -> Result<(&str, Vec<SignatureLine<'_>>), NoteError> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(NoteError::TooLarge("note size"));
    }
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::Malformed("control character"));
    }
    // The text is separated from the signatures by the last blank line.
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    let text = &note[..=split];
    let block = note[split + 2..]
        .strip_suffix('\n')
        .ok_or(NoteError::Malformed(
            "the last signature line has no newline",
        ))?;
    if block.is_empty() {
        return Err(NoteError::Malformed("no signature lines"));
    }
    let mut signatures = Vec::new();
    for line in block.split('\n') {
        if signatures.len() == MAX_SIGNATURES {
            return Err(NoteError::TooLarge("signature count"));
        }
        signatures.push(signature_line(line)?);
    }
    Ok((text, signatures))
}

/// One signature line (`— <name> <base64>`, without its newline), decoded.
///
/// # Errors
/// [`NoteError::Malformed`].
pub(crate) fn signature_line(line: &str) -> Result<SignatureLine<'_>, NoteError> {
    let rest = line.strip_prefix(SIG_PREFIX).ok_or(NoteError::Malformed(
        "a signature line does not start with `— `",
    ))?;
    let (name, b64) = rest
        .split_once(' ')
        .ok_or(NoteError::Malformed("a signature line has no signature"))?;
    // The spec's rules for a name (not empty, no Unicode space, no `+`),
    // without this crate's stricter rules for the keys it configures
    // (`check_name`: a length bound, no DEL or C1 control): a line by a
    // key nobody here knows is ignored by the verifiers (signed-note:
    // "Verifiers MUST ignore signatures from unknown keys"), and no
    // configured name matches it. The note as a whole is still bounded
    // (MAX_NOTE_BYTES), and has no C0 control but newline.
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(NoteError::Malformed("a signature line has a bad key name"));
    }
    let bytes = SIGNATURE_BASE64
        .decode(b64)
        .map_err(|_| NoteError::Malformed("a signature is not padded standard base64"))?;
    // Four bytes of key ID and at least one of signature.
    if bytes.len() < 5 {
        return Err(NoteError::Malformed("a signature is too short"));
    }
    let key_id = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    Ok(SignatureLine {
        name,
        key_id,
        signature: bytes[4..].to_vec(),
    })
}

/// `note` with only the signature lines for which `keep(name, key_id)`:
/// for showing a verified note without lines nobody checked (anyone who
/// hands over a note can append lines claiming any name).
///
/// # Errors
/// [`NoteError`] for a note that is not well formed.
pub fn with_signatures_by(
    note: &str,
    keep: impl Fn(&str, u32) -> bool,
) -> Result<String, NoteError> {
    let (text, _) = split_note(note)?;
    let mut out = String::from(text);
    out.push('\n');
    for line in note[text.len() + 1..].lines() {
        let parsed = signature_line(line)?;
        if keep(parsed.name, parsed.key_id) {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Opens a signed note: checks the format and that it carries a valid
/// signature by `key`, and returns the note text (which is only meaningful
/// after this check). Signatures by other keys are ignored, as the spec
/// requires; a signature that claims to be by `key` and fails rejects the
/// note.
///
/// # Errors
/// [`NoteError::TooLarge`], [`NoteError::Malformed`],
/// [`NoteError::SignatureInvalid`], [`NoteError::NoKnownSignature`].
pub fn open_note<'a>(note: &'a str, key: &VerifierKey) -> Result<&'a str, NoteError> {
    let (text, signatures) = split_note(note)?;
    let public = UnparsedPublicKey::new(&ED25519, key.public_key);
    let mut verified = false;
    for line in signatures {
        if line.name != key.name || line.key_id != key.key_id {
            continue;
        }
        if public.verify(text.as_bytes(), &line.signature).is_err() {
            return Err(NoteError::SignatureInvalid {
                name: key.name.clone(),
                key_id: key.key_id,
            });
        }
        verified = true;
    }
    if !verified {
        return Err(NoteError::NoKnownSignature {
            name: key.name.clone(),
            key_id: key.key_id,
        });
    }
    Ok(text)
}

/// Verifies a signed checkpoint against a verifier key and returns it.
/// The key name must equal the checkpoint origin.
///
/// # Errors
/// Everything [`open_note`] and [`Checkpoint::parse`] refuse, and
/// [`NoteError::OriginMismatch`].
pub fn verify_checkpoint(note: &str, key: &VerifierKey) -> Result<Checkpoint, NoteError> {
    let text = open_note(note, key)?;
    let checkpoint = Checkpoint::parse(text)?;
    if checkpoint.origin != key.name {
        return Err(NoteError::OriginMismatch {
            origin: checkpoint.origin,
            name: key.name.clone(),
        });
    }
    Ok(checkpoint)
}

/// [`verify_checkpoint`] with the verifier key given as its string form.
///
/// # Errors
/// As [`VerifierKey::parse`] and [`verify_checkpoint`].
pub fn verify_note(note: &str, verifier_key: &str) -> Result<Checkpoint, NoteError> {
    verify_checkpoint(note, &VerifierKey::parse(verifier_key)?)
}

/// Signs a note text with one Ed25519 key named `key_name`: `sign` receives
/// the exact text bytes and returns the 64-byte signature (from the HSM,
/// `CKM_EDDSA`). The signature is verified against `public_key` before the
/// note is returned.
///
/// # Errors
/// [`SignError::Note`] if the text is empty, lacks the final newline or has
/// control characters, or the key name is unusable; [`SignError::Signer`];
/// [`SignError::SelfCheck`].
///
/// # Security
/// The self-check means a misconfigured key handle cannot publish notes that
/// verifiers would reject (or that name a key the HSM does not hold).
pub fn sign_note<E: std::error::Error + 'static>(
    text: &str,
    key_name: &str,
    public_key: &[u8; 32],
    sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
) -> Result<String, SignError<E>> {
    let key = VerifierKey::new(key_name, public_key).map_err(SignError::Note)?;
    if !text.ends_with('\n') {
        return Err(SignError::Note(NoteError::Malformed(
            "the text does not end in a newline",
        )));
    }
    if text.chars().any(|c| c < ' ' && c != '\n') {
        return Err(SignError::Note(NoteError::Malformed("control character")));
    }
    let signature = sign(text.as_bytes()).map_err(SignError::Signer)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(text.as_bytes(), &signature)
        .map_err(|_| SignError::SelfCheck)?;
    let mut blob = Vec::with_capacity(68);
    blob.extend_from_slice(&key.key_id.to_be_bytes());
    blob.extend_from_slice(&signature);
    let note = format!("{text}\n{SIG_PREFIX}{key_name} {}\n", STANDARD.encode(blob));
    if note.len() > MAX_NOTE_BYTES {
        return Err(SignError::Note(NoteError::TooLarge("note size")));
    }
    Ok(note)
}

/// Signs a checkpoint as a C2SP signed note whose key name is the origin.
///
/// # Errors
/// As [`sign_note`].
pub fn sign_checkpoint<E: std::error::Error + 'static>(
    checkpoint: &Checkpoint,
    public_key: &[u8; 32],
    sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
) -> Result<String, SignError<E>> {
    // Refuse a checkpoint this module could not parse back.
    let body = checkpoint.to_body();
    Checkpoint::parse(&body).map_err(SignError::Note)?;
    sign_note(&body, &checkpoint.origin, public_key, sign)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};

    // golang.org/x/mod sumdb/note (note.go package documentation and
    // note_test.go), which C2SP signed-note specifies: the PeterNeumann
    // signer and verifier keys, the example text and its signed note, and
    // the EnochRoot key (derived from an all-zero seed) with its co-signature.
    const PETER_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

    #[derive(Debug, thiserror::Error)]
    #[error("test signer failure")]
    struct TestSignerError;

    fn signer(
        pair: &Ed25519KeyPair,
    ) -> impl FnOnce(&[u8]) -> Result<[u8; 64], TestSignerError> + '_ {
        move |msg| {
            pair.sign(msg)
                .as_ref()
                .try_into()
                .map_err(|_| TestSignerError)
        }
    }

    fn public(pair: &Ed25519KeyPair) -> [u8; 32] {
        pair.public_key().as_ref().try_into().unwrap()
    }

    fn peter_pair() -> Ed25519KeyPair {
        let raw = STANDARD
            .decode(PETER_SKEY.splitn(5, '+').nth(4).unwrap())
            .unwrap();
        assert_eq!(raw[0], 0x01);
        Ed25519KeyPair::from_seed_unchecked(&raw[1..]).unwrap()
    }

    #[test]
    fn go_sumdb_note_vectors() {
        let peter = VerifierKey::parse(PETER_VKEY).unwrap();
        assert_eq!(peter.key_id(), 0xc74f20a3);
        assert_eq!(peter.to_string(), PETER_VKEY);
        let note = format!("{GO_TEXT}\n{PETER_SIG}");
        assert_eq!(open_note(&note, &peter).unwrap(), GO_TEXT);

        // Our signer over the published seed reproduces the published note
        // byte for byte (Ed25519 is deterministic).
        let pair = peter_pair();
        assert_eq!(
            verifier_key("PeterNeumann", &public(&pair)).unwrap(),
            PETER_VKEY
        );
        let signed = sign_note(GO_TEXT, "PeterNeumann", &public(&pair), signer(&pair)).unwrap();
        assert_eq!(signed, note);

        let enoch_pair = Ed25519KeyPair::from_seed_unchecked(&[0u8; 32]).unwrap();
        assert_eq!(
            verifier_key("EnochRoot", &public(&enoch_pair)).unwrap(),
            ENOCH_VKEY
        );
        let both = format!("{GO_TEXT}\n{PETER_SIG}{ENOCH_SIG}");
        let enoch = VerifierKey::parse(ENOCH_VKEY).unwrap();
        // Each key finds its own signature and ignores the other.
        assert_eq!(open_note(&both, &enoch).unwrap(), GO_TEXT);
        assert_eq!(open_note(&both, &peter).unwrap(), GO_TEXT);
        // A verifier for a key that did not sign sees no known signature.
        assert_eq!(
            open_note(&note, &enoch).unwrap_err().code(),
            "note_unverified"
        );
    }

    fn sample(pair: &Ed25519KeyPair) -> (Checkpoint, String, VerifierKey) {
        let checkpoint = Checkpoint {
            origin: "lavd.example/audit".into(),
            size: 1042,
            root: [0xA5; 32],
        };
        let note = sign_checkpoint(&checkpoint, &public(pair), signer(pair)).unwrap();
        let key = VerifierKey::new("lavd.example/audit", &public(pair)).unwrap();
        (checkpoint, note, key)
    }

    #[test]
    fn checkpoint_round_trip_and_exact_text() {
        let pair = Ed25519KeyPair::generate().unwrap();
        let (checkpoint, note, key) = sample(&pair);
        let body = "lavd.example/audit\n1042\npaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaU=\n";
        assert_eq!(checkpoint.to_body(), body);
        assert!(note.starts_with(&format!("{body}\n\u{2014} lavd.example/audit ")));
        assert!(note.ends_with('\n'));
        assert_eq!(verify_checkpoint(&note, &key).unwrap(), checkpoint);
        assert_eq!(verify_note(&note, &key.to_string()).unwrap(), checkpoint);
        let empty = Checkpoint {
            origin: "o".into(),
            size: 0,
            root: super::super::merkle::empty_root(),
        };
        assert_eq!(Checkpoint::parse(&empty.to_body()).unwrap(), empty);
        // A line by an unknown key is ignored, even one whose name is
        // longer than any key configured here (signed-note: "Verifiers
        // MUST ignore signatures from unknown keys").
        let long = format!(
            "{note}\u{2014} {} {}\n",
            "w".repeat(MAX_NAME_BYTES + 1),
            STANDARD.encode([7u8; 68])
        );
        assert_eq!(verify_checkpoint(&long, &key).unwrap(), checkpoint);
        // So is one whose name holds DEL or a C1 control: the spec forbids
        // only C0 controls in a note, and spaces and `+` in a name.
        for name in ["a\u{7f}b", "a\u{80}b", "a\u{9f}b"] {
            let other = format!("{note}\u{2014} {name} {}\n", STANDARD.encode([7u8; 68]));
            assert_eq!(
                verify_checkpoint(&other, &key).unwrap(),
                checkpoint,
                "{name:?}"
            );
        }
        // Nor one whose base64 has bits set after its last byte, which
        // Go's decoder accepts: the note verifies, and with such a line by
        // the log's own key too (the bytes decoded are the same).
        let loose = |b64: &str| {
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let (data, pad) = b64.split_at(b64.trim_end_matches('=').len());
            assert!(!pad.is_empty(), "{b64}: no bits after the last byte");
            let last = ALPHABET
                .iter()
                .position(|&c| c == *data.as_bytes().last().unwrap())
                .unwrap();
            assert_eq!(last & 1, 0, "{b64} is not canonical");
            format!(
                "{}{}{pad}",
                &data[..data.len() - 1],
                ALPHABET[last | 1] as char
            )
        };
        let odd = loose(&STANDARD.encode([7u8; 68]));
        assert!(STANDARD.decode(&odd).is_err(), "{odd} is canonical");
        let trailing = format!("{note}\u{2014} other {odd}\n");
        assert_eq!(verify_checkpoint(&trailing, &key).unwrap(), checkpoint);
        let (body, lines) = note.split_once("\n\n").unwrap();
        let (ours_name, ours_b64) = lines.trim_end().rsplit_once(' ').unwrap();
        let ours = format!("{body}\n\n{ours_name} {}\n", loose(ours_b64));
        assert_eq!(verify_checkpoint(&ours, &key).unwrap(), checkpoint);
        // Not one with a Unicode space in it (U+0085 is a C1 control and a
        // space).
        let spaced = format!("{note}\u{2014} a\u{85}b {}\n", STANDARD.encode([7u8; 68]));
        assert_eq!(
            verify_checkpoint(&spaced, &key).unwrap_err().code(),
            "note_malformed"
        );
    }

    /// An independent signed-note verifier written from the C2SP text, using
    /// ed25519-dalek instead of aws-lc. Returns the note text.
    fn dalek_open(note: &str, vkey: &str) -> Option<String> {
        use ed25519_dalek::{Signature, VerifyingKey};
        let mut parts = vkey.splitn(3, '+');
        let (name, id_hex, key_b64) = (parts.next()?, parts.next()?, parts.next()?);
        let key_bytes = STANDARD.decode(key_b64).ok()?;
        if key_bytes.len() != 33 || key_bytes[0] != 1 {
            return None;
        }
        // key ID = SHA-256(key name || 0x0A || 0x01 || public key)[:4]
        let mut id_input = name.as_bytes().to_vec();
        id_input.push(b'\n');
        id_input.extend_from_slice(&key_bytes);
        let id_hash = digest::digest(&digest::SHA256, &id_input);
        if hex::encode(&id_hash.as_ref()[..4]) != id_hex {
            return None;
        }
        let vk = VerifyingKey::from_bytes(key_bytes[1..].try_into().ok()?).ok()?;
        // The text ends with its newline; the last blank line separates it.
        let cut = note.rfind("\n\n")?;
        let (text, sigs) = (&note[..cut + 1], &note[cut + 2..]);
        let mut ok = false;
        for line in sigs.lines() {
            let rest = line.strip_prefix("\u{2014} ")?;
            let (n, b64) = rest.split_once(' ')?;
            let blob = STANDARD.decode(b64).ok()?;
            if n == name && hex::encode(blob.get(..4)?) == id_hex {
                let sig = Signature::from_slice(&blob[4..]).ok()?;
                vk.verify_strict(text.as_bytes(), &sig).ok()?;
                ok = true;
            }
        }
        ok.then(|| text.to_owned())
    }

    /// The tlog-checkpoint body on top of [`dalek_open`].
    fn dalek_checkpoint(note: &str, vkey: &str) -> Option<(String, u64, Vec<u8>)> {
        let text = dalek_open(note, vkey)?;
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != 3 || !vkey.starts_with(&format!("{}+", lines[0])) {
            return None;
        }
        Some((
            lines[0].to_owned(),
            lines[1].parse().ok()?,
            STANDARD.decode(lines[2]).ok()?,
        ))
    }

    #[test]
    fn independent_dalek_verifier_accepts_our_checkpoints() {
        // The independent verifier itself agrees with the Go reference note.
        assert_eq!(
            dalek_open(&format!("{GO_TEXT}\n{PETER_SIG}"), PETER_VKEY).as_deref(),
            Some(GO_TEXT)
        );
        let pair = Ed25519KeyPair::generate().unwrap();
        let (checkpoint, note, key) = sample(&pair);
        let (origin, size, root) = dalek_checkpoint(&note, &key.to_string()).unwrap();
        assert_eq!(origin, checkpoint.origin);
        assert_eq!(size, checkpoint.size);
        assert_eq!(root, checkpoint.root.to_vec());
        // It is a real check: it refuses an altered size.
        let forged = note.replacen("\n1042\n", "\n1043\n", 1);
        assert!(dalek_checkpoint(&forged, &key.to_string()).is_none());
    }

    #[test]
    fn tampered_notes_are_refused_with_exact_codes() {
        let pair = Ed25519KeyPair::generate().unwrap();
        let (_, note, key) = sample(&pair);
        let code = |n: &str| verify_checkpoint(n, &key).unwrap_err().code();

        // Tampered body.
        assert_eq!(
            code(&note.replacen("\n1042\n", "\n1043\n", 1)),
            "signature_invalid"
        );
        // Another key with the same name: its key ID differs, so the
        // signature is ignored and nothing verifies.
        let other = Ed25519KeyPair::generate().unwrap();
        let (_, other_note, _) = sample(&other);
        assert_eq!(code(&other_note), "note_unverified");
        // The other key's signature relabelled with our key ID: a known key
        // whose signature fails.
        let sig_line = other_note.rsplit('\n').nth(1).unwrap();
        let b64 = sig_line.rsplit(' ').next().unwrap();
        let mut blob = STANDARD.decode(b64).unwrap();
        blob[..4].copy_from_slice(&key.key_id().to_be_bytes());
        let relabelled = other_note.replace(b64, &STANDARD.encode(&blob));
        assert_eq!(code(&relabelled), "signature_invalid");
        // Wrong key ID on our own signature: ignored, nothing verifies.
        let line = note.rsplit('\n').nth(1).unwrap();
        let ours = line.rsplit(' ').next().unwrap();
        let mut blob = STANDARD.decode(ours).unwrap();
        blob[0] ^= 1;
        assert_eq!(
            code(&note.replace(ours, &STANDARD.encode(&blob))),
            "note_unverified"
        );
        // Truncated signature: 4 + 63 bytes, still valid base64.
        let mut blob = STANDARD.decode(ours).unwrap();
        blob.pop();
        assert_eq!(
            code(&note.replace(ours, &STANDARD.encode(&blob))),
            "signature_invalid"
        );
        // Truncated base64 text: not padded base64 any more.
        assert_eq!(
            code(&note.replace(ours, &ours[..ours.len() - 1])),
            "note_malformed"
        );
        // Cut by a whole base64 quantum it decodes, to a short signature.
        assert_eq!(
            code(&note.replace(ours, &ours[..ours.len() - 4])),
            "signature_invalid"
        );
        // Truncated note (the final newline lost in transit).
        assert_eq!(code(note.trim_end_matches('\n')), "note_malformed");
        // No signature block at all.
        assert_eq!(
            code(&format!("{}\n", note.split("\n\n").next().unwrap())),
            "note_malformed"
        );
        // A control character.
        assert_eq!(code(&note.replacen("lavd", "l\rvd", 1)), "note_malformed");
        // Wrong dash.
        assert_eq!(code(&note.replace('\u{2014}', "-")), "note_malformed");
        // A second, unknown signature is ignored.
        let extra = format!("{note}\u{2014} someone.else AAAAAAAA\n");
        assert!(verify_checkpoint(&extra, &key).is_ok());
        // Too large.
        let huge = format!("{}\n{note}", "x".repeat(MAX_NOTE_BYTES));
        assert_eq!(code(&huge), "note_too_large");
        let many = format!("{note}{}", "\u{2014} x AAAAAAAA\n".repeat(MAX_SIGNATURES));
        assert_eq!(code(&many), "note_too_large");
    }

    #[test]
    fn checkpoint_bodies_are_strict() {
        let parse = |b: &str| Checkpoint::parse(b).unwrap_err().code();
        let root = STANDARD.encode([1u8; 32]);
        assert!(Checkpoint::parse(&format!("o\n5\n{root}\n")).is_ok());
        assert_eq!(
            parse(&format!("o\n5\n{root}\next\n")),
            "checkpoint_malformed"
        );
        assert_eq!(parse(&format!("o\n05\n{root}\n")), "checkpoint_malformed");
        assert_eq!(parse(&format!("o\n+5\n{root}\n")), "checkpoint_malformed");
        assert_eq!(
            parse(&format!("o\n18446744073709551616\n{root}\n")),
            "checkpoint_malformed"
        );
        assert_eq!(parse(&format!("o\n5\n{root}")), "checkpoint_malformed");
        assert_eq!(parse(&format!("\n5\n{root}\n")), "checkpoint_malformed");
        assert_eq!(parse(&format!("o o\n5\n{root}\n")), "checkpoint_malformed");
        assert_eq!(parse("o\n5\nAAAA\n"), "checkpoint_malformed");
        let unpadded = root.trim_end_matches('=');
        assert_eq!(
            parse(&format!("o\n5\n{unpadded}\n")),
            "checkpoint_malformed"
        );
        let url = STANDARD.encode([0xfb; 32]).replace('+', "-");
        assert_eq!(parse(&format!("o\n5\n{url}\n")), "checkpoint_malformed");
        assert_eq!(parse("o\n5\n"), "checkpoint_malformed");
        // A correctly signed note whose origin is not the key name.
        let pair = Ed25519KeyPair::generate().unwrap();
        let body = format!("other.example/log\n5\n{root}\n");
        let note = sign_note(&body, "lavd.example/audit", &public(&pair), signer(&pair)).unwrap();
        let key = VerifierKey::new("lavd.example/audit", &public(&pair)).unwrap();
        assert_eq!(
            verify_checkpoint(&note, &key).unwrap_err().code(),
            "origin_mismatch"
        );
    }

    #[test]
    fn verifier_keys_are_strict() {
        let code = |s: &str| VerifierKey::parse(s).unwrap_err().code();
        assert_eq!(
            code("PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"),
            "verifier_key_malformed"
        );
        assert_eq!(
            code("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"),
            "verifier_key_id_mismatch"
        );
        assert_eq!(
            code("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T"),
            "verifier_key_malformed"
        );
        assert_eq!(code("PeterNeumann+c74f20a3"), "verifier_key_malformed");
        assert_eq!(
            code("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"),
            "verifier_key_malformed"
        );
        // Type 0x02 (ECDSA) is not what lavd signs with.
        let mut typed = STANDARD
            .decode("ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
            .unwrap();
        typed[0] = 2;
        assert_eq!(
            code(&format!(
                "PeterNeumann+c74f20a3+{}",
                STANDARD.encode(&typed)
            )),
            "verifier_key_unsupported"
        );
        assert_eq!(
            VerifierKey::new("a b", &[0; 32]).unwrap_err().code(),
            "verifier_key_malformed"
        );
        assert_eq!(
            VerifierKey::new("a+b", &[0; 32]).unwrap_err().code(),
            "verifier_key_malformed"
        );
    }

    #[test]
    fn signing_refuses_bad_signers_and_texts() {
        let pair = Ed25519KeyPair::generate().unwrap();
        let other = Ed25519KeyPair::generate().unwrap();
        let checkpoint = Checkpoint {
            origin: "lavd.example/audit".into(),
            size: 1,
            root: [0; 32],
        };
        // The HSM signed with another key than the configured public key.
        let err = sign_checkpoint(&checkpoint, &public(&pair), signer(&other)).unwrap_err();
        assert_eq!(err.code(), "signature_self_check_failed");
        let err =
            sign_checkpoint(&checkpoint, &public(&pair), |_| Err(TestSignerError)).unwrap_err();
        assert_eq!(err.code(), "signer_failed");
        let bad = Checkpoint {
            origin: "has space".into(),
            ..checkpoint
        };
        let err = sign_checkpoint(&bad, &public(&pair), signer(&pair)).unwrap_err();
        assert_eq!(err.code(), "checkpoint_malformed");
        let err = sign_note("no newline", "n", &public(&pair), signer(&pair)).unwrap_err();
        assert_eq!(err.code(), "note_malformed");
    }
}
