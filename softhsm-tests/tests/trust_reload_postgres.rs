//! Trust reloads on PostgreSQL, where a COMMIT's answer can be lost: a
//! trust change whose `authorities_loaded` leaf may or may not be durable
//! keeps the running trust and logs it again after that leaf (or, the
//! store staying away, ends the process), and a revocation in its commit
//! holds a trust reload back. (The SQLite ones are in
//! `serve_trust_reload.rs`; a test process has room for 12 tokens.)

mod trust_reload_common;

use rustix::process::Signal;
use softhsm_tests::pg::{CutAtCommit, TestDb};
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties};
use softhsm_tests::TestToken;
use trust_reload_common::*;

/// A daemon on a fresh database through a [`CutAtCommit`], a
/// one-signature request refused under the double lock, then the policy
/// loosened and a SIGHUP sent whose `authorities_loaded` COMMIT the proxy
/// cuts just after sending it, going dark. Fields drop in order: the
/// daemon before its token.
struct Cut {
    daemon: Daemon,
    parties: Parties,
    proxy: CutAtCommit,
    db: TestDb,
    pki: Pki,
    t: TestToken,
    /// The request, for warrant `id`.
    body: serde_json::Value,
    /// The leaves stored before the SIGHUP.
    stored: i64,
}

/// Returns once the reload says it cannot log the running trust again
/// yet (it retries).
fn waiting_to_relog(daemon: &Daemon) {
    softhsm_tests::eventually(
        "the reload waiting to log the running trust",
        std::time::Duration::from_secs(20),
        || {
            daemon
                .stderr()
                .contains("the running authorities cannot be logged again yet")
        },
    );
}

fn reload_with_its_commit_cut(id: &str) -> Cut {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let db = TestDb::create();
    let proxy = CutAtCommit::start(softhsm_tests::pg::port());
    db.write_token_config_via(&t, proxy.port(), &serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let first = loaded(&c.auditor);
    assert_eq!(first.len(), 1, "{first:?}");
    let body = one_signature_request(&c, id);
    vault::post(&c.agency, "/v1/unwrap", &body).assert_error(403, "policy_not_met");
    let stored = db.rows("audit_leaves");
    loosen_policy(&t);
    proxy.arm_after(b"authorities_loaded", true);
    daemon.signal(Signal::HUP);
    daemon.expect_notify("RELOADING=1");
    Cut {
        daemon,
        parties,
        proxy,
        db,
        pki,
        t,
        body,
        stored,
    }
}

/// A trust change's leaf whose COMMIT's fate the daemon cannot learn: on
/// PostgreSQL, the connection cut just after the COMMIT was sent (the
/// server commits it) and no connection to be had to ask what became of it
/// (a [`CutAtCommit`] gone dark). The reload fails and the double lock
/// stays in force, though the log now says the loosened policy: so the
/// running trust is logged again after it, the reload holding back every
/// unwrap and revocation at its commit until the store takes that leaf (a
/// revocation sent meanwhile commits after it); the log's last word is the
/// trust in force. A reload once the store is back applies, logged after
/// both. Before, the log ended saying the loosened policy while the daemon
/// enforced the double lock.
#[test]
fn postgres_a_trust_change_whose_commit_fate_is_unknown_logs_the_running_trust_again() {
    let Cut {
        daemon,
        parties,
        proxy,
        db,
        pki,
        t: _t,
        body,
        stored,
    } = reload_with_its_commit_cut("W-FATE");
    let c = parties.clients(&pki, daemon.api);
    waiting_to_relog(&daemon);
    assert_eq!(proxy.cuts(), 1, "the proxy never saw the leaf's COMMIT");
    // The server did commit it: the log says the loosened policy.
    assert_eq!(db.rows("audit_leaves"), stored + 1);
    let revoked = std::thread::scope(|s| {
        let revoked = s.spawn(|| {
            vault::post(
                &c.admin,
                "/v1/warrants/revocations",
                &serde_json::json!({"id": "W-MEANWHILE", "reason": "quashed"}),
            )
        });
        // Neither the reload nor the revocation is over while the store is
        // away.
        if let Some(m) = daemon.recv_notify(std::time::Duration::from_secs(1)) {
            panic!("the reload ended while the store was away: {m:?}");
        }
        assert!(!revoked.is_finished(), "the revocation answered");
        proxy.light();
        daemon.expect_notify("READY=1");
        revoked.join().unwrap()
    });
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"failed\"}", 1.0),
        1.0
    );
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("whether its audit record was written is unknown")
            && stderr.contains("the running authorities were logged again after it"),
        "{stderr}"
    );
    let size = vault::tree_size(&c.auditor);
    let entries = vault::entries(&c.auditor, 0, size);
    let at = |event: &str| -> Vec<usize> {
        entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.leaf["event"] == event)
            .map(|(i, _)| i)
            .collect()
    };
    let trusts = at("authorities_loaded");
    assert_eq!(trusts.len(), 3, "{entries:?}");
    let [started, changed, again] = [trusts[0], trusts[1], trusts[2]].map(|i| &entries[i].leaf);
    assert!(
        changed["policy"]["require"].get("judicial").is_none(),
        "{changed}"
    );
    assert_eq!(again["config_digest"], started["config_digest"], "{again}");
    assert_eq!(again["policy"]["require"]["judicial"], 1, "{again}");
    assert!(
        at("revocation").iter().all(|&r| r > trusts[2]),
        "{entries:?}"
    );
    vault::post(&c.agency, "/v1/unwrap", &body).assert_error(403, "policy_not_met");

    // With the store back, the same file applies, logged after both.
    reload(&daemon);
    let last = loaded(&c.auditor);
    assert_eq!(last.len(), 4, "{last:?}");
    assert_eq!(last[3]["config_digest"], changed["config_digest"]);
    let r = vault::post(&c.agency, "/v1/unwrap", &body);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
}

