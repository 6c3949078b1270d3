//! An escrow key's store row that cannot be read (an edited or damaged
//! store), with the real `lavd` binary on a real SoftHSM token: the other
//! keys are still destroyed at the end of their retention, and still
//! published. A row marked destroyed by hand, without its audit leaf,
//! deletes nothing from the token, nor does an interrupted destruction
//! over a log found inconsistent; a destruction the daily job itself
//! finishes in its second pass is not reported failed. A store that is not there is not made
//! anew beside a token that holds keys. (Its own process: `key_lifecycle.rs` uses all the tokens one
//! test process may claim.)

use cryptoki::object::{Attribute, ObjectClass};
use softhsm_tests::{assert_fails_with, assert_ok, generate_key_for, TestToken};

/// One escrow key row that cannot be read (an edited or damaged store)
/// does not keep the others past their retention, nor out of the key list:
/// the daily job destroys every key due, names the unreadable row and
/// exits 1; the key list that `GET /v1/keys` publishes from (`keys::jwks`,
/// which `keys::jwks_checked` filters further) leaves out only that row;
/// `lavd keys list --all` lists the others, names it and exits 1. Before,
/// the first unreadable row failed each of them whole.
#[test]
fn an_unreadable_key_row_does_not_stop_the_others_destruction() {
    let t = TestToken::new();
    for (kid, not_after, destroy_after) in [
        ("2020-01", "2020-02-01T00:00:00Z", "2021-01-01T00:00:00Z"),
        ("2099-01", "2099-02-01T00:00:00Z", "2100-01-01T00:00:00Z"),
        ("2099-02", "2099-03-01T00:00:00Z", "2100-02-01T00:00:00Z"),
    ] {
        assert_ok(&generate_key_for(
            &t,
            kid,
            ["2020-01-01T00:00:00Z", not_after, destroy_after],
        ));
    }
    // A key still valid, so that it would be published and listed.
    rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .execute(
            "UPDATE escrow_keys SET created_at = 'garbage' WHERE kid = '2099-01'",
            [],
        )
        .unwrap();
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "destroy_incomplete");
    assert!(
        stderr.contains("escrow key 2099-01: its store row cannot be read"),
        "{stderr}"
    );
    assert!(!t.holds_escrow_key("2020-01"), "{stderr}");
    assert!(t.holds_escrow_key("2099-01"));
    assert!(t.holds_escrow_key("2099-02"));

    let store = lavd::store::SqliteStore::open(&t.path("lavd.db")).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let due = lavd::keys::due_for_destruction(&store, now).unwrap();
    assert!(due.keys.is_empty());
    assert_eq!(due.unreadable.len(), 1);
    assert_eq!(due.unreadable[0].0, "2099-01");
    let published = lavd::keys::jwks(&store, now).unwrap();
    let kids: Vec<_> = published.keys.iter().map(|k| k.kid.clone()).collect();
    assert_eq!(kids, [Some("2099-02".to_string())]);

    // Text read from the store is printed escaped: a reason edited to hold
    // a line break and a terminal escape forges no line.
    rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .execute(
            "UPDATE escrow_keys SET destroy_reason = ?1 WHERE kid = '2020-01'",
            ["retention\n2099-09\tnot_before=x\u{1b}[2K"],
        )
        .unwrap();
    let out = t.lavd_with_config(&["keys", "list", "--all"]);
    softhsm_tests::assert_fails_with(&out, 1, "keys_unreadable");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("(retention\\n2099-09\\tnot_before=x\\u{1b}[2K)"),
        "{listing}"
    );
    assert!(
        !listing.lines().any(|l| l.starts_with("2099-09")),
        "{listing}"
    );
    assert!(
        listing.contains("2020-01\t") && listing.contains("2099-02\t"),
        "{listing}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("escrow key 2099-01: its store row cannot be read"),
        "{stderr}"
    );
}

