//! A provider fetches the escrow public keys over mutual TLS from a real
//! `lavd serve` on SoftHSM: the JWK Set is the one `lavd keys list` prints.

use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::{assert_ok, TestToken};

const PROVIDER: &str = "spiffe://provider.example/mail";
const AGENCY: &str = "spiffe://agency.example/lea";
const AUDITOR: &str = "spiffe://oversight.example/auditor";

#[test]
fn a_provider_fetches_the_jwks_that_keys_list_prints() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{PROVIDER}\" = [\"provider\"]\n\"{AGENCY}\" = [\"agency\"]\n\
         \"{AUDITOR}\" = [\"auditor\"]\n"
    )));
    let [from, to] = softhsm_tests::key_window();
    for (kid, from, to, destroy_after) in [
        // Sealable now: published.
        ("now", from.as_str(), to.as_str(), "2100-01-01T00:00:00Z"),
        // Past its `not_after`, retained: never published.
        (
            "2026-11",
            "2026-11-01T00:00:00Z",
            "2026-12-01T00:00:00Z",
            "2100-01-01T00:00:00Z",
        ),
        (
            "2099-01",
            "2099-01-01T00:00:00Z",
            "2099-02-01T00:00:00Z",
            "2100-01-01T00:00:00Z",
        ),
        // Past its retention, not destroyed: never published, and counted.
        (
            "2020-01",
            "2020-01-01T00:00:00Z",
            "2020-02-01T00:00:00Z",
            "2021-01-01T00:00:00Z",
        ),
    ] {
        assert_ok(&softhsm_tests::generate_key_for(
            &t,
            kid,
            [from, to, destroy_after],
        ));
    }
    let listed: serde_json::Value =
        serde_json::from_str(&assert_ok(&t.lavd_with_config(&["keys", "list"]))).unwrap();

    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let provider = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let r = provider.get("/v1/keys");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let served = r.json();
    assert_eq!(served, listed);
    // Only the keys sealable now or later are listed, with the PROTOCOL §2
    // fields.
    let mut kids = softhsm_tests::vault::kids(&served);
    kids.sort();
    assert_eq!(kids, ["2099-01", "now"]);
    let keys = served["keys"].as_array().unwrap();
    for k in keys {
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(k["use"], "enc");
        assert_eq!(k["lav_suite"], "16-1-2");
    }

    // Any identity that holds a role reads the same set (THREAT_MODEL,
    // trust boundaries: the keys are public).
    for other in [AGENCY, AUDITOR] {
        let r = pki
            .client(daemon.api, Some(&pki.clients.identity(other)))
            .get("/v1/keys");
        assert_eq!(r.status, 200, "{other}: {}", r.text());
        assert_eq!(r.json(), listed, "{other}");
    }

    assert_eq!(
        daemon.wait_metric(
            "lavd_http_requests_total{route=\"/v1/keys\",status=\"200\"}",
            3.0
        ),
        3.0
    );
    assert!(!served.to_string().contains("2020-01"), "{served}");
    // The key past its retention shows in the gauge an alert reads (the
    // retention job has not run).
    assert_eq!(
        daemon.wait_metric("lavd_escrow_keys_past_retention", 1.0),
        1.0
    );
}

/// A key whose destruction commits while `GET /v1/keys` checks the set
/// against the token (held in the check that each key's halves agree, a
/// `C_DeriveKey`, through the fault module; the store's mark made by hand, as a destruction's first
/// step leaves it with the key still on the token) is not published: the
/// set is read again after the token's answers. Before, providers were
/// given a key already destroyed, to seal envelopes nobody could open.
#[test]
fn a_key_marked_destroyed_while_the_set_is_checked_is_not_published() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_with_module(
        &softhsm_tests::shim_module_path(),
        &format!(
            "{}\n{}",
            shim.hsm_env(),
            serve_config(&format!("[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"))
        ),
    );
    for kid in ["doomed", "kept"] {
        assert_ok(&softhsm_tests::generate_key(
            &t,
            kid,
            "2100-01-01T00:00:00Z",
        ));
    }
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let provider = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    let served = std::thread::scope(|s| {
        let get = s.spawn(|| provider.get("/v1/keys"));
        softhsm_tests::eventually(
            "the set's check against the token",
            std::time::Duration::from_secs(20),
            || shim.faults() > 0,
        );
        assert_eq!(t.mark_destroyed_by_hand("doomed"), 1);
        shim.set("");
        get.join().unwrap()
    });
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(softhsm_tests::vault::kids(&served.json()), ["kept"]);
}
