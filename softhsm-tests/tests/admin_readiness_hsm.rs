//! `/readyz` of a real `lavd serve` follows the token, not just the
//! session: when the token's object store disappears under the running
//! daemon (its SoftHSM token directory moved away: what a network HSM
//! losing its partition looks like from PKCS#11), the session stays
//! logged in but the token finds no key. Readiness must turn false, and an
//! unwrap must fail as unavailable rather than deny (and log) the intact
//! escrow key as `key_destroyed`. With the directory back, readiness returns
//! without a restart and the same envelope opens: the key was never
//! destroyed.
//!
//! SoftHSM marks a token whose directory vanished invalid for the rest of
//! the module's life (it never re-validates a token it found broken), so the
//! recovery goes through the readiness probe's module reset
//! (`Hsm::reset_module`).

use std::time::Duration;

use rustix::process::Signal;
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

#[test]
fn readiness_turns_false_when_the_token_loses_its_objects() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let mut daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);

    let escrow = vault::published_key(&c.provider, "E-1");
    let now = OffsetDateTime::now_utc();
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-READY", recipient.public(), 10));
    let body = |r: &str| {
        serde_json::json!({"warrant": warrant, "envelopes": [vault::seal(
            &escrow, "E-1", TARGET, now - time::Duration::hours(1), r, &[5; 32],
        )]})
    };
    let r = vault::post(&c.agency, "/v1/unwrap", &body("before"));
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());

    let size_before = vault::tree_size(&c.auditor);
    let dir = t.token_dir();
    // Out of the token directory altogether: SoftHSM finds tokens in any
    // subdirectory of it when the module starts again.
    let away = t.path("token-away");
    std::fs::rename(&dir, &away).unwrap();

    let r = daemon.wait_readyz(503);
    assert_eq!(
        r.json(),
        serde_json::json!({"ready": false, "hsm": false, "store": true, "log": true, "draining": false})
    );
    assert_eq!(daemon.admin_get("/healthz").status, 200);
    // Nor does it publish an empty key set as if there were no keys.
    c.provider
        .get("/v1/keys")
        .assert_error(503, "hsm_unavailable");
    let during = body("during");
    let r = vault::post(&c.agency, "/v1/unwrap", &during);
    r.assert_error(503, "hsm_unavailable");
    // The attempt is logged as a failed open, not as a destroyed key (the
    // token cannot sign a checkpoint over it now, so read the leaves alone).
    let r = c
        .auditor
        .get(&format!("/v1/audit/entries?start={size_before}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let leaves: Vec<serde_json::Value> = r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bytes = lavd::codec::b64_decode(e["leaf"].as_str().unwrap()).unwrap();
            serde_json::from_slice(&bytes).unwrap()
        })
        .collect();
    assert_eq!(leaves.len(), 1, "{leaves:?}");
    assert_eq!(leaves[0]["event"], "unwrap");
    assert_eq!(leaves[0]["outcome"], "denied");
    assert_eq!(leaves[0]["reason"], "open_failed");
    let log = daemon.stderr();
    assert!(log.contains("not ready"), "{log}");

    // Back, without a restart: the probe resets the module, readiness
    // returns, and the same envelope opens (the key was never destroyed).
    std::fs::rename(&away, &dir).unwrap();
    daemon.wait_readyz(200);
    let r = vault::post(&c.agency, "/v1/unwrap", &during);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    daemon.signal(Signal::TERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

/// A token that answers that the audit key's objects are wrong (a second
/// pair under its label) is not ready, and the probe resets nothing for
/// it: a reset finds the same objects. Before, each failing probe reset the
/// module (`C_Finalize`, `C_Initialize`), holding every HSM call back, and
/// counted a reconnection.
#[test]
fn a_wrong_audit_key_is_not_ready_and_resets_nothing() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let mut daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    softhsm_tests::foreign_pair(&t.session(), "lav-audit", true);
    for _ in 0..3 {
        let r = daemon.admin_get("/readyz");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["hsm"], false, "{}", r.text());
    }
    assert_eq!(daemon.metric("lavd_hsm_reconnects_total"), 0.0);
    let log = daemon.stderr();
    assert!(
        log.contains("not ready") && log.contains("lav-audit"),
        "{log}"
    );
    daemon.signal(Signal::TERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

/// Many `/readyz` at once behind a slow HSM (100 ms a call, a network
/// HSM's bad day) are answered by the probe running when they came, or the
/// one after it: all 200. Before, each ran its own probe in turn, behind
/// the one lock that keeps a hung HSM from taking more than one thread, so
/// the later ones waited past the check's 5 s and answered 503: a load
/// balancer's health checks would take a ready daemon out.
#[test]
fn readiness_probes_at_once_behind_a_slow_hsm_share_one_probe() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with(
        &softhsm_tests::shim_module_path(),
        2,
        &format!("{}{}", serve_config(&vault::roles_toml()), shim.hsm_env()),
    );
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    shim.set("delay_us = 100000");
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..40)
            .map(|_| s.spawn(|| daemon.admin_get("/readyz").status))
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    shim.set("");
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}

/// A probe while the only session is held by a call still inside its
/// deadline (the fault module holding `C_DeriveKey` of an unwrap) is not
/// ready because the HSM is busy, and resets nothing. Before, "no session
/// came free" read as "no logged-in session", which the probe mends with a
/// module reset: it waited for the running call (holding every new call
/// back) and would then have ended the sessions of a module that was only
/// busy; the probe ran past its 5 s and answered "no answer".
#[test]
fn a_probe_while_every_session_is_busy_is_not_ready_and_resets_nothing() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_hsm(
        &softhsm_tests::shim_module_path(),
        1,
        "call_timeout_ms = 3000\n",
        &format!("{}{}", serve_config(&vault::roles_toml()), shim.hsm_env()),
    );
    vault::generate_escrow_key(&t, "E-1");
    let mut daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let now = OffsetDateTime::now_utc();
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-BUSY", recipient.public(), 10));
    let body = |r: &str| {
        serde_json::json!({"warrant": warrant, "envelopes": [vault::seal(
            &escrow, "E-1", TARGET, now - time::Duration::hours(1), r, &[5; 32],
        )]})
    };

    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    std::thread::scope(|s| {
        let held = s.spawn(|| vault::post(&c.agency, "/v1/unwrap", &body("held")));
        assert!(
            softhsm_tests::faults::wait_until(Duration::from_secs(10), || shim.faults() > 0),
            "the module held no call"
        );
        let asked = std::time::Instant::now();
        let r = daemon.admin_get("/readyz");
        let answered = asked.elapsed();
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["hsm"], false, "{}", r.text());
        assert!(answered < Duration::from_secs(5), "{answered:?}");
        shim.set("");
        held.join().unwrap().assert_error(503, "hsm_unavailable");
    });
    let log = daemon.stderr();
    assert!(
        log.contains("all 1 HSM sessions stayed busy; gave up waiting")
            && !log.contains("no logged-in session"),
        "{log}"
    );
    assert!(!log.contains("module reset"), "{log}");
    daemon.wait_readyz(200);
    assert_eq!(daemon.metric("lavd_hsm_reconnects_total"), 0.0);
    let r = vault::post(&c.agency, "/v1/unwrap", &body("after"));
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    daemon.signal(Signal::TERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).code(), Some(0));
}
