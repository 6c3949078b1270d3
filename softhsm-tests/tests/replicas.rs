//! Several `lavd serve` replicas on one SoftHSM token and one PostgreSQL
//! database, driven by real mTLS clients: the budget holds exactly across
//! them, they write one log whose every checkpoint is consistent with the
//! final one, and a revocation through one stops the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use lavd::audit::merkle::{self, MemoryTree};
use lavd::audit::note::{self, VerifierKey};
use softhsm_tests::assert_ok;
use softhsm_tests::replicas::Cluster;
use softhsm_tests::vault;

const REPLICAS: usize = softhsm_tests::replicas::REPLICAS;

/// 3 replicas × 8 client threads race for a budget of 10, round after
/// round: exactly 10 envelopes open in each round, and the database's
/// `spent` says 10.
#[test]
fn the_budget_is_exact_across_three_replicas() {
    const ROUNDS: usize = 50;
    const THREADS_PER_REPLICA: usize = 8;
    let started = Instant::now();
    let c = Cluster::start();
    let envelope = c.envelope(0);
    let mut client = c.db.client();
    for round in 0..ROUNDS {
        let id = format!("W-RACE-{round}");
        let body =
            serde_json::json!({"warrant": c.warrant(&id, 10), "envelopes": [envelope]}).to_string();
        let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..REPLICAS * THREADS_PER_REPLICA)
                .map(|i| {
                    let agency = c.clients[i % REPLICAS].agency.clone();
                    let body = &body;
                    s.spawn(move || {
                        let r = agency
                            .request("POST", "/v1/unwrap", Some(body.as_bytes()))
                            .expect("unwrap");
                        let status = if r.status == 200 {
                            vault::statuses(&r.json()).remove(0)
                        } else {
                            r.text()
                        };
                        (r.status, status)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok = statuses.iter().filter(|(_, s)| s == "ok").count();
        assert!(
            statuses
                .iter()
                .all(|(code, s)| *code == 200 && (s == "ok" || s == "budget_exhausted")),
            "round {round}: {statuses:?}"
        );
        assert_eq!(ok, 10, "round {round}: {statuses:?}");
        let spent: i64 = client
            .query_one("SELECT spent FROM warrants WHERE id = $1", &[&id])
            .unwrap()
            .get(0);
        assert_eq!(spent, 10, "round {round}");
    }
    println!(
        "{ROUNDS} rounds of {} requests through {REPLICAS} replicas in {:?}",
        REPLICAS * THREADS_PER_REPLICA,
        started.elapsed()
    );
}

/// Concurrent unwraps through all three replicas land in one log:
/// `lavd audit verify --url` passes against each replica, and every
/// checkpoint any replica returned is a prefix of the final tree, proved
/// by the replicas' own consistency proofs and by an independent tree.
#[test]
fn three_replicas_write_one_log() {
    const THREADS_PER_REPLICA: usize = 4;
    const REQUESTS: usize = 8;
    let started = Instant::now();
    let c = Cluster::start();
    let envelopes: Vec<_> = (0..5).map(|n| c.envelope(n)).collect();
    let body = serde_json::json!({
        "warrant": c.warrant("W-LOG", 100_000),
        "envelopes": envelopes,
    })
    .to_string();
    let replies: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..REPLICAS * THREADS_PER_REPLICA)
            .map(|i| {
                let agency = c.clients[i % REPLICAS].agency.clone();
                let body = &body;
                s.spawn(move || {
                    (0..REQUESTS)
                        .map(|_| {
                            let r = agency
                                .request("POST", "/v1/unwrap", Some(body.as_bytes()))
                                .expect("unwrap");
                            assert_eq!(r.status, 200, "{}", r.text());
                            r.json()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let requests = REPLICAS * THREADS_PER_REPLICA * REQUESTS;
    assert_eq!(replies.len(), requests);

    // `lavd audit verify --url` against each replica.
    let key = assert_ok(&c.t.lavd_with_config(&["audit", "key"]))
        .trim()
        .to_string();
    let (cert_pem, key_pem) = c.parties.auditor.pem();
    c.pki.write("servers-ca.pem", &c.pki.servers.pem());
    c.pki.write("auditor.pem", &cert_pem);
    c.pki.write("auditor.key", &key_pem);
    softhsm_tests::restrict(&c.t.path("tls/auditor.key"));
    let tls = |name: &str| c.t.path("tls").join(name).to_str().unwrap().to_string();
    for d in &c.daemons {
        let url = format!("https://{}", d.api);
        let summary = assert_ok(&c.t.lavd(&[
            "audit",
            "verify",
            "--key",
            &key,
            "--url",
            &url,
            "--ca",
            &tls("servers-ca.pem"),
            "--cert",
            &tls("auditor.pem"),
            "--client-key",
            &tls("auditor.key"),
        ]));
        assert!(summary.contains("verdict: the log verifies"), "{summary}");
    }

    // One tree: every leaf index used once; the replies' leaves are where
    // they said.
    let auditor = &c.clients[0].auditor;
    let size = vault::tree_size(auditor);
    let log = vault::entries(auditor, 0, size);
    let mut memory = MemoryTree::new();
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.index, i as u64);
        memory.push_leaf(&e.bytes);
    }
    let mut covered = vec![false; size as usize];
    for reply in &replies {
        let first = reply["audit"]["first_index"].as_u64().unwrap();
        let count = reply["audit"]["count"].as_u64().unwrap();
        assert_eq!(count, 5);
        for i in first..first + count {
            assert!(!covered[i as usize], "leaf {i} claimed twice");
            covered[i as usize] = true;
            assert_eq!(log[i as usize].leaf["warrant_id"], "W-LOG");
        }
    }
    // Every checkpoint any replica returned: signed by the one audit key,
    // a prefix of the final tree, and consistent with the final checkpoint
    // by each replica's own proof.
    let vkey = VerifierKey::parse(&key).unwrap();
    let r = auditor.get("/v1/audit/checkpoint");
    assert_eq!(r.status, 200, "{}", r.text());
    let final_note = r.json()["checkpoint"].as_str().unwrap().to_string();
    let last = note::verify_checkpoint(&final_note, &vkey).unwrap();
    assert_eq!(last.root, merkle::root(&memory, last.size).unwrap());
    let mut sizes = std::collections::BTreeSet::new();
    for (k, reply) in replies.iter().enumerate() {
        let cp =
            note::verify_checkpoint(reply["audit"]["checkpoint"].as_str().unwrap(), &vkey).unwrap();
        assert!(cp.size <= last.size);
        assert_eq!(cp.root, merkle::root(&memory, cp.size).unwrap());
        sizes.insert(cp.size);
        let proof_from = &c.clients[k % REPLICAS].auditor;
        let r = proof_from.get(&format!(
            "/v1/audit/proof/consistency?from={}&to={}",
            cp.size, last.size
        ));
        assert_eq!(r.status, 200, "{}", r.text());
        let proof: Vec<merkle::Hash> = r.json()["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                lavd::codec::b64_decode(h.as_str().unwrap())
                    .unwrap()
                    .try_into()
                    .unwrap()
            })
            .collect();
        merkle::verify_consistency(cp.size, last.size, &cp.root, &last.root, &proof).unwrap();
    }
    println!(
        "{requests} requests through {REPLICAS} replicas, {size} leaves, {} distinct checkpoints, in {:?}",
        sizes.len(),
        started.elapsed()
    );
}

/// A revocation through replica A stops replica B's next request.
#[test]
fn a_revocation_through_one_replica_stops_the_others() {
    let c = Cluster::start();
    let envelope = c.envelope(0);
    let body = serde_json::json!({"warrant": c.warrant("W-REV", 100), "envelopes": [envelope]});
    for clients in &c.clients {
        let r = vault::post(&clients.agency, "/v1/unwrap", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"]);
    }
    let r = vault::post(
        &c.clients[0].admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": "W-REV", "reason": "quashed"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for clients in &c.clients[1..] {
        vault::post(&clients.agency, "/v1/unwrap", &body).assert_error(403, "warrant_revoked");
    }
    // A second revocation through another replica keeps the first.
    let r = vault::post(
        &c.clients[2].admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": "W-REV", "reason": "again"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
