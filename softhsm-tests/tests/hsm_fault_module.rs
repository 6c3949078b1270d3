//! The latency and fault PKCS#11 module (`softhsm-tests/pkcs11-shim/`),
//! loaded by a real `lavd serve` in place of SoftHSM, which it forwards to.
//!
//! - Through it, the whole unwrap path works as on SoftHSM itself.
//! - A fault injected into `C_DeriveKey` (`CKR_DEVICE_ERROR`,
//!   `CKR_DEVICE_REMOVED`, `CKR_SESSION_HANDLE_INVALID`) fails the request
//!   closed: 503, no key released, nothing spent, and no `opened` leaf.
//! - A call held by a `hang` fault completes once the fault is cleared; one
//!   whose settings file is gone (a test that failed before releasing it)
//!   fails with `CKR_DEVICE_ERROR` instead of being held for ever.
//! - A derive the token refuses for the key (`CKR_KEY_FUNCTION_NOT_PERMITTED`,
//!   `CKR_KEY_TYPE_INCONSISTENT`), again after a fresh look-up, denies that
//!   key's envelopes `open_failed` (200), not the whole request.
//! - When the fault clears, the same daemon serves again, without a restart,
//!   and the warrant's budget shows that the failed requests spent nothing.
//! - `fault_limit` counts the faults since the last settings change, not
//!   since the module was loaded; `fault_probability` fails about that
//!   share of the matching calls.
//! - A settings file the module cannot take as written (a probability of
//!   `50%`, a misspelled function, a negative count) is refused loudly:
//!   every call fails (503 `hsm_unavailable`, `/readyz` 503) and the
//!   module says why on stderr, until a good file replaces it.

use std::time::Duration;

use lavd::jwk::P256PublicKey;
use softhsm_tests::server::{serve_config, Client, Daemon, Pki, Response};
use softhsm_tests::vault::{self, Clients, Parties};
use softhsm_tests::{shim_module_path, Shim, TestToken};

/// Successful derives, and reconnects of the session pool.
const DERIVES_OK: &str =
    "lavd_hsm_operation_duration_seconds_count{op=\"ecdh_derive\",result=\"ok\"}";
const RECONNECTS: &str = "lavd_hsm_reconnects_total";

/// The `opened` leaves of warrant `id` in the whole log.
fn opened_leaves(auditor: &Client, id: &str) -> usize {
    let size = vault::tree_size(auditor);
    vault::entries(auditor, 0, size)
        .iter()
        .filter(|e| e.leaf["warrant_id"] == id && e.leaf["outcome"] == "opened")
        .count()
}

#[test]
fn injected_hsm_faults_fail_closed_and_service_resumes_when_they_clear() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_with_module(
        &shim_module_path(),
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let id = "FAULTS-1";
    // Exactly the envelopes that open below: a failed request that spent
    // anything would make the last one `budget_exhausted`.
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 6));
    let unwrap = |envelopes: &[serde_json::Value]| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
        )
    };

    // Forwarding: the module is transparent.
    let r = unwrap(&vault::batch(&escrow, "clean", 2));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok", "ok"]);
    assert_eq!(opened_leaves(&c.auditor, id), 2);
    assert_eq!(shim.faults(), 0);

    let faults = ["device_error", "device_removed", "session_handle_invalid"];
    // Before each fault: the 2 above, plus one per earlier fault.
    for (opened, fault) in (2..).zip(faults) {
        let before = shim.faults();
        shim.set(&format!("fault = {fault}\nfault_calls = C_DeriveKey"));
        let r = unwrap(&vault::batch(&escrow, fault, 3));
        r.assert_error(503, "hsm_unavailable");
        assert!(
            shim.faults() > before,
            "{fault}: the module injected nothing"
        );
        assert_eq!(
            opened_leaves(&c.auditor, id),
            opened,
            "{fault}: opened leaf logged"
        );

        // Cleared: the same daemon opens again.
        shim.set("");
        let r = unwrap(&vault::batch(&escrow, &format!("{fault}-after"), 1));
        assert_eq!(r.status, 200, "{fault}: {}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"]);
    }
    assert_eq!(opened_leaves(&c.auditor, id), 5);

    // A hung derive holds its request until the fault clears, then the
    // request completes normally.
    // The faults above are counted already: wait for one more.
    let faults_before = shim.faults();
    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    let envelopes = vault::batch(&escrow, "hang", 1);
    let pending = std::thread::scope(|s| {
        let request = s.spawn(|| unwrap(&envelopes));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shim.faults() == faults_before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            shim.faults() > faults_before,
            "the derive never reached the module"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(!request.is_finished(), "a hung derive answered");
        shim.set("");
        request.join().expect("request thread")
    });
    assert_eq!(pending.status, 200, "{}", pending.text());
    assert_eq!(vault::statuses(&pending.json()), ["ok"]);
    assert_eq!(opened_leaves(&c.auditor, id), 6);

    // The budget is spent exactly: nothing went to the failed requests.
    let r = unwrap(&vault::batch(&escrow, "over", 1));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["budget_exhausted"]);
}

