//! Who may not talk to the API, over real TLS to a real `lavd serve`: each
//! refusal with its exact TLS alert (handshake refusals) or HTTP status and
//! error code (authenticated but unusable identities), and the metric reason
//! it is counted under.

use rustls::AlertDescription;
use softhsm_tests::server::{
    assert_alert, serve_config, start_serve, uri, Ca, Client, Daemon, Pki,
};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

const PROVIDER: &str = "spiffe://provider.example/mail";

/// A daemon whose `[tls]` table ends with `tls_extra`.
fn start(tls_extra: &str) -> (TestToken, Pki, Daemon) {
    start_serve(&format!(
        "{tls_extra}[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
    ))
}

/// Asserts the handshake-failure counter for `reason` reaches exactly 1.
fn assert_counted_once(daemon: &Daemon, reason: &str) {
    let series = format!("lavd_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    assert_eq!(daemon.wait_metric(&series, 1.0), 1.0, "{series}");
}

#[test]
fn no_client_certificate_fails_the_handshake() {
    let (_t, pki, daemon) = start("");
    let anonymous = pki.client(daemon.api, None);
    assert_alert(
        anonymous.request("GET", "/v1/keys", None),
        AlertDescription::CertificateRequired,
    );
    assert_counted_once(&daemon, "no_client_certificate");
    // The same PKI with a certificate is served.
    let provider = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    assert_eq!(provider.get("/v1/keys").status, 200);
}

#[test]
fn a_certificate_from_another_ca_fails_the_handshake() {
    let (_t, pki, daemon) = start("");
    let stranger_ca = Ca::new("some other CA");
    // Same identity, wrong issuer.
    let stranger = pki.client(daemon.api, Some(&stranger_ca.identity(PROVIDER)));
    assert_alert(
        stranger.request("GET", "/v1/keys", None),
        AlertDescription::UnknownCA,
    );
    assert_counted_once(&daemon, "unknown_issuer");
}

#[test]
fn an_expired_certificate_fails_the_handshake() {
    let (_t, pki, daemon) = start("");
    let now = OffsetDateTime::now_utc();
    let expired = pki.clients.client_valid(
        vec![uri(PROVIDER)],
        now - time::Duration::days(10),
        now - time::Duration::days(1),
    );
    assert_alert(
        pki.client(daemon.api, Some(&expired))
            .request("GET", "/v1/keys", None),
        AlertDescription::CertificateExpired,
    );
    assert_counted_once(&daemon, "certificate_expired");
}

/// A connection keeps its certificate check between requests only until
/// the certificate's `notAfter`: the next request on it after that is
/// refused, and the connection closed.
#[test]
fn a_certificate_that_expires_on_an_open_connection_is_refused_on_it() {
    let (_t, pki, daemon) = start("");
    let now = OffsetDateTime::now_utc();
    // Six seconds leave room for the handshake and first request on a
    // loaded machine; X.509 times have whole seconds.
    let not_after = now + time::Duration::seconds(6);
    let short = pki.clients.client_valid(
        vec![uri(PROVIDER)],
        now - time::Duration::days(1),
        not_after,
    );
    let mut conn = pki.client(daemon.api, Some(&short)).connect().unwrap();
    for _ in 0..2 {
        let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    sleep_until(not_after + time::Duration::seconds(2));
    let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
    let message = r.assert_error(403, "client_certificate_rejected");
    assert!(message.contains("certificate_expired"), "{message}");
    assert_eq!(r.header("connection"), Some("close"));
}

fn sleep_until(at: OffsetDateTime) {
    let left = at - OffsetDateTime::now_utc();
    if left.is_positive() {
        std::thread::sleep(left.unsigned_abs());
    }
}

#[test]
fn a_revoked_certificate_fails_the_handshake() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let revoked = pki.clients.identity(PROVIDER);
    let good = pki.clients.identity(PROVIDER);
    pki.write("clients.crl.pem", &pki.clients.crl(&[&revoked]));
    t.write_config(&serve_config(&format!(
        "crls = [\"tls/clients.crl.pem\"]\n[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
    )));
    let daemon = Daemon::start(&t);
    assert_alert(
        pki.client(daemon.api, Some(&revoked))
            .request("GET", "/v1/keys", None),
        AlertDescription::CertificateRevoked,
    );
    assert_counted_once(&daemon, "certificate_revoked");
    // Another certificate of the same identity and CA, not on the CRL.
    assert_eq!(
        pki.client(daemon.api, Some(&good)).get("/v1/keys").status,
        200
    );
}

/// A start with a CRL already past its `nextUpdate` (its publisher
/// stalled, the host restarted) is not refused: the daemon starts, warns,
/// and refuses the clients that CRL covers (`crl_expired`), while clients
/// of other CAs (each CA needs a CRL of its own: this one's is fresh), the
/// admin listener and `/metrics` keep working. (A reload
/// that brings such a CRL in over fresh ones is refused, and one while the
/// running CRLs are stale too applies: `serve_reload.rs`.)
#[test]
fn a_start_with_a_stale_crl_warns_and_refuses_only_its_clients() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let past = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    pki.write("clients.crl.pem", &pki.clients.crl_until(&[], past));
    // Another client CA, with a fresh CRL of its own.
    let other_ca = Ca::new("another client CA");
    pki.write("other-clients.pem", &other_ca.pem());
    pki.write("other-clients.crl.pem", &other_ca.crl(&[]));
    let config = serve_config(&format!(
        "crls = [\"tls/clients.crl.pem\"]\n[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
    ));
    let both = config
        .replace(
            "client_cas = [\"tls/clients.pem\"]",
            "client_cas = [\"tls/clients.pem\", \"tls/other-clients.pem\"]",
        )
        .replace(
            "crls = [\"tls/clients.crl.pem\"]",
            "crls = [\"tls/clients.crl.pem\", \"tls/other-clients.crl.pem\"]",
        );
    assert_ne!(both, config);
    t.write_config(&both);
    let daemon = Daemon::start(&t);
    assert!(
        daemon
            .stderr()
            .contains("clients.crl.pem (CRL 1 of tls.crls) is past its nextUpdate"),
        "{}",
        daemon.stderr()
    );
    assert_alert(
        pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)))
            .request("GET", "/v1/keys", None),
        // rustls's alert for a revocation status it cannot know; the
        // reason is in the counter.
        AlertDescription::UnknownCA,
    );
    assert_counted_once(&daemon, "crl_expired");
    // The other CA's client, the admin listener and its metrics work.
    let other = pki.client(daemon.api, Some(&other_ca.identity(PROVIDER)));
    let r = other.get("/v1/keys");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(daemon.admin_get("/readyz").status, 200);
    assert_eq!(daemon.admin_get("/metrics").status, 200);
}

