//! The PostgreSQL store (`[store] url`): one database shared by several
//! `lavd serve` replicas.
//!
//! # What it guarantees, whatever the number of replicas
//!
//! Every rule is enforced by the database, inside one transaction, never by
//! a read in one statement and a write decided from it in another:
//!
//! - **Budget.** `warrants.spent` carries `CHECK (spent <= max_unwraps)`, and
//!   the spend is a conditional `UPDATE … WHERE spent + n <= max_unwraps` in
//!   the same transaction as the unwrap's audit leaves. Reservations are rows
//!   (`warrant_reservations`) with a lease (`expires_at`, database clock,
//!   `reservation_lease_secs`, default 300 s): `reserve` locks the warrant
//!   row (`FOR UPDATE`), counts only unexpired reservations and deletes the
//!   expired ones. A replica killed between reserve and settle therefore
//!   holds its units for at most the lease, never longer. A request that
//!   outlives its lease can still not overspend: the conditional `UPDATE` is
//!   the final guard, and then it fails with 503 and releases nothing.
//! - **One log.** The append transaction locks the single `audit_head` row
//!   (`FOR UPDATE`), takes the tree size from it, writes the leaves and
//!   subtree hashes and advances it: leaves get contiguous indices in commit
//!   order across replicas, in one RFC 6962 tree. Nothing about the tree is
//!   cached in memory across transactions. Each replica still group-commits:
//!   the batches queued while its previous transaction ran share one commit.
//! - **Revocation.** The settle reads `warrant_revocations` inside the append
//!   transaction, after taking the head lock that every revocation's own
//!   append also takes: a revocation committed before it is seen, from any
//!   replica, and then nothing is spent or released.
//! - **First-seen payload, urgent → full.** `INSERT … ON CONFLICT DO
//!   NOTHING` records the first payload; the urgent → full replacement is one
//!   conditional `UPDATE … WHERE emergency AND normalized_digest = …`, so two
//!   replicas racing on one id agree on one outcome.
//! - **Keys.** `kid` is the primary key (a duplicate insert fails on the
//!   constraint); destruction is `UPDATE … WHERE destroyed_at IS NULL`, so two
//!   retention jobs at once keep the first record and do no harm.
//!
//! # Failure
//!
//! Connections come from a bounded pool (`pool_size`, waited for at most
//! `pool_wait_secs`); every statement runs under `statement_timeout`, so no
//! request waits on the database past those bounds, except for a commit
//! waiting for a synchronous standby (PostgreSQL applies no timeout there). A transaction that fails
//! on a serialization failure or a deadlock (SQLSTATE 40001, 40P01) is
//! retried up to [`MAX_RETRIES`] times and counted ([`PgStore::retries`]).
//! A lost connection is discarded and a new one opened on the next call, so
//! the store reconnects by itself when the server returns. A transaction cut
//! by a server restart is rolled back by PostgreSQL: no partial commit.
//!
//! Durability is the server's: a commit is durable when PostgreSQL says so,
//! which with `synchronous_commit = on` means flushed to its WAL (and to a
//! synchronous standby, if one is configured; see OPERATIONS). A role or
//! database default of `off` or `local` is raised to `on` in each of lavd's
//! sessions (`pool::durable_commits`).
//!
//! Schema: versioned migrations recorded in `schema_version`, applied at
//! start under an advisory lock (so replicas starting together migrate once)
//! or by `lavd store migrate`. A database whose schema is newer than this
//! binary is refused ([`StoreError::SchemaTooNew`]).
//!
//! Round trips: the per-request writes (first-seen registration,
//! reservation, checkpoint save, and the settle inside the audit append) are
//! PL/pgSQL functions from migration 3, one round trip each instead of their
//! statements (and, outside the append, a BEGIN and a COMMIT); the
//! statements inside are the same, each with its own snapshot as before.
//! Per-request statements are sent typed (`query_typed`/`execute_typed`):
//! no separate prepare round trip. The append transaction locks the head and
//! opens its first savepoint in one round trip (the simple-query protocol
//! takes both), and writes a batch's leaves, subtree hashes and new head
//! size in one statement.

pub mod copy;
mod pool;
pub mod tls;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::Type;
use postgres::{GenericClient, Transaction};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::audit::{
    encode_leaves, intent_leaves, opened_kids, spendable, tree_error, BeforeCommit, GroupCommit,
    LeafRows, NodeRows, OpenIntent, Pending, RevokeFound, Uncommitted, Vouched, Withdrawn,
};
use super::warrants::to_i64;
use super::{
    Appended, AuditAppend, AuditStore, Cosignature, KeyRecord, KeyStore, Registration, Reservation,
    Revocation, Server, Spend, StoreError, WarrantRecord, WarrantStore,
};
use crate::audit::merkle::{self, Hash, HashReader, NodeId, TreeError};
use crate::codec::{format_time, parse_time};
use crate::jwk::P256PublicKey;
use pool::{Pool, Tls};

/// How many times a transaction that hit a serialization failure or a
/// deadlock is run again before the error is returned.
pub const MAX_RETRIES: u32 = 3;

/// `[store]` for PostgreSQL, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct PgSettings {
    /// The URL as configured (it holds no password: the config refuses one).
    pub url: String,
    /// From `password_file` or `password_env`; held zeroized.
    pub password: Option<Zeroizing<String>>,
    /// The CA that signs the server's certificate (needed unless
    /// `sslmode=disable`).
    pub ca_file: Option<PathBuf>,
    /// Most connections this process opens.
    pub pool_size: usize,
    /// Longest wait for a free connection.
    pub pool_wait: Duration,
    /// PostgreSQL's `statement_timeout` (and `lock_timeout`) for every
    /// statement.
    pub statement_timeout: Duration,
    /// How long an unsettled reservation holds its units.
    pub reservation_lease: Duration,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("pool_wait", &self.pool_wait)
            .field("statement_timeout", &self.statement_timeout)
            .field("reservation_lease", &self.reservation_lease)
            .finish()
    }
}

/// The `sslmode` values lavd accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS (a local socket, or a network the operator vouches for).
    Disable,
    /// TLS, the certificate verified against `ca_file` and the host name.
    VerifyFull,
}

/// A parsed `[store] url`.
#[derive(Debug)]
pub struct ParsedUrl {
    /// The client's configuration (sslmode removed and set by us).
    pub config: postgres::Config,
    /// The TLS mode.
    pub sslmode: SslMode,
    /// `host:port/dbname`, for messages.
    pub describe: String,
}

/// Parses a `postgresql://` URL. `sslmode` is `verify-full` (the default)
/// or `disable`; the weaker libpq modes (`prefer`, `require`, `verify-ca`)
/// are refused, since they do not check whom the store talks to. A password
/// in the URL is refused (use `password_file` or `password_env`).
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_url(url: &str) -> Result<ParsedUrl, String> {
    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
        return Err("must be a postgresql:// URL".into());
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut sslmode = SslMode::VerifyFull;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", "verify-full")) => sslmode = SslMode::VerifyFull,
            Some(("sslmode", "disable")) => sslmode = SslMode::Disable,
            Some(("sslmode", other)) => {
                return Err(format!(
                    "sslmode={other} is refused: use verify-full (with ca_file) or disable"
                ))
            }
            Some(("password", _)) => {
                return Err("holds a password: use password_file or password_env".into())
            }
            _ => rest.push(pair),
        }
    }
    let cleaned = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config: postgres::Config = cleaned
        .parse()
        .map_err(|e| crate::store::postgres_text(&e))?;
    if config.get_password().is_some() {
        return Err("holds a password: use password_file or password_env".into());
    }
    if config.get_user().is_none() {
        return Err("names no user (postgresql://USER@host/db)".into());
    }
    let Some(dbname) = config.get_dbname().map(str::to_string) else {
        return Err("names no database (postgresql://user@host/DB)".into());
    };
    let host = match config.get_hosts() {
        [postgres::config::Host::Tcp(h)] => h.clone(),
        [] => return Err("names no host".into()),
        [_] => return Err("names a Unix socket; lavd connects over TCP".into()),
        _ => return Err("names several hosts; give one (a load balancer or the primary)".into()),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    config.ssl_mode(match sslmode {
        SslMode::Disable => postgres::config::SslMode::Disable,
        SslMode::VerifyFull => postgres::config::SslMode::Require,
    });
    Ok(ParsedUrl {
        config,
        sslmode,
        describe: format!("postgresql://{host}:{port}/{dbname}"),
    })
}

