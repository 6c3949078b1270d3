//! Audit log exports and their offline verification (`lavd audit verify`).
//!
//! An export is one JSON object:
//!
//! ```json
//! {"origin": "lavd.example/audit",
//!  "checkpoint": "<signed note: the tree head the entries must hash to>",
//!  "earlier_checkpoints": ["<signed note>", …],
//!  "entries": [{"index": 0, "leaf": "<base64url of the exact leaf bytes>"}, …]}
//! ```
//!
//! `entries` holds every leaf `0..size` of the checkpoint, in order.
//! `earlier_checkpoints` is optional: tree heads the log signed before (for
//! example the ones returned with unwrap replies); each one is a signed
//! statement about a prefix of the same entries, so it narrows down where an
//! altered leaf is. Unknown members are refused.
//!
//! Verification trusts only the verifier key. It checks, in order: the
//! checkpoint signature and origin; the other signed checkpoints (earlier
//! ones in the export, an older one the auditor kept, or the checkpoints of
//! a previous export the auditor verified before); that entries are exactly
//! `0..size`; that every leaf is canonical, a valid event, and carries its
//! own index as `seq`; that the leaves hash to every signed root whose size
//! they cover. When something fails it names the first bad index: exactly
//! for a structural fault, and for a leaf whose bytes were altered, the
//! range between the largest signed checkpoint that still matches and the
//! smallest that does not (one leaf wide when checkpoints are dense, and
//! exact when a previous export is given).

use std::collections::BTreeMap;
use std::ops::Range;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::leaf::{Event, Leaf, LeafError, UnwrapOutcome};
use super::merkle::{Hash, MemoryTree};
use super::note::{verify_checkpoint, Checkpoint, NoteError, VerifierKey};
use crate::codec;

/// An audit log export file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// The log origin; equals the checkpoint's origin line.
    pub origin: String,
    /// The signed checkpoint covering exactly `entries`.
    pub checkpoint: String,
    /// Earlier signed checkpoints of the same log (optional).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_checkpoints: Vec<String>,
    /// Every leaf, in index order. Each entry is a JSON object (an array in
    /// its place is refused, as everywhere in lavd: `codec::Object`).
    #[serde(deserialize_with = "codec::objects")]
    pub entries: Vec<ExportEntry>,
}

/// One leaf of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportEntry {
    /// The leaf index.
    pub index: u64,
    /// The exact leaf bytes, base64url without padding.
    pub leaf: String,
}

impl ExportEntry {
    /// An entry for the leaf bytes at `index`.
    pub fn new(index: u64, leaf: &[u8]) -> Self {
        Self {
            index,
            leaf: codec::b64_encode(leaf),
        }
    }
}

impl Export {
    /// Parses an export file strictly (unknown members, duplicate members
    /// and trailing data refused).
    ///
    /// # Errors
    /// [`VerifyError::Malformed`].
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        codec::from_json(bytes).map_err(|e| VerifyError::Malformed(e.to_string()))
    }

    /// The export as JSON text.
    ///
    /// # Errors
    /// [`VerifyError::Malformed`] if serialization fails (not expected).
    pub fn to_json(&self) -> Result<Vec<u8>, VerifyError> {
        let mut out =
            serde_json::to_vec_pretty(self).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        out.push(b'\n');
        Ok(out)
    }
}

