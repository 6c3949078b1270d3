//! An envelope whose header the audit log could not record (a `kid` or
//! `target` with a space, a control character or a non-ASCII space) is
//! denied `malformed_envelope` in a real `lavd serve` over mutual TLS, and
//! the rest of its batch proceeds: opened, logged and spent exactly once.
//! Before the fix, such a batch opened the good envelopes in the HSM, then
//! failed with 503 with nothing logged, and leaked its budget reservation.

use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Clients, Parties, PROVIDER, TARGET};
use softhsm_tests::TestToken;
use time::{Duration, OffsetDateTime};

/// `good` with its header replaced by `header` (any bytes): the header is
/// checked before anything else, so `enc` and `ct` need not match it.
fn with_header(good: &serde_json::Value, header: &str) -> serde_json::Value {
    let mut odd = good.clone();
    odd["header"] = lavd::codec::b64_encode(header.as_bytes()).into();
    odd
}

fn header(kid: &str, target: &str) -> String {
    serde_json::json!({
        "kid": kid,
        "suite": "16-1-2",
        "provider": PROVIDER,
        "target": target,
        "time": vault::at(OffsetDateTime::now_utc(), -Duration::hours(1)),
    })
    .to_string()
}

fn spent(t: &TestToken, id: &str) -> i64 {
    vault::spent(t, id)
}

/// `(outcome, reason, kid)` of each leaf of a reply.
fn leaves(c: &Clients, reply: &serde_json::Value) -> Vec<(String, String, String)> {
    let first = reply["audit"]["first_index"].as_u64().unwrap();
    let count = reply["audit"]["count"].as_u64().unwrap();
    vault::entries(&c.auditor, first, first + count)
        .into_iter()
        .map(|e| {
            assert_eq!(e.leaf["event"], "unwrap");
            let s = |k: &str| e.leaf[k].as_str().unwrap_or("<null>").to_string();
            (s("outcome"), s("reason"), s("kid"))
        })
        .collect()
}

fn triple(outcome: &str, reason: &str, kid: &str) -> (String, String, String) {
    (outcome.into(), reason.into(), kid.into())
}

#[test]
fn an_odd_kid_is_denied_and_the_rest_of_the_batch_opens() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let seal = |r: &str| {
        vault::seal(
            &escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - Duration::hours(1),
            r,
            &[r.as_bytes()[0]; 32],
        )
    };
    let recipient = vault::recipient();

    // The trigger: max_unwraps = 1, [kid "2026 12", good].
    let one = vault::double_lock(&vault::claims("W-ONE", recipient.public(), 1));
    let odd = with_header(&seal("x"), &header("2026 12", TARGET));
    // Sealed once: the header carries the time to the second, and the
    // reply's result is bound to the header that was sent.
    let good = seal("a");
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": one, "envelopes": [odd, good]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    assert_eq!(vault::statuses(&reply), ["malformed_envelope", "ok"]);
    assert_eq!(
        leaves(&c, &reply),
        [
            triple("denied", "malformed_envelope", "<null>"),
            triple("opened", "<null>", "E-1"),
        ]
    );
    assert_eq!(spent(&t, "W-ONE"), 1);
    // The good envelope's DEK is released to the recipient.
    let headers = vault::headers(&[odd, good]);
    let opened = lavd::envelope::reply::open_reply(&recipient, &headers, &r.body).unwrap();
    assert!(matches!(
        &opened.results[1].outcome,
        lavd::envelope::reply::Outcome::Ok(dek) if dek.as_slice() == [b'a'; 32]
    ));

    // Every other way a kid or target could not be logged, in one batch
    // with a good envelope last; the budget of 2 shows that nothing leaked:
    // the batch spends 1 and the next request opens the second.
    let two = vault::double_lock(&vault::claims("W-TWO", recipient.public(), 2));
    let good = seal("b");
    let odd: Vec<_> = [
        header("2026\u{7}12", TARGET),
        header("2026\u{a0}12", TARGET),
        header("2026\u{2028}12", TARGET),
        header("E-1", "acct:alice\u{1b}[2J@example.com"),
        header("E-1", "acct:alice\u{3000}@example.com"),
        header("E-1", "acct:alice @example.com"),
        // An over-long kid (65 bytes).
        header(&"k".repeat(65), TARGET),
    ]
    .iter()
    .map(|h| with_header(&good, h))
    .collect();
    let mut batch = odd.clone();
    batch.push(good);
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": two, "envelopes": batch}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    let mut expected = vec!["malformed_envelope"; odd.len()];
    expected.push("ok");
    assert_eq!(vault::statuses(&reply), expected);
    let mut expected = vec![triple("denied", "malformed_envelope", "<null>"); odd.len()];
    expected.push(triple("opened", "<null>", "E-1"));
    assert_eq!(leaves(&c, &reply), expected);
    assert_eq!(spent(&t, "W-TWO"), 1);
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": two, "envelopes": [seal("c")]}),
    );
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    assert_eq!(spent(&t, "W-TWO"), 2);

    // No request failed on the way (the 503 path logs "unwrap failed").
    let stderr = daemon.stderr();
    assert!(!stderr.contains("unwrap failed"), "{stderr}");
}