/// The schema, one migration per entry, recorded in `schema_version`.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: everything, as in SQLite's migrations 1–3, plus the reservation
    // leases and the log head that replicas need.
    "CREATE TABLE escrow_keys (
        kid            TEXT PRIMARY KEY,
        public_sec1    BYTEA NOT NULL,
        not_before     TEXT NOT NULL,
        not_after      TEXT NOT NULL,
        destroy_after  TEXT NOT NULL,
        created_at     TEXT NOT NULL,
        destroyed_at   TEXT,
        destroy_reason TEXT
    );
    CREATE TABLE warrants (
        id                TEXT PRIMARY KEY,
        payload_digest    BYTEA NOT NULL CHECK (octet_length(payload_digest) = 32),
        normalized_digest BYTEA NOT NULL CHECK (octet_length(normalized_digest) = 32),
        emergency         BOOLEAN NOT NULL,
        max_unwraps       BIGINT NOT NULL CHECK (max_unwraps > 0),
        spent             BIGINT NOT NULL CHECK (spent >= 0 AND spent <= max_unwraps),
        first_seen        TEXT NOT NULL,
        upgraded_at       TEXT
    );
    CREATE TABLE warrant_revocations (
        id          TEXT PRIMARY KEY,
        reason      TEXT NOT NULL,
        revoked_by  TEXT NOT NULL,
        revoked_at  TEXT NOT NULL
    );
    CREATE TABLE warrant_reservations (
        token       BIGSERIAL PRIMARY KEY,
        warrant_id  TEXT NOT NULL REFERENCES warrants (id),
        granted     BIGINT NOT NULL CHECK (granted > 0),
        expires_at  TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX warrant_reservations_by_warrant ON warrant_reservations (warrant_id, expires_at);
    CREATE TABLE audit_head (
        id    SMALLINT PRIMARY KEY CHECK (id = 1),
        size  BIGINT NOT NULL CHECK (size >= 0)
    );
    INSERT INTO audit_head (id, size) VALUES (1, 0);
    CREATE TABLE audit_leaves (
        idx  BIGINT PRIMARY KEY CHECK (idx >= 0),
        leaf BYTEA NOT NULL
    );
    CREATE TABLE audit_nodes (
        level SMALLINT NOT NULL CHECK (level BETWEEN 0 AND 63),
        idx   BIGINT NOT NULL CHECK (idx >= 0),
        hash  BYTEA NOT NULL CHECK (octet_length(hash) = 32),
        PRIMARY KEY (level, idx)
    );
    CREATE TABLE audit_checkpoints (
        size      BIGINT PRIMARY KEY CHECK (size >= 0),
        note      TEXT NOT NULL,
        signed_at TEXT NOT NULL
    );",
    // 2: witness cosignatures of checkpoints (SQLite's migration 4).
    "CREATE TABLE audit_cosignatures (
        size    BIGINT NOT NULL CHECK (size >= 0),
        witness TEXT NOT NULL,
        line    TEXT NOT NULL,
        PRIMARY KEY (size, witness)
    );
    CREATE INDEX audit_cosignatures_by_witness ON audit_cosignatures (witness, size);",
    // 3: the per-request writes as functions, so that each is one round
    // trip: registration, reservation and checkpoint save instead of 4–7
    // each (BEGIN, their statements, COMMIT), and the settle inside the
    // append (under the head lock) instead of 3. The same statements as
    // before, in the same order. In a volatile function each statement
    // takes a new snapshot under READ COMMITTED, as separate statements
    // did; a single statement with CTEs would not (its snapshot predates
    // the row lock it waits for).
    //
    // First seen, then urgent → full; `r_outcome` is `new`, `upgraded` or
    // `known` with the stored row, which the caller classifies.
    "CREATE FUNCTION lavd_register(p_id TEXT, p_payload BYTEA, p_normalized BYTEA,
                                   p_emergency BOOLEAN, p_max BIGINT, p_seen TEXT)
     RETURNS TABLE (r_outcome TEXT, r_payload BYTEA, r_normalized BYTEA,
                    r_emergency BOOLEAN, r_max BIGINT)
     LANGUAGE plpgsql VOLATILE AS $$
     BEGIN
         INSERT INTO warrants (id, payload_digest, normalized_digest, emergency,
                               max_unwraps, spent, first_seen, upgraded_at)
         VALUES (p_id, p_payload, p_normalized, p_emergency, p_max, 0, p_seen, NULL)
         ON CONFLICT (id) DO NOTHING;
         IF FOUND THEN
             RETURN QUERY SELECT 'new'::TEXT, NULL::BYTEA, NULL::BYTEA, NULL::BOOLEAN, NULL::BIGINT;
             RETURN;
         END IF;
         IF NOT p_emergency THEN
             UPDATE warrants SET payload_digest = p_payload, emergency = FALSE, upgraded_at = p_seen
             WHERE id = p_id AND emergency AND normalized_digest = p_normalized
               AND max_unwraps = p_max AND payload_digest <> p_payload;
             IF FOUND THEN
                 RETURN QUERY SELECT 'upgraded'::TEXT, NULL::BYTEA, NULL::BYTEA, NULL::BOOLEAN, NULL::BIGINT;
                 RETURN;
             END IF;
         END IF;
         RETURN QUERY SELECT 'known'::TEXT, w.payload_digest, w.normalized_digest, w.emergency, w.max_unwraps
                      FROM warrants w WHERE w.id = p_id;
     END $$;
    -- The warrant row lock orders every reservation of it, from every
    -- replica; `r_status` is `unknown`, `revoked` or `ok` with what was
    -- granted (0: no token).
    CREATE FUNCTION lavd_reserve(p_id TEXT, p_n BIGINT, p_lease FLOAT8)
     RETURNS TABLE (r_status TEXT, r_granted BIGINT, r_token BIGINT)
     LANGUAGE plpgsql VOLATILE AS $$
     DECLARE
         v_max BIGINT;
         v_spent BIGINT;
         v_reserved BIGINT;
         v_granted BIGINT;
         v_token BIGINT;
     BEGIN
         SELECT w.max_unwraps, w.spent INTO v_max, v_spent FROM warrants w WHERE w.id = p_id FOR UPDATE;
         IF NOT FOUND THEN
             RETURN QUERY SELECT 'unknown'::TEXT, NULL::BIGINT, NULL::BIGINT;
             RETURN;
         END IF;
         IF EXISTS (SELECT 1 FROM warrant_revocations r WHERE r.id = p_id) THEN
             RETURN QUERY SELECT 'revoked'::TEXT, NULL::BIGINT, NULL::BIGINT;
             RETURN;
         END IF;
         DELETE FROM warrant_reservations r WHERE r.warrant_id = p_id AND r.expires_at <= now();
         SELECT COALESCE(SUM(r.granted), 0)::BIGINT INTO v_reserved FROM warrant_reservations r
         WHERE r.warrant_id = p_id AND r.expires_at > now();
         -- A late settle (past its lease) may leave spent + reserved above
         -- max for a while: nothing is then available.
         v_granted := LEAST(p_n, GREATEST(v_max - v_spent - v_reserved, 0));
         IF v_granted > 0 THEN
             INSERT INTO warrant_reservations (warrant_id, granted, expires_at)
             VALUES (p_id, v_granted, now() + make_interval(secs => p_lease))
             RETURNING token INTO v_token;
         END IF;
         RETURN QUERY SELECT 'ok'::TEXT, v_granted, v_token;
     END $$;
    -- The settle: the reservation's row deleted and `p_opened` spent,
    -- refused in SQL past `max_unwraps`; with `p_check_revoked`, a revoked
    -- warrant spends nothing. `revoked`, `overrun` (the caller fails and
    -- rolls back) or `ok`.
    CREATE FUNCTION lavd_settle(p_id TEXT, p_token BIGINT, p_opened BIGINT,
                                p_check_revoked BOOLEAN)
     RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
     DECLARE
         v_revoked BOOLEAN := FALSE;
     BEGIN
         IF p_check_revoked AND EXISTS (SELECT 1 FROM warrant_revocations r WHERE r.id = p_id) THEN
             v_revoked := TRUE;
             p_opened := 0;
         END IF;
         IF p_token IS NOT NULL THEN
             DELETE FROM warrant_reservations r WHERE r.token = p_token AND r.warrant_id = p_id;
         END IF;
         IF p_opened > 0 THEN
             UPDATE warrants SET spent = spent + p_opened
             WHERE id = p_id AND spent + p_opened <= max_unwraps;
             IF NOT FOUND THEN
                 RETURN 'overrun';
             END IF;
         END IF;
         RETURN CASE WHEN v_revoked THEN 'revoked' ELSE 'ok' END;
     END $$;
    -- A checkpoint, without a WAL flush of its own (see `save_checkpoint`):
    -- the local setting holds until this call's own commit.
    CREATE FUNCTION lavd_save_checkpoint(p_size BIGINT, p_note TEXT, p_at TEXT)
     RETURNS VOID LANGUAGE plpgsql VOLATILE AS $$
     BEGIN
         PERFORM set_config('synchronous_commit', 'off', true);
         INSERT INTO audit_checkpoints (size, note, signed_at) VALUES (p_size, p_note, p_at)
         ON CONFLICT (size) DO NOTHING;
     END $$;",
    // 4: a settle whose reservation lapsed and was reclaimed (its row
    // deleted by `lavd_reserve` for another reservation) spends only units
    // no live reservation holds, so the late request, not the one within
    // its lease, is refused. The warrant's row is locked first, in the
    // order `lavd_reserve` takes them.
    "CREATE OR REPLACE FUNCTION lavd_settle(p_id TEXT, p_token BIGINT, p_opened BIGINT,
                                           p_check_revoked BOOLEAN)
     RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
     DECLARE
         v_revoked BOOLEAN := FALSE;
         v_live BOOLEAN := TRUE;
         v_held BIGINT := 0;
     BEGIN
         PERFORM 1 FROM warrants w WHERE w.id = p_id FOR UPDATE;
         IF p_check_revoked AND EXISTS (SELECT 1 FROM warrant_revocations r WHERE r.id = p_id) THEN
             v_revoked := TRUE;
             p_opened := 0;
         END IF;
         IF p_token IS NOT NULL THEN
             DELETE FROM warrant_reservations r WHERE r.token = p_token AND r.warrant_id = p_id;
             v_live := FOUND;
         END IF;
         IF p_opened > 0 THEN
             IF NOT v_live THEN
                 SELECT COALESCE(SUM(r.granted), 0)::BIGINT INTO v_held
                 FROM warrant_reservations r
                 WHERE r.warrant_id = p_id AND r.expires_at > now();
             END IF;
             UPDATE warrants SET spent = spent + p_opened
             WHERE id = p_id AND spent + p_opened + v_held <= max_unwraps;
             IF NOT FOUND THEN
                 RETURN 'overrun';
             END IF;
         END IF;
         RETURN CASE WHEN v_revoked THEN 'revoked' ELSE 'ok' END;
     END $$;",
    // 5: a row per server process (backend) that `replicated` writes: a
    // commit that writes WAL, whose wait for the synchronous standbys
    // covers every commit before it (a transaction id alone writes none,
    // and then waits for nothing). One row per backend, so that no two
    // wait on one row's lock.
    "CREATE TABLE replication_barrier (
        pid INTEGER PRIMARY KEY,
        n   BIGINT NOT NULL
    );",
    // 6: open intents, written with an unwrap's reservation (one
    // transaction, one round trip) before its HSM opens and deleted with
    // its audit leaves; one past `expires_at` (the reservation's lease) is
    // an orphan, whose `open_interrupted` leaves any replica writes.
    "CREATE TABLE open_intents (
        id         BIGSERIAL PRIMARY KEY,
        warrant_id TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        expires_at TIMESTAMPTZ NOT NULL,
        leaves     BYTEA[] NOT NULL
    );
    CREATE INDEX open_intents_by_expiry ON open_intents (expires_at);
    CREATE FUNCTION lavd_reserve_intent(p_id TEXT, p_lease FLOAT8, p_leaves BYTEA[])
     RETURNS TABLE (r_status TEXT, r_granted BIGINT, r_token BIGINT, r_intent BIGINT)
     LANGUAGE plpgsql VOLATILE AS $$
     DECLARE
         v_status TEXT;
         v_granted BIGINT;
         v_token BIGINT;
         v_intent BIGINT;
     BEGIN
         SELECT r.r_status, r.r_granted, r.r_token INTO v_status, v_granted, v_token
         FROM lavd_reserve(p_id, COALESCE(array_length(p_leaves, 1), 0)::BIGINT, p_lease) r;
         IF v_status = 'ok' AND v_granted > 0 THEN
             INSERT INTO open_intents (warrant_id, expires_at, leaves)
             VALUES (p_id, now() + make_interval(secs => p_lease), p_leaves[1:v_granted])
             RETURNING id INTO v_intent;
         END IF;
         RETURN QUERY SELECT v_status, v_granted, v_token, v_intent;
     END $$;
    -- The settle of a reservation that has an intent: `lavd_settle`, and the
    -- intent deleted in the same statement (gone already if a sweep took it
    -- past its lease: both its leaves and the request's then stand).
    CREATE FUNCTION lavd_settle_intent(p_id TEXT, p_token BIGINT, p_opened BIGINT,
                                       p_check_revoked BOOLEAN, p_intent BIGINT)
     RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
     DECLARE
         v_status TEXT;
     BEGIN
         -- The warrant's row first (inside `lavd_settle`), as everywhere.
         v_status := lavd_settle(p_id, p_token, p_opened, p_check_revoked);
         DELETE FROM open_intents i WHERE i.id = p_intent;
         RETURN v_status;
     END $$;",
    // 7: a random mark per append transaction, filed under the index of its
    // first leaf and written with it. After a restart or a failover, a
    // COMMIT whose answer was lost is judged by its own mark, not by its
    // first leaf's bytes, which another writer's leaf at that index may
    // equal (the same refusal in the same second). Marks more than
    // `MARKS_KEPT` leaves back are deleted as groups commit.
    "CREATE TABLE audit_commit_marks (
        first_index BIGINT PRIMARY KEY CHECK (first_index >= 0),
        mark        BYTEA NOT NULL CHECK (octet_length(mark) = 16)
    );",
    // 8: a settle whose intent a sweep already took (the request outlived
    // its lease, and the intent's `open_interrupted` leaves say nothing of
    // it was released) spends nothing and frees its reservation; it
    // answers 'swept', and the request writes its leaves denied and
    // releases nothing. Before, both stood: the log said the envelopes were
    // interrupted and also opened and released. This delete and the
    // sweep's take the intent row's lock: the one that waited finds it
    // gone.
    "CREATE OR REPLACE FUNCTION lavd_settle_intent(p_id TEXT, p_token BIGINT, p_opened BIGINT,
                                                  p_check_revoked BOOLEAN, p_intent BIGINT)
     RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
     BEGIN
         -- The warrant's row first, as everywhere.
         PERFORM 1 FROM warrants w WHERE w.id = p_id FOR UPDATE;
         DELETE FROM open_intents i WHERE i.id = p_intent;
         IF NOT FOUND THEN
             PERFORM lavd_settle(p_id, p_token, 0, FALSE);
             RETURN 'swept';
         END IF;
         RETURN lavd_settle(p_id, p_token, p_opened, p_check_revoked);
     END $$;",
    // 9: a reservation whose answer was lost (the connection cut after the
    // server ran it) is cancelled from another connection: it held its units for the
    // whole lease (a retry within it refused `budget_exhausted`) and left
    // an intent whose leaves said `open_interrupted` for opens that never
    // began. Each reservation carries the request's random nonce; the
    // cancel leaves a tombstone under the warrant's lock, so a reservation
    // still queued on the server when the cancel runs grants nothing
    // ('cancelled'). Tombstones older than twice the lease, and at least an
    // hour (past any statement timeout), are deleted by the next cancel. The three-argument `lavd_reserve_intent` stays for
    // replicas still running the previous release.
    "ALTER TABLE warrant_reservations ADD COLUMN nonce BYTEA;
    ALTER TABLE open_intents ADD COLUMN nonce BYTEA;
    CREATE TABLE cancelled_reservations (
        nonce      BYTEA PRIMARY KEY CHECK (octet_length(nonce) = 16),
        warrant_id TEXT NOT NULL,
        at         TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX cancelled_reservations_by_time ON cancelled_reservations (at);
    CREATE INDEX open_intents_by_nonce ON open_intents (nonce) WHERE nonce IS NOT NULL;
    CREATE INDEX warrant_reservations_by_nonce ON warrant_reservations (nonce)
        WHERE nonce IS NOT NULL;
    CREATE FUNCTION lavd_reserve_intent(p_id TEXT, p_lease FLOAT8, p_leaves BYTEA[],
                                        p_nonce BYTEA)
     RETURNS TABLE (r_status TEXT, r_granted BIGINT, r_token BIGINT, r_intent BIGINT)
     LANGUAGE plpgsql VOLATILE AS $$
     DECLARE
         v_status TEXT;
         v_granted BIGINT;
         v_token BIGINT;
         v_intent BIGINT;
     BEGIN
         -- The warrant's row first, as everywhere (`lavd_reserve` takes it
         -- again): a cancel of this nonce is either seen here or runs after.
         PERFORM 1 FROM warrants w WHERE w.id = p_id FOR UPDATE;
         IF EXISTS (SELECT 1 FROM cancelled_reservations c WHERE c.nonce = p_nonce) THEN
             RETURN QUERY SELECT 'cancelled'::TEXT, 0::BIGINT, NULL::BIGINT, NULL::BIGINT;
             RETURN;
         END IF;
         SELECT r.r_status, r.r_granted, r.r_token INTO v_status, v_granted, v_token
         FROM lavd_reserve(p_id, COALESCE(array_length(p_leaves, 1), 0)::BIGINT, p_lease) r;
         IF v_status = 'ok' AND v_granted > 0 THEN
             UPDATE warrant_reservations SET nonce = p_nonce WHERE token = v_token;
             INSERT INTO open_intents (warrant_id, expires_at, leaves, nonce)
             VALUES (p_id, now() + make_interval(secs => p_lease), p_leaves[1:v_granted], p_nonce)
             RETURNING id INTO v_intent;
         END IF;
         RETURN QUERY SELECT v_status, v_granted, v_token, v_intent;
     END $$;
    -- Undoes the reservation of `p_nonce` (its units and its intent) and
    -- makes sure none is made later; the number of rows deleted.
    CREATE FUNCTION lavd_cancel_reservation(p_id TEXT, p_nonce BYTEA, p_lease FLOAT8)
     RETURNS BIGINT LANGUAGE plpgsql VOLATILE AS $$
     DECLARE
         v_reservations BIGINT;
         v_intents BIGINT;
     BEGIN
         PERFORM 1 FROM warrants w WHERE w.id = p_id FOR UPDATE;
         INSERT INTO cancelled_reservations (nonce, warrant_id) VALUES (p_nonce, p_id)
         ON CONFLICT (nonce) DO NOTHING;
         DELETE FROM warrant_reservations r WHERE r.warrant_id = p_id AND r.nonce = p_nonce;
         GET DIAGNOSTICS v_reservations = ROW_COUNT;
         DELETE FROM open_intents i WHERE i.warrant_id = p_id AND i.nonce = p_nonce;
         GET DIAGNOSTICS v_intents = ROW_COUNT;
         DELETE FROM cancelled_reservations c
         WHERE c.at < now() - make_interval(secs => GREATEST(2 * p_lease, 3600));
         RETURN v_reservations + v_intents;
     END $$;",
];

