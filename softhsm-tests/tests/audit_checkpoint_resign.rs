//! A saved checkpoint is not flushed to disk on its own (it becomes durable
//! with the next append's commit), so a crash can lose the newest ones. This
//! shows that nothing is lost with them: after the rows are gone, the log
//! still opens consistent, and the checkpoint it signs again in the real
//! SoftHSM token for the same tree is byte for byte the one handed out
//! before (the note has no timestamp; Ed25519 is deterministic).

use std::sync::Arc;

use lavd::audit::log::AuditLog;
use lavd::hsm::Hsm;
use lavd::store::Store;
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
