//! PROTOCOL §8: a revocation racing an in-flight unwrap, against a real
//! `lavd serve` on SoftHSM over mutual TLS. Each trial presents a fresh
//! warrant with a 100-envelope batch and, a few milliseconds later, from
//! another thread, the admin's revocation of that warrant. Whatever the
//! timing, no `opened` leaf of a warrant follows its `revocation` leaf in the
//! log, an `ok` result is only ever one whose leaf precedes the revocation,
//! and an envelope of a request caught in flight is denied `warrant_revoked`
//! with nothing spent. A request whose leaves committed before the
//! revocation, but whose release was checked after it (its checkpoint is
//! signed in between), releases nothing: 403 `warrant_revoked`, its leaves
//! `opened` and its budget spent (since 2026-12-07).

use std::time::{Duration as StdDuration, Instant};

use softhsm_tests::server::{serve_config, Response};
use softhsm_tests::vault::{self, Held, Parties, TARGET};
use softhsm_tests::TestToken;
use time::{Duration, OffsetDateTime};

/// Envelopes per unwrap: the trigger, and the default `max_batch`.
const BATCH: usize = 100;
/// Trials with the revocation 0 to 40 ms behind the unwrap.
const TRIALS: usize = 50;
/// Further trials allowed to find an outcome not seen yet.
const EXTRA_TRIALS: usize = 20;

/// How one trial ended, as the agency saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// 200, every envelope `ok`: the unwrap committed before the revocation.
    OpenedBefore,
    /// 200, every envelope denied `warrant_revoked`: the revocation
    /// committed while the unwrap was in flight.
    RevokedInFlight,
    /// 403 `warrant_revoked`: the revocation came before the budget, or
    /// after the audit commit and before the release (told apart by the
    /// log: then the request's leaves say `opened`, before the
    /// revocation's, and its budget is spent).
    RefusedWhole,
}

struct Trial {
    id: String,
    seen: Seen,
    /// The unwrap reply's `(first_index, count)`, when it was a 200.
    leaves: Option<(u64, u64)>,
    /// The revocation's leaf.
    revocation_index: u64,
}

