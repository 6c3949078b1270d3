//! Who may sign warrants is itself audited: `lavd serve` writes an
//! `authorities_loaded` leaf when it starts, a SIGHUP that leaves the
//! authorities and policy unchanged writes none, and a SIGHUP that changes
//! them writes a new one before the new rules apply. Here the policy is
//! loosened to accept one executive signature: a warrant refused before the
//! reload is accepted after it, and the log shows when and why.

mod trust_reload_common;

use rustix::process::Signal;
use softhsm_tests::server::{authorities, serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{shim_module_path, Shim, TestToken};
use time::OffsetDateTime;
use trust_reload_common::*;

#[test]
fn trust_changes_are_logged_before_they_apply() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);

    let first = loaded(&c.auditor);
    assert_eq!(first.len(), 1, "{first:?}");
    let kids: Vec<&str> = first[0]["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["executive-1", "judicial-1"]);
    assert_eq!(first[0]["policy"]["require"]["judicial"], 1);

    // Unchanged configuration: no new leaf.
    reload(&daemon);
    assert_eq!(loaded(&c.auditor).len(), 1);

    // A one-signature warrant is refused under the double lock...
    let body = one_signature_request(&c, "W-ONE");
    vault::post(&c.agency, "/v1/unwrap", &body).assert_error(403, "policy_not_met");

    // ...until the policy is changed to need only an executive.
    loosen_policy(&t);
    reload(&daemon);
    let after = loaded(&c.auditor);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after[1]["policy"]["require"].get("judicial").is_none(),
        "{}",
        after[1]
    );
    assert_ne!(after[0]["config_digest"], after[1]["config_digest"]);
    let r = vault::post(&c.agency, "/v1/unwrap", &body);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());

    // The change is in the log before the unwrap it allowed.
    let size = vault::tree_size(&c.auditor);
    let events: Vec<String> = vault::entries(&c.auditor, 0, size)
        .into_iter()
        .map(|e| e.leaf["event"].as_str().unwrap().to_string())
        .collect();
    let change = events
        .iter()
        .rposition(|e| e == "authorities_loaded")
        .unwrap();
    let opened = events.iter().rposition(|e| e == "unwrap").unwrap();
    assert!(change < opened, "{events:?}");
}

/// Fails closed: when the `authorities_loaded` leaf of a trust change cannot
/// be written (here the store is write-locked by another process for longer
/// than the daemon's busy timeout), the reload fails and the old policy stays
/// in force; a later SIGHUP, with the store back, applies it. Meanwhile the
/// reload runs on a thread of its own, and the API keeps answering.
#[test]
fn a_trust_change_whose_leaf_cannot_be_written_does_not_apply() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    assert_eq!(loaded(&c.auditor).len(), 1);

    let body = one_signature_request(&c, "W-LOCKED");

    loosen_policy(&t);

    // Another writer holds the store's write lock.
    let blocker = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let sent = std::time::Instant::now();
    daemon.signal(Signal::HUP);
    daemon.expect_notify("RELOADING=1");
    // The reload waits for the lock; requests that need no store are
    // answered meanwhile (the store's one connection is held by the waiting
    // writer, so store reads wait too).
    c.provider
        .get("/v1/no-such-route")
        .assert_error(404, "not_found");
    assert_eq!(daemon.admin_get("/healthz").status, 200);
    if let Some(m) = daemon.recv_notify(std::time::Duration::from_millis(100)) {
        panic!(
            "the reload should still be waiting for the store, got {m:?} after {:?}",
            sent.elapsed()
        );
    }
    daemon.expect_notify("READY=1");
    assert!(
        sent.elapsed() >= std::time::Duration::from_secs(5),
        "the reload did not wait for the store: {:?}",
        sent.elapsed()
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);

    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"failed\"}", 1.0),
        1.0
    );
    assert!(
        daemon
            .stderr()
            .contains("not applied: its audit record could not be written"),
        "{}",
        daemon.stderr()
    );
    assert_eq!(loaded(&c.auditor).len(), 1);
    vault::post(&c.agency, "/v1/unwrap", &body).assert_error(403, "policy_not_met");

    // With the store back, the same file applies, logged first.
    reload(&daemon);
    let after = loaded(&c.auditor);
    assert_eq!(after.len(), 2, "{after:?}");
    let r = vault::post(&c.agency, "/v1/unwrap", &body);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
}