/// An unwrap naming a key whose store row cannot be read denies that key's
/// envelopes `open_failed` and opens the others in the batch, with a leaf
/// each; the request is not failed whole. Before, the first such row made
/// every request naming it 503 `store_unavailable`, with agencies retrying
/// while `/readyz` stayed green.
#[test]
fn an_unwrap_naming_an_unreadable_key_row_opens_the_other_keys() {
    use softhsm_tests::server::{serve_config, Daemon, Pki};
    use softhsm_tests::vault::{self, Parties, TARGET};
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let public = |kid: &str| {
        let printed = assert_ok(&generate_key_for(
            &t,
            kid,
            [
                "2020-01-01T00:00:00Z",
                "2099-02-01T00:00:00Z",
                "2100-01-01T00:00:00Z",
            ],
        ));
        lavd::jwk::P256PublicKey::from_jwk(&lavd::jwk::Jwk::from_json(printed.as_bytes()).unwrap())
            .unwrap()
    };
    let (damaged, whole) = (public("2099-01"), public("2099-02"));
    rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .execute(
            "UPDATE escrow_keys SET created_at = 'garbage' WHERE kid = '2099-01'",
            [],
        )
        .unwrap();
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-DAMAGED-ROW", recipient.public(), 10));
    let at = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let envelopes = [
        vault::seal(&damaged, "2099-01", TARGET, at, "damaged", &[1; 16]),
        vault::seal(&whole, "2099-02", TARGET, at, "whole", &[2; 16]),
        vault::seal(&damaged, "2099-01", TARGET, at, "damaged-again", &[3; 16]),
    ];
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    assert_eq!(
        vault::statuses(&reply),
        ["open_failed", "ok", "open_failed"]
    );
    let first = reply["audit"]["first_index"].as_u64().unwrap();
    let log = vault::entries(&c.auditor, first, first + 3);
    let outcomes: Vec<_> = log
        .iter()
        .map(|e| (e.leaf["outcome"].clone(), e.leaf["reason"].clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("denied".into(), "open_failed".into()),
            ("opened".into(), serde_json::Value::Null),
            ("denied".into(), "open_failed".into()),
        ]
    );
    assert!(
        daemon
            .stderr()
            .contains("an escrow key's store row cannot be read"),
        "{}",
        daemon.stderr()
    );
}

/// The store gone (a volume not mounted, a mistyped path) beside a token
/// that holds escrow keys: `lavd serve` refuses to start (`store_missing`,
/// naming the path and the keys) and creates nothing, where it made a new,
/// empty store and signed a second log's first checkpoint under the same
/// origin and audit key, a fork. With the store back, it starts. A token
/// with no escrow key yet (a first start) still makes its store: every
/// other test's first `Daemon::start` after `keys generate-audit` does.
#[test]
fn serve_refuses_to_make_a_store_beside_a_token_that_holds_keys() {
    use softhsm_tests::server::{serve_config, Daemon, Pki};
    use softhsm_tests::vault;
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let store = t.path("lavd.db");
    let aside = t.path("lavd.db.aside");
    std::fs::rename(&store, &aside).unwrap();
    let (status, stderr) = Daemon::try_start(&t).expect_err("a start without its store");
    assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: store_missing: ")
            && stderr.contains(&format!("{} does not exist", store.display()))
            && stderr.contains("1 escrow key(s) (E-1)"),
        "{stderr}"
    );
    assert!(!store.exists(), "a store was made");
    // Nor does a key generation, nor a migration without --new.
    let out = softhsm_tests::generate_key(&t, "E-2", "2027-06-01T00:00:00Z");
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "store_missing");
    assert!(stderr.contains("1 escrow key(s) (E-1)"), "{stderr}");
    let out = t.lavd_with_config(&["store", "migrate"]);
    softhsm_tests::assert_fails_with(&out, 1, "store_missing");
    // Nor an export, which made the store and signed its first checkpoint,
    // after which `lavd serve` took it for the token's (`audit export` from
    // a cron job while the volume is not mounted); `audit key` reads only
    // the token, and works.
    let export = t.path("export.json");
    let out = t.lavd_with_config(&["audit", "export", "--out", export.to_str().unwrap()]);
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "store_missing");
    assert!(
        stderr.contains(&format!("{} does not exist", store.display())),
        "{stderr}"
    );
    assert!(!export.exists(), "an export was written");
    let key = assert_ok(&t.lavd_with_config(&["audit", "key"]));
    lavd::audit::note::VerifierKey::parse(key.trim()).expect("a verifier key");
    assert!(!store.exists(), "a store was made");
    let (status, stderr) = Daemon::try_start(&t).expect_err("a start without its store");
    assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
    std::fs::rename(&aside, &store).unwrap();
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
}

