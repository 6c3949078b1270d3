//! A revocation whose leaf commits but over which no checkpoint can be
//! signed (the HSM fails every `C_Sign`, through the fault module in front
//! of SoftHSM). The revocation is in force from its commit (PROTOCOL §8), so
//! the reply says so, 200 with `audit.checkpoint: null`, not 503 "retry
//! later" (a retry would only write a second leaf and answer
//! `already_revoked`); the warrant is refused from then on, and the next
//! checkpoint covers the leaf. An unwrap in the same state is 503
//! `spent_not_released`.

use softhsm_tests::vault::{self, Held};

#[test]
fn a_committed_revocation_without_a_checkpoint_is_reported_in_force() {
    let held = Held::new(&["E-1"]);
    let (c, shim) = (&held.c, &held.shim);
    let id = "W-REVOKED-UNSIGNED";
    let warrant = vault::double_lock(&vault::claims(id, vault::recipient().public(), 5));
    let envelope = held.seal(&vault::published_key(&c.provider, "E-1"), "E-1", "m");
    let unwrap = || {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": [envelope]}),
        )
    };
    assert_eq!(unwrap().status, 200);
    let before = vault::tree_size(&c.auditor);

    shim.set("fault = device_error\nfault_calls = C_Sign");
    let r = vault::post(
        &c.admin,
        "/v1/warrants/revocations",
        &serde_json::json!({"id": id, "reason": "quashed"}),
    );
    assert!(shim.faults() > 0, "no signature was attempted");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["revoked"], true);
    assert_eq!(body["already_revoked"], false);
    assert_eq!(
        body["audit"]["checkpoint"],
        serde_json::Value::Null,
        "{body}"
    );
    assert_eq!(body["audit"]["first_index"], before);
    assert_eq!(body["audit"]["count"], 1);

    // In force at once, and logged: once the HSM signs again, the next
    // checkpoint covers the revocation's leaf.
    shim.set("");
    unwrap().assert_error(403, "warrant_revoked");
    assert!(vault::tree_size(&c.auditor) > before);
    let leaf = &vault::entries(&c.auditor, before, before + 1)[0].leaf;
    assert_eq!(leaf["event"], "revocation", "{leaf}");
    assert_eq!(leaf["warrant_id"], id, "{leaf}");
}

/// An unwrap whose leaves and spend commit but over which no checkpoint
/// can be signed (every `C_Sign` fails) releases nothing and answers 503
/// `spent_not_released`: its budget is spent, so a client must not retry
/// it as after `hsm_unavailable`. A request that opened nothing (the derive
/// failing too) spent nothing and keeps `hsm_unavailable`. With the HSM
/// back, the next unwrap is served and its checkpoint covers the first's
/// leaf.
#[test]
fn an_unwrap_whose_checkpoint_cannot_be_signed_is_spent_not_released() {
    let held = Held::new(&["E-1"]);
    let (c, shim) = (&held.c, &held.shim);
    let id = "W-SPENT-UNSIGNED";
    let warrant = vault::double_lock(&vault::claims(id, vault::recipient().public(), 5));
    let escrow = vault::published_key(&c.provider, "E-1");
    let unwrap = |tag: &str| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": [held.seal(&escrow, "E-1", tag)]}),
        )
    };
    assert_eq!(unwrap("a").status, 200);
    let before = vault::tree_size(&c.auditor);

    shim.set("fault = device_error\nfault_calls = C_Sign");
    let message = unwrap("b").assert_error(503, "spent_not_released");
    assert!(shim.faults() > 0, "no signature was attempted");
    assert!(
        message.contains("a retry spends the budget again"),
        "{message}"
    );
    // Nothing opens: the derive fails first, nothing is spent.
    shim.set("fault = device_error\nfault_calls = C_DeriveKey,C_Sign");
    unwrap("c").assert_error(503, "hsm_unavailable");

    shim.set("");
    let r = unwrap("d");
    assert_eq!(r.status, 200, "{}", r.text());
    // After a's: b's leaf says opened (its spend stands, nothing was
    // released), c's denied.
    let leaves = vault::entries(&c.auditor, before, before + 2);
    assert_eq!(leaves[0].leaf["outcome"], "opened", "{:?}", leaves[0].leaf);
    assert_eq!(leaves[1].leaf["outcome"], "denied", "{:?}", leaves[1].leaf);
}
