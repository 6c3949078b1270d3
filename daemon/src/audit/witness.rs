//! Witness cosignatures and witness policies: C2SP `tlog-cosignature`
//! (Ed25519 `cosignature/v1`, <https://c2sp.org/tlog-cosignature>) and C2SP
//! `tlog-policy` (<https://c2sp.org/tlog-policy>).
//!
//! A witness cosigns a checkpoint after checking it is consistent with every
//! checkpoint of that log it has seen; a verifier holding a policy (the logs
//! it accepts, the witnesses it knows, and a quorum rule over them) accepts a
//! checkpoint only when the log signed it and a quorum of witnesses
//! cosigned it. That is what keeps the operator, who holds the log's key,
//! from showing different logs to different auditors.
//!
//! Trust: nothing. Every signature is checked here with aws-lc-rs against
//! the keys of the policy; lines by unknown keys are ignored, as signed-note
//! requires.

use aws_lc_rs::digest;
use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::note::{self, Checkpoint, NoteError, VerifierKey};

/// The signed-note signature type of Ed25519 `cosignature/v1` keys.
pub const COSIGNATURE_V1_TYPE: u8 = 0x04;

/// C2SP signed-note's type for timestamped ML-DSA-44 cosignatures
/// (tlog-cosignature), whose public key is 1312 bytes.
const ML_DSA_44_COSIGNATURE_TYPE: u8 = 0x06;
const ML_DSA_44_PUBLIC_KEY_BYTES: usize = 1312;

/// The signed-note types a policy's `witness` line may name that lavd does
/// not verify (their cosignatures are never counted): ECDSA (0x02, as
/// transparency-dev's witness signs) and ML-DSA-44 cosignatures (0x06).
/// A `log` line may name any type (a log "MAY use any note signature
/// algorithm", C2SP tlog-checkpoint); lavd verifies Ed25519 (0x01) only.
const OTHER_WITNESS_TYPES: [u8; 2] = [0x02, ML_DSA_44_COSIGNATURE_TYPE];

/// A key of a cosignature type (C2SP tlog-cosignature: 0x04, 0x06) must
/// have the key ID that spec makes a MUST, and an ML-DSA-44 key its 1312
/// bytes; other types' IDs are as stated (signed-note only recommends its
/// formula, and 0x02 and 0x05 compute theirs otherwise).
fn check_cosignature_key(key: &note::OtherKey) -> Result<(), String> {
    let cosignature = [COSIGNATURE_V1_TYPE, ML_DSA_44_COSIGNATURE_TYPE].contains(&key.kind());
    let length = match key.kind() {
        ML_DSA_44_COSIGNATURE_TYPE => Some(("ML-DSA-44", ML_DSA_44_PUBLIC_KEY_BYTES)),
        COSIGNATURE_V1_TYPE => Some(("Ed25519", 32)),
        _ => None,
    };
    if let Some((algorithm, bytes)) = length.filter(|(_, bytes)| key.public_key().len() != *bytes) {
        return Err(format!(
            "an {algorithm} cosigner key (type {:#04x}) is {bytes} bytes, not {} (C2SP \
             tlog-cosignature)",
            key.kind(),
            key.public_key().len()
        ));
    }
    if cosignature && !key.recommended_id() {
        return Err(format!(
            "the key ID of a type {:#04x} key is SHA-256(name || 0x0A || type || key)[:4] \
             (C2SP tlog-cosignature)",
            key.kind()
        ));
    }
    Ok(())
}

/// An Ed25519 `cosignature/v1` witness key: its name and public key.
#[derive(Clone, PartialEq, Eq)]
pub struct CosignerKey {
    name: String,
    key_id: u32,
    public_key: [u8; 32],
}

impl std::fmt::Debug for CosignerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CosignerKey({self})")
    }
}

impl std::fmt::Display for CosignerKey {
    /// The vkey: `<name>+<hex key ID>+<base64(0x04 ‖ public key)>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&note::format_vkey(
            &self.name,
            self.key_id,
            COSIGNATURE_V1_TYPE,
            &self.public_key,
        ))
    }
}

/// Why a cosignature, a witness key or a policy was refused. Each has a
/// stable [`code`](WitnessError::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    /// A vkey that is not a `cosignature/v1` (type 0x04) Ed25519 key, or
    /// whose key ID does not match.
    #[error("bad witness key: {0}")]
    Key(String),
    /// A cosignature line by a known witness whose signature does not verify
    /// (a forged or corrupted line, or a cosignature of another checkpoint).
    #[error("the cosignature of {name} does not verify")]
    CosignatureInvalid {
        /// The witness's key name.
        name: String,
    },
    /// A policy file that breaks C2SP `tlog-policy` (line given).
    #[error("policy line {line}: {why}")]
    Policy {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The checkpoint is not signed by any log the policy names.
    #[error("the checkpoint is not signed by a log the policy accepts")]
    UnknownLog,
    /// The witnesses that validly cosigned do not make the quorum.
    #[error("the checkpoint's cosignatures do not meet the policy's quorum (valid: {valid:?})")]
    QuorumNotMet {
        /// Names (in the policy) of the witnesses whose cosignature verified.
        valid: Vec<String>,
    },
    /// The note itself is malformed.
    #[error(transparent)]
    Note(#[from] NoteError),
}

impl WitnessError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            WitnessError::Key(_) => "bad_witness_key",
            WitnessError::CosignatureInvalid { .. } => "cosignature_invalid",
            WitnessError::Policy { .. } => "bad_policy",
            WitnessError::UnknownLog => "unknown_log",
            WitnessError::QuorumNotMet { .. } => "quorum_not_met",
            WitnessError::Note(e) => e.code(),
        }
    }
}

impl CosignerKey {
    /// The key of witness `name` with a raw Ed25519 public key.
    ///
    /// # Errors
    /// [`WitnessError::Key`] for a name that cannot be a key name.
    pub fn new(name: &str, public_key: &[u8; 32]) -> Result<Self, WitnessError> {
        note::check_name(name).map_err(|e| WitnessError::Key(e.to_string()))?;
        Ok(CosignerKey {
            name: name.to_string(),
            key_id: cosigner_key_id(name, public_key),
            public_key: *public_key,
        })
    }

    /// Parses a vkey `<name>+<8 hex>+<base64(0x04 ‖ key)>`.
    ///
    /// # Errors
    /// [`WitnessError::Key`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, WitnessError> {
        let bad = |why: &str| WitnessError::Key(format!("{text}: {why}"));
        // One splitter for every vkey: one spelling per key, as for the
        // log's keys (`04D2…` is refused:
        // fuzz/regressions/witness/vkey-upper-case-key-id).
        let (name, id, kind, public) = note::split_vkey(text).map_err(|e| bad(&e.to_string()))?;
        if kind != COSIGNATURE_V1_TYPE {
            return Err(bad("not a cosignature/v1 (type 0x04) key"));
        }
        let public: [u8; 32] = public
            .as_slice()
            .try_into()
            .map_err(|_| bad("an Ed25519 key is 32 bytes"))?;
        let key = CosignerKey::new(name, &public)?;
        if key.key_id != id {
            return Err(bad("the key ID does not match the name and key"));
        }
        Ok(key)
    }

    /// The witness's key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key ID.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The raw public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }
}

/// `SHA-256(name ‖ "\n" ‖ 0x04 ‖ public key)[:4]`, big-endian
/// (C2SP tlog-cosignature, "Format").
pub fn cosigner_key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(&[0x0A, COSIGNATURE_V1_TYPE]);
    ctx.update(public_key);
    let d = ctx.finish();
    let b = d.as_ref();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The message an Ed25519 `cosignature/v1` signs: `cosignature/v1\n`,
/// `time <timestamp>\n`, then the checkpoint's whole note body (with its
/// final newline, without signature lines).
pub fn cosigned_message(body: &str, timestamp: u64) -> Vec<u8> {
    format!("cosignature/v1\ntime {timestamp}\n{body}").into_bytes()
}

/// A cosignature line `— <name> base64(key ID ‖ timestamp ‖ signature)`
/// for `body`, signed by `sign` (which gets the [`cosigned_message`]).
///
/// # Errors
/// `sign`'s error.
pub fn cosignature_line<E>(
    key: &CosignerKey,
    body: &str,
    timestamp: u64,
    sign: impl FnOnce(&[u8]) -> Result<[u8; 64], E>,
) -> Result<String, E> {
    let signature = sign(&cosigned_message(body, timestamp))?;
    let mut bytes = Vec::with_capacity(76);
    bytes.extend_from_slice(&key.key_id.to_be_bytes());
    bytes.extend_from_slice(&timestamp.to_be_bytes());
    bytes.extend_from_slice(&signature);
    Ok(format!(
        "{}{} {}\n",
        note::SIG_PREFIX,
        key.name,
        STANDARD.encode(bytes)
    ))
}

