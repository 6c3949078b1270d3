//! The PostgreSQL server stopped and started again under load, with three
//! `lavd serve` replicas running: while it is down, unwraps fail 503
//! `store_unavailable` and release nothing, and `/readyz` is false; when it
//! returns, every replica serves again without being restarted. Afterwards
//! the log verifies and the budget spent equals the opened leaves.
//!
//! This restarts the test machine's PostgreSQL cluster (`pg_ctlcluster`),
//! so it lives in a test binary of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use softhsm_tests::pg_cluster::privileged;
use softhsm_tests::replicas::{Cluster, REPLICAS};
use softhsm_tests::vault;

/// `(version, name)` of the cluster the tests' databases live on: the one
/// on [`softhsm_tests::pg::port`], as `.ci/setup` picks it.
fn cluster() -> (String, String) {
    let out = Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters (run .ci/setup --tests)");
    let text = String::from_utf8(out.stdout).unwrap();
    let port = softhsm_tests::pg::port().to_string();
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() >= 3 && w[2] == port)
        .map(|w| (w[0].to_string(), w[1].to_string()))
        .unwrap_or_else(|| panic!("no PostgreSQL cluster on port {port}: {text}"))
}

fn pg_ctl(action: &str) {
    let (version, name) = cluster();
    let out = privileged("pg_ctlcluster")
        .args([&version, &name, action])
        .args(if action == "stop" {
            &["-m", "fast"][..]
        } else {
            &[][..]
        })
        .output()
        .expect("pg_ctlcluster");
    assert!(out.status.success(), "pg_ctlcluster {action}: {out:?}");
}

/// One request's HTTP status, code (`ok` for a 200) and, for a 200, its
/// leaves `(first_index, count)`.
type Outcome = (u16, String, Option<(u64, u64)>);

/// Starts the cluster again if the test fails while it is down.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let (version, name) = cluster();
        let _ = privileged("pg_ctlcluster")
            .args([&version, &name, "start"])
            .output();
    }
}

#[test]
fn a_database_restart_under_load_is_503_store_unavailable_then_recovers_without_restarting_lavd() {
    let started = Instant::now();
    let c = Cluster::start();
    let envelopes: Vec<_> = (0..4).map(|n| c.envelope(n)).collect();
    let body = serde_json::json!({
        "warrant": c.warrant("W-RESTART", 1_000_000),
        "envelopes": envelopes,
    })
    .to_string();
    let stop = AtomicBool::new(false);
    let _restart = Restart;
    let (outcomes, down) = std::thread::scope(|s| {
        let load: Vec<_> = (0..REPLICAS * 2)
            .map(|i| {
                let agency = c.clients[i % REPLICAS].agency.clone();
                let (body, stop) = (&body, &stop);
                s.spawn(move || {
                    let mut seen: Vec<Outcome> = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let r = match agency.request("POST", "/v1/unwrap", Some(body.as_bytes())) {
                            Ok(r) => r,
                            // No answer at all: lavd must answer 503, not
                            // drop the connection (asserted below).
                            Err(e) => {
                                seen.push((0, format!("transport error: {e}"), None));
                                continue;
                            }
                        };
                        if r.status == 200 {
                            let reply = r.json();
                            assert_eq!(vault::statuses(&reply), ["ok"; 4]);
                            let first = reply["audit"]["first_index"].as_u64().unwrap();
                            seen.push((200, "ok".into(), Some((first, 4))));
                        } else {
                            let code = r.json()["error"]["code"].as_str().unwrap().to_string();
                            seen.push((r.status, code, None));
                        }
                    }
                    seen
                })
            })
            .collect();
        // Stops the load however this closure ends, a failed assert too.
        let stopping = softhsm_tests::StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(500));
        pg_ctl("stop");
        // Down: every replica says not ready and refuses with the code.
        for d in &c.daemons {
            d.wait_readyz(503);
        }
        let mut down = Vec::new();
        for clients in &c.clients {
            let r = vault::post(
                &clients.agency,
                "/v1/unwrap",
                &serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            );
            down.push(r.assert_error(503, "store_unavailable"));
        }
        std::thread::sleep(Duration::from_millis(500));
        pg_ctl("start");
        // Back, with no lavd restarted.
        for d in &c.daemons {
            d.wait_readyz(200);
        }
        std::thread::sleep(Duration::from_millis(500));
        drop(stopping);
        let outcomes: Vec<_> = load.into_iter().flat_map(|h| h.join().unwrap()).collect();
        (outcomes, down)
    });
    assert_eq!(down.len(), REPLICAS);
    let codes =
        vault::assert_store_outage_answers(outcomes.iter().map(|(s, c, _)| (*s, c.as_str())));
    // Every replica serves again.
    for clients in &c.clients {
        let r = vault::post(
            &clients.agency,
            "/v1/unwrap",
            &serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The log: every 200's leaves are there and opened; spent equals the
    // opened leaves (a request that failed released nothing and spent
    // nothing, even when its leaves had been written before the commit
    // failed: the commit failed, so they were not).
    let auditor = &c.clients[0].auditor;
    let size = vault::tree_size(auditor);
    let log = vault::entries(auditor, 0, size);
    for (_, _, leaves) in &outcomes {
        if let Some((first, count)) = leaves {
            for i in *first..first + count {
                assert_eq!(log[i as usize].leaf["outcome"], "opened");
                assert_eq!(log[i as usize].leaf["warrant_id"], "W-RESTART");
            }
        }
    }
    let opened = vault::opened_leaves(&log) as i64;
    let spent: i64 =
        c.db.client()
            .query_one("SELECT spent FROM warrants WHERE id = 'W-RESTART'", &[])
            .unwrap()
            .get(0);
    assert_eq!(spent, opened);
    println!(
        "restart under load: {codes:?}, {size} leaves, {:?}",
        started.elapsed()
    );
}
