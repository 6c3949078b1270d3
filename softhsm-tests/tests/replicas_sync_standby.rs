//! Nothing is released or signed over leaves that only the primary has.
//!
//! With a synchronous standby, a commit is acknowledged once the standby has
//! it. A transaction whose wait for the standby is cut short (an operator
//! ending its backend, a crashed primary replaying it) is committed on the
//! primary only: a failover would lose it. Before, lavd read such a commit's
//! fate from the primary alone (`pg_xact_status` "committed", its first leaf
//! stored), released the request's keys, and signed a checkpoint over the
//! tree that held its leaves; after a failover, the next appends would make
//! a different tree of that size, a fork.
//!
//! The test's own cluster ([`softhsm_tests::pg_cluster`]) is made to wait
//! for a standby that never comes (`synchronous_standby_names` naming
//! none that exists), an unwrap is sent to one replica, and its backend,
//! waiting for the standby, is ended as an operator would. While the
//! standby is missing, neither that unwrap nor another replica's checkpoint
//! of the grown tree may be answered; once the wait is lifted both are, and
//! the checkpoint covers the leaves.
//!
//! The same with the wait cancelled instead (`pg_cancel_backend`): the
//! COMMIT is then answered with success and a WARNING, which lavd takes as
//! "committed here, not known to be replicated" (the second test).
//!
//! The same wait holds a COMMIT whose answer is lost while lavd asks its
//! fate on a new connection: see the third test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use softhsm_tests::eventually;
use std::time::Duration;

use softhsm_tests::pg::TestDb;
use softhsm_tests::pg_cluster::{self, wait_for_standby};
use softhsm_tests::server::{serve_config, Daemon, Pki};
use softhsm_tests::vault::{self, Parties, TARGET};
use softhsm_tests::{shim_module_path, Shim, TestToken};
use time::OffsetDateTime;

/// How long [`eventually`] waits here.
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Lifts the wait when dropped, also when the test fails: the cluster is
/// shared with `store_faults.rs`.
struct Lift;

impl Drop for Lift {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A second panic here would abort the process, unreported.
            pg_cluster::set_standby_quietly(None);
        } else {
            wait_for_standby(None);
        }
    }
}

/// The tests here take turns: each sets the cluster's standby.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_commit_only_the_primary_has_is_neither_released_nor_signed_over() {
    commit_cut_short_by("pg_terminate_backend");
}

/// The same with the wait cancelled (`pg_cancel_backend`, which any session
/// of lavd's own role may send): PostgreSQL then answers the COMMIT with
/// success and a WARNING ("canceling wait for synchronous replication …
/// committed locally"), on a connection that stays. Before, lavd took that
/// success as a replicated commit and released the keys (helper-183's 1).
/// The database's default `client_min_messages` is `error` here, which
/// would keep that WARNING from lavd's sessions but for their own setting.
#[test]
fn a_commit_whose_wait_was_cancelled_is_neither_released_nor_signed_over() {
    commit_cut_short_by("pg_cancel_backend");
}

