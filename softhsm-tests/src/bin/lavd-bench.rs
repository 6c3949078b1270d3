//! `lavd-bench`: every throughput and latency figure of `docs/benchmarks.md`
//! from one run on one machine, so that the ratios between them mean
//! something on a shared, noisy host.
//!
//! ```sh
//! .ci/bench [--quick] [--only PARTS] [--pool N] [--json FILE]
//! ```
//!
//! `.ci/bench` installs what this needs (`.ci/setup --bench`), then runs
//! `cargo run --locked --release -p softhsm-tests --bin lavd-bench --` with
//! the arguments.
//!
//! It prints a markdown table and writes the same figures as JSON (default
//! `lavd-bench.json` in `$CARGO_TARGET_DIR`, else in `target/`), with the
//! machine's CPU model, core count, load average at the start and the end
//! of the run, and the share of CPU time the hypervisor gave to other guests
//! during it (steal, from `/proc/stat`): a shared machine's figures mean
//! little without them.
//!
//! - (a) the limit: raw `C_DeriveKey` (ECDH1, CKD_NULL), `C_GetAttributeValue`
//!   and `C_DestroyObject` per second on this program's own sessions, on 1
//!   session, on one per core, and on as many as the daemon's pool;
//! - (b) HSM-backed HPKE open through the library and its session pool;
//! - (c) end-to-end `POST /v1/unwrap` over mTLS with durable audit, envelopes
//!   per second, at batch 1, 100 and 1000 and 1, 4 and 16 clients (envelopes
//!   and warrant built before timing; replies not opened while timing), on a
//!   daemon with one HSM session per core (`--pool N` to change it); its
//!   target, best at batch 1000 ≥ 0.85 × (a) on one session per core, is
//!   judged on the lower of two ratios: to (a) at the start, and to the
//!   median of (a) measured between (c)'s batch-1000 loads (which can be
//!   low, the daemon not yet idle); `--only c` measures (a) at the start
//!   on one session per core for it;
//! - (d) single-envelope latency p50/p99 on kept-alive connections at 1 and 8
//!   clients, on the daemon of (c) before (c) runs, beside one derive plus
//!   one durable SQLite commit on the same disk, one Ed25519 checkpoint
//!   signature in the HSM (which every reply's checkpoint needs), and the
//!   same request made one byte too long, refused before any work (the
//!   round trip every request pays: mTLS, HTTP, routing, the blocking pool);
//!   and, from the daemon's own histograms over the 1-client requests, the
//!   mean time from request head to response, of its HSM derive, of its
//!   checkpoint signature, of its audit append transaction and of each
//!   phase of the unwrap (`lavd_unwrap_phase_seconds`);
//! - (e) the daemon's peak RSS (`VmHWM`) after all of (c), 16 clients ×
//!   1000 envelopes included, on the daemon that ran it (and (d) before
//!   it): the target, as an operator would read it from outside; and how
//!   many times that daemon reset its module. SoftHSM 2.6.1 keeps about
//!   240 B of each derived, destroyed session object until `C_Finalize`,
//!   so every SoftHSM daemon here runs with `hsm-config/softhsm2.toml`'s
//!   `[hsm.quirks] reset_module_after_opens = 10000`. For comparison, the
//!   same on a fresh daemon that ran only 16 × 1000 for (c)'s time;
//! - (f) (c) at batch 1000 (best of 1, 4 and 16 clients) on a fresh daemon
//!   whose log already holds 1,000,000 leaves (100,000 with `--quick`;
//!   asserted of the store after the prefill), against its control, run
//!   just before it: the same on the same fresh token and store, before
//!   the prefill, with an empty log, on a daemon stopped before the
//!   prefill (the target); and, for comparison, against (c);
//! - (g) (a), single-client 1000-envelope unwraps (the median of three),
//!   and, in the target's mode, (c)'s grid of batches and clients (since
//!   2026-12-07), through the latency module
//!   (`softhsm-tests/pkcs11-shim`) at 1 ms per PKCS#11 call, 16 sessions:
//!   first with every call returning 1 ms after it was made, SoftHSM's work
//!   inside (`latency_us`, the target's mode), then with 1 ms slept before
//!   each call (`delay_us`, for comparison); in the target's mode also the
//!   mean time of a call that does no work (`C_GetSessionInfo`) through the
//!   module on 1 and 16 sessions: the host's own floor (timer wake-ups, the
//!   hypervisor's share), which no daemon can beat; and in both modes the
//!   time this program's own 16 sessions take to finish exactly 1000 opens
//!   (median of 3), a batch's shape with no lavd code; and, in the target's
//!   mode, from the daemon's histograms as in (d), the mean time of each
//!   phase of its batches (`lavd_unwrap_phase_seconds`), of its derives, of
//!   its checkpoint signatures and of its audit append transactions: what
//!   lavd adds, and where;
//! - (h) batch-1000 throughput, audit commits per second and
//!   single-envelope p50/p99 on 1 replica over SQLite, 1 over PostgreSQL
//!   and 3 over PostgreSQL, every daemon with (c)'s HSM pool (needs the
//!   PostgreSQL that `.ci/setup --bench` installs and starts);
//! - (i) single-envelope p50/p99 at 1 client without witnesses, and with
//!   `release_after_witness` and 1 and 2 local `lavd witness serve`
//!   witnesses (the quorum: all of them), each on a fresh token, in the
//!   same run.
//!
//! Every timed unwrap reply must hold exactly its batch's results, all
//! `ok`; after each throughput load the daemons' own count of successful
//! HSM derives (`lavd_hsm_operation_duration_seconds_count{op="ecdh_derive",
//! result="ok"}`) must have risen by at least the envelopes counted; and
//! (d)'s refused request must be refused with 400 `malformed_request`;
//! anything else stops the run, so no figure counts an envelope the HSM did
//! not open, or a refusal made for another reason.
//!
//! `--quick` runs each measurement briefly: a smoke run, not figures.
//! `--only PARTS` runs only the parts named by their letters (`--only de`:
//! the single-envelope latency and, after all of (c)'s loads, which (e)
//! needs, the peak RSS), for profiling one figure; the ratios of the parts
//! not run are left out.
//! The daemons run with the environment the systemd unit in
//! `deploy/systemd/` sets (`Environment=` lines: glibc's allocator
//! settings), read from the unit itself.
//! With `LAVD_BINARY` set, the daemon is started as that command (a script
//! that runs this binary under heaptrack or valgrind, say) instead of as
//! this binary itself.
//!
//! The daemon is the real `lavd serve` on a SoftHSM token; this binary runs
//! itself as `lavd` for that (the integration tests' `lavd-under-test` is not
//! built by `cargo run`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark: any failure stops it loudly

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use lavd::envelope::{open_envelope, seal_envelope, Envelope, HeaderBuilder};
use lavd::hsm::Hsm;
use lavd::jwk::P256PublicKey;
use serde_json::json;
use softhsm_tests::server::{serve_config, Client, Daemon, Pki, Response};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::witness::Witness;
use softhsm_tests::witnessed::{Entry, LogWithWitnesses};
use softhsm_tests::{measure, shim_module_path, Shim, TestToken};

const KID: &str = "E-1";
/// The pool, and the client count, through the latency module in (g).
const SHIM_POOL: usize = 16;
/// Emulated network-HSM round trip in (g).
const SHIM_DELAY_US: u64 = 1000;
/// PKCS#11 calls per envelope open: `C_DeriveKey`, `C_GetAttributeValue`
/// twice (cryptoki's `get_attributes` asks for a variable-size value's
/// length first, then reads it), `C_DestroyObject`.
const CALLS_PER_OPEN: u64 = 4;
/// `[hsm]` lines of every SoftHSM daemon here, as `hsm-config/softhsm2.toml`
/// sets them: SoftHSM keeps each destroyed session object until
/// `C_Finalize`, so the module is reset after this many opens.
const SOFTHSM_QUIRKS: &str = "[hsm.quirks]\nreset_module_after_opens = 10000\n";
/// (e) on the daemon that ran all of (c): the target.
const E_AFTER_C: &str = "daemon peak RSS after all of (c)";
/// (e) on a daemon that ran only 16 clients × batch 1000, for comparison.
const E_FRESH: &str = "daemon peak RSS, fresh daemon, 16 × 1000 only";

struct Options {
    quick: bool,
    json: PathBuf,
    /// The parts to run (`--only`), each a letter `a`–`i`; all by default.
    only: Option<String>,
    /// The daemon's HSM sessions in (b)–(f) and (h) (`--pool`).
    pool: usize,
}

impl Options {
    fn parse() -> Self {
        let mut options = Options {
            quick: false,
            json: std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| PathBuf::from("target"), PathBuf::from)
                .join("lavd-bench.json"),
            only: None,
            // One session per core, as docs/OPERATIONS.md §7 advises for
            // SoftHSM, unless `--pool` says otherwise.
            pool: std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--json" => options.json = args.next().expect("--json FILE").into(),
                "--only" => {
                    let parts = args.next().unwrap_or_default();
                    if parts.is_empty() || !parts.chars().all(|c| ('a'..='i').contains(&c)) {
                        eprintln!("lavd-bench: --only takes letters a to i, such as `--only de`");
                        std::process::exit(64);
                    }
                    options.only = Some(parts);
                }
                "--pool" => {
                    options.pool = match args.next().and_then(|n| n.parse().ok()) {
                        Some(n @ 1..=256) => n,
                        _ => {
                            eprintln!("lavd-bench: --pool takes a session count from 1 to 256");
                            std::process::exit(64);
                        }
                    }
                }
                other => {
                    eprintln!("lavd-bench: unknown argument {other}\nusage: lavd-bench [--quick] [--only PARTS] [--pool N] [--json FILE]");
                    std::process::exit(64);
                }
            }
        }
        options
    }

    /// Whether part `p` runs.
    fn runs(&self, p: char) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(p))
    }

    /// Time per throughput measurement.
    fn seconds(&self) -> Duration {
        Duration::from_secs_f64(if self.quick { 0.3 } else { 3.0 })
    }
}

