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

fn admin(port: u16) -> postgres::Client {
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
    /// password in `dbpass`, mode 600) and `extra` appended: every `lavd`
    /// the token runs, and every replica, then shares it.
    pub fn write_token_config(&self, token: &crate::TestToken, extra: &str) {
        let pass = token.path("dbpass");
        std::fs::write(&pass, format!("{}\n", password())).expect("dbpass");
        crate::restrict(&pass);
        let text = format!(
            "[hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = \"pin\"\nsessions = 4\n\n\
             [store]\nurl = \"{}\"\npassword_file = \"dbpass\"\npool_size = 8\n{extra}",
            crate::module_path().display().to_string(),
            token.label,
            self.url()
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
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}
