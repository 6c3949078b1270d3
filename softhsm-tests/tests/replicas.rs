//! Several `lavd serve` replicas on one SoftHSM token and one PostgreSQL
//! database, driven by real mTLS clients: the budget holds exactly across
//! them, they write one log whose every checkpoint is consistent with the
//! final one, and a revocation through one, or a key's destruction through
//! the shared store, stops the others' unwraps, those in flight included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use lavd::audit::merkle;
use lavd::audit::note::{self, VerifierKey};
use softhsm_tests::replicas::Cluster;
use softhsm_tests::vault;
use softhsm_tests::{assert_ok, eventually};

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
    for d in &c.daemons {
        softhsm_tests::faults::verify_log(&c.t, &c.pki, &c.parties.auditor, d.api);
    }

    // One tree: every leaf index used once; the replies' leaves are where
    // they said.
    let auditor = &c.clients[0].auditor;
    let size = vault::tree_size(auditor);
    let log = vault::entries(auditor, 0, size);
    let memory = vault::memory_tree(&log);
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

/// PROTOCOL §8 across replicas: a revocation through replica A racing a
/// 100-envelope unwrap in flight on replica B. Whatever the timing, no
/// `opened` leaf of the warrant follows its `revocation` leaf in the one
/// log, a 200 from B is all `ok` (committed before) or all
/// `warrant_revoked` (caught in flight, nothing spent), and a later
/// request is refused whole.
#[test]
fn a_revocation_through_one_replica_stops_anothers_in_flight_settle() {
    const BATCH: usize = 100;
    const TRIALS: usize = 20;
    let started = Instant::now();
    let c = Cluster::start();
    let envelopes: Vec<_> = (0..BATCH).map(|i| c.envelope(i)).collect();
    let (a, b) = (&c.clients[0], &c.clients[1]);
    // How long an unrevoked batch takes on B.
    let warm = c.warrant("W-XR-WARM", 1000);
    let t0 = Instant::now();
    let r = vault::post(
        &b.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warm, "envelopes": envelopes}),
    );
    let batch_time = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());

    let trial = |n: usize, delay: std::time::Duration| -> (String, u64, &'static str) {
        let id = format!("W-XR-{n}");
        let unwrap_body =
            serde_json::json!({"warrant": c.warrant(&id, 1000), "envelopes": envelopes})
                .to_string();
        let revoke_body = serde_json::json!({"id": id, "reason": "quashed"}).to_string();
        let mut agency = b.agency.connect().expect("agency on B");
        let mut admin = a.admin.connect().expect("admin on A");
        let (unwrap, revoke) = std::thread::scope(|s| {
            let unwrap = s.spawn(|| {
                agency
                    .request("POST", "/v1/unwrap", &[], Some(unwrap_body.as_bytes()))
                    .expect("unwrap")
            });
            let revoke = s.spawn(|| {
                std::thread::sleep(delay);
                admin
                    .request(
                        "POST",
                        "/v1/warrants/revocations",
                        &[],
                        Some(revoke_body.as_bytes()),
                    )
                    .expect("revocation")
            });
            (unwrap.join().unwrap(), revoke.join().unwrap())
        });
        assert_eq!(revoke.status, 200, "{}", revoke.text());
        let revoked_at = revoke.json()["audit"]["first_index"].as_u64().unwrap();
        let outcome = match unwrap.status {
            200 => {
                let statuses = vault::statuses(&unwrap.json());
                if statuses.iter().all(|s| s == "ok") {
                    "before"
                } else {
                    assert_eq!(statuses, ["warrant_revoked"; BATCH], "{id}");
                    "in flight"
                }
            }
            _ => {
                unwrap.assert_error(403, "warrant_revoked");
                "refused"
            }
        };
        (id, revoked_at, outcome)
    };
    let mut outcomes: Vec<_> = (0..TRIALS)
        .map(|n| trial(n, std::time::Duration::from_millis((n as u64 * 3) % 41)))
        .collect();
    // If 0–40 ms never caught a settle in flight, aim at the batch's middle.
    for k in 0..10u32 {
        if outcomes.iter().any(|o| o.2 == "in flight") {
            break;
        }
        outcomes.push(trial(TRIALS + k as usize, batch_time / (2 + k)));
    }

    // The one log, read through the third replica.
    let auditor = &c.clients[2].auditor;
    let size = vault::tree_size(auditor);
    let log = vault::entries(auditor, 0, size);
    let mut db = c.db.client();
    let mut refused_after_commit = 0;
    for (id, revoked_at, outcome) in &outcomes {
        let revocation: Vec<u64> = log
            .iter()
            .filter(|e| e.leaf["event"] == "revocation" && e.leaf["warrant_id"] == id.as_str())
            .map(|e| e.index)
            .collect();
        assert_eq!(revocation, [*revoked_at], "{id}");
        let unwraps: Vec<_> = log
            .iter()
            .filter(|e| e.leaf["event"] == "unwrap" && e.leaf["warrant_id"] == id.as_str())
            .collect();
        for e in &unwraps {
            if e.leaf["outcome"] == "opened" {
                assert!(
                    e.index < *revoked_at,
                    "{id}: opened leaf {} after revocation {revoked_at}",
                    e.index
                );
            } else {
                assert_eq!(e.leaf["reason"], "warrant_revoked", "{id}");
                assert!(e.index > *revoked_at, "{id}");
            }
        }
        let spent: i64 = db
            .query_opt("SELECT spent FROM warrants WHERE id = $1", &[id])
            .unwrap()
            .map_or(0, |row| row.get(0));
        // A 403 whose leaves say opened: committed before the revocation,
        // and refused at the check just before the release (since
        // 2026-12-07), its budget spent and nothing released.
        let after_commit = *outcome == "refused"
            && !unwraps.is_empty()
            && unwraps.iter().all(|e| e.leaf["outcome"] == "opened");
        refused_after_commit += usize::from(after_commit);
        let expected = if *outcome == "before" || after_commit {
            BATCH as i64
        } else {
            0
        };
        assert_eq!(spent, expected, "{id} ({outcome})");
    }
    let count = |o: &str| outcomes.iter().filter(|t| t.2 == o).count();
    println!(
        "{} trials in {:.1} s: before {}, in flight {}, refused {} (after the commit \
         {refused_after_commit})",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        count("before"),
        count("in flight"),
        count("refused")
    );
    assert!(count("in flight") > 0, "no settle was caught in flight");
}

