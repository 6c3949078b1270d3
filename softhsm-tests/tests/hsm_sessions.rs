//! The HSM layer in-process on a real SoftHSM token: typed errors for bad
//! setups, the bounded session pool under concurrency, and the memory SoftHSM
//! keeps per derivation and per signature (nothing of lavd's). ECDH results are
//! checked against a software computation from the other side of the exchange.
//! (Recovery after a module reset is in `hsm_reset.rs`: it must have its
//! process to itself.)

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lavd::hsm::{Hsm, HsmError};
use softhsm_tests::{software_peer, HsmCounts, TestToken};

#[test]
fn the_pool_never_opens_more_sessions_than_configured() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let counts = Arc::new(HsmCounts::default());
    let settings = t.settings().hsm;
    assert_eq!(settings.sessions, 2);
    let deadline = settings.call_timeout;
    let hsm = Hsm::open_with_observer(settings, counts.clone()).unwrap();
    let escrow = hsm.generate_escrow_key("k2").unwrap().public;
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..25 {
                    let (peer, expected) = software_peer(&escrow);
                    assert_eq!(*hsm.ecdh("k2", &peer).unwrap(), expected);
                }
            });
        }
    });
    let max = counts.max_busy.load(Ordering::SeqCst);
    assert!((1..=2).contains(&max), "max busy sessions {max}");
    // Six callers wait for a session at any time: each session given back
    // must wake them. A caller not woken waits for its deadline (the call
    // deadline) before it looks again.
    assert!(
        deadline >= std::time::Duration::from_secs(5),
        "{deadline:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "200 derives on 2 sessions took {:?}: a caller waited for its deadline",
        started.elapsed()
    );
}

#[test]
fn a_destroyed_key_is_not_found_and_stays_gone() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let hsm = Hsm::open(t.settings().hsm).unwrap();
    let escrow = hsm.generate_escrow_key("k3").unwrap().public;
    let (peer, _) = software_peer(&escrow);
    hsm.ecdh("k3", &peer).unwrap(); // caches the handle
    assert!(hsm.destroy_escrow_key("k3").unwrap());
    assert!(!hsm.escrow_key_present("k3").unwrap());
    assert!(matches!(
        hsm.ecdh("k3", &peer),
        Err(HsmError::KeyNotFound { kind: "escrow", .. })
    ));
    assert!(!hsm.destroy_escrow_key("k3").unwrap());
}

#[test]
fn wrong_pin_is_a_login_error() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    std::fs::write(t.path("pin"), "0000\n").unwrap();
    match Hsm::open(t.settings().hsm) {
        Err(HsmError::Login { ckr }) => assert_eq!(ckr, "CKR_PIN_INCORRECT"),
        other => panic!("expected a login error, got {other:?}"),
    }
}

#[test]
fn missing_module_is_named() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let mut settings = t.settings().hsm;
    settings.module = "/nonexistent/libpkcs11.so".into();
    match Hsm::open(settings) {
        Err(e @ HsmError::Module { .. }) => {
            assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}")
        }
        other => panic!("expected a module error, got {other:?}"),
    }
}

#[test]
fn unknown_token_lists_the_tokens_present() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let mut settings = t.settings().hsm;
    settings.token = lavd::hsm::TokenSelector::Label("no-such-token".into());
    match Hsm::open(settings) {
        Err(e @ HsmError::TokenNotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("no-such-token"), "{msg}");
            assert!(msg.contains(&format!("{:?}", t.label)), "{msg}");
        }
        other => panic!("expected TokenNotFound, got {other:?}"),
    }
}

/// Bytes of the process's resident memory kept per call of `f`, over `n`
/// calls after 2,000 to warm up (the session pool, the handle cache and the
/// allocator's arenas reach their working size, and this binary's other
/// tests, run alongside, finish). One measurement at a time: RSS is the
/// whole process's.
fn kept_per_call(n: u64, mut f: impl FnMut(u64)) -> u64 {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rss = || softhsm_tests::load::status_kib(std::process::id(), "VmRSS");
    (0..2_000).for_each(&mut f);
    let before = rss();
    (0..n).for_each(&mut f);
    let after = rss();
    let per = after.saturating_sub(before) * 1024 / n;
    eprintln!("{n} calls: VmRSS {before} -> {after} KiB, {per} bytes kept per call");
    per
}

/// Each ECDH derivation's secret is destroyed on the token, so what the
/// module keeps per derivation is only what SoftHSM keeps of any destroyed
/// session object: SoftHSM 2.6 holds every session object it ever made in
/// `SessionObjectStore::allObjects` until `C_Finalize`, its attributes (the
/// secret among them) freed at `C_DestroyObject` but the object itself, its
/// mutex and its set node kept: 240 bytes measured. With the signatures
/// below, that is what grows with the number of unwraps on SoftHSM
/// (docs/RELIABILITY.md, "Load"). A derived object left alive keeps its
/// attributes too: 8,455 bytes each, measured with the same loop without
/// `C_DestroyObject`.
#[test]
fn a_derivation_leaves_softhsm_only_the_shell_of_a_destroyed_object() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let hsm = Hsm::open(t.settings().hsm).unwrap();
    let escrow = hsm.generate_escrow_key("k5").unwrap().public;
    let (peer, expected) = software_peer(&escrow);
    let per = kept_per_call(20_000, |_| {
        assert_eq!(*hsm.ecdh("k5", &peer).unwrap(), expected);
    });
    assert!(
        per <= 512,
        "{per} bytes kept per derivation: is the derived secret destroyed?"
    );
}

/// SoftHSM 2.6.1's `C_SignInit` with an EdDSA key never frees the two
/// ASN.1 strings it decodes the key's curve into (heaptrack: 37 bytes in
/// two allocations from `ASN1_item_d2i_ex` under `C_SignInit`, every call),
/// about 77 bytes of RSS per signature; lavd's signing path keeps nothing.
/// Every checkpoint the log signs costs that much on SoftHSM.
#[test]
fn an_ed25519_signature_costs_only_softhsm_s_own_leak() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    let hsm = Hsm::open(t.settings().hsm).unwrap();
    hsm.generate_audit_key("audit-k6").unwrap();
    let per = kept_per_call(20_000, |i| {
        hsm.sign_ed25519("audit-k6", &i.to_be_bytes()).unwrap();
    });
    assert!(per <= 160, "{per} bytes kept per signature");
}

/// An audit key is its private half: a public half alone signs nothing. It
/// is also what a session that silently lost its login still sees when the
/// public half was made by an earlier build (not `CKA_PRIVATE`), so taking
/// it for the key would make a token whose private objects vanished look
/// sound, and an intact escrow key be logged `key_destroyed`.
#[test]
fn an_audit_public_half_without_its_private_half_is_not_the_audit_key() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    use cryptoki::object::{Attribute, ObjectClass};
    let t = TestToken::new();
    let hsm = Hsm::open(t.settings().hsm).unwrap();
    let made = hsm.generate_audit_key("audit-k8").unwrap();
    assert_eq!(hsm.audit_key("audit-k8").unwrap().public, made.public);

    let session = t.session();
    let private = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"audit-k8".to_vec()),
        ])
        .unwrap();
    assert_eq!(private.len(), 1);
    session.destroy_object(private[0]).unwrap();

    match hsm.audit_key("audit-k8") {
        Err(HsmError::KeyNotFound {
            kind: "audit",
            label,
        }) => assert_eq!(label, "audit-k8"),
        other => panic!("expected the audit key not found, got {other:?}"),
    }
}
