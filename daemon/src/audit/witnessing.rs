//! The daemon as a client of its witnesses (C2SP `tlog-witness`): it submits
//! every checkpoint it signs to each configured witness, keeps the
//! cosignatures that verify, and serves checkpoints with them.
//!
//! - **Submitting.** One task per witness, so at most one `add-checkpoint`
//!   is in flight to each. A task always sends the newest checkpoint in the
//!   store (checkpoints signed while a request was in flight are batched
//!   into the next one), with the old size the witness last cosigned (from
//!   the store, so from any replica; 0 at first) and a consistency proof
//!   from it, read from the store's subtree hashes. Each answer is handled
//!   as the spec says: 200 → every returned line by the witness's key is
//!   verified *before* it is stored (a line that does not verify is dropped
//!   and logged); 409 with `text/x.tlog.size` → the witness's size is
//!   learned and the request sent again from it (a few times at most); 400,
//!   403, 404, 422, a 409 without a size → ERROR naming the witness, then
//!   backoff; timeouts, 5xx and connection errors → backoff and retry.
//! - **Serving** ([`Witnessing::served`]): the newest checkpoint whose
//!   stored cosignatures meet the policy's quorum, with all of them; before
//!   any checkpoint does, the newest signed one with what it has.
//! - **Waiting** ([`Witnessing::wait_for_quorum`], `release_after_witness`):
//!   polls the store, so a cosignature stored by another replica's
//!   submitter counts as soon as it is committed.
//!
//! Trust: the witnesses are not trusted. Their replies are bounded in time
//! and size, and only lines that verify under the configured keys are
//! stored. Nor is the store (THREAT_MODEL §4.7): a stored line counts
//! toward the quorum, and is served, only if it verifies over the stored
//! checkpoint of its size, which must state that size; the caller checks
//! that checkpoint's own signature under the audit key
//! ([`crate::audit::log::AuditLog::check_served`]). Only the submitter's
//! choice of which size to join (`Witnessing::pending_size`) reads the
//! rows as stored: a forged row can steer it, which costs time, not safety.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Bytes;

use super::witness::{
    countable_at, verify_cosignatures, AddCheckpoint, CosignerKey, COSIGNATURE_FUTURE_SKEW_SECS,
};
use crate::cli::https::{Endpoint, Limits};
use crate::config::{WitnessClientSettings, WitnessEndpoint};
use crate::metrics::Metrics;
use crate::store::{AuditStore, Cosignature, StoreError};

/// How many stored cosignature rows serving looks at, newest first: enough
/// for a quorum that lags this many checkpoints behind the newest one.
const SERVE_SCAN_ROWS: u64 = 1024;
/// How many more pages of [`SERVE_SCAN_ROWS`] serving reads, below the
/// largest size the witnesses' newest cosignatures could make the quorum
/// at, when the newest rows hold no quorum.
const OLDER_SCAN_PAGES: usize = 8;
/// How long a search below the newest page is not made again for the same
/// bound: rows can land below it (a replica storing a late reply) and
/// lines can become countable (a clock that lagged).
const SEARCH_AGAIN: Duration = Duration::from_secs(60);
/// The same after a search a store error cut short.
const SEARCH_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// A search below the newest page ([`Witnessing::older_quorum`]).
#[derive(Debug, Clone, Copy)]
struct Searched {
    /// The largest size searched below (inclusive).
    bound: u64,
    at: Instant,
    /// A store error cut it short.
    failed: bool,
}
/// How often a waiting unwrap looks at the store again when nothing was
/// stored by this process meanwhile (another replica may have stored it).
const WAIT_POLL: Duration = Duration::from_millis(50);
/// How often a submitter looks at the store for checkpoints signed by
/// another replica (its own are announced at once).
const SUBMIT_POLL: Duration = Duration::from_secs(1);
/// Backoff after a failed request: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How many times one checkpoint is sent again after learning the
/// witness's size from a 409.
const MAX_CONFLICT_RETRIES: usize = 3;
/// The largest reply a witness may send (a few cosignature lines).
const MAX_REPLY_BYTES: usize = 16 * 1024;

/// Why an unwrap under `release_after_witness` releases nothing.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// No checkpoint covering the leaves met the quorum in time.
    #[error(
        "no checkpoint of at least {size} leaves was cosigned by the witness quorum within {} s",
        timeout.as_secs_f64()
    )]
    Timeout {
        /// The tree size that had to be cosigned.
        size: u64,
        /// The bound.
        timeout: Duration,
    },
    /// The store could still not be read at the deadline (each failed read
    /// is retried until then: a PostgreSQL failover takes seconds).
    #[error(
        "the cosignatures of {size} leaves could not be read from the store within {} s: {error}",
        timeout.as_secs_f64()
    )]
    Store {
        /// The tree size that had to be cosigned.
        size: u64,
        /// The bound.
        timeout: Duration,
        /// The last read's error.
        #[source]
        error: StoreError,
    },
}

impl WaitError {
    /// The configured wait that ran out.
    pub fn timeout(&self) -> Duration {
        match self {
            WaitError::Timeout { timeout, .. } | WaitError::Store { timeout, .. } => *timeout,
        }
    }
}

/// The witnesses of one daemon: settings, the submitters' wake-up, and the
/// waiters' wake-up.
pub struct Witnessing {
    settings: WitnessClientSettings,
    store: Arc<dyn AuditStore>,
    metrics: Option<Arc<Metrics>>,
    /// The newest size this process signed: wakes the submitters.
    signed: tokio::sync::watch::Sender<u64>,
    /// Bumped when this process stores a cosignature: wakes the waiters.
    stored: (Mutex<u64>, Condvar),
    /// The largest size this process found the quorum had cosigned: a
    /// quorum never goes away (rows are only added, or refreshed with a
    /// newer line), so [`Self::served`] looks for newer ones only above it,
    /// reads it again rather than searching the rows again, and never
    /// serves below it. Per process: replicas each keep their own.
    quorum_seen: Mutex<Option<u64>>,
    /// The bound [`Self::older_quorum`] last searched below, when, and
    /// whether a store error cut it short: it is not made again for the
    /// same bound within [`SEARCH_AGAIN`] ([`SEARCH_AFTER_FAILURE`] after a
    /// failure), so a public route does not page on every request.
    searched: Mutex<Option<Searched>>,
    /// One search at a time: a request that would search meanwhile waits
    /// for it, then finds what it found.
    search: Mutex<()>,
}

impl std::fmt::Debug for Witnessing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Witnessing")
            .field("witnesses", &self.settings.witnesses.len())
            .finish_non_exhaustive()
    }
}

