//! The user PIN changed on the token while lavd runs (a rotation whose new
//! PIN lavd has not been given yet). The fault module emulates it
//! (`pin = NEW:REAL`): it refuses every `C_Login` with another PIN, logged
//! in or not, and counts each refusal.
//!
//! Tokens count wrong PINs and lock the user out after a few. So after one
//! refusal lavd tries no login again until a reload reads a *different* PIN
//! (or a restart): a routine reload with the same PIN keeps the latch.
//! Meanwhile the sessions still logged in keep serving; once none is left
//! every request fails closed (503 `hsm_unavailable`) and `/readyz` is 503.

use rustix::process::Signal;
use softhsm_tests::server::{make_audit_key, serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties};
use softhsm_tests::{shim_module_path, Shim, TestToken, PIN};

/// A delay for every call through the fault module: with it, each open
/// holds its session long enough that a batch's other workers open sessions
/// of their own (and log in) rather than wait for it. Without it, on an idle
/// machine, one session could serve a whole batch of eight, no login would be
/// tried, and there would be no refusal to test (a CI run at `737a6f2` saw
/// none after four batches).
const SLOW: &str = "delay_us = 2000";

fn reload(daemon: &Daemon) {
    daemon.signal(Signal::HUP);
    daemon.expect_notify("RELOADING=1");
    daemon.expect_notify("READY=1");
}

#[test]
fn a_refused_pin_is_tried_once_until_a_reload_reads_a_new_one() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    // Four sessions: a batch of eight opens new ones, each logging in.
    t.write_config_with(
        &shim_module_path(),
        4,
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    vault::generate_escrow_key(&t, "E-1");
    let daemon = Daemon::start_logging(&t, "info");
    daemon.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let warrant = vault::double_lock(&vault::claims("PIN-1", vault::recipient().public(), 1000));
    let unwrap = |tag: &str, n: usize| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": vault::batch(&escrow, tag, n)}),
        )
    };
    let rotated = format!("pin = rotated-pin:{PIN}");

    // The PIN is changed on the token. Batches that want more sessions
    // than are logged in meet one refusal, then wait for the sessions that
    // are: they are all served. (2 ms a call makes each open hold its
    // session long enough that a batch's workers need more than one, however
    // fast the machine.)
    shim.set(&format!("{rotated}\n{SLOW}"));
    for round in 0..4 {
        let r = unwrap(&format!("held-{round}"), 8);
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"; 8], "round {round}");
    }
    assert_eq!(shim.faults(), 1, "logins tried after the first refusal");
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 1.0);
    assert!(
        daemon
            .stderr()
            .contains("the token refused the HSM PIN; no login is tried again"),
        "{}",
        daemon.stderr()
    );
    daemon.wait_readyz(200);

    // A routine reload (new CRLs, say) reads the same PIN: still held.
    reload(&daemon);
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 1.0);
    let r = unwrap("same-pin", 8);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        shim.faults(),
        1,
        "a reload with the refused PIN tried it again"
    );
    assert!(daemon
        .stderr()
        .contains("the PIN source still holds the PIN the token refused"));

    // Every session is lost (one lost-session fault on a derive): lavd
    // drops its sessions and is logged out, and it does not log in again.
    shim.set(&format!(
        "{rotated}\nfault = session_handle_invalid\nfault_calls = C_DeriveKey\nfault_limit = 1"
    ));
    unwrap("lost", 1).assert_error(503, "hsm_unavailable");
    assert_eq!(shim.faults(), 2, "the lost-session fault was not injected");
    shim.set(&rotated);
    for round in 0..3 {
        unwrap(&format!("out-{round}"), 4).assert_error(503, "hsm_unavailable");
    }
    let ready = daemon.wait_readyz(503);
    assert_eq!(ready.json()["hsm"], false, "{}", ready.text());
    assert_eq!(shim.faults(), 2, "a login was tried while held back");

    // The operator puts the new PIN in the PIN file and reloads: it
    // applies, logins are tried again, and the daemon serves.
    std::fs::write(t.path("pin"), "rotated-pin\n").expect("pin file");
    reload(&daemon);
    assert!(daemon.stderr().contains("the HSM PIN changed"));
    assert!(daemon
        .stderr()
        .contains("HSM logins are tried again, with the new PIN"));
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 0.0);
    let r = unwrap("after", 8);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(vault::statuses(&r.json()), ["ok"; 8]);
    daemon.wait_readyz(200);
    assert_eq!(shim.faults(), 2, "the new PIN was refused");
}

