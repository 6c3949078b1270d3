//! Whole-request refusals from a real `lavd serve`: every one in the
//! PROTOCOL error shape `{"error":{"code","message"}}` with its exact status
//! and code, never warp's default text.

use softhsm_tests::server::{serve_config, Daemon, Pki, TlsConn};
use softhsm_tests::TestToken;

const AGENCY: &str = "spiffe://agency.example/lea";
const PROVIDER: &str = "spiffe://provider.example/mail";

struct Setup {
    _t: TestToken,
    pki: Pki,
    daemon: Daemon,
    agency: TlsConn,
    provider: TlsConn,
}

fn setup() -> Setup {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{AGENCY}\" = [\"agency\"]\n\"{PROVIDER}\" = [\"provider\"]\n\
         [limits]\nmax_body_bytes = 1024\n"
    )));
    let daemon = Daemon::start(&t);
    let agency = pki
        .client(daemon.api, Some(&pki.clients.identity(AGENCY)))
        .connect()
        .unwrap();
    let provider = pki
        .client(daemon.api, Some(&pki.clients.identity(PROVIDER)))
        .connect()
        .unwrap();
    Setup {
        _t: t,
        pki,
        daemon,
        agency,
        provider,
    }
}

#[test]
fn an_oversized_body_is_413_body_too_large() {
    let mut s = setup();
    let big = vec![b' '; 2000];
    let r = s
        .agency
        .request("POST", "/v1/unwrap", &[], Some(&big))
        .unwrap();
    let message = r.assert_error(413, "body_too_large");
    assert!(message.contains("1024"), "{message}");

    // Without a content-length (chunked), the limit holds while reading.
    let mut s = setup();
    let chunk = format!("{:x}\r\n{}\r\n", 600, " ".repeat(600));
    let head = "POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(chunk.as_bytes());
    bytes.extend_from_slice(chunk.as_bytes());
    bytes.extend_from_slice(b"0\r\n\r\n");
    s.agency.send(&bytes).unwrap();
    s.agency
        .read_response()
        .unwrap()
        .assert_error(413, "body_too_large");
}

#[test]
fn malformed_json_on_a_post_route_is_400() {
    let mut s = setup();
    for body in [
        &b"{\"warrant\":"[..],
        b"{} {}",
        b"not json",
        b"",
        b"\xff\xfe",
        // An unknown member, a duplicate one, a missing one (PROTOCOL's
        // conventions: parsers reject unknown fields and duplicate keys).
        b"{\"warrant\":{},\"envelopes\":[{}],\"extra\":1}",
        b"{\"warrant\":{},\"envelopes\":[{}],\"envelopes\":[{}]}",
        b"{\"warrant\":{},\"warrant\":{},\"envelopes\":[{}]}",
        b"{\"envelopes\":[{}]}",
    ] {
        let r = s
            .agency
            .request("POST", "/v1/unwrap", &[], Some(body))
            .unwrap();
        let message = r.assert_error(400, "malformed_request");
        // The member at fault is named (serde's message for an unknown
        // field lists the expected ones too, so `extra` is the telling one).
        let at_fault = if body.ends_with(b"\"extra\":1}") {
            Some("unknown field `extra`")
        } else if body.starts_with(b"{\"warrant\":{},\"envelopes\":[{}],\"envelopes") {
            Some("duplicate field `envelopes`")
        } else if body.starts_with(b"{\"warrant\":{},\"warrant") {
            Some("duplicate field `warrant`")
        } else if body.starts_with(b"{\"envelopes") {
            Some("missing field `warrant`")
        } else {
            None
        };
        if let Some(named) = at_fault {
            assert!(message.contains(named), "{message}");
        }
    }
    // A well-formed request gets past the role check and the parser to the
    // warrant check, on the same connection.
    let r = s
        .agency
        .request(
            "POST",
            "/v1/unwrap",
            &[],
            Some(b"{\"warrant\":{},\"envelopes\":[{}]}"),
        )
        .unwrap();
    r.assert_error(400, "malformed_warrant");
}