#[test]
fn no_key_opens_after_its_revocation_commits() {
    let started = Instant::now();
    let t = TestToken::new();
    let pki = softhsm_tests::server::Pki::new(&t);
    // The rate limit is not what is tested here.
    t.write_config(&serve_config(&format!(
        "{}[limits]\nrate_limit_per_second = 10000.0\nrate_limit_burst = 10000\n",
        vault::roles_toml()
    )));
    vault::generate_escrow_key(&t, "E-1");
    let daemon = softhsm_tests::server::Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = Parties::new(&pki).clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let now = OffsetDateTime::now_utc();
    // One batch, sealed once: each trial's fresh warrant has its own budget.
    let envelopes: Vec<_> = (0..BATCH)
        .map(|i| {
            vault::seal(
                &escrow,
                "E-1",
                TARGET,
                now - Duration::hours(1),
                &format!("m{i}"),
                &[7; 32],
            )
        })
        .collect();
    let recipient = vault::recipient();

    // How long an unrevoked batch takes, to place some revocations after it
    // if 0 to 40 ms never lands one there.
    let warm = vault::double_lock(&vault::claims("W-WARM", recipient.public(), 1000));
    let t0 = Instant::now();
    let r = vault::post(
        &c.agency,
        "/v1/unwrap",
        &serde_json::json!({"warrant": warm, "envelopes": envelopes}),
    );
    let batch_time = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"; BATCH]);

    let run = |n: usize, delay: StdDuration| -> Trial {
        let id = format!("W-RACE-{n}");
        let warrant = vault::double_lock(&vault::claims(&id, recipient.public(), 1000));
        let unwrap_body =
            serde_json::json!({"warrant": warrant, "envelopes": envelopes}).to_string();
        let revoke_body =
            serde_json::json!({"id": id, "reason": "quashed while in flight"}).to_string();
        // Handshakes first, so that the delay separates the requests only.
        let mut agency = c.agency.connect().expect("agency connection");
        let mut admin = c.admin.connect().expect("admin connection");
        let (unwrap, revoke): (Response, Response) = std::thread::scope(|s| {
            let unwrap = s.spawn(|| {
                agency
                    .request("POST", "/v1/unwrap", &[], Some(unwrap_body.as_bytes()))
                    .expect("unwrap")
            });
            let revoke = s.spawn(|| {
                std::thread::sleep(delay);
                admin
                    .request(
                        "POST",
                        "/v1/warrants/revocations",
                        &[],
                        Some(revoke_body.as_bytes()),
                    )
                    .expect("revocation")
            });
            (unwrap.join().unwrap(), revoke.join().unwrap())
        });
        assert_eq!(revoke.status, 200, "{}", revoke.text());
        let revocation_index = revoke.json()["audit"]["first_index"].as_u64().unwrap();
        let (seen, leaves) = match unwrap.status {
            200 => {
                let reply = unwrap.json();
                let statuses = vault::statuses(&reply);
                let first = reply["audit"]["first_index"].as_u64().unwrap();
                let count = reply["audit"]["count"].as_u64().unwrap();
                assert_eq!(count, BATCH as u64);
                // All or nothing: the commit is before or after the
                // revocation's, never across it.
                let seen = if statuses.iter().all(|s| s == "ok") {
                    assert!(
                        first + count <= revocation_index,
                        "{id}: ok results at {first}..{} but revoked at {revocation_index}",
                        first + count
                    );
                    Seen::OpenedBefore
                } else {
                    assert_eq!(statuses, ["warrant_revoked"; BATCH], "{id}");
                    assert!(first > revocation_index, "{id}");
                    Seen::RevokedInFlight
                };
                (seen, Some((first, count)))
            }
            _ => {
                unwrap.assert_error(403, "warrant_revoked");
                (Seen::RefusedWhole, None)
            }
        };
        Trial {
            id,
            seen,
            leaves,
            revocation_index,
        }
    };

    let mut trials = Vec::new();
    for n in 0..TRIALS {
        // 0, 1, …, 40 ms, then again from 0.
        let delay = StdDuration::from_millis((n as u64 * 41 / TRIALS as u64) % 41);
        trials.push(run(n, delay));
    }
    let has = |trials: &[Trial], s: Seen| trials.iter().any(|t| t.seen == s);
    // If the machine is so fast (or so slow) that 0 to 40 ms never put the
    // revocation on one side of the commit, look for that side on purpose.
    // Each extra trial waits longer (or shorter) than the last, in case the
    // machine got slower (or faster) since the warm-up.
    for (k, n) in (TRIALS..TRIALS + EXTRA_TRIALS).enumerate() {
        let k = k as u32;
        let delay = if !has(&trials, Seen::OpenedBefore) {
            batch_time * (2 + k)
        } else if !has(&trials, Seen::RevokedInFlight) {
            batch_time / (2 + k)
        } else {
            break;
        };
        trials.push(run(n, delay));
    }

    // The log, read once by the auditor: per warrant, no `opened` leaf after
    // its `revocation` leaf, and each reply said what its leaves say.
    let size = vault::tree_size(&c.auditor);
    let log = vault::entries(&c.auditor, 0, size);
    let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
    let mut refused_after_commit = 0;
    for trial in &trials {
        let revocations: Vec<u64> = log
            .iter()
            .filter(|e| e.leaf["event"] == "revocation" && e.leaf["warrant_id"] == trial.id)
            .map(|e| e.index)
            .collect();
        assert_eq!(revocations, [trial.revocation_index], "{}", trial.id);
        let unwraps: Vec<_> = log
            .iter()
            .filter(|e| e.leaf["event"] == "unwrap" && e.leaf["warrant_id"] == trial.id)
            .collect();
        for e in &unwraps {
            if e.leaf["outcome"] == "opened" {
                assert!(
                    e.index < trial.revocation_index,
                    "{}: opened leaf {} after its revocation leaf {}",
                    trial.id,
                    e.index,
                    trial.revocation_index
                );
            } else {
                assert_eq!(e.leaf["reason"], "warrant_revoked", "{}", trial.id);
                assert!(e.index > trial.revocation_index, "{}", trial.id);
            }
        }
        let spent: i64 = db
            .query_row(
                "SELECT spent FROM warrants WHERE id = ?1",
                [&trial.id],
                |row| row.get(0),
            )
            .unwrap_or(0);
        match trial.seen {
            Seen::OpenedBefore => {
                let (first, count) = trial.leaves.unwrap();
                assert_eq!(unwraps.len() as u64, count);
                assert!(unwraps.iter().all(|e| e.leaf["outcome"] == "opened"));
                assert_eq!(unwraps[0].index, first);
                assert_eq!(spent, BATCH as i64, "{}", trial.id);
            }
            Seen::RevokedInFlight => {
                let (first, count) = trial.leaves.unwrap();
                assert_eq!(unwraps.len() as u64, count);
                assert_eq!(unwraps[0].index, first);
                assert!(unwraps.iter().all(|e| e.leaf["outcome"] == "denied"));
                assert_eq!(spent, 0, "{}", trial.id);
            }
            Seen::RefusedWhole if !unwraps.is_empty() => {
                assert_eq!(unwraps.len(), BATCH, "{}", trial.id);
                assert!(unwraps.iter().all(|e| e.leaf["outcome"] == "opened"));
                assert_eq!(spent, BATCH as i64, "{}", trial.id);
                refused_after_commit += 1;
            }
            Seen::RefusedWhole => {
                assert!(unwraps.is_empty(), "{}", trial.id);
                assert_eq!(spent, 0, "{}", trial.id);
                let refused = log.iter().find(|e| {
                    e.leaf["event"] == "warrant_refused" && e.leaf["warrant_id"] == trial.id
                });
                let refused = refused.expect("the refusal is logged");
                assert_eq!(refused.leaf["reason"], "warrant_revoked");
                assert!(refused.index > trial.revocation_index);
            }
        }
    }

    let count = |s: Seen| trials.iter().filter(|t| t.seen == s).count();
    let elapsed = started.elapsed();
    println!(
        "{} trials in {:.1} s (batch of {BATCH} takes {} ms unrevoked): opened before {}, \
         revoked in flight {}, refused whole {}, refused after the commit {refused_after_commit}",
        trials.len(),
        elapsed.as_secs_f64(),
        batch_time.as_millis(),
        count(Seen::OpenedBefore),
        count(Seen::RevokedInFlight),
        count(Seen::RefusedWhole) - refused_after_commit
    );
    assert!(trials.len() >= TRIALS);
    // Both sides of the commit were exercised: the invariant above was
    // checked where it matters, not only on requests refused whole.
    assert!(count(Seen::RevokedInFlight) > 0, "never caught in flight");
    assert!(count(Seen::OpenedBefore) > 0, "never committed first");
}

