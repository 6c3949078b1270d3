//! The audit log's SQLite storage: group commit under concurrency, batches
//! whose budget spend fails committing nothing, and a revocation earlier in
//! the same group seen by the settle. Proofs against an independent tree
//! and a settle after a committed revocation are in the store conformance
//! suite (`softhsm-tests/tests/store_conformance.rs`), on SQLite and
//! PostgreSQL alike.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use lavd::audit::leaf::{Digest, Event, KeyGenerated, Unwrap, UnwrapOutcome, WarrantRef};
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
            assert!(settled.withdrawn.revoked, "trial {trial}");
            assert_eq!(v["reason"], "warrant_revoked");
            assert_eq!(store.spent(&id).unwrap(), Some(0));
        } else {
            assert!(!settled.withdrawn.revoked, "trial {trial}");
            assert_eq!(v["outcome"], "opened");
            assert_eq!(store.spent(&id).unwrap(), Some(1));
        }
    }
}