/// Why an export does not verify. [`VerifyError::first_bad_index`] gives the
/// first leaf index known to be bad.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum VerifyError {
    /// The file is not an export: bad JSON, unknown or missing members.
    #[error("not an audit export: {0}")]
    Malformed(String),
    /// The export's checkpoint is refused (bad signature, another key,
    /// malformed); the inner code says which.
    #[error("the export checkpoint: {0}")]
    Checkpoint(#[source] NoteError),
    /// An earlier checkpoint listed in the export is refused.
    #[error("earlier checkpoint #{position} in the export: {source}")]
    EarlierCheckpoint {
        /// Its position in `earlier_checkpoints`.
        position: usize,
        /// Why.
        #[source]
        source: NoteError,
    },
    /// The older checkpoint given by the auditor is refused.
    #[error("the older checkpoint: {0}")]
    OlderCheckpoint(#[source] NoteError),
    /// The previous export given by the auditor does not verify itself.
    #[error("the previous export does not verify: {0}")]
    PreviousExport(Box<VerifyError>),
    /// The `origin` member differs from the checkpoint's origin.
    #[error("export origin `{export}` differs from the checkpoint origin `{checkpoint}`")]
    OriginMismatch {
        /// The `origin` member.
        export: String,
        /// The checkpoint's origin line.
        checkpoint: String,
    },
    /// Another signed checkpoint is for a larger tree than the export's: the
    /// export is older than what the auditor has seen (a rollback), or the
    /// arguments are swapped.
    #[error("a signed checkpoint of size {size} is newer than the export (size {export_size})")]
    CheckpointBeyondExport {
        /// That checkpoint's size.
        size: u64,
        /// The export checkpoint's size.
        export_size: u64,
    },
    /// The entry at this position does not carry this index: a leaf was
    /// deleted, inserted, duplicated or moved.
    #[error("entry at position {position} has index {found}")]
    EntryIndex {
        /// Position in `entries` (the index it should carry).
        position: u64,
        /// The index it carries.
        found: u64,
    },
    /// Fewer entries than the checkpoint's size: leaves were removed from
    /// the end.
    #[error("{count} entries for a checkpoint of size {size}")]
    EntriesMissing {
        /// Entries present.
        count: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// More entries than the checkpoint's size: leaves were appended without
    /// a checkpoint covering them.
    #[error("{count} entries for a checkpoint of size {size}")]
    EntriesExtra {
        /// Entries present.
        count: u64,
        /// The checkpoint's size.
        size: u64,
    },
    /// A leaf is not base64url without padding.
    #[error("leaf {index} is not base64url")]
    LeafEncoding {
        /// The leaf index.
        index: u64,
    },
    /// A leaf is not a canonical, valid audit event; the inner code says
    /// which (`leaf_not_canonical`, `leaf_invalid`, …).
    #[error("leaf {index}: {source}")]
    Leaf {
        /// The leaf index.
        index: u64,
        /// Why.
        #[source]
        source: LeafError,
    },
    /// A leaf's `seq` is not its index: leaves were reordered, or a leaf was
    /// copied from another position.
    #[error("leaf {index} says seq {seq}")]
    SeqMismatch {
        /// The leaf index.
        index: u64,
        /// Its `seq` field.
        seq: u64,
    },
    /// The leaves do not hash to a signed root: some leaf in `from..to` was
    /// altered, removed or inserted after the checkpoint of size `to` was
    /// signed (the prefix of size `from` still matches).
    #[error("the leaves do not hash to the signed root of size {to}; the first altered leaf is in {from}..{to}")]
    RootMismatch {
        /// The largest signed size that still matches.
        from: u64,
        /// The smallest signed size that does not.
        to: u64,
    },
    /// The export's own checkpoint matches its leaves, but an earlier signed
    /// checkpoint does not: the log signed two different histories (a
    /// rewrite by someone holding the audit key). The leaves differ from the
    /// earlier history first in `from..to`.
    #[error("the log signed inconsistent histories: its leaves differ from the checkpoint of size {to}, first in {from}..{to}")]
    Inconsistent {
        /// The largest earlier size that still matches.
        from: u64,
        /// The smallest earlier size that does not.
        to: u64,
    },
}

impl VerifyError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "export_malformed",
            Self::Checkpoint(e) => e.code(),
            Self::EarlierCheckpoint { .. } => "earlier_checkpoint_refused",
            Self::OlderCheckpoint(_) => "older_checkpoint_refused",
            Self::PreviousExport(_) => "previous_export_invalid",
            Self::OriginMismatch { .. } => "export_origin_mismatch",
            Self::CheckpointBeyondExport { .. } => "checkpoint_beyond_export",
            Self::EntryIndex { .. } => "entry_index_mismatch",
            Self::EntriesMissing { .. } => "entries_missing",
            Self::EntriesExtra { .. } => "entries_extra",
            Self::LeafEncoding { .. } => "leaf_not_base64",
            Self::Leaf { source, .. } => source.code(),
            Self::SeqMismatch { .. } => "leaf_seq_mismatch",
            Self::RootMismatch { .. } => "root_mismatch",
            Self::Inconsistent { .. } => "checkpoints_inconsistent",
        }
    }

    /// The range of indices holding the first bad leaf, when the error is
    /// about leaves.
    pub fn bad_range(&self) -> Option<Range<u64>> {
        match self {
            Self::EntryIndex { position: i, .. }
            | Self::LeafEncoding { index: i }
            | Self::Leaf { index: i, .. }
            | Self::SeqMismatch { index: i, .. }
            | Self::EntriesMissing { count: i, .. }
            | Self::EntriesExtra { size: i, .. } => Some(*i..*i + 1),
            Self::RootMismatch { from, to } | Self::Inconsistent { from, to } => Some(*from..*to),
            _ => None,
        }
    }

    /// The first bad leaf index, when it is known exactly.
    pub fn first_bad_index(&self) -> Option<u64> {
        self.bad_range()
            .filter(|r| r.end == r.start + 1)
            .map(|r| r.start)
    }
}

/// Unwrap and refusal counts for one caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerCounts {
    /// Envelopes opened.
    pub opened: u64,
    /// Envelopes denied.
    pub denied: u64,
    /// Requests refused for their warrant.
    pub refused: u64,
    /// Revocations sent.
    pub revocations: u64,
}