/// One replica's audit commit waits for a standby that does not come, and
/// `how` (`pg_terminate_backend` or `pg_cancel_backend`) cuts its wait short.
fn commit_cut_short_by(how: &str) {
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    pg_cluster::ensure();
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let shim = Shim::new(&t);
    let db = TestDb::create_on(pg_cluster::PORT);
    if how == "pg_cancel_backend" {
        // The database would have its sessions sent no WARNING (a session
        // of lavd's role may set this): lavd's own setting wins.
        db.set_default("client_min_messages", "error");
    }
    db.write_token_config_hsm(
        &t,
        &shim_module_path(),
        "sessions = 2\ncall_timeout_ms = 60000\n",
        &format!("{}\n{}", shim.hsm_env(), serve_config(&vault::roles_toml())),
    );
    vault::generate_escrow_key(&t, "E-1");
    // Two replicas: `a` unwraps, `b` is asked for a checkpoint.
    let daemon = Daemon::start_replica(&t, "replica-a");
    let other = Daemon::start_replica(&t, "replica-b");
    daemon.wait_readyz(200);
    other.wait_readyz(200);
    let parties = Parties::new(&pki);
    let c = parties.clients(&pki, daemon.api);
    let b = parties.clients(&pki, other.api);
    let escrow = vault::published_key(&c.provider, "E-1");
    let recipient = vault::recipient();
    let warrant = vault::double_lock(&vault::claims("W-SYNC", recipient.public(), 10));
    let now = OffsetDateTime::now_utc();
    let body = |tag: &str| {
        serde_json::json!({"warrant": warrant, "envelopes": [vault::seal(
            &escrow, "E-1", TARGET, now - time::Duration::hours(1), tag, &[5; 32],
        )]})
    };
    let r = vault::post(&c.agency, "/v1/unwrap", &body("before"));
    assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
    let size = vault::tree_size(&c.auditor);

    let _lift = Lift;
    std::thread::scope(|s| {
        // Held in the HSM, past its reservation (whose own commit would
        // wait for the standby too), while the server starts waiting.
        shim.set("fault = hang\nfault_calls = C_DeriveKey");
        let unwrap = s.spawn(|| vault::post(&c.agency, "/v1/unwrap", &body("during")));
        eventually("the unwrap's HSM open", WAIT, || shim.faults() > 0);
        wait_for_standby(Some("lavd_test_no_such_standby"));
        shim.set("");
        // Its audit commit waits for the standby; the operator ends it.
        let mut admin = db.admin();
        let mut pid = None;
        eventually("the audit commit waiting for the standby", WAIT, || {
            pid = admin
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND wait_event = 'SyncRep' \
                     AND query ILIKE 'COMMIT%' LIMIT 1",
                    &[&db.name()],
                )
                .unwrap()
                .map(|row| row.get::<_, i32>(0));
            pid.is_some()
        });
        let cut: bool = admin
            .query_one(&format!("SELECT {how}($1)"), &[&pid])
            .unwrap()
            .get(0);
        assert!(cut, "{how} found no backend {pid:?}");
        // The leaves are on the primary...
        let before = i64::try_from(size).unwrap();
        eventually("the ended commit's leaves", WAIT, || {
            db.rows("audit_leaves") > before
        });
        // ... and only there: nothing is answered over them.
        let checkpoint = s.spawn(|| b.auditor.get("/v1/audit/checkpoint"));
        std::thread::sleep(Duration::from_secs(4));
        if unwrap.is_finished() {
            panic!(
                "the unwrap was answered while its leaves were on the primary only: {}\n{}",
                unwrap.join().unwrap().text(),
                daemon.stderr()
            );
        }
        if checkpoint.is_finished() {
            panic!(
                "a checkpoint was answered while the tree held leaves on the primary only: {}",
                checkpoint.join().unwrap().text()
            );
        }

        // The wait lifted (as when the standby catches up): both answer.
        wait_for_standby(None);
        let r = unwrap.join().unwrap();
        assert_eq!(vault::statuses(&r.json()), ["ok"], "{}", r.text());
        let r = checkpoint.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let note = r.json()["checkpoint"].as_str().unwrap().to_string();
        let signed: u64 = note.lines().nth(1).unwrap().parse().unwrap();
        assert_eq!(signed, size + 1, "{note}");
    });
}

