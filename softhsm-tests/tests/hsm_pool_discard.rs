//! A session lost under a call frees its place in the pool at once: the
//! pool discards that session (and retires the rest), and a caller queued
//! for the place is woken then, not at its own deadline. lavd reaches
//! SoftHSM through the fault module, which holds a destroy and then fails
//! it with `CKR_DEVICE_ERROR`, which lavd takes as the session lost.
//!
//! Both the discard and the retirement wake the queue, so this guards the
//! pair: a caller is left to its deadline only if neither wakes it. (Each
//! wake's own condition, "someone is queued", is the same check as the
//! pool's other wakes, which `lavd`'s unit tests of the pool cover one by
//! one.)
//!
//! This file holds one test: the fault module reads one settings file per
//! process.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use lavd::hsm::Hsm;
use softhsm_tests::{shim_module_path, software_peer, HsmCounts, Shim, TestToken};

#[test]
fn a_session_lost_under_a_call_wakes_the_caller_waiting_for_its_place() {
    let t = TestToken::new();
    let shim = Shim::new(&t);
    // One session: the second caller can only have the first one's place.
    t.write_config_with(&shim_module_path(), 1, &shim.hsm_env());
    let settings = t.settings().hsm;
    let deadline = settings.call_timeout;
    let counts = Arc::new(HsmCounts::default());
    let hsm = Hsm::open_with_observer(settings, counts.clone()).unwrap();
    let escrow = hsm.generate_escrow_key("k1").unwrap().public;
    let (peer, expected) = software_peer(&escrow);
    assert_eq!(*hsm.ecdh("k1", &peer).unwrap(), expected);

    std::thread::scope(|s| {
        let _release = shim.releasing();
        shim.set("fault = hang\nfault_calls = C_DestroyObject");
        let first = s.spawn(|| hsm.ecdh("k1", &peer).map(|s| *s));
        // The first caller holds the session, its destroy held in the module.
        shim.wait_for_faults(1);
        let second = s.spawn(|| {
            let secret = hsm.ecdh("k1", &peer).map(|s| *s);
            (secret, Instant::now())
        });
        // Time for the second caller to queue for the only place.
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!second.is_finished(), "the second caller did not wait");
        let released = Instant::now();
        // The held destroy now fails, once, as a lost session: the pool
        // closes it, reconnects, and the first caller tries again.
        shim.set("fault = device_error\nfault_calls = C_DestroyObject\nfault_limit = 1");
        let (second, done) = second.join().unwrap();
        assert_eq!(second.unwrap(), expected);
        assert_eq!(first.join().unwrap().unwrap(), expected);
        assert_eq!(counts.reconnects.load(Ordering::SeqCst), 1);
        let waited = done - released;
        assert!(
            waited < deadline / 2,
            "the second caller got its place {waited:?} after the session was lost (the \
             deadline is {deadline:?}): it was not woken"
        );
    });
    // The pool's threads ended before the process does: an exit beside
    // one still in the module can crash in its destructors (as lavd's own
    // commands, see `lavd::hsm::quiesce`).
    drop(hsm);
    assert!(
        lavd::hsm::quiesce(std::time::Duration::from_secs(30)),
        "HSM threads still running 30 s after the test"
    );
}
