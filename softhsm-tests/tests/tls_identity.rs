//! The API's TLS as two independent clients see it: OpenSSL's `s_client`
//! and `curl` (OpenSSL 3 underneath, not rustls) against a real `lavd
//! serve`. Each refusal is asserted as the client reports it (the TLS alert
//! number, curl's exit code, or the HTTP status and error code), and the
//! negotiated parameters are compared with what docs/configuration.md says
//! (`[tls]`, "What the server does with them").
//!
//! `openssl` and `curl` come from `.ci/setup` (installed by apt-get); a
//! missing one fails the test with that message.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::ExtendedKeyUsagePurpose;
use softhsm_tests::server::{serve_config, start_serve, uri, Daemon, Issued, Pki};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

const PROVIDER: &str = "spiffe://provider.example/mail";
const GET_KEYS: &[u8] = b"GET /v1/keys HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// A daemon whose `[tls]` table ends with `tls_extra`.
fn start(tls_extra: &str) -> (TestToken, Pki, Daemon) {
    start_serve(&format!(
        "{tls_extra}[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
    ))
}

/// The files OpenSSL and curl read for one client: the server CA, the
/// certificate and its key.
struct Files {
    ca: String,
    cert: String,
    key: String,
}

fn files(pki: &Pki, who: &Issued, name: &str) -> Files {
    let (ca, cert, key) = pki.cli_files(who, name);
    Files { ca, cert, key }
}

/// What a client process printed (stdout and stderr together) and whether
/// it exited 0.
struct Run {
    ok: bool,
    code: Option<i32>,
    text: String,
}

/// Runs `program` with `args`, writing `script` to its stdin (each chunk
/// after its delay) and then closing it; killed after 60 s.
fn run(program: &str, args: &[&str], script: &[(u64, &[u8])]) -> Run {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} ({e}): run .ci/setup --tests"));
    let mut stdin = child.stdin.take().expect("stdin");
    for (delay_ms, bytes) in script {
        std::thread::sleep(Duration::from_millis(*delay_ms));
        // The client may have quit already (a refused handshake).
        let _ = stdin.write_all(bytes).and_then(|()| stdin.flush());
    }
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{program} {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("output");
    let mut text = String::from_utf8_lossy(&stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&stderr));
    Run {
        ok: status.success(),
        code: status.code(),
        text,
    }
}

/// `openssl s_client` to `addr` as `who`, with `extra` arguments.
fn s_client(addr: SocketAddr, who: &Files, extra: &[&str], script: &[(u64, &[u8])]) -> Run {
    let connect = addr.to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-servername",
        "localhost",
        "-CAfile",
        &who.ca,
        "-cert",
        &who.cert,
        "-key",
        &who.key,
    ];
    args.extend_from_slice(extra);
    run("openssl", &args, script)
}

/// `curl` GET `path` as `who`, with `extra` arguments; the output ends with
/// `status=<code>`.
fn curl(addr: SocketAddr, who: &Files, path: &str, extra: &[&str]) -> Run {
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());
    let url = format!("https://localhost:{}{path}", addr.port());
    let mut args = vec![
        "-sS",
        "--resolve",
        &resolve,
        "--cacert",
        &who.ca,
        "--cert",
        &who.cert,
        "--key",
        &who.key,
        "-w",
        "\nstatus=%{http_code}",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    run("curl", &args, &[])
}

/// Asserts a handshake the server refused with TLS alert `number`
/// (`description` as OpenSSL names it).
fn assert_refused_with_alert(r: &Run, number: u8, description: &str) {
    assert!(!r.ok || !r.text.contains("Cipher is"), "{}", r.text);
    assert!(
        r.text.contains(&format!("alert {description}"))
            && r.text.contains(&format!("SSL alert number {number}")),
        "expected alert {number} ({description}):\n{}",
        r.text
    );
    assert!(!r.text.contains("HTTP/1.1"), "{}", r.text);
}

