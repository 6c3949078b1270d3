//! `lavd store copy`: a store written by a real `lavd serve` on SQLite is
//! copied into a new PostgreSQL database with the real CLI, and a `lavd
//! serve` on PostgreSQL carries on from it: same keys, same budgets, same
//! revocations, the same log (identical root). A copy whose log does not
//! verify commits nothing and can be run again; a non-empty target is
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use softhsm_tests::pg::TestDb;
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{assert_ok, lavd_command, TestToken};
use time::{Duration, OffsetDateTime};

#[test]
fn an_sqlite_store_copies_into_postgres_and_lavd_carries_on() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let config = serve_config(&format!(
        "{}[limits]\nrate_limit_per_second = 10000.0\nrate_limit_burst = 10000\n",
        vault::roles_toml()
    ));
    t.write_config(&config);
    vault::generate_escrow_key(&t, "E-1");
    let parties = Parties::new(&pki);
    let recipient = vault::recipient();
    let w1 = vault::double_lock(&vault::claims("W-1", recipient.public(), 10));
    let w2 = vault::double_lock(&vault::claims("W-2", recipient.public(), 10));

    let db = TestDb::create();
    let copy_from = |from: &std::path::Path, key: &str| copy(from, &db.url(), key);
    // Some history on SQLite: 3 of W-1's 10 units spent, W-2 revoked.
    let (escrow, sqlite_size) = {
        let daemon = Daemon::start(&t);
        daemon.wait_readyz(200);
        let c = parties.clients(&pki, daemon.api);
        let escrow = vault::published_key(&c.provider, "E-1");
        let envelopes: Vec<_> = (0..3).map(|n| seal(&escrow, n)).collect();
        let r = vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": w1, "envelopes": envelopes}),
        );
        assert_eq!(vault::statuses(&r.json()), ["ok"; 3]);
        let r = vault::post(
            &c.admin,
            "/v1/warrants/revocations",
            &serde_json::json!({"id": "W-2", "reason": "quashed"}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        // Not while a daemon serves the store: what it commits after the
        // copy's snapshot would be missing from the copy. Refused before
        // anything is read or written.
        let any_key = lavd::audit::note::verifier_key("lavd.invalid/audit", &[9; 32]).unwrap();
        let stderr = softhsm_tests::assert_fails_with(
            &copy_from(&t.path("lavd.db"), &any_key),
            1,
            "store_in_use",
        );
        assert!(stderr.contains("another lavd serve"), "{stderr}");
        assert_eq!(db.rows("pg_tables WHERE schemaname = 'public'"), 0);
        let size = vault::tree_size(&c.auditor);
        let leaves: Vec<Vec<u8>> = vault::entries(&c.auditor, 0, size)
            .into_iter()
            .map(|e| e.bytes)
            .collect();
        (escrow, (size, leaves))
    };
    let (sqlite_size, sqlite_leaves) = sqlite_size;
    let key = assert_ok(&t.lavd_with_config(&["audit", "key"]))
        .trim()
        .to_string();

    let db_path = t.path("lavd.db");
    // A witness cosignature of the newest checkpoint, as the submitter
    // stores it: the copy carries it.
    let cosigned_size: i64 = {
        let sqlite = rusqlite::Connection::open(&db_path).unwrap();
        let size: i64 = sqlite
            .query_row("SELECT MAX(size) FROM audit_checkpoints", [], |r| r.get(0))
            .unwrap();
        sqlite
            .execute(
                "INSERT INTO audit_cosignatures (size, witness, line) VALUES (?1, 'w1', ?2)",
                rusqlite::params![size, "\u{2014} w1 AAAA\n"],
            )
            .unwrap();
        size
    };
    let copy_db = |key: &str| copy_from(&db_path, key);
    // A file that is no lavd store (empty, as a placeholder or a failed
    // restore leaves it) is refused and left as it was: opened as a store
    // it would have been given lavd's schema, and an empty log copied.
    let empty = t.path("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let stderr =
        softhsm_tests::assert_fails_with(&copy_from(&empty, &key), 1, "store_copy_refused");
    assert!(stderr.contains("not a lavd store"), "{stderr}");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    // A directory is named as one (it was "no such file").
    let directory = t.path("a-directory");
    std::fs::create_dir(&directory).unwrap();
    let stderr =
        softhsm_tests::assert_fails_with(&copy_from(&directory, &key), 1, "store_copy_refused");
    assert!(stderr.contains("a-directory is a directory"), "{stderr}");
    // A key that did not sign the log: the copy is refused, and commits
    // nothing (the leaves it had written are rolled back).
    let other = lavd::audit::note::verifier_key("lavd.invalid/audit", &[9; 32]).unwrap();
    let out = copy_db(&other);
    softhsm_tests::assert_fails_with(&out, 1, "store_copy_refused");
    assert_eq!(db.rows("audit_leaves"), 0);
    // It left lavd's schema there (its connection migrates before the
    // copy's transaction) but no leaf: `lavd serve` and `lavd keys
    // generate` pointed there take it for a new store, refused beside a
    // token that holds another store's escrow keys (E-1), as no store at
    // all is. Before, the schema made it a store: a second log began
    // there, a fork of the one in SQLite.
    assert!(db.rows("pg_tables WHERE schemaname = 'public'") > 0);
    db.write_token_config(&t, &config);
    let generate = [
        "keys",
        "generate",
        "--kid",
        "E-2",
        "--not-before",
        "2026-12-01T00:00:00Z",
        "--not-after",
        "2099-01-01T00:00:00Z",
        "--destroy-after",
        "2099-06-01T00:00:00Z",
    ];
    for command in [&generate[..], &["serve"][..]] {
        let stderr =
            softhsm_tests::assert_fails_with(&t.lavd_with_config(command), 1, "store_missing");
        assert!(
            stderr.contains("holds lavd's schema but no audit leaf") && stderr.contains("E-1"),
            "{stderr}"
        );
    }
    assert_eq!(db.rows("audit_leaves"), 0);
    t.write_config(&config);
    // A target emptied by hand of all but an open intent is not empty: a
    // replica's sweep would log it for a warrant never asked there.
    db.client()
        .batch_execute(
            "INSERT INTO open_intents (warrant_id, expires_at, leaves) \
             VALUES ('W-ELSEWHERE', now(), ARRAY[]::BYTEA[])",
        )
        .unwrap();
    let stderr = softhsm_tests::assert_fails_with(&copy_db(&key), 1, "store_copy_refused");
    assert!(stderr.contains("is not empty (1 rows)"), "{stderr}");
    db.client()
        .batch_execute("DELETE FROM open_intents")
        .unwrap();
    // A source holding an open intent (HSM opens of a process that stopped
    // before their audit commit) is refused: its leaves are not in the log
    // yet, and `lavd serve` writes them at its start.
    let sqlite = rusqlite::Connection::open(&db_path).unwrap();
    sqlite
        .execute(
            "INSERT INTO open_intents (warrant_id, created_at, leaves) VALUES ('W', ?1, X'5B5D')",
            ["2026-12-05T10:00:00Z"],
        )
        .unwrap();
    let stderr = softhsm_tests::assert_fails_with(&copy_db(&key), 1, "store_copy_refused");
    assert!(stderr.contains("holds 1 open intent(s)"), "{stderr}");
    assert_eq!(db.rows("audit_leaves"), 0);
    sqlite.execute("DELETE FROM open_intents", []).unwrap();
    drop(sqlite);
    // Run again with the right key, given as a file holding it (as `lavd
    // audit verify --key` takes it).
    let key_file = t.path("audit.vkey");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    // A handle opened before the copy (a `lavd keys` command that opened
    // the file, then waited for the copy's lock): its write after the copy
    // is refused too, read under the write lock. Before the check moved
    // into each write, it would have landed in the copied file.
    let early = lavd::store::Store::open(&db_path).unwrap();
    let out = copy_db(key_file.to_str().unwrap());
    let printed = assert_ok(&out);
    assert!(
        printed.contains(&format!("{sqlite_size} leaves")),
        "{printed}"
    );
    assert!(printed.contains("1 cosignatures"), "{printed}");
    let row = db
        .client()
        .query_one("SELECT size, witness, line FROM audit_cosignatures", &[])
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, String>(1)),
        (cosigned_size, "w1".to_string())
    );
    assert_eq!(row.get::<_, String>(2), "\u{2014} w1 AAAA\n");
    // The source is marked copied, in the transaction that read it: no
    // lavd opens it again, to copy it (a second copy) or to write to it
    // (a `lavd keys destroy` timer left on the old config, a `lavd serve`
    // on the old path after a rollback: each would fork the log or record
    // what PostgreSQL never sees). Its rows stay as they were. Before,
    // nothing stopped either.
    let out = copy_db(&key);
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "store_moved");
    assert!(
        stderr.contains("copied to ") && stderr.contains("lavd store copy"),
        "{stderr}"
    );
    for command in [
        &["keys", "destroy", "--expired"][..],
        &["keys", "list", "--all"][..],
        // E-2, refused above and never made.
        &generate[..],
        &["serve"][..],
    ] {
        let stderr =
            softhsm_tests::assert_fails_with(&t.lavd_with_config(command), 1, "store_moved");
        assert!(
            stderr.contains(&format!("its log of {sqlite_size} leaves goes on there")),
            "{command:?}: {stderr}"
        );
    }
    use lavd::store::AuditStore as _;
    let late = early.append(lavd::store::AuditAppend {
        events: vec![lavd::audit::leaf::KeyGenerated::new(
            "E-LATE",
            lavd::codec::parse_time("2026-12-01T00:00:00Z").unwrap(),
            lavd::codec::parse_time("2027-01-01T00:00:00Z").unwrap(),
            lavd::codec::parse_time("2028-01-01T00:00:00Z").unwrap(),
            None,
        )
        .unwrap()
        .into()],
        time: time::OffsetDateTime::now_utc(),
        spend: lavd::store::Spend::None,
    });
    assert!(
        matches!(late, Err(lavd::store::StoreError::Moved { .. })),
        "{late:?}"
    );
    drop(early);
    let kept: i64 = rusqlite::Connection::open(&db_path)
        .unwrap()
        .query_row("SELECT count(*) FROM audit_leaves", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept as u64, sqlite_size);

    // lavd serve on PostgreSQL carries on.
    db.write_token_config(&t, &config);
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = parties.clients(&pki, daemon.api);
    assert_eq!(vault::published_key(&c.provider, "E-1"), escrow);
    // The copied log is the prefix of the one it serves.
    let size = vault::tree_size(&c.auditor);
    assert!(size >= sqlite_size);
    let copied: Vec<Vec<u8>> = vault::entries(&c.auditor, 0, sqlite_size)
        .into_iter()
        .map(|e| e.bytes)
        .collect();
    assert_eq!(copied, sqlite_leaves);
    let envelopes: Vec<_> = (0..10).map(|n| seal(&escrow, n)).collect();
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": w1, "envelopes": envelopes}),
    );
    let statuses = vault::statuses(&r.json());
    assert_eq!(
        statuses.iter().filter(|s| *s == "ok").count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "budget_exhausted").count(),
        3
    );
    vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": w2, "envelopes": [seal(&escrow, 0)]}),
    )
    .assert_error(403, "warrant_revoked");
    // The whole log, old and new leaves, verifies against the daemon.
    softhsm_tests::faults::verify_log(&t, &pki, &parties.auditor, daemon.api);
}

