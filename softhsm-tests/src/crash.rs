//! Crash rounds: agencies unwrap concurrently against real `lavd serve`
//! processes, some are killed with SIGKILL at a random moment, and after the
//! restart the test checks, against the restarted daemon, what the kill
//! must not have broken:
//!
//! - the audit log verifies with the real `lavd audit verify --url`, and
//!   extends the checkpoint saved after the previous round;
//! - each warrant's spent budget equals the number of `opened` leaves it
//!   has in the log, and never exceeds its `max_unwraps`;
//! - every reply a client received (HTTP 200) is in the log: its leaves at
//!   the indices it names, one per envelope (by envelope digest), each
//!   outcome as the reply said; and its checkpoint is a prefix of the log;
//! - no HSM open goes unlogged ([`Checker::check_opens_logged`]): every
//!   ECDH derive lavd asked the HSM for (the latency and fault module's
//!   `derive_log`, written before each call is forwarded, so a kill leaves
//!   it whole) has a leaf for its envelope, whatever the kill cut.
//!
//! Audit before release means no received DEK can be missing from the log,
//! and the budget spend commits with the leaves, so a crash cannot make the
//! two disagree. Used by `tests/crash_rounds.rs` on SQLite and on
//! PostgreSQL replicas.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lavd::audit::note::verify_note;
use lavd::envelope::reply::{open_reply, Outcome};
use lavd::jwk::{P256PrivateKey, P256PublicKey};
use time::OffsetDateTime;

use crate::server::{Client, Pki};
use crate::vault::{self, Parties, TARGET};
use crate::{assert_ok, TestToken};

/// The number of rounds: `LAVD_CRASH_ROUNDS`, else `default` (CI runs the
/// default; `.ci/long-run` sets 50).
pub fn rounds(default: u64) -> u64 {
    match std::env::var("LAVD_CRASH_ROUNDS") {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("LAVD_CRASH_ROUNDS={n:?} is not a number")),
        Err(_) => default,
    }
}

