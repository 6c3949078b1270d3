//! The database failed over under load: three `lavd serve` replicas on one
//! PostgreSQL primary with a synchronous streaming standby, behind a TCP
//! forwarder that stands for the operators' load balancer. The primary is
//! stopped as a crash would stop it; the balancer then sends new
//! connections to the standby while it is still in recovery (read-only),
//! and the standby is promoted. No replica is restarted.
//!
//! Whatever the timing: every envelope released (`ok` in a 200) is an
//! `opened` leaf in the promoted server's log, its unit counted in the
//! budget there; the budget spent equals the `opened` leaves, so the
//! failover gave no unit back and released nothing beyond the warrant's
//! budget; every checkpoint any replica returned, before or after, is a
//! prefix of the one final tree (no fork); the log verifies through every
//! replica; and refusals carry only the store's 503 codes.
//!
//! This makes and drops clusters of its own ([`softhsm_tests::pg_standby`]),
//! so it lives in a test binary of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lavd::audit::merkle;
use lavd::audit::note::{self, VerifierKey};
use softhsm_tests::pg::TestDb;
use softhsm_tests::pg_standby::{Forward, Pair, PRIMARY, STANDBY};
use softhsm_tests::replicas::{Cluster, REPLICAS};
use softhsm_tests::{assert_ok, eventually, vault, TestToken};

/// The warrant's budget, in envelopes.
const BUDGET: usize = 1000;
/// Envelopes a request.
const BATCH: usize = 4;
/// Released before the crash, at least.
const BEFORE: usize = 200;
/// Released before the crash, at most: the load waits there, so that
/// budget is left for after the failover.
const HOLD_AT: usize = 600;

/// One request's HTTP status, code (`ok` for a 200), and for a 200 its
/// statuses, leaves' first index and checkpoint.
type Outcome = (u16, String, Option<(Vec<String>, u64, String)>);