/// A daemon loading the module, its clients, the escrow key and a warrant
/// with a budget these tests never reach.
struct Through {
    t: TestToken,
    shim: Shim,
    daemon: Daemon,
    c: Clients,
    escrow: P256PublicKey,
    warrant: serde_json::Value,
}

impl Through {
    fn start(id: &str) -> Self {
        Self::start_with(id, 2)
    }

    /// [`Through::start`] with a pool of `sessions` HSM sessions.
    fn start_with(id: &str, sessions: usize) -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        let shim = Shim::new(&t);
        // No effective rate limit: the probability test sends 120 requests.
        t.write_config_with(
            &shim_module_path(),
            sessions,
            &format!("{}\n{}", shim.hsm_env(), softhsm_tests::faults::limits()),
        );
        vault::generate_escrow_key(&t, "E-1");
        let daemon = Daemon::start(&t);
        daemon.wait_readyz(200);
        let c = Parties::new(&pki).clients(&pki, daemon.api);
        let escrow = vault::published_key(&c.provider, "E-1");
        let warrant = vault::double_lock(&vault::claims(id, vault::recipient().public(), 100_000));
        Through {
            t,
            shim,
            daemon,
            c,
            escrow,
            warrant,
        }
    }

    /// One single-envelope unwrap: one derive, and one more if the first
    /// failed as a lost session (the daemon retries once on a new session).
    fn unwrap_one(&self, tag: &str) -> Response {
        vault::post(
            &self.c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": self.warrant, "envelopes": vault::batch(&self.escrow, tag, 1)}),
        )
    }

    fn assert_opened(&self, r: &Response, what: &str) {
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"], "{what}");
    }
}