/// Leaves rewritten behind another replica's checkpoint are not signed
/// over. Replica B signs size `b`; replica A then signs a larger size `a`;
/// a leaf between them is rewritten in the database, with every subtree
/// hash above it recomputed (a well-formed, different tree). B's own proof
/// (from `b`) would pass; B proves from A's checkpoint too, so it refuses
/// (503 `log_inconsistent`) instead of signing a fork of A's `a`.
#[test]
fn a_replica_does_not_sign_over_leaves_rewritten_behind_anothers_checkpoint() {
    use lavd::audit::merkle::{leaf_hash, node_hash, Hash};

    let c = Cluster::start();
    // Each warrant made once: its claims carry the time they were made, so
    // one made again in the next second is another warrant with the same
    // id (403 `warrant_id_conflict`, seen in CI).
    let (w_b, w_a) = (c.warrant("W-B", 100), c.warrant("W-A", 100));
    let body = |warrant: &serde_json::Value, n: usize| serde_json::json!({"warrant": warrant, "envelopes": [c.envelope(n)]});
    let (a, b) = (&c.clients[0], &c.clients[1]);
    let r = vault::post(&b.agency, "/v1/unwrap", &body(&w_b, 0));
    assert_eq!(r.status, 200, "{}", r.text());
    let b_size = vault::tree_size(&b.auditor);
    for n in 1..3 {
        let r = vault::post(&a.agency, "/v1/unwrap", &body(&w_a, n));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let a_size = vault::tree_size(&a.auditor);
    assert!(a_size > b_size + 1, "{a_size} {b_size}");

    // Rewrite the last leaf A signed, then its subtree hashes upwards.
    let mut db = c.db.client();
    let idx = (a_size - 1) as i64;
    db.execute(
        "UPDATE audit_leaves SET leaf = convert_to(replace(convert_from(leaf, 'UTF8'), \
         '\"W-A\"', '\"W-Z\"'), 'UTF8') WHERE idx = $1",
        &[&idx],
    )
    .unwrap();
    let leaf: Vec<u8> = db
        .query_one("SELECT leaf FROM audit_leaves WHERE idx = $1", &[&idx])
        .unwrap()
        .get(0);
    assert!(String::from_utf8_lossy(&leaf).contains("W-Z"));
    let node = |db: &mut postgres::Client, level: i16, i: i64| -> Option<Hash> {
        db.query_opt(
            "SELECT hash FROM audit_nodes WHERE level = $1 AND idx = $2",
            &[&level, &i],
        )
        .unwrap()
        .map(|row| row.get::<_, Vec<u8>>(0).try_into().unwrap())
    };
    let mut hash = leaf_hash(&leaf);
    let (mut level, mut i) = (0i16, idx);
    while node(&mut db, level, i).is_some() {
        db.execute(
            "UPDATE audit_nodes SET hash = $1 WHERE level = $2 AND idx = $3",
            &[&hash.as_slice(), &level, &i],
        )
        .unwrap();
        let sibling = node(&mut db, level, i ^ 1);
        let parent = node(&mut db, level + 1, i / 2);
        match (sibling, parent) {
            (Some(sibling), Some(_)) => {
                hash = if i % 2 == 0 {
                    node_hash(&hash, &sibling)
                } else {
                    node_hash(&sibling, &hash)
                };
            }
            _ => break,
        }
        level += 1;
        i /= 2;
    }

    let message = b
        .auditor
        .get("/v1/audit/checkpoint")
        .assert_error(503, "log_inconsistent");
    assert!(message.contains("audit log"), "{message}");
    vault::post(&b.agency, "/v1/unwrap", &body(&w_b, 3)).assert_error(503, "log_inconsistent");
    let stderr = c.daemons[1].stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("audit log inconsistent") && l.contains(&format!("size {a_size}"))),
        "{stderr}"
    );
}

