//! No HSM open goes unlogged, even across a crash. An unwrap writes its
//! open intent (each envelope's leaf as `open_interrupted`) durably with its
//! budget reservation, before the HSM is called; its audit commit deletes
//! it. Here the HSM has derived an envelope's secret (the latency and fault
//! module holds the call that destroys the derived object, after the read)
//! when the daemon is killed with SIGKILL: nothing was released. Before a
//! restart the store holds the intent (`store_copy.rs` shows `lavd store
//! copy` refusing such a file); the next `lavd serve` writes its leaves
//! before serving, once; nothing of the budget was spent; and the log
//! verifies.
//!
//! On SQLite, and on two PostgreSQL replicas, where the killed one is not
//! restarted and the other writes the intent's leaves once its lease (the
//! reservation's) has run out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rustix::process::Signal;
use softhsm_tests::faults::{limits, verify_log, wait_until};
use softhsm_tests::pg::TestDb;
use softhsm_tests::server::{Daemon, Pki};
use softhsm_tests::vault::{self, Parties};
use softhsm_tests::{shim_module_path, Shim, TestToken};

/// The warrant (budget 3) and five envelopes of both tests: the first is
/// opened through `c` before the kill, the next two are cut by it, the last
/// two must fit the budget afterwards (the cut ones spent nothing).
struct Scenario {
    warrant: serde_json::Value,
    envelopes: Vec<serde_json::Value>,
}

impl Scenario {
    fn new(c: &vault::Clients) -> Self {
        let escrow = vault::published_key(&c.provider, "E-1");
        let recipient = vault::recipient();
        Scenario {
            warrant: vault::double_lock(&vault::claims("W-CUT", recipient.public(), 3)),
            envelopes: vault::batch(&escrow, "cut", 5),
        }
    }

    fn request(&self, range: std::ops::Range<usize>) -> serde_json::Value {
        serde_json::json!({"warrant": self.warrant, "envelopes": self.envelopes[range]})
    }

    /// Sends the envelopes of `range` through `c` with the module holding
    /// `C_DestroyObject` (after the derive and the read), and returns once
    /// an open is held there, with the request's thread.
    fn hold(
        &self,
        c: &vault::Clients,
        shim: &Shim,
        range: std::ops::Range<usize>,
    ) -> std::thread::JoinHandle<std::io::Result<softhsm_tests::server::Response>> {
        shim.set("fault = hang\nfault_calls = C_DestroyObject\n");
        let agency = c.agency.clone();
        let body = self.request(range).to_string();
        let held =
            std::thread::spawn(move || agency.request("POST", "/v1/unwrap", Some(body.as_bytes())));
        assert!(
            wait_until(Duration::from_secs(30), || shim.faults() > 0),
            "no open reached the held call"
        );
        held
    }

    /// Opens the first envelope through `c`, then sends the next two with
    /// their opens held ([`Scenario::hold`]) and kills `daemon`. Returns
    /// the log's size before the cut request.
    fn cut(&self, c: &vault::Clients, shim: &Shim, daemon: &mut Daemon) -> u64 {
        let r = vault::post(&c.agency, "/v1/unwrap", &self.request(0..1));
        assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
        let before = vault::tree_size(&c.auditor);
        let cut = self.hold(c, shim, 1..3);
        daemon.signal(Signal::KILL);
        daemon.wait_exit(Duration::from_secs(10));
        if let Ok(r) = cut.join().unwrap() {
            panic!("the cut request was answered {}: {}", r.status, r.text());
        }
        shim.set("");
        before
    }
}

/// A token with escrow key `E-1`, its config on the fault module, and a
/// daemon serving it on SQLite.
struct OnSqlite {
    t: TestToken,
    pki: Pki,
    shim: Shim,
    daemon: Daemon,
    parties: Parties,
}

impl OnSqlite {
    fn start() -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        let shim = Shim::new(&t);
        // A call deadline far beyond the test: a held call must still be
        // running when the test acts.
        t.write_config_hsm(
            &shim_module_path(),
            2,
            "call_timeout_ms = 120000\n",
            &format!("{}\n{}", shim.hsm_env(), limits()),
        );
        vault::generate_escrow_key(&t, "E-1");
        let daemon = Daemon::start(&t);
        daemon.wait_readyz(200);
        let parties = Parties::new(&pki);
        OnSqlite {
            t,
            pki,
            shim,
            daemon,
            parties,
        }
    }
}