/// How many leaves back an append transaction's mark (migration 7) is
/// kept: enough for any COMMIT's fate to be read (it is read at once, for
/// at most the statement timeout; ten million leaves are over half an hour
/// at the fastest lavd appends), and no more (one row per transaction).
const MARKS_KEPT: i64 = 10_000_000;

/// The oldest PostgreSQL lavd runs on (`server_version_num`).
const MIN_SERVER_VERSION: i32 = 130_000;

/// The advisory lock key that serialises migrations across replicas
/// (`lavd` in ASCII).
const MIGRATION_LOCK: i64 = 0x6c61_7664;

/// The PostgreSQL store.
#[derive(Debug)]
pub struct PgStore {
    pool: Pool,
    describe: String,
    lease: Duration,
    /// How long a COMMIT whose answer was lost may stay "in progress"
    /// before its backend is ended ([`PgStore::commit_outcome`]).
    statement_timeout: Duration,
    group: GroupCommit,
    retries: AtomicU64,
}

/// The SQL for when the server process started, as [`Xact::server`] and
/// [`Server`] keep it: microseconds since the epoch, whatever the session's
/// `TimeZone`, `DateStyle` and `extra_float_digits` (a timestamp cast to
/// text follows the first two, so a connection opened after `ALTER ROLE …
/// SET timezone` would take the same server for another, and decide a
/// commit's fate from its first leaf alone while the transaction still
/// ran).
macro_rules! server_started {
    () => {
        "(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint::text"
    };
}

/// The token of the reservation a settle spends, if `spend` is one (and
/// its reservation has a token).
fn settled_reservation(spend: &Spend) -> Option<i64> {
    match spend {
        Spend::Settle { reservation, .. } => reservation.token(),
        _ => None,
    }
}

thread_local! {
    /// Whether a WARNING notice reached this thread's connection since
    /// [`warned_during`] cleared it ([`on_notice`]). The `postgres` crate
    /// runs a connection's I/O, and its notice callback, on the thread
    /// that waits for its answer, and a notice comes before the answer it
    /// belongs to: so the flag, read after a statement returns, says
    /// whether that statement was warned about (a statement on another
    /// connection of the same thread meanwhile could set it too: then a
    /// barrier is run for nothing).
    static WARNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Every connection's notice callback: a WARNING is logged and flagged for
/// the thread ([`WARNED`]); others (NOTICE, INFO, …) are logged at debug.
/// The one that matters: "canceling wait for synchronous replication",
/// sent with a COMMIT's success when its wait for the synchronous standbys
/// is cancelled (the transaction is then on this server only). Its text
/// follows the server's `lc_messages`, so any WARNING counts.
fn on_notice(notice: postgres::error::DbError) {
    if notice.parsed_severity() == Some(postgres::error::Severity::Warning) {
        WARNED.with(|w| w.set(true));
        tracing::warn!(
            code = notice.code().code(),
            message = %crate::codec::escape_for_terminal(notice.message()),
            detail = %crate::codec::escape_for_terminal(notice.detail().unwrap_or("")),
            "the database sent a warning"
        );
    } else {
        tracing::debug!(
            severity = notice.severity(),
            message = %crate::codec::escape_for_terminal(notice.message()),
            "the database sent a notice"
        );
    }
}

/// Runs `f` and says whether a WARNING notice reached this thread meanwhile.
pub(super) fn warned_during<T>(f: impl FnOnce() -> T) -> (T, bool) {
    WARNED.with(|w| w.set(false));
    let value = f();
    (value, WARNED.with(|w| w.replace(false)))
}

/// The barrier of [`PgStore::barrier_on`]: when synchronous standbys are
/// named, a write to this backend's own row, so that the statement's
/// commit writes WAL and waits for them; the server it ran on, either way.
macro_rules! barrier {
    () => {
        concat!(
            "WITH b AS (INSERT INTO replication_barrier (pid, n) \
             SELECT pg_backend_pid(), 1 \
             WHERE current_setting('synchronous_standby_names') <> '' \
             ON CONFLICT (pid) DO UPDATE SET n = replication_barrier.n + 1) \
             SELECT ",
            server_started!()
        )
    };
}

/// An append transaction, as PostgreSQL names it, and what it wrote first.
#[derive(Debug)]
struct Xact {
    /// `pg_current_xact_id()`, as text.
    xid: String,
    /// `pg_backend_pid()`.
    pid: i32,
    /// `pg_postmaster_start_time()` in microseconds since the epoch, as text
    /// ([`server_started!`]): the server process that ran it. Another value
    /// later means a restart or a failover, after which `xid` and `pid` may
    /// name something else.
    server: String,
    /// The index and leaf hash of the group's first leaf, once written.
    first_leaf: Option<(u64, Hash)>,
    /// Random: written with the group under its first leaf's index
    /// (`audit_commit_marks`), so that only this transaction's commit
    /// stores it.
    mark: [u8; 16],
}

/// Whether a COMMIT answered with `code` may still have committed: the
/// server shutting down or crashing as it answered (class 57P0: admin
/// shutdown, crash shutdown, cannot connect now) or the connection failing
/// (class 08), after the commit record may have been flushed.
fn commit_may_have_landed(code: &SqlState) -> bool {
    let code = code.code();
    code.starts_with("57P0") || code.starts_with("08")
}

/// Whether a failed COMMIT, answered with `severity` and `code` (neither
/// when no answer came), may still have committed, so that its fate is
/// for the database to say: no answer (the connection died with the
/// COMMIT in flight), a server going down or away as it answered
/// ([`commit_may_have_landed`]), or a PANIC of any code (the server
/// crashed as it answered, and crash recovery replays a commit record it
/// had flushed). Any other answer is an error of the statement, and the
/// transaction rolled back.
pub(super) fn commit_fate_unknown(
    severity: Option<postgres::error::Severity>,
    code: Option<&str>,
) -> bool {
    let Some(code) = code else {
        return true;
    };
    severity == Some(postgres::error::Severity::Panic)
        || commit_may_have_landed(&SqlState::from_code(code))
}

/// Whether `e` says the server could not be had or was lost: no
/// connection within the wait, a connection closed or failing (an I/O
/// error, class 08), the server shutting down (57P0), or a PANIC (a
/// backend that crashed as it answered; crash recovery may replay what it
/// had committed, as [`commit_fate_unknown`] says). Not a client-side
/// error (a parameter that would not encode), which has no SQLSTATE either.
fn server_lost(e: &StoreError) -> bool {
    match e {
        StoreError::Unavailable { .. } => true,
        StoreError::Postgres { error, .. } => {
            error.is_closed()
                || error.code().is_some_and(commit_may_have_landed)
                || error
                    .as_db_error()
                    .and_then(|d| d.parsed_severity())
                    .is_some_and(|s| s == postgres::error::Severity::Panic)
                || std::error::Error::source(error).is_some_and(|s| s.is::<std::io::Error>())
        }
        _ => false,
    }
}

/// Whether `e` is worth running the transaction again.
fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Postgres { error, .. }
        if error.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            || error.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED))
}

impl PgStore {
    /// Connects (one connection, to migrate) and applies pending migrations.
    ///
    /// # Errors
    /// [`StoreError::Postgres`] if the server cannot be reached or refuses;
    /// [`StoreError::SchemaTooNew`]; [`StoreError::Unavailable`] for a
    /// `ca_file` that cannot be used.
    pub fn connect(settings: &PgSettings) -> Result<Self, StoreError> {
        let store = Self::new(settings)?;
        store.migrate()?;
        Ok(store)
    }

    /// Whether the database holds lavd's schema (its `schema_version`,
    /// `escrow_keys` and `audit_leaves` tables), read without migrating:
    /// for the commands that only read or change keys a store already
    /// records, which must not make lavd's schema in a database the config
    /// names by mistake (another application's, whose own `schema_version`
    /// table alone would not tell it apart).
    ///
    /// # Errors
    /// [`StoreError::Postgres`] if the server cannot be reached or refuses;
    /// [`StoreError::Unavailable`] for a `ca_file` that cannot be used.
    pub fn holds_schema(settings: &PgSettings) -> Result<bool, StoreError> {
        let store = Self::new(settings)?;
        let mut conn = store.pool.get()?;
        let row = conn
            .query_one(
                "SELECT to_regclass('schema_version') IS NOT NULL \
                 AND to_regclass('escrow_keys') IS NOT NULL \
                 AND to_regclass('audit_leaves') IS NOT NULL",
                &[],
            )
            .map_err(|e| store.pg_err(e))?;
        row.try_get(0).map_err(|e| store.pg_err(e))
    }

    /// Whether the audit log holds a leaf (a database that
    /// [`Self::holds_schema`]).
    ///
    /// # Errors
    /// The server's.
    pub fn holds_leaves(settings: &PgSettings) -> Result<bool, StoreError> {
        let store = Self::new(settings)?;
        let mut conn = store.pool.get()?;
        let row = conn
            .query_one("SELECT EXISTS (SELECT 1 FROM audit_leaves)", &[])
            .map_err(|e| store.pg_err(e))?;
        row.try_get(0).map_err(|e| store.pg_err(e))
    }