/// A derive the token refuses for the key itself
/// (`CKR_KEY_FUNCTION_NOT_PERMITTED`: a policy outside the attributes;
/// `CKR_KEY_TYPE_INCONSISTENT`: a vendor key type the attribute check could
/// not judge) is that key's fault, not a failing token's, once a fresh
/// look-up gets the same answer: its envelopes are `open_failed` in a 200,
/// the rest of the key's envelopes are not sent to the token, the other
/// key's open, the pool does not reconnect, and nothing refused is spent.
/// One session, so that the opens run in request order.
#[test]
fn a_derive_the_token_refuses_for_its_key_denies_that_keys_envelopes_only() {
    let id = "KEY-REFUSED";
    let h = Through::start_with(id, 1);
    vault::generate_escrow_key(&h.t, "E-2");
    let e2 = vault::published_key(&h.c.provider, "E-2");
    let unwrap = |envelopes: Vec<serde_json::Value>| {
        let r = vault::post(
            &h.c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": h.warrant, "envelopes": envelopes}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        vault::statuses(&r.json())
    };
    let reconnects = h.daemon.metric(RECONNECTS);

    // Refused once, then not on the fresh look-up (a handle that named
    // another object): not the key's fault; both open.
    h.shim
        .set("fault = key_function_not_permitted\nfault_calls = C_DeriveKey\nfault_limit = 1");
    assert_eq!(unwrap(vault::batch(&h.escrow, "once", 2)), ["ok", "ok"]);
    assert_eq!(h.shim.faults(), 1);

    // Refused twice: E-1's first envelope is `open_failed`, its second is
    // not sent to the token (no third fault), and E-2's opens.
    h.shim
        .set("fault = key_function_not_permitted\nfault_calls = C_DeriveKey\nfault_limit = 2");
    let mut mixed = vault::batch(&h.escrow, "twice", 2);
    mixed.extend(vault::batch_for(&e2, "E-2", "twice-e2", 1));
    assert_eq!(unwrap(mixed), ["open_failed", "open_failed", "ok"]);
    assert_eq!(h.shim.faults(), 3);

    // Every key refused, each twice (a fresh look-up each): all
    // `open_failed`, still a 200.
    h.shim
        .set("fault = key_type_inconsistent\nfault_calls = C_DeriveKey");
    let mut both = vault::batch(&h.escrow, "all", 2);
    both.extend(vault::batch_for(&e2, "E-2", "all-e2", 2));
    assert_eq!(unwrap(both), ["open_failed"; 4]);
    assert_eq!(h.shim.faults(), 7);
    assert_eq!(
        h.daemon.metric(RECONNECTS),
        reconnects,
        "the pool reconnected as for a lost token"
    );

    // Opened, then refused in the same request (the token let the first
    // derive through): the token changed, not the key; nothing is
    // released or spent.
    h.shim
        .set("fault = key_function_not_permitted\nfault_calls = C_DeriveKey\nfault_after = 1");
    let r = vault::post(
        &h.c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": h.warrant, "envelopes": vault::batch(&h.escrow, "changed", 2)}),
    );
    r.assert_error(503, "hsm_unavailable");
    assert_eq!(
        h.shim.faults(),
        9,
        "the second envelope's derive and its retry"
    );

    h.shim.set("");
    let r = h.unwrap_one("after");
    h.assert_opened(&r, "after the refusals");
    assert_eq!(vault::spent(&h.t, id), 4, "only the four opened are spent");
}

/// A checkpoint signature whose cached audit-key handle names nothing any
/// more (`CKR_KEY_HANDLE_INVALID` at `C_SignInit`: the token's objects
/// renumbered) looks the key up again once, as an open does: the request
/// is answered 200 with its key. Before, it was 503 `spent_not_released`:
/// budget spent, nothing released, for a one-off the next call survived.
/// Twice in a row is not a stale handle: still that 503.
#[test]
fn a_stale_audit_key_handle_is_looked_up_again_once() {
    let h = Through::start("STALE-SIGN");
    let reconnects = h.daemon.metric(RECONNECTS);
    h.shim
        .set("fault = key_handle_invalid\nfault_calls = C_SignInit\nfault_limit = 1");
    let r = h.unwrap_one("stale-once");
    h.assert_opened(&r, "a stale handle, once");
    assert_eq!(h.shim.faults(), 1);

    h.shim
        .set("fault = key_handle_invalid\nfault_calls = C_SignInit\nfault_limit = 2");
    h.unwrap_one("stale-twice")
        .assert_error(503, "spent_not_released");
    assert_eq!(h.shim.faults(), 3);
    assert_eq!(
        h.daemon.metric(RECONNECTS),
        reconnects,
        "the pool reconnected as for a lost token"
    );

    h.shim.set("");
    let r = h.unwrap_one("after");
    h.assert_opened(&r, "after the stale handles");
}

#[test]
fn fault_limit_counts_the_faults_since_the_last_settings_change() {
    let h = Through::start("FAULT-LIMIT");
    // Faults before the change: four (two requests, each a derive and its
    // retry on a new session). Counted since the load, they would already
    // exceed the limits below.
    h.shim
        .set("fault = device_error\nfault_calls = C_DeriveKey");
    for i in 0..2 {
        h.unwrap_one(&format!("before-{i}"))
            .assert_error(503, "hsm_unavailable");
    }
    assert_eq!(h.shim.faults(), 4, "a derive and its retry per request");

    // fault_limit = 2: the next request's derive and its retry fail, and
    // nothing after.
    h.shim
        .set("fault = device_error\nfault_calls = C_DeriveKey\nfault_limit = 2");
    h.unwrap_one("limit-2").assert_error(503, "hsm_unavailable");
    assert_eq!(h.shim.faults(), 6);
    for i in 0..3 {
        let r = h.unwrap_one(&format!("limit-2-after-{i}"));
        h.assert_opened(&r, "after the limit");
    }
    assert_eq!(h.shim.faults(), 6, "a fault past the limit");

    // fault_limit = 1: one derive fails, the daemon reconnects and its
    // retry on a new session opens the envelope.
    let reconnects = h.daemon.metric(RECONNECTS);
    h.shim
        .set("fault = device_error\nfault_calls = C_DeriveKey\nfault_limit = 1");
    let r = h.unwrap_one("limit-1");
    h.assert_opened(&r, "the retry after one fault");
    assert_eq!(h.shim.faults(), 7);
    assert_eq!(h.daemon.metric(RECONNECTS), reconnects + 1.0);
    let r = h.unwrap_one("limit-1-after");
    h.assert_opened(&r, "after the limit");
    assert_eq!(h.shim.faults(), 7, "a fault past the limit");
}

#[test]
fn fault_probability_fails_about_that_share_of_the_matching_calls() {
    let h = Through::start("FAULT-PROBABILITY");
    let derives = |h: &Through| h.daemon.metric(DERIVES_OK);

    // 0: none fails.
    h.shim
        .set("fault = device_error\nfault_calls = C_DeriveKey\nfault_probability = 0");
    for i in 0..20 {
        let r = h.unwrap_one(&format!("never-{i}"));
        h.assert_opened(&r, "probability 0");
    }
    assert_eq!(h.shim.faults(), 0);

    // 0.5: a request's derive fails with probability 1/2, and so does its
    // retry; the request fails only when both do. The matching calls are
    // one per request plus one per failed first derive, so
    // calls = requests + faults - refused requests.
    h.shim
        .set("fault = device_error\nfault_calls = C_DeriveKey\nfault_probability = 0.5");
    let requests = 100;
    let before = derives(&h);
    let mut refused = 0u64;
    for i in 0..requests {
        let r = h.unwrap_one(&format!("half-{i}"));
        if r.status == 503 {
            r.assert_error(503, "hsm_unavailable");
            refused += 1;
        } else {
            h.assert_opened(&r, "probability 0.5");
        }
    }
    let faults = h.shim.faults();
    assert_eq!(
        derives(&h) - before,
        (requests - refused) as f64,
        "one successful derive per opened envelope"
    );
    let calls = requests + faults - refused;
    let share = faults as f64 / calls as f64;
    println!(
        "probability 0.5: {faults} faults in {calls} matching calls, {refused} requests refused"
    );
    // About 150 calls: 0.35-0.65 is more than 3.5 standard deviations
    // either side.
    assert!(
        (0.35..=0.65).contains(&share),
        "{faults} faults in {calls} matching calls"
    );
    assert!(
        refused > 0 && refused < requests / 2,
        "{refused} requests refused"
    );
}

#[test]
fn a_settings_file_the_module_cannot_take_is_refused_and_every_call_fails() {
    let h = Through::start("FAULT-SETTINGS");
    let bad = [
        (
            "fault = device_error\nfault_calls = C_DeriveKey\nfault_probability = 50%",
            "fault_probability = `50%`: not a number from 0 to 1",
        ),
        (
            "fault = device_error\nfault_calls = C_DeriveKey\nfault_probability = 1.5",
            "fault_probability = `1.5`: not a number from 0 to 1",
        ),
        (
            "fault = device_error\nfault_calls = C_DeriveKy",
            "fault_calls: `C_DeriveKy` is not a function this module forwards",
        ),
        (
            "fault = device_error\nfault_calls = C_Initialize",
            "fault_calls: `C_Initialize` is not a function this module forwards",
        ),
        (
            "fault = device_error\nfault_calls = C_DeriveKey\nfault_after = -1",
            "fault_after = `-1`: not a whole number",
        ),
        (
            "fault = device_error\nfault_calls = C_DeriveKey\nfault_limit = 2x",
            "fault_limit = `2x`: not a whole number",
        ),
        (
            "delay_us = 1ms",
            "delay_us = `1ms`: not a whole number of microseconds",
        ),
        (
            "keypair_private = CKA_SIGN:true",
            "keypair_private: `CKA_SIGN` is not CKA_TOKEN, CKA_PRIVATE or CKA_SIGN_RECOVER",
        ),
        (
            "keypair_private = CKA_TOKEN:yes",
            "keypair_private: CKA_TOKEN:`yes` is not true or false",
        ),
        (
            "keypair_public = CKA_TOKEN:true, CKA_TOKEN:false",
            "keypair_public: CKA_TOKEN named twice",
        ),
        (
            "keypair_public = CKA_TOKEN:false\nkeypair_public =",
            "keypair_public: given twice",
        ),
    ];
    for (n, (settings, why)) in (1..).zip(bad) {
        h.shim.set(settings);
        h.unwrap_one(&format!("bad-{n}"))
            .assert_error(503, "hsm_unavailable");
        h.daemon.wait_readyz(503);
        assert_eq!(h.shim.refused(), n, "{settings}");
        assert_eq!(h.shim.faults(), 0, "{settings}: a fault was injected");
        let stderr = h.daemon.stderr();
        assert!(
            stderr.contains("lavd-pkcs11-shim: ") && stderr.contains(why),
            "{settings}: no `{why}` in\n{stderr}"
        );
        // A good file: the same daemon serves again.
        h.shim.set("");
        h.daemon.wait_readyz(200);
        let r = h.unwrap_one(&format!("good-{n}"));
        h.assert_opened(&r, settings);
    }
}

/// A call held by `hang` for a test that can no longer release it (it
/// failed first, and its directory went) is not held for ever: once the
/// settings file is gone it fails with `CKR_DEVICE_ERROR`, and the daemon's
/// stuck call returns. (Or after 120 s, whatever the file says.)
#[test]
fn a_held_call_fails_once_its_settings_file_is_gone() {
    let th = Through::start("FAULTS-GONE");
    th.shim.set("fault = hang\nfault_calls = C_DeriveKey");
    // The daemon gives up at the call deadline; the call stays held.
    th.unwrap_one("held").assert_error(503, "hsm_unavailable");
    assert_eq!(th.daemon.metric("lavd_hsm_calls_stuck"), 1.0);
    th.shim.remove();
    assert_eq!(th.daemon.wait_metric("lavd_hsm_calls_stuck", 0.0), 0.0);
}

/// The pid of the `lavd serve` or `lavd witness serve` process running with
/// `config`, found in `/proc` (the harness hands out its `Daemon` only once
/// it is ready).
fn serve_pid(config: &std::path::Path) -> Option<i32> {
    let wanted = config.to_str()?;
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        (args.contains(&b"serve".as_slice()) && args.contains(&wanted.as_bytes())).then_some(pid)
    })
}

