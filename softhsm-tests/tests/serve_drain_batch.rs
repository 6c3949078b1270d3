//! SIGTERM (or SIGINT) while a large unwrap batch is inside the HSM: the daemon stops
//! taking work but finishes the batch, audits it and sends the whole reply,
//! then exits 0. The batch's leaves and spend are durable, and the log the
//! real `lavd audit` commands export afterwards extends the checkpoint the
//! reply carried.

use std::time::{Duration, Instant};

use lavd::envelope::reply::{open_reply, Outcome};
use rustix::process::Signal;
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{assert_ok, TestToken};
use time::OffsetDateTime;

/// Large enough that the batch is still inside the HSM when the signal
/// lands: 200 envelopes open in about 70 ms on a developer machine, 1000 in
/// about 300 ms, which leaves room for a slow metrics poll.
const BATCH: usize = 1000;
const ECDH_OK: &str = "lavd_hsm_operation_duration_seconds_count{op=\"ecdh_derive\",result=\"ok\"}";

#[test]
fn sigterm_during_a_large_batch_sends_the_whole_reply_then_exits_0() {
    stop_during_a_large_batch(Signal::TERM);
}

/// Ctrl-C in the terminal running `lavd serve` or `lavd dev` is the same
/// graceful stop as SIGTERM (before, only SIGTERM was sent by any test).
#[test]
fn sigint_during_a_large_batch_sends_the_whole_reply_then_exits_0() {
    stop_during_a_large_batch(Signal::INT);
}

fn stop_during_a_large_batch(stop: Signal) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(
        &serve_config(&format!(
            "{}[limits]\nmax_batch = {BATCH}\n",
            vault::roles_toml()
        ))
        .replace("shutdown_grace_secs = 10", "shutdown_grace_secs = 120"),
    );
    vault::generate_escrow_key(&t, "E-1");
    let mut daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);

    let escrow = vault::published_key(&c.provider, "E-1");
    let now = OffsetDateTime::now_utc();
    let deks: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| (i as u32).to_be_bytes().repeat(8))
        .collect();
    let envelopes: Vec<_> = deks
        .iter()
        .enumerate()
        .map(|(i, dek)| {
            vault::seal(
                &escrow,
                "E-1",
                TARGET,
                now - time::Duration::minutes(i as i64 + 1),
                &format!("msg-{i}"),
                dek,
            )
        })
        .collect();
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-DRAIN", recipient.public(), 1000));
    let body = serde_json::json!({"warrant": warrant, "envelopes": envelopes});

    let before = daemon.metric(ECDH_OK);
    let mut conn = c.agency.connect().unwrap();
    let sender = std::thread::spawn(move || {
        let started = Instant::now();
        let r = conn
            .request("POST", "/v1/unwrap", &[], Some(body.to_string().as_bytes()))
            .unwrap();
        (r, started.elapsed())
    });

    // Signal once the batch is being opened in the HSM, and not yet done.
    let deadline = Instant::now() + Duration::from_secs(60);
    let in_hsm = loop {
        let done = daemon.metric(ECDH_OK) - before;
        if done >= 1.0 {
            break done;
        }
        assert!(Instant::now() < deadline, "the batch never reached the HSM");
        std::thread::sleep(Duration::from_millis(2));
    };
    daemon.signal(stop);
    assert!(
        in_hsm < BATCH as f64,
        "the batch was over before the signal ({in_hsm} opened): make it larger"
    );
    daemon.expect_notify("STOPPING=1");

    let (r, took) = sender.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    assert_eq!(vault::statuses(&reply), vec!["ok"; BATCH]);
    let opened = open_reply(&recipient, &vault::headers(&envelopes), &r.body).unwrap();
    for (result, dek) in opened.results.iter().zip(&deks) {
        match &result.outcome {
            Outcome::Ok(got) => assert_eq!(got.as_slice(), dek.as_slice()),
            other => panic!("{}: {other:?}", result.index),
        }
    }
    assert_eq!(opened.audit.count, BATCH as u64);

    let status = daemon.wait_exit(Duration::from_secs(120));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr());
    eprintln!("batch of {BATCH}: {took:?}, {in_hsm} opened when signalled");

    // Durable: the spend, and the leaves under the reply's checkpoint.
    let spent: u64 = rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .query_row(
            "SELECT spent FROM warrants WHERE id = 'W-DRAIN'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(spent, BATCH as u64);
    let key = assert_ok(&t.lavd_with_config(&["audit", "key"]));
    let export = t.path("export.json");
    let checkpoint = t.path("reply-checkpoint");
    std::fs::write(&checkpoint, &opened.audit.checkpoint).unwrap();
    assert_ok(&t.lavd_with_config(&["audit", "export", "--out", export.to_str().unwrap()]));
    let summary = assert_ok(&t.lavd(&[
        "audit",
        "verify",
        "--key",
        key.trim(),
        "--export",
        export.to_str().unwrap(),
        "--checkpoint",
        checkpoint.to_str().unwrap(),
    ]));
    assert!(summary.contains("verdict: the log verifies"), "{summary}");
    let exported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    let entries = exported["entries"].as_array().unwrap();
    let first = opened.audit.first_index as usize;
    for (i, envelope) in envelopes.iter().enumerate() {
        let entry = &entries[first + i];
        assert_eq!(entry["index"], first + i);
        let leaf = lavd::codec::b64_decode(entry["leaf"].as_str().unwrap()).unwrap();
        let leaf: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
        assert_eq!(leaf["outcome"], "opened");
        assert_eq!(leaf["warrant_id"], "W-DRAIN");
        assert_eq!(leaf["envelope_digest"], vault::envelope_digest(envelope));
    }
}

