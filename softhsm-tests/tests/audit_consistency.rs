//! The daemon does not sign whatever tree head the store presents. Leaves
//! truncated, or rewritten with their subtree hashes recomputed, in the
//! SQLite file behind a running `lavd serve` (through another connection)
//! are caught before the next checkpoint: that unwrap and every later one
//! get 503 `log_inconsistent`, `/readyz` turns 503 with `"log": false`, and
//! stderr has an ERROR naming both tree sizes. A restart on the tampered
//! file refuses to start (`log_inconsistent`).

use std::time::Duration;

use lavd::audit::merkle::{leaf_hash, node_hash, Hash};
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Clients, Parties, TARGET};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

struct Setup {
    t: TestToken,
    daemon: Daemon,
    c: Clients,
    warrant: serde_json::Value,
    escrow: lavd::jwk::P256PublicKey,
}

fn setup() -> Setup {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let warrant = vault::double_lock(&vault::claims(
        "LOG-CONSISTENCY-1",
        vault::recipient().public(),
        10,
    ));
    Setup {
        t,
        daemon,
        c,
        warrant,
        escrow,
    }
}

fn unwrap(s: &Setup, n: u8) -> softhsm_tests::server::Response {
    let envelope = vault::seal(
        &s.escrow,
        "E-1",
        TARGET,
        OffsetDateTime::now_utc() - time::Duration::hours(1),
        &format!("m{n}"),
        &[n; 32],
    );
    vault::post(
        &s.c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": s.warrant, "envelopes": [envelope]}),
    )
}

fn tamper(t: &TestToken, sql: &str) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch(sql).unwrap();
    conn
}

