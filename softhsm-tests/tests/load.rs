//! `lavd serve` under load (issue 14, "Load"), with the figures printed:
//!
//! - 1,000 idle TLS connections held open while unwraps continue: every
//!   unwrap succeeds, its latency is compared with the same unwraps without
//!   them, and the idle ones are cut by `idle_timeout_secs` as documented;
//! - slow clients, heads and bodies dribbled a byte at a time, cut off by
//!   `header_read_timeout_secs` and `body_read_timeout_secs`;
//! - a bounded mixed stream of valid and invalid requests from several
//!   client processes (`LAVD_LOAD_REQUESTS`, CI default 2,000,
//!   `.ci/long-run` 10,000): no crash, every answer the one its kind must
//!   get, and the daemon's memory flat: RSS read after every tenth of the
//!   stream, its growth over the second half, less what SoftHSM keeps per
//!   call, at most `FLAT_KIB`.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use softhsm_tests::load::{status_kib, Kind, Plan, Tally};
use softhsm_tests::server::{Client, TlsConn};
use softhsm_tests::vault::{self, Vault, TARGET};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

/// One test at a time: each measures time or memory, and the others' load
/// on a 2-core machine would blur its figures.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A [`Vault`] with `limits` and the rate limit off.
fn start(limits: &str) -> Vault {
    Vault::start(&format!(
        "rate_limit_per_second = 1000000\nrate_limit_burst = 1000000\n{limits}"
    ))
}

/// An unwrap body under `warrant` for envelopes `m<n>`.
fn unwrap_body(
    escrow: &lavd::jwk::P256PublicKey,
    warrant: &serde_json::Value,
    refs: &[&str],
    target: &str,
) -> String {
    let time = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let envelopes: Vec<_> = refs
        .iter()
        .map(|r| vault::seal(escrow, "E-1", target, time, r, &[7; 32]))
        .collect();
    serde_json::json!({"warrant": warrant, "envelopes": envelopes}).to_string()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `n` sequential one-envelope unwraps on one keep-alive connection; their
/// latencies, sorted. Each must open its key.
fn timed_unwraps(agency: &Client, body: &str, n: usize) -> Vec<Duration> {
    let mut conn = agency.connect().expect("connect");
    let mut out: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let r = conn
                .request("POST", "/v1/unwrap", &[], Some(body.as_bytes()))
                .expect("unwrap");
            let took = started.elapsed();
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(vault::statuses(&r.json()), ["ok"]);
            took
        })
        .collect();
    out.sort();
    out
}

/// Raises this process's open-file limit to its hard limit (the daemon, a
/// child, inherits it): 1,000 connections need more than the common 1024.
fn raise_fd_limit(need: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft < need {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit).expect("raise RLIMIT_NOFILE");
        let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        assert!(now >= need, "RLIMIT_NOFILE is {now}, {need} needed");
    }
}

const IDLE: usize = 1000;
/// Long enough to open 1,000 connections and time 100 unwraps among them on
/// a loaded 2-core machine (about 10 s there), short enough to wait for.
const IDLE_TIMEOUT_SECS: u64 = 45;