/// Starts a daemon through `start` while `shim` holds its HSM login, sends
/// it SIGHUP inside the hung login (a certificate renewal's `kill -HUP`),
/// then lets the login go: the daemon must start and serve.
fn start_through_a_sighup_in_a_hung_login(
    shim: &Shim,
    config: &std::path::Path,
    start: impl FnOnce() -> Result<Daemon, (Option<std::process::ExitStatus>, String)>,
) -> Daemon {
    shim.set("fault = hang\nfault_calls = C_Login\n");
    let (started, signalled) = std::thread::scope(|s| {
        let hup = s.spawn(|| {
            // Inside the hung login (the module counts a hang once it
            // holds the call; none before: the token's set-up made none).
            shim.wait_for_faults(1);
            let signalled = serve_pid(config)
                .and_then(rustix::process::Pid::from_raw)
                .map(|pid| rustix::process::kill_process(pid, rustix::process::Signal::HUP));
            std::thread::sleep(Duration::from_secs(1));
            // Released whatever happened, so that the start does not wait
            // out the module's own 120 s.
            shim.set("");
            signalled
        });
        let started = start();
        (started, hup.join().unwrap())
    });
    assert!(
        matches!(signalled, Some(Ok(()))),
        "no serve process was sent SIGHUP: {signalled:?}"
    );
    let daemon = started
        .unwrap_or_else(|(status, stderr)| panic!("it did not start ({status:?}):\n{stderr}"));
    daemon.wait_readyz(200);
    daemon
}