/// A planned module reset (`[hsm.quirks] reset_module_after_opens`) would
/// log out the sessions still serving while the token refuses the PIN, and
/// none could log in again: it is put off until the PIN is replaced, and
/// the logged-in sessions go on serving past the opens that would have
/// started it.
#[test]
fn no_planned_reset_runs_while_the_token_refuses_the_pin() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    t.write_config_hsm(
        &shim_module_path(),
        4,
        "[hsm.quirks]\nreset_module_after_opens = 100\n",
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    let v = vault::Vault::serve(t, pki);
    let (daemon, escrow) = (&v.daemon, &v.escrow);
    let c = v.parties.clients(&v.pki, daemon.api);
    let warrant = vault::double_lock(&vault::claims("PIN-R", vault::recipient().public(), 1000));
    let unwrap = |tag: &str, n: usize| {
        vault::post(
            &c.agency,
            "/v1/unwrap",
            &serde_json::json!({"warrant": warrant, "envelopes": vault::batch(escrow, tag, n)}),
        )
    };
    // The PIN changes on the token; batches that want more sessions than
    // are logged in meet the refusal (as in the test above).
    shim.set(&format!("pin = rotated-pin:{PIN}\n{SLOW}"));
    for round in 0..4 {
        let r = unwrap(&format!("held-{round}"), 8);
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
    }
    assert_eq!(daemon.metric("lavd_hsm_login_refused"), 1.0);
    shim.set(&format!("pin = rotated-pin:{PIN}"));
    // 32 opens so far; 200 more pass the 100 that would start a reset.
    for round in 0..4 {
        let r = unwrap(&format!("past-{round}"), 50);
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        assert_eq!(vault::statuses(&r.json()), ["ok"; 50], "round {round}");
    }
    assert_eq!(
        daemon.metric("lavd_hsm_planned_resets_total{outcome=\"done\"}"),
        0.0
    );
    assert_eq!(shim.faults(), 1, "logins tried after the first refusal");
}

/// A start (`Daemon::try_start`, or `try_start_witness`) that must stop
/// with exit 77 and `hsm_login_refused`; returns its stderr.
fn refused(
    start: Result<Daemon, (Option<std::process::ExitStatus>, String)>,
    what: &str,
) -> String {
    match start {
        Err((Some(status), stderr)) => {
            assert_eq!(status.code(), Some(77), "{what}: {stderr}");
            assert!(
                stderr.contains("lavd: hsm_login_refused: "),
                "{what}: {stderr}"
            );
            stderr
        }
        Err((None, stderr)) => panic!("{what}: neither started nor stopped:\n{stderr}"),
        Ok(_) => panic!("{what}: started"),
    }
}

/// `lavd serve` on `t`, which must stop at its start as [`refused`] says.
fn refused_at_start(t: &TestToken, what: &str) -> String {
    refused(Daemon::try_start(t), what)
}

