//! Unwrap load with a fault in the middle, and its accounting, for the
//! fault tests (`hsm_faults`, `store_faults`).
//!
//! Agency threads send the same unwrap request over and over (each opens
//! its envelopes again and spends budget again) and record every answer:
//! when it was sent, how long it took, its status and code, and for a 200
//! where its leaves are. The test injects a fault while they run and marks
//! two instants: when the fault is known to be in force, and when it is
//! cleared. [`Figures`] then checks and prints what the fault tests
//! promise: only 200s and the expected 503 code, no 200 for a request sent
//! and answered within the fault, no answer slower than the bound, and
//! service again after the fault.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::server::{serve_config, Client, Daemon, Pki};
use crate::vault::{self, Parties, TARGET};
use crate::TestToken;

/// Agency threads of [`Case::run`]'s load.
pub const THREADS: usize = 4;
/// Envelopes in [`Case`]'s request.
pub const BATCH: usize = 4;
/// How long [`Case::run`] holds a fault that has an inside.
pub const HOLD: Duration = Duration::from_millis(4000);

/// One answered unwrap request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// When it was sent.
    pub sent: Instant,
    /// How long the answer took.
    pub took: Duration,
    /// The HTTP status; 0 when the connection failed.
    pub status: u16,
    /// `ok` for a 200, else the error code.
    pub code: String,
    /// For a 200: `(first_index, count)` of its leaves, and how many of its
    /// results were `ok`.
    pub leaves: Option<(u64, u64, usize)>,
}

/// Runs `threads` agency threads (round-robin over `agencies`) posting
/// `body` to `/v1/unwrap` until `during` returns; returns every answer and
/// what `during` returned.
pub fn under_load<R>(
    agencies: &[Client],
    body: &str,
    threads: usize,
    during: impl FnOnce() -> R,
) -> (Vec<Answer>, R) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load: Vec<_> = (0..threads)
            .map(|i| {
                let agency = agencies[i % agencies.len()].clone();
                let stop = &stop;
                s.spawn(move || {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let sent = Instant::now();
                        let r = agency.request("POST", "/v1/unwrap", Some(body.as_bytes()));
                        let took = sent.elapsed();
                        let answer = match r {
                            Err(_) => Answer {
                                sent,
                                took,
                                status: 0,
                                code: "connection_failed".into(),
                                leaves: None,
                            },
                            Ok(r) if r.status == 200 => {
                                let reply = r.json();
                                let ok = vault::statuses(&reply)
                                    .iter()
                                    .filter(|s| *s == "ok")
                                    .count();
                                let audit = &reply["audit"];
                                Answer {
                                    sent,
                                    took,
                                    status: 200,
                                    code: "ok".into(),
                                    leaves: Some((
                                        audit["first_index"].as_u64().expect("first_index"),
                                        audit["count"].as_u64().expect("count"),
                                        ok,
                                    )),
                                }
                            }
                            Ok(r) => Answer {
                                sent,
                                took,
                                status: r.status,
                                code: r.json()["error"]["code"]
                                    .as_str()
                                    .unwrap_or("no code")
                                    .to_string(),
                                leaves: None,
                            },
                        };
                        seen.push(answer);
                    }
                    seen
                })
            })
            .collect();
        // Stops the load however `during` ends, a failed assert too.
        let stopping = crate::StopOnDrop(&stop);
        let result = during();
        drop(stopping);
        let answers = load
            .into_iter()
            .flat_map(|h| h.join().expect("load thread"))
            .collect();
        (answers, result)
    })
}

