//! What becomes of a checkpoint around the commit of its leaves.
//!
//! A saved checkpoint is not flushed to disk on its own (it becomes durable
//! with the next append's commit), so a crash can lose the newest ones. This
//! shows that nothing is lost with them: after the rows are gone, the log
//! still opens consistent, and the checkpoint it signs again in the real
//! SoftHSM token for the same tree is byte for byte the one handed out
//! before (the note has no timestamp; Ed25519 is deterministic).
//!
//! A checkpoint's signature is started inside the append transaction, before
//! its leaves and tree nodes are written and its COMMIT runs. When that
//! COMMIT fails (here a deferred foreign key that SQLite checks only at
//! COMMIT, put in by a trigger on the leaves), or the writing of the rows
//! does (a trigger that refuses a tree node), the signature over the tree
//! that never was is dropped: the append fails, no checkpoint of that size
//! is saved, returned or served, and the next checkpoint of that size is
//! over the leaves that did commit.

use std::sync::Arc;

use lavd::audit::log::{AuditLog, LogError};
use lavd::hsm::Hsm;
use lavd::store::{AuditAppend, Spend, Store, StoreError};
use softhsm_tests::{append_key_generated, assert_ok, TestToken};

fn open_log(t: &TestToken) -> AuditLog {
    let settings = t.settings();
    let store = Arc::new(Store::open_settings(&settings.store).unwrap());
    let hsm = Hsm::open(settings.hsm).unwrap();
    AuditLog::new(
        store,
        hsm,
        &settings.audit.key_label,
        &settings.audit.origin,
    )
    .unwrap()
}

/// Deletes saved checkpoints of at least `from` leaves, as a crash before
/// the next commit would lose them.
fn lose_checkpoints(t: &TestToken, from: u64) {
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    db.execute(
        "DELETE FROM audit_checkpoints WHERE size >= ?1",
        [i64::try_from(from).unwrap()],
    )
    .unwrap();
}

#[test]
fn a_lost_checkpoint_is_signed_again_byte_for_byte() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    let handed_out: Vec<String> = {
        let log = open_log(&t);
        (0..5)
            .map(|i| append_key_generated(&log, &format!("k{i}")))
            .collect()
    };
    let newest = handed_out.last().unwrap().clone();

    // The newest two saves lost: the log opens on the one before and
    // proves the stored tree extends it.
    lose_checkpoints(&t, 4);
    let log = open_log(&t);
    assert_eq!(log.inconsistency(), None);
    assert_eq!(log.store().latest_checkpoint().unwrap().unwrap().0, 3);
    assert_eq!(log.current_checkpoint().unwrap(), newest);
    drop(log);

    // Every save lost: the first checkpoint signed again is the same too.
    lose_checkpoints(&t, 0);
    let log = open_log(&t);
    assert_eq!(log.inconsistency(), None);
    assert_eq!(log.store().latest_checkpoint().unwrap(), None);
    assert_eq!(log.current_checkpoint().unwrap(), newest);
    // And it was saved again.
    assert_eq!(
        log.store().latest_checkpoint().unwrap(),
        Some((5, newest.clone()))
    );
}

/// Where the append transactions fail.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// At COMMIT, and no earlier: each leaf inserted adds a row breaking a
    /// deferred foreign key.
    AtCommit,
    /// Writing the tree nodes, after the signature has started: a trigger
    /// refuses them (the statement fails; the transaction stays open).
    WritingRows,
}

impl Failure {
    /// Makes every later append transaction fail so (`fail`), or no longer.
    fn arm(self, t: &TestToken, fail: bool) {
        let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
        db.execute_batch(match (self, fail) {
            (Failure::AtCommit, true) => {
                "CREATE TABLE trap_parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE trap (parent INTEGER REFERENCES trap_parent (id)
                                    DEFERRABLE INITIALLY DEFERRED);
                 CREATE TRIGGER trap_commit AFTER INSERT ON audit_leaves
                 BEGIN INSERT INTO trap (parent) VALUES (1); END;"
            }
            (Failure::AtCommit, false) => {
                "DROP TRIGGER trap_commit; DROP TABLE trap; DROP TABLE trap_parent;"
            }
            (Failure::WritingRows, true) => {
                "CREATE TRIGGER trap_write BEFORE INSERT ON audit_nodes
                 BEGIN SELECT RAISE(ABORT, 'test: the tree node is refused'); END;"
            }
            (Failure::WritingRows, false) => "DROP TRIGGER trap_write;",
        })
        .unwrap();
    }

    /// What the failed append's error says.
    fn says(self) -> &'static [&'static str] {
        match self {
            Failure::AtCommit => &["FOREIGN KEY"],
            Failure::WritingRows => &[
                "writing the audit leaves and tree nodes: ",
                "test: the tree node is refused",
            ],
        }
    }
}

