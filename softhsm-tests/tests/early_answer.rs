//! Answers sent before the request body was read (413 from the declared
//! length, 413 while reading a chunked body, 429 from the rate limit) reach a
//! client that does not send `Expect: 100-continue` and writes its whole body
//! before it reads, as Python's `http.client` does. The daemon reads and
//! discards the rest of the body (a lingering close), answers with
//! `Connection: close`, and ends the connection with a TLS `close_notify`.
//! Before, it closed with the body unread: the kernel sent a reset and the
//! client saw `SSLEOFError` or `ECONNRESET` instead of the answer.

use std::io::Read as _;
use std::process::Command;

use softhsm_tests::server::{path_str, serve_config, Daemon, Pki, TlsConn};
use softhsm_tests::TestToken;

const AGENCY: &str = "spiffe://agency.example/lea";

fn start(limits: &str) -> (TestToken, Pki, Daemon) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{AGENCY}\" = [\"agency\"]\n[limits]\n{limits}\n"
    )));
    let daemon = Daemon::start(&t);
    (t, pki, daemon)
}

/// The rest of the connection is a TLS `close_notify` and nothing else: a
/// clean end of stream, not a reset or a bare TCP close (which rustls
/// reports as `UnexpectedEof`).
fn assert_closed_cleanly(conn: &mut TlsConn) {
    let mut rest = Vec::new();
    match conn.stream().read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{} bytes after the answer", rest.len()),
        Err(e) => panic!("the connection did not end with close_notify: {e}"),
    }
}

#[test]
fn an_8_mib_body_without_expect_gets_its_413() {
    let (_t, pki, daemon) = start("max_body_bytes = 1048576");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(AGENCY)));
    let body = vec![b' '; 8 << 20];

    // Declared length over the limit: answered before any of it is read.
    let mut conn = client.connect().unwrap();
    let r = conn
        .request("POST", "/v1/unwrap", &[], Some(&body))
        .expect("the whole body is written and the answer read");
    let message = r.assert_error(413, "body_too_large");
    assert!(message.contains("1048576"), "{message}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed_cleanly(&mut conn);

    // Chunked: answered once the limit is passed, 7 MiB before the end.
    let mut conn = client.connect().unwrap();
    let mut bytes = b"POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        .to_vec();
    for chunk in body.chunks(64 << 10) {
        bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    conn.send(&bytes)
        .expect("the whole chunked body is written");
    let r = conn.read_response().unwrap();
    r.assert_error(413, "body_too_large");
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed_cleanly(&mut conn);
}

#[test]
fn rate_limited_bodies_without_expect_all_get_their_429() {
    // One token every 100 s: after the first request, every one is 429.
    let (_t, pki, daemon) = start("rate_limit_per_second = 0.01\nrate_limit_burst = 1");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(AGENCY)));
    client
        .request("POST", "/v1/unwrap", Some(b"{}"))
        .unwrap()
        .assert_error(400, "malformed_request");

    let body = vec![b' '; 200 << 10];
    let trials = 120;
    for i in 0..trials {
        let mut conn = client.connect().unwrap();
        let r = conn
            .request("POST", "/v1/unwrap", &[], Some(&body))
            .unwrap_or_else(|e| panic!("trial {i}: no answer: {e}"));
        r.assert_error(429, "rate_limited");
        assert!(r.header("retry-after").is_some());
        assert_eq!(r.header("connection"), Some("close"));
        assert_closed_cleanly(&mut conn);
    }
    assert_eq!(
        daemon.wait_metric(
            "lavd_http_requests_total{route=\"unrouted\",status=\"429\"}",
            f64::from(trials)
        ),
        f64::from(trials)
    );
    // A request without a body keeps its keep-alive connection.
    let mut conn = client.connect().unwrap();
    let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
    r.assert_error(429, "rate_limited");
    assert_eq!(r.header("connection"), None);
    conn.request("GET", "/v1/keys", &[], None)
        .unwrap()
        .assert_error(429, "rate_limited");
}

/// The client from the report: Python's `http.client` over `ssl`, no
/// `Expect`, posting 8 MiB (standard library only).
#[test]
fn python_http_client_posting_8_mib_reads_the_413() {
    let (t, pki, daemon) = start("max_body_bytes = 1048576");
    let (cert, key) = pki.clients.identity(AGENCY).pem();
    pki.write("py-client.pem", &cert);
    pki.write("py-client.key", &key);
    pki.write("py-ca.pem", &pki.servers.pem());
    let script = r#"
import http.client, json, ssl, sys
port, ca, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
conn.request("POST", "/v1/unwrap", body=b" " * (8 << 20),
             headers={"content-type": "application/json"})
r = conn.getresponse()
print(r.status, json.loads(r.read())["error"]["code"])
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(daemon.api.port().to_string())
        .arg(path_str(&t.path("tls/py-ca.pem")))
        .arg(path_str(&t.path("tls/py-client.pem")))
        .arg(path_str(&t.path("tls/py-client.key")))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "413 body_too_large"
    );
}

