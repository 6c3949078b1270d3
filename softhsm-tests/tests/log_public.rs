//! `[audit.public]`: a second listener serving the log's checkpoint and
//! tiles (`/v1/log/…`) over TLS without a client certificate, for an
//! oversight body that publishes the log. Against a real `lavd serve`:
//!
//! - a client with no certificate reads the same checkpoint and the same
//!   tile bytes as the auditor does over mutual TLS, marked cacheable by
//!   shared caches;
//! - only the read-only log paths are there: every other API path is 404
//!   `not_found`, and the mutual-TLS API still refuses a client without a
//!   certificate;
//! - the real `lavd audit verify --tiles URL` verifies the log from the
//!   public listener with no client certificate, with the same summary as
//!   from the API's tiles;
//! - its requests, connections and failed handshakes are counted in their
//!   own metric families, not in the API's;
//! - callers are rate-limited per address (429 `rate_limited`);
//! - without `[audit.public]` no such listener exists.

use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{self, Vault, TARGET};
use softhsm_tests::{assert_ok, TestToken};
use time::OffsetDateTime;

#[test]
fn the_public_listener_serves_the_log_and_nothing_else() {
    let v = Vault::start(
        "rate_limit_per_second = 1000\nrate_limit_burst = 1000\n\n\
         [audit.public]\nlisten = \"127.0.0.1:0\"\nrate_limit_per_second = 1\nrate_limit_burst = 40\n",
    );
    let (t, pki, parties, daemon, escrow) = (&v.t, &v.pki, &v.parties, &v.daemon, &v.escrow);
    let public_addr = daemon
        .public_log
        .expect("READY=1 names the public listener");
    let c = parties.clients(pki, daemon.api);
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("PUBLIC-1", recipient.public(), 10));
    let now = OffsetDateTime::now_utc();
    let envelopes: Vec<_> = (0..3)
        .map(|i| {
            vault::seal(
                escrow,
                "E-1",
                TARGET,
                now - time::Duration::minutes(i + 1),
                &format!("public-{i}"),
                format!("public-dek-{i:08}").as_bytes(),
            )
        })
        .collect();
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Anyone: the server's CA, no client certificate.
    let anyone = Client::new(public_addr, &pki.servers, None, &[&rustls::version::TLS13]);
    let theirs = anyone.get("/v1/log/checkpoint");
    assert_eq!(theirs.status, 200, "{}", theirs.text());
    assert_eq!(theirs.header("cache-control"), Some("public, max-age=5"));
    let ours = c.auditor.get("/v1/log/checkpoint");
    assert_eq!(theirs.text(), ours.text(), "one log for everyone");
    let size = lavd::audit::note::verify_note(&theirs.text(), &vault::verifier_key(&c.auditor))
        .expect("the public checkpoint verifies")
        .size;
    let partial = format!("/v1/log/tile/0/000.p/{size}");
    let bundle = format!("/v1/log/tile/entries/000.p/{size}");
    for path in [&partial, &bundle] {
        let theirs = anyone.get(path);
        assert_eq!(theirs.status, 200, "{path}: {}", theirs.text());
        assert_eq!(theirs.body, c.auditor.get(path).body, "{path}");
        assert_eq!(
            theirs.header("cache-control"),
            Some("public, max-age=31536000, immutable"),
            "{path}"
        );
    }

    // Nothing but the log.
    for (method, path) in [
        ("GET", "/v1/keys"),
        ("GET", "/v1/audit/checkpoint"),
        ("GET", "/v1/audit/entries?start=0"),
        ("GET", "/v1/audit/key"),
        ("POST", "/v1/unwrap"),
        ("POST", "/v1/warrants/revocations"),
    ] {
        let r = anyone.request(method, path, None).expect("request");
        r.assert_error(404, "not_found");
    }
    // And no body is read there, whatever the path: refused before it is.
    for path in ["/v1/unwrap", "/v1/log/checkpoint"] {
        let r = anyone
            .request("POST", path, Some(&[b'x'; 2048]))
            .expect("request");
        r.assert_error(413, "body_too_large");
    }
    // Nor a chunked one of which nothing comes: refused at once, not
    // answered 408 after the body timeout.
    let mut conn = anyone.connect().expect("connect");
    conn.send(
        b"GET /v1/log/checkpoint HTTP/1.1\r\nhost: localhost\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )
    .unwrap();
    conn.read_response()
        .unwrap()
        .assert_error(413, "body_too_large");
    anyone
        .get("/v1/log/tile/0/x000/000")
        .assert_error(400, "malformed_request");
    // The API itself still wants a certificate.
    let no_cert_on_api = Client::new(daemon.api, &pki.servers, None, &[&rustls::version::TLS13]);
    assert!(
        no_cert_on_api.get_raw("/v1/log/checkpoint").is_err(),
        "the mutual-TLS API answered a client without a certificate"
    );

    // The real verifier reads the public tiles with no client certificate,
    // and says what it says from the API.
    let (ca, cert, client_key) = pki.cli_files(&parties.auditor, "auditor");
    let key = vault::verifier_key(&c.auditor);
    let public_url = format!("https://{public_addr}/v1/log");
    let api_url = format!("https://{}/v1/log", daemon.api);
    let from_public = assert_ok(&t.lavd(&[
        "audit",
        "verify",
        "--key",
        &key,
        "--tiles",
        &public_url,
        "--ca",
        &ca,
    ]));
    let from_api = assert_ok(&t.lavd(&[
        "audit",
        "verify",
        "--key",
        &key,
        "--tiles",
        &api_url,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--client-key",
        &client_key,
    ]));
    assert_eq!(from_public, from_api);
    // Half a client identity is refused, not silently dropped.
    let half = t.lavd(&[
        "audit",
        "verify",
        "--key",
        &key,
        "--tiles",
        &public_url,
        "--ca",
        &ca,
        "--cert",
        &cert,
    ]);
    let stderr = softhsm_tests::assert_fails_with(&half, 2, "usage");
    assert!(
        stderr.contains("give both --cert and --client-key"),
        "{stderr}"
    );

    // Its traffic is counted apart from the API's: requests, open
    // connections, and handshakes that failed (plain HTTP sent to it).
    let api_checkpoints = "lavd_http_requests_total{route=\"/v1/log/checkpoint\",status=\"200\"}";
    let public_checkpoints =
        "lavd_public_requests_total{route=\"/v1/log/checkpoint\",status=\"200\"}";
    let (api_before, public_before) = (
        daemon.metric(api_checkpoints),
        daemon.metric(public_checkpoints),
    );
    for _ in 0..5 {
        assert_eq!(anyone.get("/v1/log/checkpoint").status, 200);
    }
    assert_eq!(daemon.metric(public_checkpoints), public_before + 5.0);
    assert_eq!(daemon.metric(api_checkpoints), api_before);
    let family = |name: &str| -> f64 {
        daemon
            .admin_get("/metrics")
            .text()
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with(&format!("{name}_")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (api_open, api_failed) = (
        family("lavd_connections_open"),
        family("lavd_tls_handshake_failures_total"),
    );
    let public_open = family("lavd_public_connections_open");
    let mut raw = std::net::TcpStream::connect(public_addr).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while family("lavd_public_connections_open") < public_open + 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection is not counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::io::Write::write_all(&mut raw, b"GET /v1/log/checkpoint HTTP/1.1\r\n\r\n").unwrap();
    while family("lavd_public_tls_handshake_failures_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure is not counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(family("lavd_connections_open"), api_open);
    assert_eq!(family("lavd_tls_handshake_failures_total"), api_failed);

    // Per-address rate limit: the burst is 40 at 1 a second, and the
    // requests above used some of it.
    let limited = (0..60)
        .map(|_| anyone.get("/v1/log/checkpoint"))
        .find(|r| r.status != 200)
        .expect("the burst runs out");
    limited.assert_error(429, "rate_limited");
    assert!(limited.header("retry-after").is_some());
}

/// The public listener serves the newest checkpoint signed and never has
/// the log sign one: its callers are not authenticated, and signing takes
/// the HSM and the signer's turn from the unwraps. Leaves appended since
/// (here a key generated by the command line beside the running daemon,
/// which signs nothing) are covered there once a checkpoint over them is
/// signed for an auditor or an unwrap.
#[test]
fn the_public_checkpoint_is_the_newest_signed_and_has_none_signed() {
    let v = Vault::start("\n[audit.public]\nlisten = \"127.0.0.1:0\"\n");
    let (t, pki, parties, daemon) = (&v.t, &v.pki, &v.parties, &v.daemon);
    let public_addr = daemon
        .public_log
        .expect("READY=1 names the public listener");
    let c = parties.clients(pki, daemon.api);
    let key = vault::verifier_key(&c.auditor);
    let size = |note: &str| {
        lavd::audit::note::verify_note(note, &key)
            .expect("the checkpoint verifies")
            .size
    };
    let anyone = Client::new(public_addr, &pki.servers, None, &[&rustls::version::TLS13]);

    let signed = c.auditor.get("/v1/log/checkpoint").text();
    assert_ok(&softhsm_tests::generate_key(
        t,
        "E-2",
        "2030-01-01T00:00:00Z",
    ));
    let theirs = anyone.get("/v1/log/checkpoint");
    assert_eq!(theirs.status, 200, "{}", theirs.text());
    assert_eq!(
        theirs.text(),
        signed,
        "the public listener had a checkpoint signed"
    );
    let ours = c.auditor.get("/v1/log/checkpoint").text();
    assert_eq!(size(&ours), size(&signed) + 1, "the key's leaf");
    assert_eq!(anyone.get("/v1/log/checkpoint").text(), ours);

    // A stored checkpoint edited behind lavd's back is not served: it
    // fails the audit key, and the log is marked inconsistent, as the
    // signer would mark it, for the auditor too.
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let edited = db
        .execute(
            "UPDATE audit_checkpoints SET note = replace(note, 'audit', 'audjt') \
             WHERE size = (SELECT max(size) FROM audit_checkpoints)",
            [],
        )
        .unwrap();
    assert_eq!(edited, 1);
    anyone
        .get("/v1/log/checkpoint")
        .assert_error(503, "log_inconsistent");
    c.auditor
        .get("/v1/log/checkpoint")
        .assert_error(503, "log_inconsistent");
}

#[test]
fn without_the_table_there_is_no_public_listener() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    let daemon = Daemon::start(&t);
    assert_eq!(daemon.public_log, None);
}

#[test]
fn one_address_cannot_hold_every_public_connection() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "{}\n[limits]\nhandshake_timeout_secs = 60\n\n\
         [audit.public]\nlisten = \"127.0.0.1:0\"\nmax_connections_per_ip = 3\n",
        vault::roles_toml()
    )));
    let daemon = Daemon::start(&t);
    let public = daemon.public_log.expect("a public listener");
    let anyone = Client::new(public, &pki.servers, None, &[&rustls::version::TLS13]);
    softhsm_tests::server::assert_connections_bounded_per_address(
        &daemon,
        public,
        3,
        "lavd_public_tls_handshake_failures_total{reason=\"peer_connection_limit\"}",
        |tcp| match anyone.connect_over(tcp) {
            Ok(mut conn) => conn
                .request("GET", "/v1/log/checkpoint", &[], None)
                .map_or(0, |r| r.status),
            Err(_) => 0,
        },
    );
    // The API's own metric family is untouched.
    assert_eq!(
        daemon.metric("lavd_tls_handshake_failures_total{reason=\"peer_connection_limit\"}"),
        0.0
    );
}