/// The other failure after the leaf: it is committed, but the HSM cannot
/// sign the checkpoint (through the fault module, `C_Sign` failing). The
/// log then says the new policy, so the new policy applies: the log must
/// never record one trust while the daemon enforces another.
#[test]
fn a_trust_change_whose_leaf_is_written_applies_though_its_checkpoint_is_not() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    let serve = format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml()));
    t.write_config_with_module(&softhsm_tests::shim_module_path(), &serve);
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    assert_eq!(loaded(&c.auditor).len(), 1);

    let body = one_signature_request(&c, "W-UNSIGNED");
    vault::post(&c.agency, "/v1/unwrap", &body).assert_error(403, "policy_not_met");

    loosen_policy(&t);
    shim.set("fault = device_error\nfault_calls = C_Sign");
    reload(&daemon);
    assert!(shim.faults() > 0, "the checkpoint was signed after all");
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"ok\"}", 1.0),
        1.0
    );
    shim.set("");
    let after = loaded(&c.auditor);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after[1]["policy"]["require"].get("judicial").is_none());
    let r = vault::post(&c.agency, "/v1/unwrap", &body);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
}

/// A daemon on `t` through the fault module (logging at `level`, with
/// `hsm` lines added to `[hsm]`),
/// draining (SIGTERM) with a request whose body has not all come, which
/// keeps the drain going, and a trust change's reload (SIGHUP) held by the
/// module in its checkpoint's signature. Returns the daemon, the module and
/// that request's connection.
fn draining_with_a_held_reload(
    t: &TestToken,
    level: &str,
    hsm: &str,
) -> (Daemon, Shim, softhsm_tests::server::TlsConn) {
    let pki = Pki::new(t);
    let shim = Shim::new(t);
    let serve = format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml()));
    t.write_config_hsm(&shim_module_path(), 2, hsm, &serve);
    vault::generate_escrow_key(t, "E-1");
    let daemon = Daemon::start_logging(t, level);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let mut slow = c.agency.connect().unwrap();
    slow.send(
        b"POST /v1/warrants/revocations HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/json\r\ncontent-length: 10\r\n\r\n{\"a\":",
    )
    .unwrap();
    // Read, its body's 10 bytes held: a request in flight to drain.
    softhsm_tests::eventually(
        "the slow head read",
        std::time::Duration::from_secs(10),
        || daemon.metric("lavd_request_body_bytes_held") == 10.0,
    );

    loosen_policy(t);
    shim.set("fault = hang\nfault_calls = C_Sign");
    daemon.signal(Signal::TERM);
    daemon.expect_notify("STOPPING=1");
    daemon.signal(Signal::HUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while shim.faults() == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.stderr());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (daemon, shim, slow)
}