/// Request bodies held at once are bounded over all connections
/// (`[limits] max_body_bytes_in_flight`): a body that does not fit beside
/// those being read or served is refused at once, unread, with 503
/// `server_busy` and `Retry-After`, and drained; the bytes come back once
/// the request holding them is answered (its body freed). Revocations have
/// a budget of their own. Before, 1,024 connections could each make the daemon hold
/// `max_body_bytes`.
#[test]
fn a_body_beyond_max_body_bytes_in_flight_is_503_server_busy_until_others_are_answered() {
    let (_t, pki, daemon) = start("max_body_bytes = 65536\nmax_body_bytes_in_flight = 100000");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(AGENCY)));
    let held = "lavd_request_body_bytes_held";
    let wait = std::time::Duration::from_secs(10);
    assert_eq!(daemon.metric(held), 0.0);

    // A slow sender declares 60,000 bytes and sends six.
    let mut slow = client.connect().unwrap();
    slow.send(
        b"POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/json\r\ncontent-length: 60000\r\n\r\n{\"x\":1",
    )
    .unwrap();
    softhsm_tests::eventually("the slow body's bytes to be held", wait, || {
        daemon.metric(held) == 60000.0
    });

    // 50,000 more do not fit: answered at once, the body unread, drained.
    let mut conn = client.connect().unwrap();
    let r = conn
        .request("POST", "/v1/unwrap", &[], Some(&vec![b' '; 50000]))
        .expect("the whole body is written and the answer read");
    let message = r.assert_error(503, "server_busy");
    assert!(
        message.contains("max_body_bytes_in_flight") && message.contains("100000"),
        "{message}"
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed_cleanly(&mut conn);
    // 40,000 fit beside the slow one: read, then refused as not JSON.
    client
        .request("POST", "/v1/unwrap", Some(&vec![b' '; 40000]))
        .unwrap()
        .assert_error(400, "malformed_request");
    assert_eq!(daemon.metric(held), 60000.0);
    // Revocations have a budget of their own, which unwraps cannot crowd
    // out: 50,000 bytes there are read (then refused: not JSON, so read as
    // the one form a caller without the admin role may send, an
    // authority's revocation, whose parse says where it ended).
    let message = client
        .request("POST", "/v1/warrants/revocations", Some(&vec![b' '; 50000]))
        .unwrap()
        .assert_error(400, "malformed_request");
    assert!(message.contains("column 50000"), "{message}");

    // The slow body ends and is answered: its bytes are back, and 50,000
    // fit.
    slow.send(&vec![b' '; 60000 - 6]).unwrap();
    slow.read_response()
        .unwrap()
        .assert_error(400, "malformed_request");
    softhsm_tests::eventually("the slow body's bytes to come back", wait, || {
        daemon.metric(held) == 0.0
    });
    client
        .request("POST", "/v1/unwrap", Some(&vec![b' '; 50000]))
        .unwrap()
        .assert_error(400, "malformed_request");
    assert_eq!(
        daemon.metric("lavd_http_requests_total{route=\"unrouted\",status=\"503\"}"),
        1.0
    );
}

/// Any role may post a revocation (an authority's may come through
/// anyone), so the caller about to be revoked could hold the revocations'
/// whole body budget with slow bodies. The admin's revocations have a
/// budget of their own (`max_body_bytes`): they are read and applied while
/// the agency holds every byte of the other, and only the admin's own
/// bodies can fill it. Before, the admin's revocation was 503
/// `server_busy` too.
#[test]
fn the_caller_a_revocation_would_revoke_cannot_crowd_out_the_admins() {
    const ADMIN: &str = "spiffe://ops.example/admin";
    const REVOCATIONS: &str = "/v1/warrants/revocations";
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{AGENCY}\" = [\"agency\"]\n\"{ADMIN}\" = [\"admin\"]\n\
         [limits]\nmax_body_bytes = 65536\nmax_body_bytes_in_flight = 100000\n"
    )));
    let daemon = Daemon::start(&t);
    let agency = pki.client(daemon.api, Some(&pki.clients.identity(AGENCY)));
    let admin = pki.client(daemon.api, Some(&pki.clients.identity(ADMIN)));
    let held = "lavd_request_body_bytes_held";
    let wait = std::time::Duration::from_secs(10);
    let slow = |client: &softhsm_tests::server::Client, length: usize| {
        let mut conn = client.connect().unwrap();
        conn.send(
            format!(
                "POST {REVOCATIONS} HTTP/1.1\r\nhost: localhost\r\n\
                 content-type: application/json\r\ncontent-length: {length}\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .unwrap();
        conn
    };

    // The agency holds the revocations' budget: 2 × 50,000 of 100,000.
    let first = slow(&agency, 50000);
    let _second = slow(&agency, 50000);
    softhsm_tests::eventually("the agency's bodies to be held", wait, || {
        daemon.metric(held) == 100000.0
    });
    let message = agency
        .request("POST", REVOCATIONS, Some(&[b' '; 100]))
        .unwrap()
        .assert_error(503, "server_busy");
    assert!(
        message.contains("limits.max_body_bytes_in_flight, 100000 bytes"),
        "{message}"
    );

    // The admin's revocation is read and applied all the same.
    let revocation = br#"{"id":"W-CROWDED","reason":"quashed"}"#;
    let r = admin
        .request("POST", REVOCATIONS, Some(revocation))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // The admin's budget is max_body_bytes: a slow admin body of that size
    // fills it, and only then is the admin's next one 503.
    let _admins = slow(&admin, 65536);
    softhsm_tests::eventually("the admin's body to be held", wait, || {
        daemon.metric(held) == 165536.0
    });
    let message = admin
        .request("POST", REVOCATIONS, Some(revocation))
        .unwrap()
        .assert_error(503, "server_busy");
    assert!(
        message.contains("limits.max_body_bytes, 65536 bytes"),
        "{message}"
    );
    // What does not fit the admin's budget takes from the revocations'
    // when it has room (helper-220's 4: one chunked admin body, counted as
    // max_body_bytes, would otherwise hold back every other).
    drop(first);
    softhsm_tests::eventually("the agency's first body to be let go", wait, || {
        daemon.metric(held) == 115536.0
    });
    let r = admin
        .request("POST", REVOCATIONS, Some(revocation))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}