    /// The store without touching the server (connections open on demand).
    fn new(settings: &PgSettings) -> Result<Self, StoreError> {
        let unusable = |reason: String| StoreError::Unavailable {
            store: settings.url.clone(),
            reason,
        };
        let parsed = parse_url(&settings.url).map_err(unusable)?;
        let describe = parsed.describe.clone();
        let mut config = parsed.config;
        if let Some(password) = &settings.password {
            config.password(password.as_bytes());
        }
        let ms = settings.statement_timeout.as_millis().max(1);
        // `client_min_messages = warning`: the WARNING a COMMIT whose wait
        // for the synchronous standbys was cancelled is answered with
        // ([`on_notice`]) is sent whatever the role's or database's
        // default (a session of lavd's role could set `error` for it).
        config.options(&format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={} \
             -c client_min_messages=warning",
            ms.saturating_mul(4)
        ));
        config.connect_timeout(settings.pool_wait);
        // A server that vanishes without a reset (a partition, a powered-off
        // host) must not hold a request, or the group commit behind it, for
        // the kernel's defaults (two hours of idle before the first
        // keepalive; some fifteen minutes of retransmission): keepalives
        // find it in about 11 s while a reply is awaited, and data sent but
        // never acknowledged fails the connection after the statement
        // timeout and 5 s more.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        config.tcp_user_timeout(settings.statement_timeout + Duration::from_secs(5));
        config.application_name("lavd");
        config.notice_callback(on_notice);
        let tls = match parsed.sslmode {
            SslMode::Disable => Tls::Disabled,
            SslMode::VerifyFull => {
                let Some(ca) = &settings.ca_file else {
                    return Err(unusable("sslmode=verify-full needs ca_file".into()));
                };
                let pem = std::fs::read(ca)
                    .map_err(|e| unusable(format!("cannot read {}: {e}", ca.display())))?;
                Tls::VerifyFull(
                    tls::RustlsConnect::new(&pem)
                        .map_err(|e| unusable(format!("{}: {e}", ca.display())))?,
                )
            }
        };
        Ok(Self {
            pool: Pool::new(
                config,
                tls,
                settings.pool_size,
                settings.pool_wait,
                describe.clone(),
            ),
            describe,
            lease: settings.reservation_lease,
            statement_timeout: settings.statement_timeout,
            group: GroupCommit::default(),
            retries: AtomicU64::new(0),
        })
    }

    /// `postgresql://host:port/dbname`.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The `synchronous_commit` that lavd's sessions commit under: the
    /// role's or database's, unless that was `off` or `local`, which each
    /// new connection raises to `on`.
    ///
    /// # Errors
    /// [`StoreError::Postgres`] or [`StoreError::Unavailable`].
    pub fn synchronous_commit(&self) -> Result<String, StoreError> {
        let mut conn = self.pool.get()?;
        conn.query_one("SELECT current_setting('synchronous_commit')", &[])
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.pg_err(e))
    }

    /// The `default_transaction_isolation` lavd's sessions run under
    /// (a `repeatable read` default is lowered to `read committed`).
    ///
    /// # Errors
    /// [`StoreError::Postgres`] or [`StoreError::Unavailable`].
    pub fn transaction_isolation(&self) -> Result<String, StoreError> {
        let mut conn = self.pool.get()?;
        conn.query_one(
            "SELECT current_setting('default_transaction_isolation')",
            &[],
        )
        .and_then(|r| r.try_get(0))
        .map_err(|e| self.pg_err(e))
    }

    /// Where lavd's sessions take setting `name` from (`pg_settings.source`):
    /// `session` for the two lavd sets on every connection, which outranks
    /// the server's configuration file and so any reload of it.
    ///
    /// # Errors
    /// [`StoreError::Postgres`] or [`StoreError::Unavailable`].
    pub fn setting_source(&self, name: &str) -> Result<String, StoreError> {
        let mut conn = self.pool.get()?;
        conn.query_one("SELECT source FROM pg_settings WHERE name = $1", &[&name])
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.pg_err(e))
    }

    /// Transactions retried after a serialization failure or a deadlock.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn pg_err(&self, error: postgres::Error) -> StoreError {
        StoreError::Postgres {
            store: self.describe.clone(),
            error,
        }
    }

    /// Rows `(head size, index, bytes)` of one statement that read the
    /// head with the leaf or node rows it joined (none: one row of nulls):
    /// the rows as `(index, bytes)` ([`LeafRows`], [`NodeRows`]), and
    /// [`Vouched::Below`] the head.
    fn vouched_rows(&self, rows: &[postgres::Row]) -> Result<(LeafRows, Vouched), StoreError> {
        let head = rows
            .first()
            .ok_or_else(|| self.corrupt("audit_head has no row"))?;
        let size: i64 = head.try_get(0).map_err(|e| self.pg_err(e))?;
        let vouched = Vouched::Below(self.to_u64(size, "audit_head.size")?);
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let idx: Option<i64> = row.try_get(1).map_err(|e| self.pg_err(e))?;
            let bytes: Option<Vec<u8>> = row.try_get(2).map_err(|e| self.pg_err(e))?;
            if let (Some(idx), Some(bytes)) = (idx, bytes) {
                out.push((self.to_u64(idx, "audit index")?, bytes));
            }
        }
        Ok((out, vouched))
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            store: self.describe.clone(),
            what: what.into(),
        }
    }

    /// Applies pending migrations, under an advisory lock so that replicas
    /// starting together do it once. Returns the schema version.
    ///
    /// # Errors
    /// [`StoreError::SchemaTooNew`], [`StoreError::Postgres`];
    /// [`StoreError::Unavailable`] for a server older than PostgreSQL 13.
    pub fn migrate(&self) -> Result<i64, StoreError> {
        let mut conn = self.pool.get()?;
        // `pg_current_xact_id` and `pg_xact_status(xid8)`, with which a
        // COMMIT whose answer was lost is settled, came in PostgreSQL 13.
        let version: i32 = conn
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.pg_err(e))?;
        if version < MIN_SERVER_VERSION {
            return Err(StoreError::Unavailable {
                store: self.describe.clone(),
                reason: format!(
                    "PostgreSQL {version} (server_version_num) is too old: lavd needs 13 or later"
                ),
            });
        }
        // READ COMMITTED whatever the database's default: under REPEATABLE
        // READ or SERIALIZABLE the snapshot would be taken by the lock
        // statement, before its wait, and a replica that waited for
        // another's migration would not see it and run it again. The
        // request path's timeouts do not bound a migration, or the wait
        // for another replica's.
        let mut tx = conn
            .build_transaction()
            .isolation_level(::postgres::IsolationLevel::ReadCommitted)
            .start()
            .map_err(|e| self.pg_err(e))?;
        tx.batch_execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '300s'")
            .map_err(|e| self.pg_err(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(|e| self.pg_err(e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                version    INTEGER PRIMARY KEY,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .map_err(|e| self.pg_err(e))?;
        let found: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.pg_err(e))?;
        let supported = MIGRATIONS.len() as i64;
        if i64::from(found) > supported {
            return Err(StoreError::SchemaTooNew {
                store: self.describe.clone(),
                found: i64::from(found),
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.batch_execute(sql).map_err(|e| self.pg_err(e))?;
            let version = i as i32 + 1;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES ($1)",
                &[&version],
            )
            .map_err(|e| self.pg_err(e))?;
        }
        let applied = i64::from(found) < supported;
        let (committed, warned) = warned_during(|| tx.commit());
        committed.map_err(|e| self.pg_err(e))?;
        // A migration applied here, or a commit answered with a WARNING (its
        // wait for the synchronous standbys cancelled: on this server only),
        // is followed by a barrier (which waits for the standbys when any are
        // named): a new primary without a migration would run the functions
        // before it, and with migration 8's missing a swept request would
        // release its keys again. Cancelled itself: `CommitUnknown`, and the
        // command stops. A schema an earlier run committed so, whose own
        // barrier failed, is caught by `lavd serve`'s barrier at start;
        // other commands (which do not serve) do not wait on the standbys
        // for it.
        if applied || warned {
            self.barrier_on(&mut conn)?;
        }
        Ok(supported)
    }

    /// Whether a write could start now: a connection within `wait`, to a
    /// primary (not a read-only standby), with the schema in place.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Postgres`].
    pub fn check_writable(&self, wait: Duration) -> Result<(), StoreError> {
        let mut conn = self.pool.get_within(wait)?;
        let row = conn
            .query_one(
                "SELECT pg_is_in_recovery(), (SELECT size FROM audit_head WHERE id = 1)",
                &[],
            )
            .map_err(|e| self.pg_err(e))?;
        let standby: bool = row.try_get(0).map_err(|e| self.pg_err(e))?;
        if standby {
            return Err(StoreError::Unavailable {
                store: self.describe.clone(),
                reason: "the server is a read-only standby".into(),
            });
        }
        Ok(())
    }

    /// Runs `f` in a transaction and commits, running it again like
    /// [`PgStore::with_retries`].
    fn with_tx<T>(
        &self,
        mut f: impl FnMut(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_retries(|conn| {
            let mut tx = conn.transaction().map_err(|e| self.pg_err(e))?;
            let value = f(&mut tx)?;
            tx.commit().map_err(|e| self.pg_err(e))?;
            Ok(value)
        })
    }

    /// Runs `f` on a pooled connection, again (up to [`MAX_RETRIES`] times)
    /// after a serialization failure or a deadlock. Used alone for one
    /// statement in its own implicit transaction (one round trip, no BEGIN
    /// or COMMIT): a call to one of migration 3's functions.
    fn with_retries<T>(
        &self,
        mut f: impl FnMut(&mut postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            let result = self.pool.get().and_then(|mut conn| {
                let (value, warned) = warned_during(|| f(&mut conn));
                let value = value?;
                if warned {
                    // A write whose commit warned (a wait for the
                    // synchronous standbys cancelled: committed here only)
                    // is answered once a barrier on the same server shows
                    // it replicated.
                    self.barrier_on(&mut conn).map_err(|e| {
                        StoreError::CommitUnknown(format!(
                            "committed with a warning (a wait for the synchronous standbys \
                             cancelled?), and not known to be on them: {e}"
                        ))
                    })?;
                }
                Ok(value)
            });
            match result {
                Err(e) if retryable(&e) && attempt < MAX_RETRIES => {
                    attempt += 1;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }

    /// One read on a pooled connection.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.get()?;
        f(&mut conn)
    }

    fn to_u64(&self, v: i64, what: &str) -> Result<u64, StoreError> {
        u64::try_from(v).map_err(|_| self.corrupt(format!("negative {what}")))
    }

    fn digest(&self, bytes: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
        bytes
            .try_into()
            .map_err(|_| self.corrupt(format!("warrants.{what} is not 32 bytes")))
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }
}

// ---- keys -----------------------------------------------------------------

const KEY_COLUMNS: &str = "kid, public_sec1, not_before, not_after, destroy_after, created_at, destroyed_at, destroy_reason";

impl PgStore {
    fn key_from_row(&self, row: &postgres::Row) -> Result<KeyRecord, StoreError> {
        let text = |i: usize| -> Result<String, StoreError> {
            row.try_get::<_, String>(i).map_err(|e| self.pg_err(e))
        };
        let time = |i: usize| -> Result<OffsetDateTime, StoreError> {
            parse_time(&text(i)?).map_err(|_| self.corrupt(format!("escrow_keys column {i}")))
        };
        let sec1: Vec<u8> = row.try_get(1).map_err(|e| self.pg_err(e))?;
        let destroyed_at: Option<String> = row.try_get(6).map_err(|e| self.pg_err(e))?;
        Ok(KeyRecord {
            kid: text(0)?,
            public: P256PublicKey::from_sec1(&sec1)
                .map_err(|_| self.corrupt("escrow_keys.public_sec1"))?,
            not_before: time(2)?,
            not_after: time(3)?,
            destroy_after: time(4)?,
            created_at: time(5)?,
            destroyed_at: destroyed_at
                .map(|t| parse_time(&t))
                .transpose()
                .map_err(|_| self.corrupt("escrow_keys.destroyed_at"))?,
            destroy_reason: row.try_get(7).map_err(|e| self.pg_err(e))?,
        })
    }

    fn insert_key_in(
        &self,
        tx: &mut impl GenericClient,
        key: &KeyRecord,
    ) -> Result<(), StoreError> {
        let sec1 = key.public.sec1();
        let result = tx.execute(
            &format!(
                "INSERT INTO escrow_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)"
            ),
            &[
                &key.kid,
                &sec1.as_slice(),
                &format_time(key.not_before),
                &format_time(key.not_after),
                &format_time(key.destroy_after),
                &format_time(key.created_at),
            ],
        );
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::DuplicateKid(key.kid.clone()))
            }
            Err(e) => Err(self.pg_err(e)),
        }
    }

    fn mark_destroyed_in(
        &self,
        tx: &mut impl GenericClient,
        kid: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let changed = tx
            .execute(
                "UPDATE escrow_keys SET destroyed_at = $2, destroy_reason = $3
                 WHERE kid = $1 AND destroyed_at IS NULL",
                &[&kid, &format_time(at), &reason],
            )
            .map_err(|e| self.pg_err(e))?;
        Ok(changed == 1)
    }

    /// Which of `kids` (as `opened_kids` lists them) are destroyed, as `tx`
    /// sees them: one round trip, and none when no envelope opened.
    fn destroyed_among(
        &self,
        tx: &mut impl GenericClient,
        kids: &[(String, u64)],
    ) -> Result<Vec<String>, StoreError> {
        if kids.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = kids.iter().map(|(k, _)| k.as_str()).collect();
        let rows = tx
            .query_typed(
                "SELECT kid FROM escrow_keys WHERE kid = ANY($1) AND destroyed_at IS NOT NULL",
                &[(&names, Type::TEXT_ARRAY)],
            )
            .map_err(|e| self.pg_err(e))?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0).map_err(|e| self.pg_err(e)))
            .collect()
    }
}

/// What settling a reservation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Spent what was asked.
    Spent,
    /// The warrant is revoked: nothing spent.
    Revoked,
    /// The reservation outlived its lease and spending would pass
    /// `max_unwraps`: nothing spent.
    Lapsed,
    /// The reservation's open intent was gone: a sweep took it as an
    /// orphan (the request outlived its lease) and wrote its
    /// `open_interrupted` leaves. Nothing spent, the reservation freed.
    Swept,
}

impl KeyStore for PgStore {
    fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.with_tx(|tx| self.insert_key_in(tx, key))
    }

    fn list_keys_each(&self) -> Result<Vec<crate::store::keys::KeyRow>, StoreError> {
        self.read(|c| {
            let rows = c
                .query(
                    &format!("SELECT {KEY_COLUMNS} FROM escrow_keys ORDER BY kid"),
                    &[],
                )
                .map_err(|e| self.pg_err(e))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let kid = r
                        .try_get::<_, String>(0)
                        .unwrap_or_else(|_| crate::store::keys::UNREADABLE_KID.to_string());
                    (kid, self.key_from_row(r))
                })
                .collect())
        })
    }

    fn get_key(&self, kid: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.read(|c| {
            let row = c
                .query_typed_opt(
                    &format!("SELECT {KEY_COLUMNS} FROM escrow_keys WHERE kid = $1"),
                    &[(&kid, Type::TEXT)],
                )
                .map_err(|e| self.pg_err(e))?;
            row.map(|r| self.key_from_row(&r)).transpose()
        })
    }

    fn mark_destroyed(
        &self,
        kid: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<(), StoreError> {
        let changed = self.with_tx(|tx| self.mark_destroyed_in(tx, kid, at, reason))?;
        if !changed && self.get_key(kid)?.is_none() {
            return Err(StoreError::UnknownKid(kid.to_string()));
        }
        Ok(())
    }
}

// ---- warrants -------------------------------------------------------------

