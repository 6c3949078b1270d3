//! SIGHUP reloads the role map, the server certificate and the CRLs of a
//! running `lavd serve` without dropping open connections; a bad file
//! keeps the running configuration; a connection whose certificate a
//! reloaded CRL revokes, or one made with TLS 1.2 once a reload raised
//! `tls.min_version`, is refused and closed.

use std::time::Duration;

use rustix::process::Signal;
use softhsm_tests::server::{assert_alert, serve_config, Ca, Client, Daemon, Pki};
use softhsm_tests::TestToken;

const PROVIDER: &str = "spiffe://provider.example/mail";
const LATE: &str = "spiffe://provider.example/late";

fn roles(list: &[&str]) -> String {
    let mut s = String::from("[roles]\n");
    for id in list {
        s.push_str(&format!("\"{id}\" = [\"provider\"]\n"));
    }
    s
}

/// Sends SIGHUP and waits for the reload cycle's notifications; returns
/// the last (`READY=1` and its `STATUS=`).
fn reload(daemon: &Daemon) -> String {
    daemon.signal(Signal::HUP);
    let reloading = daemon.expect_notify("RELOADING=1");
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading}"
    );
    daemon.expect_notify("READY=1")
}

#[test]
fn sighup_applies_a_new_role_map_without_dropping_open_connections() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&roles(&[PROVIDER])));
    let daemon = Daemon::start(&t);

    let late = pki.client(daemon.api, Some(&pki.clients.identity(LATE)));
    let mut conn = late.connect().unwrap();
    conn.request("GET", "/v1/keys", &[], None)
        .unwrap()
        .assert_error(403, "forbidden");

    t.write_config(&serve_config(&roles(&[PROVIDER, LATE])));
    reload(&daemon);

    // The same keep-alive connection, now with the new role.
    let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"ok\"}", 1.0),
        1.0
    );
}

#[test]
fn a_bad_reload_keeps_the_running_configuration() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&roles(&[LATE])));
    let daemon = Daemon::start(&t);
    let late = pki.client(daemon.api, Some(&pki.clients.identity(LATE)));
    let mut conn = late.connect().unwrap();
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );

    // An unknown role name, then a key file that does not exist.
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{LATE}\" = [\"superuser\"]\n"
    )));
    let ready = reload(&daemon);
    // `systemctl status` says so until the next reload.
    assert!(
        ready.contains("; the last reload failed (roles."),
        "{ready}"
    );
    t.write_config(&serve_config(&roles(&[LATE])).replace("tls/server.key", "tls/missing.key"));
    let ready = reload(&daemon);
    assert!(
        ready.contains("; the last reload failed (tls.key)"),
        "{ready}"
    );
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"failed\"}", 2.0),
        2.0
    );
    let log = daemon.stderr();
    assert!(log.contains("reload failed"), "{log}");
    assert!(log.contains("unknown role \"superuser\""), "{log}");
    assert!(log.contains("tls.key"), "{log}");

    // Still serving the previous configuration, on the old connection and
    // on new ones (whose handshake needs the old key).
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    assert_eq!(late.get("/v1/keys").status, 200);
    daemon.wait_readyz(200);

    // A good file afterwards is applied.
    t.write_config(&serve_config(&roles(&[PROVIDER])));
    let ready = reload(&daemon);
    assert!(
        ready.contains("STATUS=serving api=") && !ready.contains("failed"),
        "{ready}"
    );
    conn.request("GET", "/v1/keys", &[], None)
        .unwrap()
        .assert_error(403, "forbidden");
}

#[test]
fn sighup_reloads_the_server_certificate_for_new_connections() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&roles(&[PROVIDER])));
    let daemon = Daemon::start(&t);
    let identity = pki.clients.identity(PROVIDER);
    let mut old = pki.client(daemon.api, Some(&identity)).connect().unwrap();

    let new_ca = Ca::new("rotated server CA");
    let server = new_ca.server();
    let (cert_pem, key_pem) = server.pem();
    pki.write("server.pem", &cert_pem);
    pki.write("server.key", &key_pem);
    reload(&daemon);

    let rotated = Client::new(
        daemon.api,
        &new_ca,
        Some(&identity),
        &[&rustls::version::TLS13],
    );
    assert_eq!(rotated.get("/v1/keys").status, 200);
    // A client that only trusts the old server CA now refuses the server.
    let stale = pki.client(daemon.api, Some(&identity));
    let e = stale.connect().unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // The connection made before the rotation is still served.
    assert_eq!(
        old.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
}