/// What one fault run showed.
#[derive(Debug)]
pub struct Figures {
    /// The fault's name, for the printed line.
    pub name: String,
    /// Requests answered.
    pub requests: usize,
    /// Answers by `(status, code)`.
    pub by_code: BTreeMap<(u16, String), usize>,
    /// The slowest answer of the whole run.
    pub max_answer: Duration,
    /// The slowest answer to a request sent while the fault was in force.
    pub max_answer_in_fault: Duration,
    /// Requests sent and answered while the fault was in force.
    pub in_fault: usize,
    /// Of those, 200s with at least one opened envelope: must be 0.
    pub released_in_fault: usize,
    /// 200s sent after the fault was cleared.
    pub ok_after: usize,
}

impl Figures {
    /// Sorts `answers` against the fault's window `[on, off)`.
    pub fn new(name: &str, answers: &[Answer], on: Instant, off: Instant) -> Self {
        let mut by_code = BTreeMap::new();
        for a in answers {
            *by_code.entry((a.status, a.code.clone())).or_default() += 1;
        }
        let inside: Vec<&Answer> = answers
            .iter()
            .filter(|a| a.sent >= on && a.sent + a.took < off)
            .collect();
        Figures {
            name: name.to_string(),
            requests: answers.len(),
            by_code,
            max_answer: answers.iter().map(|a| a.took).max().unwrap_or_default(),
            max_answer_in_fault: answers
                .iter()
                .filter(|a| a.sent >= on && a.sent < off)
                .map(|a| a.took)
                .max()
                .unwrap_or_default(),
            in_fault: inside.len(),
            released_in_fault: inside
                .iter()
                .filter(|a| a.leaves.is_some_and(|(_, _, ok)| ok > 0))
                .count(),
            ok_after: answers
                .iter()
                .filter(|a| a.sent >= off && a.status == 200)
                .count(),
        }
    }

    /// Asserts what every fault test promises: only 200 and 503 `code`,
    /// some requests inside the fault and none of them releasing a key (a
    /// 503, or a 200 that opened nothing), no answer slower than `bound`,
    /// and 200s again after it.
    pub fn assert_fail_closed(&self, code: &str, bound: Duration) {
        assert!(
            self.in_fault > 0,
            "{}: no request inside the fault: {self:?}",
            self.name
        );
        self.assert_answers(code, bound);
    }

    /// [`Figures::assert_fail_closed`] without requiring requests inside the
    /// fault: for a fault too short to have an inside (a server restart).
    pub fn assert_answers(&self, code: &str, bound: Duration) {
        self.assert_only_ok_or_refused(code, bound);
        assert!(
            self.ok_after > 0,
            "{}: no 200 after the fault cleared: {self:?}",
            self.name
        );
    }

    /// Only 200 and 503 `code`, nothing released inside the fault, no
    /// answer slower than `bound`: for a fault that only a restart clears.
    /// Also 503 `spent_not_released` ([`refused_as`]).
    pub fn assert_only_ok_or_refused(&self, code: &str, bound: Duration) {
        for (status, c) in self.by_code.keys() {
            let refused = refused_as(c, code);
            assert!(
                (*status == 200 && c == "ok") || (*status == 503 && refused),
                "{}: unexpected answer {status} {c}: {self:?}",
                self.name
            );
        }
        assert_eq!(self.released_in_fault, 0, "{}: {self:?}", self.name);
        assert!(
            self.max_answer <= bound,
            "{}: an answer took {:?} (bound {bound:?}): {self:?}",
            self.name,
            self.max_answer
        );
    }

    /// One line for the test's output (and `docs/RELIABILITY.md`).
    pub fn print(&self, extra: &str) {
        let codes: Vec<String> = self
            .by_code
            .iter()
            .map(|((s, c), n)| format!("{s} {c}: {n}"))
            .collect();
        println!(
            "FIGURES {}: requests {}, [{}], in fault {} (released 0 expected: {}), \
             max answer {} ms (in fault {} ms), 200 after clearing {}{extra}",
            self.name,
            self.requests,
            codes.join(", "),
            self.in_fault,
            self.released_in_fault,
            self.max_answer.as_millis(),
            self.max_answer_in_fault.as_millis(),
            self.ok_after,
        );
    }
}

