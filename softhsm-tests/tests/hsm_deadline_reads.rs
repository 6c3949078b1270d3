//! The HSM reads a request makes outside the envelope batch (the escrow
//! keys' public halves for `GET /v1/keys`, the audit key's, and the count
//! of private keys that follows a missing escrow key) run on the HSM
//! workers under the call deadline, as the envelope opens and the
//! checkpoint signature do. A module
//! that hangs in `C_FindObjectsInit` is answered 503 `hsm_unavailable`
//! within the deadline; before, the request waited as long as the module
//! did, on a blocking thread of its own.

use std::time::{Duration, Instant};

use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{self, Parties};
use softhsm_tests::{shim_module_path, Shim, TestToken};

/// A token through the latency and fault module, with a call deadline of
/// 1 s and escrow keys `kids`.
fn token_with_keys(kids: &[&str]) -> (TestToken, Pki, Shim) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_hsm(
        &shim_module_path(),
        2,
        "call_timeout_ms = 1000\n",
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    for kid in kids {
        vault::generate_escrow_key(&t, kid);
    }
    (t, pki, shim)
}

/// `GET /v1/keys` while the module holds what `shim` was set to hang, the
/// fault cleared after 15 s whatever happens (so that a request that waits
/// for the module ends, and the test fails, not hangs); the answer and how
/// long it took.
fn keys_while_hung(c: &Client, shim: &Shim) -> (softhsm_tests::server::Response, Duration) {
    std::thread::scope(|s| {
        let clear = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(15));
            shim.set("");
        });
        let started = Instant::now();
        let answer = c.get("/v1/keys");
        let took = started.elapsed();
        clear.join().unwrap();
        (answer, took)
    })
}

#[test]
fn a_hung_key_read_is_answered_within_the_call_deadline() {
    let (t, pki, shim) = token_with_keys(&["E-1"]);
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    assert_eq!(c.provider.get("/v1/keys").status, 200);

    // The first read (the audit key's), then the second (the escrow key's).
    for after in [0, 1] {
        shim.set(&format!(
            "fault = hang\nfault_calls = C_FindObjectsInit\nfault_after = {after}"
        ));
        let faults = shim.faults();
        let (answer, took) = keys_while_hung(&c.provider, &shim);
        answer.assert_error(503, "hsm_unavailable");
        assert!(
            took < Duration::from_secs(6),
            "read {after}: answered after {took:?}"
        );
        assert!(
            shim.faults() > faults,
            "read {after} never reached the module"
        );
        // The hung call returned when the fault cleared: service again.
        daemon.wait_readyz(200);
        assert_eq!(c.provider.get("/v1/keys").status, 200);
    }
}

/// The check that follows a missing escrow key (does the token show any
/// private key at all?) runs on the HSM workers' pooled sessions too. It
/// opened a session of its own on the request's thread, with no deadline
/// (and, while a refused PIN holds new logins back, none at all): a module
/// that hangs in `C_OpenSession` held `GET /v1/keys` as long as it did.
#[test]
fn the_check_after_a_missing_key_opens_no_session_of_its_own() {
    let (t, pki, shim) = token_with_keys(&["E-1", "E-2"]);
    // E-2's private half removed outside lavd: the store still lists it.
    let session = t.session();
    for handle in session
        .find_objects(&[
            cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::PRIVATE_KEY),
            cryptoki::object::Attribute::Label(b"lav-escrow:E-2".to_vec()),
        ])
        .unwrap()
    {
        session.destroy_object(handle).unwrap();
    }
    drop(session);
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let published = |answer: &softhsm_tests::server::Response| {
        assert_eq!(answer.status, 200, "{}", answer.text());
        vault::kids(&answer.json())
    };
    assert_eq!(published(&c.provider.get("/v1/keys")), ["E-1"]);

    shim.set("fault = hang\nfault_calls = C_OpenSession");
    let (answer, took) = keys_while_hung(&c.provider, &shim);
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    assert_eq!(published(&answer), ["E-1"]);
}
