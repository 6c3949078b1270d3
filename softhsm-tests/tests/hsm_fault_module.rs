//! The latency and fault PKCS#11 module (`softhsm-tests/pkcs11-shim/`),
//! loaded by a real `lavd serve` in place of SoftHSM, which it forwards to.
//!
//! - Through it, the whole unwrap path works as on SoftHSM itself.
//! - A fault injected into `C_DeriveKey` (`CKR_DEVICE_ERROR`,
//!   `CKR_DEVICE_REMOVED`, `CKR_SESSION_HANDLE_INVALID`) fails the request
//!   closed: 503, no key released, nothing spent, and no `opened` leaf.
//! - A call held by a `hang` fault completes once the fault is cleared.
//! - When the fault clears, the same daemon serves again, without a restart,
//!   and the warrant's budget shows that the failed requests spent nothing.

use std::time::Duration;

use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{self, Parties};
use softhsm_tests::{shim_module_path, Shim, TestToken};

/// The `opened` leaves of warrant `id` in the whole log.
fn opened_leaves(auditor: &Client, id: &str) -> usize {
    let size = vault::tree_size(auditor);
    vault::entries(auditor, 0, size)
        .iter()
        .filter(|e| e.leaf["warrant_id"] == id && e.leaf["outcome"] == "opened")
        .count()
}

#[test]
fn injected_hsm_faults_fail_closed_and_service_resumes_when_they_clear() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_with_module(
        &shim_module_path(),
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let id = "FAULTS-1";
    // Exactly the envelopes that open below: a failed request that spent
    // anything would make the last one `budget_exhausted`.
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 6));
    let unwrap = |envelopes: &[serde_json::Value]| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
        )
    };

    // Forwarding: the module is transparent.
    let r = unwrap(&vault::batch(&escrow, "clean", 2));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok", "ok"]);
    assert_eq!(opened_leaves(&c.auditor, id), 2);
    assert_eq!(shim.faults(), 0);

    let faults = ["device_error", "device_removed", "session_handle_invalid"];
    // Before each fault: the 2 above, plus one per earlier fault.
    for (opened, fault) in (2..).zip(faults) {
        let before = shim.faults();
        shim.set(&format!("fault = {fault}\nfault_calls = C_DeriveKey"));
        let r = unwrap(&vault::batch(&escrow, fault, 3));
        r.assert_error(503, "hsm_unavailable");
        assert!(
            shim.faults() > before,
            "{fault}: the module injected nothing"
        );
        assert_eq!(
            opened_leaves(&c.auditor, id),
            opened,
            "{fault}: opened leaf logged"
        );

        // Cleared: the same daemon opens again.
        shim.set("");
        let r = unwrap(&vault::batch(&escrow, &format!("{fault}-after"), 1));
        assert_eq!(r.status, 200, "{fault}: {}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"]);
    }
    assert_eq!(opened_leaves(&c.auditor, id), 5);

    // A hung derive holds its request until the fault clears, then the
    // request completes normally.
    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    let envelopes = vault::batch(&escrow, "hang", 1);
    let pending = std::thread::scope(|s| {
        let request = s.spawn(|| unwrap(&envelopes));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shim.faults() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(shim.faults() > 0, "the derive never reached the module");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!request.is_finished(), "a hung derive answered");
        shim.set("");
        request.join().expect("request thread")
    });
    assert_eq!(pending.status, 200, "{}", pending.text());
    assert_eq!(vault::statuses(&pending.json()), ["ok"]);
    assert_eq!(opened_leaves(&c.auditor, id), 6);

    // The budget is spent exactly: nothing went to the failed requests.
    let r = unwrap(&vault::batch(&escrow, "over", 1));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["budget_exhausted"]);
}
