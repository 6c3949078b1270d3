//! Failover: one of three `lavd serve` replicas is SIGKILLed while
//! 1000-envelope batches run through all of them; the client that lost its
//! replica retries on another. Afterwards the log verifies against the
//! survivors, every 200 reply's leaves are in the log as `opened`, and the
//! budget spent equals the opened leaves: a batch cut by the kill spent
//! nothing (its reservation's lease frees the units later).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use softhsm_tests::replicas::{Cluster, REPLICAS};
use softhsm_tests::vault;

const BATCH: usize = 1000;

#[test]
fn sigkill_of_one_replica_mid_batch_loses_nothing_and_the_others_keep_serving() {
    let started = Instant::now();
    let mut c = Cluster::start_with_limits("max_batch = 1000\nmax_body_bytes = 8388608\n");
    let envelopes: Vec<_> = (0..BATCH).map(|n| c.envelope(n)).collect();
    // The client of replica 0 uses its own warrant, so that the database
    // shows when replica 0 is between a reservation and its settle.
    let bodies: Vec<String> = ["W-FAILOVER-0", "W-FAILOVER"]
        .iter()
        .map(|id| {
            serde_json::json!({"warrant": c.warrant(id, 1_000_000), "envelopes": envelopes})
                .to_string()
        })
        .collect();
    let mut watch = c.db.client();
    const REQUESTS_PER_CLIENT: usize = 3;
    let clients: Vec<_> = c.clients.iter().map(|cl| cl.agency.clone()).collect();
    let (replies, killed_at) = std::thread::scope(|s| {
        let load: Vec<_> = (0..REPLICAS)
            .map(|i| {
                let clients = &clients;
                let body = &bodies[usize::from(i != 0)];
                s.spawn(move || {
                    let mut replies = Vec::new();
                    let mut replica = i;
                    let mut retries = 0;
                    while replies.len() < REQUESTS_PER_CLIENT {
                        match clients[replica].request("POST", "/v1/unwrap", Some(body.as_bytes()))
                        {
                            Ok(r) if r.status == 200 => replies.push(r.json()),
                            // The replica died under us: retry elsewhere.
                            Ok(r) => panic!("replica {replica}: {} {}", r.status, r.text()),
                            Err(_) => {
                                retries += 1;
                                assert!(retries < 10, "no replica answers");
                                replica = (replica + 1) % REPLICAS;
                                if replica == 0 {
                                    replica = 1;
                                }
                            }
                        }
                    }
                    replies
                })
            })
            .collect();
        // Kill replica 0 while its batch is in flight: once its reservation
        // is in the database and before its settle removes it (the HSM
        // opens 1000 envelopes in between).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let held: i64 = watch
                .query_one(
                    "SELECT count(*) FROM warrant_reservations WHERE warrant_id = 'W-FAILOVER-0'",
                    &[],
                )
                .unwrap()
                .get(0);
            if held > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "replica 0 never reserved");
            std::thread::sleep(Duration::from_millis(2));
        }
        let killed_at = Instant::now();
        c.daemons[0].signal(rustix::process::Signal::KILL);
        let replies: Vec<_> = load.into_iter().flat_map(|h| h.join().unwrap()).collect();
        (replies, killed_at)
    });
    c.daemons[0].wait_exit(Duration::from_secs(30));
    assert_eq!(replies.len(), REPLICAS * REQUESTS_PER_CLIENT);

    // The log verifies against each survivor.
    for d in &c.daemons[1..] {
        softhsm_tests::faults::verify_log(&c.t, &c.pki, &c.parties.auditor, d.api);
    }
    let auditor = &c.clients[1].auditor;
    let size = vault::tree_size(auditor);
    let log = vault::entries(auditor, 0, size);
    for reply in &replies {
        assert_eq!(vault::statuses(reply), vec!["ok"; BATCH]);
        let first = reply["audit"]["first_index"].as_u64().unwrap();
        for i in first..first + BATCH as u64 {
            assert_eq!(log[i as usize].leaf["outcome"], "opened");
        }
    }
    let opened = vault::opened_leaves(&log);
    let spent: i64 =
        c.db.client()
            .query_one(
                "SELECT sum(spent)::BIGINT FROM warrants WHERE id LIKE 'W-FAILOVER%'",
                &[],
            )
            .unwrap()
            .get(0);
    assert_eq!(spent as usize, opened);
    // Every 200 is in the log, and nothing else was opened: a batch cut by
    // the kill left no leaves.
    assert_eq!(opened, replies.len() * BATCH);
    // The kill did cut a batch between its reservation and its settle: the
    // dead replica's reservation is still there, held only until its lease
    // (reservation_lease_secs, 300 s by default) expires.
    let held: Vec<(i64, bool)> =
        c.db.client()
            .query(
                "SELECT granted, expires_at <= now() + interval '300 seconds'
             FROM warrant_reservations WHERE warrant_id LIKE 'W-FAILOVER%'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(
        held,
        [(BATCH as i64, true)],
        "the kill did not land mid-batch"
    );
    println!(
        "failover: {} batches of {BATCH} after a SIGKILL at {:?}, {size} leaves, {:?}",
        replies.len(),
        killed_at.duration_since(started),
        started.elapsed()
    );
}