impl PgStore {
    /// Deletes the reservation's row and spends `opened`, refusing in SQL to
    /// pass `max_unwraps` (`lavd_settle`, migrations 3 and 4). A row
    /// already gone means its lease expired and another reservation may
    /// hold those units now: only units no live reservation holds are then
    /// spent, and when they do not suffice, nothing is spent and
    /// `Settled::Lapsed` comes back (the reservation's row, if it was still
    /// there, is deleted all the same).
    /// With `check_revoked`, a warrant revoked by now spends nothing, and
    /// `Settled::Revoked` comes back.
    /// The reservation `function` answered (`r_status, r_granted, r_token,
    /// r_intent`) for `n` envelopes of warrant `id`; `with_intent`: an
    /// intent row comes with every grant, and none without one.
    fn reservation_of(
        &self,
        row: &postgres::Row,
        id: &str,
        n: u64,
        function: &str,
        with_intent: bool,
    ) -> Result<Reservation, StoreError> {
        let status: &str = row.try_get(0).map_err(|e| self.pg_err(e))?;
        match status {
            "ok" => {}
            "unknown" => return Err(StoreError::UnknownWarrant(id.to_string())),
            "revoked" => return Err(StoreError::WarrantRevoked(id.to_string())),
            // Its nonce was cancelled first: only a statement whose answer
            // this process already gave up on can see it.
            "cancelled" => {
                return Err(StoreError::Unavailable {
                    store: self.describe.clone(),
                    reason: format!("{function}: the reservation was cancelled"),
                })
            }
            other => return Err(self.corrupt(format!("{function} returned {other:?}"))),
        }
        let granted: i64 = row.try_get(1).map_err(|e| self.pg_err(e))?;
        let token: Option<i64> = row.try_get(2).map_err(|e| self.pg_err(e))?;
        let intent: Option<i64> = row.try_get(3).map_err(|e| self.pg_err(e))?;
        let granted = self.to_u64(granted, "granted")?;
        let intent_as_granted = (granted > 0 && with_intent) == intent.is_some();
        if granted > n || (granted > 0) != token.is_some() || !intent_as_granted {
            return Err(self.corrupt(format!(
                "{function} granted {granted} of {n} with token {token:?} and intent {intent:?}"
            )));
        }
        Ok(Reservation::new(id, n, granted, token).with_intent(intent))
    }

    fn settle_in(
        &self,
        tx: &mut impl GenericClient,
        reservation: &Reservation,
        opened: u64,
        check_revoked: bool,
    ) -> Result<Settled, StoreError> {
        if opened > reservation.granted() {
            return Err(StoreError::SettleExceedsReservation {
                granted: reservation.granted(),
                opened,
            });
        }
        let opened = to_i64(opened, "opened")?;
        // With an intent, `lavd_settle_intent` deletes it too, in the same
        // round trip; gone already if a sweep took it as an orphan (this
        // request outlived its lease): then nothing is spent ("swept").
        let status: String = match reservation.intent() {
            None => tx.query_typed_one(
                "SELECT lavd_settle($1, $2, $3, $4)",
                &[
                    (&reservation.id(), Type::TEXT),
                    (&reservation.token(), Type::INT8),
                    (&opened, Type::INT8),
                    (&check_revoked, Type::BOOL),
                ],
            ),
            Some(intent) => tx.query_typed_one(
                "SELECT lavd_settle_intent($1, $2, $3, $4, $5)",
                &[
                    (&reservation.id(), Type::TEXT),
                    (&reservation.token(), Type::INT8),
                    (&opened, Type::INT8),
                    (&check_revoked, Type::BOOL),
                    (&intent, Type::INT8),
                ],
            ),
        }
        .and_then(|r| r.try_get(0))
        .map_err(|e| self.pg_err(e))?;
        match status.as_str() {
            "ok" => Ok(Settled::Spent),
            "revoked" if check_revoked => Ok(Settled::Revoked),
            "overrun" => Ok(Settled::Lapsed),
            "swept" if reservation.intent().is_some() => Ok(Settled::Swept),
            other => Err(self.corrupt(format!("lavd_settle returned {other:?}"))),
        }
    }

    /// Undoes the reservation made with `nonce`, if one was made, and makes
    /// sure none is made with it later (`lavd_cancel_reservation`, migration
    /// 9), on another connection (waiting at most a second for the pool,
    /// then as long as the pool's connect and statement timeouts allow),
    /// tried twice: a pooled connection may have died with the first.
    /// Best effort, logged: when the server cannot be reached, the lease
    /// frees the units and a sweep writes the intent, as before.
    fn cancel_reservation(&self, id: &str, nonce: &[u8]) {
        let lease = self.lease_secs();
        let attempt = || {
            self.pool
                .get_within(Duration::from_secs(1))
                .and_then(|mut conn| {
                    let (rows, warned) = warned_during(|| {
                        conn.query_typed_one(
                            "SELECT lavd_cancel_reservation($1, $2, $3)",
                            &[
                                (&id, Type::TEXT),
                                (&nonce, Type::BYTEA),
                                (&lease, Type::FLOAT8),
                            ],
                        )
                        .and_then(|r| r.try_get::<_, i64>(0))
                        .map_err(|e| self.pg_err(e))
                    });
                    let rows = rows?;
                    if warned {
                        self.barrier_on(&mut conn)?;
                    }
                    Ok(rows)
                })
        };
        let cancelled = match attempt() {
            Err(e) if server_lost(&e) => attempt(),
            other => other,
        };
        match cancelled {
            Ok(rows) => tracing::warn!(
                warrant = id,
                rows,
                "a reservation whose answer was lost is cancelled (its units and open intent, if \
                 it was made)"
            ),
            Err(e) => tracing::warn!(
                warrant = id,
                error = %e,
                "a reservation whose answer was lost could not be cancelled: its units stay \
                 held until its lease ends, and its open intent is then logged open_interrupted"
            ),
        }
    }

    /// Frees a reservation whose settle failed. Best effort: the lease frees
    /// it anyway.
    fn give_back(&self, reservation: &Reservation) {
        self.give_back_all(reservation.token());
    }

    /// Frees the reservations of settles that failed, in one statement on
    /// one connection (one round trip, not one for each: a failed group's
    /// leader would hold every other append back for all of them). Best
    /// effort: the lease frees them anyway.
    fn give_back_all(&self, tokens: impl IntoIterator<Item = i64>) {
        let tokens: Vec<i64> = tokens.into_iter().collect();
        if tokens.is_empty() {
            return;
        }
        if let Ok(mut conn) = self.pool.get() {
            let _ = conn.execute_typed(
                "DELETE FROM warrant_reservations WHERE token = ANY($1)",
                &[(&tokens, Type::INT8_ARRAY)],
            );
        }
    }

    fn revoke_in(
        &self,
        tx: &mut impl GenericClient,
        revocation: &Revocation,
    ) -> Result<RevokeFound, StoreError> {
        let seen: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM warrants WHERE id = $1)",
                &[&revocation.id],
            )
            .map_err(|e| self.pg_err(e))?
            .get(0);
        let inserted = tx
            .execute(
                "INSERT INTO warrant_revocations (id, reason, revoked_by, revoked_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                &[
                    &revocation.id,
                    &revocation.reason,
                    &revocation.revoked_by,
                    &format_time(revocation.revoked_at),
                ],
            )
            .map_err(|e| self.pg_err(e))?;
        Ok(RevokeFound {
            newly_revoked: inserted == 1,
            warrant_seen: seen,
        })
    }
}