#[test]
fn sqlite_an_open_cut_by_sigkill_is_logged_open_interrupted_at_the_next_start() {
    let OnSqlite {
        t,
        pki,
        shim,
        mut daemon,
        parties,
    } = OnSqlite::start();
    let c = parties.clients(&pki, daemon.api);
    let scenario = Scenario::new(&c);
    let before = scenario.cut(&c, &shim, &mut daemon);

    // Before a restart: the intent is in the store, not yet in the log.
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let intents: Vec<(String, String)> = db
        .prepare("SELECT warrant_id, CAST(leaves AS TEXT) FROM open_intents")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(db);
    assert_eq!(intents.len(), 1, "{intents:?}");
    assert_eq!(intents[0].0, "W-CUT");

    // The next start writes the intent's leaves before serving.
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = parties.clients(&pki, daemon.api);
    let size = vault::tree_size(&c.auditor);
    let leaves = vault::entries(&c.auditor, before, size);
    let interrupted = vec![("denied".to_string(), "open_interrupted".to_string())];
    assert_eq!(
        outcomes_of(&leaves, &scenario.envelopes[1..3]),
        [interrupted.clone(), interrupted],
        "the cut envelopes, written once each"
    );
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let left: i64 = db
        .query_row("SELECT count(*) FROM open_intents", [], |r| r.get(0))
        .unwrap();
    let spent: i64 = db
        .query_row("SELECT spent FROM warrants WHERE id = 'W-CUT'", [], |r| {
            r.get(0)
        })
        .unwrap();
    drop(db);
    assert_eq!((left, spent), (0, 1), "intents left, budget spent");
    // A restart writes them once: nothing more the next time.
    drop(daemon);
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = parties.clients(&pki, daemon.api);
    let again = vault::entries(&c.auditor, size, vault::tree_size(&c.auditor));
    assert!(
        again.iter().all(|e| e.leaf["reason"] != "open_interrupted"),
        "{again:?}"
    );
    // The budget the cut request never spent is there.
    let r = vault::post(&c.agency, "/v1/unwrap", &scenario.request(3..5));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok", "ok"]);
    verify_log(&t, &pki, &parties.auditor, daemon.api);
}

