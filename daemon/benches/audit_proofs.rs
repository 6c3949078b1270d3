//! Proof serving on a 1,000,000-leaf audit log in SQLite: time per inclusion
//! proof, consistency proof and root, with the store reading only the O(log n)
//! complete-subtree hashes it needs.
//!
//! Run: `cargo bench -p lavd --bench audit_proofs`
//! (`LAVD_BENCH_LEAVES` changes the log size; the database is built in a
//! temporary directory first, which takes most of the run). Under
//! `cargo test --all-targets` it runs on 2,000 leaves as a smoke test.

#![allow(clippy::expect_used)] // a benchmark: any failure should stop it loudly

use std::time::Instant;

use lavd::audit::leaf::{Digest, Event, Unwrap, UnwrapOutcome, WarrantRef};
use lavd::audit::merkle;
use lavd::store::{AuditAppend, AuditStore, Spend, Store};

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` this
    // runs as a quick smoke test of the same code instead.
    let benching = std::env::args().any(|a| a == "--bench");
    let leaves: u64 = std::env::var("LAVD_BENCH_LEAVES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 2_000 });
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("bench.db")).expect("store");
    let t0 = lavd::codec::parse_time("2026-12-01T00:00:00Z").expect("time");
    // What a deployed log mostly holds: unwrap leaves, one an envelope.
    let warrant = WarrantRef {
        id: "BENCH-1",
        digest: Digest::of_warrant_payload(b"payload"),
        emergency: false,
    };
    let event: Event = Unwrap::new(
        "spiffe://agency.example/lea",
        &warrant,
        Some("2026-12"),
        Some(Digest::of_envelope(b"{}", &[4; 65])),
        UnwrapOutcome::Opened,
    )
    .expect("event")
    .into();

    let started = Instant::now();
    let batch = 1000u64;
    let mut written = 0;
    while written < leaves {
        let n = batch.min(leaves - written);
        store
            .append(AuditAppend {
                events: vec![event.clone(); n as usize],
                time: t0,
                spend: Spend::None,
            })
            .expect("append");
        written += n;
    }
    let build = started.elapsed();
    let size = store.tree_size().expect("size");
    assert_eq!(size, leaves);
    println!(
        "built a {size}-leaf log in {:.1} s ({:.0} leaves/s, batches of {batch})",
        build.as_secs_f64(),
        size as f64 / build.as_secs_f64()
    );

    let root = store.root(size).expect("root");
    // A fixed pseudo-random walk over indices (no RNG dependency).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |bound: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % bound
    };
    let n: u32 = if benching { 10_000 } else { 100 };

    let started = Instant::now();
    let mut checked = 0;
    for _ in 0..n {
        let index = next(size);
        let proof = store.inclusion_proof(index, size).expect("proof");
        if checked < 100 {
            let leaf = &store.leaves(index, index + 1).expect("leaf")[0].1;
            merkle::verify_inclusion(&merkle::leaf_hash(leaf), index, size, &proof, &root)
                .expect("inclusion proof verifies");
            checked += 1;
        }
    }
    let inclusion = started.elapsed() / n;

    let started = Instant::now();
    for _ in 0..n {
        let from = 1 + next(size - 1);
        store.consistency_proof(from, size).expect("proof");
    }
    let consistency = started.elapsed() / n;

    let started = Instant::now();
    for _ in 0..n {
        let s = 1 + next(size);
        store.root(s).expect("root");
    }
    let roots = started.elapsed() / n;

    println!("| operation on {size} leaves | time per call |");
    println!("|---|---:|");
    println!(
        "| inclusion proof (index, size) | {:.1} µs |",
        inclusion.as_secs_f64() * 1e6
    );
    println!(
        "| consistency proof (from, size) | {:.1} µs |",
        consistency.as_secs_f64() * 1e6
    );
    println!(
        "| root of a random size | {:.1} µs |",
        roots.as_secs_f64() * 1e6
    );
}