/// A CRL reloaded with SIGHUP refuses the certificates it revokes, open
/// connections included; putting the older CRL back is refused.
#[test]
fn a_reloaded_crl_refuses_and_closes_open_connections_of_a_revoked_certificate() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let revoked = pki.clients.identity(PROVIDER);
    let kept = pki.clients.identity(LATE);
    let before = pki.clients.crl(&[]);
    pki.write("clients.crl.pem", &before);
    t.write_config(&serve_config(&format!(
        "crls = [\"tls/clients.crl.pem\"]\n{}",
        roles(&[PROVIDER, LATE])
    )));
    // At `info`: the CRLs in force are said there.
    let daemon = Daemon::start_logging(&t, "info");
    let in_force = || daemon.stderr().matches("CRL in force").count();
    assert_eq!(in_force(), 1, "{}", daemon.stderr());
    let mut a = pki.client(daemon.api, Some(&revoked)).connect().unwrap();
    let mut b = pki.client(daemon.api, Some(&kept)).connect().unwrap();
    assert_eq!(a.request("GET", "/v1/keys", &[], None).unwrap().status, 200);
    assert_eq!(b.request("GET", "/v1/keys", &[], None).unwrap().status, 200);

    // The test CA numbers its CRLs by the second.
    std::thread::sleep(Duration::from_millis(1100));
    pki.write("clients.crl.pem", &pki.clients.crl(&[&revoked]));
    reload(&daemon);
    assert_eq!(in_force(), 2, "{}", daemon.stderr());

    let r = a.request("GET", "/v1/keys", &[], None).unwrap();
    let message = r.assert_error(403, "client_certificate_rejected");
    assert!(message.contains("certificate_revoked"), "{message}");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(a.closed_within(Duration::from_secs(5)));
    // The other certificate's connection is untouched.
    assert_eq!(b.request("GET", "/v1/keys", &[], None).unwrap().status, 200);
    // And the revoked one cannot come back.
    assert_alert(
        pki.client(daemon.api, Some(&revoked))
            .request("GET", "/v1/keys", None),
        rustls::AlertDescription::CertificateRevoked,
    );
    // Nor through the older CRL put back (a stale mirror, a rolled-back
    // secret): that reload fails, naming the file, and the newer CRL stays.
    pki.write("clients.crl.pem", &before);
    let status = reload(&daemon);
    assert!(status.contains("the last reload failed"), "{status}");
    // Not said to be in force.
    assert_eq!(in_force(), 2, "{}", daemon.stderr());
    assert!(
        daemon
            .stderr()
            .contains("clients.crl.pem (CRL 1 of tls.crls) is older than the running CRL"),
        "{}",
        daemon.stderr()
    );
    assert_alert(
        pki.client(daemon.api, Some(&revoked))
            .request("GET", "/v1/keys", None),
        rustls::AlertDescription::CertificateRevoked,
    );
}

