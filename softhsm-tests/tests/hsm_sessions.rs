//! The HSM layer in-process on a real SoftHSM token: typed errors for bad
//! setups and the bounded session pool under concurrency. ECDH results are
//! checked against a software computation from the other side of the exchange.
//! (Recovery after a module reset is in `hsm_reset.rs`: it must have its
//! process to itself.)

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lavd::hsm::{Hsm, HsmError};
use softhsm_tests::{software_peer, HsmCounts, TestToken};

#[test]
fn the_pool_never_opens_more_sessions_than_configured() {
    let t = TestToken::new();
    let counts = Arc::new(HsmCounts::default());
    let settings = t.settings().hsm;
    assert_eq!(settings.sessions, 2);
    let hsm = Hsm::open_with_observer(settings, counts.clone()).unwrap();
    let escrow = hsm.generate_escrow_key("k2").unwrap();
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
}

#[test]
fn a_destroyed_key_is_not_found_and_stays_gone() {
    let t = TestToken::new();
    let hsm = Hsm::open(t.settings().hsm).unwrap();
    let escrow = hsm.generate_escrow_key("k3").unwrap();
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
    let t = TestToken::new();
    std::fs::write(t.path("pin"), "0000\n").unwrap();
    match Hsm::open(t.settings().hsm) {
        Err(HsmError::Login { ckr }) => assert_eq!(ckr, "CKR_PIN_INCORRECT"),
        other => panic!("expected a login error, got {other:?}"),
    }
}

#[test]
fn missing_module_is_named() {
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
