//! Store faults under load: agency threads unwrap all the time while the
//! store fails.
//! - SQLite: the store on a small file system (a 32 MiB tmpfs the test
//!   mounts, as root) that fills up; and the store's file system turned
//!   read-only under the running daemon (an ext4 image on a loop device,
//!   mounted `errors=remount-ro`, whose error the test triggers through
//!   `/sys/fs/ext4/<dev>/trigger_fs_error`: what the kernel does to a disk
//!   that fails under a database). That one cannot be undone while the
//!   files are open, so it is cleared as an operator would: stop the
//!   daemon, `e2fsck`, mount again, start it.
//! - PostgreSQL, on a cluster of the tests' own ([`softhsm_tests::pg_cluster`],
//!   never the shared one): the server stopped, then started; the server
//!   restarted; the database refusing new connections (`CONNECTION LIMIT
//!   0` and its open sessions terminated), then accepting them again. And,
//!   at the store's level, a COMMIT lost in a restart while another writer
//!   appends a leaf byte for byte the same as its first: not taken for
//!   committed.
//!
//! While the fault lasts:
//! - `/readyz` is 503 (SQLite: the store check wants 4 MiB free);
//! - every answer is a 200 or 503 `store_unavailable` (or
//!   `spent_not_released`: a spend that committed, or may have, before
//!   its checkpoint was saved), and every request
//!   sent and answered after the first `store_unavailable` and before the
//!   space returns is a 503: nothing is released;
//! - no answer is slower than the bound (15 s: PostgreSQL's `pool_wait_secs`
//!   plus `statement_timeout_secs`, 5 s each, plus slack for a loaded
//!   2-core machine; SQLite answers far below it).
//!
//! When the fault clears, `/readyz` is 200 again and unwraps succeed
//! without a restart; every 200's `ok` results are `opened` leaves, the
//! budget spent equals the `opened` leaves exactly, and the log verifies
//! with `lavd audit verify`. The `opened` leaves no answer carried are the
//! test's own probes', plus at most one request per agency thread whose
//! leaves committed but whose answer failed after: on PostgreSQL a commit
//! the server took just as the connection was cut (the client cannot know
//! it landed), on SQLite a commit whose signed checkpoint could then not be
//! saved for want of space. Those answer 503 and release nothing; their
//! leaves and spend stay in the log (THREAT_MODEL §5.7: the log may
//! over-report, never under-report).
//!
//! Mounting needs root (CI runs the tests as root); without it the test
//! fails saying so. The mount is undone by a guard, also when the test
//! fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use softhsm_tests::faults::{audit_accounting, limits, under_load, verify_log, Case, Figures};
use softhsm_tests::faults::{BATCH, HOLD, THREADS};
use softhsm_tests::pg::TestDb;
use softhsm_tests::pg_cluster::{self, StartOnDrop};
use softhsm_tests::server::Daemon;
use softhsm_tests::server::Pki;
use softhsm_tests::TestToken;

const BOUND: Duration = Duration::from_secs(15);
const CODE: &str = "store_unavailable";

/// The tests that stop or restart the own cluster take turns.
static OWN_CLUSTER: Mutex<()> = Mutex::new(());

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        assert!(
            rustix::process::getuid().is_root(),
            "this test mounts a tmpfs and must run as root (as CI does)"
        );
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the daemon may still hold files open when a test fails.
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Fills the file system holding `path` with a file until a write fails
/// for want of space; returns how many bytes it took.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    for size in [chunk.len(), 512] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    written
}

/// The fault tests' config, with the SQLite store at `db` (on the file
/// system the test makes fail), through the latency and fault module
/// `shim` (which logs each derive: [`Case::start_logging_derives`]).
fn write_config_with_store_at(t: &TestToken, db: &Path, shim: &softhsm_tests::Shim) {
    t.write_config_with_module(
        &softhsm_tests::shim_module_path(),
        &format!("{}\n{}", shim.hsm_env(), limits()),
    );
    let config = std::fs::read_to_string(t.config()).unwrap().replace(
        "path = \"lavd.db\"",
        &format!("path = {:?}", db.display().to_string()),
    );
    std::fs::write(t.config(), config).unwrap();
}

