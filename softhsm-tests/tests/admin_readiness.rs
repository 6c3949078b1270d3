//! The admin listener of a real `lavd serve`: `/healthz`, `/readyz` turning
//! false when the store cannot take its write lock and true again when it
//! can (no restart), and `/metrics` in Prometheus text format.

use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::TestToken;

#[test]
fn readyz_follows_the_store_without_a_restart() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(""));
    let daemon = Daemon::start(&t);

    let health = daemon.admin_get("/healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), serde_json::json!({"alive": true}));
    // GET only, and said so (docs/openapi.yaml); a query string, which a
    // probe may add, is ignored.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = daemon.admin_request("POST", path);
        r.assert_error(405, "method_not_allowed");
        assert_eq!(r.header("allow"), Some("GET"), "{path}");
    }
    assert_eq!(daemon.admin_get("/healthz?probe=1").status, 200);

    let ready = daemon.wait_readyz(200);
    assert_eq!(
        ready.json(),
        serde_json::json!({"ready": true, "hsm": true, "store": true, "log": true, "draining": false})
    );

    // Another process holds SQLite's write lock: lavd could not commit.
    let other = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let not_ready = daemon.wait_readyz(503);
    assert_eq!(
        not_ready.json(),
        serde_json::json!({"ready": false, "hsm": true, "store": false, "log": true, "draining": false})
    );
    // Liveness does not depend on readiness.
    assert_eq!(daemon.admin_get("/healthz").status, 200);

    other.execute_batch("ROLLBACK;").unwrap();
    drop(other);
    daemon.wait_readyz(200);

    // The change was logged with its reason, which the probe does not show.
    let log = daemon.stderr();
    assert!(log.contains("not ready"), "{log}");
    assert!(!not_ready.text().contains("lock"), "{}", not_ready.text());
}

#[test]
fn metrics_are_prometheus_text() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let provider = "spiffe://provider.example/mail";
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{provider}\" = [\"provider\"]\n"
    )));
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let client = pki.client(daemon.api, Some(&pki.clients.identity(provider)));
    assert_eq!(client.get("/v1/keys").status, 200);
    assert!(pki.client(daemon.api, None).get_raw("/v1/keys").is_err());
    assert_eq!(
        daemon.wait_metric(
            "lavd_tls_handshake_failures_total{reason=\"no_client_certificate\"}",
            1.0,
        ),
        1.0
    );
    let r = daemon.admin_get("/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    // Labelled families appear once they have a series; the envelope and
    // store-commit ones are fed by the unwrap handler.
    for family in [
        "lavd_http_requests_total",
        "lavd_http_request_duration_seconds",
        "lavd_hsm_operation_duration_seconds",
        "lavd_hsm_sessions_busy",
        "lavd_hsm_reconnects_total",
        "lavd_tls_handshake_failures_total",
        "lavd_connections_open",
        "lavd_config_reloads_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "missing {family}:\n{text}"
        );
    }
    // The HSM observer saw the login and the readiness checks.
    assert!(
        text.contains("lavd_hsm_operation_duration_seconds_count{op=\"login\",result=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("op=\"ready\",result=\"ok\""), "{text}");
    assert!(
        text.contains("lavd_config_reloads_total{outcome=\"failed\"} 0"),
        "{text}"
    );
    // Labels are route templates and fixed reasons, never identities.
    assert!(!text.contains("spiffe://"), "{text}");

    // Unknown admin paths answer in the error shape too.
    daemon.admin_get("/v1/keys").assert_error(404, "not_found");
}

/// Metric labels hold no identity, warrant id, target, kid or `ref`, after
/// requests that carried each of them: an unwrap that opens, and one
/// refused for its policy.
#[test]
fn metric_labels_hold_nothing_a_request_carried() {
    use softhsm_tests::vault;
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let kid = "kid-label-probe-31";
    let escrow = vault::generate_escrow_key(&t, kid);
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = vault::Parties::new(&pki).clients(&pki, daemon.api);
    let recipient = vault::recipient();
    let id = "W-LABEL-PROBE-31";
    let claims = vault::claims(id, recipient.public(), 10);
    let envelope = vault::seal(
        &escrow,
        kid,
        vault::TARGET,
        time::OffsetDateTime::now_utc() - time::Duration::hours(1),
        "ref-label-probe-31",
        &[7; 32],
    );
    let body = |warrant| serde_json::json!({"warrant": warrant, "envelopes": [envelope.clone()]});
    let r = vault::post(&c.agency, "/v1/unwrap", &body(vault::double_lock(&claims)));
    assert_eq!(r.status, 200, "{}", r.text());
    let a = softhsm_tests::server::authorities();
    let one = softhsm_tests::server::Authorities::sign(&claims, &[&a.executive]);
    vault::post(&c.agency, "/v1/unwrap", &body(one)).assert_error(403, "policy_not_met");

    let text = daemon.admin_get("/metrics").text();
    assert!(text.contains("route=\"/v1/unwrap\""), "{text}");
    for carried in [id, kid, vault::TARGET, "ref-label-probe-31", "spiffe://"] {
        assert!(!text.contains(carried), "{carried} in /metrics:\n{text}");
    }
}
