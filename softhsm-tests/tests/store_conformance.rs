//! One store conformance suite, run against both backends: SQLite (one
//! process, one store) and PostgreSQL (a fresh database per test, and
//! several `Store`s on it standing in for replicas). Then the rules only
//! PostgreSQL has: reservation leases, the schema version, an unreachable
//! server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lavd::audit::leaf::{Digest, Event, KeyGenerated, Unwrap, UnwrapOutcome, WarrantRef};
use lavd::audit::merkle::{self, MemoryTree};
use lavd::codec::parse_time;
use lavd::jwk::P256PrivateKey;
use lavd::store::{
    AuditAppend, AuditStore, Cosignature, KeyRecord, KeyStore, PgStore, Registration, Reservation,
    Revocation, Spend, Store, StoreError, StoreSettings, WarrantRecord, WarrantStore,
};
use softhsm_tests::pg::TestDb;
use time::OffsetDateTime;

/// A database and how to open stores on it.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(TestDb),
}

impl Backend {
    fn sqlite() -> Self {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    fn postgres() -> Self {
        Backend::Postgres(TestDb::create())
    }

    fn settings(&self) -> StoreSettings {
        match self {
            Backend::Sqlite(dir) => StoreSettings::Sqlite {
                path: dir.path().join("lavd.db"),
            },
            Backend::Postgres(db) => StoreSettings::Postgres(db.settings()),
        }
    }

    fn open(&self) -> Store {
        match self {
            Backend::Sqlite(dir) => Store::open(&dir.path().join("lavd.db")).unwrap(),
            Backend::Postgres(db) => {
                Store::open_settings(&StoreSettings::Postgres(db.settings())).unwrap()
            }
        }
    }

    /// The stores that share the database concurrently: three "replicas"
    /// on PostgreSQL; one on SQLite (one process per file).
    fn replicas(&self) -> Vec<Store> {
        match self {
            Backend::Sqlite(_) => vec![self.open()],
            Backend::Postgres(_) => (0..3).map(|_| self.open()).collect(),
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Backend::sqlite()); })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(&super::Backend::postgres()); })*
        }
    };
}

conformance!(
    kids_are_unique_and_the_first_destruction_is_kept,
    warrant_ids_are_first_seen_and_only_urgent_to_full_may_change,
    racing_registrations_agree_on_one_outcome,
    grants_are_partial_and_failed_settles_give_back,
    the_budget_is_exact_under_concurrent_replicas,
    a_settle_after_a_committed_revocation_opens_nothing,
    a_settle_after_a_committed_destruction_opens_nothing_of_that_key,
    concurrent_appends_land_contiguously_in_one_log,
    a_failed_batch_fails_alone_in_its_group,
    stored_roots_and_proofs_match_an_independent_tree,
    checkpoints_are_kept_by_size,
    cosignatures_are_kept_per_size_and_witness_and_read_newest_first,
    open_intents_are_written_with_the_grant_and_settled_once,
    a_store_is_probed_without_being_made,
    a_read_of_leaves_vouches_for_what_its_head_counts,
    a_read_of_nodes_vouches_for_what_its_head_counts,
);

/// `leaves_vouched`, what the entry-bundle route tells a deleted leaf row
/// from a read that is only behind with: SQLite vouches for every leaf
/// (its one file is never behind); PostgreSQL for those below the head the
/// same statement reads, so rows missing below it were deleted, and a
/// range past it is not vouched for.
fn a_read_of_leaves_vouches_for_what_its_head_counts(b: &Backend) {
    use lavd::store::Vouched;
    let store = b.open();
    store
        .append(batch((0..3).map(key_event).collect()))
        .unwrap();
    let (rows, vouched) = store.leaves_vouched(0, 3).unwrap();
    assert_eq!(rows, store.leaves(0, 3).unwrap());
    assert_eq!(rows.len(), 3);
    let (past, vouched_past) = store.leaves_vouched(2, 5).unwrap();
    assert_eq!(past.len(), 1);
    match b {
        Backend::Sqlite(_) => {
            assert_eq!(vouched, Vouched::All);
            assert!(vouched_past.covers(5));
        }
        Backend::Postgres(_) => {
            assert_eq!(vouched, Vouched::Below(3));
            assert!(vouched.covers(3));
            assert!(!vouched_past.covers(5));
        }
    }
    // A middle row deleted behind lavd: still vouched for, so missing.
    let delete = "DELETE FROM audit_leaves WHERE idx = 1";
    match b {
        Backend::Sqlite(dir) => {
            rusqlite::Connection::open(dir.path().join("lavd.db"))
                .unwrap()
                .execute(delete, [])
                .unwrap();
        }
        Backend::Postgres(db) => {
            db.client().execute(delete, &[]).unwrap();
        }
    }
    let (rows, vouched) = store.leaves_vouched(0, 3).unwrap();
    assert_eq!(
        rows.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 2],
        "the deleted row is not read"
    );
    assert!(vouched.covers(3), "{vouched:?}");
}

/// `node_rows_vouched`, the same for the node rows a tile is made of: the
/// rows as stored (bytes unchecked), and on PostgreSQL the head the same
/// statement reads, so that a node row missing below it was deleted.
fn a_read_of_nodes_vouches_for_what_its_head_counts(b: &Backend) {
    use lavd::store::Vouched;
    let store = b.open();
    store
        .append(batch((0..5).map(key_event).collect()))
        .unwrap();
    // Level 1: the subtrees of leaves 0–1 and 2–3 are complete.
    let (rows, vouched) = store.node_rows_vouched(1, 0, 2).unwrap();
    let hashes: Vec<Vec<u8>> = store
        .node_hashes(1, 0, 2)
        .unwrap()
        .iter()
        .map(|h| h.to_vec())
        .collect();
    assert_eq!(
        rows,
        [(0, hashes[0].clone()), (1, hashes[1].clone())],
        "the stored rows"
    );
    match b {
        Backend::Sqlite(_) => assert_eq!(vouched, Vouched::All),
        Backend::Postgres(_) => {
            assert_eq!(vouched, Vouched::Below(5));
            // (1, 2) would need 6 leaves: not counted.
            assert!(!vouched.covers(6));
        }
    }
    // A row deleted and another truncated behind lavd (its length check
    // set aside, as someone with the schema's rights can): read as they
    // are.
    let edit = [
        "DELETE FROM audit_nodes WHERE level = 0 AND idx = 1",
        "UPDATE audit_nodes SET hash = substr(hash, 1, 31) WHERE level = 0 AND idx = 2",
    ];
    match b {
        Backend::Sqlite(dir) => {
            let c = rusqlite::Connection::open(dir.path().join("lavd.db")).unwrap();
            c.execute_batch("PRAGMA ignore_check_constraints = ON")
                .unwrap();
            for sql in edit {
                assert_eq!(c.execute(sql, []).unwrap(), 1, "{sql}");
            }
        }
        Backend::Postgres(db) => {
            let mut c = db.client();
            c.batch_execute("ALTER TABLE audit_nodes DROP CONSTRAINT audit_nodes_hash_check")
                .unwrap();
            for sql in edit {
                assert_eq!(c.execute(sql, &[]).unwrap(), 1, "{sql}");
            }
        }
    }
    let (rows, vouched) = store.node_rows_vouched(0, 0, 4).unwrap();
    assert_eq!(
        rows.iter().map(|(i, h)| (*i, h.len())).collect::<Vec<_>>(),
        [(0, 32), (2, 31), (3, 32)]
    );
    assert!(vouched.covers(4), "{vouched:?}");
    // `node_hashes` refuses both.
    for (start, why) in [(0, "(0, 1) is missing"), (2, "(0, 2) is not 32 bytes")] {
        match store.node_hashes(0, start, 4) {
            Err(StoreError::Corrupt { what, .. }) => assert!(what.contains(why), "{what}"),
            other => panic!("{other:?}"),
        }
    }
}

/// The look that `lavd keys list`/`destroy` and `discard-orphan` take
/// before opening a store: a database or file lavd never wrote is named as
/// no store, and looking makes nothing (before, PostgreSQL was migrated
/// and SQLite created, and the retention job found nothing due); once lavd
/// made the store, it is one.
fn a_store_is_probed_without_being_made(b: &Backend) {
    let settings = b.settings();
    for _ in 0..2 {
        let why = lavd::store::probe_existing(&settings)
            .unwrap()
            .expect_err("nothing was made there");
        assert!(
            why.contains("does not exist") || why.contains("is not a lavd store"),
            "{why}"
        );
    }
    match b {
        Backend::Sqlite(dir) => assert!(!dir.path().join("lavd.db").exists()),
        // Another application's migration table of the same name, with
        // versions lavd's would read, is not lavd's schema either.
        Backend::Postgres(db) => {
            db.client()
                .batch_execute(
                    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY); \
                     INSERT INTO schema_version VALUES (1), (2)",
                )
                .unwrap();
            let why = lavd::store::probe_existing(&settings)
                .unwrap()
                .expect_err("another application's table");
            assert!(why.contains("is not a lavd store"), "{why}");
            db.client()
                .batch_execute("DROP TABLE schema_version")
                .unwrap();
        }
    }
    let store = b.open();
    assert_eq!(lavd::store::probe_existing(&settings).unwrap(), Ok(()));
    // The schema alone begins no log: a store that may be made there is
    // still new (refused beside a token holding escrow keys).
    let why = lavd::store::probe_log_begun(&settings)
        .unwrap()
        .expect_err("no leaf yet");
    assert!(
        why.contains("holds lavd's schema but no audit leaf"),
        "{why}"
    );
    store.append(batch(vec![key_event(0)])).unwrap();
    assert_eq!(lavd::store::probe_log_begun(&settings).unwrap(), Ok(()));
}

fn now() -> OffsetDateTime {
    parse_time("2026-12-05T10:00:00Z").unwrap()
}

fn key_record(kid: &str) -> KeyRecord {
    KeyRecord {
        kid: kid.into(),
        public: P256PrivateKey::generate().unwrap().public().clone(),
        not_before: now(),
        not_after: now() + time::Duration::days(30),
        destroy_after: now() + time::Duration::days(365),
        created_at: now(),
        destroyed_at: None,
        destroy_reason: None,
    }
}

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