/// The same, the store staying away: after `RELOG_WITHIN` of tries the
/// daemon exits 75, with unwraps and revocations still held (nothing they
/// did commits under a trust the log may not say). Its next start, the
/// store back, logs the trust its configuration names (the loosened one),
/// so the log and the daemon agree again.
#[test]
fn postgres_a_trust_change_whose_fate_stays_unknown_ends_the_process() {
    let Cut {
        mut daemon,
        parties,
        proxy,
        db: _db,
        pki,
        t,
        body,
        ..
    } = reload_with_its_commit_cut("W-STAYS-UNKNOWN");
    let status =
        daemon.wait_exit(lavd::api::state::RELOG_WITHIN + std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(75), "{}", daemon.stderr());
    let stderr = daemon.stderr();
    assert!(
        stderr.contains("the running authorities cannot be logged again yet")
            && stderr.contains("exiting 75 rather than serve under a trust the log may not say"),
        "{stderr}"
    );
    drop(daemon);

    proxy.light();
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = parties.clients(&pki, daemon.api);
    let trusts = loaded(&c.auditor);
    let last = trusts.last().unwrap();
    assert!(
        last["policy"]["require"].get("judicial").is_none(),
        "{trusts:?}"
    );
    let r = vault::post(&c.agency, "/v1/unwrap", &body);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
}

/// A stop signal while such a reload tries to log the running trust again
/// is acted on at once: the daemon says it is stopping and drains while
/// the reload goes on trying (the drain waits for it), and a second signal
/// ends the process (exit 0) without waiting out `RELOG_WITHIN`. Before, the
/// daemon read no signal while a reload ran: both SIGTERMs were ignored
/// until the reload ended the process with 75, 30 s later.
#[test]
fn postgres_a_stop_signal_while_a_trust_reload_cannot_log_is_acted_on_at_once() {
    let Cut {
        mut daemon,
        proxy: _proxy,
        db: _db,
        t: _t,
        ..
    } = reload_with_its_commit_cut("W-STOPPED");
    waiting_to_relog(&daemon);
    daemon.signal(Signal::TERM);
    daemon.expect_notify("STOPPING=1");
    assert!(
        daemon
            .wait_exit_or_running(std::time::Duration::from_secs(1))
            .is_none(),
        "the drain did not wait for the reload: {}",
        daemon.stderr()
    );
    daemon.signal(Signal::TERM);
    // Exit 0, not the reload's 75 at the end of its 30 s: the stop did not
    // wait for it.
    let status = daemon.wait_exit(std::time::Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr());
    assert!(
        daemon
            .stderr()
            .contains("not waiting for the reload in progress"),
        "{}",
        daemon.stderr()
    );
}

