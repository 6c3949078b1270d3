//! The audit log's SQLite storage: group commit under concurrency, proofs
//! that match an independent in-memory tree, and batches whose budget spend
//! fails committing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use lavd::audit::leaf::{Digest, Event, KeyGenerated, Unwrap, UnwrapOutcome, WarrantRef};
use lavd::audit::merkle::{self, MemoryTree};
use lavd::codec::parse_time;
use lavd::store::{AuditAppend, AuditStore, Spend, Store, StoreError, WarrantRecord, WarrantStore};
use time::OffsetDateTime;

fn key_event(i: usize) -> Event {
    KeyGenerated::new(
        &format!("k{i}"),
        parse_time("2026-12-01T00:00:00Z").unwrap(),
        parse_time("2027-01-01T00:00:00Z").unwrap(),
        parse_time("2028-01-01T00:00:00Z").unwrap(),
        None,
    )
    .unwrap()
    .into()
}

fn now() -> OffsetDateTime {
    parse_time("2026-12-05T10:00:00Z").unwrap()
}

fn batch(events: Vec<Event>) -> AuditAppend {
    AuditAppend {
        events,
        time: now(),
        spend: Spend::None,
    }
}

#[test]
fn concurrent_appends_share_commits_and_land_contiguously() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    const THREADS: usize = 32;
    const PER_THREAD: usize = 20;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &store;
                s.spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            store
                                .append(batch(vec![key_event(t * 100 + i), key_event(t * 100 + i)]))
                                .unwrap()
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
    let appends = THREADS * PER_THREAD;
    assert_eq!(results.len(), appends);
    // Every leaf index is used exactly once, and batches are contiguous.
    let mut indices = BTreeSet::new();
    for r in &results {
        assert_eq!(r.count, 2);
        assert!(r.tree_size >= r.first_index + r.count);
        for i in r.first_index..r.first_index + r.count {
            assert!(indices.insert(i), "index {i} used twice");
        }
    }
    assert_eq!(indices.len(), 2 * appends);
    assert_eq!(*indices.iter().next_back().unwrap(), 2 * appends as u64 - 1);
    assert_eq!(store.tree_size().unwrap(), 2 * appends as u64);
    // Group commit: far fewer transactions (fsyncs) than appends.
    let commits = store.audit_commits();
    println!("{appends} appends in {commits} commits");
    assert!(
        commits * 4 <= appends as u64,
        "{commits} commits for {appends} appends"
    );

    // Each leaf's seq is its index.
    for (index, leaf) in store.leaves(0, 2 * appends as u64).unwrap() {
        let v: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
        assert_eq!(v["seq"], index);
    }
}

#[test]
fn stored_roots_and_proofs_match_an_independent_tree() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    let mut memory = MemoryTree::new();
    let mut roots = vec![merkle::empty_root()];
    for i in 0..70 {
        let n = 1 + i % 3;
        let a = store
            .append(batch((0..n).map(|j| key_event(i * 10 + j)).collect()))
            .unwrap();
        for (_, leaf) in store
            .leaves(a.first_index, a.first_index + a.count)
            .unwrap()
        {
            memory.push_leaf(&leaf);
            roots.push(merkle::root(&memory, memory.size()).unwrap());
        }
    }
    let size = store.tree_size().unwrap();
    assert_eq!(size, memory.size());
    for s in [1, 2, 3, 7, 8, 9, 64, 100, size] {
        assert_eq!(store.root(s).unwrap(), roots[s as usize]);
        for index in [0, s / 2, s - 1] {
            let proof = store.inclusion_proof(index, s).unwrap();
            assert_eq!(proof, merkle::inclusion_proof(&memory, index, s).unwrap());
        }
        for from in [0, 1, s / 3, s] {
            let proof = store.consistency_proof(from, s).unwrap();
            assert_eq!(proof, merkle::consistency_proof(&memory, from, s).unwrap());
        }
    }
    // Reopening finds the same tree.
    drop(store);
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    assert_eq!(store.root(size).unwrap(), roots[size as usize]);
    // Outside the tree is a bad request, not a panic or a 500.
    for err in [
        store.root(size + 1).unwrap_err(),
        store.inclusion_proof(size, size).unwrap_err(),
        store.consistency_proof(3, 2).unwrap_err(),
        store.consistency_proof(1, size + 1).unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::BadProofRequest(_)), "{err}");
    }
}

fn warrant(id: &str, max: u64) -> WarrantRecord {
    WarrantRecord {
        id: id.into(),
        payload_digest: [1; 32],
        normalized_digest: [2; 32],
        emergency: false,
        max_unwraps: max,
        seen_at: now(),
    }
}

fn opened_event(id: &str) -> Event {
    let w = WarrantRef {
        id,
        digest: Digest::of_warrant_payload(b"payload"),
        emergency: false,
    };
    Unwrap::new(
        "spiffe://agency.example/lea",
        &w,
        Some("2026-12"),
        Some(Digest::of_envelope(b"{}", &[4; 65])),
        UnwrapOutcome::Opened,
    )
    .unwrap()
    .into()
}