/// What the log says about one warrant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarrantCounts {
    /// Envelopes opened under it.
    pub opened: u64,
    /// Envelopes denied under it.
    pub denied: u64,
    /// Requests refused with it.
    pub refused: u64,
    /// Whether any unwrap ran under it as an emergency warrant.
    pub emergency: bool,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// What a verified export contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The log origin.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// The verified root hash.
    pub root: Hash,
    /// Sizes of the other signed checkpoints shown to be prefixes of it.
    pub consistent_with: Vec<u64>,
    /// The earliest and the latest leaf time.
    pub span: Option<(OffsetDateTime, OffsetDateTime)>,
    /// Leaves per event type.
    pub events: BTreeMap<String, u64>,
    /// Envelopes opened.
    pub opened: u64,
    /// Envelopes denied, by reason.
    pub denied: BTreeMap<String, u64>,
    /// Warrants refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Per caller identity.
    pub callers: BTreeMap<String, CallerCounts>,
    /// Per warrant id.
    pub warrants: BTreeMap<String, WarrantCounts>,
    /// Every leaf, parsed, in index order. A `Summary` is only returned once
    /// every check has passed, so these are verified leaves: what the
    /// oversight report ([`crate::report`]) is built from.
    pub leaves: Vec<Leaf>,
}

impl Summary {
    fn new(checkpoint: &Checkpoint) -> Self {
        Self {
            origin: checkpoint.origin.clone(),
            size: checkpoint.size,
            root: checkpoint.root,
            consistent_with: Vec::new(),
            span: None,
            events: BTreeMap::new(),
            opened: 0,
            denied: BTreeMap::new(),
            refused: BTreeMap::new(),
            callers: BTreeMap::new(),
            warrants: BTreeMap::new(),
            leaves: Vec::new(),
        }
    }

    fn add(&mut self, leaf: Leaf) {
        self.count(&leaf);
        self.leaves.push(leaf);
    }

    fn count(&mut self, leaf: &Leaf) {
        // The earliest and the latest: leaves written by replicas whose
        // clocks differ need not be in time order.
        self.span = Some(match self.span {
            None => (leaf.time, leaf.time),
            Some((earliest, latest)) => (earliest.min(leaf.time), latest.max(leaf.time)),
        });
        *self.events.entry(leaf.event.name().to_owned()).or_default() += 1;
        match &leaf.event {
            Event::Unwrap(u) => {
                let caller = self.callers.entry(u.caller().to_owned()).or_default();
                let warrant = self.warrants.entry(u.warrant_id().to_owned()).or_default();
                warrant.emergency |= u.emergency();
                match u.outcome() {
                    UnwrapOutcome::Opened => {
                        self.opened += 1;
                        caller.opened += 1;
                        warrant.opened += 1;
                    }
                    UnwrapOutcome::Denied(reason) => {
                        *self.denied.entry(reason.as_str().to_owned()).or_default() += 1;
                        caller.denied += 1;
                        warrant.denied += 1;
                    }
                }
            }
            Event::WarrantRefused(r) => {
                *self.refused.entry(r.reason().to_owned()).or_default() += 1;
                self.callers
                    .entry(r.caller().to_owned())
                    .or_default()
                    .refused += 1;
                if let Some(id) = r.warrant_id() {
                    self.warrants.entry(id.to_owned()).or_default().refused += 1;
                }
            }
            Event::Revocation(r) => {
                self.callers
                    .entry(r.caller().to_owned())
                    .or_default()
                    .revocations += 1;
                self.warrants
                    .entry(r.warrant_id().to_owned())
                    .or_default()
                    .revoked = true;
            }
            Event::KeyGenerated(_) | Event::KeyDestroyed(_) | Event::AuthoritiesLoaded(_) => {}
        }
    }
}