/// The leaves of `envelopes` among `leaves`: (outcome, reason) of each.
fn outcomes_of(
    leaves: &[vault::Entry],
    envelopes: &[serde_json::Value],
) -> Vec<Vec<(String, String)>> {
    envelopes
        .iter()
        .map(vault::envelope_digest)
        .map(|digest| {
            leaves
                .iter()
                .filter(|e| e.leaf["envelope_digest"] == digest.as_str())
                .map(|e| {
                    (
                        e.leaf["outcome"].as_str().unwrap_or_default().to_string(),
                        e.leaf["reason"].as_str().unwrap_or("-").to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Waits (up to 30 s) until the log from index `before` holds a leaf for
/// each of `envelopes`, read through `c`'s auditor; their outcomes.
fn wait_for_leaves_of(
    c: &vault::Clients,
    envelopes: &[serde_json::Value],
    before: u64,
) -> Vec<Vec<(String, String)>> {
    let mut found = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let size = vault::tree_size(&c.auditor);
            found = outcomes_of(&vault::entries(&c.auditor, before, size), envelopes);
            found.iter().all(|f| !f.is_empty())
        }),
        "no leaves for the envelopes: {found:?}"
    );
    found
}

/// A token with escrow key `E-1`, its config on the fault module with a
/// PostgreSQL store whose reservation lease is 5 s (the requests not held
/// must settle within it on a loaded host), and two replicas serving it.
struct OnPostgres {
    t: TestToken,
    pki: Pki,
    shim: Shim,
    db: TestDb,
    first: Daemon,
    other: Daemon,
    parties: Parties,
}

impl OnPostgres {
    fn start() -> Self {
        let t = TestToken::new();
        let pki = Pki::new(&t);
        let shim = Shim::new(&t);
        let db = TestDb::create();
        db.write_token_config_hsm(
            &t,
            &shim_module_path(),
            "sessions = 2\ncall_timeout_ms = 120000\n",
            &format!(
                "reservation_lease_secs = 5\n{}\n{}",
                shim.hsm_env(),
                limits()
            ),
        );
        vault::generate_escrow_key(&t, "E-1");
        let first = Daemon::start_replica(&t, "a");
        let other = Daemon::start_replica(&t, "b");
        first.wait_readyz(200);
        other.wait_readyz(200);
        let parties = Parties::new(&pki);
        OnPostgres {
            t,
            pki,
            shim,
            db,
            first,
            other,
            parties,
        }
    }
}

#[test]
fn postgres_an_open_cut_on_a_killed_replica_is_logged_by_another_once_its_lease_runs_out() {
    let OnPostgres {
        t,
        pki,
        shim,
        db,
        first: mut killed,
        other,
        parties,
    } = OnPostgres::start();
    let (a, b) = (
        parties.clients(&pki, killed.api),
        parties.clients(&pki, other.api),
    );
    let scenario = Scenario::new(&a);
    let before = scenario.cut(&a, &shim, &mut killed);

    // Replica b, never restarted, writes them once the lease has run out.
    let found = wait_for_leaves_of(&b, &scenario.envelopes[1..3], before);
    let interrupted = vec![("denied".to_string(), "open_interrupted".to_string())];
    assert_eq!(
        found,
        [interrupted.clone(), interrupted],
        "written once each"
    );
    let mut client = db.client();
    let left: i64 = client
        .query_one("SELECT count(*) FROM open_intents", &[])
        .unwrap()
        .get(0);
    let spent: i64 = client
        .query_one("SELECT spent FROM warrants WHERE id = 'W-CUT'", &[])
        .unwrap()
        .get(0);
    assert_eq!((left, spent), (0, 1), "intents left, budget spent");
    let r = vault::post(&b.agency, "/v1/unwrap", &scenario.request(3..5));
    assert_eq!(vault::statuses(&r.json()), ["ok", "ok"], "{}", r.text());
    verify_log(&t, &pki, &parties.auditor, other.api);
}

/// A request that outlives its lease on a live replica: a sweep (of either
/// replica; the request's own sweeps too) writes its intent's leaves
/// `open_interrupted`, nothing released. When its opens then finish, it
/// must not release them nor spend: it answers 503 `store_unavailable`, its
/// own leaves say `audit_commit_failed`, and the budget is whole for the
/// envelopes after it. Before, it answered 200 with both keys out, beside
/// leaves saying they were not released, and spent them (helper-186's
/// review; mutated: 200 `ok, ok`).
#[test]
fn postgres_a_request_that_outlives_its_lease_and_is_swept_releases_nothing() {
    let OnPostgres {
        t,
        pki,
        shim,
        db,
        first: slow,
        other,
        parties,
    } = OnPostgres::start();
    let (a, b) = (
        parties.clients(&pki, slow.api),
        parties.clients(&pki, other.api),
    );
    let scenario = Scenario::new(&a);
    let r = vault::post(&a.agency, "/v1/unwrap", &scenario.request(0..1));
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    let before = vault::tree_size(&b.auditor);
    let held = scenario.hold(&a, &shim, 1..3);

    // Its lease runs out while the opens are held; a sweep writes it.
    wait_for_leaves_of(&b, &scenario.envelopes[1..3], before);
    shim.set("");
    let r = held.join().unwrap().unwrap();
    r.assert_error(503, "store_unavailable");
    let size = vault::tree_size(&b.auditor);
    let found = outcomes_of(
        &vault::entries(&b.auditor, before, size),
        &scenario.envelopes[1..3],
    );
    let both = vec![
        ("denied".to_string(), "open_interrupted".to_string()),
        ("denied".to_string(), "audit_commit_failed".to_string()),
    ];
    assert_eq!(found, [both.clone(), both]);
    let spent: i64 = db
        .client()
        .query_one("SELECT spent FROM warrants WHERE id = 'W-CUT'", &[])
        .unwrap()
        .get(0);
    assert_eq!(spent, 1, "budget spent");
    let r = vault::post(&b.agency, "/v1/unwrap", &scenario.request(3..5));
    assert_eq!(vault::statuses(&r.json()), ["ok", "ok"], "{}", r.text());
    assert!(
        slow.stderr().contains("outlived its reservation's lease"),
        "{}",
        slow.stderr()
    );
    verify_log(&t, &pki, &parties.auditor, other.api);
}

/// An intent row that does not parse (the store edited behind lavd's back)
/// stops `lavd serve` at its start, with a code and the row named, rather
/// than serving with an HSM open it cannot log; once the operator removed
/// the row, it starts.
#[test]
fn sqlite_a_corrupt_intent_row_stops_the_start_naming_it() {
    let t = TestToken::new();
    // The server's and clients' certificates the configuration names.
    let _pki = Pki::new(&t);
    t.write_config(&limits());
    let mut daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    daemon.signal(Signal::TERM);
    daemon.wait_exit(Duration::from_secs(30));
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    db.execute(
        "INSERT INTO open_intents (warrant_id, created_at, leaves) VALUES ('W-X', ?1, X'5B7B7D5D')",
        ["2026-12-05T10:00:00Z"],
    )
    .unwrap();
    let (status, stderr) = Daemon::try_start(&t).expect_err("a start over a corrupt intent");
    assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("lavd: store_unavailable: cannot write the leaves of interrupted HSM opens")
            && stderr.contains("open_intents 1: a leaf does not parse"),
        "{stderr}"
    );
    db.execute("DELETE FROM open_intents", []).unwrap();
    drop(db);
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
}

/// One `lavd serve` per SQLite store. A second one on a file another is
/// serving, while that one holds an open intent in flight (its HSM open
/// held in the module), stops at its start before it opens the store: exit
/// 1 with its code and the store named, by the file's path or another
/// (a symlink). It wrote nothing: not
/// the in-flight intent's leaves (which it would have taken for a crashed
/// run's), not its own `authorities_loaded`. The held request then ends
/// `ok`, logged once; once the first daemon stops, a new one starts.
#[test]
fn sqlite_a_second_serve_on_a_served_store_stops_at_its_start() {
    let OnSqlite {
        t,
        pki,
        shim,
        daemon: mut first,
        parties,
    } = OnSqlite::start();
    let c = parties.clients(&pki, first.api);
    let scenario = Scenario::new(&c);
    let before = vault::tree_size(&c.auditor);
    let held = scenario.hold(&c, &shim, 0..2);
    let count = |table: &str| -> i64 {
        rusqlite::Connection::open(t.path("lavd.db"))
            .unwrap()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    let leaves = count("audit_leaves");
    assert_eq!(count("open_intents"), 1, "the held request's intent");

    // Also by another name of the file: the lock is the file's.
    let link = t.path("another-name.db");
    std::os::unix::fs::symlink(t.path("lavd.db"), &link).unwrap();
    let config = std::fs::read_to_string(t.config()).unwrap();
    let db = t.path("lavd.db");
    for (path, name) in [(&db, "second"), (&link, "second-by-link")] {
        let line = format!("path = {:?}", path.display().to_string());
        let edited = config
            .lines()
            .map(|l| {
                if l.starts_with("path = ") {
                    line.as_str()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(edited.contains(&line), "{config}");
        std::fs::write(t.config(), edited).unwrap();
        let (status, stderr) =
            Daemon::try_start_named(&t, name).expect_err("a second serve on a served store");
        assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
        let expected = format!(
            "lavd: store_in_use: store {}: another lavd serve is serving it, or a lavd store \
             copy is copying it (it holds the file's lock); one daemon serves an SQLite store",
            path.display()
        );
        assert!(stderr.contains(&expected), "{expected}\nnot in:\n{stderr}");
    }
    std::fs::write(t.config(), config).unwrap();
    assert_eq!(
        (count("open_intents"), count("audit_leaves")),
        (1, leaves),
        "the refused daemon wrote nothing"
    );

    shim.set("");
    let r = held.join().unwrap().expect("the held request's reply");
    assert_eq!(vault::statuses(&r.json()), ["ok", "ok"], "{}", r.text());
    assert_eq!(count("open_intents"), 0);
    let size = vault::tree_size(&c.auditor);
    assert_eq!(
        outcomes_of(
            &vault::entries(&c.auditor, before, size),
            &scenario.envelopes[0..2]
        ),
        vec![vec![("opened".to_string(), "-".to_string())]; 2],
        "each envelope logged once, opened"
    );
    first.signal(Signal::TERM);
    first.wait_exit(Duration::from_secs(30));
    let second = Daemon::start(&t);
    second.wait_readyz(200);
    verify_log(&t, &pki, &parties.auditor, second.api);
}
