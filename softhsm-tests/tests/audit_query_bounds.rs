//! Every numeric query parameter of every `/v1` route is a leaf index or tree
//! size, checked at the API edge against the one bound the store can hold
//! (2^63 - 1): anything else is 400 `malformed_request` from a real `lavd
//! serve` over mTLS, never a store failure (503) nor an ERROR in its log.

use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{roles_toml, Parties};
use softhsm_tests::TestToken;

/// One past what SQLite's signed 64-bit INTEGER holds.
const TOO_BIG: &str = "9223372036854775808";
const MAX: &str = "9223372036854775807";

fn setup() -> (TestToken, Daemon, Client) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let parties = Parties::new(&pki);
    t.write_config(&serve_config(&roles_toml()));
    let daemon = Daemon::start_logging(&t, "info");
    let auditor = parties.clients(&pki, daemon.api).auditor;
    (t, daemon, auditor)
}

fn assert_malformed(auditor: &Client, path: &str, param: &str) {
    let r = auditor.get(path);
    let message = r.assert_error(400, "malformed_request");
    assert!(message.contains(param), "{path}: {message}");
}

#[test]
fn audit_entries_start_and_end_beyond_the_store_are_400() {
    let (_t, daemon, auditor) = setup();
    for (path, param) in [
        (format!("/v1/audit/entries?start={TOO_BIG}"), "start"),
        (format!("/v1/audit/entries?start=0&end={TOO_BIG}"), "end"),
        (
            "/v1/audit/entries?start=18446744073709551616".into(),
            "start",
        ),
        ("/v1/audit/entries?start=-1".into(), "start"),
        ("/v1/audit/entries?start=x".into(), "start"),
        ("/v1/audit/entries".into(), "start"),
        ("/v1/audit/entries?start=1&start=2".into(), "start"),
        // A page runs forwards, and holds at most 1000 entries.
        ("/v1/audit/entries?start=10&end=5".into(), "start <= end"),
        (
            "/v1/audit/entries?start=0&end=1001".into(),
            "at most 1000 entries",
        ),
    ] {
        assert_malformed(&auditor, &path, param);
    }
    // The largest representable start is a valid (empty) page, even with the
    // default end, which stops at the bound.
    let r = auditor.get(&format!("/v1/audit/entries?start={MAX}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["entries"], serde_json::json!([]));
    let r = auditor.get("/v1/audit/entries?start=0&end=1000");
    assert_eq!(r.status, 200, "{}", r.text());
    let stderr = daemon.stderr();
    assert!(!stderr.contains("ERROR"), "{stderr}");
}

#[test]
fn inclusion_proof_index_and_size_beyond_the_store_are_400() {
    let (_t, daemon, auditor) = setup();
    for (path, param) in [
        (
            format!("/v1/audit/proof/inclusion?index={TOO_BIG}&size=1"),
            "index",
        ),
        (
            format!("/v1/audit/proof/inclusion?index=0&size={TOO_BIG}"),
            "size",
        ),
        ("/v1/audit/proof/inclusion?index=0".into(), "size"),
        (
            "/v1/audit/proof/inclusion?index=0&size=1&depth=2".into(),
            "depth",
        ),
    ] {
        assert_malformed(&auditor, &path, param);
    }
    // Within the bound but beyond the tree: the existing domain refusal.
    auditor
        .get(&format!("/v1/audit/proof/inclusion?index=0&size={MAX}"))
        .assert_error(400, "bad_proof_request");
    let stderr = daemon.stderr();
    assert!(!stderr.contains("ERROR"), "{stderr}");
}

#[test]
fn consistency_proof_from_and_to_beyond_the_store_are_400() {
    let (_t, daemon, auditor) = setup();
    for (path, param) in [
        (
            format!("/v1/audit/proof/consistency?from={TOO_BIG}&to={TOO_BIG}"),
            "from",
        ),
        (
            format!("/v1/audit/proof/consistency?from=0&to={TOO_BIG}"),
            "to",
        ),
        ("/v1/audit/proof/consistency?from=0".into(), "to"),
        ("/v1/audit/proof/consistency?from=1.0&to=2".into(), "from"),
    ] {
        assert_malformed(&auditor, &path, param);
    }
    auditor
        .get(&format!("/v1/audit/proof/consistency?from=0&to={MAX}"))
        .assert_error(400, "bad_proof_request");
    let stderr = daemon.stderr();
    assert!(!stderr.contains("ERROR"), "{stderr}");
}