/// Raising `tls.min_version` by SIGHUP reaches connections made with TLS
/// 1.2 before it (after a TLS 1.2 advisory, say): the next request of each
/// is refused (403 `client_certificate_rejected`, `tls_version_refused`)
/// and its connection closed, as a handshake now would be; a TLS 1.3
/// connection of the same certificate is untouched.
#[test]
fn a_reload_that_raises_min_version_closes_tls_1_2_connections() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let identity = pki.clients.identity(PROVIDER);
    t.write_config(&serve_config(&format!(
        "min_version = \"1.2\"\n{}",
        roles(&[PROVIDER])
    )));
    let daemon = Daemon::start(&t);
    let tls12 = || {
        Client::new(
            daemon.api,
            &pki.servers,
            Some(&identity),
            &[&rustls::version::TLS12],
        )
    };
    let mut old = tls12().connect().unwrap();
    let mut new = pki.client(daemon.api, Some(&identity)).connect().unwrap();
    assert_eq!(
        old.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    assert_eq!(
        new.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );

    t.write_config(&serve_config(&roles(&[PROVIDER])));
    reload(&daemon);

    let r = old.request("GET", "/v1/keys", &[], None).unwrap();
    let message = r.assert_error(403, "client_certificate_rejected");
    assert!(message.contains("tls_version_refused"), "{message}");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(old.closed_within(Duration::from_secs(5)));
    assert_eq!(
        new.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    assert_alert(
        tls12().request("GET", "/v1/keys", None),
        rustls::AlertDescription::ProtocolVersion,
    );
}

/// The rate limit is checked before the certificate is checked again: a
/// request over its identity's limit costs no certificate work (a client
/// can make every request re-check its chain). Here the certificate was
/// revoked by a reload: past the limit the request is 429; the first
/// request within it again is refused and the connection closed, and
/// takes no token: the identity's other, valid certificate (the agency's
/// new one, while a thief holds connections with the stolen one) gets it.
#[test]
fn the_rate_limit_comes_before_the_certificate_check() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let revoked = pki.clients.identity(PROVIDER);
    let valid = pki.clients.identity(PROVIDER);
    pki.write("clients.crl.pem", &pki.clients.crl(&[]));
    // Two requests, then one every 5 s.
    t.write_config(&serve_config(&format!(
        "crls = [\"tls/clients.crl.pem\"]\n{}[limits]\nrate_limit_per_second = 0.2\n\
         rate_limit_burst = 2\n",
        roles(&[PROVIDER])
    )));
    let daemon = Daemon::start(&t);
    let mut a = pki.client(daemon.api, Some(&revoked)).connect().unwrap();
    assert_eq!(a.request("GET", "/v1/keys", &[], None).unwrap().status, 200);
    pki.write("clients.crl.pem", &pki.clients.crl(&[&revoked]));
    reload(&daemon);
    // The identity's tokens spent after the reload, through the valid
    // certificate, so that `a`'s next request comes well within the 5 s a
    // token takes to come back however long the reload took (the burst of
    // two: `a`'s request took one, a token may have come back since).
    let mut b = pki.client(daemon.api, Some(&valid)).connect().unwrap();
    let mut granted = 0;
    loop {
        let r = b.request("GET", "/v1/keys", &[], None).unwrap();
        if r.status != 200 {
            r.assert_error(429, "rate_limited");
            break;
        }
        granted += 1;
        assert!(granted <= 2, "more than the burst of two granted");
    }
    let r = a.request("GET", "/v1/keys", &[], None).unwrap();
    r.assert_error(429, "rate_limited");
    std::thread::sleep(Duration::from_millis(5100));
    let r = a.request("GET", "/v1/keys", &[], None).unwrap();
    r.assert_error(403, "client_certificate_rejected");
    assert!(a.closed_within(Duration::from_secs(5)));
    let r = b.request("GET", "/v1/keys", &[], None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A connection keeps its certificate check between requests only until a
/// CRL's `nextUpdate` (with `enforce_crl_expiry`, the default): after it,
/// the next request on an open connection is refused.
#[test]
fn a_crl_past_its_next_update_refuses_open_connections() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    pki.write("clients.crl.pem", &pki.clients.crl(&[]));
    t.write_config(&serve_config(&format!(
        "crls = [\"tls/clients.crl.pem\"]\n{}",
        roles(&[PROVIDER])
    )));
    let daemon = Daemon::start(&t);

    // Eight seconds leave room for the reload, the handshake and two
    // requests on a loaded machine.
    let next_update = time::OffsetDateTime::now_utc() + time::Duration::seconds(8);
    pki.write("clients.crl.pem", &pki.clients.crl_until(&[], next_update));
    reload(&daemon);
    let mut conn = pki
        .client(daemon.api, Some(&pki.clients.identity(PROVIDER)))
        .connect()
        .unwrap();
    for _ in 0..2 {
        let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let left = next_update + time::Duration::seconds(2) - time::OffsetDateTime::now_utc();
    if left.is_positive() {
        std::thread::sleep(left.unsigned_abs());
    }
    let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
    let message = r.assert_error(403, "client_certificate_rejected");
    assert!(message.contains("crl_expired"), "{message}");
    assert_eq!(r.header("connection"), Some("close"));
    // A CRL that lapsed while running does not block a reload either.
    t.write_config(&serve_config(&format!(
        "crls = [\"tls/clients.crl.pem\"]\n{}",
        roles(&[PROVIDER, LATE])
    )));
    let status = reload(&daemon);
    assert!(!status.contains("the last reload failed"), "{status}");
}

/// CRLs the handshake would misread are refused before they are used, and
/// the running ones stay: two CRLs of one CA (the handshake consults only
/// the first that matches, so the newer one, listed second, would revoke
/// nothing), a CRL already past its `nextUpdate` (every client would be
/// refused), and a CRL signed by another key under the client CA's name
/// (every client of that CA would be refused, `crl_invalid`). The newer CRL
/// alone is then applied and refuses the certificate it revokes.
#[test]
fn crls_the_handshake_would_misread_are_refused_at_reload() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let stolen = pki.clients.identity(PROVIDER);
    let with_crls = |files: &[&str]| {
        let list: Vec<String> = files.iter().map(|f| format!("\"tls/{f}\"")).collect();
        serve_config(&format!(
            "crls = [{}]\n{}",
            list.join(", "),
            roles(&[PROVIDER])
        ))
    };
    pki.write("old.crl.pem", &pki.clients.crl(&[]));
    t.write_config(&with_crls(&["old.crl.pem"]));
    let daemon = Daemon::start(&t);
    let mut conn = pki.client(daemon.api, Some(&stolen)).connect().unwrap();
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );

    pki.write("new.crl.pem", &pki.clients.crl(&[&stolen]));
    t.write_config(&with_crls(&["old.crl.pem", "new.crl.pem"]));
    reload(&daemon);
    let past = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    pki.write("stale.crl.pem", &pki.clients.crl_until(&[], past));
    t.write_config(&with_crls(&["stale.crl.pem"]));
    reload(&daemon);
    // Signed by another key under the client CA's name (a CA re-keyed
    // under the same name): the handshake would refuse every client of
    // that CA.
    let rekeyed = softhsm_tests::server::Ca::new("lavd test client CA");
    pki.write("rekeyed.crl.pem", &rekeyed.crl(&[]));
    t.write_config(&with_crls(&["rekeyed.crl.pem"]));
    reload(&daemon);
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"failed\"}", 3.0),
        3.0
    );
    let log = daemon.stderr();
    assert!(log.contains("tls.crls"), "{log}");
    assert!(
        log.contains("CRL 1 (")
            && log.contains("CRL 2 (")
            && log.contains("can cover the same certificates"),
        "{log}"
    );
    assert!(
        log.contains("stale.crl.pem (CRL 1 of tls.crls) is past its nextUpdate"),
        "{log}"
    );
    assert!(
        log.contains("rekeyed.crl.pem (CRL 1 of tls.crls): its signature does not verify"),
        "{log}"
    );
    // Still the old CRL, on the open connection and on new ones.
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    assert_eq!(
        pki.client(daemon.api, Some(&stolen)).get("/v1/keys").status,
        200
    );

    t.write_config(&with_crls(&["new.crl.pem"]));
    reload(&daemon);
    let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
    let message = r.assert_error(403, "client_certificate_rejected");
    assert!(message.contains("certificate_revoked"), "{message}");
}