fn main() -> std::process::ExitCode {
    // The daemon this benchmark starts is this very binary.
    if std::env::var_os("LAVD_BENCH_AS_LAVD").is_some() {
        return lavd::cli::main();
    }
    let options = Options::parse();
    // Edition 2021: set before any thread starts; the children inherit it.
    std::env::set_var("LAVD_BENCH_AS_LAVD", "1");
    // The daemons run with the environment of the shipped systemd unit
    // (`deploy/systemd/lavd.service`: the allocator's settings); this
    // process was already started without it.
    for (name, value) in unit_environment(UNIT) {
        std::env::set_var(name, value);
    }
    // And log as a deployed daemon does: at the config's level (`info`: a
    // line for each request), to a file; not at the tests' `warn`.
    std::env::remove_var("LAVD_LOG");
    std::env::set_var(softhsm_tests::LOG_AS_CONFIGURED, "1");
    // A `LAVD_BINARY` already set wins: a wrapper that runs this binary
    // under a profiler (heaptrack, valgrind) to see inside the daemon.
    if std::env::var_os("LAVD_BINARY").is_none() {
        std::env::set_var("LAVD_BINARY", std::env::current_exe().expect("own path"));
    }

    let mut report = Report::default();
    // Durable audit needs a disk: on tmpfs (`/tmp` on some distributions)
    // every fsync returns at once, and (c), (d) and (f) would measure a
    // store that keeps nothing.
    let (kind, point, device) = file_system(&std::env::temp_dir());
    if matches!(kind.as_str(), "tmpfs" | "ramfs") {
        eprintln!(
            "lavd-bench: {} is on {kind} ({point}): its fsync keeps nothing, so no figure \
             of durable audit would mean anything. Set TMPDIR to a directory on a disk.",
            std::env::temp_dir().display()
        );
        return std::process::ExitCode::FAILURE;
    }
    report.disk = format!("{kind} ({device} at {point})");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    report.note("cores", cores as f64);
    report.note("daemon HSM sessions in (b)-(f), (h)", options.pool as f64);
    report.note("load average (1 min) at start", load_average());
    let cpu_at_start = cpu_times();

    // (a), (b): this process's own sessions and lavd's library.
    let (token, pki) = bench_token(&options);
    let escrow = vault::generate_escrow_key(&token, KID);
    let envelopes = sealed(&escrow, 1000);
    let peers: Vec<P256PublicKey> = envelopes.iter().map(|e| e.enc().clone()).collect();
    let pkcs11 = softhsm_tests::harness().pkcs11();
    // (e) is judged on the daemon after all of (c): it runs (c)'s loads.
    let runs_c = options.runs('c') || options.runs('e');
    // (c)'s target reads (a) on one session per core at the start too.
    if options.runs('a') || runs_c {
        let mut session_counts = if options.runs('a') {
            vec![1, cores, options.pool]
        } else {
            vec![cores]
        };
        session_counts.dedup();
        for n in session_counts {
            let raw = Raw::new(pkcs11, &token, n);
            let ops = measure(n, options.seconds(), |t, i| {
                raw.op(t, &peers[i as usize % peers.len()])
            });
            report.row(
                "a",
                &format!("raw derive+read+destroy, {n} session(s)"),
                ops,
                "ops/s",
            );
        }
    }

    if options.runs('b') {
        let mut settings = token.settings().hsm;
        settings.sessions = options.pool;
        // In this process, whose own SoftHSM calls (a), (d) and (g) use: a
        // reset would finalise the module under them.
        settings.quirks.reset_module_after_opens = 0;
        let hsm = Hsm::open(settings).expect("open HSM");
        for threads in [1, cores] {
            let ops = measure(threads, options.seconds(), |_, i| {
                let env = &envelopes[i as usize % envelopes.len()];
                open_envelope(env, &escrow, |e| hsm.ecdh(KID, e)).expect("open");
            });
            report.row(
                "b",
                &format!("HSM-backed HPKE open, {threads} thread(s)"),
                ops,
                "ops/s",
            );
        }
    }

    if runs_c || options.runs('d') {
        // (c), (d), (e): the daemon.
        let envelope_json = as_json(&envelopes);
        let daemon = Daemon::start(&token);
        daemon.wait_readyz(200);
        let parties = Parties::new(&pki);
        let agency = parties.clients(&pki, daemon.api).agency;
        let warrant = big_warrant("BENCH-C");
        // (d) first, on the fresh daemon: why, when it was chosen (the run
        // of 2026-12-02 14:56), was that SoftHSM 2.6.1 keeps destroyed
        // objects until C_Finalize, and after (c)'s 84,000 derivations the
        // same request took 3.0 ms at p50 against 1.3–1.9 ms on fresh
        // daemons. The planned module resets (`reset_module_after_opens =
        // 10000`, every daemon here) now bound that; a long-running daemon
        // is the "after" case, not measured. Every request carries the same
        // warrant, so its verification is cached after the first (as for an
        // agency's requests under one warrant); a warrant's first request is
        // not what (d) times.
        if options.runs('d') {
            let single = unwrap_body(&warrant, &envelope_json[..1]);
            let requests = latency_requests(&options);
            for clients in [1usize, 8] {
                let before = (clients == 1)
                    .then(|| DaemonMeans::read(&daemon, &[&D_INSIDE, &UNWRAP_PHASES]));
                let Latency { p50, p99, mean } =
                    latency(std::slice::from_ref(&agency), &single, clients, requests);
                report.row(
                    "d",
                    &format!("single-envelope p50, {clients} client(s)"),
                    p50 * 1e3,
                    "ms",
                );
                report.row(
                    "d",
                    &format!("single-envelope p99, {clients} client(s)"),
                    p99 * 1e3,
                    "ms",
                );
                if let Some(before) = before {
                    // Where the time of the 1-client requests went inside
                    // the daemon, from its own histograms: means, so
                    // beside the client's mean.
                    report.row("d", "single-envelope mean, 1 client(s)", mean * 1e3, "ms");
                    let after = DaemonMeans::read(&daemon, &[&D_INSIDE, &UNWRAP_PHASES]);
                    for (what, mean) in after.since(&before) {
                        report.row(
                            "d",
                            &format!("inside the daemon, 1 client (mean): {what}"),
                            mean * 1e3,
                            "ms",
                        );
                    }
                }
            }
            // The floor under any unwrap's latency: the same request, one
            // byte longer, refused as malformed on the blocking thread
            // before the warrant, the store or the HSM. What is left is
            // mTLS, HTTP, routing, the hop to the blocking pool and back,
            // and both ends' own work.
            let mut refused = single.clone();
            refused.push(b'x');
            let floor = latency_of(
                std::slice::from_ref(&agency),
                &refused,
                |r| {
                    r.assert_error(400, "malformed_request");
                },
                1,
                requests,
            );
            report.row("d", D_FLOOR, floor.p50 * 1e3, "ms");
            let derive = {
                let raw = Raw::new(pkcs11, &token, 1);
                let n = if options.quick { 100 } else { 2000 };
                let started = Instant::now();
                for i in 0..n {
                    raw.op(0, &peers[i % peers.len()]);
                }
                started.elapsed().as_secs_f64() / n as f64
            };
            // The same one at a time, 1 ms apart, as (d)'s requests reach
            // the HSM: a call after an idle pause costs more than one in a
            // tight loop (caches, an idle vCPU waking).
            let spaced = {
                let raw = Raw::new(pkcs11, &token, 1);
                let n = if options.quick { 50 } else { 500 };
                let mut times: Vec<f64> = (0..n)
                    .map(|i| {
                        std::thread::sleep(Duration::from_millis(1));
                        let started = Instant::now();
                        raw.op(0, &peers[i % peers.len()]);
                        started.elapsed().as_secs_f64()
                    })
                    .collect();
                median(&mut times)
            };
            let commit = commit_seconds(
                &token.path("commit-probe.db"),
                if options.quick { 20 } else { 200 },
            );
            let (sign, sign_spaced) =
                sign_seconds(pkcs11, &token, if options.quick { 100 } else { 2000 });
            report.row("d", D_DERIVE, derive * 1e3, "ms");
            report.row("d", D_DERIVE_SPACED, spaced * 1e3, "ms");
            report.row("d", D_COMMIT, commit * 1e3, "ms");
            report.row("d", D_SIGN, sign * 1e3, "ms");
            report.row("d", D_SIGN_SPACED, sign_spaced * 1e3, "ms");
        }
        let mut best_1000 = 0f64;
        let loads: &[(usize, &[usize])] = if runs_c { GRID } else { &[] };
        // (a) on one session per core again, before each batch-1000
        // measurement and after the last, so that the target's two figures
        // see the same minutes of this shared machine.
        let mut beside_1000 = Vec::new();
        let raw_beside = |beside: &mut Vec<f64>| {
            let raw = Raw::new(pkcs11, &token, cores);
            beside.push(measure(cores, options.seconds(), |t, i| {
                raw.op(t, &peers[i as usize % peers.len()])
            }));
        };
        for &(batch, client_counts) in loads {
            let body = unwrap_body(&warrant, &envelope_json[..batch]);
            for &clients in client_counts {
                if batch == 1000 {
                    raw_beside(&mut beside_1000);
                }
                let rate = unwrap_rate(
                    std::slice::from_ref(&daemon),
                    std::slice::from_ref(&agency),
                    &body,
                    batch,
                    clients,
                    options.seconds(),
                );
                if batch == 1000 {
                    best_1000 = best_1000.max(rate);
                }
                report.row(
                    "c",
                    &format!("/v1/unwrap, batch {batch}, {clients} client(s)"),
                    rate,
                    "envelopes/s",
                );
            }
        }
        if runs_c {
            raw_beside(&mut beside_1000);
            report.row(
                "c",
                "/v1/unwrap, batch 1000, best",
                best_1000,
                "envelopes/s",
            );
            report.row("a", &a_beside_row(cores), median(&mut beside_1000), "ops/s");
        }
        if runs_c {
            // (e): the daemon that ran (d) and all of (c), as it would be
            // seen from outside after such a run. SoftHSM 2.6.1 keeps about
            // 240 B of each derivation until C_Finalize
            // (softhsm-tests/tests/hsm_sessions.rs); the daemon resets the
            // module every 10,000 opens ([`SOFTHSM_QUIRKS`]), so that stays
            // under 2.3 MiB however many envelopes (c) opened.
            let rss = peak_rss_mib(daemon.pid());
            report.row("e", E_AFTER_C, rss, "MiB");
            report.row(
                "e",
                "module resets in that daemon (reset_module_after_opens = 10000)",
                daemon.metric("lavd_hsm_planned_resets_total{outcome=\"done\"}"),
                "resets",
            );
        }
        drop(daemon);
        if options.runs('e') {
            // For comparison: a daemon that has run only (c)'s largest
            // load, for (c)'s time: lavd's own working set under it, with
            // less of SoftHSM's retention.
            let fresh = Daemon::start(&token);
            fresh.wait_readyz(200);
            let agency = parties.clients(&pki, fresh.api).agency;
            let body = unwrap_body(&big_warrant("BENCH-E"), &envelope_json[..1000]);
            let rate = unwrap_rate(
                std::slice::from_ref(&fresh),
                std::slice::from_ref(&agency),
                &body,
                1000,
                16,
                options.seconds(),
            );
            report.row(
                "e",
                "fresh daemon under 16 clients × batch 1000 only",
                rate,
                "envelopes/s",
            );
            report.row("e", E_FRESH, peak_rss_mib(fresh.pid()), "MiB");
        }
    }

    if options.runs('f') {
        // (f): the same at batch 1000 on a log that already holds many
        // leaves, against its control just before it: the same set-up
        // (a fresh token, store and daemon, the same clients) with an
        // empty log. (c)'s daemon is no control: it ran (d) and all of (c)
        // first.
        let leaves = big_log_leaves(&options);
        let (control, big) = f_big_log_and_control(&options, leaves);
        report.row("f", F_CONTROL, control, "envelopes/s");
        report.row("f", &f_best_row(leaves), big, "envelopes/s");
    }

    if options.runs('g') {
        // (g): through the latency module.
        let slow = TestToken::new();
        let slow_pki = Pki::new(&slow);
        let shim = Shim::new(&slow);
        slow.write_config_hsm(
            &shim_module_path(),
            SHIM_POOL,
            SOFTHSM_QUIRKS,
            &format!("{}\n{}", shim.hsm_env(), serve_config(&bench_toml())),
        );
        let slow_escrow = vault::generate_escrow_key(&slow, KID);
        let slow_envelopes: Vec<serde_json::Value> = sealed_json(&slow_escrow, 1000);
        let daemon = Daemon::start(&slow);
        daemon.wait_readyz(200);
        let agency = Parties::new(&slow_pki)
            .clients(&slow_pki, daemon.api)
            .agency;
        let body = unwrap_body(&big_warrant("BENCH-G"), &slow_envelopes);
        let mut conn = agency.connect().expect("connect");
        // This process's own sessions through the module: load it as a
        // second PKCS#11 library (it forwards to the SoftHSM already loaded).
        std::env::set_var("LAVD_SHIM_CONFIG", slow.path("shim.conf"));
        let shimmed = Pkcs11::new(shim_module_path()).expect("load the latency module");
        match shimmed.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::CryptokiAlreadyInitialized,
                _,
            )) => {}
            Err(e) => panic!("initialize the latency module: {e}"),
        }
        let slow_peers: Vec<P256PublicKey> = sealed(&slow_escrow, 64)
            .iter()
            .map(|e| e.enc().clone())
            .collect();
        for mode in G_MODES {
            shim.set(&mode.setting());
            for n in [1, SHIM_POOL] {
                let raw = Raw::new(&shimmed, &slow, n);
                let ops = measure(n, options.seconds(), |t, i| {
                    raw.op(t, &slow_peers[i as usize % slow_peers.len()])
                });
                report.row("g", &mode.raw_row(n), ops, "ops/s");
                if n == SHIM_POOL {
                    // The batch's shape with no lavd code: exactly 1000
                    // opens shared by the sessions, start and tail
                    // included, which a rate over 3 s leaves out.
                    let mut cpu = 0.0;
                    let mut times: Vec<f64> = (0..3)
                        .map(|_| {
                            let (took, ran) = raw_makespan(&raw, &slow_peers, n, 1000);
                            cpu += ran;
                            took
                        })
                        .collect();
                    report.row("g", &mode.makespan_row(), median(&mut times) * 1e3, "ms");
                    if mode.key == G_LATENCY.key {
                        report.row("g", G_CPU_OWN, cpu / 3000.0 * 1e3, "ms");
                    }
                }
                if mode.key == G_LATENCY.key {
                    // The module's own floor on this host: a call that does
                    // no work still ends when the timer wakes its thread,
                    // which on a virtual machine is late by tens to hundreds
                    // of microseconds.
                    let calls = measure(n, options.seconds(), |t, _| raw.idle_call(t));
                    report.row("g", &g_idle_row(n), n as f64 / calls * 1e3, "ms");
                }
            }
            // The median of three batches: one is too exposed to a
            // neighbour's burst.
            let before = DaemonMeans::read(&daemon, &[&D_INSIDE, &UNWRAP_PHASES]);
            let cpu_before = Cpu::read(daemon.pid());
            let mut times: Vec<f64> = (0..3)
                .map(|_| {
                    let started = Instant::now();
                    let r = conn
                        .request("POST", "/v1/unwrap", &[], Some(&body))
                        .expect("unwrap");
                    let t = started.elapsed().as_secs_f64();
                    assert_opened(&r, 1000);
                    t
                })
                .collect();
            let cpu = Cpu::read(daemon.pid()).since(&cpu_before);
            report.row("g", mode.batch_row, median(&mut times) * 1e3, "ms");
            if mode.key == G_LATENCY.key {
                report.row("g", G_CPU_WORKERS, cpu.hsm / 3000.0 * 1e3, "ms");
                report.row("g", G_CPU_DAEMON, cpu.all / 3000.0 * 1e3, "ms");
                // Where those batches' time went, from the daemon's own
                // histograms.
                let after = DaemonMeans::read(&daemon, &[&D_INSIDE, &UNWRAP_PHASES]);
                for (what, mean) in after.since(&before) {
                    report.row("g", &g_inside_row(what), mean * 1e3, "ms");
                }
            }
        }
        // (c)'s grid through the module, in the target's mode, after both
        // modes' batches (so that those run on a daemon that opened no more
        // than they need, and `conn` is not left idle meanwhile):
        // envelopes per second at each batch size and client count, as (c)
        // measures them.
        shim.set(&G_LATENCY.setting());
        let grid_warrant = big_warrant("BENCH-G-GRID");
        for &(batch, client_counts) in GRID {
            let body = unwrap_body(&grid_warrant, &slow_envelopes[..batch]);
            for &clients in client_counts {
                let rate = unwrap_rate(
                    std::slice::from_ref(&daemon),
                    std::slice::from_ref(&agency),
                    &body,
                    batch,
                    clients,
                    options.seconds(),
                );
                report.row(
                    "g",
                    &format!(
                        "/v1/unwrap, {}, batch {batch}, {clients} client(s)",
                        G_LATENCY.label
                    ),
                    rate,
                    "envelopes/s",
                );
            }
        }
        let ideal = (CALLS_PER_OPEN * 1000 * SHIM_DELAY_US) as f64 / 1e6 / SHIM_POOL as f64;
        report.row("g", G_IDEAL, ideal * 1e3, "ms");
        drop(daemon);
    }

    if options.runs('h') {
        // (h): replicas. The same batch-1000 load (4 clients a replica) and
        // single-envelope latency (one client a replica) on 1 replica over
        // SQLite, 1 over PostgreSQL and 3 over PostgreSQL, each on a fresh
        // token and store, with the audit appends they made per second (the
        // daemons' `lavd_store_commit_duration_seconds_count`, one per request).
        for (label, postgres, replicas) in [
            ("SQLite, 1 replica", false, 1usize),
            ("PostgreSQL, 1 replica", true, 1),
            ("PostgreSQL, 3 replicas", true, 3),
        ] {
            let token = TestToken::new();
            let pki = Pki::new(&token);
            let db = postgres.then(softhsm_tests::pg::TestDb::create);
            // The server's own durability, as the SQLite file's is checked
            // at the start: a cluster run with `fsync = off` keeps nothing
            // across a crash, and its figures would not be durable audit.
            if let Some(db) = &db {
                let fsync: String = db
                    .client()
                    .query_one("SHOW fsync", &[])
                    .expect("SHOW fsync")
                    .get(0);
                if fsync != "on" {
                    eprintln!(
                        "lavd-bench: the PostgreSQL server has fsync = {fsync}: (h) would not \
                         measure durable audit; turn it on"
                    );
                    return std::process::ExitCode::FAILURE;
                }
            }
            // Every daemon of (h) has the same HSM pool, (c)'s: the
            // comparison is of the stores, not of the sessions.
            match &db {
                Some(db) => db.write_token_config_hsm(
                    &token,
                    &softhsm_tests::module_path(),
                    &format!("sessions = {}\n{SOFTHSM_QUIRKS}", options.pool),
                    &serve_config(&bench_toml()),
                ),
                None => write_bench_config(&token, &options),
            }
            let escrow = vault::generate_escrow_key(&token, KID);
            let envelopes: Vec<serde_json::Value> = sealed_json(&escrow, 1000);
            let daemons: Vec<Daemon> = (0..replicas)
                .map(|i| Daemon::start_replica(&token, &format!("replica-{i}")))
                .collect();
            for d in &daemons {
                d.wait_readyz(200);
            }
            let parties = Parties::new(&pki);
            let agencies: Vec<Client> = daemons
                .iter()
                .map(|d| parties.clients(&pki, d.api).agency)
                .collect();
            let warrant = big_warrant("BENCH-H");
            let commits = || -> f64 {
                daemons
                    .iter()
                    .map(|d| {
                        d.metric("lavd_store_commit_duration_seconds_count{op=\"audit_append\"}")
                    })
                    .sum()
            };
            let body = unwrap_body(&warrant, &envelopes);
            let before = commits();
            // Over the unwraps' own window (their handshakes outside it).
            let (rate, window) = unwrap_rate_timed(
                &daemons,
                &agencies,
                &body,
                1000,
                4 * replicas,
                options.seconds(),
            );
            let commit_rate = (commits() - before) / window.as_secs_f64();
            let single = unwrap_body(&warrant, &envelopes[..1]);
            let Latency { p50, p99, .. } =
                latency(&agencies, &single, replicas, latency_requests(&options));
            report.row(
                "h",
                &format!("{label}: /v1/unwrap, batch 1000"),
                rate,
                "envelopes/s",
            );
            report.row(
                "h",
                &format!("{label}: audit appends during it (one a request)"),
                commit_rate,
                "appends/s",
            );
            report.row(
                "h",
                &format!("{label}: single-envelope p50, {replicas} client(s), one a replica"),
                p50 * 1e3,
                "ms",
            );
            report.row(
                "h",
                &format!("{label}: single-envelope p99, {replicas} client(s), one a replica"),
                p99 * 1e3,
                "ms",
            );
            // The daemons stop before their database is dropped.
            drop(daemons);
            drop(db);
        }
    }

    if options.runs('i') {
        // (i): the cost of release_after_witness. One daemon per case, each
        // on a fresh token and SQLite store: no witnesses; then 1 and 2 local
        // witnesses (each `lavd witness serve` on its own token, over TLS)
        // whose quorum is all of them.
        for n in [0usize, 1, 2] {
            let log = LogWithWitnesses::new(&serve_config(&bench_toml()));
            let witnesses: Vec<Witness> = (0..n)
                .map(|i| log.witness(&format!("w{i}.bench")))
                .collect();
            if n > 0 {
                let mut policy = String::new();
                let mut names = Vec::new();
                for (i, w) in witnesses.iter().enumerate() {
                    policy.push_str(&format!("witness W{i} {}\n", w.vkey));
                    names.push(format!("W{i}"));
                }
                policy.push_str(&format!("group q all {}\nquorum q\n", names.join(" ")));
                log.configure(
                    &witnesses.iter().map(Entry::from).collect::<Vec<_>>(),
                    &policy,
                    "release_after_witness = true",
                );
            }
            let daemon = Daemon::start(&log.t);
            daemon.wait_readyz(200);
            let agency = Parties::new(&log.pki).clients(&log.pki, daemon.api).agency;
            let envelope: serde_json::Value =
                serde_json::from_str(&sealed(&log.escrow, 1)[0].to_json()).expect("json");
            let single = unwrap_body(&big_warrant("BENCH-I"), &[envelope]);
            let Latency { p50, p99, .. } = latency(
                std::slice::from_ref(&agency),
                &single,
                1,
                latency_requests(&options),
            );
            let label = match n {
                0 => "no witnesses".to_string(),
                n => format!("release_after_witness, {n} local witness(es)"),
            };
            report.row(
                "i",
                &format!("{label}: single-envelope p50"),
                p50 * 1e3,
                "ms",
            );
            report.row(
                "i",
                &format!("{label}: single-envelope p99"),
                p99 * 1e3,
                "ms",
            );
            drop(daemon);
            drop(witnesses);
        }
    }

    // The targets, as ratios from this run (those whose parts ran).
    let leaves = big_log_leaves(&options);
    let raw_cores = format!("raw derive+read+destroy, {cores} session(s)");
    let g_raw = G_LATENCY.raw_row(SHIM_POOL);
    let g_raw_added = G_ADDED.raw_row(SHIM_POOL);
    let f_best = f_best_row(leaves);
    let ratios: &[Target<'_>] = &[
        (
            "(h) 1 replica on PostgreSQL / 1 on SQLite, batch 1000 (this project's own target)",
            &[
                "PostgreSQL, 1 replica: /v1/unwrap, batch 1000",
                "SQLite, 1 replica: /v1/unwrap, batch 1000",
            ],
            |v| v[0] / v[1],
            "≥ 0.70",
        ),
        // Judged on the lower of the two ratios below: (a) measured right
        // after a (c) load can be low (the daemon still busy, the host's
        // neighbours), which flatters the ratio.
        (
            "(c) best at batch 1000 / (a) on one session per core, the lower of the two ratios below",
            &["/v1/unwrap, batch 1000, best", &raw_cores, &a_beside_row(cores)],
            |v| lower_ratio(v[0], v[1], v[2]),
            "≥ 0.85",
        ),
        (
            "(c) best at batch 1000 / (a) on one session per core, at the start",
            &["/v1/unwrap, batch 1000, best", &raw_cores],
            |v| v[0] / v[1],
            "(for comparison)",
        ),
        (
            "(c) best at batch 1000 / (a) on one session per core, measured between (c)'s",
            &["/v1/unwrap, batch 1000, best", &a_beside_row(cores)],
            |v| v[0] / v[1],
            "(for comparison)",
        ),
        (
            "(g) batch time / ideal",
            &[G_LATENCY.batch_row, G_IDEAL],
            |v| v[0] / v[1],
            "≤ 1.25",
        ),
        // What no daemon can beat on this machine: this program's own 16
        // sessions through the module, doing nothing but the calls.
        (
            "(g) batch time / (1000 ÷ (g) raw on 16 sessions)",
            &[G_LATENCY.batch_row, &g_raw],
            |v| v[0] / 1e3 / (1000.0 / v[1]),
            "(the module's own limit)",
        ),
        // The same against the module's own sessions finishing exactly
        // 1000 opens: what lavd adds to a batch of the same shape.
        (
            "(g) batch time / the module's own 1000 opens on 16 sessions",
            &[G_LATENCY.batch_row, &G_LATENCY.makespan_row()],
            |v| v[0] / v[1],
            "(for comparison)",
        ),
        // What the host's timer alone costs a call: 16 sessions through
        // the module making calls that do no work. The batch cannot beat
        // this ratio.
        (
            "(g) floor: a call that does no work through the module, 16 sessions / 1 ms",
            &[&g_idle_row(SHIM_POOL)],
            |v| v[0] / (SHIM_DELAY_US as f64 / 1e3),
            "(for comparison)",
        ),
        // The same with the delay added before each call, SoftHSM's work
        // after it on this machine's two cores (the figure before
        // 2026-12-02 17:00).
        (
            "(g), 1 ms added to each call: batch time / ideal",
            &[G_ADDED.batch_row, G_IDEAL],
            |v| v[0] / v[1],
            "(for comparison)",
        ),
        (
            "(g), 1 ms added to each call: batch time / (1000 ÷ raw on 16 sessions)",
            &[G_ADDED.batch_row, &g_raw_added],
            |v| v[0] / 1e3 / (1000.0 / v[1]),
            "(for comparison)",
        ),
        (
            "(d) p50 at 1 client / (derive + commit)",
            &["single-envelope p50, 1 client(s)", D_DERIVE, D_COMMIT],
            |v| v[0] / (v[1] + v[2]),
            "≤ 1.5",
        ),
        // The least any daemon on this stack could score: a request that
        // did nothing but the derive and the commit would still pay the
        // round trip of one that does nothing at all.
        (
            "(d) floor: (refused request p50 + derive + commit) / (derive + commit)",
            &[D_FLOOR, D_DERIVE, D_COMMIT],
            |v| (v[0] + v[1] + v[2]) / (v[1] + v[2]),
            "(for comparison)",
        ),
        // The same floor for a reply that carries a checkpoint signed over
        // its own leaves: the signature runs beside the commit, so the
        // longer of the two.
        (
            "(d) floor with the reply's signature: (refused request + derive + longer of commit and signature) / (derive + commit)",
            &[D_FLOOR, D_DERIVE, D_COMMIT, D_SIGN],
            |v| (v[0] + v[1] + v[2].max(v[3])) / (v[1] + v[2]),
            "(for comparison)",
        ),
        // What the target leaves out: a reply carries a checkpoint signed
        // over its leaves, one more HSM private-key operation per request
        // at 1 client (under load, one per group commit).
        (
            "(d) p50 at 1 client / (derive + commit + checkpoint signature)",
            &[
                "single-envelope p50, 1 client(s)",
                D_DERIVE,
                D_COMMIT,
                D_SIGN,
            ],
            |v| v[0] / (v[1] + v[2] + v[3]),
            "(for comparison)",
        ),
        (
            "(e) peak RSS after all of (c), 16 × 1000 included / 64 MiB",
            &[E_AFTER_C],
            |v| v[0] / 64.0,
            "≤ 1",
        ),
        // What the target was judged on until 2026-12-05: a fresh daemon
        // that ran 16 × 1000 only.
        (
            "(e) peak RSS of a fresh daemon that ran 16 × 1000 only / 64 MiB",
            &[E_FRESH],
            |v| v[0] / 64.0,
            "(for comparison)",
        ),
        (
            "(f) / the same on a fresh daemon with an empty log, just before, best at batch 1000",
            &[&f_best, F_CONTROL],
            |v| v[0] / v[1],
            "≥ 0.9",
        ),
        // What (f) was judged against until 2026-12-05: (c) on a daemon
        // that had run (d) and all of (c) first.
        (
            "(f) / (c), best at batch 1000",
            &[&f_best, "/v1/unwrap, batch 1000, best"],
            |v| v[0] / v[1],
            "(for comparison)",
        ),
    ];
    for &(what, inputs, ratio, wanted) in ratios {
        let values: Option<Vec<f64>> = inputs.iter().map(|name| report.get(name)).collect();
        if let Some(values) = values {
            report.ratio(what, ratio(&values), wanted);
        }
    }

    report.note("load average (1 min) at end", load_average());
    if let (Some(start), Some(end)) = (cpu_at_start, cpu_times()) {
        let total = end.total.saturating_sub(start.total).max(1);
        let steal = end.steal.saturating_sub(start.steal);
        report.note(
            "CPU time stolen by the hypervisor during the run (%)",
            (1000.0 * steal as f64 / total as f64).round() / 10.0,
        );
    }
    report.print(options.quick);
    if let Some(dir) = options.json.parent() {
        std::fs::create_dir_all(dir).expect("json dir");
    }
    std::fs::write(&options.json, report.json(options.quick)).expect("write json");
    eprintln!("wrote {}", options.json.display());
    std::process::ExitCode::SUCCESS
}