/// How far past this machine's clock a witness's cosignature may be
/// stamped and still count: clocks disagree by seconds, not minutes.
/// C2SP tlog-cosignature lets verifiers refuse timestamps in the future.
/// One bound for `lavd audit verify` and for the daemon's own quorum, so
/// that a checkpoint the daemon serves, or releases keys on, is not one
/// the verifier sets aside.
pub const COSIGNATURE_FUTURE_SKEW_SECS: u64 = 300;

/// Whether a cosignature stamped `at` (Unix seconds) lies more than
/// [`COSIGNATURE_FUTURE_SKEW_SECS`] past `now`: `lavd audit verify` sets it
/// aside, and the daemon does not count it ([`countable_at`]).
pub fn ahead_of(at: u64, now: u64) -> bool {
    at > now.saturating_add(COSIGNATURE_FUTURE_SKEW_SECS)
}

/// Whether a cosignature stamped `at` (Unix seconds) counts toward the
/// daemon's quorum at `now`: not 0 (C2SP tlog-witness: "the timestamp MUST
/// NOT be zero") and not [`ahead_of`] it.
pub fn countable_at(at: u64, now: u64) -> bool {
    at != 0 && !ahead_of(at, now)
}

/// The cosignatures in `note` by `key`, verified: the timestamp of each
/// (there is normally one). Lines by other keys are ignored.
///
/// # Errors
/// [`WitnessError::CosignatureInvalid`] for a line that claims to be by
/// `key` and does not verify (or is not 8 + 64 bytes, or is stamped above
/// 2^63 − 1); note format errors. A timestamp 0 verifies (C2SP
/// tlog-cosignature sets no lower bound): a quorum's age bound judges it,
/// and the daemon's own quorum does not count it ([`countable_at`]).
pub fn verify_cosignatures(note: &str, key: &CosignerKey) -> Result<Vec<u64>, WitnessError> {
    let (body, lines) = note::split_note(note)?;
    let public = UnparsedPublicKey::new(&ED25519, key.public_key);
    let invalid = || WitnessError::CosignatureInvalid {
        name: key.name.clone(),
    };
    let mut times = Vec::new();
    for line in lines {
        if line.name != key.name || line.key_id != key.key_id {
            continue;
        }
        let Ok([t0, t1, t2, t3, t4, t5, t6, t7]) =
            <[u8; 8]>::try_from(line.signature.get(..8).ok_or_else(invalid)?)
        else {
            return Err(invalid());
        };
        let timestamp = u64::from_be_bytes([t0, t1, t2, t3, t4, t5, t6, t7]);
        let signature = &line.signature[8..];
        // C2SP tlog-cosignature: the timestamp MUST NOT exceed 2^63 - 1.
        if signature.len() != 64 || timestamp > i64::MAX as u64 {
            return Err(invalid());
        }
        public
            .verify(&cosigned_message(body, timestamp), signature)
            .map_err(|_| invalid())?;
        times.push(timestamp);
    }
    Ok(times)
}

/// The policy witnesses whose cosignatures on a checkpoint verified, in
/// policy order, each with the newest time it cosigned at (Unix seconds).
pub type Cosigned = Vec<(String, u64)>;

/// A C2SP `tlog-policy`: the logs accepted, the witnesses known, and the
/// quorum rule.
#[derive(Debug, Clone)]
pub struct Policy {
    logs: Vec<VerifierKey>,
    witnesses: Vec<(String, CosignerKey, Option<String>)>,
    /// Logs and witnesses named with a key type lavd does not verify (an
    /// ML-DSA witness, C2SP tlog-cosignature's type 0x06): a policy shared
    /// with verifiers that do may name them. Their signatures never count,
    /// as signed-note's verifiers ignore lines of keys they do not know:
    /// a quorum that needs them is not met, which fails closed.
    other_logs: Vec<note::OtherKey>,
    other_witnesses: Vec<(String, note::OtherKey)>,
    groups: Vec<(String, usize, Vec<String>)>,
    quorum: String,
}

/// The most logs, witnesses and groups a policy may define (the spec asks
/// implementations to support at least 32 of each).
const MAX_POLICY_ITEMS: usize = 256;

/// Why a key whose name and key ID another key of the policy has already is
/// refused: a note's signature lines say only those two, so a line of one
/// would be checked as the other's and fail, rejecting every checkpoint
/// (signed-note: "Accidental collisions of both key name and key ID can
/// lead to errors if signatures from colliding keys pairs are applied to
/// the same note"). A witness named after the log's origin can search for
/// such a key.
const SIGNS_LIKE: &str = "a key with this key's name and key ID is already defined (a log's or \
                          a witness's): their signature lines could not be told apart";

