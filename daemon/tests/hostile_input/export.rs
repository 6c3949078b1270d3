//! Audit leaves and export files: every event type built by its public
//! constructor with fields anywhere in or out of bounds, the canonical
//! round trip of a leaf (bytes in = bytes out), and a signed export whose
//! edits are refused with a documented code or still verify to the same
//! summary.

use ed25519_dalek::SigningKey;
use lavd::audit::export::{verify_export, Export, ExportEntry};
use lavd::audit::leaf::{
    Digest, Event, KeyDestroyed, KeyGenerated, Leaf, Revocation, Unwrap, UnwrapOutcome, WarrantRef,
    WarrantRefused,
};
use lavd::audit::merkle::MemoryTree;
use lavd::audit::note::{Checkpoint, VerifierKey};
use lavd::envelope::reply::DenyReason;
use proptest::prelude::*;
use time::OffsetDateTime;

use crate::common::{self, apply, apply_json, edits, field_text, json_edits, time};
use crate::note::sign;
use crate::targets::{self, assert_code, EXPORT_CODES, LEAF_CODES, NOTE_CODES};

const ORIGIN: &str = "lavd.example/audit";

/// An event of any type, or `None` when a field was out of bounds (the
/// constructor's typed refusal is checked here too).
fn event() -> impl Strategy<Value = Option<Event>> {
    (
        0u8..6,
        field_text(128),
        field_text(64),
        field_text(1024),
        any::<bool>(),
        time(),
    )
        .prop_map(|(kind, id, kid, reason, flag, t)| {
            let caller = "spiffe://agency.example/lea";
            let w = WarrantRef {
                id: &id,
                digest: Digest::of_warrant_payload(id.as_bytes()),
                emergency: flag,
            };
            let built: Result<Event, _> = match kind {
                0 => Unwrap::new(
                    caller,
                    &w,
                    Some(&kid),
                    Some(Digest::of_envelope(b"h", &[4; 65])),
                    UnwrapOutcome::Opened,
                )
                .map(Into::into),
                1 => Unwrap::new(
                    caller,
                    &w,
                    None,
                    None,
                    UnwrapOutcome::Denied(DenyReason::MalformedEnvelope),
                )
                .map(Into::into),
                2 => WarrantRefused::new(caller, Some(&id), Some(w.digest), "bad_signature")
                    .map(Into::into),
                3 => Revocation::new(
                    caller,
                    &id,
                    &reason,
                    flag.then_some(lavd::audit::leaf::SignedRevocation {
                        authority: kid.as_str(),
                        digest: w.digest.as_bytes().to_owned(),
                        time: t,
                    }),
                )
                .map(Into::into),
                4 => {
                    // Moved back from the last 400 days the time crate
                    // can write (year 9999), so that its later dates exist:
                    // `t + 400 days` overflowed there and panicked.
                    let t = if t.year() >= 9998 {
                        t - time::Duration::days(800)
                    } else {
                        t
                    };
                    KeyGenerated::new(
                        &kid,
                        t,
                        t + time::Duration::days(30),
                        t + time::Duration::days(400),
                        None,
                    )
                    .map(Into::into)
                }
                _ => KeyDestroyed::new(&kid, "retention_ended", flag, None).map(Into::into),
            };
            match built {
                Ok(e) => Some(e),
                Err(e) => {
                    assert_eq!(e.code(), "audit_field_invalid");
                    None
                }
            }
        })
}

/// A signed export of `events` (at least one), with the log key.
fn export_of(events: &[Event], sk: &SigningKey) -> (Export, VerifierKey) {
    let key = VerifierKey::new(ORIGIN, sk.verifying_key().as_bytes()).unwrap();
    let mut tree = MemoryTree::new();
    let mut entries = Vec::new();
    let t = OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap();
    for (i, e) in events.iter().enumerate() {
        let leaf = e.to_leaf(i as u64, t).unwrap();
        tree.push_leaf(&leaf);
        entries.push(ExportEntry::new(i as u64, &leaf));
    }
    let c = Checkpoint {
        origin: ORIGIN.into(),
        size: tree.size(),
        root: tree.root(tree.size()).unwrap(),
    };
    let note = sign(&c.to_body(), ORIGIN, key.key_id(), sk);
    (
        Export {
            origin: ORIGIN.into(),
            checkpoint: note,
            earlier_checkpoints: vec![],
            entries,
        },
        key,
    )
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        targets::export(&data);
    }

    /// Every event its constructor accepts is written canonically and read
    /// back to the same leaf; edits of the bytes or the JSON tree are
    /// documented refusals or (being canonical) the same bytes.
    #[test]
    fn leaf_round_trip(e in event(), seq in any::<u64>(), t in time(), edits in edits(), jedits in json_edits()) {
        let Some(e) = e else { return Ok(()) };
        let bytes = e.to_leaf(seq, t).unwrap();
        let leaf = Leaf::parse(&bytes).unwrap();
        prop_assert_eq!(&leaf.event, &e);
        prop_assert_eq!((leaf.seq, leaf.time), (seq, t));
        prop_assert_eq!(leaf.to_bytes().unwrap(), bytes.clone());
        targets::export(&apply(&bytes, &edits));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let edited = apply_json(&value, &jedits).to_string().into_bytes();
        match Leaf::parse(&edited) {
            Ok(l) => prop_assert_eq!(l.to_bytes().unwrap(), edited),
            Err(err) => assert_code(err.code(), &[LEAF_CODES], "Leaf::parse", &edited),
        }
    }

    /// A signed export verifies; its edits (of the file, or of one leaf
    /// inside it) are refused with a documented code, or verify to the
    /// same summary.
    #[test]
    fn edits_of_a_signed_export(events in prop::collection::vec(event(), 1..6), seed in any::<[u8; 32]>(), edits in edits(), which in any::<prop::sample::Index>()) {
        let events: Vec<Event> = events.into_iter().flatten().collect();
        if events.is_empty() { return Ok(()); }
        let sk = SigningKey::from_bytes(&seed);
        let (export, key) = export_of(&events, &sk);
        let summary = verify_export(&export, &key, None).unwrap();
        let json = export.to_json().unwrap();
        prop_assert_eq!(Export::parse(&json), Ok(export.clone()));
        let edited = apply(&json, &edits);
        targets::export(&edited);
        let check = |e: &Export| match verify_export(e, &key, None) {
            Ok(s) => { prop_assert_eq!(s.to_string(), summary.to_string()); Ok(()) }
            Err(err) => { assert_code(err.code(), &[EXPORT_CODES, LEAF_CODES, NOTE_CODES], "verify_export", &json); Ok(()) }
        };
        if let Ok(e) = Export::parse(&edited) {
            check(&e)?;
        }
        // One leaf edited in place, re-encoded as valid base64url.
        let mut one = export.clone();
        let i = which.index(one.entries.len());
        let leaf = lavd::codec::b64_decode(&one.entries[i].leaf).unwrap();
        one.entries[i].leaf = lavd::codec::b64_encode(apply(&leaf, &edits));
        check(&one)?;
    }
}