/// A COMMIT whose answer is lost while it waits for the standby is still
/// running when lavd asks its fate, on a new connection. That connection
/// must know the server for the same one, whatever its session settings:
/// the server's start time was compared as a timestamp cast to text, which
/// follows `TimeZone`, so after `ALTER DATABASE … SET timezone` the new
/// connection took the server for another, asked only whether the first
/// leaf was stored (not yet: the transaction still ran), and answered the
/// append as failed, though it commits once its wait ends. Its fate is
/// unknown: that is the answer.
#[test]
fn a_commit_still_waiting_for_the_standby_is_unknown_whatever_the_session_time_zone() {
    use lavd::audit::leaf::KeyGenerated;
    use lavd::codec::parse_time;
    use lavd::store::{AuditAppend, AuditStore as _, Spend, Store, StoreError, StoreSettings};

    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    pg_cluster::ensure();
    let db = TestDb::create_on(pg_cluster::PORT);
    let proxy = softhsm_tests::pg::CutAtCommit::start(pg_cluster::PORT);
    let store =
        Store::open_settings(&StoreSettings::Postgres(db.settings_via(proxy.port()))).unwrap();
    let at = |t: &str| parse_time(t).unwrap();
    let append = |kid: &str| {
        store.append(AuditAppend {
            events: vec![KeyGenerated::new(
                kid,
                at("2026-12-01T00:00:00Z"),
                at("2027-01-01T00:00:00Z"),
                at("2028-01-01T00:00:00Z"),
                None,
            )
            .unwrap()
            .into()],
            time: at("2026-12-05T10:00:00Z"),
            spend: Spend::None,
        })
    };
    append("k1").unwrap();
    // Connections opened from now on show times in another zone.
    db.client()
        .batch_execute(&format!(
            "ALTER DATABASE {} SET timezone = 'Pacific/Chatham'",
            db.name()
        ))
        .unwrap();

    let _lift = Lift;
    wait_for_standby(Some("lavd_test_no_such_standby"));
    proxy.arm();
    // Its fate is asked for up to the statement timeout (5 s); a wait past
    // a minute is a hang, which fails the test here instead of holding CI
    // until its limit: the wait is lifted so that the append can return.
    let appended = std::thread::scope(|s| {
        let (answered, answer) = std::sync::mpsc::channel();
        s.spawn(move || answered.send(append("k2")));
        answer
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                wait_for_standby(None);
                panic!("the append was not answered within 60 s")
            })
    });
    assert_eq!(proxy.cuts(), 1, "the proxy never saw the COMMIT");
    assert!(
        matches!(appended, Err(StoreError::CommitUnknown(_))),
        "{appended:?}"
    );
}

/// A migration's commit whose wait for the standby is cancelled is answered
/// with success and a WARNING: the schema is then on the primary only, and
/// the migration is not taken as done until a barrier shows it replicated.
/// Cancelled again (the barrier's own wait), it fails `CommitUnknown`.
/// Before, `migrate()` never read the WARNING and answered at once.
#[test]
fn a_migration_whose_wait_was_cancelled_is_not_taken_as_done() {
    use lavd::store::postgres::PgStore;
    use lavd::store::StoreError;

    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    pg_cluster::ensure();
    let db = TestDb::create_on(pg_cluster::PORT);
    let _lift = Lift;
    wait_for_standby(Some("lavd_test_no_such_standby"));
    let mut admin = db.admin();
    // Cancels the backend of this database waiting for the standby.
    let mut cancel = |what: &str| {
        let mut pid = None;
        eventually(what, WAIT, || {
            pid = admin
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND wait_event = 'SyncRep' \
                     LIMIT 1",
                    &[&db.name()],
                )
                .unwrap()
                .map(|row| row.get::<_, i32>(0));
            pid.is_some()
        });
        let cut: bool = admin
            .query_one("SELECT pg_cancel_backend($1)", &[&pid])
            .unwrap()
            .get(0);
        assert!(cut, "pg_cancel_backend found no backend {pid:?} ({what})");
    };
    let migrated = std::thread::scope(|s| {
        // A failure below unwinds this closure before the scope waits for
        // `migrating`, which waits for the standby: the wait is lifted on
        // the way, or the test would hang instead of failing.
        struct LiftOnPanic;
        impl Drop for LiftOnPanic {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    pg_cluster::set_standby_quietly(None);
                }
            }
        }
        let _lift_on_panic = LiftOnPanic;
        let migrating = s.spawn(|| PgStore::connect(&db.settings()).map(|_| ()));
        cancel("the migration's commit waiting for the standby");
        // The schema is on the primary; the migration still waits.
        eventually("the migrated schema on the primary", WAIT, || {
            db.client()
                .query_one("SELECT to_regclass('audit_leaves') IS NOT NULL", &[])
                .unwrap()
                .get::<_, bool>(0)
        });
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            !migrating.is_finished(),
            "the migration was answered while it was on the primary only: {:?}",
            migrating.join().unwrap().err()
        );
        cancel("the barrier's commit waiting for the standby");
        migrating.join().unwrap()
    });
    assert!(
        matches!(migrated, Err(StoreError::CommitUnknown(_))),
        "{migrated:?}"
    );
}