/// A SIGHUP during a slow start (here while the HSM's login hangs) does
/// not end `lavd serve`: its default action did, and every restart logged
/// in again.
#[test]
fn a_sighup_during_start_up_does_not_kill_the_daemon() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_with_module(
        &shim_module_path(),
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    softhsm_tests::server::make_audit_key(&t);
    let config = t.config();
    start_through_a_sighup_in_a_hung_login(&shim, &config, || Daemon::try_start(&t));
}

/// Nor `lavd witness serve`, which logs in to its HSM for its key.
#[test]
fn a_sighup_during_start_up_does_not_kill_the_witness() {
    let log = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let log_vkey =
        lavd::audit::note::verifier_key("log.test/hup", log.verifying_key().as_bytes()).unwrap();
    let mut w =
        softhsm_tests::witness::Witness::start("witness.test/hup", "log.test/hup", &log_vkey, "");
    w.daemon.signal(rustix::process::Signal::TERM);
    assert!(w.daemon.wait_exit(Duration::from_secs(30)).success());
    // The same witness, through the fault module.
    let shim = Shim::new(&w.t);
    let config = std::fs::read_to_string(&w.config).unwrap();
    let module = format!(
        "module = {:?}",
        softhsm_tests::module_path().display().to_string()
    );
    assert!(config.contains(&module), "{config}");
    let through = config.replacen(
        &module,
        &format!("module = {:?}", shim_module_path().display().to_string()),
        1,
    );
    std::fs::write(&w.config, format!("{through}\n{}", shim.hsm_env())).unwrap();
    w.daemon = start_through_a_sighup_in_a_hung_login(&shim, &w.config, || {
        Daemon::try_start_witness(&w.t, &w.config, "witness")
    });
}
