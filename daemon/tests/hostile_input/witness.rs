//! Witness keys, cosignatures, tlog-policy files and `add-checkpoint`
//! bodies (C2SP tlog-cosignature, tlog-policy, tlog-witness).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use lavd::audit::note::{Checkpoint, VerifierKey};
use lavd::audit::witness::{
    cosignature_line, verify_cosignatures, AddCheckpoint, CosignerKey, Policy,
};
use proptest::prelude::*;

use crate::common::{self, apply, edits};
use crate::note::{checkpoint, sign};
use crate::targets::{self, assert_code, NOTE_CODES, WITNESS_CODES};

fn witness_key(i: u8) -> (SigningKey, CosignerKey) {
    let sk = SigningKey::from_bytes(&[i.wrapping_add(100); 32]);
    let key = CosignerKey::new(
        &format!("witness.example/w{i}"),
        sk.verifying_key().as_bytes(),
    )
    .unwrap();
    (sk, key)
}

/// The log key every generated policy names (its secret is `[7; 32]`).
fn log_signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// A generated policy: its text, and what it says, for the model.
#[derive(Debug, Clone)]
struct PolicySpec {
    text: String,
    witnesses: u8,
    /// (name, threshold, members), in definition order.
    groups: Vec<(String, usize, Vec<String>)>,
    quorum: String,
}

impl PolicySpec {
    /// The quorum rule evaluated directly from the spec (groups only name
    /// earlier definitions, so one pass in order decides each).
    fn met(&self, cosigned: &[bool]) -> bool {
        let mut decided: std::collections::HashMap<String, bool> = (0..self.witnesses)
            .map(|i| (format!("w{i}"), cosigned[usize::from(i)]))
            .collect();
        for (name, k, members) in &self.groups {
            let count = members.iter().filter(|m| decided[m.as_str()]).count();
            decided.insert(name.clone(), count >= *k);
        }
        self.quorum == "none" || decided[self.quorum.as_str()]
    }
}

/// A policy file: one log, `n` witnesses, groups over earlier names chosen
/// by the strategy (so chains and diamonds of groups occur), a quorum.
fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    (
        1u8..8,
        prop::collection::vec(
            (
                prop::collection::vec(any::<prop::sample::Index>(), 1..6),
                0u8..4,
            ),
            0..40,
        ),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(n, groups, quorum)| {
            let log = VerifierKey::new(
                "log.example/a",
                log_signing_key().verifying_key().as_bytes(),
            )
            .unwrap();
            let mut text = format!("log {log}\n");
            let mut names: Vec<String> = Vec::new();
            for i in 0..n {
                let (_, key) = witness_key(i);
                text += &format!("witness w{i} {key} https://w{i}.example/\n");
                names.push(format!("w{i}"));
            }
            let mut specs = Vec::new();
            for (g, (members, k)) in groups.iter().enumerate() {
                // Mostly the latest names, so that deep chains occur.
                let mut chosen: Vec<String> = members
                    .iter()
                    .map(|m| names[names.len() - 1 - m.index(names.len().min(4))].clone())
                    .collect();
                chosen.sort();
                chosen.dedup();
                let (word, threshold) = match k {
                    0 => ("all".to_string(), chosen.len()),
                    1 => ("any".to_string(), 1),
                    k => {
                        let k = usize::from(*k).min(chosen.len());
                        (k.to_string(), k)
                    }
                };
                text += &format!("group g{g} {word} {}\n", chosen.join(" "));
                names.push(format!("g{g}"));
                specs.push((format!("g{g}"), threshold, chosen));
            }
            let quorum = names[quorum.index(names.len())].clone();
            text += &format!("quorum {quorum}\n");
            PolicySpec {
                text,
                witnesses: n,
                groups: specs,
                quorum,
            }
        })
}

