//! A deadline that passes while an unwrap is in flight, against a real
//! `lavd serve` over mutual TLS, through the fault module in front of
//! SoftHSM. The module's `hang` on `C_DeriveKey` holds the request inside
//! its HSM open, after it was admitted, until the deadline has passed:
//!
//! - the warrant's `expires`: the request is refused whole, 403
//!   `warrant_expired` (as one that arrives later), nothing is released or
//!   spent, and its leaves (the HSM did open) say denied `warrant_expired`;
//! - the key's `destroy_after` (its retention ended; the key is not yet
//!   destroyed): that key's envelope is denied `key_destroyed`, another
//!   key's in the same request opens.
//!
//! Before, both were judged only when the request's work started, so a
//! request admitted a moment before the end released keys after it.
//!
//! The same after the audit commit, with the checkpoint's signature
//! (`C_Sign`) held in the HSM until `expires` has passed: the leaves say
//! `opened` and the budget is spent, but nothing is released (403
//! `warrant_expired`). Before 2026-12-07 the deadlines were judged after
//! the commit only under `release_after_witness`.

use softhsm_tests::eventually;
use std::time::Duration;

use lavd::jwk::P256PublicKey;
use softhsm_tests::assert_ok;
use softhsm_tests::vault::{self, Held};
use time::OffsetDateTime;

/// How long [`eventually`] waits here.
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The budget warrant `id` has spent, from the store.
fn spent(h: &Held, id: &str) -> i64 {
    vault::spent(&h.t, id)
}

/// Sleeps until `t` has passed, by the wall clock the daemon reads too.
fn sleep_past(t: OffsetDateTime) {
    while OffsetDateTime::now_utc() <= t {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Posts `envelopes` under `warrant` on another thread, holds its HSM open
/// until `deadline` has passed, then lets it go; returns the reply.
fn held_past(
    h: &Held,
    warrant: &serde_json::Value,
    envelopes: &[serde_json::Value],
    deadline: OffsetDateTime,
) -> softhsm_tests::server::Response {
    held_in_past(h, "C_DeriveKey", warrant, envelopes, deadline)
}

/// As [`held_past`], holding the request in PKCS#11 function `call`.
fn held_in_past(
    h: &Held,
    call: &str,
    warrant: &serde_json::Value,
    envelopes: &[serde_json::Value],
    deadline: OffsetDateTime,
) -> softhsm_tests::server::Response {
    h.shim.set(&format!("fault = hang\nfault_calls = {call}"));
    std::thread::scope(|s| {
        let request = s.spawn(|| {
            vault::post(
                &h.c.agency,
                "/v1/unwrap",
                &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
            )
        });
        eventually(&format!("the unwrap's {call}"), WAIT, || {
            h.shim.faults() > 0
        });
        // Admitted and opening before the deadline, or the test shows
        // nothing.
        assert!(
            OffsetDateTime::now_utc() < deadline,
            "the request reached the HSM only after the deadline"
        );
        sleep_past(deadline);
        assert!(!request.is_finished(), "the unwrap answered while held");
        h.shim.set("");
        request.join().unwrap()
    })
}

/// Two envelopes of key `E-1` and warrant `id` for them, which expires 10
/// seconds from now; and that time.
fn expiring(setup: &Held, id: &str) -> ([serde_json::Value; 2], serde_json::Value, OffsetDateTime) {
    let escrow = vault::published_key(&setup.c.provider, "E-1");
    let envelopes = [
        setup.seal(&escrow, "E-1", "one"),
        setup.seal(&escrow, "E-1", "two"),
    ];
    let recipient = vault::recipient();
    let mut claims = vault::claims(id, recipient.public(), 10);
    // Fractions of a second are part of the claims' time format.
    let expires = OffsetDateTime::now_utc() + time::Duration::seconds(10);
    claims["expires"] = serde_json::json!(expires
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap());
    (envelopes, vault::double_lock(&claims), expires)
}

#[test]
fn a_warrant_that_expires_while_its_unwrap_is_in_flight_releases_nothing() {
    let setup = Held::new(&["E-1"]);
    let c = &setup.c;
    let id = "W-EXPIRES-IN-FLIGHT";
    let (envelopes, warrant, expires) = expiring(&setup, id);

    let before = vault::tree_size(&c.auditor);
    held_past(&setup, &warrant, &envelopes, expires).assert_error(403, "warrant_expired");

    // In the log: a leaf per envelope the HSM opened, denied for that
    // reason; nothing spent.
    let log = vault::entries(&c.auditor, before, vault::tree_size(&c.auditor));
    assert_eq!(log.len(), 2, "{log:?}");
    for e in &log {
        assert_eq!(e.leaf["event"], "unwrap");
        assert_eq!(e.leaf["warrant_id"], id);
        assert_eq!(e.leaf["outcome"], "denied");
        assert_eq!(e.leaf["reason"], "warrant_expired");
    }
    assert_eq!(spent(&setup, id), 0);

    // A later request is refused whole, as before.
    vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": [envelopes[0]]}),
    )
    .assert_error(403, "warrant_expired");
}

#[test]
fn a_key_whose_retention_ends_while_its_unwrap_is_in_flight_is_not_released() {
    let setup = Held::new(&["E-1"]);
    let (t, c) = (&setup.t, &setup.c);
    // E-2's retention ends a few seconds from now (whole seconds, as the
    // store keeps them).
    let now = OffsetDateTime::now_utc();
    let at = |s: i64| lavd::codec::format_time(now + time::Duration::seconds(s));
    let destroy_after = lavd::codec::parse_time(&at(12)).unwrap();
    let printed = assert_ok(&t.lavd_with_config(&[
        "keys",
        "generate",
        "--kid",
        "E-2",
        "--not-before",
        &at(-3600),
        "--not-after",
        &at(11),
        "--destroy-after",
        &at(12),
    ]));
    let doomed_key =
        P256PublicKey::from_jwk(&lavd::jwk::Jwk::from_json(printed.as_bytes()).unwrap()).unwrap();
    let live_key = vault::published_key(&c.provider, "E-1");
    let envelopes = [
        setup.seal(&doomed_key, "E-2", "doomed"),
        setup.seal(&live_key, "E-1", "live"),
    ];
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims(
        "W-RETENTION-IN-FLIGHT",
        recipient.public(),
        10,
    ));

    let reply = held_past(&setup, &warrant, &envelopes, destroy_after);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = reply.json();
    assert_eq!(vault::statuses(&reply), ["key_destroyed", "ok"]);
    let first = reply["audit"]["first_index"].as_u64().unwrap();
    let log = vault::entries(&c.auditor, first, first + 2);
    assert_eq!(log[0].leaf["outcome"], "denied");
    assert_eq!(log[0].leaf["reason"], "key_destroyed");
    assert_eq!(log[1].leaf["outcome"], "opened");
    // The denied envelope spent nothing (the one opened did), and the key
    // stays past its retention: a later envelope of it is refused.
    assert_eq!(spent(&setup, "W-RETENTION-IN-FLIGHT"), 1);
    let later = setup.seal(&doomed_key, "E-2", "later");
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": [later]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["key_destroyed"]);
    assert_eq!(spent(&setup, "W-RETENTION-IN-FLIGHT"), 1);
}

