//! A destruction is not reported done on a token that cannot show its
//! objects. Interrupted after its store commit (the key still on the
//! token), a destruction is finished by running it again; but a token whose
//! object store cannot be read (its directory gone from under an open
//! module, as a network HSM's lost partition looks) finds nothing to
//! destroy and nothing left, and that was reported as done, the private key
//! still there. It is refused instead (`hsm_unavailable`: the session sees
//! no private key, not even the audit key). Nor is an empty key set
//! published from it.
//!
//! Its own process: the token directory moves away from under this
//! process's SoftHSM, which does not see that token again until its module
//! is reset; every other test's lookups would meet it.

use lavd::hsm::{Hsm, HsmError};
use lavd::keys::{self, DestroyReason, KeyError};
use lavd::store::Store;
use softhsm_tests::{assert_ok, TestToken};

#[test]
fn a_destruction_is_not_done_on_a_token_that_cannot_show_its_objects() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    const KID: &str = "2026-12";
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));
    // Published while the token shows it.
    const PUBLISHED: &str = "2027-03";
    assert_ok(&softhsm_tests::generate_key(
        &t,
        PUBLISHED,
        "2030-01-01T00:00:00Z",
    ));
    // The store already says destroyed (a destruction's first step); the
    // token still holds the key (its second never ran).
    t.interrupt_destruction(KID);
    let settings = t.settings();
    let store = Store::open_settings(&settings.store).unwrap();
    let hsm = Hsm::open(settings.hsm).unwrap();

    let dir = t.token_dir();
    let away = t.path("token-away");
    std::fs::rename(&dir, &away).unwrap();
    // The token cannot be asked whether it holds the key, so no log is
    // opened to prove the earlier destruction's leaf.
    let refused = keys::destroy(
        &hsm,
        &store,
        &|| panic!("the log was opened"),
        KID,
        DestroyReason::Forced("finish".into()),
        time::OffsetDateTime::now_utc(),
    );
    // Nor is an empty key set published for it (`lavd keys list`, `GET
    // /v1/keys`): the key is not missing, the token is unreadable.
    let listed = keys::jwks_checked(&hsm, &store, time::OffsetDateTime::now_utc());
    std::fs::rename(&away, &dir).unwrap();
    assert!(
        matches!(&refused, Err(KeyError::Hsm(HsmError::TokenUnreadable))),
        "{refused:?}"
    );
    assert!(
        matches!(&listed, Err(KeyError::Hsm(HsmError::TokenUnreadable))),
        "{listed:?}"
    );

    // The key was still there: a new process, which sees the token again,
    // finishes the destruction and says so.
    drop(hsm);
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    assert_ok(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!(
            "escrow key {KID}: finished an interrupted destruction"
        )),
        "{said}"
    );
}