/// A target: its name, the rows it reads, the ratio of their values and
/// what is wanted.
type Target<'a> = (&'a str, &'a [&'a str], fn(&[f64]) -> f64, &'a str);

/// How the latency module spends its 1 ms a call in (g).
struct GMode {
    /// The module's setting, in microseconds.
    key: &'static str,
    /// How the rows name it.
    label: &'static str,
    /// The row of the batch's time.
    batch_row: &'static str,
}

impl GMode {
    fn setting(&self) -> String {
        format!("{} = {SHIM_DELAY_US}", self.key)
    }

    /// The row of this program's own 16 sessions finishing 1000 opens.
    fn makespan_row(&self) -> String {
        format!(
            "raw derive+read+destroy, {}, 1000 opens over {SHIM_POOL} sessions: time to the last (median of 3)",
            self.label
        )
    }

    fn raw_row(&self, sessions: usize) -> String {
        format!(
            "raw derive+read+destroy, {}, {sessions} session(s)",
            self.label
        )
    }
}

/// (c)'s batch sizes, each with its client counts; (g) runs them through
/// the latency module too.
const GRID: &[(usize, &[usize])] = &[(1, &[1, 4, 16]), (100, &[1, 4, 16]), (1000, &[1, 4, 16])];

/// The target's mode: every call takes 1 ms from the moment it is made,
/// SoftHSM's own work inside it, as a network HSM's work is inside its
/// round trip (the ideal counts exactly 1 ms a call).
const G_LATENCY: GMode = GMode {
    key: "latency_us",
    label: "1 ms a call",
    batch_row: "one 1000-envelope /v1/unwrap, 1 ms a call (median of 3)",
};
/// For comparison: 1 ms slept before each call, then SoftHSM's work on
/// this machine's own cores.
const G_ADDED: GMode = GMode {
    key: "delay_us",
    label: "1 ms added to each call",
    batch_row: "one 1000-envelope /v1/unwrap, 1 ms added to each call (median of 3)",
};
const G_MODES: [GMode; 2] = [G_LATENCY, G_ADDED];

