//! The life of `lavd serve`: SIGTERM drains in-flight requests and exits 0,
//! a stuck request cannot hold the shutdown past the grace period, SIGHUP
//! still reloads while it drains, a second stop signal cuts it short, and a
//! bad start exits with the right code.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use softhsm_tests::server::{serve_config, set_read_timeout, Daemon, Pki};
use softhsm_tests::{assert_fails_with, TestToken};

const PROVIDER: &str = "spiffe://provider.example/mail";

fn start(grace_secs: u64) -> (TestToken, Pki, Daemon) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(
        &serve_config(&format!("[roles]\n\"{PROVIDER}\" = [\"provider\"]\n")).replace(
            "shutdown_grace_secs = 10",
            &format!("shutdown_grace_secs = {grace_secs}"),
        ),
    );
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    (t, pki, daemon)
}

/// The head of a request whose 10-byte body is still to come: the only way
/// to hold a request in flight from outside. A route that reads a body,
/// and that the caller (a provider) may reach: any role may post a
/// revocation (the body decides whether it is one).
const SLOW_HEAD: &[u8] = b"POST /v1/warrants/revocations HTTP/1.1\r\nhost: localhost\r\n\
    content-type: application/json\r\ncontent-length: 10\r\n\r\n{\"a\":";

/// Waits until the daemon has read [`SLOW_HEAD`] and holds its body's 10
/// bytes: a stop signal before then would find no request in flight (a
/// connection still in its handshake, or with no byte of a head read, is
/// closed, not drained). Before, a fixed 300 ms sleep stood for this.
fn head_taken(daemon: &Daemon) {
    softhsm_tests::eventually("the slow head read", Duration::from_secs(10), || {
        daemon.metric("lavd_request_body_bytes_held") == 10.0
    });
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let (_t, pki, mut daemon) = start(30);
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let mut idle = client.connect().unwrap();
    assert_eq!(
        idle.request("GET", "/v1/keys", &[], None).unwrap().status,
        200
    );
    let mut slow = client.connect().unwrap();
    slow.send(SLOW_HEAD).unwrap();
    head_taken(&daemon);

    daemon.signal(Signal::TERM);
    daemon.expect_notify("STOPPING=1");

    // Draining: not ready, no new connections, idle ones closed at once.
    let r = daemon.wait_readyz(503);
    assert_eq!(r.json()["draining"], true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(daemon.api).is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(idle.closed_within(Duration::from_secs(5)));
    assert!(daemon
        .wait_exit_or_running(Duration::from_millis(500))
        .is_none());

    // The in-flight request completes normally: its answer (no admin and
    // no authority's JWS) comes.
    slow.send(b"\"bc\"}").unwrap();
    let r = slow.read_response().unwrap();
    r.assert_error(403, "forbidden");

    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr());
}

#[test]
fn a_stuck_request_cannot_hold_the_shutdown_past_the_grace() {
    let (_t, pki, mut daemon) = start(1);
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let mut stuck = client.connect().unwrap();
    stuck.send(SLOW_HEAD).unwrap();
    head_taken(&daemon);

    let started = Instant::now();
    daemon.signal(Signal::TERM);
    let status = daemon.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr());
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(
        daemon.stderr().contains("grace period over"),
        "{}",
        daemon.stderr()
    );
    set_read_timeout(&mut stuck, Duration::from_secs(2));
    assert!(stuck.read_response().is_err());
}

/// While the drain waits for requests in flight, SIGHUP still reloads
/// (they are decided under the newest configuration: a CRL, a role
/// withdrawn), and a second stop signal cuts the drain short.
#[test]
fn a_reload_applies_while_draining_and_a_second_signal_cuts_it_short() {
    let (_t, pki, mut daemon) = start(60);
    let client = pki.client(daemon.api, Some(&pki.clients.identity(PROVIDER)));
    let mut stuck = client.connect().unwrap();
    stuck.send(SLOW_HEAD).unwrap();
    head_taken(&daemon);

    daemon.signal(Signal::TERM);
    let stopping = daemon.expect_notify("STOPPING=1");
    // The 60 s grace, the HSM's 5 s call timeout and 10 s more, so that
    // systemd does not kill the drain or what it cut.
    assert!(
        stopping
            .lines()
            .any(|l| l == "EXTEND_TIMEOUT_USEC=75000000"),
        "{stopping}"
    );
    daemon.signal(Signal::HUP);
    assert_eq!(
        daemon.wait_metric("lavd_config_reloads_total{outcome=\"ok\"}", 1.0),
        1.0,
        "{}",
        daemon.stderr()
    );
    let started = Instant::now();
    daemon.signal(Signal::INT);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        daemon.stderr().contains("second signal"),
        "{}",
        daemon.stderr()
    );
}