#[test]
fn a_thousand_idle_tls_connections_are_held_while_unwraps_continue() {
    let _serial = serial();
    raise_fd_limit(4 * IDLE as u64);
    // max_connections stays at its default, 1024: the 1,000 idle
    // connections and the unwrapping one all fit, so all are served.
    let Vault {
        daemon,
        pki,
        parties,
        escrow,
        ..
    } = start(&format!("idle_timeout_secs = {IDLE_TIMEOUT_SECS}\n"));
    let c = parties.clients(&pki, daemon.api);
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-IDLE", recipient.public(), 1_000_000));
    let body = unwrap_body(&escrow, &warrant, &["m1"], TARGET);

    // Warm (the first requests of a fresh daemon are slower), then timed.
    timed_unwraps(&c.agency, &body, 20);
    let alone = timed_unwraps(&c.agency, &body, 100);

    // Open the idle connections (handshake done, no request), 4 threads.
    let opening = Instant::now();
    let idle: Vec<(TlsConn, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let provider = c.provider.clone();
                s.spawn(move || {
                    (0..IDLE / 4)
                        .map(|_| {
                            let conn = provider.connect().expect("idle connection");
                            (conn, Instant::now())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("opener"))
            .collect()
    });
    let opened_in = opening.elapsed();
    let first_idle = idle.iter().map(|(_, at)| *at).min().unwrap();
    let last_idle = idle.iter().map(|(_, at)| *at).max().unwrap();
    // The daemon has them all (its handshakes may finish just after ours).
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.metric("lavd_connections_open") < IDLE as f64 {
        assert!(Instant::now() < deadline, "the daemon never held {IDLE}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let among_idle = timed_unwraps(&c.agency, &body, 100);
    let held = daemon.metric("lavd_connections_open");
    let measured_by = first_idle.elapsed();
    assert!(
        measured_by < Duration::from_secs(IDLE_TIMEOUT_SECS - 5),
        "the measurement took {measured_by:?}, too close to the idle timeout"
    );
    // The idle ones were all still open (the unwrapping one has closed).
    assert!(held >= IDLE as f64, "{held} connections open");

    let (p50a, p95a) = (percentile(&alone, 0.5), percentile(&alone, 0.95));
    let (p50i, p95i) = (percentile(&among_idle, 0.5), percentile(&among_idle, 0.95));
    eprintln!(
        "idle connections: {IDLE} opened in {opened_in:?}, {held} open during the unwraps; \
         unwrap latency alone p50 {p50a:?} p95 {p95a:?} max {:?}; \
         among the idle p50 {p50i:?} p95 {p95i:?} max {:?}",
        alone.last().unwrap(),
        among_idle.last().unwrap()
    );
    // Idle connections cost a parked task each, nothing per request: the
    // figures above show it, but speed is the benchmarks' to judge, not a
    // test's (a timed bound here would fail on a busy host). What this
    // test asserts is that the unwraps succeed among the idle connections
    // (`timed_unwraps` checks each) and that those stay open meanwhile.

    // Then each is closed by the idle timeout: not before it, and within
    // it plus the deadline check interval (at most 1 s) and a margin for a
    // loaded machine.
    let cut_by = last_idle + Duration::from_secs(IDLE_TIMEOUT_SECS + 15);
    let mut closed = 0;
    for (mut conn, _) in idle {
        softhsm_tests::server::set_read_timeout(&mut conn, Duration::from_millis(200));
        if conn.closed_within(cut_by.saturating_duration_since(Instant::now())) {
            closed += 1;
        }
    }
    let all_closed_after = first_idle.elapsed();
    eprintln!("idle connections: {closed} of {IDLE} cut by the idle timeout ({IDLE_TIMEOUT_SECS} s), the last {all_closed_after:?} after the first opened");
    assert_eq!(closed, IDLE);
    assert!(all_closed_after >= Duration::from_secs(IDLE_TIMEOUT_SECS));
    assert!(daemon.wait_metric("lavd_connections_open", 0.0) == 0.0);
    // And the daemon serves new clients as before.
    assert_eq!(c.provider.get("/v1/keys").status, 200);
}

/// Sends `bytes` one byte every 100 ms on `conn` until the server answers
/// (returns the answer) or closes (returns None); the time from the first
/// byte.
fn dribble(
    conn: &mut TlsConn,
    bytes: &[u8],
) -> (Option<softhsm_tests::server::Response>, Duration) {
    softhsm_tests::server::set_read_timeout(conn, Duration::from_millis(100));
    let started = Instant::now();
    for b in bytes.iter().cycle() {
        assert!(started.elapsed() < Duration::from_secs(60), "never cut off");
        if conn.send(&[*b]).is_err() {
            return (None, started.elapsed());
        }
        match conn.read_response() {
            Ok(r) => return (Some(r), started.elapsed()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (None, started.elapsed()),
        }
    }
    unreachable!("cycle never ends")
}

#[test]
fn slow_clients_are_cut_off_by_the_timeouts() {
    let _serial = serial();
    let Vault {
        daemon,
        pki,
        parties,
        escrow,
        ..
    } = start("header_read_timeout_secs = 2\nbody_read_timeout_secs = 3\nidle_timeout_secs = 30\n");
    let c = parties.clients(&pki, daemon.api);
    // Deadlines are checked every quarter of the shortest timeout (0.5 s);
    // 3 s more covers that and a loaded machine.
    let margin = Duration::from_secs(3);

    // A head dribbled a byte at a time: the header deadline runs from its
    // first byte, whatever arrives after it; the connection is closed.
    let mut conn = c.agency.connect().unwrap();
    let head = b"POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let (answer, took) = dribble(&mut conn, head);
    assert!(answer.is_none(), "{answer:?}");
    eprintln!("slow head: cut after {took:?} (header_read_timeout_secs = 2)");
    assert!(
        took >= Duration::from_millis(1900) && took <= Duration::from_secs(2) + margin,
        "{took:?}"
    );

    // A body dribbled a byte at a time after a whole head: 408
    // request_timeout at the body deadline, then the connection closes.
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-SLOW", recipient.public(), 10));
    let body = unwrap_body(&escrow, &warrant, &["m1"], TARGET);
    let mut conn = c.agency.connect().unwrap();
    conn.send(
        format!(
            "POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let (answer, took) = dribble(&mut conn, body.as_bytes());
    let answer = answer.expect("a 408 before the connection closes");
    answer.assert_error(408, "request_timeout");
    assert_eq!(answer.header("connection"), Some("close"));
    eprintln!("slow body: 408 after {took:?} (body_read_timeout_secs = 3)");
    assert!(
        took >= Duration::from_millis(2900) && took <= Duration::from_secs(3) + margin,
        "{took:?}"
    );
    softhsm_tests::server::set_read_timeout(&mut conn, Duration::from_millis(200));
    assert!(conn.closed_within(Duration::from_secs(15)));

    // Nothing was spent, and a prompt client is served.
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::from_str(&body).unwrap(),
    );
    assert_eq!(vault::statuses(&r.json()), ["ok"]);
}

/// The load stream's size: `LAVD_LOAD_REQUESTS`, else 2,000.
fn requests() -> u64 {
    match std::env::var("LAVD_LOAD_REQUESTS") {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("LAVD_LOAD_REQUESTS={n:?} is not a number")),
        Err(_) => 2_000,
    }
}

const WORKERS: u64 = 4;

/// The mixed stream runs in tenths, memory read after each.
const TENTHS: u64 = 10;

/// "Flat": over the second half of the mixed stream the daemon's RSS may
/// grow by at most this much (KiB) beyond what SoftHSM keeps per call
/// (below). It covers SQLite's page cache, which may still be filling at CI
/// size (2,000 KiB at most, `cache_size` left at its default), and the
/// allocator taking another chunk. A leak of 300 bytes a request fails the
/// 10,000-request run, one of 30 bytes the 100,000-request one.
const FLAT_KIB: u64 = 1536;
/// What SoftHSM 2.6 keeps of every ECDH derivation (the destroyed session
/// object's shell) and every EdDSA signature (a leak in its `C_SignInit`),
/// in bytes: 240 and 79 measured by `hsm_sessions.rs`, rounded up. The
/// daemon's HSM metrics count the calls.
const SOFTHSM_BYTES_PER_DERIVATION: u64 = 256;
const SOFTHSM_BYTES_PER_SIGNATURE: u64 = 96;

/// The daemon's memory (KiB, from `/proc/<pid>/status`) and its store's
/// size on disk (the database and its WAL).
struct Memory {
    rss: u64,
    /// The heap: malloc's arenas, SQLite's page cache among them.
    anon: u64,
    /// Mapped files: the binary, libraries, SoftHSM.
    file: u64,
    /// Shared memory: SQLite's WAL index (`lavd.db-shm`).
    shmem: u64,
    store_bytes: u64,
    /// ECDH derivations and Ed25519 signatures so far (the daemon's
    /// `lavd_hsm_operation_duration_seconds_count`).
    derivations: u64,
    signatures: u64,
}

impl Memory {
    fn read(daemon: &softhsm_tests::server::Daemon, store: &std::path::Path) -> Self {
        let pid = daemon.pid();
        let calls = |op: &str| {
            daemon.metric(&format!(
                "lavd_hsm_operation_duration_seconds_count{{op=\"{op}\",result=\"ok\"}}"
            )) as u64
        };
        let size = |suffix: &str| {
            let mut path = store.as_os_str().to_owned();
            path.push(suffix);
            std::fs::metadata(path).map_or(0, |m| m.len())
        };
        Memory {
            rss: rss_kib(pid),
            anon: status_kib(pid, "RssAnon"),
            file: status_kib(pid, "RssFile"),
            shmem: status_kib(pid, "RssShmem"),
            store_bytes: size("") + size("-wal"),
            derivations: calls("ecdh_derive"),
            signatures: calls("sign_ed25519"),
        }
    }

    /// What SoftHSM keeps of the HSM calls made between `self` and `later`
    /// (KiB).
    fn softhsm_kib_until(&self, later: &Memory) -> u64 {
        ((later.derivations - self.derivations) * SOFTHSM_BYTES_PER_DERIVATION
            + (later.signatures - self.signatures) * SOFTHSM_BYTES_PER_SIGNATURE)
            / 1024
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The daemon's resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// Runs `per_worker` requests in each of [`WORKERS`] `load-client`
/// processes at once; their tallies merged.
fn run_workers(t: &TestToken, plan: &mut Plan, per_worker: u64, phase: &str) -> Tally {
    let children: Vec<_> = (0..WORKERS)
        .map(|w| {
            plan.requests = per_worker;
            plan.offset = w * 3;
            let path = t.path(&format!("plan-{phase}-{w}.json"));
            std::fs::write(&path, serde_json::to_vec(&plan).unwrap()).unwrap();
            Command::new(softhsm_tests::package_binary("load-client"))
                .arg(&path)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("load-client")
        })
        .collect();
    let mut tally = Tally::default();
    for child in children {
        // A load-client held by a wedged daemon is killed (and fails the
        // test below) rather than waited for without end.
        let _watchdog = softhsm_tests::kill_after(&child, std::time::Duration::from_secs(600));
        let out = child.wait_with_output().expect("load-client");
        assert!(out.status.success(), "a load-client failed: {out:?}");
        tally.merge(serde_json::from_slice(&out.stdout).expect("tally JSON"));
    }
    tally
}

#[test]
fn a_mixed_stream_from_several_processes_gets_every_expected_answer_in_flat_memory() {
    let _serial = serial();
    let total = requests();
    let Vault {
        mut daemon,
        t,
        pki,
        parties,
        escrow,
    } = start("max_body_bytes = 65536\n");
    let started = Instant::now();
    let recipient = vault::recipient();
    let a = softhsm_tests::server::authorities();
    let good = vault::double_lock(&vault::claims("W-LOAD", recipient.public(), 1_000_000));
    let one_signature = softhsm_tests::server::Authorities::sign(
        &vault::claims("W-ONE-SIG", recipient.public(), 10),
        &[&a.executive],
    );
    let now = OffsetDateTime::now_utc();
    let mut claims = vault::claims("W-EXPIRED", recipient.public(), 10);
    claims["not_before"] = vault::at(now, -time::Duration::days(2)).into();
    claims["expires"] = vault::at(now, -time::Duration::hours(1)).into();
    let expired = vault::double_lock(&claims);
    let valid = unwrap_body(&escrow, &good, &["m1"], TARGET);
    let garbage_envelope = serde_json::json!({
        "warrant": good,
        "envelopes": [{"header": "bm90IGEgaGVhZGVy", "enc": "AAAA", "ct": "AAAA"}]
    })
    .to_string();

    let kind = |name: &str,
                party: &str,
                method: &str,
                path: &str,
                body: Option<String>,
                status: u16,
                outcome: &str| Kind {
        name: name.into(),
        party: party.into(),
        method: method.into(),
        path: path.into(),
        body,
        status,
        outcome: outcome.into(),
    };
    let kinds = vec![
        kind(
            "unwrap_ok",
            "agency",
            "POST",
            "/v1/unwrap",
            Some(valid.clone()),
            200,
            "ok",
        ),
        kind(
            "unwrap_other_target",
            "agency",
            "POST",
            "/v1/unwrap",
            Some(unwrap_body(
                &escrow,
                &good,
                &["m2", "m3"],
                "acct:bob@example.com",
            )),
            200,
            "target_not_in_warrant,target_not_in_warrant",
        ),
        kind(
            "bad_envelope",
            "agency",
            "POST",
            "/v1/unwrap",
            Some(garbage_envelope),
            200,
            "malformed_envelope",
        ),
        kind(
            "bad_json",
            "agency",
            "POST",
            "/v1/unwrap",
            Some("{\"warrant\":".into()),
            400,
            "malformed_request",
        ),
        kind(
            "bad_warrant_shape",
            "agency",
            "POST",
            "/v1/unwrap",
            Some("{\"warrant\":{},\"envelopes\":[{}]}".into()),
            400,
            "malformed_warrant",
        ),
        kind(
            "one_signature",
            "agency",
            "POST",
            "/v1/unwrap",
            Some(unwrap_body(&escrow, &one_signature, &["m4"], TARGET)),
            403,
            "policy_not_met",
        ),
        kind(
            "expired_warrant",
            "agency",
            "POST",
            "/v1/unwrap",
            Some(unwrap_body(&escrow, &expired, &["m5"], TARGET)),
            403,
            "warrant_expired",
        ),
        kind(
            "wrong_role",
            "provider",
            "POST",
            "/v1/unwrap",
            Some(valid.clone()),
            403,
            "forbidden",
        ),
        kind(
            "no_role",
            "nobody",
            "GET",
            "/v1/keys",
            None,
            403,
            "forbidden",
        ),
        kind(
            "oversized",
            "agency",
            "POST",
            "/v1/unwrap",
            Some(" ".repeat(70_000)),
            413,
            "body_too_large",
        ),
        kind(
            "unknown_route",
            "agency",
            "GET",
            "/v1/nowhere",
            None,
            404,
            "not_found",
        ),
        kind(
            "wrong_method",
            "agency",
            "GET",
            "/v1/unwrap",
            None,
            405,
            "method_not_allowed",
        ),
        kind("keys", "provider", "GET", "/v1/keys", None, 200, "ok"),
        kind(
            "checkpoint",
            "auditor",
            "GET",
            "/v1/audit/checkpoint",
            None,
            200,
            "ok",
        ),
    ];
    let nobody = pki.clients.identity("spiffe://nobody.example/x");
    let pem = |i: &softhsm_tests::server::Issued| i.pem();
    let mut plan = Plan {
        addr: daemon.api,
        server_ca: pki.servers.pem(),
        parties: BTreeMap::from([
            ("agency".to_string(), pem(&parties.agency)),
            ("provider".to_string(), pem(&parties.provider)),
            ("auditor".to_string(), pem(&parties.auditor)),
            ("nobody".to_string(), pem(&nobody)),
        ]),
        kinds,
        requests: 0,
        offset: 0,
    };

    let pid = daemon.pid();
    let rss_start = rss_kib(pid);
    // Warm-up: the same stream, a tenth of it, so that caches and
    // allocator arenas reach their working size.
    let warm = run_workers(&t, &mut plan, (total / WORKERS / 10).max(50), "warm");
    assert_eq!(warm.unexpected_count, 0, "{:?}", warm.unexpected);

    // The stream in tenths, the daemon's memory read after each (so the
    // series is by requests served, not by time), and every second in
    // between for the peak.
    let per_worker = total / WORKERS / TENTHS;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::SeqCst) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_secs(1));
            }
            peak
        })
    };
    let store = t.path("lavd.db");
    let mut points = vec![Memory::read(&daemon, &store)];
    let run_started = Instant::now();
    let mut tally = Tally::default();
    for tenth in 1..=TENTHS {
        tally.merge(run_workers(
            &t,
            &mut plan,
            per_worker,
            &format!("run{tenth}"),
        ));
        points.push(Memory::read(&daemon, &store));
    }
    let took = run_started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (warmed, mid, last) = (
        &points[0],
        &points[TENTHS as usize / 2],
        &points[TENTHS as usize],
    );
    let (rss_warm, rss_mid, rss_last) = (warmed.rss, mid.rss, last.rss);
    let rss_max = sampler.join().unwrap().max(rss_last);

    eprintln!(
        "mixed stream: {} requests from {WORKERS} processes in {took:?} ({:.0}/s); by status {:?}; \
         unexpected {}; RSS KiB start {rss_start}, after warm-up {rss_warm}, half-way {rss_mid}, \
         last {rss_last}, max {rss_max}",
        tally.requests,
        tally.requests as f64 / took.as_secs_f64(),
        tally.by_status(),
        tally.unexpected_count,
    );
    eprintln!(
        "  after requests: VmRSS / RssAnon / RssFile / RssShmem MiB; store file MiB; \
         derivations, signatures; VmRSS less SoftHSM's share since the warm-up MiB"
    );
    for (i, m) in points.iter().enumerate() {
        eprintln!(
            "  {:>8}: {:.1} / {:.1} / {:.1} / {:.1}; {:.1}; {}, {}; {:.1}",
            i as u64 * per_worker * WORKERS,
            mib(m.rss),
            mib(m.anon),
            mib(m.file),
            mib(m.shmem),
            m.store_bytes as f64 / 1024.0 / 1024.0,
            m.derivations,
            m.signatures,
            mib(m.rss.saturating_sub(warmed.softhsm_kib_until(m)))
        );
    }
    for (kind, answers) in &tally.responses {
        eprintln!("  {kind}: {answers:?}");
    }
    assert_eq!(tally.requests, per_worker * WORKERS * TENTHS);
    assert!(tally.requests >= 2_000 || total < 2_000);
    assert_eq!(tally.unexpected_count, 0, "{:?}", tally.unexpected);
    // Every kind was sent and answered.
    assert_eq!(tally.responses.len(), plan.kinds.len());

    // No crash: the same process is alive and healthy, and never panicked.
    assert!(daemon.wait_exit_or_running(Duration::ZERO).is_none());
    assert_eq!(daemon.admin_get("/healthz").status, 200);
    daemon.wait_readyz(200);
    assert!(!daemon.stderr().contains("panicked"), "{}", daemon.stderr());

    // Memory is flat: over the second half of the run the daemon's RSS,
    // less what SoftHSM keeps per call, grows by at most FLAT_KIB
    // (docs/RELIABILITY.md, "Load").
    let softhsm = mid.softhsm_kib_until(last);
    let own = rss_last.saturating_sub(rss_mid).saturating_sub(softhsm);
    eprintln!(
        "  second half: VmRSS {rss_mid} -> {rss_last} KiB, SoftHSM's share {softhsm} KiB, \
         the rest {own} KiB (allowed {FLAT_KIB})"
    );
    assert!(
        own <= FLAT_KIB,
        "RSS grew from {rss_mid} KiB half-way to {rss_last} KiB at the end, {own} KiB \
         beyond SoftHSM's {softhsm} KiB (allowed {FLAT_KIB} KiB)"
    );
    assert!(
        rss_max <= rss_warm * 2,
        "RSS peaked at {rss_max} KiB (warm {rss_warm})"
    );

    // Every opened key is in the budget: one per unwrap_ok answer.
    let ok = |t: &Tally| {
        t.responses
            .get("unwrap_ok")
            .map_or(0, |a| a.values().sum::<u64>())
    };
    let auditor = parties.clients(&pki, daemon.api).auditor;
    let size = vault::tree_size(&auditor);
    let opened = vault::entries(&auditor, 0, size)
        .iter()
        .filter(|e| e.leaf["outcome"] == "opened")
        .count() as u64;
    assert_eq!(opened, ok(&warm) + ok(&tally));
    eprintln!(
        "{size} audit leaves, {opened} opened; {:?} in all",
        started.elapsed()
    );
}