/// A pod is restarted whatever its exit status, and each start would spend
/// one of the token's PIN tries. With `[hsm] refused_pin_record` (set in the
/// Kubernetes manifests), a PIN refused at start is recorded against the
/// PIN file, and the next start tries no login while that file is
/// unchanged; a changed file is tried, and a login that succeeds removes
/// the record. The commands that log in with the same config mind the
/// record, and record a refusal they meet, as a start does.
#[test]
fn a_pin_refused_at_start_is_not_tried_again_while_its_file_is_unchanged() {
    let t = TestToken::new();
    let _pki = Pki::new(&t);
    let shim = Shim::new(&t);
    let record = t.path("run/refused-pin");
    t.write_config_hsm(
        &shim_module_path(),
        2,
        &format!("refused_pin_record = {:?}\n", record.display().to_string()),
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    let stats = t.path("shim.stats");
    let pin_file = t.path("pin");
    let replace_pin_file = |pin: &str| {
        // Written aside and renamed over it, as Kubernetes updates a
        // mounted Secret: a new file.
        let tmp = t.path("pin.new");
        std::fs::write(&tmp, format!("{pin}\n")).expect("PIN file");
        softhsm_tests::restrict(&tmp);
        std::fs::rename(&tmp, &pin_file).expect("replace the PIN file");
    };
    // While the token still takes the PIN (`lavd keys generate-audit`
    // minds the record too, so its directory must be there).
    let run = record.parent().expect("the record's directory");
    std::fs::create_dir(run).expect("the record's directory");
    make_audit_key(&t);
    std::fs::remove_dir(run).expect("the record's directory, empty");
    // The deployment's store, made before the PIN changed (the commands
    // below look for it before they log in).
    lavd::store::SqliteStore::open(&t.path("lavd.db")).expect("the store");
    // The token's PIN was changed; the file still holds the old one.
    shim.set(&format!("pin = rotated-pin:{PIN}"));

    // The record's directory is missing: a refusal could not be recorded,
    // and every restart would spend a try, so none is made.
    let out = t.lavd_with_config(&["serve"]);
    let stderr = softhsm_tests::assert_fails_with(&out, 1, "pin_record_unavailable");
    assert!(stderr.contains("cannot write a file beside"), "{stderr}");
    assert!(!stats.exists(), "a login was tried with no record possible");
    // A record that cannot be read (a directory in its place): whether
    // this PIN was refused is unknown, so no login is tried.
    std::fs::create_dir_all(&record).expect("a directory at the record's path");
    let out = t.lavd_with_config(&["serve"]);
    softhsm_tests::assert_fails_with(&out, 1, "pin_record_unavailable");
    assert!(
        !stats.exists(),
        "a login was tried past an unreadable record"
    );
    std::fs::remove_dir(&record).expect("remove the directory");

    let first = refused_at_start(&t, "first start");
    assert!(first.contains("CKR_PIN_INCORRECT"), "{first}");
    assert!(first.contains("recorded the refusal"), "{first}");
    assert_eq!(shim.faults(), 1, "logins refused at the first start");
    let text = std::fs::read_to_string(&record).expect("the record");
    assert!(
        text.contains(&format!("pin_file={:?} ", pin_file.display().to_string())),
        "{text}"
    );
    assert!(text.ends_with("\nrefused=CKR_PIN_INCORRECT\n"), "{text}");

    // Restarted with the same file: no login is tried (the module is not
    // even loaded, so it writes no stats).
    std::fs::remove_file(&stats).expect("clear the module's stats");
    let second = refused_at_start(&t, "second start");
    assert!(
        second.contains("when lavd last tried it (CKR_PIN_INCORRECT), and neither the file"),
        "{second}"
    );
    assert!(
        second.contains(&record.display().to_string()),
        "the refusal does not name the record: {second}"
    );
    assert!(!stats.exists(), "a login was tried at the second start");
    assert_eq!(shim.faults(), 0);
    // A command that logs in with the same config minds the record too:
    // an operator's `lavd keys list` or `lavd audit key` would otherwise
    // spend a try. (Each command opens the HSM at a call site of its own.)
    for command in [
        &["keys", "list"][..],
        &["keys", "generate-audit"],
        &["keys", "destroy", "--expired"],
        &["keys", "discard-orphan", "--kid", "2026-12"],
        &[
            "keys",
            "generate",
            "--kid",
            "2026-12",
            "--not-before",
            "2026-12-01T00:00:00Z",
            "--not-after",
            "2027-01-01T00:00:00Z",
            "--destroy-after",
            "2027-06-01T00:00:00Z",
        ],
        &["audit", "key"],
        &["audit", "export", "--out", "/dev/null/never-written"],
    ] {
        let out = t.lavd_with_config(command);
        let stderr = softhsm_tests::assert_fails_with(&out, 77, "hsm_login_refused");
        assert!(
            stderr.contains("when lavd last tried it (CKR_PIN_INCORRECT)"),
            "{command:?}: {stderr}"
        );
        assert!(!stats.exists(), "{command:?} tried a login");
    }

    // The file replaced, even by the same wrong PIN: tried once more, here
    // by a command, whose refusal is recorded for the daemon as well. It
    // runs under umask 077, as a hardened root shell may: the record must
    // stay readable to the daemon's user all the same.
    replace_pin_file(PIN);
    let config = t.config();
    let out = softhsm_tests::output_within(
        std::process::Command::new("sh")
            .args(["-c", "umask 077 && exec \"$@\"", "sh"])
            .arg(softhsm_tests::lavd_binary())
            .args(["keys", "list", "--config"])
            .arg(&config)
            .env("SOFTHSM2_CONF", softhsm_tests::harness().conf())
            .env("LAVD_LOG", "warn"),
        softhsm_tests::CLI_LIMIT,
    );
    let third = softhsm_tests::assert_fails_with(&out, 77, "hsm_login_refused");
    assert!(third.contains("CKR_PIN_INCORRECT"), "{third}");
    assert!(third.contains("recorded the refusal"), "{third}");
    assert_eq!(shim.faults(), 1, "the changed file was not tried");
    {
        use std::os::unix::fs::MetadataExt as _;
        let mode = std::fs::metadata(&record).expect("the record").mode();
        assert_eq!(mode & 0o777, 0o644, "the record's mode: {mode:o}");
    }
    std::fs::remove_file(&stats).expect("clear the module's stats");
    refused_at_start(&t, "the start after the command");
    assert_eq!(
        shim.faults(),
        0,
        "a login was tried after the command's refusal"
    );

    // The right PIN: the daemon serves, and the record is gone.
    replace_pin_file("rotated-pin");
    let refused_text = std::fs::read_to_string(&record).expect("the record");
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    assert_eq!(shim.faults(), 0, "the right PIN was refused");
    assert!(!record.exists(), "the record outlived a login that worked");
    drop(daemon);

    // A record of another login (another config sharing the path, naming
    // another PIN file) still stops the login it names: a login of this
    // config that works leaves it.
    let foreign = refused_text.replacen(
        &format!("pin_file={:?} ", pin_file.display().to_string()),
        "pin_file=\"/etc/lavd/cli-pin\" ",
        1,
    );
    assert_ne!(foreign, refused_text, "{refused_text}");
    std::fs::write(&record, &foreign).expect("another login's record");
    softhsm_tests::assert_ok(&t.lavd_with_config(&["keys", "list"]));
    assert_eq!(
        std::fs::read_to_string(&record).expect("the record kept"),
        foreign
    );
}

/// `lavd witness serve` minds `refused_pin_record` as `lavd serve` does:
/// a PIN refused at its start is recorded, the next start with the same
/// PIN file stops before any login, and the right PIN clears the record.
/// (SoftHSM itself refuses the wrong PIN here; the fault module's login
/// count is shown for `lavd serve` above, through the same code.)
#[test]
fn a_witness_does_not_try_a_pin_refused_at_its_last_start() {
    let log = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let log_vkey =
        lavd::audit::note::verifier_key("log.test/pin", log.verifying_key().as_bytes()).unwrap();
    let mut w =
        softhsm_tests::witness::Witness::start("witness.test/pin", "log.test/pin", &log_vkey, "");
    // Stopped, then given a record and a PIN the token does not take.
    w.daemon.signal(Signal::TERM);
    assert!(w
        .daemon
        .wait_exit(std::time::Duration::from_secs(30))
        .success());
    let config = std::fs::read_to_string(&w.config).expect("witness.toml");
    let record = w.t.path("run/refused-pin");
    std::fs::create_dir(w.t.path("run")).expect("the record's directory");
    std::fs::write(
        &w.config,
        config.replacen(
            "sessions = 2\n",
            &format!(
                "sessions = 2\nrefused_pin_record = {:?}\n",
                record.display().to_string()
            ),
            1,
        ),
    )
    .expect("witness.toml");
    let pin_file = w.t.path("pin");
    let replace_pin_file = |pin: &str| {
        let tmp = w.t.path("pin.new");
        std::fs::write(&tmp, format!("{pin}\n")).expect("PIN file");
        softhsm_tests::restrict(&tmp);
        std::fs::rename(&tmp, &pin_file).expect("replace the PIN file");
    };
    replace_pin_file("9999");
    let witness_refused =
        |what: &str| refused(Daemon::try_start_witness(&w.t, &w.config, "witness"), what);
    let first = witness_refused("first start");
    assert!(
        first.contains("HSM login failed: CKR_PIN_INCORRECT"),
        "{first}"
    );
    assert!(first.contains("recorded the refusal"), "{first}");
    assert!(record.exists());
    let second = witness_refused("second start");
    assert!(
        second.contains("when lavd last tried it (CKR_PIN_INCORRECT), and neither the file"),
        "{second}"
    );
    // `lavd witness vkey` and `keygen` log in with the same config: they
    // stop too.
    let config_path = w.config.to_str().expect("utf-8 path");
    for command in ["vkey", "keygen"] {
        let out = w.t.lavd(&["witness", command, "--config", config_path]);
        let stderr = softhsm_tests::assert_fails_with(&out, 77, "hsm_login_refused");
        assert!(
            stderr.contains("when lavd last tried it (CKR_PIN_INCORRECT)"),
            "{command}: {stderr}"
        );
    }
    replace_pin_file(PIN);
    w.daemon = Daemon::start_witness(&w.t, &w.config, "witness");
    assert!(!record.exists(), "the record outlived a login that worked");
}