#[test]
fn a_budget_spend_commits_with_its_leaves_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    store.register(&warrant("W-1", 3)).unwrap();

    let r = store.reserve("W-1", 2).unwrap();
    assert_eq!(r.granted(), 2);
    let a = store
        .append(AuditAppend {
            events: vec![opened_event("W-1"), opened_event("W-1")],
            time: now(),
            spend: Spend::Settle {
                reservation: r,
                opened: 2,
            },
        })
        .unwrap();
    assert_eq!((a.first_index, a.count), (0, 2));
    assert_eq!(store.spent("W-1").unwrap(), Some(2));

    // Settling more than was reserved fails: no leaves, no spend, and the
    // reservation is given back.
    let r = store.reserve("W-1", 1).unwrap();
    let err = store
        .append(AuditAppend {
            events: vec![opened_event("W-1"), opened_event("W-1")],
            time: now(),
            spend: Spend::Settle {
                reservation: r,
                opened: 2,
            },
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SettleExceedsReservation { .. }),
        "{err}"
    );
    assert_eq!(store.tree_size().unwrap(), 2);
    assert_eq!(store.spent("W-1").unwrap(), Some(2));
    assert_eq!(store.reserve("W-1", 5).unwrap().granted(), 1);
}

fn denied_event(id: &str) -> Event {
    let w = WarrantRef {
        id,
        digest: Digest::of_warrant_payload(b"payload"),
        emergency: false,
    };
    Unwrap::new(
        "spiffe://agency.example/lea",
        &w,
        Some("2026-12"),
        Some(Digest::of_envelope(b"{}", &[4; 65])),
        UnwrapOutcome::Denied(lavd::audit::leaf::DenyReason::OutOfWindow),
    )
    .unwrap()
    .into()
}

fn revocation(id: &str) -> AuditAppend {
    AuditAppend {
        events: vec![lavd::audit::leaf::Revocation::new(
            "spiffe://vault.example/admin",
            id,
            "quashed",
            None,
        )
        .unwrap()
        .into()],
        time: now(),
        spend: Spend::Revoke(lavd::store::Revocation {
            id: id.into(),
            reason: "quashed".into(),
            revoked_by: "spiffe://vault.example/admin".into(),
            revoked_at: now(),
        }),
    }
}

/// PROTOCOL §8: a settle that commits after the warrant's revocation spends
/// nothing and writes the leaves that would have said `opened` as denied
/// `warrant_revoked`; other denials keep their reason. A settle before the
/// revocation is untouched.
#[test]
fn a_settle_after_a_committed_revocation_opens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    store.register(&warrant("W-1", 10)).unwrap();
    store.register(&warrant("W-2", 10)).unwrap();

    // Reserved before the revocation, settled after it.
    let late = store.reserve("W-1", 2).unwrap();
    let early = store.reserve("W-2", 1).unwrap();
    let before = store
        .append(AuditAppend {
            events: vec![opened_event("W-2")],
            time: now(),
            spend: Spend::Settle {
                reservation: early,
                opened: 1,
            },
        })
        .unwrap();
    assert!(!before.revoked_in_flight);
    let rev = store.append(revocation("W-1")).unwrap();
    assert!(rev.newly_revoked);
    let after = store
        .append(AuditAppend {
            events: vec![
                opened_event("W-1"),
                denied_event("W-1"),
                opened_event("W-1"),
            ],
            time: now(),
            spend: Spend::Settle {
                reservation: late,
                opened: 2,
            },
        })
        .unwrap();
    assert!(after.revoked_in_flight);
    assert!(after.first_index > rev.first_index);
    assert_eq!(store.spent("W-1").unwrap(), Some(0));
    assert_eq!(store.spent("W-2").unwrap(), Some(1));
    let leaves = store
        .leaves(after.first_index, after.first_index + after.count)
        .unwrap();
    let outcomes: Vec<(String, String)> = leaves
        .iter()
        .map(|(_, leaf)| {
            let v: serde_json::Value = serde_json::from_slice(leaf).unwrap();
            (
                v["outcome"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("denied", "warrant_revoked"),
            ("denied", "out_of_window"),
            ("denied", "warrant_revoked"),
        ]
        .map(|(o, r)| (o.to_string(), r.to_string()))
    );
    // The leaves parse as valid events, and the reservation was settled:
    // nothing is left reserved (the store refuses new reservations anyway).
    for (_, leaf) in &leaves {
        lavd::audit::leaf::Leaf::parse(leaf).unwrap();
    }
    assert!(matches!(
        store.reserve("W-1", 1),
        Err(StoreError::WarrantRevoked(_))
    ));
}

/// The revocation and the settle in one group commit: the order of the
/// batches in the group decides, as it decides their order in the log.
#[test]
fn a_revocation_earlier_in_the_same_group_is_seen_by_the_settle() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("lavd.db")).unwrap();
    for trial in 0..40 {
        let id = format!("W-{trial}");
        store.register(&warrant(&id, 10)).unwrap();
        let r = store.reserve(&id, 1).unwrap();
        let (settled, revoked) = std::thread::scope(|s| {
            let settle = s.spawn(|| {
                store
                    .append(AuditAppend {
                        events: vec![opened_event(&id)],
                        time: now(),
                        spend: Spend::Settle {
                            reservation: r,
                            opened: 1,
                        },
                    })
                    .unwrap()
            });
            let revoke = s.spawn(|| store.append(revocation(&id)).unwrap());
            (settle.join().unwrap(), revoke.join().unwrap())
        });
        let leaf = &store
            .leaves(settled.first_index, settled.first_index + 1)
            .unwrap()[0]
            .1;
        let v: serde_json::Value = serde_json::from_slice(leaf).unwrap();
        if settled.first_index > revoked.first_index {
            assert!(settled.revoked_in_flight, "trial {trial}");
            assert_eq!(v["reason"], "warrant_revoked");
            assert_eq!(store.spent(&id).unwrap(), Some(0));
        } else {
            assert!(!settled.revoked_in_flight, "trial {trial}");
            assert_eq!(v["outcome"], "opened");
            assert_eq!(store.spent(&id).unwrap(), Some(1));
        }
    }
}