/// A destruction whose store mark is found already made when its own
/// commit comes (`KeyAlreadyDestroyed`: another replica's retention job
/// first, or a mark made by hand) finishes on the token only once the log
/// is shown to hold that destruction's leaf, as an interrupted one does.
/// Here the mark is made by hand, with no leaf, while the command waits in
/// its look at the token (a fresh session's `C_Login`, held in the fault
/// module), after its read of the store: the key stays on the token, and
/// the command fails `destroy_unlogged`. Before, it deleted the key for
/// good with nothing in the log.
#[test]
fn a_mark_made_by_hand_while_a_destruction_runs_deletes_nothing() {
    const KID: &str = "2026-12";
    let t = TestToken::new();
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(&softhsm_tests::shim_module_path(), &shim.hsm_env());
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));
    // The command's own login first, then the fresh session's.
    shim.set("fault = hang\nfault_calls = C_Login\nfault_after = 1");
    let config = t.config();
    let child = softhsm_tests::lavd_command(&[
        "keys",
        "destroy",
        "--kid",
        KID,
        "--force",
        "--reason",
        "test",
        "--config",
        config.to_str().unwrap(),
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    softhsm_tests::eventually(
        "the destruction's look at the token",
        std::time::Duration::from_secs(20),
        || shim.faults() > 0,
    );
    assert_eq!(t.mark_destroyed_by_hand(KID), 1);
    shim.set("");
    let out = child.wait_with_output().unwrap();
    let stderr = assert_fails_with(&out, 1, "destroy_unlogged");
    assert!(stderr.contains(KID), "{stderr}");
    assert!(t.holds_escrow_key(KID), "the key was deleted");
}

/// A destruction marked in the store by hand, with no `key_destroyed` leaf
/// in the log (a real one commits the two together), is not finished on
/// the token: neither the daily job nor `--kid` deletes the key for good,
/// before its retention and unlogged; each says `destroy_unlogged`. Nor
/// with a `key_destroyed` leaf row for it written into the store: the leaf
/// must be proved in the signed tree.
#[test]
fn a_destruction_the_log_does_not_hold_is_not_finished() {
    const KID: &str = "2026-12";
    let t = TestToken::new();
    assert_ok(&softhsm_tests::generate_key(
        &t,
        KID,
        "2030-01-01T00:00:00Z",
    ));
    assert_eq!(t.mark_destroyed_by_hand(KID), 1);
    // With no audit key on the token (no lavd token lacks one), nothing
    // can be proved in the log: said as such, not as an HSM that is down.
    assert_fails_with(
        &t.lavd_with_config(&[
            "keys", "destroy", "--kid", KID, "--force", "--reason", "finish",
        ]),
        1,
        "no_audit_key",
    );
    assert!(t.holds_escrow_key(KID), "the key was deleted");
    // The key that signs the log, as on every lavd token.
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    // Another key's real destruction: its `key_destroyed` leaf must not
    // stand for this one's.
    assert_ok(&softhsm_tests::generate_key(
        &t,
        "2026-11",
        "2030-01-01T00:00:00Z",
    ));
    assert_ok(&t.lavd_with_config(&[
        "keys", "destroy", "--kid", "2026-11", "--force", "--reason", "test",
    ]));
    let stderr = assert_fails_with(
        &t.lavd_with_config(&["keys", "destroy", "--expired"]),
        1,
        "destroy_incomplete",
    );
    assert!(
        stderr.contains(&format!(
            "lavd: destroy_unlogged: escrow key {KID}: the store marks"
        )),
        "{stderr}"
    );
    assert!(t.holds_escrow_key(KID), "the key was deleted");
    assert_fails_with(
        &t.lavd_with_config(&[
            "keys", "destroy", "--kid", KID, "--force", "--reason", "finish",
        ]),
        1,
        "destroy_unlogged",
    );
    assert!(t.holds_escrow_key(KID), "the key was deleted");

    // Nor with a leaf row written beside the mark: the other key's
    // `key_destroyed` leaf rewritten to name this one. The leaf is not the
    // one the signed tree holds.
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE audit_leaves SET leaf = CAST(replace(CAST(leaf AS TEXT), \
             '\"kid\":\"2026-11\"', '\"kid\":\"2026-12\"') AS BLOB) \
             WHERE CAST(leaf AS TEXT) LIKE '%key_destroyed%2026-11%'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    for args in [
        &["keys", "destroy", "--expired"][..],
        &[
            "keys", "destroy", "--kid", KID, "--force", "--reason", "finish",
        ],
    ] {
        let out = t.lavd_with_config(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "destroy_unlogged: escrow key {KID}: the store marks escrow key {KID} destroyed, \
                 but its key_destroyed leaf 2 is not proved in the signed log"
            )) || stderr.contains(&format!(
                "lavd: destroy_unlogged: the store marks escrow key {KID} destroyed, but its \
                 key_destroyed leaf 2 is not proved in the signed log"
            )),
            "{args:?}: {stderr}"
        );
        assert!(t.holds_escrow_key(KID), "the key was deleted");
    }
}