impl Policy {
    /// The key of witness `name`, if the policy has one.
    pub fn witness_key(&self, name: &str) -> Option<&CosignerKey> {
        self.witnesses
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, key, _)| key)
    }

    /// Parses a policy file.
    ///
    /// # Errors
    /// [`WitnessError::Policy`] naming the line and the rule it breaks.
    pub fn parse(text: &[u8]) -> Result<Self, WitnessError> {
        // Tab, newline, printable ASCII and any high-bit octet only.
        if let Some(i) = text
            .iter()
            .position(|&b| !(b == b'\t' || b == b'\n' || (0x20..0x7f).contains(&b) || b >= 0x80))
        {
            let line = text[..i].iter().filter(|&&b| b == b'\n').count() + 1;
            return Err(WitnessError::Policy {
                line,
                why: "a control character other than tab".into(),
            });
        }
        let mut policy = Policy {
            logs: Vec::new(),
            witnesses: Vec::new(),
            other_logs: Vec::new(),
            other_witnesses: Vec::new(),
            groups: Vec::new(),
            quorum: String::new(),
        };
        let mut quorum = None;
        for (n, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = n + 1;
            let bad = |why: String| WitnessError::Policy { line, why };
            // Names are opaque octets (tlog-policy, "Character set"), so
            // two that differ must stay two: no lossy decoding, which would
            // make every invalid sequence one U+FFFD. Names here are UTF-8
            // text; a comment may hold anything.
            let raw = match std::str::from_utf8(raw) {
                Ok(raw) => raw,
                Err(_) if raw.trim_ascii_start().starts_with(b"#") => continue,
                Err(_) => return Err(bad("bytes that are not UTF-8".into())),
            };
            let words: Vec<&str> = raw.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
            let Some(&keyword) = words.first() else {
                continue;
            };
            if keyword.starts_with('#') {
                continue;
            }
            // Definitions only: the quorum line is not one.
            if keyword != "quorum"
                && policy.logs.len()
                    + policy.witnesses.len()
                    + policy.other_logs.len()
                    + policy.other_witnesses.len()
                    + policy.groups.len()
                    >= MAX_POLICY_ITEMS
            {
                return Err(bad(format!("more than {MAX_POLICY_ITEMS} definitions")));
            }
            match (keyword, &words[1..]) {
                ("log", [vkey] | [vkey, _]) => {
                    let key = match VerifierKey::parse(vkey) {
                        Ok(key) => key,
                        // Another type: a log "MAY use any note signature
                        // algorithm" (C2SP tlog-checkpoint), ML-DSA-44
                        // recommended. Named, never counted.
                        Err(note::NoteError::UnsupportedKeyType(_)) => {
                            let key = note::OtherKey::parse(vkey)
                                .map_err(|e| bad(format!("log key: {e}")))?;
                            check_cosignature_key(&key)
                                .map_err(|e| bad(format!("log key: {e}")))?;
                            policy.add_other(key, None).map_err(bad)?;
                            continue;
                        }
                        Err(e) => return Err(bad(format!("log key: {e}"))),
                    };
                    if policy
                        .logs
                        .iter()
                        .any(|k| k.public_key() == key.public_key())
                        || policy
                            .other_logs
                            .iter()
                            .any(|k| k.public_key() == key.public_key())
                    {
                        return Err(bad("a log with this key is already defined".into()));
                    }
                    if policy.signs_like(key.name(), key.key_id()) {
                        return Err(bad(SIGNS_LIKE.into()));
                    }
                    policy.logs.push(key);
                }
                ("witness", [name, vkey] | [name, vkey, _]) => {
                    let key = match CosignerKey::parse(vkey) {
                        Ok(key) => key,
                        Err(e) => match note::OtherKey::parse(vkey) {
                            // A malformed cosignature/v1 key.
                            Ok(other) if other.kind() == COSIGNATURE_V1_TYPE => {
                                return Err(bad(e.to_string()))
                            }
                            // A cosigner's type lavd does not verify: named,
                            // never counted. A log's type is refused (a key
                            // pasted on the wrong line).
                            Ok(other) if OTHER_WITNESS_TYPES.contains(&other.kind()) => {
                                check_cosignature_key(&other)
                                    .map_err(|e| bad(format!("{vkey}: {e}")))?;
                                policy.check_new_name(name).map_err(bad)?;
                                policy.add_other(other, Some(name)).map_err(bad)?;
                                continue;
                            }
                            Ok(other) => {
                                return Err(bad(format!(
                                    "{vkey}: type {:#04x} is not a cosigner key's (0x04, \
                                     verified; 0x02 or 0x06, named and never counted)",
                                    other.kind()
                                )))
                            }
                            Err(other) => return Err(bad(format!("{vkey}: {other}"))),
                        },
                    };
                    policy.check_new_name(name).map_err(bad)?;
                    if policy
                        .witnesses
                        .iter()
                        .any(|(_, k, _)| k.public_key == key.public_key)
                        || policy
                            .other_witnesses
                            .iter()
                            .any(|(_, k)| k.public_key() == key.public_key)
                    {
                        return Err(bad("a witness with this key is already defined".into()));
                    }
                    if policy.signs_like(key.name(), key.key_id()) {
                        return Err(bad(SIGNS_LIKE.into()));
                    }
                    let url = words.get(3).map(|u| u.to_string());
                    policy.witnesses.push((name.to_string(), key, url));
                }
                ("group", [name, k, members @ ..]) if !members.is_empty() => {
                    policy.check_new_name(name).map_err(bad)?;
                    let n = members.len();
                    let threshold = match *k {
                        "all" => n,
                        "any" => 1,
                        k if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => k
                            .parse::<usize>()
                            .ok()
                            .filter(|k| (1..=n).contains(k))
                            .ok_or_else(|| bad(format!("a threshold of 1 to {n}")))?,
                        other => return Err(bad(format!("`{other}` is not all, any or a number"))),
                    };
                    for (i, m) in members.iter().enumerate() {
                        if *m == "none" {
                            return Err(bad("`none` cannot be a group member".into()));
                        }
                        if !policy.is_defined(m) {
                            return Err(bad(format!("`{m}` is not defined on an earlier line")));
                        }
                        if members[..i].contains(m) {
                            return Err(bad(format!("`{m}` is listed twice")));
                        }
                    }
                    policy.groups.push((
                        name.to_string(),
                        threshold,
                        members.iter().map(|m| m.to_string()).collect(),
                    ));
                }
                ("quorum", [name]) => {
                    if quorum.is_some() {
                        return Err(bad("a second quorum line".into()));
                    }
                    if *name != "none" && !policy.is_defined(name) {
                        return Err(bad(format!("`{name}` is not defined on an earlier line")));
                    }
                    quorum = Some(name.to_string());
                }
                _ => {
                    return Err(bad(format!(
                        "not a log, witness, group or quorum line: {raw}"
                    )))
                }
            }
        }
        policy.quorum = quorum.ok_or(WitnessError::Policy {
            line: 0,
            why: "no quorum line".into(),
        })?;
        Ok(policy)
    }

    /// Whether the quorum needs any cosignature (it is not `none`).
    pub fn needs_cosignatures(&self) -> bool {
        self.quorum != "none"
    }

    fn is_defined(&self, name: &str) -> bool {
        self.witnesses.iter().any(|(n, ..)| n == name)
            || self.other_witnesses.iter().any(|(n, _)| n == name)
            || self.groups.iter().any(|(n, ..)| n == name)
    }

    /// Whether a log or witness key of the policy has this name and key ID
    /// ([`SIGNS_LIKE`]).
    fn signs_like(&self, name: &str, key_id: u32) -> bool {
        self.logs
            .iter()
            .any(|k| k.name() == name && k.key_id() == key_id)
            || self
                .witnesses
                .iter()
                .any(|(_, k, _)| k.name() == name && k.key_id() == key_id)
            || self
                .other_logs
                .iter()
                .chain(self.other_witnesses.iter().map(|(_, k)| k))
                .any(|k| k.name() == name && k.key_id() == key_id)
    }

    /// Adds a log (`witness` `None`) or witness key of a type lavd does
    /// not verify, after the checks a known key gets.
    fn add_other(&mut self, key: note::OtherKey, witness: Option<&str>) -> Result<(), String> {
        // One key whatever its type (tlog-policy: keys that wrap the same
        // public key are one).
        let same = |k: &[u8]| k == key.public_key();
        match witness {
            None if self.other_logs.iter().any(|k| same(k.public_key()))
                || self.logs.iter().any(|k| same(k.public_key())) =>
            {
                return Err("a log with this key is already defined".into())
            }
            Some(_)
                if self
                    .other_witnesses
                    .iter()
                    .any(|(_, k)| same(k.public_key()))
                    || self.witnesses.iter().any(|(_, k, _)| same(k.public_key())) =>
            {
                return Err("a witness with this key is already defined".into())
            }
            _ => {}
        }
        if self.signs_like(key.name(), key.key_id()) {
            return Err(SIGNS_LIKE.into());
        }
        match witness {
            Some(name) => self.other_witnesses.push((name.to_string(), key)),
            None => self.other_logs.push(key),
        }
        Ok(())
    }

    /// The log keys it names with a type lavd does not verify (key name
    /// and type): a checkpoint signed only by one of them is `unknown_log`.
    pub fn unverifiable_logs(&self) -> impl Iterator<Item = (&str, u8)> {
        self.other_logs.iter().map(|key| (key.name(), key.kind()))
    }

    /// The witnesses it names with a key type lavd does not verify, and
    /// that type: their cosignatures never count.
    pub fn unverifiable_witnesses(&self) -> impl Iterator<Item = (&str, u8)> {
        self.other_witnesses
            .iter()
            .map(|(name, key)| (name.as_str(), key.kind()))
    }

    fn check_new_name(&self, name: &str) -> Result<(), String> {
        if name == "none" {
            return Err("`none` is a reserved name".into());
        }
        if self.is_defined(name) {
            return Err(format!("`{name}` is already defined"));
        }
        Ok(())
    }

    /// The witnesses it names: (policy name, key, URL).
    pub fn witnesses(&self) -> impl Iterator<Item = (&str, &CosignerKey, Option<&str>)> {
        self.witnesses
            .iter()
            .map(|(n, k, u)| (n.as_str(), k, u.as_deref()))
    }

    /// Checks a signed checkpoint against the policy: signed by one of its
    /// logs, and cosigned by witnesses that make the quorum. Returns the
    /// checkpoint and the witnesses whose cosignature verified, each with
    /// the newest timestamp it cosigned at (Unix seconds), in policy order.
    ///
    /// # Errors
    /// [`WitnessError::UnknownLog`], [`WitnessError::CosignatureInvalid`]
    /// (a bad line by a known witness rejects the note),
    /// [`WitnessError::QuorumNotMet`], note errors (among them a
    /// signature line of one of the policy's log keys that does not verify,
    /// even when another's does: signed-note's verifiers reject such a
    /// note).
    pub fn verify(&self, checkpoint: &str) -> Result<(Checkpoint, Cosigned), WitnessError> {
        let mut verified = None;
        for key in &self.logs {
            match note::verify_checkpoint(checkpoint, key) {
                Ok(c) => {
                    verified.get_or_insert(c);
                }
                Err(e @ note::NoteError::SignatureInvalid { .. }) => return Err(e.into()),
                Err(_) => {}
            }
        }
        let verified = verified.ok_or(WitnessError::UnknownLog)?;
        let mut cosigned = Vec::new();
        for (name, key, _) in &self.witnesses {
            if let Some(newest) = verify_cosignatures(checkpoint, key)?.into_iter().max() {
                cosigned.push((name.clone(), newest));
            }
        }
        let valid: Vec<String> = cosigned.iter().map(|(name, _)| name.clone()).collect();
        if !self.met(&self.quorum, &valid) {
            return Err(WitnessError::QuorumNotMet { valid });
        }
        Ok((verified, cosigned))
    }

    /// Whether the witnesses with these policy names make the quorum.
    pub fn quorum_met_by_names(&self, valid: &[String]) -> bool {
        self.met(&self.quorum, valid)
    }

    /// Whether the quorum is `none`: no witness is needed.
    pub fn quorum_is_none(&self) -> bool {
        self.quorum == "none"
    }

    /// The latest time at which the quorum vouched for the checkpoint: the
    /// largest `t` such that the witnesses that cosigned at `t` or later
    /// (`cosigned`, as [`Policy::verify`] returns it) make the quorum.
    /// `None` when no time does (under `quorum none`, none is needed).
    ///
    /// A cosignature says that, as of its timestamp, the checkpoint was the
    /// largest tree its witness had seen (C2SP tlog-cosignature); a
    /// checkpoint whose quorum time is old may be a frozen view that hides
    /// what the log appended since.
    pub fn quorum_as_of(&self, cosigned: &[(String, u64)]) -> Option<u64> {
        if self.quorum_is_none() {
            return None;
        }
        let mut times: Vec<u64> = cosigned.iter().map(|(_, t)| *t).collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        times.dedup();
        times.into_iter().find(|&t| {
            let since: Vec<String> = cosigned
                .iter()
                .filter(|(_, at)| *at >= t)
                .map(|(name, _)| name.clone())
                .collect();
            self.met(&self.quorum, &since)
        })
    }

    /// Whether the witnesses with these keys (each known to have cosigned
    /// one checkpoint) make the policy's quorum. Keys the policy does not
    /// name count for nothing.
    pub fn quorum_met_by<'a>(&self, cosigned: impl IntoIterator<Item = &'a CosignerKey>) -> bool {
        let keys: Vec<&CosignerKey> = cosigned.into_iter().collect();
        let valid: Vec<String> = self
            .witnesses
            .iter()
            .filter(|(_, key, _)| keys.contains(&key))
            .map(|(name, ..)| name.clone())
            .collect();
        self.met(&self.quorum, &valid)
    }

    /// Whether `name` (a witness, a group or `none`) has witnessed, given
    /// the witnesses whose cosignature verified.
    ///
    /// Groups name only witnesses and groups of earlier lines, so one pass
    /// in definition order decides every group once. (Deciding a group by
    /// recursing into its members revisits shared subgroups: a chain of
    /// groups that each name the two before took Fibonacci-many steps, so a
    /// 64-line policy never finished.)
    fn met(&self, name: &str, valid: &[String]) -> bool {
        if name == "none" {
            return true;
        }
        let mut decided: Vec<bool> = Vec::with_capacity(self.groups.len());
        for (_, k, members) in &self.groups {
            let count = members
                .iter()
                .filter(|m| match self.groups.iter().position(|(n, ..)| n == *m) {
                    Some(i) => decided.get(i).copied().unwrap_or(false),
                    None => valid.iter().any(|v| v == *m),
                })
                .count();
            decided.push(count >= *k);
        }
        match self.groups.iter().position(|(n, ..)| n == name) {
            Some(i) => decided.get(i).copied().unwrap_or(false),
            None => valid.iter().any(|v| v == name),
        }
    }
}