/// A revocation does not queue behind the agency's own unwraps: with
/// `blocking_threads = 4` and room at the envelope gate for one envelope,
/// one unwrap is held inside its HSM open (the fault module's `hang`) and
/// four more wait for the gate, holding every blocking thread. The admin's
/// revocation of their warrant is still answered at once, and each of them
/// then releases nothing. Before, it ran on the blocking pool and waited
/// behind them.
#[test]
fn a_revocation_is_not_queued_behind_unwraps_waiting_at_the_gate() {
    let h = Held::with(&["E-1"], |config| {
        config.replace(
            "shutdown_grace_secs = 10\n",
            "shutdown_grace_secs = 10\nblocking_threads = 4\n",
        ) + "\n[limits]\nmax_envelopes_in_flight = 1\nrate_limit_per_second = 1000.0\n\
             rate_limit_burst = 1000\n"
    });
    let escrow = vault::published_key(&h.c.provider, "E-1");
    let recipient = vault::recipient();
    let id = "W-REVOKED-BEHIND-THE-GATE";
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 100));
    let body =
        serde_json::json!({"warrant": warrant, "envelopes": [h.seal(&escrow, "E-1", "held")]});
    h.shim.set("fault = hang\nfault_calls = C_DeriveKey");
    std::thread::scope(|s| {
        let unwraps: Vec<_> = (0..5)
            .map(|i| {
                let body = &body;
                let agency = &h.c.agency;
                let shim = &h.shim;
                let handle = s.spawn(move || vault::post(agency, "/v1/unwrap", body));
                if i == 0 {
                    let deadline = Instant::now() + StdDuration::from_secs(20);
                    while shim.faults() == 0 {
                        assert!(
                            Instant::now() < deadline,
                            "the first unwrap never reached the HSM"
                        );
                        std::thread::sleep(StdDuration::from_millis(20));
                    }
                }
                handle
            })
            .collect();
        // The other four reach the gate (a handshake and a body each), and
        // with them every blocking thread is taken: `/readyz`, whose store
        // check needs one, gets no answer from it (503 after its 5 s).
        let ready = h.daemon.wait_readyz(503).json();
        assert_eq!(ready["store"], false, "{ready}");
        // Answered within 5 s, or not at all.
        let mut admin = h.c.admin.connect().expect("admin connection");
        softhsm_tests::server::set_read_timeout(&mut admin, StdDuration::from_secs(5));
        let revoked = admin.request(
            "POST",
            "/v1/warrants/revocations",
            &[],
            Some(
                serde_json::json!({"id": id, "reason": "quashed"})
                    .to_string()
                    .as_bytes(),
            ),
        );
        let answered_while_held = unwraps.iter().any(|u| u.is_finished());
        // Let them go before any assertion, so that a failure ends the test.
        h.shim.set("");
        let revoked = revoked.expect("the revocation was not answered within 5 s");
        assert_eq!(revoked.status, 200, "{}", revoked.text());
        assert!(
            !answered_while_held,
            "an unwrap answered while the HSM was held"
        );
        let mut seen: Vec<String> = unwraps
            .into_iter()
            .map(|u| {
                let r = u.join().unwrap();
                match r.status {
                    200 => vault::statuses(&r.json()).join(","),
                    _ => {
                        r.assert_error(403, "warrant_revoked");
                        "warrant_revoked".to_string()
                    }
                }
            })
            .collect();
        seen.sort();
        // The held one's open is withdrawn at its commit; the rest are
        // refused whole once they get their turn.
        assert_eq!(
            seen,
            [
                "warrant_revoked",
                "warrant_revoked",
                "warrant_revoked",
                "warrant_revoked",
                "warrant_revoked"
            ],
            "{seen:?}"
        );
    });
}

