//! A batch's envelope opens are spread over the HSM session pool, and the
//! unwrap rules hold as they did when a batch opened one envelope after
//! another. Through the latency and fault module (`softhsm-tests/pkcs11-shim`)
//! in front of SoftHSM, on a real `lavd serve` over mutual TLS:
//!
//! - an HSM failure in the middle of a 1000-envelope batch on 8 sessions
//!   (the first 300 derives succeed, every later one fails) fails the whole
//!   request (503): no `opened` leaf, every leaf `open_failed`, nothing
//!   spent; once the fault clears the same batch opens in full, the reply,
//!   opened with the recipient's key, gives every DEK in request order, its
//!   checkpoint verifies and covers its leaves, which are the batch's 1000
//!   envelopes, `opened`, in order; the budget is then spent exactly;
//! - a session lost in the middle of such a batch (one derive answered
//!   `CKR_SESSION_HANDLE_INVALID`) is retried once on a new session: the
//!   batch opens in full, with the same audit and an exact budget;
//! - with `[hsm.quirks] reset_module_after_opens = 100` (SoftHSM keeps
//!   destroyed objects until `C_Finalize`), two 1000-envelope batches at
//!   once open in full across the module resets they cause (at most 20), with
//!   the same audit, no lost session, and an exact budget;
//! - the pool is shared fairly: single-envelope requests sent while a
//!   1000-envelope batch runs at 1 ms per PKCS#11 call finish before it, and
//!   that batch itself keeps several sessions busy at once (and its body
//!   counts against `max_body_bytes_in_flight` while it is served);
//! - `lavd_unwrap_phase_seconds` puts a batch's time where it went: at 1 ms
//!   a call, in its HSM opens and its checkpoint signature; a wait at the
//!   envelope gate, in its `gate` phase.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lavd::audit::note::verify_note;
use lavd::envelope::reply::{open_reply, OpenedReply, Outcome};
use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{shim_module_path, Shim, TestToken};
use time::OffsetDateTime;

const DERIVES: &str = "lavd_hsm_operation_duration_seconds_count{op=\"ecdh_derive\",result=\"ok\"}";
const BUSY: &str = "lavd_hsm_sessions_busy";
const RECONNECTS: &str = "lavd_hsm_reconnects_total";
const PLANNED_RESETS: &str = "lavd_hsm_planned_resets_total{outcome=\"done\"}";
const HELD: &str = "lavd_request_body_bytes_held";

/// `[roles]` plus limits that let a 1000-envelope batch through.
fn config(shim: &Shim) -> String {
    format!(
        "{}\n{}\n[limits]\nmax_body_bytes = 16777216\nmax_batch = 1000\n\
         rate_limit_per_second = 1000\nrate_limit_burst = 1000\n",
        shim.hsm_env(),
        serve_config(&vault::roles_toml())
    )
}

/// `n` envelopes to `E-1`, the i-th sealing [`dek`]`(tag, i)`.
fn batch(escrow: &lavd::jwk::P256PublicKey, tag: &str, n: usize) -> Vec<serde_json::Value> {
    let now = OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            vault::seal(
                escrow,
                "E-1",
                TARGET,
                now - time::Duration::minutes(i as i64 % 600 + 1),
                &format!("{tag}-{i}"),
                &dek(tag, i),
            )
        })
        .collect()
}

fn dek(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag}-{i:06}-a-sixteen-plus-byte-dek").into_bytes()
}

fn start(sessions: usize) -> (TestToken, Pki, Shim, Daemon) {
    start_with(sessions, "")
}