fn seal(escrow: &lavd::jwk::P256PublicKey, n: usize) -> serde_json::Value {
    vault::seal(
        escrow,
        "E-1",
        TARGET,
        OffsetDateTime::now_utc() - Duration::hours(1),
        &format!("m{n}"),
        &[7; 32],
    )
}

/// A token with a SQLite store holding a key's leaf (its config points
/// there), a PostgreSQL database with lavd's schema and nothing else (so
/// that the only COMMIT after a copy's rows is the copy's), and the audit
/// key's vkey.
fn sqlite_store_and_an_empty_target() -> (TestToken, TestDb, String) {
    let t = TestToken::new();
    t.write_config(&serve_config(&vault::roles_toml()));
    softhsm_tests::server::make_audit_key(&t);
    vault::generate_escrow_key(&t, "E-1");
    let key = assert_ok(&t.lavd_with_config(&["audit", "key"]))
        .trim()
        .to_string();
    let db = TestDb::create();
    db.write_token_config(&t, &serve_config(&vault::roles_toml()));
    assert_ok(&t.lavd_with_config(&["store", "migrate", "--new"]));
    t.write_config(&serve_config(&vault::roles_toml()));
    (t, db, key)
}

/// `lavd store copy` of the SQLite store `from` to `url` under `key`.
fn copy(from: &std::path::Path, url: &str, key: &str) -> std::process::Output {
    lavd_command(&[
        "store",
        "copy",
        "--from",
        from.to_str().unwrap(),
        "--to",
        url,
        "--password-env",
        "LAVD_TEST_DB_PASSWORD",
        "--key",
        key,
    ])
    .env("LAVD_TEST_DB_PASSWORD", softhsm_tests::pg::password())
    .output()
    .expect("lavd store copy")
}

