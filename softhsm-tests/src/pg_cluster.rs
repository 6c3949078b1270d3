//! A PostgreSQL cluster of the tests' own, for the tests that stop and
//! restart their server: `<version> store_faults` on port 5439. The
//! shared cluster (`main`, which every other test uses at the same time)
//! is never touched. It stays online after the tests: `.ci/setup` and
//! `replicas_db_restart.rs` find the shared cluster by the tests' port
//! ([`crate::pg::port`], 5432 by default), not as the first or any online
//! cluster.
//!
//! [`ensure`] creates it on first use (`pg_createcluster`, as root or
//! through `sudo -n`; Debian's `postgresql` package, which `.ci/setup
//! --tests` installs, provides it), starts it if it is down, and creates
//! the tests' role in it, so CI needs nothing set up beforehand.

use std::process::{Command, Output};
use std::sync::OnceLock;

/// The cluster's name.
pub const NAME: &str = "store_faults";
/// The port it listens on.
pub const PORT: u16 = 5439;

/// The tests' own cluster, ready: see the module docs.
#[derive(Debug)]
pub struct OwnCluster {
    version: String,
}

/// `program` as root: itself when this process is root, else through
/// `sudo -n` (which fails rather than asks for a password).
pub fn privileged(program: &str) -> Command {
    if rustix::process::getuid().is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-n").arg(program);
        c
    }
}

pub(crate) fn run(mut command: Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (run .ci/setup --tests)"));
    assert!(out.status.success(), "{command:?}: {out:?}");
    out
}

/// `(version, name, status)` of every cluster.
pub(crate) fn clusters() -> Vec<(String, String, String)> {
    let out = run({
        let mut c = Command::new("pg_lsclusters");
        c.arg("-h");
        c
    });
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 4).then(|| (w[0].to_string(), w[1].to_string(), w[3].to_string()))
        })
        .collect()
}

/// The tests' own cluster, created, started and with the tests' role.
///
/// # Panics
/// When PostgreSQL is not installed or the cluster cannot be made: the
/// test fails naming the command.
pub fn ensure() -> &'static OwnCluster {
    static CLUSTER: OnceLock<OwnCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let all = clusters();
        let version = match all.iter().find(|(_, n, _)| n == NAME) {
            Some((v, _, _)) => v.clone(),
            None => {
                let (v, _, _) = all
                    .first()
                    .expect("no PostgreSQL cluster at all: run .ci/setup --tests")
                    .clone();
                let mut c = privileged("pg_createcluster");
                c.args([&v, NAME, "--port", &PORT.to_string()]);
                run(c);
                v
            }
        };
        let cluster = OwnCluster { version };
        cluster.ctl("start");
        superuser(&[
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'lavd_test') \
             THEN CREATE ROLE lavd_test LOGIN CREATEDB PASSWORD 'lavd_test'; END IF; END $$;",
        ]);
        // A test killed while the cluster waited for a standby
        // (`replicas_sync_standby.rs`) must not leave every commit
        // waiting.
        wait_for_standby(None);
        cluster
    })
}