/// [`start`], with `limits` (lines) added to `[limits]`.
fn start_with(sessions: usize, limits: &str) -> (TestToken, Pki, Shim, Daemon) {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_with(
        &shim_module_path(),
        sessions,
        &format!("{}{limits}", config(&shim)),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    (t, pki, shim, daemon)
}

/// Returns once the daemon has made its first HSM derive: a batch sent
/// before is opening.
fn wait_for_a_derive(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.metric(DERIVES) < 1.0 {
        assert!(Instant::now() < deadline, "the batch never reached the HSM");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn unwrap(
    agency: &Client,
    warrant: &serde_json::Value,
    envelopes: &[serde_json::Value],
) -> softhsm_tests::server::Response {
    vault::post(
        agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
    )
}

#[test]
fn a_mid_batch_hsm_failure_on_spread_opens_releases_and_spends_nothing() {
    let (_t, pki, shim, daemon) = start(8);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let id = "SPREAD-FAULT-1";
    // Exactly one batch's worth: anything the failed request spent would
    // make the clean batch below end in `budget_exhausted`.
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 1000));
    let envelopes = batch(&escrow, "spread", 1000);

    // The 301st derive and every later one fail, while up to 8 run at once.
    shim.set("fault = device_error\nfault_calls = C_DeriveKey\nfault_after = 300");
    let before = vault::tree_size(&c.auditor);
    let derived = daemon.metric(DERIVES);
    let r = unwrap(&c.agency, &warrant, &envelopes);
    r.assert_error(503, "hsm_unavailable");
    assert!(shim.faults() > 0, "the module injected nothing");
    // Mid-batch: exactly the 300 derives before the fault succeeded.
    assert_eq!(daemon.metric(DERIVES) - derived, 300.0);
    // Audit before release: the request's leaves are all there, none says
    // `opened`, and every one says why not.
    let after = vault::tree_size(&c.auditor);
    let leaves = vault::entries(&c.auditor, before, after);
    let ours: Vec<_> = leaves
        .iter()
        .filter(|e| e.leaf["warrant_id"] == id)
        .collect();
    assert_eq!(ours.len(), 1000, "one leaf per envelope");
    // Each envelope's, in request order: an open kept by session rather
    // than by envelope would log one envelope twice and another never.
    for ((i, e), envelope) in ours.iter().enumerate().zip(&envelopes) {
        assert_eq!(e.leaf["outcome"], "denied", "leaf {i}: {}", e.leaf);
        assert_eq!(e.leaf["reason"], "open_failed", "leaf {i}: {}", e.leaf);
        assert_eq!(
            e.leaf["envelope_digest"],
            vault::envelope_digest(envelope),
            "leaf {i}"
        );
    }

    // Cleared: the same batch opens in full, in request order, and the
    // budget was untouched by the failed request.
    shim.set("");
    let derived = daemon.metric(DERIVES);
    let r = unwrap(&c.agency, &warrant, &envelopes);
    assert_released(&c, &recipient, id, &envelopes, "spread", &r);
    assert_eq!(daemon.metric(DERIVES) - derived, 1000.0);

    // Spent exactly: one more is over the grant.
    assert_spent(&c, &escrow, &warrant);
}

#[test]
fn a_session_lost_mid_batch_is_retried_on_a_new_session_and_the_batch_opens() {
    let (_t, pki, shim, daemon) = start(8);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let id = "SPREAD-LOST-1";
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 1000));
    let envelopes = batch(&escrow, "lost", 1000);

    // The 301st derive, and only it, finds its session gone.
    shim.set(
        "fault = session_handle_invalid\nfault_calls = C_DeriveKey\nfault_after = 300\nfault_limit = 1",
    );
    let derived = daemon.metric(DERIVES);
    let reconnects = daemon.metric(RECONNECTS);
    let r = unwrap(&c.agency, &warrant, &envelopes);
    assert_eq!(shim.faults(), 1, "the module injected no fault, or more");
    // The daemon reconnected once and opened that envelope on a new
    // session: every envelope opened once, with its leaf.
    assert_eq!(daemon.metric(RECONNECTS) - reconnects, 1.0);
    assert_released(&c, &recipient, id, &envelopes, "lost", &r);
    assert_eq!(daemon.metric(DERIVES) - derived, 1000.0);

    // Spent exactly once per envelope, the retried one too.
    assert_spent(&c, &escrow, &warrant);
}