impl Witnessing {
    /// The witnessing of `store`'s log under `settings`.
    pub fn new(
        settings: WitnessClientSettings,
        store: Arc<dyn AuditStore>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Witnessing {
            settings,
            store,
            metrics,
            signed: tokio::sync::watch::channel(0).0,
            stored: (Mutex::new(0), Condvar::new()),
            quorum_seen: Mutex::new(None),
            searched: Mutex::new(None),
            search: Mutex::new(()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &WitnessClientSettings {
        &self.settings
    }

    /// Tells the submitters that a checkpoint of `size` was signed.
    pub fn signed(&self, size: u64) {
        self.signed.send_if_modified(|newest| {
            let newer = size > *newest;
            if newer {
                *newest = size;
            }
            newer
        });
    }

    /// The configured key of witness `name`.
    fn key(&self, name: &str) -> Option<&CosignerKey> {
        self.settings
            .witnesses
            .iter()
            .find(|w| w.name == name)
            .map(|w| &w.key)
    }

    /// The configured key that made the stored cosignature `c`. Rows are
    /// kept by witness name, so `None` also for a line by another key of
    /// that name: one the witness had before the configuration replaced it.
    fn key_of(&self, c: &Cosignature) -> Option<&CosignerKey> {
        let key = self.key(&c.witness)?;
        let line = super::note::signature_line(c.line.strip_suffix('\n')?).ok()?;
        (line.name == key.name() && line.key_id == key.key_id()).then_some(key)
    }

    /// The stored cosignatures among `group` (rows of one size) by the
    /// configured keys whose signature verifies over `note`, the stored
    /// checkpoint of that size. A row that names a configured witness and
    /// does not verify was not written by lavd (which stores only lines it
    /// verified): it is said, and not counted or served.
    fn verified<'a>(
        &'a self,
        note: &str,
        group: &[&'a Cosignature],
    ) -> Vec<(&'a Cosignature, &'a CosignerKey)> {
        let now = unix_now();
        group
            .iter()
            .filter_map(|c| self.key_of(c).map(|key| (*c, key)))
            .filter(|(c, key)| {
                let times = verify_cosignatures(&format!("{note}{}", c.line), key)
                    .ok()
                    .filter(|times| !times.is_empty());
                let Some(times) = times else {
                    tracing::error!(
                        witness = %c.witness,
                        size = c.size,
                        "a stored cosignature does not verify over the stored checkpoint of its \
                         size; it is not counted or served (a row written outside lavd?)"
                    );
                    return false;
                };
                // As `lavd audit verify` judges it: a line it would set
                // aside neither makes the quorum keys are released on,
                // nor is served.
                let countable = times.iter().all(|&at| countable_at(at, now));
                // Looked at on every read of the quorum (every poll of a
                // waiting unwrap, every checkpoint served): a line a second
                // per witness, counting the rest.
                let admitted = || UNCOUNTED_LINES.admit(&c.witness, Instant::now());
                if let Some(left_out) = (!countable).then(admitted).flatten() {
                    tracing::warn!(
                        witness = %c.witness,
                        size = c.size,
                        left_out,
                        "a stored cosignature is stamped 0, or more than \
                         {COSIGNATURE_FUTURE_SKEW_SECS} s past this machine's clock; it is not \
                         counted or served"
                    );
                }
                countable
            })
            .collect()
    }

    /// Among `rows` (largest size first), the largest size whose
    /// cosignatures by the configured keys, verified over the stored
    /// checkpoint of that size, meet the quorum: that size and checkpoint
    /// with all of them. When `rows` is a full page (`limit` rows), the
    /// smallest size's rows may be cut off: that size is read again whole
    /// (served with some of its lines only, an auditor's policy could find
    /// the quorum unmet).
    ///
    /// `None` under `quorum none`: then every signed checkpoint meets the
    /// quorum, and the newest one is the one to serve, not the newest that
    /// happens to carry a cosignature.
    fn first_quorum(
        &self,
        rows: &[Cosignature],
        limit: u64,
    ) -> Result<Option<(u64, String)>, StoreError> {
        if !self.settings.policy.needs_cosignatures() {
            return Ok(None);
        }
        let whole;
        let rows = match rows.last() {
            Some(last) if rows.len() as u64 >= limit && rows[0].size != last.size => {
                let cut = last.size;
                let kept = rows
                    .iter()
                    .position(|c| c.size == cut)
                    .unwrap_or(rows.len());
                let mut all = rows[..kept].to_vec();
                all.extend(self.store.cosignatures(cut..cut.saturating_add(1), limit)?);
                whole = all;
                &whole[..]
            }
            _ => rows,
        };
        let mut i = 0;
        while i < rows.len() {
            let size = rows[i].size;
            let group: Vec<&Cosignature> =
                rows[i..].iter().take_while(|c| c.size == size).collect();
            i += group.len();
            // What the rows claim first: verifying costs a store read and a
            // signature check a line.
            if !self
                .settings
                .policy
                .quorum_met_by(group.iter().filter_map(|c| self.key_of(c)))
            {
                continue;
            }
            let Some(mut note) = self.store.checkpoint_at(size)? else {
                continue;
            };
            // The note must be of the size it is stored under: an older
            // checkpoint with its real cosignatures, copied to a larger
            // size, would pass for one that covers leaves no witness saw.
            let stated = super::note::split_note(&note)
                .ok()
                .and_then(|(body, _)| super::note::Checkpoint::parse(body).ok())
                .map(|c| c.size);
            if stated != Some(size) {
                tracing::error!(
                    size,
                    ?stated,
                    "the stored checkpoint of a cosigned size is not of that size; it is not \
                     counted or served (a row written outside lavd?)"
                );
                continue;
            }
            let verified = self.verified(&note, &group);
            if self
                .settings
                .policy
                .quorum_met_by(verified.iter().map(|(_, key)| *key))
            {
                // Only the configured witnesses' lines: with at most 63 of
                // them the note stays within its 64 signature lines.
                for (c, _) in verified {
                    note.push_str(&c.line);
                }
                return Ok(Some((size, note)));
            }
        }
        Ok(None)
    }

    /// The size the submitter of witness `me` (which last cosigned `old`)
    /// should join before it sends the newest checkpoint: the largest size
    /// among `rows` (largest first) that other configured witnesses
    /// cosigned, short of the quorum, above any size that met it, and above
    /// `old` (a witness never goes back). Each submitter sending only the
    /// newest checkpoint, at its own pace, would leave the witnesses'
    /// cosignatures on different sizes under a steady stream of
    /// checkpoints, and the quorum, which counts one size, might never be
    /// met; joining the size others already cosigned makes it land there.
    /// `None` under `quorum none`.
    fn pending_size(&self, rows: &[Cosignature], me: &str, old: u64) -> Option<u64> {
        if !self.settings.policy.needs_cosignatures() {
            return None;
        }
        let mut i = 0;
        while i < rows.len() {
            let size = rows[i].size;
            let group: Vec<&Cosignature> =
                rows[i..].iter().take_while(|c| c.size == size).collect();
            i += group.len();
            if size <= old
                || self
                    .settings
                    .policy
                    .quorum_met_by(group.iter().filter_map(|c| self.key_of(c)))
            {
                return None;
            }
            let by_others = group
                .iter()
                .any(|c| c.witness != me && self.key_of(c).is_some());
            if by_others && group.iter().all(|c| c.witness != me) {
                return Some(size);
            }
        }
        None
    }

    /// The checkpoint to serve: the newest one the quorum cosigned, with
    /// all its cosignatures; before any is, the newest signed checkpoint
    /// with the cosignatures it has. Only cosignatures that verify over it
    /// are served. `None` when the log has signed none.
    ///
    /// # Errors
    /// The store's.
    pub fn served(&self) -> Result<Option<String>, StoreError> {
        let latest = self.store.latest_checkpoint()?;
        if self.settings.policy.needs_cosignatures() {
            let rows = self.store.cosignatures(0..u64::MAX, SERVE_SCAN_ROWS)?;
            if let Some(found) = self.quorum_in(&rows)? {
                return Ok(Some(found));
            }
        }
        // Every signed checkpoint meets `quorum none`: the newest is served,
        // with the lines it has. Otherwise, before any quorum, the newest
        // signed one; after one, never below it: its checkpoint with the
        // lines that verify now (a clock stepped back, a row edited behind
        // lavd), not the newest signed and then that one again.
        let seen = *self
            .quorum_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at_seen = match seen {
            Some(s) => self.store.checkpoint_at(s)?.map(|note| (s, note)),
            None => None,
        };
        let Some((size, mut note)) = at_seen.or(latest) else {
            return Ok(None);
        };
        let rows = self
            .store
            .cosignatures(size..size.saturating_add(1), SERVE_SCAN_ROWS)?;
        let group: Vec<&Cosignature> = rows.iter().collect();
        let lines: Vec<String> = self
            .verified(&note, &group)
            .into_iter()
            .map(|(c, _)| c.line.clone())
            .collect();
        for line in lines {
            note.push_str(&line);
        }
        Ok(Some(note))
    }

    /// The newest checkpoint the quorum cosigned, with its cosignatures,
    /// given `rows`, the newest page of them: found there; else (a quorum
    /// further back, a witness down while the others cosigned that many
    /// more checkpoints) looked for below `rows` and above the largest this
    /// process has seen ([`Self::older_quorum`]); else that one, read
    /// again. Never below one this process has seen: the newest signed
    /// checkpoint served instead would be followed, once the quorum formed
    /// again below it, by a smaller one, which a mirror refuses as a
    /// rollback.
    fn quorum_in(&self, rows: &[Cosignature]) -> Result<Option<String>, StoreError> {
        let seen_lock = || {
            self.quorum_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let seen = *seen_lock();
        let found = match self.first_quorum(rows, SERVE_SCAN_ROWS)? {
            Some(found) if seen.is_none_or(|s| found.0 >= s) => Some(found),
            // None in the newest page (a smaller one than was seen cannot
            // be: rows are never removed).
            _ => {
                let below = match rows.last() {
                    Some(oldest) if rows.len() as u64 == SERVE_SCAN_ROWS => {
                        self.older_quorum(oldest.size, seen)?
                    }
                    _ => None,
                };
                // Read again: a search this request waited for may have
                // found a larger one. (Copied out: the lock is not held
                // across the reads below.)
                let seen_now = *seen_lock();
                match (below, seen_now) {
                    (Some(found), _) => Some(found),
                    (None, Some(s)) => {
                        let again = self
                            .store
                            .cosignatures(s..s.saturating_add(1), SERVE_SCAN_ROWS)?;
                        self.first_quorum(&again, SERVE_SCAN_ROWS)?
                    }
                    (None, None) => None,
                }
            }
        };
        Ok(found.map(|(size, note)| {
            let mut seen = seen_lock();
            *seen = Some(seen.map_or(size, |s| s.max(size)));
            note
        }))
    }

    /// The newest checkpoint of at most `size` leaves, and more than
    /// `above`'s, that the quorum cosigned, with its cosignatures, for
    /// [`Self::served`] when the rows above hold none. Read from the
    /// largest size at which the configured witnesses' newest cosignatures
    /// could make the quorum (no size above it can), [`SERVE_SCAN_ROWS`]
    /// rows at a time, at most [`OLDER_SCAN_PAGES`] times; nothing read
    /// when that size is not above `above` (a quorum found before, still
    /// the newest possible: one query a witness) or was searched below
    /// within [`SEARCH_AGAIN`]. One search at a time.
    fn older_quorum(
        &self,
        size: u64,
        above: Option<u64>,
    ) -> Result<Option<(u64, String)>, StoreError> {
        let mut newest = Vec::new();
        for w in &self.settings.witnesses {
            if let Some(at) = self.store.last_cosigned(&w.name)? {
                newest.push((at, &w.key));
            }
        }
        newest.sort_unstable_by_key(|(at, _)| std::cmp::Reverse(*at));
        let could = newest.iter().map(|(at, _)| *at).find(|&at| {
            self.settings
                .policy
                .quorum_met_by(newest.iter().filter(|(t, _)| *t >= at).map(|(_, key)| *key))
        });
        let from = above.map_or(0, |s| s.saturating_add(1));
        let Some(could) = could.filter(|&could| could >= from) else {
            return Ok(None);
        };
        // Before any quorum was seen a request waits for a search under
        // way (serving the newest signed checkpoint meanwhile could be
        // followed by the smaller quorum it finds); after, it does not:
        // it serves the one seen.
        let _one = match (above, self.search.try_lock()) {
            (_, Ok(one)) => one,
            (_, Err(std::sync::TryLockError::Poisoned(p))) => p.into_inner(),
            (Some(_), Err(std::sync::TryLockError::WouldBlock)) => return Ok(None),
            (None, Err(std::sync::TryLockError::WouldBlock)) => self
                .search
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        };
        let searched = || {
            self.searched
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        // A search that ended is not made again for the same bound within
        // SEARCH_AGAIN; one that failed, not within SEARCH_AFTER_FAILURE
        // (requests would otherwise each run it, and fail, in turn).
        if let Some(last) = *searched() {
            let wait = if last.failed {
                SEARCH_AFTER_FAILURE
            } else {
                SEARCH_AGAIN
            };
            if could <= last.bound && last.at.elapsed() < wait {
                return Ok(None);
            }
        }
        let result = self.search_below(from, could.saturating_add(1).min(size));
        *searched() = Some(Searched {
            bound: could,
            at: Instant::now(),
            failed: result.is_err(),
        });
        // Seen before the search is let go: a request that waited for it
        // finds it.
        if let Ok(Some((size, _))) = &result {
            let mut seen = self
                .quorum_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *seen = Some(seen.map_or(*size, |s| s.max(*size)));
        }
        result
    }

    /// The pages of [`Self::older_quorum`]'s search: sizes from `from` to
    /// below `below`, [`SERVE_SCAN_ROWS`] rows at a time, at most
    /// [`OLDER_SCAN_PAGES`] times.
    fn search_below(&self, from: u64, mut below: u64) -> Result<Option<(u64, String)>, StoreError> {
        for _ in 0..OLDER_SCAN_PAGES {
            if below <= from {
                break;
            }
            let rows = self.store.cosignatures(from..below, SERVE_SCAN_ROWS)?;
            if let Some(found) = self.first_quorum(&rows, SERVE_SCAN_ROWS)? {
                return Ok(Some(found));
            }
            match rows.last() {
                // Its smallest size was judged whole (`first_quorum`); the
                // next page starts below it.
                Some(last) if rows.len() as u64 == SERVE_SCAN_ROWS => below = last.size,
                _ => break,
            }
        }
        Ok(None)
    }

    /// A checkpoint of at least `size` leaves that the quorum cosigned, with
    /// its cosignatures, if the store has one now.
    ///
    /// # Errors
    /// The store's.
    pub fn quorum_covering(&self, size: u64) -> Result<Option<String>, StoreError> {
        let rows = self.store.cosignatures(size..u64::MAX, SERVE_SCAN_ROWS)?;
        Ok(self
            .first_quorum(&rows, SERVE_SCAN_ROWS)?
            .map(|(_, note)| note))
    }

    /// Waits, blocking, until a checkpoint of at least `size` leaves is
    /// cosigned by the quorum (by this process's submitters or another
    /// replica's), for at most the configured `witness_timeout_secs`.
    ///
    /// A failed store read is retried until the deadline: the unwrap has
    /// already spent its budget, so giving up early would waste it.
    ///
    /// # Errors
    /// [`WaitError::Timeout`]; [`WaitError::Store`] when the last read
    /// before the deadline failed.
    pub fn wait_for_quorum(&self, size: u64) -> Result<String, WaitError> {
        let timeout = self.settings.timeout;
        let deadline = Instant::now() + timeout;
        let (lock, wake) = &self.stored;
        let mut warned = false;
        loop {
            let seen = *lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let failed = match self.quorum_covering(size) {
                Ok(Some(note)) => return Ok(note),
                Ok(None) => None,
                Err(error) => {
                    // Once per wait: it is retried every poll interval.
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(%error, size, "cannot read cosignatures; retrying until the witness deadline");
                    }
                    Some(error)
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(match failed {
                    Some(error) => WaitError::Store {
                        size,
                        timeout,
                        error,
                    },
                    None => WaitError::Timeout { size, timeout },
                });
            }
            let guard = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *guard == seen {
                // Woken by a local store, or after the poll interval for
                // another replica's.
                let _ = wake
                    .wait_timeout(guard, WAIT_POLL.min(deadline - now))
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }

    /// Starts one submitter task per witness on the current tokio runtime.
    ///
    /// # Errors
    /// A witness whose URL or CA file cannot be used.
    pub fn spawn_submitters(self: &Arc<Self>) -> anyhow::Result<()> {
        for w in &self.settings.witnesses {
            let endpoint = match &w.ca_file {
                Some(ca) => Endpoint::new(&w.url, ca, None),
                None => Endpoint::new_plain(&w.url),
            }
            .map_err(|e| anyhow::anyhow!("witness {}: {e:#}", w.name))?;
            let this = self.clone();
            let w = w.clone();
            tokio::spawn(async move { this.submit_loop(w, endpoint).await });
        }
        Ok(())
    }

    fn outcome(&self, witness: &str, outcome: &'static str) {
        if let Some(m) = &self.metrics {
            m.witness_request(witness, outcome);
        }
    }

    /// Runs a store call on a thread of its own, not on the runtime's
    /// blocking pool: unwraps waiting for the quorum hold blocking-pool
    /// threads, and the cosignature they wait for must still get stored
    /// when every one of those threads is taken.
    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn AuditStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("lavd-witness-store".into())
            .spawn(move || {
                let _ = tx.send(f(store.as_ref()));
            });
        if let Err(e) = spawned {
            return Err(StoreError::CommitFailed(format!("store thread: {e}")));
        }
        rx.await
            .unwrap_or_else(|_| Err(StoreError::CommitFailed("the store thread panicked".into())))
    }

    async fn submit_loop(self: Arc<Self>, w: WitnessEndpoint, endpoint: Endpoint) {
        let mut signed = self.signed.subscribe();
        let mut backoff = BACKOFF_MIN;
        // When this witness was last asked to cosign the newest checkpoint
        // again ([`Self::refresh`]).
        let mut refreshed = None;
        let name = w.name.clone();
        if let Ok(Some(size)) = self.store_call(move |s| s.last_cosigned(&name)).await {
            if let Some(m) = &self.metrics {
                m.witness_cosigned(&w.name, size);
            }
        }
        loop {
            match self.submit_newest(&w, &endpoint, &mut refreshed).await {
                // It joined an older size; the newest is next, at once.
                Ok(Submitted::Older) => {
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Ok(Submitted::Newest) => backoff = BACKOFF_MIN,
                Ok(Submitted::Quiet) => {
                    backoff = BACKOFF_MIN;
                    // Not before the backoff's longest wait; then at the
                    // next checkpoint signed (a clock corrected meanwhile
                    // is seen then: under `release_after_witness` unwraps
                    // wait for it), or after `refresh_after`.
                    tokio::time::sleep(BACKOFF_MAX).await;
                    let rest = self.settings.refresh_after.saturating_sub(BACKOFF_MAX);
                    tokio::select! {
                        changed = signed.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        () = tokio::time::sleep(rest) => {}
                    }
                    continue;
                }
                Err(()) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
            tokio::select! {
                changed = signed.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(SUBMIT_POLL) => {}
            }
        }
    }

    /// Sends the newest stored checkpoint to `w` unless it has cosigned it
    /// already; but first, a size other witnesses cosigned that has not met
    /// the quorum yet, if `w` can still cosign it ([`Self::pending_size`]).
    /// `Err` means: back off before the next try (already logged).
    async fn submit_newest(
        &self,
        w: &WitnessEndpoint,
        endpoint: &Endpoint,
        refreshed: &mut Option<Instant>,
    ) -> Result<Submitted, ()> {
        let name = w.name.clone();
        let read = self
            .store_call(move |s| {
                Ok((
                    s.latest_checkpoint()?,
                    s.last_cosigned(&name)?,
                    s.cosignatures(0..u64::MAX, SERVE_SCAN_ROWS)?,
                    s.tree_size()?,
                ))
            })
            .await;
        let (latest, cosigned, rows, tree_size) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(witness = %w.name, error = %e, "witness submitter: store read failed");
                return Err(());
            }
        };
        let Some((mut size, mut note)) = latest else {
            return Ok(Submitted::Newest);
        };
        let mut old = cosigned.unwrap_or(0);
        let mut submitted = Submitted::Newest;
        if let Some(pending) = self.pending_size(&rows, &w.name, old).filter(|p| *p < size) {
            if let Ok(Some(pending_note)) = self.store_call(move |s| s.checkpoint_at(pending)).await
            {
                (size, note, submitted) = (pending, pending_note, Submitted::Older);
            }
        }
        // A refresh of the newest checkpoint ([`Self::refresh_due`]): its
        // line replaces the stored one.
        let mut replacing = None;
        if old >= size {
            // Only while the log is idle: leaves past the newest
            // checkpoint (one not signed or saved yet, or whose signing
            // fails) must not be hidden behind fresh cosignatures of it.
            let idle = tree_size == size;
            if !(old == size && submitted == Submitted::Newest && idle) {
                return Ok(Submitted::Newest);
            }
            match self.refresh_due(w, size, &note, &rows, *refreshed) {
                Some(line) => replacing = Some(line),
                None => return Ok(Submitted::Newest),
            }
        }
        for _ in 0..=MAX_CONFLICT_RETRIES {
            let sent = self
                .add_checkpoint(w, endpoint, old, size, &note, replacing.as_deref())
                .await;
            if replacing.is_some() && sent.is_ok() {
                // Answered: the next refresh waits its interval, whatever
                // the answer (a witness whose clock lags keeps returning
                // old times). Unanswered, the backoff retries sooner.
                *refreshed = Some(Instant::now());
            }
            match sent? {
                Sent::Cosigned => return Ok(submitted),
                // Its clock is ahead: asked again only after a while.
                Sent::Ahead => return Ok(Submitted::Quiet),
                Sent::Learned(learned) if learned > size => {
                    // Another replica (PostgreSQL) may have signed and sent
                    // a newer checkpoint since the read above.
                    match self.store_call(|s| s.latest_checkpoint()).await {
                        Ok(Some((newest, newest_note))) if newest >= learned => {
                            tracing::info!(
                                witness = %w.name, learned, size, newest,
                                "witness already has a newer checkpoint of this log \
                                 (another replica's); moving to the newest"
                            );
                            if newest == learned {
                                // Its cosignature is the sender's to store.
                                return Ok(Submitted::Newest);
                            }
                            (size, note, old, submitted) =
                                (newest, newest_note, learned, Submitted::Newest);
                            // Another size: its row is new, not a refresh.
                            replacing = None;
                        }
                        Ok(_) => {
                            // More than this log has signed: someone
                            // holding its key had a larger tree cosigned.
                            // Counted `fork` as well as `conflict`, the
                            // outcome operators alert on.
                            tracing::error!(
                                witness = %w.name, learned, size,
                                "witness reports a size this log has not signed (a fork, or \
                                 another log with this origin); backing off"
                            );
                            self.outcome(&w.name, "fork");
                            return Err(());
                        }
                        Err(e) => {
                            tracing::warn!(witness = %w.name, error = %e, "witness submitter: store read failed");
                            return Err(());
                        }
                    }
                }
                Sent::Learned(learned) if learned == old => {
                    // The same size with another root: a fork of what it
                    // recorded.
                    tracing::error!(
                        witness = %w.name, learned, old, size,
                        "witness reports a size it cannot have cosigned from this log's \
                         checkpoints (a fork, or another log with this origin); backing off"
                    );
                    self.outcome(&w.name, "fork");
                    return Err(());
                }
                Sent::Learned(learned) if cosigned.is_some_and(|c| learned < c) => {
                    // This log holds the witness's verified cosignature of a
                    // larger size: the witness went back (its state lost, or
                    // restored from an older copy), and could now be shown
                    // a fork of what it cosigned. The log's own tree is
                    // consistent, so it is caught up from there; the
                    // witness's operator must be told.
                    tracing::error!(
                        witness = %w.name, learned, cosigned = cosigned.unwrap_or_default(),
                        "witness reports a size below one it cosigned for this log (its state \
                         was lost or restored from an older copy): it could now cosign a fork of \
                         what it cosigned; catching it up from its size"
                    );
                    self.outcome(&w.name, "rolled_back");
                    old = learned;
                }
                Sent::Learned(learned) => old = learned,
            }
        }
        tracing::error!(witness = %w.name, size, "witness keeps answering 409; backing off");
        Err(())
    }

    /// While the log takes no leaves, its newest checkpoint keeps the
    /// cosignatures it got when it was new, and their times, which date
    /// it for verifiers (`--max-cosignature-age`), grow old: an idle honest
    /// log would look like a frozen view. So once `w`'s line of `size`, the
    /// newest, is older than `refresh_after`, the checkpoint is sent to
    /// `w` again (`old` = `size`, which C2SP tlog-witness allows: same
    /// size, same root), and its newer line replaces the stored one.
    /// Returns the stored line when a refresh is due: at most once per
    /// `refresh_after` since `w` last answered one (`refreshed`).
    fn refresh_due(
        &self,
        w: &WitnessEndpoint,
        size: u64,
        note: &str,
        rows: &[Cosignature],
        refreshed: Option<Instant>,
    ) -> Option<String> {
        // Not among the rows read (more than SERVE_SCAN_ROWS newer ones
        // cannot be): nothing to compare with.
        let stored = rows
            .iter()
            .find(|c| c.size == size && c.witness == w.name)?;
        let newest = verify_cosignatures(&format!("{note}{}", stored.line), &w.key)
            .ok()
            .and_then(|times| times.into_iter().max());
        let now = unix_now();
        // A line that does not count (stamped 0, or ahead of this clock:
        // stored before that rule) is due at once.
        let due = newest.is_none_or(|at| {
            !countable_at(at, now)
                || now.saturating_sub(at) >= self.settings.refresh_after.as_secs()
        });
        let asked = refreshed.is_some_and(|t| t.elapsed() < self.settings.refresh_after);
        (due && !asked).then(|| stored.line.clone())
    }

    async fn add_checkpoint(
        &self,
        w: &WitnessEndpoint,
        endpoint: &Endpoint,
        old: u64,
        size: u64,
        note: &str,
        replacing: Option<&str>,
    ) -> Result<Sent, ()> {
        let proof = if old == 0 {
            Vec::new()
        } else {
            match self
                .store_call(move |s| s.consistency_proof(old, size))
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(
                        witness = %w.name, old, size, error = %e,
                        "no consistency proof for the witness; backing off"
                    );
                    self.outcome(&w.name, "no_proof");
                    return Err(());
                }
            }
        };
        let body = AddCheckpoint {
            old_size: old,
            proof,
            checkpoint: note.to_string(),
        }
        .encode();
        let path = format!("{}/add-checkpoint", endpoint.prefix());
        let limits = Limits {
            max_response_bytes: MAX_REPLY_BYTES,
            timeout: self.settings.request_timeout,
        };
        let reply = match endpoint
            .send(&path, Some(("text/plain", Bytes::from(body))), limits)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(witness = %w.name, error = %format!("{e:#}"), "witness unreachable; will retry");
                self.outcome(&w.name, "unavailable");
                return Err(());
            }
        };
        let text = String::from_utf8_lossy(&reply.body);
        let excerpt: String = text.chars().take(200).collect();
        match reply.status.as_u16() {
            200 => self.cosigned(w, size, note, &text, replacing).await,
            409 => {
                let learned = is_tlog_size(reply.content_type.as_deref())
                    .then(|| parse_size(&text))
                    .flatten();
                match learned {
                    Some(n) => {
                        tracing::info!(witness = %w.name, sent = old, learned = n, "witness has another size; retrying from it");
                        self.outcome(&w.name, "conflict");
                        Ok(Sent::Learned(n))
                    }
                    None => {
                        tracing::error!(
                            witness = %w.name, size, body = %excerpt,
                            content_type = reply.content_type.as_deref().unwrap_or(""),
                            "witness answered 409 without a size lavd can read (C2SP \
                             tlog-witness: a `text/x.tlog.size` body, the decimal size and a \
                             newline); backing off"
                        );
                        self.outcome(&w.name, "conflict");
                        Err(())
                    }
                }
            }
            // The checkpoint had the size the witness says it holds, so
            // its 422 can only mean another root at that size: a fork
            // (C2SP tlog-witness has answered that 422 since 2026-07-06;
            // 409 with that size before, handled above). And a 422 to a
            // consistency proof from the size the witness holds (`old`:
            // it would have answered 409 to another) means the same: the
            // proof was made from this log's own tree, so it fails only
            // against another root at `old`.
            422 if old == size || old > 0 => {
                tracing::error!(
                    witness = %w.name, old, size, body = %excerpt,
                    "witness holds a checkpoint of size `old` with another root than this log's \
                     (a fork, or another log with this origin): this log's consistency proof \
                     from it was refused; backing off"
                );
                self.outcome(&w.name, "fork");
                Err(())
            }
            status @ (400 | 403 | 404 | 422) => {
                let outcome = match status {
                    400 => "bad_request",
                    403 => "forbidden",
                    404 => "unknown_origin",
                    _ => "bad_proof",
                };
                tracing::error!(
                    witness = %w.name, status, old, size, body = %excerpt,
                    "witness refused the checkpoint ({outcome}); backing off"
                );
                self.outcome(&w.name, outcome);
                Err(())
            }
            // A witness that moved (http to https, another prefix) will
            // not come back by waiting: its operator, or lavd's, must
            // change the URL. Not followed: the configured URL is the one
            // trusted.
            status @ 300..=399 => {
                tracing::error!(
                    witness = %w.name, status,
                    location = %crate::codec::escape_for_terminal(
                        reply.location.as_deref().unwrap_or("")
                    ),
                    "witness answered with a redirect, which lavd does not follow: set its URL \
                     to where it points if that is the witness; backing off"
                );
                self.outcome(&w.name, "redirected");
                Err(())
            }
            status => {
                tracing::warn!(witness = %w.name, status, body = %excerpt, "witness unavailable; will retry");
                self.outcome(&w.name, "unavailable");
                Err(())
            }
        }
    }

    /// A 200: keeps the first returned line that verifies under `w`'s key;
    /// in place of `replacing`, when given (a refresh, [`Self::refresh`]).
    async fn cosigned(
        &self,
        w: &WitnessEndpoint,
        size: u64,
        note: &str,
        body: &str,
        replacing: Option<&str>,
    ) -> Result<Sent, ()> {
        let mut good = None;
        let mut uncountable = false;
        for line in body.split_inclusive('\n') {
            if !line.ends_with('\n') || !line.starts_with(super::note::SIG_PREFIX) {
                continue;
            }
            match verify_cosignatures(&format!("{note}{line}"), &w.key) {
                // A line stamped 0 (which the spec forbids a witness to
                // return) or ahead of this clock would not count.
                Ok(times) if !times.iter().all(|&at| countable_at(at, unix_now())) => {
                    // A line a second per witness, counting the rest: a
                    // busy log asks such a witness every 5 s.
                    let admitted = AHEAD_LINES.admit(&w.name, Instant::now());
                    if let Some(left_out) = admitted {
                        tracing::error!(
                            witness = %w.name,
                            size,
                            times = ?times,
                            left_out,
                            "witness returned a cosignature stamped 0, or more than \
                             {COSIGNATURE_FUTURE_SKEW_SECS} s past this machine's clock; dropped \
                             (is its clock, or ours, wrong?); asked again at the next \
                             checkpoint, at most every 5 s, or after witness_refresh_secs"
                        );
                    }
                    uncountable = true;
                }
                Ok(times) if !times.is_empty() => {
                    good.get_or_insert_with(|| line.to_string());
                }
                // Another key's line: ignored, as the spec requires.
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(witness = %w.name, size, error = %e, "witness returned a cosignature that does not verify; dropped");
                }
            }
        }
        let Some(line) = good else {
            if uncountable {
                self.outcome(&w.name, "clock_ahead");
                return Ok(Sent::Ahead);
            }
            tracing::error!(witness = %w.name, size, "witness answered 200 without a valid cosignature by its key; backing off");
            self.outcome(&w.name, "bad_cosignature");
            return Err(());
        };
        let cosignature = Cosignature {
            size,
            witness: w.name.clone(),
            line,
        };
        let time_of = |line: &str| {
            verify_cosignatures(&format!("{note}{line}"), &w.key)
                .ok()
                .and_then(|times| times.into_iter().max())
        };
        let now = unix_now();
        if let Some(previous) = replacing {
            // A stored line that does not count (stamped 0, or ahead of
            // this clock) is replaced by any that does.
            let counts = time_of(previous).is_some_and(|at| countable_at(at, now));
            if counts && time_of(&cosignature.line) <= time_of(previous) {
                // A witness whose clock went back: the stored line stays.
                tracing::warn!(witness = %w.name, size, "witness refreshed a cosignature with a time no later than the stored one's; keeping the stored one");
                return Ok(Sent::Cosigned);
            }
        }
        let previous = replacing.map(str::to_string);
        let saved = self
            .store_call(move |s| match previous {
                Some(previous) => s.replace_cosignature(&cosignature, &previous).map(|_| ()),
                None => s.save_cosignature(&cosignature),
            })
            .await;
        if let Err(e) = saved {
            tracing::error!(witness = %w.name, size, error = %e, "cannot store a cosignature; will retry");
            self.outcome(&w.name, "unavailable");
            return Err(());
        }
        self.outcome(&w.name, "cosigned");
        if let Some(m) = &self.metrics {
            m.witness_cosigned(&w.name, size);
        }
        let (lock, wake) = &self.stored;
        *lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        wake.notify_all();
        Ok(Sent::Cosigned)
    }
}

/// Which checkpoint [`Witnessing::submit_newest`] had cosigned (or found
/// cosigned already) when it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Submitted {
    /// The newest, or nothing was to be sent.
    Newest,
    /// An older one other witnesses had cosigned: the newest is next.
    Older,
    /// The witness answered with cosignatures that do not count (its clock
    /// runs ahead of this one's, or says 0): the next request to it waits
    /// `refresh_after`.
    Quiet,
}