/// The most consistency proof lines an `add-checkpoint` request may carry
/// (C2SP tlog-witness).
pub const MAX_PROOF_LINES: usize = 63;

/// The largest `add-checkpoint` body accepted: the largest note
/// ([`super::note::MAX_NOTE_BYTES`], which holds the 16 signatures
/// signed-note asks verifiers to take, post-quantum ones included) plus
/// the `old` line and 63 proof lines (each 44 bytes of base64 and a
/// newline).
pub const MAX_ADD_CHECKPOINT_BYTES: usize =
    super::note::MAX_NOTE_BYTES + 32 + MAX_PROOF_LINES * 45 + 1;

/// A C2SP tlog-witness `add-checkpoint` request: the size of the checkpoint
/// the client believes the witness last cosigned, a consistency proof from
/// it, and the new checkpoint (a signed note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCheckpoint {
    /// `old <size>`.
    pub old_size: u64,
    /// The RFC 6962 consistency proof from `old_size` to the checkpoint.
    pub proof: Vec<super::merkle::Hash>,
    /// The signed checkpoint.
    pub checkpoint: String,
}

impl AddCheckpoint {
    /// The request body: `old <n>\n`, one base64 hash per line, an empty
    /// line, the checkpoint.
    pub fn encode(&self) -> String {
        let mut body = format!("old {}\n", self.old_size);
        for hash in &self.proof {
            body.push_str(&STANDARD.encode(hash));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(&self.checkpoint);
        body
    }

    /// Parses a request body, strictly.
    ///
    /// # Errors
    /// An [`AddCheckpointError`] naming what is malformed (the witness
    /// answers 400 with its message).
    pub fn parse(body: &[u8]) -> Result<Self, AddCheckpointError> {
        if body.len() > MAX_ADD_CHECKPOINT_BYTES {
            return Err(AddCheckpointError::TooLarge);
        }
        let text = std::str::from_utf8(body).map_err(|_| AddCheckpointError::NotUtf8)?;
        let (first, mut rest) = text.split_once('\n').ok_or(AddCheckpointError::NoOldLine)?;
        let size = first
            .strip_prefix("old ")
            .ok_or(AddCheckpointError::NoOldLine)?;
        let canonical = size == "0" || (!size.starts_with('0') && !size.is_empty());
        if !canonical || !size.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AddCheckpointError::OldSize);
        }
        let old_size: u64 = size.parse().map_err(|_| AddCheckpointError::OldSize)?;
        let mut proof = Vec::new();
        loop {
            let (line, after) = rest
                .split_once('\n')
                .ok_or(AddCheckpointError::NoBlankLine)?;
            rest = after;
            if line.is_empty() {
                break;
            }
            if proof.len() == MAX_PROOF_LINES {
                return Err(AddCheckpointError::TooManyProofLines);
            }
            let line_number = proof.len() + 1;
            let bytes = STANDARD
                .decode(line)
                .map_err(|_| AddCheckpointError::ProofLine(line_number))?;
            let hash: super::merkle::Hash = bytes
                .try_into()
                .map_err(|_| AddCheckpointError::ProofLine(line_number))?;
            proof.push(hash);
        }
        Ok(AddCheckpoint {
            old_size,
            proof,
            checkpoint: rest.to_string(),
        })
    }
}

/// Why an `add-checkpoint` body does not parse. Every variant is answered
/// 400 with its message; the code is for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddCheckpointError {
    /// Over [`MAX_ADD_CHECKPOINT_BYTES`].
    #[error("the body is over {MAX_ADD_CHECKPOINT_BYTES} bytes")]
    TooLarge,
    /// Not UTF-8.
    #[error("the body is not UTF-8")]
    NotUtf8,
    /// The first line is not `old <size>` ending in a newline.
    #[error("the first line is not `old <size>` ending in a newline")]
    NoOldLine,
    /// The old size is not a decimal without leading zeros that fits 64 bits.
    #[error("the old size is not a decimal without leading zeros below 2^64")]
    OldSize,
    /// No empty line separates the proof from the checkpoint.
    #[error("no empty line before the checkpoint")]
    NoBlankLine,
    /// More than [`MAX_PROOF_LINES`] proof lines.
    #[error("more than {MAX_PROOF_LINES} proof lines")]
    TooManyProofLines,
    /// A proof line (1-based) that is not a standard-base64 32-byte hash.
    #[error("proof line {0} is not a standard-base64 32-byte hash")]
    ProofLine(usize),
}

impl AddCheckpointError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            AddCheckpointError::TooLarge => "add_checkpoint_too_large",
            AddCheckpointError::NotUtf8 => "body_not_utf8",
            AddCheckpointError::NoOldLine => "old_line_malformed",
            AddCheckpointError::OldSize => "old_size_malformed",
            AddCheckpointError::NoBlankLine => "proof_not_terminated",
            AddCheckpointError::TooManyProofLines => "proof_too_long",
            AddCheckpointError::ProofLine(_) => "proof_line_malformed",
        }
    }
}

/// What a witness makes of an `add-checkpoint`: the C2SP tlog-witness
/// outcome, each with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    /// 200: the checkpoint was recorded; the body is these cosignature lines.
    Cosigned(String),
    /// 400: a malformed body, or an old size above the checkpoint's.
    BadRequest(String),
    /// 403: no signature by a key the witness trusts for the origin, or a
    /// signature line of such a key that does not verify.
    Forbidden,
    /// 404: an origin the witness does not know.
    UnknownOrigin,
    /// 409: the old size is not the size last cosigned (the body is that
    /// size, `text/x.tlog.size`). (A checkpoint of that same size with
    /// another root, a fork, is 422: [`AddOutcome::BadProof`].)
    Conflict {
        /// The size the witness last cosigned for the origin.
        size: u64,
    },
    /// 422: the consistency proof does not verify, or a checkpoint of the
    /// size last cosigned carries another root (a fork).
    BadProof(String),
    /// 503: the witness has no timestamp to give: its clock reads 1970 or
    /// before and its state has given none. A cosignature stamped 0 would
    /// say nothing of when the witness saw the tree (C2SP tlog-cosignature
    /// allows it; lavd's witness does not make one). Nothing is recorded
    /// or signed.
    NoTimestamp,
}