impl WarrantStore for PgStore {
    fn register(&self, record: &WarrantRecord) -> Result<Registration, StoreError> {
        let max = to_i64(record.max_unwraps, "max_unwraps")?;
        let payload = record.payload_digest.as_slice();
        let normalized = record.normalized_digest.as_slice();
        let seen = format_time(record.seen_at);
        // First seen (the primary key decides between racing replicas), then
        // the one-way urgent → full update: `lavd_register`, migration 3.
        let row = self.with_retries(|c| {
            c.query_typed_one(
                "SELECT r_outcome, r_payload, r_normalized, r_emergency, r_max
                 FROM lavd_register($1, $2, $3, $4, $5, $6)",
                &[
                    (&record.id, Type::TEXT),
                    (&payload, Type::BYTEA),
                    (&normalized, Type::BYTEA),
                    (&record.emergency, Type::BOOL),
                    (&max, Type::INT8),
                    (&seen, Type::TEXT),
                ],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        let outcome: &str = row.try_get(0).map_err(|e| self.pg_err(e))?;
        match outcome {
            "new" => return Ok(Registration::New),
            "upgraded" => return Ok(Registration::Upgraded),
            "known" => {}
            other => return Err(self.corrupt(format!("lavd_register returned {other:?}"))),
        }
        // The row can change only by the one-way urgent → full update, so
        // this classifies against its final state.
        let stored_payload = self.digest(
            row.try_get(1).map_err(|e| self.pg_err(e))?,
            "payload_digest",
        )?;
        let stored_normalized = self.digest(
            row.try_get(2).map_err(|e| self.pg_err(e))?,
            "normalized_digest",
        )?;
        let emergency: bool = row.try_get(3).map_err(|e| self.pg_err(e))?;
        let stored_max: i64 = row.try_get(4).map_err(|e| self.pg_err(e))?;
        if stored_payload == record.payload_digest {
            Ok(Registration::Known)
        } else if stored_normalized != record.normalized_digest || stored_max != max {
            Err(StoreError::WarrantIdConflict(record.id.clone()))
        } else if !emergency && record.emergency {
            Err(StoreError::EmergencySuperseded(record.id.clone()))
        } else {
            Err(StoreError::WarrantIdConflict(record.id.clone()))
        }
    }

    fn reserve(&self, id: &str, n: u64) -> Result<Reservation, StoreError> {
        let lease = self.lease_secs();
        let wanted = to_i64(n, "envelopes")?;
        // Under the warrant's row lock: revocation, expired leases dropped,
        // what is left granted (`lavd_reserve`, migration 3).
        let row = self.with_retries(|c| {
            c.query_typed_one(
                "SELECT r_status, r_granted, r_token, NULL::BIGINT FROM lavd_reserve($1, $2, $3)",
                &[
                    (&id, Type::TEXT),
                    (&wanted, Type::INT8),
                    (&lease, Type::FLOAT8),
                ],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        self.reservation_of(&row, id, n, "lavd_reserve", false)
    }

    fn reserve_with_intent(&self, id: &str, intent: &[Vec<u8>]) -> Result<Reservation, StoreError> {
        let lease = self.lease_secs();
        let mut nonce = [0u8; 16];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| {
            StoreError::CommitFailed("the system's random number generator failed".into())
        })?;
        let nonce = nonce.as_slice();
        // Whether the last attempt's statement may have reached the server
        // (a connection was had, and no error said it rolled back): before
        // that, there is nothing to cancel.
        let sent = std::cell::Cell::new(false);
        // `lavd_reserve`, and the intent in the same transaction
        // (`lavd_reserve_intent`, migrations 6 and 9).
        let row = self.with_retries(|c| {
            sent.set(true);
            let row = c
                .query_typed_one(
                    "SELECT r_status, r_granted, r_token, r_intent \
                     FROM lavd_reserve_intent($1, $2, $3, $4)",
                    &[
                        (&id, Type::TEXT),
                        (&lease, Type::FLOAT8),
                        (&intent, Type::BYTEA_ARRAY),
                        (&nonce, Type::BYTEA),
                    ],
                )
                .map_err(|e| self.pg_err(e));
            // A serialization failure or a deadlock rolled it back: nothing
            // of this attempt is left to cancel, should the next one fail
            // to get a connection.
            if row.as_ref().is_err_and(retryable) {
                sent.set(false);
            }
            row
        });
        match row {
            Ok(row) => {
                self.reservation_of(&row, id, intent.len() as u64, "lavd_reserve_intent", true)
            }
            Err(e) => {
                // It may have been made all the same (its answer lost with
                // the connection): undone from another connection, else the
                // lease frees it and a sweep writes its intent. Not after a
                // commit answered with a WARNING whose barrier failed: the
                // cancel's own commit would wait on the same standbys.
                if sent.get() && server_lost(&e) {
                    self.cancel_reservation(id, nonce);
                }
                Err(e)
            }
        }
    }

    fn settle(&self, reservation: Reservation, opened: u64) -> Result<(), StoreError> {
        let result = self.with_tx(
            |tx| match self.settle_in(tx, &reservation, opened, false)? {
                Settled::Lapsed => Err(StoreError::BudgetOverrun(reservation.id().to_string())),
                Settled::Spent | Settled::Revoked => Ok(()),
                // Its intent's leaves say nothing was released; nothing was
                // spent. Opens to spend for are then an error, as a lapse.
                Settled::Swept if opened == 0 => Ok(()),
                Settled::Swept => Err(StoreError::IntentSettled(
                    reservation.intent().unwrap_or_default(),
                )),
            },
        );
        if result.is_err() {
            self.give_back(&reservation);
        }
        result
    }

    fn revoke(&self, revocation: &Revocation) -> Result<bool, StoreError> {
        self.with_tx(|tx| self.revoke_in(tx, revocation))
            .map(|found| found.newly_revoked)
    }

    fn revocation(&self, id: &str) -> Result<Option<Revocation>, StoreError> {
        let row = self.read(|c| {
            c.query_typed_opt(
                "SELECT reason, revoked_by, revoked_at FROM warrant_revocations WHERE id = $1",
                &[(&id, Type::TEXT)],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        row.map(|row| {
            let at: String = row.try_get(2).map_err(|e| self.pg_err(e))?;
            Ok(Revocation {
                id: id.to_string(),
                reason: row.try_get(0).map_err(|e| self.pg_err(e))?,
                revoked_by: row.try_get(1).map_err(|e| self.pg_err(e))?,
                revoked_at: parse_time(&at)
                    .map_err(|_| self.corrupt("warrant_revocations.revoked_at"))?,
            })
        })
        .transpose()
    }

    fn spent(&self, id: &str) -> Result<Option<u64>, StoreError> {
        let spent: Option<i64> = self.read(|c| {
            c.query_typed_opt(
                "SELECT spent FROM warrants WHERE id = $1",
                &[(&id, Type::TEXT)],
            )
            .map_err(|e| self.pg_err(e))?
            .map(|r| r.try_get(0).map_err(|e| self.pg_err(e)))
            .transpose()
        })?;
        spent.map(|s| self.to_u64(s, "spent")).transpose()
    }
}

// ---- audit ----------------------------------------------------------------

/// Complete-subtree hashes read through a client or a transaction (which
/// then sees its own earlier batches' nodes).
struct PgNodes<'a, C> {
    client: RefCell<&'a mut C>,
    store: &'a PgStore,
    /// The first statement that failed. Inside a transaction PostgreSQL has
    /// then aborted it, and it answers a later COMMIT with a rollback, not
    /// an error: a caller that went on after such a read must not commit.
    failed: RefCell<Option<String>>,
}

impl<'a, C: GenericClient> PgNodes<'a, C> {
    fn new(client: &'a mut C, store: &'a PgStore) -> Self {
        PgNodes {
            client: RefCell::new(client),
            store,
            failed: RefCell::new(None),
        }
    }

    fn sql_err(&self, e: postgres::Error) -> StoreError {
        let e = self.store.pg_err(e);
        self.failed
            .borrow_mut()
            .get_or_insert_with(|| e.to_string());
        e
    }
}

impl<C: GenericClient> HashReader for PgNodes<'_, C> {
    type Error = StoreError;

    fn subtree(&self, level: u8, index: u64) -> Result<Hash, StoreError> {
        let idx = i64::try_from(index).map_err(|_| StoreError::OutOfRange("audit index"))?;
        let row = self
            .client
            .borrow_mut()
            .query_typed_opt(
                "SELECT hash FROM audit_nodes WHERE level = $1 AND idx = $2",
                &[(&i16::from(level), Type::INT2), (&idx, Type::INT8)],
            )
            .map_err(|e| self.sql_err(e))?;
        let hash: Vec<u8> = row
            .ok_or_else(|| {
                self.store
                    .corrupt(format!("audit_nodes ({level}, {index}) is missing"))
            })?
            .try_get(0)
            .map_err(|e| self.store.pg_err(e))?;
        hash.try_into().map_err(|_| {
            self.store
                .corrupt(format!("audit_nodes ({level}, {index}) is not 32 bytes"))
        })
    }

    /// One query for all of `wanted`. A row that is missing or not 32 bytes
    /// is left out: [`Self::subtree`] then reads it again and names it.
    fn fetch(&self, wanted: &[NodeId]) -> Result<Vec<(NodeId, Hash)>, StoreError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let levels: Vec<i16> = wanted.iter().map(|&(level, _)| i16::from(level)).collect();
        let idxs = wanted
            .iter()
            .map(|&(_, index)| i64::try_from(index))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| StoreError::OutOfRange("audit index"))?;
        let rows = self
            .client
            .borrow_mut()
            .query_typed(
                "SELECT n.level, n.idx, n.hash
                 FROM UNNEST($1::SMALLINT[], $2::BIGINT[]) AS w (level, idx)
                 JOIN audit_nodes n ON n.level = w.level AND n.idx = w.idx",
                &[(&levels, Type::INT2_ARRAY), (&idxs, Type::INT8_ARRAY)],
            )
            .map_err(|e| self.sql_err(e))?;
        let mut found = Vec::with_capacity(rows.len());
        for row in rows {
            let level: i16 = row.try_get(0).map_err(|e| self.store.pg_err(e))?;
            let idx: i64 = row.try_get(1).map_err(|e| self.store.pg_err(e))?;
            let hash: Vec<u8> = row.try_get(2).map_err(|e| self.store.pg_err(e))?;
            if let (Ok(level), Ok(idx), Ok(hash)) = (
                u8::try_from(level),
                u64::try_from(idx),
                Hash::try_from(hash),
            ) {
                found.push(((level, idx), hash));
            }
        }
        Ok(found)
    }
}

impl PgStore {
    fn size_in(&self, c: &mut impl GenericClient, lock: bool) -> Result<u64, StoreError> {
        let sql = if lock {
            "SELECT size FROM audit_head WHERE id = 1 FOR UPDATE"
        } else {
            "SELECT size FROM audit_head WHERE id = 1"
        };
        let size: i64 = c
            .query_typed_opt(sql, &[])
            .map_err(|e| self.pg_err(e))?
            .ok_or_else(|| self.corrupt("audit_head has no row"))?
            .try_get(0)
            .map_err(|e| self.pg_err(e))?;
        self.to_u64(size, "audit_head.size")
    }

    fn tree_err(e: TreeError<StoreError>) -> StoreError {
        tree_error(e)
    }

    /// Appends one batch inside `tx` (the group's transaction, which holds
    /// the head lock, with the batch's savepoint open), its head update
    /// included, and `mark` under its first leaf's index when given (the
    /// group's first batch that writes leaves: [`Xact::mark`]). Returns what
    /// a revocation found, what a settlement found withdrawn, and the hash
    /// of the batch's first leaf.
    fn append_in(
        &self,
        tx: &mut Transaction<'_>,
        batch: &AuditAppend,
        first: u64,
        mark: Option<&[u8]>,
    ) -> Result<(RevokeFound, Withdrawn, Option<Hash>), StoreError> {
        // As in SQLite: the revocation and destruction checks that count
        // are these, under the head lock that every revocation's and
        // destruction's append also takes.
        let mut withdrawn = Withdrawn::default();
        let mut settled = None;
        let found = match &batch.spend {
            Spend::None => RevokeFound::default(),
            Spend::Settle {
                reservation,
                opened,
            } => {
                let kids = opened_kids(batch, reservation.id());
                withdrawn.destroyed_kids = self.destroyed_among(tx, &kids)?;
                let spend = spendable(*opened, &kids, &withdrawn.destroyed_kids);
                match self.settle_in(tx, reservation, spend, true)? {
                    Settled::Spent => {}
                    Settled::Revoked => withdrawn.revoked = true,
                    // The HSM has opened; the leaves are written all the
                    // same (as denied), so that no open goes unlogged.
                    Settled::Lapsed => withdrawn.budget_lapsed = true,
                    // Its intent's leaves already say nothing was
                    // released: these say so too (`audit_commit_failed`).
                    Settled::Swept => withdrawn.intent_swept = true,
                }
                settled = Some(reservation.id());
                RevokeFound::default()
            }
            Spend::Revoke(revocation) => self.revoke_in(tx, revocation)?,
            Spend::InsertKey(record) => {
                self.insert_key_in(tx, record)?;
                RevokeFound::default()
            }
            Spend::DestroyKey { kid, at, reason } => {
                // One `key_destroyed` leaf per key: a second destruction
                // that raced the first (on another replica) fails alone.
                if !self.mark_destroyed_in(tx, kid, *at, reason)? {
                    return Err(StoreError::KeyAlreadyDestroyed(kid.clone()));
                }
                RevokeFound::default()
            }
            Spend::ClearIntent(id) => {
                let deleted = tx
                    .execute_typed(
                        "DELETE FROM open_intents WHERE id = $1",
                        &[(id, Type::INT8)],
                    )
                    .map_err(|e| self.pg_err(e))?;
                if deleted != 1 {
                    return Err(StoreError::IntentSettled(*id));
                }
                RevokeFound::default()
            }
        };
        let (leaves, hashes) = encode_leaves(batch, first, settled.map(|id| (id, &withdrawn)))?;
        self.write_leaves(
            tx,
            first,
            &leaves,
            &hashes,
            Some(first + batch.events.len() as u64),
            mark,
        )?;
        Ok((found, withdrawn, hashes.first().copied()))
    }

    /// Writes leaves `first..` (hashed as `hashes`), the subtree hashes
    /// they complete, with `head` the head's new size, and with `mark` the
    /// transaction's mark under index `first` (those more than
    /// [`MARKS_KEPT`] leaves back deleted), in one statement after at most
    /// one read (of the earlier subtrees, through `tx`).
    fn write_leaves(
        &self,
        tx: &mut Transaction<'_>,
        first: u64,
        leaves: &[Vec<u8>],
        hashes: &[Hash],
        head: Option<u64>,
        mark: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let index = |i: u64| i64::try_from(i).map_err(|_| StoreError::OutOfRange("audit index"));
        let nodes = {
            let reader = PgNodes::new(&mut *tx, self);
            merkle::fetch_ahead(&reader, |r| merkle::appended_nodes_batch(first, hashes, r))
                .map_err(Self::tree_err)?
        };
        let indices = (first..first + leaves.len() as u64)
            .map(index)
            .collect::<Result<Vec<_>, _>>()?;
        let mut levels = Vec::with_capacity(nodes.len());
        let mut idxs = Vec::with_capacity(nodes.len());
        let mut node_hashes = Vec::with_capacity(nodes.len());
        for node in nodes {
            levels.push(i16::from(node.level));
            idxs.push(index(node.index)?);
            node_hashes.push(node.hash.to_vec());
        }
        let head = head
            .map(|size| i64::try_from(size).map_err(|_| StoreError::OutOfRange("tree size")))
            .transpose()?;
        let first = index(first)?;
        // No mark without a leaf to file it under.
        let mark = mark.filter(|_| !leaves.is_empty());
        // Data-modifying CTEs run to completion whether or not the outer
        // statement reads them.
        tx.execute_typed(
            "WITH leaves AS (
                 INSERT INTO audit_leaves (idx, leaf)
                 SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[])
             ), head AS (
                 UPDATE audit_head SET size = $6 WHERE id = 1 AND $6 IS NOT NULL
             ), mark AS (
                 INSERT INTO audit_commit_marks (first_index, mark)
                 SELECT $7, $8 WHERE $8 IS NOT NULL
             ), old_marks AS (
                 DELETE FROM audit_commit_marks
                 WHERE $8 IS NOT NULL AND first_index < $7 - $9
             )
             INSERT INTO audit_nodes (level, idx, hash)
             SELECT * FROM UNNEST($3::SMALLINT[], $4::BIGINT[], $5::BYTEA[])",
            &[
                (&indices, Type::INT8_ARRAY),
                (&leaves, Type::BYTEA_ARRAY),
                (&levels, Type::INT2_ARRAY),
                (&idxs, Type::INT8_ARRAY),
                (&node_hashes, Type::BYTEA_ARRAY),
                (&head, Type::INT8),
                (&first, Type::INT8),
                (&mark, Type::BYTEA),
                (&MARKS_KEPT, Type::INT8),
            ],
        )
        .map_err(|e| self.pg_err(e))?;
        Ok(())
    }

    /// One attempt at committing a group: the head locked, every batch in
    /// its own savepoint (each batch's write also advances the head, so a
    /// batch rolled back takes its advance with it), `before_commit`
    /// called, one commit. `Err` means nothing committed.
    ///
    /// Round trips for a group of one batch: BEGIN; the head lock and the
    /// savepoint; the batch's spend; its leaves, nodes, head and the
    /// group's mark (one more before it when a new node needs an earlier
    /// subtree); whatever the hook reads; COMMIT.
    fn try_group(
        &self,
        group: &[Pending],
        before_commit: &mut BeforeCommit<'_>,
    ) -> Result<(u64, Vec<Result<Appended, StoreError>>), StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction().map_err(|e| self.pg_err(e))?;
        let (mut size, mut xact) = self.lock_head_with_savepoint(&mut tx)?;
        let mut results = Vec::with_capacity(group.len());
        for (i, pending) in group.iter().enumerate() {
            let batch = pending.batch();
            let first = size;
            let count = batch.events.len() as u64;
            let last = i + 1 == group.len();
            // The mark rides with the first batch that writes leaves.
            let mark = xact.first_leaf.is_none().then_some(xact.mark);
            match self.append_in(&mut tx, batch, first, mark.as_ref().map(|m| m.as_slice())) {
                Ok((found, withdrawn, first_leaf)) => {
                    if let (None, Some(hash)) = (&xact.first_leaf, first_leaf) {
                        xact.first_leaf = Some((first, hash));
                    }
                    size += count;
                    results.push(Ok(Appended {
                        first_index: first,
                        count,
                        tree_size: 0,
                        newly_revoked: found.newly_revoked,
                        warrant_seen: found.warrant_seen,
                        withdrawn,
                    }));
                    // COMMIT keeps the last batch's savepoint's work.
                    if !last {
                        tx.batch_execute("RELEASE SAVEPOINT batch; SAVEPOINT batch")
                            .map_err(|e| self.pg_err(e))?;
                    }
                }
                // The whole group is run again.
                Err(e) if retryable(&e) => return Err(e),
                Err(e) => {
                    results.push(Err(e));
                    // The savepoint stays, for the next batch.
                    tx.batch_execute("ROLLBACK TO SAVEPOINT batch")
                        .map_err(|e| self.pg_err(e))?;
                }
            }
        }
        // The head lock is still held: the tree the hook sees is the one
        // this COMMIT makes, whatever other replicas append.
        let nodes = PgNodes::new(&mut tx, self);
        before_commit(&Uncommitted {
            size,
            nodes: &nodes,
            queued: self.group.queued(),
        });
        // The hook's own reads may fail (and it goes on: a checkpoint can
        // be signed after the commit). One that failed aborted the
        // transaction, and COMMIT would then roll it back, reporting
        // success: the appends would be answered `Ok` unwritten.
        if let Some(failed) = nodes.failed.into_inner() {
            return Err(StoreError::CommitFailed(format!(
                "a read inside the append transaction failed, so PostgreSQL aborted it: {failed}"
            )));
        }
        let (committed, warned) = warned_during(|| tx.commit());
        // A COMMIT answered with a WARNING: PostgreSQL says so when a wait
        // for the synchronous standbys was cancelled (`pg_cancel_backend`,
        // which any session of lavd's role may send): committed on this
        // server, perhaps on no standby, though the answer is success. The
        // leaves are acknowledged (and keys released) only once a barrier
        // on the same server shows them replicated.
        let committed = match committed {
            Ok(()) if warned => {
                tracing::warn!(
                    xid = %xact.xid,
                    "the audit COMMIT was answered with a warning (a wait for the synchronous \
                     standbys cancelled?): waiting for a barrier before anything is released"
                );
                match self.barrier_on(&mut conn) {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        conn.discard();
                        return Err(StoreError::CommitUnknown(format!(
                            "committed with a warning (a wait for the synchronous standbys \
                             cancelled?), and not known to be on them: {e}"
                        )));
                    }
                }
            }
            other => other,
        };
        // The connection given back, or after a failed COMMIT closed and
        // counted out (it may be dead, or the server going away, before
        // the client knows), before one is asked for to read the COMMIT's
        // fate: a full pool (`pool_size = 1`) would otherwise wait for it,
        // and answer that fate unknown.
        // Kept only after an ordinary ERROR (a serialization failure, to be
        // retried): the session stays. A FATAL or PANIC ends it, though the
        // client may not know yet.
        // (A server that sends no parsed severity, older than 9.6: a
        // serialization failure or deadlock, class 40, is taken as one.)
        let ordinary = |e: &postgres::Error| match e
            .as_db_error()
            .map(|d| (d.parsed_severity(), d.code().code()))
        {
            Some((Some(severity), _)) => severity == postgres::error::Severity::Error,
            Some((None, code)) => code.starts_with("40"),
            None => false,
        };
        match &committed {
            Err(e) if e.is_closed() || !ordinary(e) => conn.discard(),
            _ => drop(conn),
        }
        match committed {
            Ok(()) => Ok((size, results)),
            // The server answered with an error of the statement: the
            // transaction is rolled back.
            Err(e)
                if !commit_fate_unknown(
                    e.as_db_error().and_then(|d| d.parsed_severity()),
                    e.code().map(SqlState::code),
                ) =>
            {
                Err(self.pg_err(e))
            }
            // No answer (the connection died with the COMMIT in flight), or
            // the server going down or away as it answered: whether it
            // committed is for the database to say.
            Err(e) => match self.commit_outcome(&xact) {
                Ok(true) => {
                    tracing::warn!(error = %crate::store::postgres_text(&e), xid = %xact.xid, "the connection died with the audit COMMIT in flight; PostgreSQL says it committed");
                    Ok((size, results))
                }
                Ok(false) => Err(self.pg_err(e)),
                Err(unknown) => Err(unknown),
            },
        }
    }

