//! Per-identity rate limiting: an identity past its burst gets 429
//! `rate_limited` with `Retry-After`, on any connection; other identities
//! are not affected.

use softhsm_tests::server::{serve_config, uri, Daemon, Pki};
use softhsm_tests::TestToken;

const NOISY: &str = "spiffe://provider.example/noisy";
const QUIET: &str = "spiffe://provider.example/quiet";

#[test]
fn an_identity_past_its_burst_gets_429_and_others_do_not() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    // One token every 100 s: the burst cannot refill during the test.
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{NOISY}\" = [\"provider\"]\n\"{QUIET}\" = [\"provider\"]\n\
         [limits]\nrate_limit_per_second = 0.01\nrate_limit_burst = 3\n"
    )));
    let daemon = Daemon::start(&t);
    let noisy = pki.client(daemon.api, Some(&pki.clients.identity(NOISY)));
    let mut conn = noisy.connect().unwrap();
    for _ in 0..3 {
        assert_eq!(
            conn.request("GET", "/v1/keys", &[], None).unwrap().status,
            200
        );
    }
    let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((90..=100).contains(&retry), "retry-after {retry}");

    // A new connection of the same identity shares its bucket.
    noisy.get("/v1/keys").assert_error(429, "rate_limited");
    // Refused requests do not reach the routes, whatever they ask for.
    noisy
        .request("POST", "/v1/unwrap", Some(b"{}"))
        .unwrap()
        .assert_error(429, "rate_limited");

    let quiet = pki.client(daemon.api, Some(&pki.clients.identity(QUIET)));
    assert_eq!(quiet.get("/v1/keys").status, 200);
    assert_eq!(
        daemon.wait_metric(
            "lavd_http_requests_total{route=\"unrouted\",status=\"429\"}",
            3.0
        ),
        3.0
    );
}

/// A certificate without exactly one URI SAN has no identity to rate-limit
/// by: its request is answered 403 `invalid_client_identity` and the
/// connection is closed, so that each further try costs a handshake (and
/// counts against the connection limit). Before, the connection stayed
/// open for as many unthrottled 403s as the client liked.
#[test]
fn a_certificate_without_an_identity_gets_its_connection_closed() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{NOISY}\" = [\"provider\"]\n"
    )));
    let daemon = Daemon::start_logging(&t, "info");
    let two = pki.clients.client(vec![uri(NOISY), uri(QUIET)]);
    let mut conn = pki.client(daemon.api, Some(&two)).connect().unwrap();
    let r = conn.request("GET", "/v1/keys", &[], None).unwrap();
    r.assert_error(403, "invalid_client_identity");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(conn.closed_within(std::time::Duration::from_secs(5)));

    // Anyone with such a certificate can connect again and again: the
    // line saying so is written at most once a second, like a failed
    // handshake's, while the metric counts every connection.
    const AGAIN: usize = 30;
    let started = std::time::Instant::now();
    for _ in 0..AGAIN {
        pki.client(daemon.api, Some(&two)).connect().unwrap();
    }
    let seconds = started.elapsed().as_secs() as usize;
    let all = (AGAIN + 1) as f64;
    let series = "lavd_tls_handshake_failures_total{reason=\"several_uri_sans\"}";
    assert_eq!(daemon.wait_metric(series, all), all);
    // The line follows the metric.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let lines = daemon
        .stderr()
        .lines()
        .filter(|l| l.contains("client certificate names no identity"))
        .count();
    assert!(
        (1..=seconds + 2).contains(&lines),
        "{lines} lines for {} connections in {seconds} s",
        AGAIN + 1
    );
}

/// A client past its limit can ask for 429s as fast as it can send; the
/// daemon writes at most one request line of them a second, and the next
/// line it writes counts those it left out. Every 429 is either a line or
/// in such a count, so nothing is lost from the log's account.
#[test]
fn rate_limited_requests_are_logged_one_line_a_second_with_a_count() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{NOISY}\" = [\"provider\"]\n\
         [limits]\nrate_limit_per_second = 0.01\nrate_limit_burst = 1\n"
    )));
    let daemon = Daemon::start_logging(&t, "info");
    let noisy = pki.client(daemon.api, Some(&pki.clients.identity(NOISY)));
    let mut conn = noisy.connect().unwrap();
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    const REFUSED: usize = 40;
    let started = std::time::Instant::now();
    for _ in 0..REFUSED {
        conn.request("GET", "/v1/keys", &[], None)
            .unwrap()
            .assert_error(429, "rate_limited");
    }
    let spent = started.elapsed();
    // After the window, one more: its line carries the count of the rest.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    conn.request("GET", "/v1/keys", &[], None)
        .unwrap()
        .assert_error(429, "rate_limited");
    assert_eq!(
        daemon.wait_metric(
            "lavd_http_requests_total{route=\"unrouted\",status=\"429\"}",
            (REFUSED + 1) as f64,
        ),
        (REFUSED + 1) as f64
    );

    let stderr = daemon.stderr();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("status=429"))
        .collect();
    let left_out: usize = lines
        .iter()
        .filter_map(|l| l.split("rate_limited_left_out=").nth(1))
        .map(|v| {
            v.split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    // A line for the first 429 of each one-second window the 40 crossed,
    // and one for the last after its own window: 40 requests on one
    // kept-alive connection take far less than a second here, but a
    // loaded host may take longer (a window more each second).
    let windows = usize::try_from(spent.as_secs()).unwrap() + 1;
    assert!(
        (2..=windows + 2).contains(&lines.len()),
        "{} lines for 40 requests in {spent:?}: {lines:#?}",
        lines.len()
    );
    assert!(
        lines.last().unwrap().contains("rate_limited_left_out="),
        "{lines:#?}"
    );
    assert_eq!(lines.len() + left_out, REFUSED + 1, "{lines:#?}");
}