proptest! {
    #![proptest_config(common::config())]

    #[test]
    fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..600), text in "\\PC{0,200}") {
        targets::witness(&data);
        targets::witness(text.as_bytes());
    }

    #[test]
    fn cosigner_key_round_trip(i in any::<u8>(), edits in edits()) {
        let (_, key) = witness_key(i);
        let text = key.to_string();
        prop_assert_eq!(CosignerKey::parse(&text), Ok(key));
        targets::witness(&apply(text.as_bytes(), &edits));
    }

    /// A cosigned checkpoint verifies with its timestamp; edits either keep
    /// that verdict or are typed refusals; a verified cosignature is never
    /// for another timestamp.
    #[test]
    fn cosignature_lines(c in checkpoint(), t in 0u64..=i64::MAX as u64, edits in edits()) {
        let (sk, key) = witness_key(1);
        let body = c.to_body();
        let line = cosignature_line::<()>(&key, &body, t, |m| Ok(sk.sign(m).to_bytes())).unwrap();
        let log = SigningKey::from_bytes(&[9; 32]);
        let note = format!("{}{line}", sign(&body, "log.example", 1, &log));
        match verify_cosignatures(&note, &key) {
            Ok(times) => prop_assert_eq!(times, vec![t]),
            // A body lavd's note format refuses (a bad origin).
            Err(e) => assert_code(e.code(), &[NOTE_CODES], "verify_cosignatures", note.as_bytes()),
        }
        let edited = apply(note.as_bytes(), &edits);
        targets::witness(&edited);
        if let Ok(text) = std::str::from_utf8(&edited) {
            match verify_cosignatures(text, &key) {
                Ok(times) => prop_assert!(times.iter().all(|x| *x == t)),
                Err(e) => assert_code(e.code(), &[WITNESS_CODES, NOTE_CODES], "verify_cosignatures", &edited),
            }
        }
    }

    /// Generated policies parse, and judge a checkpoint cosigned by any
    /// subset of their witnesses exactly as the quorum rule says, in
    /// bounded time (chains of groups that each name the ones before
    /// included); their edits are `bad_policy` or still judge.
    #[test]
    fn policies(spec in policy_spec(), cosigners in prop::collection::vec(any::<bool>(), 8), c in checkpoint(), edits in edits()) {
        let policy = Policy::parse(spec.text.as_bytes());
        prop_assert!(policy.is_ok(), "{:?}: {}", policy.err(), spec.text);
        let policy = policy.unwrap();
        let origin = "log.example/a";
        let body = Checkpoint { origin: origin.into(), ..c }.to_body();
        let log = VerifierKey::new(origin, log_signing_key().verifying_key().as_bytes()).unwrap();
        let mut note = sign(&body, origin, log.key_id(), &log_signing_key());
        for i in 0..spec.witnesses {
            if cosigners[usize::from(i)] {
                let (sk, key) = witness_key(i);
                note += &cosignature_line::<()>(&key, &body, 1_790_000_000, |m| Ok(sk.sign(m).to_bytes())).unwrap();
            }
        }
        match policy.verify(&note) {
            Ok((_, valid)) => {
                prop_assert!(spec.met(&cosigners), "accepted against the rule: {}", spec.text);
                prop_assert_eq!(valid.len(), cosigners[..usize::from(spec.witnesses)].iter().filter(|c| **c).count());
            }
            Err(e) => {
                prop_assert_eq!(e.code(), "quorum_not_met");
                prop_assert!(!spec.met(&cosigners), "refused against the rule: {}", spec.text);
            }
        }
        targets::witness(spec.text.as_bytes());
        targets::witness(&apply(spec.text.as_bytes(), &edits));
    }

    #[test]
    fn add_checkpoint_round_trip(old in any::<u64>(), proof in prop::collection::vec(any::<[u8; 32]>(), 0..=63), c in checkpoint(), edits in edits()) {
        let log = SigningKey::from_bytes(&[9; 32]);
        let note = sign(&c.to_body(), &c.origin, 1, &log);
        let request = AddCheckpoint { old_size: old, proof, checkpoint: note };
        let body = request.encode();
        prop_assert_eq!(AddCheckpoint::parse(body.as_bytes()), Ok(request));
        targets::witness(body.as_bytes());
        targets::witness(&apply(body.as_bytes(), &edits));
    }
}

#[test]
fn a_proof_line_that_is_not_a_hash_is_refused() {
    let short = STANDARD.encode([0u8; 31]);
    let e = AddCheckpoint::parse(format!("old 1\n{short}\n\nx").as_bytes()).unwrap_err();
    assert_eq!(e.code(), "proof_line_malformed");
    assert_eq!(
        e.to_string(),
        "proof line 1 is not a standard-base64 32-byte hash"
    );
}