/// The row of (g)'s calls that do no work (`C_GetSessionInfo`) through the
/// module on `sessions` sessions: the mean time a call, in ms.
fn g_idle_row(sessions: usize) -> String {
    format!(
        "a call that does no work (C_GetSessionInfo), {}, {sessions} session(s): mean time a call",
        G_LATENCY.label
    )
}

/// A row of (g)'s split of its batches' time inside the daemon.
fn g_inside_row(what: &str) -> String {
    format!(
        "inside the daemon, one 1000-envelope /v1/unwrap, {} (mean of 3): {what}",
        G_LATENCY.label
    )
}

/// The shipped systemd unit, whose environment the daemons get.
const UNIT: &str = include_str!("../../../deploy/systemd/lavd.service");

/// The variables a systemd unit's `Environment=NAME=VALUE` lines set (one
/// assignment a line, unquoted: what the shipped unit holds).
fn unit_environment(unit: &str) -> Vec<(&str, &str)> {
    let variables: Vec<_> = unit
        .lines()
        .filter_map(|line| line.strip_prefix("Environment="))
        .map(|assignment| {
            assert!(
                !assignment.contains(['"', '\'', ' ']),
                "the unit's Environment={assignment} is not one unquoted NAME=VALUE"
            );
            assignment
                .split_once('=')
                .unwrap_or_else(|| panic!("the unit's Environment={assignment} has no '='"))
        })
        .collect();
    assert!(!variables.is_empty(), "the unit sets no environment");
    variables
}