    /// Locks the head row, returns its size and the transaction's id and
    /// backend, and opens the savepoint `batch`: one round trip (the
    /// simple-query protocol takes several statements).
    fn lock_head_with_savepoint(
        &self,
        tx: &mut Transaction<'_>,
    ) -> Result<(u64, Xact), StoreError> {
        let messages = tx
            .simple_query(concat!(
                "SELECT size, pg_current_xact_id()::text, pg_backend_pid(), ",
                server_started!(),
                " FROM audit_head WHERE id = 1 FOR UPDATE; SAVEPOINT batch",
            ))
            .map_err(|e| self.pg_err(e))?;
        let row = messages
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .ok_or_else(|| self.corrupt("audit_head has no row"))?;
        let text = |i: usize, what: &str| {
            row.get(i)
                .ok_or_else(|| self.corrupt(format!("{what} is NULL")))
        };
        let size = text(0, "audit_head.size")?;
        let size: i64 = size
            .parse()
            .map_err(|_| self.corrupt(format!("audit_head.size is {size:?}")))?;
        let xid = text(1, "pg_current_xact_id()")?.to_string();
        let pid = text(2, "pg_backend_pid()")?;
        let pid: i32 = pid
            .parse()
            .map_err(|_| self.corrupt(format!("pg_backend_pid() is {pid:?}")))?;
        let server = text(3, "pg_postmaster_start_time()")?.to_string();
        let mut mark = [0u8; 16];
        aws_lc_rs::rand::fill(&mut mark).map_err(|_| {
            StoreError::CommitFailed("the system's random number generator failed".into())
        })?;
        Ok((
            self.to_u64(size, "audit_head.size")?,
            Xact {
                xid,
                pid,
                server,
                first_leaf: None,
                mark,
            },
        ))
    }

    /// Whether the transaction `xact`, whose COMMIT got no answer, committed.
    ///
    /// Asked on another connection, in two steps:
    /// - **Until it is over.** While the same server process runs (its
    ///   `pg_postmaster_start_time` unchanged: neither restarted nor failed
    ///   over, so the transaction id still names this transaction),
    ///   `pg_xact_status` is asked while it says "in progress" (the COMMIT
    ///   still running, or waiting for a synchronous standby), for up to the
    ///   statement timeout. Then its backend is ended. Ending it cancels a
    ///   wait for a synchronous standby, after which PostgreSQL keeps the
    ///   commit locally only: so once lavd has ended it, "committed" counts
    ///   as unknown.
    /// - **What is stored.** A transaction that is over committed if and
    ///   only if its mark (random, migration 7) is stored under its first
    ///   leaf's index, with that leaf. After a restart or failover only this
    ///   is asked: the transaction id may since have been given to another
    ///   transaction, and the server that ran it is gone. Not the leaf's
    ///   bytes alone: another writer's first leaf at that index may be the
    ///   same bytes (the same refusal, in the same second), and the group
    ///   would be answered written with its other leaves missing.
    ///
    /// # Errors
    /// [`StoreError::CommitUnknown`] when no connection can read it, it
    /// stays in progress, the status and the log disagree, or lavd ended it
    /// while it waited: the batch may or may not be durable, and nothing of
    /// it may be released.
    fn commit_outcome(&self, xact: &Xact) -> Result<bool, StoreError> {
        let unknown = |why: String| {
            StoreError::CommitUnknown(format!(
                "transaction {} (backend {}): {why}",
                xact.xid, xact.pid
            ))
        };
        let mut conn = self
            .pool
            .get()
            .map_err(|e| unknown(format!("no connection to read its fate: {e}")))?;
        let deadline = std::time::Instant::now() + self.statement_timeout;
        let mut ended = false;
        let status = loop {
            let row = conn
                .query_one(
                    concat!(
                        "SELECT ",
                        server_started!(),
                        " = $1, CASE WHEN ",
                        server_started!(),
                        " = $1 THEN pg_xact_status($2::text::xid8) END, pg_is_in_recovery()",
                    ),
                    &[&xact.server, &xact.xid],
                )
                .map_err(|e| {
                    unknown(format!(
                        "cannot read its status: {}",
                        crate::store::postgres_text(&e)
                    ))
                })?;
            let same_server: bool = row.get(0);
            let status: Option<String> = row.get(1);
            // A standby (the URL moved to one before it was promoted, or a
            // rewound old primary): it may not have replayed the commit
            // yet, so its log cannot say the commit did not happen. Asked
            // on every read: the connection may have been one since.
            if row.get::<_, bool>(2) {
                return Err(unknown(
                    "the server reached is a standby in recovery: it may not have replayed the \
                     commit yet"
                        .into(),
                ));
            }
            match status.as_deref() {
                _ if !same_server => break None,
                Some("in progress") if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Some("in progress") if !ended => {
                    conn.query_one("SELECT pg_terminate_backend($1)", &[&xact.pid])
                        .map_err(|e| {
                            unknown(format!(
                                "cannot end its backend: {}",
                                crate::store::postgres_text(&e)
                            ))
                        })?;
                    ended = true;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Some("in progress") => {
                    return Err(unknown(
                        "still in progress after its backend was ended".into(),
                    ))
                }
                other => break other.map(str::to_string),
            }
        };
        let stored = match xact.first_leaf {
            None => None,
            Some((index, hash)) => {
                let index =
                    i64::try_from(index).map_err(|_| StoreError::OutOfRange("audit index"))?;
                let row = conn
                    .query_one(
                        "SELECT (SELECT mark FROM audit_commit_marks WHERE first_index = $1), \
                                (SELECT leaf FROM audit_leaves WHERE idx = $1), \
                                (SELECT size FROM audit_head WHERE id = 1)",
                        &[&index],
                    )
                    .map_err(|e| {
                        unknown(format!(
                            "cannot read the log: {}",
                            crate::store::postgres_text(&e)
                        ))
                    })?;
                let mark: Option<Vec<u8>> = row.get(0);
                let leaf: Option<Vec<u8>> = row.get(1);
                let size: Option<i64> = row.get(2);
                match mark {
                    // This transaction's own: its first leaf is there too,
                    // or the store is not what this transaction left.
                    Some(mark) if mark == xact.mark => {
                        if leaf.is_none_or(|leaf| merkle::leaf_hash(&leaf) != hash) {
                            return Err(unknown(
                                "its mark is stored, but not its first leaf".into(),
                            ));
                        }
                        Some(true)
                    }
                    // Another transaction's leaves at that index, whatever
                    // their bytes.
                    Some(_) => Some(false),
                    // Deleted as too old, or never written.
                    None if size.is_none_or(|size| size.saturating_sub(index) > MARKS_KEPT) => {
                        return Err(unknown(format!(
                            "no mark at index {index}, and the log has {size:?} leaves: it \
                             may have been deleted as too old"
                        )))
                    }
                    None => Some(false),
                }
            }
        };
        match (status.as_deref(), stored) {
            (_, Some(true)) if ended => Err(unknown(
                "committed after lavd ended it, which cancels any wait for a synchronous \
                 standby: it may be on this server only"
                    .into(),
            )),
            // Committed, but perhaps never acknowledged: a wait for a
            // synchronous standby cancelled by someone else, or a commit a
            // crashed primary replayed. Released only once it is on the
            // standbys too.
            (Some("committed") | None, Some(true)) => {
                self.barrier_on(&mut conn).map(|_| true).map_err(|e| {
                    unknown(format!(
                        "committed, but not known to be on the synchronous standbys: {e}"
                    ))
                })
            }
            (Some("aborted") | None, Some(false)) => Ok(false),
            (Some("aborted"), None) => Ok(false),
            (status, stored) => Err(unknown(format!(
                "its status is {status:?} and its mark stored: {stored:?}"
            ))),
        }
    }

    /// A commit that the synchronous standbys must have flushed past every
    /// commit `c`'s server made before it ([`barrier!`]): it writes WAL
    /// only when standbys are named (PostgreSQL does not wait for a commit
    /// that wrote none, nor for a transaction that only took an id), to a
    /// row of this backend's own, so that no two callers wait on one lock.
    /// Returns the server it ran on ([`server_started!`]). Like any commit
    /// here, its wait for a standby is bounded only by the server
    /// (OPERATIONS §12).
    pub(super) fn barrier_on(&self, c: &mut postgres::Client) -> Result<String, StoreError> {
        // Typed, with no parameters: one round trip (no prepare).
        let (server, warned) = warned_during(|| {
            c.query_typed_one(barrier!(), &[])
                .and_then(|row| row.try_get(0))
                .map_err(|e| self.pg_err(e))
        });
        let server = server?;
        // Its own wait cancelled: it shows nothing replicated.
        if warned {
            return Err(StoreError::CommitUnknown(
                "the replication barrier's own commit was answered with a warning (its wait \
                 for the synchronous standbys cancelled?)"
                    .into(),
            ));
        }
        Ok(server)
    }

    fn commit_group(&self, group: Vec<Pending>, before_commit: &mut BeforeCommit<'_>) {
        let mut attempt = 0;
        let outcome = loop {
            match self.try_group(&group, before_commit) {
                Err(e) if retryable(&e) && attempt < MAX_RETRIES => {
                    attempt += 1;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                }
                other => break other,
            }
        };
        // Each batch's answer; the reservations of the settles that failed
        // are given back together (one round trip), before any is answered
        // (a caller that tries again must find its units free).
        // Without the server (a lost connection, none to be had), a
        // give-back would only wait for it again: the leases free the units.
        let (answers, reachable): (Vec<Result<Appended, StoreError>>, bool) = match outcome {
            Ok((size, results)) => {
                self.group.committed();
                let answers = results
                    .into_iter()
                    .map(|mut result| {
                        if let Ok(a) = result.as_mut() {
                            a.tree_size = size;
                        }
                        result
                    })
                    .collect();
                (answers, true)
            }
            Err(e) => {
                let unknown = matches!(e, StoreError::CommitUnknown(_));
                let reachable = !unknown && !server_lost(&e);
                let message = e.to_string();
                let answers = group
                    .iter()
                    .map(|_| {
                        Err(if unknown {
                            StoreError::CommitUnknown(message.clone())
                        } else {
                            StoreError::CommitFailed(message.clone())
                        })
                    })
                    .collect();
                (answers, reachable)
            }
        };
        if reachable {
            self.give_back_all(
                group
                    .iter()
                    .zip(&answers)
                    .filter(|(_, answer)| answer.is_err())
                    .filter_map(|(pending, _)| settled_reservation(&pending.batch().spend)),
            );
        }
        for (pending, answer) in group.into_iter().zip(answers) {
            pending.answer(answer);
        }
    }

    /// Runs `f` with a tree-reading client and the current tree size.
    fn with_tree<T>(
        &self,
        f: impl FnOnce(&PgNodes<'_, postgres::Client>, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.read(|c| {
            let tree = self.size_in(c, false)?;
            let reader = PgNodes::new(c, self);
            f(&reader, tree)
        })
    }
}