/// Reloads still running or queued when the drain ends (its last
/// connection closed) are waited for: each leaf written and each outcome
/// logged before the process exits. Here a trust change's checkpoint
/// signature is held by the fault module while a second SIGHUP queues
/// another reload and the last connection closes. Before, the second
/// SIGHUP's wait for the first ran inside the drain's deadline future, and
/// both were dropped with it, unsaid.
#[test]
fn a_reload_still_running_when_the_drain_ends_is_waited_for() {
    let t = TestToken::new();
    // At `info`: a reload's outcome is said there.
    let (mut daemon, shim, slow) = draining_with_a_held_reload(&t, "info", "");
    // While the reload is held, another is asked for...
    daemon.signal(Signal::HUP);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // ...and the last connection closes: the drain is over, and the
    // daemon waits for the reloads.
    drop(slow);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !daemon
        .stderr()
        .contains("drained; waiting for the reload in progress")
    {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.stderr());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    shim.set("");
    let status = daemon.wait_exit(std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert_eq!(
        daemon.stderr().matches("configuration reloaded").count(),
        2,
        "{}",
        daemon.stderr()
    );
}

/// A second stop signal while the drain waits cuts it short, and the
/// reload still running is not waited for, which is said (before, it was
/// waited for until yet another signal). Its thread cannot be stopped: the
/// store stays consistent, as after a SIGKILL.
#[test]
fn a_second_stop_signal_does_not_wait_for_a_reload() {
    let t = TestToken::new();
    // The HSM's call deadline far off: only the daemon's not waiting lets
    // it exit while the reload is held.
    let (mut daemon, shim, slow) =
        draining_with_a_held_reload(&t, "warn", "call_timeout_ms = 60000");
    daemon.signal(Signal::INT);
    // Held all the while (the process's own wait for HSM calls at exit
    // gives up after 5 s).
    let status = daemon.wait_exit(std::time::Duration::from_secs(30));
    shim.set("");
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert!(
        daemon
            .stderr()
            .contains("not waiting for the reload in progress"),
        "{}",
        daemon.stderr()
    );
    drop(slow);
}

/// One configuration decides a request. A request is admitted when its head
/// arrives, but its body may take a while; a SIGHUP meanwhile that both
/// takes the agency's role away and loosens the policy to one signature
/// must not let through a one-signature warrant from that agency, which
/// neither the old configuration (double lock) nor the new (no agency)
/// allows: the caller is admitted again under the new one. Before, the
/// caller was judged under the old configuration and the warrant under the
/// new, and the envelope opened.
#[test]
fn a_reload_while_the_body_is_read_applies_to_the_whole_request() {
    let v = vault::Vault::start("");
    let (t, daemon) = (&v.t, &v.daemon);
    let c = v.parties.clients(&v.pki, daemon.api);
    let body = one_signature_request(&c, "W-MIXED").to_string();
    let (head_part, rest) = body.as_bytes().split_at(body.len() / 2);

    let mut conn = c.agency.connect().unwrap();
    conn.send(
        format!(
            "POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    conn.send(head_part).unwrap();
    // Admitted under the old configuration by now (the daemon answers the
    // head at once; the wait only makes the old code's failure certain).
    std::thread::sleep(std::time::Duration::from_millis(500));

    loosen_policy(t);
    take_the_agency_role(t);
    reload(daemon);

    conn.send(rest).unwrap();
    conn.read_response().unwrap().assert_error(403, "forbidden");
    // Nothing was opened or spent: no unwrap leaf at all.
    let size = vault::tree_size(&c.auditor);
    assert!(vault::entries(&c.auditor, 0, size)
        .iter()
        .all(|e| e.leaf["event"] != "unwrap"));
}

/// `[limits]` applies only after a restart, so a reloaded policy is held to
/// the signature bound that runs: a policy needing two signatures, under a
/// running bound of one, is refused (the old policy stays). Before, the
/// new file's own bound was checked, the reload succeeded, and every
/// warrant was then refused `warrant_too_large`.
#[test]
fn a_reloaded_policy_is_held_to_the_running_signature_bound() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let config = |bound: u32| {
        serve_config(&format!(
            "{}[limits]\nmax_warrant_signatures = {bound}\n",
            vault::roles_toml()
        ))
    };
    t.write_config(&config(1));
    loosen_policy(&t);
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let body = one_signature_request(&c, "W-BOUND");

    t.write_config(&config(2));
    reload(&daemon);
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"failed\"}", 1.0),
        1.0
    );
    assert!(
        daemon
            .stderr()
            .contains("above the running limits.max_warrant_signatures 1"),
        "{}",
        daemon.stderr()
    );
    // The running policy (one executive signature) still applies.
    let r = vault::post(&c.agency, "/v1/unwrap", &body);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
}

