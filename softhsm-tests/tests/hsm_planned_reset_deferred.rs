//! A planned module reset (`[hsm.quirks] reset_module_after_opens`) is not
//! urgent, so it waits only briefly (a tenth of the call deadline, at most
//! 100 ms) for the calls running when it is due: new calls wait while it
//! does, and one slow call must not stall every request. With a call held
//! in the module, the due reset is put off (counted `deferred`) and the
//! other opens go on; once the call is done, the reset runs a tenth of N
//! opens later.
//!
//! This file holds one test: a reset finalises the module for the whole
//! process, and the fault module reads one settings file per process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use softhsm_tests::eventually;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lavd::hsm::Hsm;
use softhsm_tests::{shim_module_path, software_peer, HsmCounts, Shim, TestToken};

/// How long [`eventually`] waits here.
const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[test]
fn a_due_reset_is_put_off_while_a_call_is_held_and_runs_after() {
    let t = TestToken::new();
    let shim = Shim::new(&t);
    t.write_config_hsm(
        &shim_module_path(),
        2,
        "[hsm.quirks]\nreset_module_after_opens = 100\n",
        &shim.hsm_env(),
    );
    let counts = Arc::new(HsmCounts::default());
    let hsm = Hsm::open_with_observer(t.settings().hsm, counts.clone()).unwrap();
    let escrow = hsm.generate_escrow_key("k1").unwrap().public;
    let (peer, expected) = software_peer(&escrow);
    let open = || assert_eq!(*hsm.ecdh("k1", &peer).unwrap(), expected);
    for _ in 0..98 {
        open();
    }

    // The next derive is held in the module; the ones after it are not
    // (the fault's limit is one).
    shim.set("fault = hang\nfault_calls = C_DeriveKey\nfault_limit = 1");
    let held = {
        let (hsm, peer) = (hsm.clone(), peer.clone());
        std::thread::spawn(move || hsm.ecdh("k1", &peer).map(|s| *s))
    };
    // Released however the test ends, so that `held` can end.
    let release = shim.releasing();
    eventually("the held derive", WAIT, || shim.faults() == 1);
    // Opens 99 and 100, on the other session: the 100th makes a reset due,
    // which cannot start under the held call. The next open waits for it
    // to give up, briefly: not for the call deadline (5 s here).
    open();
    open();
    // The reset's thread starts, and waits for the held call.
    std::thread::sleep(Duration::from_millis(30));
    let started = Instant::now();
    open();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "an open waited {:?} behind a reset due under a held call",
        started.elapsed()
    );
    eventually("the reset put off", WAIT, || {
        counts.planned_resets_not_done.load(Ordering::SeqCst) == 1
    });
    assert_eq!(counts.planned_resets.load(Ordering::SeqCst), 0);

    // The held call done, the reset runs a tenth of the 100 opens later,
    // not 100.
    drop(release);
    assert_eq!(held.join().unwrap().unwrap(), expected);
    let mut more = 0;
    while counts.planned_resets.load(Ordering::SeqCst) == 0 {
        assert!(more < 20, "no reset after {more} more opens");
        open();
        more += 1;
        // Time for the reset's thread to run.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(counts.planned_resets_not_done.load(Ordering::SeqCst), 1);
    assert_eq!(counts.reconnects.load(Ordering::SeqCst), 0);
    open();
    // The pool's threads ended before the process does: an exit beside
    // one still in the module can crash in its destructors (as lavd's own
    // commands, see `lavd::hsm::quiesce`).
    drop(hsm);
    assert!(
        lavd::hsm::quiesce(std::time::Duration::from_secs(30)),
        "HSM threads still running 30 s after the test"
    );
}