/// What one request achieved.
enum Sent {
    Cosigned,
    /// A 200 whose lines by the witness's key verify but do not count
    /// ([`countable_at`]); none stored.
    Ahead,
    /// A 409 with the witness's size.
    Learned(u64),
}

/// Whether a `Content-Type` is `text/x.tlog.size`: a media type is
/// compared without case and without its parameters (RFC 9110 §8.3.1), so
/// that a witness or a proxy that writes `Text/X.Tlog.Size` or adds
/// `; charset=utf-8` is still understood.
fn is_tlog_size(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|value| {
        value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case(crate::witness::serve::TLOG_SIZE_CONTENT_TYPE)
    })
}

/// A `text/x.tlog.size` body: a decimal without leading zeros and a
/// newline.
fn parse_size(body: &str) -> Option<u64> {
    let digits = body.strip_suffix('\n')?;
    let canonical = digits == "0" || (!digits.is_empty() && !digits.starts_with('0'));
    if !canonical || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Lines saying that a stored cosignature does not count
/// ([`Witnessing::verified`]).
static UNCOUNTED_LINES: std::sync::LazyLock<crate::api::ratelimit::LineThrottle> =
    std::sync::LazyLock::new(crate::api::ratelimit::LineThrottle::new);

/// Lines saying that a witness answered with cosignatures that do not
/// count ([`Witnessing::cosigned`]).
static AHEAD_LINES: std::sync::LazyLock<crate::api::ratelimit::LineThrottle> =
    std::sync::LazyLock::new(crate::api::ratelimit::LineThrottle::new);

/// Seconds since the Unix epoch, now (0 for a clock before it, at which
/// no cosignature counts).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    //! The submitter against in-process witnesses: `WitnessState` (the
    //! witness side's own checks and store) behind a small HTTPS server.
    //! The end-to-end test with real `lavd witness serve` processes is
    //! `softhsm-tests/tests/log_witnessed.rs`.
    use std::path::Path;

    use ed25519_dalek::Signer as _;
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Bytes;
    use rustls_pki_types::pem::PemObject as _;

    use super::*;
    use crate::audit::leaf::{Event, WarrantRefused};
    use crate::audit::note::{self, Checkpoint, VerifierKey};
    use crate::audit::witness::{AddOutcome, Policy};
    use crate::codec::parse_time;
    use crate::store::{AuditAppend, Spend, Store};
    use crate::witness::WitnessState;

    #[test]
    fn size_bodies_are_read_strictly() {
        assert_eq!(parse_size("0\n"), Some(0));
        assert_eq!(parse_size("50\n"), Some(50));
        for bad in ["50", "050\n", "\n", "5 0\n", "-1\n", "50\n\n", "x\n"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    /// The size's media type is matched without case or parameters.
    #[test]
    fn a_size_is_read_from_any_spelling_of_its_media_type() {
        for taken in [
            "text/x.tlog.size",
            "Text/X.Tlog.Size",
            "text/x.tlog.size; charset=utf-8",
            " text/x.tlog.size ;charset=utf-8",
        ] {
            assert!(is_tlog_size(Some(taken)), "{taken:?}");
        }
        for other in ["text/plain", "text/x.tlog.sizes", "", "x.tlog.size"] {
            assert!(!is_tlog_size(Some(other)), "{other:?}");
        }
        assert!(!is_tlog_size(None));
    }

    const LOG_SEED: [u8; 32] = [9; 32];
    const ORIGIN: &str = "log.test/witnessed";

    fn log_key() -> VerifierKey {
        let sk = ed25519_dalek::SigningKey::from_bytes(&LOG_SEED);
        VerifierKey::new(ORIGIN, sk.verifying_key().as_bytes()).unwrap()
    }

    /// Saves a checkpoint of the first `size` leaves, signed by the test
    /// log key; returns its note.
    fn sign_at(store: &Store, size: u64) -> String {
        save_signed(store, size, store.root(size).unwrap())
    }

    /// Saves a checkpoint of `size` and `root` signed by the test log key;
    /// returns its note.
    fn save_signed(store: &Store, size: u64, root: crate::audit::merkle::Hash) -> String {
        let sk = ed25519_dalek::SigningKey::from_bytes(&LOG_SEED);
        let checkpoint = Checkpoint {
            origin: ORIGIN.into(),
            size,
            root,
        };
        let note = note::sign_checkpoint(&checkpoint, sk.verifying_key().as_bytes(), |m| {
            Ok::<_, std::io::Error>(sk.sign(m).to_bytes())
        })
        .unwrap();
        store
            .save_checkpoint(size, &note, time::OffsetDateTime::now_utc())
            .unwrap();
        note
    }

    /// A quorum further back than the rows `served` reads first (one
    /// witness down while the other cosigned `SERVE_SCAN_ROWS` more
    /// checkpoints) is still the checkpoint served, with its cosignatures:
    /// not the newest signed one, which the quorum, formed again below it,
    /// would then follow with a smaller size (a mirror refuses that as a
    /// rollback). Before, the newest signed was served (helper-204's 2).
    #[test]
    fn a_quorum_older_than_the_rows_read_first_is_still_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let keys = witness_keys(2);
        let policy_text = format!(
            "witness A {}\nwitness B {}\ngroup q all A B\nquorum q\n",
            keys[0].1, keys[1].1
        );
        let witnessing = witnessing_of(dir.path(), &store, &keys, &policy_text);
        let served = || size_and_lines(&witnessing.served().unwrap().unwrap());
        let last = grow(&store, SERVE_SCAN_ROWS as usize + 8);
        // Both cosign size 2; then only w1, each of the later sizes.
        let quorum = 2;
        sign_at(&store, quorum);
        for (sk, key) in &keys {
            cosign_stored(&store, quorum, sk, key);
        }
        assert_eq!(served(), (quorum, 2));
        for size in quorum + 1..=last {
            if size != last {
                sign_at(&store, size);
            }
            cosign_stored(&store, size, &keys[0].0, &keys[0].1);
        }
        assert!(
            store
                .cosignatures(quorum + 1..u64::MAX, SERVE_SCAN_ROWS)
                .unwrap()
                .len() as u64
                >= SERVE_SCAN_ROWS
        );
        assert_eq!(served(), (quorum, 2));
        // w2 back, on a size w1 cosigned: served from then on.
        let joined = last - 3;
        cosign_stored(&store, joined, &keys[1].0, &keys[1].1);
        assert_eq!(served(), (joined, 2));
    }

    /// Witness keys `w1.test`, `w2.test`, … with their signing keys.
    fn witness_keys(n: u8) -> Vec<(ed25519_dalek::SigningKey, CosignerKey)> {
        (1..=n)
            .map(|i| {
                let sk = ed25519_dalek::SigningKey::from_bytes(&[i; 32]);
                let key =
                    CosignerKey::new(&format!("w{i}.test"), sk.verifying_key().as_bytes()).unwrap();
                (sk, key)
            })
            .collect()
    }

    /// A `Witnessing` of `store` under `policy_text` over `keys` (their
    /// URLs never asked: nothing is started).
    fn witnessing_of(
        dir: &Path,
        store: &Arc<Store>,
        keys: &[(ed25519_dalek::SigningKey, CosignerKey)],
        policy_text: &str,
    ) -> Witnessing {
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let urls: Vec<String> = keys
            .iter()
            .map(|(_, k)| format!("https://{}:1", k.name()))
            .collect();
        let witnesses: Vec<(&str, &CosignerKey)> = urls
            .iter()
            .zip(keys)
            .map(|(url, (_, key))| (url.as_str(), key))
            .collect();
        Witnessing::new(
            settings(dir, &witnesses, policy_text, &ca),
            store.clone(),
            None,
        )
    }

    /// Stores `key`'s cosignature of the stored checkpoint of `size`,
    /// signed by `sk` now.
    fn cosign_stored(store: &Store, size: u64, sk: &ed25519_dalek::SigningKey, key: &CosignerKey) {
        let note = store.checkpoint_at(size).unwrap().unwrap();
        let body = &note[..note.rfind("\n\n").unwrap() + 1];
        let line = super::super::witness::cosignature_line::<()>(key, body, unix_now(), |m| {
            Ok(sk.sign(m).to_bytes())
        })
        .unwrap();
        store
            .save_cosignature(&Cosignature {
                size,
                witness: key.name().to_string(),
                line,
            })
            .unwrap();
    }

    /// Writes, in one transaction of its own, a row for each `(size,
    /// witness)` whose line names the witness's key with a signature of
    /// zeros: rows that claim a cosignature and that no quorum is made of
    /// here (a group's claims are judged before its lines are verified).
    fn fill(path: &Path, rows: impl IntoIterator<Item = (u64, CosignerKey)>) {
        let mut conn = rusqlite::Connection::open(path).unwrap();
        let tx = conn.transaction().unwrap();
        for (size, key) in rows {
            let line = super::super::witness::cosignature_line::<()>(&key, "", 1, |_| Ok([0; 64]))
                .unwrap();
            tx.execute(
                "INSERT INTO audit_cosignatures (size, witness, line) VALUES (?1, ?2, ?3)",
                rusqlite::params![i64::try_from(size).unwrap(), key.name(), line],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    /// The size of a served checkpoint and how many cosignature lines it
    /// carries.
    fn size_and_lines(note: &str) -> (u64, usize) {
        let (body, _) = note::split_note(note).unwrap();
        (
            Checkpoint::parse(body).unwrap().size,
            note.matches("\n— w").count(),
        )
    }

    /// A store of 3 leaves whose checkpoint of 2 both witnesses of an
    /// `all` quorum of two cosigned, with its file, keys and policy.
    struct Quorum2 {
        dir: tempfile::TempDir,
        path: std::path::PathBuf,
        store: Arc<Store>,
        keys: Vec<(ed25519_dalek::SigningKey, CosignerKey)>,
        policy_text: String,
    }

    fn quorum_at_2() -> Quorum2 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lavd.db");
        let store = Arc::new(Store::open(&path).unwrap());
        let keys = witness_keys(2);
        let policy_text = format!(
            "witness A {}\nwitness B {}\ngroup q all A B\nquorum q\n",
            keys[0].1, keys[1].1
        );
        grow(&store, 3);
        sign_at(&store, 2);
        for (sk, key) in &keys {
            cosign_stored(&store, 2, sk, key);
        }
        Quorum2 {
            dir,
            path,
            store,
            keys,
            policy_text,
        }
    }

    /// A quorum several pages below the newest rows (two witnesses of an
    /// `all` quorum cosigning other sizes in turn ever since) is found a
    /// page at a time, and remembered: once it lies deeper than the pages
    /// `served` reads, the process that found it still serves it, with one
    /// read. A fresh process serves the newest signed checkpoint then (the
    /// limit, documented in docs/audit.md).
    #[test]
    fn a_quorum_pages_below_is_found_and_remembered() {
        let Quorum2 {
            dir,
            path,
            store,
            keys,
            policy_text,
        } = quorum_at_2();
        let (newest, quorum) = (3, 2);
        let turns = |from: u64, count: u64| {
            (from..from + count).map(|size| (size, keys[(size % 2) as usize].1.clone()))
        };
        let page = SERVE_SCAN_ROWS;
        fill(&path, turns(newest + 1, 3 * page + 7));
        let first = witnessing_of(dir.path(), &store, &keys, &policy_text);
        assert_eq!(
            size_and_lines(&first.served().unwrap().unwrap()),
            (quorum, 2)
        );
        // Deeper than the newest page and the 8 below it.
        fill(&path, turns(newest + 1 + 3 * page + 7, 7 * page));
        assert_eq!(
            size_and_lines(&first.served().unwrap().unwrap()),
            (quorum, 2)
        );
        let fresh = witnessing_of(dir.path(), &store, &keys, &policy_text);
        assert_eq!(
            size_and_lines(&fresh.served().unwrap().unwrap()),
            (newest, 0)
        );
    }

    /// A search below the newest page that fails on a store error is not
    /// taken as done: a request after `SEARCH_AFTER_FAILURE` (1 s) searches
    /// again and serves the quorum (before, the search was recorded as it
    /// began, and the fallback was served until the witnesses cosigned
    /// again).
    #[test]
    fn a_search_a_store_error_cut_short_is_made_again() {
        let Quorum2 {
            dir,
            path,
            store,
            keys,
            policy_text,
        } = quorum_at_2();
        let quorum = 2;
        fill(
            &path,
            (4..4 + 2 * SERVE_SCAN_ROWS).map(|size| (size, keys[(size % 2) as usize].1.clone())),
        );
        let note = store.checkpoint_at(quorum).unwrap().unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        // A note that is not UTF-8: reading it fails.
        conn.execute(
            "UPDATE audit_checkpoints SET note = CAST(X'FF' AS TEXT) WHERE size = ?1",
            [i64::try_from(quorum).unwrap()],
        )
        .unwrap();
        let witnessing = witnessing_of(dir.path(), &store, &keys, &policy_text);
        assert!(witnessing.served().is_err());
        conn.execute(
            "UPDATE audit_checkpoints SET note = ?1 WHERE size = ?2",
            rusqlite::params![note, i64::try_from(quorum).unwrap()],
        )
        .unwrap();
        let deadline = Instant::now() + SEARCH_AFTER_FAILURE * 5;
        while size_and_lines(&witnessing.served().unwrap().unwrap()) != (quorum, 2) {
            assert!(Instant::now() < deadline, "the search was not made again");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A size whose rows a full page cuts off (the page ends after two of
    /// its three witnesses, which alone make a 2-of-3 quorum) is served
    /// with all three lines, read whole from the next page: with two, an
    /// auditor whose own policy needs the third would find the quorum
    /// unmet.
    #[test]
    fn a_size_cut_off_the_page_is_served_with_all_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lavd.db");
        let store = Arc::new(Store::open(&path).unwrap());
        let keys = witness_keys(3);
        let policy_text = format!(
            "witness A {}\nwitness B {}\nwitness C {}\ngroup q 2 A B C\nquorum q\n",
            keys[0].1, keys[1].1, keys[2].1
        );
        let newest = grow(&store, 3);
        let quorum = 2;
        sign_at(&store, quorum);
        for (sk, key) in &keys {
            cosign_stored(&store, quorum, sk, key);
        }
        // Rows above it, one witness a size: the newest page holds them
        // and the quorum's first two rows (`w1.test`, `w2.test`: rows of
        // one size come in witness order).
        let above = SERVE_SCAN_ROWS - 2;
        fill(
            &path,
            (newest + 1..newest + 1 + above)
                .map(|size| (size, keys[(size % 3) as usize].1.clone())),
        );
        let page = store.cosignatures(0..u64::MAX, SERVE_SCAN_ROWS).unwrap();
        assert_eq!(
            page.iter().filter(|c| c.size == quorum).count(),
            2,
            "the page ends inside the quorum's rows"
        );
        let witnessing = witnessing_of(dir.path(), &store, &keys, &policy_text);
        assert_eq!(
            size_and_lines(&witnessing.served().unwrap().unwrap()),
            (quorum, 3)
        );
        // The same for a wait's read (`release_after_witness`), which reads
        // one page only.
        assert_eq!(
            size_and_lines(&witnessing.quorum_covering(quorum).unwrap().unwrap()),
            (quorum, 3)
        );
    }

    /// Saves a checkpoint of `size` signed by the test log key over a root
    /// of its own (serving compares a checkpoint with its rows, not with
    /// the tree); returns its note.
    fn sign_detached(store: &Store, size: u64) -> String {
        save_signed(store, size, [size as u8; 32])
    }

    /// Once a quorum is remembered, a newer one that the newest page does
    /// not hold (one witness down since, the other cosigning on) is still
    /// looked for above it and served; and a remembered one whose lines no
    /// longer verify (a row edited behind lavd, a clock stepped back) is
    /// served as it is, with the lines that do, not replaced by the newest
    /// signed checkpoint (after which the quorum, verifying again, would
    /// take the size back down).
    #[test]
    fn a_remembered_quorum_neither_hides_a_newer_one_nor_gives_way_to_the_newest_signed() {
        let Quorum2 {
            dir,
            path,
            store,
            keys,
            policy_text,
        } = quorum_at_2();
        let witnessing = witnessing_of(dir.path(), &store, &keys, &policy_text);
        assert_eq!(
            size_and_lines(&witnessing.served().unwrap().unwrap()),
            (2, 2)
        );
        // Both cosign 10; then only A, more than a page of sizes above it.
        let newer = 10;
        sign_detached(&store, newer);
        for (sk, key) in &keys {
            cosign_stored(&store, newer, sk, key);
        }
        let above = newer + 1;
        fill(
            &path,
            (above..above + SERVE_SCAN_ROWS + 50).map(|size| (size, keys[0].1.clone())),
        );
        assert_eq!(
            size_and_lines(&witnessing.served().unwrap().unwrap()),
            (newer, 2)
        );
        // The newest signed checkpoint is larger still.
        let newest = above + SERVE_SCAN_ROWS + 100;
        sign_detached(&store, newest);
        // The remembered quorum's lines turned bad behind lavd.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE audit_cosignatures SET line = ?1 WHERE size = ?2 AND witness = ?3",
                rusqlite::params![
                    super::super::witness::cosignature_line::<()>(&keys[1].1, "", 1, |_| Ok(
                        [0; 64]
                    ))
                    .unwrap(),
                    i64::try_from(newer).unwrap(),
                    keys[1].1.name()
                ],
            )
            .unwrap();
        assert_eq!(
            size_and_lines(&witnessing.served().unwrap().unwrap()),
            (newer, 1)
        );
    }

    /// Appends `n` leaves and saves a checkpoint of the whole tree, signed
    /// by the test log key; returns its size.
    fn grow(store: &Store, n: usize) -> u64 {
        let refused =
            WarrantRefused::new("spiffe://agency.test/a", None, None, "malformed_warrant");
        let events: Vec<Event> = (0..n).map(|_| refused.clone().unwrap().into()).collect();
        store
            .append(AuditAppend {
                events,
                time: parse_time("2026-12-02T00:00:00Z").unwrap(),
                spend: Spend::None,
            })
            .unwrap();
        let size = store.tree_size().unwrap();
        sign_at(store, size);
        size
    }

    /// Stores `key`'s cosignature (signed with `sk`) of the checkpoint of
    /// `size`, as the submitter would; returns its line.
    fn cosign(
        store: &Store,
        size: u64,
        key: &CosignerKey,
        sk: &ed25519_dalek::SigningKey,
    ) -> String {
        cosign_at(store, size, key, sk, 1_700_000_000)
    }

    /// [`cosign`], stamped `at`.
    fn cosign_at(
        store: &Store,
        size: u64,
        key: &CosignerKey,
        sk: &ed25519_dalek::SigningKey,
        at: u64,
    ) -> String {
        let note = store.checkpoint_at(size).unwrap().unwrap();
        let (body, _) = note::split_note(&note).unwrap();
        let line = crate::audit::witness::cosignature_line(key, body, at, |m| {
            Ok::<_, ()>(sk.sign(m).to_bytes())
        })
        .unwrap();
        store
            .save_cosignature(&Cosignature {
                size,
                witness: key.name().to_string(),
                line: line.clone(),
            })
            .unwrap();
        line
    }

    /// A witness named `name` trusting `trusts` for the origin, served over
    /// HTTPS on a loopback port; returns its URL and key.
    async fn witness(
        dir: &Path,
        name: &str,
        seed: u8,
        trusts: VerifierKey,
        ca: &crate::dev::pki::DevCa,
    ) -> (String, CosignerKey, Arc<WitnessState>) {
        witness_of(dir, name, seed, ORIGIN, trusts, ca, Quirks::default()).await
    }

    /// Starts `witnessing`'s submitters on `runtime`, tells them the log
    /// signed a checkpoint of `signed`, and waits for a quorum-cosigned one
    /// of at least `until`, which it returns.
    fn started_until_quorum(
        runtime: &tokio::runtime::Runtime,
        witnessing: &Arc<Witnessing>,
        signed: u64,
        until: u64,
    ) -> String {
        runtime.block_on(async { witnessing.spawn_submitters().unwrap() });
        witnessing.signed(signed);
        let waiter = witnessing.clone();
        std::thread::spawn(move || waiter.wait_for_quorum(until))
            .join()
            .unwrap()
            .unwrap()
    }

    /// Whether `metrics` has a series starting with `series`.
    fn counted(metrics: &Metrics, series: &str) -> bool {
        metrics
            .render()
            .unwrap()
            .lines()
            .any(|l| l.starts_with(series))
    }

    /// Starts submitters of `store`'s log to the one witness at `url`
    /// (`key`, a quorum alone), tells them of a checkpoint of `size`, and
    /// waits up to 20 s for `outcome` to be counted for that witness.
    /// Returns the metrics.
    fn submitted_until_counted(
        runtime: &tokio::runtime::Runtime,
        dir: &Path,
        store: &Arc<Store>,
        (url, key): (&str, &CosignerKey),
        ca: &crate::dev::pki::DevCa,
        size: u64,
        outcome: &str,
    ) -> Arc<Metrics> {
        let policy_text = format!("witness A {key}\nquorum A\n");
        let metrics = Arc::new(Metrics::new().unwrap());
        let witnessing = Arc::new(Witnessing::new(
            settings(dir, &[(url, key)], &policy_text, ca),
            store.clone(),
            Some(metrics.clone()),
        ));
        runtime.block_on(async { witnessing.spawn_submitters().unwrap() });
        witnessing.signed(size);
        let series = format!(
            "lavd_witness_requests_total{{outcome=\"{outcome}\",witness=\"{}\"}}",
            key.name()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !counted(&metrics, &series) {
            assert!(
                Instant::now() < deadline,
                "{outcome} not counted in 20 s: {}",
                metrics.render().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        metrics
    }

    /// Has the test witness `state` (`key`, its seed `seed`) cosign
    /// `checkpoint` from size 0 directly, not through a submitter, as
    /// another client of it would; asserts the 200.
    fn cosigned_directly(state: &WitnessState, key: &CosignerKey, seed: u8, checkpoint: String) {
        let body = AddCheckpoint {
            old_size: 0,
            proof: Vec::new(),
            checkpoint,
        }
        .encode();
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let outcome = state
            .add_checkpoint(body.as_bytes(), &|_| vec![log_key()], key, &|| 1, |m| {
                Ok::<_, ()>(sk.sign(m).to_bytes())
            })
            .unwrap()
            .unwrap();
        assert_eq!(outcome.status(), 200);
    }

    /// Has the test witness of `seed` (its `state` and `key`) cosign the
    /// log's checkpoint of `size`, then corrupts its record (another root
    /// at that size), as a witness that was shown a fork would hold.
    fn shown_a_fork(
        dir: &Path,
        store: &Store,
        state: &WitnessState,
        key: &CosignerKey,
        seed: u8,
        size: u64,
    ) {
        cosigned_directly(
            state,
            key,
            seed,
            store.checkpoint_at(size).unwrap().unwrap(),
        );
        rusqlite::Connection::open(dir.join(format!("{seed}.db")))
            .unwrap()
            .execute("UPDATE cosigned SET root = zeroblob(32)", [])
            .unwrap();
    }

    /// Run by a test witness on each request before it answers it.
    type Hook = Arc<dyn Fn(&WitnessState) + Send + Sync>;

    /// A count of the requests a test witness answers, and the hook that
    /// counts them ([`Quirks::before`]).
    fn request_counter() -> (Arc<std::sync::atomic::AtomicU64>, Hook) {
        let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = asked.clone();
        let hook: Hook = Arc::new(move |_: &WitnessState| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        (asked, hook)
    }

    /// How a test witness ([`witness_of`]) departs from a plain one.
    #[derive(Default)]
    struct Quirks {
        /// Run on each request, before it is answered.
        before: Option<Hook>,
        /// The time its cosignatures are stamped (a clock stuck there),
        /// else the time.
        stamp: Option<u64>,
        /// The seed of a key that signs its cosignatures in place of its
        /// own: lines with its name and key ID that do not verify.
        signer: Option<u8>,
        /// Answers every request `308 Permanent Redirect` to this
        /// `Location` (a witness that moved).
        moved: Option<&'static str>,
    }

    /// As [`witness`], for a witness that knows only the log `knows`, and
    /// behaves as `quirks` say.
    async fn witness_of(
        dir: &Path,
        name: &str,
        seed: u8,
        knows: &'static str,
        trusts: VerifierKey,
        ca: &crate::dev::pki::DevCa,
        quirks: Quirks,
    ) -> (String, CosignerKey, Arc<WitnessState>) {
        let Quirks {
            before,
            stamp,
            signer,
            moved,
        } = quirks;
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let key = CosignerKey::new(name, sk.verifying_key().as_bytes()).unwrap();
        let sk = ed25519_dalek::SigningKey::from_bytes(&[signer.unwrap_or(seed); 32]);
        let state = Arc::new(WitnessState::create(&dir.join(format!("{seed}.db"))).unwrap());
        let server = ca.server().unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![
                rustls_pki_types::CertificateDer::from_pem_slice(server.cert_pem.as_bytes())
                    .unwrap(),
            ],
            rustls_pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (served_state, served_key) = (state.clone(), key.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (state, key, trusts, sk, before) = (
                    served_state.clone(),
                    served_key.clone(),
                    trusts.clone(),
                    sk.clone(),
                    before.clone(),
                );
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (state, key, trusts, sk, before) = (
                            state.clone(),
                            key.clone(),
                            trusts.clone(),
                            sk.clone(),
                            before.clone(),
                        );
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            if let Some(to) = moved {
                                let mut response = hyper::Response::new(Full::new(Bytes::new()));
                                *response.status_mut() = hyper::StatusCode::PERMANENT_REDIRECT;
                                response.headers_mut().insert(
                                    hyper::header::LOCATION,
                                    hyper::header::HeaderValue::from_static(to),
                                );
                                return Ok(response);
                            }
                            if let Some(before) = &before {
                                before(&state);
                            }
                            let trusted = |origin: &str| {
                                if origin == knows {
                                    vec![trusts.clone()]
                                } else {
                                    Vec::new()
                                }
                            };
                            let outcome = state
                                .add_checkpoint(
                                    &body,
                                    &trusted,
                                    &key,
                                    &|| stamp.unwrap_or_else(unix_now),
                                    |m| Ok::<_, ()>(sk.sign(m).to_bytes()),
                                )
                                .unwrap()
                                .unwrap();
                            let mut response = hyper::Response::new(Full::new(Bytes::new()));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(outcome.status()).unwrap();
                            match outcome {
                                AddOutcome::Cosigned(line) => {
                                    *response.body_mut() = Full::new(Bytes::from(line));
                                }
                                AddOutcome::Conflict { size } => {
                                    response.headers_mut().insert(
                                        hyper::header::CONTENT_TYPE,
                                        // As a proxy may write it: the
                                        // submitter must still read the
                                        // size (RFC 9110 §8.3.1).
                                        hyper::header::HeaderValue::from_static(
                                            "Text/X.Tlog.Size; charset=utf-8",
                                        ),
                                    );
                                    *response.body_mut() =
                                        Full::new(Bytes::from(format!("{size}\n")));
                                }
                                _ => {}
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service),
                );
            }
        });
        (format!("https://localhost:{port}"), key, state)
    }

    fn settings(
        dir: &Path,
        witnesses: &[(&str, &CosignerKey)],
        policy: &str,
        ca: &crate::dev::pki::DevCa,
    ) -> WitnessClientSettings {
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.ca.cert_pem).unwrap();
        WitnessClientSettings {
            witnesses: witnesses
                .iter()
                .map(|(url, key)| WitnessEndpoint {
                    name: key.name().to_string(),
                    url: url.to_string(),
                    key: (*key).clone(),
                    ca_file: Some(ca_file.clone()),
                })
                .collect(),
            policy_file: dir.join("policy"),
            policy: Arc::new(Policy::parse(policy.as_bytes()).unwrap()),
            policy_text: policy.as_bytes().to_vec(),
            release_after_witness: true,
            timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            refresh_after: Duration::from_secs(300),
        }
    }

    /// While the log takes no leaves, its newest checkpoint is sent to a
    /// witness again once the witness's cosignature of it is older than
    /// `refresh_after`: the newer line replaces the stored one and is
    /// served, so that an idle honest log does not look like a frozen view
    /// to `lavd audit verify --max-cosignature-age` (helper-172's 1).
    #[test]
    fn an_idle_logs_newest_checkpoint_is_cosigned_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let (u1, k1, _) = runtime.block_on(witness(dir.path(), "w1.test", 1, log_key(), &ca));
        let size = grow(&store, 3);
        let policy_text = format!("witness A {k1}\ngroup q all A\nquorum q\n");
        let mut settings = settings(dir.path(), &[(&u1, &k1)], &policy_text, &ca);
        settings.refresh_after = Duration::from_secs(1);
        let witnessing = Arc::new(Witnessing::new(settings, store.clone(), None));
        started_until_quorum(&runtime, &witnessing, size, size);
        let note = store.checkpoint_at(size).unwrap().unwrap();
        let stored = || {
            let rows = store.cosignatures(0..u64::MAX, 10).unwrap();
            assert_eq!(rows.len(), 1, "{rows:?}");
            let line = rows[0].line.clone();
            let times = verify_cosignatures(&format!("{note}{line}"), &k1).unwrap();
            (line, times[0])
        };
        let (first_line, first) = stored();
        let deadline = Instant::now() + Duration::from_secs(20);
        while stored().1 <= first {
            assert!(Instant::now() < deadline, "not cosigned again in 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (line, _) = stored();
        assert_eq!(store.last_cosigned("w1.test").unwrap(), Some(size));
        let served = witnessing.served().unwrap().unwrap();
        assert!(served.contains(&line), "{served}");
        assert!(!served.contains(&first_line), "{served}");
        drop(runtime);
    }

    /// A witness that answers 409 with a size below one whose cosignature
    /// by it the log holds (its state lost) is an ERROR, counted
    /// `rolled_back`, and is caught up from its size.
    #[test]
    fn a_witness_that_went_back_is_counted_and_caught_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let (u1, k1, _) = runtime.block_on(witness(dir.path(), "w1.test", 1, log_key(), &ca));
        let first = grow(&store, 3);
        let policy_text = format!("witness A {k1}\ngroup q all A\nquorum q\n");
        let metrics = Arc::new(Metrics::new().unwrap());
        let witnessing = Arc::new(Witnessing::new(
            settings(dir.path(), &[(&u1, &k1)], &policy_text, &ca),
            store.clone(),
            Some(metrics.clone()),
        ));
        started_until_quorum(&runtime, &witnessing, first, first);
        assert_eq!(store.last_cosigned("w1.test").unwrap(), Some(first));
        let rolled_back = r#"lavd_witness_requests_total{outcome="rolled_back",witness="w1.test"}"#;
        assert!(!counted(&metrics, rolled_back));
        // Its state loses the log's record (as a restore of a copy made
        // before its first cosignature would).
        rusqlite::Connection::open(dir.path().join("1.db"))
            .unwrap()
            .execute("DELETE FROM cosigned", [])
            .unwrap();
        let size = grow(&store, 2);
        witnessing.signed(size);
        let waiter = witnessing.clone();
        std::thread::spawn(move || waiter.wait_for_quorum(size))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(store.last_cosigned("w1.test").unwrap(), Some(size));
        assert!(
            counted(&metrics, rolled_back),
            "{}",
            metrics.render().unwrap()
        );
        drop(runtime);
    }

    /// A witness that answers 409 with a size larger than any checkpoint
    /// this log has signed (someone holding the log's key had a larger tree
    /// cosigned: split-view evidence) is counted `fork`, the outcome
    /// operators alert on, not only `conflict`; nothing of it is stored.
    #[test]
    fn a_witness_holding_a_size_beyond_the_log_is_counted_fork() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let (u1, k1, s1) = runtime.block_on(witness(dir.path(), "w1.test", 1, log_key(), &ca));
        // Another tree under the log's key, larger than this one.
        let other = Store::open(&dir.path().join("other.db")).unwrap();
        let beyond = grow(&other, 5);
        cosigned_directly(&s1, &k1, 1, other.checkpoint_at(beyond).unwrap().unwrap());

        let size = grow(&store, 3);
        submitted_until_counted(&runtime, dir.path(), &store, (&u1, &k1), &ca, size, "fork");
        assert_eq!(store.last_cosigned("w1.test").unwrap(), None);
        drop(runtime);
    }

    /// Two witnesses under a quorum of both, and a third that trusts
    /// another log key (403) outside the quorum: the quorum is reached, the
    /// 403 holds up nothing, the served checkpoint has both lines, and a
    /// witness that cosigned a size the store does not know about answers
    /// 409 and the submitter recovers from its size.
    #[test]
    fn submitters_reach_the_quorum_and_recover_from_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let other = VerifierKey::new(ORIGIN, &[1; 32]).unwrap();
        let ((u1, k1, s1), (u2, k2, _), (u3, k3, _)) = runtime.block_on(async {
            (
                witness(dir.path(), "w1.test", 1, log_key(), &ca).await,
                witness(dir.path(), "w2.test", 2, log_key(), &ca).await,
                witness(dir.path(), "w3.test", 3, other, &ca).await,
            )
        });
        // w1 already cosigned size 3 for another client: the store knows
        // nothing of it, so the first request (old 0) gets its 409.
        let first = grow(&store, 3);
        cosigned_directly(&s1, &k1, 1, store.checkpoint_at(first).unwrap().unwrap());
        let size = grow(&store, 4);

        let policy_text = format!(
            "witness A {k1}\nwitness B {k2}\nwitness C {k3}\ngroup both all A B\nquorum both\n"
        );
        let witnessing = Arc::new(Witnessing::new(
            settings(
                dir.path(),
                &[(&u1, &k1), (&u2, &k2), (&u3, &k3)],
                &policy_text,
                &ca,
            ),
            store.clone(),
            None,
        ));
        let cosigned = started_until_quorum(&runtime, &witnessing, size, size);
        let policy = Policy::parse(format!("log {}\n{policy_text}", log_key()).as_bytes()).unwrap();
        let (checkpoint, valid) = policy.verify(&cosigned).unwrap();
        let names: Vec<&str> = valid.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!((checkpoint.size, names), (size, vec!["A", "B"]));
        assert_eq!(store.last_cosigned("w1.test").unwrap(), Some(size));
        assert_eq!(store.last_cosigned("w3.test").unwrap(), None);
        let served = witnessing.served().unwrap().unwrap();
        assert!(policy.verify(&served).is_ok());
        // Nothing covers a size the log has not reached: the wait ends.
        let mut short = settings(
            dir.path(),
            &[(&u1, &k1), (&u2, &k2), (&u3, &k3)],
            &policy_text,
            &ca,
        );
        short.timeout = Duration::from_millis(200);
        let bounded = Witnessing::new(short, store.clone(), None);
        assert!(matches!(
            bounded.wait_for_quorum(size + 1),
            Err(WaitError::Timeout { size: s, .. }) if s == size + 1
        ));
        drop(runtime);
    }

    /// A witness that does not know the log (404) and one whose record
    /// contradicts the log (its root at the size it cosigned is not this
    /// log's, so the proof from there fails: 422, a fork) are each logged,
    /// counted and backed off, and hold up neither the quorum of the others nor
    /// each other.
    #[test]
    fn unknown_origin_and_a_fork_at_an_older_size_are_counted_and_hold_nothing_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let ((u1, k1, _), (u4, k4, _), (u5, k5, s5)) = runtime.block_on(async {
            (
                witness(dir.path(), "w1.test", 1, log_key(), &ca).await,
                witness_of(
                    dir.path(),
                    "w4.test",
                    4,
                    "log.test/another",
                    log_key(),
                    &ca,
                    Quirks::default(),
                )
                .await,
                witness(dir.path(), "w5.test", 5, log_key(), &ca).await,
            )
        });
        // w5 cosigns size 3, then its record is corrupted (another root at
        // that size), as a witness that was shown a fork would hold; the
        // log grows to 4, so the proof it is sent runs from 3.
        let first = grow(&store, 3);
        shown_a_fork(dir.path(), &store, &s5, &k5, 5, first);
        let size = grow(&store, 4);

        let policy_text =
            format!("witness A {k1}\nwitness D {k4}\nwitness E {k5}\ngroup q all A\nquorum q\n");
        let metrics = Arc::new(Metrics::new().unwrap());
        let witnessing = Arc::new(Witnessing::new(
            settings(
                dir.path(),
                &[(&u1, &k1), (&u4, &k4), (&u5, &k5)],
                &policy_text,
                &ca,
            ),
            store.clone(),
            Some(metrics.clone()),
        ));
        started_until_quorum(&runtime, &witnessing, size, size);
        let counted = |series: &str| counted(&metrics, series);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !(counted(
            r#"lavd_witness_requests_total{outcome="unknown_origin",witness="w4.test"}"#,
        ) && counted(r#"lavd_witness_requests_total{outcome="fork",witness="w5.test"}"#))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "404 and 422 not both counted:\n{}",
                metrics.render().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // w5's 409 (its size, 3) was learned before the 422; nothing it
        // said was stored, nor anything of w4.
        assert!(counted(
            r#"lavd_witness_requests_total{outcome="conflict",witness="w5.test"}"#
        ));
        assert_eq!(store.last_cosigned("w4.test").unwrap(), None);
        assert_eq!(store.last_cosigned("w5.test").unwrap(), None);
        assert_eq!(store.last_cosigned("w1.test").unwrap(), Some(size));
        // A fork, not a bad proof: the proof was the log's own, from the
        // size w5 said it holds (before, this was counted `bad_proof`,
        // which nobody alerts on).
        assert!(!counted(
            r#"lavd_witness_requests_total{outcome="bad_proof",witness="w5.test"}"#
        ));
        drop(runtime);
    }

    /// A witness holding another root at the log's own size (shown a
    /// fork) answers the log's checkpoint of that size 422 once the
    /// submitter has learned the size from its 409: counted as `fork`, not
    /// as a bad proof, and it holds up no quorum of the others.
    #[test]
    fn a_witness_with_another_root_at_the_logs_size_is_counted_as_a_fork() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let ((u1, k1, _), (u5, k5, s5)) = runtime.block_on(async {
            (
                witness(dir.path(), "w1.test", 1, log_key(), &ca).await,
                witness(dir.path(), "w5.test", 5, log_key(), &ca).await,
            )
        });
        let size = grow(&store, 3);
        shown_a_fork(dir.path(), &store, &s5, &k5, 5, size);

        let policy_text = format!("witness A {k1}\nwitness E {k5}\ngroup q all A\nquorum q\n");
        let metrics = Arc::new(Metrics::new().unwrap());
        let witnessing = Arc::new(Witnessing::new(
            settings(dir.path(), &[(&u1, &k1), (&u5, &k5)], &policy_text, &ca),
            store.clone(),
            Some(metrics.clone()),
        ));
        started_until_quorum(&runtime, &witnessing, size, size);
        let counted = |series: &str| counted(&metrics, series);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !counted(r#"lavd_witness_requests_total{outcome="fork",witness="w5.test"}"#) {
            assert!(
                std::time::Instant::now() < deadline,
                "no fork counted:\n{}",
                metrics.render().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!counted(
            r#"lavd_witness_requests_total{outcome="bad_proof",witness="w5.test"}"#
        ));
        assert_eq!(store.last_cosigned("w5.test").unwrap(), None);
        drop(runtime);
    }

    /// A store read that fails during the wait (as in a PostgreSQL
    /// failover; here a real SQLite error, the cosignature table renamed
    /// away for a while by another connection) is retried until the
    /// deadline instead of ending the wait of an unwrap that has already
    /// spent its budget; a store still unreadable at the deadline ends it
    /// with [`WaitError::Store`].
    #[test]
    fn a_store_read_failing_during_the_wait_is_retried_until_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("lavd.db");
        let store = Arc::new(Store::open(&db).unwrap());
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let sk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let key = CosignerKey::new("w1.test", sk.verifying_key().as_bytes()).unwrap();
        let size = grow(&store, 2);
        let line = cosign(&store, size, &key, &sk);
        let policy = format!("witness A {key}\nquorum A\n");
        let mut settings = settings(dir.path(), &[("https://localhost:1", &key)], &policy, &ca);
        settings.timeout = Duration::from_secs(20);
        let witnessing = Witnessing::new(settings.clone(), store.clone(), None);

        let other = rusqlite::Connection::open(&db).unwrap();
        other
            .execute_batch("ALTER TABLE audit_cosignatures RENAME TO hidden")
            .unwrap();
        assert!(witnessing.quorum_covering(size).is_err(), "the read fails");
        let restorer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            other
                .execute_batch("ALTER TABLE hidden RENAME TO audit_cosignatures")
                .unwrap();
            other
        });
        let cosigned = witnessing.wait_for_quorum(size).unwrap();
        assert!(cosigned.ends_with(&line), "{cosigned}");
        let other = restorer.join().unwrap();

        settings.timeout = Duration::from_millis(300);
        let bounded = Witnessing::new(settings, store.clone(), None);
        other
            .execute_batch("ALTER TABLE audit_cosignatures RENAME TO hidden")
            .unwrap();
        let started = Instant::now();
        let failed = bounded.wait_for_quorum(size);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            matches!(&failed, Err(WaitError::Store { size: s, .. }) if *s == size),
            "{failed:?}"
        );
        assert_eq!(failed.unwrap_err().timeout(), Duration::from_millis(300));
    }

    /// Two PostgreSQL replicas share one store: while this replica's
    /// request for size 3 is on its way, the other signs sizes 5 and 6 and
    /// the witness cosigns 5 for it, so the witness answers 409 with 5,
    /// more than this submitter read. That is a race, not a fork: the
    /// submitter reads the store again, finds 6, and sends it from 5.
    #[test]
    fn a_witness_ahead_because_another_replica_submitted_is_caught_up_not_a_fork() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let first = grow(&store, 3);
        let sk1 = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let k1 = CosignerKey::new("w1.test", sk1.verifying_key().as_bytes()).unwrap();
        let other_replica: Hook = {
            let (store, k1, done) = (
                store.clone(),
                k1.clone(),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            );
            Arc::new(move |state: &WitnessState| {
                if done.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let theirs = grow(&store, 2);
                cosigned_directly(state, &k1, 1, store.checkpoint_at(theirs).unwrap().unwrap());
                grow(&store, 1);
            })
        };
        let (u1, k1, _) = runtime.block_on(witness_of(
            dir.path(),
            "w1.test",
            1,
            ORIGIN,
            log_key(),
            &ca,
            Quirks {
                before: Some(other_replica),
                stamp: None,
                ..Quirks::default()
            },
        ));
        let policy_text = format!("witness A {k1}\nquorum A\n");
        let settings = settings(dir.path(), &[(&u1, &k1)], &policy_text, &ca);
        let w = settings.witnesses[0].clone();
        let endpoint = Endpoint::new(&w.url, w.ca_file.as_ref().unwrap(), None).unwrap();
        let witnessing = Witnessing::new(settings, store.clone(), None);
        assert_eq!(first, 3);
        assert_eq!(
            runtime.block_on(witnessing.submit_newest(&w, &endpoint, &mut None)),
            Ok(Submitted::Newest)
        );
        assert_eq!(store.last_cosigned("w1.test").unwrap(), Some(6));
        assert!(witnessing.quorum_covering(6).unwrap().is_some());
        drop(runtime);
    }

    /// Stored cosignatures are kept by witness name. After the witness's
    /// key is replaced under the same name, the rows the old key signed
    /// count for nothing: neither a quorum to wait for nor the served
    /// checkpoint's; the new key's rows do.
    #[test]
    fn cosignatures_by_a_replaced_key_of_the_same_name_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let old_sk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let old_key = CosignerKey::new("w1.test", old_sk.verifying_key().as_bytes()).unwrap();
        let new_sk = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let new_key = CosignerKey::new("w1.test", new_sk.verifying_key().as_bytes()).unwrap();
        let first = grow(&store, 2);
        cosign(&store, first, &old_key, &old_sk);
        let second = grow(&store, 1);

        let policy_text = format!("witness A {new_key}\nquorum A\n");
        let mut settings = settings(
            dir.path(),
            &[("https://localhost:1", &new_key)],
            &policy_text,
            &ca,
        );
        settings.timeout = Duration::from_millis(200);
        let witnessing = Witnessing::new(settings, store.clone(), None);
        let policy = Policy::parse(format!("log {}\n{policy_text}", log_key()).as_bytes()).unwrap();
        assert_eq!(witnessing.quorum_covering(first).unwrap(), None);
        assert!(matches!(
            witnessing.wait_for_quorum(first),
            Err(WaitError::Timeout { .. })
        ));
        let served = witnessing.served().unwrap().unwrap();
        assert!(policy.verify(&served).is_err(), "{served}");

        // A witness no longer configured: its line is stored, not served (a
        // note carries at most 64 signature lines), with the quorum or not.
        let gone_sk = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let gone_key = CosignerKey::new("w9.test", gone_sk.verifying_key().as_bytes()).unwrap();
        cosign(&store, second, &gone_key, &gone_sk);
        let served = witnessing.served().unwrap().unwrap();
        assert!(!served.contains("— w9.test "), "{served}");
        cosign(&store, second, &new_key, &new_sk);
        let covering = witnessing.quorum_covering(first).unwrap().unwrap();
        assert_eq!(policy.verify(&covering).unwrap().0.size, second);
        let served = witnessing.served().unwrap().unwrap();
        assert_eq!(policy.verify(&served).unwrap().0.size, second);
        for note in [&covering, &served] {
            assert!(!note.contains("— w9.test "), "{note}");
            assert_eq!(note.matches("\n— ").count(), 2, "{note}");
        }
    }

    /// Rows that name a configured witness with its key id but do not
    /// verify (written to the store behind lavd's back: THREAT_MODEL §4.7)
    /// count toward no quorum and are not served: one signed by another
    /// key, one by the witness's key over another checkpoint. Under
    /// `release_after_witness` the wait times out rather than release on
    /// them; the witness's real line then meets the quorum.
    #[test]
    fn stored_cosignatures_that_do_not_verify_count_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let a_sk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let a = CosignerKey::new("w1.test", a_sk.verifying_key().as_bytes()).unwrap();
        let b_sk = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let b = CosignerKey::new("w2.test", b_sk.verifying_key().as_bytes()).unwrap();
        let forger = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let first = grow(&store, 2);
        let second = grow(&store, 1);
        // A's key id, another key's signature.
        let forged = cosign(&store, second, &a, &forger);
        // B's real signature, of the first checkpoint, stored at the second.
        let first_note = store.checkpoint_at(first).unwrap().unwrap();
        let (first_body, _) = note::split_note(&first_note).unwrap();
        let moved = crate::audit::witness::cosignature_line(&b, first_body, 1_700_000_000, |m| {
            Ok::<_, ()>(b_sk.sign(m).to_bytes())
        })
        .unwrap();
        store
            .save_cosignature(&Cosignature {
                size: second,
                witness: b.name().to_string(),
                line: moved.clone(),
            })
            .unwrap();

        let policy_text =
            format!("witness A {a}\nwitness B {b}\ngroup both all A B\nquorum both\n");
        let mut settings = settings(
            dir.path(),
            &[("https://localhost:1", &a), ("https://localhost:2", &b)],
            &policy_text,
            &ca,
        );
        settings.timeout = Duration::from_millis(200);
        let witnessing = Witnessing::new(settings, store.clone(), None);
        let policy = Policy::parse(format!("log {}\n{policy_text}", log_key()).as_bytes()).unwrap();
        assert_eq!(witnessing.quorum_covering(second).unwrap(), None);
        assert!(matches!(
            witnessing.wait_for_quorum(second),
            Err(WaitError::Timeout { .. })
        ));
        let served = witnessing.served().unwrap().unwrap();
        assert!(!served.contains(forged.trim_end()), "{served}");
        assert!(!served.contains(moved.trim_end()), "{served}");
        assert_eq!(note::split_note(&served).unwrap().1.len(), 1, "{served}");

        // An older checkpoint with its real cosignatures, copied to a
        // larger size (one whose leaves no witness saw): not counted.
        let copied = store.tree_size().unwrap() + 1;
        store
            .append(AuditAppend {
                events: vec![WarrantRefused::new(
                    "spiffe://agency.test/a",
                    None,
                    None,
                    "malformed_warrant",
                )
                .unwrap()
                .into()],
                time: parse_time("2026-12-02T00:00:00Z").unwrap(),
                spend: Spend::None,
            })
            .unwrap();
        let old_a = cosign(&store, first, &a, &a_sk);
        let old_b = cosign(&store, first, &b, &b_sk);
        store
            .save_checkpoint(copied, &first_note, time::OffsetDateTime::now_utc())
            .unwrap();
        for (witness, line) in [(&a, &old_a), (&b, &old_b)] {
            store
                .save_cosignature(&Cosignature {
                    size: copied,
                    witness: witness.name().to_string(),
                    line: line.clone(),
                })
                .unwrap();
        }
        assert_eq!(witnessing.quorum_covering(copied).unwrap(), None);
        // (The real ones, at their own size, still count for it.)
        assert_eq!(
            policy
                .verify(&witnessing.quorum_covering(first).unwrap().unwrap())
                .unwrap()
                .0
                .size,
            first
        );

        // The real lines, of the next checkpoint (the forged rows hold
        // their witnesses' places at the second): the quorum is met there,
        // and only they are served.
        let third = grow(&store, 1);
        let real_a = cosign(&store, third, &a, &a_sk);
        let real_b = cosign(&store, third, &b, &b_sk);
        let covering = witnessing.quorum_covering(second).unwrap().unwrap();
        assert_eq!(witnessing.wait_for_quorum(second).unwrap(), covering);
        assert_eq!(policy.verify(&covering).unwrap().0.size, third);
        let served = witnessing.served().unwrap().unwrap();
        assert_eq!(served, covering);
        for line in [&real_a, &real_b] {
            assert!(served.contains(line.as_str()), "{served}");
        }
        assert_eq!(note::split_note(&served).unwrap().1.len(), 3, "{served}");
    }

    /// A cosignature stamped 0 (which tlog-witness forbids) or more than
    /// the skew past this clock counts for nothing, as `lavd audit verify`
    /// would set it aside: no quorum of it releases keys or is served.
    #[test]
    fn cosignatures_stamped_zero_or_ahead_of_the_clock_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let a_sk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let a = CosignerKey::new("w1.test", a_sk.verifying_key().as_bytes()).unwrap();
        let b_sk = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let b = CosignerKey::new("w2.test", b_sk.verifying_key().as_bytes()).unwrap();
        let policy_text =
            format!("witness A {a}\nwitness B {b}\ngroup both all A B\nquorum both\n");
        let mut settings = settings(
            dir.path(),
            &[("https://localhost:1", &a), ("https://localhost:2", &b)],
            &policy_text,
            &ca,
        );
        settings.timeout = Duration::from_millis(200);
        let witnessing = Witnessing::new(settings, store.clone(), None);
        let ahead = unix_now() + COSIGNATURE_FUTURE_SKEW_SECS + 60;
        let first = grow(&store, 1);
        cosign_at(&store, first, &a, &a_sk, 0);
        cosign_at(&store, first, &b, &b_sk, 1_700_000_000);
        let second = grow(&store, 1);
        cosign_at(&store, second, &a, &a_sk, 1_700_000_000);
        cosign_at(&store, second, &b, &b_sk, ahead);
        assert_eq!(witnessing.quorum_covering(first).unwrap(), None);
        assert!(matches!(
            witnessing.wait_for_quorum(first),
            Err(WaitError::Timeout { .. })
        ));
        // Within the skew, it counts.
        let third = grow(&store, 1);
        cosign_at(&store, third, &a, &a_sk, 1_700_000_000);
        cosign_at(&store, third, &b, &b_sk, unix_now() + 60);
        let covering = witnessing.quorum_covering(first).unwrap().unwrap();
        let policy = Policy::parse(format!("log {}\n{policy_text}", log_key()).as_bytes()).unwrap();
        assert_eq!(policy.verify(&covering).unwrap().0.size, third);
    }

    /// A witness whose clock lags (here stuck an hour back) answers each
    /// refresh with a line no newer than the stored one: it is asked once
    /// per `refresh_after` after it answered, not at every poll; and one
    /// whose clock runs ahead (an hour on) has its lines neither stored nor
    /// counted (outcome `clock_ahead`), and is asked again after the
    /// backoff's longest wait and the next checkpoint or `refresh_after`,
    /// not at every backoff, and not never.
    #[test]
    fn a_witness_whose_clock_lags_is_asked_once_an_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let ((lagging, lagging_hook), (ahead, ahead_hook)) = (request_counter(), request_counter());
        let hour = 3600;
        let ((u1, k1, _), (u2, k2, _)) = runtime.block_on(async {
            (
                witness_of(
                    dir.path(),
                    "w1.test",
                    1,
                    ORIGIN,
                    log_key(),
                    &ca,
                    Quirks {
                        before: Some(lagging_hook),
                        stamp: Some(unix_now() - hour),
                        ..Quirks::default()
                    },
                )
                .await,
                witness_of(
                    dir.path(),
                    "w2.test",
                    2,
                    ORIGIN,
                    log_key(),
                    &ca,
                    Quirks {
                        before: Some(ahead_hook),
                        stamp: Some(unix_now() + hour),
                        ..Quirks::default()
                    },
                )
                .await,
            )
        });
        let size = grow(&store, 3);
        let policy_text = format!("witness A {k1}\nwitness B {k2}\ngroup q any A B\nquorum q\n");
        let mut settings = settings(dir.path(), &[(&u1, &k1), (&u2, &k2)], &policy_text, &ca);
        settings.refresh_after = Duration::from_secs(4);
        let witnessing = Arc::new(Witnessing::new(settings, store.clone(), None));
        started_until_quorum(&runtime, &witnessing, size, size);
        // The lagging witness's line is stored; the one ahead's is not.
        let rows = store.cosignatures(0..u64::MAX, 10).unwrap();
        let names: Vec<&str> = rows.iter().map(|c| c.witness.as_str()).collect();
        assert_eq!(names, ["w1.test"], "{rows:?}");
        // Over 10 s of polls every second: the lagging witness, due at
        // once (its line is an hour old), is asked about every 4 s after
        // it answered; the one ahead, 2 requests a round (a 409, then the
        // 200), about every 5 s (the backoff's longest wait, above this
        // `refresh_after`).
        let count =
            |n: &Arc<std::sync::atomic::AtomicU64>| n.load(std::sync::atomic::Ordering::SeqCst);
        let (lagging_before, ahead_before) = (count(&lagging), count(&ahead));
        std::thread::sleep(Duration::from_secs(10));
        let (lagging_asked, ahead_asked) = (
            count(&lagging) - lagging_before,
            count(&ahead) - ahead_before,
        );
        assert!((1..=4).contains(&lagging_asked), "{lagging_asked}");
        // Not stalled either: asked again within the window.
        assert!((2..=6).contains(&ahead_asked), "{ahead_asked}");
        assert_eq!(store.cosignatures(0..u64::MAX, 10).unwrap(), rows);
        drop(runtime);
    }

    /// A witness whose clock runs ahead, with a long `refresh_after`: once
    /// it has answered, it is not asked again at every backoff, nor only
    /// after `refresh_after` (which would leave a `release_after_witness`
    /// quorum that needs it waiting that long after its clock is fixed),
    /// but at the next checkpoint signed.
    #[test]
    fn a_witness_ahead_is_asked_again_at_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let (asked, hook) = request_counter();
        let ((u1, k1, _), (u2, k2, _)) = runtime.block_on(async {
            (
                witness_of(
                    dir.path(),
                    "w1.test",
                    1,
                    ORIGIN,
                    log_key(),
                    &ca,
                    Quirks {
                        before: Some(hook),
                        stamp: Some(unix_now() + 3600),
                        ..Quirks::default()
                    },
                )
                .await,
                witness(dir.path(), "w2.test", 2, log_key(), &ca).await,
            )
        });
        let size = grow(&store, 3);
        let policy_text = format!("witness A {k1}\nwitness B {k2}\ngroup q any A B\nquorum q\n");
        let mut settings = settings(dir.path(), &[(&u1, &k1), (&u2, &k2)], &policy_text, &ca);
        settings.refresh_after = Duration::from_secs(600);
        let witnessing = Arc::new(Witnessing::new(settings, store.clone(), None));
        started_until_quorum(&runtime, &witnessing, size, size);
        let count = || asked.load(std::sync::atomic::Ordering::SeqCst);
        // It goes quiet: 7 s without a request, within 30 s.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut last, mut since) = (count(), Instant::now());
        while since.elapsed() < Duration::from_secs(7) {
            assert!(
                Instant::now() < deadline,
                "asked without pause: {}",
                count()
            );
            std::thread::sleep(Duration::from_millis(100));
            if count() != last {
                (last, since) = (count(), Instant::now());
            }
        }
        assert!(last > 0);
        // A new checkpoint: asked again within the backoff's longest wait.
        let newer = grow(&store, 1);
        witnessing.signed(newer);
        let deadline = Instant::now() + Duration::from_secs(8);
        while count() == last {
            assert!(
                Instant::now() < deadline,
                "not asked again at a new checkpoint"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(runtime);
    }

    /// Witness A cosigned an older checkpoint and went quiet; the log has
    /// signed a newer one since. B's submitter joins A's size first, so the
    /// quorum (both) is met there, then sends the newest. Sending only the
    /// newest, as before, left A's and B's cosignatures on different sizes
    /// and no size with both: under a steady stream of checkpoints and slow
    /// witnesses, the quorum might never be met.
    #[test]
    fn a_submitter_joins_the_size_others_cosigned_before_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let a_sk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let a_key = CosignerKey::new("w1.test", a_sk.verifying_key().as_bytes()).unwrap();
        let (b_url, b_key, _) =
            runtime.block_on(async { witness(dir.path(), "w2.test", 2, log_key(), &ca).await });
        let first = grow(&store, 3);
        cosign(&store, first, &a_key, &a_sk);
        let newest = grow(&store, 4);

        let policy_text =
            format!("witness A {a_key}\nwitness B {b_key}\ngroup both all A B\nquorum both\n");
        let mut settings = settings(
            dir.path(),
            // A is unreachable from here on.
            &[("https://localhost:1", &a_key), (&b_url, &b_key)],
            &policy_text,
            &ca,
        );
        settings.timeout = Duration::from_secs(10);
        let witnessing = Arc::new(Witnessing::new(settings, store.clone(), None));
        let cosigned = started_until_quorum(&runtime, &witnessing, newest, first);
        let policy = Policy::parse(format!("log {}\n{policy_text}", log_key()).as_bytes()).unwrap();
        assert_eq!(policy.verify(&cosigned).unwrap().0.size, first);
        // Then B moves on to the newest.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.last_cosigned("w2.test").unwrap() != Some(newest) {
            assert!(
                std::time::Instant::now() < deadline,
                "B never sent the newest"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(runtime);
    }

    /// A cosignature is verified before it is stored: a witness that
    /// answers 200 with a line under another key than the one configured
    /// for its name (here, its real key, where lavd was given another)
    /// gets nothing stored and meets no quorum, though it did cosign.
    #[test]
    fn a_cosignature_by_another_key_than_the_configured_one_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let (url, _real, state) =
            runtime.block_on(async { witness(dir.path(), "w2.test", 2, log_key(), &ca).await });
        let other = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let configured = CosignerKey::new("w2.test", other.verifying_key().as_bytes()).unwrap();
        let size = grow(&store, 3);

        let policy_text = format!("witness B {configured}\nquorum B\n");
        let mut settings = settings(dir.path(), &[(&url, &configured)], &policy_text, &ca);
        settings.timeout = Duration::from_millis(500);
        let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
        let witnessing = Arc::new(Witnessing::new(
            settings,
            store.clone(),
            Some(metrics.clone()),
        ));
        runtime.block_on(async { witnessing.spawn_submitters().unwrap() });
        witnessing.signed(size);
        // The witness cosigned (its own state moved to the size), and its
        // answer was judged: no valid cosignature by the configured key ...
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = metrics.render().unwrap();
            let judged = text
                .lines()
                .any(|l| l.contains("witness=\"w2.test\"") && l.contains("bad_cosignature"));
            if judged && state.recorded(ORIGIN).unwrap().map(|(s, _)| s) == Some(size) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never judged:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // ... and nothing of it was stored, so there is no quorum.
        assert_eq!(store.last_cosigned("w2.test").unwrap(), None);
        let waiter = witnessing.clone();
        let waited = std::thread::spawn(move || waiter.wait_for_quorum(size))
            .join()
            .unwrap();
        assert!(
            matches!(waited, Err(WaitError::Timeout { .. })),
            "{waited:?}"
        );
        drop(runtime);
    }

    /// The same with the configured key's name and key ID: a witness
    /// whose lines carry them but whose signatures do not verify (signed
    /// by another key) gets nothing stored and counts `bad_cosignature`.
    /// The test above would pass were lines judged by name and key ID
    /// alone; this one would not.
    #[test]
    fn a_cosignature_with_the_configured_key_id_that_does_not_verify_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let (url, key, state) = runtime.block_on(witness_of(
            dir.path(),
            "w2.test",
            2,
            ORIGIN,
            log_key(),
            &ca,
            Quirks {
                signer: Some(3),
                ..Quirks::default()
            },
        ));
        let size = grow(&store, 3);
        submitted_until_counted(
            &runtime,
            dir.path(),
            &store,
            (&url, &key),
            &ca,
            size,
            "bad_cosignature",
        );
        // The witness did cosign (its own state moved to the size).
        assert_eq!(state.recorded(ORIGIN).unwrap().map(|(s, _)| s), Some(size));
        assert_eq!(store.last_cosigned("w2.test").unwrap(), None);
        assert_eq!(store.cosignatures(0..u64::MAX, 10).unwrap(), Vec::new());
        drop(runtime);
    }

    /// A witness that answers with a redirect is not followed (the
    /// configured URL is the one trusted): counted `redirected`, an ERROR
    /// naming where it points, nothing stored. Before, it was a WARN
    /// "unavailable; will retry", forever.
    #[test]
    fn a_witness_answering_a_redirect_is_counted_redirected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let (url, key, _) = runtime.block_on(witness_of(
            dir.path(),
            "w1.test",
            1,
            ORIGIN,
            log_key(),
            &ca,
            Quirks {
                moved: Some("https://elsewhere.test/w"),
                ..Quirks::default()
            },
        ));
        let size = grow(&store, 3);
        let metrics = submitted_until_counted(
            &runtime,
            dir.path(),
            &store,
            (&url, &key),
            &ca,
            size,
            "redirected",
        );
        assert!(!counted(
            &metrics,
            r#"lavd_witness_requests_total{outcome="unavailable",witness="w1.test"}"#
        ));
        assert_eq!(store.last_cosigned("w1.test").unwrap(), None);
        drop(runtime);
    }

    /// Under `quorum none` every signed checkpoint meets the quorum: the
    /// newest is served (with what cosignatures it has), not the newest a
    /// witness happened to cosign before it went quiet.
    #[test]
    fn under_quorum_none_the_newest_checkpoint_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("lavd.db")).unwrap());
        let ca = crate::dev::pki::DevCa::new().unwrap();
        let sk = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let key = CosignerKey::new("w1.test", sk.verifying_key().as_bytes()).unwrap();
        let first = grow(&store, 2);
        cosign(&store, first, &key, &sk);
        let second = grow(&store, 3);

        let policy_text = format!("witness A {key}\nquorum none\n");
        let settings = settings(
            dir.path(),
            &[("https://localhost:1", &key)],
            &policy_text,
            &ca,
        );
        let witnessing = Witnessing::new(settings, store.clone(), None);
        let policy = Policy::parse(format!("log {}\n{policy_text}", log_key()).as_bytes()).unwrap();
        let served = witnessing.served().unwrap().unwrap();
        assert_eq!(policy.verify(&served).unwrap().0.size, second);
        assert_eq!(witnessing.quorum_covering(first).unwrap(), None);

        // Cosigned later, it carries the line.
        let line = cosign(&store, second, &key, &sk);
        let served = witnessing.served().unwrap().unwrap();
        assert_eq!(policy.verify(&served).unwrap().0.size, second);
        assert!(served.ends_with(&line), "{served}");
    }
}