#[test]
fn unknown_routes_are_404_and_wrong_methods_405() {
    let mut s = setup();
    for path in ["/", "/v2/keys", "/v1/keys/extra", "/v1/nothing", "/healthz"] {
        let r = s.provider.request("GET", path, &[], None).unwrap();
        let message = r.assert_error(404, "not_found");
        assert!(!message.contains(path), "{message}");
    }
    for (method, path, allow) in [
        ("POST", "/v1/keys", "GET"),
        ("DELETE", "/v1/keys", "GET"),
        ("GET", "/v1/unwrap", "POST"),
        ("PUT", "/v1/warrants/revocations", "POST"),
        ("POST", "/v1/log/tile/0/000", "GET"),
    ] {
        let r = s.provider.request(method, path, &[], None).unwrap();
        r.assert_error(405, "method_not_allowed");
        // RFC 9110 §15.5.6: a 405 names the methods the resource takes.
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
    assert_eq!(
        s.daemon.wait_metric(
            "lavd_http_requests_total{route=\"unmatched\",status=\"404\"}",
            5.0
        ),
        5.0
    );
    // One name per resource: a trailing slash names none.
    for path in ["/v1/keys/", "/v1/audit/checkpoint/"] {
        let r = s.provider.request("GET", path, &[], None).unwrap();
        r.assert_error(404, "not_found");
    }
    // Counted as unmatched routes, as the unknown paths above.
    assert_eq!(
        s.daemon.wait_metric(
            "lavd_http_requests_total{route=\"unmatched\",status=\"404\"}",
            7.0
        ),
        7.0
    );
    // A route that takes no query parameters refuses them, as the routes
    // that take some refuse unknown ones: no filter seems to have worked.
    let r = s
        .provider
        .request("GET", "/v1/keys?kid=2026-11", &[], None)
        .unwrap();
    let message = r.assert_error(400, "malformed_request");
    assert!(message.contains("no query parameters"), "{message}");
    assert_eq!(
        s.provider
            .request("GET", "/v1/keys", &[], None)
            .unwrap()
            .status,
        200
    );
}

#[test]
fn role_checks_come_before_the_body_is_parsed() {
    let mut s = setup();
    // A provider sending garbage to the agency endpoint learns only that it
    // may not use it.
    let r = s
        .provider
        .request("POST", "/v1/unwrap", &[], Some(b"garbage"))
        .unwrap();
    r.assert_error(403, "forbidden");
    // With a query the route does not take, too: the role is checked
    // before the query, on every route (not 400 `malformed_request` on the
    // routes that take no query and 403 on those that do).
    // (On a new connection: a refusal before the body closes the first.)
    s.pki
        .client(s.daemon.api, Some(&s.pki.clients.identity(PROVIDER)))
        .connect()
        .unwrap()
        .request("POST", "/v1/unwrap?x=1", &[], Some(b"garbage"))
        .unwrap()
        .assert_error(403, "forbidden");
    for path in [
        "/v1/audit/checkpoint",
        "/v1/audit/entries?start=0&end=1",
        "/v1/audit/checkpoint?x=1",
        "/v1/audit/key?x=1",
        "/v1/audit/entries?x=1",
        "/v1/log/checkpoint?x=1",
        "/v1/log/tile/0/000?x=1",
        "/v1/log/tile/entries/000?x=1",
    ] {
        s.agency
            .request("GET", path, &[], None)
            .unwrap()
            .assert_error(403, "forbidden");
    }
    s.agency
        .request("POST", "/v1/warrants/revocations", &[], Some(b"{}"))
        .unwrap()
        .assert_error(403, "forbidden");
    // A body that is not JSON at all is answered as the one form any
    // caller may send, an authority's revocation, whose parse names what
    // is wrong: not 403 for a role the caller would not need. Before, a
    // stray brace after an authority's revocation said "needs the admin
    // role".
    for (body, named) in [
        (
            &br#"{"revocation": {"payload": "e30", "signatures": []}}}"#[..],
            "trailing",
        ),
        (&br#"{"revocation": "#[..], "EOF"),
        (&b"revoke W-1"[..], "expected"),
    ] {
        let message = s
            .agency
            .request("POST", "/v1/warrants/revocations", &[], Some(body))
            .unwrap()
            .assert_error(400, "malformed_request");
        assert!(message.contains(named), "{message}");
    }
    assert_eq!(
        s.daemon.wait_metric(
            "lavd_http_requests_total{route=\"/v1/unwrap\",status=\"403\"}",
            2.0
        ),
        2.0
    );
}

/// A caller that may not reach the route it posts to is answered at once,
/// without the body being waited for: a provider posting to `/v1/unwrap`,
/// or an identity with no role posting anywhere, declares a body and sends
/// none, and gets 403 `forbidden` (not 408 once `body_read_timeout` is
/// out, with a buffer held meanwhile), and the connection is closed.
#[test]
fn a_caller_who_may_not_post_there_is_refused_before_its_body() {
    const NOBODY: &str = "spiffe://provider.example/nobody";
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
    )));
    let daemon = Daemon::start(&t);
    for (identity, path) in [
        (PROVIDER, "/v1/unwrap"),
        (NOBODY, "/v1/unwrap"),
        (NOBODY, "/v1/warrants/revocations"),
    ] {
        let mut conn = pki
            .client(daemon.api, Some(&pki.clients.identity(identity)))
            .connect()
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             content-length: 500000\r\n\r\n"
        );
        let started = std::time::Instant::now();
        conn.send(head.as_bytes()).unwrap();
        let r = conn.read_response().unwrap();
        r.assert_error(403, "forbidden");
        assert_eq!(r.header("connection"), Some("close"), "{identity} {path}");
        // The default body_read_timeout is 30 s.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{identity} {path}: {:?}",
            started.elapsed()
        );
    }
    // A body on a route that takes none: the answer comes, and the body is
    // not read as a next request (the connection closes).
    let mut conn = pki
        .client(daemon.api, Some(&pki.clients.identity(PROVIDER)))
        .connect()
        .unwrap();
    let r = conn.request("POST", "/v1/keys", &[], Some(b"{}")).unwrap();
    r.assert_error(405, "method_not_allowed");
    assert_eq!(r.header("connection"), Some("close"));
}