#[test]
fn batches_open_in_full_across_planned_module_resets() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    // SoftHSM itself (a reset finalises the module lavd loaded).
    t.write_config_hsm(
        &softhsm_tests::module_path(),
        2,
        "[hsm.quirks]\nreset_module_after_opens = 100\n",
        &format!(
            "{}\n[limits]\nmax_body_bytes = 16777216\nmax_batch = 1000\n\
             rate_limit_per_second = 1000\nrate_limit_burst = 1000\n",
            serve_config(&vault::roles_toml())
        ),
    );
    let v = vault::Vault::serve(t, pki);
    let (daemon, escrow) = (&v.daemon, &v.escrow);
    let c = v.parties.clients(&v.pki, daemon.api);
    let recipient = vault::recipient();
    let ids = ["RESETS-1", "RESETS-2"];
    let warrants: Vec<_> = ids
        .iter()
        .map(|id| vault::double_lock(&vault::claims(id, recipient.public(), 1000)))
        .collect();
    let batches: Vec<_> = ids.iter().map(|id| batch(escrow, id, 1000)).collect();

    let derived = daemon.metric(DERIVES);
    let replies: Vec<_> = std::thread::scope(|s| {
        let sent: Vec<_> = warrants
            .iter()
            .zip(&batches)
            .map(|(warrant, envelopes)| s.spawn(|| unwrap(&c.agency, warrant, envelopes)))
            .collect();
        sent.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((id, envelopes), r) in ids.iter().zip(&batches).zip(&replies) {
        assert_released(&c, &recipient, id, envelopes, id, r);
    }
    assert_eq!(daemon.metric(DERIVES) - derived, 2000.0);
    // A reset is due 100 opens after the module was last initialised; the
    // opens that run between its being due and its start (its thread
    // starting, the running calls finishing) count for the module it
    // ends. So 2000 opens make at most 20 resets (18 in a run here). The
    // last may still be running when the replies are in: the count is read
    // once it has not changed for a second.
    let mut resets = daemon.metric(PLANNED_RESETS);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = daemon.metric(PLANNED_RESETS);
        if now == resets {
            break;
        }
        resets = now;
    }
    assert!((5.0..=20.0).contains(&resets), "{resets} planned resets");
    assert_eq!(daemon.metric(RECONNECTS), 0.0, "a session was lost");
    for warrant in &warrants {
        assert_spent(&c, escrow, warrant);
    }
}

/// Asserts that `r` released every envelope of `envelopes` (whose DEKs are
/// [`dek`]`(tag, i)`) to `recipient`, in order, and that its audit is
/// exactly theirs: its checkpoint verifies under the audit key and covers
/// its leaves, which are one `opened` leaf of warrant `id` per envelope, in
/// request order.
fn assert_released(
    c: &vault::Clients,
    recipient: &lavd::jwk::P256PrivateKey,
    id: &str,
    envelopes: &[serde_json::Value],
    tag: &str,
    r: &softhsm_tests::server::Response,
) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), vec!["ok"; envelopes.len()]);
    let opened: OpenedReply = open_reply(recipient, &vault::headers(envelopes), &r.body).unwrap();
    for (i, result) in opened.results.iter().enumerate() {
        match &result.outcome {
            Outcome::Ok(got) => assert_eq!(got.as_slice(), dek(tag, i), "envelope {i}"),
            other => panic!("envelope {i}: {other:?}"),
        }
    }
    let checkpoint = verify_note(
        opened.audit.checkpoint.as_str(),
        &vault::verifier_key(&c.auditor),
    )
    .expect("the reply's checkpoint verifies under the audit key");
    let (first, count) = (opened.audit.first_index, opened.audit.count);
    assert_eq!(count, envelopes.len() as u64);
    assert!(first + count <= checkpoint.size, "{checkpoint:?}");
    let leaves = vault::entries(&c.auditor, first, first + count);
    for (i, (entry, envelope)) in leaves.iter().zip(envelopes).enumerate() {
        let leaf = &entry.leaf;
        assert_eq!(leaf["event"], "unwrap", "leaf {i}: {leaf}");
        assert_eq!(leaf["warrant_id"], id, "leaf {i}: {leaf}");
        assert_eq!(leaf["outcome"], "opened", "leaf {i}: {leaf}");
        assert_eq!(
            leaf["envelope_digest"],
            vault::envelope_digest(envelope),
            "leaf {i}"
        );
    }
}

/// Asserts that `warrant` (a budget of 1000) has no envelope left.
fn assert_spent(
    c: &vault::Clients,
    escrow: &lavd::jwk::P256PublicKey,
    warrant: &serde_json::Value,
) {
    let r = unwrap(&c.agency, warrant, &batch(escrow, "over", 1));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["budget_exhausted"]);
}