impl AddOutcome {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            AddOutcome::Cosigned(_) => 200,
            AddOutcome::BadRequest(_) => 400,
            AddOutcome::Forbidden => 403,
            AddOutcome::UnknownOrigin => 404,
            AddOutcome::Conflict { .. } => 409,
            AddOutcome::BadProof(_) => 422,
            AddOutcome::NoTimestamp => 503,
        }
    }
}

/// The checkpoint `note` holds, signed by one of `keys` (the keys trusted
/// for its origin), as a witness reads it: a malformed note is a bad
/// request; a well-formed one that no trusted key signed is forbidden, and
/// so is one with a line of a trusted key that does not verify, though
/// another's does (signed-note calls it malformed; tlog-witness answers
/// 403); a note a trusted key signed whose text is no checkpoint of this
/// origin is a bad request again. Extension lines are taken.
///
/// # Errors
/// [`AddOutcome::BadRequest`] or [`AddOutcome::Forbidden`].
pub fn signed_checkpoint(note: &str, keys: &[VerifierKey]) -> Result<Checkpoint, AddOutcome> {
    if let Err(e) = note::split_note(note) {
        return Err(AddOutcome::BadRequest(e.to_string()));
    }
    // Every trusted key is asked: a signature line matching one of them
    // that does not verify makes the note malformed (signed-note), and
    // tlog-witness answers it 403 even when another trusted key's verifies.
    let mut opened = None;
    for key in keys {
        match note::open_note(note, key) {
            Ok(text) => {
                opened.get_or_insert((key, text));
            }
            Err(note::NoteError::SignatureInvalid { .. }) => return Err(AddOutcome::Forbidden),
            Err(_) => {}
        }
    }
    let (key, text) = opened.ok_or(AddOutcome::Forbidden)?;
    let checkpoint = Checkpoint::parse_with_extensions(text)
        .map_err(|e| AddOutcome::BadRequest(format!("the signed note: {e}")))?;
    if checkpoint.origin != key.name() {
        return Err(AddOutcome::BadRequest(format!(
            "the signed checkpoint's origin {:?} is not its key's name {:?}",
            checkpoint.origin,
            key.name()
        )));
    }
    Ok(checkpoint)
}

/// The checks of C2SP tlog-witness `add-checkpoint`, in its order, given
/// the keys the witness trusts for each origin (`trusted`) and what it last
/// cosigned for the request's origin (`recorded`: size and root, `None`
/// when never). Returns the verified checkpoint to record and cosign, or
/// the answer. The caller must run this and record the result atomically
/// (a compare-and-swap on `recorded`), so that two requests can never roll
/// the recorded size back: [`authenticate_checkpoint`] before taking the
/// state, then [`check_against_record`] holding it, is the same.
///
/// # Errors
/// The [`AddOutcome`] to answer when the checkpoint must not be cosigned.
pub fn check_add_checkpoint(
    request: &AddCheckpoint,
    trusted: &dyn Fn(&str) -> Vec<VerifierKey>,
    recorded: &dyn Fn(&str) -> Option<(u64, super::merkle::Hash)>,
) -> Result<Checkpoint, AddOutcome> {
    let checkpoint = authenticate_checkpoint(request, trusted)?;
    let recorded = recorded(&checkpoint.origin);
    check_against_record(request, checkpoint, recorded)
}

/// The checks of `add-checkpoint` that do not depend on what the witness
/// recorded: a known origin (404), the log's signature (403), a readable
/// checkpoint (400). They come first in the spec's order, and are where
/// the cost is (a signature check for each matching line, up to
/// [`note::MAX_SIGNATURES`]): a witness runs them before it takes its
/// state, so that a request whose note repeats a signature line many
/// times does not hold every other one back.
///
/// # Errors
/// The [`AddOutcome`] to answer.
pub fn authenticate_checkpoint(
    request: &AddCheckpoint,
    trusted: &dyn Fn(&str) -> Vec<VerifierKey>,
) -> Result<Checkpoint, AddOutcome> {
    // The origin is the first line of the note.
    let origin = request.checkpoint.split('\n').next().unwrap_or_default();
    let keys = trusted(origin);
    if keys.is_empty() {
        return Err(AddOutcome::UnknownOrigin);
    }
    signed_checkpoint(&request.checkpoint, &keys)
}