/// Checks the log after a fault run: every 200's leaves are in the log and
/// its `ok` results are `opened` leaves of `warrant`; returns `(opened
/// leaves of warrant in the whole log, opened leaves no 200 carried)`. The
/// second is the envelopes the HSM opened and the store committed whose
/// checkpoint could not then be signed (THREAT_MODEL §5.7): logged and
/// spent, never released.
pub fn audit_accounting(auditor: &Client, warrant: &str, answers: &[Answer]) -> (usize, usize) {
    let size = vault::tree_size(auditor);
    let log = vault::entries(auditor, 0, size);
    let mut carried = std::collections::HashSet::new();
    for a in answers {
        if let Some((first, count, ok)) = a.leaves {
            let opened = (first..first + count)
                .filter(|i| {
                    let leaf = &log[*i as usize].leaf;
                    assert_eq!(leaf["warrant_id"], warrant);
                    leaf["outcome"] == "opened"
                })
                .count();
            assert_eq!(opened, ok, "a 200's ok results are its opened leaves");
            carried.extend(first..first + count);
        }
    }
    let opened: Vec<u64> = log
        .iter()
        .filter(|e| {
            e.leaf["event"] == "unwrap"
                && e.leaf["warrant_id"] == warrant
                && e.leaf["outcome"] == "opened"
        })
        .map(|e| e.index)
        .collect();
    let not_released = opened.iter().filter(|i| !carried.contains(*i)).count();
    (opened.len(), not_released)
}

/// No HSM open went unlogged: the log (read through `auditor`) holds at
/// least one leaf of warrant `id` that follows an open (`opened`, or
/// denied `open_failed`, `audit_commit_failed` or `open_interrupted`) for
/// each derive in `derives` (the module's log of every derive the daemon
/// asked for, but its pair checks on the generator). Every request of a
/// [`Case`] sends the same envelopes, so leaves and derives are counted,
/// not matched. Those four are the outcomes a derived envelope can have in
/// a `Case` (a budget of 1,000,000, no revocation, reload, destruction or
/// deadline in flight); a case that brings one of those must count its
/// reason too (`DenyReason`). Waits up to 10 s for leaves written after a
/// fault (by the deferred writer, or a restart's sweep of the intents).
///
/// # Panics
/// When there are fewer leaves than derives, or no derive at all.
pub fn assert_opens_logged(name: &str, auditor: &Client, id: &str, derives: &std::path::Path) {
    let pair_check = hex::encode(lavd::hsm::P256_GENERATOR);
    let derived = std::fs::read_to_string(derives)
        .unwrap_or_default()
        .lines()
        .filter(|line| *line != pair_check)
        .count();
    assert!(derived > 0, "{name}: no HSM derive was logged");
    let leaves = || {
        let size = vault::tree_size(auditor);
        vault::entries(auditor, 0, size)
            .iter()
            .filter(|e| {
                e.leaf["event"] == "unwrap"
                    && e.leaf["warrant_id"] == id
                    && (e.leaf["outcome"] == "opened"
                        || ["open_failed", "audit_commit_failed", "open_interrupted"]
                            .iter()
                            .any(|r| e.leaf["reason"] == *r))
            })
            .count()
    };
    // What the warrant's leaves say, for the message.
    let outcomes = || {
        let size = vault::tree_size(auditor);
        let mut counts = BTreeMap::new();
        for e in vault::entries(auditor, 0, size) {
            if e.leaf["event"] == "unwrap" && e.leaf["warrant_id"] == id {
                let what = format!("{} {}", e.leaf["outcome"], e.leaf["reason"]);
                *counts.entry(what).or_insert(0usize) += 1;
            }
        }
        counts
    };
    assert!(
        wait_until(Duration::from_secs(10), || leaves() >= derived),
        "{name}: {derived} HSM opens, {} unwrap leaves that follow an open: an open went \
         unlogged; the warrant's leaves: {:?}",
        leaves(),
        outcomes()
    );
}