/// A second SIGTERM cuts the drain short while an unwrap is inside the HSM
/// (the fault module holds its derive) and another waits at the envelope
/// gate behind it (`max_envelopes_in_flight = 1`). Both connections are cut.
/// The first's work goes on, and the process waits for it, past the
/// runtime's own 5-second bound on blocking tasks, so its leaves and spend
/// are durable when it exits 0; before, it exited 5 s after the drain, the
/// open still running and logged nowhere. The queued one starts nothing
/// once through the gate (nobody would get its reply): no derive, no leaf,
/// no spend.
#[test]
fn a_cut_drain_waits_for_the_hsm_opens_of_the_requests_it_cut() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    t.write_config_hsm(
        &softhsm_tests::shim_module_path(),
        2,
        "call_timeout_ms = 60000\n",
        &format!(
            "{}\n{}[limits]\nmax_envelopes_in_flight = 1\n",
            shim.hsm_env(),
            serve_config(&vault::roles_toml())
        ),
    );
    let escrow = vault::generate_escrow_key(&t, "E-1");
    let mut daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let recipient = vault::recipient();
    let body = |id: &str| {
        let envelope = vault::seal(
            &escrow,
            "E-1",
            TARGET,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            id,
            &[7; 32],
        );
        let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 10));
        serde_json::json!({"warrant": warrant, "envelopes": [envelope]}).to_string()
    };
    shim.set("fault = hang\nfault_calls = C_DeriveKey");
    let send = |id: &str| {
        let agency = c.agency.clone();
        let body = body(id);
        std::thread::spawn(move || agency.request("POST", "/v1/unwrap", Some(body.as_bytes())))
    };
    let cut = send("W-CUT");
    let deadline = Instant::now() + Duration::from_secs(20);
    while shim.faults() == 0 {
        assert!(
            Instant::now() < deadline,
            "the unwrap never reached the HSM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let queued = send("W-QUEUED");
    // Time to reach the gate and wait there.
    std::thread::sleep(Duration::from_millis(500));
    daemon.signal(Signal::TERM);
    daemon.expect_notify("STOPPING=1");
    daemon.signal(Signal::TERM);
    // The cut connections: no reply.
    assert!(cut.join().unwrap().is_err(), "the cut request got a reply");
    assert!(
        queued.join().unwrap().is_err(),
        "the queued request got a reply"
    );
    // Held past the runtime's 5 s: still running, waiting for the open.
    assert_eq!(
        daemon.wait_exit_or_running(Duration::from_secs(7)),
        None,
        "exited with the HSM open still running; stderr:\n{}",
        daemon.stderr()
    );
    assert!(
        daemon
            .stderr()
            .contains("waiting for requests' HSM and store work that has not returned"),
        "{}",
        daemon.stderr()
    );
    shim.set("");
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr());

    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let spent = |id: &str| -> Option<u64> {
        db.query_row("SELECT spent FROM warrants WHERE id = ?1", [id], |row| {
            row.get(0)
        })
        .ok()
    };
    assert_eq!(spent("W-CUT"), Some(1));
    assert_eq!(spent("W-QUEUED"), None);
    let mut leaves = db.prepare("SELECT leaf FROM audit_leaves").unwrap();
    let unwraps: Vec<(String, String)> = leaves
        .query_map([], |row| row.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|leaf| serde_json::from_slice::<serde_json::Value>(&leaf.unwrap()).unwrap())
        .filter(|leaf| leaf["event"] == "unwrap")
        .map(|leaf| {
            (
                leaf["warrant_id"].as_str().unwrap_or_default().to_string(),
                leaf["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(unwraps, vec![("W-CUT".to_string(), "opened".to_string())]);
}