#[test]
fn sqlite_on_a_full_file_system_is_503_store_unavailable_and_recovers_when_space_returns() {
    let started = Instant::now();
    let t = TestToken::new();
    let mnt = t.path("small-fs");
    let _fs = Tmpfs::mount(&mnt, "32m");
    let db = mnt.join("lavd.db");
    let pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    write_config_with_store_at(&t, &db, &shim);
    let case = Case::start_logging_derives(&t, pki, "W-DISK-FULL", &shim);
    let filler = mnt.join("filler");
    let mut filled = 0;
    let (figures, opened, cut) = case.run(
        &t,
        "sqlite disk full",
        CODE,
        BOUND,
        true,
        |case| {
            filled = fill(&filler);
            case.daemon.wait_readyz(503);
            // Commits may still fit in space SQLite already holds (its WAL
            // is reused after a checkpoint): the fault is in force from the
            // first refusal, and from then on nothing is released.
            case.probe_until_refused(CODE)
        },
        || std::fs::remove_file(&filler).unwrap(),
        || {
            rusqlite::Connection::open(&db)
                .unwrap()
                .query_row(
                    "SELECT spent FROM warrants WHERE id = 'W-DISK-FULL'",
                    [],
                    |row| row.get(0),
                )
                .unwrap()
        },
    );
    figures.print(&format!(
        ", 1 fault injected, filler {} MiB, opened leaves {opened} (= spent), leaves committed, then 503 (checkpoint \
         not saved; not released) {cut}, log verified, {:.1} s",
        filled / (1024 * 1024),
        started.elapsed().as_secs_f64()
    ));
}

/// An ext4 file system in an image file on a loop device, mounted
/// `errors=remount-ro`; unmounted and detached on drop.
struct Ext4 {
    image: PathBuf,
    at: PathBuf,
    device: String,
}

impl Ext4 {
    fn mount(image: &Path, at: &Path) -> Self {
        assert!(
            rustix::process::getuid().is_root(),
            "this test mounts a loop device and must run as root (as CI does)"
        );
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("spawn");
            assert!(out.status.success(), "{cmd:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        std::fs::File::create(image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        run(Command::new("mkfs.ext4").arg("-q").arg(image));
        let device = run(Command::new("losetup").args(["-f", "--show"]).arg(image))
            .trim()
            .to_string();
        // A loop device reused from an earlier run may still be marked
        // read-only.
        run(Command::new("blockdev").args(["--setrw", &device]));
        std::fs::create_dir_all(at).unwrap();
        let fs = Ext4 {
            image: image.to_path_buf(),
            at: at.to_path_buf(),
            device,
        };
        fs.mount_again();
        fs
    }

    fn mount_again(&self) {
        let out = Command::new("mount")
            .args(["-o", "errors=remount-ro", &self.device])
            .arg(&self.at)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount {}: {out:?}", self.device);
    }

    /// The kernel's reaction to an I/O error under ext4 with
    /// `errors=remount-ro`: the file system turns read-only at once, open
    /// files included.
    ///
    /// The error is raised while the daemon `pid` is stopped (SIGSTOP, and
    /// every thread of it seen stopped), then it is continued: no fsync of
    /// its is in flight as ext4 aborts its journal, since one that is can
    /// return success for data the abort then drops (Linux 6.18; shown
    /// without lavd by `repro/ext4_fsync_race.py`, docs/RELIABILITY.md),
    /// and no program can log what its file system loses after
    /// acknowledging. Stopping flushes nothing: what lavd wrote and did
    /// not fsync is lost as on a real fault, and the fault still falls
    /// between any two of lavd's system calls.
    fn fail(&self, pid: u32) {
        let signal = |name: &str| {
            let out = Command::new("kill")
                .args([name, &pid.to_string()])
                .output()
                .expect("kill");
            assert!(out.status.success(), "kill {name} {pid}: {out:?}");
        };
        signal("-STOP");
        let started = Instant::now();
        while !all_stopped(pid) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "lavd {pid} did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let name = Path::new(&self.device).file_name().unwrap();
        let raised = std::fs::write(
            Path::new("/sys/fs/ext4")
                .join(name)
                .join("trigger_fs_error"),
            "lavd store_faults test",
        );
        signal("-CONT");
        raised.unwrap();
    }

    /// What an operator does once the disk is back: unmount, check, mount.
    fn repair(&self) {
        let out = Command::new("umount").arg(&self.at).output().unwrap();
        assert!(out.status.success(), "umount: {out:?}");
        let out = Command::new("e2fsck")
            .args(["-fy", &self.device])
            .output()
            .unwrap();
        // 0: clean, 1: errors corrected (the error the test triggered).
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "e2fsck {}: {out:?}",
            self.image.display()
        );
        self.mount_again();
    }
}

