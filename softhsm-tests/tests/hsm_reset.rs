//! Recovery after the PKCS#11 module loses every session: another user of the
//! module in this process finalises it (and, in a second step, does not even
//! initialise it again). lavd's pool must notice the lost sessions, reconnect,
//! log in again and retry, without a restart.
//!
//! This file holds one test so that the reset cannot pull the module from
//! under a test running in parallel in the same process.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use lavd::hsm::Hsm;
use softhsm_tests::{harness, software_peer, HsmCounts, TestToken};

#[test]
fn in_hsm_ecdh_survives_a_module_reset() {
    let t = TestToken::new();
    let counts = Arc::new(HsmCounts::default());
    let hsm = Hsm::open_with_observer(t.settings().hsm, counts.clone()).unwrap();
    let escrow = hsm.generate_escrow_key("k1").unwrap().public;
    assert_eq!(hsm.escrow_public_key("k1").unwrap(), escrow);
    let (peer, expected) = software_peer(&escrow);
    assert_eq!(*hsm.ecdh("k1", &peer).unwrap(), expected);
    assert_eq!(counts.reconnects.load(Ordering::SeqCst), 0);

    // Another user of the module resets it: every session lavd holds is gone.
    harness().pkcs11().clone().finalize().unwrap();
    harness()
        .pkcs11()
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    assert_eq!(*hsm.ecdh("k1", &peer).unwrap(), expected);
    assert_eq!(counts.reconnects.load(Ordering::SeqCst), 1);
    assert!(hsm.is_ready());

    // Finalised and not re-initialised: lavd initialises the module again.
    harness().pkcs11().clone().finalize().unwrap();
    assert_eq!(*hsm.ecdh("k1", &peer).unwrap(), expected);
    assert_eq!(counts.reconnects.load(Ordering::SeqCst), 2);
    assert!(hsm.is_ready());
    // The pool's threads ended before the process does: an exit beside
    // one still in the module can crash in its destructors (as lavd's own
    // commands, see `lavd::hsm::quiesce`).
    drop(hsm);
    assert!(
        lavd::hsm::quiesce(std::time::Duration::from_secs(30)),
        "HSM threads still running 30 s after the test"
    );
}