/// [`copy`] of `t`'s SQLite store.
fn copy_to(t: &TestToken, url: &str, key: &str) -> std::process::Output {
    copy(&t.path("lavd.db"), url, key)
}

/// A copy whose COMMIT the server refuses (here a deferred constraint
/// trigger raising at COMMIT) takes its mark back: the source is the store
/// again, and the target holds nothing. Before, the mark's row was deleted
/// but its table, which marks the file by itself, stayed: every open of the
/// source was refused `store_moved`.
#[test]
fn a_copy_the_target_refuses_to_commit_leaves_its_source_usable() {
    let (t, db, key) = sqlite_store_and_an_empty_target();
    db.client()
        .batch_execute(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$; \
             CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON audit_leaves \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();",
        )
        .unwrap();
    let out = copy_to(&t, &db.url(), &key);
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "store_unavailable");
    assert!(stderr.contains("refused at commit"), "{stderr}");
    assert_eq!(db.rows("audit_leaves"), 0);
    assert_ok(&t.lavd_with_config(&["keys", "list", "--all"]));
}

/// A copy whose COMMIT loses its answer (the connection cut just after
/// PostgreSQL got it, which commits it) leaves its source marked copied:
/// the file is marked before PostgreSQL commits, so no fate of the copy
/// leaves the two stores both writable. The copy says the fate is
/// unknown; the target does hold the log. Before, the source was marked
/// after PostgreSQL's answer, and a lost answer left it unmarked beside a
/// committed copy: a start on the old path forked the log.
#[test]
fn a_copy_whose_commit_answer_is_lost_leaves_its_source_marked() {
    let (t, db, key) = sqlite_store_and_an_empty_target();
    let proxy = softhsm_tests::pg::CutAtCommit::start(softhsm_tests::pg::port());
    proxy.arm_after(b"audit_cosignatures", false);
    let out = copy_to(&t, &db.settings_via(proxy.port()).url, &key);
    assert_eq!(proxy.cuts(), 1, "{out:?}");
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "store_unavailable");
    assert!(
        stderr.contains("is unknown, so this file stays marked copied"),
        "{stderr}"
    );
    // PostgreSQL committed it; the source refuses every open.
    let leaves: i64 = rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM audit_leaves", [], |r| r.get(0))
        .unwrap();
    assert_eq!(db.rows("audit_leaves"), leaves);
    softhsm_tests::assert_fails_with(
        &t.lavd_with_config(&["keys", "list", "--all"]),
        1,
        "store_moved",
    );
}