/// (g)'s CPU time an open, 1 ms a call, which the two vCPUs bound: at 16
/// sessions each open's 4 calls take 4 ms, so 16 opens in flight may
/// spend at most 0.5 ms of CPU each before the cores, not the module's
/// latency, set the pace.
const G_CPU_OWN: &str =
    "CPU time an open, this program's own 16 sessions (their threads, 3 × 1000 opens)";
const G_CPU_WORKERS: &str =
    "CPU time an open, the daemon's HSM workers (lavd-hsm-*, 3 batches of 1000)";
const G_CPU_DAEMON: &str = "CPU time an open, the whole daemon (3 batches of 1000)";

/// The CPU time the threads of a process have run, from
/// `/proc/<pid>/task/*/schedstat` (nanoseconds, unlike `stat`'s ticks).
/// Threads that ended between two reads are left out of both.
struct Cpu {
    threads: Vec<(u64, String, u64)>,
}

/// What [`Cpu::since`] found, in seconds.
struct CpuSpent {
    /// Every thread's.
    all: f64,
    /// The threads named `lavd-hsm-*`.
    hsm: f64,
}

impl Cpu {
    fn read(pid: u32) -> Self {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's tasks");
        let threads = tasks
            .filter_map(Result::ok)
            .filter_map(|task| {
                let tid = task.file_name().to_str()?.parse().ok()?;
                let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
                let ran = schedstat_ns(&task.path().join("schedstat"))?;
                Some((tid, name.trim_end().to_string(), ran))
            })
            .collect();
        Self { threads }
    }

    fn since(&self, before: &Self) -> CpuSpent {
        let mut spent = CpuSpent { all: 0.0, hsm: 0.0 };
        for (tid, name, ran) in &self.threads {
            let earlier = before.threads.iter().find(|(t, ..)| t == tid);
            let ran = ran.saturating_sub(earlier.map_or(0, |(.., r)| *r));
            let seconds = ran as f64 / 1e9;
            spent.all += seconds;
            if name.starts_with("lavd-hsm-") {
                spent.hsm += seconds;
            }
        }
        spent
    }
}

/// Rows the target ratios read.
const G_IDEAL: &str = "ideal (4 calls × 1000 × 1 ms / 16 sessions)";
const D_DERIVE: &str = "one derive+read+destroy (mean, 1 session)";
const D_DERIVE_SPACED: &str = "one derive+read+destroy, 1 ms apart (median, 1 session)";
const D_COMMIT: &str = "one durable SQLite commit (median)";
const D_FLOOR: &str = "the same request refused as malformed before any work, p50, 1 client";
const D_SIGN: &str = "one checkpoint signature, Ed25519 in the HSM (mean, 1 session)";
const D_SIGN_SPACED: &str =
    "one checkpoint signature, Ed25519 in the HSM, 1 ms apart (median, 1 session)";

/// The daemon's histograms that split (d)'s time: what each measures, and
/// its series (name and labels, as `/metrics` prints them).
const D_INSIDE: [(&str, &str, &str); 4] = [
    (
        "request, head to response",
        "lavd_http_request_duration_seconds",
        "{route=\"/v1/unwrap\"}",
    ),
    (
        "HSM derive (ecdh_derive, on its worker)",
        "lavd_hsm_operation_duration_seconds",
        "{op=\"ecdh_derive\",result=\"ok\"}",
    ),
    (
        "checkpoint signature (sign_ed25519, on its worker)",
        "lavd_hsm_operation_duration_seconds",
        "{op=\"sign_ed25519\",result=\"ok\"}",
    ),
    (
        "audit append transaction, fsync included",
        "lavd_store_commit_duration_seconds",
        "{op=\"audit_append\"}",
    ),
];

