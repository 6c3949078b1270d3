//! The user PIN changed on the token while lavd runs (a rotation whose new
//! PIN lavd has not been given yet). The fault module emulates it
//! (`pin = NEW:REAL`): it refuses every `C_Login` with another PIN, logged
//! in or not, and counts each refusal.
//!
//! Tokens count wrong PINs and lock the user out after a few. So after one
//! refusal lavd tries no login again until a reload reads a *different* PIN
//! (or a restart): a routine reload with the same PIN keeps the latch.
//! Meanwhile the sessions still logged in keep serving; once none is left
//! every request fails closed (503 `hsm_unavailable`) and `/readyz` is 503.

use rustix::process::Signal;
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties};
use softhsm_tests::{shim_module_path, Shim, TestToken, PIN};

/// A delay for every call through the fault module: with it, each open
/// holds its session long enough that a batch's other workers open sessions
/// of their own (and log in) rather than wait for it. Without it, on an idle
/// machine, one session could serve a whole batch of eight, no login would be
/// tried, and there would be no refusal to test (a CI run at `737a6f2` saw
/// none after four batches).
const SLOW: &str = "delay_us = 2000";

fn reload(daemon: &Daemon) {
    daemon.signal(Signal::HUP);
    daemon.expect_notify("RELOADING=1");
    daemon.expect_notify("READY=1");
}

#[test]
fn a_refused_pin_is_tried_once_until_a_reload_reads_a_new_one() {
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
    let rotated = format!("pin = rotated-pin:{PIN}");

    // The PIN is changed on the token. Batches that want more sessions
    // than are logged in meet one refusal, then wait for the sessions that
    // are: they are all served. (2 ms a call makes each open hold its
    // session long enough that a batch's workers need more than one, however
    // fast the machine.)
    shim.set(&format!("{rotated}\n{SLOW}"));
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

    // A routine reload (new CRLs, say) reads the same PIN: still held.
    reload(&daemon);
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 1.0);
    let r = unwrap("same-pin", 8);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        shim.faults(),
        1,
        "a reload with the refused PIN tried it again"
    );
    assert!(daemon
        .stderr()
        .contains("the PIN source still holds the PIN the token refused"));

    // Every session is lost (one lost-session fault on a derive): lavd
    // drops its sessions and is logged out, and it does not log in again.
    shim.set(&format!(
        "{rotated}\nfault = session_handle_invalid\nfault_calls = C_DeriveKey\nfault_limit = 1"
    ));
    unwrap("lost", 1).assert_error(503, "hsm_unavailable");
    assert_eq!(shim.faults(), 2, "the lost-session fault was not injected");
    shim.set(&rotated);
    for round in 0..3 {
        unwrap(&format!("out-{round}"), 4).assert_error(503, "hsm_unavailable");
    }
    let ready = daemon.wait_readyz(503);
    assert_eq!(ready.json()["hsm"], false, "{}", ready.text());
    assert_eq!(shim.faults(), 2, "a login was tried while held back");

    // The operator puts the new PIN in the PIN file and reloads: it
    // applies, logins are tried again, and the daemon serves.
    std::fs::write(t.path("pin"), "rotated-pin\n").expect("pin file");
    reload(&daemon);
    assert!(daemon.stderr().contains("the HSM PIN changed"));
    assert!(daemon
        .stderr()
        .contains("HSM logins are tried again, with the new PIN"));
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 0.0);
    let r = unwrap("after", 8);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"; 8]);
    daemon.wait_readyz(200);
    assert_eq!(shim.faults(), 2, "the new PIN was refused");
}

/// A planned module reset (`[hsm.quirks] reset_module_after_opens`) would
/// log out the sessions still serving while the token refuses the PIN, and
/// none could log in again: it is put off until the PIN is replaced, and
/// the logged-in sessions go on serving past the opens that would have
/// started it.
#[test]
fn no_planned_reset_runs_while_the_token_refuses_the_pin() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_hsm(
        &shim_module_path(),
        4,
        "[hsm.quirks]\nreset_module_after_opens = 100\n",
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    let v = vault::Vault::serve(t, pki);
    let (daemon, escrow) = (&v.daemon, &v.escrow);
    let c = v.parties.clients(&v.pki, daemon.api);
    let warrant = vault::double_lock(&vault::claims("PIN-R", vault::recipient().public(), 1000));
    let unwrap = |tag: &str, n: usize| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": vault::batch(escrow, tag, n)}),
        )
    };
    // The PIN changes on the token; batches that want more sessions than
    // are logged in meet the refusal (as in the test above).
    shim.set(&format!("pin = rotated-pin:{PIN}\n{SLOW}"));
    for round in 0..4 {
        let r = unwrap(&format!("held-{round}"), 8);
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
    }
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 1.0);
    shim.set(&format!("pin = rotated-pin:{PIN}"));
    // 32 opens so far; 200 more pass the 100 that would start a reset.
    for round in 0..4 {
        let r = unwrap(&format!("past-{round}"), 50);
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"; 50], "round {round}");
    }
    assert_eq!(
        daemon.metric("lavd_hsm_planned_resets_total{outcome=\"done\"}"),
        0.0
    );
    assert_eq!(shim.faults(), 1, "logins tried after the first refusal");
}
