//! Crash safety of `lavd serve` under load (issue 14, "Crash"): for
//! `LAVD_CRASH_ROUNDS` rounds (CI default 10, `.ci/long-run` 50), agencies
//! unwrap concurrently (small batches under a warrant with a large budget
//! and under one with a small budget they all compete for) and daemons are
//! killed with SIGKILL at a random moment; then they are restarted on the
//! same token and store, and the checks of [`softhsm_tests::crash`] run:
//! the log verifies with `lavd audit verify --url`, each warrant's spent
//! budget equals its `opened` leaves, every reply a client received has
//! its leaves in the log as it said, and every ECDH derive lavd asked the
//! HSM for (logged by the latency and fault module, which the daemons load
//! with no delay or fault) has a leaf for its envelope, the ones the kill
//! cut included (`open_interrupted`). Anything lost fails the round.
//!
//! Once on SQLite (one daemon), once on three PostgreSQL replicas of one
//! database, where each round kills one replica or all three at random (with
//! a reservation lease of 3 s, after which another replica, or the restarted
//! one, logs a killed replica's cut opens).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::OptionalExtension as _;
use rustix::process::Signal;
use softhsm_tests::crash::{self, Checker, Load, Received, Rng, Sent};
use softhsm_tests::replicas::{Cluster, REPLICAS};
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Vault};
use softhsm_tests::{shim_module_path, Shim, TestToken};

/// CI's rounds per backend (the test this replaced ran 20 on SQLite alone).
const ROUNDS: u64 = 10;
const THREADS: usize = 4;
const BIG: (&str, u64) = ("W-BIG", 1_000_000);
/// Runs out within the first rounds on a quiet machine (about 130
/// small-budget envelopes a round); a loaded 2-core machine still opens
/// well over 20 in 10 rounds (it received 216 replies in 20 rounds).
const SMALL: (&str, u64) = ("W-SMALL", 20);

fn warrants(recipient: &lavd::jwk::P256PrivateKey) -> Arc<Vec<(&'static str, serde_json::Value)>> {
    // Signed once: a warrant id always carries the same payload.
    Arc::new(
        [BIG, SMALL]
            .iter()
            .map(|(id, max)| {
                (
                    *id,
                    vault::double_lock(&vault::claims(id, recipient.public(), *max)),
                )
            })
            .collect(),
    )
}

/// The PostgreSQL replicas' reservation lease: a killed replica's cut opens
/// are logged within it plus a sweep (a quarter lease, at least 1 s).
const LEASE_SECS: u64 = 3;

/// The latency and fault module on `t`, with no delay or fault, logging
/// every derive to the returned file.
fn derive_logging(t: &TestToken) -> (Shim, std::path::PathBuf) {
    let shim = Shim::new(t);
    let log = t.path("derives.log");
    shim.set(&format!("derive_log = {}", log.display()));
    (shim, log)
}

/// The figures a run prints and asserts.
fn report(
    backend: &str,
    rounds: u64,
    received: &[Received],
    cut: usize,
    checker: &Checker,
    (derives, interrupted): (usize, usize),
) {
    let opened = received
        .iter()
        .flat_map(|r| &r.statuses)
        .filter(|s| *s == "ok")
        .count();
    let denied_small = received
        .iter()
        .filter(|r| r.warrant == SMALL.0)
        .flat_map(|r| &r.statuses)
        .filter(|s| *s == "budget_exhausted")
        .count();
    let leaves: u64 = received.iter().map(|r| r.count).sum();
    eprintln!(
        "crash rounds ({backend}): {rounds} rounds survived, {} replies received naming \
         {leaves} leaves ({opened} keys released), {} leaf checks after the restarts, lost 0, \
         {cut} requests cut by the kill, {denied_small} envelopes refused for the small budget, \
         {derives} HSM derives all logged ({interrupted} open_interrupted leaves)",
        received.len(),
        checker.leaves_checked
    );
    assert!(received.len() >= rounds as usize, "the load never ran");
    assert!(
        derives > 0,
        "no HSM derive was logged: is the module's derive_log on?"
    );
    assert!(cut > 0, "no kill landed on a request in flight");
}

