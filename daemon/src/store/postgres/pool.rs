//! A bounded pool of synchronous PostgreSQL connections.
//!
//! At most `pool_size` connections are open; a caller waits at most
//! `pool_wait` for one (then [`StoreError::Unavailable`]). A connection the
//! server closed (restart, network loss, `idle_in_transaction` timeout) is
//! dropped when it comes back and a new one is opened on demand, which is
//! how the store reconnects by itself. Connections are opened on demand;
//! `lavd serve` still needs the database once at start (to migrate and to
//! check the log against its newest checkpoint), so a replica does not start
//! while the database is down, but one that runs survives it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::tls::RustlsConnect;
use crate::store::StoreError;

/// How connections are secured.
#[derive(Debug, Clone)]
pub(super) enum Tls {
    /// `sslmode=disable`.
    Disabled,
    /// `sslmode=verify-full`.
    VerifyFull(RustlsConnect),
}

pub(super) struct Pool {
    config: postgres::Config,
    tls: Tls,
    size: usize,
    wait: Duration,
    describe: String,
    state: Mutex<State>,
    freed: Condvar,
    /// Whether a weak `synchronous_commit` was raised already (warned once).
    raised: AtomicBool,
    /// Whether a `repeatable read` default was lowered already (warned once).
    isolated: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("store", &self.describe)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

struct State {
    idle: Vec<Client>,
    /// Connections open, idle or lent.
    open: usize,
}

/// A lent connection; goes back to the pool on drop unless it is closed.
pub(super) struct Conn<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // Some from construction until drop.
        self.client.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Conn<'_> {
    /// Closes the connection instead of giving it back: one whose last
    /// answer was an error that may mean the server is going away (a
    /// COMMIT answered 57P0), which [`Client::is_closed`] may not know yet.
    pub(super) fn discard(mut self) {
        drop(self.client.take());
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        match self.client.take() {
            Some(client) if !client.is_closed() => state.idle.push(client),
            _ => state.open -= 1,
        }
        drop(state);
        self.pool.freed.notify_one();
    }
}

impl Pool {
    pub(super) fn new(
        config: postgres::Config,
        tls: Tls,
        size: usize,
        wait: Duration,
        describe: String,
    ) -> Self {
        Self {
            config,
            tls,
            size,
            wait,
            describe,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            raised: AtomicBool::new(false),
            isolated: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the counts consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A connection, waiting at most `min(pool_wait, wait)`.
    pub(super) fn get_within(&self, wait: Duration) -> Result<Conn<'_>, StoreError> {
        let deadline = Instant::now() + wait.min(self.wait);
        let mut state = self.lock();
        loop {
            if let Some(client) = state.idle.pop() {
                if client.is_closed() {
                    state.open -= 1;
                    continue;
                }
                return Ok(Conn {
                    pool: self,
                    client: Some(client),
                });
            }
            if state.open < self.size {
                state.open += 1;
                drop(state);
                return match self.connect() {
                    Ok(client) => Ok(Conn {
                        pool: self,
                        client: Some(client),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Unavailable {
                    store: self.describe.clone(),
                    reason: format!(
                        "no database connection became free within {} ms (pool_size {})",
                        self.wait.as_millis(),
                        self.size
                    ),
                });
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// A connection, waiting at most `pool_wait`.
    pub(super) fn get(&self) -> Result<Conn<'_>, StoreError> {
        self.get_within(self.wait)
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let result = match &self.tls {
            Tls::Disabled => self.config.connect(NoTls),
            Tls::VerifyFull(tls) => self.config.connect(tls.clone()),
        };
        let pg_err = |error| StoreError::Postgres {
            store: self.describe.clone(),
            error,
        };
        let mut client = result.map_err(pg_err)?;
        if let Some(found) = durable_commits(&mut client).map_err(pg_err)? {
            if !self.raised.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    store = %self.describe,
                    found = %found,
                    "synchronous_commit is `{found}` for lavd's role or database: \
                     lavd sets it to `on` in each of its sessions, because a key \
                     is released only after its audit entry is durable"
                );
            }
        }
        match locking_isolation(&mut client).map_err(pg_err)? {
            (_, Some(found)) if !self.isolated.swap(true, Ordering::Relaxed) => {
                tracing::warn!(
                    store = %self.describe,
                    found = %found,
                    "default_transaction_isolation is `{found}` for lavd's role or \
                     database: lavd sets `read committed` in each of its sessions, \
                     because its budget reservations read the rows they wait to lock"
                );
            }
            ("serializable", None) if !self.isolated.swap(true, Ordering::Relaxed) => {
                tracing::warn!(
                    store = %self.describe,
                    "default_transaction_isolation is `serializable` for lavd's role or \
                     database, and lavd keeps it: correct, but an append that waits \
                     behind another replica's fails to serialize and is retried, at most \
                     3 times, then answered 503 (watch lavd_store_retries_total); \
                     `read committed` is what lavd is built for"
                );
            }
            _ => {}
        }
        Ok(client)
    }
}

/// Runs this session's transactions at an isolation lavd's locking is right
/// under, whatever the role or database default. lavd's transactions lock
/// the rows they change (`FOR UPDATE` on the warrant and the log head) and
/// then read: each statement must see what the lock holder committed.
/// `repeatable read` reads a snapshot taken before the wait, so two replicas
/// reserving on one warrant would both grant its last unit. `read
/// committed` is what lavd is built for; `serializable` is kept (it is
/// correct too, but contending replicas then retry: watch
/// `lavd_store_retries_total`). `read uncommitted` is `read committed` in
/// PostgreSQL. Returns the value it set, and the one it replaced, if any.
fn locking_isolation(
    client: &mut Client,
) -> Result<(&'static str, Option<String>), postgres::Error> {
    let found: String = client
        .query_one(
            "SELECT current_setting('default_transaction_isolation')",
            &[],
        )?
        .try_get(0)?;
    // Set in this session even when kept: a session's own value outranks
    // the server's configuration file, which a reload could otherwise
    // change under an open connection.
    let (pinned, replaced) = match found.as_str() {
        "serializable" => ("serializable", None),
        "repeatable read" => ("read committed", Some(found)),
        _ => ("read committed", None),
    };
    client.batch_execute(&format!("SET default_transaction_isolation = '{pinned}'"))?;
    Ok((pinned, replaced))
}

/// Makes a commit's acknowledgement mean the commit is durable, in this
/// session, whatever the role or database default: `off` acknowledges before
/// the WAL is flushed (a crash loses commits that lavd already acted on, so a
/// key could be out with no audit entry), and `local` does not wait for
/// synchronous standbys (a failover loses them the same way). Stronger
/// settings an operator chose (`on`, `remote_write`, `remote_apply`) are
/// kept. Returns the value it replaced, if any.
fn durable_commits(client: &mut Client) -> Result<Option<String>, postgres::Error> {
    let found: String = client
        .query_one("SELECT current_setting('synchronous_commit')", &[])?
        .try_get(0)?;
    // Set in this session even when kept: a session's own value outranks
    // the server's configuration file, which a reload (`ALTER SYSTEM SET
    // synchronous_commit = off`, `pg_reload_conf()`) could otherwise
    // weaken under an open connection.
    let (pinned, replaced) = match found.as_str() {
        "remote_apply" => ("remote_apply", None),
        "remote_write" => ("remote_write", None),
        "off" | "local" => ("on", Some(found)),
        _ => ("on", None),
    };
    client.batch_execute(&format!("SET synchronous_commit = {pinned}"))?;
    Ok(replaced)
}
