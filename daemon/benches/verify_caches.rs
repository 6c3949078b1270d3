//! What the two per-request caches save (`docs/benchmarks-history.md`, "Where a
//! single-envelope request spent its time (d)", in the run of 2026-12-02 11:50): the
//! time of one warrant verification (an ES256 and an EdDSA signature,
//! claims, policy) from scratch and from the verifier's cache, and of one
//! re-check of a client chain against the CAs, which a connection skips
//! while its last passed check holds.
//!
//! Run: `cargo bench -p lavd --bench verify_caches`. Under
//! `cargo test --all-targets` it runs a few iterations as a smoke test.

#![allow(clippy::expect_used)] // a benchmark: any failure should stop it loudly

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lavd::api::tls;
use lavd::config::{TlsSettings, TlsVersion};
use lavd::dev::pki::DevCa;
use lavd::warrant::{TrustStore, Verifier, WarrantLimits};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, UnixTime};

#[path = "../tests/warrant_common/mod.rs"]
mod warrant_common;

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let n = if benching { 5000 } else { 20 };

    // A double-lock warrant: one ES256 and one EdDSA signature (the
    // fixtures of the warrant tests).
    let a = warrant_common::Authorities::new();
    let trust = Arc::new(
        TrustStore::from_toml(&a.trust_toml(warrant_common::DOUBLE_LOCK), Path::new("."))
            .expect("trust"),
    );
    let jws = warrant_common::signed(&warrant_common::claims("W-BENCH"), &[&a.exec1, &a.jud1]);
    let now = warrant_common::now();
    let limits = WarrantLimits::default();
    const AGENCY: &str = warrant_common::AGENCY;

    let fresh = time_each(n, || {
        Verifier::new(trust.clone(), limits)
            .verify(&jws, now, AGENCY)
            .expect("verified");
    });
    let kept = Verifier::new(trust.clone(), limits);
    kept.verify(&jws, now, AGENCY).expect("verified");
    let cached = time_each(n, || {
        kept.verify(&jws, now, AGENCY).expect("verified");
    });
    println!("warrant verification, from scratch: {fresh:.1} µs (median of {n})");
    println!("warrant verification, kept:         {cached:.1} µs (median of {n})");

    // A client chain re-checked against the CAs (no CRLs), as every
    // request on a connection did before.
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::new().expect("CA");
    let server = ca.server().expect("server certificate");
    let client = ca.client(AGENCY).expect("client certificate");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let settings = TlsSettings {
        cert: write("server.pem", &server.cert_pem),
        key: write("server.key", &server.key_pem),
        client_cas: vec![write("ca.pem", &ca.ca.cert_pem)],
        crls: vec![],
        min_version: TlsVersion::Tls13,
        allow_unknown_revocation_status: false,
        enforce_crl_expiry: true,
    };
    let material = tls::load(&settings, &dir.path().join("lavd.toml"), None).expect("TLS");
    let chain =
        vec![CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).expect("client PEM")];
    let recheck = time_each(n, || {
        material
            .recheck(&chain, false, UnixTime::now())
            .expect("the chain passes");
    });
    println!("client chain re-check:              {recheck:.1} µs (median of {n})");
}

/// The median time of `f` in µs over `n` calls.
fn time_each(n: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[n / 2]
}