fn assert_counted(daemon: &Daemon, reason: &str, n: f64) {
    let series = format!("lavd_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    assert_eq!(daemon.wait_metric(&series, n), n, "{series}");
}

#[test]
fn tls_1_2_and_older_are_refused_and_1_3_is_served() {
    let (_t, pki, daemon) = start("");
    let who = files(&pki, &pki.clients.identity(PROVIDER), "provider");

    // TLS 1.2: rustls answers a 1.2-only ClientHello with protocol_version.
    let r = s_client(daemon.api, &who, &["-tls1_2"], &[]);
    assert_refused_with_alert(&r, 70, "protocol version");
    // TLS 1.1 and 1.0 (OpenSSL needs security level 0 to offer them): no
    // suite in common, handshake_failure.
    for old in ["-tls1_1", "-tls1"] {
        let r = s_client(
            daemon.api,
            &who,
            &[old, "-cipher", "DEFAULT@SECLEVEL=0"],
            &[],
        );
        assert_refused_with_alert(&r, 40, "handshake failure");
    }
    // curl capped at 1.2: exit 35 (CURLE_SSL_CONNECT_ERROR).
    let r = curl(daemon.api, &who, "/v1/keys", &["--tls-max", "1.2"]);
    assert_eq!(r.code, Some(35), "{}", r.text);
    assert!(r.text.contains("alert protocol version"), "{}", r.text);
    assert!(r.text.contains("\nstatus=000"), "{}", r.text);
    assert_counted(&daemon, "incompatible_peer", 4.0);

    // The same client with TLS 1.3 is served, by both tools.
    let r = s_client(daemon.api, &who, &["-tls1_3", "-ign_eof"], &[(0, GET_KEYS)]);
    assert!(r.text.contains("New, TLSv1.3"), "{}", r.text);
    assert!(r.text.contains("HTTP/1.1 200 OK"), "{}", r.text);
    let r = curl(daemon.api, &who, "/v1/keys", &[]);
    assert!(r.ok && r.text.ends_with("status=200"), "{}", r.text);
}

#[test]
fn a_client_certificate_only_for_server_auth_is_refused() {
    let (_t, pki, daemon) = start("");
    let now = OffsetDateTime::now_utc();
    let server_auth_only = pki.clients.client_for(
        vec![uri(PROVIDER)],
        vec![ExtendedKeyUsagePurpose::ServerAuth],
        now - time::Duration::days(1),
        now + time::Duration::days(7),
    );
    let who = files(&pki, &server_auth_only, "server-auth-only");

    // TLS 1.3: the server checks the client certificate after the client's
    // Finished, so the client reads the alert: unsupported_certificate.
    let r = s_client(daemon.api, &who, &["-ign_eof"], &[(0, GET_KEYS)]);
    assert_refused_with_alert(&r, 43, "unsupported certificate");
    // curl sees it on its first read: exit 56 (CURLE_RECV_ERROR).
    let r = curl(daemon.api, &who, "/v1/keys", &[]);
    assert_eq!(r.code, Some(56), "{}", r.text);
    assert!(
        r.text.contains("alert unsupported certificate"),
        "{}",
        r.text
    );
    assert_counted(&daemon, "certificate_wrong_purpose", 2.0);

    // The same identity from the same CA with clientAuth is served.
    let good = files(&pki, &pki.clients.identity(PROVIDER), "provider");
    let r = curl(daemon.api, &good, "/v1/keys", &[]);
    assert!(r.ok && r.text.ends_with("status=200"), "{}", r.text);
}

#[test]
fn a_certificate_with_two_uri_sans_gets_403_invalid_client_identity() {
    let (_t, pki, daemon) = start("");
    let two = pki
        .clients
        .client(vec![uri(PROVIDER), uri("spiffe://provider.example/other")]);
    let who = files(&pki, &two, "two-sans");

    // The handshake completes (the chain is good); every request is 403.
    let r = curl(daemon.api, &who, "/v1/keys", &[]);
    let (body, status) = r.text.rsplit_once('\n').expect("status line");
    assert_eq!(status, "status=403", "{}", r.text);
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON error");
    assert_eq!(v["error"]["code"], "invalid_client_identity", "{v}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("2 URI SANs"), "{message}");

    let r = s_client(daemon.api, &who, &["-ign_eof"], &[(0, GET_KEYS)]);
    assert!(r.text.contains("HTTP/1.1 403 Forbidden"), "{}", r.text);
    assert!(r.text.contains("invalid_client_identity"), "{}", r.text);
    assert_counted(&daemon, "several_uri_sans", 2.0);
}

#[test]
fn renegotiation_gets_a_no_renegotiation_alert_and_nothing_more() {
    // Renegotiation exists only up to TLS 1.2 (OpenSSL itself refuses its
    // `R` command on a 1.3 connection), so this daemon also accepts 1.2.
    let (_t, pki, daemon) = start("min_version = \"1.2\"\n");
    let who = files(&pki, &pki.clients.identity(PROVIDER), "provider");
    // `R` asks for a renegotiation; then a request on the same connection.
    let r = s_client(
        daemon.api,
        &who,
        &["-tls1_2"],
        &[(1000, b"R\n"), (1000, GET_KEYS), (2000, b"")],
    );
    assert!(r.text.contains("New, TLSv1.2"), "{}", r.text);
    assert!(r.text.contains("RENEGOTIATING"), "{}", r.text);
    // rustls answers the new ClientHello with the no_renegotiation warning
    // alert; OpenSSL then gives up on the connection.
    assert!(r.text.contains(":no renegotiation:"), "{}", r.text);
    assert!(!r.text.contains("HTTP/1.1"), "{}", r.text);
    // No session to resume either: a TLS 1.2 session ID is never issued.
    assert!(r.text.contains("Session-ID: \n"), "{}", r.text);

    // The daemon serves the next client.
    let r = curl(daemon.api, &who, "/v1/keys", &[]);
    assert!(r.ok && r.text.ends_with("status=200"), "{}", r.text);
}

#[test]
fn no_ticket_is_issued_and_early_data_is_rejected_unread() {
    let (t, pki, daemon) = start("");
    let who = files(&pki, &pki.clients.identity(PROVIDER), "provider");

    // lavd sends no session ticket, so s_client has no session to save.
    let saved = t.path("lavd-session.pem");
    let r = s_client(
        daemon.api,
        &who,
        &["-tls1_3", "-sess_out", saved.to_str().unwrap()],
        &[(1000, b"")],
    );
    assert!(r.text.contains("New, TLSv1.3"), "{}", r.text);
    assert!(!r.text.contains("New Session Ticket"), "{}", r.text);
    assert!(!saved.exists(), "a session was saved:\n{}", r.text);

    // To make OpenSSL send 0-RTT data at all it needs a ticket that allows
    // it: one from `openssl s_server -early_data` with lavd's own server
    // certificate, for the same name.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tls = |f: &str| t.path("tls").join(f).to_str().unwrap().to_string();
    let accept = format!("127.0.0.1:{port}");
    let mut server = Command::new("openssl")
        .args(["s_server", "-accept", &accept, "-cert", &tls("server.pem")])
        .args(["-key", &tls("server.key"), "-tls1_3", "-early_data"])
        .args(["-naccept", "1", "-quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let ticket = t.path("ticket.pem");
    let other: SocketAddr = accept.parse().unwrap();
    let mut got = None;
    for _ in 0..50 {
        let r = s_client(
            other,
            &who,
            &["-tls1_3", "-sess_out", ticket.to_str().unwrap()],
            &[(1000, b"")],
        );
        if r.text.contains("Max Early Data: 16384") {
            got = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        got.is_some() && ticket.exists(),
        "s_server issued no ticket"
    );

    // Offered to lavd with a request as early data: the PSK is not one of
    // lavd's, the early data is rejected, a full handshake follows, and the
    // request in it is never answered.
    let early = t.path("early.txt");
    std::fs::write(&early, GET_KEYS).unwrap();
    let r = s_client(
        daemon.api,
        &who,
        &[
            "-tls1_3",
            "-sess_in",
            ticket.to_str().unwrap(),
            "-early_data",
            early.to_str().unwrap(),
        ],
        &[(3000, b"")],
    );
    assert!(r.text.contains("New, TLSv1.3"), "{}", r.text);
    assert!(!r.text.contains("Reused"), "{}", r.text);
    assert!(r.text.contains("Early data was rejected"), "{}", r.text);
    assert!(!r.text.contains("HTTP/1.1"), "{}", r.text);
    assert_eq!(
        daemon.metric("lavd_http_requests_total{route=\"keys\",status=\"200\"}"),
        0.0
    );
}

/// The PEM certificates `s_client -showcerts` printed, in order.
fn shown_certs(text: &str) -> Vec<String> {
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|rest| {
            let body = rest.split("-----END CERTIFICATE-----").next().unwrap();
            body.split_whitespace().collect::<String>()
        })
        .collect()
}

fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[test]
fn the_chain_suites_and_groups_are_as_documented() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    // `tls.cert` is the leaf, then the intermediate; clients trust only the
    // root, so the server must send the intermediate.
    let intermediate = pki.servers.intermediate("lavd test server intermediate");
    let (leaf, key) = intermediate.server().pem();
    pki.write("server.pem", &format!("{leaf}{}", intermediate.pem()));
    pki.write("server.key", &key);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
    )));
    let daemon = Daemon::start(&t);
    let who = files(&pki, &pki.clients.identity(PROVIDER), "provider");

    let r = s_client(daemon.api, &who, &["-showcerts"], &[(500, b"")]);
    assert_eq!(
        shown_certs(&r.text),
        vec![pem_body(&leaf), pem_body(&intermediate.pem())],
        "{}",
        r.text
    );
    assert!(r.text.contains("Verify return code: 0 (ok)"), "{}", r.text);
    // The CertificateRequest names no client CA: who the vault trusts is
    // not told to whoever connects.
    assert!(
        r.text.contains("No client certificate CA names sent"),
        "{}",
        r.text
    );
    // Only the ALPN the server offers is http/1.1.
    let r = s_client(daemon.api, &who, &["-alpn", "h2"], &[(500, b"")]);
    assert!(r.text.contains("no application protocol"), "{}", r.text);

    // TLS 1.3 suites: the three of rustls' aws-lc-rs provider, no CCM.
    for suite in [
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
    ] {
        let r = s_client(daemon.api, &who, &["-ciphersuites", suite], &[]);
        assert!(
            r.text.contains(&format!("New, TLSv1.3, Cipher is {suite}")),
            "{suite}: {}",
            r.text
        );
    }
    for suite in ["TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256"] {
        let r = s_client(daemon.api, &who, &["-ciphersuites", suite], &[]);
        assert_refused_with_alert(&r, 40, "handshake failure");
    }
    // Key exchange groups: X25519, P-256, P-384 (and X25519MLKEM768, which
    // OpenSSL 3.0 cannot offer); nothing else.
    for (group, shown) in [
        ("X25519", "Server Temp Key: X25519"),
        ("P-256", "Server Temp Key: ECDH, prime256v1"),
        ("P-384", "Server Temp Key: ECDH, secp384r1"),
    ] {
        let r = s_client(daemon.api, &who, &["-groups", group], &[]);
        assert!(r.text.contains(shown), "{group}: {}", r.text);
    }
    for group in ["P-521", "X448", "ffdhe2048"] {
        let r = s_client(daemon.api, &who, &["-groups", group], &[]);
        assert_refused_with_alert(&r, 40, "handshake failure");
    }
}

#[test]
fn with_tls_1_2_allowed_only_ecdhe_aead_suites_are_offered() {
    let (_t, pki, daemon) = start("min_version = \"1.2\"\n");
    let who = files(&pki, &pki.clients.identity(PROVIDER), "provider");
    // The test server key is ECDSA P-256, so the ECDHE-ECDSA suites.
    for suite in [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ] {
        let r = s_client(daemon.api, &who, &["-tls1_2", "-cipher", suite], &[]);
        assert!(
            r.text.contains(&format!("New, TLSv1.2, Cipher is {suite}")),
            "{suite}: {}",
            r.text
        );
    }
    // CBC, SHA-1 and static-RSA suites are not offered at all.
    for suite in [
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-ECDSA-AES256-SHA",
        "AES256-GCM-SHA384",
    ] {
        let r = s_client(daemon.api, &who, &["-tls1_2", "-cipher", suite], &[]);
        assert_refused_with_alert(&r, 40, "handshake failure");
    }
}