#[test]
fn a_bad_start_exits_64_for_config_and_1_for_a_busy_port() {
    let t = TestToken::new();
    let pki = Pki::new(&t);

    // No [tls] table.
    t.write_config("");
    let stderr = assert_fails_with(&t.lavd_with_config(&["serve"]), 64, "bad_config");
    assert!(stderr.contains(": tls: "), "{stderr}");

    // A client CA bundle that does not exist.
    t.write_config(&serve_config("").replace("tls/clients.pem", "tls/nope.pem"));
    let stderr = assert_fails_with(&t.lavd_with_config(&["serve"]), 64, "bad_config");
    assert!(stderr.contains("tls.client_cas"), "{stderr}");

    // A key that is not the certificate's.
    let (_, other_key) = pki.servers.server().pem();
    pki.write("other.key", &other_key);
    t.write_config(&serve_config("").replace("tls/server.key", "tls/other.key"));
    let stderr = assert_fails_with(&t.lavd_with_config(&["serve"]), 64, "bad_config");
    assert!(stderr.contains("tls.key"), "{stderr}");

    // No audit signing key on the token: nothing could be audited.
    t.write_config(&serve_config(""));
    let stderr = assert_fails_with(&t.lavd_with_config(&["serve"]), 1, "no_audit_key");
    assert!(stderr.contains("generate-audit"), "{stderr}");
    softhsm_tests::assert_ok(&t.lavd_with_config(&["keys", "generate-audit"]));

    // The API port is taken.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    t.write_config(&serve_config("").replace(
        "listen = \"127.0.0.1:0\"\nshutdown",
        &format!("listen = \"127.0.0.1:{port}\"\nshutdown"),
    ));
    let stderr = assert_fails_with(&t.lavd_with_config(&["serve"]), 1, "cannot_listen");
    assert!(stderr.contains(&port.to_string()), "{stderr}");
    drop(busy);

    // A PIN the token refuses: exit 77, which the shipped units do not
    // restart (each try would spend one of the token's PIN attempts). Once,
    // so that the token's counter is not run down.
    t.write_config(&serve_config(""));
    let pin = std::fs::read_to_string(t.path("pin")).unwrap();
    std::fs::write(t.path("pin"), "0000\n").unwrap();
    let stderr = assert_fails_with(&t.lavd_with_config(&["serve"]), 77, "hsm_login_refused");
    assert!(stderr.contains("CKR_PIN_INCORRECT"), "{stderr}");
    std::fs::write(t.path("pin"), pin).unwrap();
    softhsm_tests::assert_ok(&t.lavd_with_config(&["keys", "list"]));
}

/// The soft limit on open files is raised to the hard one at start (a
/// container runtime starts it at 1024, below the default
/// `max_connections` and what the daemon holds beside them), and a limit
/// that cannot hold them is said.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "[roles]\n\"{PROVIDER}\" = [\"provider\"]\n"
    )));
    let soft_and_hard = |pid: u32| -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_string();
        let mut words = line.split_whitespace().skip(3);
        (
            words.next().unwrap().to_string(),
            words.next().unwrap().to_string(),
        )
    };
    // Started with a soft limit of 512 under a hard one of up to 4096 (no
    // more than this process's own: raising a hard limit needs a
    // privilege).
    let own_hard: u64 = soft_and_hard(std::process::id()).1.parse().unwrap_or(4096);
    let hard = own_hard.min(4096);
    assert!(hard > 512, "this process's hard limit is {own_hard}");
    let nofile = format!("--nofile=512:{hard}");
    let daemon = Daemon::start_under(&t, &["prlimit", &nofile, "--"]);
    assert_eq!(
        soft_and_hard(daemon.pid()),
        (hard.to_string(), hard.to_string()),
        "{}",
        daemon.stderr()
    );
    drop(daemon);
    // A hard limit below the 1024 connections allowed and what goes with
    // them: it serves, and says so.
    let daemon = Daemon::start_under(&t, &["prlimit", "--nofile=512:1024", "--"]);
    assert_eq!(soft_and_hard(daemon.pid()).0, "1024");
    assert!(
        daemon
            .stderr()
            .contains("the open files limit is below the connections allowed"),
        "{}",
        daemon.stderr()
    );
}
