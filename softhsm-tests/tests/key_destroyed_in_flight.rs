//! A key destroyed while an unwrap of it is in flight, against a real
//! `lavd serve` over mutual TLS, through the fault module in front of
//! SoftHSM. The module's `hang` on `C_DestroyObject` pins the order:
//!
//! 1. the unwrap's plan finds the key live, its budget is reserved, and the
//!    HSM derives its secret (the key is still on the token); the request
//!    then waits in the call that destroys the derived secret;
//! 2. `lavd keys destroy --force`, another process, commits the key's
//!    destruction and its `key_destroyed` leaf, then waits in the call that
//!    would delete the key from the token;
//! 3. both are let go.
//!
//! The unwrap's leaf then comes after the `key_destroyed` leaf, so it must
//! not say `opened`, and nothing may be released or spent: the reply says
//! `key_destroyed`, and the warrant's one unit still opens another key's
//! envelope.
//!
//! And the other order, the key gone from the token before the derive while
//! the daemon holds its handle from earlier unwraps: `key_destroyed` too,
//! not a 503 for the whole request.
//!
//! And later still: the destruction committed after the unwrap's audit
//! commit (its leaf says `opened`, its unit is spent) while its
//! checkpoint's signature (`C_Sign`) is held in the HSM. The key's envelope
//! is not released: `key_destroyed` in the reply (before 2026-12-07, only
//! under `release_after_witness`).

use softhsm_tests::eventually;
use std::time::Duration;

use softhsm_tests::assert_ok;
use softhsm_tests::vault::{self, Held};

/// How long [`eventually`] waits here.
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The whole log as the auditor reads it, the index of `reply`'s first
/// leaf, and that of `E-2`'s `key_destroyed` leaf.
fn unwrap_and_destruction(
    c: &vault::Clients,
    reply: &serde_json::Value,
) -> (Vec<vault::Entry>, u64, u64) {
    let log = vault::entries(&c.auditor, 0, vault::tree_size(&c.auditor));
    let destruction = log
        .iter()
        .find(|e| e.leaf["event"] == "key_destroyed" && e.leaf["kid"] == "E-2")
        .expect("key_destroyed leaf")
        .index;
    let first = reply["audit"]["first_index"].as_u64().unwrap();
    (log, first, destruction)
}

#[test]
fn a_key_destroyed_while_its_unwrap_is_in_flight_releases_nothing() {
    let setup = Held::new(&["E-1", "E-2"]);
    let (t, c, shim) = (&setup.t, &setup.c, &setup.shim);
    let seal = |kid: &str, tag: &str| setup.seal(&vault::published_key(&c.provider, kid), kid, tag);
    let doomed = seal("E-2", "doomed");
    let other = seal("E-1", "other");
    let recipient = vault::recipient();
    let id = "W-DESTROYED-IN-FLIGHT";
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 1));
    let unwrap = |envelope: &serde_json::Value| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
        )
    };
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let destroyed = || -> bool {
        db.query_row(
            "SELECT destroyed_at IS NOT NULL FROM escrow_keys WHERE kid = 'E-2'",
            [],
            |row| row.get(0),
        )
        .unwrap()
    };

    shim.set("fault = hang\nfault_calls = C_DestroyObject");
    let (reply, destroy) = std::thread::scope(|s| {
        // Released however this closure ends, so that the threads can end.
        let _release = shim.releasing();
        let request = s.spawn(|| unwrap(&doomed));
        // 1: the derive is done, and the request waits.
        eventually("the unwrap's derived secret", WAIT, || shim.faults() > 0);
        assert!(!request.is_finished());
        let destroy = s.spawn(|| {
            t.lavd_with_config(&[
                "keys", "destroy", "--kid", "E-2", "--force", "--reason", "seized",
            ])
        });
        // 2: the destruction is committed; its token call waits.
        eventually("the committed destruction", WAIT, destroyed);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!request.is_finished(), "the unwrap answered while held");
        assert!(!destroy.is_finished(), "the key left the token while held");
        // 3.
        shim.set("");
        (request.join().unwrap(), destroy.join().unwrap())
    });
    assert_ok(&destroy);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = reply.json();
    assert_eq!(vault::statuses(&reply), ["key_destroyed"]);

    // In the log: the unwrap's leaf after the destruction's, denied.
    let (log, first, destruction) = unwrap_and_destruction(c, &reply);
    assert!(first > destruction, "{first} <= {destruction}");
    let leaf = &log[usize::try_from(first).unwrap()].leaf;
    assert_eq!(leaf["event"], "unwrap");
    assert_eq!(leaf["outcome"], "denied");
    assert_eq!(leaf["reason"], "key_destroyed");
    assert!(!log
        .iter()
        .any(|e| e.leaf["kid"] == "E-2" && e.leaf["outcome"] == "opened"));

    // Nothing was spent: the warrant's one unit opens another key's envelope.
    let r = unwrap(&other);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"]);
    let r = unwrap(&other);
    assert_eq!(vault::statuses(&r.json()), ["budget_exhausted"]);
}