/// Polls `f` until it is true or `timeout` passes; returns whether it
/// became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Runs the real `lavd audit verify --url` against the daemon at `api` as
/// `auditor`, and asserts that the log verifies; returns its summary.
pub fn verify_log(
    t: &crate::TestToken,
    pki: &crate::server::Pki,
    auditor: &crate::server::Issued,
    api: std::net::SocketAddr,
) -> String {
    let key = crate::assert_ok(&t.lavd_with_config(&["audit", "key"]))
        .trim()
        .to_string();
    let (ca, cert, client_key) = pki.cli_files(auditor, "auditor");
    let url = format!("https://{api}");
    let summary = crate::assert_ok(&t.lavd(&[
        "audit",
        "verify",
        "--key",
        &key,
        "--url",
        &url,
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--client-key",
        &client_key,
    ]));
    assert!(summary.contains("verdict: the log verifies"), "{summary}");
    summary
}

/// A daemon on `t` (its config already written), with the parties, a
/// warrant with a large budget and one request of [`BATCH`] envelopes.
#[derive(Debug)]
pub struct Case {
    /// The PKI of the daemon and its clients.
    pub pki: Pki,
    /// The parties' certificates.
    pub parties: Parties,
    /// The daemon.
    pub daemon: Daemon,
    /// The agency's client.
    pub agency: Client,
    /// The auditor's client.
    pub auditor: Client,
    /// The unwrap request every thread sends.
    pub request: serde_json::Value,
    /// Its warrant's id.
    pub id: String,
    /// Where the latency and fault module logs each HSM derive the daemon
    /// makes, when [`Case::start_logging_derives`] started it.
    pub derives: Option<std::path::PathBuf>,
}

impl Case {
    /// Generates escrow key `E-1` on `t`, starts the daemon and waits until
    /// it is ready.
    pub fn start(t: &TestToken, pki: Pki, id: &str) -> Self {
        vault::generate_escrow_key(t, "E-1");
        let daemon = Daemon::start(t);
        daemon.wait_readyz(200);
        let parties = Parties::new(&pki);
        let c = parties.clients(&pki, daemon.api);
        let escrow = vault::published_key(&c.provider, "E-1");
        let recipient = vault::recipient();
        let warrant = vault::double_lock(&vault::claims(id, recipient.public(), 1_000_000));
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
        Case {
            pki,
            parties,
            agency: c.agency,
            auditor: c.auditor,
            daemon,
            request: serde_json::json!({"warrant": warrant, "envelopes": envelopes}),
            id: id.to_string(),
            derives: None,
        }
    }

    /// [`Case::start`], with every HSM derive the daemon makes logged by
    /// the latency and fault module `shim` (which `t`'s config must load)
    /// to a file that [`Case::run`] and [`assert_opens_logged`] hold the
    /// log to.
    pub fn start_logging_derives(t: &TestToken, pki: Pki, id: &str, shim: &crate::Shim) -> Self {
        let log = t.path("derives.log");
        shim.set(&format!("derive_log = {}", log.display()));
        let mut case = Case::start(t, pki, id);
        case.derives = Some(log);
        case
    }

    /// Sends the request until it is refused 503 `code` or
    /// `spent_not_released` ([`refused_as`]) (asserting that
    /// every earlier answer is a 200); returns how many envelopes those
    /// 200s opened, and a `spent_not_released` request's batch, whose opens
    /// committed.
    pub fn probe_until_refused(&self, code: &str) -> usize {
        let mut opened = 0;
        assert!(
            wait_until(Duration::from_secs(30), || {
                let r = vault::post(&self.agency, "/v1/unwrap", &self.request);
                if r.status == 503 {
                    let got = r.json()["error"]["code"].as_str().unwrap_or("").to_string();
                    if !refused_as(&got, code) {
                        r.assert_error(503, code);
                    }
                    // Its opens committed (spent, nothing released): counted
                    // with the 200s'.
                    if got == "spent_not_released" {
                        opened += self.request["envelopes"].as_array().map_or(0, Vec::len);
                    }
                    return true;
                }
                assert_eq!(r.status, 200, "{}", r.text());
                opened += vault::statuses(&r.json())
                    .iter()
                    .filter(|s| *s == "ok")
                    .count();
                false
            }),
            "the fault never refused a request"
        );
        opened
    }