/// Changes that only a restart applies are named in the reload's warning:
/// `[hsm]` (its `call_timeout_ms`, which the comparison once left out),
/// `[server]`, `[limits]` and `[log]`, changed at once.
#[test]
fn changed_restart_only_tables_are_named_as_needing_a_restart() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&roles(&[PROVIDER])));
    let daemon = Daemon::start(&t);
    // `[hsm]`, `[server]`, `[limits]` and `[log]` changed at once.
    let changed = serve_config(&format!(
        "{}\n[limits]\nmax_batch = 77\n\n[log]\nlevel = \"debug\"\n",
        roles(&[PROVIDER])
    ))
    .replace("shutdown_grace_secs = 10", "shutdown_grace_secs = 11");
    t.write_config_hsm(
        &softhsm_tests::module_path(),
        2,
        "call_timeout_ms = 7000\n",
        &changed,
    );
    reload(&daemon);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.stderr();
        if log.lines().any(|l| {
            l.contains("apply only after a restart")
                && ["\"hsm\"", "\"server\"", "\"limits\"", "\"log\""]
                    .iter()
                    .all(|table| l.contains(table))
        }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CRLs that lapsed do not block reloads. A daemon whose CRL is already
/// past its `nextUpdate` (a start warns and takes it) reloads a changed
/// role map with that CRL still stale: the reload applies, warning again,
/// and the clients the CRL covers stay refused. Before, every reload
/// failed until a fresh CRL came, withdrawing a role or an authority in
/// a hurry included. (A stale CRL still never replaces a fresh one: the
/// test above.)
#[test]
fn a_reload_applies_when_the_running_crls_are_stale_too() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let past = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    pki.write("stale.crl.pem", &pki.clients.crl_until(&[], past));
    let config =
        |list: &[&str]| serve_config(&format!("crls = [\"tls/stale.crl.pem\"]\n{}", roles(list)));
    t.write_config(&config(&[PROVIDER]));
    let daemon = Daemon::start(&t);
    t.write_config(&config(&[PROVIDER, LATE]));
    let status = reload(&daemon);
    assert!(!status.contains("the last reload failed"), "{status}");
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"ok\"}", 1.0),
        1.0
    );
    let log = daemon.stderr();
    assert_eq!(
        log.matches("stale.crl.pem (CRL 1 of tls.crls) is past its nextUpdate")
            .count(),
        2,
        "a warning at the start and at the reload: {log}"
    );
    let refused = pki
        .client(daemon.api, Some(&pki.clients.identity(LATE)))
        .request("GET", "/v1/keys", None);
    assert!(
        refused.is_err(),
        "a client of the stale CRL was served: {refused:?}"
    );
}