/// The rest of `add-checkpoint`'s checks, on a `checkpoint` that
/// [`authenticate_checkpoint`] gave for `request`, against what the
/// witness last cosigned for its origin (`recorded`, read in the same
/// transaction that records the result).
///
/// # Errors
/// The [`AddOutcome`] to answer.
pub fn check_against_record(
    request: &AddCheckpoint,
    checkpoint: Checkpoint,
    recorded: Option<(u64, super::merkle::Hash)>,
) -> Result<Checkpoint, AddOutcome> {
    if request.old_size > checkpoint.size {
        return Err(AddOutcome::BadRequest(format!(
            "old size {} is above the checkpoint's size {}",
            request.old_size, checkpoint.size
        )));
    }
    let (size, root) = recorded.unwrap_or((0, super::merkle::empty_root()));
    if request.old_size != size {
        return Err(AddOutcome::Conflict { size });
    }
    // A tree of size 0 has one root; a checkpoint claiming another is no
    // tree at all (and two of them must never both be cosigned). After the
    // old size, in the spec's order: a client whose old size is stale
    // learns the recorded one (409) first.
    if checkpoint.size == 0 && checkpoint.root != super::merkle::empty_root() {
        return Err(AddOutcome::BadProof(
            "a checkpoint of size 0 must carry the empty tree's root".into(),
        ));
    }
    // C2SP tlog-witness: the same size must have the same root, else 422
    // (409 until the spec's change of 2026-07-06, C2SP commit 95978ca).
    if size == checkpoint.size && root != checkpoint.root {
        return Err(AddOutcome::BadProof(format!(
            "a checkpoint of size {size} with another root than the one cosigned (a fork)"
        )));
    }
    if size == 0 {
        if !request.proof.is_empty() {
            return Err(AddOutcome::BadProof(
                "the proof from size 0 must be empty".into(),
            ));
        }
    } else {
        super::merkle::verify_consistency(
            size,
            checkpoint.size,
            &root,
            &checkpoint.root,
            &request.proof,
        )
        .map_err(|e| AddOutcome::BadProof(e.to_string()))?;
    }
    Ok(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;

    /// The example checkpoint and cosignature line of C2SP
    /// tlog-cosignature ("Transparency Log Cosignatures", the example and
    /// "Ed25519 signed message").
    const SPEC_BODY: &str =
        "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
    const SPEC_LINE: &str = "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==";

    #[test]
    fn the_signed_message_and_line_layout_match_the_spec_example() {
        assert_eq!(
            cosigned_message(SPEC_BODY, 1_679_315_147),
            b"cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
        );
        // The example line: 4 bytes of key ID, the 8-byte big-endian
        // timestamp of the example's `time` line, a 64-byte signature.
        let bytes = STANDARD.decode(SPEC_LINE).unwrap();
        assert_eq!(bytes.len(), 4 + 8 + 64);
        assert_eq!(
            u64::from_be_bytes(bytes[4..12].try_into().unwrap()),
            1_679_315_147
        );
    }

    fn witness(name: &str, seed: u8) -> (ed25519_dalek::SigningKey, CosignerKey) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let key = CosignerKey::new(name, sk.verifying_key().as_bytes()).unwrap();
        (sk, key)
    }

    fn cosign(note: &str, sk: &ed25519_dalek::SigningKey, key: &CosignerKey, t: u64) -> String {
        let body = &note[..note.rfind("\n\n").unwrap() + 1];
        let line = cosignature_line::<()>(key, body, t, |m| Ok(sk.sign(m).to_bytes())).unwrap();
        format!("{note}{line}")
    }

    /// A second key of `log.example/a` (a rotation).
    fn rotated_log_key() -> VerifierKey {
        VerifierKey::new(
            "log.example/a",
            ed25519_dalek::SigningKey::from_bytes(&[10; 32])
                .verifying_key()
                .as_bytes(),
        )
        .unwrap()
    }

    /// `note` with one more signature line, of `key`, that does not verify.
    fn with_failing_line(note: &str, key: &VerifierKey) -> String {
        let mut blob = key.key_id().to_be_bytes().to_vec();
        blob.extend_from_slice(&[0; 64]);
        format!("{note}— {} {}\n", key.name(), STANDARD.encode(blob))
    }

    fn log_note() -> (String, VerifierKey) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let key = VerifierKey::new("log.example/a", sk.verifying_key().as_bytes()).unwrap();
        let body = format!("log.example/a\n5\n{}\n", STANDARD.encode([3u8; 32]));
        let sig = sk.sign(body.as_bytes()).to_bytes();
        let mut line = key.key_id().to_be_bytes().to_vec();
        line.extend_from_slice(&sig);
        (
            format!("{body}\n— log.example/a {}\n", STANDARD.encode(line)),
            key,
        )
    }

    #[test]
    fn key_ids_and_vkeys_round_trip() {
        let (_, key) = witness("witness.example/w1", 1);
        let text = key.to_string();
        assert!(text.starts_with("witness.example/w1+"));
        assert_eq!(CosignerKey::parse(&text).unwrap(), key);
        // The log's own (type 0x01) key is not a cosigner key.
        let (_, log) = log_note();
        assert!(CosignerKey::parse(&log.to_string()).is_err());
        // A wrong key ID is refused.
        let mut wrong = text.clone();
        wrong.replace_range(19..20, if &text[19..20] == "0" { "1" } else { "0" });
        assert_eq!(
            CosignerKey::parse(&wrong).unwrap_err().code(),
            "bad_witness_key"
        );
    }

    #[test]
    fn cosignatures_verify_and_forgeries_do_not() {
        let (note_text, _) = log_note();
        let (sk, key) = witness("witness.example/w1", 1);
        let cosigned = cosign(&note_text, &sk, &key, 1_700_000_000);
        assert_eq!(
            verify_cosignatures(&cosigned, &key).unwrap(),
            [1_700_000_000]
        );
        assert!(verify_cosignatures(&note_text, &key).unwrap().is_empty());
        // Another key under the same name and key ID cannot pass.
        let (other, _) = witness("witness.example/w1", 2);
        let forged = cosign(&note_text, &other, &key, 1_700_000_000);
        assert_eq!(
            verify_cosignatures(&forged, &key).unwrap_err().code(),
            "cosignature_invalid"
        );
        // A cosignature of another checkpoint does not carry over.
        let moved = cosigned.replacen("\n5\n", "\n6\n", 1);
        assert!(verify_cosignatures(&moved, &key).is_err());
        // Stamped 0, which C2SP tlog-cosignature allows (it bounds the
        // timestamp above only): a cosignature, whose age a quorum's bound
        // judges. Stamped 2^63, which it forbids: refused, though its
        // signature is the key's.
        let at_zero = cosign(&note_text, &sk, &key, 0);
        assert_eq!(verify_cosignatures(&at_zero, &key).unwrap(), [0]);
        let too_late = cosign(&note_text, &sk, &key, 1 << 63);
        assert_eq!(
            verify_cosignatures(&too_late, &key).unwrap_err().code(),
            "cosignature_invalid"
        );
    }

    #[test]
    fn policies_parse_per_the_spec_and_quorums_count() {
        let (note_text, log) = log_note();
        let w: Vec<_> = (1..=3)
            .map(|i| witness(&format!("w{i}.example"), i))
            .collect();
        let text = format!(
            "# two of three\nlog {log}\nwitness A {}\nwitness B {}\n\twitness C {} https://c.example/\ngroup two 2 A B C\nquorum two\n",
            w[0].1, w[1].1, w[2].1
        );
        let policy = Policy::parse(text.as_bytes()).unwrap();
        assert_eq!(
            policy.verify(&note_text).unwrap_err().code(),
            "quorum_not_met"
        );
        let one = cosign(&note_text, &w[0].0, &w[0].1, 1);
        assert_eq!(policy.verify(&one).unwrap_err().code(), "quorum_not_met");
        let two = cosign(&one, &w[2].0, &w[2].1, 2);
        let (checkpoint, valid) = policy.verify(&two).unwrap();
        assert_eq!(checkpoint.size, 5);
        assert_eq!(valid, [("A".to_string(), 1), ("C".to_string(), 2)]);
        // Two of three held it at 1 (A at 1, C at 2); at 2 only C did.
        assert_eq!(policy.quorum_as_of(&valid), Some(1));
        let three = cosign(&two, &w[1].0, &w[1].1, 7);
        let (_, valid) = policy.verify(&three).unwrap();
        assert_eq!(policy.quorum_as_of(&valid), Some(2));

        let none = Policy::parse(format!("log {log}\nquorum none\n").as_bytes()).unwrap();
        assert!(none.verify(&note_text).is_ok());
        assert_eq!(none.quorum_as_of(&[]), None);
        // Two keys of the log (a rotation): a line of the second that does
        // not verify rejects the note, though the first's verifies.
        let rotated = rotated_log_key();
        let two_keys =
            Policy::parse(format!("log {log}\nlog {rotated}\nquorum none\n").as_bytes()).unwrap();
        assert!(two_keys.verify(&note_text).is_ok());
        let with_forged = with_failing_line(&note_text, &rotated);
        assert!(
            matches!(
                two_keys.verify(&with_forged),
                Err(WitnessError::Note(NoteError::SignatureInvalid { .. }))
            ),
            "{:?}",
            two_keys.verify(&with_forged)
        );
        let other_log = Policy::parse(b"quorum none\n").unwrap();
        assert_eq!(
            other_log.verify(&note_text).unwrap_err().code(),
            "unknown_log"
        );

        for bad in [
            "quorum X\n".to_string(),
            format!("witness A {}\nwitness A {}\nquorum A\n", w[0].1, w[1].1),
            format!("witness A {}\nwitness B {}\nquorum A\n", w[0].1, w[0].1),
            format!("witness A {}\ngroup G 2 A\nquorum G\n", w[0].1),
            format!("witness A {}\ngroup G 0 A\nquorum G\n", w[0].1),
            format!("witness A {}\ngroup G any A A\nquorum G\n", w[0].1),
            format!("witness A {}\ngroup G any none\nquorum G\n", w[0].1),
            format!("witness none {}\nquorum none\n", w[0].1),
            format!("group G any A\nwitness A {}\nquorum G\n", w[0].1),
            format!("witness A {}\n", w[0].1),
            "quorum none\nquorum none\n".to_string(),
            // A cosignature type's key whose ID is not the one tlog-cosignature
            // makes a MUST.
            {
                let mut vkey = w[0].1.to_string();
                let at = vkey.find('+').unwrap() + 1;
                vkey.replace_range(at..at + 8, "00000000");
                format!("log {vkey}\nquorum none\n")
            },
            "quorum none\u{7}\n".to_string(),
            "frobnicate\nquorum none\n".to_string(),
        ] {
            let e = Policy::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code(), "bad_policy", "{bad:?}");
        }
        // Names that are not UTF-8: `\xfe`, never defined, is not taken for
        // `\xff` (both would decode to U+FFFD), and is named as the fault.
        let mut bad = b"witness ".to_vec();
        bad.push(0xff);
        bad.extend_from_slice(format!(" {}\ngroup g any ", w[0].1).as_bytes());
        bad.push(0xfe);
        bad.extend_from_slice(b"\nquorum g\n");
        let e = Policy::parse(&bad).unwrap_err();
        assert_eq!(e.code(), "bad_policy");
        assert!(
            e.to_string().contains("line 1") && e.to_string().contains("not UTF-8"),
            "{e}"
        );
        // 256 definitions and the quorum line: the quorum is no definition.
        let many: String = (0..256)
            .map(|i| format!("group g{i} any A\n"))
            .collect::<String>();
        let most = format!("witness A {}\n{many}quorum g0\n", w[0].1);
        let e = Policy::parse(most.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("more than 256"), "{e}");
        let most = format!(
            "witness A {}\n{}quorum g0\n",
            w[0].1,
            many.lines()
                .skip(1)
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        );
        let most = most.replacen("quorum g0", "quorum g1", 1);
        Policy::parse(most.as_bytes()).expect("256 definitions and a quorum");
        // A key with another key's name and key ID is refused, whatever its
        // kind: their lines could not be told apart.
        let policy = Policy::parse(format!("log {log}\nquorum none\n").as_bytes()).unwrap();
        let log_key = &policy.logs[0];
        assert!(policy.signs_like(log_key.name(), log_key.key_id()));
        assert!(!policy.signs_like(log_key.name(), log_key.key_id() ^ 1));
        assert!(!policy.signs_like("other.example", log_key.key_id()));
        // A comment may hold any octets.
        let mut commented = b"# caf\xe9\n".to_vec();
        commented.extend_from_slice(format!("witness A {}\nquorum A\n", w[0].1).as_bytes());
        assert!(Policy::parse(&commented).is_ok());
    }

    /// A vkey of `name` with a key of type `kind` and `len` bytes, its key
    /// ID right (an ML-DSA-44 witness key, C2SP tlog-cosignature's type
    /// 0x06, is 1312 bytes).
    fn other_vkey(name: &str, kind: u8, len: usize) -> String {
        other_vkey_of(name, kind, &vec![kind ^ 0x5a; len])
    }

    /// A vkey of `name` with `public` as a key of type `kind`, its key ID
    /// the recommended one.
    fn other_vkey_of(name: &str, kind: u8, public: &[u8]) -> String {
        let mut typed = vec![kind];
        typed.extend_from_slice(public);
        format!(
            "{name}+{:08x}+{}",
            note::typed_key_id(name, kind, public),
            STANDARD.encode(typed)
        )
    }

    /// A policy shared with verifiers that know more key types (an ML-DSA
    /// witness; a log key of another algorithm) parses: those keys are
    /// named and never counted, as signed-note's verifiers ignore
    /// signatures of keys they do not know. A quorum the Ed25519 witnesses
    /// meet alone is met; one that needs the other is not, which fails
    /// closed. A log line takes any type (C2SP tlog-checkpoint), and lavd's
    /// own checkpoint still verifies beside it. Key IDs of types other than
    /// the cosignature types are taken as stated (signed-note only
    /// recommends its formula, and 0x02 and 0x05 keys use others); an
    /// ML-DSA-44 key must be 1312 bytes under its formula, which
    /// tlog-cosignature makes a MUST. A malformed key, a witness named with
    /// a log's type, a key defined twice and two keys whose lines could not
    /// be told apart are refused. Before, any such policy was refused whole
    /// (`bad_policy`).
    #[test]
    fn keys_of_types_lavd_does_not_verify_are_named_and_never_counted() {
        let (note_text, log) = log_note();
        let (sk, a) = witness("w1.example", 1);
        let mldsa = other_vkey("w2.example", 0x06, 1312);
        // A static-ct log's key, its ID not the recommended formula's.
        let mut static_ct = other_vkey("ct.example/log", 0x05, 32);
        static_ct.replace_range(15..23, "0badc0de");
        let policy = |quorum: &str| {
            Policy::parse(
                format!(
                    "log {log}\nlog {static_ct}\nwitness A {a}\nwitness B {mldsa}\n\
                     group any1 any A B\ngroup both all A B\nquorum {quorum}\n"
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let cosigned = cosign(&note_text, &sk, &a, 1);
        let any = policy("any1");
        assert_eq!(
            any.unverifiable_witnesses().collect::<Vec<_>>(),
            [("B", 0x06)]
        );
        let (_, valid) = any.verify(&cosigned).unwrap();
        assert_eq!(valid, [("A".to_string(), 1)]);
        assert_eq!(any.verify(&note_text).unwrap_err().code(), "quorum_not_met");
        for quorum in ["both", "B"] {
            assert_eq!(
                policy(quorum).verify(&cosigned).unwrap_err().code(),
                "quorum_not_met",
                "{quorum}"
            );
        }

        // Any type on a log line (tlog-checkpoint: a log "MAY use any note
        // signature algorithm", ML-DSA-44 recommended): lavd's own
        // checkpoint still verifies under the policy.
        for other in [&mldsa, &a.to_string()] {
            let logs =
                Policy::parse(format!("log {log}\nlog {other}\nquorum none\n").as_bytes()).unwrap();
            assert!(logs.verify(&note_text).is_ok(), "{other}");
        }
        // Two keys whose lines could not be told apart: one name and one
        // stated key ID (0x02's are taken as stated), or an unverified
        // key stating a verified one's.
        let stated = |name: &str, id: u32, fill: u8| {
            let mut typed = vec![0x02];
            typed.extend_from_slice(&[fill; 65]);
            format!("{name}+{id:08x}+{}", STANDARD.encode(typed))
        };
        let mut wrong_id = other_vkey("w2.example", 0x06, 1312);
        wrong_id.replace_range(11..19, "00000000");
        for (bad, says) in [
            (format!("witness B {wrong_id}\nquorum none\n"), "the key ID"),
            (
                format!(
                    "witness B {}\nquorum none\n",
                    other_vkey("w2.example", 0x06, 1311)
                ),
                "1312 bytes",
            ),
            (
                format!(
                    "witness B {}\nquorum none\n",
                    other_vkey("w2.example", 0x06, 0)
                ),
                "empty key",
            ),
            // A log's type as a witness.
            (
                format!("witness B {log}\nquorum none\n"),
                "type 0x01 is not a cosigner key's",
            ),
            (
                format!("witness B {static_ct}\nquorum none\n"),
                "type 0x05 is not a cosigner key's",
            ),
            // A 0x04 key on a log line is held to its 32 bytes.
            (
                format!("log {}\nquorum none\n", other_vkey("w3.example", 0x04, 31)),
                "is 32 bytes, not 31",
            ),
            // One key under two types is one key.
            (
                format!(
                    "witness A {a}\nwitness B {}\nquorum none\n",
                    other_vkey_of("w1b.example", 0x02, a.public_key())
                ),
                "a witness with this key is already defined",
            ),
            (
                format!(
                    "log {log}\nlog {}\nquorum none\n",
                    other_vkey_of("other.example/log", 0x02, log.public_key())
                ),
                "a log with this key is already defined",
            ),
            // In either order.
            (
                format!(
                    "log {}\nlog {log}\nquorum none\n",
                    other_vkey_of("other.example/log", 0x02, log.public_key())
                ),
                "a log with this key is already defined",
            ),
            (
                format!(
                    "witness B {}\nwitness A {a}\nquorum none\n",
                    other_vkey_of("w1b.example", 0x02, a.public_key())
                ),
                "a witness with this key is already defined",
            ),
            // An ML-DSA-44 log key is held to tlog-cosignature too.
            (
                format!("log {wrong_id}\nquorum none\n"),
                "log key: the key ID",
            ),
            // Defined twice; two whose lines could not be told apart.
            (
                format!("witness B {mldsa}\nwitness C {mldsa}\nquorum none\n"),
                "a witness with this key is already defined",
            ),
            (
                format!("log {static_ct}\nlog {static_ct}\nquorum none\n"),
                "a log with this key is already defined",
            ),
            (
                format!(
                    "witness B {}\nwitness C {}\nquorum none\n",
                    stated("ecdsa.example", 7, 1),
                    stated("ecdsa.example", 7, 2)
                ),
                "could not be told apart",
            ),
            (
                format!(
                    "log {log}\nwitness B {}\nquorum none\n",
                    stated("log.example/a", log.key_id(), 3)
                ),
                "could not be told apart",
            ),
        ] {
            let e = Policy::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code(), "bad_policy", "{bad:?}");
            assert!(e.to_string().contains(says), "{bad:?}: {e}");
        }
    }

    /// A log of `n` leaves signed by the test log key, with its tree.
    fn signed_tree(n: u64, salt: u8) -> (crate::audit::merkle::MemoryTree, String) {
        let mut tree = crate::audit::merkle::MemoryTree::new();
        for i in 0..n {
            tree.push_leaf(&[salt, i as u8, (i >> 8) as u8]);
        }
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let key = VerifierKey::new("log.example/a", sk.verifying_key().as_bytes()).unwrap();
        let body = format!(
            "log.example/a\n{n}\n{}\n",
            STANDARD.encode(tree.root(n).unwrap())
        );
        let mut line = key.key_id().to_be_bytes().to_vec();
        line.extend_from_slice(&sk.sign(body.as_bytes()).to_bytes());
        (
            tree,
            format!("{body}\n— log.example/a {}\n", STANDARD.encode(line)),
        )
    }

    #[test]
    fn add_checkpoint_bodies_round_trip_and_malformed_ones_are_refused() {
        let (tree, checkpoint) = signed_tree(20, 0);
        let request = AddCheckpoint {
            old_size: 7,
            proof: crate::audit::merkle::consistency_proof(&tree, 7, 20).unwrap(),
            checkpoint,
        };
        let body = request.encode();
        assert!(body.starts_with("old 7\n"));
        assert_eq!(AddCheckpoint::parse(body.as_bytes()).unwrap(), request);
        let hash = format!("{}\n", STANDARD.encode([0u8; 32]));
        for (bad, code) in [
            ("".to_string(), "old_line_malformed"),
            ("old 07\n\nx".to_string(), "old_size_malformed"),
            ("old -1\n\nx".to_string(), "old_size_malformed"),
            (
                "old 18446744073709551616\n\nx".to_string(),
                "old_size_malformed",
            ),
            ("old\n\nx".to_string(), "old_line_malformed"),
            ("new 1\n\nx".to_string(), "old_line_malformed"),
            (
                "old 1\nnot base64!\n\nx".to_string(),
                "proof_line_malformed",
            ),
            (
                format!("old 1\n{}\n\nx", STANDARD.encode([0u8; 31])),
                "proof_line_malformed",
            ),
            (format!("old 1\n{}\nx", hash.repeat(64)), "proof_too_long"),
            ("old 1\n".to_string(), "proof_not_terminated"),
            (
                format!("old 1\n\n{}", "x".repeat(MAX_ADD_CHECKPOINT_BYTES)),
                "add_checkpoint_too_large",
            ),
        ] {
            let e = AddCheckpoint::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code(), code, "{bad:?}: {e}");
        }
        assert_eq!(
            AddCheckpoint::parse(b"old 1\n\n\xff").unwrap_err().code(),
            "body_not_utf8"
        );
        assert!(AddCheckpoint::parse(format!("old 1\n{}\nx", hash.repeat(63)).as_bytes()).is_ok());
        // A checkpoint that also carries post-quantum signatures of other
        // keys (an ML-DSA-65 signature is 3,309 bytes): with 15 of them and
        // 63 proof lines, the body is far over 16 KiB, and is read.
        let (_, mut checkpoint) = signed_tree(20, 0);
        for i in 0..15 {
            let line = STANDARD.encode([i as u8; 4 + 3309]);
            checkpoint.push_str(&format!("— pq{i}.example {line}\n"));
        }
        let big = format!("old 1\n{}\n{checkpoint}", hash.repeat(63));
        assert!(big.len() > 60 * 1024, "{}", big.len());
        let parsed = AddCheckpoint::parse(big.as_bytes()).unwrap();
        assert_eq!(parsed.checkpoint, checkpoint);
    }

    #[test]
    fn add_checkpoint_answers_every_case_of_the_spec() {
        let (tree, checkpoint) = signed_tree(20, 0);
        let (_, log) = log_note();
        let trusted = |origin: &str| {
            if origin == "log.example/a" {
                vec![log.clone()]
            } else {
                Vec::new()
            }
        };
        let request = |old: u64, checkpoint: &str| AddCheckpoint {
            old_size: old,
            proof: if old == 0 {
                Vec::new()
            } else {
                crate::audit::merkle::consistency_proof(&tree, old, 20).unwrap()
            },
            checkpoint: checkpoint.to_string(),
        };
        let never = |_: &str| None;
        let at = |size: u64| {
            let root = tree.root(size.min(20)).unwrap();
            move |_: &str| Some((size, root))
        };

        // First sight: old 0, empty proof.
        let ok = check_add_checkpoint(&request(0, &checkpoint), &trusted, &never).unwrap();
        assert_eq!(ok.size, 20);
        // From a recorded 7, with the proof.
        assert!(check_add_checkpoint(&request(7, &checkpoint), &trusted, &at(7)).is_ok());
        // Unknown origin: 404.
        let other = checkpoint.replacen("log.example/a", "log.example/b", 1);
        assert_eq!(
            check_add_checkpoint(&request(0, &other), &trusted, &never).unwrap_err(),
            AddOutcome::UnknownOrigin
        );
        // Not signed by the trusted key: 403.
        let unsigned = checkpoint.replacen("\n20\n", "\n21\n", 1);
        assert_eq!(
            check_add_checkpoint(&request(0, &unsigned), &trusted, &never).unwrap_err(),
            AddOutcome::Forbidden
        );
        // Two keys trusted for the origin (a key rotation): a line of the
        // second whose signature fails makes the note malformed, and it is
        // refused (403) though the first's verifies.
        let rotated = rotated_log_key();
        let both = |origin: &str| {
            let mut keys = trusted(origin);
            keys.push(rotated.clone());
            keys
        };
        assert!(check_add_checkpoint(&request(0, &checkpoint), &both, &never).is_ok());
        let with_forged = with_failing_line(&checkpoint, &rotated);
        assert_eq!(
            check_add_checkpoint(&request(0, &with_forged), &both, &never).unwrap_err(),
            AddOutcome::Forbidden
        );
        // Extension lines after the root (tlog-checkpoint allows them, and
        // tlog-cosignature signs them with the rest): cosigned, though
        // lavd's own log never writes them and its verifiers refuse them.
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let extended = format!(
            "log.example/a\n20\n{}\nextension one\nextension two\n",
            STANDARD.encode(tree.root(20).unwrap())
        );
        let mut line = log.key_id().to_be_bytes().to_vec();
        line.extend_from_slice(&sk.sign(extended.as_bytes()).to_bytes());
        let extended_note = format!("{extended}\n— log.example/a {}\n", STANDARD.encode(line));
        let ok = check_add_checkpoint(&request(0, &extended_note), &trusted, &never).unwrap();
        assert_eq!(ok.size, 20);
        assert!(Checkpoint::parse(&extended).is_err());
        // Signed by the trusted key, but not a checkpoint: 400, not 403.
        let body = "log.example/a\ntwenty\nnot a root\n";
        let mut line = log.key_id().to_be_bytes().to_vec();
        line.extend_from_slice(&sk.sign(body.as_bytes()).to_bytes());
        let not_a_checkpoint = format!("{body}\n— log.example/a {}\n", STANDARD.encode(line));
        let refused = check_add_checkpoint(&request(0, &not_a_checkpoint), &trusted, &never);
        assert!(
            matches!(&refused, Err(AddOutcome::BadRequest(why)) if why.contains("signed note")),
            "{refused:?}"
        );
        // Old size above the checkpoint's: 400.
        let mut above = request(0, &checkpoint);
        above.old_size = 21;
        assert_eq!(
            check_add_checkpoint(&above, &trusted, &at(21))
                .unwrap_err()
                .status(),
            400
        );
        // Old size not the recorded one: 409 with the recorded size.
        assert_eq!(
            check_add_checkpoint(&request(7, &checkpoint), &trusted, &at(9)).unwrap_err(),
            AddOutcome::Conflict { size: 9 }
        );
        // The same size with another root (a fork): 422, as C2SP
        // tlog-witness says since 2026-07-06 (409 before).
        let fork = |_: &str| Some((20u64, [7u8; 32]));
        let mut same = request(0, &checkpoint);
        same.old_size = 20;
        assert_eq!(
            check_add_checkpoint(&same, &trusted, &fork)
                .unwrap_err()
                .status(),
            422
        );
        // A wrong proof: 422.
        let mut wrong = request(7, &checkpoint);
        wrong.proof[0][0] ^= 1;
        assert_eq!(
            check_add_checkpoint(&wrong, &trusted, &at(7))
                .unwrap_err()
                .status(),
            422
        );
        // A proof from 0: must be empty.
        let mut from_zero = request(0, &checkpoint);
        from_zero.proof = vec![[0; 32]];
        assert_eq!(
            check_add_checkpoint(&from_zero, &trusted, &never)
                .unwrap_err()
                .status(),
            422
        );
        // A fork of the recorded tree at a larger size: the proof cannot
        // verify against what was recorded.
        let (_, forked) = signed_tree(20, 1);
        assert_eq!(
            check_add_checkpoint(&request(7, &forked), &trusted, &at(7))
                .unwrap_err()
                .status(),
            422
        );
        // Size 0: the empty tree's root is cosigned; any other root is 422,
        // whether or not an empty tree was recorded before.
        let (_, empty) = signed_tree(0, 0);
        assert_eq!(
            check_add_checkpoint(&request(0, &empty), &trusted, &never)
                .unwrap()
                .size,
            0
        );
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let body = format!("log.example/a\n0\n{}\n", STANDARD.encode([7u8; 32]));
        let mut line = log.key_id().to_be_bytes().to_vec();
        line.extend_from_slice(&sk.sign(body.as_bytes()).to_bytes());
        let bogus = format!("{body}\n— log.example/a {}\n", STANDARD.encode(line));
        let refused = check_add_checkpoint(&request(0, &bogus), &trusted, &never);
        assert_eq!(refused.unwrap_err().status(), 422);
        let refused = check_add_checkpoint(&request(0, &bogus), &trusted, &at(0));
        assert_eq!(refused.unwrap_err().status(), 422);
        // A stale old size is answered first, in the spec's order: the
        // client learns the recorded size (409), whatever the root.
        let refused = check_add_checkpoint(&request(0, &bogus), &trusted, &at(7));
        assert!(
            matches!(refused, Err(AddOutcome::Conflict { size: 7 })),
            "{refused:?}"
        );
    }
}