/// The number of leaves in the file, read behind the daemon's back.
fn leaves_in_file(t: &TestToken) -> u64 {
    let conn = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.query_row("SELECT MAX(idx) + 1 FROM audit_leaves", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as u64
}

/// After the tamper: refused unwraps, not ready, the ERROR with both sizes
/// (`sizes` gets the leaves in the file after the refused unwrap); then a
/// restart that refuses too.
fn assert_refused_from_now_on(mut s: Setup, sizes: impl Fn(u64) -> [u64; 2]) {
    let message = unwrap(&s, 2).assert_error(503, "log_inconsistent");
    let sizes = sizes(leaves_in_file(&s.t));
    assert!(message.contains("audit log"), "{message}");
    // Every later request too, before anything is opened.
    unwrap(&s, 3).assert_error(503, "log_inconsistent");
    // A revocation that is wrong in itself is answered for what is wrong
    // with it, not as the log's failure (a retry would not help).
    vault::post(
        &s.c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": 7, "reason": "quashed"}),
    )
    .assert_error(400, "malformed_request");
    let good = vault::post(
        &s.c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": "LOG-CONSISTENCY-1", "reason": "quashed"}),
    );
    // And a good one still takes effect: committed, in force, with no
    // checkpoint over it.
    assert_eq!(good.status, 200, "{}", good.text());
    let good = good.json();
    assert_eq!(good["revoked"], true, "{good}");
    assert!(good["audit"]["checkpoint"].is_null(), "{good}");
    s.c.auditor
        .get("/v1/audit/checkpoint")
        .assert_error(503, "log_inconsistent");
    // No tile either (tiles are cached as immutable).
    s.c.auditor
        .get("/v1/log/tile/0/000.p/1")
        .assert_error(503, "log_inconsistent");
    let ready = s.daemon.wait_readyz(503).json();
    assert_eq!(ready["log"], false, "{ready}");
    assert_eq!(ready["hsm"], true, "{ready}");
    assert_eq!(ready["store"], true, "{ready}");
    let stderr = s.daemon.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("audit log inconsistent"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{stderr}"));
    for size in sizes {
        assert!(line.contains(&format!("size {size}")), "{line}");
    }

    s.daemon.signal(rustix::process::Signal::TERM);
    s.daemon.wait_exit(Duration::from_secs(30));
    let (status, stderr) = Daemon::try_start(&s.t).expect_err("a restart on a tampered store");
    assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
    assert!(stderr.contains("lavd: log_inconsistent: "), "{stderr}");
}

#[test]
fn a_truncated_log_is_not_signed_and_unwraps_are_refused() {
    let s = setup();
    let r = unwrap(&s, 1);
    assert_eq!(r.status, 200, "{}", r.text());
    let size = vault::tree_size(&s.c.auditor);
    // Drop the last leaf (the `opened` one) and every subtree hash over it,
    // as someone hiding an unwrap would; the next unwrap refills that index.
    let last = size - 1;
    tamper(
        &s.t,
        &format!(
            "DELETE FROM audit_leaves WHERE idx >= {last};
             DELETE FROM audit_nodes WHERE ((idx + 1) << level) > {last};"
        ),
    );
    // The refilled leaf lands at `last`, below the size already seen.
    assert_refused_from_now_on(s, |_| [last, size]);
}

#[test]
fn a_rewritten_log_is_not_signed_and_unwraps_are_refused() {
    let s = setup();
    let r = unwrap(&s, 1);
    assert_eq!(r.status, 200, "{}", r.text());
    let size = vault::tree_size(&s.c.auditor);
    // Rewrite leaf 0 (the `key_generated` of E-1) and recompute, honestly,
    // every subtree hash above it: the tree is well formed, just different.
    let conn = tamper(
        &s.t,
        "UPDATE audit_leaves SET leaf = CAST(REPLACE(CAST(leaf AS TEXT), '\"E-1\"', '\"E-9\"') AS BLOB) WHERE idx = 0",
    );
    let leaf: Vec<u8> = conn
        .query_row("SELECT leaf FROM audit_leaves WHERE idx = 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(String::from_utf8_lossy(&leaf).contains("E-9"));
    let node = |level: u32, idx: u64| -> Option<Hash> {
        conn.query_row(
            "SELECT hash FROM audit_nodes WHERE level = ?1 AND idx = ?2",
            rusqlite::params![level, idx as i64],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .ok()
        .map(|h| h.try_into().unwrap())
    };
    let mut hash = leaf_hash(&leaf);
    let mut level = 0;
    while node(level, 0).is_some() {
        conn.execute(
            "UPDATE audit_nodes SET hash = ?1 WHERE level = ?2 AND idx = 0",
            rusqlite::params![hash.as_slice(), level],
        )
        .unwrap();
        match node(level, 1) {
            Some(right) if node(level + 1, 0).is_some() => hash = node_hash(&hash, &right),
            _ => break,
        }
        level += 1;
    }
    drop(conn);
    // The next unwrap grows the tree: its consistency proof against the
    // checkpoint of `size` fails.
    assert_refused_from_now_on(s, |grown| {
        assert!(grown > size);
        [grown, size]
    });
}

/// The store fails just after an unwrap's leaves and spend commit (here
/// the checkpoint's row is refused, by a trigger another connection
/// adds): nothing is released, and the answer is 503
/// `spent_not_released`, not `store_unavailable`, after which a client
/// retries as though nothing was spent. The leaf and the spend are in the
/// file; once the store takes the checkpoint again, the next unwrap is
/// served and its checkpoint covers both.
#[test]
fn a_store_that_fails_after_the_commit_is_spent_not_released() {
    let s = setup();
    assert_eq!(unwrap(&s, 1).status, 200);
    let spent = || -> i64 {
        let conn = rusqlite::Connection::open(s.t.path("lavd.db")).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.query_row(
            "SELECT spent FROM warrants WHERE id = 'LOG-CONSISTENCY-1'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(spent(), 1);
    let before = leaves_in_file(&s.t);
    drop(tamper(
        &s.t,
        "CREATE TRIGGER refuse_checkpoints BEFORE INSERT ON audit_checkpoints \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    ));
    let r = unwrap(&s, 2);
    r.assert_error(503, "spent_not_released");
    assert!(
        r.text().contains("a retry spends the budget again"),
        "{}",
        r.text()
    );
    assert_eq!(spent(), 2);
    assert_eq!(leaves_in_file(&s.t), before + 1);
    let unreleased = "lavd_envelopes_unreleased_total{code=\"spent_not_released\"}";
    assert_eq!(s.daemon.metric(unreleased), 1.0);
    drop(tamper(&s.t, "DROP TRIGGER refuse_checkpoints"));
    let r = unwrap(&s, 3);
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    assert_eq!(vault::statuses(&reply), ["ok"]);
    assert_eq!(spent(), 3);
    assert_eq!(
        reply["audit"]["first_index"].as_u64(),
        Some(before + 1),
        "{reply}"
    );
}

/// An entry bundle is served (as immutable, for a year) only as the tree
/// hashed its leaves: a leaf row deleted behind lavd, which no consistency
/// proof notices where the tree's hashes are left alone, marks the log
/// inconsistent (503 `log_inconsistent`; on SQLite every row is vouched
/// for, `AuditLog::check_bundle`), as a leaf edited alone does
/// (`log_tiles.rs`). Before 2026-12-07 both were 503 `store_unavailable`,
/// and before that the altered or short bundle was served with 200.
#[test]
fn an_entry_bundle_is_served_only_as_the_tree_hashed_it() {
    let s = setup();
    let r = unwrap(&s, 1);
    assert_eq!(r.status, 200, "{}", r.text());
    let size = vault::tree_size(&s.c.auditor);
    assert!((2..256).contains(&size), "{size}");
    let whole = format!("/v1/log/tile/entries/000.p/{size}");
    assert_eq!(s.c.auditor.get(&whole).status, 200);
    // A middle row deleted: the tree's size, and every hash, as they were.
    drop(tamper(&s.t, "DELETE FROM audit_leaves WHERE idx = 1"));
    s.c.auditor
        .get(&whole)
        .assert_error(503, "log_inconsistent");
    // Read once: the refusal of the entry bundle's own route does not fall
    // through to the tile route, which would read it again (and log it
    // twice).
    let stderr = s.daemon.stderr();
    assert_eq!(
        stderr.matches("a leaf row deleted behind lavd").count(),
        1,
        "{stderr}"
    );
    s.c.auditor
        .get("/v1/log/checkpoint")
        .assert_error(503, "log_inconsistent");
}

/// A log's origin is part of every checkpoint signature, so it can never
/// change. A configuration that changes `audit.origin` after the first
/// checkpoint is refused at start as a configuration error naming the field
/// and the origin the log has (exit 64, `bad_config`), not reported as a
/// tampered log. A configuration without `audit.origin` gets a warning
/// naming the placeholder it falls back to.
#[test]
fn a_changed_audit_origin_is_refused_as_bad_config_naming_the_logs_origin() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let mut daemon = Daemon::start(&t);
    assert!(
        daemon.stderr().contains("audit.origin is not set"),
        "{}",
        daemon.stderr()
    );
    drop(pki);
    daemon.signal(rustix::process::Signal::TERM);
    daemon.wait_exit(Duration::from_secs(30));

    t.write_config(&serve_config(&format!(
        "{}\n[audit]\norigin = \"lavd.agency.example/audit\"\n",
        vault::roles_toml()
    )));
    let (status, stderr) = Daemon::try_start(&t).expect_err("a changed origin");
    assert_eq!(status.and_then(|st| st.code()), Some(64), "{stderr}");
    assert!(stderr.contains("lavd: bad_config: "), "{stderr}");
    assert!(
        stderr.contains("audit.origin") && stderr.contains("\"lavd.invalid/audit\""),
        "{stderr}"
    );
    // Not the words of a tampered log.
    assert!(!stderr.contains("does not verify"), "{stderr}");
}
