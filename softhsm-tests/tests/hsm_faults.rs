//! HSM faults under load: a real `lavd serve` on the latency and fault
//! PKCS#11 module (`pkcs11-shim/`), with agency threads unwrapping all the
//! time, while the module fails every device call with
//! `CKR_DEVICE_REMOVED`, `CKR_SESSION_HANDLE_INVALID` or `CKR_DEVICE_ERROR`,
//! or holds every call (`hang`). One test per fault kind; each shows that
//! - every answer is a 200 or 503 `hsm_unavailable` (or
//!   `spent_not_released`: a spend that committed before the checkpoint
//!   could be signed), and no request sent
//!   and answered while the fault is in force releases a key (each is a
//!   503, or a 200 that opened nothing);
//! - no answer takes longer than the bound: an unwrap waits for the HSM at
//!   most twice (its envelope opens, then the checkpoint signature), each
//!   wait bounded by `[hsm] call_timeout_ms` (1 s here), so
//!   2 × 1 s plus 5 s of slack for a loaded 2-core machine;
//! - `/readyz` turns 503 while the fault lasts; during a hang `/metrics`
//!   shows the calls past their deadline (`lavd_hsm_calls_stuck`,
//!   `lavd_hsm_call_timeouts_total`), and neither moves for a failing call;
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

use softhsm_tests::faults::{limits, verify_log, wait_until, Case};
use softhsm_tests::server::{Daemon, Pki};
use softhsm_tests::vault::Parties;
use softhsm_tests::{shim_module_path, Shim, TestToken};

const CALL_TIMEOUT: Duration = Duration::from_millis(1000);
const CODE: &str = "hsm_unavailable";

fn bound() -> Duration {
    2 * CALL_TIMEOUT + Duration::from_secs(5)
}

/// `t`'s config on the fault module, with the call deadline and limits of
/// these tests.
fn configure(t: &TestToken, shim: &Shim) {
    t.write_config_hsm(
        &shim_module_path(),
        2,
        &format!("call_timeout_ms = {}\n", CALL_TIMEOUT.as_millis()),
        &format!("{}\n{}", shim.hsm_env(), limits()),
    );
}

fn fault_under_load(fault: &str) {
    let started = Instant::now();
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    configure(&t, &shim);
    let id = format!("W-{fault}");
    let case = Case::start(&t, pki, &id);
    let (mut readyz_after, mut direct) = (Duration::ZERO, Duration::ZERO);
    let (figures, opened, cut) = case.run(
        &t,
        fault,
        CODE,
        bound(),
        true,
        |case| {
            // Timeouts before the fault: healthy calls starved past the
            // 1 s deadline on a loaded host (the cases run at once, with
            // load threads each) are not the fault's.
            let timeouts_before = case.daemon.metric("lavd_hsm_call_timeouts_total");
            // Every device call fails (or hangs) from now on.
            shim.set(&format!("fault = {fault}"));
            assert!(
                wait_until(Duration::from_secs(10), || shim.faults() > 0),
                "{fault}: the module injected nothing"
            );
            let on = Instant::now();
            case.daemon.wait_readyz(503);
            readyz_after = on.elapsed();
            // A request of the test's own, in the middle of the fault.
            let sent = Instant::now();
            let opened = case.probe_until_refused(CODE);
            direct = sent.elapsed();
            // Only a hang leaves calls past their deadline; failing calls
            // return at once.
            let stuck = case.daemon.metric("lavd_hsm_calls_stuck");
            let timeouts = case.daemon.metric("lavd_hsm_call_timeouts_total");
            if fault == "hang" {
                assert!(stuck >= 1.0, "{fault}: lavd_hsm_calls_stuck {stuck}");
                assert!(
                    timeouts >= 1.0,
                    "{fault}: lavd_hsm_call_timeouts_total {timeouts}"
                );
            } else {
                assert_eq!(
                    (stuck, timeouts - timeouts_before),
                    (0.0, 0.0),
                    "{fault}: stuck, timed out since the fault"
                );
            }
            opened
        },
        || shim.set(""),
        || {
            rusqlite::Connection::open(t.path("lavd.db"))
                .unwrap()
                .query_row("SELECT spent FROM warrants WHERE id = ?1", [&id], |row| {
                    row.get(0)
                })
                .unwrap()
        },
    );
    assert!(direct <= bound(), "{fault}: {direct:?}");
    // The hung calls returned when the fault cleared.
    assert_eq!(case.daemon.metric("lavd_hsm_calls_stuck"), 0.0, "{fault}");
    let injected = shim.faults();
    figures.print(&format!(
        ", faults injected by the module {injected}, /readyz 503 after {} ms, direct request \
         answered in {} ms, \
         opened leaves {opened} (= spent), opened but not released (commit before a failed \
         checkpoint) {cut}, log verified, {:.1} s",
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

/// A start whose first checkpoint cannot be signed (the module fails every
/// `C_Sign`) stops with exit 1 and the HSM's code, after its
/// `authorities_loaded` leaf is durable; the next start, with the HSM back,
/// covers it and the log verifies.
#[test]
fn a_start_that_cannot_sign_its_checkpoint_stops_with_hsm_unavailable() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    configure(&t, &shim);
    // The audit key first (`lavd keys generate-audit`), through the module.
    let first = Daemon::start(&t);
    first.wait_readyz(200);
    drop(first);
    let leaves = || -> i64 {
        rusqlite::Connection::open(t.path("lavd.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM audit_leaves", [], |r| r.get(0))
            .unwrap()
    };
    let before = leaves();
    shim.set("fault = device_error\nfault_calls = C_Sign\n");
    let (status, stderr) = Daemon::try_start(&t).expect_err("a start that cannot sign");
    assert!(shim.faults() > 0, "the module injected nothing");
    assert_eq!(status.and_then(|st| st.code()), Some(1), "{stderr}");
    assert!(
        stderr.contains("lavd: hsm_unavailable: cannot sign the audit log's checkpoint: "),
        "{stderr}"
    );
    assert_eq!(
        leaves(),
        before + 1,
        "the authorities_loaded leaf is durable"
    );
    shim.set("");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    verify_log(&t, &pki, &parties.auditor, daemon.api);
}
