//! A real PostgreSQL server for the tests: one fresh database per test,
//! dropped when the [`TestDb`] is dropped.
//!
//! `.ci/setup --tests` installs and starts PostgreSQL and creates the login
//! role `lavd_test` (password `lavd_test`, `CREATEDB`). The server is found
//! at `LAVD_TEST_PG_HOST`:`LAVD_TEST_PG_PORT` (default 127.0.0.1:5432) and
//! the password can be overridden with `LAVD_TEST_PG_PASSWORD`. A server
//! that cannot be reached fails the test with that message: these tests
//! never skip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lavd::store::PgSettings;

/// The tests' login role.
pub const USER: &str = "lavd_test";

fn host() -> String {
    std::env::var("LAVD_TEST_PG_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

/// The port of the shared server the tests use (`LAVD_TEST_PG_PORT`,
/// default 5432); `.ci/setup` starts the cluster on the same one.
pub fn port() -> u16 {
    std::env::var("LAVD_TEST_PG_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

/// The test role's password (a fixed secret of a local test role).
pub fn password() -> String {
    std::env::var("LAVD_TEST_PG_PASSWORD").unwrap_or_else(|_| "lavd_test".into())
}

pub(crate) fn admin(port: u16) -> postgres::Client {
    let mut config = postgres::Config::new();
    config
        .host(&host())
        .port(port)
        .user(USER)
        .password(password())
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    config.connect(postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {}:{port} as {USER} ({e}); run .ci/setup --tests, \
             which installs and starts it and creates the role",
            host(),
        )
    })
}

/// One database, created empty, dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    port: u16,
}

impl TestDb {
    /// Creates a fresh database.
    ///
    /// # Panics
    /// When the server is unreachable or refuses: the test fails.
    pub fn create() -> Self {
        Self::create_on(port())
    }

    /// Creates a fresh database on the local server listening on `port`
    /// (another cluster than the shared one, e.g. [`crate::pg_cluster`]'s).
    ///
    /// # Panics
    /// When the server is unreachable or refuses: the test fails.
    pub fn create_on(port: u16) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "lavd_t_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin(port)
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        Self { name, port }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its `[store] url` (plain TCP to the local server).
    pub fn url(&self) -> String {
        format!(
            "postgresql://{USER}@{}:{}/{}?sslmode=disable",
            host(),
            self.port,
            self.name
        )
    }

    /// Store settings for it, with the given reservation lease.
    pub fn settings_with_lease(&self, lease: Duration) -> PgSettings {
        PgSettings {
            url: self.url(),
            password: Some(password().into()),
            ca_file: None,
            pool_size: 8,
            pool_wait: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            reservation_lease: lease,
        }
    }

    /// Store settings for it, with the default lease (300 s).
    pub fn settings(&self) -> PgSettings {
        self.settings_with_lease(Duration::from_secs(300))
    }

    /// [`Self::settings`], connecting through a proxy on local `port`
    /// (e.g. [`CutAtCommit`]) instead of to the server itself.
    pub fn settings_via(&self, port: u16) -> PgSettings {
        let mut settings = self.settings();
        settings.url = format!(
            "postgresql://{USER}@127.0.0.1:{port}/{}?sslmode=disable",
            self.name
        );
        settings
    }

    /// A client of the server's `postgres` database (not this one), for
    /// tests that act on this database from outside: limit or cut its
    /// connections.
    pub fn admin(&self) -> postgres::Client {
        admin(self.port)
    }

    /// A client connected to it, for tests that look under the store.
    pub fn client(&self) -> postgres::Client {
        let mut config = postgres::Config::new();
        config
            .host(&host())
            .port(self.port)
            .user(USER)
            .password(password())
            .dbname(&self.name);
        config
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }

    /// The number of rows in `table`.
    pub fn rows(&self, table: &str) -> i64 {
        self.client()
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .unwrap_or_else(|e| panic!("count {table}: {e}"))
            .get(0)
    }

    /// Makes SERIALIZABLE the default isolation of new connections to it.
    pub fn default_serializable(&self) {
        self.set_default("default_transaction_isolation", "serializable");
    }

    /// Sets the database's default of `setting` for new connections
    /// (`ALTER DATABASE … SET`).
    pub fn set_default(&self, setting: &str, value: &str) {
        self.client()
            .batch_execute(&format!(
                "ALTER DATABASE {} SET {setting} = '{value}'",
                self.name
            ))
            .unwrap_or_else(|e| panic!("alter {} set {setting}: {e}", self.name));
    }

    /// The `[store]` table for a lavd config file, with the password in
    /// `password_file`.
    pub fn store_toml(&self, password_file: &std::path::Path) -> String {
        format!(
            "[store]\nurl = \"{}\"\npassword_file = \"{}\"\n",
            self.url(),
            password_file.display()
        )
    }
}

impl TestDb {
    /// Writes `token`'s `lavd.toml` with this database as its store (the
    /// password in `dbpass`, mode 600), 4 HSM sessions, and `extra`
    /// appended: every `lavd` the token runs, and every replica, then
    /// shares it.
    pub fn write_token_config(&self, token: &crate::TestToken, extra: &str) {
        self.write_token_config_hsm(token, &crate::module_path(), "sessions = 4\n", extra);
    }

    /// As [`Self::write_token_config`], loading `module` with `hsm` (lines
    /// such as `sessions = 2`, which it must give) in `[hsm]`.
    pub fn write_token_config_hsm(
        &self,
        token: &crate::TestToken,
        module: &std::path::Path,
        hsm: &str,
        extra: &str,
    ) {
        self.write_token_config_at(token, module, hsm, &self.url(), extra);
    }

    /// [`Self::write_token_config`], connecting through a proxy on local
    /// `port` (e.g. [`CutAtCommit`]) instead of to the server itself.
    pub fn write_token_config_via(&self, token: &crate::TestToken, port: u16, extra: &str) {
        let url = self.settings_via(port).url;
        self.write_token_config_at(token, &crate::module_path(), "sessions = 4\n", &url, extra);
    }

    fn write_token_config_at(
        &self,
        token: &crate::TestToken,
        module: &std::path::Path,
        hsm: &str,
        url: &str,
        extra: &str,
    ) {
        let pass = token.path("dbpass");
        std::fs::write(&pass, format!("{}\n", password())).expect("dbpass");
        crate::restrict(&pass);
        let text = format!(
            "[hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = \"pin\"\n{hsm}\n\
             [store]\nurl = \"{}\"\npassword_file = \"dbpass\"\npool_size = 8\n{extra}",
            module.display().to_string(),
            token.label,
            url
        );
        std::fs::write(token.config(), text).expect("lavd.toml");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Not `admin()`: a drop must not panic (it may run during a panic).
        let mut config = postgres::Config::new();
        config
            .host(&host())
            .port(self.port)
            .user(USER)
            .password(password())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        if let Ok(mut client) = config.connect(postgres::NoTls) {
            // Bounded, and not waiting for a synchronous standby that a
            // failed test may have left named (`replicas_sync_standby.rs`).
            // Each its own query: DROP DATABASE may not share one.
            let _ = client.batch_execute("SET synchronous_commit = local");
            let _ = client.batch_execute("SET statement_timeout = '60s'");
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A TCP proxy to the local server on `port` that, once armed, cuts the
/// client's connection just after forwarding a COMMIT: the simple-query
/// message `Q` "COMMIT" (PostgreSQL protocol 3, "Simple Query"). The server
/// has the COMMIT in its socket buffer and runs it; the client never hears
/// the answer. The one way to make a COMMIT whose outcome the client
/// cannot know, on demand. Plain TCP only (`sslmode=disable`).
#[derive(Debug)]
pub struct CutAtCommit {
    port: u16,
    /// 0: forward everything; [`Self::AFTER`]: cut the next COMMIT after
    /// forwarding it; [`Self::BEFORE`]: cut it without forwarding it.
    armed: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// The bytes of a client message that [`Self::armed`] waits for:
    /// [`Self::COMMIT`] unless [`Self::arm_after_sending`] said otherwise.
    trigger: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// When set, only a connection that has sent a message holding these
    /// bytes before its trigger is cut ([`Self::arm_after`]).
    after: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    /// Set by a cut armed with `dark` ([`Self::arm_after`]): every
    /// connection is cut at its next message and new ones are closed at
    /// once, until [`Self::light`].
    dark: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Whether the next cut sets [`Self::dark`].
    darken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: std::sync::Arc<AtomicU64>,
}

/// What [`CutAtCommit`]'s connections share with it.
#[derive(Debug, Clone)]
struct Shared {
    armed: std::sync::Arc<std::sync::atomic::AtomicU8>,
    trigger: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    after: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    dark: std::sync::Arc<std::sync::atomic::AtomicBool>,
    darken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: std::sync::Arc<AtomicU64>,
}

impl CutAtCommit {
    /// The message of a simple-query COMMIT: `Q`, its length (4 + 7), the
    /// text with its terminating zero.
    const COMMIT: &'static [u8] = b"Q\x00\x00\x00\x0bCOMMIT\x00";
    const AFTER: u8 = 1;
    const BEFORE: u8 = 2;
    /// Forward the trigger, then answer the client in the server's stead
    /// with a PANIC and close ([`Self::arm_panic_after_sending`]).
    const PANIC: u8 = 3;

    /// Listens on a free local port and forwards each connection to the
    /// server on `port`.
    ///
    /// # Panics
    /// When it cannot listen: the test fails.
    pub fn start(port: u16) -> Self {
        use std::sync::atomic::AtomicU8;
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let proxy = CutAtCommit {
            port: listener.local_addr().expect("proxy address").port(),
            armed: Arc::new(AtomicU8::new(0)),
            trigger: Arc::new(std::sync::Mutex::new(Self::COMMIT.to_vec())),
            after: Arc::new(std::sync::Mutex::new(None)),
            dark: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            darken: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            cuts: Arc::new(AtomicU64::new(0)),
        };
        let shared = Shared {
            armed: proxy.armed.clone(),
            trigger: proxy.trigger.clone(),
            after: proxy.after.clone(),
            dark: proxy.dark.clone(),
            darken: proxy.darken.clone(),
            cuts: proxy.cuts.clone(),
        };
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if shared.dark.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                let shared = shared.clone();
                std::thread::spawn(move || Self::forward(client, server, &shared));
            }
        });
        proxy
    }

    fn forward(mut client: std::net::TcpStream, mut server: std::net::TcpStream, shared: &Shared) {
        let Shared {
            armed,
            trigger,
            after,
            dark,
            darken,
            cuts,
        } = shared;
        use std::io::{Read as _, Write as _};
        let (Ok(mut from_server), Ok(mut to_client)) = (server.try_clone(), client.try_clone())
        else {
            return;
        };
        // Set before a trigger armed with PANIC is forwarded: the server's
        // answers to it are then dropped, and the client hears the forged
        // one only.
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held_here = held.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 64 * 1024];
            loop {
                let n = match from_server.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if held_here.load(Ordering::SeqCst) {
                    continue;
                }
                if to_client.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
            if !held_here.load(Ordering::SeqCst) {
                let _ = to_client.shutdown(std::net::Shutdown::Both);
            }
        });
        let mut buf = [0u8; 64 * 1024];
        // Whether this connection has sent the bytes `after` waits for.
        let mut primed = false;
        loop {
            let n = match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if dark.load(Ordering::SeqCst) {
                let _ = client.shutdown(std::net::Shutdown::Both);
                break;
            }
            let holds = |text: &[u8]| buf[..n].windows(text.len()).any(|w| w == text);
            if let Some(after) = after
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_deref()
            {
                primed |= holds(after);
            }
            let commit = {
                let trigger = trigger
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let waits = after
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some();
                (primed || !waits) && holds(&trigger)
            };
            let mode = if commit {
                armed.swap(0, Ordering::SeqCst)
            } else {
                0
            };
            if mode == Self::PANIC {
                held.store(true, Ordering::SeqCst);
            }
            if mode != Self::BEFORE && server.write_all(&buf[..n]).is_err() {
                break;
            }
            if mode == Self::PANIC {
                // Counted before the client can hear its answer.
                cuts.fetch_add(1, Ordering::SeqCst);
                // An ErrorResponse (PostgreSQL protocol 3): severity PANIC,
                // SQLSTATE XX000, as a backend that crashed answering.
                let mut fields = Vec::new();
                for (tag, value) in [
                    (b'S', "PANIC"),
                    (b'V', "PANIC"),
                    (b'C', "XX000"),
                    (b'M', "forged by the test proxy: the server crashed"),
                ] {
                    fields.push(tag);
                    fields.extend_from_slice(value.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut message = vec![b'E'];
                message.extend_from_slice(&(4 + fields.len() as u32).to_be_bytes());
                message.extend_from_slice(&fields);
                let _ = client.write_all(&message);
                let _ = client.flush();
                // The client reads it before the connection ends (a write
                // of its refused by a socket already shut would end its
                // connection first, the answer unread).
                std::thread::sleep(Duration::from_millis(300));
            }
            if mode != 0 {
                if darken.swap(false, Ordering::SeqCst) {
                    dark.store(true, Ordering::SeqCst);
                }
                if mode != Self::PANIC {
                    cuts.fetch_add(1, Ordering::SeqCst);
                }
                // The client hears nothing more. After: the server still
                // reads the COMMIT before it sees the connection end.
                // Before: it never gets it, and rolls back.
                let _ = client.shutdown(std::net::Shutdown::Both);
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
        }
        let _ = server.shutdown(std::net::Shutdown::Both);
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the connection of the next COMMIT just after forwarding it.
    pub fn arm(&self) {
        self.set_trigger(Self::COMMIT);
        self.armed.store(Self::AFTER, Ordering::SeqCst);
    }

    /// Cuts the connection of the next COMMIT instead of forwarding it.
    pub fn arm_dropping(&self) {
        self.set_trigger(Self::COMMIT);
        self.armed.store(Self::BEFORE, Ordering::SeqCst);
    }

    /// Cuts the connection of the next client message holding `text` (a
    /// statement of the extended protocol, which the server runs and, in
    /// autocommit, commits) just after forwarding it.
    pub fn arm_after_sending(&self, text: &[u8]) {
        self.set_trigger(text);
        self.armed.store(Self::AFTER, Ordering::SeqCst);
    }

    /// Forwards the next client message holding `text` (which the server
    /// runs and, in autocommit, commits), then answers it in the server's
    /// stead with an error of severity PANIC (SQLSTATE XX000) and cuts the
    /// connection: what a client hears from a backend that crashed as it
    /// answered, while the server's own answer is dropped.
    pub fn arm_panic_after_sending(&self, text: &[u8]) {
        self.set_trigger(text);
        self.armed.store(Self::PANIC, Ordering::SeqCst);
    }

    /// Cuts the connection of the next COMMIT, just after forwarding it,
    /// of a connection that has sent a message holding `text` before it
    /// (a statement with that parameter: one transaction's COMMIT among
    /// others). With `dark`, every connection is then cut at its next
    /// message and new ones are closed at once, until [`Self::light`]:
    /// nobody can ask the server what became of the COMMIT.
    pub fn arm_after(&self, text: &[u8], dark: bool) {
        self.set_trigger(Self::COMMIT);
        *self
            .after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(text.to_vec());
        self.darken.store(dark, Ordering::SeqCst);
        self.armed.store(Self::AFTER, Ordering::SeqCst);
    }

    /// Forwards connections again after a dark cut ([`Self::arm_after`]).
    pub fn light(&self) {
        self.dark.store(false, Ordering::SeqCst);
    }

    /// Sets the trigger, and forgets a connection [`Self::arm_after`] waited
    /// for and its darkening.
    fn set_trigger(&self, text: &[u8]) {
        *self
            .after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.darken.store(false, Ordering::SeqCst);
        *self
            .trigger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = text.to_vec();
    }

    /// How many COMMITs it has cut.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }
}