/// A signing authority's `valid_until` that passes while the unwrap is in
/// flight: every signature must be by an authority valid at the time, so
/// the request is refused whole with 403 `authority_not_valid`, as one that
/// arrives later is, and its leaves say so; nothing is spent.
#[test]
fn a_signer_whose_validity_ends_while_its_unwrap_is_in_flight_releases_nothing() {
    let setup = Held::new(&["E-1"]);
    let c = &setup.c;
    // The judicial authority's validity ends a few seconds from now (whole
    // seconds, as the configuration says them), applied by a reload.
    let ends = OffsetDateTime::now_utc() + time::Duration::seconds(10);
    let ends_text = lavd::codec::format_time(ends);
    let ends = lavd::codec::parse_time(&ends_text).unwrap();
    let config = std::fs::read_to_string(setup.t.config()).unwrap();
    let judicial = softhsm_tests::server::authorities()
        .judicial
        .kid()
        .to_string();
    let at = config.find(&format!("kid = \"{judicial}\"")).unwrap();
    let until = at + config[at..].find("valid_until = ").unwrap();
    let end = until + config[until..].find('\n').unwrap();
    let changed = format!(
        "{}valid_until = \"{ends_text}\"{}",
        &config[..until],
        &config[end..]
    );
    std::fs::write(setup.t.config(), changed).unwrap();
    setup.daemon.signal(rustix::process::Signal::HUP);
    setup
        .daemon
        .wait_metric("lavd_config_reloads_total{outcome=\"ok\"}", 1.0);

    let escrow = vault::published_key(&c.provider, "E-1");
    let envelopes = [setup.seal(&escrow, "E-1", "one")];
    let recipient = vault::recipient();
    let id = "W-SIGNER-ENDS-IN-FLIGHT";
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 10));
    let before = vault::tree_size(&c.auditor);
    let message =
        held_past(&setup, &warrant, &envelopes, ends).assert_error(403, "authority_not_valid");
    assert!(message.contains(&judicial), "{message}");

    let log = vault::entries(&c.auditor, before, vault::tree_size(&c.auditor));
    let leaves: Vec<_> = log
        .iter()
        .filter(|e| e.leaf["event"] == "unwrap" && e.leaf["warrant_id"] == id)
        .collect();
    assert_eq!(leaves.len(), 1, "{log:?}");
    assert_eq!(leaves[0].leaf["outcome"], "denied");
    assert_eq!(leaves[0].leaf["reason"], "authority_not_valid");
    assert_eq!(spent(&setup, id), 0);
}

#[test]
fn a_warrant_that_expires_while_its_checkpoint_is_signed_releases_nothing() {
    let setup = Held::new(&["E-1"]);
    let c = &setup.c;
    let id = "W-EXPIRES-AT-SIGNING";
    let (envelopes, warrant, expires) = expiring(&setup, id);

    let before = vault::tree_size(&c.auditor);
    held_in_past(&setup, "C_Sign", &warrant, &envelopes, expires)
        .assert_error(403, "warrant_expired");

    // Committed before the end: the leaves say opened, the budget is spent.
    let log = vault::entries(&c.auditor, before, vault::tree_size(&c.auditor));
    assert_eq!(log.len(), 2, "{log:?}");
    for e in &log {
        assert_eq!(e.leaf["warrant_id"], id);
        assert_eq!(e.leaf["outcome"], "opened");
    }
    assert_eq!(spent(&setup, id), 2);
}