#[test]
fn single_envelope_requests_finish_while_a_large_batch_holds_the_pool() {
    let (_t, pki, shim, daemon) = start(4);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let big_warrant = vault::double_lock(&vault::claims("SPREAD-BIG", recipient.public(), 1000));
    let small_warrant = vault::double_lock(&vault::claims("SPREAD-SMALL", recipient.public(), 10));
    let big = batch(&escrow, "big", 1000);
    let smalls: Vec<_> = (0..3)
        .map(|i| batch(&escrow, &format!("small{i}"), 1))
        .collect();

    // A network HSM: 1 ms per call, so the batch takes at least
    // 4 calls × 1000 / 4 sessions = 1 s however fast this machine is
    // (`C_DeriveKey`, `C_GetAttributeValue` twice, `C_DestroyObject`).
    shim.set("delay_us = 1000");
    let finished = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let busiest = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut most = 0.0f64;
            while !done.load(Ordering::SeqCst) {
                most = most.max(daemon.metric(BUSY));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        });
        // Stops the watcher however this closure ends, a failed assert too.
        let _stop = softhsm_tests::StopOnDrop(&done);
        let large = s.spawn(|| {
            let r = unwrap(&c.agency, &big_warrant, &big);
            finished.lock().unwrap().push("big");
            r
        });
        // Only once the batch is opening.
        wait_for_a_derive(&daemon);
        // Its body, read, still counts against max_body_bytes_in_flight
        // while its request is served (at least a second from here).
        let big_body = serde_json::json!({"warrant": big_warrant, "envelopes": big});
        assert_eq!(
            daemon.metric(HELD),
            big_body.to_string().len() as f64,
            "the batch's body is counted until it is answered"
        );
        for (i, small) in smalls.iter().enumerate() {
            let r = unwrap(&c.agency, &small_warrant, small);
            assert_eq!(r.status, 200, "small {i}: {}", r.text());
            assert_eq!(vault::statuses(&r.json()), ["ok"], "small {i}");
            finished.lock().unwrap().push("small");
        }
        let r = large.join().unwrap();
        drop(_stop);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), vec!["ok"; 1000]);
        watcher.join().unwrap()
    });
    assert_eq!(
        *finished.lock().unwrap(),
        ["small", "small", "small", "big"],
        "a single-envelope request waited for the large batch"
    );
    // One session for the batch and one for a small request would be 2.
    assert!(
        busiest >= 3.0,
        "at most {busiest} sessions were busy at once: the batch was not spread"
    );
}