/// The other order: the key leaves the token before the unwrap's derive,
/// while the daemon still holds the key's handle from an earlier unwrap.
/// The stale handle is looked up again, so the envelope is `key_destroyed`
/// (nothing released or spent), not a failing HSM that fails the request.
#[test]
fn a_key_destroyed_before_the_derive_of_a_cached_handle_is_key_destroyed() {
    let setup = Held::new(&["E-1", "E-2"]);
    let (t, c, shim) = (&setup.t, &setup.c, &setup.shim);
    let seal = |kid: &str, tag: &str| setup.seal(&vault::published_key(&c.provider, kid), kid, tag);
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-STALE", recipient.public(), 3));
    let unwrap = |envelope: &serde_json::Value| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
        )
    };
    // Every session of the pool learns E-2's handle.
    for n in 0..2 {
        let r = unwrap(&seal("E-2", &format!("warm-{n}")));
        assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    }
    let doomed = seal("E-2", "doomed");

    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    let reply = std::thread::scope(|s| {
        let request = s.spawn(|| unwrap(&doomed));
        eventually("the held derive", WAIT, || shim.faults() > 0);
        // The whole destruction, token included, while the derive waits.
        assert_ok(&t.lavd_with_config(&[
            "keys", "destroy", "--kid", "E-2", "--force", "--reason", "seized",
        ]));
        assert!(!request.is_finished(), "the unwrap answered while held");
        shim.set("");
        request.join().unwrap()
    });
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(vault::statuses(&reply.json()), ["key_destroyed"]);
    // lavd destroyed it: no line says it was lost outside lavd.
    let stderr = setup.daemon.stderr();
    assert!(!stderr.contains("holds no private key for it"), "{stderr}");
    // Nothing was spent: of the 3 units, the warm-ups spent 2 and 1 is left.
    let r = unwrap(&seal("E-1", "after"));
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    let r = unwrap(&seal("E-1", "over"));
    assert_eq!(vault::statuses(&r.json()), ["budget_exhausted"]);
}

#[test]
fn a_key_destroyed_while_its_unwraps_checkpoint_is_signed_is_not_released() {
    let setup = Held::new(&["E-1", "E-2"]);
    let (t, c, shim) = (&setup.t, &setup.c, &setup.shim);
    let doomed = setup.seal(&vault::published_key(&c.provider, "E-2"), "E-2", "late");
    let recipient = vault::recipient();
    let id = "W-DESTROYED-AT-SIGNING";
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 1));

    shim.set("fault = hang\nfault_calls = C_Sign");
    let (reply, destroy) = std::thread::scope(|s| {
        let _release = shim.releasing();
        let request = s.spawn(|| {
            vault::post(
                &c.agency,
                "/v1/unwrap",
                &serde_json::json!({"warrant": warrant, "envelopes": [doomed]}),
            )
        });
        // The unwrap's leaf and spend committed; its checkpoint's
        // signature waits in the HSM.
        eventually("the unwrap's checkpoint signature", WAIT, || {
            shim.faults() > 0
        });
        eventually("the unwrap's audit commit", WAIT, || {
            vault::spent(t, id) == 1
        });
        // Signs nothing: it runs to the end while the unwrap waits.
        let destroy = t.lavd_with_config(&[
            "keys", "destroy", "--kid", "E-2", "--force", "--reason", "seized",
        ]);
        assert!(!request.is_finished(), "the unwrap answered while held");
        shim.set("");
        (request.join().unwrap(), destroy)
    });
    assert_ok(&destroy);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = reply.json();
    assert_eq!(vault::statuses(&reply), ["key_destroyed"]);

    // In the log: the unwrap's leaf, opened, before the destruction's.
    let (log, first, destruction) = unwrap_and_destruction(c, &reply);
    assert!(first < destruction, "{first} >= {destruction}");
    let leaf = &log[usize::try_from(first).unwrap()].leaf;
    assert_eq!(leaf["outcome"], "opened");
    assert_eq!(vault::spent(t, id), 1);
    // Charged and not released, which operators see counted apart.
    let unreleased = "lavd_envelopes_unreleased_total{code=\"key_destroyed\"}";
    assert_eq!(setup.daemon.metric(unreleased), 1.0);
}