/// With CRLs, the whole chain's revocation status is checked, not the
/// leaf's alone: a client certificate from an intermediate CA that the
/// root's CRL revokes fails the handshake, though its own CA's CRL does not
/// list it; before the root revoked the intermediate, it was let in.
#[test]
fn a_certificate_from_a_revoked_intermediate_ca_fails_the_handshake() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let intermediate = pki.clients.intermediate("lavd test client intermediate");
    let client = intermediate.chained_identity(PROVIDER);
    pki.write("intermediate.crl.pem", &intermediate.crl(&[]));
    let config = |root_crl: &str| {
        pki.write("clients.crl.pem", root_crl);
        t.write_config(&serve_config(&format!(
            "crls = [\"tls/clients.crl.pem\", \"tls/intermediate.crl.pem\"]\n\
             [roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
        )));
    };

    config(&pki.clients.crl(&[]));
    let daemon = Daemon::start(&t);
    assert_eq!(
        pki.client(daemon.api, Some(&client)).get("/v1/keys").status,
        200
    );
    drop(daemon);

    config(&pki.clients.crl_of_cas(&[&intermediate]));
    let daemon = Daemon::start(&t);
    assert_alert(
        pki.client(daemon.api, Some(&client))
            .request("GET", "/v1/keys", None),
        AlertDescription::CertificateRevoked,
    );
    assert_counted_once(&daemon, "certificate_revoked");
}