impl AuditStore for PgStore {
    fn append_with(
        &self,
        batch: AuditAppend,
        before_commit: &mut BeforeCommit<'_>,
    ) -> Result<Appended, StoreError> {
        self.group
            .submit(batch, |batches| self.commit_group(batches, before_commit))
    }

    fn tree_size(&self) -> Result<u64, StoreError> {
        self.read(|c| self.size_in(c, false))
    }

    fn root(&self, size: u64) -> Result<Hash, StoreError> {
        // Through no nodes: every node read from the store.
        self.root_through(size, 0, 0, &[])
    }

    fn root_through(
        &self,
        size: u64,
        level: u8,
        first: u64,
        nodes: &[Hash],
    ) -> Result<Hash, StoreError> {
        self.with_tree(|reader, tree| {
            if size > tree {
                return Err(StoreError::BadProofRequest(format!(
                    "size {size} exceeds the tree size {tree}"
                )));
            }
            // Which nodes `Through` reads depends only on indices: the
            // recording pass names them all, for one query.
            merkle::fetch_ahead(reader, |r| {
                let through = merkle::Through {
                    base: r,
                    level,
                    first,
                    hashes: nodes,
                };
                merkle::root(&through, size)
            })
            .map_err(Self::tree_err)
        })
    }

    fn leaves(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let to_i = |v: u64| i64::try_from(v).map_err(|_| StoreError::OutOfRange("audit index"));
        let (start, end) = (to_i(start)?, to_i(end)?);
        let rows = self.read(|c| {
            c.query(
                "SELECT idx, leaf FROM audit_leaves WHERE idx >= $1 AND idx < $2 ORDER BY idx",
                &[&start, &end],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        rows.iter()
            .map(|row| {
                let idx: i64 = row.try_get(0).map_err(|e| self.pg_err(e))?;
                let leaf: Vec<u8> = row.try_get(1).map_err(|e| self.pg_err(e))?;
                Ok((self.to_u64(idx, "audit index")?, leaf))
            })
            .collect()
    }

    fn reads_never_behind(&self) -> bool {
        false
    }

    fn leaves_vouched(&self, start: u64, end: u64) -> Result<(LeafRows, Vouched), StoreError> {
        let to_i = |v: u64| i64::try_from(v).map_err(|_| StoreError::OutOfRange("audit index"));
        let (start, end) = (to_i(start)?, to_i(end)?);
        // One statement, so one snapshot: the head and the leaves it
        // counts are written in one transaction, and a standby that has
        // not replayed it has neither.
        let rows = self.read(|c| {
            c.query(
                "SELECT h.size, l.idx, l.leaf FROM audit_head h \
                 LEFT JOIN audit_leaves l ON l.idx >= $1 AND l.idx < $2 \
                 WHERE h.id = 1 ORDER BY l.idx",
                &[&start, &end],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        self.vouched_rows(&rows)
    }

    fn node_rows_vouched(
        &self,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(NodeRows, Vouched), StoreError> {
        let to_i = |v: u64| i64::try_from(v).map_err(|_| StoreError::OutOfRange("audit index"));
        let (first, last) = (to_i(start)?, to_i(end)?);
        // One statement, so one snapshot, as for leaves: node rows are
        // written in the transaction that moves the head past them.
        let rows = self.read(|c| {
            c.query(
                "SELECT h.size, n.idx, n.hash FROM audit_head h \
                 LEFT JOIN audit_nodes n ON n.level = $1 AND n.idx >= $2 AND n.idx < $3 \
                 WHERE h.id = 1 ORDER BY n.idx",
                &[&i16::from(level), &first, &last],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        self.vouched_rows(&rows)
    }

    fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        self.with_tree(|reader, tree| {
            if size > tree || index >= size {
                return Err(StoreError::BadProofRequest(format!(
                    "need index < size <= {tree}, got index {index}, size {size}"
                )));
            }
            merkle::fetch_ahead(reader, |r| merkle::inclusion_proof(r, index, size))
                .map_err(Self::tree_err)
        })
    }

    fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, StoreError> {
        self.with_tree(|reader, tree| {
            if from > to || to > tree {
                return Err(StoreError::BadProofRequest(format!(
                    "need from <= to <= {tree}, got from {from}, to {to}"
                )));
            }
            merkle::fetch_ahead(reader, |r| merkle::consistency_proof(r, from, to))
                .map_err(Self::tree_err)
        })
    }

    fn save_checkpoint(&self, size: u64, note: &str, at: OffsetDateTime) -> Result<(), StoreError> {
        let size = i64::try_from(size).map_err(|_| StoreError::OutOfRange("tree size"))?;
        // Two replicas may sign the same size: with one key and one tree
        // their notes are identical (Ed25519 is deterministic), and the
        // first is kept. No WAL flush of its own: the next synchronous
        // commit flushes it (see the trait).
        // One call (`lavd_save_checkpoint`, migration 3), which sets
        // `synchronous_commit = off` for its own implicit transaction.
        self.with_retries(|c| {
            c.execute_typed(
                "SELECT lavd_save_checkpoint($1, $2, $3)",
                &[
                    (&size, Type::INT8),
                    (&note, Type::TEXT),
                    (&format_time(at), Type::TEXT),
                ],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        Ok(())
    }

    fn tree_size_on(&self) -> Result<(u64, Server), StoreError> {
        let row = self.read(|c| {
            c.query_typed_opt(
                concat!(
                    "SELECT size, ",
                    server_started!(),
                    " FROM audit_head WHERE id = 1"
                ),
                &[],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        let row = row.ok_or_else(|| self.corrupt("audit_head has no row"))?;
        let size: i64 = row.try_get(0).map_err(|e| self.pg_err(e))?;
        let started: String = row.try_get(1).map_err(|e| self.pg_err(e))?;
        Ok((
            self.to_u64(size, "audit_head.size")?,
            Server::started(started),
        ))
    }

    fn replicated(&self, read_on: &Server) -> Result<(), StoreError> {
        let now_on = self.with_retries(|c| self.barrier_on(c))?;
        if read_on.name() == Some(now_on.as_str()) {
            return Ok(());
        }
        Err(StoreError::Unavailable {
            store: self.describe.clone(),
            reason: format!(
                "the server changed (started at {}, now {now_on}: a failover or a \
                 restart) since the log was read; nothing is signed over what it read",
                read_on.name().unwrap_or("an unnamed server")
            ),
        })
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError> {
        let row = self.read(|c| {
            c.query_opt(
                "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                &[],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        row.map(|row| {
            let size: i64 = row.try_get(0).map_err(|e| self.pg_err(e))?;
            let note: String = row.try_get(1).map_err(|e| self.pg_err(e))?;
            Ok((self.to_u64(size, "checkpoint size")?, note))
        })
        .transpose()
    }

    fn checkpoints(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = self.read(|c| {
            c.query(
                "SELECT size, note FROM audit_checkpoints ORDER BY size",
                &[],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        rows.iter()
            .map(|row| {
                let size: i64 = row.try_get(0).map_err(|e| self.pg_err(e))?;
                let note: String = row.try_get(1).map_err(|e| self.pg_err(e))?;
                Ok((self.to_u64(size, "checkpoint size")?, note))
            })
            .collect()
    }

    fn save_cosignature(&self, c: &Cosignature) -> Result<(), StoreError> {
        let size = i64::try_from(c.size).map_err(|_| StoreError::OutOfRange("tree size"))?;
        // Two replicas may each store the same witness's cosignature of one
        // size: the first is kept.
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO audit_cosignatures (size, witness, line) VALUES ($1, $2, $3)
                 ON CONFLICT (size, witness) DO NOTHING",
                &[&size, &c.witness, &c.line],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        Ok(())
    }

    fn replace_cosignature(&self, c: &Cosignature, previous: &str) -> Result<bool, StoreError> {
        let size = i64::try_from(c.size).map_err(|_| StoreError::OutOfRange("tree size"))?;
        let changed = self.with_tx(|tx| {
            tx.execute(
                "UPDATE audit_cosignatures SET line = $3
                 WHERE size = $1 AND witness = $2 AND line = $4",
                &[&size, &c.witness, &c.line, &previous],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        Ok(changed == 1)
    }

    fn last_cosigned(&self, witness: &str) -> Result<Option<u64>, StoreError> {
        let size: Option<i64> = self.read(|c| {
            c.query_one(
                "SELECT MAX(size) FROM audit_cosignatures WHERE witness = $1",
                &[&witness],
            )
            .and_then(|r| r.try_get(0))
            .map_err(|e| self.pg_err(e))
        })?;
        size.map(|s| self.to_u64(s, "cosigned size")).transpose()
    }

    fn cosignatures(
        &self,
        sizes: std::ops::Range<u64>,
        limit: u64,
    ) -> Result<Vec<Cosignature>, StoreError> {
        let from = i64::try_from(sizes.start).map_err(|_| StoreError::OutOfRange("tree size"))?;
        // Every size a row can hold is below i64::MAX.
        let below = i64::try_from(sizes.end).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.read(|c| {
            c.query(
                "SELECT size, witness, line FROM audit_cosignatures WHERE size >= $1 AND size < $2
                 ORDER BY size DESC, witness LIMIT $3",
                &[&from, &below, &limit],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        rows.iter()
            .map(|row| {
                let size: i64 = row.try_get(0).map_err(|e| self.pg_err(e))?;
                Ok(Cosignature {
                    size: self.to_u64(size, "cosigned size")?,
                    witness: row.try_get(1).map_err(|e| self.pg_err(e))?,
                    line: row.try_get(2).map_err(|e| self.pg_err(e))?,
                })
            })
            .collect()
    }

    fn checkpoint_at(&self, size: u64) -> Result<Option<String>, StoreError> {
        let size = i64::try_from(size).map_err(|_| StoreError::OutOfRange("tree size"))?;
        let row = self.read(|c| {
            c.query_opt(
                "SELECT note FROM audit_checkpoints WHERE size = $1",
                &[&size],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        row.map(|r| r.try_get(0).map_err(|e| self.pg_err(e)))
            .transpose()
    }

    fn audit_commits(&self) -> u64 {
        self.group.commits()
    }

    fn orphaned_intents(&self, limit: u64) -> Result<Vec<OpenIntent>, StoreError> {
        let limit = to_i64(limit, "limit")?;
        let rows = self.with_retries(|c| {
            c.query_typed(
                "SELECT id, warrant_id,
                        to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        leaves
                 FROM open_intents WHERE expires_at <= now() ORDER BY id LIMIT $1",
                &[(&limit, Type::INT8)],
            )
            .map_err(|e| self.pg_err(e))
        })?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get(0).map_err(|e| self.pg_err(e))?;
                let warrant_id: String = row.try_get(1).map_err(|e| self.pg_err(e))?;
                let created_at: String = row.try_get(2).map_err(|e| self.pg_err(e))?;
                let created_at = parse_time(&created_at)
                    .map_err(|e| self.corrupt(format!("open_intents {id}: created_at: {e}")))?;
                let parts: Vec<Vec<u8>> = row.try_get(3).map_err(|e| self.pg_err(e))?;
                let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                Ok(OpenIntent {
                    id,
                    warrant_id,
                    created_at,
                    leaves: intent_leaves(id, &parts, |what| self.corrupt(what))?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed COMMIT's fate is asked of the database after no answer, a
    /// server going away (08, 57P0) or any PANIC; an ordinary error of the
    /// statement is a rollback.
    #[test]
    fn a_commit_answered_panic_may_have_landed() {
        use postgres::error::Severity::{Error, Fatal, Panic};
        for (severity, code, unknown) in [
            (None, None, true),
            (Some(Panic), Some("XX000"), true),
            (Some(Panic), Some("58030"), true),
            (Some(Fatal), Some("57P01"), true),
            (Some(Fatal), Some("08006"), true),
            (None, Some("57P02"), true),
            (Some(Error), Some("40001"), false),
            (Some(Error), Some("23505"), false),
            (Some(Fatal), Some("53100"), false),
            (None, Some("XX000"), false),
        ] {
            assert_eq!(
                commit_fate_unknown(severity, code),
                unknown,
                "{severity:?} {code:?}"
            );
        }
    }

    #[test]
    fn urls_are_parsed_strictly() {
        let ok = parse_url("postgresql://lavd@db.example:5433/lavd?sslmode=verify-full").unwrap();
        assert_eq!(ok.sslmode, SslMode::VerifyFull);
        assert_eq!(ok.describe, "postgresql://db.example:5433/lavd");
        assert_eq!(
            parse_url("postgresql://lavd@db.example/lavd")
                .unwrap()
                .sslmode,
            SslMode::VerifyFull
        );
        assert_eq!(
            parse_url("postgresql://lavd@localhost/lavd?sslmode=disable")
                .unwrap()
                .sslmode,
            SslMode::Disable
        );
        for (url, why) in [
            ("mysql://x@h/d", "postgresql://"),
            ("postgresql://lavd:secret@h/d", "password"),
            ("postgresql://lavd@h/d?password=x", "password"),
            ("postgresql://lavd@h/d?sslmode=require", "sslmode=require"),
            ("postgresql://lavd@h/d?sslmode=prefer", "sslmode=prefer"),
            ("postgresql://h/d", "no user"),
            ("postgresql://lavd@h", "no database"),
        ] {
            let e = parse_url(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