/// A revocation committed after an unwrap's audit commit and before its
/// release (the unwrap's checkpoint signature, `C_Sign`, held in the HSM
/// meanwhile) releases nothing of it: 403 `warrant_revoked`, its leaves
/// `opened` before the revocation's and its budget spent. Where the race
/// above only counts the trials that land there, this lands there each
/// time. Before 2026-12-07 the keys were released after the revocation's
/// admin had been told `revoked`, unless under `release_after_witness`.
#[test]
fn a_warrant_revoked_while_its_checkpoint_is_signed_releases_nothing() {
    let h = Held::new(&["E-1"]);
    let c = &h.c;
    let escrow = vault::published_key(&c.provider, "E-1");
    let envelopes = [h.seal(&escrow, "E-1", "one"), h.seal(&escrow, "E-1", "two")];
    let recipient = vault::recipient();
    let id = "W-REVOKED-AT-SIGNING";
    let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 10));
    let db = rusqlite::Connection::open(h.t.path("lavd.db")).unwrap();
    let revocation_committed = || -> bool {
        db.query_row(
            "SELECT count(*) FROM warrant_revocations WHERE id = ?1",
            [id],
            |row| row.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    };
    let wait = StdDuration::from_secs(20);

    h.shim.set("fault = hang\nfault_calls = C_Sign");
    let (reply, revoked) = std::thread::scope(|s| {
        let _release = h.shim.releasing();
        let request = s.spawn(|| {
            vault::post(
                &c.agency,
                "/v1/unwrap",
                &serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
            )
        });
        // The warrant's row is made as the request is admitted.
        softhsm_tests::eventually("the unwrap's audit commit", wait, || {
            db.query_row("SELECT spent FROM warrants WHERE id = ?1", [id], |row| {
                row.get::<_, i64>(0)
            })
            .is_ok_and(|spent| spent == 2)
        });
        softhsm_tests::eventually("its checkpoint's signature", wait, || h.shim.faults() > 0);
        let revoke = s.spawn(|| {
            vault::post(
                &c.admin,
                "/v1/warrants/revocations",
                &serde_json::json!({"id": id, "reason": "quashed after the commit"}),
            )
        });
        softhsm_tests::eventually("the revocation's commit", wait, revocation_committed);
        assert!(!request.is_finished(), "the unwrap answered while held");
        h.shim.set("");
        (request.join().unwrap(), revoke.join().unwrap())
    });
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    reply.assert_error(403, "warrant_revoked");

    let revocation = revoked.json()["audit"]["first_index"].as_u64().unwrap();
    let log = vault::entries(&c.auditor, 0, vault::tree_size(&c.auditor));
    let unwraps: Vec<_> = log
        .iter()
        .filter(|e| e.leaf["event"] == "unwrap" && e.leaf["warrant_id"] == id)
        .collect();
    assert_eq!(unwraps.len(), 2, "{unwraps:?}");
    assert!(unwraps
        .iter()
        .all(|e| e.leaf["outcome"] == "opened" && e.index < revocation));
    assert_eq!(vault::spent(&h.t, id), 2);
    // Charged and not released, which operators see counted apart.
    let unreleased = "lavd_envelopes_unreleased_total{code=\"warrant_revoked\"}";
    assert_eq!(h.daemon.metric(unreleased), 2.0);
    assert_eq!(h.daemon.metric("lavd_envelopes_total{outcome=\"ok\"}"), 0.0);
}
