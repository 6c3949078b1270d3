//! Checkpoints, signed notes and verifier keys (C2SP tlog-checkpoint,
//! signed-note): the round trip of the body and the key, and edits of a
//! validly signed note: a note that still verifies after an edit says
//! exactly what was signed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use lavd::audit::note::{verify_checkpoint, Checkpoint, VerifierKey};
use proptest::prelude::*;

use crate::common::{self, apply, edits};
use crate::targets::{self, assert_code, NOTE_CODES};

/// A key name / origin: mostly valid, sometimes not.
pub fn origin() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9.-]{1,20}(/[a-z0-9_-]{1,12}){0,2}",
        1 => crate::common::field_text(256),
    ]
}

pub fn checkpoint() -> impl Strategy<Value = Checkpoint> {
    (origin(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(origin, size, root)| Checkpoint {
        origin,
        size,
        root,
    })
}

/// The signed note of `body` by `sk` under `name`.
pub fn sign(body: &str, name: &str, key_id: u32, sk: &SigningKey) -> String {
    let mut blob = key_id.to_be_bytes().to_vec();
    blob.extend_from_slice(&sk.sign(body.as_bytes()).to_bytes());
    format!("{body}\n\u{2014} {name} {}\n", STANDARD.encode(blob))
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_text(data in "\\PC{0,300}", bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        targets::note(data.as_bytes());
        targets::note(&bytes);
    }

    /// parse(to_body(c)) == c for every checkpoint with a usable origin, and
    /// to_body(parse(b)) == b (checked in the target for each edit).
    #[test]
    fn checkpoint_round_trip(c in checkpoint(), edits in edits()) {
        let body = c.to_body();
        match Checkpoint::parse(&body) {
            Ok(parsed) => prop_assert_eq!(parsed, c),
            Err(e) => {
                prop_assert!(VerifierKey::new(&c.origin, &[0; 32]).is_err(), "{}", e);
                prop_assert_eq!(e.code(), "checkpoint_malformed");
            }
        }
        targets::note(&apply(body.as_bytes(), &edits));
    }

    #[test]
    fn verifier_key_round_trip(name in origin(), key in any::<[u8; 32]>(), edits in edits()) {
        if let Ok(k) = VerifierKey::new(&name, &key) {
            let text = k.to_string();
            prop_assert_eq!(VerifierKey::parse(&text), Ok(k));
            targets::note(&apply(text.as_bytes(), &edits));
        }
    }

    /// Edits of a signed checkpoint with other signers' lines around it:
    /// either a documented refusal, or exactly the checkpoint that was
    /// signed.
    #[test]
    fn edits_of_a_signed_note(c in checkpoint(), seed in any::<[u8; 32]>(), others in 0usize..3, edits in edits()) {
        let sk = SigningKey::from_bytes(&seed);
        let Ok(key) = VerifierKey::new(&c.origin, sk.verifying_key().as_bytes()) else {
            return Ok(());
        };
        let body = c.to_body();
        let mut note = sign(&body, &c.origin, key.key_id(), &sk);
        for i in 0..others {
            let other = SigningKey::from_bytes(&[i as u8; 32]);
            let line = sign(&body, "witness.example", i as u32, &other);
            note.push_str(&line[body.len() + 1..]);
        }
        prop_assert_eq!(verify_checkpoint(&note, &key), Ok(c.clone()));
        let edited = apply(note.as_bytes(), &edits);
        targets::note(&edited);
        if let Ok(text) = std::str::from_utf8(&edited) {
            match verify_checkpoint(text, &key) {
                Ok(got) => prop_assert_eq!(got, c),
                Err(e) => assert_code(e.code(), &[NOTE_CODES], "verify_checkpoint", &edited),
            }
        }
    }
}