/// A SIGHUP while a reload runs (here, one waiting to log the running
/// trust again) is not lost: one more reload starts when that one ends,
/// and applies the file as it then is. (Signals read while a reload runs
/// since the stop signal above is; SIGHUPs queued behind one coalesce.)
#[test]
fn postgres_a_sighup_during_a_reload_is_applied_after_it() {
    let Cut {
        daemon,
        parties,
        proxy,
        db: _db,
        pki,
        t: _t,
        body,
        ..
    } = reload_with_its_commit_cut("W-QUEUED");
    waiting_to_relog(&daemon);
    daemon.signal(Signal::HUP);
    daemon.signal(Signal::HUP);
    proxy.light();
    daemon.expect_notify("READY=1");
    daemon.expect_notify("RELOADING=1");
    daemon.expect_notify("READY=1");
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"ok\"}", 1.0),
        1.0
    );
    let c = parties.clients(&pki, daemon.api);
    let trusts = loaded(&c.auditor);
    assert_eq!(trusts.len(), 4, "{trusts:?}");
    assert_eq!(trusts[3]["config_digest"], trusts[1]["config_digest"]);
    let r = vault::post(&c.agency, "/v1/unwrap", &body);
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    // Two SIGHUPs during the first reload made one more, not two.
    assert!(
        daemon
            .recv_notify(std::time::Duration::from_millis(500))
            .is_none(),
        "a third reload ran"
    );
    assert_eq!(
        daemon.metric("lavd_config_reloads_total{outcome=\"ok\"}"),
        1.0
    );
}

/// A revocation in its audit commit holds a trust reload back until its
/// leaf is committed, so that its leaf, judged under the running trust,
/// lands before the reload's `authorities_loaded`. On PostgreSQL the test
/// holds the log's head row (`SELECT … FOR UPDATE` in a transaction of its
/// own): the admin's revocation waits inside its commit (the test sees its
/// backend wait for that lock); a reload that removes the judicial
/// authority then says it waits for the revocations in their audit commit,
/// and applies only once the revocation has committed. Before this test,
/// removing the fence from the revocation path failed no test.
#[test]
fn postgres_a_revocation_in_its_commit_holds_a_trust_reload_back() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let db = TestDb::create();
    db.write_token_config(
        &t,
        &format!(
            "statement_timeout_secs = 60\n{}",
            serve_config(&vault::roles_toml())
        ),
    );
    let daemon = Daemon::start_logging(&t, "info");
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let waits = "wait for the unwraps and revocations in their audit commit";
    let waiting_for_the_head = || -> i64 {
        db.client()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%audit_head%FOR UPDATE%'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let mut holder = db.client();
    let mut head = holder.transaction().unwrap();
    head.query("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE", &[])
        .unwrap();
    let revoked = std::thread::scope(|s| {
        let revoked = s.spawn(|| {
            vault::post(
                &c.admin,
                "/v1/warrants/revocations",
                &serde_json::json!({"id": "W-FENCED", "reason": "quashed"}),
            )
        });
        let within = std::time::Duration::from_secs(20);
        softhsm_tests::eventually("the revocation waiting in its commit", within, || {
            waiting_for_the_head() == 1
        });
        remove_the_judicial_authority(&t);
        daemon.signal(Signal::HUP);
        daemon.expect_notify("RELOADING=1");
        softhsm_tests::eventually("the reload waiting for the revocation", within, || {
            daemon.stderr().contains(waits)
        });
        assert!(!revoked.is_finished(), "the revocation answered while held");
        assert_eq!(waiting_for_the_head(), 1, "the reload's leaf did not wait");
        head.rollback().unwrap();
        revoked.join().unwrap()
    });
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    daemon.expect_notify("READY=1");
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"ok\"}", 1.0),
        1.0
    );
    let size = vault::tree_size(&c.auditor);
    let events: Vec<(String, serde_json::Value)> = vault::entries(&c.auditor, 0, size)
        .into_iter()
        .map(|e| (e.leaf["event"].as_str().unwrap().to_string(), e.leaf))
        .collect();
    let revocation = events
        .iter()
        .position(|(event, leaf)| event == "revocation" && leaf["warrant_id"] == "W-FENCED")
        .unwrap_or_else(|| panic!("{events:?}"));
    let change = events
        .iter()
        .rposition(|(event, _)| event == "authorities_loaded")
        .unwrap();
    assert!(revocation < change, "{events:?}");
    assert_eq!(
        events[change].1["authorities"].as_array().unwrap().len(),
        1,
        "{}",
        events[change].1
    );
}
