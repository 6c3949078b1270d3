//! A PIN the token refuses while lavd runs (the PIN was changed on the
//! token, or the credential file was replaced with a wrong one).
//!
//! Tokens count wrong PINs and lock the user out after a few. So after one
//! refusal lavd tries no login again until a reload (or a restart) gives it
//! a PIN. Meanwhile the sessions still logged in keep serving, and once
//! none is left every request fails closed (503 `hsm_unavailable`) and
//! `/readyz` is 503. The fault module answers `C_Login` with
//! `CKR_PIN_INCORRECT` and counts every login it refuses.

use rustix::process::Signal;
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties};
use softhsm_tests::{shim_module_path, Shim, TestToken};

fn reload(daemon: &Daemon) {
    daemon.signal(Signal::HUP);
    daemon.expect_notify("RELOADING=1");
    daemon.expect_notify("READY=1");
}

#[test]
fn a_refused_pin_is_tried_once_until_a_reload() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    // Four sessions: a batch of eight opens new ones, each logging in.
    t.write_config_with(
        &shim_module_path(),
        4,
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start_logging(&t, "info");
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let warrant = vault::double_lock(&vault::claims("PIN-1", vault::recipient().public(), 1000));
    let unwrap = |tag: &str, n: usize| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": vault::batch(&escrow, tag, n)}),
        )
    };

    // The token refuses every login from now on. Batches that want more
    // sessions than are logged in meet one refusal, then wait for the
    // sessions that are: they are all served.
    shim.set("fault = pin_incorrect\nfault_calls = C_Login");
    for round in 0..4 {
        let r = unwrap(&format!("held-{round}"), 8);
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"; 8], "round {round}");
    }
    assert_eq!(shim.faults(), 1, "logins tried after the first refusal");
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 1.0);
    assert!(
        daemon
            .stderr()
            .contains("the token refused the HSM PIN; no login is tried again"),
        "{}",
        daemon.stderr()
    );
    daemon.wait_readyz(200);

    // Every session is lost (one lost-session fault on a derive): lavd
    // drops its sessions and is logged out, and it does not log in again.
    shim.set("fault = session_handle_invalid\nfault_calls = C_DeriveKey\nfault_limit = 2");
    unwrap("lost", 1).assert_error(503, "hsm_unavailable");
    assert_eq!(shim.faults(), 2, "the lost-session fault was not injected");
    shim.set("fault = pin_incorrect\nfault_calls = C_Login");
    for round in 0..3 {
        unwrap(&format!("out-{round}"), 4).assert_error(503, "hsm_unavailable");
    }
    let ready = daemon.wait_readyz(503);
    assert_eq!(ready.json()["hsm"], false, "{}", ready.text());
    assert_eq!(shim.faults(), 2, "a login was tried while held back");

    // The operator puts the PIN right (here: the token accepts it again)
    // and reloads: logins are tried again and the daemon serves.
    shim.set("");
    reload(&daemon);
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 0.0);
    let r = unwrap("after", 8);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"; 8]);
    daemon.wait_readyz(200);
    assert!(
        daemon
            .stderr()
            .contains("HSM logins are tried again, with the PIN just read"),
        "{}",
        daemon.stderr()
    );

    // A PIN file with a new PIN applies on reload (new sessions log in
    // with it), and the log says so.
    assert!(!daemon.stderr().contains("the HSM PIN changed"));
    std::fs::write(t.path("pin"), "a-rotated-pin").expect("pin file");
    reload(&daemon);
    assert!(
        daemon.stderr().contains("the HSM PIN changed"),
        "{}",
        daemon.stderr()
    );
}