/// Three envelopes of a new warrant `id` opened through replica 0; the
/// log's size afterwards, as replica 1 reads it: more than 3 leaves (the
/// first leaves of each start come before them), fewer than a tile's 256.
fn three_opened(c: &Cluster, id: &str) -> u64 {
    let envelopes: Vec<_> = (0..3).map(|n| c.envelope(n)).collect();
    let r = vault::post(
        &c.clients[0].agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": c.warrant(id, 10), "envelopes": envelopes}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let size = vault::tree_size(&c.clients[1].auditor);
    assert!((4..256).contains(&size), "{size}");
    size
}

/// An entry bundle on PostgreSQL: a leaf row deleted behind lavd, below
/// the head the same read counts (`AuditStore::leaves_vouched`), marks the
/// log inconsistent on the replica that reads it (503 `log_inconsistent`),
/// and on another replica when it reads it too; rows a read on a standby
/// that is behind would miss are not taken for this (the head would not
/// count them: `store_conformance.rs`).
#[test]
fn a_leaf_row_deleted_behind_the_replicas_is_found_by_its_entry_bundle() {
    let c = Cluster::start();
    let size = three_opened(&c, "W-DEL");
    let bundle = format!("/v1/log/tile/entries/000.p/{size}");
    for client in &c.clients[1..] {
        assert_eq!(client.auditor.get(&bundle).status, 200);
    }
    let deleted =
        c.db.client()
            .execute("DELETE FROM audit_leaves WHERE idx = 1", &[])
            .unwrap();
    assert_eq!(deleted, 1);
    for (i, client) in c.clients.iter().enumerate().skip(1) {
        client
            .auditor
            .get(&bundle)
            .assert_error(503, "log_inconsistent");
        let stderr = c.daemons[i].stderr();
        assert!(
            stderr.contains("a leaf row deleted behind lavd"),
            "replica {i}: {stderr}"
        );
    }
}

/// A hash tile on PostgreSQL, as the entry bundle above. First a replica
/// whose read is behind, imitated: the head moved back below the tile's
/// last leaf and that leaf's node row gone, as on a standby that has not
/// replayed the append; the tile is 503 `store_unavailable`, and the log
/// is not marked (`/readyz` still ready). Then, with the store whole again,
/// a node row deleted behind lavd below the head the same read counts
/// (`AuditStore::node_rows_vouched`), and a node row truncated (its length
/// check set aside; never a lagging read: rows are written whole), each
/// mark the log inconsistent on the replica that reads it (503
/// `log_inconsistent`). Before, both were 503 `store_unavailable`, the log
/// not marked and `/readyz` ready.
#[test]
fn node_rows_deleted_or_truncated_behind_the_replicas_are_found_by_their_hash_tile() {
    let c = Cluster::start();
    let size = three_opened(&c, "W-NODES");
    let tile = format!("/v1/log/tile/0/000.p/{size}");
    for client in &c.clients {
        assert_eq!(client.auditor.get(&tile).status, 200);
    }
    let mut db = c.db.client();
    let last = i64::try_from(size - 1).unwrap();
    // One row changed, on a connection or in a transaction.
    fn edit(db: &mut impl postgres::GenericClient, sql: &str) {
        assert_eq!(db.execute(sql, &[]).unwrap(), 1, "{sql}");
    }

    // Behind, imitated on the primary, read through replica 0.
    let kept: Vec<u8> = db
        .query_one(
            "SELECT hash FROM audit_nodes WHERE level = 0 AND idx = $1",
            &[&last],
        )
        .unwrap()
        .get(0);
    let mut tx = db.transaction().unwrap();
    edit(
        &mut tx,
        &format!("UPDATE audit_head SET size = {last} WHERE id = 1"),
    );
    edit(
        &mut tx,
        &format!("DELETE FROM audit_nodes WHERE level = 0 AND idx = {last}"),
    );
    tx.commit().unwrap();
    c.clients[0]
        .auditor
        .get(&tile)
        .assert_error(503, "store_unavailable");
    // A tile whose own rows are all there, but whose checking nodes (read
    // for the root) lie beyond the head: the same.
    c.clients[0]
        .auditor
        .get(&format!("/v1/log/tile/0/000.p/{last}"))
        .assert_error(503, "store_unavailable");
    let mut tx = db.transaction().unwrap();
    tx.execute(
        "INSERT INTO audit_nodes (level, idx, hash) VALUES (0, $1, $2)",
        &[&last, &kept],
    )
    .unwrap();
    edit(
        &mut tx,
        &format!("UPDATE audit_head SET size = {size} WHERE id = 1"),
    );
    tx.commit().unwrap();
    assert_eq!(c.clients[0].auditor.get(&tile).status, 200);
    c.daemons[0].wait_readyz(200);
    let stderr = c.daemons[0].stderr();
    assert!(!stderr.contains("audit log inconsistent"), "{stderr}");

    let found = |i: usize, what: &str| {
        c.clients[i]
            .auditor
            .get(&tile)
            .assert_error(503, "log_inconsistent");
        let stderr = c.daemons[i].stderr();
        assert!(stderr.contains(what), "replica {i}: {stderr}");
        c.daemons[i].wait_readyz(503);
    };
    // Deleted: found by replica 1.
    edit(
        &mut db,
        "DELETE FROM audit_nodes WHERE level = 0 AND idx = 1",
    );
    found(1, "a node row deleted behind lavd");
    // Another truncated (its length check set aside, as someone with the
    // schema's rights can): found by replica 2, lengths being checked
    // before gaps.
    db.batch_execute("ALTER TABLE audit_nodes DROP CONSTRAINT audit_nodes_hash_check")
        .unwrap();
    edit(
        &mut db,
        "UPDATE audit_nodes SET hash = substr(hash, 1, 31) WHERE level = 0 AND idx = 2",
    );
    found(2, "is 31 bytes, not a hash: a node row edited behind lavd");
}

/// PROTOCOL §7's destruction across replicas, while unwraps of the key are
/// in flight on other replicas. `lavd keys destroy` runs as its own process
/// on the shared database and token; the fault module's `hang` pins each
/// order, as `key_destroyed_in_flight.rs` does on one daemon:
///
/// 1. replica B's unwrap of `E-2` has its intent committed and its secret
///    derived, and waits in the call that destroys the derived secret;
///    `E-2`'s destruction commits meanwhile. B must see it in the shared
///    store: `key_destroyed`, nothing spent, its leaf after the
///    destruction's and denied;
/// 2. replica C's unwrap of `E-3` has its leaf and spend committed and
///    waits in its checkpoint's signature; `E-3`'s destruction commits
///    meanwhile. C must not release it: `key_destroyed`, its unit spent,
///    counted apart.
///
/// Afterwards replica A, which took no part, refuses both keys.
#[test]
fn a_key_destroyed_through_the_store_stops_unwraps_in_flight_on_other_replicas() {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(20);
    let t = softhsm_tests::TestToken::new();
    let shim = softhsm_tests::Shim::new(&t);
    // Long enough that the held calls are not timed out.
    let c = Cluster::start_with_hsm(t, "", Some(&shim), "", "call_timeout_ms = 60000\n");
    vault::generate_escrow_key(&c.t, "E-2");
    vault::generate_escrow_key(&c.t, "E-3");
    let (a, b, z) = (&c.clients[0], &c.clients[1], &c.clients[2]);
    let seal = |kid: &str, tag: &str| {
        vault::seal(
            &vault::published_key(&b.provider, kid),
            kid,
            vault::TARGET,
            time::OffsetDateTime::now_utc() - time::Duration::hours(1),
            tag,
            &[7; 32],
        )
    };
    let (doomed_b, doomed_c) = (seal("E-2", "in-flight"), seal("E-3", "at-signing"));
    // Sealed now: a destroyed key is no longer published.
    let later = [seal("E-2", "later"), seal("E-3", "later")];
    // One unit each.
    let warrants: std::collections::HashMap<&str, serde_json::Value> =
        ["W-XD-A", "W-XD-B", "W-XD-C"]
            .into_iter()
            .map(|id| (id, c.warrant(id, 1)))
            .collect();
    let unwrap = |on: &vault::Clients, id: &str, envelope: &serde_json::Value| {
        vault::post(
            &on.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrants[id], "envelopes": [envelope]}),
        )
    };
    let mut db = c.db.client();
    let mut query =
        |sql: &str, kid_or_id: &str| -> i64 { db.query_one(sql, &[&kid_or_id]).unwrap().get(0) };
    let destroy = |kid: &str| {
        c.t.lavd_with_config(&[
            "keys", "destroy", "--kid", kid, "--force", "--reason", "seized",
        ])
    };
    let destroyed = "SELECT count(*) FROM escrow_keys WHERE kid = $1 AND destroyed_at IS NOT NULL";
    let intents = "SELECT count(*) FROM open_intents WHERE warrant_id = $1";
    let spent = "SELECT coalesce(max(spent), 0) FROM warrants WHERE id = $1";

    // 1. On B, held after the derive; the destruction commits meanwhile.
    shim.set("fault = hang\nfault_calls = C_DestroyObject");
    shim.reset_stats();
    let (reply_b, destroyed_2) = std::thread::scope(|s| {
        let _release = shim.releasing();
        let request = s.spawn(|| unwrap(b, "W-XD-B", &doomed_b));
        eventually("B's intent and derived secret", WAIT, || {
            query(intents, "W-XD-B") == 1 && shim.faults() > 0
        });
        assert!(!request.is_finished());
        let destruction = s.spawn(|| destroy("E-2"));
        // Its token call waits too.
        eventually("E-2's committed destruction", WAIT, || {
            query(destroyed, "E-2") == 1
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!request.is_finished(), "B answered while held");
        assert!(!destruction.is_finished(), "E-2 left the token while held");
        shim.set("");
        (request.join().unwrap(), destruction.join().unwrap())
    });
    assert_ok(&destroyed_2);
    assert_eq!(reply_b.status, 200, "{}", reply_b.text());
    let reply_b = reply_b.json();
    assert_eq!(vault::statuses(&reply_b), ["key_destroyed"]);
    assert_eq!(query(spent, "W-XD-B"), 0);
    assert_eq!(query(intents, "W-XD-B"), 0);

    // 2. On C, held in its checkpoint's signature after its audit commit.
    shim.set("fault = hang\nfault_calls = C_Sign");
    shim.reset_stats();
    let (reply_c, destroyed_3) = std::thread::scope(|s| {
        let _release = shim.releasing();
        let request = s.spawn(|| unwrap(z, "W-XD-C", &doomed_c));
        eventually("C's audit commit and held signature", WAIT, || {
            query(spent, "W-XD-C") == 1 && shim.faults() > 0
        });
        // Signs nothing: it runs to the end while C waits.
        let destruction = destroy("E-3");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!request.is_finished(), "C answered while held");
        shim.set("");
        (request.join().unwrap(), destruction)
    });
    assert_ok(&destroyed_3);
    assert_eq!(reply_c.status, 200, "{}", reply_c.text());
    let reply_c = reply_c.json();
    assert_eq!(vault::statuses(&reply_c), ["key_destroyed"]);
    assert_eq!(query(spent, "W-XD-C"), 1);
    let unreleased = "lavd_envelopes_unreleased_total{code=\"key_destroyed\"}";
    assert_eq!(c.daemons[2].metric(unreleased), 1.0);

    // The one log, read through A: B's leaf after E-2's destruction and
    // denied; C's opened, before E-3's destruction; no other leaf opened
    // either key.
    let log = vault::entries(&a.auditor, 0, vault::tree_size(&a.auditor));
    let destruction_of = |kid: &str| {
        log.iter()
            .find(|e| e.leaf["event"] == "key_destroyed" && e.leaf["kid"] == kid)
            .unwrap_or_else(|| panic!("no key_destroyed leaf for {kid}"))
            .index
    };
    let leaf_of = |reply: &serde_json::Value| {
        let first = reply["audit"]["first_index"].as_u64().unwrap();
        (first, &log[usize::try_from(first).unwrap()].leaf)
    };
    let (b_at, b_leaf) = leaf_of(&reply_b);
    assert!(b_at > destruction_of("E-2"), "{b_at}");
    assert_eq!(b_leaf["outcome"], "denied");
    assert_eq!(b_leaf["reason"], "key_destroyed");
    let (c_at, c_leaf) = leaf_of(&reply_c);
    assert!(c_at < destruction_of("E-3"), "{c_at}");
    assert_eq!(c_leaf["outcome"], "opened");
    let opened: Vec<u64> = log
        .iter()
        .filter(|e| {
            e.leaf["outcome"] == "opened" && (e.leaf["kid"] == "E-2" || e.leaf["kid"] == "E-3")
        })
        .map(|e| e.index)
        .collect();
    assert_eq!(opened, [c_at]);

    // A, which took no part, refuses both keys; B's unit was not spent.
    for envelope in &later {
        let r = unwrap(a, "W-XD-A", envelope);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["key_destroyed"], "{envelope}");
    }
    let r = unwrap(a, "W-XD-B", &c.envelope(0));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"]);
}