#[test]
fn tls_1_2_is_refused_unless_configured() {
    let (_t, pki, daemon) = start("");
    let identity = pki.clients.identity(PROVIDER);
    let old = Client::new(
        daemon.api,
        &pki.servers,
        Some(&identity),
        &[&rustls::version::TLS12],
    );
    assert_alert(
        old.request("GET", "/v1/keys", None),
        AlertDescription::ProtocolVersion,
    );
    assert_counted_once(&daemon, "incompatible_peer");

    let (_t2, pki2, daemon2) = start("min_version = \"1.2\"\n");
    let identity2 = pki2.clients.identity(PROVIDER);
    let old2 = Client::new(
        daemon2.api,
        &pki2.servers,
        Some(&identity2),
        &[&rustls::version::TLS12],
    );
    assert_eq!(old2.get("/v1/keys").status, 200);
}

#[test]
fn a_certificate_without_exactly_one_uri_san_gets_invalid_client_identity() {
    let (_t, pki, daemon) = start("");
    let dns_only = pki.clients.client(vec![rcgen::SanType::DnsName(
        "mail.provider.example".try_into().unwrap(),
    )]);
    let mut conn = pki.client(daemon.api, Some(&dns_only)).connect().unwrap();
    // Refused whatever it asks for, and the connection is closed: with no
    // identity there is nothing to rate-limit by, so each try costs a
    // handshake.
    let r = conn.request("GET", "/v1/unwrap", &[], None).unwrap();
    let message = r.assert_error(403, "invalid_client_identity");
    assert!(message.contains("no URI SAN"), "{message}");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(conn.closed_within(std::time::Duration::from_secs(5)));

    let two = pki
        .clients
        .client(vec![uri(PROVIDER), uri("spiffe://provider.example/other")]);
    let r = pki.client(daemon.api, Some(&two)).get("/v1/keys");
    let message = r.assert_error(403, "invalid_client_identity");
    assert!(message.contains("2 URI SANs"), "{message}");

    // One URI SAN, but no caller identity (bounds::identity): no scheme.
    let no_scheme = pki.clients.client(vec![uri("provider-unit-7")]);
    let r = pki.client(daemon.api, Some(&no_scheme)).get("/v1/keys");
    let message = r.assert_error(403, "invalid_client_identity");
    assert!(message.contains("is not a URI"), "{message}");
    assert_eq!(r.header("connection"), Some("close"));

    assert_counted_once(&daemon, "no_uri_san");
    assert_counted_once(&daemon, "several_uri_sans");
    assert_counted_once(&daemon, "bad_uri_san");
    assert_eq!(
        daemon.wait_metric(
            "lavd_http_requests_total{route=\"unrouted\",status=\"403\"}",
            3.0
        ),
        3.0
    );
}

#[test]
fn an_identity_without_a_role_is_forbidden() {
    let (_t, pki, daemon) = start("");
    let nobody = "spiffe://provider.example/unlisted";
    let r = pki
        .client(daemon.api, Some(&pki.clients.identity(nobody)))
        .get("/v1/keys");
    let message = r.assert_error(403, "forbidden");
    assert!(message.contains(nobody), "{message}");
    // A provider may read keys but not unwrap.
    let r = pki
        .client(daemon.api, Some(&pki.clients.identity(PROVIDER)))
        .request("POST", "/v1/unwrap", Some(b"{}"))
        .unwrap();
    let message = r.assert_error(403, "forbidden");
    assert!(message.contains("agency"), "{message}");
}
