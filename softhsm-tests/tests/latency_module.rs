//! The latency module's two ways of emulating a network HSM
//! (`softhsm-tests/pkcs11-shim/`), loaded in this process through cryptoki:
//!
//! - `delay_us`: a sleep before every forwarded call;
//! - `latency_us`: every forwarded call returns no sooner than that after it
//!   was made, SoftHSM's own work inside it (what `lavd-bench` (g) uses).
//!
//! Both are lower bounds on a call's duration, and that is all this checks:
//! a test never bounds a duration from above on a shared machine.

use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use softhsm_tests::{shim_module_path, Shim, TestToken};

#[test]
fn every_forwarded_call_lasts_at_least_the_configured_delay_or_latency() {
    let t = TestToken::new();
    let shim = Shim::new(&t);
    // Set before the module is loaded, and read by it; nothing else in this
    // test process reads the environment concurrently.
    std::env::set_var("LAVD_SHIM_CONFIG", t.path("shim.conf"));
    let pkcs11 = Pkcs11::new(shim_module_path()).unwrap();
    // The harness has initialised SoftHSM in this process already, and the
    // module forwards `C_Initialize` to it.
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("initialise the latency module: {e}"),
    }
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim_end() == t.label)
        .expect("the test token");
    let session = pkcs11.open_ro_session(slot).unwrap();
    const CALLS: u32 = 10;
    for setting in ["latency_us = 4000", "delay_us = 4000"] {
        shim.set(setting);
        session.get_session_info().unwrap();
        let started = Instant::now();
        for _ in 0..CALLS {
            session.get_session_info().unwrap();
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(4) * CALLS,
            "{setting}: {CALLS} calls took {took:?}"
        );
    }
}
