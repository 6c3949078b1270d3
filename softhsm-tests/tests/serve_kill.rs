//! Crash safety of `lavd serve` under load: 20 times, the daemon is killed
//! with SIGKILL while several agencies' threads are unwrapping (small
//! batches under a warrant with a large budget, and under one with a small
//! budget they all compete for), then restarted on the same token and
//! store. After every restart:
//!
//! - the audit log verifies with the real `lavd audit verify --url`, as the
//!   auditor fetches it from the restarted daemon, and extends the
//!   checkpoint saved after the previous crash;
//! - each warrant's spent budget equals the number of `opened` leaves it has
//!   in the log, and never exceeds its `max_unwraps`;
//! - every reply a client received is in the log: its leaves at the indices
//!   it names, one per envelope (by envelope digest), each outcome as the
//!   reply said; and its checkpoint is a prefix of the log as it is now.
//!
//! Audit before release means no received DEK can be missing from the log,
//! and the budget spend commits with the leaves, so a crash cannot make the
//! two disagree.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lavd::audit::merkle::MemoryTree;
use lavd::audit::note::verify_note;
use lavd::envelope::reply::{open_reply, Outcome};
use lavd::jwk::{P256PrivateKey, P256PublicKey};
use rusqlite::OptionalExtension as _;
use rustix::process::Signal;
use softhsm_tests::server::{serve_config, Client, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{assert_ok, TestToken};
use time::OffsetDateTime;

const ROUNDS: u64 = 20;
const THREADS: usize = 4;
const BIG: (&str, u64) = ("W-BIG", 1_000_000);
/// Runs out within the first rounds on a quiet machine (about 130
/// small-budget envelopes a round), and within the 20 rounds on one loaded
/// ten times over (a loaded 2-core run received 216 replies, about 110
/// small-budget envelopes, in all 20 rounds).
const SMALL: (&str, u64) = ("W-SMALL", 100);

/// A reply a client received (HTTP 200), with what it asked.
#[derive(Debug)]
struct Received {
    warrant: &'static str,
    /// `envelope_digest` of each envelope sent.
    digests: Vec<String>,
    /// `ok` or the denial reason, per envelope.
    statuses: Vec<String>,
    first_index: u64,
    count: u64,
    checkpoint: String,
}

struct Load {
    agency: Client,
    escrow: P256PublicKey,
    recipient: Arc<P256PrivateKey>,
    warrants: Arc<[(&'static str, serde_json::Value); 2]>,
}

/// One agency thread: unwraps small batches on one keep-alive connection,
/// alternating warrants, until the daemon dies under it. Every DEK in every
/// reply must be the one sealed. Also says whether the kill cut a request
/// it had sent.
fn agency_thread(load: Load, round: u64, thread: usize) -> (Vec<Received>, bool) {
    let mut received = Vec::new();
    let Ok(mut conn) = load.agency.connect() else {
        return (received, false);
    };
    let now = OffsetDateTime::now_utc();
    for n in 0usize.. {
        let (warrant_id, warrant) = &load.warrants[n % 2];
        let size = 1 + (n + thread) % 3;
        let deks: Vec<Vec<u8>> = (0..size)
            .map(|i| format!("{round:02}-{thread}-{n:05}-{i}-dek-pad").into_bytes())
            .collect();
        let envelopes: Vec<_> = deks
            .iter()
            .enumerate()
            .map(|(i, dek)| {
                vault::seal(
                    &load.escrow,
                    "E-1",
                    TARGET,
                    now - time::Duration::seconds(i as i64 + 1),
                    &format!("r{round}-t{thread}-n{n}-{i}"),
                    dek,
                )
            })
            .collect();
        let body = serde_json::json!({"warrant": warrant, "envelopes": envelopes});
        let Ok(r) = conn.request("POST", "/v1/unwrap", &[], Some(body.to_string().as_bytes()))
        else {
            // The daemon was killed.
            return (received, true);
        };
        assert_eq!(r.status, 200, "{}", r.text());
        let reply = r.json();
        let opened =
            open_reply(&load.recipient, &vault::headers(&envelopes), &r.body).expect("reply opens");
        for (result, dek) in opened.results.iter().zip(&deks) {
            if let Outcome::Ok(got) = &result.outcome {
                assert_eq!(got.as_slice(), dek.as_slice());
            }
        }
        received.push(Received {
            warrant: warrant_id,
            digests: envelopes.iter().map(vault::envelope_digest).collect(),
            statuses: vault::statuses(&reply),
            first_index: opened.audit.first_index,
            count: opened.audit.count,
            checkpoint: opened.audit.checkpoint,
        });
    }
    unreachable!("the loop ends when the daemon dies")
}

#[test]
fn sigkill_under_concurrent_unwraps_loses_no_released_key_and_no_budget() {
    let started = Instant::now();
    let t = TestToken::new();
    let pki = Pki::new(&t);
    t.write_config(&serve_config(&format!(
        "{}[limits]\nmax_batch = 10\nrate_limit_per_second = 100000\nrate_limit_burst = 100000\n",
        vault::roles_toml()
    )));
    vault::generate_escrow_key(&t, "E-1");
    let parties = Parties::new(&pki);
    let recipient = Arc::new(vault::recipient());
    let warrants = Arc::new([BIG, SMALL].map(|(id, max)| {
        // Signed once: a warrant id always carries the same payload.
        (
            id,
            vault::double_lock(&vault::claims(id, recipient.public(), max)),
        )
    }));
    let max_of = |id: &str| if id == BIG.0 { BIG.1 } else { SMALL.1 };

    let mut daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let escrow = vault::published_key(&parties.clients(&pki, daemon.api).provider, "E-1");
    let key = assert_ok(&t.lavd_with_config(&["audit", "key"]))
        .trim()
        .to_string();
    // The auditor's files for `lavd audit verify --url`.
    let (ca, auditor_cert, auditor_key) = pki.cli_files(&parties.auditor, "auditor");
    let mut received: Vec<Received> = Vec::new();
    let mut cut = 0;
    let mut previous_checkpoint: Option<std::path::PathBuf> = None;
    for round in 0..ROUNDS {
        let c = parties.clients(&pki, daemon.api);
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let load = Load {
                    agency: c.agency.clone(),
                    escrow: escrow.clone(),
                    recipient: recipient.clone(),
                    warrants: warrants.clone(),
                };
                std::thread::spawn(move || agency_thread(load, round, thread))
            })
            .collect();
        // Kill after 60..=560 ms, varying by round.
        std::thread::sleep(Duration::from_millis(60 + round * 7919 % 501));
        daemon.signal(Signal::KILL);
        daemon.wait_exit(Duration::from_secs(30));
        for thread in threads {
            let (replies, cut_mid_request) = thread.join().expect("agency thread");
            received.extend(replies);
            cut += usize::from(cut_mid_request);
        }

        daemon = Daemon::start(&t);
        daemon.wait_readyz(200);
        let c = parties.clients(&pki, daemon.api);

        // (a) The log verifies, and extends what was verified last round:
        // `lavd audit verify --url` fetches it from the restarted daemon as
        // the auditor.
        let checkpoint = t.path(&format!("checkpoint-{round}"));
        let url = format!("https://{}", daemon.api);
        let mut verify = vec![
            "audit",
            "verify",
            "--key",
            &key,
            "--url",
            &url,
            "--ca",
            &ca,
            "--cert",
            &auditor_cert,
            "--client-key",
            &auditor_key,
            "--save-checkpoint",
            checkpoint.to_str().unwrap(),
        ];
        if let Some(p) = previous_checkpoint.as_ref() {
            verify.extend(["--checkpoint", p.to_str().unwrap()]);
        }
        let summary = assert_ok(&t.lavd(&verify));
        assert!(summary.contains("verdict: the log verifies"), "{summary}");
        previous_checkpoint = Some(checkpoint);

        // The auditor reads the log from the restarted daemon.
        let size = vault::tree_size(&c.auditor);
        let log = vault::entries(&c.auditor, 0, size);
        let mut tree = MemoryTree::new();
        for e in &log {
            tree.push_leaf(&e.bytes);
        }

        // (b) Spent budget = opened leaves, never above the maximum.
        let mut opened: BTreeMap<String, u64> = BTreeMap::new();
        for e in &log {
            if e.leaf["event"] == "unwrap" && e.leaf["outcome"] == "opened" {
                *opened
                    .entry(e.leaf["warrant_id"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
        let db = rusqlite::Connection::open(t.path("lavd.db")).unwrap();
        for (id, _) in warrants.iter() {
            let spent: Option<u64> = db
                .query_row("SELECT spent FROM warrants WHERE id = ?1", [id], |row| {
                    row.get(0)
                })
                .optional()
                .unwrap();
            let logged = opened.get(*id).copied().unwrap_or(0);
            assert_eq!(spent.unwrap_or(0), logged, "round {round}: {id}");
            assert!(logged <= max_of(id), "round {round}: {id} opened {logged}");
        }

        // (c) Every received reply is in the log as it said.
        let vkey = &key;
        for r in &received {
            assert_eq!(r.count as usize, r.digests.len());
            for (i, (digest, status)) in r.digests.iter().zip(&r.statuses).enumerate() {
                let index = r.first_index + i as u64;
                let e = log
                    .get(index as usize)
                    .unwrap_or_else(|| panic!("round {round}: leaf {index} of a reply is gone"));
                assert_eq!(e.index, index);
                assert_eq!(e.leaf["event"], "unwrap");
                assert_eq!(e.leaf["warrant_id"], r.warrant);
                assert_eq!(e.leaf["envelope_digest"], digest.as_str());
                if status == "ok" {
                    assert_eq!(e.leaf["outcome"], "opened", "{index}");
                } else {
                    assert_eq!(e.leaf["outcome"], "denied", "{index}");
                    assert_eq!(e.leaf["reason"], status.as_str(), "{index}");
                }
            }
            let cp = verify_note(&r.checkpoint, vkey).unwrap();
            assert!(cp.size >= r.first_index + r.count && cp.size <= size);
            assert_eq!(tree.root(cp.size).unwrap(), cp.root, "round {round}");
        }
    }
    let denied_small = received
        .iter()
        .filter(|r| r.warrant == SMALL.0)
        .flat_map(|r| &r.statuses)
        .filter(|s| *s == "budget_exhausted")
        .count();
    eprintln!(
        "{ROUNDS} rounds, {} replies received, {cut} requests cut by the kill, \
         {denied_small} envelopes refused for the small budget, {:?}",
        received.len(),
        started.elapsed()
    );
    assert!(received.len() >= ROUNDS as usize, "the load never ran");
    assert!(cut > 0, "no kill landed on a request in flight");
    assert!(denied_small > 0, "the small budget never ran out");
}