/// A request that waits for its turn at the envelope gate starts its work
/// when it gets the turn: a reload that applied meanwhile decides it, and
/// its caller is admitted again under that reload first. Here the reload
/// both loosened the policy (so the one-signature warrant would pass) and
/// took the caller's agency role away: the request is refused `forbidden`
/// and logs nothing. Before, it ran under the configuration it was
/// admitted under, however long it had waited.
#[test]
fn a_reload_while_a_request_waits_at_the_gate_decides_it() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_with(
        &shim_module_path(),
        2,
        &format!(
            "{}\n{}",
            shim.hsm_env(),
            serve_config(&format!(
                "{}[limits]\nmax_envelopes_in_flight = 1\n",
                vault::roles_toml()
            ))
        ),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let holder = serde_json::json!({
        "warrant": vault::double_lock(&vault::claims("W-HOLDER", vault::recipient().public(), 5)),
        "envelopes": [vault::seal(
            &escrow, "E-1", TARGET, OffsetDateTime::now_utc() - time::Duration::hours(1), "h", &[8; 32],
        )],
    });
    let waiting = one_signature_request(&c, "W-WAITING");

    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    let (held, queued) = std::thread::scope(|s| {
        let held = s.spawn(|| vault::post(&c.agency, "/v1/unwrap", &holder));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shim.faults() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            shim.faults() > 0,
            "the holder's derive never reached the module"
        );
        // The gate (one envelope) is held: this one waits for its turn,
        // admitted under the configuration in force now.
        let queued = s.spawn(|| vault::post(&c.agency, "/v1/unwrap", &waiting));
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(!queued.is_finished(), "the second request did not wait");

        loosen_policy(&t);
        take_the_agency_role(&t);
        reload(&daemon);
        shim.set("");
        (held.join().unwrap(), queued.join().unwrap())
    });
    // The holder was past the gate, in its HSM open: the reload reaches it
    // before its audit commit (`a_reload_while_the_hsm_opens_decides_it`,
    // below), and it is refused too, its leaf written.
    held.assert_error(403, "forbidden");
    queued.assert_error(403, "forbidden");
    let size = vault::tree_size(&c.auditor);
    let entries = vault::entries(&c.auditor, 0, size);
    assert!(
        entries.iter().all(|e| e.leaf["warrant_id"] != "W-WAITING"),
        "the withdrawn request logged something"
    );
    // The holder's open is logged, denied for the reload, and unspent.
    let holder: Vec<&serde_json::Value> = entries
        .iter()
        .map(|e| &e.leaf)
        .filter(|l| l["warrant_id"] == "W-HOLDER")
        .collect();
    assert_eq!(holder.len(), 1, "{holder:?}");
    assert_eq!(holder[0]["outcome"], "denied", "{}", holder[0]);
    assert_eq!(
        holder[0]["reason"], "configuration_changed",
        "{}",
        holder[0]
    );
    assert_eq!(vault::spent(&t, "W-HOLDER"), 0);
}

