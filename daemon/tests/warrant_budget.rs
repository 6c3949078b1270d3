//! PROTOCOL §5 budget: only opened envelopes count, and the count never
//! exceeds `max_unwraps`, whatever the concurrency or restarts. Revocations
//! are durable and final.
//!
//! The restart test runs real second processes: this test binary re-executes
//! itself with `LAVD_TEST_CHILD` set, and the child works on the same SQLite
//! file (one child exits normally, one aborts holding a reservation).

// Helpers outside `#[test]` functions are test code too: a failure should
// panic the test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};

use lavd::store::{Revocation, Store, StoreError, WarrantRecord, WarrantStore};
use time::OffsetDateTime;

fn record(id: &str, max: u64) -> WarrantRecord {
    WarrantRecord {
        id: id.into(),
        payload_digest: [1; 32],
        normalized_digest: [2; 32],
        emergency: false,
        max_unwraps: max,
        seen_at: OffsetDateTime::UNIX_EPOCH,
    }
}

/// 16 threads race for the last 10 units of a budget of 25. Each asks for 2
/// envelopes at a time; odd threads fail to open one envelope of their first
/// batch (which gives its unit back). Exactly 10 open, 100 times over.
#[test]
fn sixteen_threads_open_exactly_the_last_ten_units() {
    const REPETITIONS: usize = 100;
    const THREADS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
    for rep in 0..REPETITIONS {
        let id = format!("W-race-{rep}");
        store.register(&record(&id, 25)).unwrap();
        let r = store.reserve(&id, 15).unwrap();
        assert_eq!(r.granted(), 15);
        store.settle(r, 15).unwrap();

        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (store, barrier, id) = (Arc::clone(&store), Arc::clone(&barrier), id.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut opened_total = 0u64;
                    let mut first = true;
                    loop {
                        let r = store.reserve(&id, 2).unwrap();
                        let granted = r.granted();
                        if granted == 0 {
                            store.settle(r, 0).unwrap();
                            break;
                        }
                        let opened = if first && thread % 2 == 1 {
                            granted - 1
                        } else {
                            granted
                        };
                        first = false;
                        store.settle(r, opened).unwrap();
                        opened_total += opened;
                    }
                    opened_total
                })
            })
            .collect();
        let opened: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(opened, 10, "repetition {rep}");
        assert_eq!(store.spent(&id).unwrap(), Some(25), "repetition {rep}");
        assert_eq!(store.reserve(&id, 1).unwrap().granted(), 0);
    }
}

fn child(role: &str, db: &Path) {
    let store = Store::open(db).unwrap();
    match role {
        "spend" => {
            store.register(&record("W-restart", 10)).unwrap();
            store.register(&record("W-revoked", 10)).unwrap();
            let r = store.reserve("W-restart", 4).unwrap();
            assert_eq!(r.granted(), 4);
            store.settle(r, 3).unwrap();
            assert!(store
                .revoke(&Revocation {
                    id: "W-revoked".into(),
                    reason: "authorisation withdrawn".into(),
                    revoked_by: "spiffe://oversight.example/admin".into(),
                    revoked_at: OffsetDateTime::UNIX_EPOCH,
                })
                .unwrap());
        }
        "crash" => {
            // Reserve everything that is left, then die without settling:
            // the reservation must not outlive the process.
            let r = store.reserve("W-restart", 100).unwrap();
            assert_eq!(r.granted(), 7);
            std::process::abort();
        }
        other => panic!("unknown child role {other}"),
    }
}

fn run_child(role: &str, db: &Path) -> std::process::ExitStatus {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "budget_and_revocation_survive_other_processes",
            "--nocapture",
        ])
        .env("LAVD_TEST_CHILD", role)
        .env("LAVD_TEST_DB", db)
        .status()
        .unwrap()
}

#[test]
fn budget_and_revocation_survive_other_processes() {
    if let Ok(role) = std::env::var("LAVD_TEST_CHILD") {
        let db = std::env::var("LAVD_TEST_DB").unwrap();
        child(&role, Path::new(&db));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lavd.db");

    assert!(run_child("spend", &db).success());
    let status = run_child("crash", &db);
    assert!(!status.success(), "the crash child must die abnormally");

    let store = Store::open(&db).unwrap();
    assert_eq!(store.spent("W-restart").unwrap(), Some(3));
    // The crashed process's 7 reserved units came back; nothing more.
    let r = store.reserve("W-restart", 100).unwrap();
    assert_eq!(r.granted(), 7);
    store.settle(r, 7).unwrap();
    assert_eq!(store.spent("W-restart").unwrap(), Some(10));
    assert_eq!(store.reserve("W-restart", 1).unwrap().granted(), 0);

    assert!(store.is_revoked("W-revoked").unwrap());
    assert!(matches!(
        store.reserve("W-revoked", 1),
        Err(StoreError::WarrantRevoked(id)) if id == "W-revoked"
    ));
    // Final: a second revocation does not replace the first.
    assert!(!store
        .revoke(&Revocation {
            id: "W-revoked".into(),
            reason: "again".into(),
            revoked_by: "someone-else".into(),
            revoked_at: OffsetDateTime::now_utc(),
        })
        .unwrap());
    assert_eq!(
        store.revocation("W-revoked").unwrap().unwrap().reason,
        "authorisation withdrawn"
    );
}

/// Settling can never push `spent` past `max_unwraps`, even when two stores
/// (as two processes wrongly sharing one file would) each hand out the last
/// unit: the second settle fails and commits nothing.
#[test]
fn two_stores_on_one_file_cannot_overspend() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lavd.db");
    let a = Store::open(&db).unwrap();
    let b = Store::open(&db).unwrap();
    a.register(&record("W-shared", 1)).unwrap();
    let ra = a.reserve("W-shared", 1).unwrap();
    let rb = b.reserve("W-shared", 1).unwrap();
    assert_eq!((ra.granted(), rb.granted()), (1, 1));
    a.settle(ra, 1).unwrap();
    assert!(matches!(b.settle(rb, 1), Err(StoreError::BudgetOverrun(id)) if id == "W-shared"));
    assert_eq!(b.spent("W-shared").unwrap(), Some(1));
}
