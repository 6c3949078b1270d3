//! Envelope throughput on SoftHSM, all figures from one run so that ratios are
//! meaningful on a shared, noisy machine:
//!
//! - raw SoftHSM ECDH derive: this program's own cryptoki sessions doing
//!   exactly what lavd's HSM layer does per envelope (derive into a session
//!   secret, read it, destroy it), with no lavd code in between;
//! - HSM-backed open: `open_envelope` through lavd's session pool (point
//!   validation, in-HSM ECDH, HPKE key schedule, AES-256-GCM);
//! - software seal: `seal_envelope` (what a provider does per message key).
//!
//! Each at 1 and 2 threads. Run: `cargo bench -p softhsm-tests --bench envelope_open`
//! (`LAVD_BENCH_SECONDS` sets the time per measurement, default 3).

use std::time::Duration;

use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use lavd::envelope::{open_envelope, seal_envelope, Envelope, HeaderBuilder};
use lavd::hsm::Hsm;
use lavd::jwk::P256PublicKey;
use softhsm_tests::{measure, TestToken};

const KID: &str = "bench";

/// `cargo bench` passes `--bench`; under `cargo test --all-targets` this runs
/// briefly as a smoke test of the same code instead.
fn seconds() -> Duration {
    let benching = std::env::args().any(|a| a == "--bench");
    let s = std::env::var("LAVD_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benching { 3.0 } else { 0.05 });
    Duration::from_secs_f64(s)
}

fn main() {
    let duration = seconds();
    let token = TestToken::new();
    let mut settings = token.settings().hsm;
    settings.sessions = 2;
    let hsm = Hsm::open(settings).expect("open HSM");
    let escrow = hsm.generate_escrow_key(KID).expect("escrow key").public;

    let header = HeaderBuilder::new(
        KID,
        "spiffe://provider.example/messaging",
        "acct:alice@example.com",
        lavd::codec::parse_time("2026-12-03T10:00:00Z").expect("time"),
    )
    .reference("msg-8812")
    .build()
    .expect("header");
    let dek = [7u8; 32];
    let envelopes: Vec<Envelope> = (0..512)
        .map(|_| seal_envelope(&escrow, &header, &dek).expect("seal"))
        .collect();
    let peers: Vec<&P256PublicKey> = envelopes.iter().map(Envelope::enc).collect();

    // The raw baseline: one session per thread, owned by this program.
    let sessions: Vec<_> = (0..2).map(|_| token.session()).collect();
    let keys: Vec<_> = sessions
        .iter()
        .map(|s| {
            s.find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(format!("lav-escrow:{KID}").into_bytes()),
            ])
            .expect("find")[0]
        })
        .collect();
    let sessions: Vec<std::sync::Mutex<_>> =
        sessions.into_iter().map(std::sync::Mutex::new).collect();
    let raw = |t: usize, i: u64| {
        let session = sessions[t].lock().expect("session");
        let peer = peers[i as usize % peers.len()];
        let params = Ecdh1DeriveParams::new(EcKdf::null(), peer.sec1());
        let derived = session
            .derive_key(
                &Mechanism::Ecdh1Derive(params),
                keys[t],
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::ValueLen(32u64.into()),
                ],
            )
            .expect("derive");
        let value = session
            .get_attributes(derived, &[AttributeType::Value])
            .expect("read");
        session.destroy_object(derived).expect("destroy");
        assert!(matches!(&value[0], Attribute::Value(v) if v.len() == 32));
    };
    let open = |_: usize, i: u64| {
        let env = &envelopes[i as usize % envelopes.len()];
        let out = open_envelope(env, &escrow, |e| hsm.ecdh(KID, e)).expect("open");
        assert_eq!(out.len(), 32);
    };
    let seal = |_: usize, _: u64| {
        seal_envelope(&escrow, &header, &dek).expect("seal");
    };

    // Warm up, then interleave so that drift in machine load hits all alike.
    measure(2, Duration::from_millis(300), raw);
    measure(2, Duration::from_millis(300), open);
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let r = measure(threads, duration, raw);
        let o = measure(threads, duration, open);
        let s = measure(threads, duration, seal);
        rows.push((threads, r, o, s));
    }
    println!("| threads | raw SoftHSM ECDH derive (ops/s) | HSM-backed open (ops/s) | open / derive | software seal (ops/s) |");
    println!("|---:|---:|---:|---:|---:|");
    for (threads, r, o, s) in rows {
        println!(
            "| {threads} | {r:.0} | {o:.0} | {:.1}% | {s:.0} |",
            100.0 * o / r
        );
    }
}