/// A reload that applies while an unwrap's HSM opens run reaches it before
/// its audit commit, as one at the gate does. Here the reload removes the
/// judicial authority that signed the warrant (and the policy's need of
/// one): the request is refused whole, as one arriving now would be (403
/// `unknown_authority`). The HSM did open, so its leaf is written, denied
/// `configuration_changed`, after the `authorities_loaded` leaf that says
/// the signer is gone; nothing is spent, and no `opened` leaf of the
/// warrant follows that leaf. Before, it released the key under the trust
/// it was admitted under, its `opened` leaf after the one saying the
/// signer was gone. The same warrant sent again is refused the same way.
#[test]
fn a_reload_while_the_hsm_opens_decides_it() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_with(
        &shim_module_path(),
        2,
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let id = "W-IN-FLIGHT";
    let body = serde_json::json!({
        "warrant": vault::double_lock(&vault::claims(id, vault::recipient().public(), 5)),
        "envelopes": [vault::seal(
            &escrow, "E-1", TARGET, OffsetDateTime::now_utc() - time::Duration::hours(1), "m", &[9; 32],
        )],
    });

    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    let held = std::thread::scope(|s| {
        let held = s.spawn(|| vault::post(&c.agency, "/v1/unwrap", &body));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shim.faults() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(shim.faults() > 0, "the derive never reached the module");
        remove_the_judicial_authority(&t);
        reload(&daemon);
        assert!(!held.is_finished(), "the unwrap answered while held");
        shim.set("");
        held.join().unwrap()
    });
    held.assert_error(403, "unknown_authority");

    let size = vault::tree_size(&c.auditor);
    let entries = vault::entries(&c.auditor, 0, size);
    let change = entries
        .iter()
        .rposition(|e| e.leaf["event"] == "authorities_loaded")
        .unwrap();
    let kids: Vec<&str> = entries[change].leaf["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["executive-1"]);
    let mine: Vec<(usize, &serde_json::Value)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.leaf["warrant_id"] == id)
        .map(|(i, e)| (i, &e.leaf))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let (at, leaf) = mine[0];
    assert!(at > change, "{at} {change}");
    assert_eq!(leaf["outcome"], "denied", "{leaf}");
    assert_eq!(leaf["reason"], "configuration_changed", "{leaf}");
    assert_eq!(vault::spent(&t, id), 0);
    // Sent again, it is refused before any work.
    vault::post(&c.agency, "/v1/unwrap", &body).assert_error(403, "unknown_authority");
    assert_eq!(
        vault::tree_size(&c.auditor),
        size + 1,
        "a refusal leaf only"
    );
}

/// The leaves in the store file, read directly (a checkpoint, which the
/// API would sign first, cannot be had while `C_Sign` is held).
fn stored_leaves(t: &TestToken) -> u64 {
    rusqlite::Connection::open(t.path("lavd.db"))
        .expect("open the store")
        .query_row("SELECT COUNT(*) FROM audit_leaves", [], |row| row.get(0))
        .expect("count the leaves")
}

