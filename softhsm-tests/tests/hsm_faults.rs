//! HSM faults under load: a real `lavd serve` on the latency and fault
//! PKCS#11 module (`pkcs11-shim/`), with agency threads unwrapping all the
//! time, while the module fails every device call with
//! `CKR_DEVICE_REMOVED`, `CKR_SESSION_HANDLE_INVALID` or `CKR_DEVICE_ERROR`,
//! or holds every call (`hang`). One test per fault kind; each shows that
//! - every answer is a 200 or 503 `hsm_unavailable`, and every request sent
//!   and answered while the fault is in force is a 503;
//! - no answer takes longer than the bound: an unwrap waits for the HSM at
//!   most twice (its envelope opens, then the checkpoint signature), each
//!   wait bounded by `[hsm] call_timeout_ms` (1 s here), so
//!   2 × 1 s plus 5 s of slack for a loaded 2-core machine;
//! - `/readyz` turns 503 while the fault lasts;
//! - nothing is released during the fault; every 200's `ok` results are
//!   `opened` leaves; the budget spent equals the `opened` leaves; the only
//!   `opened` leaves no reply carried are those of requests in flight when
//!   the fault began whose checkpoint could not be signed (THREAT_MODEL
//!   §5.7), at most one request per agency thread;
//! - when the fault clears, `/readyz` is 200 again and unwraps succeed,
//!   without a restart, and the log verifies with `lavd audit verify`.
//!
//! Each test prints a `FIGURES` line (docs/RELIABILITY.md quotes them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use softhsm_tests::faults::{audit_accounting, under_load, verify_log, wait_until, Figures};
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{shim_module_path, Shim, TestToken};
use time::OffsetDateTime;

const CALL_TIMEOUT: Duration = Duration::from_millis(1000);
const THREADS: usize = 4;
const BATCH: usize = 4;
/// How long the fault stays in force under load.
const FAULT_FOR: Duration = Duration::from_millis(2500);

fn bound() -> Duration {
    2 * CALL_TIMEOUT + Duration::from_secs(5)
}

fn spent(t: &TestToken, id: &str) -> i64 {
    rusqlite::Connection::open(t.path("lavd.db"))
        .unwrap()
        .query_row("SELECT spent FROM warrants WHERE id = ?1", [id], |row| {
            row.get(0)
        })
        .unwrap()
}

fn fault_under_load(fault: &str) {
    let started = Instant::now();
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_hsm(
        &shim_module_path(),
        2,
        &format!("call_timeout_ms = {}\n", CALL_TIMEOUT.as_millis()),
        &format!(
            "{}\n{}",
            shim.hsm_env(),
            serve_config(&format!(
                "{}[limits]\nrate_limit_per_second = 100000.0\nrate_limit_burst = 100000\n",
                vault::roles_toml()
            ))
        ),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let id = format!("W-{fault}");
    let warrant = vault::double_lock(&vault::claims(&id, recipient.public(), 1_000_000));
    let now = OffsetDateTime::now_utc();
    let envelopes: Vec<_> = (0..BATCH)
        .map(|i| {
            vault::seal(
                &escrow,
                "E-1",
                TARGET,
                now - time::Duration::hours(1),
                &format!("m{i}"),
                &[7; 32],
            )
        })
        .collect();
    let request = serde_json::json!({"warrant": warrant, "envelopes": envelopes});
    let body = request.to_string();

    let (answers, (on, off, readyz_after, direct)) =
        under_load(&[c.agency.clone()], &body, THREADS, || {
            std::thread::sleep(Duration::from_millis(700));
            shim.set(&format!("fault = {fault}"));
            assert!(
                wait_until(Duration::from_secs(10), || shim.faults() > 0),
                "{fault}: the module injected nothing"
            );
            let on = Instant::now();
            daemon.wait_readyz(503);
            let readyz_after = on.elapsed();
            // A request of the test's own, in the middle of the fault.
            let sent = Instant::now();
            vault::post(&c.agency, "/v1/unwrap", &request).assert_error(503, "hsm_unavailable");
            let direct = sent.elapsed();
            std::thread::sleep(FAULT_FOR.saturating_sub(on.elapsed()));
            let off = Instant::now();
            shim.set("");
            daemon.wait_readyz(200);
            std::thread::sleep(Duration::from_millis(700));
            (on, off, readyz_after, direct)
        });

    let figures = Figures::new(fault, &answers, on, off, shim.faults());
    figures.assert_fail_closed("hsm_unavailable", bound());
    assert!(direct <= bound(), "{fault}: {direct:?}");

    // The log: every 200's ok results are opened leaves; the budget spent
    // is exactly the opened leaves; opened leaves without a reply only from
    // requests in flight at the onset.
    let (opened, not_released) = audit_accounting(&c.auditor, &id, &answers);
    assert_eq!(spent(&t, &id), opened as i64, "{fault}: budget");
    assert!(
        not_released <= THREADS * BATCH,
        "{fault}: {not_released} opened leaves without a reply"
    );
    // After: the log verifies, and the same daemon opens again (the load
    // already showed it; once more on a connection of the test's own).
    let r = vault::post(&c.agency, "/v1/unwrap", &request);
    assert_eq!(r.status, 200, "{fault}: {}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"; BATCH]);

    verify_log(&t, &pki, &parties.auditor, daemon.api);
    figures.print(&format!(
        ", /readyz 503 after {} ms, direct request answered in {} ms, opened leaves {opened} \
         (= spent), opened but not released (commit before a failed checkpoint) {not_released}, \
         log verified, {:.1} s",
        readyz_after.as_millis(),
        direct.as_millis(),
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn device_removed_under_load_is_503_hsm_unavailable_and_recovers() {
    fault_under_load("device_removed");
}

#[test]
fn session_handle_invalid_under_load_is_503_hsm_unavailable_and_recovers() {
    fault_under_load("session_handle_invalid");
}

#[test]
fn device_error_under_load_is_503_hsm_unavailable_and_recovers() {
    fault_under_load("device_error");
}

#[test]
fn a_hung_hsm_under_load_is_503_hsm_unavailable_within_the_call_deadline_and_recovers() {
    fault_under_load("hang");
}