/// A log found inconsistent proves no leaf: an interrupted destruction
/// (marked in the store with its leaf, the key still on the token) is not
/// finished over it, by the daily job or by `--kid`, and the refusal is
/// `log_inconsistent`, not `destroy_unlogged`: the operator has a damaged
/// log to look at, not a mark made by hand.
#[test]
fn an_interrupted_destruction_is_not_finished_over_an_inconsistent_log() {
    const KID: &str = "2026-12";
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    for kid in [KID, "2026-11"] {
        assert_ok(&softhsm_tests::generate_key(
            &t,
            kid,
            "2030-01-01T00:00:00Z",
        ));
    }
    // One destruction finished, which signs a checkpoint over its leaf.
    t.interrupt_destruction("2026-11");
    assert_ok(&t.lavd_with_config(&["keys", "destroy", "--expired"]));
    assert!(
        !t.holds_escrow_key("2026-11"),
        "the finished key is still there"
    );
    t.interrupt_destruction(KID);
    // The newest checkpoint filed under a size it does not say.
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE audit_checkpoints SET size = size + 1000 \
             WHERE size = (SELECT MAX(size) FROM audit_checkpoints)",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let stderr = assert_fails_with(
        &t.lavd_with_config(&["keys", "destroy", "--expired"]),
        1,
        "destroy_incomplete",
    );
    assert!(
        stderr.contains(&format!("lavd: log_inconsistent: escrow key {KID}: ")),
        "{stderr}"
    );
    assert!(t.holds_escrow_key(KID), "the key was deleted");
    let stderr = assert_fails_with(
        &t.lavd_with_config(&[
            "keys", "destroy", "--kid", KID, "--force", "--reason", "finish",
        ]),
        1,
        "log_inconsistent",
    );
    assert!(
        stderr.contains("is filed under size") && stderr.contains("but says size"),
        "{stderr}"
    );
    assert!(t.holds_escrow_key(KID), "the key was deleted");
}

/// The harness's way to have this process read a token afresh
/// (`TestToken::touch`, which `TestToken::slot` uses when lookups keep
/// failing) logs in from another process and leaves nothing on the token;
/// the token is found, and logged in to, after it.
#[test]
fn touching_a_token_leaves_nothing_on_it() {
    let t = TestToken::new();
    assert!(t.touch(), "pkcs11-tool could not log in to the token");
    assert!(t.touch(), "a second login failed");
    let data = t
        .session()
        .find_objects(&[Attribute::Class(ObjectClass::DATA)])
        .unwrap();
    assert!(data.is_empty(), "{} data objects left", data.len());
}

/// The daily job's first pass commits a key's destruction and then fails
/// on the token (the module fails one `C_DestroyObject`); its second pass,
/// which finishes recorded destructions, finishes it in the same run. The
/// run says both, and succeeds: the key is gone. Before, it also exited 1
/// `destroy_incomplete` naming the key it had just finished.
#[test]
fn a_destruction_the_daily_job_finishes_itself_is_not_reported_failed() {
    use softhsm_tests::server::serve_config;
    let t = TestToken::new();
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_hsm(
        &softhsm_tests::shim_module_path(),
        2,
        "",
        &format!(
            "{}\n{}",
            shim.hsm_env(),
            serve_config(&softhsm_tests::vault::roles_toml())
        ),
    );
    // A key past its retention, and one that is not (so that the token
    // shows a private key once the first is gone).
    for (kid, not_after, destroy_after) in [
        ("2020-01", "2020-02-01T00:00:00Z", "2021-01-01T00:00:00Z"),
        ("2099-01", "2099-02-01T00:00:00Z", "2100-01-01T00:00:00Z"),
    ] {
        assert_ok(&generate_key_for(
            &t,
            kid,
            ["2020-01-01T00:00:00Z", not_after, destroy_after],
        ));
    }
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    // The destroy and its retry on a new session (CKR_DEVICE_ERROR counts
    // as a lost session) both fail.
    shim.set("fault = device_error\nfault_calls = C_DestroyObject\nfault_limit = 2\n");
    let out = t.lavd_with_config(&["keys", "destroy", "--expired"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("escrow key 2020-01: finished an interrupted destruction"),
        "{stderr}"
    );
    assert_eq!(shim.faults(), 2, "{stderr}");
    assert_ok(&out);
    assert!(!t.holds_escrow_key("2020-01"), "{stderr}");
}