/// Whether every thread of process `pid` is stopped (state `T`, or `t`
/// under a tracer): none is inside a system call.
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) state …`: comm may hold spaces and parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "T" || state == "t")
        })
    })
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).output();
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

#[test]
fn sqlite_on_a_file_system_turned_read_only_is_503_store_unavailable_and_loses_nothing() {
    let started = Instant::now();
    let t = TestToken::new();
    let mnt = t.path("ro-fs");
    let fs = Ext4::mount(&t.path("ro-fs.img"), &mnt);
    let db = mnt.join("lavd.db");
    let pki = Pki::new(&t);
    let shim = softhsm_tests::Shim::new(&t);
    write_config_with_store_at(&t, &db, &shim);
    let case = Case::start_logging_derives(&t, pki, "W-READ-ONLY", &shim);
    let body = case.request.to_string();
    let (answers, (on, probes_opened)) =
        under_load(std::slice::from_ref(&case.agency), &body, THREADS, || {
            std::thread::sleep(Duration::from_millis(700));
            fs.fail(case.daemon.pid());
            let probes_opened = case.probe_until_refused(CODE);
            let on = Instant::now();
            case.daemon.wait_readyz(503);
            std::thread::sleep(HOLD);
            (on, probes_opened)
        });
    let off = Instant::now();
    let figures = Figures::new("sqlite read-only", &answers, on, off);
    figures.assert_only_ok_or_refused(CODE, BOUND);
    let inside: Vec<_> = answers.iter().filter(|a| a.sent >= on).collect();
    assert!(!inside.is_empty(), "no request was sent while read-only");
    assert!(
        inside.iter().all(|a| a.status == 503 && a.code == CODE),
        "answered other than 503 {CODE} while the store was read-only: {:?}",
        inside.iter().find(|a| a.status != 503)
    );

    // The operator's repair: stop, check, mount, start.
    let Case {
        pki,
        parties,
        daemon,
        request,
        id,
        derives,
        ..
    } = case;
    drop(daemon);
    fs.repair();
    let daemon = Daemon::start(&t);
    daemon.wait_readyz(200);
    let c = parties.clients(&pki, daemon.api);
    let r = softhsm_tests::vault::post(&c.agency, "/v1/unwrap", &request);
    assert_eq!(r.status, 200, "{}", r.text());
    // Every 200 before the fault has its leaves in the log; the budget is
    // exactly the opened leaves (the probes', the answers', the one just
    // sent, and at most one request per thread committed as the disk
    // failed).
    let (opened, not_carried) = audit_accounting(&c.auditor, &id, &answers);
    let spent: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT spent FROM warrants WHERE id = 'W-READ-ONLY'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(spent, opened as i64, "budget");
    let after = BATCH; // the request sent after the repair
    assert!(
        not_carried >= probes_opened + after
            && not_carried <= probes_opened + after + THREADS * BATCH,
        "{not_carried} opened leaves without an answer before the repair, {probes_opened} from probes"
    );
    // Every HSM open has its leaf: those whose commit failed as the disk
    // turned read-only were logged from their open intents by the restart.
    softhsm_tests::faults::assert_opens_logged(
        "sqlite read-only",
        &c.auditor,
        &id,
        &derives.expect("started logging derives"),
    );
    verify_log(&t, &pki, &parties.auditor, daemon.api);
    figures.print(&format!(
        ", 1 fault injected (ext4 error, remount-ro), opened leaves {opened} (= spent), leaves \
         committed, then 503 {}, repaired (e2fsck) and restarted, log verified, {:.1} s",
        not_carried - probes_opened - after,
        started.elapsed().as_secs_f64()
    ));
}

/// A daemon on a fresh database of the own cluster.
fn pg_case(id: &str) -> (TestToken, TestDb, Case) {
    let cluster = pg_cluster::ensure();
    cluster.ctl("start");
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let db = TestDb::create_on(pg_cluster::PORT);
    db.write_token_config(&t, &limits());
    let case = Case::start(&t, pki, id);
    (t, db, case)
}

fn pg_spent(db: &TestDb, id: &str) -> i64 {
    db.client()
        .query_one("SELECT spent FROM warrants WHERE id = $1", &[&id])
        .unwrap()
        .get(0)
}

fn pg_print(figures: &Figures, opened: usize, cut: usize, started: Instant) {
    figures.print(&format!(
        ", 1 fault injected, opened leaves {opened} (= spent), leaves committed, then 503 (connection cut or checkpoint not saved; not \
         released) {cut}, log verified, {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// A fault of the own cluster's server under load: `inject` acts on the
/// cluster (and returns what the test's probes opened), `clear` undoes it.
fn own_cluster_fault(
    name: &str,
    id: &str,
    with_inside: bool,
    inject: impl FnOnce(&pg_cluster::OwnCluster, &Case) -> usize,
    clear: impl FnOnce(&pg_cluster::OwnCluster),
) {
    let _turn = OWN_CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let cluster = pg_cluster::ensure();
    let _start = StartOnDrop(cluster);
    let (t, db, case) = pg_case(id);
    let (figures, opened, cut) = case.run(
        &t,
        name,
        CODE,
        BOUND,
        with_inside,
        |case| inject(cluster, case),
        || clear(cluster),
        || pg_spent(&db, id),
    );
    pg_print(&figures, opened, cut, started);
}

#[test]
fn postgres_stopped_under_load_is_503_store_unavailable_and_recovers_when_started() {
    own_cluster_fault(
        "postgres stopped",
        "W-PG-STOP",
        true,
        |cluster, case| {
            cluster.ctl("stop");
            case.probe_until_refused(CODE)
        },
        |cluster| cluster.ctl("start"),
    );
}

#[test]
fn postgres_restarted_under_load_answers_only_200_or_503_store_unavailable_and_recovers() {
    own_cluster_fault(
        "postgres restarted",
        "W-PG-RESTART",
        false,
        |cluster, _| {
            cluster.ctl("restart");
            0
        },
        |_| {},
    );
}

#[test]
fn postgres_refusing_new_connections_is_503_store_unavailable_and_recovers() {
    let _turn = OWN_CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let (t, db, case) = pg_case("W-PG-REFUSE");
    let name = db.name().to_string();
    let (figures, opened, cut) = case.run(
        &t,
        "postgres refusing connections",
        CODE,
        BOUND,
        true,
        |case| {
            // New connections refused (the role is no superuser), and the
            // open ones cut, so lavd must connect again.
            let mut admin = db.admin();
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {name} CONNECTION LIMIT 0; \
                     SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{name}' AND pid <> pg_backend_pid();"
                ))
                .unwrap();
            case.probe_until_refused(CODE)
        },
        || {
            db.admin()
                .batch_execute(&format!("ALTER DATABASE {name} CONNECTION LIMIT -1"))
                .unwrap()
        },
        || pg_spent(&db, "W-PG-REFUSE"),
    );
    pg_print(&figures, opened, cut, started);
}

/// No HSM open goes unlogged, even when the request's own audit commit
/// fails after the HSM opened: another session holds the log's head row,
/// so the append waits out its lock timeout and fails (503
/// `store_unavailable`, nothing released, nothing spent). While its leaves
/// wait, `/readyz` says the log is not ready and a second request is
/// refused before anything is opened. Once the lock is let go, the daemon
/// writes the first request's leaves itself, denied `audit_commit_failed`,
/// with no spend, and serves again.
#[test]
fn postgres_an_append_that_fails_after_the_hsm_opened_is_logged_once_the_store_takes_it() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let db = TestDb::create();
    db.write_token_config(&t, &limits());
    let id = "W-PG-HELD";
    let case = Case::start(&t, pki, id);
    // Once through: the warrant is registered, BATCH units spent.
    let r = softhsm_tests::vault::post(&case.agency, "/v1/unwrap", &case.request);
    assert_eq!(r.status, 200, "{}", r.text());
    let reason_count = |reason: &str| {
        let size = softhsm_tests::vault::tree_size(&case.auditor);
        softhsm_tests::vault::entries(&case.auditor, 0, size)
            .iter()
            .filter(|e| e.leaf["warrant_id"] == id && e.leaf["reason"] == reason)
            .count()
    };

    let mut holder = db.client();
    let mut held = holder.transaction().unwrap();
    held.query_one("SELECT size FROM audit_head WHERE id = 1 FOR UPDATE", &[])
        .unwrap();
    let started = Instant::now();
    let r = softhsm_tests::vault::post(&case.agency, "/v1/unwrap", &case.request);
    r.assert_error(503, CODE);
    assert!(started.elapsed() < BOUND, "{:?}", started.elapsed());
    assert_eq!(
        reason_count("audit_commit_failed"),
        0,
        "written while the head is held"
    );
    let ready = case.daemon.admin_get("/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["log"], false, "{}", ready.text());
    // Refused before its opens: its leaves would be queued too otherwise.
    softhsm_tests::vault::post(&case.agency, "/v1/unwrap", &case.request).assert_error(503, CODE);
    held.rollback().unwrap();

    let logged =
        softhsm_tests::faults::wait_until(BOUND, || reason_count("audit_commit_failed") == BATCH);
    assert!(
        logged,
        "{} of the {BATCH} opens of the failed request logged",
        reason_count("audit_commit_failed")
    );
    assert_eq!(
        pg_spent(&db, id),
        BATCH as i64,
        "the failed request spent nothing"
    );
    // Logged once, not again; the second request opened nothing.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reason_count("audit_commit_failed"), BATCH);
    case.daemon.wait_readyz(200);
    let r = softhsm_tests::vault::post(&case.agency, "/v1/unwrap", &case.request);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(pg_spent(&db, id), 2 * BATCH as i64);
    verify_log(&t, &case.pki, &case.parties.auditor, case.daemon.api);
    // The writer of those leaves ends at the stop, and with it its handle
    // on the HSM: the process exits without an HSM call left running.
    stops_cleanly(case.daemon);
}

/// SIGTERM: exit 0, with no panic and no HSM call left running at exit.
fn stops_cleanly(mut daemon: Daemon) {
    daemon.signal(rustix::process::Signal::TERM);
    let status = daemon.wait_exit(Duration::from_secs(20));
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("still running at exit"),
        "{stderr}"
    );
}

/// A daemon on PostgreSQL stops cleanly: SIGTERM, exit 0, nothing panics
/// as its store's connections close.
#[test]
fn postgres_a_daemon_stops_with_exit_0() {
    let t = TestToken::new();
    let pki = Pki::new(&t);
    let db = TestDb::create();
    db.write_token_config(&t, &limits());
    let case = Case::start(&t, pki, "W-PG-STOP-0");
    let r = softhsm_tests::vault::post(&case.agency, "/v1/unwrap", &case.request);
    assert_eq!(r.status, 200, "{}", r.text());
    stops_cleanly(case.daemon);
}

/// A COMMIT lost in a restart (the server went down with it in flight and
/// rolled it back) is not taken for committed when another writer's first
/// leaf after the restart, at the same index, is byte for byte the group's
/// first (the same refusal, in the same second): after a restart the
/// group's own mark is asked (migration 7), not its first leaf's bytes.
/// Before, the append was answered written, and its second leaf was never
/// stored: an unwrap's leaves behind such a refusal would have been
/// released unlogged.
#[test]
fn postgres_a_commit_lost_in_a_restart_is_not_taken_for_another_writers_identical_leaf() {
    use lavd::audit::leaf::{Event, WarrantRefused};
    use lavd::store::{AuditAppend, AuditStore as _, PgStore, Spend, StoreError};
    let _turn = OWN_CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let cluster = pg_cluster::ensure();
    let _start = StartOnDrop(cluster);
    cluster.ctl("start");
    let db = TestDb::create_on(pg_cluster::PORT);
    let refusal = |code: &'static str| -> Event {
        WarrantRefused::new("spiffe://agency.example/lea", Some("W-SAME"), None, code)
            .unwrap()
            .into()
    };
    let batch = |codes: &[&'static str]| AuditAppend {
        events: codes.iter().map(|code| refusal(code)).collect(),
        time: time::OffsetDateTime::now_utc(),
        spend: Spend::None,
    };
    let first = PgStore::connect(&db.settings()).unwrap();
    let mine = batch(&["warrant_expired", "bad_signature"]);
    let time = mine.time;
    let mut other = None;
    let appended = first.append_with(mine, &mut |_| {
        cluster.ctl("restart");
        let store = PgStore::connect(&db.settings()).unwrap();
        store
            .append(AuditAppend {
                time,
                ..batch(&["warrant_expired"])
            })
            .unwrap();
        other = Some(store);
    });
    let other = other.expect("the hook ran");
    assert!(
        matches!(&appended, Err(e) if !matches!(e, StoreError::CommitUnknown(_))),
        "a commit the restart rolled back was answered {appended:?}"
    );
    assert_eq!(other.tree_size().unwrap(), 1);
    // The store goes on.
    let again = first.append(batch(&["bad_signature"])).unwrap();
    assert_eq!(again.first_index, 1);
}
