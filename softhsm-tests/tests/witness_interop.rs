//! lavd's log and witness against an independent witness:
//! `softhsm-tests/interop/witness.py`, written in Python from the C2SP
//! texts (signed-note, tlog-checkpoint, tlog-cosignature, tlog-witness) and
//! RFC 9162's consistency-proof algorithm, with its own note parsing, key
//! IDs, proof verification and JSON state, and Ed25519 from `cryptography`.
//! Both directions are checked: the Python witness cosigns a real
//! `lavd serve` log and lavd's `verify_cosignatures` accepts its lines; the
//! cosignatures of `lavd witness serve` verify under the Python verifier.
//! And the spec's example, byte for byte, in Python too.

use lavd::audit::witness::{verify_cosignatures, CosignerKey};
use softhsm_tests::witness::{body, py_witness, size, Log, PyWitness, Witness};

#[test]
fn the_python_witness_cosigns_lavds_log_and_lavd_verifies_it() {
    let log = Log::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("py-witness.json");
    let seed = [11u8; 32];
    let w = PyWitness::start("py.witness.test/w1", &seed, &state, &log.origin, &log.vkey);
    // Its key ID and vkey, computed in Python, are lavd's for the same key.
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    let key = CosignerKey::new("py.witness.test/w1", public.as_bytes()).unwrap();
    assert_eq!(w.vkey, key.to_string());

    let checkpoints: Vec<String> = (0..4).map(|i| log.unwrap(i)).collect();
    let mut recorded = 0;
    for checkpoint in &checkpoints {
        let r = w.add(&log.body(recorded, checkpoint));
        assert_eq!(r.status, 200, "{}", r.text());
        let times = verify_cosignatures(&format!("{checkpoint}{}", r.text()), &key).unwrap();
        assert_eq!(times.len(), 1);
        recorded = size(checkpoint);
    }
    // Its refusals are the spec's, as lavd's witness answers them.
    let r = w.add(&log.body(0, &checkpoints[3]));
    assert_eq!((r.status, r.text()), (409, format!("{recorded}\n")));
    assert_eq!(r.header("content-type"), Some("text/x.tlog.size"));
    let c5 = log.unwrap(5);
    // A proof with one bit flipped, and no proof at all: 422.
    let mut proof = log.proof(recorded, size(&c5));
    proof[0] = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut h = b64.decode(&proof[0]).unwrap();
        h[31] ^= 0x80;
        b64.encode(h)
    };
    assert_eq!(w.add(&body(recorded, &proof, &c5)).status, 422);
    assert_eq!(w.add(&body(recorded, &[], &c5)).status, 422);
    let other = c5.replacen(&log.origin, "other.example/log", 1);
    assert_eq!(w.add(&body(0, &[], &other)).status, 404);
    // A line of the log's key (its name and key ID) that does not verify,
    // beside one that does: the note is malformed (signed-note), 403
    // (tlog-witness). lavd's own witness answers the same.
    let forged = {
        use base64::Engine as _;
        let key = lavd::audit::note::VerifierKey::parse(&log.vkey).unwrap();
        let mut blob = key.key_id().to_be_bytes().to_vec();
        blob.extend_from_slice(&[0; 64]);
        let line = base64::engine::general_purpose::STANDARD.encode(blob);
        format!("{c5}— {} {line}\n", log.origin)
    };
    let r = w.add(&log.body(recorded, &forged));
    assert_eq!(r.status, 403, "{}", r.text());
    let lavd_witness = Witness::start("witness.test/w2", &log.origin, &log.vkey, "");
    let r = lavd_witness.add(&log.body(0, &forged));
    assert_eq!(r.status, 403, "{}", r.text());
    drop(lavd_witness);
    // Its JSON state survives a restart.
    drop(w);
    let w = PyWitness::start("py.witness.test/w1", &seed, &state, &log.origin, &log.vkey);
    let r = w.add(&log.body(0, &c5));
    assert_eq!((r.status, r.text()), (409, format!("{recorded}\n")));
    let r = w.add(&log.body(recorded, &c5));
    assert_eq!(r.status, 200, "{}", r.text());
    verify_cosignatures(&format!("{c5}{}", r.text()), &key).unwrap();
}

#[test]
fn lavd_witness_cosignatures_verify_in_python() {
    let log = Log::start();
    let w = Witness::start("witness.test/w1", &log.origin, &log.vkey, "");
    let c1 = log.unwrap(1);
    let c2 = log.unwrap(2);
    let r1 = w.add(&log.body(0, &c1));
    assert_eq!(r1.status, 200, "{}", r1.text());
    let r2 = w.add(&log.body(size(&c1), &c2));
    assert_eq!(r2.status, 200, "{}", r2.text());
    for (checkpoint, line) in [(&c1, r1.text()), (&c2, r2.text())] {
        let note = format!("{checkpoint}{line}");
        let (code, out) = py_witness(&["verify", "--vkey", &w.vkey], &note);
        assert_eq!(code, 0, "{out}");
        let times: Vec<u64> = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(times.len(), 1, "{out}");
        // The Python side refuses the same line on another checkpoint.
        let moved = format!("{}{line}", if checkpoint == &c1 { &c2 } else { &c1 });
        let (code, out) = py_witness(&["verify", "--vkey", &w.vkey], &moved);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("does not verify"), "{out}");
    }
}

#[test]
fn the_spec_example_holds_in_python() {
    let (code, out) = py_witness(&["spec-example"], "");
    assert_eq!((code, out.trim()), (0, "ok"), "{out}");
}