/// `lavd store migrate --config` on a PostgreSQL store: applies the schema
/// and prints its version; run twice, it changes nothing. A bad `[store]`
/// exits 64 naming the field, before any connection.
#[test]
fn store_migrate_applies_the_schema_and_bad_store_settings_exit_64() {
    let t = TestToken::new();
    let db = TestDb::create();
    db.write_token_config(&t, "");
    // A database without lavd's schema is not made into a store unless
    // asked: it may be one re-created where a store was.
    let out = t.lavd_with_config(&["store", "migrate"]);
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "store_missing");
    assert!(stderr.contains("give --new"), "{stderr}");
    let tables: i64 = db
        .client()
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "a schema was made");
    for args in [&["store", "migrate", "--new"][..], &["store", "migrate"]] {
        let printed = assert_ok(&t.lavd_with_config(args));
        assert_eq!(
            printed.trim(),
            format!(
                "postgresql://{}/{}: schema version 9",
                "127.0.0.1:5432",
                db.name()
            )
        );
    }
    assert_eq!(db.rows("schema_version"), 9);

    let good = std::fs::read_to_string(t.config()).unwrap();
    for (from, to, field) in [
        ("sslmode=disable", "sslmode=require", "store.url"),
        ("sslmode=disable", "sslmode=verify-full", "store.ca_file"),
        (
            "password_file = \"dbpass\"",
            "password = \"x\"",
            "store.password",
        ),
        ("pool_size = 8", "pool_size = 0", "store.pool_size"),
    ] {
        std::fs::write(t.config(), good.replace(from, to)).unwrap();
        let out = t.lavd_with_config(&["store", "migrate"]);
        let stderr = softhsm_tests::assert_fails_with(&out, 64, "bad_config");
        assert!(stderr.contains(field), "{field}: {stderr}");
    }
}