/// The daemon's `lavd_unwrap_phase_seconds`, which splits each successful
/// unwrap's time: what each phase holds, and its series.
const UNWRAP_PHASES: [(&str, &str, &str); 7] = [
    (
        "phase gate (request parsed, its turn at the envelope gate)",
        "lavd_unwrap_phase_seconds",
        "{phase=\"gate\"}",
    ),
    (
        "phase admit (warrant, envelopes checked; leaves built)",
        "lavd_unwrap_phase_seconds",
        "{phase=\"admit\"}",
    ),
    (
        "phase intent (budget reserved, open intent committed)",
        "lavd_unwrap_phase_seconds",
        "{phase=\"intent\"}",
    ),
    (
        "phase hsm (the HSM opens)",
        "lavd_unwrap_phase_seconds",
        "{phase=\"hsm\"}",
    ),
    (
        "phase audit (leaves and spend committed, checkpoint signed)",
        "lavd_unwrap_phase_seconds",
        "{phase=\"audit\"}",
    ),
    (
        "phase witness (none configured)",
        "lavd_unwrap_phase_seconds",
        "{phase=\"witness\"}",
    ),
    (
        "phase reply (sealed, encoded)",
        "lavd_unwrap_phase_seconds",
        "{phase=\"reply\"}",
    ),
];