#[test]
fn a_checkpoint_signed_while_its_commit_fails_is_never_kept() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    for failure in [Failure::AtCommit, Failure::WritingRows] {
        a_checkpoint_signed_before_a_failure_is_never_kept(failure);
    }
}

fn a_checkpoint_signed_before_a_failure_is_never_kept(failure: Failure) {
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    let log = open_log(&t);
    let first = append_key_generated(&log, "k0");
    // That checkpoint was signed while its commit ran.
    assert_eq!(log.signatures_overlapped(), 1);

    failure.arm(&t, true);
    let t0 = lavd::codec::parse_time("2026-12-01T00:00:00Z").unwrap();
    let doomed = lavd::audit::leaf::KeyDestroyed::new("k0", "retention", false, None).unwrap();
    let err = log
        .append(AuditAppend {
            events: vec![doomed.into()],
            time: t0,
            spend: Spend::None,
        })
        .expect_err("an append that fails");
    assert!(
        matches!(&err, LogError::Store(StoreError::CommitFailed(m)) if failure.says().iter().all(|s| m.contains(s))),
        "{failure:?}: {err:?}"
    );
    // The tree of two leaves was signed, inside the transaction…
    assert_eq!(log.signatures_overlapped(), 2);
    // …and that signature went nowhere: not saved, not the log's newest.
    let store = log.store();
    assert_eq!(store.tree_size().unwrap(), 1);
    assert_eq!(store.checkpoint_at(2).unwrap(), None);
    assert_eq!(store.latest_checkpoint().unwrap(), Some((1, first.clone())));
    assert_eq!(log.current_checkpoint().unwrap(), first);

    // The next leaf takes index 1; the checkpoint of two leaves is over it.
    failure.arm(&t, false);
    let second = append_key_generated(&log, "k1");
    let key = lavd::audit::note::VerifierKey::parse(&log.verifier_key().unwrap()).unwrap();
    let checkpoint = lavd::audit::note::verify_checkpoint(&second, &key).unwrap();
    assert_eq!(checkpoint.size, 2);
    assert_eq!(checkpoint.root, store.root(2).unwrap());
    let leaves = store.leaves(1, 2).unwrap();
    assert!(String::from_utf8_lossy(&leaves[0].1).contains("\"k1\""));
    assert_eq!(store.latest_checkpoint().unwrap(), Some((2, second)));
    drop(log);
    assert_eq!(open_log(&t).inconsistency(), None);
}

/// A checkpoint of the size about to be signed that the store already holds
/// with another root, validly signed with the log's key (a replica signed a
/// tree of that size that the store no longer holds: leaves lost in a
/// failover and written again, or rewritten), is a fork, and is not
/// silently set aside (the first note of a size is the one kept): before
/// signing, the log proves the stored tree extends the newest stored
/// checkpoint, which it does not, so the log is marked inconsistent and no
/// checkpoint of the new tree is handed out (helper-183's 2, already so).
#[test]
fn a_stored_checkpoint_of_the_same_size_with_another_root_is_a_fork() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    use lavd::audit::note::{sign_checkpoint, Checkpoint};
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    let settings = t.settings();
    let store = Arc::new(Store::open_settings(&settings.store).unwrap());
    let hsm = Hsm::open(settings.hsm).unwrap();
    let log = AuditLog::new(
        store,
        hsm.clone(),
        &settings.audit.key_label,
        &settings.audit.origin,
    )
    .unwrap();
    for i in 0..3 {
        append_key_generated(&log, &format!("k{i}"));
    }
    let public = hsm.audit_key(&settings.audit.key_label).unwrap().public;
    let other = Checkpoint {
        origin: settings.audit.origin.clone(),
        size: 4,
        root: [7; 32],
    };
    let forked = sign_checkpoint(&other, public.bytes(), |m| {
        hsm.sign_ed25519(&settings.audit.key_label, m)
    })
    .unwrap();
    log.store()
        .save_checkpoint(4, &forked, time::OffsetDateTime::now_utc())
        .unwrap();

    // The fourth leaf makes a tree of size 4 with another root.
    let t0 = lavd::codec::parse_time("2026-12-01T00:00:00Z").unwrap();
    let event = lavd::audit::leaf::KeyGenerated::new(
        "k3",
        t0,
        t0 + time::Duration::days(31),
        t0 + time::Duration::days(400),
        None,
    )
    .unwrap();
    let appended = log.append(AuditAppend {
        events: vec![event.into()],
        time: t0,
        spend: Spend::None,
    });
    assert!(
        matches!(&appended, Err(LogError::Inconsistent(why))
            if why.contains("does not extend the checkpoint of size 4")),
        "{appended:?}"
    );
    assert!(log.inconsistency().is_some());
    assert!(matches!(
        log.current_checkpoint(),
        Err(LogError::Inconsistent(_))
    ));
    assert_eq!(
        log.store().checkpoint_at(4).unwrap(),
        Some(forked),
        "the stored note is kept for the investigation"
    );
}
