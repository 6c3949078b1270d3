//! A primary and its synchronous streaming standby, clusters of the tests'
//! own (`lavd_failover_a` on port 5441, `lavd_failover_b` on 5442), for
//! the test that fails the database over under load
//! (`replicas_db_failover.rs`). Made from nothing on each use
//! (`pg_createcluster`, `pg_basebackup`, as root or through `sudo -n`) and
//! dropped afterwards: a promoted standby cannot be made a standby again
//! cheaply. The shared cluster (`main`) is never touched.
//!
//! The pair is PostgreSQL's own: physical streaming replication,
//! `synchronous_standby_names = '*'` on the primary (set after the base
//! backup, so that the standby, once promoted, waits for no standby of its
//! own), and `pg_ctlcluster … promote`.
//!
//! A test process killed before the pair is dropped (the binary's time
//! limit) leaves both clusters running; the next [`Pair::create`] drops
//! them first.

use std::time::{Duration, Instant};

use crate::pg_cluster::{clusters, privileged, run};

/// The primary's cluster name and port.
pub const PRIMARY: (&str, u16) = ("lavd_failover_a", 5441);
/// The standby's cluster name and port.
pub const STANDBY: (&str, u16) = ("lavd_failover_b", 5442);

/// The pair: see the module docs. Dropping it drops both clusters.
#[derive(Debug)]
pub struct Pair {
    version: String,
}

fn psql(port: u16, sql: &str) -> String {
    let mut c = privileged("runuser");
    c.args(["-u", "postgres", "--", "psql", "-q", "-X", "-tA"])
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-p",
            &port.to_string(),
            "-d",
            "postgres",
        ])
        .args(["-c", sql]);
    String::from_utf8_lossy(&run(c).stdout).trim().to_string()
}

fn drop_quietly(version: &str, name: &str) {
    let mut c = privileged("pg_dropcluster");
    c.args(["--stop", version, name]);
    let _ = c.output();
}

fn wait(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The data directory of cluster `name` (`pg_lsclusters`).
fn clusters_data(name: &str) -> String {
    let mut c = std::process::Command::new("pg_lsclusters");
    c.arg("-h");
    let out = run(c);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() >= 6 && w[1] == name)
        .map(|w| w[5].to_string())
        .unwrap_or_else(|| panic!("no data directory listed for {name}"))
}

impl Pair {
    /// Drops any pair a previous run left, makes the primary (with the
    /// tests' role), a standby from its base backup, and makes the primary
    /// wait for the standby at each commit. Returns once the standby
    /// streams as the synchronous one.
    ///
    /// # Panics
    /// When PostgreSQL is not installed or a command fails.
    pub fn create() -> Self {
        let (version, _, _) = clusters()
            .first()
            .expect("no PostgreSQL cluster at all: run .ci/setup --tests")
            .clone();
        for (name, _) in [STANDBY, PRIMARY] {
            drop_quietly(&version, name);
        }
        let pair = Pair { version };
        let create = |(name, port): (&str, u16), start: bool| {
            let mut c = privileged("pg_createcluster");
            c.args([&pair.version, name, "--port", &port.to_string()]);
            if start {
                c.arg("--start");
            }
            run(c);
        };
        create(PRIMARY, true);
        psql(
            PRIMARY.1,
            &format!(
                "CREATE ROLE {} LOGIN CREATEDB PASSWORD '{}'",
                crate::pg::USER,
                crate::pg::password()
            ),
        );
        create(STANDBY, false);
        // The standby's data directory, as pg_createcluster made it, is
        // replaced by the base backup (this version's own tool, not
        // whichever Debian's wrapper would pick).
        let data = clusters_data(STANDBY.0);
        let mut c = privileged("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c"]).arg(format!(
            "cd / && rm -rf '{data}' && /usr/lib/postgresql/{}/bin/pg_basebackup \
             -h /var/run/postgresql -p {} -D '{data}' -R -X stream -c fast",
            pair.version, PRIMARY.1
        ));
        run(c);
        pair.ctl(STANDBY.0, &["start"]);
        wait("the standby streaming", Duration::from_secs(30), || {
            psql(
                PRIMARY.1,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            ) == "1"
        });
        psql(
            PRIMARY.1,
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        );
        psql(PRIMARY.1, "SELECT pg_reload_conf()");
        wait("the standby synchronous", Duration::from_secs(30), || {
            psql(
                PRIMARY.1,
                "SELECT string_agg(sync_state, ',') FROM pg_stat_replication",
            ) == "sync"
        });
        // The walsender has the new setting, so the postmaster has
        // signalled every process; a commit waits for the standby only once
        // the checkpointer has applied it too, which it does first on
        // waking for a checkpoint, before CHECKPOINT returns.
        psql(PRIMARY.1, "CHECKPOINT");
        pair
    }

    fn ctl(&self, name: &str, args: &[&str]) {
        let mut c = privileged("pg_ctlcluster");
        c.args([&self.version, name]).args(args);
        run(c);
    }

    /// Returns once the standby has replayed everything the primary has
    /// flushed so far (a synchronous standby has flushed each commit
    /// before it is acknowledged, but may not have applied it yet).
    pub fn wait_replayed(&self) {
        let flushed = psql(PRIMARY.1, "SELECT pg_current_wal_flush_lsn()");
        wait("the standby's replay", Duration::from_secs(30), || {
            psql(
                STANDBY.1,
                &format!("SELECT pg_last_wal_replay_lsn() >= '{flushed}'::pg_lsn"),
            ) == "t"
        });
    }

    /// Stops the primary as a crash would (`-m immediate`: no shutdown
    /// checkpoint, sessions cut).
    pub fn crash_primary(&self) {
        self.ctl(PRIMARY.0, &["stop", "-m", "immediate"]);
    }

    /// Promotes the standby, and returns once it takes writes.
    pub fn promote(&self) {
        self.ctl(STANDBY.0, &["promote"]);
        wait("the promoted standby", Duration::from_secs(30), || {
            psql(STANDBY.1, "SELECT pg_is_in_recovery()") == "f"
        });
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for (name, _) in [STANDBY, PRIMARY] {
            drop_quietly(&self.version, name);
        }
    }
}

/// A TCP forwarder standing for the load balancer in front of the
/// database: each new connection goes to the local port it names at that
/// moment ([`Forward::retarget`]); connections already made stay where they
/// are (they end with their server).
#[derive(Debug)]
pub struct Forward {
    port: u16,
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

impl Forward {
    /// Listens on a free local port, forwarding to local `target`.
    ///
    /// # Panics
    /// When it cannot listen.
    pub fn start(target: u16) -> Self {
        use std::sync::atomic::{AtomicU16, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("forward listen");
        let forward = Forward {
            port: listener.local_addr().expect("forward address").port(),
            target: std::sync::Arc::new(AtomicU16::new(target)),
        };
        let to = forward.target.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                // Refused (the server is down): the client's connection
                // ends unanswered, as behind a real balancer.
                let Ok(server) =
                    std::net::TcpStream::connect(("127.0.0.1", to.load(Ordering::SeqCst)))
                else {
                    continue;
                };
                for (mut from, mut into) in [(&client, &server), (&server, &client)]
                    .map(|(a, b)| (a.try_clone(), b.try_clone()))
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        forward
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends new connections to local `target` from now on.
    pub fn retarget(&self, target: u16) {
        self.target
            .store(target, std::sync::atomic::Ordering::SeqCst);
    }
}