/// The sums and counts of some of the daemon's histograms at one moment:
/// each `(what it measures, name, labels)`.
struct DaemonMeans {
    series: Vec<(&'static str, &'static str, &'static str)>,
    values: Vec<(f64, f64)>,
}

impl DaemonMeans {
    fn read(daemon: &Daemon, series: &[&[(&'static str, &'static str, &'static str)]]) -> Self {
        let series: Vec<_> = series.iter().flat_map(|s| s.iter().copied()).collect();
        let values = series
            .iter()
            .map(|(_, name, labels)| {
                (
                    daemon.metric(&format!("{name}_sum{labels}")),
                    daemon.metric(&format!("{name}_count{labels}")),
                )
            })
            .collect();
        Self { series, values }
    }

    /// The mean of each histogram's observations since `before` (read of
    /// the same series), in seconds. Every one of them observes each
    /// request timed, so one that observed nothing (a renamed series) stops
    /// the run.
    fn since(&self, before: &Self) -> Vec<(&'static str, f64)> {
        self.series
            .iter()
            .zip(self.values.iter().zip(&before.values))
            .map(|((what, name, labels), ((sum, count), (sum0, count0)))| {
                assert!(
                    count > count0,
                    "the daemon's {name}{labels} observed nothing"
                );
                (*what, (sum - sum0) / (count - count0))
            })
            .collect()
    }
}

/// The lower of `value / a` and `value / b`: a ratio to (a) judged against
/// the faster of two measurements of it.
fn lower_ratio(value: f64, a: f64, b: f64) -> f64 {
    (value / a).min(value / b)
}

/// (a) on one session per core, measured between (c)'s batch-1000 runs.
fn a_beside_row(cores: usize) -> String {
    format!(
        "raw derive+read+destroy, {cores} session(s), between the batch-1000 runs (median of 4)"
    )
}

/// Timed single-envelope requests per client in (d) and (h).
fn latency_requests(options: &Options) -> usize {
    if options.quick {
        50
    } else {
        1000
    }
}

/// (f)'s row: (c) at batch 1000 on a log of `leaves` leaves.
fn f_best_row(leaves: u64) -> String {
    format!("/v1/unwrap, batch 1000, best, log of {leaves} leaves")
}

/// (f)'s control row.
const F_CONTROL: &str =
    "/v1/unwrap, batch 1000, best, fresh daemon with an empty log (control of the row below)";

/// (f) and its control: (c) at batch 1000, the best of 1, 4 and 16 clients
/// for (c)'s time each, on a fresh token and store, first with a daemon on
/// the empty log (only the key's generation leaf and what the daemon
/// writes at start), then, once that daemon is stopped and the log filled
/// up to `leaves`, with a new daemon on the same token and store. Returns
/// (control, big log).
fn f_big_log_and_control(options: &Options, leaves: u64) -> (f64, f64) {
    let (token, pki) = bench_token(options);
    let escrow = vault::generate_escrow_key(&token, KID);
    let envelopes: Vec<serde_json::Value> = sealed_json(&escrow, 1000);
    let body = unwrap_body(&big_warrant("BENCH-F"), &envelopes);
    let parties = Parties::new(&pki);
    let best = |prefilled: u64| -> f64 {
        let daemon = Daemon::start(&token);
        daemon.wait_readyz(200);
        let clients = parties.clients(&pki, daemon.api);
        // The daemon reads the store the prefill wrote (it may add a leaf
        // of its own at start: `authorities_loaded`).
        let size = vault::tree_size(&clients.auditor);
        assert!(
            size >= prefilled,
            "the daemon's log holds {size} leaves, {prefilled} prefilled"
        );
        [1usize, 4, 16]
            .into_iter()
            .map(|n| {
                unwrap_rate(
                    std::slice::from_ref(&daemon),
                    std::slice::from_ref(&clients.agency),
                    &body,
                    1000,
                    n,
                    options.seconds(),
                )
            })
            .fold(0f64, f64::max)
    };
    let control = best(0);
    prefill(&token.path("lavd.db"), leaves);
    (control, best(leaves))
}

/// Leaves already in the log in (f).
fn big_log_leaves(options: &Options) -> u64 {
    if options.quick {
        100_000
    } else {
        1_000_000
    }
}

/// `[roles]` plus limits that let the benchmark through: large bodies and
/// batches, and a rate limit it never reaches.
fn bench_toml() -> String {
    format!(
        "{}\n[limits]\nmax_body_bytes = 16777216\nmax_batch = 1000\n\
         rate_limit_per_second = 1000000\nrate_limit_burst = 1000000\n",
        vault::roles_toml()
    )
}

/// A double-lock warrant with a budget the benchmark never exhausts.
fn big_warrant(id: &str) -> serde_json::Value {
    let recipient = vault::recipient();
    vault::double_lock(&vault::claims(id, recipient.public(), 1_000_000_000_000))
}

/// A fresh token with its PKI and the benchmark's config
/// ([`write_bench_config`]).
fn bench_token(options: &Options) -> (TestToken, Pki) {
    let token = TestToken::new();
    let pki = Pki::new(&token);
    write_bench_config(&token, options);
    (token, pki)
}

/// The benchmark's `lavd.toml` for `token`: SoftHSM with `options.pool`
/// sessions, [`bench_toml`].
fn write_bench_config(token: &TestToken, options: &Options) {
    token.write_config_hsm(
        &softhsm_tests::module_path(),
        options.pool,
        SOFTHSM_QUIRKS,
        &serve_config(&bench_toml()),
    );
}

/// `envelopes` as the JSON values a request body carries.
fn as_json(envelopes: &[Envelope]) -> Vec<serde_json::Value> {
    envelopes
        .iter()
        .map(|e| serde_json::from_str(&e.to_json()).expect("json"))
        .collect()
}

/// [`sealed`], as the JSON values a request body carries.
fn sealed_json(escrow: &P256PublicKey, n: usize) -> Vec<serde_json::Value> {
    as_json(&sealed(escrow, n))
}

/// `n` envelopes to escrow key `KID`, each with its own DEK.
fn sealed(escrow: &P256PublicKey, n: usize) -> Vec<Envelope> {
    let now = time::OffsetDateTime::now_utc();
    (0..n)
        .map(|i| {
            let header = HeaderBuilder::new(
                KID,
                vault::PROVIDER,
                TARGET,
                now - time::Duration::minutes(1 + i as i64 % 600),
            )
            .reference(format!("bench-{i}"))
            .build()
            .expect("header");
            seal_envelope(escrow, &header, format!("bench-dek-{i:022}").as_bytes()).expect("seal")
        })
        .collect()
}

fn unwrap_body(warrant: &serde_json::Value, envelopes: &[serde_json::Value]) -> Vec<u8> {
    json!({"warrant": warrant, "envelopes": envelopes})
        .to_string()
        .into_bytes()
}

/// The daemon's count of HSM derives that succeeded, one per envelope
/// opened (a derive retried on a new session counts once).
const DERIVES_OK: &str =
    "lavd_hsm_operation_duration_seconds_count{op=\"ecdh_derive\",result=\"ok\"}";

/// Envelopes per second through `/v1/unwrap`: `clients` threads, each on
/// its own kept-alive connection to one of `agencies` (round robin), send
/// `body` until `duration` has passed (each at least once); the clock
/// starts when the first client leaves the barrier that every client
/// reaches once connected, and stops when the last reply arrives. The
/// envelopes counted, from the replies' statuses, must be matched by as
/// many successful HSM derives in `daemons`' own metrics
/// ([`assert_derived`]), or the run stops.
fn unwrap_rate(
    daemons: &[Daemon],
    agencies: &[Client],
    body: &[u8],
    batch: usize,
    clients: usize,
    duration: Duration,
) -> f64 {
    unwrap_rate_timed(daemons, agencies, body, batch, clients, duration).0
}

/// [`unwrap_rate`], and the time it was measured over.
fn unwrap_rate_timed(
    daemons: &[Daemon],
    agencies: &[Client],
    body: &[u8],
    batch: usize,
    clients: usize,
    duration: Duration,
) -> (f64, Duration) {
    let derives = || -> f64 { daemons.iter().map(|d| d.metric(DERIVES_OK)).sum() };
    let derived_before = derives();
    let envelopes = AtomicU64::new(0);
    // Timed from when every client has its connection: the mTLS
    // handshakes are setup, not unwraps (before 2026-12-07 they were
    // inside the window, about 1% of it at 16 clients). From the first
    // client past the barrier (helper-197: this thread may wake after
    // them).
    let ready = std::sync::Barrier::new(clients);
    let first = std::sync::Mutex::new(None::<Instant>);
    std::thread::scope(|s| {
        for i in 0..clients {
            let (envelopes, ready, first) = (&envelopes, &ready, &first);
            // Clients spread over the replicas, as a load balancer would.
            let agency = &agencies[i % agencies.len()];
            s.spawn(move || {
                // Past the barrier before failing, or the others would
                // wait at it for ever.
                let conn = agency.connect();
                ready.wait();
                let started = *first
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert_with(Instant::now);
                let mut conn = conn.expect("connect");
                loop {
                    let r = conn
                        .request("POST", "/v1/unwrap", &[], Some(body))
                        .expect("unwrap");
                    assert_opened(&r, batch);
                    envelopes.fetch_add(batch as u64, Ordering::Relaxed);
                    if started.elapsed() >= duration {
                        break;
                    }
                }
            });
        }
    });
    let started = first
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .expect("a client");
    let elapsed = started.elapsed();
    let rate = envelopes.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    assert_derived(envelopes.into_inner(), derives() - derived_before);
    (rate, elapsed)
}

/// Stops the run unless the daemons' successful HSM derives during a load
/// (`derived`, from their metrics) are at least the envelopes its replies
/// said were opened (`counted`): a reply's `ok` is the daemon's word, the
/// metric is what its HSM calls returned.
fn assert_derived(counted: u64, derived: f64) {
    assert!(
        derived >= counted as f64,
        "{counted} envelopes counted as opened, but the daemons' {DERIVES_OK} rose by {derived}"
    );
}

/// Stops the run unless `r` is a 200 reply whose `batch` results all say
/// `ok`. A 200 reply may deny every envelope (a budget spent, a window
/// passed, an HSM that failed the open), and counting those envelopes
/// would report work the HSM never did.
fn assert_opened(r: &Response, batch: usize) {
    assert_eq!(r.status, 200, "{}", r.text());
    let statuses = vault::statuses(&r.json());
    assert_eq!(
        statuses.len(),
        batch,
        "{batch} envelopes sent, {} results back",
        statuses.len()
    );
    if let Some((i, reason)) = statuses.iter().enumerate().find(|(_, s)| *s != "ok") {
        panic!("envelope {i} of {batch} not opened: {reason}");
    }
}

/// The latency of timed requests, in seconds.
struct Latency {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// The latency of `requests` single-envelope unwraps per client, `clients`
/// at once, each on its own kept-alive connection to one of `agencies`
/// (round robin).
fn latency(agencies: &[Client], body: &[u8], clients: usize, requests: usize) -> Latency {
    latency_of(agencies, body, |r| assert_opened(r, 1), clients, requests)
}

/// [`latency`] of requests whose every answer passes `check`.
fn latency_of(
    agencies: &[Client],
    body: &[u8],
    check: fn(&Response),
    clients: usize,
    requests: usize,
) -> Latency {
    let mut all: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let agency = &agencies[i % agencies.len()];
                s.spawn(move || {
                    let mut conn = agency.connect().expect("connect");
                    // One untimed request warms the connection.
                    let warm = conn
                        .request("POST", "/v1/unwrap", &[], Some(body))
                        .expect("unwrap");
                    check(&warm);
                    (0..requests)
                        .map(|_| {
                            let started = Instant::now();
                            let r = conn
                                .request("POST", "/v1/unwrap", &[], Some(body))
                                .expect("unwrap");
                            let t = started.elapsed().as_secs_f64();
                            check(&r);
                            t
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client"))
            .collect()
    });
    all.sort_by(f64::total_cmp);
    // Nearest rank: the smallest sample with at least q of them at or
    // below it (before 2026-12-07, one rank higher).
    let at = |q: f64| {
        let rank = (all.len() as f64 * q).ceil() as usize;
        all[rank.clamp(1, all.len()) - 1]
    };
    Latency {
        p50: at(0.50),
        p99: at(0.99),
        mean: all.iter().sum::<f64>() / all.len() as f64,
    }
}

/// The time `sessions` threads take to finish exactly `n` opens on `raw`
/// between them, each taking the next until none is left, in seconds; and
/// the CPU time those threads ran, in seconds.
fn raw_makespan(raw: &Raw, peers: &[P256PublicKey], sessions: usize, n: u64) -> (f64, f64) {
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let ran: u64 = std::thread::scope(|s| {
        let threads: Vec<_> = (0..sessions)
            .map(|t| {
                let next = &next;
                s.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        raw.op(t, &peers[i as usize % peers.len()]);
                    }
                    thread_cpu_ns()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("opens")).sum()
    });
    (started.elapsed().as_secs_f64(), ran as f64 / 1e9)
}

/// The CPU time the calling thread has run, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    schedstat_ns(std::path::Path::new("/proc/thread-self/schedstat"))
        .expect("this thread's schedstat")
}

/// The first field of a task's `schedstat`: the nanoseconds it has run on
/// a CPU. `None` when the task is gone or the file is not as expected.
fn schedstat_ns(path: &std::path::Path) -> Option<u64> {
    let schedstat = std::fs::read_to_string(path).ok()?;
    schedstat.split_whitespace().next()?.parse().ok()
}

/// This program's own sessions on `token` (through `pkcs11`), one per
/// thread, each doing exactly the per-envelope HSM work with no lavd code.
struct Raw {
    sessions: Vec<std::sync::Mutex<(Session, cryptoki::object::ObjectHandle)>>,
}

impl Raw {
    fn new(pkcs11: &Pkcs11, token: &TestToken, n: usize) -> Self {
        let slot = pkcs11
            .get_slots_with_token()
            .expect("slots")
            .into_iter()
            .find(|s| {
                pkcs11
                    .get_token_info(*s)
                    .map(|i| i.label().trim_end() == token.label)
                    .unwrap_or(false)
            })
            .expect("token present");
        let sessions = (0..n)
            .map(|_| {
                let session = pkcs11.open_rw_session(slot).expect("open session");
                match session.login(
                    UserType::User,
                    Some(&AuthPin::new(softhsm_tests::PIN.into())),
                ) {
                    Ok(())
                    | Err(cryptoki::error::Error::Pkcs11(
                        cryptoki::error::RvError::UserAlreadyLoggedIn,
                        _,
                    )) => {}
                    Err(e) => panic!("login: {e}"),
                }
                let key = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(format!("lav-escrow:{KID}").into_bytes()),
                    ])
                    .expect("find")[0];
                std::sync::Mutex::new((session, key))
            })
            .collect();
        Raw { sessions }
    }

    fn op(&self, thread: usize, peer: &P256PublicKey) {
        let guard = self.sessions[thread].lock().expect("session");
        let (session, key) = &*guard;
        let params = Ecdh1DeriveParams::new(EcKdf::null(), peer.sec1());
        let derived = session
            .derive_key(
                &Mechanism::Ecdh1Derive(params),
                *key,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Token(false),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::ValueLen(32u64.into()),
                ],
            )
            .expect("derive");
        let value = session
            .get_attributes(derived, &[AttributeType::Value])
            .expect("read");
        session.destroy_object(derived).expect("destroy");
        assert!(matches!(&value[0], Attribute::Value(v) if v.len() == 32));
    }

    /// One `C_GetSessionInfo` on `thread`'s session: a call the module
    /// forwards and SoftHSM answers without any cryptography.
    fn idle_call(&self, thread: usize) {
        let guard = self.sessions[thread].lock().expect("session");
        guard.0.get_session_info().expect("session info");
    }
}

/// One Ed25519 signature (`C_SignInit` + `C_Sign`, `CKM_EDDSA`) of a
/// checkpoint-sized message with the token's audit key, on one session of
/// this program's own: the HSM's part of signing a checkpoint. Returns the
/// mean of `n` in a tight loop and the median of `n / 4` made 1 ms apart.
fn sign_seconds(pkcs11: &Pkcs11, token: &TestToken, n: usize) -> (f64, f64) {
    let raw = Raw::new(pkcs11, token, 1);
    let guard = raw.sessions[0].lock().expect("session");
    let session = &guard.0;
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"lav-audit".to_vec()),
        ])
        .expect("find the audit key")[0];
    let message = [b'x'; 120];
    let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
    let sign = || {
        let signature = session.sign(&mechanism, key, &message).expect("sign");
        assert_eq!(signature.len(), 64);
    };
    let started = Instant::now();
    for _ in 0..n {
        sign();
    }
    let mean = started.elapsed().as_secs_f64() / n as f64;
    let mut spaced: Vec<f64> = (0..n / 4)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(1));
            let started = Instant::now();
            sign();
            started.elapsed().as_secs_f64()
        })
        .collect();
    (mean, median(&mut spaced))
}