/// A revocation is judged under the configuration in force when its work
/// starts, not under the one it was admitted under. Every revocation
/// thread (`OWN_THREADS`, 16) is taken by an admin's revocation whose leaf
/// has committed and whose checkpoint's `C_Sign` is held: past their
/// commit, they no longer hold the reload's fence, so a reload does not
/// wait for their signatures (it logs no wait). Three revocations arrive and
/// wait for a thread: one signed by the judicial authority, delivered by
/// the agency; the admin's own; one signed by the executive, delivered by
/// the provider. A reload removes the judicial authority, gives the
/// admin's identity the auditor role in place of admin's, and takes the
/// provider's role away. Once the 16 are released, the three run under
/// the new configuration: 403 `unknown_authority`, `forbidden` (the admin
/// form needs the admin role, not any role) and `forbidden` (an
/// authority's form needs some role), none with a leaf. Before, each was
/// judged under the configuration it was admitted under and committed
/// after the reload's `authorities_loaded` leaf.
///
/// The new configuration applies as the reload's leaf commits (the test
/// reads the leaf from the store file), before the release.
#[test]
fn a_revocation_waiting_for_a_thread_is_judged_under_the_trust_in_force_when_it_runs() {
    const HELD: usize = lavd::api::routes::OWN_THREADS;
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_hsm(
        &shim_module_path(),
        2,
        "call_timeout_ms = 60000\n",
        &format!(
            "{}\n{}\n[limits]\nrate_limit_per_second = 1000.0\nrate_limit_burst = 1000\n",
            shim.hsm_env(),
            serve_config(&vault::roles_toml())
        ),
    );
    let daemon = Daemon::start_logging(&t, "info");
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let before = stored_leaves(&t);
    let waits = "wait for the unwraps and revocations in their audit commit";
    // Before the reload the admin's identity is no auditor.
    c.admin
        .request("GET", "/v1/audit/key", None)
        .unwrap()
        .assert_error(403, "forbidden");

    let a = authorities();
    let late_bodies = [
        (
            &c.agency,
            serde_json::json!({"revocation": a.revocation("W-LATE-1", "quashed")}),
        ),
        (
            &c.admin,
            serde_json::json!({"id": "W-LATE-2", "reason": "quashed"}),
        ),
        (
            &c.provider,
            serde_json::json!({"revocation": a.revocation_by(&a.executive, "W-LATE-3", "quashed")}),
        ),
    ];
    shim.set("fault = hang\nfault_calls = C_Sign");
    let (held, late) = std::thread::scope(|s| {
        let _release = shim.releasing();
        let held: Vec<_> = (0..HELD)
            .map(|i| {
                let admin = &c.admin;
                s.spawn(move || {
                    vault::post(
                        admin,
                        "/v1/warrants/revocations",
                        &serde_json::json!({"id": format!("W-HELD-{i}"), "reason": "quashed"}),
                    )
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while stored_leaves(&t) < before + HELD as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {HELD} held revocations committed",
                stored_leaves(&t) - before
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Every thread is taken. Each late revocation's body is read (and
        // counted) before it waits for one.
        let bodies = "lavd_request_body_bytes_held";
        let mut late = Vec::new();
        for (client, body) in &late_bodies {
            let held_bytes = daemon.metric(bodies);
            late.push(s.spawn(move || vault::post(client, "/v1/warrants/revocations", body)));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while daemon.metric(bodies) <= held_bytes {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a late revocation's body was never held"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        assert!(
            late.iter().all(|l| !l.is_finished()),
            "answered without a thread"
        );
        remove_the_judicial_authority(&t);
        let config = std::fs::read_to_string(t.config()).unwrap();
        let admin_role = format!("\"{}\" = [\"admin\"]\n", vault::ADMIN);
        let provider_role = format!("\"{}\" = [\"provider\"]\n", vault::PROVIDER);
        assert!(
            config.contains(&admin_role) && config.contains(&provider_role),
            "{config}"
        );
        std::fs::write(
            t.config(),
            config
                .replace(
                    &admin_role,
                    &format!("\"{}\" = [\"auditor\"]\n", vault::ADMIN),
                )
                .replace(&provider_role, ""),
        )
        .unwrap();
        daemon.signal(Signal::HUP);
        daemon.expect_notify("RELOADING=1");
        // The held revocations are past their commit, so the reload does
        // not wait for them: its leaf commits, and the new configuration
        // applies as it does (its checkpoint's `C_Sign` is held too).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while stored_leaves(&t) < before + HELD as u64 + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the reload's leaf never committed:\n{}",
                daemon.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!daemon.stderr().contains(waits), "{}", daemon.stderr());
        // Applied, while the reload's own signature is still held: the
        // admin's identity now holds the auditor role.
        let key = c.admin.request("GET", "/v1/audit/key", None).unwrap();
        assert_eq!(key.status, 200, "{}", key.text());
        shim.set("");
        let held: Vec<_> = held.into_iter().map(|h| h.join().unwrap()).collect();
        let late: Vec<_> = late.into_iter().map(|l| l.join().unwrap()).collect();
        (held, late)
    });
    daemon.expect_notify("READY=1");
    for r in &held {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    late[0].assert_error(403, "unknown_authority");
    let message = late[1].assert_error(403, "forbidden");
    assert!(message.contains("admin"), "{message}");
    late[2].assert_error(403, "forbidden");

    let size = vault::tree_size(&c.auditor);
    let entries = vault::entries(&c.auditor, 0, size);
    let change = entries
        .iter()
        .rposition(|e| e.leaf["event"] == "authorities_loaded")
        .unwrap();
    let revocations: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.leaf["event"] == "revocation")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(revocations.len(), HELD, "the late ones wrote no leaf");
    assert!(
        revocations.iter().all(|&i| i < change),
        "{revocations:?} {change}"
    );
}
