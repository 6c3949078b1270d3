//! Connection-level limits of `lavd serve`: the TLS handshake, request-head
//! and keep-alive idle deadlines, and the cap on simultaneous connections.

use std::io::Read as _;
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::TestToken;

const PROVIDER: &str = "spiffe://provider.example/mail";

fn start(limits: &str) -> (TestToken, Pki, Daemon) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{PROVIDER}\" = [\"provider\"]\n[limits]\n{limits}"
    )));
    let daemon = Daemon::start(&t);
    (t, pki, daemon)
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let (_t, pki, daemon) = start("idle_timeout_secs = 1\nheader_read_timeout_secs = 30\n");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let mut conn = client.connect().unwrap();
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    let started = Instant::now();
    assert!(conn.closed_within(Duration::from_secs(5)));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

#[test]
fn a_request_head_must_arrive_within_the_header_timeout() {
    let (_t, pki, daemon) = start("idle_timeout_secs = 30\nheader_read_timeout_secs = 1\n");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let mut conn = client.connect().unwrap();
    // A keep-alive connection that is merely idle is not affected ...
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        conn.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    // ... but a head that starts and never ends is cut off.
    conn.send(b"GET /v1/keys HTTP/1.1\r\nhost: loc").unwrap();
    let started = Instant::now();
    assert!(conn.closed_within(Duration::from_secs(5)));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let (_t, _pki, daemon) = start("handshake_timeout_secs = 1\n");
    let mut tcp = TcpStream::connect(daemon.api).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    // The server closes without sending anything.
    assert!(matches!(tcp.read(&mut buf), Ok(0) | Err(_)));
    let took = started.elapsed();
    assert!(
        // Not before the timeout; the upper bound only tells "cut by the
        // timeout" from "never cut" (the read gives up at 5 s), with room
        // for a loaded host.
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(
        daemon.wait_metric(
            "lavd_tls_handshake_failures_total{reason=\"handshake_timeout\"}",
            1.0
        ),
        1.0
    );
}

#[test]
fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let (_t, pki, daemon) = start("max_connections = 1\n");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let mut first = client.connect().unwrap();
    assert_eq!(
        first.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );

    let (tx, rx) = mpsc::channel();
    let second_client = client.clone();
    std::thread::spawn(move || {
        let status = second_client.get("/v1/keys").status;
        let _ = tx.send(status);
    });
    // The second connection is not served while the first holds the slot.
    assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err());
    assert_eq!(daemon.metric("lavd_connections_open"), 1.0);
    drop(first);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 200);
}

#[test]
fn one_address_cannot_hold_every_api_connection() {
    let (_t, pki, daemon) =
        start("max_connections = 8\nmax_connections_per_ip = 2\nhandshake_timeout_secs = 60\n");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    softhsm_tests::server::assert_connections_bounded_per_address(
        &daemon,
        daemon.api,
        2,
        "lavd_tls_handshake_failures_total{reason=\"peer_connection_limit\"}",
        |tcp| match client.connect_over(tcp) {
            Ok(mut conn) => conn
                .request("GET", "/v1/keys", &[], None)
                .map_or(0, |r| r.status),
            Err(_) => 0,
        },
    );
}

#[test]
fn an_oversized_request_head_is_431_and_closes_the_connection() {
    let (_t, pki, daemon) = start("max_header_bytes = 4096\n");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let mut conn = client.connect().unwrap();
    let filler = "a".repeat(8000);
    conn.send(
        format!("GET /v1/keys HTTP/1.1\r\nhost: localhost\r\nx-filler: {filler}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let r = conn.read_response().unwrap();
    // hyper refuses it before any route runs: a bare status, no detail.
    assert_eq!(r.status, 431);
    assert!(r.body.is_empty());
    assert!(conn.closed_within(Duration::from_secs(5)));
    // A normal head on a new connection is served.
    assert_eq!(client.get("/v1/keys").status, 200);
    // A head that is not HTTP/1.1 is also answered by hyper, with 400.
    let mut conn = client.connect().unwrap();
    conn.send(b"GET /v1/keys HTTP/1.1\r\nhost: localhost\r\nno colon here\r\n\r\n")
        .unwrap();
    let r = conn.read_response().unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.is_empty());
    assert!(conn.closed_within(Duration::from_secs(5)));
}

/// The header bound can be raised to its top (1 MiB), past the read buffer
/// hyper keeps by default (400 KiB): a head within it is served.
#[test]
fn a_head_within_the_top_header_bound_is_served() {
    let (_t, pki, daemon) = start("max_header_bytes = 1048576\n");
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let status_for_a_head_of = |filler_bytes: usize| {
        let mut conn = client.connect().unwrap();
        let filler = "a".repeat(filler_bytes);
        conn.send(
            format!("GET /v1/keys HTTP/1.1\r\nhost: localhost\r\nx-filler: {filler}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        conn.read_response().unwrap().status
    };
    assert_eq!(status_for_a_head_of(600 << 10), 200);
    // And one over it is still 431.
    assert_eq!(status_for_a_head_of(1 << 20), 431);
    // A request target over 64 KiB is the HTTP layer's bare 414, whatever
    // the header bound.
    let mut conn = client.connect().unwrap();
    let path = format!("/v1/keys?{}", "a".repeat(70 << 10));
    conn.send(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    let r = conn.read_response().unwrap();
    assert_eq!(r.status, 414);
    assert!(r.body.is_empty());
}

/// A peer that sends requests and never reads the responses cannot keep its
/// connection (and, at `max_connections = 1`, every other client out): once
/// the daemon's writes have waited for the idle timeout, it drops it. (The
/// header timeout, long here, would otherwise end some such connections,
/// depending on where the last read fell.)
#[test]
fn a_peer_that_never_reads_its_responses_is_cut_off() {
    let (_t, pki, daemon) = start(
        "idle_timeout_secs = 1\nheader_read_timeout_secs = 60\nmax_connections = 1\n\
         rate_limit_per_second = 1000000.0\nrate_limit_burst = 1000000\n",
    );
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    // A receive buffer of 4 KiB, set before connecting so that the window
    // the peer advertises stays small: the daemon's writes block early.
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 4096).unwrap();
    rustix::net::connect(&fd, &daemon.api).unwrap();
    let mut hog = client.connect_over(TcpStream::from(fd)).unwrap();
    // About 10 MB of 404 answers (cheap to make), more than the daemon's
    // socket send buffer (up to 4 MiB by default) and the peer's hold.
    let burst = "GET /v1/nothing-here HTTP/1.1\r\nhost: localhost\r\n\r\n".repeat(40_000);
    let writer = std::thread::spawn(move || {
        // Blocks once the daemon stops reading; fails when it is cut off.
        let _ = hog.send(burst.as_bytes());
        hog
    });
    let started = Instant::now();
    let r = client
        .request("GET", "/v1/keys", None)
        .expect("a second client is served once the first is cut off");
    assert_eq!(r.status, 200);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "{took:?}");
    drop(writer.join().unwrap());
}