#[test]
fn sqlite_sigkill_rounds_lose_no_released_key_and_no_budget() {
    let started = Instant::now();
    let rounds = crash::rounds(ROUNDS);
    let mut rng = Rng::from_env();
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let (shim, derive_log) = derive_logging(&t);
    t.write_config_with_module(
        &shim_module_path(),
        &format!(
            "{}\n{}",
            shim.hsm_env(),
            serve_config(&format!(
                "{}[limits]\nmax_batch = 10\nrate_limit_per_second = 100000\nrate_limit_burst = 100000\n",
                vault::roles_toml()
            ))
        ),
    );
    let Vault {
        mut daemon,
        t,
        pki,
        parties,
        escrow,
    } = Vault::serve(t, pki);
    let sent = Sent::default();
    let mut derives = (0, 0);
    let recipient = Arc::new(vault::recipient());
    let warrants = warrants(&recipient);
    let mut checker = Checker::new(&t, &pki, &parties);
    let mut received: Vec<Received> = Vec::new();
    let mut cut = 0;
    for round in 0..rounds {
        let c = parties.clients(&pki, daemon.api);
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let load = Load {
                    agency: c.agency.clone(),
                    escrow: escrow.clone(),
                    recipient: recipient.clone(),
                    warrants: warrants.clone(),
                    stop: stop.clone(),
                    sent: sent.clone(),
                };
                std::thread::spawn(move || crash::agency_thread(load, round, thread))
            })
            .collect();
        std::thread::sleep(crash::kill_delay(&mut rng, 60));
        daemon.signal(Signal::KILL);
        daemon.wait_exit(Duration::from_secs(30));
        // The one daemon: every thread's.
        cut += crash::join_round(threads, &mut received, |_| true);

        daemon = Daemon::start(&t);
        daemon.wait_readyz(200);
        let auditor = parties.clients(&pki, daemon.api).auditor;
        let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
        let spent = |id: &str| -> u64 {
            db.query_row("SELECT spent FROM warrants WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
            .unwrap()
            .unwrap_or(0)
        };
        checker.check(&t, round, &auditor, &received, &[BIG, SMALL], spent);
        // Written before the restarted daemon serves: no wait.
        derives = checker.check_opens_logged(round, &auditor, &derive_log, &sent, Duration::ZERO);
    }
    report("SQLite", rounds, &received, cut, &checker, derives);
    eprintln!("{:?}", started.elapsed());
}

#[test]
fn postgres_replica_sigkill_rounds_lose_no_released_key_and_no_budget() {
    let started = Instant::now();
    let rounds = crash::rounds(ROUNDS);
    let mut rng = Rng::from_env();
    // A killed replica's reservation keeps its units until its lease ends:
    // the small budget runs out sooner, never over.
    let t = TestToken::new();
    let (shim, derive_log) = derive_logging(&t);
    let mut c = Cluster::start_on(
        t,
        "max_batch = 10\n",
        Some(&shim),
        &format!("reservation_lease_secs = {LEASE_SECS}\n"),
    );
    let sent = Sent::default();
    let mut derives = (0, 0);
    let recipient = Arc::new(vault::recipient());
    let warrants = warrants(&recipient);
    let mut checker = Checker::new(&c.t, &c.pki, &c.parties);
    let mut received: Vec<Received> = Vec::new();
    let mut cut = 0;
    let mut killed_total = 0;
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        // Two agency threads per replica.
        let threads: Vec<_> = (0..2 * REPLICAS)
            .map(|thread| {
                let load = Load {
                    agency: c.clients[thread % REPLICAS].agency.clone(),
                    escrow: c.escrow.clone(),
                    recipient: recipient.clone(),
                    warrants: warrants.clone(),
                    stop: stop.clone(),
                    sent: sent.clone(),
                };
                std::thread::spawn(move || crash::agency_thread(load, round, thread))
            })
            .collect();
        // Later than on SQLite: a replica's first requests wait for its
        // database connections.
        std::thread::sleep(crash::kill_delay(&mut rng, 300));
        // One replica, or (one round in three, and always the first) all
        // of them: every run kills all at least once.
        let victims: Vec<usize> = if round == 0 || rng.below(3) == 0 {
            (0..REPLICAS).collect()
        } else {
            vec![rng.below(REPLICAS as u64) as usize]
        };
        for &v in &victims {
            c.daemons[v].signal(Signal::KILL);
        }
        for &v in &victims {
            c.daemons[v].wait_exit(Duration::from_secs(30));
        }
        killed_total += victims.len();
        // The survivors' threads end after their current request.
        stop.store(true, Ordering::SeqCst);
        cut += crash::join_round(threads, &mut received, |thread| {
            victims.contains(&(thread % REPLICAS))
        });
        // And the survivors still serve.
        for (r, daemon) in c.daemons.iter().enumerate() {
            if !victims.contains(&r) {
                daemon.wait_readyz(200);
            }
        }

        for &v in &victims {
            c.daemons[v] = Daemon::start_replica(&c.t, &format!("replica-{v}"));
            c.daemons[v].wait_readyz(200);
            c.clients[v] = c.parties.clients(&c.pki, c.daemons[v].api);
        }
        // Checked through a restarted replica when there is one.
        let auditor = c.clients[victims[0]].auditor.clone();
        let mut db = c.db.client();
        let spent = |id: &str| -> u64 {
            db.query_opt("SELECT spent FROM warrants WHERE id = $1", &[&id])
                .unwrap()
                .map(|row| row.get::<_, i64>(0) as u64)
                .unwrap_or(0)
        };
        checker.check(&c.t, round, &auditor, &received, &[BIG, SMALL], spent);
        // A killed replica's cut opens: once their lease has run out, by
        // whichever replica sweeps first.
        derives = checker.check_opens_logged(
            round,
            &auditor,
            &derive_log,
            &sent,
            Duration::from_secs(LEASE_SECS + 12),
        );
        eprintln!("round {round}: killed replicas {victims:?}");
    }
    report(
        "PostgreSQL, 3 replicas",
        rounds,
        &received,
        cut,
        &checker,
        derives,
    );
    eprintln!("{killed_total} replica kills, {:?}", started.elapsed());
}