/// A body must be sent as `application/json`. An HTML form can post
/// `text/plain` across sites without a CORS preflight, from a browser that
/// holds the admin's client certificate; its text can be exactly the JSON
/// of a revocation. Refused: 415 `unsupported_media_type`, and nothing is
/// revoked; the same body as JSON is taken (any case, with parameters),
/// but not JSON declared in a charset other than UTF-8, nor a request with
/// two content types.
#[test]
fn a_body_not_sent_as_json_is_415_and_does_nothing() {
    const ADMIN: &str = "spiffe://ops.example/admin";
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{ADMIN}\" = [\"admin\"]\n\"{AGENCY}\" = [\"agency\"]\n"
    )));
    let daemon = Daemon::start(&t);
    let mut admin = pki
        .client(daemon.api, Some(&pki.clients.identity(ADMIN)))
        .connect()
        .unwrap();
    // What `<form enctype="text/plain">` with the field name
    // `{"id":"W-CSRF","reason":"x` and the value `"}` sends.
    let body = b"{\"id\":\"W-CSRF\",\"reason\":\"x=\"}\r\n";
    let post = |conn: &mut TlsConn, path: &str, content_type: Option<&str>| {
        let mut head = format!("POST {path} HTTP/1.1\r\nhost: localhost\r\n");
        if let Some(t) = content_type {
            head.push_str(&format!("content-type: {t}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        conn.send(&bytes).unwrap();
        conn.read_response().unwrap()
    };
    for t in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonx"),
        // JSON declared in another encoding, two content types, and a
        // value that is not visible ASCII (before: 400, warp's parse).
        Some("application/json; charset=utf-16"),
        Some("application/json\r\ncontent-type: text/plain"),
        Some("application/json; x=\u{e9}"),
        None,
    ] {
        let message = post(&mut admin, "/v1/warrants/revocations", t)
            .assert_error(415, "unsupported_media_type");
        assert!(message.contains("application/json"), "{message}");
    }
    // The unwrap route too.
    let mut agency = pki
        .client(daemon.api, Some(&pki.clients.identity(AGENCY)))
        .connect()
        .unwrap();
    post(&mut agency, "/v1/unwrap", Some("text/plain")).assert_error(415, "unsupported_media_type");

    // Nothing was revoked: the first JSON revocation is the new one.
    let r = post(
        &mut admin,
        "/v1/warrants/revocations",
        Some("Application/JSON; charset=utf-8"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revoked"], true, "{}", r.text());
    assert_eq!(r.json()["already_revoked"], false, "{}", r.text());
    // No warrant of that id was ever presented: recorded, and said so.
    assert_eq!(r.json()["warrant_seen"], false, "{}", r.text());
}
