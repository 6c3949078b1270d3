//! An escrow key's store row that cannot be read (an edited or damaged
//! store), with the real `lavd` binary on a real SoftHSM token: the other
//! keys are still destroyed at the end of their retention, and still
//! published. (Its own process: `key_lifecycle.rs` uses all the tokens one
//! test process may claim.)

use cryptoki::object::{Attribute, ObjectClass};
use softhsm_tests::{assert_ok, TestToken};

/// Whether escrow key `kid`'s private half is on the token, seen from a
/// new session of this application.
fn private_key(t: &TestToken, kid: &str) -> bool {
    !t.session()
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(format!("lav-escrow:{kid}").into_bytes()),
        ])
        .unwrap()
        .is_empty()
}

/// One escrow key row that cannot be read (an edited or damaged store)
/// does not keep the others past their retention: the daily job destroys
/// every other key due, names the unreadable row and exits 1; the key list
/// `GET /v1/keys` is made from skips it and keeps the others
/// (`keys::jwks`). Before, the first unreadable row failed the whole job
/// before anything was destroyed, and the key list with it.
#[test]
fn an_unreadable_key_row_does_not_stop_the_others_destruction() {
    let t = TestToken::new();
    for (kid, not_after, destroy_after) in [
        ("2020-01", "2020-02-01T00:00:00Z", "2021-01-01T00:00:00Z"),
        ("2020-02", "2020-02-01T00:00:00Z", "2021-02-01T00:00:00Z"),
        ("2099-01", "2099-02-01T00:00:00Z", "2100-01-01T00:00:00Z"),
    ] {
        assert_ok(&t.lavd_with_config(&[
            "keys",
            "generate",
            "--kid",
            kid,
            "--not-before",
            "2020-01-01T00:00:00Z",
            "--not-after",
            not_after,
            "--destroy-after",
            destroy_after,
        ]));
    }
    rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .execute(
            "UPDATE escrow_keys SET destroy_after = 'garbage' WHERE kid = '2020-01'",
            [],
        )
        .unwrap();
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("escrow key 2020-01: its store row cannot be read"),
        "{stderr}"
    );
    assert!(!private_key(&t, "2020-02"), "{stderr}");
    assert!(private_key(&t, "2020-01"));
    let store = lavd::store::SqliteStore::open(&t.path("lavd.db")).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let due = lavd::keys::due_for_destruction(&store, now).unwrap();
    assert!(due.keys.is_empty());
    assert_eq!(due.unreadable.len(), 1);
    assert_eq!(due.unreadable[0].0, "2020-01");
    let published = lavd::keys::jwks(&store, now).unwrap();
    let kids: Vec<_> = published.keys.iter().map(|k| k.kid.clone()).collect();
    assert_eq!(kids, [Some("2099-01".to_string())]);
}