/// The median time of a durable commit of one ~300-byte row in SQLite with
/// lavd's settings (WAL, `synchronous=FULL`), in a file at `path`: the
/// store's part of an unwrap's cost on this disk.
fn commit_seconds(path: &std::path::Path, n: usize) -> f64 {
    let conn = rusqlite::Connection::open(path).expect("probe db");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("full");
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t (v BLOB)")
        .expect("table");
    let row = vec![7u8; 300];
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let started = Instant::now();
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&row])
                .expect("insert");
            started.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut times)
}

/// The median of `values` (sorted in place): for an even count, the mean of
/// the two middle values.
fn median(values: &mut [f64]) -> f64 {
    assert!(!values.is_empty(), "the median of nothing");
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// Appends key-generation leaves to the store at `path` before the daemon
/// starts, in group commits of 1000, as the store itself writes them, until
/// its log holds exactly `leaves` (with the leaves already there).
fn prefill(path: &std::path::Path, leaves: u64) {
    use lavd::audit::leaf::{Event, KeyGenerated};
    use lavd::store::{AuditAppend, AuditStore, Spend, Store};
    let store = Store::open(path).expect("store");
    let there = store.tree_size().expect("tree size");
    assert!(there < leaves, "{there} leaves before the prefill");
    let t0 = time::OffsetDateTime::now_utc();
    let event: Event = KeyGenerated::new(
        "prefill",
        t0,
        t0 + time::Duration::days(31),
        t0 + time::Duration::days(400),
        None,
    )
    .expect("event")
    .into();
    let mut written = there;
    while written < leaves {
        let n = 1000.min(leaves - written);
        store
            .append(AuditAppend {
                events: vec![event.clone(); n as usize],
                time: t0,
                spend: Spend::None,
            })
            .expect("append");
        written += n;
    }
    // The row says the log holds `leaves`: a prefill that wrote elsewhere,
    // or less, would make (f) a second control.
    assert_eq!(
        store.tree_size().expect("tree size"),
        leaves,
        "the log's size after the prefill"
    );
    drop(store);
    // The prefill leaves hundreds of megabytes of dirty pages in the page
    // cache; written back by the kernel during (f)'s timing, they would
    // slow its commits' fsyncs: a cost of this set-up, not of a large log.
    // Flushed here, before the daemon starts.
    let synced = std::process::Command::new("sync").status();
    assert!(
        synced.as_ref().is_ok_and(std::process::ExitStatus::success),
        "sync after the prefill: {synced:?}"
    );
}

/// All CPUs' time so far, in clock ticks, and its part stolen by the
/// hypervisor (the first line of `/proc/stat`); `None` where there is none.
struct CpuTimes {
    total: u64,
    steal: u64,
}

fn cpu_times() -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already counted in user and nice.
    let counted = fields.get(..8)?;
    Some(CpuTimes {
        total: counted.iter().sum(),
        steal: counted[7],
    })
}

/// The 1-minute load average (`/proc/loadavg`), 0 where there is none.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The file system `path` is on, from `/proc/self/mounts` (the longest
/// mount point above it): `(type, mount point, device)`.
fn file_system(path: &std::path::Path) -> (String, String, String) {
    let path = path.canonicalize().expect("the benchmark's directory");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best = (
        String::from("unknown"),
        String::from("?"),
        String::from("?"),
    );
    let mut depth = None;
    for line in mounts.lines() {
        let mut fields = line.split(' ');
        let (Some(device), Some(point), Some(kind)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // Spaces and the like are octal escapes (`\040`) in the file.
        let point = point.replace("\\040", " ");
        if path.starts_with(&point) && depth.is_none_or(|d| point.len() >= d) {
            depth = Some(point.len());
            best = (kind.to_string(), point, device.to_string());
        }
    }
    best
}

/// The CPU model (`/proc/cpuinfo`).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `VmHWM` (peak resident set) of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib / 1024.0
}

/// Whether `value` meets `wanted` ("≥ 0.85", "≤ 1.5"), on the exact value;
/// `None` for a ratio printed for comparison, with no target.
fn met(value: f64, wanted: &str) -> Option<bool> {
    let bound = |n: &str| -> f64 { n.parse().expect("a target's bound is a number") };
    match wanted.strip_prefix("≥ ") {
        Some(n) => Some(value >= bound(n)),
        None => wanted.strip_prefix("≤ ").map(|n| value <= bound(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::{assert_derived, assert_opened, lower_ratio, median, met};
    use softhsm_tests::server::Response;

    #[test]
    fn an_even_count_takes_the_mean_of_the_middle_two() {
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [7.0]), 7.0);
    }

    fn reply(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    const OPENED_TWO: &str = r#"{"sealed_to":{"kid":"k","enc":"e"},"results":[{"status":"ok","ct":"a"},{"status":"ok","ct":"b"}],"audit":{"checkpoint":"c","first_index":0,"count":2}}"#;

    #[test]
    fn a_reply_counts_only_when_every_envelope_opened() {
        assert_opened(&reply(200, OPENED_TWO), 2);
    }

    #[test]
    #[should_panic(expected = "envelope 1 of 2 not opened: budget_exhausted")]
    fn a_reply_with_a_denial_stops_the_run() {
        let body = OPENED_TWO.replace(
            r#"{"status":"ok","ct":"b"}"#,
            r#"{"status":"denied","reason":"budget_exhausted"}"#,
        );
        assert_opened(&reply(200, &body), 2);
    }

    #[test]
    #[should_panic(expected = "3 envelopes sent, 2 results back")]
    fn a_reply_with_too_few_results_stops_the_run() {
        assert_opened(&reply(200, OPENED_TWO), 3);
    }

    #[test]
    fn a_load_counts_only_envelopes_the_hsm_derived() {
        assert_derived(3000, 3000.0);
        assert_derived(3000, 3004.0);
    }

    #[test]
    #[should_panic(expected = "3000 envelopes counted as opened, but the daemons'")]
    fn a_load_with_fewer_derives_than_envelopes_stops_the_run() {
        assert_derived(3000, 2999.0);
    }

    #[test]
    fn c_over_a_takes_the_lower_ratio_whichever_a_is_faster() {
        // 17:30 on 2026-12-03: (a) 5,755 at the start, 3,974 between.
        assert_eq!(lower_ratio(3540.0, 5755.0, 3974.0), 3540.0 / 5755.0);
        assert_eq!(lower_ratio(3540.0, 3974.0, 5755.0), 3540.0 / 5755.0);
    }

    #[test]
    fn a_target_is_judged_on_the_exact_ratio_not_the_printed_one() {
        assert_eq!(met(0.8469, "≥ 0.85"), Some(false));
        assert_eq!(met(0.85, "≥ 0.85"), Some(true));
        assert_eq!(met(1.5001, "≤ 1.5"), Some(false));
        assert_eq!(met(0.70, "≤ 1"), Some(true));
        assert_eq!(met(1.09, "(the module's own limit)"), None);
        assert_eq!(met(1.29, "(for comparison)"), None);
    }
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, String, f64, String)>,
    ratios: Vec<(String, f64, String)>,
    notes: Vec<(String, f64)>,
    /// The file system the stores, tokens and the commit probe are on.
    disk: String,
}

impl Report {
    fn row(&mut self, part: &str, what: &str, value: f64, unit: &str) {
        eprintln!("({part}) {what}: {value:.2} {unit}");
        self.rows
            .push((part.into(), what.into(), value, unit.into()));
    }

    fn ratio(&mut self, what: &str, value: f64, target: &str) {
        self.ratios.push((what.into(), value, target.into()));
    }

    fn note(&mut self, what: &str, value: f64) {
        self.notes.push((what.into(), value));
    }

    /// The figure `what`, if its part ran.
    fn get(&self, what: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.1 == what).map(|r| r.2)
    }

    fn print(&self, quick: bool) {
        if quick {
            println!("(--quick: a smoke run; these are not figures)\n");
        }
        println!(
            "{}, CPU {}, files on {}, {}",
            lavd::codec::format_time(time::OffsetDateTime::now_utc()),
            cpu_model(),
            self.disk,
            self.notes
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!();
        println!("| part | measurement | value | unit |\n|---|---|---:|---|");
        for (part, what, value, unit) in &self.rows {
            // Milliseconds to the tenth of a millisecond hide (d)'s
            // sub-millisecond costs: two decimals there.
            let digits = if *unit == "ms" { 2 } else { 1 };
            println!("| ({part}) | {what} | {value:.digits$} | {unit} |");
        }
        // Three decimals, and whether the target is met judged on the
        // exact value: 0.847 printed as 0.85 beside "≥ 0.85" reads as met.
        println!("\n| target | ratio | wanted | met |\n|---|---:|---|---|");
        for (what, value, target) in &self.ratios {
            let met = match met(*value, target) {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            println!("| {what} | {value:.3} | {target} | {met} |");
        }
    }

    fn json(&self, quick: bool) -> String {
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|(part, what, value, unit)| json!({"part": part, "measurement": what, "value": value, "unit": unit}))
            .collect();
        let ratios: Vec<_> = self
            .ratios
            .iter()
            .map(|(what, value, target)| {
                json!({"ratio": what, "value": value, "wanted": target, "met": met(*value, target)})
            })
            .collect();
        let notes: serde_json::Map<_, _> = self
            .notes
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let doc = json!({
            "quick": quick,
            "date": lavd::codec::format_time(time::OffsetDateTime::now_utc()),
            "machine": notes,
            "cpu": cpu_model(),
            "disk": self.disk,
            "rows": rows,
            "ratios": ratios,
        });
        serde_json::to_string_pretty(&doc).expect("json")
    }
}