/// Makes every commit on the cluster wait for the synchronous standby
/// `name` (`synchronous_standby_names`), or for none, and returns once
/// commits do.
///
/// `pg_reload_conf()` only signals the server: the postmaster rereads the
/// file and signals its backends and the checkpointer, and a COMMIT waits
/// for a standby only once the checkpointer has set the shared flag that
/// says standbys are named. Until then a commit may or may not wait. So
/// this makes commits ([`commit_waits`]) until one behaves as wanted.
/// Without that, a test's COMMIT could commit without waiting, and lavd's
/// check of its fate then wait for a standby that never comes: the
/// clean-clone CI at `76eda41` hung so until its 90-minute limit.
///
/// # Panics
/// When a command fails, or commits do not behave so within 20 s.
pub fn wait_for_standby(name: Option<&str>) {
    set_standby(name);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waits = commit_waits();
        if waits == name.is_some() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "commits still {} for a standby 20 s after synchronous_standby_names was set to {name:?}",
            if waits { "wait" } else { "do not wait" }
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether a commit on the cluster waits for a synchronous standby now:
/// one connection commits a catalog change (a temporary table: it writes
/// WAL), while another watches it in `pg_stat_activity`. Seen waiting
/// (`SyncRep`), it is cancelled, which ends the wait (the commit stays,
/// on the primary); ended by itself, it did not wait.
///
/// # Panics
/// When the cluster cannot be reached, or the commit neither ends nor is
/// seen waiting within 10 s.
fn commit_waits() -> bool {
    let mut watcher = crate::pg::admin(PORT);
    let mut probe = crate::pg::admin(PORT);
    let pid: i32 = probe
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("probe pid")
        .get(0);
    std::thread::scope(|s| {
        let commit = s.spawn(move || {
            probe
                .batch_execute("CREATE TEMP TABLE lavd_sync_probe (x int)")
                .expect("probe commit")
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if commit.is_finished() {
                commit.join().expect("probe thread");
                return false;
            }
            let waiting: bool = watcher
                .query_one(
                    "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep'",
                    &[&pid],
                )
                .expect("pg_stat_activity")
                .get(0);
            if waiting || std::time::Instant::now() >= deadline {
                watcher
                    .query_one("SELECT pg_cancel_backend($1)", &[&pid])
                    .expect("cancel the probe");
                assert!(
                    waiting,
                    "the probe commit neither ended nor waited within 10 s"
                );
                commit.join().expect("probe thread");
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    })
}

/// Sets `synchronous_standby_names` to `name` (or resets it) and signals
/// the server, without waiting for it to apply: see [`wait_for_standby`].
///
/// # Panics
/// When a command fails.
pub fn set_standby(name: Option<&str>) {
    superuser(&[&standby_statement(name), "SELECT pg_reload_conf()"]);
}

/// [`set_standby`] for a drop during a panic: never panics.
pub fn set_standby_quietly(name: Option<&str>) {
    let _ = superuser_command(&[
        "-c",
        &standby_statement(name),
        "-c",
        "SELECT pg_reload_conf()",
    ])
    .output();
}

fn standby_statement(name: Option<&str>) -> String {
    match name {
        Some(name) => format!("ALTER SYSTEM SET synchronous_standby_names = '{name}'"),
        None => "ALTER SYSTEM RESET synchronous_standby_names".to_string(),
    }
}

/// `psql` on the cluster's `postgres` database as its superuser, with
/// `args` after the connection's.
fn superuser_command(args: &[&str]) -> Command {
    let mut c = privileged("runuser");
    c.args([
        "-u",
        "postgres",
        "--",
        "psql",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
    ])
    .args(["-p", &PORT.to_string(), "-d", "postgres"])
    .args(args);
    c
}

/// Runs `statements` on the cluster's `postgres` database as its superuser
/// (`psql`, one `-c` each, so each is its own transaction: `ALTER SYSTEM`
/// may not run inside one).
///
/// # Panics
/// When one fails: the test fails naming the command.
pub fn superuser(statements: &[&str]) {
    let mut c = superuser_command(&[]);
    for statement in statements {
        c.args(["-c", statement]);
    }
    run(c);
}

impl OwnCluster {
    /// `pg_ctlcluster <version> store_faults <action>` (`start`, `stop`,
    /// `restart`; stops are `-m fast`: sessions are cut, as in a crash of
    /// the server's clients' view). Starting a running cluster is a no-op.
    ///
    /// # Panics
    /// When the command fails.
    pub fn ctl(&self, action: &str) {
        if action == "start"
            && clusters()
                .iter()
                .any(|(_, n, s)| n == NAME && s.starts_with("online"))
        {
            return;
        }
        let mut c = privileged("pg_ctlcluster");
        c.args([&self.version, NAME, action]);
        if action != "start" {
            c.args(["-m", "fast"]);
        }
        run(c);
    }
}

/// Starts the cluster again when dropped: a test that fails while the
/// server is down leaves it running for the next.
#[derive(Debug)]
pub struct StartOnDrop(pub &'static OwnCluster);

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        let mut c = privileged("pg_ctlcluster");
        c.args([&self.0.version, NAME, "start"]);
        let _ = c.output();
    }
}