/// The tests of this binary each make and drop the one pair: one at a
/// time.
static PAIR: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_failover_to_the_synchronous_standby_under_load_loses_no_released_key_and_forks_nothing() {
    let _one = PAIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let pair = Pair::create();
    let balancer = Forward::start(PRIMARY.1);
    let db = TestDb::create_on(balancer.port());
    let c = Cluster::start_with_db(
        TestToken::new(),
        db,
        "",
        None,
        "reservation_lease_secs = 10\n",
        "",
    );
    let envelopes: Vec<_> = (0..BATCH).map(|n| c.envelope(n)).collect();
    let body = serde_json::json!({
        "warrant": c.warrant("W-FAILOVER", BUDGET as u64),
        "envelopes": envelopes,
    })
    .to_string();
    let released = AtomicUsize::new(0);
    let (crashed, failed_over, stop) = (
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    );
    let set_up = started.elapsed();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let load: Vec<_> = (0..REPLICAS * 2)
            .map(|i| {
                let agency = c.clients[i % REPLICAS].agency.clone();
                let (body, released, crashed, failed_over, stop) =
                    (&body, &released, &crashed, &failed_over, &stop);
                s.spawn(move || {
                    let mut seen: Vec<Outcome> = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        // Held only until the crash (nothing is spent
                        // from then until the promotion): the load must
                        // reach the standby in recovery, which the test
                        // waits for.
                        if !crashed.load(Ordering::SeqCst)
                            && released.load(Ordering::SeqCst) >= HOLD_AT
                        {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        let r = match agency.request("POST", "/v1/unwrap", Some(body.as_bytes())) {
                            Ok(r) => r,
                            Err(e) => {
                                seen.push((0, format!("transport error: {e}"), None));
                                continue;
                            }
                        };
                        if r.status != 200 {
                            let code = r.json()["error"]["code"].as_str().unwrap().to_string();
                            seen.push((r.status, code, None));
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        let reply = r.json();
                        let statuses = vault::statuses(&reply);
                        let ok = statuses.iter().filter(|s| *s == "ok").count();
                        released.fetch_add(ok, Ordering::SeqCst);
                        let exhausted = statuses.iter().all(|s| s == "budget_exhausted");
                        seen.push((
                            200,
                            "ok".into(),
                            Some((
                                statuses,
                                reply["audit"]["first_index"].as_u64().unwrap(),
                                reply["audit"]["checkpoint"].as_str().unwrap().to_string(),
                            )),
                        ));
                        if exhausted && failed_over.load(Ordering::SeqCst) {
                            return seen;
                        }
                    }
                    seen
                })
            })
            .collect();
        // Stops the load however this closure ends, a failed assert too.
        let _stopping = softhsm_tests::StopOnDrop(&stop);
        eventually("releases before the crash", Duration::from_secs(60), || {
            released.load(Ordering::SeqCst) >= BEFORE
        });
        pair.crash_primary();
        crashed.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        // The balancer fails over before the standby is promoted: held
        // until a replica's write has been refused there.
        balancer.retarget(STANDBY.1);
        eventually(
            "a write refused by the standby in recovery",
            Duration::from_secs(30),
            || c.daemons.iter().any(|d| d.stderr().contains("ERROR 25006")),
        );
        pair.promote();
        failed_over.store(true, Ordering::SeqCst);
        for d in &c.daemons {
            d.wait_readyz(200);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while !load.iter().all(std::thread::ScopedJoinHandle::is_finished) {
            assert!(
                Instant::now() < deadline,
                "the budget was not exhausted within 120 s of the failover"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        load.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });

    let codes =
        vault::assert_store_outage_answers(outcomes.iter().map(|(s, c, _)| (*s, c.as_str())));

    // The promoted server's log, read through a replica.
    let auditor = &c.clients[0].auditor;
    let size = vault::tree_size(auditor);
    let log = vault::entries(auditor, 0, size);
    let memory = vault::memory_tree(&log);
    let key = assert_ok(&c.t.lavd_with_config(&["audit", "key"]))
        .trim()
        .to_string();
    let vkey = VerifierKey::parse(&key).unwrap();
    let mut ok = 0;
    let mut checkpoints = std::collections::BTreeSet::new();
    for (_, _, reply) in &outcomes {
        let Some((statuses, first, checkpoint)) = reply else {
            continue;
        };
        // Released envelopes are opened leaves of the promoted log.
        for (i, status) in statuses.iter().enumerate() {
            let leaf = &log[usize::try_from(*first).unwrap() + i].leaf;
            assert_eq!(leaf["warrant_id"], "W-FAILOVER");
            if status == "ok" {
                ok += 1;
                assert_eq!(leaf["outcome"], "opened", "leaf {}", *first as usize + i);
            }
        }
        // Every checkpoint returned, before the crash or after, is a
        // prefix of the final tree.
        let cp = note::verify_checkpoint(checkpoint, &vkey).unwrap();
        assert!(cp.size <= size, "{} > {size}", cp.size);
        assert_eq!(
            cp.root,
            merkle::root(&memory, cp.size).unwrap(),
            "size {}",
            cp.size
        );
        checkpoints.insert(cp.size);
    }
    let opened = vault::opened_leaves(&log);
    let spent: i64 =
        c.db.client()
            .query_one("SELECT spent FROM warrants WHERE id = 'W-FAILOVER'", &[])
            .unwrap()
            .get(0);
    let spent = usize::try_from(spent).unwrap();
    assert_eq!(spent, opened);
    assert!(
        ok <= spent && spent <= BUDGET,
        "released {ok}, spent {spent}"
    );
    for d in &c.daemons {
        softhsm_tests::faults::verify_log(&c.t, &c.pki, &c.parties.auditor, d.api);
    }
    // How the fates of COMMITs the crash cut were found unknown, for the
    // record (timing decides which).
    let said = |what: &str| -> usize {
        c.daemons
            .iter()
            .map(|d| d.stderr().matches(what).count())
            .sum()
    };
    // Writes the standby in recovery refused (SQLSTATE 25006, named in the
    // replicas' log lines; at least one, waited for above).
    let read_only = said("ERROR 25006");
    println!(
        "failover under load: {codes:?}; {read_only} writes refused by the standby in recovery; released {ok}, spent {spent} of {BUDGET}; {size} leaves, \
         {} distinct checkpoints; fates unknown: {} on the standby in recovery, {} with no \
         connection; set-up {set_up:?}, all {:?}",
        checkpoints.len(),
        said("the server reached is a standby in recovery"),
        said("no connection to read its fate"),
        started.elapsed()
    );
    drop(c);
    drop(pair);
}

/// The fate of a COMMIT whose answer was lost, asked of a standby still in
/// recovery: the connection of an append is cut just after its COMMIT is
/// forwarded to the primary, and by then the balancer sends new
/// connections, the one that asks the fate included, to the standby, not
/// yet promoted. A standby may not have replayed a commit yet, so it cannot
/// say the commit did not happen: the append is answered `CommitUnknown`
/// (the daemon's 503 `spent_not_released`: nothing released, a retry would
/// spend again), not failed. Here the standby is synchronous and has the
/// commit: once promoted, the leaf is there, which "failed" would have
/// denied. (OPERATIONS §12 said no test reached this branch.)
#[test]
fn a_lost_commits_fate_asked_of_a_standby_in_recovery_is_unknown() {
    use lavd::audit::leaf::KeyGenerated;
    use lavd::codec::parse_time;
    use lavd::store::{AuditAppend, AuditStore, Spend, Store, StoreError, StoreSettings};

    let _one = PAIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let pair = Pair::create();
    let balancer = Forward::start(PRIMARY.1);
    let db = TestDb::create_on(balancer.port());
    let cut = softhsm_tests::pg::CutAtCommit::start(balancer.port());
    let mut settings = db.settings_via(cut.port());
    // One connection: the fate is read on a new one (the cut one is given
    // back first).
    settings.pool_size = 1;
    let store = Store::open_settings(&StoreSettings::Postgres(settings)).unwrap();
    assert_eq!(store.tree_size().unwrap(), 0);
    // The standby has the database and its schema before it is asked.
    pair.wait_replayed();
    balancer.retarget(STANDBY.1);
    cut.arm();
    let at = |t: &str| parse_time(t).unwrap();
    let event = KeyGenerated::new(
        "k1",
        at("2026-12-01T00:00:00Z"),
        at("2027-01-01T00:00:00Z"),
        at("2028-01-01T00:00:00Z"),
        None,
    )
    .unwrap();
    let appended = store.append(AuditAppend {
        events: vec![event.into()],
        time: at("2026-12-07T10:00:00Z"),
        spend: Spend::None,
    });
    assert_eq!(cut.cuts(), 1, "the proxy never saw the COMMIT");
    match &appended {
        Err(StoreError::CommitUnknown(why)) => assert!(
            why.contains("the server reached is a standby in recovery"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    // The primary had committed it: the standby shows it (read through the
    // balancer, which points there) once it has replayed it, and keeps it
    // once promoted.
    eventually("the leaf on the standby", Duration::from_secs(30), || {
        db.rows("audit_leaves") == 1
    });
    pair.promote();
    assert_eq!(db.rows("audit_leaves"), 1);
    drop(store);
    drop(db);
    drop(pair);
}
