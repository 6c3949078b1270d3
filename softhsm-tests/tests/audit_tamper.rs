//! Tampering with the audit log directly in the SQLite file (editing,
//! deleting, reordering or inserting a leaf) is detected by the real
//! `lavd audit verify` against a checkpoint saved earlier, which names the
//! first bad index. The log is written through lavd's audit log (a signed
//! checkpoint per batch, as the daemon does for every unwrap reply).

use std::sync::Arc;

use lavd::audit::log::AuditLog;
use lavd::hsm::Hsm;
use lavd::store::Store;
use softhsm_tests::{append_key_generated, assert_fails_with, assert_ok, TestToken};

const LEAVES: u64 = 24;

fn write_log(t: &TestToken) {
    let settings = t.settings();
    let store = Arc::new(Store::open_settings(&settings.store).unwrap());
    let hsm = Hsm::open(settings.hsm).unwrap();
    let log = AuditLog::new(
        store,
        hsm,
        &settings.audit.key_label,
        &settings.audit.origin,
    )
    .unwrap();
    for i in 0..LEAVES {
        append_key_generated(&log, &format!("k{i}"));
    }
}

struct Case {
    name: &'static str,
    sql: &'static str,
    code: &'static str,
    first_bad: &'static str,
}

#[test]
fn tampering_in_sqlite_is_detected_and_located() {
    let _hsm_quiet = softhsm_tests::InProcessHsm::begin();
    let t = TestToken::new();
    assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));
    write_log(&t);
    let vkey = assert_ok(&t.lavd_with_config(&["audit", "key"]));
    let honest = t.path("honest.json");
    let checkpoint = t.path("checkpoint");
    assert_ok(&t.lavd_with_config(&["audit", "export", "--out", honest.to_str().unwrap()]));
    // `lavd audit verify --key KEY --export FILE [more]`.
    let verify_export = |args: &[&str]| {
        let mut all = vec!["audit", "verify", "--key", vkey.trim(), "--export"];
        all.extend_from_slice(args);
        t.lavd(&all)
    };
    let out = assert_ok(&verify_export(&[
        honest.to_str().unwrap(),
        "--save-checkpoint",
        checkpoint.to_str().unwrap(),
    ]));
    assert!(out.contains(&format!("{LEAVES} leaves verified")), "{out}");
    assert!(out.contains("key_generated") && out.contains("verdict: the log verifies"));

    let cases = [
        Case {
            name: "edit",
            sql: "UPDATE audit_leaves SET leaf = CAST(REPLACE(CAST(leaf AS TEXT), '\"k9\"', '\"k9x\"') AS BLOB) WHERE idx = 9",
            code: "root_mismatch",
            first_bad: "first bad index: 9",
        },
        Case {
            name: "delete",
            sql: "DELETE FROM audit_leaves WHERE idx = 9",
            code: "entry_index_mismatch",
            first_bad: "first bad index: 9",
        },
        Case {
            name: "reorder",
            sql: "UPDATE audit_leaves SET idx = 1000000 WHERE idx = 9;
                  UPDATE audit_leaves SET idx = 9 WHERE idx = 10;
                  UPDATE audit_leaves SET idx = 10 WHERE idx = 1000000",
            code: "leaf_seq_mismatch",
            first_bad: "first bad index: 9",
        },
        Case {
            name: "insert",
            sql: "UPDATE audit_leaves SET idx = idx + 1000000 WHERE idx >= 9;
                  UPDATE audit_leaves SET idx = idx - 1000000 + 1 WHERE idx >= 1000000;
                  INSERT INTO audit_leaves (idx, leaf) SELECT 9, leaf FROM audit_leaves WHERE idx = 8",
            code: "leaf_seq_mismatch",
            first_bad: "first bad index: 9",
        },
    ];
    let db = t.path("lavd.db");
    for case in cases {
        let copy = t.path(&format!("{}.db", case.name));
        std::fs::copy(&db, &copy).unwrap();
        let conn = rusqlite::Connection::open(&copy).unwrap();
        conn.execute_batch(case.sql).unwrap();
        drop(conn);
        t.write_config(""); // reset, then point the store at the copy
        let text = std::fs::read_to_string(t.config()).unwrap().replace(
            "path = \"lavd.db\"",
            &format!("path = \"{}.db\"", case.name),
        );
        std::fs::write(t.config(), text).unwrap();

        let export = t.path(&format!("{}.json", case.name));
        assert_ok(&t.lavd_with_config(&["audit", "export", "--out", export.to_str().unwrap()]));
        let verify = verify_export(&[
            export.to_str().unwrap(),
            "--checkpoint",
            checkpoint.to_str().unwrap(),
        ]);
        let stderr = assert_fails_with(&verify, 1, case.code);
        assert!(stderr.contains(case.first_bad), "{}: {stderr}", case.name);
        // Against the honest export kept from before (`--previous`): the
        // same leaf, found by comparing the leaves themselves.
        let verify = verify_export(&[
            export.to_str().unwrap(),
            "--previous",
            honest.to_str().unwrap(),
        ]);
        let stderr = assert_fails_with(&verify, 1, case.code);
        assert!(
            stderr.contains(case.first_bad),
            "{} against --previous: {stderr}",
            case.name
        );
    }
    // An export that is no file is refused at once, not read until memory
    // runs out.
    let verify = verify_export(&["/dev/zero"]);
    let stderr = assert_fails_with(&verify, 1, "input_unreadable");
    assert!(stderr.contains("/dev/zero: not a regular file"), "{stderr}");
}