fn counts(map: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
    parts.join(", ")
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "audit log {}: {} leaves verified",
            self.origin, self.size
        )?;
        writeln!(f, "  root hash {}", STANDARD.encode(self.root))?;
        if let Some((first, last)) = self.span {
            writeln!(
                f,
                "  from {} to {}",
                codec::format_time(first),
                codec::format_time(last)
            )?;
        }
        if !self.consistent_with.is_empty() {
            let sizes: Vec<String> = self.consistent_with.iter().map(u64::to_string).collect();
            writeln!(
                f,
                "  consistent with the signed checkpoints of sizes {}",
                sizes.join(", ")
            )?;
        }
        writeln!(f, "events:")?;
        for (event, n) in &self.events {
            writeln!(f, "  {event:<20} {n:>8}")?;
        }
        let denied: u64 = self.denied.values().sum();
        write!(f, "unwraps: {} opened, {denied} denied", self.opened)?;
        if denied > 0 {
            write!(f, " ({})", counts(&self.denied))?;
        }
        writeln!(f)?;
        let refused: u64 = self.refused.values().sum();
        write!(f, "warrants refused: {refused}")?;
        if refused > 0 {
            write!(f, " ({})", counts(&self.refused))?;
        }
        writeln!(f)?;
        if !self.callers.is_empty() {
            writeln!(f, "by caller:")?;
            // Names from the log are shown with their control, bidi and
            // other invisible characters escaped: a logged warrant id may
            // hold them (bounds::logged), and this goes to a terminal.
            for (caller, c) in &self.callers {
                writeln!(
                    f,
                    "  {}: opened {}, denied {}, refused {}, revocations {}",
                    codec::escape_for_terminal(caller),
                    c.opened,
                    c.denied,
                    c.refused,
                    c.revocations
                )?;
            }
        }
        if !self.warrants.is_empty() {
            writeln!(f, "by warrant:")?;
            for (id, w) in &self.warrants {
                write!(
                    f,
                    "  {}: opened {}, denied {}, refused {}",
                    codec::escape_for_terminal(id),
                    w.opened,
                    w.denied,
                    w.refused
                )?;
                if w.emergency {
                    write!(f, " [emergency]")?;
                }
                if w.revoked {
                    write!(f, " [revoked]")?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

/// Verifies an export against the log's verifier key and, if the auditor kept
/// one, an older signed checkpoint (`older_checkpoint`, signed note text)
/// that the export must extend.
///
/// # Errors
/// The first problem found, as a [`VerifyError`]; see the module
/// documentation for the order of checks.
pub fn verify_export(
    export: &Export,
    verifier_key: &VerifierKey,
    older_checkpoint: Option<&str>,
) -> Result<Summary, VerifyError> {
    let mut anchors = Vec::new();
    if let Some(note) = older_checkpoint {
        anchors.push(verify_checkpoint(note, verifier_key).map_err(VerifyError::OlderCheckpoint)?);
    }
    verify_inner(export, verifier_key, anchors, None)
}

/// Verifies an export against a previous export the auditor verified
/// before: the previous one is verified again, its signed checkpoints must
/// be prefixes of the new one, and a rewritten leaf is located exactly by
/// comparing with the previous leaves.
///
/// # Errors
/// [`VerifyError::PreviousExport`] if `previous` does not verify; otherwise
/// as [`verify_export`].
pub fn verify_export_against(
    export: &Export,
    verifier_key: &VerifierKey,
    previous: &Export,
) -> Result<Summary, VerifyError> {
    verify_export(previous, verifier_key, None)
        .map_err(|e| VerifyError::PreviousExport(Box::new(e)))?;
    let mut anchors = Vec::new();
    // Verified just above; verifying again turns the texts into values.
    for note in std::iter::once(&previous.checkpoint).chain(&previous.earlier_checkpoints) {
        let checkpoint = verify_checkpoint(note, verifier_key)
            .map_err(|e| VerifyError::PreviousExport(Box::new(VerifyError::Checkpoint(e))))?;
        anchors.push(checkpoint);
    }
    verify_inner(export, verifier_key, anchors, Some(&previous.entries))
}

fn verify_inner(
    export: &Export,
    key: &VerifierKey,
    mut anchors: Vec<Checkpoint>,
    previous: Option<&[ExportEntry]>,
) -> Result<Summary, VerifyError> {
    let main = verify_checkpoint(&export.checkpoint, key).map_err(VerifyError::Checkpoint)?;
    if export.origin != main.origin {
        return Err(VerifyError::OriginMismatch {
            export: export.origin.clone(),
            checkpoint: main.origin,
        });
    }
    for (position, note) in export.earlier_checkpoints.iter().enumerate() {
        let checkpoint = verify_checkpoint(note, key)
            .map_err(|source| VerifyError::EarlierCheckpoint { position, source })?;
        anchors.push(checkpoint);
    }
    if let Some(beyond) = anchors.iter().find(|a| a.size > main.size) {
        return Err(VerifyError::CheckpointBeyondExport {
            size: beyond.size,
            export_size: main.size,
        });
    }

    // Structural pass: the longest prefix of well-formed leaves goes into
    // the tree; the first structural fault is kept for later, because a
    // root mismatch inside that prefix points at an earlier leaf.
    let mut tree = MemoryTree::new();
    let mut summary = Summary::new(&main);
    let mut structural = None;
    let count = export.entries.len() as u64;
    for (position, entry) in (0u64..).zip(&export.entries) {
        if let Err(e) = check_entry(position, entry, main.size, count) {
            structural = Some(e);
            break;
        }
        let Some(leaf) = decode_leaf(position, entry, &mut structural) else {
            break;
        };
        tree.push_leaf(&leaf.0);
        summary.add(leaf.1);
    }
    if structural.is_none() && count < main.size {
        structural = Some(VerifyError::EntriesMissing {
            count,
            size: main.size,
        });
    }

    // Root pass: every signed checkpoint the well-formed prefix covers.
    anchors.push(main.clone());
    anchors.sort_by_key(|a| a.size);
    let checkable: Vec<(u64, bool)> = anchors
        .iter()
        .filter(|a| a.size <= tree.size())
        // `size <= tree.size()`, so the root exists; a failure would count
        // as a mismatch (fail closed).
        .map(|a| (a.size, tree.root(a.size).is_ok_and(|r| r == a.root)))
        .collect();
    if let Some(&(to, _)) = checkable.iter().find(|(_, ok)| !ok) {
        let from = checkable
            .iter()
            .filter(|(size, ok)| *ok && *size < to)
            .map(|(size, _)| *size)
            .max()
            .unwrap_or(0);
        let (from, to) = narrow(from, to, &export.entries, previous);
        let main_matches = checkable.iter().any(|&(size, ok)| ok && size == main.size);
        return Err(if main_matches {
            VerifyError::Inconsistent { from, to }
        } else {
            VerifyError::RootMismatch { from, to }
        });
    }
    if let Some(e) = structural {
        return Err(e);
    }
    summary.consistent_with = anchors
        .iter()
        .filter(|a| **a != main)
        .map(|a| a.size)
        .collect();
    summary.consistent_with.dedup();
    Ok(summary)
}

fn check_entry(
    position: u64,
    entry: &ExportEntry,
    size: u64,
    count: u64,
) -> Result<(), VerifyError> {
    if position >= size {
        return Err(VerifyError::EntriesExtra { count, size });
    }
    if entry.index != position {
        return Err(VerifyError::EntryIndex {
            position,
            found: entry.index,
        });
    }
    Ok(())
}

/// Decodes and parses the leaf at `index`, recording the fault if any.
fn decode_leaf(
    index: u64,
    entry: &ExportEntry,
    fault: &mut Option<VerifyError>,
) -> Option<(Vec<u8>, Leaf)> {
    let result = codec::b64_decode(&entry.leaf)
        .map_err(|_| VerifyError::LeafEncoding { index })
        .and_then(|bytes| {
            let leaf = Leaf::parse(&bytes).map_err(|source| VerifyError::Leaf { index, source })?;
            if leaf.seq != index {
                return Err(VerifyError::SeqMismatch {
                    index,
                    seq: leaf.seq,
                });
            }
            Ok((bytes, leaf))
        });
    match result {
        Ok(pair) => Some(pair),
        Err(e) => {
            *fault = Some(e);
            None
        }
    }
}

/// With a verified previous export, the first index in `from..to` where the
/// leaves differ from it is the first altered leaf.
fn narrow(
    from: u64,
    to: u64,
    entries: &[ExportEntry],
    previous: Option<&[ExportEntry]>,
) -> (u64, u64) {
    let Some(previous) = previous else {
        return (from, to);
    };
    (from..to)
        .find(|&i| {
            let i = i as usize;
            match (entries.get(i), previous.get(i)) {
                (Some(now), Some(before)) => now.leaf != before.leaf,
                _ => false,
            }
        })
        .map_or((from, to), |i| (i, i + 1))
}

#[cfg(test)]
mod tests {
    use super::super::leaf::tests::{denied, every_event, opened, warrant, AGENCY};
    use super::super::leaf::DenyReason;
    use super::super::note::sign_checkpoint;
    use super::*;
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
    use time::macros::datetime;

    const ORIGIN: &str = "lavd.example/audit";

    #[derive(Debug, thiserror::Error)]
    #[error("test signer")]
    struct SignerError;

    struct Log {
        pair: Ed25519KeyPair,
        key: VerifierKey,
        leaves: Vec<Vec<u8>>,
        /// `checkpoints[n]` is the signed checkpoint of size `n`.
        checkpoints: Vec<String>,
    }

    impl Log {
        fn new(events: &[Event]) -> Self {
            let start = datetime!(2026-11-26 07:00:00 UTC);
            let times: Vec<_> = (0..events.len())
                .map(|i| start + time::Duration::seconds(7 * i64::try_from(i).unwrap()))
                .collect();
            Self::timed(events, &times)
        }

        /// The log of `events`, the i-th written at `times[i]`.
        fn timed(events: &[Event], times: &[time::OffsetDateTime]) -> Self {
            let pair = Ed25519KeyPair::generate().unwrap();
            let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
            let key = VerifierKey::new(ORIGIN, &public).unwrap();
            let mut log = Self {
                pair,
                key,
                leaves: Vec::new(),
                checkpoints: Vec::new(),
            };
            for ((seq, event), time) in (0u64..).zip(events).zip(times) {
                log.leaves.push(event.to_leaf(seq, *time).unwrap());
            }
            for size in 0..=log.leaves.len() {
                let note = log.sign(&log.leaves[..size]);
                log.checkpoints.push(note);
            }
            log
        }

        fn sign(&self, leaves: &[Vec<u8>]) -> String {
            let mut tree = MemoryTree::new();
            for leaf in leaves {
                tree.push_leaf(leaf);
            }
            let checkpoint = Checkpoint {
                origin: ORIGIN.into(),
                size: tree.size(),
                root: tree.root(tree.size()).unwrap(),
            };
            let public: [u8; 32] = self.pair.public_key().as_ref().try_into().unwrap();
            sign_checkpoint(&checkpoint, &public, |m| {
                self.pair
                    .sign(m)
                    .as_ref()
                    .try_into()
                    .map_err(|_| SignerError)
            })
            .unwrap()
        }

        /// An export of the whole log, with the earlier checkpoints of the
        /// given sizes.
        fn export(&self, earlier: &[usize]) -> Export {
            Export {
                origin: ORIGIN.into(),
                checkpoint: self.checkpoints[self.leaves.len()].clone(),
                earlier_checkpoints: earlier
                    .iter()
                    .map(|&n| self.checkpoints[n].clone())
                    .collect(),
                entries: (0u64..)
                    .zip(&self.leaves)
                    .map(|(i, leaf)| ExportEntry::new(i, leaf))
                    .collect(),
            }
        }

        /// Every size from 1 to n-1.
        fn dense(&self) -> Vec<usize> {
            (1..self.leaves.len()).collect()
        }
    }

    fn events() -> Vec<Event> {
        let mut events = every_event();
        let w = warrant("UK-IPA-2026-0042", false);
        for n in 0..9 {
            events.push(if n % 3 == 0 {
                denied(AGENCY, &w, DenyReason::BudgetExhausted)
            } else {
                opened("spiffe://agency.example/lea/unit-9", &w, n)
            });
        }
        events
    }

    fn leaf_text(export: &Export, i: usize) -> String {
        String::from_utf8(codec::b64_decode(&export.entries[i].leaf).unwrap()).unwrap()
    }

    fn set_leaf(export: &mut Export, i: usize, text: &str) {
        export.entries[i].leaf = codec::b64_encode(text);
    }

    /// Renumbers `index` and `seq` after a deletion/insertion/reorder so that
    /// only the signed roots can tell.
    fn renumber(export: &mut Export) {
        for i in 0..export.entries.len() {
            let text = leaf_text(export, i);
            let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
            value["seq"] = serde_json::Value::from(i as u64);
            export.entries[i] =
                ExportEntry::new(i as u64, serde_json::to_string(&value).unwrap().as_bytes());
        }
    }

    fn assert_refused(
        result: Result<Summary, VerifyError>,
        code: &str,
        first_bad: Option<u64>,
    ) -> VerifyError {
        let err = result.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert_eq!(err.first_bad_index(), first_bad, "{err}");
        err
    }

    /// The summary's span is the earliest and the latest leaf time, which
    /// need not be the first and the last leaf's (replicas' clocks differ).
    #[test]
    fn the_span_is_the_earliest_and_latest_leaf_time() {
        let t = datetime!(2026-11-26 07:00:00 UTC);
        let events = events();
        let times: Vec<_> = (0..events.len())
            .map(|i| match i {
                0 => t + time::Duration::seconds(60),
                1 => t,
                _ => t + time::Duration::seconds(30),
            })
            .collect();
        let log = Log::timed(&events, &times);
        let summary = verify_export(&log.export(&[]), &log.key, None).unwrap();
        assert_eq!(summary.span, Some((t, t + time::Duration::seconds(60))));
        assert!(
            summary
                .to_string()
                .contains("from 2026-11-26T07:00:00Z to 2026-11-26T07:01:00Z"),
            "{summary}"
        );
    }

    #[test]
    fn honest_export_verifies_with_summary() {
        let log = Log::new(&events());
        let export = log.export(&[3, 10]);
        let bytes = export.to_json().unwrap();
        let parsed = Export::parse(&bytes).unwrap();
        assert_eq!(parsed, export);
        let older = &log.checkpoints[5];
        let summary = verify_export(&parsed, &log.key, Some(older)).unwrap();
        assert_eq!(summary.size, 20);
        assert_eq!(summary.consistent_with, vec![3, 5, 10]);
        assert_eq!(summary.events["unwrap"], 13);
        assert_eq!(summary.events["warrant_refused"], 2);
        assert_eq!(summary.events["revocation"], 2);
        assert_eq!(summary.events["authorities_loaded"], 1);
        assert_eq!(summary.opened, 2 + 6);
        assert_eq!(summary.denied["budget_exhausted"], 3);
        assert_eq!(summary.denied["out_of_window"], 1);
        assert_eq!(summary.denied["malformed_envelope"], 1);
        assert_eq!(summary.refused["warrant_expired"], 1);
        let agency = &summary.callers[AGENCY];
        assert_eq!(
            (
                agency.opened,
                agency.denied,
                agency.refused,
                agency.revocations
            ),
            (2, 5, 2, 1)
        );
        assert_eq!(
            summary.callers["spiffe://agency.example/lea/unit-9"].opened,
            6
        );
        let w42 = &summary.warrants["UK-IPA-2026-0042"];
        assert_eq!(
            (w42.opened, w42.denied, w42.emergency, w42.revoked),
            (7, 5, false, true)
        );
        let w43 = &summary.warrants["UK-IPA-2026-0043"];
        assert_eq!((w43.opened, w43.emergency, w43.revoked), (1, true, true));
        let text = summary.to_string();
        assert!(
            text.contains("audit log lavd.example/audit: 20 leaves verified"),
            "{text}"
        );
        assert!(text.contains("unwraps: 8 opened, 5 denied (budget_exhausted 3, malformed_envelope 1, out_of_window 1)"), "{text}");
        assert!(
            text.contains("UK-IPA-2026-0043: opened 1, denied 0, refused 0 [emergency] [revoked]"),
            "{text}"
        );
        // A logged id with a bidi override is shown escaped.
        let mut shown = summary.clone();
        shown.warrants.insert("W\u{202e}X".into(), w43.clone());
        let text = shown.to_string();
        assert!(!text.contains('\u{202e}'), "{text}");
        assert!(text.contains("W\\u{202e}X: opened 1"), "{text}");

        // An empty log verifies too.
        let empty = Log::new(&[]);
        assert_eq!(
            verify_export(&empty.export(&[]), &empty.key, None)
                .unwrap()
                .size,
            0
        );
    }

    #[test]
    fn edited_leaf_is_located() {
        let log = Log::new(&events());
        let i = 14; // an unwrap denied for budget_exhausted
        let edit = |export: &mut Export| {
            let text = leaf_text(export, i);
            assert!(text.contains("budget_exhausted"));
            set_leaf(export, i, &text.replace("budget_exhausted", "open_failed"));
        };
        // Dense earlier checkpoints: exact.
        let mut export = log.export(&log.dense());
        edit(&mut export);
        assert_refused(
            verify_export(&export, &log.key, None),
            "root_mismatch",
            Some(14),
        );
        // Only the final checkpoint and an older one: a range.
        let mut export = log.export(&[]);
        edit(&mut export);
        let err = assert_refused(
            verify_export(&export, &log.key, Some(&log.checkpoints[12])),
            "root_mismatch",
            None,
        );
        assert_eq!(err.bad_range(), Some(12..20));
        // Against a previous export: exact.
        let previous = Log::export(&log, &[]);
        let mut short_previous = previous.clone();
        short_previous.entries.truncate(16);
        short_previous.checkpoint = log.checkpoints[16].clone();
        assert_refused(
            verify_export_against(&export, &log.key, &short_previous),
            "root_mismatch",
            Some(14),
        );
    }

    #[test]
    fn deleted_leaf_is_located() {
        let log = Log::new(&events());
        let mut export = log.export(&log.dense());
        export.entries.remove(6);
        assert_refused(
            verify_export(&export, &log.key, None),
            "entry_index_mismatch",
            Some(6),
        );
        // Renumbered indices but not seq.
        let mut renumbered = export.clone();
        for (i, e) in renumbered.entries.iter_mut().enumerate() {
            e.index = i as u64;
        }
        assert_refused(
            verify_export(&renumbered, &log.key, None),
            "leaf_seq_mismatch",
            Some(6),
        );
        // Everything renumbered: only the signed roots can tell.
        renumber(&mut export);
        assert_refused(
            verify_export(&export, &log.key, None),
            "root_mismatch",
            Some(6),
        );
        // The last leaf deleted.
        let mut export = log.export(&[]);
        export.entries.pop();
        assert_refused(
            verify_export(&export, &log.key, None),
            "entries_missing",
            Some(19),
        );
    }

    #[test]
    fn reordered_leaves_are_located() {
        let log = Log::new(&events());
        let mut export = log.export(&log.dense());
        export.entries.swap(8, 11);
        assert_refused(
            verify_export(&export, &log.key, None),
            "entry_index_mismatch",
            Some(8),
        );
        let mut relabelled = export.clone();
        for (i, e) in relabelled.entries.iter_mut().enumerate() {
            e.index = i as u64;
        }
        assert_refused(
            verify_export(&relabelled, &log.key, None),
            "leaf_seq_mismatch",
            Some(8),
        );
        renumber(&mut export);
        assert_refused(
            verify_export(&export, &log.key, None),
            "root_mismatch",
            Some(8),
        );
    }

    #[test]
    fn inserted_leaf_is_located() {
        let log = Log::new(&events());
        let forged = opened(AGENCY, &warrant("UK-IPA-2026-0042", false), 77)
            .to_leaf(9, datetime!(2026-11-26 07:01:00 UTC))
            .unwrap();
        let mut export = log.export(&[]);
        export.entries.insert(9, ExportEntry::new(9, &forged));
        // The forged leaf itself is well formed; the next entry betrays it.
        assert_refused(
            verify_export(&export, &log.key, None),
            "entry_index_mismatch",
            Some(10),
        );
        // With dense checkpoints the signed roots name the forged leaf.
        export.earlier_checkpoints = log.export(&log.dense()).earlier_checkpoints;
        assert_refused(
            verify_export(&export, &log.key, None),
            "root_mismatch",
            Some(9),
        );
        renumber(&mut export);
        assert_refused(
            verify_export(&export, &log.key, None),
            "root_mismatch",
            Some(9),
        );
        // Appended at the end, beyond the checkpoint.
        let mut export = log.export(&[]);
        export.entries.push(ExportEntry::new(20, &forged));
        assert_refused(
            verify_export(&export, &log.key, None),
            "entries_extra",
            Some(20),
        );
    }

    #[test]
    fn rewritten_history_is_detected_and_located() {
        // Someone with the audit key rewrites leaf 4 and signs a new head.
        let log = Log::new(&events());
        let mut leaves = log.leaves.clone();
        let text = String::from_utf8(leaves[4].clone()).unwrap();
        leaves[4] = text
            .replace("UK-IPA-2026-0042", "UK-IPA-2026-0007")
            .into_bytes();
        Leaf::parse(&leaves[4]).unwrap();
        let forged = Export {
            origin: ORIGIN.into(),
            checkpoint: log.sign(&leaves),
            earlier_checkpoints: Vec::new(),
            entries: (0u64..)
                .zip(&leaves)
                .map(|(i, l)| ExportEntry::new(i, l))
                .collect(),
        };
        // On its own it verifies: a signed log is only as honest as its key.
        verify_export(&forged, &log.key, None).unwrap();
        // The auditor's older checkpoint exposes the fork.
        let err = assert_refused(
            verify_export(&forged, &log.key, Some(&log.checkpoints[10])),
            "checkpoints_inconsistent",
            None,
        );
        assert_eq!(err.bad_range(), Some(0..10));
        // The auditor's previous export pins the rewritten leaf.
        let previous = {
            let mut p = log.export(&[]);
            p.entries.truncate(12);
            p.checkpoint = log.checkpoints[12].clone();
            p
        };
        assert_refused(
            verify_export_against(&forged, &log.key, &previous),
            "checkpoints_inconsistent",
            Some(4),
        );
    }

    #[test]
    fn bad_leaves_and_checkpoints_are_refused() {
        let log = Log::new(&events());
        let key = &log.key;
        let mut export = log.export(&[]);
        let text = leaf_text(&export, 3);
        set_leaf(&mut export, 3, &text.replacen(',', ", ", 1));
        assert_refused(
            verify_export(&export, key, None),
            "leaf_not_canonical",
            Some(3),
        );
        let mut export = log.export(&[]);
        export.entries[5].leaf.push('=');
        assert_refused(
            verify_export(&export, key, None),
            "leaf_not_base64",
            Some(5),
        );

        // The checkpoint signature.
        let mut export = log.export(&[]);
        export.checkpoint = export.checkpoint.replacen("\n20\n", "\n19\n", 1);
        assert_refused(verify_export(&export, key, None), "signature_invalid", None);
        let other = Log::new(&events());
        assert_refused(
            verify_export(&log.export(&[]), &other.key, None),
            "note_unverified",
            None,
        );
        let mut export = log.export(&[]);
        export.origin = "elsewhere.example/log".into();
        assert_refused(
            verify_export(&export, key, None),
            "export_origin_mismatch",
            None,
        );
        // Older checkpoints: newer than the export, or not signed by the key.
        let mut short = log.export(&[]);
        short.entries.truncate(10);
        short.checkpoint = log.checkpoints[10].clone();
        assert_refused(
            verify_export(&short, key, Some(&log.checkpoints[12])),
            "checkpoint_beyond_export",
            None,
        );
        assert_refused(
            verify_export(&short, key, Some(&other.checkpoints[5])),
            "older_checkpoint_refused",
            None,
        );
        let mut export = log.export(&[]);
        export
            .earlier_checkpoints
            .push(other.checkpoints[5].clone());
        assert_refused(
            verify_export(&export, key, None),
            "earlier_checkpoint_refused",
            None,
        );
        // A previous export that does not verify.
        let mut bad_previous = log.export(&[]);
        bad_previous.entries.pop();
        assert_refused(
            verify_export_against(&log.export(&[]), key, &bad_previous),
            "previous_export_invalid",
            None,
        );
        // Strict file parsing.
        let mut value: serde_json::Value =
            serde_json::from_slice(&log.export(&[]).to_json().unwrap()).unwrap();
        value["extra"] = serde_json::Value::Bool(true);
        assert_eq!(
            Export::parse(value.to_string().as_bytes())
                .unwrap_err()
                .code(),
            "export_malformed"
        );
    }
}
