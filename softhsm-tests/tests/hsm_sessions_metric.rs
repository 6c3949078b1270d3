//! `lavd_hsm_sessions_busy` is the number of HSM sessions checked out of
//! the pool now: above 0 while a batch opens envelopes, 0 again once the
//! daemon is idle. (It used to be set on checkout only, so an idle daemon
//! showed 1.)

use std::sync::atomic::{AtomicBool, Ordering};

use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::TestToken;
use time::OffsetDateTime;

const BUSY: &str = "lavd_hsm_sessions_busy";

#[test]
fn sessions_busy_returns_to_zero_when_the_daemon_is_idle() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&vault::roles_toml()));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-BUSY", recipient.public(), 1000));
    let sealed = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let envelopes: Vec<_> = (0..100)
        .map(|i| vault::seal(&escrow, "E-1", TARGET, sealed, &format!("m{i}"), &[7; 32]))
        .collect();
    let body = serde_json::json!({"warrant": warrant, "envelopes": envelopes});

    let done = AtomicBool::new(false);
    let most = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut most = 0.0f64;
            while !done.load(Ordering::SeqCst) {
                most = most.max(daemon.metric(BUSY));
            }
            most
        });
        let stopping = softhsm_tests::StopOnDrop(&done);
        let r = vault::post(&c.agency, "/v1/unwrap", &body);
        drop(stopping);
        assert_eq!(vault::statuses(&r.json()), vec!["ok"; 100], "{}", r.text());
        watcher.join().unwrap()
    });
    assert!(
        (1.0..=2.0).contains(&most),
        "{BUSY} peaked at {most} during the batch"
    );
    assert_eq!(daemon.wait_metric(BUSY, 0.0), 0.0);
}