/// A client that goes away while its batch is opening does not take its
/// body out of `max_body_bytes_in_flight` early. hyper drops the request's
/// handler when the connection closes, but the batch's work goes on (to
/// its audit entries) and keeps the body, so its bytes stay counted until
/// that work is done. Before, the count ended with the handler.
#[test]
fn a_body_stays_counted_while_its_work_goes_on_after_the_client_left() {
    let (_t, pki, shim, daemon) = start(4);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let warrant = vault::double_lock(&vault::claims(
        "SPREAD-GONE",
        vault::recipient().public(),
        1000,
    ));
    let body = serde_json::json!({"warrant": warrant, "envelopes": batch(&escrow, "gone", 1000)})
        .to_string();
    let wait = Duration::from_secs(30);
    // At least two seconds of opens (2 ms a call; 4 calls an open over 4
    // sessions), so that a second is left after the halfway check.
    shim.set("delay_us = 2000");
    let derived = daemon.metric(DERIVES);
    {
        let mut conn = c.agency.connect().unwrap();
        let head = format!(
            "POST /v1/unwrap HTTP/1.1\r\nhost: localhost\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        conn.send(&[head.as_bytes(), body.as_bytes()].concat())
            .unwrap();
        softhsm_tests::eventually("the batch to reach the HSM", wait, || {
            daemon.metric(DERIVES) - derived >= 1.0
        });
        // The connection closes here, the reply unread.
    }
    softhsm_tests::eventually("half the batch to be opened", wait, || {
        daemon.metric(DERIVES) - derived >= 500.0
    });
    assert_eq!(
        daemon.metric(HELD),
        body.len() as f64,
        "the body of work still going on is counted"
    );
    softhsm_tests::eventually("the bytes to come back", wait, || {
        daemon.metric(HELD) == 0.0
    });
    shim.set("");
}

/// `lavd_unwrap_phase_seconds` says where a request's time went. At 1 ms a
/// PKCS#11 call, a 200-envelope batch on 4 sessions spends at least
/// 4 calls × 200 / 4 × 1 ms = 200 ms in its HSM opens, and its audit phase
/// at least the checkpoint signature's 2 calls (`C_SignInit`, `C_Sign`)
/// and the whole append transaction (the store's own timer); the phases
/// that call no HSM take less than the opens; each phase is observed once;
/// together they take no longer than the request. A refused request
/// observes none.
#[test]
fn the_phases_of_an_unwrap_say_where_its_time_went() {
    const PHASES: [&str; 7] = [
        "gate", "admit", "intent", "hsm", "audit", "witness", "reply",
    ];
    const APPEND: &str = "lavd_store_commit_duration_seconds_sum{op=\"audit_append\"}";
    let series =
        |phase: &str, what: &str| format!("lavd_unwrap_phase_seconds_{what}{{phase=\"{phase}\"}}");
    let (_t, pki, shim, daemon) = start(4);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("SPREAD-PHASES", recipient.public(), 200));
    let envelopes = batch(&escrow, "phases", 200);
    let read = || {
        PHASES.map(|p| {
            (
                daemon.metric(&series(p, "sum")),
                daemon.metric(&series(p, "count")),
            )
        })
    };
    let before = read();
    let refused = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warrant, "envelopes": []}),
    );
    refused.assert_error(400, "malformed_request");
    assert_eq!(read(), before, "a refused request observed phases");
    let appended = daemon.metric(APPEND);

    shim.set("delay_us = 1000");
    let started = Instant::now();
    let r = unwrap(&c.agency, &warrant, &envelopes);
    let took = started.elapsed().as_secs_f64();
    shim.set("");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), vec!["ok"; 200]);

    let after = read();
    let spent: Vec<(&str, f64)> = PHASES
        .iter()
        .zip(after.iter().zip(&before))
        .map(|(phase, ((sum, count), (sum0, count0)))| {
            assert_eq!(
                count - count0,
                1.0,
                "phase {phase} observed {} times",
                count - count0
            );
            (*phase, sum - sum0)
        })
        .collect();
    let of = |phase: &str| spent.iter().find(|(p, _)| *p == phase).unwrap().1;
    assert!(
        of("hsm") >= 0.2,
        "HSM opens took {} s: {spent:?}",
        of("hsm")
    );
    assert!(
        of("audit") >= 0.002,
        "the audit phase took {} s: {spent:?}",
        of("audit")
    );
    let append = daemon.metric(APPEND) - appended;
    assert!(
        append > 0.0 && of("audit") >= append,
        "the audit phase took {} s, its append transaction {append} s",
        of("audit")
    );
    for phase in ["gate", "admit", "intent", "witness", "reply"] {
        assert!(
            of(phase) < of("hsm"),
            "{phase} took as long as the HSM: {spent:?}"
        );
    }
    let total: f64 = spent.iter().map(|(_, s)| s).sum();
    assert!(
        total <= took,
        "the phases took {total} s, the request {took} s: {spent:?}"
    );
}

/// A request that waits for room at the envelope gate
/// (`max_envelopes_in_flight`) shows that wait as its `gate` phase. With
/// room for 200 envelopes, a second 200-envelope batch sent while the
/// first opens (at least 200 ms at 1 ms a call on 4 sessions) waits for it.
#[test]
fn a_wait_at_the_envelope_gate_is_the_gate_phase() {
    const GATE_SUM: &str = "lavd_unwrap_phase_seconds_sum{phase=\"gate\"}";
    const GATE_COUNT: &str = "lavd_unwrap_phase_seconds_count{phase=\"gate\"}";
    let (_t, pki, shim, daemon) = start_with(4, "max_envelopes_in_flight = 200\n");
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("SPREAD-GATE", recipient.public(), 400));
    let first = batch(&escrow, "gate-a", 200);
    let second = batch(&escrow, "gate-b", 200);
    let (waited, counted) = (daemon.metric(GATE_SUM), daemon.metric(GATE_COUNT));

    shim.set("delay_us = 1000");
    std::thread::scope(|s| {
        let opening = s.spawn(|| unwrap(&c.agency, &warrant, &first));
        wait_for_a_derive(&daemon);
        let r = unwrap(&c.agency, &warrant, &second);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), vec!["ok"; 200]);
        let r = opening.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(vault::statuses(&r.json()), vec!["ok"; 200]);
    });
    shim.set("");
    assert_eq!(daemon.metric(GATE_COUNT) - counted, 2.0);
    let gate = daemon.metric(GATE_SUM) - waited;
    assert!(
        gate >= 0.1,
        "the second batch waited {gate} s at the gate, not the first's opens"
    );
}