/// A small deterministic generator (xorshift64*) for kill times and
/// victims; its seed is printed so that a failing run can be repeated
/// with `LAVD_CRASH_SEED`.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from `LAVD_CRASH_SEED`, else from the clock.
    pub fn from_env() -> Self {
        let seed = std::env::var("LAVD_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("crash rounds: LAVD_CRASH_SEED={seed}");
        Rng(seed.max(1))
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// A reply a client received (HTTP 200), with what it asked.
#[derive(Debug)]
pub struct Received {
    /// The warrant id it named.
    pub warrant: &'static str,
    /// `envelope_digest` of each envelope sent.
    pub digests: Vec<String>,
    /// `ok` or the denial reason, per envelope.
    pub statuses: Vec<String>,
    /// The reply's first leaf index.
    pub first_index: u64,
    /// Its number of leaves.
    pub count: u64,
    /// The checkpoint it carried.
    pub checkpoint: String,
}

/// What one agency thread needs.
#[derive(Clone)]
pub struct Load {
    /// The agency's client of one daemon.
    pub agency: Client,
    /// The escrow key `E-1`.
    pub escrow: P256PublicKey,
    /// The agency's recipient key.
    pub recipient: Arc<P256PrivateKey>,
    /// The warrants it alternates between, by id.
    pub warrants: Arc<Vec<(&'static str, serde_json::Value)>>,
    /// Set when the round is over, for threads whose daemon survived.
    pub stop: Arc<AtomicBool>,
    /// Every envelope sent, answered or not: its `enc` (hex) → its
    /// `envelope_digest`, for [`Checker::check_opens_logged`].
    pub sent: Sent,
}

/// See [`Load::sent`].
pub type Sent = Arc<Mutex<HashMap<String, String>>>;

/// The hex of an envelope's `enc` (the point the HSM's derive is given).
fn enc_hex(envelope: &serde_json::Value) -> String {
    let enc = lavd::codec::b64_decode(envelope["enc"].as_str().expect("enc")).expect("base64url");
    enc.iter().map(|b| format!("{b:02x}")).collect()
}

/// How an agency thread's round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The round was over ([`Load::stop`]).
    Stopped,
    /// A request it had sent got no answer: the connection failed.
    Cut,
    /// It could not connect at all.
    NoConnection,
}

/// One agency thread: unwraps small batches (1 to 3 envelopes) on one
/// keep-alive connection, alternating warrants, until its daemon dies under
/// it or the round is over. Every DEK in every reply must be the one
/// sealed. Also says how it ended, which [`join_round`] holds against
/// whether its daemon was killed.
pub fn agency_thread(load: Load, round: u64, thread: usize) -> (Vec<Received>, Ended) {
    let mut received = Vec::new();
    let Ok(mut conn) = load.agency.connect() else {
        return (received, Ended::NoConnection);
    };
    let now = OffsetDateTime::now_utc();
    for n in 0usize.. {
        if load.stop.load(Ordering::SeqCst) {
            return (received, Ended::Stopped);
        }
        let (warrant_id, warrant) = &load.warrants[n % load.warrants.len()];
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
        {
            let mut sent = load.sent.lock().expect("sent");
            for e in &envelopes {
                sent.insert(enc_hex(e), vault::envelope_digest(e));
            }
        }
        let body = serde_json::json!({"warrant": warrant, "envelopes": envelopes});
        let Ok(r) = conn.request("POST", "/v1/unwrap", &[], Some(body.to_string().as_bytes()))
        else {
            // The daemon was killed (if it was not, `join_round` says so).
            return (received, Ended::Cut);
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
    unreachable!("the loop ends when the daemon dies or the round ends")
}

/// The auditor's side of the checks, kept across rounds.
#[derive(Debug)]
pub struct Checker {
    key: String,
    ca: String,
    cert: String,
    client_key: String,
    previous_checkpoint: Option<PathBuf>,
    /// Leaf checks of received replies, over all rounds (each reply is
    /// checked again after every later round).
    pub leaves_checked: u64,
}

/// What one round's checks found.
#[derive(Debug, Default)]
pub struct Findings {
    /// The log's size.
    pub size: u64,
    /// `opened` leaves per warrant.
    pub opened: BTreeMap<String, u64>,
    /// Leaves of received replies missing from the log or not as the
    /// reply said (must be empty).
    pub lost: Vec<String>,
}

impl Checker {
    /// The audit key (from `lavd audit key`) and the auditor's files.
    pub fn new(t: &TestToken, pki: &Pki, parties: &Parties) -> Self {
        let key = assert_ok(&t.lavd_with_config(&["audit", "key"]))
            .trim()
            .to_string();
        let (ca, cert, client_key) = pki.cli_files(&parties.auditor, "auditor");
        Checker {
            key,
            ca,
            cert,
            client_key,
            previous_checkpoint: None,
            leaves_checked: 0,
        }
    }

    /// Runs the three checks against the daemon at `auditor`'s address
    /// after round `round`; `spent(id)` reads a warrant's spent budget from
    /// the store (0 if it has no row). Panics on a failed check.
    pub fn check(
        &mut self,
        t: &TestToken,
        round: u64,
        auditor: &Client,
        received: &[Received],
        warrants: &[(&'static str, u64)],
        mut spent: impl FnMut(&str) -> u64,
    ) -> Findings {
        // (a) The log verifies, and extends what was verified last round.
        let checkpoint = t.path(&format!("checkpoint-{round}"));
        let url = format!("https://{}", auditor.addr());
        let mut verify = vec![
            "audit",
            "verify",
            "--key",
            &self.key,
            "--url",
            &url,
            "--ca",
            &self.ca,
            "--cert",
            &self.cert,
            "--client-key",
            &self.client_key,
            "--save-checkpoint",
            checkpoint.to_str().expect("utf-8 path"),
        ];
        let previous = self.previous_checkpoint.clone();
        if let Some(p) = previous.as_ref() {
            verify.extend(["--checkpoint", p.to_str().expect("utf-8 path")]);
        }
        let summary = assert_ok(&t.lavd(&verify));
        assert!(summary.contains("verdict: the log verifies"), "{summary}");
        self.previous_checkpoint = Some(checkpoint);

        let size = vault::tree_size(auditor);
        let log = vault::entries(auditor, 0, size);
        let tree = vault::memory_tree(&log);

        // (b) Spent budget = opened leaves, never above the maximum.
        let mut findings = Findings {
            size,
            ..Findings::default()
        };
        for e in &log {
            if e.leaf["event"] == "unwrap" && e.leaf["outcome"] == "opened" {
                *findings
                    .opened
                    .entry(e.leaf["warrant_id"].as_str().expect("id").to_string())
                    .or_default() += 1;
            }
        }
        for (id, max) in warrants {
            let logged = findings.opened.get(*id).copied().unwrap_or(0);
            assert_eq!(spent(id), logged, "round {round}: {id}");
            assert!(logged <= *max, "round {round}: {id} opened {logged}");
        }

        // (c) Every received reply is in the log as it said.
        for r in received {
            assert_eq!(r.count as usize, r.digests.len());
            for (i, (digest, status)) in r.digests.iter().zip(&r.statuses).enumerate() {
                let index = r.first_index + i as u64;
                self.leaves_checked += 1;
                let Some(e) = log.get(index as usize) else {
                    findings.lost.push(format!("leaf {index} is gone"));
                    continue;
                };
                let (outcome, reason) = if status == "ok" {
                    ("opened", None)
                } else {
                    ("denied", Some(status.as_str()))
                };
                let as_said = e.index == index
                    && e.leaf["event"] == "unwrap"
                    && e.leaf["warrant_id"] == r.warrant
                    && e.leaf["envelope_digest"] == digest.as_str()
                    && e.leaf["outcome"] == outcome
                    && reason.is_none_or(|reason| e.leaf["reason"] == reason);
                if !as_said {
                    findings
                        .lost
                        .push(format!("leaf {index} is not as replied: {}", e.leaf));
                }
            }
            let cp = verify_note(&r.checkpoint, &self.key).expect("reply checkpoint verifies");
            assert!(cp.size >= r.first_index + r.count && cp.size <= size);
            assert_eq!(tree.root(cp.size).expect("root"), cp.root, "round {round}");
        }
        assert!(
            findings.lost.is_empty(),
            "round {round}: received replies not in the log: {:?}",
            findings.lost
        );
        findings
    }
}

impl Checker {
    /// (d) No HSM open goes unlogged: every line of `derive_log` (each
    /// derive lavd asked the HSM for, but its pair checks on the
    /// generator) names an envelope some thread sent,
    /// and the log (read through `auditor`) has an `unwrap` leaf for it.
    /// Waits up to `within` for them (on PostgreSQL a killed replica's
    /// opens are logged once their lease has run out); panics naming the
    /// missing ones. Returns how many derives it checked, and how many
    /// leaves of the log say `open_interrupted`.
    pub fn check_opens_logged(
        &self,
        round: u64,
        auditor: &Client,
        derive_log: &Path,
        sent: &Sent,
        within: Duration,
    ) -> (usize, usize) {
        // A derive on P-256's generator is lavd's check that a key it
        // publishes has agreeing halves (`Hsm::check_pair`): it yields the
        // public key's x and opens nothing; an envelope whose `enc` is G is
        // refused before any derive (`envelope_refusals.rs`).
        let pair_check = hex::encode(lavd::hsm::P256_GENERATOR);
        let derived: Vec<String> = std::fs::read_to_string(derive_log)
            .unwrap_or_default()
            .lines()
            .filter(|line| *line != pair_check)
            .map(str::to_string)
            .collect();
        let sent = sent.lock().expect("sent").clone();
        let digests: Vec<&String> = derived
            .iter()
            .map(|enc| {
                sent.get(enc).unwrap_or_else(|| {
                    panic!("round {round}: lavd derived on a point no client sent: {enc}")
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + within;
        loop {
            let size = vault::tree_size(auditor);
            let log = vault::entries(auditor, 0, size);
            let logged: std::collections::HashSet<String> = log
                .iter()
                .filter(|e| e.leaf["event"] == "unwrap")
                .filter_map(|e| e.leaf["envelope_digest"].as_str().map(str::to_string))
                .collect();
            let missing: Vec<&&String> = digests.iter().filter(|d| !logged.contains(**d)).collect();
            if missing.is_empty() {
                let interrupted = log
                    .iter()
                    .filter(|e| e.leaf["reason"] == "open_interrupted")
                    .count();
                return (derived.len(), interrupted);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: {} of {} HSM opens have no leaf after {within:?}: {missing:?}",
                missing.len(),
                derived.len()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Waits up to `timeout` for the threads of a round and gathers their
/// replies; returns how many requests the kill cut.
///
/// A thread whose daemon was not killed (`killed(thread)` false) must have
/// run to the end of the round: a connection it could not make, or a
/// request that got no answer, is a failure of a daemon that should have
/// been serving, not a casualty of the kill.
pub fn join_round(
    threads: Vec<std::thread::JoinHandle<(Vec<Received>, Ended)>>,
    received: &mut Vec<Received>,
    killed: impl Fn(usize) -> bool,
) -> usize {
    let mut cut = 0;
    for (i, thread) in threads.into_iter().enumerate() {
        let (replies, ended) = thread.join().expect("agency thread");
        received.extend(replies);
        assert!(
            killed(i) || ended == Ended::Stopped,
            "agency thread {i}, whose daemon was not killed, ended {ended:?}"
        );
        cut += usize::from(ended == Ended::Cut);
    }
    cut
}

/// A kill delay for a round: `from_ms` plus up to 500 ms.
pub fn kill_delay(rng: &mut Rng, from_ms: u64) -> Duration {
    Duration::from_millis(from_ms + rng.below(501))
}