fn batch(events: Vec<Event>) -> AuditAppend {
    AuditAppend {
        events,
        time: now(),
        spend: Spend::None,
    }
}

fn record(id: &str, payload: u8, normalized: u8, emergency: bool, max: u64) -> WarrantRecord {
    WarrantRecord {
        id: id.into(),
        payload_digest: [payload; 32],
        normalized_digest: [normalized; 32],
        emergency,
        max_unwraps: max,
        seen_at: now(),
    }
}

fn event(id: &str, outcome: UnwrapOutcome) -> Event {
    event_of_key(id, "2026-12", outcome)
}

fn event_of_key(id: &str, kid: &str, outcome: UnwrapOutcome) -> Event {
    let w = WarrantRef {
        id,
        digest: Digest::of_warrant_payload(b"payload"),
        emergency: false,
    };
    Unwrap::new(
        "spiffe://agency.example/lea",
        &w,
        Some(kid),
        Some(Digest::of_envelope(b"{}", &[4; 65])),
        outcome,
    )
    .unwrap()
    .into()
}

/// The open intent of `n` candidates of warrant `id`: each leaf denied
/// `open_interrupted`, serialized as the unwrap path writes it, with its
/// own envelope digest.
fn intent(id: &str, n: u8) -> (Vec<Vec<u8>>, Vec<Unwrap>) {
    let w = WarrantRef {
        id,
        digest: Digest::of_warrant_payload(b"payload"),
        emergency: false,
    };
    let leaves: Vec<Unwrap> = (0..n)
        .map(|i| {
            let mut leaf = Unwrap::new(
                "spiffe://agency.example/lea",
                &w,
                Some("2026-12"),
                Some(Digest::of_envelope(b"{}", &[i; 65])),
                UnwrapOutcome::Opened,
            )
            .unwrap();
            leaf.deny(lavd::audit::leaf::DenyReason::OpenInterrupted);
            leaf
        })
        .collect();
    let bytes = leaves
        .iter()
        .map(|l| serde_json::to_vec(l).unwrap())
        .collect();
    (bytes, leaves)
}

fn opened(id: &str) -> Event {
    event(id, UnwrapOutcome::Opened)
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
        spend: Spend::Revoke(Revocation {
            id: id.into(),
            reason: "quashed".into(),
            revoked_by: "spiffe://vault.example/admin".into(),
            revoked_at: now(),
        }),
    }
}

fn kids_are_unique_and_the_first_destruction_is_kept(b: &Backend) {
    let rec = key_record("2026-12");
    {
        let store = b.open();
        store.insert_key(&rec).unwrap();
        assert!(matches!(
            store.insert_key(&rec),
            Err(StoreError::DuplicateKid(k)) if k == "2026-12"
        ));
    }
    let replicas = b.replicas();
    for store in &replicas {
        assert_eq!(store.list_keys().unwrap(), vec![rec.clone()]);
    }
    // Two retention jobs at once: one record, the first.
    let at = rec.created_at + time::Duration::days(1);
    std::thread::scope(|s| {
        for store in &replicas {
            s.spawn(move || store.mark_destroyed("2026-12", at, "retention").unwrap());
        }
    });
    replicas[0]
        .mark_destroyed("2026-12", at + time::Duration::days(1), "again")
        .unwrap();
    let got = replicas[replicas.len() - 1]
        .get_key("2026-12")
        .unwrap()
        .unwrap();
    assert_eq!(got.destroyed_at, Some(at));
    assert_eq!(got.destroy_reason.as_deref(), Some("retention"));
    assert!(matches!(
        replicas[0].mark_destroyed("nope", at, "x"),
        Err(StoreError::UnknownKid(_))
    ));
    assert_eq!(replicas[0].get_key("nope").unwrap(), None);
}

fn warrant_ids_are_first_seen_and_only_urgent_to_full_may_change(b: &Backend) {
    let store = b.open();
    assert_eq!(
        store.register(&record("a", 1, 9, false, 5)).unwrap(),
        Registration::New
    );
    assert_eq!(
        store.register(&record("a", 1, 9, false, 5)).unwrap(),
        Registration::Known
    );
    assert!(matches!(
        store.register(&record("a", 2, 9, false, 5)),
        Err(StoreError::WarrantIdConflict(id)) if id == "a"
    ));
    assert!(matches!(
        store.register(&record("a", 3, 9, true, 5)),
        Err(StoreError::EmergencySuperseded(id)) if id == "a"
    ));
    assert_eq!(
        store.register(&record("u", 1, 8, true, 5)).unwrap(),
        Registration::New
    );
    assert!(matches!(
        store.register(&record("u", 2, 8, true, 5)),
        Err(StoreError::WarrantIdConflict(_))
    ));
    assert!(matches!(
        store.register(&record("u", 3, 7, false, 5)),
        Err(StoreError::WarrantIdConflict(_))
    ));
    // Same claims, another budget.
    assert!(matches!(
        store.register(&record("u", 3, 8, false, 6)),
        Err(StoreError::WarrantIdConflict(_))
    ));
    let r = store.reserve("u", 2).unwrap();
    store.settle(r, 2).unwrap();
    assert_eq!(
        store.register(&record("u", 4, 8, false, 5)).unwrap(),
        Registration::Upgraded
    );
    assert_eq!(
        store.register(&record("u", 4, 8, false, 5)).unwrap(),
        Registration::Known
    );
    assert!(matches!(
        store.register(&record("u", 1, 8, true, 5)),
        Err(StoreError::EmergencySuperseded(_))
    ));
    assert_eq!(store.spent("u").unwrap(), Some(2));
    assert_eq!(store.spent("never").unwrap(), None);
}