    /// [`THREADS`] agency threads of load; after 0.7 s `inject` starts the
    /// fault and returns when it is in force (with the envelopes the
    /// test's own probes opened); with an inside, `/readyz` must turn 503
    /// and the fault is held [`HOLD`]; `clear` ends it, `/readyz` must turn
    /// 200, and the load runs on 0.7 s. Then every answer must be a 200 or
    /// 503 `code` within `bound` ([`Figures::assert_fail_closed`]), the
    /// budget (`spent`) must equal the `opened` leaves, the opened leaves
    /// no answer carried must be the probes' plus at most one request per
    /// thread, a new request must succeed, and the log must verify.
    /// Returns the figures, the opened leaves, and the opened leaves of
    /// requests answered 503 after their commit.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        t: &TestToken,
        name: &str,
        code: &str,
        bound: Duration,
        with_inside: bool,
        inject: impl FnOnce(&Case) -> usize,
        clear: impl FnOnce(),
        spent: impl FnOnce() -> i64,
    ) -> (Figures, usize, usize) {
        let body = self.request.to_string();
        let (answers, (on, off, probes_opened)) =
            under_load(std::slice::from_ref(&self.agency), &body, THREADS, || {
                std::thread::sleep(Duration::from_millis(700));
                let probes_opened = inject(self);
                let on = Instant::now();
                if with_inside {
                    self.daemon.wait_readyz(503);
                    std::thread::sleep(HOLD.saturating_sub(on.elapsed()));
                }
                let off = Instant::now();
                clear();
                self.daemon.wait_readyz(200);
                std::thread::sleep(Duration::from_millis(700));
                (on, off, probes_opened)
            });
        let figures = Figures::new(name, &answers, on, off);
        if with_inside {
            figures.assert_fail_closed(code, bound);
        } else {
            figures.assert_answers(code, bound);
        }
        let (opened, not_carried) = audit_accounting(&self.auditor, &self.id, &answers);
        assert_eq!(spent(), opened as i64, "{name}: budget");
        assert!(
            not_carried >= probes_opened && not_carried <= probes_opened + THREADS * BATCH,
            "{name}: {not_carried} opened leaves without an answer, {probes_opened} from probes"
        );
        let r = vault::post(&self.agency, "/v1/unwrap", &self.request);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        if let Some(derives) = &self.derives {
            assert_opens_logged(name, &self.auditor, &self.id, derives);
        }
        verify_log(t, &self.pki, &self.parties.auditor, self.daemon.api);
        (figures, opened, not_carried - probes_opened)
    }
}

/// [`serve_config`] with the four parties' roles and no effective rate
/// limit.
pub fn limits() -> String {
    serve_config(&format!(
        "{}[limits]\nrate_limit_per_second = 100000.0\nrate_limit_burst = 100000\n",
        vault::roles_toml()
    ))
}

/// Whether a 503's code `got` is the refusal `code` a fault test expects:
/// that code, or, under an HSM or store fault, `spent_not_released` (a
/// request whose leaves and spend committed just before the fault kept
/// the checkpoint from being signed or saved, or whose COMMIT's answer was
/// lost: nothing released either).
pub fn refused_as(got: &str, code: &str) -> bool {
    got == code
        || (matches!(code, "hsm_unavailable" | "store_unavailable") && got == "spent_not_released")
}