fn racing_registrations_agree_on_one_outcome(b: &Backend) {
    let replicas = b.replicas();
    for round in 0..5 {
        let id = format!("race-{round}");
        let outcomes = |rec: WarrantRecord| -> Vec<Registration> {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..12)
                    .map(|t| {
                        let store = &replicas[t % replicas.len()];
                        let rec = rec.clone();
                        s.spawn(move || store.register(&rec).unwrap())
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let first = outcomes(record(&id, 1, 8, true, 5));
        assert_eq!(
            first.iter().filter(|r| **r == Registration::New).count(),
            1,
            "{first:?}"
        );
        assert!(first
            .iter()
            .all(|r| matches!(r, Registration::New | Registration::Known)));
        let upgrade = outcomes(record(&id, 2, 8, false, 5));
        assert_eq!(
            upgrade
                .iter()
                .filter(|r| **r == Registration::Upgraded)
                .count(),
            1,
            "{upgrade:?}"
        );
        assert!(upgrade
            .iter()
            .all(|r| matches!(r, Registration::Upgraded | Registration::Known)));
    }
}

fn grants_are_partial_and_failed_settles_give_back(b: &Backend) {
    let store = b.open();
    store.register(&record("w", 1, 1, false, 4)).unwrap();
    let a = store.reserve("w", 3).unwrap();
    assert_eq!((a.requested(), a.granted()), (3, 3));
    let bb = store.reserve("w", 3).unwrap();
    assert_eq!(bb.granted(), 1);
    let c = store.reserve("w", 1).unwrap();
    assert_eq!(c.granted(), 0);
    store.settle(c, 0).unwrap();
    store.settle(a, 2).unwrap();
    let d = store.reserve("w", 5).unwrap();
    assert_eq!(d.granted(), 1);
    assert!(matches!(
        store.settle(bb, 2),
        Err(StoreError::SettleExceedsReservation {
            granted: 1,
            opened: 2
        })
    ));
    let e = store.reserve("w", 5).unwrap();
    assert_eq!(e.granted(), 1);
    store.settle(d, 1).unwrap();
    store.settle(e, 1).unwrap();
    assert_eq!(store.spent("w").unwrap(), Some(4));
    assert_eq!(store.reserve("w", 1).unwrap().granted(), 0);
    assert!(matches!(
        store.reserve("nope", 1),
        Err(StoreError::UnknownWarrant(_))
    ));
}

/// 24 threads spread over the replicas race for the last 10 units of a
/// budget, round after round: exactly 10 are granted and spent, with their
/// leaves, each round.
fn the_budget_is_exact_under_concurrent_replicas(b: &Backend) {
    let replicas = b.replicas();
    const ROUNDS: usize = 10;
    const THREADS: usize = 24;
    for round in 0..ROUNDS {
        let id = format!("W-{round}");
        replicas[0].register(&record(&id, 1, 1, false, 50)).unwrap();
        // Spend 40 first, leaving the last 10.
        let r = replicas[0].reserve(&id, 40).unwrap();
        replicas[0].settle(r, 40).unwrap();
        let opened: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let store = &replicas[t % replicas.len()];
                    let id = id.clone();
                    s.spawn(move || {
                        let r = store.reserve(&id, 1).unwrap();
                        let granted = r.granted();
                        let outcome = if granted == 1 {
                            UnwrapOutcome::Opened
                        } else {
                            UnwrapOutcome::Denied(lavd::audit::leaf::DenyReason::BudgetExhausted)
                        };
                        store
                            .append(AuditAppend {
                                events: vec![event(&id, outcome)],
                                time: now(),
                                spend: Spend::Settle {
                                    reservation: r,
                                    opened: granted,
                                },
                            })
                            .unwrap();
                        granted as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(opened, 10, "round {round}");
        for store in &replicas {
            assert_eq!(store.spent(&id).unwrap(), Some(50));
        }
    }
}

fn a_settle_after_a_committed_revocation_opens_nothing(b: &Backend) {
    let replicas = b.replicas();
    let (a, z) = (&replicas[0], &replicas[replicas.len() - 1]);
    a.register(&record("W-1", 1, 1, false, 10)).unwrap();
    a.register(&record("W-2", 2, 2, false, 10)).unwrap();
    let late = a.reserve("W-1", 2).unwrap();
    let early = a.reserve("W-2", 1).unwrap();
    let before = a
        .append(AuditAppend {
            events: vec![opened("W-2")],
            time: now(),
            spend: Spend::Settle {
                reservation: early,
                opened: 1,
            },
        })
        .unwrap();
    assert!(!before.withdrawn.revoked);
    // The revocation commits through another replica.
    let rev = z.append(revocation("W-1")).unwrap();
    assert!(rev.newly_revoked);
    assert!(rev.warrant_seen, "W-1 was registered on another replica");
    assert!(!z.append(revocation("W-1")).unwrap().newly_revoked);
    // An id no replica has seen is revoked all the same, and said unseen.
    let unseen = z.append(revocation("W-9")).unwrap();
    assert!(unseen.newly_revoked && !unseen.warrant_seen);
    let after = a
        .append(AuditAppend {
            events: vec![
                opened("W-1"),
                event(
                    "W-1",
                    UnwrapOutcome::Denied(lavd::audit::leaf::DenyReason::OutOfWindow),
                ),
                opened("W-1"),
            ],
            time: now(),
            spend: Spend::Settle {
                reservation: late,
                opened: 2,
            },
        })
        .unwrap();
    assert!(after.withdrawn.revoked);
    assert!(after.first_index > rev.first_index);
    assert_eq!(a.spent("W-1").unwrap(), Some(0));
    assert_eq!(z.spent("W-2").unwrap(), Some(1));
    assert_eq!(
        outcomes(a, after.first_index, after.count),
        [
            ("denied", "warrant_revoked"),
            ("denied", "out_of_window"),
            ("denied", "warrant_revoked"),
        ]
        .map(|(o, r)| (o.to_string(), r.to_string()))
    );
    assert!(matches!(
        a.reserve("W-1", 1),
        Err(StoreError::WarrantRevoked(_))
    ));
    assert!(z.is_revoked("W-1").unwrap());
}

fn destruction(kid: &str) -> AuditAppend {
    AuditAppend {
        events: vec![
            lavd::audit::leaf::KeyDestroyed::new(kid, "forced", true, None)
                .unwrap()
                .into(),
        ],
        time: now(),
        spend: Spend::DestroyKey {
            kid: kid.into(),
            at: now(),
            reason: "forced: test".into(),
        },
    }
}

/// `(outcome, reason)` of leaves `[first, first + count)`.
fn outcomes(store: &impl AuditStore, first: u64, count: u64) -> Vec<(String, String)> {
    store
        .leaves(first, first + count)
        .unwrap()
        .iter()
        .map(|(_, leaf)| {
            let v: serde_json::Value = serde_json::from_slice(leaf).unwrap();
            (
                v["outcome"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

/// A key destroyed (its record and leaf committed, through another
/// replica) while an unwrap of it was in flight: the settle spends nothing
/// for that key's envelopes and writes them denied `key_destroyed`; the
/// other key's envelope opens and is spent. A second destruction of the
/// same key writes no second `key_destroyed` leaf.
fn a_settle_after_a_committed_destruction_opens_nothing_of_that_key(b: &Backend) {
    let replicas = b.replicas();
    let (a, z) = (&replicas[0], &replicas[replicas.len() - 1]);
    a.insert_key(&key_record("2026-12")).unwrap();
    a.insert_key(&key_record("2027-01")).unwrap();
    a.register(&record("W-1", 1, 1, false, 10)).unwrap();
    let reservation = a.reserve("W-1", 3).unwrap();
    assert_eq!(reservation.granted(), 3);
    let destroyed = z.append(destruction("2026-12")).unwrap();
    let size = z.tree_size().unwrap();
    assert!(matches!(
        a.append(destruction("2026-12")),
        Err(StoreError::KeyAlreadyDestroyed(kid)) if kid == "2026-12"
    ));
    assert_eq!(z.tree_size().unwrap(), size, "a second key_destroyed leaf");
    let settled = a
        .append(AuditAppend {
            events: vec![
                event_of_key("W-1", "2026-12", UnwrapOutcome::Opened),
                event_of_key("W-1", "2027-01", UnwrapOutcome::Opened),
                event_of_key("W-1", "2026-12", UnwrapOutcome::Opened),
            ],
            time: now(),
            spend: Spend::Settle {
                reservation,
                opened: 3,
            },
        })
        .unwrap();
    assert!(settled.first_index > destroyed.first_index);
    assert!(!settled.withdrawn.revoked);
    assert!(!settled.withdrawn.budget_lapsed);
    assert_eq!(settled.withdrawn.destroyed_kids, ["2026-12"]);
    assert_eq!(z.spent("W-1").unwrap(), Some(1));
    assert_eq!(
        outcomes(a, settled.first_index, settled.count),
        [
            ("denied", "key_destroyed"),
            ("opened", "-"),
            ("denied", "key_destroyed"),
        ]
        .map(|(o, r)| (o.to_string(), r.to_string()))
    );
    // The units withheld went back: 9 remain.
    assert_eq!(a.reserve("W-1", 100).unwrap().granted(), 9);
}

fn concurrent_appends_land_contiguously_in_one_log(b: &Backend) {
    let replicas = b.replicas();
    const THREADS: usize = 24;
    const PER_THREAD: usize = 15;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &replicas[t % replicas.len()];
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
    for store in &replicas {
        assert_eq!(store.tree_size().unwrap(), 2 * appends as u64);
    }
    // Each replica still group-commits: far fewer transactions than appends.
    let commits: u64 = replicas.iter().map(|s| s.audit_commits()).sum();
    println!(
        "{appends} appends in {commits} commits over {} stores",
        replicas.len()
    );
    assert!(
        commits * 2 <= appends as u64,
        "{commits} commits for {appends} appends"
    );
    for (index, leaf) in replicas[0].leaves(0, 2 * appends as u64).unwrap() {
        let v: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
        assert_eq!(v["seq"], index);
    }
}

/// Appends one leaf (index 0 on an empty log) whose commit holds its
/// transaction open in its hook for 600 ms, and meanwhile `batches`, 40 ms
/// apart: they queue, in order, and share the next transaction.
fn in_one_group(
    store: &Store,
    batches: Vec<AuditAppend>,
) -> (
    lavd::store::Appended,
    Vec<Result<lavd::store::Appended, StoreError>>,
) {
    std::thread::scope(|s| {
        let leader = s.spawn(|| {
            store
                .append_with(batch(vec![key_event(0)]), &mut |_| {
                    std::thread::sleep(Duration::from_millis(600));
                })
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(150));
        let handles: Vec<_> = batches
            .into_iter()
            .map(|b| {
                std::thread::sleep(Duration::from_millis(40));
                s.spawn(move || store.append(b))
            })
            .collect();
        let rest = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (leader.join().unwrap(), rest)
    })
}

/// A batch that fails inside a group commit (its key already stored: on
/// PostgreSQL a unique violation, which aborts the transaction up to its
/// savepoint) fails alone. The batches before and after it in the same
/// transaction land contiguously, the head and every subtree match an
/// independent tree, and the failed batch leaves nothing.
fn a_failed_batch_fails_alone_in_its_group(b: &Backend) {
    let store = b.open();
    store.insert_key(&key_record("dup")).unwrap();
    let commits = store.audit_commits();
    let batches = (1..=5).map(|i| {
        let mut b = batch(vec![key_event(i), key_event(i)]);
        if i == 3 {
            b.spend = Spend::InsertKey(key_record("dup"));
        }
        b
    });
    let (leader, rest) = in_one_group(&store, batches.collect());
    assert_eq!(
        store.audit_commits() - commits,
        2,
        "one group after the leader's"
    );
    assert_eq!((leader.first_index, leader.count), (0, 1));
    let mut expected_first = 1;
    for (i, result) in (1..=5).zip(&rest) {
        if i == 3 {
            assert!(
                matches!(result, Err(StoreError::DuplicateKid(k)) if k == "dup"),
                "{result:?}"
            );
            continue;
        }
        let a = result.as_ref().unwrap();
        assert_eq!(
            (a.first_index, a.count, a.tree_size),
            (expected_first, 2, 9)
        );
        expected_first += 2;
    }
    assert_eq!(store.tree_size().unwrap(), 9);
    let kids: Vec<_> = store
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(kids, ["dup"]);
    let mut memory = MemoryTree::new();
    let mut generated = Vec::new();
    for (index, leaf) in store.leaves(0, 9).unwrap() {
        let v: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
        assert_eq!(v["seq"], index);
        generated.push(v["kid"].as_str().unwrap().to_string());
        memory.push_leaf(&leaf);
    }
    assert_eq!(
        generated,
        ["k0", "k1", "k1", "k2", "k2", "k4", "k4", "k5", "k5"]
    );
    assert_eq!(store.root(9).unwrap(), merkle::root(&memory, 9).unwrap());
    for level in 0..=3u8 {
        let expected: Vec<_> = (0..9u64 >> level)
            .map(|i| merkle::HashReader::subtree(&memory, level, i).unwrap())
            .collect();
        assert_eq!(store.node_hashes(level, 0, 9 >> level).unwrap(), expected);
    }
}

fn stored_roots_and_proofs_match_an_independent_tree(b: &Backend) {
    let replicas = b.replicas();
    let mut memory = MemoryTree::new();
    let mut roots = vec![merkle::empty_root()];
    for i in 0..40 {
        let store = &replicas[i % replicas.len()];
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
    let store = b.open();
    let size = store.tree_size().unwrap();
    assert_eq!(size, memory.size());
    for s in [1, 2, 3, 7, 8, 9, 64, size] {
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
    // The hashes a C2SP tile is made of, in one range read: every level's
    // complete subtrees, equal to the independent tree's; a range past the
    // stored ones is an error, not a short answer.
    for level in 0..=6u8 {
        let count = size >> level;
        let hashes = store.node_hashes(level, 0, count).unwrap();
        let expected: Vec<_> = (0..count)
            .map(|i| merkle::HashReader::subtree(&memory, level, i).unwrap())
            .collect();
        assert_eq!(hashes, expected, "level {level}");
        // The root computed through them (a tile's check, in one read):
        // the tree's with them, another with any one changed.
        if count > 0 {
            assert_eq!(
                store.root_through(size, level, 0, &hashes).unwrap(),
                roots[size as usize]
            );
            let mut changed = hashes.clone();
            changed[count as usize / 2][0] ^= 1;
            assert_ne!(
                store.root_through(size, level, 0, &changed).unwrap(),
                roots[size as usize]
            );
        }
    }
    assert!(store.node_hashes(0, 0, size + 1).is_err());
    for err in [
        store.root(size + 1).unwrap_err(),
        store.inclusion_proof(size, size).unwrap_err(),
        store.consistency_proof(2, 1).unwrap_err(),
        store.consistency_proof(1, size + 1).unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::BadProofRequest(_)), "{err}");
    }
}

fn checkpoints_are_kept_by_size(b: &Backend) {
    let replicas = b.replicas();
    let (a, z) = (&replicas[0], &replicas[replicas.len() - 1]);
    assert_eq!(a.latest_checkpoint().unwrap(), None);
    a.save_checkpoint(3, "note three", now()).unwrap();
    z.save_checkpoint(7, "note seven", now()).unwrap();
    // The first note of a size is kept.
    z.save_checkpoint(3, "other", now()).unwrap();
    assert_eq!(
        z.latest_checkpoint().unwrap(),
        Some((7, "note seven".into()))
    );
    assert_eq!(
        a.checkpoints().unwrap(),
        vec![(3, "note three".into()), (7, "note seven".into())]
    );
}

/// Witness cosignatures: one line per (size, witness), the first kept; a
/// witness's last cosigned size; reads from a size, largest first, bounded;
/// visible to every replica at once (a waiting unwrap on one replica sees
/// what another replica's submitter stored).
fn cosignatures_are_kept_per_size_and_witness_and_read_newest_first(b: &Backend) {
    let replicas = b.replicas();
    let (a, z) = (&replicas[0], &replicas[replicas.len() - 1]);
    let c = |size: u64, witness: &str, line: &str| Cosignature {
        size,
        witness: witness.into(),
        line: line.into(),
    };
    assert_eq!(a.last_cosigned("w1").unwrap(), None);
    assert_eq!(a.cosignatures(0..u64::MAX, 10).unwrap(), []);
    assert_eq!(a.checkpoint_at(3).unwrap(), None);
    a.save_checkpoint(3, "note three", now()).unwrap();
    a.save_checkpoint(7, "note seven", now()).unwrap();
    assert_eq!(z.checkpoint_at(3).unwrap().as_deref(), Some("note three"));
    assert_eq!(z.checkpoint_at(4).unwrap(), None);
    a.save_cosignature(&c(3, "w1", "— w1 a\n")).unwrap();
    z.save_cosignature(&c(3, "w2", "— w2 b\n")).unwrap();
    z.save_cosignature(&c(7, "w1", "— w1 c\n")).unwrap();
    // The first line of a witness on a size is kept.
    a.save_cosignature(&c(7, "w1", "— w1 other\n")).unwrap();
    assert_eq!(z.last_cosigned("w1").unwrap(), Some(7));
    assert_eq!(a.last_cosigned("w2").unwrap(), Some(3));
    assert_eq!(a.last_cosigned("w3").unwrap(), None);
    assert_eq!(
        a.cosignatures(0..u64::MAX, 10).unwrap(),
        [
            c(7, "w1", "— w1 c\n"),
            c(3, "w1", "— w1 a\n"),
            c(3, "w2", "— w2 b\n")
        ]
    );
    assert_eq!(
        z.cosignatures(4..u64::MAX, 10).unwrap(),
        [c(7, "w1", "— w1 c\n")]
    );
    assert_eq!(z.cosignatures(0..u64::MAX, 2).unwrap().len(), 2);
    assert_eq!(z.cosignatures(8..u64::MAX, 10).unwrap(), []);
    // Below a size: what serving reads when the newest rows hold no quorum.
    assert_eq!(
        z.cosignatures(0..7, 10).unwrap(),
        [c(3, "w1", "— w1 a\n"), c(3, "w2", "— w2 b\n")]
    );
    assert_eq!(z.cosignatures(4..7, 10).unwrap(), []);
    assert_eq!(z.cosignatures(0..8, 1).unwrap(), [c(7, "w1", "— w1 c\n")]);
    // A refreshed line replaces the one its writer read, and only that
    // one: another replica's refresh in between wins.
    assert!(a
        .replace_cosignature(&c(7, "w1", "— w1 d\n"), "— w1 c\n")
        .unwrap());
    assert!(!z
        .replace_cosignature(&c(7, "w1", "— w1 e\n"), "— w1 c\n")
        .unwrap());
    assert!(!z
        .replace_cosignature(&c(8, "w1", "— w1 e\n"), "— w1 d\n")
        .unwrap());
    assert_eq!(
        z.cosignatures(4..u64::MAX, 10).unwrap(),
        [c(7, "w1", "— w1 d\n")]
    );
}

// ---- PostgreSQL only -------------------------------------------------------

/// SQLite rolls a whole transaction back by itself after some errors
/// (`RAISE(ROLLBACK)` in a trigger, as here; also a full disk, an I/O
/// error, an interrupt). A savepoint opened after that begins a new
/// transaction, which its release commits on its own. So a group whose
/// transaction SQLite rolled back fails whole, at once: the batch before
/// the failed one is gone with it, and the batch after it is not written
/// alone (which would leave a gap in the log, and spend budget for a batch
/// answered as failed).
/// Several processes opening one file that needs migrating (a service and a
/// CLI command after an upgrade; here a new file): each migration runs
/// once, under the write lock. Before, each read the version first and
/// then ran the migrations itself, and all but one failed ("table already
/// exists").
#[test]
fn sqlite_stores_opening_a_file_at_once_migrate_it_once() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lavd.db");
        let barrier = std::sync::Barrier::new(4);
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        Store::open(&path).map(drop).map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            results.iter().all(Result::is_ok),
            "round {round}: {results:?}"
        );
    }
}

#[test]
fn sqlite_a_group_whose_transaction_sqlite_rolled_back_fails_whole() {
    let b = Backend::sqlite();
    let Backend::Sqlite(dir) = &b else {
        unreachable!()
    };
    let store = b.open();
    let outside = rusqlite::Connection::open(dir.path().join("lavd.db")).unwrap();
    outside
        .execute_batch(
            "CREATE TRIGGER test_rollback BEFORE INSERT ON audit_leaves
             WHEN instr(CAST(NEW.leaf AS TEXT), '\"kid\":\"k2\"') > 0
             BEGIN SELECT RAISE(ROLLBACK, 'test: the whole transaction rolled back'); END;",
        )
        .unwrap();
    // The third batch (at index 4, after 1 + 3) completes no subtree:
    // written alone, it would need no read of the others.
    let batches = [3, 2, 1].map(|n| batch(vec![key_event(4 - n); n]));
    let (leader, rest) = in_one_group(&store, batches.into());
    assert_eq!((leader.first_index, leader.count), (0, 1));
    for result in &rest {
        assert!(
            matches!(result, Err(StoreError::CommitFailed(m))
                if m.contains("SQLite rolled the append transaction back")
                    && m.contains("the whole transaction rolled back")),
            "{result:?}"
        );
    }
    assert_eq!(store.tree_size().unwrap(), 1);
    outside.execute_batch("DROP TRIGGER test_rollback").unwrap();
    let a = store.append(batch(vec![key_event(4)])).unwrap();
    assert_eq!((a.first_index, a.tree_size), (1, 2));
    for (index, leaf) in store.leaves(0, 2).unwrap() {
        let v: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
        assert_eq!(v["seq"], index);
    }
}

/// Sleeps until a reservation made now is past `lease`.
fn past_the_lease(lease: Duration) {
    std::thread::sleep(lease + Duration::from_millis(300));
}

/// The reservation lease of [`lapsed_and_taken`]'s replicas.
const LEASE: Duration = Duration::from_secs(2);

/// Two replicas of a [`LEASE`] on a warrant `L` of 2 units: `a`'s
/// reservation of both lapses, then `b` is granted them.
fn lapsed_and_taken(db: &TestDb) -> (PgStore, PgStore, Reservation, Reservation) {
    let lease = LEASE;
    let open = || PgStore::connect(&db.settings_with_lease(lease)).unwrap();
    let (a, b) = (open(), open());
    a.register(&record("L", 1, 1, false, 2)).unwrap();
    let held = a.reserve("L", 2).unwrap();
    assert_eq!(held.granted(), 2);
    past_the_lease(lease);
    let taken = b.reserve("L", 2).unwrap();
    assert_eq!(taken.granted(), 2);
    (a, b, held, taken)
}

/// A replica killed between reserve and settle holds its units for the
/// lease, no longer; and a settle that comes back after its lease expired
/// and the units went to another request cannot overspend: the
/// conditional UPDATE refuses it.
#[test]
fn postgres_reservation_leases_bound_a_dead_replicas_hold() {
    let db = TestDb::create();
    let lease = Duration::from_secs(2);
    let open = || PgStore::connect(&db.settings_with_lease(lease)).unwrap();
    let (a, b) = (open(), open());
    a.register(&record("L", 1, 1, false, 3)).unwrap();
    let first = a.reserve("L", 1).unwrap();
    a.settle(first, 1).unwrap();
    // "Replica A dies" holding 2 units: its reservation is never settled.
    let held = a.reserve("L", 2).unwrap();
    assert_eq!(held.granted(), 2);
    let started = Instant::now();
    assert_eq!(b.reserve("L", 2).unwrap().granted(), 0);
    // After the lease, replica B gets them.
    while started.elapsed() < lease + Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let taken = b.reserve("L", 2).unwrap();
    assert_eq!(taken.granted(), 2);
    b.settle(taken, 2).unwrap();
    assert_eq!(b.spent("L").unwrap(), Some(3));
    // A's late settle: nothing is spent beyond the budget.
    assert!(matches!(a.settle(held, 2), Err(StoreError::BudgetOverrun(id)) if id == "L"));
    assert_eq!(a.spent("L").unwrap(), Some(3));
    // And the CHECK holds even against a direct write.
    let e = db
        .client()
        .execute("UPDATE warrants SET spent = 4 WHERE id = 'L'", &[])
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&::postgres::error::SqlState::CHECK_VIOLATION),
        "{e}"
    );
}

/// The same late settle, carried by the unwrap's audit append: the HSM has
/// opened by then, so its leaves are written all the same, denied
/// `budget_exhausted`, and nothing is spent or released.
#[test]
fn postgres_a_settle_past_its_lease_still_writes_its_leaves() {
    let db = TestDb::create();
    let (a, b, held, taken) = lapsed_and_taken(&db);
    b.append(AuditAppend {
        events: vec![opened("L"), opened("L")],
        time: now(),
        spend: Spend::Settle {
            reservation: taken,
            opened: 2,
        },
    })
    .unwrap();
    let size = a.tree_size().unwrap();
    let late = a
        .append(AuditAppend {
            events: vec![
                opened("L"),
                event(
                    "L",
                    UnwrapOutcome::Denied(lavd::audit::leaf::DenyReason::OutOfWindow),
                ),
                opened("L"),
            ],
            time: now(),
            spend: Spend::Settle {
                reservation: held,
                opened: 2,
            },
        })
        .unwrap();
    assert!(late.withdrawn.budget_lapsed);
    assert_eq!(late.first_index, size);
    assert_eq!(a.tree_size().unwrap(), size + 3);
    assert_eq!(a.spent("L").unwrap(), Some(2));
    assert_eq!(
        outcomes(&a, size, 3),
        [
            ("denied", "budget_exhausted"),
            ("denied", "out_of_window"),
            ("denied", "budget_exhausted"),
        ]
        .map(|(o, r)| (o.to_string(), r.to_string()))
    );
}

/// The other order of a late settle: the request that took the lapsed
/// units (within its lease) settles after the late one. The late settle
/// may spend only units no live reservation holds, so it is the one
/// refused, and the request within its lease spends what it was granted.
/// Before migration 4 the late settle spent them first and the other was
/// refused.
#[test]
fn postgres_a_late_settle_cannot_take_units_from_a_live_reservation() {
    let db = TestDb::create();
    let (a, b, held, taken) = lapsed_and_taken(&db);
    assert!(matches!(a.settle(held, 2), Err(StoreError::BudgetOverrun(id)) if id == "L"));
    assert_eq!(a.spent("L").unwrap(), Some(0));
    b.settle(taken, 2).unwrap();
    assert_eq!(b.spent("L").unwrap(), Some(2));

    // A lapsed reservation whose units nobody took still spends them.
    a.register(&record("M", 1, 1, false, 2)).unwrap();
    let slow = a.reserve("M", 2).unwrap();
    past_the_lease(LEASE);
    a.settle(slow, 2).unwrap();
    assert_eq!(a.spent("M").unwrap(), Some(2));
}

#[test]
fn postgres_migrations_are_versioned_and_a_newer_schema_is_refused() {
    let db = TestDb::create();
    let store = PgStore::connect(&db.settings()).unwrap();
    assert_eq!(store.migrate().unwrap(), 9);
    // Twice is harmless.
    drop(store);
    PgStore::connect(&db.settings()).unwrap();
    let versions = || -> Vec<i32> {
        db.client()
            .query("SELECT version FROM schema_version ORDER BY version", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(versions(), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    // A database at version 2 with a warrant in it (as the previous release
    // left it) is brought to 9, and the new functions serve that warrant.
    {
        let store = PgStore::connect(&db.settings()).unwrap();
        store.register(&record("W2", 1, 2, false, 3)).unwrap();
        store.settle(store.reserve("W2", 1).unwrap(), 1).unwrap();
    }
    db.client()
        .batch_execute(
            "DROP FUNCTION lavd_reserve_intent(TEXT, FLOAT8, BYTEA[]),
                           lavd_reserve_intent(TEXT, FLOAT8, BYTEA[], BYTEA),
                           lavd_cancel_reservation, lavd_settle_intent, lavd_register,
                           lavd_reserve, lavd_settle, lavd_save_checkpoint;
             DROP TABLE replication_barrier, open_intents, audit_commit_marks,
                        cancelled_reservations;
             ALTER TABLE warrant_reservations DROP COLUMN nonce;
             DELETE FROM schema_version WHERE version >= 3",
        )
        .unwrap();
    assert_eq!(versions(), [1, 2]);
    let store = PgStore::connect(&db.settings()).unwrap();
    assert_eq!(versions(), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert!(matches!(
        store.register(&record("W2", 1, 2, false, 3)),
        Ok(Registration::Known)
    ));
    let taken = store.reserve("W2", 5).unwrap();
    assert_eq!(taken.granted(), 2);
    store.settle(taken, 2).unwrap();
    assert_eq!(store.spent("W2").unwrap(), Some(3));
    // And migration 6's intents.
    store.register(&record("W6", 6, 6, false, 1)).unwrap();
    let (bytes, _) = intent("W6", 1);
    let held = store.reserve_with_intent("W6", &bytes).unwrap();
    assert!(held.intent().is_some());
    store.settle(held, 1).unwrap();
    store.save_checkpoint(0, "note zero", now()).unwrap();
    // The barrier of migration 5 commits, on the server the tree was read
    // on; on another (a failover between the two) it refuses.
    let (_, server) = store.tree_size_on().unwrap();
    store.replicated(&server).unwrap();
    let e = store
        .replicated(&lavd::store::Server::started("0".into()))
        .unwrap_err();
    assert!(e.to_string().contains("the server changed"), "{e}");
    assert_eq!(
        store.latest_checkpoint().unwrap(),
        Some((0, "note zero".into()))
    );
    drop(store);
    db.client()
        .execute("INSERT INTO schema_version (version) VALUES (99)", &[])
        .unwrap();
    let e = PgStore::connect(&db.settings()).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::SchemaTooNew {
                found: 99,
                supported: 9,
                ..
            }
        ),
        "{e}"
    );
}

/// PostgreSQL answers COMMIT on a transaction that a failed statement
/// aborted with a rollback, not an error. So a read that fails inside the
/// append transaction's hook (the checkpoint's subtrees, which the hook may
/// give up on and read again later) fails the append: its leaves were not
/// written, and `Ok` would let a key go out unlogged. The read is made to
/// fail with row-level security forced on `audit_nodes`, under a policy
/// that raises while armed.
#[test]
fn postgres_a_read_that_failed_in_the_append_hook_fails_the_append() {
    let db = TestDb::create();
    let store = Store::open_settings(&StoreSettings::Postgres(db.settings())).unwrap();
    store
        .append(batch(vec![key_event(0), key_event(1)]))
        .unwrap();
    let mut outside = db.client();
    outside
        .batch_execute(
            "CREATE TABLE test_armed (armed BOOLEAN NOT NULL);
             CREATE FUNCTION test_read_check() RETURNS BOOLEAN LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM test_armed WHERE armed) THEN
                     RAISE EXCEPTION 'test: reads of audit_nodes fail';
                 END IF;
                 RETURN TRUE;
             END $$;
             ALTER TABLE audit_nodes ENABLE ROW LEVEL SECURITY;
             ALTER TABLE audit_nodes FORCE ROW LEVEL SECURITY;
             CREATE POLICY test_read ON audit_nodes FOR SELECT USING (test_read_check());
             CREATE POLICY test_write ON audit_nodes FOR INSERT WITH CHECK (TRUE);
             INSERT INTO test_armed VALUES (TRUE);",
        )
        .unwrap();
    let mut read = None;
    let e = store
        .append_with(batch(vec![key_event(2)]), &mut |tree| {
            read = Some(tree.root());
        })
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::CommitFailed(m) if m.contains("aborted")),
        "{e}"
    );
    assert!(
        matches!(&read, Some(Err(StoreError::Postgres { .. }))),
        "{read:?}"
    );
    outside.batch_execute("DELETE FROM test_armed").unwrap();
    assert_eq!(store.tree_size().unwrap(), 2);
    let a = store.append(batch(vec![key_event(3)])).unwrap();
    assert_eq!((a.first_index, a.tree_size), (2, 3));
}

#[test]
fn postgres_unreachable_fails_within_the_pool_wait() {
    let db = TestDb::create();
    let mut settings = db.settings();
    // Nothing listens on port 1.
    settings.url = settings.url.replace(":5432/", ":1/");
    settings.pool_wait = Duration::from_secs(1);
    let started = Instant::now();
    let e = PgStore::connect(&settings).unwrap_err();
    assert!(matches!(e, StoreError::Postgres { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A group of settles that fails (the head locked from outside past the
/// lock timeout) gives their reservations back in one statement, not one
/// for each: with the reservations' table locked too, each give-back
/// waits the lock timeout, and the group's leader, which every other
/// append waits behind, held the rest that long once per batch.
#[test]
fn postgres_a_failed_group_gives_its_reservations_back_at_once() {
    const BATCHES: usize = 8;
    let db = TestDb::create();
    let mut settings = db.settings();
    settings.statement_timeout = Duration::from_secs(1);
    let store = PgStore::connect(&settings).unwrap();
    store.register(&record("G", 1, 1, false, 20)).unwrap();
    let reservations: Vec<_> = (0..BATCHES)
        .map(|_| store.reserve("G", 1).unwrap())
        .collect();
    let mut outside = db.client();
    let mut tx = outside.transaction().unwrap();
    tx.batch_execute(
        "LOCK TABLE audit_head IN ACCESS EXCLUSIVE MODE; \
         LOCK TABLE warrant_reservations IN ACCESS EXCLUSIVE MODE",
    )
    .unwrap();
    let started = Instant::now();
    let answers: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = reservations
            .into_iter()
            .map(|reservation| {
                let store = &store;
                s.spawn(move || {
                    let answer = store.append(AuditAppend {
                        events: vec![opened("G")],
                        time: now(),
                        spend: Spend::Settle {
                            reservation,
                            opened: 1,
                        },
                    });
                    (answer, started.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    tx.rollback().unwrap();
    for (answer, took) in &answers {
        assert!(
            matches!(answer, Err(StoreError::CommitFailed(_))),
            "{answer:?}"
        );
        // The first batch's group (1 s for the head, 1 s for its give-back),
        // then the other seven's (the same): 4 s; 6 s were a batch to come
        // late and make a third. One give-back a batch made the second
        // group alone take 1 + 7 s.
        assert!(*took < Duration::from_secs(7), "answered after {took:?}");
    }
    // Nothing was spent; the units are free again (given back, or their
    // leases past).
    assert_eq!(store.spent("G").unwrap(), Some(0));
}

#[test]
fn postgres_pool_wait_is_bounded_when_every_connection_is_busy() {
    let db = TestDb::create();
    let mut settings = db.settings();
    settings.pool_size = 1;
    settings.pool_wait = Duration::from_millis(500);
    let store = PgStore::connect(&settings).unwrap();
    store.register(&record("P", 1, 1, false, 5)).unwrap();
    // Hold the warrant row from outside: the one pooled connection blocks in
    // reserve (until the statement timeout), and a second call cannot get a
    // connection within the pool wait.
    let mut outside = db.client();
    let mut tx = outside.transaction().unwrap();
    tx.execute("SELECT 1 FROM warrants WHERE id = 'P' FOR UPDATE", &[])
        .unwrap();
    std::thread::scope(|s| {
        let blocked = s.spawn(|| store.reserve("P", 1));
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let e = store.spent("P").unwrap_err();
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The blocked statement ends at the statement timeout (5 s), not
        // later.
        let e = blocked.join().unwrap().unwrap_err();
        assert!(matches!(e, StoreError::Postgres { .. }), "{e}");
    });
    tx.rollback().unwrap();
    assert_eq!(store.spent("P").unwrap(), Some(0));
}

/// TLS to the server through rustls (`sslmode=verify-full`): the server's
/// certificate (the cluster's own, from `SHOW ssl_cert_file`) verifies
/// against `ca_file` and the host name, and the store works over it; a CA
/// that did not sign it is refused before any query.
#[test]
fn postgres_tls_verify_full_connects_and_refuses_another_ca() {
    let db = TestDb::create();
    let cert_file: String = db
        .client()
        .query_one("SHOW ssl_cert_file", &[])
        .unwrap()
        .get(0);
    let ssl: String = db.client().query_one("SHOW ssl", &[]).unwrap().get(0);
    assert_eq!(
        ssl, "on",
        "the test server must have TLS on (Debian's default)"
    );
    let mut settings = db.settings();
    // The certificate names `localhost` (Debian's snakeoil certificate).
    settings.url = settings
        .url
        .replace("127.0.0.1", "localhost")
        .replace("sslmode=disable", "sslmode=verify-full");
    settings.ca_file = Some(cert_file.into());
    let store = PgStore::connect(&settings).unwrap();
    store.register(&record("T", 1, 1, false, 5)).unwrap();
    assert_eq!(store.spent("T").unwrap(), Some(0));
    store.check_writable(Duration::from_secs(1)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    settings.ca_file = Some(other_ca);
    let e = PgStore::connect(&settings).unwrap_err();
    assert!(matches!(e, StoreError::Postgres { .. }), "{e}");
    assert!(
        format!("{e:?}").contains("UnknownIssuer") || format!("{e:?}").contains("certificate"),
        "{e:?}"
    );
}

/// Serialization failures are retried and counted. The test database runs
/// every transaction SERIALIZABLE (lavd itself uses READ COMMITTED with row
/// locks, where they are rare), so that concurrent settles on one warrant
/// really fail with SQLSTATE 40001. Whatever still fails after the retries
/// spends nothing: `spent` equals the settles that succeeded.
/// Replicas starting at once on a database whose default isolation is
/// SERIALIZABLE: each migrates under the advisory lock in READ COMMITTED,
/// so one that waited for another's migration sees it and does not run it
/// again (which failed with "relation already exists"), and a short
/// statement timeout does not cut the wait.
#[test]
fn postgres_replicas_starting_at_once_migrate_once_under_serializable() {
    let db = TestDb::create();
    db.default_serializable();
    let settings = db.settings();
    let barrier = std::sync::Barrier::new(4);
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    PgStore::connect(&settings)
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(db.rows("schema_version"), 9);
}

/// Every SQLite commit lavd makes is flushed before it returns
/// (`synchronous = FULL`, 2): at open, after an audit append, after a
/// checkpoint save (which writes at `NORMAL` and sets `FULL` back), and
/// after an open intent's reservation. No crash test shows it (a SIGKILL
/// loses nothing any setting wrote; a power loss does; the read-only
/// store-fault test may, where its fault lands after a write and before its
/// fsync): at `NORMAL`, an append could be answered, and keys released
/// against it, and then lost, or an intent lost and the HSM's opens with
/// it.
#[test]
fn sqlite_commits_are_flushed_before_they_return() {
    let dir = tempfile::tempdir().unwrap();
    let Store::Sqlite(store) = Store::open(&dir.path().join("lavd.db")).unwrap() else {
        panic!("not SQLite")
    };
    assert_eq!(store.synchronous().unwrap(), 2, "at open");
    store.append(batch(vec![key_event(1)])).unwrap();
    assert_eq!(store.synchronous().unwrap(), 2, "after an append");
    store.save_checkpoint(1, "a note", now()).unwrap();
    assert_eq!(store.synchronous().unwrap(), 2, "after a checkpoint save");
    store.append(batch(vec![key_event(2)])).unwrap();
    assert_eq!(store.synchronous().unwrap(), 2, "after the next append");
    // An open intent, after a checkpoint save (which runs at NORMAL).
    store.save_checkpoint(2, "another note", now()).unwrap();
    store.register(&record("w", 1, 1, false, 3)).unwrap();
    let (bytes, _) = intent("w", 1);
    let held = store.reserve_with_intent("w", &bytes).unwrap();
    assert!(held.intent().is_some());
    assert_eq!(store.synchronous().unwrap(), 2, "after an open intent");
}

/// An error the server answered says what the server said, not only the
/// client's "db error": a database made read-only (as a standby in
/// recovery is) refuses the migration's first write with SQLSTATE 25006,
/// and the error's text carries the code. Before, the daemon's log lines
/// said "store …: db error" for every refusal (seen in
/// `replicas_db_failover.rs`, where a standby refused writes).
#[test]
fn postgres_an_error_the_server_answers_says_what_it_said() {
    let db = TestDb::create();
    db.set_default("default_transaction_read_only", "on");
    let e = PgStore::connect(&db.settings()).expect_err("a read-only database was migrated");
    let text = e.to_string();
    assert!(matches!(e, StoreError::Postgres { .. }), "{text}");
    assert!(text.contains(": db error: ERROR 25006: "), "{text}");

    // A message is escaped for a terminal (it may quote what a client
    // sent), and the DETAIL line, which may quote a row, is left out: a
    // trigger of the tests' own refuses a warrant so.
    let db = TestDb::create();
    let store = PgStore::connect(&db.settings()).unwrap();
    db.client()
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               RAISE EXCEPTION USING ERRCODE = 'P0001', \
                 MESSAGE = E'refused \\x1b[31mred', DETAIL = 'the-row-itself'; \
             END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON warrants \
               FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .unwrap();
    let text = store
        .register(&record("W", 1, 1, false, 1))
        .expect_err("the trigger refuses")
        .to_string();
    assert!(
        text.contains(": db error: ERROR P0001: refused \\u{1b}[31mred"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(!text.contains("the-row-itself"), "{text}");
}

/// A database whose default `synchronous_commit` is `off` or `local` would
/// acknowledge spends and leaves that a crash or a failover then loses, after
/// lavd released keys against them: every session of the store commits
/// under `on` instead. A stronger value the operator chose is kept.
#[test]
fn postgres_sessions_commit_durably_whatever_the_database_default() {
    for (default, expected) in [
        ("off", "on"),
        ("local", "on"),
        ("remote_write", "remote_write"),
        ("remote_apply", "remote_apply"),
    ] {
        let db = TestDb::create();
        db.set_default("synchronous_commit", default);
        let mut plain = db.client();
        let found: String = plain
            .query_one("SHOW synchronous_commit", &[])
            .unwrap()
            .get(0);
        assert_eq!(found, default, "a plain session gets the database default");
        let store = PgStore::connect(&db.settings()).unwrap();
        assert_eq!(
            store.synchronous_commit().unwrap(),
            expected,
            "default {default}"
        );
        // Set in the session also when kept: a reload of the server's
        // configuration file cannot weaken it under an open connection.
        assert_eq!(
            store.setting_source("synchronous_commit").unwrap(),
            "session",
            "default {default}"
        );
    }
}

/// Under a `repeatable read` default, two replicas reserving the last unit
/// of a warrant both granted it: each read the reservations in a snapshot
/// taken before it waited for the warrant's row lock. lavd's sessions run
/// `read committed` instead (`serializable`, also correct, is kept), so the
/// second sees the first's reservation.
#[test]
fn postgres_reservations_never_overgrant_whatever_the_default_isolation() {
    for (default, expected) in [
        ("repeatable read", "read committed"),
        ("read committed", "read committed"),
        ("serializable", "serializable"),
    ] {
        let db = TestDb::create();
        db.set_default("default_transaction_isolation", default);
        let a = PgStore::connect(&db.settings()).unwrap();
        let b = PgStore::connect(&db.settings()).unwrap();
        assert_eq!(a.transaction_isolation().unwrap(), expected, "{default}");
        assert_eq!(
            a.setting_source("default_transaction_isolation").unwrap(),
            "session",
            "{default}"
        );
        a.register(&record("R", 1, 1, false, 1)).unwrap();
        // Hold the warrant's row so that both reservations start, take
        // their snapshots and wait behind it.
        let mut holder = db.client();
        let mut tx = holder.transaction().unwrap();
        tx.execute("SELECT 1 FROM warrants WHERE id = 'R' FOR UPDATE", &[])
            .unwrap();
        let granted: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = [&a, &b]
                .into_iter()
                .map(|store| {
                    s.spawn(move || {
                        // A serialization failure that outlives the
                        // retries grants nothing.
                        store.reserve("R", 1).map_or(0, |r| r.granted())
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(500));
            tx.commit().unwrap();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(granted.iter().sum::<u64>(), 1, "{default}: {granted:?}");
    }
}

#[test]
fn postgres_serialization_failures_are_retried_and_counted() {
    let db = TestDb::create();
    db.default_serializable();
    let store = PgStore::connect(&db.settings()).unwrap();
    store.register(&record("S", 1, 1, false, 10_000)).unwrap();
    let (ok, failed): (usize, usize) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = &store;
                s.spawn(move || {
                    let (mut ok, mut failed) = (0, 0);
                    for _ in 0..25 {
                        let result = store.reserve("S", 1).and_then(|r| store.settle(r, 1));
                        match result {
                            Ok(()) => ok += 1,
                            Err(StoreError::Postgres { error, .. })
                                if error.code()
                                    == Some(
                                        &::postgres::error::SqlState::T_R_SERIALIZATION_FAILURE,
                                    ) =>
                            {
                                failed += 1
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    });
    println!(
        "{ok} settled, {failed} failed after retries, {} retries",
        store.retries()
    );
    assert!(store.retries() > 0, "no serialization failure happened");
    assert_eq!(store.spent("S").unwrap(), Some(ok as u64));
    assert_eq!(ok + failed, 200);
}

/// A store on a fresh database through a [`softhsm_tests::pg::CutAtCommit`]
/// proxy armed by `arm`, and the result of one key's append through it.
fn append_with_its_commit_cut(
    arm: fn(&softhsm_tests::pg::CutAtCommit),
) -> (TestDb, Store, Result<lavd::store::Appended, StoreError>) {
    append_with_its_commit_cut_in_a_pool_of(None, arm)
}

/// [`append_with_its_commit_cut`] with a pool of `pool_size` connections
/// (the default when `None`).
fn append_with_its_commit_cut_in_a_pool_of(
    pool_size: Option<usize>,
    arm: fn(&softhsm_tests::pg::CutAtCommit),
) -> (TestDb, Store, Result<lavd::store::Appended, StoreError>) {
    let db = TestDb::create();
    let proxy = softhsm_tests::pg::CutAtCommit::start(softhsm_tests::pg::port());
    let mut settings = db.settings_via(proxy.port());
    if let Some(size) = pool_size {
        settings.pool_size = size;
    }
    let store = Store::open_settings(&StoreSettings::Postgres(settings)).unwrap();
    arm(&proxy);
    let appended = store.append(AuditAppend {
        events: vec![key_event(1)],
        time: now(),
        spend: Spend::InsertKey(key_record("k1")),
    });
    assert_eq!(proxy.cuts(), 1, "the proxy never saw the COMMIT");
    (db, store, appended)
}

/// A COMMIT whose answer is lost (the connection cut just after it was
/// sent: the server commits, the client never hears) is answered by what
/// PostgreSQL did, read from `pg_xact_status`: here, committed. Before,
/// the append failed although its rows were durable, and key generation
/// then deleted the key pair the store had recorded.
#[test]
fn postgres_an_append_whose_commit_answer_is_lost_is_answered_by_what_postgresql_did() {
    let (db, store, appended) = append_with_its_commit_cut(softhsm_tests::pg::CutAtCommit::arm);
    let appended = appended.unwrap();
    assert_eq!((appended.first_index, appended.count), (0, 1));
    assert_eq!(db.rows("escrow_keys"), 1);
    assert_eq!(db.rows("audit_leaves"), 1);
    assert!(store.get_key("k1").unwrap().is_some());
    // The store goes on, on a new connection.
    store
        .append(AuditAppend {
            events: vec![key_event(2)],
            time: now(),
            spend: Spend::InsertKey(key_record("k2")),
        })
        .unwrap();
    assert_eq!(db.rows("audit_leaves"), 2);
}

/// The same with a pool of one connection: the dead one is given back
/// before the COMMIT's fate is read on another. Before, the read waited
/// for the pool's only place, which the dead connection held, and the
/// append was answered `CommitUnknown` though PostgreSQL had committed it.
#[test]
fn postgres_a_lost_commit_answer_is_read_in_a_pool_of_one() {
    let (db, _store, appended) =
        append_with_its_commit_cut_in_a_pool_of(Some(1), softhsm_tests::pg::CutAtCommit::arm);
    let appended = appended.unwrap();
    assert_eq!((appended.first_index, appended.count), (0, 1));
    assert_eq!(db.rows("audit_leaves"), 1);
}

/// The other outcome: a COMMIT cut before the server got it (the server
/// rolls the transaction back when the connection ends) is answered as
/// failed, and nothing of it is in the store.
#[test]
fn postgres_an_append_whose_commit_never_arrived_is_answered_failed() {
    let (db, _store, appended) =
        append_with_its_commit_cut(softhsm_tests::pg::CutAtCommit::arm_dropping);
    assert!(
        matches!(appended, Err(StoreError::CommitFailed(_))),
        "{appended:?}"
    );
    assert_eq!(db.rows("escrow_keys"), 0);
    assert_eq!(db.rows("audit_leaves"), 0);
}

/// The open intent commits with the reservation, holds the leaves of the
/// granted candidates only (the first `granted`), and is deleted by the
/// settle that writes its request's leaves; leaves that replace it
/// (`Spend::ClearIntent`) are written once, never twice. On SQLite every
/// intent left in the file is an orphan (a process that stopped); on
/// PostgreSQL only one past its lease (`postgres_an_intent_is_an_orphan_once_its_lease_runs_out`).
fn open_intents_are_written_with_the_grant_and_settled_once(b: &Backend) {
    let store = b.open();
    store.register(&record("w", 1, 1, false, 3)).unwrap();
    let (bytes, leaves) = intent("w", 4);
    let held = store.reserve_with_intent("w", &bytes).unwrap();
    assert_eq!((held.requested(), held.granted()), (4, 3));
    let first = held.intent().expect("an intent for a grant");
    if let Backend::Sqlite(_) = b {
        // The process "stopped" here: a new one finds the intent.
        drop(store);
        let store = b.open();
        let orphans = store.orphaned_intents(10).unwrap();
        assert_eq!(orphans.len(), 1, "{orphans:?}");
        assert_eq!(orphans[0].id, first);
        assert_eq!(orphans[0].warrant_id, "w");
        assert_eq!(
            orphans[0].leaves,
            leaves[..3],
            "the granted candidates only"
        );
    } else {
        assert_eq!(store.orphaned_intents(10).unwrap(), [], "within its lease");
    }
    let store = b.open();
    // Replacing it writes its leaves once.
    let size = store.tree_size().unwrap();
    let interrupted = |id| AuditAppend {
        events: leaves[..3].iter().cloned().map(Event::from).collect(),
        time: now(),
        spend: Spend::ClearIntent(id),
    };
    let written = store.append(interrupted(first)).unwrap();
    assert_eq!((written.first_index, written.count), (size, 3));
    assert_eq!(
        outcomes(&store, size, 3),
        [("denied", "open_interrupted"); 3].map(|(o, r)| (o.to_string(), r.to_string()))
    );
    assert!(matches!(
        store.append(interrupted(first)),
        Err(StoreError::IntentSettled(id)) if id == first
    ));
    assert_eq!(store.tree_size().unwrap(), size + 3);
    // The settle of a request that committed deletes its intent with its
    // leaves: leaves meant to replace it are then refused.
    store.register(&record("v", 2, 2, false, 1)).unwrap();
    let (bytes, _) = intent("v", 1);
    let settled = store.reserve_with_intent("v", &bytes).unwrap();
    assert_eq!(settled.granted(), 1);
    let second = settled.intent().unwrap();
    assert_ne!(second, first);
    store
        .append(AuditAppend {
            events: vec![opened("v")],
            time: now(),
            spend: Spend::Settle {
                reservation: settled,
                opened: 1,
            },
        })
        .unwrap();
    assert!(matches!(
        store.append(interrupted(second)),
        Err(StoreError::IntentSettled(id)) if id == second
    ));
    assert_eq!(store.spent("v").unwrap(), Some(1));
    // No grant, no intent.
    let none = store.reserve_with_intent("v", &bytes).unwrap();
    assert_eq!((none.granted(), none.intent()), (0, None));
    store.settle(none, 0).unwrap();
    if let Backend::Sqlite(_) = b {
        assert_eq!(store.orphaned_intents(10).unwrap(), []);
    }
}

/// On PostgreSQL an intent is an orphan once its lease (the reservation's)
/// has run out, for any replica; its leaves are written once; and the
/// request that held it, should it settle late, spends nothing and writes
/// its own leaves denied `audit_commit_failed` (`Withdrawn::intent_swept`):
/// the log says its envelopes were not released, once by the sweep and
/// once by the request. Before, the late request's leaves said `opened` and
/// spent the budget, beside the sweep's `open_interrupted` ones that said
/// nothing was released (helper-186's review; mutated: the old settle
/// function gave `opened` twice and spent 2).
#[test]
fn postgres_an_intent_is_an_orphan_once_its_lease_runs_out() {
    let db = TestDb::create();
    let open = || PgStore::connect(&db.settings_with_lease(LEASE)).unwrap();
    let (a, b) = (open(), open());
    a.register(&record("L", 1, 1, false, 2)).unwrap();
    let (bytes, leaves) = intent("L", 2);
    let held = a.reserve_with_intent("L", &bytes).unwrap();
    let id = held.intent().unwrap();
    assert_eq!(b.orphaned_intents(10).unwrap(), [], "within its lease");
    past_the_lease(LEASE);
    let orphans = b.orphaned_intents(10).unwrap();
    assert_eq!(orphans.len(), 1);
    assert_eq!((orphans[0].id, &orphans[0].leaves), (id, &leaves));
    let size = b.tree_size().unwrap();
    b.append(AuditAppend {
        events: leaves.iter().cloned().map(Event::from).collect(),
        time: now(),
        spend: Spend::ClearIntent(id),
    })
    .unwrap();
    assert_eq!(b.orphaned_intents(10).unwrap(), []);
    let late = a
        .append(AuditAppend {
            events: vec![opened("L"), opened("L")],
            time: now(),
            spend: Spend::Settle {
                reservation: held,
                opened: 2,
            },
        })
        .unwrap();
    assert!(late.withdrawn.intent_swept, "{:?}", late.withdrawn);
    assert_eq!(
        outcomes(&a, size, 4),
        [
            ("denied", "open_interrupted"),
            ("denied", "open_interrupted"),
            ("denied", "audit_commit_failed"),
            ("denied", "audit_commit_failed"),
        ]
        .map(|(o, r)| (o.to_string(), r.to_string()))
    );
    assert_eq!(a.spent("L").unwrap(), Some(0));
    // The late settle freed its reservation: the budget is whole.
    assert_eq!(db.rows("warrant_reservations"), 0);
    assert_eq!(a.reserve("L", 2).unwrap().granted(), 2);
}

/// Three replicas sweep at once (as their sweep threads do after a replica
/// died) while the dead replica's last request settles late: each orphan
/// intent's leaves are written exactly once, by one sweeper, and the late
/// settle either spent and took its intent first (its leaves `opened`, no
/// sweep writes it) or found it swept (its leaves `audit_commit_failed`,
/// nothing spent). No unit is spent for a swept intent, and once the lease
/// is over the budgets are whole again. helper-183's 6: before, sweeps
/// were tested one replica at a time.
#[test]
fn postgres_replicas_sweeping_at_once_write_each_orphan_once() {
    const DEAD: usize = 6;
    let db = TestDb::create();
    let open = || PgStore::connect(&db.settings_with_lease(LEASE)).unwrap();
    let dead = open();
    // The one request of the dead replica that lives on to settle late:
    // the oldest intent, so the first each sweeper takes.
    dead.register(&record("T", 9, 9, false, 2)).unwrap();
    let (bytes, _) = intent("T", 2);
    let late = dead.reserve_with_intent("T", &bytes).unwrap();
    let ids: Vec<String> = (0..DEAD).map(|i| format!("S{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let seed = u8::try_from(i + 10).unwrap();
        dead.register(&record(id, seed, seed, false, 2)).unwrap();
        let (bytes, _) = intent(id, 2);
        assert_eq!(dead.reserve_with_intent(id, &bytes).unwrap().granted(), 2);
    }
    let size = dead.tree_size().unwrap();
    past_the_lease(LEASE);

    let sweepers: Vec<PgStore> = (0..3).map(|_| open()).collect();
    let start = std::sync::Barrier::new(sweepers.len() + 1);
    let (written, settled) = std::thread::scope(|s| {
        let sweeps: Vec<_> = sweepers
            .iter()
            .map(|store| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    let mut written = Vec::new();
                    loop {
                        let orphans = store.orphaned_intents(64).unwrap();
                        if orphans.is_empty() {
                            return written;
                        }
                        for orphan in orphans {
                            let append = AuditAppend {
                                events: orphan.leaves.into_iter().map(Event::from).collect(),
                                time: now(),
                                spend: Spend::ClearIntent(orphan.id),
                            };
                            match store.append(append) {
                                Ok(a) => written.push((orphan.warrant_id, a.first_index, a.count)),
                                Err(StoreError::IntentSettled(id)) => assert_eq!(id, orphan.id),
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        start.wait();
        let settled = dead
            .append(AuditAppend {
                events: vec![opened("T"), opened("T")],
                time: now(),
                spend: Spend::Settle {
                    reservation: late,
                    opened: 2,
                },
            })
            .unwrap();
        let written: Vec<_> = sweeps.into_iter().flat_map(|t| t.join().unwrap()).collect();
        (written, settled)
    });

    // Each intent written once, its two leaves `open_interrupted`.
    let swept_late = settled.withdrawn.intent_swept;
    let mut by_warrant: Vec<&str> = written.iter().map(|w| w.0.as_str()).collect();
    by_warrant.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    if swept_late {
        expected.push("T");
    }
    assert_eq!(by_warrant, expected, "{written:?}");
    for (_, first, count) in &written {
        assert_eq!(
            outcomes(&dead, *first, *count),
            [("denied", "open_interrupted"); 2].map(|(o, r)| (o.to_string(), r.to_string()))
        );
    }
    // The late settle's own two leaves, and nothing else was written.
    let late_leaves = outcomes(&dead, settled.first_index, settled.count);
    let (outcome, reason) = if swept_late {
        ("denied", "audit_commit_failed")
    } else {
        ("opened", "-")
    };
    assert_eq!(
        late_leaves,
        [(outcome, reason); 2].map(|(o, r)| (o.to_string(), r.to_string()))
    );
    assert_eq!(
        dead.tree_size().unwrap(),
        size + 2 * written.len() as u64 + 2
    );
    assert_eq!(dead.orphaned_intents(64).unwrap(), []);
    assert_eq!(db.rows("open_intents"), 0);
    // Nothing spent for a swept intent; the late settle spent only if it
    // took its intent first.
    for id in &ids {
        assert_eq!(dead.spent(id).unwrap(), Some(0), "{id}");
        assert_eq!(dead.reserve(id, 2).unwrap().granted(), 2, "{id}");
    }
    assert_eq!(
        dead.spent("T").unwrap(),
        Some(if swept_late { 0 } else { 2 })
    );
    println!("the late settle found its intent swept: {swept_late}");
}

/// A reservation whose answer is lost (the connection cut just after the
/// statement was sent: the server runs and commits it, the client never
/// hears) is cancelled from a new connection: its units are free at once
/// and its intent is gone, so no sweep logs opens that never began. Before,
/// both stayed for the lease: a retry got nothing (`budget_exhausted`) and
/// the log later said `open_interrupted` (helper-186's 4).
#[test]
fn postgres_a_reservation_whose_answer_is_lost_is_cancelled() {
    let db = TestDb::create();
    let proxy = softhsm_tests::pg::CutAtCommit::start(softhsm_tests::pg::port());
    let store = PgStore::connect(&db.settings_via(proxy.port())).unwrap();
    store.register(&record("L", 1, 1, false, 2)).unwrap();
    let (bytes, _) = intent("L", 2);
    proxy.arm_after_sending(b"lavd_reserve_intent");
    let lost = store.reserve_with_intent("L", &bytes);
    assert_eq!(proxy.cuts(), 1, "the proxy never saw the reservation");
    assert!(lost.is_err(), "{lost:?}");
    // The cancel's tombstone, and nothing of the reservation left.
    assert_eq!(db.rows("cancelled_reservations"), 1);
    assert_eq!(db.rows("warrant_reservations"), 0);
    assert_eq!(db.rows("open_intents"), 0);
    let again = store.reserve_with_intent("L", &bytes).unwrap();
    assert_eq!(again.granted(), 2);
    // The server had run the lost one: its intent took id 1.
    assert_eq!(again.intent(), Some(2));
    store.settle(again, 0).unwrap();
    assert_eq!(store.spent("L").unwrap(), Some(0));
}

/// A reservation answered with a PANIC (a backend that crashed as it
/// answered; crash recovery may still replay the statement's commit) is
/// cancelled as one whose answer was lost: its units are free at once, and
/// no intent is left for a sweep to log as `open_interrupted` (opens that
/// never began). Before, only a lost connection, class 08 and 57P0 counted
/// as the server lost, and a PANIC left the reservation held for its lease.
#[test]
fn postgres_a_reservation_answered_with_a_panic_is_cancelled() {
    let db = TestDb::create();
    let proxy = softhsm_tests::pg::CutAtCommit::start(softhsm_tests::pg::port());
    let store = PgStore::connect(&db.settings_via(proxy.port())).unwrap();
    store.register(&record("L", 1, 1, false, 2)).unwrap();
    let (bytes, _) = intent("L", 2);
    proxy.arm_panic_after_sending(b"lavd_reserve_intent");
    let lost = store.reserve_with_intent("L", &bytes);
    assert_eq!(proxy.cuts(), 1, "the proxy never saw the reservation");
    let e = lost.unwrap_err();
    assert!(e.to_string().contains("forged by the test proxy"), "{e:?}");
    assert_eq!(db.rows("cancelled_reservations"), 1);
    assert_eq!(db.rows("warrant_reservations"), 0);
    assert_eq!(db.rows("open_intents"), 0);
    let again = store.reserve_with_intent("L", &bytes).unwrap();
    assert_eq!(again.granted(), 2);
    store.settle(again, 0).unwrap();
}

/// A reservation statement that reaches the warrant's lock after its cancel
/// (queued behind it on the server) grants nothing: the cancel's tombstone
/// answers it 'cancelled', and no reservation or intent is made.
#[test]
fn postgres_a_reservation_after_its_cancel_grants_nothing() {
    let db = TestDb::create();
    let store = PgStore::connect(&db.settings()).unwrap();
    store.register(&record("L", 1, 1, false, 2)).unwrap();
    let (bytes, _) = intent("L", 2);
    let nonce = vec![7u8; 16];
    let mut c = db.client();
    let deleted: i64 = c
        .query_one("SELECT lavd_cancel_reservation('L', $1, 60)", &[&nonce])
        .unwrap()
        .get(0);
    assert_eq!(deleted, 0, "nothing was reserved yet");
    let row = c
        .query_one(
            "SELECT r_status, r_granted FROM lavd_reserve_intent('L', 60, $1, $2)",
            &[&bytes, &nonce],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1)),
        ("cancelled".to_string(), 0)
    );
    assert_eq!(db.rows("warrant_reservations"), 0);
    assert_eq!(db.rows("open_intents"), 0);
    // Another nonce is granted as usual.
    let row = c
        .query_one(
            "SELECT r_status, r_granted FROM lavd_reserve_intent('L', 60, $1, $2)",
            &[&bytes, &vec![8u8; 16]],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1)),
        ("ok".to_string(), 2)
    );
}

/// A request past its lease whose intent no sweep has taken yet settles as
/// usual: its leaves say `opened`, the budget is spent, and the intent is
/// gone, so no sweep writes it afterwards.
#[test]
fn postgres_a_late_settle_before_any_sweep_spends_and_takes_its_intent() {
    let db = TestDb::create();
    let a = PgStore::connect(&db.settings_with_lease(LEASE)).unwrap();
    a.register(&record("L", 1, 1, false, 2)).unwrap();
    let (bytes, _) = intent("L", 2);
    let held = a.reserve_with_intent("L", &bytes).unwrap();
    past_the_lease(LEASE);
    let size = a.tree_size().unwrap();
    let late = a
        .append(AuditAppend {
            events: vec![opened("L"), opened("L")],
            time: now(),
            spend: Spend::Settle {
                reservation: held,
                opened: 2,
            },
        })
        .unwrap();
    assert!(!late.withdrawn.any(), "{:?}", late.withdrawn);
    assert_eq!(
        outcomes(&a, size, 2),
        [("opened", "-"), ("opened", "-")].map(|(o, r)| (o.to_string(), r.to_string()))
    );
    assert_eq!(a.spent("L").unwrap(), Some(2));
    assert_eq!(a.orphaned_intents(10).unwrap(), []);
}
